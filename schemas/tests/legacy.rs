//! Checked-in events of older schema versions still decode, upcast to today's shape.

use worldline_schemas::decode_envelope;
use worldline_schemas::pb::envelope::Body;

#[test]
#[allow(deprecated)]
fn a_schema_1_0_weather_event_decodes_with_its_temperature_in_tenths() {
    let bytes = include_bytes!("../fixtures/legacy/weather_changed_v1_0.bin");
    let envelope = decode_envelope(bytes).expect("legacy fixture decodes and validates");
    let Some(Body::WeatherChanged(change)) = envelope.body else {
        panic!("fixture is a WeatherChanged");
    };
    assert_eq!(change.temperature_dc, -35);
    assert_eq!(
        change.temperature_celsius, 0.0,
        "readers never see the old field"
    );
    assert_eq!(change.region, "north");
    assert_eq!(envelope.world_tick, 4_321);
}
