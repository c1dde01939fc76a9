//! The archive on disk: the Avro record schema, the files, and `manifest.json`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use apache_avro::{Codec, Reader, Schema, Writer, ZstandardSettings};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ArchiveError;
use super::plan::ExportRange;

/// Version of the archive layout, in `manifest.json` and every file's metadata.
/// Import refuses other versions rather than guess.
pub const FORMAT: &str = "worldline-archive/1";

/// Name of the manifest in an archive directory. It is written last: a
/// directory without it is an export that did not finish.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The Avro schema of one archived Kafka record (see the module docs).
pub const AVRO_SCHEMA: &str = r#"{
  "type": "record",
  "name": "ArchivedRecord",
  "namespace": "worldline.archive.v1",
  "doc": "One Kafka record of a worldline event topic, byte for byte.",
  "fields": [
    {"name": "topic", "type": "string",
     "doc": "Source topic without the deployment prefix, e.g. worldline.clock.v1 (names the family)."},
    {"name": "partition", "type": "int", "doc": "Source partition."},
    {"name": "offset", "type": "long", "doc": "Offset in the source partition."},
    {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"},
     "doc": "Record timestamp (CreateTime on event topics), Unix milliseconds; -1 if the record had none."},
    {"name": "key", "type": ["null", "bytes"], "doc": "Record key: the world id in UTF-8."},
    {"name": "headers", "type": {"type": "array", "items": {
      "type": "record", "name": "Header", "fields": [
        {"name": "key", "type": "string"},
        {"name": "value", "type": ["null", "bytes"]}
      ]}},
     "doc": "Record headers in their original order (CloudEvents ce_*, traceparent, ...)."},
    {"name": "value", "type": ["null", "bytes"],
     "doc": "Record value: the protobuf worldline.v1.Envelope exactly as it was in Kafka."}
  ]
}"#;

/// Records per Avro block before compression. Large blocks compress far better
/// than the crate's 16 kB default (headers and field names repeat across
/// records) at a bounded cost in memory: one block per open file.
const BLOCK_SIZE: usize = 1024 * 1024;

/// zstd level 3 (zstd's own default): most of the ratio of higher levels at a
/// fraction of their CPU, which matters on a two-core machine.
const ZSTD_LEVEL: u8 = 3;

/// An archived record as written: borrowed from the Kafka message, no copies.
// Named as in the schema: the schema-aware serializer matches record names.
#[derive(Debug, Serialize)]
#[serde(rename = "ArchivedRecord")]
pub(crate) struct RecordOut<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    #[serde(with = "apache_avro::serde::slice_opt")]
    pub key: Option<&'a [u8]>,
    pub headers: Vec<HeaderOut<'a>>,
    #[serde(with = "apache_avro::serde::slice_opt")]
    pub value: Option<&'a [u8]>,
}

/// A header as written.
#[derive(Debug, Serialize)]
#[serde(rename = "Header")]
pub(crate) struct HeaderOut<'a> {
    pub key: &'a str,
    #[serde(with = "apache_avro::serde::slice_opt")]
    pub value: Option<&'a [u8]>,
}

/// One archived Kafka record, as read back from an archive file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ArchivedRecord {
    /// Source topic without the prefix, e.g. `worldline.clock.v1`.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Offset in the source partition.
    pub offset: i64,
    /// Record timestamp, Unix milliseconds; -1 if there was none.
    pub timestamp: i64,
    /// Record key (the world id).
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    /// Headers in their original order.
    pub headers: Vec<ArchivedHeader>,
    /// The protobuf envelope, untouched.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub value: Option<Vec<u8>>,
}

/// One record header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename = "Header")] // the schema's record name; the deserializer checks it
pub struct ArchivedHeader {
    /// Header name.
    pub key: String,
    /// Header value; `None` is a null header, distinct from an empty one.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub value: Option<Vec<u8>>,
}

/// `manifest.json`: what an archive holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// When the export finished.
    pub created_at: DateTime<Utc>,
    /// Version of the worldline build that wrote it.
    pub worldline_version: String,
    /// Topic prefix of the source deployment (informational; import writes to
    /// its own prefix).
    pub source_prefix: String,
    /// The range that was asked for.
    pub range: ExportRange,
    /// Records in the archive.
    pub records: u64,
    /// Per topic.
    pub topics: Vec<ManifestTopic>,
}

/// One exported topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTopic {
    /// The family (`clock`, `weather`, ...).
    pub family: String,
    /// Topic name without the prefix, as in every record's `topic` field.
    pub topic: String,
    /// Partitions the source topic had.
    pub source_partitions: i32,
    /// Records exported from it.
    pub records: u64,
    /// The exported partitions.
    pub partitions: Vec<ManifestPartition>,
}

/// One exported partition: one Avro file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPartition {
    /// Source partition.
    pub partition: i32,
    /// First offset of the exported range.
    pub start_offset: i64,
    /// End (exclusive) of the exported range.
    pub end_offset: i64,
    /// Records in the file (fewer than `end - start` only if the log has gaps).
    pub records: u64,
    /// Offset of the first record, if any.
    pub first_offset: Option<i64>,
    /// Offset of the last record, if any.
    pub last_offset: Option<i64>,
    /// Timestamp of the first record, Unix milliseconds.
    pub first_timestamp_ms: Option<i64>,
    /// Timestamp of the last record, Unix milliseconds.
    pub last_timestamp_ms: Option<i64>,
    /// File name, relative to the archive directory.
    pub file: String,
    /// File size in bytes.
    pub file_bytes: u64,
}

impl Manifest {
    /// Total size of the archive's Avro files.
    pub fn file_bytes(&self) -> u64 {
        self.topics
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.file_bytes)
            .sum()
    }
}

/// The parsed [`AVRO_SCHEMA`].
pub fn avro_schema() -> Result<Schema, ArchiveError> {
    Schema::parse_str(AVRO_SCHEMA).map_err(|source| ArchiveError::Avro {
        path: PathBuf::from("<schema>"),
        source: Box::new(source),
    })
}

/// The file of one partition: `<family>-p<partition>.avro`.
pub fn partition_file_name(family: &str, partition: i32) -> String {
    format!("{family}-p{partition:04}.avro")
}

/// Makes `dir` ready to receive an archive: created if missing, and refused if
/// it already holds anything (an archive is never mixed with another).
pub fn prepare_directory(dir: &Path) -> Result<(), ArchiveError> {
    let io_error = |source| ArchiveError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let mut entries = std::fs::read_dir(dir).map_err(io_error)?;
    if entries.next().is_some() {
        return Err(ArchiveError::DirectoryNotEmpty {
            dir: dir.to_owned(),
        });
    }
    Ok(())
}

/// Writes `manifest.json` (last step of an export).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), ArchiveError> {
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(manifest).map_err(|source| ArchiveError::Manifest {
        path: path.clone(),
        source,
    })?;
    let io_error = |source| ArchiveError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::create(&path).map_err(io_error)?;
    file.write_all(&text).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

/// Reads and checks `manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ArchiveError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(ArchiveError::NoManifest {
                dir: dir.to_owned(),
            });
        }
        Err(source) => return Err(ArchiveError::Io { path, source }),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| ArchiveError::Manifest {
            path: path.clone(),
            source,
        })?;
    if manifest.format != FORMAT {
        return Err(ArchiveError::UnsupportedFormat {
            found: manifest.format,
        });
    }
    Ok(manifest)
}

/// `Write` whose every `write` writes the whole buffer. The Avro writer hands
/// whole compressed blocks to `write` and ignores short writes; a partial write
/// would silently cut a block, so it is completed here.
#[derive(Debug)]
pub(crate) struct WriteWhole<W: Write>(pub W);

impl<W: Write> Write for WriteWhole<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The Avro file of one partition being written.
pub(crate) type AvroFileWriter<'s> = Writer<'s, WriteWhole<BufWriter<File>>>;

/// Opens a partition's file for writing, with the archive's metadata in its
/// header (Avro readers show it; import checks it).
pub(crate) fn create_partition_file<'s>(
    schema: &'s Schema,
    path: &Path,
    metadata: &[(&str, String)],
) -> Result<AvroFileWriter<'s>, ArchiveError> {
    let file = File::create(path).map_err(|source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    })?;
    let avro_error = |source| ArchiveError::Avro {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let mut writer = Writer::builder()
        .schema(schema)
        .writer(WriteWhole(BufWriter::with_capacity(BLOCK_SIZE, file)))
        .codec(Codec::Zstandard(ZstandardSettings::new(ZSTD_LEVEL)))
        .block_size(BLOCK_SIZE)
        // Plain bytes and numbers either way; fixed so output never depends on a
        // process-wide default.
        .human_readable(false)
        .build()
        .map_err(avro_error)?;
    for (key, value) in metadata {
        writer
            .add_user_metadata((*key).to_owned(), value.as_bytes())
            .map_err(avro_error)?;
    }
    Ok(writer)
}

/// Flushes and closes a partition's file, durably; returns its size.
pub(crate) fn finish_partition_file(
    writer: AvroFileWriter<'_>,
    path: &Path,
) -> Result<u64, ArchiveError> {
    let io_error = |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    };
    let WriteWhole(buffered) = writer.into_inner().map_err(|source| ArchiveError::Avro {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    let file = buffered
        .into_inner()
        .map_err(|error| io_error(error.into_error()))?;
    // An archive is often the only copy kept somewhere else: make it durable
    // before the manifest says it is complete.
    file.sync_all().map_err(io_error)?;
    Ok(file.metadata().map_err(io_error)?.len())
}

/// Metadata keys every archive file carries.
pub mod metadata_keys {
    /// [`super::FORMAT`].
    pub const FORMAT: &str = "worldline.archive.format";
    /// Source topic without the prefix.
    pub const TOPIC: &str = "worldline.archive.topic";
    /// Source partition.
    pub const PARTITION: &str = "worldline.archive.partition";
    /// Start of the exported range.
    pub const START_OFFSET: &str = "worldline.archive.start_offset";
    /// End (exclusive) of the exported range.
    pub const END_OFFSET: &str = "worldline.archive.end_offset";
    /// Version of the worldline build.
    pub const VERSION: &str = "worldline.version";
}

/// Opens an archive file and checks that it is one: the record schema must be
/// [`AVRO_SCHEMA`] and the format metadata [`FORMAT`]. Iterate the result for
/// the records in file (= offset) order.
pub fn read_records(
    path: &Path,
) -> Result<impl Iterator<Item = Result<ArchivedRecord, ArchiveError>> + use<>, ArchiveError> {
    let file = File::open(path).map_err(|source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    })?;
    let avro_error = |source| ArchiveError::Avro {
        path: path.to_owned(),
        source: Box::new(source),
    };
    let reader = Reader::builder(BufReader::with_capacity(BLOCK_SIZE, file))
        .human_readable(false)
        .build()
        .map_err(avro_error)?;
    check_archive_file(path, reader.writer_schema(), reader.user_metadata())?;
    let path = path.to_owned();
    Ok(reader
        .into_deser_iter::<ArchivedRecord>()
        .map(move |record| {
            record.map_err(|source| ArchiveError::Avro {
                path: path.clone(),
                source: Box::new(source),
            })
        }))
}

fn check_archive_file(
    path: &Path,
    schema: &Schema,
    metadata: &HashMap<String, Vec<u8>>,
) -> Result<(), ArchiveError> {
    let corrupt = |reason: String| ArchiveError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let format = metadata
        .get(metadata_keys::FORMAT)
        .map(|v| String::from_utf8_lossy(v).into_owned());
    if format.as_deref() != Some(FORMAT) {
        return Err(corrupt(format!(
            "not a {FORMAT} file (format metadata {format:?})"
        )));
    }
    let expected = avro_schema()?;
    // Parsing Canonical Form: the same records whatever the docs or whitespace.
    if schema.canonical_form() != expected.canonical_form() {
        return Err(corrupt(
            "its record schema is not worldline.archive.v1.ArchivedRecord".to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "worldline-archive-{name}-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn given_the_schema_text_when_parsed_then_it_is_a_record_with_every_documented_field() {
        let schema = avro_schema().unwrap();
        let Schema::Record(record) = &schema else {
            panic!("not a record: {schema:?}");
        };
        let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "topic",
                "partition",
                "offset",
                "timestamp",
                "key",
                "headers",
                "value"
            ]
        );
    }

    #[test]
    fn given_records_with_nulls_and_empties_when_written_and_read_then_every_byte_comes_back() {
        let dir = scratch_dir("roundtrip");
        let path = dir.join(partition_file_name("clock", 3));
        let schema = avro_schema().unwrap();
        let mut writer = create_partition_file(
            &schema,
            &path,
            &[(metadata_keys::FORMAT, FORMAT.to_owned())],
        )
        .unwrap();
        let value = vec![0u8, 1, 2, 255];
        writer
            .append_ser(RecordOut {
                topic: "worldline.clock.v1",
                partition: 3,
                offset: 41,
                timestamp: 1_700_000_000_123,
                key: Some(b"w-1"),
                headers: vec![
                    HeaderOut {
                        key: "ce_id",
                        value: Some(b"abc"),
                    },
                    HeaderOut {
                        key: "empty",
                        value: Some(b""),
                    },
                    HeaderOut {
                        key: "null",
                        value: None,
                    },
                ],
                value: Some(&value),
            })
            .unwrap();
        writer
            .append_ser(RecordOut {
                topic: "worldline.clock.v1",
                partition: 3,
                offset: 42,
                timestamp: -1,
                key: None,
                headers: vec![],
                value: None,
            })
            .unwrap();
        let bytes = finish_partition_file(writer, &path).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());

        let records: Vec<ArchivedRecord> = read_records(&path)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].key.as_deref(), Some(&b"w-1"[..]));
        assert_eq!(records[0].value.as_deref(), Some(&value[..]));
        assert_eq!(records[0].timestamp, 1_700_000_000_123);
        assert_eq!(
            records[0].headers,
            vec![
                ArchivedHeader {
                    key: "ce_id".to_owned(),
                    value: Some(b"abc".to_vec())
                },
                ArchivedHeader {
                    key: "empty".to_owned(),
                    value: Some(vec![])
                },
                ArchivedHeader {
                    key: "null".to_owned(),
                    value: None
                },
            ]
        );
        assert_eq!(records[1].key, None);
        assert_eq!(records[1].value, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn given_an_empty_partition_when_its_file_is_finished_then_it_is_a_valid_file_without_records()
    {
        let dir = scratch_dir("empty");
        let path = dir.join(partition_file_name("story", 0));
        let schema = avro_schema().unwrap();
        let writer = create_partition_file(
            &schema,
            &path,
            &[(metadata_keys::FORMAT, FORMAT.to_owned())],
        )
        .unwrap();
        finish_partition_file(writer, &path).unwrap();
        assert_eq!(read_records(&path).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn given_an_avro_file_of_another_kind_when_opened_then_it_is_refused() {
        let dir = scratch_dir("foreign");
        let path = dir.join("other.avro");
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"X","fields":[{"name":"a","type":"int"}]}"#,
        )
        .unwrap();
        let mut writer = Writer::new(&schema, File::create(&path).unwrap()).unwrap();
        writer
            .add_user_metadata(metadata_keys::FORMAT.to_owned(), FORMAT)
            .unwrap();
        writer.flush().unwrap();
        drop(writer);
        let error = read_records(&path).err().unwrap();
        assert!(matches!(error, ArchiveError::Corrupt { .. }), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn given_a_directory_with_files_when_prepared_for_an_export_then_it_is_refused() {
        let dir = scratch_dir("occupied");
        prepare_directory(&dir).unwrap();
        std::fs::write(dir.join("something"), b"x").unwrap();
        assert!(matches!(
            prepare_directory(&dir),
            Err(ArchiveError::DirectoryNotEmpty { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
