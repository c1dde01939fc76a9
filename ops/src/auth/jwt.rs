//! Signed JSON Web Tokens (RFC 7519) as bearer tokens: HS256 with a shared
//! secret, RS256 with an identity provider's public key.
//!
//! A token is accepted when its signature verifies with the key of the
//! algorithm its header names (only configured algorithms are tried, so an
//! `alg: none` or an HS256 token signed with the RSA public key as the secret is
//! refused), `iss` and `aud` match, `exp` is in the future and `nbf` (when
//! present) in the past, both with `leeway_seconds` of tolerance.

use std::collections::BTreeSet;
use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use worldline_schemas::WorldId;

use super::{AuthConfigError, Principal, Scope, TokenVerifier};
use crate::config::JwtSettings;

/// Shortest accepted HS256 secret: RFC 7518 §3.2 asks for a key at least as
/// long as the hash output (256 bits).
const MIN_HS256_SECRET_BYTES: usize = 32;

/// Verifies JWTs against the configured issuer, audience and keys.
pub struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    leeway_seconds: u64,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field(
                "algorithms",
                &self.keys.iter().map(|(alg, _)| *alg).collect::<Vec<_>>(),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_seconds", &self.leeway_seconds)
            .finish_non_exhaustive()
    }
}

/// The claims worldline reads besides the registered ones checked by [`Validation`].
#[derive(Debug, Deserialize)]
struct Claims {
    /// Who the token stands for; names the principal.
    sub: String,
    /// Space-separated scopes (RFC 8693 §4.2); names worldline does not know
    /// (`openid`, `profile`) are ignored.
    #[serde(default)]
    scope: Option<String>,
    /// Worlds the token may touch; absent means every world.
    #[serde(default)]
    worlds: Option<Vec<String>>,
}

impl JwtVerifier {
    /// Checks and loads `auth.jwt`.
    pub fn from_config(settings: &JwtSettings) -> Result<JwtVerifier, AuthConfigError> {
        let invalid = |why: &str| AuthConfigError::Jwt(why.to_owned());
        if settings.issuer.is_empty() {
            return Err(invalid("issuer is empty"));
        }
        if settings.audience.is_empty() {
            return Err(invalid("audience is empty"));
        }
        let mut keys = Vec::new();
        if let Some(secret) = &settings.hs256_secret {
            if secret.len() < MIN_HS256_SECRET_BYTES {
                return Err(invalid("hs256_secret must be at least 32 bytes"));
            }
            keys.push((
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        if let Some(pem) = &settings.rs256_public_key_pem {
            let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                .map_err(|e| AuthConfigError::Jwt(format!("rs256_public_key_pem: {e}")))?;
            keys.push((Algorithm::RS256, key));
        }
        if keys.is_empty() {
            return Err(invalid(
                "set hs256_secret or rs256_public_key_pem (or remove the section)",
            ));
        }
        Ok(JwtVerifier {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_seconds: settings.leeway_seconds,
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation
    }
}

impl TokenVerifier for JwtVerifier {
    fn verify(&self, token: &str) -> Option<Principal> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let (algorithm, key) = self.keys.iter().find(|(alg, _)| *alg == header.alg)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation(*algorithm))
            .map_err(|e| tracing::debug!(error = %e, "JWT refused"))
            .ok()?;
        principal_from_claims(data.claims)
    }
}

/// The principal of verified claims; `None` when a `worlds` entry is not a
/// world id (a limit that cannot be read must not turn into no limit).
fn principal_from_claims(claims: Claims) -> Option<Principal> {
    let scopes: BTreeSet<Scope> = claims
        .scope
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter_map(|s| s.parse().ok())
        .collect();
    let worlds = match claims.worlds {
        None => None,
        Some(worlds) => Some(
            worlds
                .iter()
                .map(|w| WorldId::parse(w).ok())
                .collect::<Option<BTreeSet<_>>>()?,
        ),
    };
    Some(Principal {
        name: format!("jwt:{}", claims.sub),
        scopes,
        worlds,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const RSA_PRIVATE: &str = include_str!("../../../tests/fixtures/jwt/rs256-private.pem");
    const RSA_PUBLIC: &str = include_str!("../../../tests/fixtures/jwt/rs256-public.pem");

    fn settings() -> JwtSettings {
        JwtSettings {
            issuer: "https://id.example".to_owned(),
            audience: "worldline".to_owned(),
            hs256_secret: Some(SECRET.to_owned()),
            rs256_public_key_pem: Some(RSA_PUBLIC.to_owned()),
            leeway_seconds: 30,
        }
    }

    fn claims(overrides: Value) -> Value {
        let now = get_current_timestamp();
        let mut claims = json!({
            "iss": "https://id.example",
            "aud": "worldline",
            "sub": "game-server-7",
            "exp": now + 300,
            "nbf": now - 10,
            "scope": "openid read ingest",
        });
        if let (Some(base), Value::Object(extra)) = (claims.as_object_mut(), overrides) {
            base.extend(extra);
        }
        claims
    }

    fn hs256(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn rs256(claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn given_valid_tokens_of_either_algorithm_then_scopes_and_worlds_come_from_claims() {
        let verifier = JwtVerifier::from_config(&settings()).unwrap();
        let hs = verifier.verify(&hs256(&claims(json!({})))).unwrap();
        assert_eq!(hs.name, "jwt:game-server-7");
        assert_eq!(hs.scopes, BTreeSet::from([Scope::Read, Scope::Ingest]));
        assert_eq!(hs.worlds, None);
        let rs = verifier
            .verify(&rs256(&claims(json!({"worlds": ["emberfall"]}))))
            .unwrap();
        assert!(rs.sees_world("emberfall"));
        assert!(!rs.sees_world("frostholm"));
    }

    #[test]
    fn given_registered_claims_out_of_bounds_then_the_token_is_refused() {
        let verifier = JwtVerifier::from_config(&settings()).unwrap();
        let now = get_current_timestamp();
        for (why, overrides) in [
            ("expired", json!({"exp": now - 60})),
            ("not yet valid", json!({"nbf": now + 60})),
            ("wrong audience", json!({"aud": "someone-else"})),
            ("wrong issuer", json!({"iss": "https://evil.example"})),
            ("bad world", json!({"worlds": ["no spaces allowed"]})),
        ] {
            assert!(
                verifier.verify(&hs256(&claims(overrides))).is_none(),
                "{why}"
            );
        }
    }

    #[test]
    fn given_a_small_clock_skew_then_the_leeway_accepts_it() {
        let verifier = JwtVerifier::from_config(&settings()).unwrap();
        let now = get_current_timestamp();
        let skewed = claims(json!({"exp": now - 5, "nbf": now + 5}));
        assert!(verifier.verify(&hs256(&skewed)).is_some());
    }

    #[test]
    fn given_a_token_of_an_unconfigured_algorithm_or_a_forged_signature_then_it_is_refused() {
        let only_rs = JwtVerifier::from_config(&JwtSettings {
            hs256_secret: None,
            ..settings()
        })
        .unwrap();
        assert!(only_rs.verify(&hs256(&claims(json!({})))).is_none());
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        )
        .unwrap();
        let verifier = JwtVerifier::from_config(&settings()).unwrap();
        assert!(verifier.verify(&forged).is_none());
        assert!(verifier.verify("not.a.jwt").is_none());
    }

    #[test]
    fn given_unusable_settings_then_loading_fails() {
        for broken in [
            JwtSettings {
                hs256_secret: Some("short".to_owned()),
                ..settings()
            },
            JwtSettings {
                hs256_secret: None,
                rs256_public_key_pem: None,
                ..settings()
            },
            JwtSettings {
                rs256_public_key_pem: Some("not a pem".to_owned()),
                ..settings()
            },
            JwtSettings {
                issuer: String::new(),
                ..settings()
            },
        ] {
            assert!(JwtVerifier::from_config(&broken).is_err());
        }
    }
}
