//! `worldline dead-letters redrive`, as an operator runs it after a fix: the
//! letters that now decode are applied once; running it again changes nothing.

use std::process::Command;

use worldline_projectors::read_models::worlds::WorldsProjector;
use worldline_projectors::store::{SchemaName, prepare_schema};
use worldline_schemas::WorldId;
use worldline_schemas::envelope::{EnvelopeExt, new_envelope};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{ClockTicked, Season};
use worldline_tests::TestEnv;

fn redrive(env: &TestEnv) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_worldline"))
        .args(["dead-letters", "redrive", "--projector", "worlds"])
        .envs(env.child_env())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "redrive failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `records_applied` counts every record applied, duplicates included: a
/// letter applied twice would show as 2.
async fn records_applied(env: &TestEnv) -> Option<i64> {
    sqlx::query_scalar("SELECT records_applied FROM worlds.worlds WHERE world_id = 'redriven'")
        .fetch_optional(&env.pool)
        .await
        .unwrap()
}

async fn redriven_at(env: &TestEnv) -> Vec<(i64, Option<String>)> {
    sqlx::query_as(
        "SELECT kafka_offset, redriven_at::text FROM worlds.dead_letters ORDER BY kafka_offset",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_command_applies_fixed_dead_letters_once_and_a_second_run_is_a_no_op() {
    let env = TestEnv::new(1).await;
    let schema = SchemaName::parse("worlds").unwrap();
    prepare_schema(&env.pool, &schema, &WorldsProjector)
        .await
        .unwrap();
    // As an older build would have recorded them: a tick it could not decode
    // (this build can), and bytes no build can decode.
    let world = WorldId::parse("redriven").unwrap();
    let fixed = new_envelope(
        &world,
        7,
        "test",
        Body::ClockTicked(ClockTicked {
            game_time_s: 420,
            day: 0,
            season: Season::Spring as i32,
            time_scale: 60,
        }),
    )
    .to_bytes();
    let topic = env.topic(worldline_schemas::Family::Clock);
    sqlx::query(
        "INSERT INTO worlds.dead_letters
             (topic, partition, kafka_offset, record_key, payload, payload_sha256, error_class, error_message)
         VALUES ($1, 0, 3, 'redriven', $2, 'x', 'invalid', 'unknown event type'),
                ($1, 0, 4, 'redriven', '\\xdeadbeef', 'y', 'malformed', 'not protobuf')",
    )
    .bind(&topic)
    .bind(&fixed)
    .execute(&env.pool)
    .await
    .unwrap();

    assert_eq!(redrive(&env), "examined 2, applied 1, still failing 1");
    assert_eq!(records_applied(&env).await, Some(1));
    let after_first = redriven_at(&env).await;
    assert!(after_first[0].1.is_some(), "{after_first:?}");
    assert!(after_first[1].1.is_none(), "{after_first:?}");

    assert_eq!(
        redrive(&env),
        "examined 1, applied 0, still failing 1",
        "only the still-broken letter is looked at again"
    );
    assert_eq!(
        records_applied(&env).await,
        Some(1),
        "nothing applied twice"
    );
    assert_eq!(redriven_at(&env).await, after_first, "nothing re-stamped");
    env.cleanup().await;
}
