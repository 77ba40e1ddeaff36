//! Fuzzes the request-body parser: any bytes give a selector or an error with a documented
//! code, never a panic.
#![no_main]

use cachecast_publisher::api::{ApiConfig, BODY_ERROR_CODES, parse_response_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Err(err) = parse_response_body(body, &ApiConfig::default()) {
        assert!(BODY_ERROR_CODES.contains(&err.code), "undocumented code {}", err.code);
    }
});
