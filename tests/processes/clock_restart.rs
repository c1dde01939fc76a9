//! `worldline produce clock` killed by SIGKILL at random moments and restarted,
//! several times: the log holds every tick of every world exactly once, in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::{Family, decode_envelope};
use worldline_tests::{TestEnv, eventually};

use crate::support::ONE_AT_A_TIME;

const WORLDS: [&str; 4] = ["amber", "basalt", "cinder", "dune"];
const TICK_INTERVAL_MS: u64 = 2;
const TIME_SCALE: u64 = 60_000;

/// Starts the real binary; a tick every 2 ms for each world keeps an append in
/// flight almost all the time, so the kills land mid-append.
fn spawn_clock(env: &TestEnv, log: &Path) -> Child {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_worldline"))
        .args(["produce", "clock"])
        .args(WORLDS.iter().flat_map(|world| ["--world", world]))
        .envs(env.child_env())
        .env(
            "WORLDLINE__CLOCK__TICK_INTERVAL_MS",
            TICK_INTERVAL_MS.to_string(),
        )
        .env("WORLDLINE__CLOCK__TIME_SCALE", TIME_SCALE.to_string())
        .env("RUST_LOG", "warn,worldline_producers=info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Records in the clock topic, all partitions together.
fn clock_records(env: &TestEnv) -> i64 {
    env.high_watermarks(&env.topic(Family::Clock))
        .values()
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_clock_killed_repeatedly_then_every_tick_is_in_the_log_once_in_order() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let env = TestEnv::new(3).await;
    let log: PathBuf = std::env::temp_dir().join(format!(
        "{}clock-{}.log",
        env.settings.topics.prefix,
        std::process::id()
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let kills = 8;
    let mut clock = spawn_clock(&env, &log);
    for _ in 0..kills {
        // A kill before the restarted process has ticked would test nothing.
        let before = clock_records(&env);
        eventually(Duration::from_secs(60), "the clock to tick", || async {
            (clock_records(&env) > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        clock.kill().unwrap();
        clock.wait().unwrap();
        clock = spawn_clock(&env, &log);
    }
    let before = clock_records(&env);
    eventually(
        Duration::from_secs(60),
        "the last clock to tick",
        || async { (clock_records(&env) > before).then_some(()) },
    )
    .await;
    clock.kill().unwrap();
    clock.wait().unwrap();

    let mut ticks: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for record in env.read_topic(&env.topic(Family::Clock)) {
        let envelope = decode_envelope(record.payload.as_deref().unwrap()).unwrap();
        let Some(Body::ClockTicked(body)) = envelope.body else {
            panic!("a record that is not a tick: {envelope:?}");
        };
        ticks
            .entry(envelope.world_id)
            .or_default()
            .push((envelope.world_tick, body.game_time_s));
    }
    let advance_s = TICK_INTERVAL_MS * TIME_SCALE / 1000;
    assert_eq!(
        ticks.keys().map(String::as_str).collect::<Vec<_>>(),
        WORLDS,
        "every world ticked"
    );
    for (world, seen) in &ticks {
        let last = seen.last().map_or(0, |(tick, _)| *tick);
        let expected: Vec<(u64, u64)> = (1..=last).map(|t| (t, t * advance_s)).collect();
        assert!(
            seen == &expected,
            "world {world}: ticks 1..={last} once each, in order, across {kills} kills \
             (clock log: {}); first difference at index {:?}",
            log.display(),
            seen.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
    let per_world: Vec<String> = ticks
        .iter()
        .map(|(world, seen)| format!("{world} {}", seen.len()))
        .collect();
    println!(
        "ticks per world after {kills} kills: {}",
        per_world.join(", ")
    );
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}
