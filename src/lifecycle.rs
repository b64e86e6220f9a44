//! Where the process is in its life, as the proxy and the admin listener
//! need to know it: starting (the proxy's sockets not yet bound), serving,
//! or draining after SIGTERM (not ready, and
//! every answer closes its connection, so load balancers and keep-alive
//! clients move to other replicas), or handing its sockets over to a new
//! process (SIGQUIT: still ready, since both answer on the same sockets,
//! but closing every connection after its answer), and how many requests
//! are in flight (shutdown ends as soon as none is left). The signals
//! themselves are handled in `server.rs`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Lifecycle {
    /// The proxy's listening sockets are bound (or taken over).
    listening: AtomicBool,
    /// The proxy's service ended while the process went on.
    stopped: AtomicBool,
    draining: AtomicBool,
    handing_over: AtomicBool,
    /// The proxy's listener stopped and, after lingering, the connections
    /// waiting for a next request were dropped: no request can arrive.
    released: AtomicBool,
    in_flight: AtomicUsize,
    /// Pingora's table of the listening sockets, once the proxy has it:
    /// what a SIGQUIT hands the new process.
    listen_fds: ListenFdsSlot,
}

/// Pingora's table of listening sockets (not `Debug`).
#[derive(Default)]
struct ListenFdsSlot(std::sync::OnceLock<pingora::server::ListenFds>);

impl std::fmt::Debug for ListenFdsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "ListenFds(known)"
        } else {
            "ListenFds(not yet)"
        })
    }
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle::default())
    }

    /// The proxy's listening sockets are bound: it can be ready.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The proxy's service ended while the process goes on: not ready
    /// (the process is on its way out).
    pub fn set_stopped(&self) {
        self.stopped.store(true, Ordering::Release);
        self.listening.store(false, Ordering::Release);
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Why the proxy is not ready as far as its life goes, if it is not
    /// (`/readyz` asks the rest).
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.draining() {
            Some("shutting down")
        } else if self.stopped() {
            Some("the proxy listener stopped serving; fhirwall is ending")
        } else if !self.listening() {
            Some("the proxy listener is not listening yet")
        } else {
            None
        }
    }

    /// From now on the gateway is shutting down: not ready, connections
    /// are not kept alive.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// From now on a new process shares the sockets and takes over:
    /// connections are not kept alive (readiness is unchanged).
    pub fn start_handing_over(&self) {
        self.handing_over.store(true, Ordering::Release);
    }

    /// Answers close their connection: draining, handing over, or the
    /// proxy's service stopped (the process is ending).
    pub fn closing_connections(&self) -> bool {
        self.draining() || self.stopped() || self.handing_over.load(Ordering::Acquire)
    }

    /// Requests whose context is alive (from the request header read to
    /// the last record).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The proxy's listener stopped and its waiting connections were
    /// dropped ([`crate::listening::Lingering`]).
    pub fn release_connections(&self) {
        self.released.store(true, Ordering::Release);
    }

    /// Waits (blocking this thread) until the proxy's waiting connections
    /// were dropped: true then, false at `deadline`.
    pub fn wait_until_released(&self, deadline: Instant) -> bool {
        while !self.released.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Waits (blocking this thread) until no request has been in flight
    /// for `quiet`: true then, false at `deadline`.
    pub fn wait_until_idle(&self, deadline: Instant, quiet: Duration) -> bool {
        let mut idle_since = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if self.in_flight() > 0 {
                idle_since = None;
            } else if now.duration_since(*idle_since.get_or_insert(now)) >= quiet {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pingora's table of the listening sockets, as the proxy's service
    /// is handed it (the first one given is kept: there is one).
    pub fn keep_listen_fds(&self, fds: &pingora::server::ListenFds) {
        let _ = self.listen_fds.0.set(fds.clone());
    }

    /// The listening sockets' table, once the proxy's service started.
    pub fn listen_fds(&self) -> Option<pingora::server::ListenFds> {
        self.listen_fds.0.get().cloned()
    }

    /// Counts a request as in flight until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// One request in flight; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_released_once_the_listener_let_them_go() {
        let l = Lifecycle::new();
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(!l.wait_until_released(soon), "released before it was");
        assert!(Instant::now() >= soon);
        let later = l.clone();
        let releasing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            later.release_connections();
        });
        assert!(l.wait_until_released(Instant::now() + Duration::from_secs(5)));
        releasing.join().unwrap();
    }

    #[test]
    fn requests_are_counted_while_their_guard_lives() {
        let l = Lifecycle::new();
        assert_eq!(l.in_flight(), 0);
        let a = l.enter();
        let b = l.enter();
        assert_eq!(l.in_flight(), 2);
        drop(a);
        assert_eq!(l.in_flight(), 1);
        drop(b);
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn draining_is_one_way() {
        let l = Lifecycle::new();
        assert!(!l.draining());
        l.start_draining();
        l.start_draining();
        assert!(l.draining() && l.closing_connections());
    }

    #[test]
    fn handing_over_closes_connections_but_stays_ready() {
        let l = Lifecycle::new();
        l.set_listening();
        assert!(!l.closing_connections());
        l.start_handing_over();
        assert!(l.closing_connections() && !l.draining());
        assert_eq!(l.not_ready(), None);
    }

    /// Ready once listening; not ready, and closing connections, once the
    /// proxy's service stopped, whatever came before.
    #[test]
    fn a_stopped_proxy_is_not_ready_and_closes_connections() {
        let l = Lifecycle::new();
        assert_eq!(
            l.not_ready(),
            Some("the proxy listener is not listening yet")
        );
        l.set_listening();
        assert_eq!(l.not_ready(), None);
        assert!(!l.closing_connections());
        l.set_stopped();
        assert_eq!(
            l.not_ready(),
            Some("the proxy listener stopped serving; fhirwall is ending")
        );
        assert!(l.closing_connections());
        l.start_draining();
        assert_eq!(l.not_ready(), Some("shutting down"));
    }
}
