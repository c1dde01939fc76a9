//! Child processes, background appends and the exactly-once oracle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::registry;
use worldline_schemas::pb::Envelope;
use worldline_tests::TestEnv;
use worldline_tests::workload::Workload;

/// Heavy tests take this so they never overlap on a two-core machine.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A `worldline project` child process with its log file.
pub struct Projector {
    pub child: Child,
    pub log: PathBuf,
}

impl Projector {
    /// Starts `worldline project` (every projector) against the test's stack slice.
    pub fn spawn(env: &TestEnv, name: &str) -> Projector {
        Projector::spawn_with_env(env, name, Vec::new())
    }

    /// Like `spawn`, with its health and metrics on a known port.
    pub fn spawn_with_ops_port(env: &TestEnv, name: &str) -> (Projector, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = vec![(
            "WORLDLINE__OPS__LISTEN".to_owned(),
            format!("127.0.0.1:{port}"),
        )];
        (Projector::spawn_with_env(env, name, listen), port)
    }

    fn spawn_with_env(env: &TestEnv, name: &str, extra: Vec<(String, String)>) -> Projector {
        let log = std::env::temp_dir().join(format!(
            "{}{name}-{}.log",
            env.settings.topics.prefix,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_worldline"))
            .arg("project")
            .envs(env.child_env())
            .envs(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Projector { child, log }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "projector exited with {status}; log: {}",
                    self.log.display()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "projector ignored SIGTERM; log: {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running (it must never exit on its own).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// An appender for the test's topics.
pub fn appender(env: &TestEnv) -> Appender {
    Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            source: "test".to_owned(),
            ..AppenderOptions::default()
        },
    )
    .unwrap()
}

/// Records appended per world: the oracle's expected counts.
#[derive(Debug, Default, Clone)]
pub struct Appended(pub HashMap<String, i64>);

impl Appended {
    pub fn add(&mut self, events: &[Envelope]) {
        for event in events {
            *self.0.entry(event.world_id.clone()).or_default() += 1;
        }
    }
}

/// Appends `rounds` batches of `per_round` events, one batch every `every`.
pub fn append_in_background(
    appender: Appender,
    workload: Arc<std::sync::Mutex<Workload>>,
    rounds: usize,
    per_round: usize,
    every: Duration,
) -> tokio::task::JoinHandle<Appended> {
    tokio::spawn(async move {
        let mut appended = Appended::default();
        for _ in 0..rounds {
            let batch = workload.lock().unwrap().next_batch(per_round);
            for result in appender.append_batch(&batch).await {
                result.unwrap();
            }
            appended.add(&batch);
            tokio::time::sleep(every).await;
        }
        appended
    })
}

/// Appends `n` events now.
pub async fn append_now(
    appender: &Appender,
    workload: &std::sync::Mutex<Workload>,
    n: usize,
) -> Appended {
    let batch = {
        let mut workload = workload.lock().unwrap();
        let mut batch = workload.creations();
        batch.extend(workload.next_batch(n));
        batch
    };
    for result in appender.append_batch(&batch).await {
        result.unwrap();
    }
    let mut appended = Appended::default();
    appended.add(&batch);
    appended
}

/// Waits until every projector's stored offsets reach the end of its topics.
pub async fn wait_until_caught_up(env: &TestEnv, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for projector in registry::all() {
        while !env.caught_up(projector.name(), projector.as_ref()).await {
            assert!(
                Instant::now() < deadline,
                "projector {} did not catch up",
                projector.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The exactly-once oracle; see the module docs of `main.rs`.
pub async fn assert_exactly_once(env: &TestEnv, appended: &Appended) {
    let applied: Vec<(String, i64)> =
        sqlx::query_as("SELECT world_id, records_applied FROM worlds.worlds ORDER BY world_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let applied: HashMap<String, i64> = applied.into_iter().collect();
    assert_eq!(
        applied, appended.0,
        "records applied per world must equal records appended per world"
    );
    for projector in registry::all() {
        let differences = env.rebuild_differences(projector.clone()).await;
        assert!(
            differences.is_empty(),
            "{}: tables differ from a rebuild: {differences:?}",
            projector.name()
        );
    }
}
