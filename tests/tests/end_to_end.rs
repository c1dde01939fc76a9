//! One event family end to end on the real stack: clock producer → Kafka →
//! projector → PostgreSQL → HTTP.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_producers::AppenderOptions;
use worldline_producers::clock::{ClockOptions, run_clock};
use worldline_query_api::{AppState, app};
use worldline_schemas::WorldId;
use worldline_tests::api::Server;
use worldline_tests::{TestEnv, eventually, pipeline};

const TICKS: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_ticks_for_two_worlds_when_projected_then_the_api_serves_each_worlds_clock() {
    let env = TestEnv::new(4).await;
    let appender = env.appender_with(AppenderOptions {
        source: "clock".to_owned(),
        ..AppenderOptions::default()
    });
    let worlds = vec![
        WorldId::parse("alpha").unwrap(),
        WorldId::parse("beta").unwrap(),
    ];
    let positions = run_clock(
        &env.settings.kafka,
        &appender,
        &ClockOptions {
            worlds: worlds.clone(),
            tick_interval_ms: 10,
            time_scale: 6_000,
            max_ticks: Some(TICKS),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(positions.iter().all(|(_, p)| p.tick == TICKS));

    // Every read model, as `worldline project` runs them: the API answers
    // "unknown world" from the worlds read model.
    let projectors = env.start_all_projectors();
    let api = app(AppState::new(env.pool.clone()), Health::default());
    let server = Server::start(api, CancellationToken::new()).await;
    let client = server.http.clone();

    for world in &worlds {
        let url = server.url(&format!("/v1/worlds/{world}/clock"));
        let body: serde_json::Value = eventually(
            Duration::from_secs(30),
            "the clock read model to catch up",
            || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let response = client.get(&url).send().await.ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    let body: serde_json::Value = response.json().await.ok()?;
                    (body["tick"] == TICKS).then_some(body)
                }
            },
        )
        .await;
        assert_eq!(body["world_id"], world.as_str());
        // 10 ms ticks at 6000× are one game minute each.
        assert_eq!(body["game_time_s"], TICKS * 60);
        assert_eq!(body["day"], 0);
        assert_eq!(body["season"], "spring");
        assert_eq!(body["time_scale"], 6_000);
    }

    let unknown = server.get("/v1/worlds/nowhere/clock", None).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );

    // The stored positions are exactly the end of each partition: every record
    // consumed, none counted twice.
    let topic = env.topic(worldline_schemas::Family::Clock);
    let records = env.read_topic(&topic);
    let stored: Vec<(i32, i64)> = env.stored_offsets("clock", &topic).await;
    let mut expected: std::collections::BTreeMap<i32, i64> = Default::default();
    for record in &records {
        let end = expected.entry(record.partition).or_default();
        *end = (*end).max(record.offset + 1);
    }
    assert_eq!(stored, expected.into_iter().collect::<Vec<_>>());

    pipeline::stop_all(projectors).await;
    server.join().await;
    env.cleanup().await;
}
