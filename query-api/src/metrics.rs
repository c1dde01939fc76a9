//! Request count and latency per route.
//!
//! Labelled by the matched route *template* (`/v1/worlds/{world}/clock`), never
//! the raw path: raw paths carry world and player ids, and one label value per
//! id would grow the metric without bound.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use metrics::SharedString;

/// Counter of answered requests, labelled `route`, `method`, `status`.
pub const REQUESTS_TOTAL: &str = "worldline_http_requests_total";

/// Histogram of request durations in seconds, labelled `route`.
pub const REQUEST_DURATION: &str = "worldline_http_request_duration_seconds";

/// The `route` label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Middleware recording [`REQUESTS_TOTAL`] and [`REQUEST_DURATION`].
pub async fn track(request: Request, next: Next) -> Response {
    // One allocation for the route label, shared by both metrics; the method
    // and the usual statuses are static strings.
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = status_label(response.status());
    metrics::counter!(REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// The status code as a label value, without formatting the common ones.
fn status_label(status: StatusCode) -> SharedString {
    let common = match status.as_u16() {
        200 => "200",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => return SharedString::from_owned(status.as_u16().to_string()),
    };
    SharedString::const_str(common)
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

fn route_label(matched: Option<&MatchedPath>) -> SharedString {
    match matched {
        Some(matched) => SharedString::from(Arc::<str>::from(matched.as_str())),
        None => SharedString::const_str(UNMATCHED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_no_matched_route_then_one_shared_label() {
        assert_eq!(&*route_label(None), UNMATCHED);
    }

    #[test]
    fn given_a_made_up_method_then_one_shared_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }

    #[test]
    fn given_any_status_then_its_code_is_the_label() {
        assert_eq!(&*status_label(StatusCode::OK), "200");
        assert_eq!(&*status_label(StatusCode::IM_A_TEAPOT), "418");
    }
}
