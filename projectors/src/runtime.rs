//! The projector runtime: Kafka in, one Postgres transaction per batch out.
//!
//! Invariants (see `projectors/DESIGN.md`):
//! 1. A batch's read-model writes and its partitions' next offsets commit in one
//!    transaction, or neither does.
//! 2. On assignment a partition starts at the offset stored in Postgres (or the
//!    beginning of the log when none is stored), never at Kafka's committed offset.
//! 3. The stored offset only moves by compare-and-set from the value this
//!    instance loaded; an instance that lost its partitions while paused cannot
//!    commit a stale batch.
//! 4. Nothing is skipped: undecodable events become dead letters inside the same
//!    transaction that moves the offset past them; database failures are retried
//!    forever with capped backoff; an out-of-range offset halts the projector.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, Connection, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_ops::config::KafkaSettings;
use worldline_ops::kafka::base_client_config;
use worldline_schemas::decode_envelope;

use crate::projector::{ApplyError, Event, Projector};
use crate::store::{
    DeadLetter, SchemaName, compare_and_set_offset, insert_dead_letters, load_offsets,
    prepare_schema, record_log_ends,
};

/// Where each assigned partition stands: `None` when no offset row exists yet.
type Positions = Arc<Mutex<HashMap<(String, i32), Option<i64>>>>;

/// Each partition's high watermark as last reported by librdkafka's statistics.
type HighWatermarks = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// How one projector instance runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Consumer group shared by every instance of this projector.
    pub group_id: String,
    /// Schema the read model is written to (the projector's name, or a shadow).
    pub schema: SchemaName,
    /// The topics to read (the projector's families, with the topic prefix).
    pub topics: Vec<String>,
    /// Largest batch applied in one transaction.
    pub batch_max_records: usize,
    /// Longest wait for a batch to fill once its first record arrived.
    pub batch_max_wait: Duration,
    /// Kafka group session timeout: how long a silent instance keeps its partitions.
    pub session_timeout: Duration,
    /// Topic that receives a copy of every dead letter (the table is the record
    /// of truth; the topic is for alerting and tooling). `None` disables it.
    pub dead_letter_topic: Option<String>,
    /// Stop once every listed partition's position reaches its offset, applying
    /// nothing at or past it (rebuilds that must end exactly where the live read
    /// model stands). `None` runs until shutdown.
    pub stop_at: Option<HashMap<(String, i32), i64>>,
}

/// Why a projector stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("could not prepare schema {schema}: {source}")]
    Prepare {
        schema: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("Kafka consumer error: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "offset out of range reading {topics}: a stored position is no longer in the log \
         ({detail}). Refusing to skip forward or back; rebuild the read model from the log or \
         fix the stored offset in <schema>.projector_offsets"
    )]
    OffsetOutOfRange { topics: String, detail: String },
}

struct ProjectorContext {
    pool: PgPool,
    schema: SchemaName,
    topics: Vec<String>,
    positions: Positions,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    health: Health,
    name: &'static str,
    high_watermarks: HighWatermarks,
}

impl ClientContext for ProjectorContext {
    /// Statistics arrive every `statistics.interval.ms`; they carry each fetched
    /// partition's high watermark, which lag is measured against without
    /// another round trip to the brokers.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut high = lock(&self.high_watermarks);
        for (topic_name, topic) in statistics.topics {
            for (partition, stats) in topic.partitions {
                if partition >= 0 && stats.hi_offset >= 0 {
                    high.insert((topic_name.clone(), partition), stats.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for ProjectorContext {
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(stored) = self.load_offsets_blocking() else {
                    // Shutting down while the database is unreachable: take
                    // nothing, so nothing can be applied from a guessed offset.
                    return;
                };
                let assigned: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let mut positions = lock(&self.positions);
                for (topic, partition) in assigned {
                    let offset = stored.get(&(topic.clone(), partition)).copied();
                    let start = offset.map(Offset::Offset).unwrap_or(Offset::Beginning);
                    if let Err(error) = tpl.set_partition_offset(&topic, partition, start) {
                        tracing::error!(%error, topic, partition, "could not set start offset");
                    }
                    positions.insert((topic, partition), offset);
                }
                drop(positions);
                tracing::info!(
                    projector = self.name,
                    partitions = tpl.count(),
                    "partitions assigned; starting from stored offsets"
                );
                let result = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let mut positions = lock(&self.positions);
                for element in tpl.elements() {
                    positions.remove(&(element.topic().to_owned(), element.partition()));
                }
                drop(positions);
                tracing::info!(
                    projector = self.name,
                    partitions = tpl.count(),
                    "partitions revoked"
                );
                let result = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                lock(&self.positions).clear();
                if let Err(error) = base_consumer.unassign() {
                    tracing::error!(%error, "unassign failed");
                }
            }
        }
    }
}

impl ProjectorContext {
    /// Loads stored offsets from inside the (synchronous) rebalance callback,
    /// retrying until the database answers or shutdown is requested.
    fn load_offsets_blocking(&self) -> Option<HashMap<(String, i32), i64>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = tokio::task::block_in_place(|| {
                self.runtime
                    .block_on(load_offsets(&self.pool, &self.schema, &self.topics))
            });
            match attempt {
                Ok(stored) => return Some(stored),
                Err(error) => {
                    self.health.set("postgres", Err(error.to_string()));
                    tracing::warn!(%error, "cannot load stored offsets; retrying");
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> rdkafka::message::Header<'a, &'a str> {
    rdkafka::message::Header {
        key,
        value: Some(value),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The log ends last stored, and when all of them were last refreshed.
#[derive(Debug, Default)]
struct RecordedEnds {
    ends: HashMap<(String, i32), i64>,
    at: Option<Instant>,
}

/// The outcome of trying to commit one batch.
enum BatchOutcome {
    Committed,
    /// Another instance moved these partitions' offsets first.
    Conflict(Vec<(String, i32)>),
}

/// One projector instance.
pub struct ProjectorRuntime {
    projector: Arc<dyn Projector>,
    pool: PgPool,
    kafka: KafkaSettings,
    options: RuntimeOptions,
    health: Health,
    dead_letter_producer: Option<rdkafka::producer::FutureProducer>,
}

impl std::fmt::Debug for ProjectorRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectorRuntime")
            .field("projector", &self.projector.name())
            .field("options", &self.options)
            .finish()
    }
}

impl ProjectorRuntime {
    /// A runtime for `projector`; nothing connects until [`ProjectorRuntime::run`].
    pub fn new(
        projector: Arc<dyn Projector>,
        pool: PgPool,
        kafka: KafkaSettings,
        options: RuntimeOptions,
        health: Health,
    ) -> ProjectorRuntime {
        let dead_letter_producer = options.dead_letter_topic.as_ref().and_then(|_| {
            base_client_config(
                &kafka,
                &format!("worldline-dead-letters-{}", projector.name()),
            )
            // A dead letter is evidence; write it like an event: once, durably.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Same partition as the poisoned record's world, as Java would pick.
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(|error| tracing::error!(%error, "dead-letter producer could not be created"))
            .ok()
        });
        ProjectorRuntime {
            projector,
            pool,
            kafka,
            options,
            health,
            dead_letter_producer,
        }
    }

    /// Consumes and applies until `shutdown` fires. Must run on a multi-thread
    /// Tokio runtime: the rebalance callback reads offsets from Postgres.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let name = self.projector.name();
        let schema = self.options.schema.clone();
        prepare_schema(&self.pool, &schema, self.projector.as_ref())
            .await
            .map_err(|source| RuntimeError::Prepare {
                schema: schema.as_str().to_owned(),
                source,
            })?;
        self.health.set("postgres", Ok(()));

        let positions: Positions = Arc::default();
        let high_watermarks: HighWatermarks = Arc::default();
        let context = ProjectorContext {
            high_watermarks: high_watermarks.clone(),
            pool: self.pool.clone(),
            schema: schema.clone(),
            topics: self.options.topics.clone(),
            positions: positions.clone(),
            runtime: tokio::runtime::Handle::current(),
            shutdown: shutdown.clone(),
            health: self.health.clone(),
            name,
        };
        let consumer: StreamConsumer<ProjectorContext> =
            base_client_config(&self.kafka, &format!("worldline-projector-{name}"))
                .set("group.id", &self.options.group_id)
                // Positions live in Postgres. Kafka's committed offsets are
                // written by hand after each Postgres commit, only so standard
                // lag tools see progress; they never decide where we start.
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // Never jump to the end (or anywhere) silently: an offset that
                // left the log is an error the operator must see.
                .set("auto.offset.reset", "error")
                // Cooperative rebalancing: adding an instance moves only the
                // partitions it takes; the others keep flowing.
                .set("partition.assignment.strategy", "cooperative-sticky")
                .set(
                    "session.timeout.ms",
                    self.options.session_timeout.as_millis().to_string(),
                )
                .set(
                    "heartbeat.interval.ms",
                    (self.options.session_timeout.as_millis() / 4)
                        .max(100)
                        .to_string(),
                )
                // Skip records of aborted transactions written by other tools.
                .set("isolation.level", "read_committed")
                // Fetch eagerly: batches of small events fill from one fetch.
                .set("fetch.wait.max.ms", "10")
                .set("fetch.min.bytes", "1")
                // librdkafka prefetches up to 64 MiB per consumer by default; a
                // process runs one consumer per projector, so bound the prefetch
                // (a batch is at most a few MB) to keep resident memory small.
                .set("queued.max.messages.kbytes", "8192")
                .set("fetch.max.bytes", "8388608")
                // Statistics feed the lag metrics (high watermarks per partition).
                .set("statistics.interval.ms", "1000")
                .create_with_context(context)?;
        let topics: Vec<&str> = self.options.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        self.health.set("kafka", Ok(()));
        tracing::info!(projector = name, schema = schema.as_str(), group = %self.options.group_id, ?topics, "projector started");

        let mut last_lag_report = Instant::now();
        let mut recorded_ends = RecordedEnds::default();
        let mut last_applied_ts: HashMap<(String, i32), i64> = HashMap::new();
        loop {
            let batch = match self.collect_batch(&consumer, &shutdown).await {
                Ok(batch) => batch,
                Err(error) => {
                    self.health.set("kafka", Err(error.to_string()));
                    metrics::counter!("worldline_projector_halted_total", "projector" => name)
                        .increment(1);
                    return Err(error);
                }
            };
            if !batch.is_empty() {
                let started = Instant::now();
                let applied = self
                    .apply_with_retry(
                        &consumer,
                        &positions,
                        batch,
                        &shutdown,
                        &mut last_applied_ts,
                    )
                    .await;
                metrics::histogram!("worldline_projector_batch_duration_seconds", "projector" => name)
                    .record(started.elapsed().as_secs_f64());
                if !applied {
                    break;
                }
            }
            if last_lag_report.elapsed() >= Duration::from_millis(500) {
                report_lag(&positions, &high_watermarks, &last_applied_ts, name);
                self.record_log_ends(&positions, &high_watermarks, &mut recorded_ends)
                    .await;
                last_lag_report = Instant::now();
            }
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(stop) = &self.options.stop_at
                && reached(&lock(&positions), stop)
            {
                tracing::info!(projector = name, "reached the requested stop offsets");
                break;
            }
        }
        tracing::info!(projector = name, "projector stopping; leaving the group");
        consumer.unsubscribe();
        Ok(())
    }

    /// Waits for a first record (or shutdown, or one second for housekeeping),
    /// then gathers more until the batch is full or `batch_max_wait` passed.
    async fn collect_batch(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OwnedMessage>, RuntimeError> {
        let mut batch = Vec::new();
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(batch),
            _ = tokio::time::sleep(Duration::from_secs(1)) => return Ok(batch),
            received = consumer.recv() => received,
        };
        if let Some(message) = self.accept(first)? {
            batch.push(message);
        }
        let deadline = tokio::time::Instant::now() + self.options.batch_max_wait;
        while batch.len() < self.options.batch_max_records {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(received) => {
                    if let Some(message) = self.accept(received)? {
                        batch.push(message);
                    }
                }
                Err(_elapsed) => break,
            }
        }
        Ok(batch)
    }

    fn accept(
        &self,
        received: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>,
    ) -> Result<Option<OwnedMessage>, RuntimeError> {
        match received {
            Ok(message) => {
                self.health.set("kafka", Ok(()));
                Ok(Some(message.detach()))
            }
            // With auto.offset.reset=error librdkafka reports the reset it refused
            // to do; either code means a stored position is outside the log.
            Err(
                error @ (KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                )
                | KafkaError::MessageConsumptionFatal(
                    RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
                )),
            ) => Err(RuntimeError::OffsetOutOfRange {
                topics: self.options.topics.join(","),
                detail: error.to_string(),
            }),
            Err(error) => {
                // Broker down, leader moving, network blips: librdkafka retries
                // these itself; report and keep consuming.
                tracing::warn!(%error, "Kafka consumer error");
                self.health.set("kafka", Err(error.to_string()));
                Ok(None)
            }
        }
    }

    /// Applies a batch, retrying database failures until they pass or shutdown is
    /// requested. Returns false when it gave up because of shutdown.
    async fn apply_with_retry(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        positions: &Positions,
        batch: Vec<OwnedMessage>,
        shutdown: &CancellationToken,
        last_applied_ts: &mut HashMap<(String, i32), i64>,
    ) -> bool {
        let name = self.projector.name();
        // Keep only records of partitions we still own, at or past our position.
        let snapshot = lock(positions).clone();
        let stop = self.options.stop_at.as_ref();
        let batch: Vec<OwnedMessage> = batch
            .into_iter()
            .filter(|m| {
                let key = (m.topic().to_owned(), m.partition());
                let before_stop =
                    stop.is_none_or(|stop| m.offset() < stop.get(&key).copied().unwrap_or(0));
                before_stop
                    && match snapshot.get(&key) {
                        Some(Some(next)) => m.offset() >= *next,
                        Some(None) => true,
                        None => false,
                    }
            })
            .collect();
        if batch.is_empty() {
            return true;
        }
        let mut next_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for message in &batch {
            let entry = next_offsets
                .entry((message.topic().to_owned(), message.partition()))
                .or_insert(0);
            *entry = (*entry).max(message.offset() + 1);
        }
        let (mut events, mut dead_letters) = decode_batch(&batch);
        let mut published = 0usize;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Dead letters reach their topic before the offset moves past them:
            // a crash in between publishes them again (the topic is at least
            // once; its headers carry the position to dedupe on), never loses one.
            if published < dead_letters.len() {
                match self.publish_dead_letters(&dead_letters[published..]).await {
                    Ok(()) => published = dead_letters.len(),
                    Err(error) => {
                        tracing::warn!(projector = name, %error, retry_in = ?backoff, "dead-letter topic unavailable; retrying");
                        self.health.set("kafka", Err(error.to_string()));
                        tokio::select! {
                            _ = shutdown.cancelled() => return false,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            match self
                .commit_batch(&snapshot, &next_offsets, &events, &dead_letters)
                .await
            {
                Ok(BatchOutcome::Committed) => {
                    self.health.set("postgres", Ok(()));
                    let mut owned = lock(positions);
                    for (key, next) in &next_offsets {
                        if let Some(position) = owned.get_mut(key) {
                            *position = Some(*next);
                        }
                    }
                    drop(owned);
                    metrics::counter!("worldline_projector_events_total", "projector" => name, "result" => "applied")
                        .increment(events.len() as u64);
                    if !dead_letters.is_empty() {
                        metrics::counter!("worldline_projector_events_total", "projector" => name, "result" => "dead_letter")
                            .increment(dead_letters.len() as u64);
                        metrics::counter!("worldline_dead_letters_total", "projector" => name)
                            .increment(dead_letters.len() as u64);
                    }
                    for message in &batch {
                        if let Some(ts) = message.timestamp().to_millis() {
                            last_applied_ts
                                .insert((message.topic().to_owned(), message.partition()), ts);
                        }
                    }
                    commit_to_kafka(consumer, &next_offsets);
                    return true;
                }
                Ok(BatchOutcome::Conflict(partitions)) => {
                    tracing::warn!(
                        projector = name,
                        ?partitions,
                        "stored offsets moved under us (another instance applied first); reloading and seeking"
                    );
                    metrics::counter!("worldline_projector_offset_conflicts_total", "projector" => name).increment(1);
                    // The whole batch rolled back, but the consumer has already
                    // read past every partition in it: seek all of them back to
                    // their stored offsets, or the next batch of a partition that
                    // did not conflict would start after a gap that its
                    // compare-and-set (expected offset unchanged) cannot see.
                    let in_batch: Vec<(String, i32)> = next_offsets.keys().cloned().collect();
                    self.resync(consumer, positions, &in_batch).await;
                    return true;
                }
                Err(ApplyError::Rejected { index, reason }) if index < events.len() => {
                    let event = events.remove(index);
                    let raw = batch.iter().find(|m| {
                        m.topic() == &*event.topic
                            && m.partition() == event.partition
                            && m.offset() == event.offset
                    });
                    dead_letters.push(DeadLetter {
                        topic: event.topic.to_string(),
                        partition: event.partition,
                        offset: event.offset,
                        key: raw.and_then(|m| m.key().map(<[u8]>::to_vec)),
                        payload: raw.and_then(|m| m.payload().map(<[u8]>::to_vec)),
                        error_class: "rejected",
                        error_message: reason,
                    });
                }
                Err(error) => {
                    tracing::warn!(projector = name, %error, retry_in = ?backoff, "batch not applied; retrying");
                    self.health.set("postgres", Err(error.to_string()));
                    metrics::counter!("worldline_projector_retries_total", "projector" => name)
                        .increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Stores the log ends of owned partitions that moved (or were last stored
    /// long ago, so readers can tell a live figure from a stale one). Best
    /// effort: lag reporting never holds up or fails the projector.
    async fn record_log_ends(
        &self,
        positions: &Positions,
        high_watermarks: &HighWatermarks,
        recorded: &mut RecordedEnds,
    ) {
        let high_watermarks = lock(high_watermarks).clone();
        let refresh_all = recorded
            .at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        let ends: Vec<(String, i32, i64)> = lock(positions)
            .keys()
            .filter_map(|key| {
                let end = *high_watermarks.get(key)?;
                (refresh_all || recorded.ends.get(key) != Some(&end))
                    .then(|| (key.0.clone(), key.1, end))
            })
            .collect();
        if ends.is_empty() {
            return;
        }
        let write = record_log_ends(&self.pool, &self.options.schema, &ends);
        match tokio::time::timeout(Duration::from_secs(1), write).await {
            Ok(Ok(())) => {
                for (topic, partition, end) in ends {
                    recorded.ends.insert((topic, partition), end);
                }
                if refresh_all {
                    recorded.at = Some(Instant::now());
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "could not record log ends"),
            Err(_elapsed) => tracing::debug!("recording log ends timed out"),
        }
    }

    /// Publishes copies of dead letters (raw key and bytes, the reason in headers).
    async fn publish_dead_letters(&self, letters: &[DeadLetter]) -> Result<(), KafkaError> {
        let (Some(topic), Some(producer)) =
            (&self.options.dead_letter_topic, &self.dead_letter_producer)
        else {
            return Ok(());
        };
        let name = self.projector.name();
        let sends = letters.iter().map(|letter| {
            let partition = letter.partition.to_string();
            let offset = letter.offset.to_string();
            let sha = crate::store::sha256_hex(letter.payload.as_deref().unwrap_or_default());
            let headers = rdkafka::message::OwnedHeaders::new_with_capacity(6)
                .insert(header("wl_dlq_projector", name))
                .insert(header("wl_dlq_topic", &letter.topic))
                .insert(header("wl_dlq_partition", &partition))
                .insert(header("wl_dlq_offset", &offset))
                .insert(header("wl_dlq_error_class", letter.error_class))
                .insert(header("wl_dlq_error", &letter.error_message))
                .insert(header("wl_dlq_payload_sha256", &sha));
            let mut record =
                rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
            if let Some(key) = &letter.key {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &letter.payload {
                record = record.payload(payload.as_slice());
            }
            producer.send(record, Duration::from_secs(10))
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(error, _)| error)?;
        }
        Ok(())
    }

    /// One transaction: move offsets (compare-and-set, first, so a conflict costs
    /// nothing), apply the events, record dead letters, commit.
    async fn commit_batch(
        &self,
        expected: &HashMap<(String, i32), Option<i64>>,
        next_offsets: &BTreeMap<(String, i32), i64>,
        events: &[Event],
        dead_letters: &[DeadLetter],
    ) -> Result<BatchOutcome, ApplyError> {
        let schema = &self.options.schema;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        // Shared with every other batch of this schema, exclusive for a schema
        // swap (`replay`): a swap waits for in-flight batches, and a batch that
        // starts during a swap resolves every name after it, in the new schema.
        sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext('worldline.schema.' || $1))")
            .bind(schema.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}",
            schema.as_str()
        )))
        .execute(&mut *tx)
        .await?;
        // A paused instance holding these rows must not stall the live one for long.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await?;
        let mut conflicts = Vec::new();
        for ((topic, partition), next) in next_offsets {
            let was = expected
                .get(&(topic.clone(), *partition))
                .copied()
                .flatten();
            if !compare_and_set_offset(&mut tx, schema, topic, *partition, was, *next).await? {
                conflicts.push((topic.clone(), *partition));
            }
        }
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(BatchOutcome::Conflict(conflicts));
        }
        self.projector.apply(&mut tx, events).await?;
        insert_dead_letters(&mut tx, schema, dead_letters).await?;
        // Delivered at commit, only if it commits: wakes API requests waiting
        // for read-your-writes. A hint only; waiters re-read the offsets.
        sqlx::query("SELECT pg_notify('worldline_progress', $1)")
            .bind(schema.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(BatchOutcome::Committed)
    }

    /// After a conflict: adopt the stored offsets and seek there.
    async fn resync(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        positions: &Positions,
        partitions: &[(String, i32)],
    ) {
        let stored = match load_offsets(&self.pool, &self.options.schema, &self.options.topics)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, "could not reload offsets; dropping positions until reassigned");
                let mut owned = lock(positions);
                for key in partitions {
                    owned.remove(key);
                }
                return;
            }
        };
        for (topic, partition) in partitions {
            // No stored row yet: nothing of this partition was ever applied.
            let next = stored.get(&(topic.clone(), *partition)).copied();
            let mut owned = lock(positions);
            if let Some(position) = owned.get_mut(&(topic.clone(), *partition)) {
                *position = next;
                drop(owned);
                if let Err(error) = consumer.seek(
                    topic,
                    *partition,
                    next.map_or(Offset::Beginning, Offset::Offset),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(%error, topic, partition, "seek failed; dropping position until reassigned");
                    lock(positions).remove(&(topic.clone(), *partition));
                }
            }
        }
    }
}

/// Whether every partition with a stop offset has been applied up to it.
fn reached(
    positions: &HashMap<(String, i32), Option<i64>>,
    stop: &HashMap<(String, i32), i64>,
) -> bool {
    stop.iter().all(|(key, target)| {
        *target <= 0
            || positions
                .get(key)
                .copied()
                .flatten()
                .is_some_and(|at| at >= *target)
    })
}

/// Splits raw records into decoded events and dead letters.
fn decode_batch(batch: &[OwnedMessage]) -> (Vec<Event>, Vec<DeadLetter>) {
    let mut events = Vec::with_capacity(batch.len());
    let mut dead_letters = Vec::new();
    let mut topic_names: HashMap<&str, Arc<str>> = HashMap::new();
    for message in batch {
        let topic = topic_names
            .entry(message.topic())
            .or_insert_with(|| Arc::from(message.topic()))
            .clone();
        match decode_envelope(message.payload().unwrap_or_default()) {
            Ok(envelope) => events.push(Event {
                topic,
                partition: message.partition(),
                offset: message.offset(),
                timestamp_ms: message.timestamp().to_millis().unwrap_or_default(),
                envelope,
            }),
            Err(error) => {
                tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %error, "dead letter");
                dead_letters.push(DeadLetter {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    error_class: error.class(),
                    error_message: error.to_string(),
                })
            }
        }
    }
    (events, dead_letters)
}

/// Mirrors the committed positions into Kafka so `kafka-consumer-groups` and
/// other lag tools see progress. Best effort: Postgres is the truth.
fn commit_to_kafka(
    consumer: &StreamConsumer<ProjectorContext>,
    next_offsets: &BTreeMap<(String, i32), i64>,
) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in next_offsets {
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .is_err()
        {
            return;
        }
    }
    if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(%error, "async offset commit to Kafka failed (informational only)");
    }
}

fn report_lag(
    positions: &Positions,
    high_watermarks: &HighWatermarks,
    last_applied_ts: &HashMap<(String, i32), i64>,
    name: &'static str,
) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let high_watermarks = lock(high_watermarks).clone();
    for ((topic, partition), position) in lock(positions).iter() {
        let Some(&high) = high_watermarks.get(&(topic.clone(), *partition)) else {
            continue;
        };
        let lag = (high - position.unwrap_or(0)).max(0);
        let labels = [
            ("projector", name.to_owned()),
            ("topic", topic.clone()),
            ("partition", partition.to_string()),
        ];
        metrics::gauge!("worldline_projector_lag_records", &labels).set(lag as f64);
        let seconds = if lag == 0 {
            0.0
        } else {
            last_applied_ts
                .get(&(topic.clone(), *partition))
                .map(|ts| ((now_ms - ts).max(0) as f64) / 1000.0)
                .unwrap_or(0.0)
        };
        metrics::gauge!("worldline_projector_lag_seconds", &labels).set(seconds);
    }
}
