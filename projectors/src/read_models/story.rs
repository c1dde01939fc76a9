//! The story read model: the choices log, each player's current node per story,
//! and how often each choice was taken at each node.
//!
//! Tallies and progress are derived only from choices inserted by this batch
//! (`RETURNING` of the log insert), so a redelivered event id counts once.

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::names::to_i64;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/story");

/// Projects `StoryChoiceMade` events.
#[derive(Debug, Default)]
pub struct StoryProjector;

impl Projector for StoryProjector {
    fn name(&self) -> &'static str {
        "story"
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
            let mut event_id = Vec::new();
            let mut world_id = Vec::new();
            let mut tick = Vec::new();
            let mut occurred_at = Vec::new();
            let mut player_id = Vec::new();
            let mut story_id = Vec::new();
            let mut node_id = Vec::new();
            let mut choice_id = Vec::new();
            let mut next_node_id = Vec::new();
            let mut context = Vec::new();
            let mut partition = Vec::new();
            let mut offset = Vec::new();
            for event in events {
                let envelope = &event.envelope;
                let Some(Body::StoryChoiceMade(choice)) = &envelope.body else {
                    continue;
                };
                event_id.push(envelope.event_uuid());
                world_id.push(envelope.world_id.clone());
                tick.push(to_i64(envelope.world_tick));
                occurred_at.push(envelope.occurred_at());
                player_id.push(choice.player_id.clone());
                story_id.push(choice.story_id.clone());
                node_id.push(choice.node_id.clone());
                choice_id.push(choice.choice_id.clone());
                next_node_id.push(choice.next_node_id.clone());
                context.push(serde_json::json!(choice.context));
                partition.push(event.partition);
                offset.push(event.offset);
            }
            if event_id.is_empty() {
                return Ok(());
            }
            // One statement: the log insert feeds tallies and progress through
            // RETURNING, so all three move together and only for new event ids.
            sqlx::query(
                "WITH new_choices AS (
                     INSERT INTO choices (event_id, world_id, tick, occurred_at, player_id, story_id,
                                          node_id, choice_id, next_node_id, context, log_partition, log_offset)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::timestamptz[],
                                          $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                                          $10::jsonb[], $11::int[], $12::bigint[])
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING world_id, player_id, story_id, node_id, choice_id, next_node_id,
                               tick, log_offset, occurred_at
                 ), tallies AS (
                     INSERT INTO node_tallies AS t (world_id, story_id, node_id, choice_id, times)
                     SELECT world_id, story_id, node_id, choice_id, count(*)
                       FROM new_choices GROUP BY world_id, story_id, node_id, choice_id
                     ON CONFLICT (world_id, story_id, node_id, choice_id)
                     DO UPDATE SET times = t.times + EXCLUDED.times
                 ), made AS (
                     SELECT world_id, player_id, story_id, count(*) AS n
                       FROM new_choices GROUP BY world_id, player_id, story_id
                 )
                 INSERT INTO player_progress AS p (world_id, player_id, story_id, current_node_id,
                     last_choice_id, choices_made, tick, log_offset, updated_at)
                 SELECT DISTINCT ON (c.world_id, c.player_id, c.story_id)
                        c.world_id, c.player_id, c.story_id, c.next_node_id, c.choice_id,
                        m.n, c.tick, c.log_offset, c.occurred_at
                   FROM new_choices c
                   JOIN made m USING (world_id, player_id, story_id)
                  ORDER BY c.world_id, c.player_id, c.story_id, c.log_offset DESC
                 ON CONFLICT (world_id, player_id, story_id) DO UPDATE SET
                     choices_made = p.choices_made + EXCLUDED.choices_made,
                     current_node_id = CASE WHEN EXCLUDED.log_offset > p.log_offset
                                            THEN EXCLUDED.current_node_id ELSE p.current_node_id END,
                     last_choice_id = CASE WHEN EXCLUDED.log_offset > p.log_offset
                                           THEN EXCLUDED.last_choice_id ELSE p.last_choice_id END,
                     tick = GREATEST(p.tick, EXCLUDED.tick),
                     log_offset = GREATEST(p.log_offset, EXCLUDED.log_offset),
                     updated_at = GREATEST(p.updated_at, EXCLUDED.updated_at)",
            )
            .bind(event_id)
            .bind(world_id)
            .bind(tick)
            .bind(occurred_at)
            .bind(player_id)
            .bind(story_id)
            .bind(node_id)
            .bind(choice_id)
            .bind(next_node_id)
            .bind(context)
            .bind(partition)
            .bind(offset)
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
        .boxed()
    }
}
