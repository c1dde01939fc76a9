//! What stands in front of every `/v1` read route in production: bearer-token
//! auth (scope `read`), a per-principal rate limit, a request-time limit, a
//! body-size limit, and the read-your-writes wait with position headers.
//!
//! Layer order, outermost first: time limit → body limit → auth (401/403/404)
//! → rate limit (per authenticated principal) → consistency wait → query
//! parameter check (400, see [`crate::app_with`]) → handler.
//! `/livez`, `/readyz`, `/metrics`, `/openapi.json` and `/docs` are not behind it.
//!
//! A request over the time limit is a 503 problem with `Retry-After: 1`; a
//! request declaring a body over the size limit (`Content-Length`) is a 413
//! problem before anything else reads it, and a body that turns out larger
//! while being read fails the read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::limit::RequestBodyLimitLayer;
use worldline_ops::Settings;
use worldline_ops::auth::{AuthConfigError, Authenticator, Scope, WORLD_PARAM};

use crate::consistency::{self, Progress};
use crate::error::{PROBLEM_JSON, Problem};

/// Everything [`crate::secured_app`] puts in front of the read routes.
#[derive(Debug, Clone)]
pub struct Guards {
    /// Who may read.
    pub authenticator: Arc<Authenticator>,
    /// Requests per principal.
    pub rate_limiter: Arc<RateLimiter>,
    /// Projector progress for read-your-writes and position headers.
    pub progress: Progress,
    /// Longest read-your-writes wait.
    pub read_your_writes_timeout: Duration,
    /// Longest request.
    pub request_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
}

impl Guards {
    /// Guards as `settings` (sections `auth` and `http`) describe them.
    pub fn from_settings(
        settings: &Settings,
        progress: Progress,
    ) -> Result<Guards, AuthConfigError> {
        Ok(Guards {
            authenticator: Arc::new(Authenticator::from_settings(&settings.auth)?),
            rate_limiter: Arc::new(RateLimiter::new(
                settings.auth.rate_limit_per_second,
                settings.auth.rate_limit_burst,
            )),
            progress,
            read_your_writes_timeout: Duration::from_millis(
                settings.http.read_your_writes_timeout_ms,
            ),
            request_timeout: Duration::from_millis(settings.http.request_timeout_ms),
            max_body_bytes: settings.http.max_body_bytes,
        })
    }

    /// Wraps the routes of one resource (served from the read models of
    /// `projectors`) with every guard.
    ///
    /// One middleware runs them all in the documented order: every layer of
    /// its own would clone the inner route and box a future per request.
    pub fn wrap<S>(&self, projectors: &'static [&'static str], routes: Router<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let resource = Arc::new(ResourceGuard {
            authenticator: Arc::clone(&self.authenticator),
            rate_limiter: Arc::clone(&self.rate_limiter),
            wait: consistency::Wait::new(&self.progress, projectors, self.read_your_writes_timeout),
            request_timeout: self.request_timeout,
            max_body_bytes: self.max_body_bytes,
        });
        routes
            .route_layer(RequestBodyLimitLayer::new(self.max_body_bytes))
            .route_layer(axum::middleware::from_fn_with_state(resource, guard))
    }
}

/// What [`guard`] needs for one resource's routes.
#[derive(Debug)]
struct ResourceGuard {
    authenticator: Arc<Authenticator>,
    rate_limiter: Arc<RateLimiter>,
    wait: consistency::Wait,
    request_timeout: Duration,
    max_body_bytes: usize,
}

/// Time limit → declared body size → auth → rate limit → read-your-writes
/// wait; the body limit itself (for bodies without a `Content-Length`) is the
/// `RequestBodyLimitLayer` inside.
async fn guard(
    State(resource): State<Arc<ResourceGuard>>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let limit = resource.request_timeout;
    match tokio::time::timeout(limit, admit(&resource, params, request, next)).await {
        Ok(response) => response,
        Err(_) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "Request timed out",
            format!("the request took longer than {} ms", limit.as_millis()),
            1,
        ),
    }
}

async fn admit(
    resource: &ResourceGuard,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    if declared_length(request.headers()).is_some_and(|n| n > resource.max_body_bytes as u64) {
        return too_large(resource.max_body_bytes);
    }
    let world = params.as_ref().ok().and_then(|params| {
        params
            .iter()
            .find(|(key, _)| *key == WORLD_PARAM)
            .map(|(_, value)| value)
    });
    let principal = match resource
        .authenticator
        .check(request.headers(), Scope::Read, world)
    {
        Ok(principal) => principal,
        Err(refusal) => {
            tracing::debug!(scope = %Scope::Read, world, %refusal, "request refused");
            return refusal.into_response();
        }
    };
    if let Err(wait) = resource.rate_limiter.admit(&principal.name) {
        return too_many(&principal.name, wait);
    }
    request.extensions_mut().insert(principal);
    resource.wait.answer(request, next).await
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            updated: now,
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant, rate: f64, burst: u32) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(Duration::from_secs_f64(
            (missing / rate.max(f64::MIN_POSITIVE)).min(3600.0),
        ))
    }
}

/// One [`Bucket`] per principal name.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: u32,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Past this many principals, buckets that have refilled are forgotten (a full
/// bucket is what a new one would be, so forgetting it changes nothing).
const MAX_TRACKED_PRINCIPALS: usize = 10_000;

impl RateLimiter {
    /// `rate` requests per second with bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a request of `principal` now, or says when to retry.
    pub fn admit(&self, principal: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(principal) {
            return bucket.take(now, self.rate, self.burst);
        }
        if buckets.len() >= MAX_TRACKED_PRINCIPALS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, bucket| {
                let mut probe = *bucket;
                probe.take(now, rate, burst).is_ok() && probe.tokens + 1.0 < f64::from(burst)
            });
        }
        buckets
            .entry(principal.to_owned())
            .or_insert_with(|| Bucket::full(self.burst, now))
            .take(now, self.rate, self.burst)
    }
}

fn too_many(name: &str, wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    problem(
        StatusCode::TOO_MANY_REQUESTS,
        "too-many-requests",
        "Too many requests",
        format!("token {name:?} is over its request rate; retry in {seconds} s"),
        seconds.max(1),
    )
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn too_large(max_bytes: usize) -> Response {
    let status = StatusCode::PAYLOAD_TOO_LARGE;
    let body = Problem {
        kind: "https://worldline.dev/problems/payload-too-large".to_owned(),
        title: "Payload too large".to_owned(),
        status: status.as_u16(),
        detail: format!("the request body is larger than {max_bytes} bytes"),
        parameter: None,
    };
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: String,
    retry_after: u64,
) -> Response {
    let body = Problem {
        kind: format!("https://worldline.dev/problems/{kind}"),
        title: title.to_owned(),
        status: status.as_u16(),
        detail,
        parameter: None,
    };
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_full_bucket_then_burst_requests_pass_and_the_next_waits() {
        let start = Instant::now();
        let mut bucket = Bucket::full(3, start);
        for _ in 0..3 {
            assert!(bucket.take(start, 2.0, 3).is_ok());
        }
        let wait = bucket.take(start, 2.0, 3).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
    }

    #[test]
    fn given_time_passing_then_the_bucket_refills_up_to_the_burst() {
        let start = Instant::now();
        let mut bucket = Bucket::full(2, start);
        assert!(bucket.take(start, 1.0, 2).is_ok());
        assert!(bucket.take(start, 1.0, 2).is_ok());
        let later = start + Duration::from_secs(60);
        assert!(bucket.take(later, 1.0, 2).is_ok());
        assert!(bucket.take(later, 1.0, 2).is_ok());
        assert!(bucket.take(later, 1.0, 2).is_err());
    }

    #[test]
    fn given_a_declared_body_over_the_limit_then_a_413_problem() {
        let mut headers = HeaderMap::new();
        assert_eq!(declared_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2049"));
        assert_eq!(declared_length(&headers), Some(2049));
        let response = too_large(2048);
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }

    #[test]
    fn given_two_principals_then_each_has_its_own_bucket() {
        let limiter = RateLimiter::new(0.001, 1);
        assert!(limiter.admit("a").is_ok());
        assert!(limiter.admit("a").is_err());
        assert!(limiter.admit("b").is_ok());
    }
}
