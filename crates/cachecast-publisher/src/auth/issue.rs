//! Issuing tokens: `cachecast token`, `cachecast up` and the tests.
//!
//! Production tokens come from an identity provider; cachecast signs HS256 tokens for
//! development, and RS256 / ES256 tokens with a PEM private key (for providers-to-be and tests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cachecast_bus::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{AuthConfig, AuthError, Right};

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// The `sub` claim.
    pub subject: String,
    /// Environments (`*` for all).
    pub envs: Vec<String>,
    /// Rights, named in the token as `auth.scoped_right` / `auth.flush_right` /
    /// `auth.read_right` say.
    pub rights: Vec<Right>,
    /// How long it is valid.
    pub ttl: Duration,
}

impl TokenSpec {
    /// A token for `envs` with every right (scoped invalidations, flushes, reading).
    pub fn full(subject: impl Into<String>, envs: &[String], ttl: Duration) -> Self {
        Self {
            subject: subject.into(),
            envs: envs.to_vec(),
            rights: vec![Right::Scoped, Right::Flush, Right::Read],
            ttl,
        }
    }

    /// The claims, named as `config` says, with `iss` / `aud` when configured.
    pub fn claims(&self, config: &AuthConfig) -> serde_json::Map<String, serde_json::Value> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), self.subject.clone().into());
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + self.ttl.as_secs().max(1)).into());
        if let Some(issuer) = &config.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        if let Some(audience) = &config.audience {
            claims.insert("aud".into(), audience.clone().into());
        }
        claims.insert(config.envs_claim.clone(), serde_json::json!(self.envs));
        let rights: Vec<&str> = self.rights.iter().map(|r| r.name(config)).collect();
        claims.insert(config.rights_claim.clone(), serde_json::json!(rights));
        claims
    }
}

/// Signs HS256 tokens with `secret` (development).
pub fn issue_hs256(
    secret: &Secret,
    config: &AuthConfig,
    spec: &TokenSpec,
) -> Result<String, AuthError> {
    Signer::hs256(secret).sign(config, spec)
}

/// A signing key and its algorithm.
#[derive(Clone)]
pub struct Signer {
    key: EncodingKey,
    header: Header,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.header.alg)
            .field("kid", &self.header.kid)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &Secret) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.expose().as_bytes()),
            header: Header::new(Algorithm::HS256),
        }
    }

    /// RS256 (an RSA private key) or ES256 (a P-256 private key, PKCS#8) from PEM, with an
    /// optional `kid` header.
    pub fn from_pem(pem: &[u8], kid: Option<&str>) -> Result<Self, AuthError> {
        let (key, alg) = if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            (key, Algorithm::RS256)
        } else if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            (key, Algorithm::ES256)
        } else {
            return Err(AuthError::Config(
                "the private key is neither an RSA nor a P-256 EC key in PEM (PKCS#8 -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)".into(),
            ));
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        Ok(Self { key, header })
    }

    /// The algorithm it signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.header.alg
    }

    /// A signed token for `spec`.
    pub fn sign(&self, config: &AuthConfig, spec: &TokenSpec) -> Result<String, AuthError> {
        jsonwebtoken::encode(&self.header, &spec.claims(config), &self.key)
            .map_err(|e| AuthError::Config(format!("could not sign the token: {e}")))
    }
}
