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

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_ops::config::KafkaSettings;
use worldline_ops::consistency::PROGRESS_CHANNEL;
use worldline_ops::kafka::{base_client_config, set_defaults};
use worldline_schemas::decode_envelope;

use crate::projector::{ApplyError, Event, Projector};
use crate::store::{
    DeadLetter, OffsetMove, SchemaName, compare_and_set_offsets, insert_dead_letters, load_offsets,
    prepare_schema, record_log_ends,
};

/// Where each assigned partition stands: `None` when no offset row exists yet.
type Positions = Arc<Mutex<HashMap<(String, i32), Option<i64>>>>;

/// Each partition's high watermark, and when the set was last refreshed.
#[derive(Debug, Default)]
struct LogEnds {
    ends: HashMap<(String, i32), i64>,
    refreshed_at: Option<Instant>,
}

type SharedLogEnds = Arc<Mutex<LogEnds>>;

/// The Kafka timestamp (ms) of the oldest record of each partition that this
/// instance has read but not yet committed: what `lag_seconds` measures from.
type Unapplied = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// How often lag is reported; librdkafka's statistics (the usual source of
/// high watermarks) arrive every `statistics.interval.ms` = 1 s.
const LAG_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Statistics are delivered only while the consumer is polled, which stops while
/// a batch is retried; past this age the lag reporter asks the brokers itself.
const STALE_LOG_ENDS: Duration = Duration::from_millis(2500);

/// Longest a batch's transaction may sit idle between two statements before
/// PostgreSQL ends the session. A healthy batch sends its statements back to
/// back (milliseconds apart); an instance frozen mid-batch (SIGSTOP, a VM
/// pause, a debugger) holds row locks on `projector_offsets` and would stall
/// its partitions for every other instance until it woke up. The server
/// ending its session rolls the whole batch back, releases the locks, and the
/// instance that now owns the partitions goes on; see DESIGN.md, "Zombies".
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// How often applied positions are mirrored into Kafka's committed offsets.
/// They are read only by lag tools (Postgres decides where to start), so a
/// second of delay costs nothing, while a commit per batch would be hundreds
/// of requests per second to the group coordinator under load.
const KAFKA_MIRROR_INTERVAL: Duration = Duration::from_secs(1);

/// librdkafka's fetch settings, unless `kafka.properties` sets them (measured
/// with `ops/bench/project.sh`: throughput, freshness and resident memory).
///
/// A `worldline project` process runs one consumer per projector, and `worlds`
/// alone reads every family's partitions (40 at 8 per topic). librdkafka's
/// defaults (keep fetching a partition until 100 000 records or 64 MiB wait,
/// 50 MiB per fetch) would hold hundreds of MiB of records no batch needs yet.
const FETCH_DEFAULTS: &[(&str, &str)] = &[
    // 2 000 records per partition: with the default 5 000-record batch, a
    // full batch ahead once a consumer holds three partitions; the byte
    // limit below binds long before either.
    ("queued.min.messages", "2000"),
    // The consumer's whole prefetch queue, and the most one fetch brings
    // (librdkafka's floor: message.max.bytes). Larger values bought no
    // throughput once the backoff below was short, only resident memory.
    ("queued.max.messages.kbytes", "512"),
    ("fetch.max.bytes", "1048576"),
    // A partition whose queue is full is not fetched again for this long
    // (librdkafka's default: a whole second). With queues a batch deep, a
    // projector drains its queue in tens of milliseconds and then sat idle
    // for the rest of that second, behind a log that kept growing.
    ("fetch.queue.backoff.ms", "20"),
    // The broker holds a fetch until 64 KiB are there or 15 ms passed. A
    // caught-up consumer answered at the first byte re-fetches for every
    // produce request: five of them kept the broker busier than the load did,
    // and every tiny batch was a transaction of its own. 15 ms is well inside
    // the freshness budget; under load 64 KiB arrive sooner than that.
    ("fetch.min.bytes", "65536"),
    ("fetch.wait.max.ms", "15"),
];

/// What a batch keeps of one Kafka record. Not an `OwnedMessage`: detaching
/// one copies its topic name and every header (nothing here reads headers),
/// a dozen allocations per record that took a quarter of a projector's CPU.
/// Here the topic name is shared and only the key and value are copied.
#[derive(Debug)]
struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    /// The producer's create time, milliseconds since the epoch.
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

impl Record {
    fn copied_from(message: &BorrowedMessage<'_>, topic: Arc<str>) -> Record {
        Record {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        }
    }
}

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
    log_ends: SharedLogEnds,
    unapplied: Unapplied,
}

impl ClientContext for ProjectorContext {
    /// Statistics arrive every `statistics.interval.ms`; they carry each fetched
    /// partition's high watermark, which lag is measured against without
    /// another round trip to the brokers.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut log_ends = lock(&self.log_ends);
        for (topic_name, topic) in statistics.topics {
            for (partition, stats) in topic.partitions {
                if partition >= 0 && stats.hi_offset >= 0 {
                    log_ends
                        .ends
                        .insert((topic_name.clone(), partition), stats.hi_offset);
                }
            }
        }
        log_ends.refreshed_at = Some(Instant::now());
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
                let mut unapplied = lock(&self.unapplied);
                for (topic, partition) in &assigned {
                    let key = (topic.clone(), *partition);
                    let offset = stored.get(&key).copied();
                    let start = offset.map(Offset::Offset).unwrap_or(Offset::Beginning);
                    if let Err(error) = tpl.set_partition_offset(topic, *partition, start) {
                        tracing::error!(%error, topic, partition, "could not set start offset");
                    }
                    unapplied.remove(&key);
                    positions.insert(key, offset);
                    self.set_owned(topic, *partition, true);
                }
                drop(unapplied);
                drop(positions);
                metrics::counter!("worldline_projector_partitions_assigned_total", "projector" => self.name)
                    .increment(assigned.len() as u64);
                // A cooperative round that moves nothing here assigns an empty set.
                if !assigned.is_empty() {
                    tracing::info!(
                        projector = self.name,
                        partitions = ?assigned,
                        incremental = cooperative,
                        "partitions assigned; starting from stored offsets"
                    );
                }
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
                let revoked: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let mut positions = lock(&self.positions);
                let mut unapplied = lock(&self.unapplied);
                for key in &revoked {
                    positions.remove(key);
                    unapplied.remove(key);
                    self.set_owned(&key.0, key.1, false);
                }
                drop(unapplied);
                drop(positions);
                // With cooperative rebalancing an instance gives up only the
                // partitions that move; this counter shows it (an eager
                // protocol would revoke everything on every join).
                metrics::counter!("worldline_projector_partitions_revoked_total", "projector" => self.name)
                    .increment(revoked.len() as u64);
                tracing::info!(
                    projector = self.name,
                    partitions = ?revoked,
                    lost = base_consumer.assignment_lost(),
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
                let dropped: Vec<(String, i32)> =
                    lock(&self.positions).drain().map(|(k, _)| k).collect();
                lock(&self.unapplied).clear();
                for (topic, partition) in &dropped {
                    self.set_owned(topic, *partition, false);
                }
                if let Err(error) = base_consumer.unassign() {
                    tracing::error!(%error, "unassign failed");
                }
            }
        }
    }
}

impl ProjectorContext {
    /// `worldline_projector_partition_owned` is 1 for each partition this
    /// instance applies, so an operator (or a test) sees who owns what.
    fn set_owned(&self, topic: &str, partition: i32, owned: bool) {
        metrics::gauge!(
            "worldline_projector_partition_owned",
            "projector" => self.name,
            "topic" => topic.to_owned(),
            "partition" => partition.to_string()
        )
        .set(if owned { 1.0 } else { 0.0 });
    }

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
    /// One shared name per subscribed topic, handed to every record read.
    topic_names: Vec<Arc<str>>,
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
        let topic_names = options
            .topics
            .iter()
            .map(|t| Arc::from(t.as_str()))
            .collect();
        ProjectorRuntime {
            projector,
            pool,
            kafka,
            options,
            health,
            dead_letter_producer,
            topic_names,
        }
    }

    /// Consumes and applies until `shutdown` fires. Must run on a multi-thread
    /// Tokio runtime: the rebalance callback reads offsets from Postgres.
    ///
    /// An error means this projector halted for good; its readiness check
    /// (`projector <name>`) stays failed, so no other projector of the same
    /// process can mask it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let name = self.projector.name();
        let result = self.consume(shutdown).await;
        if let Err(error) = &result {
            metrics::counter!("worldline_projector_halted_total", "projector" => name).increment(1);
            self.health.set(
                &format!("projector {name}"),
                Err(format!("halted: {error}")),
            );
        }
        result
    }

    async fn consume(&self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let name = self.projector.name();
        let schema = self.options.schema.clone();
        prepare_schema(&self.pool, &schema, self.projector.as_ref())
            .await
            .map_err(|source| RuntimeError::Prepare {
                schema: schema.as_str().to_owned(),
                source,
            })?;
        self.health.set("postgres", Ok(()));
        self.health.set(&format!("projector {name}"), Ok(()));

        let positions: Positions = Arc::default();
        let log_ends: SharedLogEnds = Arc::default();
        let unapplied: Unapplied = Arc::default();
        let context = ProjectorContext {
            log_ends: log_ends.clone(),
            unapplied: unapplied.clone(),
            pool: self.pool.clone(),
            schema: schema.clone(),
            topics: self.options.topics.clone(),
            positions: positions.clone(),
            runtime: tokio::runtime::Handle::current(),
            shutdown: shutdown.clone(),
            health: self.health.clone(),
            name,
        };
        let mut config = base_client_config(&self.kafka, &format!("worldline-projector-{name}"));
        config
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
            // Statistics feed the lag metrics (high watermarks per partition).
            .set("statistics.interval.ms", "1000");
        set_defaults(&mut config, FETCH_DEFAULTS);
        let consumer: StreamConsumer<ProjectorContext> = config.create_with_context(context)?;
        let consumer = Arc::new(consumer);
        let topics: Vec<&str> = self.options.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        self.health.set("kafka", Ok(()));
        tracing::info!(projector = name, schema = schema.as_str(), group = %self.options.group_id, ?topics, "projector started");

        // Lag is reported beside the batch loop, not from it: a batch retried
        // through a database outage must not freeze the very gauges that show
        // the outage.
        let stop_reporting = CancellationToken::new();
        let reporter = LagReporter {
            name,
            pool: self.pool.clone(),
            schema: schema.clone(),
            consumer: consumer.clone(),
            positions: positions.clone(),
            log_ends,
            unapplied: unapplied.clone(),
        };
        let reporting = tokio::spawn(reporter.run(stop_reporting.clone()));
        let result = self
            .apply_until_stopped(&consumer, &positions, &unapplied, &shutdown)
            .await;
        stop_reporting.cancel();
        if let Err(error) = reporting.await {
            tracing::warn!(%error, "lag reporter failed");
        }
        if result.is_ok() {
            tracing::info!(projector = name, "projector stopping; leaving the group");
            consumer.unsubscribe();
        }
        result
    }

    async fn apply_until_stopped(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        positions: &Positions,
        unapplied: &Unapplied,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        let name = self.projector.name();
        let mut state = BatchLoop::new(&self.pool);
        let result = loop {
            let batch = match self.collect_batch(consumer, shutdown).await {
                Ok(batch) => batch,
                Err(error) => {
                    self.health.set("kafka", Err(error.to_string()));
                    break Err(error);
                }
            };
            if !batch.is_empty() {
                let started = Instant::now();
                let applied = self
                    .apply_with_retry(&mut state, consumer, positions, unapplied, batch, shutdown)
                    .await;
                metrics::histogram!("worldline_projector_batch_duration_seconds", "projector" => name)
                    .record(started.elapsed().as_secs_f64());
                if !applied {
                    break Ok(());
                }
            }
            state.mirror.flush_if_due(consumer, positions);
            if shutdown.is_cancelled() {
                break Ok(());
            }
            if let Some(stop) = &self.options.stop_at
                && reached(&lock(positions), stop)
            {
                tracing::info!(projector = name, "reached the requested stop offsets");
                break Ok(());
            }
        };
        state.mirror.flush(consumer, positions);
        result
    }

    /// Waits for a first record (or shutdown, or one second for housekeeping),
    /// then gathers more until the batch is full or `batch_max_wait` passed.
    async fn collect_batch(
        &self,
        consumer: &StreamConsumer<ProjectorContext>,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Record>, RuntimeError> {
        let mut batch = Vec::new();
        // One stream for the whole batch: each `recv()` would register and
        // drop a waker slot per record.
        let mut stream = consumer.stream();
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Ok(batch),
            _ = tokio::time::sleep(Duration::from_secs(1)) => return Ok(batch),
            received = stream.next() => received,
        };
        if let Some(message) = self.accept(first)? {
            batch.push(message);
        }
        let deadline = tokio::time::Instant::now() + self.options.batch_max_wait;
        while batch.len() < self.options.batch_max_records {
            // Records already fetched join without a timer; only an empty
            // queue waits, until the batch's deadline.
            let received = match stream.next().now_or_never() {
                Some(received) => received,
                None => match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(received) => received,
                    Err(_elapsed) => break,
                },
            };
            if let Some(message) = self.accept(received)? {
                batch.push(message);
            }
        }
        if !batch.is_empty() {
            self.health.set("kafka", Ok(()));
        }
        Ok(batch)
    }

    fn topic_name(&self, topic: &str) -> Arc<str> {
        self.topic_names
            .iter()
            .find(|name| ***name == *topic)
            .cloned()
            .unwrap_or_else(|| Arc::from(topic))
    }

    /// `map` with each topic name replaced by the shared one records carry.
    fn keyed_by_shared_topic<V: Copy>(
        &self,
        map: &HashMap<(String, i32), V>,
    ) -> HashMap<(Arc<str>, i32), V> {
        map.iter()
            .map(|((topic, partition), value)| ((self.topic_name(topic), *partition), *value))
            .collect()
    }

    fn accept(
        &self,
        received: Option<Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>>,
    ) -> Result<Option<Record>, RuntimeError> {
        // A consumer's stream never ends; `None` cannot happen.
        let Some(received) = received else {
            return Ok(None);
        };
        match received {
            Ok(message) => Ok(Some(Record::copied_from(
                &message,
                self.topic_name(message.topic()),
            ))),
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
        state: &mut BatchLoop,
        consumer: &StreamConsumer<ProjectorContext>,
        positions: &Positions,
        unapplied: &Unapplied,
        batch: Vec<Record>,
        shutdown: &CancellationToken,
    ) -> bool {
        let name = self.projector.name();
        // Keep only records of partitions we still own, at or past our position.
        let snapshot = lock(positions).clone();
        // Looked up per record under the records' shared topic names, so the
        // filter allocates nothing per record.
        let owned = self.keyed_by_shared_topic(&snapshot);
        let stop = self
            .options
            .stop_at
            .as_ref()
            .map(|stop| self.keyed_by_shared_topic(stop));
        let batch: Vec<Record> = batch
            .into_iter()
            .filter(|record| {
                let key = (record.topic.clone(), record.partition);
                let before_stop = stop
                    .as_ref()
                    .is_none_or(|stop| record.offset < stop.get(&key).copied().unwrap_or(0));
                before_stop
                    && match owned.get(&key) {
                        Some(Some(next)) => record.offset >= *next,
                        Some(None) => true,
                        None => false,
                    }
            })
            .collect();
        if batch.is_empty() {
            return true;
        }
        let mut ends: HashMap<(Arc<str>, i32), i64> = HashMap::new();
        let mut oldest_timestamps: Vec<((String, i32), i64)> = Vec::new();
        for record in &batch {
            let key = (record.topic.clone(), record.partition);
            if !ends.contains_key(&key)
                && let Some(ts) = record.timestamp_ms
            {
                // Records of a partition arrive in log order: its first one
                // here is the oldest it has not applied.
                oldest_timestamps.push(((record.topic.to_string(), record.partition), ts));
            }
            let entry = ends.entry(key).or_insert(0);
            *entry = (*entry).max(record.offset + 1);
        }
        let next_offsets: BTreeMap<(String, i32), i64> = ends
            .into_iter()
            .map(|((topic, partition), next)| ((topic.to_string(), partition), next))
            .collect();
        {
            let mut unapplied = lock(unapplied);
            for (key, ts) in oldest_timestamps {
                unapplied.entry(key).or_insert(ts);
            }
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
            let outcome = self
                .commit_batch(state, &snapshot, &next_offsets, &events, &dead_letters)
                .await;
            if outcome.is_err() {
                // Whatever failed, the session may be gone or mid-transaction:
                // the retry starts on a new connection.
                state.connection = None;
            }
            match outcome {
                Ok(BatchOutcome::Committed) => {
                    self.health.set("postgres", Ok(()));
                    let mut pending = lock(unapplied);
                    for key in next_offsets.keys() {
                        pending.remove(key);
                    }
                    drop(pending);
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
                    state.mirror.applied(&next_offsets);
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
                    let mut pending = lock(unapplied);
                    for key in &in_batch {
                        pending.remove(key);
                    }
                    return true;
                }
                Err(ApplyError::Rejected { index, reason }) if index < events.len() => {
                    let event = events.remove(index);
                    let raw = batch.iter().find(|record| {
                        record.topic == event.topic
                            && record.partition == event.partition
                            && record.offset == event.offset
                    });
                    dead_letters.push(DeadLetter {
                        topic: event.topic.to_string(),
                        partition: event.partition,
                        offset: event.offset,
                        key: raw.and_then(|record| record.key.clone()),
                        payload: raw.and_then(|record| record.payload.clone()),
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
    /// nothing), apply the events, record dead letters, commit. The offsets,
    /// the progress notification and the transaction's settings cost two
    /// round trips together; the read model's statements come on top, then the
    /// commit.
    async fn commit_batch(
        &self,
        state: &mut BatchLoop,
        expected: &HashMap<(String, i32), Option<i64>>,
        next_offsets: &BTreeMap<(String, i32), i64>,
        events: &[Event],
        dead_letters: &[DeadLetter],
    ) -> Result<BatchOutcome, ApplyError> {
        let schema = &self.options.schema;
        let conn = state.connection().await?;
        // The transaction starts with its settings, in one simple-query message
        // (so one round trip, and no moment at which the server waits on this
        // client with a transaction open but no timeout in force):
        // - `idle_in_transaction_session_timeout`: a frozen instance's session
        //   is ended by the server, its locks released (see the constant);
        // - `synchronous_commit = off`: the commit returns once its WAL is
        //   written, not flushed; rows and offsets stay atomic together, and a
        //   server crash that loses the last commits loses both, which the
        //   next compare-and-set detects (see DESIGN.md, "Durability");
        // - the advisory lock: shared with every other batch of this schema,
        //   exclusive for a schema swap (`replay`): a swap waits for in-flight
        //   batches, and a batch that starts during a swap resolves every name
        //   after it, in the new schema;
        // - `search_path` aims the projector's unqualified names at the schema;
        // - `lock_timeout`: a wait on rows a frozen instance holds becomes a
        //   retried error instead of a wait as long as its freeze;
        // - the progress notification: delivered at commit, only if it commits,
        //   it wakes API requests waiting for read-your-writes (a hint only;
        //   waiters re-read the offsets).
        // Every value is a constant or a validated schema name.
        let s = schema.as_str();
        let mut tx = conn
            .begin_with(AssertSqlSafe(format!(
                "BEGIN;
                 SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}';
                 SET LOCAL synchronous_commit = off;
                 SELECT pg_advisory_xact_lock_shared(hashtext('worldline.schema.{s}'));
                 SET LOCAL search_path TO {s};
                 SET LOCAL lock_timeout = '5s';
                 SELECT pg_notify('{PROGRESS_CHANNEL}', '{s}')"
            )))
            .await?;
        let moves: Vec<OffsetMove> = next_offsets
            .iter()
            .map(|((topic, partition), next)| OffsetMove {
                topic: topic.clone(),
                partition: *partition,
                expected: expected
                    .get(&(topic.clone(), *partition))
                    .copied()
                    .flatten(),
                next: *next,
            })
            .collect();
        let conflicts = compare_and_set_offsets(&mut tx, schema, &moves).await?;
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(BatchOutcome::Conflict(conflicts));
        }
        self.projector.apply(&mut tx, events).await?;
        insert_dead_letters(&mut tx, schema, dead_letters).await?;
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
fn decode_batch(batch: &[Record]) -> (Vec<Event>, Vec<DeadLetter>) {
    let mut events = Vec::with_capacity(batch.len());
    let mut dead_letters = Vec::new();
    for record in batch {
        match decode_envelope(record.payload.as_deref().unwrap_or_default()) {
            Ok(envelope) => events.push(Event {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                timestamp_ms: record.timestamp_ms.unwrap_or_default(),
                envelope,
            }),
            Err(error) => {
                tracing::warn!(topic = &*record.topic, partition = record.partition, offset = record.offset, %error, "dead letter");
                dead_letters.push(DeadLetter {
                    topic: record.topic.to_string(),
                    partition: record.partition,
                    offset: record.offset,
                    key: record.key.clone(),
                    payload: record.payload.clone(),
                    error_class: error.class(),
                    error_message: error.to_string(),
                })
            }
        }
    }
    (events, dead_letters)
}

/// What the batch loop keeps from one batch to the next.
struct BatchLoop {
    connect_options: Arc<sqlx::postgres::PgConnectOptions>,
    /// The session batches are applied on, opened on first use and dropped
    /// after any failure. Its own, not the pool's: the pool checks a
    /// connection on every acquire, one more round trip per batch.
    connection: Option<PgConnection>,
    mirror: KafkaMirror,
}

impl BatchLoop {
    fn new(pool: &PgPool) -> BatchLoop {
        BatchLoop {
            connect_options: pool.connect_options(),
            connection: None,
            mirror: KafkaMirror::default(),
        }
    }

    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => PgConnection::connect_with(&self.connect_options).await?,
        };
        Ok(self.connection.insert(connection))
    }
}

/// Mirrors the committed positions into Kafka so `kafka-consumer-groups` and
/// other lag tools see progress, at most every [`KAFKA_MIRROR_INTERVAL`].
/// Best effort: Postgres is the truth.
#[derive(Default)]
struct KafkaMirror {
    pending: BTreeMap<(String, i32), i64>,
    last: Option<Instant>,
}

impl KafkaMirror {
    fn applied(&mut self, next_offsets: &BTreeMap<(String, i32), i64>) {
        for (key, next) in next_offsets {
            self.pending.insert(key.clone(), *next);
        }
    }

    fn flush_if_due(&mut self, consumer: &StreamConsumer<ProjectorContext>, positions: &Positions) {
        if self
            .last
            .is_none_or(|at| at.elapsed() >= KAFKA_MIRROR_INTERVAL)
        {
            self.flush(consumer, positions);
        }
    }

    /// Commits the pending positions of partitions this instance still owns.
    fn flush(&mut self, consumer: &StreamConsumer<ProjectorContext>, positions: &Positions) {
        if self.pending.is_empty() {
            return;
        }
        self.last = Some(Instant::now());
        let owned = lock(positions);
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in std::mem::take(&mut self.pending) {
            if !owned.contains_key(&(topic.clone(), partition)) {
                continue;
            }
            if tpl
                .add_partition_offset(&topic, partition, Offset::Offset(next))
                .is_err()
            {
                return;
            }
        }
        drop(owned);
        if tpl.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "async offset commit to Kafka failed (informational only)");
        }
    }
}

/// Reports lag per owned partition every [`LAG_REPORT_INTERVAL`], whatever the
/// batch loop is doing, and stores log ends for readers without a Kafka client.
struct LagReporter {
    name: &'static str,
    pool: PgPool,
    schema: SchemaName,
    consumer: Arc<StreamConsumer<ProjectorContext>>,
    positions: Positions,
    log_ends: SharedLogEnds,
    unapplied: Unapplied,
}

/// What the reporter remembers about a partition between two reports.
struct Reported {
    position: Option<i64>,
    /// When `position` last changed (or the partition was first seen).
    since: Instant,
}

impl LagReporter {
    async fn run(self, stop: CancellationToken) {
        let mut reported: HashMap<(String, i32), Reported> = HashMap::new();
        let mut recorded = RecordedEnds::default();
        let mut every = tokio::time::interval(LAG_REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let owned = lock(&self.positions).clone();
            self.refresh_stale_log_ends(&owned).await;
            self.report(&owned, &mut reported);
            self.record_log_ends(&owned, &mut recorded).await;
        }
    }

    /// Statistics stop while the batch loop retries (they are delivered only
    /// when the consumer is polled); then ask the partition leaders directly.
    async fn refresh_stale_log_ends(&self, owned: &HashMap<(String, i32), Option<i64>>) {
        let stale = lock(&self.log_ends)
            .refreshed_at
            .is_none_or(|at| at.elapsed() >= STALE_LOG_ENDS);
        if !stale || owned.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        let keys: Vec<(String, i32)> = owned.keys().cloned().collect();
        let fetched = tokio::task::spawn_blocking(move || {
            // One budget for all partitions, so an unreachable cluster delays
            // the next report (and shutdown) by at most this much.
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut ends = Vec::with_capacity(keys.len());
            for (topic, partition) in keys {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match consumer.fetch_watermarks(&topic, partition, left) {
                    Ok((_, high)) => ends.push(((topic, partition), high)),
                    Err(error) => {
                        tracing::debug!(%error, topic, partition, "could not fetch the log end");
                        break;
                    }
                }
            }
            ends
        })
        .await
        .unwrap_or_default();
        if fetched.is_empty() {
            return;
        }
        let mut log_ends = lock(&self.log_ends);
        for (key, high) in fetched {
            let end = log_ends.ends.entry(key).or_insert(high);
            *end = (*end).max(high);
        }
        log_ends.refreshed_at = Some(Instant::now());
    }

    /// `lag_records`: records between the stored position and the log end.
    /// `lag_seconds`: the age of the oldest record not yet applied, from its
    /// Kafka timestamp once this instance has read it; until then (it is still
    /// on the broker), the time since the partition last advanced or was
    /// assigned, a lower bound. Both are 0 when the partition is caught up.
    /// A partition that moved to another instance is reported as 0 here: its
    /// new owner reports it, and sums across instances stay right.
    fn report(
        &self,
        owned: &HashMap<(String, i32), Option<i64>>,
        reported: &mut HashMap<(String, i32), Reported>,
    ) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ends = lock(&self.log_ends).ends.clone();
        let unapplied = lock(&self.unapplied).clone();
        reported.retain(|key, _| {
            let keep = owned.contains_key(key);
            if !keep {
                self.set_lag(key, 0, 0.0);
            }
            keep
        });
        for (key, position) in owned {
            let state = reported.entry(key.clone()).or_insert(Reported {
                position: *position,
                since: Instant::now(),
            });
            if state.position != *position {
                state.position = *position;
                state.since = Instant::now();
            }
            let Some(&high) = ends.get(key) else {
                continue;
            };
            let records = (high - position.unwrap_or(0)).max(0);
            let seconds = if records == 0 {
                0.0
            } else if let Some(&ts) = unapplied.get(key) {
                ((now_ms - ts).max(0) as f64) / 1000.0
            } else {
                state.since.elapsed().as_secs_f64()
            };
            self.set_lag(key, records, seconds);
        }
    }

    fn set_lag(&self, (topic, partition): &(String, i32), records: i64, seconds: f64) {
        let labels = [
            ("projector", self.name.to_owned()),
            ("topic", topic.clone()),
            ("partition", partition.to_string()),
        ];
        metrics::gauge!("worldline_projector_lag_records", &labels).set(records as f64);
        metrics::gauge!("worldline_projector_lag_seconds", &labels).set(seconds);
    }

    /// Stores the log ends of owned partitions that moved (or were last stored
    /// long ago, so readers can tell a live figure from a stale one). Best
    /// effort: lag reporting never holds up or fails the projector.
    async fn record_log_ends(
        &self,
        owned: &HashMap<(String, i32), Option<i64>>,
        recorded: &mut RecordedEnds,
    ) {
        let known = lock(&self.log_ends).ends.clone();
        let refresh_all = recorded
            .at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        let ends: Vec<(String, i32, i64)> = owned
            .keys()
            .filter_map(|key| {
                let end = *known.get(key)?;
                (refresh_all || recorded.ends.get(key) != Some(&end))
                    .then(|| (key.0.clone(), key.1, end))
            })
            .collect();
        if ends.is_empty() {
            return;
        }
        let write = record_log_ends(&self.pool, &self.schema, &ends);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_an_operator_setting_then_the_fetch_default_leaves_it_and_fills_the_rest() {
        let mut config = rdkafka::ClientConfig::new();
        config.set("queued.max.messages.kbytes", "65536");
        set_defaults(&mut config, FETCH_DEFAULTS);
        assert_eq!(config.get("queued.max.messages.kbytes"), Some("65536"));
        for (key, value) in FETCH_DEFAULTS
            .iter()
            .filter(|(key, _)| *key != "queued.max.messages.kbytes")
        {
            assert_eq!(config.get(key), Some(*value), "{key}");
        }
    }
}
