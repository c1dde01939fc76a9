//! Consistency tokens: read-your-writes across the append path and the query API.
//!
//! An append answers with a token naming, for every topic-partition it wrote to,
//! the offset of the last record it appended there. A query carrying the token
//! waits (bounded) until the projectors it reads from have passed those offsets,
//! i.e. until `offset + 1 <= next_offset` stored with the read model, so the
//! client sees its own writes.
//!
//! The token is opaque to clients but deliberately simple: `wl1.` followed by the
//! unpadded base64url encoding of a compact JSON document
//! `{"p":[["<topic>",<partition>,<offset>],...]}`. The `wl1` prefix versions the
//! format; a later format gets a new prefix and [`ConsistencyToken::decode`]
//! refuses prefixes it does not know rather than guessing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The PostgreSQL channel every projector batch notifies when it commits,
/// with its schema as the payload: what token waits, the event stream and
/// the benchmarks' observer listen to instead of polling stored offsets.
pub const PROGRESS_CHANNEL: &str = "worldline_progress";

/// Version prefix of the current token format.
const PREFIX_V1: &str = "wl1.";

/// Longest token [`ConsistencyToken::decode`] looks at. Tokens arrive in query
/// strings and headers; a bound keeps a hostile one from costing real work.
/// A batch touching every partition of every family stays far below it.
pub const MAX_ENCODED_LEN: usize = 16 * 1024;

/// Positions in the log a reader must have passed: per topic-partition, the
/// offset of the last appended record. Kept sorted by (topic, partition), one
/// entry per topic-partition, so equal tokens encode identically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsistencyToken {
    positions: Vec<(String, i32, i64)>,
}

/// Why a string is not a consistency token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("consistency token is longer than {MAX_ENCODED_LEN} characters")]
    TooLong,
    #[error("consistency token has an unknown version (expected it to start with \"wl1.\")")]
    UnknownVersion,
    #[error("consistency token is not valid base64url")]
    NotBase64,
    #[error("consistency token is corrupt: {0}")]
    Corrupt(String),
}

/// The JSON document inside a v1 token; short keys keep tokens short.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireV1 {
    p: Vec<(String, i32, i64)>,
}

impl ConsistencyToken {
    /// A token covering `positions` (topic, partition, offset of an appended
    /// record). Several positions on one topic-partition keep the highest offset.
    pub fn from_positions(positions: impl IntoIterator<Item = (String, i32, i64)>) -> Self {
        let mut highest: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for (topic, partition, offset) in positions {
            highest
                .entry((topic, partition))
                .and_modify(|known| *known = (*known).max(offset))
                .or_insert(offset);
        }
        ConsistencyToken {
            positions: highest
                .into_iter()
                .map(|((topic, partition), offset)| (topic, partition, offset))
                .collect(),
        }
    }

    /// The positions, sorted by (topic, partition), one per topic-partition.
    pub fn positions(&self) -> &[(String, i32, i64)] {
        &self.positions
    }

    /// Whether the token demands nothing (no position at all).
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// A token covering both: what a client holding two tokens must wait for to
    /// see both writes.
    pub fn merge(&self, other: &ConsistencyToken) -> ConsistencyToken {
        ConsistencyToken::from_positions(
            self.positions.iter().chain(other.positions.iter()).cloned(),
        )
    }

    /// Whether a reader has passed every position: `next_offset` gives, per
    /// topic-partition, the next offset the reader will consume (`None` when it
    /// has consumed nothing there yet).
    pub fn is_reached_by(&self, next_offset: impl Fn(&str, i32) -> Option<i64>) -> bool {
        self.positions.iter().all(|(topic, partition, offset)| {
            // `offset + 1 <= next`: the record at `offset` has been applied.
            next_offset(topic, *partition).is_some_and(|next| *offset < next)
        })
    }

    /// The opaque, URL-safe text form.
    pub fn encode(&self) -> String {
        let wire = WireV1 {
            p: self.positions.clone(),
        };
        // Serialising plain strings and integers cannot fail; the fallback only
        // keeps this function total.
        let json = serde_json::to_vec(&wire).unwrap_or_else(|_| b"{\"p\":[]}".to_vec());
        format!("{PREFIX_V1}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses a token made by [`ConsistencyToken::encode`].
    pub fn decode(text: &str) -> Result<ConsistencyToken, TokenError> {
        if text.len() > MAX_ENCODED_LEN {
            return Err(TokenError::TooLong);
        }
        let payload = text
            .strip_prefix(PREFIX_V1)
            .ok_or(TokenError::UnknownVersion)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::NotBase64)?;
        let wire: WireV1 =
            serde_json::from_slice(&json).map_err(|e| TokenError::Corrupt(e.to_string()))?;
        if let Some((topic, partition, offset)) = wire
            .p
            .iter()
            .find(|(topic, partition, offset)| topic.is_empty() || *partition < 0 || *offset < 0)
        {
            return Err(TokenError::Corrupt(format!(
                "impossible position {topic:?}/{partition}@{offset}"
            )));
        }
        Ok(ConsistencyToken::from_positions(wire.p))
    }
}

impl fmt::Display for ConsistencyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConsistencyToken::decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(positions: &[(&str, i32, i64)]) -> ConsistencyToken {
        ConsistencyToken::from_positions(
            positions
                .iter()
                .map(|(topic, partition, offset)| ((*topic).to_owned(), *partition, *offset)),
        )
    }

    #[test]
    fn given_a_token_when_encoded_and_decoded_then_it_is_unchanged() {
        let original = token(&[
            ("worldline.weather.v1", 3, 41),
            ("worldline.story.v1", 0, 7),
        ]);
        let text = original.encode();
        assert!(text.starts_with("wl1."), "{text}");
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
            "URL-safe without escaping: {text}"
        );
        assert_eq!(ConsistencyToken::decode(&text), Ok(original.clone()));
        assert_eq!(text.parse::<ConsistencyToken>(), Ok(original));
    }

    #[test]
    fn given_several_offsets_on_one_partition_then_the_highest_is_kept() {
        let t = token(&[("a", 0, 5), ("a", 0, 9), ("a", 1, 2), ("a", 0, 7)]);
        assert_eq!(
            t.positions(),
            &[("a".to_owned(), 0, 9), ("a".to_owned(), 1, 2)]
        );
    }

    #[test]
    fn given_two_tokens_when_merged_then_each_partition_keeps_its_highest_offset() {
        let left = token(&[("a", 0, 5), ("b", 1, 1)]);
        let right = token(&[("a", 0, 3), ("c", 2, 8)]);
        assert_eq!(
            left.merge(&right),
            token(&[("a", 0, 5), ("b", 1, 1), ("c", 2, 8)])
        );
        assert_eq!(left.merge(&ConsistencyToken::default()), left);
    }

    #[test]
    fn given_equal_positions_in_any_order_then_the_encodings_are_equal() {
        assert_eq!(
            token(&[("b", 0, 1), ("a", 0, 1)]).encode(),
            token(&[("a", 0, 1), ("b", 0, 1)]).encode()
        );
    }

    #[test]
    fn given_a_reader_then_the_token_is_reached_only_past_every_offset() {
        let t = token(&[("a", 0, 5), ("a", 1, 0)]);
        let at = |zero: Option<i64>, one: Option<i64>| {
            move |_: &str, partition: i32| if partition == 0 { zero } else { one }
        };
        assert!(
            t.is_reached_by(at(Some(6), Some(1))),
            "next offset = offset + 1"
        );
        assert!(
            !t.is_reached_by(at(Some(5), Some(1))),
            "record 5 not yet applied"
        );
        assert!(
            !t.is_reached_by(at(Some(6), None)),
            "partition 1 never consumed"
        );
        assert!(ConsistencyToken::default().is_reached_by(at(None, None)));
    }

    #[test]
    fn given_foreign_or_damaged_text_then_decode_says_what_is_wrong() {
        assert_eq!(
            ConsistencyToken::decode("wl2.e30"),
            Err(TokenError::UnknownVersion)
        );
        assert_eq!(
            ConsistencyToken::decode("wl1.@@@"),
            Err(TokenError::NotBase64)
        );
        let not_json = format!("wl1.{}", URL_SAFE_NO_PAD.encode(b"[1,2"));
        assert!(matches!(
            ConsistencyToken::decode(&not_json),
            Err(TokenError::Corrupt(_))
        ));
        let negative = format!("wl1.{}", URL_SAFE_NO_PAD.encode(br#"{"p":[["a",0,-1]]}"#));
        assert!(matches!(
            ConsistencyToken::decode(&negative),
            Err(TokenError::Corrupt(_))
        ));
        let long = format!("wl1.{}", "A".repeat(MAX_ENCODED_LEN));
        assert_eq!(ConsistencyToken::decode(&long), Err(TokenError::TooLong));
    }
}
