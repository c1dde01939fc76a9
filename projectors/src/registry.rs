//! The explicit list of projectors. Adding a read model is one line here plus its
//! own module and migrations; no other projector changes.

use std::sync::Arc;

use crate::projector::Projector;
use crate::read_models::clock::ClockProjector;
use crate::read_models::inference::InferenceProjector;
use crate::read_models::player_activity::PlayerActivityProjector;
use crate::read_models::story::StoryProjector;
use crate::read_models::weather::WeatherProjector;
use crate::read_models::worlds::WorldsProjector;

/// Every projector this build knows, by name.
pub fn all() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(WorldsProjector),
        Arc::new(ClockProjector),
        Arc::new(WeatherProjector),
        Arc::new(StoryProjector),
        Arc::new(InferenceProjector),
        Arc::new(PlayerActivityProjector),
    ]
}

/// The projector with this name.
pub fn by_name(name: &str) -> Option<Arc<dyn Projector>> {
    all().into_iter().find(|p| p.name() == name)
}
