//! The PDP response cache in Redis.
//!
//! Keys follow a configurable template over `{env}`, `{scopeClientId}` and `{identityId}`
//! (default `pdp:{env}:{scopeClientId}:{identityId}:*`). An eviction turns the selector into
//! one `SCAN MATCH` pattern per scope (a part the selector leaves open becomes `*`) and removes
//! what it finds with batched `UNLINK`: never `KEYS`, so Redis keeps serving meanwhile.

use std::time::Duration;

use cachecast_proto::{AgentId, EnvId, ResponseSelector};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::{BackendError, CacheBackend, Position};

/// Settings of the Redis backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`. Its password never appears in `--print-config`.
    #[serde(serialize_with = "cachecast_bus::serialize_redacted_url")]
    pub url: String,
    /// Key layout of cached PDP responses.
    pub key_template: String,
    /// `COUNT` hint of each `SCAN`.
    pub scan_count: usize,
    /// The most keys one `UNLINK` removes.
    pub unlink_batch: usize,
    /// How long one Redis command may take.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_template: "pdp:{env}:{scopeClientId}:{identityId}:*".into(),
            scan_count: 1000,
            unlink_batch: 500,
            command_timeout: Duration::from_secs(2),
        }
    }
}

/// Evicts PDP responses from Redis.
#[derive(Clone)]
pub struct RedisBackend {
    conn: ConnectionManager,
    template: KeyTemplate,
    scan_count: usize,
    unlink_batch: usize,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// Checks the URL and the key template without connecting.
    pub fn check(&self) -> Result<(), BackendError> {
        self.parse().map(|_| ())
    }

    fn parse(&self) -> Result<(redis::Client, KeyTemplate), BackendError> {
        let template = KeyTemplate::parse(&self.key_template)?;
        let client = redis::Client::open(self.url.as_str()).map_err(|err| {
            BackendError::Other(format!(
                "invalid Redis URL {}: {err}; use redis://host:port",
                cachecast_bus::redact_url(&self.url)
            ))
        })?;
        Ok((client, template))
    }
}

impl RedisBackend {
    /// Validates the settings. Connects lazily: the first eviction (the start-up flush)
    /// reaches Redis, and a Redis that is down is retried then. Needs a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<Self, BackendError> {
        let (client, template) = config.parse()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Self {
            conn,
            template,
            scan_count: config.scan_count.max(1),
            unlink_batch: config.unlink_batch.max(1),
        })
    }

    async fn evict_pattern(&self, pattern: &str) -> Result<u64, BackendError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(self.scan_count)
                .query_async(&mut conn)
                .await?;
            for batch in keys.chunks(self.unlink_batch) {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(batch)
                    .query_async(&mut conn)
                    .await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}

impl CacheBackend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn evict_responses(
        &self,
        env: &EnvId,
        selector: &ResponseSelector,
    ) -> Result<u64, BackendError> {
        let mut removed = 0;
        for pattern in self.template.patterns(env, selector) {
            removed += self.evict_pattern(&pattern).await?;
        }
        Ok(removed)
    }

    async fn load_position(
        &self,
        env: &EnvId,
        agent: &AgentId,
    ) -> Result<Option<Position>, BackendError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(position_key(env, agent))
            .query_async(&mut conn)
            .await?;
        Ok(stored.as_deref().and_then(Position::decode))
    }

    async fn store_position(
        &self,
        env: &EnvId,
        agent: &AgentId,
        position: Position,
    ) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(position_key(env, agent))
            .arg(position.encode())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn check(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}

/// Where an agent keeps its stream position in the cache's Redis.
fn position_key(env: &EnvId, agent: &AgentId) -> String {
    format!("cachecast:position:{env}:{agent}")
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Env,
    Scope,
    Identity,
}

impl KeyTemplate {
    fn parse(template: &str) -> Result<Self, BackendError> {
        let bad = |why: &str| {
            BackendError::Other(format!(
                "redis.key_template {template:?} {why}; placeholders are {{env}}, {{scopeClientId}} and {{identityId}}"
            ))
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| bad("has an unclosed '{'"))?;
            parts.push(match &rest[open + 1..open + close] {
                "env" => Part::Env,
                "scopeClientId" => Part::Scope,
                "identityId" => Part::Identity,
                other => return Err(bad(&format!("has an unknown placeholder {{{other}}}"))),
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if parts.is_empty() {
            return Err(bad("is empty"));
        }
        Ok(Self { parts })
    }

    /// The `SCAN MATCH` patterns that together cover everything `selector` matches.
    fn patterns(&self, env: &EnvId, selector: &ResponseSelector) -> Vec<String> {
        let identity = selector.identity_id.as_deref();
        let mut patterns: Vec<String> = if selector.scope_client_ids.is_empty() {
            vec![self.pattern(env, None, identity)]
        } else {
            selector
                .scope_client_ids
                .iter()
                .map(|scope| self.pattern(env, Some(scope), identity))
                .collect()
        };
        patterns.sort();
        patterns.dedup();
        patterns
    }

    fn pattern(&self, env: &EnvId, scope: Option<&str>, identity: Option<&str>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Env => escape_glob(env.as_str(), &mut out),
                Part::Scope => match scope {
                    Some(scope) => escape_glob(scope, &mut out),
                    None => out.push('*'),
                },
                Part::Identity => match identity {
                    Some(identity) => escape_glob(identity, &mut out),
                    None => out.push('*'),
                },
            }
        }
        out
    }
}

/// Escapes Redis glob metacharacters, so an id matches only itself.
fn escape_glob(value: &str, out: &mut String) {
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> EnvId {
        EnvId::new("dev").expect("valid")
    }

    fn template() -> KeyTemplate {
        KeyTemplate::parse(&RedisConfig::default().key_template).expect("default parses")
    }

    #[test]
    fn open_parts_become_wildcards() {
        let t = template();
        let all = ResponseSelector::default();
        assert_eq!(t.patterns(&env(), &all), ["pdp:dev:*:*:*"]);
        let scoped = ResponseSelector {
            scope_client_ids: vec!["s2".into(), "s1".into(), "s1".into()],
            identity_id: Some("alice".into()),
        };
        assert_eq!(
            t.patterns(&env(), &scoped),
            ["pdp:dev:s1:alice:*", "pdp:dev:s2:alice:*"]
        );
    }

    #[test]
    fn ids_cannot_smuggle_glob_patterns() {
        let t = template();
        let sel = ResponseSelector {
            scope_client_ids: vec![],
            identity_id: Some("a*[b]?\\".into()),
        };
        assert_eq!(t.patterns(&env(), &sel), [r"pdp:dev:*:a\*\[b\]\?\\:*"]);
    }

    #[test]
    fn bad_templates_name_the_problem() {
        for (template, why) in [
            ("pdp:{tenant}:*", "unknown placeholder {tenant}"),
            ("pdp:{env", "unclosed"),
            ("", "empty"),
        ] {
            let err = KeyTemplate::parse(template)
                .expect_err(template)
                .to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("redis.key_template"), "{err}");
        }
    }
}
