//! One pass over the log that builds several target schemas at once.
//!
//! The live runtime is shaped for freshness: small batches that every projector
//! of its set commits before the next one starts, behind a consumer group. A
//! rebuild wants throughput instead, so it reads each topic once (one reader
//! thread, assigned partitions, no group), decodes each record once, and hands
//! the same decoded chunk to every target that reads its topic. Each target
//! applies on its own connection, at its own pace, concurrently with the others
//! and with the reader, in large transactions.
//!
//! Exactly-once is the runtime's rule, unchanged: a target's rows and its next
//! offsets commit in one transaction, and the offsets move by compare-and-set
//! from the values this pass loaded, so a second rebuild of the same schema
//! running at the same time is refused instead of applying twice. Each target
//! stops exactly at its own stop offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use worldline_ops::config::KafkaSettings;
use worldline_schemas::decode_envelope;
use worldline_schemas::envelope::EnvelopeExt;

use super::{Progress, ReplayError};
use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::fresh::{self, KeySets};
use crate::runtime::RuntimeError;
use crate::store::{self, DeadLetter, SchemaName};

/// Chunks queued per target before the reader waits for the slowest one.
const CHUNKS_IN_FLIGHT: usize = 2;

/// How much a pass gathers and applies at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Records of one topic the reader gathers before handing them on: large
    /// enough that every apply statement works on thousands of rows (and that
    /// per-key read models coalesce well), small enough that the chunks in
    /// flight stay tens of megabytes.
    pub chunk_records: usize,
    /// Most events one target applies in one transaction.
    pub batch_events: usize,
}

impl Limits {
    /// A rebuild's batches are this many times the live projector's: nobody
    /// waits on their freshness, and each costs a commit and a round of
    /// statements however large it is.
    const LIVE_BATCH_MULTIPLE: usize = 32;

    pub(super) fn for_live_batch(batch_max_records: usize) -> Limits {
        let chunk_records = batch_max_records
            .saturating_mul(Self::LIVE_BATCH_MULTIPLE)
            .clamp(64, 65_536);
        Limits {
            chunk_records,
            batch_events: chunk_records * 2,
        }
    }
}

/// Where one partition stands in one target: the next offset to apply, or
/// `None` when the target has no row for it yet (nothing applied).
type Position = Option<i64>;
type PartitionKey = (String, i32);

/// A schema to build, and where to stop.
#[derive(Clone)]
pub(super) struct Target {
    pub projector: Arc<dyn Projector>,
    pub schema: SchemaName,
    pub topics: Vec<String>,
    /// Next offset to stop at, per partition: nothing at or past it is applied.
    pub stop: HashMap<PartitionKey, i64>,
    pub keys: KeyCache,
}

type SharedKeys = Arc<std::sync::Mutex<KeySets>>;

/// The ids of a target's event logs whose key is deferred, kept from one pass
/// to the next (reading millions of them back costs seconds).
#[derive(Clone, Default)]
pub(super) struct KeyCache(Arc<tokio::sync::Mutex<Option<SharedKeys>>>);

impl KeyCache {
    async fn load(&self, pool: &PgPool, schema: &SchemaName) -> Result<SharedKeys, sqlx::Error> {
        let mut cached = self.0.lock().await;
        if let Some(keys) = &*cached {
            return Ok(keys.clone());
        }
        let keys = deferred_key_sets(pool, schema).await?;
        *cached = Some(keys.clone());
        Ok(keys)
    }

    /// Forgets the ids: the keys were built, or a failed pass left memory and
    /// the database in doubt; the next pass reads the database again.
    pub(super) async fn clear(&self) {
        *self.0.lock().await = None;
    }
}

/// Decoded records of one topic, in log order per partition.
struct Chunk {
    topic: Arc<str>,
    events: Vec<Event>,
    dead_letters: Vec<DeadLetter>,
    /// Per partition: every record below this offset has been read.
    through: Vec<(i32, i64)>,
}

/// Builds every target (already prepared) up to its stop offsets; progress is
/// the sum over targets.
pub(super) async fn build(
    pool: &PgPool,
    kafka: &KafkaSettings,
    targets: &[Target],
    limits: Limits,
    progress: &(dyn Fn(Progress) + Send + Sync),
    shutdown: &CancellationToken,
) -> Result<(), ReplayError> {
    let mut runs = Vec::with_capacity(targets.len());
    for target in targets {
        let stored = store::load_offsets(pool, &target.schema, &target.topics).await?;
        let keys = target.keys.load(pool, &target.schema).await?;
        runs.push(TargetRun::new(target.clone(), &stored, keys));
    }
    let outcome = run_pass(pool, kafka, runs, limits, progress, shutdown).await;
    if outcome.is_err() {
        for target in targets {
            target.keys.clear().await;
        }
    }
    outcome
}

async fn run_pass(
    pool: &PgPool,
    kafka: &KafkaSettings,
    runs: Vec<TargetRun>,
    limits: Limits,
    progress: &(dyn Fn(Progress) + Send + Sync),
    shutdown: &CancellationToken,
) -> Result<(), ReplayError> {
    let goal: i64 = runs.iter().map(|r| r.goal).sum();
    let done = || {
        runs.iter()
            .map(|r| r.done.load(Ordering::Relaxed))
            .sum::<i64>()
    };
    let ranges = read_ranges(&runs);
    if ranges.is_empty() {
        progress(Progress {
            done: done(),
            target: goal,
            rate: 0.0,
        });
        return Ok(());
    }

    let pass = shutdown.child_token();
    let (chunks_tx, mut chunks_rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let reader = {
        let (kafka, pass) = (kafka.clone(), pass.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = read_log(&kafka, &ranges, limits.chunk_records, &chunks_tx, &pass);
            if outcome.is_err() {
                pass.cancel();
            }
            outcome
        })
    };
    let mut routes: HashMap<String, Vec<mpsc::Sender<Arc<Chunk>>>> = HashMap::new();
    // Each commit is reported, so progress moves with every batch.
    let (committed_tx, mut committed_rx) = mpsc::unbounded_channel::<()>();
    let mut appliers = tokio::task::JoinSet::new();
    let connect = pool.connect_options();
    for run in &runs {
        let (tx, rx) = mpsc::channel::<Arc<Chunk>>(CHUNKS_IN_FLIGHT);
        for topic in &run.target.topics {
            routes.entry(topic.clone()).or_default().push(tx.clone());
        }
        let (run, pass, connect) = (run.clone(), pass.clone(), connect.clone());
        let committed = committed_tx.clone();
        appliers.spawn(async move {
            // Its own connection, outside the pool: the pool also serves live
            // projectors, which wait on the swap lock while holding one.
            let outcome = match PgConnection::connect_with(&connect).await {
                Ok(conn) => run.apply_all(conn, rx, limits, &committed, &pass).await,
                Err(error) => Err(ReplayError::Database(error)),
            };
            if outcome.is_err() {
                pass.cancel();
            }
            outcome
        });
    }

    let started = Instant::now();
    drop(committed_tx);
    // The rate is measured over a second or more, however often it is reported.
    let mut meter = Meter::new(done());
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.tick().await;
    let report = |meter: &mut Meter| {
        let now = done();
        progress(Progress {
            done: now,
            target: goal,
            rate: meter.rate(now),
        });
    };
    loop {
        tokio::select! {
            chunk = chunks_rx.recv() => {
                let Some(chunk) = chunk else { break };
                let chunk = Arc::new(chunk);
                for route in routes.get(&*chunk.topic).into_iter().flatten() {
                    // A closed route means its target failed; the error
                    // surfaces when the appliers are joined.
                    let _ = route.send(chunk.clone()).await;
                }
            }
            Some(()) = committed_rx.recv() => report(&mut meter),
            _ = ticker.tick() => report(&mut meter),
        }
    }
    drop(routes);
    let mut first_error = None;
    loop {
        let joined = tokio::select! {
            joined = appliers.join_next() => joined,
            Some(()) = committed_rx.recv() => { report(&mut meter); continue; }
            _ = ticker.tick() => { report(&mut meter); continue; }
        };
        let Some(joined) = joined else { break };
        let outcome = joined.unwrap_or_else(|e| Err(ReplayError::Task(e.to_string())));
        if let Err(error) = outcome {
            first_error.get_or_insert(error);
        }
    }
    let read = reader
        .await
        .unwrap_or_else(|_| Err(ReplayError::Kafka(KafkaError::Canceled)));
    if let Err(error) = read {
        first_error.get_or_insert(error);
    }
    let rate = per_second(
        done() - runs.iter().map(|r| r.initial).sum::<i64>(),
        started,
    );
    progress(Progress {
        done: done(),
        target: goal,
        rate,
    });
    if shutdown.is_cancelled() {
        let schemas: Vec<&str> = runs.iter().map(|r| r.target.schema.as_str()).collect();
        return Err(ReplayError::Interrupted(schemas.join(", ")));
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    Ok(())
}

/// The ids every event log with a deferred key holds, to answer
/// `fresh::unseen` from memory (empty logs on a fresh rebuild; a resumed one
/// reads them back once).
async fn deferred_key_sets(pool: &PgPool, schema: &SchemaName) -> Result<SharedKeys, sqlx::Error> {
    let s = schema.as_str();
    let mut sets = KeySets::default();
    let deferred: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                         WHERE table_schema = $1 AND table_name = $2)",
    )
    .bind(s)
    .bind(super::DEFERRED_INDEXES_TABLE)
    .fetch_one(pool)
    .await?;
    if deferred {
        let logs: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT table_name FROM {s}.{} WHERE event_log",
            super::DEFERRED_INDEXES_TABLE
        )))
        .fetch_all(pool)
        .await?;
        for table in logs {
            let quoted = table.replace('"', "\"\"");
            let ids: Vec<uuid::Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT event_id FROM {s}.\"{quoted}\""
            )))
            .fetch_all(pool)
            .await?;
            sets.track(&table, ids);
        }
    }
    Ok(Arc::new(std::sync::Mutex::new(sets)))
}

/// Records per second over the last second or more.
struct Meter {
    mark: (Instant, i64),
    rate: f64,
}

impl Meter {
    fn new(done: i64) -> Meter {
        Meter {
            mark: (Instant::now(), done),
            rate: 0.0,
        }
    }

    fn rate(&mut self, done: i64) -> f64 {
        let elapsed = self.mark.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            self.rate = (done - self.mark.1) as f64 / elapsed.as_secs_f64();
            self.mark = (Instant::now(), done);
        }
        self.rate
    }
}

fn per_second(records: i64, since: Instant) -> f64 {
    let seconds = since.elapsed().as_secs_f64();
    if seconds > 0.0 {
        records as f64 / seconds
    } else {
        0.0
    }
}

/// Per partition, the range the reader must cover: from the earliest position
/// of any target that still needs it to the furthest stop.
fn read_ranges(runs: &[TargetRun]) -> BTreeMap<PartitionKey, (i64, i64)> {
    let mut ranges: BTreeMap<PartitionKey, (i64, i64)> = BTreeMap::new();
    for run in runs {
        for (key, stop) in &run.target.stop {
            let at = run.positions.get(key).copied().flatten().unwrap_or(0);
            if at >= *stop {
                continue;
            }
            let range = ranges.entry(key.clone()).or_insert((at, *stop));
            range.0 = range.0.min(at);
            range.1 = range.1.max(*stop);
        }
    }
    ranges
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Gathers one topic's records into a chunk.
struct ChunkBuilder {
    capacity: usize,
    topic: Arc<str>,
    events: Vec<Event>,
    dead_letters: Vec<DeadLetter>,
    through: BTreeMap<i32, i64>,
}

impl ChunkBuilder {
    fn new(topic: &str, capacity: usize) -> ChunkBuilder {
        ChunkBuilder {
            capacity,
            topic: Arc::from(topic),
            events: Vec::with_capacity(capacity),
            dead_letters: Vec::new(),
            through: BTreeMap::new(),
        }
    }

    fn records(&self) -> usize {
        self.events.len() + self.dead_letters.len()
    }

    fn is_empty(&self) -> bool {
        self.through.is_empty()
    }

    fn take(&mut self) -> Chunk {
        Chunk {
            topic: self.topic.clone(),
            events: std::mem::replace(&mut self.events, Vec::with_capacity(self.capacity)),
            dead_letters: std::mem::take(&mut self.dead_letters),
            through: std::mem::take(&mut self.through).into_iter().collect(),
        }
    }
}

/// Reads every range once, decoding each record, until all are covered or the
/// pass is cancelled. Blocking: runs on its own thread.
fn read_log(
    kafka: &KafkaSettings,
    ranges: &BTreeMap<PartitionKey, (i64, i64)>,
    chunk_records: usize,
    chunks: &mpsc::Sender<Chunk>,
    pass: &CancellationToken,
) -> Result<(), ReplayError> {
    let consumer: BaseConsumer =
        worldline_ops::kafka::base_client_config(kafka, "worldline-replay")
            // Assigned partitions, no group membership and no commits: positions
            // live in each target schema.
            .set("group.id", "worldline-replay")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A stored position outside the log is an error, never a silent jump.
            .set("auto.offset.reset", "error")
            // Records of aborted transactions are skipped, as the live runtime does.
            .set("isolation.level", "read_committed")
            // One reader for every topic of a long backlog: let librdkafka keep
            // plenty prefetched so decoding never waits on the network.
            .set("queued.max.messages.kbytes", "131072")
            .set("max.partition.fetch.bytes", "16777216")
            .set("fetch.max.bytes", "67108864")
            .create()?;
    let mut assignment = TopicPartitionList::new();
    for ((topic, partition), (start, _)) in ranges {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*start))?;
    }
    consumer.assign(&assignment)?;

    let mut builders: HashMap<String, ChunkBuilder> = HashMap::new();
    let mut open: HashMap<PartitionKey, i64> = ranges
        .iter()
        .map(|(key, (_, end))| (key.clone(), *end))
        .collect();
    let mut ends: HashMap<String, HashMap<i32, i64>> = HashMap::new();
    for ((topic, partition), end) in &open {
        ends.entry(topic.clone())
            .or_default()
            .insert(*partition, *end);
    }
    let started = Instant::now();
    let blocked = std::cell::Cell::new(Duration::ZERO);
    let read = std::cell::Cell::new(0u64);
    let send = |chunk: Chunk| {
        let waited = Instant::now();
        read.set(read.get() + (chunk.events.len() + chunk.dead_letters.len()) as u64);
        let sent = chunks.blocking_send(chunk).is_ok();
        blocked.set(blocked.get() + waited.elapsed());
        sent
    };
    while !open.is_empty() {
        if pass.is_cancelled() {
            return Ok(());
        }
        let Some(received) = consumer.poll(Duration::from_millis(100)) else {
            // Idle: hand on what is gathered, and close partitions whose
            // position passed the end without a record there (a transaction
            // marker holds the last offset).
            for builder in builders.values_mut().filter(|b| !b.is_empty()) {
                if !send(builder.take()) {
                    return Ok(());
                }
            }
            let finished = finished_by_position(&consumer, &open);
            for (topic, partition, end) in finished {
                close(&mut open, &mut ends, &(topic.clone(), partition));
                let builder = builders
                    .entry(topic.clone())
                    .or_insert_with(|| ChunkBuilder::new(&topic, chunk_records));
                builder.through.insert(partition, end);
                if !send(builder.take()) {
                    return Ok(());
                }
            }
            continue;
        };
        let message = match received {
            Ok(message) => message,
            Err(
                error @ (KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                )
                | KafkaError::MessageConsumptionFatal(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                )),
            ) => {
                let topics: Vec<&str> = ranges.keys().map(|(t, _)| t.as_str()).collect();
                return Err(ReplayError::Runtime(RuntimeError::OffsetOutOfRange {
                    topics: topics.join(","),
                    detail: error.to_string(),
                }));
            }
            Err(error) => {
                // librdkafka retries broker and network trouble itself.
                tracing::warn!(%error, "Kafka consumer error during a rebuild");
                continue;
            }
        };
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        // Looked up by borrowed name: this runs for every record.
        let Some(end) = ends
            .get(topic)
            .and_then(|partitions| partitions.get(&partition))
            .copied()
        else {
            continue;
        };
        if offset >= end {
            let key = (topic.to_owned(), partition);
            close(&mut open, &mut ends, &key);
            pause(&consumer, &key);
            continue;
        }
        if !builders.contains_key(topic) {
            builders.insert(topic.to_owned(), ChunkBuilder::new(topic, chunk_records));
        }
        let Some(builder) = builders.get_mut(topic) else {
            continue;
        };
        let payload = message.payload().unwrap_or_default();
        match decode_envelope(payload) {
            Ok(envelope) => builder.events.push(Event {
                topic: builder.topic.clone(),
                partition,
                offset,
                timestamp_ms: message.timestamp().to_millis().unwrap_or_default(),
                envelope,
            }),
            Err(error) => builder.dead_letters.push(DeadLetter {
                topic: topic.to_owned(),
                partition,
                offset,
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                error_class: error.class(),
                error_message: error.to_string(),
            }),
        }
        builder.through.insert(partition, offset + 1);
        if offset + 1 >= end {
            let key = (topic.to_owned(), partition);
            close(&mut open, &mut ends, &key);
            pause(&consumer, &key);
        }
        if (builder.records() >= chunk_records || open.is_empty()) && !send(builder.take()) {
            return Ok(());
        }
    }
    for builder in builders.values_mut().filter(|b| !b.is_empty()) {
        if !send(builder.take()) {
            return Ok(());
        }
    }
    // Time blocked handing chunks on is time the appliers were the limit.
    tracing::info!(
        records = read.get(),
        elapsed_s = started.elapsed().as_secs_f64(),
        blocked_on_appliers_s = blocked.get().as_secs_f64(),
        "rebuild pass read the log"
    );
    Ok(())
}

/// Marks a partition as read to its end.
fn close(
    open: &mut HashMap<PartitionKey, i64>,
    ends: &mut HashMap<String, HashMap<i32, i64>>,
    key: &PartitionKey,
) {
    open.remove(key);
    if let Some(partitions) = ends.get_mut(&key.0) {
        partitions.remove(&key.1);
    }
}

/// Stops fetching a partition that reached its end (the live projector may be
/// far ahead of the stop; nothing past it is needed).
fn pause(consumer: &BaseConsumer, (topic, partition): &PartitionKey) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, *partition);
    if let Err(error) = consumer.pause(&tpl) {
        tracing::debug!(%error, topic, partition, "could not pause a finished partition");
    }
}

/// Open partitions whose consumer position is at or past their end.
fn finished_by_position(
    consumer: &BaseConsumer,
    open: &HashMap<PartitionKey, i64>,
) -> Vec<(String, i32, i64)> {
    let Ok(positions) = consumer.position() else {
        return Vec::new();
    };
    positions
        .elements()
        .iter()
        .filter_map(|element| {
            let key = (element.topic().to_owned(), element.partition());
            let end = *open.get(&key)?;
            match element.offset() {
                Offset::Offset(at) if at >= end => Some((key.0, key.1, end)),
                _ => None,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Applying
// ---------------------------------------------------------------------------

/// One target's state during the pass.
#[derive(Clone)]
struct TargetRun {
    target: Target,
    positions: HashMap<PartitionKey, Position>,
    /// Records to reach: the sum of the stop offsets.
    goal: i64,
    /// Records applied so far (the sum of positions, capped at the stops).
    done: Arc<AtomicI64>,
    initial: i64,
    /// Event logs whose key is deferred, answered from memory.
    keys: Arc<std::sync::Mutex<KeySets>>,
}

/// The events of one chunk a batch applies: all of it, shared, or the part
/// inside this target's range (copied; only at a resume point or a stop).
enum Part {
    Shared(Arc<Chunk>),
    Owned(Vec<Event>),
}

impl Part {
    fn events(&self) -> &[Event] {
        match self {
            Part::Shared(chunk) => &chunk.events,
            Part::Owned(events) => events,
        }
    }
}

impl TargetRun {
    fn new(
        target: Target,
        stored: &HashMap<PartitionKey, i64>,
        keys: Arc<std::sync::Mutex<KeySets>>,
    ) -> TargetRun {
        let positions: HashMap<PartitionKey, Position> = target
            .stop
            .keys()
            .map(|key| (key.clone(), stored.get(key).copied()))
            .collect();
        let goal = target.stop.values().sum();
        let initial = target
            .stop
            .iter()
            .map(|(key, stop)| positions[key].unwrap_or(0).min(*stop))
            .sum();
        TargetRun {
            target,
            positions,
            goal,
            done: Arc::new(AtomicI64::new(initial)),
            initial,
            keys,
        }
    }

    /// Applies chunks as they come, as many per transaction as are waiting (up
    /// to [`Limits::batch_events`]), until the reader is done or the pass cancelled.
    async fn apply_all(
        mut self,
        mut conn: PgConnection,
        mut chunks: mpsc::Receiver<Arc<Chunk>>,
        limits: Limits,
        committed: &mpsc::UnboundedSender<()>,
        pass: &CancellationToken,
    ) -> Result<(), ReplayError> {
        let (mut batches, mut applied, mut waiting, mut applying) =
            (0u64, 0usize, Duration::ZERO, Duration::ZERO);
        loop {
            let wait_started = Instant::now();
            let first = tokio::select! {
                _ = pass.cancelled() => return Ok(()),
                chunk = chunks.recv() => chunk,
            };
            waiting += wait_started.elapsed();
            let Some(first) = first else { break };
            let mut batch = vec![first];
            let mut events = batch[0].events.len();
            while events < limits.batch_events {
                match chunks.try_recv() {
                    Ok(chunk) => {
                        events += chunk.events.len();
                        batch.push(chunk);
                    }
                    Err(_) => break,
                }
            }
            let apply_started = Instant::now();
            if !self.commit(&mut conn, batch, pass).await? {
                return Ok(());
            }
            applying += apply_started.elapsed();
            let _ = committed.send(());
            batches += 1;
            applied += events;
        }
        // Where a rebuild's time goes: waiting on the reader means the log
        // or decoding is the limit; applying means PostgreSQL is.
        tracing::info!(
            schema = self.target.schema.as_str(),
            batches,
            events = applied,
            waiting_s = waiting.as_secs_f64(),
            applying_s = applying.as_secs_f64(),
            "rebuild pass applied"
        );
        conn.close().await?;
        Ok(())
    }

    /// One transaction for a batch of chunks; false when given up for shutdown.
    async fn commit(
        &mut self,
        conn: &mut PgConnection,
        batch: Vec<Arc<Chunk>>,
        pass: &CancellationToken,
    ) -> Result<bool, ReplayError> {
        let mut next: BTreeMap<PartitionKey, i64> = BTreeMap::new();
        let mut parts = Vec::with_capacity(batch.len());
        let mut dead_letters = Vec::new();
        for chunk in batch {
            let topic = chunk.topic.to_string();
            // Per partition of the chunk: the offsets this target still applies.
            let mut ranges: HashMap<i32, (i64, i64)> = HashMap::with_capacity(chunk.through.len());
            for (partition, through) in &chunk.through {
                let key = (topic.clone(), *partition);
                let (Some(stop), Some(at)) = (self.target.stop.get(&key), self.positions.get(&key))
                else {
                    continue;
                };
                let at = at.unwrap_or(0);
                ranges.insert(*partition, (at, *stop));
                let to = (*through).min(*stop);
                if to > at {
                    let entry = next.entry(key).or_insert(to);
                    *entry = (*entry).max(to);
                }
            }
            let wants = |partition: i32, offset: i64| {
                ranges
                    .get(&partition)
                    .is_some_and(|(at, stop)| offset >= *at && offset < *stop)
            };
            dead_letters.extend(
                chunk
                    .dead_letters
                    .iter()
                    .filter(|d| wants(d.partition, d.offset))
                    .cloned(),
            );
            if chunk.events.iter().all(|e| wants(e.partition, e.offset)) {
                parts.push(Part::Shared(chunk));
            } else {
                let wanted: Vec<Event> = chunk
                    .events
                    .iter()
                    .filter(|e| wants(e.partition, e.offset))
                    .cloned()
                    .collect();
                if !wanted.is_empty() {
                    parts.push(Part::Owned(wanted));
                }
            }
        }
        if next.is_empty() {
            return Ok(true);
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = self.try_commit(conn, &next, &parts, &dead_letters).await;
            {
                let mut keys = self
                    .keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if attempt.is_ok() {
                    keys.commit();
                } else {
                    keys.discard();
                }
            }
            match attempt {
                Ok(()) => break,
                Err(Attempt::Rejected {
                    part,
                    index,
                    reason,
                }) => {
                    // That event can never be applied (the live projector made
                    // it a dead letter too): record it and apply the rest.
                    let mut events = parts[part].events().to_vec();
                    let event = events.remove(index);
                    dead_letters.push(DeadLetter {
                        topic: event.topic.to_string(),
                        partition: event.partition,
                        offset: event.offset,
                        // The record's key is its world; the raw bytes were not
                        // kept past decoding, so the event is stored re-encoded.
                        key: Some(event.envelope.world_id.clone().into_bytes()),
                        payload: Some(event.envelope.to_bytes()),
                        error_class: "rejected",
                        error_message: reason,
                    });
                    parts[part] = Part::Owned(events);
                }
                Err(Attempt::Conflict) => {
                    return Err(ReplayError::Concurrent(
                        self.target.schema.as_str().to_owned(),
                    ));
                }
                Err(Attempt::Database(error)) => {
                    tracing::warn!(schema = self.target.schema.as_str(), %error, retry_in = ?backoff, "rebuild batch not applied; retrying");
                    tokio::select! {
                        _ = pass.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut advanced = 0;
        for (key, to) in next {
            let at = self.positions.get(&key).copied().flatten().unwrap_or(0);
            advanced += to - at;
            self.positions.insert(key, Some(to));
        }
        self.done.fetch_add(advanced, Ordering::Relaxed);
        Ok(true)
    }

    async fn try_commit(
        &self,
        conn: &mut PgConnection,
        next: &BTreeMap<PartitionKey, i64>,
        parts: &[Part],
        dead_letters: &[DeadLetter],
    ) -> Result<(), Attempt> {
        let schema = &self.target.schema;
        let mut tx = conn.begin().await?;
        // The projector's unqualified names resolve in the target schema.
        // Losing the last commits of a rebuild in a server crash is harmless:
        // rows and offsets go together, and the rebuild redoes them. Batches
        // are large; their sorts and hashes should stay in memory.
        sqlx::query(
            "SELECT set_config('search_path', $1, true),
                    set_config('synchronous_commit', 'off', true),
                    set_config('work_mem', '64MB', true)",
        )
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
        for ((topic, partition), to) in next {
            let was = self
                .positions
                .get(&(topic.clone(), *partition))
                .copied()
                .flatten();
            if !store::compare_and_set_offset(&mut tx, schema, topic, *partition, was, *to).await? {
                return Err(Attempt::Conflict);
            }
        }
        for (n, part) in parts.iter().enumerate() {
            let apply = self.target.projector.apply(&mut tx, part.events());
            match fresh::with_key_sets(self.keys.clone(), apply).await {
                Ok(()) => {}
                Err(ApplyError::Rejected { index, reason }) if index < part.events().len() => {
                    return Err(Attempt::Rejected {
                        part: n,
                        index,
                        reason,
                    });
                }
                Err(ApplyError::Rejected { reason, .. }) => {
                    return Err(Attempt::Database(sqlx::Error::Protocol(reason)));
                }
                Err(ApplyError::Database(error)) => return Err(Attempt::Database(error)),
            }
        }
        store::insert_dead_letters(&mut tx, schema, dead_letters).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Why one attempt at a batch did not commit.
enum Attempt {
    Rejected {
        part: usize,
        index: usize,
        reason: String,
    },
    Conflict,
    Database(sqlx::Error),
}

impl From<sqlx::Error> for Attempt {
    fn from(error: sqlx::Error) -> Attempt {
        Attempt::Database(error)
    }
}
