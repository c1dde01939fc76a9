//! Re-driving dead letters after a fix.
//!
//! A dead letter keeps the record's raw bytes. Once the cause is fixed (a newer
//! build understands a new event type, a projector bug is corrected), `redrive`
//! decodes every dead letter not yet re-driven with today's code and applies those
//! that now decode, in log order, inside one transaction that also stamps them
//! `redriven_at`. Running it again finds nothing new to apply, and read models
//! deduplicate on event id anyway, so it is idempotent. Letters that still fail
//! stay as they are, with the latest error recorded.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, Connection, PgPool};
use worldline_schemas::decode_envelope;

use crate::projector::{ApplyError, Event, Projector};
use crate::store::SchemaName;

/// What one re-drive did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RedriveReport {
    /// Dead letters not re-driven before this run.
    pub examined: usize,
    /// Applied to the read model now.
    pub applied: usize,
    /// Still undecodable or rejected; left for later.
    pub still_failing: usize,
}

/// Why a re-drive could not run.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

type Letter = (String, i32, i64, Option<Vec<u8>>);

/// Re-drives the dead letters of `projector` stored in `schema`.
pub async fn redrive(
    pool: &PgPool,
    projector: Arc<dyn Projector>,
    schema: &SchemaName,
) -> Result<RedriveReport, RedriveError> {
    let s = schema.as_str();
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query(AssertSqlSafe(format!("SET LOCAL search_path TO {s}")))
        .execute(&mut *tx)
        .await?;
    // Row locks keep two concurrent re-drives from applying the same letter.
    let letters: Vec<Letter> = sqlx::query_as(
        "SELECT topic, partition, kafka_offset, payload FROM dead_letters
          WHERE redriven_at IS NULL
          ORDER BY topic, partition, kafka_offset
          FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut report = RedriveReport {
        examined: letters.len(),
        ..RedriveReport::default()
    };
    let mut events = Vec::new();
    let mut failing: Vec<(String, i32, i64, String)> = Vec::new();
    for (topic, partition, offset, payload) in letters {
        match decode_envelope(payload.as_deref().unwrap_or_default()) {
            Ok(envelope) => events.push(Event {
                topic: Arc::from(topic.as_str()),
                partition,
                offset,
                timestamp_ms: envelope.occurred_at_ms,
                envelope,
            }),
            Err(error) => failing.push((topic, partition, offset, error.to_string())),
        }
    }
    loop {
        match projector.apply(&mut tx, &events).await {
            Ok(()) => break,
            Err(ApplyError::Rejected { index, reason }) if index < events.len() => {
                let event = events.remove(index);
                failing.push((
                    event.topic.to_string(),
                    event.partition,
                    event.offset,
                    reason,
                ));
            }
            Err(ApplyError::Rejected { reason, .. }) => {
                tracing::warn!(%reason, "rejection outside the batch; nothing re-driven");
                return Ok(RedriveReport {
                    still_failing: report.examined,
                    ..report
                });
            }
            Err(ApplyError::Database(error)) => return Err(error.into()),
        }
    }
    sqlx::query(
        "UPDATE dead_letters d SET redriven_at = now()
           FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS u(topic, partition, kafka_offset)
          WHERE d.topic = u.topic AND d.partition = u.partition AND d.kafka_offset = u.kafka_offset",
    )
    .bind(events.iter().map(|e| e.topic.to_string()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.partition).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.offset).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE dead_letters d SET error_message = u.message
           FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[])
             AS u(topic, partition, kafka_offset, message)
          WHERE d.topic = u.topic AND d.partition = u.partition AND d.kafka_offset = u.kafka_offset",
    )
    .bind(failing.iter().map(|f| f.0.clone()).collect::<Vec<_>>())
    .bind(failing.iter().map(|f| f.1).collect::<Vec<_>>())
    .bind(failing.iter().map(|f| f.2).collect::<Vec<_>>())
    .bind(failing.iter().map(|f| f.3.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    report.applied = events.len();
    report.still_failing = failing.len();
    Ok(report)
}
