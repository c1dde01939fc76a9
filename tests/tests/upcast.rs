//! Replaying events of an older schema version: they reach the read models in
//! today's shape, whether a live projector reads them or `worldline replay`
//! rebuilds the read model from the log.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;
use worldline_projectors::read_models::weather::WeatherProjector;
use worldline_projectors::replay::Rebuild;
use worldline_schemas::Family;
use worldline_tests::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_schema_1_0_weather_event_in_the_log_when_replayed_then_the_read_model_has_tenths()
{
    let env = TestEnv::new(1).await;
    // The checked-in bytes, appended exactly as an old producer wrote them.
    let legacy = include_bytes!("../../schemas/fixtures/legacy/weather_changed_v1_0.bin");
    env.raw_producer()
        .send(
            FutureRecord::to(&env.topic(Family::Weather))
                .key("emberfall")
                .payload(legacy.as_slice()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let projector = env.start_projector(Arc::new(WeatherProjector));
    let pool = env.pool.clone();
    let row: (String, i32, i64) = eventually(Duration::from_secs(30), "the legacy event", || {
        let pool = pool.clone();
        async move {
            sqlx::query_as(
                "SELECT condition, temperature_dc, since_tick::bigint FROM weather.current_weather
                  WHERE world_id = 'emberfall' AND region = 'north'",
            )
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
        }
    })
    .await;
    assert_eq!(row, ("snow".to_owned(), -35, 4_321));
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM weather.dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "an old event is not a dead letter");

    // The same bytes through a rebuild: `worldline replay` builds the shadow
    // from offset zero with today's code and swaps it in while live keeps going.
    let rebuild = Rebuild::new(
        &env.settings,
        env.pool.clone(),
        Arc::new(WeatherProjector),
        "shadow",
    )
    .unwrap();
    rebuild
        .replay(&|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        current_north(&env.pool).await,
        Some(("snow".to_owned(), -35, 4_321))
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM weather.dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "the rebuild upcast it too");
    let verify = Rebuild::new(
        &env.settings,
        env.pool.clone(),
        Arc::new(WeatherProjector),
        "verify",
    )
    .unwrap();
    let report = verify
        .verify(&|_| {}, &CancellationToken::new())
        .await
        .unwrap();
    assert!(report.differing.is_empty(), "{:?}", report.differing);
    projector.stop().await;
    env.cleanup().await;
}

async fn current_north(pool: &sqlx::PgPool) -> Option<(String, i32, i64)> {
    sqlx::query_as(
        "SELECT condition, temperature_dc, since_tick::bigint FROM weather.current_weather
          WHERE world_id = 'emberfall' AND region = 'north'",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_only_schema_1_0_events_in_the_log_when_a_new_read_model_is_replayed_then_it_has_tenths()
 {
    let env = TestEnv::new(1).await;
    let legacy = include_bytes!("../../schemas/fixtures/legacy/weather_changed_v1_0.bin");
    env.raw_producer()
        .send(
            FutureRecord::to(&env.topic(Family::Weather))
                .key("emberfall")
                .payload(legacy.as_slice()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // No live schema yet: the replay builds the read model from the whole
    // history, as for a projector added after the fact.
    Rebuild::new(
        &env.settings,
        env.pool.clone(),
        Arc::new(WeatherProjector),
        "shadow",
    )
    .unwrap()
    .replay(&|_| {}, &CancellationToken::new())
    .await
    .unwrap();
    assert_eq!(
        current_north(&env.pool).await,
        Some(("snow".to_owned(), -35, 4_321))
    );
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
