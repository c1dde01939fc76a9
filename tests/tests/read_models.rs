//! Every read model on the real stack, fed a mixed workload with duplicates.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::sync::Arc;
use std::time::Duration;

use worldline_projectors::read_models::inference::InferenceProjector;
use worldline_projectors::read_models::story::StoryProjector;
use worldline_projectors::read_models::weather::WeatherProjector;
use worldline_projectors::read_models::worlds::WorldsProjector;
use worldline_projectors::{Event, Projector, SchemaName};
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, StoryChoiceMade,
    WeatherCondition, WorldPaused,
};
use worldline_tests::{TestEnv, eventually, fixture, pipeline};

fn choice(
    world: &WorldId,
    tick: u64,
    player: &str,
    node: &str,
    choice: &str,
    next: &str,
) -> Envelope {
    new_envelope(
        world,
        tick,
        "game-server",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: player.to_owned(),
            story_id: "lost-caravan".to_owned(),
            node_id: node.to_owned(),
            choice_id: choice.to_owned(),
            next_node_id: next.to_owned(),
            context: [("party".to_owned(), "3".to_owned())].into(),
        }),
    )
}

fn inference(world: &WorldId, tick: u64, latency_ms: u32, outcome: InferenceOutcome) -> Envelope {
    let mut envelope = new_envelope(
        world,
        tick,
        "npc-runtime",
        Body::InferenceRecorded(InferenceRecorded {
            model_id: "npc-chat".to_owned(),
            model_version: "2026-10".to_owned(),
            purpose: InferencePurpose::NpcDialogue as i32,
            prompt_tokens: 300,
            completion_tokens: 80,
            latency_ms,
            cost_micro_usd: 950,
            outcome: outcome as i32,
            npc_id: "innkeeper".to_owned(),
            input_hash: "ab12".to_owned(),
        }),
    );
    // One fixed minute, so all land in one statistics bucket.
    envelope.occurred_at_ms = 1_790_000_000_000 + tick as i64;
    envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_mixed_workload_with_redeliveries_then_every_read_model_counts_each_event_once() {
    let env = TestEnv::new(2).await;
    let world = WorldId::parse("emberfall").unwrap();
    let appender = env.appender();
    use WeatherCondition::{Clear, Rain, Snow, Unspecified};
    let created = fixture::created(&world, "Emberfall", &["north", "coast"]);
    let ticks: Vec<Envelope> = (1..=30).map(|t| fixture::tick(&world, t)).collect();
    // Every change at 12.5 °C and 4 m/s.
    let weather = |tick, region, condition, previous| {
        fixture::weather_changed(&world, tick, region, condition, previous, 125, 40)
    };
    let weather_events = [
        weather(1, "north", Clear, Unspecified),
        weather(1, "coast", Rain, Unspecified),
        weather(10, "north", Snow, Clear),
        weather(20, "north", Clear, Snow),
    ];
    let choices = [
        choice(&world, 3, "ayla", "start", "help", "camp"),
        choice(&world, 4, "bren", "start", "ignore", ""),
        choice(&world, 6, "ayla", "camp", "rest", "ambush"),
    ];
    let inferences = [
        inference(&world, 2, 40, InferenceOutcome::Ok),
        inference(&world, 3, 180, InferenceOutcome::Ok),
        inference(&world, 5, 900, InferenceOutcome::Timeout),
    ];
    let mut all = vec![created];
    all.extend(ticks.iter().cloned());
    all.extend(weather_events.iter().cloned());
    all.extend(choices.iter().cloned());
    all.extend(inferences.iter().cloned());
    // Producer retries: the same events again, later in the log.
    let redelivered = [
        ticks[29].clone(),
        weather_events[2].clone(),
        choices[0].clone(),
        inferences[1].clone(),
    ];
    all.extend(redelivered.iter().cloned());
    pipeline::append(&appender, &all).await;

    let projectors: Vec<Arc<dyn Projector>> = vec![
        Arc::new(WorldsProjector),
        Arc::new(WeatherProjector),
        Arc::new(StoryProjector),
        Arc::new(InferenceProjector),
    ];
    let running: Vec<_> = projectors
        .into_iter()
        .map(|p| env.start_projector(p))
        .collect();
    let total = all.len() as i64;
    let pool = env.pool.clone();
    eventually(
        Duration::from_secs(30),
        "every record to be applied",
        || {
            let pool = pool.clone();
            async move {
                let applied: i64 = sqlx::query_scalar(
                    "SELECT COALESCE(SUM(records_applied), 0)::bigint FROM worlds.worlds",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                let inferences: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM inference.inferences")
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                let choices: i64 = sqlx::query_scalar("SELECT count(*) FROM story.choices")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                let weather: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM weather.weather_history")
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (applied == total && inferences == 3 && choices == 3 && weather == 4).then_some(())
            }
        },
    )
    .await;
    // Let any in-flight batch of the redelivered events land before checking.
    for projector in running {
        projector.stop().await;
    }

    // worlds: counts are per distinct event; records_applied counts every record.
    let row: (String, i64, i64, i64, i64, i64, i64, i64, String, serde_json::Value) = sqlx::query_as(
        "SELECT display_name, latest_tick, world_events, clock_events, weather_events, story_events,
                inference_events, records_applied, status, regions
           FROM worlds.worlds WHERE world_id = 'emberfall'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.0, "Emberfall");
    assert_eq!(row.1, 30);
    assert_eq!((row.2, row.3, row.4, row.5, row.6), (1, 30, 4, 3, 3));
    assert_eq!(row.7, total, "every record applied exactly once");
    assert_eq!(row.8, "running");
    assert_eq!(row.9, serde_json::json!(["north", "coast"]));

    // weather: current per region, and history periods closed by their successors.
    let current = current_weather(&env, "weather").await;
    assert_eq!(
        current,
        vec![
            ("coast".to_owned(), "rain".to_owned(), 1),
            ("north".to_owned(), "clear".to_owned(), 20)
        ]
    );
    let periods: Vec<(i64, Option<i64>, String)> = sqlx::query_as(
        "SELECT valid_from_tick, valid_to_tick, condition FROM weather.weather_history
          WHERE region = 'north' ORDER BY valid_from_tick",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        periods,
        vec![
            (1, Some(10), "clear".to_owned()),
            (10, Some(20), "snow".to_owned()),
            (20, None, "clear".to_owned())
        ]
    );
    let as_of_15: String = sqlx::query_scalar(
        "SELECT condition FROM weather.weather_history
          WHERE world_id = 'emberfall' AND region = 'north' AND valid_from_tick <= 15
          ORDER BY valid_from_tick DESC LIMIT 1",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(as_of_15, "snow");

    // story: progress follows the latest choice; tallies count each choice once.
    let progress: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT player_id, current_node_id, choices_made FROM story.player_progress ORDER BY player_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        progress,
        vec![
            ("ayla".to_owned(), "ambush".to_owned(), 2),
            ("bren".to_owned(), String::new(), 1)
        ]
    );
    assert_eq!(
        env.scalar(
            "SELECT times FROM story.node_tallies WHERE node_id = 'start' AND choice_id = 'help'"
        )
        .await,
        1
    );

    // inference: one stats bucket (same minute), each inference once, quantiles from the histogram.
    let stats: (i64, i64, i64, i64, i32, i32, i32) = sqlx::query_as(
        "SELECT sum(inferences)::bigint, sum(failures)::bigint, sum(prompt_tokens)::bigint,
                sum(cost_micro_usd)::bigint,
                inference.histogram_quantile(
                    (SELECT latency_histogram FROM inference.model_stats LIMIT 1), 0.5),
                inference.histogram_quantile(
                    (SELECT latency_histogram FROM inference.model_stats LIMIT 1), 0.99),
                max(latency_max_ms)
           FROM inference.model_stats",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        env.scalar("SELECT count(*) FROM inference.model_stats")
            .await,
        1
    );
    assert_eq!(stats.0, 3);
    assert_eq!(stats.1, 1, "the timeout counts as a failure");
    assert_eq!(stats.2, 900);
    assert_eq!(stats.3, 2850);
    assert_eq!(stats.4, 200, "p50 falls in the 150–200 ms bucket");
    assert_eq!(stats.5, 1000, "p99 falls in the 750–1000 ms bucket");
    assert_eq!(stats.6, 900);

    env.cleanup().await;
}

/// Applies `batches` of `events` (split at the given lengths) into a fresh
/// `schema`, one transaction per batch, as the runtime would.
async fn apply_in_batches(
    env: &TestEnv,
    projector: &dyn Projector,
    schema: &str,
    events: &[Event],
    batch_lengths: &[usize],
) -> SchemaName {
    let schema = SchemaName::parse(schema).unwrap();
    worldline_projectors::store::prepare_schema(&env.pool, &schema, projector)
        .await
        .unwrap();
    let mut rest = events;
    for length in batch_lengths {
        let (batch, after) = rest.split_at(*length);
        rest = after;
        let mut tx = env.pool.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL search_path TO {}",
            schema.as_str()
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        projector.apply(&mut tx, batch).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert!(rest.is_empty(), "batch lengths cover every event");
    schema
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_world_created_twice_when_the_creations_fall_in_separate_batches_then_the_tables_equal_one_batch()
 {
    let env = TestEnv::new(1).await;
    let world = WorldId::parse("twice").unwrap();
    let created = |name: &str| fixture::world_created(&world, name, 7, &["north"]);
    // Created, paused, then created again by a client retrying with a new
    // event id: the second creation must change nothing, wherever a batch ends.
    let log = [
        created("Twice"),
        new_envelope(
            &world,
            3,
            "admin",
            Body::WorldPaused(WorldPaused {
                reason: "maintenance".to_owned(),
            }),
        ),
        created("Twice again"),
    ];
    let events: Vec<Event> = log
        .into_iter()
        .enumerate()
        .map(|(offset, envelope)| Event {
            topic: Arc::from(env.topic(worldline_schemas::Family::World)),
            partition: 0,
            offset: offset as i64,
            timestamp_ms: 0,
            envelope,
        })
        .collect();
    let whole = apply_in_batches(&env, &WorldsProjector, "worlds_whole", &events, &[3]).await;
    let split = apply_in_batches(&env, &WorldsProjector, "worlds_split", &events, &[2, 1]).await;
    let one_by_one =
        apply_in_batches(&env, &WorldsProjector, "worlds_single", &events, &[1, 1, 1]).await;

    let (name, status): (String, String) =
        sqlx::query_as("SELECT display_name, status FROM worlds_whole.worlds")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((name.as_str(), status.as_str()), ("Twice", "paused"));
    assert_same_tables(&env, &whole, &[split, one_by_one]).await;
    env.cleanup().await;
}

/// Every table of each of `others` has the same checksum as in `reference`.
async fn assert_same_tables(env: &TestEnv, reference: &SchemaName, others: &[SchemaName]) {
    let expected = worldline_projectors::verify::table_checksums(&env.pool, reference)
        .await
        .unwrap();
    for other in others {
        let checksums = worldline_projectors::verify::table_checksums(&env.pool, other)
            .await
            .unwrap();
        assert_eq!(
            worldline_projectors::verify::differences(&expected, &checksums),
            Vec::<String>::new(),
            "{} differs from {}",
            other.as_str(),
            reference.as_str()
        );
    }
}

/// (region, condition, since_tick) of every region in `schema`'s `current_weather`.
async fn current_weather(env: &TestEnv, schema: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT region, condition, since_tick FROM {schema}.current_weather ORDER BY region"
    )))
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// A region's periods as the `weather_history` view of `schema` derives them:
/// (valid_from_tick, valid_to_tick, condition, log_offset) in (tick, offset) order.
async fn weather_periods(
    env: &TestEnv,
    schema: &SchemaName,
    region: &str,
) -> Vec<(i64, Option<i64>, String, i64)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT valid_from_tick, valid_to_tick, condition, log_offset
           FROM {}.weather_history
          WHERE world_id = 'emberfall' AND region = $1
          ORDER BY valid_from_tick, log_offset",
        schema.as_str()
    )))
    .bind(region)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_weather_history_when_later_batches_bring_changes_before_a_regions_latest_tick_then_every_period_ends_at_the_next_change()
 {
    let env = TestEnv::new(1).await;
    let world = WorldId::parse("emberfall").unwrap();
    use WeatherCondition::{Clear, Cloudy, Fog, Rain, Snow};
    let weather = |tick, region, condition| {
        fixture::weather_changed(&world, tick, region, condition, Clear, 125, 40)
    };
    let mut log = vec![
        // First batch: in tick order per region.
        weather(2, "north", Clear),
        weather(10, "north", Snow),
        weather(5, "coast", Rain),
        weather(20, "north", Clear),
        // Second batch: north between its changes, before its first, and at a
        // tick it already has; coast before its only change.
        weather(15, "north", Fog),
        weather(1, "north", Rain),
        weather(10, "north", Rain),
        weather(3, "coast", Cloudy),
    ];
    // Third batch: producer retries of the tick-15 change, and of each
    // region's latest change (its tick is the region's latest stored tick:
    // the boundary of the ticks a stored change can have).
    log.push(log[4].clone());
    log.push(log[3].clone());
    log.push(log[2].clone());
    let events: Vec<Event> = log
        .into_iter()
        .enumerate()
        .map(|(offset, envelope)| Event {
            topic: Arc::from(env.topic(worldline_schemas::Family::Weather)),
            partition: 0,
            offset: offset as i64,
            timestamp_ms: 0,
            envelope,
        })
        .collect();

    let batches = apply_in_batches(
        &env,
        &WeatherProjector,
        "weather_batches",
        &events,
        &[4, 4, 3],
    )
    .await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM weather_batches.weather_changes")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(stored, 8, "each change once, whatever was delivered again");

    let north = weather_periods(&env, &batches, "north").await;
    let coast = weather_periods(&env, &batches, "coast").await;
    let period = |from, to, condition: &str, offset| (from, to, condition.to_owned(), offset);
    assert_eq!(
        north,
        vec![
            period(1, Some(2), "rain", 5),
            period(2, Some(10), "clear", 0),
            // Two changes at one tick: the earlier in the log lasts no tick.
            period(10, Some(10), "snow", 1),
            period(10, Some(15), "rain", 6),
            period(15, Some(20), "fog", 4),
            period(20, None, "clear", 3),
        ]
    );
    assert_eq!(
        coast,
        vec![period(3, Some(5), "cloudy", 7), period(5, None, "rain", 2)]
    );
    for periods in [&north, &coast] {
        let starts: Vec<Option<i64>> = periods.iter().skip(1).map(|p| Some(p.0)).collect();
        let ends: Vec<Option<i64>> = periods.iter().map(|p| p.1).collect();
        assert_eq!(
            ends,
            [starts, vec![None]].concat(),
            "each period ends where the next change starts, the last runs on"
        );
    }
    let current = current_weather(&env, "weather_batches").await;
    assert_eq!(
        current,
        vec![
            ("coast".to_owned(), "rain".to_owned(), 5),
            ("north".to_owned(), "clear".to_owned(), 20)
        ],
        "an earlier tick never becomes the current weather"
    );

    // However the log is cut into batches, the tables hold the same rows.
    let whole = apply_in_batches(&env, &WeatherProjector, "weather_whole", &events, &[11]).await;
    let one_by_one =
        apply_in_batches(&env, &WeatherProjector, "weather_single", &events, &[1; 11]).await;
    assert_same_tables(&env, &batches, &[whole, one_by_one]).await;
    env.cleanup().await;
}
