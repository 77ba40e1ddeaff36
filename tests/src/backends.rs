//! Cache backends for tests: one that records what it was asked, one that holds evictions at
//! a gate, one whose evictions a test slows down, makes fail or holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast_agent::{BackendError, CacheBackend, MemoryCache};
use cachecast_proto::EnvId;

/// A cache backend that records what it was asked to evict, in order: the first scope of
/// each selector, or `*` for a flush. For checking what an agent applied.
#[derive(Debug, Clone, Default)]
pub struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Recorder {
    /// Everything evicted so far.
    pub fn seen(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }

    /// True if `other` is this very recorder (a clone shares it).
    pub fn same_as(&self, other: &Recorder) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl CacheBackend for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }

    async fn evict_responses(
        &self,
        _env: &EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        let what = selector
            .scope_client_ids
            .first()
            .cloned()
            .unwrap_or_else(|| "*".into());
        self.0.lock().expect("lock").push(what);
        Ok(1)
    }

    /// Records `identity:<template>/<id>`; a flush (neither part) records nothing more than
    /// the `*` of its response flush.
    async fn evict_identities(
        &self,
        _env: &EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        if selector.identity_template.is_some() || selector.identity_id.is_some() {
            let what = format!(
                "identity:{}/{}",
                selector.identity_template.as_deref().unwrap_or("*"),
                selector.identity_id.as_deref().unwrap_or("*")
            );
            self.0.lock().expect("lock").push(what);
        }
        Ok(0)
    }
}

/// A cache whose selective evictions (a scope or an identity; not `{}`, not flushes) wait at a
/// gate the test opens, one at a time ([`GatedCache::let_one_through`]) or for good
/// ([`GatedCache::open`]): a request held in flight for as long as a test needs.
#[derive(Debug, Clone)]
pub struct GatedCache {
    gate: Arc<tokio::sync::Semaphore>,
}

impl Default for GatedCache {
    fn default() -> Self {
        Self {
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl GatedCache {
    /// Lets one waiting (or the next) eviction through.
    pub fn let_one_through(&self) {
        self.gate.add_permits(1);
    }

    /// Lets every eviction through from now on.
    pub fn open(&self) {
        self.gate.close();
    }
}

impl CacheBackend for GatedCache {
    fn kind(&self) -> &'static str {
        "gated"
    }

    async fn evict_responses(
        &self,
        _env: &EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, BackendError> {
        if !selector.is_all() {
            // Closed means open for good.
            if let Ok(permit) = self.gate.acquire().await {
                permit.forget();
            }
        }
        Ok(1)
    }

    async fn evict_identities(
        &self,
        _env: &EnvId,
        _selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, BackendError> {
        Ok(0)
    }
}

/// How a [`FaultyCache`] evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionMode {
    #[default]
    Normal,
    /// Every eviction (and flush) waits this long first.
    Slow(Duration),
    /// Every eviction (and flush) fails.
    Failing,
}

/// An in-process memory cache whose evictions a test can slow down, make fail, or hold.
#[derive(Debug, Clone, Default)]
pub struct FaultyCache {
    pub cache: MemoryCache,
    mode: Arc<Mutex<EvictionMode>>,
    started: Arc<std::sync::atomic::AtomicU64>,
    /// While true, evictions wait (after counting as started).
    held: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FaultyCache {
    /// How many evictions (and flushes) have begun.
    pub fn evictions_started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Evictions (those waiting, and those to come) wait until [`FaultyCache::release`].
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets held evictions go on.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Evictions from now on behave as `mode` says.
    pub fn set_mode(&self, mode: EvictionMode) {
        *self.mode.lock().expect("lock") = mode;
    }

    async fn fault(&self) -> Result<(), BackendError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The sender lives in `self`: waiting cannot fail.
        let _ = self.held.subscribe().wait_for(|held| !held).await;
        let mode = *self.mode.lock().expect("lock");
        match mode {
            EvictionMode::Normal => Ok(()),
            EvictionMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            EvictionMode::Failing => {
                Err(BackendError::Custom("an injected eviction failure".into()))
            }
        }
    }
}

impl CacheBackend for FaultyCache {
    fn kind(&self) -> &'static str {
        CacheBackend::kind(&self.cache)
    }

    async fn evict_responses(
        &self,
        env: &EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::evict_responses(&self.cache, env, selector).await
    }

    async fn evict_identities(
        &self,
        env: &EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::evict_identities(&self.cache, env, selector).await
    }

    async fn flush(&self, env: &EnvId) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::flush(&self.cache, env).await
    }

    fn set_serving(&self, serving: bool) {
        CacheBackend::set_serving(&self.cache, serving);
    }
}
