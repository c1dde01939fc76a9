//! The web page at `/`: one self-contained HTML file (inline CSS and plain
//! JavaScript, no build step, nothing fetched from elsewhere) that lists the
//! worlds and shows the selected one's clock and weather live over the event
//! stream, its story choices and per-model inference statistics, and every
//! projector's position, lag and dead letters from `GET /v1/projectors`
//! (refreshed every few seconds; it works whether or not projectors run in
//! the serving process).
//!
//! The page reads `?world=` (the world to open) and `?token=` (a bearer token
//! sent as `Authorization` on every API request, for servers with auth; the
//! page keeps it for the tab in `sessionStorage` and removes it from the
//! address bar). It reads the event stream with `fetch` rather than
//! `EventSource` because only `fetch` can send an `Authorization` header.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

/// The page, embedded at compile time.
pub const INDEX_HTML: &str = include_str!("index.html");

/// Routes `/` and `/index.html`.
pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
}

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is inline or same-origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}
