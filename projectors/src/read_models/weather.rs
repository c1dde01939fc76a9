//! The weather read model: each region's current weather, and its history as
//! an append-only log of changes (`weather_changes`).
//!
//! A period `[valid_from_tick, valid_to_tick)` is not stored: it ends where the
//! region's next change in (tick, log offset) order starts, and readers find
//! that change with one probe of the same index that answers "the last change
//! at or before tick N". So a batch never rewrites a row it appended before,
//! and a change that arrives after a later tick of its region (weather events
//! of a world normally come in tick order) needs nothing special: the
//! periods around it are derived from the rows as they now stand.

use std::collections::HashMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::WeatherChanged;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::copy::{Values, append_with};
use crate::read_models::fresh;
use crate::read_models::names::{to_i32, to_i64, weather_condition};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/weather");

/// Each region's latest change of a batch as its current weather, unless a
/// later one is stored already.
const CURRENT_WEATHER: &str = "
    INSERT INTO current_weather AS c (world_id, region, condition, temperature_dc,
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
     WHERE (c.since_tick, c.log_offset) < (EXCLUDED.since_tick, EXCLUDED.log_offset)";

/// The latest tick `weather_changes` holds for each region of these worlds:
/// `current_weather` moves in the same transaction as every append, to the
/// region's highest (tick, log offset), so no stored change is later.
const LATEST_TICKS: &str = "
    SELECT world_id, region, since_tick FROM current_weather WHERE world_id = ANY($1)";

/// Which of the given changes `weather_changes` holds: per change, one
/// descent of its key to the region's rows at that tick (a redelivery has the
/// same region and tick), then the event id among them. An event id names one
/// change, so the world and region need no second look.
const STORED_CHANGES: &str = "
    SELECT u.event_id
      FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::uuid[])
        AS u(world_id, region, tick, event_id)
     WHERE EXISTS (
           SELECT FROM weather_changes h
            WHERE h.region_key = weather_region_key(u.world_id, u.region)
              AND h.valid_from_tick = u.tick
              AND h.event_id = u.event_id)";

/// Which of a batch's changes `weather_changes` holds already. Only a change
/// at or before its region's latest stored tick can be there (a redelivery
/// carries the tick it was stored with), so only those are looked up: while
/// a world's weather moves forward, as it does when catching up and live,
/// that is none, and the batch costs one read of its worlds' current rows
/// instead of a descent of the key per change.
async fn stored_changes(
    tx: &mut PgConnection,
    changes: &[(&Event, &WeatherChanged)],
    ids: &[uuid::Uuid],
) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
    let mut worlds: Vec<&str> = changes
        .iter()
        .map(|(event, _)| event.envelope.world_id.as_str())
        .collect();
    worlds.sort_unstable();
    worlds.dedup();
    let mut latest: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for (world, region, tick) in sqlx::query_as::<_, (String, String, i64)>(LATEST_TICKS)
        .bind(&worlds)
        .fetch_all(&mut *tx)
        .await?
    {
        latest.entry(world).or_default().insert(region, tick);
    }
    let (mut world_ids, mut regions, mut ticks, mut candidates) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((event, change), id) in changes.iter().zip(ids) {
        let world = event.envelope.world_id.as_str();
        let tick = to_i64(event.envelope.world_tick);
        let stored_up_to = latest
            .get(world)
            .and_then(|regions| regions.get(&change.region));
        if stored_up_to.is_some_and(|latest| tick <= *latest) {
            world_ids.push(world);
            regions.push(change.region.as_str());
            ticks.push(tick);
            candidates.push(*id);
        }
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(STORED_CHANGES)
        .bind(world_ids)
        .bind(regions)
        .bind(ticks)
        .bind(candidates)
        .fetch_all(tx)
        .await
}

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
            for i in fresh::unseen_by(tx, "weather_changes", &ids, |tx| {
                stored_changes(tx, &changes, &ids)
            })
            .await?
            {
                let (event, change) = changes[i];
                let envelope = &event.envelope;
                rows.event_id.push(envelope.event_uuid());
                rows.world_id.push(envelope.world_id.clone());
                rows.region.push(change.region.clone());
                rows.tick.push(to_i64(envelope.world_tick));
                rows.condition.push(weather_condition(change.condition));
                rows.previous
                    .push(weather_condition(change.previous_condition));
                rows.temperature.push(change.temperature_dc);
                rows.wind.push(to_i32(change.wind_dmps));
                rows.precipitation.push(to_i32(change.precipitation_dmmph));
                rows.occurred_at.push(envelope.occurred_at());
                rows.log_offset.push(event.offset);
            }
            if rows.event_id.is_empty() {
                return Ok(());
            }
            // "Current" moves to each region's latest new change, never
            // backwards; in the same statement as the changes.
            let latest = rows.latest_per_region();
            append_with(
                tx,
                "weather_changes",
                &[
                    ("event_id", Values::Uuid(&rows.event_id)),
                    ("world_id", Values::Text(&rows.world_id)),
                    ("region", Values::Text(&rows.region)),
                    ("valid_from_tick", Values::Int8(&rows.tick)),
                    ("condition", Values::Name(&rows.condition)),
                    ("previous_condition", Values::Name(&rows.previous)),
                    ("temperature_dc", Values::Int4(&rows.temperature)),
                    ("wind_dmps", Values::Int4(&rows.wind)),
                    ("precipitation_dmmph", Values::Int4(&rows.precipitation)),
                    ("occurred_at", Values::Timestamptz(&rows.occurred_at)),
                    ("log_offset", Values::Int8(&rows.log_offset)),
                ],
                CURRENT_WEATHER,
                |statement| {
                    statement
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
                },
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}
