//! The story read model: the choices log, each player's current node per story,
//! and how often each choice was taken at each node.
//!
//! Tallies and progress are derived only from choices this batch logs (those
//! whose event id the log does not hold yet), so a redelivered event id counts once.

use std::collections::HashMap;

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

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/story");

/// How often each choice was taken at each node (`$1`-`$5`), and each player's
/// progress per story (`$6`-`$14`).
const TALLIES_AND_PROGRESS: &str = "
    WITH tallied AS (
        INSERT INTO node_tallies AS t (world_id, story_id, node_id, choice_id, times)
        SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
        ON CONFLICT (world_id, story_id, node_id, choice_id)
        DO UPDATE SET times = t.times + EXCLUDED.times
    )
    INSERT INTO player_progress AS p (world_id, player_id, story_id, current_node_id,
        last_choice_id, choices_made, tick, log_offset, updated_at)
    SELECT * FROM UNNEST($6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::bigint[], $12::bigint[], $13::bigint[], $14::timestamptz[])
    ON CONFLICT (world_id, player_id, story_id) DO UPDATE SET
        choices_made = p.choices_made + EXCLUDED.choices_made,
        current_node_id = CASE WHEN EXCLUDED.log_offset > p.log_offset
                               THEN EXCLUDED.current_node_id ELSE p.current_node_id END,
        last_choice_id = CASE WHEN EXCLUDED.log_offset > p.log_offset
                              THEN EXCLUDED.last_choice_id ELSE p.last_choice_id END,
        tick = GREATEST(p.tick, EXCLUDED.tick),
        log_offset = GREATEST(p.log_offset, EXCLUDED.log_offset),
        updated_at = GREATEST(p.updated_at, EXCLUDED.updated_at)";

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
            let (made, ids) = fresh::of_kind(events, |body| match body {
                Body::StoryChoiceMade(choice) => Some(choice),
                _ => None,
            });
            // Only choices not logged before move tallies and progress.
            for i in fresh::unseen(tx, "choices", &ids).await? {
                let (event, choice) = made[i];
                let envelope = &event.envelope;
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
            // Grouped here rather than in SQL: grouping by text keys needs only
            // equality, and a sort of the batch on the server would compare by
            // collation and spill to disk.
            let mut tallies: HashMap<(&str, &str, &str, &str), i64> = HashMap::new();
            // Per (world, player, story): choices made and the row of the latest.
            let mut progress: HashMap<(&str, &str, &str), (i64, usize)> = HashMap::new();
            for i in 0..event_id.len() {
                *tallies
                    .entry((&world_id[i], &story_id[i], &node_id[i], &choice_id[i]))
                    .or_default() += 1;
                let entry = progress
                    .entry((&world_id[i], &player_id[i], &story_id[i]))
                    .or_insert((0, i));
                entry.0 += 1;
                if offset[i] > offset[entry.1] {
                    entry.1 = i;
                }
            }
            let mut t = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((world, story, node, choice), times) in tallies {
                t.0.push(world);
                t.1.push(story);
                t.2.push(node);
                t.3.push(choice);
                t.4.push(times);
            }
            let (counts, latest): (Vec<i64>, Vec<usize>) = progress.into_values().unzip();
            // The log, the tallies and the progress in one statement.
            append_with(
                tx,
                "choices",
                &[
                    ("event_id", Values::Uuid(&event_id)),
                    ("world_id", Values::Text(&world_id)),
                    ("tick", Values::Int8(&tick)),
                    ("occurred_at", Values::Timestamptz(&occurred_at)),
                    ("player_id", Values::Text(&player_id)),
                    ("story_id", Values::Text(&story_id)),
                    ("node_id", Values::Text(&node_id)),
                    ("choice_id", Values::Text(&choice_id)),
                    ("next_node_id", Values::Text(&next_node_id)),
                    ("context", Values::Jsonb(&context)),
                    ("log_partition", Values::Int4(&partition)),
                    ("log_offset", Values::Int8(&offset)),
                ],
                TALLIES_AND_PROGRESS,
                |statement| {
                    statement
                        .bind(t.0)
                        .bind(t.1)
                        .bind(t.2)
                        .bind(t.3)
                        .bind(t.4)
                        .bind(fresh::pick(&world_id, &latest))
                        .bind(fresh::pick(&player_id, &latest))
                        .bind(fresh::pick(&story_id, &latest))
                        .bind(fresh::pick(&next_node_id, &latest))
                        .bind(fresh::pick(&choice_id, &latest))
                        .bind(counts)
                        .bind(fresh::pick(&tick, &latest))
                        .bind(fresh::pick(&offset, &latest))
                        .bind(fresh::pick(&occurred_at, &latest))
                },
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}
