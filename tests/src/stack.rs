//! The stack a test runs against: a real NATS server, the publisher and its HTTP API on
//! `127.0.0.1:0`, and agents embedded in the test process.

use std::time::Duration;

use cachecast_agent::{Agent, AgentConfig, CacheBackend, MemoryCache};
use cachecast_bus::BusConfig;
use cachecast_proto::AgentId;
use cachecast_publisher::Publisher;
use cachecast_publisher::api::ApiConfig;
use cachecast_publisher::auth::{AuthConfig, Verifier};
use cachecast_testkit::NatsServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{env_id, token};

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
        Self::builder().start().await
    }

    /// A stack with settings of its own: NATS, bus, API.
    pub fn builder() -> StackBuilder<'static> {
        StackBuilder {
            nats: None,
            configure: Box::new(|_| {}),
            api: test_api_config(),
        }
    }

    /// Another publisher replica with its own API on the same NATS, as a second pod behind a
    /// load balancer; its base URL. It stops when the returned handle is dropped.
    pub async fn another_replica(&self) -> (String, Replica) {
        let (_, base_url, stop, task) =
            serve_api(&self.bus, test_api_config(), "e2e-replica").await;
        (base_url, Replica { _stop: stop, task })
    }

    /// A client that sees every ack of environment `env` from now on (alone, or together), as
    /// publishers receive them, and its subscription.
    pub async fn ack_observer(&self, env: &str) -> (async_nats::Client, async_nats::Subscriber) {
        let observer = cachecast_bus::connect(&self.bus.nats, "observer")
            .await
            .expect("observer");
        let acks = observer
            .subscribe(format!("cachecast.v1.{env}.ack.>"))
            .await
            .expect("subscribe to acks");
        observer.flush().await.expect("flush");
        (observer, acks)
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
        self.agent_builder(env, id).start(backend).await
    }

    /// An in-process agent with settings of its own: agent settings, a NATS address (a
    /// [`TcpProxy`](cachecast_testkit::TcpProxy), say) or bus settings (another NATS user).
    pub fn agent_builder<'a>(&'a self, env: &'a str, id: &'a str) -> AgentBuilder<'a> {
        AgentBuilder {
            env,
            id,
            config: AgentConfig::default(),
            bus: self.bus.clone(),
        }
    }

    /// Starts an in-process memory agent and returns its cache.
    pub async fn memory_agent(&self, env: &str, id: &str) -> (MemoryCache, AgentHandle) {
        let cache = MemoryCache::new();
        let handle = self.agent(env, id, cache.clone()).await;
        (cache, handle)
    }

    /// A Redis cache registered in `env` as `cache_id` by an agent that then left: unattended,
    /// so every request of `env` expects it. It lives as long as the returned server.
    pub async fn left_redis_cache(
        &self,
        env: &str,
        cache_id: &str,
    ) -> cachecast_testkit::RedisServer {
        let live = self.publisher.live_agents(&env_id(env)).len();
        let redis = cachecast_testkit::redis().await;
        let backend = cachecast_agent::RedisBackend::new(&cachecast_agent::RedisConfig {
            url: redis.url(),
            ..cachecast_agent::RedisConfig::default()
        })
        .expect("redis backend");
        let agent = self
            .agent_builder(env, &format!("{cache_id}-agent"))
            .config(AgentConfig {
                cache_id: Some(cachecast_proto::CacheId::new(cache_id).expect("valid cache id")),
                ..AgentConfig::default()
            })
            .start(backend)
            .await;
        agent.stop().await;
        self.wait_for_agents(env, live).await;
        redis
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

/// A [`Stack`] to start, from [`Stack::builder`].
pub struct StackBuilder<'a> {
    nats: Option<NatsServer>,
    configure: Box<dyn FnOnce(&mut BusConfig) + 'a>,
    api: ApiConfig,
}

impl std::fmt::Debug for StackBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBuilder")
            .field("nats", &self.nats)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl<'a> StackBuilder<'a> {
    /// Runs on this NATS server (default: a new one).
    pub fn nats(mut self, nats: NatsServer) -> Self {
        self.nats = Some(nats);
        self
    }

    /// Adjusts the bus settings (credentials, retention, replicas...).
    pub fn bus<'b>(self, configure: impl FnOnce(&mut BusConfig) + 'b) -> StackBuilder<'b> {
        StackBuilder {
            nats: self.nats,
            configure: Box::new(configure),
            api: self.api,
        }
    }

    /// API settings of its own (limits, say); default [`test_api_config`].
    pub fn api(mut self, api: ApiConfig) -> Self {
        self.api = api;
        self
    }

    /// Starts the publisher and the API.
    pub async fn start(self) -> Stack {
        init_logs();
        let nats = match self.nats {
            Some(nats) => nats,
            None => cachecast_testkit::nats().await,
        };
        let mut bus = BusConfig::default();
        bus.nats.url = nats.url();
        (self.configure)(&mut bus);
        let (publisher, base_url, stop_api, api) = serve_api(&bus, self.api, "e2e-publisher").await;
        Stack {
            nats,
            bus,
            publisher,
            base_url,
            http: reqwest::Client::new(),
            stop_api: Some(stop_api),
            api: Some(api),
        }
    }
}

/// An in-process agent to start, from [`Stack::agent_builder`].
#[derive(Debug)]
pub struct AgentBuilder<'a> {
    env: &'a str,
    id: &'a str,
    config: AgentConfig,
    bus: BusConfig,
}

impl AgentBuilder<'_> {
    /// Agent settings of its own.
    pub fn config(mut self, config: AgentConfig) -> Self {
        self.config = config;
        self
    }

    /// Connects to `nats_url` (a [`TcpProxy`](cachecast_testkit::TcpProxy), say).
    pub fn via(mut self, nats_url: &str) -> Self {
        self.bus.nats.url = nats_url.to_owned();
        self
    }

    /// Bus settings of its own (another NATS user, say).
    pub fn bus(mut self, bus: &BusConfig) -> Self {
        self.bus = bus.clone();
        self
    }

    /// Starts the agent and waits until it is live.
    pub async fn start<B: CacheBackend>(self, backend: B) -> AgentHandle {
        start_agent(&self.bus, self.env, self.id, self.config, backend).await
    }
}

/// Starts an in-process agent `id` of `env` on `bus` and waits until it is live (on any NATS:
/// a cluster's, a site's).
pub async fn start_agent<B: CacheBackend>(
    bus: &BusConfig,
    env: &str,
    id: &str,
    config: AgentConfig,
    backend: B,
) -> AgentHandle {
    let client = cachecast_bus::connect(&bus.nats, id)
        .await
        .expect("agent NATS client");
    // A persistent cache (Redis, HTTP) is reported under its cache id: in tests, the agent's
    // id unless the test names another, so answers read the same for every backend.
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
    // Generous: on a cluster that is still electing its JetStream leaders, a start waits.
    let running = tokio::time::timeout(Duration::from_secs(60), agent.start())
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

/// A publisher on `bus`, whose NATS may be a cluster that elects its JetStream leaders after
/// it is up: the first start is retried for a minute.
pub async fn start_publisher(bus: &BusConfig, name: &str) -> Publisher {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let client = cachecast_bus::connect(&bus.nats, name)
            .await
            .expect("publisher NATS client");
        match Publisher::start(client, bus).await {
            Ok(publisher) => return publisher,
            Err(err) => assert!(
                tokio::time::Instant::now() < deadline,
                "no publisher on {}: {err}",
                bus.nats.url
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
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
