//! The read models, one module (and one Postgres schema, one migrations folder) each.

pub mod clock;
pub mod copy;
pub mod fresh;
pub mod inference;
pub mod names;
pub mod player_activity;
pub mod story;
pub mod weather;
pub mod worlds;
