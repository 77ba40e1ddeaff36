//! What one operation costs while a throughput run goes on: the server's messages and bytes
//! (its monitoring endpoint's `/varz`), and the CPU time of the nats-server and of this
//! process (which holds the requester, the publisher and every agent), from `/proc`.

use std::time::Duration;

/// Counters read at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    server_cpu: Duration,
    bench_cpu: Duration,
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
}

/// One operation's share of the server's and this process's work over a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Messages the server received (publishes, acks, pull requests) and sent (deliveries,
    /// acknowledgements).
    pub(crate) in_msgs: f64,
    pub(crate) out_msgs: f64,
    pub(crate) in_bytes: f64,
    pub(crate) out_bytes: f64,
    /// CPU microseconds (user + system) of the nats-server and of the benchmark's process.
    pub(crate) server_cpu_us: f64,
    pub(crate) bench_cpu_us: f64,
}

impl Budget {
    /// CPU microseconds of the server and this process together.
    pub(crate) fn cpu_us(&self) -> f64 {
        self.server_cpu_us + self.bench_cpu_us
    }
}

/// Reads the counters of one nats-server (started with `-m <monitor_port>`) and this process.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    varz: String,
    server_pid: u32,
    http: reqwest::Client,
}

impl Meter {
    pub(crate) fn new(monitor_port: u16, server_pid: u32) -> Self {
        Self {
            varz: format!("http://127.0.0.1:{monitor_port}/varz"),
            server_pid,
            http: reqwest::Client::new(),
        }
    }

    /// Runs `work` and returns its output with what the server and this process spent
    /// meanwhile (none when a counter could not be read).
    pub(crate) async fn around<F: std::future::Future>(
        &self,
        work: F,
    ) -> (F::Output, Option<Spent>) {
        let before = self.read().await;
        let output = work.await;
        let after = self.read().await;
        let spent = match (before, after) {
            (Some(b), Some(a)) => Some(Spent(Reading {
                server_cpu: a.server_cpu.saturating_sub(b.server_cpu),
                bench_cpu: a.bench_cpu.saturating_sub(b.bench_cpu),
                in_msgs: a.in_msgs.saturating_sub(b.in_msgs),
                out_msgs: a.out_msgs.saturating_sub(b.out_msgs),
                in_bytes: a.in_bytes.saturating_sub(b.in_bytes),
                out_bytes: a.out_bytes.saturating_sub(b.out_bytes),
            })),
            _ => None,
        };
        (output, spent)
    }

    async fn read(&self) -> Option<Reading> {
        let varz: serde_json::Value = self
            .http
            .get(&self.varz)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let count = |name: &str| varz[name].as_u64();
        Some(Reading {
            server_cpu: cpu_time(&format!("/proc/{}/stat", self.server_pid))?,
            bench_cpu: cpu_time("/proc/self/stat")?,
            in_msgs: count("in_msgs")?,
            out_msgs: count("out_msgs")?,
            in_bytes: count("in_bytes")?,
            out_bytes: count("out_bytes")?,
        })
    }
}

/// What the server and this process spent over one or more metered runs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Spent(Reading);

impl Spent {
    /// One operation's share, of `ops` completed (none without any).
    pub(crate) fn per_op(&self, ops: u64) -> Option<Budget> {
        let Spent(spent) = self;
        let ops = (ops > 0).then_some(ops as f64)?;
        let cpu_us = |d: Duration| d.as_secs_f64() * 1_000_000.0 / ops;
        Some(Budget {
            in_msgs: spent.in_msgs as f64 / ops,
            out_msgs: spent.out_msgs as f64 / ops,
            in_bytes: spent.in_bytes as f64 / ops,
            out_bytes: spent.out_bytes as f64 / ops,
            server_cpu_us: cpu_us(spent.server_cpu),
            bench_cpu_us: cpu_us(spent.bench_cpu),
        })
    }
}

impl std::ops::AddAssign for Spent {
    fn add_assign(&mut self, Spent(other): Self) {
        let Spent(spent) = self;
        spent.server_cpu += other.server_cpu;
        spent.bench_cpu += other.bench_cpu;
        spent.in_msgs += other.in_msgs;
        spent.out_msgs += other.out_msgs;
        spent.in_bytes += other.in_bytes;
        spent.out_bytes += other.out_bytes;
    }
}

/// User plus system CPU time of a process, from its `/proc/<pid>/stat`.
fn cpu_time(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    cpu_time_of(&stat)
}

/// `/proc` counts in USER_HZ ticks, which Linux fixes at 100 a second for user space.
const TICKS_PER_SECOND: u64 = 100;

fn cpu_time_of(stat: &str) -> Option<Duration> {
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) comes first; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SECOND,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_user_plus_system_past_a_command_name_with_spaces() {
        let stat =
            "4242 (nats server) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 150 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_time_of(stat), Some(Duration::from_millis(4000)));
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(cpu_time("/proc/self/stat").is_some());
    }
}
