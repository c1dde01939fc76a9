//! Lag per projector and partition, reported beside the batch loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::batch::{PartitionKey, Positions};
use super::context::{MemberInfo, SetContext, SharedLogEnds, SharedOwnership, lock};
use crate::store::record_log_ends;

/// How often lag is reported; librdkafka's statistics (the usual source of
/// high watermarks) arrive every `statistics.interval.ms` = 1 s.
const LAG_REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Statistics are delivered only while the consumer is polled, which stops while
/// a batch is retried; past this age the lag reporter asks the brokers itself.
const STALE_LOG_ENDS: Duration = Duration::from_millis(2500);

/// The log ends last stored, and when all of them were last refreshed.
#[derive(Debug, Default)]
struct RecordedEnds {
    ends: HashMap<PartitionKey, i64>,
    at: Option<Instant>,
}

/// What the reporter remembers about a partition between two reports.
struct Reported {
    position: Option<i64>,
    /// When `position` last changed (or the partition was first seen).
    since: Instant,
}

/// Reports lag per owned partition every [`LAG_REPORT_INTERVAL`], whatever the
/// batch loop is doing (a batch retried through a database outage must not
/// freeze the very gauges that show the outage), and stores log ends in each
/// projector's schema for readers without a Kafka client.
pub(super) struct LagReporter {
    pub pool: PgPool,
    pub members: Arc<[MemberInfo]>,
    pub consumer: Arc<StreamConsumer<SetContext>>,
    pub ownership: SharedOwnership,
    pub log_ends: SharedLogEnds,
}

impl LagReporter {
    pub async fn run(self, stop: CancellationToken) {
        let mut reported: Vec<HashMap<PartitionKey, Reported>> =
            self.members.iter().map(|_| HashMap::new()).collect();
        let mut recorded: Vec<RecordedEnds> = self
            .members
            .iter()
            .map(|_| RecordedEnds::default())
            .collect();
        let mut every = tokio::time::interval(LAG_REPORT_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let (positions, unapplied) = {
                let ownership = lock(&self.ownership);
                (ownership.positions.clone(), ownership.unapplied.clone())
            };
            self.refresh_stale_log_ends(&positions).await;
            let ends = lock(&self.log_ends).ends.clone();
            for (index, member) in self.members.iter().enumerate() {
                report(
                    member.name,
                    &positions[index],
                    &unapplied[index],
                    &ends,
                    &mut reported[index],
                );
                self.record_log_ends(member, &positions[index], &ends, &mut recorded[index])
                    .await;
            }
        }
    }

    /// Statistics stop while the batch loop retries (they are delivered only
    /// when the consumer is polled); then ask the partition leaders directly.
    async fn refresh_stale_log_ends(&self, positions: &[Positions]) {
        let stale = lock(&self.log_ends)
            .refreshed_at
            .is_none_or(|at| at.elapsed() >= STALE_LOG_ENDS);
        let mut keys: Vec<PartitionKey> = positions
            .iter()
            .flat_map(|owned| owned.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        if !stale || keys.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        let fetched = tokio::task::spawn_blocking(move || {
            // One budget for all partitions, so an unreachable cluster delays
            // the next report (and shutdown) by at most this much.
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut ends = Vec::with_capacity(keys.len());
            for (topic, partition) in keys {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match consumer.fetch_watermarks(&topic, partition, left) {
                    Ok((_, high)) => ends.push(((topic, partition), high)),
                    Err(error) => {
                        tracing::debug!(%error, topic, partition, "could not fetch the log end");
                        break;
                    }
                }
            }
            ends
        })
        .await
        .unwrap_or_default();
        if fetched.is_empty() {
            return;
        }
        let mut log_ends = lock(&self.log_ends);
        for (key, high) in fetched {
            let end = log_ends.ends.entry(key).or_insert(high);
            *end = (*end).max(high);
        }
        log_ends.refreshed_at = Some(Instant::now());
    }

    /// Stores the log ends of owned partitions that moved (or were last stored
    /// long ago, so readers can tell a live figure from a stale one). Best
    /// effort: lag reporting never holds up or fails the projector.
    async fn record_log_ends(
        &self,
        member: &MemberInfo,
        owned: &Positions,
        known: &HashMap<PartitionKey, i64>,
        recorded: &mut RecordedEnds,
    ) {
        let refresh_all = recorded
            .at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        let ends: Vec<(String, i32, i64)> = owned
            .keys()
            .filter_map(|key| {
                let end = *known.get(key)?;
                (refresh_all || recorded.ends.get(key) != Some(&end))
                    .then(|| (key.0.clone(), key.1, end))
            })
            .collect();
        if ends.is_empty() {
            return;
        }
        let write = record_log_ends(&self.pool, &member.schema, &ends);
        match tokio::time::timeout(Duration::from_secs(1), write).await {
            Ok(Ok(())) => {
                for (topic, partition, end) in ends {
                    recorded.ends.insert((topic, partition), end);
                }
                if refresh_all {
                    recorded.at = Some(Instant::now());
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "could not record log ends"),
            Err(_elapsed) => tracing::debug!("recording log ends timed out"),
        }
    }
}

/// `lag_records`: records between the stored position and the log end.
/// `lag_seconds`: the age of the oldest record not yet applied, from its
/// Kafka timestamp once this instance has read it; until then (it is still
/// on the broker), the time since the partition last advanced or was
/// assigned, a lower bound. Both are 0 when the partition is caught up.
/// A partition that moved to another instance is reported as 0 here: its
/// new owner reports it, and sums across instances stay right.
fn report(
    projector: &'static str,
    owned: &Positions,
    unapplied: &HashMap<PartitionKey, i64>,
    ends: &HashMap<PartitionKey, i64>,
    reported: &mut HashMap<PartitionKey, Reported>,
) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    reported.retain(|key, _| {
        let keep = owned.contains_key(key);
        if !keep {
            set_lag(projector, key, 0, 0.0);
        }
        keep
    });
    for (key, position) in owned {
        let state = reported.entry(key.clone()).or_insert(Reported {
            position: *position,
            since: Instant::now(),
        });
        if state.position != *position {
            state.position = *position;
            state.since = Instant::now();
        }
        let Some(&high) = ends.get(key) else {
            continue;
        };
        let records = (high - position.unwrap_or(0)).max(0);
        let seconds = if records == 0 {
            0.0
        } else if let Some(&ts) = unapplied.get(key) {
            ((now_ms - ts).max(0) as f64) / 1000.0
        } else {
            state.since.elapsed().as_secs_f64()
        };
        set_lag(projector, key, records, seconds);
    }
}

fn set_lag(projector: &'static str, (topic, partition): &PartitionKey, records: i64, seconds: f64) {
    let labels = [
        ("projector", projector.to_owned()),
        ("topic", topic.clone()),
        ("partition", partition.to_string()),
    ];
    metrics::gauge!("worldline_projector_lag_records", &labels).set(records as f64);
    metrics::gauge!("worldline_projector_lag_seconds", &labels).set(seconds);
}
