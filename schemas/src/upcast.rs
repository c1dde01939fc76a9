//! Upcasters: old shapes of events turned into today's on decode.
//!
//! The log keeps every event as it was written, forever, so events written by
//! older producers are replayed by today's code. Every change to the contract is
//! additive (see `buf breaking` in CI); when a field is superseded, the old one
//! stays in the `.proto` as deprecated and an upcaster here moves its value into
//! the new field. Projectors, the API and tools only ever see the current shape.
//!
//! | schema | change | upcaster |
//! |---|---|---|
//! | 1.0 → 1.1 | `WeatherChanged.temperature_celsius` (float °C) → `temperature_dc` (sint32 tenths) | [`weather_temperature_to_tenths`] |

use crate::pb::Envelope;
use crate::pb::envelope::Body;

/// Applies every upcaster to a freshly decoded envelope.
pub fn upcast(envelope: &mut Envelope) {
    if let Some(Body::WeatherChanged(change)) = &mut envelope.body {
        weather_temperature_to_tenths(change);
    }
}

/// Schema 1.0 weather producers wrote the temperature as a float in °C.
#[allow(deprecated)]
pub fn weather_temperature_to_tenths(change: &mut crate::pb::WeatherChanged) {
    if change.temperature_celsius != 0.0 {
        if change.temperature_dc == 0 {
            let tenths = (f64::from(change.temperature_celsius) * 10.0).round();
            change.temperature_dc = tenths.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32;
        }
        change.temperature_celsius = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{WeatherChanged, WeatherCondition};

    #[test]
    #[allow(deprecated)]
    fn given_a_schema_1_0_weather_event_then_its_celsius_become_tenths() {
        let mut old = WeatherChanged {
            region: "north".to_owned(),
            condition: WeatherCondition::Snow as i32,
            temperature_celsius: -3.46,
            ..Default::default()
        };
        weather_temperature_to_tenths(&mut old);
        assert_eq!(old.temperature_dc, -35);
        assert_eq!(old.temperature_celsius, 0.0);
    }

    #[test]
    #[allow(deprecated)]
    fn given_a_current_event_then_nothing_changes() {
        let mut current = WeatherChanged {
            temperature_dc: 215,
            ..Default::default()
        };
        weather_temperature_to_tenths(&mut current);
        assert_eq!(current.temperature_dc, 215);
    }
}
