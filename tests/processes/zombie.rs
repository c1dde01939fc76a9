//! An instance frozen (SIGSTOP) with a batch's transaction open, past its
//! session timeout: its partitions move, PostgreSQL ends its idle transaction so
//! the new owner is not stalled, and when it resumes its late commit is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, eventually};

use crate::support::{self, ONE_AT_A_TIME, Projector};

const CONFLICTS: &str = "worldline_projector_offset_conflicts_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_paused_instance_whose_partitions_moved_when_it_resumes_then_nothing_is_doubled() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut env = TestEnv::new(4).await;
    env.settings.projector.batch_max_records = 50;
    env.settings.projector.session_timeout_ms = 6_000;
    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, 9)));
    let mut appended = support::append_now(&appender, &workload, 500).await;
    let every_partition = support::all_partitions(&env);

    let mut zombie = Projector::spawn(&env, "zombie");
    zombie.wait_until_serving().await;
    eventually(
        Duration::from_secs(60),
        "the first instance to own every partition",
        || async { (zombie.metrics().await.owned_partitions() == every_partition).then_some(()) },
    )
    .await;
    let mut survivor = Projector::spawn(&env, "survivor");
    survivor.wait_until_serving().await;
    eventually(
        Duration::from_secs(60),
        "both instances to own partitions",
        || async {
            let (a, b) = (
                zombie.metrics().await.owned_partitions(),
                survivor.metrics().await.owned_partitions(),
            );
            (!a.is_empty() && !b.is_empty() && a.is_disjoint(&b)).then_some(())
        },
    )
    .await;
    let conflicts_before = zombie.metrics().await.sum(CONFLICTS);

    // A burst keeps both instances busy, so a transaction is open to freeze in.
    appended.merge(support::append_more(&appender, &workload, 3000).await);
    let stop_appending = CancellationToken::new();
    let background = support::append_until(
        appender.clone(),
        workload.clone(),
        50,
        Duration::from_millis(200),
        stop_appending.clone(),
    );
    assert!(
        zombie.freeze_mid_transaction(&env, 100).await,
        "could not freeze the instance with a transaction open; log: {}",
        zombie.log.display()
    );

    // Frozen past its session timeout: the group hands everything to the survivor.
    let mut missing = Vec::new();
    for _ in 0..600 {
        let owned = survivor.metrics().await.owned_partitions();
        missing = every_partition.difference(&owned).cloned().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        missing.is_empty(),
        "the survivor never owned {missing:?}; logs: {} {}",
        zombie.log.display(),
        survivor.log.display()
    );
    // The frozen transaction holds row locks the survivor needs; the server ends
    // it (idle_in_transaction_session_timeout), so the survivor is not stalled.
    let mut open: Vec<(i32, String, Option<String>, String)> = Vec::new();
    for _ in 0..600 {
        open = sqlx::query_as(
            "SELECT pid, state, wait_event, left(query, 120) FROM pg_stat_activity
              WHERE application_name = $1 AND xact_start IS NOT NULL",
        )
        .bind(&zombie.application_name)
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if open.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        open.is_empty(),
        "the frozen instance's transactions were never ended: {open:?}; logs: {} {}",
        zombie.log.display(),
        survivor.log.display()
    );
    stop_appending.cancel();
    appended.merge(background.await.unwrap());
    // Everything, including the frozen batch's records, is applied while the
    // zombie is still frozen.
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;

    zombie.signal("CONT");
    // Its batch still expects the offsets it loaded before freezing; the
    // compare-and-set refuses it.
    let conflicts_after = eventually(
        Duration::from_secs(60),
        "the resumed instance's late commit to be refused",
        || async {
            let conflicts = zombie.metrics().await.sum(CONFLICTS);
            (conflicts > conflicts_before).then_some(conflicts)
        },
    )
    .await;
    println!("offset conflicts on the resumed instance: {conflicts_before} -> {conflicts_after}");

    // Both go on working after the zombie rejoins.
    appended.merge(support::append_more(&appender, &workload, 500).await);
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    assert!(zombie.is_running() && survivor.is_running());
    zombie.stop();
    survivor.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
