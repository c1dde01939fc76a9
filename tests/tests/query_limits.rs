//! The query API's request limits as `worldline serve` builds it: a body over
//! `http.max_body_bytes` is a 413 problem, a request over
//! `http.request_timeout_ms` is a 503 problem, both before any handler work.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use reqwest::StatusCode;
use serde_json::Value;
use worldline_ops::consistency::ConsistencyToken;
use worldline_schemas::Family;
use worldline_tests::TestEnv;
use worldline_tests::api::{Server, read_token};

const TOKEN: &str = "l1mits";
const MAX_BODY_BYTES: usize = 1024;

struct Served {
    env: TestEnv,
    server: Server,
}

async fn serve(configure: impl FnOnce(&mut TestEnv)) -> Served {
    let mut env = TestEnv::new(1).await;
    env.settings.auth.tokens = vec![read_token("limited", TOKEN)];
    env.settings.http.max_body_bytes = MAX_BODY_BYTES;
    configure(&mut env);
    // The read models' tables, empty: what `worldline migrate` creates.
    for projector in worldline_projectors::registry::all() {
        let schema = worldline_projectors::SchemaName::parse(projector.name()).unwrap();
        worldline_projectors::store::prepare_schema(&env.pool, &schema, projector.as_ref())
            .await
            .unwrap();
    }
    let server = Server::query_api(&env.settings).await;
    Served { env, server }
}

impl Served {
    async fn stop(self) {
        self.server.stop();
        self.env.cleanup().await;
    }
}

async fn problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_a_413_problem_and_one_within_it_is_not() {
    let served = serve(|_| {}).await;
    let url = served.server.url("/v1/worlds/emberfall/clock");
    let send = |body: Vec<u8>, token: Option<&'static str>| {
        let mut request = served.server.http.get(&url).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    // Within the limit the request goes on to the handler: the world is unknown.
    let within = send(vec![b'x'; MAX_BODY_BYTES], Some(TOKEN)).await.unwrap();
    assert_eq!(within.status(), StatusCode::NOT_FOUND);

    for token in [Some(TOKEN), None] {
        let over = send(vec![b'x'; MAX_BODY_BYTES + 1], token).await.unwrap();
        let body = problem(over, StatusCode::PAYLOAD_TOO_LARGE).await;
        assert_eq!(
            body["type"], "https://worldline.dev/problems/payload-too-large",
            "{body}"
        );
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains(&MAX_BODY_BYTES.to_string()),
            "{body}"
        );
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_time_limit_is_a_503_problem_with_retry_after() {
    // A read-your-writes wait far longer than the request may take, on offsets
    // no projector will ever reach: only the time limit can end the request.
    let served = serve(|env| {
        env.settings.http.request_timeout_ms = 300;
        env.settings.http.read_your_writes_timeout_ms = 600_000;
    })
    .await;
    let unreachable =
        ConsistencyToken::from_positions([(served.env.topic(Family::Clock), 0, 1_000_000_000)])
            .encode();
    let response = served
        .server
        .http
        .get(served.server.url("/v1/worlds/emberfall/clock"))
        .bearer_auth(TOKEN)
        .header("X-Consistency-Token", unreachable)
        .send()
        .await
        .unwrap();
    let retry_after = response.headers().get("retry-after").cloned();
    let body = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(
        body["type"], "https://worldline.dev/problems/timeout",
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("300 ms"),
        "{body}"
    );
    assert_eq!(retry_after.unwrap(), "1");

    // A request within the limit is untouched by it.
    let quick = served.server.get("/v1/worlds", Some(TOKEN)).await;
    assert_eq!(quick.status(), StatusCode::OK);
    served.stop().await;
}
