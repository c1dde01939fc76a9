//! `bench_append`: how fast the append path is, beside Kafka's own producer
//! benchmark against the same broker, in one run (`ops/bench/append.sh`).
//!
//! For each family it builds realistic envelopes, appends them through
//! [`Appender::append_batch`] (chunks, many in flight) into fresh topics, and then
//! runs `org.apache.kafka.tools.ProducerPerformance` with the same number of
//! records of the family's mean encoded size, the same acks, idempotence,
//! compression and linger, into a topic with the same partition count. It prints
//! figures and asserts nothing.
//!
//! Sizes come from the environment: `BENCH_EVENTS` (per family, default 200000),
//! `BENCH_WORLDS` (1000), `BENCH_CHUNK` (events per `append_batch`, 5000),
//! `BENCH_IN_FLIGHT` (concurrent `append_batch` calls, 8), `BENCH_ROUNDS` (2).
//! Kafka's jars come from `WORLDLINE_KAFKA_LIBS`, java from `WORLDLINE_JAVA`
//! (or `java`).
//!
//! Both sides run `BENCH_ROUNDS` times per family, alternating which goes first,
//! and the best round of each counts: on a small shared machine a single run
//! measures whatever else was running as much as the producer. CPU seconds of
//! this process, of ProducerPerformance's JVM and of the broker (when its pid is
//! in `<state>/run/kafka.pid`) are printed per event, to tell a client-bound run
//! from a broker-bound one. ProducerPerformance also runs once at the appender's
//! full record size (value + key + CloudEvents headers), as a diagnostic.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;
use uuid::Uuid;
use worldline_ops::Settings;
use worldline_ops::topics::{TopicSpec, ensure_topics, event_topic_specs};
use worldline_producers::appender::producer_config;
use worldline_producers::{Appender, AppenderOptions};
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WorldCreated, WorldPaused, WorldResumed,
};
use worldline_schemas::{Family, new_event_id};

/// The appender's settings (producers/src/appender.rs, as configured here)
/// given to ProducerPerformance under the same names, so both sides make the
/// same durability and batching trade. lz4 at its default level means the
/// same on both sides: librdkafka's fast mode, and the Java client's fast
/// compressor (any other level selects its high-compression one).
const MIRRORED_PROPS: [&str; 4] = [
    "acks",
    "enable.idempotence",
    "compression.type",
    "linger.ms",
];

/// What ProducerPerformance needs set to match the appender: librdkafka's
/// `batch.size` default is 1000000 bytes, Java's 16384;
/// `max.in.flight.requests.per.connection` is 5 on both sides with idempotence.
const JAVA_ONLY_PROPS: [(&str, &str); 2] = [
    ("batch.size", "1000000"),
    ("max.in.flight.requests.per.connection", "5"),
];

/// Appender settings that have no ProducerPerformance counterpart, printed for
/// the record.
const APPENDER_ONLY_PROPS: [&str; 5] = [
    "partitioner",
    "batch.num.messages",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.timeout.ms",
];

/// The options of the benchmark's appender.
fn appender_options(settings: &Settings) -> AppenderOptions {
    AppenderOptions {
        topic_prefix: settings.topics.prefix.clone(),
        source: "bench".to_owned(),
        ..AppenderOptions::default()
    }
}

/// `key=value` of each of `keys` in the appender's configuration.
fn appender_props(settings: &Settings, keys: &[&str]) -> Vec<String> {
    let config = producer_config(&settings.kafka, &appender_options(settings));
    keys.iter()
        .map(|key| {
            format!(
                "{key}={}",
                config.get(key).unwrap_or("(librdkafka default)")
            )
        })
        .collect()
}

/// ProducerPerformance's `--command-property` values.
fn matched_producer_props(settings: &Settings) -> Vec<String> {
    let mut props = appender_props(settings, &MIRRORED_PROPS);
    props.extend(
        JAVA_ONLY_PROPS
            .iter()
            .map(|(key, value)| format!("{key}={value}")),
    );
    props
}

/// A clock tick one year into a world ticking once a second.
const YEAR_OF_TICKS: u64 = 31_536_000;

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// What the run measures, from `BENCH_*` variables.
#[derive(Debug, Clone)]
struct BenchConfig {
    events: usize,
    worlds: usize,
    chunk: usize,
    in_flight: usize,
    rounds: usize,
    kafka_libs: String,
    java: String,
    /// ProducerPerformance's `--command-property` values (the appender's own).
    matched_props: Vec<String>,
}

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(raw) => raw
            .parse()
            .with_context(|| format!("{name}={raw:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl BenchConfig {
    fn from_env(settings: &Settings) -> anyhow::Result<BenchConfig> {
        let kafka_libs = std::env::var("WORLDLINE_KAFKA_LIBS").context(
            "WORLDLINE_KAFKA_LIBS is not set: run through ops/bench/append.sh, or source .worldline/env",
        )?;
        Ok(BenchConfig {
            events: env_number("BENCH_EVENTS", 200_000)?,
            worlds: env_number("BENCH_WORLDS", 1000)?.max(1),
            chunk: env_number("BENCH_CHUNK", 5000)?.max(1),
            in_flight: env_number("BENCH_IN_FLIGHT", 8)?.max(1),
            rounds: env_number("BENCH_ROUNDS", 2)?.max(1),
            kafka_libs,
            java: std::env::var("WORLDLINE_JAVA").unwrap_or_else(|_| "java".to_owned()),
            matched_props: matched_producer_props(settings),
        })
    }
}

// ---------------------------------------------------------------------------
// Realistic events
// ---------------------------------------------------------------------------

/// SplitMix64: a small seeded generator, so every run builds the same events.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    fn hex(&mut self, chars: usize) -> String {
        let mut out = String::with_capacity(chars + 16);
        while out.len() < chars {
            out.push_str(&format!("{:016x}", self.next()));
        }
        out.truncate(chars);
        out
    }
}

const REGIONS: [&str; 5] = ["north", "south", "east", "west", "coast"];
const STORIES: [&str; 6] = [
    "the-drowned-bell",
    "ashes-of-karn",
    "a-debt-of-salt",
    "the-lantern-road",
    "whispers-under-ironhill",
    "the-last-ferryman",
];
const NODES: [&str; 8] = [
    "harbour-gate",
    "smugglers-den",
    "old-lighthouse",
    "market-square",
    "temple-steps",
    "north-watchtower",
    "collapsed-mine",
    "river-crossing",
];
const CHOICES: [&str; 8] = [
    "bribe-the-guard",
    "fight",
    "sneak-past",
    "ask-about-the-bell",
    "accept-quest",
    "decline-politely",
    "pay-the-toll",
    "follow-the-stranger",
];
const NPCS: [&str; 6] = [
    "npc-harbourmaster-ilsa",
    "npc-blacksmith-odo",
    "npc-priestess-maren",
    "npc-ferryman-cald",
    "npc-innkeeper-bram",
    "npc-scout-tevi",
];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn world_name(index: usize) -> String {
    format!("world-{index:04}")
}

fn envelope(
    world: &str,
    tick: u64,
    source: &str,
    event_id: Uuid,
    now_ms: i64,
    body: Body,
) -> Envelope {
    Envelope {
        event_id: event_id.as_bytes().to_vec(),
        world_id: world.to_owned(),
        occurred_at_ms: now_ms,
        world_tick: tick,
        source: source.to_owned(),
        correlation_id: Vec::new(),
        causation_id: Vec::new(),
        body: Some(body),
    }
}

/// Ticks for `worlds` worlds in turn, each about 12 days into its history.
fn clock_events(n: usize, worlds: usize, now_ms: i64) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let tick = 1_000_000 + (i / worlds) as u64;
            let game_time_s = tick * 60;
            let day = game_time_s / 86_400;
            let season = match (day / 28) % 4 {
                0 => Season::Spring,
                1 => Season::Summer,
                2 => Season::Autumn,
                _ => Season::Winter,
            };
            envelope(
                &world_name(i % worlds),
                tick,
                "clock",
                new_event_id(),
                now_ms,
                Body::ClockTicked(ClockTicked {
                    game_time_s,
                    day: day as u32,
                    season: season as i32,
                    time_scale: 60,
                }),
            )
        })
        .collect()
}

/// Weather changes for one region of one world at a time, with the id derived
/// from (world, region, tick) and the causing tick's id, as the weather producer does.
fn weather_events(n: usize, worlds: usize, now_ms: i64, rng: &mut Rng) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let world = world_name(i % worlds);
            let region = REGIONS[(i / worlds) % REGIONS.len()];
            let tick = 1_000_000 + rng.below(5_000);
            let name = format!("{world}/{region}/{tick}");
            let mut event = envelope(
                &world,
                tick,
                "weather",
                Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()),
                now_ms,
                Body::WeatherChanged(WeatherChanged {
                    region: region.to_owned(),
                    condition: rng.between(1, 6) as i32,
                    temperature_dc: rng.between(0, 450) as i32 - 150,
                    wind_dmps: rng.between(0, 250) as u32,
                    precipitation_dmmph: rng.between(0, 120) as u32,
                    previous_condition: rng.between(0, 6) as i32,
                    ..Default::default()
                }),
            );
            event.causation_id = new_event_id().as_bytes().to_vec();
            event
        })
        .collect()
}

/// Players choosing along branching stories, with a small context map.
fn story_events(n: usize, worlds: usize, now_ms: i64, rng: &mut Rng) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let player = format!("player-{:05}", rng.below(50_000));
            let mut context = HashMap::from([
                (
                    "location".to_owned(),
                    format!("{}/{}", rng.pick(&REGIONS), rng.pick(&NODES)),
                ),
                ("gold_spent".to_owned(), rng.below(200).to_string()),
            ]);
            if rng.below(3) == 0 {
                context.insert(
                    "party".to_owned(),
                    format!("{player},player-{:05}", rng.below(50_000)),
                );
            }
            let mut event = envelope(
                &world_name(i % worlds),
                1_000_000 + rng.below(5_000),
                "simulator/story",
                new_event_id(),
                now_ms,
                Body::StoryChoiceMade(StoryChoiceMade {
                    player_id: player,
                    story_id: rng.pick(&STORIES).to_owned(),
                    node_id: rng.pick(&NODES).to_owned(),
                    choice_id: rng.pick(&CHOICES).to_owned(),
                    next_node_id: rng.pick(&NODES).to_owned(),
                    context,
                }),
            );
            event.correlation_id = new_event_id().as_bytes().to_vec();
            event
        })
        .collect()
}

/// Model inferences for NPC dialogue, narration, quests and moderation.
fn inference_events(n: usize, worlds: usize, now_ms: i64, rng: &mut Rng) -> Vec<Envelope> {
    const MODELS: [(&str, &str, InferencePurpose); 4] = [
        ("npc-chat", "2026-02-11-q4", InferencePurpose::NpcDialogue),
        ("narrator-xl", "ckpt-7f3a91c2", InferencePurpose::Narration),
        (
            "questsmith",
            "2026-01-30",
            InferencePurpose::QuestGeneration,
        ),
        ("guardrail-small", "v3.2.1", InferencePurpose::Moderation),
    ];
    (0..n)
        .map(|i| {
            let (model_id, model_version, purpose) = MODELS[match rng.below(100) {
                0..=64 => 0,
                65..=84 => 1,
                85..=94 => 2,
                _ => 3,
            }];
            let prompt_tokens = rng.between(150, 2_400) as u32;
            let completion_tokens = rng.between(8, 600) as u32;
            let outcome = match rng.below(1000) {
                0..=969 => InferenceOutcome::Ok,
                970..=984 => InferenceOutcome::Timeout,
                985..=994 => InferenceOutcome::Error,
                _ => InferenceOutcome::Filtered,
            };
            let npc_id = if purpose == InferencePurpose::NpcDialogue {
                rng.pick(&NPCS).to_owned()
            } else {
                String::new()
            };
            let mut event = envelope(
                &world_name(i % worlds),
                1_000_000 + rng.below(5_000),
                "simulator/inference",
                new_event_id(),
                now_ms,
                Body::InferenceRecorded(InferenceRecorded {
                    model_id: model_id.to_owned(),
                    model_version: model_version.to_owned(),
                    purpose: purpose as i32,
                    prompt_tokens,
                    completion_tokens,
                    latency_ms: 120 + completion_tokens * 9 + rng.below(400) as u32,
                    cost_micro_usd: u64::from(prompt_tokens) * 2 + u64::from(completion_tokens) * 8,
                    outcome: outcome as i32,
                    npc_id,
                    input_hash: rng.hex(64),
                }),
            );
            event.correlation_id = new_event_id().as_bytes().to_vec();
            event.causation_id = new_event_id().as_bytes().to_vec();
            event
        })
        .collect()
}

/// World lifecycle: each world created once, then paused and resumed in turn.
fn world_events(n: usize, worlds: usize, now_ms: i64, rng: &mut Rng) -> Vec<Envelope> {
    (0..n)
        .map(|i| {
            let world = world_name(i % worlds);
            let round = i / worlds;
            let body = match round {
                0 => Body::WorldCreated(WorldCreated {
                    display_name: format!("Realm {:04} ({})", i % worlds, rng.pick(&STORIES)),
                    seed: rng.next(),
                    time_scale: 60,
                    tick_interval_ms: 1000,
                    regions: REGIONS.map(str::to_owned).to_vec(),
                }),
                r if r % 2 == 1 => Body::WorldPaused(WorldPaused {
                    reason: rng
                        .pick(&["maintenance", "shard migration", "operator request"])
                        .to_owned(),
                }),
                _ => Body::WorldResumed(WorldResumed {}),
            };
            envelope(
                &world,
                1_000_000 + round as u64,
                "gateway",
                new_event_id(),
                now_ms,
                body,
            )
        })
        .collect()
}

fn build_events(family: Family, config: &BenchConfig, rng: &mut Rng) -> Vec<Envelope> {
    let now_ms = now_ms();
    let (n, worlds) = (config.events, config.worlds);
    match family {
        Family::World => world_events(n, worlds, now_ms, rng),
        Family::Clock => clock_events(n, worlds, now_ms),
        Family::Weather => weather_events(n, worlds, now_ms, rng),
        Family::Story => story_events(n, worlds, now_ms, rng),
        Family::Inference => inference_events(n, worlds, now_ms, rng),
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

/// Encoded sizes of a family's envelopes.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    total: u64,
    mean: f64,
    max: usize,
}

fn encoded_sizes(events: &[Envelope]) -> Sizes {
    let (total, max) = events.iter().fold((0_u64, 0_usize), |(total, max), e| {
        let len = e.encoded_len();
        (total + len as u64, max.max(len))
    });
    Sizes {
        total,
        mean: total as f64 / events.len().max(1) as f64,
        max,
    }
}

/// CPU seconds used so far by this process, by its waited-for children, and by
/// the broker.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSnapshot {
    own: f64,
    children: f64,
    broker: Option<f64>,
}

/// Reads CPU times from `/proc/<pid>/stat` (Linux; zeros elsewhere).
#[derive(Debug, Clone)]
struct CpuMeter {
    ticks_per_second: f64,
    broker_pid: Option<u32>,
}

impl CpuMeter {
    fn new() -> CpuMeter {
        let ticks_per_second = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0);
        let state = std::env::var("WORLDLINE_STATE").unwrap_or_else(|_| ".worldline".to_owned());
        let broker_pid = std::fs::read_to_string(format!("{state}/run/kafka.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok());
        CpuMeter {
            ticks_per_second,
            broker_pid,
        }
    }

    /// (utime + stime, cutime + cstime) of a process, in clock ticks.
    fn times(pid: &str) -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name, which may contain spaces.
        let rest: Vec<u64> = stat
            .rsplit_once(") ")?
            .1
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        Some((rest.get(10)? + rest.get(11)?, rest.get(12)? + rest.get(13)?))
    }

    fn snapshot(&self) -> CpuSnapshot {
        let (own, children) = CpuMeter::times("self").unwrap_or_default();
        let broker = self
            .broker_pid
            .and_then(|pid| CpuMeter::times(&pid.to_string()))
            .map(|(ticks, _)| ticks as f64 / self.ticks_per_second);
        CpuSnapshot {
            own: own as f64 / self.ticks_per_second,
            children: children as f64 / self.ticks_per_second,
            broker,
        }
    }
}

/// CPU used between two snapshots, in microseconds per event.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerEvent {
    own_us: f64,
    children_us: f64,
    broker_us: Option<f64>,
}

fn cpu_per_event(before: CpuSnapshot, after: CpuSnapshot, events: usize) -> CpuPerEvent {
    let per_event = |seconds: f64| seconds * 1e6 / events.max(1) as f64;
    CpuPerEvent {
        own_us: per_event(after.own - before.own),
        children_us: per_event(after.children - before.children),
        broker_us: after
            .broker
            .zip(before.broker)
            .map(|(a, b)| per_event(a - b)),
    }
}

/// One timed run of either producer.
#[derive(Debug, Clone, Copy)]
struct Timed {
    events_per_second: f64,
    megabytes_per_second: f64,
    cpu: CpuPerEvent,
}

/// Appends `events` in chunks of `config.chunk`, with up to `config.in_flight`
/// chunks awaiting acknowledgement at once; returns the wall time until the last
/// acknowledgement.
async fn append_all(
    appender: &Appender,
    events: Vec<Envelope>,
    config: &BenchConfig,
) -> anyhow::Result<Duration> {
    let mut chunks: Vec<Vec<Envelope>> = Vec::new();
    let mut rest = events;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(config.chunk));
        chunks.push(std::mem::replace(&mut rest, tail));
    }
    let started = Instant::now();
    let mut running: JoinSet<usize> = JoinSet::new();
    let mut failed = 0;
    for chunk in chunks {
        while running.len() >= config.in_flight {
            failed += running.join_next().await.context("join")??;
        }
        let appender = appender.clone();
        running.spawn(async move {
            appender
                .append_batch(&chunk)
                .await
                .iter()
                .filter(|r| r.is_err())
                .count()
        });
    }
    while let Some(result) = running.join_next().await {
        failed += result?;
    }
    let elapsed = started.elapsed();
    if failed > 0 {
        bail!("{failed} appends failed");
    }
    Ok(elapsed)
}

async fn time_appender(
    appender: &Appender,
    events: &[Envelope],
    sizes: Sizes,
    config: &BenchConfig,
    meter: &CpuMeter,
) -> anyhow::Result<Timed> {
    let copy = events.to_vec();
    let before = meter.snapshot();
    let elapsed = append_all(appender, copy, config).await?;
    let after = meter.snapshot();
    Ok(Timed {
        events_per_second: events.len() as f64 / elapsed.as_secs_f64(),
        megabytes_per_second: sizes.total as f64 / elapsed.as_secs_f64() / 1e6,
        cpu: cpu_per_event(before, after, events.len()),
    })
}

/// Key and header sizes of the first record of `topic`, as the broker stored it.
fn record_overhead(bootstrap: &str, topic: &str) -> anyhow::Result<Overhead> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "worldline-bench-append")
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(500)) {
            let message = message?;
            let (count, bytes) = message.headers().map_or((0, 0), |headers| {
                headers.iter().fold((0, 0), |(count, bytes), h| {
                    (
                        count + 1,
                        bytes + h.key.len() + h.value.map_or(0, <[u8]>::len),
                    )
                })
            });
            return Ok(Overhead {
                key_bytes: message.key().map_or(0, <[u8]>::len),
                header_count: count,
                header_bytes: bytes,
            });
        }
    }
    bail!("no record came back from {topic}")
}

/// What an appended record carries besides its value.
#[derive(Debug, Clone, Copy, Default)]
struct Overhead {
    key_bytes: usize,
    header_count: usize,
    header_bytes: usize,
}

/// ProducerPerformance's summary line.
#[derive(Debug, Clone, Copy)]
struct PerfSummary {
    records_per_second: f64,
    megabytes_per_second: f64,
}

/// Parses "N records sent, R records/sec (M MB/sec), ..." (the final summary).
fn parse_perf_summary(output: &str) -> Option<PerfSummary> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("records sent,") && l.contains("records/sec"))?;
    let after_sent = line.split("records sent,").nth(1)?;
    let records_per_second = after_sent
        .split("records/sec")
        .next()?
        .trim()
        .parse()
        .ok()?;
    let megabytes_per_second = after_sent
        .split('(')
        .nth(1)?
        .split("MB/sec")
        .next()?
        .trim()
        .parse()
        .ok()?;
    Some(PerfSummary {
        records_per_second,
        megabytes_per_second,
    })
}

fn run_producer_performance(
    config: &BenchConfig,
    bootstrap: &str,
    topic: &str,
    record_size: usize,
) -> anyhow::Result<PerfSummary> {
    let mut command = Command::new(&config.java);
    command
        .arg("-Xms256m")
        .arg("-Xmx1g")
        .arg("-cp")
        .arg(format!("{}/*", config.kafka_libs))
        .arg("org.apache.kafka.tools.ProducerPerformance")
        .args(["--bootstrap-server", bootstrap])
        .args(["--topic", topic])
        .args(["--num-records", &config.events.to_string()])
        .args(["--record-size", &record_size.to_string()])
        .args(["--throughput", "-1"])
        .arg("--command-property");
    command.args(&config.matched_props);
    // Room for the whole run in the producer's buffer, like the appender's
    // 1 GiB queue, so neither side is throttled by its own buffer.
    command.arg("buffer.memory=268435456");
    let output = command
        .output()
        .with_context(|| format!("running {}", config.java))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "ProducerPerformance failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_perf_summary(&stdout)
        .with_context(|| format!("no summary line in ProducerPerformance output:\n{stdout}"))
}

async fn time_producer_performance(
    config: &BenchConfig,
    bootstrap: &str,
    topic: &str,
    record_size: usize,
    meter: &CpuMeter,
) -> anyhow::Result<Timed> {
    let before = meter.snapshot();
    let summary = {
        let (config, bootstrap, topic) = (config.clone(), bootstrap.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            run_producer_performance(&config, &bootstrap, &topic, record_size)
        })
        .await??
    };
    let after = meter.snapshot();
    Ok(Timed {
        events_per_second: summary.records_per_second,
        megabytes_per_second: summary.megabytes_per_second,
        cpu: cpu_per_event(before, after, config.events),
    })
}

/// Everything measured for one family.
#[derive(Debug, Clone)]
struct FamilyResult {
    family: Family,
    sizes: Sizes,
    encode_ns_per_event: f64,
    overhead: Overhead,
    appender: Vec<Timed>,
    perf: Vec<Timed>,
    perf_full_record: Option<Timed>,
}

fn best(runs: &[Timed]) -> Timed {
    runs.iter()
        .copied()
        .max_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second))
        .unwrap_or(Timed {
            events_per_second: f64::NAN,
            megabytes_per_second: f64::NAN,
            cpu: CpuPerEvent::default(),
        })
}

impl FamilyResult {
    fn ratio(&self) -> f64 {
        best(&self.appender).events_per_second / best(&self.perf).events_per_second
    }

    /// Bytes the appender hands the producer per record: value, key and headers.
    fn full_record_bytes(&self) -> usize {
        self.sizes.mean.round() as usize + self.overhead.key_bytes + self.overhead.header_bytes
    }
}

async fn measure_family(
    family: Family,
    appender: &Appender,
    settings: &Settings,
    config: &BenchConfig,
    meter: &CpuMeter,
    rng: &mut Rng,
) -> anyhow::Result<FamilyResult> {
    let events = build_events(family, config, rng);
    let encoded = Instant::now();
    let mut encoded_bytes = 0_u64;
    for event in &events {
        encoded_bytes += event.to_bytes().len() as u64;
    }
    let encode_ns_per_event = encoded.elapsed().as_nanos() as f64 / events.len() as f64;
    let sizes = encoded_sizes(&events);
    debug_assert_eq!(encoded_bytes, sizes.total);
    let record_size = sizes.mean.round() as usize;
    let bootstrap = settings.kafka.bootstrap_servers.as_str();
    let perf_topic = perf_topic(&settings.topics.prefix, family);

    let mut result = FamilyResult {
        family,
        sizes,
        encode_ns_per_event,
        overhead: Overhead::default(),
        appender: Vec::new(),
        perf: Vec::new(),
        perf_full_record: None,
    };
    for round in 0..config.rounds {
        // Alternate who goes first, so neither always meets a warmer (or
        // busier) broker.
        if round % 2 == 0 {
            result
                .appender
                .push(time_appender(appender, &events, sizes, config, meter).await?);
            result.perf.push(
                time_producer_performance(config, bootstrap, &perf_topic, record_size, meter)
                    .await?,
            );
        } else {
            result.perf.push(
                time_producer_performance(config, bootstrap, &perf_topic, record_size, meter)
                    .await?,
            );
            result
                .appender
                .push(time_appender(appender, &events, sizes, config, meter).await?);
        }
    }
    result.overhead = {
        let (bootstrap, topic) = (bootstrap.to_owned(), appender.topic_for(family));
        tokio::task::spawn_blocking(move || record_overhead(&bootstrap, &topic)).await??
    };
    result.perf_full_record = Some(
        time_producer_performance(
            config,
            bootstrap,
            &perf_topic,
            result.full_record_bytes(),
            meter,
        )
        .await?,
    );
    Ok(result)
}

// ---------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------

fn perf_topic(prefix: &str, family: Family) -> String {
    format!("{prefix}perf.{}", family.as_str())
}

/// The event topics under `prefix` and one ProducerPerformance topic per family
/// with the same partitions and configs.
fn bench_topic_specs(settings: &Settings) -> Vec<TopicSpec> {
    let event_specs = event_topic_specs(&settings.topics);
    let perf_specs: Vec<TopicSpec> = Family::ALL
        .into_iter()
        .zip(&event_specs)
        .map(|(family, spec)| TopicSpec {
            name: perf_topic(&settings.topics.prefix, family),
            ..spec.clone()
        })
        .collect();
    event_specs.into_iter().chain(perf_specs).collect()
}

async fn delete_topics(bootstrap: &str, specs: &[TopicSpec]) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create();
    if let Ok(admin) = admin {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    }
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

fn print_settings(config: &BenchConfig, settings: &Settings) {
    println!("append benchmark");
    println!("  broker:            {}", settings.kafka.bootstrap_servers);
    println!(
        "  topics:            prefix {:?}, {} partitions, replication factor {}",
        settings.topics.prefix, settings.topics.partitions, settings.topics.replication_factor
    );
    println!(
        "  events per family: {} over {} worlds",
        config.events, config.worlds
    );
    println!(
        "  appender:          append_batch of {} events, {} calls in flight",
        config.chunk, config.in_flight
    );
    println!(
        "  rounds:            {} per side and family, alternating who goes first; the best counts",
        config.rounds
    );
    println!("  both producers:    {}", config.matched_props.join(" "));
    println!(
        "  appender only:     {}",
        appender_props(settings, &APPENDER_ONLY_PROPS).join(" ")
    );
    println!(
        "  ProducerPerformance only: buffer.memory=268435456, no key (sticky partitioner), \
         no headers, payload of random letters of the family's mean encoded size"
    );
    println!();
}

fn broker_us(cpu: &CpuPerEvent) -> String {
    cpu.broker_us
        .map_or("?".to_owned(), |us| format!("{us:.1}"))
}

fn print_family(result: &FamilyResult) {
    let rounds = |runs: &[Timed]| {
        runs.iter()
            .map(|t| format!("{:.0}", t.events_per_second))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (a, p) = (best(&result.appender), best(&result.perf));
    println!(
        "{}: encoded {:.1} B/event mean, {} max; encode {:.0} ns/event; record key {} B + {} headers {} B",
        result.family.as_str(),
        result.sizes.mean,
        result.sizes.max,
        result.encode_ns_per_event,
        result.overhead.key_bytes,
        result.overhead.header_count,
        result.overhead.header_bytes,
    );
    println!(
        "  appender            ev/s per round: {:<22} best {:>7.0} ev/s {:>6.2} MB/s | CPU/event: appender process {:>5.1} us, broker {:>5} us",
        rounds(&result.appender),
        a.events_per_second,
        a.megabytes_per_second,
        a.cpu.own_us,
        broker_us(&a.cpu),
    );
    println!(
        "  ProducerPerformance rec/s per round: {:<21} best {:>7.0} rec/s {:>5.2} MB/s | CPU/event: JVM {:>5.1} us, broker {:>5} us",
        rounds(&result.perf),
        p.events_per_second,
        p.megabytes_per_second,
        p.cpu.children_us,
        broker_us(&p.cpu),
    );
    if let Some(full) = &result.perf_full_record {
        println!(
            "  ProducerPerformance at the appender's full record size ({} B = value + key + headers): {:.0} rec/s | CPU/event: JVM {:.1} us, broker {} us",
            result.full_record_bytes(),
            full.events_per_second,
            full.cpu.children_us,
            broker_us(&full.cpu),
        );
    }
}

fn print_table(results: &[FamilyResult]) {
    println!();
    println!(
        "| family    | bytes/event (mean / max) | appender ev/s | appender MB/s | ProducerPerformance rec/s | ratio | PP rec/s at full record size |"
    );
    println!(
        "|-----------|--------------------------|---------------|---------------|---------------------------|-------|------------------------------|"
    );
    for result in results {
        let (a, p) = (best(&result.appender), best(&result.perf));
        println!(
            "| {:<9} | {:>13.1} / {:<8} | {:>13.0} | {:>13.2} | {:>25.0} | {:>5.2} | {:>21.0} ({:>3} B) |",
            result.family.as_str(),
            result.sizes.mean,
            result.sizes.max,
            a.events_per_second,
            a.megabytes_per_second,
            p.events_per_second,
            result.ratio(),
            result
                .perf_full_record
                .map_or(f64::NAN, |t| t.events_per_second),
            result.full_record_bytes(),
        );
    }
    let below: Vec<&str> = results
        .iter()
        .filter(|r| r.ratio() < 0.8)
        .map(|r| r.family.as_str())
        .collect();
    if below.is_empty() {
        println!("appender >= 0.8x ProducerPerformance for every family");
    } else {
        println!(
            "appender below 0.8x ProducerPerformance for: {}",
            below.join(", ")
        );
    }
}

/// Encoded size of a clock tick a year into a world with a 9-character id.
fn year_tick_size() -> usize {
    let tick = clock_events(1, 1, now_ms())
        .into_iter()
        .next()
        .map(|mut e| {
            e.world_id = "emberfall".to_owned();
            e.world_tick = YEAR_OF_TICKS;
            if let Some(Body::ClockTicked(t)) = &mut e.body {
                t.game_time_s = YEAR_OF_TICKS * 60;
                t.day = (YEAR_OF_TICKS * 60 / 86_400) as u32;
            }
            e
        });
    tick.map_or(0, |t| t.to_bytes().len())
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async fn run(config: &BenchConfig, settings: &Settings) -> anyhow::Result<()> {
    print_settings(config, settings);
    let appender = Appender::new(&settings.kafka, appender_options(settings))?;
    let meter = CpuMeter::new();
    let mut rng = Rng(0x5EED_0FA9_9E4D);
    let mut results = Vec::new();
    for family in Family::ALL {
        let result = measure_family(family, &appender, settings, config, &meter, &mut rng).await?;
        print_family(&result);
        results.push(result);
    }
    print_table(&results);
    let size = year_tick_size();
    println!();
    println!(
        "clock tick at tick {YEAR_OF_TICKS} for a 9-character world id: {size} bytes encoded (budget 64): {}",
        if size <= 64 {
            "within budget"
        } else {
            "OVER BUDGET"
        }
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut settings = Settings::load(None)?;
    let config = BenchConfig::from_env(&settings)?;
    let id = Uuid::new_v4().simple().to_string();
    settings.topics.prefix = format!("bench-{}.", &id[..8]);
    let specs = bench_topic_specs(&settings);
    ensure_topics(&settings.kafka, &specs).await?;
    let started = Instant::now();
    let result = run(&config, &settings).await;
    delete_topics(&settings.kafka.bootstrap_servers, &specs).await;
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    result
}
