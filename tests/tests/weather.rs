//! The weather producer on real Kafka: determinism across runs, and restarts
//! that neither skip nor repeat, including a crash between append and commit.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_util::sync::CancellationToken;
use worldline_producers::clock::{ClockOptions, run_clock};
use worldline_producers::weather::{
    ClockReading, WeatherOptions, WeatherStats, run_weather, weather_envelopes, weather_event_id,
};
use worldline_producers::{Appender, AppenderOptions};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{Envelope, WeatherCondition};
use worldline_schemas::{EnvelopeExt, Family, WorldId, decode_envelope};
use worldline_tests::{RawRecord, TestEnv};

const SEED: u64 = 7;
/// One game hour per tick, so a short history sees many changes.
const GAME_SECONDS_PER_TICK: u32 = 3_600;

fn regions() -> Vec<String> {
    ["north", "south", "east", "west", "coast"]
        .map(str::to_owned)
        .to_vec()
}

fn worlds(names: &[&str]) -> Vec<WorldId> {
    names.iter().map(|w| WorldId::parse(w).unwrap()).collect()
}

fn appender(env: &TestEnv, source: &str) -> Appender {
    Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            source: source.to_owned(),
            ..AppenderOptions::default()
        },
    )
    .unwrap()
}

/// Ticks every world `ticks` times, one game hour per tick.
async fn make_clock_history(env: &TestEnv, worlds: &[WorldId], ticks: u64) {
    run_clock(
        &env.settings.kafka,
        &appender(env, "clock"),
        &ClockOptions {
            worlds: worlds.to_vec(),
            tick_interval_ms: 1,
            // tick_interval_ms × time_scale / 1000 game seconds per tick.
            time_scale: GAME_SECONDS_PER_TICK * 1000,
            max_ticks: Some(ticks),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
}

/// The clock events of `env`, in log order per partition.
fn clock_events(env: &TestEnv) -> Vec<Envelope> {
    env.read_topic(&env.topic(Family::Clock))
        .iter()
        .map(|r| decode_envelope(r.payload.as_deref().unwrap()).unwrap())
        .collect()
}

/// Writes `from`'s clock history into `to` unchanged (same ids, same times), so
/// both hold the same clock history.
async fn copy_clock_history(from: &TestEnv, to: &TestEnv) {
    let events = clock_events(from);
    for result in appender(to, "clock").append_batch(&events).await {
        result.unwrap();
    }
}

/// Runs the weather producer in `env` until the end of the clock history or
/// `stop_after_ticks` clock records, with a fresh appender as a restarted
/// process would have.
async fn weather(env: &TestEnv, stop_after_ticks: Option<u64>) -> WeatherStats {
    run_weather(
        &env.settings.kafka,
        &appender(env, "weather"),
        &WeatherOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            group_id: format!("{}weather", env.settings.topics.prefix),
            regions: regions(),
            seed: SEED,
            stop_after_ticks,
            stop_at_end: true,
            batch_max_ticks: 50,
        },
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// The weather records of `env` per world, in log order.
fn weather_by_world(env: &TestEnv) -> BTreeMap<String, Vec<RawRecord>> {
    let mut by_world: BTreeMap<String, Vec<RawRecord>> = BTreeMap::new();
    for record in env.read_topic(&env.topic(Family::Weather)) {
        let key = String::from_utf8(record.key.clone().unwrap()).unwrap();
        by_world.entry(key).or_default().push(record);
    }
    by_world
}

/// What the log must hold for a world: the pure model applied to its clock history.
fn expected_weather(clock: &[Envelope]) -> BTreeMap<String, Vec<Envelope>> {
    let mut expected: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    let mut previous: HashMap<String, ClockReading> = HashMap::new();
    for event in clock {
        let reading = ClockReading::from_envelope(event).unwrap();
        let before = previous.get(&event.world_id);
        expected
            .entry(event.world_id.clone())
            .or_default()
            .extend(weather_envelopes(SEED, &regions(), event, before));
        previous.insert(event.world_id.clone(), reading);
    }
    expected
}

fn decoded(records: &[RawRecord]) -> Vec<Envelope> {
    records
        .iter()
        .map(|r| decode_envelope(r.payload.as_deref().unwrap()).unwrap())
        .collect()
}

/// Asserts the per-world weather of `actual` is record for record the same as
/// `expected`: partition, key, payload bytes and headers, in the same order.
fn assert_same_records(
    actual: &BTreeMap<String, Vec<RawRecord>>,
    expected: &BTreeMap<String, Vec<RawRecord>>,
) {
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (world, records) in expected {
        let got = &actual[world];
        assert_eq!(got.len(), records.len(), "world {world}: event count");
        for (index, (a, b)) in got.iter().zip(records).enumerate() {
            assert_eq!(
                a.partition, b.partition,
                "world {world} #{index}: partition"
            );
            assert_eq!(a.key, b.key, "world {world} #{index}: key");
            assert_eq!(
                a.payload, b.payload,
                "world {world} #{index}: payload bytes"
            );
            assert_eq!(a.headers, b.headers, "world {world} #{index}: headers");
        }
    }
}

fn assert_no_duplicate_ids(by_world: &BTreeMap<String, Vec<RawRecord>>) {
    let mut seen = HashSet::new();
    for records in by_world.values() {
        for event in decoded(records) {
            assert!(
                seen.insert(event.event_uuid()),
                "event {} (world {}, tick {}) appended twice",
                event.event_uuid(),
                event.world_id,
                event.world_tick
            );
        }
    }
}

/// Each region starts with a first report at tick 1 and every later change
/// names the condition the one before it set.
fn assert_each_region_tells_a_consistent_story(events: &[Envelope]) {
    let mut last: HashMap<String, (u64, i32)> = HashMap::new();
    for event in events {
        let Some(Body::WeatherChanged(change)) = &event.body else {
            panic!("not a weather change");
        };
        assert_ne!(change.condition, change.previous_condition);
        match last.get(&change.region) {
            None => {
                assert_eq!(
                    event.world_tick, 1,
                    "{}: first report at tick 1",
                    change.region
                );
                assert_eq!(
                    change.previous_condition,
                    WeatherCondition::Unspecified as i32
                );
            }
            Some((tick, condition)) => {
                assert!(
                    event.world_tick > *tick,
                    "{}: ticks increase",
                    change.region
                );
                assert_eq!(
                    change.previous_condition, *condition,
                    "{}: chain",
                    change.region
                );
            }
        }
        last.insert(change.region.clone(), (event.world_tick, change.condition));
    }
    assert_eq!(last.len(), regions().len(), "every region reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_same_clock_history_when_weather_runs_twice_then_the_events_are_identical() {
    let first = TestEnv::new(3).await;
    let second = TestEnv::new(3).await;
    let worlds = worlds(&["emberfall", "frostholm", "saltmarsh"]);
    make_clock_history(&first, &worlds, 150).await;
    copy_clock_history(&first, &second).await;

    let stats_first = weather(&first, None).await;
    let stats_second = weather(&second, None).await;
    assert_eq!(stats_first.clock_records, 450);
    assert_eq!(stats_first, stats_second);

    let first_weather = weather_by_world(&first);
    assert_same_records(&weather_by_world(&second), &first_weather);

    // The log holds exactly what the model says, with ids, times and causes
    // derived from the clock events.
    let clock = clock_events(&first);
    let clock_by_key: HashMap<(String, u64), &Envelope> = clock
        .iter()
        .map(|e| ((e.world_id.clone(), e.world_tick), e))
        .collect();
    let expected = expected_weather(&clock);
    assert_eq!(first_weather.len(), worlds.len());
    let mut total = 0;
    for (world, records) in &first_weather {
        let events = decoded(records);
        total += events.len();
        assert_eq!(
            &events, &expected[world],
            "world {world}: the model's events, in order"
        );
        assert_each_region_tells_a_consistent_story(&events);
        let world_id = WorldId::parse(world).unwrap();
        for event in &events {
            let Some(Body::WeatherChanged(change)) = &event.body else {
                panic!("not a weather change");
            };
            let cause = clock_by_key[&(world.clone(), event.world_tick)];
            assert_eq!(
                event.event_uuid(),
                weather_event_id(&world_id, &change.region, event.world_tick)
            );
            assert_eq!(event.event_uuid().get_version_num(), 5);
            assert_eq!(event.causation_id, cause.event_id);
            assert_eq!(event.occurred_at_ms, cause.occurred_at_ms);
            assert_eq!(event.source, "weather");
        }
        assert!(
            events.len() > regions().len() * 5,
            "world {world}: weather changed during six game days ({} events)",
            events.len()
        );
    }
    assert_eq!(stats_first.events_appended, total as u64);
    first.cleanup().await;
    second.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_weather_producer_restarted_mid_run_then_it_neither_skips_nor_repeats() {
    let uninterrupted = TestEnv::new(3).await;
    let restarted = TestEnv::new(3).await;
    let worlds = worlds(&["emberfall", "frostholm", "saltmarsh", "dunmore"]);
    make_clock_history(&uninterrupted, &worlds, 120).await;
    copy_clock_history(&uninterrupted, &restarted).await;
    weather(&uninterrupted, None).await;

    let part_one = weather(&restarted, Some(130)).await;
    let part_two = weather(&restarted, Some(170)).await;
    let rest = weather(&restarted, None).await;
    assert_eq!(part_one.clock_records, 130);
    assert_eq!(part_two.clock_records, 170);
    assert_eq!(
        rest.clock_records,
        480 - 130 - 170,
        "each run starts where the last stopped"
    );
    assert_eq!(
        part_two.events_already_in_log + rest.events_already_in_log,
        0
    );

    let restarted_weather = weather_by_world(&restarted);
    assert_no_duplicate_ids(&restarted_weather);
    assert_same_records(&restarted_weather, &weather_by_world(&uninterrupted));
    uninterrupted.cleanup().await;
    restarted.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_weather_appended_but_clock_offsets_not_committed_when_restarted_then_nothing_is_appended_twice()
 {
    let uninterrupted = TestEnv::new(3).await;
    let crashed = TestEnv::new(3).await;
    let world = worlds(&["emberfall"]);
    make_clock_history(&uninterrupted, &world, 200).await;
    copy_clock_history(&uninterrupted, &crashed).await;
    weather(&uninterrupted, None).await;

    // One world, so the first 80 clock records are its ticks 1..=80.
    weather(&crashed, Some(80)).await;
    // The crash window: the producer appended the weather of the next ticks,
    // the last batch only partly, and died before committing the clock offsets.
    let clock = clock_events(&crashed);
    let mut appended_by_hand = Vec::new();
    for tick in 81..=120usize {
        let before = ClockReading::from_envelope(&clock[tick - 2]);
        appended_by_hand.extend(weather_envelopes(
            SEED,
            &regions(),
            &clock[tick - 1],
            before.as_ref(),
        ));
    }
    appended_by_hand.truncate(appended_by_hand.len().div_ceil(2));
    assert!(
        appended_by_hand.len() >= 2,
        "the crash window holds some weather"
    );
    for result in appender(&crashed, "weather")
        .append_batch(&appended_by_hand)
        .await
    {
        result.unwrap();
    }

    let after_crash = weather(&crashed, None).await;
    assert_eq!(after_crash.clock_records, 120, "resumed at tick 81");
    assert_eq!(
        after_crash.events_already_in_log,
        appended_by_hand.len() as u64
    );

    let crashed_weather = weather_by_world(&crashed);
    assert_no_duplicate_ids(&crashed_weather);
    assert_same_records(&crashed_weather, &weather_by_world(&uninterrupted));
    assert_each_region_tells_a_consistent_story(&decoded(&crashed_weather["emberfall"]));
    uninterrupted.cleanup().await;
    crashed.cleanup().await;
}
