//! An instance paused past its session timeout ("zombie") wakes up after its
//! partitions moved: its late commit must be refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use worldline_tests::TestEnv;
use worldline_tests::workload::Workload;

use crate::support::{self, ONE_AT_A_TIME, Projector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_paused_instance_whose_partitions_moved_when_it_resumes_then_nothing_is_doubled() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut env = TestEnv::new(4).await;
    env.settings.projector.batch_max_records = 50;
    env.settings.projector.session_timeout_ms = 6_000;
    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 9)));
    let mut appended = support::append_now(&appender, &workload, 500).await;

    let mut zombie = Projector::spawn(&env, "zombie");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut survivor = Projector::spawn(&env, "survivor");
    let background = support::append_in_background(
        appender.clone(),
        workload.clone(),
        60,
        50,
        Duration::from_millis(200),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Frozen mid-whatever it was doing, possibly holding an open transaction.
    zombie.signal("STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    zombie.signal("CONT");
    let more = background.await.unwrap();
    for (world, n) in more.0 {
        *appended.0.entry(world).or_default() += n;
    }
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    assert!(zombie.is_running() && survivor.is_running());
    zombie.stop();
    survivor.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
