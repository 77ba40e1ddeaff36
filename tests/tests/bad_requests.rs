//! Bad requests get their status and a stable error code, in the one error shape, with the
//! request id; tokens are checked before anything else.

use std::time::{SystemTime, UNIX_EPOCH};

use cachecast_e2e::{Stack, TEST_SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

const PATH: &str = "/api/1.0/runtime/caches/response/dev/invalidate";

struct Bad {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: String,
    status: u16,
    code: &'static str,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    envs: &'a [&'a str],
}

/// A token signed by this test, not by cachecast.
fn signed(secret: &str, exp: u64, envs: &[&str]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: "t",
            exp,
            envs,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

#[rustfmt::skip]
fn table(good: &str) -> Vec<Bad> {
    let auth = || vec![("Authorization", format!("Bearer {good}"))];
    let with = |extra: (&'static str, &str)| {
        let mut h = auth();
        h.push((extra.0, extra.1.to_owned()));
        h
    };
    let post = |what, body: &str, status, code| Bad {
        what, method: "POST", path: PATH.into(), headers: auth(), body: body.into(), status, code,
    };
    let at = |what, path: String, status, code| Bad {
        what, method: "POST", path, headers: auth(), body: "{}".into(), status, code,
    };
    let bearer = |token: String| vec![("Authorization", format!("Bearer {token}"))];
    let future = now() + 3600;
    // {"alg":"none"} . {"sub":"t","exp":4102444800,"envs":["dev"]} . (no signature)
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ0IiwiZXhwIjo0MTAyNDQ0ODAwLCJlbnZzIjpbImRldiJdfQ.";
    vec![
        // Tokens.
        Bad { headers: vec![], ..post("no token", "{}", 401, "missing_token") },
        Bad { headers: vec![("Authorization", "Basic dXNlcjpwYXNz".into())], ..post("basic auth", "{}", 401, "invalid_token") },
        Bad { headers: bearer("garbage".into()), ..post("garbage token", "{}", 401, "invalid_token") },
        Bad { headers: bearer(signed(TEST_SECRET, now() - 3600, &["dev"])), ..post("expired token", "{}", 401, "token_expired") },
        Bad { headers: bearer(signed("not-the-secret", future, &["dev"])), ..post("wrong secret", "{}", 401, "invalid_token") },
        Bad { headers: bearer(alg_none.into()), ..post("alg none", "{}", 401, "invalid_token") },
        Bad { headers: bearer(signed(TEST_SECRET, future, &["qa"])), ..post("token for another environment", "{}", 403, "forbidden_environment") },
        Bad { headers: bearer(signed(TEST_SECRET, future, &[])), ..post("token without environments", "{}", 403, "forbidden_environment") },
        // Environment ids.
        at("dotted env", "/api/1.0/runtime/caches/response/dev.prod/invalidate".into(), 400, "invalid_env_id"),
        at("wildcard env", "/api/1.0/runtime/caches/response/*/invalidate".into(), 400, "invalid_env_id"),
        at("full wildcard env", "/api/1.0/runtime/caches/response/%3E/invalidate".into(), 400, "invalid_env_id"),
        at("env with a space", "/api/1.0/runtime/caches/response/dev%20x/invalidate".into(), 400, "invalid_env_id"),
        at("encoded slash", "/api/1.0/runtime/caches/response/a%2Fb/invalidate".into(), 400, "invalid_env_id"),
        at("env too long", format!("/api/1.0/runtime/caches/response/{}/invalidate", "e".repeat(129)), 400, "invalid_env_id"),
        // Bodies.
        post("no body", "", 400, "missing_body"),
        post("blank body", " \n", 400, "missing_body"),
        post("not JSON", "scope=s1", 400, "invalid_json"),
        post("truncated JSON", r#"{"scopeClientId": "#, 400, "invalid_json"),
        post("array body", "[]", 400, "body_not_object"),
        post("string body", r#""{}""#, 400, "body_not_object"),
        post("null body", "null", 400, "body_not_object"),
        post("number scope", r#"{"scopeClientId": 5}"#, 400, "invalid_field_type"),
        post("string scopes", r#"{"scopeClientIds": "s1"}"#, 400, "invalid_field_type"),
        post("number in scopes", r#"{"scopeClientIds": ["s1", 2]}"#, 400, "invalid_field_type"),
        post("object identity", r#"{"identityId": {"id": "u1"}}"#, 400, "invalid_field_type"),
        post("empty scopes", r#"{"scopeClientIds": []}"#, 400, "invalid_value"),
        post("empty identity", r#"{"identityId": ""}"#, 400, "invalid_value"),
        post("control character", r#"{"identityId": "a\u0000b"}"#, 400, "invalid_value"),
        post("identity too long", &format!(r#"{{"identityId": "{}"}}"#, "u".repeat(513)), 400, "invalid_value"),
        post("unknown field", r#"{"scope": "s1"}"#, 400, "unknown_field"),
        post("field in the wrong case", r#"{"scopeclientid": "s1"}"#, 400, "unknown_field"),
        post("body too large", &format!(r#"{{"identityId": "{}"}}"#, "u".repeat(5000)), 413, "body_too_large"),
        // Query, headers, routes.
        at("timeout without unit", format!("{PATH}?timeout=5"), 400, "invalid_timeout"),
        at("timeout not a duration", format!("{PATH}?timeout=soon"), 400, "invalid_timeout"),
        at("zero timeout", format!("{PATH}?timeout=0s"), 400, "invalid_timeout"),
        at("timeout over the cap", format!("{PATH}?timeout=2h"), 400, "invalid_timeout"),
        at("unknown parameter", format!("{PATH}?wait=true"), 400, "unknown_parameter"),
        Bad { headers: with(("Content-Type", "text/plain")), ..post("text body", "{}", 415, "unsupported_media_type") },
        Bad { headers: with(("Content-Type", "application/x-www-form-urlencoded")), ..post("form body", "{}", 415, "unsupported_media_type") },
        Bad { headers: with(("RequestID", "has space")), ..post("request id with a space", "{}", 400, "invalid_request_id") },
        Bad { headers: with(("X-Request-ID", &"r".repeat(129))), ..post("request id too long", "{}", 400, "invalid_request_id") },
        Bad { method: "GET", ..post("GET", "", 405, "method_not_allowed") },
        Bad { method: "DELETE", ..post("DELETE", "", 405, "method_not_allowed") },
        at("unknown route", "/api/1.0/runtime/caches/nope/dev/invalidate".into(), 404, "not_found"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_code() {
    let stack = Stack::start().await;
    let (_cache, agent) = stack.memory_agent("dev", "only").await;
    stack.wait_for_agents("dev", 1).await;
    let good = stack.token(&["dev"]);
    let cases = table(&good);
    assert!(cases.len() >= 40, "{} cases", cases.len());

    for case in &cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("method");
        let mut request = stack
            .http
            .request(method, format!("{}{}", stack.base_url, case.path))
            .body(case.body.clone());
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let answer = cachecast_e2e::answer(request.send().await.expect("answers")).await;
        assert_eq!(answer.status, case.status, "{}: {}", case.what, answer.body);
        assert_eq!(
            answer.body["code"], case.code,
            "{}: {}",
            case.what, answer.body
        );
        assert_eq!(answer.body["status"], case.status, "{}", case.what);
        assert!(
            answer.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}: a message for people",
            case.what
        );
        let id = answer.body["requestId"].as_str().unwrap_or_default();
        if case.status != 404 && case.status != 405 {
            assert!(!id.is_empty(), "{}: requestId in the body", case.what);
            assert_eq!(
                answer.request_id_header.as_deref(),
                Some(id),
                "{}",
                case.what
            );
        }
        if case.status == 401 {
            // Nothing is published for an unauthenticated caller.
            assert!(answer.body.get("sequence").is_none(), "{}", case.what);
        }
    }

    // The server is healthy after all of them, and nothing was published meanwhile.
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["sequence"], 1,
        "no bad request published an event"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_echoed_or_generated() {
    let stack = Stack::start().await;
    let token = stack.token(&["dev"]);
    for (header, value) in [("RequestID", "abc-123"), ("X-Request-ID", "xyz-789")] {
        let answer = stack
            .post(
                PATH,
                "{}",
                &[
                    ("Authorization", format!("Bearer {token}")),
                    (header, value.into()),
                ],
            )
            .await;
        assert_eq!(answer.body["requestId"], value);
        assert_eq!(answer.request_id_header.as_deref(), Some(value));
    }
    let answer = stack
        .post(PATH, "{}", &[("Authorization", format!("Bearer {token}"))])
        .await;
    let generated = answer.body["requestId"].as_str().unwrap_or_default();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(&generated[14..15], "7", "version 7: {generated}");
}
