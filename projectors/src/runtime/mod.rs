//! The projector runtime: Kafka in, one Postgres transaction per projector and
//! batch out.
//!
//! A runtime runs a *set* of projectors (one or more) behind one Kafka
//! consumer in one consumer group: each record is fetched and decoded once,
//! and every batch is applied by each projector of the set on its own
//! connection, concurrently, while the next batch is read.
//!
//! Invariants (see `projectors/DESIGN.md`):
//! 1. A projector's read-model writes for a batch and its partitions' next
//!    offsets commit in one transaction, or neither does.
//! 2. On assignment a partition starts at the offset stored in Postgres (the
//!    lowest of the set's projectors, or the beginning of the log when one has
//!    none stored), never at Kafka's committed offset; each projector applies
//!    only records at or past its own position.
//! 3. The stored offset only moves by compare-and-set from the value this
//!    instance loaded; an instance that lost its partitions while paused cannot
//!    commit a stale batch.
//! 4. Nothing is skipped: undecodable events become dead letters inside the same
//!    transaction that moves the offset past them; database failures are retried
//!    forever with capped backoff; an out-of-range offset halts the set.
//!
//! - [`batch`]: gathering records and each projector's share of a batch.
//! - [`context`]: partition assignment from stored offsets, ownership.
//! - `apply`: one projector's transaction, retries and dead letters.
//! - [`lag`]: lag gauges and stored log ends, beside the batch loop.
//! - [`mirror`]: Kafka's committed offsets, for lag tools only.

mod apply;
mod batch;
mod context;
mod lag;
mod mirror;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rdkafka::Offset;
use rdkafka::consumer::{Consumer, MessageStream, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_ops::config::KafkaSettings;
use worldline_ops::kafka::{base_client_config, set_defaults};

use self::apply::{Applied, MemberState};
use self::batch::{Decoded, Gathered, PartitionKey, Positions, Record};
use self::context::{
    MemberInfo, Ownership, SetContext, SharedLogEnds, SharedOwnership, delivery_start, lock,
};
use self::lag::LagReporter;
use self::mirror::KafkaMirror;
use crate::projector::Projector;
use crate::store::{SchemaName, load_offsets, prepare_schema};

/// Longest a batch's transaction may sit idle between two statements before
/// PostgreSQL ends the session. A healthy batch sends its statements back to
/// back (milliseconds apart); an instance frozen mid-batch (SIGSTOP, a VM
/// pause, a debugger) holds row locks on `projector_offsets` and would stall
/// its partitions for every other instance until it woke up. The server
/// ending its session rolls the whole batch back, releases the locks, and the
/// instance that now owns the partitions goes on; see DESIGN.md, "Zombies".
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// librdkafka's fetch settings, unless `kafka.properties` sets them (measured
/// with `ops/bench/project.sh`: throughput, freshness and resident memory).
///
/// A set's consumer reads every topic of its projectors (40 partitions for
/// `worlds` at 8 per topic). librdkafka's defaults (keep fetching a partition
/// until 100 000 records or 64 MiB wait, 50 MiB per fetch) would hold hundreds
/// of MiB of records no batch needs yet.
const FETCH_DEFAULTS: &[(&str, &str)] = &[
    // 2 000 records per partition: with the default 10 000-record batch, a
    // full batch ahead once a consumer holds five partitions; the byte
    // limit below binds long before either.
    ("queued.min.messages", "2000"),
    // The consumer's whole prefetch queue, and the most one fetch brings.
    // One consumer reads every partition of its set (40 for `worlds`), and
    // 512 KiB with 1 MiB fetches held about half a 10 000-record batch:
    // 4 MiB of each caught weather up at 143-145k events/s against 120-133k,
    // and the live pipeline kept up with 48-84k appended events/s (median
    // about 62k over six runs) against 48-52k, for about 30 MiB more
    // resident memory (ops/bench/project.sh).
    ("queued.max.messages.kbytes", "4096"),
    ("fetch.max.bytes", "4194304"),
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

/// A projector a runtime applies, and where its read model goes.
#[derive(Clone)]
pub struct Target {
    pub projector: Arc<dyn Projector>,
    /// The schema written to (the projector's name, or a shadow for a rebuild).
    pub schema: SchemaName,
    /// The topics it reads (its families, with the topic prefix).
    pub topics: Vec<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("projector", &self.projector.name())
            .field("schema", &self.schema)
            .field("topics", &self.topics)
            .finish()
    }
}

/// How one runtime instance runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Consumer group shared by every instance of this set of projectors.
    pub group_id: String,
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
    pub stop_at: Option<HashMap<PartitionKey, i64>>,
}

/// Why a runtime stopped on its own.
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

/// One runtime instance: a set of projectors behind one consumer.
pub struct ProjectorRuntime {
    projectors: Vec<Arc<dyn Projector>>,
    members: Arc<[MemberInfo]>,
    pool: PgPool,
    connect_options: Arc<sqlx::postgres::PgConnectOptions>,
    kafka: KafkaSettings,
    options: RuntimeOptions,
    health: Health,
    ownership: SharedOwnership,
    dead_letter_producer: Option<rdkafka::producer::FutureProducer>,
    /// One shared name per subscribed topic, handed to every record read.
    topic_names: Vec<Arc<str>>,
}

impl std::fmt::Debug for ProjectorRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectorRuntime")
            .field("members", &self.members)
            .field("options", &self.options)
            .finish()
    }
}

impl ProjectorRuntime {
    /// A runtime applying `targets` (distinct schemas) behind one consumer;
    /// nothing connects until [`ProjectorRuntime::run`].
    pub fn new(
        targets: Vec<Target>,
        pool: PgPool,
        kafka: KafkaSettings,
        options: RuntimeOptions,
        health: Health,
    ) -> ProjectorRuntime {
        let mut topics: Vec<String> = Vec::new();
        for target in &targets {
            for topic in &target.topics {
                if !topics.contains(topic) {
                    topics.push(topic.clone());
                }
            }
        }
        let members: Vec<MemberInfo> = targets
            .iter()
            .map(|target| {
                let mut topic_indexes: Vec<usize> = target
                    .topics
                    .iter()
                    .filter_map(|t| topics.iter().position(|known| known == t))
                    .collect();
                topic_indexes.sort_unstable();
                topic_indexes.dedup();
                MemberInfo {
                    name: target.projector.name(),
                    schema: target.schema.clone(),
                    topics: target.topics.clone(),
                    topic_indexes,
                }
            })
            .collect();
        let dead_letter_producer = options.dead_letter_topic.as_ref().and_then(|_| {
            base_client_config(&kafka, "worldline-dead-letters")
                // A dead letter is evidence; write it like an event: once, durably.
                .set("enable.idempotence", "true")
                .set("acks", "all")
                // Same partition as the poisoned record's world, as Java would pick.
                .set("partitioner", "murmur2_random")
                .create()
                .map_err(
                    |error| tracing::error!(%error, "dead-letter producer could not be created"),
                )
                .ok()
        });
        ProjectorRuntime {
            ownership: Arc::new(Mutex::new(Ownership::new(members.len()))),
            projectors: targets.into_iter().map(|t| t.projector).collect(),
            members: members.into(),
            connect_options: pool.connect_options(),
            pool,
            kafka,
            options,
            health,
            dead_letter_producer,
            topic_names: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
        }
    }

    /// Consumes and applies until `shutdown` fires. Must run on a multi-thread
    /// Tokio runtime: the rebalance callback reads offsets from Postgres.
    ///
    /// An error means this set halted for good; each of its projectors'
    /// readiness checks (`projector <name>`) stays failed, so no other
    /// projector of the same process can mask it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let result = self.consume(shutdown).await;
        if let Err(error) = &result {
            for member in self.members.iter() {
                metrics::counter!("worldline_projector_halted_total", "projector" => member.name)
                    .increment(1);
                self.health.set(
                    &format!("projector {}", member.name),
                    Err(format!("halted: {error}")),
                );
            }
        }
        result
    }

    async fn consume(&self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        if self.members.is_empty() {
            return Ok(());
        }
        for (projector, member) in self.projectors.iter().zip(self.members.iter()) {
            prepare_schema(&self.pool, &member.schema, projector.as_ref())
                .await
                .map_err(|source| RuntimeError::Prepare {
                    schema: member.schema.as_str().to_owned(),
                    source,
                })?;
        }
        self.health.set("postgres", Ok(()));
        for member in self.members.iter() {
            self.health
                .set(&format!("projector {}", member.name), Ok(()));
        }

        let log_ends: SharedLogEnds = Arc::default();
        let context = SetContext {
            pool: self.pool.clone(),
            members: self.members.clone(),
            ownership: self.ownership.clone(),
            runtime: tokio::runtime::Handle::current(),
            shutdown: shutdown.clone(),
            health: self.health.clone(),
            log_ends: log_ends.clone(),
        };
        let names: Vec<&str> = self.members.iter().map(|m| m.name).collect();
        let mut config = base_client_config(
            &self.kafka,
            &format!("worldline-projector-{}", names.join("+")),
        );
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
        let consumer: StreamConsumer<SetContext> = config.create_with_context(context)?;
        let consumer = Arc::new(consumer);
        let topics: Vec<&str> = self.topic_names.iter().map(|t| &**t).collect();
        consumer.subscribe(&topics)?;
        self.health.set("kafka", Ok(()));
        tracing::info!(projectors = ?names, group = %self.options.group_id, ?topics, "projectors started");

        let stop_reporting = CancellationToken::new();
        let reporter = LagReporter {
            pool: self.pool.clone(),
            members: self.members.clone(),
            consumer: consumer.clone(),
            ownership: self.ownership.clone(),
            log_ends,
        };
        let reporting = tokio::spawn(reporter.run(stop_reporting.clone()));
        let result = self.apply_until_stopped(&consumer, &shutdown).await;
        stop_reporting.cancel();
        if let Err(error) = reporting.await {
            tracing::warn!(%error, "lag reporter failed");
        }
        if result.is_ok() {
            tracing::info!(projectors = ?names, "projectors stopping; leaving the group");
            consumer.unsubscribe();
        }
        result
    }

    /// The batch loop. While the projectors apply one batch, the next one
    /// gathers: a record that arrives mid-batch waits for that batch to end,
    /// not for it to end and then for a batch of its own to fill.
    async fn apply_until_stopped(
        &self,
        consumer: &StreamConsumer<SetContext>,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        let mut states: Vec<MemberState> = self
            .members
            .iter()
            .map(|_| MemberState::default())
            .collect();
        let mut mirror = KafkaMirror::default();
        let mut gathered = Gathered::default();
        // One stream for the loop's life: each `recv()` would register and
        // drop a waker slot per record.
        let mut stream = consumer.stream();
        let result = loop {
            match self.gather(&mut stream, &mut gathered, shutdown).await {
                Ok(true) => {}
                Ok(false) => {
                    self.housekeeping(consumer, &mut mirror);
                    if shutdown.is_cancelled() {
                        break Ok(());
                    }
                    if self.reached_stop() {
                        tracing::info!("reached the requested stop offsets");
                        break Ok(());
                    }
                    continue;
                }
                Err(error) => {
                    self.health.set("kafka", Err(error.to_string()));
                    break Err(error);
                }
            }
            let batch = Decoded::new(gathered.take(), &self.topic_names);
            self.health.set("kafka", Ok(()));
            let mut read_error = None;
            let outcomes =
                {
                    let applying =
                        futures::future::join_all(states.iter_mut().enumerate().map(
                            |(index, state)| self.apply_share(index, state, &batch, shutdown),
                        ));
                    tokio::pin!(applying);
                    loop {
                        tokio::select! {
                            biased;
                            outcomes = &mut applying => break outcomes,
                            received = stream.next(),
                                if read_error.is_none()
                                    && gathered.len() < self.options.batch_max_records =>
                            {
                                match self.accept(received) {
                                    Ok(Some(record)) => gathered.push(record),
                                    Ok(None) => {}
                                    // Reported once the batch in flight has ended.
                                    Err(error) => read_error = Some(error),
                                }
                            }
                        }
                    }
                };
            drop(batch);
            let mut moved: BTreeSet<PartitionKey> = BTreeSet::new();
            let mut conflicts = Vec::new();
            let mut gave_up = false;
            for (index, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    Applied::Nothing => {}
                    Applied::Committed(partitions) => moved.extend(partitions),
                    Applied::Conflict(partitions) => conflicts.push((index, partitions)),
                    Applied::GaveUp => gave_up = true,
                }
            }
            if !conflicts.is_empty() {
                for key in self.resync(consumer, conflicts, shutdown).await {
                    gathered.forget(&key.0, key.1);
                }
            }
            mirror.applied(&moved, &self.members, &lock(&self.ownership));
            self.housekeeping(consumer, &mut mirror);
            if let Some(error) = read_error {
                self.health.set("kafka", Err(error.to_string()));
                break Err(error);
            }
            if gave_up || shutdown.is_cancelled() {
                break Ok(());
            }
            if self.reached_stop() {
                tracing::info!("reached the requested stop offsets");
                break Ok(());
            }
        };
        mirror.flush(consumer, &self.members, &lock(&self.ownership));
        result
    }

    fn housekeeping(&self, consumer: &StreamConsumer<SetContext>, mirror: &mut KafkaMirror) {
        mirror.flush_if_due(consumer, &self.members, &lock(&self.ownership));
    }

    /// Gathers records until a batch is due: full, or `batch_max_wait` after
    /// its first record arrived (records gathered while the previous batch
    /// was applied count from when they arrived). Returns false when nothing
    /// arrived within a second (housekeeping) or shutdown was requested.
    async fn gather(
        &self,
        stream: &mut MessageStream<'_, SetContext>,
        gathered: &mut Gathered,
        shutdown: &CancellationToken,
    ) -> Result<bool, RuntimeError> {
        if gathered.is_empty() {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(Duration::from_secs(1)) => return Ok(false),
                received = stream.next() => received,
            };
            if let Some(record) = self.accept(first)? {
                gathered.push(record);
            }
        }
        let Some(first_at) = gathered.first_at() else {
            return Ok(false);
        };
        let deadline = first_at + self.options.batch_max_wait;
        while gathered.len() < self.options.batch_max_records {
            // Records already fetched join without a timer; only an empty
            // queue waits, until the batch's deadline.
            let received = match stream.next().now_or_never() {
                Some(received) => received,
                None => match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(received) => received,
                    Err(_elapsed) => break,
                },
            };
            if let Some(record) = self.accept(received)? {
                gathered.push(record);
            }
        }
        Ok(true)
    }

    fn topic_name(&self, topic: &str) -> Arc<str> {
        self.topic_names
            .iter()
            .find(|name| ***name == *topic)
            .cloned()
            .unwrap_or_else(|| Arc::from(topic))
    }

    fn accept(
        &self,
        received: Option<Result<BorrowedMessage<'_>, KafkaError>>,
    ) -> Result<Option<Record>, RuntimeError> {
        // A consumer's stream never ends; `None` cannot happen.
        let Some(received) = received else {
            return Ok(None);
        };
        match received {
            Ok(message) => Ok(Some(Record::copied_from(
                &message,
                self.topic_name(rdkafka::Message::topic(&message)),
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
                topics: self
                    .topic_names
                    .iter()
                    .map(|t| &**t)
                    .collect::<Vec<_>>()
                    .join(","),
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

    /// After conflicts: each conflicting projector adopts its stored offsets,
    /// and every partition involved is delivered again from the lowest
    /// position of the projectors that own it (the others pass over what they
    /// applied already). Returns the partitions sent back, which the caller
    /// must read again from there.
    async fn resync(
        &self,
        consumer: &StreamConsumer<SetContext>,
        conflicts: Vec<(usize, Vec<PartitionKey>)>,
        shutdown: &CancellationToken,
    ) -> BTreeSet<PartitionKey> {
        let mut involved: BTreeSet<PartitionKey> = BTreeSet::new();
        for (index, partitions) in conflicts {
            let member = &self.members[index];
            let mut backoff = Duration::from_millis(100);
            let stored = loop {
                match load_offsets(&self.pool, &member.schema, &member.topics).await {
                    Ok(stored) => break Some(stored),
                    Err(error) => {
                        tracing::warn!(projector = member.name, %error, retry_in = ?backoff, "could not reload offsets; retrying");
                        self.health.set("postgres", Err(error.to_string()));
                        tokio::select! {
                            _ = shutdown.cancelled() => break None,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let mut ownership = lock(&self.ownership);
            for key in partitions {
                match &stored {
                    // No stored row yet: nothing of this partition was ever applied.
                    Some(stored) => {
                        if let Some(position) = ownership.positions[index].get_mut(&key) {
                            *position = stored.get(&key).copied();
                        }
                    }
                    // Shutting down: apply nothing more from a position in doubt.
                    None => {
                        ownership.positions[index].remove(&key);
                    }
                }
                involved.insert(key);
            }
        }
        for key in &involved {
            let start = delivery_start(&self.members, &lock(&self.ownership), key);
            let Some(start) = start else { continue };
            if let Err(error) = consumer.seek(
                &key.0,
                key.1,
                start.map_or(Offset::Beginning, Offset::Offset),
                Duration::from_secs(5),
            ) {
                tracing::warn!(%error, topic = key.0, partition = key.1, "seek failed; dropping the partition until reassigned");
                let mut ownership = lock(&self.ownership);
                for (index, member) in self.members.iter().enumerate() {
                    if ownership.positions[index].remove(key).is_some() {
                        context::set_owned(member.name, key, false);
                    }
                }
            }
        }
        involved
    }

    /// Whether every projector has applied every partition with a stop offset
    /// up to it.
    fn reached_stop(&self) -> bool {
        let Some(stop) = &self.options.stop_at else {
            return false;
        };
        let ownership = lock(&self.ownership);
        self.members
            .iter()
            .enumerate()
            .all(|(index, member)| reached(&ownership.positions[index], stop, member))
    }
}

/// Whether `positions` reached every stop offset of a partition `member` reads.
fn reached(positions: &Positions, stop: &HashMap<PartitionKey, i64>, member: &MemberInfo) -> bool {
    stop.iter()
        .filter(|(key, _)| member.reads(&key.0))
        .all(|(key, target)| {
            *target <= 0
                || positions
                    .get(key)
                    .copied()
                    .flatten()
                    .is_some_and(|at| at >= *target)
        })
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
