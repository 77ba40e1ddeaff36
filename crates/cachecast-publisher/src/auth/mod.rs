//! Bearer-token authentication and the rights a token grants.
//!
//! Tokens are JWTs. In production they are signed by an identity provider with **RS256** or
//! **ES256**, and the publisher verifies them with the provider's public keys, fetched from a
//! JWKS URL ([`jwks`]: cached, refreshed on an unknown `kid` at a bounded rate) or read from a
//! PEM file ([`keys`]). **HS256** with a shared secret is for development: `serve` refuses it
//! unless `auth.allow_hs256 = true` (`cachecast up` and the tests enable it).
//!
//! Every token needs `exp`; `nbf`, `iss` and `aud` are checked (the last two when configured),
//! with `auth.leeway` of clock skew. The algorithm is taken from the key, never from the token
//! alone: a token is verified only with a key of its own algorithm, so `alg: none` and
//! algorithm confusion (an HS256 token "signed" with an RSA public key) are refused.
//!
//! What a valid token may do is in its claims ([`rights`]): the environments (`envs`, `*` for
//! all) and the rights (`rights`): `purge_select` for scoped invalidations, `purge_all` for
//! flushing a whole environment. Claim names and right names are configurable.

mod issue;
pub mod jwks;
mod keys;
pub mod rights;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cachecast_bus::Secret;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

pub use self::issue::{Signer, TokenSpec, issue_hs256};
pub use self::rights::{Forbidden, Grant, Reach, Right};

use self::jwks::Jwks;

/// The secret `cachecast up` and `cachecast token` use for a local stack. Never for production:
/// `serve` requires a secret of its own.
pub const DEV_SECRET: &str = "cachecast-dev-secret-for-local-stacks-only";

/// The `[auth]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where the identity provider publishes its public keys (RS256 / ES256), e.g.
    /// `https://idp.example.com/.well-known/jwks.json`.
    pub jwks_url: Option<String>,
    /// A PEM file with one RSA or EC (P-256) public key, for providers without a JWKS URL.
    pub public_key_file: Option<PathBuf>,
    /// The HS256 signing secret: development only, and only with `allow_hs256`.
    pub hs256_secret: Option<Secret>,
    /// Accept HS256 tokens signed with `hs256_secret`. Off by default: a shared secret is a
    /// development convenience, not a production credential.
    pub allow_hs256: bool,
    /// The required `iss` claim, when set.
    pub issuer: Option<String>,
    /// The required `aud` claim (one of the token's audiences), when set.
    pub audience: Option<String>,
    /// The claim that lists the environments a token may invalidate.
    pub envs_claim: String,
    /// The claim that lists the token's rights (an array, or a space-separated string).
    pub rights_claim: String,
    /// The right to invalidate scopes or identities.
    pub scoped_right: String,
    /// The right to flush a whole environment (a body of `{}`).
    pub flush_right: String,
    /// The right to read an environment's caches and agents (the inventory).
    pub read_right: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// One JWKS fetch, connection included.
    #[serde(with = "humantime_serde")]
    pub jwks_timeout: Duration,
    /// Keys are fetched again when they are older than this.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,
    /// At most one fetch this often, however many tokens name an unknown `kid`.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refresh: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwks_url: None,
            public_key_file: None,
            hs256_secret: None,
            allow_hs256: false,
            issuer: None,
            audience: None,
            envs_claim: "envs".into(),
            rights_claim: "rights".into(),
            scoped_right: "purge_select".into(),
            flush_right: "purge_all".into(),
            read_right: "read".into(),
            leeway: Duration::from_secs(5),
            jwks_timeout: Duration::from_secs(5),
            jwks_max_age: Duration::from_secs(600),
            jwks_min_refresh: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// A development configuration: HS256 with `secret`, enabled.
    pub fn hs256_for_development(secret: impl Into<String>) -> Self {
        Self {
            hs256_secret: Some(Secret::new(secret)),
            allow_hs256: true,
            ..Self::default()
        }
    }
}

/// Why a request is not authenticated (`401`), could not be authenticated now (`503`), or
/// why the verifier cannot be built from its configuration.
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
    #[error("the signing keys could not be fetched ({0}); retry shortly")]
    KeysUnavailable(String),
    #[error(
        "no way to verify tokens: set auth.jwks_url (CACHECAST_AUTH__JWKS_URL) or auth.public_key_file for RS256/ES256 tokens; for development, auth.hs256_secret with auth.allow_hs256 = true (or use `cachecast up`)"
    )]
    NoKeys,
    #[error(
        "auth.hs256_secret is set but HS256 is for development only: set auth.allow_hs256 = true (CACHECAST_AUTH__ALLOW_HS256=true) to accept it anyway, or configure auth.jwks_url / auth.public_key_file"
    )]
    Hs256NotAllowed,
    #[error(
        "auth.allow_hs256 is true but auth.hs256_secret is not set: set CACHECAST_AUTH__HS256_SECRET"
    )]
    NoSecret,
    #[error("{0}")]
    Config(String),
}

/// Verifies bearer tokens. Cheap to clone (shared key cache).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    hs256: Option<DecodingKey>,
    public_key: Option<(DecodingKey, Algorithm)>,
    jwks: Option<Jwks>,
    validation: Validation,
    config: AuthConfig,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.inner.hs256.is_some())
            .field("public_key", &self.inner.public_key.as_ref().map(|k| k.1))
            .field("jwks", &self.inner.jwks)
            .finish_non_exhaustive()
    }
}

/// The algorithms cachecast accepts; everything else (including `none`) is refused.
const ASYMMETRIC: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

impl Verifier {
    /// Builds a verifier from the configuration. Reads `public_key_file`; never fetches the
    /// JWKS (that happens on the first request, or through [`Verifier::prefetch`]).
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let hs256 = match (&config.hs256_secret, config.allow_hs256) {
            (Some(_), false) => return Err(AuthError::Hs256NotAllowed),
            (None, true) => return Err(AuthError::NoSecret),
            (Some(secret), true) => Some(DecodingKey::from_secret(secret.expose().as_bytes())),
            (None, false) => None,
        };
        let public_key = config
            .public_key_file
            .as_deref()
            .map(keys::read_public_key)
            .transpose()?;
        let jwks = config
            .jwks_url
            .as_deref()
            .map(|url| Jwks::new(url, config))
            .transpose()?;
        if hs256.is_none() && public_key.is_none() && jwks.is_none() {
            return Err(AuthError::NoKeys);
        }
        // The template: the algorithm is set per token, to the key's one.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            inner: Arc::new(Inner {
                hs256,
                public_key,
                jwks,
                validation,
                config: config.clone(),
            }),
        })
    }

    /// Fetches the JWKS now (if one is configured), so the first request does not wait.
    pub async fn prefetch(&self) -> Result<(), AuthError> {
        match &self.inner.jwks {
            Some(jwks) => jwks.refresh_now().await,
            None => Ok(()),
        }
    }

    /// Checks the value of an `Authorization` header.
    pub async fn verify(&self, authorization: Option<&str>) -> Result<Grant, AuthError> {
        let header = authorization.ok_or(AuthError::MissingToken)?;
        // The scheme is case-insensitive (RFC 9110).
        let token = header
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
            .map(|_| header[7..].trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NotBearer)?;
        let jwt_header = jsonwebtoken::decode_header(token).map_err(|err| {
            // An unknown `alg` (`none` included) does not even parse as a header.
            AuthError::Invalid(format!(
                "unreadable header ({err}); the accepted algorithms are RS256 and ES256"
            ))
        })?;
        let alg = jwt_header.alg;
        let key: DecodingKey = if alg == Algorithm::HS256 {
            self.inner.hs256.clone().ok_or_else(|| {
                AuthError::Invalid("HS256 tokens are not accepted here; use RS256 or ES256".into())
            })?
        } else if ASYMMETRIC.contains(&alg) {
            match (&self.inner.public_key, &self.inner.jwks) {
                (Some((key, key_alg)), _) if *key_alg == alg => key.clone(),
                (_, Some(jwks)) => jwks.key(jwt_header.kid.as_deref(), alg).await?,
                _ => {
                    return Err(AuthError::Invalid(format!(
                        "no key for {alg:?} tokens is configured"
                    )));
                }
            }
        } else {
            return Err(AuthError::Invalid(format!(
                "algorithm {alg:?} is not accepted; use RS256 or ES256"
            )));
        };
        let mut validation = self.inner.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|err| {
            use jsonwebtoken::errors::ErrorKind;
            match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("not valid yet (nbf is in the future)".into())
                }
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)".into()),
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("the {claim} claim is required"))
                }
                ErrorKind::InvalidAlgorithm => {
                    AuthError::Invalid("the key does not match the token's algorithm".into())
                }
                _ => AuthError::Invalid(err.to_string()),
            }
        })?;
        Ok(Grant::from_claims(&data.claims, &self.inner.config))
    }
}

#[cfg(test)]
mod tests;
