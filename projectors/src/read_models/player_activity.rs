//! Player activity per world: choices made, stories played, first and last seen.
//! Added after launch as the worked example of "adding a projector" (see the
//! projectors README): this file, its migration, one registry line, then
//! `worldline replay player_activity` builds it from the whole history.

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::copy::{Values, append_with};
use crate::read_models::fresh;
use crate::read_models::names::to_i64;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/player_activity");

/// Each player's choices of a batch (`$1`-`$5`: world, player, story, tick,
/// time) added to their activity.
const ADD_TO_ACTIVITY: &str = "WITH batch AS (
        SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[],
                $4::bigint[], $5::timestamptz[])
          AS b(world_id, player_id, story_id, tick, occurred_at)
    ), per_player AS (
        SELECT b.world_id, b.player_id, count(*) AS choices,
               array_agg(DISTINCT b.story_id ORDER BY b.story_id) AS stories,
               min(b.tick) AS first_tick, max(b.tick) AS last_tick,
               min(b.occurred_at) AS first_seen, max(b.occurred_at) AS last_seen
          FROM batch b
         GROUP BY b.world_id, b.player_id
    )
    INSERT INTO player_activity AS a
        (world_id, player_id, choices, stories, first_tick, last_tick, first_seen, last_seen)
    SELECT * FROM per_player
    ON CONFLICT (world_id, player_id) DO UPDATE SET
        choices = a.choices + EXCLUDED.choices,
        stories = ARRAY(SELECT DISTINCT s FROM unnest(a.stories || EXCLUDED.stories) AS s ORDER BY s),
        first_tick = LEAST(a.first_tick, EXCLUDED.first_tick),
        last_tick = GREATEST(a.last_tick, EXCLUDED.last_tick),
        first_seen = LEAST(a.first_seen, EXCLUDED.first_seen),
        last_seen = GREATEST(a.last_seen, EXCLUDED.last_seen)";

/// Projects `StoryChoiceMade` events into one row per (world, player).
#[derive(Debug, Default)]
pub struct PlayerActivityProjector;

impl Projector for PlayerActivityProjector {
    fn name(&self) -> &'static str {
        "player_activity"
    }

    fn families(&self) -> &'static [Family] {
        &[Family::Story]
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
            let (mut ids, mut worlds, mut players, mut stories, mut ticks, mut times) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            let (made, event_ids) = fresh::of_kind(events, |body| match body {
                Body::StoryChoiceMade(choice) => Some(choice),
                _ => None,
            });
            // Only choices not counted before move the totals.
            for i in fresh::unseen(tx, "counted_choices", &event_ids).await? {
                let (event, choice) = made[i];
                ids.push(event.envelope.event_uuid());
                worlds.push(event.envelope.world_id.clone());
                players.push(choice.player_id.clone());
                stories.push(choice.story_id.clone());
                ticks.push(to_i64(event.envelope.world_tick));
                times.push(event.envelope.occurred_at());
            }
            if ids.is_empty() {
                return Ok(());
            }
            // The ids counted and the totals in one statement.
            append_with(
                tx,
                "counted_choices",
                &[("event_id", Values::Uuid(&ids))],
                ADD_TO_ACTIVITY,
                |statement| {
                    statement
                        .bind(worlds)
                        .bind(players)
                        .bind(stories)
                        .bind(ticks)
                        .bind(times)
                },
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}
