//! A Redis Cluster node is refused at start, naming why: through one node the agent would
//! see (and evict) one master's keys and confirm evictions other masters never made.

use std::time::Duration;

use cachecast_e2e::{Stack, cachecast};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_redis_cluster_node_and_exits_saying_why() {
    let stack = Stack::start().await;
    let node = cachecast_testkit::RedisServer::start_with(&["--cluster-enabled", "yes"]).await;
    let mut agent = cachecast(
        &stack.nats.url(),
        &[
            "agent",
            "--env",
            "dev",
            "--backend",
            "redis",
            "--redis-url",
            &node.url(),
        ],
    );
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the agent kept running: {}", agent.output()));
    assert!(!status.success(), "{}", agent.output());
    let output = agent.output();
    assert!(
        output.contains("Redis Cluster") && output.contains("redis.url"),
        "the error names the cause and the setting: {output}"
    );
    assert!(!output.contains("agent is live"), "{output}");
    // Nothing was registered: no request waits for a cache nobody will attend.
    let answer = stack.invalidate("dev", "{}", "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["_nodes"]["total"], 0, "{}", answer.body);
}
