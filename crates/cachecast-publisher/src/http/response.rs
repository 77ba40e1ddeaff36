//! The JSON answer to a published invalidation (`200` or `424`).
//!
//! The `_nodes` summary follows Elasticsearch's shape (`total`, `successful`, `failed`,
//! `failures` with `node_id`, `type`, `reason`); the rest follows PlainID's camelCase.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::REQUEST_ID_RESPONSE_HEADER;
use crate::outcome::{AgentOutcome, Outcome};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    request_id: &'a str,
    env_id: &'a str,
    event_id: &'a str,
    sequence: u64,
    took_ms: u64,
    #[serde(rename = "_nodes")]
    nodes: Nodes<'a>,
    agents: BTreeMap<&'a str, Agent<'a>>,
}

#[derive(Serialize)]
struct Nodes<'a> {
    total: usize,
    successful: usize,
    failed: usize,
    failures: Vec<Failure<'a>>,
}

#[derive(Serialize)]
struct Failure<'a> {
    node_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    reason: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Agent<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    evicted: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    latency_ms: f64,
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The HTTP answer to `outcome`: `200` when every expected agent confirmed, else `424`.
pub(super) fn outcome(outcome: &Outcome) -> Response {
    let (status, body) = outcome_body(outcome);
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(id) = HeaderValue::from_str(&outcome.request_id) {
        response
            .headers_mut()
            .insert(REQUEST_ID_RESPONSE_HEADER, id);
    }
    response
}

/// The status and JSON body that report `outcome`, as the HTTP API answers it.
pub fn outcome_json(outcome: &Outcome) -> (StatusCode, serde_json::Value) {
    let (status, body) = outcome_body(outcome);
    (status, serde_json::to_value(body).unwrap_or_default())
}

/// The status and body that report `outcome`.
fn outcome_body(outcome: &Outcome) -> (StatusCode, Body<'_>) {
    let failures: Vec<Failure<'_>> = outcome
        .failures()
        .map(|(id, o)| match o {
            AgentOutcome::Failed { reason, .. } => Failure {
                node_id: id.as_str(),
                kind: "eviction_failed",
                reason: reason.clone(),
            },
            AgentOutcome::TimedOut { after } => Failure {
                node_id: id.as_str(),
                kind: "timeout",
                reason: format!("no acknowledgement within {} ms", after.as_millis()),
            },
            AgentOutcome::Applied { .. } => unreachable!("failures() excludes applied agents"),
        })
        .collect();
    let agents = outcome
        .agents
        .iter()
        .map(|(id, o)| {
            let agent = match o {
                AgentOutcome::Applied { evicted, latency } => Agent {
                    status: "applied",
                    evicted: Some(*evicted),
                    error: None,
                    latency_ms: millis(*latency),
                },
                AgentOutcome::Failed { reason, latency } => Agent {
                    status: "failed",
                    evicted: None,
                    error: Some(reason),
                    latency_ms: millis(*latency),
                },
                AgentOutcome::TimedOut { after } => Agent {
                    status: "timeout",
                    evicted: None,
                    error: None,
                    latency_ms: millis(*after),
                },
            };
            (id.as_str(), agent)
        })
        .collect();
    let confirmed = failures.is_empty();
    let (status, code, message) = if confirmed {
        (StatusCode::OK, None, None)
    } else {
        let names: Vec<String> = failures
            .iter()
            .map(|f| format!("{} ({})", f.node_id, f.kind))
            .collect();
        (
            StatusCode::FAILED_DEPENDENCY,
            Some("failed_dependency"),
            Some(format!(
                "{} of {} agents did not confirm: {}; an agent that missed the event applies it when it is back, and one whose eviction failed flushes its whole cache before it confirms anything else",
                failures.len(),
                outcome.agents.len(),
                names.join(", ")
            )),
        )
    };
    let body = Body {
        status: status.as_u16(),
        code,
        message,
        request_id: &outcome.request_id,
        env_id: outcome.env.as_str(),
        event_id: &outcome.event_id,
        sequence: outcome.sequence,
        took_ms: outcome.took.as_millis() as u64,
        nodes: Nodes {
            total: outcome.agents.len(),
            successful: outcome.successful(),
            failed: failures.len(),
            failures,
        },
        agents,
    };
    (status, body)
}
