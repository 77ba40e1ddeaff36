//! `cachecast agent`: one agent next to one cache.

use std::process::ExitCode;

use anyhow::Context;
use cachecast_admin::Health;
use cachecast_agent::{
    Agent, AgentProbe, BackendKind, CacheBackend, CacheLifetime, HttpBackend, MemoryCache,
    RedisBackend,
};

use crate::config::Config;
use crate::shutdown::Shutdown;

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    match config.agent.backend {
        BackendKind::Memory => {
            let cache = MemoryCache::with_keyed_caches(config.agent.keyed_caches.clone());
            run_with(config, cache).await
        }
        BackendKind::Redis => {
            let backend = RedisBackend::new(&config.redis)?;
            run_with(config, backend).await
        }
        BackendKind::Http => {
            let backend = HttpBackend::new(&config.http)?;
            run_with(config, backend).await
        }
    }
}

async fn run_with(config: Config, backend: impl CacheBackend) -> anyhow::Result<ExitCode> {
    let env = config.agent.env()?;
    let id = config.agent.id_or_default();
    let bus = config.bus();
    let shutdown = Shutdown::on_signals();
    let client = super::connect(&bus, &format!("cachecast-agent-{id}")).await?;
    let agent = Agent::new(
        client.clone(),
        &bus,
        (env, id),
        config.agent.clone(),
        backend,
    );
    let agent = if config.agent.cache_lifetime == CacheLifetime::Pod {
        config.agent.pod()?;
        agent.with_kubernetes(&config.kubernetes)?
    } else {
        agent
    };
    let admin = match config.agent.admin_listen {
        Some(addr) => Some(serve_admin(addr, agent.probe(), shutdown.clone()).await?),
        None => None,
    };
    let running = tokio::select! {
        started = agent.start() => started?,
        () = shutdown.clone().wait() => return Ok(ExitCode::SUCCESS),
    };
    let ran = running.run(shutdown.wait()).await;
    if let Some(admin) = admin {
        if ran.is_err() {
            // Stopped by itself: the admin server must not keep the process alive.
            admin.abort();
        }
        admin.await.ok();
    }
    ran?;
    Ok(ExitCode::SUCCESS)
}

/// Serves /healthz, /readyz and /metrics on `addr` until shutdown.
async fn serve_admin<B: CacheBackend>(
    addr: std::net::SocketAddr,
    probe: AgentProbe<B>,
    shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let metrics = cachecast_admin::install_metrics();
    let health = Health::new(move || {
        let probe = probe.clone();
        async move { probe.ready().await }
    });
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("could not listen on {addr}: is another process using it? set agent.admin_listen")
    })?;
    tracing::info!("admin endpoints on http://{}", listener.local_addr()?);
    let router = cachecast_admin::router(health.clone(), metrics);
    Ok(tokio::spawn(async move {
        let stop = async move {
            shutdown.wait().await;
            health.begin_shutdown();
        };
        if let Err(err) = cachecast_admin::serve(listener, router, stop).await {
            tracing::error!(error = %err, "admin server failed");
        }
    }))
}
