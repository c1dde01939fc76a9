//! Pieces the benchmark binaries (`src/bin/bench_*.rs`) share: their
//! `BENCH_*` numbers, rate arithmetic, and rows in PostgreSQL's binary `COPY`
//! format for the raw-`COPY` baselines they print beside the read models.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use uuid::Uuid;
use worldline_producers::Appender;

use crate::workload::Workload;

/// A positive whole number from a variable, or the default when unset.
pub fn number(raw: Option<String>, name: &str, default: usize) -> anyhow::Result<usize> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let value: usize = raw
        .trim()
        .parse()
        .with_context(|| format!("{name}={raw:?} is not a whole number"))?;
    if value == 0 {
        bail!("{name} must be positive");
    }
    Ok(value)
}

/// `amount` per second of `elapsed` (0 for no time at all).
pub fn per_second(amount: f64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 { amount / seconds } else { 0.0 }
}

/// Megabytes (10^6 bytes), as network and disk rates are quoted.
pub fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// Appends `events` events of a mixed workload over `worlds` worlds: every
/// world created first, as in a real log, then the mixed stream, generated
/// `chunk` events at a time so memory stays flat whatever the size.
/// `after_chunk` is told the events appended and the time taken so far.
/// Returns both, at the end.
pub async fn append_workload(
    appender: &Appender,
    worlds: usize,
    events: usize,
    chunk: usize,
    mut after_chunk: impl FnMut(u64, Duration),
) -> anyhow::Result<(u64, Duration)> {
    let mut workload = Workload::new(worlds, 42);
    let started = Instant::now();
    let target = events as u64;
    let mut batch = workload.creations();
    batch.truncate(events);
    let mut appended = 0;
    while appended < target {
        if batch.is_empty() {
            let left = usize::try_from(target - appended)?;
            batch = workload.next_batch(chunk.min(left));
        }
        for result in appender.append_batch(&batch).await {
            result?;
        }
        appended += batch.len() as u64;
        batch.clear();
        after_chunk(appended, started.elapsed());
    }
    Ok((appended, started.elapsed()))
}

/// One binary `COPY {table} ({columns}) FROM STDIN` of `payload`, which must
/// store `rows` rows; how long it took.
pub async fn timed_copy(
    pool: &PgPool,
    table: &str,
    columns: &str,
    payload: &[u8],
    rows: u64,
) -> anyhow::Result<Duration> {
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    if let Err(error) = copy.send(payload).await {
        copy.abort(error.to_string()).await?;
        return Err(error.into());
    }
    let copied = copy.finish().await?;
    let elapsed = started.elapsed();
    if copied != rows {
        bail!("COPY into {table} stored {copied} rows, expected {rows}");
    }
    Ok(elapsed)
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
pub const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Encodes rows in PostgreSQL's binary `COPY` format.
#[derive(Debug)]
pub struct BinaryCopy {
    buffer: Vec<u8>,
}

impl Default for BinaryCopy {
    fn default() -> BinaryCopy {
        BinaryCopy::new()
    }
}

impl BinaryCopy {
    /// The format's header; no rows yet.
    pub fn new() -> BinaryCopy {
        let mut buffer = Vec::with_capacity(1 << 20);
        buffer.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buffer.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buffer.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        BinaryCopy { buffer }
    }

    /// Starts a row of `fields` columns, each then written in table order.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buffer.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // Fields here are ids and short names; a length beyond i32 cannot occur.
        let length = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(bytes);
        self
    }

    pub fn uuid(&mut self, id: Uuid) -> &mut Self {
        self.field(id.as_bytes())
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    /// A `timestamptz` from milliseconds since the Unix epoch.
    pub fn timestamptz_ms(&mut self, unix_ms: i64) -> &mut Self {
        self.int8(unix_ms * 1000 - POSTGRES_EPOCH_US)
    }

    /// `jsonb` from JSON text.
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        // jsonb's binary form is a version byte (1) and the JSON text.
        let mut bytes = Vec::with_capacity(json.len() + 1);
        bytes.push(1);
        bytes.extend_from_slice(json.as_bytes());
        self.field(&bytes)
    }

    /// The payload of one `COPY … FROM STDIN (FORMAT binary)`: the rows and
    /// the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buffer.extend_from_slice(&(-1i16).to_be_bytes());
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn given_unset_or_bad_variables_when_read_then_defaults_apply_and_nonsense_is_refused() {
        assert_eq!(number(None, "X", 7).unwrap(), 7);
        assert_eq!(number(Some(" 12 ".to_owned()), "X", 7).unwrap(), 12);
        assert!(number(Some("0".to_owned()), "X", 7).is_err());
        assert!(number(Some("lots".to_owned()), "X", 7).is_err());
    }

    #[test]
    fn given_rows_when_encoded_for_binary_copy_then_header_fields_and_trailer_follow_the_format() {
        let mut copy = BinaryCopy::new();
        copy.row(2).int4(7).timestamptz_ms(946_684_800_000);
        let bytes = copy.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn given_json_when_encoded_as_jsonb_then_the_version_byte_comes_first() {
        let mut copy = BinaryCopy::new();
        copy.row(1).jsonb("{}");
        let bytes = copy.finish();
        assert_eq!(&bytes[19..28], &[0, 1, 0, 0, 0, 3, 1, b'{', b'}']);
    }
}
