//! `cachecast agent`: one agent next to one cache.

use std::process::ExitCode;

use cachecast_agent::{Agent, BackendKind, CacheBackend, MemoryCache, RedisBackend};

use crate::config::Config;
use crate::shutdown::Shutdown;

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    match config.agent.backend {
        BackendKind::Memory => run_with(config, MemoryCache::new()).await,
        BackendKind::Redis => {
            let backend = RedisBackend::new(&config.redis)?;
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
    let running = tokio::select! {
        started = agent.start() => started?,
        () = shutdown.clone().wait() => return Ok(ExitCode::SUCCESS),
    };
    running.run(shutdown.wait()).await;
    client.drain().await.ok();
    Ok(ExitCode::SUCCESS)
}
