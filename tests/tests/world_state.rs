//! A world as it was: the state folded from the log at tick N equals the read
//! models captured when the live world stood at tick N.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::BTreeMap;
use std::time::Duration;

use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::registry;
use worldline_projectors::world_state::{AsOf, world_state_from_log};
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, InferenceOutcome, InferencePurpose, InferenceRecorded, Season, StoryChoiceMade,
    WeatherChanged, WeatherCondition,
};
use worldline_tests::TestEnv;
use worldline_tests::workload::Workload;

type Weather = BTreeMap<String, (String, i32, i32, i32, i64)>;

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
async fn the_state_folded_from_the_log_at_a_tick_equals_the_read_models_captured_at_that_tick() {
    let env = TestEnv::new(2).await;
    let appender = Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            ..AppenderOptions::default()
        },
    )
    .unwrap();
    let mut workload = Workload::new(3, 33);
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

    // The snapshot, while the world stands at tick T.
    let world = WorldId::parse("w-000").unwrap();
    let (tick, game_time_s, day, season): (i64, i64, i32, String) = sqlx::query_as(
        "SELECT tick, game_time_s, day, season FROM clock.world_clock WHERE world_id = 'w-000'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let weather: Weather = sqlx::query_as::<_, (String, String, i32, i32, i32, i64)>(
        "SELECT region, condition, temperature_dc, wind_dmps, precipitation_dmmph, since_tick
           FROM weather.current_weather WHERE world_id = 'w-000'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(r, c, t, w, p, s)| (r, (c, t, w, p, s)))
    .collect();
    let progress: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT player_id, story_id, current_node_id FROM story.player_progress WHERE world_id = 'w-000'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let inference: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(inferences),0)::bigint, COALESCE(sum(failures),0)::bigint,
                COALESCE(sum(prompt_tokens),0)::bigint, COALESCE(sum(completion_tokens),0)::bigint,
                COALESCE(sum(cost_micro_usd),0)::bigint
           FROM inference.model_stats WHERE world_id = 'w-000'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(tick > 0 && !weather.is_empty() && !progress.is_empty() && inference.0 > 0);

    // The world moves on: every family gets events after T.
    let next = u64::try_from(tick).unwrap() + 1;
    let later = vec![
        new_envelope(
            &world,
            next,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: next * 60,
                day: 0,
                season: Season::Winter as i32,
                time_scale: 60,
            }),
        ),
        new_envelope(
            &world,
            next,
            "weather",
            Body::WeatherChanged(WeatherChanged {
                region: "north".to_owned(),
                condition: WeatherCondition::Storm as i32,
                temperature_dc: -99,
                ..Default::default()
            }),
        ),
        new_envelope(
            &world,
            next,
            "game",
            Body::StoryChoiceMade(StoryChoiceMade {
                player_id: progress[0].0.clone(),
                story_id: progress[0].1.clone(),
                node_id: progress[0].2.clone(),
                choice_id: "later".to_owned(),
                next_node_id: "after-t".to_owned(),
                context: Default::default(),
            }),
        ),
        new_envelope(
            &world,
            next,
            "npc",
            Body::InferenceRecorded(InferenceRecorded {
                model_id: "npc-chat".to_owned(),
                model_version: "1".to_owned(),
                purpose: InferencePurpose::Narration as i32,
                prompt_tokens: 1,
                completion_tokens: 1,
                latency_ms: 1,
                cost_micro_usd: 1,
                outcome: InferenceOutcome::Ok as i32,
                npc_id: String::new(),
                input_hash: "x".to_owned(),
            }),
        ),
    ];
    for r in appender.append_batch(&later).await {
        r.unwrap();
    }
    wait_caught_up(&env).await;

    let (kafka, prefix, as_of_world) = (
        env.settings.kafka.clone(),
        env.settings.topics.prefix.clone(),
        world.clone(),
    );
    let state = tokio::task::spawn_blocking(move || {
        world_state_from_log(&kafka, &prefix, &as_of_world, AsOf::Tick(next - 1))
    })
    .await
    .unwrap()
    .unwrap();

    let clock = state.clock.as_ref().unwrap();
    assert_eq!(
        (
            clock.tick as i64,
            clock.game_time_s as i64,
            clock.day as i32,
            clock.season.to_owned()
        ),
        (tick, game_time_s, day, season)
    );
    let folded_weather: Weather = state
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
        .collect();
    assert_eq!(folded_weather, weather);
    let mut folded_progress: Vec<(String, String, String)> = state
        .story_progress
        .iter()
        .flat_map(|(player, stories)| {
            stories
                .iter()
                .map(move |(story, node)| (player.clone(), story.clone(), node.clone()))
        })
        .collect();
    let mut progress = progress;
    folded_progress.sort();
    progress.sort();
    assert_eq!(folded_progress, progress);
    let totals = &state.inference;
    assert_eq!(
        (
            totals.inferences as i64,
            totals.failures as i64,
            totals.prompt_tokens as i64,
            totals.completion_tokens as i64,
            totals.cost_micro_usd as i64
        ),
        inference
    );
    for running in live {
        running.stop().await;
    }
    env.cleanup().await;
}
