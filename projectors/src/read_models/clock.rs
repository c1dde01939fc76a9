//! The clock read model: each world's current tick, game time, day and season.

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::names;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/clock");

/// Keeps only the latest tick per world.
#[derive(Debug, Default)]
pub struct ClockProjector;

/// One world's latest clock state in a batch.
struct Latest {
    world_id: String,
    tick: i64,
    game_time_s: i64,
    day: i32,
    season: &'static str,
    time_scale: i32,
    event_id: uuid::Uuid,
    occurred_at: chrono::DateTime<chrono::Utc>,
}

impl Projector for ClockProjector {
    fn name(&self) -> &'static str {
        "clock"
    }

    fn families(&self) -> &'static [Family] {
        &[Family::Clock]
    }

    fn migrator(&self) -> &'static Migrator {
        &MIGRATOR
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        async move {
            // Coalesce: only the highest tick per world reaches the database.
            let mut latest: std::collections::HashMap<&str, Latest> = Default::default();
            for event in events {
                let envelope = &event.envelope;
                let Some(Body::ClockTicked(tick)) = &envelope.body else {
                    continue;
                };
                let candidate = Latest {
                    world_id: envelope.world_id.clone(),
                    tick: i64::try_from(envelope.world_tick).unwrap_or(i64::MAX),
                    game_time_s: i64::try_from(tick.game_time_s).unwrap_or(i64::MAX),
                    day: i32::try_from(tick.day).unwrap_or(i32::MAX),
                    season: names::season(tick.season),
                    time_scale: i32::try_from(tick.time_scale).unwrap_or(i32::MAX),
                    event_id: envelope.event_uuid(),
                    occurred_at: envelope.occurred_at(),
                };
                match latest.get(envelope.world_id.as_str()) {
                    Some(current) if current.tick >= candidate.tick => {}
                    _ => {
                        latest.insert(envelope.world_id.as_str(), candidate);
                    }
                }
            }
            if latest.is_empty() {
                return Ok(());
            }
            let rows: Vec<Latest> = latest.into_values().collect();
            // One set-based statement for the whole batch. The WHERE makes it
            // idempotent and order-safe: a tick never moves a clock backwards,
            // and a redelivered tick changes nothing.
            sqlx::query(
                "INSERT INTO world_clock
                     (world_id, tick, game_time_s, day, season, time_scale, event_id, occurred_at)
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::int[],
                                      $5::text[], $6::int[], $7::uuid[], $8::timestamptz[])
                 ON CONFLICT (world_id) DO UPDATE SET
                     tick = EXCLUDED.tick,
                     game_time_s = EXCLUDED.game_time_s,
                     day = EXCLUDED.day,
                     season = EXCLUDED.season,
                     time_scale = EXCLUDED.time_scale,
                     event_id = EXCLUDED.event_id,
                     occurred_at = EXCLUDED.occurred_at
                 WHERE world_clock.tick < EXCLUDED.tick",
            )
            .bind(rows.iter().map(|r| r.world_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.tick).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.game_time_s).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.day).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.season).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.time_scale).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
            .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
        .boxed()
    }
}
