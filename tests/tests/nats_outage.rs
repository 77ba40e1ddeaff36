//! When NATS is down the API says so at once (`503`, `Retry-After`, nothing published), and
//! when NATS is back it works again without restarting anything.

use std::time::{Duration, Instant};

use cachecast_e2e::{Stack, eventually};
use cachecast_proto::{Ack, Acks, Subjects, Wire};
use futures::StreamExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_is_a_fast_503_and_recovery_needs_no_restart() {
    let mut stack = Stack::start().await;
    let (cache, agent) = stack.memory_agent("dev", "survivor").await;
    stack.wait_for_agents("dev", 1).await;
    assert_eq!(stack.invalidate("dev", "{}", "").await.status, 200);

    stack.nats.stop().await;
    for attempt in 0..3 {
        let started = Instant::now();
        let answer = stack.invalidate("dev", "{}", "").await;
        let took = started.elapsed();
        assert_eq!(answer.status, 503, "attempt {attempt}: {}", answer.body);
        assert_eq!(answer.body["code"], "bus_unavailable");
        assert!(
            took < Duration::from_millis(1500),
            "attempt {attempt} took {took:?}"
        );
    }
    let token = stack.token(&["dev"]);
    let raw = stack
        .http
        .post(format!(
            "{}/api/1.0/runtime/caches/response/dev/invalidate",
            stack.base_url
        ))
        .header("Authorization", format!("Bearer {token}"))
        .body("{}")
        .send()
        .await
        .expect("answers");
    assert_eq!(raw.status().as_u16(), 503);
    assert!(
        raw.headers().get("retry-after").is_some(),
        "Retry-After is set"
    );

    stack.nats.start_again().await.expect("NATS restarts");
    // Clients reconnect on their own; poll the API (each answer is immediate) until the
    // agent confirms again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
        let answer = stack.invalidate("dev", "{}", "?timeout=2s").await;
        if answer.status == 200 {
            // Never a 200 that skips the agent: it was heartbeating all along.
            assert_eq!(answer.body["_nodes"]["total"], 1, "{}", answer.body);
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery within 30s; last answer {} {}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(answer.body["agents"]["survivor"]["status"], "applied");
    // Events published while the agent was cut off may be applied first (they stay in the
    // stream); either way, after a 200 the entry is gone.
    assert!(!cache.contains("k"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_nats_flushes_its_cache_while_it_cannot_hear() {
    let mut stack = Stack::start().await;
    let cache = cachecast_agent::MemoryCache::new();
    let config = cachecast_agent::AgentConfig {
        heartbeat: Duration::from_millis(200),
        ..cachecast_agent::AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "cut-off")
        .config(config)
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));

    stack.nats.stop().await;
    // Publishers stop expecting it after three missed heartbeats (600 ms); it must not keep
    // serving what it can no longer hear invalidated. The cache is polled: nothing announces it.
    eventually(
        "the cache is flushed while cut off",
        Duration::from_secs(5),
        || std::future::ready(!cache.contains("k")),
    )
    .await;
    // Nor does it cache anything until it hears invalidations again.
    cache.insert("k2", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    assert!(!cache.contains("k2"), "a cut-off cache took an entry");
    stack.nats.start_again().await.expect("NATS restarts");
    eventually(
        "the cache caches again once the agent is back",
        Duration::from_secs(15),
        || {
            cache.insert("k3", "s1", "u1", bytes::Bytes::from_static(b"permit"));
            std::future::ready(cache.contains("k3"))
        },
    )
    .await;
    agent.stop().await;
    assert!(cache.is_empty(), "a stopped agent's cache is flushed");
    cache.insert("k4", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    assert!(!cache.contains("k4"), "and caches nothing once it stopped");
}

/// A memory cache whose evictions of scope `hang` never finish (the agent gives up after
/// `agent.evict_timeout`); everything else, flushes included, goes to the cache.
#[derive(Debug, Clone)]
struct HangingScope(cachecast_agent::MemoryCache);

impl cachecast_agent::CacheBackend for HangingScope {
    fn kind(&self) -> &'static str {
        "hanging"
    }

    async fn evict_responses(
        &self,
        env: &cachecast_proto::EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        if selector.scope_client_ids.iter().any(|s| s == "hang") {
            std::future::pending::<()>().await;
        }
        cachecast_agent::CacheBackend::evict_responses(&self.0, env, selector).await
    }

    async fn evict_identities(
        &self,
        env: &cachecast_proto::EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        cachecast_agent::CacheBackend::evict_identities(&self.0, env, selector).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_during_a_hanging_eviction_still_flushes_in_time() {
    let mut stack = Stack::start().await;
    let cache = cachecast_agent::MemoryCache::new();
    let config = cachecast_agent::AgentConfig {
        heartbeat: Duration::from_millis(200),
        evict_timeout: Duration::from_secs(60),
        ..cachecast_agent::AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "stuck")
        .config(config)
        .start(HangingScope(cache.clone()))
        .await;
    stack.wait_for_agents("dev", 1).await;
    // The agent's event loop is now inside an eviction that will not end for a minute.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"hang"}"#, "?timeout=300ms")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    cache.insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));

    stack.nats.stop().await;
    // Publishers stop expecting it 600 ms after its last heartbeat; the flush must not wait
    // for the eviction in hand.
    eventually(
        "the cache is flushed while cut off, despite the hanging eviction",
        Duration::from_secs(5),
        || std::future::ready(!cache.contains("k")),
    )
    .await;
    stack.nats.start_again().await.expect("NATS restarts");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_publish_ack_is_retried_and_the_event_applied_once() {
    let stack = Stack::start().await;
    let (_cache, agent) = stack.memory_agent("dev", "steady").await;
    // A generous budget (2 s an attempt), so a loaded machine resumes the server in time.
    let (serve, api) = cachecast_e2e::start_serve(
        &stack.nats.url(),
        &[("CACHECAST_NATS__REQUEST_TIMEOUT", "4s")],
    )
    .await;
    stack.wait_for_agents("dev", 1).await;
    let token = stack.token(&["dev"]);
    let (observer, mut acks) = stack.ack_observer("dev").await;
    let invalidate = {
        let (api, token) = (api.clone(), token.clone());
        move || {
            let (api, token) = (api.clone(), token.clone());
            async move {
                let response = reqwest::Client::new()
                    .post(format!(
                        "{api}/api/1.0/runtime/caches/response/dev/invalidate?timeout=5s"
                    ))
                    .bearer_auth(token)
                    .body("{}")
                    .send()
                    .await
                    .expect("answers");
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.expect("JSON");
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["_nodes"]["successful"], 1, "{body}");
                body["eventId"].as_str().expect("an event id").to_owned()
            }
        }
    };

    // A paused server keeps the connection open and answers nothing: the first publish
    // acknowledgement never comes in time.
    stack.nats.pause().expect("pause");
    let request = tokio::spawn(invalidate());
    serve
        .wait_for_output("retrying with the same event id", Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("no retry: {e}"));
    stack.nats.resume().expect("resume");
    let retried = request.await.expect("request task");

    // Both attempts reached the server (the retry is sent after it answered again, and the
    // pause is shorter than the client's ping interval): events carry no Nats-Msg-Id, so the
    // stream stored the event twice.
    let mut stream = async_nats::jetstream::new(observer.clone())
        .get_stream("CACHECAST")
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 2);
    // The agent sends its acks in stream order on one connection: once the next event's ack
    // is in, any ack of the second copy came before it.
    let next = invalidate().await;
    let mut of_retried = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'acks: loop {
        let message = tokio::time::timeout_at(deadline, acks.next())
            .await
            .expect("the next event's ack within 10 s")
            .expect("subscription open");
        let together = message.subject.as_str().split('.').nth(5) == Some(Subjects::ACKS_TOGETHER);
        let received = if together {
            Acks::from_bytes(&message.payload).expect("acks").acks
        } else {
            vec![Ack::from_bytes(&message.payload).expect("an ack")]
        };
        for ack in received {
            of_retried += usize::from(ack.event_id == retried);
            if ack.event_id == next {
                break 'acks;
            }
        }
    }
    assert_eq!(of_retried, 1, "the event stored twice is acknowledged once");
    agent.stop().await;
}

/// Soak seed 453: a memory agent cut off whose flushes fail. Publishers answer `200` without
/// it, so its cache must serve nothing it still holds, and must not serve again, once back,
/// until a flush has succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_cache_whose_flush_fails_serves_nothing_until_a_flush_succeeds() {
    let stack = Stack::start().await;
    let proxy = cachecast_e2e::TcpProxy::start(stack.nats.port()).await;
    let cache = cachecast_e2e::FaultyCache::default();
    let heartbeat = Duration::from_millis(200);
    let config = cachecast_agent::AgentConfig {
        heartbeat,
        ..cachecast_agent::AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "failing")
        .via(&proxy.nats_url())
        .config(config)
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    cache
        .cache
        .insert("k", "s1", "u1", bytes::Bytes::from_static(b"permit"));
    cache.set_mode(cachecast_e2e::EvictionMode::Failing);

    proxy.cut();
    // Publishers stop expecting it, and a request is answered without it.
    stack.wait_for_agents("dev", 0).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=500ms")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0, "{}", answer.body);
    assert!(
        cache.cache.contains("k"),
        "the flush failed: the entry is still held"
    );
    assert_eq!(
        cache.cache.get("k"),
        None,
        "but a suspended cache serves nothing"
    );

    // Back, its flushes still failing: it stays suspended, however many heartbeats pass.
    proxy.restore();
    stack.wait_for_agents("dev", 1).await;
    let flushes = cache.evictions_started();
    eventually(
        "the agent tries to flush again",
        Duration::from_secs(5),
        || std::future::ready(cache.evictions_started() >= flushes + 3),
    )
    .await;
    assert_eq!(
        cache.cache.get("k"),
        None,
        "served again before a flush succeeded"
    );

    // A flush succeeds: the cache is empty, and serves (and caches) again a heartbeat later.
    cache.set_mode(cachecast_e2e::EvictionMode::Normal);
    eventually("the cache serves again", Duration::from_secs(5), || {
        std::future::ready(cache.cache.is_serving())
    })
    .await;
    assert!(!cache.cache.contains("k"));
    agent.stop().await;
}
