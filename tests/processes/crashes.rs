//! SIGKILL at random points, repeatedly; and one of two instances killed for good.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use worldline_tests::TestEnv;
use worldline_tests::workload::Workload;

use crate::support::{self, ONE_AT_A_TIME, Projector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_projector_killed_repeatedly_mid_batch_then_nothing_is_lost_or_doubled() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut env = TestEnv::new(4).await;
    // Small batches: many transactions in flight when the kills land.
    env.settings.projector.batch_max_records = 100;
    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 7)));
    let mut appended = support::append_now(&appender, &workload, 3000).await;

    let mut projector = Projector::spawn(&env, "crash");
    let background = support::append_in_background(
        appender.clone(),
        workload.clone(),
        30,
        200,
        Duration::from_millis(100),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        projector.kill();
        projector = Projector::spawn(&env, "crash");
    }
    let more = background.await.unwrap();
    for (world, n) in more.0 {
        *appended.0.entry(world).or_default() += n;
    }
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    projector.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_two_instances_when_one_is_killed_then_the_other_takes_over() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut env = TestEnv::new(4).await;
    env.settings.projector.batch_max_records = 100;
    // The broker's minimum; the survivor takes over once the dead one's session ends.
    env.settings.projector.session_timeout_ms = 6_000;
    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 8)));
    let mut appended = support::append_now(&appender, &workload, 1000).await;

    let mut first = Projector::spawn(&env, "first");
    let (mut second, ops_port) = Projector::spawn_with_ops_port(&env, "second");
    let background = support::append_in_background(
        appender.clone(),
        workload.clone(),
        40,
        100,
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.kill();
    let more = background.await.unwrap();
    for (world, n) in more.0 {
        *appended.0.entry(world).or_default() += n;
    }
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    assert!(second.is_running(), "the survivor must not have exited");
    let ops = format!("http://127.0.0.1:{ops_port}");
    let client = reqwest::Client::new();
    for path in ["/livez", "/readyz"] {
        let status = client
            .get(format!("{ops}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    let metrics = client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "worldline_projector_events_total{projector=\"worlds\",result=\"applied\"}",
        "worldline_projector_batch_duration_seconds_bucket",
        "worldline_projector_lag_records{",
        "worldline_projector_lag_seconds{",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    // Caught up: every partition's lag is zero (the gauge refreshes every 500 ms).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let metrics = client
        .get(format!("{ops}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lagging: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("worldline_projector_lag_records{") && !l.ends_with(" 0"))
        .collect();
    assert!(lagging.is_empty(), "{lagging:?}");
    second.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
