//! Asynchronous requests (`?wait_for_completion=false`): the table of their status resources.
//!
//! A request answered `202` keeps running in a task that records each ack here as it
//! arrives; `GET /api/1.0/requests/{requestId}` reads the record. Records are kept for a
//! bounded time after they finish and the table holds a bounded number: the oldest finished
//! record goes first, and when every slot holds a running request a new one is refused.
//! The table lives in the publisher replica that accepted the request; a `GET` that reaches
//! another replica asks the others over NATS ([`answer_peers`], [`ask_peers`]), and the one
//! that holds the request answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use cachecast_bus::Client;
use cachecast_proto::{AgentId, EnvId, Subjects};
use futures::StreamExt;

use crate::api::answer::{self, Progress, RequestStatusBody};
use crate::outcome::{AgentOutcome, Outcome};
use crate::publisher::InFlight;

/// Why an asynchronous request could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error("request id {0:?} is already in use by an asynchronous request; send a new RequestID")]
    Duplicate(String),
    #[error(
        "{0} asynchronous requests are running; wait for some to finish or raise api.async_max_requests"
    )]
    Full(usize),
}

#[derive(Debug)]
struct Record {
    env: EnvId,
    kind: &'static str,
    event_id: String,
    sequence: u64,
    agents: BTreeMap<AgentId, Option<AgentOutcome>>,
    /// Set once finished: the final answer, and when.
    done: Option<(Outcome, Instant)>,
    cluster_name: Option<String>,
}

#[derive(Debug, Default)]
struct Table {
    records: HashMap<String, Record>,
    /// Request ids in the order they were registered.
    order: VecDeque<String>,
}

/// The status records of asynchronous requests.
#[derive(Debug)]
pub(crate) struct Requests {
    table: Mutex<Table>,
    retention: Duration,
    max: usize,
}

impl Requests {
    pub(crate) fn new(retention: Duration, max: usize) -> Self {
        Self {
            table: Mutex::default(),
            retention,
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `request_id` can be registered, before anything is published.
    pub(crate) fn check(&self, request_id: &str) -> Result<(), RegisterError> {
        self.admit(&mut self.lock(), request_id)
    }

    /// Whether `request_id` fits in `table` now (making room if it can).
    fn admit(&self, table: &mut Table, request_id: &str) -> Result<(), RegisterError> {
        self.expire(table);
        if table.records.contains_key(request_id) {
            return Err(RegisterError::Duplicate(request_id.to_owned()));
        }
        if table.records.len() >= self.max && !make_room(table) {
            return Err(RegisterError::Full(self.max));
        }
        Ok(())
    }

    /// Records a published request; its acks are recorded by [`Requests::follow`].
    pub(crate) fn register(
        &self,
        in_flight: &InFlight,
        env: &EnvId,
        kind: &'static str,
        cluster_name: Option<String>,
    ) -> Result<(), RegisterError> {
        let request_id = in_flight.request_id().to_owned();
        // Checked again under the same lock as the insert: two requests racing with one id
        // must not share a record.
        let mut table = self.lock();
        self.admit(&mut table, &request_id)?;
        table.order.push_back(request_id.clone());
        table.records.insert(
            request_id,
            Record {
                env: env.clone(),
                kind,
                event_id: in_flight.event_id().to_owned(),
                sequence: in_flight.sequence(),
                agents: in_flight.agents().clone(),
                done: None,
                cluster_name,
            },
        );
        Ok(())
    }

    /// Records each ack of `in_flight` as it arrives, then its outcome.
    pub(crate) async fn follow(&self, mut in_flight: InFlight) -> Outcome {
        let request_id = in_flight.request_id().to_owned();
        while let Some((agent, outcome)) = in_flight.next_ack().await {
            if let Some(record) = self.lock().records.get_mut(&request_id) {
                record.agents.insert(agent, Some(outcome));
            }
        }
        let outcome = in_flight.finish();
        if let Some(record) = self.lock().records.get_mut(&request_id) {
            record.done = Some((outcome.clone(), Instant::now()));
        }
        outcome
    }

    /// The status of `request_id`, if it is known and its environment is one `visible` allows.
    pub(crate) fn status(
        &self,
        request_id: &str,
        visible: impl Fn(&EnvId) -> bool,
    ) -> Option<RequestStatusBody> {
        let mut table = self.lock();
        self.expire(&mut table);
        let record = table.records.get(request_id).filter(|r| visible(&r.env))?;
        let (agents, outcome) = match &record.done {
            Some((outcome, _)) => (
                outcome
                    .agents
                    .iter()
                    .map(|(id, o)| (id.clone(), Some(o.clone())))
                    .collect(),
                Some(answer::outcome_body(
                    outcome,
                    record.cluster_name.as_deref(),
                )),
            ),
            None => (record.agents.clone(), None),
        };
        let confirmed = agents
            .values()
            .filter(|o| o.as_ref().is_some_and(AgentOutcome::is_applied))
            .count();
        let pending = agents.values().filter(|o| o.is_none()).count();
        Some(RequestStatusBody {
            request_id: request_id.to_owned(),
            env_id: record.env.to_string(),
            kind: record.kind.to_owned(),
            state: if outcome.is_some() { "done" } else { "running" }.to_owned(),
            event_id: record.event_id.clone(),
            sequence: record.sequence,
            progress: Progress {
                expected: agents.len(),
                confirmed,
                failed: agents.len() - confirmed - pending,
                pending,
            },
            agents: agents
                .iter()
                .map(|(id, o)| (id.to_string(), answer::agent_result(o.as_ref())))
                .collect(),
            outcome,
        })
    }

    /// Drops finished records older than the retention.
    fn expire(&self, table: &mut Table) {
        let retention = self.retention;
        table.records.retain(|_, r| {
            r.done
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() < retention)
        });
        let Table { records, order } = table;
        order.retain(|id| records.contains_key(id));
    }
}

/// How long a replica waits for the replica holding a request to answer.
const PEER_TIMEOUT: Duration = Duration::from_millis(500);

/// Answers other replicas asking for the status of a request this one holds; the others stay
/// silent, so the asker takes the one answer there is. Ends when `requests` is dropped.
pub(crate) async fn answer_peers(client: Client, requests: Weak<Requests>) {
    let mut questions = match client.subscribe(Subjects::REQUEST_STATUS).await {
        Ok(questions) => questions,
        Err(err) => {
            tracing::warn!(error = %err, "cannot answer other replicas about asynchronous requests; a status GET through them will be a 404");
            return;
        }
    };
    while let Some(question) = questions.next().await {
        let Some(requests) = requests.upgrade() else {
            return;
        };
        let Some(reply) = question.reply else {
            continue;
        };
        if !cachecast_proto::Subjects::is_caller_reply(reply.as_str()) {
            continue;
        }
        let Ok(id) = std::str::from_utf8(&question.payload) else {
            continue;
        };
        // The asking replica checks the caller's token against the environment.
        let Some(status) = requests.status(id, |_| true) else {
            continue;
        };
        if let Ok(body) = serde_json::to_vec(&status)
            && let Err(err) = client.publish(reply, body.into()).await
        {
            tracing::debug!(error = %err, "could not answer a replica about a request");
        }
    }
}

/// Asks the other replicas for the status of request `id`; `None` when none holds it.
pub(crate) async fn ask_peers(client: &Client, id: &str) -> Option<RequestStatusBody> {
    let question = async_nats::Request::new()
        .payload(id.to_owned().into())
        .timeout(Some(PEER_TIMEOUT));
    let answer = client
        .send_request(Subjects::REQUEST_STATUS, question)
        .await
        .ok()?;
    serde_json::from_slice(&answer.payload).ok()
}

/// Drops the oldest finished record; false when every record is still running.
fn make_room(table: &mut Table) -> bool {
    let Some(position) = table
        .order
        .iter()
        .position(|id| table.records.get(id).is_some_and(|r| r.done.is_some()))
    else {
        return false;
    };
    if let Some(id) = table.order.remove(position) {
        table.records.remove(&id);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> EnvId {
        EnvId::new("dev").expect("valid")
    }

    /// Puts a record straight into the table: running, or finished `finished_ago`.
    fn put(requests: &Requests, id: &str, finished_ago: Option<Duration>) {
        let done = finished_ago.map(|ago| {
            let outcome = Outcome {
                request_id: id.to_owned(),
                event_id: "e".into(),
                env: env(),
                sequence: 1,
                agents: BTreeMap::new(),
                took: Duration::ZERO,
            };
            (outcome, Instant::now() - ago)
        });
        let mut table = requests.lock();
        table.order.push_back(id.to_owned());
        table.records.insert(
            id.to_owned(),
            Record {
                env: env(),
                kind: "response",
                event_id: "e".into(),
                sequence: 1,
                agents: BTreeMap::new(),
                done,
                cluster_name: None,
            },
        );
    }

    #[test]
    fn the_oldest_finished_record_makes_room_and_running_ones_never_do() {
        let requests = Requests::new(Duration::from_secs(600), 2);
        put(&requests, "running", None);
        put(&requests, "finished", Some(Duration::ZERO));
        assert_eq!(requests.check("new"), Ok(()));
        assert!(requests.status("finished", |_| true).is_none());
        assert!(requests.status("running", |_| true).is_some());
        put(&requests, "running-2", None);
        assert_eq!(requests.check("new"), Err(RegisterError::Full(2)));
        assert_eq!(
            requests.check("running"),
            Err(RegisterError::Duplicate("running".into()))
        );
    }

    #[test]
    fn finished_records_expire_after_the_retention() {
        let requests = Requests::new(Duration::from_secs(60), 10);
        put(&requests, "old", Some(Duration::from_secs(61)));
        put(&requests, "recent", Some(Duration::from_secs(1)));
        assert!(requests.status("old", |_| true).is_none());
        let recent = requests.status("recent", |_| true).expect("kept");
        assert_eq!(recent.state, "done");
        assert!(requests.status("recent", |e| e.as_str() != "dev").is_none());
    }
}
