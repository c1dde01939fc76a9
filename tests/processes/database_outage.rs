//! PostgreSQL unreachable for 15 s under load: the projector stays up, reports
//! not-ready, and resumes without losing or doubling anything.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_projectors::registry;
use worldline_tests::proxy::Proxy;
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, eventually};

use crate::support::{self, ONE_AT_A_TIME};

fn host_port(url: &str) -> std::net::SocketAddr {
    let after_at = url.rsplit('@').next().unwrap();
    let host_port = after_at.split('/').next().unwrap();
    host_port.replace("localhost", "127.0.0.1").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_postgres_down_for_fifteen_seconds_then_projectors_wait_report_not_ready_and_resume()
{
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new(4).await;
    let proxy = Proxy::start(host_port(&env.settings.database.url)).await;
    let through_proxy = env.settings.database.url.replace(
        &host_port(&env.settings.database.url).to_string(),
        &proxy.addr.to_string(),
    );
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&through_proxy)
        .await
        .unwrap();

    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 10)));
    let mut appended = support::append_now(&appender, &workload, 1000).await;
    let health = Health::default();
    let shutdown = CancellationToken::new();
    let settings = env.settings.clone();
    let running = {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            worldline_projectors::run_projectors(&settings, pool, registry::all(), health, shutdown)
                .await
        })
    };
    let background = support::append_in_background(
        appender.clone(),
        workload.clone(),
        50,
        100,
        Duration::from_millis(400),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.cut();
    let down_at = Instant::now();
    eventually(Duration::from_secs(10), "readiness to drop", || {
        let health = health.clone();
        async move { (!health.report().0).then_some(()) }
    })
    .await;
    let (_, checks) = health.report();
    assert!(checks["postgres"].is_err(), "{checks:?}");
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(down_at.elapsed())).await;
    assert!(
        !running.is_finished(),
        "projectors must wait out the outage, not exit"
    );
    proxy.restore();
    eventually(Duration::from_secs(30), "readiness to return", || {
        let health = health.clone();
        async move { health.report().0.then_some(()) }
    })
    .await;

    let more = background.await.unwrap();
    for (world, n) in more.0 {
        *appended.0.entry(world).or_default() += n;
    }
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
