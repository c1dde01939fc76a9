//! One projector's share of a batch: its transaction, retries and dead letters.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use worldline_ops::consistency::PROGRESS_CHANNEL;

use super::batch::{Decoded, PartitionKey, Positions};
use super::context::lock;
use super::{IDLE_IN_TRANSACTION_TIMEOUT, ProjectorRuntime};
use crate::projector::{ApplyError, Event};
use crate::store::{DeadLetter, OffsetMove, compare_and_set_offsets, insert_dead_letters};

/// What one projector made of a batch.
#[derive(Debug)]
pub(super) enum Applied {
    /// Nothing in the batch was for it.
    Nothing,
    /// Its share committed; these partitions moved.
    Committed(Vec<PartitionKey>),
    /// Another instance moved these partitions' offsets first; nothing committed.
    Conflict(Vec<PartitionKey>),
    /// Shutdown was requested while its share was being retried.
    GaveUp,
}

/// What a projector keeps from one batch to the next: the session its batches
/// are applied on, opened on first use and dropped after any failure. Its
/// own, not the pool's: the pool checks a connection on every acquire, one
/// more round trip per batch.
#[derive(Debug, Default)]
pub(super) struct MemberState {
    connection: Option<PgConnection>,
}

/// The outcome of trying to commit one share.
enum Commit {
    Done,
    Conflict(Vec<PartitionKey>),
}

impl ProjectorRuntime {
    /// Applies projector `index`'s share of `batch`, retrying database
    /// failures with capped backoff until they pass or shutdown is requested.
    pub(super) async fn apply_share(
        &self,
        index: usize,
        state: &mut MemberState,
        batch: &Decoded,
        shutdown: &CancellationToken,
    ) -> Applied {
        let member = &self.members[index];
        let name = member.name;
        let snapshot: Positions = lock(&self.ownership).positions[index].clone();
        let selection = batch.select(
            &member.topic_indexes,
            &snapshot,
            self.options.stop_at.as_ref(),
        );
        if selection.is_empty() {
            return Applied::Nothing;
        }
        let started = Instant::now();
        {
            let mut ownership = lock(&self.ownership);
            for (key, ts) in &selection.oldest_timestamps {
                ownership.unapplied[index].entry(key.clone()).or_insert(*ts);
            }
        }
        let next_offsets = selection.next_offsets;
        let mut events = selection.events;
        let mut dead_letters = selection.letters;
        let mut published = 0usize;
        let mut backoff = Duration::from_millis(100);
        let outcome = loop {
            // Dead letters reach their topic before the offset moves past them:
            // a crash in between publishes them again (the topic is at least
            // once; its headers carry the position to dedupe on), never loses one.
            if published < dead_letters.len() {
                match self
                    .publish_dead_letters(name, &dead_letters[published..])
                    .await
                {
                    Ok(()) => published = dead_letters.len(),
                    Err(error) => {
                        tracing::warn!(projector = name, %error, retry_in = ?backoff, "dead-letter topic unavailable; retrying");
                        self.health.set("kafka", Err(error.to_string()));
                        tokio::select! {
                            _ = shutdown.cancelled() => break Applied::GaveUp,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let outcome = self
                .commit_share(
                    index,
                    state,
                    &snapshot,
                    &next_offsets,
                    &events,
                    &dead_letters,
                )
                .await;
            if outcome.is_err() {
                // Whatever failed, the session may be gone or mid-transaction:
                // the retry starts on a new connection.
                state.connection = None;
            }
            match outcome {
                Ok(Commit::Done) => {
                    self.health.set("postgres", Ok(()));
                    let mut ownership = lock(&self.ownership);
                    for (key, next) in &next_offsets {
                        ownership.unapplied[index].remove(key);
                        if let Some(position) = ownership.positions[index].get_mut(key) {
                            *position = Some(*next);
                        }
                    }
                    drop(ownership);
                    metrics::counter!("worldline_projector_events_total", "projector" => name, "result" => "applied")
                        .increment(events.len() as u64);
                    if !dead_letters.is_empty() {
                        metrics::counter!("worldline_projector_events_total", "projector" => name, "result" => "dead_letter")
                            .increment(dead_letters.len() as u64);
                        metrics::counter!("worldline_dead_letters_total", "projector" => name)
                            .increment(dead_letters.len() as u64);
                    }
                    break Applied::Committed(next_offsets.keys().cloned().collect());
                }
                Ok(Commit::Conflict(partitions)) => {
                    tracing::warn!(
                        projector = name,
                        ?partitions,
                        "stored offsets moved under us (another instance applied first); reloading and seeking"
                    );
                    metrics::counter!("worldline_projector_offset_conflicts_total", "projector" => name).increment(1);
                    // The whole share rolled back, but the consumer has already
                    // read past every partition in it: all of them go back to
                    // their stored offsets, or the next batch of a partition that
                    // did not conflict would start after a gap that its
                    // compare-and-set (expected offset unchanged) cannot see.
                    let mut ownership = lock(&self.ownership);
                    for key in next_offsets.keys() {
                        ownership.unapplied[index].remove(key);
                    }
                    break Applied::Conflict(next_offsets.keys().cloned().collect());
                }
                Err(ApplyError::Rejected { index: at, reason }) if at < events.len() => {
                    let event = events.to_mut().remove(at);
                    let raw = batch.record(&event.topic, event.partition, event.offset);
                    dead_letters.to_mut().push(DeadLetter {
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
                        _ = shutdown.cancelled() => break Applied::GaveUp,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        metrics::histogram!("worldline_projector_batch_duration_seconds", "projector" => name)
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    /// Publishes copies of dead letters (raw key and bytes, the reason in headers).
    async fn publish_dead_letters(
        &self,
        projector: &'static str,
        letters: &[DeadLetter],
    ) -> Result<(), KafkaError> {
        let (Some(topic), Some(producer)) =
            (&self.options.dead_letter_topic, &self.dead_letter_producer)
        else {
            return Ok(());
        };
        let sends = letters.iter().map(|letter| {
            let partition = letter.partition.to_string();
            let offset = letter.offset.to_string();
            let sha = crate::store::sha256_hex(letter.payload.as_deref().unwrap_or_default());
            let headers = rdkafka::message::OwnedHeaders::new_with_capacity(7)
                .insert(header("wl_dlq_projector", projector))
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
    async fn commit_share(
        &self,
        index: usize,
        state: &mut MemberState,
        expected: &Positions,
        next_offsets: &BTreeMap<PartitionKey, i64>,
        events: &[Event],
        dead_letters: &[DeadLetter],
    ) -> Result<Commit, ApplyError> {
        let schema = &self.members[index].schema;
        let conn = match state.connection.take() {
            Some(connection) => connection,
            None => PgConnection::connect_with(&self.connect_options).await?,
        };
        let conn = state.connection.insert(conn);
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
            .map(|(key, next)| OffsetMove {
                topic: key.0.clone(),
                partition: key.1,
                expected: expected.get(key).copied().flatten(),
                next: *next,
            })
            .collect();
        let conflicts = compare_and_set_offsets(&mut tx, schema, &moves).await?;
        if !conflicts.is_empty() {
            tx.rollback().await?;
            return Ok(Commit::Conflict(conflicts));
        }
        self.projectors[index].apply(&mut tx, events).await?;
        insert_dead_letters(&mut tx, schema, dead_letters).await?;
        tx.commit().await?;
        Ok(Commit::Done)
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> rdkafka::message::Header<'a, &'a str> {
    rdkafka::message::Header {
        key,
        value: Some(value),
    }
}
