//! Pieces the benchmark binaries (`src/bin/bench_*.rs`) share: their
//! `BENCH_*` numbers, rate arithmetic, and rows in PostgreSQL's binary `COPY`
//! format for the raw-`COPY` baselines they print beside the read models.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
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
}
