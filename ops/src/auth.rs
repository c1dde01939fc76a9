//! Bearer-token authentication and scope checks for the HTTP roles.
//!
//! A request presents `Authorization: Bearer <token>`. An [`Authenticator`] asks
//! its [`TokenVerifier`]s, in order, who the token stands for (a [`Principal`]);
//! [`authorize`] then decides, without I/O, whether that principal may use a
//! scope on a world. Two kinds of token exist: static tokens from the
//! configuration ([`StaticTokens`]) and signed JWTs ([`JwtVerifier`], HS256 or RS256).
//!
//! Answers, as RFC 9457 `application/problem+json`:
//! - no usable credentials, or a token nobody recognises: **401** with
//!   `WWW-Authenticate: Bearer realm="worldline"` (plus `error="invalid_token"`
//!   when a bearer token was presented, RFC 6750 §3.1);
//! - a valid token without the scope: **403** (`error="insufficient_scope"`);
//! - a valid token limited to other worlds: **404**, exactly what a world that
//!   does not exist would get, so a token cannot probe which worlds exist.
//!
//! [`require`] wraps a router's routes with these checks; the world is the
//! route's `{world}` path parameter, when it has one.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use worldline_schemas::WorldId;

use crate::config::{AuthSettings, StaticToken};

mod jwt;

pub use jwt::JwtVerifier;

/// The path parameter [`require`] reads the world from.
pub const WORLD_PARAM: &str = "world";

/// The realm named in `WWW-Authenticate` challenges.
const REALM: &str = "worldline";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Query read models.
    Read,
    /// Append events.
    Ingest,
    /// Operate the platform (rebuilds, replays).
    Admin,
}

impl Scope {
    /// The name used in configuration and in `WWW-Authenticate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not `read`, `ingest` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (expected read, ingest or admin)")]
pub struct UnknownScope(String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Scope::Read, Scope::Ingest, Scope::Admin]
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

/// Who a verified token stands for. Handlers behind [`require`] find it in the
/// request extensions (`Extension<Principal>`), e.g. to log who wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name; safe to log (the secret never is).
    pub name: String,
    /// Granted scopes.
    pub scopes: BTreeSet<Scope>,
    /// Worlds the principal may touch; `None` means every world.
    pub worlds: Option<BTreeSet<WorldId>>,
}

impl Principal {
    /// Whether the principal was granted `scope`.
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether the principal may touch `world` at all.
    pub fn sees_world(&self, world: &str) -> bool {
        match &self.worlds {
            None => true,
            Some(worlds) => worlds.iter().any(|w| w.as_str() == world),
        }
    }
}

/// Turns a presented bearer token into a principal. One implementation per kind
/// of credential: static tokens now, signed JWTs later.
pub trait TokenVerifier: Send + Sync + fmt::Debug {
    /// The principal `token` stands for, or `None` when this verifier does not
    /// accept it (the next verifier is asked).
    fn verify(&self, token: &str) -> Option<Principal>;
}

/// Tokens listed in the configuration (`auth.tokens`).
///
/// Only SHA-256 digests of the secrets are kept, and a presented token is
/// compared with every digest in constant time, so neither the comparison's
/// timing nor its position in the list says how close a guess was.
pub struct StaticTokens {
    entries: Vec<([u8; 32], Principal)>,
}

impl fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticTokens")
            .field(
                "names",
                &self
                    .entries
                    .iter()
                    .map(|(_, p)| p.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A configured token that cannot be used as given. Refusing to start beats
/// silently accepting less (or more) than the operator meant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth token #{index} has an empty name")]
    EmptyName { index: usize },
    #[error("auth token {name:?}: the secret is empty")]
    EmptySecret { name: String },
    #[error(
        "auth token {name:?}: the secret may only contain letters, digits and -._~+/ (RFC 6750 b64token), optionally ending in '='"
    )]
    UnusableSecret { name: String },
    #[error("auth token {name:?}: {source}")]
    Scope { name: String, source: UnknownScope },
    #[error("auth token {name:?}: world {world:?}: {source}")]
    World {
        name: String,
        world: String,
        source: worldline_schemas::WorldIdError,
    },
    #[error("auth tokens {first:?} and {second:?} have the same secret")]
    DuplicateSecret { first: String, second: String },
    #[error("two auth tokens are named {name:?}")]
    DuplicateName { name: String },
    #[error("auth.jwt: {0}")]
    Jwt(String),
}

impl StaticTokens {
    /// Checks and loads the configured tokens.
    pub fn from_config(tokens: &[StaticToken]) -> Result<StaticTokens, AuthConfigError> {
        let mut entries: Vec<([u8; 32], Principal)> = Vec::with_capacity(tokens.len());
        for (index, token) in tokens.iter().enumerate() {
            let principal = principal_from_config(index, token)?;
            let digest = digest(&token.token);
            if let Some((_, known)) = entries.iter().find(|(d, _)| *d == digest) {
                return Err(AuthConfigError::DuplicateSecret {
                    first: known.name.clone(),
                    second: principal.name,
                });
            }
            if entries.iter().any(|(_, p)| p.name == principal.name) {
                return Err(AuthConfigError::DuplicateName {
                    name: principal.name,
                });
            }
            entries.push((digest, principal));
        }
        Ok(StaticTokens { entries })
    }
}

fn principal_from_config(index: usize, token: &StaticToken) -> Result<Principal, AuthConfigError> {
    let name = token.name.clone();
    if name.is_empty() {
        return Err(AuthConfigError::EmptyName { index });
    }
    if token.token.is_empty() {
        return Err(AuthConfigError::EmptySecret { name });
    }
    if !is_b64token(&token.token) {
        return Err(AuthConfigError::UnusableSecret { name });
    }
    let scopes = token
        .scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|source| AuthConfigError::Scope {
            name: name.clone(),
            source,
        })?;
    let worlds = match &token.worlds {
        None => None,
        Some(worlds) => Some(
            worlds
                .iter()
                .map(|w| {
                    WorldId::parse(w).map_err(|source| AuthConfigError::World {
                        name: name.clone(),
                        world: w.clone(),
                        source,
                    })
                })
                .collect::<Result<BTreeSet<_>, _>>()?,
        ),
    };
    Ok(Principal {
        name,
        scopes,
        worlds,
    })
}

impl TokenVerifier for StaticTokens {
    fn verify(&self, token: &str) -> Option<Principal> {
        let presented = digest(token);
        // 1-based index of the match, 0 for none; every entry is compared and
        // the selection is branch-free, so timing does not depend on which matched.
        let mut matched: u32 = 0;
        for (i, (known, _)) in self.entries.iter().enumerate() {
            let position = u32::try_from(i + 1).unwrap_or(u32::MAX);
            matched = u32::conditional_select(&matched, &position, known.ct_eq(&presented));
        }
        let index = usize::try_from(matched).ok()?.checked_sub(1)?;
        self.entries.get(index).map(|(_, p)| p.clone())
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The RFC 6750 `b64token` syntax: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// Why a request is not allowed. Every variant renders as problem+json.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("this endpoint needs an `Authorization: Bearer <token>` header")]
    MissingCredentials,
    /// An `Authorization` header with another scheme (e.g. Basic).
    #[error("only the Bearer authorization scheme is accepted")]
    NotBearer,
    /// A bearer token that is malformed or that no verifier accepts.
    #[error("the bearer token is not valid")]
    InvalidToken,
    /// A valid token without the needed scope.
    #[error("token {principal:?} does not have the {scope} scope")]
    InsufficientScope { principal: String, scope: Scope },
    /// A valid token limited to other worlds. Says the same as "no such world".
    #[error("world {world:?} does not exist")]
    WorldNotFound { world: String },
}

impl AuthError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::MissingCredentials | AuthError::NotBearer | AuthError::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            AuthError::WorldNotFound { .. } => StatusCode::NOT_FOUND,
        }
    }

    /// The `WWW-Authenticate` challenge, when the answer carries one.
    pub fn challenge(&self) -> Option<String> {
        match self {
            AuthError::MissingCredentials | AuthError::NotBearer => {
                Some(format!("Bearer realm=\"{REALM}\""))
            }
            AuthError::InvalidToken => {
                Some(format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""))
            }
            AuthError::InsufficientScope { scope, .. } => Some(format!(
                "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{scope}\""
            )),
            AuthError::WorldNotFound { .. } => None,
        }
    }

    fn problem_type(&self) -> (&'static str, &'static str) {
        match self {
            AuthError::MissingCredentials | AuthError::NotBearer | AuthError::InvalidToken => (
                "https://worldline.dev/problems/unauthorized",
                "Unauthorized",
            ),
            AuthError::InsufficientScope { .. } => {
                ("https://worldline.dev/problems/forbidden", "Forbidden")
            }
            AuthError::WorldNotFound { .. } => {
                ("https://worldline.dev/problems/not-found", "Not found")
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (kind, title) = self.problem_type();
        let problem = Problem {
            kind,
            title,
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(challenge) = self
            .challenge()
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// The bearer token of an `Authorization` header, checked for syntax only.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingCredentials)?;
    if values.next().is_some() {
        // Two headers: which one counts is ambiguous, so neither does.
        return Err(AuthError::InvalidToken);
    }
    let value = value.to_str().map_err(|_| AuthError::InvalidToken)?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotBearer);
    }
    let token = token.trim_start_matches(' ');
    if !is_b64token(token) {
        return Err(AuthError::InvalidToken);
    }
    Ok(token)
}

/// The decision, given a verified principal: may it use `scope` on `world`?
///
/// The world is checked first so a token limited to other worlds learns nothing
/// about them, not even which scopes they would need.
pub fn authorize(
    principal: &Principal,
    scope: Scope,
    world: Option<&str>,
) -> Result<(), AuthError> {
    if let Some(world) = world
        && !principal.sees_world(world)
    {
        return Err(AuthError::WorldNotFound {
            world: world.to_owned(),
        });
    }
    if !principal.has_scope(scope) {
        return Err(AuthError::InsufficientScope {
            principal: principal.name.clone(),
            scope,
        });
    }
    Ok(())
}

/// Verifies bearer tokens with a list of [`TokenVerifier`]s.
#[derive(Debug)]
pub struct Authenticator {
    verifiers: Vec<Box<dyn TokenVerifier>>,
}

impl Authenticator {
    /// An authenticator asking `verifiers` in order.
    pub fn new(verifiers: Vec<Box<dyn TokenVerifier>>) -> Authenticator {
        Authenticator { verifiers }
    }

    /// The verifiers the configuration asks for: static tokens, then JWTs when
    /// `auth.jwt` is set. With nothing configured every request is refused:
    /// there is no "auth off".
    pub fn from_settings(settings: &AuthSettings) -> Result<Authenticator, AuthConfigError> {
        let tokens = StaticTokens::from_config(&settings.tokens)?;
        let mut verifiers: Vec<Box<dyn TokenVerifier>> = vec![Box::new(tokens)];
        if let Some(jwt) = &settings.jwt {
            verifiers.push(Box::new(JwtVerifier::from_config(jwt)?));
        }
        Ok(Authenticator::new(verifiers))
    }

    /// Who the request's bearer token stands for.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let token = bearer_token(headers)?;
        self.verifiers
            .iter()
            .find_map(|verifier| verifier.verify(token))
            .ok_or(AuthError::InvalidToken)
    }

    /// Authenticates the request and checks `scope` on `world`.
    pub fn check(
        &self,
        headers: &HeaderMap,
        scope: Scope,
        world: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let principal = self.authenticate(headers)?;
        authorize(&principal, scope, world)?;
        Ok(principal)
    }
}

/// What [`require`]'s middleware checks.
#[derive(Debug, Clone)]
struct Requirement {
    authenticator: Arc<Authenticator>,
    scope: Scope,
}

/// Puts every route of `router` behind a bearer token with `scope` (and access
/// to the `{world}` path parameter, when the route has one). Add the routes
/// first: the check is a route layer, so unknown paths still get a plain 404.
/// The [`Principal`] is inserted into the request extensions.
pub fn require<S>(router: Router<S>, authenticator: Arc<Authenticator>, scope: Scope) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.route_layer(axum::middleware::from_fn_with_state(
        Requirement {
            authenticator,
            scope,
        },
        check_requirement,
    ))
}

async fn check_requirement(
    State(requirement): State<Requirement>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    let world = params.ok().and_then(|params| {
        params
            .iter()
            .find(|(key, _)| *key == WORLD_PARAM)
            .map(|(_, value)| value.to_owned())
    });
    match requirement
        .authenticator
        .check(request.headers(), requirement.scope, world.as_deref())
    {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(refusal) => {
            tracing::debug!(scope = %requirement.scope, world, %refusal, "request refused");
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configured(
        name: &str,
        secret: &str,
        scopes: &[&str],
        worlds: Option<&[&str]>,
    ) -> StaticToken {
        StaticToken {
            name: name.to_owned(),
            token: secret.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            worlds: worlds.map(|ws| ws.iter().map(|w| (*w).to_owned()).collect()),
        }
    }

    fn authenticator() -> Authenticator {
        Authenticator::from_settings(&AuthSettings {
            tokens: vec![
                configured("game-eu", "s3cret-eu", &["ingest"], Some(&["emberfall"])),
                configured("dashboard", "r3ad.only~", &["read"], None),
                configured("ops", "0ps+admin/x==", &["read", "ingest", "admin"], None),
            ],
            ..AuthSettings::default()
        })
        .unwrap()
    }

    fn headers(authorization: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in authorization {
            map.append(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn given_a_known_token_then_its_principal_is_returned() {
        let auth = authenticator();
        for (value, name) in [
            ("Bearer s3cret-eu", "game-eu"),
            ("bearer r3ad.only~", "dashboard"),
            ("Bearer 0ps+admin/x==", "ops"),
        ] {
            assert_eq!(auth.authenticate(&headers(&[value])).unwrap().name, name);
        }
    }

    #[test]
    fn given_no_or_foreign_credentials_then_the_challenge_has_no_error_code() {
        let auth = authenticator();
        for (given, expected) in [
            (headers(&[]), AuthError::MissingCredentials),
            (headers(&["Basic dXNlcjpwYXNz"]), AuthError::NotBearer),
        ] {
            let err = auth.authenticate(&given).unwrap_err();
            assert_eq!(err, expected);
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(err.challenge().unwrap(), "Bearer realm=\"worldline\"");
        }
    }

    #[test]
    fn given_a_presented_but_bad_token_then_the_answer_is_invalid_token() {
        let auth = authenticator();
        for value in [
            "Bearer nope",
            "Bearer s3cret-e",
            "Bearer s3cret-eu2",
            "Bearer ",
            "Bearer has space",
            "Bearer",
        ] {
            let err = auth.authenticate(&headers(&[value])).unwrap_err();
            assert_eq!(err, AuthError::InvalidToken, "{value}");
            assert_eq!(
                err.challenge().unwrap(),
                "Bearer realm=\"worldline\", error=\"invalid_token\""
            );
        }
        let twice = headers(&["Bearer s3cret-eu", "Bearer s3cret-eu"]);
        assert_eq!(auth.authenticate(&twice), Err(AuthError::InvalidToken));
    }

    #[test]
    fn given_a_valid_token_then_scope_and_world_decide() {
        let auth = authenticator();
        let eu = headers(&["Bearer s3cret-eu"]);
        assert!(auth.check(&eu, Scope::Ingest, Some("emberfall")).is_ok());
        assert_eq!(
            auth.check(&eu, Scope::Ingest, Some("frostholm")),
            Err(AuthError::WorldNotFound {
                world: "frostholm".to_owned()
            })
        );
        let err = auth.check(&eu, Scope::Read, Some("emberfall")).unwrap_err();
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            err.challenge().unwrap(),
            "Bearer realm=\"worldline\", error=\"insufficient_scope\", scope=\"read\""
        );
        let dashboard = headers(&["Bearer r3ad.only~"]);
        assert!(
            auth.check(&dashboard, Scope::Read, Some("anything"))
                .is_ok()
        );
        assert!(auth.check(&dashboard, Scope::Read, None).is_ok());
    }

    #[test]
    fn given_a_token_limited_to_other_worlds_then_the_world_is_hidden_before_the_scope() {
        let auth = authenticator();
        let eu = headers(&["Bearer s3cret-eu"]);
        assert_eq!(
            auth.check(&eu, Scope::Admin, Some("frostholm"))
                .unwrap_err()
                .status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn given_no_configured_tokens_then_every_token_is_refused() {
        let auth = Authenticator::from_settings(&AuthSettings::default()).unwrap();
        assert_eq!(
            auth.authenticate(&headers(&["Bearer anything"])),
            Err(AuthError::InvalidToken)
        );
    }

    #[test]
    fn given_unusable_configuration_then_loading_fails_with_the_token_name() {
        let cases = [
            vec![configured("a", "", &["read"], None)],
            vec![configured("", "x", &["read"], None)],
            vec![configured("a", "has space", &["read"], None)],
            vec![configured("a", "x", &["write"], None)],
            vec![configured("a", "x", &["read"], Some(&["no spaces"]))],
            vec![
                configured("a", "x", &["read"], None),
                configured("b", "x", &["read"], None),
            ],
            vec![
                configured("a", "x", &["read"], None),
                configured("a", "y", &["read"], None),
            ],
        ];
        for tokens in cases {
            let err = Authenticator::from_settings(&AuthSettings {
                tokens,
                ..AuthSettings::default()
            })
            .unwrap_err();
            assert!(!err.to_string().contains("has space"), "no secret in {err}");
        }
    }

    #[test]
    fn given_an_error_then_it_renders_as_problem_json_with_the_challenge() {
        let response = AuthError::InvalidToken.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let hidden = AuthError::WorldNotFound {
            world: "w".to_owned(),
        }
        .into_response();
        assert!(!hidden.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
