//! Request count and latency per route.
//!
//! Labelled by the matched route *template* (`/v1/worlds/{world}/clock`), never
//! the raw path: raw paths carry world and player ids, and one label value per
//! id would grow the metric without bound.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

/// Counter of answered requests, labelled `route`, `method`, `status`.
pub const REQUESTS_TOTAL: &str = "worldline_http_requests_total";

/// Histogram of request durations in seconds, labelled `route`.
pub const REQUEST_DURATION: &str = "worldline_http_request_duration_seconds";

/// The `route` label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Middleware recording [`REQUESTS_TOTAL`] and [`REQUEST_DURATION`].
pub async fn track(request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method()).to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// Standard methods by name; anything else (clients may send any token) as
/// `other`, so the label set stays bounded.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

fn route_label(matched: Option<&MatchedPath>) -> String {
    matched.map_or_else(|| UNMATCHED.to_owned(), |m| m.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_matched_route_then_one_shared_label() {
        assert_eq!(route_label(None), UNMATCHED);
    }

    #[test]
    fn given_a_made_up_method_then_one_shared_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
