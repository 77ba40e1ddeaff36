//! Cache backends: what an agent evicts from.
//!
//! A backend evicts the entries a [`ResponseSelector`] matches and says how many it removed.
//! Evicting more than asked is allowed (it only costs a cache miss); evicting less never is.

mod memory;
mod redis;

use std::future::Future;

use cachecast_proto::{EnvId, ResponseSelector};

pub use self::memory::MemoryCache;
pub use self::redis::{RedisBackend, RedisConfig};

/// Why an eviction failed. The message travels to the caller in the failed ack.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("{0}")]
    Other(String),
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

    /// Whether the cache answers, for readiness. In-process caches always do.
    fn check(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }
}
