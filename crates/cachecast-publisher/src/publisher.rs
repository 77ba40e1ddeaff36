//! Publishing one invalidation and collecting its acknowledgements.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use cachecast_bus::{BusConfig, Client, JetStream, LogLimiter, StreamConfig};
use cachecast_proto::{
    Ack, AckStatus, AgentId, CacheId, EnvId, Invalidation, RecentEventIds, Subjects, Target, Wire,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::membership::{
    self, ExpectedCache, Feed, Follower, KnownCache, LiveAgent, Membership, ViewBehind,
};
use crate::outcome::{AgentOutcome, Outcome};

/// How long [`Publisher::start`] waits for its first full view of live agents.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// How many finished requests are remembered, so an ack arriving after its request ended
/// (an agent slower than the deadline) is told apart from an ack for no request at all.
const FINISHED_REMEMBERED: usize = 4096;

/// At most one warning per kind of refused ack in this interval (the rest are counted).
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Bus(#[from] cachecast_bus::BusError),
    #[error("could not subscribe to acknowledgements: {0}; check the NATS connection")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error(
        "no complete view of live agents after {SYNC_TIMEOUT:?}: {waiting}; check NATS and JetStream"
    )]
    MembershipNotSynced {
        /// Which bucket was not read through, and its last failure if any.
        waiting: String,
    },
}

/// Why an invalidation was not published. Nothing was applied by this attempt (or, if the
/// bus took the event after all, applying it again is harmless): retrying is safe.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the message bus is unavailable: {0}; retry shortly")]
    Unavailable(#[from] Unavailable),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// Why the bus could not take a request now, by kind. Every kind passes: retry shortly.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("the view of live agents is being refreshed after a reconnect")]
    NotSynced,
    #[error("no publish acknowledgement within {0:?}")]
    NotAcknowledged(Duration),
    #[error("{0}")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
    #[error("{0}")]
    Stream(#[source] cachecast_bus::BusError),
    /// The caches bucket (registrations of persistent caches) did not answer.
    #[error("the caches bucket did not answer: {0}")]
    Caches(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The view could not be shown to hold the buckets' last writes for the environment.
    #[error(transparent)]
    ViewBehind(#[from] ViewBehind),
}

impl Unavailable {
    /// A fixed word for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Unavailable::NotConnected => "not_connected",
            Unavailable::NotSynced => "not_synced",
            Unavailable::NotAcknowledged(_) => "not_acknowledged",
            Unavailable::Publish(_) => "publish",
            Unavailable::Stream(_) => "stream",
            Unavailable::Caches(_) => "caches_bucket",
            Unavailable::ViewBehind(_) => "view_behind",
        }
    }
}

/// One invalidation to publish.
#[derive(Debug, Clone)]
pub struct InvalidationRequest {
    pub env: EnvId,
    /// What to evict: responses, identities, or ids of a keyed cache.
    pub target: Target,
    /// For tracing only; never a de-duplication key.
    pub request_id: String,
    /// How long to wait for acknowledgements, counted from the start of the call.
    pub timeout: Duration,
    /// Who asked (a token's `sub`, a NATS caller), for the audit trail.
    pub caller: Option<String>,
}

/// A received ack and when it arrived.
type Received = (Ack, Instant);

/// Publishes invalidations and collects acks. Cheap to clone; clones share one publisher.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    js: JetStream,
    id: String,
    stream: StreamConfig,
    /// Bounds a whole publish, retries included: the `503` comes within this.
    request_timeout: Duration,
    membership: Arc<Membership>,
    /// Requests waiting for acks, by event id: their environment and where acks go.
    pending: Mutex<HashMap<String, (EnvId, mpsc::UnboundedSender<Received>)>>,
    /// The event ids of the latest finished requests.
    finished: Mutex<RecentEventIds>,
    /// Each environment's request metrics, registered at its first request.
    request_metrics: Mutex<HashMap<EnvId, Arc<RequestMetrics>>>,
    /// Keeps a flood of refused acks from flooding the log.
    log_limit: LogLimiter,
    /// The registrations of persistent caches.
    caches: async_nats::jetstream::kv::Store,
    /// The presence bucket, asked directly about agents the view holds as gone.
    presence: async_nats::jetstream::kv::Store,
    /// The audit trail; none when its stream could not be created (the trail is off).
    audit: Option<crate::audit::Trail>,
    tasks: Vec<JoinHandle<()>>,
}

impl Inner {
    /// Counts an ack this publisher refuses (`reason` is a fixed word; `env` the environment
    /// its subject names, or `invalid`), and logs it unless too many were logged lately.
    fn reject(&self, env: &str, reason: &'static str, subject: &str, agent: &str, detail: &str) {
        metrics::counter!("cachecast_rejected_acks_total", "env" => env.to_owned(), "reason" => reason)
            .increment(1);
        if let Some(left_out) = self.log_limit.allow(reason) {
            tracing::warn!(
                reason,
                subject,
                agent,
                left_out,
                error = detail,
                "ignoring an invalid ack; no request's answer depends on it (who can publish on this subject? check the NATS permissions)"
            );
        }
    }

    /// The request metrics of `env`. Registered once: registering builds the labelled key
    /// and looks it up, which per request cost more than recording.
    fn request_metrics(&self, env: &EnvId) -> Arc<RequestMetrics> {
        let mut known = self
            .request_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(metrics) = known.get(env) {
            return metrics.clone();
        }
        let answered = |outcome: &'static str| Answered {
            count: metrics::counter!("cachecast_invalidations_total", "env" => env.to_string(), "outcome" => outcome),
            seconds: metrics::histogram!("cachecast_invalidation_seconds", "env" => env.to_string(), "outcome" => outcome),
        };
        let metrics = Arc::new(RequestMetrics {
            ack_seconds: metrics::histogram!("cachecast_agent_ack_seconds", "env" => env.to_string()),
            confirmed: answered("confirmed"),
            failed_dependency: answered("failed_dependency"),
        });
        known.insert(env.clone(), metrics.clone());
        metrics
    }
}

/// What one environment's requests record.
#[derive(Debug)]
struct RequestMetrics {
    ack_seconds: metrics::Histogram,
    confirmed: Answered,
    failed_dependency: Answered,
}

/// Requests answered with one outcome: how many, and how long they took.
#[derive(Debug)]
struct Answered {
    count: metrics::Counter,
    seconds: metrics::Histogram,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Publisher {
    /// Creates the stream and the presence bucket if needed, subscribes to this publisher's
    /// acks and reads the live agents. Returns once the view of live agents is complete.
    pub async fn start(client: Client, bus: &BusConfig) -> Result<Self, PublisherError> {
        let js = cachecast_bus::jetstream(client.clone(), &bus.nats);
        cachecast_bus::ensure_stream(&js, &bus.stream).await?;
        tracing::debug!(stream = %bus.stream.name, "the stream is there");
        let store = cachecast_bus::ensure_presence_bucket(&js, &bus.presence).await?;
        let caches = cachecast_bus::ensure_caches_bucket(&js, &bus.caches).await?;
        tracing::debug!("the presence and caches buckets are there");
        // The audit trail must not stop invalidations: without it, they go on unrecorded.
        let audit = match cachecast_bus::ensure_audit_stream(&js, &bus.audit).await {
            Ok(stream) => Some(crate::audit::Trail::start(js.clone(), stream)),
            Err(err) => {
                tracing::warn!(error = %err, "the audit trail is off: invalidations are not recorded");
                None
            }
        };
        let id = cachecast_proto::new_publisher_id();
        let acks = client
            .subscribe(Subjects::acks_for_publisher(&id))
            .await
            .map_err(PublisherError::Subscribe)?;
        tracing::debug!(publisher = %id, "subscribed to acks; reading the live agents");
        let membership = Membership::new();
        let follower = |feed, store| {
            tokio::spawn(membership::follow(
                Follower {
                    client: client.clone(),
                    js: js.clone(),
                    presence: bus.presence.clone(),
                    caches: bus.caches.clone(),
                    feed,
                    store,
                },
                membership.clone(),
            ))
        };
        let presence = store.clone();
        let followers = [
            follower(Feed::Presence, store),
            follower(Feed::Caches, caches.clone()),
            tokio::spawn(watch_unattended(
                membership.clone(),
                caches.clone(),
                bus.presence.forget_unattended_after,
            )),
            tokio::spawn(membership::read_revisions(
                membership.clone(),
                presence.stream.clone(),
                caches.stream.clone(),
                bus.nats.request_timeout,
            )),
        ];
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let demux = tokio::spawn(demux_acks(acks, weak.clone()));
            Inner {
                client,
                js,
                id,
                stream: bus.stream.clone(),
                request_timeout: bus.nats.request_timeout,
                membership,
                pending: Mutex::default(),
                finished: Mutex::new(RecentEventIds::new(FINISHED_REMEMBERED)),
                request_metrics: Mutex::default(),
                log_limit: LogLimiter::new(REJECT_LOG_INTERVAL),
                caches,
                presence,
                audit,
                tasks: followers.into_iter().chain([demux]).collect(),
            }
        });
        tokio::time::timeout(SYNC_TIMEOUT, inner.membership.wait_synced())
            .await
            .map_err(|_| PublisherError::MembershipNotSynced {
                waiting: inner.membership.why_not_synced(),
            })?;
        tracing::info!(publisher = %inner.id, "publisher ready");
        Ok(Self { inner })
    }

    /// The NATS client this publisher uses.
    pub(crate) fn client(&self) -> &Client {
        &self.inner.client
    }

    /// This publisher's id (the token acks are addressed to).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// `Ok` when this publisher can publish and knows the live agents; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err("not connected to NATS".into());
        }
        if !self.inner.membership.is_synced() {
            return Err("the view of live agents is not complete yet".into());
        }
        Ok(())
    }

    /// Waits until the audit records queued so far were written (or failed to be): records
    /// wait a few milliseconds to go out together, and a stopping process must not drop them.
    pub(crate) async fn flush_audit(&self) {
        if let Some(trail) = &self.inner.audit {
            trail.flush().await;
        }
    }

    /// Up to `limit` audit records of `env` older than audit sequence `before`, newest first.
    pub async fn invalidations(
        &self,
        env: &EnvId,
        limit: usize,
        before: Option<u64>,
    ) -> Result<crate::audit::AuditPage, String> {
        let trail = self.inner.audit.as_ref().ok_or(
            "the audit trail is off: this publisher could not create the audit stream (see its log; check its NATS permissions for audit.stream)",
        )?;
        trail.page(env, limit, before).await
    }

    /// Every environment with a live agent or a registered persistent cache.
    pub fn environments(&self) -> Vec<EnvId> {
        self.inner.membership.environments()
    }

    /// The agents live in `env` now.
    pub fn live_agents(&self, env: &EnvId) -> Vec<LiveAgent> {
        self.inner.membership.live(env)
    }

    /// The persistent caches of `env`, registered or attended, with who attends them.
    pub fn caches(&self, env: &EnvId) -> Vec<KnownCache> {
        self.inner.membership.caches(env)
    }

    /// Forgets, every `every`, the unattended caches that end with their pod whose pod is gone
    /// (a lost node, an overrun grace period: their agent had no chance to). Runs until the
    /// task is dropped.
    pub async fn collect_pod_caches(&self, kube: cachecast_kube::Kube, every: Duration) {
        let warnings = LogLimiter::new(Duration::from_secs(60));
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if !self.inner.membership.is_synced() {
                continue;
            }
            for (env, cache, pod) in self.inner.membership.unattended_pod_caches() {
                match kube.pod_state(&pod).await {
                    Ok(cachecast_kube::PodState::Gone) => {
                        match self
                            .inner
                            .caches
                            .purge(cachecast_proto::cache_key(&env, &cache))
                            .await
                        {
                            Ok(()) => {
                                metrics::counter!("cachecast_caches_forgotten_total", "env" => env.to_string(), "reason" => "pod_gone")
                                    .increment(1);
                                tracing::info!(%env, %cache, pod = %pod.name, "forgot the cache of a pod that is gone");
                            }
                            Err(err) => {
                                tracing::warn!(%env, %cache, error = %err, "could not forget the cache of a gone pod; retrying")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        if let Some(left_out) = warnings.allow("kubernetes") {
                            tracing::warn!(error = %err, left_out, "could not ask the Kubernetes API about a cache's pod");
                        }
                    }
                }
            }
        }
    }

    /// Removes the registration of a persistent cache that is gone for good (decommissioned),
    /// so requests stop expecting it. Returns whether it was registered. An agent that attends
    /// it again registers it again.
    pub async fn forget_cache(&self, env: &EnvId, cache: &CacheId) -> Result<bool, PublishError> {
        let key = cachecast_proto::cache_key(env, cache);
        let unavailable = |e| PublishError::Unavailable(Unavailable::Caches(e));
        let known = self
            .inner
            .caches
            .entry(&key)
            .await
            .map_err(|e| unavailable(e.into()))?
            .is_some_and(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
        if known {
            self.inner
                .caches
                .purge(&key)
                .await
                .map_err(|e| unavailable(e.into()))?;
            tracing::info!(%env, %cache, "cache forgotten: requests no longer expect it");
        }
        Ok(known)
    }

    /// Waits until `env` has exactly `count` live agents, or `timeout` passes; returns
    /// whether it got there.
    pub async fn wait_for_live_agents(&self, env: &EnvId, count: usize, timeout: Duration) -> bool {
        let mut changes = self.inner.membership.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.inner.membership.live_ids(env).len() == count {
                return true;
            }
            // Agents also leave by going stale, which no change announces: re-check at least
            // every 100 ms.
            let tick = (tokio::time::Instant::now() + Duration::from_millis(100)).min(deadline);
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep_until(tick) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return self.inner.membership.live_ids(env).len() == count;
            }
        }
    }

    /// Publishes one invalidation and waits for every agent live in its environment to
    /// acknowledge it, or for the request's timeout.
    pub async fn invalidate(&self, request: InvalidationRequest) -> Result<Outcome, PublishError> {
        let mut in_flight = self.begin(request).await?;
        while in_flight.next_ack().await.is_some() {}
        Ok(in_flight.finish())
    }

    /// Publishes one invalidation and returns at once with the acks still to come: for
    /// callers that show progress ([`InFlight::next_ack`]) or answer before the outcome.
    pub async fn begin(&self, request: InvalidationRequest) -> Result<InFlight, PublishError> {
        let published = match self.publish_event(&request).await {
            Ok(published) => published,
            Err(err) => {
                if let (PublishError::Unavailable(_), Some(trail)) = (&err, &self.inner.audit) {
                    let record = crate::audit::unavailable(
                        &request.env,
                        &request.request_id,
                        request.caller.as_deref(),
                        &request.target,
                        err.to_string(),
                    );
                    trail.write(&request.env, &request.request_id, &record);
                }
                return Err(err);
            }
        };
        Ok(published.in_flight(request, self.inner.audit.clone()))
    }

    /// Publishes the event of `request` and registers for its acks: the half of [`Self::begin`]
    /// that borrows the request, so an unavailable one can still be recorded.
    async fn publish_event(
        &self,
        request: &InvalidationRequest,
    ) -> Result<Published, PublishError> {
        crate::validate::request_id(&request.request_id).map_err(PublishError::Invalid)?;
        crate::validate::target(&request.target).map_err(PublishError::Invalid)?;
        let started = Instant::now();
        let deadline = started
            .checked_add(request.timeout)
            .filter(|_| !request.timeout.is_zero())
            .map(tokio::time::Instant::from_std)
            .ok_or_else(|| {
                PublishError::Invalid(format!(
                    "the timeout {:?} must be above zero and a representable duration",
                    request.timeout
                ))
            })?;
        let inner = &self.inner;
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err(Unavailable::NotConnected.into());
        }
        if !inner.membership.is_synced() {
            return Err(Unavailable::NotSynced.into());
        }
        let event_id = cachecast_proto::new_event_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let registration = Registration::new(inner.clone(), &event_id, &request.env, tx);
        let ack_subject = Subjects::ack(&request.env, &inner.id, &event_id);

        let event = Invalidation {
            event_id: event_id.clone(),
            env: request.env.to_string(),
            request_id: request.request_id.clone(),
            ack_subject: ack_subject.clone(),
            issued_at_unix_ms: cachecast_proto::now_unix_ms(),
            takes_acks_together: true,
            target: Some(request.target.clone()),
        };
        let publish = tokio::time::timeout(inner.request_timeout, self.publish(request, event));
        // While the event is published, the view is read through to the buckets' last writes
        // (`Membership::read_through`): every agent whose presence, and every cache whose
        // registration, was stored before this request came is expected.
        let read_through = inner.membership.read_through(inner.request_timeout);
        let (published, read_through) = tokio::join!(publish, read_through);
        let sequence = match published {
            Ok(result) => result,
            Err(_) => Err(Unavailable::NotAcknowledged(inner.request_timeout).into()),
        }
        // A view not shown complete is a `503` even for a stored event: its agents apply it,
        // and a retry is harmless.
        .and_then(|sequence| read_through.map(|()| sequence).map_err(|e| Unavailable::from(e).into()))
        .inspect_err(|_| {
            metrics::counter!("cachecast_invalidations_total", "env" => request.env.to_string(), "outcome" => "unavailable")
                .increment(1);
        })?;
        // The expected set is fixed once the event is stored: an agent announces itself only
        // after its consumer exists, so every agent in it receives the event, unless it
        // announced itself in the instant between the event's storing and the read-through
        // with a consumer begun after the event (it flushed after the event; its missing ack
        // is a `424` at worst). A keyed cache is cleared by the agents that serve it.
        let serving = match &request.target {
            Target::Keyed(selector) => Some(selector.cache.as_str()),
            _ => None,
        };
        inner
            .membership
            .confirm_lapsed(&request.env, &inner.presence, inner.request_timeout)
            .await;
        let expected = inner.membership.expected(&request.env, serving);
        tracing::debug!(request_id = %request.request_id, %event_id, sequence, expected = expected.len(), kind = request.target.kind(), "event published");
        let metrics = inner.request_metrics(&request.env);
        let mut nodes = Nodes::default();
        for cache in expected {
            let (id, lagging) = match cache {
                ExpectedCache::Agent { id, lagging } => (id, lagging),
                ExpectedCache::Persistent {
                    id,
                    attended,
                    unattended_for,
                    lagging,
                } => {
                    let id =
                        AgentId::new(id.as_str()).expect("agent and cache ids follow one rule");
                    nodes
                        .persistent
                        .insert(id.clone(), (!attended).then_some(unattended_for));
                    (id, lagging)
                }
            };
            // Not waited for: its agent said it cannot vouch. An ack that comes anyway counts.
            nodes
                .answers
                .insert(id, lagging.map(|reason| AgentOutcome::Lagging { reason }));
        }
        Ok(Published {
            event_id,
            sequence,
            started,
            deadline,
            nodes,
            rx,
            metrics,
            ack_subject,
            registration,
        })
    }

    /// Publishes the event to JetStream and returns its stream sequence.
    async fn publish(
        &self,
        request: &InvalidationRequest,
        event: Invalidation,
    ) -> Result<u64, PublishError> {
        let inner = &self.inner;
        // Every header is parsed by every agent: the request id is in the payload, and wire
        // version 1 is what an event without a version header is.
        let mut headers = HeaderMap::new();
        cachecast_bus::trace_context::inject_current(&mut headers);
        // No `Nats-Msg-Id`: the stream's de-duplication costs every event (the server's work,
        // and one more header on every agent's copy) to spare a rare retry. A retry whose first
        // attempt was stored after all stores the same event twice; agents apply it once (they
        // remember the event ids they acknowledged lately) and applying it twice would change
        // nothing anyway.
        let payload = event.to_bytes();
        let subject = Subjects::events(&request.env);
        // Each attempt gets half the budget, so a lost acknowledgement leaves time for a retry.
        let attempt_budget = inner.request_timeout / 2;
        let mut recreated = false;
        loop {
            let attempt = async_nats::Request::new()
                .headers(headers.clone())
                .payload(payload.clone())
                .timeout(Some(attempt_budget));
            let stored = inner.client.send_request(subject.clone(), attempt).await;
            let missing = match stored
                .map_err(publish_error)
                .and_then(|reply| stored_at(&reply.payload))
            {
                Ok(sequence) => return Ok(sequence),
                // The stream is gone (a server that lost its store).
                Err(err) if err.kind() == PublishErrorKind::StreamNotFound && !recreated => true,
                Err(err) if err.kind() != PublishErrorKind::TimedOut => {
                    return Err(Unavailable::Publish(err).into());
                }
                // Timed out: the caller's overall bound ends the retries. A missing stream
                // looks like this too while agents take the subject's events on their fast
                // path: their subscriptions are interest, so no "no responders" comes back.
                Err(_) => {
                    tracing::warn!(
                        event_id = %event.event_id,
                        "publish not acknowledged within {attempt_budget:?}; retrying with the same event id"
                    );
                    !recreated && stream_missing(&inner.js, &inner.stream.name).await
                }
            };
            if missing {
                tracing::warn!(stream = %inner.stream.name, "invalidation stream missing; creating it again");
                cachecast_bus::ensure_stream(&inner.js, &inner.stream)
                    .await
                    .map_err(Unavailable::Stream)?;
                recreated = true;
            }
        }
    }
}

/// A publish request that got no answer from the stream, as a publish error.
fn publish_error(err: async_nats::RequestError) -> async_nats::jetstream::context::PublishError {
    use async_nats::RequestErrorKind;
    let kind = match err.kind() {
        RequestErrorKind::TimedOut => PublishErrorKind::TimedOut,
        // Nothing captures the subject: no stream.
        RequestErrorKind::NoResponders => PublishErrorKind::StreamNotFound,
        _ => PublishErrorKind::Other,
    };
    async_nats::jetstream::context::PublishError::with_source(kind, err)
}

/// The stream sequence the stream's answer to a publish gives, or the error it states. Read
/// as one flat object: the client's own reading tries an ack, then an error, and costs more
/// than the rest of handling the answer.
fn stored_at(reply: &[u8]) -> Result<u64, async_nats::jetstream::context::PublishError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        seq: Option<u64>,
        error: Option<async_nats::jetstream::Error>,
    }
    let other = |source: String| {
        async_nats::jetstream::context::PublishError::with_source(PublishErrorKind::Other, source)
    };
    match serde_json::from_slice::<Stored>(reply) {
        Ok(Stored {
            error: Some(error), ..
        }) => Err(other(error.to_string())),
        Ok(Stored {
            seq: Some(sequence),
            ..
        }) => Ok(sequence),
        Ok(Stored { .. }) => Err(other("the stream's answer names no sequence".into())),
        Err(err) => Err(other(format!("the stream's answer does not read: {err}"))),
    }
}

/// Whether the server says the stream `name` does not exist (not: could not be asked).
async fn stream_missing(js: &JetStream, name: &str) -> bool {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Err(err) => matches!(err.kind(), GetStreamErrorKind::JetStream(e)
            if e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND),
        Ok(_) => false,
    }
}

/// The caches a request expects, as it fills in.
#[derive(Debug, Default)]
struct Nodes {
    answers: BTreeMap<AgentId, Option<AgentOutcome>>,
    /// The persistent caches among them; `Some` when none of their agents was live at publish
    /// time, with how long it had been unattended.
    persistent: HashMap<AgentId, Option<Option<Duration>>>,
}

/// What [`Publisher::publish_event`] hands to the [`InFlight`] it begins.
struct Published {
    event_id: String,
    sequence: u64,
    started: Instant,
    deadline: tokio::time::Instant,
    nodes: Nodes,
    rx: mpsc::UnboundedReceiver<Received>,
    metrics: Arc<RequestMetrics>,
    ack_subject: String,
    registration: Registration,
}

impl Published {
    /// The request in flight, now that its event is out.
    fn in_flight(
        self,
        request: InvalidationRequest,
        audit: Option<crate::audit::Trail>,
    ) -> InFlight {
        InFlight {
            outstanding: self.nodes.answers.values().filter(|a| a.is_none()).count(),
            agents: self.nodes.answers,
            persistent: self.nodes.persistent,
            request_id: request.request_id,
            env: request.env,
            caller: request.caller,
            target: request.target,
            audit,
            event_id: self.event_id,
            sequence: self.sequence,
            started: self.started,
            deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
            rx: self.rx,
            metrics: self.metrics,
            ack_subject: self.ack_subject,
            registration: self.registration,
        }
    }
}

/// A published invalidation whose acks are still arriving.
#[derive(Debug)]
pub struct InFlight {
    request_id: String,
    env: EnvId,
    caller: Option<String>,
    target: Target,
    /// Where the outcome is recorded, when the audit trail is on.
    audit: Option<crate::audit::Trail>,
    event_id: String,
    sequence: u64,
    started: Instant,
    /// Fires at the request's deadline: one timer for the whole request, not one per ack
    /// awaited.
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Every expected cache by node id, with its answer once it came.
    agents: BTreeMap<AgentId, Option<AgentOutcome>>,
    /// The persistent caches among them: acknowledged by any of their agents, and reported
    /// `unattended` (not `timeout`) when none was live at publish time and none answered.
    persistent: HashMap<AgentId, Option<Option<Duration>>>,
    outstanding: usize,
    rx: mpsc::UnboundedReceiver<Received>,
    metrics: Arc<RequestMetrics>,
    /// Where this event's acks arrive, for logs.
    ack_subject: String,
    /// Keeps the request registered for acks until this is dropped.
    registration: Registration,
}

impl InFlight {
    /// The request id the invalidation carries.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The event id.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The event's position in the invalidation stream.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The agents expected to acknowledge, with the answers so far (`None`: still waiting).
    pub fn agents(&self) -> &BTreeMap<AgentId, Option<AgentOutcome>> {
        &self.agents
    }

    /// Waits for the next answer of an expected agent; `None` once every expected agent
    /// answered or the deadline passed.
    pub async fn next_ack(&mut self) -> Option<(AgentId, AgentOutcome)> {
        while self.outstanding > 0 {
            // An ack already received wins over the deadline firing at the same time; one that
            // arrived after the deadline does not count.
            let received = tokio::select! {
                biased;
                received = self.rx.recv() => received,
                () = self.deadline.as_mut() => None,
            };
            let (ack, at) = received?;
            if tokio::time::Instant::from_std(at) > self.deadline.deadline() {
                return None;
            }
            // A persistent cache answers through whichever of its agents applied the event.
            let node = if ack.cache_id.is_empty() {
                ack.agent_id.as_str()
            } else {
                ack.cache_id.as_str()
            };
            let Some(id) = self.agents.get_key_value(node).map(|(id, _)| id.clone()) else {
                // An agent that joined after the expected set was fixed, or a forgery.
                self.registration.inner.reject(
                    self.env.as_str(),
                    "unexpected_agent",
                    &self.ack_subject,
                    &ack.agent_id,
                    "an ack from an agent that was not live when the event was published",
                );
                continue;
            };
            let shared = self.persistent.contains_key(&id);
            let Some(slot) = self.agents.get_mut(&id) else {
                continue;
            };
            let applied = AckStatus::try_from(ack.status) == Ok(AckStatus::Applied);
            let lagging = matches!(slot, Some(AgentOutcome::Lagging { .. }));
            if (shared || lagging) && slot.is_some() {
                // Another agent of the same cache, or an agent that said it lags: an apply
                // still counts.
                if applied && slot.as_ref().is_some_and(|o| !o.is_applied()) {
                    let latency = at.saturating_duration_since(self.started);
                    let outcome = AgentOutcome::Applied {
                        evicted: ack.evicted,
                        latency,
                    };
                    *slot = Some(outcome.clone());
                    return Some((id, outcome));
                }
                tracing::debug!(cache = %id, agent = %ack.agent_id, "another agent of this cache answered too");
                continue;
            }
            if slot.is_some() {
                self.registration.inner.reject(
                    self.env.as_str(),
                    "duplicate",
                    &self.ack_subject,
                    &ack.agent_id,
                    "a second ack from the same agent for the same event",
                );
                continue;
            }
            let latency = at.saturating_duration_since(self.started);
            self.metrics.ack_seconds.record(latency.as_secs_f64());
            let outcome = match AckStatus::try_from(ack.status) {
                Ok(AckStatus::Applied) => AgentOutcome::Applied {
                    evicted: ack.evicted,
                    latency,
                },
                Ok(AckStatus::Failed) => AgentOutcome::Failed {
                    reason: ack.error,
                    latency,
                },
                _ => AgentOutcome::Failed {
                    reason: format!("unknown ack status {}", ack.status),
                    latency,
                },
            };
            *slot = Some(outcome.clone());
            self.outstanding -= 1;
            return Some((id, outcome));
        }
        None
    }

    /// The outcome: agents that have not answered yet count as timed out. Call it after
    /// [`InFlight::next_ack`] returned `None`.
    pub fn finish(self) -> Outcome {
        let took = self.started.elapsed();
        let persistent = self.persistent;
        let agents: BTreeMap<AgentId, AgentOutcome> = self
            .agents
            .into_iter()
            .map(|(id, answer)| {
                let outcome = answer.unwrap_or_else(|| match persistent.get(&id) {
                    Some(Some(unattended_for)) => AgentOutcome::Unattended {
                        unattended_for: *unattended_for,
                        after: took,
                    },
                    _ => AgentOutcome::TimedOut { after: took },
                });
                (id, outcome)
            })
            .collect();
        for outcome in agents.values() {
            let kind = match outcome {
                AgentOutcome::Applied { .. } => continue,
                AgentOutcome::Failed { .. } => "eviction_failed",
                AgentOutcome::TimedOut { .. } => "timeout",
                AgentOutcome::Unattended { .. } => "unattended",
                AgentOutcome::Lagging { .. } => "lagging",
            };
            metrics::counter!("cachecast_agent_failures_total", "env" => self.env.to_string(), "type" => kind)
                .increment(1);
        }
        let answered = if agents.values().all(AgentOutcome::is_applied) {
            &self.metrics.confirmed
        } else {
            &self.metrics.failed_dependency
        };
        answered.count.increment(1);
        answered.seconds.record(took.as_secs_f64());
        let outcome = Outcome {
            request_id: self.request_id,
            event_id: self.event_id,
            env: self.env,
            sequence: self.sequence,
            agents,
            took,
        };
        if let Some(trail) = &self.audit {
            let record = crate::audit::answered(&outcome, self.caller.as_deref(), &self.target);
            trail.write(&outcome.env, &outcome.request_id, &record);
        }
        outcome
    }
}

/// Keeps a request registered for acks while it waits, and unregisters it on every path out.
#[derive(Debug)]
struct Registration {
    inner: Arc<Inner>,
    event_id: String,
}

impl Registration {
    fn new(
        inner: Arc<Inner>,
        event_id: &str,
        env: &EnvId,
        tx: mpsc::UnboundedSender<Received>,
    ) -> Self {
        inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(event_id.to_owned(), (env.clone(), tx));
        Self {
            inner,
            event_id: event_id.to_owned(),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Finished first: an ack routed in between is `late`, never `unknown_event`.
        self.inner
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&self.event_id);
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.event_id);
    }
}

/// Routes each ack (alone, or one of several together) to the request waiting for it. Refuses
/// (counts, logs, ignores) an ack that does not decode, whose subject and payload disagree,
/// that comes from another environment's subject than its request's, or that names no request.
async fn demux_acks(mut acks: async_nats::Subscriber, inner: std::sync::Weak<Inner>) {
    while let Some(message) = acks.next().await {
        let at = Instant::now();
        let Some(inner) = inner.upgrade() else { return };
        let subject = message.subject.as_str();
        // cachecast.v1.<env>.ack.<publisherId>.<eventId>[.<agentId>]: the subscription fixes
        // the rest. The subject names the sender, whom NATS permissions can bind to its user,
        // and the event, or `acks` for several events' acks together; the payload must agree.
        let mut tokens = subject.split('.');
        let subject_env = tokens.nth(2).and_then(|env| EnvId::new(env).ok());
        let env_label = subject_env.as_ref().map_or("invalid", EnvId::as_str);
        let (event, sender) = match (tokens.nth(2), tokens.next(), tokens.next()) {
            (event, sender, None) => (event, sender),
            // A token too many: a sender no ack can name.
            (event, _, Some(_)) => (event, Some("")),
        };
        let mismatched = |ack: &Ack| {
            let detail = format!(
                "the payload names event {:?} from agent {:?}",
                ack.event_id, ack.agent_id
            );
            inner.reject(
                env_label,
                "mismatched_subject",
                subject,
                &ack.agent_id,
                &detail,
            );
        };
        if event == Some(Subjects::ACKS_TOGETHER) {
            let acks = match cachecast_proto::Acks::from_bytes(&message.payload) {
                Ok(together) if sender.is_none_or(str::is_empty) => {
                    let detail =
                        format!("{} acks together from no named agent", together.acks.len());
                    inner.reject(env_label, "mismatched_subject", subject, "", &detail);
                    continue;
                }
                Ok(together) if together.acks.is_empty() => {
                    inner.reject(env_label, "malformed", subject, "", "no acks");
                    continue;
                }
                Ok(together) if together.acks.len() > cachecast_proto::MAX_ACKS_TOGETHER => {
                    let detail = format!(
                        "{} acks in one message, over {}",
                        together.acks.len(),
                        cachecast_proto::MAX_ACKS_TOGETHER
                    );
                    inner.reject(env_label, "oversized", subject, "", &detail);
                    continue;
                }
                Ok(together) => together.acks,
                Err(err) => {
                    inner.reject(env_label, err.reason(), subject, "", &err.to_string());
                    continue;
                }
            };
            for ack in acks {
                if sender == Some(ack.agent_id.as_str()) {
                    route_ack(&inner, subject_env.as_ref(), env_label, subject, ack, at);
                } else {
                    mismatched(&ack);
                }
            }
            continue;
        }
        let ack = match Ack::from_bytes(&message.payload) {
            Ok(ack) => ack,
            Err(err) => {
                inner.reject(env_label, err.reason(), subject, "", &err.to_string());
                continue;
            }
        };
        let agrees = event == Some(ack.event_id.as_str())
            && sender.is_none_or(|agent| agent == ack.agent_id);
        if agrees {
            route_ack(&inner, subject_env.as_ref(), env_label, subject, ack, at);
        } else {
            mismatched(&ack);
        }
    }
    tracing::error!(
        "the ack subscription ended: no request can be confirmed any more; restart the publisher"
    );
}

/// Hands `ack` (received at `at` on `subject`, of environment `subject_env`) to the request
/// waiting for it, or counts why none is.
fn route_ack(
    inner: &Inner,
    subject_env: Option<&EnvId>,
    env_label: &str,
    subject: &str,
    ack: Ack,
    at: Instant,
) {
    // Decided under the lock, so the common case clones only the sender.
    let waiting = match inner
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&ack.event_id)
    {
        Some((env, tx)) if subject_env == Some(env) => Some(Ok(tx.clone())),
        Some((env, _)) => Some(Err(env.to_string())),
        None => None,
    };
    match waiting {
        Some(Ok(tx)) => {
            let _ = tx.send((ack, at));
        }
        Some(Err(env)) => {
            let detail = format!("the event is for environment {env}");
            inner.reject(env_label, "wrong_env", subject, &ack.agent_id, &detail);
        }
        None if inner
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ack.event_id) =>
        {
            metrics::counter!("cachecast_rejected_acks_total", "env" => env_label.to_owned(), "reason" => "late")
                .increment(1);
            tracing::debug!(event_id = %ack.event_id, agent = %ack.agent_id, "ack after its request finished")
        }
        None => inner.reject(
            env_label,
            "unknown_event",
            subject,
            &ack.agent_id,
            "no request of this publisher published that event",
        ),
    }
}

/// How often unattended caches are counted (and, when configured, forgotten).
const UNATTENDED_CHECK: Duration = Duration::from_secs(5);

/// Keeps the unattended-caches gauge current and, with `presence.forget_unattended_after`,
/// forgets the caches no agent attended for that long.
async fn watch_unattended(
    membership: Arc<Membership>,
    caches: async_nats::jetstream::kv::Store,
    forget_after: Option<Duration>,
) {
    let mut tick = tokio::time::interval(UNATTENDED_CHECK);
    loop {
        tick.tick().await;
        if !membership.is_synced() {
            continue;
        }
        let membership::Unattended { expired, counts } = membership.unattended(forget_after);
        for (env, count) in counts {
            metrics::gauge!("cachecast_unattended_caches", "env" => env.to_string())
                .set(count as f64);
        }
        for (env, cache) in expired {
            match caches.purge(cachecast_proto::cache_key(&env, &cache)).await {
                Ok(()) => {
                    metrics::counter!("cachecast_caches_forgotten_total", "env" => env.to_string(), "reason" => "unattended")
                        .increment(1);
                    tracing::warn!(%env, %cache, after = ?forget_after, "forgot a cache no agent attended for presence.forget_unattended_after");
                }
                Err(err) => {
                    tracing::warn!(%env, %cache, error = %err, "could not forget an unattended cache; retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_stream_sequence_of_a_publish() {
        let stored = stored_at(br#"{"stream":"CACHECAST","seq":42,"domain":"hub"}"#);
        assert_eq!(stored.expect("stored"), 42);
    }

    #[test]
    fn a_refused_publish_says_why() {
        let refused = stored_at(
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        )
        .expect_err("refused");
        assert_eq!(refused.kind(), PublishErrorKind::Other);
        assert!(
            refused.to_string().contains("maximum messages exceeded"),
            "{refused}"
        );
    }

    #[test]
    fn an_answer_without_a_sequence_is_no_acknowledgement() {
        for odd in [&br#"{"stream":"CACHECAST"}"#[..], b"", b"not json", b"[1]"] {
            let err = stored_at(odd).expect_err("not stored");
            assert_eq!(err.kind(), PublishErrorKind::Other, "{err}");
        }
    }
}
