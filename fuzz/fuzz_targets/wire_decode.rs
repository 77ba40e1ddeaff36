//! Fuzzes the event decoder: any payload decodes or is refused, never a panic; a payload that
//! decodes re-encodes to one that decodes to the same message.
#![no_main]

use cachecast_proto::{Ack, Invalidation, MAX_MESSAGE_BYTES, Presence, Wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    if let Ok(event) = Invalidation::from_bytes(payload) {
        assert!(payload.len() <= MAX_MESSAGE_BYTES);
        let again = Invalidation::from_bytes(&event.to_bytes()).expect("re-encoded event decodes");
        assert_eq!(again, event);
    }
    let _ = Ack::from_bytes(payload);
    let _ = Presence::from_bytes(payload);
});
