//! The HTTP ingest gateway: `POST /v1/worlds/{world}/events`, for game servers
//! in any language.
//!
//! # Request
//! - `Authorization: Bearer <token>` with the `ingest` scope, for this world
//!   (see [`worldline_ops::auth`]): 401 / 403 / 404 otherwise.
//! - `Content-Type: application/json`: one event or `{"events": [...]}` in the
//!   shape documented in [`json`]; or `application/x-protobuf` (also
//!   `application/protobuf`): one `worldline.v1.Envelope`, or a
//!   `worldline.v1.EnvelopeBatch` with `; proto=worldline.v1.EnvelopeBatch`
//!   (see [`protobuf`]). Anything else: 415.
//! - Optional `Idempotency-Key`: events without an `event_id` get ids derived
//!   from it, so a retried request appends the same ids (see [`ids`]).
//!
//! # Validation
//! The whole request is checked before anything is appended; one bad event
//! refuses the batch and nothing reaches Kafka. Problems are answered as
//! `application/problem+json` (see [`problem`]): malformed body 400, unknown
//! type / missing field / bad value / world mismatch / empty batch 422, body
//! over `gateway.max_body_bytes` 413 (the body is never buffered past the
//! limit), more than `gateway.max_batch_events` events 413 (the request is
//! valid but larger than accepted at once; the fix is to split it, as for an
//! oversize body).
//!
//! # Answer
//! 200 only when Kafka acknowledged every event (`acks=all`):
//! ```json
//! {"events": [{"index": 0, "event_id": "…", "type": "worldline.v1.WeatherChanged",
//!              "topic": "worldline.weather.v1", "partition": 3, "offset": 41}],
//!  "consistency_token": "wl1.…"}
//! ```
//! The consistency token ([`worldline_ops::consistency`]) covers the batch. When
//! Kafka does not acknowledge every event within `gateway.append_timeout_ms`:
//! 503 with `Retry-After`, a problem document whose `events` say which were
//! appended, and the ids to retry with.

mod http_metrics;
pub mod ids;
mod ingest;
pub mod json;
pub mod problem;
pub mod protobuf;
pub mod settle;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use worldline_ops::Settings;
use worldline_ops::auth::{self, AuthConfigError, Authenticator, Scope};
use worldline_ops::config::GatewaySettings;

use crate::appender::{AppendError, Appender, AppenderOptions};

/// The route of the ingest endpoint.
pub const EVENTS_ROUTE: &str = "/v1/worlds/{world}/events";

/// What the gateway's handlers share.
#[derive(Debug, Clone)]
pub struct GatewayState {
    /// The append path; its delivery timeout should be
    /// `gateway.append_timeout_ms` (see [`appender_options`]).
    pub appender: Appender,
    /// Who may ingest.
    pub authenticator: Arc<Authenticator>,
    /// Limits and timeouts.
    pub settings: GatewaySettings,
}

/// Why the gateway could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A configured token is unusable.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// The Kafka producer could not be created.
    #[error(transparent)]
    Appender(#[from] AppendError),
}

/// The appender options the gateway needs: the configured topic prefix, source
/// `gateway`, and a delivery timeout of `gateway.append_timeout_ms` so Kafka
/// trouble turns into a 503 in bounded time.
pub fn appender_options(settings: &Settings) -> AppenderOptions {
    AppenderOptions {
        topic_prefix: settings.topics.prefix.clone(),
        delivery_timeout: Duration::from_millis(settings.gateway.append_timeout_ms),
        source: "gateway".to_owned(),
    }
}

impl GatewayState {
    /// Builds the appender and the authenticator from the settings.
    pub fn from_settings(settings: &Settings) -> Result<GatewayState, GatewayError> {
        let authenticator = Authenticator::from_settings(&settings.auth)?;
        let appender = Appender::new(&settings.kafka, appender_options(settings))?;
        Ok(GatewayState {
            appender,
            authenticator: Arc::new(authenticator),
            settings: settings.gateway.clone(),
        })
    }
}

/// The gateway's routes, behind `ingest`-scoped bearer auth and recording
/// `worldline_http_requests_total{route,status}` and
/// `worldline_http_request_duration_seconds{route}`. Merge it with
/// [`worldline_ops::health::router`] (and any other router) and serve it.
pub fn router(state: GatewayState) -> Router {
    let authenticator = Arc::clone(&state.authenticator);
    let routes = Router::new()
        .route(EVENTS_ROUTE, post(ingest::append_events))
        .route_layer(DefaultBodyLimit::max(state.settings.max_body_bytes));
    auth::require(routes, authenticator, Scope::Ingest)
        .with_state(Arc::new(state))
        .layer(axum::middleware::from_fn(http_metrics::record))
}
