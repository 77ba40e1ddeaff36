//! Resident memory, read from /proc, of real processes: an idle `cachecast agent`, an agent
//! holding a million memory-cache entries, a publisher tracking many agents.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cachecast_agent::{Agent, AgentConfig, MemoryCache};
use cachecast_bus::BusConfig;
use cachecast_proto::{AgentId, EnvId, Presence, Subjects, Wire};
use cachecast_publisher::Publisher;
use cachecast_testkit::ChildProcess;

/// The resident set size of `pid`, in bytes.
pub(crate) fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(kib * 1024)
}

/// Starts `program args`, waits for `ready` in its output, lets it settle, reads its RSS.
pub(crate) async fn rss_of(program: &Path, args: &[String], ready: &str) -> anyhow::Result<u64> {
    let mut child = ChildProcess::spawn(program, args);
    child
        .wait_for_output(ready, Duration::from_secs(300))
        .await
        .map_err(|e| anyhow::anyhow!("{} did not get ready: {e}", program.display()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let bytes = rss(pid)?;
    child.kill().await;
    Ok(bytes)
}

/// Child role: an agent whose memory cache holds `entries` entries; prints `ready`.
pub(crate) async fn hold_entries(nats_url: &str, entries: usize) -> anyhow::Result<()> {
    let mut bus = BusConfig::default();
    bus.nats.url = nats_url.to_owned();
    let cache = MemoryCache::new();
    // A PDP decision is a small JSON document; 64 bytes stands for one.
    let value = Bytes::from_static(&[b'x'; 64]);
    let client = cachecast_bus::connect(&bus.nats, "bench-holder").await?;
    let agent = Agent::new(
        client,
        &bus,
        (EnvId::new("bench-mem")?, AgentId::new("holder")?),
        AgentConfig::default(),
        cache.clone(),
    );
    // Flushing on start would empty it: fill after the start, as a running service would.
    let running = agent.start().await?;
    for i in 0..entries {
        let scope = format!("scope-{}", i % 100);
        let identity = format!("user-{}", i % 100_000);
        cache.insert(
            &format!("{scope}:{identity}:{i}"),
            &scope,
            &identity,
            value.clone(),
        );
    }
    println!("ready with {} entries", cache.len());
    running.run(std::future::pending()).await?;
    Ok(())
}

/// Writes `count` presence keys of live-looking agents in `env`.
pub(crate) async fn fake_presences(
    bus: &BusConfig,
    env: &EnvId,
    count: usize,
) -> anyhow::Result<()> {
    let client = cachecast_bus::connect(&bus.nats, "bench-presence").await?;
    let js = cachecast_bus::jetstream(client, &bus.nats);
    let store = cachecast_bus::ensure_presence_bucket(&js, &bus.presence).await?;
    for n in 0..count {
        let agent = AgentId::new(format!("fake-agent-{n:06}"))?;
        let presence = Presence {
            agent_id: agent.to_string(),
            env: env.to_string(),
            heartbeat_ms: 3_600_000,
            started_at_unix_ms: cachecast_proto::now_unix_ms(),
            backend: "memory".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            keyed_caches: Vec::new(),
            ..Presence::default()
        };
        store
            .put(Subjects::presence_key(env, &agent), presence.to_bytes())
            .await?;
    }
    Ok(())
}

/// Child role: a publisher that waits until it tracks `expect` agents in `env`; prints `ready`.
pub(crate) async fn track_agents(nats_url: &str, env: &str, expect: usize) -> anyhow::Result<()> {
    let mut bus = BusConfig::default();
    bus.nats.url = nats_url.to_owned();
    let env = EnvId::new(env)?;
    let client = cachecast_bus::connect(&bus.nats, "bench-tracker").await?;
    let publisher = Publisher::start(client, &bus).await?;
    anyhow::ensure!(
        publisher
            .wait_for_live_agents(&env, expect, Duration::from_secs(120))
            .await,
        "the publisher sees {} agents, not {expect}",
        publisher.live_agents(&env).len()
    );
    println!("ready tracking {expect} agents");
    std::future::pending::<()>().await;
    Ok(())
}
