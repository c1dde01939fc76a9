//! Event families: one Kafka topic each, keyed by world id.

use std::fmt;
use std::str::FromStr;

use crate::pb::envelope::Body;

/// A family of events. Each family has its own topic, `worldline.<family>.v1`,
/// so a projector subscribes only to what it reads and each world's events keep
/// their order within the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// World lifecycle: created, paused, resumed.
    World,
    /// Clock ticks.
    Clock,
    /// Weather changes per region.
    Weather,
    /// Players' story choices.
    Story,
    /// Model inferences made for the world.
    Inference,
}

impl Family {
    /// Every family, in a stable order.
    pub const ALL: [Family; 5] = [
        Family::World,
        Family::Clock,
        Family::Weather,
        Family::Story,
        Family::Inference,
    ];

    /// Where the family stands in [`Family::ALL`]: an index for per-family
    /// arrays (counts, topic names) without a search or a map.
    pub fn index(self) -> usize {
        match self {
            Family::World => 0,
            Family::Clock => 1,
            Family::Weather => 2,
            Family::Story => 3,
            Family::Inference => 4,
        }
    }

    /// The short name used in topic names, metrics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::World => "world",
            Family::Clock => "clock",
            Family::Weather => "weather",
            Family::Story => "story",
            Family::Inference => "inference",
        }
    }

    /// The family's topic. `prefix` lets tests and shared clusters keep their own
    /// topics apart; production uses the empty prefix.
    pub fn topic(self, prefix: &str) -> String {
        format!("{prefix}worldline.{}.v1", self.as_str())
    }

    /// The family whose topic this is, for the given prefix.
    pub fn from_topic(topic: &str, prefix: &str) -> Option<Family> {
        let name = topic
            .strip_prefix(prefix)?
            .strip_prefix("worldline.")?
            .strip_suffix(".v1")?;
        name.parse().ok()
    }

    /// The family a body belongs to: the topic it must be written to.
    pub fn of(body: &Body) -> Family {
        match body {
            Body::WorldCreated(_) | Body::WorldPaused(_) | Body::WorldResumed(_) => Family::World,
            Body::ClockTicked(_) => Family::Clock,
            Body::WeatherChanged(_) => Family::Weather,
            Body::StoryChoiceMade(_) => Family::Story,
            Body::InferenceRecorded(_) => Family::Inference,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A family name that is not one of [`Family::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown event family {0:?} (expected one of world, clock, weather, story, inference)")]
pub struct UnknownFamily(String);

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Family::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownFamily(s.to_owned()))
    }
}

/// The fully qualified protobuf name of a body, used as the CloudEvents `ce_type`.
pub fn event_type(body: &Body) -> &'static str {
    match body {
        Body::WorldCreated(_) => "worldline.v1.WorldCreated",
        Body::WorldPaused(_) => "worldline.v1.WorldPaused",
        Body::WorldResumed(_) => "worldline.v1.WorldResumed",
        Body::ClockTicked(_) => "worldline.v1.ClockTicked",
        Body::WeatherChanged(_) => "worldline.v1.WeatherChanged",
        Body::StoryChoiceMade(_) => "worldline.v1.StoryChoiceMade",
        Body::InferenceRecorded(_) => "worldline.v1.InferenceRecorded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_round_trip_for_every_family_and_prefix() {
        for family in Family::ALL {
            for prefix in ["", "t-1234."] {
                let topic = family.topic(prefix);
                assert_eq!(Family::from_topic(&topic, prefix), Some(family));
            }
        }
        assert_eq!(Family::Clock.topic(""), "worldline.clock.v1");
        assert_eq!(Family::from_topic("worldline.clock.v2", ""), None);
        assert_eq!(Family::from_topic("other.worldline.clock.v1", ""), None);
    }

    #[test]
    fn every_family_stands_at_its_index_in_all() {
        for (position, family) in Family::ALL.into_iter().enumerate() {
            assert_eq!(family.index(), position, "{family}");
        }
    }

    #[test]
    fn unknown_family_names_are_refused() {
        assert!("clocks".parse::<Family>().is_err());
        assert_eq!("weather".parse::<Family>().ok(), Some(Family::Weather));
    }
}
