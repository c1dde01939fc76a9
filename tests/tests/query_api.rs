//! The query API over read models filled by the real pipeline: events appended
//! to Kafka with the Appender, every projector running in-process, the API
//! built from settings (guards included, as `worldline serve` builds it),
//! served on a loopback port and queried over HTTP with a `read` token.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use worldline_schemas::WorldId;
use worldline_schemas::pb::{Envelope, InferenceOutcome, InferencePurpose, WeatherCondition};
use worldline_tests::api::{Server, content_type, read_token};
use worldline_tests::pipeline::Pipeline;
use worldline_tests::{TestEnv, eventually};

use worldline_tests::fixture::{
    self, BOUNDS, CHOICES, INFERENCES, InferenceSpec, OTHER_WORLD_MARKERS, events, purpose_name,
};

/// The pipeline and the API, running.
struct Served {
    pipeline: Pipeline,
    server: Server,
    http: reqwest::Client,
}

impl Served {
    /// Appends every event of the shared fixture, projects them all, and serves the API.
    async fn start() -> Served {
        Served::over(&events()).await
    }

    /// Appends `history`, projects it all, and serves the API.
    async fn over(history: &[Envelope]) -> Served {
        let mut env = TestEnv::new(2).await;
        env.settings.auth.tokens = vec![read_token("reader", READ_TOKEN)];
        // These tests send hundreds of requests at once; the limit has its own test.
        env.settings.auth.rate_limit_per_second = 1e6;
        env.settings.auth.rate_limit_burst = 1_000_000;
        let pipeline = Pipeline::over(env, history).await;
        let server = Server::query_api(&pipeline.env.settings).await;
        Served {
            pipeline,
            server,
            http: reqwest::Client::builder()
                .default_headers(HeaderMap::from_iter([(
                    AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer {READ_TOKEN}")).unwrap(),
                )]))
                .build()
                .unwrap(),
        }
    }

    /// A URL from path segments (each percent-encoded as needed) and query pairs.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        self.server.url_of(segments, query)
    }

    async fn get_url(&self, url: Url) -> (StatusCode, String, Value) {
        self.get_with(url, HeaderMap::new()).await
    }

    /// GETs with extra headers. An event stream never ends: what arrives
    /// within a moment stands for its body.
    async fn get_with(&self, url: Url, headers: HeaderMap) -> (StatusCode, String, Value) {
        let mut response = self.http.get(url).headers(headers).send().await.unwrap();
        let status = response.status();
        let content_type = content_type(&response);
        let text = if content_type == "text/event-stream" {
            let mut bytes = Vec::new();
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_millis(500), response.chunk()).await
            {
                bytes.extend_from_slice(&chunk);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            response.text().await.unwrap()
        };
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, content_type, body)
    }

    /// GETs and expects 200 with JSON.
    async fn ok(&self, segments: &[&str], query: &[(&str, &str)]) -> Value {
        let url = self.url(segments, query);
        let (status, content_type, body) = self.get_url(url.clone()).await;
        assert_eq!(status, StatusCode::OK, "{url}: {body}");
        assert_eq!(content_type, "application/json", "{url}");
        body
    }

    /// GETs and expects a problem with `status`.
    async fn problem(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        status: StatusCode,
    ) -> Value {
        let url = self.url(segments, query);
        let (got, content_type, body) = self.get_url(url.clone()).await;
        assert_eq!(got, status, "{url}: {body}");
        assert_eq!(content_type, "application/problem+json", "{url}");
        assert_eq!(body["status"], status.as_u16(), "{url}");
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
        body
    }

    /// Every item of a list, following `next_cursor` with pages of `limit`.
    async fn walk(&self, segments: &[&str], query: &[(&str, &str)], limit: usize) -> Vec<Value> {
        let limit = limit.to_string();
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut pairs: Vec<(&str, &str)> = query.to_vec();
            pairs.push(("limit", &limit));
            if let Some(cursor) = &cursor {
                pairs.push(("cursor", cursor));
            }
            let page = self.ok(segments, &pairs).await;
            let batch = page["items"].as_array().unwrap();
            assert!(batch.len() <= limit.parse().unwrap());
            items.extend(batch.iter().cloned());
            match page["next_cursor"].as_str() {
                Some(next) => {
                    assert!(
                        !batch.is_empty(),
                        "a page with a next cursor is never empty"
                    );
                    cursor = Some(next.to_owned());
                }
                None => return items,
            }
        }
        panic!("{segments:?} did not end");
    }

    async fn stop(self) {
        self.server.stop();
        self.pipeline.stop().await;
    }
}

fn items(page: &Value) -> &Vec<Value> {
    page["items"].as_array().unwrap()
}

fn field<'a>(items: &'a [Value], name: &str) -> Vec<&'a Value> {
    items.iter().map(|item| &item[name]).collect()
}

/// The upper bound of the bucket where the cumulative count reaches q of the total.
fn quantile(latencies: &[u32], q: f64) -> u32 {
    let bucket = |ms: u32| BOUNDS[..19].iter().position(|b| ms <= *b).unwrap_or(19);
    let mut counts = [0_u32; 20];
    for ms in latencies {
        counts[bucket(*ms)] += 1;
    }
    let total = f64::from(latencies.len() as u32);
    let mut cumulative = 0;
    for (index, count) in counts.iter().enumerate() {
        cumulative += count;
        if cumulative > 0 && f64::from(cumulative) >= q * total {
            return BOUNDS[index];
        }
    }
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_real_pipeline_then_every_endpoint_serves_its_read_model() {
    let api = Served::start().await;

    // Worlds: every world, in id order, with per-family counts of distinct events.
    let worlds = api.ok(&["v1", "worlds"], &[]).await;
    assert_eq!(
        field(items(&worlds), "world_id"),
        vec!["emberfall", "frostholm", "quiet"]
    );
    assert_eq!(worlds["next_cursor"], Value::Null);
    let ember = api.ok(&["v1", "worlds", "emberfall"], &[]).await;
    assert_eq!(ember["display_name"], "Emberfall");
    assert_eq!(ember["seed"], 42);
    assert_eq!(ember["regions"], json!(["north", "coast", "east"]));
    assert_eq!(ember["status"], "running");
    assert_eq!(ember["latest_tick"], 30);
    assert_eq!(
        ember["events"],
        json!({"world": 1, "clock": 30, "weather": 5, "story": 12, "inference": 10})
    );

    // Clock: the shape it always had.
    let clock = api.ok(&["v1", "worlds", "emberfall", "clock"], &[]).await;
    assert_eq!(clock["world_id"], "emberfall");
    assert_eq!(clock["tick"], 30);
    assert_eq!(clock["game_time_s"], 1800);
    assert_eq!(clock["season"], "spring");

    // Weather now, per region in region order.
    let now = api.ok(&["v1", "worlds", "emberfall", "weather"], &[]).await;
    let regions: Vec<(String, String, i64)> = items(&now)
        .iter()
        .map(|r| {
            (
                r["region"].as_str().unwrap().to_owned(),
                r["condition"].as_str().unwrap().to_owned(),
                r["since_tick"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        regions,
        vec![
            ("coast".to_owned(), "rain".to_owned(), 1),
            ("east".to_owned(), "fog".to_owned(), 5),
            ("north".to_owned(), "clear".to_owned(), 20),
        ]
    );
    assert!(items(&now).iter().all(|r| r["until_tick"].is_null()));
    let north = api
        .ok(&["v1", "worlds", "emberfall", "weather", "north"], &[])
        .await;
    assert_eq!(north["condition"], "clear");
    assert_eq!(north["since_tick"], 20);
    assert_eq!(north["temperature_dc"], 120);

    // Weather as of a tick: the period in force then, regions not yet reporting left out.
    let at_3 = api
        .ok(
            &["v1", "worlds", "emberfall", "weather"],
            &[("at_tick", "3")],
        )
        .await;
    assert_eq!(field(items(&at_3), "region"), vec!["coast", "north"]);
    assert_eq!(items(&at_3)[1]["condition"], "clear");
    assert_eq!(items(&at_3)[1]["until_tick"], 10);
    let at_10 = api
        .ok(
            &["v1", "worlds", "emberfall", "weather"],
            &[("at_tick", "10")],
        )
        .await;
    assert_eq!(
        field(items(&at_10), "region"),
        vec!["coast", "east", "north"]
    );
    assert_eq!(items(&at_10)[2]["condition"], "snow");
    assert_eq!(items(&at_10)[2]["since_tick"], 10);
    assert_eq!(items(&at_10)[2]["until_tick"], 20);

    // Weather history: periods overlapping the range.
    let history = api
        .ok(
            &["v1", "worlds", "emberfall", "weather", "north", "history"],
            &[],
        )
        .await;
    let periods: Vec<(i64, Value, String)> = items(&history)
        .iter()
        .map(|p| {
            (
                p["valid_from_tick"].as_i64().unwrap(),
                p["valid_to_tick"].clone(),
                p["condition"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        periods,
        vec![
            (1, json!(10), "clear".to_owned()),
            (10, json!(20), "snow".to_owned()),
            (20, Value::Null, "clear".to_owned()),
        ]
    );
    let overlapping = api
        .ok(
            &["v1", "worlds", "emberfall", "weather", "north", "history"],
            &[("from_tick", "10"), ("to_tick", "19")],
        )
        .await;
    assert_eq!(
        field(items(&overlapping), "valid_from_tick"),
        vec![&json!(10)]
    );
    let edge = api
        .ok(
            &["v1", "worlds", "emberfall", "weather", "north", "history"],
            &[("from_tick", "9"), ("to_tick", "10")],
        )
        .await;
    assert_eq!(
        field(items(&edge), "valid_from_tick"),
        vec![&json!(1), &json!(10)]
    );
    let inverted = api
        .ok(
            &["v1", "worlds", "emberfall", "weather", "north", "history"],
            &[("from_tick", "20"), ("to_tick", "5")],
        )
        .await;
    assert!(items(&inverted).is_empty());

    // Story: progress per player, the choices log with filters, tallies.
    let ayla = api
        .ok(
            &["v1", "worlds", "emberfall", "players", "ayla", "stories"],
            &[],
        )
        .await;
    assert_eq!(
        items(&ayla)
            .iter()
            .map(|s| (
                s["story_id"].as_str().unwrap(),
                s["current_node_id"].as_str().unwrap(),
                s["choices_made"].as_i64().unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![("lost-caravan", "road", 3), ("smugglers", "vault", 2)]
    );
    let log = api
        .ok(&["v1", "worlds", "emberfall", "story", "choices"], &[])
        .await;
    assert_eq!(items(&log).len(), CHOICES.len());
    let ticks: Vec<i64> = items(&log)
        .iter()
        .map(|c| c["tick"].as_i64().unwrap())
        .collect();
    assert!(ticks.windows(2).all(|w| w[0] <= w[1]), "ordered by tick");
    assert_eq!(items(&log)[0]["context"], json!({"party": "3"}));
    let filtered = api
        .ok(
            &["v1", "worlds", "emberfall", "story", "choices"],
            &[
                ("player", "ayla"),
                ("story", "lost-caravan"),
                ("from_tick", "3"),
                ("to_tick", "9"),
            ],
        )
        .await;
    let expected: Vec<&str> = CHOICES
        .iter()
        .filter(|s| s.player == "ayla" && s.story == "lost-caravan" && (3..=9).contains(&s.tick))
        .map(|s| s.choice)
        .collect();
    assert_eq!(field(items(&filtered), "choice_id"), expected);
    let tallies = api
        .ok(
            &[
                "v1",
                "worlds",
                "emberfall",
                "story",
                "lost-caravan",
                "tallies",
            ],
            &[],
        )
        .await;
    let mut expected_tallies: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for spec in CHOICES.iter().filter(|s| s.story == "lost-caravan") {
        *expected_tallies
            .entry((spec.node, spec.choice))
            .or_default() += 1;
    }
    let got_tallies: BTreeMap<(&str, &str), i64> = items(&tallies)
        .iter()
        .map(|t| {
            (
                (
                    t["node_id"].as_str().unwrap(),
                    t["choice_id"].as_str().unwrap(),
                ),
                t["times"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got_tallies, expected_tallies);

    // Inference log with filters and a half-open time window.
    let log = api
        .ok(&["v1", "worlds", "emberfall", "inferences"], &[])
        .await;
    assert_eq!(items(&log).len(), INFERENCES.len());
    // BASE_MS + 10 s and + 65 s, the second written with another offset.
    let from = "2026-09-21T14:13:10Z";
    let to = "2026-09-21T16:14:05+02:00";
    let window = api
        .ok(
            &["v1", "worlds", "emberfall", "inferences"],
            &[
                ("model", "npc-chat"),
                ("purpose", "npc_dialogue"),
                ("npc", "innkeeper"),
                ("from", from),
                ("to", to),
            ],
        )
        .await;
    let expected: Vec<u32> = INFERENCES
        .iter()
        .filter(|s| {
            s.model == "npc-chat"
                && s.purpose == InferencePurpose::NpcDialogue
                && s.npc == "innkeeper"
                && (10..65).contains(&s.offset_s)
        })
        .map(|s| s.latency_ms)
        .collect();
    let latencies: Vec<u64> = items(&window)
        .iter()
        .map(|x| x["latency_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(
        latencies,
        expected.iter().map(|l| u64::from(*l)).collect::<Vec<_>>()
    );
    assert_eq!(items(&window)[0]["outcome"], "timeout");

    // Inference stats over the first minute only, and over everything.
    let first_minute = api
        .ok(
            &["v1", "worlds", "emberfall", "inference", "stats"],
            &[
                ("from", "2026-09-21T14:13:00Z"),
                ("to", "2026-09-21T14:14:00Z"),
            ],
        )
        .await;
    check_stats(&first_minute, |s| s.offset_s < 60);
    let all_time = api
        .ok(&["v1", "worlds", "emberfall", "inference", "stats"], &[])
        .await;
    check_stats(&all_time, |_| true);
    let narration = api
        .ok(
            &["v1", "worlds", "emberfall", "inference", "stats"],
            &[("model", "narrator"), ("purpose", "narration")],
        )
        .await;
    assert_eq!(items(&narration).len(), 1);

    // A world that exists but has no data: 404 saying so for single resources,
    // empty lists for lists.
    let no_clock = api
        .problem(
            &["v1", "worlds", "quiet", "clock"],
            &[],
            StatusCode::NOT_FOUND,
        )
        .await;
    assert!(no_clock["detail"].as_str().unwrap().contains("no clock"));
    let no_weather = api
        .problem(
            &["v1", "worlds", "quiet", "weather", "north"],
            &[],
            StatusCode::NOT_FOUND,
        )
        .await;
    assert!(
        no_weather["detail"]
            .as_str()
            .unwrap()
            .contains("no weather")
    );
    for path in list_paths("quiet") {
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        let page = api.ok(&segments, &[]).await;
        assert_eq!(page, json!({"items": [], "next_cursor": null}), "{path:?}");
    }

    // Pagination: walking every list with tiny pages yields exactly the full list.
    for path in list_paths("emberfall") {
        let segments: Vec<&str> = path.iter().map(String::as_str).collect();
        let whole = items(&api.ok(&segments, &[("limit", "500")]).await).clone();
        assert!(!whole.is_empty(), "{path:?} has data");
        for limit in [1, 2, 3] {
            let walked = api.walk(&segments, &[], limit).await;
            assert_eq!(walked, whole, "{path:?} walked with limit {limit}");
        }
        let distinct: BTreeSet<String> = whole.iter().map(Value::to_string).collect();
        assert_eq!(distinct.len(), whole.len(), "{path:?} has no duplicates");
    }
    let default_page = api
        .ok(&["v1", "worlds", "emberfall", "story", "choices"], &[])
        .await;
    assert_eq!(
        default_page["next_cursor"],
        Value::Null,
        "12 fit in the default 50"
    );
    let filtered_walk = api
        .walk(
            &["v1", "worlds", "emberfall", "story", "choices"],
            &[("player", "cato")],
            1,
        )
        .await;
    assert_eq!(
        field(&filtered_walk, "player_id"),
        vec![&json!("cato"); 4],
        "filters hold across pages"
    );

    // The document, the docs page, metrics and readiness.
    let doc = api.ok(&["openapi.json"], &[]).await;
    assert_eq!(doc["openapi"], "3.1.0");
    for route in ROUTES {
        let operation = &doc["paths"][route]["get"];
        assert!(operation.is_object(), "{route} is documented");
        for status in ["200", "400", "503"] {
            assert!(
                operation["responses"][status].is_object(),
                "{route} {status}"
            );
        }
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    let page = api
        .http
        .get(api.url(&["docs"], &[]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("\"openapi\":\"3.1.0\""),
        "the document is inlined"
    );
    assert!(
        !page.contains("<script src") && !page.contains("<link"),
        "nothing is fetched"
    );
    let metrics = api
        .http
        .get(api.url(&["metrics"], &[]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("worldline_http_requests_total")
                && l.contains("route=\"/v1/worlds/{world}/clock\"")
                && l.contains("status=\"200\"")
                && l.contains("method=\"GET\"")),
        "{metrics}"
    );
    assert!(metrics.contains(
        "worldline_http_request_duration_seconds_bucket{route=\"/v1/worlds/{world}/story/choices\""
    ));
    let ready = api.url(&["readyz"], &[]);
    let http = api.http.clone();
    eventually(Duration::from_secs(10), "readiness", || {
        let (http, ready) = (http.clone(), ready.clone());
        async move {
            let response = http.get(ready).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        }
    })
    .await;

    api.stop().await;
}

/// `template`, or `value` when it is the placeholder.
fn fill<'a>(template: &'a str, value: &'a str) -> &'a str {
    if template == "{}" { value } else { template }
}

fn check_stats(page: &Value, in_window: impl Fn(&InferenceSpec) -> bool) {
    let mut expected: BTreeMap<(&str, &str), Vec<&InferenceSpec>> = BTreeMap::new();
    for spec in INFERENCES.iter().filter(|s| in_window(s)) {
        expected
            .entry((spec.model, purpose_name(spec.purpose)))
            .or_default()
            .push(spec);
    }
    let got: Vec<(&str, &str)> = items(page)
        .iter()
        .map(|s| {
            (
                s["model_id"].as_str().unwrap(),
                s["purpose"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected.keys().copied().collect::<Vec<_>>());
    for (stats, specs) in items(page).iter().zip(expected.values()) {
        let latencies: Vec<u32> = specs.iter().map(|s| s.latency_ms).collect();
        assert_eq!(stats["inferences"], specs.len());
        assert_eq!(
            stats["failures"],
            specs
                .iter()
                .filter(|s| s.outcome != InferenceOutcome::Ok)
                .count()
        );
        assert_eq!(stats["prompt_tokens"], 300 * specs.len());
        assert_eq!(stats["cost_micro_usd"], 950 * specs.len());
        let latency = &stats["latency"];
        assert_eq!(latency["max_ms"], *latencies.iter().max().unwrap());
        assert_eq!(latency["p50_ms"], quantile(&latencies, 0.5), "{stats}");
        assert_eq!(latency["p95_ms"], quantile(&latencies, 0.95), "{stats}");
        assert_eq!(latency["p99_ms"], quantile(&latencies, 0.99), "{stats}");
        let histogram: i64 = latency["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_i64().unwrap())
            .sum();
        assert_eq!(histogram, specs.len() as i64);
    }
}

/// The bearer token every request of these tests carries.
const READ_TOKEN: &str = "r3ad-everything";

/// Every documented route.
const ROUTES: [&str; 13] = [
    "/v1/worlds",
    "/v1/worlds/{world}",
    "/v1/worlds/{world}/clock",
    "/v1/worlds/{world}/weather",
    "/v1/worlds/{world}/weather/{region}",
    "/v1/worlds/{world}/weather/{region}/history",
    "/v1/worlds/{world}/players/{player}/stories",
    "/v1/worlds/{world}/story/choices",
    "/v1/worlds/{world}/story/{story}/tallies",
    "/v1/worlds/{world}/inferences",
    "/v1/worlds/{world}/inference/stats",
    "/v1/worlds/{world}/state",
    "/v1/worlds/{world}/stream",
];

/// Every per-world list, as path segments, with ids that have data in emberfall.
fn list_paths(world: &str) -> Vec<Vec<String>> {
    let paths: [&[&str]; 8] = [
        &["weather"],
        &["weather", "north", "history"],
        &["players", "ayla", "stories"],
        &["story", "choices"],
        &["story", "lost-caravan", "tallies"],
        &["inferences"],
        &["inference", "stats"],
        &["weather", "coast", "history"],
    ];
    paths
        .iter()
        .map(|rest| {
            ["v1", "worlds", world]
                .iter()
                .chain(rest.iter())
                .map(|s| (*s).to_owned())
                .collect()
        })
        .collect()
}

/// A request with a `{}` placeholder in one path segment, query parameter or
/// header.
struct Slot {
    segments: Vec<&'static str>,
    query: Vec<(&'static str, &'static str)>,
    headers: Vec<(&'static str, &'static str)>,
    name: &'static str,
}

impl Slot {
    fn path(segments: Vec<&'static str>, name: &'static str) -> Slot {
        Slot {
            segments,
            query: Vec::new(),
            headers: Vec::new(),
            name,
        }
    }
}

/// A bad request and the parameter its 400 must name: `(segments, query, parameter)`.
type BadCase<'a> = (&'a [&'a str], Vec<(&'a str, &'a str)>, &'a str);

/// Every route with a placeholder for one path segment or query parameter.
fn slots() -> Vec<Slot> {
    let w = "emberfall";
    let path_slots: Vec<(Vec<&'static str>, &'static str)> = vec![
        (vec!["v1", "worlds", "{}"], "world"),
        (vec!["v1", "worlds", "{}", "clock"], "world"),
        (vec!["v1", "worlds", "{}", "weather"], "world"),
        (vec!["v1", "worlds", w, "weather", "{}"], "region"),
        (vec!["v1", "worlds", "{}", "weather", "north"], "world"),
        (
            vec!["v1", "worlds", w, "weather", "{}", "history"],
            "region",
        ),
        (
            vec!["v1", "worlds", w, "players", "{}", "stories"],
            "player",
        ),
        (
            vec!["v1", "worlds", "{}", "players", "ayla", "stories"],
            "world",
        ),
        (vec!["v1", "worlds", w, "story", "{}", "tallies"], "story"),
        (vec!["v1", "worlds", "{}", "story", "choices"], "world"),
        (vec!["v1", "worlds", "{}", "inferences"], "world"),
        (vec!["v1", "worlds", "{}", "inference", "stats"], "world"),
        (vec!["v1", "worlds", "{}", "state"], "world"),
        (vec!["v1", "worlds", "{}", "stream"], "world"),
    ];
    let mut slots: Vec<Slot> = path_slots
        .into_iter()
        .map(|(segments, name)| Slot::path(segments, name))
        .collect();
    let query_slots: [(&[&'static str], &'static str); 30] = [
        (&["weather"], "at_tick"),
        (&["weather"], "limit"),
        (&["weather"], "cursor"),
        (&["weather", "north", "history"], "from_tick"),
        (&["weather", "north", "history"], "to_tick"),
        (&["story", "choices"], "player"),
        (&["story", "choices"], "story"),
        (&["story", "choices"], "from_tick"),
        (&["story", "choices"], "cursor"),
        (&["inferences"], "model"),
        (&["inferences"], "purpose"),
        (&["inferences"], "npc"),
        (&["inferences"], "from"),
        (&["inferences"], "to"),
        (&["inferences"], "cursor"),
        (&["inference", "stats"], "model"),
        (&["inference", "stats"], "purpose"),
        (&["inference", "stats"], "from"),
        (&["inference", "stats"], "to"),
        (&["inference", "stats"], "cursor"),
        (&["weather", "north", "history"], "cursor"),
        (&["players", "ayla", "stories"], "cursor"),
        (&["story", "lost-caravan", "tallies"], "cursor"),
        (&["story", "choices"], "to_tick"),
        (&["state"], "at_tick"),
        (&["stream"], "families"),
        // A parameter the route does not take: named in a 400, never echoed raw.
        (&["clock"], "{}"),
        (&["weather", "north"], "limit"),
        (&["players", "ayla", "stories"], "limit"),
        (&["story", "lost-caravan", "tallies"], "limit"),
    ];
    for (rest, name) in query_slots {
        let mut segments = vec!["v1", "worlds", w];
        segments.extend_from_slice(rest);
        let query = if name == "{}" {
            vec![("{}", "1")]
        } else {
            vec![(name, "{}")]
        };
        slots.push(Slot {
            segments,
            query,
            headers: Vec::new(),
            name,
        });
    }
    slots.push(Slot {
        segments: vec!["v1", "worlds"],
        query: vec![("cursor", "{}")],
        headers: Vec::new(),
        name: "cursor",
    });
    slots.push(Slot {
        segments: vec!["v1", "worlds"],
        query: vec![("limit", "{}")],
        headers: Vec::new(),
        name: "limit",
    });
    let header_slots: [(&[&'static str], &'static str); 6] = [
        (&["stream"], "Last-Event-ID"),
        (&["clock"], "X-Consistency-Token"),
        (&["state"], "X-Consistency-Token"),
        (&["story", "choices"], "X-Consistency-Token"),
        (&["stream"], "X-Consistency-Token"),
        (&[], "X-Consistency-Token"),
    ];
    for (rest, name) in header_slots {
        let mut segments = vec!["v1", "worlds", w];
        segments.extend_from_slice(rest);
        let query = if rest == ["state"] {
            vec![("at_tick", "30")]
        } else {
            Vec::new()
        };
        slots.push(Slot {
            segments,
            query,
            headers: vec![(name, "{}")],
            name,
        });
    }
    slots.push(Slot {
        segments: vec!["v1", "worlds"],
        query: Vec::new(),
        headers: vec![("X-Consistency-Token", "{}")],
        name: "X-Consistency-Token",
    });
    slots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_bad_or_hostile_input_then_a_problem_naming_it_and_never_a_5xx_or_another_worlds_rows()
 {
    let api = Served::start().await;

    // An unknown world is a 404 on every per-world route.
    for route in &ROUTES[1..] {
        let path = route
            .replace("{world}", "atlantis")
            .replace("{region}", "north")
            .replace("{player}", "ayla")
            .replace("{story}", "lost-caravan");
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let query: &[(&str, &str)] = if route.ends_with("/state") {
            &[("at_tick", "0")]
        } else {
            &[]
        };
        let problem = api.problem(&segments, query, StatusCode::NOT_FOUND).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("does not exist"),
            "{route}: {problem}"
        );
    }

    // A bad parameter is a 400 that names it.
    let choices = ["v1", "worlds", "emberfall", "story", "choices"];
    let inferences = ["v1", "worlds", "emberfall", "inferences"];
    let history = ["v1", "worlds", "emberfall", "weather", "north", "history"];
    let other_cursor = {
        let page = api.ok(&["v1", "worlds"], &[("limit", "1")]).await;
        page["next_cursor"].as_str().unwrap().to_owned()
    };
    let cases: Vec<BadCase<'_>> = vec![
        (&history, vec![("from_tick", "-1")], "from_tick"),
        (&history, vec![("to_tick", "ten")], "to_tick"),
        (
            &history,
            vec![("to_tick", "9223372036854775808")],
            "to_tick",
        ),
        (&choices, vec![("from_tick", "1.5")], "from_tick"),
        (
            &["v1", "worlds", "emberfall", "weather"],
            vec![("at_tick", "-5")],
            "at_tick",
        ),
        (&choices, vec![("limit", "0")], "limit"),
        (&choices, vec![("limit", "501")], "limit"),
        (&choices, vec![("limit", "1"), ("limit", "2")], "limit"),
        (&choices, vec![("cursor", "not-a-cursor")], "cursor"),
        (&choices, vec![("cursor", &other_cursor)], "cursor"),
        (&choices, vec![("player", "")], "player"),
        (&choices, vec![("story", "a b")], "story"),
        (&inferences, vec![("from", "yesterday")], "from"),
        (&inferences, vec![("to", "2026-13-01T00:00:00Z")], "to"),
        (&inferences, vec![("purpose", "poetry")], "purpose"),
        (&inferences, vec![("model", "x/y")], "model"),
        (&inferences, vec![("npc", "😀")], "npc"),
        (&["v1", "worlds", "bad world"], vec![], "world"),
        (
            &["v1", "worlds", "emberfall", "weather", "no/rth"],
            vec![],
            "region",
        ),
        (
            &["v1", "worlds", "emberfall", "stream"],
            vec![("families", "clock,rumours")],
            "families",
        ),
        (&["v1", "worlds", "emberfall", "state"], vec![], "at_tick"),
    ];
    // A parameter the route does not take is refused, not ignored.
    let unknown: Vec<BadCase<'_>> = vec![
        (&choices, vec![("form_tick", "3")], "form_tick"),
        (
            &["v1", "worlds", "emberfall", "clock"],
            vec![("at_tick", "3")],
            "at_tick",
        ),
        (&["v1", "worlds"], vec![("world", "emberfall")], "world"),
        (
            &["v1", "worlds", "emberfall", "state"],
            vec![("at_tick", "3"), ("region", "north")],
            "region",
        ),
        (
            &["v1", "worlds", "emberfall", "stream"],
            vec![("family", "clock")],
            "family",
        ),
    ];
    for (segments, query, parameter) in cases.iter().chain(&unknown) {
        let problem = api.problem(segments, query, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            problem["parameter"], *parameter,
            "{segments:?} {query:?}: {problem}"
        );
        assert_eq!(problem["title"], "Bad parameter");
    }
    for (segments, query, parameter) in &unknown {
        let problem = api.problem(segments, query, StatusCode::BAD_REQUEST).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("unknown query parameter `{parameter}`")),
            "{segments:?} {query:?}: {detail}"
        );
    }

    // Hostile strings in every slot: never a 5xx, never the other world's rows.
    let long = "a".repeat(10_000);
    let hostile = [
        "' OR 1=1 --",
        "emberfall' OR world_id <> 'emberfall",
        "\0",
        "%00",
        "%",
        "_",
        "../frostholm",
        "ümlaut-🙂",
        "emberfall;DROP TABLE worlds.worlds",
        "$1",
        "9223372036854775807",
        long.as_str(),
    ];
    for slot in slots() {
        let name = slot.name;
        for value in hostile {
            let segments: Vec<&str> = slot.segments.iter().map(|s| fill(s, value)).collect();
            let query: Vec<(&str, &str)> = slot
                .query
                .iter()
                .map(|(k, v)| (fill(k, value), fill(v, value)))
                .collect();
            let mut headers = HeaderMap::new();
            let mut sendable = true;
            for (header, v) in &slot.headers {
                // Control characters cannot be sent in a header at all.
                match HeaderValue::from_bytes(fill(v, value).as_bytes()) {
                    Ok(v) => {
                        headers.insert(HeaderName::from_bytes(header.as_bytes()).unwrap(), v);
                    }
                    Err(_) => sendable = false,
                }
            }
            if !sendable {
                continue;
            }
            let slot = name;
            let url = api.url(&segments, &query);
            let (status, _, body) = api.get_with(url.clone(), headers).await;
            assert!(
                !status.is_server_error(),
                "{slot}={value:.40}: {status} {body}"
            );
            let text = body.to_string();
            for marker in OTHER_WORLD_MARKERS {
                assert!(
                    !text.contains(marker),
                    "{slot}={value:.40} leaked {marker}: {text:.300}"
                );
            }
        }
    }
    // The tables are still there.
    api.ok(&["v1", "worlds", "emberfall"], &[]).await;

    // Routes and methods that do not exist are problems too.
    api.problem(&["v1", "nowhere"], &[], StatusCode::NOT_FOUND)
        .await;
    let response = api
        .http
        .post(api.url(&["v1", "worlds"], &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    api.stop().await;
}

/// A weather period as the API and the `weather_history` view give it:
/// (valid_from_tick, valid_to_tick, condition).
type Period = (i64, Option<i64>, String);

fn periods_of(items: &[Value]) -> Vec<Period> {
    items
        .iter()
        .map(|p| {
            (
                p["valid_from_tick"].as_i64().unwrap(),
                p["valid_to_tick"].as_i64(),
                p["condition"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_weather_changes_out_of_tick_order_and_two_at_one_tick_then_as_of_and_history_answer_the_derived_periods()
 {
    use WeatherCondition::{Clear, Cloudy, Fog, Rain, Snow, Storm, Unspecified};
    let world = WorldId::parse("driftwood").unwrap();
    let change = |tick, region, condition, previous| {
        fixture::weather(&world, tick, region, condition, previous)
    };
    let history = [
        fixture::created(&world, "Driftwood", &["north", "coast"]),
        change(1, "north", Clear, Unspecified),
        change(10, "north", Snow, Clear),
        // A second change at tick 10: the snow lasted no tick at all.
        change(10, "north", Rain, Snow),
        change(25, "north", Fog, Storm),
        // Logged after tick 25, in force from tick 18.
        change(18, "north", Storm, Rain),
        change(12, "coast", Cloudy, Unspecified),
    ];
    let api = Served::over(&history).await;
    let period = |from, to, condition: &str| (from, to, condition.to_owned());
    let north: Vec<Period> = vec![
        period(1, Some(10), "clear"),
        period(10, Some(10), "snow"),
        period(10, Some(18), "rain"),
        period(18, Some(25), "storm"),
        period(25, None, "fog"),
    ];
    let viewed: Vec<Period> = sqlx::query_as(
        "SELECT valid_from_tick, valid_to_tick, condition FROM weather.weather_history
          WHERE world_id = 'driftwood' AND region = 'north'
          ORDER BY valid_from_tick, log_offset",
    )
    .fetch_all(&api.pipeline.env.pool)
    .await
    .unwrap();
    assert_eq!(
        viewed, north,
        "the view derives each end from the next change"
    );

    let history_path = ["v1", "worlds", "driftwood", "weather", "north", "history"];
    let everything = api.ok(&history_path, &[]).await;
    assert_eq!(periods_of(items(&everything)), north);
    let fields = |item: &Value| {
        item.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        fields(&items(&everything)[0]),
        [
            "condition",
            "event_id",
            "occurred_at",
            "precipitation_dmmph",
            "previous_condition",
            "temperature_dc",
            "valid_from_tick",
            "valid_to_tick",
            "wind_dmps"
        ]
    );
    let started_by: BTreeMap<(i64, String), Value> = items(&everything)
        .iter()
        .map(|p| {
            let key = (
                p["valid_from_tick"].as_i64().unwrap(),
                p["condition"].as_str().unwrap().to_owned(),
            );
            (key, p["event_id"].clone())
        })
        .collect();

    // As of each tick: the period in force then, which is never the zero-length one.
    for tick in 0..=30i64 {
        let page = api
            .ok(
                &["v1", "worlds", "driftwood", "weather"],
                &[("at_tick", &tick.to_string())],
            )
            .await;
        let expected_regions: Vec<&str> = match tick {
            0 => vec![],
            1..=11 => vec!["north"],
            _ => vec!["coast", "north"],
        };
        assert_eq!(
            field(items(&page), "region"),
            expected_regions,
            "at tick {tick}"
        );
        let Some(got) = items(&page).iter().find(|r| r["region"] == "north") else {
            continue;
        };
        let in_force = north.iter().rfind(|(from, _, _)| *from <= tick).unwrap();
        assert!(in_force.1.is_none_or(|to| to > tick), "at tick {tick}");
        assert_eq!(
            (
                got["since_tick"].as_i64().unwrap(),
                got["until_tick"].as_i64(),
                got["condition"].as_str().unwrap().to_owned()
            ),
            in_force.clone(),
            "north at tick {tick}"
        );
        assert_eq!(
            got["event_id"],
            started_by[&(in_force.0, in_force.2.clone())],
            "at tick {tick}"
        );
        if let Some(coast) = items(&page).iter().find(|r| r["region"] == "coast") {
            assert_eq!(
                (&coast["since_tick"], &coast["until_tick"]),
                (&json!(12), &Value::Null)
            );
        }
    }
    let at_10 = api
        .ok(
            &["v1", "worlds", "driftwood", "weather"],
            &[("at_tick", "10")],
        )
        .await;
    assert_eq!(
        items(&at_10)[0]["condition"],
        "rain",
        "the later change at tick 10"
    );
    assert_eq!(items(&at_10)[0]["until_tick"], 18);

    // History over every range between these ticks, in one page and walked two by two.
    let ticks: [i64; 14] = [0, 1, 2, 9, 10, 11, 17, 18, 19, 24, 25, 26, 30, i64::MAX];
    for from in ticks {
        for to in ticks {
            let overlapping: Vec<Period> = north
                .iter()
                .filter(|(start, end, _)| *start <= to && end.is_none_or(|end| end > from))
                .cloned()
                .collect();
            let (from_s, to_s) = (from.to_string(), to.to_string());
            let range = [("from_tick", from_s.as_str()), ("to_tick", to_s.as_str())];
            let page = api.ok(&history_path, &range).await;
            assert_eq!(periods_of(items(&page)), overlapping, "from {from} to {to}");
            assert_eq!(
                periods_of(&api.walk(&history_path, &range, 2).await),
                overlapping,
                "from {from} to {to}, two by two"
            );
        }
    }
    let zero_length = api
        .ok(&history_path, &[("from_tick", "9"), ("to_tick", "10")])
        .await;
    assert_eq!(
        periods_of(items(&zero_length)),
        vec![
            period(1, Some(10), "clear"),
            period(10, Some(10), "snow"),
            period(10, Some(18), "rain")
        ],
        "a zero-length period after from_tick overlaps"
    );
    api.stop().await;
}
