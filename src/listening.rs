//! The proxy's and the admin listener's services, watched. Pingora binds a
//! service's sockets when it starts it, apart from the others, and a port
//! in use is retried for 30 s; a listener that cannot be bound panics that
//! service alone, the rest of the process going on. Watched, the proxy is
//! not ready until its sockets are bound (or taken over from the process
//! it replaces), and a listener that cannot start (an address not on this
//! host, a port still held after the retries) ends fhirwall with exit code
//! 1 instead of leaving the other listener answering alone (`/readyz`
//! saying ready for a proxy nobody can reach). So does a service that
//! ends while the process is not shutting down — a panic while serving, or
//! one at start after taking over sockets another process handed it (they
//! are in the table before the service runs, so "bound" says nothing
//! then): the proxy is no longer ready the moment it is gone, and the
//! process ends so that its supervisor starts a new one.
//!
//! When the proxy's listener stops at shutdown or after a handover,
//! Pingora drops every connection waiting for its next request. A
//! connection accepted just before, its request on the way, would be
//! reset, so the proxy's app lingers ([`Lingering`]) before letting them
//! go: requests that arrive meanwhile are answered (closing their
//! connections, as every answer of a process on its way out).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::{ListenFds, ShutdownWatch};

use crate::audit::AuditLog;
use crate::lifecycle::Lifecycle;

/// How long the proxy's stopped listener keeps the connections waiting
/// for a next request: long enough for a request sent on a connection
/// accepted just before it stopped to arrive and be answered.
const LINGER: Duration = Duration::from_millis(500);

/// A Pingora app whose waiting connections outlive its stopped listener by
/// `LINGER` (Pingora drops them in the app's cleanup); then the
/// lifecycle learns that no request can arrive any more.
pub struct Lingering<A> {
    app: Arc<A>,
    lifecycle: Arc<Lifecycle>,
}

impl<A> Lingering<A> {
    pub fn new(app: A, lifecycle: Arc<Lifecycle>) -> Lingering<A> {
        Lingering {
            app: Arc::new(app),
            lifecycle,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Lingering<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.app.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(LINGER).await;
        self.app.cleanup().await;
        self.lifecycle.release_connections();
    }
}

/// A listening service run by Pingora, watched.
pub struct Watched<S> {
    inner: Option<S>,
    name: String,
    threads: Option<usize>,
    addresses: Vec<String>,
    /// Told once the sockets are bound (the proxy's: readiness).
    lifecycle: Option<Arc<Lifecycle>>,
    /// The process's life, for a service beside the proxy (the admin
    /// listener): when it fails, the proxy's requests in flight finish
    /// before the process ends, as when the proxy itself fails.
    beside: Option<Arc<Lifecycle>>,
    /// Ends the process with the given code (after writing out the
    /// audit), from a blocking thread.
    exit: Arc<dyn Fn(i32) + Send + Sync>,
}

impl<S: pingora::services::Service + 'static> Watched<S> {
    /// Watches `inner`; `lifecycle`, if given, learns when its sockets are
    /// bound.
    pub fn new(inner: S, lifecycle: Option<Arc<Lifecycle>>, audit: AuditLog) -> Watched<S> {
        let exit = Arc::new(move |code| crate::server::exit_after_flush(&audit, code));
        Watched::with_exit(inner, lifecycle, exit)
    }

    /// Watches `inner`, ending the process by `exit` when it fails.
    fn with_exit(
        inner: S,
        lifecycle: Option<Arc<Lifecycle>>,
        exit: Arc<dyn Fn(i32) + Send + Sync>,
    ) -> Watched<S> {
        Watched {
            name: inner.name().to_string(),
            threads: inner.threads(),
            addresses: inner.listen_addresses().unwrap_or_default(),
            inner: Some(inner),
            lifecycle,
            beside: None,
            exit,
        }
    }

    /// A service beside the proxy's `lifecycle` (the admin listener): its
    /// failure ends the process as the proxy's does, once the requests in
    /// flight are done, without standing for the proxy's readiness.
    pub fn beside(mut self, lifecycle: Arc<Lifecycle>) -> Watched<S> {
        self.beside = Some(lifecycle);
        self
    }
}

/// Whether every one of `addresses` has its socket in Pingora's table of
/// listening sockets (where it puts each it binds, and the ones a process
/// it takes over from handed it).
fn all_bound(fds: &ListenFds, addresses: &[String]) -> bool {
    let table = fds.lock();
    addresses.iter().all(|a| table.get(a).is_some())
}

/// How long a stopped proxy lets its requests in flight finish before the
/// process ends.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(10);

/// A panic's message.
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

#[async_trait]
impl<S: pingora::services::Service + 'static> pingora::services::Service for Watched<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let Some(mut inner) = self.inner.take() else {
            return;
        };
        if let (Some(lifecycle), Some(fds)) = (&self.lifecycle, &fds) {
            lifecycle.keep_listen_fds(fds);
        }
        let bound = Arc::new(AtomicBool::new(false));
        let stopping = shutdown.clone();
        let watch = fds.clone().map(|fds| {
            let (bound, addresses, lifecycle) = (
                bound.clone(),
                self.addresses.clone(),
                self.lifecycle.clone(),
            );
            tokio::spawn(async move {
                while !all_bound(&fds, &addresses) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                bound.store(true, Ordering::Release);
                if let Some(l) = lifecycle {
                    l.set_listening();
                }
            })
        });
        let run = tokio::spawn(async move {
            inner.start_service(fds, shutdown, listeners_per_fd).await;
        })
        .await;
        if let Some(w) = watch {
            w.abort();
        }
        let why = match run {
            Ok(()) => None,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => Some(panic_message(panic)),
                // Cancelled: the runtime itself is going away.
                Err(_) => return,
            },
        };
        if *stopping.borrow() {
            // Its clean-up at shutdown (or after handing its sockets over):
            // nothing to stop.
            if let Some(why) = why {
                tracing::error!(service = %self.name, error = %why, "service failed while stopping");
            }
            return;
        }
        // Gone while the process goes on: not ready from this moment.
        if let Some(l) = &self.lifecycle {
            l.set_stopped();
        } else if let Some(l) = &self.beside {
            // The process is ending: answers close their connections.
            l.start_draining();
        }
        let why = why.unwrap_or_else(|| {
            "its accept loops ended (a panic in one is in the log above)".into()
        });
        let what = if bound.load(Ordering::Acquire) {
            "listener stopped serving: stopping"
        } else {
            "listener could not start: stopping"
        };
        tracing::error!(
            service = %self.name,
            listen = %self.addresses.join(", "),
            error = %why,
            "{what}"
        );
        let exit = self.exit.clone();
        let lifecycle = self.lifecycle.clone().or_else(|| self.beside.clone());
        // From a blocking thread of its own: this runtime may be dropped
        // meanwhile; the process still ends. Requests in flight on the
        // connections already accepted (their tasks outlive the accept
        // loop) finish first, for a while, and leave their records.
        tokio::task::spawn_blocking(move || {
            if let Some(l) = lifecycle {
                l.wait_until_idle(std::time::Instant::now() + IN_FLIGHT_WAIT, Duration::ZERO);
            }
            exit(1)
        });
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        self.threads
    }

    fn runtime_opts_override(
        &self,
        global: &pingora::server::RuntimeOpts,
    ) -> Option<pingora::server::RuntimeOpts> {
        self.inner
            .as_ref()
            .and_then(|s| s.runtime_opts_override(global))
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addresses.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::server::Fds;
    use pingora::services::Service;
    use std::os::fd::AsRawFd;
    use std::sync::Mutex;

    /// A listening service that puts its socket in the table, then
    /// panics, returns, or serves until shutdown.
    struct Fake {
        addr: String,
        fd: std::os::fd::RawFd,
        ends: &'static str,
    }

    #[async_trait]
    impl Service for Fake {
        async fn start_service(
            &mut self,
            fds: Option<ListenFds>,
            mut shutdown: ShutdownWatch,
            _listeners_per_fd: usize,
        ) {
            if let Some(fds) = fds {
                fds.lock().add(self.addr.clone(), self.fd);
            }
            // Long enough for the watch to see the socket bound.
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.ends {
                "panics" => panic!("the accept loop failed"),
                "returns" => {}
                _ => {
                    let _ = shutdown.changed().await;
                }
            }
        }

        fn name(&self) -> &str {
            "fake proxy"
        }

        fn threads(&self) -> Option<usize> {
            Some(1)
        }
    }

    /// Runs a watched fake to its end; returns the exit codes asked for
    /// and the lifecycle. `stop`: shutdown is signalled after 300 ms.
    async fn run(ends: &'static str, stop: bool) -> (Vec<i32>, Arc<Lifecycle>) {
        run_holding(ends, stop, false).await
    }

    /// `hold`: a request is in flight until 300 ms after the service
    /// ended (no exit is asked for before it ends).
    async fn run_holding(ends: &'static str, stop: bool, hold: bool) -> (Vec<i32>, Arc<Lifecycle>) {
        run_as(ends, stop, hold, false).await
    }

    /// `beside`: the fake is a service beside the proxy (the admin
    /// listener), not the proxy.
    async fn run_as(
        ends: &'static str,
        stop: bool,
        hold: bool,
        beside: bool,
    ) -> (Vec<i32>, Arc<Lifecycle>) {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        let lifecycle = Lifecycle::new();
        let codes = Arc::new(Mutex::new(Vec::new()));
        let exit = {
            let codes = codes.clone();
            Arc::new(move |code| codes.lock().unwrap().push(code))
        };
        let fake = Fake {
            addr: addr.clone(),
            fd: socket.as_raw_fd(),
            ends,
        };
        let request = hold.then(|| lifecycle.enter());
        let mut watched = if beside {
            Watched::with_exit(fake, None, exit).beside(lifecycle.clone())
        } else {
            Watched::with_exit(fake, Some(lifecycle.clone()), exit)
        };
        watched.addresses = vec![addr];
        let (tx, rx) = tokio::sync::watch::channel(false);
        let fds: ListenFds = Arc::new(Fds::new().into());
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if stop {
                let _ = tx.send(true);
            }
            tx
        });
        tokio::time::timeout(
            Duration::from_secs(5),
            watched.start_service(Some(fds), rx, 1),
        )
        .await
        .expect("the watched service ends");
        if let Some(request) = request {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                codes.lock().unwrap().is_empty(),
                "exit asked for with a request in flight"
            );
            assert!(lifecycle.closing_connections());
            drop(request);
        }
        // The exit runs on a blocking thread.
        for _ in 0..100 {
            if !codes.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(stopper.await);
        let codes = codes.lock().unwrap().clone();
        (codes, lifecycle)
    }

    /// A proxy service that fails after its sockets were bound (or taken
    /// over) is no longer ready, and the process ends with 1.
    #[tokio::test]
    async fn a_service_failing_while_serving_is_not_ready_and_ends_the_process() {
        for ends in ["panics", "returns"] {
            let (codes, lifecycle) = run(ends, false).await;
            assert_eq!(codes, vec![1], "{ends}");
            assert!(!lifecycle.listening(), "{ends}");
            assert!(lifecycle.stopped(), "{ends}");
        }
    }

    /// Requests in flight on connections accepted before finish first
    /// (their records are written); answers close their connections.
    #[tokio::test]
    async fn a_stopped_proxy_ends_the_process_once_its_requests_are_done() {
        let (codes, lifecycle) = run_holding("panics", false, true).await;
        assert_eq!(codes, vec![1]);
        assert_eq!(lifecycle.in_flight(), 0);
    }

    /// The admin listener failing ends the process too, but only once the
    /// proxy's requests in flight are done (answers closing their
    /// connections meanwhile), and without calling the proxy stopped.
    #[tokio::test]
    async fn a_failing_admin_listener_lets_the_proxys_requests_finish() {
        let (codes, lifecycle) = run_as("panics", false, true, true).await;
        assert_eq!(codes, vec![1]);
        assert_eq!(lifecycle.in_flight(), 0);
        assert!(!lifecycle.stopped());
        assert!(lifecycle.draining());
    }

    /// Ending at shutdown is the normal end: nothing to stop.
    #[tokio::test]
    async fn a_service_ending_at_shutdown_stops_nothing() {
        let (codes, lifecycle) = run("serves", true).await;
        assert!(codes.is_empty());
        assert!(lifecycle.listening());
        assert!(!lifecycle.stopped());
    }
}
