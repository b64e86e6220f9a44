//! The upstream's addresses, for stage 7. An IP address is used as
//! configured; a host name is resolved off the workers' threads (tokio's
//! `lookup_host`), at most one lookup at a time, and kept for [`TTL`].
//! After that, requests go on with the addresses they have while one
//! lookup runs in the background (a slow DNS server delays nobody), and
//! a failed lookup keeps them for [`RETRY`] more (a DNS blip does not
//! take the upstream away). Only the very first lookup is waited for. Pingora's `HttpPeer::new` would resolve on the worker
//! thread itself, blocking every request it serves, and panic when the
//! name does not resolve (a panicking request leaves no audit record).
//!
//! Every address a name has is kept: a request whose connection is
//! refused or times out (nothing sent yet, so safe to retry) goes to the
//! next one ([`Addresses::nth`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// How long a lookup's answer is used before the name is looked up again.
pub const TTL: Duration = Duration::from_secs(30);

/// After a failed lookup, the last addresses serve this long before the
/// name is looked up again.
pub const RETRY: Duration = Duration::from_secs(5);

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
    /// How long a lookup may take.
    timeout: Duration,
    /// An IP address as configured: never looked up.
    fixed: Option<Arc<Vec<SocketAddr>>>,
    last: ArcSwapOption<Resolved>,
    /// One lookup at a time; the others wait for its answer.
    lookup: tokio::sync::Mutex<()>,
    /// A background lookup is under way.
    refreshing: std::sync::atomic::AtomicBool,
}

impl Addresses {
    pub fn new(host: &str, port: u16, timeout: Duration) -> Addresses {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let fixed = bare
            .parse::<IpAddr>()
            .ok()
            .map(|ip| Arc::new(vec![SocketAddr::new(ip, port)]));
        Addresses {
            host: bare.to_string(),
            port,
            timeout,
            fixed,
            last: ArcSwapOption::empty(),
            lookup: tokio::sync::Mutex::new(()),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The addresses to try, in order; an error says why there are none.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<Vec<SocketAddr>>, String> {
        if let Some(f) = &self.fixed {
            return Ok(f.clone());
        }
        if let Some(r) = self.last.load_full() {
            if r.at.elapsed() >= TTL {
                self.refresh_in_background();
            }
            return Ok(r.addrs.clone());
        }
        // Nothing yet: wait for one lookup (shared with the others).
        let _one = self.lookup.lock().await;
        if let Some(r) = self.last.load_full() {
            return Ok(r.addrs.clone());
        }
        self.look_up()
            .await
            .map_err(|why| format!("cannot resolve the upstream host '{}': {why}", self.host))
    }

    fn refresh_in_background(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(why) = me.look_up().await {
                tracing::warn!(host = %me.host, error = %why, "cannot look the upstream up again; its last addresses serve on");
                // Kept a little longer, then tried again.
                if let Some(r) = me.last.load_full() {
                    me.last.store(Some(Arc::new(Resolved {
                        at: Instant::now() - TTL + RETRY,
                        addrs: r.addrs.clone(),
                    })));
                }
            }
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// One lookup; its addresses are kept when there are any.
    async fn look_up(&self) -> Result<Arc<Vec<SocketAddr>>, String> {
        let looked = tokio::time::timeout(
            self.timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await;
        match looked {
            Ok(Ok(found)) => {
                let addrs: Vec<SocketAddr> = found.collect();
                if addrs.is_empty() {
                    return Err("it has no address".into());
                }
                let addrs = Arc::new(addrs);
                self.last.store(Some(Arc::new(Resolved {
                    at: Instant::now(),
                    addrs: addrs.clone(),
                })));
                Ok(addrs)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

/// The address for a request's `attempt`-th connection (0 first).
pub fn nth(addrs: &[SocketAddr], attempt: usize) -> Option<SocketAddr> {
    (!addrs.is_empty()).then(|| addrs[attempt % addrs.len()])
}

/// Whether a request whose `attempt`-th connection failed may try another
/// address.
pub fn may_retry(addrs: usize, attempt: usize) -> bool {
    attempt + 1 < addrs.min(MAX_TRIES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ip_address_is_never_looked_up() {
        for (host, want) in [("127.0.0.1", "127.0.0.1:8080"), ("[::1]", "[::1]:8080")] {
            let a = Arc::new(Addresses::new(host, 8080, Duration::from_millis(10)));
            let got = a.get().await.unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].to_string(), want);
        }
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_an_error_not_a_panic() {
        let a = Arc::new(Addresses::new(
            "fhirwall-no-such-host.invalid",
            80,
            Duration::from_secs(5),
        ));
        let e = a.get().await.unwrap_err();
        assert!(e.contains("fhirwall-no-such-host.invalid"), "{e}");
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_kept() {
        let a = Arc::new(Addresses::new("localhost", 8080, Duration::from_secs(5)));
        let first = a.get().await.unwrap();
        assert!(first
            .iter()
            .all(|s| s.ip().is_loopback() && s.port() == 8080));
        let again = a.get().await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "looked up again within the TTL"
        );
    }

    #[tokio::test]
    async fn expired_addresses_serve_while_one_lookup_runs_behind() {
        let a = Arc::new(Addresses::new("localhost", 8080, Duration::from_secs(5)));
        let old: Arc<Vec<SocketAddr>> = Arc::new(vec!["10.9.9.9:8080".parse().unwrap()]);
        a.last.store(Some(Arc::new(Resolved {
            at: Instant::now() - TTL - Duration::from_secs(1),
            addrs: old.clone(),
        })));
        // Not waited for: the expired addresses, at once.
        assert!(Arc::ptr_eq(&a.get().await.unwrap(), &old));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = a.get().await.unwrap();
            if now.iter().all(|s| s.ip().is_loopback()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the background lookup never landed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn retries_go_round_the_addresses_a_bounded_number_of_times() {
        let addrs: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(nth(&addrs, 0), Some(addrs[0]));
        assert_eq!(nth(&addrs, 1), Some(addrs[1]));
        assert!(may_retry(2, 0));
        assert!(!may_retry(2, 1));
        assert!(!may_retry(1, 0));
        assert!(may_retry(5, 1) && !may_retry(5, MAX_TRIES - 1));
        assert_eq!(nth(&[], 0), None);
    }
}
