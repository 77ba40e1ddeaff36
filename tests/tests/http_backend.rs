//! The HTTP callback backend: for a cache the agent cannot reach, each eviction is a `POST` to
//! the cache owner, and the agent acknowledges only what the owner confirmed. The owner here is
//! a real HTTP server that records every call and answers as the test tells it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cachecast_agent::{HttpBackend, HttpConfig};
use cachecast_bus::Secret;
use cachecast_e2e::Stack;
use cachecast_proto::CacheName;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One call the owner received: its path, its `authorization` header and its body.
#[derive(Debug)]
struct Call {
    path: String,
    authorization: String,
    body: Value,
}

/// What the owner answers next: a status and a body.
type Answer = Arc<Mutex<(StatusCode, Value)>>;

#[derive(Clone)]
struct Owner {
    calls: mpsc::UnboundedSender<Call>,
    answer: Answer,
}

async fn evict(
    State(owner): State<Owner>,
    Path((env, kind)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    owner
        .calls
        .send(Call {
            path: format!("{env}/{kind}"),
            authorization,
            body,
        })
        .ok();
    let (status, body) = owner.answer.lock().expect("lock").clone();
    (status, Json(body))
}

/// Starts the owner; returns its base URL, the calls it receives and its answer switch.
async fn owner() -> (String, mpsc::UnboundedReceiver<Call>, Answer) {
    let (calls, received) = mpsc::unbounded_channel();
    let answer: Answer = Arc::new(Mutex::new((StatusCode::OK, json!({"evicted": 0}))));
    let app = axum::Router::new()
        .route("/owner/{env}/{kind}", post(evict))
        .with_state(Owner {
            calls,
            answer: answer.clone(),
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the owner");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (base, received, answer)
}

async fn next(calls: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("the owner is called within 10 s")
        .expect("the owner is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_eviction_is_posted_to_the_owner_and_acknowledged_as_it_answers() {
    let stack = Stack::start().await;
    let (base, mut calls, answer) = owner().await;
    let config = HttpConfig {
        url: format!("{base}/owner/{{env}}/{{kind}}"),
        headers: BTreeMap::from([(
            "authorization".to_owned(),
            Secret::new("Bearer owner-secret"),
        )]),
        keyed_caches: vec![CacheName::new("apikeys").expect("valid")],
        ..HttpConfig::default()
    };
    let _agent = stack
        .agent(
            "dev",
            "owner-agent",
            HttpBackend::new(&config).expect("backend"),
        )
        .await;
    stack.wait_for_agents("dev", 1).await;

    // The start-up flush is one call, with the configured header.
    let flush = next(&mut calls).await;
    assert_eq!(flush.path, "dev/flush");
    assert_eq!(flush.authorization, "Bearer owner-secret");
    assert_eq!(flush.body, json!({"env": "dev", "kind": "flush"}));

    *answer.lock().expect("lock") = (StatusCode::OK, json!({"evicted": 7}));
    let cases = [
        (
            "/api/1.0/runtime/caches/response/dev/invalidate",
            r#"{"scopeClientIds":["s2","s1"],"identityId":"alice"}"#,
            "dev/response",
            json!({"env": "dev", "kind": "response", "scopeClientIds": ["s1", "s2"], "identityId": "alice"}),
        ),
        (
            "/api/1.0/runtime/caches/identity/dev/invalidate",
            r#"{"identityTemplate":"User"}"#,
            "dev/identity",
            json!({"env": "dev", "kind": "identity", "identityTemplate": "User", "identityId": null}),
        ),
        (
            "/api/1.0/runtime/caches/keyed/dev/apikeys/k1,k2/_clear_cache",
            "",
            "dev/keyed",
            json!({"env": "dev", "kind": "keyed", "cache": "apikeys", "ids": ["k1", "k2"], "all": false}),
        ),
        (
            "/api/1.0/runtime/caches/keyed/dev/apikeys/*/_clear_cache",
            "",
            "dev/keyed",
            json!({"env": "dev", "kind": "keyed", "cache": "apikeys", "ids": [], "all": true}),
        ),
    ];
    for (path, body, owner_path, expected) in cases {
        let answer = stack.post_as("dev", path, body).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        assert_eq!(answer.body["agents"]["owner-agent"]["evicted"], 7, "{path}");
        let call = next(&mut calls).await;
        assert_eq!(call.path, owner_path);
        assert_eq!(call.body, expected, "{path}");
    }

    // The owner refuses: a 424 quoting it, and the cache is flushed before anything else is
    // confirmed.
    *answer.lock().expect("lock") = (
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": "cache is rebuilding"}),
    );
    let refused = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "")
        .await;
    assert_eq!(refused.status, 424, "{}", refused.body);
    let reason = refused.body["_nodes"]["failures"][0]["reason"]
        .as_str()
        .expect("a reason");
    assert!(
        reason.contains("503") && reason.contains("cache is rebuilding"),
        "{reason}"
    );
    assert_eq!(next(&mut calls).await.path, "dev/response");

    *answer.lock().expect("lock") = (StatusCode::OK, json!({}));
    let confirmed = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "")
        .await;
    assert_eq!(confirmed.status, 200, "{}", confirmed.body);
    // An owner that does not count evicted an unknown number: reported as 0.
    assert_eq!(confirmed.body["agents"]["owner-agent"]["evicted"], 0);
    // The repair flush (by the agent's own retry or before this event) comes first.
    let mut before = Vec::new();
    loop {
        let call = next(&mut calls).await;
        if call.path == "dev/response" {
            break;
        }
        before.push(call.path);
    }
    assert_eq!(
        before.last().map(String::as_str),
        Some("dev/flush"),
        "{before:?}"
    );

    // A redirect is not a confirmation (it would be followed to a login page, say).
    *answer.lock().expect("lock") = (StatusCode::FOUND, json!({"evicted": 7}));
    let redirected = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "")
        .await;
    assert_eq!(redirected.status, 424, "{}", redirected.body);
    let reason = redirected.body["_nodes"]["failures"][0]["reason"]
        .as_str()
        .expect("a reason");
    assert!(reason.contains("302"), "{reason}");
}
