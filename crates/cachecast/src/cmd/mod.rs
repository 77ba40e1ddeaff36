//! One module per command.

pub(crate) mod agent;
pub(crate) mod agents;
pub(crate) mod invalidate;
pub(crate) mod serve;
pub(crate) mod token;
pub(crate) mod up;

use anyhow::Context;
use cachecast_bus::{BusConfig, Client};
use cachecast_publisher::Publisher;

/// Connects to NATS (returns at once; the client reconnects in the background).
pub(crate) async fn connect(bus: &BusConfig, name: &str) -> anyhow::Result<Client> {
    Ok(cachecast_bus::connect(&bus.nats, name).await?)
}

/// Starts a publisher once, for short-lived commands: an unreachable bus is an error.
pub(crate) async fn publisher_once(bus: &BusConfig) -> anyhow::Result<Publisher> {
    let client = connect(bus, "cachecast-cli").await?;
    Publisher::start(client, bus)
        .await
        .with_context(|| format!("could not reach the bus at {}", bus.nats.url))
}
