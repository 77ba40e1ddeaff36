//! Bearer-token authentication and the environment rights a token grants.
//!
//! Tokens are JWTs signed with HS256. A token names the environments it may invalidate in a
//! claim (`envs` by default): a list of environment ids, where `*` means every environment.
//! `exp` is required.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachecast_bus::Secret;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The secret `cachecast up` and `cachecast token` use for a local stack. Never for production:
/// `serve` requires a secret of its own.
pub const DEV_SECRET: &str = "cachecast-dev-secret-for-local-stacks-only";

/// The `[auth]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 signing secret. Required by `serve`.
    pub hs256_secret: Option<Secret>,
    /// The claim that lists the environments a token may invalidate.
    pub envs_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            envs_claim: "envs".into(),
            leeway: Duration::from_secs(5),
        }
    }
}

/// Why a request is not authenticated (`401`) or could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <JWT>`")]
    MissingToken,
    #[error("the Authorization header is not `Bearer <JWT>`")]
    NotBearer,
    #[error("the token has expired: get a new one")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error(
        "auth.hs256_secret is not set: set CACHECAST_AUTH__HS256_SECRET or hs256_secret in the [auth] section (for a local stack, use `cachecast up`)"
    )]
    NoSecret,
}

/// What a valid token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: Option<String>,
    envs: Vec<String>,
}

impl Grant {
    /// True if the token may invalidate `env`.
    pub fn allows(&self, env: &str) -> bool {
        self.envs.iter().any(|e| e == "*" || e == env)
    }
}

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    envs_claim: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("envs_claim", &self.envs_claim)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let secret = config.hs256_secret.as_ref().ok_or(AuthError::NoSecret)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Self {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            envs_claim: config.envs_claim.clone(),
        })
    }

    /// Checks the value of an `Authorization` header.
    pub fn verify(&self, authorization: Option<&str>) -> Result<Grant, AuthError> {
        let header = authorization.ok_or(AuthError::MissingToken)?;
        // The scheme is case-insensitive (RFC 9110).
        let token = header
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
            .map(|_| header[7..].trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NotBearer)?;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|err| match err.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                AuthError::Invalid("bad signature".into())
            }
            _ => AuthError::Invalid(err.to_string()),
        })?;
        let claims = data.claims;
        let envs = match claims.get(&self.envs_claim) {
            Some(serde_json::Value::String(env)) => vec![env.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Grant {
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_owned),
            envs,
        })
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(flatten)]
    envs: serde_json::Map<String, serde_json::Value>,
}

/// Signs an HS256 token for `envs` (`*` for all), valid for `ttl`.
pub fn issue_hs256(
    secret: &Secret,
    envs_claim: &str,
    envs: &[String],
    subject: &str,
    ttl: Duration,
) -> Result<String, AuthError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut env_claims = serde_json::Map::new();
    env_claims.insert(envs_claim.to_owned(), serde_json::json!(envs));
    let claims = IssuedClaims {
        sub: subject,
        iat: now,
        exp: now + ttl.as_secs().max(1),
        envs: env_claims,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(secret: &str) -> AuthConfig {
        AuthConfig {
            hs256_secret: Some(Secret::new(secret)),
            ..AuthConfig::default()
        }
    }

    fn token(secret: &str, envs: &[&str], ttl: Duration) -> String {
        let envs: Vec<String> = envs.iter().map(|e| e.to_string()).collect();
        issue_hs256(&Secret::new(secret), "envs", &envs, "test", ttl).expect("signs")
    }

    #[test]
    fn a_valid_token_grants_its_environments() {
        let verifier = Verifier::new(&config("s3cret")).expect("configured");
        let t = token("s3cret", &["dev", "qa"], Duration::from_secs(60));
        let grant = verifier
            .verify(Some(&format!("Bearer {t}")))
            .expect("valid");
        assert!(grant.allows("dev") && grant.allows("qa"));
        assert!(!grant.allows("prod"));
        let all = token("s3cret", &["*"], Duration::from_secs(60));
        let grant = verifier
            .verify(Some(&format!("Bearer {all}")))
            .expect("valid");
        assert!(grant.allows("prod"));
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let verifier = Verifier::new(&config("s3cret")).expect("configured");
        assert_eq!(verifier.verify(None), Err(AuthError::MissingToken));
        assert_eq!(
            verifier.verify(Some("Basic abc")),
            Err(AuthError::NotBearer)
        );
        assert!(matches!(
            verifier.verify(Some("Bearer not.a.jwt")),
            Err(AuthError::Invalid(_))
        ));
        let other = token("other", &["dev"], Duration::from_secs(60));
        assert!(matches!(
            verifier.verify(Some(&format!("Bearer {other}"))),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn serve_needs_a_secret() {
        assert_eq!(
            Verifier::new(&AuthConfig::default()).err(),
            Some(AuthError::NoSecret)
        );
    }
}
