//! The import itself: prepare the target topics, then stream every archive file
//! into one idempotent producer, in file (= source offset) order, and wait for
//! every acknowledgement. The streaming part runs on a blocking thread.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tokio_util::sync::CancellationToken;
use worldline_schemas::Family;

use super::format::{self, ArchivedRecord, Manifest, ManifestPartition};
use super::plan;
use super::{ArchiveError, ArchiveProgress, ImportReport, ImportRequest, ImportedTopic};
use crate::config::{KafkaSettings, TopicSettings};
use crate::kafka::base_client_config;
use crate::topics::{ensure_topics, event_topic_specs, verify_event_topics};

/// How long metadata and watermark requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often progress is reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// Records produced between two rounds of serving delivery reports and checking
/// for failure: often enough to stop early, rarely enough to cost nothing.
const SERVICE_EVERY: u64 = 1000;
/// Wait for room in the producer queue, or for acknowledgements at the end,
/// between checks for shutdown and failure.
const WAIT_STEP: Duration = Duration::from_millis(50);

/// One archived topic and where it goes.
#[derive(Debug, Clone)]
pub(super) struct Target {
    family: Family,
    /// Index into the manifest's topics.
    manifest_index: usize,
    /// Full target topic name (current prefix).
    topic: String,
}

/// Creates missing event topics of the current prefix and checks that they keep
/// history and the archive's timestamps. Returns the target of every archived topic.
pub(super) async fn prepare_targets(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    manifest: &Manifest,
) -> Result<Vec<Target>, ArchiveError> {
    let targets = manifest
        .topics
        .iter()
        .enumerate()
        .map(|(manifest_index, archived)| {
            let family: Family =
                archived
                    .family
                    .parse()
                    .map_err(|_| ArchiveError::UnknownFamily {
                        name: archived.family.clone(),
                    })?;
            Ok(Target {
                family,
                manifest_index,
                topic: family.topic(&topics.prefix),
            })
        })
        .collect::<Result<Vec<_>, ArchiveError>>()?;
    ensure_topics(kafka, &event_topic_specs(topics)).await?;
    verify_event_topics(kafka, topics).await?;
    check_create_time(kafka, &targets).await?;
    Ok(targets)
}

/// Archived timestamps survive only if the broker keeps the producer's
/// (CreateTime); under LogAppendTime it would stamp the import's own time.
async fn check_create_time(kafka: &KafkaSettings, targets: &[Target]) -> Result<(), ArchiveError> {
    let admin: AdminClient<DefaultClientContext> =
        base_client_config(kafka, "worldline-archive-import").create()?;
    let resources: Vec<ResourceSpecifier<'_>> = targets
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.topic))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let results = admin.describe_configs(&resources, &options).await?;
    for (target, result) in targets.iter().zip(results) {
        let resource = result.map_err(KafkaError::AdminOp)?;
        let actual = resource
            .get("message.timestamp.type")
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default();
        if actual != "CreateTime" {
            return Err(ArchiveError::TimestampsNotKept {
                topic: target.topic.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// Counts acknowledgements and keeps the first failure, from librdkafka's
/// callbacks.
#[derive(Default)]
struct Deliveries {
    acknowledged: AtomicU64,
    failure: Mutex<Option<KafkaError>>,
}

impl Deliveries {
    fn fail(&self, error: KafkaError) {
        let mut failure = match self.failure.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        failure.get_or_insert(error);
    }

    fn failure(&self) -> Option<KafkaError> {
        match self.failure.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }
}

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        // A fatal error (idempotence can no longer be guaranteed) stops the
        // producer for good; anything else is retried by librdkafka.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(%error, reason, "archive import producer failed");
            self.fail(error);
        } else {
            tracing::warn!(%error, reason, "archive import producer");
        }
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => self.fail(error.clone()),
        }
    }
}

fn create_producer(kafka: &KafkaSettings) -> Result<BaseProducer<Deliveries>, KafkaError> {
    let mut config = base_client_config(kafka, "worldline-archive-import");
    config
        // Retries never duplicate or reorder a record: each partition receives
        // the archive's records exactly once, in archive order.
        .set("enable.idempotence", "true")
        // Acknowledged means on every in-sync replica; the import reports
        // success only for records that survive a broker loss.
        .set("acks", "all")
        // At most five requests in flight per broker: the most idempotence
        // allows while still keeping order across retries.
        .set("max.in.flight.requests.per.connection", "5")
        // After a failed batch, stop instead of sending later records past a
        // gap: the target then holds a clean prefix of each partition.
        .set("enable.gapless.guarantee", "true")
        // Java-compatible partitioning of the original key, so each world lands
        // where every other producer (Rust, Java, Go) would put it.
        .set("partitioner", "murmur2_random")
        // An import is a batch job: ride out a leader election or a broker
        // restart, and fail only when a record is still unacknowledged after
        // five minutes.
        .set("message.timeout.ms", "300000")
        // Throughput over latency: nobody waits on a single record.
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        // zstd: event envelopes and their headers compress well, and the
        // network and the broker's disk carry less.
        .set("compression.type", "zstd")
        // Enough queued records to keep every partition's batches full while
        // the archive is decoded; a full queue just waits for acknowledgements.
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "262144");
    config.create_with_context(Deliveries::default())
}

/// Counts of one run, for progress and the report.
struct Tally<'r> {
    total: u64,
    payload_bytes: u64,
    started: Instant,
    last_report: Instant,
    report: &'r dyn Fn(ArchiveProgress),
}

impl Tally<'_> {
    fn progress(&self, acknowledged: u64) -> ArchiveProgress {
        ArchiveProgress {
            records_done: acknowledged,
            records_total: self.total,
            payload_bytes: self.payload_bytes,
            elapsed: self.started.elapsed(),
        }
    }

    fn maybe_report(&mut self, acknowledged: u64) {
        if self.last_report.elapsed() >= REPORT_EVERY {
            self.last_report = Instant::now();
            (self.report)(self.progress(acknowledged));
        }
    }
}

pub(super) fn run(
    kafka: &KafkaSettings,
    request: &ImportRequest,
    manifest: &Manifest,
    targets: &[Target],
    report: &dyn Fn(ArchiveProgress),
    shutdown: &CancellationToken,
) -> Result<ImportReport, ArchiveError> {
    let started = Instant::now();
    let producer = create_producer(kafka)?;
    let mut target_partitions = Vec::with_capacity(targets.len());
    for target in targets {
        let watermarks = watermarks(&producer, &target.topic)?;
        target_partitions.push(i32::try_from(watermarks.len()).unwrap_or(i32::MAX));
        if !request.allow_non_empty
            && let Some((topic, records)) =
                plan::first_non_empty([(target.topic.as_str(), watermarks.as_slice())])
        {
            return Err(ArchiveError::TargetNotEmpty {
                topic: topic.to_owned(),
                records,
            });
        }
    }

    let mut tally = Tally {
        total: manifest.records,
        payload_bytes: 0,
        started,
        last_report: started,
        report,
    };
    report(tally.progress(0));
    let mut imported = Vec::with_capacity(targets.len());
    let mut sent = 0;
    for (target, partitions) in targets.iter().zip(target_partitions) {
        let archived = &manifest.topics[target.manifest_index];
        let mut records = 0;
        for entry in &archived.partitions {
            let file = Sending {
                producer: &producer,
                dir: &request.dir,
                archived_topic: &archived.topic,
                entry,
                target_topic: &target.topic,
                target_partitions: partitions,
            };
            records += file.send(&mut tally, shutdown)?;
        }
        sent += records;
        imported.push(ImportedTopic {
            family: target.family,
            topic: target.topic.clone(),
            records,
        });
    }
    await_acknowledgements(&producer, sent, &mut tally, shutdown)?;
    report(tally.progress(producer.context().acknowledged()));
    Ok(ImportReport {
        records: producer.context().acknowledged(),
        topics: imported,
        payload_bytes: tally.payload_bytes,
        file_bytes: manifest.file_bytes(),
        elapsed: started.elapsed(),
    })
}

fn watermarks(
    producer: &BaseProducer<Deliveries>,
    topic: &str,
) -> Result<Vec<(i64, i64)>, ArchiveError> {
    let client = producer.client();
    let metadata = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ArchiveError::MissingTopic {
            topic: topic.to_owned(),
        });
    }
    partitions
        .into_iter()
        .map(|partition| Ok(client.fetch_watermarks(topic, partition, REQUEST_TIMEOUT)?))
        .collect()
}

/// One archive file on its way into its target topic.
struct Sending<'a> {
    producer: &'a BaseProducer<Deliveries>,
    dir: &'a Path,
    /// The unprefixed topic every record of the file must name.
    archived_topic: &'a str,
    entry: &'a ManifestPartition,
    target_topic: &'a str,
    target_partitions: i32,
}

impl Sending<'_> {
    /// Produces every record of the file in order; returns how many.
    fn send(
        &self,
        tally: &mut Tally<'_>,
        shutdown: &CancellationToken,
    ) -> Result<u64, ArchiveError> {
        let path = self.dir.join(&self.entry.file);
        let mut previous = None;
        let mut count: u64 = 0;
        for record in format::read_records(&path)? {
            let record = record?;
            self.check(&path, &record, previous)?;
            previous = Some(record.offset);
            tally.payload_bytes += payload_bytes(&record);
            self.produce(&record, shutdown)?;
            count += 1;
            if count.is_multiple_of(SERVICE_EVERY) {
                // Serve delivery callbacks as we go (never blocks), and stop at
                // the first failure rather than after the whole file.
                self.producer.poll(Duration::ZERO);
                if let Some(error) = self.producer.context().failure() {
                    return Err(ArchiveError::Delivery(error));
                }
                tally.maybe_report(self.producer.context().acknowledged());
            }
        }
        if count != self.entry.records {
            return Err(ArchiveError::Corrupt {
                path,
                reason: format!(
                    "holds {count} records but the manifest says {}",
                    self.entry.records
                ),
            });
        }
        Ok(count)
    }

    /// Refuses a record that is not where the manifest says, or out of order:
    /// import relies on file order being source offset order.
    fn check(
        &self,
        path: &Path,
        record: &ArchivedRecord,
        previous: Option<i64>,
    ) -> Result<(), ArchiveError> {
        let reason = if record.topic != self.archived_topic {
            format!(
                "a record of topic {} in the file of {}",
                record.topic, self.archived_topic
            )
        } else if record.partition != self.entry.partition {
            format!(
                "a record of partition {} in the file of partition {}",
                record.partition, self.entry.partition
            )
        } else if !plan::in_order(
            previous,
            record.offset,
            self.entry.start_offset,
            self.entry.end_offset,
        ) {
            format!(
                "offset {} after {previous:?} is out of order or outside [{}, {})",
                record.offset, self.entry.start_offset, self.entry.end_offset
            )
        } else {
            return Ok(());
        };
        Err(ArchiveError::Corrupt {
            path: path.to_owned(),
            reason,
        })
    }

    /// Enqueues one record, waiting for room in the producer's queue.
    fn produce(
        &self,
        record: &ArchivedRecord,
        shutdown: &CancellationToken,
    ) -> Result<(), ArchiveError> {
        let headers = (!record.headers.is_empty()).then(|| {
            record.headers.iter().fold(
                OwnedHeaders::new_with_capacity(record.headers.len()),
                |headers, header| {
                    headers.insert(Header {
                        key: &header.key,
                        value: header.value.as_deref(),
                    })
                },
            )
        });
        let mut outgoing = BaseRecord::<'_, [u8], [u8]>::to(self.target_topic);
        outgoing.key = record.key.as_deref();
        outgoing.payload = record.value.as_deref();
        outgoing.headers = headers;
        // CreateTime from the archive: the event's time, not the import's.
        outgoing.timestamp = (record.timestamp >= 0).then_some(record.timestamp);
        if record.key.is_none() {
            outgoing.partition = Some(plan::keyless_partition(
                record.partition,
                self.target_partitions,
            ));
        }
        loop {
            match self.producer.send(outgoing) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    outgoing = back;
                    if shutdown.is_cancelled() {
                        return Err(ArchiveError::Cancelled);
                    }
                    if let Some(error) = self.producer.context().failure() {
                        return Err(ArchiveError::Delivery(error));
                    }
                    self.producer.poll(WAIT_STEP);
                }
                Err((error, _)) => return Err(ArchiveError::Delivery(error)),
            }
        }
    }
}

fn payload_bytes(record: &ArchivedRecord) -> u64 {
    let bytes = record.key.as_ref().map_or(0, Vec::len)
        + record.value.as_ref().map_or(0, Vec::len)
        + record
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>();
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Waits until Kafka has acknowledged all `sent` records, or fails on the first
/// delivery error or on shutdown.
fn await_acknowledgements(
    producer: &BaseProducer<Deliveries>,
    sent: u64,
    tally: &mut Tally<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ArchiveError> {
    loop {
        if let Some(error) = producer.context().failure() {
            return Err(ArchiveError::Delivery(error));
        }
        let acknowledged = producer.context().acknowledged();
        if acknowledged >= sent && producer.in_flight_count() == 0 {
            return Ok(());
        }
        if shutdown.is_cancelled() {
            return Err(ArchiveError::Cancelled);
        }
        // Serves delivery callbacks; a timeout here only means "not yet".
        let _ = producer.flush(WAIT_STEP);
        tally.maybe_report(producer.context().acknowledged());
    }
}
