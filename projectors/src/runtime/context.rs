//! The consumer's context: where each assigned partition starts (the offsets
//! stored in PostgreSQL, never Kafka's), who owns what, and the statistics
//! that carry each partition's high watermark.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;

use super::batch::{PartitionKey, Positions};
use crate::store::{SchemaName, load_offsets};

/// What the runtime knows of one projector of its set.
#[derive(Debug, Clone)]
pub(super) struct MemberInfo {
    pub name: &'static str,
    pub schema: SchemaName,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Their indexes in the set's topic list, ascending.
    pub topic_indexes: Vec<usize>,
}

impl MemberInfo {
    pub fn reads(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t == topic)
    }
}

/// Who owns which partition, per projector of the set (by index), shared by
/// the rebalance callback, the batch loop and the lag reporter.
#[derive(Debug, Default)]
pub(super) struct Ownership {
    /// Each projector's position on every assigned partition it reads.
    pub positions: Vec<Positions>,
    /// The Kafka timestamp (ms) of the oldest record of each partition that a
    /// projector has read but not yet committed: what `lag_seconds` measures from.
    pub unapplied: Vec<HashMap<PartitionKey, i64>>,
}

impl Ownership {
    pub fn new(members: usize) -> Ownership {
        Ownership {
            positions: vec![Positions::new(); members],
            unapplied: vec![HashMap::new(); members],
        }
    }
}

pub(super) type SharedOwnership = Arc<Mutex<Ownership>>;

/// A projector this many records behind the furthest one of its set on a
/// partition is named when the partition is assigned: the set reads from the
/// lowest position, so the others wait for it to catch up.
const FAR_BEHIND: i64 = 100_000;

/// The projectors far behind the furthest one on `key`, and by how much
/// (`None` position: from the log's start, counted from offset 0).
pub(super) fn far_behind(
    members: &[MemberInfo],
    ownership: &Ownership,
    key: &PartitionKey,
) -> Vec<(&'static str, i64)> {
    let readers: Vec<(&'static str, i64)> = members
        .iter()
        .enumerate()
        .filter_map(|(index, member)| {
            let position = ownership.positions[index].get(key)?;
            Some((member.name, position.unwrap_or(0)))
        })
        .collect();
    let furthest = readers.iter().map(|(_, at)| *at).max().unwrap_or(0);
    readers
        .into_iter()
        .filter(|(_, at)| furthest - at > FAR_BEHIND)
        .map(|(name, at)| (name, furthest - at))
        .collect()
}

/// Each partition's high watermark, and when the set was last refreshed.
#[derive(Debug, Default)]
pub(super) struct LogEnds {
    pub ends: HashMap<PartitionKey, i64>,
    pub refreshed_at: Option<Instant>,
}

pub(super) type SharedLogEnds = Arc<Mutex<LogEnds>>;

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The lowest of two positions: `None` (from the log's start) is lowest.
pub(super) fn lowest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => None,
    }
}

/// Where the consumer delivers `key` from: the lowest position of the
/// projectors that own it, so none of them misses a record; the others pass
/// over what they applied already. `None` inside: from the log's start;
/// `None` outside: no projector owns it.
pub(super) fn delivery_start(
    members: &[MemberInfo],
    ownership: &Ownership,
    key: &PartitionKey,
) -> Option<Option<i64>> {
    members
        .iter()
        .enumerate()
        .filter(|(_, member)| member.reads(&key.0))
        .filter_map(|(index, _)| ownership.positions[index].get(key).copied())
        .reduce(lowest)
}

pub(super) struct SetContext {
    pub pool: PgPool,
    pub members: Arc<[MemberInfo]>,
    pub ownership: SharedOwnership,
    pub runtime: tokio::runtime::Handle,
    pub shutdown: CancellationToken,
    pub health: Health,
    pub log_ends: SharedLogEnds,
}

impl ClientContext for SetContext {
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

impl ConsumerContext for SetContext {
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
                let assigned = partitions_of(tpl);
                let mut ownership = lock(&self.ownership);
                let mut counts = vec![0u64; self.members.len()];
                for key in &assigned {
                    for (index, member) in self.members.iter().enumerate() {
                        if !member.reads(&key.0) {
                            continue;
                        }
                        let offset = stored[index].get(key).copied();
                        ownership.unapplied[index].remove(key);
                        ownership.positions[index].insert(key.clone(), offset);
                        set_owned(member.name, key, true);
                        counts[index] += 1;
                    }
                    for (name, behind) in far_behind(&self.members, &ownership, key) {
                        tracing::warn!(
                            projector = name,
                            topic = key.0,
                            partition = key.1,
                            behind,
                            "projector far behind the rest of its set: the set reads this \
                             partition from its position, and the others wait until it has \
                             caught up (build it with `worldline replay` first, or run it alone)"
                        );
                    }
                    let start = delivery_start(&self.members, &ownership, key)
                        .flatten()
                        .map_or(Offset::Beginning, Offset::Offset);
                    if let Err(error) = tpl.set_partition_offset(&key.0, key.1, start) {
                        tracing::error!(%error, topic = key.0, partition = key.1, "could not set start offset");
                    }
                }
                drop(ownership);
                for (member, count) in self.members.iter().zip(counts) {
                    metrics::counter!("worldline_projector_partitions_assigned_total", "projector" => member.name)
                        .increment(count);
                }
                // A cooperative round that moves nothing here assigns an empty set.
                if !assigned.is_empty() {
                    tracing::info!(
                        projectors = ?self.names(),
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
                let revoked = partitions_of(tpl);
                let mut ownership = lock(&self.ownership);
                let mut counts = vec![0u64; self.members.len()];
                for key in &revoked {
                    for (index, member) in self.members.iter().enumerate() {
                        if ownership.positions[index].remove(key).is_some() {
                            counts[index] += 1;
                        }
                        ownership.unapplied[index].remove(key);
                        if member.reads(&key.0) {
                            set_owned(member.name, key, false);
                        }
                    }
                }
                drop(ownership);
                // With cooperative rebalancing an instance gives up only the
                // partitions that move; this counter shows it (an eager
                // protocol would revoke everything on every join).
                for (member, count) in self.members.iter().zip(counts) {
                    metrics::counter!("worldline_projector_partitions_revoked_total", "projector" => member.name)
                        .increment(count);
                }
                tracing::info!(
                    projectors = ?self.names(),
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
                let mut ownership = lock(&self.ownership);
                for (index, member) in self.members.iter().enumerate() {
                    for (key, _) in ownership.positions[index].drain() {
                        set_owned(member.name, &key, false);
                    }
                    ownership.unapplied[index].clear();
                }
                drop(ownership);
                if let Err(error) = base_consumer.unassign() {
                    tracing::error!(%error, "unassign failed");
                }
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// `worldline_projector_partition_owned` is 1 for each partition a projector
/// applies on this instance, so an operator (or a test) sees who owns what.
pub(super) fn set_owned(projector: &'static str, (topic, partition): &PartitionKey, owned: bool) {
    metrics::gauge!(
        "worldline_projector_partition_owned",
        "projector" => projector,
        "topic" => topic.clone(),
        "partition" => partition.to_string()
    )
    .set(if owned { 1.0 } else { 0.0 });
}

impl SetContext {
    fn names(&self) -> Vec<&'static str> {
        self.members.iter().map(|m| m.name).collect()
    }

    /// Every projector's stored offsets, read from inside the (synchronous)
    /// rebalance callback, retrying until the database answers or shutdown is
    /// requested.
    fn load_offsets_blocking(&self) -> Option<Vec<HashMap<PartitionKey, i64>>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = tokio::task::block_in_place(|| {
                self.runtime.block_on(async {
                    let mut stored = Vec::with_capacity(self.members.len());
                    for member in self.members.iter() {
                        stored
                            .push(load_offsets(&self.pool, &member.schema, &member.topics).await?);
                    }
                    Ok::<_, sqlx::Error>(stored)
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &'static str, topics: &[&str]) -> MemberInfo {
        MemberInfo {
            name,
            schema: SchemaName::parse(name).expect("a schema name"),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            topic_indexes: Vec::new(),
        }
    }

    #[test]
    fn given_projectors_at_different_positions_then_delivery_starts_at_the_lowest() {
        let members = [
            member("worlds", &["clock", "story"]),
            member("clock", &["clock"]),
            member("story", &["story"]),
        ];
        let mut ownership = Ownership::new(3);
        let clock = ("clock".to_owned(), 0);
        let story = ("story".to_owned(), 0);
        ownership.positions[0].insert(clock.clone(), Some(40));
        ownership.positions[1].insert(clock.clone(), Some(25));
        ownership.positions[0].insert(story.clone(), Some(7));
        ownership.positions[2].insert(story.clone(), None);
        assert_eq!(delivery_start(&members, &ownership, &clock), Some(Some(25)));
        assert_eq!(
            delivery_start(&members, &ownership, &story),
            Some(None),
            "a projector with nothing stored reads from the log's start"
        );
        assert!(far_behind(&members, &ownership, &clock).is_empty());
        ownership.positions[0].insert(clock.clone(), Some(400_025));
        assert_eq!(
            far_behind(&members, &ownership, &clock),
            [("clock", 400_000)]
        );
        assert_eq!(
            delivery_start(&members, &ownership, &("clock".to_owned(), 1)),
            None,
            "not owned"
        );
    }
}
