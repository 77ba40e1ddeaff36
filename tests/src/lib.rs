//! The end-to-end harness: a real NATS server, the publisher and its HTTP API on
//! `127.0.0.1:0`, and agents embedded in the test process or run as `cachecast agent`.
//!
//! Each test builds its own [`Stack`], so tests share nothing and run in parallel.

pub mod history;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cachecast_agent::{Agent, AgentConfig, BackendError, CacheBackend, MemoryCache};
use cachecast_bus::{BusConfig, Secret};
use cachecast_proto::{AgentId, EnvId};
use cachecast_publisher::Publisher;
use cachecast_publisher::auth::{AuthConfig, Right, TokenSpec, Verifier, issue_hs256};
use cachecast_publisher::http::ApiConfig;
pub use cachecast_testkit::{ChildProcess, NatsServer, RedisServer, Signal, TcpProxy};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The HS256 secret of every test stack.
pub const TEST_SECRET: &str = "e2e-test-secret";

/// How long a test waits for agents to appear in a publisher's view.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// NATS, a publisher and the HTTP API, all real.
#[derive(Debug)]
pub struct Stack {
    pub nats: NatsServer,
    pub bus: BusConfig,
    pub publisher: Publisher,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    pub http: reqwest::Client,
    stop_api: Option<oneshot::Sender<()>>,
    api: Option<JoinHandle<()>>,
}

/// An HTTP answer: status, `requestid` header and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub request_id_header: Option<String>,
    pub body: serde_json::Value,
}

impl Answer {
    /// The agent ids listed in `_nodes.failures`.
    pub fn failed_agents(&self) -> Vec<String> {
        self.body["_nodes"]["failures"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["node_id"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Stack {
    /// Starts NATS, the publisher and the API.
    pub async fn start() -> Self {
        init_logs();
        let nats = cachecast_testkit::nats().await;
        Self::on(nats).await
    }

    /// Starts the publisher and the API on an already running NATS server.
    pub async fn on(nats: NatsServer) -> Self {
        Self::configured(nats, |_| {}).await
    }

    /// Like [`Stack::on`], with bus settings (credentials, say) adjusted by `configure`.
    pub async fn configured(nats: NatsServer, configure: impl FnOnce(&mut BusConfig)) -> Self {
        Self::with_api(nats, configure, test_api_config()).await
    }

    /// Like [`Stack::configured`], with API settings of its own (limits, say).
    pub async fn with_api(
        nats: NatsServer,
        configure: impl FnOnce(&mut BusConfig),
        api_config: ApiConfig,
    ) -> Self {
        let mut bus = BusConfig::default();
        bus.nats.url = nats.url();
        configure(&mut bus);
        let (publisher, base_url, stop_api, api) =
            serve_api(&bus, api_config, "e2e-publisher").await;
        Self {
            nats,
            bus,
            publisher,
            base_url,
            http: reqwest::Client::new(),
            stop_api: Some(stop_api),
            api: Some(api),
        }
    }

    /// Another publisher replica with its own API on the same NATS, as a second pod behind a
    /// load balancer; its base URL. It stops when the returned handle is dropped.
    pub async fn another_replica(&self) -> (String, Replica) {
        let (_, base_url, stop, task) =
            serve_api(&self.bus, test_api_config(), "e2e-replica").await;
        (base_url, Replica { _stop: stop, task })
    }

    /// A token for `envs`, valid for an hour.
    pub fn token(&self, envs: &[&str]) -> String {
        token(TEST_SECRET, envs)
    }

    /// `POST .../response/{env}/invalidate{query}` with `body` and a token for `env`.
    pub async fn invalidate(&self, env: &str, body: &str, query: &str) -> Answer {
        let token = self.token(&[env]);
        self.post(
            &format!("/api/1.0/runtime/caches/response/{env}/invalidate{query}"),
            body,
            &[
                ("Authorization", format!("Bearer {token}")),
                ("Content-Type", "application/json".into()),
            ],
        )
        .await
    }

    /// A POST to `path` with `body` (JSON) and a token for `env`.
    pub async fn post_as(&self, env: &str, path: &str, body: &str) -> Answer {
        let token = self.token(&[env]);
        self.post(
            path,
            body,
            &[
                ("Authorization", format!("Bearer {token}")),
                ("Content-Type", "application/json".into()),
            ],
        )
        .await
    }

    /// A GET of `path` with a token for `envs`; the answer must be JSON.
    pub async fn get_as(&self, envs: &[&str], path: &str) -> Answer {
        let token = self.token(envs);
        let request = self
            .http
            .get(format!("{}{path}", self.base_url))
            .header("Authorization", format!("Bearer {token}"));
        answer(request.send().await.expect("the API answers")).await
    }

    /// A POST with the given headers; the answer must be JSON.
    pub async fn post(&self, path: &str, body: &str, headers: &[(&str, String)]) -> Answer {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        answer(request.send().await.expect("the API answers")).await
    }

    /// Starts an agent for `env` inside this process and waits until it is live.
    pub async fn agent<B: CacheBackend>(&self, env: &str, id: &str, backend: B) -> AgentHandle {
        self.agent_configured(env, id, AgentConfig::default(), backend)
            .await
    }

    /// Like [`Stack::agent`], with its own agent settings.
    pub async fn agent_configured<B: CacheBackend>(
        &self,
        env: &str,
        id: &str,
        config: AgentConfig,
        backend: B,
    ) -> AgentHandle {
        let url = self.bus.nats.url.clone();
        self.agent_at(&url, env, id, config, backend).await
    }

    /// Like [`Stack::agent_configured`], connecting to `nats_url` (a [`TcpProxy`], say).
    pub async fn agent_at<B: CacheBackend>(
        &self,
        nats_url: &str,
        env: &str,
        id: &str,
        config: AgentConfig,
        backend: B,
    ) -> AgentHandle {
        let mut bus = self.bus.clone();
        bus.nats.url = nats_url.to_owned();
        self.agent_with_bus(&bus, env, id, config, backend).await
    }

    /// Like [`Stack::agent_configured`], with its own bus settings (another NATS user, say).
    pub async fn agent_with_bus<B: CacheBackend>(
        &self,
        bus: &BusConfig,
        env: &str,
        id: &str,
        config: AgentConfig,
        backend: B,
    ) -> AgentHandle {
        let client = cachecast_bus::connect(&bus.nats, id)
            .await
            .expect("agent NATS client");
        // A persistent cache (Redis, HTTP) is reported under its cache id: in tests, the
        // agent's id unless the test names another, so answers read the same for every backend.
        let mut config = config;
        if config.cache_id.is_none() {
            config.cache_id = Some(cachecast_proto::CacheId::new(id).expect("valid cache id"));
        }
        let agent = Agent::new(
            client,
            bus,
            (env_id(env), AgentId::new(id).expect("valid agent id")),
            config,
            backend,
        );
        let probe = agent.probe();
        let running = tokio::time::timeout(JOIN_TIMEOUT, agent.start())
            .await
            .expect("agent starts in time")
            .expect("agent starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(err) = running
                .run(async {
                    stopped.await.ok();
                })
                .await
            {
                eprintln!("a test agent stopped by itself: {err}");
            }
        });
        AgentHandle {
            stop,
            task,
            ready: Box::new(move || {
                let probe = probe.clone();
                Box::pin(async move { probe.ready().await })
            }),
        }
    }

    /// Starts an in-process memory agent and returns its cache.
    pub async fn memory_agent(&self, env: &str, id: &str) -> (MemoryCache, AgentHandle) {
        let cache = MemoryCache::new();
        let handle = self.agent(env, id, cache.clone()).await;
        (cache, handle)
    }

    /// Waits until the publisher sees exactly `count` live agents in `env`.
    pub async fn wait_for_agents(&self, env: &str, count: usize) {
        assert!(
            self.publisher
                .wait_for_live_agents(&env_id(env), count, JOIN_TIMEOUT)
                .await,
            "expected {count} live agents in {env}, the publisher sees {:?}",
            self.publisher.live_agents(&env_id(env))
        );
    }

    /// Stops the API (letting in-flight requests finish).
    pub async fn stop_api(&mut self) {
        if let Some(stop) = self.stop_api.take() {
            stop.send(()).ok();
        }
        if let Some(api) = self.api.take() {
            api.await.ok();
        }
    }
}

/// The API settings of a test stack: a 4 KiB body limit, no rate limit (tests send many
/// requests with one token; `bad_requests.rs` tests the limit on a stack of its own).
pub fn test_api_config() -> ApiConfig {
    ApiConfig {
        max_body_bytes: 4096,
        rate_limit_per_second: 0.0,
        ..ApiConfig::default()
    }
}

/// A publisher and its API serving on 127.0.0.1; returns the publisher, the base URL, the
/// stop switch and the server task.
async fn serve_api(
    bus: &BusConfig,
    api_config: ApiConfig,
    name: &str,
) -> (Publisher, String, oneshot::Sender<()>, JoinHandle<()>) {
    let client = cachecast_bus::connect(&bus.nats, name)
        .await
        .expect("NATS client");
    let publisher = Publisher::start(client, bus)
        .await
        .expect("publisher starts");
    let auth = AuthConfig::hs256_for_development(TEST_SECRET);
    let health = cachecast_admin::Health::new({
        let publisher = publisher.clone();
        move || std::future::ready(publisher.readiness())
    });
    let server = cachecast_publisher::server::Server {
        publisher: publisher.clone(),
        verifier: Verifier::new(&auth).expect("verifier"),
        config: api_config,
        admin: cachecast_admin::router(health.clone(), cachecast_admin::install_metrics()),
        health,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the API");
    let base_url = format!("http://{}", listener.local_addr().expect("address"));
    let (stop_api, stopped) = oneshot::channel::<()>();
    let api = tokio::spawn(async move {
        server
            .run(listener, async {
                stopped.await.ok();
            })
            .await
            .expect("API serves");
    });
    (publisher, base_url, stop_api, api)
}

/// A second API replica (see [`Stack::another_replica`]).
#[derive(Debug)]
pub struct Replica {
    _stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an agent's `/readyz` answers, asked in process.
type ReadyProbe = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// An in-process agent; dropping it leaves it running until the test ends.
pub struct AgentHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    ready: ReadyProbe,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle").finish_non_exhaustive()
    }
}

impl AgentHandle {
    /// What its `/readyz` would answer: `Ok`, or why it is not ready.
    pub async fn ready(&self) -> Result<(), String> {
        (self.ready)().await
    }

    /// Graceful shutdown: the agent removes its presence and stops.
    pub async fn stop(self) {
        self.stop.send(()).ok();
        self.task.await.ok();
    }
}

/// Reads an HTTP answer whose body must be JSON.
pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let request_id_header = response
        .headers()
        .get("requestid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("status {status}: body is not JSON ({err}): {text:?}"));
    Answer {
        status,
        request_id_header,
        body,
    }
}

/// Shows the stack's logs in a failing test's output (filter with `RUST_LOG`, default warn).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init()
        .ok();
}

/// A cache backend that records what it was asked to evict, in order: the first scope of
/// each selector, or `*` for a flush. For checking what an agent applied.
#[derive(Debug, Clone, Default)]
pub struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Recorder {
    /// Everything evicted so far.
    pub fn seen(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }

    /// True if `other` is this very recorder (a clone shares it).
    pub fn same_as(&self, other: &Recorder) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl CacheBackend for Recorder {
    fn kind(&self) -> &'static str {
        "recorder"
    }

    async fn evict_responses(
        &self,
        _env: &EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        let what = selector
            .scope_client_ids
            .first()
            .cloned()
            .unwrap_or_else(|| "*".into());
        self.0.lock().expect("lock").push(what);
        Ok(1)
    }

    /// Records `identity:<template>/<id>`; a flush (neither part) records nothing more than
    /// the `*` of its response flush.
    async fn evict_identities(
        &self,
        _env: &EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, cachecast_agent::BackendError> {
        if selector.identity_template.is_some() || selector.identity_id.is_some() {
            let what = format!(
                "identity:{}/{}",
                selector.identity_template.as_deref().unwrap_or("*"),
                selector.identity_id.as_deref().unwrap_or("*")
            );
            self.0.lock().expect("lock").push(what);
        }
        Ok(0)
    }
}

/// How a [`FaultyCache`] evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionMode {
    #[default]
    Normal,
    /// Every eviction (and flush) waits this long first.
    Slow(Duration),
    /// Every eviction (and flush) fails.
    Failing,
}

/// An in-process memory cache whose evictions a test can slow down or make fail.
#[derive(Debug, Clone, Default)]
pub struct FaultyCache {
    pub cache: MemoryCache,
    mode: Arc<Mutex<EvictionMode>>,
    started: Arc<std::sync::atomic::AtomicU64>,
}

impl FaultyCache {
    /// How many evictions (and flushes) have begun.
    pub fn evictions_started(&self) -> u64 {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Evictions from now on behave as `mode` says.
    pub fn set_mode(&self, mode: EvictionMode) {
        *self.mode.lock().expect("lock") = mode;
    }

    async fn fault(&self) -> Result<(), BackendError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mode = *self.mode.lock().expect("lock");
        match mode {
            EvictionMode::Normal => Ok(()),
            EvictionMode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            EvictionMode::Failing => {
                Err(BackendError::Other("an injected eviction failure".into()))
            }
        }
    }
}

impl CacheBackend for FaultyCache {
    fn kind(&self) -> &'static str {
        CacheBackend::kind(&self.cache)
    }

    async fn evict_responses(
        &self,
        env: &EnvId,
        selector: &cachecast_proto::ResponseSelector,
    ) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::evict_responses(&self.cache, env, selector).await
    }

    async fn evict_identities(
        &self,
        env: &EnvId,
        selector: &cachecast_proto::IdentitySelector,
    ) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::evict_identities(&self.cache, env, selector).await
    }

    async fn flush(&self, env: &EnvId) -> Result<u64, BackendError> {
        self.fault().await?;
        CacheBackend::flush(&self.cache, env).await
    }

    fn set_serving(&self, serving: bool) {
        CacheBackend::set_serving(&self.cache, serving);
    }
}

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
    /// Connects to the Redis at `url`.
    pub async fn open(url: &str) -> Self {
        let client = redis::Client::open(url).expect("Redis URL");
        Self(
            client
                .get_multiplexed_async_connection()
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
    token_with_rights(secret, envs, &[Right::Scoped, Right::Flush])
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
