//! The audit trail (stage 9): one record per request, on every path —
//! allowed, denied, upstream error, client abort. A record carries the
//! SHA-256 of the token, never the token, and the *names* of the query
//! parameters, never their values (which can be PHI).
//!
//! Records are encoded on the request's thread (JSON line or FHIR
//! `AuditEvent`, see [`event`]) and go through a bounded queue to one writer
//! thread ([`writer`]) that appends them to the sink. With
//! `record_before_upstream` (the default), an allowed request goes upstream
//! only once its *decision* record is written (group commit: one write and
//! one fsync per batch); the full *request* record follows when the request
//! ends. When the sink fails or the queue is full, new requests are refused
//! with 503 (`on_failure: refuse`) or records go to a local spill file
//! (`on_failure: spill`); records are never dropped silently.

pub mod event;
mod queue;
mod writer;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::oneshot;

use queue::{Msg, PushError, Queue};

use crate::config::{Audit, AuditFormat, AuditSink, Fsync, OnAuditFailure};
use crate::metrics::AuditMetrics;

/// Which of a request's records this is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The one complete record of a request, written when it ends.
    #[default]
    Request,
    /// Written (durably) before an allowed request goes upstream.
    Decision,
}

/// What one batch/transaction entry asked for (never a body or a
/// parameter's value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EntryRecord<'a> {
    pub interaction: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<&'a str>,
    /// Operation name without the `$`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'a str>,
    /// Names of its search parameters (and of its `ifNoneExist`'s).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<&'a str>,
    /// The status the upstream answered it with (its `response.status` in
    /// the response Bundle), when fhirwall read that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// fhirwall withheld the upstream's answer to it (the client got a
    /// denial in its place: a check of the answer failed).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
}

/// One audit record. It borrows from the request's state: building it
/// costs no copies; it is encoded once, on the request's thread.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record<'a> {
    pub event: Event,
    /// Unique id of this record (the AuditEvent id in that format).
    pub id: String,
    /// RFC 3339 time the request arrived.
    pub time: String,
    pub request_id: &'a str,
    /// The request id is the client's own `X-Request-Id` (present only
    /// then): chosen by the client, so it may repeat another request's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub request_id_from_client: bool,
    /// The client's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub method: &'a str,
    pub path: &'a str,
    /// Names of the search parameters — the query's, a form `_search`
    /// body's, a conditional create's `If-None-Exist` — never their values.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub query_params: &'a [String],
    /// Names of the parameters fhirwall added to the query sent upstream
    /// to confine it (the context patient, a scope's filter), never their
    /// values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub narrowed_with: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<&'a str>,
    /// The token's launch patient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<&'a str>,
    /// The patients the request names by id (its `Patient/{id}`, its
    /// compartment, a patient parameter's value): whose data it reaches,
    /// whatever the launch patient (`decide::patients_named`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub patients: &'a [String],
    /// Hex SHA-256 of the access token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// `jwt` or `opaque`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_hit: Option<bool>,
    /// How the token was bound to the client: `bearer`, `dpop` or `mtls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<&'a str>,
    /// Scopes that granted the request.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub scopes_used: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<&'a str>,
    /// Operation name without the `$`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'a str>,
    /// A batch or transaction's entries, in order: what each asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<EntryRecord<'a>>,
    /// allow, deny or error.
    pub decision: &'a str,
    /// Reason code (the metrics' `reason` label).
    pub reason: &'a str,
    /// The pipeline stage that decided: route, extract, validate, bind,
    /// classify, decide, policy, check, proxy or audit.
    pub stage: &'a str,
    /// The policy rule that decided (`file#rule`), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<&'a str>,
    /// Human-readable reason for a denial or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Break-glass-able policy rules the request passed (`file#rule`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub break_glass_rules: &'a [String],
    /// The declared emergency's reason, when break-glass was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub break_glass_reason: Option<&'a str>,
    /// Status sent to the client (absent in decision records; 0 when the
    /// client went away before an answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Request body bytes read from the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// Response body bytes sent to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// Time from arrival to the end of the answer (or to the decision).
    pub latency_ms: f64,
    /// Time the upstream took to answer (to its response header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Time spent validating the token (cache, JWKS, introspection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_ms: Option<f64>,
}

/// Why a request cannot be admitted for want of an audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The sink (and the spill file, if any) failed.
    SinkFailed,
    /// The queue is full: the sink cannot keep up.
    Backlog,
}

impl Refusal {
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::SinkFailed => "the audit sink is failing; no request is served unrecorded",
            Refusal::Backlog => "the audit sink cannot keep up; no request is served unrecorded",
        }
    }
}

/// Bytes reserved for an encoded record (a JSON line is typically 500 to
/// 900 bytes; an AuditEvent about twice that).
const ENCODED_CAPACITY: usize = 1024;

/// What queueing a record left to do.
enum Queued {
    Done,
    /// The queue is full: wait for room.
    Full(Pending),
    /// Spill it (or count it as lost): the queue is full and a spill file
    /// is configured, or the writer is gone.
    Spill(Pending),
}

/// A copy of a record [`AuditLog::record`] waits to queue: if that wait is
/// dropped unfinished, the copy is spilled or counted lost on the spot.
struct Unsent<'a> {
    log: &'a AuditLog,
    copy: Option<(String, Vec<u8>)>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some((id, bytes)) = self.copy.take() {
            self.log.spill_or_lose(Pending {
                id,
                bytes,
                ack: None,
            });
        }
    }
}

/// One encoded record on its way to the writer.
struct Pending {
    id: String,
    bytes: Vec<u8>,
    /// Told whether the record was written (decision records).
    ack: Option<oneshot::Sender<bool>>,
}

/// State shared by the handles and the writer.
struct Shared {
    queue: Queue,
    format: AuditFormat,
    site: event::Site,
    before_upstream: bool,
    /// The sink itself took its last write.
    primary_up: AtomicBool,
    /// A spill file is configured and took its last write.
    spill_ok: AtomicBool,
    /// The audit file, when decision records are appended to it by the
    /// request's own thread (a file sink without `fsync: batch`): written
    /// to the kernel before the upstream sees the request, no hand-off.
    direct: Option<Arc<Mutex<writer::AppendFile>>>,
    /// A request appended a record the writer has not fsynced.
    dirty: AtomicBool,
    /// When the writer took the batch it is writing (ms since the Unix
    /// epoch; 0 while it waits for records).
    busy_since_ms: std::sync::atomic::AtomicU64,
    /// How long a request waits for its decision record before it is
    /// refused (a writer stuck on a hung disk or endpoint).
    deadline: std::time::Duration,
    spill: Option<Mutex<writer::AppendFile>>,
    metrics: AuditMetrics,
    /// Request records the writer holds while the sink is down.
    held: std::sync::atomic::AtomicUsize,
}

/// The handle requests use. Clones share the queue and the writer.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    /// Closes the queue when the last handle goes: the writer then writes
    /// out what is queued and stops.
    _open: Arc<OpenQueue>,
}

struct OpenQueue(Arc<Shared>);

impl Drop for OpenQueue {
    fn drop(&mut self) {
        self.0.queue.close();
    }
}

impl AuditLog {
    /// Opens the sink (a file is created if missing, appended to) and
    /// starts the writer thread. Fails when a file sink cannot be opened.
    pub fn open(cfg: &Audit, site: event::Site, metrics: AuditMetrics) -> io::Result<AuditLog> {
        let spill = match &cfg.on_failure {
            OnAuditFailure::Spill(path) => Some(Mutex::new(writer::AppendFile::new(path.clone()))),
            OnAuditFailure::Refuse => None,
        };
        metrics.queue_capacity.set(cfg.queue_capacity as i64);
        let file = match &cfg.sink {
            AuditSink::File(path) => {
                let mut file = writer::AppendFile::new(path.clone());
                file.open().map_err(|e| {
                    io::Error::new(e.kind(), format!("audit.path {}: {e}", path.display()))
                })?;
                Some(Arc::new(Mutex::new(file)))
            }
            _ => None,
        };
        let direct = file
            .clone()
            .filter(|_| cfg.record_before_upstream && cfg.fsync != Fsync::Batch);
        let shared = Arc::new(Shared {
            queue: Queue::new(cfg.queue_capacity),
            format: cfg.format,
            site,
            before_upstream: cfg.record_before_upstream,
            primary_up: AtomicBool::new(false),
            spill_ok: AtomicBool::new(false),
            direct,
            dirty: AtomicBool::new(false),
            busy_since_ms: std::sync::atomic::AtomicU64::new(0),
            deadline: match &cfg.sink {
                AuditSink::Fhir { timeout, .. } => *timeout * 2 + std::time::Duration::from_secs(1),
                _ => std::time::Duration::from_secs(5),
            },
            spill,
            metrics,
            held: std::sync::atomic::AtomicUsize::new(0),
        });
        writer::start(cfg, shared.clone(), file)?;
        Ok(AuditLog {
            _open: Arc::new(OpenQueue(shared.clone())),
            shared,
        })
    }

    /// Whether allowed requests wait for a decision record.
    pub fn records_before_upstream(&self) -> bool {
        self.shared.before_upstream
    }

    /// Whether records can currently be written (for `/readyz`).
    pub fn ready(&self) -> bool {
        // Records can be made durable: the sink works, or the spill file.
        let accepting = self.shared.primary_up.load(Ordering::Acquire)
            || self.shared.spill_ok.load(Ordering::Acquire);
        accepting && !self.stuck()
    }

    /// The writer has been on one batch for longer than a request waits
    /// for its decision record: it hangs (a disk, mount or endpoint that
    /// does not answer).
    fn stuck(&self) -> bool {
        let since = self.shared.busy_since_ms.load(Ordering::Acquire);
        since != 0 && epoch_ms().saturating_sub(since) > self.shared.deadline.as_millis() as u64
    }

    /// Records waiting for the writer: queued, and held by it while the
    /// sink is down.
    pub fn queue_depth(&self) -> usize {
        self.shared.queue.len() + self.shared.held.load(Ordering::Relaxed)
    }

    fn encode(&self, record: &Record) -> Pending {
        // Sized for a typical record: no regrowth while it is written.
        let mut bytes = Vec::with_capacity(ENCODED_CAPACITY);
        match self.shared.format {
            AuditFormat::Json => serde_json::to_writer(&mut bytes, record),
            AuditFormat::AuditEvent => {
                serde_json::to_writer(&mut bytes, &event::audit_event(record, &self.shared.site))
            }
        }
        .expect("audit records serialise");
        Pending {
            id: record.id.clone(),
            bytes,
            ack: None,
        }
    }

    /// Writes a request's decision record and waits until it is written
    /// (or spilled). `Err` means the request must not be served.
    pub async fn commit_decision(&self, record: &Record<'_>) -> Result<(), Refusal> {
        if !self.ready() {
            return Err(Refusal::SinkFailed);
        }
        let mut pending = self.encode(record);
        if let Some(file) = &self.shared.direct {
            if self.shared.primary_up.load(Ordering::Acquire) {
                // Waits for another request's append, or for the writer's
                // rotation (rare; a hung disk shows in readiness), but not
                // for another process's lock on the file (a handover's
                // other process appending): the writer thread waits for
                // that, off Pingora's worker.
                let written =
                    writer::lock(file).write_within(&[&pending], std::time::Duration::ZERO);
                match written {
                    Ok(()) => {
                        self.shared.metrics.written_primary.inc();
                        self.shared.dirty.store(true, Ordering::Release);
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The writer thread takes it from here: it tries the
                    // file again and spills or refuses.
                    Err(e) => {
                        self.shared.metrics.failures_primary.inc();
                        tracing::warn!(error = %e, "audit decision record could not be appended")
                    }
                }
            }
        }
        let (ack_tx, ack_rx) = oneshot::channel();
        pending.ack = Some(ack_tx);
        match self.shared.queue.try_push(Msg::Record(pending)) {
            Ok(()) => {}
            Err(PushError::Full(Msg::Record(mut p))) => {
                p.ack = None;
                // File I/O on a blocking thread, not on Pingora's worker.
                let log = self.clone();
                let spilled = tokio::task::spawn_blocking(move || log.spill_now(p).is_ok())
                    .await
                    .unwrap_or(false);
                return if spilled {
                    Ok(())
                } else {
                    Err(Refusal::Backlog)
                };
            }
            Err(_) => return Err(Refusal::SinkFailed),
        }
        match tokio::time::timeout(self.shared.deadline, ack_rx).await {
            Ok(Ok(true)) => Ok(()),
            Ok(_) => Err(Refusal::SinkFailed),
            Err(_) => Err(Refusal::Backlog),
        }
    }

    /// Queues a request's record. A full queue makes the caller wait for
    /// the writer (or spill at once, with `on_failure: spill`).
    pub async fn record(&self, record: &Record<'_>) {
        let p = match self.try_queue(record) {
            Queued::Done => return,
            Queued::Full(p) => {
                // Dropped while waiting for room (shutdown ends the
                // request's task at the drain deadline), the record is
                // still written out or counted lost, never gone unsaid.
                let mut unsent = Unsent {
                    log: self,
                    copy: Some((p.id.clone(), p.bytes.clone())),
                };
                let pushed = self.shared.queue.push(Msg::Record(p)).await;
                unsent.copy = None;
                match pushed {
                    Ok(()) => return,
                    Err(Msg::Record(p)) => p,
                    Err(Msg::Flush(_)) => return,
                }
            }
            Queued::Spill(p) => p,
        };
        // File I/O on a blocking thread, not on Pingora's worker.
        let log = self.clone();
        if tokio::task::spawn_blocking(move || log.spill_or_lose(p))
            .await
            .is_err()
        {
            self.shared.metrics.dropped.inc();
            tracing::error!("audit record lost: spilling it failed");
        }
    }

    /// Queues a record without waiting (from a destructor): a full queue
    /// spills it or counts it as lost.
    pub fn record_now(&self, record: &Record<'_>) {
        match self.try_queue(record) {
            Queued::Done => {}
            Queued::Full(p) | Queued::Spill(p) => self.spill_or_lose(p),
        }
    }

    /// Queues a record if there is room, else says what is left to do.
    fn try_queue(&self, record: &Record<'_>) -> Queued {
        match self.shared.queue.try_push(Msg::Record(self.encode(record))) {
            Ok(()) => Queued::Done,
            // Full, and no spill file: wait for room.
            Err(PushError::Full(Msg::Record(p))) if self.shared.spill.is_none() => Queued::Full(p),
            Err(PushError::Full(Msg::Record(p)) | PushError::Closed(Msg::Record(p))) => {
                Queued::Spill(p)
            }
            // Only records are pushed here.
            Err(PushError::Full(Msg::Flush(_)) | PushError::Closed(Msg::Flush(_))) => Queued::Done,
        }
    }

    fn spill_or_lose(&self, p: Pending) {
        if let Err(p) = self.spill_now(p) {
            self.lost(p);
        }
    }

    /// Writes a record straight to the spill file (the queue is full).
    fn spill_now(&self, p: Pending) -> Result<(), Pending> {
        let Some(spill) = &self.shared.spill else {
            return Err(p);
        };
        let mut file = writer::lock(spill);
        match file.append(&[&p]) {
            Ok(()) => {
                self.shared.metrics.written_spill.inc();
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.failures_spill.inc();
                tracing::error!(error = %e, path = %file.path.display(), "audit spill file could not be written");
                Err(p)
            }
        }
    }

    fn lost(&self, p: Pending) {
        self.shared.metrics.dropped.inc();
        tracing::error!(record = %p.id, "audit record lost: the writer has stopped or the queue is full");
    }

    /// Records counted as lost since start (`fhirwall_audit_records_dropped_total`).
    pub fn lost_count(&self) -> u64 {
        self.shared.metrics.dropped.get()
    }

    /// Waits until every record queued so far is written, spilled or
    /// counted as lost. Blocking: for shutdown, outside the runtimes.
    pub fn flush(&self) -> io::Result<()> {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.shared.queue.try_push(Msg::Flush(ack_tx)).is_err() {
            return Err(writer_gone());
        }
        ack_rx.blocking_recv().map_err(|_| writer_gone())
    }
}

fn writer_gone() -> io::Error {
    io::Error::other("the audit writer thread has stopped")
}

/// Lowercase hex encoding of a hash.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// At most `max` bytes of `s`, cut at a character boundary (a path may
/// hold raw UTF-8), for what is recorded and logged.
pub fn capped(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The most of a denial's description a record keeps: a client without a
/// token must not be able to fill the audit with long paths or names.
const MAX_DETAIL: usize = 1024;

/// A denial's description as the audit keeps it: every `=value` (a query
/// or form parameter, a Bundle entry's URL, a header echoed back to the
/// client) becomes `=<redacted>`, since values can be PHI or credentials;
/// at most [`MAX_DETAIL`] bytes, cut at a character boundary and marked.
pub fn scrub(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut chars = detail.chars().peekable();
    while let Some(c) = chars.next() {
        // A character that breaks or hides a line is written as its code
        // (JSON escapes only C0 controls, `"` and `\`).
        if invisible(c) {
            out.push_str(&format!("\\u{{{:04X}}}", c as u32));
            continue;
        }
        out.push(c);
        if c == '=' {
            let mut skipped = false;
            while let Some(&n) = chars.peek() {
                // Not at a comma: FHIR's lists of values (`name=Smith,Jones`).
                if n.is_whitespace() || matches!(n, '&' | '\'' | '"' | ';' | ')' | ']') {
                    break;
                }
                chars.next();
                skipped = true;
            }
            if skipped {
                out.push_str("<redacted>");
            }
        }
        if out.len() > MAX_DETAIL {
            let end = capped(&out, MAX_DETAIL).len();
            out.truncate(end);
            out.push('…');
            break;
        }
    }
    out
}

/// A character a reader of records would not see as written: controls,
/// Unicode's line and paragraph separators (which split a JSON line for
/// readers that break lines on them) and format characters (bidi
/// overrides, zero-width ones) that change how a path reads.
pub fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{AD}'
                | '\u{600}'..='\u{605}'
                | '\u{61C}'
                | '\u{6DD}'
                | '\u{70F}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// A request's path as a record keeps it: anything but printable ASCII
/// percent-encoded (a client may send raw UTF-8, a line separator or a
/// bidi override included), at most 512 bytes.
pub fn recorded_path(path: &str) -> String {
    let encoded: std::borrow::Cow<str> =
        percent_encoding::utf8_percent_encode(path, percent_encoding::CONTROLS).into();
    capped(&encoded, 512).to_string()
}

/// Milliseconds since the Unix epoch.
fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random record id: 32 hex digits, never digits alone (once in
/// about 3.4 million ids they would be): a FHIR server that assigns
/// numeric ids itself (HAPI's JPA server) refuses such an id from a client,
/// and the AuditEvent would be set aside.
pub fn new_id() -> String {
    loop {
        let id = hex(&rand::random::<[u8; 16]>());
        if !id.bytes().all(|b| b.is_ascii_digit()) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests;
