//! `GET /v1/worlds/{world}/state?at_tick=N`: a world's full state as of a tick,
//! answered from the read models' history.
//!
//! The shape and the values are those of `worldline world <world> --at-tick N`,
//! which folds the Kafka log (`worldline_projectors::world_state`); this route
//! reads PostgreSQL only. Each part follows the fold's rule:
//!
//! - weather: per region, the change with the highest `(tick, log_offset)` at or
//!   before N. The fold keeps a change unless an earlier-folded one has a higher
//!   tick, which picks exactly that change.
//! - story: per player and story, the next node of the last choice in log order
//!   among those at or before N. Log order, not tick order, because the fold
//!   applies choices as the log delivers them (as `story.player_progress` does).
//! - inference: totals over the inference log's rows at or before N.
//! - clock: the clock read model keeps only the latest tick, so it answers only
//!   when N is at or after that tick (then it is exact: no later tick exists).
//! - events: the worlds read model keeps only running counts, so it answers only
//!   when N is at or after the world's latest tick.
//!
//! Whatever cannot be answered is `null` and named in `unavailable`, so a client
//! never mistakes "not kept" for "not happened".
//!
//! A tick beyond the world's latest is answered, not refused: no event of the
//! world is past its latest tick, so the state as of any later tick is the
//! current one, exactly as the fold would give it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, Problem};
use crate::extract::{ApiPath, ApiQuery};
use crate::params;
use crate::routes::WorldPath;

/// The projectors whose read models this route reads. A read-your-writes wait
/// waits for each of them: the worlds projector passing a story write says
/// nothing about whether the story read model has it yet.
pub const PROJECTORS: &[&str] = &[
    super::worlds::PROJECTOR,
    super::clock::PROJECTOR,
    super::weather::PROJECTOR,
    super::story::PROJECTOR,
    super::inference::PROJECTOR,
];

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(world_state))
}

/// The clock as of the tick.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct ClockState {
    /// The tick of the clock's latest `ClockTicked` at or before `at_tick`.
    pub tick: i64,
    /// Game seconds since the world began.
    pub game_time_s: i64,
    /// Game day.
    pub day: i32,
    /// `spring`, `summer`, `autumn` or `winter`.
    pub season: String,
}

/// One region's weather as of the tick.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct RegionWeatherState {
    /// `clear`, `cloudy`, `fog`, `rain`, `storm` or `snow`.
    pub condition: String,
    /// Temperature in tenths of a degree Celsius.
    pub temperature_dc: i32,
    /// Wind in tenths of a metre per second.
    pub wind_dmps: i32,
    /// Precipitation in tenths of a millimetre per hour.
    pub precipitation_dmmph: i32,
    /// Tick of the change that brought this weather.
    pub since_tick: i64,
}

/// Inference totals as of the tick.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct InferenceTotals {
    /// Inferences recorded at or before the tick.
    pub inferences: i64,
    /// Those whose outcome is not `ok` (`error`, `timeout`, `filtered`).
    pub failures: i64,
    /// Prompt tokens of those inferences.
    pub prompt_tokens: i64,
    /// Completion tokens of those inferences.
    pub completion_tokens: i64,
    /// Their cost in millionths of a US dollar.
    pub cost_micro_usd: i64,
}

/// A world's full state as of a tick.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "world_id": "emberfall", "at_tick": 12, "latest_tick": 30, "display_name": "Emberfall",
    "clock": null,
    "weather": {"north": {"condition": "snow", "temperature_dc": 110, "wind_dmps": 40,
                          "precipitation_dmmph": 0, "since_tick": 10}},
    "story_progress": {"ayla": {"lost-caravan": "road", "smugglers": "vault"}},
    "story_choices_made": {"ayla": {"lost-caravan": 3, "smugglers": 2}},
    "inference": {"inferences": 10, "failures": 3, "prompt_tokens": 3000,
                  "completion_tokens": 800, "cost_micro_usd": 9500},
    "events": null,
    "unavailable": ["clock", "events"]
}))]
pub struct WorldState {
    /// The world id.
    pub world_id: String,
    /// The tick the state is answered as of.
    pub at_tick: i64,
    /// The world's latest tick in the read models. An `at_tick` at or beyond it
    /// answers the current state.
    pub latest_tick: i64,
    /// Name given at the world's creation; `null` until its `WorldCreated` is seen.
    /// The worlds read model keeps no creation tick, so a world created after
    /// `at_tick` still shows its name.
    pub display_name: Option<String>,
    /// The clock as of `at_tick`: its latest tick at or before it. `null` when
    /// the world has no clock yet, or when `at_tick` is before the clock's
    /// current tick (then `unavailable` names `clock`).
    pub clock: Option<ClockState>,
    /// Each region's weather in force at `at_tick`, by region; regions without
    /// weather by then are left out.
    pub weather: BTreeMap<String, RegionWeatherState>,
    /// Each player's current node per story (`""` once a story has ended), by
    /// player, then story.
    pub story_progress: BTreeMap<String, BTreeMap<String, String>>,
    /// Distinct choices each player made per story up to `at_tick`, keyed like
    /// `story_progress`.
    pub story_choices_made: BTreeMap<String, BTreeMap<String, i64>>,
    /// Inference totals up to `at_tick`.
    pub inference: InferenceTotals,
    /// Distinct events of the world up to `at_tick`. Only answered when
    /// `at_tick` is the world's latest tick (or later); otherwise `null`, and
    /// `unavailable` names `events`.
    pub events: Option<i64>,
    /// Fields that are `null` because the read models keep no history of them
    /// at `at_tick` (`clock`, `events`); empty when every field is answered.
    pub unavailable: Vec<String>,
}

/// The tick to answer as of.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StateQuery {
    /// Answer as of this tick: every event whose world tick is at most this.
    /// A tick beyond the world's latest answers the current state.
    #[param(value_type = i64, required = true, minimum = 0, maximum = 9223372036854775807i64)]
    pub at_tick: Option<String>,
}

#[derive(sqlx::FromRow)]
struct WorldRow {
    display_name: Option<String>,
    latest_tick: i64,
    events: i64,
}

/// A world's full state as of a tick.
///
/// The same shape and values as the state `worldline world <world> --at-tick N`
/// folds from the log, answered from the read models' history:
/// weather from `weather.weather_changes` (per region, the change with the
/// highest tick, then log position, at or before `at_tick`); story progress
/// from `story.choices` (per player and story, the next node of the last choice
/// in log order at or before `at_tick`, and the number of choices); inference
/// totals from the `inference.inferences` log (rows with tick at or before
/// `at_tick`). The clock and the event count have no history in the read
/// models: the clock is answered when `at_tick` is at or after the clock's
/// current tick, the event count when `at_tick` is at or after the world's
/// latest tick; otherwise they are `null` and named in `unavailable`.
///
/// `at_tick` is required. A tick beyond the world's latest tick answers the
/// current state (no event lies past the latest tick, so that is the state as
/// of any later tick). All parts are read in one snapshot. A read-your-writes
/// token waits until every read model read here (worlds, clock, weather, story,
/// inference) has applied the writes it names.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/state",
    tag = "worlds",
    operation_id = "get_world_state",
    params(WorldPath, StateQuery),
    responses(
        (status = 200, description = "The world's state as of `at_tick`", body = WorldState),
        (status = 400, description = "`at_tick` is missing or not an integer from 0 to \
            2^63-1, or `world` is not a valid id; `parameter` names it",
            body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The world does not exist",
            body = Problem, content_type = "application/problem+json")
    )
)]
async fn world_state(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<WorldPath>,
    ApiQuery(query): ApiQuery<StateQuery>,
) -> Result<Json<WorldState>, ApiError> {
    let world = path.world()?;
    let Some(raw) = query.at_tick.as_deref() else {
        return Err(ApiError::bad(
            "at_tick",
            "at_tick is required: the tick to answer the state as of",
        ));
    };
    let at_tick = params::tick("at_tick", raw)?;

    // One snapshot for every part, so a projector committing in between cannot
    // make the parts disagree.
    let mut tx = state.pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let row: Option<WorldRow> = sqlx::query_as(
        "SELECT display_name, latest_tick,
                world_events + clock_events + weather_events + story_events + inference_events
                    AS events
           FROM worlds.worlds WHERE world_id = $1",
    )
    .bind(world.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::unknown_world(world.as_str()));
    };

    let mut unavailable = Vec::new();
    let clock = clock_as_of(&mut tx, world.as_str(), at_tick, &mut unavailable).await?;
    let weather = weather_as_of(&mut tx, world.as_str(), at_tick).await?;
    let (story_progress, story_choices_made) =
        story_as_of(&mut tx, world.as_str(), at_tick).await?;
    let inference = inference_as_of(&mut tx, world.as_str(), at_tick).await?;
    tx.commit().await?;

    let events = if at_tick >= row.latest_tick {
        Some(row.events)
    } else {
        unavailable.push("events".to_owned());
        None
    };
    Ok(Json(WorldState {
        world_id: world.to_string(),
        at_tick,
        latest_tick: row.latest_tick,
        display_name: row.display_name,
        clock,
        weather,
        story_progress,
        story_choices_made,
        inference,
        events,
        unavailable,
    }))
}

/// The current clock is the clock as of any tick at or after its own (the read
/// model keeps the highest tick ever seen); before it, nothing is kept.
async fn clock_as_of(
    tx: &mut Transaction<'_, Postgres>,
    world: &str,
    at_tick: i64,
    unavailable: &mut Vec<String>,
) -> Result<Option<ClockState>, ApiError> {
    let clock: Option<ClockState> = sqlx::query_as(
        "SELECT tick, game_time_s, day, season FROM clock.world_clock WHERE world_id = $1",
    )
    .bind(world)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match clock {
        Some(clock) if clock.tick > at_tick => {
            unavailable.push("clock".to_owned());
            None
        }
        clock => clock,
    })
}

#[derive(sqlx::FromRow)]
struct RegionRow {
    region: String,
    #[sqlx(flatten)]
    weather: RegionWeatherState,
}

/// One probe of the `weather_changes` key per region the world ever had weather in.
async fn weather_as_of(
    tx: &mut Transaction<'_, Postgres>,
    world: &str,
    at_tick: i64,
) -> Result<BTreeMap<String, RegionWeatherState>, ApiError> {
    let rows: Vec<RegionRow> = sqlx::query_as(
        "SELECT c.region, h.condition, h.temperature_dc, h.wind_dmps, h.precipitation_dmmph,
                h.valid_from_tick AS since_tick
           FROM weather.current_weather c
          CROSS JOIN LATERAL (
                SELECT * FROM weather.weather_changes h
                 WHERE h.region_key = weather.weather_region_key(c.world_id, c.region)
                   AND h.world_id = c.world_id AND h.region = c.region
                   AND h.valid_from_tick <= $2
                 ORDER BY h.valid_from_tick DESC, h.log_offset DESC
                 LIMIT 1) h
          WHERE c.world_id = $1",
    )
    .bind(world)
    .bind(at_tick)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.region, r.weather)).collect())
}

type ByPlayer<T> = BTreeMap<String, BTreeMap<String, T>>;

/// Current node and choice count per player and story. The window count runs
/// before `DISTINCT ON` keeps the last choice, so it counts every choice.
async fn story_as_of(
    tx: &mut Transaction<'_, Postgres>,
    world: &str,
    at_tick: i64,
) -> Result<(ByPlayer<String>, ByPlayer<i64>), ApiError> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (player_id, story_id)
                player_id, story_id, next_node_id,
                count(*) OVER (PARTITION BY player_id, story_id) AS choices_made
           FROM story.choices
          WHERE world_id = $1 AND tick <= $2
          ORDER BY player_id, story_id, log_offset DESC",
    )
    .bind(world)
    .bind(at_tick)
    .fetch_all(&mut **tx)
    .await?;
    let mut progress = ByPlayer::<String>::new();
    let mut made = ByPlayer::<i64>::new();
    for (player, story, node, count) in rows {
        made.entry(player.clone())
            .or_default()
            .insert(story.clone(), count);
        progress.entry(player).or_default().insert(story, node);
    }
    Ok((progress, made))
}

/// Sums the inference log rather than `model_stats`: the statistics are bucketed
/// by time, not by tick.
async fn inference_as_of(
    tx: &mut Transaction<'_, Postgres>,
    world: &str,
    at_tick: i64,
) -> Result<InferenceTotals, ApiError> {
    Ok(sqlx::query_as(
        "SELECT count(*) AS inferences,
                count(*) FILTER (WHERE outcome <> 'ok') AS failures,
                COALESCE(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                COALESCE(sum(completion_tokens), 0)::bigint AS completion_tokens,
                COALESCE(sum(cost_micro_usd), 0)::bigint AS cost_micro_usd
           FROM inference.inferences
          WHERE world_id = $1 AND tick <= $2",
    )
    .bind(world)
    .bind(at_tick)
    .fetch_one(&mut **tx)
    .await?)
}
