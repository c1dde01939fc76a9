//! The live stream of a world's read-model changes (Server-Sent Events), over
//! read models filled by the real pipeline: events appended to Kafka, every
//! projector running in-process, the API served on a loopback port.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_query_api::AppState;
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{Envelope, StoryChoiceMade, WeatherCondition};
use worldline_tests::TestEnv;
use worldline_tests::api::Server;
use worldline_tests::fixture::{self, tick};
use worldline_tests::pipeline::Pipeline;

/// How long a single event may take to arrive before the test gives up
/// (a guard against hanging, not a performance assertion).
const EVENT_WAIT: Duration = Duration::from_secs(60);

fn created(world: &WorldId) -> Envelope {
    fixture::world_created(world, "Emberfall", 7, &["north", "coast"])
}

fn weather(world: &WorldId, tick: u64, region: &str, condition: WeatherCondition) -> Envelope {
    let previous = WeatherCondition::Unspecified;
    fixture::weather_changed(world, tick, region, condition, previous, 120, 30)
}

fn choice(world: &WorldId, tick: u64, player: &str) -> Envelope {
    new_envelope(
        world,
        tick,
        "game-server",
        Body::StoryChoiceMade(StoryChoiceMade {
            player_id: player.to_owned(),
            story_id: "lost-caravan".to_owned(),
            node_id: "start".to_owned(),
            choice_id: "help".to_owned(),
            next_node_id: "camp".to_owned(),
            context: Default::default(),
        }),
    )
}

/// One parsed server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Reads events off a streaming response.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    fn new(response: reqwest::Response) -> SseReader {
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream ended.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_block(&block) {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(EVENT_WAIT, self.response.chunk())
                .await
                .expect("an event (or the end of the stream) in time")
                .unwrap()?;
            self.buffer
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }

    /// Events until `done` holds for the collected events; all of them.
    async fn until(&mut self, done: impl Fn(&[SseEvent]) -> bool) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while !done(&events) {
            let event = self.next().await.expect("the stream ended early");
            events.push(event);
        }
        events
    }
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut event = "message".to_owned();
    let mut id = None;
    let mut data = Vec::new();
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    Some(SseEvent {
        event,
        id,
        data: serde_json::from_str(&data.join("\n")).unwrap(),
    })
}

fn has_clock(events: &[SseEvent], tick: i64) -> bool {
    events
        .iter()
        .any(|e| e.event == "clock" && e.data["tick"] == tick)
}

fn has_weather(events: &[SseEvent], region: &str, condition: &str) -> bool {
    events.iter().any(|e| {
        e.event == "weather" && e.data["region"] == region && e.data["condition"] == condition
    })
}

/// The pipeline and the API, running.
struct Served {
    pipeline: Pipeline,
    server: Server,
}

impl Served {
    async fn start(initial: &[Envelope]) -> Served {
        let pipeline = Pipeline::running(TestEnv::new(1).await);
        let shutdown = CancellationToken::new();
        let app = worldline_query_api::app_with_shutdown(
            AppState::new(pipeline.env.pool.clone()),
            Health::default(),
            &|_, routes| routes,
            shutdown.clone(),
        );
        let server = Server::start(app, shutdown).await;
        let served = Served { pipeline, server };
        served.append(initial).await;
        served
    }

    /// Appends `events` and waits until every projector has applied them.
    async fn append(&self, events: &[Envelope]) {
        self.pipeline.apply(events).await;
    }

    async fn open(&self, path: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut request = self
            .server
            .http
            .get(self.server.url(path))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.unwrap()
    }

    async fn stream(&self, path: &str, last_event_id: Option<&str>) -> SseReader {
        let response = self.open(path, last_event_id).await;
        let status = response.status();
        if status != StatusCode::OK {
            panic!("{path}: {status}: {}", response.text().await.unwrap());
        }
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader::new(response)
    }

    async fn stop(self) {
        self.server.stop();
        self.pipeline.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_stream_live_and_resume_after_the_last_event_id_without_gaps_or_repeats() {
    use WeatherCondition::{Clear, Fog, Rain};
    let world = WorldId::parse("emberfall").unwrap();
    let mut initial = vec![created(&world)];
    initial.extend((1..=3).map(|t| tick(&world, t)));
    initial.push(weather(&world, 1, "north", Clear));
    initial.push(choice(&world, 2, "ayla"));
    let served = Served::start(&initial).await;
    let path = "/v1/worlds/emberfall/stream";

    // Given a fresh connection: the current state first, old choices not replayed.
    let mut live = served.stream(path, None).await;
    let first = live.next().await.unwrap();
    assert_eq!(first.event, "ready");
    assert_eq!(first.data["world"], "emberfall");
    let snapshot = live
        .until(|events| {
            has_clock(events, 3)
                && has_weather(events, "north", "clear")
                && events.iter().any(|e| e.event == "world")
        })
        .await;
    assert!(snapshot.iter().all(|e| e.event != "story"), "{snapshot:?}");
    assert!(snapshot.iter().all(|e| e.id.is_some()));

    // When the world moves on, the new tick and the weather change arrive live.
    served
        .append(&[tick(&world, 4), weather(&world, 4, "coast", Rain)])
        .await;
    let moved = live
        .until(|events| has_clock(events, 4) && has_weather(events, "coast", "rain"))
        .await;
    let resume_from = moved.last().unwrap().id.clone().unwrap();
    drop(live);

    // While disconnected: more ticks, a weather change, two choices.
    served
        .append(&[
            tick(&world, 5),
            tick(&world, 6),
            weather(&world, 6, "north", Fog),
            choice(&world, 5, "bren"),
            choice(&world, 6, "cato"),
        ])
        .await;

    // Then reconnecting with Last-Event-ID brings exactly what was missed: the
    // latest clock, the one region that changed, both choices, and nothing
    // already sent. A sentinel tick appended afterwards marks the end.
    let families = "?families=clock,weather,story";
    let mut resumed = served
        .stream(&format!("{path}{families}"), Some(&resume_from))
        .await;
    let ready = resumed.next().await.unwrap();
    assert_eq!(ready.event, "ready");
    assert_eq!(
        ready.data["families"],
        serde_json::json!(["clock", "weather", "story"])
    );
    served.append(&[tick(&world, 7)]).await;
    let missed = resumed.until(|events| has_clock(events, 7)).await;
    let summary: Vec<(String, String)> = missed
        .iter()
        .map(|e| {
            let what = match e.event.as_str() {
                "clock" => e.data["tick"].to_string(),
                "weather" => format!("{}={}", e.data["region"], e.data["condition"]),
                "story" => e.data["player_id"].to_string(),
                _ => e.data.to_string(),
            };
            (e.event.clone(), what)
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("clock", "6"),
        ("weather", "\"north\"=\"fog\""),
        ("story", "\"bren\""),
        ("story", "\"cato\""),
        ("clock", "7"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    assert_eq!(summary, expected);
    // Ids only move forward: each is distinct.
    let mut ids: Vec<&String> = missed.iter().filter_map(|e| e.id.as_ref()).collect();
    ids.dedup();
    assert_eq!(ids.len(), missed.len());

    // Shutdown ends the open stream and lets the server finish.
    served.server.stop();
    if let Some(event) = resumed.next().await {
        panic!("no event after shutdown, got {event:?}");
    }
    stop_and_join(served).await;
}

/// Waits for the server task (it must finish once streams end), then cleans up.
async fn stop_and_join(served: Served) {
    served.server.join().await;
    served.pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_requests_are_problems_not_streams() {
    let world = WorldId::parse("emberfall").unwrap();
    let served = Served::start(&[created(&world), tick(&world, 1)]).await;
    let cases = [
        ("/v1/worlds/nowhere/stream", None, StatusCode::NOT_FOUND),
        (
            "/v1/worlds/emberfall/stream?families=clock,gossip",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/worlds/emberfall/stream",
            Some("not-an-id!"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/v1/worlds/ember%20fall/stream",
            None,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, last, status) in cases {
        let response = served.open(path, last).await;
        assert_eq!(response.status(), status, "{path}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/problem+json",
            "{path}"
        );
    }
    let doc: Value = served
        .server
        .get("/openapi.json", None)
        .await
        .json()
        .await
        .unwrap();
    let operation = &doc["paths"]["/v1/worlds/{world}/stream"]["get"];
    assert!(
        operation["responses"]["200"]["content"]["text/event-stream"].is_object(),
        "{operation}"
    );
    served.stop().await;
}
