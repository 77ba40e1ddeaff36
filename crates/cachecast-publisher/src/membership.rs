//! The publisher's view of live agents, fed by a watch on the presence bucket.
//!
//! The expected set of a request is the set of agents live in its environment at publish
//! time. An agent is live while its presence key was refreshed within three of its own
//! heartbeat intervals; a deleted key (graceful shutdown) removes it at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use cachecast_proto::{AgentId, EnvId, Presence, Wire, parse_presence_key};
use futures::StreamExt;
use tokio::sync::watch;

/// Heartbeats an agent may miss before it is no longer live.
const MISSED_HEARTBEATS: u32 = 3;

/// A live agent as a publisher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    pub id: AgentId,
    pub backend: String,
    pub version: String,
    /// Time since its last heartbeat.
    pub last_seen: Duration,
}

#[derive(Debug)]
struct Member {
    seen_at: Instant,
    stale_after: Duration,
    presence: Presence,
}

/// Live agents by environment.
#[derive(Debug)]
pub(crate) struct Membership {
    envs: Mutex<HashMap<EnvId, HashMap<AgentId, Member>>>,
    /// Bumped on every change, so waiters need no polling.
    changes: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl Membership {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            envs: Mutex::default(),
            changes: watch::Sender::new(0),
            synced: watch::Sender::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<EnvId, HashMap<AgentId, Member>>> {
        self.envs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the agents live in `env` now.
    pub(crate) fn live_ids(&self, env: &EnvId) -> Vec<AgentId> {
        let envs = self.lock();
        let Some(members) = envs.get(env) else {
            return Vec::new();
        };
        members
            .iter()
            .filter(|(_, m)| m.seen_at.elapsed() < m.stale_after)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The agents live in `env` now, sorted by id.
    pub(crate) fn live(&self, env: &EnvId) -> Vec<LiveAgent> {
        let envs = self.lock();
        let mut agents: Vec<LiveAgent> = envs
            .get(env)
            .into_iter()
            .flatten()
            .filter(|(_, m)| m.seen_at.elapsed() < m.stale_after)
            .map(|(id, m)| LiveAgent {
                id: id.clone(),
                backend: m.presence.backend.clone(),
                version: m.presence.version.clone(),
                last_seen: m.seen_at.elapsed(),
            })
            .collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        agents
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True once the first full read of the bucket is done.
    pub(crate) fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Sets the live-agents gauge of every environment known.
    fn export_gauges(&self) {
        let envs = self.lock();
        for (env, members) in envs.iter() {
            export_gauge(env, members);
        }
    }

    /// Waits until the first full read of the bucket is done.
    pub(crate) async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Applies one presence change, written `age` ago.
    fn apply(&self, entry: &kv::Entry, age: Duration) {
        let Some((env, agent)) = parse_presence_key(&entry.key) else {
            tracing::warn!(key = %entry.key, "ignoring a presence key that is not <env>.<agentId>");
            return;
        };
        let mut envs = self.lock();
        match entry.operation {
            kv::Operation::Put => {
                let presence = match Presence::from_bytes(&entry.value) {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::warn!(key = %entry.key, error = %err, "ignoring an undecodable presence value");
                        return;
                    }
                };
                let heartbeat = match presence.heartbeat_ms {
                    0 => Duration::from_secs(2),
                    ms => Duration::from_millis(ms),
                };
                let Some(seen_at) = Instant::now().checked_sub(age) else {
                    return;
                };
                let known = envs.get(&env).is_some_and(|m| m.contains_key(&agent));
                if !known {
                    tracing::info!(%env, %agent, backend = %presence.backend, "agent joined");
                }
                envs.entry(env.clone()).or_default().insert(
                    agent,
                    Member {
                        seen_at,
                        stale_after: heartbeat * MISSED_HEARTBEATS,
                        presence,
                    },
                );
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(members) = envs.get_mut(&env)
                    && members.remove(&agent).is_some()
                {
                    tracing::info!(%env, %agent, "agent left");
                }
            }
        }
        if let Some(members) = envs.get(&env) {
            export_gauge(&env, members);
        }
        drop(envs);
        self.changes.send_modify(|n| *n += 1);
    }

    fn mark_synced(&self) {
        self.synced
            .send_if_modified(|s| !std::mem::replace(s, true));
    }
}

/// Sets the live-agents gauge of `env`.
fn export_gauge(env: &EnvId, members: &HashMap<AgentId, Member>) {
    let live = members
        .values()
        .filter(|m| m.seen_at.elapsed() < m.stale_after)
        .count();
    metrics::gauge!("cachecast_live_agents", "env" => env.to_string()).set(live as f64);
}

/// When the server stored `entry`, in Unix milliseconds by the server's clock.
fn created_ms(entry: &kv::Entry) -> i128 {
    entry.created.unix_timestamp_nanos() / 1_000_000
}

/// Follows the presence bucket forever, re-watching after any failure, and keeps the
/// live-agents gauges current (agents also leave by going stale, which no change announces).
pub(crate) async fn follow(store: kv::Store, membership: Arc<Membership>) {
    let gauges = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            membership.export_gauges();
        }
    };
    let watch = async {
        loop {
            if let Err(reason) = follow_once(&store, &membership).await {
                tracing::warn!(%reason, "presence watch interrupted; watching again");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::join!(gauges, watch);
}

async fn follow_once(store: &kv::Store, membership: &Membership) -> Result<(), String> {
    // The watch first replays the latest value of every key; with an empty bucket it
    // replays nothing, so learn from the stream itself whether there is anything to wait for.
    let mut stream = store.stream.clone();
    let stored = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let mut replayed = stored == 0;
    if replayed {
        membership.mark_synced();
    }
    let mut replay = Vec::new();
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| e.to_string())?;
        if replayed {
            // A live change: it happened just now.
            membership.apply(&entry, Duration::ZERO);
            continue;
        }
        let last = entry.delta == 0;
        replay.push(entry);
        if last {
            apply_replay(membership, &mut replay);
            membership.mark_synced();
            replayed = true;
        }
    }
    Err("the watch ended".into())
}

/// Applies replayed values with their ages measured against the newest of them, all by the
/// server's clock: no skew between this host and the server can make a live agent look
/// stale. While agents heartbeat the newest write is seconds old, so the ages are close;
/// when it is old, every age is underestimated, so a dead agent is expected a little longer
/// (a `424`), never a live one skipped (a `200` without its ack).
fn apply_replay(membership: &Membership, replay: &mut Vec<kv::Entry>) {
    let newest = replay.iter().map(created_ms).max().unwrap_or_default();
    for entry in replay.drain(..) {
        let age_ms = (newest - created_ms(&entry)).clamp(0, i128::from(u32::MAX)) as u64;
        membership.apply(&entry, Duration::from_millis(age_ms));
    }
}
