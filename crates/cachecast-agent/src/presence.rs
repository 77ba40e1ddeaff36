//! The agent's presence: a key in the presence bucket, refreshed by heartbeat.
//!
//! Publishers treat an agent as live while its key was refreshed within three heartbeats, and
//! expect its acknowledgement for every event they publish meanwhile. The key is deleted on
//! graceful shutdown, so an agent that leaves properly is never waited for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use cachecast_proto::{AgentId, CacheId, CacheName, EnvId, Presence, Subjects, Wire};
use tokio::task::JoinHandle;

/// What an agent announces about itself besides its id.
#[derive(Debug, Clone)]
pub(crate) struct Announcement<'a> {
    pub(crate) backend: &'a str,
    pub(crate) keyed_caches: &'a [CacheName],
    /// The persistent cache it attends, if any.
    pub(crate) cache: Option<&'a CacheId>,
    /// Random per process.
    pub(crate) instance: &'a str,
}

/// A running heartbeat; [`Heartbeat::leave`] stops it and deletes the key.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    store: kv::Store,
    key: String,
    task: JoinHandle<()>,
    /// When a presence write last succeeded.
    last_ok: Arc<Mutex<Instant>>,
}

impl Heartbeat {
    /// Writes the presence key once (so the agent is live when this returns), then keeps
    /// refreshing it every `interval` in the background.
    pub(crate) async fn announce(
        store: kv::Store,
        env: &EnvId,
        agent: &AgentId,
        announcement: &Announcement<'_>,
        interval: Duration,
    ) -> Result<Self, kv::PutError> {
        let key = Subjects::presence_key(env, agent);
        let value = Presence {
            agent_id: agent.to_string(),
            env: env.to_string(),
            heartbeat_ms: interval.as_millis() as u64,
            started_at_unix_ms: cachecast_proto::now_unix_ms(),
            backend: announcement.backend.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            keyed_caches: announcement
                .keyed_caches
                .iter()
                .map(|c| c.to_string())
                .collect(),
            cache_id: announcement
                .cache
                .map(|c| c.to_string())
                .unwrap_or_default(),
            instance: announcement.instance.to_owned(),
        }
        .to_bytes();
        store.put(&key, value.clone()).await?;
        let last_ok = Arc::new(Mutex::new(Instant::now()));
        let task = tokio::spawn({
            let store = store.clone();
            let key = key.clone();
            let last_ok = last_ok.clone();
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    match store.put(&key, value.clone()).await {
                        Ok(_) => {
                            *last_ok.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now()
                        }
                        Err(err) => {
                            tracing::warn!(%key, error = %err, "presence heartbeat failed; retrying next interval")
                        }
                    }
                }
            }
        });
        Ok(Self {
            store,
            key,
            task,
            last_ok,
        })
    }

    /// How long ago a presence write last succeeded.
    pub(crate) fn since_last_ok(&self) -> Duration {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Stops the heartbeat and deletes the presence key, so publishers stop expecting acks.
    pub(crate) async fn leave(self) {
        self.task.abort();
        match self.store.delete(&self.key).await {
            Ok(()) => tracing::info!(key = %self.key, "presence removed"),
            Err(err) => {
                tracing::warn!(key = %self.key, error = %err, "could not remove presence; publishers will drop it after three missed heartbeats")
            }
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers the persistent cache `cache` of `env` in the caches bucket (no TTL), so every
/// publisher expects it from now on, attended or not.
pub(crate) async fn register(
    store: &kv::Store,
    env: &EnvId,
    cache: &CacheId,
    agent: &AgentId,
    backend: &str,
    keyed_caches: &[CacheName],
) -> Result<(), kv::PutError> {
    let registration = cachecast_proto::CacheRegistration {
        cache_id: cache.to_string(),
        env: env.to_string(),
        backend: backend.to_owned(),
        registered_at_unix_ms: cachecast_proto::now_unix_ms(),
        keyed_caches: keyed_caches.iter().map(|c| c.to_string()).collect(),
        agent_id: agent.to_string(),
    };
    store
        .put(
            cachecast_proto::cache_key(env, cache),
            registration.to_bytes(),
        )
        .await?;
    tracing::info!(%cache, "cache registered: publishers expect it until it is forgotten");
    Ok(())
}
