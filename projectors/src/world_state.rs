//! A world as it was: its full state at a tick or a time, rebuilt from the log.
//!
//! The fold follows the read models' rules exactly (each event id once; ties at
//! one tick broken by log order; a story's current node is the last choice's next
//! node), so the state at tick N equals what the read models showed when the
//! world stood at tick N.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;
use worldline_ops::config::KafkaSettings;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::partitioner::partition_for_key;
use worldline_schemas::pb::Envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::{Family, WorldId, decode_envelope};

use crate::read_models::names;

/// Up to which point of history to fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Every event whose world tick is at most this.
    Tick(u64),
    /// Every event that occurred at or before this time.
    Time(DateTime<Utc>),
}

impl AsOf {
    fn includes(&self, envelope: &Envelope) -> bool {
        match self {
            AsOf::Tick(tick) => envelope.world_tick <= *tick,
            AsOf::Time(time) => envelope.occurred_at() <= *time,
        }
    }
}

/// The clock as of the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClockState {
    pub tick: u64,
    pub game_time_s: u64,
    pub day: u32,
    pub season: &'static str,
}

/// One region's weather as of the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionWeather {
    pub condition: &'static str,
    pub temperature_dc: i32,
    pub wind_dmps: u32,
    pub precipitation_dmmph: u32,
    pub since_tick: u64,
}

/// Inference totals as of the point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InferenceTotals {
    pub inferences: u64,
    pub failures: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micro_usd: u64,
}

/// A world's full state as of a tick or a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorldState {
    pub world_id: String,
    pub display_name: Option<String>,
    pub clock: Option<ClockState>,
    /// Current weather per region.
    pub weather: BTreeMap<String, RegionWeather>,
    /// Each player's current node per story (`""` once a story has ended).
    pub story_progress: BTreeMap<String, BTreeMap<String, String>>,
    pub inference: InferenceTotals,
    /// Events folded (each event id once).
    pub events: u64,
    #[serde(skip)]
    seen: HashSet<Uuid>,
}

impl WorldState {
    /// An empty state of `world`.
    pub fn new(world: &WorldId) -> WorldState {
        WorldState {
            world_id: world.to_string(),
            ..WorldState::default()
        }
    }

    /// Folds one event in. Events must arrive in log order per family; a
    /// redelivered event id changes nothing.
    pub fn apply(&mut self, envelope: &Envelope) {
        if envelope.world_id != self.world_id || !self.seen.insert(envelope.event_uuid()) {
            return;
        }
        self.events += 1;
        match &envelope.body {
            Some(Body::WorldCreated(created)) => {
                self.display_name
                    .get_or_insert_with(|| created.display_name.clone());
            }
            Some(Body::ClockTicked(tick)) => {
                if self
                    .clock
                    .as_ref()
                    .is_none_or(|c| c.tick < envelope.world_tick)
                {
                    self.clock = Some(ClockState {
                        tick: envelope.world_tick,
                        game_time_s: tick.game_time_s,
                        day: tick.day,
                        season: names::season(tick.season),
                    });
                }
            }
            Some(Body::WeatherChanged(change)) => {
                let newer = self
                    .weather
                    .get(&change.region)
                    .is_none_or(|w| w.since_tick <= envelope.world_tick);
                if newer {
                    self.weather.insert(
                        change.region.clone(),
                        RegionWeather {
                            condition: names::weather_condition(change.condition),
                            temperature_dc: change.temperature_dc,
                            wind_dmps: change.wind_dmps,
                            precipitation_dmmph: change.precipitation_dmmph,
                            since_tick: envelope.world_tick,
                        },
                    );
                }
            }
            Some(Body::StoryChoiceMade(choice)) => {
                self.story_progress
                    .entry(choice.player_id.clone())
                    .or_default()
                    .insert(choice.story_id.clone(), choice.next_node_id.clone());
            }
            Some(Body::InferenceRecorded(inference)) => {
                let totals = &mut self.inference;
                totals.inferences += 1;
                totals.failures += u64::from(names::inference_outcome(inference.outcome) != "ok");
                totals.prompt_tokens += u64::from(inference.prompt_tokens);
                totals.completion_tokens += u64::from(inference.completion_tokens);
                totals.cost_micro_usd += inference.cost_micro_usd;
            }
            Some(Body::WorldPaused(_)) | Some(Body::WorldResumed(_)) | None => {}
        }
    }
}

/// Why the state could not be read from the log.
#[derive(Debug, thiserror::Error)]
pub enum WorldStateError {
    #[error("Kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("timed out reading {0}")]
    Timeout(String),
}

/// Reads the world's partition of every family topic from the beginning to its
/// current end and folds the events up to `as_of`. Blocking: call it from
/// `spawn_blocking`.
pub fn world_state_from_log(
    kafka: &KafkaSettings,
    topic_prefix: &str,
    world: &WorldId,
    as_of: AsOf,
) -> Result<WorldState, WorldStateError> {
    let consumer: BaseConsumer =
        worldline_ops::kafka::base_client_config(kafka, "worldline-world-state")
            // A reader that joins no group and commits nothing.
            .set("group.id", "worldline-world-state")
            .set("enable.auto.commit", "false")
            // Answer as soon as any record is there: a person is waiting.
            .set("fetch.wait.max.ms", "10")
            .create()?;
    let timeout = Duration::from_secs(10);
    // The world's partition of every family topic, read together: one
    // assignment, so the fetches of all of them overlap.
    let mut ranges: Vec<(String, i32, i64, i64)> = Vec::new();
    for family in Family::ALL {
        let topic = family.topic(topic_prefix);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let partitions = metadata
            .topics()
            .first()
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            continue;
        }
        let partition = partition_for_key(world.as_str().as_bytes(), partitions as i32);
        let (low, high) = consumer.fetch_watermarks(&topic, partition, timeout)?;
        if high > low {
            ranges.push((topic, partition, low, high));
        }
    }
    let mut state = WorldState::new(world);
    if ranges.is_empty() {
        return Ok(state);
    }
    let mut assignment = TopicPartitionList::new();
    for (topic, partition, low, _) in &ranges {
        assignment.add_partition_offset(topic, *partition, Offset::Offset(*low))?;
    }
    consumer.assign(&assignment)?;
    // Per family the events must be folded in log order; across families
    // the fold does not depend on order (each family updates its own part),
    // so records are buffered per topic and folded family by family.
    let mut pending: BTreeMap<String, (i64, Vec<Envelope>)> = ranges
        .iter()
        .map(|(topic, _, low, _)| (topic.clone(), (*low, Vec::new())))
        .collect();
    let ends: BTreeMap<String, i64> = ranges
        .iter()
        .map(|(topic, _, _, high)| (topic.clone(), *high))
        .collect();
    while pending.iter().any(|(topic, (next, _))| *next < ends[topic]) {
        let message = consumer
            .poll(timeout)
            .ok_or_else(|| WorldStateError::Timeout(world.to_string()))??;
        let Some((next, envelopes)) = pending.get_mut(message.topic()) else {
            continue;
        };
        *next = message.offset() + 1;
        if message.key() != Some(world.as_str().as_bytes()) {
            continue;
        }
        // Undecodable records are dead letters in the read models too.
        if let Some(Ok(envelope)) = message.payload().map(decode_envelope)
            && as_of.includes(&envelope)
        {
            envelopes.push(envelope);
        }
    }
    for family in Family::ALL {
        if let Some((_, envelopes)) = pending.get(&family.topic(topic_prefix)) {
            for envelope in envelopes {
                state.apply(envelope);
            }
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::{
        ClockTicked, Season, StoryChoiceMade, WeatherChanged, WeatherCondition,
    };

    use super::*;

    fn world() -> WorldId {
        WorldId::parse("w").unwrap()
    }

    fn tick(n: u64) -> Envelope {
        new_envelope(
            &world(),
            n,
            "clock",
            Body::ClockTicked(ClockTicked {
                game_time_s: n * 60,
                day: 0,
                season: Season::Summer as i32,
                time_scale: 60,
            }),
        )
    }

    #[test]
    fn given_events_past_the_tick_then_only_those_up_to_it_count() {
        let as_of = AsOf::Tick(2);
        let mut state = WorldState::new(&world());
        for n in 1..=5 {
            let event = tick(n);
            if as_of.includes(&event) {
                state.apply(&event);
            }
        }
        assert_eq!(state.clock.as_ref().map(|c| c.tick), Some(2));
        assert_eq!(state.events, 2);
    }

    #[test]
    fn given_a_redelivered_choice_then_progress_and_counts_are_unchanged() {
        let choice = new_envelope(
            &world(),
            3,
            "game",
            Body::StoryChoiceMade(StoryChoiceMade {
                player_id: "ayla".to_owned(),
                story_id: "caravan".to_owned(),
                node_id: "start".to_owned(),
                choice_id: "help".to_owned(),
                next_node_id: "camp".to_owned(),
                context: Default::default(),
            }),
        );
        let mut state = WorldState::new(&world());
        state.apply(&choice);
        state.apply(&choice);
        assert_eq!(state.events, 1);
        assert_eq!(state.story_progress["ayla"]["caravan"], "camp");
    }

    #[test]
    fn given_two_changes_at_one_tick_then_the_later_in_the_log_wins() {
        let change = |condition: WeatherCondition| {
            new_envelope(
                &world(),
                7,
                "weather",
                Body::WeatherChanged(WeatherChanged {
                    region: "north".to_owned(),
                    condition: condition as i32,
                    ..Default::default()
                }),
            )
        };
        let mut state = WorldState::new(&world());
        state.apply(&change(WeatherCondition::Rain));
        state.apply(&change(WeatherCondition::Snow));
        assert_eq!(state.weather["north"].condition, "snow");
    }
}
