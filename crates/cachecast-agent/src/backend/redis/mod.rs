//! The PDP response cache, the identity cache and keyed caches in Redis.
//!
//! Keys follow configurable templates: responses over `{env}`, `{scopeClientId}` and
//! `{identityId}` (default `pdp:{env}:{scopeClientId}:{identityId}:*`), identities over
//! `{env}`, `{identityTemplate}` and `{identityId}`, each keyed cache over `{env}` and `{id}`.
//! An eviction turns the selector into keys: a template whose every part is known names one
//! key, removed with `UNLINK` at once; otherwise the open parts become `*` and a `SCAN MATCH`
//! finds the keys, removed with batched `UNLINK`: never `KEYS`, so Redis keeps serving.
//!
//! A Redis Cluster is found at the first connection (`redis_mode:cluster`) and then served
//! through every master (`cluster.rs`). With `redis.sentinels` set, the agent follows the
//! master the sentinels name (`sentinel.rs`).

mod cluster;
mod sentinel;
mod template;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cachecast_proto::{CacheId, CacheName, EnvId, IdentitySelector, ResponseSelector};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use self::cluster::Cluster;
pub use self::cluster::slot_of as key_slot;
use self::sentinel::Sentinel;
use self::template::{IDENTITY_VARS, KEYED_VARS, KeyTemplate, Keys, RESPONSE_VARS};
use super::{BackendError, CacheBackend, Continuity, Position};

/// Settings of the Redis backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`: a standalone Redis, or any node of a Redis Cluster
    /// (found at the first connection; evictions then run on every master). Its password
    /// never appears in `--print-config`.
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
    /// Sentinels (`host:port` each) that name the master holding the cache. When set, the
    /// agent follows the master they name (a failover flushes the cache), and `url` gives
    /// only the master's password and database.
    pub sentinels: Vec<String>,
    /// The name the sentinels know the master by (their `sentinel monitor` line).
    pub sentinel_master: String,
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
            sentinels: Vec::new(),
            sentinel_master: "mymaster".into(),
        }
    }
}

/// Evicts PDP responses from Redis.
#[derive(Clone)]
pub struct RedisBackend {
    /// To the configured node: the cache itself, or a cluster's seed.
    conn: ConnectionManager,
    /// What the configured node turned out to be, at the first connection.
    mode: Arc<tokio::sync::OnceCell<Mode>>,
    /// Set with `redis.sentinels`.
    sentinel: Option<Arc<Sentinel>>,
    /// What the last flush cleared (see [`RedisBackend::fingerprint`]), for the marker.
    flushed: Arc<Mutex<Option<String>>>,
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        let (host, port, path) = super::url_location(&config.url).unwrap_or(("unknown", None, ""));
        let db = path.trim_start_matches('/');
        let db = format!("db{}", if db.is_empty() { "0" } else { db });
        let (cache_id, sentinel) = if config.sentinels.is_empty() {
            let id = super::cache_id_for("redis", host, &[port.unwrap_or("6379"), &db]);
            (id, None)
        } else {
            let sentinel = Sentinel::new(
                &config.sentinels,
                &config.sentinel_master,
                client.get_connection_info().clone(),
                manager_config.clone(),
            )?;
            // Named after the first sentinel in a fixed order, so agents listing the same
            // sentinels in another order still name one cache.
            let first = config.sentinels.iter().min().map_or("", String::as_str);
            let (host, port) = first.rsplit_once(':').unwrap_or((first, ""));
            let id = super::cache_id_for("redis", host, &[port, &config.sentinel_master, &db]);
            (id, Some(Arc::new(sentinel)))
        };
        Ok(Self {
            conn,
            mode: Arc::default(),
            sentinel,
            flushed: Arc::default(),
            client,
            manager_config,
            cache_id,
            templates,
            scan_count: config.scan_count.max(1),
            unlink_batch: config.unlink_batch.max(1),
        })
    }

    /// What the configured Redis is: asked once, at the first command that reaches it.
    async fn mode(&self) -> Result<&Mode, BackendError> {
        self.mode
            .get_or_try_init(|| async {
                if let Some(sentinel) = &self.sentinel {
                    return Ok(Mode::Sentinel(sentinel.clone()));
                }
                let mut conn = self.conn.clone();
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await?;
                Ok(match redis_mode(&info)? {
                    RedisMode::Standalone => Mode::Standalone,
                    RedisMode::Cluster => {
                        if self.client.get_connection_info().redis_settings().db() != 0 {
                            return Err(BackendError::Unsupported(
                                "redis.url names a database other than 0 on a Redis Cluster, which has only database 0: remove the /N from redis.url".into(),
                            ));
                        }
                        tracing::info!(
                            "redis.url names a Redis Cluster node: evicting on every master"
                        );
                        Mode::Cluster(Arc::new(Cluster::new(
                            self.client.get_connection_info().clone(),
                            self.manager_config.clone(),
                            self.scan_count,
                            self.unlink_batch,
                        )?))
                    }
                })
            })
            .await
    }

    /// Where commands go now: one node (the configured Redis, or the master the sentinels
    /// name), or the masters of a cluster.
    async fn target(&self) -> Result<Target, BackendError> {
        Ok(match self.mode().await? {
            Mode::Standalone => Target::Node(self.conn.clone()),
            Mode::Sentinel(sentinel) => Target::Node(sentinel.master().await?.1),
            Mode::Cluster(cluster) => Target::Cluster(cluster.clone()),
        })
    }

    /// Removes every key in `keys`: exact keys in batched `UNLINK`s, patterns by `SCAN`.
    async fn evict_keys(&self, keys: Vec<Keys>) -> Result<u64, BackendError> {
        let (mut conn, sentinel) = match self.mode().await? {
            Mode::Cluster(cluster) => return cluster.evict(&keys).await,
            Mode::Standalone => (self.conn.clone(), None),
            Mode::Sentinel(sentinel) => {
                let (master, conn) = sentinel.master().await?;
                (conn, Some((sentinel, master)))
            }
        };
        let mut removed = 0;
        let mut exact = Vec::new();
        for keys in keys {
            match keys {
                Keys::Exact(key) => exact.push(key),
                Keys::Pattern(pattern) => {
                    removed += self.evict_pattern(&mut conn, &pattern).await?
                }
            }
        }
        for batch in exact.chunks(self.unlink_batch) {
            let n: u64 = redis::cmd("UNLINK")
                .arg(batch)
                .query_async(&mut conn)
                .await?;
            removed += n;
        }
        // Behind Sentinel, a failover during the eviction may have made another node master,
        // one that never saw it.
        if let Some((sentinel, before)) = sentinel {
            let after = sentinel.master_addr().await?;
            if after != before {
                return Err(BackendError::RedisUnsettled(format!(
                    "the master changed from {before} to {after} during the eviction"
                )));
            }
        }
        Ok(removed)
    }

    /// Which processes hold the cache now: the `run_id` of the Redis (or of the master the
    /// sentinels name), or every master's node id and `run_id` in a cluster.
    async fn fingerprint(&self) -> Result<String, BackendError> {
        match self.target().await? {
            Target::Cluster(cluster) => cluster.run_ids().await,
            Target::Node(mut conn) => {
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await?;
                Ok(run_id(&info)?.to_owned())
            }
        }
    }

    async fn evict_pattern(
        &self,
        conn: &mut ConnectionManager,
        pattern: &str,
    ) -> Result<u64, BackendError> {
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
                .query_async(conn)
                .await?;
            for batch in keys.chunks(self.unlink_batch) {
                let n: u64 = redis::cmd("UNLINK").arg(batch).query_async(conn).await?;
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
        let key = position_key(env, cache);
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(position.encode());
        match self.target().await? {
            Target::Cluster(cluster) => cluster.on_key(&key, &set).await,
            Target::Node(mut conn) => Ok(set.query_async(&mut conn).await?),
        }
    }

    async fn continuity(&self, env: &EnvId, cache: &CacheId) -> Result<Continuity, BackendError> {
        let mut conn = match self.target().await? {
            Target::Node(conn) => conn,
            Target::Cluster(cluster) => {
                let run_ids = cluster.run_ids().await?;
                let get = |key: String| {
                    let mut get = redis::cmd("GET");
                    get.arg(key);
                    get
                };
                let marked: Option<String> = cluster
                    .on_key(&run_id_key(cache), &get(run_id_key(cache)))
                    .await?;
                let position: Option<String> = cluster
                    .on_key(&position_key(env, cache), &get(position_key(env, cache)))
                    .await?;
                return Ok(Continuity {
                    position: position.as_deref().and_then(Position::decode),
                    restarted: marked.as_deref() != Some(run_ids.as_str()),
                });
            }
        };
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

    async fn flush(&self, env: &EnvId) -> Result<u64, BackendError> {
        // What a flush clears is what ran when it began: a master that took over meanwhile (a
        // failover) is then marked as not flushed, and the next check flushes it.
        let before = self.fingerprint().await?;
        let removed = super::evict_everything(self, env).await?;
        *self.flushed.lock().unwrap_or_else(PoisonError::into_inner) = Some(before);
        Ok(removed)
    }

    async fn mark_continuous(&self, cache: &CacheId) -> Result<(), BackendError> {
        let flushed = self
            .flushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let marker = match flushed {
            Some(marker) => marker,
            None => self.fingerprint().await?,
        };
        let mut set = redis::cmd("SET");
        set.arg(run_id_key(cache)).arg(marker);
        match self.target().await? {
            Target::Cluster(cluster) => cluster.on_key(&run_id_key(cache), &set).await,
            Target::Node(mut conn) => Ok(set.query_async(&mut conn).await?),
        }
    }

    async fn check(&self) -> Result<(), BackendError> {
        let mut conn = match self.target().await? {
            Target::Node(conn) => conn,
            // Ready only while an eviction could be confirmed on every master.
            Target::Cluster(cluster) => return cluster.topology().await.map(|_| ()),
        };
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn supported(&self) -> Result<(), BackendError> {
        // Behind Sentinel, this asks the sentinels for the master by its name.
        self.target().await.map(|_| ())
    }
}

/// A lazy connection to the node at `addr` (`host:port`) with the password and database of
/// `info` (the configured URL's); `None` if `addr` is not `host:port`.
fn connect_to(
    info: &redis::ConnectionInfo,
    addr: &str,
    config: &ConnectionManagerConfig,
) -> Result<Option<ConnectionManager>, BackendError> {
    let Some((host, port)) = host_port(addr) else {
        return Ok(None);
    };
    let info = info
        .clone()
        .set_addr(redis::ConnectionAddr::Tcp(host.to_owned(), port));
    let client = redis::Client::open(info)?;
    Ok(Some(ConnectionManager::new_lazy_with_config(
        client,
        config.clone(),
    )?))
}

/// `host:port` (the host may be an IPv6 address, bracketed or not).
fn host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port.parse().ok()?))
}

/// How the configured Redis serves the cache.
#[derive(Debug)]
enum Mode {
    Standalone,
    Sentinel(Arc<Sentinel>),
    Cluster(Arc<Cluster>),
}

/// Where the commands of one operation go.
enum Target {
    Node(ConnectionManager),
    Cluster(Arc<Cluster>),
}

#[derive(Debug, PartialEq, Eq)]
enum RedisMode {
    Standalone,
    Cluster,
}

/// The mode in `INFO server`. A Sentinel holds no cache, so it is refused.
fn redis_mode(info: &str) -> Result<RedisMode, BackendError> {
    let mode = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_mode:"))
        .map(str::trim)
        .unwrap_or("standalone");
    match mode {
        "standalone" => Ok(RedisMode::Standalone),
        "cluster" => Ok(RedisMode::Cluster),
        other => Err(BackendError::Unsupported(format!(
            "redis.url points at a Redis in mode {other:?}, not a server holding the cache; point it at the Redis (or a node of the Redis Cluster) the PDP caches in"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standalone_redis_or_a_cluster_is_served() {
        let mode = |info: &str| redis_mode(info).map_err(|e| e.to_string());
        assert_eq!(
            mode("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n"),
            Ok(RedisMode::Standalone)
        );
        assert_eq!(
            mode("redis_version:2.8\r\n"),
            Ok(RedisMode::Standalone),
            "before redis_mode existed"
        );
        assert_eq!(mode("redis_mode:cluster\r\n"), Ok(RedisMode::Cluster));
        assert!(matches!(
            redis_mode("redis_mode:sentinel\r\n"),
            Err(BackendError::Unsupported(reason)) if reason.contains("sentinel")
        ));
    }
}
