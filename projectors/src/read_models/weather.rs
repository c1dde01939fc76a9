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
use crate::read_models::copy::{Values, append};
use crate::read_models::fresh;
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

/// Each region's earliest new change in a batch, by (tick, log offset).
#[derive(Default)]
struct Firsts(HashMap<(String, String), (i64, i64)>);

impl Firsts {
    fn columns(self) -> (Vec<String>, Vec<String>, Vec<i64>, Vec<i64>) {
        let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((world, region), (tick, offset)) in self.0 {
            columns.0.push(world);
            columns.1.push(region);
            columns.2.push(tick);
            columns.3.push(offset);
        }
        columns
    }
}

impl Rows {
    fn first_per_region(&self) -> Firsts {
        let mut firsts = Firsts::default();
        for i in 0..self.event_id.len() {
            let at = (self.tick[i], self.log_offset[i]);
            let entry = firsts
                .0
                .entry((self.world_id[i].clone(), self.region[i].clone()))
                .or_insert(at);
            *entry = (*entry).min(at);
        }
        firsts
    }

    /// The row of each region's latest change, by (tick, log offset).
    fn latest_per_region(&self) -> Vec<usize> {
        let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
        for i in 0..self.event_id.len() {
            let entry = latest
                .entry((&self.world_id[i], &self.region[i]))
                .or_insert(i);
            if (self.tick[i], self.log_offset[i]) > (self.tick[*entry], self.log_offset[*entry]) {
                *entry = i;
            }
        }
        let mut rows: Vec<usize> = latest.into_values().collect();
        rows.sort_unstable();
        rows
    }

    /// For each row, the tick of the next change of its region among these
    /// rows in (tick, log offset) order; `None` for each region's last.
    fn successor_ticks(&self) -> Vec<Option<i64>> {
        let mut order: Vec<usize> = (0..self.event_id.len()).collect();
        order.sort_by(|a, b| {
            (
                &self.world_id[*a],
                &self.region[*a],
                self.tick[*a],
                self.log_offset[*a],
            )
                .cmp(&(
                    &self.world_id[*b],
                    &self.region[*b],
                    self.tick[*b],
                    self.log_offset[*b],
                ))
        });
        let mut next = vec![None; order.len()];
        for pair in order.windows(2) {
            let (this, following) = (pair[0], pair[1]);
            if self.world_id[this] == self.world_id[following]
                && self.region[this] == self.region[following]
            {
                next[this] = Some(self.tick[following]);
            }
        }
        next
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
            let (changes, ids) = fresh::of_kind(events, |body| match body {
                Body::WeatherChanged(change) => Some(change),
                _ => None,
            });
            // A redelivered event (its id already stored) must not move anything.
            let mut rows = Rows::default();
            for i in fresh::unseen(tx, "weather_history", &ids).await? {
                let (event, change) = changes[i];
                let envelope = &event.envelope;
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
            // Each new period is valid until the next change of its region.
            // Usually every new change comes after the region's open period
            // (one partition per world, emitted in tick order): then the links
            // are known before inserting, and only the open periods are
            // updated. A change that lands before the open period re-links
            // the region's periods from that tick on.
            let firsts = rows.first_per_region();
            let (worlds, regions, first_ticks, first_offsets) = firsts.columns();
            let open: Vec<(uuid::Uuid, i64, bool)> = sqlx::query_as(
                "SELECT c.event_id, p.first_tick,
                        (p.first_tick, p.first_offset) > (c.since_tick, c.log_offset)
                   FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                     AS p(world_id, region, first_tick, first_offset)
                   JOIN current_weather c USING (world_id, region)",
            )
            .bind(&worlds)
            .bind(&regions)
            .bind(&first_ticks)
            .bind(&first_offsets)
            .fetch_all(&mut *tx)
            .await?;
            let in_order = open.iter().all(|(_, _, after)| *after);
            let valid_to = if in_order {
                rows.successor_ticks()
            } else {
                vec![None; rows.event_id.len()]
            };
            append(
                tx,
                "weather_history",
                &[
                    ("event_id", Values::Uuid(&rows.event_id)),
                    ("world_id", Values::Text(&rows.world_id)),
                    ("region", Values::Text(&rows.region)),
                    ("valid_from_tick", Values::Int8(&rows.tick)),
                    ("valid_to_tick", Values::Int8OrNull(&valid_to)),
                    ("condition", Values::Name(&rows.condition)),
                    ("previous_condition", Values::Name(&rows.previous)),
                    ("temperature_dc", Values::Int4(&rows.temperature)),
                    ("wind_dmps", Values::Int4(&rows.wind)),
                    ("precipitation_dmmph", Values::Int4(&rows.precipitation)),
                    ("occurred_at", Values::Timestamptz(&rows.occurred_at)),
                    ("log_offset", Values::Int8(&rows.log_offset)),
                ],
            )
            .await?;
            if in_order {
                // Each region's open period ends where its first new one starts.
                let (open_ids, ends): (Vec<uuid::Uuid>, Vec<i64>) =
                    open.iter().map(|(id, first, _)| (*id, *first)).unzip();
                sqlx::query(
                    "UPDATE weather_history h SET valid_to_tick = u.valid_to
                       FROM UNNEST($1::uuid[], $2::bigint[]) AS u(event_id, valid_to)
                      WHERE h.event_id = u.event_id AND h.valid_to_tick IS DISTINCT FROM u.valid_to",
                )
                .bind(&open_ids)
                .bind(&ends)
                .execute(&mut *tx)
                .await?;
            } else {
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
            }
            // "Current" moves to each region's latest new period, never backwards.
            let latest = rows.latest_per_region();
            sqlx::query(
                "INSERT INTO current_weather AS c (world_id, region, condition, temperature_dc,
                     wind_dmps, precipitation_dmmph, since_tick, log_offset, event_id, occurred_at)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::int[],
                                      $6::int[], $7::bigint[], $8::bigint[], $9::uuid[], $10::timestamptz[])
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
            .bind(fresh::pick(&rows.world_id, &latest))
            .bind(fresh::pick(&rows.region, &latest))
            .bind(fresh::pick(&rows.condition, &latest))
            .bind(fresh::pick(&rows.temperature, &latest))
            .bind(fresh::pick(&rows.wind, &latest))
            .bind(fresh::pick(&rows.precipitation, &latest))
            .bind(fresh::pick(&rows.tick, &latest))
            .bind(fresh::pick(&rows.log_offset, &latest))
            .bind(fresh::pick(&rows.event_id, &latest))
            .bind(fresh::pick(&rows.occurred_at, &latest))
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
        .boxed()
    }
}
