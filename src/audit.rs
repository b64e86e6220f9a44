//! The audit record (stage 9): one JSON line per request, on every path,
//! allowed or denied. It carries the SHA-256 of the token, never the token,
//! and query parameter names are not recorded here at all (values can be
//! PHI). Records go through a bounded queue to a writer thread that appends
//! them to stdout or a file and flushes after every batch.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::sync::mpsc;

use serde::Serialize;

use crate::config::AuditSink;

/// One audit record. It borrows from the request's state: building it
/// costs no copies; it is serialised once, on the request's thread.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record<'a> {
    /// RFC 3339 time the request arrived.
    pub time: String,
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<&'a str>,
    /// Hex SHA-256 of the access token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_hit: Option<bool>,
    /// The policy rule that decided (`file#rule`), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<&'a str>,
    /// Break-glass-able policy rules the request passed (`file#rule`).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub break_glass_rules: &'a [String],
    /// The declared emergency's reason, when break-glass was used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub break_glass_reason: Option<&'a str>,
    /// `jwt` or `opaque`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_kind: Option<&'a str>,
    /// How the token was bound to the client: `bearer` (not bound) or `dpop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<&'a str>,
    /// Operation name without the `$`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<&'a str>,
    /// Scopes that granted the request.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub scopes_used: &'a [String],
    /// allow, deny or error.
    pub decision: &'a str,
    /// Reason code (see the metrics' `reason` label).
    pub reason: &'a str,
    /// Human-readable reason for a denial or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    pub latency_ms: f64,
}

/// Records queued for the writer before `write` has to wait for it.
const QUEUE_CAPACITY: usize = 16 * 1024;

enum Msg {
    Line(Vec<u8>),
    /// Acknowledged once every line queued before it is written and flushed.
    Flush(mpsc::SyncSender<()>),
}

/// Where records go: a bounded queue drained by one writer thread, which
/// writes whatever has queued up and flushes once per batch (so a busy
/// gateway makes one `write` per batch, not per request). A full queue
/// makes the request path wait for the writer: records are never dropped.
/// Clones share the queue.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::SyncSender<Msg>,
}

impl AuditLog {
    /// Opens the sink (the file is created if missing, appended to) and
    /// starts its writer thread.
    pub fn open(sink: &AuditSink) -> io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match sink {
            AuditSink::Stdout => Box::new(io::stdout()),
            AuditSink::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("fhirwall-audit".into())
            .spawn(move || writer(rx, BufWriter::with_capacity(64 * 1024, out)))?;
        Ok(AuditLog { tx })
    }

    /// Queues one record as a JSON line.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let msg = match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => return Ok(()),
            Err(mpsc::TrySendError::Full(msg)) => msg,
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(writer_gone()),
        };
        tracing::warn!("audit queue full; waiting for the writer");
        self.tx.send(msg).map_err(|_| writer_gone())
    }

    /// Waits until every record queued so far is written and flushed.
    pub fn flush(&self) -> io::Result<()> {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Flush(ack_tx))
            .map_err(|_| writer_gone())?;
        ack_rx.recv().map_err(|_| writer_gone())
    }
}

fn writer_gone() -> io::Error {
    io::Error::other("the audit writer thread has stopped")
}

/// How long the writer lets records gather after a busy batch. While it
/// waits (rather than blocking in `recv`), senders never have to wake it,
/// so a loaded gateway pays no futex call per record.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// The writer thread: takes every queued message, writes them, flushes once;
/// blocks in `recv` only when the queue was found empty.
fn writer(rx: mpsc::Receiver<Msg>, mut out: BufWriter<Box<dyn Write + Send>>) {
    let mut acks = Vec::new();
    let mut next = rx.recv().ok();
    while let Some(first) = next {
        let mut msg = Some(first);
        let mut lines = 0usize;
        while let Some(m) = msg {
            match m {
                Msg::Line(line) => {
                    lines += 1;
                    if let Err(e) = out.write_all(&line) {
                        tracing::error!(error = %e, "audit record could not be written");
                    }
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            msg = rx.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "audit sink could not be flushed");
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        next = if lines > 1 {
            // Busy: let the next batch gather, then take it without blocking.
            std::thread::sleep(BATCH_PAUSE);
            match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::TryRecvError::Empty) => rx.recv().ok(),
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        } else {
            rx.recv().ok()
        };
    }
    let _ = out.flush();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_encodes_every_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn flush_writes_every_queued_record() {
        let path =
            std::env::temp_dir().join(format!("fhirwall-audit-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&AuditSink::File(path.clone())).unwrap();
        for i in 0..1000 {
            let id = format!("r{i}");
            let r = Record {
                request_id: &id,
                decision: "allow",
                ..Record::default()
            };
            log.write(&r).unwrap();
        }
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().enumerate().all(|(i, id)| *id == format!("r{i}")));
    }
}
