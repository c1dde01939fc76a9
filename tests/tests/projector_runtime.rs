//! The projector runtime on the real stack: dead letters, duplicates, and the
//! compare-and-set that keeps a zombie instance from applying twice.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::migrate::Migrator;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use worldline_ops::Health;
use worldline_projectors::read_models::clock::ClockProjector;
use worldline_projectors::read_models::worlds::WorldsProjector;
use worldline_projectors::store::{
    OffsetMove, SchemaName, compare_and_set_offset, compare_and_set_offsets, prepare_schema,
};
use worldline_projectors::{ApplyError, Event, Projector, RuntimeError};
use worldline_schemas::envelope::{EnvelopeExt, new_envelope};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{ClockTicked, Envelope, Season};
use worldline_schemas::{Family, WorldId};
use worldline_tests::{TestEnv, eventually, pipeline};

fn tick(world: &WorldId, n: u64) -> Envelope {
    new_envelope(
        world,
        n,
        "test",
        Body::ClockTicked(ClockTicked {
            game_time_s: n * 60,
            day: 0,
            season: Season::Spring as i32,
            time_scale: 60,
        }),
    )
}

/// The clock read model's schema, with its tables and nothing in them: what
/// `worldline migrate` creates.
async fn clock_schema(env: &TestEnv) -> SchemaName {
    let schema = SchemaName::parse("clock").unwrap();
    prepare_schema(&env.pool, &schema, &ClockProjector)
        .await
        .unwrap();
    schema
}

/// Waits until `schema`'s clock table holds `tick` for `world`.
async fn wait_for_tick(env: &TestEnv, schema: &str, world: &WorldId, tick: i64) {
    let sql = format!("SELECT tick FROM {schema}.world_clock WHERE world_id = $1");
    eventually(
        Duration::from_secs(30),
        &format!("tick {tick} of {world} to be applied"),
        || async {
            let applied: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.clone()))
                .bind(world.as_str())
                .fetch_optional(&env.pool)
                .await
                .ok()?;
            (applied == Some(tick)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_become_one_dead_letter_each_and_later_events_still_apply() {
    let env = TestEnv::new(2).await;
    let world = WorldId::parse("poisoned").unwrap();
    let appender = env.appender();
    let first: Vec<Envelope> = (1..=10).map(|n| tick(&world, n)).collect();
    pipeline::append(&appender, &first).await;

    // Four kinds of poison, keyed like the world so they sit in its partition.
    let valid = tick(&world, 11).to_bytes();
    let mut unknown_type = Envelope {
        body: None,
        ..tick(&world, 11)
    }
    .encode_to_vec();
    unknown_type.extend_from_slice(&[0x7a, 0x00]); // field 15, empty: a body type this build does not know
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", vec![0xde, 0xad, 0xbe, 0xef, 0xff, 0x01]),
        ("truncated protobuf", valid[..valid.len() / 2].to_vec()),
        ("empty value", Vec::new()),
        ("unknown event type", unknown_type),
    ];
    let topic = env.topic(Family::Clock);
    for (_, bytes) in &poison {
        env.send_raw(Family::Clock, world.as_str(), bytes).await;
    }
    // A producer retry: the same event (same id) again at a later offset, then more ticks.
    let mut later = vec![first[9].clone()];
    later.extend((11..=20).map(|n| tick(&world, n)));
    pipeline::append(&appender, &later).await;

    let projector = env.start_projector(Arc::new(ClockProjector));
    wait_for_tick(&env, "clock", &world, 20).await;

    let letters: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT error_class, error_message, payload_sha256 FROM clock.dead_letters ORDER BY kafka_offset",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        letters.len(),
        poison.len(),
        "one dead letter per poison record: {letters:?}"
    );
    let classes: Vec<&str> = letters.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(classes, ["malformed", "malformed", "empty", "invalid"]);
    assert!(letters[3].1.contains("no body"), "{}", letters[3].1);
    assert_eq!(
        letters[2].2,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );

    // A copy of each dead letter reaches the dead-letter topic, with the reason.
    let dead_topic = format!("{}worldline.dead-letters.v1", env.settings.topics.prefix);
    let copies = env.read_topic(&dead_topic);
    assert_eq!(copies.len(), poison.len());
    for copy in &copies {
        let headers: std::collections::HashMap<_, _> = copy.headers.iter().cloned().collect();
        assert_eq!(headers["wl_dlq_projector"], "clock");
        assert_eq!(headers["wl_dlq_topic"], topic);
        assert!(!headers["wl_dlq_error"].is_empty());
        assert_eq!(copy.key.as_deref(), Some(world.as_str().as_bytes()));
    }

    // Every record of the topic is accounted for exactly once by the stored offsets.
    let records = env.read_topic(&topic);
    let total_next: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(next_offset), 0)::bigint FROM clock.projector_offsets WHERE topic = $1",
    )
    .bind(&topic)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(total_next, records.len() as i64);

    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_offset_cannot_be_committed_twice() {
    let env = TestEnv::new(1).await;
    let schema = clock_schema(&env).await;
    let mut conn = env.pool.acquire().await.unwrap();

    // First writer of a partition: no row yet.
    assert!(
        compare_and_set_offset(&mut conn, &schema, "t", 0, None, 10)
            .await
            .unwrap()
    );
    // A second instance that also saw "no row" (it was assigned before the first commit) loses.
    assert!(
        !compare_and_set_offset(&mut conn, &schema, "t", 0, None, 5)
            .await
            .unwrap()
    );
    // The live instance moves on from 10.
    assert!(
        compare_and_set_offset(&mut conn, &schema, "t", 0, Some(10), 20)
            .await
            .unwrap()
    );
    // A zombie that loaded 10 before pausing cannot commit its batch now.
    assert!(
        !compare_and_set_offset(&mut conn, &schema, "t", 0, Some(10), 20)
            .await
            .unwrap()
    );
    let stored: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM clock.projector_offsets WHERE topic = 't' AND partition = 0",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(stored, 20);
    drop(conn);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_moves_every_partition_by_compare_and_set_in_one_statement() {
    let env = TestEnv::new(1).await;
    let schema = clock_schema(&env).await;
    let mut conn = env.pool.acquire().await.unwrap();
    let mv = |partition: i32, expected: Option<i64>, next: i64| OffsetMove {
        topic: "t".to_owned(),
        partition,
        expected,
        next,
    };

    // First batch of two partitions: no rows yet, both inserted.
    let conflicts = compare_and_set_offsets(&mut conn, &schema, &[mv(0, None, 10), mv(1, None, 4)])
        .await
        .unwrap();
    assert_eq!(conflicts, Vec::<(String, i32)>::new());
    // A zombie that loaded partition 0 at 10 and partition 1 at "no row":
    // partition 0 still matches, partition 1 does not; it is told which, and
    // rolls its transaction back as the runtime does.
    let mut tx = conn.begin().await.unwrap();
    let conflicts =
        compare_and_set_offsets(&mut tx, &schema, &[mv(0, Some(10), 30), mv(1, None, 9)])
            .await
            .unwrap();
    assert_eq!(conflicts, vec![("t".to_owned(), 1)]);
    tx.rollback().await.unwrap();
    // The live instance moves both on, and a new partition besides.
    let conflicts = compare_and_set_offsets(
        &mut conn,
        &schema,
        &[mv(0, Some(10), 40), mv(1, Some(4), 8), mv(2, None, 1)],
    )
    .await
    .unwrap();
    assert_eq!(conflicts, Vec::<(String, i32)>::new());
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM clock.projector_offsets ORDER BY partition",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(stored, vec![(0, 40), (1, 8), (2, 1)]);
    drop(conn);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_projector_resumes_from_postgres_not_from_the_beginning() {
    let env = TestEnv::new(2).await;
    let world = WorldId::parse("resume").unwrap();
    let appender = env.appender();
    let batch: Vec<Envelope> = (1..=5).map(|n| tick(&world, n)).collect();
    pipeline::append(&appender, &batch).await;
    let projector = env.start_projector(Arc::new(ClockProjector));
    wait_for_tick(&env, "clock", &world, 5).await;
    projector.stop().await;

    // Kafka's committed offset for the group is now at the end of the log. Rewind
    // only the Postgres position by two records and forget the row: if the
    // runtime starts where Postgres says, ticks 4 and 5 are applied again and
    // the row comes back; if it trusted Kafka, nothing would be consumed.
    sqlx::query("DELETE FROM clock.world_clock WHERE world_id = 'resume'")
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE clock.projector_offsets SET next_offset = next_offset - 2 WHERE next_offset >= 2",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let projector = env.start_projector(Arc::new(ClockProjector));
    wait_for_tick(&env, "clock", &world, 5).await;
    let batch: Vec<Envelope> = (6..=8).map(|n| tick(&world, n)).collect();
    pipeline::append(&appender, &batch).await;
    wait_for_tick(&env, "clock", &world, 8).await;
    projector.stop().await;
    let end = env
        .scalar("SELECT SUM(next_offset)::bigint FROM clock.projector_offsets")
        .await;
    assert_eq!(end, 8, "eight records consumed in all");
    env.cleanup().await;
}

/// A projector runtime with its own `/readyz` and `/metrics` served over HTTP,
/// as the `project` role serves them.
struct Observed {
    ops: String,
    /// `worldline_projector_halted_total` of this projector before it started.
    halted_at_start: f64,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), RuntimeError>>,
}

impl Observed {
    async fn start(env: &TestEnv, projector: Arc<dyn Projector>) -> Observed {
        let name = projector.name();
        let health = Health::default();
        let shutdown = CancellationToken::new();
        let (addr, _server) = worldline_ops::health::serve(
            "127.0.0.1:0".parse().unwrap(),
            worldline_ops::health::router(health.clone()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let targets = vec![worldline_projectors::target(&env.settings, projector)];
        let options = worldline_projectors::runtime_options(&env.settings, &targets);
        let runtime = env.runtime(targets, options, health);
        let mut observed = Observed {
            ops: format!("http://{addr}"),
            halted_at_start: 0.0,
            task: tokio::spawn(async { Ok(()) }),
            shutdown,
        };
        // Read before the runtime starts, so its own halt cannot be missed.
        observed.halted_at_start = observed.halted_total(name).await;
        observed.task = tokio::spawn(runtime.run(observed.shutdown.clone()));
        observed
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.ops)).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// `worldline_projector_halted_total` of `projector` (0 before its first halt).
    async fn halted_total(&self, projector: &str) -> f64 {
        let (_, metrics) = self.get("/metrics").await;
        let series = format!("projector=\"{projector}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with("worldline_projector_halted_total{") && l.contains(&series))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Waits for the runtime to stop by itself and returns why.
    async fn halted(&mut self, timeout: Duration) -> RuntimeError {
        let outcome = tokio::time::timeout(timeout, &mut self.task)
            .await
            .expect("the projector should have halted by itself");
        match outcome.expect("projector task") {
            Ok(()) => panic!("the projector stopped without an error"),
            Err(error) => error,
        }
    }
}

/// Runs the clock projector from a stored position outside the log and checks
/// that it halts, loudly, without applying or moving anything.
async fn assert_halts_from(env: &TestEnv, stored: i64) {
    let schema = clock_schema(env).await;
    let topic = env.topic(Family::Clock);
    let mut conn = env.pool.acquire().await.unwrap();
    assert!(
        compare_and_set_offset(&mut conn, &schema, &topic, 0, None, stored)
            .await
            .unwrap()
    );
    drop(conn);

    let mut observed = Observed::start(env, Arc::new(ClockProjector)).await;
    let error = observed.halted(Duration::from_secs(30)).await;
    assert!(
        matches!(error, RuntimeError::OffsetOutOfRange { .. }),
        "{error}"
    );
    assert!(
        observed.halted_total("clock").await > observed.halted_at_start,
        "worldline_projector_halted_total must count the halt"
    );
    let (status, readiness) = observed.get("/readyz").await;
    assert_eq!(status, 503, "{readiness}");
    assert!(
        readiness.contains("projector clock: not ready: halted: offset out of range"),
        "{readiness}"
    );
    assert_eq!(observed.get("/livez").await.0, 200, "halted, not dead");

    let rows = env.scalar("SELECT count(*) FROM clock.world_clock").await;
    assert_eq!(rows, 0, "nothing applied from a guessed position");
    let left = env
        .scalar("SELECT next_offset FROM clock.projector_offsets")
        .await;
    assert_eq!(left, stored, "the stored position is left for the operator");
    observed.shutdown.cancel();
}

async fn append_ticks(env: &TestEnv, world: &WorldId, ticks: std::ops::RangeInclusive<u64>) {
    let batch: Vec<Envelope> = ticks.map(|n| tick(world, n)).collect();
    env.append(&batch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_past_the_log_end_halts_the_projector_instead_of_skipping() {
    let env = TestEnv::new(1).await;
    append_ticks(&env, &WorldId::parse("gap").unwrap(), 1..=5).await;
    // A position past the end, as after the topic was deleted and re-created.
    assert_halts_from(&env, 1_000).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_offset_before_the_log_start_halts_the_projector_instead_of_skipping() {
    let env = TestEnv::new(1).await;
    append_ticks(&env, &WorldId::parse("gap").unwrap(), 1..=10).await;
    // Records 0..5 deleted (retention, or an operator's delete-records): a
    // stored position of 2 points at records that are gone. Skipping to 5
    // would silently drop records 2..5 from the read model.
    let topic = env.topic(Family::Clock);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.kafka.bootstrap_servers)
        .create()
        .unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&topic, 0, Offset::Offset(5))
        .unwrap();
    let deleted = admin
        .delete_records(&before, &AdminOptions::new())
        .await
        .unwrap();
    let low = deleted.elements()[0].offset();
    assert_eq!(low, Offset::Offset(5), "log start moved to 5");
    assert_halts_from(&env, 2).await;
    env.cleanup().await;
}

/// The clock read model, except that it holds tick 13 to be permanently
/// invalid (as a read model's own rule might), via `ApplyError::Rejected`.
struct RejectsTickThirteen;

static CLOCK: ClockProjector = ClockProjector;

impl Projector for RejectsTickThirteen {
    fn name(&self) -> &'static str {
        "rejects_thirteen"
    }

    fn families(&self) -> &'static [Family] {
        CLOCK.families()
    }

    fn migrator(&self) -> &'static Migrator {
        CLOCK.migrator()
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [Event],
    ) -> Pin<Box<dyn Future<Output = Result<(), ApplyError>> + Send + 'a>> {
        match events.iter().position(|e| e.envelope.world_tick == 13) {
            Some(index) => Box::pin(async move {
                Err(ApplyError::Rejected {
                    index,
                    reason: "tick 13 is not allowed here".to_owned(),
                })
            }),
            None => CLOCK.apply(tx, events),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_projector_rejects_becomes_one_dead_letter_and_later_events_still_apply() {
    let env = TestEnv::new(1).await;
    let world = WorldId::parse("picky").unwrap();
    // One append: ticks 12, 13 and 14 share a batch, so the rest of that batch
    // must be applied without the rejected event.
    append_ticks(&env, &world, 1..=20).await;
    let projector = env.start_projector(Arc::new(RejectsTickThirteen));
    wait_for_tick(&env, "rejects_thirteen", &world, 20).await;
    projector.stop().await;

    let letters = || async {
        sqlx::query_as::<_, (i64, String, String)>(
            "SELECT kafka_offset, error_class, error_message FROM rejects_thirteen.dead_letters",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
    };
    // Tick n sits at offset n - 1 of the only partition.
    assert_eq!(
        letters().await,
        [(
            12,
            "rejected".to_owned(),
            "tick 13 is not allowed here".to_owned()
        )]
    );
    let dead_topic = format!("{}worldline.dead-letters.v1", env.settings.topics.prefix);
    let copies = env.read_topic(&dead_topic);
    assert_eq!(copies.len(), 1, "one copy on the dead-letter topic");
    let headers: HashMap<_, _> = copies[0].headers.iter().cloned().collect();
    assert_eq!(headers["wl_dlq_projector"], "rejects_thirteen");
    assert_eq!(headers["wl_dlq_error_class"], "rejected");
    assert_eq!(headers["wl_dlq_offset"], "12");

    // Restarted and fed more: the offset has passed the rejected event for
    // good; it is neither applied nor dead-lettered again.
    append_ticks(&env, &world, 21..=25).await;
    let projector = env.start_projector(Arc::new(RejectsTickThirteen));
    wait_for_tick(&env, "rejects_thirteen", &world, 25).await;
    projector.stop().await;
    assert_eq!(letters().await.len(), 1, "dead-lettered once");
    let stored = env
        .scalar("SELECT next_offset FROM rejects_thirteen.projector_offsets")
        .await;
    assert_eq!(stored, 25);
    env.cleanup().await;
}

/// Postgres decides where to start, but Kafka's committed offsets are kept in
/// step so `kafka-consumer-groups --describe` and lag exporters see progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_committed_offsets_follow_the_stored_offsets_for_lag_tools() {
    let env = TestEnv::new(2).await;
    let worlds = two_worlds_on_different_partitions(2);
    for world in &worlds {
        append_ticks(&env, world, 1..=30).await;
    }
    let projector = env.start_projector(Arc::new(ClockProjector));
    env.wait_caught_up(&ClockProjector).await;
    let topic = env.topic(Family::Clock);
    let stored: Vec<(i32, i64)> = env.stored_offsets("clock", &topic).await;
    assert_eq!(stored.len(), 2, "{stored:?}");

    // Another client of the same group only reads the group's offsets; it
    // does not subscribe, so it does not join the group or move anything.
    let targets = [worldline_projectors::target(
        &env.settings,
        Arc::new(ClockProjector),
    )];
    let group = worldline_projectors::runtime_options(&env.settings, &targets).group_id;
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.kafka.bootstrap_servers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(&topic, 0);
    partitions.add_partition(&topic, 1);
    let committed = eventually(
        Duration::from_secs(30),
        "Kafka's committed offsets to reach the stored ones",
        || async {
            let committed: Vec<(i32, i64)> = reader
                .committed_offsets(partitions.clone(), Duration::from_secs(10))
                .ok()?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(at) => Some((e.partition(), at)),
                    _ => None,
                })
                .collect();
            (committed == stored).then_some(committed)
        },
    )
    .await;
    assert_eq!(committed.iter().map(|(_, at)| at).sum::<i64>(), 60);
    projector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_that_decode_after_a_fix_are_redriven_once() {
    let env = TestEnv::new(1).await;
    let schema = clock_schema(&env).await;
    let world = WorldId::parse("redriven").unwrap();
    // As an older build would have recorded them: a tick it could not decode
    // (today's build can), and bytes nobody can decode.
    let fixed = tick(&world, 7).to_bytes();
    sqlx::query(
        "INSERT INTO clock.dead_letters
             (topic, partition, kafka_offset, record_key, payload, payload_sha256, error_class, error_message)
         VALUES ('t', 0, 3, 'redriven', $1, 'x', 'invalid', 'unknown event type'),
                ('t', 0, 4, 'redriven', '\\xdeadbeef', 'y', 'malformed', 'not protobuf')",
    )
    .bind(&fixed)
    .execute(&env.pool)
    .await
    .unwrap();

    let first =
        worldline_projectors::redrive::redrive(&env.pool, Arc::new(ClockProjector), &schema)
            .await
            .unwrap();
    assert_eq!(
        (first.examined, first.applied, first.still_failing),
        (2, 1, 1)
    );
    let tick_now = env
        .scalar("SELECT tick FROM clock.world_clock WHERE world_id = 'redriven'")
        .await;
    assert_eq!(tick_now, 7);

    let second =
        worldline_projectors::redrive::redrive(&env.pool, Arc::new(ClockProjector), &schema)
            .await
            .unwrap();
    assert_eq!(
        (second.examined, second.applied, second.still_failing),
        (1, 0, 1),
        "the re-driven letter is not applied again; the broken one is still there"
    );
    let pending = env
        .scalar("SELECT count(*) FROM clock.dead_letters WHERE redriven_at IS NULL")
        .await;
    assert_eq!(pending, 1);
    env.cleanup().await;
}

/// A compare-and-set conflict on one partition rolls the whole batch back, so
/// the other partitions of that batch must be read again from their stored
/// offsets. Otherwise the consumer, already past them, would leave a gap that
/// the next batch's compare-and-set (its expected offset unchanged) accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_on_one_partition_loses_nothing_on_the_others_in_the_same_batch() {
    let mut env = TestEnv::new(2).await;
    // One batch gathers both partitions' backlog.
    env.settings.projector.batch_max_records = 1_000;
    env.settings.projector.batch_max_wait_ms = 2_000;
    let worlds = two_worlds_on_different_partitions(2);
    let appender = env.appender();
    let append = |from: u64, to: u64| {
        let batch: Vec<Envelope> = worlds
            .iter()
            .flat_map(|world| (from..=to).map(|n| tick(world, n)))
            .collect();
        let appender = appender.clone();
        async move {
            pipeline::append(&appender, &batch).await;
        }
    };
    let clock_topic = env.topic(Family::Clock);
    let first_partition =
        worldline_schemas::partitioner::partition_for_key(worlds[0].as_str().as_bytes(), 2);

    append(1, 10).await;
    let projector = env.start_projector(Arc::new(WorldsProjector));
    for world in &worlds {
        eventually(Duration::from_secs(30), "the first ten ticks", || async {
            (records_applied(&env, world).await == 10).then_some(())
        })
        .await;
    }
    projector.stop().await;

    // The next batch holds ticks 11..=20 of both worlds. Hold the first world's
    // offset row so the runtime's compare-and-set waits on it, then move that
    // offset as another instance would have, and let the runtime go on.
    append(11, 20).await;
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query(
        "SELECT next_offset FROM worlds.projector_offsets
          WHERE topic = $1 AND partition = $2 FOR UPDATE",
    )
    .bind(&clock_topic)
    .bind(first_partition)
    .execute(&mut *holder)
    .await
    .unwrap();
    let projector = env.start_projector(Arc::new(WorldsProjector));
    until_the_runtime_waits_on_the_held_row(&env).await;
    sqlx::query(
        "UPDATE worlds.projector_offsets SET next_offset = next_offset + 10
          WHERE topic = $1 AND partition = $2",
    )
    .bind(&clock_topic)
    .bind(first_partition)
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();

    // The second world's ticks 11..=20 were in the rolled-back batch; with them
    // and five more, nothing may be missing.
    append(21, 25).await;
    eventually(
        Duration::from_secs(30),
        "every tick of the second world",
        || async { (records_applied(&env, &worlds[1]).await == 25).then_some(()) },
    )
    .await;
    // And the first world's counter moved only by what was applied here (the
    // ten the "other instance" took are not counted by this one).
    eventually(
        Duration::from_secs(30),
        "the first world's remaining ticks",
        || async { (records_applied(&env, &worlds[0]).await == 15).then_some(()) },
    )
    .await;
    projector.stop().await;
    assert_eq!(
        records_applied(&env, &worlds[1]).await,
        25,
        "no tick counted twice"
    );
    env.cleanup().await;
}

/// While a batch waits on its compare-and-set, the runtime reads the next
/// batch ahead. When the conflict then sends the partition back to a stored
/// offset *below* those read-ahead records (another instance applied part of
/// what this one had read), the read-ahead must be dropped and read again:
/// applied as they stand, they would move the offset over the records in
/// between, which nobody applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_below_the_records_read_ahead_applies_nothing_over_a_gap() {
    let mut env = TestEnv::new(1).await;
    env.settings.projector.batch_max_records = 10;
    env.settings.projector.batch_max_wait_ms = 2_000;
    let world = WorldId::parse("read-ahead").unwrap();
    let append = |from: u64, to: u64| {
        let batch: Vec<Envelope> = (from..=to).map(|n| tick(&world, n)).collect();
        let appender = env.appender();
        async move {
            pipeline::append(&appender, &batch).await;
        }
    };
    let applied = || records_applied(&env, &world);
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT next_offset FROM worlds.projector_offsets")
            .fetch_one(&env.pool)
            .await
            .unwrap()
    };

    // Offsets 0..=9 applied and stored.
    append(1, 10).await;
    let projector = env.start_projector(Arc::new(WorldsProjector));
    eventually(Duration::from_secs(30), "the first ten ticks", || async {
        (applied().await == 10).then_some(())
    })
    .await;
    projector.stop().await;

    // The next batch is offsets 10..=19; hold its offset row, so that while its
    // compare-and-set waits the runtime reads 20..=29 ahead.
    append(11, 40).await;
    let mut holder = env.pool.begin().await.unwrap();
    sqlx::query("SELECT next_offset FROM worlds.projector_offsets FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let projector = env.start_projector(Arc::new(WorldsProjector));
    until_the_runtime_waits_on_the_held_row(&env).await;
    // The records after the held batch are in the consumer's queue already;
    // give the runtime a moment to take them into its next batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // "Another instance" applied 10..=14: the stored offset moves to 15,
    // inside the held batch and below the records read ahead.
    sqlx::query("UPDATE worlds.projector_offsets SET next_offset = 15")
        .execute(&mut *holder)
        .await
        .unwrap();
    holder.commit().await.unwrap();

    // 15..=39 are this instance's to apply: 25 records on top of the first 10.
    eventually(Duration::from_secs(30), "the log's end", || async {
        (stored().await == 40).then_some(())
    })
    .await;
    projector.stop().await;
    assert_eq!(
        applied().await,
        10 + 25,
        "offsets 15..=19 applied once, none skipped or doubled"
    );
    env.cleanup().await;
}

/// `worlds.records_applied` of `world`: every record applied to it,
/// duplicates included (0 before the first).
async fn records_applied(env: &TestEnv, world: &WorldId) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT records_applied FROM worlds.worlds WHERE world_id = $1")
        .bind(world.as_str())
        .fetch_optional(&env.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Waits until a session of the test's database waits on a lock: the
/// runtime's compare-and-set on an offset row the test holds.
async fn until_the_runtime_waits_on_the_held_row(env: &TestEnv) {
    eventually(
        Duration::from_secs(30),
        "the runtime to wait on the held offset row",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&env.pool)
            .await
            .ok()?;
            (waiting > 0).then_some(())
        },
    )
    .await;
}

/// Two world ids that the Java-compatible partitioner puts on different partitions.
fn two_worlds_on_different_partitions(partitions: i32) -> [WorldId; 2] {
    let mut found: Vec<(i32, WorldId)> = Vec::new();
    for n in 0.. {
        let world = WorldId::parse(&format!("split-{n}")).unwrap();
        let partition = worldline_schemas::partitioner::partition_for_key(
            world.as_str().as_bytes(),
            partitions,
        );
        if found.iter().all(|(p, _)| *p != partition) {
            found.push((partition, world));
        }
        if found.len() == 2 {
            break;
        }
    }
    let second = found.pop().unwrap().1;
    let first = found.pop().unwrap().1;
    [first, second]
}
