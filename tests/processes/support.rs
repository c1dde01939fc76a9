//! Child processes, background appends and the exactly-once oracle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use worldline_producers::{Appender, AppenderOptions};
use worldline_projectors::registry;
use worldline_schemas::pb::Envelope;
use worldline_tests::workload::Workload;
use worldline_tests::{TestEnv, eventually};

/// Heavy tests take this so they never overlap on a two-core machine.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A `worldline project` child process with its log file, its ops endpoint
/// (`/livez`, `/readyz`, `/metrics`) and the `application_name` its database
/// sessions carry (so `pg_stat_activity` tells its transactions apart).
pub struct Projector {
    pub child: Child,
    pub log: PathBuf,
    pub ops: String,
    pub application_name: String,
}

/// A test that fails part-way must not leave its processes running (and
/// loading the machine for every test after it).
impl Drop for Projector {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each spawned process gets its own `application_name`.
static SPAWNED: AtomicU64 = AtomicU64::new(0);

impl Projector {
    /// Starts `worldline project` (every projector) against the test's stack slice.
    pub fn spawn(env: &TestEnv, name: &str) -> Projector {
        Projector::spawn_with_database(env, name, &env.settings.database.url)
    }

    /// Like `spawn`, reaching PostgreSQL at `database_url` (a proxy a test can cut).
    pub fn spawn_with_database(env: &TestEnv, name: &str, database_url: &str) -> Projector {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let application_name = format!(
            "wl-{name}-{}-{}",
            std::process::id(),
            SPAWNED.fetch_add(1, Ordering::Relaxed)
        );
        let separator = if database_url.contains('?') { '&' } else { '?' };
        let extra = vec![
            (
                "WORLDLINE__OPS__LISTEN".to_owned(),
                format!("127.0.0.1:{port}"),
            ),
            (
                "WORLDLINE__DATABASE__URL".to_owned(),
                format!("{database_url}{separator}application_name={application_name}"),
            ),
        ];
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
        Projector {
            child,
            log,
            ops: format!("http://127.0.0.1:{port}"),
            application_name,
        }
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

    /// The HTTP status of an ops path, or `None` while nothing answers.
    pub async fn status(&self, path: &str) -> Option<u16> {
        let response = http()
            .get(format!("{}{path}", self.ops))
            .send()
            .await
            .ok()?;
        Some(response.status().as_u16())
    }

    /// The `/readyz` body (which checks pass and which do not).
    pub async fn readiness(&self) -> String {
        http()
            .get(format!("{}/readyz", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/metrics`, parsed; empty while the process is not answering yet.
    pub async fn metrics(&self) -> Metrics {
        let Ok(response) = http().get(format!("{}/metrics", self.ops)).send().await else {
            return Metrics::default();
        };
        Metrics::parse(&response.text().await.unwrap_or_default())
    }

    /// Waits until the process serves its ops endpoint.
    pub async fn wait_until_serving(&self) {
        eventually(
            Duration::from_secs(60),
            "the ops endpoint to answer",
            || async { self.status("/livez").await.filter(|s| *s == 200) },
        )
        .await;
    }

    /// Freezes the process (SIGSTOP) at a moment when one of its batches has a
    /// PostgreSQL transaction open, and confirms from `pg_stat_activity` that
    /// the transaction is still open (its session idle in transaction, waiting
    /// for the frozen client). Returns false, with the process running, if no
    /// such moment came within `attempts` tries.
    pub async fn freeze_mid_transaction(&self, env: &TestEnv, attempts: usize) -> bool {
        for _ in 0..attempts {
            let Some(open) = self.open_transaction(env, Duration::from_secs(2)).await else {
                continue;
            };
            self.signal("STOP");
            // Let the session finish whatever statement it was running: a
            // COMMIT in flight ends the transaction, anything else leaves it
            // open and waiting for the frozen client.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let still_open: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity
                  WHERE pid = $1 AND xact_start::text = $2
                    AND state LIKE 'idle in transaction%'",
            )
            .bind(open.0)
            .bind(&open.1)
            .fetch_optional(&env.pool)
            .await
            .unwrap();
            if still_open.is_some() {
                return true;
            }
            self.signal("CONT");
        }
        false
    }

    /// A session of this process with a transaction open: `(pid, xact_start)`.
    async fn open_transaction(&self, env: &TestEnv, within: Duration) -> Option<(i32, String)> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let open: Option<(i32, String)> = sqlx::query_as(
                "SELECT pid, xact_start::text FROM pg_stat_activity
                  WHERE application_name = $1 AND xact_start IS NOT NULL
                    AND state <> 'idle'
                  LIMIT 1",
            )
            .bind(&self.application_name)
            .fetch_optional(&env.pool)
            .await
            .unwrap();
            if open.is_some() {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        None
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// One scrape of a Prometheus text exposition: `(name, labels) → value`.
#[derive(Debug, Default, Clone)]
pub struct Metrics(Vec<(String, BTreeMap<String, String>, f64)>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                .collect();
            samples.push((name.to_owned(), labels, value));
        }
        Metrics(samples)
    }

    /// Every sample of `name`, with its labels.
    pub fn samples(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, labels, value)| (labels, *value))
            .collect()
    }

    /// The sum of every sample of `name` (0 when absent).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).iter().fold(0.0, |sum, (_, v)| sum + v)
    }

    /// The partitions this instance applies: `(projector, topic, partition)`.
    pub fn owned_partitions(&self) -> BTreeSet<(String, String, i32)> {
        self.samples("worldline_projector_partition_owned")
            .into_iter()
            .filter(|(_, value)| *value == 1.0)
            .map(|(labels, _)| partition_of(labels))
            .collect()
    }

    /// A per-partition gauge: `(projector, topic, partition) → value`.
    pub fn per_partition(&self, name: &str) -> BTreeMap<(String, String, i32), f64> {
        self.samples(name)
            .into_iter()
            .map(|(labels, value)| (partition_of(labels), value))
            .collect()
    }
}

fn partition_of(labels: &BTreeMap<String, String>) -> (String, String, i32) {
    (
        labels["projector"].clone(),
        labels["topic"].clone(),
        labels["partition"].parse().unwrap(),
    )
}

/// Every partition every projector reads: `(projector, topic, partition)`.
pub fn all_partitions(env: &TestEnv) -> BTreeSet<(String, String, i32)> {
    let mut all = BTreeSet::new();
    for projector in registry::all() {
        for family in projector.families() {
            for partition in 0..env.settings.topics.partitions {
                all.insert((projector.name().to_owned(), env.topic(*family), partition));
            }
        }
    }
    all
}

/// The seed of a randomized test: `WORLDLINE_TEST_SEED` to replay a run, else
/// fresh entropy. Printed, so a failure can be reproduced.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WORLDLINE_TEST_SEED") {
        Ok(value) => value.parse().expect("WORLDLINE_TEST_SEED is a u64"),
        Err(_) => rand::random(),
    };
    println!("{test}: seed {seed} (replay with WORLDLINE_TEST_SEED={seed})");
    seed
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

    /// Adds what another appender counted.
    pub fn merge(&mut self, other: Appended) {
        for (world, n) in other.0 {
            *self.0.entry(world).or_default() += n;
        }
    }
}

/// Appends a batch of `per_round` events every `every` until `stop` fires.
pub fn append_until(
    appender: Appender,
    workload: Arc<std::sync::Mutex<Workload>>,
    per_round: usize,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Appended> {
    tokio::spawn(async move {
        let mut appended = Appended::default();
        while !stop.is_cancelled() {
            let batch = workload.lock().unwrap().next_batch(per_round);
            for result in appender.append_batch(&batch).await {
                result.unwrap();
            }
            appended.add(&batch);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
        appended
    })
}

/// Creates every world of the workload and appends `n` events now.
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
    append(appender, &batch).await
}

/// Appends `n` more events of worlds already created.
pub async fn append_more(
    appender: &Appender,
    workload: &std::sync::Mutex<Workload>,
    n: usize,
) -> Appended {
    let batch = workload.lock().unwrap().next_batch(n);
    append(appender, &batch).await
}

async fn append(appender: &Appender, batch: &[Envelope]) -> Appended {
    for result in appender.append_batch(batch).await {
        result.unwrap();
    }
    let mut appended = Appended::default();
    appended.add(batch);
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
    assert_offsets_follow_the_last_record(env).await;
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

/// Every projector's stored next offset of every partition is the offset of
/// that partition's last record plus one: nothing after it left unapplied,
/// nothing invented past it.
async fn assert_offsets_follow_the_last_record(env: &TestEnv) {
    let mut last_records: HashMap<String, HashMap<i32, i64>> = HashMap::new();
    for projector in registry::all() {
        for family in projector.families() {
            let topic = env.topic(*family);
            let last = last_records.entry(topic.clone()).or_insert_with(|| {
                let mut last = HashMap::new();
                for record in env.read_topic(&topic) {
                    let at = last.entry(record.partition).or_insert(record.offset);
                    *at = (*at).max(record.offset);
                }
                last
            });
            let stored: Vec<(i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT partition, next_offset FROM {}.projector_offsets WHERE topic = $1",
                projector.name()
            )))
            .bind(&topic)
            .fetch_all(&env.pool)
            .await
            .unwrap();
            let stored: HashMap<i32, i64> = stored.into_iter().collect();
            let expected: HashMap<i32, i64> = last.iter().map(|(p, o)| (*p, o + 1)).collect();
            assert_eq!(
                stored,
                expected,
                "{}: stored offsets of {topic} must be each partition's last record + 1",
                projector.name()
            );
        }
    }
}
