//! The admin listener (separate port): `/metrics` (Prometheus text format),
//! `/healthz` (liveness) and `/readyz` (ready once the proxy listens,
//! every issuer's JWKS is loaded, the audit sink takes records and Redis,
//! if it must, has answered since start, until a shutdown begins).
//! Served by Pingora on its own listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::audit::AuditLog;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::token::cache::TokenCache;
use crate::token::jwks::JwksStore;

/// The admin application.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub jwks: Arc<JwksStore>,
    pub audit: AuditLog,
    pub token_cache: TokenCache,
    pub lifecycle: Arc<Lifecycle>,
    pub shared: Arc<crate::shared::SharedState>,
}

impl Admin {
    /// Why the gateway is not ready, if it is not.
    fn not_ready(&self) -> Option<String> {
        if let Some(why) = self.lifecycle.not_ready() {
            Some(format!("not ready: {why}\n"))
        } else if !self.jwks.ready() {
            Some("not ready: JWKS of some issuer not loaded\n".into())
        } else if !self.audit.ready() {
            Some("not ready: the audit sink does not take records\n".into())
        } else {
            self.shared
                .not_ready()
                .map(|why| format!("not ready: {why} (redis.on_failure: refuse)\n"))
        }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            let mut r = reply(
                405,
                "text/plain",
                b"method not allowed: GET or HEAD\n".to_vec(),
            );
            r.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        let path = req.uri.path().to_string();
        match path.as_str() {
            "/metrics" => {
                let m = &self.metrics;
                m.audit.queue_depth.set(self.audit.queue_depth() as i64);
                m.token_cache_entries
                    .set(self.token_cache.entry_count() as i64);
                m.ready.set(i64::from(self.not_ready().is_none()));
                m.in_flight.set(self.lifecycle.in_flight() as i64);
                reply(200, "text/plain; version=0.0.4", m.render())
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => match self.not_ready() {
                None => reply(200, "text/plain", b"ready\n".to_vec()),
                Some(why) => reply(503, "text/plain", why.into_bytes()),
            },
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}
