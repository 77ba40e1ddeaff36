//! One module per command.

pub(crate) mod agent;
pub(crate) mod agents;
pub(crate) mod caches;
pub(crate) mod invalidate;
pub(crate) mod serve;
pub(crate) mod token;
pub(crate) mod up;

use anyhow::Context;
use cachecast_agent::BackendKind;
use cachecast_publisher::auth::Verifier;

use crate::cli::Command;
use crate::config::Config;
use cachecast_bus::{BusConfig, Client};
use cachecast_publisher::Publisher;

/// Checks what `command` needs from `config` beyond what loading it checked, without
/// connecting to anything.
pub(crate) fn check_config(command: &Command, config: &Config) -> anyhow::Result<()> {
    config.nats.check()?;
    match command {
        Command::Serve(_) => {
            Verifier::new(&config.auth)?;
            check_api(&config.api)?;
        }
        Command::Agent(_) => {
            config.agent.env()?;
            config.agent.pod()?;
            match config.agent.backend {
                BackendKind::Redis => config.redis.check()?,
                BackendKind::Http => drop(cachecast_agent::HttpBackend::new(&config.http)?),
                BackendKind::Memory => {}
            }
        }
        Command::Invalidate(_)
        | Command::Agents(_)
        | Command::Caches(_)
        | Command::Token(_)
        | Command::Up(_) => {}
    }
    Ok(())
}

/// The API settings no value of their type rules out but that cannot work.
pub(crate) fn check_api(api: &cachecast_publisher::api::ApiConfig) -> anyhow::Result<()> {
    if api.max_connections == 0 {
        anyhow::bail!(
            "api.max_connections is 0, so no client could connect: set it to at least 1 (the default is 10000)"
        );
    }
    if api.header_read_timeout.is_zero() {
        anyhow::bail!(
            "api.header_read_timeout is 0, so every connection would be closed at once: set it to a few seconds (the default is 10s)"
        );
    }
    Ok(())
}

/// Connects to NATS (returns at once; the client reconnects in the background).
pub(crate) async fn connect(bus: &BusConfig, name: &str) -> anyhow::Result<Client> {
    Ok(cachecast_bus::connect(&bus.nats, name).await?)
}

/// Starts a publisher once, for short-lived commands: an unreachable bus is an error.
pub(crate) async fn publisher_once(bus: &BusConfig) -> anyhow::Result<Publisher> {
    let client = connect(bus, "cachecast-cli").await?;
    Publisher::start(client, bus).await.with_context(|| {
        format!(
            "could not reach the bus at {}: is NATS running there with JetStream, and are the nats.* credentials and TLS settings right?",
            cachecast_bus::redact_url(&bus.nats.url)
        )
    })
}
