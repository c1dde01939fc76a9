//! The inference read model: the log of model inferences, and per world, model,
//! purpose and minute: counts, tokens, cost and a latency histogram (p50/p95/p99
//! are read from it with `inference.histogram_quantile`).

use std::collections::HashMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use uuid::Uuid;
use worldline_schemas::Family;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::pb::envelope::Body;

use crate::projector::{ApplyError, Event, Projector};
use crate::read_models::copy::{Values, append_with};
use crate::read_models::fresh;
use crate::read_models::names::{inference_outcome, inference_purpose, to_i32, to_i64};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/inference");

/// Each (world, model, purpose, minute) bucket's figures of a batch added to
/// its row (`$1`-`$12`, one array per column of [`StatsColumns`]).
const ADD_TO_STATS: &str =
    "INSERT INTO model_stats AS s (world_id, model_id, purpose, bucket_start, inferences,
        failures, prompt_tokens, completion_tokens, cost_micro_usd, latency_sum_ms,
        latency_max_ms, latency_histogram)
    SELECT u.world_id, u.model_id, u.purpose, u.bucket_start, u.inferences, u.failures,
           u.prompt_tokens, u.completion_tokens, u.cost, u.latency_sum, u.latency_max,
           u.histogram::bigint[]
      FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[],
                  $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                  $11::int[], $12::text[])
        AS u(world_id, model_id, purpose, bucket_start, inferences, failures,
             prompt_tokens, completion_tokens, cost, latency_sum, latency_max, histogram)
    ON CONFLICT (world_id, model_id, purpose, bucket_start) DO UPDATE SET
        inferences = s.inferences + EXCLUDED.inferences,
        failures = s.failures + EXCLUDED.failures,
        prompt_tokens = s.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = s.completion_tokens + EXCLUDED.completion_tokens,
        cost_micro_usd = s.cost_micro_usd + EXCLUDED.cost_micro_usd,
        latency_sum_ms = s.latency_sum_ms + EXCLUDED.latency_sum_ms,
        latency_max_ms = GREATEST(s.latency_max_ms, EXCLUDED.latency_max_ms),
        latency_histogram = ARRAY(
            SELECT a + b FROM unnest(s.latency_histogram, EXCLUDED.latency_histogram) AS h(a, b)
        )";

/// Upper bounds (inclusive, ms) of the latency histogram's buckets; one more
/// bucket holds everything slower. Must match `histogram_quantile` in the migration.
pub const LATENCY_BOUNDS_MS: [u32; 19] = [
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000,
    20000,
];

/// The histogram bucket (0-based) of a latency.
pub fn latency_bucket(latency_ms: u32) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| latency_ms <= *bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// Projects `InferenceRecorded` events.
#[derive(Debug, Default)]
pub struct InferenceProjector;

/// One stats row being accumulated for a (world, model, purpose, minute).
#[derive(Debug, Default, Clone)]
struct Bucket {
    inferences: i64,
    failures: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: i64,
    latency_sum: i64,
    latency_max: i32,
    histogram: Vec<i64>,
}

impl Projector for InferenceProjector {
    fn name(&self) -> &'static str {
        "inference"
    }

    fn families(&self) -> &'static [Family] {
        &[Family::Inference]
    }

    fn migrator(&self) -> &'static Migrator {
        &MIGRATOR
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        async move {
            let (recorded, ids) = fresh::of_kind(events, |body| match body {
                Body::InferenceRecorded(inference) => Some(inference),
                _ => None,
            });
            // Only inferences not seen before are logged and feed the statistics.
            let mut log = InferenceColumns::default();
            for i in fresh::unseen(tx, "inferences", &ids).await? {
                log.push(&recorded[i].0.envelope, recorded[i].1);
            }
            if log.event_id.is_empty() {
                return Ok(());
            }
            let buckets = log.buckets(&log.event_id.iter().copied().collect());
            let mut columns = StatsColumns::default();
            for (key, bucket) in buckets {
                columns.push(key, &bucket);
            }
            // The log and the statistics in one statement.
            append_with(
                tx,
                "inferences",
                &log.columns(),
                ADD_TO_STATS,
                |statement| {
                    statement
                        .bind(columns.world_id)
                        .bind(columns.model_id)
                        .bind(columns.purpose)
                        .bind(columns.bucket_start)
                        .bind(columns.inferences)
                        .bind(columns.failures)
                        .bind(columns.prompt_tokens)
                        .bind(columns.completion_tokens)
                        .bind(columns.cost)
                        .bind(columns.latency_sum)
                        .bind(columns.latency_max)
                        .bind(columns.histogram)
                },
            )
            .await?;
            Ok(())
        }
        .boxed()
    }
}

type BucketKey = (String, String, &'static str, DateTime<Utc>);

/// Column arrays of the statistics upsert.
#[derive(Default)]
struct StatsColumns {
    world_id: Vec<String>,
    model_id: Vec<String>,
    purpose: Vec<&'static str>,
    bucket_start: Vec<DateTime<Utc>>,
    inferences: Vec<i64>,
    failures: Vec<i64>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    cost: Vec<i64>,
    latency_sum: Vec<i64>,
    latency_max: Vec<i32>,
    histogram: Vec<String>,
}

impl StatsColumns {
    fn push(&mut self, (world, model, purpose, minute): BucketKey, bucket: &Bucket) {
        self.world_id.push(world);
        self.model_id.push(model);
        self.purpose.push(purpose);
        self.bucket_start.push(minute);
        self.inferences.push(bucket.inferences);
        self.failures.push(bucket.failures);
        self.prompt_tokens.push(bucket.prompt_tokens);
        self.completion_tokens.push(bucket.completion_tokens);
        self.cost.push(bucket.cost);
        self.latency_sum.push(bucket.latency_sum);
        self.latency_max.push(bucket.latency_max);
        // Histograms travel as text ('{1,0,...}') because UNNEST would flatten
        // a two-dimensional bigint array.
        let counts: Vec<String> = bucket.histogram.iter().map(i64::to_string).collect();
        self.histogram.push(format!("{{{}}}", counts.join(",")));
    }
}

#[derive(Default)]
struct InferenceColumns {
    event_id: Vec<Uuid>,
    world_id: Vec<String>,
    tick: Vec<i64>,
    occurred_at: Vec<DateTime<Utc>>,
    model_id: Vec<String>,
    model_version: Vec<String>,
    purpose: Vec<&'static str>,
    prompt_tokens: Vec<i32>,
    completion_tokens: Vec<i32>,
    latency_ms: Vec<i32>,
    cost: Vec<i64>,
    outcome: Vec<&'static str>,
    npc_id: Vec<String>,
    input_hash: Vec<String>,
}

impl InferenceColumns {
    fn push(
        &mut self,
        envelope: &worldline_schemas::pb::Envelope,
        inference: &worldline_schemas::pb::InferenceRecorded,
    ) {
        self.event_id.push(envelope.event_uuid());
        self.world_id.push(envelope.world_id.clone());
        self.tick.push(to_i64(envelope.world_tick));
        self.occurred_at.push(envelope.occurred_at());
        self.model_id.push(inference.model_id.clone());
        self.model_version.push(inference.model_version.clone());
        self.purpose.push(inference_purpose(inference.purpose));
        self.prompt_tokens.push(to_i32(inference.prompt_tokens));
        self.completion_tokens
            .push(to_i32(inference.completion_tokens));
        self.latency_ms.push(to_i32(inference.latency_ms));
        self.cost.push(to_i64(inference.cost_micro_usd));
        self.outcome.push(inference_outcome(inference.outcome));
        self.npc_id.push(inference.npc_id.clone());
        self.input_hash.push(inference.input_hash.clone());
    }

    /// Appends the rows to the inference log.
    /// The log's columns, as [`append_with`] takes them.
    fn columns(&self) -> [(&'static str, Values<'_>); 14] {
        [
            ("event_id", Values::Uuid(&self.event_id)),
            ("world_id", Values::Text(&self.world_id)),
            ("tick", Values::Int8(&self.tick)),
            ("occurred_at", Values::Timestamptz(&self.occurred_at)),
            ("model_id", Values::Text(&self.model_id)),
            ("model_version", Values::Text(&self.model_version)),
            ("purpose", Values::Name(&self.purpose)),
            ("prompt_tokens", Values::Int4(&self.prompt_tokens)),
            ("completion_tokens", Values::Int4(&self.completion_tokens)),
            ("latency_ms", Values::Int4(&self.latency_ms)),
            ("cost_micro_usd", Values::Int8(&self.cost)),
            ("outcome", Values::Name(&self.outcome)),
            ("npc_id", Values::Text(&self.npc_id)),
            ("input_hash", Values::Text(&self.input_hash)),
        ]
    }

    /// Per-minute statistics of the rows whose ids are in `new_ids`, each id once.
    fn buckets(&self, new_ids: &std::collections::HashSet<Uuid>) -> HashMap<BucketKey, Bucket> {
        let mut buckets: HashMap<BucketKey, Bucket> = HashMap::new();
        let mut counted = std::collections::HashSet::new();
        for i in 0..self.event_id.len() {
            if !new_ids.contains(&self.event_id[i]) || !counted.insert(self.event_id[i]) {
                continue;
            }
            let minute = self.occurred_at[i]
                .duration_trunc(TimeDelta::minutes(1))
                .unwrap_or(self.occurred_at[i]);
            let key = (
                self.world_id[i].clone(),
                self.model_id[i].clone(),
                self.purpose[i],
                minute,
            );
            let bucket = buckets.entry(key).or_insert_with(|| Bucket {
                histogram: vec![0; LATENCY_BOUNDS_MS.len() + 1],
                ..Bucket::default()
            });
            let latency = self.latency_ms[i];
            bucket.inferences += 1;
            bucket.failures += i64::from(self.outcome[i] != "ok");
            bucket.prompt_tokens += i64::from(self.prompt_tokens[i]);
            bucket.completion_tokens += i64::from(self.completion_tokens[i]);
            bucket.cost += self.cost[i];
            bucket.latency_sum += i64::from(latency);
            bucket.latency_max = bucket.latency_max.max(latency);
            bucket.histogram[latency_bucket(u32::try_from(latency).unwrap_or(0))] += 1;
        }
        buckets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_the_bucket_of_their_upper_bound() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(10), 0);
        assert_eq!(latency_bucket(11), 1);
        assert_eq!(latency_bucket(20_000), 18);
        assert_eq!(latency_bucket(20_001), 19);
    }
}
