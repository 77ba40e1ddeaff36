//! A persistent cache (Redis) outlives its agent: it stays expected by every request while no
//! agent attends it (`424 unattended`, never a `200` while a stale entry survives), the agent
//! that attends it next applies what it missed before it goes live, agents sharing one Redis
//! count once, a forgotten cache is no longer expected, and a Redis restarted from an old
//! snapshot is flushed before anything is acknowledged again.

use std::time::Duration;

use cachecast_e2e::{
    Answer, ChildProcess, RedisCache, Signal, Stack, cachecast, eventually, redis_agent,
};

const EXIT: Duration = Duration::from_secs(10);

/// Starts `cachecast agent --backend redis` for `dev` with a 500 ms heartbeat and `extra`
/// arguments; returns once it says it is live.
async fn agent(nats_url: &str, redis_url: &str, id: &str, extra: &[&str]) -> ChildProcess {
    let mut args = vec!["--heartbeat", "500ms"];
    args.extend_from_slice(extra);
    redis_agent(nats_url, redis_url, id, &args, &[]).await
}

/// The cache id the agent registered, from its log.
fn cache_id(agent: &ChildProcess) -> String {
    let output = agent.output();
    let line = output
        .lines()
        .find(|l| l.contains("agent is live"))
        .unwrap_or_else(|| panic!("no live line in {output}"));
    let start = line.find("cache=").expect("cache field") + "cache=".len();
    line[start..]
        .split_whitespace()
        .next()
        .expect("cache value")
        .trim_matches('"')
        .to_owned()
}

async fn invalidate_scope(stack: &Stack, scope: &str, timeout: &str) -> Answer {
    stack
        .invalidate(
            "dev",
            &format!(r#"{{"scopeClientId":"{scope}"}}"#),
            &format!("?timeout={timeout}"),
        )
        .await
}

/// Waits (at most `within`) until the publisher no longer knows any cache of `dev`, then
/// checks that a request expects none: `200` with `_nodes.total: 0`.
async fn no_cache_expected_once_forgotten(stack: &Stack, within: Duration) {
    let env = cachecast_e2e::env_id("dev");
    eventually("the publisher forgets the cache", within, || {
        let caches = stack.publisher.caches(&env);
        async move { caches.is_empty() }
    })
    .await;
    let answer = invalidate_scope(stack, "s1", "1s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0, "{}", answer.body);
}

/// The one failure of a `424`: its node id and type.
fn only_failure(answer: &Answer) -> (String, String) {
    let failures = answer.body["_nodes"]["failures"]
        .as_array()
        .unwrap_or_else(|| panic!("no failures in {}", answer.body));
    assert_eq!(failures.len(), 1, "{}", answer.body);
    (
        failures[0]["node_id"].as_str().expect("node id").to_owned(),
        failures[0]["type"].as_str().expect("type").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_its_redis_accountable_and_the_next_one_catches_up_before_it_is_live()
 {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let (nats_url, redis_url) = (stack.nats.url(), redis.url());
    let mut cache = RedisCache::open(&redis_url).await;

    let mut first = agent(&nats_url, &redis_url, "paa-0", &[]).await;
    let cache_id = cache_id(&first);
    stack.wait_for_agents("dev", 1).await;
    cache
        .set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a", "pdp:dev:s3:u1:a"])
        .await;
    let answer = invalidate_scope(&stack, "s3", "5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["total"], 1,
        "one cache: {}",
        answer.body
    );
    assert!(
        answer.body["agents"][&cache_id].is_object(),
        "{}",
        answer.body
    );

    // SIGTERM: the agent leaves, the Redis and the PDP reading it stay.
    first.signal(Signal::SIGTERM);
    first.wait_exit(EXIT).await.expect("stops");
    stack.wait_for_agents("dev", 0).await;
    let answer = invalidate_scope(&stack, "s1", "1s").await;
    assert_eq!(
        answer.status, 424,
        "never a 200 for an unattended cache: {}",
        answer.body
    );
    assert_eq!(
        only_failure(&answer),
        (cache_id.clone(), "unattended".into())
    );
    assert_eq!(
        cache.keys().await,
        ["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"],
        "nothing applied it yet, and the 424 says so"
    );

    // The next agent applies the missed event before it says it is live.
    let second = agent(&nats_url, &redis_url, "paa-1", &[]).await;
    assert_eq!(
        cache.keys().await,
        ["pdp:dev:s2:u1:a"],
        "caught up before going live: {}",
        second.output()
    );
    assert!(
        second
            .output()
            .contains("applying the events published while the cache was unattended"),
        "{}",
        second.output()
    );
    let answer = invalidate_scope(&stack, "s2", "5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(cache.keys().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_restarted_within_the_deadline_gets_the_request_its_200() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let (nats_url, redis_url) = (stack.nats.url(), redis.url());
    let mut cache = RedisCache::open(&redis_url).await;

    let mut first = agent(&nats_url, &redis_url, "paa-0", &[]).await;
    let cache_id = cache_id(&first);
    stack.wait_for_agents("dev", 1).await;
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;
    first.kill().await;
    // Past presence expiry (three heartbeats): no live agent, the cache is still registered.
    stack.wait_for_agents("dev", 0).await;
    let answer = invalidate_scope(&stack, "s1", "1s").await;
    assert_eq!(answer.status, 424, "{}", answer.body);
    assert_eq!(
        only_failure(&answer),
        (cache_id.clone(), "unattended".into())
    );
    assert_eq!(
        cache.keys().await.len(),
        2,
        "the stale entry survives: no 200"
    );

    // A request in flight while a new agent attends the cache: answered 200 by it.
    let request = {
        let (base, token) = (stack.base_url.clone(), stack.token(&["dev"]));
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .post(format!(
                    "{base}/api/1.0/runtime/caches/response/dev/invalidate?timeout=30s"
                ))
                .bearer_auth(token)
                .body(r#"{"scopeClientId":"s2"}"#)
                .send()
                .await
                .expect("answers");
            let status = response.status().as_u16();
            (
                status,
                response.json::<serde_json::Value>().await.expect("JSON"),
            )
        })
    };
    let _second = agent(&nats_url, &redis_url, "paa-0", &[]).await;
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agents"][&cache_id]["status"], "applied", "{body}");
    assert!(cache.keys().await.is_empty(), "both missed events applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_one_redis_count_once_and_forgetting_it_stops_expecting_it() {
    let stack = Stack::start().await;
    let redis = cachecast_testkit::redis().await;
    let (nats_url, redis_url) = (stack.nats.url(), redis.url());
    let mut cache = RedisCache::open(&redis_url).await;

    let mut a = agent(&nats_url, &redis_url, "paa-a", &[]).await;
    let mut b = agent(&nats_url, &redis_url, "paa-b", &[]).await;
    let cache_id = cache_id(&a);
    assert_eq!(cache_id, self::cache_id(&b), "one Redis, one cache id");
    stack.wait_for_agents("dev", 2).await;
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;
    let answer = invalidate_scope(&stack, "s1", "5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["_nodes"]["total"], 1,
        "counted once: {}",
        answer.body
    );

    // One of them killed: the other still applies, still 200.
    a.kill().await;
    let answer = invalidate_scope(&stack, "s2", "5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(cache.keys().await.is_empty());
    // Its position, announced with its next heartbeat, is at least that event's.
    let applied = answer.body["sequence"].as_u64().expect("sequence");
    let env = cachecast_e2e::env_id("dev");
    eventually("the cache's position reaches the event", EXIT, || {
        let caches = stack.publisher.caches(&env);
        async move {
            caches
                .first()
                .and_then(|c| c.progress)
                .is_some_and(|p| p.applied_sequence >= applied && p.lag_events == 0)
        }
    })
    .await;

    // Both gone: unattended.
    b.signal(Signal::SIGTERM);
    b.wait_exit(EXIT).await.expect("stops");
    stack.wait_for_agents("dev", 0).await;
    let answer = invalidate_scope(&stack, "s3", "1s").await;
    assert_eq!(answer.status, 424, "{}", answer.body);

    let mut caches = cachecast(&nats_url, &["caches", "--env", "dev", "--json"]);
    caches.wait_exit(EXIT).await.expect("caches exits");
    let listed: serde_json::Value =
        serde_json::from_str(caches.stdout().trim()).expect("JSON listing");
    assert_eq!(listed["caches"][0]["id"], cache_id.as_str(), "{listed}");
    assert!(
        listed["caches"][0].get("appliedSequence").is_some(),
        "{listed}"
    );
    // A publisher that just started cannot age a crashed agent's last heartbeat yet (it errs
    // toward attended); the running one can.

    let known = stack.publisher.caches(&env);
    assert_eq!(known.len(), 1, "{known:?}");
    assert!(known[0].attended_by.is_empty(), "{known:?}");
    assert!(known[0].unattended_for.is_some(), "{known:?}");

    // Decommissioned: forget it, and requests stop expecting it.
    let mut forget = cachecast(
        &nats_url,
        &["caches", "forget", "--env", "dev", "--cache", &cache_id],
    );
    let status = forget.wait_exit(EXIT).await.expect("forget exits");
    assert!(status.success(), "{}", forget.output());
    no_cache_expected_once_forgotten(&stack, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_old_snapshot_is_flushed_before_the_next_applied_ack() {
    let stack = Stack::start().await;
    let mut redis = cachecast_testkit::redis().await;
    let (nats_url, redis_url) = (stack.nats.url(), redis.url());
    let mut cache = RedisCache::open(&redis_url).await;
    let _agent = agent(&nats_url, &redis_url, "paa-0", &[]).await;
    stack.wait_for_agents("dev", 1).await;
    cache.set(&["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"]).await;
    // A snapshot holding s1, then s1 invalidated.
    cache.save().await;
    let answer = invalidate_scope(&stack, "s1", "5s").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(cache.keys().await, ["pdp:dev:s2:u1:a"]);

    // Redis restarts from that snapshot: the evicted entry is back.
    redis.stop().await;
    redis.start_again().await;
    let mut cache = RedisCache::open(&redis_url).await;
    assert_eq!(
        cache.keys().await,
        ["pdp:dev:s1:u1:a", "pdp:dev:s2:u1:a"],
        "the snapshot brought s1 back"
    );
    // The next applied ack comes only after the agent flushed the restarted cache.
    let mut answer = invalidate_scope(&stack, "s9", "5s").await;
    for _ in 0..20 {
        if answer.status == 200 {
            break;
        }
        // The agent's connection to the restarted Redis comes back within its retry delay.
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = invalidate_scope(&stack, "s9", "5s").await;
    }
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        cache.keys().await.is_empty(),
        "flushed before the applied ack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_forget_unattended_after_a_long_unattended_cache_is_forgotten() {
    let nats = cachecast_testkit::nats().await;
    let stack = Stack::builder()
        .nats(nats)
        .bus(|bus| {
            bus.presence.forget_unattended_after = Some(Duration::from_secs(1));
        })
        .start()
        .await;
    let redis = cachecast_testkit::redis().await;
    let mut first = agent(&stack.nats.url(), &redis.url(), "paa-0", &[]).await;
    stack.wait_for_agents("dev", 1).await;
    first.signal(Signal::SIGTERM);
    first.wait_exit(EXIT).await.expect("stops");
    stack.wait_for_agents("dev", 0).await;
    let env = cachecast_e2e::env_id("dev");
    assert_eq!(stack.publisher.caches(&env).len(), 1, "registered");
    no_cache_expected_once_forgotten(&stack, Duration::from_secs(15)).await;
}
