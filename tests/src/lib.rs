//! The test harness: each test gets its own topics (a random prefix), its own
//! consumer groups and its own fresh PostgreSQL database, on the real local
//! stack started by `ops/dev test` (or `ops/local/stack.sh up`).
//!
//! Connection settings come from the environment (`WORLDLINE__…`), falling back to
//! the `.worldline/env` file the stack script writes, so `cargo test` works in a
//! shell that never sourced it.

pub mod api;
pub mod bench;
pub mod fixture;
pub mod pipeline;
pub mod proxy;
pub mod workload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;
use worldline_ops::{Health, Settings};
use worldline_projectors::{Projector, ProjectorRuntime, RuntimeOptions, Target};
use worldline_schemas::Family;

/// Values from the env file the stack script writes (`<state>/env`), for keys
/// the process environment does not set itself.
fn stack_env() -> HashMap<String, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let state = std::env::var("WORLDLINE_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join(".worldline"));
    let text = std::fs::read_to_string(state.join("env")).unwrap_or_default();
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.trim_matches('"').to_owned()))
        .filter(|(key, _)| std::env::var_os(key).is_none())
        .collect()
}

/// The run id in the name of a topic a [`TestEnv`] made (`t<id>.…`, beside
/// its database `wl_test_<id>`), or `None` for any other topic.
pub fn test_run_of_topic(topic: &str) -> Option<&str> {
    let id = topic.strip_prefix('t')?.split_once('.')?.0;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// One test's private slice of the real stack.
#[derive(Debug)]
pub struct TestEnv {
    /// Settings pointing at this test's topics, groups and database.
    pub settings: Settings,
    /// Pool on this test's database (owner role).
    pub pool: PgPool,
    database: String,
    admin_url: String,
}

impl TestEnv {
    /// A fresh database and a fresh topic prefix; event topics are created with
    /// `partitions` partitions.
    pub async fn new(partitions: i32) -> TestEnv {
        let from_file = stack_env();
        let mut settings = Settings::load(None).expect("settings");
        if let Some(servers) = from_file.get("WORLDLINE__KAFKA__BOOTSTRAP_SERVERS") {
            settings.kafka.bootstrap_servers = servers.clone();
        }
        if let Some(url) = from_file.get("WORLDLINE__DATABASE__URL") {
            settings.database.url = url.clone();
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let short = &id[..12];
        settings.topics.prefix = format!("t{short}.");
        settings.topics.partitions = partitions;
        settings.projector.group_prefix = format!("t{short}.projector.");
        settings.projector.batch_max_wait_ms = 10;
        settings.clock.tick_interval_ms = 1;

        let admin_url = std::env::var("WORLDLINE_TEST_ADMIN_DATABASE_URL")
            .ok()
            .or_else(|| from_file.get("WORLDLINE_TEST_ADMIN_DATABASE_URL").cloned())
            .unwrap_or_else(|| replace_database(&settings.database.url, "postgres"));
        let database = format!("wl_test_{short}");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .expect("admin database connection (is the stack up? `ops/dev up`)");
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        settings.database.url = replace_database(&settings.database.url, &database);
        settings.database.reader_url = None;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&settings.database.url)
            .await
            .expect("test database connection");

        let mut specs = worldline_ops::topics::event_topic_specs(&settings.topics);
        specs.push(worldline_ops::topics::dead_letter_topic_spec(
            &settings.topics,
        ));
        worldline_ops::topics::ensure_topics(&settings.kafka, &specs)
            .await
            .expect("create test topics");
        TestEnv {
            settings,
            pool,
            database,
            admin_url,
        }
    }

    /// This test's database.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A connection URL of the server's maintenance database, as the test's role.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The topic of `family` for this test.
    pub fn topic(&self, family: Family) -> String {
        family.topic(&self.settings.topics.prefix)
    }

    /// A raw producer for writing arbitrary bytes (poison records) with the same
    /// partitioner as the appender.
    pub fn raw_producer(&self) -> rdkafka::producer::FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.bootstrap_servers)
            .set("partitioner", "murmur2_random")
            .set("acks", "all")
            .create()
            .expect("raw producer")
    }

    /// Writes `payload` as it is (a poison record, or bytes an older build
    /// wrote) to the topic of `family`, keyed `key` like the appender keys a
    /// world's events.
    pub async fn send_raw(&self, family: Family, key: &str, payload: &[u8]) {
        self.raw_producer()
            .send(
                FutureRecord::to(&self.topic(family))
                    .key(key)
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("raw record written");
    }

    /// Reads every record of `topic` from the beginning to the current end.
    pub fn read_topic(&self, topic: &str) -> Vec<RawRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.bootstrap_servers)
            .set("group.id", format!("{}reader", self.settings.topics.prefix))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut ends = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for partition in &partitions {
            let (low, high) = watermarks(&consumer, topic, *partition);
            if high > low {
                ends.insert(*partition, high);
                assignment
                    .add_partition_offset(topic, *partition, Offset::Offset(low))
                    .expect("assignment");
            }
        }
        let mut records = Vec::new();
        if ends.is_empty() {
            return records;
        }
        consumer.assign(&assignment).expect("assign");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut done: HashMap<i32, bool> = ends.keys().map(|p| (*p, false)).collect();
        while done.values().any(|d| !d) && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message.expect("consume");
            let partition = message.partition();
            if message.offset() + 1 >= ends[&partition] {
                done.insert(partition, true);
            }
            if message.offset() < ends[&partition] {
                records.push(RawRecord {
                    partition,
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers: {
                        use rdkafka::message::Headers;
                        message
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|header| {
                                        (
                                            header.key.to_owned(),
                                            String::from_utf8_lossy(
                                                header.value.unwrap_or_default(),
                                            )
                                            .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default()
                    },
                });
            }
        }
        assert!(
            done.values().all(|d| *d),
            "timed out reading {topic} to its end"
        );
        records.sort_by_key(|r| (r.partition, r.offset));
        records
    }

    /// Runs `projector` in the background until the returned handle is stopped.
    pub fn start_projector(&self, projector: Arc<dyn Projector>) -> Running {
        self.start_projector_with(projector, |_| {})
    }

    /// [`TestEnv::start_projector`], with `configure` applied to its runtime
    /// options first.
    pub fn start_projector_with(
        &self,
        projector: Arc<dyn Projector>,
        configure: impl FnOnce(&mut RuntimeOptions),
    ) -> Running {
        let name = projector.name();
        let targets = vec![worldline_projectors::target(&self.settings, projector)];
        let mut options = worldline_projectors::runtime_options(&self.settings, &targets);
        configure(&mut options);
        let runtime = self.runtime(targets, options, Health::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(runtime.run(shutdown.clone()));
        Running {
            name,
            shutdown,
            task,
        }
    }

    /// A runtime of `targets` on this test's database and broker, not yet
    /// running, reporting to `health`.
    pub fn runtime(
        &self,
        targets: Vec<Target>,
        options: RuntimeOptions,
        health: Health,
    ) -> ProjectorRuntime {
        ProjectorRuntime::new(
            targets,
            self.pool.clone(),
            self.settings.kafka.clone(),
            options,
            health,
        )
    }

    /// Environment variables that point a child `worldline` process at this
    /// test's topics, groups and database.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        vec![
            (
                "WORLDLINE__KAFKA__BOOTSTRAP_SERVERS".into(),
                s.kafka.bootstrap_servers.clone(),
            ),
            ("WORLDLINE__DATABASE__URL".into(), s.database.url.clone()),
            ("WORLDLINE__TOPICS__PREFIX".into(), s.topics.prefix.clone()),
            (
                "WORLDLINE__TOPICS__PARTITIONS".into(),
                s.topics.partitions.to_string(),
            ),
            (
                "WORLDLINE__PROJECTOR__GROUP_PREFIX".into(),
                s.projector.group_prefix.clone(),
            ),
            (
                "WORLDLINE__PROJECTOR__BATCH_MAX_RECORDS".into(),
                s.projector.batch_max_records.to_string(),
            ),
            (
                "WORLDLINE__PROJECTOR__BATCH_MAX_WAIT_MS".into(),
                s.projector.batch_max_wait_ms.to_string(),
            ),
            (
                "WORLDLINE__PROJECTOR__SESSION_TIMEOUT_MS".into(),
                s.projector.session_timeout_ms.to_string(),
            ),
            ("WORLDLINE__OPS__LISTEN".into(), "127.0.0.1:0".into()),
            ("RUST_LOG".into(), "warn,worldline_projectors=info".into()),
        ]
    }

    /// The end offset (high watermark) of every partition of `topic`.
    pub fn high_watermarks(&self, topic: &str) -> HashMap<i32, i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.bootstrap_servers)
            .create()
            .expect("consumer");
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .expect("metadata");
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (_, high) = watermarks(&consumer, topic, p.id());
                (p.id(), high)
            })
            .collect()
    }

    /// Whether `schema`'s stored offsets equal the end of every topic it reads.
    pub async fn caught_up(&self, schema: &str, projector: &dyn Projector) -> bool {
        for family in projector.families() {
            let topic = self.topic(*family);
            let ends = self.high_watermarks(&topic);
            let stored: Vec<(i32, i64)> = match sqlx::query_as(AssertSqlSafe(format!(
                "SELECT partition, next_offset FROM {schema}.projector_offsets WHERE topic = $1"
            )))
            .bind(&topic)
            .fetch_all(&self.pool)
            .await
            {
                Ok(rows) => rows,
                Err(_) => return false,
            };
            let stored: HashMap<i32, i64> = stored.into_iter().collect();
            for (partition, end) in ends {
                if end > 0 && stored.get(&partition).copied().unwrap_or(0) != end {
                    return false;
                }
            }
        }
        true
    }

    /// Runs `sql` on this test's database as its owner.
    pub async fn execute(&self, sql: &str) {
        sqlx::query(AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// The one `bigint` that `sql` selects from this test's database.
    pub async fn scalar(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
    }

    /// `schema`'s stored next offset of every partition of `topic`, by partition.
    pub async fn stored_offsets(&self, schema: &str, topic: &str) -> Vec<(i32, i64)> {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT partition, next_offset FROM {schema}.projector_offsets
              WHERE topic = $1 ORDER BY partition"
        )))
        .bind(topic)
        .fetch_all(&self.pool)
        .await
        .expect("stored offsets")
    }

    /// Rebuilds `projector` from offset zero into `<name>_rebuild` and returns the
    /// read-model tables whose checksums differ from the live schema's.
    pub async fn rebuild_differences(&self, projector: Arc<dyn Projector>) -> Vec<String> {
        let live = worldline_projectors::SchemaName::parse(projector.name()).expect("schema");
        let rebuilt =
            worldline_projectors::SchemaName::parse(&format!("{}_rebuild", projector.name()))
                .expect("schema");
        let targets = vec![worldline_projectors::target_into(
            &self.settings,
            projector.clone(),
            rebuilt.clone(),
        )];
        let options = worldline_projectors::runtime_options(&self.settings, &targets);
        let shutdown = CancellationToken::new();
        let runtime = self.runtime(targets, options, Health::default());
        let task = tokio::spawn(runtime.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.caught_up(rebuilt.as_str(), projector.as_ref()).await {
            assert!(
                Instant::now() < deadline,
                "rebuild of {} did not catch up",
                projector.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        task.await.expect("rebuild task").expect("rebuild ran");
        let left = worldline_projectors::verify::table_checksums(&self.pool, &live)
            .await
            .expect("live checksums");
        let right = worldline_projectors::verify::table_checksums(&self.pool, &rebuilt)
            .await
            .expect("rebuild checksums");
        assert!(
            !left.is_empty(),
            "no read-model tables in {}",
            live.as_str()
        );
        worldline_projectors::verify::differences(&left, &right)
    }

    /// Drops this test's database and topics. Call at the end of a passing test;
    /// a failing test leaves them for inspection.
    pub async fn cleanup(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin_url)
            .await
        {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            )))
            .execute(&admin)
            .await;
        }
        let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.bootstrap_servers)
            .create();
        if let Ok(admin) = admin {
            let mut topics: Vec<String> = Family::ALL
                .iter()
                .map(|f| f.topic(&self.settings.topics.prefix))
                .collect();
            topics.push(format!(
                "{}worldline.dead-letters.v1",
                self.settings.topics.prefix
            ));
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
        }
    }
}

/// A projector running in the background.
#[derive(Debug)]
pub struct Running {
    name: &'static str,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), worldline_projectors::RuntimeError>>,
}

impl Running {
    /// The name of the projector it runs.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Waits for the projector to stop by itself and returns why.
    pub async fn halted(self, timeout: Duration) -> worldline_projectors::RuntimeError {
        let outcome = tokio::time::timeout(timeout, self.task)
            .await
            .expect("the projector should have halted by itself");
        match outcome.expect("projector task") {
            Ok(()) => panic!("the projector stopped without an error"),
            Err(error) => error,
        }
    }

    /// Asks it to stop and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("projector task")
            .expect("projector ran without error");
    }
}

/// A record as stored in Kafka.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// Waits until `check` returns `Some`, polling every 50 ms, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watermarks, retried while a new topic's partition leaders settle (the broker
/// answers NotLeaderForPartition for a moment after creation).
fn watermarks(consumer: &BaseConsumer, topic: &str, partition: i32) -> (i64, i64) {
    let mut attempt = 0;
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(watermarks) => return watermarks,
            Err(error) if attempt < 40 => {
                attempt += 1;
                let _ = error;
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(error) => panic!("watermarks of {topic}[{partition}]: {error}"),
        }
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(slash) if slash > base.find("://").map_or(0, |i| i + 2) => &base[..slash],
        _ => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_topics_are_known_by_their_run_id() {
        assert_eq!(
            test_run_of_topic("t0123456789ab.worldline.clock.v1"),
            Some("0123456789ab")
        );
        assert_eq!(test_run_of_topic("worldline.clock.v1"), None);
        assert_eq!(test_run_of_topic("tshort.worldline.clock.v1"), None);
        assert_eq!(test_run_of_topic("t0123456789xy.worldline.clock.v1"), None);
    }

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            replace_database("postgres://u@h:1/worldline", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            replace_database("postgres://u@h:1/worldline?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
    }
}
