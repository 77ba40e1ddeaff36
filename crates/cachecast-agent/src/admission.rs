//! Which events an agent admits: a wire version it speaks, decodable, addressed to its
//! environment, with a well-formed ack subject. Anything else is counted, logged (rate-limited)
//! and ignored: never applied, never acknowledged.

use std::time::Duration;

use cachecast_bus::{WIRE_VERSION, WIRE_VERSION_HEADER};
use cachecast_proto::{Invalidation, Wire};

use crate::agent::Agent;
use crate::backend::CacheBackend;
use crate::fast_path::Delivery;

/// At most one warning per kind of refused event in this interval (the rest are counted).
pub(crate) const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl<B: CacheBackend> Agent<B> {
    /// Counts an event this agent refuses (`reason` is a fixed word), and logs it unless
    /// too many were logged lately. Called once per stream sequence: a redelivered event is
    /// skipped before it gets here. `sequence` is 0 for a message without JetStream metadata.
    pub(crate) fn reject(&self, reason: &'static str, sequence: u64, subject: &str, detail: &str) {
        metrics::counter!("cachecast_agent_rejected_events_total", "env" => self.env.to_string(), "reason" => reason)
            .increment(1);
        if let Some(left_out) = self.log_limit.allow(reason) {
            tracing::warn!(
                reason,
                sequence,
                subject,
                stream = %self.bus.stream.name,
                left_out,
                error = detail,
                "ignoring an invalid event: not applied, not acknowledged (who can publish on this subject? check the NATS permissions)"
            );
        }
    }

    /// The event in `message`, if it is one this agent may apply: a wire version it speaks,
    /// decodable, addressed to its environment, with a well-formed ack subject. A refusal is
    /// reported for the stream's delivery only: the fast path's copy of the same message
    /// comes too and is refused the same way, and counting it twice would mislead.
    pub(crate) fn admit(
        &self,
        message: &async_nats::Message,
        delivery: Delivery,
    ) -> Option<Invalidation> {
        let subject = message.subject.as_str();
        let reject = |reason: &'static str, detail: &str| {
            if let Delivery::Stored { sequence, .. } = delivery {
                self.reject(reason, sequence, subject, detail);
            }
        };
        if let Some(version) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(WIRE_VERSION_HEADER))
            && version.as_str() != WIRE_VERSION
        {
            let detail = format!(
                "wire version {:?}, this agent speaks {WIRE_VERSION}: upgrade it",
                version.as_str()
            );
            reject("unknown_version", &detail);
            return None;
        }
        let event = match Invalidation::from_bytes(&message.payload) {
            Ok(event) => event,
            Err(err) => {
                reject(err.reason(), &err.to_string());
                return None;
            }
        };
        if event.env != self.env.as_str() || !event.ack_subject.starts_with(&self.ack_prefix) {
            let detail = format!(
                "addressed to environment {:?}, ack subject {:?}",
                event.env, event.ack_subject
            );
            reject("wrong_env", &detail);
            return None;
        }
        // The ack subject ends `<publisherId>.<eventId>`, and names this event (never the
        // token of acks together).
        let tail = &event.ack_subject[self.ack_prefix.len()..];
        let well_formed = match tail.split_once('.') {
            Some((publisher, event_id)) => {
                is_plain_token(publisher)
                    && is_plain_token(event_id)
                    && event_id == event.event_id
                    && event_id != cachecast_proto::Subjects::ACKS_TOGETHER
            }
            None => false,
        };
        if !well_formed {
            let detail = format!(
                "event id {:?}, ack subject {:?}",
                event.event_id, event.ack_subject
            );
            reject("invalid", &detail);
            return None;
        }
        Some(event)
    }
}

/// A non-empty subject token without wildcards or whitespace.
fn is_plain_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control())
}
