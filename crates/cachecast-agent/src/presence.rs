//! The agent's presence: a key in the presence bucket, refreshed by heartbeat.
//!
//! Publishers treat an agent as live while its key was refreshed within three heartbeats, and
//! expect its acknowledgement for every event they publish meanwhile. The key is deleted on
//! graceful shutdown, so an agent that leaves properly is never waited for.
//!
//! One id, one process: every write is conditional on the revision this process wrote last,
//! and carries a random `instance`. A process that finds the key refreshed by another instance
//! refuses to start; one whose key was taken over while it was paused stops.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use cachecast_proto::{AgentId, CacheId, CacheName, EnvId, Presence, Subjects, Wire};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How far the agent is: written by its event loop and its progress check, announced by
/// every heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    applied: AtomicU64,
    pending: AtomicU64,
    published_ms: AtomicI64,
    /// The last event the event loop finished with (applied, failed, or flushed over).
    handled: AtomicU64,
    /// Why the agent cannot vouch for its cache now; `None` while it keeps up.
    lagging: Mutex<Option<String>>,
    /// Wakes the heartbeat to announce a change of `lagging` at once.
    changed: tokio::sync::Notify,
}

impl Progress {
    /// The event loop is done with every event up to `sequence`.
    pub(crate) fn handled_up_to(&self, sequence: u64) {
        self.handled.store(sequence, Ordering::Relaxed);
    }

    pub(crate) fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Events of the environment known to be waiting: the consumer's count, at least one while
    /// the agent is `behind` an event it has not received.
    pub(crate) fn pending_or_behind(&self, behind: bool) -> u64 {
        let pending = self.pending.load(Ordering::Relaxed);
        if behind { pending.max(1) } else { pending }
    }

    /// Why the agent does not vouch for its cache now, if it does not.
    pub(crate) fn lagging(&self) -> Option<String> {
        self.lagging
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets why the agent cannot vouch (`None`: it can). True when that changed whether it
    /// lags; the heartbeat then announces it at once.
    pub(crate) fn set_lagging(&self, reason: Option<String>) -> bool {
        let mut lagging = self.lagging.lock().unwrap_or_else(|p| p.into_inner());
        let changed = lagging.is_some() != reason.is_some();
        *lagging = reason;
        drop(lagging);
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// The agent handled the event at `sequence`, published at `published_ms`, with
    /// `pending` events of its environment after it in the stream.
    pub(crate) fn record(&self, sequence: u64, pending: u64, published_ms: i64) {
        self.applied.store(sequence, Ordering::Relaxed);
        self.pending.store(pending, Ordering::Relaxed);
        self.published_ms.store(published_ms, Ordering::Relaxed);
    }

    fn write_into(&self, presence: &mut Presence) {
        presence.applied_sequence = self.applied.load(Ordering::Relaxed);
        presence.lag_events = self.pending.load(Ordering::Relaxed);
        presence.applied_published_unix_ms = self.published_ms.load(Ordering::Relaxed);
        presence.lagging = self.lagging().unwrap_or_default();
    }
}

/// What an agent announces about itself besides its id.
#[derive(Debug, Clone)]
pub(crate) struct Announcement<'a> {
    pub(crate) backend: &'a str,
    pub(crate) keyed_caches: &'a [CacheName],
    /// The persistent cache it attends, if any.
    pub(crate) cache: Option<&'a CacheId>,
    /// Random per process.
    pub(crate) instance: &'a str,
    pub(crate) progress: Arc<Progress>,
}

/// A running heartbeat; [`Heartbeat::leave`] stops it and deletes the key.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    store: kv::Store,
    key: String,
    task: JoinHandle<()>,
    /// When a presence write last succeeded.
    last_ok: Arc<Mutex<Instant>>,
    /// Set when another process took the key over.
    taken: watch::Receiver<bool>,
}

/// Why presence could not be announced.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AnnounceError {
    #[error("{0}")]
    Put(#[source] kv::PutError),
    #[error("{0}")]
    Read(#[source] kv::EntryError),
    #[error("another live process announces this agent id")]
    Taken,
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
    ) -> Result<Self, AnnounceError> {
        let key = Subjects::presence_key(env, agent);
        if held_by_another(&store, &key, announcement.instance).await? {
            return Err(AnnounceError::Taken);
        }
        let template = Presence {
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
            ..Presence::default()
        };
        let progress = announcement.progress.clone();
        let wake = announcement.progress.clone();
        let value = move || {
            let mut presence = template.clone();
            progress.write_into(&mut presence);
            presence.to_bytes()
        };
        let mut revision = store.put(&key, value()).await.map_err(AnnounceError::Put)?;
        let last_ok = Arc::new(Mutex::new(Instant::now()));
        let (taken_tx, taken) = watch::channel(false);
        let instance = announcement.instance.to_owned();
        let task = tokio::spawn({
            let store = store.clone();
            let key = key.clone();
            let last_ok = last_ok.clone();
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticker.tick().await;
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = wake.changed.notified() => ticker.reset(),
                    }
                    // Stamped when the write is sent: the margin to the publishers' three
                    // heartbeats counts from here.
                    let sent = Instant::now();
                    match refresh(&store, &key, &value(), revision, &instance).await {
                        Ok(Some(next)) => {
                            revision = next;
                            *last_ok.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                        }
                        Ok(None) => {
                            tracing::error!(%key, "another process announces this agent id: stopping this one; give every agent its own agent.id");
                            taken_tx.send_replace(true);
                            return;
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
            taken,
        })
    }

    /// Resolves once another process has taken this agent's presence key over.
    pub(crate) async fn taken_over(&self) {
        let mut taken = self.taken.clone();
        if taken.wait_for(|t| *t).await.is_err() {
            // The heartbeat task ended without a takeover (aborted): never resolve.
            std::future::pending::<()>().await;
        }
    }

    /// When a presence write last succeeded (stamped when it was sent), kept up to date.
    pub(crate) fn freshness(&self) -> Arc<Mutex<Instant>> {
        self.last_ok.clone()
    }

    /// Stops the heartbeat and deletes the presence key, so publishers stop expecting acks
    /// (unless another process holds it now).
    pub(crate) async fn leave(self) {
        self.task.abort();
        if *self.taken.borrow() {
            return;
        }
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

/// Writes `value` over the revision this process wrote last. `Ok(Some(revision))` when
/// written; `Ok(None)` when another instance wrote the key since (taken over).
async fn refresh(
    store: &kv::Store,
    key: &str,
    value: &bytes::Bytes,
    revision: u64,
    instance: &str,
) -> Result<Option<u64>, String> {
    match store.update(key, value.clone(), revision).await {
        Ok(next) => return Ok(Some(next)),
        Err(err) if err.kind() != kv::UpdateErrorKind::WrongLastRevision => {
            return Err(err.to_string());
        }
        Err(_) => {}
    }
    // Someone wrote since: this process (a write whose reply was lost), another one, or
    // nobody (the bucket was created anew).
    let current = store.entry(key).await.map_err(|e| e.to_string())?;
    match current {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let mine = Presence::from_bytes(&entry.value).is_ok_and(|p| p.instance == instance);
            if !mine {
                return Ok(None);
            }
            store
                .update(key, value.clone(), entry.revision)
                .await
                .map(Some)
                .map_err(|e| e.to_string())
        }
        _ => reannounce(store, key, value).await.map(Some),
    }
}

/// Writes `value` under `key`, found absent (expired, or the bucket created anew), only if it
/// still is: a write sent now can land after another process took the id over (a process
/// paused right after sending it), and must not take the id back. A failure is retried at the
/// next heartbeat, which then finds the other instance's key.
async fn reannounce(store: &kv::Store, key: &str, value: &bytes::Bytes) -> Result<u64, String> {
    store
        .create(key, value.clone())
        .await
        .map_err(|e| e.to_string())
}

/// Whether another live process announces `key`: its value names another instance and it is
/// refreshed in each of two windows of one and a half of that process's heartbeats. A key left
/// by a crashed process is not refreshed, so a restart with the same id waits that long, then
/// goes on. Two windows, because one write can land late: the last one a process sent before
/// it was paused or killed, held up by a server still recovering after a restart. Only a
/// newer revision counts as a write: in a cluster every replica answers a direct get, and one
/// that lags answers an older revision (the likely cause of soak seed 3: a new agent refused
/// its id on a cluster while the old process was paused). A
/// lagging read can only make this check let the new process in, which the old one then
/// notices at its next heartbeat (its revision-checked write fails) and stops.
async fn held_by_another(
    store: &kv::Store,
    key: &str,
    instance: &str,
) -> Result<bool, AnnounceError> {
    let read = |key: &str| {
        let store = store.clone();
        let key = key.to_owned();
        async move {
            let entry = store.entry(&key).await.map_err(AnnounceError::Read)?;
            Ok::<_, AnnounceError>(
                entry
                    .filter(|e| e.operation == kv::Operation::Put)
                    .and_then(|e| {
                        let presence = Presence::from_bytes(&e.value).ok()?;
                        (presence.instance != instance)
                            .then_some((e.revision, presence.heartbeat_ms))
                    }),
            )
        }
    };
    let Some((mut revision, heartbeat_ms)) = read(key).await? else {
        return Ok(false);
    };
    let window = Duration::from_millis(heartbeat_ms.clamp(100, 60_000)) * 3 / 2;
    tracing::info!(%key, wait = ?window, "another process announced this agent id; checking that it is gone");
    for _ in 0..2 {
        tokio::time::sleep(window).await;
        match read(key).await? {
            Some((now, _)) if now > revision => revision = now,
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// Registers the persistent cache `cache` of `env` in the caches bucket (no TTL), so every
/// publisher expects it from now on, attended or not.
pub(crate) async fn register(
    store: &kv::Store,
    env: &EnvId,
    cache: &CacheId,
    registration: &cachecast_proto::CacheRegistration,
) -> Result<(), kv::PutError> {
    store
        .put(
            cachecast_proto::cache_key(env, cache),
            registration.to_bytes(),
        )
        .await?;
    tracing::info!(%cache, lifetime = %registration.lifetime, "cache registered: publishers expect it until it is forgotten");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(instance: &str) -> bytes::Bytes {
        Presence {
            instance: instance.to_owned(),
            ..Presence::default()
        }
        .to_bytes()
    }

    /// Soak seed 208: a process resumed with its key expired sent a re-announce that landed
    /// after a new process had taken the id over, and took it back (the new one stopped).
    #[tokio::test]
    async fn a_late_reannounce_never_overwrites_another_processs_key() {
        let nats = cachecast_testkit::nats().await;
        let client = async_nats::connect(nats.url()).await.expect("client");
        let store = async_nats::jetstream::new(client)
            .create_key_value(kv::Config {
                bucket: "presence-test".into(),
                ..Default::default()
            })
            .await
            .expect("bucket");
        let key = "dev.twin";
        // Absent: the re-announce writes it.
        reannounce(&store, key, &presence("mine"))
            .await
            .expect("an absent key is announced");
        store.delete(key).await.expect("delete");
        // Taken by another process between the look and the write: refused.
        store.put(key, presence("theirs")).await.expect("theirs");
        assert!(reannounce(&store, key, &presence("mine")).await.is_err());
        let entry = store.entry(key).await.expect("read").expect("a key");
        let holder = Presence::from_bytes(&entry.value).expect("presence");
        assert_eq!(holder.instance, "theirs");
    }
}
