//! An agent cut off from NATS (the server keeps running for everyone else) catches up when it
//! is back: it applies every event it missed, in order; or, when the stream no longer holds
//! them, it flushes its whole cache.

use std::time::Duration;

use bytes::Bytes;
use cachecast_agent::{AgentConfig, MemoryCache};
use cachecast_e2e::{AgentHandle, Stack, TcpProxy, eventually};

/// A long heartbeat, so the agent's own "cut off" flush stays out of these tests.
fn slow_heartbeat() -> AgentConfig {
    AgentConfig {
        heartbeat: Duration::from_secs(10),
        ..AgentConfig::default()
    }
}

fn seed(cache: &MemoryCache) {
    for scope in ["s1", "s2", "s3"] {
        cache.insert(
            &format!("{scope}/k"),
            scope,
            "u1",
            Bytes::from_static(b"permit"),
        );
    }
}

/// An agent of `dev` connected through a proxy the test can cut, its cache seeded.
async fn cut_off_agent(stack: &Stack) -> (TcpProxy, MemoryCache, AgentHandle) {
    let proxy = TcpProxy::start(stack.nats.port()).await;
    let cache = MemoryCache::new();
    let agent = stack
        .agent_builder("dev", "cut")
        .via(&proxy.nats_url())
        .config(slow_heartbeat())
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    seed(&cache);
    (proxy, cache, agent)
}

async fn until(what: &str, done: impl Fn() -> bool) {
    eventually(what, Duration::from_secs(15), || std::future::ready(done())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_missed_while_cut_off_are_applied_on_return() {
    let stack = Stack::start().await;
    let (proxy, cache, agent) = cut_off_agent(&stack).await;

    proxy.cut();
    for scope in ["s1", "s2"] {
        let answer = stack
            .invalidate(
                "dev",
                &format!(r#"{{"scopeClientId":"{scope}"}}"#),
                "?timeout=500ms",
            )
            .await;
        assert_eq!(answer.status, 424, "{}", answer.body);
        assert_eq!(answer.failed_agents(), ["cut"]);
    }
    assert!(
        cache.contains("s1/k") && cache.contains("s2/k"),
        "nothing applied while cut off"
    );
    proxy.restore();

    until("replaying the missed events", || {
        !cache.contains("s1/k") && !cache.contains("s2/k")
    })
    .await;
    assert!(
        cache.contains("s3/k"),
        "replayed, not flushed: s3 was never invalidated"
    );
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s3"}"#, "")
        .await;
    assert_eq!(
        answer.status, 200,
        "newer events are confirmed again: {}",
        answer.body
    );
    assert!(cache.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_by_retention_while_cut_off_mean_a_full_flush() {
    let stack = Stack::builder()
        .bus(|bus| {
            bus.stream.max_age = Duration::from_secs(1);
        })
        .start()
        .await;
    let (proxy, cache, agent) = cut_off_agent(&stack).await;

    proxy.cut();
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=500ms")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    // Wait until retention has dropped the event the agent missed.
    let client = cachecast_bus::connect(&stack.bus.nats, "observer")
        .await
        .expect("client");
    let js = async_nats::jetstream::new(client);
    eventually("retention drops the event", Duration::from_secs(15), || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("CACHECAST").await.expect("stream");
            stream.info().await.expect("info").state.messages == 0
        }
    })
    .await;
    assert!(cache.contains("s1/k"), "nothing applied while cut off");
    proxy.restore();

    // It cannot prove it saw every event: everything goes, s2 and s3 too.
    until("the flush after the gap", || cache.is_empty()).await;
    agent.stop().await;
}
