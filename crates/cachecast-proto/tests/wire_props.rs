//! Property tests of the event decoder: `Wire::from_bytes` on arbitrary bytes never panics
//! and refuses anything over `MAX_MESSAGE_BYTES`; encode → decode round-trips every message.

use cachecast_proto::{
    Ack, AckStatus, DecodeError, Invalidation, MAX_MESSAGE_BYTES, Presence, ResponseSelector,
    Target, Wire,
};
use proptest::prelude::*;

fn selector() -> impl Strategy<Value = ResponseSelector> {
    (
        prop::collection::vec(".{0,16}", 0..6),
        prop::option::of(".{0,16}"),
    )
        .prop_map(|(scope_client_ids, identity_id)| ResponseSelector {
            scope_client_ids,
            identity_id,
        })
}

fn invalidation() -> impl Strategy<Value = Invalidation> {
    (
        ".{0,32}",
        ".{0,16}",
        ".{0,32}",
        ".{0,40}",
        any::<i64>(),
        any::<bool>(),
        prop::option::of(selector()),
    )
        .prop_map(
            |(event_id, env, request_id, ack_subject, issued_at_unix_ms, together, selector)| {
                Invalidation {
                    event_id,
                    env,
                    request_id,
                    ack_subject,
                    issued_at_unix_ms,
                    takes_acks_together: together,
                    target: selector.map(Target::Response),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..2048)) {
        // Each message type: Ok or a DecodeError, never a panic.
        let _ = Invalidation::from_bytes(&payload);
        let _ = Ack::from_bytes(&payload);
        let _ = cachecast_proto::Acks::from_bytes(&payload);
        let _ = Presence::from_bytes(&payload);
        let _ = ResponseSelector::from_bytes(&payload);
    }

    #[test]
    fn invalidations_round_trip(event in invalidation()) {
        let decoded = Invalidation::from_bytes(&event.to_bytes()).expect("decodes");
        prop_assert_eq!(decoded, event);
    }

    #[test]
    fn acks_round_trip(event_id in ".{0,32}", agent_id in ".{0,32}", evicted in any::<u64>(), applied in any::<bool>()) {
        let ack = Ack {
            event_id,
            agent_id,
            status: if applied { AckStatus::Applied } else { AckStatus::Failed } as i32,
            evicted,
            ..Ack::default()
        };
        prop_assert_eq!(Ack::from_bytes(&ack.to_bytes()).expect("decodes"), ack);
    }

    #[test]
    fn oversized_payloads_are_refused_before_decoding(extra in 1usize..4096, byte in any::<u8>()) {
        let payload = vec![byte; MAX_MESSAGE_BYTES + extra];
        prop_assert!(matches!(Invalidation::from_bytes(&payload), Err(DecodeError::TooLarge(n)) if n == payload.len()));
    }
}
