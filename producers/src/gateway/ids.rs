//! Event ids for ingested events, chosen so a retried request is harmless.
//!
//! In order of preference:
//! 1. the client's own `event_id`, kept as sent;
//! 2. with an `Idempotency-Key` header, a UUIDv5 derived from the world, the key
//!    and the event's position in the request, so the same request sent twice
//!    appends events with the same ids and projectors apply them once;
//! 3. otherwise a fresh UUIDv7.
//!
//! The derivation is public so clients in any language can predict their ids:
//! `uuid_v5(namespace, "<world>/<key>/<index>")` where
//! `namespace = uuid_v5(NAMESPACE_URL, "https://worldline.dev/ingest/idempotency-key")`
//! and `<index>` is the event's 0-based position in decimal. A world id cannot
//! contain `/` and the index is digits only, so distinct inputs never share a name.

use axum::http::HeaderValue;
use uuid::Uuid;
use worldline_schemas::WorldId;

use super::problem::{ProblemKind, Violation};

/// The header that makes a request's derived ids repeatable.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest accepted `Idempotency-Key`, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A checked `Idempotency-Key` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks the header: 1 to 255 visible ASCII characters.
    pub fn parse(value: Option<&HeaderValue>) -> Result<Option<IdempotencyKey>, Violation> {
        let Some(value) = value else {
            return Ok(None);
        };
        let bad = |why: &str| {
            Violation::request(
                ProblemKind::BadIdempotencyKey,
                format!("the Idempotency-Key header {why}"),
            )
        };
        let text = value
            .to_str()
            .map_err(|_| bad("must be visible ASCII characters"))?;
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if text.len() > MAX_KEY_LEN {
            return Err(bad(&format!("is longer than {MAX_KEY_LEN} characters")));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(bad("must be visible ASCII characters"));
        }
        Ok(Some(IdempotencyKey(text.to_owned())))
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The namespace of derived event ids (see the module documentation).
pub fn idempotency_namespace() -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        b"https://worldline.dev/ingest/idempotency-key",
    )
}

/// The id of the event at `index` of a request to `world` carrying `key`.
pub fn derived_event_id(world: &WorldId, key: &IdempotencyKey, index: usize) -> Uuid {
    let name = format!("{}/{}/{index}", world.as_str(), key.as_str());
    Uuid::new_v5(&idempotency_namespace(), name.as_bytes())
}

/// The id an event gets when the client sent none.
pub fn assigned_event_id(world: &WorldId, key: Option<&IdempotencyKey>, index: usize) -> Uuid {
    match key {
        Some(key) => derived_event_id(world, key, index),
        None => Uuid::now_v7(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(id: &str) -> WorldId {
        WorldId::parse(id).unwrap()
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(Some(&HeaderValue::from_str(text).unwrap()))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn given_the_same_world_key_and_index_then_the_id_is_the_same() {
        let first = assigned_event_id(&world("emberfall"), Some(&key("req-1")), 3);
        let again = assigned_event_id(&world("emberfall"), Some(&key("req-1")), 3);
        assert_eq!(first, again);
        assert_eq!(first.get_version_num(), 5);
    }

    #[test]
    fn given_a_different_world_key_or_index_then_the_id_differs() {
        let base = derived_event_id(&world("emberfall"), &key("req-1"), 3);
        assert_ne!(
            base,
            derived_event_id(&world("frostholm"), &key("req-1"), 3)
        );
        assert_ne!(
            base,
            derived_event_id(&world("emberfall"), &key("req-2"), 3)
        );
        assert_ne!(
            base,
            derived_event_id(&world("emberfall"), &key("req-1"), 4)
        );
    }

    #[test]
    fn given_the_documented_recipe_then_the_id_is_reproducible_by_hand() {
        let namespace = Uuid::new_v5(
            &Uuid::NAMESPACE_URL,
            b"https://worldline.dev/ingest/idempotency-key",
        );
        let by_hand = Uuid::new_v5(&namespace, b"emberfall/req-1/0");
        assert_eq!(
            derived_event_id(&world("emberfall"), &key("req-1"), 0),
            by_hand
        );
    }

    #[test]
    fn given_no_key_then_ids_are_fresh_v7() {
        let a = assigned_event_id(&world("w"), None, 0);
        let b = assigned_event_id(&world("w"), None, 0);
        assert_ne!(a, b);
        assert_eq!(a.get_version_num(), 7);
    }

    #[test]
    fn given_unusable_keys_then_they_are_refused() {
        assert_eq!(IdempotencyKey::parse(None), Ok(None));
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in ["", long.as_str(), "tab\there"] {
            let value = HeaderValue::from_str(bad).unwrap();
            let err = IdempotencyKey::parse(Some(&value)).unwrap_err();
            assert_eq!(err.kind, ProblemKind::BadIdempotencyKey, "{bad:?}");
        }
        let utf8 = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert!(IdempotencyKey::parse(Some(&utf8)).is_err());
    }
}
