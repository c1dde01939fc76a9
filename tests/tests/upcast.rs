//! Replaying events of an older schema version: they reach the read models in
//! today's shape, whether a live projector reads them or `worldline replay`
//! rebuilds the read model from the log.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use worldline_projectors::read_models::weather::WeatherProjector;
use worldline_projectors::replay::Rebuild;
use worldline_schemas::Family;
use worldline_tests::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_schema_1_0_weather_event_in_the_log_when_replayed_then_the_read_model_has_tenths()
{
    let env = TestEnv::new(1).await;
    append_legacy(&env).await;
    let projector = env.start_projector(Arc::new(WeatherProjector));
    let row = eventually(Duration::from_secs(30), "the legacy event", || {
        current_north(&env.pool)
    })
    .await;
    assert_eq!(row, legacy_north());
    let dead = env
        .scalar("SELECT count(*) FROM weather.dead_letters")
        .await;
    assert_eq!(dead, 0, "an old event is not a dead letter");

    // The same bytes through a rebuild: `worldline replay` builds the shadow
    // from offset zero with today's code and swaps it in while live keeps going.
    replay_and_check_north(&env).await;
    let dead = env
        .scalar("SELECT count(*) FROM weather.dead_letters")
        .await;
    assert_eq!(dead, 0, "the rebuild upcast it too");
    let report = rebuild(&env, "verify")
        .verify(&|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    assert!(report.differing.is_empty(), "{:?}", report.differing);
    projector.stop().await;
    env.cleanup().await;
}

/// The checked-in bytes of a schema 1.0 weather change, appended exactly as an
/// old producer wrote them.
async fn append_legacy(env: &TestEnv) {
    let legacy = include_bytes!("../../schemas/fixtures/legacy/weather_changed_v1_0.bin");
    env.send_raw(Family::Weather, "emberfall", legacy).await;
}

/// A rebuild of the weather read model through a `suffix` schema.
fn rebuild(env: &TestEnv, suffix: &str) -> Rebuild {
    Rebuild::new(
        &env.settings,
        env.pool.clone(),
        Arc::new(WeatherProjector),
        suffix,
    )
    .unwrap()
}

/// Rebuilds the weather read model from the log into a shadow schema and
/// swaps it in, then checks the legacy event reached it in today's shape.
async fn replay_and_check_north(env: &TestEnv) {
    rebuild(env, "shadow")
        .replay(&|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(current_north(&env.pool).await, Some(legacy_north()));
}

/// The legacy event's north: snow at -3.5 °C (in tenths) since tick 4321.
fn legacy_north() -> (String, i32, i64) {
    ("snow".to_owned(), -35, 4_321)
}

/// The north of emberfall in the current weather (none before the read model
/// has it, or has its schema).
async fn current_north(pool: &sqlx::PgPool) -> Option<(String, i32, i64)> {
    sqlx::query_as(
        "SELECT condition, temperature_dc, since_tick::bigint FROM weather.current_weather
          WHERE world_id = 'emberfall' AND region = 'north'",
    )
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_only_schema_1_0_events_in_the_log_when_a_new_read_model_is_replayed_then_it_has_tenths()
 {
    let env = TestEnv::new(1).await;
    append_legacy(&env).await;
    // No live schema yet: the replay builds the read model from the whole
    // history, as for a projector added after the fact.
    replay_and_check_north(&env).await;
    let history: (i64, Option<i64>) = sqlx::query_as(
        "SELECT valid_from_tick, valid_to_tick FROM weather.weather_history
          WHERE world_id = 'emberfall' AND region = 'north'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(history, (4_321, None));
    env.cleanup().await;
}
