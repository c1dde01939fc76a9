//! `/v1/projectors`: where every projector stands, read from PostgreSQL.
//!
//! Each projector schema holds its stored next offsets (`projector_offsets`,
//! written in the same transaction as the read model), the log ends its
//! instances last saw (`projector_log_ends`, refreshed about every second
//! while an instance runs) and its `dead_letters`. Reading those tables, not
//! this process's metrics, is what lets a `worldline serve` that runs no
//! projector report their lag. The totals are the figures the
//! `X-Worldline-Position` and `X-Worldline-Lag-Records` headers carry.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::consistency::Snapshot;
use crate::error::ApiError;

/// The projector these routes are registered under for per-resource hooks. No
/// one read model serves this route; the worlds projector reads every family,
/// so a consistency token waits until the worlds model has passed every write
/// it names (the event stream registers the same way).
pub const PROJECTOR: &str = "worlds";

/// Every projector of this build, by name (= schema name), in the order they
/// are listed. Mirrors the projectors' registry, which this crate does not
/// depend on; a test holds the two equal. The names are spliced into SQL:
/// they are constants, never client input.
pub const PROJECTORS: [&str; 6] = [
    "clock",
    "inference",
    "player_activity",
    "story",
    "weather",
    "worlds",
];

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_projectors))
}

/// Every projector's position and lag.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectorsStatus {
    /// One entry per projector, ordered by name; a projector that has never run
    /// is listed with no partitions.
    pub projectors: Vec<ProjectorStatus>,
}

/// Where one projector stands.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "projector": "clock", "position": 30, "lag_records": 2,
    "last_committed_at": "2026-11-02T10:00:30Z", "log_ends_observed_at": "2026-11-02T10:00:31Z",
    "partitions": [{
        "topic": "worldline.clock.v1", "partition": 0, "next_offset": 30, "log_end": 32,
        "lag_records": 2, "committed_at": "2026-11-02T10:00:30Z",
        "log_end_observed_at": "2026-11-02T10:00:31Z"
    }],
    "dead_letters": {"total": 1, "pending": 1, "last_recorded_at": "2026-11-02T09:58:00Z"}
}))]
pub struct ProjectorStatus {
    /// The projector's name, which is also its PostgreSQL schema.
    pub projector: String,
    /// Sum of the stored next offsets over its topic-partitions: grows by one
    /// per record applied (`X-Worldline-Position`).
    pub position: i64,
    /// Records in the log not yet applied, as of the log ends last observed
    /// (`X-Worldline-Lag-Records`); partitions without an observed log end
    /// count 0.
    pub lag_records: i64,
    /// When the projector last committed a batch; `null` before its first.
    pub last_committed_at: Option<DateTime<Utc>>,
    /// The oldest of the partitions' log-end observations, so the lag figure is
    /// at least this fresh; `null` when no log end was observed. Instances
    /// refresh them while running, so an old time means no instance is.
    pub log_ends_observed_at: Option<DateTime<Utc>>,
    /// Per topic-partition, ordered by topic, then partition.
    pub partitions: Vec<PartitionStatus>,
    /// Records the projector could not apply.
    pub dead_letters: DeadLetterCounts,
}

/// One topic-partition of a projector.
#[derive(Debug, Serialize, ToSchema)]
pub struct PartitionStatus {
    /// The Kafka topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the projector will apply; `null` before it applied any
    /// record of this partition.
    pub next_offset: Option<i64>,
    /// The log end (high watermark) an instance last observed; `null` when
    /// none has.
    pub log_end: Option<i64>,
    /// `log_end − next_offset` (at least 0); `null` without a log end.
    pub lag_records: Option<i64>,
    /// When the stored offset last moved; `null` with no stored offset.
    pub committed_at: Option<DateTime<Utc>>,
    /// When `log_end` was observed; `null` without a log end.
    pub log_end_observed_at: Option<DateTime<Utc>>,
}

/// A projector's dead letters.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct DeadLetterCounts {
    /// Every dead letter recorded.
    pub total: i64,
    /// Those not yet re-driven.
    pub pending: i64,
    /// When the latest was recorded; `null` without any.
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// Which runtime tables a projector schema has: none before the projector first
/// ran, and schemas older than log ends have no `projector_log_ends`.
#[derive(sqlx::FromRow)]
struct Tables {
    projector: String,
    offsets: bool,
    log_ends: bool,
    dead_letters: bool,
}

#[derive(sqlx::FromRow)]
struct PartitionRow {
    projector: String,
    topic: String,
    partition: i32,
    next_offset: Option<i64>,
    committed_at: Option<DateTime<Utc>>,
    end_offset: Option<i64>,
    observed_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    projector: String,
    total: i64,
    pending: i64,
    last_recorded_at: Option<DateTime<Utc>>,
}

/// Every projector's position and lag.
///
/// Per projector and topic-partition: the stored next offset, the log end an
/// instance last observed, the records between them and when each last moved,
/// plus the projector's dead letters. Read from each projector's schema, so it
/// holds whichever process runs the projectors. Projectors are not per world:
/// any token with the `read` scope may ask, whatever worlds it is limited to.
#[utoipa::path(
    get,
    path = "/v1/projectors",
    tag = "projectors",
    operation_id = "list_projectors",
    responses((status = 200, description = "Every projector's position and lag", body = ProjectorsStatus))
)]
async fn list_projectors(
    State(state): State<AppState>,
) -> Result<Json<ProjectorsStatus>, ApiError> {
    Ok(Json(read_status(&state.pool).await?))
}

/// Reads every projector's position, lag and dead letters.
pub async fn read_status(pool: &PgPool) -> Result<ProjectorsStatus, sqlx::Error> {
    let tables: Vec<Tables> = sqlx::query_as(
        "SELECT p AS projector,
                to_regclass(format('%I.projector_offsets', p)) IS NOT NULL AS offsets,
                to_regclass(format('%I.projector_log_ends', p)) IS NOT NULL AS log_ends,
                to_regclass(format('%I.dead_letters', p)) IS NOT NULL AS dead_letters
           FROM unnest($1::text[]) AS p",
    )
    .bind(&PROJECTORS[..])
    .fetch_all(pool)
    .await?;
    let partitions = read_partitions(pool, &tables).await?;
    let dead_letters = read_dead_letters(pool, &tables).await?;
    Ok(assemble(partitions, dead_letters))
}

/// One statement over every schema, so all positions come from one snapshot.
async fn read_partitions(
    pool: &PgPool,
    tables: &[Tables],
) -> Result<Vec<PartitionRow>, sqlx::Error> {
    let selects: Vec<String> = tables
        .iter()
        .filter(|t| known(&t.projector) && t.offsets)
        .map(|t| {
            let p = &t.projector;
            if t.log_ends {
                format!(
                    "SELECT '{p}'::text AS projector, topic, partition,
                            o.next_offset, o.updated_at AS committed_at,
                            e.end_offset, e.observed_at
                       FROM {p}.projector_offsets o
                       FULL JOIN {p}.projector_log_ends e USING (topic, partition)"
                )
            } else {
                format!(
                    "SELECT '{p}'::text AS projector, topic, partition,
                            next_offset, updated_at AS committed_at,
                            NULL::bigint AS end_offset, NULL::timestamptz AS observed_at
                       FROM {p}.projector_offsets"
                )
            }
        })
        .collect();
    if selects.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "{} ORDER BY projector, topic, partition",
        selects.join(" UNION ALL ")
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
}

async fn read_dead_letters(
    pool: &PgPool,
    tables: &[Tables],
) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
    let selects: Vec<String> = tables
        .iter()
        .filter(|t| known(&t.projector) && t.dead_letters)
        .map(|t| {
            let p = &t.projector;
            format!(
                "SELECT '{p}'::text AS projector, count(*)::bigint AS total,
                        count(*) FILTER (WHERE redriven_at IS NULL)::bigint AS pending,
                        max(recorded_at) AS last_recorded_at
                   FROM {p}.dead_letters"
            )
        })
        .collect();
    if selects.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(sqlx::AssertSqlSafe(selects.join(" UNION ALL ")))
        .fetch_all(pool)
        .await
}

/// Only the constant names reach SQL, whatever the catalog query returned.
fn known(projector: &str) -> bool {
    PROJECTORS.contains(&projector)
}

fn assemble(partitions: Vec<PartitionRow>, dead_letters: Vec<DeadLetterRow>) -> ProjectorsStatus {
    let mut by_projector: BTreeMap<&str, Vec<PartitionRow>> =
        PROJECTORS.iter().map(|p| (*p, Vec::new())).collect();
    for row in partitions {
        if let Some(rows) = by_projector.get_mut(row.projector.as_str()) {
            rows.push(row);
        }
    }
    let mut dead: BTreeMap<String, DeadLetterCounts> = dead_letters
        .into_iter()
        .map(|row| {
            let counts = DeadLetterCounts {
                total: row.total,
                pending: row.pending,
                last_recorded_at: row.last_recorded_at,
            };
            (row.projector, counts)
        })
        .collect();
    let projectors = by_projector
        .into_iter()
        .map(|(projector, rows)| {
            let dead_letters = dead.remove(projector).unwrap_or_default();
            status(projector, rows, dead_letters)
        })
        .collect();
    ProjectorsStatus { projectors }
}

fn status(
    projector: &str,
    rows: Vec<PartitionRow>,
    dead_letters: DeadLetterCounts,
) -> ProjectorStatus {
    // The headers' own arithmetic, so this answer and theirs never disagree.
    let snapshot = Snapshot::from_rows(
        rows.iter()
            .filter_map(|r| Some((r.topic.clone(), r.partition, r.next_offset?))),
        rows.iter()
            .filter_map(|r| Some((r.topic.clone(), r.partition, r.end_offset?))),
    );
    let last_committed_at = rows.iter().filter_map(|r| r.committed_at).max();
    let log_ends_observed_at = rows.iter().filter_map(|r| r.observed_at).min();
    let partitions = rows
        .into_iter()
        .map(|r| PartitionStatus {
            lag_records: r
                .end_offset
                .map(|end| (end - r.next_offset.unwrap_or(0)).max(0)),
            topic: r.topic,
            partition: r.partition,
            next_offset: r.next_offset,
            log_end: r.end_offset,
            committed_at: r.committed_at,
            log_end_observed_at: r.observed_at,
        })
        .collect();
    ProjectorStatus {
        projector: projector.to_owned(),
        position: snapshot.position(),
        lag_records: snapshot.lag_records(),
        last_committed_at,
        log_ends_observed_at,
        partitions,
        dead_letters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(topic: &str, partition: i32, next: Option<i64>, end: Option<i64>) -> PartitionRow {
        PartitionRow {
            projector: "clock".to_owned(),
            topic: topic.to_owned(),
            partition,
            next_offset: next,
            committed_at: next.map(|_| DateTime::<Utc>::UNIX_EPOCH),
            end_offset: end,
            observed_at: end.map(|_| DateTime::<Utc>::UNIX_EPOCH),
        }
    }

    #[test]
    fn given_partitions_then_totals_match_the_headers_and_each_partition_has_its_lag() {
        let status = status(
            "clock",
            vec![
                row("t", 0, Some(10), Some(15)),
                // Seen by an instance, nothing applied yet: behind by its whole log.
                row("t", 1, None, Some(4)),
                // Applied, no log end observed: no lag figure.
                row("t", 2, Some(3), None),
                // A stale log end behind the stored offset is no negative lag.
                row("t", 3, Some(9), Some(8)),
            ],
            DeadLetterCounts::default(),
        );
        assert_eq!(status.position, 10 + 3 + 9);
        assert_eq!(status.lag_records, 5 + 4);
        let lags: Vec<Option<i64>> = status.partitions.iter().map(|p| p.lag_records).collect();
        assert_eq!(lags, [Some(5), Some(4), None, Some(0)]);
    }

    #[test]
    fn given_no_rows_then_every_projector_is_listed_empty_in_name_order() {
        let status = assemble(Vec::new(), Vec::new());
        let names: Vec<&str> = status
            .projectors
            .iter()
            .map(|p| p.projector.as_str())
            .collect();
        let mut sorted = PROJECTORS.to_vec();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert!(
            status.projectors.iter().all(|p| p.partitions.is_empty()
                && p.position == 0
                && p.last_committed_at.is_none())
        );
    }

    #[test]
    fn given_projector_names_then_each_is_a_plain_identifier() {
        // They are spliced into SQL unquoted.
        for name in PROJECTORS {
            assert!(
                name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
    }
}
