//! PostgreSQL unreachable for 15 s under load: the projector process stays up
//! (`/livez` 200), reports not-ready on `/readyz`, keeps its lag gauges moving,
//! and resumes without losing or doubling anything.
//!
//! The outage is a cut TCP proxy between the process and the server: stopping
//! the shared cluster would take every other test's database away too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use worldline_tests::proxy::Proxy;
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, eventually};

use crate::support::{self, ONE_AT_A_TIME, Projector};

const OUTAGE: Duration = Duration::from_secs(15);

fn host_port(url: &str) -> std::net::SocketAddr {
    let after_at = url.rsplit('@').next().unwrap();
    let host_port = after_at.split('/').next().unwrap();
    host_port.replace("localhost", "127.0.0.1").parse().unwrap()
}

type Lag = BTreeMap<(String, String, i32), (f64, f64)>;

/// `(lag_records, lag_seconds)` per partition, from the process's `/metrics`.
async fn lag(projector: &Projector) -> Lag {
    let metrics = projector.metrics().await;
    let seconds = metrics.per_partition("worldline_projector_lag_seconds");
    metrics
        .per_partition("worldline_projector_lag_records")
        .into_iter()
        .map(|(key, records)| {
            let s = seconds.get(&key).copied().unwrap_or_default();
            (key, (records, s))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_postgres_down_for_fifteen_seconds_then_projectors_wait_report_not_ready_and_resume()
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new(4).await;
    let upstream = host_port(&env.settings.database.url);
    let proxy = Proxy::start(upstream).await;
    let through_proxy = env
        .settings
        .database
        .url
        .replace(&upstream.to_string(), &proxy.addr.to_string());

    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 10)));
    let mut appended = support::append_now(&appender, &workload, 1000).await;
    let mut projector = Projector::spawn_with_database(&env, "outage", &through_proxy);
    projector.wait_until_serving().await;
    eventually(
        Duration::from_secs(60),
        "the projector to be ready",
        || async { (projector.status("/readyz").await == Some(200)).then_some(()) },
    )
    .await;
    let stop_appending = CancellationToken::new();
    let background = support::append_until(
        appender.clone(),
        workload.clone(),
        100,
        Duration::from_millis(400),
        stop_appending.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.cut();
    let down_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "/readyz to report not-ready",
        || async { (projector.status("/readyz").await == Some(503)).then_some(()) },
    )
    .await;
    let readiness = projector.readiness().await;
    assert!(
        readiness.contains("postgres: not ready"),
        "/readyz names the database: {readiness}"
    );
    assert_eq!(projector.status("/livez").await, Some(200));

    // Appends go on while batches are stuck in retry: every owned partition's
    // lag must keep growing in records (the log end moves) and in seconds (the
    // oldest unapplied record ages), not freeze at its last value.
    let before = eventually(
        Duration::from_secs(10),
        "a partition to lag during the outage",
        || async {
            let lag = lag(&projector).await;
            lag.values()
                .any(|(records, _)| *records > 0.0)
                .then_some(lag)
        },
    )
    .await;
    let grown = eventually(
        OUTAGE,
        "the lag gauges to grow during the outage",
        || async {
            let now = lag(&projector).await;
            now.iter()
                .find(|(key, (records, seconds))| {
                    before
                        .get(*key)
                        .is_some_and(|(r0, s0)| *r0 > 0.0 && records > r0 && seconds > s0)
                })
                .map(|(key, value)| (key.clone(), before[key], *value))
        },
    )
    .await;
    println!(
        "lag of {:?} grew from {:?} to {:?} during the outage",
        grown.0, grown.1, grown.2
    );
    // Still down: the proxy is restored only below.

    while down_at.elapsed() < OUTAGE {
        assert_eq!(
            projector.status("/livez").await,
            Some(200),
            "alive throughout"
        );
        assert_eq!(
            projector.status("/readyz").await,
            Some(503),
            "not ready throughout"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        projector.is_running(),
        "the projector must wait out the outage, not exit"
    );
    proxy.restore();
    eventually(
        Duration::from_secs(60),
        "/readyz to report ready again",
        || async { (projector.status("/readyz").await == Some(200)).then_some(()) },
    )
    .await;

    stop_appending.cancel();
    appended.merge(background.await.unwrap());
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    eventually(
        Duration::from_secs(10),
        "every lag gauge to read 0",
        || async {
            let lag = lag(&projector).await;
            (!lag.is_empty() && lag.values().all(|(r, s)| *r == 0.0 && *s == 0.0)).then_some(())
        },
    )
    .await;
    assert!(projector.is_running(), "never restarted");
    projector.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
