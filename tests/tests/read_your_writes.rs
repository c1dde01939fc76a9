//! Read-your-writes: the ingest gateway and the query API (built from settings,
//! as `worldline serve` builds it) on one port, every projector in-process. A
//! query carrying the consistency token of an append sees that append, on a
//! route reading one read model or several (`/state`), woken by the
//! projectors' notifications.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_producers::gateway::{GatewayState, router as gateway_router};
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::WorldCreated;
use worldline_schemas::pb::envelope::Body;
use worldline_tests::api::{Server, token};
use worldline_tests::pipeline::Pipeline;
use worldline_tests::{TestEnv, eventually};

const WORLD: &str = "emberfall";
const TOKEN: &str = "ryw-token";
const BOUND_MS: u64 = 1500;
const READY_MAX_LAG: u64 = 5;

struct Served {
    pipeline: Pipeline,
    server: Server,
}

async fn serve(run_projectors: bool) -> Served {
    serve_with(|_| {}, |_| run_projectors).await
}

/// Serves with `configure` applied to the settings; the projectors `keep`
/// names go on running once every schema exists, the others are stopped.
async fn serve_with(configure: impl FnOnce(&mut TestEnv), keep: impl Fn(&str) -> bool) -> Served {
    let mut env = TestEnv::new(2).await;
    env.settings
        .auth
        .tokens
        .push(token("game", TOKEN, &["read", "ingest"], None));
    env.settings.http.read_your_writes_timeout_ms = BOUND_MS;
    // Low, so the lag test can push a projector past it.
    env.settings.http.ready_max_lag_records = READY_MAX_LAG;
    configure(&mut env);
    let world = WorldId::parse(WORLD).unwrap();
    // The schemas (and projector_offsets) exist once each projector has run.
    let mut pipeline = Pipeline::over(
        env,
        &[new_envelope(
            &world,
            0,
            "test",
            Body::WorldCreated(WorldCreated {
                display_name: "Emberfall".to_owned(),
                seed: 1,
                time_scale: 60,
                tick_interval_ms: 1000,
                regions: vec!["north".to_owned()],
            }),
        )],
    )
    .await;
    pipeline.stop_projectors_except(keep).await;
    let settings = &pipeline.env.settings;
    let query = worldline_query_api::build(settings, Health::default())
        .await
        .unwrap();
    let gateway = GatewayState::from_settings(settings).unwrap();
    let app = query.merge(gateway_router(gateway));
    let server = Server::start(app, CancellationToken::new()).await;
    Served { pipeline, server }
}

impl Served {
    /// Posts `body` to the world's events through the gateway; returns the
    /// append's consistency token.
    async fn post_events(&self, body: &Value) -> String {
        let response = self
            .server
            .http
            .post(self.server.url(&format!("/v1/worlds/{WORLD}/events")))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "append");
        let body: Value = response.json().await.unwrap();
        body["consistency_token"].as_str().unwrap().to_owned()
    }

    /// Appends a story choice through the gateway; returns its consistency token.
    async fn choose(&self, player: &str) -> String {
        self.post_events(&json!({
            "type": "StoryChoiceMade",
            "world_tick": 1,
            "data": {
                "player_id": player,
                "story_id": "intro",
                "node_id": "start",
                "choice_id": "wave",
            }
        }))
        .await
    }

    /// Appends, in one batch, a clock tick, a weather change, a story choice of
    /// `player` and an inference, all at `tick`; returns the batch's token.
    async fn append_everywhere(&self, tick: u64, player: &str) -> String {
        let event =
            |kind: &str, data: Value| json!({"type": kind, "world_tick": tick, "data": data});
        self.post_events(&json!({"events": [
            event("ClockTicked", json!({
                "game_time_s": tick * 60, "day": 1, "season": "spring", "time_scale": 60
            })),
            event("WeatherChanged", json!({
                "region": "north", "condition": "rain", "temperature_dc": 50,
                "wind_dmps": 10, "precipitation_dmmph": 3
            })),
            event("StoryChoiceMade", json!({
                "player_id": player, "story_id": "intro", "node_id": "start",
                "choice_id": "wave", "next_node_id": "gate"
            })),
            event("InferenceRecorded", json!({
                "model_id": "npc-chat", "model_version": "1", "purpose": "npc_dialogue",
                "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 40,
                "cost_micro_usd": 7, "outcome": "ok"
            })),
        ]}))
        .await
    }

    /// GETs `path` with the read token and the consistency token `token`.
    async fn get_consistent(&self, path: &str, token: &str) -> reqwest::Response {
        self.server
            .http
            .get(self.server.url(path))
            .bearer_auth(TOKEN)
            .header("X-Consistency-Token", token)
            .send()
            .await
            .unwrap()
    }

    async fn state(&self, at_tick: u64, token: &str) -> reqwest::Response {
        self.get_consistent(
            &format!("/v1/worlds/{WORLD}/state?at_tick={at_tick}"),
            token,
        )
        .await
    }

    async fn stories(&self, player: &str, token: &str) -> reqwest::Response {
        self.get_consistent(
            &format!("/v1/worlds/{WORLD}/players/{player}/stories"),
            token,
        )
        .await
    }

    /// `/readyz`, which needs no token.
    async fn ready(&self) -> reqwest::Result<reqwest::Response> {
        self.server
            .http
            .get(self.server.url("/readyz"))
            .send()
            .await
    }

    async fn stop(self) {
        self.server.stop();
        self.pipeline.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_query_with_the_append_token_sees_the_append_every_time() {
    let served = serve(true).await;
    let mut seen = 0;
    for trial in 0..100 {
        let player = format!("p{trial}");
        let token = served.choose(&player).await;
        let response = served.stories(&player, &token).await;
        assert_eq!(response.status(), StatusCode::OK, "trial {trial}");
        assert!(response.headers().contains_key("x-worldline-position"));
        let body: Value = response.json().await.unwrap();
        let stories: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|item| item["story_id"].as_str())
            .collect();
        if stories == ["intro"] {
            seen += 1;
        }
    }
    assert_eq!(
        seen, 100,
        "the new state was visible in {seen} of 100 trials"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_projectors_stopped_a_fresh_token_gets_503_after_the_bound() {
    let served = serve(false).await;
    let token = served.choose("late").await;
    let started = Instant::now();
    let response = served.stories("late", &token).await;
    let waited = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    // It waited for the bound rather than answering at once.
    assert!(
        waited >= Duration::from_millis(BOUND_MS),
        "answered after {waited:?}"
    );
    let malformed = served.stories("late", "wl1.@@@").await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let problem: Value = malformed.json().await.unwrap();
    assert_eq!(problem["parameter"], "X-Consistency-Token");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_reports_the_projectors_lag_and_readiness_follows_it() {
    let served = serve(true).await;
    let token = served.choose("lagging").await;
    let lag_of = |response: &reqwest::Response| -> i64 {
        response.headers()["x-worldline-lag-records"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Caught up: the projector recorded the log end it saw, and nothing is left.
    let response = served.stories("lagging", &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let pool = served.pipeline.env.pool.clone();
    eventually(
        Duration::from_secs(15),
        "story's log ends to be recorded",
        || {
            let pool = pool.clone();
            async move {
                let behind: Option<i64> = sqlx::query_scalar(
                    "SELECT sum(e.end_offset - o.next_offset)::bigint
                   FROM story.projector_log_ends e
                   JOIN story.projector_offsets o USING (topic, partition)",
                )
                .fetch_one(&pool)
                .await
                .ok()?;
                (behind == Some(0)).then_some(())
            }
        },
    )
    .await;
    eventually(Duration::from_secs(10), "a lag of zero", || async {
        let response = served.stories("lagging", &token).await;
        (lag_of(&response) == 0).then_some(())
    })
    .await;
    let ready = served.ready().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "ready while caught up");

    // An instance has seen twelve more records on a story partition than were
    // applied (the projector's own refresh only ever raises the figure).
    sqlx::query(
        "UPDATE story.projector_log_ends e SET end_offset = o.next_offset + 12
           FROM story.projector_offsets o
          WHERE o.topic = e.topic AND o.partition = e.partition
            AND e.partition = (SELECT min(partition) FROM story.projector_offsets)",
    )
    .execute(&served.pipeline.env.pool)
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the lag header to show 12",
        || async {
            let response = served.stories("lagging", &token).await;
            (lag_of(&response) == 12).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "/readyz to fail on lag",
        || async {
            let ready = served.ready().await.ok()?;
            let status = ready.status();
            let body = ready.text().await.ok()?;
            (status == StatusCode::SERVICE_UNAVAILABLE
                && body.contains("story is 12 records behind"))
            .then_some(())
        },
    )
    .await;
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_query_with_the_append_token_sees_the_append_in_every_read_model_it_reads() {
    let served = serve(true).await;
    for trial in 1..=20 {
        let player = format!("s{trial}");
        let token = served.append_everywhere(trial, &player).await;
        let response = served.state(trial, &token).await;
        assert_eq!(response.status(), StatusCode::OK, "trial {trial}");
        let state: Value = response.json().await.unwrap();
        assert_eq!(state["clock"]["tick"], trial, "trial {trial}: {state}");
        assert_eq!(
            state["weather"]["north"]["since_tick"], trial,
            "trial {trial}: {state}"
        );
        assert_eq!(
            state["story_progress"][&player]["intro"], "gate",
            "trial {trial}: {state}"
        );
        assert_eq!(
            state["inference"]["inferences"], trial,
            "trial {trial}: {state}"
        );
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_query_waits_for_the_story_read_model_not_only_for_worlds() {
    // Only the story projector is stopped: the worlds read model (which reads
    // every family) applies the choice, the story read model does not.
    let mut served = serve_with(|_| {}, |name| name != "story").await;
    let token = served.choose("waiting").await;
    let summary = served
        .get_consistent(&format!("/v1/worlds/{WORLD}"), &token)
        .await;
    assert_eq!(summary.status(), StatusCode::OK, "worlds has the choice");
    let stale = served.state(u64::MAX >> 1, &token).await;
    assert_eq!(stale.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(stale.headers()["retry-after"], "1");
    let problem: Value = stale.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("story"),
        "{problem}"
    );

    let story = worldline_projectors::registry::by_name("story").unwrap();
    let restarted = served.pipeline.env.start_projector(story);
    served.pipeline.projectors.push(restarted);
    // The restarted projector first rejoins its group; until it has applied
    // the choice the answer stays a 503, never a state without it.
    let state = eventually(Duration::from_secs(60), "the story read model", || async {
        let response = served.state(u64::MAX >> 1, &token).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        assert_eq!(response.status(), StatusCode::OK);
        Some(response.json::<Value>().await.unwrap())
    })
    .await;
    assert_eq!(
        state["story_progress"]["waiting"]["intro"], "",
        "a choice without a next node ends the story: {state}"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_refresh_beat_an_hour_away_a_notification_answers_a_fresh_token() {
    const WAIT_MS: u64 = 20_000;
    let served = serve_with(
        |env| {
            env.settings.http.progress_refresh_ms = 3_600_000;
            env.settings.http.read_your_writes_timeout_ms = WAIT_MS;
            env.settings.http.request_timeout_ms = 3 * WAIT_MS;
        },
        |_| true,
    )
    .await;
    // The first answer proves the listener has read every schema once after
    // its LISTEN; from then on only a notification can move a snapshot.
    let token = served.choose("warm").await;
    assert_eq!(
        served.stories("warm", &token).await.status(),
        StatusCode::OK
    );
    let mut positions = Vec::new();
    for trial in 0..10 {
        let player = format!("n{trial}");
        let token = served.choose(&player).await;
        let response = served.stories(&player, &token).await;
        assert_eq!(response.status(), StatusCode::OK, "trial {trial}");
        positions.push(
            response.headers()["x-worldline-position"]
                .to_str()
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["items"][0]["story_id"], "intro",
            "trial {trial}: {body}"
        );
    }
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "each answer saw a newer snapshot: {positions:?}"
    );
    served.stop().await;
}
