//! Read-your-writes and projector position headers.
//!
//! One task per process ([`Progress::start`]) holds a `LISTEN worldline_progress`
//! connection. Projectors `pg_notify('worldline_progress', '<schema>')` inside
//! every committing transaction, so a notification means "this schema's
//! `projector_offsets` moved". The task then reads that table once and publishes
//! the snapshot on the schema's `watch` channel; every request waiting on that
//! projector wakes and checks its token against the snapshot, without a query of
//! its own. After (re)connecting, the task reloads every schema, because
//! notifications sent while it was disconnected are lost.
//!
//! A route is served from one or more projectors' read models (`/state` reads
//! all of them). A request with `X-Consistency-Token` waits (at most
//! `read_your_writes_timeout`) until, for every one of those projectors, the
//! snapshot has passed every offset the token holds on a topic that projector
//! reads; past the bound it is answered 503 with `Retry-After: 1`.
//! Every answer carries `X-Worldline-Position`: the sum of the projectors'
//! stored next offsets over their topic-partitions (monotonic; it grows by the
//! number of records applied), and `X-Worldline-Lag-Records`: how many records
//! of the log the most-behind of those projectors has still to apply. The log
//! ends come from `projector_log_ends`, which projector instances refresh about
//! every second from their consumer's statistics (the API itself has no Kafka
//! client), and a log growing ahead of a stopped projector notifies nobody, so
//! the task also re-reads every schema on a beat (`http.progress_refresh_ms`,
//! default 1 s). Waits never depend on that beat: commits notify.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worldline_ops::consistency::{ConsistencyToken, PROGRESS_CHANNEL};
use worldline_ops::health::Health;
use worldline_schemas::family::Family;

use crate::error::{ApiError, PROBLEM_JSON, Problem};

/// The request header carrying the token an append answered with.
pub const CONSISTENCY_HEADER: &str = "x-consistency-token";
/// The response header with the projector's position.
pub const POSITION_HEADER: &str = "x-worldline-position";
/// How often the `/readyz` lag check looks at the published snapshots (memory
/// only, no query).
const LAG_CHECK: Duration = Duration::from_secs(1);

/// The response header with how many records the projector has yet to apply.
pub const LAG_HEADER: &str = "x-worldline-lag-records";

/// Stored next offsets of one projector: (topic, partition) → next offset, and
/// the log ends its instances last saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    next_offsets: BTreeMap<(String, i32), i64>,
    log_ends: BTreeMap<(String, i32), i64>,
}

impl Snapshot {
    /// The next offset the projector will apply on a topic-partition.
    pub fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.next_offsets
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    /// `X-Worldline-Position`: the sum of the stored next offsets.
    pub fn position(&self) -> i64 {
        self.next_offsets.values().copied().sum()
    }

    /// `X-Worldline-Lag-Records`: records in the log (as of the last log ends the
    /// projector stored, at most a few seconds old) not yet applied.
    pub fn lag_records(&self) -> i64 {
        self.log_ends
            .iter()
            .map(|(key, end)| (end - self.next_offsets.get(key).copied().unwrap_or(0)).max(0))
            .sum()
    }

    /// A snapshot from stored next offsets and log ends (tests and tools).
    pub fn from_rows(
        next_offsets: impl IntoIterator<Item = (String, i32, i64)>,
        log_ends: impl IntoIterator<Item = (String, i32, i64)>,
    ) -> Snapshot {
        Snapshot {
            next_offsets: next_offsets
                .into_iter()
                .map(|(topic, partition, next)| ((topic, partition), next))
                .collect(),
            log_ends: log_ends
                .into_iter()
                .map(|(topic, partition, end)| ((topic, partition), end))
                .collect(),
        }
    }
}

/// The Kafka families each projector behind the API reads (mirrors each
/// projector's `families()`; the query API does not depend on the projectors).
pub fn projector_families(projector: &str) -> &'static [Family] {
    match projector {
        "worlds" => &Family::ALL,
        "clock" => &[Family::Clock],
        "weather" => &[Family::Weather],
        "story" => &[Family::Story],
        "inference" => &[Family::Inference],
        _ => &[],
    }
}

/// The part of `token` a projector reading `families` (under topic `prefix`)
/// must have passed; positions on other topics are another projector's business.
pub fn relevant(token: &ConsistencyToken, families: &[Family], prefix: &str) -> ConsistencyToken {
    ConsistencyToken::from_positions(
        token
            .positions()
            .iter()
            .filter(|(topic, _, _)| {
                Family::from_topic(topic, prefix).is_some_and(|family| families.contains(&family))
            })
            .cloned(),
    )
}

/// The shared view of every projector's progress.
#[derive(Debug, Clone)]
pub struct Progress {
    channels: Arc<HashMap<&'static str, watch::Receiver<Arc<Snapshot>>>>,
    topic_prefix: Arc<str>,
}

impl Progress {
    /// Starts the listener task for `projectors` (schema names) until `stop`;
    /// besides notifications, it re-reads every schema each `refresh`.
    pub fn start(
        pool: PgPool,
        projectors: &[&'static str],
        topic_prefix: &str,
        refresh: Duration,
        stop: CancellationToken,
    ) -> Progress {
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for projector in projectors {
            let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
            senders.insert(*projector, tx);
            receivers.insert(*projector, rx);
        }
        // `interval` panics on a zero period.
        let beat = refresh.max(Duration::from_millis(1));
        tokio::spawn(listen(pool, senders, beat, stop));
        Progress {
            channels: Arc::new(receivers),
            topic_prefix: Arc::from(topic_prefix),
        }
    }

    fn receiver(&self, projector: &str) -> Option<Channel> {
        self.channels.get(projector).cloned()
    }

    /// Each projector's current lag in records.
    pub fn lag_records(&self) -> BTreeMap<&'static str, i64> {
        self.channels
            .iter()
            .map(|(projector, receiver)| (*projector, receiver.borrow().lag_records()))
            .collect()
    }
}

/// Keeps the `lag` readiness check of `health` in step with `progress`: failing
/// while any projector is more than `max_lag` records behind, until `stop`.
pub async fn watch_lag(progress: Progress, health: Health, max_lag: u64, stop: CancellationToken) {
    let max_lag = i64::try_from(max_lag).unwrap_or(i64::MAX);
    let mut beat = tokio::time::interval(LAG_CHECK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = beat.tick() => {}
        }
        let behind: Vec<String> = progress
            .lag_records()
            .into_iter()
            .filter(|(_, lag)| *lag > max_lag)
            .map(|(projector, lag)| format!("{projector} is {lag} records behind"))
            .collect();
        if behind.is_empty() {
            health.set("lag", Ok(()));
        } else {
            health.set("lag", Err(behind.join("; ")));
        }
    }
}

async fn listen(
    pool: PgPool,
    senders: HashMap<&'static str, watch::Sender<Arc<Snapshot>>>,
    beat: Duration,
    stop: CancellationToken,
) {
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = listen_once(&pool, &senders, beat) => result,
        };
        if let Err(error) = result {
            tracing::warn!(%error, "progress listener lost; reconnecting");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One connection's life: LISTEN, reload everything, then reload each schema a
/// notification names. Returns when the connection is lost.
async fn listen_once(
    pool: &PgPool,
    senders: &HashMap<&'static str, watch::Sender<Arc<Snapshot>>>,
    period: Duration,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(PROGRESS_CHANNEL).await?;
    // Notifications sent before LISTEN took effect are lost: look once now.
    for (schema, sender) in senders {
        refresh(pool, schema, sender).await;
    }
    // Log ends move without a notification (events appended, projector behind
    // or stopped): re-read every schema on this beat too. Its first tick is one
    // period away: everything was just read.
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            received = listener.try_recv() => received?,
            _ = beat.tick() => {
                for (schema, sender) in senders {
                    refresh(pool, schema, sender).await;
                }
                continue;
            }
        };
        let Some(first) = first else {
            return Ok(());
        };
        // Coalesce what is already buffered: one read per schema, not per commit.
        let mut schemas = BTreeSet::from([first.payload().to_owned()]);
        while let Some(more) = listener.next_buffered() {
            schemas.insert(more.payload().to_owned());
        }
        for schema in schemas {
            if let Some((name, sender)) = senders.get_key_value(schema.as_str()) {
                refresh(pool, name, sender).await;
            }
        }
    }
}

async fn refresh(pool: &PgPool, schema: &str, sender: &watch::Sender<Arc<Snapshot>>) {
    // The schema is one of the API's own projector names, never client input.
    let sql = format!("SELECT topic, partition, next_offset FROM {schema}.projector_offsets");
    let offsets = sqlx::query_as::<_, (String, i32, i64)>(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await;
    // Older schemas (created before log ends were recorded) have no such table
    // until their projector restarts: no lag figure then, not an error.
    let sql = format!("SELECT topic, partition, end_offset FROM {schema}.projector_log_ends");
    let log_ends = sqlx::query_as::<_, (String, i32, i64)>(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    match offsets {
        Ok(rows) => {
            let snapshot = Snapshot::from_rows(rows, log_ends);
            sender.send_if_modified(|current| {
                let changed = **current != snapshot;
                if changed {
                    *current = Arc::new(snapshot);
                }
                changed
            });
        }
        // A projector that never ran has no table yet: nothing is reached.
        Err(error) => tracing::debug!(schema, %error, "projector offsets unreadable"),
    }
}

/// Where one projector's snapshots are published.
type Channel = watch::Receiver<Arc<Snapshot>>;

/// The read-your-writes wait and position headers of one resource's routes:
/// the progress channels of the projectors behind them, looked up once.
#[derive(Debug, Clone)]
pub(crate) struct Wait {
    channels: Arc<[(&'static str, Channel)]>,
    topic_prefix: Arc<str>,
    timeout: Duration,
}

impl Wait {
    /// The wait for routes served from the read models of `projectors`;
    /// projectors `progress` does not follow are left out.
    pub(crate) fn new(
        progress: &Progress,
        projectors: &'static [&'static str],
        timeout: Duration,
    ) -> Wait {
        Wait {
            channels: projectors
                .iter()
                .filter_map(|projector| Some((*projector, progress.receiver(projector)?)))
                .collect(),
            topic_prefix: Arc::clone(&progress.topic_prefix),
            timeout,
        }
    }

    /// Answers `request` with `next` once the projectors have passed the
    /// request's consistency token (503 past the bound, 400 for a malformed
    /// token), with the position headers on the answer.
    pub(crate) async fn answer(&self, request: Request, next: Next) -> Response {
        let token = match requested_token(request.headers()) {
            Ok(token) => token,
            Err(error) => return error.into_response(),
        };
        if self.channels.is_empty() {
            return next.run(request).await;
        }
        if let Some(token) = token {
            // One deadline for all: a projector that has passed the offsets never
            // falls back behind them, so waiting for each in turn waits for all.
            let deadline = tokio::time::Instant::now() + self.timeout;
            for (projector, channel) in self.channels.iter() {
                let needed = relevant(&token, projector_families(projector), &self.topic_prefix);
                if !reached_by(&mut channel.clone(), &needed, deadline).await {
                    return not_yet(projector);
                }
            }
        }
        // Read before the handler runs: the rows it reads are at least this far.
        let (position, lag) =
            self.channels
                .iter()
                .fold((0_i64, 0_i64), |(position, lag), (_, channel)| {
                    let snapshot = channel.borrow();
                    (
                        position.saturating_add(snapshot.position()),
                        lag.max(snapshot.lag_records()),
                    )
                });
        let mut response = next.run(request).await;
        let headers = response.headers_mut();
        headers.insert(HeaderName::from_static(POSITION_HEADER), position.into());
        headers.insert(HeaderName::from_static(LAG_HEADER), lag.into());
        response
    }
}

/// The request's consistency token, if it carries one; a 400 naming the header
/// when it is not a token.
fn requested_token(headers: &HeaderMap) -> Result<Option<ConsistencyToken>, ApiError> {
    let Some(value) = headers.get(CONSISTENCY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad("X-Consistency-Token", "X-Consistency-Token is not ASCII"))?;
    ConsistencyToken::decode(text)
        .map(Some)
        .map_err(|e| ApiError::bad("X-Consistency-Token", format!("X-Consistency-Token: {e}")))
}

/// Waits until the published snapshot reaches `needed`, re-checking on every
/// new snapshot; `false` when `deadline` passes first or the listener is gone.
async fn reached_by(
    progress: &mut watch::Receiver<Arc<Snapshot>>,
    needed: &ConsistencyToken,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        let snapshot = Arc::clone(&progress.borrow_and_update());
        if needed.is_reached_by(|topic, partition| snapshot.next_offset(topic, partition)) {
            return true;
        }
        match tokio::time::timeout_at(deadline, progress.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return false,
        }
    }
}

fn not_yet(projector: &str) -> Response {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    let problem = Problem {
        kind: "https://worldline.dev/problems/not-yet-consistent".to_owned(),
        title: "Not yet consistent".to_owned(),
        status: status.as_u16(),
        detail: format!(
            "the {projector} read model has not yet applied the writes named by X-Consistency-Token; retry shortly"
        ),
        parameter: None,
    };
    let mut response = (status, axum::Json(problem)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_log_ends_past_the_stored_offsets_then_lag_is_the_records_between() {
        let snapshot = Snapshot::from_rows(
            [("t".to_owned(), 0, 10), ("t".to_owned(), 1, 7)],
            [
                ("t".to_owned(), 0, 15),
                ("t".to_owned(), 1, 7),
                // A partition with no stored offset yet is behind by its whole log.
                ("t".to_owned(), 2, 4),
            ],
        );
        assert_eq!(snapshot.lag_records(), 5 + 4);
        assert_eq!(snapshot.position(), 17);
    }

    #[test]
    fn given_stale_log_ends_behind_the_stored_offsets_then_lag_is_zero_not_negative() {
        let snapshot = Snapshot::from_rows([("t".to_owned(), 0, 10)], [("t".to_owned(), 0, 8)]);
        assert_eq!(snapshot.lag_records(), 0);
    }

    #[test]
    fn given_a_token_over_several_families_then_only_the_projectors_topics_count() {
        let token = ConsistencyToken::from_positions([
            ("p.worldline.story.v1".to_owned(), 1, 5),
            ("p.worldline.weather.v1".to_owned(), 0, 9),
            ("elsewhere".to_owned(), 0, 1),
        ]);
        let needed = relevant(&token, projector_families("story"), "p.");
        assert_eq!(
            needed.positions(),
            &[("p.worldline.story.v1".to_owned(), 1, 5)]
        );
        assert_eq!(
            relevant(&token, projector_families("worlds"), "p.")
                .positions()
                .len(),
            2
        );
    }

    #[test]
    fn given_a_snapshot_then_the_position_is_the_sum_of_next_offsets() {
        let snapshot = Snapshot {
            next_offsets: BTreeMap::from([(("a".to_owned(), 0), 3), (("a".to_owned(), 1), 4)]),
            log_ends: BTreeMap::new(),
        };
        assert_eq!(snapshot.position(), 7);
        assert_eq!(snapshot.next_offset("a", 1), Some(4));
        assert_eq!(snapshot.next_offset("a", 2), None);
    }

    #[test]
    fn given_a_header_then_it_parses_or_names_itself() {
        let mut headers = HeaderMap::new();
        assert!(requested_token(&headers).unwrap().is_none());
        headers.insert(CONSISTENCY_HEADER, HeaderValue::from_static("garbage"));
        let error = requested_token(&headers).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("X-Consistency-Token"));
    }

    #[tokio::test]
    async fn given_a_snapshot_published_later_then_the_waiter_wakes() {
        let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        let needed = ConsistencyToken::from_positions([("t".to_owned(), 0, 2)]);
        let publisher = tokio::spawn(async move {
            tx.send_replace(Arc::new(Snapshot {
                next_offsets: BTreeMap::from([(("t".to_owned(), 0), 3)]),
                log_ends: BTreeMap::new(),
            }));
            tx
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        assert!(reached_by(&mut rx, &needed, deadline).await);
        drop(publisher.await);
    }

    #[tokio::test]
    async fn given_no_progress_then_the_wait_ends_at_the_bound() {
        let (_tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
        let needed = ConsistencyToken::from_positions([("t".to_owned(), 0, 0)]);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(!reached_by(&mut rx, &needed, deadline).await);
    }
}
