//! Property tests of the request-body parser (`http::parse_response_body`): arbitrary bytes and
//! arbitrary JSON never panic and fail only with documented codes; valid bodies round-trip
//! into the selector they describe.

use cachecast_publisher::api::{ApiConfig, BODY_ERROR_CODES, parse_response_body};
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> ApiConfig {
    ApiConfig {
        max_scopes: 20,
        ..ApiConfig::default()
    }
}

fn check_error(
    result: &Result<cachecast_proto::ResponseSelector, cachecast_publisher::api::Refusal>,
) {
    if let Err(err) = result {
        assert!(
            BODY_ERROR_CODES.contains(&err.code),
            "undocumented code {}",
            err.code
        );
        assert_eq!(err.status(), 400, "{}", err.code);
        assert!(!err.message.is_empty());
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("scopeClientId".to_owned()),
                        Just("scopeClientIds".to_owned()),
                        Just("identityId".to_owned()),
                        ".{0,8}"
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A value the API accepts: no control, bidi or zero-width characters, 1 to 512 bytes.
fn valid_value() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9@._:/ é漢🛒-]{1,40}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        check_error(&parse_response_body(&body, &config()));
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let body = serde_json::to_vec(&value).expect("serializes");
        check_error(&parse_response_body(&body, &config()));
    }

    #[test]
    fn valid_bodies_round_trip(
        scope in prop::option::of(valid_value()),
        scopes in prop::option::of(prop::collection::vec(valid_value(), 1..8)),
        identity in prop::option::of(valid_value()),
    ) {
        let mut body = serde_json::Map::new();
        if let Some(s) = &scope { body.insert("scopeClientId".into(), json!(s)); }
        if let Some(s) = &scopes { body.insert("scopeClientIds".into(), json!(s)); }
        if let Some(i) = &identity { body.insert("identityId".into(), json!(i)); }
        let bytes = serde_json::to_vec(&Value::Object(body)).expect("serializes");
        let selector = parse_response_body(&bytes, &config()).expect("valid body");
        let mut expected: Vec<String> = scope.into_iter().chain(scopes.into_iter().flatten()).collect();
        expected.sort();
        expected.dedup();
        prop_assert_eq!(selector.scope_client_ids, expected);
        prop_assert_eq!(selector.identity_id, identity);
    }

    #[test]
    fn too_many_scopes_are_refused(count in 21usize..60) {
        let scopes: Vec<String> = (0..count).map(|n| format!("s{n}")).collect();
        let body = serde_json::to_vec(&json!({"scopeClientIds": scopes})).expect("serializes");
        let err = parse_response_body(&body, &config()).expect_err("over the limit");
        prop_assert_eq!(err.code, "too_many_values");
        prop_assert!(err.message.contains("api.max_scopes"));
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for depth in [200, 10_000, 100_000] {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let err = parse_response_body(body.as_bytes(), &config()).expect_err("too deep");
        assert_eq!(err.code, "invalid_json");
    }
}
