//! `worldline produce clock`: one game clock per world.
//!
//! The log is the clock's memory. On start the producer reads each world's last
//! `ClockTicked` back from its partition and continues from the next tick, so a
//! restart neither skips nor repeats a tick. A tick is appended before the next
//! one is made, so each world has at most one tick in flight.
//!
//! A failed append is not simply sent again: librdkafka reports a message that
//! timed out in flight as failed even though the broker may have stored it, and a
//! second send would then put the tick in the log twice. So after a failure the
//! producer asks the log first: a tick the log already holds is taken as
//! appended, and only a tick it lacks is sent again (same envelope, same event
//! id). `worldline produce clock` also appends without a delivery timeout
//! ([`appender_options`]), so while its producer is healthy librdkafka's own
//! retries (which the broker deduplicates) are the only ones.

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

use crate::appender::{AppendError, Appender, AppenderOptions};
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

/// How long a shutdown waits for the append in flight before leaving it to the
/// final flush (the next start reads the log, so nothing is skipped either way).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A tick whose append failed: the world's index, its position after the tick,
/// and the envelope to send again if the log lacks it.
type PendingTick = (usize, ClockPosition, Envelope);

/// How the clock producer appends: without a delivery timeout, so a tick is
/// never reported as failed while the broker may still have stored it; while
/// the producer is healthy, librdkafka retries it under the same sequence
/// number (the broker drops repeats) until it is acknowledged.
pub fn appender_options(topic_prefix: &str) -> AppenderOptions {
    AppenderOptions {
        topic_prefix: topic_prefix.to_owned(),
        source: "clock".to_owned(),
        delivery_timeout: Duration::ZERO,
    }
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
            let append = appender.append_batch(&envelopes);
            tokio::pin!(append);
            let results = tokio::select! {
                biased;
                results = &mut append => results,
                _ = shutdown.cancelled() => {
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut append).await {
                        Ok(results) => results,
                        Err(_) => return Ok(positions(&clocks)),
                    }
                }
            };
            let mut failed: Vec<PendingTick> = Vec::new();
            for ((index, next, envelope), result) in batch.into_iter().zip(results) {
                match result {
                    Ok(_) => clocks[index].position = next,
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(world = %clocks[index].world, tick = next.tick, %error, "tick not acknowledged; checking the log before sending it again");
                        failed.push((index, next, envelope));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            if failed.is_empty() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(positions(&clocks)),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match not_in_log(kafka, &topic, &mut clocks, failed, &shutdown).await? {
                Some(missing) => batch = missing,
                None => return Ok(positions(&clocks)),
            }
        }
        ticks_made += 1;
    }
    Ok(positions(&clocks))
}

/// Of the `failed` ticks, those the log does not hold; the worlds whose tick the
/// log does hold move on to it. A failed read of the log is retried (never
/// guessed), until `shutdown`, which returns `None`.
async fn not_in_log(
    kafka: &KafkaSettings,
    topic: &str,
    clocks: &mut [WorldClock],
    failed: Vec<PendingTick>,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<PendingTick>>, ClockError> {
    let mut missing = Vec::with_capacity(failed.len());
    for (index, next, envelope) in failed {
        let mut backoff = Duration::from_millis(100);
        let logged = loop {
            let (kafka, topic, world) =
                (kafka.clone(), topic.to_owned(), clocks[index].world.clone());
            let read =
                tokio::task::spawn_blocking(move || last_clock_position(&kafka, &topic, &world))
                    .await
                    .map_err(|_| ClockError::Resume(rdkafka::error::KafkaError::Canceled))?;
            match read {
                Ok(logged) => break logged.unwrap_or_default(),
                Err(error) => {
                    tracing::warn!(world = %clocks[index].world, %error, "cannot read the clock topic yet; a tick is sent again only once the log says it is missing");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if logged.tick >= next.tick {
            tracing::info!(world = %clocks[index].world, tick = logged.tick, "the log holds the tick reported as failed; not sending it again");
            clocks[index].position = logged;
        } else {
            missing.push((index, next, envelope));
        }
    }
    Ok(Some(missing))
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
