//! `cachecast up`: a whole local stack in one process tree, for trying cachecast out.
//!
//! A nats-server child with JetStream (in a temporary store), the HTTP API, and in-memory
//! agents, all signed with the dev secret. Ctrl-C stops the agents (they leave the presence
//! bucket), the API, and the nats-server child.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cachecast_admin::Health;
use cachecast_agent::{Agent, AgentConfig, MemoryCache};
use cachecast_bus::Secret;
use cachecast_nats_server::NatsServer;
use cachecast_proto::AgentId;
use cachecast_proto::CacheName;
use cachecast_publisher::Publisher;
use cachecast_publisher::auth::{AuthConfig, DEV_SECRET, TokenSpec, Verifier, issue_hs256};
use cachecast_publisher::server::Server;

use crate::cli::UpArgs;
use crate::config::Config;
use crate::shutdown::Shutdown;

pub(crate) async fn run(mut config: Config, args: UpArgs) -> anyhow::Result<ExitCode> {
    let shutdown = Shutdown::on_signals();
    let tools_dir = args.tools_dir.clone();
    let binary =
        tokio::task::spawn_blocking(move || cachecast_nats_server::locate_or_install(&tools_dir))
            .await??;
    let mut nats = NatsServer::builder(&binary)
        .port(args.nats_port)
        .start()
        .await
        .context("could not start nats-server")?;
    tracing::info!(url = %nats.url(), pid = nats.pid(), binary = %binary.display(), "nats-server started");
    config.nats.url = nats.url();

    let mut opened = Opened::default();
    let result = stack(&config, &args, shutdown.clone(), &mut opened).await;
    // On every way out, an error included: the agents stop, then every client closes before
    // the nats-server child stops, so none of them reports a lost connection.
    shutdown.trigger();
    opened.close().await;
    nats.stop().await;
    tracing::info!("nats-server stopped");
    result
}

/// What the stack opened, to be closed however it ends.
#[derive(Default)]
struct Opened {
    clients: Vec<(cachecast_bus::Client, cachecast_bus::Closed)>,
    agents: Vec<tokio::task::JoinHandle<()>>,
}

impl Opened {
    /// Waits for the agents (the shutdown has begun), then drains every client at once, each
    /// for 5 s at most.
    async fn close(self) {
        for agent in self.agents {
            agent.await.ok();
        }
        let closing = self.clients.into_iter().map(|(client, closed)| async move {
            closed.drain(&client, Duration::from_secs(5)).await
        });
        let open = futures::future::join_all(closing)
            .await
            .into_iter()
            .filter(|closed| !closed)
            .count();
        if open > 0 {
            tracing::warn!(
                open,
                "NATS connections did not close within 5s; stopping nats-server anyway"
            );
        }
    }
}

async fn stack(
    config: &Config,
    args: &UpArgs,
    shutdown: Shutdown,
    opened: &mut Opened,
) -> anyhow::Result<ExitCode> {
    let bus = config.bus();
    let (client, closed) = cachecast_bus::connect_closable(&bus.nats, "cachecast-up-api").await?;
    opened.clients.push((client.clone(), closed));
    let publisher = Publisher::start(client.clone(), &bus).await?;

    for n in 1..=args.agents {
        let id = AgentId::new(format!("{}-agent-{n}", args.env))?;
        let (agent_client, closed) =
            cachecast_bus::connect_closable(&bus.nats, &format!("cachecast-up-{id}")).await?;
        opened.clients.push((agent_client.clone(), closed));
        let agent = Agent::new(
            agent_client.clone(),
            &bus,
            (args.env.clone(), id),
            AgentConfig::default(),
            // A keyed cache to try `_clear_cache` on.
            MemoryCache::with_keyed_caches([CacheName::new("apikeys")?]),
        );
        let running = agent.start().await?;
        let stop = shutdown.clone().wait();
        opened.agents.push(tokio::spawn(async move {
            if let Err(err) = running.run(stop).await {
                tracing::error!(error = %err, "an agent of the local stack stopped");
            }
        }));
    }
    if !publisher
        .wait_for_live_agents(&args.env, args.agents, Duration::from_secs(10))
        .await
    {
        anyhow::bail!("the agents did not become live within 10s");
    }

    // A local stack: HS256 with the dev secret, explicitly allowed.
    let auth = AuthConfig {
        hs256_secret: Some(Secret::new(DEV_SECRET)),
        allow_hs256: true,
        jwks_url: None,
        public_key_file: None,
        ..config.auth.clone()
    };
    let verifier = Verifier::new(&auth)?;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {}: is another process using it? pass --listen 127.0.0.1:<port>",
                config.api.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let token = issue_hs256(
        &auth.hs256_secret.clone().unwrap_or_default(),
        &auth,
        &TokenSpec::full(
            "cachecast-up",
            &[args.env.to_string()],
            Duration::from_secs(24 * 3600),
        ),
    )?;
    let health = Health::new({
        let publisher = publisher.clone();
        move || std::future::ready(publisher.readiness())
    });
    let server = Server {
        publisher,
        verifier,
        config: config.api.clone(),
        admin: cachecast_admin::router(health.clone(), cachecast_admin::install_metrics()),
        health,
    };
    let api = tokio::spawn(server.run(listener, shutdown.clone().wait()));

    let base = format!(
        "http://{addr}/api/1.0/runtime/caches/response/{}/invalidate",
        args.env
    );
    println!(
        "cachecast is up: API http://{addr}, NATS {}, {} agents in environment {}",
        bus.nats.url, args.agents, args.env
    );
    println!();
    println!("Invalidate everything in {}:", args.env);
    println!(
        "  curl -sS -X POST {base} -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{}}'"
    );
    println!();
    println!("Clear keys of the keyed cache `apikeys` the agents serve (or `*` for all of it):");
    println!(
        "  curl -sS -X POST http://{addr}/api/1.0/runtime/caches/keyed/{}/apikeys/k1,k2/_clear_cache -H 'Authorization: Bearer {token}'",
        args.env
    );
    println!();
    println!(
        "The API's OpenAPI document: http://{addr}/openapi.json; over NATS: cachecast.svc.v1.{}.invalidate",
        args.env
    );
    println!();
    println!("The status page: http://{addr}/ui/ (paste the token above: it holds the read right)");
    println!();
    println!("Press Ctrl-C to stop.");

    shutdown.wait().await;
    api.await??;
    Ok(ExitCode::SUCCESS)
}
