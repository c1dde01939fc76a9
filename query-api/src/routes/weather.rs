//! `/v1/worlds/{world}/weather…`: the weather read model.
//!
//! "As of a tick" is `GET /v1/worlds/{world}/weather?at_tick=N`: the same list
//! and item shape as the current weather, so a client switches between now and
//! then with one parameter.
//!
//! History is stored as changes (`weather.weather_changes`), not periods: a
//! period lasts from its change's tick until the region's next change in
//! (tick, log position) order. Both the change in force at a tick and the
//! change after a given one are one descent of the table's key (a hash of the
//! world and region, then the tick: `weather.weather_region_key`), so each
//! region or period costs one or two probes however long the region's history
//! is. (The `weather.weather_history` view derives the same
//! periods with a window over a region's whole history: fine for a person at a
//! SQL prompt, not per request.)

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::QueryBuilder;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use worldline_schemas::WorldId;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{self, Page, PageRequest};
use crate::params;
use crate::routes::{PageQuery, TickRangeQuery, found, listed};

/// The projector behind these routes.
pub const PROJECTOR: &str = "weather";

const REGIONS: &str = "weather";
const HISTORY: &str = "weather-history";

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(weather))
        .routes(routes!(region_weather))
        .routes(routes!(region_history))
}

/// The weather of one region over a period of ticks.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
#[schema(example = json!({
    "region": "north", "condition": "snow", "temperature_dc": -35, "wind_dmps": 80,
    "precipitation_dmmph": 12, "since_tick": 10, "until_tick": null,
    "event_id": "0195f2a4-8c1e-7b4a-9a51-6f0c2d1e3a40", "occurred_at": "2026-11-02T10:00:10Z"
}))]
pub struct RegionWeather {
    /// The region.
    pub region: String,
    /// `clear`, `cloudy`, `fog`, `rain`, `storm` or `snow`.
    pub condition: String,
    /// Temperature in tenths of a degree Celsius.
    pub temperature_dc: i32,
    /// Wind in tenths of a metre per second.
    pub wind_dmps: i32,
    /// Precipitation in tenths of a millimetre per hour.
    pub precipitation_dmmph: i32,
    /// First tick of this weather (inclusive).
    pub since_tick: i64,
    /// Tick the next change took over (exclusive); `null` while it lasts.
    pub until_tick: Option<i64>,
    /// The `WeatherChanged` event that started it.
    pub event_id: Uuid,
    /// When that event happened.
    pub occurred_at: DateTime<Utc>,
}

/// One period of a region's weather history.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct WeatherPeriod {
    /// First tick of the period (inclusive).
    pub valid_from_tick: i64,
    /// Tick the next period starts (exclusive); `null` for the running period.
    pub valid_to_tick: Option<i64>,
    /// The condition during the period.
    pub condition: String,
    /// The condition before it (`none` for a region's first report).
    pub previous_condition: String,
    /// Temperature in tenths of a degree Celsius.
    pub temperature_dc: i32,
    /// Wind in tenths of a metre per second.
    pub wind_dmps: i32,
    /// Precipitation in tenths of a millimetre per hour.
    pub precipitation_dmmph: i32,
    /// The `WeatherChanged` event that started the period.
    pub event_id: Uuid,
    /// When that event happened.
    pub occurred_at: DateTime<Utc>,
    /// Log position: orders changes within one tick. Part of the cursor only.
    #[serde(skip)]
    pub log_offset: i64,
}

/// `{world}` and `{region}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RegionPath {
    /// World id: 1–128 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub world: String,
    /// Region id: 1–128 characters of `[A-Za-z0-9._:-]`.
    #[param(pattern = "^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    pub region: String,
}

/// Point-in-time selection.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AtTickQuery {
    /// Answer as of this tick (each region's weather in force at it) instead of now.
    /// Regions without weather at that tick are left out.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807i64)]
    pub at_tick: Option<String>,
}

/// Weather of every region, now or as of a tick.
///
/// Ordered by region. With `at_tick`, each region's period in force at that
/// tick (`until_tick` is when it ended, if it has).
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/weather",
    tag = "weather",
    operation_id = "list_weather",
    params(crate::routes::WorldPath, AtTickQuery, PageQuery),
    responses((status = 200, description = "A page of regions' weather", body = Page<RegionWeather>))
)]
async fn weather(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<crate::routes::WorldPath>,
    ApiQuery(at): ApiQuery<AtTickQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<RegionWeather>>, ApiError> {
    let world = path.world()?;
    let at_tick = at
        .at_tick
        .as_deref()
        .map(|raw| params::tick("at_tick", raw))
        .transpose()?;
    let request =
        pagination::request::<String>(REGIONS, page.limit.as_deref(), page.cursor.as_deref())?;
    let rows = match at_tick {
        None => current_rows(&state, &world, &request).await?,
        Some(tick) => as_of_rows(&state, &world, &request, tick).await?,
    };
    let page = pagination::page(REGIONS, rows, request.limit, |r| r.region.clone());
    Ok(Json(listed(&state.readers, &world, page).await?))
}

async fn current_rows(
    state: &AppState,
    world: &WorldId,
    request: &PageRequest<String>,
) -> Result<Vec<RegionWeather>, ApiError> {
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT region, condition, temperature_dc, wind_dmps, precipitation_dmmph,
                since_tick, NULL::bigint AS until_tick, event_id, occurred_at
           FROM weather.current_weather
          WHERE world_id = ",
    );
    sql.push_bind(world.as_str());
    if let Some(after) = request.after.as_deref() {
        sql.push(" AND region > ").push_bind(after);
    }
    sql.push(" ORDER BY region LIMIT ")
        .push_bind(request.fetch());
    Ok(state.readers.fetch_all(sql.build_query_as()).await?)
}

/// Joins to each change `h` the region's next change `n`, whose tick ends
/// `h`'s period (none for the period still running): one probe of the key.
const NEXT_CHANGE: &str = "
           LEFT JOIN LATERAL (
                SELECT n.valid_from_tick FROM weather.weather_changes n
                 WHERE n.region_key = h.region_key
                   AND n.world_id = h.world_id AND n.region = h.region
                   AND (n.valid_from_tick, n.log_offset) > (h.valid_from_tick, h.log_offset)
                 ORDER BY n.valid_from_tick, n.log_offset
                 LIMIT 1) n ON true
";

/// The region list comes from `current_weather` (every region that ever had
/// weather has a row there); each region is then two index probes: its last
/// change at or before the tick, and the change after that one, which ended it.
async fn as_of_rows(
    state: &AppState,
    world: &WorldId,
    request: &PageRequest<String>,
    tick: i64,
) -> Result<Vec<RegionWeather>, ApiError> {
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "SELECT c.region, h.condition, h.temperature_dc, h.wind_dmps, h.precipitation_dmmph,
                h.valid_from_tick AS since_tick, n.valid_from_tick AS until_tick,
                h.event_id, h.occurred_at
           FROM weather.current_weather c
          CROSS JOIN LATERAL (
                SELECT * FROM weather.weather_changes h
                 WHERE h.region_key = weather.weather_region_key(c.world_id, c.region)
                   AND h.world_id = c.world_id AND h.region = c.region
                   AND h.valid_from_tick <= ",
    );
    sql.push_bind(tick)
        .push(
            "
                 ORDER BY h.valid_from_tick DESC, h.log_offset DESC
                 LIMIT 1) h",
        )
        .push(NEXT_CHANGE)
        .push(" WHERE c.world_id = ")
        .push_bind(world.as_str());
    if let Some(after) = request.after.as_deref() {
        sql.push(" AND c.region > ").push_bind(after);
    }
    sql.push(" ORDER BY c.region LIMIT ")
        .push_bind(request.fetch());
    Ok(state.readers.fetch_all(sql.build_query_as()).await?)
}

/// The current weather of one region.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/weather/{region}",
    tag = "weather",
    operation_id = "get_region_weather",
    params(RegionPath),
    responses((status = 200, description = "The region's weather now", body = RegionWeather))
)]
async fn region_weather(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<RegionPath>,
) -> Result<Json<RegionWeather>, ApiError> {
    let world = params::world(&path.world)?;
    let region = params::id("region", &path.region)?;
    let row: Option<RegionWeather> = state
        .readers
        .fetch_optional(
            sqlx::query_as(
                "SELECT region, condition, temperature_dc, wind_dmps, precipitation_dmmph,
                        since_tick, NULL::bigint AS until_tick, event_id, occurred_at
                   FROM weather.current_weather WHERE world_id = $1 AND region = $2",
            )
            .bind(world.as_str())
            .bind(&region),
        )
        .await?;
    let weather = found(&state.readers, &world, row, || {
        format!("world {world} has no weather for region {region:?}")
    })
    .await?;
    Ok(Json(weather))
}

/// A region's weather periods overlapping a tick range.
///
/// A period `[valid_from_tick, valid_to_tick)` overlaps `[from_tick, to_tick]`
/// when it starts at or before `to_tick` and ends after `from_tick`. Ordered by
/// start tick, then log position.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/weather/{region}/history",
    tag = "weather",
    operation_id = "list_region_weather_history",
    params(RegionPath, TickRangeQuery, PageQuery),
    responses((status = 200, description = "A page of weather periods", body = Page<WeatherPeriod>))
)]
async fn region_history(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<RegionPath>,
    ApiQuery(range): ApiQuery<TickRangeQuery>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<WeatherPeriod>>, ApiError> {
    let world = params::world(&path.world)?;
    let region = params::id("region", &path.region)?;
    let from_tick = params::tick_or("from_tick", range.from_tick.as_deref(), 0)?;
    let to_tick = params::tick_or("to_tick", range.to_tick.as_deref(), i64::MAX)?;
    let request = pagination::request::<(i64, i64, Uuid)>(
        HISTORY,
        page.limit.as_deref(),
        page.cursor.as_deref(),
    )?;
    // A change starting at s, followed by one at s', is the period [s, s'): it
    // overlaps when s <= to_tick and s' is missing or after from_tick. Changes
    // before the region's last one at or before from_tick cannot overlap (the
    // change after each is at or before from_tick too), and every change from
    // that one on ends after from_tick, so the answer is the run from that
    // change (from the first when there is none) up to to_tick. The scan
    // starts there, or at the cursor when that lies further on: a page costs
    // one descent of the index plus one probe per period for its end, however
    // long the history before it. The overlap test stays on each row as the
    // definition; the scan start only skips rows it would reject.
    let after = request.after;
    let (scan_tick, scan_offset) =
        after.map_or((i64::MIN, i64::MIN), |(tick, offset, _)| (tick, offset));
    // Only the conditions that apply: see `crate::connect_reader`.
    let mut sql = QueryBuilder::new(
        "WITH scan_start AS (
              SELECT * FROM (
                     (SELECT a.valid_from_tick, a.log_offset FROM weather.weather_changes a
                       WHERE a.region_key = weather.weather_region_key(",
    );
    sql.push_bind(world.as_str())
        .push(", ")
        .push_bind(&region)
        .push(") AND a.world_id = ")
        .push_bind(world.as_str())
        .push(" AND a.region = ")
        .push_bind(&region)
        .push(" AND a.valid_from_tick <= ")
        .push_bind(from_tick)
        .push(
            "
                       ORDER BY a.valid_from_tick DESC, a.log_offset DESC
                       LIMIT 1)
                     UNION ALL SELECT ",
        )
        .push_bind(scan_tick)
        .push(", ")
        .push_bind(scan_offset)
        .push(
            ") s
               ORDER BY valid_from_tick DESC, log_offset DESC
               LIMIT 1)
         SELECT h.valid_from_tick, n.valid_from_tick AS valid_to_tick, h.condition,
                h.previous_condition, h.temperature_dc, h.wind_dmps, h.precipitation_dmmph,
                h.event_id, h.occurred_at, h.log_offset
           FROM weather.weather_changes h",
        )
        .push(NEXT_CHANGE)
        .push(" WHERE h.region_key = weather.weather_region_key(")
        .push_bind(world.as_str())
        .push(", ")
        .push_bind(&region)
        .push(") AND h.world_id = ")
        .push_bind(world.as_str())
        .push(" AND h.region = ")
        .push_bind(&region)
        .push(
            " AND (h.valid_from_tick, h.log_offset)
                 >= ((SELECT valid_from_tick FROM scan_start), (SELECT log_offset FROM scan_start))
            AND h.valid_from_tick <= ",
        )
        .push_bind(to_tick)
        .push(" AND (n.valid_from_tick IS NULL OR n.valid_from_tick > ")
        .push_bind(from_tick)
        .push(")");
    if let Some((after_tick, after_offset, after_id)) = after {
        sql.push(" AND (h.valid_from_tick, h.log_offset, h.event_id) > (")
            .push_bind(after_tick)
            .push(", ")
            .push_bind(after_offset)
            .push(", ")
            .push_bind(after_id)
            .push(")");
    }
    sql.push(" ORDER BY h.valid_from_tick, h.log_offset, h.event_id LIMIT ")
        .push_bind(request.fetch());
    let rows: Vec<WeatherPeriod> = state.readers.fetch_all(sql.build_query_as()).await?;
    let page = pagination::page(HISTORY, rows, request.limit, |p| {
        (p.valid_from_tick, p.log_offset, p.event_id)
    });
    Ok(Json(listed(&state.readers, &world, page).await?))
}
