//! The upstream's addresses, for stage 7 (the requests Pingora proxies).
//! Configuration checks resolve the upstream host at start (every
//! address); an IP address stays as configured, a host name is looked up
//! again every [`TTL`] by a background service (and at once when a
//! connection fails), with tokio's `lookup_host`, off the workers'
//! threads, one lookup at a time, while requests go on with the addresses
//! they have: the proxy follows the name's changes without a restart, and
//! a slow or failing DNS server delays no request. A failed lookup keeps
//! the last addresses (and is tried again after [`RETRY`]).
//!
//! Every address a name has is used: a connection that cannot be made
//! (nothing sent yet, so safe to retry) goes to the next one, and
//! requests start at the address after the last one that failed.
//! (fhirwall's own client, for checked answers and relayed bodies, is
//! reqwest's: it resolves the name for each new connection.)

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

/// How long a lookup's answer is used before the name is looked up again.
pub const TTL: Duration = Duration::from_secs(30);

/// After a failed lookup, the last addresses serve this long before the
/// name is looked up again.
pub const RETRY: Duration = Duration::from_secs(5);

/// How long one lookup may take (it runs in the background).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many of a name's addresses are tried for one request.
pub const MAX_TRIES: usize = 3;

struct Resolved {
    at: Instant,
    addrs: Arc<Vec<SocketAddr>>,
}

/// The upstream's host and port, and what they resolve to.
pub struct Addresses {
    host: String,
    port: u16,
    /// An IP address: never looked up.
    fixed: bool,
    last: ArcSwap<Resolved>,
    /// A background lookup is under way.
    refreshing: AtomicBool,
    /// Where requests start (after an address that failed).
    start: AtomicUsize,
}

impl Addresses {
    /// `host` as configured, and what it resolved to at start (not empty).
    pub fn new(host: &str, port: u16, at_start: Vec<SocketAddr>) -> Addresses {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        Addresses {
            host: bare.to_string(),
            port,
            fixed: bare.parse::<IpAddr>().is_ok(),
            last: ArcSwap::from_pointee(Resolved {
                at: Instant::now(),
                addrs: Arc::new(at_start),
            }),
            refreshing: AtomicBool::new(false),
            start: AtomicUsize::new(0),
        }
    }

    /// The addresses to try, and the index to start at. Never waits: an
    /// expired answer serves while a new lookup runs.
    pub fn get(self: &Arc<Self>) -> (Arc<Vec<SocketAddr>>, usize) {
        let r = self.last.load();
        if !self.fixed && r.at.elapsed() >= TTL {
            self.refresh_in_background();
        }
        (r.addrs.clone(), self.start.load(Ordering::Relaxed))
    }

    /// A request that started at `start` could not connect on its
    /// `attempt`: later requests start after that address, unless another
    /// request has moved the start meanwhile; and the name is looked up
    /// again (its addresses may have changed).
    pub fn failed(self: &Arc<Self>, start: usize, attempt: usize) {
        let next = start.wrapping_add(attempt).wrapping_add(1);
        let _ = self
            .start
            .compare_exchange(start, next, Ordering::Relaxed, Ordering::Relaxed);
        if !self.fixed {
            self.refresh_in_background();
        }
    }

    /// Looks the name up every [`TTL`], whether requests come or not (the
    /// background service of `server.rs`).
    pub async fn keep_fresh(self: Arc<Self>) {
        if self.fixed {
            return;
        }
        loop {
            tokio::time::sleep(TTL).await;
            self.refresh_in_background();
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(why) = me.look_up().await {
                tracing::warn!(host = %me.host, error = %why, "cannot look the upstream up again; its last addresses serve on");
                // Kept a little longer, then tried again.
                let addrs = me.last.load().addrs.clone();
                let at = Instant::now()
                    .checked_sub(TTL - RETRY)
                    .unwrap_or_else(Instant::now);
                me.last.store(Arc::new(Resolved { at, addrs }));
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// One lookup; its addresses are kept when there are any.
    async fn look_up(&self) -> Result<(), String> {
        let looked = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await;
        match looked {
            Ok(Ok(found)) => {
                let addrs: Vec<SocketAddr> = found.collect();
                if addrs.is_empty() {
                    return Err("it has no address".into());
                }
                self.last.store(Arc::new(Resolved {
                    at: Instant::now(),
                    addrs: Arc::new(addrs),
                }));
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs())),
        }
    }
}

/// The address for a request's connection `attempt` (0 first), starting
/// at `start`.
pub fn nth(addrs: &[SocketAddr], start: usize, attempt: usize) -> Option<SocketAddr> {
    (!addrs.is_empty()).then(|| addrs[start.wrapping_add(attempt) % addrs.len()])
}

/// Whether a request whose connection `attempt` failed may try another
/// address.
pub fn may_retry(addrs: usize, attempt: usize) -> bool {
    attempt + 1 < addrs.min(MAX_TRIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn an_ip_address_is_never_looked_up_again() {
        let a = Arc::new(Addresses::new("[::1]", 8080, vec![addr("[::1]:8080")]));
        a.last.store(Arc::new(Resolved {
            at: Instant::now() - TTL - Duration::from_secs(1),
            addrs: Arc::new(vec![addr("[::1]:8080")]),
        }));
        let _ = a.get();
        assert!(!a.refreshing.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn expired_addresses_serve_while_one_lookup_runs_behind() {
        let old = addr("10.9.9.9:8080");
        let a = Arc::new(Addresses::new("localhost", 8080, vec![old]));
        a.last.store(Arc::new(Resolved {
            at: Instant::now() - TTL - Duration::from_secs(1),
            addrs: Arc::new(vec![old]),
        }));
        // Not waited for: the expired addresses, at once.
        assert_eq!(a.get().0[..], [old]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !a
            .get()
            .0
            .iter()
            .all(|s| s.ip().is_loopback() && s.port() == 8080)
        {
            assert!(
                Instant::now() < deadline,
                "the background lookup never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_addresses() {
        let last = addr("10.9.9.9:80");
        let a = Arc::new(Addresses::new(
            "fhirwall-no-such-host.invalid",
            80,
            vec![last],
        ));
        a.last.store(Arc::new(Resolved {
            at: Instant::now() - TTL - Duration::from_secs(1),
            addrs: Arc::new(vec![last]),
        }));
        assert_eq!(a.get().0[..], [last]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.refreshing.load(Ordering::Acquire) || a.last.load().at.elapsed() >= TTL {
            assert!(Instant::now() < deadline, "the failed lookup never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = a.last.load();
        assert_eq!(r.addrs[..], [last]);
        // Tried again after RETRY, not TTL.
        assert!(r.at.elapsed() >= TTL - RETRY - Duration::from_millis(100));
    }

    #[test]
    fn retries_go_round_the_addresses_from_the_last_that_failed() {
        let addrs = [addr("10.0.0.1:80"), addr("10.0.0.2:80")];
        assert_eq!(nth(&addrs, 0, 0), Some(addrs[0]));
        assert_eq!(nth(&addrs, 0, 1), Some(addrs[1]));
        assert_eq!(nth(&addrs, 1, 1), Some(addrs[0]));
        assert!(may_retry(2, 0));
        assert!(!may_retry(2, 1));
        assert!(!may_retry(1, 0));
        assert!(may_retry(5, 1) && !may_retry(5, MAX_TRIES - 1));
        assert_eq!(nth(&[], 0, 0), None);
        let a = Arc::new(Addresses::new("10.0.0.1", 80, addrs.to_vec()));
        a.failed(0, 0);
        assert_eq!(a.start.load(Ordering::Relaxed), 1);
        // A request that saw the old start does not move it back.
        a.failed(0, 1);
        assert_eq!(a.start.load(Ordering::Relaxed), 1);
        a.failed(1, 0);
        assert_eq!(a.start.load(Ordering::Relaxed), 2);
    }
}
