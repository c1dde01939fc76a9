//! A world as of a tick over HTTP: `GET /v1/worlds/{world}/state?at_tick=N`,
//! answered from the read models' history, equals the state folded from the
//! log at N (`worldline world <world> --at-tick N`), field for field, except
//! what the read models keep no history of, which the answer names.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, HashSet};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_projectors::world_state::{AsOf, world_state_from_log};
use worldline_query_api::AppState;
use worldline_schemas::WorldId;
use worldline_schemas::envelope::{EnvelopeExt, new_envelope};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season, StoryChoiceMade,
    WeatherChanged, WeatherCondition,
};
use worldline_tests::api::{Server, content_type};
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, fixture, pipeline};

const WORLD: &str = "w-000";

fn clock(world: &WorldId, tick: u64) -> Envelope {
    fixture::clock_ticked(
        world,
        tick,
        u32::try_from(tick / 1440).unwrap(),
        Season::Spring,
    )
}

fn weather(world: &WorldId, tick: u64, condition: WeatherCondition) -> Envelope {
    new_envelope(
        world,
        tick,
        "weather",
        Body::WeatherChanged(WeatherChanged {
            region: "north".to_owned(),
            condition: condition as i32,
            temperature_dc: -40,
            wind_dmps: 90,
            precipitation_dmmph: 25,
            ..Default::default()
        }),
    )
}

fn choice(world: &WorldId, tick: u64, next: &str) -> Envelope {
    new_envelope(
        world,
        tick,
        "game-server",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: "player-late".to_owned(),
            story_id: "caravan".to_owned(),
            node_id: "n0".to_owned(),
            choice_id: format!("to-{next}"),
            next_node_id: next.to_owned(),
            context: Default::default(),
        }),
    )
}

fn inference(world: &WorldId, tick: u64, outcome: InferenceOutcome) -> Envelope {
    new_envelope(
        world,
        tick,
        "npc-runtime",
        Body::InferenceRecorded(InferenceRecorded {
            model_id: "npc-chat".to_owned(),
            model_version: "1".to_owned(),
            purpose: InferencePurpose::Narration as i32,
            prompt_tokens: 1000,
            completion_tokens: 7,
            latency_ms: 40,
            cost_micro_usd: 333,
            outcome: outcome as i32,
            npc_id: String::new(),
            input_hash: "tail".to_owned(),
        }),
    )
}

/// Events after the workload's last tick `t`, each appended on its own so their
/// log order is the order written here: two weather changes at one tick (the
/// later wins), a choice appended after a choice at a higher tick (log order
/// wins, not tick order), failed inferences, and a redelivered weather change
/// that must change nothing.
fn tail(world: &WorldId, t: u64) -> Vec<Envelope> {
    let rain = weather(world, t + 1, WeatherCondition::Rain);
    vec![
        clock(world, t + 1),
        rain.clone(),
        weather(world, t + 1, WeatherCondition::Snow),
        inference(world, t + 1, InferenceOutcome::Error),
        inference(world, t + 1, InferenceOutcome::Timeout),
        clock(world, t + 2),
        choice(world, t + 2, "high"),
        choice(world, t + 1, "low"),
        rain,
    ]
}

/// Distinct choices per player and story at or before `tick`, from what was appended.
fn choices_made(appended: &[Envelope], tick: u64) -> Value {
    let mut seen = HashSet::new();
    let mut made: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for envelope in appended {
        if envelope.world_id != WORLD
            || envelope.world_tick > tick
            || !seen.insert(envelope.event_uuid())
        {
            continue;
        }
        if let Some(Body::StoryChoiceMade(choice)) = &envelope.body {
            *made
                .entry(choice.player_id.clone())
                .or_default()
                .entry(choice.story_id.clone())
                .or_default() += 1;
        }
    }
    serde_json::to_value(made).unwrap()
}

struct Api {
    server: Server,
}

impl Api {
    async fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> (StatusCode, String, Value) {
        let url = self.server.url_of(segments, query);
        let response = self.server.http.get(url).send().await.unwrap();
        let status = response.status();
        let content_type = content_type(&response);
        let body = response.json().await.unwrap();
        (status, content_type, body)
    }

    async fn ok(&self, segments: &[&str], query: &[(&str, &str)]) -> Value {
        let (status, content_type, body) = self.get(segments, query).await;
        assert_eq!(status, StatusCode::OK, "{segments:?} {query:?}: {body}");
        assert_eq!(content_type, "application/json");
        body
    }

    async fn state(&self, world: &str, query: &[(&str, &str)]) -> (StatusCode, String, Value) {
        self.get(&["v1", "worlds", world, "state"], query).await
    }

    /// A problem+json answer with `status`.
    async fn problem(&self, world: &str, query: &[(&str, &str)], status: StatusCode) -> Value {
        let (got, content_type, body) = self.state(world, query).await;
        assert_eq!(got, status, "{world} {query:?}: {body}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["status"], status.as_u16());
        body
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_served_at_a_tick_equals_the_state_folded_from_the_log_at_that_tick() {
    let env = TestEnv::new(2).await;
    let appender = env.appender();
    let world = WorldId::parse(WORLD).unwrap();
    let mut workload = Workload::new(2, 71);
    let mut appended = workload.creations();
    appended.extend(workload.next_batch(900));
    pipeline::append(&appender, &appended).await;
    let last = appended
        .iter()
        .filter(|e| e.world_id == WORLD)
        .map(|e| e.world_tick)
        .max()
        .unwrap();
    assert!(last > 30, "the workload ticked the world ({last} ticks)");
    for event in tail(&world, last) {
        pipeline::append(&appender, std::slice::from_ref(&event)).await;
        appended.push(event);
    }
    let latest = last + 2;

    let live = env.start_all_projectors();
    env.wait_all_caught_up().await;
    let app = worldline_query_api::app(AppState::new(env.pool.clone()), Health::default());
    let api = Api {
        server: Server::start(app, CancellationToken::new()).await,
    };
    let summary = api.ok(&["v1", "worlds", WORLD], &[]).await;
    assert_eq!(summary["latest_tick"], latest);
    let clock_now = api.ok(&["v1", "worlds", WORLD, "clock"], &[]).await;
    assert_eq!(clock_now["tick"], latest);

    let mut answers = BTreeMap::new();
    for tick in [0, last / 3, 2 * last / 3, last + 1, latest, latest + 50] {
        let (kafka, prefix, of) = (
            env.settings.kafka.clone(),
            env.settings.topics.prefix.clone(),
            world.clone(),
        );
        let folded = tokio::task::spawn_blocking(move || {
            world_state_from_log(&kafka, &prefix, &of, AsOf::Tick(tick))
        })
        .await
        .unwrap()
        .unwrap();
        let folded = serde_json::to_value(&folded).unwrap();
        let served = api
            .ok(
                &["v1", "worlds", WORLD, "state"],
                &[("at_tick", &tick.to_string())],
            )
            .await;

        assert_eq!(served["at_tick"], tick);
        assert_eq!(served["latest_tick"], latest);
        for field in [
            "world_id",
            "display_name",
            "weather",
            "story_progress",
            "inference",
        ] {
            assert_eq!(served[field], folded[field], "{field} at tick {tick}");
        }
        assert_eq!(
            served["story_choices_made"],
            choices_made(&appended, tick),
            "choices made at tick {tick}"
        );
        // Only from the latest tick on do the read models hold the clock and
        // the event count.
        let unavailable = served["unavailable"].as_array().unwrap();
        if tick >= latest {
            assert_eq!(served["clock"], folded["clock"], "clock at tick {tick}");
            assert_eq!(served["events"], folded["events"], "events at tick {tick}");
            assert!(unavailable.is_empty(), "{served}");
        } else {
            assert_eq!(served["clock"], Value::Null, "clock at tick {tick}");
            assert_eq!(served["events"], Value::Null, "events at tick {tick}");
            assert_eq!(*unavailable, vec![json!("clock"), json!("events")]);
        }
        answers.insert(tick, served);
    }

    // The parts hold data that moves with the tick, so the comparisons above
    // compared something.
    let middle = &answers[&(2 * last / 3)];
    assert!(!middle["weather"].as_object().unwrap().is_empty());
    assert!(!middle["story_progress"].as_object().unwrap().is_empty());
    assert!(
        middle["inference"]["inferences"].as_i64().unwrap()
            > answers[&(last / 3)]["inference"]["inferences"]
                .as_i64()
                .unwrap()
    );
    assert_eq!(answers[&0]["story_progress"], json!({}));

    // The tail's rules, stated outright.
    let end = &answers[&latest];
    assert_eq!(
        end["weather"]["north"],
        json!({"condition": "snow", "temperature_dc": -40, "wind_dmps": 90,
               "precipitation_dmmph": 25, "since_tick": last + 1}),
        "the later of two changes at one tick wins; a redelivery changes nothing"
    );
    assert_eq!(
        end["story_progress"]["player-late"],
        json!({"caravan": "low"})
    );
    assert_eq!(
        end["story_choices_made"]["player-late"],
        json!({"caravan": 2})
    );
    assert_eq!(
        answers[&(last + 1)]["story_progress"]["player-late"],
        json!({"caravan": "low"})
    );
    let before = &answers[&(2 * last / 3)]["inference"];
    assert!(
        end["inference"]["failures"].as_i64().unwrap() >= before["failures"].as_i64().unwrap() + 2
    );
    assert_eq!(
        end["clock"],
        json!({"tick": latest, "game_time_s": latest * 60, "day": 0, "season": "spring"})
    );

    // Past the latest tick nothing more happened: the current state.
    let mut beyond = answers[&(latest + 50)].clone();
    beyond["at_tick"] = json!(latest);
    assert_eq!(beyond, *end);

    // Bad ticks name the parameter; unknown worlds are 404s.
    for query in [
        vec![],
        vec![("at_tick", "-1")],
        vec![("at_tick", "ten")],
        vec![("at_tick", "1.5")],
        vec![("at_tick", "")],
        vec![("at_tick", "9223372036854775808")],
    ] {
        let problem = api.problem(WORLD, &query, StatusCode::BAD_REQUEST).await;
        assert_eq!(problem["parameter"], "at_tick", "{query:?}: {problem}");
    }
    let unknown = api
        .problem("nowhere", &[("at_tick", "0")], StatusCode::NOT_FOUND)
        .await;
    assert!(unknown["detail"].as_str().unwrap().contains("nowhere"));
    let bad_world = api
        .problem("no world", &[("at_tick", "0")], StatusCode::BAD_REQUEST)
        .await;
    assert_eq!(bad_world["parameter"], "world");

    // The document covers the route, its parameter and its answers.
    let doc = api.ok(&["openapi.json"], &[]).await;
    let operation = &doc["paths"]["/v1/worlds/{world}/state"]["get"];
    for status in ["200", "400", "404", "503"] {
        assert!(operation["responses"][status].is_object(), "{status}");
    }
    let at_tick = operation["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "at_tick")
        .unwrap();
    assert_eq!(at_tick["in"], "query");
    assert_eq!(at_tick["required"], true);

    api.server.stop();
    pipeline::stop_all(live).await;
    env.cleanup().await;
}
