//! What can be wrong with an ingest request, rendered as RFC 9457
//! `application/problem+json`.
//!
//! A rejected request answers one problem document: `type`, `title`, `status`
//! and `detail` describe the first thing wrong, `pointer` (when known) is a JSON
//! Pointer to it, and `errors` lists every problem found in the batch, each with
//! its own `type`, `detail`, `pointer` and event `index`, so a client can fix a
//! whole batch in one round trip.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Largest number of entries in a problem's `errors` list; a 1000-event batch
/// that is wrong everywhere does not need a 1000-entry answer.
const MAX_LISTED_ERRORS: usize = 100;

/// A class of problem: its status, `type` URI and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The body is not JSON, or not a protobuf message, at all.
    MalformedBody,
    /// The `{world}` of the URL is not a world id.
    BadWorldId,
    /// The `Idempotency-Key` header is unusable.
    BadIdempotencyKey,
    /// Neither JSON nor protobuf.
    UnsupportedMediaType,
    /// More bytes than `gateway.max_body_bytes`.
    BodyTooLarge,
    /// More events than `gateway.max_batch_events`.
    TooManyEvents,
    /// A batch without events.
    EmptyBatch,
    /// An event `type` (or protobuf body) this server does not know.
    UnknownEventType,
    /// A required field is absent.
    MissingField,
    /// A field the event shape does not have.
    UnknownField,
    /// A field with a value of the wrong type, out of range, or not one of the
    /// allowed names (enums).
    InvalidValue,
    /// An event for another world than the URL's.
    WorldMismatch,
    /// Two events of one request with the same id.
    DuplicateEventId,
    /// Kafka did not take the write in time.
    Unavailable,
    /// A bug on this side; details are in the log.
    Internal,
}

impl ProblemKind {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::MalformedBody
            | ProblemKind::BadWorldId
            | ProblemKind::BadIdempotencyKey => StatusCode::BAD_REQUEST,
            ProblemKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProblemKind::BodyTooLarge | ProblemKind::TooManyEvents => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::EmptyBatch
            | ProblemKind::UnknownEventType
            | ProblemKind::MissingField
            | ProblemKind::UnknownField
            | ProblemKind::InvalidValue
            | ProblemKind::WorldMismatch
            | ProblemKind::DuplicateEventId => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable last segment of the `type` URI, also used as a metric label.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::MalformedBody => "malformed-body",
            ProblemKind::BadWorldId => "bad-world-id",
            ProblemKind::BadIdempotencyKey => "bad-idempotency-key",
            ProblemKind::UnsupportedMediaType => "unsupported-media-type",
            ProblemKind::BodyTooLarge => "body-too-large",
            ProblemKind::TooManyEvents => "too-many-events",
            ProblemKind::EmptyBatch => "empty-batch",
            ProblemKind::UnknownEventType => "unknown-event-type",
            ProblemKind::MissingField => "missing-field",
            ProblemKind::UnknownField => "unknown-field",
            ProblemKind::InvalidValue => "invalid-value",
            ProblemKind::WorldMismatch => "world-mismatch",
            ProblemKind::DuplicateEventId => "duplicate-event-id",
            ProblemKind::Unavailable => "unavailable",
            ProblemKind::Internal => "internal",
        }
    }

    /// The `type` URI.
    pub fn type_uri(self) -> String {
        format!("https://worldline.dev/problems/{}", self.slug())
    }

    /// A short, fixed summary of the kind.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::MalformedBody => "Malformed request body",
            ProblemKind::BadWorldId => "Invalid world id",
            ProblemKind::BadIdempotencyKey => "Invalid Idempotency-Key",
            ProblemKind::UnsupportedMediaType => "Unsupported media type",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::TooManyEvents => "Too many events in one request",
            ProblemKind::EmptyBatch => "Empty batch",
            ProblemKind::UnknownEventType => "Unknown event type",
            ProblemKind::MissingField => "Missing field",
            ProblemKind::UnknownField => "Unknown field",
            ProblemKind::InvalidValue => "Invalid value",
            ProblemKind::WorldMismatch => "World mismatch",
            ProblemKind::DuplicateEventId => "Duplicate event id",
            ProblemKind::Unavailable => "Event log unavailable",
            ProblemKind::Internal => "Internal error",
        }
    }
}

/// One thing wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// A sentence saying exactly what is wrong.
    pub detail: String,
    /// JSON Pointer (RFC 6901) to the offending part of the request, when known.
    pub pointer: Option<String>,
    /// Position of the offending event in the request, when it is about one.
    pub index: Option<usize>,
}

impl Violation {
    /// A problem with the request as a whole.
    pub fn request(kind: ProblemKind, detail: impl Into<String>) -> Violation {
        Violation {
            kind,
            detail: detail.into(),
            pointer: None,
            index: None,
        }
    }

    /// The same problem, pointing at `pointer`.
    pub fn at(mut self, pointer: impl Into<String>) -> Violation {
        self.pointer = Some(pointer.into());
        self
    }

    /// The same problem, about the event at `index`.
    pub fn of_event(mut self, index: usize) -> Violation {
        self.index = Some(index);
        self
    }
}

#[derive(Debug, Serialize)]
struct ProblemBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'static str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pointer: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<ListedError<'a>>,
}

#[derive(Debug, Serialize)]
struct ListedError<'a> {
    #[serde(rename = "type")]
    kind: String,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pointer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

/// A request refused before anything was appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    violations: Vec<Violation>,
}

impl Rejection {
    /// Refuses the request for these reasons, reported in event order (request
    /// level problems first). Empty input is a bug, reported as one.
    pub fn new(mut violations: Vec<Violation>) -> Rejection {
        if violations.is_empty() {
            violations.push(Violation::request(
                ProblemKind::Internal,
                "the request was refused without a reason",
            ));
        }
        violations.sort_by_key(|v| v.index.map_or(0, |i| i + 1));
        Rejection { violations }
    }

    /// Everything wrong, in order.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The status of the answer: the first problem's.
    pub fn status(&self) -> StatusCode {
        self.first().kind.status()
    }

    /// The first problem, which the answer's top-level members describe.
    pub fn first(&self) -> &Violation {
        &self.violations[0]
    }
}

impl From<Violation> for Rejection {
    fn from(violation: Violation) -> Self {
        Rejection::new(vec![violation])
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let first = self.first();
        let detail = match self.violations.len() {
            1 => first.detail.clone(),
            2 => format!("{} (and 1 more problem, see `errors`)", first.detail),
            n => format!(
                "{} (and {} more problems, see `errors`)",
                first.detail,
                n - 1
            ),
        };
        let errors = if self.violations.len() > 1 {
            self.violations
                .iter()
                .take(MAX_LISTED_ERRORS)
                .map(|v| ListedError {
                    kind: v.kind.type_uri(),
                    detail: &v.detail,
                    pointer: v.pointer.as_deref(),
                    index: v.index,
                })
                .collect()
        } else {
            Vec::new()
        };
        let body = ProblemBody {
            kind: first.kind.type_uri(),
            title: first.kind.title(),
            status: first.kind.status().as_u16(),
            detail,
            pointer: first.pointer.as_deref(),
            errors,
        };
        problem_response(first.kind.status(), &body)
    }
}

/// Serialises `body` as problem+json with `status`.
pub fn problem_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// Appends an escaped RFC 6901 reference token to `pointer`.
pub fn push_pointer(pointer: &mut String, token: &str) {
    pointer.push('/');
    pointer.push_str(&token.replace('~', "~0").replace('/', "~1"));
}

/// `base` extended by one reference token.
pub fn pointer_to(base: &str, token: &str) -> String {
    let mut pointer = base.to_owned();
    push_pointer(&mut pointer, token);
    pointer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_keys_with_slashes_and_tildes_then_pointers_escape_them() {
        assert_eq!(
            pointer_to("/events/0/data", "a/b~c"),
            "/events/0/data/a~1b~0c"
        );
        assert_eq!(pointer_to("", "type"), "/type");
    }

    #[test]
    fn given_violations_of_several_events_then_they_are_reported_in_event_order() {
        let rejection = Rejection::new(vec![
            Violation::request(ProblemKind::MissingField, "b").of_event(10),
            Violation::request(ProblemKind::InvalidValue, "a").of_event(2),
        ]);
        let order: Vec<&str> = rejection
            .violations()
            .iter()
            .map(|v| v.detail.as_str())
            .collect();
        assert_eq!(order, ["a", "b"]);
        assert_eq!(rejection.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn given_several_violations_then_the_document_describes_the_first_and_lists_all() {
        let response = Rejection::new(vec![
            Violation::request(ProblemKind::InvalidValue, "second")
                .at("/events/4/data/condition")
                .of_event(4),
            Violation::request(ProblemKind::MissingField, "first")
                .at("/events/1/world_tick")
                .of_event(1),
        ])
        .into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
            .unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            problem["type"],
            "https://worldline.dev/problems/missing-field"
        );
        assert_eq!(problem["pointer"], "/events/1/world_tick");
        assert_eq!(
            problem["detail"],
            "first (and 1 more problem, see `errors`)"
        );
        assert_eq!(problem["errors"][1]["index"], 4);
        assert_eq!(problem["errors"][1]["pointer"], "/events/4/data/condition");
    }

    #[test]
    fn given_each_kind_then_its_status_matches_the_contract() {
        for (kind, status) in [
            (ProblemKind::MalformedBody, 400),
            (ProblemKind::UnsupportedMediaType, 415),
            (ProblemKind::BodyTooLarge, 413),
            (ProblemKind::TooManyEvents, 413),
            (ProblemKind::UnknownEventType, 422),
            (ProblemKind::MissingField, 422),
            (ProblemKind::WorldMismatch, 422),
            (ProblemKind::InvalidValue, 422),
            (ProblemKind::EmptyBatch, 422),
            (ProblemKind::Unavailable, 503),
        ] {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
        }
    }
}
