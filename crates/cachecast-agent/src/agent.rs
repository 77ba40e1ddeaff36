//! The agent: start-up (live copies and consumer, registration, flush or catch-up, presence),
//! the event loop, and acknowledgements.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, stream};
use cachecast_bus::{BusConfig, Client, JetStream, LogLimiter};
use cachecast_proto::{
    Ack, AckStatus, AgentId, CacheId, CacheName, EnvId, Invalidation, RecentEventIds, Subjects,
    Target, Wire,
};
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use crate::admission::REJECT_LOG_INTERVAL;
use crate::backend::{BackendError, CacheBackend};
use crate::config::{AgentConfig, AgentError, OnStart};
use crate::consumer::{Consumer, StreamState, consume, missed_events};
use crate::fast_path::Delivery;
use crate::live::{LiveCopy, Place};
use crate::presence::{AnnounceError, Announcement, Heartbeat, Progress};
use crate::watch::{Flusher, Gap, ProgressCheck, Signal, Tracker};

/// How many acknowledged event ids an agent remembers, so that an event that arrives twice (on
/// both paths, or stored twice by a publish retried after its first attempt was stored) is
/// applied and acknowledged once. A retry comes at least half of the publisher's
/// `nats.request_timeout` after the first attempt (0.5 s by default): this covers about 8 000
/// events a second in between. An event that falls out of it is applied again (idempotent)
/// and its second ack is ignored by the publisher.
const ACKNOWLEDGED_REMEMBERED: usize = 4096;

/// An agent, configured but not started.
#[derive(Debug)]
pub struct Agent<B> {
    client: Client,
    js: JetStream,
    pub(crate) env: EnvId,
    id: AgentId,
    config: AgentConfig,
    pub(crate) bus: BusConfig,
    backend: Arc<B>,
    /// The persistent cache this agent attends; `None` when its cache ends with the process.
    cache: Option<CacheId>,
    /// Asks the Kubernetes API about the agent's pod, for a cache that ends with it.
    kube: Option<cachecast_kube::Kube>,
    /// Random per process: tells two processes claiming one agent id apart in presence.
    instance: String,
    /// True from the moment presence is announced until shutdown begins.
    live: Arc<AtomicBool>,
    /// Why the cache may hold entries it should not (an eviction failed, the cache
    /// restarted): it is flushed before anything else is acknowledged as applied.
    dirty: Mutex<Option<&'static str>>,
    /// What every ack subject of this environment starts with.
    pub(crate) ack_prefix: String,
    metrics: EventMetrics,
    /// Keeps a flood of refused events from flooding the log.
    pub(crate) log_limit: LogLimiter,
    /// The keyed caches the backend serves, read once: announced in presence, and the keyed
    /// events this agent applies.
    keyed_caches: Vec<CacheName>,
    /// How far it is, and whether it lags: for presence and `/readyz`.
    progress: Arc<Progress>,
    /// Why its cache may not serve now (shared by the watch tasks).
    suspension: Arc<crate::watch::Suspension>,
}

/// Per-event metric handles, registered once (no allocation per event).
#[derive(Debug)]
struct EventMetrics {
    applied: metrics::Counter,
    failed: metrics::Counter,
    evicted: metrics::Counter,
    eviction_seconds: metrics::Histogram,
    /// Acknowledged events by the path that brought them first.
    via_fast_path: metrics::Counter,
    via_stream: metrics::Counter,
}

impl EventMetrics {
    fn new(env: &EnvId) -> Self {
        let env = env.to_string();
        Self {
            applied: metrics::counter!("cachecast_agent_events_total", "env" => env.clone(), "outcome" => "applied"),
            failed: metrics::counter!("cachecast_agent_events_total", "env" => env.clone(), "outcome" => "failed"),
            evicted: metrics::counter!("cachecast_agent_evicted_entries_total", "env" => env.clone()),
            eviction_seconds: metrics::histogram!("cachecast_agent_eviction_seconds", "env" => env.clone()),
            via_fast_path: metrics::counter!("cachecast_agent_acked_events_total", "env" => env.clone(), "path" => "fast"),
            via_stream: metrics::counter!("cachecast_agent_acked_events_total", "env" => env, "path" => "stream"),
        }
    }
}

/// Tells whether an agent can do its job, for `/readyz`.
#[derive(Debug)]
pub struct AgentProbe<B> {
    client: Client,
    backend: Arc<B>,
    live: Arc<AtomicBool>,
    progress: Arc<Progress>,
}

impl<B> Clone for AgentProbe<B> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            backend: self.backend.clone(),
            live: self.live.clone(),
            progress: self.progress.clone(),
        }
    }
}

impl<B: CacheBackend> AgentProbe<B> {
    /// `Ok` when the agent is live, keeps up with its events, is connected to NATS and its
    /// backend answers; else why not.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.live.load(Ordering::Relaxed) {
            return Err("not live: starting or shutting down".into());
        }
        if let Some(reason) = self.progress.lagging() {
            return Err(format!("lagging: {reason}"));
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err("not connected to NATS".into());
        }
        self.backend
            .check()
            .await
            .map_err(|err| format!("backend {}: {err}", self.backend.kind()))
    }
}

/// An agent that is consuming, flushed and announced: publishers now expect its acks.
pub struct RunningAgent<B> {
    agent: Agent<B>,
    stream: stream::Stream,
    /// The consumer: while it catches up, or for every event without live copies.
    events: Option<pull::Ordered>,
    /// The stream's live copies of the environment's events (none when off).
    live: Option<async_nats::Subscriber>,
    /// Whether the stream republishes events as live copies (as of the last look at it).
    live_copies: bool,
    /// When the stream stored the last event handled (or, after a flush at the stream's end,
    /// its last message then), in Unix nanoseconds by the server's clock: a live copy at or
    /// below the position stored later belongs to a stream numbered anew
    /// ([`crate::live::place`]).
    handled_stored_ns: i128,
    /// A catch-up that could not begin (the stream unreadable): tried again on each check.
    catch_up_due: bool,
    /// Whether any live copy arrived yet.
    live_arrived: bool,
    /// When the loop last handled a stored event.
    last_handled_at: Instant,
    /// The fast path: the environment's events as they are published (none when off).
    fast: Option<async_nats::Subscriber>,
    /// The events acknowledged lately, on either path or at an earlier stream sequence.
    acknowledged: RecentEventIds,
    /// The stream sequence of the last event handled; the consumer resumes after it.
    last_sequence: u64,
    /// Which stream `last_sequence` counts in (its creation time).
    stream_created_ns: i128,
    heartbeat: Heartbeat,
    /// The registration of its persistent cache.
    registered: Option<Registered>,
    /// How far it is, for its presence.
    progress: Arc<Progress>,
    /// What the progress check found, for the event loop.
    signals: tokio::sync::mpsc::Receiver<Signal>,
    tracker: Arc<Mutex<Tracker>>,
    /// The progress check and the stale-presence check, stopped with the agent.
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

/// A persistent cache's registration, as its agent holds it.
#[derive(Debug)]
struct Registered {
    store: async_nats::jetstream::kv::Store,
    key: String,
    /// The pod the cache ends with (`cache_lifetime = "pod"`).
    pod: Option<cachecast_kube::PodRef>,
}

/// Where a starting agent begins: after a stored position (its cache is up to date to it), or
/// at the stream's end after a flush.
#[derive(Debug, Clone, Copy)]
struct StartPoint {
    stream: StreamState,
    resume_after: Option<u64>,
}

impl<B: CacheBackend> Agent<B> {
    /// An agent for `env` named `id`, evicting from `backend`.
    pub fn new(
        client: Client,
        bus: &BusConfig,
        (env, id): (EnvId, AgentId),
        config: AgentConfig,
        backend: B,
    ) -> Self {
        let js = cachecast_bus::jetstream(client.clone(), &bus.nats);
        // A pod-lifetime cache is named after its pod unless configured: each pod's Redis is
        // another cache, even where every pod reaches it at redis://127.0.0.1.
        let pod_default = config
            .pod_uid
            .as_ref()
            .filter(|_| config.cache_lifetime == crate::CacheLifetime::Pod)
            .and_then(|uid| CacheId::new(format!("pod-{uid}")).ok());
        let cache = backend
            .default_cache_id()
            .map(|default| config.cache_id.clone().or(pod_default).unwrap_or(default));
        let instance = cachecast_proto::new_event_id();
        Self {
            cache,
            kube: None,
            instance,
            ack_prefix: Subjects::ack_prefix(&env),
            metrics: EventMetrics::new(&env),
            log_limit: LogLimiter::new(REJECT_LOG_INTERVAL),
            client,
            js,
            env,
            id,
            config,
            bus: bus.clone(),
            live: Arc::default(),
            dirty: Mutex::new(None),
            keyed_caches: backend.keyed_caches(),
            backend: Arc::new(backend),
            progress: Arc::default(),
            suspension: Arc::default(),
        }
    }

    /// What flushes this agent's cache, from any task.
    fn flusher(&self) -> Flusher<B> {
        Flusher {
            backend: self.backend.clone(),
            env: self.env.clone(),
            cache: self.cache.clone(),
            evict_timeout: self.config.evict_timeout,
            suspension: self.suspension.clone(),
        }
    }

    pub fn id(&self) -> &AgentId {
        &self.id
    }

    /// Uses these settings to ask the Kubernetes API about the agent's pod (with
    /// `cache_lifetime = "pod"`; the in-cluster defaults otherwise).
    pub fn with_kubernetes(
        mut self,
        config: &cachecast_kube::KubernetesConfig,
    ) -> Result<Self, AgentError> {
        self.kube = Some(cachecast_kube::Kube::new(config)?);
        Ok(self)
    }

    /// The persistent cache this agent attends (`None` for a cache in its own process).
    pub fn cache_id(&self) -> Option<&CacheId> {
        self.cache.as_ref()
    }

    fn dirty(&self) -> Option<&'static str> {
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_dirty(&self, reason: Option<&'static str>) {
        *self.dirty.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Whether this start resumes from a position stored in the cache.
    fn resumes(&self) -> bool {
        self.cache.is_some() && self.config.on_start != OnStart::Flush
    }

    /// A readiness probe for this agent, usable before and after it starts.
    pub fn probe(&self) -> AgentProbe<B> {
        AgentProbe {
            client: self.client.clone(),
            backend: self.backend.clone(),
            live: self.live.clone(),
            progress: self.progress.clone(),
        }
    }

    /// For a persistent cache, stores in the cache how far it is up to date, so whichever
    /// agent attends it next carries on from there. Not while it is dirty: the failed event
    /// must then be replayed (or the cache flushed), never skipped.
    async fn remember_position(&self, sequence: u64, stream_created_ns: i128) {
        let Some(cache) = &self.cache else { return };
        if self.dirty().is_some() {
            return;
        }
        let position = crate::backend::Position {
            sequence,
            stream_created_ns,
        };
        if let Err(err) = self
            .backend
            .store_position(&self.env, cache, position)
            .await
        {
            tracing::warn!(error = %err, "could not store the stream position in the cache; the next start flushes");
        }
    }

    /// Where to start: after the position stored in the cache if it is usable (same stream,
    /// every event since still held, the cache did not restart since), else at the end.
    async fn start_point(&self, info: &stream::Info) -> Result<StartPoint, String> {
        let stream = StreamState::of(info);
        let at_end = Ok(StartPoint {
            stream,
            resume_after: None,
        });
        let Some(cache) = self.cache.as_ref().filter(|_| self.resumes()) else {
            return at_end;
        };
        let continuity = self
            .backend
            .continuity(&self.env, cache)
            .await
            .map_err(|e| format!("could not read the cache's position: {e}"))?;
        if continuity.restarted {
            tracing::info!(%cache, "the cache restarted (or is new) since an agent last flushed it; flushing");
            return at_end;
        }
        let Some(stored) = continuity.position else {
            tracing::info!("no stored position to resume from; flushing instead");
            return at_end;
        };
        if let Some(gap) = missed_events(stored.sequence, stored.stream_created_ns, stream) {
            tracing::warn!(
                stored = stored.sequence,
                stream_first = stream.first_sequence,
                stream_last = stream.last_sequence,
                "the stream no longer holds every event since the stored position; flushing instead"
            );
            metrics::counter!("cachecast_agent_gaps_total", "env" => self.env.to_string(), "reason" => gap.reason())
                .increment(1);
            return at_end;
        }
        tracing::info!(
            after = stored.sequence,
            "resuming from the position stored in the cache"
        );
        Ok(StartPoint {
            stream,
            resume_after: Some(stored.sequence),
        })
    }

    /// Evicts everything, bounded by `evict_timeout`, and counts it under `reason`.
    async fn flush(&self, reason: &'static str) -> Result<u64, String> {
        self.flusher().flush(reason).await
    }

    /// Asks the backend whether it can evict from this cache completely, until it answers
    /// (an unreachable cache is asked again); refuses to start if it cannot.
    async fn refuse_unsupported_cache(&self) -> Result<(), AgentError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.backend.supported().await {
                Ok(()) => return Ok(()),
                Err(BackendError::Unsupported(reason)) => {
                    return Err(AgentError::UnsupportedCache(reason));
                }
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?delay, "could not reach the cache to check it");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Measures the round trip to the stream's servers (the fastest of three stream infos: a
    /// site reaches them across its WAN link) and warns of each setting it leaves too little
    /// room for (see [`AgentConfig::round_trip_margins`]).
    async fn check_round_trip(&self, stream: &stream::Stream) {
        let mut fastest: Option<Duration> = None;
        for _ in 0..3 {
            let mut stream = stream.clone();
            let sent = Instant::now();
            if stream.info().await.is_ok() {
                fastest = Some(fastest.map_or(sent.elapsed(), |f| f.min(sent.elapsed())));
            }
        }
        let Some(round_trip) = fastest else {
            return;
        };
        metrics::gauge!("cachecast_agent_stream_round_trip_seconds", "env" => self.env.to_string())
            .set(round_trip.as_secs_f64());
        tracing::info!(?round_trip, "round trip to the stream's servers");
        for problem in self.config.round_trip_margins(&self.bus.nats, round_trip) {
            tracing::warn!("{problem} (see the README, \"Sites across a WAN\")");
        }
    }

    /// Starts the agent in the order its guarantee needs: consumer, then registration of a
    /// persistent cache, then flush (or, with a usable stored position, the events it missed),
    /// then presence. Transient failures (NATS or the
    /// backend unreachable, the stream not created yet) are logged and retried until they
    /// pass; bound the wait from outside if needed.
    pub async fn start(self) -> Result<RunningAgent<B>, AgentError> {
        let span = tracing::info_span!("agent", env = %self.env, agent = %self.id);
        async move {
            self.config.check(&self.bus)?;
            // A cache of this process serves nothing until publishers can know of it: until
            // its presence is stored, below. What it held before is flushed on the way.
            self.backend.set_serving(false);
            self.refuse_unsupported_cache().await?;
            if self.config.cache_id.is_some() && self.cache.is_none() {
                tracing::warn!("agent.cache_id is ignored: this backend's cache ends with the agent");
            }
            let stream = retry("open the invalidation stream", || {
                cachecast_bus::open_stream(&self.js, &self.bus.stream)
            })
            .await;
            let presence = retry("open the presence bucket", || {
                cachecast_bus::open_presence_bucket(&self.js, &self.bus.presence)
            })
            .await;
            self.check_round_trip(&stream).await;
            // Subscribed before the consumer is created: every event stored from then on comes
            // live, every one before it through the consumer, so none falls in between.
            let live_copies = cachecast_bus::republishes_live(&stream.cached_info().config);
            let live = match (self.config.live_events, live_copies) {
                (false, _) => None,
                (true, false) => {
                    tracing::warn!(stream = %self.bus.stream.name, "the stream does not republish events as live copies (a publisher turns that on when it may update the stream): a consumer delivers every event");
                    None
                }
                (true, true) => match self.client.subscribe(Subjects::live(&self.env)).await {
                    Ok(subscriber) => Some(subscriber),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not subscribe to the live copies; a consumer delivers every event");
                        None
                    }
                },
            };
            let (point, consumer) = retry("create the event consumer", || async {
                let mut fresh = stream.clone();
                let info = fresh.info().await.map_err(|e| e.to_string())?.clone();
                let point = self.start_point(&info).await?;
                let after = point.resume_after.unwrap_or(point.stream.last_sequence);
                let consumer = consume(&stream, &self.env, &self.id, after).await?;
                // The server moves a start it no longer holds to its first event: that is a gap.
                let point = if consumer.starts_after > after && point.resume_after.is_some() {
                    tracing::warn!(asked = after, got = consumer.starts_after, "the stream dropped events since the stored position; flushing instead");
                    StartPoint { resume_after: None, ..point }
                } else {
                    point
                };
                Ok::<_, String>((point, consumer))
            })
            .await;
            let Consumer {
                mut events,
                pending,
                starts_after,
            } = consumer;
            let mut last_sequence = point.resume_after.unwrap_or(starts_after);
            let mut handled_stored_ns = point.stream.last_stored_ns;
            // Events the consumer still holds for the agent, as of its last count.
            let mut left_in_consumer = pending;
            let progress = self.progress.clone();
            progress.record(last_sequence, pending, 0);
            progress.handled_up_to(last_sequence);
            let mut stream_created_ns = point.stream.created_ns;
            let mut acknowledged = RecentEventIds::new(ACKNOWLEDGED_REMEMBERED);
            // Registered before the cache is flushed or caught up: from here on publishers
            // expect it, so no request can be answered without it while a PDP refills it.
            let mut registered = None;
            if let Some(cache) = &self.cache {
                let pod = self.config.pod()?;
                let registration = cachecast_proto::CacheRegistration {
                    cache_id: cache.to_string(),
                    env: self.env.to_string(),
                    backend: self.backend.kind().to_owned(),
                    registered_at_unix_ms: cachecast_proto::now_unix_ms(),
                    keyed_caches: self.keyed_caches.iter().map(|c| c.to_string()).collect(),
                    agent_id: self.id.to_string(),
                    lifetime: self.config.cache_lifetime.as_str().to_owned(),
                    pod_namespace: pod.as_ref().map(|p| p.namespace.clone()).unwrap_or_default(),
                    pod_name: pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
                    pod_uid: pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default(),
                };
                let store = retry("open the caches bucket", || {
                    cachecast_bus::open_caches_bucket(&self.js, &self.bus.caches)
                })
                .await;
                retry("register the cache", || {
                    crate::presence::register(&store, &self.env, cache, &registration)
                })
                .await;
                registered = Some(Registered {
                    store,
                    key: cachecast_proto::cache_key(&self.env, cache),
                    pod,
                });
            }
            if point.resume_after.is_none() {
                retry("flush the cache", || self.flush("start")).await;
            }
            // Catch up before saying it is live: the events published while the cache was
            // unattended, in order (publishers still waiting for them get their acks).
            if let Some(resumed_from) = point.resume_after.filter(|_| pending > 0) {
                tracing::info!(pending, "applying the events published while the cache was unattended");
                // How long nothing may come before the agent asks whether what it waits for is
                // still there.
                let quiet = (self.config.heartbeat * 4).max(Duration::from_secs(1));
                let mut gone = None;
                let mut remaining = pending;
                while remaining > 0 {
                    let Ok(next) = tokio::time::timeout(quiet, events.next()).await else {
                        // The events it waits for may have expired, or the stream been deleted,
                        // since the consumer counted them: they would never come (soak seeds
                        // 55, 87 and 99 waited for good).
                        let mut fresh = stream.clone();
                        match fresh.info().await {
                            Ok(info) => {
                                gone = missed_events(last_sequence, stream_created_ns, StreamState::of(info));
                                if gone.is_some() {
                                    break;
                                }
                            }
                            Err(err) => tracing::warn!(error = %err, "could not read the stream while catching up; waiting on"),
                        }
                        continue;
                    };
                    match next {
                        Some(Ok(message)) => {
                            let Ok(info) = message.info() else { continue };
                            let (sequence, left) = (info.stream_sequence, info.pending);
                            let stored_ns = info.published.unix_timestamp_nanos();
                            progress.record(sequence, left, unix_ms(stored_ns));
                            if sequence > last_sequence {
                                let delivery = Delivery::Stored { sequence, stream_created_ns };
                                let answer = self.handle(&message, delivery, &mut acknowledged).await;
                                self.answer(answer).await;
                                last_sequence = sequence;
                                handled_stored_ns = handled_stored_ns.max(stored_ns);
                                progress.handled_up_to(sequence);
                                self.remember_position(sequence, stream_created_ns).await;
                            }
                            remaining = left;
                            left_in_consumer = left;
                        }
                        Some(Err(err)) => tracing::warn!(error = %err, "event consumer error while catching up; it recovers by itself"),
                        None => return Err(AgentError::ConsumerEnded),
                    }
                }
                if gone.is_none() {
                    // The consumer skips an event that expired while later ones still came: if
                    // the stream no longer holds every event since the stored position, one of
                    // this environment's may be among them. Flushing is the safe side.
                    let state = retry("read the stream after catching up", || async {
                        let mut fresh = stream.clone();
                        fresh.info().await.map(StreamState::of).map_err(|e| e.to_string())
                    })
                    .await;
                    gone = missed_events(resumed_from, stream_created_ns, state);
                }
                if let Some(gap) = gone {
                    // As a start without a position: a consumer from the stream's end first,
                    // then the flush, which covers every event up to there.
                    tracing::warn!(reason = gap.reason(), after = last_sequence, "events to catch up on are gone from the stream; flushing instead");
                    metrics::counter!("cachecast_agent_gaps_total", "env" => self.env.to_string(), "reason" => gap.reason())
                        .increment(1);
                    let (consumer, state) = retry("create the event consumer", || async {
                        let mut fresh = stream.clone();
                        let state = StreamState::of(fresh.info().await.map_err(|e| e.to_string())?);
                        let consumer = consume(&stream, &self.env, &self.id, state.last_sequence).await?;
                        Ok::<_, String>((consumer, state))
                    })
                    .await;
                    retry("flush the cache", || self.flush(gap.reason())).await;
                    events = consumer.events;
                    last_sequence = consumer.starts_after;
                    handled_stored_ns = state.last_stored_ns;
                    left_in_consumer = consumer.pending;
                    stream_created_ns = state.created_ns;
                    progress.record(last_sequence, consumer.pending, 0);
                    progress.handled_up_to(last_sequence);
                } else {
                    tracing::info!(after = last_sequence, "caught up");
                }
            }
            // Stored before the agent is visible: one killed right after it announced itself
            // must leave a position behind, or the next agent flushes instead of catching up
            // and the requests waiting for the events in between get no ack.
            self.remember_position(last_sequence, stream_created_ns).await;
            // The fast path opens before publishers see the agent, so that they wait for no
            // event it could have had at once. Every event from here on comes through the
            // consumer too.
            let fast = if self.config.fast_path {
                match self.client.subscribe(Subjects::events(&self.env)).await {
                    Ok(subscriber) => Some(subscriber),
                    Err(err) => {
                        tracing::warn!(error = %err, "could not open the fast path; every event comes through the stream");
                        None
                    }
                }
            } else {
                None
            };
            let announcement = Announcement {
                backend: self.backend.kind(),
                keyed_caches: &self.keyed_caches,
                cache: self.cache.as_ref(),
                instance: &self.instance,
                progress: progress.clone(),
            };
            let heartbeat = loop {
                match Heartbeat::announce(
                    presence.clone(),
                    &self.env,
                    &self.id,
                    &announcement,
                    self.config.heartbeat,
                )
                .await
                {
                    Ok(heartbeat) => break heartbeat,
                    Err(AnnounceError::Taken) => {
                        return Err(AgentError::IdTaken {
                            env: self.env.clone(),
                            id: self.id.clone(),
                        });
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "could not announce presence; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            // Only now may a cache of this process serve (again, if a previous agent stopped):
            // its presence is stored, so every request from here on expects it (publishers
            // read their view through to the presence bucket's last write first).
            self.backend.set_serving(true);
            self.live.store(true, Ordering::Relaxed);
            let cache = self.cache.as_ref().map_or("none", CacheId::as_str);
            tracing::info!(backend = self.backend.kind(), %cache, "agent is live");
            let (signal_tx, signals) = tokio::sync::mpsc::channel(4);
            let interval = self.config.heartbeat;
            let tracker = Arc::new(Mutex::new(Tracker::new(
                last_sequence,
                stream_created_ns,
                Instant::now(),
                interval,
            )));
            let check = ProgressCheck {
                stream: stream.clone(),
                subject: Subjects::events(&self.env),
                tracker: tracker.clone(),
                progress: progress.clone(),
                flusher: self.flusher(),
                signals: signal_tx,
                interval,
                heartbeat: self.config.heartbeat,
                max_lag: self.config.max_lag(),
            };
            let mut watchers = vec![tokio::spawn(check.run().instrument(tracing::Span::current()))];
            // A cache in the agent's process is dropped from the expected set when presence goes
            // stale; a persistent one stays expected (answered `424 unattended`).
            if self.cache.is_none() {
                watchers.push(tokio::spawn(
                    crate::watch::flush_while_presence_stale(
                        self.flusher(),
                        heartbeat.freshness(),
                        self.config.heartbeat,
                    )
                    .instrument(tracing::Span::current()),
                ));
            }
            // Caught up: from here on the live copies bring every event.
            let on_live_copies = live.is_some() && live_copies;
            let events = (left_in_consumer > 0 || !on_live_copies).then_some(events);
            let running = RunningAgent {
                agent: self,
                stream,
                events,
                live,
                live_copies,
                handled_stored_ns,
                catch_up_due: false,
                live_arrived: false,
                last_handled_at: Instant::now(),
                fast,
                acknowledged,
                last_sequence,
                stream_created_ns,
                heartbeat,
                registered,
                progress,
                signals,
                tracker,
                watchers,
            };
            Ok(running)
        }
        .instrument(span)
        .await
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for RunningAgent<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl<B: CacheBackend> RunningAgent<B> {
    pub fn id(&self) -> &AgentId {
        &self.agent.id
    }

    /// Applies events until `shutdown` resolves, then finishes the event in hand, removes
    /// the presence key and flushes pending acks. Ends early with an error when its event
    /// consumer ended, or another process took its agent id over.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", env = %self.agent.env, agent = %self.agent.id);
        async move {
            tokio::pin!(shutdown);
            let mut connection_check = tokio::time::interval(CONNECTION_CHECK);
            let statistics = self.agent.client.statistics();
            let connects = || statistics.connects.load(std::sync::atomic::Ordering::Relaxed);
            let mut resumed_at = connects();
            let mut next_repair = Instant::now();
            let mut next_restart_check = Instant::now();
            let mut ended = Ok(());
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = self.heartbeat.taken_over() => {
                        ended = Err(AgentError::IdTaken {
                            env: self.agent.env.clone(),
                            id: self.agent.id.clone(),
                        });
                        break;
                    }
                    Some(signal) = self.signals.recv() => match signal {
                        Signal::Gap(gap) => {
                            self.resume(Some(gap)).await;
                        }
                        Signal::Stalled => {
                            self.resume(None).await;
                        }
                        // A live copy may have been lost with none after it to show it: catch up.
                        // Not while a consumer delivers, nor while copies are being handled (a
                        // backlog; a lost one among them breaks the chain of the next).
                        Signal::Behind if self.events.is_none() && self.last_handled_at.elapsed() >= self.agent.config.heartbeat / 4 => {
                            if !self.live_arrived && self.live.take().is_some() {
                                tracing::warn!(subject = %Subjects::live(&self.agent.env), "no live copy of this environment's events has arrived, and the stream holds one this agent has not seen: its NATS user may not be allowed to subscribe to the subject, or the leaf link does not carry it (or the first copy was lost); a consumer delivers every event from now on");
                            } else {
                                tracing::info!(handled = self.last_sequence, "the stream holds an event this agent has not seen live; catching up");
                            }
                            self.catch_up_due = !self.resume(None).await;
                        }
                        Signal::Behind => {}
                    },
                    _ = connection_check.tick() => {
                        if Instant::now() >= next_restart_check {
                            self.agent.notice_restart().await;
                            next_restart_check = Instant::now() + self.agent.config.heartbeat;
                        }
                        if self.agent.dirty().is_some() && Instant::now() >= next_repair {
                            if let Err(err) = self.agent.repair().await {
                                tracing::warn!(%err, "the cache is still dirty");
                            }
                            next_repair = Instant::now() + REPAIR_INTERVAL;
                        }
                        if self.catch_up_due {
                            self.catch_up_due = !self.resume(None).await;
                        }
                        let now = connects();
                        // Reconnected, however briefly: the server may have restarted and lost
                        // the consumer, so resume right after the last event handled.
                        if now != resumed_at
                            && self.agent.client.connection_state() == async_nats::connection::State::Connected
                            && self.resume(None).await
                        {
                            resumed_at = now;
                        }
                    }
                    next = next_event(&mut self.events, &mut self.live, &mut self.fast) => match next {
                        Next::Fast(message) => {
                            let answer = self.agent.handle(&message, Delivery::Fast, &mut self.acknowledged).await;
                            self.agent.answer(answer).await;
                        }
                        Next::Stored(Some(Ok(message))) => {
                            let (sequence, pending, stored_ns) = match message.info() {
                                Ok(info) => {
                                    let stored_ns = info.published.unix_timestamp_nanos();
                                    self.progress.record(info.stream_sequence, info.pending, unix_ms(stored_ns));
                                    (info.stream_sequence, info.pending, stored_ns)
                                }
                                Err(err) => {
                                    self.agent.reject("no_metadata", 0, &message.subject, &err.to_string());
                                    continue;
                                }
                            };
                            if pending == 0 && self.on_live_copies() {
                                // Everything stored so far is delivered; the rest comes live.
                                self.events = None;
                                tracing::debug!(sequence, "caught up: taking the live copies again");
                            }
                            if sequence <= self.last_sequence {
                                tracing::debug!(sequence, "skipping an event already handled");
                                continue;
                            }
                            let answer = self.handle_stored(&message, sequence, stored_ns).await;
                            self.agent.answer(answer).await;
                        }
                        Next::Live(Some(message)) => self.take_live_copies(message).await,
                        Next::Live(None) => {
                            tracing::warn!("the live copies' subscription ended; a consumer delivers every event");
                            self.live = None;
                            self.catch_up_due = !self.resume(None).await;
                        }
                        Next::Stored(Some(Err(err))) => {
                            tracing::warn!(error = %err, "event consumer error; it recovers by itself");
                        }
                        Next::Stored(None) => {
                            tracing::error!("event consumer ended; stopping the agent");
                            ended = Err(AgentError::ConsumerEnded);
                            break;
                        }
                    },
                }
            }
            self.agent.live.store(false, Ordering::Relaxed);
            for watcher in self.watchers.drain(..) {
                watcher.abort();
            }
            // A cache in the service's process outlives this loop but no longer hears
            // invalidations: it stops serving before publishers stop expecting it.
            if self.agent.cache.is_none() {
                self.agent.backend.set_serving(false);
                if let Err(err) = self.agent.flush("stopped").await {
                    tracing::warn!(%err, "could not flush the cache on stop");
                }
            }
            if ended.is_ok() {
                forget_if_pod_deleted(self.registered.take(), self.agent.kube.clone()).await;
            }
            self.heartbeat.leave().await;
            cachecast_bus::flush(&self.agent.client, self.agent.bus.nats.request_timeout).await;
            tracing::info!("agent stopped");
            ended
        }
        .instrument(span)
        .await
    }
}

/// A cache that ends with its pod is forgotten when the pod is being deleted (or gone); a
/// container restart leaves it registered, and the next agent catches it up.
async fn forget_if_pod_deleted(registered: Option<Registered>, kube: Option<cachecast_kube::Kube>) {
    {
        let Some(Registered {
            store,
            key,
            pod: Some(pod),
        }) = registered
        else {
            return;
        };
        let kube = match kube {
            Some(kube) => kube,
            None => match cachecast_kube::Kube::new(&cachecast_kube::KubernetesConfig::default()) {
                Ok(kube) => kube,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot ask the Kubernetes API about this pod; its cache stays registered");
                    return;
                }
            },
        };
        match kube.pod_state(&pod).await {
            Ok(cachecast_kube::PodState::Running) => {
                tracing::info!(pod = %pod.name, "the pod stays (a container restart): its cache stays registered");
            }
            Ok(state) => match store.purge(&key).await {
                Ok(()) => {
                    tracing::info!(pod = %pod.name, ?state, "the pod is being deleted: its cache ends with it and is forgotten");
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not forget the cache of a deleted pod; publishers collect it once the pod is gone")
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "could not ask the Kubernetes API about this pod; its cache stays registered (publishers collect it once the pod is gone)")
            }
        }
    }
}

impl<B: CacheBackend> RunningAgent<B> {
    /// Whether the live copies bring events whenever no consumer is catching up.
    fn on_live_copies(&self) -> bool {
        self.live.is_some() && self.live_copies
    }

    /// Takes `first` and the live copies that already arrived behind it (at most
    /// [`MAX_ACKS_TOGETHER`]), and answers them together: the acks in hand wait for the next
    /// copy only until [`ACKS_TOGETHER_FOR`] has passed since the first, then go.
    async fn take_live_copies(&mut self, first: async_nats::Message) {
        let until = tokio::time::Instant::now() + ACKS_TOGETHER_FOR;
        // Armed at the second copy: the moment's end, and what to send the acks in hand with.
        let mut window: Option<(Pin<Box<tokio::time::Sleep>>, Client, AgentId)> = None;
        let mut answers = Vec::with_capacity(8);
        let mut next = Some(first);
        while let Some(message) = next.take() {
            if answers.is_empty() {
                answers.extend(self.take_live_copy(&message).await);
            } else {
                let (end, client, id) = window.get_or_insert_with(|| {
                    let end = Box::pin(tokio::time::sleep_until(until));
                    (end, self.agent.client.clone(), self.agent.id.clone())
                });
                // This copy's eviction (or a catch-up) may take long: not the acks in hand.
                let take = self.take_live_copy(&message);
                tokio::pin!(take);
                let in_time = tokio::select! {
                    biased;
                    answer = &mut take => Some(answer),
                    () = end.as_mut() => None,
                };
                let answer = match in_time {
                    Some(answer) => answer,
                    None => {
                        send_answers(client, id, std::mem::take(&mut answers)).await;
                        take.await
                    }
                };
                answers.extend(answer);
            }
            if answers.len() >= MAX_ACKS_TOGETHER
                || tokio::time::Instant::now() >= until
                || self.events.is_some()
            {
                break;
            }
            next = self
                .live
                .as_mut()
                .and_then(|live| live.next().now_or_never())
                .flatten();
        }
        self.agent.answer(answers).await;
    }

    /// Applies a live copy if it is the next event (returning its ack), skips it if handled,
    /// or catches up from the stream if it shows a gap.
    async fn take_live_copy(&mut self, message: &async_nats::Message) -> Option<Answer> {
        self.live_arrived = true;
        let Some(copy) = LiveCopy::of(message) else {
            self.agent.reject(
                "no_metadata",
                0,
                &message.subject,
                "a live copy without its stream sequence",
            );
            return None;
        };
        match crate::live::place(copy, self.last_sequence, self.handled_stored_ns) {
            Place::Next => {
                self.progress
                    .record(copy.sequence, 0, unix_ms(copy.stored_ns));
                self.handle_stored(message, copy.sequence, copy.stored_ns)
                    .await
            }
            Place::Handled => {
                tracing::debug!(
                    sequence = copy.sequence,
                    "skipping a live copy already handled"
                );
                None
            }
            Place::CatchUp => {
                tracing::info!(
                    sequence = copy.sequence,
                    previous = copy.previous,
                    handled = self.last_sequence,
                    "a live copy does not follow the last event handled; catching up from the stream"
                );
                self.catch_up_due = !self.resume(None).await;
                None
            }
        }
    }

    /// Applies the stored event at `sequence`, stored at `stored_ns` (from the consumer or a
    /// live copy), moves the position on to it, and returns its ack.
    async fn handle_stored(
        &mut self,
        message: &async_nats::Message,
        sequence: u64,
        stored_ns: i128,
    ) -> Option<Answer> {
        let delivery = Delivery::Stored {
            sequence,
            stream_created_ns: self.stream_created_ns,
        };
        let answer = self
            .agent
            .handle(message, delivery, &mut self.acknowledged)
            .await;
        self.last_sequence = sequence;
        self.handled_stored_ns = self.handled_stored_ns.max(stored_ns);
        self.last_handled_at = Instant::now();
        self.progress.handled_up_to(sequence);
        self.agent
            .remember_position(sequence, self.stream_created_ns)
            .await;
        answer
    }

    /// Replaces the consumer with one that starts right after the last handled event (or
    /// the progress check's scan position, past it when the environment had no events since).
    /// On live copies, that consumer only catches up: it is dropped once it delivered what
    /// the stream held. If the stream no longer holds every event since then (retention
    /// dropped some, it was created anew), or the progress check found such a gap (`forced`),
    /// the agent cannot prove it saw them all: it starts at the stream's end and flushes
    /// instead. Returns false if that failed (it is tried again on the next check).
    async fn resume(&mut self, forced: Option<Gap>) -> bool {
        let (stream, live_copies) = match self.stream.info().await {
            Ok(info) => (
                StreamState::of(info),
                cachecast_bus::republishes_live(&info.config),
            ),
            Err(err) => {
                tracing::warn!(error = %err, "could not read the stream to resume; retrying");
                return false;
            }
        };
        if self.live.is_some() && live_copies != self.live_copies {
            tracing::warn!(
                live_copies,
                "the stream's live copies were turned on or off: {}",
                if live_copies {
                    "taking them once caught up"
                } else {
                    "a consumer delivers every event"
                }
            );
        }
        self.live_copies = live_copies;
        let scanned = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .scanned_in(self.stream_created_ns);
        let position = self.last_sequence.max(scanned.unwrap_or(0));
        let gap = forced.or(missed_events(position, self.stream_created_ns, stream));
        let after = if gap.is_some() {
            stream.last_sequence
        } else {
            position
        };
        let consumer = match consume(&self.stream, &self.agent.env, &self.agent.id, after).await {
            Ok(consumer) => consumer,
            Err(err) => {
                tracing::warn!(error = %err, "could not resume the event consumer; retrying");
                return false;
            }
        };
        // The server moved the start past events it no longer holds: missed too.
        let gap = gap.or((consumer.starts_after > after).then_some(Gap::Retention));
        // Checked just now: the stream is the one the position counts in (or, after a gap, the
        // position moves to its end), so no copy stored before this look is a new event.
        self.handled_stored_ns = if gap.is_some() {
            stream.last_stored_ns
        } else {
            self.handled_stored_ns.max(stream.last_stored_ns)
        };
        self.events = (consumer.pending > 0 || !self.on_live_copies()).then_some(consumer.events);
        if let Some(gap) = gap {
            metrics::counter!("cachecast_agent_gaps_total", "env" => self.agent.env.to_string(), "reason" => gap.reason())
                .increment(1);
            tracing::warn!(
                reason = gap.reason(),
                last_handled = self.last_sequence,
                stream_first = stream.first_sequence,
                stream_last = stream.last_sequence,
                "events may have been missed; flushing the whole cache"
            );
            // From here on the consumer starts past the gap: the position moves past it too,
            // and until a flush succeeds nothing is acknowledged as applied, nor stored.
            let after = after.max(consumer.starts_after);
            self.last_sequence = after;
            self.stream_created_ns = stream.created_ns;
            self.progress.handled_up_to(after);
            self.tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reset(after, stream.created_ns, Instant::now());
            if let Err(err) = self.agent.flush(gap.reason()).await {
                self.agent.set_dirty(Some(gap.reason()));
                tracing::error!(error = %err, "flush after a gap failed; the cache stays dirty and is flushed again before anything is applied");
                return true;
            }
            self.agent.remember_position(after, stream.created_ns).await;
        } else {
            tracing::info!(after, pending = consumer.pending, "event consumer resumed");
        }
        true
    }
}

impl<B: CacheBackend> Agent<B> {
    /// Applies one event and returns its ack (for [`Self::answer`]), unless this agent refuses
    /// it, has nothing to do with it, or acknowledged it already (on the other path, or at an
    /// earlier stream sequence): then the stream's delivery only checks that a persistent
    /// cache did not restart since (its position moves on after this).
    #[must_use = "the ack goes to the publisher through `answer`"]
    async fn handle(
        &self,
        message: &async_nats::Message,
        delivery: Delivery,
        acknowledged: &mut RecentEventIds,
    ) -> Option<Answer> {
        let event = self.admit(message, delivery)?;
        let sequence = delivery.sequence();
        // Every agent of the environment receives a keyed cache's events, but publishers expect
        // only the agents that announced that cache: the others have nothing to evict and
        // nobody waits for their ack (a failure here would only flush a cache for nothing).
        if let Some(Target::Keyed(selector)) = &event.target
            && !self
                .keyed_caches
                .iter()
                .any(|c| c.as_str() == selector.cache)
        {
            tracing::debug!(sequence, cache = %selector.cache, "not serving this keyed cache: nothing to evict");
            return None;
        }
        // One event can come twice: on the fast path and from the stream, or at two stream
        // sequences (a publish retried after its first attempt was stored: events carry no
        // `Nats-Msg-Id`). It is applied and acknowledged once.
        if !acknowledged.insert(&event.event_id) {
            if let Delivery::Stored { .. } = delivery {
                tracing::debug!(sequence, event_id = %event.event_id, "applied already (on the fast path, or at an earlier sequence)");
                self.notice_restart().await;
                if let Err(err) = self.repair().await {
                    tracing::warn!(%err, "the cache is still dirty");
                }
            }
            return None;
        }
        let span = tracing::info_span!("event", request_id = %event.request_id, event_id = %event.event_id, sequence, path = delivery.path());
        cachecast_bus::trace_context::adopt_parent(&span, message.headers.as_ref());
        async {
            tracing::debug!("applying the eviction");
            let started = std::time::Instant::now();
            let (status, evicted, error) = match self.apply(&event, delivery).await {
                Ok(evicted) => {
                    tracing::info!(evicted, "eviction applied");
                    self.metrics.applied.increment(1);
                    self.metrics.evicted.increment(evicted);
                    (AckStatus::Applied, evicted, String::new())
                }
                Err(reason) => {
                    tracing::warn!(%reason, "eviction failed");
                    self.metrics.failed.increment(1);
                    (AckStatus::Failed, 0, reason)
                }
            };
            self.metrics
                .eviction_seconds
                .record(started.elapsed().as_secs_f64());
            match delivery {
                Delivery::Fast => self.metrics.via_fast_path.increment(1),
                Delivery::Stored { .. } => self.metrics.via_stream.increment(1),
            }
            let ack = Ack {
                event_id: event.event_id.clone(),
                agent_id: self.id.to_string(),
                status: status as i32,
                evicted,
                error,
                stream_sequence: sequence,
                cache_id: self
                    .cache
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
            };
            // Headers only for a trace to carry on: the publisher parses every ack.
            let mut trace = HeaderMap::new();
            cachecast_bus::trace_context::inject_current(&mut trace);
            Some(Answer {
                ack_subject: event.ack_subject,
                together: event.takes_acks_together,
                trace,
                ack,
            })
        }
        .instrument(span)
        .await
    }

    /// Sends `answers` as this agent, in order (see [`send_answers`]).
    async fn answer(&self, answers: impl IntoIterator<Item = Answer>) {
        send_answers(&self.client, &self.id, answers).await;
    }

    /// Marks a persistent cache dirty (so it is flushed) if it restarted since it was last
    /// known to hold nothing stale. Checked between events too, once a heartbeat: a Redis
    /// restarted from an old snapshot serves evicted entries again, and the next event may be
    /// hours away.
    async fn notice_restart(&self) {
        let Some(cache) = &self.cache else { return };
        match self.backend.continuity(&self.env, cache).await {
            Ok(continuity) if continuity.restarted && self.dirty().is_none() => {
                tracing::warn!(%cache, "the cache restarted and may hold evicted entries again; flushing it");
                self.set_dirty(Some("cache_restarted"));
            }
            Ok(_) => {}
            // Unreachable: the next event or look reports it.
            Err(err) => {
                tracing::debug!(error = %err, "could not check whether the cache restarted")
            }
        }
    }

    /// Flushes the whole cache if it is dirty.
    async fn repair(&self) -> Result<(), String> {
        if let Some(reason) = self.dirty() {
            self.flush(reason).await.map_err(|err| {
                format!("the cache must be flushed ({reason}) and the flush failed: {err}")
            })?;
            self.set_dirty(None);
        }
        Ok(())
    }

    /// Applies one event. A failure marks the cache dirty until a flush succeeds; so does a
    /// persistent cache that restarted since it was last known to hold nothing stale. A
    /// persistent cache whose stored position is already past a stored event had it applied
    /// by another of its agents (positions are stored only after applying, in order): it is
    /// not evicted again. The fast path's copy has no position yet, so it is always evicted.
    async fn apply(&self, event: &Invalidation, delivery: Delivery) -> Result<u64, String> {
        if let Some(cache) = &self.cache {
            match self.backend.continuity(&self.env, cache).await {
                Ok(continuity) if continuity.restarted => {
                    tracing::warn!(%cache, "the cache restarted and may hold evicted entries again; flushing it first");
                    self.set_dirty(Some("cache_restarted"));
                }
                Ok(continuity) => {
                    let applied = match delivery {
                        Delivery::Fast => false,
                        Delivery::Stored {
                            sequence,
                            stream_created_ns,
                        } => continuity.position.is_some_and(|p| {
                            p.stream_created_ns == stream_created_ns && p.sequence >= sequence
                        }),
                    };
                    if applied && self.dirty().is_none() {
                        tracing::debug!("already applied to this cache by another of its agents");
                        metrics::counter!("cachecast_agent_events_applied_elsewhere_total", "env" => self.env.to_string())
                            .increment(1);
                        return Ok(0);
                    }
                }
                Err(err) => {
                    self.set_dirty(self.dirty().or(Some("failed_eviction")));
                    return Err(err.to_string());
                }
            }
        }
        self.repair().await?;
        let result = self.evict(event).await;
        if result.is_err() {
            self.set_dirty(Some("failed_eviction"));
        }
        result
    }

    async fn evict(&self, event: &Invalidation) -> Result<u64, String> {
        let eviction = async {
            match &event.target {
                Some(Target::Response(selector)) => {
                    self.backend.evict_responses(&self.env, selector).await
                }
                Some(Target::Identity(selector)) => {
                    if selector.identity_template.is_none() && selector.identity_id.is_none() {
                        return Err(BackendError::Event(
                            "an identity eviction names neither a template nor an id".into(),
                        ));
                    }
                    self.backend.evict_identities(&self.env, selector).await
                }
                Some(Target::Keyed(selector)) => {
                    let cache = CacheName::new(selector.cache.as_str())
                        .map_err(|err| BackendError::Event(err.to_string()))?;
                    let ids = match (selector.all, selector.ids.is_empty()) {
                        (true, true) => None,
                        (false, false) => Some(selector.ids.as_slice()),
                        _ => {
                            return Err(BackendError::Event(
                                "a keyed eviction must name either ids or all, not both or neither"
                                    .into(),
                            ));
                        }
                    };
                    self.backend.evict_keyed(&self.env, &cache, ids).await
                }
                None => Err(BackendError::Event(
                    "unsupported invalidation kind: upgrade this agent".into(),
                )),
            }
        };
        match tokio::time::timeout(self.config.evict_timeout, eviction).await {
            Ok(Ok(evicted)) => Ok(evicted),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!(
                "eviction did not finish within {:?}",
                self.config.evict_timeout
            )),
        }
    }
}

/// What the event loop takes next: from the consumer, a live copy, or the fast path.
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per event and matched at once; a box would allocate per event"
)]
enum Next {
    Stored(Option<Result<jetstream::Message, jetstream::consumer::pull::OrderedError>>),
    Live(Option<async_nats::Message>),
    Fast(async_nats::Message),
}

/// The next stored event: from the consumer while there is one (live copies wait in their
/// subscription meanwhile, and those it delivered too are skipped after), else a live copy.
async fn next_stored(
    events: &mut Option<pull::Ordered>,
    live: &mut Option<async_nats::Subscriber>,
) -> Next {
    match (events, live) {
        (Some(events), _) => Next::Stored(events.next().await),
        (None, Some(live)) => Next::Live(live.next().await),
        // Neither: a catch-up that could not begin; the loop's checks start it again.
        (None, None) => std::future::pending().await,
    }
}

/// The next event from either path, neither preferred: when both are ready the choice is
/// random, so a busy fast path cannot starve the stored events, whose progress is the record.
/// Without a fast path (off, or its subscription ended), the stored events only.
async fn next_event(
    events: &mut Option<pull::Ordered>,
    live: &mut Option<async_nats::Subscriber>,
    fast: &mut Option<async_nats::Subscriber>,
) -> Next {
    let Some(subscriber) = fast else {
        return next_stored(events, live).await;
    };
    tokio::select! {
        next = next_stored(events, live) => next,
        message = subscriber.next() => match message {
            Some(message) => Next::Fast(message),
            None => {
                tracing::warn!("the fast path's subscription ended; every event comes through the stream");
                *fast = None;
                next_stored(events, live).await
            }
        },
    }
}

/// An applied (or failed) event's ack, on its way to the publisher that awaits it.
#[derive(Debug)]
struct Answer {
    /// Where the event asked for its ack.
    ack_subject: String,
    /// Its publisher takes several acks in one message.
    together: bool,
    /// The event's trace, to carry on (empty without one).
    trace: HeaderMap,
    ack: Ack,
}

/// Sends `answers` as `agent`, in order. Several to one publisher that takes acks together go
/// in one message (fewer messages for the server to route and the publisher to read, when
/// events come faster than one at a time); an ack with a trace to carry on goes alone.
async fn send_answers(client: &Client, agent: &AgentId, answers: impl IntoIterator<Item = Answer>) {
    // By publisher: the ack subject up to its event id.
    let mut together: Vec<Vec<Answer>> = Vec::new();
    for answer in answers {
        // A failure goes alone: its reason has no bound here.
        let batched = answer.together
            && answer.trace.is_empty()
            && answer.ack.status == AckStatus::Applied as i32;
        let publisher = answer.ack_subject.rsplit_once('.').map(|(p, _)| p);
        if !batched || publisher.is_none() {
            send_ack(client, agent, answer).await;
            continue;
        }
        let same = together
            .iter_mut()
            .find(|group| group[0].ack_subject.rsplit_once('.').map(|(p, _)| p) == publisher);
        match same {
            Some(group) => group.push(answer),
            None => together.push(vec![answer]),
        }
    }
    for mut group in together {
        if group.len() == 1 {
            send_ack(client, agent, group.pop().expect("one answer")).await;
            continue;
        }
        let subject = Subjects::acks_from(&group[0].ack_subject, agent)
            .expect("grouped by the publisher part of the ack subject");
        let events = group.len();
        let acks = group.into_iter().map(|a| a.ack).collect();
        let payload = cachecast_proto::Acks { acks }.to_bytes();
        if let Err(err) = client.publish(subject, payload).await {
            tracing::warn!(error = %err, events, "could not send the acks");
        }
    }
}

/// Sends one ack alone, with its trace if it has one.
async fn send_ack(client: &Client, agent: &AgentId, answer: Answer) {
    let subject = Subjects::ack_from(&answer.ack_subject, agent);
    let payload = answer.ack.to_bytes();
    let sent = if answer.trace.is_empty() {
        client.publish(subject, payload).await
    } else {
        client
            .publish_with_headers(subject, answer.trace, payload)
            .await
    };
    if let Err(err) = sent {
        tracing::warn!(error = %err, event_id = %answer.ack.event_id, "could not send the ack");
    }
}

/// At most this many acks in one message to a publisher (publishers refuse more).
const MAX_ACKS_TOGETHER: usize = cachecast_proto::MAX_ACKS_TOGETHER;
/// The acks in hand wait at most this long (from the batch's first copy) for the next copy.
const ACKS_TOGETHER_FOR: Duration = Duration::from_millis(1);

/// How often a dirty cache is flushed again while the flush keeps failing.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// How often the agent checks whether its NATS client reconnected.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// Runs `attempt` until it succeeds, logging each failure, with a capped backoff.
async fn retry<T, E, F, Fut>(what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, "could not {what}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Unix nanoseconds (a server timestamp) in Unix milliseconds.
fn unix_ms(nanos: i128) -> i64 {
    (nanos / 1_000_000) as i64
}
