//! Latency samples and their percentiles, and throughput runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Percentiles of a set of latency samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) samples: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
}

impl Latency {
    fn from_samples(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i]
        };
        Self {
            samples: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
        }
    }
}

/// Runs `op` one at a time, `iterations` times or until `budget` is spent (at least 20
/// times), after `warmup` unmeasured runs.
pub(crate) async fn latency<F, Fut>(iterations: usize, budget: Duration, mut op: F) -> Latency
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..iterations.min(50) / 5 {
        op().await;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(iterations);
    while samples.len() < iterations && (samples.len() < 20 || started.elapsed() < budget) {
        let t = Instant::now();
        op().await;
        samples.push(t.elapsed());
    }
    Latency::from_samples(samples)
}

/// What a throughput run completed, and in how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Throughput {
    pub(crate) completed: u64,
    pub(crate) elapsed: Duration,
}

impl Throughput {
    pub(crate) fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

impl crate::budget::Completed for Throughput {
    fn completed(&self) -> u64 {
        self.completed
    }
}

/// Runs `op` from `concurrency` workers for `duration`.
pub(crate) async fn throughput<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Throughput
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = op.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    op().await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.ok();
    }
    Throughput {
        completed: done.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_samples() {
        let samples = (1..=1000).map(Duration::from_millis).collect();
        let l = Latency::from_samples(samples);
        assert_eq!(l.p50, Duration::from_millis(500));
        assert_eq!(l.p99, Duration::from_millis(990));
        assert_eq!(l.p999, Duration::from_millis(999));
    }
}
