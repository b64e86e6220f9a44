//! Rate limits of policy rules: token buckets, one per (rule, client /
//! user / source). The bucket arithmetic is pure ([`Bucket::take`]); the
//! buckets live in a bounded moka cache, dropped when idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::policy::RateLimit;

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    /// Seconds (any fixed origin) of the last update.
    updated: f64,
}

impl Bucket {
    pub fn full(capacity: f64, now: f64) -> Bucket {
        Bucket {
            tokens: capacity,
            updated: now,
        }
    }

    /// Takes `n` tokens at `now` (a batch counts each entry), or says how
    /// many seconds until they are there. More than the capacity never
    /// are: refused with a wait of the whole window.
    pub fn take(&mut self, capacity: f64, rate: f64, now: f64, n: f64) -> Result<(), f64> {
        let elapsed = (now - self.updated).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.updated = now;
        if n > capacity {
            return Err(capacity / rate);
        }
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err((n - self.tokens) / rate)
        }
    }
}

/// Every rule's buckets.
pub struct Limiter {
    buckets: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
    origin: std::time::Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            buckets: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                // A bucket idle this long is full again anyway for any
                // limit of up to a day.
                .time_to_idle(Duration::from_secs(86_400))
                .build(),
            origin: std::time::Instant::now(),
        }
    }
}

impl Limiter {
    /// Counts `n` requests (a request, or a batch's entries) against
    /// `limit` of rule `rule` for `who`; the seconds to wait when the
    /// bucket holds too few.
    pub fn check(&self, rule: &str, limit: &RateLimit, who: &str, n: u32) -> Result<(), f64> {
        let capacity = f64::from(limit.requests);
        let rate = capacity / f64::from(limit.per_seconds);
        let now = self.origin.elapsed().as_secs_f64();
        let bucket = self
            .buckets
            .get_with(format!("{rule}\u{0}{}\u{0}{who}", limit.per), || {
                Arc::new(Mutex::new(Bucket::full(capacity, now)))
            });
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        b.take(capacity, rate, now, f64::from(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_evenly() {
        // 3 per 60 s: 3 at once, then one every 20 s.
        let (cap, rate) = (3.0, 3.0 / 60.0);
        let mut b = Bucket::full(cap, 0.0);
        assert!(b.take(cap, rate, 0.0, 1.0).is_ok());
        assert!(b.take(cap, rate, 0.0, 1.0).is_ok());
        assert!(b.take(cap, rate, 0.0, 1.0).is_ok());
        let wait = b.take(cap, rate, 0.0, 1.0).unwrap_err();
        assert!((wait - 20.0).abs() < 1e-9, "{wait}");
        assert!(b.take(cap, rate, 10.0, 1.0).is_err());
        assert!(b.take(cap, rate, 20.0, 1.0).is_ok());
        // Never more than the capacity, however long idle.
        let mut b = Bucket::full(cap, 0.0);
        for _ in 0..3 {
            b.take(cap, rate, 0.0, 1.0).unwrap();
        }
        for i in 0..3 {
            assert!(b.take(cap, rate, 10_000.0, 1.0).is_ok(), "{i}");
        }
        assert!(b.take(cap, rate, 10_000.0, 1.0).is_err());
    }

    #[test]
    fn limiter_counts_each_caller_apart() {
        let l = Limiter::default();
        let limit = RateLimit {
            per: "client".into(),
            requests: 2,
            per_seconds: 3600,
        };
        assert!(l.check("r", &limit, "a", 1).is_ok());
        assert!(l.check("r", &limit, "a", 1).is_ok());
        assert!(l.check("r", &limit, "a", 1).is_err());
        assert!(l.check("r", &limit, "b", 1).is_ok());
        assert!(l.check("other-rule", &limit, "a", 1).is_ok());
        // A batch counts each entry; more than the capacity never passes.
        assert!(l.check("batch", &limit, "a", 2).is_ok());
        assert!(l.check("batch", &limit, "a", 1).is_err());
        assert_eq!(l.check("big", &limit, "a", 3), Err(3600.0));
        assert!(l.check("big", &limit, "a", 2).is_ok());
    }
}
