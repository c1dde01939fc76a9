//! `events dump|tail` on real Kafka: every family printed as JSON lines, a
//! poison record printed as an error line instead of being skipped, and the
//! filters (world, family, offset, limit, follow).

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use worldline_ops::inspect::{DumpRequest, StartFrom, dump};
use worldline_producers::{Appender, AppenderOptions};
use worldline_schemas::envelope::{EnvelopeExt, new_envelope};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WeatherCondition, WorldCreated, WorldPaused,
};
use worldline_schemas::{Family, WorldId};
use worldline_tests::{TestEnv, eventually};

const POISON: &[u8] = b"not an envelope";
const POISON_BASE64: &str = "bm90IGFuIGVudmVsb3Bl";

fn appender(env: &TestEnv) -> Appender {
    Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            source: "inspect-test".to_owned(),
            ..AppenderOptions::default()
        },
    )
    .unwrap()
}

/// One event of every family (two for the world family) for `world`.
fn events_of_every_family(world: &str) -> Vec<Envelope> {
    let world = WorldId::parse(world).unwrap();
    vec![
        new_envelope(
            &world,
            0,
            "gateway",
            Body::WorldCreated(WorldCreated {
                display_name: "Emberfall".to_owned(),
                seed: 42,
                time_scale: 60,
                tick_interval_ms: 1000,
                regions: vec!["north".to_owned(), "coast".to_owned()],
            }),
        ),
        new_envelope(
            &world,
            1,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: 60,
                day: 0,
                season: Season::Spring as i32,
                time_scale: 60,
            }),
        ),
        new_envelope(
            &world,
            1,
            "weather",
            Body::WeatherChanged(WeatherChanged {
                region: "north".to_owned(),
                condition: WeatherCondition::Rain as i32,
                temperature_dc: 84,
                wind_dmps: 52,
                precipitation_dmmph: 31,
                previous_condition: WeatherCondition::Cloudy as i32,
                ..Default::default()
            }),
        ),
        new_envelope(
            &world,
            1,
            "gateway",
            Body::StoryChoiceMade(StoryChoiceMade {
                player_id: "player-00417".to_owned(),
                story_id: "the-drowned-bell".to_owned(),
                node_id: "harbour-gate".to_owned(),
                choice_id: "bribe-the-guard".to_owned(),
                next_node_id: "smugglers-den".to_owned(),
                context: HashMap::from([("gold_spent".to_owned(), "25".to_owned())]),
            }),
        ),
        new_envelope(
            &world,
            1,
            "simulator/inference",
            Body::InferenceRecorded(InferenceRecorded {
                model_id: "npc-chat".to_owned(),
                model_version: "2026-02-11-q4".to_owned(),
                purpose: InferencePurpose::NpcDialogue as i32,
                prompt_tokens: 812,
                completion_tokens: 143,
                latency_ms: 584,
                cost_micro_usd: 1265,
                outcome: InferenceOutcome::Ok as i32,
                npc_id: "npc-harbourmaster-ilsa".to_owned(),
                input_hash: "9f2b6c1e4a7d8f03".to_owned(),
            }),
        ),
        new_envelope(
            &world,
            2,
            "gateway",
            Body::WorldPaused(WorldPaused {
                reason: "maintenance".to_owned(),
            }),
        ),
    ]
}

async fn append_all(appender: &Appender, events: &[Envelope]) {
    for result in appender.append_batch(events).await {
        result.unwrap();
    }
}

async fn send_poison(env: &TestEnv, family: Family, key: &str) {
    env.send_raw(family, key, POISON).await;
}

async fn dump_lines(env: &TestEnv, request: DumpRequest) -> Vec<Value> {
    let mut out = Vec::new();
    let printed = dump(&env.settings.kafka, &env.settings.topics, request, &mut out)
        .await
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        printed,
        lines.len() as u64,
        "returned count = lines printed"
    );
    lines
}

fn event_ids(lines: &[Value]) -> BTreeSet<String> {
    lines
        .iter()
        .filter_map(|line| line["event"]["eventId"].as_str().map(str::to_owned))
        .collect()
}

fn ids_of(events: &[Envelope]) -> BTreeSet<String> {
    events.iter().map(|e| e.event_uuid().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_events_of_every_family_and_a_poison_record_when_dumped_then_every_record_is_a_json_line()
 {
    let env = TestEnv::new(3).await;
    let events = events_of_every_family("emberfall");
    append_all(&appender(&env), &events).await;
    send_poison(&env, Family::Clock, "emberfall").await;

    let lines = dump_lines(&env, DumpRequest::dump(CancellationToken::new())).await;

    assert_eq!(lines.len(), events.len() + 1, "{lines:#?}");
    assert_eq!(event_ids(&lines), ids_of(&events));
    for event in &events {
        let id = event.event_uuid().to_string();
        let line = lines
            .iter()
            .find(|l| l["event"]["eventId"] == id.as_str())
            .unwrap();
        let family = event.family().unwrap();
        assert_eq!(line["topic"], env.topic(family));
        assert_eq!(line["key"], "emberfall");
        assert!(line["partition"].is_i64() && line["offset"].is_i64());
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(line["headers"]["ce_id"], id.as_str());
        assert_eq!(line["headers"]["ce_subject"], "emberfall");
        assert_eq!(line["event"]["family"], family.as_str());
        assert_eq!(
            line["headers"]["ce_type"], line["event"]["type"],
            "the header and the decoded body agree on the type"
        );
        assert_eq!(line["event"]["worldId"], "emberfall");
        assert!(line.get("error").is_none());
    }
    let story = lines
        .iter()
        .find(|l| l["event"]["family"] == "story")
        .unwrap();
    assert_eq!(
        story["event"]["storyChoiceMade"]["context"]["gold_spent"],
        "25"
    );
    let inference = lines
        .iter()
        .find(|l| l["event"]["family"] == "inference")
        .unwrap();
    assert_eq!(
        inference["event"]["inferenceRecorded"]["purpose"],
        "INFERENCE_PURPOSE_NPC_DIALOGUE"
    );

    let poison: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0]["topic"], env.topic(Family::Clock));
    assert_eq!(poison[0]["key"], "emberfall");
    assert_eq!(poison[0]["payload_base64"], POISON_BASE64);
    assert!(poison[0].get("event").is_none());
    assert!(
        poison[0]["error"]
            .as_str()
            .unwrap()
            .contains("not a worldline.v1.Envelope"),
        "{}",
        poison[0]
    );

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_two_worlds_when_dumped_with_filters_then_only_matching_records_are_printed() {
    let env = TestEnv::new(3).await;
    let appender = appender(&env);
    let emberfall = events_of_every_family("emberfall");
    let ashgrove = events_of_every_family("ashgrove");
    append_all(&appender, &emberfall).await;
    append_all(&appender, &ashgrove).await;
    send_poison(&env, Family::Story, "ashgrove").await;

    let one_world = dump_lines(
        &env,
        DumpRequest {
            world: Some(WorldId::parse("ashgrove").unwrap()),
            ..DumpRequest::dump(CancellationToken::new())
        },
    )
    .await;
    assert_eq!(event_ids(&one_world), ids_of(&ashgrove));
    assert_eq!(one_world.len(), ashgrove.len() + 1, "the poison record too");
    assert!(one_world.iter().all(|l| l["key"] == "ashgrove"));

    let world_family = dump_lines(
        &env,
        DumpRequest {
            families: vec![Family::World],
            ..DumpRequest::dump(CancellationToken::new())
        },
    )
    .await;
    assert_eq!(world_family.len(), 4, "created + paused for two worlds");
    assert!(
        world_family
            .iter()
            .all(|l| l["topic"] == env.topic(Family::World))
    );

    let limited = dump_lines(
        &env,
        DumpRequest {
            limit: Some(3),
            ..DumpRequest::dump(CancellationToken::new())
        },
    )
    .await;
    assert_eq!(limited.len(), 3);

    // Both worlds' world events sit in one partition only if they hash alike;
    // with an offset past every record nothing is left to print either way.
    let past_the_end = dump_lines(
        &env,
        DumpRequest {
            from: StartFrom::Offset(1_000),
            ..DumpRequest::dump(CancellationToken::new())
        },
    )
    .await;
    assert!(past_the_end.is_empty());

    let from_the_end = dump_lines(
        &env,
        DumpRequest {
            from: StartFrom::End,
            ..DumpRequest::dump(CancellationToken::new())
        },
    )
    .await;
    assert!(
        from_the_end.is_empty(),
        "a bounded dump from the end is empty"
    );

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_tail_when_events_are_appended_then_only_new_events_are_printed_until_the_limit() {
    let env = TestEnv::new(3).await;
    let appender = appender(&env);
    let before = events_of_every_family("emberfall");
    append_all(&appender, &before).await;

    let shutdown = CancellationToken::new();
    let request = DumpRequest {
        families: vec![Family::Weather],
        limit: Some(3),
        ..DumpRequest::tail(shutdown.clone())
    };
    let kafka = env.settings.kafka.clone();
    let topics = env.settings.topics.clone();
    let tail = tokio::spawn(async move {
        let mut out = Vec::new();
        let printed = dump(&kafka, &topics, request, &mut out).await.unwrap();
        (printed, String::from_utf8(out).unwrap())
    });

    // The tail starts at the end it finds, which the test cannot observe, so
    // new events keep coming until it has printed its three lines.
    let mut appended = Vec::new();
    eventually(
        Duration::from_secs(30),
        "the tail to print 3 new events",
        || {
            let batch = events_of_every_family("emberfall");
            let appender = appender.clone();
            let finished = tail.is_finished();
            appended.extend(batch.clone());
            async move {
                if finished {
                    return Some(());
                }
                append_all(&appender, &batch).await;
                None
            }
        },
    )
    .await;
    let (printed, text) = tail.await.unwrap();

    assert_eq!(printed, 3);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["event"]["family"] == "weather"));
    let printed_ids = event_ids(&lines);
    assert!(
        printed_ids.is_disjoint(&ids_of(&before)),
        "nothing from before the tail started"
    );
    assert!(printed_ids.is_subset(&ids_of(&appended)));

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_tail_with_nothing_new_when_shut_down_then_it_returns_without_printing() {
    let env = TestEnv::new(2).await;
    append_all(&appender(&env), &events_of_every_family("emberfall")).await;
    let shutdown = CancellationToken::new();
    let kafka = env.settings.kafka.clone();
    let topics = env.settings.topics.clone();
    let request = DumpRequest::tail(shutdown.clone());
    let tail = tokio::spawn(async move {
        let mut out = Vec::new();
        let printed = dump(&kafka, &topics, request, &mut out).await.unwrap();
        (printed, out)
    });

    shutdown.cancel();
    let (printed, out) = tail.await.unwrap();

    assert_eq!(printed, 0);
    assert!(out.is_empty());
    env.cleanup().await;
}
