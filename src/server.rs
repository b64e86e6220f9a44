//! Start-up: turns validated [`Settings`] into running Pingora services —
//! the FHIR proxy, the admin listener and the JWKS refresher — and runs
//! them. Also builds the pieces in-process for `fhirwall demo`.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::configuration::Opt;
use pingora::server::configuration::ServerConf;
use pingora::server::{
    ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::audit::AuditLog;
use crate::config::Settings;
use crate::listening::{Lingering, Watched};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::token::jwks::JwksStore;
use crate::token::validator::Validator;

/// Reloads policies, roles and break-glass settings on SIGHUP: the config
/// file is read and validated whole; a valid one is swapped in atomically
/// (requests in flight finish under the old rules), an invalid one is
/// rejected, logged and counted, and the old rules keep serving. Other
/// sections (listeners, issuers, upstream) need a restart.
struct Reloader {
    path: std::path::PathBuf,
    rules: Arc<arc_swap::ArcSwap<crate::proxy::Rules>>,
    metrics: Arc<Metrics>,
    /// The running settings (a reload applies only the rules of a new
    /// file; the rest is compared with these).
    running: Settings,
    /// Told whether the rules in force have rate limits.
    shared: Arc<crate::shared::SharedState>,
    /// The files as the last load (at start, or a reload) read them.
    read: std::sync::Mutex<crate::config::FilesStamp>,
    /// The policy directory the last load read, and the one to watch
    /// (`policies.watch`): a reload may name others, which it follows.
    dirs: std::sync::Mutex<PolicyDirs>,
}

/// Where the policies are read from, and watched.
#[derive(Clone, Default, PartialEq)]
struct PolicyDirs {
    read: Option<std::path::PathBuf>,
    watched: Option<std::path::PathBuf>,
}

impl PolicyDirs {
    fn of(s: &Settings) -> PolicyDirs {
        PolicyDirs {
            read: s.policies_dir.clone(),
            watched: s.policies_watch.clone(),
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
                return;
            }
        };
        // A SIGHUP sent since the check before serving and until now was
        // not heard (a signal is not kept for a listener not yet made):
        // a change since the last load is applied now.
        if self.changed_since_load() {
            tracing::info!(file = %self.path.display(), "the configuration or policies changed before fhirwall listened for SIGHUP: reloading");
            self.reload();
        }
        // With policies.watch, a change of any policy file's (or the
        // config file's) modification time or set of files also reloads
        // (the directory the last reload named, watched or not).
        let watched = || self.dirs().watched;
        let stamp = || self.stamp(watched().as_deref());
        let mut files = Settling::new(stamp());
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            let watching = watched().is_some();
            tokio::select! {
                _ = hup.recv() => {}
                _ = tick.tick(), if watching => {
                    if !files.settled_change(stamp()) {
                        continue;
                    }
                }
                _ = shutdown.changed() => return,
            }
            self.reload();
            // What is in force is what that reload read, whichever asked
            // for it: a file put back as it was before a SIGHUP's reload
            // (its modification time kept: `cp -p`, a backup moved back)
            // differs from it, and is applied.
            if watched().is_some() {
                files = Settling::new(self.read.lock().unwrap_or_else(|e| e.into_inner()).clone());
            }
        }
    }
}

/// What a reload from `old` to `new` lifts for every token, if anything:
/// all role ceilings, or the refusal of tokens with no mapped role (a
/// file cut short while written may still be valid YAML).
fn widened(old: &crate::proxy::Rules, new: &crate::proxy::Rules) -> Option<&'static str> {
    match (&old.roles, &new.roles) {
        (Some(_), None) => Some("it removes every role ceiling (roles)"),
        (Some(o), Some(n)) if o.unmapped_deny && !n.unmapped_deny => {
            Some("tokens with no mapped role now pass with no ceiling (roles.unmapped: allow)")
        }
        _ => None,
    }
}

/// Watched files' stamps, polled: a change is acted on once the next poll
/// finds them unchanged, so a directory being replaced (`rm *.yaml && cp
/// new/*.yaml`) is not applied half-written — or empty — in between.
struct Settling<T> {
    applied: T,
    pending: Option<T>,
}

impl<T: PartialEq> Settling<T> {
    fn new(applied: T) -> Settling<T> {
        Settling {
            applied,
            pending: None,
        }
    }

    /// Takes a poll's stamp: whether a change has now settled.
    fn settled_change(&mut self, now: T) -> bool {
        if now == self.applied {
            self.pending = None;
            return false;
        }
        if self.pending.as_ref() == Some(&now) {
            self.applied = now;
            self.pending = None;
            return true;
        }
        self.pending = Some(now);
        false
    }
}

impl Reloader {
    /// Where the policies are read from and watched now.
    fn dirs(&self) -> PolicyDirs {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the configuration and policies again and applies the rules
    /// (the rest takes a restart); a bad set is rejected whole.
    fn reload(&self) {
        *self.read.lock().unwrap_or_else(|e| e.into_inner()) =
            self.stamp(self.dirs().read.as_deref());
        let loaded = crate::config::load_for_reload(&self.path).and_then(|settings| {
            // Issuers change only on restart: rules naming one the
            // running gateway does not have would never match.
            let running: Vec<&str> = self
                .running
                .issuers
                .iter()
                .map(|i| i.name.as_str())
                .collect();
            let foreign: Vec<String> = settings
                .policies
                .unknown_issuers(&running)
                .into_iter()
                .map(|(file, rule, issuer)| format!("{file}#{rule} names issuer '{issuer}'"))
                .collect();
            if foreign.is_empty() {
                Ok(settings)
            } else {
                Err(crate::config::ConfigError::Invalid {
                    file: self.path.display().to_string(),
                    problems: vec![crate::config::Problem {
                        path: "policies".into(),
                        message: format!(
                            "name issuers this running gateway does not have (issuers \
                             change only on restart; running: {}): {}",
                            running.join(", "),
                            foreign.join("; ")
                        ),
                    }],
                })
            }
        });
        match loaded {
            Ok(settings) => {
                let rules = crate::proxy::Rules::from_settings(&settings);
                let n = rules.policies.rules.len();
                let before = self.rules.load().policies.rules.len();
                if let Some(what) = widened(&self.rules.load(), &rules) {
                    tracing::warn!(
                        file = %self.path.display(),
                        "the reload widens every token's reach: {what}; if the file was being written, check it and reload again"
                    );
                }
                if n == 0 && before > 0 {
                    tracing::warn!(
                        file = %self.path.display(),
                        policy_rules_before = before,
                        "the reload leaves no policy rule: every rule (emergency denies too) is gone; if the policy directory was being replaced, check it and reload again"
                    );
                }
                self.shared.set_rate_limited(rules.any_rate_limit());
                self.rules.store(Arc::new(rules));
                // Another policy directory (or watch turned on or off):
                // followed from now on. Its files are stamped as never
                // read: one changed while this reload read them is applied
                // by the next look (with a watch, a second reload a poll
                // or two later, whether or not one changed; else the next
                // SIGHUP).
                let dirs = PolicyDirs::of(&settings);
                if dirs != self.dirs() {
                    self.read.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    *self.dirs.lock().unwrap_or_else(|e| e.into_inner()) = dirs;
                }
                // What the new rules allow but weakens a guarantee.
                for warning in settings.rule_warnings() {
                    tracing::warn!(file = %self.path.display(), "{warning}");
                }
                self.metrics.reload(true);
                // Say so when the file changed what a reload cannot
                // apply: it would otherwise look applied.
                let pending = self.running.needs_restart(&settings);
                self.metrics
                    .restart_pending
                    .set(i64::from(!pending.is_empty()));
                if pending.is_empty() {
                    tracing::info!(file = %self.path.display(), policy_rules = n, "reloaded policies, roles and break-glass");
                } else {
                    tracing::warn!(
                        file = %self.path.display(),
                        policy_rules = n,
                        not_applied = %pending.join(", "),
                        "reloaded policies, roles and break-glass; the changes to the other settings named take effect only after a restart (without downtime: run --upgrade, then SIGQUIT this process)"
                    );
                }
            }
            Err(e) => {
                self.metrics.reload(false);
                tracing::error!(file = %self.path.display(), error = %e, "reload rejected; the previous rules keep serving");
            }
        }
    }

    /// Whether the configuration file or a policy file changed since they
    /// were last read (at start, or by a reload): modified, added, removed
    /// or renamed (a reload asked for while fhirwall started, a SIGHUP
    /// then unheard, is not lost).
    fn changed_since_load(&self) -> bool {
        let now = self.stamp(self.dirs().read.as_deref());
        now != *self.read.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration file and the files in policy directory `dir`,
    /// sorted, each with its modification time.
    fn stamp(&self, dir: Option<&std::path::Path>) -> crate::config::FilesStamp {
        crate::config::files_stamp(&self.path, dir)
    }
}

/// Keeps every issuer's keys fresh, in the background.
struct JwksRefresher(Arc<JwksStore>);

#[async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let errors = self.0.load_all().await;
        for (issuer, e) in errors {
            tracing::error!(issuer = %issuer, error = %e, "initial JWKS load failed; not ready until it succeeds");
        }
        tokio::select! {
            _ = self.0.clone().refresh_loop() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Connects to Redis (shared state) and pings it every second, so that
/// `/readyz` and `fhirwall_redis_up` say whether it answers.
struct RedisMonitor(Arc<crate::shared::SharedState>);

#[async_trait]
impl BackgroundService for RedisMonitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(redis) = self.0.redis() else {
            return;
        };
        tokio::select! {
            _ = redis.run(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Looks the upstream's host name up again every 30 s (`resolve.rs`).
struct UpstreamDns(Arc<crate::resolve::Addresses>);

#[async_trait]
impl BackgroundService for UpstreamDns {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = self.0.clone().keep_fresh() => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Shutdown, as a load balancer in front of several replicas needs it.
///
/// SIGTERM: `/readyz` answers 503 at once while fhirwall keeps accepting
/// and serving for `server.grace_period_seconds` (every answer closes its
/// connection), so the balancer stops sending before the listener closes;
/// a second SIGTERM ends that period early. Then Pingora stops accepting
/// and the requests in flight get `server.graceful_shutdown_timeout_seconds`
/// to finish: the process exits as soon as none is left, every queued
/// audit record written. Requests still running at the end are dropped and
/// recorded as abandoned. SIGINT: at once.
///
/// SIGQUIT: zero-downtime restart. A new process started with
/// `run --upgrade` waits on `server.upgrade_sock`; this one hands it the
/// listening sockets, closes each connection after its next answer, keeps
/// serving for five seconds (`BOTH_ACCEPT`) while both accept, then drains as
/// after SIGTERM (exiting once no request is left).
struct Signals {
    lifecycle: Arc<crate::lifecycle::Lifecycle>,
    grace: std::time::Duration,
    drain: std::time::Duration,
    audit: AuditLog,
    /// Pingora's phases: when the sockets have been handed over.
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
    /// `server.upgrade_sock`: where a new process waits for the sockets.
    upgrade_sock: Option<std::path::PathBuf>,
}

/// SIGINT asked Pingora for its fast shutdown: `run` then exits 130, as
/// a SIGINT during the drain does (Pingora's own end would be 0).
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// SIGINT while serving (or in the grace period): stop at once.
fn interrupted() -> ShutdownSignal {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Release);
    tracing::warn!("SIGINT: stopping at once");
    ShutdownSignal::FastShutdown
}

/// Taken for good by whatever ends the process (the drain thread, a
/// signal during the drain, `run` returning), so two never race to exit.
static ENDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes out every queued audit record, once the process is ending:
/// whether all got out (none lost meanwhile). A later caller waits here
/// for the first to end the process.
fn final_flush(audit: &AuditLog) -> bool {
    std::mem::forget(ENDING.lock().unwrap_or_else(|e| e.into_inner()));
    let before = audit.lost_count();
    match audit.flush() {
        Err(e) => {
            tracing::error!(error = %e, "audit records queued at shutdown could not be written");
            false
        }
        Ok(()) => {
            let lost = audit.lost_count().saturating_sub(before);
            if lost > 0 {
                tracing::error!(lost, "audit records lost at shutdown");
            }
            lost == 0
        }
    }
}

/// Ends the process once the audit queue is written: with `code`, or 1
/// when records were lost.
pub(crate) fn exit_after_flush(audit: &AuditLog, code: i32) -> ! {
    let ok = final_flush(audit);
    std::process::exit(if ok { code } else { 1 })
}

/// How long no request may be in flight before the drain counts as done,
/// once the stopped listener's waiting connections were let go
/// (`listening::Lingering`): a request whose header was read but whose
/// context is not yet made is not counted for that moment.
const QUIET: std::time::Duration = std::time::Duration::from_millis(200);

/// The next delivery of a signal, or never if it could not be listened for.
async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// The signal streams a stop listens to.
type Stream = Option<tokio::signal::unix::Signal>;

/// From now on (Pingora listening for no signal), SIGINT or SIGTERM stops
/// at once, once the audit queue is written.
fn stop_on_signal(mut term: Stream, mut int: Stream, audit: AuditLog, during: &'static str) {
    tokio::spawn(async move {
        // The shell's codes: 128 + the signal's number.
        let code = tokio::select! {
            _ = next(&mut int) => 130,
            _ = next(&mut term) => 143,
        };
        tracing::warn!("signal during the {during}: stopping at once");
        // Exits from the blocking thread itself: were this task dropped
        // with its runtime meanwhile, the process still ends.
        tokio::task::spawn_blocking(move || exit_after_flush(&audit, code));
    });
}

impl Signals {
    /// SIGQUIT: hands the listening sockets to the process that waits on
    /// `server.upgrade_sock` (`run --upgrade`), if one does: answers close
    /// their connections from now on, and once both processes have
    /// accepted for five seconds this one stops accepting and the drain
    /// ends it as soon as no request is left. `None`: nothing waits, or
    /// the sockets could not be handed over; this process goes on serving.
    ///
    /// The sockets are sent here, not by Pingora's `GracefulUpgrade`,
    /// which stops the process whether or not the send worked: a new
    /// process that went away after it was seen waiting (it gave up, was
    /// killed) would leave none serving.
    async fn upgrade(&self, term: &mut Stream, int: &mut Stream) -> Option<ShutdownSignal> {
        let Some(sock) = &self.upgrade_sock else {
            tracing::error!(
                "SIGQUIT ignored: server.upgrade_sock is not set (no zero-downtime restart)"
            );
            return None;
        };
        // The new process binds the socket when it is ready for the
        // sockets (and removes it once it has them): wait a little for it.
        let deadline = std::time::Instant::now() + WAIT_FOR_NEW;
        while !listening_at(sock) {
            if std::time::Instant::now() >= deadline {
                tracing::error!(
                    upgrade_sock = %sock.display(),
                    "SIGQUIT ignored: no new process waits for the sockets (start `fhirwall run --upgrade` first); still serving"
                );
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // Only a whole table: the new process would bind what is missing
        // itself, and fail on the ports this one holds.
        let Some(fds) = self
            .lifecycle
            .listen_fds()
            .filter(|_| self.lifecycle.listening())
        else {
            tracing::error!("SIGQUIT ignored: the listening sockets are not bound yet");
            return None;
        };
        let path = sock.to_string_lossy().into_owned();
        // Blocking: the send retries a missing socket for a few seconds.
        let sent = tokio::task::spawn_blocking(move || fds.lock().send_to_sock(path.as_str()))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(error) = sent {
            tracing::error!(
                upgrade_sock = %sock.display(),
                %error,
                "SIGQUIT ignored: the listening sockets could not be handed to the new process (it went away?); still serving"
            );
            return None;
        }
        // Sent is not yet received: the new process takes a connection
        // about once a second, and removes the socket once it has read the
        // sockets. One killed meanwhile never does: this one goes on.
        let deadline = std::time::Instant::now() + RECEIPT_WAIT;
        while sock.exists() {
            if std::time::Instant::now() >= deadline {
                tracing::error!(
                    upgrade_sock = %sock.display(),
                    "SIGQUIT ignored: the new process did not take the listening sockets sent to it (it went away?); still serving"
                );
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.lifecycle.start_handing_over();
        tracing::info!(upgrade_sock = %sock.display(), "SIGQUIT: the listening sockets are handed to the new process; both accept for five seconds, then this one drains");
        stop_on_signal(term.take(), int.take(), self.audit.clone(), "handover");
        let phases = self.phases.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (lifecycle, audit, drain) = (self.lifecycle.clone(), self.audit.clone(), self.drain);
        let spawned = std::thread::Builder::new()
            .name("fhirwall handover".into())
            .spawn(move || {
                let Some(mut phases) = phases else { return };
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match phases.blocking_recv() {
                        // Handed over, and the listeners no longer accept.
                        Ok(ExecutionPhase::ShutdownStarted) => break,
                        Ok(_) | Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    }
                }
                let deadline = std::time::Instant::now() + drain;
                exit_when_drained(&lifecycle, &audit, deadline);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch the handover; waiting the whole drain timeout");
        }
        // The new process starts accepting meanwhile (Pingora waits as
        // long after its own send); then this one stops.
        tokio::time::sleep(BOTH_ACCEPT).await;
        Some(ShutdownSignal::GracefulTerminate)
    }
}

/// Whether some process listens on the Unix socket `path` (Linux: a
/// listening entry for it in `/proc/net/unix`). A socket file alone can be
/// left over by a process that died: handing the sockets to it would leave
/// none serving.
fn listening_at(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const ACCEPTING: u32 = 0x0001_0000; // __SO_ACCEPTCON
                                        // Bytes: a socket name need not be UTF-8.
    let Ok(table) = std::fs::read("/proc/net/unix") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    table.split(|b| *b == b'\n').skip(1).any(|line| {
        // "Num RefCount Protocol Flags Type St Inode Path": the path is
        // what follows the seventh field.
        let mut rest = line;
        let mut flags = None;
        for i in 0..7 {
            let start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            if i == 3 {
                flags = std::str::from_utf8(&rest[..end])
                    .ok()
                    .and_then(|f| u32::from_str_radix(f, 16).ok());
            }
            rest = &rest[end..];
        }
        rest.strip_prefix(b" ") == Some(want) && flags.is_some_and(|f| f & ACCEPTING != 0)
    })
}

/// How long the new process has to read the sockets sent to it (it looks
/// for a connection once a second).
const RECEIPT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long both processes accept after the sockets were handed over.
const BOTH_ACCEPT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long SIGQUIT waits for a new process to be listening on
/// `server.upgrade_sock` before it is ignored.
const WAIT_FOR_NEW: std::time::Duration = std::time::Duration::from_secs(5);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, signal = name, "cannot listen for the signal");
                None
            }
        };
        let mut term = listen(SignalKind::terminate(), "SIGTERM");
        let mut int = listen(SignalKind::interrupt(), "SIGINT");
        let mut quit = listen(SignalKind::quit(), "SIGQUIT");
        loop {
            tokio::select! {
                _ = next(&mut term) => break,
                _ = next(&mut int) => return interrupted(),
                _ = next(&mut quit) => {
                    if let Some(handover) = self.upgrade(&mut term, &mut int).await {
                        return handover;
                    }
                }
            }
        }
        self.lifecycle.start_draining();
        tracing::info!(
            grace_period_seconds = self.grace.as_secs(),
            "SIGTERM: not ready; still serving through the grace period, closing connections after each answer"
        );
        tokio::select! {
            _ = tokio::time::sleep(self.grace) => {}
            _ = next(&mut term) => tracing::info!("second SIGTERM: grace period ended early"),
            _ = next(&mut int) => return interrupted(),
        }
        tracing::info!(
            in_flight = self.lifecycle.in_flight(),
            graceful_shutdown_timeout_seconds = self.drain.as_secs(),
            "no longer accepting; waiting for the requests in flight"
        );
        // Pingora listens for no signal from now on: SIGINT (or SIGTERM
        // again) during the drain stops at once.
        stop_on_signal(term, int, self.audit.clone(), "drain");
        let (lifecycle, audit) = (self.lifecycle.clone(), self.audit.clone());
        let deadline = std::time::Instant::now() + self.drain;
        let spawned = std::thread::Builder::new()
            .name("fhirwall drain".into())
            .spawn(move || exit_when_drained(&lifecycle, &audit, deadline));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot watch the drain; waiting the whole timeout");
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// Pingora waits the whole drain timeout before it stops its runtimes;
/// this ends the process as soon as no request is left in flight, once
/// every queued audit record is written. At the deadline it leaves the rest
/// to Pingora (which drops what is still running: those requests are
/// recorded as abandoned, and `run` writes their records).
fn exit_when_drained(
    lifecycle: &crate::lifecycle::Lifecycle,
    audit: &AuditLog,
    deadline: std::time::Instant,
) {
    // First the proxy's listener lingers for the requests already on
    // their way (`listening::Lingering`), then the last answers go out.
    if lifecycle.wait_until_released(deadline) && lifecycle.wait_until_idle(deadline, QUIET) {
        tracing::info!("no request in flight; fhirwall stopping");
        exit_after_flush(audit, 0);
    }
}

/// The proxy listener's TLS: certificate and key, TLS 1.2+ (rustls offers
/// nothing older), and client certificates verified against the configured
/// CAs when requested or required (RFC 8705 binding), each refusal counted.
fn tls_settings(
    t: &crate::config::Tls,
    metrics: Arc<Metrics>,
) -> Result<pingora::listeners::tls::TlsSettings, String> {
    use crate::config::ClientAuthMode;
    let path = |p: &std::path::Path| p.display().to_string();
    let mut settings =
        pingora::listeners::tls::TlsSettings::intermediate(&path(&t.cert_file), &path(&t.key_file))
            .map_err(|e| format!("tls: {e}"))?;
    if t.client_auth != ClientAuthMode::None {
        let verifier =
            crate::config::client_verifier(&t.client_cas, t.client_auth == ClientAuthMode::Request)
                .map_err(|e| format!("tls.client_ca_file: {e}"))?;
        settings.set_client_cert_verifier(Arc::new(CountingVerifier {
            inner: verifier,
            metrics,
        }));
    }
    Ok(settings)
}

/// A client certificate verifier that counts what it refuses: a refused
/// certificate ends the handshake inside rustls, before any request (and
/// so any record) exists, and would otherwise leave no trace.
struct CountingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for CountingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CountingVerifier")
            .field(&self.inner)
            .finish()
    }
}

impl rustls::server::danger::ClientCertVerifier for CountingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &verified {
            self.metrics.tls_client_cert_refused(e);
            tracing::debug!(error = %e, "client certificate refused in the TLS handshake");
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// `run --upgrade`: how the running process learns a new one waits.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// Send this process SIGQUIT once ready (else the operator does,
    /// within five seconds of the "waiting" log line).
    pub from_pid: Option<i32>,
}

/// A new process takes the listening sockets over only once it can serve:
/// every issuer's keys loaded (else it gives up, and the running process
/// is not disturbed). Then it tells the running process (SIGQUIT) if asked
/// to, and receives the sockets on `sock` through Pingora's bootstrap.
fn take_over_when_ready(
    server: &mut Server,
    startup: &tokio::runtime::Runtime,
    store: &JwksStore,
    takeover: &Takeover,
    sock: &std::path::Path,
) -> Result<(), String> {
    let errors = startup.block_on(store.load_all());
    if let Some((issuer, e)) = errors.into_iter().next() {
        return Err(format!(
            "not taking over: the JWKS of issuer '{issuer}' could not be loaded ({e}); \
             the running process keeps serving"
        ));
    }
    if let Some(pid) = takeover.from_pid {
        // Never 0 or negative: kill(2) would signal a process group, or
        // every process.
        let pid = rustix::process::Pid::from_raw(pid)
            .filter(|_| pid > 0)
            .ok_or_else(|| format!("not taking over: {pid} is not a process id"))?;
        rustix::process::kill_process(pid, rustix::process::Signal::QUIT)
            .map_err(|e| format!("not taking over: cannot signal process {pid:?}: {e}"))?;
    }
    tracing::info!(upgrade_sock = %sock.display(), "waiting for the running fhirwall's sockets (send it SIGQUIT)");
    // Blocks until the sockets arrive (Pingora gives up after about five
    // seconds, and the process ends).
    server.bootstrap();
    // Gone once used, so that a socket there always means a process
    // waiting (what SIGQUIT looks for).
    if let Err(e) = std::fs::remove_file(sock) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(upgrade_sock = %sock.display(), error = %e, "cannot remove the upgrade socket");
        }
    }
    Ok(())
}

/// Makes SIGQUIT and SIGHUP harmless from now on (tokio's handlers stay
/// for the life of the process; nothing looks at them until serving): by
/// default either ends the process, and `run` is sent them for a reload
/// or a handover before it serves. `main` calls this before it even reads
/// the configuration (which may wait for a DNS lookup); needs a runtime.
pub fn disarm_quit_and_hangup() {
    use tokio::signal::unix::{signal, SignalKind};
    let _ = signal(SignalKind::quit());
    let _ = signal(SignalKind::hangup());
}

/// Like [`disarm_quit_and_hangup`], from outside any runtime.
pub fn disarm_early_signals() {
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        rt.block_on(async { disarm_quit_and_hangup() });
    }
}

/// Builds and runs the server; returns when Pingora has shut down and
/// every audit record is written.
///
/// `upgrade`: take the listening sockets over from a running fhirwall
/// instead of binding them (see [`Takeover`]).
pub fn run(
    settings: Settings,
    config_path: Option<std::path::PathBuf>,
    upgrade: Option<Takeover>,
) -> Result<(), String> {
    // A runtime for start-up work (and the keys a takeover loads first).
    // Until Pingora listens for SIGQUIT and the reloader for SIGHUP (once
    // serving), their default actions would kill the process (SIGQUIT with
    // a core dump; a SIGHUP sent for a reload while the keys load):
    // installing tokio's handlers now makes them harmless; they are looked
    // at only once serving.
    let startup = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    startup.block_on(async { disarm_quit_and_hangup() });
    if upgrade.is_some() && settings.upgrade_sock.is_none() {
        return Err(
            "--upgrade needs server.upgrade_sock in the configuration (the running \
                    process must have it too)"
                .into(),
        );
    }
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    let threads = if settings.server.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        settings.server.threads
    };
    let conf = ServerConf {
        threads,
        // Pingora's grace period starts when it stops accepting: it is the
        // time requests in flight get (ours comes before, in `Signals`).
        grace_period_seconds: Some(settings.server.graceful_shutdown_timeout_seconds),
        // Then its runtimes get this long to stop: what is left then is
        // only blocking work (a DNS lookup, say).
        graceful_shutdown_timeout_seconds: Some(1),
        ca_file: settings
            .upstream
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string()),
        upgrade_sock: settings
            .upgrade_sock
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        ..ServerConf::default()
    };
    // Libraries that build rustls configurations without naming a crypto
    // provider (the Redis client's TLS) use the process's default: the
    // same aws-lc-rs as everything else. (Already set: fine.)
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let upgrade_sock = settings.upgrade_sock.clone();
    let opt = Opt {
        upgrade: upgrade.is_some(),
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    let phases = server.watch_execution_phase();

    let issuer_names: Vec<String> = settings.issuers.iter().map(|i| i.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&issuer_names));
    let store = Arc::new(JwksStore::new(
        &settings.issuers,
        &settings.jwks,
        &settings.jwks_roots,
        metrics.clone(),
    ));
    let site = crate::audit::event::Site::new(
        &settings.public_base,
        &settings.upstream.url,
        settings
            .issuers
            .iter()
            .map(|i| (i.name.clone(), i.issuer.clone()))
            .collect(),
    );
    let audit = AuditLog::open(&settings.audit, site, metrics.audit.clone())
        .map_err(|e| format!("audit sink: {e}"))?;
    let m = metrics.clone();
    let validator = Validator::new(
        &settings,
        store.clone(),
        Arc::new(move |c: crate::token::introspect::CallRecord| {
            m.introspection(&c.issuer, c.ok, c.seconds)
        }),
    );
    let listen = settings.listen.to_string();
    let tls = settings.tls.clone();
    let admin_listen = settings.admin_listen.to_string();
    let audit_at_exit = audit.clone();
    let token_cache = validator.token_cache();
    let (grace, drain) = (
        std::time::Duration::from_secs(settings.server.grace_period_seconds),
        std::time::Duration::from_secs(settings.server.graceful_shutdown_timeout_seconds),
    );
    let gateway = Gateway::new(settings, validator, metrics.clone(), audit);
    let lifecycle = gateway.lifecycle.clone();
    let shared = gateway.shared.clone();
    let upstream_dns = gateway.upstream_addrs.clone();
    let reloader = config_path.map(|path| Reloader {
        path,
        rules: gateway.rules.clone(),
        metrics: metrics.clone(),
        running: gateway.settings.clone(),
        shared: gateway.shared.clone(),
        read: std::sync::Mutex::new(gateway.settings.loaded_stamp.clone()),
        dirs: std::sync::Mutex::new(PolicyDirs::of(&gateway.settings)),
    });

    let mut app = pingora::proxy::HttpProxy::new(gateway, server.configuration.clone());
    app.handle_init_modules();
    let mut proxy = Service::new(
        "fhirwall proxy".to_string(),
        Lingering::new(app, lifecycle.clone()),
    );
    match tls {
        None => proxy.add_tcp(&listen),
        Some(t) => proxy.add_tls_with_settings(&listen, None, tls_settings(&t, metrics.clone())?),
    }
    let mut admin = Service::new(
        "fhirwall admin".to_string(),
        Admin {
            metrics,
            jwks: store.clone(),
            audit: audit_at_exit.clone(),
            token_cache,
            lifecycle: lifecycle.clone(),
            shared: shared.clone(),
        },
    );
    admin.add_tcp(&admin_listen);
    if let (Some(takeover), Some(sock)) = (&upgrade, &upgrade_sock) {
        take_over_when_ready(&mut server, &startup, &store, takeover, sock)?;
    } else {
        server.bootstrap();
    }
    drop(startup);
    // Files changed while fhirwall started (loading keys, waiting for a
    // takeover's sockets) are read again before it serves: the reload
    // they were changed for was asked of the process being replaced, or
    // its SIGHUP was not yet heard.
    if let Some(r) = reloader.as_ref().filter(|r| r.changed_since_load()) {
        tracing::info!(file = %r.path.display(), "the configuration or policies changed while fhirwall started: reloading before serving");
        r.reload();
    }
    let refresher = background_service("fhirwall jwks", JwksRefresher(store));

    // Watched: the proxy is ready once its sockets are bound; a listener
    // that cannot start stops fhirwall.
    server.add_service(Watched::new(
        proxy,
        Some(lifecycle.clone()),
        audit_at_exit.clone(),
    ));
    server.add_service(Watched::new(admin, None, audit_at_exit.clone()).beside(lifecycle.clone()));
    server.add_service(refresher);
    server.add_service(background_service(
        "fhirwall upstream dns",
        UpstreamDns(upstream_dns),
    ));
    if shared.redis().is_some() {
        server.add_service(background_service("fhirwall redis", RedisMonitor(shared)));
    }
    if let Some(r) = reloader {
        server.add_service(background_service("fhirwall reload", r));
    }
    tracing::info!(%listen, %admin_listen, threads, "fhirwall starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            lifecycle,
            grace,
            drain,
            audit: audit_at_exit.clone(),
            phases: std::sync::Mutex::new(Some(phases)),
            upgrade_sock,
        }),
    });
    // The proxy's runtimes have stopped: write out every queued record.
    if INTERRUPTED.load(std::sync::atomic::Ordering::Acquire) {
        exit_after_flush(&audit_at_exit, 130);
    }
    if !final_flush(&audit_at_exit) {
        return Err("audit records queued at shutdown could not all be written".into());
    }
    tracing::info!("fhirwall stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{listening_at, Reloader, Settling};
    use pingora::services::background::BackgroundService;
    use std::sync::Arc;

    /// A reload that lifts every role ceiling, or lets tokens with no
    /// mapped role through, is told apart from one that does not.
    /// `dir/config.yaml`: a loopback gateway with one issuer, and `extra`.
    fn write_config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:8080\npublic_base_url: http://localhost:8080/fhir\n\
                 upstream:\n  url: http://127.0.0.1:9090/r4\nissuers:\n  - name: local\n    \
                 issuer: http://127.0.0.1:9999\n    jwks_uri: http://127.0.0.1:9999/jwks.json\n    \
                 audiences: [http://localhost:8080/fhir]\nadmin:\n  listen: 127.0.0.1:9901\n\
                 {extra}"
            ),
        )
        .unwrap();
        config
    }

    #[test]
    fn reloads_that_lift_role_ceilings_are_named() {
        let rules = |roles: &str| {
            let dir = std::env::temp_dir().join(format!(
                "fhirwall widened {} {}",
                std::process::id(),
                roles.len()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let config = write_config(&dir, roles);
            let s = crate::config::load_for_reload(&config).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            crate::proxy::Rules::from_settings(&s)
        };
        let map = "  claim: roles\n  map:\n    clinician: {scopes: [patient/*.read]}\n";
        let deny = rules(&format!("roles:\n{map}"));
        let allow = rules(&format!("roles:\n{map}  unmapped: allow\n"));
        let none = rules("");
        assert!(super::widened(&deny, &none).is_some());
        assert!(super::widened(&deny, &allow).is_some());
        assert!(super::widened(&allow, &none).is_some());
        assert!(super::widened(&deny, &deny).is_none());
        assert!(super::widened(&none, &deny).is_none());
        assert!(super::widened(&allow, &deny).is_none());
        assert!(super::widened(&none, &none).is_none());
    }

    /// A policy added after the settings were read, while nothing yet
    /// listened for SIGHUP (its signal then lost), is applied once the
    /// reloader starts.
    #[tokio::test]
    async fn a_change_made_before_sighup_was_heard_is_applied_at_start() {
        let dir = std::env::temp_dir().join(format!("fhirwall catch-up {}", std::process::id()));
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let config = write_config(&dir, &format!("policies:\n  dir: {}\n", policies.display()));
        let settings = crate::config::load_for_reload(&config).unwrap();
        let rules = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::proxy::Rules::from_settings(&settings),
        ));
        assert_eq!(rules.load().policies.rules.len(), 0);
        std::fs::write(
            policies.join("late.yaml"),
            "rules:\n  - {name: emergency, effect: deny, when: {resource_type: [Observation]}}\n",
        )
        .unwrap();
        let reloader = Reloader {
            path: config,
            rules: rules.clone(),
            metrics: Arc::new(crate::metrics::Metrics::new(&["local".to_string()])),
            read: std::sync::Mutex::new(settings.loaded_stamp.clone()),
            dirs: std::sync::Mutex::new(super::PolicyDirs::of(&settings)),
            running: settings,
            shared: Arc::new(crate::shared::SharedState::new(
                crate::shared::DpopLimits {
                    remembered: std::time::Duration::from_secs(60),
                    max_entries: 10,
                    quota: 10,
                    user_quota: 10,
                },
                false,
                None,
            )),
        };
        let (stop, watch) = tokio::sync::watch::channel(false);
        let reloader = Arc::new(reloader);
        let running = tokio::spawn({
            let r = reloader.clone();
            async move { r.start(watch).await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rules.load().policies.rules.is_empty() {
            assert!(std::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap();
        // Read once: nothing changed since.
        assert!(!reloader.changed_since_load());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_is_applied_once_it_has_settled() {
        let mut s = Settling::new(1);
        assert!(!s.settled_change(1), "no change");
        assert!(!s.settled_change(2), "changed: wait a poll");
        assert!(!s.settled_change(3), "still changing");
        assert!(s.settled_change(3), "settled");
        assert!(!s.settled_change(3), "applied once");
        // Changed and changed back before settling: nothing to apply.
        assert!(!s.settled_change(4));
        assert!(!s.settled_change(3));
        assert!(!s.settled_change(3));
    }

    #[test]
    fn a_socket_counts_while_someone_listens_on_it() {
        let dir = std::env::temp_dir().join(format!("fhirwall listen {}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("up grade.sock");
        let _ = std::fs::remove_file(&path);
        assert!(!listening_at(&path));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(listening_at(&path), "a listener with spaces in its path");
        assert!(!listening_at(&dir.join("up")), "a prefix of its name");
        drop(listener);
        // The file is left behind; nobody listens.
        assert!(path.exists());
        assert!(!listening_at(&path));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
