//! Events as JSON, for people reading the log.
//!
//! The rendering is the canonical proto3 JSON mapping (lowerCamelCase names,
//! 64-bit integers as strings, enums by name, fields at their default value
//! omitted), produced by reflection over [`FILE_DESCRIPTOR_SET`] so it follows the
//! `.proto` files without hand-written code per event type. Three departures make
//! it readable:
//!
//! - the UUID fields (`eventId`, `correlationId`, `causationId`) are UUID strings
//!   instead of base64 of their 16 bytes, so they can be grepped for and compared
//!   with the `ce_id` header and the read models;
//! - `occurredAt` repeats `occurredAtMs` as an RFC 3339 timestamp;
//! - `family` and `type` name the event's family and its protobuf message.
//!
//! This is a view for debugging, not a second wire format: nothing parses it back.

use std::sync::OnceLock;

use chrono::SecondsFormat;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::FILE_DESCRIPTOR_SET;
use crate::envelope::EnvelopeExt;
use crate::family::event_type;
use crate::pb::Envelope;

/// Fully qualified name of the envelope message.
const ENVELOPE_MESSAGE: &str = "worldline.v1.Envelope";

/// The JSON names of the fields that hold a UUID as 16 raw bytes.
const UUID_FIELDS: [&str; 3] = ["eventId", "correlationId", "causationId"];

/// Why an envelope could not be rendered. None of these happen with a build whose
/// descriptor set matches its generated types; they exist so a broken build says
/// so instead of printing half an event.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("the embedded descriptor set is unusable: {0}")]
    Descriptors(String),
    #[error("the envelope does not match its own descriptor: {0}")]
    Reflection(#[from] prost::DecodeError),
    #[error("JSON serialization failed: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Renders an envelope as JSON; see the module documentation for the format.
pub fn envelope_to_json(envelope: &Envelope) -> Result<Value, JsonError> {
    let dynamic = DynamicMessage::decode(envelope_descriptor()?, envelope.to_bytes().as_slice())?;
    let canonical =
        dynamic.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())?;
    let Value::Object(mut fields) = canonical else {
        // A message always serializes to an object; anything else means the
        // descriptor and the generated types disagree.
        return Err(JsonError::Descriptors(
            "the envelope did not render as a JSON object".to_owned(),
        ));
    };
    render_uuid_fields(&mut fields, envelope);
    add_readable_fields(&mut fields, envelope);
    Ok(Value::Object(fields))
}

/// The envelope's message descriptor, decoded once per process.
fn envelope_descriptor() -> Result<MessageDescriptor, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    let pool = POOL
        .get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| JsonError::Descriptors(e.clone()))?;
    pool.get_message_by_name(ENVELOPE_MESSAGE).ok_or_else(|| {
        JsonError::Descriptors(format!("{ENVELOPE_MESSAGE} is not in the descriptor set"))
    })
}

/// Replaces the base64 rendering of each UUID field by the UUID string. A field
/// that is not 16 bytes (only possible on an invalid envelope) keeps its base64
/// so the odd value is still visible.
fn render_uuid_fields(fields: &mut Map<String, Value>, envelope: &Envelope) {
    let raw = [
        &envelope.event_id,
        &envelope.correlation_id,
        &envelope.causation_id,
    ];
    for (name, bytes) in UUID_FIELDS.into_iter().zip(raw) {
        if let Ok(uuid) = Uuid::from_slice(bytes) {
            fields.insert(name.to_owned(), Value::String(uuid.to_string()));
        }
    }
}

/// Adds `occurredAt`, `family` and `type`.
fn add_readable_fields(fields: &mut Map<String, Value>, envelope: &Envelope) {
    let occurred_at = envelope
        .occurred_at()
        .to_rfc3339_opts(SecondsFormat::Millis, true);
    fields.insert("occurredAt".to_owned(), Value::String(occurred_at));
    if let Some(body) = &envelope.body {
        fields.insert(
            "family".to_owned(),
            Value::String(crate::Family::of(body).as_str().to_owned()),
        );
        fields.insert(
            "type".to_owned(),
            Value::String(event_type(body).to_owned()),
        );
    }
}

/// Decodes a record value only as far as protobuf goes (no validation) and
/// renders it, for tools that want to show an envelope that broke the contract.
pub fn unvalidated_bytes_to_json(bytes: &[u8]) -> Result<Value, JsonError> {
    let envelope = Envelope::decode(bytes)?;
    envelope_to_json(&envelope)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::pb::envelope::Body;
    use crate::pb::{ClockTicked, Season, StoryChoiceMade, WorldResumed};

    const EVENT_ID: &str = "01934f2a-9c10-7a3b-8c4d-5e6f7a8b9c0d";
    const CORRELATION_ID: &str = "01934f2a-9b00-7000-8000-000000000001";

    fn envelope(body: Body) -> Envelope {
        Envelope {
            event_id: Uuid::parse_str(EVENT_ID).unwrap().as_bytes().to_vec(),
            world_id: "emberfall".to_owned(),
            // 2024-11-22T10:15:30.123Z
            occurred_at_ms: 1_732_270_530_123,
            world_tick: 86_400,
            source: "clock".to_owned(),
            correlation_id: Vec::new(),
            causation_id: Vec::new(),
            body: Some(body),
        }
    }

    #[test]
    fn given_a_clock_tick_when_rendered_then_canonical_json_with_readable_ids_and_time() {
        let tick = envelope(Body::ClockTicked(ClockTicked {
            game_time_s: 5_184_000,
            day: 60,
            season: Season::Summer as i32,
            time_scale: 60,
        }));

        let rendered = envelope_to_json(&tick).unwrap();

        assert_eq!(
            rendered,
            json!({
                "eventId": EVENT_ID,
                "worldId": "emberfall",
                "occurredAtMs": "1732270530123",
                "occurredAt": "2024-11-22T10:15:30.123Z",
                "worldTick": "86400",
                "source": "clock",
                "family": "clock",
                "type": "worldline.v1.ClockTicked",
                "clockTicked": {
                    "gameTimeS": "5184000",
                    "day": 60,
                    "season": "SEASON_SUMMER",
                    "timeScale": 60
                }
            })
        );
    }

    #[test]
    fn given_correlation_and_causation_ids_when_rendered_then_both_are_uuid_strings() {
        let mut choice = envelope(Body::StoryChoiceMade(StoryChoiceMade {
            player_id: "player-0007".to_owned(),
            story_id: "the-drowned-bell".to_owned(),
            node_id: "harbour-gate".to_owned(),
            choice_id: "bribe-the-guard".to_owned(),
            next_node_id: "smugglers-den".to_owned(),
            context: HashMap::from([("party_size".to_owned(), "3".to_owned())]),
        }));
        choice.correlation_id = Uuid::parse_str(CORRELATION_ID).unwrap().as_bytes().to_vec();
        choice.causation_id = choice.correlation_id.clone();

        let rendered = envelope_to_json(&choice).unwrap();

        assert_eq!(rendered["correlationId"], CORRELATION_ID);
        assert_eq!(rendered["causationId"], CORRELATION_ID);
        assert_eq!(rendered["family"], "story");
        assert_eq!(rendered["storyChoiceMade"]["context"]["party_size"], "3");
        assert_eq!(rendered["storyChoiceMade"]["nextNodeId"], "smugglers-den");
    }

    #[test]
    fn given_an_empty_body_when_rendered_then_the_body_field_is_an_empty_object() {
        let resumed = envelope(Body::WorldResumed(WorldResumed {}));

        let rendered = envelope_to_json(&resumed).unwrap();

        assert_eq!(rendered["worldResumed"], json!({}));
        assert_eq!(rendered["type"], "worldline.v1.WorldResumed");
        assert_eq!(rendered["family"], "world");
    }

    #[test]
    fn given_an_envelope_with_a_short_event_id_when_rendered_then_the_raw_bytes_stay_visible() {
        let mut odd = envelope(Body::WorldResumed(WorldResumed {}));
        odd.event_id = vec![1, 2, 3];
        odd.body = None;

        let rendered = unvalidated_bytes_to_json(&odd.to_bytes()).unwrap();

        assert_eq!(rendered["eventId"], "AQID");
        assert!(rendered.get("family").is_none());
    }

    #[test]
    fn given_bytes_that_are_not_protobuf_when_rendered_then_an_error() {
        assert!(matches!(
            unvalidated_bytes_to_json(&[0xff, 0xff, 0xff]),
            Err(JsonError::Reflection(_))
        ));
    }
}
