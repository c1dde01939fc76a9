//! `/v1/worlds` and `/v1/worlds/{world}`: the worlds read model.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::QueryBuilder;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use worldline_ops::auth::Principal;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{self, Page};
use crate::routes::{PageQuery, WorldPath, found};

/// The projector behind these routes.
pub const PROJECTOR: &str = "worlds";

const LIST: &str = "worlds";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_worlds))
        .routes(routes!(world_summary))
}

/// Distinct events applied per family.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventCounts {
    /// World lifecycle events (created, paused, resumed).
    pub world: i64,
    /// Clock ticks.
    pub clock: i64,
    /// Weather changes.
    pub weather: i64,
    /// Story choices.
    pub story: i64,
    /// Model inferences.
    pub inference: i64,
}

/// A world as the worlds read model has it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "world_id": "emberfall", "display_name": "Emberfall", "seed": 42,
    "regions": ["north", "coast"], "status": "running",
    "created_at": "2026-11-02T10:00:00Z", "latest_tick": 30,
    "events": {"world": 1, "clock": 30, "weather": 4, "story": 3, "inference": 3},
    "last_event_at": "2026-11-02T10:00:30Z"
}))]
pub struct WorldSummary {
    /// The world id.
    pub world_id: String,
    /// Name given at creation; `null` until the world's `WorldCreated` is seen.
    pub display_name: Option<String>,
    /// The world's seed; `null` until created.
    pub seed: Option<u64>,
    /// Regions declared at creation.
    pub regions: Vec<String>,
    /// `running`, `paused`, or `unknown` (events seen before its creation).
    pub status: String,
    /// When the world was created.
    pub created_at: Option<DateTime<Utc>>,
    /// Highest tick of any event of the world.
    pub latest_tick: i64,
    /// Distinct events applied, per family.
    pub events: EventCounts,
    /// Time of the world's latest event.
    pub last_event_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct WorldRow {
    world_id: String,
    display_name: Option<String>,
    seed: Option<i64>,
    #[sqlx(json)]
    regions: Vec<String>,
    status: String,
    created_at: Option<DateTime<Utc>>,
    latest_tick: i64,
    world_events: i64,
    clock_events: i64,
    weather_events: i64,
    story_events: i64,
    inference_events: i64,
    last_event_at: Option<DateTime<Utc>>,
}

impl From<WorldRow> for WorldSummary {
    fn from(row: WorldRow) -> Self {
        WorldSummary {
            world_id: row.world_id,
            display_name: row.display_name,
            // The projector stores the u64 seed's bits in a bigint.
            seed: row.seed.map(|s| u64::from_ne_bytes(s.to_ne_bytes())),
            regions: row.regions,
            status: row.status,
            created_at: row.created_at,
            latest_tick: row.latest_tick,
            events: EventCounts {
                world: row.world_events,
                clock: row.clock_events,
                weather: row.weather_events,
                story: row.story_events,
                inference: row.inference_events,
            },
            last_event_at: row.last_event_at,
        }
    }
}

/// List worlds.
///
/// Every world the read models have seen an event of, ordered by world id. A
/// token limited to some worlds lists only those.
#[utoipa::path(
    get,
    path = "/v1/worlds",
    tag = "worlds",
    operation_id = "list_worlds",
    params(PageQuery),
    responses((status = 200, description = "A page of worlds", body = Page<WorldSummary>))
)]
async fn list_worlds(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Page<WorldSummary>>, ApiError> {
    let request =
        pagination::request::<String>(LIST, query.limit.as_deref(), query.cursor.as_deref())?;
    // Without the auth guard in front (the bare `app()`) there is no principal:
    // every world.
    let visible: Option<Vec<&str>> = principal
        .as_ref()
        .and_then(|Extension(principal)| principal.worlds.as_ref())
        .map(|worlds| worlds.iter().map(|w| w.as_str()).collect());
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT world_id, display_name, seed, regions, status, created_at, latest_tick,
                world_events, clock_events, weather_events, story_events, inference_events,
                last_event_at
           FROM worlds.worlds
          WHERE TRUE",
    );
    if let Some(after) = request.after.as_deref() {
        sql.push(" AND world_id > ").push_bind(after);
    }
    if let Some(visible) = visible {
        sql.push(" AND world_id = ANY(")
            .push_bind(visible)
            .push(")");
    }
    sql.push(" ORDER BY world_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<WorldRow> = state.readers.fetch_all(sql.build_query_as()).await?;
    let items = rows.into_iter().map(WorldSummary::from).collect();
    Ok(Json(pagination::page(LIST, items, request.limit, |w| {
        w.world_id.clone()
    })))
}

/// A world's summary.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}",
    tag = "worlds",
    operation_id = "get_world",
    params(WorldPath),
    responses((status = 200, description = "The world", body = WorldSummary))
)]
async fn world_summary(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
) -> Result<Json<WorldSummary>, ApiError> {
    let world = path.world()?;
    let row: Option<WorldRow> = state
        .readers
        .fetch_optional(
            sqlx::query_as(
                "SELECT world_id, display_name, seed, regions, status, created_at, latest_tick,
                        world_events, clock_events, weather_events, story_events,
                        inference_events, last_event_at
                   FROM worlds.worlds WHERE world_id = $1",
            )
            .bind(world.as_str()),
        )
        .await?;
    let row = found(&state.readers, &world, row, String::new).await?;
    Ok(Json(row.into()))
}
