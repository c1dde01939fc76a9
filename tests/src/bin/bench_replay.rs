//! `bench_replay`: how fast `worldline replay` rebuilds the read models from the
//! log, beside PostgreSQL's raw binary `COPY` on the same server, in one run on
//! the local stack (`ops/bench/replay.sh`).
//!
//! For each size of `BENCH_EVENTS_LIST` (default 1M, then 10M) it:
//! 1. appends a mixed workload (`worldline_tests::workload`: every family,
//!    redeliveries included) to a fresh topic prefix, in chunks, so memory stays
//!    flat whatever the size;
//! 2. measures one binary `COPY` of inference-log rows into a table built by the
//!    inference read model's own migrations (key and indexes included) and into
//!    an index-free heap of the same columns;
//! 3. rebuilds each projector alone from offset zero through the library path
//!    `worldline replay` uses (`Rebuild::replay`: shadow schema, then swap);
//! 4. rebuilds every projector together (`replay_together`, what
//!    `worldline replay --all` runs), again from offset zero, while the schemas
//!    built in step 3 serve as the live ones being replaced;
//! 5. on the first size only (`BENCH_ARCHIVE=first`, or `all`, `none`): exports
//!    every topic to an Avro archive and imports it into a second fresh prefix.
//!
//! It prints figures and asserts nothing. Databases, topics and the archive
//! directory are dropped at the end, failed, interrupted or not.
//!
//! Other knobs: `BENCH_WORLDS` (1000), `BENCH_PARTITIONS` (8 per topic),
//! `BENCH_COPY_ROWS` (1000000), `BENCH_ALONE` (1; 0 skips step 3),
//! `BENCH_PROJECTORS` (comma list; default every projector), `BENCH_DIR`
//! (where the archive goes; default the system temp directory).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worldline_ops::Settings;
use worldline_ops::archive::{self, ExportRange, ExportRequest, ImportRequest};
use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::read_models::copy::{self, BinaryRows};
use worldline_projectors::replay::{Progress, Rebuild, replay_together};
use worldline_projectors::{Projector, SchemaName, registry};
use worldline_tests::TestEnv;
use worldline_tests::bench::{append_workload, megabytes, number, per_second, timed_copy};

/// Events handed to one `append_batch` call while loading the backlog.
const APPEND_CHUNK: usize = 20_000;
/// How often a progress line is printed.
const PRINT_EVERY: Duration = Duration::from_secs(5);
/// The goal: this many events rebuilt within [`GOAL_SECONDS`].
const GOAL_EVENTS: u64 = 10_000_000;
const GOAL_SECONDS: f64 = 60.0;
/// Disk a run may need per appended event: the log (about 150 bytes a record
/// with batch overhead), the read models rebuilt twice side by side (rows,
/// keys, indexes, WAL), generously rounded up.
const DISK_BYTES_PER_EVENT: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveRuns {
    First,
    All,
    None,
}

/// What the run measures, from `BENCH_*` variables.
#[derive(Debug, Clone)]
struct BenchConfig {
    sizes: Vec<usize>,
    worlds: usize,
    partitions: i32,
    copy_rows: usize,
    alone: bool,
    projectors: Vec<String>,
    archive: ArchiveRuns,
    dir: PathBuf,
}

impl BenchConfig {
    fn from_env() -> anyhow::Result<BenchConfig> {
        let lookup = |name: &str| std::env::var(name).ok();
        let sizes = match lookup("BENCH_EVENTS_LIST") {
            Some(raw) => parse_sizes(&raw)?,
            None => vec![1_000_000, 10_000_000],
        };
        let projectors: Vec<String> = match lookup("BENCH_PROJECTORS") {
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => registry::all()
                .iter()
                .map(|p| p.name().to_owned())
                .collect(),
        };
        for name in &projectors {
            if registry::by_name(name).is_none() {
                bail!("BENCH_PROJECTORS: unknown projector {name:?}");
            }
        }
        let archive = match lookup("BENCH_ARCHIVE").as_deref().map(str::trim) {
            None | Some("first") => ArchiveRuns::First,
            Some("all") => ArchiveRuns::All,
            Some("none") => ArchiveRuns::None,
            Some(other) => bail!("BENCH_ARCHIVE={other:?}: expected first, all or none"),
        };
        Ok(BenchConfig {
            sizes,
            worlds: number(lookup("BENCH_WORLDS"), "BENCH_WORLDS", 1_000)?,
            partitions: i32::try_from(number(lookup("BENCH_PARTITIONS"), "BENCH_PARTITIONS", 8)?)?,
            copy_rows: number(lookup("BENCH_COPY_ROWS"), "BENCH_COPY_ROWS", 1_000_000)?,
            alone: lookup("BENCH_ALONE").is_none_or(|v| v.trim() != "0"),
            projectors,
            archive,
            dir: lookup("BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        })
    }
}

/// `1000000,10000000` (underscores allowed) into sizes.
fn parse_sizes(raw: &str) -> anyhow::Result<Vec<usize>> {
    let sizes = raw
        .split(',')
        .map(|item| number(Some(item.replace('_', "")), "BENCH_EVENTS_LIST", 0))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if sizes.is_empty() {
        bail!("BENCH_EVENTS_LIST is empty");
    }
    Ok(sizes)
}

// ---------------------------------------------------------------------------
// Everything the run creates, dropped whatever happens
// ---------------------------------------------------------------------------

/// Test stacks and directories created so far; [`Created::drop_all`] removes them.
#[derive(Debug, Default)]
struct Created {
    envs: Vec<TestEnv>,
    dirs: Vec<PathBuf>,
}

type Shared = Arc<Mutex<Created>>;

fn locked(created: &Shared) -> std::sync::MutexGuard<'_, Created> {
    created
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh stack slice, registered for cleanup before anything is written to it.
async fn new_env(created: &Shared, partitions: i32) -> (usize, Settings) {
    let env = TestEnv::new(partitions).await;
    let settings = env.settings.clone();
    let mut created = locked(created);
    created.envs.push(env);
    (created.envs.len() - 1, settings)
}

fn pool_of(created: &Shared, index: usize) -> PgPool {
    locked(created).envs[index].pool.clone()
}

async fn drop_all(created: &Shared) {
    let (envs, dirs) = {
        let mut created = locked(created);
        (
            std::mem::take(&mut created.envs),
            std::mem::take(&mut created.dirs),
        )
    };
    for dir in dirs {
        if dir.exists()
            && let Err(error) = std::fs::remove_dir_all(&dir)
        {
            eprintln!("could not remove {}: {error}", dir.display());
        }
    }
    for env in envs {
        env.cleanup().await;
    }
}

// ---------------------------------------------------------------------------
// Disk, CPU and load
// ---------------------------------------------------------------------------

/// Free bytes on the filesystem holding `path`, from `df -Pk`.
fn free_bytes(path: &str) -> Option<u64> {
    let output = std::process::Command::new("df")
        .args(["-Pk", path])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().nth(1)?;
    let available_kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kib * 1024)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| {
            let fields: Vec<&str> = text.split_whitespace().take(3).collect();
            (fields.len() == 3).then(|| fields.join(" "))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Busy and total jiffies of the whole machine, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// utime + stime of this process, in jiffies.
fn own_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU of the machine and of this process over a phase, in cores (of 100
/// jiffies per second each): on two shared cores every rate depends on it.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    machine: Option<(u64, u64)>,
    own: Option<u64>,
    at: Instant,
}

impl CpuMark {
    fn now() -> CpuMark {
        CpuMark {
            machine: machine_ticks(),
            own: own_ticks(),
            at: Instant::now(),
        }
    }

    fn since(self) -> String {
        let after = CpuMark::now();
        let seconds = after.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let machine = match (self.machine, after.machine) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
                format!(
                    "{:.2} cores busy",
                    cores * (b1 - b0) as f64 / (t1 - t0) as f64
                )
            }
            _ => "unknown".to_owned(),
        };
        let own = match (self.own, after.own) {
            (Some(a), Some(b)) => format!("{:.2} cores", (b - a) as f64 / 100.0 / seconds),
            _ => "unknown".to_owned(),
        };
        format!("CPU: machine {machine}, this process (Kafka reads, decoding, encoding) {own}")
    }
}

// ---------------------------------------------------------------------------
// 1. The backlog
// ---------------------------------------------------------------------------

async fn append_backlog(
    settings: &Settings,
    config: &BenchConfig,
    events: usize,
) -> anyhow::Result<(u64, Duration)> {
    let appender = Appender::new(
        &settings.kafka,
        AppenderOptions {
            topic_prefix: settings.topics.prefix.clone(),
            ..AppenderOptions::default()
        },
    )?;
    let mut last_print = Instant::now();
    append_workload(
        &appender,
        config.worlds,
        events,
        APPEND_CHUNK,
        |appended, elapsed| {
            if last_print.elapsed() >= PRINT_EVERY {
                last_print = Instant::now();
                eprintln!(
                    "  appending: {appended}/{events} ({:.0} events/s)",
                    per_second(appended as f64, elapsed)
                );
            }
        },
    )
    .await
}

/// Records in the log of each family topic of `settings`.
fn log_records(env_settings: &Settings, created: &Shared, index: usize) -> BTreeMap<String, i64> {
    let created = locked(created);
    let env = &created.envs[index];
    worldline_schemas::Family::ALL
        .iter()
        .map(|family| {
            let topic = family.topic(&env_settings.topics.prefix);
            let records: i64 = env.high_watermarks(&topic).values().sum();
            (topic, records)
        })
        .collect()
}

/// Records a projector has to read: the sum over the topics of its families.
fn records_for(projector: &dyn Projector, settings: &Settings, log: &BTreeMap<String, i64>) -> i64 {
    projector
        .families()
        .iter()
        .map(|f| {
            log.get(&f.topic(&settings.topics.prefix))
                .copied()
                .unwrap_or(0)
        })
        .sum()
}

// ---------------------------------------------------------------------------
// 2. Raw binary COPY
// ---------------------------------------------------------------------------

const INFERENCE_COLUMNS: &str = "event_id, world_id, tick, occurred_at, model_id, model_version, \
     purpose, prompt_tokens, completion_tokens, latency_ms, cost_micro_usd, outcome, npc_id, input_hash";

/// `rows` inference-log rows shaped like the workload's (time-ordered ids, a
/// thousand worlds), encoded before the clock starts.
fn inference_rows(rows: usize, worlds: usize) -> Vec<u8> {
    let mut copy = BinaryRows::new();
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let now_us = unix_us - copy::POSTGRES_EPOCH_US;
    for n in 0..rows {
        let i64n = i64::try_from(n).unwrap_or(i64::MAX);
        let roll = i32::try_from(n % 100).unwrap_or(0);
        copy.row(14)
            .uuid(Uuid::now_v7())
            .text(&format!("w-{:03}", n % worlds.max(1)))
            .int8(i64n / 1000)
            .int8(now_us + i64n)
            .text("npc-chat")
            .text("1")
            .text("npc_dialogue")
            .int4(200 + roll)
            .int4(50)
            .int4(20 * roll)
            .int8(700)
            .text("ok")
            .text("smith")
            .text(&format!("{roll:x}"));
    }
    copy.finish()
}

/// One binary `COPY … FROM STDIN` of `payload` into `table`; rows per second.
async fn copy_rate(pool: &PgPool, table: &str, payload: &[u8], rows: usize) -> anyhow::Result<f64> {
    let elapsed = timed_copy(pool, table, INFERENCE_COLUMNS, payload, rows as u64).await?;
    Ok(per_second(rows as f64, elapsed))
}

#[derive(Debug, Clone, Copy)]
struct CopyRates {
    indexed: f64,
    heap: f64,
}

async fn measure_copy(pool: &PgPool, config: &BenchConfig) -> anyhow::Result<CopyRates> {
    let schema = SchemaName::parse("raw_inference")?;
    let inference = registry::by_name("inference").context("the inference projector")?;
    worldline_projectors::store::prepare_schema(pool, &schema, inference.as_ref()).await?;
    sqlx::query("CREATE TABLE raw_inference.heap (LIKE raw_inference.inferences)")
        .execute(pool)
        .await?;
    let payload = inference_rows(config.copy_rows, config.worlds);
    let indexed = copy_rate(pool, "raw_inference.inferences", &payload, config.copy_rows).await?;
    let heap = copy_rate(pool, "raw_inference.heap", &payload, config.copy_rows).await?;
    sqlx::query("DROP SCHEMA raw_inference CASCADE")
        .execute(pool)
        .await?;
    Ok(CopyRates { indexed, heap })
}

// ---------------------------------------------------------------------------
// 3./4. Rebuilds
// ---------------------------------------------------------------------------

/// A progress callback that prints at most every [`PRINT_EVERY`].
fn printer(label: String) -> impl Fn(Progress) + Send + Sync {
    let last = Mutex::new(Instant::now());
    move |progress| {
        let mut last = last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.elapsed() < PRINT_EVERY {
            return;
        }
        *last = Instant::now();
        let percent = if progress.target > 0 {
            100.0 * progress.done as f64 / progress.target as f64
        } else {
            100.0
        };
        let eta = progress
            .eta_seconds()
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
        eprintln!(
            "  {label}: {}/{} records ({percent:.0}%), {:.0} records/s, ETA {eta}",
            progress.done, progress.target, progress.rate
        );
    }
}

/// The rebuild of one projector alone or of several together.
#[derive(Debug, Clone)]
struct Timed {
    label: String,
    records: i64,
    elapsed: Duration,
    rows: i64,
}

impl Timed {
    fn rate(&self) -> f64 {
        per_second(self.records as f64, self.elapsed)
    }
}

/// Rows in every read-model table of the projector's live schema.
async fn read_model_rows(pool: &PgPool, projector: &dyn Projector) -> anyhow::Result<i64> {
    let schema = SchemaName::parse(projector.name())?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = $1 AND table_type = 'BASE TABLE' AND NOT (table_name = ANY($2))",
    )
    .bind(schema.as_str())
    .bind(worldline_projectors::verify::RUNTIME_TABLES.as_slice())
    .fetch_all(pool)
    .await?;
    let mut rows = 0;
    for table in tables {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.\"{}\"",
            schema.as_str(),
            table.replace('"', "\"\"")
        )))
        .fetch_one(pool)
        .await?;
        rows += count;
    }
    Ok(rows)
}

async fn rebuild_alone(
    settings: &Settings,
    pool: &PgPool,
    projector: Arc<dyn Projector>,
    records: i64,
    shutdown: &CancellationToken,
) -> anyhow::Result<Timed> {
    let name = projector.name();
    let rebuild = Rebuild::new(settings, pool.clone(), projector.clone(), "shadow")?;
    let cpu = CpuMark::now();
    let started = Instant::now();
    rebuild
        .replay(&printer(format!("replay {name}")), shutdown)
        .await
        .with_context(|| format!("replaying {name}"))?;
    let elapsed = started.elapsed();
    let rows = read_model_rows(pool, projector.as_ref()).await?;
    println!(
        "  {name:<16} {records:>9} records in {:>7.2} s: {:>9.0} events/s ({rows} rows)",
        elapsed.as_secs_f64(),
        per_second(records as f64, elapsed),
    );
    println!("    {}", cpu.since());
    Ok(Timed {
        label: name.to_owned(),
        records,
        elapsed,
        rows,
    })
}

async fn rebuild_together(
    settings: &Settings,
    pool: &PgPool,
    projectors: &[Arc<dyn Projector>],
    records: i64,
    shutdown: &CancellationToken,
) -> anyhow::Result<Timed> {
    let rebuilds = projectors
        .iter()
        .map(|p| Rebuild::new(settings, pool.clone(), p.clone(), "shadow"))
        .collect::<Result<Vec<_>, _>>()?;
    let cpu = CpuMark::now();
    let started = Instant::now();
    replay_together(&rebuilds, &printer("replay all".to_owned()), shutdown)
        .await
        .context("replaying every projector together")?;
    let elapsed = started.elapsed();
    let mut rows = 0;
    for projector in projectors {
        rows += read_model_rows(pool, projector.as_ref()).await?;
    }
    println!(
        "  all {} together: {records} log records in {:.2} s: {:.0} events/s ({rows} rows)",
        projectors.len(),
        elapsed.as_secs_f64(),
        per_second(records as f64, elapsed),
    );
    println!("    {}", cpu.since());
    Ok(Timed {
        label: "all together".to_owned(),
        records,
        elapsed,
        rows,
    })
}

// ---------------------------------------------------------------------------
// 5. Archive
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct ArchiveRates {
    export_records_s: f64,
    export_mb_s: f64,
    import_records_s: f64,
    import_mb_s: f64,
    ratio: f64,
}

async fn measure_archive(
    created: &Shared,
    source: &Settings,
    config: &BenchConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<ArchiveRates> {
    let dir = config.dir.join(format!(
        "worldline-bench-replay-{}",
        source.topics.prefix.trim_end_matches('.')
    ));
    locked(created).dirs.push(dir.clone());
    let export = archive::export(
        &source.kafka,
        &source.topics,
        ExportRequest {
            dir: dir.clone(),
            families: vec![],
            range: ExportRange::All,
        },
        &|_| {},
        shutdown.clone(),
    )
    .await?;
    println!(
        "  export: {} records in {:.2} s: {:.0} records/s, {:.1} MB/s of payload; {:.1} MB archive ({:.2}x)",
        export.records(),
        export.elapsed.as_secs_f64(),
        per_second(export.records() as f64, export.elapsed),
        per_second(megabytes(export.payload_bytes), export.elapsed),
        megabytes(export.file_bytes()),
        export.compression_ratio(),
    );
    let (_, target) = new_env(created, config.partitions).await;
    let import = archive::import(
        &target.kafka,
        &target.topics,
        ImportRequest {
            dir: dir.clone(),
            allow_non_empty: false,
        },
        &|_| {},
        shutdown.clone(),
    )
    .await?;
    println!(
        "  import: {} records in {:.2} s: {:.0} records/s, {:.1} MB/s of payload",
        import.records,
        import.elapsed.as_secs_f64(),
        per_second(import.records as f64, import.elapsed),
        per_second(megabytes(import.payload_bytes), import.elapsed),
    );
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(ArchiveRates {
        export_records_s: per_second(export.records() as f64, export.elapsed),
        export_mb_s: per_second(megabytes(export.payload_bytes), export.elapsed),
        import_records_s: per_second(import.records as f64, import.elapsed),
        import_mb_s: per_second(megabytes(import.payload_bytes), import.elapsed),
        ratio: export.compression_ratio(),
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// The figures of one size.
#[derive(Debug, Clone)]
struct SizeFigures {
    events: u64,
    append_rate: f64,
    copy: CopyRates,
    alone: Vec<Timed>,
    together: Timed,
    archive: Option<ArchiveRates>,
}

async fn run_size(
    created: &Shared,
    config: &BenchConfig,
    events: usize,
    first: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<SizeFigures> {
    println!("\n=== {events} mixed events ===");
    let (index, settings) = new_env(created, config.partitions).await;
    let pool = pool_of(created, index);
    let projectors: Vec<Arc<dyn Projector>> = config
        .projectors
        .iter()
        .filter_map(|name| registry::by_name(name))
        .collect();

    println!("\n1. Appending (Appender::append_batch, chunks of {APPEND_CHUNK})");
    let cpu = CpuMark::now();
    let (appended, took) = append_backlog(&settings, config, events).await?;
    let append_rate = per_second(appended as f64, took);
    println!(
        "  appended {appended} events in {:.2} s ({append_rate:.0} events/s)",
        took.as_secs_f64()
    );
    println!("  {}", cpu.since());
    let log = log_records(&settings, created, index);
    let total: i64 = log.values().sum();
    for (topic, records) in &log {
        println!("    {topic:<48} {records:>9} records");
    }

    println!(
        "\n2. Raw binary COPY of {} inference-log rows (one COPY, payload encoded beforehand)",
        config.copy_rows
    );
    let copy = measure_copy(&pool, config).await?;
    println!(
        "  into the read model's table (key + 2 indexes): {:.0} rows/s; into an index-free heap: {:.0} rows/s",
        copy.indexed, copy.heap
    );

    let mut alone = Vec::new();
    if config.alone {
        println!("\n3. Each projector alone: Rebuild::replay from offset zero (shadow, then swap)");
        for projector in &projectors {
            if shutdown.is_cancelled() {
                bail!("interrupted");
            }
            let records = records_for(projector.as_ref(), &settings, &log);
            alone
                .push(rebuild_alone(&settings, &pool, projector.clone(), records, shutdown).await?);
        }
    }

    println!(
        "\n4. Every projector together: replay_together from offset zero, replacing live schemas"
    );
    let together = rebuild_together(&settings, &pool, &projectors, total, shutdown).await?;
    let database_bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&pool)
        .await?;
    println!(
        "  database size after the rebuilds: {:.0} MB",
        megabytes(u64::try_from(database_bytes).unwrap_or(0))
    );

    let archive = match (config.archive, first) {
        (ArchiveRuns::All, _) | (ArchiveRuns::First, true) => {
            println!("\n5. Avro archive: export every topic, import into a fresh prefix");
            Some(measure_archive(created, &settings, config, shutdown).await?)
        }
        _ => None,
    };
    // This size's databases and topics go now: the next size needs the disk.
    drop_all(created).await;
    Ok(SizeFigures {
        events: appended,
        append_rate,
        copy,
        alone,
        together,
        archive,
    })
}

fn print_summary(figures: &[SizeFigures]) {
    println!("\n=== Summary ===");
    println!(
        "(events/s = log records the rebuild read / wall time of the rebuild, shadow build and swap included;\n \
         x COPY = events/s divided by binary COPY rows/s into the inference log table, same run)"
    );
    for size in figures {
        println!(
            "\n{} events: append {:.0} events/s; binary COPY {:.0} rows/s (index-free heap {:.0} rows/s)",
            size.events, size.append_rate, size.copy.indexed, size.copy.heap
        );
        println!(
            "  {:<18} {:>10} {:>9} {:>11} {:>8}",
            "rebuild", "records", "seconds", "events/s", "x COPY"
        );
        for timed in size.alone.iter().chain(std::iter::once(&size.together)) {
            println!(
                "  {:<18} {:>10} {:>9.2} {:>11.0} {:>8.2}",
                timed.label,
                timed.records,
                timed.elapsed.as_secs_f64(),
                timed.rate(),
                timed.rate() / size.copy.indexed.max(1.0)
            );
        }
        if size.events >= GOAL_EVENTS {
            let seconds = size.together.elapsed.as_secs_f64();
            println!(
                "  goal: {} events, every projector, rebuilt in <= {GOAL_SECONDS:.0} s: {:.1} s -> {}",
                size.events,
                seconds,
                if seconds <= GOAL_SECONDS {
                    "MET"
                } else {
                    "MISSED"
                }
            );
            for timed in &size.alone {
                let seconds = timed.elapsed.as_secs_f64();
                println!(
                    "        {} alone: {seconds:.1} s -> {}",
                    timed.label,
                    if seconds <= GOAL_SECONDS {
                        "within"
                    } else {
                        "over"
                    }
                );
            }
        }
        if let Some(a) = size.archive {
            println!(
                "  archive: export {:.0} records/s ({:.1} MB/s), import {:.0} records/s ({:.1} MB/s), compression {:.2}x",
                a.export_records_s, a.export_mb_s, a.import_records_s, a.import_mb_s, a.ratio
            );
        }
        let _ = size.together.rows;
    }
}

async fn run(
    created: Shared,
    config: BenchConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut figures = Vec::new();
    for (n, events) in config.sizes.iter().enumerate() {
        figures.push(run_size(&created, &config, *events, n == 0, &shutdown).await?);
    }
    print_summary(&figures);
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let config = BenchConfig::from_env()?;
    if std::env::var_os("RUST_LOG").is_some() {
        worldline_ops::telemetry::init_tracing();
    }
    let largest = config.sizes.iter().copied().max().unwrap_or(0) as u64;
    let needed = largest * DISK_BYTES_PER_EVENT;
    for path in ["/work", "/tmp"] {
        if let Some(free) = free_bytes(path) {
            println!(
                "disk: {:.1} GB free on {path}; this run needs about {:.1} GB",
                free as f64 / 1e9,
                needed as f64 / 1e9
            );
            if free < needed {
                bail!("not enough free disk on {path} for {largest} events");
            }
        }
    }
    println!(
        "Replay benchmark: sizes {:?}, {} worlds, {} partitions per topic, projectors {}",
        config.sizes,
        config.worlds,
        config.partitions,
        config.projectors.join(",")
    );
    println!("load average before: {}", load_average());
    let created: Shared = Arc::default();
    let shutdown = CancellationToken::new();
    let interrupt = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping, then dropping everything created");
                shutdown.cancel();
            }
        })
    };
    // Run on its own task so a panic still reaches the cleanup below.
    let outcome = tokio::spawn(run(created.clone(), config, shutdown)).await;
    interrupt.abort();
    drop_all(&created).await;
    println!("load average after: {}", load_average());
    match outcome {
        Ok(result) => result,
        Err(join_error) => bail!("the benchmark panicked: {join_error}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn given_sizes_when_parsed_then_underscores_are_allowed_and_nonsense_is_refused() {
        assert_eq!(
            parse_sizes("1_000_000, 10000000").unwrap(),
            [1_000_000, 10_000_000]
        );
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("many").is_err());
    }

    #[test]
    fn given_rows_when_encoded_for_binary_copy_then_the_header_and_trailer_frame_them() {
        let payload = inference_rows(2, 1);
        assert!(payload.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert!(payload.ends_with(&(-1i16).to_be_bytes()));
        assert_eq!(&payload[19..21], &14i16.to_be_bytes());
    }
}
