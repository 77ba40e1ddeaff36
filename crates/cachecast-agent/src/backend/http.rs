//! A cache the agent cannot reach itself, evicted by calling its owner: an HTTP callback.
//!
//! For each eviction the agent `POST`s a JSON description of it to the owner's local admin
//! endpoint (`http.url`, a template over `{env}` and `{kind}`) and reports what the owner
//! answers: a `2xx` is applied (with `{"evicted": n}` in the body if the owner counts), anything
//! else, or no answer within `http.timeout`, is a failure with the status and the start of the
//! body. The bodies:
//!
//! ```json
//! {"env": "dev", "kind": "response", "scopeClientIds": ["s1"], "identityId": "alice"}
//! {"env": "dev", "kind": "identity", "identityTemplate": "User", "identityId": "alice"}
//! {"env": "dev", "kind": "keyed", "cache": "apikeys", "ids": ["k1"], "all": false}
//! {"env": "dev", "kind": "flush"}
//! ```
//!
//! Absent parts are `null` (a response eviction with neither is everything). The owner must
//! evict before it answers: the agent acknowledges what the owner confirmed.

use std::collections::BTreeMap;
use std::time::Duration;

use cachecast_bus::Secret;
use cachecast_proto::{CacheId, CacheName, EnvId, IdentitySelector, ResponseSelector};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{BackendError, CacheBackend};

/// Settings of the HTTP callback backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where evictions are `POST`ed: a URL template over `{env}` and `{kind}` (`response`,
    /// `identity`, `keyed`, `flush`).
    pub url: String,
    /// Headers sent with every call (an owner's admin token, say). Values never print.
    pub headers: BTreeMap<String, Secret>,
    /// How long one call may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The keyed caches the owner serves (announced in presence).
    pub keyed_caches: Vec<CacheName>,
    /// Checked with a `GET` for readiness when set (a `2xx` is ready).
    pub health_url: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8081/cachecast/{kind}/evict".into(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(5),
            keyed_caches: Vec::new(),
            health_url: None,
        }
    }
}

/// Evicts by calling the cache's owner.
#[derive(Debug, Clone)]
pub struct HttpBackend {
    client: reqwest::Client,
    config: HttpConfig,
    /// Derived from the URL: `http-<host>-<port>`.
    cache_id: CacheId,
}

/// The most of an error body quoted in a failed ack.
const QUOTED_BODY: usize = 200;

impl HttpBackend {
    /// Checks the settings; connects on the first eviction.
    pub fn new(config: &HttpConfig) -> Result<Self, BackendError> {
        let bad = |why: String| BackendError::Setting(format!("http.url {:?} {why}", config.url));
        for piece in config.url.split('{').skip(1) {
            let name = piece.split('}').next().unwrap_or_default();
            if name != "env" && name != "kind" {
                return Err(bad(format!(
                    "has an unknown placeholder {{{name}}}; placeholders are {{env}} and {{kind}}"
                )));
            }
        }
        let sample = render(&config.url, "dev", "flush");
        let parsed =
            reqwest::Url::parse(&sample).map_err(|err| bad(format!("is not a URL: {err}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("must be http:// or https://".into()));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                BackendError::Setting(format!("http.headers: {name:?} is not a header name"))
            })?;
            let mut value =
                reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
                    BackendError::Setting(format!(
                        "http.headers.{name}: the value is not a valid header value"
                    ))
                })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            // A redirect (to a login page, say) is not the owner confirming an eviction, and
            // must not carry the configured headers elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .build()
            .map_err(|err| BackendError::Setting(format!("HTTP client: {err}")))?;
        let port = parsed.port_or_known_default().unwrap_or(80).to_string();
        let cache_id =
            super::cache_id_for("http", parsed.host_str().unwrap_or("unknown"), &[&port]);
        Ok(Self {
            client,
            config: config.clone(),
            cache_id,
        })
    }

    /// Posts one eviction and reads how many entries the owner removed.
    async fn call(&self, env: &EnvId, kind: &str, mut body: Value) -> Result<u64, BackendError> {
        body["env"] = json!(env.as_str());
        body["kind"] = json!(kind);
        let url = render(&self.config.url, env.as_str(), kind);
        // Errors travel to API callers in failed acks: never with a password of the URL.
        let shown = cachecast_bus::redact_url(&url);
        let response = self
            .client
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|err| BackendError::OwnerUnreachable {
                url: shown.clone(),
                source: err.without_url(),
            })?;
        let status = response.status();
        let text = read_capped(response).await;
        if !status.is_success() {
            return Err(BackendError::OwnerRefused {
                url: shown,
                status,
                body: text.chars().take(QUOTED_BODY).collect(),
            });
        }
        // Counting is optional: an owner that answers without a count evicted an unknown number.
        Ok(serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("evicted").and_then(Value::as_u64))
            .unwrap_or(0))
    }
}

/// The most of an owner's answer read: enough for a count or an error to quote.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The answer's body as text, reading at most [`MAX_ANSWER_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ANSWER_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// `template` with its placeholders filled (both are subject-token safe: no escaping needed).
fn render(template: &str, env: &str, kind: &str) -> String {
    template.replace("{env}", env).replace("{kind}", kind)
}

impl CacheBackend for HttpBackend {
    fn kind(&self) -> &'static str {
        "http"
    }

    fn default_cache_id(&self) -> Option<CacheId> {
        Some(self.cache_id.clone())
    }

    async fn evict_responses(
        &self,
        env: &EnvId,
        selector: &ResponseSelector,
    ) -> Result<u64, BackendError> {
        let body = json!({
            "scopeClientIds": selector.scope_client_ids,
            "identityId": selector.identity_id,
        });
        self.call(env, "response", body).await
    }

    async fn evict_identities(
        &self,
        env: &EnvId,
        selector: &IdentitySelector,
    ) -> Result<u64, BackendError> {
        let body = json!({
            "identityTemplate": selector.identity_template,
            "identityId": selector.identity_id,
        });
        self.call(env, "identity", body).await
    }

    fn keyed_caches(&self) -> Vec<CacheName> {
        self.config.keyed_caches.clone()
    }

    async fn evict_keyed(
        &self,
        env: &EnvId,
        cache: &CacheName,
        ids: Option<&[String]>,
    ) -> Result<u64, BackendError> {
        if !self.config.keyed_caches.contains(cache) {
            return Err(BackendError::no_keyed_cache(cache));
        }
        let body = json!({
            "cache": cache.as_str(),
            "ids": ids.unwrap_or_default(),
            "all": ids.is_none(),
        });
        self.call(env, "keyed", body).await
    }

    /// One call: the owner empties everything it holds for the environment.
    async fn flush(&self, env: &EnvId) -> Result<u64, BackendError> {
        self.call(env, "flush", json!({})).await
    }

    async fn check(&self) -> Result<(), BackendError> {
        let Some(url) = &self.config.health_url else {
            return Ok(());
        };
        let response =
            self.client
                .get(url)
                .send()
                .await
                .map_err(|err| BackendError::OwnerUnreachable {
                    url: cachecast_bus::redact_url(url),
                    source: err.without_url(),
                })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(BackendError::OwnerRefused {
                url: cachecast_bus::redact_url(url),
                status: response.status(),
                body: String::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_the_problem() {
        for (url, why) in [
            ("http://h/{tenant}/evict", "unknown placeholder {tenant}"),
            ("not a url", "is not a URL"),
            ("ftp://h/evict", "http:// or https://"),
        ] {
            let config = HttpConfig {
                url: url.into(),
                ..HttpConfig::default()
            };
            let err = HttpBackend::new(&config).expect_err(url).to_string();
            assert!(err.contains(why) && err.contains("http.url"), "{err}");
        }
        assert_eq!(
            render("http://h/{env}/{kind}", "dev", "keyed"),
            "http://h/dev/keyed"
        );
    }
}
