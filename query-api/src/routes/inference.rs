//! Inference: the log of model inferences and per-model statistics.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::QueryBuilder;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{self, Page};
use crate::params;
use crate::routes::{PageQuery, WorldPath, listed};

/// The projector behind these routes.
pub const PROJECTOR: &str = "inference";

const LOG: &str = "inferences";
const STATS: &str = "inference-stats";

/// Upper bounds (ms) of the latency histogram buckets; the last bucket is open.
pub const LATENCY_BOUNDS_MS: [i32; 19] = [
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000,
    20000,
];

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(inferences))
        .routes(routes!(stats))
}

/// One recorded model inference.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Inference {
    /// The `InferenceRecorded` event.
    pub event_id: Uuid,
    /// World tick.
    pub tick: i64,
    /// When the inference happened.
    pub occurred_at: DateTime<Utc>,
    /// The model.
    pub model_id: String,
    /// The model's version.
    pub model_version: String,
    /// `npc_dialogue`, `narration`, `quest_generation` or `moderation`.
    pub purpose: String,
    /// Prompt tokens.
    pub prompt_tokens: i32,
    /// Completion tokens.
    pub completion_tokens: i32,
    /// Latency in milliseconds.
    pub latency_ms: i32,
    /// Cost in millionths of a US dollar.
    pub cost_micro_usd: i64,
    /// `ok`, `error`, `timeout` or `filtered`.
    pub outcome: String,
    /// The NPC it was for (empty when none).
    pub npc_id: String,
    /// Hash of the model input.
    pub input_hash: String,
}

/// Latency over a window, from the summed one-minute histograms.
#[derive(Debug, Serialize, ToSchema)]
pub struct Latency {
    /// Mean latency in ms; `null` without inferences.
    pub mean_ms: Option<f64>,
    /// Slowest inference in ms.
    pub max_ms: i32,
    /// Median: upper bound of the histogram bucket holding it.
    pub p50_ms: i32,
    /// 95th percentile, bucket upper bound.
    pub p95_ms: i32,
    /// 99th percentile, bucket upper bound.
    pub p99_ms: i32,
    /// Counts per bucket; bucket i holds latencies up to `LATENCY_BOUNDS_MS[i]`
    /// (10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000,
    /// 3000, 5000, 7500, 10000, 20000 ms), the last one everything slower.
    pub histogram: Vec<i64>,
}

/// One model and purpose over the window.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "model_id": "npc-chat", "purpose": "npc_dialogue", "inferences": 3, "failures": 1,
    "prompt_tokens": 900, "completion_tokens": 240, "cost_micro_usd": 2850,
    "latency": {"mean_ms": 373.3, "max_ms": 900, "p50_ms": 200, "p95_ms": 1000, "p99_ms": 1000,
                "histogram": [0,0,1,0,0,0,1,0,0,0,0,1,0,0,0,0,0,0,0,0]}
}))]
pub struct ModelStats {
    /// The model.
    pub model_id: String,
    /// The purpose.
    pub purpose: String,
    /// Inferences in the window.
    pub inferences: i64,
    /// Inferences whose outcome was not `ok`.
    pub failures: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Cost in millionths of a US dollar.
    pub cost_micro_usd: i64,
    /// Latency.
    pub latency: Latency,
}

#[derive(sqlx::FromRow)]
struct StatsRow {
    model_id: String,
    purpose: String,
    inferences: i64,
    failures: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_micro_usd: i64,
    latency_sum_ms: i64,
    latency_max_ms: i32,
    latency_histogram: Vec<i64>,
    p50_ms: i32,
    p95_ms: i32,
    p99_ms: i32,
}

impl From<StatsRow> for ModelStats {
    fn from(row: StatsRow) -> Self {
        ModelStats {
            latency: Latency {
                mean_ms: mean(row.latency_sum_ms, row.inferences),
                max_ms: row.latency_max_ms,
                p50_ms: row.p50_ms,
                p95_ms: row.p95_ms,
                p99_ms: row.p99_ms,
                histogram: row.latency_histogram,
            },
            model_id: row.model_id,
            purpose: row.purpose,
            inferences: row.inferences,
            failures: row.failures,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            cost_micro_usd: row.cost_micro_usd,
        }
    }
}

#[allow(clippy::cast_precision_loss)] // a mean for display; sums stay exact in SQL
fn mean(sum: i64, count: i64) -> Option<f64> {
    (count > 0).then(|| sum as f64 / count as f64)
}

/// Model and purpose filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ModelFilters {
    /// Only this model.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub model: Option<String>,
    /// Only this purpose.
    #[param(inline, value_type = Option<Purpose>)]
    pub purpose: Option<String>,
}

/// An inference purpose.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // exists for its schema: the handlers match the names in `params::PURPOSES`
pub enum Purpose {
    /// Dialogue of a non-player character.
    NpcDialogue,
    /// Narration.
    Narration,
    /// Generated quests.
    QuestGeneration,
    /// Moderation.
    Moderation,
    /// Recorded without a purpose.
    Unspecified,
}

/// The NPC filter of the log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NpcFilter {
    /// Only inferences for this NPC.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub npc: Option<String>,
}

/// A time window, `[from, to)`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimeWindow {
    /// Start (inclusive), RFC 3339, e.g. `2026-11-02T10:00:00Z`. Default: no bound.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub from: Option<String>,
    /// End (exclusive), RFC 3339. Default: no bound. A window ending before it
    /// starts is empty.
    #[param(value_type = Option<DateTime<Utc>>)]
    pub to: Option<String>,
}

struct Window {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl TimeWindow {
    fn parse(&self) -> Result<Window, ApiError> {
        Ok(Window {
            from: params::time("from", self.from.as_deref())?,
            to: params::time("to", self.to.as_deref())?,
        })
    }
}

/// The inference log.
///
/// Ordered by time, then event id. Filters combine.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/inferences",
    tag = "inference",
    operation_id = "list_inferences",
    params(WorldPath, ModelFilters, NpcFilter, TimeWindow, PageQuery),
    responses((status = 200, description = "A page of inferences", body = Page<Inference>))
)]
async fn inferences(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
    ApiQuery(filters): ApiQuery<ModelFilters>,
    ApiQuery(npc): ApiQuery<NpcFilter>,
    ApiQuery(window): ApiQuery<TimeWindow>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Inference>>, ApiError> {
    let world = path.world()?;
    let model = params::optional_id("model", filters.model.as_deref())?;
    let purpose = params::purpose(filters.purpose.as_deref())?;
    let npc = params::optional_id("npc", npc.npc.as_deref())?;
    let window = window.parse()?;
    let request = pagination::request::<(DateTime<Utc>, Uuid)>(
        LOG,
        page.limit.as_deref(),
        page.cursor.as_deref(),
    )?;
    // Only the filters the request sets: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT event_id, tick, occurred_at, model_id, model_version, purpose, prompt_tokens,
                completion_tokens, latency_ms, cost_micro_usd, outcome, npc_id, input_hash
           FROM inference.inferences
          WHERE world_id = ",
    );
    sql.push_bind(world.as_str());
    if let Some(model) = model {
        sql.push(" AND model_id = ").push_bind(model);
    }
    if let Some(purpose) = purpose {
        sql.push(" AND purpose = ").push_bind(purpose);
    }
    if let Some(npc) = npc {
        sql.push(" AND npc_id = ").push_bind(npc);
    }
    if let Some(from) = window.from {
        sql.push(" AND occurred_at >= ").push_bind(from);
    }
    if let Some(to) = window.to {
        sql.push(" AND occurred_at < ").push_bind(to);
    }
    if let Some((after_time, after_id)) = request.after {
        sql.push(" AND (occurred_at, event_id) > (")
            .push_bind(after_time)
            .push(", ")
            .push_bind(after_id)
            .push(")");
    }
    sql.push(" ORDER BY occurred_at, event_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<Inference> = state.readers.fetch_all(sql.build_query_as()).await?;
    let page = pagination::page(LOG, rows, request.limit, |i| (i.occurred_at, i.event_id));
    Ok(Json(listed(&state.readers, &world, page).await?))
}

/// Statistics per model and purpose over a window.
///
/// Sums the one-minute buckets whose start lies in `[from, to)` (so the window
/// is effectively rounded to whole minutes), and reads p50/p95/p99 from the
/// element-wise sum of their latency histograms. Ordered by model, then purpose.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/inference/stats",
    tag = "inference",
    operation_id = "list_inference_stats",
    params(WorldPath, ModelFilters, TimeWindow, PageQuery),
    responses((status = 200, description = "A page of per-model statistics", body = Page<ModelStats>))
)]
async fn stats(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
    ApiQuery(filters): ApiQuery<ModelFilters>,
    ApiQuery(window): ApiQuery<TimeWindow>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<ModelStats>>, ApiError> {
    let world = path.world()?;
    let model = params::optional_id("model", filters.model.as_deref())?;
    let purpose = params::purpose(filters.purpose.as_deref())?;
    let window = window.parse()?;
    let request = pagination::request::<(String, String)>(
        STATS,
        page.limit.as_deref(),
        page.cursor.as_deref(),
    )?;
    // Only the filters the request sets: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "WITH buckets AS (
             SELECT model_id, purpose, inferences, failures, prompt_tokens, completion_tokens,
                    cost_micro_usd, latency_sum_ms, latency_max_ms, latency_histogram
               FROM inference.model_stats
              WHERE world_id = ",
    );
    sql.push_bind(world.as_str());
    if let Some(from) = window.from {
        sql.push(" AND bucket_start >= ").push_bind(from);
    }
    if let Some(to) = window.to {
        sql.push(" AND bucket_start < ").push_bind(to);
    }
    if let Some(model) = model {
        sql.push(" AND model_id = ").push_bind(model);
    }
    if let Some(purpose) = purpose {
        sql.push(" AND purpose = ").push_bind(purpose);
    }
    if let Some((after_model, after_purpose)) = request.after.clone() {
        sql.push(" AND (model_id, purpose) > (")
            .push_bind(after_model)
            .push(", ")
            .push_bind(after_purpose)
            .push(")");
    }
    sql.push(
        "
         ), page AS (
             SELECT model_id, purpose,
                    sum(inferences)::bigint AS inferences,
                    sum(failures)::bigint AS failures,
                    sum(prompt_tokens)::bigint AS prompt_tokens,
                    sum(completion_tokens)::bigint AS completion_tokens,
                    sum(cost_micro_usd)::bigint AS cost_micro_usd,
                    sum(latency_sum_ms)::bigint AS latency_sum_ms,
                    max(latency_max_ms) AS latency_max_ms
               FROM buckets
              GROUP BY model_id, purpose
              ORDER BY model_id, purpose
              LIMIT ",
    )
    .push_bind(request.fetch())
    .push(
        "
         ), histograms AS (
             SELECT model_id, purpose, array_agg(total ORDER BY i) AS histogram
               FROM (SELECT b.model_id, b.purpose, h.i, sum(h.n)::bigint AS total
                       FROM buckets b
                       JOIN page p USING (model_id, purpose)
                      CROSS JOIN LATERAL unnest(b.latency_histogram) WITH ORDINALITY AS h(n, i)
                      GROUP BY b.model_id, b.purpose, h.i) per_bucket
              GROUP BY model_id, purpose
         )
         SELECT p.*, COALESCE(h.histogram, '{}') AS latency_histogram,
                inference.histogram_quantile(COALESCE(h.histogram, '{}'), 0.50) AS p50_ms,
                inference.histogram_quantile(COALESCE(h.histogram, '{}'), 0.95) AS p95_ms,
                inference.histogram_quantile(COALESCE(h.histogram, '{}'), 0.99) AS p99_ms
           FROM page p
           LEFT JOIN histograms h USING (model_id, purpose)
          ORDER BY p.model_id, p.purpose",
    );
    let rows: Vec<StatsRow> = state.readers.fetch_all(sql.build_query_as()).await?;
    let items: Vec<ModelStats> = rows.into_iter().map(ModelStats::from).collect();
    let page = pagination::page(STATS, items, request.limit, |s| {
        (s.model_id.clone(), s.purpose.clone())
    });
    Ok(Json(listed(&state.readers, &world, page).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_inferences_then_no_mean() {
        assert_eq!(mean(0, 0), None);
        assert_eq!(mean(300, 3), Some(100.0));
    }

    #[test]
    fn given_the_bounds_then_they_match_the_read_models_histogram_width() {
        // 19 bounds + the open bucket = the 20 counters the projector stores.
        assert_eq!(LATENCY_BOUNDS_MS.len() + 1, 20);
    }
}
