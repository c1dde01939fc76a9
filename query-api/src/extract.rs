//! Path and query extractors whose rejections are problem+json 400s.
//!
//! axum's own `Path` and `Query` answer a malformed request with a plain-text
//! body; these wrap them so every client error has the same shape. Query
//! structs hold raw strings on purpose: the typed checks in [`crate::params`]
//! then name the exact parameter in the 400.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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

/// Query parameters, deserialized into `T` (parameters `T` does not name are
/// left to other extractors; [`reject_unknown_query_parameters`] refuses
/// those no extractor of the route takes).
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

/// The query parameters each route documents, by route template
/// (`/v1/worlds/{world}/clock`), taken from the OpenAPI document so the two
/// cannot drift apart.
#[derive(Debug, Clone, Default)]
pub struct KnownQueryParameters(Arc<HashMap<String, BTreeSet<String>>>);

impl KnownQueryParameters {
    /// Every operation's `in: query` parameters.
    pub fn from_document(doc: &utoipa::openapi::OpenApi) -> KnownQueryParameters {
        let mut known: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (path, item) in &doc.paths.paths {
            let names = known.entry(path.clone()).or_default();
            let operations = [&item.get, &item.post, &item.put, &item.delete, &item.patch];
            for operation in operations.into_iter().flatten() {
                for parameter in operation.parameters.iter().flatten() {
                    if let utoipa::openapi::RefOr::T(parameter) = parameter
                        && parameter.parameter_in == utoipa::openapi::path::ParameterIn::Query
                    {
                        names.insert(parameter.name.clone());
                    }
                }
            }
        }
        KnownQueryParameters(Arc::new(known))
    }

    /// The first parameter of `query` that the route `template` does not
    /// document, if any. Routes missing from the document are not checked.
    pub fn unknown<'q>(&self, template: &str, query: &'q str) -> Option<Cow<'q, str>> {
        let known = self.0.get(template)?;
        form_urlencoded::parse(query.as_bytes())
            .map(|(name, _)| name)
            .find(|name| !known.contains(name.as_ref()))
    }
}

/// Rejects a request naming a query parameter its route does not have: a
/// misspelt filter (`?form_tick=5`) must be a 400, not a silently unfiltered
/// answer.
pub async fn reject_unknown_query_parameters(
    State(known): State<KnownQueryParameters>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let unknown = match (&matched, request.uri().query()) {
        (Some(matched), Some(query)) => known
            .unknown(matched.as_str(), query)
            .map(|name| crate::params::shorten(&name).into_owned()),
        _ => None,
    };
    if let (Some(matched), Some(shown)) = (matched, unknown) {
        let mut allowed: Vec<&str> = known
            .0
            .get(matched.as_str())
            .map(|names| names.iter().map(String::as_str).collect())
            .unwrap_or_default();
        allowed.sort_unstable();
        let detail = if allowed.is_empty() {
            format!("unknown query parameter `{shown}`: this route takes none")
        } else {
            format!(
                "unknown query parameter `{shown}`; this route takes: {}",
                allowed.join(", ")
            )
        };
        return ApiError::bad(shown, detail).into_response();
    }
    next.run(request).await
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

    fn known() -> KnownQueryParameters {
        KnownQueryParameters(Arc::new(HashMap::from([(
            "/v1/worlds/{world}/story/choices".to_owned(),
            BTreeSet::from(["player".to_owned(), "from_tick".to_owned()]),
        )])))
    }

    #[test]
    fn given_documented_parameters_then_nothing_is_unknown() {
        let known = known();
        assert_eq!(
            known.unknown("/v1/worlds/{world}/story/choices", "player=a&from_tick=3"),
            None
        );
    }

    #[test]
    fn given_a_misspelt_parameter_then_it_is_named() {
        let known = known();
        assert_eq!(
            known
                .unknown("/v1/worlds/{world}/story/choices", "player=a&form_tick=3")
                .as_deref(),
            Some("form_tick")
        );
        assert_eq!(
            known
                .unknown("/v1/worlds/{world}/story/choices", "pl%61yer=a&x%20y=1")
                .as_deref(),
            Some("x y"),
            "names are compared decoded"
        );
    }

    #[test]
    fn given_an_undocumented_route_then_it_is_not_checked() {
        assert_eq!(known().unknown("/elsewhere", "anything=1"), None);
    }
}
