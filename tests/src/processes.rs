//! `cachecast` processes (agents, `serve`) and the Redis caches they attend, as a test sees them.

use std::time::Duration;

use cachecast_testkit::ChildProcess;

use crate::TEST_SECRET;

/// Starts `cachecast agent` for `env` with the Redis backend, extra `args` and environment
/// variables `env_vars`, and waits until it is live.
pub async fn redis_agent(
    nats_url: &str,
    redis_url: &str,
    id: &str,
    args: &[&str],
    env_vars: &[(&str, &str)],
) -> ChildProcess {
    let mut all = vec![
        "agent",
        "--env",
        "dev",
        "--id",
        id,
        "--backend",
        "redis",
        "--redis-url",
        redis_url,
    ];
    all.extend_from_slice(args);
    let agent = cachecast_with_env(nats_url, &all, env_vars);
    agent
        .wait_for_output("agent is live", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("agent {id} did not start: {e}"));
    agent
}

/// A Redis that an agent caches in, as a test sees it.
#[derive(Clone)]
pub struct RedisCache(redis::aio::MultiplexedConnection);

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisCache")
    }
}

impl RedisCache {
    /// Connects to the Redis at `url`. Its commands may take 10 s, not the client's default
    /// 500 ms: a `SAVE` (an fsync) on a machine busy with three fault schedules took longer,
    /// and a test's look into the cache must not fail for that.
    pub async fn open(url: &str) -> Self {
        let client = redis::Client::open(url).expect("Redis URL");
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(10)));
        Self(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("Redis connection"),
        )
    }

    /// Caches `keys` (each with a stand-in decision).
    pub async fn set(&mut self, keys: &[&str]) {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.set(*key, "permit").ignore();
        }
        let () = pipe.query_async(&mut self.0).await.expect("seed Redis");
    }

    /// Every key but cachecast's own (`cachecast:*`, the agents' stream positions), sorted.
    pub async fn all_keys(&mut self) -> Vec<String> {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut self.0)
            .await
            .expect("list Redis keys");
        let mut keys: Vec<String> = keys
            .into_iter()
            .filter(|k| !k.starts_with("cachecast:"))
            .collect();
        keys.sort();
        keys
    }

    /// Writes a snapshot (`SAVE`) that a restarted Redis loads.
    pub async fn save(&mut self) {
        let () = redis::cmd("SAVE")
            .query_async(&mut self.0)
            .await
            .expect("SAVE");
    }

    /// Every cached `pdp:*` key, sorted.
    pub async fn keys(&mut self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg("pdp:*")
            .query_async(&mut self.0)
            .await
            .expect("list Redis keys");
        keys.sort();
        keys
    }
}

/// The address a process logged right after `marker`, e.g. "API listening on http://".
pub fn logged_addr(process: &ChildProcess, marker: &str) -> String {
    let output = process.output();
    output
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} in {output}"))
        .to_owned()
}

/// Starts `cachecast serve` on a free port, with HS256 allowed and signing with
/// [`TEST_SECRET`] unless `env` sets another secret; returns the process and the API's base URL.
pub async fn start_serve(nats_url: &str, env: &[(&str, &str)]) -> (ChildProcess, String) {
    let mut all = vec![
        ("CACHECAST_AUTH__HS256_SECRET", TEST_SECRET),
        ("CACHECAST_AUTH__ALLOW_HS256", "true"),
    ];
    all.extend_from_slice(env);
    let serve = cachecast_with_env(nats_url, &["serve", "--listen", "127.0.0.1:0"], &all);
    serve
        .wait_for_output("API listening on", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("serve did not start: {e}"));
    let addr = logged_addr(&serve, "API listening on http://");
    (serve, format!("http://{addr}"))
}

/// Runs `cachecast` with `args` against `nats_url`.
pub fn cachecast(nats_url: &str, args: &[&str]) -> ChildProcess {
    cachecast_with_env(nats_url, args, &[])
}

/// Runs `cachecast` with `args` against `nats_url`, with extra environment variables.
pub fn cachecast_with_env(nats_url: &str, args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
    let mut command = tokio::process::Command::new(cachecast_testkit::cachecast_bin());
    command
        .args(args)
        .arg("--nats-url")
        .arg(nats_url)
        // The publisher's start-up steps too: a `serve` that once did not start within 30 s
        // in CI left no trace of where it waited.
        .env(
            "RUST_LOG",
            "info,cachecast_publisher::publisher=debug,cachecast_publisher::membership=debug",
        )
        .env("NO_COLOR", "1")
        .env_remove("CACHECAST_CONFIG")
        .envs(env.iter().copied());
    ChildProcess::from_command(command)
}
