//! An agent restarted next to a cache that outlived it (Redis): with `on_start = "resume"` it
//! applies what it missed while it was down and keeps the rest; by default it flushes.

use std::time::Duration;

use cachecast_e2e::{ChildProcess, RedisCache, Signal, Stack, cachecast, eventually};

const STARTUP: Duration = Duration::from_secs(30);

async fn agent(nats_url: &str, redis_url: &str, on_start: &str) -> ChildProcess {
    let agent = cachecast(
        nats_url,
        &[
            "agent",
            "--env",
            "dev",
            "--id",
            "paa-0",
            "--backend",
            "redis",
            "--redis-url",
            redis_url,
            "--on-start",
            on_start,
        ],
    );
    agent
        .wait_for_output("agent is live", STARTUP)
        .await
        .unwrap_or_else(|e| panic!("agent did not start: {e}"));
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_applies_what_was_missed_and_keeps_the_rest() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let (nats_url, redis_url) = (stack.nats.url(), redis.url());
    let mut cache = RedisCache::open(&redis_url).await;

    let mut first = agent(&nats_url, &redis_url, "resume").await;
    stack.wait_for_agents("dev", 1).await;
    // Cached while the agent runs (after its start-up flush).
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;
    let answer = stack
        .invalidate("dev", r#"{"identityId":"nobody"}"#, "")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    first.signal(Signal::SIGTERM);
    first
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("stops");
    stack.wait_for_agents("dev", 0).await;
    // While it is down: an invalidation nobody confirms, kept in the stream.
    let answer = stack
        .invalidate("dev", r#"{"scopeClientId":"s1"}"#, "")
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["_nodes"]["total"], 0);

    let second = agent(&nats_url, &redis_url, "resume").await;
    assert!(
        second
            .output()
            .contains("resuming from the stored position"),
        "{}",
        second.output()
    );
    eventually(
        "the missed event is applied, and nothing else evicted",
        Duration::from_secs(10),
        || {
            let mut cache = cache.clone();
            async move { cache.keys().await == ["pdp:dev:s2:u1:a"] }
        },
    )
    .await;
    drop(second);

    // The default, flush, starts from an empty cache.
    let _third = agent(&nats_url, &redis_url, "flush").await;
    assert!(cache.keys().await.is_empty(), "flushed on start");
}
