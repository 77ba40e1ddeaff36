//! The `cachecast` NATS service: discoverable through `$SRV`, it takes the HTTP API's request
//! as protobuf or JSON and replies with the same outcome. Driven from Python (nats-py, and
//! protobuf classes compiled from `proto/`: clients the project did not write) and from Rust
//! for the refusals.

use std::time::Duration;

use bytes::Bytes;
use cachecast_e2e::{EvictionMode, FaultyCache, Signal, Stack, eventually, start_serve};
use cachecast_proto::{
    CacheName, InvalidateReply, InvalidateRequest, RequestTarget, ResponseSelector, Wire,
};
use cachecast_testkit::ChildProcess;

/// Waits until the stack's NATS service (the server assembly runs it next to the API) answers
/// its own discovery request.
async fn wait_for_service(stack: &Stack) {
    let client = cachecast_bus::connect(&stack.bus.nats, "e2e-service-probe")
        .await
        .expect("NATS client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ping = client.request("$SRV.PING.cachecast", Bytes::new());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service did not answer $SRV.PING"
        );
        // "No responders" comes back at once: poll gently until it subscribed.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_pipeline_invalidates_through_the_service_and_decodes_the_event() {
    let stack = Stack::start().await;
    let _a = stack.memory_agent("dev", "py-a").await;
    let _b = stack.memory_agent("dev", "py-b").await;
    stack.wait_for_agents("dev", 2).await;
    wait_for_service(&stack).await;

    let script = cachecast_testkit::workspace_root().join("tests/python/service_client.py");
    let mut client = ChildProcess::spawn(
        cachecast_testkit::python(),
        [
            script.to_string_lossy().into_owned(),
            stack.nats.url(),
            "dev".to_owned(),
            "2".to_owned(),
        ],
    );
    let status = client.wait_exit(Duration::from_secs(120)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the Python client failed:\n{}",
        client.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_answers_keyed_clears_and_refuses_bad_requests_with_codes() {
    let stack = Stack::start().await;
    let cache =
        cachecast_agent::MemoryCache::with_keyed_caches(
            [CacheName::new("apikeys").expect("valid")],
        );
    let _agent = stack.agent("dev", "keyed", cache.clone()).await;
    stack.wait_for_agents("dev", 1).await;
    wait_for_service(&stack).await;
    let client = cachecast_bus::connect(&stack.bus.nats, "e2e-caller")
        .await
        .expect("NATS client");
    let ask = |subject: &str, payload: Vec<u8>| {
        let (client, subject) = (client.clone(), subject.to_owned());
        async move {
            client
                .request(subject, payload.into())
                .await
                .expect("the service replies")
                .payload
        }
    };
    cache.insert_keyed("apikeys", "k1", Bytes::from_static(b"v"));
    cache.insert_keyed("apikeys", "k2", Bytes::from_static(b"v"));

    let json = |payload: Bytes| -> serde_json::Value {
        serde_json::from_slice(&payload).expect("a JSON reply")
    };
    let reply = json(
        ask(
            "cachecast.svc.v1.dev.invalidate",
            br#"{"keyed":{"cache":"apikeys","ids":["k1"]}}"#.to_vec(),
        )
        .await,
    );
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["cluster_name"], "cachecast", "{reply}");
    assert_eq!(reply["agents"]["keyed"]["evicted"], 1, "{reply}");
    assert!(cache.get_keyed("apikeys", "k1").is_none());
    assert!(cache.get_keyed("apikeys", "k2").is_some());

    for (payload, code) in [
        (
            &br#"{"response":{},"identity":{"identityId":"a"}}"#[..],
            "missing_target",
        ),
        (br#"{"response":{"scopeClientIds":[]}}"#, "invalid_value"),
        (
            br#"{"keyed":{"cache":"apikeys","ids":"k*"}}"#,
            "unsupported_wildcard",
        ),
        (br#"{"response":{},"timeout":"1h"}"#, "invalid_timeout"),
        (br#"{"response":{},"extra":1}"#, "unknown_field"),
        (br#"{"response":"#, "invalid_json"),
        // Which of two equal keys counts is a guess: refused, as the HTTP API does.
        (
            br#"{"response":{"scopeClientId":"s1","scopeClientId":null}}"#,
            "duplicate_field",
        ),
        (
            br#"{"response":{},"response":{"scopeClientId":"s1"}}"#,
            "duplicate_field",
        ),
    ] {
        let reply = json(ask("cachecast.svc.v1.dev.invalidate", payload.to_vec()).await);
        assert_eq!(reply["status"], 400, "{reply}");
        assert_eq!(reply["code"], code, "{}", String::from_utf8_lossy(payload));
    }

    let proto = |payload: Bytes| InvalidateReply::from_bytes(&payload).expect("a protobuf reply");
    let garbage = proto(ask("cachecast.svc.v1.dev.invalidate", vec![0xff, 0xff, 0xff]).await);
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.error.expect("an error").code, "invalid_protobuf");
    let untargeted = InvalidateRequest::default().to_bytes().to_vec();
    let reply = proto(ask("cachecast.svc.v1.dev.invalidate", untargeted).await);
    assert_eq!(reply.error.expect("an error").code, "missing_target");
    let whole = InvalidateRequest {
        request_id: "rust-1".into(),
        timeout_ms: 5000,
        target: Some(RequestTarget::Response(ResponseSelector::default())),
    };
    let reply = proto(ask("cachecast.svc.v1.dev.invalidate", whole.to_bytes().to_vec()).await);
    assert_eq!((reply.status, reply.total, reply.successful), (200, 1, 1));
    assert_eq!(reply.request_id, "rust-1");
    // A response flush leaves the keyed caches alone.
    assert_eq!(cache.keyed_len("apikeys"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_service_request_in_flight_and_sends_its_real_answer() {
    let stack = Stack::start().await;
    let cache = FaultyCache::default();
    let _agent = stack.agent("dev", "slow", cache.clone()).await;
    stack.wait_for_agents("dev", 1).await;
    cache.set_mode(EvictionMode::Slow(Duration::from_secs(2)));
    let (mut serve, _) = start_serve(&stack.nats.url(), &[]).await;
    serve
        .wait_for_output("NATS service ready", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the NATS service did not start: {e}"));
    let client = cachecast_bus::connect(&stack.bus.nats, "e2e-caller")
        .await
        .expect("NATS client");
    let begun = cache.evictions_started();
    let request = tokio::spawn(async move {
        let body = br#"{"response":{"scopeClientIds":["s1"]},"timeout":"10s"}"#;
        client
            .send_request(
                "cachecast.svc.v1.dev.invalidate",
                async_nats::Request::new()
                    .payload(Bytes::from_static(body))
                    .timeout(Some(Duration::from_secs(15))),
            )
            .await
    });
    eventually(
        "the agent begins the slow eviction",
        Duration::from_secs(10),
        || std::future::ready(cache.evictions_started() > begun),
    )
    .await;

    serve.signal(Signal::SIGTERM);
    let reply = request
        .await
        .expect("the request task")
        .expect("the service replies although it was told to stop");
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).expect("a JSON reply");
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["agents"]["slow"]["status"], "applied", "{reply}");
    let exit = serve.wait_exit(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "serve exits cleanly: {exit:?}"
    );
}
