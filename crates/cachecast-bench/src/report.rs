//! The benchmark's table, the machine it ran on, and writing both into docs/BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use cachecast_testkit::NatsServer;

use crate::stats::{Latency, ms};

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

#[derive(Debug)]
pub(crate) struct LatencyRow {
    pub(crate) what: &'static str,
    pub(crate) agents: usize,
    pub(crate) latency: Latency,
    /// Confirmed operations per second at the run's concurrency.
    pub(crate) ops: f64,
    /// What one operation of the throughput run cost the server and this process.
    pub(crate) budget: Option<crate::budget::Budget>,
    /// The durable floor, measured in turns with this row: its ratios are taken to this.
    pub(crate) versus: Option<Versus>,
}

/// One operation's measures: the durable floor's, next to the row measured in turns with it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Versus {
    pub(crate) latency: Latency,
    pub(crate) ops: f64,
    pub(crate) budget: Option<crate::budget::Budget>,
}

impl LatencyRow {
    /// What this row's ratios are taken to: the durable floor measured in turns with it, or
    /// else the durable floor's row at the same N among `rows`.
    fn floor(&self, rows: &[LatencyRow]) -> Option<Versus> {
        self.versus.or_else(|| {
            rows.iter()
                .find(|r| r.what == "durable floor" && r.agents == self.agents)
                .map(|f| Versus {
                    latency: f.latency,
                    ops: f.ops,
                    budget: f.budget,
                })
        })
    }
}

impl LatencyRow {
    /// One line on stderr while the benchmark runs.
    pub(crate) fn print(&self) {
        eprintln!(
            "  {:<18} N={:<5} p50 {} ms  p99 {} ms  {:.0}/s",
            self.what,
            self.agents,
            ms(self.latency.p50),
            ms(self.latency.p99),
            self.ops
        );
        if let Some(b) = &self.budget {
            eprintln!(
                "    per op: {:.1} msgs in, {:.1} out, {:.0} B in, {:.0} B out, server {:.1} µs, bench {:.1} µs CPU",
                b.in_msgs, b.out_msgs, b.in_bytes, b.out_bytes, b.server_cpu_us, b.bench_cpu_us
            );
        }
        if let Some(floor) = &self.versus {
            let cpu = match (&self.budget, &floor.budget) {
                (Some(own), Some(floor)) => format!(", CPU {:.2}x", own.cpu_us() / floor.cpu_us()),
                _ => String::new(),
            };
            eprintln!(
                "    to the durable floor in turns with it: p50 {}, per second {:.2}x{cpu}",
                ratio(self.latency.p50, Some(floor.latency.p50)),
                self.ops / floor.ops
            );
        }
    }
}

#[derive(Debug)]
pub(crate) struct Report {
    header: String,
    concurrency: usize,
    latency: Vec<LatencyRow>,
    memory: Vec<(String, u64, Option<u64>)>,
    redis: Vec<crate::redis_eviction::RedisRow>,
    steady: Option<crate::steady_memory::SteadyMemory>,
    positions: Vec<crate::position_candidates::CandidateRow>,
    sites: Option<(Duration, Vec<LatencyRow>)>,
}

impl Report {
    pub(crate) fn new(
        agents: &[usize],
        concurrency: usize,
        quick: bool,
        nats: &NatsServer,
    ) -> Self {
        let sizes: Vec<String> = agents.iter().map(|n| n.to_string()).collect();
        let mut command = format!("scripts/bench --agents {}", sizes.join(","));
        if quick {
            command.push_str(" --quick");
        }
        let header = format!(
            "Command: `{command}` (concurrency {concurrency})\n\nMachine: {}\n",
            machine(nats)
        );
        Self {
            header,
            concurrency,
            latency: Vec::new(),
            memory: Vec::new(),
            redis: Vec::new(),
            steady: None,
            positions: Vec::new(),
            sites: None,
        }
    }

    pub(crate) fn latency(&mut self, row: LatencyRow) {
        self.latency.push(row);
    }

    /// The rows of agents at a site, `round_trip` away from the hub.
    pub(crate) fn sites(&mut self, round_trip: Duration, rows: Vec<LatencyRow>) {
        self.sites = Some((round_trip, rows));
    }

    pub(crate) fn memory(&mut self, what: &str, rss: u64, per_agent: Option<u64>) {
        self.memory.push((what.to_owned(), rss, per_agent));
    }

    pub(crate) fn redis(&mut self, rows: Vec<crate::redis_eviction::RedisRow>) {
        self.redis.extend(rows);
    }

    pub(crate) fn position_candidate(&mut self, row: crate::position_candidates::CandidateRow) {
        eprintln!(
            "  {} server(s), {} caches, {}: create {} ms, {:.1} MiB, recover {} ms",
            row.servers,
            row.caches,
            row.candidate,
            row.create.as_millis(),
            mib(row.rss_bytes),
            row.recover.as_millis()
        );
        self.positions.push(row);
    }

    pub(crate) fn steady_memory(&mut self, run: crate::steady_memory::SteadyMemory) {
        for g in &run.growth {
            eprintln!(
                "  {}: {:.1} -> {:.1} MiB",
                g.process,
                mib(g.before),
                mib(g.after)
            );
        }
        self.steady = Some(run);
    }

    /// Markdown: the header, then one table per measure.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.header);
        let _ = writeln!(
            out,
            "Latency of one confirmed invalidation at concurrency 1 (ms), and confirmed invalidations per second at concurrency {}. The ratios are to the durable floor at the same N, measured in turns with each cachecast row (latency samples, then throughput, a share at a time each, in alternating order), so that what else the machine does falls on both alike.\n",
            self.concurrency
        );
        let _ = writeln!(
            out,
            "| what | N | samples | p50 | p99 | p99.9 | p50 / durable | p99 / durable | per second | per second / durable |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.latency {
            let floor = row.floor(&self.latency);
            let per_second = floor
                .filter(|f| f.ops > 0.0)
                .map_or("-".into(), |f| format!("{:.2}x", row.ops / f.ops));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {per_second} |",
                row.what,
                row.agents,
                row.latency.samples,
                ms(row.latency.p50),
                ms(row.latency.p99),
                ms(row.latency.p999),
                ratio(row.latency.p50, floor.map(|f| f.latency.p50)),
                ratio(row.latency.p99, floor.map(|f| f.latency.p99)),
                row.ops
            );
        }
        self.render_budgets(&mut out);
        let _ = writeln!(out, "\nResident memory (VmRSS).\n");
        let _ = writeln!(out, "| process | RSS (MiB) | per tracked agent |");
        let _ = writeln!(out, "|---|---:|---:|");
        for (what, rss, per_agent) in &self.memory {
            let per = per_agent.map_or("-".into(), |b| format!("{:.2} KiB", b as f64 / 1024.0));
            let _ = writeln!(
                out,
                "| {what} | {:.1} | {per} |",
                *rss as f64 / (1024.0 * 1024.0)
            );
        }
        if let Some(run) = &self.steady {
            let _ = writeln!(
                out,
                "\nSteady memory: {} confirmed invalidations through the HTTP API ({:.0}/s, {} memory agents, concurrency {}), after a warm-up of a tenth as many, with nobody scraping `/metrics`. RSS of the real processes before and after.\n",
                run.requests,
                run.requests as f64 / run.elapsed.as_secs_f64(),
                run.agents,
                self.concurrency
            );
            let _ = writeln!(
                out,
                "| process | before (MiB) | after (MiB) | growth (MiB) | bytes per request |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|");
            for g in &run.growth {
                let grown = g.after as f64 - g.before as f64;
                let _ = writeln!(
                    out,
                    "| {} | {:.1} | {:.1} | {:+.1} | {:.1} |",
                    g.process,
                    mib(g.before),
                    mib(g.after),
                    grown / (1024.0 * 1024.0),
                    grown / run.requests as f64
                );
            }
        }
        if !self.positions.is_empty() {
            let _ = writeln!(
                out,
                "\nWhere a persistent cache's position lives: creating N (concurrency 16), the servers' RSS afterwards (summed), and how long until all N are usable again after every server restarted (recreated by the agents, or recovered by the servers). Stream and bucket with 1 replica on one server, 3 on the cluster.\n"
            );
            let _ = writeln!(
                out,
                "| servers | candidate | caches | create (ms) | servers' RSS (MiB) | after a restart (ms) |"
            );
            let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|");
            for row in &self.positions {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.1} | {} |",
                    row.servers,
                    row.candidate,
                    row.caches,
                    row.create.as_millis(),
                    mib(row.rss_bytes),
                    row.recover.as_millis()
                );
            }
        }
        if let Some((round_trip, rows)) = &self.sites {
            render_sites(&mut out, *round_trip, rows);
        }
        if !self.redis.is_empty() {
            self.render_redis(&mut out);
        }
        out
    }
}

/// Agents at a site: each row next to the durable floor across the same link, and to one round
/// trip (the physical limit of a confirmation).
fn render_sites(out: &mut String, round_trip: Duration, rows: &[LatencyRow]) {
    let _ = writeln!(
        out,
        "\nAgents at a site behind a leaf node, the link {} ms each way ({} ms round trip); the publisher, the stream and the requester at the hub. Latency at concurrency 1 (ms), its p50 next to the durable floor across the same link and to one round trip, and confirmed invalidations per second.\n",
        round_trip.as_millis() / 2,
        round_trip.as_millis()
    );
    let _ = writeln!(
        out,
        "| what | N | samples | p50 | p99 | p50 / durable | p50 / round trip | per second |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let floor = row.floor(rows).map(|f| f.latency.p50);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.2}x | {:.0} |",
            row.what,
            row.agents,
            row.latency.samples,
            ms(row.latency.p50),
            ms(row.latency.p99),
            ratio(row.latency.p50, floor),
            row.latency.p50.as_secs_f64() / round_trip.as_secs_f64(),
            row.ops
        );
    }
}

impl Report {
    /// What one operation of each throughput run cost, next to the durable floor's.
    fn render_budgets(&self, out: &mut String) {
        if self.latency.iter().all(|r| r.budget.is_none()) {
            return;
        }
        let _ = writeln!(
            out,
            "\nWhat one operation of the throughput run cost: messages and bytes the nats-server received and sent (its `/varz`), and CPU microseconds of the nats-server and of the benchmark's process (which holds the requester, the publisher and every agent), with their sum next to the durable floor's.\n"
        );
        let _ = writeln!(
            out,
            "| what | N | msgs in | msgs out | bytes in | bytes out | server CPU µs | bench CPU µs | CPU / durable |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.latency {
            let Some(budget) = &row.budget else { continue };
            let floor = row.floor(&self.latency).and_then(|f| f.budget);
            let versus = floor.map_or("-".into(), |f| {
                format!("{:.2}x", budget.cpu_us() / f.cpu_us())
            });
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {versus} |",
                row.what,
                row.agents,
                budget.in_msgs,
                budget.out_msgs,
                budget.in_bytes,
                budget.out_bytes,
                budget.server_cpu_us,
                budget.bench_cpu_us,
            );
        }
    }
}

/// `a / b` as `1.23x`, or `-` without a `b`.
fn ratio(a: Duration, b: Option<Duration>) -> String {
    match b {
        Some(b) if !b.is_zero() => format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64()),
        _ => "-".into(),
    }
}

impl Report {
    /// Scope eviction by keyspace size, and what the largest costs against the default
    /// `agent.evict_timeout`.
    fn render_redis(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nEvicting one scope's {} entries as the keyspace grows (median of the runs). Floor: a plain `SCAN MATCH` (COUNT 1000) + `UNLINK` loop, on every master at once in the cluster.\n",
            crate::redis_eviction::PER_SCOPE
        );
        let _ = writeln!(
            out,
            "| Redis | keys | backend `SCAN COUNT` | backend ms | floor ms | / floor | backend ms per million keys |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for row in &self.redis {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2}x | {:.0} |",
                row.topology,
                row.keys,
                row.scan_count,
                ms(row.ours),
                ms(row.floor),
                row.ours.as_secs_f64() / row.floor.as_secs_f64(),
                row.ours.as_secs_f64() * 1e3 / (row.keys as f64 / 1e6)
            );
        }
        let timeout = cachecast_agent::AgentConfig::default().evict_timeout;
        let _ = writeln!(
            out,
            "\n`agent.evict_timeout` defaults to {timeout:?}. Largest keyspace measured, per topology and `SCAN COUNT`:"
        );
        let largest = self.redis.iter().map(|r| r.keys).max().unwrap_or(0);
        for row in self.redis.iter().filter(|r| r.keys == largest) {
            let _ = writeln!(
                out,
                "- {}, COUNT {}: {:.1} s, {:.0}% of the timeout",
                row.topology,
                row.scan_count,
                row.ours.as_secs_f64(),
                100.0 * row.ours.as_secs_f64() / timeout.as_secs_f64()
            );
        }
    }
}

/// Cores, memory, CPU, kernel, and the servers' versions.
fn machine(nats: &NatsServer) -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let version = |program: &std::path::Path| {
        std::process::Command::new(program)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{cores} cores ({cpu}), {:.0} GiB, Linux {}; {}; {}; everything on this one machine, release build",
        mem_kib as f64 / (1024.0 * 1024.0),
        read("/proc/sys/kernel/osrelease").trim(),
        version(nats.binary()),
        version(std::path::Path::new("redis-server"))
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Replaces what stands between the bench markers of `path` with `text`.
pub(crate) fn write_into(path: &Path, text: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(path)?;
    let (Some(start), Some(end)) = (doc.find(START), doc.find(END)) else {
        anyhow::bail!("{} has no {START} ... {END} markers", path.display());
    };
    let updated = format!("{}{START}\n{text}\n{}", &doc[..start], &doc[end..]);
    std::fs::write(path, updated)?;
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
