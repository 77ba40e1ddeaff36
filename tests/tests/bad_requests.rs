//! Bad requests get their status and a stable error code, in the one error shape, with the
//! request id; tokens are checked before anything else. Hostile input (methods, content types
//! and encodings, deep or duplicated JSON, unicode tricks, path tricks in the environment id
//! sent as raw HTTP) is refused with its code, never crashes the server, and publishes nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use cachecast_e2e::{Stack, TEST_SECRET, token_with_rights};
use cachecast_publisher::api::ApiConfig;
use cachecast_publisher::auth::Right;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATH: &str = "/api/1.0/runtime/caches/response/dev/invalidate";

struct Bad {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
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
        what, method: "POST", path: PATH.into(), headers: auth(), body: body.as_bytes().to_vec(), status, code,
    };
    let at = |what, path: String, status, code| Bad {
        what, method: "POST", path, headers: auth(), body: b"{}".to_vec(), status, code,
    };
    let bytes = |what, body: &[u8], status, code| Bad { body: body.to_vec(), ..post(what, "", status, code) };
    let bearer = |token: String| vec![("Authorization", format!("Bearer {token}"))];
    let scoped_only = token_with_rights(TEST_SECRET, &["dev"], &[Right::Scoped]);
    let flush_only = token_with_rights(TEST_SECRET, &["dev"], &[Right::Flush]);
    let no_rights = token_with_rights(TEST_SECRET, &["dev"], &[]);
    let utf16 = |text: &str, bom: bool| {
        let mut out = if bom { vec![0xff, 0xfe] } else { vec![] };
        out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        out
    };
    let deep = |open: &str, close: &str, depth: usize| format!("{}{}", open.repeat(depth), close.repeat(depth));
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
        // Rights.
        Bad { headers: bearer(scoped_only.clone()), ..post("flush with only the scoped right", "{}", 403, "missing_right") },
        Bad { headers: bearer(scoped_only.clone()), ..post("null scope is a flush: needs the flush right", r#"{"scopeClientId": null}"#, 403, "missing_right") },
        Bad { headers: bearer(flush_only), ..post("scoped with only the flush right", r#"{"scopeClientId": "s1"}"#, 403, "missing_right") },
        Bad { headers: bearer(no_rights), ..post("token without rights", "{}", 403, "missing_right") },
        Bad { headers: bearer(scoped_only), path: "/api/1.0/runtime/caches/response/qa/invalidate".into(), ..post("right but another environment", r#"{"scopeClientId": "s1"}"#, 403, "forbidden_environment") },
        Bad { headers: vec![("Authorization", format!("bearer  {good}  "))], ..post("lower-case scheme and spaces: the token is still read", "{", 400, "invalid_json") },
        // Methods.
        Bad { method: "PUT", ..post("PUT", "{}", 405, "method_not_allowed") },
        Bad { method: "PATCH", ..post("PATCH", "{}", 405, "method_not_allowed") },
        Bad { method: "OPTIONS", ..post("OPTIONS", "", 405, "method_not_allowed") },
        Bad { method: "TRACE", ..post("TRACE", "", 405, "method_not_allowed") },
        Bad { method: "PURGE", ..post("a made-up method", "", 405, "method_not_allowed") },
        // Content types and encodings.
        Bad { headers: with(("Content-Type", "application/json; charset=utf-16")), ..post("JSON in UTF-16 by charset", "{}", 415, "unsupported_media_type") },
        Bad { headers: with(("Content-Type", "multipart/form-data; boundary=x")), ..post("multipart", "{}", 415, "unsupported_media_type") },
        Bad { headers: with(("Content-Type", "application/jsonx")), ..post("almost JSON", "{}", 415, "unsupported_media_type") },
        Bad { headers: with(("Content-Encoding", "gzip")), ..bytes("gzip body", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xab, 0xae, 5, 0, 0x43, 0xbf, 0xa6, 0xa3, 2, 0, 0, 0], 415, "unsupported_content_encoding") },
        Bad { headers: with(("Content-Encoding", "identity, br")), ..post("brotli after identity", "{}", 415, "unsupported_content_encoding") },
        bytes("invalid UTF-8", b"{\"identityId\": \"\xff\xfe\"}", 400, "invalid_encoding"),
        bytes("UTF-8 byte order mark", b"\xef\xbb\xbf{}", 400, "invalid_encoding"),
        bytes("UTF-16 with a byte order mark", &utf16("{}", true), 400, "invalid_encoding"),
        bytes("UTF-16 without one", &utf16(r#"{"identityId": "u"}"#, false), 400, "invalid_encoding"),
        bytes("raw NUL after the object", b"{}\x00", 400, "invalid_encoding"),
        // Huge, deep and duplicated JSON.
        post("deeply nested arrays", &deep("[", "]", 2000), 400, "invalid_json"),
        post("deeply nested objects", &format!("{}1{}", r#"{"a":"#.repeat(600), "}".repeat(600)), 400, "invalid_json"),
        post("deep inside a field", &format!(r#"{{"scopeClientIds": {}}}"#, deep("[", "]", 1500)), 400, "invalid_json"),
        post("nested but shallow", r#"{"scopeClientIds": [["s1"]]}"#, 400, "invalid_field_type"),
        post("huge number", &format!(r#"{{"identityId": 1{}}}"#, "0".repeat(1000)), 400, "invalid_json"),
        post("duplicate key", r#"{"identityId": "a", "identityId": "b"}"#, 400, "duplicate_field"),
        post("duplicate key hiding a null", r#"{"scopeClientId": "s1", "scopeClientId": null}"#, 400, "duplicate_field"),
        post("too many scopes", &format!(r#"{{"scopeClientIds": [{}]}}"#, (0..11).map(|n| format!(r#""s{n}""#)).collect::<Vec<_>>().join(",")), 400, "too_many_values"),
        post("too many scopes, all the same", &format!(r#"{{"scopeClientIds": [{}]}}"#, [r#""s""#; 11].join(",")), 400, "too_many_values"),
        post("trailing garbage", "{} {}", 400, "invalid_json"),
        post("trailing comma", r#"{"scopeClientId": "s1",}"#, 400, "invalid_json"),
        post("comments", r#"{/* all */}"#, 400, "invalid_json"),
        post("single quotes", "{'scopeClientId': 's1'}", 400, "invalid_json"),
        post("NaN", r#"{"identityId": NaN}"#, 400, "invalid_json"),
        // Nulls and empty strings.
        post("null in scopes", r#"{"scopeClientIds": ["s1", null]}"#, 400, "invalid_field_type"),
        post("empty string in scopes", r#"{"scopeClientIds": ["s1", ""]}"#, 400, "invalid_value"),
        post("empty scope", r#"{"scopeClientId": ""}"#, 400, "invalid_value"),
        post("empty field name", r#"{"": "s1"}"#, 400, "unknown_field"),
        post("boolean identity", r#"{"identityId": true}"#, 400, "invalid_field_type"),
        // Unicode.
        post("right-to-left override", r#"{"identityId": "adm\u202Enimda"}"#, 400, "invalid_value"),
        post("right-to-left override, raw", "{\"identityId\": \"adm\u{202E}nimda\"}", 400, "invalid_value"),
        post("zero-width space", r#"{"scopeClientId": "orders\u200Bapi"}"#, 400, "invalid_value"),
        post("byte order mark inside a value", r#"{"scopeClientId": "\uFEFForders"}"#, 400, "invalid_value"),
        post("escaped NUL", r#"{"scopeClientId": "orders\u0000"}"#, 400, "invalid_value"),
        post("lone surrogate", r#"{"identityId": "\uD800"}"#, 400, "invalid_json"),
        post("homoglyph field name", "{\"scopeClientІd\": \"s1\"}", 400, "unknown_field"),
        post("zero-width in a field name", "{\"identity\u{200B}Id\": \"u\"}", 400, "unknown_field"),
        post("over-long value in multibyte characters", &format!(r#"{{"identityId": "{}"}}"#, "é".repeat(257)), 400, "invalid_value"),
        // Environment ids the client can send as-is (raw paths are below).
        at("unicode env", "/api/1.0/runtime/caches/response/d%C3%A9v/invalidate".into(), 400, "invalid_env_id"),
        at("encoded NUL env", "/api/1.0/runtime/caches/response/dev%00/invalidate".into(), 400, "invalid_env_id"),
        at("invalid percent-encoding", "/api/1.0/runtime/caches/response/%FF%FE/invalidate".into(), 400, "invalid_env_id"),
        at("very long env", format!("/api/1.0/runtime/caches/response/{}/invalidate", "e".repeat(20_000)), 400, "invalid_env_id"),
        at("encoded dots", "/api/1.0/runtime/caches/response/..%2Fqa/invalidate".into(), 400, "invalid_env_id"),
        at("query in the env", "/api/1.0/runtime/caches/response/dev%3Ftimeout=1s/invalidate".into(), 400, "invalid_env_id"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_code() {
    let stack = hostile_stack().await;
    let (_cache, agent) = stack.memory_agent("dev", "only").await;
    stack.wait_for_agents("dev", 1).await;
    let good = stack.token(&["dev"]);
    let cases = table(&good);
    assert!(cases.len() >= 95, "{} cases", cases.len());

    for case in &cases {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("method");
        assert!(
            case.status != 200,
            "{}: the table holds refusals only",
            case.what
        );
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

    // Path tricks that only raw HTTP can send (a client normalizes `..` away).
    let addr = stack.base_url.trim_start_matches("http://").to_owned();
    // `code: None`: refused by the HTTP parser (not a valid request target) before cachecast
    // sees it, with an empty 400.
    for (what, target, status) in [
        (
            "dot-dot env",
            "/api/1.0/runtime/caches/response/../invalidate".to_owned(),
            400,
        ),
        (
            "dot env",
            "/api/1.0/runtime/caches/response/./invalidate".to_owned(),
            400,
        ),
        (
            "encoded dot-dot env",
            "/api/1.0/runtime/caches/response/%2E%2E/invalidate".to_owned(),
            400,
        ),
        (
            "raw wildcard env",
            "/api/1.0/runtime/caches/response/>/invalidate".to_owned(),
            400,
        ),
        (
            "raw star env",
            "/api/1.0/runtime/caches/response/*/invalidate".to_owned(),
            400,
        ),
        (
            "dot-dot out of the route",
            "/api/1.0/runtime/caches/response/dev/../../identity/dev/invalidate".to_owned(),
            404,
        ),
        (
            "NUL-encoded env",
            "/api/1.0/runtime/caches/response/%00/invalidate".to_owned(),
            400,
        ),
        (
            "backslash env",
            "/api/1.0/runtime/caches/response/dev%5C..%5Cqa/invalidate".to_owned(),
            400,
        ),
        (
            "a 60 KiB env",
            format!(
                "/api/1.0/runtime/caches/response/{}/invalidate",
                "e".repeat(60_000)
            ),
            400,
        ),
    ] {
        let (got, body) = raw_post(&addr, &target, &good).await;
        assert_eq!(got, status, "{what}: {body}");
        if target.contains('>') {
            assert!(body.is_null(), "{what}: {body}");
            continue;
        }
        let code = if status == 400 {
            "invalid_env_id"
        } else {
            "not_found"
        };
        assert_eq!(body["code"], code, "{what}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.len() < 600,
            "{what}: the message does not echo a huge id ({} bytes)",
            message.len()
        );
    }
    // HEAD has no body to read a code from: the status alone.
    let head = stack
        .http
        .head(format!("{}{PATH}", stack.base_url))
        .send()
        .await
        .expect("answers");
    assert_eq!(head.status().as_u16(), 405);

    // The server is healthy after all of them, and nothing was published meanwhile.
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["sequence"], 1,
        "no bad request published an event"
    );
    // Odd but valid: look-alike letters, emoji, a charset parameter, `identity` encoding.
    let odd: [(&str, Option<(&str, &str)>); 3] = [
        (r#"{"identityId": "аlice"}"#, None),
        (
            r#"{"scopeClientId": "orders-🛒"}"#,
            Some(("Content-Encoding", "identity")),
        ),
        (
            r#"{"scopeClientIds": ["s1", "s1"]}"#,
            Some(("Content-Type", "application/json; charset=UTF-8")),
        ),
    ];
    for (n, (body, header)) in odd.into_iter().enumerate() {
        let mut all = vec![("Authorization", format!("Bearer {good}"))];
        all.extend(header.map(|(name, value)| (name, value.to_owned())));
        let answer = stack.post(PATH, body, &all).await;
        assert_eq!(answer.status, 200, "{body}: {}", answer.body);
        assert_eq!(answer.body["sequence"], n + 2, "{body}");
    }
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

/// The stack the hostile cases run against: at most 10 scopes per request.
async fn hostile_stack() -> Stack {
    cachecast_e2e::init_logs();
    let api = ApiConfig {
        max_scopes: 10,
        ..cachecast_e2e::test_api_config()
    };
    Stack::builder().api(api).start().await
}

/// A POST with `target` sent byte for byte (no client-side path normalization); the status
/// and the JSON body of the answer.
async fn raw_post(addr: &str, target: &str, token: &str) -> (u16, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "POST {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut response),
    )
    .await
    .expect("answer within 10 s")
    .expect("read");
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    if body.is_empty() {
        return (status, serde_json::Value::Null);
    }
    let body = serde_json::from_str(body)
        .unwrap_or_else(|err| panic!("{target}: body not JSON ({err}): {text}"));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_is_rate_limited_with_retry_after() {
    cachecast_e2e::init_logs();
    let api = ApiConfig {
        rate_limit_per_second: 0.5,
        rate_limit_burst: 3,
        ..cachecast_e2e::test_api_config()
    };
    let stack = Stack::builder().api(api).start().await;
    let (first, second) = (stack.token(&["dev"]), stack.token(&["dev", "qa"]));
    let send = |token: String| {
        let stack = &stack;
        async move {
            stack
                .http
                .post(format!("{}{PATH}", stack.base_url))
                .header("Authorization", format!("Bearer {token}"))
                .body("{}")
                .send()
                .await
                .expect("answers")
        }
    };
    for n in 0..3 {
        let response = send(first.clone()).await;
        assert_eq!(
            response.status().as_u16(),
            200,
            "request {n} is within the burst"
        );
    }
    let limited = send(first.clone()).await;
    assert_eq!(limited.status().as_u16(), 429);
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header in seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body = cachecast_e2e::answer(limited).await.body;
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("rate_limit_per_second")),
        "{body}"
    );
    // Another token has its own budget; a bad token is refused for what it is, not limited.
    assert_eq!(send(second).await.status().as_u16(), 200);
    assert_eq!(send("garbage".into()).await.status().as_u16(), 401);
}

/// A client that sends a 6 MB body before it reads (as Python's urllib does) gets the `413`,
/// not a connection reset: the server reads and drops the rest of an oversized body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_whole_gets_its_413() {
    let stack = Stack::start().await;
    let address = stack.base_url.trim_start_matches("http://").to_owned();
    let body = format!(r#"{{"scopeClientId": "{}"}}"#, "x".repeat(6 * 1024 * 1024));
    let head = format!(
        "POST /api/1.0/runtime/caches/response/dev/invalidate HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        stack.token(&["dev"]),
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    socket
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    socket
        .write_all(body.as_bytes())
        .await
        .expect("the whole body is taken, not refused half-way");
    let mut answer = Vec::new();
    socket
        .read_to_end(&mut answer)
        .await
        .expect("the answer arrives, not a reset");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}
