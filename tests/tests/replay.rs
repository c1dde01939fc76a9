//! Zero-downtime rebuilds on the real stack: queries keep answering with full
//! data throughout, the swapped-in schema equals a rebuild, and the live projector
//! carries on in it without losing or doubling anything.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::registry;
use worldline_projectors::replay::Rebuild;
use worldline_tests::TestEnv;
use worldline_tests::workload::Workload;

fn appender(env: &TestEnv) -> Appender {
    Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            ..AppenderOptions::default()
        },
    )
    .unwrap()
}

async fn wait_caught_up(env: &TestEnv) {
    for projector in registry::all() {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !env.caught_up(projector.name(), projector.as_ref()).await {
            assert!(
                std::time::Instant::now() < deadline,
                "{} behind",
                projector.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_live_traffic_when_a_read_model_is_replayed_then_queries_never_see_less_and_nothing_is_doubled()
 {
    let env = TestEnv::new(4).await;
    let appender = appender(&env);
    let workload = Arc::new(Mutex::new(Workload::new(8, 21)));
    let mut appended: HashMap<String, i64> = HashMap::new();
    let count = |appended: &mut HashMap<String, i64>, batch: &[worldline_schemas::pb::Envelope]| {
        for e in batch {
            *appended.entry(e.world_id.clone()).or_default() += 1;
        }
    };
    let first = {
        let mut w = workload.lock().unwrap();
        let mut batch = w.creations();
        batch.extend(w.next_batch(4000));
        batch
    };
    for r in appender.append_batch(&first).await {
        r.unwrap();
    }
    count(&mut appended, &first);
    let live: Vec<_> = registry::all()
        .into_iter()
        .map(|p| env.start_projector(p))
        .collect();
    wait_caught_up(&env).await;

    // Queries through their own pool (prepared statements cached per connection),
    // every few milliseconds, for the whole rebuild: they must never fail and
    // never see fewer records or clocks than before.
    let readers = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&env.settings.database.url)
        .await
        .unwrap();
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop_reading.clone();
        tokio::spawn(async move {
            let (mut records_seen, mut clocks_seen, mut queries) = (0i64, 0i64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let records: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(SUM(records_applied), 0)::bigint FROM worlds.worlds",
                )
                .fetch_one(&readers)
                .await
                .expect("worlds query failed during the rebuild");
                let clocks: i64 = sqlx::query_scalar("SELECT count(*) FROM clock.world_clock")
                    .fetch_one(&readers)
                    .await
                    .expect("clock query failed during the rebuild");
                assert!(
                    records >= records_seen,
                    "records went back: {records} < {records_seen}"
                );
                assert!(
                    clocks >= clocks_seen,
                    "clocks went back: {clocks} < {clocks_seen}"
                );
                assert!(records > 0 && clocks > 0, "an empty read model was visible");
                (records_seen, clocks_seen) = (records, clocks);
                queries += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            queries
        })
    };
    let writer = {
        let (appender, workload) = (appender.clone(), workload.clone());
        tokio::spawn(async move {
            let mut appended: HashMap<String, i64> = HashMap::new();
            for _ in 0..40 {
                let batch = workload.lock().unwrap().next_batch(100);
                for r in appender.append_batch(&batch).await {
                    r.unwrap();
                }
                for e in &batch {
                    *appended.entry(e.world_id.clone()).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            appended
        })
    };

    let shutdown = CancellationToken::new();
    for name in ["worlds", "clock"] {
        let projector = registry::by_name(name).unwrap();
        let rebuild = Rebuild::new(&env.settings, env.pool.clone(), projector, "shadow").unwrap();
        rebuild.replay(&|_| {}, &shutdown).await.unwrap();
    }

    for (world, n) in writer.await.unwrap() {
        *appended.entry(world).or_default() += n;
    }
    wait_caught_up(&env).await;
    stop_reading.store(true, Ordering::SeqCst);
    let queries = reader.await.unwrap();
    assert!(
        queries > 100,
        "the reader ran throughout ({queries} queries)"
    );

    let schemas: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'worlds%' OR nspname LIKE 'clock%' ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        schemas,
        ["clock", "worlds"],
        "shadow renamed in, old schema dropped"
    );
    let applied: Vec<(String, i64)> =
        sqlx::query_as("SELECT world_id, records_applied FROM worlds.worlds")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        applied.into_iter().collect::<HashMap<_, _>>(),
        appended,
        "the live projector carried on in the swapped schema: each record once"
    );
    for projector in registry::all() {
        let differing = env.rebuild_differences(projector.clone()).await;
        assert!(differing.is_empty(), "{}: {differing:?}", projector.name());
    }
    for running in live {
        running.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_no_difference_for_a_correct_read_model_and_names_a_tampered_table() {
    let env = TestEnv::new(2).await;
    let appender = appender(&env);
    let mut workload = Workload::new(4, 5);
    let mut batch = workload.creations();
    batch.extend(workload.next_batch(1500));
    for r in appender.append_batch(&batch).await {
        r.unwrap();
    }
    let live: Vec<_> = registry::all()
        .into_iter()
        .map(|p| env.start_projector(p))
        .collect();
    wait_caught_up(&env).await;
    let shutdown = CancellationToken::new();
    let story = registry::by_name("story").unwrap();
    let rebuild = Rebuild::new(&env.settings, env.pool.clone(), story, "verify").unwrap();
    let report = rebuild.verify(&|_| {}, &shutdown).await.unwrap();
    assert!(report.differing.is_empty(), "{:?}", report.differing);
    assert!(report.live["choices"].rows > 0);

    sqlx::query("UPDATE story.node_tallies SET times = times + 1 WHERE ctid = (SELECT ctid FROM story.node_tallies LIMIT 1)")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = rebuild.verify(&|_| {}, &shutdown).await.unwrap();
    assert_eq!(report.differing, ["node_tallies"]);
    let leftover: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'story_verify')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(!leftover, "the scratch schema is dropped");
    for running in live {
        running.stop().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_projector_is_built_from_the_whole_history_by_replay_then_runs_live() {
    let env = TestEnv::new(2).await;
    let appender = appender(&env);
    let mut workload = Workload::new(3, 17);
    let history = workload.next_batch(2000);
    for r in appender.append_batch(&history).await {
        r.unwrap();
    }
    // The read model did not exist when these events were appended.
    let projector = registry::by_name("player_activity").unwrap();
    let rebuild =
        Rebuild::new(&env.settings, env.pool.clone(), projector.clone(), "shadow").unwrap();
    rebuild
        .replay(&|_| {}, &CancellationToken::new())
        .await
        .unwrap();

    let expected = |events: &[worldline_schemas::pb::Envelope]| {
        let mut ids = std::collections::HashSet::new();
        events
            .iter()
            .filter(|e| {
                matches!(
                    e.body,
                    Some(worldline_schemas::pb::envelope::Body::StoryChoiceMade(_))
                )
            })
            .filter(|e| ids.insert(e.event_id.clone()))
            .count() as i64
    };
    let counted = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(choices), 0)::bigint FROM player_activity.player_activity",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        counted().await,
        expected(&history),
        "built from the whole history"
    );

    let live = env.start_projector(projector.clone());
    let more = workload.next_batch(500);
    for r in appender.append_batch(&more).await {
        r.unwrap();
    }
    let all: Vec<_> = history.iter().chain(more.iter()).cloned().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counted().await != expected(&all) {
        assert!(
            std::time::Instant::now() < deadline,
            "live projector did not continue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live.stop().await;
    let differing = env.rebuild_differences(projector).await;
    assert!(differing.is_empty(), "{differing:?}");
    env.cleanup().await;
}
