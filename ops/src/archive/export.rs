//! The export itself: plan every partition's range, then read each topic with
//! its own manually assigned consumer and write one Avro file per partition.
//! Runs on a blocking thread (librdkafka polling and file I/O).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apache_avro::Schema;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use worldline_schemas::Family;

use super::format::{
    self, AvroFileWriter, FORMAT, HeaderOut, Manifest, ManifestPartition, ManifestTopic, RecordOut,
    metadata_keys,
};
use super::plan::{self, ExportRange, PartitionState};
use super::{ArchiveError, ArchiveProgress, ExportReport, ExportRequest, chosen_families};
use crate::config::KafkaSettings;
use crate::kafka::base_client_config;

/// How long metadata, watermark and time-index requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a record before checking for shutdown again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often progress is reported.
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// One topic to export: which offsets of which partitions.
#[derive(Debug, Clone)]
struct TopicPlan {
    family: Family,
    /// Full name in the source cluster.
    source_topic: String,
    /// Name without the prefix, written into every record.
    archived_topic: String,
    source_partitions: i32,
    /// Selected partitions and their `[start, end)`.
    ranges: BTreeMap<i32, (i64, i64)>,
}

impl TopicPlan {
    fn records(&self) -> u64 {
        self.ranges
            .values()
            .map(|(start, end)| u64::try_from(end - start).unwrap_or(0))
            .sum()
    }
}

/// Counts shared by every topic of a run, for progress.
struct Tally<'r> {
    records: u64,
    payload_bytes: u64,
    total: u64,
    started: Instant,
    last_report: Instant,
    report: &'r dyn Fn(ArchiveProgress),
}

impl Tally<'_> {
    fn progress(&self) -> ArchiveProgress {
        ArchiveProgress {
            records_done: self.records,
            records_total: self.total,
            payload_bytes: self.payload_bytes,
            elapsed: self.started.elapsed(),
        }
    }

    fn maybe_report(&mut self) {
        // Reading the clock for every record would cost more than the check saves.
        if self.records.is_multiple_of(1024) && self.last_report.elapsed() >= REPORT_EVERY {
            self.last_report = Instant::now();
            (self.report)(self.progress());
        }
    }
}

pub(super) fn run(
    kafka: &KafkaSettings,
    prefix: &str,
    request: &ExportRequest,
    report: &dyn Fn(ArchiveProgress),
    shutdown: &CancellationToken,
) -> Result<ExportReport, ArchiveError> {
    let started = Instant::now();
    format::prepare_directory(&request.dir)?;
    let schema = format::avro_schema()?;
    let planner = create_consumer(kafka, "worldline-archive-export")?;
    let plans = chosen_families(&request.families)
        .into_iter()
        .map(|family| plan_topic(&planner, family, prefix, &request.range))
        .collect::<Result<Vec<_>, _>>()?;
    drop(planner);

    let mut tally = Tally {
        records: 0,
        payload_bytes: 0,
        total: plans.iter().map(TopicPlan::records).sum(),
        started,
        last_report: started,
        report,
    };
    report(tally.progress());
    let mut topics = Vec::with_capacity(plans.len());
    for topic_plan in &plans {
        topics.push(export_topic(
            kafka,
            topic_plan,
            &request.dir,
            &schema,
            &mut tally,
            shutdown,
        )?);
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        created_at: Utc::now(),
        worldline_version: env!("CARGO_PKG_VERSION").to_owned(),
        source_prefix: prefix.to_owned(),
        range: request.range.clone(),
        records: tally.records,
        topics,
    };
    format::write_manifest(&request.dir, &manifest)?;
    report(tally.progress());
    Ok(ExportReport {
        dir: request.dir.clone(),
        manifest,
        payload_bytes: tally.payload_bytes,
        elapsed: started.elapsed(),
    })
}

/// A consumer that only ever reads partitions it is given.
fn create_consumer(kafka: &KafkaSettings, client_id: &str) -> Result<BaseConsumer, KafkaError> {
    let mut config = base_client_config(kafka, client_id);
    config
        // librdkafka needs a group id to assign partitions; this one is never
        // joined (partitions are assigned, not subscribed) and never committed
        // to, so an export moves nobody's position.
        .set("group.id", "worldline-archive-export")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Says when a partition has been read to its end even if the last
        // offsets before the planned end are not records (transaction markers),
        // so the export cannot wait forever for an offset that never comes.
        .set("enable.partition.eof", "true")
        // A start offset that no longer exists (deleted under us) fails the
        // export instead of silently jumping to either end of the log.
        .set("auto.offset.reset", "error")
        // Archives are kept for years: verify every batch's CRC so corruption
        // on disk or on the wire fails the export instead of being preserved.
        .set("check.crcs", "true")
        // Aborted transactional writes are not history; worldline does not
        // write transactionally, but other tools might.
        .set("isolation.level", "read_committed")
        // Larger fetches per partition: an export reads long backlogs, and
        // fewer round trips is most of the consumer's speed.
        .set("max.partition.fetch.bytes", "8388608");
    config.create()
}

/// Captures each partition's watermarks (the end of the export) and resolves
/// the range into per-partition offsets.
fn plan_topic(
    consumer: &BaseConsumer,
    family: Family,
    prefix: &str,
    range: &ExportRange,
) -> Result<TopicPlan, ArchiveError> {
    let source_topic = family.topic(prefix);
    let partitions = partition_ids(consumer, &source_topic)?;
    let mut states = BTreeMap::new();
    for partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(&source_topic, *partition, REQUEST_TIMEOUT)?;
        states.insert(
            *partition,
            PartitionState {
                low,
                high,
                time_from: None,
                time_to: None,
            },
        );
    }
    if let ExportRange::Time { from_ms, to_ms } = range {
        for (bound, set) in [(from_ms, true), (to_ms, false)] {
            let Some(bound) = bound else { continue };
            let offsets = offsets_at(consumer, &source_topic, &partitions, *bound)?;
            for (partition, offset) in offsets {
                if let Some(state) = states.get_mut(&partition) {
                    // No record that late: the bound falls at the end.
                    let offset = offset.unwrap_or(state.high);
                    if set {
                        state.time_from = Some(offset);
                    } else {
                        state.time_to = Some(offset);
                    }
                }
            }
        }
    }
    let ranges = states
        .iter()
        .filter_map(|(partition, state)| {
            plan::partition_range(range, *partition, *state).map(|r| (*partition, r))
        })
        .collect();
    Ok(TopicPlan {
        family,
        archived_topic: family.topic(""),
        source_topic,
        source_partitions: i32::try_from(partitions.len()).unwrap_or(i32::MAX),
        ranges,
    })
}

fn partition_ids(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, ArchiveError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    let missing = || ArchiveError::MissingTopic {
        topic: topic.to_owned(),
    };
    let found = metadata.topics().first().ok_or_else(missing)?;
    if found.error().is_some() || found.partitions().is_empty() {
        return Err(missing());
    }
    Ok(found.partitions().iter().map(|p| p.id()).collect())
}

/// The first offset at or after `timestamp_ms` in each partition; `None` when
/// no record is that late.
fn offsets_at(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    timestamp_ms: i64,
) -> Result<Vec<(i32, Option<i64>)>, ArchiveError> {
    let mut query = TopicPartitionList::new();
    for partition in partitions {
        query.add_partition_offset(topic, *partition, Offset::Offset(timestamp_ms))?;
    }
    let answer = consumer.offsets_for_times(query, REQUEST_TIMEOUT)?;
    Ok(answer
        .elements()
        .iter()
        .map(|element| {
            let offset = match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            (element.partition(), offset)
        })
        .collect())
}

/// One partition's file while it is being written.
struct PartitionFile<'s> {
    entry: ManifestPartition,
    path: PathBuf,
    writer: Option<AvroFileWriter<'s>>,
}

impl<'s> PartitionFile<'s> {
    fn create(
        schema: &'s Schema,
        dir: &Path,
        plan: &TopicPlan,
        partition: i32,
        (start, end): (i64, i64),
    ) -> Result<PartitionFile<'s>, ArchiveError> {
        let file = format::partition_file_name(plan.family.as_str(), partition);
        let path = dir.join(&file);
        let writer = format::create_partition_file(
            schema,
            &path,
            &[
                (metadata_keys::FORMAT, FORMAT.to_owned()),
                (metadata_keys::TOPIC, plan.archived_topic.clone()),
                (metadata_keys::PARTITION, partition.to_string()),
                (metadata_keys::START_OFFSET, start.to_string()),
                (metadata_keys::END_OFFSET, end.to_string()),
                (metadata_keys::VERSION, env!("CARGO_PKG_VERSION").to_owned()),
            ],
        )?;
        Ok(PartitionFile {
            entry: ManifestPartition {
                partition,
                start_offset: start,
                end_offset: end,
                records: 0,
                first_offset: None,
                last_offset: None,
                first_timestamp_ms: None,
                last_timestamp_ms: None,
                file,
                file_bytes: 0,
            },
            path,
            writer: Some(writer),
        })
    }

    fn is_open(&self) -> bool {
        self.writer.is_some()
    }

    /// Appends one message; returns its Kafka payload size.
    fn append(
        &mut self,
        archived_topic: &str,
        message: &BorrowedMessage<'_>,
    ) -> Result<u64, ArchiveError> {
        let Some(writer) = self.writer.as_mut() else {
            return Ok(0);
        };
        let headers: Vec<HeaderOut<'_>> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| HeaderOut {
                        key: header.key,
                        value: header.value,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let payload_bytes = message.key_len()
            + message.payload_len()
            + headers
                .iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum::<usize>();
        let timestamp = message.timestamp().to_millis().unwrap_or(-1);
        writer
            .append_ser(RecordOut {
                topic: archived_topic,
                partition: message.partition(),
                offset: message.offset(),
                timestamp,
                key: message.key(),
                headers,
                value: message.payload(),
            })
            .map_err(|source| ArchiveError::Avro {
                path: self.path.clone(),
                source: Box::new(source),
            })?;
        let entry = &mut self.entry;
        entry.records += 1;
        entry.first_offset.get_or_insert(message.offset());
        entry.last_offset = Some(message.offset());
        entry.first_timestamp_ms.get_or_insert(timestamp);
        entry.last_timestamp_ms = Some(timestamp);
        Ok(u64::try_from(payload_bytes).unwrap_or(u64::MAX))
    }

    fn finish(&mut self) -> Result<(), ArchiveError> {
        if let Some(writer) = self.writer.take() {
            self.entry.file_bytes = format::finish_partition_file(writer, &self.path)?;
        }
        Ok(())
    }
}

fn export_topic(
    kafka: &KafkaSettings,
    plan: &TopicPlan,
    dir: &Path,
    schema: &Schema,
    tally: &mut Tally<'_>,
    shutdown: &CancellationToken,
) -> Result<ManifestTopic, ArchiveError> {
    let (mut files, assignment) = open_partition_files(plan, dir, schema)?;
    // One consumer per topic: end-of-partition events name only the partition.
    let consumer = create_consumer(kafka, "worldline-archive-export")?;
    consumer.assign(&assignment)?;
    let mut open = files.values().filter(|f| f.is_open()).count();
    while open > 0 {
        if shutdown.is_cancelled() {
            return Err(ArchiveError::Cancelled);
        }
        let message = match consumer.poll(POLL_INTERVAL) {
            None => continue,
            Some(Ok(message)) => message,
            // Everything before this event in the queue has been read, and the
            // end of the log is at or past the planned end.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                open -= close(&mut files, partition)?;
                continue;
            }
            Some(Err(error)) => return Err(error.into()),
        };
        let partition = message.partition();
        let Some(file) = files.get_mut(&partition).filter(|f| f.is_open()) else {
            continue;
        };
        let end = file.entry.end_offset;
        if message.offset() < end {
            tally.payload_bytes += file.append(&plan.archived_topic, &message)?;
            tally.records += 1;
        }
        if message.offset() + 1 >= end {
            open -= close(&mut files, partition)?;
        }
        tally.maybe_report();
    }
    let partitions: Vec<ManifestPartition> = files.into_values().map(|f| f.entry).collect();
    Ok(ManifestTopic {
        family: plan.family.as_str().to_owned(),
        topic: plan.archived_topic.clone(),
        source_partitions: plan.source_partitions,
        records: partitions.iter().map(|p| p.records).sum(),
        partitions,
    })
}

/// Creates every selected partition's file, finishing at once those with
/// nothing to read, and the assignment that reads the others from their start.
fn open_partition_files<'s>(
    plan: &TopicPlan,
    dir: &Path,
    schema: &'s Schema,
) -> Result<(BTreeMap<i32, PartitionFile<'s>>, TopicPartitionList), ArchiveError> {
    let mut files = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for (partition, range) in &plan.ranges {
        let mut file = PartitionFile::create(schema, dir, plan, *partition, *range)?;
        if range.0 < range.1 {
            assignment.add_partition_offset(
                &plan.source_topic,
                *partition,
                Offset::Offset(range.0),
            )?;
        } else {
            file.finish()?;
        }
        files.insert(*partition, file);
    }
    Ok((files, assignment))
}

/// Finishes a partition's file if it is still open; returns how many it closed.
fn close(
    files: &mut BTreeMap<i32, PartitionFile<'_>>,
    partition: i32,
) -> Result<usize, ArchiveError> {
    match files.get_mut(&partition) {
        Some(file) if file.is_open() => {
            file.finish()?;
            Ok(1)
        }
        _ => Ok(0),
    }
}
