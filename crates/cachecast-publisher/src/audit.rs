//! The audit trail: one record per invalidation in a JetStream stream (`audit.stream`, kept
//! `audit.max_age`): who asked (the token's `sub`, or the NATS caller), what, the event and its
//! stream sequence, and the outcome with each cache that did not confirm and why. Never a token;
//! values as the caller sent them.
//!
//! Records are written after the answer is known, without delaying it, in batches: one message
//! per environment holds the records that came within a few milliseconds of each other. A
//! record that cannot be written is logged, not retried. Pages are read newest first, by place
//! in the trail (the message's stream sequence, then the record's index in it).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use cachecast_proto::{AgentId, EnvId, Subjects, Target};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::api::answer::{AgentResult, agent_result};
use crate::outcome::{AgentOutcome, Outcome};

/// One invalidation as the audit trail keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// The record's place in the trail (its message's stream sequence × 1024 + its index
    /// there): pass it as `before` for older records.
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

/// The target as the caller sent it: `{"response": {...}}`, `{"identity": {...}}` or
/// `{"keyed": {...}}`, borrowed (the shape [`AuditRecord::target`] reads back).
#[derive(Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
enum TargetView<'a> {
    Response {
        scope_client_ids: &'a [String],
        identity_id: &'a Option<String>,
    },
    Identity {
        identity_template: &'a Option<String>,
        identity_id: &'a Option<String>,
    },
    Keyed {
        cache: &'a str,
        ids: &'a [String],
        all: bool,
    },
}

impl<'a> From<&'a Target> for TargetView<'a> {
    fn from(target: &'a Target) -> Self {
        match target {
            Target::Response(s) => Self::Response {
                scope_client_ids: &s.scope_client_ids,
                identity_id: &s.identity_id,
            },
            Target::Identity(s) => Self::Identity {
                identity_template: &s.identity_template,
                identity_id: &s.identity_id,
            },
            Target::Keyed(s) => Self::Keyed {
                cache: &s.cache,
                ids: &s.ids,
                all: s.all,
            },
        }
    }
}

/// The record of an answered invalidation, written straight from its outcome (no copy of
/// every cache's answer on the way: at a thousand caches that copy cost more than the rest of
/// the request); read back as an [`AuditRecord`].
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Answered<'a> {
    request_id: &'a str,
    env_id: &'a str,
    caller: Option<&'a str>,
    target: TargetView<'a>,
    event_id: &'a str,
    sequence: u64,
    outcome: &'static str,
    at_unix_ms: i64,
    took_ms: u64,
    expected: usize,
    successful: usize,
    failures: Vec<AuditFailure>,
    #[serde(serialize_with = "answers")]
    agents: &'a BTreeMap<AgentId, AgentOutcome>,
}

fn answers<S: serde::Serializer>(
    agents: &BTreeMap<AgentId, AgentOutcome>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(
        agents
            .iter()
            .map(|(id, o)| (id.as_str(), agent_result(Some(o)))),
    )
}

/// The record of an answered invalidation.
pub(crate) fn answered<'a>(
    outcome: &'a Outcome,
    caller: Option<&'a str>,
    target: &'a Target,
) -> Answered<'a> {
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
    Answered {
        request_id: &outcome.request_id,
        env_id: outcome.env.as_str(),
        caller,
        target: target.into(),
        event_id: &outcome.event_id,
        sequence: outcome.sequence,
        outcome: if failures.is_empty() {
            "confirmed"
        } else {
            "failed_dependency"
        },
        at_unix_ms: cachecast_proto::now_unix_ms(),
        took_ms: u64::try_from(outcome.took.as_millis()).unwrap_or(u64::MAX),
        expected: outcome.agents.len(),
        successful: outcome.successful(),
        failures,
        agents: &outcome.agents,
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
        target: serde_json::to_value(TargetView::from(target)).unwrap_or_default(),
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

/// About the size of one cache's record, so that most records are written without growing.
const RECORD_BYTES: usize = 512;
/// Records wait this long at most for others to go out in the same message.
const LINGER: Duration = Duration::from_millis(5);
/// At most this many records in one message. A record's place in the trail (its
/// `auditSequence`) is its message's stream sequence times this, plus its index there.
pub(crate) const PER_MESSAGE: u64 = 1024;
/// A message holds records up to about this many bytes (servers take 1 MiB by default).
const MESSAGE_BYTES: usize = 256 * 1024;
/// Records waiting beyond this many are dropped and logged: a trail that cannot keep up
/// (its stream does not answer) must not hold the publisher's memory without bound.
const QUEUE: usize = 100_000;

#[derive(Debug)]
enum Command {
    /// A record of `env`, as JSON.
    Record(EnvId, Vec<u8>),
    /// Answered once every record sent before it was written (or failed).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The audit trail of one publisher: its stream, and the task that writes records into it in
/// the background, without delaying any answer. Records that come together go out together:
/// one message per environment holds every record waiting (a publish per batch, not per
/// invalidation). A record that cannot be written is logged, not retried.
#[derive(Debug, Clone)]
pub(crate) struct Trail {
    /// Shared: a trail is cloned into every request in flight.
    stream: std::sync::Arc<stream::Stream>,
    records: tokio::sync::mpsc::Sender<Command>,
    /// A trail that fell behind would otherwise log every request.
    dropped_log: std::sync::Arc<cachecast_bus::LogLimiter>,
}

impl Trail {
    /// Starts the writer; it ends once every `Trail` is dropped and what waits is written.
    pub(crate) fn start(js: jetstream::Context, stream: stream::Stream) -> Self {
        let (records, rx) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(write_batches(js, rx));
        Self {
            stream: std::sync::Arc::new(stream),
            records,
            dropped_log: std::sync::Arc::new(cachecast_bus::LogLimiter::new(Duration::from_secs(
                10,
            ))),
        }
    }

    /// Queues `record` (of `request_id` in `env`) to be written.
    pub(crate) fn write(&self, env: &EnvId, request_id: &str, record: &impl Serialize) {
        let mut json = Vec::with_capacity(RECORD_BYTES);
        if let Err(err) = serde_json::to_writer(&mut json, record) {
            tracing::warn!(error = %err, %request_id, "could not write the audit record");
            return;
        }
        if self
            .records
            .try_send(Command::Record(env.clone(), json))
            .is_err()
            && let Some(left_out) = self.dropped_log.allow("behind")
        {
            tracing::warn!(%request_id, left_out, "the audit trail is {QUEUE} records behind its stream: this record is dropped (is the audit stream reachable?)");
        }
    }

    /// Waits until every record queued so far was written (or failed).
    pub(crate) async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.records.send(Command::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Up to `limit` records of `env` older than `before` (all when `None`), newest first.
    /// This publisher's own records queued so far are in it.
    pub(crate) async fn page(
        &self,
        env: &EnvId,
        limit: usize,
        before: Option<u64>,
    ) -> Result<AuditPage, String> {
        self.flush().await;
        page(&mut stream::Stream::clone(&self.stream), env, limit, before).await
    }
}

async fn write_batches(js: jetstream::Context, mut commands: tokio::sync::mpsc::Receiver<Command>) {
    let mut batch: Vec<(EnvId, Vec<u8>)> = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = commands.recv().await {
        // The first record waits out the linger, and what came meanwhile goes with it. Not
        // woken per record: a sender wakes only a task that waits in `recv`.
        if matches!(first, Command::Record(..)) {
            tokio::time::sleep(LINGER).await;
        }
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Record(env, json) => batch.push((env, json)),
                Command::Flush(done) => flushes.push(done),
            }
            next = commands.try_recv().ok();
        }
        publish(&js, std::mem::take(&mut batch)).await;
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Writes `records`: per environment, as few messages as [`PER_MESSAGE`] and
/// [`MESSAGE_BYTES`] allow, each a JSON array; all published before any acknowledgement is
/// awaited.
async fn publish(js: &jetstream::Context, records: Vec<(EnvId, Vec<u8>)>) {
    let mut by_env: BTreeMap<&EnvId, Vec<&[u8]>> = BTreeMap::new();
    for (env, json) in &records {
        by_env.entry(env).or_default().push(json);
    }
    let mut sent = Vec::new();
    for (env, jsons) in by_env {
        let mut jsons = jsons.into_iter().peekable();
        while jsons.peek().is_some() {
            let mut payload = b"[".to_vec();
            let mut count = 0;
            while let Some(json) = jsons.next_if(|json| {
                count == 0
                    || ((count as u64) < PER_MESSAGE && payload.len() + json.len() < MESSAGE_BYTES)
            }) {
                if count > 0 {
                    payload.push(b',');
                }
                payload.extend_from_slice(json);
                count += 1;
            }
            payload.push(b']');
            let written = js.publish(Subjects::audit(env), payload.into()).await;
            sent.push((env.clone(), count, written));
        }
    }
    for (env, count, written) in sent {
        let result = match written {
            Ok(acknowledged) => acknowledged.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, %env, records = count, "could not write audit records");
        }
    }
}

/// The records a message of the audit stream holds, with their places in the trail: a JSON
/// array (how records are written), or one record (how earlier versions wrote them). A record
/// this version cannot read (written by a newer one, or not by a publisher) is left out alone:
/// the others keep their places.
fn records_in(payload: &[u8], stream_sequence: u64) -> Vec<AuditRecord> {
    let values = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Array(values)) => values,
        Ok(value) => vec![value],
        Err(err) => {
            tracing::warn!(stream_sequence, error = %err, "an audit message that is not JSON: left out of the trail");
            return Vec::new();
        }
    };
    values
        .into_iter()
        .zip(0..PER_MESSAGE)
        .filter_map(|(value, index)| match serde_json::from_value::<AuditRecord>(value) {
            Ok(mut record) => {
                record.audit_sequence = stream_sequence * PER_MESSAGE + index;
                Some(record)
            }
            Err(err) => {
                tracing::warn!(stream_sequence, index, error = %err, "an audit record this version cannot read: left out of the trail");
                None
            }
        })
        .collect()
}

/// At most this many records in a page.
pub const MAX_PAGE: usize = 500;

/// Up to `limit` records of `env` older than audit sequence `before` (all when `None`), newest
/// first. Reads windows of the stream backwards with a short-lived filtered consumer.
async fn page(
    stream: &mut stream::Stream,
    env: &EnvId,
    limit: usize,
    before: Option<u64>,
) -> Result<AuditPage, String> {
    let limit = limit.clamp(1, MAX_PAGE);
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    // The message that holds the newest record older than `before`.
    let end = before.map_or(last, |b| (b.saturating_sub(1) / PER_MESSAGE).min(last));
    let mut newest_first: Vec<AuditRecord> = Vec::new();
    let mut upper = end;
    let mut window = (limit as u64 * 4).max(64);
    while newest_first.len() < limit && upper >= first && upper > 0 {
        let lower = upper.saturating_sub(window - 1).max(first).max(1);
        let mut found = read_range(stream, env, lower, upper).await?;
        found.retain(|r| before.is_none_or(|b| r.audit_sequence < b));
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

/// The records of `env` in the messages at stream sequences `lower..=upper`, oldest first.
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
        records.extend(records_in(&message.payload, sequence));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn record(request_id: &str) -> AuditRecord {
        let env = EnvId::new("dev").expect("env id");
        let target = Target::Response(Default::default());
        unavailable(&env, request_id, None, &target, "down".into())
    }

    #[test]
    fn records_of_one_message_take_its_sequence_times_1024_plus_their_index() {
        let batch = serde_json::to_vec(&[record("a"), record("b"), record("c")]).expect("JSON");
        let read = records_in(&batch, 7);
        let places: Vec<(u64, &str)> = read
            .iter()
            .map(|r| (r.audit_sequence, r.request_id.as_str()))
            .collect();
        assert_eq!(places, [(7168, "a"), (7169, "b"), (7170, "c")]);
    }

    #[test]
    fn a_record_that_cannot_be_read_is_left_out_alone() {
        let mut batch =
            serde_json::to_value([record("a"), record("b"), record("c")]).expect("JSON");
        batch[1] = json!({"requestId": "b", "outcome": 7});
        let read = records_in(&serde_json::to_vec(&batch).expect("JSON"), 7);
        let places: Vec<(u64, &str)> = read
            .iter()
            .map(|r| (r.audit_sequence, r.request_id.as_str()))
            .collect();
        assert_eq!(
            places,
            [(7168, "a"), (7170, "c")],
            "the others keep their places"
        );
        assert!(records_in(b"not json", 7).is_empty());
    }

    #[test]
    fn an_answered_record_reads_back_with_every_cache_and_the_target_as_sent() {
        let id = |s: &str| AgentId::new(s).expect("agent id");
        let outcome = Outcome {
            request_id: "r1".into(),
            event_id: "e1".into(),
            env: EnvId::new("dev").expect("env id"),
            sequence: 42,
            agents: BTreeMap::from([
                (
                    id("a"),
                    AgentOutcome::Applied {
                        evicted: 3,
                        latency: Duration::from_millis(2),
                    },
                ),
                (
                    id("b"),
                    AgentOutcome::Failed {
                        reason: "redis down".into(),
                        latency: Duration::from_millis(5),
                    },
                ),
            ]),
            took: Duration::from_millis(7),
        };
        let target = Target::Response(cachecast_proto::ResponseSelector {
            scope_client_ids: vec!["s1".into()],
            identity_id: None,
        });
        let json = serde_json::to_vec(&answered(&outcome, Some("alice"), &target)).expect("JSON");
        let [read] = &records_in(&json, 1)[..] else {
            panic!("one record")
        };
        assert_eq!(
            (
                read.request_id.as_str(),
                read.env_id.as_str(),
                read.event_id.as_str()
            ),
            ("r1", "dev", "e1")
        );
        assert_eq!(read.caller.as_deref(), Some("alice"));
        assert_eq!(
            read.target,
            json!({"response": {"scopeClientIds": ["s1"], "identityId": null}})
        );
        assert_eq!((read.sequence, read.took_ms), (42, 7));
        assert_eq!(read.outcome, "failed_dependency");
        assert_eq!((read.expected, read.successful), (2, 1));
        let failures: Vec<_> = read
            .failures
            .iter()
            .map(|f| (f.node_id.as_str(), f.kind.as_str(), f.reason.as_str()))
            .collect();
        assert_eq!(failures, [("b", "eviction_failed", "redis down")]);
        let agents: Vec<_> = read
            .agents
            .iter()
            .map(|(id, r)| (id.as_str(), &*r.status, r.evicted, r.error.as_deref()))
            .collect();
        assert_eq!(
            agents,
            [
                ("a", "applied", Some(3), None),
                ("b", "failed", None, Some("redis down"))
            ]
        );
    }

    #[test]
    fn a_record_written_alone_by_an_earlier_version_is_read_too() {
        let single = serde_json::to_vec(&record("old")).expect("JSON");
        let read = records_in(&single, 3);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].audit_sequence, 3 * PER_MESSAGE);
        assert_eq!(read[0].request_id, "old");
        assert!(records_in(b"not json", 4).is_empty());
    }
}
