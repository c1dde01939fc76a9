//! Every role that reads or writes the event topics refuses to start on a topic
//! that would lose events (finite retention in time or size, or compaction), and
//! says which topic, which setting and how to fix it.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::future::Future;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use tokio_util::sync::CancellationToken;
use worldline_ops::Settings;
use worldline_ops::topics::{ensure_topics, event_topic_specs, verify_event_topics};
use worldline_schemas::Family;
use worldline_tests::TestEnv;

/// One way an event topic can be misconfigured.
struct Misconfiguration {
    family: Family,
    key: &'static str,
    value: &'static str,
}

const MISCONFIGURATIONS: [Misconfiguration; 3] = [
    Misconfiguration {
        family: Family::Clock,
        key: "retention.ms",
        value: "604800000",
    },
    Misconfiguration {
        family: Family::Weather,
        key: "cleanup.policy",
        value: "compact",
    },
    Misconfiguration {
        family: Family::Story,
        key: "retention.bytes",
        value: "1073741824",
    },
];

/// Creates every event topic under a fresh prefix, correct except for `bad`,
/// and returns settings pointing at them (and at the test's database).
async fn topics_with(env: &TestEnv, bad: &Misconfiguration) -> Settings {
    let mut settings = env.settings.clone();
    settings.topics.prefix = format!("{}{}.", env.settings.topics.prefix, bad.family.as_str());
    // A role that failed to refuse must not take the API's usual port.
    settings.http.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut specs = event_topic_specs(&settings.topics);
    for spec in &mut specs {
        if spec.name == bad.family.topic(&settings.topics.prefix) {
            spec.configs.retain(|(key, _)| *key != bad.key);
            spec.configs.push((bad.key, bad.value.to_owned()));
        }
    }
    ensure_topics(&settings.kafka, &specs).await.unwrap();
    settings
}

async fn delete_topics(settings: &Settings) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .create()
        .unwrap();
    let names: Vec<String> = Family::ALL
        .iter()
        .map(|f| f.topic(&settings.topics.prefix))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}

/// Runs a role and returns the message `worldline` would print for its failure.
/// A role that does not refuse runs until the time limit, and the test fails.
async fn refusal<F>(role: &str, shutdown: &CancellationToken, run: F) -> String
where
    F: Future<Output = anyhow::Result<()>>,
{
    let outcome = tokio::time::timeout(Duration::from_secs(60), run).await;
    // Ends whatever the role started before it refused (its ops listener).
    shutdown.cancel();
    match outcome {
        Ok(Err(error)) => format!("{error:#}"),
        Ok(Ok(())) => panic!("{role} ran to completion on topics that lose events"),
        Err(_) => panic!("{role} kept running on topics that lose events"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_refuses_an_event_topic_that_would_lose_events() {
    let env = TestEnv::new(1).await;
    // The harness's own topics are correct, so the check itself passes there.
    verify_event_topics(&env.settings.kafka, &env.settings.topics)
        .await
        .unwrap();

    for bad in &MISCONFIGURATIONS {
        let settings = topics_with(&env, bad).await;
        let topic = bad.family.topic(&settings.topics.prefix);
        let mut messages = Vec::new();

        let shutdown = CancellationToken::new();
        let run = worldline::roles::produce_clock(&settings, Vec::new(), Some(1), shutdown.clone());
        messages.push((
            "produce clock",
            refusal("produce clock", &shutdown, run).await,
        ));

        let shutdown = CancellationToken::new();
        let run = worldline::roles::produce_weather(&settings, shutdown.clone());
        messages.push((
            "produce weather",
            refusal("produce weather", &shutdown, run).await,
        ));

        let shutdown = CancellationToken::new();
        let run = worldline::roles::simulate(&settings, Some(1), shutdown.clone());
        messages.push(("simulate", refusal("simulate", &shutdown, run).await));

        let shutdown = CancellationToken::new();
        let run = worldline::roles::project(&settings, &[], shutdown.clone());
        messages.push((
            "project",
            Box::pin(refusal("project", &shutdown, run)).await,
        ));

        let shutdown = CancellationToken::new();
        let run = worldline::roles::serve(&settings, shutdown.clone());
        messages.push((
            "serve (ingest gateway)",
            Box::pin(refusal("serve", &shutdown, run)).await,
        ));

        for (role, message) in messages {
            println!("{role}: {message}");
            for expected in [
                format!("event topic {topic} has {}={}", bad.key, bad.value),
                "refuses to run".to_owned(),
                format!("--entity-name {topic} --add-config {}=", bad.key),
            ] {
                assert!(
                    message.contains(&expected),
                    "{role} on {topic} with {}={}: the message should contain {expected:?}, it is: {message}",
                    bad.key,
                    bad.value
                );
            }
        }
        delete_topics(&settings).await;
    }
    env.cleanup().await;
}
