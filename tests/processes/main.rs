//! Reliability tests that kill, pause and starve real `worldline` processes on the
//! real stack, then prove nothing was lost or applied twice:
//! - every projector's stored offsets reach the end of its topics;
//! - `worlds.records_applied` (a deliberately non-idempotent counter) equals the
//!   number of records appended for each world;
//! - every read-model table equals a from-scratch rebuild (per-table checksum).
//!
//! They are heavy, so they run one at a time.

#![allow(clippy::unwrap_used)] // a failed step should fail the test loudly

mod support;

mod clock_restart;
mod crashes;
mod database_outage;
mod dead_letters;
mod zombie;
