//! Branching stories: small graphs generated from the seed, and the players'
//! progress through them.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

/// Salt so the story graphs and the event sequence draw from different streams
/// of the same seed: a longer run never changes the stories.
const STORY_SALT: u64 = 0x5707_1e5a_17ed_0001;

const STORY_NAMES: [&str; 8] = [
    "the-drowned-bell",
    "ashes-of-emberfall",
    "the-salt-road",
    "a-crown-of-frost",
    "the-lanternmakers-debt",
    "whispers-under-the-mill",
    "the-last-ferry",
    "ironwood-oath",
];

const CHOICES: [&str; 12] = [
    "accept",
    "refuse",
    "bargain",
    "investigate",
    "flee",
    "help",
    "betray",
    "wait",
    "lie",
    "fight",
    "sneak",
    "pray",
];

/// How many stories every world offers.
pub const STORIES_PER_WORLD: usize = 4;

/// A choice offered at a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryChoice {
    /// The choice id, unique within its node.
    pub id: String,
    /// Index of the node it leads to; `None` when it ends the story.
    pub next: Option<usize>,
}

/// A node of a story: a scene with 2 to 4 choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryNode {
    /// The node id, unique within its story.
    pub id: String,
    /// The choices offered here.
    pub choices: Vec<StoryChoice>,
}

/// A story: nodes in chapters, each choice leading to a node of the next
/// chapter or ending the story. Node 0 is where every player starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoryGraph {
    /// The story id.
    pub id: String,
    /// The nodes; node 0 is the root.
    pub nodes: Vec<StoryNode>,
}

impl StoryGraph {
    /// The id of the node every player starts at.
    pub fn root_id(&self) -> &str {
        &self.nodes[0].id
    }

    /// The node with id `node_id`.
    pub fn node(&self, node_id: &str) -> Option<&StoryNode> {
        self.nodes.iter().find(|node| node.id == node_id)
    }

    /// Where `choice_id` at `node_id` leads: `Some(None)` when it ends the
    /// story, `None` when the graph has no such choice.
    pub fn next_node_id(&self, node_id: &str, choice_id: &str) -> Option<Option<&str>> {
        let choice = self
            .node(node_id)?
            .choices
            .iter()
            .find(|c| c.id == choice_id)?;
        Some(choice.next.map(|index| self.nodes[index].id.as_str()))
    }
}

/// The stories of a simulation with `seed`: the same seed, the same stories.
pub fn story_graphs(seed: u64) -> Vec<StoryGraph> {
    let mut rng = StdRng::seed_from_u64(seed ^ STORY_SALT);
    let mut names = STORY_NAMES;
    names.shuffle(&mut rng);
    names
        .iter()
        .take(STORIES_PER_WORLD)
        .map(|name| generate_story(&mut rng, name))
        .collect()
}

fn generate_story(rng: &mut StdRng, name: &str) -> StoryGraph {
    let chapters: usize = rng.random_range(4..=6);
    // Node indices of each chapter; chapter 0 is the root alone.
    let mut chapter_nodes: Vec<Vec<usize>> = Vec::with_capacity(chapters);
    let mut ids = Vec::new();
    for chapter in 0..chapters {
        let width = if chapter == 0 {
            1
        } else {
            rng.random_range(2..=3)
        };
        let first = ids.len();
        for slot in 0..width {
            ids.push(format!("ch{chapter}-{}", char::from(b'a' + slot as u8)));
        }
        chapter_nodes.push((first..first + width).collect());
    }
    let mut nodes = Vec::with_capacity(ids.len());
    for (chapter, members) in chapter_nodes.iter().enumerate() {
        for &index in members {
            let count = rng.random_range(2..=4);
            let choices = CHOICES
                .choose_multiple(rng, count)
                .map(|choice| {
                    let last_chapter = chapter + 1 == chapters;
                    // Some choices end a story early (the hero dies, leaves, wins).
                    let ends_early = chapter >= 2 && rng.random_bool(0.15);
                    let next = if last_chapter || ends_early {
                        None
                    } else {
                        chapter_nodes[chapter + 1].choose(rng).copied()
                    };
                    StoryChoice {
                        id: (*choice).to_owned(),
                        next,
                    }
                })
                .collect();
            nodes.push(StoryNode {
                id: ids[index].clone(),
                choices,
            });
        }
    }
    StoryGraph {
        id: name.to_owned(),
        nodes,
    }
}

/// Where each player stands in each story: (world, player, story) → node index.
/// A player absent from the map for a story starts it at the root.
#[derive(Debug, Default)]
pub struct Progress {
    at: HashMap<(usize, usize, usize), usize>,
}

impl Progress {
    /// The node `player` of `world` is at in `story` (the root if not started).
    pub fn node(&self, world: usize, player: usize, story: usize) -> usize {
        self.at.get(&(world, player, story)).copied().unwrap_or(0)
    }

    /// Stories `player` of `world` has started and not finished.
    pub fn in_progress(&self, world: usize, player: usize, stories: usize) -> Vec<usize> {
        (0..stories)
            .filter(|story| self.at.contains_key(&(world, player, *story)))
            .collect()
    }

    /// Moves the player on; `None` finishes the story (the next visit restarts it).
    pub fn advance(&mut self, world: usize, player: usize, story: usize, next: Option<usize>) {
        match next {
            Some(node) => {
                self.at.insert((world, player, story), node);
            }
            None => {
                self.at.remove(&(world, player, story));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_seed_when_stories_are_generated_twice_then_they_are_the_same() {
        assert_eq!(story_graphs(5), story_graphs(5));
        assert_ne!(story_graphs(5), story_graphs(6));
    }

    #[test]
    fn given_generated_stories_then_every_node_offers_two_to_four_choices_and_every_path_ends() {
        for seed in 0..20 {
            for story in story_graphs(seed) {
                let mut endings = 0;
                for (index, node) in story.nodes.iter().enumerate() {
                    assert!((2..=4).contains(&node.choices.len()), "{}", node.id);
                    for choice in &node.choices {
                        match choice.next {
                            // Choices only lead forward, so every path ends.
                            Some(next) => assert!(next > index),
                            None => endings += 1,
                        }
                    }
                }
                assert!(endings >= 2, "{} has endings", story.id);
                assert_eq!(story.root_id(), "ch0-a");
            }
        }
    }

    #[test]
    fn given_a_choice_when_looked_up_then_the_graph_tells_where_it_leads() {
        let story = &story_graphs(1)[0];
        let root = &story.nodes[0];
        let choice = &root.choices[0];
        let expected = choice.next.map(|i| story.nodes[i].id.as_str());
        assert_eq!(
            story.next_node_id(root.id.as_str(), &choice.id),
            Some(expected)
        );
        assert_eq!(story.next_node_id("nowhere", &choice.id), None);
    }

    #[test]
    fn given_a_player_when_a_story_ends_then_the_next_visit_starts_at_the_root() {
        let mut progress = Progress::default();
        assert_eq!(progress.node(0, 3, 1), 0);
        progress.advance(0, 3, 1, Some(4));
        assert_eq!(progress.node(0, 3, 1), 4);
        assert_eq!(progress.in_progress(0, 3, 4), vec![1]);
        progress.advance(0, 3, 1, None);
        assert_eq!(progress.node(0, 3, 1), 0);
        assert!(progress.in_progress(0, 3, 4).is_empty());
    }
}
