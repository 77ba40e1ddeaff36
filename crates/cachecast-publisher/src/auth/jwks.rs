//! The identity provider's public keys, from its JWKS URL.
//!
//! Keys are fetched on first use and kept. They are fetched again when a token names a `kid`
//! the cache does not hold (the provider rotated its keys) or when they are older than
//! `auth.jwks_max_age`, but **at most once per `auth.jwks_min_refresh`**: a flood of tokens
//! with made-up `kid`s costs one fetch, not one per request. Fetches are serialized (callers
//! that arrive during one wait for it and use its result) and bounded by `auth.jwks_timeout`;
//! a body over 1 MiB is refused. When a fetch fails, the keys already held stay in use.
//!
//! Only RSA keys (RS256) and P-256 EC keys (ES256) meant for signatures are kept; symmetric
//! (`oct`) keys and keys for other algorithms are ignored, so a JWKS can never turn a public
//! key into an HMAC secret.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use super::{AuthConfig, AuthError};

/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A cached JWKS.
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    max_age: Duration,
    min_refresh: Duration,
    cache: RwLock<Cache>,
    /// Held while fetching; the last attempt's time.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Cache {
    keys: Vec<Key>,
    fetched_at: Option<Instant>,
}

#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &cachecast_bus::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

impl Jwks {
    pub(super) fn new(url: &str, config: &AuthConfig) -> Result<Self, AuthError> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(AuthError::Config(format!(
                "auth.jwks_url {:?} is not an http(s) URL; use the provider's https://.../jwks.json",
                cachecast_bus::redact_url(url)
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.jwks_timeout)
            .timeout(config.jwks_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(|err| AuthError::Config(format!("the JWKS client: {err}")))?;
        Ok(Self {
            url: url.to_owned(),
            client,
            max_age: config.jwks_max_age,
            min_refresh: config.jwks_min_refresh,
            cache: RwLock::new(Cache::default()),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    /// The key for a token with `kid` and `alg`, fetching the JWKS if needed (and allowed).
    pub(super) async fn key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<DecodingKey, AuthError> {
        let (found, fresh, seen_fetch) = self.lookup(kid, alg);
        if let (Some(key), true) = (&found, fresh) {
            return Ok(key.clone());
        }
        let mut last_attempt = self.fetching.lock().await;
        // Someone else fetched while this request waited: use what they got.
        let (found, _, now_fetch) = self.lookup(kid, alg);
        if now_fetch != seen_fetch {
            return found.ok_or_else(|| unknown(kid));
        }
        if last_attempt.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return match found {
                Some(key) => Ok(key),
                None if now_fetch.is_none() => Err(AuthError::KeysUnavailable(
                    "the last JWKS fetch failed".into(),
                )),
                None => Err(unknown(kid)),
            };
        }
        *last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                metrics::counter!("cachecast_jwks_fetches_total", "outcome" => "ok").increment(1);
                tracing::info!(keys = keys.len(), "fetched the JWKS");
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                cache.keys = keys;
                cache.fetched_at = Some(Instant::now());
            }
            Err(reason) => {
                metrics::counter!("cachecast_jwks_fetches_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(%reason, url = %cachecast_bus::redact_url(&self.url), "could not fetch the JWKS; keeping the keys held");
                return found.ok_or(AuthError::KeysUnavailable(reason));
            }
        }
        drop(last_attempt);
        let (found, _, _) = self.lookup(kid, alg);
        found.ok_or_else(|| unknown(kid))
    }

    /// Fetches now, unless a fetch happened within `min_refresh`.
    pub(super) async fn refresh_now(&self) -> Result<(), AuthError> {
        match self.key(Some("\u{0}prefetch"), Algorithm::RS256).await {
            Ok(_) | Err(AuthError::Invalid(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The matching key, whether the cache is fresh, and when it was fetched.
    fn lookup(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> (Option<DecodingKey>, bool, Option<Instant>) {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let mut candidates = cache
            .keys
            .iter()
            .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid));
        let found = match (kid, candidates.next(), candidates.next()) {
            (Some(_), Some(key), _) => Some(key.key.clone()),
            // Without a kid, only an unambiguous key will do.
            (None, Some(key), None) => Some(key.key.clone()),
            _ => None,
        };
        let fresh = cache
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.max_age);
        (found, fresh, cache.fetched_at)
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| format!("request failed: {}", err.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("the JWKS URL answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| format!("reading the body failed: {}", err.without_url()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse(&body)
    }
}

fn unknown(kid: Option<&str>) -> AuthError {
    match kid {
        Some(kid) => {
            let shown: String = kid.chars().take(64).collect();
            AuthError::Invalid(format!(
                "no signing key with kid {shown:?} for this algorithm at the JWKS URL"
            ))
        }
        None => AuthError::Invalid(
            "the token has no kid and the JWKS holds more than one (or no) key for its algorithm"
                .into(),
        ),
    }
}

/// The usable keys of a JWKS document; keys cachecast cannot or must not use are skipped.
fn parse(body: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set =
        serde_json::from_slice(body).map_err(|err| format!("not a JWKS document: {err}"))?;
    let mut keys = Vec::new();
    for value in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            continue;
        }
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    Ok(keys)
}
