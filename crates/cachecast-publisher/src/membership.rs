//! The publisher's view of live agents, fed by a watch on the presence bucket.
//!
//! The expected set of a request is the set of agents live in its environment at publish
//! time. An agent is live while its presence key was refreshed within three of its own
//! heartbeat intervals; a deleted key (graceful shutdown) removes it at once.
//!
//! The view is only trusted while it is current: after the publisher's NATS client reconnects
//! or the watch fails, the view is marked out of date (requests get `503`) until the bucket has
//! been replayed, because heartbeats missed meanwhile would otherwise make live agents look gone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use cachecast_bus::{Client, JetStream, PresenceConfig};
use cachecast_proto::{AgentId, EnvId, Presence, Wire, parse_presence_key};
use futures::StreamExt;
use tokio::sync::watch;

/// Heartbeats an agent may miss before it is no longer live.
const MISSED_HEARTBEATS: u32 = 3;
/// Members not live for this long are forgotten (default agent ids change on every start).
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// How often the watch loop checks for reconnects and refreshes the gauges.
const TICK: Duration = Duration::from_millis(250);

/// A live agent as a publisher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    pub id: AgentId,
    pub backend: String,
    pub version: String,
    /// The keyed caches it serves.
    pub keyed_caches: Vec<String>,
    /// Time since its last heartbeat.
    pub last_seen: Duration,
}

#[derive(Debug)]
struct Member {
    seen_at: Instant,
    stale_after: Duration,
    presence: Presence,
}

impl Member {
    fn is_live(&self) -> bool {
        self.seen_at.elapsed() < self.stale_after
    }
}

type Envs = HashMap<EnvId, HashMap<AgentId, Member>>;

/// Live agents by environment.
#[derive(Debug)]
pub(crate) struct Membership {
    envs: Mutex<Envs>,
    /// Bumped on every change, so waiters need no polling.
    changes: watch::Sender<u64>,
    /// True while the view is current: after a full replay and until a reconnect or error.
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

    fn lock(&self) -> MutexGuard<'_, Envs> {
        self.envs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the agents live in `env` now.
    pub(crate) fn live_ids(&self, env: &EnvId) -> Vec<AgentId> {
        self.live_ids_serving(env, None)
    }

    /// The ids of the agents live in `env` now that serve the keyed cache `cache` (every
    /// live agent when `None`).
    pub(crate) fn live_ids_serving(&self, env: &EnvId, cache: Option<&str>) -> Vec<AgentId> {
        let envs = self.lock();
        envs.get(env)
            .into_iter()
            .flatten()
            .filter(|(_, m)| m.is_live())
            .filter(|(_, m)| cache.is_none_or(|c| m.presence.keyed_caches.iter().any(|k| k == c)))
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
            .filter(|(_, m)| m.is_live())
            .map(|(id, m)| LiveAgent {
                id: id.clone(),
                backend: m.presence.backend.clone(),
                version: m.presence.version.clone(),
                keyed_caches: m.presence.keyed_caches.clone(),
                last_seen: m.seen_at.elapsed(),
            })
            .collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        agents
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True while the view is current.
    pub(crate) fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the view is current.
    pub(crate) async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = synced.wait_for(|s| *s).await;
    }

    fn set_synced(&self, synced: bool) {
        self.synced
            .send_if_modified(|s| std::mem::replace(s, synced) != synced);
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
                let now = Instant::now();
                // An age beyond what Instant can represent errs toward expecting the agent.
                let seen_at = now.checked_sub(age).unwrap_or(now);
                let members = envs.entry(env.clone()).or_default();
                let joined = !members.contains_key(&agent);
                if joined {
                    tracing::info!(%env, %agent, backend = %presence.backend, "agent joined");
                }
                members.insert(
                    agent,
                    Member {
                        seen_at,
                        stale_after: heartbeat * MISSED_HEARTBEATS,
                        presence,
                    },
                );
                if joined {
                    export_gauge(&env, members);
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(members) = envs.get_mut(&env)
                    && members.remove(&agent).is_some()
                {
                    tracing::info!(%env, %agent, "agent left");
                    export_gauge(&env, members);
                }
            }
        }
        // Heartbeats change nothing the gauges show; `tidy` refreshes them every tick.
        drop(envs);
        self.changes.send_modify(|n| *n += 1);
    }

    /// Refreshes every gauge and forgets agents that have been gone for long.
    fn tidy(&self) {
        let mut envs = self.lock();
        for (env, members) in envs.iter_mut() {
            members.retain(|_, m| m.seen_at.elapsed() < m.stale_after + FORGET_AFTER);
            export_gauge(env, members);
        }
    }
}

/// Sets the live-agents gauge of `env`.
fn export_gauge(env: &EnvId, members: &HashMap<AgentId, Member>) {
    let live = members.values().filter(|m| m.is_live()).count();
    metrics::gauge!("cachecast_live_agents", "env" => env.to_string()).set(live as f64);
}

/// When the server stored `entry`, in Unix milliseconds by the server's clock.
fn created_ms(entry: &kv::Entry) -> i128 {
    entry.created.unix_timestamp_nanos() / 1_000_000
}

/// What the follower needs to watch, and to mend, the presence bucket.
#[derive(Debug)]
pub(crate) struct Follower {
    pub(crate) client: Client,
    pub(crate) js: JetStream,
    pub(crate) presence: PresenceConfig,
    pub(crate) store: kv::Store,
}

/// Follows the presence bucket forever. After a reconnect or any failure it marks the view
/// out of date and replays the bucket; if the bucket is gone (a server that lost its store)
/// it creates it again, so agents' heartbeats land somewhere.
pub(crate) async fn follow(mut follower: Follower, membership: Arc<Membership>) {
    loop {
        let reason = follow_once(&follower, &membership).await;
        membership.set_synced(false);
        tracing::warn!(%reason, "presence view out of date; reading the bucket again");
        tokio::time::sleep(TICK).await;
        match cachecast_bus::ensure_presence_bucket(&follower.js, &follower.presence).await {
            Ok(store) => follower.store = store,
            Err(err) => tracing::warn!(error = %err, "presence bucket unavailable"),
        }
    }
}

/// Replays the bucket, then applies changes until a reconnect or a failure; returns why it
/// stopped.
async fn follow_once(follower: &Follower, membership: &Membership) -> String {
    let statistics = follower.client.statistics();
    let connects = || statistics.connects.load(Ordering::Relaxed);
    let connects_at_start = connects();
    // The watch first replays the latest value of every key; with an empty bucket it
    // replays nothing, so learn from the stream itself whether there is anything to wait for.
    let mut stream = follower.store.stream.clone();
    let stored = match stream.info().await {
        Ok(info) => info.state.messages,
        Err(err) => return format!("could not read the presence bucket: {err}"),
    };
    let mut watch = match follower.store.watch_with_history(">").await {
        Ok(watch) => watch,
        Err(err) => return format!("could not watch the presence bucket: {err}"),
    };
    let mut replayed = stored == 0;
    membership.set_synced(replayed);
    let mut replay = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        let entry = tokio::select! {
            entry = watch.next() => entry,
            _ = tick.tick() => {
                if connects() != connects_at_start {
                    return "the NATS client reconnected".into();
                }
                membership.tidy();
                continue;
            }
        };
        let entry = match entry {
            Some(Ok(entry)) => entry,
            Some(Err(err)) => return format!("the presence watch failed: {err}"),
            None => return "the presence watch ended".into(),
        };
        if replayed {
            // A live change: it happened just now.
            membership.apply(&entry, Duration::ZERO);
            continue;
        }
        let last = entry.delta == 0;
        replay.push(entry);
        if last {
            apply_replay(membership, &mut replay);
            membership.set_synced(true);
            replayed = true;
        }
    }
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
