//! Kafka's committed offsets, kept in step with the stored ones for lag tools.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::batch::PartitionKey;
use super::context::{MemberInfo, Ownership, SetContext, delivery_start};

/// How often applied positions are mirrored into Kafka's committed offsets.
/// They are read only by lag tools (Postgres decides where to start), so a
/// second of delay costs nothing, while a commit per batch would be hundreds
/// of requests per second to the group coordinator under load.
const KAFKA_MIRROR_INTERVAL: Duration = Duration::from_secs(1);

/// Mirrors the committed positions into Kafka so `kafka-consumer-groups` and
/// other lag tools see progress, at most every [`KAFKA_MIRROR_INTERVAL`]. For
/// a partition several projectors read, the group has come as far as the
/// one furthest behind. Best effort: Postgres is the truth.
#[derive(Debug, Default)]
pub(super) struct KafkaMirror {
    pending: BTreeMap<PartitionKey, i64>,
    last: Option<Instant>,
}

impl KafkaMirror {
    /// Notes where the partitions a batch moved now stand for the whole set.
    pub fn applied<'k>(
        &mut self,
        moved: impl IntoIterator<Item = &'k PartitionKey>,
        members: &[MemberInfo],
        ownership: &Ownership,
    ) {
        for key in moved {
            if let Some(Some(next)) = delivery_start(members, ownership, key) {
                self.pending.insert(key.clone(), next);
            }
        }
    }

    pub fn flush_if_due(
        &mut self,
        consumer: &StreamConsumer<SetContext>,
        members: &[MemberInfo],
        ownership: &Ownership,
    ) {
        if self
            .last
            .is_none_or(|at| at.elapsed() >= KAFKA_MIRROR_INTERVAL)
        {
            self.flush(consumer, members, ownership);
        }
    }

    /// Commits the pending positions of partitions this instance still owns.
    pub fn flush(
        &mut self,
        consumer: &StreamConsumer<SetContext>,
        members: &[MemberInfo],
        ownership: &Ownership,
    ) {
        if self.pending.is_empty() {
            return;
        }
        self.last = Some(Instant::now());
        let mut tpl = TopicPartitionList::new();
        for (key, next) in std::mem::take(&mut self.pending) {
            if delivery_start(members, ownership, &key).is_none() {
                continue;
            }
            if tpl
                .add_partition_offset(&key.0, key.1, Offset::Offset(next))
                .is_err()
            {
                return;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "async offset commit to Kafka failed (informational only)");
        }
    }
}
