//! Per-table checksums of a projector schema, to prove a read model equals a
//! rebuild of it from the log.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgPool};

use crate::store::SchemaName;

/// Runtime bookkeeping tables, which legitimately differ between a live schema
/// and a rebuild (timestamps of commits, migration run times, indexes a bulk
/// rebuild has yet to create).
pub const RUNTIME_TABLES: [&str; 5] = [
    "projector_offsets",
    "projector_log_ends",
    "dead_letters",
    "_sqlx_migrations",
    crate::replay::DEFERRED_INDEXES_TABLE,
];

/// Row count and an order-independent digest of every row's text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableChecksum {
    pub rows: i64,
    pub digest: String,
}

/// Checksums of every read-model table of `schema`.
pub async fn table_checksums(
    pool: &PgPool,
    schema: &SchemaName,
) -> Result<BTreeMap<String, TableChecksum>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
          WHERE table_schema = $1 AND table_type = 'BASE TABLE' AND NOT (table_name = ANY($2))
          ORDER BY table_name",
    )
    .bind(schema.as_str())
    .bind(RUNTIME_TABLES.as_slice())
    .fetch_all(pool)
    .await?;
    let mut checksums = BTreeMap::new();
    for table in tables {
        // Table names come from the catalog of a validated schema; quote them anyway.
        let quoted = format!("{}.\"{}\"", schema.as_str(), table.replace('"', "\"\""));
        let (rows, digest): (i64, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT count(*), md5(string_agg(row_digest, '' ORDER BY row_digest))
               FROM (SELECT md5(t::text) AS row_digest FROM {quoted} t) rows"
        )))
        .fetch_one(pool)
        .await?;
        checksums.insert(
            table,
            TableChecksum {
                rows,
                digest: digest.unwrap_or_default(),
            },
        );
    }
    Ok(checksums)
}

/// The tables whose checksums differ between two schemas (or exist in only one).
pub fn differences(
    left: &BTreeMap<String, TableChecksum>,
    right: &BTreeMap<String, TableChecksum>,
) -> Vec<String> {
    let mut names: Vec<&String> = left.keys().chain(right.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|name| left.get(*name) != right.get(*name))
        .cloned()
        .collect()
}
