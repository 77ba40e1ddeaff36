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
}

impl AgentOutcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied { .. })
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
    /// Every agent that was live in the environment at publish time.
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
