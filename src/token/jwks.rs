//! JWKS fetching and caching per issuer (I/O edge of stage 3).
//!
//! Keys are fetched at start (after discovery, if configured) and held in an
//! `ArcSwap` so the request path reads them without locks. An unknown `kid`
//! triggers a re-fetch at most once per issuer per
//! `jwks.min_refetch_interval_seconds`; concurrent misses queue on one
//! mutex and share the fetch. A periodic refresh honours the response's
//! `Cache-Control: max-age` (clamped). When the endpoint is down, the keys
//! already loaded keep working; a token that needs keys we do not have gets
//! [`TokenError::KeysUnavailable`] (503), never an allow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde_json::Value;
use url::Url;

use super::{KeySet, TokenError};
use crate::config::{Issuer, JwksConfig};
use crate::metrics::Metrics;

/// Largest JWKS or discovery document accepted.
const MAX_DOC_BYTES: usize = 1024 * 1024;

#[derive(Debug, Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// The last fetch an unknown kid made: those come at most once per
    /// `min_refetch_interval_seconds` (start-up and periodic refreshes do
    /// not count, so a key rotated in just after one is fetched at once).
    last_miss_fetch: Option<Instant>,
    last_failed: bool,
    /// The last fetch failed and the jwks_uri came from discovery: the
    /// next one asks discovery again (keeping the old address if that
    /// fails too).
    rediscover: bool,
    /// When the periodic refresh is next due; set by every fetch.
    next_refresh: Option<Instant>,
}

/// The keys of one configured issuer.
pub struct IssuerKeys {
    pub issuer: Issuer,
    keys: ArcSwapOption<KeySet>,
    jwks_uri: ArcSwapOption<Url>,
    fetch: tokio::sync::Mutex<FetchState>,
}

impl IssuerKeys {
    /// Keys currently loaded, if any.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }
}

/// All issuers' keys.
pub struct JwksStore {
    issuers: Vec<IssuerKeys>,
    client: reqwest::Client,
    cfg: JwksConfig,
    metrics: Arc<Metrics>,
}

/// Outcome of one fetch: the keys and how long until the next refresh.
struct Fetched {
    keys: KeySet,
    max_age: Option<Duration>,
    /// Where from (for messages).
    uri: String,
}

impl JwksStore {
    /// `roots` are CAs trusted in addition to the system's (`jwks.ca_file`;
    /// alone on a machine without any: `trust::trusting`).
    pub fn new(
        issuers: &[Issuer],
        cfg: &JwksConfig,
        roots: &[reqwest::Certificate],
        metrics: Arc<Metrics>,
    ) -> JwksStore {
        let client = crate::trust::trusting(reqwest::Client::builder(), roots)
            .timeout(Duration::from_millis(cfg.fetch_timeout_ms))
            // Keys decide which tokens are genuine: a redirect may not
            // leave TLS (https → plain http off the loopback interface).
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                // `previous` holds the first URL too: three redirects.
                if attempt.previous().len() > 3 {
                    attempt.error("more than 3 redirects")
                } else if !crate::config::is_secure_or_loopback(attempt.url()) {
                    let to = attempt.url().clone();
                    attempt.error(format!(
                        "redirected to {to}, which is not https (plain http only on loopback)"
                    ))
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .expect("reqwest client with rustls builds");
        JwksStore {
            issuers: issuers
                .iter()
                .map(|i| IssuerKeys {
                    issuer: i.clone(),
                    keys: ArcSwapOption::empty(),
                    jwks_uri: ArcSwapOption::new(i.jwks_uri.clone().map(Arc::new)),
                    fetch: tokio::sync::Mutex::new(FetchState::default()),
                })
                .collect(),
            client,
            cfg: cfg.clone(),
            metrics,
        }
    }

    /// The configured issuer whose `iss` is exactly `iss`.
    pub fn issuer(&self, iss: &str) -> Option<&IssuerKeys> {
        self.issuers.iter().find(|i| i.issuer.issuer == iss)
    }

    /// Whether the key a cached token was verified with is still
    /// published: the issuer's key set is the one it was verified against,
    /// or still publishes the same key(s) under its `kid` (a key replaced
    /// under the kid refuses the tokens cached under the old one). A token
    /// without a kid is verified again after any new key set.
    pub fn still_published(&self, hit: &super::cache::Hit) -> bool {
        let Some(ik) = self.issuer(&hit.claims.iss) else {
            return false;
        };
        let current = ik.keys.load();
        match current.as_ref() {
            Some(keys) if Arc::ptr_eq(keys, &hit.keys) => true,
            Some(keys) => hit
                .kid
                .as_deref()
                .is_some_and(|kid| keys.still_holds(&hit.keys, kid)),
            None => false,
        }
    }

    /// True once every issuer has keys.
    /// Every issuer that verifies JWTs with keys has them (issuers that only
    /// introspect need none).
    pub fn ready(&self) -> bool {
        self.issuers
            .iter()
            .all(|i| !i.issuer.needs_keys() || i.keys.load().is_some())
    }

    /// Fetches every issuer's keys once; returns the errors (issuer name, message).
    pub async fn load_all(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        for ik in self.issuers.iter().filter(|i| i.issuer.needs_keys()) {
            let mut st = ik.fetch.lock().await;
            if let Err(e) = self.refresh_locked(ik, &mut st).await {
                errors.push((ik.issuer.name.clone(), e));
            }
        }
        errors
    }

    /// Runs forever: refreshes each issuer's keys when its schedule says
    /// so. Every fetch (periodic, start-up or unknown `kid`) reschedules the
    /// next one from the response's `Cache-Control: max-age`.
    pub async fn refresh_loop(self: Arc<Self>) {
        let tick = Duration::from_millis(250);
        loop {
            for ik in self.issuers.iter().filter(|i| i.issuer.needs_keys()) {
                let mut st = ik.fetch.lock().await;
                if st.next_refresh.is_none_or(|t| t <= Instant::now()) {
                    let _ = self.refresh_locked(ik, &mut st).await;
                }
            }
            tokio::time::sleep(tick).await;
        }
    }

    fn period(&self, max_age: Option<Duration>) -> Duration {
        let secs = max_age
            .map(|d| d.as_secs())
            .unwrap_or(self.cfg.refresh_default_seconds)
            .clamp(self.cfg.refresh_min_seconds, self.cfg.refresh_max_seconds);
        Duration::from_secs(secs)
    }

    /// Keys for a token with `kid`: the loaded set if it holds the kid (or
    /// the token has none); otherwise at most one shared re-fetch per interval.
    pub async fn keys_for(
        &self,
        ik: &IssuerKeys,
        kid: Option<&str>,
    ) -> Result<Arc<KeySet>, TokenError> {
        let hit = |ks: &Option<Arc<KeySet>>| match (ks, kid) {
            (Some(k), Some(kid)) if k.has_kid(kid) => true,
            (Some(_), None) => true,
            _ => false,
        };
        let current = ik.keys.load_full();
        if hit(&current) {
            return Ok(current.expect("hit implies keys"));
        }
        let mut st = ik.fetch.lock().await;
        let current = ik.keys.load_full();
        if hit(&current) {
            return Ok(current.expect("hit implies keys"));
        }
        match self.refetch_for_miss(ik, &mut st).await {
            None => match (current, st.last_failed) {
                (Some(k), false) => Ok(k),
                _ => Err(TokenError::KeysUnavailable(ik.issuer.name.clone())),
            },
            Some(Ok(_)) => Ok(ik.keys.load_full().expect("refresh stored keys")),
            Some(Err(_)) => Err(TokenError::KeysUnavailable(ik.issuer.name.clone())),
        }
    }

    /// The re-fetch a miss may make (an unknown kid, a key that no longer
    /// verifies): at most one per `min_refetch_interval_seconds`, shared by
    /// every miss. `None`: one was made too recently. The caller holds the
    /// issuer's fetch lock.
    async fn refetch_for_miss(
        &self,
        ik: &IssuerKeys,
        st: &mut FetchState,
    ) -> Option<Result<Option<Duration>, String>> {
        let recent = st.last_miss_fetch.is_some_and(|t| {
            t.elapsed() < Duration::from_secs(self.cfg.min_refetch_interval_seconds)
        });
        if recent {
            return None;
        }
        st.last_miss_fetch = Some(Instant::now());
        Some(self.refresh_locked(ik, st).await)
    }

    /// Keys again for a token the loaded `stale` set could not verify
    /// though it held the token's kid (or the token has none): an issuer
    /// may replace a key under the same kid, or sign without one. A set
    /// loaded since is returned at once; else one re-fetch, under the same
    /// budget as an unknown kid's (at most one per
    /// `min_refetch_interval_seconds`, shared), so forged tokens cost no
    /// more fetches than made-up kids do. `None`: nothing newer to try.
    pub async fn keys_after_failure(
        &self,
        ik: &IssuerKeys,
        stale: &Arc<KeySet>,
    ) -> Option<Arc<KeySet>> {
        let newer = |ks: Option<Arc<KeySet>>| ks.filter(|k| !Arc::ptr_eq(k, stale));
        if let Some(k) = newer(ik.keys.load_full()) {
            return Some(k);
        }
        let mut st = ik.fetch.lock().await;
        if let Some(k) = newer(ik.keys.load_full()) {
            return Some(k);
        }
        self.refetch_for_miss(ik, &mut st).await?.ok()?;
        newer(ik.keys.load_full())
    }

    /// Fetches and stores keys; the caller holds the issuer's fetch lock.
    async fn refresh_locked(
        &self,
        ik: &IssuerKeys,
        st: &mut FetchState,
    ) -> Result<Option<Duration>, String> {
        let started = Instant::now();
        st.last_attempt = Some(started);
        // An issuer that publishes no key we can use once it had keys has
        // retired them (a compromised key pulled): its answer stands, and
        // every token of it is refused until it publishes one. At start it
        // is a failed fetch: not ready.
        let rediscover = std::mem::take(&mut st.rediscover);
        let result = self.fetch(ik, rediscover).await.and_then(|f| {
            if f.keys.keys.is_empty() && ik.keys.load().is_none() {
                Err(format!("{}: JWKS holds no usable signature key", f.uri))
            } else {
                Ok(f)
            }
        });
        let name = ik.issuer.name.as_str();
        match result {
            Ok(f) => {
                st.last_failed = false;
                st.next_refresh = Some(started + self.period(f.max_age));
                self.metrics.jwks_fetch(name, true);
                self.metrics.jwks_loaded(name, f.keys.keys.len());
                if f.keys.keys.is_empty() {
                    tracing::error!(
                        issuer = name,
                        "JWKS holds no usable signature key: the keys loaded before are dropped and every token of this issuer is refused until it publishes one"
                    );
                } else {
                    tracing::info!(issuer = name, keys = f.keys.keys.len(), "JWKS loaded");
                }
                ik.keys.store(Some(Arc::new(f.keys)));
                Ok(f.max_age)
            }
            Err(e) => {
                st.last_failed = true;
                // A jwks_uri learnt by discovery is looked up again at the
                // next fetch: an issuer that moved its keys (a new tenant,
                // a custom domain) says so in its discovery document,
                // which a process would otherwise never read again.
                st.rediscover = ik.issuer.jwks_uri.is_none();
                st.next_refresh =
                    Some(started + Duration::from_secs(self.cfg.refresh_min_seconds.min(30)));
                self.metrics.jwks_fetch(name, false);
                tracing::warn!(issuer = name, error = %e, "JWKS fetch failed; keys already loaded stay in use");
                Err(e)
            }
        }
    }

    /// Fetches the issuer's keys; `rediscover`: ask discovery for the
    /// jwks_uri again first (the one known stays if discovery fails).
    async fn fetch(&self, ik: &IssuerKeys, rediscover: bool) -> Result<Fetched, String> {
        let uri = match ik.jwks_uri.load_full() {
            Some(known) if rediscover => match self.discover(&ik.issuer).await {
                Ok(u) => {
                    let u = Arc::new(u);
                    ik.jwks_uri.store(Some(u.clone()));
                    u
                }
                Err(e) => {
                    tracing::warn!(issuer = %ik.issuer.name, error = %e, "discovery failed; the jwks_uri known is kept");
                    known
                }
            },
            Some(u) => u,
            None => {
                let u = Arc::new(self.discover(&ik.issuer).await?);
                ik.jwks_uri.store(Some(u.clone()));
                u
            }
        };
        let (doc, max_age) = self.get_json(&uri).await?;
        let (keys, skipped) = KeySet::from_jwks(&doc).map_err(|e| format!("{uri}: {e}"))?;
        for s in skipped {
            tracing::warn!(issuer = %ik.issuer.name, jwks_uri = %uri, "JWKS key skipped: {s}");
        }
        Ok(Fetched {
            keys,
            max_age,
            uri: uri.to_string(),
        })
    }

    /// OpenID/SMART discovery: the `jwks_uri` of `issuer`.
    async fn discover(&self, issuer: &Issuer) -> Result<Url, String> {
        let base = issuer.issuer.trim_end_matches('/');
        let mut errors = Vec::new();
        for doc in ["openid-configuration", "smart-configuration"] {
            let url = format!("{base}/.well-known/{doc}");
            let url = Url::parse(&url).map_err(|e| format!("{url}: {e}"))?;
            let v = match self.get_json(&url).await {
                Ok((v, _)) => v,
                // Not published: the next document may be.
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            // A document that is published speaks for the issuer: one that
            // names another issuer (or, for OpenID, none) is an error, not
            // a reason to believe the next document.
            match v.get("issuer").and_then(Value::as_str) {
                Some(i) if i != issuer.issuer => {
                    return Err(format!(
                        "{url}: issuer '{i}' differs from configured '{}'",
                        issuer.issuer
                    ))
                }
                None if doc == "openid-configuration" => {
                    return Err(format!("{url}: names no issuer"));
                }
                _ => {}
            }
            return match v.get("jwks_uri").and_then(Value::as_str).map(Url::parse) {
                Some(Ok(u)) if crate::config::is_secure_or_loopback(&u) => Ok(u),
                Some(Ok(u)) => Err(format!(
                    "{url}: jwks_uri {u} is not https (plain http only on loopback)"
                )),
                _ => Err(format!("{url}: no usable jwks_uri")),
            };
        }
        Err(format!("discovery failed: {}", errors.join("; ")))
    }

    async fn get_json(&self, url: &Url) -> Result<(Value, Option<Duration>), String> {
        let resp = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {}", crate::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let max_age = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_max_age);
        if resp
            .content_length()
            .is_some_and(|l| l as usize > MAX_DOC_BYTES)
        {
            return Err(format!("{url}: document larger than {MAX_DOC_BYTES} bytes"));
        }
        let body = super::read_capped(resp, MAX_DOC_BYTES)
            .await
            .map_err(|e| match e {
                super::ReadError::TooLarge => {
                    format!("{url}: document larger than {MAX_DOC_BYTES} bytes")
                }
                super::ReadError::Http(e) => format!("{url}: {}", crate::error_chain(&e)),
            })?;
        let v = serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?;
        Ok((v, max_age))
    }
}

/// `max-age` of a Cache-Control value (`no-store`/`no-cache` mean 0).
pub fn parse_max_age(cc: &str) -> Option<Duration> {
    let mut out = None;
    for d in cc.split(',').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            out = v.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control() {
        assert_eq!(
            parse_max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(parse_max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
    }

    fn sandbox_issuer(name: &str, iss: &str) -> Issuer {
        Issuer {
            name: name.into(),
            issuer: iss.into(),
            jwks_uri: None,
            discovery: true,
            audiences: vec!["https://fhir.example/fhir".into()],
            algorithms: vec![jsonwebtoken::Algorithm::ES256],
            leeway_seconds: 0,
            require_at_jwt_typ: false,
            require_binding: false,
            require_binding_for_clients: Vec::new(),
            introspection: None,
        }
    }

    /// The unknown-`kid` re-fetch limit is per issuer: one issuer's recent
    /// re-fetch does not stop another's, and each is limited on its own.
    #[tokio::test]
    async fn unknown_kid_refetches_are_limited_per_issuer() {
        use crate::sandbox::issuer::SandboxIssuer;
        use crate::sandbox::keys::KeyKind;
        use std::sync::atomic::Ordering;
        let a = SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "a1").await;
        let b = SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "b1").await;
        let issuers = [
            sandbox_issuer("a", &a.issuer),
            sandbox_issuer("b", &b.issuer),
        ];
        let cfg = JwksConfig {
            min_refetch_interval_seconds: 60,
            ..JwksConfig::default()
        };
        let metrics = Arc::new(Metrics::new(&["a".to_string(), "b".to_string()]));
        let store = JwksStore::new(&issuers, &cfg, &[], metrics);
        assert!(store.load_all().await.is_empty());
        let fetches = |i: &SandboxIssuer| i.jwks_fetches.load(Ordering::SeqCst);
        assert_eq!((fetches(&a), fetches(&b)), (1, 1));
        let ka = store.issuer(&a.issuer).unwrap();
        let kb = store.issuer(&b.issuer).unwrap();
        // Known kids: no fetch.
        store.keys_for(ka, Some("a1")).await.unwrap();
        assert_eq!(fetches(&a), 1);
        // Start-up is no unknown kid's fetch: the first unknown kid
        // fetches at once (a key rotated in just after a refresh) ...
        let ks = store.keys_for(ka, Some("a2")).await.unwrap();
        assert!(!ks.has_kid("a2"));
        assert_eq!(fetches(&a), 2);
        // ... and within the interval the next ones do not.
        store.keys_for(ka, Some("a3")).await.unwrap();
        store.keys_for(ka, Some("a4")).await.unwrap();
        assert_eq!(fetches(&a), 2);
        // Past a's interval (its state wound back), a re-fetches once ...
        ka.fetch.lock().await.last_miss_fetch =
            Some(Instant::now() - std::time::Duration::from_secs(61));
        store.keys_for(ka, Some("a5")).await.unwrap();
        store.keys_for(ka, Some("a6")).await.unwrap();
        assert_eq!(fetches(&a), 3);
        // ... while b's interval is its own: its first miss fetches, its
        // second (within the interval) does not.
        store.keys_for(kb, Some("b2")).await.unwrap();
        store.keys_for(kb, Some("b3")).await.unwrap();
        assert_eq!((fetches(&a), fetches(&b)), (3, 2));
    }

    /// Serves `router` on `ip` (a loopback address) at a free port.
    async fn serve_on(ip: &str, router: axum::Router) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        addr
    }

    /// An issuer whose keys are served over plain http at 127.0.0.2: on
    /// the loopback interface, but not a name fhirwall takes for it, so it
    /// stands for a plain-http host elsewhere.
    async fn plain_http_idp() -> (Arc<crate::sandbox::issuer::SandboxIssuer>, String) {
        use crate::sandbox::issuer::SandboxIssuer;
        use crate::sandbox::keys::KeyKind;
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idp = SandboxIssuer::new(
            &format!("http://{addr}"),
            "https://fhir.example/fhir",
            KeyKind::P256,
            "k1",
        );
        let app = idp.clone().router();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (idp, format!("http://{addr}/jwks.json"))
    }

    /// A sandbox issuer on 127.0.0.1 (its base URL).
    async fn idp_on_loopback() -> String {
        use crate::sandbox::issuer::SandboxIssuer;
        use crate::sandbox::keys::KeyKind;
        SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "k1")
            .await
            .issuer
            .clone()
    }

    async fn load_one(issuer: Issuer) -> Vec<(String, String)> {
        let metrics = Arc::new(Metrics::new(std::slice::from_ref(&issuer.name)));
        JwksStore::new(&[issuer], &JwksConfig::default(), &[], metrics)
            .load_all()
            .await
    }

    /// Keys travel over TLS (plain http only on loopback): neither a
    /// redirect nor a discovery document can send the fetch elsewhere.
    #[tokio::test]
    async fn keys_are_not_fetched_over_plain_http_off_loopback() {
        use axum::response::{IntoResponse, Redirect};
        use axum::routing::get;
        use axum::Json;
        let (idp, plain) = plain_http_idp().await;
        // Redirected from a loopback address to the plain-http host.
        let to = plain.clone();
        let redirector = serve_on(
            "127.0.0.1",
            axum::Router::new().route(
                "/jwks.json",
                get(move || {
                    let to = to.clone();
                    async move { Redirect::temporary(&to).into_response() }
                }),
            ),
        )
        .await;
        let errors = load_one(Issuer {
            jwks_uri: Some(Url::parse(&format!("http://{redirector}/jwks.json")).unwrap()),
            discovery: false,
            ..sandbox_issuer("redirected", "https://idp.example")
        })
        .await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].1.contains("not https"), "{errors:?}");
        // Discovery: documents set once the server's address is known.
        type Docs = Arc<std::sync::Mutex<(serde_json::Value, serde_json::Value)>>;
        let docs: Docs = Arc::default();
        let (openid, smart) = (docs.clone(), docs.clone());
        let discovery = serve_on(
            "127.0.0.1",
            axum::Router::new()
                .route(
                    "/.well-known/openid-configuration",
                    get(move || {
                        let d = openid.lock().unwrap().0.clone();
                        async move { Json(d) }
                    }),
                )
                .route(
                    "/.well-known/smart-configuration",
                    get(move || {
                        let d = smart.lock().unwrap().1.clone();
                        async move { Json(d) }
                    }),
                ),
        )
        .await;
        let iss = format!("http://{discovery}");
        let discovered = sandbox_issuer("discovered", &iss);
        // A jwks_uri over plain http.
        *docs.lock().unwrap() = (
            serde_json::json!({"issuer": iss, "jwks_uri": plain}),
            serde_json::json!({"issuer": iss, "jwks_uri": plain}),
        );
        let errors = load_one(discovered.clone()).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].1.contains("not https"), "{errors:?}");
        // An OpenID document naming another issuer (or none) is not passed
        // over for a SMART one that names none.
        let good = format!("{}/jwks.json", idp_on_loopback().await);
        for openid in [
            serde_json::json!({"issuer": "https://other.example", "jwks_uri": good}),
            serde_json::json!({"jwks_uri": good}),
        ] {
            *docs.lock().unwrap() = (openid, serde_json::json!({"jwks_uri": good}));
            let errors = load_one(discovered.clone()).await;
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].1.contains("differs") || errors[0].1.contains("names no issuer"),
                "{errors:?}"
            );
        }
        // The same documents naming this issuer load its keys.
        *docs.lock().unwrap() = (
            serde_json::json!({"issuer": iss, "jwks_uri": good}),
            serde_json::json!({}),
        );
        assert!(load_one(discovered).await.is_empty());
        // Nothing reached the plain-http host.
        assert_eq!(
            idp.jwks_fetches.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    }

    /// A jwks_uri learnt by discovery is learnt again after a fetch from
    /// it fails: an issuer that moved its keys is followed (a configured
    /// one is kept).
    #[tokio::test]
    async fn a_discovered_jwks_uri_is_learnt_again_after_a_failed_fetch() {
        use crate::sandbox::issuer::SandboxIssuer;
        use crate::sandbox::keys::KeyKind;
        use axum::routing::get;
        use axum::Json;
        use std::sync::atomic::Ordering;
        let old = SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "old").await;
        let new = SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "new").await;
        let doc: Arc<std::sync::Mutex<serde_json::Value>> = Arc::default();
        let served = doc.clone();
        let discovery = serve_on(
            "127.0.0.1",
            axum::Router::new().route(
                "/.well-known/openid-configuration",
                get(move || {
                    let v = served.lock().unwrap().clone();
                    async move { Json(v) }
                }),
            ),
        )
        .await;
        let iss = format!("http://{discovery}");
        let point_to = |idp: &SandboxIssuer| {
            *doc.lock().unwrap() =
                serde_json::json!({"issuer": iss, "jwks_uri": format!("{}/jwks.json", idp.issuer)});
        };
        point_to(&old);
        let metrics = Arc::new(Metrics::new(&["moving".to_string()]));
        let cfg = JwksConfig {
            min_refetch_interval_seconds: 0,
            ..JwksConfig::default()
        };
        let store = JwksStore::new(&[sandbox_issuer("moving", &iss)], &cfg, &[], metrics);
        assert!(store.load_all().await.is_empty());
        let ik = store.issuer(&iss).unwrap();
        // The keys move; the old address fails.
        point_to(&new);
        old.down.store(true, Ordering::SeqCst);
        assert!(store.keys_for(ik, Some("new")).await.is_err());
        let keys = store.keys_for(ik, Some("new")).await.unwrap();
        assert!(keys.has_kid("new"));
        assert_eq!(new.jwks_fetches.load(Ordering::SeqCst), 1);
        // A failed fetch while discovery is down too: the address known
        // stays in use (loaded keys are not tied to discovery).
        new.down.store(true, Ordering::SeqCst);
        assert!(store.keys_for(ik, Some("other")).await.is_err());
        *doc.lock().unwrap() = serde_json::json!({});
        new.down.store(false, Ordering::SeqCst);
        let keys = store.keys_for(ik, Some("other")).await.unwrap();
        assert!(keys.has_kid("new"));
        assert_eq!(new.jwks_fetches.load(Ordering::SeqCst), 3);
    }

    /// Discovery reads `.well-known/openid-configuration`, else SMART's
    /// `.well-known/smart-configuration`; with neither, it names both.
    #[tokio::test]
    async fn discovery_falls_back_to_smart_configuration() {
        use crate::sandbox::issuer::SandboxIssuer;
        use crate::sandbox::keys::KeyKind;
        use std::sync::atomic::Ordering;
        let idp = SandboxIssuer::spawn("https://fhir.example/fhir", KeyKind::P256, "k1").await;
        idp.openid_configuration.store(false, Ordering::SeqCst);
        let issuer = sandbox_issuer("smart-only", &idp.issuer);
        let metrics = Arc::new(Metrics::new(&["smart-only".to_string()]));
        let store = JwksStore::new(
            std::slice::from_ref(&issuer),
            &JwksConfig::default(),
            &[],
            metrics.clone(),
        );
        assert!(store.load_all().await.is_empty());
        assert!(store.ready());
        assert_eq!(idp.jwks_fetches.load(Ordering::SeqCst), 1);

        // An issuer publishing neither document: both are named.
        let bad = Issuer {
            issuer: format!("{}/nothing-here", idp.issuer),
            ..issuer
        };
        let store = JwksStore::new(&[bad], &JwksConfig::default(), &[], metrics);
        let errors = store.load_all().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0].1;
        assert!(
            e.contains("openid-configuration") && e.contains("smart-configuration"),
            "{e}"
        );
    }
}
