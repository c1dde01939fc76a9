//! What stands in front of every `/v1` read route in production: bearer-token
//! auth (scope `read`), a per-principal rate limit, a request-time limit, a
//! body-size limit, and the read-your-writes wait with position headers.
//!
//! Layer order, outermost first: time limit → body limit → auth (401/403/404)
//! → rate limit (per authenticated principal) → consistency wait → handler.
//! `/livez`, `/readyz`, `/metrics`, `/openapi.json` and `/docs` are not behind it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::limit::RequestBodyLimitLayer;
use worldline_ops::Settings;
use worldline_ops::auth::{AuthConfigError, Authenticator, Principal, Scope};

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

    /// Wraps one projector's routes with every guard.
    pub fn wrap<S>(&self, projector: &'static str, routes: Router<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let routes = consistency::wrap(
            routes,
            self.progress.clone(),
            projector,
            self.read_your_writes_timeout,
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&self.rate_limiter),
            rate_limit,
        ));
        worldline_ops::auth::require(routes, Arc::clone(&self.authenticator), Scope::Read)
            .route_layer(RequestBodyLimitLayer::new(self.max_body_bytes))
            .route_layer(axum::middleware::from_fn_with_state(
                self.request_timeout,
                time_limit,
            ))
    }
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
        if buckets.len() >= MAX_TRACKED_PRINCIPALS && !buckets.contains_key(principal) {
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

async fn rate_limit(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let name = request
        .extensions()
        .get::<Principal>()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    match limiter.admit(&name) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            problem(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "Too many requests",
                format!("token {name:?} is over its request rate; retry in {seconds} s"),
                seconds.max(1),
            )
        }
    }
}

async fn time_limit(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
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
    fn given_two_principals_then_each_has_its_own_bucket() {
        let limiter = RateLimiter::new(0.001, 1);
        assert!(limiter.admit("a").is_ok());
        assert!(limiter.admit("a").is_err());
        assert!(limiter.admit("b").is_ok());
    }
}
