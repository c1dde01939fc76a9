//! From drafts (events as decoded from a request) to envelopes ready to append:
//! ids assigned, defaults filled, the world checked and the contract validated,
//! for the whole batch before anything is written.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::Envelope;
use worldline_schemas::{DecodeError, WorldId};

use super::ids::{IdempotencyKey, assigned_event_id};
use super::problem::{ProblemKind, Violation, pointer_to};

/// The `source` of events whose request named none.
pub const DEFAULT_SOURCE: &str = "gateway";

/// Longest accepted `source`, in bytes.
pub const MAX_SOURCE_LEN: usize = 64;

/// How far ahead of this server's clock `occurred_at` may be. Game servers'
/// clocks drift a little; more than this is a bug on their side, and Kafka
/// itself refuses records stamped more than an hour ahead, which would
/// otherwise surface as a misleading 503.
pub const MAX_FUTURE_SKEW: TimeDelta = TimeDelta::minutes(5);

/// The wire format of a request; decides how pointers name fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// The JSON event shape: envelope fields at the top, the body under `data`.
    Json,
    /// `worldline.v1.Envelope` / `EnvelopeBatch`: pointers use protobuf field names.
    Protobuf,
}

/// One event as decoded from the request, before ids and defaults are settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// The envelope; `event_id`, `world_id` and `source` may still be empty.
    pub envelope: Envelope,
    /// The event's position in the request.
    pub index: usize,
    /// JSON Pointer to the event in the request: `""` for a lone event,
    /// `/events/<index>` in a batch.
    pub pointer: String,
}

/// A field of an event, named as the contract's validation messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    /// An envelope field, by its protobuf name.
    Envelope(String),
    /// A body field: the `oneof` case and the field, by protobuf names.
    Body { case: String, field: String },
    /// The body itself (absent, or of a type this server does not know).
    NoBody,
}

/// Settles every draft; either all of them are fine, or every problem found.
pub fn settle(
    drafts: Vec<Draft>,
    format: BodyFormat,
    world: &WorldId,
    key: Option<&IdempotencyKey>,
    now: DateTime<Utc>,
) -> Result<Vec<Envelope>, Vec<Violation>> {
    let mut settled = Vec::with_capacity(drafts.len());
    let mut violations = Vec::new();
    let mut seen_ids: HashSet<Vec<u8>> = HashSet::with_capacity(drafts.len());
    for draft in drafts {
        let (index, pointer) = (draft.index, draft.pointer.clone());
        match settle_one(draft, format, world, key, now) {
            Ok(envelope) => {
                if seen_ids.insert(envelope.event_id.clone()) {
                    settled.push(envelope);
                } else {
                    violations.push(
                        Violation::request(
                            ProblemKind::DuplicateEventId,
                            format!(
                                "event_id {} appears more than once in this request",
                                envelope.event_uuid()
                            ),
                        )
                        .at(field_pointer(
                            format,
                            &pointer,
                            &Field::Envelope("event_id".into()),
                        ))
                        .of_event(index),
                    );
                }
            }
            Err(violation) => violations.push(violation.of_event(index)),
        }
    }
    if violations.is_empty() {
        Ok(settled)
    } else {
        Err(violations)
    }
}

fn settle_one(
    draft: Draft,
    format: BodyFormat,
    world: &WorldId,
    key: Option<&IdempotencyKey>,
    now: DateTime<Utc>,
) -> Result<Envelope, Violation> {
    let Draft {
        mut envelope,
        index,
        pointer,
    } = draft;
    let at = |field: &str| field_pointer(format, &pointer, &Field::Envelope(field.to_owned()));
    if envelope.world_id.is_empty() {
        envelope.world_id = world.as_str().to_owned();
    } else if envelope.world_id != world.as_str() {
        return Err(Violation::request(
            ProblemKind::WorldMismatch,
            format!(
                "the event is for world {:?} but was sent to world {:?}",
                envelope.world_id,
                world.as_str()
            ),
        )
        .at(at("world_id")));
    }
    if envelope.event_id.is_empty() {
        envelope.event_id = assigned_event_id(world, key, index).as_bytes().to_vec();
    } else if envelope.event_id == Uuid::nil().as_bytes() {
        return Err(Violation::request(
            ProblemKind::InvalidValue,
            "event_id must not be the nil UUID",
        )
        .at(at("event_id")));
    }
    if envelope.source.is_empty() {
        DEFAULT_SOURCE.clone_into(&mut envelope.source);
    }
    check_source(&envelope.source)
        .map_err(|detail| Violation::request(ProblemKind::InvalidValue, detail).at(at("source")))?;
    if format == BodyFormat::Protobuf && envelope.occurred_at_ms == 0 {
        // proto3 cannot tell "unset" from 0; nobody's event happened in 1970.
        envelope.occurred_at_ms = now.timestamp_millis();
    }
    check_occurred_at(envelope.occurred_at_ms, now).map_err(|detail| {
        let name = match format {
            BodyFormat::Json => "occurred_at",
            BodyFormat::Protobuf => "occurred_at_ms",
        };
        Violation::request(ProblemKind::InvalidValue, detail).at(at(name))
    })?;
    // A client built against an older schema may still fill superseded fields;
    // the log gets today's shape, exactly as readers would see it.
    worldline_schemas::upcast::upcast(&mut envelope);
    envelope
        .validate()
        .map_err(|error| contract_violation(format, &pointer, &error))?;
    Ok(envelope)
}

/// A `source` is a short path of world-id-like segments, e.g. `simulator/story`:
/// it becomes the CloudEvents `ce_source` (`/worldline/<source>`).
fn check_source(source: &str) -> Result<(), String> {
    if source.len() > MAX_SOURCE_LEN {
        return Err(format!("source is longer than {MAX_SOURCE_LEN} characters"));
    }
    if let Some(bad) = source
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!(
            "source contains {bad:?}; only letters, digits, '.', '_', '-' and '/' are allowed"
        ));
    }
    Ok(())
}

fn check_occurred_at(occurred_at_ms: i64, now: DateTime<Utc>) -> Result<(), String> {
    if occurred_at_ms < 0 {
        return Err("occurred_at is before 1970-01-01T00:00:00Z".to_owned());
    }
    let latest = (now + MAX_FUTURE_SKEW).timestamp_millis();
    if occurred_at_ms > latest {
        return Err(format!(
            "occurred_at is more than {} minutes after this server's clock",
            MAX_FUTURE_SKEW.num_minutes()
        ));
    }
    Ok(())
}

/// A contract rule (`EnvelopeExt::validate`) broken, pointing at the field its
/// message names.
fn contract_violation(format: BodyFormat, pointer: &str, error: &DecodeError) -> Violation {
    let DecodeError::Invalid(message) = error else {
        return Violation::request(ProblemKind::InvalidValue, error.to_string())
            .at(pointer.to_owned());
    };
    let field = field_of_message(message);
    let kind = match field {
        Some(Field::NoBody) => ProblemKind::UnknownEventType,
        _ => ProblemKind::InvalidValue,
    };
    let detail = match (&field, format) {
        (Some(Field::NoBody), BodyFormat::Protobuf) => {
            "the envelope has no body of a known event type (none set, or one newer than this server)"
                .to_owned()
        }
        (Some(Field::Body { field, .. }), BodyFormat::Json) => {
            // "weather_changed.region is required" → "data.region is required"
            match message.split_once(['.']) {
                Some((_, rest)) if rest.starts_with(field.as_str()) => format!("data.{rest}"),
                _ => message.clone(),
            }
        }
        _ => message.clone(),
    };
    let pointer = match &field {
        Some(field) => field_pointer(format, pointer, field),
        None => pointer.to_owned(),
    };
    Violation::request(kind, detail).at(pointer)
}

/// The field a validation message is about: messages start with the field's
/// name (`event_id must be…`, `world_id: …`, `weather_changed.region is
/// required`) or say there is no body.
fn field_of_message(message: &str) -> Option<Field> {
    if message.starts_with("no body") {
        return Some(Field::NoBody);
    }
    let name = message.split([' ', ':']).next()?;
    match name.split_once('.') {
        Some((case, field)) if !case.is_empty() && !field.is_empty() => Some(Field::Body {
            case: case.to_owned(),
            field: field.to_owned(),
        }),
        _ => ENVELOPE_FIELDS
            .contains(&name)
            .then(|| Field::Envelope(name.to_owned())),
    }
}

const ENVELOPE_FIELDS: [&str; 7] = [
    "event_id",
    "world_id",
    "occurred_at_ms",
    "world_tick",
    "source",
    "correlation_id",
    "causation_id",
];

/// The JSON Pointer of `field` of the event at `event`, in the request's format.
fn field_pointer(format: BodyFormat, event: &str, field: &Field) -> String {
    match (format, field) {
        (BodyFormat::Json, Field::Envelope(name)) if name == "occurred_at_ms" => {
            pointer_to(event, "occurred_at")
        }
        (_, Field::Envelope(name)) => pointer_to(event, name),
        (BodyFormat::Json, Field::Body { field, .. }) => {
            pointer_to(&pointer_to(event, "data"), field)
        }
        (BodyFormat::Protobuf, Field::Body { case, field }) => {
            pointer_to(&pointer_to(event, case), field)
        }
        (BodyFormat::Json, Field::NoBody) => pointer_to(event, "type"),
        (BodyFormat::Protobuf, Field::NoBody) => event.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::envelope::Body;
    use worldline_schemas::pb::{WeatherChanged, WeatherCondition};

    use super::*;

    fn world() -> WorldId {
        WorldId::parse("emberfall").unwrap()
    }

    fn weather(region: &str) -> Envelope {
        let mut envelope = new_envelope(
            &world(),
            7,
            "",
            Body::WeatherChanged(WeatherChanged {
                region: region.to_owned(),
                condition: WeatherCondition::Rain as i32,
                ..Default::default()
            }),
        );
        envelope.event_id.clear();
        envelope.world_id.clear();
        envelope
    }

    fn draft(envelope: Envelope, index: usize) -> Draft {
        Draft {
            envelope,
            index,
            pointer: format!("/events/{index}"),
        }
    }

    fn settle_protobuf(drafts: Vec<Draft>) -> Result<Vec<Envelope>, Vec<Violation>> {
        settle(drafts, BodyFormat::Protobuf, &world(), None, Utc::now())
    }

    #[test]
    fn given_blank_envelope_fields_then_ids_world_source_and_time_are_filled() {
        let mut blank = weather("north");
        blank.occurred_at_ms = 0;
        let now = Utc::now();
        let settled = settle(
            vec![draft(blank, 0)],
            BodyFormat::Protobuf,
            &world(),
            None,
            now,
        )
        .unwrap()
        .remove(0);
        assert_eq!(settled.world_id, "emberfall");
        assert_eq!(settled.source, DEFAULT_SOURCE);
        assert_eq!(settled.occurred_at_ms, now.timestamp_millis());
        assert_eq!(settled.event_uuid().get_version_num(), 7);
    }

    #[test]
    fn given_a_client_event_id_then_it_is_kept_even_with_an_idempotency_key() {
        let mut envelope = weather("north");
        let id = Uuid::now_v7();
        envelope.event_id = id.as_bytes().to_vec();
        let key = super::super::ids::IdempotencyKey::parse(Some(
            &axum::http::HeaderValue::from_static("k"),
        ))
        .unwrap();
        let settled = settle(
            vec![draft(envelope, 0), draft(weather("south"), 1)],
            BodyFormat::Protobuf,
            &world(),
            key.as_ref(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(settled[0].event_uuid(), id);
        assert_eq!(settled[1].event_uuid().get_version_num(), 5);
    }

    #[test]
    #[allow(deprecated)]
    fn given_a_schema_1_0_weather_envelope_then_it_is_appended_in_todays_shape() {
        let mut old = weather("north");
        if let Some(Body::WeatherChanged(change)) = &mut old.body {
            change.temperature_celsius = -3.46;
        }
        let settled = settle_protobuf(vec![draft(old, 0)]).unwrap().remove(0);
        let Some(Body::WeatherChanged(change)) = settled.body else {
            panic!("not weather");
        };
        assert_eq!(change.temperature_dc, -35);
        assert_eq!(change.temperature_celsius, 0.0);
    }

    #[test]
    fn given_another_world_then_the_event_is_a_world_mismatch() {
        let mut envelope = weather("north");
        envelope.world_id = "frostholm".to_owned();
        let violations = settle_protobuf(vec![draft(envelope, 2)]).unwrap_err();
        assert_eq!(violations[0].kind, ProblemKind::WorldMismatch);
        assert_eq!(violations[0].pointer.as_deref(), Some("/events/2/world_id"));
        assert_eq!(violations[0].index, Some(2));
    }

    #[test]
    fn given_a_contract_violation_then_the_pointer_names_the_field_in_the_format() {
        let empty_region = || vec![draft(weather(""), 1)];
        let protobuf = settle_protobuf(empty_region()).unwrap_err();
        assert_eq!(
            protobuf[0].pointer.as_deref(),
            Some("/events/1/weather_changed/region")
        );
        let json =
            settle(empty_region(), BodyFormat::Json, &world(), None, Utc::now()).unwrap_err();
        assert_eq!(json[0].pointer.as_deref(), Some("/events/1/data/region"));
        assert_eq!(json[0].detail, "data.region is required");
        assert_eq!(json[0].kind, ProblemKind::InvalidValue);
    }

    #[test]
    fn given_no_body_then_the_event_type_is_unknown() {
        let mut envelope = weather("north");
        envelope.body = None;
        let violations = settle_protobuf(vec![draft(envelope, 0)]).unwrap_err();
        assert_eq!(violations[0].kind, ProblemKind::UnknownEventType);
        assert_eq!(violations[0].pointer.as_deref(), Some("/events/0"));
    }

    #[test]
    fn given_the_same_id_twice_then_the_second_is_a_duplicate() {
        let id = Uuid::now_v7().as_bytes().to_vec();
        let mut a = weather("north");
        a.event_id = id.clone();
        let mut b = weather("south");
        b.event_id = id;
        let violations = settle_protobuf(vec![draft(a, 0), draft(b, 1)]).unwrap_err();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].kind, ProblemKind::DuplicateEventId);
        assert_eq!(violations[0].index, Some(1));
    }

    #[test]
    fn given_times_far_ahead_or_before_1970_then_occurred_at_is_invalid() {
        let now = Utc::now();
        for offset in [
            (MAX_FUTURE_SKEW + TimeDelta::seconds(1)).num_milliseconds(),
            -now.timestamp_millis() - 1,
        ] {
            let mut envelope = weather("north");
            envelope.occurred_at_ms = now.timestamp_millis() + offset;
            let violations = settle(
                vec![draft(envelope, 0)],
                BodyFormat::Json,
                &world(),
                None,
                now,
            )
            .unwrap_err();
            assert_eq!(
                violations[0].pointer.as_deref(),
                Some("/events/0/occurred_at")
            );
        }
    }

    #[test]
    fn given_odd_sources_then_they_are_refused() {
        assert!(check_source("simulator/story").is_ok());
        assert!(check_source("has space").is_err());
        assert!(check_source(&"s".repeat(MAX_SOURCE_LEN + 1)).is_err());
    }

    #[test]
    fn given_contract_messages_then_their_field_is_found() {
        assert_eq!(
            field_of_message("event_id must be a 16-byte UUID, got 4 bytes"),
            Some(Field::Envelope("event_id".into()))
        );
        assert_eq!(
            field_of_message("world_id: world id is empty"),
            Some(Field::Envelope("world_id".into()))
        );
        assert_eq!(
            field_of_message("inference_recorded.purpose: 0 is not an allowed value"),
            Some(Field::Body {
                case: "inference_recorded".into(),
                field: "purpose".into()
            })
        );
        assert_eq!(field_of_message("something else"), None);
    }
}
