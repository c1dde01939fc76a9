//! The worlds read model: every world with its latest tick and event counts per
//! family. Reads every family.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use uuid::Uuid;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::copy::{Values, append_with};
use crate::read_models::fresh;
use crate::read_models::names::to_i64;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/worlds");

/// Each world's totals of a batch added to its row (`$1`-`$15`, one array per
/// column of [`WorldColumns`]).
const UPSERT_WORLDS: &str = "
    INSERT INTO worlds AS w (world_id, latest_tick, world_events, clock_events,
        weather_events, story_events, inference_events, records_applied,
        last_event_at, display_name, seed, regions, created_at, status, status_offset)
    SELECT u.world_id, u.latest_tick, u.c0, u.c1, u.c2, u.c3, u.c4, u.records,
           u.last_event_at, u.display_name, u.seed,
           COALESCE(u.regions, '[]'),
           u.created_at, COALESCE(u.status, 'unknown'), COALESCE(u.status_offset, -1)
      FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                  $6::bigint[], $7::bigint[], $8::bigint[], $9::timestamptz[],
                  $10::text[], $11::bigint[], $12::jsonb[], $13::timestamptz[],
                  $14::text[], $15::bigint[])
        AS u(world_id, latest_tick, c0, c1, c2, c3, c4, records, last_event_at,
             display_name, seed, regions, created_at, status, status_offset)
    ON CONFLICT (world_id) DO UPDATE SET
        latest_tick = GREATEST(w.latest_tick, EXCLUDED.latest_tick),
        world_events = w.world_events + EXCLUDED.world_events,
        clock_events = w.clock_events + EXCLUDED.clock_events,
        weather_events = w.weather_events + EXCLUDED.weather_events,
        story_events = w.story_events + EXCLUDED.story_events,
        inference_events = w.inference_events + EXCLUDED.inference_events,
        records_applied = w.records_applied + EXCLUDED.records_applied,
        last_event_at = GREATEST(w.last_event_at, EXCLUDED.last_event_at),
        display_name = COALESCE(w.display_name, EXCLUDED.display_name),
        seed = COALESCE(w.seed, EXCLUDED.seed),
        regions = CASE WHEN w.created_at IS NULL THEN EXCLUDED.regions ELSE w.regions END,
        created_at = COALESCE(w.created_at, EXCLUDED.created_at),
        status = CASE WHEN EXCLUDED.status_offset > w.status_offset THEN EXCLUDED.status ELSE w.status END,
        status_offset = GREATEST(w.status_offset, EXCLUDED.status_offset)";

/// Projects every family into one row per world.
#[derive(Debug, Default)]
pub struct WorldsProjector;

/// What one batch changes for one world.
#[derive(Debug, Default)]
struct WorldDelta {
    counts: [i64; 5],
    records: i64,
    latest_tick: i64,
    last_event_at: Option<DateTime<Utc>>,
    created: Option<(String, i64, Vec<String>, DateTime<Utc>)>,
    status: Option<(&'static str, i64)>,
}

/// Folds a batch into per-world deltas. `new[i]` says whether event `i` is
/// the first occurrence of an id not seen before: only those count towards the
/// per-family counts; every record counts towards `records` (the
/// non-idempotent oracle). `created_before` are the worlds whose creation an
/// earlier batch already applied.
fn fold<'e>(
    events: &'e [Event],
    new: &[bool],
    created_before: &HashSet<String>,
) -> HashMap<&'e str, WorldDelta> {
    let mut deltas: HashMap<&str, WorldDelta> = HashMap::new();
    for (event, new) in events.iter().zip(new) {
        let envelope = &event.envelope;
        let Some(body) = &envelope.body else { continue };
        let world = envelope.world_id.as_str();
        let delta = deltas.entry(world).or_default();
        delta.records += 1;
        if !new {
            continue;
        }
        delta.counts[Family::of(body).index()] += 1;
        delta.latest_tick = delta.latest_tick.max(to_i64(envelope.world_tick));
        let at = envelope.occurred_at();
        delta.last_event_at = Some(delta.last_event_at.map_or(at, |t| t.max(at)));
        match body {
            // The first WorldCreated defines the world; a later one (a client
            // re-creating it) changes nothing, in one batch or across batches:
            // where the batch boundaries fall must not change the read model.
            Body::WorldCreated(created)
                if delta.created.is_none() && !created_before.contains(world) =>
            {
                delta.created = Some((
                    created.display_name.clone(),
                    i64::from_ne_bytes(created.seed.to_ne_bytes()),
                    created.regions.clone(),
                    at,
                ));
                delta.status = Some(("running", event.offset));
            }
            Body::WorldPaused(_) => delta.status = Some(("paused", event.offset)),
            Body::WorldResumed(_) => delta.status = Some(("running", event.offset)),
            _ => {}
        }
    }
    deltas
}

impl Projector for WorldsProjector {
    fn name(&self) -> &'static str {
        "worlds"
    }

    fn families(&self) -> &'static [Family] {
        &Family::ALL
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
            let ids: Vec<Uuid> = events.iter().map(|e| e.envelope.event_uuid()).collect();
            let fresh = fresh::unseen(tx, "seen_events", &ids).await?;
            let mut new = vec![false; events.len()];
            for i in &fresh {
                new[*i] = true;
            }
            let seen = fresh::pick(&ids, &fresh);
            let created_before = created_before(tx, events, &new).await?;
            let deltas = fold(events, &new, &created_before);
            let mut columns = WorldColumns::default();
            for (world, delta) in deltas {
                columns.push(world.to_owned(), delta);
            }
            let [c0, c1, c2, c3, c4] = columns.counts;
            // The ids seen and the worlds' rows in one statement.
            append_with(
                tx,
                "seen_events",
                &[("event_id", Values::Uuid(&seen))],
                UPSERT_WORLDS,
                |statement| {
                    statement
                        .bind(columns.world_id)
                        .bind(columns.latest_tick)
                        .bind(c0)
                        .bind(c1)
                        .bind(c2)
                        .bind(c3)
                        .bind(c4)
                        .bind(columns.records)
                        .bind(columns.last_event_at)
                        .bind(columns.display_name)
                        .bind(columns.seed)
                        .bind(columns.regions)
                        .bind(columns.created_at)
                        .bind(columns.status)
                        .bind(columns.status_offset)
                },
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}

/// Of the worlds with a new `WorldCreated` in the batch, those an earlier batch
/// already created. Asked only when the batch holds a creation (rare): other
/// batches cost no extra round trip.
async fn created_before(
    tx: &mut PgConnection,
    events: &[Event],
    new: &[bool],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut creating: Vec<&str> = events
        .iter()
        .zip(new)
        .filter(|(event, new)| **new && matches!(event.envelope.body, Some(Body::WorldCreated(_))))
        .map(|(event, _)| event.envelope.world_id.as_str())
        .collect();
    if creating.is_empty() {
        return Ok(HashSet::new());
    }
    creating.sort_unstable();
    creating.dedup();
    let created: Vec<String> = sqlx::query_scalar(
        "SELECT world_id FROM worlds WHERE world_id = ANY($1) AND created_at IS NOT NULL",
    )
    .bind(&creating)
    .fetch_all(&mut *tx)
    .await?;
    Ok(created.into_iter().collect())
}

/// Column arrays for the UNNEST upsert.
#[derive(Default)]
struct WorldColumns {
    world_id: Vec<String>,
    latest_tick: Vec<i64>,
    counts: [Vec<i64>; 5],
    records: Vec<i64>,
    last_event_at: Vec<Option<DateTime<Utc>>>,
    display_name: Vec<Option<String>>,
    seed: Vec<Option<i64>>,
    regions: Vec<Option<serde_json::Value>>,
    created_at: Vec<Option<DateTime<Utc>>>,
    status: Vec<Option<String>>,
    status_offset: Vec<Option<i64>>,
}

impl WorldColumns {
    fn push(&mut self, world: String, delta: WorldDelta) {
        self.world_id.push(world);
        self.latest_tick.push(delta.latest_tick);
        for (column, count) in self.counts.iter_mut().zip(delta.counts) {
            column.push(count);
        }
        self.records.push(delta.records);
        self.last_event_at.push(delta.last_event_at);
        let (name, seed, regions, created_at) = match delta.created {
            Some((name, seed, regions, at)) => (
                Some(name),
                Some(seed),
                Some(serde_json::json!(regions)),
                Some(at),
            ),
            None => (None, None, None, None),
        };
        self.display_name.push(name);
        self.seed.push(seed);
        self.regions.push(regions);
        self.created_at.push(created_at);
        self.status.push(delta.status.map(|(s, _)| s.to_owned()));
        self.status_offset.push(delta.status.map(|(_, o)| o));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use worldline_schemas::WorldId;
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::{ClockTicked, Season, WorldCreated};

    use super::*;

    fn event(offset: i64, envelope: worldline_schemas::pb::Envelope) -> Event {
        Event {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            timestamp_ms: 0,
            envelope,
        }
    }

    #[test]
    fn given_a_duplicate_event_when_folded_then_it_counts_as_a_record_but_not_as_an_event() {
        let world = WorldId::parse("w").unwrap();
        let tick = new_envelope(
            &world,
            5,
            "clock",
            Body::ClockTicked(ClockTicked {
                season: Season::Spring as i32,
                ..Default::default()
            }),
        );
        let created = new_envelope(
            &world,
            0,
            "gateway",
            Body::WorldCreated(WorldCreated {
                display_name: "W".to_owned(),
                time_scale: 60,
                tick_interval_ms: 1000,
                ..Default::default()
            }),
        );
        let events = vec![
            event(0, created.clone()),
            event(1, tick.clone()),
            event(2, tick.clone()),
        ];
        let deltas = fold(&events, &[true, true, false], &HashSet::new());
        let delta = &deltas["w"];
        assert_eq!(delta.records, 3);
        assert_eq!(delta.counts, [1, 1, 0, 0, 0]);
        assert_eq!(delta.latest_tick, 5);
        assert_eq!(delta.status, Some(("running", 0)));
    }

    #[test]
    fn given_only_already_seen_events_then_nothing_but_records_changes() {
        let world = WorldId::parse("w").unwrap();
        let tick = new_envelope(
            &world,
            9,
            "clock",
            Body::ClockTicked(ClockTicked {
                season: Season::Spring as i32,
                ..Default::default()
            }),
        );
        let events = [event(7, tick)];
        let deltas = fold(&events, &[false], &HashSet::new());
        assert_eq!(deltas["w"].records, 1);
        assert_eq!(deltas["w"].counts, [0; 5]);
        assert_eq!(deltas["w"].latest_tick, 0);
    }
}
