//! The runtime's own tables inside each projector schema, and the migrations.
//!
//! Each projector schema holds, beside its read-model tables:
//! - `projector_offsets (topic, partition) → next_offset`: where to resume. It is
//!   written in the same transaction as the read-model rows, so the two can never
//!   disagree; this table, not Kafka's committed offsets, decides where a
//!   consumer starts.
//! - `dead_letters`: events that could not be applied, with the reason.
//!
//! Keeping them in the schema means a shadow rebuild carries its own positions,
//! and swapping schemas swaps read model and positions together.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

use crate::projector::Projector;

/// A schema name that is safe to splice into SQL: lowercase letters, digits and
/// `_`, starting with a letter, at most 63 bytes (Postgres' identifier limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaName(String);

/// A name that is not a valid schema name.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a valid schema name (lowercase letters, digits and '_', starting with a letter, at most 63 bytes)"
)]
pub struct BadSchemaName(String);

impl SchemaName {
    /// Validates `raw`.
    pub fn parse(raw: &str) -> Result<SchemaName, BadSchemaName> {
        let valid = !raw.is_empty()
            && raw.len() <= 63
            && raw.starts_with(|c: char| c.is_ascii_lowercase())
            && raw
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(SchemaName(raw.to_owned()))
        } else {
            Err(BadSchemaName(raw.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Creates the schema, the runtime tables and the projector's read-model tables,
/// idempotently.
pub async fn prepare_schema(
    pool: &PgPool,
    schema: &SchemaName,
    projector: &dyn Projector,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    // Concurrent instances of one projector start together; the advisory lock
    // keeps their CREATE IF NOT EXISTS statements from racing on the catalog.
    sqlx::query("SELECT pg_advisory_lock(hashtext('worldline.prepare_schema'))")
        .execute(&mut *conn)
        .await?;
    let result = create_runtime_tables(&mut conn, schema).await;
    let result = match result {
        Ok(()) => run_migrations(&mut conn, schema, projector).await,
        Err(error) => Err(error.into()),
    };
    sqlx::query("SELECT pg_advisory_unlock(hashtext('worldline.prepare_schema'))")
        .execute(&mut *conn)
        .await?;
    result
}

async fn create_runtime_tables(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<(), sqlx::Error> {
    let s = schema.as_str().to_owned();
    let mut tx = conn.begin().await?;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {s}")))
        .execute(&mut *tx)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {s}.projector_offsets (
             topic       text        NOT NULL,
             partition   integer     NOT NULL,
             next_offset bigint      NOT NULL,
             updated_at  timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (topic, partition)
         )"
    )))
    .execute(&mut *tx)
    .await?;
    // The log end each partition had when an instance last looked: not part of
    // the exactly-once state (written outside batches, by whichever instance
    // owns the partition), only so readers (the query API's lag header and
    // readiness) can tell how far behind the read model is without a Kafka client.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {s}.projector_log_ends (
             topic       text        NOT NULL,
             partition   integer     NOT NULL,
             end_offset  bigint      NOT NULL,
             observed_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (topic, partition)
         )"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {s}.dead_letters (
             topic          text        NOT NULL,
             partition      integer     NOT NULL,
             kafka_offset   bigint      NOT NULL,
             record_key     bytea,
             payload        bytea,
             payload_sha256 text        NOT NULL,
             error_class    text        NOT NULL,
             error_message  text        NOT NULL,
             recorded_at    timestamptz NOT NULL DEFAULT now(),
             redriven_at    timestamptz,
             PRIMARY KEY (topic, partition, kafka_offset)
         )"
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

async fn run_migrations(
    conn: &mut PgConnection,
    schema: &SchemaName,
    projector: &dyn Projector,
) -> Result<(), sqlx::migrate::MigrateError> {
    let s = schema.as_str();
    // The migrations are unqualified; search_path aims them at this schema, and
    // the bookkeeping table lives in the schema too, so a shadow schema migrates
    // independently of the live one.
    sqlx::query(AssertSqlSafe(format!("SET search_path TO {s}")))
        .execute(&mut *conn)
        .await?;
    let mut migrator =
        sqlx::migrate::Migrator::with_migrations(projector.migrator().iter().cloned().collect());
    migrator.dangerous_set_table_name(format!("{s}._sqlx_migrations"));
    // The advisory lock above already serializes instances.
    migrator.set_locking(false);
    // run_direct, not run: `run` takes `impl Acquire`, whose future is not Send
    // across a spawned task (sqlx documents this as the workaround).
    let result = migrator.run_direct(None, &mut *conn, false).await;
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    result
}

/// The stored next offsets of a projector schema, for the given topics.
pub async fn load_offsets(
    pool: &PgPool,
    schema: &SchemaName,
    topics: &[String],
) -> Result<HashMap<(String, i32), i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT topic, partition, next_offset FROM {}.projector_offsets WHERE topic = ANY($1)",
        schema.as_str()
    )))
    .bind(topics)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

/// Records the log end (high watermark) last seen for each topic-partition.
pub async fn record_log_ends(
    pool: &PgPool,
    schema: &SchemaName,
    ends: &[(String, i32, i64)],
) -> Result<(), sqlx::Error> {
    if ends.is_empty() {
        return Ok(());
    }
    let (topics, (partitions, offsets)): (Vec<&str>, (Vec<i32>, Vec<i64>)) = ends
        .iter()
        .map(|(topic, partition, end)| (topic.as_str(), (*partition, *end)))
        .unzip();
    let s = schema.as_str();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.projector_log_ends AS e (topic, partition, end_offset)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[])
         ON CONFLICT (topic, partition) DO UPDATE
            SET end_offset = GREATEST(e.end_offset, EXCLUDED.end_offset), observed_at = now()"
    )))
    .bind(topics)
    .bind(partitions)
    .bind(offsets)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves one partition's stored offset from `expected` to `next`, or reports
/// that another instance moved it first (a zombie must not apply twice).
/// `expected = None` means no row existed when this instance was assigned.
pub async fn compare_and_set_offset(
    tx: &mut PgConnection,
    schema: &SchemaName,
    topic: &str,
    partition: i32,
    expected: Option<i64>,
    next: i64,
) -> Result<bool, sqlx::Error> {
    let s = schema.as_str();
    let affected = match expected {
        Some(expected) => sqlx::query(AssertSqlSafe(format!(
            "UPDATE {s}.projector_offsets SET next_offset = $4, updated_at = now()
              WHERE topic = $1 AND partition = $2 AND next_offset = $3"
        )))
        .bind(topic)
        .bind(partition)
        .bind(expected)
        .bind(next)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        None => sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {s}.projector_offsets (topic, partition, next_offset)
             VALUES ($1, $2, $3) ON CONFLICT (topic, partition) DO NOTHING"
        )))
        .bind(topic)
        .bind(partition)
        .bind(next)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
    };
    Ok(affected == 1)
}

/// One partition's offset move in a batch: from what this instance loaded
/// (`None`: no row existed) to the batch's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetMove {
    pub topic: String,
    pub partition: i32,
    pub expected: Option<i64>,
    pub next: i64,
}

/// [`compare_and_set_offset`] for every partition of a batch in one statement
/// (one round trip, however many partitions the batch spans). Returns the
/// partitions another instance moved first; the caller rolls back if any.
///
/// Each row moves under the same rule as the single-partition form: an
/// `UPDATE … WHERE next_offset = expected` that a concurrent commit makes
/// re-check against the committed value (and fail), or an insert that must not
/// conflict. Two instances that both believe they own overlapping partitions
/// (a zombie and its successor) may lock the rows in different orders; the
/// server then aborts one with a deadlock error, which is retried like any
/// database error: it can delay a batch, never apply one twice.
pub async fn compare_and_set_offsets(
    tx: &mut PgConnection,
    schema: &SchemaName,
    moves: &[OffsetMove],
) -> Result<Vec<(String, i32)>, sqlx::Error> {
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    let s = schema.as_str();
    let moved: Vec<(String, i32)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH moves AS (
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[])
               AS m(topic, partition, expected, next_offset)
         ), updated AS (
             UPDATE {s}.projector_offsets o SET next_offset = m.next_offset, updated_at = now()
               FROM moves m
              WHERE m.expected IS NOT NULL
                AND o.topic = m.topic AND o.partition = m.partition
                AND o.next_offset = m.expected
             RETURNING o.topic, o.partition
         ), inserted AS (
             INSERT INTO {s}.projector_offsets (topic, partition, next_offset)
             SELECT topic, partition, next_offset FROM moves WHERE expected IS NULL
             ON CONFLICT (topic, partition) DO NOTHING
             RETURNING topic, partition
         )
         SELECT topic, partition FROM updated UNION ALL SELECT topic, partition FROM inserted"
    )))
    .bind(moves.iter().map(|m| m.topic.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.partition).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.expected).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.next).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let moved: std::collections::HashSet<(String, i32)> = moved.into_iter().collect();
    Ok(moves
        .iter()
        .map(|m| (m.topic.clone(), m.partition))
        .filter(|key| !moved.contains(key))
        .collect())
}

/// A record that could not be applied.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub error_class: &'static str,
    pub error_message: String,
}

/// Records dead letters; a record already recorded (same position) is left as is.
pub async fn insert_dead_letters(
    tx: &mut PgConnection,
    schema: &SchemaName,
    letters: &[DeadLetter],
) -> Result<(), sqlx::Error> {
    if letters.is_empty() {
        return Ok(());
    }
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {}.dead_letters
             (topic, partition, kafka_offset, record_key, payload, payload_sha256, error_class, error_message)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bytea[], $5::bytea[],
                              $6::text[], $7::text[], $8::text[])
         ON CONFLICT (topic, partition, kafka_offset) DO NOTHING",
        schema.as_str()
    )))
    .bind(letters.iter().map(|d| d.topic.clone()).collect::<Vec<_>>())
    .bind(letters.iter().map(|d| d.partition).collect::<Vec<_>>())
    .bind(letters.iter().map(|d| d.offset).collect::<Vec<_>>())
    .bind(letters.iter().map(|d| d.key.clone()).collect::<Vec<_>>())
    .bind(letters.iter().map(|d| d.payload.clone()).collect::<Vec<_>>())
    .bind(
        letters
            .iter()
            .map(|d| sha256_hex(d.payload.as_deref().unwrap_or_default()))
            .collect::<Vec<_>>(),
    )
    .bind(letters.iter().map(|d| d.error_class).collect::<Vec<_>>())
    .bind(letters.iter().map(|d| d.error_message.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Hex SHA-256, so a dead letter can be matched to its bytes without trusting them.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_strict() {
        for ok in ["clock", "clock_shadow_2", "a1"] {
            assert!(SchemaName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Clock",
            "1clock",
            "clock;drop",
            "clock-x",
            &"a".repeat(64),
        ] {
            assert!(SchemaName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sha256_of_empty_is_the_well_known_value() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
