//! Live copies: the stream republishes each event it stores to `cachecast.v1.<env>.live`, so an
//! agent receives one message per event, at once, without a consumer of its own. Each copy
//! carries its stream sequence and the sequence of the environment's previous event in the
//! stream (`Nats-Sequence`, `Nats-Last-Sequence`): a chain that shows a missed copy (a
//! disconnect, a slow consumer) at the next one. The agent takes a copy only where the chain
//! holds, and otherwise catches up with a consumer from its position, which is the record:
//! what the stream holds decides, as it does at start.
//!
//! `Nats-Last-Sequence` is 0 when the environment had no earlier event in the stream *or it was
//! deleted* (expired): 0 proves nothing unless no other event fits in between.

use async_nats::Message;

/// What a live copy says about its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveCopy {
    /// The event's stream sequence.
    pub(crate) sequence: u64,
    /// The sequence of the environment's previous event still in the stream (0: none).
    pub(crate) previous: u64,
    /// When the stream stored it, in Unix milliseconds (0: not said).
    pub(crate) stored_ms: i64,
}

impl LiveCopy {
    /// The copy's place, from its headers; `None` for a message the stream did not republish.
    pub(crate) fn of(message: &Message) -> Option<Self> {
        let headers = message.headers.as_ref()?;
        use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE, NATS_TIME_STAMP};
        let stored_ms = headers
            .get(NATS_TIME_STAMP)
            .and_then(|t| {
                time::OffsetDateTime::parse(
                    t.as_str(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
        Some(Self {
            sequence: headers.get(NATS_SEQUENCE)?.as_str().parse().ok()?,
            previous: headers.get(NATS_LAST_SEQUENCE)?.as_str().parse().ok()?,
            stored_ms,
        })
    }
}

/// What the agent does with a live copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// The next event of the environment after the last one handled: apply it.
    Next,
    /// Handled already (the consumer that caught up delivered it too): skip it.
    Handled,
    /// An event may be missing before it, or the copy does not fit the stream the position
    /// counts in (created anew): catch up from the stream, which tells.
    CatchUp,
}

/// Where `copy` stands for an agent that handled every event of its environment up to stream
/// sequence `handled`, and last caught up from the stream after `caught_up_from` (copies at or
/// below it came before that catch-up began, and are never seen again unless the stream's
/// numbering started over).
pub(crate) fn place(copy: LiveCopy, handled: u64, caught_up_from: u64) -> Place {
    if copy.sequence <= handled {
        return if copy.sequence > caught_up_from {
            Place::Handled
        } else {
            Place::CatchUp
        };
    }
    let chained = copy.previous != 0 && copy.previous <= handled;
    // Nothing at all was stored in between: no event can be missing, whatever 0 means.
    let adjacent = copy.sequence == handled + 1;
    if chained || adjacent {
        Place::Next
    } else {
        Place::CatchUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(sequence: u64, previous: u64) -> LiveCopy {
        LiveCopy {
            sequence,
            previous,
            stored_ms: 0,
        }
    }

    #[test]
    fn a_copy_chained_to_the_last_event_handled_is_next() {
        assert_eq!(place(copy(11, 10), 10, 0), Place::Next);
        // Other environments' events in between: the chain skips them.
        assert_eq!(place(copy(40, 10), 10, 0), Place::Next);
        // The position is past the environment's previous event (flushed at the stream's end).
        assert_eq!(place(copy(40, 7), 30, 0), Place::Next);
    }

    #[test]
    fn a_broken_chain_catches_up() {
        assert_eq!(
            place(copy(40, 12), 10, 0),
            Place::CatchUp,
            "event 12 missed"
        );
        assert_eq!(
            place(copy(13, 12), 11, 0),
            Place::CatchUp,
            "event 12 missed"
        );
    }

    #[test]
    fn no_previous_event_proves_nothing_unless_adjacent() {
        // 0: none, or deleted (expired): an event in between may be gone.
        assert_eq!(place(copy(40, 0), 10, 0), Place::CatchUp);
        assert_eq!(
            place(copy(1, 0), 0, 0),
            Place::Next,
            "the stream's first event"
        );
        assert_eq!(
            place(copy(11, 0), 10, 0),
            Place::Next,
            "nothing stored in between"
        );
    }

    #[test]
    fn copies_the_catch_up_delivered_are_skipped() {
        assert_eq!(place(copy(15, 14), 20, 10), Place::Handled);
        assert_eq!(place(copy(20, 19), 20, 10), Place::Handled);
    }

    #[test]
    fn a_copy_from_before_the_catch_up_means_the_numbering_started_over() {
        // A stream created anew numbers from 1 again: those are new events, not old ones.
        assert_eq!(place(copy(1, 0), 20, 10), Place::CatchUp);
        assert_eq!(place(copy(10, 9), 20, 10), Place::CatchUp);
    }
}
