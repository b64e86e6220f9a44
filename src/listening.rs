//! The proxy's and the admin listener's services, watched. Pingora binds a
//! service's sockets when it starts it, apart from the others, and a port
//! in use is retried for 30 s; a listener that cannot be bound panics that
//! service alone, the rest of the process going on. Watched, the proxy is
//! not ready until its sockets are bound (or taken over from the process
//! it replaces), and a listener that cannot start (an address not on this
//! host, a port still held after the retries) ends fhirwall with exit code
//! 1 instead of leaving the other listener answering alone (`/readyz`
//! saying ready for a proxy nobody can reach).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ListenFds, ShutdownWatch};

use crate::audit::AuditLog;
use crate::lifecycle::Lifecycle;

/// A listening service run by Pingora, watched.
pub struct Watched<S> {
    inner: Option<S>,
    name: String,
    threads: Option<usize>,
    addresses: Vec<String>,
    /// Told once the sockets are bound (the proxy's: readiness).
    lifecycle: Option<Arc<Lifecycle>>,
    /// Written out before a failed start ends the process.
    audit: AuditLog,
}

impl<S: pingora::services::Service + 'static> Watched<S> {
    /// Watches `inner`; `lifecycle`, if given, learns when its sockets are
    /// bound.
    pub fn new(inner: S, lifecycle: Option<Arc<Lifecycle>>, audit: AuditLog) -> Watched<S> {
        Watched {
            name: inner.name().to_string(),
            threads: inner.threads(),
            addresses: inner.listen_addresses().unwrap_or_default(),
            inner: Some(inner),
            lifecycle,
            audit,
        }
    }
}

/// Whether every one of `addresses` has its socket in Pingora's table of
/// listening sockets (where it puts each it binds, and the ones a process
/// it takes over from handed it).
fn all_bound(fds: &ListenFds, addresses: &[String]) -> bool {
    let table = fds.lock();
    addresses.iter().all(|a| table.get(a).is_some())
}

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
        let bound = Arc::new(AtomicBool::new(false));
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
        let Err(e) = run else { return };
        let Ok(panic) = e.try_into_panic() else {
            return;
        };
        let why = panic_message(panic);
        if bound.load(Ordering::Acquire) {
            // After serving (its clean-up at shutdown): nothing to stop.
            tracing::error!(service = %self.name, error = %why, "service failed after serving");
            return;
        }
        tracing::error!(
            service = %self.name,
            listen = %self.addresses.join(", "),
            error = %why,
            "listener could not start: stopping"
        );
        let audit = self.audit.clone();
        // From a blocking thread of its own: this runtime may be dropped
        // meanwhile; the process still ends.
        tokio::task::spawn_blocking(move || crate::server::exit_after_flush(&audit, 1));
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
