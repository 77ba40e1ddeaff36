//! The end-to-end harness: a real NATS server, the publisher and its HTTP API on
//! `127.0.0.1:0`, and agents embedded in the test process or run as `cachecast agent`.
//!
//! Each test builds its own [`Stack`], so tests share nothing and run in parallel.

mod backends;
pub mod history;
mod processes;
pub mod scopes;
mod stack;

use std::time::Duration;

use cachecast_bus::Secret;
use cachecast_proto::EnvId;
use cachecast_publisher::auth::{AuthConfig, Right, TokenSpec, issue_hs256};
pub use cachecast_testkit::{ChildProcess, NatsServer, RedisServer, Signal, TcpProxy};

pub use backends::{EvictionMode, FaultyCache, GatedCache, Recorder};
pub use processes::{
    RedisCache, cachecast, cachecast_with_env, logged_addr, redis_agent, start_serve,
};
pub use stack::{
    AgentHandle, Answer, JOIN_TIMEOUT, Replica, Stack, TEST_SECRET, answer, init_logs, start_agent,
    start_publisher, test_api_config,
};

/// Checks `condition` every 20 ms until it holds; fails the test after `within`. For states
/// that nothing announces (what a cache holds after an agent caught up, say).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A valid environment id.
pub fn env_id(env: &str) -> EnvId {
    EnvId::new(env).expect("valid environment id")
}

/// A token for `envs` with both rights, signed with `secret`, valid for an hour.
pub fn token(secret: &str, envs: &[&str]) -> String {
    token_with_rights(secret, envs, &[Right::Scoped, Right::Flush, Right::Read])
}

/// A token for `envs` holding only `rights`, signed with `secret`, valid for an hour.
pub fn token_with_rights(secret: &str, envs: &[&str], rights: &[Right]) -> String {
    let spec = TokenSpec {
        subject: "e2e".into(),
        envs: envs.iter().map(|e| e.to_string()).collect(),
        rights: rights.to_vec(),
        ttl: Duration::from_secs(3600),
    };
    issue_hs256(&Secret::new(secret), &AuthConfig::default(), &spec).expect("token")
}
