//! `cachecast-bench`: how fast a confirmed, fleet-wide invalidation is, next to the NATS floors
//! measured in the same run, and what cachecast costs in memory and in Redis.
//!
//! Everything runs on this machine: a nats-server (JetStream, file store) and a redis-server
//! started for the run, agents as real NATS connections in this process. Run it through
//! `scripts/bench`, which builds in release mode and writes docs/BENCHMARKS.md.

mod budget;
mod fleet;
mod floors;
mod memory;
mod position_candidates;
mod redis_eviction;
mod report;
mod sites;
mod stats;
mod steady_memory;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cachecast_agent::AgentConfig;
use cachecast_bus::BusConfig;
use cachecast_proto::EnvId;
use cachecast_publisher::Publisher;
use clap::{Parser, Subcommand};

use crate::budget::Spent;
use crate::report::{LatencyRow, Report, Versus};
use crate::stats::{Op, Throughput};

/// The allocator of the `cachecast` binary, so the benchmark measures what is deployed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmark cachecast against the NATS floors.
#[derive(Debug, Parser)]
// `scripts/bench` passes `--write docs/BENCHMARKS.md`; a later `--write ""` replaces it.
#[command(args_override_self = true)]
struct Cli {
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    agents: Vec<usize>,
    /// Concurrency of the throughput runs.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Shorter runs, for a smoke test of the benchmark itself.
    #[arg(long)]
    quick: bool,
    /// Write the results into this Markdown file (between its bench markers); "" writes nothing.
    #[arg(long)]
    write: Option<String>,
    /// Which parts to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "latency,memory,redis,steady-memory,positions,sites"
    )]
    parts: Vec<Part>,
    /// Keyspace sizes of the Redis part, ascending (one Redis, then a 3-master cluster).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000,10000000")]
    redis_keys: Vec<usize>,
    /// Confirmed invalidations the steady-memory part sends without scraping `/metrics`.
    #[arg(long, default_value_t = 500_000)]
    steady_requests: u64,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Latency,
    Memory,
    Redis,
    SteadyMemory,
    /// Where a persistent cache's position lives: the two candidates at 1 000 and 10 000 caches.
    Positions,
    /// Agents at a site behind a leaf node, 40 ms each way from the hub (sizes from --agents, up
    /// to 100).
    Sites,
}

/// Roles the benchmark runs itself in, as child processes whose memory it measures.
#[derive(Debug, Subcommand)]
enum Role {
    #[command(hide = true)]
    HoldEntries {
        #[arg(long)]
        nats_url: String,
        #[arg(long)]
        entries: usize,
    },
    #[command(hide = true)]
    TrackAgents {
        #[arg(long)]
        nats_url: String,
        #[arg(long)]
        env: String,
        #[arg(long)]
        expect: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::HoldEntries { nats_url, entries }) => {
            memory::hold_entries(&nats_url, entries).await
        }
        Some(Role::TrackAgents {
            nats_url,
            env,
            expect,
        }) => memory::track_agents(&nats_url, &env, expect).await,
        None => run(cli).await,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Recorded as `serve` and `agent` record: every row pays what metrics cost in production.
    cachecast_admin::install_metrics();
    // Its monitoring endpoint tells what each operation costs the server in messages and bytes.
    let monitor_port = cachecast_testkit::free_port();
    let nats = cachecast_testkit::NatsServer::builder(cachecast_testkit::nats_binary())
        .args(["-m", &monitor_port.to_string()])
        .start()
        .await
        .context("could not start nats-server")?;
    let mut bus = BusConfig::default();
    bus.nats.url = nats.url();
    let mut report = Report::new(&cli.agents, cli.concurrency, cli.quick, &nats);
    let (iterations, budget, window) = if cli.quick {
        (100, Duration::from_secs(2), Duration::from_secs(1))
    } else {
        (2000, Duration::from_secs(10), Duration::from_secs(3))
    };

    let floors = Floors::start(&bus, "bench").await?;
    let sizes = if cli.parts.contains(&Part::Latency) {
        cli.agents.clone()
    } else {
        Vec::new()
    };
    let settings = Settings {
        iterations,
        budget,
        window,
        concurrency: cli.concurrency,
        meter: nats.pid().map(|pid| budget::Meter::new(monitor_port, pid)),
    };
    if !sizes.is_empty() {
        let empty = fleet::Http::empty().await?;
        report.latency(
            measure(
                "HTTP round trip alone",
                0,
                &settings,
                stats::op(move || {
                    let empty = empty.clone();
                    async move { empty.round().await }
                }),
                None,
            )
            .await,
        );
    }
    for (round, &n) in sizes.iter().enumerate() {
        eprintln!("fleet of {n}");
        let fleet = fleet::connect(&bus.nats, "bench-fleet", n).await?;

        // Each fleet gets an environment of its own, so no agent of one size counts in the next.
        let env = EnvId::new(format!("bench-{round}"))?;
        let (rows, agents, durable) = floors.and_library(&fleet, &bus, &env, &settings).await?;
        rows.into_iter().for_each(|row| report.latency(row));
        let publisher = &floors.publisher;
        // The other ways in, each in turns with the durable floor.
        let paired = |what, op| measure(what, n, &settings, op, Some(&durable.op));
        let http = fleet::Http::start(publisher.clone(), &env).await?;
        let op = stats::op(move || {
            let http = http.clone();
            async move { http.round().await }
        });
        report.latency(paired("cachecast HTTP", op).await);

        let service = fleet::Service::start(publisher.clone(), &bus, &env).await?;
        let op = stats::op(move || {
            let service = service.clone();
            async move { service.round().await }
        });
        report.latency(paired("cachecast NATS service", op).await);
        agents.stop().await;
        drop(fleet);
    }

    if cli.parts.contains(&Part::Sites) {
        let sizes: Vec<usize> = cli.agents.iter().copied().filter(|&n| n <= 100).collect();
        // The sites run on servers of their own, which the meter does not read.
        let settings = Settings {
            meter: None,
            ..settings.clone()
        };
        sites::measure_sites(&mut report, &sizes, &settings).await?;
    }

    if cli.parts.contains(&Part::Memory) {
        eprintln!("memory");
        let own = std::env::current_exe()?;
        let cachecast = own.with_file_name("cachecast");
        anyhow::ensure!(
            cachecast.exists(),
            "{} is missing: build it (scripts/bench does)",
            cachecast.display()
        );
        let url = nats.url();
        report.memory(
            "idle agent (`cachecast agent`, memory backend)",
            memory::rss_of(
                &cachecast,
                &args(&["agent", "--env", "bench-idle", "--nats-url", &url]),
                "agent is live",
            )
            .await?,
            None,
        );
        let entries = if cli.quick { 100_000 } else { 1_000_000 };
        report.memory(
            &format!("agent holding {entries} memory-cache entries (64-byte values)"),
            memory::rss_of(
                &own,
                &args(&[
                    "hold-entries",
                    "--nats-url",
                    &url,
                    "--entries",
                    &entries.to_string(),
                ]),
                "ready",
            )
            .await?,
            None,
        );
        let tracked = if cli.quick { 1000 } else { 10_000 };
        let base = memory::rss_of(
            &own,
            &args(&[
                "track-agents",
                "--nats-url",
                &url,
                "--env",
                "bench-none",
                "--expect",
                "0",
            ]),
            "ready",
        )
        .await?;
        memory::fake_presences(&bus, &EnvId::new("bench-track")?, tracked).await?;
        let loaded = memory::rss_of(
            &own,
            &args(&[
                "track-agents",
                "--nats-url",
                &url,
                "--env",
                "bench-track",
                "--expect",
                &tracked.to_string(),
            ]),
            "ready",
        )
        .await?;
        report.memory("publisher tracking no agent", base, None);
        report.memory(
            &format!("publisher tracking {tracked} agents"),
            loaded,
            Some(loaded.saturating_sub(base) / tracked as u64),
        );
    }

    if cli.parts.contains(&Part::SteadyMemory) {
        let requests = if cli.quick {
            cli.steady_requests.min(20_000)
        } else {
            cli.steady_requests
        };
        eprintln!("steady memory: {requests} invalidations, nobody scraping");
        let cachecast = std::env::current_exe()?.with_file_name("cachecast");
        let run = steady_memory::measure(
            &cachecast,
            &nats.url(),
            5,
            requests / 10,
            requests,
            cli.concurrency,
        )
        .await?;
        report.steady_memory(run);
    }

    if cli.parts.contains(&Part::Positions) {
        eprintln!("position candidates");
        let runs: &[(usize, usize)] = if cli.quick {
            &[(1, 100), (3, 100)]
        } else {
            &[(1, 1000), (1, 10_000), (3, 1000)]
        };
        for &(servers, caches) in runs {
            // A cluster that fails to form on a loaded machine loses this row, not the run.
            match position_candidates::measure(servers, caches).await {
                Ok(rows) => rows.into_iter().for_each(|r| report.position_candidate(r)),
                Err(err) => eprintln!("warning: {servers} server(s), {caches} caches: {err:#}"),
            }
        }
    }

    if cli.parts.contains(&Part::Redis) {
        eprintln!("redis");
        let runs = if cli.quick { 1 } else { 3 };
        let redis = cachecast_testkit::redis().await;
        report.redis(
            redis_eviction::measure("one Redis", &redis.url(), &cli.redis_keys, runs).await?,
        );
        drop(redis);
        let cluster = cachecast_testkit::RedisCluster::start(3, 0).await;
        report.redis(
            redis_eviction::measure("3-master cluster", &cluster.url(), &cli.redis_keys, runs)
                .await?,
        );
    }

    let text = report.render();
    println!("{text}");
    if let Some(path) = cli.write.filter(|p| !p.is_empty()).map(PathBuf::from) {
        report::write_into(&path, &text)
            .with_context(|| format!("could not write {}", path.display()))?;
        eprintln!("written into {}", path.display());
    }
    Ok(())
}

/// What the floors and the library are measured from: a requester with its JetStream context
/// and reply router, and a publisher, all on the same NATS.
struct Floors {
    requester: async_nats::Client,
    js: cachecast_bus::JetStream,
    replies: std::sync::Arc<floors::Replies>,
    publisher: Publisher,
}

impl Floors {
    async fn start(bus: &BusConfig, name: &str) -> anyhow::Result<Self> {
        let requester = cachecast_bus::connect(&bus.nats, &format!("{name}-requester")).await?;
        // The requester is where the stream is: the floor's own context, as in bare async-nats.
        let js = async_nats::jetstream::new(requester.clone());
        floors::durable_stream(&js).await?;
        let replies = floors::Replies::start(&requester, "bench.replies").await?;
        let publisher = Publisher::start(
            cachecast_bus::connect(&bus.nats, &format!("{name}-publisher")).await?,
            bus,
        )
        .await?;
        Ok(Self {
            requester,
            js,
            replies,
            publisher,
        })
    }

    /// The core and durable floors with `fleet` answering, then cachecast with an agent on each
    /// of `fleet`'s connections (on `agent_bus`) in `env`, through the library, in turns with
    /// the durable floor. The agents and the durable floor are returned running, for more
    /// measures.
    async fn and_library(
        &self,
        fleet: &[async_nats::Client],
        agent_bus: &BusConfig,
        env: &EnvId,
        settings: &Settings,
    ) -> anyhow::Result<(Vec<LatencyRow>, fleet::Agents, Durable)> {
        let n = fleet.len();
        let mut rows = Vec::new();
        let responders = floors::core_responders(fleet).await?;
        floors::await_core_interest(&self.requester).await?;
        let (r, rs) = (self.requester.clone(), self.replies.clone());
        rows.push(
            measure(
                "core floor",
                n,
                settings,
                stats::op(move || {
                    let (r, rs) = (r.clone(), rs.clone());
                    async move { floors::core_round(&r, &rs, n).await }
                }),
                None,
            )
            .await,
        );
        drop(responders);

        // Its consumers stay: cachecast is measured in turns with it.
        let (j, rs) = (self.js.clone(), self.replies.clone());
        let durable = Durable {
            _consumers: floors::durable_consumers(fleet, &agent_bus.nats).await?,
            op: stats::op(move || {
                let (j, rs) = (j.clone(), rs.clone());
                async move { floors::durable_round(&j, &rs, n).await }
            }),
        };
        rows.push(measure("durable floor", n, settings, durable.op.clone(), None).await);

        // The same agents taking every event from a consumer (`agent.live_events = false`),
        // then with `agent.fast_path`, each in an environment of its own; then the default
        // agents (live copies), which the other ways in are measured with.
        let library = |label: &'static str, env: EnvId| {
            let p = self.publisher.clone();
            let op = stats::op(move || {
                let (p, e) = (p.clone(), env.clone());
                async move { fleet::library_round(&p, &e).await }
            });
            measure(label, n, settings, op, Some(&durable.op))
        };
        let variants = [
            (
                "cachecast library, consumers",
                "consumers",
                AgentConfig {
                    live_events: false,
                    ..AgentConfig::default()
                },
            ),
            (
                "cachecast library, fast path",
                "fast",
                AgentConfig {
                    fast_path: true,
                    ..AgentConfig::default()
                },
            ),
        ];
        for (label, suffix, config) in variants {
            let variant = EnvId::new(format!("{env}-{suffix}"))?;
            let agents =
                fleet::Agents::start(fleet, agent_bus, &variant, &self.publisher, &config).await?;
            rows.push(library(label, variant).await);
            agents.stop().await;
        }

        let agents = fleet::Agents::start(
            fleet,
            agent_bus,
            env,
            &self.publisher,
            &AgentConfig::default(),
        )
        .await?;
        rows.push(library("cachecast library", env.clone()).await);
        Ok((rows, agents, durable))
    }
}

/// The durable floor, its consumers running, to measure cachecast in turns with.
struct Durable {
    op: Op,
    _consumers: floors::Responders,
}

/// How long each measure runs.
#[derive(Debug, Clone)]
struct Settings {
    iterations: usize,
    budget: Duration,
    window: Duration,
    concurrency: usize,
    /// Reads what each operation of a throughput run costs, where the server tells.
    meter: Option<budget::Meter>,
}

/// Throughput runs of an operation measured in turns with the durable floor: each gets this
/// many turns of `window / THROUGHPUT_TURNS`.
const THROUGHPUT_TURNS: u32 = 6;

/// Latency at concurrency 1, then throughput at the configured concurrency, of `op`; with
/// `versus` (the durable floor), in turns with it, which the row's ratios are then taken to.
async fn measure(
    what: &'static str,
    agents: usize,
    settings: &Settings,
    op: Op,
    versus: Option<&Op>,
) -> LatencyRow {
    let ops: Vec<Op> = std::iter::once(op).chain(versus.cloned()).collect();
    let latencies = stats::latencies(settings.iterations, settings.budget, &ops).await;
    let turns = if ops.len() > 1 { THROUGHPUT_TURNS } else { 1 };
    let mut runs = vec![
        (
            Throughput::default(),
            settings.meter.as_ref().map(|_| Spent::default())
        );
        ops.len()
    ];
    for turn in 0..turns {
        for i in stats::turn_order(turn as usize, ops.len()) {
            let (op, (done, spent)) = (&ops[i], &mut runs[i]);
            let run = stats::throughput(settings.concurrency, settings.window / turns, op.clone());
            let (run, cost) = match &settings.meter {
                Some(meter) => meter.around(run).await,
                None => (run.await, None),
            };
            *done += run;
            *spent = spent.zip(cost).map(|(mut spent, cost)| {
                spent += cost;
                spent
            });
        }
    }
    let mut measured = latencies
        .into_iter()
        .zip(runs)
        .map(|(latency, (done, spent))| Versus {
            latency,
            ops: done.per_second(),
            budget: spent.and_then(|spent| spent.per_op(done.completed)),
        });
    let own = measured.next().expect("one latency per operation");
    let row = LatencyRow {
        what,
        agents,
        latency: own.latency,
        ops: own.ops,
        budget: own.budget,
        versus: measured.next(),
    };
    row.print();
    row
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}
