//! The `worldline` command: wires configuration, roles and shutdown together.
//!
//! - [`cli`]: argument parsing and dispatch; the only place that uses `anyhow`.
//! - [`memory`]: glibc allocator settings that keep long-running roles small.
//! - [`roles`]: each role as a value built from [`worldline_ops::Settings`] and run
//!   until a shutdown token fires.

pub mod cli;
pub mod memory;
pub mod roles;
