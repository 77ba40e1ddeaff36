//! The publisher's view of live agents and registered caches, fed by watches on the presence
//! bucket and the caches bucket.
//!
//! The expected set of a request is every cache that can serve entries of its environment at
//! publish time: the in-process cache of each live agent without a persistent cache, and each
//! persistent cache, registered or attended, whether or not a live agent attends it now. An
//! agent is live while its presence key was refreshed within three of its own heartbeat
//! intervals; a deleted key (graceful shutdown) removes it at once. A registration stays until
//! it is forgotten.
//!
//! The view is only trusted while it is current: after the publisher's NATS client reconnects
//! or the watch fails, the view is marked out of date (requests get `503`) until the bucket has
//! been replayed, because heartbeats missed meanwhile would otherwise make live agents look gone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use cachecast_bus::{CachesConfig, Client, JetStream, PresenceConfig};
use cachecast_proto::{
    AgentId, CacheId, CacheRegistration, EnvId, Presence, Wire, parse_cache_key, parse_presence_key,
};
use futures::StreamExt;
use tokio::sync::watch;

/// Heartbeats an agent may miss before it is no longer live.
const MISSED_HEARTBEATS: u32 = 3;
/// Members not live for this long are forgotten (default agent ids change on every start).
const FORGET_AFTER: Duration = Duration::from_secs(300);
/// How often the watch loop checks for reconnects and refreshes the gauges.
const TICK: Duration = Duration::from_millis(250);
/// How often the watch is compared with the bucket's stream, and how long it may stay behind
/// a revision the stream holds before the view counts as stale.
const WATCH_CHECK: Duration = Duration::from_secs(2);
const WATCH_STALE_AFTER: Duration = Duration::from_secs(5);

/// A live agent as a publisher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveAgent {
    pub id: AgentId,
    pub backend: String,
    pub version: String,
    /// The keyed caches it serves.
    pub keyed_caches: Vec<String>,
    /// The persistent cache it attends, if any.
    pub cache_id: Option<CacheId>,
    /// Time since its last heartbeat.
    pub last_seen: Duration,
    /// How far it is, as of its last heartbeat.
    pub progress: Progress,
    /// Why it does not vouch for its cache now (it announced `lagging`).
    pub lagging: Option<String>,
}

/// How far an agent (or the most advanced agent of a cache) is in the stream, as of its last
/// heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The stream sequence of the last event handled.
    pub applied_sequence: u64,
    /// Events of the environment the stream held after it.
    pub lag_events: u64,
    /// At most this far behind: the age of the last event handled, while events are pending.
    pub lag: Duration,
}

impl Progress {
    fn of(presence: &Presence) -> Self {
        let lag = if presence.lag_events > 0 && presence.applied_published_unix_ms > 0 {
            let age = cachecast_proto::now_unix_ms() - presence.applied_published_unix_ms;
            Duration::from_millis(age.max(0) as u64)
        } else {
            Duration::ZERO
        };
        Self {
            applied_sequence: presence.applied_sequence,
            lag_events: presence.lag_events,
            lag,
        }
    }
}

/// A persistent cache as a publisher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownCache {
    pub id: CacheId,
    pub backend: String,
    pub keyed_caches: Vec<String>,
    /// The live agents attending it now (empty: unattended).
    pub attended_by: Vec<AgentId>,
    /// Since its last agent's last heartbeat, when this publisher saw one.
    pub unattended_for: Option<Duration>,
    /// The agent that last registered it.
    pub registered_by: String,
    /// When it was last registered, in Unix milliseconds.
    pub registered_at_unix_ms: i64,
    /// How far its most advanced agent is (as of that agent's last heartbeat, live or not).
    pub progress: Option<Progress>,
    /// Why it is not vouched for: every live agent attending it announced `lagging`.
    pub lagging: Option<String>,
}

/// One cache a request expects to apply its event: the in-process cache of a live agent, or
/// a persistent cache (acknowledged by any agent attending it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExpectedCache {
    Agent {
        id: AgentId,
        /// Why it does not vouch for its cache now, if it announced so.
        lagging: Option<String>,
    },
    Persistent {
        id: CacheId,
        /// Whether a live agent attended it when the event was published.
        attended: bool,
        unattended_for: Option<Duration>,
        /// Why it is not vouched for: every live agent attending it lags.
        lagging: Option<String>,
    },
}

/// The unattended persistent caches, as [`Membership::unattended`] counts them.
#[derive(Debug, Default)]
pub(crate) struct Unattended {
    /// Unattended for longer than the limit asked for.
    pub(crate) expired: Vec<(EnvId, CacheId)>,
    /// How many per environment.
    pub(crate) counts: Vec<(EnvId, usize)>,
}

/// Which bucket a watch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    Presence,
    Caches,
}

impl Feed {
    fn index(self) -> usize {
        match self {
            Feed::Presence => 0,
            Feed::Caches => 1,
        }
    }

    fn bucket(self) -> &'static str {
        match self {
            Feed::Presence => "presence",
            Feed::Caches => "caches",
        }
    }
}

/// Requests asking for the buckets' last revisions, and the last answer.
#[derive(Debug, Default)]
struct Reads {
    /// How many requests asked so far: a read that began after the `n`th asked covers it.
    asked: AtomicU64,
    wake: tokio::sync::Notify,
    done: watch::Sender<Reading>,
}

/// One read of both buckets' last revisions.
#[derive(Debug, Clone)]
struct Reading {
    /// Every request up to this count asked before the read began.
    covers: u64,
    /// The last revision of each bucket (presence, caches), or why it could not be read.
    revisions: Result<[u64; 2], ViewBehind>,
}

impl Default for Reading {
    fn default() -> Self {
        Self {
            covers: 0,
            revisions: Ok([0, 0]),
        }
    }
}

/// Answers [`Membership::read_through`]: whenever requests asked, reads both buckets' streams
/// (`STREAM.INFO`, from each stream's leader) and hands the last revisions to every request
/// that asked before the read began. One read at a time, so under load many requests share
/// one. Runs until the task is dropped.
pub(crate) async fn read_revisions(
    membership: Arc<Membership>,
    presence: async_nats::jetstream::stream::Stream,
    caches: async_nats::jetstream::stream::Stream,
    within: Duration,
) {
    let reads = &membership.reads;
    loop {
        reads.wake.notified().await;
        let covers = reads.asked.load(Ordering::SeqCst);
        let (presence, caches) = tokio::join!(
            last_revision(&presence, Feed::Presence, within),
            last_revision(&caches, Feed::Caches, within),
        );
        let revisions = presence.and_then(|p| caches.map(|c| [p, c]));
        reads.done.send_replace(Reading { covers, revisions });
    }
}

/// The revision a bucket's watch must reach to hold everything the bucket holds: its stream's
/// last sequence, or 0 when it holds nothing (its last writes expired, and no watch would
/// deliver them). Keys expire oldest first, and a key's newer write replaces its older one, so
/// a bucket that holds anything holds its last write.
fn revision_held(state: &async_nats::jetstream::stream::State) -> u64 {
    if state.messages == 0 {
        0
    } else {
        state.last_sequence
    }
}

/// [`revision_held`] of `feed`'s bucket, asked of its stream's leader.
async fn last_revision(
    stream: &async_nats::jetstream::stream::Stream,
    feed: Feed,
    within: Duration,
) -> Result<u64, ViewBehind> {
    let unreadable = |reason: String| ViewBehind::Unreadable {
        bucket: feed.bucket(),
        reason,
    };
    match tokio::time::timeout(within, stream.get_info()).await {
        Ok(Ok(info)) => Ok(revision_held(&info.state)),
        Ok(Err(err)) => Err(unreadable(err.to_string())),
        Err(_) => Err(unreadable(format!("no answer within {within:?}"))),
    }
}

/// Why a request could not be shown a view that holds every write its environment's buckets
/// held when it came: it is answered `503`, since an agent or cache the view has not seen yet
/// may already be serving.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ViewBehind {
    #[error(
        "could not ask the {bucket} bucket for its last revision (is JetStream up? the request may be retried): {reason}"
    )]
    Unreadable {
        bucket: &'static str,
        reason: String,
    },
    #[error(
        "the {bucket} bucket is at revision {holds}, and the view had applied only {applied} after {within:?} (its watch is slow or stalled; the request may be retried)"
    )]
    Late {
        bucket: &'static str,
        holds: u64,
        applied: u64,
        within: Duration,
    },
}

#[derive(Debug)]
struct Member {
    seen_at: Instant,
    /// When the server stored the write `seen_at` stands for, by the server's clock.
    written_ms: i128,
    stale_after: Duration,
    presence: Presence,
}

impl Member {
    fn is_live(&self) -> bool {
        self.seen_at.elapsed() < self.stale_after
    }

    /// Why the agent does not vouch for its cache, if it announced `lagging`.
    fn lagging(&self) -> Option<String> {
        Some(self.presence.lagging.clone()).filter(|r| !r.is_empty())
    }
}

type Envs = HashMap<EnvId, HashMap<AgentId, Member>>;
type Registry = HashMap<EnvId, HashMap<CacheId, CacheRegistration>>;

/// Live agents and registered caches by environment.
#[derive(Debug)]
pub(crate) struct Membership {
    envs: Mutex<Envs>,
    caches: Mutex<Registry>,
    /// Bumped on every change, so waiters need no polling.
    changes: watch::Sender<u64>,
    /// True while the view is current: after a full replay of both buckets and until a
    /// reconnect or error.
    synced: watch::Sender<bool>,
    /// Per feed: replayed and current.
    feeds_synced: Mutex<(bool, bool)>,
    /// Per feed (presence, caches): the highest revision of its bucket the view holds, in the
    /// current reading of the bucket (0 until its replay is applied).
    applied: [watch::Sender<u64>; 2],
    /// Reads of the buckets' last revisions, shared by the requests waiting on them.
    reads: Reads,
    /// Why each feed last stopped following its bucket, for an error that says why.
    feed_failures: Mutex<(Option<String>, Option<String>)>,
    /// When the last agent attending each persistent cache left gracefully (its presence key
    /// deleted), so an unattended cache's answer can say for how long.
    departed: Mutex<HashMap<(EnvId, CacheId), Instant>>,
    /// When this view began: how long an unattended cache has been unattended at least, when
    /// no departure of its agents was seen.
    began: Instant,
}

impl Membership {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            envs: Mutex::default(),
            caches: Mutex::default(),
            changes: watch::Sender::new(0),
            synced: watch::Sender::new(false),
            feeds_synced: Mutex::new((false, false)),
            applied: [watch::Sender::new(0), watch::Sender::new(0)],
            reads: Reads::default(),
            feed_failures: Mutex::default(),
            departed: Mutex::default(),
            began: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Envs> {
        self.envs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_caches(&self) -> MutexGuard<'_, Registry> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every environment with a live agent or a registered cache, sorted.
    pub(crate) fn environments(&self) -> Vec<EnvId> {
        let mut envs: Vec<EnvId> = self
            .lock()
            .iter()
            .filter(|(_, members)| !members.is_empty())
            .map(|(env, _)| env.clone())
            .collect();
        envs.extend(
            self.lock_caches()
                .iter()
                .filter(|(_, caches)| !caches.is_empty())
                .map(|(env, _)| env.clone()),
        );
        envs.sort();
        envs.dedup();
        envs
    }

    /// Every persistent cache unattended for longer than `limit` (counting from when this
    /// view began if it never saw an agent attend it), and the number of unattended caches
    /// per environment, for the gauge.
    pub(crate) fn unattended(&self, limit: Option<Duration>) -> Unattended {
        let envs: Vec<EnvId> = self.lock_caches().keys().cloned().collect();
        let viewed = self.began.elapsed();
        let (mut expired, mut counts) = (Vec::new(), Vec::new());
        for env in envs {
            let unattended: Vec<KnownCache> = self
                .caches(&env)
                .into_iter()
                .filter(|c| c.attended_by.is_empty())
                .collect();
            counts.push((env.clone(), unattended.len()));
            if let Some(limit) = limit {
                expired.extend(
                    unattended
                        .into_iter()
                        .filter(|c| c.unattended_for.unwrap_or(viewed) > limit)
                        .map(|c| (env.clone(), c.id)),
                );
            }
        }
        Unattended { expired, counts }
    }

    /// The unattended caches registered with a pod lifetime, and their pods.
    pub(crate) fn unattended_pod_caches(&self) -> Vec<(EnvId, CacheId, cachecast_kube::PodRef)> {
        let registry: Vec<(EnvId, CacheId, cachecast_kube::PodRef)> = self
            .lock_caches()
            .iter()
            .flat_map(|(env, caches)| {
                caches
                    .iter()
                    .filter(|(_, r)| r.lifetime == "pod" && !r.pod_uid.is_empty())
                    .map(|(cache, r)| {
                        let pod = cachecast_kube::PodRef {
                            namespace: r.pod_namespace.clone(),
                            name: r.pod_name.clone(),
                            uid: r.pod_uid.clone(),
                        };
                        (env.clone(), cache.clone(), pod)
                    })
            })
            .collect();
        let envs = self.lock();
        registry
            .into_iter()
            .filter(|(env, cache, _)| {
                !envs
                    .get(env)
                    .into_iter()
                    .flatten()
                    .any(|(_, m)| m.is_live() && m.presence.cache_id == cache.as_str())
            })
            .collect()
    }

    /// Since when each persistent cache of `env` whose agents left gracefully has been left.
    fn departures(&self, env: &EnvId) -> HashMap<CacheId, Duration> {
        self.departed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((e, _), _)| e == env)
            .map(|((_, cache), at)| (cache.clone(), at.elapsed()))
            .collect()
    }

    /// Every cache a request for `env` must hear from (only those holding the keyed cache
    /// `serving` when set), sorted by id.
    /// Asks the bucket itself about the in-process agents of `env` the view holds as gone,
    /// before they are left out of a request: a watch that delivers late (a reconnect, a
    /// loaded server) would otherwise age out an agent that keeps writing, and that agent,
    /// fresh in its own eyes, keeps its cache serving. A write the watch has not delivered yet
    /// moves the agent's last sighting on by how much later the server stored it; an agent
    /// the bucket cannot be asked about is kept expected (a `424` at worst).
    pub(crate) async fn confirm_lapsed(&self, env: &EnvId, store: &kv::Store, within: Duration) {
        let lapsed: Vec<AgentId> = {
            let envs = self.lock();
            envs.get(env)
                .into_iter()
                .flatten()
                .filter(|(_, m)| !m.is_live() && m.presence.cache_id.is_empty())
                .map(|(id, _)| id.clone())
                .collect()
        };
        if lapsed.is_empty() {
            return;
        }
        let reads = lapsed
            .iter()
            .map(|agent| store.entry(cachecast_proto::Subjects::presence_key(env, agent)));
        let entries = tokio::time::timeout(within, futures::future::join_all(reads))
            .await
            .unwrap_or_default();
        let mut envs = self.lock();
        let Some(members) = envs.get_mut(env) else {
            return;
        };
        for (n, agent) in lapsed.iter().enumerate() {
            let Some(member) = members.get_mut(agent) else {
                continue;
            };
            match entries.get(n) {
                Some(Ok(Some(entry))) if entry.operation == kv::Operation::Put => {
                    let later_ms = created_ms(entry) - member.written_ms;
                    if later_ms > 0 {
                        let later =
                            Duration::from_millis(later_ms.min(i128::from(u32::MAX)) as u64);
                        member.seen_at = (member.seen_at + later).min(Instant::now());
                        member.written_ms = created_ms(entry);
                    }
                }
                // Gone from the bucket (it left, or expired): gone indeed.
                Some(Ok(_)) => {}
                // Not known: keep expecting it.
                Some(Err(_)) | None => member.seen_at = Instant::now(),
            }
        }
    }

    /// Waits until the view holds every write the presence and caches buckets held when this
    /// was called. An agent's in-process cache serves only after its presence is written, and
    /// a persistent cache is registered before its agent flushes it; without this, a watch that
    /// had not delivered such a write yet would leave a serving cache out of a request sent
    /// after it began serving (a `200` while it still held what the request covers).
    ///
    /// The buckets' last revisions come from [`read_revisions`], one read of both streams'
    /// leaders shared by every request that asked before the read began.
    pub(crate) async fn read_through(&self, within: Duration) -> Result<(), ViewBehind> {
        let deadline = tokio::time::Instant::now() + within;
        let ticket = self.reads.asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.reads.wake.notify_one();
        let mut done = self.reads.done.subscribe();
        let holds =
            match tokio::time::timeout_at(deadline, done.wait_for(|r| r.covers >= ticket)).await {
                Ok(Ok(reading)) => reading.revisions.clone()?,
                // The sender lives in `self`: only the deadline ends the wait.
                _ => {
                    return Err(ViewBehind::Unreadable {
                        bucket: "presence or caches",
                        reason: format!("no answer within {within:?}"),
                    });
                }
            };
        for feed in [Feed::Presence, Feed::Caches] {
            let holds = holds[feed.index()];
            let mut applied = self.applied[feed.index()].subscribe();
            let caught_up = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= holds))
                .await
                .is_ok_and(|waited| waited.is_ok());
            if !caught_up {
                return Err(ViewBehind::Late {
                    bucket: feed.bucket(),
                    holds,
                    applied: *applied.borrow(),
                    within,
                });
            }
        }
        Ok(())
    }

    /// The view now holds `feed`'s bucket up to `revision` (0: it is being read again).
    fn set_applied(&self, feed: Feed, revision: u64) {
        self.applied[feed.index()].send_if_modified(|a| std::mem::replace(a, revision) != revision);
    }

    pub(crate) fn expected(&self, env: &EnvId, serving: Option<&str>) -> Vec<ExpectedCache> {
        let holds = |keyed: &[String]| serving.is_none_or(|c| keyed.iter().any(|k| k == c));
        let mut agents = Vec::new();
        // Persistent caches: attended ones from presence, the rest from registrations.
        let mut persistent: HashMap<CacheId, Attendance> = self
            .departures(env)
            .into_iter()
            .map(|(cache, gone)| {
                let attendance = Attendance {
                    gone: Some(gone),
                    ..Attendance::default()
                };
                (cache, attendance)
            })
            .collect();
        {
            let envs = self.lock();
            for (id, member) in envs.get(env).into_iter().flatten() {
                // Most agents serve a cache of their own process: no id to check.
                let cache = Some(member.presence.cache_id.as_str())
                    .filter(|c| !c.is_empty())
                    .and_then(|c| CacheId::new(c).ok());
                let lagging = member.lagging();
                match cache {
                    None if member.is_live() && holds(&member.presence.keyed_caches) => {
                        agents.push(ExpectedCache::Agent {
                            id: id.clone(),
                            lagging,
                        });
                    }
                    None => {}
                    Some(cache) => {
                        let entry = persistent.entry(cache).or_default();
                        if member.is_live() {
                            if holds(&member.presence.keyed_caches) {
                                match lagging {
                                    None => entry.keeping_up = true,
                                    Some(reason) => entry.lagging = Some(reason),
                                }
                            }
                        } else {
                            let gone = member.seen_at.elapsed();
                            entry.gone = Some(entry.gone.map_or(gone, |g: Duration| g.min(gone)));
                        }
                    }
                }
            }
        }
        let registry = self.lock_caches();
        let registered = registry.get(env);
        persistent.retain(|id, attendance| {
            attendance.attended()
                || registered.is_some_and(|r| r.get(id).is_some_and(|reg| holds(&reg.keyed_caches)))
        });
        for (id, registration) in registered.into_iter().flatten() {
            if holds(&registration.keyed_caches) {
                persistent.entry(id.clone()).or_default();
            }
        }
        agents.extend(persistent.into_iter().map(|(id, a)| {
            let attended = a.attended();
            ExpectedCache::Persistent {
                id,
                attended,
                unattended_for: if attended { None } else { a.gone },
                lagging: if a.keeping_up { None } else { a.lagging },
            }
        }));
        agents.sort_by(|a, b| a.node_id().cmp(b.node_id()));
        agents
    }

    /// The persistent caches of `env`: registered, or attended by a live agent.
    pub(crate) fn caches(&self, env: &EnvId) -> Vec<KnownCache> {
        let mut known: HashMap<CacheId, KnownCache> = self
            .lock_caches()
            .get(env)
            .into_iter()
            .flatten()
            .map(|(id, r)| {
                (
                    id.clone(),
                    KnownCache {
                        id: id.clone(),
                        backend: r.backend.clone(),
                        keyed_caches: r.keyed_caches.clone(),
                        attended_by: Vec::new(),
                        unattended_for: None,
                        registered_by: r.agent_id.clone(),
                        registered_at_unix_ms: r.registered_at_unix_ms,
                        progress: None,
                        lagging: None,
                    },
                )
            })
            .collect();
        for (cache, gone) in self.departures(env) {
            if let Some(known) = known.get_mut(&cache) {
                known.unattended_for = Some(gone);
            }
        }
        let envs = self.lock();
        // Per cache: whether every live agent seen so far lags.
        let mut lagging_only: HashMap<CacheId, bool> = HashMap::new();
        for (agent, member) in envs.get(env).into_iter().flatten() {
            let Ok(cache) = CacheId::new(member.presence.cache_id.as_str()) else {
                continue;
            };
            let entry = known.entry(cache.clone()).or_insert_with(|| KnownCache {
                id: cache,
                backend: member.presence.backend.clone(),
                keyed_caches: member.presence.keyed_caches.clone(),
                attended_by: Vec::new(),
                unattended_for: None,
                registered_by: String::new(),
                registered_at_unix_ms: 0,
                progress: None,
                lagging: None,
            });
            let progress = Progress::of(&member.presence);
            if entry
                .progress
                .is_none_or(|p| p.applied_sequence < progress.applied_sequence)
            {
                entry.progress = Some(progress);
            }
            if member.is_live() {
                entry.attended_by.push(agent.clone());
                match member.lagging() {
                    Some(reason) if lagging_only.get(&entry.id) != Some(&false) => {
                        lagging_only.insert(entry.id.clone(), true);
                        entry.lagging = Some(reason);
                    }
                    _ => {
                        lagging_only.insert(entry.id.clone(), false);
                        entry.lagging = None;
                    }
                }
            } else {
                let gone = member.seen_at.elapsed();
                entry.unattended_for = Some(entry.unattended_for.map_or(gone, |g| g.min(gone)));
            }
        }
        drop(envs);
        let registry = self.lock_caches();
        let registered = registry.get(env);
        // A cache known only from an agent gone stale was forgotten (or never registered).
        let mut caches: Vec<KnownCache> = known
            .into_values()
            .filter(|c| {
                !c.attended_by.is_empty() || registered.is_some_and(|r| r.contains_key(&c.id))
            })
            .map(|mut c| {
                c.attended_by.sort();
                if !c.attended_by.is_empty() {
                    c.unattended_for = None;
                }
                c
            })
            .collect();
        caches.sort_by(|a, b| a.id.cmp(&b.id));
        caches
    }

    /// The ids of the agents live in `env` now.
    pub(crate) fn live_ids(&self, env: &EnvId) -> Vec<AgentId> {
        let envs = self.lock();
        envs.get(env)
            .into_iter()
            .flatten()
            .filter(|(_, m)| m.is_live())
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
                cache_id: CacheId::new(m.presence.cache_id.as_str()).ok(),
                last_seen: m.seen_at.elapsed(),
                progress: Progress::of(&m.presence),
                lagging: m.lagging(),
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

    /// Which feeds are not read through yet, and why they last failed.
    pub(crate) fn why_not_synced(&self) -> String {
        let feeds = *self.feeds_synced.lock().unwrap_or_else(|p| p.into_inner());
        let failures = self
            .feed_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let describe = |name: &str, synced: bool, failure: Option<String>| {
            (!synced).then(|| match failure {
                Some(reason) => {
                    format!("the {name} bucket is not read through (last failure: {reason})")
                }
                None => format!(
                    "the {name} bucket is not read through (its replay never ended, no failure)"
                ),
            })
        };
        [
            describe("presence", feeds.0, failures.0),
            describe("caches", feeds.1, failures.1),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
    }

    fn record_failure(&self, feed: Feed, reason: &str) {
        let mut failures = self.feed_failures.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match feed {
            Feed::Presence => &mut failures.0,
            Feed::Caches => &mut failures.1,
        };
        *slot = Some(reason.to_owned());
    }

    fn set_synced(&self, feed: Feed, synced: bool) {
        tracing::debug!(?feed, synced, "view of the bucket");
        // Both feeds' followers call this: the view's state is sent under the same lock that
        // computes it. Sent after the lock, one follower's stale `false` could land after the
        // other's `true` and leave the view out of date for good with both feeds read through
        // (a publisher answering `503`, or not starting: MembershipNotSynced with nothing
        // waiting).
        let mut feeds = self.feeds_synced.lock().unwrap_or_else(|p| p.into_inner());
        match feed {
            Feed::Presence => feeds.0 = synced,
            Feed::Caches => feeds.1 = synced,
        }
        let all = feeds.0 && feeds.1;
        self.synced
            .send_if_modified(|s| std::mem::replace(s, all) != all);
    }

    /// Applies one change of the caches bucket.
    fn apply_cache(&self, entry: &kv::Entry) {
        let Some((env, cache)) = parse_cache_key(&entry.key) else {
            tracing::warn!(key = %entry.key, "ignoring a cache registration key that is not <env>.<cacheId>");
            return;
        };
        let mut registry = self.lock_caches();
        match entry.operation {
            kv::Operation::Put => match CacheRegistration::from_bytes(&entry.value) {
                Ok(registration) => {
                    let caches = registry.entry(env.clone()).or_default();
                    if caches.insert(cache.clone(), registration).is_none() {
                        tracing::info!(%env, %cache, "cache registered");
                    }
                }
                Err(err) => {
                    tracing::warn!(key = %entry.key, error = %err, "ignoring an undecodable cache registration")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(caches) = registry.get_mut(&env)
                    && caches.remove(&cache).is_some()
                {
                    tracing::info!(%env, %cache, "cache forgotten");
                }
            }
        }
        drop(registry);
        self.changes.send_modify(|n| *n += 1);
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
                if let Ok(cache) = CacheId::new(presence.cache_id.as_str()) {
                    self.departed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&(env.clone(), cache));
                }
                let members = envs.entry(env.clone()).or_default();
                let joined = !members.contains_key(&agent);
                if joined {
                    tracing::info!(%env, %agent, backend = %presence.backend, cache = %presence.cache_id, "agent joined");
                }
                members.insert(
                    agent,
                    Member {
                        seen_at,
                        written_ms: created_ms(entry),
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
                    && let Some(member) = members.remove(&agent)
                {
                    tracing::info!(%env, %agent, "agent left");
                    export_gauge(&env, members);
                    if let Ok(cache) = CacheId::new(member.presence.cache_id.as_str()) {
                        self.departed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((env.clone(), cache), Instant::now());
                    }
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

/// What a follower needs to watch, and to mend, its bucket.
#[derive(Debug)]
pub(crate) struct Follower {
    pub(crate) client: Client,
    pub(crate) js: JetStream,
    pub(crate) presence: PresenceConfig,
    pub(crate) caches: CachesConfig,
    pub(crate) feed: Feed,
    pub(crate) store: kv::Store,
}

impl Follower {
    /// Creates the followed bucket again if it is gone, or opens it.
    async fn mend(&mut self) {
        let store = match self.feed {
            Feed::Presence => cachecast_bus::ensure_presence_bucket(&self.js, &self.presence).await,
            Feed::Caches => cachecast_bus::ensure_caches_bucket(&self.js, &self.caches).await,
        };
        match store {
            Ok(store) => self.store = store,
            Err(err) => tracing::warn!(error = %err, "bucket unavailable"),
        }
    }
}

/// Follows a bucket forever. After a reconnect or any failure it marks the view out of date
/// and replays the bucket; if the bucket is gone (a server that lost its store) it creates it
/// again, so agents' heartbeats and registrations land somewhere.
pub(crate) async fn follow(mut follower: Follower, membership: Arc<Membership>) {
    loop {
        let reason = follow_once(&follower, &membership).await;
        membership.set_synced(follower.feed, false);
        membership.record_failure(follower.feed, &reason);
        tracing::warn!(%reason, feed = ?follower.feed, "view out of date; reading the bucket again");
        tokio::time::sleep(TICK).await;
        follower.mend().await;
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
    let feed = follower.feed;
    let mut replayed = stored == 0;
    let replay_started = Instant::now();
    membership.set_applied(feed, 0);
    membership.set_synced(feed, replayed);
    let mut replay = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    let mut watch_check = tokio::time::interval(WATCH_CHECK);
    let mut seen = WatchProgress::default();
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
            _ = watch_check.tick() => {
                // A replay that never says it is done (a key removed while the watch still
                // counted it, say) would keep the view out of date, every answer a `503`,
                // for good: read the bucket again.
                if !replayed && replay_started.elapsed() >= WATCH_STALE_AFTER {
                    return format!("the bucket's replay did not finish within {WATCH_STALE_AFTER:?}");
                }
                // Every key expired between the first look and the watch's start: the watch
                // has nothing to replay and would never say it is done.
                if !replayed
                    && let Ok(info) = stream.info().await
                    && info.state.messages == 0
                {
                    apply_replay(membership, &mut replay);
                    membership.set_applied(feed, seen.revision);
                    membership.set_synced(feed, true);
                    replayed = true;
                    continue;
                }
                // A watch that stopped delivering while the bucket moves on would age live
                // agents out on a stale view: compare it with the bucket's stream.
                if replayed
                    && let Ok(info) = stream.info().await
                    && let Some(behind) = seen.behind(revision_held(&info.state), Instant::now())
                    && behind >= WATCH_STALE_AFTER
                {
                    return format!(
                        "the watch stopped delivering: the bucket is at revision {}, the watch at {} for {behind:?}",
                        revision_held(&info.state), seen.revision
                    );
                }
                continue;
            }
        };
        let entry = match entry {
            Some(Ok(entry)) => entry,
            Some(Err(err)) => return format!("the presence watch failed: {err}"),
            None => return "the presence watch ended".into(),
        };
        seen.revision = seen.revision.max(entry.revision);
        if feed == Feed::Caches {
            membership.apply_cache(&entry);
            membership.set_applied(feed, seen.revision);
            if !replayed && entry.delta == 0 {
                membership.set_synced(feed, true);
                replayed = true;
            }
            continue;
        }
        if replayed {
            // A live change: it happened just now.
            membership.apply(&entry, Duration::ZERO);
            membership.set_applied(feed, seen.revision);
            continue;
        }
        let last = entry.delta == 0;
        replay.push(entry);
        if last {
            apply_replay(membership, &mut replay);
            membership.set_applied(feed, seen.revision);
            membership.set_synced(feed, true);
            replayed = true;
        }
    }
}

/// How far a bucket's watch has delivered, against what the bucket's stream holds.
#[derive(Debug, Default)]
struct WatchProgress {
    /// The highest revision the watch delivered.
    revision: u64,
    /// A revision the stream held that the watch had not delivered yet, and since when.
    waiting_for: Option<(u64, Instant)>,
}

impl WatchProgress {
    /// Given the stream's last sequence now, how long the watch has been behind a revision the
    /// stream held (`None` while it keeps up).
    fn behind(&mut self, stream_last: u64, now: Instant) -> Option<Duration> {
        if let Some((target, _)) = self.waiting_for
            && self.revision >= target
        {
            self.waiting_for = None;
        }
        if stream_last <= self.revision {
            return None;
        }
        let (_, since) = *self.waiting_for.get_or_insert((stream_last, now));
        Some(now.saturating_duration_since(since))
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

impl ExpectedCache {
    /// The id it is reported under: the agent's, or the persistent cache's.
    pub(crate) fn node_id(&self) -> &str {
        match self {
            Self::Agent { id, .. } => id.as_str(),
            Self::Persistent { id, .. } => id.as_str(),
        }
    }
}

/// Who attends one persistent cache, as a request's expected set is built.
#[derive(Debug, Default)]
struct Attendance {
    /// A live agent that keeps up attends it.
    keeping_up: bool,
    /// Only lagging live agents attend it: why.
    lagging: Option<String>,
    /// Since its last agent's last heartbeat, when none is live.
    gone: Option<Duration>,
}

impl Attendance {
    fn attended(&self) -> bool {
        self.keeping_up || self.lagging.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_feeds_read_through_at_once_leave_the_view_current() {
        // Each follower reports from its own task; whatever the interleaving, the view is
        // current once both are read through.
        for _ in 0..2000 {
            let membership = Membership::new();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let threads: Vec<_> = [Feed::Presence, Feed::Caches]
                .into_iter()
                .map(|feed| {
                    let (membership, barrier) = (membership.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        membership.set_synced(feed, true);
                    })
                })
                .collect();
            for thread in threads {
                thread.join().expect("a follower thread");
            }
            assert!(membership.is_synced(), "{}", membership.why_not_synced());
        }
    }

    /// A stream's state as the server reports it.
    fn state(messages: u64, last_seq: u64) -> async_nats::jetstream::stream::State {
        serde_json::from_value(serde_json::json!({
            "messages": messages, "bytes": 0, "first_seq": last_seq + 1 - messages.min(last_seq),
            "first_ts": "2026-12-01T00:00:00Z", "last_seq": last_seq,
            "last_ts": "2026-12-01T00:00:00Z", "consumer_count": 1,
        }))
        .expect("a stream state")
    }

    #[test]
    fn an_emptied_bucket_holds_nothing_to_wait_for() {
        assert_eq!(revision_held(&state(3, 10)), 10);
        // Every key expired: its writes are gone, no watch delivers them, and a watch that
        // replayed nothing is not behind (nor a request's read-through).
        assert_eq!(revision_held(&state(0, 10)), 0);
        let mut seen = WatchProgress::default();
        assert_eq!(
            seen.behind(revision_held(&state(0, 10)), Instant::now()),
            None
        );
    }

    #[test]
    fn a_watch_behind_the_bucket_counts_from_the_first_look_that_saw_it() {
        let start = Instant::now();
        let mut seen = WatchProgress {
            revision: 10,
            ..WatchProgress::default()
        };
        assert_eq!(seen.behind(10, start), None, "up to date");
        assert_eq!(seen.behind(12, start), Some(Duration::ZERO));
        let later = start + Duration::from_secs(6);
        assert_eq!(seen.behind(15, later), Some(Duration::from_secs(6)));
        // It delivered what the first look saw: a new target, counted afresh.
        seen.revision = 12;
        assert_eq!(seen.behind(15, later), Some(Duration::ZERO));
        seen.revision = 15;
        assert_eq!(seen.behind(15, later), None);
    }

    #[test]
    fn progress_lags_only_while_events_are_pending() {
        let caught_up = Presence {
            applied_sequence: 42,
            lag_events: 0,
            applied_published_unix_ms: cachecast_proto::now_unix_ms() - 60_000,
            ..Presence::default()
        };
        let progress = Progress::of(&caught_up);
        assert_eq!(progress.applied_sequence, 42);
        assert_eq!(progress.lag, Duration::ZERO, "nothing pending: no lag");

        let behind = Presence {
            lag_events: 7,
            ..caught_up
        };
        let progress = Progress::of(&behind);
        assert_eq!(progress.lag_events, 7);
        assert!(progress.lag >= Duration::from_secs(60), "{progress:?}");

        let never_applied = Presence {
            lag_events: 3,
            ..Presence::default()
        };
        assert_eq!(
            Progress::of(&never_applied).lag,
            Duration::ZERO,
            "no timestamp yet"
        );
    }
}
