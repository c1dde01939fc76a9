//! Operating worldline: what every role needs to be run by someone.
//!
//! - [`config`]: layered typed settings (defaults → TOML file → `WORLDLINE__…` env).
//! - [`kafka`]: the librdkafka settings every client shares (cluster, TLS/SASL).
//! - [`topics`]: the event topic definitions, idempotent provisioning, and the
//!   start-up check that refuses topics which would lose history.
//! - [`health`]: `/livez`, `/readyz`, `/metrics`.
//! - [`telemetry`]: logging set-up.
//! - [`shutdown`]: SIGINT/SIGTERM as a cancellation token.
//! - [`inspect`]: event topics dumped or tailed as JSON lines.
//! - [`auth`]: bearer tokens, scopes, and the `require(scope)` route layer.
//! - [`consistency`]: consistency tokens for read-your-writes.

pub mod archive;
pub mod auth;
pub mod config;
pub mod consistency;
pub mod health;
pub mod inspect;
pub mod kafka;
pub mod shutdown;
pub mod telemetry;
pub mod topics;

pub use config::Settings;
pub use health::Health;
