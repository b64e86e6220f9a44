//! A local token issuer for `fhirwall demo`, the tests and the benches: it
//! publishes a JWKS and an OpenID discovery document and mints access
//! tokens for given scopes and patient. It is a sandbox, not an
//! authorization server: it authenticates nobody.
//!
//! Tests can rotate its keys, take its JWKS endpoint down, and count fetches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::keys::{jwks, KeyKind, SigningKey};

/// A running sandbox issuer.
pub struct SandboxIssuer {
    /// The `iss` value of its tokens (`http://127.0.0.1:PORT`).
    pub issuer: String,
    /// The audience its tokens carry by default.
    pub audience: String,
    keys: RwLock<Vec<Arc<SigningKey>>>,
    /// When true, the JWKS endpoint answers 503.
    pub down: AtomicBool,
    /// Number of JWKS requests served (including failed ones).
    pub jwks_fetches: AtomicUsize,
    /// `Cache-Control` max-age sent with the JWKS.
    pub max_age_seconds: AtomicUsize,
    /// When false, `/.well-known/openid-configuration` answers 404 (a
    /// SMART server that publishes only `smart-configuration`).
    pub openid_configuration: AtomicBool,
}

/// The longest lifetime `/token` mints (a day).
pub const MAX_MINTED_LIFETIME: i64 = 86_400;

/// Parameters of a token to mint.
#[derive(Debug, Clone, Deserialize)]
pub struct Mint {
    pub scope: String,
    #[serde(default)]
    pub patient: Option<String>,
    #[serde(default = "default_sub")]
    pub sub: String,
    #[serde(default = "default_client")]
    pub client_id: String,
    #[serde(default = "default_lifetime")]
    pub lifetime_seconds: i64,
}

fn default_sub() -> String {
    "practitioner-1".into()
}
fn default_client() -> String {
    "sandbox-app".into()
}
fn default_lifetime() -> i64 {
    3600
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl SandboxIssuer {
    /// A new issuer for `issuer`/`audience` with one P-256 key `kid`.
    pub fn new(issuer: &str, audience: &str, kind: KeyKind, kid: &str) -> Arc<SandboxIssuer> {
        Arc::new(SandboxIssuer {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            keys: RwLock::new(vec![Arc::new(SigningKey::generate(kind, kid))]),
            down: AtomicBool::new(false),
            jwks_fetches: AtomicUsize::new(0),
            max_age_seconds: AtomicUsize::new(300),
            openid_configuration: AtomicBool::new(true),
        })
    }

    /// The key tokens are signed with (the first published).
    pub fn signing_key(&self) -> Arc<SigningKey> {
        self.keys.read().unwrap()[0].clone()
    }

    /// Publishes `key` first (it signs from now on), keeping the others.
    pub fn rotate_to(&self, key: SigningKey) {
        self.keys.write().unwrap().insert(0, Arc::new(key));
    }

    /// Replaces the published keys entirely.
    pub fn set_keys(&self, keys: Vec<SigningKey>) {
        *self.keys.write().unwrap() = keys.into_iter().map(Arc::new).collect();
    }

    /// Standard claims for a token, before signing.
    pub fn claims(&self, m: &Mint) -> Value {
        let now = now();
        let mut c = json!({
            "iss": self.issuer, "aud": self.audience, "sub": m.sub, "client_id": m.client_id,
            "scope": m.scope, "iat": now, "exp": now.saturating_add(m.lifetime_seconds),
            "jti": super::super::audit::hex(&rand::random::<[u8; 12]>()),
        });
        if let Some(p) = &m.patient {
            c["patient"] = json!(p);
        }
        c
    }

    /// Mints a signed access token.
    pub fn mint(&self, m: &Mint) -> String {
        self.signing_key().sign(&self.claims(m))
    }

    /// The JWKS document currently published.
    pub fn jwks(&self) -> Value {
        let keys = self.keys.read().unwrap();
        jwks(&keys.iter().map(|k| k.as_ref()).collect::<Vec<_>>())
    }

    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/jwks.json", get(jwks_handler))
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/smart-configuration", get(smart_configuration))
            .route("/token", get(mint_handler))
            .with_state(self)
    }

    /// Binds 127.0.0.1 on a free port and serves in a spawned task; the
    /// issuer URL is `http://127.0.0.1:PORT`.
    pub async fn spawn(audience: &str, kind: KeyKind, kid: &str) -> Arc<SandboxIssuer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sandbox issuer");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let s = SandboxIssuer::new(&format!("http://{addr}"), audience, kind, kid);
        let app = s.clone().router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        s
    }
}

async fn jwks_handler(State(s): State<Arc<SandboxIssuer>>) -> Response {
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let max_age = s.max_age_seconds.load(Ordering::SeqCst);
    (
        [("cache-control", format!("max-age={max_age}"))],
        Json(s.jwks()),
    )
        .into_response()
}

async fn discovery(State(s): State<Arc<SandboxIssuer>>) -> Response {
    if !s.openid_configuration.load(Ordering::SeqCst) {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/jwks.json", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
    }))
    .into_response()
}

/// SMART App Launch's `.well-known/smart-configuration` (the subset a
/// resource server reads).
async fn smart_configuration(State(s): State<Arc<SandboxIssuer>>) -> Response {
    Json(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/jwks.json", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "capabilities": ["launch-standalone", "client-confidential-asymmetric"],
    }))
    .into_response()
}

/// `GET /token?scope=…&patient=…`: a signed token (sandbox only).
async fn mint_handler(State(s): State<Arc<SandboxIssuer>>, Query(m): Query<Mint>) -> Response {
    if !(1..=MAX_MINTED_LIFETIME).contains(&m.lifetime_seconds) {
        let why = format!("lifetime_seconds must be 1 to {MAX_MINTED_LIFETIME}\n");
        return (StatusCode::BAD_REQUEST, why).into_response();
    }
    Json(json!({"access_token": s.mint(&m), "token_type": "Bearer", "expires_in": m.lifetime_seconds, "scope": m.scope}))
        .into_response()
}
