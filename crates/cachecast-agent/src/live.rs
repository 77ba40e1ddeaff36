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
    /// When the stream stored it, in Unix nanoseconds by the server's clock (0: not said).
    pub(crate) stored_ns: i128,
}

impl LiveCopy {
    /// The copy's place, from its headers; `None` for a message the stream did not republish.
    pub(crate) fn of(message: &Message) -> Option<Self> {
        let headers = message.headers.as_ref()?;
        use async_nats::header::{NATS_LAST_SEQUENCE, NATS_SEQUENCE, NATS_TIME_STAMP};
        let stored_ns = headers
            .get(NATS_TIME_STAMP)
            .and_then(|t| {
                time::OffsetDateTime::parse(
                    t.as_str(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .map_or(0, |t| t.unix_timestamp_nanos());
        Some(Self {
            sequence: headers.get(NATS_SEQUENCE)?.as_str().parse().ok()?,
            previous: headers.get(NATS_LAST_SEQUENCE)?.as_str().parse().ok()?,
            stored_ns,
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
/// sequence `handled`, the last of which the stream stored at `handled_stored_ns` (or, after a
/// flush, the stream's last message then). A copy at or below `handled` stored later than that
/// cannot be an old event: the stream numbers from the start again (created anew).
pub(crate) fn place(copy: LiveCopy, handled: u64, handled_stored_ns: i128) -> Place {
    if copy.sequence <= handled {
        return if copy.stored_ns > handled_stored_ns {
            Place::CatchUp
        } else {
            Place::Handled
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

    /// A copy stored at second `sequence` (times matter only at or below the position).
    fn copy(sequence: u64, previous: u64) -> LiveCopy {
        LiveCopy {
            sequence,
            previous,
            stored_ns: at(sequence),
        }
    }

    fn at(second: u64) -> i128 {
        i128::from(second) * 1_000_000_000
    }

    #[test]
    fn a_copy_chained_to_the_last_event_handled_is_next() {
        assert_eq!(place(copy(11, 10), 10, at(10)), Place::Next);
        // Other environments' events in between: the chain skips them.
        assert_eq!(place(copy(40, 10), 10, at(10)), Place::Next);
        // The position is past the environment's previous event (flushed at the stream's end).
        assert_eq!(place(copy(40, 7), 30, at(30)), Place::Next);
    }

    #[test]
    fn a_broken_chain_catches_up() {
        // Event 12 was missed.
        assert_eq!(place(copy(40, 12), 10, at(10)), Place::CatchUp);
        assert_eq!(place(copy(13, 12), 11, at(11)), Place::CatchUp);
    }

    #[test]
    fn no_previous_event_proves_nothing_unless_adjacent() {
        // 0: none, or deleted (expired): an event in between may be gone.
        assert_eq!(place(copy(40, 0), 10, at(10)), Place::CatchUp);
        // The stream's first event; an event with nothing stored in between.
        assert_eq!(place(copy(1, 0), 0, 0), Place::Next);
        assert_eq!(place(copy(11, 0), 10, at(10)), Place::Next);
    }

    #[test]
    fn copies_stored_before_the_last_event_handled_are_skipped() {
        // A consumer that caught up delivered them, or a flush went over them.
        assert_eq!(place(copy(15, 14), 20, at(20)), Place::Handled);
        assert_eq!(place(copy(20, 19), 20, at(20)), Place::Handled);
    }

    #[test]
    fn a_copy_at_or_below_the_position_stored_later_means_the_numbering_started_over() {
        // A stream created anew numbers from 1 again: those are new events, not old ones.
        let renumbered = |sequence, previous| LiveCopy {
            sequence,
            previous,
            stored_ns: at(20) + 1,
        };
        assert_eq!(place(renumbered(1, 0), 20, at(20)), Place::CatchUp);
        assert_eq!(place(renumbered(20, 9), 20, at(20)), Place::CatchUp);
    }
}
