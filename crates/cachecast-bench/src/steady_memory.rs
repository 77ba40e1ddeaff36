//! Memory under sustained load with nobody scraping `/metrics`: the real `cachecast serve` and
//! `cachecast agent` as child processes, hundreds of thousands of confirmed invalidations
//! through the HTTP API, RSS read from /proc before and after. Memory that grows with every
//! request (histogram samples kept until a scrape, say) shows here as bytes per request.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cachecast_bus::Secret;
use cachecast_publisher::auth::{AuthConfig, TokenSpec, issue_hs256};
use cachecast_testkit::ChildProcess;

use crate::memory::rss;

const SECRET: &str = "bench-steady-secret";
const ENV: &str = "bench-steady";

/// What one process's memory did over the run.
#[derive(Debug, Clone)]
pub(crate) struct Growth {
    pub(crate) process: &'static str,
    pub(crate) before: u64,
    pub(crate) after: u64,
}

/// The run: how many confirmed invalidations, in how long, and each process's memory.
#[derive(Debug, Clone)]
pub(crate) struct SteadyMemory {
    pub(crate) requests: u64,
    pub(crate) elapsed: Duration,
    pub(crate) agents: usize,
    pub(crate) growth: Vec<Growth>,
}

/// Sends `requests` invalidations (after `warmup` unmeasured ones) from `concurrency` clients
/// to a `serve` with `agents` memory agents, none of them ever scraped.
pub(crate) async fn measure(
    cachecast: &Path,
    nats_url: &str,
    agents: usize,
    warmup: u64,
    requests: u64,
    concurrency: usize,
) -> anyhow::Result<SteadyMemory> {
    let env: &[(&str, &str)] = &[
        ("CACHECAST_AUTH__HS256_SECRET", SECRET),
        ("CACHECAST_AUTH__ALLOW_HS256", "true"),
        // Throughput is the point: no per-token rate limit.
        ("CACHECAST_API__RATE_LIMIT_PER_SECOND", "0"),
        ("RUST_LOG", "warn,cachecast=info"),
    ];
    let serve = spawn(
        cachecast,
        &["serve", "--listen", "127.0.0.1:0", "--nats-url", nats_url],
        env,
    );
    serve
        .wait_for_output("API listening on http://", Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("serve did not start: {e}"))?;
    let addr = serve
        .output()
        .split("API listening on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("serve logged no address"))?;
    let mut fleet = Vec::with_capacity(agents);
    for i in 0..agents {
        let id = format!("steady-{i}");
        let agent = spawn(
            cachecast,
            &["agent", "--env", ENV, "--id", &id, "--nats-url", nats_url],
            env,
        );
        agent
            .wait_for_output("agent is live", Duration::from_secs(60))
            .await
            .map_err(|e| anyhow::anyhow!("agent did not start: {e}"))?;
        fleet.push(agent);
    }
    let auth = AuthConfig::hs256_for_development(SECRET);
    let token = issue_hs256(
        &Secret::new(SECRET),
        &auth,
        &TokenSpec::full("bench", &[ENV.to_owned()], Duration::from_secs(24 * 3600)),
    )?;
    let url = format!("http://{addr}/api/1.0/runtime/caches/response/{ENV}/invalidate");
    let load = Load::new(&url, &token, agents)?;

    load.send(warmup, concurrency).await?;
    let pid = |p: &ChildProcess| p.pid().ok_or_else(|| anyhow::anyhow!("a process exited"));
    let (serve_pid, agent_pid) = (pid(&serve)?, pid(&fleet[0])?);
    let before = (rss(serve_pid)?, rss(agent_pid)?);
    let started = Instant::now();
    load.send(requests, concurrency).await?;
    let elapsed = started.elapsed();
    let after = (rss(serve_pid)?, rss(agent_pid)?);
    Ok(SteadyMemory {
        requests,
        elapsed,
        agents,
        growth: vec![
            Growth {
                process: "`cachecast serve`",
                before: before.0,
                after: after.0,
            },
            Growth {
                process: "`cachecast agent` (memory backend)",
                before: before.1,
                after: after.1,
            },
        ],
    })
}

fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> ChildProcess {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("CACHECAST_CONFIG")
        .envs(env.iter().copied());
    ChildProcess::from_command(command)
}

/// Keep-alive clients sending `{}` invalidations; every answer must be a confirmed `200`.
#[derive(Debug, Clone)]
struct Load {
    client: reqwest::Client,
    url: Arc<str>,
    token: Arc<str>,
    agents: usize,
}

impl Load {
    fn new(url: &str, token: &str, agents: usize) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            url: url.into(),
            token: token.into(),
            agents,
        })
    }

    /// Sends exactly `count` requests from `concurrency` workers.
    async fn send(&self, count: u64, concurrency: usize) -> anyhow::Result<()> {
        let next = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                let (load, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < count {
                        load.one().await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.await??;
        }
        Ok(())
    }

    async fn one(&self) -> anyhow::Result<()> {
        let response = self
            .client
            .post(&*self.url)
            .bearer_auth(&*self.token)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(
            status == 200 && body["_nodes"]["successful"] == self.agents,
            "not a confirmed invalidation: {status} {body}"
        );
        Ok(())
    }
}
