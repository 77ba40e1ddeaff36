//! Cache backends: what an agent evicts from.
//!
//! A backend evicts the entries a selector matches (PDP responses, identities, or ids of a named
//! keyed cache) and says how many it removed. Evicting more than asked is allowed (it only costs
//! a cache miss); evicting less never is.

mod http;
mod memory;
mod redis;

use std::future::Future;

use cachecast_proto::{CacheId, CacheName, EnvId, IdentitySelector, ResponseSelector};

pub use self::http::{HttpBackend, HttpConfig};
pub use self::memory::{FillTicket, MemoryCache};
pub use self::redis::{RedisBackend, RedisConfig, key_slot as redis_key_slot};

/// Every response, identity and keyed-cache entry of `env`: the whole of a flush.
pub(crate) async fn evict_everything<B: CacheBackend + ?Sized>(
    backend: &B,
    env: &EnvId,
) -> Result<u64, BackendError> {
    let mut removed = backend
        .evict_responses(env, &ResponseSelector::default())
        .await?;
    removed += backend
        .evict_identities(env, &IdentitySelector::default())
        .await?;
    for cache in backend.keyed_caches() {
        removed += backend.evict_keyed(env, &cache, None).await?;
    }
    Ok(removed)
}

/// A cache id from where a cache is: `<kind>-<host>-<port>[-<rest>]`, each character that
/// is not allowed in an id turned into `-`. A loopback host names a different cache on every
/// machine, so the machine's host name goes first then.
pub(crate) fn cache_id_for(kind: &str, host: &str, rest: &[&str]) -> CacheId {
    let loopback =
        host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1";
    let mut parts = vec![kind.to_owned()];
    if loopback {
        parts.push(crate::config::host_name());
    }
    parts.push(host.to_owned());
    parts.extend(rest.iter().map(|s| (*s).to_owned()));
    let id = crate::config::token_safe(&parts.join("-"), 128);
    CacheId::new(id).unwrap_or_else(|_| CacheId::new(kind).expect("a backend kind is a valid id"))
}

/// The host, port and path of a `scheme://[user@]host[:port][/path]` URL, without parsing
/// anything else (credentials are dropped).
pub(crate) fn url_location(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let rest = url.split_once("://")?.1;
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    (!host.is_empty()).then_some((host, port, path))
}

/// Where an agent is in the invalidation stream: the last event it applied, and which
/// stream that was (a stream created anew restarts its sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub sequence: u64,
    /// The stream's creation time, in Unix nanoseconds.
    pub stream_created_ns: i128,
}

impl Position {
    fn encode(&self) -> String {
        format!("{} {}", self.sequence, self.stream_created_ns)
    }

    fn decode(text: &str) -> Option<Self> {
        let (sequence, created) = text.split_once(' ')?;
        Some(Self {
            sequence: sequence.parse().ok()?,
            stream_created_ns: created.parse().ok()?,
        })
    }
}

/// What a persistent cache says of itself (see [`CacheBackend::continuity`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Continuity {
    /// The position stored in the cache: every event up to it is applied to it.
    pub position: Option<Position>,
    /// It restarted (or is new) since it was last known to hold nothing stale.
    pub restarted: bool,
}

/// Why an eviction (or a check of the cache) failed, by kind. The message travels to the caller
/// in the failed ack.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A setting the backend cannot use; the message names it and what it accepts.
    #[error("{0}")]
    Setting(String),
    /// The server answered, but not as the backend expects.
    #[error("{0}")]
    Protocol(&'static str),
    /// The cache owner (the HTTP backend's callback) could not be reached.
    #[error("the cache owner at {url} did not answer: {source}")]
    OwnerUnreachable {
        /// Without credentials: this travels to API callers.
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The cache owner answered with an error status.
    #[error("the cache owner at {url} answered {status}{}", quoted(.body))]
    OwnerRefused {
        url: String,
        status: reqwest::StatusCode,
        /// The start of its answer.
        body: String,
    },
    /// An event this agent cannot apply as it stands.
    #[error("{0}")]
    Event(String),
    /// A keyed cache this agent does not serve.
    #[error(
        "this agent serves no keyed cache named {0:?}; configure it on the agent (redis.keyed_caches or agent.keyed_caches)"
    )]
    NoKeyedCache(String),
    /// A cache the agent cannot keep the promise for (a Redis Cluster, say): it refuses to
    /// start rather than confirm evictions it cannot make everywhere.
    #[error("{0}")]
    Unsupported(String),
    /// A Redis Cluster or Sentinel group that cannot confirm an eviction now: a master failing,
    /// a slot without a master, sentinels that disagree, or a topology or master that changed
    /// during the eviction.
    #[error("Redis cannot confirm the eviction now: {0}")]
    RedisUnsettled(String),
    /// No sentinel in `redis.sentinels` answered.
    #[error("no sentinel answered ({0}); check redis.sentinels and that the sentinels run")]
    SentinelsUnreachable(String),
    /// A failure of a backend outside this crate.
    #[error("{0}")]
    Custom(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// `: <body>`, or nothing for an empty body.
fn quoted(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl BackendError {
    /// The error of an eviction from a keyed cache this agent does not serve.
    pub fn no_keyed_cache(cache: &CacheName) -> Self {
        Self::NoKeyedCache(cache.to_string())
    }
}

/// A cache an agent can evict from.
pub trait CacheBackend: Send + Sync + 'static {
    /// A short name for logs and presence (`memory`, `redis`, ...).
    fn kind(&self) -> &'static str;

    /// Evicts every PDP response entry of `env` that `selector` matches; returns how many
    /// entries were removed. An empty selector means every entry of the environment.
    fn evict_responses(
        &self,
        env: &EnvId,
        selector: &ResponseSelector,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Evicts every identity cache entry of `env` that `selector` matches (neither part set:
    /// every entry); returns how many entries were removed.
    fn evict_identities(
        &self,
        env: &EnvId,
        selector: &IdentitySelector,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// The keyed caches this backend serves. The agent announces them in its presence, so a
    /// publisher expects this agent (and only agents like it) when one of them is cleared.
    fn keyed_caches(&self) -> Vec<CacheName> {
        Vec::new()
    }

    /// Evicts `ids` (every entry when `None`) from the keyed cache `cache` of `env`; returns
    /// how many entries were removed. A cache it does not serve is an error.
    fn evict_keyed(
        &self,
        _env: &EnvId,
        cache: &CacheName,
        _ids: Option<&[String]>,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        let err = BackendError::no_keyed_cache(cache);
        async move { Err(err) }
    }

    /// Empties every cache of `env` this backend holds: responses, identities and each keyed
    /// cache. What an agent does on start, after a gap, and after a failed eviction.
    fn flush(&self, env: &EnvId) -> impl Future<Output = Result<u64, BackendError>> + Send {
        evict_everything(self, env)
    }

    /// Refuses a cache this backend cannot evict from completely (`BackendError::Unsupported`);
    /// any other error is transient (the cache is unreachable) and asked again.
    fn supported(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Whether the cache may serve and take entries. The agent turns it off while it cannot
    /// vouch for the cache (cut off from NATS, or lagging), right before it flushes, and on
    /// again once it can: a cache in the agent's process then caches nothing meanwhile. A cache
    /// the agent does not hold (Redis, an HTTP owner's) keeps serving: publishers keep
    /// expecting it and answer `424` while its agent cannot vouch.
    fn set_serving(&self, _serving: bool) {}

    /// For a cache that outlives its agent (a Redis, an HTTP owner's cache): the id it is
    /// registered under unless `agent.cache_id` names one, derived from where the cache is.
    /// `None` for a cache that lives and dies with the agent's process: nothing to register,
    /// since it cannot serve anything once its agent is gone.
    fn default_cache_id(&self) -> Option<CacheId> {
        None
    }

    /// What the cache says of itself: the stream position stored in it by
    /// [`CacheBackend::store_position`] (so whichever agent attends it next carries on from
    /// there, and agents sharing it skip what another already applied), and whether it may
    /// hold entries evicted before (a Redis restarted from an old snapshot, say) since
    /// [`CacheBackend::mark_continuous`] was last called for it, in which case the agent
    /// flushes it before it acknowledges anything as applied. A cache that cannot hold a
    /// position has none, and the agent flushes on start instead.
    fn continuity(
        &self,
        _env: &EnvId,
        _cache: &CacheId,
    ) -> impl Future<Output = Result<Continuity, BackendError>> + Send {
        async { Ok(Continuity::default()) }
    }

    /// Stores the position of the last event applied.
    fn store_position(
        &self,
        _env: &EnvId,
        _cache: &CacheId,
        _position: Position,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Records, after a flush, that the cache is known to hold nothing stale as it runs now.
    fn mark_continuous(
        &self,
        _cache: &CacheId,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Whether the cache answers, for readiness. In-process caches always do.
    fn check(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_ids_come_from_where_the_cache_is() {
        assert_eq!(
            url_location("redis://:secret@redis.prod:6380/2"),
            Some(("redis.prod", Some("6380"), "/2"))
        );
        assert_eq!(
            url_location("http://owner/cachecast/{kind}"),
            Some(("owner", None, "/cachecast/{kind}"))
        );
        assert_eq!(url_location("not a url"), None);
        let id = cache_id_for("redis", "redis.prod", &["6380", "db2"]);
        assert_eq!(id.as_str(), "redis-redis-prod-6380-db2");
        let local = cache_id_for("redis", "127.0.0.1", &["6379", "db0"]);
        assert!(
            local.as_str().ends_with("-127-0-0-1-6379-db0")
                && local.as_str().len() > "redis-127-0-0-1-6379-db0".len(),
            "a loopback cache is named after its machine: {local}"
        );
    }
}
