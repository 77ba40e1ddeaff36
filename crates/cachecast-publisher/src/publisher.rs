//! Publishing one invalidation and collecting its acknowledgements.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use cachecast_bus::{BusConfig, Client, JetStream, REQUEST_ID_HEADER, StreamConfig};
use cachecast_proto::{
    Ack, AckStatus, AgentId, EnvId, Invalidation, ResponseSelector, Subjects, Target, Wire,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::membership::{self, Follower, LiveAgent, Membership};
use crate::outcome::{AgentOutcome, Outcome};

/// How long [`Publisher::start`] waits for its first full view of live agents.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    #[error(transparent)]
    Bus(#[from] cachecast_bus::BusError),
    #[error("could not subscribe to acknowledgements: {0}; check the NATS connection")]
    Subscribe(String),
    #[error(
        "no complete view of live agents after {SYNC_TIMEOUT:?}: the presence bucket could not be read; check NATS and JetStream"
    )]
    MembershipNotSynced,
}

/// Why an invalidation was not published. Nothing was applied by this attempt (or, if the
/// bus took the event after all, applying it again is harmless): retrying is safe.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the message bus is unavailable: {0}; retry shortly")]
    Unavailable(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// One invalidation to publish.
#[derive(Debug, Clone)]
pub struct InvalidationRequest {
    pub env: EnvId,
    pub selector: ResponseSelector,
    /// For tracing only; never a de-duplication key.
    pub request_id: String,
    /// How long to wait for acknowledgements, counted from the start of the call.
    pub timeout: Duration,
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
    /// Requests waiting for acks, by event id.
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Received>>>,
    tasks: Vec<JoinHandle<()>>,
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
        let store = cachecast_bus::ensure_presence_bucket(&js, &bus.presence).await?;
        let id = cachecast_proto::new_publisher_id();
        let acks = client
            .subscribe(Subjects::acks_for_publisher(&id))
            .await
            .map_err(|e| PublisherError::Subscribe(e.to_string()))?;
        let membership = Membership::new();
        let follower = tokio::spawn(membership::follow(
            Follower {
                client: client.clone(),
                js: js.clone(),
                presence: bus.presence.clone(),
                store,
            },
            membership.clone(),
        ));
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
                tasks: vec![follower, demux],
            }
        });
        tokio::time::timeout(SYNC_TIMEOUT, inner.membership.wait_synced())
            .await
            .map_err(|_| PublisherError::MembershipNotSynced)?;
        tracing::info!(publisher = %inner.id, "publisher ready");
        Ok(Self { inner })
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

    /// The agents live in `env` now.
    pub fn live_agents(&self, env: &EnvId) -> Vec<LiveAgent> {
        self.inner.membership.live(env)
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
        crate::validate::request_id(&request.request_id).map_err(PublishError::Invalid)?;
        crate::validate::selector(&request.selector).map_err(PublishError::Invalid)?;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + request.timeout);
        let inner = &self.inner;
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::Unavailable("not connected to NATS".into()));
        }
        if !inner.membership.is_synced() {
            return Err(PublishError::Unavailable(
                "the view of live agents is being refreshed after a reconnect".into(),
            ));
        }
        // The expected set is fixed before publishing: an agent announces itself only after
        // its consumer exists, so every agent in this set will receive the event.
        let expected = inner.membership.live_ids(&request.env);
        let event_id = cachecast_proto::new_event_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _registration = Registration::new(inner, &event_id, tx);

        let event = Invalidation {
            event_id: event_id.clone(),
            env: request.env.to_string(),
            request_id: request.request_id.clone(),
            ack_subject: Subjects::ack(&request.env, &inner.id, &event_id),
            issued_at_unix_ms: cachecast_proto::now_unix_ms(),
            target: Some(Target::Response(request.selector.clone())),
        };
        let publish = tokio::time::timeout(inner.request_timeout, self.publish(&request, event));
        let sequence = match publish.await {
            Ok(result) => result,
            Err(_) => Err(PublishError::Unavailable(format!(
                "no publish acknowledgement within {:?}",
                inner.request_timeout
            ))),
        }
        .inspect_err(|_| {
            metrics::counter!("cachecast_invalidations_total", "env" => request.env.to_string(), "outcome" => "unavailable")
                .increment(1);
        })?;
        tracing::debug!(request_id = %request.request_id, %event_id, sequence, expected = expected.len(), "event published");

        let mut agents: BTreeMap<AgentId, Option<AgentOutcome>> =
            expected.into_iter().map(|id| (id, None)).collect();
        let mut outstanding = agents.len();
        let ack_seconds =
            metrics::histogram!("cachecast_agent_ack_seconds", "env" => request.env.to_string());
        while outstanding > 0 {
            let received = tokio::select! {
                received = rx.recv() => received,
                () = tokio::time::sleep_until(deadline) => None,
            };
            let Some((ack, at)) = received else { break };
            let Some(slot) = agents.get_mut(ack.agent_id.as_str()) else {
                tracing::debug!(agent = %ack.agent_id, %event_id, "ignoring an ack from an agent that was not expected");
                continue;
            };
            if slot.is_some() {
                continue;
            }
            let latency = at.saturating_duration_since(started);
            ack_seconds.record(latency.as_secs_f64());
            *slot = Some(match AckStatus::try_from(ack.status) {
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
            });
            outstanding -= 1;
        }
        let took = started.elapsed();
        let agents: BTreeMap<AgentId, AgentOutcome> = agents
            .into_iter()
            .map(|(id, o)| (id, o.unwrap_or(AgentOutcome::TimedOut { after: took })))
            .collect();
        let env = request.env.to_string();
        for outcome in agents.values() {
            let kind = match outcome {
                AgentOutcome::Applied { .. } => continue,
                AgentOutcome::Failed { .. } => "eviction_failed",
                AgentOutcome::TimedOut { .. } => "timeout",
            };
            metrics::counter!("cachecast_agent_failures_total", "env" => env.clone(), "type" => kind)
                .increment(1);
        }
        let result = if agents.values().all(AgentOutcome::is_applied) {
            "confirmed"
        } else {
            "failed_dependency"
        };
        metrics::counter!("cachecast_invalidations_total", "env" => env.clone(), "outcome" => result)
            .increment(1);
        metrics::histogram!("cachecast_invalidation_seconds", "env" => env, "outcome" => result)
            .record(took.as_secs_f64());
        Ok(Outcome {
            request_id: request.request_id,
            event_id,
            env: request.env,
            sequence,
            agents,
            took,
        })
    }

    /// Publishes the event to JetStream and returns its stream sequence.
    async fn publish(
        &self,
        request: &InvalidationRequest,
        event: Invalidation,
    ) -> Result<u64, PublishError> {
        let inner = &self.inner;
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID_HEADER, request.request_id.as_str());
        cachecast_bus::trace_context::inject_current(&mut headers);
        let message = PublishMessage::build()
            .payload(event.to_bytes())
            .headers(headers)
            .message_id(&event.event_id);
        let subject = Subjects::events(&request.env);
        let unavailable = |e: &dyn std::fmt::Display| PublishError::Unavailable(e.to_string());
        // Each attempt gets half the budget, so a lost acknowledgement leaves time for a retry.
        // Every attempt carries the same Nats-Msg-Id: the stream keeps one event however many
        // of them arrive.
        let attempt_budget = inner.request_timeout / 2;
        let mut recreated = false;
        loop {
            let sent = inner
                .js
                .send_publish(subject.clone(), message.clone())
                .await
                .map_err(|e| unavailable(&e))?;
            match tokio::time::timeout(attempt_budget, sent).await {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(err))
                    if err.kind()
                        == async_nats::jetstream::context::PublishErrorKind::StreamNotFound
                        && !recreated =>
                {
                    // The stream is gone (a server that lost its store): create it again.
                    tracing::warn!(stream = %inner.stream.name, "invalidation stream missing; creating it again");
                    cachecast_bus::ensure_stream(&inner.js, &inner.stream)
                        .await
                        .map_err(|e| unavailable(&e))?;
                    recreated = true;
                }
                Ok(Err(err))
                    if err.kind() != async_nats::jetstream::context::PublishErrorKind::TimedOut =>
                {
                    return Err(unavailable(&err));
                }
                // Timed out: the caller's overall bound ends the retries.
                _ => tracing::warn!(
                    event_id = %event.event_id,
                    "publish not acknowledged within {attempt_budget:?}; retrying with the same event id"
                ),
            }
        }
    }
}

/// Keeps a request registered for acks while it waits, and unregisters it on every path out.
struct Registration<'a> {
    inner: &'a Inner,
    event_id: String,
}

impl<'a> Registration<'a> {
    fn new(inner: &'a Inner, event_id: &str, tx: mpsc::UnboundedSender<Received>) -> Self {
        inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(event_id.to_owned(), tx);
        Self {
            inner,
            event_id: event_id.to_owned(),
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.event_id);
    }
}

/// Routes each ack to the request waiting for it.
async fn demux_acks(mut acks: async_nats::Subscriber, inner: std::sync::Weak<Inner>) {
    while let Some(message) = acks.next().await {
        let at = Instant::now();
        let Some(inner) = inner.upgrade() else { return };
        let ack = match Ack::from_bytes(&message.payload) {
            Ok(ack) => ack,
            Err(err) => {
                tracing::warn!(subject = %message.subject, error = %err, "ignoring an undecodable ack");
                continue;
            }
        };
        // The subject names the event; it must agree with the payload.
        if message.subject.rsplit('.').next() != Some(ack.event_id.as_str()) {
            tracing::warn!(subject = %message.subject, "ignoring an ack whose subject and event id disagree");
            continue;
        }
        let waiting = inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ack.event_id)
            .cloned();
        match waiting {
            Some(tx) => {
                let _ = tx.send((ack, at));
            }
            None => {
                tracing::debug!(event_id = %ack.event_id, agent = %ack.agent_id, "ack after its request finished")
            }
        }
    }
    tracing::error!(
        "the ack subscription ended: no request can be confirmed any more; restart the publisher"
    );
}
