//! DPoP clients for the tests: a key, proofs it signs (RFC 9449), tokens
//! bound to it, and requests that carry them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fhirwall::sandbox::keys::{KeyKind, SigningKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::Gateway;

pub fn b64sha(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

/// The client's key as a public JWK, and its RFC 7638 thumbprint.
pub fn public_jwk(key: &SigningKey) -> (Value, String) {
    let mut jwk = key.jwk().clone();
    let o = jwk.as_object_mut().unwrap();
    for m in ["kid", "use", "alg"] {
        o.remove(m);
    }
    let members: &[&str] = match o["kty"].as_str().unwrap() {
        "RSA" => &["e", "kty", "n"],
        _ => &["crv", "kty", "x", "y"],
    };
    let canonical = members
        .iter()
        .map(|m| format!("\"{m}\":\"{}\"", o[*m].as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let tp = b64sha(format!("{{{canonical}}}").as_bytes());
    (jwk, tp)
}

pub fn alg(key: &SigningKey) -> &'static str {
    match key.kid.as_str() {
        k if k.starts_with("rsa") => "RS256",
        _ => "ES256",
    }
}

pub struct Client {
    pub key: SigningKey,
    pub jwk: Value,
    pub jkt: String,
}

impl Client {
    pub fn new(kind: KeyKind, kid: &str) -> Client {
        let key = SigningKey::generate(kind, kid);
        let (jwk, jkt) = public_jwk(&key);
        Client { key, jwk, jkt }
    }

    pub fn header(&self) -> Value {
        json!({"typ": "dpop+jwt", "alg": alg(&self.key), "jwk": self.jwk})
    }

    pub fn claims(&self, method: &str, url: &str, token: &str) -> Value {
        json!({"jti": format!("{:x}", rand::random::<u128>()), "htm": method, "htu": url,
               "iat": now(), "ath": b64sha(token.as_bytes())})
    }

    pub fn proof(&self, method: &str, url: &str, token: &str) -> String {
        self.key
            .sign_json(&self.header(), &self.claims(method, url, token))
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A user/*.rs token bound to `jkt`.
pub fn bound_token(gw: &Gateway, jkt: &str) -> String {
    client_token(gw, jkt, "test-app")
}

/// A token of client `client_id` bound to the key `jkt`.
pub fn client_token(gw: &Gateway, jkt: &str, client_id: &str) -> String {
    user_token(gw, jkt, client_id, "user-1")
}

/// A token of client `client_id` for user `sub`, bound to the key `jkt`.
pub fn user_token(gw: &Gateway, jkt: &str, client_id: &str, sub: &str) -> String {
    let mut c = gw.claims("user/*.rs");
    c["cnf"] = json!({"jkt": jkt});
    c["client_id"] = json!(client_id);
    c["sub"] = json!(sub);
    gw.issuer.signing_key().sign(&c)
}

pub async fn send(
    gw: &Gateway,
    rel: &str,
    scheme: &str,
    token: &str,
    proofs: &[&str],
) -> (u16, String, String) {
    let mut r = gw
        .client
        .get(format!("{}/{rel}", gw.base))
        .header("authorization", format!("{scheme} {token}"));
    for p in proofs {
        r = r.header("dpop", *p);
    }
    let r = r.send().await.unwrap();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let status = r.status().as_u16();
    (status, www, r.text().await.unwrap())
}

/// A DPoP client with a bound `user/*.rs` token, reading `Patient/p1` at
/// the URL clients use (`public`: one replica's base stands for all).
pub struct Caller {
    pub client: Client,
    pub token: String,
    pub url: String,
}

impl Caller {
    /// An EC client of `gw`'s issuer, reading through `gw`'s base URL.
    pub fn new(gw: &Gateway) -> Caller {
        Caller::of(gw, "test-app", "user-1")
    }

    /// An EC client like [`Caller::new`] for user `sub` of `client_id`.
    pub fn of(gw: &Gateway, client_id: &str, sub: &str) -> Caller {
        let client = Client::new(KeyKind::P256, "ec-client");
        let token = user_token(gw, &client.jkt, client_id, sub);
        let url = format!("{}/Patient/p1", gw.base);
        Caller { client, token, url }
    }

    /// A fresh proof for `GET Patient/p1`.
    pub fn proof(&self) -> String {
        self.client.proof("GET", &self.url, &self.token)
    }

    /// `GET Patient/p1` at `gw` with `proof`: status, challenge, body.
    pub async fn with(&self, gw: &Gateway, proof: &str) -> (u16, String, String) {
        send(gw, "Patient/p1", "DPoP", &self.token, &[proof]).await
    }

    /// `GET Patient/p1` at `gw` with a fresh proof.
    pub async fn fresh(&self, gw: &Gateway) -> (u16, String, String) {
        self.with(gw, &self.proof()).await
    }
}
