//! `/v1/worlds/{world}/clock`: the clock read model.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::routes::{WorldPath, found};

/// The projector behind these routes.
pub const PROJECTOR: &str = "clock";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(clock))
}

/// A world's clock as the clock read model has it.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(example = json!({
    "world_id": "emberfall", "tick": 30, "game_time_s": 1800, "day": 0,
    "season": "spring", "time_scale": 60, "occurred_at": "2026-11-02T10:00:30Z"
}))]
pub struct ClockView {
    /// The world id.
    pub world_id: String,
    /// The latest tick.
    pub tick: i64,
    /// Game seconds since the world began.
    pub game_time_s: i64,
    /// Game day.
    pub day: i32,
    /// `spring`, `summer`, `autumn` or `winter`.
    pub season: String,
    /// Game seconds per real second.
    pub time_scale: i32,
    /// When the tick happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
}

/// A world's clock.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/clock",
    tag = "clock",
    operation_id = "get_clock",
    params(WorldPath),
    responses((status = 200, description = "The world's clock", body = ClockView))
)]
async fn clock(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
) -> Result<Json<ClockView>, ApiError> {
    let world = path.world()?;
    let row: Option<ClockView> = state
        .readers
        .fetch_optional(
            sqlx::query_as(
                "SELECT world_id, tick, game_time_s, day, season, time_scale, occurred_at
                   FROM clock.world_clock WHERE world_id = $1",
            )
            .bind(world.as_str()),
        )
        .await?;
    let clock = found(&state.readers, &world, row, || {
        format!("world {world} has no clock yet")
    })
    .await?;
    Ok(Json(clock))
}
