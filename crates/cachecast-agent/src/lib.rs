//! The cachecast agent.
//!
//! An agent runs next to one cache (as a sidecar, or embedded in the service that owns the
//! cache) for one environment. It takes the environment's invalidation events in stream order:
//! the stream's live copy of each as it stores it, with a consumer only to catch up (or a
//! consumer for every event, where the stream does not republish); with its fast path on, it
//! also takes each one as it is published, before the stream stores it. It evicts through a [`CacheBackend`], and acknowledges each event once to
//! the publisher that sent it. It acknowledges only what it applied; a failed eviction is
//! reported as a failure with its reason.
//!
//! Start-up order is the guarantee's foundation: the consumer exists before the cache is
//! flushed, and the cache is flushed before the agent announces its presence. So any event
//! published while a publisher sees the agent as live reaches it, and nothing cached before
//! the agent started survives.

mod admission;
mod agent;
pub mod backend;
mod config;
mod consumer;
mod fast_path;
mod live;
mod presence;
mod watch;

pub use agent::{Agent, AgentProbe, RunningAgent};
pub use backend::{
    BackendError, CacheBackend, Continuity, FillTicket, HttpBackend, HttpConfig, MemoryCache,
    Position, RedisBackend, RedisConfig, redis_key_slot,
};
pub use cachecast_kube::{Kube, KubernetesConfig, PodRef};
pub use config::{AgentConfig, AgentError, BackendKind, CacheLifetime, OnStart};
