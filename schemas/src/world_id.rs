//! World ids: the Kafka key of every event and the first column of every read model.

use std::fmt;
use std::str::FromStr;

/// Longest accepted world id, in bytes.
pub const MAX_WORLD_ID_LEN: usize = 128;

/// A validated world id: 1 to 128 characters of `[A-Za-z0-9._-]`.
///
/// Kept this narrow on purpose: it appears in URLs, Kafka keys, metric labels
/// and log lines, and must mean the same thing in all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorldId(String);

/// Why a string is not a world id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldIdError {
    #[error("world id is empty")]
    Empty,
    #[error("world id is longer than {MAX_WORLD_ID_LEN} bytes")]
    TooLong,
    #[error("world id contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadCharacter(char),
}

impl WorldId {
    /// Validates `raw` as a world id.
    pub fn parse(raw: &str) -> Result<WorldId, WorldIdError> {
        if raw.is_empty() {
            return Err(WorldIdError::Empty);
        }
        if raw.len() > MAX_WORLD_ID_LEN {
            return Err(WorldIdError::TooLong);
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(WorldIdError::BadCharacter(bad));
        }
        Ok(WorldId(raw.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for WorldId {
    type Err = WorldIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WorldId::parse(s)
    }
}

impl fmt::Display for WorldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for WorldId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in [
            "demo",
            "emberfall-eu.2",
            "W_1",
            &"a".repeat(MAX_WORLD_ID_LEN),
        ] {
            assert_eq!(WorldId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_empty_long_and_odd_characters() {
        assert_eq!(WorldId::parse(""), Err(WorldIdError::Empty));
        assert_eq!(
            WorldId::parse(&"a".repeat(MAX_WORLD_ID_LEN + 1)),
            Err(WorldIdError::TooLong)
        );
        assert_eq!(WorldId::parse("a b"), Err(WorldIdError::BadCharacter(' ')));
        assert_eq!(
            WorldId::parse("x';drop table t;--"),
            Err(WorldIdError::BadCharacter('\''))
        );
        assert_eq!(WorldId::parse("é"), Err(WorldIdError::BadCharacter('é')));
    }
}
