//! The read side of worldline.
//!
//! - [`projector`]: what a projector is (name, families, migrations, `apply`).
//! - [`runtime`]: consuming, batching and committing rows and offsets in one
//!   Postgres transaction; rebalance handling; dead letters; lag metrics.
//! - [`redrive`]: re-applying dead letters after a fix, idempotently.
//! - [`replay`]: zero-downtime rebuilds into a shadow schema, and verification.
//! - [`store`]: the runtime's tables inside each projector schema.
//! - [`read_models`]: the read models themselves.
//! - [`registry`]: the explicit list of projectors.
//! - [`world_state`]: a world's full state as of a tick or time, folded from the log.
//! - [`verify`]: per-table checksums, to compare a read model with a rebuild.

pub mod projector;
pub mod read_models;
pub mod redrive;
pub mod registry;
pub mod replay;
pub mod runtime;
pub mod store;
pub mod verify;
pub mod world_state;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use worldline_ops::{Health, Settings};

pub use projector::{ApplyError, Event, Projector};
pub use runtime::{ProjectorRuntime, RuntimeError, RuntimeOptions};
pub use store::SchemaName;

/// The runtime options of `projector` under `settings`, writing to its own schema.
pub fn runtime_options(settings: &Settings, projector: &dyn Projector) -> RuntimeOptions {
    RuntimeOptions {
        group_id: format!("{}{}", settings.projector.group_prefix, projector.name()),
        schema: SchemaName::parse(projector.name())
            .unwrap_or_else(|e| panic!("projector names are schema names: {e}")),
        topics: projector
            .families()
            .iter()
            .map(|f| f.topic(&settings.topics.prefix))
            .collect(),
        batch_max_records: settings.projector.batch_max_records,
        batch_max_wait: Duration::from_millis(settings.projector.batch_max_wait_ms),
        session_timeout: Duration::from_millis(settings.projector.session_timeout_ms),
        dead_letter_topic: Some(
            worldline_ops::topics::dead_letter_topic_spec(&settings.topics).name,
        ),
        stop_at: None,
    }
}

/// Options for building `projector` into another schema (a rebuild, a shadow),
/// with its own consumer group so it reads the whole log independently.
pub fn runtime_options_into(
    settings: &Settings,
    projector: &dyn Projector,
    schema: SchemaName,
) -> RuntimeOptions {
    let mut options = runtime_options(settings, projector);
    options.group_id = format!("{}{}", settings.projector.group_prefix, schema.as_str());
    options.schema = schema;
    options
}

/// Runs the given projectors side by side until `shutdown`; returns the first error.
pub async fn run_projectors(
    settings: &Settings,
    pool: PgPool,
    projectors: Vec<Arc<dyn Projector>>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let mut tasks = tokio::task::JoinSet::new();
    for projector in projectors {
        let options = runtime_options(settings, projector.as_ref());
        let runtime = ProjectorRuntime::new(
            projector,
            pool.clone(),
            settings.kafka.clone(),
            options,
            health.clone(),
        );
        tasks.spawn(runtime.run(shutdown.clone()));
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "projector halted");
                first_error.get_or_insert(error);
            }
            Err(join_error) => tracing::error!(%join_error, "projector task failed"),
        }
    }
    first_error.map_or(Ok(()), Err)
}
