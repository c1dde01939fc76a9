//! The HTTP ingest gateway on real Kafka: what valid requests append (topics,
//! partitions, keys, headers, ids), that every invalid request is answered with
//! its status and problem document while nothing reaches Kafka, bearer-token
//! auth, idempotent retries, and 503 when Kafka cannot take the write.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worldline_ops::Settings;
use worldline_ops::consistency::ConsistencyToken;
use worldline_producers::gateway::{self, GatewayState};
use worldline_producers::partitioner::partition_for_key;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    Envelope, EnvelopeBatch, StoryChoiceMade, WeatherChanged, WeatherCondition, WorldPaused,
};
use worldline_schemas::{EnvelopeExt, Family, WorldId, decode_envelope};
use worldline_tests::api::{Server, token};
use worldline_tests::{RawRecord, TestEnv, eventually};

const PARTITIONS: i32 = 3;
const WORLD: &str = "emberfall";
const INGEST: &str = "Bearer game-secret";
const PROTOBUF: &str = "application/x-protobuf";
const PROTOBUF_BATCH: &str = "application/x-protobuf; proto=worldline.v1.EnvelopeBatch";

/// A fresh test environment whose event topics can be read at once.
///
/// Freshly created topics need a moment before every partition has a leader;
/// reading one before that fails with NotLeaderForPartition, and these tests
/// read topics that nothing was written to.
async fn test_env() -> TestEnv {
    let env = TestEnv::new(PARTITIONS).await;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.kafka.bootstrap_servers)
        .create()
        .unwrap();
    for family in Family::ALL {
        let topic = env.topic(family);
        for partition in 0..PARTITIONS {
            eventually(Duration::from_secs(30), "a partition leader", || {
                let (consumer, topic) = (&consumer, &topic);
                async move {
                    tokio::task::block_in_place(|| {
                        consumer
                            .fetch_watermarks(topic, partition, Duration::from_secs(5))
                            .ok()
                    })
                }
            })
            .await;
        }
    }
    env
}

/// A gateway served on a free local port until dropped.
struct Gateway {
    server: Server,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// The test's settings with three tokens: `game` (ingest, every world), `eu`
/// (ingest, emberfall only) and `dashboard` (read only).
fn settings(env: &TestEnv) -> Settings {
    let mut settings = env.settings.clone();
    settings.auth.tokens = vec![
        token("game", "game-secret", &["ingest"], None),
        token("eu", "eu-secret", &["ingest"], Some(&[WORLD])),
        token("dashboard", "read-secret", &["read"], None),
    ];
    settings
}

async fn start(settings: &Settings) -> Gateway {
    let state = GatewayState::from_settings(settings).unwrap();
    let router = gateway::router(state).merge(worldline_ops::health::router(
        worldline_ops::Health::default(),
    ));
    Gateway {
        server: Server::start(router, CancellationToken::new()).await,
    }
}

impl Gateway {
    fn url(&self, world: &str) -> String {
        self.server.url(&format!("/v1/worlds/{world}/events"))
    }

    async fn post(
        &self,
        world: &str,
        authorization: Option<&str>,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HashMap<String, String>, Value) {
        let mut request = self.server.http.post(self.url(world)).body(body);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    async fn post_json(
        &self,
        world: &str,
        body: &Value,
    ) -> (StatusCode, HashMap<String, String>, Value) {
        self.post(
            world,
            Some(INGEST),
            Some("application/json"),
            &[],
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }
}

fn weather_json(region: &str, condition: &str) -> Value {
    json!({
        "type": "WeatherChanged",
        "world_tick": 42,
        "data": {"region": region, "condition": condition, "temperature_dc": -35,
                 "wind_dmps": 40, "precipitation_dmmph": 12}
    })
}

fn story_json(player: &str) -> Value {
    json!({
        "type": "StoryChoiceMade",
        "world_tick": 43,
        "source": "game-server/eu-1",
        "data": {"player_id": player, "story_id": "the-ferry", "node_id": "dock",
                 "choice_id": "pay-the-ferryman", "context": {"party": "3"}}
    })
}

fn inference_json() -> Value {
    json!({
        "type": "InferenceRecorded",
        "world_tick": 44,
        "data": {"model_id": "npc-chat", "model_version": "2026-10-01", "purpose": "npc_dialogue",
                 "prompt_tokens": 120, "completion_tokens": 40, "latency_ms": 350,
                 "cost_micro_usd": 90, "outcome": "ok", "npc_id": "smith"}
    })
}

/// Every record of every event topic of the test, by family.
fn all_records(env: &TestEnv) -> HashMap<Family, Vec<RawRecord>> {
    Family::ALL
        .into_iter()
        .map(|family| (family, env.read_topic(&env.topic(family))))
        .collect()
}

fn assert_no_events(env: &TestEnv, after: &str) {
    for (family, records) in all_records(env) {
        assert!(
            records.is_empty(),
            "after {after}: {} record(s) reached the {family} topic",
            records.len()
        );
    }
}

/// The record at the position an answer reported, checked against it.
fn record_at<'a>(records: &'a HashMap<Family, Vec<RawRecord>>, reported: &Value) -> &'a RawRecord {
    let topic = reported["topic"].as_str().unwrap();
    let family = Family::ALL
        .into_iter()
        .find(|f| topic.ends_with(&format!("worldline.{f}.v1")))
        .unwrap();
    records[&family]
        .iter()
        .find(|r| {
            i64::from(r.partition) == reported["partition"].as_i64().unwrap()
                && r.offset == reported["offset"].as_i64().unwrap()
        })
        .unwrap_or_else(|| panic!("no record at {reported}"))
}

fn header<'a>(record: &'a RawRecord, name: &str) -> &'a str {
    record
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// Checks that the reported event is in the log as reported: its topic and
/// partition, key, id and headers. Returns the decoded envelope.
fn assert_appended(
    env: &TestEnv,
    records: &HashMap<Family, Vec<RawRecord>>,
    reported: &Value,
) -> Envelope {
    let record = record_at(records, reported);
    let envelope = decode_envelope(record.payload.as_deref().unwrap()).unwrap();
    assert_eq!(envelope.event_uuid().to_string(), reported["event_id"]);
    assert_eq!(
        record.key.as_deref(),
        Some(WORLD.as_bytes()),
        "keyed by world"
    );
    assert_eq!(
        record.partition,
        partition_for_key(WORLD.as_bytes(), PARTITIONS),
        "the Java-compatible partition of the world"
    );
    let family = envelope.family().unwrap();
    assert_eq!(reported["topic"], env.topic(family));
    assert_eq!(header(record, "ce_id"), reported["event_id"]);
    assert_eq!(header(record, "ce_type"), reported["type"]);
    assert_eq!(header(record, "ce_subject"), WORLD);
    assert_eq!(envelope.world_id, WORLD);
    envelope
}

fn assert_token_covers(body: &Value) {
    let token = ConsistencyToken::decode(body["consistency_token"].as_str().unwrap()).unwrap();
    let mut expected: HashMap<(String, i32), i64> = HashMap::new();
    for event in body["events"].as_array().unwrap() {
        let key = (
            event["topic"].as_str().unwrap().to_owned(),
            i32::try_from(event["partition"].as_i64().unwrap()).unwrap(),
        );
        let offset = event["offset"].as_i64().unwrap();
        let entry = expected.entry(key).or_insert(offset);
        *entry = (*entry).max(offset);
    }
    let covered: HashMap<(String, i32), i64> = token
        .positions()
        .iter()
        .map(|(t, p, o)| ((t.clone(), *p), *o))
        .collect();
    assert_eq!(
        covered, expected,
        "the token holds the highest offset per partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_valid_json_then_single_events_and_batches_land_in_their_family_topics() {
    let env = test_env().await;
    let gateway = start(&settings(&env)).await;

    let client_id = Uuid::now_v7();
    let mut single = weather_json("north", "rain");
    single["event_id"] = json!(client_id);
    let (status, _, one) = gateway.post_json(WORLD, &single).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(
        one["events"][0]["event_id"],
        client_id.to_string(),
        "client id kept"
    );

    let batch = json!({"events": [story_json("p1"), inference_json(), story_json("p2")]});
    let (status, _, many) = gateway.post_json(WORLD, &batch).await;
    assert_eq!(status, StatusCode::OK, "{many}");
    assert_eq!(many["events"].as_array().unwrap().len(), 3);

    let records = all_records(&env);
    let weather = assert_appended(&env, &records, &one["events"][0]);
    let Some(Body::WeatherChanged(body)) = weather.body else {
        panic!("not weather");
    };
    assert_eq!(body.condition, WeatherCondition::Rain as i32);
    assert_eq!(body.temperature_dc, -35);
    assert_eq!(weather.world_tick, 42);
    assert_eq!(
        header(record_at(&records, &one["events"][0]), "ce_source"),
        "/worldline/gateway"
    );

    let first_choice = assert_appended(&env, &records, &many["events"][0]);
    let second_choice = assert_appended(&env, &records, &many["events"][2]);
    let inference = assert_appended(&env, &records, &many["events"][1]);
    assert_eq!(first_choice.event_uuid().get_version_num(), 7, "fresh id");
    assert_eq!(first_choice.source, "game-server/eu-1");
    assert_eq!(
        header(record_at(&records, &many["events"][0]), "ce_source"),
        "/worldline/game-server/eu-1"
    );
    assert!(
        many["events"][2]["offset"].as_i64() > many["events"][0]["offset"].as_i64(),
        "one world's events keep the batch's order within a family"
    );
    let (Some(Body::StoryChoiceMade(p1)), Some(Body::StoryChoiceMade(p2))) =
        (first_choice.body, second_choice.body)
    else {
        panic!("not story choices");
    };
    assert_eq!((p1.player_id.as_str(), p2.player_id.as_str()), ("p1", "p2"));
    assert_eq!(p1.context["party"], "3");
    assert_eq!(inference.family(), Some(Family::Inference));
    assert_eq!(records[&Family::Story].len(), 2);
    assert_eq!(records[&Family::Inference].len(), 1);
    assert_eq!(records[&Family::Weather].len(), 1);
    assert_token_covers(&one);
    assert_token_covers(&many);
    drop(gateway);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_protobuf_then_a_single_envelope_and_a_batch_are_appended() {
    let env = test_env().await;
    let gateway = start(&settings(&env)).await;
    let world = WorldId::parse(WORLD).unwrap();

    let single = new_envelope(
        &world,
        7,
        "tools/admin",
        Body::WorldPaused(WorldPaused {
            reason: "maintenance".to_owned(),
        }),
    );
    let (status, _, one) = gateway
        .post(
            WORLD,
            Some(INGEST),
            Some(PROTOBUF),
            &[],
            single.encode_to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{one}");

    // Blank ids, worlds and times are filled in by the gateway.
    let mut blank = new_envelope(
        &world,
        8,
        "",
        Body::WeatherChanged(WeatherChanged {
            region: "coast".to_owned(),
            condition: WeatherCondition::Fog as i32,
            ..Default::default()
        }),
    );
    blank.event_id.clear();
    blank.world_id.clear();
    blank.occurred_at_ms = 0;
    let story = new_envelope(
        &world,
        9,
        "game",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: "p".to_owned(),
            story_id: "s".to_owned(),
            node_id: "n".to_owned(),
            choice_id: "c".to_owned(),
            ..Default::default()
        }),
    );
    let batch = EnvelopeBatch {
        events: vec![blank, story.clone()],
    };
    let (status, _, many) = gateway
        .post(
            WORLD,
            Some(INGEST),
            Some(PROTOBUF_BATCH),
            &[],
            batch.encode_to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{many}");

    let records = all_records(&env);
    let paused = assert_appended(&env, &records, &one["events"][0]);
    assert_eq!(paused, single, "a complete envelope is appended unchanged");
    let filled = assert_appended(&env, &records, &many["events"][0]);
    assert_eq!(filled.source, "gateway");
    assert!(filled.occurred_at_ms > 0);
    assert_eq!(filled.event_uuid().get_version_num(), 7);
    let appended_story = assert_appended(&env, &records, &many["events"][1]);
    assert_eq!(appended_story, story);
    assert_eq!(
        header(record_at(&records, &one["events"][0]), "ce_source"),
        "/worldline/tools/admin"
    );
    assert_token_covers(&many);
    drop(gateway);
    env.cleanup().await;
}

/// A bad request, what it must be answered with, and why it is bad.
struct BadCase {
    what: &'static str,
    world: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    problem: &'static str,
    pointer: Option<&'static str>,
    detail_mentions: &'static str,
}

fn bad_json(
    what: &'static str,
    body: &Value,
    status: u16,
    problem: &'static str,
    pointer: Option<&'static str>,
    detail_mentions: &'static str,
) -> BadCase {
    BadCase {
        what,
        world: WORLD,
        content_type: Some("application/json"),
        body: serde_json::to_vec(body).unwrap(),
        status,
        problem,
        pointer,
        detail_mentions,
    }
}

fn bad_cases(max_body_bytes: usize, max_batch_events: usize) -> Vec<BadCase> {
    let good = weather_json("north", "rain");
    let mut unknown_type = good.clone();
    unknown_type["type"] = json!("Earthquake");
    let mut missing_condition = weather_json("north", "rain");
    missing_condition["data"]
        .as_object_mut()
        .unwrap()
        .remove("condition");
    let mut other_world = good.clone();
    other_world["world_id"] = json!("frostholm");
    let mut empty_region = good.clone();
    empty_region["data"]["region"] = json!("");
    let mut duplicate = good.clone();
    duplicate["event_id"] = json!(Uuid::now_v7());
    let world = WorldId::parse("frostholm").unwrap();
    let foreign_envelope =
        new_envelope(&world, 1, "game", Body::WorldPaused(WorldPaused::default()));
    let mut no_body = foreign_envelope.clone();
    no_body.world_id = WORLD.to_owned();
    no_body.body = None;
    let padding = "x".repeat(max_body_bytes);
    vec![
        BadCase {
            what: "malformed JSON",
            world: WORLD,
            content_type: Some("application/json"),
            body: br#"{"events": [{"type": "WeatherChanged",}"#.to_vec(),
            status: 400,
            problem: "malformed-body",
            pointer: None,
            detail_mentions: "not valid JSON",
        },
        bad_json(
            "unknown type",
            &unknown_type,
            422,
            "unknown-event-type",
            Some("/type"),
            "Earthquake",
        ),
        bad_json(
            "missing field in a batch",
            &json!({"events": [good.clone(), good.clone(), good.clone(), missing_condition]}),
            422,
            "missing-field",
            Some("/events/3/data/condition"),
            "condition",
        ),
        bad_json(
            "world mismatch",
            &other_world,
            422,
            "world-mismatch",
            Some("/world_id"),
            "frostholm",
        ),
        bad_json(
            "bad enum value",
            &weather_json("north", "drizzle"),
            422,
            "invalid-value",
            Some("/data/condition"),
            "drizzle",
        ),
        bad_json(
            "contract rule (empty region)",
            &empty_region,
            422,
            "invalid-value",
            Some("/data/region"),
            "region",
        ),
        bad_json(
            "one bad event among good ones",
            &json!({"events": [good.clone(), weather_json("south", "hail")]}),
            422,
            "invalid-value",
            Some("/events/1/data/condition"),
            "hail",
        ),
        bad_json(
            "duplicate event id",
            &json!({"events": [duplicate.clone(), duplicate]}),
            422,
            "duplicate-event-id",
            Some("/events/1/event_id"),
            "more than once",
        ),
        bad_json(
            "empty batch",
            &json!({"events": []}),
            422,
            "empty-batch",
            Some("/events"),
            "no events",
        ),
        bad_json(
            "too many events",
            &json!({"events": vec![good.clone(); max_batch_events + 1]}),
            413,
            "too-many-events",
            Some("/events"),
            "split",
        ),
        bad_json(
            "oversize body",
            &json!({"events": [good.clone()], "padding": padding}),
            413,
            "body-too-large",
            None,
            "larger than",
        ),
        BadCase {
            what: "wrong content type",
            world: WORLD,
            content_type: Some("text/plain"),
            body: serde_json::to_vec(&good).unwrap(),
            status: 415,
            problem: "unsupported-media-type",
            pointer: None,
            detail_mentions: "application/json",
        },
        BadCase {
            what: "no content type",
            world: WORLD,
            content_type: None,
            body: serde_json::to_vec(&good).unwrap(),
            status: 415,
            problem: "unsupported-media-type",
            pointer: None,
            detail_mentions: "no Content-Type",
        },
        BadCase {
            what: "bad world id in the URL",
            world: "no%20spaces",
            content_type: Some("application/json"),
            body: serde_json::to_vec(&good).unwrap(),
            status: 400,
            problem: "bad-world-id",
            pointer: None,
            detail_mentions: "' '",
        },
        BadCase {
            what: "malformed protobuf",
            world: WORLD,
            content_type: Some(PROTOBUF),
            body: vec![0xff, 0xff, 0xff, 0xff],
            status: 400,
            problem: "malformed-body",
            pointer: None,
            detail_mentions: "worldline.v1.Envelope",
        },
        BadCase {
            what: "protobuf world mismatch",
            world: WORLD,
            content_type: Some(PROTOBUF_BATCH),
            body: EnvelopeBatch {
                events: vec![foreign_envelope],
            }
            .encode_to_vec(),
            status: 422,
            problem: "world-mismatch",
            pointer: Some("/events/0/world_id"),
            detail_mentions: "frostholm",
        },
        BadCase {
            what: "protobuf without a body",
            world: WORLD,
            content_type: Some(PROTOBUF),
            body: no_body.encode_to_vec(),
            status: 422,
            problem: "unknown-event-type",
            pointer: Some(""),
            detail_mentions: "no body",
        },
        BadCase {
            what: "empty protobuf batch",
            world: WORLD,
            content_type: Some(PROTOBUF_BATCH),
            body: Vec::new(),
            status: 422,
            problem: "empty-batch",
            pointer: Some("/events"),
            detail_mentions: "no events",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_bad_inputs_then_each_gets_its_status_and_problem_and_nothing_reaches_kafka() {
    let env = test_env().await;
    let mut settings = settings(&env);
    settings.gateway.max_body_bytes = 16 * 1024;
    settings.gateway.max_batch_events = 5;
    let gateway = start(&settings).await;

    for case in bad_cases(
        settings.gateway.max_body_bytes,
        settings.gateway.max_batch_events,
    ) {
        let (status, headers, problem) = gateway
            .post(case.world, Some(INGEST), case.content_type, &[], case.body)
            .await;
        let what = case.what;
        assert_eq!(status.as_u16(), case.status, "{what}: {problem}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{what}"
        );
        assert_eq!(
            problem["type"],
            format!("https://worldline.dev/problems/{}", case.problem),
            "{what}: {problem}"
        );
        assert_eq!(problem["status"], case.status, "{what}");
        assert!(problem["title"].is_string(), "{what}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(case.detail_mentions),
            "{what}: detail {detail:?} should mention {:?}",
            case.detail_mentions
        );
        assert_eq!(
            problem["pointer"].as_str(),
            case.pointer,
            "{what}: {problem}"
        );
    }
    assert_no_events(&env, "every bad request");
    drop(gateway);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_an_oversize_chunked_body_then_413_without_buffering_it() {
    let env = test_env().await;
    let mut settings = settings(&env);
    settings.gateway.max_body_bytes = 4096;
    let gateway = start(&settings).await;

    // No Content-Length: the limit has to be enforced while the body streams in.
    let mut stream = tokio::net::TcpStream::connect(gateway.server.addr)
        .await
        .unwrap();
    let head = format!(
        "POST /v1/worlds/{WORLD}/events HTTP/1.1\r\nhost: test\r\nauthorization: {INGEST}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = " ".repeat(1024);
    for _ in 0..8 {
        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
        if stream.write_all(framed.as_bytes()).await.is_err() {
            break; // the server may stop reading once it has answered
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("body-too-large"), "{answer}");
    assert_no_events(&env, "an oversize chunked body");
    drop(gateway);
    env.cleanup().await;
}

/// What, the `Authorization` header, the world, the status, the `WWW-Authenticate` challenge.
type AuthCase = (
    &'static str,
    Option<&'static str>,
    &'static str,
    u16,
    Option<&'static str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_tokens_then_auth_answers_401_403_404_or_appends() {
    let env = test_env().await;
    let gateway = start(&settings(&env)).await;
    let body = serde_json::to_vec(&weather_json("north", "rain")).unwrap();
    let json = Some("application/json");

    let cases: [AuthCase; 6] = [
        (
            "no token",
            None,
            WORLD,
            401,
            Some("Bearer realm=\"worldline\""),
        ),
        (
            "basic auth",
            Some("Basic Z2FtZTpzZWNyZXQ="),
            WORLD,
            401,
            Some("Bearer realm=\"worldline\""),
        ),
        (
            "unknown token",
            Some("Bearer not-a-token"),
            WORLD,
            401,
            Some("Bearer realm=\"worldline\", error=\"invalid_token\""),
        ),
        (
            "read-only token",
            Some("Bearer read-secret"),
            WORLD,
            403,
            Some("Bearer realm=\"worldline\", error=\"insufficient_scope\", scope=\"ingest\""),
        ),
        (
            "token for another world",
            Some("Bearer eu-secret"),
            "frostholm",
            404,
            None,
        ),
        (
            "token for another world, without the scope either",
            Some("Bearer eu-secret"),
            "frostholm",
            404,
            None,
        ),
    ];
    for (what, authorization, world, status, challenge) in cases {
        let (got, headers, problem) = gateway
            .post(world, authorization, json, &[], body.clone())
            .await;
        assert_eq!(got.as_u16(), status, "{what}: {problem}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{what}"
        );
        assert_eq!(problem["status"], status, "{what}");
        assert_eq!(
            headers.get("www-authenticate").map(String::as_str),
            challenge,
            "{what}"
        );
    }
    assert_no_events(&env, "refused tokens");

    let (status, _, accepted) = gateway
        .post(WORLD, Some("Bearer eu-secret"), json, &[], body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    let records = all_records(&env);
    assert_eq!(
        records[&Family::Weather].len(),
        1,
        "only the authorised request appended"
    );

    let metrics = gateway
        .server
        .http
        .get(gateway.server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for status in ["200", "401", "403", "404"] {
        let series = format!(
            "worldline_http_requests_total{{route=\"/v1/worlds/{{world}}/events\",status=\"{status}\"}}"
        );
        assert!(
            metrics.contains(&series),
            "{series} missing from:\n{metrics}"
        );
    }
    assert!(metrics.contains(
        "worldline_http_request_duration_seconds_bucket{route=\"/v1/worlds/{world}/events\""
    ));
    drop(gateway);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_same_idempotency_key_twice_then_the_event_ids_repeat() {
    let env = test_env().await;
    let gateway = start(&settings(&env)).await;
    let batch =
        serde_json::to_vec(&json!({"events": [story_json("p1"), inference_json()]})).unwrap();
    let send = |key: &'static str| {
        let batch = batch.clone();
        let gateway = &gateway;
        async move {
            let (status, _, body) = gateway
                .post(
                    WORLD,
                    Some(INGEST),
                    Some("application/json"),
                    &[("idempotency-key", key)],
                    batch,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["event_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let first = send("order-7781").await;
    let retry = send("order-7781").await;
    let other = send("order-7782").await;
    assert_eq!(first, retry, "a retried request carries the same event ids");
    assert_ne!(first, other);
    assert_ne!(first[0], first[1]);
    assert!(
        first
            .iter()
            .all(|id| Uuid::parse_str(id).unwrap().get_version_num() == 5)
    );

    // Both attempts are in the log under the same ids: projectors apply them once.
    let records = all_records(&env);
    let logged: Vec<String> = [Family::Story, Family::Inference]
        .iter()
        .flat_map(|f| records[f].iter())
        .map(|r| header(r, "ce_id").to_owned())
        .collect();
    for id in &first {
        assert_eq!(logged.iter().filter(|l| *l == id).count(), 2, "{id}");
    }
    drop(gateway);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_kafka_unreachable_then_503_with_retry_after_and_nothing_claimed() {
    let env = test_env().await;
    let mut settings = settings(&env);
    settings.kafka.bootstrap_servers = "127.0.0.1:1".to_owned();
    settings.gateway.append_timeout_ms = 1500;
    let gateway = start(&settings).await;

    let batch = json!({"events": [weather_json("north", "rain"), story_json("p1")]});
    let (status, headers, problem) = gateway.post_json(WORLD, &batch).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        problem["type"],
        "https://worldline.dev/problems/unavailable"
    );
    let events = problem["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    for event in events {
        assert_eq!(event["appended"], false, "{event}");
        assert!(Uuid::parse_str(event["event_id"].as_str().unwrap()).is_ok());
    }
    assert!(problem.get("consistency_token").is_none());
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("same event ids")
    );
    drop(gateway);
    env.cleanup().await;
}
