//! The one API error type, rendered as RFC 9457 `application/problem+json`.
//!
//! Every failure a client can cause is a 4xx naming what was wrong; only the
//! read-model database being unreachable is a 5xx (503 with `Retry-After`).

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Everything a handler can fail with. Internal details (SQL, connection
/// errors) are logged, never sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A path segment or query parameter that is not acceptable.
    #[error("{detail}")]
    BadRequest {
        /// The parameter's name as the client wrote it (`from_tick`, `world`).
        parameter: Cow<'static, str>,
        /// What is wrong with it, and what would be accepted.
        detail: String,
    },
    /// An unknown world, or a world without the requested resource.
    #[error("{0}")]
    NotFound(String),
    /// A method the route does not serve.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The read-model database did not answer.
    #[error("the read model is unavailable; retry shortly")]
    Unavailable(#[source] sqlx::Error),
}

impl ApiError {
    /// A 400 naming `parameter`.
    pub fn bad(parameter: impl Into<Cow<'static, str>>, detail: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            parameter: parameter.into(),
            detail: detail.into(),
        }
    }

    /// The 404 of a world the read models have never seen.
    pub fn unknown_world(world: &str) -> ApiError {
        ApiError::NotFound(format!("world {world:?} does not exist"))
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An RFC 9457 problem document, the body of every error response.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "https://worldline.dev/problems/bad-parameter",
    "title": "Bad parameter",
    "status": 400,
    "detail": "from_tick must be an integer from 0 to 9223372036854775807, got \"-1\"",
    "parameter": "from_tick"
}))]
pub struct Problem {
    /// A URI identifying the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code (only errors are problems).
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong in this request, in words.
    pub detail: String,
    /// For a bad parameter: its name (a path segment, a query parameter or a
    /// header). Absent otherwise, never `null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub parameter: Option<String>,
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Unavailable(error)
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        let (kind, title, parameter) = match self {
            ApiError::BadRequest { parameter, .. } => (
                "bad-parameter",
                "Bad parameter",
                Some(parameter.to_string()),
            ),
            ApiError::NotFound(_) => ("not-found", "Not found", None),
            ApiError::MethodNotAllowed(_) => ("method-not-allowed", "Method not allowed", None),
            ApiError::Unavailable(_) => ("unavailable", "Service unavailable", None),
        };
        Problem {
            kind: format!("https://worldline.dev/problems/{kind}"),
            title: title.to_owned(),
            status: self.status().as_u16(),
            detail: self.to_string(),
            parameter,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unavailable(source) = &self {
            tracing::error!(error = %source, "read model query failed");
        }
        let status = self.status();
        let mut response = (status, Json(self.problem())).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_bad_parameter_when_rendered_then_the_problem_names_it() {
        let problem = ApiError::bad("from_tick", "from_tick must be an integer").problem();
        assert_eq!(problem.status, 400);
        assert_eq!(problem.parameter.as_deref(), Some("from_tick"));
        assert_eq!(problem.detail, "from_tick must be an integer");
    }

    #[test]
    fn given_a_database_error_when_rendered_then_no_internals_leak() {
        let error = ApiError::from(sqlx::Error::PoolTimedOut);
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
