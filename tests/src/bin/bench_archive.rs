//! `bench_archive`: how fast the Avro archive exports and imports, measured on
//! the local stack in one run (`ops/bench/archive.sh`).
//!
//! It appends a mixed workload (`worldline_tests::workload`, every family,
//! redeliveries included) to a fresh topic prefix, exports every topic to a
//! scratch directory, imports the archive into a second fresh prefix, and
//! prints records/s, MB/s (of Kafka payload: keys, values and headers), file
//! sizes and the compression ratio. It asserts nothing, except that the import
//! appended as many records as were exported.
//!
//! Sizes come from the environment: `BENCH_EVENTS` (default 1000000),
//! `BENCH_WORLDS` (1000), `BENCH_PARTITIONS` (8 per topic), `BENCH_DIR` (where
//! the archive is written; default the system temp directory).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use worldline_ops::archive::{
    self, ArchiveProgress, ExportRange, ExportReport, ExportRequest, ImportReport, ImportRequest,
};
use worldline_producers::{Appender, AppenderOptions};
use worldline_tests::TestEnv;
use worldline_tests::bench::{append_workload, megabytes, number, per_second};

/// Events handed to one `append_batch` call while loading the backlog.
const APPEND_CHUNK: usize = 20_000;
/// How often a progress line is printed.
const PRINT_EVERY: Duration = Duration::from_secs(2);

/// What the run measures, from `BENCH_*` variables.
#[derive(Debug, Clone)]
struct BenchConfig {
    events: usize,
    worlds: usize,
    partitions: i32,
    dir: PathBuf,
}

impl BenchConfig {
    fn from_env() -> anyhow::Result<BenchConfig> {
        let lookup = |name: &str| std::env::var(name).ok();
        Ok(BenchConfig {
            events: number(lookup("BENCH_EVENTS"), "BENCH_EVENTS", 1_000_000)?,
            worlds: number(lookup("BENCH_WORLDS"), "BENCH_WORLDS", 1_000)?,
            partitions: i32::try_from(number(lookup("BENCH_PARTITIONS"), "BENCH_PARTITIONS", 8)?)?,
            dir: lookup("BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        })
    }
}

/// One progress line: done/total, percent, rate, ETA.
fn progress_line(label: &str, p: &ArchiveProgress) -> String {
    let percent = if p.records_total > 0 {
        100.0 * p.records_done as f64 / p.records_total as f64
    } else {
        100.0
    };
    let eta = p.eta().map_or_else(
        || "-".to_owned(),
        |eta| format!("{:.0} s", eta.as_secs_f64()),
    );
    format!(
        "  {label}: {}/{} records ({percent:.0}%), {:.0} records/s, {:.1} MB/s, ETA {eta}",
        p.records_done,
        p.records_total,
        p.records_per_second(),
        megabytes(p.payload_bytes) / p.elapsed.as_secs_f64().max(1e-9),
    )
}

/// A progress callback that prints at most every [`PRINT_EVERY`].
fn printer(label: &'static str) -> impl Fn(ArchiveProgress) + Send + Sync {
    let last = std::sync::Mutex::new(Instant::now());
    move |progress| {
        let mut last = match last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if last.elapsed() >= PRINT_EVERY {
            *last = Instant::now();
            eprintln!("{}", progress_line(label, &progress));
        }
    }
}

/// CPU seconds used so far by this process (every thread, librdkafka's
/// included) and by the broker, from `/proc/<pid>/stat`. On a shared two-core
/// machine wall-clock rates depend on whatever else runs; CPU per record does not.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSnapshot {
    own: f64,
    broker: Option<f64>,
}

/// Where the broker's pid is written by the stack script.
fn broker_pid() -> Option<u32> {
    let state = std::env::var("WORLDLINE_STATE").unwrap_or_else(|_| ".worldline".to_owned());
    std::fs::read_to_string(format!("{state}/run/kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// utime + stime of a process in seconds, from its `/proc/<pid>/stat` text.
/// Linux reports them in USER_HZ ticks, 100 per second on every architecture
/// Linux runs worldline on.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the parenthesised command name, which may contain spaces;
    // utime and stime are fields 14 and 15 of the whole line.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn cpu_snapshot(broker: Option<u32>) -> CpuSnapshot {
    let read = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| cpu_seconds(&stat))
    };
    CpuSnapshot {
        own: read("self").unwrap_or_default(),
        broker: broker.and_then(|pid| read(&pid.to_string())),
    }
}

/// "CPU: this process X µs/record (Y cores), broker Z µs/record".
fn cpu_line(before: CpuSnapshot, after: CpuSnapshot, records: u64, elapsed: Duration) -> String {
    let per_record = |seconds: f64| seconds * 1e6 / records.max(1) as f64;
    let own = after.own - before.own;
    let broker = after
        .broker
        .zip(before.broker)
        .map(|(a, b)| a - b)
        .map_or_else(
            || "broker not measured".to_owned(),
            |b| {
                format!(
                    "broker {:.1} µs/record ({:.2} cores)",
                    per_record(b),
                    per_second(b, elapsed)
                )
            },
        );
    format!(
        "  CPU: this process {:.1} µs/record ({:.2} cores busy), {broker}",
        per_record(own),
        per_second(own, elapsed)
    )
}

async fn append_backlog(env: &TestEnv, config: &BenchConfig) -> anyhow::Result<(u64, Duration)> {
    let appender = Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            ..AppenderOptions::default()
        },
    )?;
    append_workload(
        &appender,
        config.worlds,
        config.events,
        APPEND_CHUNK,
        |_, _| {},
    )
    .await
}

fn print_export(report: &ExportReport) {
    let records = report.records();
    let files = report.manifest.file_bytes();
    println!(
        "  exported {records} records in {:.2} s: {:.0} records/s, {:.1} MB/s of Kafka payload",
        report.elapsed.as_secs_f64(),
        per_second(records as f64, report.elapsed),
        per_second(megabytes(report.payload_bytes), report.elapsed),
    );
    println!(
        "  payload {:.1} MB -> {} files, {:.1} MB on disk: compression ratio {:.2}x, {:.1} bytes per record archived",
        megabytes(report.payload_bytes),
        report
            .manifest
            .topics
            .iter()
            .map(|t| t.partitions.len())
            .sum::<usize>(),
        megabytes(files),
        report.compression_ratio(),
        files as f64 / records.max(1) as f64,
    );
    for topic in &report.manifest.topics {
        let bytes: u64 = topic.partitions.iter().map(|p| p.file_bytes).sum();
        println!(
            "    {:<10} {:>9} records {:>9.2} MB ({:.1} bytes/record)",
            topic.family,
            topic.records,
            megabytes(bytes),
            bytes as f64 / topic.records.max(1) as f64,
        );
    }
}

fn print_import(report: &ImportReport) {
    println!(
        "  imported {} records in {:.2} s: {:.0} records/s, {:.1} MB/s of Kafka payload (reading {:.1} MB of archive)",
        report.records,
        report.elapsed.as_secs_f64(),
        per_second(report.records as f64, report.elapsed),
        per_second(megabytes(report.payload_bytes), report.elapsed),
        megabytes(report.file_bytes),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let config = BenchConfig::from_env()?;
    let source = TestEnv::new(config.partitions).await;
    let target = TestEnv::new(config.partitions).await;
    let dir = config.dir.join(format!(
        "worldline-bench-archive-{}",
        source.settings.topics.prefix.trim_end_matches('.')
    ));
    println!(
        "Archive benchmark: {} mixed events over {} worlds, {} partitions per topic, archive in {}",
        config.events,
        config.worlds,
        config.partitions,
        dir.display()
    );
    println!(
        "  (avro zstd level 3, 1 MiB blocks; one file per topic-partition; export and import \
         each on one blocking thread beside librdkafka's own threads)"
    );

    println!("\n1. Appending the backlog (Appender::append_batch, chunks of {APPEND_CHUNK})");
    let (appended, took) = append_backlog(&source, &config).await?;
    println!(
        "  appended {appended} events in {:.2} s ({:.0} events/s)",
        took.as_secs_f64(),
        per_second(appended as f64, took)
    );

    let broker = broker_pid();
    println!("\n2. Export: every topic, everything");
    let before = cpu_snapshot(broker);
    let export = archive::export(
        &source.settings.kafka,
        &source.settings.topics,
        ExportRequest {
            dir: dir.clone(),
            families: vec![],
            range: ExportRange::All,
        },
        &printer("export"),
        CancellationToken::new(),
    )
    .await?;
    print_export(&export);
    println!(
        "{}",
        cpu_line(
            before,
            cpu_snapshot(broker),
            export.records(),
            export.elapsed
        )
    );

    println!("\n3. Import into a fresh prefix (empty topics, same partition count)");
    let before = cpu_snapshot(broker);
    let import = archive::import(
        &target.settings.kafka,
        &target.settings.topics,
        ImportRequest {
            dir: dir.clone(),
            allow_non_empty: false,
        },
        &printer("import"),
        CancellationToken::new(),
    )
    .await?;
    print_import(&import);
    println!(
        "{}",
        cpu_line(before, cpu_snapshot(broker), import.records, import.elapsed)
    );
    if import.records != export.records() {
        bail!(
            "imported {} records but exported {}",
            import.records,
            export.records()
        );
    }

    println!("\nSummary");
    println!(
        "  export {:>9.0} records/s {:>7.1} MB/s",
        per_second(export.records() as f64, export.elapsed),
        per_second(megabytes(export.payload_bytes), export.elapsed)
    );
    println!(
        "  import {:>9.0} records/s {:>7.1} MB/s",
        per_second(import.records as f64, import.elapsed),
        per_second(megabytes(import.payload_bytes), import.elapsed)
    );
    println!(
        "  archive {:.1} MB for {:.1} MB of payload: {:.2}x",
        megabytes(export.file_bytes()),
        megabytes(export.payload_bytes),
        export.compression_ratio()
    );

    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    source.cleanup().await;
    target.cleanup().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn given_a_proc_stat_line_when_parsed_then_user_and_system_ticks_are_summed() {
        let stat = "42 (bench archive) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn given_progress_when_printed_then_percent_rate_and_eta_are_shown() {
        let line = progress_line(
            "export",
            &ArchiveProgress {
                records_done: 250,
                records_total: 1000,
                payload_bytes: 2_000_000,
                elapsed: Duration::from_secs(1),
            },
        );
        assert!(line.contains("250/1000 records (25%)"), "{line}");
        assert!(line.contains("250 records/s"), "{line}");
        assert!(line.contains("2.0 MB/s"), "{line}");
        assert!(line.contains("ETA 3 s"), "{line}");
    }
}
