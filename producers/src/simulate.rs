//! `worldline simulate`: players making story choices and NPCs calling models,
//! for demos and load.
//!
//! # What is simulated
//!
//! - **Arrivals**: one Poisson process at `choices_per_second +
//!   inferences_per_second` across all worlds; each arrival is a story choice or
//!   an inference in proportion to the two rates, in a uniformly chosen world.
//! - **Story choices**: every world offers the same few branching stories,
//!   generated from the seed ([`story_graphs`]). The choosing player is drawn
//!   from a Zipf distribution (a few players are far more active than the
//!   rest). A player mostly carries on with a story in progress, or opens one;
//!   at its node they take one of its choices (earlier ones are more popular),
//!   and move to the node it leads to (`next_node_id`) or finish the story.
//!   A quarter of the choices carry a little `context`.
//! - **Inferences**: purposes weighted (NPC dialogue most), a model per
//!   purpose with its own token, latency and price profile, log-normal token
//!   counts and latencies, mostly OK outcomes with some errors, timeouts and
//!   filtered answers, and an input hash over a synthetic prompt (popular
//!   prompts repeat).
//!
//! # Determinism
//!
//! Everything is drawn from one `StdRng` seeded with `seed` (plus a salted one
//! for the story graphs), so a seed reproduces the same sequence of event
//! bodies and ticks, whatever the pacing and the batch sizes. Event ids and
//! `occurred_at_ms` are fresh on every run: a re-run is new traffic, not a
//! replay the projectors would drop as duplicates.
//!
//! # Ticks
//!
//! The simulator has no clock of its own. Each arrival has a time on the
//! simulation's schedule (milliseconds since start), and an event's tick is
//! `start tick of its world + schedule time / tick interval`. With start ticks
//! read from the clock topic ([`prepare_simulation`] does) and the clock's tick
//! interval, a paced simulation stays close to the real clock; an unpaced one
//! (benchmarks) runs through schedule time faster than the clock.
//!
//! # Delivery
//!
//! Events are appended in batches through the shared [`Appender`]; an event
//! Kafka did not acknowledge is retried with the same envelope. Only
//! acknowledged events are counted. Under Kafka failures a retried choice can
//! land after a later choice of the same player: acceptable for load, and the
//! only case where a player's path in the log skips a step.

mod inference;
mod sampling;
mod stories;

use std::collections::HashMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use worldline_ops::config::{KafkaSettings, Settings};
use worldline_ops::topics::{TopicError, verify_event_topics};
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{Envelope, StoryChoiceMade};
use worldline_schemas::{Family, WorldId, WorldIdError};

pub use inference::{InferenceSampler, ModelProfile};
pub use stories::{STORIES_PER_WORLD, StoryChoice, StoryGraph, StoryNode, story_graphs};

use crate::appender::{AppendError, Appender};
use crate::clock::{ClockError, last_clock_position};
use stories::Progress;

/// Envelope `source` of simulated story choices.
pub const STORY_SOURCE: &str = "simulator/story";
/// Envelope `source` of simulated inferences.
pub const INFERENCE_SOURCE: &str = "simulator/inference";

/// Share of arrivals at which a player carries on with a story in progress
/// rather than picking a story at random.
const CONTINUE_STORY: f64 = 0.8;
/// Share of choices that carry a `context` map.
const WITH_CONTEXT: f64 = 0.25;
const LOCATIONS: [&str; 6] = [
    "harbour",
    "market",
    "old-mill",
    "north-gate",
    "chapel",
    "forest-edge",
];

/// Settings of one simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateOptions {
    /// Worlds to simulate.
    pub worlds: Vec<WorldId>,
    /// Players per world.
    pub players_per_world: u32,
    /// NPCs per world.
    pub npcs_per_world: u32,
    /// Story choices per second across all worlds.
    pub choices_per_second: f64,
    /// Inferences per second across all worlds.
    pub inferences_per_second: f64,
    /// Seed of every random draw.
    pub seed: u64,
    /// Real milliseconds per clock tick, to turn schedule time into ticks.
    pub tick_interval_ms: u64,
    /// Each world's tick when the simulation starts; a missing world starts at 0.
    pub start_ticks: HashMap<WorldId, u64>,
    /// Stop after this many events (tests, benchmarks); `None` runs until shutdown.
    pub max_events: Option<u64>,
    /// Keep to the schedule in real time (demos). Unpaced runs append as fast
    /// as Kafka takes them (load, benchmarks).
    pub paced: bool,
    /// Largest number of events in one append batch.
    pub batch_max_events: usize,
}

impl SimulateOptions {
    /// The options of `worldline simulate` from settings: paced, until shutdown,
    /// every world starting at tick 0 (see [`prepare_simulation`] for the ticks).
    pub fn from_settings(settings: &Settings) -> Result<SimulateOptions, SimulateError> {
        let worlds = settings
            .simulate
            .worlds
            .iter()
            .map(|world| WorldId::parse(world))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SimulateOptions {
            worlds,
            players_per_world: settings.simulate.players_per_world,
            npcs_per_world: settings.simulate.npcs_per_world,
            choices_per_second: settings.simulate.choices_per_second,
            inferences_per_second: settings.simulate.inferences_per_second,
            seed: settings.simulate.seed,
            tick_interval_ms: settings.clock.tick_interval_ms,
            start_ticks: HashMap::new(),
            max_events: None,
            paced: true,
            batch_max_events: 2_000,
        })
    }

    fn validate(&self) -> Result<(), SimulateError> {
        let invalid = |reason: &str| Err(SimulateError::InvalidOptions(reason.to_owned()));
        let rate_ok = |rate: f64| rate.is_finite() && rate >= 0.0;
        if self.worlds.is_empty() {
            return invalid("at least one world is needed");
        }
        if !rate_ok(self.choices_per_second) || !rate_ok(self.inferences_per_second) {
            return invalid("rates must be finite and not negative");
        }
        if self.choices_per_second + self.inferences_per_second <= 0.0 {
            return invalid("choices_per_second + inferences_per_second must be above 0");
        }
        if self.choices_per_second > 0.0 && self.players_per_world == 0 {
            return invalid("story choices need at least one player per world");
        }
        if self.inferences_per_second > 0.0 && self.npcs_per_world == 0 {
            return invalid("inferences need at least one NPC per world");
        }
        if self.tick_interval_ms == 0 {
            return invalid("tick_interval_ms must be at least 1");
        }
        if self.batch_max_events == 0 {
            return invalid("batch_max_events must be at least 1");
        }
        Ok(())
    }
}

/// What a simulation appended (acknowledged events only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulationStats {
    /// Story choices appended.
    pub story_choices: u64,
    /// Inferences appended.
    pub inferences: u64,
    /// Append batches.
    pub batches: u64,
}

impl SimulationStats {
    /// Every event appended.
    pub fn events(&self) -> u64 {
        self.story_choices + self.inferences
    }
}

/// Errors that stop the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("invalid simulation options: {0}")]
    InvalidOptions(String),
    #[error("invalid world in the simulation settings: {0}")]
    World(#[from] WorldIdError),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("could not read the worlds' ticks from the clock topic: {0}")]
    Clock(#[from] ClockError),
    #[error(transparent)]
    Append(#[from] AppendError),
}

/// One simulated event, before it becomes an envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedEvent {
    /// When it happens on the simulation's schedule, in milliseconds since start.
    pub at_ms: u64,
    /// The world it happens in.
    pub world: WorldId,
    /// The world's tick at that time.
    pub tick: u64,
    /// The event.
    pub body: Body,
}

impl SimulatedEvent {
    /// The envelope to append: a fresh id and the current time.
    pub fn to_envelope(&self) -> Envelope {
        let source = match self.body {
            Body::StoryChoiceMade(_) => STORY_SOURCE,
            _ => INFERENCE_SOURCE,
        };
        new_envelope(&self.world, self.tick, source, self.body.clone())
    }
}

/// The simulation itself: a deterministic, endless sequence of events. No I/O.
#[derive(Debug)]
pub struct Simulation {
    rng: StdRng,
    worlds: Vec<WorldId>,
    start_ticks: Vec<u64>,
    tick_interval_ms: u64,
    stories: Vec<StoryGraph>,
    progress: Progress,
    players: sampling::Zipf,
    inferences: InferenceSampler,
    arrivals_per_ms: f64,
    choice_share: f64,
    clock_ms: f64,
}

impl Simulation {
    /// A simulation as `options` describe it.
    pub fn new(options: &SimulateOptions) -> Result<Simulation, SimulateError> {
        options.validate()?;
        let total_per_second = options.choices_per_second + options.inferences_per_second;
        Ok(Simulation {
            rng: StdRng::seed_from_u64(options.seed),
            start_ticks: options
                .worlds
                .iter()
                .map(|world| options.start_ticks.get(world).copied().unwrap_or(0))
                .collect(),
            worlds: options.worlds.clone(),
            tick_interval_ms: options.tick_interval_ms,
            stories: story_graphs(options.seed),
            progress: Progress::default(),
            players: sampling::Zipf::new(options.players_per_world, 1.1),
            inferences: InferenceSampler::new(options.npcs_per_world),
            arrivals_per_ms: total_per_second / 1000.0,
            choice_share: options.choices_per_second / total_per_second,
            clock_ms: 0.0,
        })
    }

    /// The stories every world offers.
    pub fn stories(&self) -> &[StoryGraph] {
        &self.stories
    }

    /// The next event on the schedule.
    pub fn next_event(&mut self) -> SimulatedEvent {
        self.clock_ms += sampling::exponential(&mut self.rng, self.arrivals_per_ms);
        let world = self.rng.random_range(0..self.worlds.len());
        let body = if self.rng.random_bool(self.choice_share) {
            Body::StoryChoiceMade(self.story_choice(world))
        } else {
            Body::InferenceRecorded(self.inferences.sample(&mut self.rng))
        };
        let at_ms = self.clock_ms as u64;
        SimulatedEvent {
            at_ms,
            world: self.worlds[world].clone(),
            tick: self.start_ticks[world] + at_ms / self.tick_interval_ms,
            body,
        }
    }

    fn story_choice(&mut self, world: usize) -> StoryChoiceMade {
        let player = self.players.sample(&mut self.rng);
        let started = self.progress.in_progress(world, player, self.stories.len());
        let story = match started.choose(&mut self.rng) {
            Some(story) if self.rng.random_bool(CONTINUE_STORY) => *story,
            _ => self.rng.random_range(0..self.stories.len()),
        };
        let graph = &self.stories[story];
        let node = &graph.nodes[self.progress.node(world, player, story)];
        // Earlier choices are the obvious ones and are taken more often.
        let weights: Vec<(usize, f64)> = (0..node.choices.len())
            .map(|index| (index, 1.0 / (index + 1) as f64))
            .collect();
        let choice = &node.choices[sampling::weighted(&mut self.rng, &weights)];
        let mut context = HashMap::new();
        if self.rng.random_bool(WITH_CONTEXT) {
            let location = LOCATIONS.choose(&mut self.rng).copied().unwrap_or("market");
            context.insert("location".to_owned(), location.to_owned());
            let party_size: u32 = self.rng.random_range(1..=4);
            context.insert("party_size".to_owned(), party_size.to_string());
        }
        let made = StoryChoiceMade {
            player_id: format!("player-{:04}", player + 1),
            story_id: graph.id.clone(),
            node_id: node.id.clone(),
            choice_id: choice.id.clone(),
            next_node_id: choice
                .next
                .map(|index| graph.nodes[index].id.clone())
                .unwrap_or_default(),
            context,
        };
        self.progress.advance(world, player, story, choice.next);
        made
    }
}

/// The options of `worldline simulate` ready to run: the event topics are
/// checked (the simulator refuses topics that would lose history) and each
/// world starts at its last tick in the clock topic.
pub async fn prepare_simulation(settings: &Settings) -> Result<SimulateOptions, SimulateError> {
    verify_event_topics(&settings.kafka, &settings.topics).await?;
    let mut options = SimulateOptions::from_settings(settings)?;
    options.start_ticks =
        current_ticks(&settings.kafka, &settings.topics.prefix, &options.worlds).await?;
    Ok(options)
}

/// Each world's last tick in the clock topic (worlds that never ticked are left out).
pub async fn current_ticks(
    kafka: &KafkaSettings,
    topic_prefix: &str,
    worlds: &[WorldId],
) -> Result<HashMap<WorldId, u64>, SimulateError> {
    let topic = Family::Clock.topic(topic_prefix);
    let mut ticks = HashMap::new();
    for world in worlds {
        let (kafka, topic, scanned) = (kafka.clone(), topic.clone(), world.clone());
        let position =
            tokio::task::spawn_blocking(move || last_clock_position(&kafka, &topic, &scanned))
                .await
                .map_err(|_| ClockError::Resume(rdkafka::error::KafkaError::Canceled))??;
        if let Some(position) = position {
            ticks.insert(world.clone(), position.tick);
        }
    }
    Ok(ticks)
}

/// Runs the simulation until `shutdown` fires or `max_events` are appended.
pub async fn run_simulation(
    appender: &Appender,
    options: &SimulateOptions,
    shutdown: CancellationToken,
) -> Result<SimulationStats, SimulateError> {
    let mut simulation = Simulation::new(options)?;
    let mut stats = SimulationStats::default();
    let started = tokio::time::Instant::now();
    // The next event, drawn but not yet due.
    let mut upcoming: Option<SimulatedEvent> = None;
    tracing::info!(
        worlds = options.worlds.len(),
        choices_per_second = options.choices_per_second,
        inferences_per_second = options.inferences_per_second,
        paced = options.paced,
        "simulation started"
    );
    loop {
        let room = options
            .max_events
            .map_or(u64::MAX, |max| max.saturating_sub(stats.events()));
        let limit = usize::try_from(room)
            .unwrap_or(usize::MAX)
            .min(options.batch_max_events);
        if limit == 0 || shutdown.is_cancelled() {
            break;
        }
        let first = upcoming.take().unwrap_or_else(|| simulation.next_event());
        if options.paced {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(started + Duration::from_millis(first.at_ms)) => {}
            }
        }
        let mut batch = vec![first];
        let due_ms = started.elapsed().as_millis() as u64;
        while batch.len() < limit {
            let next = simulation.next_event();
            if options.paced && next.at_ms > due_ms {
                upcoming = Some(next);
                break;
            }
            batch.push(next);
        }
        let Some(appended) = append_until_acknowledged(appender, &batch, &shutdown).await? else {
            break;
        };
        stats.story_choices += appended.story_choices;
        stats.inferences += appended.inferences;
        stats.batches += 1;
    }
    tracing::info!(?stats, "simulation stopped");
    Ok(stats)
}

/// Appends `batch`, retrying what Kafka did not acknowledge with the same
/// envelopes. `None` when shutdown came first (what was acknowledged is lost
/// from the counts, not from the log).
async fn append_until_acknowledged(
    appender: &Appender,
    batch: &[SimulatedEvent],
    shutdown: &CancellationToken,
) -> Result<Option<SimulationStats>, SimulateError> {
    let mut pending: Vec<Envelope> = batch.iter().map(SimulatedEvent::to_envelope).collect();
    let mut appended = SimulationStats::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let results = appender.append_batch(&pending).await;
        let mut retry = Vec::new();
        for (envelope, result) in pending.into_iter().zip(results) {
            match result {
                Ok(_) => match envelope.body {
                    Some(Body::StoryChoiceMade(_)) => appended.story_choices += 1,
                    _ => appended.inferences += 1,
                },
                Err(error) if error.is_retryable() => {
                    tracing::warn!(world = %envelope.world_id, %error, "simulated event not acknowledged; retrying");
                    retry.push(envelope);
                }
                Err(error) => return Err(error.into()),
            }
        }
        if retry.is_empty() {
            return Ok(Some(appended));
        }
        pending = retry;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use worldline_schemas::EnvelopeExt;

    use super::*;

    fn options(seed: u64) -> SimulateOptions {
        SimulateOptions {
            worlds: vec![
                WorldId::parse("emberfall").unwrap(),
                WorldId::parse("frostholm").unwrap(),
            ],
            players_per_world: 40,
            npcs_per_world: 10,
            choices_per_second: 30.0,
            inferences_per_second: 10.0,
            seed,
            tick_interval_ms: 1000,
            start_ticks: HashMap::from([(WorldId::parse("frostholm").unwrap(), 500)]),
            max_events: None,
            paced: false,
            batch_max_events: 100,
        }
    }

    fn events(seed: u64, n: usize) -> Vec<SimulatedEvent> {
        let mut simulation = Simulation::new(&options(seed)).unwrap();
        (0..n).map(|_| simulation.next_event()).collect()
    }

    fn choices(events: &[SimulatedEvent]) -> Vec<(&WorldId, &StoryChoiceMade)> {
        events
            .iter()
            .filter_map(|e| match &e.body {
                Body::StoryChoiceMade(c) => Some((&e.world, c)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn given_the_same_seed_when_simulated_twice_then_the_events_are_the_same() {
        assert_eq!(events(3, 2_000), events(3, 2_000));
        assert_ne!(events(3, 200), events(4, 200));
    }

    #[test]
    fn given_two_rates_when_simulated_then_arrivals_follow_them() {
        let all = events(5, 20_000);
        let share = choices(&all).len() as f64 / all.len() as f64;
        assert!((share - 0.75).abs() < 0.02, "choice share {share}");
        // 40 events per second: 20,000 events take about 500 s of schedule.
        let span_s = all.last().unwrap().at_ms as f64 / 1000.0;
        assert!((span_s - 500.0).abs() < 25.0, "schedule span {span_s} s");
        assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn given_schedule_time_then_ticks_advance_from_each_worlds_start_tick() {
        for event in events(6, 2_000) {
            let start = if event.world.as_str() == "frostholm" {
                500
            } else {
                0
            };
            assert_eq!(event.tick, start + event.at_ms / 1000);
        }
    }

    #[test]
    fn given_many_choices_then_a_few_players_make_most_of_them() {
        let all = events(7, 20_000);
        let mut per_player: HashMap<&str, usize> = HashMap::new();
        for (_, choice) in choices(&all) {
            *per_player.entry(&choice.player_id).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_player.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top_five: usize = counts.iter().take(5).sum();
        let total: usize = counts.iter().sum();
        assert!(
            top_five as f64 > 0.3 * total as f64,
            "the five most active of {} players made {top_five} of {total} choices",
            counts.len()
        );
    }

    #[test]
    fn given_choices_then_each_player_walks_the_story_graph() {
        let simulation = Simulation::new(&options(8)).unwrap();
        let stories: HashMap<String, StoryGraph> = simulation
            .stories()
            .iter()
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        let all = events(8, 10_000);
        let mut at: HashMap<(String, String, String), String> = HashMap::new();
        let (mut endings, mut with_context) = (0, 0);
        for (world, choice) in choices(&all) {
            let story = &stories[&choice.story_id];
            let key = (
                world.to_string(),
                choice.player_id.clone(),
                choice.story_id.clone(),
            );
            let expected = at
                .get(&key)
                .cloned()
                .unwrap_or_else(|| story.root_id().to_owned());
            assert_eq!(choice.node_id, expected);
            let next = story.next_node_id(&choice.node_id, &choice.choice_id);
            assert_eq!(
                next,
                Some((!choice.next_node_id.is_empty()).then_some(choice.next_node_id.as_str()))
            );
            if choice.next_node_id.is_empty() {
                endings += 1;
                at.remove(&key);
            } else {
                at.insert(key, choice.next_node_id.clone());
            }
            with_context += usize::from(!choice.context.is_empty());
        }
        assert!(endings > 100, "stories end ({endings})");
        assert!(with_context > 100, "some choices carry context");
    }

    #[test]
    fn given_simulated_events_then_their_envelopes_are_valid() {
        for event in events(9, 2_000) {
            let envelope = event.to_envelope();
            envelope.validate().unwrap();
            assert_eq!(envelope.world_tick, event.tick);
        }
    }

    #[test]
    fn given_bad_options_then_the_simulation_refuses_to_start() {
        let bad = [
            SimulateOptions {
                worlds: Vec::new(),
                ..options(1)
            },
            SimulateOptions {
                choices_per_second: 0.0,
                inferences_per_second: 0.0,
                ..options(1)
            },
            SimulateOptions {
                choices_per_second: f64::NAN,
                ..options(1)
            },
            SimulateOptions {
                players_per_world: 0,
                ..options(1)
            },
            SimulateOptions {
                tick_interval_ms: 0,
                ..options(1)
            },
        ];
        for options in bad {
            assert!(matches!(
                Simulation::new(&options),
                Err(SimulateError::InvalidOptions(_))
            ));
        }
    }
}
