//! `worldline produce weather`: weather per region, derived from clock ticks.
//!
//! # The model
//!
//! The weather of a region at a tick is a pure function of the seed, the world,
//! the region and the tick's `ClockTicked` (game time, day, season): see
//! [`weather_at`]. Smooth value noise over game time (world-wide fronts plus a
//! regional component) drives cloudiness, storminess and warm/cold spells, so a
//! region's weather persists for a few game hours and then changes. Season and
//! time of day shape the distribution (snow in winter, thunderstorms on warm
//! days, fog at dawn in autumn, colder nights) and the region's name gives it a
//! climate (a coast is windier, wetter and foggier; the north is colder). The
//! arithmetic uses only `+ - * /`, `floor` and `round`, which IEEE 754 defines
//! exactly, so every platform computes the same weather.
//!
//! A [`WeatherChanged`] is emitted for a region only at a tick whose condition
//! differs from the condition at the tick before ([`changes_at`]); at a world's
//! tick 1 every region reports once, with `previous_condition` UNSPECIFIED.
//! Because the model is pure, the previous condition is recomputed from the
//! previous tick's clock reading rather than remembered.
//!
//! Each event's id is a UUIDv5 of `(world, tick, region)` under
//! [`WEATHER_EVENT_NAMESPACE`], its `occurred_at_ms` is the clock tick's and its
//! causation id is the clock event's id: the same clock history always yields
//! byte-identical weather events.
//!
//! # Delivery: nothing skipped, nothing repeated
//!
//! The producer reads the clock topic in its own consumer group, from the
//! earliest offset when the group is new (a new weather producer derives the
//! weather of the whole history). Offsets are committed only after every
//! weather event derived from those ticks has been acknowledged, so a crash
//! never skips a tick.
//!
//! A crash *after* the append and *before* the commit would make the restarted
//! producer handle those ticks again. It does not append them twice: before it
//! handles a world for the first time (and whenever a world's ticks do not
//! continue where this process left off, e.g. after a rebalance), it reads the
//! tail of the world's weather partition backwards and notes, per region, the
//! highest tick already written; ticks at or below it are skipped for that
//! region. The scan stops at the first of the world's events older than the
//! tick being handled, or once every region has been seen. The same read-back
//! finds the world's previous clock tick in the clock topic, so the first
//! change after a restart names the right previous condition.
//!
//! Two instances racing over the same ticks during a rebalance could still both
//! append an event; it then carries the same event id both times and the
//! projectors deduplicate on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worldline_ops::config::{KafkaSettings, Settings, TopicSettings};
use worldline_ops::kafka::base_client_config;
use worldline_ops::topics::{TopicError, verify_event_topics};
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{ClockTicked, Envelope, Season, WeatherChanged, WeatherCondition};
use worldline_schemas::{Family, WorldId, decode_envelope};

use crate::appender::{AppendError, Appender};
use crate::clock::{SEASON_LENGTH_DAYS, season_of_day};
use crate::partitioner::partition_for_key;

/// Namespace of weather event ids: `UUIDv5(namespace, "<world>/<tick>/<region>")`.
/// Changing it would give every past weather event a new id, so it never changes.
pub const WEATHER_EVENT_NAMESPACE: Uuid =
    Uuid::from_u128(0x5c1f_0b7e_9d2a_4f61_8e3b_a4d7_0c95_e218);

/// The envelope `source` of weather events.
pub const WEATHER_SOURCE: &str = "weather";

const GAME_SECONDS_PER_DAY: u64 = 86_400;
const GAME_SECONDS_PER_HOUR: u64 = 3_600;

// ---------------------------------------------------------------------------
// The model (pure)
// ---------------------------------------------------------------------------

/// What the weather model reads from a clock tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    /// The tick (the clock event's `world_tick`).
    pub tick: u64,
    /// Game seconds since the world's epoch.
    pub game_time_s: u64,
    /// Game day since the world's epoch.
    pub day: u32,
    /// Season at this tick.
    pub season: Season,
}

impl ClockReading {
    /// The reading of a `ClockTicked` body at `tick`. An UNSPECIFIED season
    /// (which validation refuses anyway) falls back to the clock's own calendar.
    pub fn new(tick: u64, body: &ClockTicked) -> ClockReading {
        let season = match Season::try_from(body.season) {
            Ok(Season::Unspecified) | Err(_) => season_of_day(u64::from(body.day)),
            Ok(season) => season,
        };
        ClockReading {
            tick,
            game_time_s: body.game_time_s,
            day: body.day,
            season,
        }
    }

    /// The reading of a clock event; `None` for any other event.
    pub fn from_envelope(envelope: &Envelope) -> Option<ClockReading> {
        match &envelope.body {
            Some(Body::ClockTicked(body)) => Some(ClockReading::new(envelope.world_tick, body)),
            _ => None,
        }
    }

    /// Hour of the game day, 0.0 to 24.0.
    fn hour(&self) -> f64 {
        (self.game_time_s % GAME_SECONDS_PER_DAY) as f64 / GAME_SECONDS_PER_HOUR as f64
    }

    /// Position in the year, in turns (0.0 = first day of spring, 0.5 = first day of autumn).
    fn year_turns(&self) -> f64 {
        let season_index = match self.season {
            Season::Spring | Season::Unspecified => 0.0,
            Season::Summer => 1.0,
            Season::Autumn => 2.0,
            Season::Winter => 3.0,
        };
        let day_in_season = (u64::from(self.day) % SEASON_LENGTH_DAYS) as f64 + self.hour() / 24.0;
        (season_index + day_in_season / SEASON_LENGTH_DAYS as f64) / 4.0
    }
}

/// The weather of one region at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weather {
    /// The condition; never UNSPECIFIED.
    pub condition: WeatherCondition,
    /// Air temperature in tenths of a degree Celsius.
    pub temperature_dc: i32,
    /// Wind speed in tenths of metres per second.
    pub wind_dmps: u32,
    /// Precipitation in tenths of millimetres per hour.
    pub precipitation_dmmph: u32,
}

/// A region's climate, read from its name: what makes a coast differ from a desert.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Climate {
    /// Offset from the world's mean temperature, °C.
    temperature_c: f64,
    /// Added to cloudiness: wetter regions rain more.
    wetness: f64,
    /// Calm-weather wind, m/s.
    wind_ms: f64,
    /// Added to the chance of dawn fog.
    fog: f64,
    /// Scale of the day/night temperature swing.
    diurnal: f64,
}

fn climate_of(seed: u64, region: &str) -> Climate {
    let name = region.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|word| name.contains(word));
    let mut climate = Climate {
        temperature_c: 0.0,
        wetness: 0.0,
        wind_ms: 3.0,
        fog: 0.0,
        diurnal: 1.0,
    };
    if has(&["north", "tundra", "frost", "ice"]) {
        climate.temperature_c -= 6.0;
        climate.wetness += 0.02;
        climate.wind_ms += 1.0;
    }
    if has(&["south", "tropic"]) {
        climate.temperature_c += 5.0;
        climate.wetness -= 0.04;
    }
    if has(&["coast", "shore", "sea", "port", "island", "bay", "harbo"]) {
        climate.wetness += 0.07;
        climate.wind_ms += 4.0;
        climate.fog += 0.12;
        // The sea keeps nights mild and days cool.
        climate.diurnal *= 0.6;
    }
    if has(&["east"]) {
        climate.wetness -= 0.05;
        climate.diurnal *= 1.25;
    }
    if has(&["west"]) {
        climate.wetness += 0.04;
    }
    if has(&["mountain", "peak", "highland", "alp", "pass"]) {
        climate.temperature_c -= 8.0;
        climate.wetness += 0.05;
        climate.wind_ms += 3.0;
    }
    if has(&["desert", "dune", "waste"]) {
        climate.temperature_c += 9.0;
        climate.wetness -= 0.25;
        climate.diurnal *= 1.8;
    }
    if has(&["forest", "marsh", "swamp", "fen", "valley", "river"]) {
        climate.fog += 0.1;
    }
    // Every region gets a little character of its own, so two regions with
    // unknown names still differ.
    let key = hash_words(seed, &["climate", region]);
    climate.temperature_c += (unit(key, 0) - 0.5) * 3.0;
    climate.wetness += (unit(key, 1) - 0.5) * 0.06;
    climate
}

/// Cloudiness above which it rains (or snows, or storms).
const PRECIPITATION_THRESHOLD: f64 = 0.64;
/// Cloudiness above which a dry sky is overcast.
const CLOUDY_THRESHOLD: f64 = 0.5;
/// Storminess above which warm rain becomes a thunderstorm.
const STORM_THRESHOLD: f64 = 0.66;
/// Warmest air, °C, in which a thunderstorm forms.
const STORM_MIN_TEMPERATURE_C: f64 = 10.0;
/// Warmest air, °C, in which precipitation falls as snow.
const SNOW_MAX_TEMPERATURE_C: f64 = 0.5;
/// Fog forms in this window of game hours (dawn) ...
const FOG_HOURS: std::ops::Range<f64> = 4.0..9.5;
/// ... in calm air ...
const FOG_MAX_STORMINESS: f64 = 0.5;
/// ... when damp enough.
const FOG_THRESHOLD: f64 = 0.6;

/// The weather of `region` in `world` at `clock`: a pure function of its
/// arguments. See the module documentation for the model.
pub fn weather_at(seed: u64, world: &WorldId, region: &str, clock: &ClockReading) -> Weather {
    let climate = climate_of(seed, region);
    let t = clock.game_time_s;
    let world_name = world.as_str();
    // Fronts cross the whole world over most of a day; local weather varies
    // within hours. Mixing both keeps neighbouring regions alike but not equal.
    let cloudiness = 0.55 * smooth_noise(hash_words(seed, &["front", world_name]), t, 20 * 3600)
        + 0.45
            * smooth_noise(
                hash_words(seed, &["cloud", world_name, region]),
                t,
                6 * 3600,
            );
    let storminess = 0.5 * smooth_noise(hash_words(seed, &["gale", world_name]), t, 14 * 3600)
        + 0.5 * smooth_noise(hash_words(seed, &["gust", world_name, region]), t, 4 * 3600);
    let spell = smooth_noise(hash_words(seed, &["spell", world_name]), t, 60 * 3600) * 2.0 - 1.0;

    let (season_wetness, season_fog) = match clock.season {
        Season::Spring | Season::Unspecified => (0.03, 0.04),
        Season::Summer => (-0.06, -0.06),
        Season::Autumn => (0.06, 0.14),
        Season::Winter => (0.03, 0.08),
    };
    let wetness = cloudiness + climate.wetness + season_wetness;

    // Warmest in mid-summer (0.375 turns into the year), coldest in mid-winter.
    let annual_c = 10.0 + 11.0 * cos_turns(clock.year_turns() - 0.375);
    // Warmest at 15:00, coldest at 03:00; clouds flatten the swing.
    let diurnal_c = 5.0
        * climate.diurnal
        * (1.0 - 0.5 * cloudiness.min(1.0))
        * cos_turns((clock.hour() - 15.0) / 24.0);
    let mut temperature_c = annual_c + climate.temperature_c + diurnal_c + 4.0 * spell;

    let precipitating = wetness > PRECIPITATION_THRESHOLD;
    if precipitating {
        // Rain cools the air it falls through.
        temperature_c -= 1.5;
    }
    let condition = if precipitating {
        if storminess > STORM_THRESHOLD && temperature_c > STORM_MIN_TEMPERATURE_C {
            WeatherCondition::Storm
        } else if temperature_c <= SNOW_MAX_TEMPERATURE_C {
            WeatherCondition::Snow
        } else {
            WeatherCondition::Rain
        }
    } else if FOG_HOURS.contains(&clock.hour())
        && storminess < FOG_MAX_STORMINESS
        && wetness + climate.fog + season_fog > FOG_THRESHOLD
    {
        WeatherCondition::Fog
    } else if wetness > CLOUDY_THRESHOLD {
        WeatherCondition::Cloudy
    } else {
        WeatherCondition::Clear
    };

    let excess = (wetness - PRECIPITATION_THRESHOLD).max(0.0) / (1.0 - PRECIPITATION_THRESHOLD);
    let (wind_extra_ms, precipitation_mmph) = match condition {
        WeatherCondition::Storm => (9.0, 8.0 + 25.0 * excess),
        WeatherCondition::Rain => (1.0, 0.5 + 7.0 * excess),
        // Snow is measured as melted water.
        WeatherCondition::Snow => (1.0, 0.3 + 3.0 * excess),
        WeatherCondition::Fog => (-1.0, 0.0),
        _ => (0.0, 0.0),
    };
    let wind_ms = (climate.wind_ms + 8.0 * storminess + wind_extra_ms).max(0.0);
    Weather {
        condition,
        temperature_dc: (temperature_c * 10.0).round() as i32,
        wind_dmps: (wind_ms * 10.0).round() as u32,
        precipitation_dmmph: (precipitation_mmph * 10.0).round() as u32,
    }
}

/// The change of one region's weather at `clock`, if there is one.
///
/// `previous` is the world's reading at the tick before. `None` means this is
/// the region's first report (the world's tick 1, or a history whose previous
/// tick is not in the log): the weather is reported with `previous_condition`
/// UNSPECIFIED.
pub fn change_at(
    seed: u64,
    world: &WorldId,
    region: &str,
    clock: &ClockReading,
    previous: Option<&ClockReading>,
) -> Option<WeatherChanged> {
    let now = weather_at(seed, world, region, clock);
    let previous_condition = previous.map_or(WeatherCondition::Unspecified, |previous| {
        weather_at(seed, world, region, previous).condition
    });
    if now.condition == previous_condition {
        return None;
    }
    Some(WeatherChanged {
        region: region.to_owned(),
        condition: now.condition as i32,
        temperature_dc: now.temperature_dc,
        wind_dmps: now.wind_dmps,
        precipitation_dmmph: now.precipitation_dmmph,
        previous_condition: previous_condition as i32,
        ..Default::default()
    })
}

/// The changes of every region at `clock`, in the order of `regions`.
pub fn changes_at(
    seed: u64,
    world: &WorldId,
    regions: &[String],
    clock: &ClockReading,
    previous: Option<&ClockReading>,
) -> Vec<WeatherChanged> {
    regions
        .iter()
        .filter_map(|region| change_at(seed, world, region, clock, previous))
        .collect()
}

/// The id of the weather event of `region` in `world` at `tick`.
pub fn weather_event_id(world: &WorldId, region: &str, tick: u64) -> Uuid {
    // World ids cannot contain '/' and the tick is digits, so the name is unambiguous.
    Uuid::new_v5(
        &WEATHER_EVENT_NAMESPACE,
        format!("{world}/{tick}/{region}").as_bytes(),
    )
}

/// The weather events caused by one clock event, ready to append. Empty when
/// `clock_event` is not a clock tick or nothing changed. `previous` is the
/// world's reading at the tick before (see [`change_at`]).
pub fn weather_envelopes(
    seed: u64,
    regions: &[String],
    clock_event: &Envelope,
    previous: Option<&ClockReading>,
) -> Vec<Envelope> {
    let Some(clock) = ClockReading::from_envelope(clock_event) else {
        return Vec::new();
    };
    let Ok(world) = WorldId::parse(&clock_event.world_id) else {
        return Vec::new();
    };
    // A world's tick 1 has no tick before it, whatever the caller passed.
    let previous = previous.filter(|_| clock.tick > 1);
    changes_at(seed, &world, regions, &clock, previous)
        .into_iter()
        .map(|change| Envelope {
            event_id: weather_event_id(&world, &change.region, clock.tick)
                .as_bytes()
                .to_vec(),
            world_id: world.as_str().to_owned(),
            occurred_at_ms: clock_event.occurred_at_ms,
            world_tick: clock.tick,
            source: WEATHER_SOURCE.to_owned(),
            correlation_id: Vec::new(),
            causation_id: clock_event.event_id.clone(),
            body: Some(Body::WeatherChanged(change)),
        })
        .collect()
}

/// `cos(2π·turns)`, from Bhaskara I's sine approximation (error below 0.002):
/// only exactly rounded operations, so the result is the same on every platform,
/// unlike `f64::cos`.
fn cos_turns(turns: f64) -> f64 {
    let shifted = turns + 0.25;
    let s = shifted - shifted.floor();
    let half_sine = |u: f64| {
        let p = u * (1.0 - u);
        16.0 * p / (5.0 - 4.0 * p)
    };
    if s < 0.5 {
        half_sine(2.0 * s)
    } else {
        -half_sine(2.0 * s - 1.0)
    }
}

/// Value noise in [0, 1): random values at lattice points `period` game seconds
/// apart, eased between them. Each key's lattice is shifted by its own phase so
/// that different regions do not change at the same moments.
fn smooth_noise(key: u64, t: u64, period_s: u64) -> f64 {
    let phase = splitmix64(key ^ 0xa076_1d64_78bd_642f) % period_s;
    let shifted = t + phase;
    let index = shifted / period_s;
    let fraction = (shifted % period_s) as f64 / period_s as f64;
    let eased = fraction * fraction * (3.0 - 2.0 * fraction);
    let (a, b) = (unit(key, index), unit(key, index + 1));
    a + (b - a) * eased
}

/// A uniform value in [0, 1) for (`key`, `index`).
fn unit(key: u64, index: u64) -> f64 {
    let bits = splitmix64(key ^ splitmix64(index));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A stable 64-bit hash of the seed and some words (FNV-1a, then mixed). Not
/// `std`'s hasher, whose output may change between Rust releases.
fn hash_words(seed: u64, words: &[&str]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    let mut feed = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    };
    seed.to_le_bytes().into_iter().for_each(&mut feed);
    for word in words {
        word.bytes().for_each(&mut feed);
        // A separator no UTF-8 text contains keeps ("ab","c") apart from ("a","bc").
        feed(0xff);
    }
    splitmix64(hash)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// Reading the log back (blocking; run on the blocking pool)
// ---------------------------------------------------------------------------

/// Reads single partitions at chosen offsets, outside any consumer group.
struct LogReader {
    consumer: BaseConsumer,
}

impl LogReader {
    fn new(kafka: &KafkaSettings) -> Result<LogReader, KafkaError> {
        let consumer = base_client_config(kafka, "worldline-weather-readback")
            // Partitions are assigned by hand; the group is never joined and
            // nothing is committed under it.
            .set("group.id", "worldline-weather-readback")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()?;
        Ok(LogReader { consumer })
    }

    fn partition_count(&self, topic: &str) -> Result<i32, KafkaError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(metadata.topics().first().map_or(0, |t| {
            i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)
        }))
    }

    /// Watermarks, retrying the errors a partition gives while its leader moves.
    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), KafkaError> {
        let mut attempt = 0;
        loop {
            match self
                .consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
            {
                Ok(watermarks) => return Ok(watermarks),
                Err(error) if attempt < 20 => {
                    tracing::debug!(%error, topic, partition, "watermarks not available yet; retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Visits `world`'s valid events in `partition` of `topic` newest first,
    /// from just below `end` (the high watermark when `None`) down to the start
    /// of the log or until `visit` breaks. Reads in windows that grow fourfold,
    /// so a recent event costs one small read.
    fn scan_world_backwards(
        &self,
        topic: &str,
        partition: i32,
        world: &WorldId,
        end: Option<i64>,
        mut visit: impl FnMut(&Envelope) -> ControlFlow<()>,
    ) -> Result<(), KafkaError> {
        let (low, high) = self.watermarks(topic, partition)?;
        let mut end = end.unwrap_or(high).min(high);
        let mut window: i64 = 256;
        while end > low {
            let start = (end - window).max(low);
            let envelopes = self.read_world_range(topic, partition, world, start, end)?;
            for envelope in envelopes.iter().rev() {
                if visit(envelope).is_break() {
                    return Ok(());
                }
            }
            end = start;
            window = window.saturating_mul(4);
        }
        Ok(())
    }

    /// `world`'s valid events at offsets `start..end` of one partition, in log order.
    fn read_world_range(
        &self,
        topic: &str,
        partition: i32,
        world: &WorldId,
        start: i64,
        end: i64,
    ) -> Result<Vec<Envelope>, KafkaError> {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        self.consumer.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let key = world.as_str().as_bytes();
        let mut envelopes = Vec::new();
        let mut next_offset = start;
        while next_offset < end {
            let Some(message) = self.consumer.poll(Duration::from_millis(500)) else {
                // Offsets without a record (transaction markers) end a range
                // early; the position then already stands past them.
                if self.position(topic, partition)? >= end {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(KafkaError::MessageConsumption(
                        RDKafkaErrorCode::RequestTimedOut,
                    ));
                }
                continue;
            };
            let message = message?;
            next_offset = message.offset() + 1;
            if message.offset() >= end || message.key() != Some(key) {
                continue;
            }
            // Undecodable records are the projectors' dead letters; the
            // read-back only needs valid events.
            if let Some(Ok(envelope)) = message.payload().map(decode_envelope) {
                envelopes.push(envelope);
            }
        }
        Ok(envelopes)
    }

    fn position(&self, topic: &str, partition: i32) -> Result<i64, KafkaError> {
        let positions = self.consumer.position()?;
        Ok(positions
            .find_partition(topic, partition)
            .and_then(|p| p.offset().to_raw())
            .unwrap_or(-1))
    }
}

/// What this process knows about one world.
#[derive(Debug, Clone)]
struct WorldState {
    /// The last clock reading handled (or, right after loading, the tick before
    /// the one about to be handled, when the log has it).
    last: Option<ClockReading>,
    /// Per region, the highest tick whose weather is in the log.
    written: HashMap<String, u64>,
}

/// Loads a world's state from the log before handling its tick `clock` found at
/// `clock_offset` of `clock_partition`.
fn load_world(
    reader: &LogReader,
    topics: &Topics,
    regions: &[String],
    world: &WorldId,
    clock: &ClockReading,
    clock_partition: i32,
    clock_offset: i64,
) -> Result<WorldState, KafkaError> {
    let mut written: HashMap<String, u64> = HashMap::new();
    let weather_partition = partition_for_key(world.as_str().as_bytes(), topics.weather_partitions);
    reader.scan_world_backwards(
        &topics.weather,
        weather_partition,
        world,
        None,
        |envelope| {
            if envelope.world_tick < clock.tick {
                // Older than anything about to be handled: nothing further back matters.
                return ControlFlow::Break(());
            }
            if let Some(Body::WeatherChanged(change)) = &envelope.body {
                let highest = written.entry(change.region.clone()).or_insert(0);
                *highest = (*highest).max(envelope.world_tick);
            }
            if regions.iter().all(|region| written.contains_key(region)) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;

    let mut last = None;
    if clock.tick > 1 {
        let wanted = clock.tick - 1;
        reader.scan_world_backwards(
            &topics.clock,
            clock_partition,
            world,
            Some(clock_offset),
            |envelope| {
                if envelope.world_tick < wanted {
                    return ControlFlow::Break(());
                }
                match ClockReading::from_envelope(envelope) {
                    Some(reading) if reading.tick == wanted => {
                        last = Some(reading);
                        ControlFlow::Break(())
                    }
                    _ => ControlFlow::Continue(()),
                }
            },
        )?;
        if last.is_none() {
            tracing::warn!(world = %world, tick = clock.tick, "the tick before is not in the clock topic; reporting every region afresh");
        }
    }
    Ok(WorldState { last, written })
}

/// Whether a world's state must be (re)loaded from the log before handling
/// `clock`: when this process has not handled the world yet, or when the tick
/// does not continue the last one it handled (redelivery after a rebalance,
/// or ticks another instance handled meanwhile).
fn must_load(state: Option<&WorldState>, clock: &ClockReading) -> bool {
    state
        .and_then(|state| state.last)
        .is_none_or(|last| last.tick + 1 != clock.tick)
}

/// Drops the events whose region already has weather at or after their tick in
/// the log, and records the rest as written. Returns the rest and how many were dropped.
fn not_yet_written(
    events: Vec<Envelope>,
    written: &mut HashMap<String, u64>,
) -> (Vec<Envelope>, u64) {
    let mut dropped = 0;
    let mut fresh = Vec::with_capacity(events.len());
    for event in events {
        let Some(Body::WeatherChanged(change)) = &event.body else {
            continue;
        };
        let highest = written.entry(change.region.clone()).or_insert(0);
        if event.world_tick <= *highest {
            dropped += 1;
            continue;
        }
        *highest = event.world_tick;
        fresh.push(event);
    }
    (fresh, dropped)
}

// ---------------------------------------------------------------------------
// The producer
// ---------------------------------------------------------------------------

/// Settings of one weather producer process.
#[derive(Debug, Clone, PartialEq)]
pub struct WeatherOptions {
    /// Prefix of the event topics; must be the appender's.
    pub topic_prefix: String,
    /// Consumer group on the clock topic. A new group starts at the beginning of
    /// the clock history.
    pub group_id: String,
    /// Regions with their own weather, the same for every world.
    pub regions: Vec<String>,
    /// Seed of the model.
    pub seed: u64,
    /// Stop after handling this many clock records (tests, benchmarks).
    pub stop_after_ticks: Option<u64>,
    /// Stop once every partition of the clock topic has been read to its end
    /// (tests, one-off backfills). Needs to be the only member of its group.
    pub stop_at_end: bool,
    /// Largest number of clock records handled (and committed) together.
    pub batch_max_ticks: usize,
}

impl WeatherOptions {
    /// The options of `worldline produce weather`, running until shutdown.
    pub fn from_settings(settings: &Settings) -> WeatherOptions {
        WeatherOptions {
            topic_prefix: settings.topics.prefix.clone(),
            group_id: settings.weather.group_id.clone(),
            regions: settings.weather.regions.clone(),
            seed: settings.weather.seed,
            stop_after_ticks: None,
            stop_at_end: false,
            batch_max_ticks: 1000,
        }
    }
}

/// What a run of the weather producer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeatherStats {
    /// Clock records handled (and committed).
    pub clock_records: u64,
    /// Weather events appended.
    pub events_appended: u64,
    /// Weather events not appended because the log already had them (a restart
    /// after a crash between append and commit).
    pub events_already_in_log: u64,
    /// Worlds seen.
    pub worlds: usize,
}

/// Errors that stop the weather producer.
#[derive(Debug, thiserror::Error)]
pub enum WeatherError {
    #[error("invalid weather options: {0}")]
    InvalidOptions(String),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Append(#[from] AppendError),
}

/// The topics the producer reads and writes, with their partition counts.
#[derive(Debug, Clone)]
struct Topics {
    clock: String,
    weather: String,
    clock_partitions: i32,
    weather_partitions: i32,
}

/// One record of the clock topic, taken out of the consumer.
#[derive(Debug)]
struct ClockRecord {
    partition: i32,
    offset: i64,
    /// `None` for a record that is not a valid event (a dead letter, skipped).
    envelope: Option<Envelope>,
}

/// What the next read from the clock topic gave.
#[derive(Debug)]
enum Fetched {
    Records(Vec<ClockRecord>),
    /// Every partition is read to its end (only with `stop_at_end`).
    EndOfHistory,
    Shutdown,
}

/// Derives weather from the clock topic until `shutdown` fires (or a stop
/// condition in `options` is met). See the module documentation for the
/// delivery guarantees.
pub async fn run_weather(
    kafka: &KafkaSettings,
    appender: &Appender,
    options: &WeatherOptions,
    shutdown: CancellationToken,
) -> Result<WeatherStats, WeatherError> {
    validate_options(appender, options)?;
    verify_event_topics(
        kafka,
        &TopicSettings {
            prefix: options.topic_prefix.clone(),
            ..TopicSettings::default()
        },
    )
    .await?;
    let reader = Arc::new(LogReader::new(kafka)?);
    let topics = {
        let reader = Arc::clone(&reader);
        let clock = Family::Clock.topic(&options.topic_prefix);
        let weather = Family::Weather.topic(&options.topic_prefix);
        blocking(move || {
            Ok::<_, KafkaError>(Topics {
                clock_partitions: reader.partition_count(&clock)?,
                weather_partitions: reader.partition_count(&weather)?,
                clock,
                weather,
            })
        })
        .await?
    };
    let consumer = clock_consumer(kafka, options)?;
    consumer.subscribe(&[&topics.clock])?;
    tracing::info!(group = %options.group_id, clock = %topics.clock, weather = %topics.weather, regions = ?options.regions, "weather producer started");

    let mut run = Run {
        options,
        topics,
        reader,
        worlds: HashMap::new(),
        stats: WeatherStats::default(),
    };
    let mut at_end: HashSet<i32> = HashSet::new();
    // Next offset per partition handled by this run, for the final commit.
    let mut handled: BTreeMap<i32, i64> = BTreeMap::new();
    loop {
        let remaining = options
            .stop_after_ticks
            .map(|stop| stop.saturating_sub(run.stats.clock_records));
        if remaining == Some(0) {
            break;
        }
        let max = remaining.map_or(options.batch_max_ticks, |r| {
            usize::try_from(r)
                .unwrap_or(usize::MAX)
                .min(options.batch_max_ticks)
        });
        let records =
            match next_batch(&consumer, &run.topics, max.max(1), &mut at_end, &shutdown).await {
                Fetched::Records(records) => records,
                Fetched::EndOfHistory | Fetched::Shutdown => break,
            };
        let envelopes = run.derive(&records).await?;
        let Some(appended) = append_until_acknowledged(appender, envelopes, &shutdown).await?
        else {
            // Stopped before the weather was acknowledged: those ticks stay
            // uncommitted and are handled again on the next start.
            break;
        };
        run.stats.events_appended += appended;
        run.stats.clock_records += records.len() as u64;
        let batch_next = next_offsets(&records);
        handled.extend(batch_next.iter().map(|(p, o)| (*p, *o)));
        // Asynchronous: a lost commit only means re-reading ticks whose weather
        // the read-back then finds in the log.
        if let Err(error) = consumer.commit(
            &offset_list(&run.topics.clock, &batch_next)?,
            CommitMode::Async,
        ) {
            tracing::warn!(%error, "committing clock offsets failed; the next commit carries them");
        }
    }
    if !handled.is_empty() {
        // Leave with every handled position stored, so the next run starts
        // right here. Should it fail, the next run re-reads those ticks and
        // the read-back finds their weather in the log: worth a warning, not
        // an error.
        if let Err(error) =
            consumer.commit(&offset_list(&run.topics.clock, &handled)?, CommitMode::Sync)
        {
            tracing::warn!(%error, "final commit of clock offsets failed; the next run re-reads those ticks");
        }
    }
    run.stats.worlds = run.worlds.len();
    tracing::info!(stats = ?run.stats, "weather producer stopped");
    Ok(run.stats)
}

fn validate_options(appender: &Appender, options: &WeatherOptions) -> Result<(), WeatherError> {
    if options.regions.is_empty() {
        return Err(WeatherError::InvalidOptions(
            "at least one region is needed".to_owned(),
        ));
    }
    let mut seen = HashSet::new();
    for region in &options.regions {
        if region.is_empty() {
            return Err(WeatherError::InvalidOptions(
                "region names must not be empty".to_owned(),
            ));
        }
        if !seen.insert(region) {
            return Err(WeatherError::InvalidOptions(format!(
                "region {region:?} is listed twice"
            )));
        }
    }
    if options.group_id.is_empty() {
        return Err(WeatherError::InvalidOptions(
            "the consumer group id must not be empty".to_owned(),
        ));
    }
    if appender.topic_for(Family::Weather) != Family::Weather.topic(&options.topic_prefix) {
        return Err(WeatherError::InvalidOptions(format!(
            "the appender writes to {} but the options name topic prefix {:?}",
            appender.topic_for(Family::Weather),
            options.topic_prefix
        )));
    }
    Ok(())
}

fn clock_consumer(
    kafka: &KafkaSettings,
    options: &WeatherOptions,
) -> Result<StreamConsumer, KafkaError> {
    base_client_config(kafka, "worldline-weather")
        .set("group.id", &options.group_id)
        // Offsets are committed by hand, only once the weather derived from
        // those ticks is acknowledged: a crash must not skip a tick.
        .set("enable.auto.commit", "false")
        // Nothing is stored implicitly on poll either: a commit names exactly
        // the records whose weather is in the log.
        .set("enable.auto.offset.store", "false")
        // A new group (a new weather producer) derives the weather of the whole
        // clock history, not only of ticks from now on (librdkafka's default).
        .set("auto.offset.reset", "earliest")
        // Report reaching the end of a partition, so a backfill can stop there.
        .set(
            "enable.partition.eof",
            if options.stop_at_end { "true" } else { "false" },
        )
        // Ticks are tiny and weather should follow the clock closely: answer
        // fetches as soon as anything is there.
        .set("fetch.wait.max.ms", "50")
        .create()
}

/// Reads up to `max` records: waits for the first, then takes whatever else
/// arrives promptly.
async fn next_batch(
    consumer: &StreamConsumer,
    topics: &Topics,
    max: usize,
    at_end: &mut HashSet<i32>,
    shutdown: &CancellationToken,
) -> Fetched {
    let all_at_end =
        |at_end: &HashSet<i32>| at_end.len() >= topics.clock_partitions.max(1) as usize;
    let mut records = Vec::new();
    let mut backoff = Duration::from_millis(100);
    while records.len() < max {
        let received = if records.is_empty() {
            if all_at_end(at_end) {
                return Fetched::EndOfHistory;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Fetched::Shutdown,
                received = consumer.recv() => received,
            }
        } else {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(received) => received,
                Err(_) => break,
            }
        };
        match received {
            Ok(message) => {
                at_end.remove(&message.partition());
                records.push(ClockRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    envelope: message.payload().and_then(|p| decode_envelope(p).ok()),
                });
                backoff = Duration::from_millis(100);
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                at_end.insert(partition);
                if records.is_empty() && all_at_end(at_end) {
                    return Fetched::EndOfHistory;
                }
            }
            Err(error) => {
                // Broker unreachable, leader moving: librdkafka recovers by itself.
                tracing::warn!(%error, "reading the clock topic failed; retrying");
                if !records.is_empty() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Fetched::Shutdown,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    Fetched::Records(records)
}

/// The offsets to commit after `records`: one past the last record of each partition.
fn next_offsets(records: &[ClockRecord]) -> BTreeMap<i32, i64> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for record in records {
        let entry = next.entry(record.partition).or_insert(0);
        *entry = (*entry).max(record.offset + 1);
    }
    next
}

fn offset_list(
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    Ok(list)
}

/// Appends `envelopes`, retrying the ones Kafka did not acknowledge with the
/// same envelope (same id). `None` when shutdown came first.
async fn append_until_acknowledged(
    appender: &Appender,
    mut envelopes: Vec<Envelope>,
    shutdown: &CancellationToken,
) -> Result<Option<u64>, WeatherError> {
    let mut appended = 0u64;
    let mut backoff = Duration::from_millis(100);
    while !envelopes.is_empty() {
        let results = appender.append_batch(&envelopes).await;
        let mut retry = Vec::new();
        for (envelope, result) in envelopes.into_iter().zip(results) {
            match result {
                Ok(_) => appended += 1,
                Err(error) if error.is_retryable() => {
                    tracing::warn!(world = %envelope.world_id, tick = envelope.world_tick, %error, "weather event not acknowledged; retrying");
                    retry.push(envelope);
                }
                Err(error) => return Err(error.into()),
            }
        }
        envelopes = retry;
        if !envelopes.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
    Ok(Some(appended))
}

/// Runs blocking Kafka reads on the blocking pool.
async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<KafkaError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|_| Err(KafkaError::Canceled.into()))
}

/// The state of one run.
struct Run<'a> {
    options: &'a WeatherOptions,
    topics: Topics,
    reader: Arc<LogReader>,
    worlds: HashMap<WorldId, WorldState>,
    stats: WeatherStats,
}

impl Run<'_> {
    /// The weather events derived from `records`, minus those already in the log.
    async fn derive(&mut self, records: &[ClockRecord]) -> Result<Vec<Envelope>, WeatherError> {
        let mut out = Vec::new();
        for record in records {
            let Some(envelope) = &record.envelope else {
                tracing::warn!(
                    partition = record.partition,
                    offset = record.offset,
                    "skipping an invalid record in the clock topic"
                );
                continue;
            };
            let (Some(clock), Ok(world)) = (
                ClockReading::from_envelope(envelope),
                WorldId::parse(&envelope.world_id),
            ) else {
                continue;
            };
            if must_load(self.worlds.get(&world), &clock) {
                let state = self.load(&world, &clock, record).await?;
                self.worlds.insert(world.clone(), state);
            }
            let Some(state) = self.worlds.get_mut(&world) else {
                continue;
            };
            let previous = state.last.filter(|last| last.tick + 1 == clock.tick);
            let derived = weather_envelopes(
                self.options.seed,
                &self.options.regions,
                envelope,
                previous.as_ref(),
            );
            let (fresh, already) = not_yet_written(derived, &mut state.written);
            self.stats.events_already_in_log += already;
            out.extend(fresh);
            state.last = Some(clock);
        }
        Ok(out)
    }

    async fn load(
        &self,
        world: &WorldId,
        clock: &ClockReading,
        record: &ClockRecord,
    ) -> Result<WorldState, WeatherError> {
        let reader = Arc::clone(&self.reader);
        let topics = self.topics.clone();
        let regions = self.options.regions.clone();
        let world = world.clone();
        let clock = *clock;
        let (partition, offset) = (record.partition, record.offset);
        let state = blocking(move || {
            load_world(
                &reader, &topics, &regions, &world, &clock, partition, offset,
            )
        })
        .await?;
        tracing::debug!(written = ?state.written, "world loaded from the log");
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use worldline_schemas::EnvelopeExt;

    const SEED: u64 = 7;

    fn world(name: &str) -> WorldId {
        WorldId::parse(name).unwrap()
    }

    /// The reading of the clock at `tick` with `step_s` game seconds per tick,
    /// starting on game day `start_day`.
    fn reading(tick: u64, step_s: u64, start_day: u64) -> ClockReading {
        let game_time_s = start_day * GAME_SECONDS_PER_DAY + tick * step_s;
        let day = game_time_s / GAME_SECONDS_PER_DAY;
        ClockReading {
            tick,
            game_time_s,
            day: day as u32,
            season: season_of_day(day),
        }
    }

    /// Conditions of one region, one reading per game minute, over `days` game days.
    fn minute_by_minute(
        seed: u64,
        region: &str,
        start_day: u64,
        days: u64,
    ) -> Vec<(ClockReading, Weather)> {
        (1..=days * 1440)
            .map(|tick| {
                let clock = reading(tick, 60, start_day);
                (clock, weather_at(seed, &world("emberfall"), region, &clock))
            })
            .collect()
    }

    fn share(weathers: &[(ClockReading, Weather)], condition: WeatherCondition) -> f64 {
        weathers
            .iter()
            .filter(|(_, w)| w.condition == condition)
            .count() as f64
            / weathers.len() as f64
    }

    fn mean_temperature_c(weathers: &[(ClockReading, Weather)]) -> f64 {
        weathers
            .iter()
            .map(|(_, w)| f64::from(w.temperature_dc) / 10.0)
            .sum::<f64>()
            / weathers.len() as f64
    }

    #[test]
    fn given_the_same_inputs_when_weather_is_computed_twice_then_it_is_identical() {
        let a = minute_by_minute(SEED, "coast", 0, 3);
        let b = minute_by_minute(SEED, "coast", 0, 3);
        assert_eq!(a, b);
    }

    #[test]
    fn given_another_seed_world_or_region_when_weather_is_computed_then_it_differs() {
        let base = minute_by_minute(SEED, "coast", 0, 3);
        assert_ne!(base, minute_by_minute(SEED + 1, "coast", 0, 3));
        assert_ne!(base, minute_by_minute(SEED, "inland", 0, 3));
        let other_world: Vec<Weather> = (1..=3 * 1440)
            .map(|tick| weather_at(SEED, &world("other"), "coast", &reading(tick, 60, 0)))
            .collect();
        let base_weather: Vec<Weather> = base.iter().map(|(_, w)| *w).collect();
        assert_ne!(base_weather, other_world);
    }

    #[test]
    fn given_minute_ticks_when_a_region_is_watched_for_a_month_then_weather_persists_for_hours_and_still_changes()
     {
        for region in ["north", "south", "east", "west", "coast"] {
            let weathers = minute_by_minute(SEED, region, 0, 28);
            let changes = weathers
                .windows(2)
                .filter(|pair| pair[0].1.condition != pair[1].1.condition)
                .count();
            let mean_spell_minutes = weathers.len() as f64 / (changes + 1) as f64;
            assert!(
                changes >= 28,
                "{region}: weather should change at least daily, changed {changes} times in 28 days"
            );
            assert!(
                mean_spell_minutes >= 90.0,
                "{region}: weather should last hours, lasted {mean_spell_minutes:.0} game minutes on average"
            );
        }
    }

    #[test]
    fn given_each_season_when_a_region_is_watched_then_summer_is_hot_and_clear_and_winter_cold_and_snowy()
     {
        let season = |start_day: u64| minute_by_minute(SEED, "west", start_day, 28);
        let (summer, autumn, winter) = (season(28), season(56), season(84));
        assert!(
            mean_temperature_c(&summer) > mean_temperature_c(&winter) + 12.0,
            "summer {:.1} °C, winter {:.1} °C",
            mean_temperature_c(&summer),
            mean_temperature_c(&winter)
        );
        assert!(share(&winter, WeatherCondition::Snow) > 0.05);
        assert_eq!(share(&summer, WeatherCondition::Snow), 0.0);
        assert_eq!(share(&winter, WeatherCondition::Storm), 0.0);
        assert!(share(&summer, WeatherCondition::Clear) > share(&autumn, WeatherCondition::Clear));
        assert!(share(&autumn, WeatherCondition::Fog) > share(&summer, WeatherCondition::Fog));
    }

    #[test]
    fn given_a_whole_year_when_conditions_are_counted_then_every_condition_occurs() {
        let year = minute_by_minute(SEED, "west", 0, 112);
        for condition in [
            WeatherCondition::Clear,
            WeatherCondition::Cloudy,
            WeatherCondition::Fog,
            WeatherCondition::Rain,
            WeatherCondition::Storm,
            WeatherCondition::Snow,
        ] {
            assert!(
                share(&year, condition) > 0.005,
                "{condition:?} is {:.3} of the year",
                share(&year, condition)
            );
        }
    }

    #[test]
    fn given_day_and_night_when_temperatures_are_compared_then_afternoons_are_warmer_than_nights() {
        let days = minute_by_minute(SEED, "east", 0, 28);
        let at = |hours: std::ops::Range<f64>| -> Vec<(ClockReading, Weather)> {
            days.iter()
                .filter(|(clock, _)| hours.contains(&clock.hour()))
                .copied()
                .collect()
        };
        let (afternoon, night) = (at(13.0..17.0), at(1.0..5.0));
        assert!(mean_temperature_c(&afternoon) > mean_temperature_c(&night) + 5.0);
        let fog_hours: Vec<f64> = days
            .iter()
            .filter(|(_, w)| w.condition == WeatherCondition::Fog)
            .map(|(clock, _)| clock.hour())
            .collect();
        assert!(fog_hours.iter().all(|hour| FOG_HOURS.contains(hour)));
    }

    #[test]
    fn given_regions_with_climates_when_compared_then_coast_is_windier_and_north_colder() {
        let mean_wind = |weathers: &[(ClockReading, Weather)]| {
            weathers
                .iter()
                .map(|(_, w)| f64::from(w.wind_dmps))
                .sum::<f64>()
                / weathers.len() as f64
        };
        let coast = minute_by_minute(SEED, "coast", 0, 56);
        let east = minute_by_minute(SEED, "east", 0, 56);
        assert!(mean_wind(&coast) > mean_wind(&east) + 20.0);
        let wet = |w: &[(ClockReading, Weather)]| {
            share(w, WeatherCondition::Rain) + share(w, WeatherCondition::Storm)
        };
        assert!(wet(&coast) > wet(&east));
        let north = minute_by_minute(SEED, "north", 0, 56);
        let south = minute_by_minute(SEED, "south", 0, 56);
        assert!(mean_temperature_c(&north) < mean_temperature_c(&south) - 6.0);
    }

    #[test]
    fn given_consecutive_ticks_when_changes_are_listed_then_each_names_the_condition_before_it() {
        let regions: Vec<String> = ["north", "coast"].map(str::to_owned).to_vec();
        let w = world("emberfall");
        let first = changes_at(SEED, &w, &regions, &reading(1, 600, 0), None);
        assert_eq!(first.len(), 2, "tick 1 reports every region");
        assert!(
            first
                .iter()
                .all(|c| c.previous_condition == WeatherCondition::Unspecified as i32)
        );
        let mut changes = 0;
        for tick in 2..2000 {
            let (before, now) = (reading(tick - 1, 600, 0), reading(tick, 600, 0));
            for change in changes_at(SEED, &w, &regions, &now, Some(&before)) {
                changes += 1;
                let previous = weather_at(SEED, &w, &change.region, &before);
                assert_eq!(change.previous_condition, previous.condition as i32);
                assert_ne!(change.condition, change.previous_condition);
            }
        }
        assert!(changes > 10);
    }

    #[test]
    fn given_a_clock_event_when_weather_envelopes_are_built_then_ids_time_and_cause_come_from_it() {
        let w = world("emberfall");
        let regions: Vec<String> = ["north", "south"].map(str::to_owned).to_vec();
        let clock = ClockTicked {
            game_time_s: 60,
            day: 0,
            season: Season::Spring as i32,
            time_scale: 60,
        };
        let clock_event =
            worldline_schemas::envelope::new_envelope(&w, 1, "clock", Body::ClockTicked(clock));
        let events = weather_envelopes(SEED, &regions, &clock_event, None);
        assert_eq!(events.len(), 2);
        for (event, region) in events.iter().zip(&regions) {
            event.validate().unwrap();
            assert_eq!(event.event_uuid(), weather_event_id(&w, region, 1));
            assert_eq!(event.event_uuid().get_version_num(), 5);
            assert_eq!(event.occurred_at_ms, clock_event.occurred_at_ms);
            assert_eq!(event.causation_id, clock_event.event_id);
            assert_eq!(event.world_tick, 1);
            assert_eq!(event.source, WEATHER_SOURCE);
        }
        assert_eq!(
            events,
            weather_envelopes(SEED, &regions, &clock_event, None),
            "byte-identical when built again"
        );
    }

    #[test]
    fn event_ids_differ_per_world_region_and_tick() {
        let w = world("emberfall");
        let base = weather_event_id(&w, "north", 5);
        assert_ne!(base, weather_event_id(&world("other"), "north", 5));
        assert_ne!(base, weather_event_id(&w, "south", 5));
        assert_ne!(base, weather_event_id(&w, "north", 6));
        assert_eq!(base, weather_event_id(&w, "north", 5));
    }

    #[test]
    fn given_a_world_when_its_ticks_continue_then_it_is_loaded_only_on_first_sight_or_a_gap() {
        let state = |last: Option<u64>| WorldState {
            last: last.map(|tick| reading(tick, 60, 0)),
            written: HashMap::new(),
        };
        assert!(must_load(None, &reading(5, 60, 0)), "first sight");
        assert!(
            !must_load(Some(&state(Some(4))), &reading(5, 60, 0)),
            "continues"
        );
        assert!(
            must_load(Some(&state(Some(7))), &reading(5, 60, 0)),
            "redelivered"
        );
        assert!(
            must_load(Some(&state(Some(2))), &reading(5, 60, 0)),
            "handled elsewhere"
        );
        assert!(
            must_load(Some(&state(None)), &reading(5, 60, 0)),
            "no tick before"
        );
    }

    #[test]
    fn given_weather_already_in_the_log_when_ticks_are_handled_again_then_only_later_ticks_are_kept()
     {
        let w = world("emberfall");
        let regions: Vec<String> = ["north", "south"].map(str::to_owned).to_vec();
        let event = |tick: u64| {
            let clock = worldline_schemas::envelope::new_envelope(
                &w,
                tick,
                "clock",
                Body::ClockTicked(ClockTicked {
                    game_time_s: tick * 3600,
                    day: (tick / 24) as u32,
                    season: Season::Spring as i32,
                    time_scale: 60,
                }),
            );
            // No previous reading: every region reports, which makes the counts plain.
            weather_envelopes(SEED, &regions, &clock, None)
        };
        // The log holds north up to tick 12 and south up to tick 10 (a batch
        // that was only partly acknowledged before a crash).
        let mut written: HashMap<String, u64> =
            HashMap::from([("north".to_owned(), 12), ("south".to_owned(), 10)]);
        let (fresh, dropped) = not_yet_written(event(11), &mut written);
        assert_eq!(dropped, 1);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].event_uuid(), weather_event_id(&w, "south", 11));
        let (fresh, dropped) = not_yet_written(event(13), &mut written);
        assert_eq!((fresh.len(), dropped), (2, 0));
        assert_eq!(written["north"], 13);
    }

    #[test]
    fn the_cosine_approximation_is_close_everywhere() {
        for step in -200..=200 {
            let turns = f64::from(step) / 100.0;
            let exact = (turns * std::f64::consts::TAU).cos();
            assert!((cos_turns(turns) - exact).abs() < 0.002, "at {turns} turns");
        }
    }
}
