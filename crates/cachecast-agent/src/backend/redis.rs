//! The PDP response cache, the identity cache and keyed caches in Redis.
//!
//! Keys follow configurable templates: responses over `{env}`, `{scopeClientId}` and
//! `{identityId}` (default `pdp:{env}:{scopeClientId}:{identityId}:*`), identities over
//! `{env}`, `{identityTemplate}` and `{identityId}`, each keyed cache over `{env}` and `{id}`.
//! An eviction turns the selector into keys: a template whose every part is known names one
//! key, removed with `UNLINK` at once; otherwise the open parts become `*` and a `SCAN MATCH`
//! finds the keys, removed with batched `UNLINK`: never `KEYS`, so Redis keeps serving.

use std::collections::BTreeMap;
use std::time::Duration;

use cachecast_proto::{CacheId, CacheName, EnvId, IdentitySelector, ResponseSelector};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::{BackendError, CacheBackend, Continuity, Position};

/// Settings of the Redis backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`. Its password never appears in `--print-config`.
    #[serde(serialize_with = "cachecast_bus::serialize_redacted_url")]
    pub url: String,
    /// Key layout of cached PDP responses.
    pub key_template: String,
    /// Key layout of the identity cache.
    pub identity_key_template: String,
    /// The keyed caches this agent serves: name to key layout over `{env}` and `{id}`.
    pub keyed_caches: BTreeMap<CacheName, String>,
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
            identity_key_template: "pdp-identity:{env}:{identityTemplate}:{identityId}".into(),
            keyed_caches: BTreeMap::new(),
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
    /// Derived from the URL: `redis-<host>-<port>-db<n>`.
    cache_id: CacheId,
    templates: Templates,
    scan_count: usize,
    unlink_batch: usize,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("templates", &self.templates)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// Checks the URL and the key template without connecting.
    pub fn check(&self) -> Result<(), BackendError> {
        self.parse().map(|_| ())
    }

    fn parse(&self) -> Result<(redis::Client, Templates), BackendError> {
        let templates = Templates {
            response: KeyTemplate::parse("redis.key_template", &self.key_template, RESPONSE_VARS)?,
            identity: KeyTemplate::parse(
                "redis.identity_key_template",
                &self.identity_key_template,
                IDENTITY_VARS,
            )?,
            keyed: self
                .keyed_caches
                .iter()
                .map(|(name, template)| {
                    let setting = format!("redis.keyed_caches.{name}");
                    Ok((
                        name.clone(),
                        KeyTemplate::parse(&setting, template, KEYED_VARS)?,
                    ))
                })
                .collect::<Result<_, BackendError>>()?,
        };
        let client = redis::Client::open(self.url.as_str()).map_err(|err| {
            BackendError::Setting(format!(
                "invalid Redis URL {}: {err}; use redis://host:port",
                cachecast_bus::redact_url(&self.url)
            ))
        })?;
        Ok((client, templates))
    }
}

/// The parsed key templates of every cache the backend serves.
#[derive(Debug, Clone)]
struct Templates {
    response: KeyTemplate,
    identity: KeyTemplate,
    keyed: BTreeMap<CacheName, KeyTemplate>,
}

impl RedisBackend {
    /// Validates the settings. Connects lazily: the first eviction (the start-up flush)
    /// reaches Redis, and a Redis that is down is retried then. Needs a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<Self, BackendError> {
        let (client, templates) = config.parse()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(Some(config.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        let (host, port, path) = super::url_location(&config.url).unwrap_or(("unknown", None, ""));
        let db = path.trim_start_matches('/');
        let db = if db.is_empty() { "0" } else { db };
        let cache_id =
            super::cache_id_for("redis", host, &[port.unwrap_or("6379"), &format!("db{db}")]);
        Ok(Self {
            conn,
            cache_id,
            templates,
            scan_count: config.scan_count.max(1),
            unlink_batch: config.unlink_batch.max(1),
        })
    }

    /// Removes every key in `keys`: exact keys in batched `UNLINK`s, patterns by `SCAN`.
    async fn evict_keys(&self, keys: Vec<Keys>) -> Result<u64, BackendError> {
        let mut removed = 0;
        let mut exact = Vec::new();
        for keys in keys {
            match keys {
                Keys::Exact(key) => exact.push(key),
                Keys::Pattern(pattern) => removed += self.evict_pattern(&pattern).await?,
            }
        }
        let mut conn = self.conn.clone();
        for batch in exact.chunks(self.unlink_batch) {
            let n: u64 = redis::cmd("UNLINK")
                .arg(batch)
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    async fn evict_pattern(&self, pattern: &str) -> Result<u64, BackendError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            // Keys as bytes: a key that is not UTF-8 is still a key to remove.
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
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
        self.evict_keys(self.templates.response.response_keys(env, selector))
            .await
    }

    async fn evict_identities(
        &self,
        env: &EnvId,
        selector: &IdentitySelector,
    ) -> Result<u64, BackendError> {
        let keys = self.templates.identity.render(&[
            Some(env.as_str()),
            selector.identity_template.as_deref(),
            selector.identity_id.as_deref(),
        ]);
        self.evict_keys(vec![keys]).await
    }

    fn keyed_caches(&self) -> Vec<CacheName> {
        self.templates.keyed.keys().cloned().collect()
    }

    async fn evict_keyed(
        &self,
        env: &EnvId,
        cache: &CacheName,
        ids: Option<&[String]>,
    ) -> Result<u64, BackendError> {
        let template = self
            .templates
            .keyed
            .get(cache)
            .ok_or_else(|| BackendError::no_keyed_cache(cache))?;
        let keys = match ids {
            None => vec![template.render(&[Some(env.as_str()), None])],
            Some(ids) => ids
                .iter()
                .map(|id| template.render(&[Some(env.as_str()), Some(id)]))
                .collect(),
        };
        self.evict_keys(keys).await
    }

    fn default_cache_id(&self) -> Option<CacheId> {
        Some(self.cache_id.clone())
    }

    async fn store_position(
        &self,
        env: &EnvId,
        cache: &CacheId,
        position: Position,
    ) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("SET")
            .arg(position_key(env, cache))
            .arg(position.encode())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn continuity(&self, env: &EnvId, cache: &CacheId) -> Result<Continuity, BackendError> {
        let mut conn = self.conn.clone();
        let (info, marked, position): (String, Option<String>, Option<String>) = redis::pipe()
            .cmd("INFO")
            .arg("server")
            .cmd("GET")
            .arg(run_id_key(cache))
            .cmd("GET")
            .arg(position_key(env, cache))
            .query_async(&mut conn)
            .await?;
        Ok(Continuity {
            position: position.as_deref().and_then(Position::decode),
            restarted: marked.as_deref() != Some(run_id(&info)?),
        })
    }

    async fn mark_continuous(&self, cache: &CacheId) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        let () = redis::cmd("SET")
            .arg(run_id_key(cache))
            .arg(run_id(&info)?)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn check(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn supported(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await?;
        refuse_mode(&info)
    }
}

/// Refuses every Redis but a standalone one, from its `INFO server`: one connection's `SCAN`
/// sees one master of a cluster, so an eviction there would be confirmed while other masters
/// still hold the keys; a Sentinel holds no cache.
fn refuse_mode(info: &str) -> Result<(), BackendError> {
    let mode = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_mode:"))
        .map(str::trim)
        .unwrap_or("standalone");
    match mode {
        "standalone" => Ok(()),
        "cluster" => Err(BackendError::Unsupported(
            "redis.url points at a Redis Cluster node (redis_mode:cluster): this agent evicts through one node, so it would confirm evictions while other masters still hold the keys; point redis.url at a standalone Redis until cluster support lands".into(),
        )),
        other => Err(BackendError::Unsupported(format!(
            "redis.url points at a Redis in mode {other:?}, not a standalone server holding the cache; point it at the Redis the PDP caches in"
        ))),
    }
}

/// Where the stream position is kept in the cache's Redis: it belongs to the cache, so any
/// agent that attends the cache carries on from it, and a Redis restored from a snapshot
/// brings back the position that matches its keys.
fn position_key(env: &EnvId, cache: &CacheId) -> String {
    format!("cachecast:position:{env}:{cache}")
}

/// Where the agent records the `run_id` of the Redis process it last knew to hold nothing
/// stale. Another `run_id` means Redis restarted since, maybe from a snapshot older than
/// evictions it had applied; a snapshot brings its old marker back, which then differs too.
fn run_id_key(cache: &CacheId) -> String {
    format!("cachecast:run_id:{cache}")
}

/// The `run_id` in the text of `INFO server`.
fn run_id(info: &str) -> Result<&str, BackendError> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .ok_or(BackendError::Protocol(
            "INFO server has no run_id: is this Redis?",
        ))
}

/// A parsed key template over a fixed set of placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The placeholder at this index of the template's placeholder list.
    Var(usize),
}

/// The placeholders of each kind of template, in the order their values are passed.
const RESPONSE_VARS: &[&str] = &["env", "scopeClientId", "identityId"];
const IDENTITY_VARS: &[&str] = &["env", "identityTemplate", "identityId"];
const KEYED_VARS: &[&str] = &["env", "id"];

/// What one rendered template addresses: one key, or every key a `SCAN MATCH` pattern finds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Keys {
    Exact(String),
    Pattern(String),
}

impl KeyTemplate {
    /// Parses `template` (the setting `setting`) over the placeholders `vars`.
    fn parse(setting: &str, template: &str, vars: &[&str]) -> Result<Self, BackendError> {
        let bad = |why: &str| {
            let names: Vec<String> = vars.iter().map(|v| format!("{{{v}}}")).collect();
            BackendError::Setting(format!(
                "{setting} {template:?} {why}; placeholders are {}",
                names.join(", ")
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
            let name = &rest[open + 1..open + close];
            let index = vars
                .iter()
                .position(|v| *v == name)
                .ok_or_else(|| bad(&format!("has an unknown placeholder {{{name}}}")))?;
            parts.push(Part::Var(index));
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

    /// The keys the template addresses with `values` (by placeholder index; `None` is open
    /// and matches anything). Values are glob-escaped, so an id matches only itself.
    fn render(&self, values: &[Option<&str>]) -> Keys {
        let mut pattern = String::new();
        let mut literal = String::new();
        let mut exact = true;
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    exact &= !text.contains(['*', '?', '[']);
                    pattern.push_str(text);
                    literal.push_str(text);
                }
                Part::Var(index) => match values.get(*index).copied().flatten() {
                    Some(value) => {
                        escape_glob(value, &mut pattern);
                        literal.push_str(value);
                    }
                    None => {
                        exact = false;
                        pattern.push('*');
                    }
                },
            }
        }
        if exact {
            Keys::Exact(literal)
        } else {
            Keys::Pattern(pattern)
        }
    }

    /// What covers everything `selector` matches in the response cache of `env`.
    fn response_keys(&self, env: &EnvId, selector: &ResponseSelector) -> Vec<Keys> {
        let identity = selector.identity_id.as_deref();
        let mut keys: Vec<Keys> = if selector.scope_client_ids.is_empty() {
            vec![self.render(&[Some(env.as_str()), None, identity])]
        } else {
            selector
                .scope_client_ids
                .iter()
                .map(|scope| self.render(&[Some(env.as_str()), Some(scope), identity]))
                .collect()
        };
        keys.sort();
        keys.dedup();
        keys
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

    fn response_template() -> KeyTemplate {
        KeyTemplate::parse(
            "redis.key_template",
            &RedisConfig::default().key_template,
            RESPONSE_VARS,
        )
        .expect("default parses")
    }

    fn patterns(keys: &[&str]) -> Vec<Keys> {
        keys.iter()
            .map(|k| Keys::Pattern((*k).to_owned()))
            .collect()
    }

    #[test]
    fn only_a_standalone_redis_is_served() {
        assert!(
            refuse_mode("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n").is_ok()
        );
        assert!(
            refuse_mode("redis_version:2.8\r\n").is_ok(),
            "before redis_mode existed"
        );
        assert!(matches!(
            refuse_mode("redis_mode:cluster\r\n"),
            Err(BackendError::Unsupported(reason)) if reason.contains("Cluster")
        ));
        assert!(matches!(
            refuse_mode("redis_mode:sentinel\r\n"),
            Err(BackendError::Unsupported(_))
        ));
    }

    #[test]
    fn open_parts_become_wildcards() {
        let t = response_template();
        let all = ResponseSelector::default();
        assert_eq!(t.response_keys(&env(), &all), patterns(&["pdp:dev:*:*:*"]));
        let scoped = ResponseSelector {
            scope_client_ids: vec!["s2".into(), "s1".into(), "s1".into()],
            identity_id: Some("alice".into()),
        };
        assert_eq!(
            t.response_keys(&env(), &scoped),
            patterns(&["pdp:dev:s1:alice:*", "pdp:dev:s2:alice:*"])
        );
    }

    #[test]
    fn a_fully_known_key_is_exact_and_not_escaped() {
        let t = KeyTemplate::parse(
            "t",
            "id:{env}:{identityTemplate}:{identityId}",
            IDENTITY_VARS,
        )
        .expect("parses");
        assert_eq!(
            t.render(&[Some("dev"), Some("User"), Some("a*b")]),
            Keys::Exact("id:dev:User:a*b".into())
        );
        assert_eq!(
            t.render(&[Some("dev"), None, Some("a*b")]),
            Keys::Pattern(r"id:dev:*:a\*b".into())
        );
    }

    #[test]
    fn ids_cannot_smuggle_glob_patterns() {
        let t = response_template();
        let sel = ResponseSelector {
            scope_client_ids: vec![],
            identity_id: Some("a*[b]?\\".into()),
        };
        assert_eq!(
            t.response_keys(&env(), &sel),
            patterns(&[r"pdp:dev:*:a\*\[b\]\?\\:*"])
        );
    }

    #[test]
    fn bad_templates_name_the_problem() {
        for (template, why) in [
            ("pdp:{tenant}:*", "unknown placeholder {tenant}"),
            ("pdp:{env", "unclosed"),
            ("", "empty"),
        ] {
            let err = KeyTemplate::parse("redis.key_template", template, RESPONSE_VARS)
                .expect_err(template)
                .to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("redis.key_template"), "{err}");
        }
        let err = KeyTemplate::parse(
            "redis.keyed_caches.apikeys",
            "k:{scopeClientId}",
            KEYED_VARS,
        )
        .expect_err("keyed templates have no scope")
        .to_string();
        assert!(
            err.contains("redis.keyed_caches.apikeys") && err.contains("{id}"),
            "{err}"
        );
    }
}
