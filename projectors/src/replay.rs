//! Rebuilding a read model from offset zero while the live one keeps serving.
//!
//! `replay` builds `<name>_shadow` from the log with the current code, in phases
//! that each stop exactly at the live schema's stored offsets. When the shadow is
//! close, it takes the live schema's exclusive swap lock (every live batch holds
//! the shared one, see `runtime.rs`), so the live projector pauses between
//! batches; the shadow catches up to the now-frozen live offsets; and, in the same
//! transaction, the live schema is renamed away and the shadow renamed into its
//! place. Queries see the old tables until that commit and the new ones after:
//! never an empty or half-built read model. The live projector's next batch
//! resolves names after the lock, in the new schema, whose offsets equal its own.
//!
//! `verify` does the same into `<name>_verify`, compares per-table checksums under
//! the lock instead of swapping, and drops the scratch schema.
//!
//! Interrupting either leaves the shadow schema with its offsets: running again
//! resumes; `abort` drops it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::{Health, Settings};

use crate::projector::Projector;
use crate::runtime::{ProjectorRuntime, RuntimeError};
use crate::store::SchemaName;
use crate::verify::{TableChecksum, differences, table_checksums};

/// How far along a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Records applied to the rebuild so far.
    pub done: i64,
    /// Records it must reach (the live position now).
    pub target: i64,
    /// Records per second over the last interval.
    pub rate: f64,
}

impl Progress {
    /// Seconds left at the current rate, if it can be estimated.
    pub fn eta_seconds(&self) -> Option<f64> {
        (self.rate > 0.0).then(|| ((self.target - self.done).max(0) as f64) / self.rate)
    }
}

/// What a replay or verify failed on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("rebuild failed: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("invalid schema name: {0}")]
    Schema(#[from] crate::store::BadSchemaName),
    #[error("could not read the log's end offsets: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("interrupted; the rebuild in {0} is kept and the next run resumes it")]
    Interrupted(String),
}

/// The outcome of `verify`: per-table checksums of both sides and the tables that differ.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub live: BTreeMap<String, TableChecksum>,
    pub rebuilt: BTreeMap<String, TableChecksum>,
    pub differing: Vec<String>,
}

/// One replay or verify run.
#[derive(Clone)]
pub struct Rebuild {
    settings: Settings,
    pool: PgPool,
    projector: Arc<dyn Projector>,
    live: SchemaName,
    target: SchemaName,
}

impl std::fmt::Debug for Rebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("live", &self.live)
            .field("target", &self.target)
            .finish()
    }
}

/// The lock every live batch takes shared; a swap or a verify takes it exclusive.
fn swap_lock_sql() -> &'static str {
    "SELECT pg_advisory_xact_lock(hashtext('worldline.schema.' || $1))"
}

async fn schema_exists(conn: &mut PgConnection, schema: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(conn)
        .await
}

/// Stored next offsets of `schema` (empty when the schema has none yet).
async fn stored_offsets(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<HashMap<(String, i32), i64>, sqlx::Error> {
    if !schema_exists(conn, schema.as_str()).await? {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT topic, partition, next_offset FROM {}.projector_offsets",
        schema.as_str()
    )))
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

impl Rebuild {
    /// A rebuild of `projector` into `<name>_<suffix>`.
    pub fn new(
        settings: &Settings,
        pool: PgPool,
        projector: Arc<dyn Projector>,
        suffix: &str,
    ) -> Result<Rebuild, ReplayError> {
        let live = SchemaName::parse(projector.name())?;
        let target = SchemaName::parse(&format!("{}_{suffix}", projector.name()))?;
        Ok(Rebuild {
            settings: settings.clone(),
            pool,
            projector,
            live,
            target,
        })
    }

    /// The schema being built.
    pub fn target(&self) -> &SchemaName {
        &self.target
    }

    /// Drops the schema being built (a clean abort).
    pub async fn abort(&self) -> Result<(), ReplayError> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.target.as_str()
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Builds the target until it stands exactly at `stop`.
    async fn run_until(
        &self,
        stop: &HashMap<(String, i32), i64>,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<(), ReplayError> {
        let target_total: i64 = stop.values().sum();
        let mut options = crate::runtime_options_into(
            &self.settings,
            self.projector.as_ref(),
            self.target.clone(),
        );
        // Dead letters were already published by the live projector.
        options.dead_letter_topic = None;
        options.stop_at = Some(stop.clone());
        let runtime = ProjectorRuntime::new(
            self.projector.clone(),
            self.pool.clone(),
            self.settings.kafka.clone(),
            options,
            Health::default(),
        );
        let run_token = shutdown.child_token();
        let mut task = tokio::spawn(runtime.run(run_token.clone()));
        let mut last = (Instant::now(), -1i64);
        loop {
            tokio::select! {
                finished = &mut task => {
                    finished.map_err(|_| RuntimeError::Kafka(rdkafka::error::KafkaError::Canceled))??;
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let mut conn = self.pool.acquire().await?;
                    let done: i64 = stored_offsets(&mut conn, &self.target).await?.values().sum();
                    let elapsed = last.0.elapsed().as_secs_f64();
                    let rate = if last.1 >= 0 && elapsed > 0.0 { (done - last.1) as f64 / elapsed } else { 0.0 };
                    last = (Instant::now(), done);
                    progress(Progress { done, target: target_total, rate });
                }
            }
        }
        if shutdown.is_cancelled() {
            return Err(ReplayError::Interrupted(self.target.as_str().to_owned()));
        }
        Ok(())
    }

    /// Catches up in unlocked phases until the remaining distance is small.
    async fn approach_live(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<(), ReplayError> {
        let mut conn = self.pool.acquire().await?;
        for _ in 0..10 {
            let live = self.live_position(&mut conn).await?;
            let built = stored_offsets(&mut conn, &self.target).await?;
            let behind: i64 = live
                .iter()
                .map(|(key, at)| (at - built.get(key).copied().unwrap_or(0)).max(0))
                .sum();
            // Close enough that the locked final phase pauses the live
            // projector for about one batch.
            if behind <= self.settings.projector.batch_max_records as i64 && !built.is_empty() {
                return Ok(());
            }
            self.run_until(&live, progress, shutdown).await?;
        }
        Ok(())
    }

    /// Where the live read model stands: its stored offsets, or, for a projector
    /// that has no live schema yet (a new read model), the end of the log.
    async fn live_position(
        &self,
        conn: &mut PgConnection,
    ) -> Result<HashMap<(String, i32), i64>, ReplayError> {
        if schema_exists(conn, self.live.as_str()).await? {
            return Ok(stored_offsets(conn, &self.live).await?);
        }
        let kafka = self.settings.kafka.clone();
        let topics: Vec<String> = self
            .projector
            .families()
            .iter()
            .map(|f| f.topic(&self.settings.topics.prefix))
            .collect();
        let ends = tokio::task::spawn_blocking(move || log_ends(&kafka, &topics))
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)??;
        Ok(ends)
    }

    /// Rebuilds into the shadow schema and swaps it in; the old schema is dropped.
    pub async fn replay(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<(), ReplayError> {
        self.approach_live(progress, shutdown).await?;
        let retired = format!(
            "{}_retired_{}",
            self.live.as_str(),
            chrono::Utc::now().timestamp()
        );
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(swap_lock_sql())
            .bind(self.live.as_str())
            .execute(&mut *tx)
            .await?;
        let had_live = schema_exists(&mut tx, self.live.as_str()).await?;
        let frozen = self.live_position(&mut tx).await?;
        self.run_until(&frozen, progress, shutdown).await?;
        grant_readers(&mut tx, &self.live, &self.target).await?;
        let (live, target) = (self.live.as_str(), self.target.as_str());
        if had_live {
            sqlx::query(AssertSqlSafe(format!(
                "ALTER SCHEMA {live} RENAME TO {retired}"
            )))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "ALTER SCHEMA {target} RENAME TO {live}"
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {retired} CASCADE"
        )))
        .execute(&self.pool)
        .await?;
        tracing::info!(
            projector = self.projector.name(),
            "rebuilt schema swapped in; old one dropped"
        );
        Ok(())
    }

    /// Rebuilds into the scratch schema, compares it with live at the same
    /// position, and drops it.
    pub async fn verify(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<VerifyReport, ReplayError> {
        self.abort().await?;
        self.approach_live(progress, shutdown).await?;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(swap_lock_sql())
            .bind(self.live.as_str())
            .execute(&mut *tx)
            .await?;
        let frozen = stored_offsets(&mut tx, &self.live).await?;
        self.run_until(&frozen, progress, shutdown).await?;
        let live = table_checksums(&self.pool, &self.live).await?;
        let rebuilt = table_checksums(&self.pool, &self.target).await?;
        tx.commit().await?;
        self.abort().await?;
        Ok(VerifyReport {
            differing: differences(&live, &rebuilt),
            live,
            rebuilt,
        })
    }
}

/// The end offset of every partition of `topics`.
fn log_ends(
    kafka: &worldline_ops::config::KafkaSettings,
    topics: &[String],
) -> Result<HashMap<(String, i32), i64>, rdkafka::error::KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        worldline_ops::kafka::base_client_config(kafka, "worldline-replay").create()?;
    let timeout = Duration::from_secs(10);
    let mut ends = HashMap::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
            ends.insert((topic.clone(), partition.id()), high);
        }
    }
    Ok(ends)
}

/// Gives the roles that can read the live schema the same access to its
/// replacement, so the API keeps working across the swap.
async fn grant_readers(
    conn: &mut PgConnection,
    live: &SchemaName,
    target: &SchemaName,
) -> Result<(), sqlx::Error> {
    let readers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT r.rolname FROM pg_namespace n
           CROSS JOIN LATERAL aclexplode(n.nspacl) a
           JOIN pg_roles r ON r.oid = a.grantee
          WHERE n.nspname = $1 AND a.privilege_type = 'USAGE' AND r.oid <> n.nspowner",
    )
    .bind(live.as_str())
    .fetch_all(&mut *conn)
    .await?;
    for role in readers {
        let role = role.replace('"', "\"\"");
        let t = target.as_str();
        for statement in [
            format!("GRANT USAGE ON SCHEMA {t} TO \"{role}\""),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA {t} TO \"{role}\""),
            format!("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {t} TO \"{role}\""),
        ] {
            sqlx::query(AssertSqlSafe(statement))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}
