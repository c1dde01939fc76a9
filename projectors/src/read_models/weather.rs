//! The weather read model: each region's current weather, and its history as
//! periods `[valid_from_tick, valid_to_tick)` so "weather as of tick N" is one
//! index probe.
//!
//! Weather events of a world arrive in tick order (one partition per world, and
//! the weather producer emits in tick order), so a batch only ever appends periods
//! after the region's open one.

use std::collections::HashMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::names::{to_i32, to_i64, weather_condition};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/weather");

/// Projects `WeatherChanged` events.
#[derive(Debug, Default)]
pub struct WeatherProjector;

#[derive(Default)]
struct Rows {
    event_id: Vec<uuid::Uuid>,
    world_id: Vec<String>,
    region: Vec<String>,
    tick: Vec<i64>,
    condition: Vec<&'static str>,
    previous: Vec<&'static str>,
    temperature: Vec<i32>,
    wind: Vec<i32>,
    precipitation: Vec<i32>,
    occurred_at: Vec<chrono::DateTime<chrono::Utc>>,
    log_offset: Vec<i64>,
}

impl Rows {
    /// The rows whose event ids are in `keep`, in their original order.
    fn retain_ids(self, keep: &std::collections::HashSet<uuid::Uuid>) -> Rows {
        let mut kept = Rows::default();
        for i in 0..self.event_id.len() {
            if !keep.contains(&self.event_id[i]) {
                continue;
            }
            kept.event_id.push(self.event_id[i]);
            kept.world_id.push(self.world_id[i].clone());
            kept.region.push(self.region[i].clone());
            kept.tick.push(self.tick[i]);
            kept.condition.push(self.condition[i]);
            kept.previous.push(self.previous[i]);
            kept.temperature.push(self.temperature[i]);
            kept.wind.push(self.wind[i]);
            kept.precipitation.push(self.precipitation[i]);
            kept.occurred_at.push(self.occurred_at[i]);
            kept.log_offset.push(self.log_offset[i]);
        }
        kept
    }
}

impl Projector for WeatherProjector {
    fn name(&self) -> &'static str {
        "weather"
    }

    fn families(&self) -> &'static [Family] {
        &[Family::Weather]
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
            let mut rows = Rows::default();
            let mut seen = std::collections::HashSet::new();
            for event in events {
                let envelope = &event.envelope;
                let Some(Body::WeatherChanged(change)) = &envelope.body else {
                    continue;
                };
                if !seen.insert(envelope.event_uuid()) {
                    continue;
                }
                rows.event_id.push(envelope.event_uuid());
                rows.world_id.push(envelope.world_id.clone());
                rows.region.push(change.region.clone());
                rows.tick.push(to_i64(envelope.world_tick));
                rows.condition.push(weather_condition(change.condition));
                rows.previous.push(weather_condition(change.previous_condition));
                rows.temperature.push(change.temperature_dc);
                rows.wind.push(to_i32(change.wind_dmps));
                rows.precipitation.push(to_i32(change.precipitation_dmmph));
                rows.occurred_at.push(envelope.occurred_at());
                rows.log_offset.push(event.offset);
            }
            if rows.event_id.is_empty() {
                return Ok(());
            }
            // 1. Append the new periods; a redelivered event id is ignored and
            //    everything below works on the newly stored periods only.
            // 2. Close every period that now has a successor, among the region's
            //    open period and the periods just added.
            // 3. Move "current" to the latest period, never backwards.
            let new_ids: std::collections::HashSet<uuid::Uuid> = sqlx::query_scalar(
                "INSERT INTO weather_history (event_id, world_id, region, valid_from_tick, condition,
                     previous_condition, temperature_dc, wind_dmps, precipitation_dmmph, occurred_at,
                     log_offset)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                      $6::text[], $7::int[], $8::int[], $9::int[], $10::timestamptz[],
                                      $11::bigint[])
                 ON CONFLICT (event_id) DO NOTHING
                 RETURNING event_id",
            )
            .bind(&rows.event_id)
            .bind(&rows.world_id)
            .bind(&rows.region)
            .bind(&rows.tick)
            .bind(&rows.condition)
            .bind(&rows.previous)
            .bind(&rows.temperature)
            .bind(&rows.wind)
            .bind(&rows.precipitation)
            .bind(&rows.occurred_at)
            .bind(&rows.log_offset)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            // A redelivered event (its id already stored) must not move anything.
            let rows = rows.retain_ids(&new_ids);
            if rows.event_id.is_empty() {
                return Ok(());
            }
            let affected: HashMap<(String, String), i64> = rows
                .world_id
                .iter()
                .zip(&rows.region)
                .zip(&rows.tick)
                .fold(HashMap::new(), |mut first, ((w, r), t)| {
                    let entry = first.entry((w.clone(), r.clone())).or_insert(*t);
                    *entry = (*entry).min(*t);
                    first
                });
            let (worlds, (regions, first_ticks)): (Vec<String>, (Vec<String>, Vec<i64>)) = affected
                .into_iter()
                .map(|((w, r), t)| (w, (r, t)))
                .unzip();
            sqlx::query(
                "WITH pairs AS (
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS p(world_id, region, first_tick)
                 ), candidates AS (
                     SELECT h.event_id,
                            lead(h.valid_from_tick) OVER (
                                PARTITION BY h.world_id, h.region ORDER BY h.valid_from_tick, h.log_offset
                            ) AS next_from,
                            h.valid_to_tick
                       FROM weather_history h
                       JOIN pairs p ON p.world_id = h.world_id AND p.region = h.region
                      WHERE h.valid_to_tick IS NULL OR h.valid_from_tick >= p.first_tick
                 )
                 UPDATE weather_history h SET valid_to_tick = c.next_from
                   FROM candidates c
                  WHERE h.event_id = c.event_id
                    AND c.next_from IS NOT NULL
                    AND h.valid_to_tick IS DISTINCT FROM c.next_from",
            )
            .bind(&worlds)
            .bind(&regions)
            .bind(&first_ticks)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO current_weather AS c (world_id, region, condition, temperature_dc,
                     wind_dmps, precipitation_dmmph, since_tick, log_offset, event_id, occurred_at)
                 SELECT DISTINCT ON (world_id, region)
                        world_id, region, condition, temperature_dc, wind_dmps,
                        precipitation_dmmph, valid_from_tick, log_offset, event_id, occurred_at
                   FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                               $6::int[], $7::int[], $8::int[], $9::timestamptz[], $10::bigint[])
                     AS u(event_id, world_id, region, valid_from_tick, condition,
                          temperature_dc, wind_dmps, precipitation_dmmph, occurred_at, log_offset)
                  ORDER BY world_id, region, valid_from_tick DESC, log_offset DESC
                 ON CONFLICT (world_id, region) DO UPDATE SET
                     condition = EXCLUDED.condition,
                     temperature_dc = EXCLUDED.temperature_dc,
                     wind_dmps = EXCLUDED.wind_dmps,
                     precipitation_dmmph = EXCLUDED.precipitation_dmmph,
                     since_tick = EXCLUDED.since_tick,
                     log_offset = EXCLUDED.log_offset,
                     event_id = EXCLUDED.event_id,
                     occurred_at = EXCLUDED.occurred_at
                  WHERE (c.since_tick, c.log_offset) < (EXCLUDED.since_tick, EXCLUDED.log_offset)",
            )
            .bind(&rows.event_id)
            .bind(&rows.world_id)
            .bind(&rows.region)
            .bind(&rows.tick)
            .bind(&rows.condition)
            .bind(&rows.temperature)
            .bind(&rows.wind)
            .bind(&rows.precipitation)
            .bind(&rows.occurred_at)
            .bind(&rows.log_offset)
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
        .boxed()
    }
}
