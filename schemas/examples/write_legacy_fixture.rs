//! Writes `fixtures/legacy/weather_changed_v1_0.bin`: a `WeatherChanged` as the
//! schema 1.0 weather producers wrote it (temperature as float °C). Run once when
//! the fixture was made; it is checked in and must never be regenerated, because
//! it stands for bytes already in the log.

use prost::Message;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{Envelope, WeatherChanged, WeatherCondition};

#[allow(deprecated)]
fn main() -> std::io::Result<()> {
    let envelope = Envelope {
        event_id: uuid::Uuid::parse_str("0190f5a1-6b2c-7d3e-8f40-5a6b7c8d9e0f")
            .expect("literal uuid")
            .as_bytes()
            .to_vec(),
        world_id: "emberfall".to_owned(),
        occurred_at_ms: 1_767_225_600_000,
        world_tick: 4_321,
        source: "weather".to_owned(),
        correlation_id: Vec::new(),
        causation_id: Vec::new(),
        body: Some(Body::WeatherChanged(WeatherChanged {
            region: "north".to_owned(),
            condition: WeatherCondition::Snow as i32,
            temperature_dc: 0,
            wind_dmps: 82,
            precipitation_dmmph: 14,
            previous_condition: WeatherCondition::Cloudy as i32,
            temperature_celsius: -3.5,
        })),
    };
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/legacy/weather_changed_v1_0.bin"
    );
    std::fs::write(path, envelope.encode_to_vec())
}
