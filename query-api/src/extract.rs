//! Path and query extractors whose rejections are problem+json 400s.
//!
//! axum's own `Path` and `Query` answer a malformed request with a plain-text
//! body; these wrap them so every client error has the same shape. Query
//! structs hold raw strings on purpose: the typed checks in [`crate::params`]
//! then name the exact parameter in the 400.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Path parameters, deserialized into `T` by name.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| path_error(&rejection))
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;
    let parameter = match rejection {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key }
            | ErrorKind::ParseErrorAtKey { key, .. }
            | ErrorKind::DeserializeError { key, .. } => key.clone(),
            _ => "path".to_owned(),
        },
        _ => "path".to_owned(),
    };
    ApiError::bad(parameter, rejection.body_text())
}

/// Query parameters, deserialized into `T` (unknown parameters are ignored).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Deserializes a raw query string; a failure names the parameter when serde does.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query).map_err(|e| {
        let message = e.to_string();
        let parameter = named_field(&message).unwrap_or("query").to_owned();
        ApiError::bad(parameter, format!("query string: {message}"))
    })
}

/// The field serde names in messages like "duplicate field `limit`".
fn named_field(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Filters {
        limit: Option<String>,
        player: Option<String>,
    }

    #[test]
    fn given_a_repeated_parameter_when_parsed_then_the_400_names_it() {
        match parse_query::<Filters>("limit=1&limit=2") {
            Err(ApiError::BadRequest { parameter, .. }) => assert_eq!(parameter, "limit"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn given_encoded_and_unknown_parameters_when_parsed_then_decoded_and_ignored() {
        let filters: Filters = parse_query("player=a%20b&colour=red").unwrap();
        assert_eq!(filters.player.as_deref(), Some("a b"));
        assert_eq!(filters.limit, None);
    }
}
