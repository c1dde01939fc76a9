//! Pure decisions of the archive: what to read from each partition, how a range
//! is written on the command line, where a record without a key goes, whether a
//! target topic counts as empty, and rates. No I/O here, so every rule has a
//! unit test.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::DateTime;
use serde::{Deserialize, Serialize};

/// A half-open offset range `[from, to)`; `to = None` runs to the end the
/// partition had when the export started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRange {
    /// First offset exported.
    pub from: i64,
    /// First offset not exported; `None` for "to the end".
    pub to: Option<i64>,
}

/// Offset ranges per partition, applied to every exported topic.
///
/// Written `[P=]FROM..[TO]` items separated by commas: `0=100..200,3=50..`
/// exports offsets 100–199 of partition 0 and 50 onwards of partition 3, and
/// nothing of other partitions; an item without `P=` (`100..`) applies to every
/// partition not listed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetSelection {
    /// The range of partitions not listed in `partitions`; `None` skips them.
    pub every: Option<OffsetRange>,
    /// Ranges of particular partitions.
    pub partitions: BTreeMap<i32, OffsetRange>,
}

/// Which records of each chosen topic are exported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExportRange {
    /// Everything from the oldest record to the end at the start of the export.
    #[default]
    All,
    /// Offset ranges per partition.
    Offsets(OffsetSelection),
    /// Records from `from_ms` (inclusive) to `to_ms` (exclusive), in Unix
    /// milliseconds; either bound may be open. Resolved per partition through
    /// the broker's time index (`offsets_for_times`): the first offset whose
    /// timestamp is at or after each bound. The export is therefore a contiguous
    /// offset slice of each partition, the same rule Kafka uses to reset a
    /// consumer group to a date; with the producers' clocks moving forward
    /// (every worldline producer stamps `occurred_at`) it is exactly the records
    /// of the time range.
    Time {
        /// Start of the range, Unix milliseconds.
        from_ms: Option<i64>,
        /// End of the range (exclusive), Unix milliseconds.
        to_ms: Option<i64>,
    },
}

/// A range on the command line that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct RangeSyntaxError {
    what: &'static str,
    input: String,
    reason: &'static str,
}

fn syntax_error(what: &'static str, input: &str, reason: &'static str) -> RangeSyntaxError {
    RangeSyntaxError {
        what,
        input: input.to_owned(),
        reason,
    }
}

impl FromStr for OffsetRange {
    type Err = RangeSyntaxError;

    /// `FROM..TO`, `FROM..` or `..TO`; bounds are offsets, `TO` exclusive.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let error = |reason| syntax_error("offset range", raw, reason);
        let (from, to) = raw
            .trim()
            .split_once("..")
            .ok_or(error("expected FROM..TO, FROM.. or ..TO"))?;
        let bound = |text: &str| -> Result<Option<i64>, RangeSyntaxError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            match text.parse::<i64>() {
                Ok(value) if value >= 0 => Ok(Some(value)),
                _ => Err(error("offsets are non-negative whole numbers")),
            }
        };
        let range = OffsetRange {
            from: bound(from)?.unwrap_or(0),
            to: bound(to)?,
        };
        if range.to.is_some_and(|to| to < range.from) {
            return Err(error("the end comes before the start"));
        }
        Ok(range)
    }
}

impl FromStr for OffsetSelection {
    type Err = RangeSyntaxError;

    /// `[P=]FROM..[TO]` items separated by commas, see [`OffsetSelection`].
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let mut selection = OffsetSelection::default();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((partition, range)) => {
                    let partition = partition
                        .trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|p| *p >= 0)
                        .ok_or(syntax_error(
                            "offset selection",
                            raw,
                            "partitions are non-negative whole numbers",
                        ))?;
                    if selection
                        .partitions
                        .insert(partition, range.parse()?)
                        .is_some()
                    {
                        return Err(syntax_error(
                            "offset selection",
                            raw,
                            "a partition is listed twice",
                        ));
                    }
                }
                None => {
                    if selection.every.replace(item.parse()?).is_some() {
                        return Err(syntax_error(
                            "offset selection",
                            raw,
                            "more than one range for every partition",
                        ));
                    }
                }
            }
        }
        if selection.every.is_none() && selection.partitions.is_empty() {
            return Err(syntax_error("offset selection", raw, "no range given"));
        }
        Ok(selection)
    }
}

impl fmt::Display for OffsetRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) => write!(f, "{}..{to}", self.from),
            None => write!(f, "{}..", self.from),
        }
    }
}

/// A time bound from the command line: RFC 3339 (`2026-05-01T12:00:00Z`) or
/// Unix milliseconds (`1777636800000`). Returns Unix milliseconds.
pub fn parse_time_bound(raw: &str) -> Result<i64, RangeSyntaxError> {
    let raw = raw.trim();
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|time| time.timestamp_millis())
        .map_err(|_| {
            syntax_error(
                "time",
                raw,
                "expected RFC 3339 (2026-05-01T12:00:00Z) or Unix milliseconds",
            )
        })
}

/// What a partition holds when the export starts, and where the time range's
/// bounds fall in it (`None` when the range is not a time range or the bound is
/// open; the first offset at or after the bound otherwise, the end when no
/// record is that late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// Oldest offset still held (the low watermark).
    pub low: i64,
    /// One past the newest offset (the high watermark) at the start of the export.
    pub high: i64,
    /// First offset at or after the time range's start.
    pub time_from: Option<i64>,
    /// First offset at or after the time range's end.
    pub time_to: Option<i64>,
}

/// The half-open offsets `[start, end)` of one partition to export, or `None`
/// when the range does not select the partition at all. The result always lies
/// within what the partition holds, so a range reaching past the end stops at
/// the high watermark captured at the start (an export of a live topic ends)
/// and one starting before the oldest record starts at it.
pub fn partition_range(
    range: &ExportRange,
    partition: i32,
    state: PartitionState,
) -> Option<(i64, i64)> {
    let (from, to) = match range {
        ExportRange::All => (state.low, state.high),
        ExportRange::Offsets(selection) => {
            let chosen = selection
                .partitions
                .get(&partition)
                .or(selection.every.as_ref())?;
            (chosen.from, chosen.to.unwrap_or(state.high))
        }
        ExportRange::Time { .. } => (
            state.time_from.unwrap_or(state.low),
            state.time_to.unwrap_or(state.high),
        ),
    };
    let start = from.clamp(state.low, state.high);
    let end = to.clamp(start, state.high);
    Some((start, end))
}

/// The partition for a record that has no key. `murmur2_random` would pick a
/// random one and break the order of keyless records; keeping the source
/// partition (folded into the target's count) keeps it.
pub fn keyless_partition(source_partition: i32, target_partitions: i32) -> i32 {
    source_partition.rem_euclid(target_partitions.max(1))
}

/// The first topic holding records, with how many, from each topic's
/// `(low, high)` watermarks per partition.
pub fn first_non_empty<'a>(
    topics: impl IntoIterator<Item = (&'a str, &'a [(i64, i64)])>,
) -> Option<(&'a str, i64)> {
    topics.into_iter().find_map(|(topic, watermarks)| {
        let records: i64 = watermarks
            .iter()
            .map(|(low, high)| (high - low).max(0))
            .sum();
        (records > 0).then_some((topic, records))
    })
}

/// Amount per second over `elapsed`; 0 for no time.
pub fn per_second(amount: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        amount as f64 / seconds
    } else {
        0.0
    }
}

/// Seconds left at the current rate, if there is a rate.
pub fn eta(done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    let rate = per_second(done, elapsed);
    (rate > 0.0).then(|| Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate))
}

/// Whether a record at `offset` follows the previous one of its file and lies in
/// the file's declared range: archive files hold one partition in offset order,
/// and import relies on that order.
pub fn in_order(previous: Option<i64>, offset: i64, start: i64, end: i64) -> bool {
    previous.is_none_or(|previous| offset > previous) && (start..end).contains(&offset)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HOLDS_10_TO_100: PartitionState = PartitionState {
        low: 10,
        high: 100,
        time_from: None,
        time_to: None,
    };

    #[test]
    fn given_offset_range_text_when_parsed_then_bounds_are_half_open_and_optional() {
        assert_eq!(
            "100..200".parse::<OffsetRange>().unwrap(),
            OffsetRange {
                from: 100,
                to: Some(200)
            }
        );
        assert_eq!(
            "5..".parse::<OffsetRange>().unwrap(),
            OffsetRange { from: 5, to: None }
        );
        assert_eq!(
            "..7".parse::<OffsetRange>().unwrap(),
            OffsetRange {
                from: 0,
                to: Some(7)
            }
        );
        assert!("7".parse::<OffsetRange>().is_err());
        assert!("9..3".parse::<OffsetRange>().is_err());
        assert!("-1..3".parse::<OffsetRange>().is_err());
    }

    #[test]
    fn given_a_selection_when_parsed_then_listed_partitions_and_the_default_are_kept_apart() {
        let selection: OffsetSelection = "0=100..200, 3=50..,10..".parse().unwrap();
        assert_eq!(selection.partitions.len(), 2);
        assert_eq!(selection.partitions[&3], OffsetRange { from: 50, to: None });
        assert_eq!(selection.every, Some(OffsetRange { from: 10, to: None }));
        assert!("0=1..2,0=3..4".parse::<OffsetSelection>().is_err());
        assert!("1..2,3..4".parse::<OffsetSelection>().is_err());
        assert!("x=1..2".parse::<OffsetSelection>().is_err());
        assert!("".parse::<OffsetSelection>().is_err());
    }

    #[test]
    fn given_time_text_when_parsed_then_rfc3339_and_milliseconds_are_accepted() {
        assert_eq!(parse_time_bound("1000").unwrap(), 1000);
        assert_eq!(
            parse_time_bound("1970-01-01T00:00:01.5Z").unwrap(),
            1500,
            "fractions of seconds are kept"
        );
        assert_eq!(
            parse_time_bound("2026-05-01T14:00:00+02:00").unwrap(),
            parse_time_bound("2026-05-01T12:00:00Z").unwrap()
        );
        assert!(parse_time_bound("yesterday").is_err());
    }

    #[test]
    fn given_everything_when_planned_then_the_partition_is_read_from_low_to_high() {
        assert_eq!(
            partition_range(&ExportRange::All, 0, HOLDS_10_TO_100),
            Some((10, 100))
        );
    }

    #[test]
    fn given_offsets_outside_the_partition_when_planned_then_they_are_clamped_to_what_it_holds() {
        let selection: OffsetSelection = "0=0..50,1=90..500,2=200..300".parse().unwrap();
        let range = ExportRange::Offsets(selection);
        assert_eq!(partition_range(&range, 0, HOLDS_10_TO_100), Some((10, 50)));
        assert_eq!(partition_range(&range, 1, HOLDS_10_TO_100), Some((90, 100)));
        assert_eq!(
            partition_range(&range, 2, HOLDS_10_TO_100),
            Some((100, 100)),
            "a range past the end selects the partition but no records"
        );
    }

    #[test]
    fn given_offsets_for_some_partitions_when_planned_then_others_are_skipped_unless_a_default_exists()
     {
        let listed = ExportRange::Offsets("0=20..30".parse().unwrap());
        assert_eq!(partition_range(&listed, 1, HOLDS_10_TO_100), None);
        let with_default = ExportRange::Offsets("0=20..30,40..".parse().unwrap());
        assert_eq!(
            partition_range(&with_default, 1, HOLDS_10_TO_100),
            Some((40, 100))
        );
        assert_eq!(
            partition_range(&with_default, 0, HOLDS_10_TO_100),
            Some((20, 30))
        );
    }

    #[test]
    fn given_a_time_range_when_planned_then_the_time_index_offsets_bound_it_and_open_ends_use_the_watermarks()
     {
        let range = ExportRange::Time {
            from_ms: Some(1),
            to_ms: Some(2),
        };
        let state = PartitionState {
            time_from: Some(40),
            time_to: Some(60),
            ..HOLDS_10_TO_100
        };
        assert_eq!(partition_range(&range, 0, state), Some((40, 60)));
        let open_end = PartitionState {
            time_to: None,
            ..state
        };
        assert_eq!(partition_range(&range, 0, open_end), Some((40, 100)));
    }

    #[test]
    fn given_a_keyless_record_when_placed_then_it_keeps_its_partition_folded_into_the_target_count()
    {
        assert_eq!(keyless_partition(3, 8), 3);
        assert_eq!(keyless_partition(9, 8), 1);
        assert_eq!(keyless_partition(2, 0), 0);
    }

    #[test]
    fn given_watermarks_when_checked_for_emptiness_then_only_held_records_count() {
        let empty: [(i64, i64); 2] = [(0, 0), (5, 5)];
        let holding: [(i64, i64); 2] = [(0, 0), (3, 7)];
        assert_eq!(
            first_non_empty([("a", &empty[..]), ("b", &holding[..])]),
            Some(("b", 4))
        );
        assert_eq!(first_non_empty([("a", &empty[..])]), None);
    }

    #[test]
    fn given_records_in_a_file_when_checked_then_offsets_must_rise_within_the_declared_range() {
        assert!(in_order(None, 10, 10, 20));
        assert!(in_order(Some(10), 12, 10, 20), "gaps are fine");
        assert!(!in_order(Some(12), 12, 10, 20), "repeats are not");
        assert!(!in_order(Some(12), 11, 10, 20), "going back is not");
        assert!(!in_order(Some(18), 20, 10, 20), "the end is exclusive");
        assert!(!in_order(None, 9, 10, 20));
    }

    #[test]
    fn given_progress_when_rates_are_computed_then_no_time_means_no_rate() {
        assert_eq!(per_second(100, Duration::from_secs(2)), 50.0);
        assert_eq!(per_second(100, Duration::ZERO), 0.0);
        assert_eq!(
            eta(50, 150, Duration::from_secs(5)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(eta(0, 150, Duration::from_secs(5)), None);
    }
}
