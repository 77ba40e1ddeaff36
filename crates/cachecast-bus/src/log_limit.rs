//! Rate-limited warnings, for messages a peer sends that cachecast refuses: the first of each
//! kind is logged at once, the rest at most once per interval with a count of those left out,
//! so a flood of bad messages cannot flood the log (the metrics count every one).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides which warnings of each kind get logged.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    /// Per kind: when it was last logged, and how many were left out since.
    state: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogLimiter {
    /// At most one warning of each kind per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::default(),
        }
    }

    /// `Some(left_out)` when a warning of `kind` may be logged now, with how many of that kind
    /// were left out since the last one logged; `None` when this one must only be counted.
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        self.allow_at(kind, Instant::now())
    }

    fn allow_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.get_mut(kind) {
            Some((last, left_out)) if now.duration_since(*last) < self.interval => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                let skipped = std::mem::take(left_out);
                *last = now;
                Some(skipped)
            }
            None => {
                state.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_then_counts_until_the_interval_passes() {
        let limiter = LogLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(limiter.allow_at("malformed", at(0)), Some(0));
        assert_eq!(limiter.allow_at("malformed", at(1)), None);
        assert_eq!(limiter.allow_at("malformed", at(9)), None);
        assert_eq!(
            limiter.allow_at("oversized", at(9)),
            Some(0),
            "kinds are independent"
        );
        assert_eq!(limiter.allow_at("malformed", at(10)), Some(2));
        assert_eq!(limiter.allow_at("malformed", at(11)), None);
        assert_eq!(limiter.allow_at("malformed", at(20)), Some(1));
    }
}
