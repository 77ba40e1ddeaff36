//! The agent: start-up (consumer, flush, presence), the event loop, and acknowledgements.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use cachecast_bus::{
    BusConfig, Client, JetStream, LogLimiter, REQUEST_ID_HEADER, WIRE_VERSION, WIRE_VERSION_HEADER,
};
use cachecast_proto::{
    Ack, AckStatus, AgentId, CacheName, EnvId, Invalidation, Subjects, Target, Wire,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::backend::{BackendError, CacheBackend};
use crate::presence::Heartbeat;

/// The `[agent]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The environment whose events this agent applies. Required.
    pub env: Option<EnvId>,
    /// Unique within the environment. Default: the host name and a random suffix.
    pub id: Option<AgentId>,
    /// How often presence is refreshed; publishers drop an agent after three missed beats.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The longest one eviction may take before it is reported as failed.
    #[serde(with = "humantime_serde")]
    pub evict_timeout: Duration,
    /// Which cache the agent evicts from.
    pub backend: BackendKind,
    /// Where `cachecast agent` serves /healthz, /readyz and /metrics (off when unset).
    pub admin_listen: Option<std::net::SocketAddr>,
    /// What the agent does with its cache on start.
    pub on_start: OnStart,
    /// The keyed caches of the memory backend (the Redis backend names its own in
    /// `redis.keyed_caches`).
    pub keyed_caches: Vec<CacheName>,
}

/// What an agent does with its cache when it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStart {
    /// Flush everything: nothing cached before the start survives.
    #[default]
    Flush,
    /// Carry on from the position stored next to the cache (a Redis that outlives the agent;
    /// needs a stable `agent.id`): apply every event missed since, in order. Falls back to a
    /// flush when there is no position, or the stream no longer holds every event since it.
    Resume,
}

/// The cache backends an agent process can run with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An in-process cache (for agents embedded in a Rust service, and for trying things out).
    #[default]
    Memory,
    /// The PDP response cache in Redis (see the `[redis]` section).
    Redis,
    /// A cache the agent cannot reach, evicted by calling its owner (see the `[http]` section).
    Http,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            env: None,
            id: None,
            heartbeat: Duration::from_secs(2),
            evict_timeout: Duration::from_secs(10),
            backend: BackendKind::default(),
            admin_listen: None,
            on_start: OnStart::default(),
            keyed_caches: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// The environment, or an error saying how to set it.
    pub fn env(&self) -> Result<EnvId, AgentError> {
        self.env.clone().ok_or(AgentError::MissingEnv)
    }

    /// The configured agent id, or a new default one.
    pub fn id_or_default(&self) -> AgentId {
        self.id.clone().unwrap_or_else(default_agent_id)
    }
}

/// The default agent id: the host name made subject-safe, plus a random suffix so two agents
/// on one host (or a restarted pod) never share an id.
fn default_agent_id() -> AgentId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let mut base: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    if base.is_empty() {
        base.push_str("agent");
    }
    let suffix = &cachecast_proto::new_event_id()[24..];
    AgentId::new(format!("{base}-{suffix}")).unwrap_or_else(|_| {
        AgentId::new(format!("agent-{suffix}")).expect("hex suffix is a valid id")
    })
}

/// Why an agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "agent.env is not set: pass --env, set CACHECAST_AGENT__ENV, or set env in the [agent] section"
    )]
    MissingEnv,
    #[error(transparent)]
    Bus(#[from] cachecast_bus::BusError),
}

/// An agent, configured but not started.
#[derive(Debug)]
pub struct Agent<B> {
    client: Client,
    js: JetStream,
    env: EnvId,
    id: AgentId,
    config: AgentConfig,
    bus: BusConfig,
    backend: Arc<B>,
    /// True from the moment presence is announced until shutdown begins.
    live: Arc<AtomicBool>,
    /// Set when an eviction failed: the cache may hold entries it should not, so it is
    /// flushed before anything else is acknowledged as applied.
    dirty: AtomicBool,
    /// What every ack subject of this environment starts with.
    ack_prefix: String,
    metrics: EventMetrics,
    /// Keeps a flood of refused events from flooding the log.
    log_limit: LogLimiter,
    /// The keyed caches the backend serves, read once: announced in presence, and the keyed
    /// events this agent applies.
    keyed_caches: Vec<CacheName>,
}

/// Per-event metric handles, registered once (no allocation per event).
#[derive(Debug)]
struct EventMetrics {
    applied: metrics::Counter,
    failed: metrics::Counter,
    evicted: metrics::Counter,
    eviction_seconds: metrics::Histogram,
}

impl EventMetrics {
    fn new(env: &EnvId) -> Self {
        let env = env.to_string();
        Self {
            applied: metrics::counter!("cachecast_agent_events_total", "env" => env.clone(), "outcome" => "applied"),
            failed: metrics::counter!("cachecast_agent_events_total", "env" => env.clone(), "outcome" => "failed"),
            evicted: metrics::counter!("cachecast_agent_evicted_entries_total", "env" => env.clone()),
            eviction_seconds: metrics::histogram!("cachecast_agent_eviction_seconds", "env" => env),
        }
    }
}

/// Tells whether an agent can do its job, for `/readyz`.
#[derive(Debug)]
pub struct AgentProbe<B> {
    client: Client,
    backend: Arc<B>,
    live: Arc<AtomicBool>,
}

impl<B> Clone for AgentProbe<B> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            backend: self.backend.clone(),
            live: self.live.clone(),
        }
    }
}

impl<B: CacheBackend> AgentProbe<B> {
    /// `Ok` when the agent is live, connected to NATS and its backend answers; else why not.
    pub async fn ready(&self) -> Result<(), String> {
        if !self.live.load(Ordering::Relaxed) {
            return Err("not live: starting or shutting down".into());
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
    events: pull::Ordered,
    /// The stream sequence of the last event handled; the consumer resumes after it.
    last_sequence: u64,
    /// Which stream `last_sequence` counts in (its creation time).
    stream_created_ns: i128,
    heartbeat: Heartbeat,
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
        Self {
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
            dirty: AtomicBool::new(false),
            keyed_caches: backend.keyed_caches(),
            backend: Arc::new(backend),
        }
    }

    pub fn id(&self) -> &AgentId {
        &self.id
    }

    /// A readiness probe for this agent, usable before and after it starts.
    pub fn probe(&self) -> AgentProbe<B> {
        AgentProbe {
            client: self.client.clone(),
            backend: self.backend.clone(),
            live: self.live.clone(),
        }
    }

    /// With `on_start = "resume"`, stores how far the cache is up to date. Not while it is
    /// dirty: a restart must then replay the failed event (or flush), never skip it.
    async fn remember_position(&self, sequence: u64, stream_created_ns: i128) {
        if self.config.on_start != OnStart::Resume || self.dirty.load(Ordering::Relaxed) {
            return;
        }
        let position = crate::backend::Position {
            sequence,
            stream_created_ns,
        };
        if let Err(err) = self
            .backend
            .store_position(&self.env, &self.id, position)
            .await
        {
            tracing::warn!(error = %err, "could not store the stream position; a restart will flush");
        }
    }

    /// With `on_start = "resume"`: the stream sequence to resume after, if the position stored
    /// next to the cache is usable (same stream, every event since still held).
    async fn resume_point(&self, info: &stream::Info) -> Option<u64> {
        if self.config.on_start != OnStart::Resume {
            return None;
        }
        let stored = match self.backend.load_position(&self.env, &self.id).await {
            Ok(Some(position)) => position,
            Ok(None) => {
                tracing::info!("no stored position to resume from; flushing instead");
                return None;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not read the stored position; flushing instead");
                return None;
            }
        };
        let same_stream = stored.stream_created_ns == info.created.unix_timestamp_nanos();
        let all_held = info.state.first_sequence <= stored.sequence + 1
            && stored.sequence <= info.state.last_sequence;
        if same_stream && all_held {
            tracing::info!(after = stored.sequence, "resuming from the stored position");
            Some(stored.sequence)
        } else {
            tracing::warn!(
                stored = stored.sequence,
                same_stream,
                "the stream no longer holds every event since the stored position; flushing instead"
            );
            None
        }
    }

    /// Evicts everything, bounded by `evict_timeout`, and counts it under `reason`.
    async fn flush(&self, reason: &'static str) -> Result<u64, String> {
        let evicted =
            tokio::time::timeout(self.config.evict_timeout, self.backend.flush(&self.env))
                .await
                .map_err(|_| format!("timed out after {:?}", self.config.evict_timeout))?
                .map_err(|err| err.to_string())?;
        metrics::counter!("cachecast_agent_flushes_total", "env" => self.env.to_string(), "reason" => reason)
            .increment(1);
        tracing::info!(evicted, reason, "cache flushed");
        Ok(evicted)
    }

    /// Starts the agent in the order its guarantee needs: consumer, then flush, then
    /// presence. Transient failures (NATS or the backend unreachable, the stream not created
    /// yet) are logged and retried until they pass; bound the wait from outside if needed.
    pub async fn start(self) -> Result<RunningAgent<B>, AgentError> {
        let span = tracing::info_span!("agent", env = %self.env, agent = %self.id);
        async move {
            let stream = retry("open the invalidation stream", || {
                cachecast_bus::open_stream(&self.js, &self.bus.stream)
            })
            .await;
            let store = retry("open the presence bucket", || {
                cachecast_bus::open_presence_bucket(&self.js, &self.bus.presence)
            })
            .await;
            let (info, resume_from) = retry("read the invalidation stream", || async {
                let mut fresh = stream.clone();
                let info = fresh.info().await.map_err(|e| e.to_string())?.clone();
                let resume_from = self.resume_point(&info).await;
                Ok::<_, String>((info, resume_from))
            })
            .await;
            // Resume right after the stored position, or start right after the stream's
            // current end (every event published from now on) and flush.
            let after = resume_from.unwrap_or(info.state.last_sequence);
            let events = retry("create the event consumer", || {
                consume(&stream, &self.env, &self.id, after)
            })
            .await;
            let stream_created_ns = info.created.unix_timestamp_nanos();
            if resume_from.is_none() {
                retry("flush the cache", || self.flush("start")).await;
            }
            let heartbeat = retry("announce presence", || {
                Heartbeat::announce(
                    store.clone(),
                    &self.env,
                    &self.id,
                    self.backend.kind(),
                    &self.keyed_caches,
                    self.config.heartbeat,
                )
            })
            .await;
            self.live.store(true, Ordering::Relaxed);
            tracing::info!(backend = self.backend.kind(), "agent is live");
            let running = RunningAgent {
                agent: self,
                stream,
                events,
                last_sequence: after,
                stream_created_ns,
                heartbeat,
            };
            running
                .agent
                .remember_position(after, stream_created_ns)
                .await;
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
    /// the presence key and flushes pending acks.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let span = tracing::info_span!("agent", env = %self.agent.env, agent = %self.agent.id);
        async move {
            tokio::pin!(shutdown);
            let mut connection_check = tokio::time::interval(CONNECTION_CHECK);
            let statistics = self.agent.client.statistics();
            let connects = || statistics.connects.load(std::sync::atomic::Ordering::Relaxed);
                        let mut resumed_at = connects();
            let mut next_repair = Instant::now();
            let mut next_stale_flush: Option<Instant> = None;
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                                        _ = connection_check.tick() => {
                                                let since = self.heartbeat.since_last_ok();
                        self.agent.flush_if_stale(since, &mut next_stale_flush).await;
                        if self.agent.dirty.load(Ordering::Relaxed) && Instant::now() >= next_repair {
                            if let Err(err) = self.agent.repair().await {
                                tracing::warn!(%err, "the cache is still dirty after a failed eviction");
                            }
                            next_repair = Instant::now() + REPAIR_INTERVAL;
                        }
                        let now = connects();
                        // Reconnected, however briefly: the server may have restarted and lost
                        // the consumer, so resume right after the last event handled.
                        if now != resumed_at
                            && self.agent.client.connection_state() == async_nats::connection::State::Connected
                            && self.resume().await
                        {
                            resumed_at = now;
                        }
                    }
                    next = self.events.next() => match next {
                        Some(Ok(message)) => {
                            let sequence = match message.info() {
                                Ok(info) => info.stream_sequence,
                                Err(err) => {
                                    self.agent.reject("no_metadata", 0, &message.subject, &err.to_string());
                                    continue;
                                }
                            };
                            if sequence <= self.last_sequence {
                                tracing::debug!(sequence, "skipping an event already handled");
                                continue;
                            }
                                                        self.agent.handle(message, sequence).await;
                            self.last_sequence = sequence;
                            self.agent.remember_position(sequence, self.stream_created_ns).await;
                        }
                        Some(Err(err)) => {
                            tracing::warn!(error = %err, "event consumer error; it recovers by itself");
                        }
                        None => {
                            tracing::error!("event consumer ended; stopping the agent");
                            break;
                        }
                    },
                }
            }
            self.agent.live.store(false, Ordering::Relaxed);
            self.heartbeat.leave().await;
                        cachecast_bus::flush(&self.agent.client, self.agent.bus.nats.request_timeout).await;
            tracing::info!("agent stopped");
        }
        .instrument(span)
        .await
    }
}

impl<B: CacheBackend> RunningAgent<B> {
    /// Replaces the consumer with one that starts right after the last handled event.
    /// If the stream no longer holds every event since then (retention dropped some), the
    /// agent cannot prove it saw them all: it starts at the stream's end and flushes instead.
    /// Returns false if that failed (it is tried again on the next check).
    async fn resume(&mut self) -> bool {
        let (state, state_created_ns) = match self.stream.info().await {
            Ok(info) => (info.state.clone(), info.created.unix_timestamp_nanos()),
            Err(err) => {
                tracing::warn!(error = %err, "could not read the stream to resume; retrying");
                return false;
            }
        };
        // Events dropped by retention, or a stream created anew (its sequence went back):
        // either way the agent cannot prove it saw every event since the last one it handled.
        let gap = (state.first_sequence > self.last_sequence + 1
            && state.last_sequence > self.last_sequence)
            || state.last_sequence < self.last_sequence;
        let after = if gap {
            state.last_sequence
        } else {
            self.last_sequence
        };
        let events = match consume(&self.stream, &self.agent.env, &self.agent.id, after).await {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(error = %err, "could not resume the event consumer; retrying");
                return false;
            }
        };
        self.events = events;
        if gap {
            metrics::counter!("cachecast_agent_gaps_total", "env" => self.agent.env.to_string())
                .increment(1);
            tracing::warn!(
                last_handled = self.last_sequence,
                stream_first = state.first_sequence,
                stream_last = state.last_sequence,
                "events may have been missed while disconnected; flushing the whole cache"
            );
            if let Err(err) = self.agent.flush("gap").await {
                tracing::error!(error = %err, "flush after a gap failed; retrying");
                return false;
            }
            self.last_sequence = after;
            self.stream_created_ns = state_created_ns;
            self.agent.remember_position(after, state_created_ns).await;
        } else {
            tracing::info!(after, "reconnected; event consumer resumed");
        }
        true
    }
}

impl<B: CacheBackend> Agent<B> {
    /// Counts an event this agent refuses (`reason` is a fixed word), and logs it unless
    /// too many were logged lately. Called once per stream sequence: a redelivered event is
    /// skipped before it gets here. `sequence` is 0 for a message without JetStream metadata.
    fn reject(&self, reason: &'static str, sequence: u64, subject: &str, detail: &str) {
        metrics::counter!("cachecast_agent_rejected_events_total", "env" => self.env.to_string(), "reason" => reason)
            .increment(1);
        if let Some(left_out) = self.log_limit.allow(reason) {
            tracing::warn!(
                reason,
                sequence,
                subject,
                stream = %self.bus.stream.name,
                left_out,
                error = detail,
                "ignoring an invalid event: not applied, not acknowledged (who can publish on this subject? check the NATS permissions)"
            );
        }
    }

    /// The event in `message`, if it is one this agent may apply: a wire version it speaks,
    /// decodable, addressed to its environment, with a well-formed ack subject.
    fn admit(&self, message: &jetstream::Message, sequence: u64) -> Option<Invalidation> {
        let subject = message.subject.as_str();
        if let Some(version) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(WIRE_VERSION_HEADER))
            && version.as_str() != WIRE_VERSION
        {
            let detail = format!(
                "wire version {:?}, this agent speaks {WIRE_VERSION}: upgrade it",
                version.as_str()
            );
            self.reject("unknown_version", sequence, subject, &detail);
            return None;
        }
        let event = match Invalidation::from_bytes(&message.payload) {
            Ok(event) => event,
            Err(err) => {
                self.reject(err.reason(), sequence, subject, &err.to_string());
                return None;
            }
        };
        if event.env != self.env.as_str() || !event.ack_subject.starts_with(&self.ack_prefix) {
            let detail = format!(
                "addressed to environment {:?}, ack subject {:?}",
                event.env, event.ack_subject
            );
            self.reject("wrong_env", sequence, subject, &detail);
            return None;
        }
        // The ack subject ends `<publisherId>.<eventId>`, and names this event.
        let tail = &event.ack_subject[self.ack_prefix.len()..];
        let well_formed = match tail.split_once('.') {
            Some((publisher, event_id)) => {
                is_plain_token(publisher) && is_plain_token(event_id) && event_id == event.event_id
            }
            None => false,
        };
        if !well_formed {
            let detail = format!(
                "event id {:?}, ack subject {:?}",
                event.event_id, event.ack_subject
            );
            self.reject("invalid", sequence, subject, &detail);
            return None;
        }
        Some(event)
    }

    async fn handle(&self, message: jetstream::Message, sequence: u64) {
        let Some(event) = self.admit(&message, sequence) else {
            return;
        };
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
            return;
        }
        let request_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(REQUEST_ID_HEADER))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| event.request_id.clone());
        let span = tracing::info_span!("event", request_id = %request_id, event_id = %event.event_id, sequence);
        cachecast_bus::trace_context::adopt_parent(&span, message.headers.as_ref());
        async {
            tracing::debug!("applying the eviction");
            let started = std::time::Instant::now();
            let (status, evicted, error) = match self.apply(&event).await {
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
            let ack = Ack {
                event_id: event.event_id.clone(),
                agent_id: self.id.to_string(),
                status: status as i32,
                evicted,
                error,
                stream_sequence: sequence,
            };
            let mut headers = HeaderMap::new();
            headers.insert(REQUEST_ID_HEADER, request_id.as_str());
            cachecast_bus::trace_context::inject_current(&mut headers);
            if let Err(err) = self
                .client
                .publish_with_headers(event.ack_subject.clone(), headers, ack.to_bytes())
                .await
            {
                tracing::warn!(error = %err, "could not send the ack");
            }
        }
        .instrument(span)
        .await
    }

    /// While presence writes fail, publishers stop expecting this agent after three
    /// heartbeats and answer without it, but the agent cannot hear their events: so after two
    /// failed heartbeats it flushes the whole cache, and again every heartbeat while the
    /// outage lasts (the service keeps caching meanwhile).
    async fn flush_if_stale(&self, since_last_heartbeat: Duration, next: &mut Option<Instant>) {
        let heartbeat = self.config.heartbeat;
        if since_last_heartbeat < heartbeat * 2 {
            *next = None;
            return;
        }
        if next.is_some_and(|at| Instant::now() < at) {
            return;
        }
        if next.is_none() {
            tracing::warn!(
                since = ?since_last_heartbeat,
                "presence is not being refreshed: publishers will stop expecting this agent; flushing the cache until it is back"
            );
        }
        if let Err(err) = self.flush("disconnected").await {
            tracing::warn!(%err, "could not flush while disconnected");
        }
        *next = Some(Instant::now() + heartbeat);
    }

    /// Flushes the whole cache if an earlier eviction failed.
    async fn repair(&self) -> Result<(), String> {
        if self.dirty.load(Ordering::Relaxed) {
            self.flush("failed_eviction").await.map_err(|err| {
                format!("an earlier eviction failed and flushing the cache failed too: {err}")
            })?;
            self.dirty.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Applies one event. A failure marks the cache dirty until a flush succeeds.
    async fn apply(&self, event: &Invalidation) -> Result<u64, String> {
        self.repair().await?;
        let result = self.evict(event).await;
        if result.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
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
                        return Err(BackendError::Other(
                            "an identity eviction names neither a template nor an id".into(),
                        ));
                    }
                    self.backend.evict_identities(&self.env, selector).await
                }
                Some(Target::Keyed(selector)) => {
                    let cache = CacheName::new(selector.cache.as_str())
                        .map_err(|err| BackendError::Other(err.to_string()))?;
                    let ids = match (selector.all, selector.ids.is_empty()) {
                        (true, true) => None,
                        (false, false) => Some(selector.ids.as_slice()),
                        _ => {
                            return Err(BackendError::Other(
                                "a keyed eviction must name either ids or all, not both or neither"
                                    .into(),
                            ));
                        }
                    };
                    self.backend.evict_keyed(&self.env, &cache, ids).await
                }
                None => Err(BackendError::Other(
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

/// The longest pull request of the event consumer. The server sends an idle heartbeat every
/// half of it and the client recreates a consumer that missed two, so this bounds how long a
/// consumer lost without a reconnect goes unnoticed (about 10 s; after a reconnect the agent
/// resumes at once), at the cost of one pull request per agent every 10 s and an idle
/// heartbeat every 5 s: with a thousand agents, what the server does while nothing happens.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// How often a dirty cache is flushed again while the flush keeps failing.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// How often the agent checks whether its NATS client reconnected.
const CONNECTION_CHECK: Duration = Duration::from_millis(250);

/// The name of a new event consumer of `agent`: its id (cut to 48 characters) and 64 random
/// bits, new for every consumer (the client names its replacements `<name>_<n>`).
///
/// A name matters for permissions: with a name and one filter subject, the client creates
/// the consumer on `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, a subject that carries
/// the environment, so a NATS user can be allowed to read its own environment's events only
/// (deploy/nats/accounts.conf). The random part makes the name unguessable: the other
/// consumer subjects (`MSG.NEXT`, `INFO`, `DELETE`) carry only the name, and an agent that
/// cannot list consumers cannot pull from, or delete, another agent's.
fn consumer_name(agent: &AgentId) -> String {
    let id: String = agent.as_str().chars().take(48).collect();
    let event_id = cachecast_proto::new_event_id();
    // The last 16 hex digits of a UUIDv7 are random.
    format!("{id}_{}", &event_id[event_id.len() - 16..])
}

/// An ordered consumer of one environment's events after stream sequence `after`: every
/// event in stream order, recreated by the client when it falls behind.
async fn consume(
    stream: &stream::Stream,
    env: &EnvId,
    agent: &AgentId,
    after: u64,
) -> Result<pull::Ordered, String> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            name: Some(consumer_name(agent)),
            filter_subject: Subjects::events(env),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            max_expires: PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(|err| err.to_string())?;
    consumer.messages().await.map_err(|err| err.to_string())
}

/// A non-empty subject token without wildcards or whitespace.
fn is_plain_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control())
}

/// At most one warning per kind of refused event in this interval (the rest are counted).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

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
