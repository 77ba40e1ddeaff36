//! The `[agent]` configuration section and the agent's errors.

use std::time::Duration;

use cachecast_proto::{AgentId, CacheId, CacheName, EnvId};
use serde::{Deserialize, Serialize};

/// The `[agent]` configuration section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The environment whose events this agent applies. Required.
    pub env: Option<EnvId>,
    /// Unique within the environment. Default: the host name and a random suffix.
    pub id: Option<AgentId>,
    /// The persistent cache this agent attends (a Redis, an HTTP owner's cache), shared by
    /// every agent that serves the same cache. Default: derived from the backend's address
    /// (`redis-<host>-<port>-db<n>`, `http-<host>-<port>`; a loopback host is prefixed with
    /// the machine's host name). Ignored for the memory backend, whose cache ends with the
    /// agent.
    pub cache_id: Option<CacheId>,
    /// How long the persistent cache lives: `independent` of agents and pods (forgotten by
    /// hand), or `pod`: it ends with the pod (a Redis sidecar), so the agent forgets it when
    /// the Kubernetes API says the pod is being deleted, and its default id is `pod-<uid>`.
    pub cache_lifetime: CacheLifetime,
    /// With `cache_lifetime = "pod"`: the pod's namespace, name and UID (downward API).
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// How often presence is refreshed; publishers drop an agent after three missed beats.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The longest one eviction may take before it is reported as failed.
    #[serde(with = "humantime_serde")]
    pub evict_timeout: Duration,
    /// How long the agent may stay behind its environment's events (or unable to read the
    /// stream) before it stops vouching for its cache: it then announces `lagging` (publishers
    /// answer `424 lagging` for it at once), `/readyz` answers `503`, and it flushes the cache
    /// every heartbeat until it catches up. Default: three heartbeats.
    #[serde(default, with = "humantime_serde")]
    pub max_lag: Option<Duration>,
    /// Which cache the agent evicts from.
    pub backend: BackendKind,
    /// Where `cachecast agent` serves /healthz, /readyz and /metrics (off when unset).
    pub admin_listen: Option<std::net::SocketAddr>,
    /// What the agent does with its cache on start.
    pub on_start: OnStart,
    /// The keyed caches of the memory backend (the Redis backend names its own in
    /// `redis.keyed_caches`).
    pub keyed_caches: Vec<CacheName>,
    /// Also apply each event as NATS delivers it to the environment's subject, before the
    /// stream stores it. The stored events (live copies, or the consumer) stay the record and
    /// bring whatever the fast path missed. Off by default: every agent then receives each event
    /// twice, and on the benchmark's machine that cost more than it saved from 10 agents up
    /// (docs/BENCHMARKS.md, "The fast path"). Needs the agent's NATS user to be allowed to
    /// subscribe to `cachecast.v1.<env>.inval`.
    pub fast_path: bool,
    /// Take events from the stream's live copies (`cachecast.v1.<env>.live`, one message per
    /// event once it is stored, numbered and chained to the environment's previous event),
    /// and create a consumer only to catch up: at start, after a reconnect, or when the chain
    /// shows a missed event. Off, or when the stream does not republish (a publisher that
    /// may not update it), a consumer delivers every event. Needs the agent's NATS user to
    /// be allowed to subscribe to `cachecast.v1.<env>.live` (and, at a site, the leaf link
    /// to carry it).
    pub live_events: bool,
}

/// What an agent does with its cache when it starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStart {
    /// `resume` for a persistent cache (Redis, HTTP owner), `flush` for the memory backend.
    #[default]
    Auto,
    /// Flush everything: nothing cached before the start survives.
    Flush,
    /// Carry on from the position stored in the cache (a Redis): apply every event missed
    /// since, in order, before announcing presence. Falls back to a flush when there is no
    /// position, the cache restarted, or the stream no longer holds every event since it.
    Resume,
}

/// How long a persistent cache lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheLifetime {
    /// Outlives agents and pods: stays registered until forgotten by hand.
    #[default]
    Independent,
    /// Ends with the pod the agent runs in.
    Pod,
}

impl CacheLifetime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Independent => "independent",
            Self::Pod => "pod",
        }
    }
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
            cache_id: None,
            cache_lifetime: CacheLifetime::default(),
            pod_namespace: None,
            pod_name: None,
            pod_uid: None,
            heartbeat: Duration::from_secs(2),
            evict_timeout: Duration::from_secs(10),
            max_lag: None,
            backend: BackendKind::default(),
            admin_listen: None,
            on_start: OnStart::default(),
            keyed_caches: Vec::new(),
            fast_path: false,
            live_events: true,
        }
    }
}

impl AgentConfig {
    /// The environment, or an error saying how to set it.
    pub fn env(&self) -> Result<EnvId, AgentError> {
        self.env.clone().ok_or(AgentError::MissingEnv)
    }

    /// With `cache_lifetime = "pod"`, the agent's pod; `None` for an independent cache.
    pub fn pod(&self) -> Result<Option<cachecast_kube::PodRef>, AgentError> {
        if self.cache_lifetime != CacheLifetime::Pod {
            return Ok(None);
        }
        match (&self.pod_namespace, &self.pod_name, &self.pod_uid) {
            (Some(namespace), Some(name), Some(uid)) => Ok(Some(cachecast_kube::PodRef {
                namespace: namespace.clone(),
                name: name.clone(),
                uid: uid.clone(),
            })),
            _ => Err(AgentError::PodUnknown),
        }
    }

    /// `max_lag`, or its default: three heartbeats.
    pub fn max_lag(&self) -> Duration {
        self.max_lag.unwrap_or(self.heartbeat * 3)
    }

    /// Refuses settings under which the agent could not flush its cache before publishers stop
    /// expecting it, naming the key to change.
    pub fn check(&self, bus: &cachecast_bus::BusConfig) -> Result<(), AgentError> {
        let refuse = |key: &'static str, reason: String| Err(AgentError::Setting { key, reason });
        let heartbeat = self.heartbeat;
        if heartbeat.is_zero() {
            return refuse(
                "agent.heartbeat",
                "it must be above zero (2s is the default)".into(),
            );
        }
        if self.evict_timeout.is_zero() {
            return refuse(
                "agent.evict_timeout",
                "it must be above zero (10s is the default)".into(),
            );
        }
        if bus.presence.max_age < heartbeat * 3 {
            return refuse(
                "presence.max_age",
                format!(
                    "it is {:?}, less than three heartbeats ({:?}): the presence key of a live agent could expire between two beats, and publishers would stop expecting it before it flushes its cache; raise presence.max_age (the presence bucket's max age) or lower agent.heartbeat",
                    bus.presence.max_age,
                    heartbeat * 3
                ),
            );
        }
        if self.max_lag() < heartbeat {
            return refuse(
                "agent.max_lag",
                format!(
                    "it is {:?}, less than one heartbeat ({heartbeat:?}): progress is checked once a heartbeat, so a shorter lag cannot be told from a check in between",
                    self.max_lag(),
                ),
            );
        }
        Ok(())
    }

    /// What the measured round trip to the stream's servers (`round_trip`, a WAN link to a hub
    /// included) leaves too little room for, each naming the setting to raise. Empty when every
    /// margin holds.
    ///
    /// - `nats.request_timeout`: every JetStream request (a pull, a presence write, a direct get)
    ///   takes a round trip plus the servers' own work (an R3 write waits for a replica); four
    ///   round trips leave room for that.
    /// - `agent.heartbeat`: the agent counts a presence write from when it was sent and
    ///   suspends its cache two heartbeats after the last acknowledged one, so a heartbeat must
    ///   hold the write's round trip with room to spare, or a slow link looks like an outage.
    pub fn round_trip_margins(
        &self,
        nats: &cachecast_bus::NatsConfig,
        round_trip: Duration,
    ) -> Vec<String> {
        let mut short = Vec::new();
        let needed = round_trip * 4;
        if nats.request_timeout < needed {
            short.push(format!(
                "nats.request_timeout is {:?}, less than four round trips to the stream ({needed:?}): JetStream requests will time out; raise it to at least {needed:?}",
                nats.request_timeout
            ));
        }
        if self.heartbeat < needed {
            short.push(format!(
                "agent.heartbeat is {:?}, less than four round trips to the stream ({needed:?}): presence writes may not be acknowledged in time and the agent would suspend its cache on a slow link; raise it (and presence.max_age with it) to at least {needed:?}",
                self.heartbeat
            ));
        }
        short
    }

    /// The configured agent id, or a new default one.
    pub fn id_or_default(&self) -> AgentId {
        self.id.clone().unwrap_or_else(default_agent_id)
    }
}

/// The default agent id: the host name made subject-safe, plus a random suffix so two agents
/// on one host (or a restarted pod) never share an id.
fn default_agent_id() -> AgentId {
    let mut base = token_safe(&host_name(), 100);
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
    #[error(
        "agent.cache_lifetime = \"pod\" needs agent.pod_namespace, agent.pod_name and agent.pod_uid: set them from the downward API (metadata.namespace, metadata.name, metadata.uid)"
    )]
    PodUnknown,
    #[error(transparent)]
    Kubernetes(#[from] cachecast_kube::KubeError),
    #[error(
        "the event consumer ended; check the stream and the NATS connection, then restart the agent"
    )]
    ConsumerEnded,
    #[error(
        "another live process announces agent id {id} in environment {env}: give every agent its own agent.id (or stop the other one)"
    )]
    IdTaken { env: EnvId, id: AgentId },
    #[error("{key}: {reason}")]
    Setting { key: &'static str, reason: String },
    #[error("this cache is not supported: {0}")]
    UnsupportedCache(String),
}

/// `text` cut to `max` characters, each one not allowed in an id turned into `-`.
pub(crate) fn token_safe(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(max)
        .collect()
}

/// This machine's host name (empty when unknown).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_must_fit_four_times_in_requests_and_heartbeats() {
        let agent = AgentConfig::default(); // heartbeat 2 s
        let nats = cachecast_bus::NatsConfig::default(); // request_timeout 1 s
        // A 50 ms site: every margin holds.
        assert!(
            agent
                .round_trip_margins(&nats, Duration::from_millis(50))
                .is_empty()
        );
        // A 300 ms site: requests are too short, heartbeats still fit.
        let short = agent.round_trip_margins(&nats, Duration::from_millis(300));
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(short[0].starts_with("nats.request_timeout"), "{short:?}");
        assert!(short[0].contains("1s"), "{short:?}");
        // A 600 ms link: both, each naming its setting.
        let short = agent.round_trip_margins(&nats, Duration::from_millis(600));
        assert_eq!(short.len(), 2, "{short:?}");
        assert!(short[1].starts_with("agent.heartbeat"), "{short:?}");
        // The settings the README gives 200 ms sites keep the margins up to 500 ms.
        let nats = cachecast_bus::NatsConfig {
            request_timeout: Duration::from_secs(2),
            ..cachecast_bus::NatsConfig::default()
        };
        assert!(
            agent
                .round_trip_margins(&nats, Duration::from_millis(500))
                .is_empty()
        );
        assert_eq!(
            agent
                .round_trip_margins(&nats, Duration::from_millis(501))
                .len(),
            2
        );
    }
}
