//! A Redis behind Sentinel: the agent evicts on the master the sentinels name, follows a
//! failover, and flushes the new master (a replica that may lag behind evictions its old
//! master applied) before it confirms anything more. The test looks into the Redis itself.

use std::time::{Duration, Instant};

use cachecast_agent::{RedisBackend, RedisConfig};
use cachecast_e2e::{RedisCache, RedisServer, Stack};

const RESPONSES: &str = "/api/1.0/runtime/caches/response/dev/invalidate";
const MASTER: &str = "cache";

async fn conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection")
}

/// Waits (at most 30 s) until `done` says the state the test needs is reached.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn info(server: &RedisServer, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn(server).await)
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_a_sentinel_failover_and_flushes_the_new_master() {
    let debug = ["--enable-debug-command", "local"];
    let master = RedisServer::start_with(&debug).await;
    let master_port = master.port().to_string();
    let replica = RedisServer::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &master_port,
        "--enable-debug-command",
        "local",
    ])
    .await;
    until("the replica syncs", async || {
        info(&replica, "replication")
            .await
            .contains("master_link_status:up")
    })
    .await;
    let sentinel = RedisServer::start_sentinel(MASTER, master.port()).await;
    let mut sentinel_conn = conn(&sentinel).await;
    until("the sentinel knows the replica", async || {
        let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(MASTER)
            .query_async(&mut sentinel_conn)
            .await
            .unwrap_or_default();
        replicas.iter().any(|fields| {
            fields
                .windows(2)
                .any(|pair| pair[0] == "flags" && pair[1] == "slave")
        })
    })
    .await;

    let stack = Stack::start().await;
    let config = RedisConfig {
        // With sentinels, the URL gives only the password and database.
        url: "redis://sentinel-managed/0".into(),
        sentinels: vec![format!("127.0.0.1:{}", sentinel.port())],
        sentinel_master: MASTER.into(),
        ..RedisConfig::default()
    };
    let backend = RedisBackend::new(&config).expect("redis backend");
    let _agent = stack.agent("dev", "redis-sentinel", backend).await;
    stack.wait_for_agents("dev", 1).await;

    let mut primary = RedisCache::open(&master.url()).await;
    primary
        .set(&["pdp:dev:s0:u1:h", "pdp:dev:s5:u1:h", "pdp:qa:s5:u1:h"])
        .await;
    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s5"}"#)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(primary.keys().await, ["pdp:dev:s0:u1:h", "pdp:qa:s5:u1:h"]);
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn(&master).await)
        .await
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica has the eviction");

    // The replica gets back an entry the eviction removed, as if it had not received the
    // eviction when its master failed (`DEBUG POPULATE 1 <prefix>` writes `<prefix>:0`).
    let stale = "pdp:dev:s5:u2:h:0";
    let () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(1)
        .arg("pdp:dev:s5:u2:h")
        .query_async(&mut conn(&replica).await)
        .await
        .expect("DEBUG POPULATE");
    let () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query_async(&mut sentinel_conn)
        .await
        .expect("SENTINEL FAILOVER");
    until("the sentinel names the replica master", async || {
        let named: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER)
            .query_async(&mut sentinel_conn)
            .await
            .unwrap_or(None);
        named.is_some_and(|(_, port)| port == replica.port().to_string())
            && info(&replica, "replication").await.contains("role:master")
    })
    .await;
    let mut promoted = RedisCache::open(&replica.url()).await;
    assert!(
        promoted.keys().await.iter().any(|k| k == stale),
        "the new master serves the stale entry"
    );

    // Any request now: the agent evicts on the new master, and flushes it first.
    let answer = stack
        .post_as("dev", RESPONSES, r#"{"scopeClientId":"s0"}"#)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        promoted.keys().await,
        ["pdp:qa:s5:u1:h"],
        "a 200 after the failover: the stale entry and scope s0 are gone from the new master"
    );
}
