//! Latency samples and their percentiles, and throughput runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;

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

/// An operation to measure, type-erased so that several can be measured in turns.
pub(crate) type Op = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

pub(crate) fn op<F, Fut>(f: F) -> Op
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move || f().boxed())
}

/// Samples each operation takes in one turn of [`latencies`].
const TURN_SAMPLES: usize = 100;

/// The latency of each of `ops`, run one at a time, `iterations` times each or until `budget`
/// each is spent (at least 20 times), after a few unmeasured runs. The operations take turns
/// of [`TURN_SAMPLES`] samples, so whatever else the machine does meanwhile falls on each of
/// them alike: their ratio holds where their absolute times swing.
pub(crate) async fn latencies(iterations: usize, budget: Duration, ops: &[Op]) -> Vec<Latency> {
    for op in ops {
        for _ in 0..iterations.min(50) / 5 {
            op().await;
        }
    }
    let budget = budget * ops.len() as u32;
    let started = Instant::now();
    let wants_more = |taken: &[Duration]| {
        taken.len() < iterations && (taken.len() < 20 || started.elapsed() < budget)
    };
    let mut samples: Vec<Vec<Duration>> =
        ops.iter().map(|_| Vec::with_capacity(iterations)).collect();
    for turn in 0.. {
        if !samples.iter().any(|taken| wants_more(taken)) {
            break;
        }
        for i in turn_order(turn, ops.len()) {
            let (op, taken) = (&ops[i], &mut samples[i]);
            for _ in 0..TURN_SAMPLES {
                if !wants_more(taken) {
                    break;
                }
                let t = Instant::now();
                op().await;
                taken.push(t.elapsed());
            }
        }
    }
    samples.into_iter().map(Latency::from_samples).collect()
}

/// The order in which `n` operations take turn `turn`: reversed every other turn, so none
/// always runs right after another (and meets the work it left behind).
pub(crate) fn turn_order(turn: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| if turn.is_multiple_of(2) { i } else { n - 1 - i })
}

/// What a throughput run completed, and in how long.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Throughput {
    pub(crate) completed: u64,
    pub(crate) elapsed: Duration,
}

impl Throughput {
    pub(crate) fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

impl std::ops::AddAssign for Throughput {
    fn add_assign(&mut self, other: Self) {
        self.completed += other.completed;
        self.elapsed += other.elapsed;
    }
}

/// Runs `op` from `concurrency` workers for `duration`.
pub(crate) async fn throughput(concurrency: usize, duration: Duration, op: Op) -> Throughput {
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
    fn turns_alternate_their_order() {
        let order = |turn| turn_order(turn, 3).collect::<Vec<_>>();
        assert_eq!(order(0), [0, 1, 2]);
        assert_eq!(order(1), [2, 1, 0]);
        assert_eq!(order(2), [0, 1, 2]);
    }

    #[test]
    fn percentiles_pick_the_right_samples() {
        let samples = (1..=1000).map(Duration::from_millis).collect();
        let l = Latency::from_samples(samples);
        assert_eq!(l.p50, Duration::from_millis(500));
        assert_eq!(l.p99, Duration::from_millis(990));
        assert_eq!(l.p999, Duration::from_millis(999));
    }
}
