//! Auth on the query API as `worldline serve` builds it: the matrix of
//! credentials on every `/v1` read endpoint, and the per-token rate limit.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::StatusCode;
use serde_json::{Value, json};
use worldline_ops::config::JwtSettings;
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{Envelope, WorldCreated};
use worldline_tests::TestEnv;
use worldline_tests::api::{Server, token};
use worldline_tests::pipeline::Pipeline;

const WORLD: &str = "emberfall";
const HS_SECRET: &str = "an-hs256-secret-of-at-least-32-bytes";
const RSA_PRIVATE: &str = include_str!("../fixtures/jwt/rs256-private.pem");
const RSA_PUBLIC: &str = include_str!("../fixtures/jwt/rs256-public.pem");

/// A world that exists, but that the `frost-reader` token may not see.
const OTHER_WORLD: &str = "frostholm";

/// Every `/v1` read endpoint, with `{w}` for the world.
const ENDPOINTS: [&str; 13] = [
    "/v1/worlds",
    "/v1/worlds/{w}",
    "/v1/worlds/{w}/clock",
    "/v1/worlds/{w}/weather",
    "/v1/worlds/{w}/weather/north",
    "/v1/worlds/{w}/weather/north/history",
    "/v1/worlds/{w}/players/ayla/stories",
    "/v1/worlds/{w}/story/choices",
    "/v1/worlds/{w}/story/intro/tallies",
    "/v1/worlds/{w}/inferences",
    "/v1/worlds/{w}/inference/stats",
    "/v1/worlds/{w}/state?at_tick=5",
    "/v1/worlds/{w}/stream",
];

/// `path` with a query parameter no route takes.
fn with_unknown_parameter(path: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}x=1")
}

fn jwt(algorithm: Algorithm, overrides: Value) -> String {
    let now = get_current_timestamp();
    let mut claims = json!({
        "iss": "https://id.example", "aud": "worldline", "sub": "svc",
        "exp": now + 300, "nbf": now - 5, "scope": "read",
    });
    if let Value::Object(overrides) = overrides {
        for (key, value) in overrides {
            claims[key] = value;
        }
    }
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        _ => EncodingKey::from_secret(HS_SECRET.as_bytes()),
    };
    encode(&Header::new(algorithm), &claims, &key).unwrap()
}

struct Served {
    pipeline: Pipeline,
    server: Server,
}

async fn serve(configure: impl FnOnce(&mut TestEnv), with_world: bool) -> Served {
    let mut env = TestEnv::new(1).await;
    configure(&mut env);
    let mut pipeline = Pipeline::new(env);
    if with_world {
        let created: Vec<Envelope> = [WORLD, OTHER_WORLD]
            .into_iter()
            .map(|name| {
                let world = WorldId::parse(name).unwrap();
                let created = Body::WorldCreated(WorldCreated {
                    display_name: name.to_owned(),
                    seed: 1,
                    time_scale: 60,
                    tick_interval_ms: 1000,
                    regions: vec!["north".to_owned()],
                });
                new_envelope(&world, 0, "test", created)
            })
            .collect();
        pipeline.append(&created).await;
        // Every read model's schema must exist for the valid cases to get 200s.
        pipeline.start_projectors();
        pipeline.env.wait_all_caught_up().await;
        let first = pipeline.projectors[0].name();
        pipeline.stop_projectors_except(|name| name == first).await;
    }
    let server = Server::query_api(&pipeline.env.settings).await;
    Served { pipeline, server }
}

impl Served {
    async fn get(&self, path: &str, authorization: Option<&str>) -> reqwest::Response {
        let mut request = self.server.http.get(self.server.url(path));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        request.send().await.unwrap()
    }

    async fn stop(self) {
        self.server.stop();
        self.pipeline.stop().await;
    }
}

fn configure_matrix(env: &mut TestEnv) {
    env.settings.auth.tokens = vec![
        token("reader", "r3ader", &["read"], None),
        token("writer", "wr1ter", &["ingest"], None),
        token("frost-reader", "fr0st", &["read"], Some(&[OTHER_WORLD])),
    ];
    env.settings.auth.jwt = Some(JwtSettings {
        issuer: "https://id.example".to_owned(),
        audience: "worldline".to_owned(),
        hs256_secret: Some(HS_SECRET.to_owned()),
        rs256_public_key_pem: Some(RSA_PUBLIC.to_owned()),
        leeway_seconds: 30,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_endpoint_enforces_the_auth_matrix() {
    let served = serve(configure_matrix, true).await;
    let expired = format!(
        "Bearer {}",
        jwt(
            Algorithm::HS256,
            json!({"exp": get_current_timestamp() - 120})
        )
    );
    let wrong_audience = format!("Bearer {}", jwt(Algorithm::HS256, json!({"aud": "other"})));
    let hs = format!("Bearer {}", jwt(Algorithm::HS256, json!({})));
    let rs = format!("Bearer {}", jwt(Algorithm::RS256, json!({})));
    let challenge = "Bearer realm=\"worldline\"";
    let invalid = "Bearer realm=\"worldline\", error=\"invalid_token\"";
    for endpoint in ENDPOINTS {
        let path = endpoint.replace("{w}", WORLD);
        let per_world = endpoint.contains("{w}");
        let is_stream = endpoint.ends_with("/stream");
        for (case, authorization, status, www) in [
            ("none", None, 401, Some(challenge)),
            ("malformed", Some("Bearer two words"), 401, Some(invalid)),
            (
                "not bearer",
                Some("Basic dXNlcjpwYXNz"),
                401,
                Some(challenge),
            ),
            ("unknown static", Some("Bearer n0pe"), 401, Some(invalid)),
            ("expired jwt", Some(expired.as_str()), 401, Some(invalid)),
            (
                "jwt wrong aud",
                Some(wrong_audience.as_str()),
                401,
                Some(invalid),
            ),
            ("wrong scope", Some("Bearer wr1ter"), 403, None),
        ] {
            // Credentials are judged before the query string: a parameter
            // the route does not take changes nothing for a refused request.
            for path in [path.clone(), with_unknown_parameter(&path)] {
                let response = served.get(&path, authorization).await;
                assert_eq!(response.status().as_u16(), status, "{case} on {path}");
                assert_eq!(
                    response.headers()["content-type"],
                    "application/problem+json",
                    "{case} on {path}"
                );
                if let Some(www) = www {
                    assert_eq!(
                        response.headers()["www-authenticate"],
                        www,
                        "{case} on {path}"
                    );
                }
            }
        }
        for (case, authorization) in [
            ("valid static", "Bearer r3ader"),
            ("valid jwt hs256", hs.as_str()),
            ("valid jwt rs256", rs.as_str()),
        ] {
            let response = served.get(&path, Some(authorization)).await;
            let status = response.status();
            if is_stream {
                // An endless body: the status and the media type are the answer.
                assert_eq!(status, StatusCode::OK, "{case} on {endpoint}");
                assert_eq!(
                    response.headers()["content-type"],
                    "text/event-stream",
                    "{case} on {endpoint}"
                );
                continue;
            }
            let body: Value = response.json().await.unwrap();
            // A single resource the world lacks (clock, a region's weather) is a
            // 404 from the handler, never the unknown-world one.
            assert!(
                status == StatusCode::OK
                    || (status == StatusCode::NOT_FOUND
                        && !body["detail"].as_str().unwrap().contains("does not exist")),
                "{case} on {endpoint}: {status} {body}"
            );
        }
        // Past the guards, the unknown parameter is the client's error.
        let response = served
            .get(&with_unknown_parameter(&path), Some("Bearer r3ader"))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "unknown parameter on {endpoint}"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["parameter"], "x", "unknown parameter on {endpoint}");
        if per_world {
            let hidden = served.get(&path, Some("Bearer fr0st")).await;
            assert_eq!(
                hidden.status(),
                StatusCode::NOT_FOUND,
                "another world on {endpoint}"
            );
            let hidden: Value = hidden.json().await.unwrap();
            let probing = served
                .get(&with_unknown_parameter(&path), Some("Bearer fr0st"))
                .await;
            assert_eq!(
                probing.status(),
                StatusCode::NOT_FOUND,
                "another world with an unknown parameter on {endpoint}"
            );
            let ghost = served
                .get(&endpoint.replace("{w}", "ghost"), Some("Bearer r3ader"))
                .await;
            let ghost: Value = ghost.json().await.unwrap();
            let unknown = serde_json::to_string(&ghost)
                .unwrap()
                .replace("ghost", WORLD);
            assert_eq!(
                serde_json::to_string(&hidden).unwrap(),
                unknown,
                "another world on {endpoint} answers like an unknown world"
            );
        }
    }
    // The list of worlds shows a limited token its worlds only, on every page.
    for (authorization, expected) in [
        ("Bearer r3ader", vec![WORLD, OTHER_WORLD]),
        ("Bearer fr0st", vec![OTHER_WORLD]),
    ] {
        let mut listed = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cursor) => format!("/v1/worlds?limit=1&cursor={cursor}"),
                None => "/v1/worlds?limit=1".to_owned(),
            };
            let response = served.get(&path, Some(authorization)).await;
            assert_eq!(response.status(), StatusCode::OK, "{authorization} {path}");
            let page: Value = response.json().await.unwrap();
            for item in page["items"].as_array().unwrap() {
                listed.push(item["world_id"].as_str().unwrap().to_owned());
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(listed, expected, "/v1/worlds with {authorization}");
    }

    // Operations endpoints stay open.
    for path in ["/livez", "/openapi.json"] {
        assert_eq!(
            served.get(path, None).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_gets_429_with_retry_after() {
    let served = serve(
        |env| {
            env.settings.auth.tokens = vec![
                token("busy", "bu5y", &["read"], None),
                token("calm", "ca1m", &["read"], None),
            ];
            env.settings.auth.rate_limit_per_second = 0.01;
            env.settings.auth.rate_limit_burst = 2;
        },
        false,
    )
    .await;
    for _ in 0..2 {
        let response = served.get("/v1/worlds/x/clock", Some("Bearer bu5y")).await;
        assert_ne!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    let limited = served.get("/v1/worlds/x/clock", Some("Bearer bu5y")).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    // Another token has its own bucket.
    let calm = served.get("/v1/worlds/x/clock", Some("Bearer ca1m")).await;
    assert_ne!(calm.status(), StatusCode::TOO_MANY_REQUESTS);
    served.stop().await;
}
