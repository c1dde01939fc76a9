//! Appending event-keyed rows exactly once without `ON CONFLICT`.
//!
//! `INSERT … ON CONFLICT DO NOTHING` pays for a speculative insertion on every
//! row, which on this workload costs about as much again as the insert itself.
//! The append-only tables instead look up which of a batch's event ids they
//! already hold (one index probe each, no writes), drop those and repeats inside
//! the batch, and append the rest with a plain `INSERT`. Two instances never
//! apply the same partition at once (their offsets move by compare-and-set
//! first), so a unique violation can only come from the same event id appended
//! under two keys and applied concurrently; it fails the transaction, the
//! runtime retries it, and the retry's lookup sees the other row.
//!
//! An event log whose key nothing but [`unseen`] uses says so with the table
//! comment [`EVENT_LOG_COMMENT`] in its migration. A bulk rebuild then drops
//! that key while it appends millions of rows and builds it once at the end
//! (see `replay`); meanwhile it answers [`unseen`] from the ids it holds in
//! memory ([`KeySets`], installed around each apply with [`with_key_sets`]).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::Event;

/// The table comment that marks an event log: one row per event id, written
/// only after [`unseen`], its key used for nothing else.
pub const EVENT_LOG_COMMENT: &str = "worldline event log: one row per event id";

/// The batch's events of one kind (`kind` picks the body it projects), in log
/// order, and their ids, as [`unseen`] takes them.
pub fn of_kind<'e, T>(
    events: &'e [Event],
    kind: impl Fn(&'e Body) -> Option<&'e T>,
) -> (Vec<(&'e Event, &'e T)>, Vec<Uuid>) {
    events
        .iter()
        .filter_map(|event| Some((event, kind(event.envelope.body.as_ref()?)?)))
        .map(|(event, body)| ((event, body), event.envelope.event_uuid()))
        .unzip()
}

/// Of `ids` (in log order), the index of the first occurrence of each id that
/// `table` (a table of this read model with an `event_id` key) does not hold yet.
pub async fn unseen(
    tx: &mut PgConnection,
    table: &'static str,
    ids: &[Uuid],
) -> Result<Vec<usize>, sqlx::Error> {
    unseen_by(tx, table, ids, |tx| {
        sqlx::query_scalar::<_, Uuid>(AssertSqlSafe(format!(
            "SELECT event_id FROM {table} WHERE event_id = ANY($1)"
        )))
        .bind(ids)
        .fetch_all(tx)
    })
    .await
}

/// [`unseen`] for an event log whose key leads with other columns: `stored`
/// looks up which of `ids` the table holds, by that key. It is not called
/// while a bulk rebuild answers from memory.
pub async fn unseen_by<'c, F>(
    tx: &'c mut PgConnection,
    table: &'static str,
    ids: &[Uuid],
    stored: impl FnOnce(&'c mut PgConnection) -> F,
) -> Result<Vec<usize>, sqlx::Error>
where
    F: std::future::Future<Output = Result<Vec<Uuid>, sqlx::Error>>,
{
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    if let Ok(Some(keep)) = KEY_SETS.try_with(|sets| lock(sets).take_unseen(table, ids)) {
        return Ok(keep);
    }
    let stored: HashSet<Uuid> = stored(tx).await?.into_iter().collect();
    let mut taken = HashSet::with_capacity(ids.len());
    Ok(ids
        .iter()
        .enumerate()
        .filter(|(_, id)| !stored.contains(*id) && taken.insert(**id))
        .map(|(i, _)| i)
        .collect())
}

/// Keeps the elements of `values` at `keep` (ascending indexes).
pub fn pick<T: Clone>(values: &[T], keep: &[usize]) -> Vec<T> {
    keep.iter().map(|i| values[*i].clone()).collect()
}

/// Hashes a UUID by folding its bytes: event ids are time-ordered with random
/// low bits, so no keyed hash is needed, and a rebuild hashes tens of millions.
#[derive(Debug, Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

type IdSet = HashSet<Uuid, BuildHasherDefault<IdHasher>>;

/// The event ids held by event logs whose key is deferred, per table.
#[derive(Debug, Default)]
pub struct KeySets {
    committed: HashMap<String, IdSet>,
    pending: HashMap<String, IdSet>,
}

impl KeySets {
    /// Answers [`unseen`] for `table` from memory, starting from `stored`.
    pub fn track(&mut self, table: &str, stored: impl IntoIterator<Item = Uuid>) {
        self.committed
            .entry(table.to_owned())
            .or_default()
            .extend(stored);
    }

    /// Whether any table is answered from memory.
    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }

    /// The transaction that appended the pending ids committed.
    pub fn commit(&mut self) {
        for (table, ids) in self.pending.drain() {
            self.committed.entry(table).or_default().extend(ids);
        }
    }

    /// The transaction that appended the pending ids rolled back.
    pub fn discard(&mut self) {
        self.pending.clear();
    }

    fn take_unseen(&mut self, table: &str, ids: &[Uuid]) -> Option<Vec<usize>> {
        let committed = self.committed.get(table)?;
        let pending = self.pending.entry(table.to_owned()).or_default();
        Some(
            ids.iter()
                .enumerate()
                .filter(|(_, id)| !committed.contains(*id) && pending.insert(**id))
                .map(|(i, _)| i)
                .collect(),
        )
    }
}

fn lock(sets: &Mutex<KeySets>) -> std::sync::MutexGuard<'_, KeySets> {
    sets.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

tokio::task_local! {
    static KEY_SETS: Arc<Mutex<KeySets>>;
}

/// Runs `apply` with [`unseen`] answered from `sets` for the tables they track.
pub async fn with_key_sets<F: std::future::Future>(
    sets: Arc<Mutex<KeySets>>,
    apply: F,
) -> F::Output {
    KEY_SETS.scope(sets, apply).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_tracked_ids_when_asked_then_repeats_and_stored_ids_are_dropped_until_discarded() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut sets = KeySets::default();
        assert_eq!(
            sets.take_unseen("log", &[a]),
            None,
            "untracked tables probe"
        );
        sets.track("log", [a]);
        assert_eq!(sets.take_unseen("log", &[a, b, b, c]), Some(vec![1, 3]));
        assert_eq!(
            sets.take_unseen("log", &[b]),
            Some(vec![]),
            "pending counts"
        );
        sets.discard();
        assert_eq!(sets.take_unseen("log", &[b]), Some(vec![0]), "rolled back");
        sets.commit();
        assert_eq!(sets.take_unseen("log", &[b, c]), Some(vec![1]));
    }
}
