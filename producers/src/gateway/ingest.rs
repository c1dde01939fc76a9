//! `POST /v1/worlds/{world}/events`: decode, validate the whole batch, append,
//! answer with positions and a consistency token.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Serialize;
use worldline_ops::auth::Principal;
use worldline_ops::consistency::ConsistencyToken;
use worldline_schemas::envelope::EnvelopeExt;
use worldline_schemas::family::event_type;
use worldline_schemas::pb::Envelope;
use worldline_schemas::{Family, WorldId};

use super::GatewayState;
use super::ids::{IDEMPOTENCY_KEY, IdempotencyKey};
use super::json::parse_json_body;
use super::problem::{ProblemKind, Rejection, Violation, problem_response};
use super::protobuf::{BodyKind, body_kind, parse_protobuf_body};
use super::settle::{BodyFormat, settle};
use crate::appender::{AppendError, Appended};

/// Extra time granted to the appender beyond `append_timeout_ms` before the
/// request gives up on it: librdkafka's own message timeout (the same value)
/// normally answers first, with per-event results; this is only a backstop.
const APPEND_GRACE: Duration = Duration::from_millis(500);

/// Longest `Retry-After` suggested.
const MAX_RETRY_AFTER_S: u64 = 30;

/// The handler. Every answer is either 200 with every event appended, or a
/// problem document; nothing is appended unless the whole request is valid.
pub(super) async fn append_events(
    State(state): State<Arc<GatewayState>>,
    Path(world): Path<String>,
    principal: Option<Extension<Principal>>,
    request: Request,
) -> Response {
    let principal = principal.map(|Extension(p)| p.name);
    match accept(&state, &world, request).await {
        Ok(envelopes) => append(&state, &envelopes, principal.as_deref()).await,
        Err(rejection) => {
            tracing::debug!(
                world,
                principal,
                status = rejection.status().as_u16(),
                problem = rejection.first().kind.slug(),
                detail = rejection.first().detail,
                "ingest request refused"
            );
            metrics::counter!(
                "worldline_ingest_rejections_total",
                "problem" => rejection.first().kind.slug()
            )
            .increment(1);
            rejection.into_response()
        }
    }
}

/// Everything before the append: the request is turned into valid envelopes or
/// refused as a whole.
async fn accept(
    state: &GatewayState,
    world: &str,
    request: Request,
) -> Result<Vec<Envelope>, Rejection> {
    let world = WorldId::parse(world)
        .map_err(|e| Violation::request(ProblemKind::BadWorldId, format!("{e}")))?;
    let headers = request.headers();
    let kind = body_kind(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    )?;
    check_declared_length(headers, state.settings.max_body_bytes)?;
    let key = IdempotencyKey::parse(headers.get(IDEMPOTENCY_KEY))?;
    let body = Bytes::from_request(request, &())
        .await
        .map_err(|e| body_violation(&e, state.settings.max_body_bytes))?;
    let now = Utc::now();
    let max_events = state.settings.max_batch_events;
    let (drafts, mut violations, format) = match kind {
        BodyKind::Json => {
            let (drafts, violations) = parse_json_body(&body, max_events, now)?;
            (drafts, violations, BodyFormat::Json)
        }
        BodyKind::Envelope | BodyKind::EnvelopeBatch => (
            parse_protobuf_body(&body, kind, max_events)?,
            Vec::new(),
            BodyFormat::Protobuf,
        ),
    };
    match settle(drafts, format, &world, key.as_ref(), now) {
        Ok(envelopes) if violations.is_empty() => Ok(envelopes),
        Ok(_) => Err(Rejection::new(violations)),
        Err(more) => {
            violations.extend(more);
            Err(Rejection::new(violations))
        }
    }
}

/// Refuses a body announced as too large before reading any of it.
fn check_declared_length(headers: &HeaderMap, max_body_bytes: usize) -> Result<(), Violation> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > max_body_bytes as u64 => Err(too_large(max_body_bytes)),
        _ => Ok(()),
    }
}

fn too_large(max_body_bytes: usize) -> Violation {
    Violation::request(
        ProblemKind::BodyTooLarge,
        format!("the body is larger than {max_body_bytes} bytes; split the batch"),
    )
}

fn body_violation(rejection: &BytesRejection, max_body_bytes: usize) -> Violation {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max_body_bytes)
    } else {
        Violation::request(
            ProblemKind::MalformedBody,
            format!("the body could not be read: {}", rejection.body_text()),
        )
    }
}

/// Appends a validated batch and answers. Never 2xx unless every event was
/// acknowledged by Kafka.
async fn append(state: &GatewayState, envelopes: &[Envelope], principal: Option<&str>) -> Response {
    let timeout = Duration::from_millis(state.settings.append_timeout_ms);
    let results = tokio::time::timeout(
        timeout + APPEND_GRACE,
        state.appender.append_batch(envelopes),
    )
    .await
    .unwrap_or_else(|_| envelopes.iter().map(|_| Err(timed_out())).collect());
    record_event_metrics(envelopes, &results);
    let mut outcome = Outcome::of(envelopes, results);
    match outcome.failure.take() {
        None => {
            tracing::debug!(principal, events = envelopes.len(), "events appended");
            (StatusCode::OK, Json(outcome.accepted())).into_response()
        }
        Some(Failure::Bug(error)) => {
            tracing::error!(%error, "a validated event was refused by the appender");
            Rejection::from(Violation::request(
                ProblemKind::Internal,
                "an event passed validation but the append path refused it; nothing was appended for it",
            ))
            .into_response()
        }
        Some(Failure::Unavailable(error)) => {
            tracing::warn!(
                %error,
                principal,
                appended = outcome.appended_count(),
                events = envelopes.len(),
                "Kafka did not acknowledge every event"
            );
            outcome.unavailable(timeout)
        }
    }
}

/// The error of an append the backstop timeout gave up on.
fn timed_out() -> AppendError {
    AppendError::Unavailable(KafkaError::MessageProduction(
        RDKafkaErrorCode::MessageTimedOut,
    ))
}

fn record_event_metrics(envelopes: &[Envelope], results: &[Result<Appended, AppendError>]) {
    for (envelope, result) in envelopes.iter().zip(results) {
        let family = envelope.family().map_or("unknown", Family::as_str);
        let result = if result.is_ok() { "appended" } else { "failed" };
        metrics::counter!("worldline_ingest_events_total", "family" => family, "result" => result)
            .increment(1);
    }
}

/// What happened to each event of a batch.
#[derive(Debug)]
struct Outcome {
    events: Vec<EventOutcome>,
    failure: Option<Failure>,
}

#[derive(Debug)]
enum Failure {
    /// Kafka did not acknowledge some event in time: retry later.
    Unavailable(AppendError),
    /// The appender refused an event the gateway had validated: a bug here.
    Bug(AppendError),
}

#[derive(Debug, Serialize)]
struct EventOutcome {
    index: usize,
    event_id: String,
    #[serde(rename = "type")]
    event_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    appended: Option<bool>,
    #[serde(flatten)]
    position: Option<Position>,
}

#[derive(Debug, Clone, Serialize)]
struct Position {
    topic: String,
    partition: i32,
    offset: i64,
}

/// The 200 body.
#[derive(Debug, Serialize)]
struct Accepted<'a> {
    events: &'a [EventOutcome],
    consistency_token: String,
}

/// The 503 body: a problem document that also says what did get appended.
#[derive(Debug, Serialize)]
struct UnavailableBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    events: &'a [EventOutcome],
    #[serde(skip_serializing_if = "Option::is_none")]
    consistency_token: Option<String>,
}

impl Outcome {
    fn of(envelopes: &[Envelope], results: Vec<Result<Appended, AppendError>>) -> Outcome {
        let mut failure = None;
        let events = envelopes
            .iter()
            .zip(results)
            .enumerate()
            .map(|(index, (envelope, result))| {
                let position = match result {
                    Ok(appended) => Some(Position {
                        topic: appended.topic,
                        partition: appended.partition,
                        offset: appended.offset,
                    }),
                    Err(error) => {
                        let bug = matches!(error, AppendError::Invalid(_));
                        match (&failure, bug) {
                            (None, false) => failure = Some(Failure::Unavailable(error)),
                            (None | Some(Failure::Unavailable(_)), true) => {
                                failure = Some(Failure::Bug(error));
                            }
                            _ => {}
                        }
                        None
                    }
                };
                EventOutcome {
                    index,
                    event_id: envelope.event_uuid().to_string(),
                    event_type: envelope.body.as_ref().map_or("", event_type),
                    appended: None,
                    position,
                }
            })
            .collect();
        Outcome { events, failure }
    }

    fn appended_count(&self) -> usize {
        self.events.iter().filter(|e| e.position.is_some()).count()
    }

    fn token(&self) -> ConsistencyToken {
        ConsistencyToken::from_positions(self.events.iter().filter_map(|e| {
            e.position
                .as_ref()
                .map(|p| (p.topic.clone(), p.partition, p.offset))
        }))
    }

    fn accepted(&self) -> Accepted<'_> {
        Accepted {
            events: &self.events,
            consistency_token: self.token().encode(),
        }
    }

    fn unavailable(mut self, timeout: Duration) -> Response {
        for event in &mut self.events {
            event.appended = Some(event.position.is_some());
        }
        let appended = self.appended_count();
        let token = self.token();
        let body = UnavailableBody {
            kind: ProblemKind::Unavailable.type_uri(),
            title: ProblemKind::Unavailable.title(),
            status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
            detail: format!(
                "Kafka did not acknowledge {} of {} events within {} ms. Events with \
                 \"appended\": true are durably in the log; the others may or may not be. \
                 Retry the whole request with the same event ids (send them as event_id, or \
                 repeat the same Idempotency-Key): projectors apply each id once.",
                self.events.len() - appended,
                self.events.len(),
                timeout.as_millis()
            ),
            events: &self.events,
            consistency_token: (!token.is_empty()).then(|| token.encode()),
        };
        let mut response = problem_response(StatusCode::SERVICE_UNAVAILABLE, &body);
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_s(timeout)),
        );
        response
    }
}

/// Seconds a client should wait before retrying: about as long as the append
/// was given, so retries do not pile onto a broker that is already struggling.
fn retry_after_s(append_timeout: Duration) -> u64 {
    append_timeout
        .as_millis()
        .div_ceil(1000)
        .clamp(1, u128::from(MAX_RETRY_AFTER_S)) as u64
}

#[cfg(test)]
mod tests {
    use worldline_schemas::envelope::new_envelope;
    use worldline_schemas::pb::WorldResumed;
    use worldline_schemas::pb::envelope::Body;

    use super::*;

    fn envelope(tick: u64) -> Envelope {
        new_envelope(
            &WorldId::parse("w").unwrap(),
            tick,
            "t",
            Body::WorldResumed(WorldResumed {}),
        )
    }

    fn at(partition: i32, offset: i64) -> Result<Appended, AppendError> {
        Ok(Appended {
            topic: "worldline.world.v1".to_owned(),
            partition,
            offset,
        })
    }

    #[test]
    fn given_every_event_appended_then_the_token_covers_the_highest_offsets() {
        let envelopes = [envelope(1), envelope(2), envelope(3)];
        let outcome = Outcome::of(&envelopes, vec![at(0, 4), at(0, 5), at(2, 1)]);
        assert!(outcome.failure.is_none());
        assert_eq!(
            outcome.token().positions(),
            &[
                ("worldline.world.v1".to_owned(), 0, 5),
                ("worldline.world.v1".to_owned(), 2, 1)
            ]
        );
        let body = serde_json::to_value(outcome.accepted()).unwrap();
        assert_eq!(body["events"][1]["offset"], 5);
        assert_eq!(body["events"][1]["type"], "worldline.v1.WorldResumed");
        assert_eq!(
            body["events"][1]["event_id"],
            envelopes[1].event_uuid().to_string()
        );
        assert!(body["events"][1].get("appended").is_none());
    }

    #[test]
    fn given_one_event_not_acknowledged_then_the_answer_is_503_listing_what_was_appended() {
        let envelopes = [envelope(1), envelope(2)];
        let outcome = Outcome::of(
            &envelopes,
            vec![
                at(0, 4),
                Err(AppendError::Unavailable(KafkaError::Canceled)),
            ],
        );
        assert!(matches!(outcome.failure, Some(Failure::Unavailable(_))));
        let response = outcome.unavailable(Duration::from_millis(2500));
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn given_an_appender_refusal_then_it_is_a_bug_not_a_retry() {
        let envelopes = [envelope(1), envelope(2)];
        let outcome = Outcome::of(
            &envelopes,
            vec![
                Err(AppendError::Unavailable(KafkaError::Canceled)),
                Err(AppendError::Invalid(worldline_schemas::DecodeError::Empty)),
            ],
        );
        assert!(matches!(outcome.failure, Some(Failure::Bug(_))));
    }

    #[test]
    fn given_append_timeouts_then_retry_after_is_bounded() {
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::from_secs(5)), 5);
        assert_eq!(retry_after_s(Duration::from_secs(600)), MAX_RETRY_AFTER_S);
    }

    #[test]
    fn given_a_declared_length_over_the_limit_then_it_is_refused_unread() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(2048));
        assert_eq!(
            check_declared_length(&headers, 1024).unwrap_err().kind,
            ProblemKind::BodyTooLarge
        );
        assert!(check_declared_length(&headers, 4096).is_ok());
        assert!(check_declared_length(&HeaderMap::new(), 1).is_ok());
    }
}
