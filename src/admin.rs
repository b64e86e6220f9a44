//! The admin listener (separate port): `/metrics` (Prometheus text format),
//! `/healthz` (liveness) and `/readyz` (ready once every issuer's JWKS is
//! loaded). Served by Pingora on its own listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::token::jwks::JwksStore;

/// The admin application.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub jwks: Arc<JwksStore>,
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
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => reply(200, "text/plain; version=0.0.4", self.metrics.render()),
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" if self.jwks.ready() => reply(200, "text/plain", b"ready\n".to_vec()),
            "/readyz" => reply(
                503,
                "text/plain",
                b"not ready: JWKS of some issuer not loaded\n".to_vec(),
            ),
            _ => reply(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}
