//! What a projector is: a name, the families it reads, its migrations, and an
//! apply function over a batch of decoded events inside a Postgres transaction.

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::pb::Envelope;

/// A decoded, validated event and where it sits in the log.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka record timestamp (the producer's create time), milliseconds since the epoch.
    pub timestamp_ms: i64,
    pub envelope: Envelope,
}

/// Why `apply` failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The database failed; the whole batch is rolled back and retried with
    /// backoff, never skipped.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// One event can never be applied (it breaks a rule of this read model). The
    /// batch is rolled back, that event becomes a dead letter, and the rest of
    /// the batch is applied without it.
    #[error("event at index {index} rejected: {reason}")]
    Rejected { index: usize, reason: String },
}

/// A read model built from the log.
///
/// Implementations must be idempotent: an event delivered again (the same event
/// id at a later offset, e.g. a producer retry) must leave the read model as if
/// it had been applied once.
pub trait Projector: Send + Sync + 'static {
    /// Unique name; also the Postgres schema of its read model and the suffix of
    /// its consumer group.
    fn name(&self) -> &'static str;
    /// The event families it reads (one topic each).
    fn families(&self) -> &'static [Family];
    /// Its migrations, written with unqualified table names (the runtime sets
    /// `search_path` to the target schema).
    fn migrator(&self) -> &'static Migrator;
    /// Applies a batch, in log order per partition, inside the runtime's
    /// transaction (`search_path` already points at the target schema).
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), ApplyError>>;
}
