//! `GET /v1/worlds/{world}/stream`: Server-Sent Events of a world's read-model
//! changes.
//!
//! # Where changes come from
//!
//! Every projector runs `pg_notify('worldline_progress', '<schema>')` inside each
//! transaction it commits. One [`Streams`] hub per process holds the only
//! `LISTEN` connection and fans the schema names out over a
//! `tokio::sync::broadcast` channel. A notification is only a hint: each
//! connection re-reads its world's rows past the position it last sent, so a
//! notification lost while the listener was reconnecting (PostgreSQL drops them)
//! costs nothing once the listener has reconnected and asked everyone to re-read.
//!
//! # Events
//!
//! | event | data | sent when |
//! | --- | --- | --- |
//! | `ready` | `{"world", "families"}` | first, on every connection |
//! | `world` | the world summary (as `GET /v1/worlds/{world}`) | its record count moved |
//! | `clock` | the clock (as `GET /v1/worlds/{world}/clock`) | its tick moved |
//! | `weather` | one region's current weather | that region's weather changed |
//! | `story` | one choice of the choices log | each new choice |
//! | `inference` | one inference of the inference log | each new inference |
//!
//! `world`, `clock` and `weather` are state: a client gets the latest state,
//! not every intermediate one. `story` and `inference` are logs: every row.
//! A connection without `Last-Event-ID` starts with the current state (world,
//! clock, every region) and the logs from their current end.
//!
//! # Event ids and resuming
//!
//! Every event's `id` is the position of the whole stream after that event, as
//! unpadded base64url of a small JSON object, version 1:
//!
//! ```json
//! {"v":1,"r":120,"c":30,"w":57,"s":88,"i":[1789999980000000,"0193…"]}
//! ```
//!
//! - `r`: the world's `records_applied` last sent (`world`), −1 for none;
//! - `c`: the clock tick last sent, −1 for none;
//! - `w`: the highest weather log offset sent, −1 for none;
//! - `s`: the highest story log offset sent, −1 for none;
//! - `i`: the last inference sent as `[occurred_at µs since the epoch, event id]`,
//!   `null` for none.
//!
//! A client reconnecting with `Last-Event-ID` gets exactly what lies past that
//! position: no gap, no repeat. Log offsets order a world's events because a
//! world's events share one partition. Inferences have no log offset in their
//! read model, so they are ordered by `(occurred_at, event_id)`: an inference
//! recorded with an `occurred_at` earlier than one already streamed is in the
//! log endpoint but is not streamed.
//!
//! # Shutdown
//!
//! Streams end when the [`Streams`] hub's shutdown token fires: pass the token
//! the server's graceful shutdown waits on, or open streams would hold it up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, QueryBuilder};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use worldline_ops::consistency::PROGRESS_CHANNEL;
use worldline_schemas::WorldId;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::routes::clock::ClockView;
use crate::routes::inference::Inference;
use crate::routes::story::Choice;
use crate::routes::worlds::{EventCounts, WorldSummary};
use crate::routes::{WorldPath, world_exists};

/// The projector the stream's routes are registered under for per-resource
/// hooks (auth, lag headers): the stream starts from the worlds read model.
pub const PROJECTOR: &str = "worlds";

/// The header a reconnecting client sends its last event id in.
pub const LAST_EVENT_ID: &str = "Last-Event-ID";

/// Rows of a log family read per query when catching up.
const BATCH: i64 = 500;

/// How long a stream waits before re-reading after a failed read.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// How long the listener waits before reconnecting after an error.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Routes of this resource.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream))
}

// ---------------------------------------------------------------------------
// Families and positions: pure decisions.
// ---------------------------------------------------------------------------

/// A kind of change a stream can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamFamily {
    /// The world's summary (`worlds.worlds`).
    World,
    /// The clock (`clock.world_clock`).
    Clock,
    /// Current weather per region (`weather.current_weather`).
    Weather,
    /// The choices log (`story.choices`).
    Story,
    /// The inference log (`inference.inferences`).
    Inference,
}

impl StreamFamily {
    /// Every family, in the order a re-read emits them.
    pub const ALL: [StreamFamily; 5] = [
        StreamFamily::World,
        StreamFamily::Clock,
        StreamFamily::Weather,
        StreamFamily::Story,
        StreamFamily::Inference,
    ];

    /// The family's name: the SSE `event` field and the `families` value.
    pub fn name(self) -> &'static str {
        match self {
            StreamFamily::World => "world",
            StreamFamily::Clock => "clock",
            StreamFamily::Weather => "weather",
            StreamFamily::Story => "story",
            StreamFamily::Inference => "inference",
        }
    }

    /// The family whose read model lives in `schema` (a notification's payload).
    pub fn from_schema(schema: &str) -> Option<StreamFamily> {
        match schema {
            "worlds" => Some(StreamFamily::World),
            "clock" => Some(StreamFamily::Clock),
            "weather" => Some(StreamFamily::Weather),
            "story" => Some(StreamFamily::Story),
            "inference" => Some(StreamFamily::Inference),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Families(u8);

impl Families {
    /// Every family.
    pub fn all() -> Families {
        StreamFamily::ALL
            .into_iter()
            .fold(Families::default(), Families::with)
    }

    /// This set and `family`.
    pub fn with(self, family: StreamFamily) -> Families {
        Families(self.0 | family.bit())
    }

    /// Whether `family` is in the set.
    pub fn contains(self, family: StreamFamily) -> bool {
        self.0 & family.bit() != 0
    }

    /// Families in both sets.
    pub fn and(self, other: Families) -> Families {
        Families(self.0 & other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The families of the set, in [`StreamFamily::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = StreamFamily> {
        StreamFamily::ALL
            .into_iter()
            .filter(move |f| self.contains(*f))
    }

    /// Parses the `families` parameter: comma-separated names; absent or empty
    /// means every family.
    pub fn parse(raw: Option<&str>) -> Result<Families, ApiError> {
        // Exactly the documented shape (no blanks, no empty names): what the
        // document promises is what the server accepts, and nothing looser.
        let Some(raw) = raw else {
            return Ok(Families::all());
        };
        raw.split(',').try_fold(Families::default(), |set, name| {
            StreamFamily::ALL
                .into_iter()
                .find(|f| f.name() == name)
                .map(|f| set.with(f))
                .ok_or_else(|| {
                    ApiError::bad(
                        "families",
                        format!(
                            "unknown family {:?}; expected a comma-separated list of world, clock, weather, story, inference",
                            crate::params::shorten(name)
                        ),
                    )
                })
        })
    }
}

/// Where a stream stands in each family; every event's id encodes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Format version (1).
    v: u8,
    /// `records_applied` of the world summary last sent.
    r: i64,
    /// Clock tick last sent.
    c: i64,
    /// Highest weather log offset sent.
    w: i64,
    /// Highest story log offset sent.
    s: i64,
    /// Last inference sent: `(occurred_at µs, event id)`.
    i: Option<(i64, Uuid)>,
}

/// Why a `Last-Event-ID` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    /// Not unpadded base64url.
    #[error("not base64url")]
    Encoding,
    /// Not the JSON of a position.
    #[error("not an event id of this stream")]
    Shape,
    /// A version this server does not know.
    #[error("unknown event id version {0}")]
    Version(u8),
}

impl Position {
    /// Before everything: the first read sends every family's current state
    /// and the whole logs.
    pub fn origin() -> Position {
        Position {
            v: 1,
            r: -1,
            c: -1,
            w: -1,
            s: -1,
            i: None,
        }
    }

    /// The event id of this position.
    pub fn encode(&self) -> String {
        // Serializing plain integers and a uuid cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    /// The position an event id encodes.
    pub fn decode(id: &str) -> Result<Position, PositionError> {
        let json = URL_SAFE_NO_PAD
            .decode(id.trim())
            .map_err(|_| PositionError::Encoding)?;
        let position: Position = serde_json::from_slice(&json).map_err(|_| PositionError::Shape)?;
        if position.v != 1 {
            return Err(PositionError::Version(position.v));
        }
        Ok(position)
    }
}

/// A hint that some read models changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A projector committed to this family's read model.
    Changed(StreamFamily),
    /// Notifications may have been lost: re-read every family.
    Resync,
}

/// The families a batch of hints asks a stream (subscribed to `wanted`) to re-read.
pub fn families_to_reread(wanted: Families, notices: &[Notice]) -> Families {
    let touched = notices
        .iter()
        .fold(Families::default(), |set, notice| match notice {
            Notice::Changed(family) => set.with(*family),
            Notice::Resync => Families::all(),
        });
    touched.and(wanted)
}

// ---------------------------------------------------------------------------
// The hub: one LISTEN connection per process.
// ---------------------------------------------------------------------------

/// The process's one `LISTEN` connection, fanned out to every open stream.
/// Cheap to clone. The listener starts with the first stream and stops when
/// `shutdown` fires, which also ends every open stream.
#[derive(Debug, Clone)]
pub struct Streams {
    inner: Arc<Hub>,
}

#[derive(Debug)]
struct Hub {
    pool: PgPool,
    shutdown: CancellationToken,
    sender: broadcast::Sender<Notice>,
    listening: OnceLock<()>,
    keep_alive: Duration,
}

impl Streams {
    /// A hub reading through `pool`; streams end when `shutdown` fires.
    pub fn new(pool: PgPool, shutdown: CancellationToken) -> Streams {
        Streams::with_keep_alive(pool, shutdown, Duration::from_secs(15))
    }

    /// [`Streams::new`] with keep-alive comments every `interval` on idle streams
    /// (proxies close connections that stay silent too long).
    pub fn with_keep_alive(
        pool: PgPool,
        shutdown: CancellationToken,
        interval: Duration,
    ) -> Streams {
        // Deep enough for bursts of commits; a stream that still falls behind
        // gets `Lagged` and re-reads everything, which loses nothing.
        let (sender, _) = broadcast::channel(1024);
        Streams {
            inner: Arc::new(Hub {
                pool,
                shutdown,
                sender,
                listening: OnceLock::new(),
                keep_alive: interval,
            }),
        }
    }

    /// Hints from now on; starts the listener on first use.
    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        let receiver = self.inner.sender.subscribe();
        self.inner.listening.get_or_init(|| {
            tokio::spawn(listen(
                self.inner.pool.clone(),
                self.inner.sender.clone(),
                self.inner.shutdown.clone(),
            ));
        });
        receiver
    }
}

/// Forwards notifications until `shutdown`; after every (re)connection asks
/// everyone to re-read, since PostgreSQL drops notifications sent to nobody.
async fn listen(pool: PgPool, sender: broadcast::Sender<Notice>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match listen_once(&pool, &sender, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "progress listener lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                }
            }
        }
    }
}

/// One listener connection's life: `Ok` on shutdown, `Err` when it broke.
async fn listen_once(
    pool: &PgPool,
    sender: &broadcast::Sender<Notice>,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(PROGRESS_CHANNEL).await?;
    // Sending fails only when no stream is open, which is fine.
    let _ = sender.send(Notice::Resync);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.try_recv() => received?,
        };
        let notice = match received {
            Some(notification) => match StreamFamily::from_schema(notification.payload()) {
                Some(family) => Notice::Changed(family),
                None => continue,
            },
            // The connection dropped and was re-established: anything sent in
            // between is gone.
            None => Notice::Resync,
        };
        let _ = sender.send(notice);
    }
}

// ---------------------------------------------------------------------------
// The route.
// ---------------------------------------------------------------------------

/// The stream's query parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Comma-separated families to stream: `world`, `clock`, `weather`, `story`,
    /// `inference` (default: all).
    #[param(
        pattern = "^(world|clock|weather|story|inference)(,(world|clock|weather|story|inference))*$",
        example = "clock,weather"
    )]
    pub families: Option<String>,
}

/// One server-sent event as the document describes it (each event of the stream
/// has these fields; `data` is a JSON text).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)] // documents the wire format; events are written by axum's `Event`
pub struct StreamEvent {
    /// `ready` first, then the family whose read model changed (`world`,
    /// `clock`, `weather`, `story`, `inference`).
    pub event: String,
    /// A JSON document: the world and families for `ready`, else the changed rows.
    pub data: String,
    /// The stream position after this event, for `Last-Event-ID`.
    pub id: Option<String>,
    /// Reconnection delay in milliseconds, when the server suggests one.
    pub retry: Option<u64>,
}

/// Live changes of a world's read models (Server-Sent Events).
///
/// Events: `ready` (first), then `world`, `clock`, `weather` (one region),
/// `story` (one choice) and `inference` (one inference) as the read models
/// change. Each event's `id` is the stream position after it (unpadded
/// base64url JSON); reconnect with that id in `Last-Event-ID` to resume with no
/// gap and no repeat. Without it the stream starts with the current world,
/// clock and weather, and the logs from their current end. Comments keep idle
/// connections alive; streams end when the server shuts down.
#[utoipa::path(
    get,
    path = "/v1/worlds/{world}/stream",
    tag = "stream",
    operation_id = "stream_world",
    params(
        WorldPath,
        StreamQuery,
        ("Last-Event-ID" = Option<String>, Header, nullable = false,
         pattern = "^[A-Za-z0-9_-]*$",
         description = "The `id` of the last event received, unchanged, to resume after it \
                        (opaque: an id this stream did not make is a 400; empty is none)")
    ),
    responses((
        status = 200,
        description = "An endless `text/event-stream` of the world's changes",
        content_type = "text/event-stream",
        body = StreamEvent
    ))
)]
async fn stream(
    State(state): State<AppState>,
    Extension(streams): Extension<Streams>,
    ApiPath(path): ApiPath<WorldPath>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let world = path.world()?;
    let families = Families::parse(query.families.as_deref())?;
    let resume = last_event_id(&headers)?;
    if !world_exists(&state.readers, &world).await? {
        return Err(ApiError::unknown_world(world.as_str()));
    }
    // Subscribed before the first read: a commit between the two is re-read,
    // never missed.
    let notices = streams.subscribe();
    let position = match resume {
        Some(position) => position,
        None => start_position(&state.pool, &world).await?,
    };
    let ready = Event::default()
        .event("ready")
        .id(position.encode())
        .json_data(Ready {
            world: world.as_str(),
            families: families.iter().map(StreamFamily::name).collect(),
        })
        .map_err(|_| ApiError::bad("families", "cannot describe the stream"))?;
    let connection = Connection {
        pool: state.pool.clone(),
        world,
        families,
        position,
        pending: VecDeque::from([ready]),
        notices,
        shutdown: streams.inner.shutdown.clone(),
        reread: Some(families),
    };
    let events = futures::stream::unfold(connection, |mut connection| async move {
        connection
            .next_event()
            .await
            .map(|event| (Ok(event), connection))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(streams.inner.keep_alive)))
}

#[derive(Serialize)]
struct Ready<'a> {
    world: &'a str,
    families: Vec<&'static str>,
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<Position>, ApiError> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad(LAST_EVENT_ID, "not an event id of this stream"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    Position::decode(text)
        .map(Some)
        .map_err(|why| ApiError::bad(LAST_EVENT_ID, format!("{why}; reconnect without it")))
}

/// Current state from scratch, logs from their current end.
async fn start_position(pool: &PgPool, world: &WorldId) -> Result<Position, ApiError> {
    let story: Option<i64> =
        sqlx::query_scalar("SELECT max(log_offset) FROM story.choices WHERE world_id = $1")
            .bind(world.as_str())
            .fetch_one(pool)
            .await?;
    let inference: Option<(DateTime<Utc>, Uuid)> = sqlx::query_as(
        "SELECT occurred_at, event_id FROM inference.inferences WHERE world_id = $1
          ORDER BY occurred_at DESC, event_id DESC LIMIT 1",
    )
    .bind(world.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(Position {
        s: story.unwrap_or(-1),
        i: inference.map(|(at, id)| (at.timestamp_micros(), id)),
        ..Position::origin()
    })
}

/// One open stream.
struct Connection {
    pool: PgPool,
    world: WorldId,
    families: Families,
    position: Position,
    pending: VecDeque<Event>,
    notices: broadcast::Receiver<Notice>,
    shutdown: CancellationToken,
    /// Families to re-read before waiting for the next hint.
    reread: Option<Families>,
}

impl Connection {
    /// The next event, or `None` when the stream should end (shutdown).
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            let families = match self.reread.take() {
                Some(families) => families,
                None => self.wait_for_hints().await?,
            };
            if families.is_empty() {
                continue;
            }
            if let Err(error) = self.read(families).await {
                // Retried after a pause; the position moved only past events
                // already queued, so nothing is lost or repeated.
                tracing::warn!(%error, world = %self.world, "stream re-read failed");
                self.reread = Some(families);
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    }

    /// Waits for hints; drains those already queued so a burst costs one re-read.
    async fn wait_for_hints(&mut self) -> Option<Families> {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let first = tokio::select! {
            _ = self.shutdown.cancelled() => return None,
            notice = self.notices.recv() => notice,
        };
        let mut notices = vec![match first {
            Ok(notice) => notice,
            // Hints were dropped for this slow stream: re-read everything.
            Err(RecvError::Lagged(_)) => Notice::Resync,
            Err(RecvError::Closed) => return None,
        }];
        loop {
            match self.notices.try_recv() {
                Ok(notice) => notices.push(notice),
                Err(TryRecvError::Lagged(_)) => notices.push(Notice::Resync),
                Err(_) => break,
            }
        }
        Some(families_to_reread(self.families, &notices))
    }

    /// Queues the events of every row of `families` past the position.
    async fn read(&mut self, families: Families) -> Result<(), sqlx::Error> {
        for family in families.iter() {
            match family {
                StreamFamily::World => self.read_world().await?,
                StreamFamily::Clock => self.read_clock().await?,
                StreamFamily::Weather => self.read_weather().await?,
                StreamFamily::Story => self.read_story().await?,
                StreamFamily::Inference => self.read_inference().await?,
            }
        }
        Ok(())
    }

    fn emit(&mut self, family: StreamFamily, data: &impl Serialize) {
        match Event::default()
            .event(family.name())
            .id(self.position.encode())
            .json_data(data)
        {
            Ok(event) => self.pending.push_back(event),
            Err(error) => tracing::warn!(%error, "cannot serialize a stream event"),
        }
    }

    async fn read_world(&mut self) -> Result<(), sqlx::Error> {
        let row: Option<WorldRow> = sqlx::query_as(
            "SELECT world_id, display_name, seed, regions, status, created_at, latest_tick,
                    world_events, clock_events, weather_events, story_events, inference_events,
                    last_event_at, records_applied
               FROM worlds.worlds WHERE world_id = $1 AND records_applied > $2",
        )
        .bind(self.world.as_str())
        .bind(self.position.r)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            self.position.r = row.records_applied;
            self.emit(StreamFamily::World, &WorldSummary::from(row));
        }
        Ok(())
    }

    async fn read_clock(&mut self) -> Result<(), sqlx::Error> {
        let row: Option<ClockView> = sqlx::query_as(
            "SELECT world_id, tick, game_time_s, day, season, time_scale, occurred_at
               FROM clock.world_clock WHERE world_id = $1 AND tick > $2",
        )
        .bind(self.world.as_str())
        .bind(self.position.c)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(clock) = row {
            self.position.c = clock.tick;
            self.emit(StreamFamily::Clock, &clock);
        }
        Ok(())
    }

    async fn read_weather(&mut self) -> Result<(), sqlx::Error> {
        let rows: Vec<RegionNow> = sqlx::query_as(
            "SELECT region, condition, temperature_dc, wind_dmps, precipitation_dmmph,
                    since_tick, log_offset, event_id, occurred_at
               FROM weather.current_weather WHERE world_id = $1 AND log_offset > $2
              ORDER BY log_offset",
        )
        .bind(self.world.as_str())
        .bind(self.position.w)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            self.position.w = row.log_offset;
            self.emit(StreamFamily::Weather, &row);
        }
        Ok(())
    }

    async fn read_story(&mut self) -> Result<(), sqlx::Error> {
        loop {
            let rows: Vec<LoggedChoice> = sqlx::query_as(
                "SELECT event_id, tick, occurred_at, player_id, story_id, node_id, choice_id,
                        next_node_id, context, log_offset
                   FROM story.choices WHERE world_id = $1 AND log_offset > $2
                  ORDER BY log_offset LIMIT $3",
            )
            .bind(self.world.as_str())
            .bind(self.position.s)
            .bind(BATCH)
            .fetch_all(&self.pool)
            .await?;
            let full = rows.len() as i64 == BATCH;
            for row in rows {
                self.position.s = row.log_offset;
                self.emit(StreamFamily::Story, &row.choice);
            }
            if !full {
                return Ok(());
            }
        }
    }

    async fn read_inference(&mut self) -> Result<(), sqlx::Error> {
        loop {
            // Only the conditions that apply: see `crate::connect_reader`.
            let mut sql = QueryBuilder::new(
                "SELECT event_id, tick, occurred_at, model_id, model_version, purpose,
                        prompt_tokens, completion_tokens, latency_ms, cost_micro_usd, outcome,
                        npc_id, input_hash
                   FROM inference.inferences
                  WHERE world_id = ",
            );
            sql.push_bind(self.world.as_str());
            let after = self
                .position
                .i
                .and_then(|(micros, id)| Some((DateTime::from_timestamp_micros(micros)?, id)));
            if let Some((at, id)) = after {
                sql.push(" AND (occurred_at, event_id) > (")
                    .push_bind(at)
                    .push(", ")
                    .push_bind(id)
                    .push(")");
            }
            sql.push(" ORDER BY occurred_at, event_id LIMIT ")
                .push_bind(BATCH);
            let rows: Vec<Inference> = sql.build_query_as().fetch_all(&self.pool).await?;
            let full = rows.len() as i64 == BATCH;
            for row in rows {
                self.position.i = Some((row.occurred_at.timestamp_micros(), row.event_id));
                self.emit(StreamFamily::Inference, &row);
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// A region's current weather, as streamed.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct RegionNow {
    region: String,
    condition: String,
    temperature_dc: i32,
    wind_dmps: i32,
    precipitation_dmmph: i32,
    since_tick: i64,
    log_offset: i64,
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct LoggedChoice {
    #[sqlx(flatten)]
    choice: Choice,
    log_offset: i64,
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
    records_applied: i64,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn given_no_families_parameter_when_parsed_then_every_family() {
        assert_eq!(Families::parse(None).unwrap(), Families::all());
    }

    #[test]
    fn given_blanks_or_empty_names_when_parsed_then_refused_like_the_document_says() {
        for loose in ["", " ", "clock, weather", "clock,,weather", "clock,"] {
            assert!(Families::parse(Some(loose)).is_err(), "{loose:?}");
        }
    }

    #[test]
    fn given_a_list_when_parsed_then_exactly_those_families() {
        let set = Families::parse(Some("clock,weather")).unwrap();
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![StreamFamily::Clock, StreamFamily::Weather]
        );
    }

    #[test]
    fn given_an_unknown_family_when_parsed_then_a_400_naming_families() {
        let error = Families::parse(Some("clock,gossip")).unwrap_err();
        assert!(
            matches!(error, ApiError::BadRequest { ref parameter, .. } if parameter == "families")
        );
    }

    #[test]
    fn given_a_position_when_encoded_then_it_decodes_to_itself() {
        let position = Position {
            r: 12,
            c: 30,
            w: 7,
            s: -1,
            i: Some((1_789_999_980_000_000, Uuid::nil())),
            ..Position::origin()
        };
        let id = position.encode();
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(Position::decode(&id).unwrap(), position);
    }

    #[test]
    fn given_garbage_when_decoded_then_refused() {
        assert_eq!(Position::decode("%%%"), Err(PositionError::Encoding));
        assert_eq!(
            Position::decode(&URL_SAFE_NO_PAD.encode(b"{\"x\":1}")),
            Err(PositionError::Shape)
        );
        let future =
            URL_SAFE_NO_PAD.encode(b"{\"v\":2,\"r\":0,\"c\":0,\"w\":0,\"s\":0,\"i\":null}");
        assert_eq!(Position::decode(&future), Err(PositionError::Version(2)));
    }

    #[test]
    fn given_schema_names_when_mapped_then_only_streamed_read_models() {
        assert_eq!(
            StreamFamily::from_schema("worlds"),
            Some(StreamFamily::World)
        );
        assert_eq!(
            StreamFamily::from_schema("weather"),
            Some(StreamFamily::Weather)
        );
        assert_eq!(StreamFamily::from_schema("player_activity"), None);
        assert_eq!(StreamFamily::from_schema("clock_shadow"), None);
    }

    #[test]
    fn given_hints_when_deciding_then_only_wanted_changed_families_are_reread() {
        let wanted = Families::parse(Some("clock,story")).unwrap();
        let hints = [
            Notice::Changed(StreamFamily::Clock),
            Notice::Changed(StreamFamily::Weather),
        ];
        assert_eq!(
            families_to_reread(wanted, &hints)
                .iter()
                .collect::<Vec<_>>(),
            vec![StreamFamily::Clock]
        );
    }

    #[test]
    fn given_a_resync_when_deciding_then_every_wanted_family_is_reread() {
        let wanted = Families::parse(Some("weather,inference")).unwrap();
        assert_eq!(families_to_reread(wanted, &[Notice::Resync]), wanted);
    }
}
