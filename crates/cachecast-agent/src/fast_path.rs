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
