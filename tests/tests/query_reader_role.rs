//! The query API on the read-only database role, as a deployment runs it:
//! `database.reader_url` names `worldline_reader`, whose only privileges on the
//! read models are the ones `ops/local/stack.sh` and
//! `ops/compose/postgres-init.sql` give it (default privileges of the owner:
//! `USAGE` on schemas, `SELECT` on tables and sequences). Every endpoint answers
//! from it, and a write through the API's own pool is refused by PostgreSQL
//! even when the transaction asks to be read-write.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_ops::config::StaticToken;
use worldline_producers::{Appender, AppenderOptions};
use worldline_tests::{TestEnv, eventually};

/// The role the stack scripts create for the query API.
const READER_ROLE: &str = "worldline_reader";
const TOKEN: &str = "r3ad-only";

/// The reader's URL for this test's database: the stack's reader URL when the
/// environment has one (its user and password), else the owner's URL with the
/// reader's name (the stack scripts give both roles the same password).
fn reader_url(owner_url: &str) -> String {
    let mut url = Url::parse(owner_url).unwrap();
    let configured = std::env::var("WORLDLINE__DATABASE__READER_URL")
        .ok()
        .and_then(|u| Url::parse(&u).ok());
    let (user, password) = match &configured {
        Some(reader) if reader.username() == READER_ROLE => (
            reader.username().to_owned(),
            reader.password().map(str::to_owned),
        ),
        _ => (READER_ROLE.to_owned(), url.password().map(str::to_owned)),
    };
    url.set_username(&user).unwrap();
    url.set_password(password.as_deref()).unwrap();
    url.into()
}

/// What a path template of the document becomes, with ids the fixture has data
/// for, and the values of its required query parameters.
fn concrete(template: &str, operation: &Value) -> String {
    let path = template
        .replace("{world}", "emberfall")
        .replace("{region}", "north")
        .replace("{player}", "ayla")
        .replace("{story}", "lost-caravan");
    assert!(!path.contains('{'), "no id for {template}");
    let required: Vec<String> = operation["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query" && p["required"] == true)
        .map(|p| match p["name"].as_str().unwrap() {
            "at_tick" => "at_tick=30".to_owned(),
            other => panic!("no value for the required parameter {other} of {template}"),
        })
        .collect();
    if required.is_empty() {
        path
    } else {
        format!("{path}?{}", required.join("&"))
    }
}

/// The SQLSTATE a failed statement ended with.
fn sqlstate(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    match result {
        Err(sqlx::Error::Database(error)) => error.code().unwrap_or_default().into_owned(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_read_only_role_every_endpoint_answers_and_no_write_gets_through() {
    let mut env = TestEnv::new(2).await;
    // What the stack scripts do in the `worldline` database, here in this
    // test's: whatever the owner creates from now on, the reader may read.
    for statement in [
        format!("ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {READER_ROLE}"),
        format!("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {READER_ROLE}"),
        format!("ALTER DEFAULT PRIVILEGES GRANT SELECT ON SEQUENCES TO {READER_ROLE}"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&env.pool)
            .await
            .unwrap();
    }
    env.settings.database.reader_url = Some(reader_url(&env.settings.database.url));
    env.settings.auth.tokens = vec![StaticToken {
        name: "reader".to_owned(),
        token: TOKEN.to_owned(),
        scopes: vec!["read".to_owned()],
        worlds: None,
    }];

    let appender = Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            ..AppenderOptions::default()
        },
    )
    .unwrap();
    for result in appender
        .append_batch(&worldline_tests::fixture::events())
        .await
    {
        result.unwrap();
    }
    let all = worldline_projectors::registry::all();
    let projectors: Vec<_> = all.iter().map(|p| env.start_projector(p.clone())).collect();
    for projector in &all {
        let env = &env;
        eventually(
            Duration::from_secs(60),
            &format!("{} to catch up", projector.name()),
            || async move {
                env.caught_up(projector.name(), projector.as_ref())
                    .await
                    .then_some(())
            },
        )
        .await;
    }

    let shutdown = CancellationToken::new();
    let app = worldline_query_api::build_with_shutdown(
        &env.settings,
        Health::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let (addr, _task) =
        worldline_ops::health::serve(SocketAddr::from(([127, 0, 0, 1], 0)), app, shutdown.clone())
            .await
            .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();

    // (a) Every documented read endpoint answers 200 from the reader's pool.
    let doc: Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut checked = 0;
    for (template, item) in doc["paths"].as_object().unwrap() {
        let Some(operation) = item.get("get") else {
            continue;
        };
        if !template.starts_with("/v1/") {
            continue;
        }
        let path = concrete(template, operation);
        let mut response = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        if content_type == "text/event-stream" {
            assert_eq!(status, StatusCode::OK, "{path}");
            // The stream's first reads (the world, its clock, its weather)
            // went through the reader's pool too.
            let mut text = String::new();
            while !text.contains("event: clock") {
                let chunk = tokio::time::timeout(Duration::from_secs(30), response.chunk())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
        } else {
            let body = response.text().await.unwrap();
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
        checked += 1;
    }
    assert!(checked >= 13, "only {checked} endpoints in the document");

    // The progress listener reads the projectors' offsets as the reader too.
    let clock = http
        .get(format!("{base}/v1/worlds/emberfall/clock"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let position: i64 = clock.headers()["x-worldline-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(position > 0, "position {position}");
    let ready = format!("{base}/readyz");
    eventually(Duration::from_secs(10), "readiness", || {
        let (http, ready) = (http.clone(), ready.clone());
        async move {
            let response = http.get(ready).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        }
    })
    .await;

    // (b) A write through the API's own pool is refused: by the read-only
    // default, and, when a transaction asks to be read-write, by the grants.
    let pool: PgPool = worldline_query_api::connect_reader(&env.settings)
        .await
        .unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(user, READER_ROLE);
    let read_only = sqlx::query("DELETE FROM worlds.worlds")
        .execute(&pool)
        .await;
    assert_eq!(sqlstate(read_only), "25006", "read_only_sql_transaction");
    let writes = [
        "DELETE FROM worlds.worlds",
        "UPDATE clock.world_clock SET tick = 0",
        "INSERT INTO story.choices SELECT * FROM story.choices",
        "TRUNCATE inference.inferences",
        "UPDATE weather.projector_offsets SET next_offset = 0",
        "DROP TABLE weather.current_weather",
        "CREATE TABLE worlds.intruder (x int)",
        "CREATE TABLE public.intruder (x int)",
        "CREATE SCHEMA intruder",
    ];
    for statement in writes {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET TRANSACTION READ WRITE")
            .execute(&mut *tx)
            .await
            .unwrap();
        let refused = sqlx::query(AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await;
        assert_eq!(
            sqlstate(refused),
            "42501",
            "insufficient_privilege: {statement}"
        );
        tx.rollback().await.unwrap();
    }
    pool.close().await;
    let worlds: i64 = sqlx::query_scalar("SELECT count(*) FROM worlds.worlds")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(worlds, 3, "the read model is untouched");

    shutdown.cancel();
    for running in projectors {
        running.stop().await;
    }
    env.cleanup().await;
}
