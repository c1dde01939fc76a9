//! Rebuilding a read model from offset zero while the live one keeps serving.
//!
//! `replay` builds `<name>_shadow` from the log with the current code, in phases
//! that each stop exactly at the live schema's stored offsets. The phases read
//! the log with one pass shared by every projector being rebuilt (see
//! [`pass`]); a fresh shadow is bulk-built without its secondary indexes, which
//! are created once, by sort, when the shadow is nearly caught up. When the
//! shadow is close, it takes the live schema's exclusive swap lock (every live
//! batch holds the shared one, see `runtime/apply.rs`), so the live projector pauses
//! between batches; the shadow catches up to the now-frozen live offsets; and,
//! in the same transaction, the live schema is renamed away and the shadow
//! renamed into its place. Queries see the old tables until that commit and the
//! new ones after: never an empty or half-built read model. The live
//! projector's next batch resolves names after the lock, in the new schema,
//! whose offsets equal its own.
//!
//! `verify` does the same into `<name>_verify`, compares per-table checksums under
//! the lock instead of swapping, and drops the scratch schema.
//!
//! Interrupting either leaves the shadow schema with its offsets (and the list
//! of indexes still to create): running again resumes; `abort` drops it.

mod pass;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::Settings;

use crate::projector::Projector;
use crate::runtime::RuntimeError;
use crate::store::SchemaName;
use crate::verify::{RUNTIME_TABLES, TableChecksum, differences, table_checksums};

/// How far along a rebuild is. Records are counted per projector: rebuilding
/// several together, a record of a topic two of them read counts twice.
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
    #[error("could not read the log: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("interrupted; the rebuild in {0} is kept and the next run resumes it")]
    Interrupted(String),
    #[error("the stored offsets of {0} moved under this rebuild: another rebuild of it is running")]
    Concurrent(String),
    #[error("{0} is listed twice")]
    Duplicate(String),
    #[error("a rebuild task failed: {0}")]
    Task(String),
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
    keys: pass::KeyCache,
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

/// Where the secondary indexes of a bulk-built schema wait to be created.
pub const DEFERRED_INDEXES_TABLE: &str = "rebuild_deferred_indexes";

type Offsets = HashMap<(String, i32), i64>;

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
) -> Result<Offsets, sqlx::Error> {
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

/// Records between `built` and `live`, summed over partitions.
fn distance(live: &Offsets, built: &Offsets) -> i64 {
    live.iter()
        .map(|(key, at)| (at - built.get(key).copied().unwrap_or(0)).max(0))
        .sum()
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
            keys: pass::KeyCache::default(),
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
        self.keys.clear().await;
        Ok(())
    }

    fn topics(&self) -> Vec<String> {
        self.projector
            .families()
            .iter()
            .map(|f| f.topic(&self.settings.topics.prefix))
            .collect()
    }

    /// Creates the target schema if needed. A fresh one (nothing applied yet)
    /// loses its secondary indexes, and the keys of its event logs (see
    /// `read_models::fresh`), until [`Rebuild::restore_indexes`]: one sort per
    /// index at the end costs far less than keeping each one ordered through
    /// millions of inserts.
    async fn prepare(&self) -> Result<(), ReplayError> {
        crate::store::prepare_schema(&self.pool, &self.target, self.projector.as_ref())
            .await
            .map_err(|source| RuntimeError::Prepare {
                schema: self.target.as_str().to_owned(),
                source,
            })?;
        let mut conn = self.pool.acquire().await?;
        if !stored_offsets(&mut conn, &self.target).await?.is_empty() {
            return Ok(());
        }
        // Nothing applied: whatever ids were remembered belong to another build.
        self.keys.clear().await;
        let s = self.target.as_str();
        let mut tx = conn.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {s}.{DEFERRED_INDEXES_TABLE} (
                 name       text    PRIMARY KEY,
                 table_name text    NOT NULL,
                 definition text    NOT NULL,
                 -- The key of an event log, answered from memory meanwhile.
                 event_log  boolean NOT NULL
             )"
        )))
        .execute(&mut *tx)
        .await?;
        // Other unique indexes stay: upserts rely on them.
        let secondary: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT i.relname::text, t.relname::text, pg_get_indexdef(i.oid)
               FROM pg_index x
               JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_class t ON t.oid = x.indrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE n.nspname = $1 AND NOT x.indisunique AND NOT (t.relname = ANY($2))
              ORDER BY 1",
        )
        .bind(s)
        .bind(RUNTIME_TABLES.as_slice())
        .fetch_all(&mut *tx)
        .await?;
        let keys: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.conname::text, t.relname::text, pg_get_constraintdef(c.oid)
               FROM pg_constraint c
               JOIN pg_class t ON t.oid = c.conrelid
               JOIN pg_namespace n ON n.oid = t.relnamespace
              WHERE n.nspname = $1 AND c.contype IN ('p', 'u')
                AND obj_description(t.oid, 'pg_class') = $2
              ORDER BY 1",
        )
        .bind(s)
        .bind(crate::read_models::fresh::EVENT_LOG_COMMENT)
        .fetch_all(&mut *tx)
        .await?;
        let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
        let mut deferred = Vec::new();
        for (name, table, definition) in secondary {
            let drop = format!("DROP INDEX {s}.{}", quote(&name));
            deferred.push((name, table, definition, false, drop));
        }
        for (name, table, constraint) in keys {
            let on = format!("{s}.{}", quote(&table));
            let definition = format!(
                "ALTER TABLE {on} ADD CONSTRAINT {} {constraint}",
                quote(&name)
            );
            let drop = format!("ALTER TABLE {on} DROP CONSTRAINT {}", quote(&name));
            deferred.push((name, table, definition, true, drop));
        }
        for (name, table, definition, event_log, drop) in deferred {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {s}.{DEFERRED_INDEXES_TABLE} (name, table_name, definition, event_log)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING"
            )))
            .bind(&name)
            .bind(&table)
            .bind(&definition)
            .bind(event_log)
            .execute(&mut *tx)
            .await?;
            // Names and definitions come from the catalog of this rebuild's own schema.
            sqlx::query(AssertSqlSafe(drop)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The indexes and keys [`Rebuild::prepare`] deferred and not created yet,
    /// with the size of their tables.
    async fn deferred_indexes(&self) -> Result<Vec<DeferredIndex>, ReplayError> {
        let s = self.target.as_str();
        let mut conn = self.pool.acquire().await?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                             WHERE table_schema = $1 AND table_name = $2)",
        )
        .bind(s)
        .bind(DEFERRED_INDEXES_TABLE)
        .fetch_one(&mut *conn)
        .await?;
        if !exists {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT d.name, d.definition, COALESCE(pg_relation_size(c.oid), 0)
               FROM {s}.{DEFERRED_INDEXES_TABLE} d
               LEFT JOIN pg_class c ON c.relname = d.table_name
                    AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)"
        )))
        .bind(s)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, definition, table_bytes)| DeferredIndex {
                schema: self.target.clone(),
                name,
                definition,
                table_bytes,
            })
            .collect())
    }

    async fn forget_deferred_indexes(&self) -> Result<(), ReplayError> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}.{DEFERRED_INDEXES_TABLE}",
            self.target.as_str()
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Where the live read model stands: its stored offsets, or, for a projector
    /// that has no live schema yet (a new read model), the end of the log.
    async fn live_position(&self, conn: &mut PgConnection) -> Result<Offsets, ReplayError> {
        if schema_exists(conn, self.live.as_str()).await? {
            return Ok(stored_offsets(conn, &self.live).await?);
        }
        let kafka = self.settings.kafka.clone();
        let topics = self.topics();
        let ends = tokio::task::spawn_blocking(move || log_ends(&kafka, &topics))
            .await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)??;
        Ok(ends)
    }

    fn limits(&self) -> pass::Limits {
        pass::Limits::for_live_batch(self.settings.projector.batch_max_records)
    }

    fn pass_target(&self, stop: Offsets) -> pass::Target {
        pass::Target {
            projector: self.projector.clone(),
            schema: self.target.clone(),
            topics: self.topics(),
            stop,
            keys: self.keys.clone(),
        }
    }

    /// Rebuilds into the shadow schema and swaps it in; the old schema is dropped.
    pub async fn replay(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<(), ReplayError> {
        replay_together(std::slice::from_ref(self), progress, shutdown).await
    }

    /// Rebuilds into the scratch schema, compares it with live at the same
    /// position, and drops it.
    pub async fn verify(
        &self,
        progress: &(dyn Fn(Progress) + Send + Sync),
        shutdown: &CancellationToken,
    ) -> Result<VerifyReport, ReplayError> {
        self.abort().await?;
        let rebuilds = std::slice::from_ref(self);
        self.prepare().await?;
        approach_live(rebuilds, progress, shutdown).await?;
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query(swap_lock_sql())
            .bind(self.live.as_str())
            .execute(&mut *tx)
            .await?;
        let frozen = stored_offsets(&mut tx, &self.live).await?;
        pass::build(
            &self.pool,
            &self.settings.kafka,
            &[self.pass_target(frozen)],
            self.limits(),
            progress,
            shutdown,
        )
        .await?;
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

/// An index or key a bulk rebuild has yet to create.
#[derive(Debug)]
struct DeferredIndex {
    schema: SchemaName,
    name: String,
    definition: String,
    table_bytes: i64,
}

/// Index builds that run at once: each is one sort, mostly on one core.
const INDEX_BUILDERS: usize = 2;

/// Creates every deferred index of `rebuilds`, largest tables first so the
/// builders finish together, one transaction each so an interruption keeps
/// those already built.
async fn restore_indexes(
    rebuilds: &[Rebuild],
    shutdown: &CancellationToken,
) -> Result<(), ReplayError> {
    use futures::{StreamExt, TryStreamExt};
    let Some(first) = rebuilds.first() else {
        return Ok(());
    };
    let mut deferred = Vec::new();
    for rebuild in rebuilds {
        deferred.extend(rebuild.deferred_indexes().await?);
    }
    deferred.sort_by_key(|d| std::cmp::Reverse(d.table_bytes));
    let pool = &first.pool;
    futures::stream::iter(deferred)
        .map(|index| async move {
            let s = index.schema.as_str();
            if shutdown.is_cancelled() {
                return Err(ReplayError::Interrupted(s.to_owned()));
            }
            let started = std::time::Instant::now();
            let mut tx = pool.begin().await?;
            // Sorts in memory instead of merging runs on disk; one core each,
            // as the builders already run side by side.
            sqlx::query(
                "SELECT set_config('maintenance_work_mem', '1GB', true),
                        set_config('max_parallel_maintenance_workers', '0', true)",
            )
            .execute(&mut *tx)
            .await?;
            // PostgreSQL's own rendering of an index or key this rebuild
            // dropped from its own schema; a key that finds a duplicate fails
            // here, before any swap.
            sqlx::query(AssertSqlSafe(index.definition.clone()))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {s}.{DEFERRED_INDEXES_TABLE} WHERE name = $1"
            )))
            .bind(&index.name)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(schema = s, index = index.name, took = ?started.elapsed(), "deferred index created");
            Ok::<(), ReplayError>(())
        })
        .buffer_unordered(INDEX_BUILDERS)
        .try_collect::<Vec<()>>()
        .await?;
    for rebuild in rebuilds {
        rebuild.forget_deferred_indexes().await?;
        rebuild.keys.clear().await;
    }
    Ok(())
}

/// Builds in unlocked phases until every rebuild is close to its live position.
async fn approach_live(
    rebuilds: &[Rebuild],
    progress: &(dyn Fn(Progress) + Send + Sync),
    shutdown: &CancellationToken,
) -> Result<(), ReplayError> {
    let Some(first) = rebuilds.first() else {
        return Ok(());
    };
    let mut conn = first.pool.acquire().await?;
    // Close enough that the locked final phase pauses the live projectors for
    // about one of their batches.
    let close = first.settings.projector.batch_max_records as i64;
    for phase in 0..10 {
        let mut targets = Vec::with_capacity(rebuilds.len());
        let mut far = false;
        for rebuild in rebuilds {
            let live = rebuild.live_position(&mut conn).await?;
            let built = stored_offsets(&mut conn, &rebuild.target).await?;
            far |= distance(&live, &built) > close;
            targets.push(rebuild.pass_target(live));
        }
        if phase > 0 && !far {
            break;
        }
        pass::build(
            &first.pool,
            &first.settings.kafka,
            &targets,
            first.limits(),
            progress,
            shutdown,
        )
        .await?;
    }
    Ok(())
}

/// Rebuilds several projectors in one shared pass over the log and swaps each
/// in, all in one transaction at the end (what `worldline replay --all` runs).
pub async fn replay_together(
    rebuilds: &[Rebuild],
    progress: &(dyn Fn(Progress) + Send + Sync),
    shutdown: &CancellationToken,
) -> Result<(), ReplayError> {
    let mut rebuilds: Vec<&Rebuild> = rebuilds.iter().collect();
    // One order for taking the swap locks, whoever calls.
    rebuilds.sort_by(|a, b| a.live.as_str().cmp(b.live.as_str()));
    if let Some(pair) = rebuilds.windows(2).find(|w| w[0].live == w[1].live) {
        return Err(ReplayError::Duplicate(pair[0].live.as_str().to_owned()));
    }
    let Some(first) = rebuilds.first().copied() else {
        return Ok(());
    };
    let rebuilds: Vec<Rebuild> = rebuilds.into_iter().cloned().collect();
    for rebuild in &rebuilds {
        rebuild.prepare().await?;
    }
    approach_live(&rebuilds, progress, shutdown).await?;
    restore_indexes(&rebuilds, shutdown).await?;
    // Index builds took a while; the live projectors moved on meanwhile.
    approach_live(&rebuilds, progress, shutdown).await?;

    let stamp = chrono::Utc::now().timestamp();
    let mut conn = first.pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut targets = Vec::with_capacity(rebuilds.len());
    let mut had_live = Vec::with_capacity(rebuilds.len());
    for rebuild in &rebuilds {
        sqlx::query(swap_lock_sql())
            .bind(rebuild.live.as_str())
            .execute(&mut *tx)
            .await?;
        had_live.push(schema_exists(&mut tx, rebuild.live.as_str()).await?);
        let frozen = rebuild.live_position(&mut tx).await?;
        targets.push(rebuild.pass_target(frozen));
    }
    pass::build(
        &first.pool,
        &first.settings.kafka,
        &targets,
        first.limits(),
        progress,
        shutdown,
    )
    .await?;
    let mut retired = Vec::new();
    for (rebuild, had_live) in rebuilds.iter().zip(had_live) {
        grant_readers(&mut tx, &rebuild.live, &rebuild.target).await?;
        let (live, target) = (rebuild.live.as_str(), rebuild.target.as_str());
        if had_live {
            let old = format!("{live}_retired_{stamp}");
            sqlx::query(AssertSqlSafe(format!(
                "ALTER SCHEMA {live} RENAME TO {old}"
            )))
            .execute(&mut *tx)
            .await?;
            retired.push(old);
        }
        sqlx::query(AssertSqlSafe(format!(
            "ALTER SCHEMA {target} RENAME TO {live}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    for old in retired {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {old} CASCADE"
        )))
        .execute(&first.pool)
        .await?;
    }
    for rebuild in &rebuilds {
        tracing::info!(
            projector = rebuild.projector.name(),
            "rebuilt schema swapped in; old one dropped"
        );
    }
    Ok(())
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
