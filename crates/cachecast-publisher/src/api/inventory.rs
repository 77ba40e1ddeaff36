//! The inventory of an environment: its persistent caches and its live agents, with their
//! state and how far each is. One shape for the API (`GET /api/1.0/runtime/caches/{envId}`)
//! and the CLI (`cachecast caches --json`, `cachecast agents --json`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::membership::{KnownCache, LiveAgent};

/// Every persistent cache and live agent of an environment, as this publisher sees them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryBody {
    pub env_id: String,
    /// Registered persistent caches (Redis, an HTTP owner's), attended or not.
    pub caches: Vec<CacheView>,
    /// Live agents, with the cache each attends (none: an in-process cache).
    pub agents: Vec<AgentView>,
}

/// One persistent cache.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheView {
    pub id: String,
    pub backend: String,
    /// `attended`, `lagging` (every agent attending it announced that it cannot vouch for
    /// it) or `unattended` (no live agent: requests answer `424 unattended`).
    pub state: String,
    /// Why it is lagging.
    pub lagging: Option<String>,
    /// The live agents attending it.
    pub attended_by: Vec<String>,
    /// How long it has been unattended, when this publisher saw its last agent.
    pub unattended_for_ms: Option<u64>,
    pub keyed_caches: Vec<String>,
    /// The agent that last registered it, and when.
    pub registered_by: String,
    pub registered_at_unix_ms: i64,
    /// The stream sequence of the last event its most advanced agent handled.
    pub applied_sequence: Option<u64>,
    /// Events of the environment the stream held after that one.
    pub lag_events: Option<u64>,
    /// At most this far behind, in milliseconds.
    pub lag_ms: Option<u64>,
}

/// One live agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub id: String,
    pub backend: String,
    pub version: String,
    /// `live`, or `lagging` (it announced that it cannot vouch for its cache now).
    pub state: String,
    pub lagging: Option<String>,
    /// The persistent cache it attends; none for an in-process cache.
    pub cache_id: Option<String>,
    pub keyed_caches: Vec<String>,
    /// Since its last heartbeat.
    pub last_seen_ms: u64,
    pub applied_sequence: u64,
    pub lag_events: u64,
    pub lag_ms: u64,
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&KnownCache> for CacheView {
    fn from(c: &KnownCache) -> Self {
        let state = match (c.attended_by.is_empty(), &c.lagging) {
            (true, _) => "unattended",
            (false, Some(_)) => "lagging",
            (false, None) => "attended",
        };
        Self {
            id: c.id.to_string(),
            backend: c.backend.clone(),
            state: state.into(),
            lagging: c.lagging.clone(),
            attended_by: c.attended_by.iter().map(ToString::to_string).collect(),
            unattended_for_ms: c.unattended_for.map(millis),
            keyed_caches: c.keyed_caches.clone(),
            registered_by: c.registered_by.clone(),
            registered_at_unix_ms: c.registered_at_unix_ms,
            applied_sequence: c.progress.map(|p| p.applied_sequence),
            lag_events: c.progress.map(|p| p.lag_events),
            lag_ms: c.progress.map(|p| millis(p.lag)),
        }
    }
}

impl From<&LiveAgent> for AgentView {
    fn from(a: &LiveAgent) -> Self {
        Self {
            id: a.id.to_string(),
            backend: a.backend.clone(),
            version: a.version.clone(),
            state: if a.lagging.is_some() {
                "lagging"
            } else {
                "live"
            }
            .into(),
            lagging: a.lagging.clone(),
            cache_id: a.cache_id.as_ref().map(ToString::to_string),
            keyed_caches: a.keyed_caches.clone(),
            last_seen_ms: millis(a.last_seen),
            applied_sequence: a.progress.applied_sequence,
            lag_events: a.progress.lag_events,
            lag_ms: millis(a.progress.lag),
        }
    }
}

impl InventoryBody {
    pub fn new(env: &cachecast_proto::EnvId, caches: &[KnownCache], agents: &[LiveAgent]) -> Self {
        Self {
            env_id: env.to_string(),
            caches: caches.iter().map(CacheView::from).collect(),
            agents: agents.iter().map(AgentView::from).collect(),
        }
    }
}
