//! The HTTP query API over the read models.
//!
//! - [`build`]: connect the read-only pool from settings and return the whole
//!   router (what `worldline serve` runs).
//! - [`app`] / [`app_with`]: the whole router, given its state.
//! - [`routes`]: one module (and one `router()`) per read model.
//! - [`docs`]: the generated OpenAPI 3.1 document, `/openapi.json`, `/docs`.
//! - [`error`]: the one error type, rendered as problem+json.
//! - [`params`], [`pagination`], [`extract`]: validation, cursors, extractors.
//! - [`metrics`]: request count and latency per route.
//! - [`readers`]: the connections the handlers' single statements run on.

pub mod consistency;
pub mod docs;
pub mod error;
pub mod extract;
pub mod guard;
pub mod metrics;
pub mod pagination;
pub mod params;
pub mod readers;
pub mod routes;
pub mod stream;
pub mod web;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Uri};
use axum::{Extension, Router, middleware};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};
use tokio_util::sync::{CancellationToken, DropGuard};
use tower_http::trace::TraceLayer;
use worldline_ops::{Health, Settings};

use crate::error::ApiError;
pub use crate::readers::Readers;
use crate::routes::Resource;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// A pool of the read-only database role: transactions, `LISTEN`, streams.
    pub pool: PgPool,
    /// Connections opened like the pool's, for the handlers' single statements.
    pub readers: Readers,
}

impl AppState {
    /// State over an existing pool (tests, or a caller that owns the pool),
    /// with as many statement connections as the pool may open.
    pub fn new(pool: PgPool) -> AppState {
        let size = pool.options().get_max_connections();
        AppState::with_readers(pool, size)
    }

    /// State over `pool` with up to `readers` statement connections.
    pub fn with_readers(pool: PgPool, readers: u32) -> AppState {
        AppState {
            readers: Readers::new(&pool, readers),
            pool,
        }
    }
}

/// Why [`build`] could not produce a router.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `database.reader_url` (or `database.url`) is not a PostgreSQL URL.
    #[error("the reader database URL is invalid")]
    DatabaseUrl(#[source] sqlx::Error),
    /// PostgreSQL did not accept a connection.
    #[error("cannot connect to the reader database")]
    Connect(#[source] sqlx::Error),
    /// `auth` names an unusable token or JWT key.
    #[error(transparent)]
    Auth(#[from] worldline_ops::auth::AuthConfigError),
}

/// A per-resource hook: wraps the routes of one resource, given the projectors
/// whose read models it reads. This is where layers that need to know them go
/// (auth, read-your-writes waits, lag headers); [`app`] uses the identity.
pub type ResourceHook<'a> =
    &'a dyn Fn(&'static [&'static str], Router<AppState>) -> Router<AppState>;

/// Connects the read-only pool (`settings.reader_url()`), keeps `/readyz` in
/// step with PostgreSQL, and returns the whole API.
///
/// The readiness watcher stops when the returned router (and every clone of
/// it) is dropped.
pub async fn build(settings: &Settings, health: Health) -> Result<Router, BuildError> {
    build_with_shutdown(settings, health, CancellationToken::new()).await
}

/// [`build`], with open event streams ended when `shutdown` fires: pass the
/// token the server's graceful shutdown waits on, or open streams hold it up.
pub async fn build_with_shutdown(
    settings: &Settings,
    health: Health,
    shutdown: CancellationToken,
) -> Result<Router, BuildError> {
    let pool = connect_reader(settings).await?;
    let stop = CancellationToken::new();
    // Every `/v1` route is behind the guards: production always checks tokens.
    let progress = start_progress(pool.clone(), settings, stop.clone());
    tokio::spawn(consistency::watch_lag(
        progress.clone(),
        health.clone(),
        settings.http.ready_max_lag_records,
        stop.clone(),
    ));
    let guards = guard::Guards::from_settings(settings, progress)?;
    tokio::spawn(watch_database(pool.clone(), health.clone(), stop.clone()));
    let guard = WatchGuard(Arc::new(stop.drop_guard()));
    let hook = |projectors, routes| guards.wrap(projectors, routes);
    let state = AppState::with_readers(pool, settings.database.reader_connections);
    let app = app_with_shutdown(state, health, &hook, shutdown);
    Ok(app.layer(Extension(guard)))
}

/// The shared `LISTEN worldline_progress` task over every resource's projectors.
pub fn start_progress(
    pool: PgPool,
    settings: &Settings,
    stop: CancellationToken,
) -> consistency::Progress {
    let projectors: std::collections::BTreeSet<&'static str> = routes::resources()
        .iter()
        .flat_map(|r| r.projectors.iter().copied())
        .chain([stream::PROJECTOR])
        .collect();
    let projectors: Vec<&'static str> = projectors.into_iter().collect();
    consistency::Progress::start(
        pool,
        &projectors,
        &settings.topics.prefix,
        Duration::from_millis(settings.http.progress_refresh_ms),
        stop,
    )
}

/// The API with every `/v1` route behind `guards` (auth, limits,
/// read-your-writes): what [`build`] serves.
pub fn secured_app(state: AppState, health: Health, guards: &guard::Guards) -> Router {
    app_with(state, health, &|projectors, routes| {
        guards.wrap(projectors, routes)
    })
}

/// Ties the readiness watcher's life to the router's: the router's layers hold
/// the only strong references, so dropping the last router cancels the watcher.
#[derive(Debug, Clone)]
struct WatchGuard(#[allow(dead_code)] Arc<DropGuard>);

/// The pool [`build`] serves from: `settings.reader_url()`, every transaction
/// read-only unless it says otherwise (the API never does; the role's grants
/// are what stop one that tries).
///
/// The read-only default is a session setting, so a statement needs no
/// `BEGIN READ ONLY` … `COMMIT` around it; statements are prepared once per
/// connection; and a pooled connection is only checked before use when it has
/// sat idle (sqlx's default pings every connection it hands out). The
/// handlers' single statements run on [`Readers`], opened with these options.
///
/// PostgreSQL's plan cache stays in its default mode, so a prepared statement
/// soon runs a cached generic plan instead of being planned per request. That
/// is why list queries hold only the filters a request sets (one statement per
/// combination) rather than `($n IS NULL OR col = $n)`: a generic plan of that
/// form has to serve both branches and cannot use the filter's index.
pub async fn connect_reader(settings: &Settings) -> Result<PgPool, BuildError> {
    let options = PgConnectOptions::from_str(settings.reader_url())
        .map_err(BuildError::DatabaseUrl)?
        .application_name("worldline-query-api")
        .options([
            // Also when `reader_url` is unset and the owner's URL is used.
            ("default_transaction_read_only", "on"),
            // A runaway query ends as a 503 instead of holding a connection.
            ("statement_timeout", "5000"),
        ]);
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                // A connection in steady use has just answered a query (and sqlx
                // pinged it when it came back); one idle for longer may have
                // been closed by the server, a restart or a proxy meanwhile.
                if meta.idle_for >= IDLE_BEFORE_PING {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(BuildError::Connect)
}

/// How long a pooled connection may sit unused before it is pinged again
/// before use.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// The query API's router: every resource, `/openapi.json`, `/docs`, health and
/// metrics, without auth or read-your-writes (tests, or behind another gate);
/// [`build`] and [`secured_app`] are what a server runs.
pub fn app(state: AppState, health: Health) -> Router {
    app_with(state, health, &|_, routes| routes)
}

/// [`app`] with `hook` applied to each resource's routes.
pub fn app_with(state: AppState, health: Health, hook: ResourceHook<'_>) -> Router {
    app_with_shutdown(state, health, hook, CancellationToken::new())
}

/// [`app_with`], with open event streams ended when `shutdown` fires.
pub fn app_with_shutdown(
    state: AppState,
    health: Health,
    hook: ResourceHook<'_>,
    shutdown: CancellationToken,
) -> Router {
    let streams = stream::Streams::new(state.pool.clone(), shutdown);
    let mut paths = utoipa::openapi::OpenApi::default();
    let mut resources = Vec::new();
    for Resource { projectors, router } in routes::resources() {
        let (routes, resource_paths) = router.split_for_parts();
        paths.merge(resource_paths);
        resources.push((projectors, routes));
    }
    let (stream_routes, stream_paths) = stream::router().split_for_parts();
    paths.merge(stream_paths);
    let doc = docs::document(paths);
    let known = extract::KnownQueryParameters::from_document(&doc);
    // Inside the hook, so its guards answer first: a request without a valid
    // token gets 401 (403, 404) whatever its query string, never a 400 that
    // tells it about the route's parameters.
    let checked = |routes: Router<AppState>| {
        routes.route_layer(middleware::from_fn_with_state(
            known.clone(),
            extract::reject_unknown_query_parameters,
        ))
    };
    let mut api = Router::new();
    for (projectors, routes) in resources {
        api = api.merge(hook(projectors, checked(routes)));
    }
    api = api.merge(hook(&[stream::PROJECTOR], checked(stream_routes)).layer(Extension(streams)));
    Router::new()
        .merge(api.with_state(state))
        .merge(docs::router(&doc))
        .merge(web::router())
        .merge(worldline_ops::health::router(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(metrics::track))
        .layer(TraceLayer::new_for_http())
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {}; see /openapi.json",
        params::shorten(uri.path())
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}",
        params::shorten(uri.path())
    ))
}

/// Keeps `/readyz` honest: ready while the read-model database answers.
pub async fn watch_database(pool: PgPool, health: Health, shutdown: CancellationToken) {
    loop {
        let state = sqlx::query("SELECT 1")
            .execute(&pool)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        health.set("postgres", state);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
