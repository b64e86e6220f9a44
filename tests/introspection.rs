//! Opaque tokens through the real binary, introspected (RFC 7662) at an
//! in-process authorization server that counts its calls: caching,
//! revocation within the ceiling, negative caching, single-flight, outages
//! and the client authentication methods.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};
use support::{Gateway, Options};

/// How a call authenticated: the Authorization header and the form fields.
type Auth = (Option<String>, HashMap<String, String>);

/// The authorization server's introspection endpoint.
#[derive(Default)]
struct As {
    /// token → answer (absent: inactive).
    answers: Mutex<HashMap<String, Value>>,
    calls: AtomicUsize,
    delay_ms: AtomicU64,
    down: AtomicBool,
    /// How the last call authenticated: (Authorization header, form fields).
    last_auth: Mutex<Option<Auth>>,
}

async fn introspect(
    State(s): State<Arc<As>>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down".to_string());
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let auth = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    *s.last_auth.lock().unwrap() = Some((auth, form.clone()));
    let token = form.get("token").cloned().unwrap_or_default();
    let answer = s
        .answers
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .unwrap_or(json!({"active": false}));
    (StatusCode::OK, answer.to_string())
}

async fn spawn_as() -> (Arc<As>, String) {
    let s = Arc::new(As::default());
    let app = Router::new()
        .route("/introspect", axum::routing::post(introspect))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (s, format!("http://{addr}/introspect"))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn start(auth_yaml: &str, ceiling: u64, negative: u64) -> (Gateway, Arc<As>) {
    let (as_, endpoint) = spawn_as().await;
    let gw = Gateway::start(Options {
        issuer_yaml: format!(
            "    introspection:\n      endpoint: {endpoint}\n      client_id: fhirwall-gw\n{auth_yaml}      timeout_ms: 1000\n      cache_max_ttl_seconds: {ceiling}\n      negative_cache_seconds: {negative}\n"
        ),
        ..Options::default()
    })
    .await;
    (gw, as_)
}

const BASIC: &str = "      client_secret: s3cr3t:&=\n";

fn active(gw: &Gateway, scope: &str, patient: Option<&str>) -> Value {
    let mut a = json!({"active": true, "scope": scope, "client_id": "opaque-app", "sub": "u7",
        "exp": now() + 600, "iss": gw.issuer.issuer, "aud": gw.base});
    if let Some(p) = patient {
        a["patient"] = json!(p);
    }
    a
}

async fn get(gw: &Gateway, rel: &str, token: &str) -> (u16, String, String) {
    let r = gw
        .client
        .get(format!("{}/{rel}", gw.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let www = r
        .headers()
        .get("www-authenticate")
        .or_else(|| r.headers().get("retry-after"))
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), www, r.text().await.unwrap())
}

/// `token`, which the endpoint would call active, is refused (401
/// `invalid_token`, the body saying `says`) for `GET Patient/{case}`
/// without a call, and nothing reaches the upstream.
async fn refused_without_a_call(gw: &Gateway, as_: &As, case: &str, token: &str, says: &str) {
    as_.answers
        .lock()
        .unwrap()
        .insert(token.to_string(), active(gw, "user/*.rs", None));
    let calls = as_.calls.load(Ordering::SeqCst);
    let (s, www, body) = get(gw, &format!("Patient/{case}"), token).await;
    assert_eq!(s, 401, "{case}: {body}");
    assert!(www.contains("invalid_token"), "{case}: {www}");
    assert!(body.contains(says), "{case}: {body}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), calls, "{case}: a call");
    assert_eq!(gw.upstream.count_containing(case), 0, "{case}");
}

/// `GET Patient/p1` once with each of `tokens`, all at once, from client
/// address `from` (forwarded by the trusted proxy): the statuses, in order.
async fn burst(gw: &Gateway, from: &str, tokens: impl Iterator<Item = String>) -> Vec<u16> {
    let sent: Vec<_> = tokens
        .map(|token| {
            let r = gw
                .client
                .get(format!("{}/Patient/p1", gw.base))
                .bearer_auth(token)
                .header("x-forwarded-for", from)
                .send();
            tokio::spawn(async move { r.await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in sent {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// `GET {rel}` with `token` as a task of its own: the status answered.
fn spawn_get(gw: &Gateway, rel: &str, token: String) -> tokio::task::JoinHandle<u16> {
    let (client, url) = (gw.client.clone(), format!("{}/{rel}", gw.base));
    tokio::spawn(async move {
        client
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_and_cached() {
    let (gw, as_) = start(BASIC, 1, 2).await;
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-good".into(), active(&gw, "user/*.rs", None));

    let (s, _, body) = get(&gw, "Patient/p1", "opaque-good").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), 1);
    // client_secret_basic: both parts form-encoded, then Basic.
    let (auth, form) = as_.last_auth.lock().unwrap().clone().unwrap();
    use base64::Engine;
    let creds = base64::engine::general_purpose::STANDARD
        .decode(auth.unwrap().trim_start_matches("Basic "))
        .unwrap();
    assert_eq!(
        String::from_utf8(creds).unwrap(),
        "fhirwall-gw:s3cr3t%3A%26%3D"
    );
    assert_eq!(form["token"], "opaque-good");
    assert_eq!(form["token_type_hint"], "access_token");
    assert!(!form.contains_key("client_secret"));

    // Cached: no second call.
    let (s, _, _) = get(&gw, "Patient/p1", "opaque-good").await;
    assert_eq!(s, 200);
    assert_eq!(as_.calls.load(Ordering::SeqCst), 1);

    // Revoked: within the 1 s ceiling the cached answer stands; after it, 401.
    as_.answers.lock().unwrap().remove("opaque-good");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (s, www, _) = get(&gw, "Patient/revoked-1", "opaque-good").await;
    assert_eq!(s, 401);
    assert!(
        www.contains("error=\"invalid_token\"") && www.contains("not active"),
        "{www}"
    );
    assert_eq!(gw.upstream.count_containing("revoked-1"), 0);

    // Inactive answers are cached for the negative TTL.
    let calls = as_.calls.load(Ordering::SeqCst);
    let (s, _, _) = get(&gw, "Patient/inactive-1", "opaque-good").await;
    assert_eq!(s, 401);
    assert_eq!(
        as_.calls.load(Ordering::SeqCst),
        calls,
        "negative answer not cached"
    );

    // Unknown opaque token: inactive, 401, nothing upstream.
    let (s, _, _) = get(&gw, "Patient/unknown-opaque-1", "never-issued").await;
    assert_eq!(s, 401);
    assert_eq!(gw.upstream.count_containing("unknown-opaque-1"), 0);

    // An opaque token may have two dots: it is no JWT (its first part is
    // no JOSE header), so it is introspected too.
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque.with.dots".into(), active(&gw, "user/*.rs", None));
    let calls = as_.calls.load(Ordering::SeqCst);
    let (s, _, body) = get(&gw, "Patient/p1", "opaque.with.dots").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), calls + 1);
    // A JWT is not: `alg: none` is refused without a call.
    let none =
        fhirwall::sandbox::keys::raw_token(&json!({"alg": "none"}), &gw.claims("user/*.rs"), b"x");
    let (s, www, _) = get(&gw, "Patient/none-jwt-1", &none).await;
    assert_eq!(s, 401, "{www}");
    assert_eq!(
        as_.calls.load(Ordering::SeqCst),
        calls + 1,
        "a JWT was introspected"
    );
    assert_eq!(gw.upstream.count_containing("none-jwt-1"), 0);

    // An answer that is no object with a boolean `active` is a failing
    // endpoint (503, asked again next time), not an inactive token.
    for (token, answer) in [
        ("odd-array", json!([])),
        ("odd-string", json!("ok")),
        ("odd-error", json!({"error": "invalid_client"})),
        ("odd-active", json!({"active": "true"})),
    ] {
        as_.answers.lock().unwrap().insert(token.into(), answer);
        for _ in 0..2 {
            let calls = as_.calls.load(Ordering::SeqCst);
            let (s, retry, body) = get(&gw, &format!("Patient/{token}-1"), token).await;
            assert_eq!(s, 503, "{token}: {body}");
            assert!(!retry.is_empty(), "{token}: a Retry-After");
            assert_eq!(as_.calls.load(Ordering::SeqCst), calls + 1, "{token}");
        }
        assert_eq!(gw.upstream.count_containing(token), 0, "{token}");
    }

    // The audit knows the token kind; never the token.
    let audit = gw.audit_containing("\"token_kind\":\"opaque\"");
    assert!(audit.contains("\"token_kind\":\"opaque\""), "{audit}");
    assert!(!audit.contains("opaque-good"));
    // Metrics count the calls.
    let m = gw.metrics().await;
    assert!(
        m.contains("fhirwall_introspections_total{issuer=\"test\",result=\"success\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_call_and_outages_fail_closed() {
    let (gw, as_) = start(BASIC, 60, 2).await;
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-shared".into(), active(&gw, "user/*.rs", None));
    as_.delay_ms.store(300, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(spawn_get(&gw, "Patient/p1", "opaque-shared".into()));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(as_.calls.load(Ordering::SeqCst), 1, "single-flight");
    as_.delay_ms.store(0, Ordering::SeqCst);

    // The endpoint goes down: the cached token keeps working, a new one
    // gets 503 with Retry-After, never an allow.
    as_.down.store(true, Ordering::SeqCst);
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-new".into(), active(&gw, "user/*.rs", None));
    let (s, _, _) = get(&gw, "Patient/p1", "opaque-shared").await;
    assert_eq!(s, 200);
    let r = gw
        .client
        .get(format!("{}/Patient/outage-1", gw.base))
        .bearer_auth("opaque-new")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(gw.upstream.count_containing("outage-1"), 0);
    // Slow beyond the timeout: the same.
    as_.down.store(false, Ordering::SeqCst);
    as_.delay_ms.store(1500, Ordering::SeqCst);
    let (s, _, _) = get(&gw, "Patient/slow-as-1", "opaque-new").await;
    assert_eq!(s, 503);
    // Back: the token works (the failure was not cached).
    as_.delay_ms.store(0, Ordering::SeqCst);
    let (s, _, _) = get(&gw, "Patient/p1", "opaque-new").await;
    assert_eq!(s, 200);
    // An answer larger than fhirwall reads (256 KiB) is no answer: 503.
    let mut huge = active(&gw, "user/*.rs", None);
    huge["padding"] = json!("x".repeat(300 * 1024));
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-huge".into(), huge);
    let (s, _, body) = get(&gw, "Patient/huge-answer-1", "opaque-huge").await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(gw.upstream.count_containing("huge-answer-1"), 0);
}

/// However many addresses send them, at most
/// `introspection.max_concurrent_calls` introspections are in flight: a
/// token not cached that would make one more gets 503 at once, without a
/// call, and it costs its address none of its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_bounded_per_issuer() {
    let (gw, as_) = start(
        &format!(
            "{BASIC}      max_concurrent_calls: 2\n      max_inactive_per_source_per_minute: 6\n"
        ),
        60,
        2,
    )
    .await;
    for i in 0..6 {
        as_.answers
            .lock()
            .unwrap()
            .insert(format!("opaque-busy-{i}"), active(&gw, "user/*.rs", None));
    }
    as_.delay_ms.store(800, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..2 {
        tasks.push(spawn_get(&gw, "Patient/p1", format!("opaque-busy-{i}")));
    }
    // Both calls in flight: a third token is refused without a call.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while as_.calls.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the calls never began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // (All at once: each waits 250 ms for a call to end, well within the
    // 800 ms the two take.)
    let refused: Vec<_> = (2..6)
        .map(|i| {
            let (client, url) = (gw.client.clone(), format!("{}/Patient/busy-{i}", gw.base));
            tokio::spawn(async move {
                let r = client
                    .get(url)
                    .bearer_auth(format!("opaque-busy-{i}"))
                    .send()
                    .await
                    .unwrap();
                let retry = r.headers().contains_key("retry-after");
                (r.status().as_u16(), retry, r.text().await.unwrap())
            })
        })
        .collect();
    for t in refused {
        let (status, retry, body) = t.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(retry);
        assert!(body.contains("max_concurrent_calls: 2"), "{body}");
    }
    assert_eq!(as_.calls.load(Ordering::SeqCst), 2, "no call was made");
    assert_eq!(gw.upstream.count_containing("busy-"), 0);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // Once they are answered, the next token is introspected: the four
    // refusals spent none of the address's budget of 6.
    as_.delay_ms.store(0, Ordering::SeqCst);
    let (s, _, body) = get(&gw, "Patient/p1", "opaque-busy-5").await;
    assert_eq!(s, 200, "{body}");
    // A burst just over the bound, of quick calls: the one over waits for
    // one to end (at most 250 ms) and is served.
    as_.delay_ms.store(100, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let token = format!("opaque-burst-{i}");
        as_.answers
            .lock()
            .unwrap()
            .insert(token.clone(), active(&gw, "user/*.rs", None));
        tasks.push(spawn_get(&gw, "Patient/p1", token));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // The address's budget of 6 is whole: six inactive tokens are each
    // asked about (401), the seventh is not (429). (Had the refusals while
    // busy spent it, fewer would be.)
    as_.delay_ms.store(0, Ordering::SeqCst);
    for i in 0..7 {
        let (s, _, body) = get(&gw, "Patient/p1", &format!("opaque-made-up-{i}")).await;
        assert_eq!(s, if i < 6 { 401 } else { 429 }, "{i}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspected_claims_drive_scopes_and_patient_context() {
    let (gw, as_) = start(
        "      auth_method: client_secret_post\n      client_secret: post-secret\n",
        60,
        2,
    )
    .await;
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-p1".into(), active(&gw, "patient/*.rs", Some("p1")));
    let (s, _, _) = get(&gw, "Observation/obs-p1-0", "opaque-p1").await;
    assert_eq!(s, 200);
    let (auth, form) = as_.last_auth.lock().unwrap().clone().unwrap();
    assert_eq!(auth, None, "client_secret_post sends no Authorization");
    assert_eq!(form["client_id"], "fhirwall-gw");
    assert_eq!(form["client_secret"], "post-secret");
    let (s, _, body) = get(&gw, "Observation/obs-p2-0", "opaque-p1").await;
    assert_eq!(s, 404, "{body}");
    let (s, _, _) = get(&gw, "Patient/p2", "opaque-p1").await;
    assert_eq!(s, 403);
    // An answer for another audience is refused.
    let mut other = active(&gw, "user/*.rs", None);
    other["aud"] = json!("https://elsewhere.example/fhir");
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-aud".into(), other);
    let (s, www, _) = get(&gw, "Patient/aud-1", "opaque-aud").await;
    assert_eq!(s, 401, "{www}");
    assert_eq!(gw.upstream.count_containing("aud-1"), 0);
}

/// Starts a gateway whose issuer introspects with `yaml`'s client
/// authentication, has an opaque `token` introspected (answered active)
/// and returns the client assertion fhirwall sent with the call.
async fn client_assertion(yaml: &str, token: &str) -> String {
    let (gw, as_) = start(yaml, 60, 2).await;
    as_.answers
        .lock()
        .unwrap()
        .insert(token.into(), active(&gw, "user/*.rs", None));
    let (s, _, _) = get(&gw, "Patient/p1", token).await;
    assert_eq!(s, 200);
    let (_, form) = as_.last_auth.lock().unwrap().clone().unwrap();
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    form["client_assertion"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_client_authentication() {
    let dir = support::TempDir::new("pkjwt");
    let key = rcgen::KeyPair::generate().unwrap();
    let key_file = dir.0.join("client.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let yaml = format!(
        "      auth_method: private_key_jwt\n      private_key_file: {}\n      private_key_alg: ES256\n",
        key_file.display()
    );
    let assertion = client_assertion(&yaml, "opaque-pk").await;
    // The assertion verifies with the client's public key and names the client.
    let decoding = jsonwebtoken::DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(&assertion, &decoding, &v).unwrap();
    assert_eq!(data.claims["iss"], "fhirwall-gw");
    assert_eq!(data.claims["sub"], "fhirwall-gw");
    assert!(data.claims["aud"]
        .as_str()
        .unwrap()
        .ends_with("/introspect"));
    assert!(data.header.kid.is_none());

    // A server that holds several keys of the client, or wants its issuer
    // as the audience: both configurable.
    let yaml = format!(
        "{yaml}      private_key_id: client-key-2\n      assertion_audience: https://as.example/realms/h\n"
    );
    let assertion = client_assertion(&yaml, "opaque-pk2").await;
    let data = jsonwebtoken::decode::<Value>(&assertion, &decoding, &v).unwrap();
    assert_eq!(data.header.kid.as_deref(), Some("client-key-2"));
    assert_eq!(data.claims["aud"], "https://as.example/realms/h");
    // With another method they would mean nothing: a configuration error.
    let dir2 = support::TempDir::new("pkjwt-check");
    let config = dir2.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: a\n    issuer: https://a.example\n    audiences: [x]\n    introspection:\n      endpoint: https://a.example/introspect\n      client_id: gw\n      client_secret: s\n      private_key_id: k\n\
         admin:\n  listen: 127.0.0.1:3\n",
    )
    .unwrap();
    let (ok, out) = support::check(&config);
    assert!(
        !ok && out.contains("private_key_id") && out.contains("only used with"),
        "{out}"
    );
}

#[test]
fn several_introspecting_issuers_must_choose_who_takes_opaque_tokens() {
    let dir = support::TempDir::new("introspect-check");
    let config = dir.0.join("config.yaml");
    let issuer = |name: &str, extra: &str| {
        format!(
            "  - name: {name}\n    issuer: https://{name}.example\n    audiences: [x]\n    introspection:\n      endpoint: https://{name}.example/introspect\n      client_id: gw\n      client_secret: s\n{extra}"
        )
    };
    let write = |issuers: String| {
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\nissuers:\n{issuers}admin:\n  listen: 127.0.0.1:3\n"
            ),
        )
        .unwrap();
        support::check(&config)
    };
    let (ok, out) = write(format!("{}{}", issuer("a", ""), issuer("b", "")));
    assert!(!ok && out.contains("opaque_tokens"), "{out}");
    let (ok, out) = write(format!(
        "{}{}",
        issuer("a", "      opaque_tokens: true\n"),
        issuer("b", "")
    ));
    assert!(ok, "{out}");
    let (ok, out) = write(format!(
        "{}{}",
        issuer("a", "      opaque_tokens: true\n"),
        issuer("b", "      opaque_tokens: true\n")
    ));
    assert!(!ok && out.contains("more than one"), "{out}");
    // Plain http to a non-loopback endpoint is refused.
    let (ok, out) = write(issuer("a", "").replace(
        "https://a.example/introspect",
        "http://a.example/introspect",
    ));
    assert!(!ok && out.contains("not an https URL"), "{out}");
}

/// A JWT of an introspected issuer that binds itself (`cnf`) keeps that
/// binding whatever the answer says: an answer that leaves it out (or
/// names another key) does not make a stolen bound token a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introspected_jwt_keeps_its_own_binding() {
    let (gw, as_) = start(BASIC, 60, 2).await;
    let jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
    // A fresh bound token per case: an answer is cached by token.
    let bound = |case: &str| {
        let mut claims = gw.claims("user/*.rs");
        claims["cnf"] = json!({"jkt": jkt});
        claims["jti"] = json!(case);
        gw.issuer.signing_key().sign(&claims)
    };
    let plain = gw.issuer.signing_key().sign(&gw.claims("user/*.rs"));
    for (answer_cnf, case, refusal) in [
        (None, "bound-no-cnf-1", "does not confirm"),
        (
            Some(json!({"jkt": "another-key"})),
            "bound-other-cnf-1",
            "does not confirm",
        ),
        (
            Some(json!({"x5t#S256": "a-certificate"})),
            "bound-cert-cnf-1",
            "does not confirm",
        ),
        // Confirmed: the binding holds, so as Bearer it is refused by bind.
        (
            Some(json!({"jkt": jkt})),
            "bound-same-cnf-1",
            "present it with the DPoP scheme",
        ),
    ] {
        let token = bound(case);
        let mut answer = active(&gw, "user/*.rs", None);
        if let Some(c) = answer_cnf {
            answer["cnf"] = c;
        }
        as_.answers.lock().unwrap().insert(token.clone(), answer);
        let calls = as_.calls.load(Ordering::SeqCst);
        let (s, www, body) = get(&gw, &format!("Patient/{case}"), &token).await;
        assert_eq!(
            as_.calls.load(Ordering::SeqCst),
            calls + 1,
            "{case}: introspected"
        );
        assert_eq!(s, 401, "{case}: {body}");
        assert!(www.contains("invalid_token"), "{case}: {www}");
        assert!(body.contains(refusal), "{case}: {body}");
        assert_eq!(gw.upstream.count_containing(case), 0, "{case}");
    }
    // An expired JWT is refused without a call.
    let calls = as_.calls.load(Ordering::SeqCst);
    let mut old = gw.claims("user/*.rs");
    old["exp"] = json!(now() - 120);
    old["iat"] = json!(now() - 720);
    let expired = gw.issuer.signing_key().sign(&old);
    as_.answers
        .lock()
        .unwrap()
        .insert(expired.clone(), active(&gw, "user/*.rs", None));
    let (s, www, _) = get(&gw, "Patient/expired-jwt-1", &expired).await;
    assert_eq!(s, 401, "{www}");
    assert!(www.contains("expired"), "{www}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), calls);
    // A JWT whose own audience is another resource server is refused
    // without a call, whatever the answer would say.
    let calls = as_.calls.load(Ordering::SeqCst);
    let mut elsewhere = gw.claims("user/*.rs");
    elsewhere["aud"] = json!(["https://billing.example"]);
    let elsewhere = gw.issuer.signing_key().sign(&elsewhere);
    as_.answers
        .lock()
        .unwrap()
        .insert(elsewhere.clone(), active(&gw, "user/*.rs", None));
    let (s, www, body) = get(&gw, "Patient/aud-elsewhere-1", &elsewhere).await;
    assert_eq!(s, 401, "{body}");
    assert!(www.contains("invalid_token"), "{www}");
    assert!(body.contains("audience"), "{body}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), calls);
    assert_eq!(gw.upstream.count_containing("aud-elsewhere"), 0);
    // The same bound JWT with a dot more or less is no opaque token: an
    // authorization server that reads it leniently would answer for the
    // JWT inside (the endpoint here answers for the very string), past
    // the binding floor. Refused without a call.
    let token = bound("misspelt-1");
    let (h, rest) = token.split_once('.').unwrap();
    let (p, _) = rest.split_once('.').unwrap();
    for (case, misspelt) in [
        ("trailing-dot-1", format!("{token}.")),
        ("leading-dot-1", format!(".{token}")),
        ("no-signature-1", format!("{h}.{p}")),
    ] {
        refused_without_a_call(&gw, &as_, case, &misspelt, "JWS compact").await;
    }
    // An unbound JWT with an unbound answer is a bearer token, as before.
    as_.answers
        .lock()
        .unwrap()
        .insert(plain.clone(), active(&gw, "user/*.rs", None));
    let (s, _, body) = get(&gw, "Patient/p1", &plain).await;
    assert_eq!(s, 200, "{body}");
}

/// A JWT of an introspecting issuer is held to the issuer's
/// `require_at_jwt_typ` as a verified one is: refused before any call.
/// Its `algorithms` (what fhirwall verifies with keys) do not apply: a
/// PS256 token with the right typ is introspected and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introspected_jwt_is_held_to_its_issuers_typ() {
    use jsonwebtoken::{Algorithm, Header};
    let (as_, endpoint) = spawn_as().await;
    let gw = Gateway::start(Options {
        issuer_yaml: format!(
            "    require_at_jwt_typ: true\n    introspection:\n      endpoint: {endpoint}\n      client_id: fhirwall-gw\n{BASIC}"
        ),
        ..Options::default()
    })
    .await;
    let key = gw.issuer.signing_key();
    let header = |alg: Algorithm, typ: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(key.kid.clone());
        h.typ = Some(typ.into());
        h
    };
    for (case, header, says) in [
        ("typ-jwt-1", header(Algorithm::RS256, "JWT"), "typ 'jwt'"),
        (
            "no-typ-1",
            Header {
                typ: None,
                ..header(Algorithm::RS256, "")
            },
            "typ '(none)'",
        ),
    ] {
        let mut claims = gw.claims("user/*.rs");
        claims["jti"] = json!(case);
        let token = key.sign_with_header(&header, &claims);
        refused_without_a_call(&gw, &as_, case, &token, says).await;
    }
    let fits = key.sign_with_header(&header(Algorithm::PS256, "at+jwt"), &gw.claims("user/*.rs"));
    as_.answers
        .lock()
        .unwrap()
        .insert(fits.clone(), active(&gw, "user/*.rs", None));
    let calls = as_.calls.load(Ordering::SeqCst);
    let (s, _, body) = get(&gw, "Patient/p1", &fits).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), calls + 1);
}

/// Made-up tokens cannot drive the authorization server's load: past
/// `max_inactive_per_source_per_minute` inactive answers, an address's
/// tokens that are not cached are refused (429) without a call, while its
/// cached tokens and other addresses go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_sending_inactive_tokens_stops_being_introspected() {
    let (as_, endpoint) = spawn_as().await;
    let gw = Gateway::start(Options {
        issuer_yaml: format!(
            "    introspection:\n      endpoint: {endpoint}\n      client_id: fhirwall-gw\n{BASIC}      max_inactive_per_source_per_minute: 5\n"
        ),
        server_yaml: "  trusted_proxies: [127.0.0.1/32]\n".into(),
        ..Options::default()
    })
    .await;
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-known".into(), active(&gw, "user/*.rs", None));
    let from = |who: &'static str, token: String, rel: &'static str| {
        gw.client
            .get(format!("{}/{rel}", gw.base))
            .bearer_auth(token)
            .header("x-forwarded-for", who)
            .send()
    };
    let r = from("10.0.0.1", "opaque-known".into(), "Patient/p1")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for i in 0..5 {
        let r = from("10.0.0.1", format!("made-up-{i}"), "Patient/p1")
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{i}");
    }
    assert_eq!(as_.calls.load(Ordering::SeqCst), 6);
    // The sixth made-up token: no call, 429 with a wait.
    let r = from("10.0.0.1", "made-up-5".into(), "Patient/throttled-1")
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait = support::retry_after(&r);
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(as_.calls.load(Ordering::SeqCst), 6);
    assert_eq!(gw.upstream.count_containing("throttled-1"), 0);
    // Recorded as the validate stage's throttle, not a policy's rate limit.
    let rec = gw.audit_for(r.headers()["x-request-id"].to_str().unwrap());
    assert_eq!(rec["reason"], "introspection_throttled", "{rec}");
    assert_eq!(rec["stage"], "validate", "{rec}");
    // Its cached token still works; another address is introspected.
    let r = from("10.0.0.1", "opaque-known".into(), "Patient/p1")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = from("10.0.0.2", "made-up-6".into(), "Patient/p1")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(as_.calls.load(Ordering::SeqCst), 7);
    // A burst of concurrent made-up tokens from one address: the budget is
    // taken before each call, so no more calls than it allows are made.
    as_.delay_ms.store(200, Ordering::SeqCst);
    let statuses = burst(&gw, "10.0.0.3", (0..20).map(|i| format!("burst-{i}"))).await;
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(as_.calls.load(Ordering::SeqCst), 12);
    // A burst on one token (a dashboard whose token just expired): one
    // call, paid once, not once by each request waiting for its answer.
    let statuses = burst(
        &gw,
        "10.0.0.5",
        (0..10).map(|_| "expired-for-all".to_string()),
    )
    .await;
    assert_eq!(statuses, [401; 10]);
    assert_eq!(as_.calls.load(Ordering::SeqCst), 13);
    as_.delay_ms.store(0, Ordering::SeqCst);
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = from("10.0.0.5", format!("after-burst-{i}"), "Patient/p1")
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 429]);
    assert_eq!(as_.calls.load(Ordering::SeqCst), 17);
    // An endpoint that fails (throttled, overloaded by the flood itself):
    // failed calls count too, else made-up tokens would each be a call.
    as_.delay_ms.store(0, Ordering::SeqCst);
    as_.down.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = from("10.0.0.4", format!("while-down-{i}"), "Patient/p1")
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [503, 503, 503, 503, 503, 429, 429, 429]);
    assert_eq!(as_.calls.load(Ordering::SeqCst), 22);
}

/// An introspected token's `exp` is judged as a JWT's: with the issuer's
/// leeway, and a refusal names the real expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspected_expiry_honours_the_leeway() {
    let (as_, endpoint) = spawn_as().await;
    let gw = Gateway::start(Options {
        issuer_yaml: format!(
            "    introspection:\n      endpoint: {endpoint}\n      client_id: fhirwall-gw\n{BASIC}"
        ),
        leeway_seconds: 30,
        ..Options::default()
    })
    .await;
    let (just, long) = (now() - 5, now() - 120);
    for (token, exp) in [("just-expired", just), ("long-expired", long)] {
        let mut a = active(&gw, "user/*.rs", None);
        a["exp"] = json!(exp);
        as_.answers.lock().unwrap().insert(token.into(), a);
    }
    let (s, _, body) = get(&gw, "Patient/p1", "just-expired").await;
    assert_eq!(s, 200, "{body}");
    let (s, www, body) = get(&gw, "Patient/p1", "long-expired").await;
    assert_eq!(s, 401, "{body}");
    assert!(body.contains(&format!("expired at {long}")), "{www} {body}");
}

/// An endpoint's query may hold a key (`?subscription-key=`): a failed
/// call is logged with the issuer, never with the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_logged_without_the_endpoints_query() {
    let (as_, endpoint) = spawn_as().await;
    let gw = Gateway::start(Options {
        issuer_yaml: format!(
            "    introspection:\n      endpoint: {endpoint}?subscription-key=KEY-IN-QUERY\n      client_id: fhirwall-gw\n{BASIC}      timeout_ms: 300\n"
        ),
        ..Options::default()
    })
    .await;
    as_.answers
        .lock()
        .unwrap()
        .insert("opaque-slow".into(), active(&gw, "user/*.rs", None));
    as_.delay_ms.store(1000, Ordering::SeqCst);
    let (s, _, _) = get(&gw, "Patient/slow-call-1", "opaque-slow").await;
    assert_eq!(s, 503);
    assert_eq!(gw.upstream.count_containing("slow-call-1"), 0);
    let log = gw.stderr_containing("introspection call failed").await;
    assert!(log.contains("timed out"), "the cause is logged: {log}");
    assert!(!log.contains("KEY-IN-QUERY"), "{log}");
}
