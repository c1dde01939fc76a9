//! `GET /v1/projectors` on the query API as `worldline serve` builds it (auth,
//! limits, read-your-writes), over schemas the real projectors filled. The API
//! runs no projector: every figure comes from PostgreSQL, and is checked here
//! against Kafka's own log ends and the projectors' tables.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::AssertSqlSafe;
use worldline_projectors::{Projector, registry};
use worldline_schemas::{Family, WorldId};
use worldline_tests::api::{Server, listed_projectors, registered_projectors, token};
use worldline_tests::{Running, TestEnv, eventually, fixture, pipeline};

const READER: &str = "r3ader";
const FROST_READER: &str = "fr0st";
const WRITER: &str = "wr1ter";

async fn test_env(partitions: i32) -> TestEnv {
    let mut env = TestEnv::new(partitions).await;
    env.settings.auth.tokens = vec![
        token("reader", READER, &["read"], None),
        token(
            "frost-reader",
            FROST_READER,
            &["read"],
            Some(&["frostholm"]),
        ),
        token("writer", WRITER, &["ingest"], None),
    ];
    env
}

/// Kafka's log end of every partition of every topic `projector` reads.
fn log_ends(env: &TestEnv, projector: &dyn Projector) -> BTreeMap<(String, i64), i64> {
    projector
        .families()
        .iter()
        .flat_map(|family| {
            let topic = env.topic(*family);
            env.high_watermarks(&topic)
                .into_iter()
                .map(move |(partition, end)| ((topic.clone(), i64::from(partition)), end))
        })
        .collect()
}

/// Waits until an instance of `schema` has stored `expected` as the log end of
/// every partition that has records.
async fn log_ends_recorded(env: &TestEnv, schema: &str, expected: &BTreeMap<(String, i64), i64>) {
    let pool = env.pool.clone();
    eventually(
        Duration::from_secs(30),
        &format!("{schema}'s log ends to be recorded"),
        || {
            let pool = pool.clone();
            async move {
                let rows: Vec<(String, i32, i64)> = sqlx::query_as(AssertSqlSafe(format!(
                    "SELECT topic, partition, end_offset FROM {schema}.projector_log_ends"
                )))
                .fetch_all(&pool)
                .await
                .ok()?;
                let stored: HashMap<(String, i64), i64> = rows
                    .into_iter()
                    .map(|(t, p, e)| ((t, i64::from(p)), e))
                    .collect();
                expected
                    .iter()
                    .filter(|(_, end)| **end > 0)
                    .all(|(key, end)| stored.get(key) == Some(end))
                    .then_some(())
            }
        },
    )
    .await;
}

/// Every projector's status from `/v1/projectors`, by name.
async fn projectors(api: &Server) -> BTreeMap<String, Value> {
    let response = api.get("/v1/projectors", Some(READER)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    by_name(&body)
}

fn by_name(body: &Value) -> BTreeMap<String, Value> {
    body["projectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["projector"].as_str().unwrap().to_owned(), p.clone()))
        .collect()
}

fn partitions(status: &Value) -> BTreeMap<(String, i64), Value> {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let key = (
                p["topic"].as_str().unwrap().to_owned(),
                p["partition"].as_i64().unwrap(),
            );
            (key, p.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_projectors_position_lag_and_dead_letters_come_from_postgres() {
    let env = test_env(2).await;
    env.append(&fixture::events()).await;
    // A record no build can decode: the projectors reading weather dead-letter it.
    env.send_raw(Family::Weather, "emberfall", &[0xde, 0xad, 0xbe, 0xef])
        .await;
    let all = registry::all();
    let running: Vec<Running> = all.iter().map(|p| env.start_projector(p.clone())).collect();
    let mut expected_ends = BTreeMap::new();
    for projector in &all {
        env.wait_caught_up(projector.as_ref()).await;
        let ends = log_ends(&env, projector.as_ref());
        log_ends_recorded(&env, projector.name(), &ends).await;
        expected_ends.insert(projector.name(), ends);
    }
    // Still figures from here on; the API has no projector of its own.
    pipeline::stop_all(running).await;
    let api = Server::query_api(&env.settings).await;

    let response = api.get("/v1/projectors", Some(READER)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let statuses = by_name(&body);

    assert_eq!(
        listed_projectors(&body),
        registered_projectors(),
        "every registered projector, by name"
    );

    for projector in &all {
        let name = projector.name();
        let status = &statuses[name];
        let ends = &expected_ends[name];
        let partitions = partitions(status);
        for ((topic, partition), end) in ends {
            let key = (topic.clone(), *partition);
            if *end == 0 {
                // Nothing to apply there: no stored offset, nothing behind.
                if let Some(p) = partitions.get(&key) {
                    assert!(p["next_offset"].is_null(), "{name} {key:?}: {p}");
                    assert!(p["lag_records"].as_i64().unwrap_or(0) == 0, "{name}: {p}");
                }
                continue;
            }
            let p = partitions
                .get(&key)
                .unwrap_or_else(|| panic!("{name} lists {key:?}: {status}"));
            assert_eq!(p["next_offset"], *end, "{name} {key:?}");
            assert_eq!(p["log_end"], *end, "{name} {key:?}");
            assert_eq!(p["lag_records"], 0, "{name} {key:?}");
            assert!(p["committed_at"].is_string(), "{name}: {p}");
            assert!(p["log_end_observed_at"].is_string(), "{name}: {p}");
        }
        assert!(
            partitions.keys().all(|key| ends.contains_key(key)),
            "{name} lists only its own topics: {status}"
        );
        assert_eq!(status["position"], ends.values().sum::<i64>(), "{name}");
        assert_eq!(status["lag_records"], 0, "{name}");
        assert!(status["last_committed_at"].is_string(), "{name}");
        assert!(status["log_ends_observed_at"].is_string(), "{name}");

        let stored: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT sum(next_offset)::bigint FROM {name}.projector_offsets"
        )))
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(status["position"], stored, "{name} as stored");

        let dead_letters = if projector.families().contains(&Family::Weather) {
            1
        } else {
            0
        };
        assert_eq!(status["dead_letters"]["total"], dead_letters, "{name}");
        assert_eq!(status["dead_letters"]["pending"], dead_letters, "{name}");
        assert_eq!(
            status["dead_letters"]["last_recorded_at"].is_string(),
            dead_letters == 1,
            "{name}"
        );
    }
    // The route is registered under the worlds projector: its header (from the
    // API's progress listener, loaded once it has connected) agrees.
    let worlds_position = statuses["worlds"]["position"].as_i64().unwrap();
    eventually(
        Duration::from_secs(10),
        "the position header to match",
        || async {
            let response = api.get("/v1/projectors", Some(READER)).await;
            let header = response.headers().get("x-worldline-position")?;
            (header.to_str().ok()?.parse::<i64>().ok()? == worlds_position).then_some(())
        },
    )
    .await;

    // Projectors are not per world: a token limited to one world sees them all.
    let response = api.get("/v1/projectors", Some(FROST_READER)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let frost: Value = response.json().await.unwrap();
    assert_eq!(frost, body);

    // The guards in front of every read route.
    let response = api.get("/v1/projectors", None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    let response = api.get("/v1/projectors", Some("n0pe")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = api.get("/v1/projectors", Some(WRITER)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = api
        .get("/v1/projectors?world=emberfall", Some(READER))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    // The document describes the route.
    let doc: Value = api.get("/openapi.json", None).await.json().await.unwrap();
    let operation = &doc["paths"]["/v1/projectors"]["get"];
    assert_eq!(operation["operationId"], "list_projectors");
    for status in ["200", "400", "401", "403", "429", "503"] {
        assert!(operation["responses"][status].is_object(), "{status}");
    }

    api.stop();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_behind_its_log_reports_the_records_it_has_not_applied() {
    let env = test_env(2).await;
    let world = WorldId::parse("emberfall").unwrap();
    let mut events = vec![fixture::created(&world, "Emberfall", &["north"])];
    events.extend((1..=10).map(|t| fixture::tick(&world, t)));
    env.append(&events).await;
    let clock_topic = env.topic(Family::Clock);
    let partition = env.read_topic(&clock_topic)[0].partition;
    let empty = 1 - partition;

    let all = registry::all();
    let mut running = Vec::new();
    for projector in all.iter().filter(|p| p.name() != "clock") {
        running.push(env.start_projector(projector.clone()));
    }
    let clock = registry::by_name("clock").unwrap();
    // Applies the partition only up to offset 4 and then keeps running (the
    // empty partition's target is never met), observing the log end like any
    // instance: a projector behind its log, deterministically.
    let held = env.start_projector_with(clock.clone(), |options| {
        options.stop_at = Some(HashMap::from([
            ((clock_topic.clone(), partition), 4),
            ((clock_topic.clone(), empty), 1),
        ]));
    });
    let mut ends = BTreeMap::new();
    ends.insert((clock_topic.clone(), i64::from(partition)), 10);
    log_ends_recorded(&env, "clock", &ends).await;
    let api = Server::query_api(&env.settings).await;

    let key = (clock_topic.clone(), i64::from(partition));
    let statuses = projectors(&api).await;
    let status = &statuses["clock"];
    let held_partition = &partitions(status)[&key];
    assert_eq!(held_partition["next_offset"], 4, "{status}");
    assert_eq!(held_partition["log_end"], 10, "{status}");
    assert_eq!(held_partition["lag_records"], 6, "{status}");
    assert_eq!(status["position"], 4, "{status}");
    assert_eq!(status["lag_records"], 6, "{status}");
    // The clock routes' lag header is the same arithmetic over the same tables.
    eventually(
        Duration::from_secs(10),
        "the clock route's lag header to show 6",
        || async {
            let response = api.get("/v1/worlds/emberfall/clock", Some(READER)).await;
            let lag = response.headers().get("x-worldline-lag-records")?;
            (lag.to_str().ok()? == "6").then_some(())
        },
    )
    .await;

    // Released, the projector catches up and the same endpoint shows it.
    held.stop().await;
    running.push(env.start_projector(clock.clone()));
    env.wait_caught_up(clock.as_ref()).await;
    let status = eventually(Duration::from_secs(30), "clock to show no lag", || async {
        let statuses = projectors(&api).await;
        let status = statuses["clock"].clone();
        (status["lag_records"] == 0).then_some(status)
    })
    .await;
    assert_eq!(status["position"], 10, "{status}");
    assert_eq!(partitions(&status)[&key]["next_offset"], 10, "{status}");

    pipeline::stop_all(running).await;
    api.stop();
    env.cleanup().await;
}
