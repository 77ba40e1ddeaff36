//! What the caller is told when agents fail: a `424` naming each agent that did not confirm,
//! and why. And the edge cases around it: no agents at all, a reused request id.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cachecast_agent::{RedisBackend, RedisConfig};
use cachecast_e2e::{RedisCache, Signal, Stack, cachecast, eventually};

const STARTUP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_named_in_a_424_within_the_deadline() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let mut agents = Vec::new();
    for n in 1..=3 {
        let id = format!("proc-{n}");
        let agent = cachecast(
            &url,
            &["agent", "--env", "dev", "--id", &id, "--backend", "memory"],
        );
        agent
            .wait_for_output("agent is live", STARTUP)
            .await
            .unwrap_or_else(|e| panic!("agent {id} did not start: {e}"));
        agents.push(agent);
    }
    stack.wait_for_agents("dev", 3).await;
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["successful"], 3);

    agents[1].kill().await; // SIGKILL: no chance to leave the presence bucket
    let started = Instant::now();
    let answer = stack.invalidate("dev", "{}", "?timeout=2s").await;
    let took = started.elapsed();
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}, deadline 2s"
    );
    assert_eq!(answer.body["code"], "failed_dependency");
    assert_eq!(answer.failed_agents(), ["proc-2"]);
    assert_eq!(answer.body["_nodes"]["total"], 3);
    assert_eq!(answer.body["_nodes"]["successful"], 2);
    assert_eq!(answer.body["_nodes"]["failures"][0]["type"], "timeout");
    assert_eq!(answer.body["agents"]["proc-1"]["status"], "applied");
    assert_eq!(answer.body["agents"]["proc-3"]["status"], "applied");
    assert_eq!(answer.body["agents"]["proc-2"]["status"], "timeout");
    assert!(
        answer.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("proc-2"),
        "{}",
        answer.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_with_sigterm_is_no_longer_expected() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let mut agents = Vec::new();
    for id in ["stays", "leaves"] {
        let agent = cachecast(&url, &["agent", "--env", "dev", "--id", id]);
        agent
            .wait_for_output("agent is live", STARTUP)
            .await
            .unwrap_or_else(|e| panic!("agent {id} did not start: {e}"));
        agents.push(agent);
    }
    stack.wait_for_agents("dev", 2).await;
    agents[1].signal(Signal::SIGTERM);
    let status = agents[1]
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the agent exits on SIGTERM");
    assert!(status.success(), "{status:?}: {}", agents[1].output());
    assert!(
        agents[1].output().contains("presence removed"),
        "{}",
        agents[1].output()
    );
    stack.wait_for_agents("dev", 1).await;
    let answer = stack.invalidate("dev", "{}", "?timeout=2s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 1);
    assert_eq!(answer.body["agents"]["stays"]["status"], "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_redis_is_down_reports_the_redis_error() {
    let stack = Stack::start().await;
    let healthy = cachecast_testkit::redis().await;
    let mut broken = cachecast_testkit::redis().await;
    let mut handles = Vec::new();
    for (id, url) in [
        ("paa-1", format!("{}/0", healthy.url())),
        ("paa-2", format!("{}/1", healthy.url())),
        ("paa-3", broken.url()),
    ] {
        let backend = RedisBackend::new(&RedisConfig {
            url,
            ..RedisConfig::default()
        })
        .expect("backend");
        handles.push(stack.agent("dev", id, backend).await);
    }
    stack.wait_for_agents("dev", 3).await;

    let client = redis::Client::open(healthy.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for db in [0, 1] {
        let () = redis::pipe()
            .cmd("SELECT")
            .arg(db)
            .ignore()
            .set("pdp:dev:s1:u1:a", "permit")
            .ignore()
            .set("pdp:dev:s1:u2:a", "permit")
            .ignore()
            .set("pdp:dev:s2:u1:a", "permit")
            .ignore()
            .query_async(&mut conn)
            .await
            .expect("seed");
    }
    broken.stop().await;

    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=4s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(answer.failed_agents(), ["paa-3"]);
    let failure = &answer.body["_nodes"]["failures"][0];
    assert_eq!(failure["type"], "eviction_failed");
    let reason = failure["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("redis:"),
        "the Redis error is the reason: {reason}"
    );
    assert_eq!(answer.body["agents"]["paa-3"]["status"], "failed");
    for id in ["paa-1", "paa-2"] {
        assert_eq!(
            answer.body["agents"][id]["status"], "applied",
            "{}",
            answer.body
        );
        assert_eq!(answer.body["agents"][id]["evicted"], 2, "{}", answer.body);
    }
    for db in [0, 1] {
        let keys: Vec<String> = redis::pipe()
            .cmd("SELECT")
            .arg(db)
            .ignore()
            .cmd("KEYS")
            .arg("pdp:*")
            .query_async::<(Vec<String>,)>(&mut conn)
            .await
            .expect("keys")
            .0;
        assert_eq!(keys, ["pdp:dev:s2:u1:a"], "db {db}");
    }
    for handle in handles {
        handle.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_without_agents_answers_200_with_total_0() {
    let stack = Stack::start().await;
    let (_cache, agent) = stack.memory_agent("other", "elsewhere").await;
    stack.wait_for_agents("other", 1).await;
    let answer = stack.invalidate("empty", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0);
    assert_eq!(answer.body["_nodes"]["failures"], serde_json::json!([]));
    assert!(
        answer.body["sequence"].as_u64().is_some_and(|s| s > 0),
        "published all the same"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_is_two_invalidations() {
    let stack = Stack::start().await;
    let (cache, agent) = stack.memory_agent("dev", "solo").await;
    stack.wait_for_agents("dev", 1).await;
    let token = stack.token(&["dev"]);
    let mut event_ids = Vec::new();
    for round in 0..2 {
        cache.insert("k", "s1", "alice", Bytes::from_static(b"permit"));
        let answer = stack
            .post(
                "/api/1.0/runtime/caches/response/dev/invalidate",
                r#"{"identityId":"alice"}"#,
                &[
                    ("Authorization", format!("Bearer {token}")),
                    ("RequestID", "same-id-1".into()),
                ],
            )
            .await;
        assert_eq!(answer.status, 200, "round {round}: {}", answer.body);
        assert_eq!(answer.body["requestId"], "same-id-1");
        assert_eq!(answer.request_id_header.as_deref(), Some("same-id-1"));
        assert_eq!(
            answer.body["agents"]["solo"]["evicted"], 1,
            "round {round} applied"
        );
        assert!(!cache.contains("k"), "round {round}");
        event_ids.push(answer.body["eventId"].clone());
    }
    assert_ne!(event_ids[0], event_ids[1]);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_stops_being_expected_after_three_missed_heartbeats() {
    let stack = Stack::start().await;
    let url = stack.nats.url();
    let mut agent = cachecast(
        &url,
        &[
            "agent",
            "--env",
            "dev",
            "--id",
            "short-lived",
            "--heartbeat",
            "200ms",
        ],
    );
    agent
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    stack.wait_for_agents("dev", 1).await;
    agent.kill().await;
    // Three missed 200 ms heartbeats later it is no longer live.
    stack.wait_for_agents("dev", 0).await;
    let answer = stack.invalidate("dev", "{}", "?timeout=2s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_eviction_is_repaired_by_a_full_flush() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let backend = RedisBackend::new(&RedisConfig {
        url: redis.url(),
        command_timeout: Duration::from_millis(500),
        ..RedisConfig::default()
    })
    .expect("backend");
    let agent = stack.agent("dev", "flaky", backend).await;
    stack.wait_for_agents("dev", 1).await;
    let mut cache = RedisCache::open(&redis.url()).await;
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;

    redis.pause();
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(answer.body["agents"]["flaky"]["status"], "failed");
    redis.resume();

    // The next invalidation touches only s3, yet the agent flushes first: nothing survives.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s3"}"#, "?timeout=5s")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let keys = cache.keys().await;
    assert!(keys.is_empty(), "the dirty cache was flushed: {keys:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_is_named_then_catches_up_in_order_when_resumed() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let url = stack.nats.url();
    let agent = cachecast(
        &url,
        &[
            "agent",
            "--env",
            "dev",
            "--id",
            "sleepy",
            "--cache-id",
            "sleepy",
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
        ],
    );
    agent
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    stack.wait_for_agents("dev", 1).await;
    let mut cache = RedisCache::open(&redis.url()).await;
    cache
        .set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a", "pdp:dev:s3:u1:a"])
        .await;

    agent.signal(Signal::SIGSTOP);
    let mut event_ids = Vec::new();
    for scope in ["s1", "s2"] {
        let started = Instant::now();
        let answer = stack
            .invalidate(
                "dev",
                &format!(r#"{{"scopeClientId":"{scope}"}}"#),
                "?timeout=1s",
            )
            .await;
        assert_eq!(answer.status, 424, "{}", answer.body);
        assert_eq!(answer.failed_agents(), ["sleepy"]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered at the deadline"
        );
        event_ids.push(
            answer.body["eventId"]
                .as_str()
                .expect("event id")
                .to_owned(),
        );
    }
    agent.signal(Signal::SIGCONT);
    // Both events are still in the stream: the agent applies them once it runs again.
    eventually(
        "the missed events are applied",
        Duration::from_secs(10),
        || {
            let mut cache = cache.clone();
            async move { cache.keys().await == ["pdp:dev:s3:u1:a"] }
        },
    )
    .await;
    // In stream order (whether from the fast path's copies, buffered while it was paused, or
    // from the stream: one publisher's events come in the order it published them).
    agent
        .wait_for_output(&format!("event_id={}", event_ids[1]), STARTUP)
        .await
        .expect("the second event is logged");
    let output = agent.output();
    let first = output
        .find(&format!("event_id={}", event_ids[0]))
        .expect("first event logged");
    let second = output
        .find(&format!("event_id={}", event_ids[1]))
        .expect("second event logged");
    assert!(first < second, "applied in stream order");
}
