//! What one invalidation achieved, agent by agent.

use std::collections::BTreeMap;
use std::time::Duration;

use cachecast_proto::{AgentId, EnvId};

/// What one expected agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentOutcome {
    /// The agent applied the eviction.
    Applied { evicted: u64, latency: Duration },
    /// The agent could not apply the eviction.
    Failed { reason: String, latency: Duration },
    /// No answer before the deadline.
    TimedOut { after: Duration },
    /// A registered persistent cache that no live agent attended, and none came to apply the
    /// event before the deadline. `unattended_for` is how long it had been unattended when
    /// the event was published, when this publisher knows.
    Unattended {
        unattended_for: Option<Duration>,
        after: Duration,
    },
    /// Its agent announced that it cannot vouch for its cache (its consumer stalled, it cannot
    /// read the stream), so it was not waited for. It applies the event if it catches up, and
    /// flushes its cache every heartbeat meanwhile.
    Lagging { reason: String },
}

impl AgentOutcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied { .. })
    }

    /// The word every answer uses for it: `applied`, `failed`, `timeout`, `unattended` or
    /// `lagging`.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Failed { .. } => "failed",
            Self::TimedOut { .. } => "timeout",
            Self::Unattended { .. } => "unattended",
            Self::Lagging { .. } => "lagging",
        }
    }

    /// The `_nodes.failures` type of an outcome that is not applied.
    pub fn failure_type(&self) -> Option<&'static str> {
        match self {
            Self::Applied { .. } => None,
            Self::Failed { .. } => Some("eviction_failed"),
            Self::TimedOut { .. } => Some("timeout"),
            Self::Unattended { .. } => Some("unattended"),
            Self::Lagging { .. } => Some("lagging"),
        }
    }

    /// Why it is not applied, for people; `None` when it is.
    pub fn reason(&self) -> Option<String> {
        match self {
            Self::Applied { .. } => None,
            Self::Failed { reason, .. } => Some(reason.clone()),
            Self::TimedOut { after } => Some(format!(
                "no acknowledgement within {} ms",
                after.as_millis()
            )),
            Self::Unattended { unattended_for, .. } => {
                let since = match unattended_for {
                    Some(d) => format!("for {} s", d.as_secs()),
                    None => "since before this publisher started".into(),
                };
                Some(format!(
                    "no agent attends this cache (unattended {since}); the first agent to attend it applies every event it missed before it goes live; if the cache is gone for good, forget it (cachecast caches forget)"
                ))
            }
            Self::Lagging { reason } => Some(format!(
                "its agent does not vouch for it: {reason}; it flushes the cache every heartbeat until it catches up; see the agent's log and /readyz"
            )),
        }
    }

    /// Since the request started: when the answer came, or when the request stopped waiting.
    pub fn latency(&self) -> Duration {
        match self {
            Self::Applied { latency, .. } | Self::Failed { latency, .. } => *latency,
            Self::TimedOut { after } | Self::Unattended { after, .. } => *after,
            Self::Lagging { .. } => Duration::ZERO,
        }
    }
}

/// The result of one published invalidation.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    pub event_id: String,
    pub env: EnvId,
    /// The event's position in the invalidation stream.
    pub sequence: u64,
    /// Every cache expected at publish time, by node id: a live agent's id for the cache in
    /// its process, a persistent cache's id (`CacheId`, the same rule as an agent id) for a
    /// cache that outlives its agents.
    pub agents: BTreeMap<AgentId, AgentOutcome>,
    pub took: Duration,
}

impl Outcome {
    /// True when every expected agent applied the eviction (vacuously true for none).
    pub fn confirmed(&self) -> bool {
        self.agents.values().all(AgentOutcome::is_applied)
    }

    /// How many agents applied the eviction.
    pub fn successful(&self) -> usize {
        self.agents.values().filter(|o| o.is_applied()).count()
    }

    /// The agents that did not confirm, with their outcome.
    pub fn failures(&self) -> impl Iterator<Item = (&AgentId, &AgentOutcome)> {
        self.agents.iter().filter(|(_, o)| !o.is_applied())
    }
}
