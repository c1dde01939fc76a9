//! The query API on the read-only database role, as a deployment runs it:
//! `database.reader_url` names `worldline_reader`, whose only privileges on the
//! read models are the ones `ops/local/stack.sh` and
//! `ops/compose/postgres-init.sql` give it (default privileges of the owner:
//! `USAGE` on schemas, `SELECT` on tables and sequences). Every endpoint answers
//! from it, and a write through the API's own pool is refused by PostgreSQL
//! even when the transaction asks to be read-write.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use worldline_tests::api::{READER_ROLE, Server, read_token, reader_url};
use worldline_tests::pipeline::Pipeline;
use worldline_tests::{TestEnv, eventually, fixture};

const TOKEN: &str = "r3ad-only";

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
        env.execute(&statement).await;
    }
    env.settings.database.reader_url = Some(reader_url(&env.settings.database.url));
    env.settings.auth.tokens = vec![read_token("reader", TOKEN)];
    let pipeline = Pipeline::over(env, &fixture::events()).await;
    let env = &pipeline.env;
    let server = Server::query_api(&env.settings).await;

    // (a) Every documented read endpoint answers 200 from the reader's pool.
    let doc: Value = server
        .get("/openapi.json", None)
        .await
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
        let mut response = server.get(&path, Some(TOKEN)).await;
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
    let clock = server.get("/v1/worlds/emberfall/clock", Some(TOKEN)).await;
    let position: i64 = clock.headers()["x-worldline-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(position > 0, "position {position}");
    eventually(Duration::from_secs(10), "readiness", || async {
        let response = server.http.get(server.url("/readyz")).send().await.ok()?;
        (response.status() == StatusCode::OK).then_some(())
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
    let worlds = env.scalar("SELECT count(*) FROM worlds.worlds").await;
    assert_eq!(worlds, 3, "the read model is untouched");

    server.stop();
    pipeline.stop().await;
}
