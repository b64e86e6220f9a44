//! DPoP (RFC 9449) through the real binary: proofs made here with EC and
//! RSA keys, every failure refused with 401 and a `DPoP` challenge, and the
//! upstream never seeing a refused request.

mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fhirwall::sandbox::keys::{hs256_token, raw_token, KeyKind};
use serde_json::{json, Value};
use support::dpop::{b64sha, bound_token, client_token, now, send, user_token, Client};
use support::{Gateway, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_proofs_pass_once() {
    let gw = Gateway::start(Options::default()).await;
    for (kind, kid) in [
        (KeyKind::P256, "ec-client"),
        (KeyKind::Rsa2048, "rsa-client"),
    ] {
        let client = Client::new(kind, kid);
        let token = bound_token(&gw, &client.jkt);
        let url = format!("{}/Patient/p1", gw.base);
        let proof = client.proof("GET", &url, &token);
        let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
        assert_eq!(s, 200, "{kid}: {www} {body}");
        // Neither the token nor its proof goes upstream.
        let sent = gw.upstream.seen().pop().unwrap();
        assert!(
            !sent
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("dpop")
                    || n.eq_ignore_ascii_case("authorization")),
            "{:?}",
            sent.headers
        );
        // The same proof again: a replay.
        let before = gw.upstream.seen().len();
        let (s, www, _) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
        assert_eq!(s, 401, "{kid}");
        assert!(
            www.starts_with("DPoP ") && www.contains("error=\"invalid_dpop_proof\""),
            "{www}"
        );
        assert!(
            www.contains("already used") && www.contains("algs=\""),
            "{www}"
        );
        assert_eq!(
            gw.upstream.seen().len(),
            before,
            "a replay reached the upstream"
        );
        // A fresh proof passes again.
        let proof = client.proof("GET", &url, &token);
        let (s, _, _) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
        assert_eq!(s, 200, "{kid}");
    }
    // The audit records the binding.
    let audit = gw.audit_containing("\"binding\":\"dpop\"");
    assert!(audit.contains("\"binding\":\"dpop\""), "{audit}");
}

/// The replay set is bounded: once it holds `replay_cache_max_entries`
/// fresh proofs, new proofs are refused (503, nothing upstream) rather than
/// remembered unreliably; proofs it holds are still refused as replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replay_set_refuses_new_proofs() {
    let gw = Gateway::start(Options {
        // One key may fill it here (by default a key gets a tenth).
        extra_yaml: "dpop:\n  replay_cache_max_entries: 1000\n  max_proofs_per_key: 1000\n".into(),
        ..Options::default()
    })
    .await;
    let client = Client::new(KeyKind::P256, "busy-client");
    let token = bound_token(&gw, &client.jkt);
    let url = format!("{}/Patient/p1", gw.base);
    let first = client.proof("GET", &url, &token);
    let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&first]).await;
    assert_eq!(s, 200, "{www} {body}");
    let mut accepted = 1;
    let mut refused = None;
    // Two clients take turns, each well inside its quota. Pending inserts
    // are counted a little late: a few may pass the bound.
    let second = Client::new(KeyKind::P256, "busy-client-2");
    let second_token = client_token(&gw, &second.jkt, "second-app");
    for i in 0..1100 {
        let (c, t) = if i % 2 == 0 {
            (&client, &token)
        } else {
            (&second, &second_token)
        };
        let proof = c.proof("GET", &url, t);
        let (s, www, body) = send(&gw, "Patient/p1", "DPoP", t, &[&proof]).await;
        match s {
            200 => accepted += 1,
            503 => {
                refused = Some(body);
                break;
            }
            _ => panic!("{s} {www} {body}"),
        }
    }
    let body = refused.expect("the replay set never filled");
    assert!(accepted >= 1000, "refused after {accepted} proofs");
    assert!(body.contains("too many DPoP proofs"), "{body}");
    let before = gw.upstream.seen().len();
    let (s, _, _) = send(
        &gw,
        "Patient/p1",
        "DPoP",
        &token,
        &[&client.proof("GET", &url, &token)],
    )
    .await;
    assert_eq!(s, 503);
    let (s, _, _) = send(&gw, "Patient/p1", "DPoP", &token, &[&first]).await;
    assert!(s == 401 || s == 503, "a remembered proof passed again: {s}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
    let audit = gw.audit_containing("\"reason\":\"dpop_replay_cache_full\"");
    assert!(
        audit.contains("\"reason\":\"dpop_replay_cache_full\""),
        "not audited"
    );
}

/// One client may have only `max_proofs_per_key` proofs remembered per
/// window, however many keys it binds its tokens to: a busy or hostile
/// client is slowed (429), and other clients' proofs still find room in
/// the replay set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_fill_the_replay_set_for_all() {
    let gw = Gateway::start(Options {
        extra_yaml: "dpop:\n  replay_cache_max_entries: 1000\n  max_proofs_per_key: 50\n".into(),
        ..Options::default()
    })
    .await;
    let url = format!("{}/Patient/p1", gw.base);
    // The busy client's proofs, spread over two keys of two users (each
    // well inside a user's quota).
    let keys = [
        Client::new(KeyKind::P256, "busy-key-1"),
        Client::new(KeyKind::P256, "busy-key-2"),
    ];
    let users = ["user-1", "user-2"];
    let tokens = [0, 1].map(|i| user_token(&gw, &keys[i].jkt, "busy-app", users[i]));
    for i in 0..50 {
        let proof = keys[i % 2].proof("GET", &url, &tokens[i % 2]);
        let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &tokens[i % 2], &[&proof]).await;
        assert_eq!(s, 200, "proof {i}: {www} {body}");
    }
    let before = gw.upstream.seen().len();
    let fresh = Client::new(KeyKind::P256, "busy-key-3");
    let fresh_token = user_token(&gw, &fresh.jkt, "busy-app", "user-3");
    let proof = fresh.proof("GET", &url, &fresh_token);
    let r = gw
        .client
        .get(format!("{}/Patient/p1", gw.base))
        .header("authorization", format!("DPoP {fresh_token}"))
        .header("dpop", proof)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait = support::retry_after(&r);
    assert!(
        (2..=80).contains(&wait),
        "Retry-After {wait}: the window's rest"
    );
    let body = r.text().await.unwrap();
    assert!(body.contains("dpop.max_proofs_per_key"), "{body}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
    let other = Client::new(KeyKind::P256, "other-client");
    let other_token = client_token(&gw, &other.jkt, "other-app");
    let proof = other.proof("GET", &url, &other_token);
    let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &other_token, &[&proof]).await;
    assert_eq!(s, 200, "{www} {body}");
}

/// Within its client's quota, one user (`sub`) may have only
/// `max_proofs_per_user` proofs remembered per window: a user over it is
/// slowed (429) without spending the client's quota, which the client's
/// other users still have. A token whose `sub` is the client itself, or
/// with `system/` scopes only (a backend service), counts against the
/// client only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_spend_the_client_quota_for_its_other_users() {
    let gw = Gateway::start(Options {
        extra_yaml: "dpop:\n  replay_cache_max_entries: 1000\n  max_proofs_per_key: 52\n  \
                     max_proofs_per_user: 10\n"
            .into(),
        ..Options::default()
    })
    .await;
    let url = format!("{}/Patient/p1", gw.base);
    // `n` proofs of user `sub` (fresh key each), every one answered `want`;
    // the last answer. A `sub` starting `svc` holds system/ scopes only.
    let proofs = async |sub: &str, n: usize, want: u16| {
        let key = Client::new(KeyKind::P256, &format!("key-{sub}"));
        let token = if sub.starts_with("svc") {
            let mut c = gw.claims("system/*.rs");
            c["cnf"] = serde_json::json!({"jkt": key.jkt});
            c["client_id"] = serde_json::json!("shared-app");
            c["sub"] = serde_json::json!(sub);
            gw.issuer.signing_key().sign(&c)
        } else {
            user_token(&gw, &key.jkt, "shared-app", sub)
        };
        let mut last = None;
        for i in 0..n {
            let r = gw
                .client
                .get(&url)
                .header("authorization", format!("DPoP {token}"))
                .header("dpop", key.proof("GET", &url, &token))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let wait = r
                .headers()
                .contains_key("retry-after")
                .then(|| support::retry_after(&r));
            let body = r.text().await.unwrap();
            assert_eq!(s, want, "{sub}, proof {i}: {body}");
            last = Some((wait, body));
        }
        last.unwrap()
    };
    proofs("alice", 10, 200).await;
    let before = gw.upstream.seen().len();
    let (wait, body) = proofs("alice", 5, 429).await;
    assert!(body.contains("dpop.max_proofs_per_user"), "{body}");
    let wait = wait.expect("no Retry-After");
    assert!((2..=80).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
    // Alice's refused proofs took nothing from the client's 52.
    proofs("bob", 10, 200).await;
    proofs("carol", 8, 200).await;
    // The app itself as the user, or a backend service (system/ scopes)
    // whatever its sub: the client's quota only.
    proofs("shared-app", 12, 200).await;
    proofs("svc-batch", 12, 200).await;
    let before = gw.upstream.seen().len();
    let (_, body) = proofs("dave", 1, 429).await;
    assert!(body.contains("dpop.max_proofs_per_key"), "{body}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_proof_is_refused_before_the_upstream() {
    let gw = Gateway::start(Options::default()).await;
    for (kind, kid, other_kid) in [
        (KeyKind::P256, "ec-client", "ec-other"),
        (KeyKind::Rsa2048, "rsa-client", "rsa-other"),
    ] {
        bad_proofs(&gw, Client::new(kind, kid), Client::new(kind, other_kid)).await;
    }
}

/// Every failure case with `client`'s key kind (`other` is a second key).
async fn bad_proofs(gw: &Gateway, client: Client, other: Client) {
    let token = bound_token(gw, &client.jkt);
    let port = gw.proxy_addr().port();

    // Each case requests Patient/<id>; the upstream must never see <id>.

    let url = |id: &str| format!("{}/Patient/{id}", gw.base);
    let sign = |claims: Value| client.key.sign_json(&client.header(), &claims);
    let claims = |id: &str| client.claims("GET", &url(id), &token);
    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut c = claims("dpop-htm");
    c["htm"] = json!("POST");
    cases.push(("dpop-htm", sign(c), "htm"));
    let mut c = claims("dpop-port");
    c["htu"] = json!(format!(
        "http://127.0.0.1:{}/fhir/Patient/dpop-port",
        port + 1
    ));
    cases.push(("dpop-port", sign(c), "htu"));
    let mut c = claims("dpop-scheme");
    c["htu"] = json!(format!("https://127.0.0.1:{port}/fhir/Patient/dpop-scheme"));
    cases.push(("dpop-scheme", sign(c), "htu"));
    let mut c = claims("dpop-slash");
    c["htu"] = json!(format!("{}/", url("dpop-slash")));
    cases.push(("dpop-slash", sign(c), "htu"));
    let mut c = claims("dpop-stale");
    c["iat"] = json!(now() - 120);
    cases.push(("dpop-stale", sign(c), "too old"));
    let mut c = claims("dpop-future");
    c["iat"] = json!(now() + 120);
    cases.push(("dpop-future", sign(c), "future"));
    let mut c = claims("dpop-ath");
    c["ath"] = json!(b64sha(b"another token"));
    cases.push(("dpop-ath", sign(c), "ath"));
    // Right in every claim and signed by the bound key, but padded.
    let mut c = claims("dpop-padded");
    c["pad"] = json!("A".repeat(20_000));
    cases.push(("dpop-padded", sign(c), "larger than"));
    // Signed by another key, which it names: the token is not bound to it.
    cases.push((
        "dpop-thumbprint",
        other.key.sign_json(
            &other.header(),
            &other.claims("GET", &url("dpop-thumbprint"), &token),
        ),
        "cnf.jkt",
    ));
    // Names the bound key but signed by another.
    cases.push((
        "dpop-signature",
        other.key.sign_json(
            &client.header(),
            &client.claims("GET", &url("dpop-signature"), &token),
        ),
        "signature",
    ));
    let mut private = client.header();
    private["jwk"]["d"] = json!("AAAA");
    cases.push((
        "dpop-private",
        client.key.sign_json(&private, &claims("dpop-private")),
        "private",
    ));
    let mut none = client.header();
    none["alg"] = json!("none");
    cases.push((
        "dpop-none",
        raw_token(&none, &claims("dpop-none"), b""),
        "not allowed",
    ));
    let mut hs = client.header();
    hs["alg"] = json!("HS256");
    let hs_proof = {
        let t = hs256_token("x", &claims("dpop-hs256"), client.key.public_pem.as_bytes());
        // Same signature, header replaced by a dpop+jwt one naming HS256.
        let sig = t.rsplit('.').next().unwrap().to_string();
        let body = t.split('.').nth(1).unwrap().to_string();
        format!(
            "{}.{body}.{sig}",
            URL_SAFE_NO_PAD.encode(hs.to_string().as_bytes())
        )
    };
    cases.push(("dpop-hs256", hs_proof, "not allowed"));
    let mut typ = client.header();
    typ["typ"] = json!("JWT");
    cases.push((
        "dpop-typ",
        client.key.sign_json(&typ, &claims("dpop-typ")),
        "typ",
    ));

    for (id, proof, why) in &cases {
        let (s, www, body) = send(gw, &format!("Patient/{id}"), "DPoP", &token, &[proof]).await;
        assert_eq!(s, 401, "{id}: {body}");
        assert!(www.starts_with("DPoP realm="), "{id}: {www}");
        assert!(www.contains("error=\"invalid_dpop_proof\""), "{id}: {www}");
        assert!(www.contains("algs=\""), "{id}: {www}");
        assert!(www.contains(why), "{id}: expected '{why}' in {www}");
        assert_eq!(
            gw.upstream.count_containing(id),
            0,
            "{id} reached the upstream"
        );
    }

    // Binding mismatches.
    let unbound = gw.mint("user/*.rs", None);
    let proof = client.proof("GET", &url("dpop-bearer"), &token);
    let (s, www, _) = send(gw, "Patient/dpop-bearer", "Bearer", &token, &[]).await;
    assert_eq!(s, 401);
    assert!(
        www.contains("DPoP-bound") && www.contains("error=\"invalid_token\""),
        "{www}"
    );
    let (s, www, _) = send(gw, "Patient/dpop-unbound", "DPoP", &unbound, &[&proof]).await;
    assert_eq!(s, 401);
    assert!(www.contains("not DPoP-bound"), "{www}");
    let (s, www, _) = send(gw, "Patient/dpop-extra", "Bearer", &unbound, &[&proof]).await;
    assert_eq!(s, 401);
    assert!(www.contains("not DPoP-bound"), "{www}");
    let (s, www, _) = send(gw, "Patient/dpop-noproof", "DPoP", &token, &[]).await;
    assert_eq!(s, 401);
    assert!(www.contains("needs a DPoP proof"), "{www}");
    let p2 = client.proof("GET", &url("dpop-two"), &token);
    let (s, www, _) = send(gw, "Patient/dpop-two", "DPoP", &token, &[&p2, &p2]).await;
    assert_eq!(s, 401);
    assert!(www.contains("several"), "{www}");
    for id in [
        "dpop-bearer",
        "dpop-unbound",
        "dpop-extra",
        "dpop-noproof",
        "dpop-two",
    ] {
        assert_eq!(
            gw.upstream.count_containing(id),
            0,
            "{id} reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_can_be_required_per_issuer_and_client() {
    for yaml in [
        "    require_binding: true\n",
        "    require_binding_for_clients: [other-app, test-app]\n",
    ] {
        let gw = Gateway::start(Options {
            issuer_yaml: yaml.into(),
            ..Options::default()
        })
        .await;
        let bearer = gw.mint("user/*.rs", None);
        let (s, www, _) = send(&gw, "Patient/bind-required-1", "Bearer", &bearer, &[]).await;
        assert_eq!(s, 401, "{yaml}");
        assert!(
            www.contains("error=\"invalid_token\"") && www.contains("requires sender-constrained"),
            "{yaml}: {www}"
        );
        assert_eq!(gw.upstream.count_containing("bind-required-1"), 0);
        // A DPoP-bound token with its proof passes.
        let client = Client::new(KeyKind::P256, "ec-client");
        let token = bound_token(&gw, &client.jkt);
        let proof = client.proof("GET", &format!("{}/Patient/p1", gw.base), &token);
        let (s, www, _) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
        assert_eq!(s, 200, "{yaml}: {www}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_when_required() {
    let gw = Gateway::start(Options {
        extra_yaml: "dpop:\n  require_nonce: true\n  nonce_lifetime_seconds: 60\n".into(),
        ..Options::default()
    })
    .await;
    let client = Client::new(KeyKind::P256, "ec-client");
    let token = bound_token(&gw, &client.jkt);
    let url = format!("{}/Patient/p1", gw.base);
    let request = |proof: String| {
        gw.client
            .get(&url)
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof)
            .send()
    };
    // Without a nonce: use_dpop_nonce, with the nonce to use.
    let r = request(client.proof("GET", &url, &token)).await.unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("error=\"use_dpop_nonce\""), "{www}");
    let nonce = r.headers()["dpop-nonce"].to_str().unwrap().to_string();
    // A made-up nonce: the same.
    let mut c = client.claims("GET", &url, &token);
    c["nonce"] = json!("made-up");
    let r = request(client.key.sign_json(&client.header(), &c))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // With the issued nonce: served, and a nonce comes back for next time.
    let mut c = client.claims("GET", &url, &token);
    c["nonce"] = json!(nonce);
    let r = request(client.key.sign_json(&client.header(), &c))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("dpop-nonce"));
    assert_eq!(gw.upstream.count_containing("Patient/p1"), 1);
}

/// Replicas sharing `dpop.nonce_key_file` accept each other's nonces (a
/// client's next request may reach another replica); without the shared
/// key, a nonce from one is refused by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_nonce_key_accept_each_others_nonces() {
    let dir = support::TempDir::new("nonce-key");
    let key = dir.0.join("dpop-nonce.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    let nonces = |shared: bool| Options {
        extra_yaml: format!(
            "dpop:\n  require_nonce: true\n  nonce_lifetime_seconds: 60\n{}",
            if shared {
                format!("  nonce_key_file: {}\n", key.display())
            } else {
                String::new()
            }
        ),
        ..Options::default()
    };
    let a = Gateway::start(nonces(true)).await;
    let client = Client::new(KeyKind::P256, "ec-client");
    // Replica A hands out a nonce.
    let token_a = bound_token(&a, &client.jkt);
    let url_a = format!("{}/Patient/p1", a.base);
    let r = a
        .client
        .get(&url_a)
        .header("authorization", format!("DPoP {token_a}"))
        .header("dpop", client.proof("GET", &url_a, &token_a))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let nonce = r.headers()["dpop-nonce"].to_str().unwrap().to_string();
    // Replica B takes it with the shared key, and refuses it without.
    for (shared, status) in [(true, 200), (false, 401)] {
        let b = Gateway::start(nonces(shared)).await;
        let token_b = bound_token(&b, &client.jkt);
        let url_b = format!("{}/Patient/p1", b.base);
        let mut c = client.claims("GET", &url_b, &token_b);
        c["nonce"] = json!(nonce);
        let r = b
            .client
            .get(&url_b)
            .header("authorization", format!("DPoP {token_b}"))
            .header("dpop", client.key.sign_json(&client.header(), &c))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "shared key: {shared}");
        let reached = b.upstream.count_containing("Patient/p1");
        assert_eq!(reached, usize::from(status == 200), "shared key: {shared}");
    }
}

/// A `cnf` naming a confirmation method beside the one enforced (or only
/// ones that are not) is refused: the other would be silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cnf_member_that_is_not_enforced_refuses_the_token() {
    let gw = Gateway::start(Options::default()).await;
    let client = Client::new(KeyKind::P256, "ec-client");
    for (i, extra) in [
        json!({"jwk": {"kty": "EC"}}),
        json!({"kid": "k"}),
        json!({"x5t#s256": "misspelt"}),
        json!({"jku": "https://keys.example/"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = gw.claims("user/*.rs");
        let mut cnf = json!({"jkt": client.jkt});
        for (k, v) in extra.as_object().unwrap() {
            cnf[k] = v.clone();
        }
        c["cnf"] = cnf;
        let token = gw.issuer.signing_key().sign(&c);
        let rel = format!("Patient/cnf-extra-{i}");
        let url = format!("{}/{rel}", gw.base);
        let proof = client.proof("GET", &url, &token);
        let (s, www, body) = send(&gw, &rel, "DPoP", &token, &[&proof]).await;
        assert_eq!(s, 401, "{extra}: {body}");
        // Challenged in the scheme it came with.
        assert!(
            www.starts_with("DPoP ") && www.contains("invalid_token"),
            "{extra}: {www}"
        );
        assert!(body.contains("does not enforce"), "{extra}: {body}");
    }
    // A cnf with no binding at all, in the DPoP scheme.
    let mut c = gw.claims("user/*.rs");
    c["cnf"] = json!({});
    let token = gw.issuer.signing_key().sign(&c);
    let url = format!("{}/Patient/cnf-extra-empty", gw.base);
    let proof = client.proof("GET", &url, &token);
    let (s, www, body) = send(&gw, "Patient/cnf-extra-empty", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        www.starts_with("DPoP ") && www.contains("invalid_token"),
        "{www}"
    );
    assert!(body.contains("no binding this gateway knows"), "{body}");
    assert_eq!(gw.upstream.count_containing("cnf-extra"), 0);
    // The same token with its jkt alone passes.
    let token = bound_token(&gw, &client.jkt);
    let url = format!("{}/Patient/p1", gw.base);
    let proof = client.proof("GET", &url, &token);
    let (s, _, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 200, "{body}");
}

/// With DPoP off, a DPoP-bound token is refused as a binding the gateway
/// does not support (it was told to use the DPoP scheme, which is refused
/// too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dpop_off_a_bound_token_is_refused_as_unsupported() {
    let gw = Gateway::start(Options {
        extra_yaml: "dpop:\n  enabled: false\n".into(),
        ..Options::default()
    })
    .await;
    let client = Client::new(KeyKind::P256, "ec-client");
    let token = bound_token(&gw, &client.jkt);
    let (s, www, body) = send(&gw, "Patient/dpop-off-1", "Bearer", &token, &[]).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        www.starts_with("Bearer ") && www.contains("invalid_token"),
        "{www}"
    );
    assert!(body.contains("DPoP is not enabled"), "{body}");
    assert_eq!(gw.upstream.count_containing("dpop-off"), 0);
}

/// A token naming no client (an introspection answer need not) counts its
/// proofs against its subject, not against each key its user binds a
/// token to: one user with many keys still meets one quota (429, reason
/// `dpop_quota_exceeded` at the bind stage, not a policy rate limit), and
/// other users are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_of_tokens_naming_no_client_meets_one_quota_however_many_keys() {
    let gw = Gateway::start(Options {
        extra_yaml: "dpop:\n  replay_cache_max_entries: 1000\n  max_proofs_per_key: 20\n  \
                     max_proofs_per_user: 10\n"
            .into(),
        ..Options::default()
    })
    .await;
    let url = format!("{}/Patient/p1", gw.base);
    let token_for = |key: &Client, sub: &str| {
        let mut c = gw.claims("user/*.rs");
        c["cnf"] = serde_json::json!({"jkt": key.jkt});
        c.as_object_mut().unwrap().remove("client_id");
        c["sub"] = serde_json::json!(sub);
        gw.issuer.signing_key().sign(&c)
    };
    // Four keys, five proofs each: the subject's 20.
    for k in 0..4 {
        let key = Client::new(KeyKind::P256, &format!("mallory-{k}"));
        let token = token_for(&key, "mallory");
        for i in 0..5 {
            let proof = key.proof("GET", &url, &token);
            let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
            assert_eq!(s, 200, "key {k}, proof {i}: {www} {body}");
        }
    }
    let before = gw.upstream.seen().len();
    let key = Client::new(KeyKind::P256, "mallory-5");
    let token = token_for(&key, "mallory");
    let r = gw
        .client
        .get(&url)
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", key.proof("GET", &url, &token))
        .header("x-request-id", "no-client-over-quota")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body = r.text().await.unwrap();
    assert!(body.contains("dpop.max_proofs_per_key"), "{body}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a proof over the subject's quota went upstream"
    );
    let rec = gw.audit_for("no-client-over-quota");
    assert_eq!(rec["reason"], "dpop_quota_exceeded", "{rec}");
    assert_eq!(rec["stage"], "bind", "{rec}");
    // Another user of tokens naming no client has a quota of its own.
    let key = Client::new(KeyKind::P256, "trudy");
    let token = token_for(&key, "trudy");
    let proof = key.proof("GET", &url, &token);
    let (s, www, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 200, "{www} {body}");
}

/// A request made with the `DPoP` scheme is challenged with `DPoP` (RFC
/// 9449 §7.1) whatever it is refused for: a scope that does not cover it
/// (403), a token that is no b64token (401). A `Bearer` challenge would
/// name a scheme its bound token is refused under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_dpop_requests_are_dpop_challenges() {
    let gw = Gateway::start(Options::default()).await;
    let client = Client::new(KeyKind::P256, "ec-client");
    let mut claims = gw.claims("user/Patient.rs");
    claims["cnf"] = json!({"jkt": client.jkt});
    let token = gw.issuer.signing_key().sign(&claims);
    let url = format!("{}/Observation/obs-p1-0", gw.base);
    let proof = client.proof("GET", &url, &token);
    let (s, www, body) = send(&gw, "Observation/obs-p1-0", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 403, "{body}");
    assert!(
        www.starts_with(&format!(
            "DPoP realm=\"{}\", error=\"insufficient_scope\"",
            gw.base
        )) && www.contains("algs=\""),
        "{www}"
    );
    let (s, www, _) = send(&gw, "Patient/p1", "DPoP", "abc!def", &[&proof]).await;
    assert_eq!(s, 401);
    assert!(
        www.starts_with("DPoP realm=") && www.contains("algs=\""),
        "{www}"
    );
    // The same refusals of a Bearer request stay Bearer.
    let bearer = gw.mint("user/Patient.rs", None);
    let (s, www, _) = send(&gw, "Observation/obs-p1-0", "Bearer", &bearer, &[]).await;
    assert_eq!(s, 403);
    assert!(www.starts_with("Bearer realm="), "{www}");
    assert_eq!(gw.upstream.count_containing("obs-p1-0"), 0);
}
