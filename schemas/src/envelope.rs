//! Building, encoding and decoding [`Envelope`]s.
//!
//! Decoding always validates: a record that decodes as protobuf but breaks the
//! contract (no body, a short event id, a bad world id, an UNSPECIFIED enum) is as
//! much a dead letter as random bytes, and callers must not have to remember to
//! check.

use chrono::{DateTime, TimeZone, Utc};
use prost::Message;
use uuid::Uuid;

use crate::family::Family;
use crate::pb::envelope::Body;
use crate::pb::{Envelope, InferenceOutcome, InferencePurpose, Season, WeatherCondition};
use crate::world_id::{WorldId, WorldIdError};

/// Why a record's value is not a valid event. Every variant is permanent: the same
/// bytes will never decode, so the record goes to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("not a worldline.v1.Envelope: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("invalid event: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A short, stable name of the error class, for metrics and dead-letter rows.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// A fresh, time-ordered event id.
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// Builds an envelope with a fresh event id and the current time.
pub fn new_envelope(world: &WorldId, world_tick: u64, source: &str, body: Body) -> Envelope {
    Envelope {
        event_id: new_event_id().as_bytes().to_vec(),
        world_id: world.as_str().to_owned(),
        occurred_at_ms: Utc::now().timestamp_millis(),
        world_tick,
        source: source.to_owned(),
        correlation_id: Vec::new(),
        causation_id: Vec::new(),
        body: Some(body),
    }
}

/// Decodes one record value, upcasts older shapes to today's, and validates it.
pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut envelope = Envelope::decode(bytes)?;
    crate::upcast::upcast(&mut envelope);
    envelope.validate()?;
    Ok(envelope)
}

/// Convenience accessors on the generated [`Envelope`].
pub trait EnvelopeExt {
    /// Checks the envelope against the contract; see [`DecodeError::Invalid`].
    fn validate(&self) -> Result<(), DecodeError>;
    /// The event id. Only meaningful on a validated envelope (nil otherwise).
    fn event_uuid(&self) -> Uuid;
    /// The family of the body, if there is one.
    fn family(&self) -> Option<Family>;
    /// `occurred_at_ms` as a timestamp (the epoch if out of range).
    fn occurred_at(&self) -> DateTime<Utc>;
    /// The encoded bytes.
    fn to_bytes(&self) -> Vec<u8>;
}

impl EnvelopeExt for Envelope {
    fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |msg: String| Err(DecodeError::Invalid(msg));
        if self.event_id.len() != 16 {
            return invalid(format!(
                "event_id must be a 16-byte UUID, got {} bytes",
                self.event_id.len()
            ));
        }
        if let Err(e) = WorldId::parse(&self.world_id) {
            return invalid(format!("world_id: {e}"));
        }
        for (name, id) in [
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
        ] {
            if !id.is_empty() && id.len() != 16 {
                return invalid(format!(
                    "{name} must be empty or a 16-byte UUID, got {} bytes",
                    id.len()
                ));
            }
        }
        let Some(body) = &self.body else {
            return invalid("no body: exactly one event type must be set".to_owned());
        };
        validate_body(body).map_err(DecodeError::Invalid)
    }

    fn event_uuid(&self) -> Uuid {
        Uuid::from_slice(&self.event_id).unwrap_or(Uuid::nil())
    }

    fn family(&self) -> Option<Family> {
        self.body.as_ref().map(Family::of)
    }

    fn occurred_at(&self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.occurred_at_ms)
            .single()
            .unwrap_or(DateTime::UNIX_EPOCH)
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

/// Field rules that protobuf itself cannot express.
fn validate_body(body: &Body) -> Result<(), String> {
    fn known_enum<E: TryFrom<i32>>(
        field: &str,
        raw: i32,
        allow_unspecified: bool,
    ) -> Result<(), String> {
        if E::try_from(raw).is_err() || (!allow_unspecified && raw == 0) {
            return Err(format!("{field}: {raw} is not an allowed value"));
        }
        Ok(())
    }
    fn non_empty(field: &str, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Err(format!("{field} is required"));
        }
        Ok(())
    }
    match body {
        Body::WorldCreated(created) => {
            if created.time_scale == 0 {
                return Err("world_created.time_scale must be at least 1".to_owned());
            }
            if created.tick_interval_ms == 0 {
                return Err("world_created.tick_interval_ms must be at least 1".to_owned());
            }
            Ok(())
        }
        Body::WorldPaused(_) | Body::WorldResumed(_) => Ok(()),
        Body::ClockTicked(tick) => known_enum::<Season>("clock_ticked.season", tick.season, false),
        Body::WeatherChanged(w) => {
            non_empty("weather_changed.region", &w.region)?;
            known_enum::<WeatherCondition>("weather_changed.condition", w.condition, false)?;
            known_enum::<WeatherCondition>(
                "weather_changed.previous_condition",
                w.previous_condition,
                true,
            )
        }
        Body::StoryChoiceMade(c) => {
            non_empty("story_choice_made.player_id", &c.player_id)?;
            non_empty("story_choice_made.story_id", &c.story_id)?;
            non_empty("story_choice_made.node_id", &c.node_id)?;
            non_empty("story_choice_made.choice_id", &c.choice_id)
        }
        Body::InferenceRecorded(i) => {
            non_empty("inference_recorded.model_id", &i.model_id)?;
            known_enum::<InferencePurpose>("inference_recorded.purpose", i.purpose, false)?;
            known_enum::<InferenceOutcome>("inference_recorded.outcome", i.outcome, false)
        }
    }
}

/// Maps a `WorldIdError` into the decode error used by ingest and projectors.
impl From<WorldIdError> for DecodeError {
    fn from(e: WorldIdError) -> Self {
        DecodeError::Invalid(format!("world_id: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{ClockTicked, WeatherChanged};

    fn world() -> WorldId {
        WorldId::parse("emberfall").unwrap()
    }

    fn tick(n: u64) -> Envelope {
        new_envelope(
            &world(),
            n,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: n * 60,
                day: (n * 60 / 86_400) as u32,
                season: Season::Autumn as i32,
                time_scale: 60,
            }),
        )
    }

    #[test]
    fn envelope_round_trips_through_bytes() {
        let original = tick(42);
        let decoded = decode_envelope(&original.to_bytes()).unwrap();
        assert_eq!(decoded, original);
        assert_eq!(decoded.family(), Some(Family::Clock));
        assert_eq!(decoded.event_uuid().get_version_num(), 7);
        assert_eq!(
            decoded.occurred_at().timestamp_millis(),
            original.occurred_at_ms
        );
    }

    #[test]
    fn a_clock_tick_a_year_into_a_world_fits_in_64_bytes() {
        // One tick a second for a year, with a 9-character world id.
        let encoded = tick(31_536_000).to_bytes();
        assert!(encoded.len() <= 64, "clock tick is {} bytes", encoded.len());
    }

    #[test]
    fn empty_and_garbage_payloads_are_refused() {
        assert!(matches!(decode_envelope(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_envelope(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        let bytes = tick(1).to_bytes();
        assert!(decode_envelope(&bytes[..bytes.len() - 3]).is_err());
    }

    #[test]
    fn contract_violations_are_invalid_not_malformed() {
        let mut no_body = tick(1);
        no_body.body = None;
        let mut short_id = tick(1);
        short_id.event_id.truncate(4);
        let mut bad_world = tick(1);
        bad_world.world_id = "no spaces".to_owned();
        let mut bad_season = tick(1);
        if let Some(Body::ClockTicked(t)) = &mut bad_season.body {
            t.season = 99;
        }
        let unspecified_weather = new_envelope(
            &world(),
            1,
            "weather",
            Body::WeatherChanged(WeatherChanged {
                region: "north".to_owned(),
                ..Default::default()
            }),
        );
        for bad in [
            no_body,
            short_id,
            bad_world,
            bad_season,
            unspecified_weather,
        ] {
            let err = decode_envelope(&bad.to_bytes()).unwrap_err();
            assert_eq!(err.class(), "invalid", "{err}");
        }
    }
}
