//! The agent's event consumer: an ordered consumer of its environment's events, where it
//! really starts, and the arithmetic that decides whether events may have been missed.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream;
use cachecast_proto::{AgentId, EnvId, Subjects};

use crate::watch::Gap;

/// The longest pull request of the event consumer. The server sends an idle heartbeat every
/// half of it and the client recreates a consumer that missed two, so this bounds how long a
/// consumer lost without a reconnect goes unnoticed (about 10 s; after a reconnect the agent
/// resumes at once), at the cost of one pull request per agent every 10 s and an idle
/// heartbeat every 5 s: with a thousand agents, what the server does while nothing happens.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// The name of a new event consumer of `agent`: its id (cut to 48 characters) and 64 random
/// bits, new for every consumer (the client names its replacements `<name>_<n>`).
///
/// A name matters for permissions: with a name and one filter subject, the client creates
/// the consumer on `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, a subject that carries
/// the environment, so a NATS user can be allowed to read its own environment's events only
/// (deploy/nats/accounts.conf). The random part makes the name unguessable: the other
/// consumer subjects (`MSG.NEXT`, `INFO`, `DELETE`) carry only the name, and an agent that
/// cannot list consumers cannot pull from, or delete, another agent's.
fn consumer_name(agent: &AgentId) -> String {
    let id: String = agent.as_str().chars().take(48).collect();
    let event_id = cachecast_proto::new_event_id();
    // The last 16 hex digits of a UUIDv7 are random.
    format!("{id}_{}", &event_id[event_id.len() - 16..])
}

/// An event consumer as created: its messages, and what the server said when it created it.
pub(crate) struct Consumer {
    pub(crate) events: pull::Ordered,
    /// Events of the environment the consumer will deliver that the stream holds now.
    pub(crate) pending: u64,
    /// The stream sequence the server really starts after. Above the one asked for when the
    /// stream no longer holds the events in between: they are lost to this consumer.
    pub(crate) starts_after: u64,
}

/// An ordered consumer of one environment's events after stream sequence `after`: every
/// event in stream order, recreated by the client when it falls behind.
pub(crate) async fn consume(
    stream: &stream::Stream,
    env: &EnvId,
    agent: &AgentId,
    after: u64,
) -> Result<Consumer, String> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            name: Some(consumer_name(agent)),
            filter_subject: Subjects::events(env),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            max_expires: PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(|err| err.to_string())?;
    let info = consumer.cached_info();
    let (pending, starts_after) = (info.num_pending, info.delivered.stream_sequence);
    let events = consumer.messages().await.map_err(|err| err.to_string())?;
    Ok(Consumer {
        events,
        pending,
        starts_after,
    })
}

/// The stream as an agent sees it when it (re)creates its consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamState {
    pub(crate) first_sequence: u64,
    pub(crate) last_sequence: u64,
    /// The stream's creation time, in Unix nanoseconds.
    pub(crate) created_ns: i128,
    /// When the stream stored its last message, in Unix nanoseconds (by the server's clock).
    pub(crate) last_stored_ns: i128,
}

impl StreamState {
    /// The state a stream's info reports.
    pub(crate) fn of(info: &stream::Info) -> Self {
        Self {
            first_sequence: info.state.first_sequence,
            last_sequence: info.state.last_sequence,
            created_ns: info.created.unix_timestamp_nanos(),
            last_stored_ns: info.state.last_timestamp.unix_timestamp_nanos(),
        }
    }
}

/// Whether an agent whose cache is up to date with event `position` of the stream created at
/// `position_created_ns` may have missed events it can no longer get, and why: the stream was
/// created anew or its sequence went back, or it no longer holds every event after the
/// position (retention dropped some). Then only a flush makes the cache safe again.
pub(crate) fn missed_events(
    position: u64,
    position_created_ns: i128,
    stream: StreamState,
) -> Option<Gap> {
    if position_created_ns != stream.created_ns || stream.last_sequence < position {
        Some(Gap::StreamRecreated)
    } else if stream.first_sequence > position + 1 && stream.last_sequence > position {
        Some(Gap::Retention)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: i128 = 1_700_000_000_000_000_000;

    fn stream(first: u64, last: u64) -> StreamState {
        StreamState {
            first_sequence: first,
            last_sequence: last,
            created_ns: CREATED,
            last_stored_ns: 0,
        }
    }

    #[test]
    fn every_event_after_the_position_held_is_no_gap() {
        assert_eq!(
            missed_events(10, CREATED, stream(1, 10)),
            None,
            "nothing new"
        );
        assert_eq!(
            missed_events(10, CREATED, stream(1, 50)),
            None,
            "new events, all held"
        );
        assert_eq!(
            missed_events(10, CREATED, stream(11, 50)),
            None,
            "the next one is the first held"
        );
    }

    #[test]
    fn dropped_recreated_or_rewound_streams_are_gaps() {
        assert_eq!(
            missed_events(10, CREATED, stream(12, 50)),
            Some(Gap::Retention),
            "event 11 was dropped"
        );
        assert_eq!(
            missed_events(10, CREATED + 1, stream(1, 50)),
            Some(Gap::StreamRecreated),
            "another stream"
        );
        assert_eq!(
            missed_events(10, CREATED, stream(1, 5)),
            Some(Gap::StreamRecreated),
            "the sequence went back"
        );
    }

    #[test]
    fn an_empty_stream_past_the_position_is_no_gap() {
        // Everything up to the position expired and nothing came since: no event was missed.
        assert_eq!(missed_events(10, CREATED, stream(11, 10)), None);
    }
}
