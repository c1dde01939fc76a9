//! SIGKILL at random points, repeatedly; and one of two instances killed for good.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, eventually};

use crate::support::{self, ONE_AT_A_TIME, Projector};

/// Where a kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillPoint {
    /// After a random delay from the start: while starting, migrating, joining
    /// the group, applying, or idle between batches.
    Anywhere,
    /// While a batch's PostgreSQL transaction is open (frozen there first, and
    /// confirmed in `pg_stat_activity`, then killed).
    MidTransaction,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_projector_killed_repeatedly_mid_batch_then_nothing_is_lost_or_doubled() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let seed = support::seed("sigkill");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut env = TestEnv::new(4).await;
    // Small batches: many transactions in flight when the kills land.
    env.settings.projector.batch_max_records = 100;
    let appender = support::appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(12, rng.random())));
    let mut appended = support::append_now(&appender, &workload, 3000).await;

    let stop_appending = CancellationToken::new();
    let background = support::append_until(
        appender.clone(),
        workload.clone(),
        100,
        Duration::from_millis(100),
        stop_appending.clone(),
    );
    let mut kills = vec![KillPoint::Anywhere; 5];
    kills.extend([KillPoint::MidTransaction; 5]);
    kills.shuffle(&mut rng);
    let mut projector = Projector::spawn(&env, "crash");
    let mut killed_mid_transaction = 0;
    for (round, point) in kills.iter().enumerate() {
        match point {
            KillPoint::Anywhere => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
            }
            KillPoint::MidTransaction => {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
                if projector.freeze_mid_transaction(&env, 50).await {
                    killed_mid_transaction += 1;
                } else {
                    println!("round {round}: no open transaction caught; killing anyway");
                }
            }
        }
        println!("round {round}: SIGKILL ({point:?})");
        projector.kill();
        projector = Projector::spawn(&env, "crash");
    }
    assert!(
        killed_mid_transaction > 0,
        "no kill landed inside an open transaction (seed {seed}); log: {}",
        projector.log.display()
    );
    stop_appending.cancel();
    appended.merge(background.await.unwrap());
    support::wait_until_caught_up(&env, Duration::from_secs(180)).await;
    assert!(
        projector.is_running(),
        "the last instance must not have exited"
    );
    projector.stop();
    println!("{killed_mid_transaction} of 5 mid-transaction kills confirmed open");
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
    let every_partition = support::all_partitions(&env);

    let mut first = Projector::spawn(&env, "first");
    first.wait_until_serving().await;
    eventually(
        Duration::from_secs(60),
        "the first instance to own every partition",
        || async { (first.metrics().await.owned_partitions() == every_partition).then_some(()) },
    )
    .await;
    let mut second = Projector::spawn(&env, "second");
    second.wait_until_serving().await;
    // Settled: the instances split the log's partitions, together own each
    // exactly once, and a partition sits with every projector that reads it
    // (one consumer per instance serves all of them).
    let (first_owned, second_before) = eventually(
        Duration::from_secs(60),
        "the two instances to share the projectors' partitions",
        || async {
            let a = first.metrics().await.owned_partitions();
            let second_metrics = second.metrics().await;
            let b = second_metrics.owned_partitions();
            let shared = !a.is_empty()
                && !b.is_empty()
                && a.is_disjoint(&b)
                && a.union(&b).cloned().collect::<BTreeSet<_>>() == every_partition
                && [&a, &b].iter().all(|owned| {
                    owned.iter().all(|(_, topic, partition)| {
                        every_partition
                            .iter()
                            .filter(|(_, t, p)| t == topic && p == partition)
                            .all(|reader| owned.contains(reader))
                    })
                });
            shared.then_some((a, second_metrics))
        },
    )
    .await;
    let second_owned = second_before.owned_partitions();

    let stop_appending = CancellationToken::new();
    let background = support::append_until(
        appender.clone(),
        workload.clone(),
        100,
        Duration::from_millis(100),
        stop_appending.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // What the first instance owns at the moment it dies (read just before).
    let owned_at_kill = first.metrics().await.owned_partitions();
    assert_eq!(
        owned_at_kill, first_owned,
        "no rebalance between settling and the kill"
    );
    first.kill();
    println!(
        "killed an instance owning {} partitions; the survivor owned {}",
        owned_at_kill.len(),
        second_owned.len()
    );

    // The survivor takes over exactly what the dead instance owned.
    let second_after = eventually(
        Duration::from_secs(60),
        "the survivor to own every partition",
        || async {
            let metrics = second.metrics().await;
            (metrics.owned_partitions() == every_partition).then_some(metrics)
        },
    )
    .await;
    let assigned = "worldline_projector_partitions_assigned_total";
    let revoked = "worldline_projector_partitions_revoked_total";
    assert_eq!(
        second_after.sum(assigned) - second_before.sum(assigned),
        owned_at_kill.len() as f64,
        "the survivor was assigned the dead instance's partitions, once each"
    );
    // Cooperative rebalancing: taking over moved nothing away from the survivor.
    assert_eq!(
        second_after.sum(revoked),
        second_before.sum(revoked),
        "the survivor's own partitions were never revoked"
    );
    assert_eq!(second_before.sum(revoked), 0.0, "{second_before:?}");

    stop_appending.cancel();
    appended.merge(background.await.unwrap());
    support::wait_until_caught_up(&env, Duration::from_secs(120)).await;
    assert!(second.is_running(), "the survivor must not have exited");
    for path in ["/livez", "/readyz"] {
        assert_eq!(second.status(path).await, Some(200), "{path}");
    }
    let metrics = second.metrics().await;
    for name in [
        "worldline_projector_events_total",
        "worldline_projector_batch_duration_seconds_bucket",
        "worldline_projector_lag_records",
        "worldline_projector_lag_seconds",
    ] {
        assert!(
            !metrics.samples(name).is_empty(),
            "{name} missing: {metrics:?}"
        );
    }
    // Caught up: every partition's lag drops to zero at the next report.
    eventually(
        Duration::from_secs(10),
        "every lag gauge to read 0",
        || async {
            let metrics = second.metrics().await;
            let records = metrics.per_partition("worldline_projector_lag_records");
            let seconds = metrics.per_partition("worldline_projector_lag_seconds");
            (!records.is_empty() && records.values().chain(seconds.values()).all(|v| *v == 0.0))
                .then_some(())
        },
    )
    .await;
    assert_eq!(second.metrics().await.sum(revoked), 0.0);
    second.stop();
    support::assert_exactly_once(&env, &appended).await;
    env.cleanup().await;
}
