//! An agent that hears nothing, or misses events, neither vouches for its cache nor keeps
//! serving it: a stream recreated under it, events that expired before it took them, and a
//! consumer that stalls while presence stays fresh. Each test looks into the cache itself.

use std::time::Duration;

use bytes::Bytes;
use cachecast_agent::{AgentConfig, MemoryCache};
use cachecast_e2e::{NatsServer, RedisCache, Signal, Stack, env_id, eventually, redis_agent};

const WITHIN: Duration = Duration::from_secs(20);

fn fill(cache: &MemoryCache, scopes: &[&str]) {
    for scope in scopes {
        cache.insert(
            &format!("{scope}/k"),
            scope,
            "u1",
            Bytes::from_static(b"permit"),
        );
    }
}

async fn until(what: &str, done: impl Fn() -> bool) {
    eventually(what, WITHIN, || std::future::ready(done())).await;
}

/// An observer's JetStream context on the stack's server.
async fn jetstream(stack: &Stack) -> async_nats::jetstream::Context {
    let client = cachecast_bus::connect(&stack.bus.nats, "observer")
        .await
        .expect("observer client");
    async_nats::jetstream::new(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_recreated_under_a_running_agent_is_flushed_and_followed() {
    let stack = Stack::start().await;
    let (cache, agent) = stack.memory_agent("dev", "a1").await;
    stack.wait_for_agents("dev", 1).await;
    // The old stream's sequence runs ahead of the new one's.
    for _ in 0..5 {
        let answer = stack
            .invalidate("dev", r#"{"scopeClientId":"s9"}"#, "")
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    fill(&cache, &["s1", "s2"]);

    // An operator deletes the stream; the next request creates it anew. Whatever it answers,
    // the agent must notice the new stream: the events of the old one are gone for good.
    jetstream(&stack)
        .await
        .delete_stream("CACHECAST")
        .await
        .expect("delete the stream");
    let _ = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=1s")
        .await;
    until("the agent flushes after the stream was recreated", || {
        !cache.contains("s1/k") && !cache.contains("s2/k")
    })
    .await;

    // It follows the new stream: new events are applied and confirmed.
    fill(&cache, &["s3"]);
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s3"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!cache.contains("s3/k"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_expired_while_an_agent_was_paused_mean_a_flush() {
    let stack = Stack::builder()
        .bus(|bus| {
            bus.stream.max_age = Duration::from_secs(3);
        })
        .start()
        .await;
    let redis = cachecast_testkit::redis().await;
    let mut cache = RedisCache::open(&redis.url()).await;
    let agent = redis_agent(
        &stack.nats.url(),
        &redis.url(),
        "paa-0",
        &["--heartbeat", "500ms"],
        &[],
    )
    .await;
    stack.wait_for_agents("dev", 1).await;
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s9"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    // Paused while 701 invalidations are published (more than its client buffers), the last
    // one for s1; then every one of them expires before it wakes.
    agent.signal(Signal::SIGSTOP);
    let env = env_id("dev");
    for n in 0..=700 {
        let scope = if n == 700 {
            "s1".into()
        } else {
            format!("other{n}")
        };
        let request = cachecast_publisher::InvalidationRequest {
            env: env.clone(),
            target: cachecast_proto::Target::Response(cachecast_proto::ResponseSelector {
                scope_client_ids: vec![scope],
                identity_id: None,
            }),
            request_id: format!("paused-{n}"),
            timeout: Duration::from_millis(100),
            caller: None,
        };
        drop(stack.publisher.begin(request).await.expect("published"));
    }
    let js = jetstream(&stack).await;
    eventually("every event expires", WITHIN, || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("CACHECAST").await.expect("stream");
            stream.info().await.expect("info").state.messages == 0
        }
    })
    .await;
    assert_eq!(
        cache.keys().await,
        ["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"],
        "nothing applied while paused"
    );
    agent.signal(Signal::SIGCONT);

    // s1's event never reaches it: only a flush makes the cache safe, and s2 goes with it.
    let mut observer = cache.clone();
    eventually("the agent flushes the expired events", WITHIN, || {
        let mut cache = observer.clone();
        async move { cache.keys().await.is_empty() }
    })
    .await;
    stack.wait_for_agents("dev", 1).await;
    observer.set(&["pdp:dev:s3:u1:a"]).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s3"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(observer.keys().await.is_empty(), "{:?}", agent.output());
}

const AGENT_USER: &str = "agent";
const API_USER: &str = "api";

/// A server configuration with two users; the agent's may or may not create consumers.
fn users(agent_creates_consumers: bool) -> String {
    let agent_permissions = if agent_creates_consumers {
        String::new()
    } else {
        r#", permissions: { publish: { deny: ["$JS.API.CONSUMER.CREATE.>"] } }"#.into()
    };
    format!(
        "authorization {{ users = [ {{ user: {API_USER}, password: {API_USER} }}, {{ user: {AGENT_USER}, password: {AGENT_USER}{agent_permissions} }} ] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_consumer_stalls_stops_vouching_flushes_and_recovers() {
    cachecast_e2e::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("nats.conf");
    std::fs::write(&config, users(true)).expect("write the server config");
    let nats: NatsServer = NatsServer::builder(cachecast_testkit::nats_binary())
        .arg("-c")
        .arg(config.to_string_lossy())
        .start()
        .await
        .unwrap_or_else(|e| panic!("nats-server did not start: {e}"));
    let as_user = |bus: &mut cachecast_bus::BusConfig, user: &str| {
        bus.nats.user = Some(user.into());
        bus.nats.password = Some(cachecast_bus::Secret::new(user));
    };
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| as_user(bus, API_USER))
        .start()
        .await;
    let mut agent_bus = stack.bus.clone();
    as_user(&mut agent_bus, AGENT_USER);
    let cache = MemoryCache::new();
    // Without the fast path (the default) or live copies: this is about the consumer, the
    // agent's record. (With either, the event below would be applied and confirmed as
    // published; tests/tests/live_copies.rs covers live copies that do not come.)
    let config_1s = AgentConfig {
        heartbeat: Duration::from_secs(1),
        fast_path: false,
        live_events: false,
        ..AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "a1")
        .bus(&agent_bus)
        .config(config_1s)
        .start(cache.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s9"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    fill(&cache, &["s1", "s2"]);

    // A configuration reload takes the agent's right to create consumers, and its consumer is
    // deleted: the client cannot recreate it, while presence (a KV write) still works.
    std::fs::write(&config, users(false)).expect("rewrite the server config");
    stack.nats.signal(Signal::SIGHUP).expect("reload");
    let stream = jetstream(&stack)
        .await
        .get_stream("CACHECAST")
        .await
        .expect("stream");
    let names: Vec<String> = {
        use futures::TryStreamExt;
        stream
            .consumer_names()
            .try_collect()
            .await
            .expect("consumer names")
    };
    assert!(!names.is_empty());
    for name in names {
        stream
            .delete_consumer(&name)
            .await
            .expect("delete consumer");
    }

    // An event it cannot receive: within agent.max_lag it says it lags, and flushes.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=1s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    let env = env_id("dev");
    eventually("the agent announces that it lags", WITHIN, || {
        let lagging = stack
            .publisher
            .live_agents(&env)
            .iter()
            .any(|a| a.lagging.is_some());
        async move { lagging }
    })
    .await;
    until("the lagging agent flushes its cache", || {
        !cache.contains("s1/k") && !cache.contains("s2/k")
    })
    .await;
    fill(&cache, &["s5"]);
    assert!(
        !cache.contains("s5/k"),
        "a lagging agent's cache caches nothing"
    );
    let not_ready = agent
        .ready()
        .await
        .expect_err("/readyz fails while it lags");
    assert!(not_ready.starts_with("lagging: "), "{not_ready}");
    // Publishers no longer wait for it: a long deadline, answered `424 lagging` at once.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s3"}"#, "?timeout=60s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["failures"][0]["type"], "lagging",
        "{}",
        answer.body
    );
    assert!(
        answer.body["tookMs"].as_u64().is_some_and(|ms| ms < 30_000),
        "not held until the deadline: {}",
        answer.body
    );

    // The right comes back: the agent catches up on its own and vouches again.
    std::fs::write(&config, users(true)).expect("rewrite the server config");
    stack.nats.signal(Signal::SIGHUP).expect("reload");
    eventually("the agent keeps up again", Duration::from_secs(60), || {
        let lagging = stack
            .publisher
            .live_agents(&env)
            .iter()
            .any(|a| a.lagging.is_some());
        async move { !lagging }
    })
    .await;
    agent.ready().await.expect("/readyz passes again");
    fill(&cache, &["s4"]);
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s4"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!cache.contains("s4/k"));
    agent.stop().await;
}

/// A memory cache whose whole-cache flushes fail while `failing` is set, counting attempts.
#[derive(Debug, Clone)]
struct FailingFlush {
    cache: MemoryCache,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    attempts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl cachecast_agent::CacheBackend for FailingFlush {
    fn kind(&self) -> &'static str {
        "failing-flush"
    }

    async fn evict_responses(
        &self,
        env: &cachecast_proto::EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        cachecast_agent::CacheBackend::evict_responses(&self.cache, env, selector).await
    }

    async fn evict_identities(
        &self,
        env: &cachecast_proto::EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        cachecast_agent::CacheBackend::evict_identities(&self.cache, env, selector).await
    }

    async fn flush(
        &self,
        env: &cachecast_proto::EnvId,
    ) -> Result<u64, cachecast_agent::BackendError> {
        use std::sync::atomic::Ordering;
        if self.failing.load(Ordering::SeqCst) {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Err(cachecast_agent::BackendError::Custom(
                "flush refused by the test".into(),
            ));
        }
        cachecast_agent::CacheBackend::flush(&self.cache, env).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_flush_that_fails_leaves_nothing_acked_as_applied_until_a_flush_succeeds() {
    use std::sync::atomic::Ordering;
    let stack = Stack::builder()
        .bus(|bus| {
            bus.stream.max_age = Duration::from_secs(1);
        })
        .start()
        .await;
    let proxy = cachecast_e2e::TcpProxy::start(stack.nats.port()).await;
    let backend = FailingFlush {
        cache: MemoryCache::new(),
        failing: Default::default(),
        attempts: Default::default(),
    };
    // A long heartbeat keeps the agent's own cut-off flush out of this test.
    let config = AgentConfig {
        heartbeat: Duration::from_secs(10),
        ..AgentConfig::default()
    };
    let agent = stack
        .agent_builder("dev", "gap")
        .via(&proxy.nats_url())
        .config(config)
        .start(backend.clone())
        .await;
    stack.wait_for_agents("dev", 1).await;
    let cache = backend.cache.clone();
    fill(&cache, &["s1", "s2", "s3"]);

    // Cut off while s1 is invalidated, and the event expires before it is back.
    proxy.cut();
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=500ms")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    let js = jetstream(&stack).await;
    eventually("retention drops the event", WITHIN, || {
        let js = js.clone();
        async move {
            let mut stream = js.get_stream("CACHECAST").await.expect("stream");
            stream.info().await.expect("info").state.messages == 0
        }
    })
    .await;
    backend.failing.store(true, Ordering::SeqCst);
    proxy.restore();
    eventually("the agent tries to flush after the gap", WITHIN, || {
        std::future::ready(backend.attempts.load(Ordering::SeqCst) > 0)
    })
    .await;

    // Its cache still holds s1's entry: no later event may be acked as applied.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s2"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["failures"][0]["type"], "eviction_failed",
        "{}",
        answer.body
    );
    assert!(
        cache.contains("s1/k"),
        "the flush failed: s1 is still there"
    );

    // The flush succeeds: everything goes, and events are confirmed again.
    backend.failing.store(false, Ordering::SeqCst);
    until("the repair flush", || cache.is_empty()).await;
    fill(&cache, &["s4"]);
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s4"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!cache.contains("s4/k"));
    agent.stop().await;
}
