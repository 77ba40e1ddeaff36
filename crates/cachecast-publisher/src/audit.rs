//! The audit trail: one record per invalidation in a JetStream stream (`audit.stream`, kept
//! `audit.max_age`): who asked (the token's `sub`, or the NATS caller), what, the event and its
//! stream sequence, and the outcome with each cache that did not confirm and why. Never a token;
//! values as the caller sent them.
//!
//! Records are written after the answer is known, without delaying it: a record that cannot be
//! written is logged, not retried. Pages are read newest first, by the audit stream's sequence.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use cachecast_proto::{EnvId, Subjects, Target};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::api::answer::{AgentResult, agent_result};
use crate::outcome::Outcome;

/// One invalidation as the audit trail keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// The record's position in the audit stream: pass it as `before` for older records.
    #[serde(default)]
    pub audit_sequence: u64,
    pub request_id: String,
    pub env_id: String,
    /// The token's `sub`, or the NATS service caller; none when unknown.
    pub caller: Option<String>,
    /// What was invalidated, as sent: `{"response": {...}}`, `{"identity": {...}}` or
    /// `{"keyed": {...}}`.
    #[schema(value_type = Object)]
    pub target: Value,
    pub event_id: String,
    /// The event's position in the invalidation stream (0: nothing was published).
    pub sequence: u64,
    /// `confirmed` (200), `failed_dependency` (424) or `unavailable` (503: nothing published).
    pub outcome: String,
    pub at_unix_ms: i64,
    pub took_ms: u64,
    /// Caches expected, and how many confirmed.
    pub expected: usize,
    pub successful: usize,
    /// Each cache that did not confirm.
    pub failures: Vec<AuditFailure>,
    /// Every expected cache by node id: what it answered and when, as in the answer.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentResult>,
}

/// A cache that did not confirm.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditFailure {
    pub node_id: String,
    /// `eviction_failed`, `timeout`, `unattended` or `lagging`.
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
}

/// A page of records, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub env_id: String,
    pub records: Vec<AuditRecord>,
    /// The `before` of the next (older) page; none when this page reaches the oldest record.
    pub next_before: Option<u64>,
}

/// The target as the caller sent it.
pub(crate) fn target_json(target: &Target) -> Value {
    match target {
        Target::Response(s) => json!({ "response": {
            "scopeClientIds": s.scope_client_ids,
            "identityId": s.identity_id,
        }}),
        Target::Identity(s) => json!({ "identity": {
            "identityTemplate": s.identity_template,
            "identityId": s.identity_id,
        }}),
        Target::Keyed(s) => json!({ "keyed": {
            "cache": s.cache,
            "ids": s.ids,
            "all": s.all,
        }}),
    }
}

/// The record of an answered invalidation.
pub(crate) fn answered(outcome: &Outcome, caller: Option<&str>, target: &Target) -> AuditRecord {
    let failures: Vec<AuditFailure> = outcome
        .failures()
        .filter_map(|(id, o)| {
            Some(AuditFailure {
                node_id: id.to_string(),
                kind: o.failure_type()?.into(),
                reason: o.reason()?,
            })
        })
        .collect();
    AuditRecord {
        audit_sequence: 0,
        request_id: outcome.request_id.clone(),
        env_id: outcome.env.to_string(),
        caller: caller.map(str::to_owned),
        target: target_json(target),
        event_id: outcome.event_id.clone(),
        sequence: outcome.sequence,
        outcome: if failures.is_empty() {
            "confirmed"
        } else {
            "failed_dependency"
        }
        .into(),
        at_unix_ms: cachecast_proto::now_unix_ms(),
        took_ms: u64::try_from(outcome.took.as_millis()).unwrap_or(u64::MAX),
        expected: outcome.agents.len(),
        successful: outcome.successful(),
        failures,
        agents: outcome
            .agents
            .iter()
            .map(|(id, o)| (id.to_string(), agent_result(Some(o))))
            .collect(),
    }
}

/// The record of an invalidation that published nothing (`503`).
pub(crate) fn unavailable(
    env: &EnvId,
    request_id: &str,
    caller: Option<&str>,
    target: &Target,
    reason: String,
) -> AuditRecord {
    AuditRecord {
        audit_sequence: 0,
        request_id: request_id.to_owned(),
        env_id: env.to_string(),
        caller: caller.map(str::to_owned),
        target: target_json(target),
        event_id: String::new(),
        sequence: 0,
        outcome: "unavailable".into(),
        at_unix_ms: cachecast_proto::now_unix_ms(),
        took_ms: 0,
        expected: 0,
        successful: 0,
        failures: vec![AuditFailure {
            node_id: String::new(),
            kind: "unavailable".into(),
            reason,
        }],
        agents: BTreeMap::new(),
    }
}

/// Writes `record` in the background.
pub(crate) fn write(js: &jetstream::Context, record: AuditRecord) {
    let Ok(env) = EnvId::new(record.env_id.as_str()) else {
        return;
    };
    let Ok(payload) = serde_json::to_vec(&record) else {
        return;
    };
    let js = js.clone();
    tokio::spawn(async move {
        let written = async {
            js.publish(Subjects::audit(&env), payload.into())
                .await?
                .await
                .map(|_| ())
                .map_err(Into::into)
        };
        let result: Result<(), async_nats::Error> = written.await;
        if let Err(err) = result {
            tracing::warn!(error = %err, request_id = %record.request_id, "could not write the audit record");
        }
    });
}

/// At most this many records in a page.
pub const MAX_PAGE: usize = 500;

/// Up to `limit` records of `env` older than audit sequence `before` (all when `None`), newest
/// first. Reads windows of the stream backwards with a short-lived filtered consumer.
pub(crate) async fn page(
    stream: &mut stream::Stream,
    env: &EnvId,
    limit: usize,
    before: Option<u64>,
) -> Result<AuditPage, String> {
    let limit = limit.clamp(1, MAX_PAGE);
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let end = before.map_or(last, |b| b.saturating_sub(1).min(last));
    let mut newest_first: Vec<AuditRecord> = Vec::new();
    let mut upper = end;
    let mut window = (limit as u64 * 4).max(64);
    while newest_first.len() < limit && upper >= first && upper > 0 {
        let lower = upper.saturating_sub(window - 1).max(first).max(1);
        let mut found = read_range(stream, env, lower, upper).await?;
        found.reverse();
        newest_first.extend(found);
        if lower <= first {
            upper = 0;
        } else {
            upper = lower - 1;
        }
        window = window.saturating_mul(4);
    }
    let more = newest_first.len() > limit || upper >= first.max(1);
    newest_first.truncate(limit);
    let next_before = if more {
        newest_first.last().map(|r| r.audit_sequence)
    } else {
        None
    };
    Ok(AuditPage {
        env_id: env.to_string(),
        records: newest_first,
        next_before,
    })
}

/// The records of `env` with audit sequences in `lower..=upper`, oldest first.
async fn read_range(
    stream: &stream::Stream,
    env: &EnvId,
    lower: u64,
    upper: u64,
) -> Result<Vec<AuditRecord>, String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: Subjects::audit(env),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: lower,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut pending = consumer.cached_info().num_pending;
    let mut records = Vec::new();
    if pending == 0 {
        return Ok(records);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while pending > 0 {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .map_err(|_| "the audit stream stopped delivering".to_owned())?;
        let Some(message) = next else { break };
        let message = message.map_err(|e| e.to_string())?;
        let info = message.info().map_err(|e| e.to_string())?;
        pending = info.pending;
        let sequence = info.stream_sequence;
        if sequence > upper {
            break;
        }
        if let Ok(mut record) = serde_json::from_slice::<AuditRecord>(&message.payload) {
            record.audit_sequence = sequence;
            records.push(record);
        }
    }
    Ok(records)
}
