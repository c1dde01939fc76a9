//! The append path: the one way events enter the log.
//!
//! Every producer and the HTTP gateway append through [`Appender`], so delivery
//! guarantees, keys, partitioning and headers are decided once, here.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use chrono::{Datelike, SecondsFormat, TimeZone, Timelike, Utc};
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use worldline_ops::config::KafkaSettings;
use worldline_ops::kafka::{base_client_config, set_defaults};
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::family::event_type;
use worldline_schemas::pb::Envelope;
use worldline_schemas::{DecodeError, Family};

/// Where an appended event landed. `(topic, partition, offset)` is its position in
/// the log, the basis of consistency tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The event breaks the contract; retrying will not help.
    #[error("event rejected before append: {0}")]
    Invalid(#[from] DecodeError),
    /// Kafka did not acknowledge the event within the delivery timeout. The event
    /// may or may not be in the log; retrying with the same event id is safe
    /// because projectors deduplicate on it.
    #[error("Kafka did not acknowledge the event: {0}")]
    Unavailable(KafkaError),
    /// The producer could not be created (bad configuration).
    #[error("Kafka producer could not be created: {0}")]
    Config(KafkaError),
}

impl AppendError {
    /// Whether the same append may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AppendError::Unavailable(_))
    }
}

/// Tuning of the append path.
#[derive(Debug, Clone)]
pub struct AppenderOptions {
    /// Prefix of the event topics (see `TopicSettings::prefix`).
    pub topic_prefix: String,
    /// Longest time an append may take before it fails, queueing and retries
    /// included. `Duration::ZERO` means no limit: librdkafka keeps retrying under
    /// the idempotent producer's sequence numbers (so the broker drops repeats)
    /// until the event is acknowledged. That suits a single writer such as the
    /// clock, for which a timed-out append is worse than a slow one: librdkafka
    /// reports an in-flight message that timed out as failed although the broker
    /// may have stored it, and sending it again would then store it twice.
    pub delivery_timeout: Duration,
    /// Written into `ce_source` and the client id, e.g. "clock" or "gateway".
    pub source: String,
}

impl Default for AppenderOptions {
    fn default() -> Self {
        AppenderOptions {
            topic_prefix: String::new(),
            delivery_timeout: Duration::from_secs(10),
            source: "worldline".to_owned(),
        }
    }
}

/// Appends [`Envelope`]s to their family's topic, keyed by world id.
/// Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct Appender {
    producer: Arc<ProducerSlot<FutureProducer>>,
    kafka: Arc<KafkaSettings>,
    options: Arc<AppenderOptions>,
    /// Each family's topic, at [`Family::index`], named once.
    topics: Arc<[String; Family::ALL.len()]>,
}

/// The producer the clones of an [`Appender`] share, numbered by generation.
///
/// A fatal error makes every message of the producer fail, often a whole batch
/// at once, and several batches may be in flight on it. Each failure names the
/// generation it was sent with, and only the first one for a generation
/// replaces the producer: one new producer per fatal error, not one per failed
/// message.
struct ProducerSlot<P> {
    current: RwLock<(u64, P)>,
}

impl<P: Clone> ProducerSlot<P> {
    fn new(producer: P) -> ProducerSlot<P> {
        ProducerSlot {
            current: RwLock::new((0, producer)),
        }
    }

    /// The current producer and its generation.
    fn get(&self) -> (u64, P) {
        let guard = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (guard.0, guard.1.clone())
    }

    /// Replaces the producer of `generation` with `make()`, unless it has
    /// already been replaced. Returns whether this call replaced it.
    fn replace<E>(&self, generation: u64, make: impl FnOnce() -> Result<P, E>) -> Result<bool, E> {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if guard.0 != generation {
            return Ok(false);
        }
        let retired = std::mem::replace(&mut *guard, (generation + 1, make()?));
        // Dropping a producer waits for its threads: not while others wait for the lock.
        drop(guard);
        drop(retired);
        Ok(true)
    }
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("bootstrap_servers", &self.kafka.bootstrap_servers)
            .field("options", &self.options)
            .finish()
    }
}

/// The appender's librdkafka tuning, unless `kafka.properties` sets it. The
/// settings its guarantees rest on (idempotence, acks, partitioner, delivery
/// timeout) are not in this list: `producer_config` sets them over any
/// operator value.
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    // Small batches sent soon: events are small and freshness matters more
    // than the last percent of throughput; under load batches fill anyway.
    ("linger.ms", "5"),
    // lz4 in its fast mode (librdkafka's default level for it). At live rates
    // a batch holds one to a few events per partition, and each batch is
    // compressed here, decompressed by the broker to validate it and again by
    // every consumer group reading it. zstd builds (and zeroes) fresh contexts
    // for each of those: with zstd at level 1, zstd was about 15% of the
    // machine during the freshness benchmark (ops/bench/project.sh, 19 600
    // events/s, `perf record -a`: decompression in the projectors' consumers
    // alone 8%); lz4 took 6 to 9 points of machine CPU off the same run. zstd
    // packs large backlog appends tighter; an operator who prefers log bytes
    // to CPU sets `compression.type` in `kafka.properties`.
    ("compression.type", "lz4"),
    // Room for bursts from the simulator and the batch API without
    // QueueFull errors; the delivery timeout still bounds waiting.
    ("queue.buffering.max.messages", "1000000"),
    ("queue.buffering.max.kbytes", "1048576"),
    ("batch.num.messages", "10000"),
];

fn create_producer(
    kafka: &KafkaSettings,
    options: &AppenderOptions,
) -> Result<FutureProducer, KafkaError> {
    producer_config(kafka, options).create()
}

/// The librdkafka configuration an appender with these settings runs with:
/// the operator's properties, the guarantees over them, the tuning defaults
/// under them. The append benchmark gives its Java counterpart the same.
pub fn producer_config(kafka: &KafkaSettings, options: &AppenderOptions) -> rdkafka::ClientConfig {
    let mut config = base_client_config(kafka, &format!("worldline-{}", options.source));
    config
        // Exactly one copy per send, in order, even when the producer retries
        // after a lost acknowledgement. Implies acks=all and bounded in-flight.
        .set("enable.idempotence", "true")
        // Acknowledged means written to every in-sync replica: an event we
        // report as appended survives the loss of the leader.
        .set("acks", "all")
        // Java-compatible partitioning (murmur2 of the key, random for no key):
        // librdkafka's default (crc32) disagrees with Java and Go clients, and
        // every producer of a world must pick the same partition to keep order.
        .set("partitioner", "murmur2_random")
        // The delivery timeout bounds an append end to end; the gateway turns
        // it into a 503 rather than holding a game server's request forever.
        .set(
            "message.timeout.ms",
            options.delivery_timeout.as_millis().to_string(),
        );
    set_defaults(&mut config, PRODUCER_DEFAULTS);
    config
}

impl Appender {
    /// Creates the producer. Nothing is sent until the first append.
    pub fn new(kafka: &KafkaSettings, options: AppenderOptions) -> Result<Appender, AppendError> {
        let producer = create_producer(kafka, &options).map_err(AppendError::Config)?;
        Ok(Appender {
            producer: Arc::new(ProducerSlot::new(producer)),
            kafka: Arc::new(kafka.clone()),
            topics: Arc::new(Family::ALL.map(|family| family.topic(&options.topic_prefix))),
            options: Arc::new(options),
        })
    }

    /// The topic an envelope is appended to.
    pub fn topic_for(&self, family: Family) -> String {
        self.topic_name(family).to_owned()
    }

    fn topic_name(&self, family: Family) -> &str {
        &self.topics[family.index()]
    }

    /// Appends one event and waits until Kafka has acknowledged it.
    pub async fn append(&self, envelope: &Envelope) -> Result<Appended, AppendError> {
        self.append_batch(std::slice::from_ref(envelope))
            .await
            .into_iter()
            .next()
            .unwrap_or(Err(AppendError::Unavailable(KafkaError::Canceled)))
    }

    /// Appends many events at once and waits for all acknowledgements; results
    /// are in input order. Events of one world and family keep their input order
    /// in the log (idempotent producer, one partition per world).
    pub async fn append_batch(&self, envelopes: &[Envelope]) -> Vec<Result<Appended, AppendError>> {
        let (generation, producer) = self.producer.get();
        let queue_timeout = if self.options.delivery_timeout.is_zero() {
            Timeout::Never
        } else {
            Timeout::After(self.options.delivery_timeout)
        };
        let prepared: Vec<Result<(&str, Vec<u8>), DecodeError>> = envelopes
            .iter()
            .map(|envelope| {
                envelope.validate()?;
                let family = envelope.family().ok_or(DecodeError::Empty)?;
                Ok((self.topic_name(family), envelope.to_bytes()))
            })
            .collect();
        // `send` enqueues on first poll (waiting for room if the queue is full)
        // and then awaits the acknowledgement; polling them together keeps the
        // whole batch in flight at once.
        let sends = envelopes.iter().zip(prepared).map(|(envelope, prepared)| {
            let producer = &producer;
            async move {
                let (topic, payload) = prepared?;
                let record = FutureRecord::to(topic)
                    .key(envelope.world_id.as_bytes())
                    .payload(&payload)
                    .timestamp(envelope.occurred_at_ms)
                    .headers(cloud_event_headers(envelope, &self.options.source));
                match producer.send(record, queue_timeout).await {
                    Ok(delivered) => Ok(Appended {
                        topic: topic.to_owned(),
                        partition: delivered.partition,
                        offset: delivered.offset,
                    }),
                    Err((error, _)) => Err(self.unavailable(producer, generation, error)),
                }
            }
        });
        join_all(sends).await
    }

    /// Waits until everything queued has been acknowledged or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), AppendError> {
        let (generation, producer) = self.producer.get();
        producer
            .flush(Timeout::After(timeout))
            .map_err(|error| self.unavailable(&producer, generation, error))
    }

    /// Classifies a delivery error of `producer` (generation `generation`). A
    /// fatal one (the idempotent producer's sequence state is lost, and every
    /// later send on it fails too) replaces the producer, so later appends work
    /// instead of failing forever.
    fn unavailable(
        &self,
        producer: &FutureProducer,
        generation: u64,
        error: KafkaError,
    ) -> AppendError {
        let fatal = producer.client().fatal_error().is_some()
            || matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        if fatal {
            match self
                .producer
                .replace(generation, || create_producer(&self.kafka, &self.options))
            {
                Ok(true) => {
                    metrics::counter!("worldline_producer_recreated_total", "source" => self.options.source.clone())
                        .increment(1);
                    tracing::error!(%error, generation, "fatal producer error; created a new producer");
                }
                Ok(false) => {}
                Err(create_error) => {
                    tracing::error!(%error, %create_error, "fatal producer error, and no new producer could be created");
                }
            }
        }
        AppendError::Unavailable(error)
    }
}

/// The CloudEvents Kafka protocol binding, binary content mode, plus a W3C
/// `traceparent` derived from the event so a trace can follow it downstream.
///
/// Built for every event: each value is written into a buffer on the stack.
/// A `String` per value was five allocations per event and, with their frees,
/// about a fifth of the appending thread's CPU at live rates (`perf`, the
/// projection benchmark's freshness run).
fn cloud_event_headers(envelope: &Envelope, source: &str) -> OwnedHeaders {
    let event_id = envelope.event_uuid();
    let event_type = envelope.body.as_ref().map(event_type).unwrap_or_default();
    let mut id_text = uuid::Uuid::encode_buffer();
    let ce_id = event_id.hyphenated().encode_lower(&mut id_text);
    let mut time_text = StackText::<32>::default();
    let time = ce_time(envelope.occurred_at_ms, &mut time_text);
    let source = if envelope.source.is_empty() {
        source
    } else {
        &envelope.source
    };
    let mut source_text = StackText::<96>::default();
    let ce_source = match write!(source_text, "/worldline/{source}") {
        Ok(()) => Cow::Borrowed(source_text.as_str()),
        Err(_) => Cow::Owned(format!("/worldline/{source}")),
    };
    let mut trace_text = [0u8; TRACEPARENT_LEN];
    let traceparent = traceparent_for(&event_id, &mut trace_text);
    OwnedHeaders::new_with_capacity(8)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", ce_id))
        .insert(header("ce_source", &ce_source))
        .insert(header("ce_type", event_type))
        .insert(header("ce_time", &time))
        .insert(header("ce_subject", &envelope.world_id))
        .insert(header(
            "content-type",
            "application/protobuf; proto=worldline.v1.Envelope",
        ))
        .insert(header("traceparent", traceparent))
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Text written into a fixed buffer; a write that does not fit fails.
struct StackText<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackText<N> {
    fn default() -> Self {
        StackText {
            bytes: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> StackText<N> {
    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever copied in, so the bytes are UTF-8.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len + text.len();
        let Some(room) = self.bytes.get_mut(self.len..end) else {
            return Err(std::fmt::Error);
        };
        room.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `ce_time`: RFC 3339 in UTC with milliseconds, as
/// `to_rfc3339_opts(SecondsFormat::Millis, true)` writes it.
fn ce_time(occurred_at_ms: i64, out: &mut StackText<32>) -> Cow<'_, str> {
    let at = Utc
        .timestamp_millis_opt(occurred_at_ms)
        .single()
        .unwrap_or_default();
    let written = (0..=9999).contains(&at.year())
        && write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            at.year(),
            at.month(),
            at.day(),
            at.hour(),
            at.minute(),
            at.second(),
            at.timestamp_subsec_millis()
        )
        .is_ok();
    if written {
        Cow::Borrowed(out.as_str())
    } else {
        // Years beyond four digits take a sign; chrono knows how.
        Cow::Owned(at.to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

/// `00-` + 32 hex digits + `-` + 16 + `-01`.
const TRACEPARENT_LEN: usize = 55;

/// A W3C trace context whose trace id is the event id: with no tracing backend
/// configured, every event still starts a trace that logs can be joined on.
fn traceparent_for<'b>(event_id: &uuid::Uuid, out: &'b mut [u8; TRACEPARENT_LEN]) -> &'b str {
    let mut simple = uuid::Uuid::encode_buffer();
    let trace_id = event_id.simple().encode_lower(&mut simple).as_bytes();
    out[..3].copy_from_slice(b"00-");
    out[3..35].copy_from_slice(trace_id);
    out[35] = b'-';
    out[36..52].copy_from_slice(&trace_id[16..32]);
    out[52..].copy_from_slice(b"-01");
    std::str::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_operator_properties_then_tuning_follows_them_and_guarantees_do_not() {
        let kafka = KafkaSettings {
            bootstrap_servers: "localhost:9092".to_owned(),
            properties: [
                ("linger_ms", "20"),
                ("compression_type", "zstd"),
                ("acks", "0"),
                ("enable_idempotence", "false"),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
        };
        let config = producer_config(&kafka, &AppenderOptions::default());
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("compression.type"), Some("zstd"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("partitioner"), Some("murmur2_random"));
        assert_eq!(
            config.get("batch.num.messages"),
            Some("10000"),
            "untouched defaults stay"
        );
    }

    /// Stands in for a producer: which creation it came from.
    type Made = usize;

    fn slot_counting(made: &std::cell::Cell<usize>) -> impl Fn() -> Result<Made, ()> + '_ {
        move || {
            made.set(made.get() + 1);
            Ok(made.get())
        }
    }

    #[test]
    fn given_a_whole_batch_failing_fatally_then_the_producer_is_recreated_once() {
        let made = std::cell::Cell::new(0);
        let slot = ProducerSlot::new(0 as Made);
        let (generation, _) = slot.get();
        // Every message of a 500-event batch reports the same fatal error.
        let replaced = (0..500)
            .filter(|_| slot.replace(generation, slot_counting(&made)).unwrap())
            .count();
        assert_eq!(replaced, 1);
        assert_eq!(made.get(), 1, "one new producer for one fatal error");
        assert_eq!(slot.get(), (1, 1), "later appends use the new producer");
    }

    #[test]
    fn given_a_second_fatal_error_on_the_new_producer_then_it_is_recreated_again() {
        let made = std::cell::Cell::new(0);
        let slot = ProducerSlot::new(0 as Made);
        let (first, _) = slot.get();
        assert!(slot.replace(first, slot_counting(&made)).unwrap());
        // A batch that was still in flight on the first producer fails late.
        assert!(!slot.replace(first, slot_counting(&made)).unwrap());
        let (second, _) = slot.get();
        assert!(slot.replace(second, slot_counting(&made)).unwrap());
        assert_eq!(made.get(), 2);
        assert_eq!(slot.get(), (2, 2));
    }

    #[test]
    fn given_concurrent_batches_failing_on_one_producer_then_one_recreates_it() {
        let made = std::sync::atomic::AtomicUsize::new(0);
        let slot = ProducerSlot::new(0 as Made);
        let (generation, _) = slot.get();
        let replaced = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        let did = slot
                            .replace(generation, || {
                                Ok::<_, ()>(
                                    made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
                                )
                            })
                            .unwrap();
                        if did {
                            replaced.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(replaced.into_inner(), 1);
        assert_eq!(made.into_inner(), 1);
    }

    #[test]
    fn given_a_failed_recreation_then_the_next_failure_tries_again() {
        let slot = ProducerSlot::new(0 as Made);
        let (generation, _) = slot.get();
        assert!(
            slot.replace(generation, || Err::<Made, _>("broken"))
                .is_err()
        );
        assert_eq!(
            slot.get(),
            (0, 0),
            "the old producer stays until a new one exists"
        );
        assert!(slot.replace(generation, || Ok::<_, ()>(7)).unwrap());
        assert_eq!(slot.get(), (1, 7));
    }

    /// The header values as `format!` and chrono's own formatter write them.
    fn expected_headers(envelope: &Envelope, source: &str) -> Vec<(String, String)> {
        let id = envelope.event_uuid();
        let trace_id = id.simple().to_string();
        let time = Utc
            .timestamp_millis_opt(envelope.occurred_at_ms)
            .single()
            .unwrap_or_default()
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let source = if envelope.source.is_empty() {
            source
        } else {
            &envelope.source
        };
        [
            ("ce_specversion", "1.0".to_owned()),
            ("ce_id", id.to_string()),
            ("ce_source", format!("/worldline/{source}")),
            ("ce_type", "worldline.v1.ClockTicked".to_owned()),
            ("ce_time", time),
            ("ce_subject", envelope.world_id.clone()),
            (
                "content-type",
                "application/protobuf; proto=worldline.v1.Envelope".to_owned(),
            ),
            (
                "traceparent",
                format!("00-{trace_id}-{}-01", &trace_id[16..32]),
            ),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }

    #[test]
    fn given_any_time_and_source_then_the_headers_are_those_format_would_write() {
        use rdkafka::message::Headers as _;
        let world = worldline_schemas::WorldId::parse("w-7").unwrap();
        let long_source = "s".repeat(200);
        let times = [
            0,
            1,
            999,
            1_765_151_476_123,
            -1,
            -62_135_596_800_000, // year 1
            253_402_300_799_999, // the last millisecond of 9999
            253_402_300_800_000, // year 10000: chrono's sign
            i64::MAX,
            i64::MIN,
        ];
        for occurred_at_ms in times {
            for source in ["", "clock", long_source.as_str()] {
                let mut envelope = worldline_schemas::envelope::new_envelope(
                    &world,
                    3,
                    source,
                    worldline_schemas::pb::envelope::Body::ClockTicked(Default::default()),
                );
                envelope.occurred_at_ms = occurred_at_ms;
                let headers = cloud_event_headers(&envelope, "gateway");
                let got: Vec<(String, String)> = headers
                    .iter()
                    .map(|h| {
                        let value = std::str::from_utf8(h.value.unwrap()).unwrap();
                        (h.key.to_owned(), value.to_owned())
                    })
                    .collect();
                assert_eq!(
                    got,
                    expected_headers(&envelope, "gateway"),
                    "at {occurred_at_ms} ms from {source:?}"
                );
            }
        }
    }

    #[test]
    fn traceparent_is_well_formed() {
        let id = uuid::Uuid::now_v7();
        let mut text = [0u8; TRACEPARENT_LEN];
        let tp = traceparent_for(&id, &mut text);
        let trace_id = id.simple().to_string();
        assert_eq!(tp, format!("00-{trace_id}-{}-01", &trace_id[16..32]));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }
}
