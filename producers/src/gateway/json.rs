//! The JSON event shape of the ingest gateway and its mapping to envelopes.
//!
//! A request body (`Content-Type: application/json`) is one event object or a
//! batch `{"events": [<event>, ...]}`. An event:
//!
//! ```json
//! {
//!   "type": "WeatherChanged",
//!   "event_id": "0190f5d2-7c1e-7a8b-9c3d-4e5f60718293",
//!   "world_id": "emberfall",
//!   "world_tick": 42,
//!   "occurred_at": "2026-11-02T18:04:05.123Z",
//!   "source": "game-server/eu-1",
//!   "correlation_id": "0190f5d2-0000-7000-8000-000000000001",
//!   "causation_id": "0190f5d2-0000-7000-8000-000000000002",
//!   "data": { "region": "north", "condition": "rain", "temperature_dc": -35,
//!             "wind_dmps": 40, "precipitation_dmmph": 12 }
//! }
//! ```
//!
//! | member | | meaning |
//! |---|---|---|
//! | `type` | required | `WorldCreated`, `WorldPaused`, `WorldResumed`, `ClockTicked`, `WeatherChanged`, `StoryChoiceMade`, `InferenceRecorded` (or the full name, `worldline.v1.WeatherChanged`) |
//! | `world_tick` | required | the world's tick at which it happened (0 before the first tick) |
//! | `event_id` | optional | a UUID; kept as sent, so a retry carrying it is deduplicated. Absent: derived from `Idempotency-Key`, else a fresh UUIDv7 |
//! | `world_id` | optional | must equal the URL's world when present |
//! | `occurred_at` | optional | RFC 3339 time; default: when the gateway received it; at most 5 minutes ahead |
//! | `source` | optional | who produced it, `[A-Za-z0-9._/-]`, up to 64 characters; default `gateway` |
//! | `correlation_id`, `causation_id` | optional | UUIDs |
//! | `data` | optional for types without required fields | the body, fields as in the `.proto` files |
//!
//! `data` per type (snake_case protobuf field names; enums as lower-case names
//! without their prefix; `?` marks optional fields, every other one is required):
//! - `WorldCreated`: `display_name`, `seed`, `time_scale` (≥ 1), `tick_interval_ms` (≥ 1), `regions?` (list of strings)
//! - `WorldPaused`: `reason?`
//! - `WorldResumed`: nothing
//! - `ClockTicked`: `game_time_s`, `day`, `season` (`spring`|`summer`|`autumn`|`winter`), `time_scale`
//! - `WeatherChanged`: `region` (non-empty), `condition` (`clear`|`cloudy`|`fog`|`rain`|`storm`|`snow`),
//!   `temperature_dc`, `wind_dmps`, `precipitation_dmmph`, `previous_condition?`
//! - `StoryChoiceMade`: `player_id`, `story_id`, `node_id`, `choice_id` (all non-empty), `next_node_id?`,
//!   `context?` (object of string values)
//! - `InferenceRecorded`: `model_id` (non-empty), `model_version`,
//!   `purpose` (`npc_dialogue`|`narration`|`quest_generation`|`moderation`), `prompt_tokens`,
//!   `completion_tokens`, `latency_ms`, `cost_micro_usd`, `outcome` (`ok`|`error`|`timeout`|`filtered`),
//!   `npc_id?`, `input_hash?`
//!
//! Unknown members are errors everywhere (a typo must not silently drop data).
//! Numbers are checked against their protobuf types (`u32`, `u64`, `i32`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WeatherCondition, WorldCreated, WorldPaused, WorldResumed,
};

use super::problem::{ProblemKind, Rejection, Violation, pointer_to, push_pointer};
use super::settle::Draft;

/// The event types, by the names the JSON shape uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    WorldCreated,
    WorldPaused,
    WorldResumed,
    ClockTicked,
    WeatherChanged,
    StoryChoiceMade,
    InferenceRecorded,
}

impl EventType {
    /// Every type, in the order of the envelope's `oneof`.
    pub const ALL: [EventType; 7] = [
        EventType::WorldCreated,
        EventType::WorldPaused,
        EventType::WorldResumed,
        EventType::ClockTicked,
        EventType::WeatherChanged,
        EventType::StoryChoiceMade,
        EventType::InferenceRecorded,
    ];

    /// The short name, e.g. `WeatherChanged`.
    pub fn name(self) -> &'static str {
        match self {
            EventType::WorldCreated => "WorldCreated",
            EventType::WorldPaused => "WorldPaused",
            EventType::WorldResumed => "WorldResumed",
            EventType::ClockTicked => "ClockTicked",
            EventType::WeatherChanged => "WeatherChanged",
            EventType::StoryChoiceMade => "StoryChoiceMade",
            EventType::InferenceRecorded => "InferenceRecorded",
        }
    }

    /// Accepts the short name or the full protobuf name (`worldline.v1.…`).
    pub fn parse(name: &str) -> Option<EventType> {
        let short = name.strip_prefix("worldline.v1.").unwrap_or(name);
        EventType::ALL.into_iter().find(|t| t.name() == short)
    }
}

/// The envelope members of a JSON event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    #[serde(rename = "type")]
    kind: String,
    world_tick: u64,
    #[serde(default)]
    event_id: Option<Uuid>,
    #[serde(default)]
    world_id: Option<String>,
    #[serde(default)]
    occurred_at: Option<DateTime<Utc>>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    correlation_id: Option<Uuid>,
    #[serde(default)]
    causation_id: Option<Uuid>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorldCreatedData {
    display_name: String,
    seed: u64,
    time_scale: u32,
    tick_interval_ms: u32,
    #[serde(default)]
    regions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorldPausedData {
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorldResumedData {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockTickedData {
    game_time_s: u64,
    day: u32,
    season: SeasonName,
    time_scale: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeatherChangedData {
    region: String,
    condition: ConditionName,
    temperature_dc: i32,
    wind_dmps: u32,
    precipitation_dmmph: u32,
    #[serde(default)]
    previous_condition: Option<ConditionName>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoryChoiceMadeData {
    player_id: String,
    story_id: String,
    node_id: String,
    choice_id: String,
    #[serde(default)]
    next_node_id: String,
    #[serde(default)]
    context: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferenceRecordedData {
    model_id: String,
    model_version: String,
    purpose: PurposeName,
    prompt_tokens: u32,
    completion_tokens: u32,
    latency_ms: u32,
    cost_micro_usd: u64,
    outcome: OutcomeName,
    #[serde(default)]
    npc_id: String,
    #[serde(default)]
    input_hash: String,
}

// The enums' JSON names. UNSPECIFIED has no name on purpose: it is never a
// valid value for a client to send.

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SeasonName {
    Spring,
    Summer,
    Autumn,
    Winter,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ConditionName {
    Clear,
    Cloudy,
    Fog,
    Rain,
    Storm,
    Snow,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PurposeName {
    NpcDialogue,
    Narration,
    QuestGeneration,
    Moderation,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutcomeName {
    Ok,
    Error,
    Timeout,
    Filtered,
}

impl From<SeasonName> for Season {
    fn from(name: SeasonName) -> Season {
        match name {
            SeasonName::Spring => Season::Spring,
            SeasonName::Summer => Season::Summer,
            SeasonName::Autumn => Season::Autumn,
            SeasonName::Winter => Season::Winter,
        }
    }
}

impl From<ConditionName> for WeatherCondition {
    fn from(name: ConditionName) -> WeatherCondition {
        match name {
            ConditionName::Clear => WeatherCondition::Clear,
            ConditionName::Cloudy => WeatherCondition::Cloudy,
            ConditionName::Fog => WeatherCondition::Fog,
            ConditionName::Rain => WeatherCondition::Rain,
            ConditionName::Storm => WeatherCondition::Storm,
            ConditionName::Snow => WeatherCondition::Snow,
        }
    }
}

impl From<PurposeName> for InferencePurpose {
    fn from(name: PurposeName) -> InferencePurpose {
        match name {
            PurposeName::NpcDialogue => InferencePurpose::NpcDialogue,
            PurposeName::Narration => InferencePurpose::Narration,
            PurposeName::QuestGeneration => InferencePurpose::QuestGeneration,
            PurposeName::Moderation => InferencePurpose::Moderation,
        }
    }
}

impl From<OutcomeName> for InferenceOutcome {
    fn from(name: OutcomeName) -> InferenceOutcome {
        match name {
            OutcomeName::Ok => InferenceOutcome::Ok,
            OutcomeName::Error => InferenceOutcome::Error,
            OutcomeName::Timeout => InferenceOutcome::Timeout,
            OutcomeName::Filtered => InferenceOutcome::Filtered,
        }
    }
}

/// Decodes a JSON request body into drafts. A body that is not JSON, has the
/// wrong overall shape, or holds no or too many events rejects the request;
/// problems of single events come back beside the drafts of the good ones, so
/// the whole batch is reported at once.
pub fn parse_json_body(
    body: &[u8],
    max_events: usize,
    now: DateTime<Utc>,
) -> Result<(Vec<Draft>, Vec<Violation>), Rejection> {
    let document: Value = serde_json::from_slice(body).map_err(|error| {
        Violation::request(
            ProblemKind::MalformedBody,
            format!("the body is not valid JSON: {error}"),
        )
    })?;
    let events = split_events(document, max_events)?;
    let mut drafts = Vec::with_capacity(events.len());
    let mut violations = Vec::new();
    for (index, (pointer, value)) in events.into_iter().enumerate() {
        match draft_from_json(value, &pointer, now) {
            Ok(envelope) => drafts.push(Draft {
                envelope,
                index,
                pointer,
            }),
            Err(violation) => violations.push(violation.of_event(index)),
        }
    }
    Ok((drafts, violations))
}

/// The events of a document with their pointers: a lone event object, or the
/// members of `{"events": [...]}`.
fn split_events(document: Value, max_events: usize) -> Result<Vec<(String, Value)>, Rejection> {
    let Value::Object(mut members) = document else {
        return Err(Violation::request(
            ProblemKind::InvalidValue,
            "the body must be a JSON object: one event, or {\"events\": [...]}",
        )
        .at("")
        .into());
    };
    let Some(events) = members.remove("events") else {
        return Ok(vec![(String::new(), Value::Object(members))]);
    };
    if let Some(extra) = members.keys().next() {
        return Err(Violation::request(
            ProblemKind::UnknownField,
            format!("unknown member {extra:?} beside \"events\" in a batch"),
        )
        .at(pointer_to("", extra))
        .into());
    }
    let Value::Array(events) = events else {
        return Err(Violation::request(
            ProblemKind::InvalidValue,
            "\"events\" must be an array of events",
        )
        .at("/events")
        .into());
    };
    check_batch_size(events.len(), max_events)?;
    Ok(events
        .into_iter()
        .enumerate()
        .map(|(index, event)| (format!("/events/{index}"), event))
        .collect())
}

/// A batch holds 1 to `max_events` events. Too many is a 413: like an oversize
/// body, the request is fine but bigger than this server takes at once, and
/// the fix is to split it.
pub fn check_batch_size(count: usize, max_events: usize) -> Result<(), Rejection> {
    if count == 0 {
        return Err(Violation::request(
            ProblemKind::EmptyBatch,
            "the batch has no events; send at least one",
        )
        .at("/events")
        .into());
    }
    if count > max_events {
        return Err(Violation::request(
            ProblemKind::TooManyEvents,
            format!(
                "the batch has {count} events; at most {max_events} are accepted per request, split it"
            ),
        )
        .at("/events")
        .into());
    }
    Ok(())
}

/// Maps one JSON event to an envelope; ids, world and source may stay empty
/// (they are settled for the whole batch later).
pub fn draft_from_json(
    value: Value,
    pointer: &str,
    now: DateTime<Utc>,
) -> Result<Envelope, Violation> {
    let event: JsonEvent = deserialize_at(value, pointer)?;
    let event_type = EventType::parse(&event.kind).ok_or_else(|| {
        Violation::request(
            ProblemKind::UnknownEventType,
            format!(
                "unknown event type {:?}; expected one of {}",
                event.kind,
                EventType::ALL.map(EventType::name).join(", ")
            ),
        )
        .at(pointer_to(pointer, "type"))
    })?;
    let data = event
        .data
        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
    let body = body_from_json(event_type, data, &pointer_to(pointer, "data"))?;
    let uuid_bytes = |id: Option<Uuid>| id.map(|u| u.as_bytes().to_vec()).unwrap_or_default();
    Ok(Envelope {
        event_id: uuid_bytes(event.event_id),
        world_id: event.world_id.unwrap_or_default(),
        occurred_at_ms: event.occurred_at.unwrap_or(now).timestamp_millis(),
        world_tick: event.world_tick,
        source: event.source.unwrap_or_default(),
        correlation_id: uuid_bytes(event.correlation_id),
        causation_id: uuid_bytes(event.causation_id),
        body: Some(body),
    })
}

fn body_from_json(event_type: EventType, data: Value, pointer: &str) -> Result<Body, Violation> {
    Ok(match event_type {
        EventType::WorldCreated => {
            let d: WorldCreatedData = deserialize_at(data, pointer)?;
            Body::WorldCreated(WorldCreated {
                display_name: d.display_name,
                seed: d.seed,
                time_scale: d.time_scale,
                tick_interval_ms: d.tick_interval_ms,
                regions: d.regions,
            })
        }
        EventType::WorldPaused => {
            let d: WorldPausedData = deserialize_at(data, pointer)?;
            Body::WorldPaused(WorldPaused { reason: d.reason })
        }
        EventType::WorldResumed => {
            let WorldResumedData {} = deserialize_at(data, pointer)?;
            Body::WorldResumed(WorldResumed {})
        }
        EventType::ClockTicked => {
            let d: ClockTickedData = deserialize_at(data, pointer)?;
            Body::ClockTicked(ClockTicked {
                game_time_s: d.game_time_s,
                day: d.day,
                season: Season::from(d.season) as i32,
                time_scale: d.time_scale,
            })
        }
        EventType::WeatherChanged => {
            let d: WeatherChangedData = deserialize_at(data, pointer)?;
            Body::WeatherChanged(WeatherChanged {
                region: d.region,
                condition: WeatherCondition::from(d.condition) as i32,
                temperature_dc: d.temperature_dc,
                wind_dmps: d.wind_dmps,
                precipitation_dmmph: d.precipitation_dmmph,
                previous_condition: d
                    .previous_condition
                    .map_or(WeatherCondition::Unspecified, WeatherCondition::from)
                    as i32,
                ..Default::default()
            })
        }
        EventType::StoryChoiceMade => {
            let d: StoryChoiceMadeData = deserialize_at(data, pointer)?;
            Body::StoryChoiceMade(StoryChoiceMade {
                player_id: d.player_id,
                story_id: d.story_id,
                node_id: d.node_id,
                choice_id: d.choice_id,
                next_node_id: d.next_node_id,
                context: d.context.into_iter().collect(),
            })
        }
        EventType::InferenceRecorded => {
            let d: InferenceRecordedData = deserialize_at(data, pointer)?;
            Body::InferenceRecorded(InferenceRecorded {
                model_id: d.model_id,
                model_version: d.model_version,
                purpose: InferencePurpose::from(d.purpose) as i32,
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                latency_ms: d.latency_ms,
                cost_micro_usd: d.cost_micro_usd,
                outcome: InferenceOutcome::from(d.outcome) as i32,
                npc_id: d.npc_id,
                input_hash: d.input_hash,
            })
        }
    })
}

/// Deserialises `value` as `T`, turning serde's complaint into a violation
/// that points at the offending member below `pointer`.
fn deserialize_at<T: DeserializeOwned>(value: Value, pointer: &str) -> Result<T, Violation> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let mut at = pointer.to_owned();
        for segment in error.path() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => {
                    push_pointer(&mut at, &index.to_string());
                }
                serde_path_to_error::Segment::Map { key } => push_pointer(&mut at, key),
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => {}
            }
        }
        serde_violation(&error.into_inner().to_string(), at)
    })
}

/// Classifies a serde message and completes the pointer: serde reports a
/// missing or unknown field at its parent, naming the field only in the text.
fn serde_violation(message: &str, mut pointer: String) -> Violation {
    let field_named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned())
    };
    let (kind, detail) = if let Some(field) = field_named("missing field `") {
        push_pointer(&mut pointer, &field);
        (
            ProblemKind::MissingField,
            format!("{pointer}: required field {field:?} is missing"),
        )
    } else if let Some(field) = field_named("unknown field `") {
        if !pointer.ends_with(&format!("/{field}")) {
            push_pointer(&mut pointer, &field);
        }
        (ProblemKind::UnknownField, format!("{pointer}: {message}"))
    } else if message.starts_with("unknown variant") {
        (
            ProblemKind::InvalidValue,
            format!(
                "{pointer}: {}",
                message.replacen("unknown variant", "unknown value", 1)
            ),
        )
    } else {
        (ProblemKind::InvalidValue, format!("{pointer}: {message}"))
    };
    Violation::request(kind, detail).at(pointer)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use worldline_schemas::envelope::EnvelopeExt;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-02T18:04:05.123Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn map(value: Value) -> Result<Envelope, Violation> {
        draft_from_json(value, "/events/3", now())
    }

    fn weather(data: &Value) -> Value {
        json!({"type": "WeatherChanged", "world_tick": 42, "data": data})
    }

    #[test]
    fn given_a_full_weather_event_then_every_member_reaches_the_envelope() {
        let id = Uuid::now_v7();
        let correlation = Uuid::now_v7();
        let envelope = map(json!({
            "type": "worldline.v1.WeatherChanged",
            "event_id": id,
            "world_id": "emberfall",
            "world_tick": 42,
            "occurred_at": "2026-11-02T19:00:00+01:00",
            "source": "game-server/eu-1",
            "correlation_id": correlation,
            "data": {"region": "north", "condition": "rain", "temperature_dc": -35,
                     "wind_dmps": 40, "precipitation_dmmph": 12, "previous_condition": "fog"}
        }))
        .unwrap();
        assert_eq!(envelope.event_uuid(), id);
        assert_eq!(envelope.world_id, "emberfall");
        assert_eq!(envelope.world_tick, 42);
        assert_eq!(
            envelope.occurred_at().to_rfc3339(),
            "2026-11-02T18:00:00+00:00"
        );
        assert_eq!(envelope.source, "game-server/eu-1");
        assert_eq!(envelope.correlation_id, correlation.as_bytes().to_vec());
        assert!(envelope.causation_id.is_empty());
        assert_eq!(
            envelope.body,
            Some(Body::WeatherChanged(WeatherChanged {
                region: "north".to_owned(),
                condition: WeatherCondition::Rain as i32,
                temperature_dc: -35,
                wind_dmps: 40,
                precipitation_dmmph: 12,
                previous_condition: WeatherCondition::Fog as i32,
                ..Default::default()
            }))
        );
        assert!(envelope.validate().is_ok());
    }

    #[test]
    fn given_a_minimal_event_then_optional_members_stay_blank_and_time_is_now() {
        let envelope = map(json!({"type": "WorldResumed", "world_tick": 9})).unwrap();
        assert!(envelope.event_id.is_empty());
        assert!(envelope.world_id.is_empty());
        assert!(envelope.source.is_empty());
        assert_eq!(envelope.occurred_at_ms, now().timestamp_millis());
        assert_eq!(envelope.body, Some(Body::WorldResumed(WorldResumed {})));
    }

    #[test]
    fn given_every_type_then_its_body_maps_with_enum_names() {
        let cases = [
            json!({"type": "WorldCreated", "world_tick": 0, "data": {"display_name": "Emberfall",
                "seed": 7, "time_scale": 60, "tick_interval_ms": 1000, "regions": ["north"]}}),
            json!({"type": "WorldPaused", "world_tick": 1, "data": {"reason": "maintenance"}}),
            json!({"type": "ClockTicked", "world_tick": 2, "data": {"game_time_s": 120, "day": 0,
                "season": "spring", "time_scale": 60}}),
            json!({"type": "StoryChoiceMade", "world_tick": 3, "data": {"player_id": "p1",
                "story_id": "s1", "node_id": "n1", "choice_id": "c1", "context": {"party": "3"}}}),
            json!({"type": "InferenceRecorded", "world_tick": 4, "data": {"model_id": "npc-chat",
                "model_version": "2026-10-01", "purpose": "npc_dialogue", "prompt_tokens": 120,
                "completion_tokens": 40, "latency_ms": 350, "cost_micro_usd": 90, "outcome": "ok",
                "npc_id": "smith"}}),
        ];
        for case in cases {
            let mut envelope = map(case.clone()).unwrap();
            envelope.event_id = Uuid::now_v7().as_bytes().to_vec();
            envelope.world_id = "emberfall".to_owned();
            envelope
                .validate()
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        }
        let Some(Body::InferenceRecorded(inference)) = map(json!({"type": "InferenceRecorded",
            "world_tick": 4, "data": {"model_id": "m", "model_version": "v",
            "purpose": "quest_generation", "prompt_tokens": 1, "completion_tokens": 1,
            "latency_ms": 1, "cost_micro_usd": 1, "outcome": "filtered"}}))
        .unwrap()
        .body
        else {
            panic!("not an inference");
        };
        assert_eq!(inference.purpose, InferencePurpose::QuestGeneration as i32);
        assert_eq!(inference.outcome, InferenceOutcome::Filtered as i32);
    }

    #[test]
    fn given_an_unknown_type_then_the_pointer_is_the_type_member() {
        let err = map(json!({"type": "Earthquake", "world_tick": 1})).unwrap_err();
        assert_eq!(err.kind, ProblemKind::UnknownEventType);
        assert_eq!(err.pointer.as_deref(), Some("/events/3/type"));
        assert!(err.detail.contains("\"Earthquake\""), "{}", err.detail);
        assert!(err.detail.contains("WeatherChanged"), "{}", err.detail);
    }

    #[test]
    fn given_a_missing_data_field_then_the_pointer_names_it() {
        let err = map(weather(
            &json!({"region": "north", "temperature_dc": 1, "wind_dmps": 1,
            "precipitation_dmmph": 0}),
        ))
        .unwrap_err();
        assert_eq!(err.kind, ProblemKind::MissingField);
        assert_eq!(err.pointer.as_deref(), Some("/events/3/data/condition"));
        assert!(err.detail.contains("\"condition\""), "{}", err.detail);
    }

    #[test]
    fn given_a_missing_envelope_field_then_the_pointer_names_it() {
        let err = map(json!({"type": "WorldResumed"})).unwrap_err();
        assert_eq!(err.kind, ProblemKind::MissingField);
        assert_eq!(err.pointer.as_deref(), Some("/events/3/world_tick"));
    }

    #[test]
    fn given_a_bad_enum_value_then_the_allowed_names_are_listed() {
        let err = map(weather(&json!({"region": "north", "condition": "drizzle",
            "temperature_dc": 1, "wind_dmps": 1, "precipitation_dmmph": 0})))
        .unwrap_err();
        assert_eq!(err.kind, ProblemKind::InvalidValue);
        assert_eq!(err.pointer.as_deref(), Some("/events/3/data/condition"));
        assert!(
            err.detail.contains("unknown value `drizzle`"),
            "{}",
            err.detail
        );
        assert!(err.detail.contains("`rain`"), "{}", err.detail);
        let unspecified = map(weather(
            &json!({"region": "north", "condition": "unspecified",
            "temperature_dc": 1, "wind_dmps": 1, "precipitation_dmmph": 0}),
        ))
        .unwrap_err();
        assert_eq!(unspecified.kind, ProblemKind::InvalidValue);
    }

    #[test]
    fn given_an_unknown_member_then_it_is_refused_where_it_is() {
        let err = map(weather(
            &json!({"region": "north", "condition": "rain", "temperature_dc": 1,
            "wind_dmps": 1, "precipitation_dmmph": 0, "humidity": 3}),
        ))
        .unwrap_err();
        assert_eq!(err.kind, ProblemKind::UnknownField);
        assert_eq!(err.pointer.as_deref(), Some("/events/3/data/humidity"));
        let top = map(json!({"type": "WorldResumed", "world_tick": 1, "tick": 1})).unwrap_err();
        assert_eq!(top.kind, ProblemKind::UnknownField);
        assert_eq!(top.pointer.as_deref(), Some("/events/3/tick"));
    }

    #[test]
    fn given_wrong_types_and_ranges_then_the_value_is_invalid() {
        for (data, pointer) in [
            (
                json!({"region": "north", "condition": "rain", "temperature_dc": 1,
                "wind_dmps": -1, "precipitation_dmmph": 0}),
                "/events/3/data/wind_dmps",
            ),
            (
                json!({"region": 5, "condition": "rain", "temperature_dc": 1,
                "wind_dmps": 1, "precipitation_dmmph": 0}),
                "/events/3/data/region",
            ),
            (json!("rain"), "/events/3/data"),
        ] {
            let err = map(weather(&data)).unwrap_err();
            assert_eq!(err.kind, ProblemKind::InvalidValue);
            assert_eq!(err.pointer.as_deref(), Some(pointer));
        }
        let bad_id =
            map(json!({"type": "WorldResumed", "world_tick": 1, "event_id": "nope"})).unwrap_err();
        assert_eq!(bad_id.pointer.as_deref(), Some("/events/3/event_id"));
        let bad_time = map(json!({"type": "WorldResumed", "world_tick": 1,
            "occurred_at": "yesterday"}))
        .unwrap_err();
        assert_eq!(bad_time.pointer.as_deref(), Some("/events/3/occurred_at"));
        let bad_context = map(json!({"type": "StoryChoiceMade", "world_tick": 1,
            "data": {"player_id": "p", "story_id": "s", "node_id": "n", "choice_id": "c",
                     "context": {"a/b": 1}}}))
        .unwrap_err();
        assert_eq!(
            bad_context.pointer.as_deref(),
            Some("/events/3/data/context/a~1b")
        );
    }

    #[test]
    fn given_request_shapes_then_single_batch_empty_and_oversize_are_told_apart() {
        let single = br#"{"type": "WorldResumed", "world_tick": 1}"#;
        let (drafts, violations) = parse_json_body(single, 10, now()).unwrap();
        assert_eq!((drafts.len(), violations.len()), (1, 0));
        assert_eq!(drafts[0].pointer, "");

        let batch = br#"{"events": [{"type": "WorldResumed", "world_tick": 1},
                                     {"type": "Nope", "world_tick": 2}]}"#;
        let (drafts, violations) = parse_json_body(batch, 10, now()).unwrap();
        assert_eq!(drafts.len(), 1);
        assert_eq!(violations[0].index, Some(1));
        assert_eq!(violations[0].pointer.as_deref(), Some("/events/1/type"));

        let status = |body: &[u8], max| {
            parse_json_body(body, max, now())
                .unwrap_err()
                .status()
                .as_u16()
        };
        assert_eq!(status(b"{\"events\": [", 10), 400);
        assert_eq!(status(b"\xff", 10), 400);
        assert_eq!(status(b"{\"events\": []}", 10), 422);
        assert_eq!(status(b"[1]", 10), 422);
        assert_eq!(status(b"{\"events\": {}}", 10), 422);
        assert_eq!(status(b"{\"events\": [], \"extra\": 1}", 10), 422);
        assert_eq!(status(batch, 1), 413);
    }
}
