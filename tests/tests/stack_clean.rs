//! `ops/local/stack.sh clean`: what interrupted runs leave (a test database and
//! its topics) is dropped; what a run still going holds is kept.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;
use worldline_tests::TestEnv;

/// The topics on the broker that start with `prefix`.
fn topics_with_prefix(bootstrap: &str, prefix: &str) -> Vec<String> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let metadata = client
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    metadata
        .topics()
        .iter()
        .map(|topic| topic.name().to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

async fn database_exists(admin: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn clean_drops_the_leftovers_of_interrupted_runs_and_keeps_runs_in_progress() {
    // Given a run that ended without its cleanup (no session on its database)...
    let interrupted = TestEnv::new(2).await;
    let interrupted_db = interrupted.database().to_owned();
    let interrupted_prefix = interrupted.settings.topics.prefix.clone();
    interrupted.pool.close().await;
    // ...and a run still going (its pool holds a session).
    let running = TestEnv::new(2).await;
    sqlx::query("SELECT 1")
        .execute(&running.pool)
        .await
        .unwrap();
    let bootstrap = running.settings.kafka.bootstrap_servers.clone();
    let admin = PgPool::connect(running.admin_url()).await.unwrap();
    assert!(database_exists(&admin, &interrupted_db).await);
    assert!(!topics_with_prefix(&bootstrap, &interrupted_prefix).is_empty());

    // When the stack is cleaned...
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops/local/stack.sh");
    // Named runs only: other tests' leftovers stay for inspection.
    let ids: Vec<String> = [interrupted_db.as_str(), running.database()]
        .iter()
        .map(|db| db.trim_start_matches("wl_test_").to_owned())
        .collect();
    let output = Command::new("bash")
        .arg(script)
        .arg("clean")
        .args(&ids)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "clean failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // ...then the interrupted run's database and topics are gone...
    assert!(
        !database_exists(&admin, &interrupted_db).await,
        "{interrupted_db} was kept: {stdout}"
    );
    // (topic deletion completes in the background on the broker)
    let mut left = topics_with_prefix(&bootstrap, &interrupted_prefix);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = topics_with_prefix(&bootstrap, &interrupted_prefix);
    }
    assert!(left.is_empty(), "topics kept: {left:?}; {stdout}");
    // ...and the running one's are untouched, and still usable.
    assert!(database_exists(&admin, running.database()).await);
    let running_topics = topics_with_prefix(&bootstrap, &running.settings.topics.prefix);
    assert_eq!(
        running_topics.len(),
        6,
        "five event topics and the dead-letter topic: {running_topics:?}"
    );
    sqlx::query("SELECT 1")
        .execute(&running.pool)
        .await
        .unwrap();
    assert!(
        stdout.contains("clean: dropped 1 test database(s)"),
        "{stdout}"
    );
    admin.close().await;
    running.cleanup().await;
}
