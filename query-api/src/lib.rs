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

pub mod consistency;
pub mod docs;
pub mod error;
pub mod extract;
pub mod guard;
pub mod metrics;
pub mod pagination;
pub mod params;
pub mod routes;
pub mod stream;
pub mod web;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Uri};
use axum::{Extension, Router, middleware};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::{CancellationToken, DropGuard};
use tower_http::trace::TraceLayer;
use worldline_ops::{Health, Settings};

use crate::error::ApiError;
use crate::routes::Resource;

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// A pool of the read-only database role.
    pub pool: PgPool,
}

impl AppState {
    /// State over an existing pool (tests, or a caller that owns the pool).
    pub fn new(pool: PgPool) -> AppState {
        AppState { pool }
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

/// A per-resource hook: wraps the routes of one projector's read model. This is
/// where layers that need to know the projector go (read-your-writes waits, lag
/// headers); [`app`] uses the identity.
pub type ResourceHook<'a> = &'a dyn Fn(&'static str, Router<AppState>) -> Router<AppState>;

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
    let pool = connect(settings).await?;
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
    let hook = |projector, routes| guards.wrap(projector, routes);
    let app = app_with_shutdown(AppState::new(pool), health, &hook, shutdown);
    Ok(app.layer(Extension(guard)))
}

/// The shared `LISTEN worldline_progress` task over every resource's projector.
pub fn start_progress(
    pool: PgPool,
    settings: &Settings,
    stop: CancellationToken,
) -> consistency::Progress {
    let projectors: Vec<&'static str> = routes::resources().iter().map(|r| r.projector).collect();
    consistency::Progress::start(pool, &projectors, &settings.topics.prefix, stop)
}

/// The API with every `/v1` route behind `guards` (auth, limits,
/// read-your-writes): what [`build`] serves.
pub fn secured_app(state: AppState, health: Health, guards: &guard::Guards) -> Router {
    app_with(state, health, &|projector, routes| {
        guards.wrap(projector, routes)
    })
}

/// Ties the readiness watcher's life to the router's: the router's layers hold
/// the only strong references, so dropping the last router cancels the watcher.
#[derive(Debug, Clone)]
struct WatchGuard(#[allow(dead_code)] Arc<DropGuard>);

async fn connect(settings: &Settings) -> Result<PgPool, BuildError> {
    let options = PgConnectOptions::from_str(settings.reader_url())
        .map_err(BuildError::DatabaseUrl)?
        .application_name("worldline-query-api")
        .options([
            // Filters are written `($n IS NULL OR col = $n)`; a custom plan sees
            // the actual values and drops the dead branches, so a filtered list
            // uses its index instead of a generic plan's scan.
            ("plan_cache_mode", "force_custom_plan"),
            // A runaway query ends as a 503 instead of holding a connection.
            ("statement_timeout", "5000"),
        ]);
    PgPoolOptions::new()
        .max_connections(settings.database.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(BuildError::Connect)
}

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
    let mut api = Router::new();
    let mut paths = utoipa::openapi::OpenApi::default();
    for Resource { projector, router } in routes::resources() {
        let (routes, resource_paths) = router.split_for_parts();
        paths.merge(resource_paths);
        api = api.merge(hook(projector, routes));
    }
    let (stream_routes, stream_paths) = stream::router().split_for_parts();
    paths.merge(stream_paths);
    api = api.merge(hook(stream::PROJECTOR, stream_routes).layer(Extension(streams)));
    let doc = docs::document(paths);
    let api = api.route_layer(middleware::from_fn_with_state(
        extract::KnownQueryParameters::from_document(&doc),
        extract::reject_unknown_query_parameters,
    ));
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
