//! Stable lowercase names of protobuf enums, as read models store them and the
//! API returns them. Stored as text so a new enum value needs no migration.

use worldline_schemas::pb::{InferenceOutcome, InferencePurpose, Season, WeatherCondition};

/// `spring`, `summer`, `autumn`, `winter`.
pub fn season(raw: i32) -> &'static str {
    match Season::try_from(raw) {
        Ok(Season::Spring) => "spring",
        Ok(Season::Summer) => "summer",
        Ok(Season::Autumn) => "autumn",
        Ok(Season::Winter) => "winter",
        _ => "unspecified",
    }
}

/// `clear`, `cloudy`, `fog`, `rain`, `storm`, `snow` (or `none` for a first report's previous).
pub fn weather_condition(raw: i32) -> &'static str {
    match WeatherCondition::try_from(raw) {
        Ok(WeatherCondition::Clear) => "clear",
        Ok(WeatherCondition::Cloudy) => "cloudy",
        Ok(WeatherCondition::Fog) => "fog",
        Ok(WeatherCondition::Rain) => "rain",
        Ok(WeatherCondition::Storm) => "storm",
        Ok(WeatherCondition::Snow) => "snow",
        _ => "none",
    }
}

/// `npc_dialogue`, `narration`, `quest_generation`, `moderation`.
pub fn inference_purpose(raw: i32) -> &'static str {
    match InferencePurpose::try_from(raw) {
        Ok(InferencePurpose::NpcDialogue) => "npc_dialogue",
        Ok(InferencePurpose::Narration) => "narration",
        Ok(InferencePurpose::QuestGeneration) => "quest_generation",
        Ok(InferencePurpose::Moderation) => "moderation",
        _ => "unspecified",
    }
}

/// `ok`, `error`, `timeout`, `filtered`.
pub fn inference_outcome(raw: i32) -> &'static str {
    match InferenceOutcome::try_from(raw) {
        Ok(InferenceOutcome::Ok) => "ok",
        Ok(InferenceOutcome::Error) => "error",
        Ok(InferenceOutcome::Timeout) => "timeout",
        Ok(InferenceOutcome::Filtered) => "filtered",
        _ => "unspecified",
    }
}

/// Converts an unsigned protobuf field into a Postgres bigint, saturating
/// (values beyond i64::MAX cannot occur in practice; saturating keeps apply total).
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Converts an unsigned protobuf field into a Postgres integer, saturating.
pub fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
