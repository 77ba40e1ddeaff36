//! Cache backends: what an agent evicts from.
//!
//! A backend evicts the entries a selector matches (PDP responses, identities, or ids of a named
//! keyed cache) and says how many it removed. Evicting more than asked is allowed (it only costs
//! a cache miss); evicting less never is.

mod http;
mod memory;
mod redis;

use std::future::Future;

use cachecast_proto::{AgentId, CacheName, EnvId, IdentitySelector, ResponseSelector};

pub use self::http::{HttpBackend, HttpConfig};
pub use self::memory::{FillTicket, MemoryCache};
pub use self::redis::{RedisBackend, RedisConfig};

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

/// Why an eviction failed. The message travels to the caller in the failed ack.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("{0}")]
    Other(String),
}

impl BackendError {
    /// The error of an eviction from a keyed cache this agent does not serve.
    pub fn no_keyed_cache(cache: &CacheName) -> Self {
        Self::Other(format!(
            "this agent serves no keyed cache named {cache:?}; configure it on the agent (redis.keyed_caches or agent.keyed_caches)"
        ))
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
        async move {
            let mut removed = self
                .evict_responses(env, &ResponseSelector::default())
                .await?;
            removed += self
                .evict_identities(env, &IdentitySelector::default())
                .await?;
            for cache in self.keyed_caches() {
                removed += self.evict_keyed(env, &cache, None).await?;
            }
            Ok(removed)
        }
    }

    /// The stream position stored next to the cache by [`CacheBackend::store_position`], so
    /// an agent with `on_start = "resume"` can carry on after a restart. A cache that does
    /// not outlive its agent has none, and the agent flushes instead.
    fn load_position(
        &self,
        _env: &EnvId,
        _agent: &AgentId,
    ) -> impl Future<Output = Result<Option<Position>, BackendError>> + Send {
        async { Ok(None) }
    }

    /// Stores the position of the last event applied.
    fn store_position(
        &self,
        _env: &EnvId,
        _agent: &AgentId,
        _position: Position,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Whether the cache answers, for readiness. In-process caches always do.
    fn check(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }
}
