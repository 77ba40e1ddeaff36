//! cachecast itself: N embedded agents with memory caches, invalidated through the publisher
//! library and through the HTTP API.

use std::time::Duration;

use cachecast_agent::{Agent, AgentConfig, MemoryCache};
use cachecast_bus::{BusConfig, Client, Secret};
use cachecast_proto::{
    AgentId, EnvId, InvalidateReply, InvalidateRequest, RequestTarget, ResponseSelector, Subjects,
    Target, Wire,
};
use cachecast_publisher::api::ApiConfig;
use cachecast_publisher::auth::{AuthConfig, TokenSpec, Verifier, issue_hs256};
use cachecast_publisher::{InvalidationRequest, Publisher};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// `n` NATS connections, named `<name>-<i>`: a fleet's, one per agent (or floor responder).
pub(crate) async fn connect(
    nats: &cachecast_bus::NatsConfig,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<Client>> {
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        fleet.push(cachecast_bus::connect(nats, &format!("{name}-{i}")).await?);
    }
    Ok(fleet)
}

/// Running agents; stopped (leaving presence) by [`Agents::stop`].
#[derive(Debug)]
pub(crate) struct Agents {
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agents {
    /// Starts one agent per fleet connection in `env` (configured as `config` says) and
    /// waits until `publisher` sees them.
    pub(crate) async fn start(
        fleet: &[Client],
        bus: &BusConfig,
        env: &EnvId,
        publisher: &Publisher,
        config: &AgentConfig,
    ) -> anyhow::Result<Self> {
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        for (n, client) in fleet.iter().enumerate() {
            let agent = Agent::new(
                client.clone(),
                bus,
                (env.clone(), AgentId::new(format!("bench-{n}"))?),
                config.clone(),
                MemoryCache::new(),
            );
            let running = agent.start().await?;
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            tasks.push(tokio::spawn(async move {
                if let Err(err) = running
                    .run(async {
                        stopped.await.ok();
                    })
                    .await
                {
                    eprintln!("warning: a benchmark agent stopped: {err}");
                }
            }));
        }
        anyhow::ensure!(
            publisher
                .wait_for_live_agents(env, fleet.len(), Duration::from_secs(60))
                .await,
            "the {} agents did not become live",
            fleet.len()
        );
        Ok(Self { stops, tasks })
    }

    pub(crate) async fn stop(self) {
        for stop in self.stops {
            stop.send(()).ok();
        }
        for task in self.tasks {
            task.await.ok();
        }
    }
}

/// One confirmed invalidation through the library; complains if it was not confirmed.
pub(crate) async fn library_round(publisher: &Publisher, env: &EnvId) {
    let request = InvalidationRequest {
        env: env.clone(),
        target: Target::Response(ResponseSelector::default()),
        request_id: "bench".into(),
        timeout: Duration::from_secs(30),
        caller: None,
    };
    match publisher.invalidate(request).await {
        Ok(outcome) if outcome.confirmed() => {}
        Ok(outcome) => eprintln!(
            "warning: {} of {} agents confirmed",
            outcome.successful(),
            outcome.agents.len()
        ),
        Err(err) => eprintln!("warning: {err}"),
    }
}

/// The HTTP API on 127.0.0.1, and a keep-alive client for it. Clones share both.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    url: std::sync::Arc<str>,
    token: std::sync::Arc<str>,
    _server: std::sync::Arc<Server>,
}

/// The server task, stopped when the last clone goes.
#[derive(Debug)]
pub(crate) struct Server(JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Http {
    /// The cachecast API for `env`.
    pub(crate) async fn start(publisher: Publisher, env: &EnvId) -> anyhow::Result<Self> {
        let secret = Secret::new("bench-secret");
        let auth = AuthConfig::hs256_for_development(secret.expose());
        // The benchmark measures throughput: no per-token rate limit.
        let api = ApiConfig {
            rate_limit_per_second: 0.0,
            ..ApiConfig::default()
        };
        // What `serve` runs: the one server assembly.
        let health = cachecast_admin::Health::new({
            let publisher = publisher.clone();
            move || std::future::ready(publisher.readiness())
        });
        let server = cachecast_publisher::server::Server {
            publisher,
            verifier: Verifier::new(&auth)?,
            config: api,
            admin: cachecast_admin::router(health.clone(), cachecast_admin::install_metrics()),
            health,
        };
        let token = issue_hs256(
            &secret,
            &auth,
            &TokenSpec::full("bench", &[env.to_string()], Duration::from_secs(3600)),
        )?;
        let path = format!("/api/1.0/runtime/caches/response/{env}/invalidate?timeout=30s");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            server.run(listener, std::future::pending()).await.ok();
        });
        Self::client(addr, &path, &token, task)
    }

    /// The HTTP transport alone: the same client against an endpoint that answers at once.
    pub(crate) async fn empty() -> anyhow::Result<Self> {
        let router = axum::Router::new().route(
            "/empty",
            axum::routing::post(|| async { axum::Json(serde_json::json!({})) }),
        );
        Self::serve(router, "/empty", "").await
    }

    async fn serve(router: axum::Router, path: &str, token: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            cachecast_publisher::http::serve(
                listener,
                router,
                &ApiConfig::default(),
                std::future::pending(),
            )
            .await
            .ok();
        });
        Self::client(addr, path, token, server)
    }

    /// The client of the server `server` runs on `addr`.
    fn client(
        addr: std::net::SocketAddr,
        path: &str,
        token: &str,
        server: JoinHandle<()>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(128)
                .build()?,
            url: format!("http://{addr}{path}").into(),
            token: token.into(),
            _server: std::sync::Arc::new(Server(server)),
        })
    }

    pub(crate) async fn round(&self) {
        let sent = self
            .client
            .post(&*self.url)
            .bearer_auth(&*self.token)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await;
        match sent {
            Ok(response) if response.status().as_u16() == 200 => {
                response.bytes().await.ok();
            }
            Ok(response) => eprintln!("warning: HTTP {}", response.status()),
            Err(err) => eprintln!("warning: {err}"),
        }
    }
}

/// The `cachecast` NATS service, and a client sending it protobuf requests. Clones share both.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    client: Client,
    subject: std::sync::Arc<str>,
    request: bytes::Bytes,
    _server: std::sync::Arc<Server>,
}

impl Service {
    /// The service for `env`, on its own connection; ready once it answers `$SRV.PING`.
    pub(crate) async fn start(
        publisher: Publisher,
        bus: &BusConfig,
        env: &EnvId,
    ) -> anyhow::Result<Self> {
        let server_client = cachecast_bus::connect(&bus.nats, "bench-service").await?;
        let server = tokio::spawn(async move {
            let api = ApiConfig::default();
            let run = cachecast_publisher::service::run(
                server_client,
                publisher,
                api,
                std::future::pending(),
            );
            if let Err(err) = run.await {
                eprintln!("warning: {err}");
            }
        });
        let client = cachecast_bus::connect(&bus.nats, "bench-service-caller").await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client
            .request("$SRV.PING.cachecast", bytes::Bytes::new())
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the NATS service did not answer $SRV.PING"
            );
            // "No responders" comes back at once: poll gently until it subscribed.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let request = InvalidateRequest {
            request_id: "bench".into(),
            timeout_ms: 30_000,
            target: Some(RequestTarget::Response(ResponseSelector::default())),
        };
        Ok(Self {
            client,
            subject: Subjects::service_request(env).into(),
            request: request.to_bytes(),
            _server: std::sync::Arc::new(Server(server)),
        })
    }

    pub(crate) async fn round(&self) {
        // Wait as long as the library and HTTP rounds may (the client's default is 10 s).
        let request = async_nats::Request::new()
            .payload(self.request.clone())
            .timeout(Some(Duration::from_secs(35)));
        let reply = self
            .client
            .send_request(self.subject.to_string(), request)
            .await;
        match reply.map(|m| InvalidateReply::from_bytes(&m.payload)) {
            Ok(Ok(reply)) if reply.status == 200 => {}
            Ok(Ok(reply)) => eprintln!("warning: service status {}", reply.status),
            Ok(Err(err)) => eprintln!("warning: {err}"),
            Err(err) => eprintln!("warning: {err}"),
        }
    }
}
