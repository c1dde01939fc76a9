//! The write side of worldline.
//!
//! - [`appender`]: the one append path (idempotent, `acks=all`, murmur2 keys,
//!   CloudEvents headers) used by every producer and the HTTP gateway.
//! - [`partitioner`]: Java-compatible key → partition, for tools that must find a
//!   world's partition without writing.
//! - [`clock`]: the game clock producer, resuming from the log.
//! - [`weather`]: the weather producer, a pure seeded model driven by clock ticks.
//! - [`simulate`]: the world simulator (story choices, model inferences) for demos and load.
//! - [`gateway`]: the HTTP ingest gateway, `POST /v1/worlds/{world}/events`.

pub mod appender;
pub mod clock;
pub mod gateway;
/// Re-exported from the contract: every producer must place keys the same way.
pub use worldline_schemas::partitioner;
pub mod simulate;
pub mod weather;

pub use appender::{AppendError, Appended, Appender, AppenderOptions};
