//! The agent: start-up (consumer, flush, presence), the event loop, and acknowledgements.

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use cachecast_bus::{BusConfig, Client, JetStream, REQUEST_ID_HEADER};
use cachecast_proto::{
    Ack, AckStatus, AgentId, EnvId, Invalidation, ResponseSelector, Subjects, Target, Wire,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::backend::CacheBackend;
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            env: None,
            id: None,
            heartbeat: Duration::from_secs(2),
            evict_timeout: Duration::from_secs(10),
            backend: BackendKind::default(),
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
    backend: B,
}

/// An agent that is consuming, flushed and announced: publishers now expect its acks.
pub struct RunningAgent<B> {
    agent: Agent<B>,
    events: pull::Ordered,
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
            client,
            js,
            env,
            id,
            config,
            bus: bus.clone(),
            backend,
        }
    }

    pub fn id(&self) -> &AgentId {
        &self.id
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
            let events = retry("create the event consumer", || {
                consume(&stream, &self.env, DeliverPolicy::New)
            })
            .await;
            let all = ResponseSelector::default();
            let flushed = retry("flush the cache", || async {
                tokio::time::timeout(
                    self.config.evict_timeout,
                    self.backend.evict_responses(&self.env, &all),
                )
                .await
                .map_err(|_| format!("timed out after {:?}", self.config.evict_timeout))?
                .map_err(|err| err.to_string())
            })
            .await;
            tracing::info!(evicted = flushed, "cache flushed on start");
            let heartbeat = retry("announce presence", || {
                Heartbeat::announce(
                    store.clone(),
                    &self.env,
                    &self.id,
                    self.backend.kind(),
                    self.config.heartbeat,
                )
            })
            .await;
            tracing::info!(backend = self.backend.kind(), "agent is live");
            Ok(RunningAgent {
                agent: self,
                events,
                heartbeat,
            })
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
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    next = self.events.next() => match next {
                        Some(Ok(message)) => self.agent.handle(message).await,
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
            self.heartbeat.leave().await;
            if let Err(err) = self.agent.client.flush().await {
                tracing::warn!(error = %err, "could not flush pending acks");
            }
            tracing::info!("agent stopped");
        }
        .instrument(span)
        .await
    }
}

impl<B: CacheBackend> Agent<B> {
    async fn handle(&self, message: jetstream::Message) {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let event = match Invalidation::from_bytes(&message.payload) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(sequence, subject = %message.subject, error = %err, "ignoring an undecodable event");
                return;
            }
        };
        let ack_prefix = format!("cachecast.v1.{}.ack.", self.env);
        if event.env != self.env.as_str() || !event.ack_subject.starts_with(&ack_prefix) {
            tracing::warn!(sequence, env = %event.env, ack_subject = %event.ack_subject, "ignoring an event addressed outside this environment");
            return;
        }
        let request_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(REQUEST_ID_HEADER))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| event.request_id.clone());
        let span = tracing::info_span!("event", request_id = %request_id, event_id = %event.event_id, sequence);
        async {
            let (status, evicted, error) = match self.apply(&event).await {
                Ok(evicted) => {
                    tracing::info!(evicted, "eviction applied");
                    (AckStatus::Applied, evicted, String::new())
                }
                Err(reason) => {
                    tracing::warn!(%reason, "eviction failed");
                    (AckStatus::Failed, 0, reason)
                }
            };
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

    async fn apply(&self, event: &Invalidation) -> Result<u64, String> {
        let Some(Target::Response(selector)) = &event.target else {
            return Err("unsupported invalidation kind: upgrade this agent".into());
        };
        match tokio::time::timeout(
            self.config.evict_timeout,
            self.backend.evict_responses(&self.env, selector),
        )
        .await
        {
            Ok(Ok(evicted)) => Ok(evicted),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!(
                "eviction did not finish within {:?}",
                self.config.evict_timeout
            )),
        }
    }
}

/// An ordered consumer of one environment's events: every event in stream order, recreated
/// by the client from the last delivered sequence when it falls behind or the server restarts.
async fn consume(
    stream: &stream::Stream,
    env: &EnvId,
    deliver_policy: DeliverPolicy,
) -> Result<pull::Ordered, String> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: Subjects::events(env),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|err| err.to_string())?;
    consumer.messages().await.map_err(|err| err.to_string())
}

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
