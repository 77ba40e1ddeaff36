//! The JSON answers of the API: an invalidation's outcome (`200` or `424`), the `202` of an
//! asynchronous request and its status resource.
//!
//! The `_nodes` summary follows Elasticsearch's shape (`total`, `successful`, `failed`,
//! `failures` with `node_id`, `type`, `reason`); a keyed-cache answer adds Elasticsearch's
//! `cluster_name` and `nodes` (the agents that answered). The rest follows PlainID's camelCase.
//! These types are also the OpenAPI schemas, so the document cannot drift from the answers.

use std::collections::BTreeMap;

use cachecast_proto::AgentId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::outcome::{AgentOutcome, Outcome};

/// The outcome of an invalidation: every agent expected, what each answered.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeBody {
    /// The HTTP status of the answer: 200 (every expected agent confirmed) or 424.
    pub status: u16,
    /// `failed_dependency` on a 424.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// On a 424: which agents did not confirm and what that means.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub request_id: String,
    pub env_id: String,
    /// The event's id (in its payload; agents acknowledge each event id once).
    pub event_id: String,
    /// The event's position in the invalidation stream.
    pub sequence: u64,
    pub took_ms: u64,
    #[serde(rename = "_nodes")]
    pub nodes: NodesSummary,
    /// Every expected agent, by id.
    pub agents: BTreeMap<String, AgentResult>,
    /// Keyed caches only: the name of the fleet (Elasticsearch's `cluster_name`).
    #[serde(rename = "cluster_name", skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
    /// Keyed caches only: the agents that answered, by id (Elasticsearch's `nodes`).
    #[serde(rename = "nodes", skip_serializing_if = "Option::is_none")]
    pub answered: Option<BTreeMap<String, NodeInfo>>,
}

/// Elasticsearch's `_nodes` header.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodesSummary {
    pub total: usize,
    pub successful: usize,
    pub failed: usize,
    pub failures: Vec<NodeFailure>,
}

/// One agent that did not confirm.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeFailure {
    pub node_id: String,
    /// `eviction_failed`, `timeout`, `unattended` (a registered persistent cache that no
    /// live agent attended), or `lagging` (its agent announced that it cannot vouch for it).
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
}

/// One agent of a keyed-cache answer's `nodes` map.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub name: String,
}

/// What one expected agent answered, or that it has not yet.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentResult {
    /// `applied`, `failed`, `timeout`, `unattended`, `lagging`, or (while a request runs)
    /// `pending`.
    #[schema(value_type = String)]
    pub status: std::borrow::Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evicted: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since the request started; absent while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// The `202` answer of `?wait_for_completion=false`: published, acks on their way.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedBody {
    /// Always 202.
    pub status: u16,
    pub request_id: String,
    pub env_id: String,
    pub event_id: String,
    pub sequence: u64,
    /// How many agents are expected to acknowledge.
    pub expected: usize,
    /// The status resource (also the `Location` header).
    pub location: String,
}

/// The status resource of an asynchronous request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestStatusBody {
    pub request_id: String,
    pub env_id: String,
    /// `response`, `identity` or `keyed`.
    pub kind: String,
    /// `running` while acks may still arrive, then `done`.
    pub state: String,
    pub event_id: String,
    pub sequence: u64,
    pub progress: Progress,
    /// Every expected agent and its state so far.
    pub agents: BTreeMap<String, AgentResult>,
    /// Once `done`: the answer a waiting request would have got (200 or 424 in its `status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeBody>,
}

/// Counts of an asynchronous request's agents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    pub expected: usize,
    pub confirmed: usize,
    pub failed: usize,
    pub pending: usize,
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// How one agent's answer (or its absence) reads in an answer.
pub(crate) fn agent_result(outcome: Option<&AgentOutcome>) -> AgentResult {
    match outcome {
        Some(o) => AgentResult {
            status: o.status().into(),
            evicted: match o {
                AgentOutcome::Applied { evicted, .. } => Some(*evicted),
                _ => None,
            },
            error: match o {
                AgentOutcome::Failed { reason, .. } => Some(reason.clone()),
                AgentOutcome::Unattended { .. } | AgentOutcome::Lagging { .. } => o.reason(),
                _ => None,
            },
            latency_ms: Some(millis(o.latency())),
        },
        None => AgentResult {
            status: "pending".into(),
            evicted: None,
            error: None,
            latency_ms: None,
        },
    }
}

/// The body that reports `outcome`.
pub fn outcome_body(outcome: &Outcome, cluster_name: Option<&str>) -> OutcomeBody {
    let failures: Vec<NodeFailure> = outcome
        .failures()
        .filter_map(|(id, o)| {
            Some(NodeFailure {
                node_id: id.to_string(),
                kind: o.failure_type()?.into(),
                reason: o.reason()?,
            })
        })
        .collect();
    let agents = outcome
        .agents
        .iter()
        .map(|(id, o)| (id.to_string(), agent_result(Some(o))))
        .collect();
    let answered = cluster_name.map(|_| answered_nodes(&outcome.agents));
    let (status, code, message) = if failures.is_empty() {
        (200, None, None)
    } else {
        let names: Vec<String> = failures
            .iter()
            .map(|f| format!("{} ({})", f.node_id, f.kind))
            .collect();
        (
            424,
            Some("failed_dependency".to_owned()),
            Some(format!(
                "{} of {} caches did not confirm: {}; an agent that missed the event applies it when it is back (for a persistent cache, before it goes live), and one whose eviction failed flushes its whole cache before it confirms anything else",
                failures.len(),
                outcome.agents.len(),
                names.join(", ")
            )),
        )
    };
    OutcomeBody {
        status,
        code,
        message,
        request_id: outcome.request_id.clone(),
        env_id: outcome.env.to_string(),
        event_id: outcome.event_id.clone(),
        sequence: outcome.sequence,
        took_ms: outcome.took.as_millis() as u64,
        nodes: NodesSummary {
            total: outcome.agents.len(),
            successful: outcome.successful(),
            failed: failures.len(),
            failures,
        },
        agents,
        cluster_name: cluster_name.map(str::to_owned),
        answered,
    }
}

/// The agents that answered (applied or failed), as Elasticsearch's `nodes` map.
fn answered_nodes(agents: &BTreeMap<AgentId, AgentOutcome>) -> BTreeMap<String, NodeInfo> {
    agents
        .iter()
        .filter(|(_, o)| {
            !matches!(
                o,
                AgentOutcome::TimedOut { .. }
                    | AgentOutcome::Unattended { .. }
                    | AgentOutcome::Lagging { .. }
            )
        })
        .map(|(id, _)| {
            (
                id.to_string(),
                NodeInfo {
                    name: id.to_string(),
                },
            )
        })
        .collect()
}
