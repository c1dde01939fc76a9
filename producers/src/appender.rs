//! The append path: the one way events enter the log.
//!
//! Every producer and the HTTP gateway append through [`Appender`], so delivery
//! guarantees, keys, partitioning and headers are decided once, here.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{SecondsFormat, TimeZone, Utc};
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use worldline_ops::config::KafkaSettings;
use worldline_ops::kafka::base_client_config;
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
    /// Longest time an append may take before it fails, queueing and retries included.
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
    producer: Arc<RwLock<FutureProducer>>,
    kafka: Arc<KafkaSettings>,
    options: Arc<AppenderOptions>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("bootstrap_servers", &self.kafka.bootstrap_servers)
            .field("options", &self.options)
            .finish()
    }
}

fn create_producer(
    kafka: &KafkaSettings,
    options: &AppenderOptions,
) -> Result<FutureProducer, KafkaError> {
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
        )
        // Small batches sent soon: events are small and freshness matters more
        // than the last percent of throughput; under load batches fill anyway.
        .set("linger.ms", "5")
        // zstd compresses protobuf envelopes well and costs little CPU.
        .set("compression.type", "zstd")
        // Room for bursts from the simulator and the batch API without
        // QueueFull errors; the delivery timeout still bounds waiting.
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("batch.num.messages", "10000");
    config.create()
}

impl Appender {
    /// Creates the producer. Nothing is sent until the first append.
    pub fn new(kafka: &KafkaSettings, options: AppenderOptions) -> Result<Appender, AppendError> {
        let producer = create_producer(kafka, &options).map_err(AppendError::Config)?;
        Ok(Appender {
            producer: Arc::new(RwLock::new(producer)),
            kafka: Arc::new(kafka.clone()),
            options: Arc::new(options),
        })
    }

    /// The topic an envelope is appended to.
    pub fn topic_for(&self, family: Family) -> String {
        family.topic(&self.options.topic_prefix)
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
        let producer = match self.producer.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let prepared: Vec<Result<(String, Vec<u8>), DecodeError>> = envelopes
            .iter()
            .map(|envelope| {
                envelope.validate()?;
                let family = envelope.family().ok_or(DecodeError::Empty)?;
                Ok((self.topic_for(family), envelope.to_bytes()))
            })
            .collect();
        // `send` enqueues on first poll (waiting for room if the queue is full)
        // and then awaits the acknowledgement; polling them together keeps the
        // whole batch in flight at once.
        let sends = envelopes.iter().zip(prepared).map(|(envelope, prepared)| {
            let producer = &producer;
            async move {
                let (topic, payload) = prepared?;
                let record = FutureRecord::to(&topic)
                    .key(envelope.world_id.as_bytes())
                    .payload(&payload)
                    .timestamp(envelope.occurred_at_ms)
                    .headers(cloud_event_headers(envelope, &self.options.source));
                match producer
                    .send(record, Timeout::After(self.options.delivery_timeout))
                    .await
                {
                    Ok(delivered) => Ok(Appended {
                        topic,
                        partition: delivered.partition,
                        offset: delivered.offset,
                    }),
                    Err((error, _)) => Err(self.unavailable(error)),
                }
            }
        });
        join_all(sends).await
    }

    /// Waits until everything queued has been acknowledged or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), AppendError> {
        let producer = match self.producer.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        producer
            .flush(Timeout::After(timeout))
            .map_err(AppendError::Unavailable)
    }

    /// Classifies a delivery error; a fatal one (the idempotent producer's
    /// sequence state is lost) replaces the producer so later appends work
    /// instead of failing forever.
    fn unavailable(&self, error: KafkaError) -> AppendError {
        let fatal = match self.producer.read() {
            Ok(guard) => guard.client().fatal_error().is_some(),
            Err(_) => true,
        } || matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        if fatal {
            tracing::error!(%error, "fatal producer error; creating a new producer");
            match create_producer(&self.kafka, &self.options) {
                Ok(fresh) => {
                    if let Ok(mut guard) = self.producer.write() {
                        *guard = fresh;
                    }
                }
                Err(create_error) => {
                    tracing::error!(%create_error, "could not create a new producer");
                }
            }
        }
        AppendError::Unavailable(error)
    }
}

/// The CloudEvents Kafka protocol binding, binary content mode, plus a W3C
/// `traceparent` derived from the event so a trace can follow it downstream.
fn cloud_event_headers(envelope: &Envelope, source: &str) -> OwnedHeaders {
    let event_id = envelope.event_uuid();
    let event_type = envelope.body.as_ref().map(event_type).unwrap_or_default();
    let time = Utc
        .timestamp_millis_opt(envelope.occurred_at_ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true);
    let ce_source = format!(
        "/worldline/{}",
        if envelope.source.is_empty() {
            source
        } else {
            &envelope.source
        }
    );
    let traceparent = traceparent_for(&event_id);
    OwnedHeaders::new_with_capacity(8)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &event_id.to_string()))
        .insert(header("ce_source", &ce_source))
        .insert(header("ce_type", event_type))
        .insert(header("ce_time", &time))
        .insert(header("ce_subject", &envelope.world_id))
        .insert(header(
            "content-type",
            "application/protobuf; proto=worldline.v1.Envelope",
        ))
        .insert(header("traceparent", &traceparent))
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// A W3C trace context whose trace id is the event id: with no tracing backend
/// configured, every event still starts a trace that logs can be joined on.
fn traceparent_for(event_id: &uuid::Uuid) -> String {
    let trace_id = event_id.simple().to_string();
    let span_id = &trace_id[16..32];
    format!("00-{trace_id}-{span_id}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_well_formed() {
        let id = uuid::Uuid::now_v7();
        let tp = traceparent_for(&id);
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }
}
