//! A per-token rate limit: a token bucket for each bearer token (`429` with `Retry-After`).
//!
//! Each token may send `api.rate_limit_burst` requests at once and `api.rate_limit_per_second`
//! on average; `0` turns the limit off. Tokens are kept as keyed hashes (SipHash with a key
//! random per process), never as text. The table is bounded: when it holds
//! [`MAX_TRACKED_TOKENS`] tokens, the ones whose bucket is full again are forgotten (they are
//! indistinguishable from new ones); if all are busy, the oldest half is.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most tokens tracked at once.
pub const MAX_TRACKED_TOKENS: usize = 100_000;

/// Token buckets keyed by bearer token.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    hasher: RandomState,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_second` requests on average (0: no limit), up to `burst` at once.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            per_second: if per_second.is_finite() {
                per_second.max(0.0)
            } else {
                0.0
            },
            burst: f64::from(burst.max(1)),
            hasher: RandomState::new(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Charges `token` one request: `Err(wait)` when it must wait that long first.
    pub fn check(&self, token: &str) -> Result<(), Duration> {
        self.check_at(token, Instant::now())
    }

    fn check_at(&self, token: &str, now: Instant) -> Result<(), Duration> {
        if self.per_second == 0.0 {
            return Ok(());
        }
        let key = self.hasher.hash_one(token);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_TOKENS && !buckets.contains_key(&key) {
            self.forget_idle(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    fn forget_idle(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        let refill = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_second
        };
        buckets.retain(|_, b| refill(b) < self.burst);
        if buckets.len() >= MAX_TRACKED_TOKENS {
            let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            buckets.retain(|_, b| b.at > cut);
        }
    }

    /// How many tokens are tracked (for tests).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_gets_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_at("a", t0), Ok(()));
        }
        let wait = limiter.check_at("a", t0).expect_err("burst spent");
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another token is not affected.
        assert_eq!(limiter.check_at("b", t0), Ok(()));
        // Half a second later one more request is allowed, and only one.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check_at("a", later), Ok(()));
        assert!(limiter.check_at("a", later).is_err());
    }

    #[test]
    fn zero_turns_it_off() {
        let limiter = RateLimiter::new(0.0, 1);
        for _ in 0..1000 {
            assert_eq!(limiter.check("a"), Ok(()));
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn the_table_stays_bounded() {
        let limiter = RateLimiter::new(1.0, 2);
        let t0 = Instant::now();
        for n in 0..MAX_TRACKED_TOKENS + 10 {
            // Each token spends its burst, so none is idle.
            let token = n.to_string();
            limiter.check_at(&token, t0).ok();
            limiter.check_at(&token, t0).ok();
        }
        assert!(
            limiter.tracked() <= MAX_TRACKED_TOKENS,
            "{}",
            limiter.tracked()
        );
    }
}
