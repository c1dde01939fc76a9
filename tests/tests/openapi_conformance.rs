//! schemathesis (PyPI) against the OpenAPI document the query API serves: every
//! documented operation is called with generated valid and invalid inputs
//! (fixed seed), and every answer must match the document, never a 5xx.
//!
//! The API runs as `worldline serve` builds it (auth, limits, read-your-writes),
//! over read models the real pipeline filled from `tests/src/fixture.rs`, so
//! the ids in `ops/schemathesis.toml` reach real rows. `ops/dev test` installs
//! the schemathesis pinned in `ops/schemathesis-requirements.txt`; without it
//! the test is skipped with a message, unless `CI` is set, where a missing tool
//! is a failure.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::path::{Path, PathBuf};

use worldline_tests::api::{Server, read_token};
use worldline_tests::pipeline::Pipeline;
use worldline_tests::{TestEnv, fixture};

const TOKEN: &str = "conformance-read-token";

/// The Hypothesis seed: the same seed, schemathesis and document make the same
/// requests, so a failure in CI replays locally.
const SEED: &str = "1";

/// Examples per operation in the fuzzing phase (the coverage phase's count
/// follows from the document). 100 keeps the whole run near a minute on a
/// debug build; past that, more examples mostly repeat the same shapes.
const MAX_EXAMPLES: &str = "100";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The schemathesis executable: `SCHEMATHESIS`, then the one `ops/dev test`
/// installs, then `PATH`.
fn schemathesis() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SCHEMATHESIS") {
        return Some(PathBuf::from(path));
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());
    let installed = Path::new(&home).join(".cache/worldline/schemathesis-venv/bin/schemathesis");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("schemathesis"))
            .find(|candidate| candidate.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_holds_for_every_generated_request() {
    let Some(schemathesis) = schemathesis() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is missing and CI is set: `ops/dev test` installs it"
        );
        eprintln!(
            "SKIPPED openapi_conformance: schemathesis is missing (ops/dev test installs it)"
        );
        return;
    };

    let mut env = TestEnv::new(2).await;
    env.settings
        .auth
        .tokens
        .push(read_token("conformance", TOKEN));
    // Thousands of requests in a few minutes from one principal: the limiter is
    // tested elsewhere (query_auth), here it would only turn answers into 429s.
    env.settings.auth.rate_limit_per_second = 100_000.0;
    env.settings.auth.rate_limit_burst = 100_000;
    let mut pipeline = Pipeline::over(env, &fixture::events()).await;
    // A quiet read side: generated requests see the fixture, nothing moving.
    pipeline.stop_projectors().await;
    let server = Server::query_api(&pipeline.env.settings).await;

    let output = tokio::process::Command::new("bash")
        .arg(repo_root().join("ops/check-openapi.sh"))
        .arg(&server.base)
        .arg("--header")
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .env("SCHEMATHESIS", &schemathesis)
        .env("SEED", SEED)
        .env("MAX_EXAMPLES", MAX_EXAMPLES)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The summary is the figure a reader wants from CI either way.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "schemathesis found failures (exit {:?}); its report is above",
        output.status.code()
    );
    server.stop();
    pipeline.stop().await;
}

/// The `Last-Event-ID` that `ops/schemathesis.toml` sends stands for the very
/// start of a stream; an id drifting from `Position::origin()` would quietly
/// test a resume from somewhere else.
#[test]
fn the_configured_last_event_id_is_the_stream_origin() {
    let config = std::fs::read_to_string(repo_root().join("ops/schemathesis.toml")).unwrap();
    let configured: Vec<&str> = config
        .lines()
        .filter_map(|line| line.trim().strip_prefix(r#""header.Last-Event-ID" = "#))
        .map(|value| value.trim().trim_matches('"'))
        .collect();
    assert_eq!(
        configured,
        [worldline_query_api::stream::Position::origin().encode()]
    );
}
