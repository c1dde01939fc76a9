//! The `worldline` command: wires configuration, roles and shutdown together.
//!
//! - [`cli`]: argument parsing and dispatch; the only place that uses `anyhow`.
//! - [`roles`]: each role as a value built from [`worldline_ops::Settings`] and run
//!   until a shutdown token fires.

pub mod cli;
pub mod roles;
