//! The query API's statement connections (`worldline_query_api::Readers`):
//! kept between statements, bounded, and never handing a statement a
//! connection that a failed, abandoned or server-closed statement left behind.

use std::collections::BTreeSet;
use std::time::Duration;

use worldline_query_api::Readers;
use worldline_tests::{TestEnv, eventually};

async fn backend_pid(readers: &Readers) -> Result<i32, sqlx::Error> {
    readers
        .fetch_scalar(sqlx::query_scalar("SELECT pg_backend_pid()"))
        .await
}

#[tokio::test]
async fn a_connection_is_kept_between_statements_and_never_more_are_open_than_the_size() {
    let env = TestEnv::new(1).await;
    let readers = Readers::new(&env.pool, 2);

    let first = backend_pid(&readers).await.unwrap();
    assert_eq!(
        backend_pid(&readers).await.unwrap(),
        first,
        "one statement after another runs on the same connection"
    );

    let mut concurrent = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let readers = readers.clone();
        concurrent.spawn(async move {
            readers
                .fetch_scalar(sqlx::query_scalar::<_, i32>(
                    "SELECT pg_backend_pid() FROM pg_sleep(0.05)",
                ))
                .await
        });
    }
    let backends: BTreeSet<i32> = concurrent
        .join_all()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        backends.len() <= 2,
        "twelve concurrent statements ran on {} connections, more than the 2 allowed",
        backends.len()
    );
    env.cleanup().await;
}

#[tokio::test]
async fn after_a_failed_or_abandoned_statement_the_next_one_answers() {
    let env = TestEnv::new(1).await;
    // One connection: the statement after each failure gets its replacement.
    let readers = Readers::new(&env.pool, 1);

    let failed = readers
        .fetch_scalar(sqlx::query_scalar::<_, i32>("SELECT 1 / $1").bind(0_i32))
        .await;
    assert!(
        matches!(&failed, Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22012")),
        "division by zero: {failed:?}"
    );
    let answer: i32 = readers
        .fetch_scalar(sqlx::query_scalar("SELECT $1::int + 1").bind(41_i32))
        .await
        .unwrap();
    assert_eq!(answer, 42);

    // Dropped while the server is still working on it: its reply must not be
    // read as the answer to the next statement.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        readers.fetch_scalar(sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_sleep(5)")),
    )
    .await;
    assert!(abandoned.is_err(), "the sleeping statement was abandoned");
    let answer: i32 = readers
        .fetch_scalar(sqlx::query_scalar("SELECT $1::int").bind(7_i32))
        .await
        .unwrap();
    assert_eq!(answer, 7);
    env.cleanup().await;
}

#[tokio::test]
async fn a_connection_the_server_closed_is_replaced() {
    let env = TestEnv::new(1).await;
    let readers = Readers::new(&env.pool, 1);
    let killed = backend_pid(&readers).await.unwrap();

    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(killed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(terminated);
    eventually(Duration::from_secs(10), "the backend to exit", || async {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(killed)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        (!alive).then_some(())
    })
    .await;

    // The first statement may find the closed connection (and fail with it);
    // the one after runs on a new connection.
    let first = backend_pid(&readers).await;
    let fresh = match first {
        Ok(pid) => pid,
        Err(_) => backend_pid(&readers).await.unwrap(),
    };
    assert_ne!(fresh, killed);
    env.cleanup().await;
}
