//! The fast path: an agent applies an event from a plain subscription to its environment's
//! event subject, which NATS delivers as the publisher sends it, before the stream has stored
//! and dispatched it. The event consumer stays the record and the backstop: an event the fast
//! path missed (a disconnect, a slow consumer, no permission to subscribe) arrives there and is
//! applied then; one it already applied only moves the position on.
//!
//! It is safe because an invalidation is idempotent and invalidations commute: applying one
//! early, or twice, or before an earlier one, leaves a cache as the stream order would. The
//! publisher still answers only after the stream's acknowledgement, so a `200` still means
//! stored *and* applied. The live copy carries the publisher's reply subject (the stream's
//! acknowledgement goes there): an agent never replies to it.

use std::collections::{HashSet, VecDeque};

/// How an event reached the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The copy NATS delivers to subscribers of the subject as it is published: not yet
    /// numbered by the stream, and possibly never stored (the stream may refuse it).
    Fast,
    /// From the event consumer: stored at `sequence` of the stream created at
    /// `stream_created_ns`.
    Stored {
        sequence: u64,
        stream_created_ns: i128,
    },
}

impl Delivery {
    /// The stream sequence the ack reports: 0 for the fast path's copy.
    pub(crate) fn sequence(self) -> u64 {
        match self {
            Self::Fast => 0,
            Self::Stored { sequence, .. } => sequence,
        }
    }

    /// The path's name, for metrics and logs.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Stored { .. } => "stream",
        }
    }
}

/// How many acknowledged events an agent remembers, so that an event that arrives twice (on
/// both paths, or stored twice by a publish retried after its first attempt was stored) is
/// applied and acknowledged once. Both copies come moments apart; this covers thousands of
/// events in between. An event that falls out of it is applied again (idempotent) and its
/// second ack is ignored by the publisher.
const REMEMBERED: usize = 4096;

/// The event ids an agent acknowledged lately, on either path.
#[derive(Debug, Default)]
pub(crate) struct Acknowledged {
    order: VecDeque<u128>,
    ids: HashSet<u128>,
}

impl Acknowledged {
    /// Whether the event `event_id` was acknowledged lately.
    pub(crate) fn contains(&self, event_id: &str) -> bool {
        key(event_id).is_some_and(|key| self.ids.contains(&key))
    }

    /// Remembers that `event_id` was acknowledged, forgetting the oldest beyond
    /// [`REMEMBERED`]. An id no publisher makes (not 32 hex digits) is not remembered: it is
    /// applied on both paths, which is only more work.
    pub(crate) fn insert(&mut self, event_id: &str) {
        let Some(key) = key(event_id) else { return };
        if !self.ids.insert(key) {
            return;
        }
        if self.order.len() == REMEMBERED
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.order.push_back(key);
    }
}

/// A publisher's event id (a UUIDv7 in 32 hex digits) as a number: 16 bytes a remembered id.
fn key(event_id: &str) -> Option<u128> {
    (event_id.len() == 32)
        .then(|| u128::from_str_radix(event_id, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> String {
        format!("{n:032x}")
    }

    #[test]
    fn remembers_acknowledged_events_on_either_path() {
        let mut acked = Acknowledged::default();
        let event = cachecast_proto::new_event_id();
        assert!(!acked.contains(&event));
        acked.insert(&event);
        assert!(acked.contains(&event));
        assert!(
            !acked.contains(&cachecast_proto::new_event_id()),
            "another event"
        );
    }

    #[test]
    fn forgets_the_oldest_beyond_its_bound() {
        let mut acked = Acknowledged::default();
        for n in 0..REMEMBERED as u128 + 10 {
            acked.insert(&id(n));
        }
        assert_eq!(acked.order.len(), REMEMBERED);
        assert_eq!(acked.ids.len(), REMEMBERED);
        assert!(!acked.contains(&id(9)), "the oldest are forgotten");
        assert!(acked.contains(&id(10)));
        assert!(acked.contains(&id(REMEMBERED as u128 + 9)));
    }

    #[test]
    fn a_second_insert_does_not_push_another_out() {
        let mut acked = Acknowledged::default();
        for n in 0..REMEMBERED as u128 {
            acked.insert(&id(n));
        }
        acked.insert(&id(5));
        assert!(acked.contains(&id(0)), "nothing was forgotten");
        assert_eq!(acked.order.len(), REMEMBERED);
    }

    #[test]
    fn ids_no_publisher_makes_are_never_remembered() {
        let mut acked = Acknowledged::default();
        for odd in [
            "",
            "abc",
            "not-a-uuid-but-32-characters-xyz",
            &"f".repeat(33),
        ] {
            acked.insert(odd);
            assert!(!acked.contains(odd), "{odd:?}");
        }
        assert!(acked.order.is_empty());
    }
}
