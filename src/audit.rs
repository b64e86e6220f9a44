//! The audit record (stage 9): one JSON line per request, on every path,
//! allowed or denied. It carries the SHA-256 of the token, never the token,
//! and query parameter names are not recorded here at all (values can be
//! PHI). Written synchronously to stdout or appended to a file, flushed per
//! record.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::AuditSink;

/// One audit record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// RFC 3339 time the request arrived.
    pub time: String,
    pub request_id: String,
    pub method: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Hex SHA-256 of the access token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_cache_hit: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interaction: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Scopes that granted the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes_used: Vec<String>,
    /// allow, deny or error.
    pub decision: String,
    /// Reason code (see the metrics' `reason` label).
    pub reason: String,
    /// Human-readable reason for a denial or error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    pub latency_ms: f64,
}

enum Out {
    Stdout(io::Stdout),
    File(BufWriter<File>),
}

/// Where records go.
pub struct AuditLog {
    out: Mutex<Out>,
}

impl AuditLog {
    /// Opens the sink (the file is created if missing, appended to).
    pub fn open(sink: &AuditSink) -> io::Result<AuditLog> {
        let out = match sink {
            AuditSink::Stdout => Out::Stdout(io::stdout()),
            AuditSink::File(path) => Out::File(BufWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
        };
        Ok(AuditLog {
            out: Mutex::new(out),
        })
    }

    /// Writes one record as a JSON line and flushes it.
    pub fn write(&self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *out {
            Out::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(&line)?;
                s.flush()
            }
            Out::File(f) => {
                f.write_all(&line)?;
                f.flush()
            }
        }
    }
}

/// Hex encoding of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
