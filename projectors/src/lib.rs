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
pub use runtime::{ProjectorRuntime, RuntimeError, RuntimeOptions, Target};
pub use store::SchemaName;

/// `projector` writing to its own schema, reading its families' topics.
pub fn target(settings: &Settings, projector: Arc<dyn Projector>) -> Target {
    let schema = SchemaName::parse(projector.name())
        .unwrap_or_else(|e| panic!("projector names are schema names: {e}"));
    target_into(settings, projector, schema)
}

/// `projector` writing to another schema (a rebuild, a shadow).
pub fn target_into(
    settings: &Settings,
    projector: Arc<dyn Projector>,
    schema: SchemaName,
) -> Target {
    let topics = projector
        .families()
        .iter()
        .map(|f| f.topic(&settings.topics.prefix))
        .collect();
    Target {
        projector,
        schema,
        topics,
    }
}

/// The runtime options of a set of targets under `settings`. Its consumer
/// group is named after the set's schemas (`<prefix>clock`,
/// `<prefix>worlds+clock+…`): every instance running the same set shares
/// it, and one projector in two different sets would be applied by two
/// groups at once (each batch would then conflict with the other group's;
/// nothing is applied twice, but both keep re-reading).
pub fn runtime_options(settings: &Settings, targets: &[Target]) -> RuntimeOptions {
    let schemas: Vec<&str> = targets.iter().map(|t| t.schema.as_str()).collect();
    RuntimeOptions {
        group_id: format!("{}{}", settings.projector.group_prefix, schemas.join("+")),
        batch_max_records: settings.projector.batch_max_records,
        batch_max_wait: Duration::from_millis(settings.projector.batch_max_wait_ms),
        session_timeout: Duration::from_millis(settings.projector.session_timeout_ms),
        dead_letter_topic: Some(
            worldline_ops::topics::dead_letter_topic_spec(&settings.topics).name,
        ),
        stop_at: None,
    }
}

/// Runs the given projectors until `shutdown`, as one set behind one consumer.
pub async fn run_projectors(
    settings: &Settings,
    pool: PgPool,
    projectors: Vec<Arc<dyn Projector>>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let targets: Vec<Target> = projectors
        .into_iter()
        .map(|projector| target(settings, projector))
        .collect();
    let options = runtime_options(settings, &targets);
    let runtime = ProjectorRuntime::new(targets, pool, settings.kafka.clone(), options, health);
    let result = runtime.run(shutdown).await;
    if let Err(error) = &result {
        tracing::error!(%error, "projectors halted");
    }
    result
}
