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
        self.refill(capacity, rate, now);
        self.holds(capacity, rate, n)?;
        self.tokens -= n;
        Ok(())
    }

    /// Adds what `rate` gave since the last update, up to `capacity`.
    fn refill(&mut self, capacity: f64, rate: f64, now: f64) {
        let elapsed = (now - self.updated).max(0.0);
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        // A request that read the clock before another took the bucket's
        // lock comes in with an earlier `now`: going back to it would give
        // the time between again.
        self.updated = self.updated.max(now);
    }

    /// Whether `n` tokens are there (after [`Bucket::refill`]), or the
    /// seconds until they are.
    fn holds(&self, capacity: f64, rate: f64, n: f64) -> Result<(), f64> {
        if n > capacity {
            Err(capacity / rate)
        } else if self.tokens >= n {
            Ok(())
        } else {
            Err((n - self.tokens) / rate)
        }
    }
}

/// One rate limit a request is counted against: `n` tokens (a request, or
/// a batch's entries) of `limit` of policy rule `rule`, for `who`.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub rule: &'a str,
    pub limit: &'a RateLimit,
    pub who: &'a str,
    pub n: u32,
}

/// A bucket, and how long it may idle: past its limit's window it is full
/// again anyway, and forgetting it changes nothing.
struct Held {
    /// Seconds; the window of the limit that last used it (a reload may
    /// lengthen it).
    idle: std::sync::atomic::AtomicU64,
    bucket: Mutex<Bucket>,
}

impl Held {
    fn idle(&self) -> Duration {
        Duration::from_secs(self.idle.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Each bucket is dropped once idle for its own window (not a day, the
/// longest window: many callers' buckets of a one-minute limit, a site
/// rotating through its /64s, would fill the table for a day, and a full
/// table may refuse to keep new callers' buckets, whose limits would then
/// not hold).
struct IdleForItsWindow;

impl moka::Expiry<String, Arc<Held>> for IdleForItsWindow {
    fn expire_after_create(
        &self,
        _k: &String,
        v: &Arc<Held>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.idle())
    }

    fn expire_after_read(
        &self,
        _k: &String,
        v: &Arc<Held>,
        _now: std::time::Instant,
        _left: Option<Duration>,
        _modified: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.idle())
    }

    fn expire_after_update(
        &self,
        _k: &String,
        v: &Arc<Held>,
        _now: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.idle())
    }
}

/// Every rule's buckets.
pub struct Limiter {
    buckets: moka::sync::Cache<String, Arc<Held>>,
    origin: std::time::Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            buckets: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .expire_after(IdleForItsWindow)
                .build(),
            origin: std::time::Instant::now(),
        }
    }
}

impl Limiter {
    /// Counts `n` requests (a request, or a batch's entries) against
    /// `limit` of rule `rule` for `who`; the seconds to wait when the
    /// bucket holds too few. (One limit: the tests' shorthand for
    /// [`Limiter::check_all`].)
    #[cfg(test)]
    pub fn check(&self, rule: &str, limit: &RateLimit, who: &str, n: u32) -> Result<(), f64> {
        self.check_all(&[Ask {
            rule,
            limit,
            who,
            n,
        }])
        .map_err(|(_, wait)| wait)
    }

    /// Counts a request against every limit in `asks` at once: its tokens
    /// are taken from each bucket only if every one holds them, so a
    /// request refused by one limit spends nothing of the others (one
    /// user's refused requests must not empty its client's bucket). When
    /// refused: the first refusing ask's index and its wait.
    pub fn check_all(&self, asks: &[Ask]) -> Result<(), (usize, f64)> {
        let now = self.origin.elapsed().as_secs_f64();
        let shape = |a: &Ask| {
            let capacity = f64::from(a.limit.requests);
            (capacity, capacity / f64::from(a.limit.per_seconds))
        };
        // Locked in key order (two requests never wait on each other in
        // a circle); a key asked twice is one bucket asked for both.
        let mut keyed: Vec<(String, usize)> = asks
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("{}\u{0}{}\u{0}{}", a.rule, a.limit.per, a.who), i))
            .collect();
        keyed.sort();
        let mut buckets: Vec<(Arc<Held>, Vec<usize>)> = Vec::new();
        let mut last: Option<&str> = None;
        for (key, i) in &keyed {
            if last == Some(key.as_str()) {
                if let Some((_, asked)) = buckets.last_mut() {
                    asked.push(*i);
                }
                continue;
            }
            last = Some(key);
            let (capacity, _) = shape(&asks[*i]);
            let window = asks[*i].limit.per_seconds;
            // (A second more: a bucket read at its window's end.)
            let idle = u64::from(window) + 1;
            let b = self.buckets.get_with(key.clone(), || {
                Arc::new(Held {
                    idle: idle.into(),
                    bucket: Mutex::new(Bucket::full(capacity, now)),
                })
            });
            // A window changed by a reload: the bucket's expiry follows now.
            if b.idle.swap(idle, std::sync::atomic::Ordering::Relaxed) != idle {
                self.buckets.insert(key.clone(), b.clone());
            }
            buckets.push((b, vec![*i]));
        }
        // Each bucket locked, with the tokens its asks want together.
        let mut held: Vec<_> = buckets
            .iter()
            .map(|(b, asked)| {
                let n: f64 = asked.iter().map(|i| f64::from(asks[*i].n)).sum();
                (b.bucket.lock().unwrap_or_else(|p| p.into_inner()), asked, n)
            })
            .collect();
        let mut refused: Option<(usize, f64)> = None;
        for (b, asked, n) in &mut held {
            let (capacity, rate) = shape(&asks[asked[0]]);
            b.refill(capacity, rate, now);
            if let Err(wait) = b.holds(capacity, rate, *n) {
                let first = *asked.iter().min().unwrap_or(&0);
                if refused.is_none_or(|(j, _)| first < j) {
                    refused = Some((first, wait));
                }
            }
        }
        if let Some(r) = refused {
            return Err(r);
        }
        for (b, _, n) in &mut held {
            b.tokens -= *n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bucket idle past its window (full again) is forgotten; one of a
    /// longer window is kept.
    #[test]
    fn a_bucket_is_kept_only_while_its_window_could_matter() {
        let limiter = Limiter::default();
        let limit = |per_seconds| RateLimit {
            per: "source".into(),
            requests: 1,
            per_seconds,
        };
        let (short, long) = (limit(1), limit(3600));
        assert!(limiter.check("r", &short, "a", 1).is_ok());
        assert!(limiter.check("r", &short, "a", 1).is_err());
        assert!(limiter.check("r", &long, "b", 1).is_ok());
        // A rule whose window a reload lengthened: its bucket is kept as
        // long as the new window says.
        assert!(limiter.check("r", &short, "c", 1).is_ok());
        assert!(limiter.check("r", &long, "c", 1).is_err());
        std::thread::sleep(Duration::from_millis(2300));
        limiter.buckets.run_pending_tasks();
        assert_eq!(limiter.buckets.entry_count(), 2);
        assert!(limiter.check("r", &long, "c", 1).is_err());
        assert!(limiter.check("r", &long, "b", 1).is_err());
    }

    /// A `now` read before another request updated the bucket (it waited
    /// for the lock) neither refills it nor moves its clock back.
    #[test]
    fn a_late_clock_reading_gives_nothing_twice() {
        // 2 per 10 s: a token every 5 s.
        let mut b = Bucket::full(2.0, 0.0);
        assert!(b.take(2.0, 0.2, 10.0, 2.0).is_ok());
        assert!(b.take(2.0, 0.2, 5.0, 1.0).is_err());
        assert!(b.take(2.0, 0.2, 10.0, 1.0).is_err());
        assert!(b.take(2.0, 0.2, 15.0, 1.0).is_ok());
    }

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

    /// A request counted against several limits takes from all or none:
    /// refused by one, it spends nothing of the others.
    #[test]
    fn a_request_refused_by_one_limit_spends_none_of_the_others() {
        let per = |per: &str, requests: u32| RateLimit {
            requests,
            per_seconds: 3600,
            per: per.into(),
        };
        let (client, user) = (per("client", 3), per("user", 1));
        let l = Limiter::default();
        let ask = |who_user: &'static str| {
            [
                Ask {
                    rule: "a.yaml#per-client",
                    limit: &client,
                    who: "client:app",
                    n: 1,
                },
                Ask {
                    rule: "b.yaml#per-user",
                    limit: &user,
                    who: who_user,
                    n: 1,
                },
            ]
        };
        assert!(l.check_all(&ask("u1")).is_ok());
        // u1 is over its own limit many times over: the client's bucket
        // keeps its two tokens for the app's other users.
        for _ in 0..10 {
            let (index, wait) = l.check_all(&ask("u1")).unwrap_err();
            assert_eq!(index, 1);
            assert!(wait > 0.0);
        }
        assert!(l.check_all(&ask("u2")).is_ok());
        assert!(l.check_all(&ask("u3")).is_ok());
        // Now the client's is empty: refused by the first ask.
        assert_eq!(l.check_all(&ask("u4")).unwrap_err().0, 0);
    }
}
