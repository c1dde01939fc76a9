//! `worldline produce clock`: one game clock per world.
//!
//! The log is the clock's memory. On start the producer reads each world's last
//! `ClockTicked` back from its partition and continues from the next tick, so a
//! restart neither skips nor repeats a tick. A tick is appended before the next
//! one is made; a failed append is retried with the same envelope (same event id)
//! until it is acknowledged or the process is told to stop.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use worldline_ops::config::KafkaSettings;
use worldline_ops::kafka::base_client_config;
use worldline_schemas::envelope::new_envelope;
use worldline_schemas::pb::envelope::Body;
use worldline_schemas::pb::{ClockTicked, Envelope, Season};
use worldline_schemas::{WorldId, decode_envelope};

use crate::appender::{AppendError, Appender};
use crate::partitioner::partition_for_key;

/// Game days per season; four seasons make a year of 112 game days.
pub const SEASON_LENGTH_DAYS: u64 = 28;
const GAME_SECONDS_PER_DAY: u64 = 86_400;

/// Where a world's clock stands: the last tick appended and the game time it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockPosition {
    pub tick: u64,
    pub game_time_s: u64,
}

/// The season of a game day.
pub fn season_of_day(day: u64) -> Season {
    match (day / SEASON_LENGTH_DAYS) % 4 {
        0 => Season::Spring,
        1 => Season::Summer,
        2 => Season::Autumn,
        _ => Season::Winter,
    }
}

/// The tick after `position`: pure, so resumption and replays agree exactly.
pub fn next_tick(
    position: ClockPosition,
    tick_interval_ms: u64,
    time_scale: u32,
) -> (ClockPosition, ClockTicked) {
    let advance_s = tick_interval_ms.saturating_mul(u64::from(time_scale)) / 1000;
    let next = ClockPosition {
        tick: position.tick + 1,
        game_time_s: position.game_time_s + advance_s,
    };
    let day = next.game_time_s / GAME_SECONDS_PER_DAY;
    let body = ClockTicked {
        game_time_s: next.game_time_s,
        day: u32::try_from(day).unwrap_or(u32::MAX),
        season: season_of_day(day) as i32,
        time_scale,
    };
    (next, body)
}

/// Errors that stop the clock producer.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("could not read the clock topic to resume: {0}")]
    Resume(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Append(#[from] AppendError),
}

/// Reads the last `ClockTicked` of `world` from `topic`, scanning its partition
/// backwards in growing windows. `None` when the world has never ticked.
pub fn last_clock_position(
    kafka: &KafkaSettings,
    topic: &str,
    world: &WorldId,
) -> Result<Option<ClockPosition>, ClockError> {
    let consumer: BaseConsumer = base_client_config(kafka, "worldline-clock-resume")
        // A reader that joins no group and commits nothing.
        .set("group.id", "worldline-clock-resume")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        return Ok(None);
    }
    let partition = partition_for_key(world.as_str().as_bytes(), partitions as i32);
    let (low, high) = fetch_watermarks_patiently(&consumer, topic, partition)?;
    let mut window: i64 = 256;
    let mut end = high;
    while end > low {
        let start = (end - window).max(low);
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let mut found: Option<ClockPosition> = None;
        let mut next_offset = start;
        while next_offset < end {
            let Some(message) = consumer.poll(timeout) else {
                return Err(ClockError::Resume(
                    rdkafka::error::KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::RequestTimedOut,
                    ),
                ));
            };
            let message = message?;
            next_offset = message.offset() + 1;
            if message.offset() >= end || message.key() != Some(world.as_str().as_bytes()) {
                continue;
            }
            // Undecodable records are the projectors' dead letters; the clock
            // only needs its own ticks.
            if let Some(Ok(envelope)) = message.payload().map(decode_envelope)
                && let Some(Body::ClockTicked(tick)) = envelope.body
            {
                found = Some(ClockPosition {
                    tick: envelope.world_tick,
                    game_time_s: tick.game_time_s,
                });
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        end = start;
        window = window.saturating_mul(4);
    }
    Ok(None)
}

/// Watermarks, retrying the errors a partition gives while its leader moves.
fn fetch_watermarks_patiently(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), ClockError> {
    let mut attempt = 0;
    loop {
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
            Ok(watermarks) => return Ok(watermarks),
            Err(error) if attempt < 20 => {
                tracing::debug!(%error, topic, partition, "watermarks not available yet; retrying");
                attempt += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// One world's clock inside the producer.
#[derive(Debug)]
struct WorldClock {
    world: WorldId,
    position: ClockPosition,
}

/// Settings of one clock producer process.
#[derive(Debug, Clone)]
pub struct ClockOptions {
    pub worlds: Vec<WorldId>,
    pub tick_interval_ms: u64,
    pub time_scale: u32,
    /// Stop after this many ticks per world (benchmarks, tests); `None` runs until shutdown.
    pub max_ticks: Option<u64>,
}

/// Runs the clocks until `shutdown` fires (or `max_ticks` is reached). Returns the
/// last tick appended per world.
pub async fn run_clock(
    kafka: &KafkaSettings,
    appender: &Appender,
    options: &ClockOptions,
    shutdown: CancellationToken,
) -> Result<Vec<(WorldId, ClockPosition)>, ClockError> {
    let topic = appender.topic_for(worldline_schemas::Family::Clock);
    let mut clocks = Vec::with_capacity(options.worlds.len());
    for world in &options.worlds {
        let kafka = kafka.clone();
        let topic = topic.clone();
        let world_for_scan = world.clone();
        let position = tokio::task::spawn_blocking(move || {
            last_clock_position(&kafka, &topic, &world_for_scan)
        })
        .await
        .map_err(|_| ClockError::Resume(rdkafka::error::KafkaError::Canceled))??
        .unwrap_or_default();
        tracing::info!(world = %world, resumed_after_tick = position.tick, "clock ready");
        clocks.push(WorldClock {
            world: world.clone(),
            position,
        });
    }

    let mut interval =
        tokio::time::interval(Duration::from_millis(options.tick_interval_ms.max(1)));
    // After a stall (Kafka down), tick once and carry on at the normal rate
    // rather than bursting to "catch up": ticks count steps, not wall time.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks_made = 0u64;
    loop {
        if options.max_ticks.is_some_and(|max| ticks_made >= max) {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let mut batch: Vec<(usize, ClockPosition, Envelope)> = clocks
            .iter()
            .enumerate()
            .map(|(index, clock)| {
                let (next, body) =
                    next_tick(clock.position, options.tick_interval_ms, options.time_scale);
                let envelope =
                    new_envelope(&clock.world, next.tick, "clock", Body::ClockTicked(body));
                (index, next, envelope)
            })
            .collect();
        let mut backoff = Duration::from_millis(100);
        while !batch.is_empty() {
            let envelopes: Vec<Envelope> = batch.iter().map(|(_, _, e)| e.clone()).collect();
            let results = appender.append_batch(&envelopes).await;
            let mut retry = Vec::new();
            for ((index, next, envelope), result) in batch.into_iter().zip(results) {
                match result {
                    Ok(_) => clocks[index].position = next,
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(world = %clocks[index].world, tick = next.tick, %error, "tick not acknowledged; retrying");
                        retry.push((index, next, envelope));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            batch = retry;
            if !batch.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        return Ok(positions(&clocks));
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        ticks_made += 1;
    }
    Ok(positions(&clocks))
}

fn positions(clocks: &[WorldClock]) -> Vec<(WorldId, ClockPosition)> {
    clocks
        .iter()
        .map(|c| (c.world.clone(), c.position))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_fresh_world_when_it_ticks_then_it_starts_at_tick_one_day_zero_spring() {
        let (position, body) = next_tick(ClockPosition::default(), 1000, 60);
        assert_eq!(
            position,
            ClockPosition {
                tick: 1,
                game_time_s: 60
            }
        );
        assert_eq!(body.day, 0);
        assert_eq!(body.season, Season::Spring as i32);
        assert_eq!(body.time_scale, 60);
    }

    #[test]
    fn given_a_resumed_position_when_it_ticks_then_time_continues_from_there() {
        let resumed = ClockPosition {
            tick: 1439,
            game_time_s: 1439 * 60,
        };
        let (position, body) = next_tick(resumed, 1000, 60);
        assert_eq!(position.tick, 1440);
        assert_eq!(body.game_time_s, 86_400);
        assert_eq!(body.day, 1, "1440 game minutes make a day");
    }

    #[test]
    fn seasons_cycle_every_twenty_eight_days() {
        assert_eq!(season_of_day(0), Season::Spring);
        assert_eq!(season_of_day(27), Season::Spring);
        assert_eq!(season_of_day(28), Season::Summer);
        assert_eq!(season_of_day(56), Season::Autumn);
        assert_eq!(season_of_day(84), Season::Winter);
        assert_eq!(season_of_day(112), Season::Spring);
    }
}
