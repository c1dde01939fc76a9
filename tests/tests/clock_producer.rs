//! The clock producer on real Kafka: keys, headers, order, and resumption.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::HashMap;

use tokio_util::sync::CancellationToken;
use worldline_producers::Appender;
use worldline_producers::clock::{self, ClockOptions, run_clock};
use worldline_producers::partitioner::partition_for_key;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::{Family, WorldId, decode_envelope};
use worldline_tests::TestEnv;

/// The appender `worldline produce clock` uses.
fn appender(env: &TestEnv) -> Appender {
    Appender::new(
        &env.settings.kafka,
        clock::appender_options(&env.settings.topics.prefix),
    )
    .unwrap()
}

async fn tick(env: &TestEnv, worlds: &[WorldId], ticks: u64) {
    // A new appender each run: a restarted process has a new producer.
    run_clock(
        &env.settings.kafka,
        &appender(env),
        &ClockOptions {
            worlds: worlds.to_vec(),
            tick_interval_ms: 1,
            time_scale: 60_000,
            max_ticks: Some(ticks),
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_restarted_clock_then_ticks_continue_without_skip_or_repeat() {
    let env = TestEnv::new(3).await;
    let worlds: Vec<WorldId> = ["north", "south", "east", "west"]
        .iter()
        .map(|w| WorldId::parse(w).unwrap())
        .collect();
    tick(&env, &worlds, 20).await;
    tick(&env, &worlds, 15).await;
    tick(&env, &worlds, 5).await;

    let records = env.read_topic(&env.topic(Family::Clock));
    let mut ticks: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for record in &records {
        let envelope = decode_envelope(record.payload.as_deref().unwrap()).unwrap();
        let key = String::from_utf8(record.key.clone().unwrap()).unwrap();
        assert_eq!(key, envelope.world_id, "records are keyed by world id");
        assert_eq!(
            record.partition,
            partition_for_key(key.as_bytes(), 3),
            "Kafka placed the world where the Java partitioner would"
        );
        let Some(Body::ClockTicked(body)) = envelope.body else {
            panic!("not a tick");
        };
        ticks
            .entry(envelope.world_id)
            .or_default()
            .push((envelope.world_tick, body.game_time_s));
    }
    for world in &worlds {
        let seen = &ticks[world.as_str()];
        let expected: Vec<(u64, u64)> = (1..=40).map(|t| (t, t * 60)).collect();
        assert_eq!(
            seen, &expected,
            "world {world}: ticks 1..=40 once each, in order"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_carries_cloudevents_headers_and_a_traceparent() {
    let env = TestEnv::new(1).await;
    let world = WorldId::parse("headers").unwrap();
    tick(&env, std::slice::from_ref(&world), 3).await;
    let records = env.read_topic(&env.topic(Family::Clock));
    assert_eq!(records.len(), 3);
    for record in records {
        let envelope = decode_envelope(record.payload.as_deref().unwrap()).unwrap();
        let headers: HashMap<_, _> = record.headers.into_iter().collect();
        assert_eq!(headers["ce_specversion"], "1.0");
        assert_eq!(
            headers["ce_id"],
            uuid::Uuid::from_slice(&envelope.event_id)
                .unwrap()
                .to_string()
        );
        assert_eq!(headers["ce_type"], "worldline.v1.ClockTicked");
        assert_eq!(headers["ce_source"], "/worldline/clock");
        assert_eq!(headers["ce_subject"], "headers");
        assert!(headers["ce_time"].ends_with('Z'));
        assert!(headers["content-type"].starts_with("application/protobuf"));
        assert_eq!(headers["traceparent"].len(), 55);
    }
    env.cleanup().await;
}
