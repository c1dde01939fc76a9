//! Zero-downtime rebuilds on the real stack: queries keep answering with full
//! data throughout, the swapped-in schema equals a rebuild, and the live projector
//! carries on in it without losing or doubling anything.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use worldline_projectors::registry;
use worldline_projectors::replay::{Progress, Rebuild, ReplayError, replay_together};
use worldline_tests::api::{READER_ROLE, Server, read_token, reader_url};
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, pipeline};

const TOKEN: &str = "replay-reader";

/// Stored next offsets of `schema`, summed (0 when it has none or does not exist).
async fn stored_total(env: &TestEnv, schema: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM {schema}.projector_offsets"
    )))
    .fetch_one(&env.pool)
    .await
    .unwrap_or(0)
}

async fn schema_exists(env: &TestEnv, schema: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Every index and key of `schema`, as (table, name, definition without the
/// schema name): a rebuilt schema must have all of a migrated one's.
async fn indexes(env: &TestEnv, schema: &str) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT tablename::text, indexname::text, replace(indexdef, $1 || '.', '')
           FROM pg_indexes WHERE schemaname = $1 ORDER BY 1, 2",
    )
    .bind(schema)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// The `worldline` binary of this workspace, built if needed (this crate's
/// tests cannot depend on the binary's package).
fn worldline_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(["build", "--quiet", "-p", "worldline", "--bin", "worldline"])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success(), "building the worldline binary");
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("debug")
        .join("worldline")
}

/// `done/target` of the last progress line `worldline replay` printed to stderr.
fn last_progress(stderr: &str) -> Option<(i64, i64)> {
    let line = stderr.rsplit('\r').find(|l| l.contains(" records ("))?;
    let (_, counts) = line.split_once(": ")?;
    let (done, rest) = counts.split_once('/')?;
    let target = rest.split_whitespace().next()?;
    Some((done.trim().parse().ok()?, target.parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_live_traffic_when_a_read_model_is_replayed_then_queries_never_see_less_and_nothing_is_doubled()
 {
    let env = TestEnv::new(4).await;
    let appender = env.appender();
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
    pipeline::append(&appender, &first).await;
    count(&mut appended, &first);
    let live = env.start_all_projectors();
    env.wait_all_caught_up().await;

    // The query API on the read-only role, granted what `worldline migrate`
    // grants it on the live schemas; the replay must give the same to the
    // schemas it swaps in.
    for projector in registry::all() {
        let schema = projector.name();
        for statement in [
            format!("GRANT USAGE ON SCHEMA {schema} TO {READER_ROLE}"),
            format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {READER_ROLE}"),
        ] {
            env.execute(&statement).await;
        }
    }
    let mut api_settings = env.settings.clone();
    api_settings.database.reader_url = Some(reader_url(&env.settings.database.url));
    api_settings.auth.tokens = vec![read_token("reader", TOKEN)];
    let server = Server::query_api(&api_settings).await;
    let api_reader = {
        let stop = Arc::new(AtomicBool::new(false));
        let base = server.base.clone();
        (
            stop.clone(),
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let read = |path: &'static str| {
                    let request = http.get(format!("{base}{path}")).bearer_auth(TOKEN);
                    async move {
                        let response = request.send().await.unwrap();
                        let status = response.status();
                        let body: Value = response.json().await.unwrap();
                        assert_eq!(status, StatusCode::OK, "{path} during the rebuild: {body}");
                        body
                    }
                };
                let (mut clock_events_seen, mut tick_seen, mut requests) = (0i64, 0i64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    let world = read("/v1/worlds/w-000").await;
                    let clock_events = world["events"]["clock"].as_i64().unwrap();
                    let clock = read("/v1/worlds/w-000/clock").await;
                    let tick = clock["tick"].as_i64().unwrap();
                    assert!(
                        clock_events >= clock_events_seen && clock_events > 0,
                        "the API saw {clock_events} clock events after {clock_events_seen}"
                    );
                    assert!(
                        tick >= tick_seen && tick > 0,
                        "the API saw tick {tick} after {tick_seen}"
                    );
                    (clock_events_seen, tick_seen) = (clock_events, tick);
                    requests += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                requests
            }),
        )
    };

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
                pipeline::append(&appender, &batch).await;
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
    env.wait_all_caught_up().await;
    stop_reading.store(true, Ordering::SeqCst);
    let queries = reader.await.unwrap();
    assert!(
        queries > 100,
        "the reader ran throughout ({queries} queries)"
    );
    api_reader.0.store(true, Ordering::SeqCst);
    let requests = api_reader.1.await.unwrap();
    assert!(
        requests > 20,
        "the API was queried throughout ({requests} rounds)"
    );
    server.stop();

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
    // The bulk build dropped keys and indexes and made them again at the end.
    for name in ["worlds", "clock"] {
        assert_eq!(
            indexes(&env, name).await,
            indexes(&env, &format!("{name}_rebuild")).await,
            "{name}: every key and index of a migrated schema"
        );
    }
    pipeline::stop_all(live).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_no_difference_for_a_correct_read_model_and_names_a_tampered_table() {
    let env = TestEnv::new(2).await;
    let appender = env.appender();
    let mut workload = Workload::new(4, 5);
    let mut batch = workload.creations();
    batch.extend(workload.next_batch(1500));
    pipeline::append(&appender, &batch).await;
    let live = env.start_all_projectors();
    env.wait_all_caught_up().await;
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
    pipeline::stop_all(live).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_projector_is_built_from_the_whole_history_by_replay_then_runs_live() {
    let env = TestEnv::new(2).await;
    let appender = env.appender();
    let mut workload = Workload::new(3, 17);
    let history = workload.next_batch(2000);
    pipeline::append(&appender, &history).await;
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
    pipeline::append(&appender, &more).await;
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

/// Appends the world creations and `events` mixed events; returns the log's size.
async fn append_history(env: &TestEnv, worlds: usize, events: usize, seed: u64) -> i64 {
    let appender = env.appender();
    let mut workload = Workload::new(worlds, seed);
    let mut batch = workload.creations();
    batch.extend(workload.next_batch(events));
    for chunk in batch.chunks(5000) {
        pipeline::append(&appender, chunk).await;
    }
    batch.len() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_replay_interrupted_mid_rebuild_when_run_again_then_it_resumes_the_shadow_and_swaps()
 {
    let env = TestEnv::new(2).await;
    let total = append_history(&env, 6, 12_000, 3).await;
    let worlds = registry::by_name("worlds").unwrap();
    let live = env.start_projector(worlds.clone());
    env.wait_caught_up(worlds.as_ref()).await;
    // Small batches, so the rebuild commits many times before it is done.
    let mut settings = env.settings.clone();
    settings.projector.batch_max_records = 4;
    let rebuild = Rebuild::new(&settings, env.pool.clone(), worlds.clone(), "shadow").unwrap();

    let interrupt = CancellationToken::new();
    let cancel_midway = {
        let interrupt = interrupt.clone();
        move |p: Progress| {
            if p.done > 0 && p.done < p.target {
                interrupt.cancel();
            }
        }
    };
    let outcome = rebuild.replay(&cancel_midway, &interrupt).await;
    assert!(
        matches!(outcome, Err(ReplayError::Interrupted(ref schema)) if schema == "worlds_shadow"),
        "{outcome:?}"
    );
    let kept = stored_total(&env, "worlds_shadow").await;
    assert!(
        kept > 0 && kept < total,
        "the shadow keeps its progress: {kept} of {total}"
    );
    assert!(schema_exists(&env, "worlds").await, "live untouched");

    // The next run starts where the shadow stands, not at zero.
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        move |p: Progress| seen.lock().unwrap().push(p)
    };
    rebuild
        .replay(&record, &CancellationToken::new())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.first().is_some_and(|p| p.done >= kept),
        "resumed at {kept}: {:?}",
        seen.first()
    );
    assert!(!schema_exists(&env, "worlds_shadow").await, "swapped in");
    live.stop().await;
    let differing = env.rebuild_differences(worlds).await;
    assert!(differing.is_empty(), "{differing:?}");
    assert_eq!(
        indexes(&env, "worlds").await,
        indexes(&env, "worlds_rebuild").await
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_projector_replayed_together_reports_progress_towards_its_target_and_equals_a_rebuild()
 {
    let env = TestEnv::new(2).await;
    append_history(&env, 5, 6_000, 11).await;
    let mut settings = env.settings.clone();
    settings.projector.batch_max_records = 8;
    let rebuilds: Vec<Rebuild> = registry::all()
        .into_iter()
        .map(|p| Rebuild::new(&settings, env.pool.clone(), p, "shadow").unwrap())
        .collect();
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let record = {
        let seen = seen.clone();
        move |p: Progress| seen.lock().unwrap().push(p)
    };
    replay_together(&rebuilds, &record, &CancellationToken::new())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 2, "progress reported along the way: {seen:?}");
    assert!(seen.iter().all(|p| p.target > 0 && p.done <= p.target));
    assert!(
        seen.windows(2).all(|w| w[1].done >= w[0].done),
        "done never goes back: {seen:?}"
    );
    assert!(
        seen.windows(2).any(|w| w[1].done > w[0].done),
        "done grows: {seen:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last.done, last.target, "ends at its target");
    assert!(
        seen.iter()
            .any(|p| p.rate > 0.0 && p.eta_seconds().is_some()),
        "a rate and an ETA: {seen:?}"
    );
    for projector in registry::all() {
        let differing = env.rebuild_differences(projector.clone()).await;
        assert!(differing.is_empty(), "{}: {differing:?}", projector.name());
        let name = projector.name();
        assert_eq!(
            indexes(&env, name).await,
            indexes(&env, &format!("{name}_rebuild")).await,
            "{name}: every key and index of a migrated schema"
        );
    }
    env.cleanup().await;
}

/// Runs `worldline replay` with `args` against the test's stack slice; when
/// `interrupt` is set, sends SIGINT once a progress line shows it half-way.
fn run_replay(env: &TestEnv, args: &[&str], interrupt: bool) -> (bool, String, String) {
    let mut child = Command::new(worldline_binary())
        .arg("replay")
        .args(args)
        .envs(env.child_env())
        // Small batches: many commits, so SIGINT lands mid-rebuild.
        .env("WORLDLINE__PROJECTOR__BATCH_MAX_RECORDS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let reading = std::thread::spawn(move || {
        let (mut text, mut signalled) = (String::new(), !interrupt);
        let mut buffer = [0u8; 4096];
        loop {
            let n = stderr.read(&mut buffer).unwrap_or(0);
            if n == 0 {
                return text;
            }
            text.push_str(&String::from_utf8_lossy(&buffer[..n]));
            if !signalled
                && let Some((done, target)) = last_progress(&text)
                && done > 0
                && done < target
            {
                let sent = Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success());
                signalled = true;
            }
        }
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    (status.success(), stdout, reading.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_command_shows_progress_keeps_an_interrupted_shadow_and_aborts_or_resumes_it() {
    let env = TestEnv::new(2).await;
    let total = append_history(&env, 4, 6_000, 29).await;

    let (ok, _, stderr) = run_replay(&env, &["worlds"], true);
    assert!(!ok, "an interrupted replay fails: {stderr}");
    let (done, target) = last_progress(&stderr).unwrap();
    assert!(done > 0 && target == total, "{stderr}");
    assert!(
        stderr.contains("rec/s") && stderr.contains("ETA"),
        "a progress line with rate and ETA: {stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stored_total(&env, "worlds_shadow").await > 0, "shadow kept");

    let (ok, stdout, stderr) = run_replay(&env, &["worlds", "--abort"], false);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("dropped worlds_shadow"), "{stdout}");
    assert!(
        !schema_exists(&env, "worlds_shadow").await,
        "abort drops it"
    );

    let (ok, _, stderr) = run_replay(&env, &["worlds"], true);
    assert!(!ok, "{stderr}");
    let (ok, stdout, stderr) = run_replay(&env, &["worlds"], false);
    assert!(ok, "the rerun finishes: {stderr}");
    assert!(stdout.contains("swapped in"), "{stdout}");
    assert!(!schema_exists(&env, "worlds_shadow").await);
    let differing = env
        .rebuild_differences(registry::by_name("worlds").unwrap())
        .await;
    assert!(differing.is_empty(), "{differing:?}");

    // Every projector in one pass over the log.
    let (ok, stdout, stderr) = run_replay(&env, &["--all"], false);
    assert!(ok, "{stderr}");
    for projector in registry::all() {
        let name = projector.name();
        assert!(
            stdout.contains(&format!("{name}: rebuilt from the log and swapped in")),
            "{stdout}"
        );
        assert_eq!(
            stored_total(&env, name).await,
            total_of(&env, projector.as_ref()),
            "{name} stands at the end of its topics"
        );
    }
    env.cleanup().await;
}

/// Records in the topics `projector` reads.
fn total_of(env: &TestEnv, projector: &dyn worldline_projectors::Projector) -> i64 {
    projector
        .families()
        .iter()
        .map(|f| env.high_watermarks(&env.topic(*f)).values().sum::<i64>())
        .sum()
}
