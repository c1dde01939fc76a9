//! A mixed, realistic workload of every family, for reliability tests.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use worldline_schemas::WorldId;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{
    ClockTicked, Envelope, InferenceOutcome, InferencePurpose, InferenceRecorded, Season,
    StoryChoiceMade, WeatherChanged, WeatherCondition, WorldCreated,
};

/// Generates events for `worlds` worlds, continuing each world's ticks across
/// calls so the stream reads like a live world.
#[derive(Debug)]
pub struct Workload {
    rng: StdRng,
    worlds: Vec<(WorldId, u64, i32)>,
    /// Every envelope generated so far would be appended once; these are redeliveries.
    pub duplicates: u64,
    last: Option<Envelope>,
}

impl Workload {
    /// A workload over `worlds` worlds named `w-000`, `w-001`, …
    pub fn new(worlds: usize, seed: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            worlds: (0..worlds)
                .map(|i| {
                    (
                        WorldId::parse(&format!("w-{i:03}")).expect("valid world id"),
                        0,
                        0,
                    )
                })
                .collect(),
            duplicates: 0,
            last: None,
        }
    }

    /// `WorldCreated` for every world.
    pub fn creations(&self) -> Vec<Envelope> {
        self.worlds
            .iter()
            .map(|(world, _, _)| {
                new_envelope(
                    world,
                    0,
                    "test",
                    Body::WorldCreated(WorldCreated {
                        display_name: world.to_string(),
                        seed: 1,
                        time_scale: 60,
                        tick_interval_ms: 1000,
                        regions: vec!["north".to_owned(), "coast".to_owned()],
                    }),
                )
            })
            .collect()
    }

    /// The next `n` events: mostly ticks, then weather, story and inference, and
    /// about one in fifty a redelivery of an earlier event (same id).
    pub fn next_batch(&mut self, n: usize) -> Vec<Envelope> {
        (0..n).map(|_| self.next_event()).collect()
    }

    fn next_event(&mut self) -> Envelope {
        if let Some(last) = &self.last
            && self.rng.random_ratio(1, 50)
        {
            self.duplicates += 1;
            return last.clone();
        }
        let index = self.rng.random_range(0..self.worlds.len());
        let roll = self.rng.random_range(0..100);
        let (world, tick, condition) = &mut self.worlds[index];
        let envelope = match roll {
            0..=49 => {
                *tick += 1;
                new_envelope(
                    world,
                    *tick,
                    "clock",
                    Body::ClockTicked(ClockTicked {
                        game_time_s: *tick * 60,
                        day: u32::try_from(*tick / 1440).unwrap_or(0),
                        season: Season::Spring as i32,
                        time_scale: 60,
                    }),
                )
            }
            50..=64 => {
                let previous = *condition;
                *condition = previous % 6 + 1;
                new_envelope(
                    world,
                    *tick,
                    "weather",
                    Body::WeatherChanged(WeatherChanged {
                        region: if roll % 2 == 0 { "north" } else { "coast" }.to_owned(),
                        condition: *condition,
                        temperature_dc: 100 + roll,
                        wind_dmps: 30,
                        precipitation_dmmph: 0,
                        previous_condition: previous.clamp(0, WeatherCondition::Snow as i32),
                        ..Default::default()
                    }),
                )
            }
            65..=84 => {
                let player = self.rng.random_range(0..20);
                let node = self.rng.random_range(0..5);
                new_envelope(
                    world,
                    *tick,
                    "game-server",
                    Body::StoryChoiceMade(StoryChoiceMade {
                        player_id: format!("player-{player}"),
                        story_id: "caravan".to_owned(),
                        node_id: format!("n{node}"),
                        choice_id: format!("c{}", roll % 3),
                        next_node_id: format!("n{}", node + 1),
                        context: Default::default(),
                    }),
                )
            }
            _ => new_envelope(
                world,
                *tick,
                "npc-runtime",
                Body::InferenceRecorded(InferenceRecorded {
                    model_id: "npc-chat".to_owned(),
                    model_version: "1".to_owned(),
                    purpose: InferencePurpose::NpcDialogue as i32,
                    prompt_tokens: 200 + roll as u32,
                    completion_tokens: 50,
                    latency_ms: 20 * roll as u32,
                    cost_micro_usd: 700,
                    outcome: InferenceOutcome::Ok as i32,
                    npc_id: "smith".to_owned(),
                    input_hash: format!("{roll:x}"),
                }),
            ),
        };
        self.last = Some(envelope.clone());
        envelope
    }
}
