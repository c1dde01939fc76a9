//! Request count and latency per route, for the gateway's router.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Records `worldline_http_requests_total{route,status}` and
/// `worldline_http_request_duration_seconds{route}`. The route is the matched
/// pattern (`/v1/worlds/{world}/events`), never the raw path, so world ids do
/// not multiply the series.
pub(super) async fn record(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::histogram!("worldline_http_request_duration_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        "worldline_http_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}
