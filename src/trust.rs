//! Whom fhirwall's own HTTPS clients (JWKS, discovery, introspection, the
//! audit sink, checked answers) trust. I/O: reads the machine's CA store.
//!
//! reqwest verifies with rustls-platform-verifier, which refuses to build a
//! client on a machine without CA certificates (a slim image without the
//! `ca-certificates` package), even when every endpoint is plain http on
//! loopback. Clients are built here instead: beside the system's CAs when
//! it has some, with the configured ones alone when it has none; and
//! `config` refuses, at its key, every https endpoint that would then have
//! nothing to be verified against.

use std::sync::OnceLock;

/// Whether this machine has CA certificates of its own: those reqwest's
/// verifier would load (`SSL_CERT_FILE`, `SSL_CERT_DIR`, else the
/// distribution's store, e.g. `/etc/ssl/certs`). Read once.
pub fn system_has_roots() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(found.certs);
        added > 0
    })
}

/// `b` trusting the CAs `extra` beside the system's, or, on a machine
/// without any, `extra` alone.
pub fn trusting(
    b: reqwest::ClientBuilder,
    extra: &[reqwest::Certificate],
) -> reqwest::ClientBuilder {
    if system_has_roots() {
        b.tls_certs_merge(extra.iter().cloned())
    } else {
        b.tls_certs_only(extra.iter().cloned())
    }
}

/// Why an https endpoint cannot be verified on a machine without CA
/// certificates, and which setting (`ca_key`) could name its CA instead.
pub fn no_roots_message(url: &url::Url, ca_key: Option<&str>) -> String {
    let instead = match ca_key {
        Some(k) => format!("install the ca-certificates package, or name its CA in {k}"),
        None => "install the ca-certificates package".to_string(),
    };
    format!(
        "'{url}' is reached over TLS, and this machine has no CA certificates to verify it against \
         (none in SSL_CERT_FILE, SSL_CERT_DIR or the system's store): {instead}"
    )
}
