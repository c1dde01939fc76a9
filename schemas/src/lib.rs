//! The worldline event contract.
//!
//! - [`pb`]: the prost types generated from `proto/worldline/v1/*.proto` (package `worldline.v1`).
//! - [`family`]: event families, their topics and CloudEvents type names.
//! - [`envelope`]: building, encoding and validating-on-decode of [`pb::Envelope`].
//! - [`partitioner`]: the Java client's murmur2 key → partition rule every producer follows.
//! - [`upcast`]: older shapes of events turned into today's on decode.
//! - [`world_id`]: the one rule for what a world id may be.
//! - [`json`]: events rendered as JSON for people reading the log.
//!
//! Every other crate speaks of events only through this one: a payload that does
//! not decode and validate here is a dead letter, never a guess.

pub mod envelope;
pub mod family;
pub mod json;
pub mod partitioner;
pub mod upcast;
pub mod world_id;

/// Types generated from the `.proto` files. Field-level documentation lives in the
/// `.proto` files, which are the published contract for other languages.
#[allow(clippy::all, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/worldline.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the whole contract, for reflection-based tools.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/worldline_v1_descriptor.bin"));

pub use envelope::{DecodeError, EnvelopeExt, decode_envelope, new_event_id};
pub use family::Family;
pub use world_id::{WorldId, WorldIdError};
