//! Validation of path segments and query parameters, without I/O.
//!
//! Every client-supplied string passes through one of these functions before it
//! reaches SQL (where it is a bind parameter anyway): a value the read models
//! could never hold is a 400 naming the parameter, not a query that returns
//! nothing and not a database error.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use worldline_schemas::WorldId;

use crate::error::ApiError;

/// Longest accepted id of a region, player, story, model or NPC, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The JSON Schema pattern of a world id (`worldline_schemas::WorldId`).
pub const WORLD_PATTERN: &str = "^[A-Za-z0-9._-]{1,128}$";

/// The JSON Schema pattern of the other ids (region, player, story, model, NPC).
pub const ID_PATTERN: &str = "^[A-Za-z0-9._:-]{1,128}$";

/// The inference purposes the read model stores (`names::inference_purpose`).
pub const PURPOSES: [&str; 5] = [
    "npc_dialogue",
    "narration",
    "quest_generation",
    "moderation",
    "unspecified",
];

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 50;

/// Largest accepted `limit`.
pub const MAX_LIMIT: i64 = 500;

/// A validated world id from the `world` path segment.
pub fn world(raw: &str) -> Result<WorldId, ApiError> {
    WorldId::parse(raw).map_err(|e| ApiError::bad("world", format!("world: {e}")))
}

/// A validated id of a region, player, story, model or NPC: 1 to 128
/// characters of `[A-Za-z0-9._:-]`.
pub fn id(parameter: &'static str, raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() {
        return Err(ApiError::bad(parameter, format!("{parameter} is empty")));
    }
    if raw.len() > MAX_ID_LEN {
        return Err(ApiError::bad(
            parameter,
            format!("{parameter} is longer than {MAX_ID_LEN} bytes"),
        ));
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(ApiError::bad(
            parameter,
            format!(
                "{parameter} contains {bad:?}; only letters, digits, '.', '_', ':' and '-' are allowed"
            ),
        ));
    }
    Ok(raw.to_owned())
}

/// An optional id filter (absent stays `None`; present must be valid).
pub fn optional_id(parameter: &'static str, raw: Option<&str>) -> Result<Option<String>, ApiError> {
    raw.map(|raw| id(parameter, raw)).transpose()
}

/// A world tick: an integer from 0 to `i64::MAX` (a Postgres bigint).
pub fn tick(parameter: &'static str, raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(tick) if tick >= 0 => Ok(tick),
        _ => Err(ApiError::bad(
            parameter,
            format!(
                "{parameter} must be an integer from 0 to {}, got {:?}",
                i64::MAX,
                shorten(raw)
            ),
        )),
    }
}

/// An optional tick; absent means `default`.
pub fn tick_or(parameter: &'static str, raw: Option<&str>, default: i64) -> Result<i64, ApiError> {
    raw.map_or(Ok(default), |raw| tick(parameter, raw))
}

/// The page size: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
pub fn limit(raw: Option<&str>) -> Result<i64, ApiError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    match raw.parse::<i64>() {
        Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
        _ => Err(ApiError::bad(
            "limit",
            format!(
                "limit must be an integer from 1 to {MAX_LIMIT}, got {:?}",
                shorten(raw)
            ),
        )),
    }
}

/// An optional RFC 3339 timestamp, e.g. `2026-11-02T10:00:00Z`.
pub fn time(parameter: &'static str, raw: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|raw| {
        DateTime::parse_from_rfc3339(raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| {
                ApiError::bad(
                    parameter,
                    format!(
                        "{parameter} must be an RFC 3339 timestamp such as 2026-11-02T10:00:00Z, got {:?} ({e})",
                        shorten(raw)
                    ),
                )
            })
    })
    .transpose()
}

/// An optional inference purpose, one of [`PURPOSES`].
pub fn purpose(raw: Option<&str>) -> Result<Option<&'static str>, ApiError> {
    raw.map(|raw| {
        PURPOSES
            .iter()
            .find(|known| **known == raw)
            .copied()
            .ok_or_else(|| {
                ApiError::bad(
                    "purpose",
                    format!(
                        "purpose must be one of {}, got {:?}",
                        PURPOSES.join(", "),
                        shorten(raw)
                    ),
                )
            })
    })
    .transpose()
}

/// Echoes at most 64 characters of a rejected value: enough to recognise it,
/// never a megabyte of it.
pub fn shorten(raw: &str) -> Cow<'_, str> {
    match raw.char_indices().nth(64) {
        Some((end, _)) => Cow::Owned(format!("{}…", &raw[..end])),
        None => Cow::Borrowed(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameter_of(error: ApiError) -> String {
        match error {
            ApiError::BadRequest { parameter, .. } => parameter.into_owned(),
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn given_plain_ids_when_validated_then_accepted() {
        for ok in [
            "north",
            "player-0001",
            "npc:smith",
            "a.b_c",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(id("region", ok).unwrap(), ok);
        }
    }

    #[test]
    fn given_hostile_ids_when_validated_then_rejected_naming_the_parameter() {
        for bad in [
            "",
            "' OR 1=1 --",
            "\0",
            "a/b",
            "é",
            "🙂",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert_eq!(parameter_of(id("player", bad).unwrap_err()), "player");
        }
    }

    #[test]
    fn given_tick_strings_when_parsed_then_only_non_negative_bigints_pass() {
        assert_eq!(tick("from_tick", "0").unwrap(), 0);
        assert_eq!(tick("from_tick", "9223372036854775807").unwrap(), i64::MAX);
        for bad in ["-1", "9223372036854775808", "1.5", "", "ten", " 1"] {
            assert_eq!(
                parameter_of(tick("from_tick", bad).unwrap_err()),
                "from_tick"
            );
        }
        assert_eq!(tick_or("to_tick", None, 7).unwrap(), 7);
    }

    #[test]
    fn given_limits_when_parsed_then_default_and_bounds_hold() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some("1")).unwrap(), 1);
        assert_eq!(limit(Some("500")).unwrap(), MAX_LIMIT);
        for bad in ["0", "501", "-5", "many"] {
            assert_eq!(parameter_of(limit(Some(bad)).unwrap_err()), "limit");
        }
    }

    #[test]
    fn given_timestamps_when_parsed_then_rfc3339_with_any_offset_is_accepted() {
        let t = time("from", Some("2026-11-02T12:00:00+02:00"))
            .unwrap()
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-02T10:00:00+00:00");
        assert_eq!(time("from", None).unwrap(), None);
        for bad in ["yesterday", "2026-11-02", "2026-13-01T00:00:00Z"] {
            assert_eq!(parameter_of(time("to", Some(bad)).unwrap_err()), "to");
        }
    }

    #[test]
    fn given_purposes_when_parsed_then_only_known_names_pass() {
        assert_eq!(purpose(Some("narration")).unwrap(), Some("narration"));
        assert_eq!(purpose(None).unwrap(), None);
        assert_eq!(
            parameter_of(purpose(Some("NARRATION")).unwrap_err()),
            "purpose"
        );
    }

    #[test]
    fn given_a_huge_value_when_echoed_then_it_is_cut() {
        let echoed = shorten(&"é".repeat(1000)).into_owned();
        assert_eq!(echoed.chars().count(), 65);
    }
}
