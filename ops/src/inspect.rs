//! `worldline events dump|tail`: event topics printed as JSON lines, for people
//! debugging the log.
//!
//! Each record becomes one line:
//!
//! ```json
//! {"topic":"worldline.clock.v1","partition":3,"offset":1041,"timestamp":"2026-03-15T09:59:30.001Z",
//!  "key":"emberfall","headers":{"ce_type":"worldline.v1.ClockTicked",...},"event":{...}}
//! ```
//!
//! where `event` is [`worldline_schemas::json::envelope_to_json`]. A record that
//! does not decode or validate is printed, not skipped, with `"error"` and the
//! value as `"payload_base64"` in place of `event`: the person reading a dump is
//! usually looking for exactly that record.
//!
//! The reader assigns partitions itself and never joins a consumer group or
//! commits offsets, so dumping a topic never moves any projector's position.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{SecondsFormat, TimeZone, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use worldline_schemas::json::envelope_to_json;
use worldline_schemas::{Family, WorldId, decode_envelope};

use crate::config::{KafkaSettings, TopicSettings};
use crate::kafka::base_client_config;

/// How long metadata and watermark requests may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a bounded dump checks whether every partition has reached the end
/// it had at the start, when no record arrives to tell it so.
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Where reading starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record still in the partition (event topics keep everything).
    Beginning,
    /// After the newest record: only records appended from now on.
    End,
    /// This offset in every partition, clamped to what the partition holds.
    Offset(i64),
}

impl std::str::FromStr for StartFrom {
    type Err = String;

    /// `beginning`, `end`, or an offset, as typed on the command line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "beginning" | "earliest" => Ok(StartFrom::Beginning),
            "end" | "latest" => Ok(StartFrom::End),
            offset => offset
                .parse::<i64>()
                .ok()
                .filter(|o| *o >= 0)
                .map(StartFrom::Offset)
                .ok_or_else(|| {
                    format!("{offset:?} is not `beginning`, `end` or an offset (0 or more)")
                }),
        }
    }
}

/// What to print.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// Families whose topics are read; empty means every family.
    pub families: Vec<Family>,
    /// Only records keyed by this world (events of other worlds are skipped).
    pub world: Option<WorldId>,
    /// Where each partition is read from.
    pub from: StartFrom,
    /// Stop after printing this many lines.
    pub limit: Option<u64>,
    /// Keep printing new records until `shutdown` (or `limit`); otherwise stop at
    /// the end each partition had when the dump started.
    pub follow: bool,
    /// Ends a following dump.
    pub shutdown: CancellationToken,
}

impl DumpRequest {
    /// Every record of every family from the beginning to the current end.
    pub fn dump(shutdown: CancellationToken) -> DumpRequest {
        DumpRequest {
            families: Family::ALL.to_vec(),
            world: None,
            from: StartFrom::Beginning,
            limit: None,
            follow: false,
            shutdown,
        }
    }

    /// New records of every family as they are appended, until `shutdown`.
    pub fn tail(shutdown: CancellationToken) -> DumpRequest {
        DumpRequest {
            from: StartFrom::End,
            follow: true,
            ..DumpRequest::dump(shutdown)
        }
    }

    fn families(&self) -> Vec<Family> {
        if self.families.is_empty() {
            Family::ALL.to_vec()
        } else {
            self.families.clone()
        }
    }
}

/// Why a dump stopped early.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("event topic {0} does not exist; run `worldline topics create` first")]
    MissingTopic(String),
    #[error("writing the output failed: {0}")]
    Output(#[from] std::io::Error),
    #[error("rendering a record as JSON failed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the metadata lookup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// One partition to read and where: `start` is the first offset read, `end` the
/// high watermark when the dump started (a bounded dump stops there).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PartitionPlan {
    topic: String,
    partition: i32,
    start: i64,
    end: i64,
}

/// Prints records of the requested event topics to `out` as JSON lines and
/// returns how many lines were printed.
pub async fn dump(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    request: DumpRequest,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64, InspectError> {
    let names: Vec<String> = request
        .families()
        .into_iter()
        .map(|family| family.topic(&topics.prefix))
        .collect();
    let plans = plan_partitions(kafka, names, request.from).await?;
    let plans: Vec<PartitionPlan> = plans
        .into_iter()
        .filter(|plan| request.follow || plan.start < plan.end)
        .collect();
    if plans.is_empty() || request.limit == Some(0) {
        return Ok(0);
    }
    let consumer = reader(kafka, &plans)?;
    read_records(&consumer, &plans, &request, out).await
}

/// [`dump`] that keeps following: `worldline events tail`. The request's `from`
/// is kept (so a tail may start at the beginning), `follow` is forced on; build
/// the request with [`DumpRequest::tail`] to start at the end.
pub async fn tail(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    request: DumpRequest,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64, InspectError> {
    let request = DumpRequest {
        follow: true,
        ..request
    };
    dump(kafka, topics, request, out).await
}

/// Looks up every partition of `topics` with its watermarks, on a blocking
/// thread because librdkafka's metadata calls block.
async fn plan_partitions(
    kafka: &KafkaSettings,
    topics: Vec<String>,
    from: StartFrom,
) -> Result<Vec<PartitionPlan>, InspectError> {
    let config = base_client_config(kafka, "worldline-inspect");
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let mut plans = Vec::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(InspectError::MissingTopic(topic));
            }
            for partition in partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, partition, METADATA_TIMEOUT)?;
                plans.push(PartitionPlan {
                    topic: topic.clone(),
                    partition,
                    start: start_offset(from, low, high),
                    end: high,
                });
            }
        }
        Ok(plans)
    })
    .await?
}

/// The first offset to read in a partition holding offsets `low..high`.
fn start_offset(from: StartFrom, low: i64, high: i64) -> i64 {
    match from {
        StartFrom::Beginning => low,
        StartFrom::End => high,
        StartFrom::Offset(offset) => offset.clamp(low, high),
    }
}

/// A consumer with the planned partitions assigned at their start offsets.
fn reader(kafka: &KafkaSettings, plans: &[PartitionPlan]) -> Result<StreamConsumer, InspectError> {
    let mut config = base_client_config(kafka, "worldline-inspect");
    config
        // librdkafka wants a group id for a consumer queue; this one is never
        // joined (partitions are assigned, not subscribed) and never committed to.
        .set("group.id", "worldline-inspect")
        // Reading must not move anyone's position, nor leave one behind.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A start offset outside the partition (it cannot happen with the
        // clamped plan, but a topic could be recreated meanwhile) reads from
        // the oldest record rather than silently skipping to the newest.
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = config.create()?;
    let mut assignment = TopicPartitionList::new();
    for plan in plans {
        assignment.add_partition_offset(&plan.topic, plan.partition, Offset::Offset(plan.start))?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// The consume loop: prints records until the limit, the planned ends (bounded
/// dump) or shutdown.
async fn read_records(
    consumer: &StreamConsumer,
    plans: &[PartitionPlan],
    request: &DumpRequest,
    out: &mut (dyn std::io::Write + Send),
) -> Result<u64, InspectError> {
    let mut remaining: HashMap<(String, i32), i64> = plans
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.end))
        .collect();
    let mut printed = 0_u64;
    let mut drain_check = tokio::time::interval(DRAIN_CHECK_INTERVAL);
    while !is_done(printed, request, remaining.len()) {
        tokio::select! {
            () = request.shutdown.cancelled() => break,
            received = consumer.recv() => {
                let message = received?;
                let key = (message.topic().to_owned(), message.partition());
                if !request.follow {
                    let Some(&end) = remaining.get(&key) else { continue };
                    if message.offset() >= end {
                        remaining.remove(&key);
                        continue;
                    }
                    if message.offset() + 1 >= end {
                        remaining.remove(&key);
                    }
                }
                if wanted(request.world.as_ref(), message.key()) {
                    write_line(out, &render_message(&message))?;
                    if request.follow {
                        // Someone is watching: show each record as it arrives.
                        out.flush()?;
                    }
                    printed += 1;
                }
            }
            _ = drain_check.tick(), if !request.follow => {
                // Offsets can have gaps (e.g. transaction markers), so the last
                // record before `end` may never arrive; the consumer's position
                // says when a partition has been read past it.
                drop_drained(consumer, &mut remaining)?;
            }
        }
    }
    out.flush()?;
    Ok(printed)
}

/// Whether the dump has printed enough or, when bounded, read everything planned.
fn is_done(printed: u64, request: &DumpRequest, partitions_left: usize) -> bool {
    request.limit.is_some_and(|limit| printed >= limit) || (!request.follow && partitions_left == 0)
}

/// Removes the partitions whose consumer position has reached their planned end.
fn drop_drained(
    consumer: &StreamConsumer,
    remaining: &mut HashMap<(String, i32), i64>,
) -> Result<(), InspectError> {
    let positions = consumer.position()?;
    for element in positions.elements() {
        if let Offset::Offset(position) = element.offset() {
            let key = (element.topic().to_owned(), element.partition());
            if remaining.get(&key).is_some_and(|&end| position >= end) {
                remaining.remove(&key);
            }
        }
    }
    Ok(())
}

/// Whether a record with this key passes the world filter.
fn wanted(world: Option<&WorldId>, key: Option<&[u8]>) -> bool {
    match world {
        None => true,
        Some(world) => key == Some(world.as_str().as_bytes()),
    }
}

fn write_line(out: &mut (dyn std::io::Write + Send), line: &Value) -> Result<(), InspectError> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// A record's parts, as read from Kafka.
#[derive(Debug, Clone, Copy)]
struct RecordView<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
}

fn render_message(message: &BorrowedMessage<'_>) -> Value {
    let headers: Vec<(&str, Option<&[u8]>)> = message
        .headers()
        .map(|headers| headers.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    render_record(
        RecordView {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key(),
            payload: message.payload(),
        },
        &headers,
    )
}

/// One output line for a record: its position, key, headers, and the decoded
/// event or why it does not decode.
fn render_record(record: RecordView<'_>, headers: &[(&str, Option<&[u8]>)]) -> Value {
    let mut line = Map::new();
    line.insert("topic".to_owned(), json!(record.topic));
    line.insert("partition".to_owned(), json!(record.partition));
    line.insert("offset".to_owned(), json!(record.offset));
    line.insert(
        "timestamp".to_owned(),
        record.timestamp_ms.map_or(Value::Null, rfc3339),
    );
    line.insert("key".to_owned(), record.key.map_or(Value::Null, lossy));
    let headers: BTreeMap<&str, Value> = headers
        .iter()
        .map(|(name, value)| (*name, value.map_or(Value::Null, lossy)))
        .collect();
    line.insert("headers".to_owned(), json!(headers));
    let payload = record.payload.unwrap_or_default();
    match decode_envelope(payload)
        .map_err(|e| e.to_string())
        .and_then(|envelope| envelope_to_json(&envelope).map_err(|e| e.to_string()))
    {
        Ok(event) => {
            line.insert("event".to_owned(), event);
        }
        Err(error) => {
            line.insert("error".to_owned(), json!(error));
            line.insert("payload_base64".to_owned(), json!(BASE64.encode(payload)));
        }
    }
    Value::Object(line)
}

fn rfc3339(millis: i64) -> Value {
    Utc.timestamp_millis_opt(millis)
        .single()
        .map_or(Value::Null, |t| {
            json!(t.to_rfc3339_opts(SecondsFormat::Millis, true))
        })
}

fn lossy(bytes: &[u8]) -> Value {
    json!(String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use worldline_schemas::envelope::EnvelopeExt;
    use worldline_schemas::pb::envelope::Body;
    use worldline_schemas::pb::{ClockTicked, Season};

    use super::*;

    fn record<'a>(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> RecordView<'a> {
        RecordView {
            topic: "worldline.clock.v1",
            partition: 3,
            offset: 1041,
            timestamp_ms: Some(1_773_568_770_001),
            key,
            payload,
        }
    }

    #[test]
    fn given_each_start_when_planned_then_the_offset_stays_within_the_partition() {
        assert_eq!(start_offset(StartFrom::Beginning, 5, 90), 5);
        assert_eq!(start_offset(StartFrom::End, 5, 90), 90);
        assert_eq!(start_offset(StartFrom::Offset(40), 5, 90), 40);
        assert_eq!(start_offset(StartFrom::Offset(0), 5, 90), 5);
        assert_eq!(start_offset(StartFrom::Offset(1_000), 5, 90), 90);
    }

    #[test]
    fn given_command_line_words_when_parsed_then_a_start_or_a_clear_error() {
        assert_eq!("beginning".parse(), Ok(StartFrom::Beginning));
        assert_eq!("end".parse(), Ok(StartFrom::End));
        assert_eq!("1041".parse(), Ok(StartFrom::Offset(1041)));
        assert!("-3".parse::<StartFrom>().is_err());
        assert!(
            "yesterday"
                .parse::<StartFrom>()
                .unwrap_err()
                .contains("yesterday")
        );
    }

    #[test]
    fn given_a_world_filter_when_records_arrive_then_only_that_worlds_keys_pass() {
        let emberfall = WorldId::parse("emberfall").unwrap();
        assert!(wanted(None, None));
        assert!(wanted(None, Some(b"anything")));
        assert!(wanted(Some(&emberfall), Some(b"emberfall")));
        assert!(!wanted(Some(&emberfall), Some(b"emberfall-2")));
        assert!(!wanted(Some(&emberfall), None));
    }

    #[test]
    fn given_a_limit_or_a_bounded_dump_when_checked_then_done_at_the_right_moment() {
        let mut request = DumpRequest::dump(CancellationToken::new());
        assert!(!is_done(10, &request, 2));
        assert!(is_done(10, &request, 0));
        request.limit = Some(10);
        assert!(is_done(10, &request, 2));
        let tail = DumpRequest::tail(CancellationToken::new());
        assert!(
            !is_done(10, &tail, 0),
            "a tail outlives the ends it started at"
        );
    }

    #[test]
    fn given_a_valid_event_when_rendered_then_position_headers_and_event() {
        let envelope = worldline_schemas::envelope::new_envelope(
            &WorldId::parse("emberfall").unwrap(),
            86_457,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: 5_187_420,
                day: 60,
                season: Season::Autumn as i32,
                time_scale: 60,
            }),
        );
        let payload = envelope.to_bytes();
        let headers = [
            ("ce_type", Some(&b"worldline.v1.ClockTicked"[..])),
            ("empty", None),
        ];

        let line = render_record(record(Some(b"emberfall"), Some(&payload)), &headers);

        assert_eq!(line["topic"], "worldline.clock.v1");
        assert_eq!(line["partition"], 3);
        assert_eq!(line["offset"], 1041);
        assert_eq!(line["timestamp"], "2026-03-15T09:59:30.001Z");
        assert_eq!(line["key"], "emberfall");
        assert_eq!(line["headers"]["ce_type"], "worldline.v1.ClockTicked");
        assert_eq!(line["headers"]["empty"], Value::Null);
        assert_eq!(line["event"]["worldTick"], "86457");
        assert_eq!(line["event"]["eventId"], envelope.event_uuid().to_string());
        assert!(line.get("error").is_none());
    }

    #[test]
    fn given_a_poison_record_when_rendered_then_an_error_line_with_the_payload() {
        let line = render_record(record(Some(b"emberfall"), Some(b"not an envelope")), &[]);

        assert!(line.get("event").is_none());
        assert!(
            line["error"].as_str().unwrap().contains("Envelope"),
            "{line}"
        );
        assert_eq!(line["payload_base64"], "bm90IGFuIGVudmVsb3Bl");
    }

    #[test]
    fn given_a_record_without_value_or_key_when_rendered_then_an_empty_payload_error() {
        let line = render_record(record(None, None), &[]);

        assert_eq!(line["key"], Value::Null);
        assert_eq!(line["error"], "empty payload");
        assert_eq!(line["payload_base64"], "");
    }
}
