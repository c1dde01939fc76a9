//! `worldline archive export|import`: event topics to Avro object container
//! files and back.
//!
//! # What an archive is
//!
//! A directory holding one Avro object container file per exported
//! topic-partition, `<family>-p<partition>.avro` (e.g. `clock-p0003.avro`), and a
//! `manifest.json`. One file per partition rather than per topic because a
//! partition is Kafka's unit of order: each file is one partition in offset
//! order, so order is visible in the file itself, an offset range maps to one
//! contiguous file, and import can stream a file straight into the producer.
//!
//! Files are zstd-compressed (Avro codec `zstandard`, level 3, 1 MiB blocks).
//! Every record has this schema (also in each file's header, as Avro requires,
//! and in [`AVRO_SCHEMA`]):
//!
//! | field       | Avro type                                   | meaning |
//! |-------------|---------------------------------------------|---------|
//! | `topic`     | `string`                                    | source topic without the deployment prefix, e.g. `worldline.clock.v1` (names the family) |
//! | `partition` | `int`                                       | source partition |
//! | `offset`    | `long`                                      | source offset |
//! | `timestamp` | `long` (`timestamp-millis`)                 | the record's timestamp (CreateTime on event topics), -1 if none |
//! | `key`       | `["null","bytes"]`                          | the record key: the world id |
//! | `headers`   | `array` of `Header{key: string, value: ["null","bytes"]}` | every header, in order (CloudEvents `ce_*`, `traceparent`) |
//! | `value`     | `["null","bytes"]`                          | the protobuf `worldline.v1.Envelope` exactly as it was in Kafka |
//!
//! Key, value and header values are nullable because Kafka distinguishes null
//! from empty and the archive is lossless. The value is never decoded: an
//! archive does not depend on the event schema's version, and a record no
//! projector can read is archived as faithfully as any other.
//!
//! Each file's header also carries `worldline.archive.format`
//! (`worldline-archive/1`), `worldline.archive.topic`,
//! `worldline.archive.partition`, `worldline.archive.start_offset`,
//! `worldline.archive.end_offset` and `worldline.version`.
//!
//! `manifest.json` ([`Manifest`]) lists topics, partitions, offset ranges,
//! record counts and file sizes, when it was made and by which worldline
//! version. It is written last, after every file is synced: a directory
//! without it is an export that did not finish, and import refuses it.
//!
//! # Export
//!
//! [`export`] reads the chosen families' topics ([`ExportRequest`]) with a plain
//! consumer that assigns partitions itself: no consumer group, no commits, so
//! an export never moves a projector. The end of each partition is its high
//! watermark when the export starts, so exporting a live topic finishes. Ranges
//! ([`ExportRange`]): everything, offset ranges per partition, or a time range
//! resolved through the broker's time index.
//!
//! # Import
//!
//! [`import`] appends an archive to the event topics of the *current* prefix,
//! creating them if missing, and refuses a target topic that already holds
//! records unless [`ImportRequest::allow_non_empty`]. Each file (one source
//! partition) is produced in offset order by one idempotent producer with
//! `acks=all` and at most five requests in flight, which keeps per-partition
//! order through retries. Records are keyed by their original key with the
//! Java-compatible `murmur2_random` partitioner, so each world lands in the
//! partition every other producer would pick for it in the target topic.
//! Values (and with them event ids), keys, headers and timestamps (set
//! explicitly as CreateTime) are copied unchanged.
//!
//! **Offsets are not preserved in general.** Kafka assigns offsets on append:
//! into empty topics with the same partition count as the source, each
//! partition gets the same offsets back (one source partition maps to one
//! target partition and is written in order), but with a different partition
//! count, a non-empty target or a partial archive they differ. Read models that
//! store log positions (story `log_offset`, weather `log_offset`, worlds
//! `status_offset`) then hold the new positions; they use them only to order a
//! world's events, and that order is preserved.
//!
//! An interrupted import leaves a prefix of each target partition (the producer
//! stops at the first failure rather than leave a gap); delete the target
//! topics and import again.

mod export;
mod format;
mod import;
pub mod plan;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worldline_schemas::Family;

use crate::config::{KafkaSettings, TopicSettings};
use crate::topics::TopicError;

pub use format::{
    AVRO_SCHEMA, ArchivedHeader, ArchivedRecord, FORMAT, MANIFEST_FILE, Manifest,
    ManifestPartition, ManifestTopic, metadata_keys, partition_file_name, read_manifest,
    read_records,
};
pub use plan::{ExportRange, OffsetRange, OffsetSelection, RangeSyntaxError, parse_time_bound};

/// What to export, and where to.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Directory to write the archive into; created if missing, and it must be
    /// empty.
    pub dir: PathBuf,
    /// Families whose topics are exported; empty means every family.
    pub families: Vec<Family>,
    /// Which records of each topic.
    pub range: ExportRange,
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// An archive directory written by [`export`].
    pub dir: PathBuf,
    /// Append even to target topics that already hold records. Off by default:
    /// appending an archive twice, or into a live deployment, doubles events in
    /// the log (projectors deduplicate by event id, but the log itself keeps both).
    pub allow_non_empty: bool,
}

/// Progress of an export or import, reported a few times a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArchiveProgress {
    /// Records written to files (export) or acknowledged by Kafka (import).
    pub records_done: u64,
    /// Records the whole run will handle (for an export, the size of the
    /// planned offset ranges).
    pub records_total: u64,
    /// Kafka bytes (keys, values, headers) handled so far.
    pub payload_bytes: u64,
    /// Time since the run started.
    pub elapsed: Duration,
}

/// Progress of [`export`].
pub type ExportProgress = ArchiveProgress;
/// Progress of [`import`].
pub type ImportProgress = ArchiveProgress;

impl ArchiveProgress {
    /// Records per second so far.
    pub fn records_per_second(&self) -> f64 {
        plan::per_second(self.records_done, self.elapsed)
    }

    /// Kafka payload bytes per second so far.
    pub fn bytes_per_second(&self) -> f64 {
        plan::per_second(self.payload_bytes, self.elapsed)
    }

    /// Time left at the rate so far.
    pub fn eta(&self) -> Option<Duration> {
        plan::eta(self.records_done, self.records_total, self.elapsed)
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The archive directory.
    pub dir: PathBuf,
    /// Its manifest, as written.
    pub manifest: Manifest,
    /// Kafka bytes archived (keys, values, header names and values).
    pub payload_bytes: u64,
    /// How long the export took.
    pub elapsed: Duration,
}

impl ExportReport {
    /// Records archived.
    pub fn records(&self) -> u64 {
        self.manifest.records
    }

    /// Total size of the Avro files.
    pub fn file_bytes(&self) -> u64 {
        self.manifest.file_bytes()
    }

    /// Kafka payload bytes per byte of archive.
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.payload_bytes, self.file_bytes())
    }
}

/// What an import appended.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Records appended and acknowledged.
    pub records: u64,
    /// Per target topic.
    pub topics: Vec<ImportedTopic>,
    /// Kafka bytes appended (keys, values, header names and values).
    pub payload_bytes: u64,
    /// Size of the Avro files read.
    pub file_bytes: u64,
    /// How long the import took.
    pub elapsed: Duration,
}

/// One target topic of an import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedTopic {
    /// The family.
    pub family: Family,
    /// Full target topic name (current prefix).
    pub topic: String,
    /// Records appended to it.
    pub records: u64,
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("Kafka request failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: Avro: {source}")]
    Avro {
        path: PathBuf,
        source: Box<apache_avro::Error>,
    },
    #[error("{path}: manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{dir} is not empty; an archive goes into a new or empty directory so it is never mixed with another"
    )]
    DirectoryNotEmpty { dir: PathBuf },
    #[error(
        "{dir} has no manifest.json: not an archive, or an export that did not finish; export again"
    )]
    NoManifest { dir: PathBuf },
    #[error("archive format {found:?} is not supported (this build reads {FORMAT:?})")]
    UnsupportedFormat { found: String },
    #[error("source topic {topic} does not exist")]
    MissingTopic { topic: String },
    #[error("the archive names an unknown event family {name:?}")]
    UnknownFamily { name: String },
    #[error(
        "target topic {topic} already holds {records} records; importing would mix the archive \
         with them. Import into a fresh prefix or empty topics, or pass allow_non_empty \
         (`--allow-non-empty`) to append anyway"
    )]
    TargetNotEmpty { topic: String, records: i64 },
    #[error(
        "target topic {topic} has message.timestamp.type={actual}; the broker would overwrite \
         the archived timestamps. Set it to CreateTime first"
    )]
    TimestampsNotKept { topic: String, actual: String },
    #[error("Kafka did not acknowledge an archived record: {0}")]
    Delivery(rdkafka::error::KafkaError),
    #[error("interrupted")]
    Cancelled,
    #[error("archive worker failed: {0}")]
    Worker(String),
}

/// Writes the chosen topics' records to an archive directory; see the module docs.
/// `progress` is called a few times a second and once at the end; `shutdown`
/// stops the export early with [`ArchiveError::Cancelled`], leaving the
/// directory without a manifest.
pub async fn export(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    request: ExportRequest,
    progress: &(dyn Fn(ExportProgress) + Send + Sync),
    shutdown: CancellationToken,
) -> Result<ExportReport, ArchiveError> {
    let kafka = kafka.clone();
    let prefix = topics.prefix.clone();
    with_progress(progress, move |report| {
        export::run(&kafka, &prefix, &request, report, &shutdown)
    })
    .await
}

/// Appends an archive to the current prefix's event topics; see the module docs.
/// Creates missing topics, refuses non-empty ones unless allowed, and returns
/// once Kafka has acknowledged every record.
pub async fn import(
    kafka: &KafkaSettings,
    topics: &TopicSettings,
    request: ImportRequest,
    progress: &(dyn Fn(ImportProgress) + Send + Sync),
    shutdown: CancellationToken,
) -> Result<ImportReport, ArchiveError> {
    let manifest = read_manifest(&request.dir)?;
    let targets = import::prepare_targets(kafka, topics, &manifest).await?;
    let kafka = kafka.clone();
    with_progress(progress, move |report| {
        import::run(&kafka, &request, &manifest, &targets, report, &shutdown)
    })
    .await
}

/// Runs blocking archive work (librdkafka polling, file I/O, Avro) on the
/// blocking pool and relays its progress to `progress` on this task, so the
/// callback need not be `'static` and the runtime's workers never block.
async fn with_progress<T, F>(
    progress: &(dyn Fn(ArchiveProgress) + Send + Sync),
    work: F,
) -> Result<T, ArchiveError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Fn(ArchiveProgress)) -> Result<T, ArchiveError> + Send + 'static,
{
    let (sender, mut receiver) = watch::channel(None::<ArchiveProgress>);
    let task = tokio::task::spawn_blocking(move || {
        work(&|update| {
            sender.send_replace(Some(update));
        })
    });
    // Ends when the work returns (or panics) and drops the sender; a value sent
    // just before that is still delivered first.
    while receiver.changed().await.is_ok() {
        let update = *receiver.borrow_and_update();
        if let Some(update) = update {
            progress(update);
        }
    }
    task.await
        .map_err(|error| ArchiveError::Worker(error.to_string()))?
}

/// The chosen families in a stable order, every family when none is chosen.
fn chosen_families(families: &[Family]) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|family| families.is_empty() || families.contains(family))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_families_when_chosen_then_every_family_is_exported_in_a_stable_order() {
        assert_eq!(chosen_families(&[]), Family::ALL.to_vec());
        assert_eq!(
            chosen_families(&[Family::Story, Family::Clock, Family::Story]),
            vec![Family::Clock, Family::Story]
        );
    }

    #[test]
    fn given_sizes_when_a_ratio_is_taken_then_an_empty_archive_has_none() {
        assert_eq!(ratio(10, 4), 2.5);
        assert_eq!(ratio(10, 0), 0.0);
    }
}
