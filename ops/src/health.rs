//! `/livez`, `/readyz` and `/metrics`: served by every role.
//!
//! Liveness says only that the process answers; readiness says its dependencies
//! (Kafka, PostgreSQL, caught-up state) are usable right now. A projector whose
//! database is down stays alive, retries, and reports not-ready: restarting it
//! would not help and would hide the real failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Named readiness checks, shared by the parts of a process that own them.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
}

impl Health {
    /// Records the state of one check; an `Err` carries why it is not ready.
    pub fn set(&self, check: &str, state: Result<(), String>) {
        if let Ok(mut checks) = self.checks.lock() {
            checks.insert(check.to_owned(), state);
        }
    }

    /// Ready when at least one check is registered and all pass.
    pub fn report(&self) -> (bool, BTreeMap<String, Result<(), String>>) {
        let checks = self.checks.lock().map(|c| c.clone()).unwrap_or_default();
        let ready = !checks.is_empty() && checks.values().all(Result::is_ok);
        (ready, checks)
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Explicit buckets make these real histograms (without them the
            // exporter renders summaries, which cannot be aggregated across replicas).
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_duration_seconds".to_owned()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_lag_seconds".to_owned()),
                        &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0],
                    )
                });
            match builder.map(PrometheusBuilder::install_recorder) {
                Ok(Ok(handle)) => {
                    let upkeep = handle.clone();
                    std::thread::Builder::new()
                        .name("metrics-upkeep".to_owned())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        })
                        .ok();
                    handle
                }
                // Another recorder is already installed (only possible when a
                // test harness installs its own): render an empty registry.
                _ => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Routes `/livez`, `/readyz` and `/metrics`, to be merged into a role's router.
pub fn router(health: Health) -> Router {
    let handle = metrics_handle();
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(health)
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        )
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let (ready, checks) = health.report();
    let mut body = String::new();
    for (name, state) in &checks {
        match state {
            Ok(()) => body.push_str(&format!("{name}: ok\n")),
            Err(why) => body.push_str(&format!("{name}: not ready: {why}\n")),
        }
    }
    if checks.is_empty() {
        body.push_str("starting\n");
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// Serves `router` on `listen` until `shutdown` fires; returns the bound address
/// at once (useful when `listen` has port 0) and the server's task.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_registered_check_passes() {
        let health = Health::default();
        assert!(!health.report().0, "no checks yet means still starting");
        health.set("kafka", Ok(()));
        health.set("postgres", Err("connection refused".to_owned()));
        assert!(!health.report().0);
        health.set("postgres", Ok(()));
        assert!(health.report().0);
    }
}
