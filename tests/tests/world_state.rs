//! A world as it was: the state folded from the log as of tick N (or as of a
//! time) equals the read models captured while the live world stood at tick N,
//! for several N captured during one live run while events kept arriving.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use worldline_projectors::world_state::{AsOf, WorldState, world_state_from_log};
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WeatherCondition, WorldCreated,
};
use worldline_schemas::{Family, WorldId};
use worldline_tests::{TestEnv, pipeline};

/// Rounds of the live run: round t holds every family's events of tick t.
const ROUNDS: u64 = 30;
/// Event time of tick 0; tick t happened `t` seconds later.
const BASE_MS: i64 = 1_789_999_980_000;
const FAMILIES: [Family; 4] = [
    Family::Clock,
    Family::Weather,
    Family::Story,
    Family::Inference,
];

/// What the read models showed of the world at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    clock: (i64, i64, i32, String),
    weather: BTreeMap<String, (String, i32, i32, i32, i64)>,
    progress: BTreeSet<(String, String, String)>,
    inference: (i64, i64, i64, i64, i64),
}

impl Snapshot {
    /// The same figures from a state folded from the log.
    fn of(state: &WorldState) -> Snapshot {
        let clock = state.clock.as_ref().unwrap();
        Snapshot {
            clock: (
                clock.tick as i64,
                clock.game_time_s as i64,
                clock.day as i32,
                clock.season.to_owned(),
            ),
            weather: state
                .weather
                .iter()
                .map(|(region, w)| {
                    (
                        region.clone(),
                        (
                            w.condition.to_owned(),
                            w.temperature_dc,
                            w.wind_dmps as i32,
                            w.precipitation_dmmph as i32,
                            w.since_tick as i64,
                        ),
                    )
                })
                .collect(),
            progress: state
                .story_progress
                .iter()
                .flat_map(|(player, stories)| {
                    stories
                        .iter()
                        .map(move |(story, node)| (player.clone(), story.clone(), node.clone()))
                })
                .collect(),
            inference: (
                state.inference.inferences as i64,
                state.inference.failures as i64,
                state.inference.prompt_tokens as i64,
                state.inference.completion_tokens as i64,
                state.inference.cost_micro_usd as i64,
            ),
        }
    }
}

fn at(world: &WorldId, tick: u64, source: &str, body: Body) -> Envelope {
    let mut envelope = new_envelope(world, tick, source, body);
    envelope.occurred_at_ms = BASE_MS + i64::try_from(tick).unwrap() * 1000;
    envelope
}

/// Round `t`: a tick, a weather change, a story choice and an inference, all
/// at tick `t`; every fifth round also redelivers its choice (same event id).
fn round(world: &WorldId, t: u64) -> Vec<Envelope> {
    let players = ["ayla", "bren", "cato"];
    let player = players[(t % 3) as usize];
    let step = t / 3;
    let choice = at(
        world,
        t,
        "game-server",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: player.to_owned(),
            story_id: "caravan".to_owned(),
            node_id: format!("n{step}"),
            choice_id: format!("c{}", t % 2),
            next_node_id: format!("n{}", step + 1),
            context: Default::default(),
        }),
    );
    let mut events = vec![
        at(
            world,
            t,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: t * 60,
                day: u32::try_from(t / 10).unwrap(),
                season: if t < 15 {
                    Season::Spring
                } else {
                    Season::Summer
                } as i32,
                time_scale: 60,
            }),
        ),
        at(
            world,
            t,
            "weather",
            Body::WeatherChanged(WeatherChanged {
                region: if t.is_multiple_of(2) {
                    "north"
                } else {
                    "coast"
                }
                .to_owned(),
                condition: (t % 6 + 1) as i32,
                previous_condition: WeatherCondition::Unspecified as i32,
                temperature_dc: 100 + i32::try_from(t).unwrap(),
                wind_dmps: 30,
                precipitation_dmmph: u32::try_from(t % 4).unwrap(),
                ..Default::default()
            }),
        ),
        choice.clone(),
        at(
            world,
            t,
            "npc-runtime",
            Body::InferenceRecorded(InferenceRecorded {
                model_id: "npc-chat".to_owned(),
                model_version: "1".to_owned(),
                purpose: InferencePurpose::NpcDialogue as i32,
                prompt_tokens: 200 + u32::try_from(t).unwrap(),
                completion_tokens: 50,
                latency_ms: 40,
                cost_micro_usd: 700,
                outcome: if t.is_multiple_of(7) {
                    InferenceOutcome::Timeout
                } else {
                    InferenceOutcome::Ok
                } as i32,
                npc_id: "smith".to_owned(),
                input_hash: format!("{t:x}"),
            }),
        ),
    ];
    if t.is_multiple_of(5) {
        events.push(choice);
    }
    events
}

/// Records of each family appended in rounds 1..=t (the world has one
/// partition per topic, so these are the next offsets a projector stores).
fn records_through(t: u64) -> BTreeMap<Family, i64> {
    let world = WorldId::parse("w").unwrap();
    let mut counts: BTreeMap<Family, i64> = FAMILIES.iter().map(|f| (*f, 0)).collect();
    for n in 1..=t {
        for event in round(&world, n) {
            *counts
                .get_mut(&Family::of(event.body.as_ref().unwrap()))
                .unwrap() += 1;
        }
    }
    counts
}

/// The read models in one consistent snapshot, with the tick they stand at, if
/// every family's projector had applied exactly the rounds up to that tick.
async fn capture(pool: &PgPool, env: &TestEnv) -> Option<(u64, Snapshot)> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .unwrap();
    let mut stored = BTreeMap::new();
    for family in FAMILIES {
        let schema = match family {
            Family::Clock => "clock",
            Family::Weather => "weather",
            Family::Story => "story",
            _ => "inference",
        };
        let next: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT next_offset FROM {schema}.projector_offsets WHERE topic = $1"
        )))
        .bind(env.topic(family))
        .fetch_optional(&mut *tx)
        .await
        .ok()?;
        stored.insert(family, next.unwrap_or(0));
    }
    let tick = u64::try_from(stored[&Family::Clock]).ok()?;
    if tick == 0 || stored != records_through(tick) {
        return None;
    }
    let clock: (i64, i64, i32, String) = sqlx::query_as(
        "SELECT tick, game_time_s, day, season FROM clock.world_clock WHERE world_id = 'w'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let weather = sqlx::query_as::<_, (String, String, i32, i32, i32, i64)>(
        "SELECT region, condition, temperature_dc, wind_dmps, precipitation_dmmph, since_tick
           FROM weather.current_weather WHERE world_id = 'w'",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .into_iter()
    .map(|(r, c, t, w, p, s)| (r, (c, t, w, p, s)))
    .collect();
    let progress = sqlx::query_as::<_, (String, String, String)>(
        "SELECT player_id, story_id, current_node_id FROM story.player_progress WHERE world_id = 'w'",
    )
    .fetch_all(&mut *tx)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let inference: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(inferences),0)::bigint, COALESCE(sum(failures),0)::bigint,
                COALESCE(sum(prompt_tokens),0)::bigint, COALESCE(sum(completion_tokens),0)::bigint,
                COALESCE(sum(cost_micro_usd),0)::bigint
           FROM inference.model_stats WHERE world_id = 'w'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    Some((
        tick,
        Snapshot {
            clock,
            weather,
            progress,
            inference,
        },
    ))
}

fn state_from_log(env: &TestEnv, world: &WorldId, as_of: AsOf) -> WorldState {
    world_state_from_log(
        &env.settings.kafka,
        &env.settings.topics.prefix,
        world,
        as_of,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_folded_from_the_log_at_each_captured_tick_equals_the_read_models_at_that_tick() {
    let env = TestEnv::new(1).await;
    let appender = env.appender();
    let world = WorldId::parse("w").unwrap();
    let created = at(
        &world,
        0,
        "gateway",
        Body::WorldCreated(WorldCreated {
            display_name: "W".to_owned(),
            seed: 1,
            time_scale: 60,
            tick_interval_ms: 1000,
            regions: vec!["north".to_owned(), "coast".to_owned()],
        }),
    );
    pipeline::append(&appender, &[created]).await;
    let live = env.start_all_projectors();

    // The world runs: one round of events per tick, with a short pause between
    // rounds, while snapshots are captured whenever the read models stand
    // exactly at a tick boundary.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (appender, world, done) = (appender.clone(), world.clone(), done.clone());
        tokio::spawn(async move {
            for t in 1..=ROUNDS {
                pipeline::append(&appender, &round(&world, t)).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut snapshots: BTreeMap<u64, Snapshot> = BTreeMap::new();
    while !done.load(Ordering::SeqCst) {
        if let Some((tick, snapshot)) = capture(&env.pool, &env).await {
            snapshots.entry(tick).or_insert(snapshot);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();
    assert!(
        snapshots.len() >= 3 && snapshots.keys().next_back() != snapshots.keys().next(),
        "snapshots at several ticks during the run: {:?}",
        snapshots.keys().collect::<Vec<_>>()
    );

    // Folding the log takes a consumer per call: compare a spread of them.
    let ticks: Vec<u64> = snapshots.keys().copied().collect();
    let chosen: BTreeSet<u64> = (0..4).map(|i| ticks[i * (ticks.len() - 1) / 3]).collect();
    let (env, world) = (Arc::new(env), world);
    for (tick, snapshot) in snapshots.iter().filter(|(t, _)| chosen.contains(t)) {
        let (by_tick, by_time) = {
            let (env, world, tick) = (env.clone(), world.clone(), *tick);
            tokio::task::spawn_blocking(move || {
                let by_tick = state_from_log(&env, &world, AsOf::Tick(tick));
                // Tick t happened at BASE + t s; half a second later is still tick t.
                let time = chrono::DateTime::from_timestamp_millis(
                    BASE_MS + i64::try_from(tick).unwrap() * 1000 + 500,
                )
                .unwrap();
                (by_tick, state_from_log(&env, &world, AsOf::Time(time)))
            })
            .await
            .unwrap()
        };
        assert_eq!(&Snapshot::of(&by_tick), snapshot, "as of tick {tick}");
        assert_eq!(by_time, by_tick, "as of the time of tick {tick}");
    }
    pipeline::stop_all(live).await;
    Arc::try_unwrap(env).unwrap().cleanup().await;
}
