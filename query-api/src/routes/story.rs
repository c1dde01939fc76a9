//! Story: a player's progress, the choices log, node tallies.

use std::collections::BTreeMap;

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
use crate::routes::{PageQuery, TickRangeQuery, WorldPath, listed};

/// The projector behind these routes.
pub const PROJECTOR: &str = "story";

const PROGRESS: &str = "stories";
const CHOICES: &str = "choices";
const TALLIES: &str = "tallies";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(player_stories))
        .routes(routes!(choices))
        .routes(routes!(tallies))
}

/// Where a player stands in one story.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(example = json!({
    "story_id": "lost-caravan", "current_node_id": "ambush", "last_choice_id": "rest",
    "choices_made": 2, "tick": 6, "updated_at": "2026-11-02T10:00:06Z"
}))]
pub struct StoryProgress {
    /// The story.
    pub story_id: String,
    /// The node the player's latest choice led to.
    pub current_node_id: String,
    /// The player's latest choice.
    pub last_choice_id: String,
    /// Distinct choices the player made in this story.
    pub choices_made: i64,
    /// Tick of the latest choice.
    pub tick: i64,
    /// When the latest choice was made.
    pub updated_at: DateTime<Utc>,
}

/// One story choice from the log.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Choice {
    /// The `StoryChoiceMade` event.
    pub event_id: Uuid,
    /// World tick of the choice.
    pub tick: i64,
    /// When it was made.
    pub occurred_at: DateTime<Utc>,
    /// Who made it.
    pub player_id: String,
    /// In which story.
    pub story_id: String,
    /// At which node.
    pub node_id: String,
    /// The option taken.
    pub choice_id: String,
    /// Where it led (empty when the story ended).
    pub next_node_id: String,
    /// Free-form context sent with the choice.
    #[sqlx(json)]
    pub context: BTreeMap<String, String>,
}

/// How often one choice was taken at one node.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct Tally {
    /// The node.
    pub node_id: String,
    /// The option.
    pub choice_id: String,
    /// Distinct choices of this option at this node.
    pub times: i64,
}

/// `{world}` and `{player}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PlayerPath {
    /// World id: 1–128 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub world: String,
    /// Player id: 1–128 characters of `[A-Za-z0-9._:-]`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub player: String,
}

/// `{world}` and `{story}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StoryPath {
    /// World id: 1–128 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub world: String,
    /// Story id: 1–128 characters of `[A-Za-z0-9._:-]`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub story: String,
}

/// Filters of the choices log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChoiceFilters {
    /// Only this player's choices.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub player: Option<String>,
    /// Only choices in this story.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub story: Option<String>,
}

/// A player's progress in every story they played.
///
/// Ordered by story id; empty for a player who made no choice.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/players/{player}/stories",
    tag = "story",
    operation_id = "list_player_stories",
    params(PlayerPath, PageQuery),
    responses((status = 200, description = "A page of the player's stories", body = Page<StoryProgress>))
)]
async fn player_stories(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<PlayerPath>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<StoryProgress>>, ApiError> {
    let world = params::world(&path.world)?;
    let player = params::id("player", &path.player)?;
    let request =
        pagination::request::<String>(PROGRESS, page.limit.as_deref(), page.cursor.as_deref())?;
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT story_id, current_node_id, last_choice_id, choices_made, tick, updated_at
           FROM story.player_progress
          WHERE world_id = ",
    );
    sql.push_bind(world.as_str())
        .push(" AND player_id = ")
        .push_bind(&player);
    if let Some(after) = request.after.as_deref() {
        sql.push(" AND story_id > ").push_bind(after);
    }
    sql.push(" ORDER BY story_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<StoryProgress> = state.readers.fetch_all(sql.build_query_as()).await?;
    let page = pagination::page(PROGRESS, rows, request.limit, |p| p.story_id.clone());
    Ok(Json(listed(&state.readers, &world, page).await?))
}

/// The choices log.
///
/// Ordered by tick, then event id. Filters combine; the tick range is inclusive
/// at both ends.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/story/choices",
    tag = "story",
    operation_id = "list_story_choices",
    params(WorldPath, ChoiceFilters, TickRangeQuery, PageQuery),
    responses((status = 200, description = "A page of choices", body = Page<Choice>))
)]
async fn choices(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
    ApiQuery(filters): ApiQuery<ChoiceFilters>,
    ApiQuery(range): ApiQuery<TickRangeQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Choice>>, ApiError> {
    let world = path.world()?;
    let player = params::optional_id("player", filters.player.as_deref())?;
    let story = params::optional_id("story", filters.story.as_deref())?;
    let from_tick = params::tick_or("from_tick", range.from_tick.as_deref(), 0)?;
    let to_tick = params::tick_or("to_tick", range.to_tick.as_deref(), i64::MAX)?;
    let request =
        pagination::request::<(i64, Uuid)>(CHOICES, page.limit.as_deref(), page.cursor.as_deref())?;
    // Only the filters the request sets: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT event_id, tick, occurred_at, player_id, story_id, node_id, choice_id,
                next_node_id, context
           FROM story.choices
          WHERE world_id = ",
    );
    sql.push_bind(world.as_str());
    if let Some(player) = player {
        sql.push(" AND player_id = ").push_bind(player);
    }
    if let Some(story) = story {
        sql.push(" AND story_id = ").push_bind(story);
    }
    sql.push(" AND tick >= ")
        .push_bind(from_tick)
        .push(" AND tick <= ")
        .push_bind(to_tick);
    if let Some((after_tick, after_id)) = request.after {
        sql.push(" AND (tick, event_id) > (")
            .push_bind(after_tick)
            .push(", ")
            .push_bind(after_id)
            .push(")");
    }
    sql.push(" ORDER BY tick, event_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<Choice> = state.readers.fetch_all(sql.build_query_as()).await?;
    let page = pagination::page(CHOICES, rows, request.limit, |c| (c.tick, c.event_id));
    Ok(Json(listed(&state.readers, &world, page).await?))
}

/// How often each choice was taken at each node of a story.
///
/// Ordered by node, then choice; empty for a story nobody played.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/story/{story}/tallies",
    tag = "story",
    operation_id = "list_story_tallies",
    params(StoryPath, PageQuery),
    responses((status = 200, description = "A page of tallies", body = Page<Tally>))
)]
async fn tallies(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<StoryPath>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Tally>>, ApiError> {
    let world = params::world(&path.world)?;
    let story = params::id("story", &path.story)?;
    let request = pagination::request::<(String, String)>(
        TALLIES,
        page.limit.as_deref(),
        page.cursor.as_deref(),
    )?;
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT node_id, choice_id, times
           FROM story.node_tallies
          WHERE world_id = ",
    );
    sql.push_bind(world.as_str())
        .push(" AND story_id = ")
        .push_bind(&story);
    if let Some((after_node, after_choice)) = request.after.clone() {
        sql.push(" AND (node_id, choice_id) > (")
            .push_bind(after_node)
            .push(", ")
            .push_bind(after_choice)
            .push(")");
    }
    sql.push(" ORDER BY node_id, choice_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<Tally> = state.readers.fetch_all(sql.build_query_as()).await?;
    let page = pagination::page(TALLIES, rows, request.limit, |t| {
        (t.node_id.clone(), t.choice_id.clone())
    });
    Ok(Json(listed(&state.readers, &world, page).await?))
}
