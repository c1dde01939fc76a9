//! The world simulator on real Kafka: counts, validity, story paths that follow
//! the graphs, and the same sequence from the same seed.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

use std::collections::{BTreeMap, HashMap};

use tokio_util::sync::CancellationToken;
use worldline_producers::simulate::{
    SimulateOptions, SimulatedEvent, Simulation, SimulationStats, StoryGraph, run_simulation,
    story_graphs,
};
use worldline_producers::{Appender, AppenderOptions};
use worldline_schemas::pb::Envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::{EnvelopeExt, Family, WorldId, decode_envelope};
use worldline_tests::TestEnv;

const SEED: u64 = 42;

fn options(max_events: u64, paced: bool) -> SimulateOptions {
    SimulateOptions {
        worlds: ["emberfall", "frostholm", "saltmarsh"]
            .iter()
            .map(|w| WorldId::parse(w).unwrap())
            .collect(),
        players_per_world: 25,
        npcs_per_world: 8,
        choices_per_second: 300.0,
        inferences_per_second: 100.0,
        seed: SEED,
        tick_interval_ms: 100,
        start_ticks: HashMap::from([(WorldId::parse("frostholm").unwrap(), 1_000)]),
        max_events: Some(max_events),
        paced,
        batch_max_events: 100,
    }
}

async fn simulate(env: &TestEnv, options: &SimulateOptions) -> SimulationStats {
    let appender = Appender::new(
        &env.settings.kafka,
        AppenderOptions {
            topic_prefix: env.settings.topics.prefix.clone(),
            source: "simulator".to_owned(),
            ..AppenderOptions::default()
        },
    )
    .unwrap();
    run_simulation(&appender, options, CancellationToken::new())
        .await
        .unwrap()
}

/// Every record of `family` decoded (and so validated), per world in log order.
fn events_by_world(env: &TestEnv, family: Family) -> BTreeMap<String, Vec<Envelope>> {
    let mut by_world: BTreeMap<String, Vec<Envelope>> = BTreeMap::new();
    for record in env.read_topic(&env.topic(family)) {
        let envelope = decode_envelope(record.payload.as_deref().unwrap()).unwrap();
        assert_eq!(record.key.as_deref(), Some(envelope.world_id.as_bytes()));
        assert_eq!(envelope.family(), Some(family));
        by_world
            .entry(envelope.world_id.clone())
            .or_default()
            .push(envelope);
    }
    by_world
}

fn count(by_world: &BTreeMap<String, Vec<Envelope>>) -> u64 {
    by_world.values().map(|v| v.len() as u64).sum()
}

/// (tick, body) per world: what a seed must reproduce.
fn bodies(by_world: &BTreeMap<String, Vec<Envelope>>) -> BTreeMap<String, Vec<(u64, Body)>> {
    by_world
        .iter()
        .map(|(world, events)| {
            let bodies = events
                .iter()
                .map(|e| (e.world_tick, e.body.clone().unwrap()))
                .collect();
            (world.clone(), bodies)
        })
        .collect()
}

/// Each player's choices in a story follow the graph: every choice is made at
/// the node the previous one led to (the root after a finished story) and
/// leads where the graph says.
fn assert_players_walk_the_graphs(stories: &BTreeMap<String, Vec<Envelope>>) {
    let graphs: HashMap<String, StoryGraph> = story_graphs(SEED)
        .into_iter()
        .map(|g| (g.id.clone(), g))
        .collect();
    let mut continued = 0;
    for events in stories.values() {
        let mut at: HashMap<(&str, &str), String> = HashMap::new();
        for event in events {
            let Some(Body::StoryChoiceMade(choice)) = &event.body else {
                panic!("not a story choice");
            };
            let graph = &graphs[&choice.story_id];
            let key = (choice.player_id.as_str(), choice.story_id.as_str());
            let expected = match at.get(&key) {
                Some(node) => {
                    continued += 1;
                    node.clone()
                }
                None => graph.root_id().to_owned(),
            };
            assert_eq!(
                choice.node_id, expected,
                "{} in {} chose at the node the last choice led to",
                choice.player_id, choice.story_id
            );
            let leads_to =
                (!choice.next_node_id.is_empty()).then_some(choice.next_node_id.as_str());
            assert_eq!(
                graph.next_node_id(&choice.node_id, &choice.choice_id),
                Some(leads_to),
                "the choice leads where the graph says"
            );
            match leads_to {
                Some(next) => at.insert(key, next.to_owned()),
                None => at.remove(&key),
            };
        }
    }
    assert!(
        continued > 50,
        "players carried stories on ({continued} times)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_max_events_when_simulated_then_every_event_is_in_the_log_valid_and_on_the_story_graph()
 {
    let env = TestEnv::new(3).await;
    let stats = simulate(&env, &options(1_200, false)).await;
    assert_eq!(stats.events(), 1_200);
    assert!(stats.story_choices > 0 && stats.inferences > 0);

    let stories = events_by_world(&env, Family::Story);
    let inferences = events_by_world(&env, Family::Inference);
    assert_eq!(count(&stories), stats.story_choices);
    assert_eq!(count(&inferences), stats.inferences);
    assert_eq!(stories.len(), 3, "every world gets choices");
    assert_players_walk_the_graphs(&stories);
    for event in stories.values().chain(inferences.values()).flatten() {
        let minimum = if event.world_id == "frostholm" {
            1_000
        } else {
            0
        };
        assert!(
            event.world_tick >= minimum,
            "ticks start at the world's start tick"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_same_seed_when_simulated_twice_then_the_same_sequence_of_events_is_appended() {
    let first = TestEnv::new(3).await;
    let second = TestEnv::new(2).await;
    simulate(&first, &options(600, false)).await;
    simulate(&second, &options(600, false)).await;
    for family in [Family::Story, Family::Inference] {
        let (a, b) = (
            bodies(&events_by_world(&first, family)),
            bodies(&events_by_world(&second, family)),
        );
        assert!(!a.is_empty());
        assert_eq!(a, b, "{family}: same ticks and bodies per world, in order");
    }
    first.cleanup().await;
    second.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_paced_simulation_then_it_appends_the_seeds_events_in_schedule_order() {
    let env = TestEnv::new(3).await;
    let options = options(120, true);
    let stats = simulate(&env, &options).await;
    assert_eq!(stats.events(), 120);

    // The pure simulation with the same options says what the log must hold.
    let mut simulation = Simulation::new(&options).unwrap();
    let planned: Vec<SimulatedEvent> = (0..120).map(|_| simulation.next_event()).collect();
    let mut expected: BTreeMap<String, Vec<(u64, Body)>> = BTreeMap::new();
    for event in &planned {
        expected
            .entry(event.world.to_string())
            .or_default()
            .push((event.tick, event.body.clone()));
    }
    let mut logged = bodies(&events_by_world(&env, Family::Story));
    for (world, events) in bodies(&events_by_world(&env, Family::Inference)) {
        logged.entry(world).or_default().extend(events);
    }
    // The log keeps order per world within a family; compare each family's subsequence.
    for (world, expected_events) in &expected {
        let logged_events = &logged[world];
        for story in [true, false] {
            let pick = |events: &[(u64, Body)]| -> Vec<(u64, Body)> {
                events
                    .iter()
                    .filter(|(_, b)| matches!(b, Body::StoryChoiceMade(_)) == story)
                    .cloned()
                    .collect()
            };
            assert_eq!(pick(logged_events), pick(expected_events), "world {world}");
        }
    }
    env.cleanup().await;
}
