//! The cachecast wire contract.
//!
//! Everything that crosses NATS is defined here and nowhere else: the protobuf messages
//! generated from `proto/cachecast/v1/cachecast.proto`, the subject names, the presence keys,
//! and the validation of the ids that become subject tokens. This is the only crate that
//! knows prost; other crates encode and decode through [`Wire`].

mod ids;
mod subjects;

pub use ids::{
    AgentId, CacheId, CacheName, EnvId, InvalidId, RecentEventIds, new_event_id, new_publisher_id,
};
pub use subjects::{Subjects, cache_key, parse_cache_key, parse_presence_key};

/// Generated protobuf types of `cachecast.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cachecast.v1.rs"));
}

pub use v1::{
    Ack, AckStatus, Acks, AgentOutcome as AgentOutcomeReply, CacheRegistration, ErrorReply,
    IdentitySelector, InvalidateReply, InvalidateRequest, Invalidation, KeyedSelector, Presence,
    ResponseSelector, invalidate_request::Target as RequestTarget, invalidation::Target,
};

/// At most this many acks in one `Acks` message: agents send no more, publishers refuse more.
pub const MAX_ACKS_TOGETHER: usize = 64;

/// The largest message cachecast accepts on the bus. Larger payloads are refused before
/// decoding, so a hostile peer cannot make an agent allocate without bound.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a valid cachecast.v1 message: {0}")]
    Malformed(#[from] prost::DecodeError),
}

impl DecodeError {
    /// A fixed word for metrics and logs: `oversized`, `truncated` (the payload ends inside a
    /// field) or `malformed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "oversized",
            Self::Malformed(err) if err.to_string().contains("buffer underflow") => "truncated",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Encoding to and decoding from the protobuf wire format.
pub trait Wire: Sized {
    /// The message as protobuf bytes.
    fn to_bytes(&self) -> bytes::Bytes;
    /// Decodes a message, refusing payloads over [`MAX_MESSAGE_BYTES`].
    fn from_bytes(payload: &[u8]) -> Result<Self, DecodeError>;
}

impl<M: prost::Message + Default> Wire for M {
    fn to_bytes(&self) -> bytes::Bytes {
        self.encode_to_vec().into()
    }

    fn from_bytes(payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        Ok(M::decode(payload)?)
    }
}

/// Milliseconds since the Unix epoch, for the `*_unix_ms` fields.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl ResponseSelector {
    /// True when the selector names neither a scope nor an identity: evict everything.
    pub fn is_all(&self) -> bool {
        self.scope_client_ids.is_empty() && self.identity_id.is_none()
    }
}

impl Target {
    /// A short name of the cache kind, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Response(_) => "response",
            Self::Identity(_) => "identity",
            Self::Keyed(_) => "keyed",
        }
    }

    /// True when the target is a whole cache of the environment (a full flush), not a part.
    pub fn is_full_flush(&self) -> bool {
        match self {
            Self::Response(selector) => selector.is_all(),
            Self::Identity(_) => false,
            Self::Keyed(selector) => selector.all,
        }
    }
}

impl From<RequestTarget> for Target {
    fn from(target: RequestTarget) -> Self {
        match target {
            RequestTarget::Response(s) => Self::Response(s),
            RequestTarget::Identity(s) => Self::Identity(s),
            RequestTarget::Keyed(s) => Self::Keyed(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_round_trips() {
        let event = Invalidation {
            event_id: new_event_id(),
            env: "dev".into(),
            request_id: "r-1".into(),
            ack_subject: "cachecast.v1.dev.ack.p.e".into(),
            issued_at_unix_ms: 42,
            takes_acks_together: true,
            target: Some(Target::Response(ResponseSelector {
                scope_client_ids: vec!["s1".into(), "s2".into()],
                identity_id: Some("alice".into()),
            })),
        };
        let decoded = Invalidation::from_bytes(&event.to_bytes()).expect("decodes");
        assert_eq!(decoded, event);
    }

    #[test]
    fn garbage_and_oversized_payloads_are_refused() {
        assert!(matches!(
            Invalidation::from_bytes(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            Invalidation::from_bytes(&big),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn decode_errors_name_their_reason() {
        let event = Invalidation {
            event_id: new_event_id(),
            ack_subject: "cachecast.v1.dev.ack.p.e".into(),
            ..Default::default()
        };
        let bytes = event.to_bytes();
        let truncated = Invalidation::from_bytes(&bytes[..bytes.len() - 3]);
        assert_eq!(truncated.map_err(|e| e.reason()), Err("truncated"));
        let garbage = Invalidation::from_bytes(b"not protobuf at all");
        assert_eq!(garbage.map_err(|e| e.reason()), Err("malformed"));
        let big = Invalidation::from_bytes(&vec![0u8; MAX_MESSAGE_BYTES + 1]);
        assert_eq!(big.map_err(|e| e.reason()), Err("oversized"));
    }

    #[test]
    fn empty_selector_means_all() {
        assert!(ResponseSelector::default().is_all());
        let scoped = ResponseSelector {
            scope_client_ids: vec!["s".into()],
            identity_id: None,
        };
        assert!(!scoped.is_all());
    }
}
