//! End-to-end tests: the real `fhirwall` binary on loopback, a sandbox FHIR
//! upstream and a sandbox issuer in this process. Every refusal is checked
//! for its status, its `WWW-Authenticate` header and that the upstream saw
//! nothing of it.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use fhirwall::sandbox::keys::{hs256_token, raw_token, KeyKind, SigningKey};
use serde_json::{json, Value};
use support::{free_port, raw_request, Gateway, Options};

fn www(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn outcome(r: reqwest::Response) -> Value {
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    v
}

/// Each hostile token against a unique resource id; the upstream must never see that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_before_the_upstream() {
    let gw = Gateway::start(Options::default()).await;
    let key = gw.issuer.signing_key();
    let claims = gw.claims("user/*.rs");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims.clone();
        f(&mut c);
        key.sign(&c)
    };
    let now = claims["iat"].as_i64().unwrap();
    let evil_key = SigningKey::generate(KeyKind::Rsa2048, "k1");
    let none_header = json!({"alg": "none", "kid": "k1"});
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", with(&|c| c["exp"] = json!(now - 5)), "expired"),
        (
            "not-yet-valid",
            with(&|c| c["nbf"] = json!(now + 120)),
            "not valid before",
        ),
        (
            "wrong-audience",
            with(&|c| c["aud"] = json!("https://other.example/fhir")),
            "audience",
        ),
        (
            "unknown-issuer",
            evil_key.sign(&json!({"iss": "https://evil.example", "aud": gw.base, "exp": now + 60})),
            "issuer",
        ),
        ("alg-none", raw_token(&none_header, &claims, b""), "JWS"),
        (
            "alg-none-sig",
            raw_token(&none_header, &claims, b"sig"),
            "algorithm 'none'",
        ),
        (
            "hs256-public-key",
            hs256_token("k1", &claims, key.public_pem.as_bytes()),
            "algorithm 'HS256'",
        ),
        ("forged-same-kid", evil_key.sign(&claims), "signature"),
        (
            "unknown-kid",
            SigningKey::generate(KeyKind::Rsa2048, "k-unknown").sign(&claims),
            "kid",
        ),
        (
            "malformed-base64",
            "bad~header.e30.c2ln".to_string(),
            "base64url",
        ),
        (
            "oversized",
            format!("{}.{}.{}", "a".repeat(9000), "b".repeat(9000), "c"),
            "longer than",
        ),
        (
            "string-exp",
            with(&|c| c["exp"] = json!("9999999999")),
            "exp",
        ),
        (
            "patient-not-an-id",
            with(&|c| c["patient"] = json!("p1,p2")),
            "not a FHIR resource id",
        ),
        (
            "patient-with-parameter",
            with(&|c| c["patient"] = json!("p1&_id=p2")),
            "not a FHIR resource id",
        ),
        (
            "id-token",
            with(&|c| c["typ"] = json!("ID")),
            "not an access token (its typ is 'ID')",
        ),
        (
            "cognito-id-token",
            with(&|c| c["token_use"] = json!("id")),
            "not an access token (its token_use is 'id')",
        ),
        // An OpenID Connect ID token of an app that is its own API (its
        // `aud` an accepted audience), typed as any JWT.
        (
            "oidc-id-token",
            with(&|c| c["at_hash"] = json!("77QmUPtjPfzWtF2AnpK9RQ")),
            "not an access token (its at_hash is 'present",
        ),
        // A claim that could not be a header to the upstream would reach
        // it as no header at all.
        (
            "sub-with-line-break",
            with(&|c| c["sub"] = json!("user-1\r\nX-Fhirwall-Patient: p2")),
            "claim 'sub' holds a control character",
        ),
        (
            "scope-with-control",
            with(&|c| c["scope"] = json!("user/*.rs\u{1}")),
            "claim 'scope' holds a control character",
        ),
    ];
    // Each refused token missed the cache of verified tokens (the
    // oversized one was refused before it was looked up).
    let missed = cases.len() as f64 - 1.0;
    for (name, token, describes) in cases {
        let marker = format!("hostile-{name}");
        let r = gw.get(&format!("Patient/{marker}"), Some(&token)).await;
        assert_eq!(r.status(), 401, "{name}");
        let w = www(&r);
        assert!(
            w.starts_with(&format!(
                "Bearer realm=\"{}\", error=\"invalid_token\"",
                gw.base
            )),
            "{name}: {w}"
        );
        assert!(
            w.contains(describes),
            "{name}: '{w}' should name '{describes}'"
        );
        // Refused under Bearer, the DPoP scheme is offered (RFC 9449 §7.1).
        assert!(
            w.ends_with("\", DPoP algs=\"RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA\""),
            "{name}: {w}"
        );
        assert!(
            !w.contains(&token[..20.min(token.len())]) || token.len() < 20,
            "{name}: token echoed"
        );
        let o = outcome(r).await;
        assert_eq!(o["issue"][0]["code"], "login", "{name}");
        // The body names the failed check as the challenge does.
        assert!(
            o["issue"][0]["diagnostics"].to_string().contains(describes),
            "{name}: {o}"
        );
        assert_eq!(
            gw.upstream.count_containing(&marker),
            0,
            "{name} reached the upstream"
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        support::metric(&m, "fhirwall_token_cache_misses_total"),
        missed
    );
    assert_eq!(support::metric(&m, "fhirwall_token_cache_hits_total"), 0.0);
    // Records carry the token hash, never the token.
    let audit = gw.audit_containing("\"reason\":\"token_expired\"");
    assert!(!audit.contains(&key.sign(&claims)[..40]));
    assert!(audit.contains("\"reason\":\"token_expired\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_claims_are_honoured_with_the_configured_leeway() {
    let gw = Gateway::start(Options {
        leeway_seconds: 60,
        ..Options::default()
    })
    .await;
    let key = gw.issuer.signing_key();
    let claims = gw.claims("user/*.rs");
    let now = claims["iat"].as_i64().unwrap();
    // Inside the leeway the clocks are taken to disagree; beyond it the
    // token is refused. 30 s and 150 s keep clear of the 60 s edge however
    // slow the test machine is.
    let cases = [
        ("exp-in-leeway", "exp", now - 30, 200, ""),
        ("exp-beyond", "exp", now - 150, 401, "expired"),
        ("nbf-in-leeway", "nbf", now + 30, 200, ""),
        ("nbf-beyond", "nbf", now + 150, 401, "not valid before"),
        ("iat-in-leeway", "iat", now + 30, 200, ""),
        ("iat-beyond", "iat", now + 150, 401, "issued in the future"),
    ];
    for (name, claim, at, want, describes) in cases {
        let mut c = claims.clone();
        c[claim] = json!(at);
        let marker = format!("leeway-{name}");
        let r = gw
            .get(&format!("Patient?_id={marker}"), Some(&key.sign(&c)))
            .await;
        assert_eq!(r.status(), want, "{name}");
        let reached = gw.upstream.count_containing(&marker);
        if want == 200 {
            assert_eq!(reached, 1, "{name}");
        } else {
            assert!(www(&r).contains(describes), "{name}: {}", www(&r));
            assert_eq!(reached, 0, "{name} reached the upstream");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_wrong_place_are_refused() {
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("user/*.rs", None);

    // No token: 401 with bare challenges (Bearer, and DPoP with its algorithms).
    let r = gw.get("Patient/no-token-1", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        www(&r),
        format!(
            "Bearer realm=\"{}\", DPoP algs=\"RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA\"",
            gw.base
        )
    );
    outcome(r).await;

    // Token in the query string.
    let r = gw
        .client
        .get(format!(
            "{}/Patient/query-token-1?access_token={token}",
            gw.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(www(&r).contains("error=\"invalid_request\""));
    // Also on a public route, which needs none (it would reach the
    // upstream's access log).
    let before = gw.upstream.seen().len();
    let r = gw
        .get(&format!("metadata?access_token={token}"), None)
        .await;
    assert_eq!(r.status(), 400);
    assert!(www(&r).contains("error=\"invalid_request\""));
    assert_eq!(gw.upstream.seen().len(), before, "the token went upstream");

    // Two Authorization headers.
    let r = gw
        .client
        .get(format!("{}/Patient/two-auth-1", gw.base))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(www(&r).contains("several Authorization headers"));

    // Token in a form body.
    let r = gw
        .client
        .post(format!("{}/Observation/_search", gw.base))
        .bearer_auth(&token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("code=form-token-1&access_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Basic and DPoP schemes.
    let r = gw
        .client
        .get(format!("{}/Patient/basic-1", gw.base))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(www(&r).contains("error=\"invalid_token\""));
    let r = gw
        .client
        .get(format!("{}/Patient/dpop-1", gw.base))
        .header("authorization", format!("DPoP {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(www(&r).starts_with("DPoP "), "{}", www(&r));
    assert!(www(&r).contains("not DPoP-bound"), "{}", www(&r));

    // A DPoP-bound token (cnf.jkt) presented as Bearer (tests/dpop.rs has the rest).
    let mut c = gw.claims("user/*.rs");
    c["cnf"] = json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"});
    let bound = gw.issuer.signing_key().sign(&c);
    let r = gw.get("Patient/cnf-1", Some(&bound)).await;
    assert_eq!(r.status(), 401);
    assert!(www(&r).contains("DPoP-bound"), "{}", www(&r));

    for marker in [
        "no-token-1",
        "query-token-1",
        "two-auth-1",
        "form-token-1",
        "basic-1",
        "dpop-1",
        "cnf-1",
    ] {
        assert_eq!(
            gw.upstream.count_containing(marker),
            0,
            "{marker} reached the upstream"
        );
    }
}

/// A stored search's page (`?_getpages=…`) is served by the server
/// whatever search its id names: under scopes that search some types but
/// not all, the page is checked and passed on only if it holds nothing
/// else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_stored_searches_are_checked_against_the_grant() {
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("user/Observation.rs", None);
    // (The sandbox's page id names the type of its stored search.)
    let r = gw
        .get("?_getpages=Observation&_getpagesoffset=0", Some(&token))
        .await;
    assert_eq!(r.status(), 200);
    let page: Value = r.json().await.unwrap();
    let types: Vec<&str> = page["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert!(
        !types.is_empty() && types.iter().all(|t| *t == "Observation"),
        "{types:?}"
    );
    // A page of someone else's search over Conditions: withheld.
    let r = gw
        .get("?_getpages=Condition&_getpagesoffset=0", Some(&token))
        .await;
    assert_eq!(r.status(), 403);
    let o = outcome(r).await;
    assert!(o.to_string().contains("Condition resources"), "{o}");
    // Without a search scope, or with a search parameter beside the page
    // id, it is refused before the upstream.
    let before = gw.upstream.seen().len();
    let read_only = gw.mint("user/Observation.r", None);
    let r = gw.get("?_getpages=Observation", Some(&read_only)).await;
    assert_eq!(r.status(), 403);
    let r = gw.get("?_getpages=Observation&code=x", Some(&token)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.seen().len(), before);
    // patient/ scopes beside a user/ one (an EHR launch): pages of the
    // patient's own searches pass, and pages of the user/ type; others are
    // withheld (502: a patient's page holding another patient's data means
    // the upstream did not search as asked).
    let mixed = gw.mint("patient/*.rs user/Practitioner.rs", Some("p1"));
    for (id, want) in [
        ("Observation:p1", 200),
        ("Practitioner", 200),
        ("Observation:p2", 502),
        ("Condition", 502),
    ] {
        let r = gw.get(&format!("?_getpages={id}"), Some(&mixed)).await;
        assert_eq!(r.status(), want, "{id}");
        if want == 200 {
            let page: Value = r.json().await.unwrap();
            assert!(
                !page["entry"].as_array().unwrap().is_empty(),
                "{id}: {page}"
            );
        }
    }
    // patient/ scopes of some types only, or with a filter (what most
    // patient apps are granted): the `next` link of their own search
    // passes, as HAPI spells it (its includes repeated); a page beyond
    // the compartment, the types or the filter is withheld.
    let typed = gw.mint("patient/Observation.rs patient/Condition.rs", Some("p1"));
    let lab = gw.mint("patient/Observation.rs?category=laboratory", Some("p1"));
    for (token, id, want) in [
        (&typed, "Observation:p1", 200),
        (&typed, "Condition:p1", 200),
        (&typed, "Observation:p2", 502),
        (&typed, "Patient", 403),
        (&lab, "Observation:p1:laboratory", 200),
        (&lab, "Observation:p1", 502),
        (&lab, "Observation:p2:laboratory", 502),
        (&lab, "Condition:p1", 403),
    ] {
        let rel = format!(
            "?_getpages={id}&_getpagesoffset=0&_count=10&_include=Observation%3Aperformer&_bundletype=searchset"
        );
        let r = gw.get(&rel, Some(token)).await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, want, "{id}: {body}");
        if want == 200 {
            let page: Value = serde_json::from_str(&body).unwrap();
            let entries = page["entry"].as_array().unwrap();
            assert!(!entries.is_empty(), "{id}: {page}");
            assert!(
                entries
                    .iter()
                    .all(|e| e["resource"]["subject"]["reference"] == "Patient/p1"),
                "{id}: {page}"
            );
        } else {
            assert!(!body.contains("Bob"), "{id}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_decide_and_denials_name_the_missing_scope() {
    let gw = Gateway::start(Options::default()).await;
    let obs = gw.mint("openid user/Observation.rs", None);
    let r = gw.get("Observation/obs-p1-0", Some(&obs)).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], "obs-p1-0");

    let r = gw.get("Condition/cond-p1", Some(&obs)).await;
    assert_eq!(r.status(), 403);
    let w = www(&r);
    assert!(
        w.contains("error=\"insufficient_scope\"") && w.contains("scope=\""),
        "{w}"
    );
    // RFC 6750: the scope attribute lists real scope values.
    assert!(w.ends_with("scope=\"user/Condition.r\""), "{w}");
    let o = outcome(r).await;
    assert_eq!(o["issue"][0]["code"], "forbidden");
    assert!(
        o["issue"][0]["diagnostics"]
            .to_string()
            .contains("needs scope patient|user|system/Condition.r"),
        "{o}"
    );
    assert_eq!(gw.upstream.count_containing("cond-p1"), 0);

    // Conditions reached through a reverse chain at the end of a chain, or
    // a chain inside a reverse chain, need a Condition scope too.
    let obs_pat = gw.mint(
        "user/Observation.rs user/Patient.rs user/Encounter.rs",
        None,
    );
    for query in [
        "Observation?subject:Patient._has:Condition:subject:code=oracle-1",
        "Patient?_has:Encounter:subject:diagnosis:Condition.code=oracle-2",
    ] {
        let r = gw.get(query, Some(&obs_pat)).await;
        assert_eq!(r.status(), 403, "{query}");
        assert!(www(&r).contains("user/Condition.s"), "{query}: {}", www(&r));
    }
    assert_eq!(gw.upstream.count_containing("oracle-"), 0);

    // A form `_search`: the audit names the body's parameters with the
    // query's (names only).
    let r = gw
        .client
        .post(format!("{}/Observation/_search?_count=5", gw.base))
        .bearer_auth(&obs)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("code=form-audit-1&status=final")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(
        rec["query_params"],
        json!(["_count", "code", "status"]),
        "{rec}"
    );
    assert!(!rec.to_string().contains("form-audit-1"), "{rec}");

    // A conditional create's If-None-Exist search is decided like a query:
    // it may not reach Conditions the token cannot search (201 or 200
    // would tell whether one matched). Two of them are refused unread.
    let writer = gw.mint("user/Observation.cs", None);
    let before = gw.upstream.seen().len();
    for (headers, status) in [
        (vec!["_has:Condition:subject:code=ine-1"], 403),
        (vec!["identifier=ine-2", "identifier=ine-3"], 400),
    ] {
        let mut rq = gw
            .client
            .post(format!("{}/Observation", gw.base))
            .bearer_auth(&writer)
            .header("content-type", "application/fhir+json")
            .body(r#"{"resourceType":"Observation","status":"final","code":{"text":"ine"}}"#);
        for h in &headers {
            rq = rq.header("If-None-Exist", *h);
        }
        let r = rq.send().await.unwrap();
        assert_eq!(r.status(), status, "{headers:?}");
    }
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused create went upstream"
    );

    // Whole-system history takes no `_type` in R4 (HAPI ignores it and
    // answers every type): it needs a wildcard search scope regardless.
    let r = gw.get("_history?_type=Observation", Some(&obs)).await;
    assert_eq!(r.status(), 403);
    assert!(www(&r).contains("error=\"insufficient_scope\""));
    assert_eq!(gw.upstream.count_containing("_history"), 0);

    // Write with a read scope.
    let r = gw
        .client
        .delete(format!("{}/Observation/obs-p2-1", gw.base))
        .bearer_auth(&obs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "DELETE")
            .count(),
        0
    );

    // A v2 scope whose filter fhirwall cannot evaluate grants nothing
    // (filters it can evaluate are tested in tests/patient.rs).
    let filtered = gw.mint("user/Observation.rs?date=ge2020", None);
    let r = gw
        .get("Observation?date=ge2020&code=filtered-1", Some(&filtered))
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.count_containing("filtered-1"), 0);

    // Non-resource scopes grant nothing.
    let none = gw.mint("openid fhirUser launch/patient offline_access", None);
    assert_eq!(gw.get("Patient/p1", Some(&none)).await.status(), 403);

    // Patient scopes: own record yes, another patient's no.
    let pt = gw.mint("patient/*.rs", Some("p1"));
    assert_eq!(gw.get("Patient/p1", Some(&pt)).await.status(), 200);
    assert_eq!(
        gw.get("Patient/p1/Observation", Some(&pt)).await.status(),
        200
    );
    let before = gw.upstream.count_containing("Patient/p2");
    assert_eq!(gw.get("Patient/p2", Some(&pt)).await.status(), 403);
    assert_eq!(
        gw.get("Patient/p2/Observation", Some(&pt)).await.status(),
        403
    );
    assert_eq!(gw.upstream.count_containing("Patient/p2"), before);
    // Patient scope without a patient claim.
    let no_ctx = gw.mint("patient/*.rs", None);
    let r = gw.get("Patient/p1", Some(&no_ctx)).await;
    assert_eq!(r.status(), 403);
    assert!(www(&r).contains("no patient launch context"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_decided_entry_by_entry() {
    let gw = Gateway::start(Options {
        server_yaml: "  max_classified_body_bytes: 120000\n".into(),
        // A relayed answer streams on, whatever this cap on checked ones.
        upstream_yaml: "  max_checked_answer_bytes: 1024\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/Observation.rs user/Patient.rs", None);
    let bundle = |kind: &str, second: &str| {
        json!({"resourceType": "Bundle", "type": kind, "entry": [
            {"request": {"method": "GET", "url": "Patient/p1"}},
            {"request": {"method": "GET", "url": second}}
        ]})
        .to_string()
    };
    let post = |body: String| gw.post_bundle(&token, body);

    let bad = bundle("transaction", "Condition/cond-bundle-1");
    let r = post(bad.clone()).send().await.unwrap();
    let st = r.status();
    let w = www(&r);
    let tx = r.text().await.unwrap();
    assert_eq!(st, 403, "{w} {tx}");
    assert!(w.contains("entry 1"));
    let r = post(bundle("batch", "Condition/cond-bundle-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .count(),
        0,
        "a refused bundle reached the upstream"
    );

    let good = bundle("transaction", "Observation?code=8867-4");
    let r = post(good.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The audit names every entry (parameter names, never values); this
    // answer is larger than max_checked_answer_bytes, so it is not read for
    // the entries' statuses.
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(
        rec["entries"],
        json!([
            {"interaction": "read", "resource_type": "Patient", "resource_id": "p1"},
            {"interaction": "search-type", "resource_type": "Observation", "params": ["code"]}
        ]),
        "{rec}"
    );
    // A smaller one is: each entry with the status it was answered with.
    let r = post(bundle("batch", "Patient/none-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let statuses: Vec<Value> = gw.audit_for(&id)["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(200), json!(404)]);
    let seen = gw.upstream.seen();
    let forwarded = seen
        .iter()
        .find(|s| s.method == "POST")
        .expect("allowed bundle reached the upstream");
    assert_eq!(
        forwarded.body_len,
        good.len(),
        "the bundle body is forwarded unchanged"
    );

    // Malformed bundles and unknown types are refused, not guessed, with
    // an OperationOutcome that says what was wrong.
    let r = post("{\"resourceType\":\"Bundle\",\"type\":\"searchset\"}".into())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let o = outcome(r).await;
    assert!(
        o["issue"][0]["diagnostics"]
            .to_string()
            .contains("searchset"),
        "{o}"
    );
    let r = gw.get("Foo/unknown-type-1", Some(&token)).await;
    assert_eq!(r.status(), 400);
    let o = outcome(r).await;
    assert!(
        o["issue"][0]["diagnostics"].to_string().contains("Foo"),
        "{o}"
    );
    let r = gw.get("Patient/p1/_bogus", Some(&token)).await;
    assert_eq!(r.status(), 400);
    let o = outcome(r).await;
    assert!(
        o["issue"][0]["diagnostics"].to_string().contains("_bogus"),
        "{o}"
    );
    assert_eq!(
        gw.upstream.count_containing("unknown-type-1") + gw.upstream.count_containing("_bogus"),
        0
    );

    // A Bundle larger than Pingora's 64 KiB request buffer is decided the
    // same, then sent upstream by fhirwall itself, whole.
    let posts = || {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .count()
    };
    let padded = |kind: &str, second: &str, size: usize| {
        let mut b: Value = serde_json::from_str(&bundle(kind, second)).unwrap();
        b["id"] = json!("x".repeat(size));
        b.to_string()
    };
    let big = padded("batch", "Observation?code=8867-4", 90_000);
    let len = big.len();
    let r = post(big).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let answer = r.bytes().await.unwrap();
    assert!(answer.len() > 1024, "{} bytes", answer.len());
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["type"], "batch-response", "{answer}");
    assert_eq!(posts(), 3);
    assert_eq!(gw.upstream.seen().last().unwrap().body_len, len);
    // A relayed answer is read for the entries' statuses too.
    let r = post(padded("batch", "Patient/none-2", 90_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["entries"][0]["status"], 200, "{rec}");
    assert_eq!(rec["entries"][1]["status"], 404, "{rec}");
    // Refused as a small one would be: nothing reaches the upstream.
    let r = post(padded("transaction", "Condition/cond-big-1", 90_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Bodies larger than server.max_classified_body_bytes are refused.
    let r = post(padded("batch", "Patient/p1", 130_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(outcome(r).await.to_string().contains("120000 bytes"));
    assert_eq!(posts(), 4);
}

/// Bodies fhirwall holds while it decides count against one budget for
/// all requests, and must arrive in time: a client trickling a body is cut
/// off with 408, and while it holds its share a request that would go past
/// the budget is refused with 503. Neither reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bodies_have_a_budget_and_a_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(Options {
        server_yaml: "  max_classified_body_bytes: 100000\n  max_held_body_bytes: 100000\n  \
                      body_read_timeout_ms: 1500\n"
            .into(),
        // Within the budget a third of it: an answer held takes thrice.
        upstream_yaml: "  max_checked_answer_bytes: 33333\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.cruds", None);
    let bundle = |size: usize| {
        json!({"resourceType": "Bundle", "type": "batch", "id": "x".repeat(size),
               "entry": [{"request": {"method": "GET", "url": "Patient/p1"}}]})
        .to_string()
    };
    // 80 kB of a 90 kB body, then nothing.
    let slow = bundle(90_000);
    let mut trickle = tokio::net::TcpStream::connect(gw.proxy_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /fhir HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n",
        slow.len()
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    trickle.write_all(&slow.as_bytes()[..80_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let post = |body: String| gw.post_bundle(&token, body).send();
    let r = post(bundle(30_000)).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(outcome(r)
        .await
        .to_string()
        .contains("server.max_held_body_bytes"));
    // The trickling client is answered 408 at its deadline.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), trickle.read_to_end(&mut answer));
    let _ = read.await.expect("no answer to a trickled body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("server.body_read_timeout_ms"), "{answer}");
    // Its share is back: the same request now passes.
    assert_eq!(post(bundle(30_000)).await.unwrap().status(), 200);
    assert_eq!(
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .count(),
        1
    );
    // Answers kept for the entries' statuses may take only half the budget:
    // a batch answered in 30 kB is read for them, one answered in 80 kB is
    // passed on whole but not read.
    for (entries, read) in [(150, true), (400, false)] {
        let body = json!({"resourceType": "Bundle", "type": "batch",
            "entry": vec![json!({"request": {"method": "GET", "url": "Patient/p1"}}); entries]})
        .to_string();
        let r = gw.post_bundle(&token, body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["entry"].as_array().unwrap().len(), entries);
        let size = answer.to_string().len();
        assert!(read == (size < 50_000), "{entries} entries: {size} bytes");
        let rec = gw.audit_for(&id);
        let statuses = rec["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == 200)
            .count();
        assert_eq!(
            statuses,
            if read { entries } else { 0 },
            "{entries} entries"
        );
    }
}

/// A create, update or patch whose resource holds a conditional reference
/// (`Patient?…`) makes the server search; the write's success tells what
/// it found. Such references are decided like queries, and a body fhirwall
/// cannot read for them is refused, all before the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_references_in_single_writes_are_decided() {
    let gw = Gateway::start(Options::default()).await;
    let probing = "Patient?identifier=urn:mrn|1&_has:Condition:subject:code=B20";
    let obs = |reference: &str| {
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": reference}})
        .to_string()
    };
    let send = |method: &str, rel: &str, scope: &str, content_type: &str, body: String| {
        gw.client
            .request(method.parse().unwrap(), format!("{}/{rel}", gw.base))
            .bearer_auth(gw.mint(scope, None))
            .header("content-type", content_type)
            .body(body)
    };
    let writes = || {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method != "GET")
            .count()
    };
    let fhir_json = "application/fhir+json";
    let narrow = "user/Observation.cu";
    let wide = "user/Observation.cu user/Patient.s user/Condition.s";
    let patch = json!([{"op": "replace", "path": "/subject/reference", "value": probing}]);
    let refused = [
        ("POST", "Observation", "user/Observation.cu user/Patient.s", fhir_json, obs(probing), 403, "Condition.s"),
        ("PUT", "Observation/o1", narrow, fhir_json, obs(probing), 403, "Patient"),
        ("PATCH", "Observation/o1", narrow, "application/json-patch+json", patch.to_string(), 403, "Patient"),
        // What fhirwall cannot read for references does not pass unread.
        ("PUT", "Observation/o1", wide, "application/fhir+xml", "<Observation/>".into(), 415, "cannot read 'application/fhir+xml'"),
        ("POST", "Observation", wide, fhir_json,
         r#"{"resourceType": "Observation", "subject": {"reference": "Patient?x=1", "reference": "Patient/1"}}"#.into(),
         400, "appears twice"),
    ];
    // A raw Binary's X-Security-Context becomes its securityContext
    // reference; a gzip-encoded resource is not read; a reference in an
    // array may be taken by the server for its first string.
    let with_header = [
        (
            "POST",
            "Binary",
            "user/Binary.c",
            "image/png",
            "png".to_string(),
            ("x-security-context", probing),
            403,
            "Patient",
        ),
        (
            "POST",
            "Observation",
            wide,
            fhir_json,
            obs(probing),
            ("content-encoding", "gzip"),
            415,
            "Content-Encoding gzip",
        ),
        (
            "POST",
            "Observation",
            wide,
            fhir_json,
            json!({"resourceType": "Observation", "focus": [{"reference": [probing]}]}).to_string(),
            ("x-unrelated", "1"),
            400,
            "not a string",
        ),
        // A Binary whose media type names FHIR (a space is a `+` to HAPI)
        // is a resource: its securityContext is read.
        (
            "POST",
            "Binary",
            "user/Binary.c",
            "application/fhir json",
            json!({"resourceType": "Binary", "contentType": "text/plain", "data": "eA==",
                   "securityContext": {"reference": probing}})
            .to_string(),
            ("x-unrelated", "1"),
            403,
            "Patient",
        ),
    ];
    let refused = refused
        .into_iter()
        .map(|(m, r, sc, ct, b, st, says)| (m, r, sc, ct, b, None, st, says))
        .chain(
            with_header
                .into_iter()
                .map(|(m, r, sc, ct, b, h, st, says)| (m, r, sc, ct, b, Some(h), st, says)),
        );
    for (method, rel, scope, content_type, body, header, status, says) in refused {
        let mut request = send(method, rel, scope, content_type, body);
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let r = request.send().await.unwrap();
        assert_eq!(
            r.status(),
            status,
            "{method} {rel} as {content_type}, {header:?}"
        );
        let o = outcome(r).await;
        assert!(
            o["issue"][0]["diagnostics"].to_string().contains(says),
            "{method} {rel}: {o}"
        );
        assert_eq!(writes(), 0, "{method} {rel} reached the upstream");
    }
    // Two X-Security-Context headers: which one the server takes is not
    // fhirwall's to guess.
    let r = send("POST", "Binary", "user/Binary.c", "image/png", "png".into())
        .header("x-security-context", "Patient/p1")
        .header("x-security-context", probing)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(outcome(r).await.to_string().contains("X-Security-Context"));
    assert_eq!(
        writes(),
        0,
        "a doubled X-Security-Context reached the upstream"
    );
    // With the searches allowed the same writes go through, as sent.
    for (method, rel, content_type, body, status) in [
        ("POST", "Observation", fhir_json, obs(probing), 201),
        ("PUT", "Observation/o1", fhir_json, obs(probing), 200),
        (
            "PATCH",
            "Observation/o1",
            "application/json-patch+json",
            patch.to_string(),
            200,
        ),
        // Larger than Pingora's 64 KiB buffer: read, decided, relayed whole.
        (
            "PUT",
            "Observation/o1",
            fhir_json,
            json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": probing},
                   "note": [{"text": "x".repeat(200_000)}]})
            .to_string(),
            200,
        ),
    ] {
        let before = writes();
        let len = body.len();
        let r = send(method, rel, wide, content_type, body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {rel}");
        assert_eq!(writes(), before + 1);
        let seen = gw.upstream.seen().last().unwrap().clone();
        assert_eq!(seen.body_len, len);
        // Framed by length, relayed or not (no chunked upload to the
        // legacy server).
        assert!(
            seen.headers
                .iter()
                .any(|(k, v)| k == "content-length" && *v == len.to_string()),
            "{method} {rel}: {:?}",
            seen.headers
        );
    }
    let r = send(
        "POST",
        "Binary",
        &format!("{wide} user/Binary.c"),
        "image/png",
        "png".into(),
    )
    .header("x-security-context", probing)
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    // A C-CDA document is a Binary's raw content to the server: not read.
    let r = send(
        "POST",
        "Binary",
        "user/Binary.c",
        "text/xml",
        "<ClinicalDocument/>".into(),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    // Binary's raw content holds no references and is not read, however
    // large.
    let png = "\u{89}PNG".repeat(30_000);
    let len = png.len();
    let r = send("POST", "Binary", "user/Binary.c", "image/png", png)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(gw.upstream.seen().last().unwrap().body_len, len);
}

/// With `upstream.resolves_conditional_references: false` the operator
/// vouches that the server refuses conditional references: writes under
/// `user/` scopes are streamed unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stream_unread_when_the_server_refuses_conditional_references() {
    let gw = Gateway::start(Options {
        upstream_yaml: "  resolves_conditional_references: false\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/Observation.cu", None);
    for (content_type, body) in [
        (
            "application/fhir+json",
            json!({"resourceType": "Observation",
            "subject": {"reference": "Patient?identifier=urn:mrn|1"}})
            .to_string(),
        ),
        ("application/fhir+xml", "<Observation/>".to_string()),
        (
            "application/fhir+json",
            json!({"resourceType": "Observation",
            "note": [{"text": "x".repeat(70_000)}]})
            .to_string(),
        ),
    ] {
        let r = gw
            .send("POST", "Observation", &token, content_type, body)
            .await;
        assert_eq!(r.status(), 201, "{content_type}");
    }
    assert_eq!(gw.upstream.seen().len(), 3);
    // Under patient/ scopes writes are still read, and a conditional
    // reference (here set by a patch) refused.
    let r = gw
        .client
        .patch(format!("{}/Observation/obs-p1-0", gw.base))
        .bearer_auth(gw.mint("patient/*.cruds", Some("p1")))
        .header("content-type", "application/json-patch+json")
        .body(
            json!([{"op": "add", "path": "/focus/0/reference",
                    "value": "Patient?identifier=urn:mrn|P2"}])
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(outcome(r)
        .await
        .to_string()
        .contains("conditional reference"));
    assert!(gw.upstream.seen().iter().all(|s| s.method != "PATCH"));
}

/// A public route needs no token, so it reaches nothing beyond itself: a
/// public provider directory does not hand out what `_revinclude`, `_has`,
/// chains or a stored search's page would bring in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_reach_nothing_beyond_themselves() {
    let gw = Gateway::start(Options {
        extra_yaml: "public_routes: [Practitioner]\n".into(),
        ..Options::default()
    })
    .await;
    let r = gw.get("Practitioner?name=pub-ok-1", None).await;
    assert!(
        !matches!(r.status().as_u16(), 400 | 401 | 403),
        "{}",
        r.status()
    );
    assert_eq!(gw.upstream.count_containing("pub-ok-1"), 1);
    assert_eq!(gw.get("metadata?_format=json", None).await.status(), 200);
    let before = gw.upstream.seen().len();
    for (i, query) in [
        "_revinclude=Encounter:participant",
        "_include=Practitioner:organization",
        "_has:Observation:performer:code=x",
        "organization.name=x",
        "_getpages=abc",
        "_filter=name eq x",
    ]
    .iter()
    .enumerate()
    {
        let r = gw
            .get(&format!("Practitioner?name=pub-{i}&{query}"), None)
            .await;
        assert_eq!(r.status(), 400, "{query}");
        let o = outcome(r).await;
        assert!(
            o["issue"][0]["diagnostics"]
                .to_string()
                .contains("public route"),
            "{query}: {o}"
        );
    }
    // Nor through a body, which some servlet containers read as a GET's
    // parameters when it has no query.
    let r = gw
        .client
        .get(format!("{}/Practitioner", gw.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("_revinclude=Encounter:participant")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(outcome(r)
        .await
        .to_string()
        .contains("takes no request body"));
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused query went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_public_paths_and_path_tricks() {
    let gw = Gateway::start(Options::default()).await;
    // Public routes without a token reach the upstream.
    let r = gw.get("metadata", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "CapabilityStatement"
    );
    assert_eq!(
        gw.get(".well-known/smart-configuration", None)
            .await
            .status(),
        200
    );
    // Outside the base: 404.
    let r = gw
        .client
        .get(format!("http://{}/admin/secret", gw.proxy_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Path tricks around public routes are refused and never forwarded.
    let addr = gw.proxy_addr();
    for (path, status) in [
        ("/fhir/metadata%2F..%2FPatient%2Ftrick-1", 400),
        ("/fhir/metadata/../Patient/trick-2", 400),
        ("/fhir/metadata;x=1/../Patient/trick-3", 400),
        ("/fhir/%2e%2e/fhir/Patient/trick-4", 400),
        ("/fhir/Patient/trick-5?x=/metadata", 401),
        ("/fhir//Patient/trick-6", 400),
    ] {
        let (got, text) = raw_request(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(got, status, "{path}: {text}");
    }
    for i in 1..=6 {
        assert_eq!(
            gw.upstream.count_containing(&format!("trick-{i}")),
            0,
            "trick-{i} reached the upstream"
        );
    }
}

/// `upstream.forward_authorization: true` passes on the token fhirwall
/// validated, never credentials on a public route, which nothing checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_credentials_are_only_those_fhirwall_checked() {
    let gw = Gateway::start(Options {
        upstream_yaml: "  forward_authorization: true\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 200);
    let forged = "eyJhbGciOiJub25lIn0.eyJzY29wZSI6InVzZXIvKi4qIn0.";
    for (scheme, value) in [
        ("Bearer", format!("Bearer {forged}")),
        ("Basic", "Basic YWRtaW46YWRtaW4=".to_string()),
    ] {
        let r = gw
            .client
            .get(format!("{}/metadata", gw.base))
            .header("Authorization", &value)
            .header("DPoP", "not-a-proof")
            .header("x-request-id", format!("public-{scheme}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let seen = gw.upstream.seen();
    let auth_of = |uri: &str| -> Vec<Vec<String>> {
        seen.iter()
            .filter(|s| s.uri == uri)
            .map(|s| {
                s.headers
                    .iter()
                    .filter(|(k, _)| k == "authorization" || k == "dpop")
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        auth_of("/r4/Patient/p1"),
        vec![vec![format!("Bearer {token}")]]
    );
    assert_eq!(auth_of("/r4/metadata"), vec![Vec::<String>::new(); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofable_headers_are_stripped_and_context_forwarded() {
    let gw = Gateway::start(Options {
        extra_yaml: "forward_headers:\n  patient: X-Fhirwall-Patient\n  sub: X-Fhirwall-Sub\n"
            .into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("patient/*.rs", Some("p1"));
    let r = gw
        .client
        .get(format!("{}/Patient/p1", gw.base))
        .bearer_auth(&token)
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Host", "evil.example")
        .header("X_Forwarded_Uri", "/metadata")
        .header("X-Original-URL", "/metadata")
        .header("X-Fhirwall-Patient", "p2")
        .header("X_Fhirwall_Sub", "admin")
        .header("Forwarded", "for=6.6.6.6")
        .header("X-Request-Id", "client-chosen-id")
        .header("X-Client-Request-Id", "spoofed")
        .header("Connection", "keep-alive, X-Hop")
        .header("X-Hop", "secret")
        .header("Content-Location", "Patient/p2")
        .header("Cookie", "JSESSIONID=someone-elses")
        .header("ssl_client_cert", "-----BEGIN CERTIFICATE-----")
        .header("X-Remote-User", "admin")
        .header("X_Cascade", "delete")
        .header("X-Meta-Snapshot-Mode", "SECURITY_LABEL")
        .header("HAPI-Rewrite-History", "true")
        .header("x-envoy-retry-on", "5xx")
        .header("X-Proxied-Https", "on")
        .header("X-Request-Partition-IDs", "_ALL")
        .header("X-FHIR-TENANT-ID", "other-hospital")
        .header("CF-Connecting-IP", "6.6.6.6")
        .header("X-Scheme", "https")
        .header("X-Auth-Request-Access-Token", "someone-elses-token")
        .header("X-Authenticated-Scope", "system/*.cruds")
        .header("X-Consumer-Username", "admin")
        .header(
            "X-Goog-Authenticated-User-Email",
            "accounts.google.com:admin@example.org",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "client-chosen-id");
    let seen = gw.upstream.seen();
    let s = seen
        .iter()
        .find(|s| s.uri == "/r4/Patient/p1")
        .expect("forwarded with the upstream base path");
    let h = |name: &str| -> Vec<&str> {
        s.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(h("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(
        h("x-forwarded-host"),
        vec![gw.proxy_addr().to_string().as_str()]
    );
    assert_eq!(h("x-forwarded-proto"), vec!["http"]);
    assert_eq!(h("x-fhirwall-patient"), vec!["p1"]);
    assert_eq!(h("x-fhirwall-sub"), vec!["user-1"]);
    // fhirwall's own id (the audit record's), the client's marked as such.
    let own = gw.audit_for("client-chosen-id")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(h("x-request-id"), vec![own.as_str()]);
    assert_eq!(h("x-client-request-id"), vec!["client-chosen-id"]);
    for gone in [
        "x_forwarded_uri",
        "x-original-url",
        "x_fhirwall_sub",
        "forwarded",
        "x-hop",
        "authorization",
        "content-location",
        "cookie",
        "ssl_client_cert",
        "x-remote-user",
        "x_cascade",
        "x-meta-snapshot-mode",
        "hapi-rewrite-history",
        "x-envoy-retry-on",
        "x-proxied-https",
        "x-request-partition-ids",
        "x-fhir-tenant-id",
        "cf-connecting-ip",
        "x-scheme",
        "x-auth-request-access-token",
        "x-authenticated-scope",
        "x-consumer-username",
        "x-goog-authenticated-user-email",
    ] {
        assert!(
            h(gone).is_empty(),
            "{gone} reached the upstream: {:?}",
            s.headers
        );
    }

    // A create's answer: the new resource's URL under the public base (the
    // upstream built it from the Host fhirwall sent), and none of the
    // upstream's session cookies.
    let r = gw.create_observation().await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["location"],
        format!("{}/Observation/new-1/_history/1", gw.base).as_str()
    );
    assert!(r.headers().get("set-cookie").is_none(), "{:?}", r.headers());
    // The upstream's own challenge (its realm, Basic) is not passed on: a
    // 401 carries fhirwall's.
    let reader = gw.mint("user/*.rs", None);
    let r = gw.get("Observation/upstream-401", Some(&reader)).await;
    assert_eq!(r.status(), 401);
    let challenges: Vec<&str> = r
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(challenges.len(), 1, "{challenges:?}");
    assert!(
        challenges[0].starts_with(&format!("Bearer realm=\"{}\"", gw.base))
            && challenges[0].contains("upstream FHIR server refused"),
        "{challenges:?}"
    );
    // Host is the upstream's, not the client's (the gateway's address).
    assert_ne!(gw.upstream_addr, gw.proxy_addr());
    assert_eq!(h("host"), vec![gw.upstream_addr.to_string().as_str()]);

    // `Connection` may not list a header fhirwall read to decide: the
    // upstream would run the form search without its body (and so without
    // the patient it was decided on).
    let before = gw.upstream.seen().len();
    for listed in ["content-type", "Content-Length", "keep-alive, Host"] {
        let r = gw
            .client
            .post(format!("{}/Observation/_search?code=conn-1", gw.base))
            .bearer_auth(&token)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Connection", listed)
            .body("patient=p1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "Connection: {listed}");
        let o: Value = r.json().await.unwrap();
        let text = o["issue"][0]["diagnostics"].to_string();
        assert!(text.contains("Connection lists"), "{o}");
    }
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused request went upstream"
    );
}

/// A partitioned upstream (HAPI's `X-Request-Partition-IDs`) gets its
/// partition from the token (`forward_headers: claim:<name>`), never from
/// the client: a string claim, a list joined by commas, no claim no header;
/// a claim that cannot be a header value refuses the token, 401, nothing
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_claim_is_forwarded_as_the_partition_header() {
    let gw = Gateway::start(Options {
        extra_yaml: "forward_headers:\n  \"claim:tenant\": X-Request-Partition-IDs\n".into(),
        ..Options::default()
    })
    .await;
    let key = gw.issuer.signing_key();
    let with_tenant = |tenant: Value| {
        let mut c = gw.claims("user/*.rs");
        if !tenant.is_null() {
            c["tenant"] = tenant;
        }
        key.sign(&c)
    };
    let partition_seen = |id: &str| -> Vec<String> {
        let seen = gw.upstream.seen();
        let s = seen
            .iter()
            .find(|s| s.uri.ends_with(id))
            .unwrap_or_else(|| panic!("{id} did not reach the upstream"));
        s.headers
            .iter()
            .filter(|(k, _)| k == "x-request-partition-ids")
            .map(|(_, v)| v.clone())
            .collect()
    };
    let send = |id: &'static str, token: String| {
        let r = gw
            .client
            .get(format!("{}/Patient/{id}", gw.base))
            .bearer_auth(token)
            .header("X-Request-Partition-IDs", "_ALL")
            .send();
        async move { r.await.unwrap() }
    };
    for (id, tenant, expected) in [
        ("part-string", json!("hospital-a"), vec!["hospital-a"]),
        ("part-list", json!(["1", 2]), vec!["1,2"]),
        ("part-none", Value::Null, vec![]),
    ] {
        let r = send(id, with_tenant(tenant)).await;
        assert_eq!(r.status(), 404, "{id}: the sandbox has no such patient");
        assert_eq!(partition_seen(id), expected, "{id}");
    }
    for (id, tenant) in [
        ("part-object", json!({"id": "a"})),
        ("part-empty", json!([])),
        ("part-control", json!("a\u{7}b")),
        ("part-nested", json!([["a"]])),
    ] {
        let r = send(id, with_tenant(tenant)).await;
        assert_eq!(r.status(), 401, "{id}");
        assert!(www(&r).contains("invalid_token"), "{id}: {}", www(&r));
        let body = outcome(r).await;
        assert!(body.to_string().contains("tenant"), "{id}: {body}");
        assert_eq!(gw.upstream.count_containing(id), 0, "{id}");
    }
}

/// `_include=Source:*:Target` includes whatever the matches reference
/// (HAPI's match-all ignores the target): it needs a grant on every type,
/// in the query and in a search form alike, not only on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_include_of_every_parameter_needs_every_type() {
    let gw = Gateway::start(Options::default()).await;
    let named = gw.mint("user/Observation.rs user/Patient.rs", None);
    let r = gw
        .get(
            "Observation?code=star-1&_include:iterate=Observation:*:Patient",
            Some(&named),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert!(www(&r).contains("insufficient_scope"), "{}", www(&r));
    let r = gw
        .send(
            "POST",
            "Observation/_search?code=star-2",
            &named,
            "application/x-www-form-urlencoded",
            "_include=Observation:*:Patient",
        )
        .await;
    assert_eq!(r.status(), 403);
    for marker in ["star-1", "star-2"] {
        assert_eq!(
            gw.upstream.count_containing(marker),
            0,
            "{marker} went upstream"
        );
    }
    let every = gw.mint("user/*.rs", None);
    let r = gw
        .get(
            "Observation?code=star-3&_include=Observation:*:Patient",
            Some(&every),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.upstream.count_containing("star-3"), 1);
}

/// HAPI reads an all-digit id as its database key: `0123` is Patient/123
/// there, so the audit and `path` rules would see another id than the one
/// served. Such ids are refused before the upstream unless the operator
/// says the server's ids have leading zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_with_leading_zeros_are_no_ids_unless_allowed() {
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("user/*.rs", None);
    for rel in [
        "Patient/0123",
        "Observation?patient=0124",
        "Observation?subject=Patient/0125",
        "Patient?_id=p1,0126",
        "Patient/0127/Observation",
        // Past the 32 patients the audit lists, too long to be an id,
        // other digits, a :Patient modifier, a chain to the id.
        "Observation?patient=a1,a2,a3,a4,a5,a6,a7,a8,a9,a10,a11,a12,a13,a14,a15,a16,a17,a18,a19,a20,a21,a22,a23,a24,a25,a26,a27,a28,a29,a30,a31,a32,0131",
        "Observation?patient=000000000000000000000000000000000000000000000000000000000000000000000132",
        "Observation?patient=%D9%A1%D9%A3%D9%A3",
        "Observation?subject:Patient=0134",
        "Observation?patient._id=0135",
        "Observation?subject=Patient/0136/_history/1",
    ] {
        let r = gw.get(rel, Some(&token)).await;
        assert_eq!(r.status(), 400, "{rel}");
        let o = outcome(r).await;
        assert!(o.to_string().contains("leading zeros"), "{rel}: {o}");
    }
    let r = gw.batch_get(&token, "Patient/0128").await;
    assert_eq!(r.status(), 400);
    assert!(outcome(r).await.to_string().contains("leading zeros"));
    for needle in ["/012", "=012", "013", "%D9"] {
        assert_eq!(gw.upstream.count_containing(needle), 0, "{needle}");
    }
    assert_eq!(gw.upstream.count_containing("Bundle"), 0);
    // Values that are no ids (a code) and plain numbers pass.
    for rel in ["Observation?code=0129", "Patient/130", "Patient/0"] {
        let r = gw.get(rel, Some(&token)).await;
        assert_ne!(r.status(), 400, "{rel}");
    }
    assert_eq!(gw.upstream.count_containing("code=0129"), 1);
    // Allowed: passed on as written.
    let allowed = Gateway::start(Options {
        upstream_yaml: "  allow_zero_padded_ids: true\n".into(),
        ..Options::default()
    })
    .await;
    let token = allowed.mint("user/*.rs", None);
    let r = allowed.get("Patient/0123", Some(&token)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(allowed.upstream.count_containing("Patient/0123"), 1);
}

/// Parameters fhirwall would not recognise but the upstream would read as
/// `_include` and co. (HAPI drops a leading `?`, trims whitespace around
/// names in batch entries, decodes a form in the charset it names, may
/// read multipart bodies for parameters) are refused before the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_the_upstream_would_read_otherwise_are_refused() {
    let gw = Gateway::start(Options::default()).await;
    let obs = gw.mint("user/Observation.rs", None);
    let diagnostics = |o: &Value| o["issue"][0]["diagnostics"].to_string();

    for rel in [
        "Observation??_include=Observation:subject:Patient&code=hidden-1",
        "Observation?code=hidden-2&%09_revinclude=Provenance:target",
        "Observation?code=hidden-3&_include%20=Observation:subject:Patient",
    ] {
        let r = gw.get(rel, Some(&obs)).await;
        assert_eq!(r.status(), 400, "{rel}");
        let o = outcome(r).await;
        assert!(
            diagnostics(&o).contains("is not a search parameter name"),
            "{rel}: {o}"
        );
    }
    // Read by the server as something else: an `_include` (qualified
    // after '.'), the request's method (a servlet filter).
    for rel in [
        "Observation?code=hidden-6&_include.x=Observation:performer",
        "Observation?code=hidden-7&_method=DELETE",
    ] {
        let r = gw.get(rel, Some(&obs)).await;
        assert_eq!(r.status(), 400, "{rel}");
    }
    // A batch entry's path is run as written: not decoded here either.
    let r = gw.batch_get(&obs, "Observation%2Fhidden-8").await;
    assert_eq!(r.status(), 400);
    assert!(outcome(r).await.to_string().contains("percent-encoded"));
    // What is typed where a name goes is often a value: never echoed, in
    // the answer or the audit record.
    let r = gw
        .client
        .get(format!(
            "{}/Observation?code=x&John+Smith+1970-01-01",
            gw.base
        ))
        .bearer_auth(&obs)
        .header("x-request-id", "typed-name-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let o = outcome(r).await;
    assert!(
        diagnostics(&o).contains("parameter 2 is not a search parameter name"),
        "{o}"
    );
    assert!(!o.to_string().contains("Smith"), "{o}");
    let record = gw.audit_for("typed-name-1");
    assert_eq!(record["reason"], "fhir_malformed", "{record}");
    assert!(!record.to_string().contains("Smith"), "{record}");
    assert_eq!(gw.upstream.count_containing("Smith"), 0);

    let r = gw
        .batch_get(
            &obs,
            "Observation?code=hidden-4&\t_include=Observation:subject:Patient",
        )
        .await;
    assert_eq!(r.status(), 400);
    let o = outcome(r).await;
    assert!(
        diagnostics(&o).contains("is not a search parameter name"),
        "{o}"
    );

    // A form is read as UTF-8 only; a search's body is a form or nothing.
    let utf16: Vec<u8> = "_include=Observation:subject:Patient&code=hidden-5"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let multipart = "--b\r\nContent-Disposition: form-data; name=\"_include\"\r\n\r\n\
                     Observation:subject:Patient\r\n--b--\r\n";
    for (content_type, body, says) in [
        (
            "application/x-www-form-urlencoded; charset=UTF-16LE",
            utf16,
            "not as charset 'UTF-16LE'",
        ),
        (
            "multipart/form-data; boundary=b",
            multipart.as_bytes().to_vec(),
            "must be a form (application/x-www-form-urlencoded), not 'multipart/form-data'",
        ),
    ] {
        let r = gw
            .send(
                "POST",
                "Observation/_search?code=hidden-6",
                &obs,
                content_type,
                body,
            )
            .await;
        assert_eq!(r.status(), 415, "{content_type}");
        let o = outcome(r).await;
        assert!(diagnostics(&o).contains(says), "{content_type}: {o}");
    }
    // A Content-Type HAPI reads as a form (it only asks that it start like
    // one) while the Bundle is parsed as JSON: the Bundle's text would
    // carry URL parameters (`_cascade=delete`) nobody decided.
    let bundle = json!({"resourceType": "Bundle", "type": "batch",
        "implicitRules": "x&_cascade=delete&code=hidden-8",
        "entry": [{"request": {"method": "GET", "url": "Observation?code=hidden-8"}}]})
    .to_string();
    for content_type in [
        "application/x-www-form-urlencoded, application/fhir+json",
        "application/x-www-form-urlencodedX",
        // HAPI splits at a comma inside quotes too.
        "application/fhir+json; x=\"a, application/x-www-form-urlencoded;\"",
    ] {
        let r = gw
            .send("POST", "?_pretty=false", &obs, content_type, bundle.clone())
            .await;
        assert_eq!(r.status(), 415, "{content_type}");
    }
    // A Content-Type that is not visible ASCII is refused, not read as
    // something else than the upstream reads.
    let r = gw
        .client
        .post(format!("{}?_pretty=false", gw.base))
        .bearer_auth(&obs)
        .header(
            "content-type",
            reqwest::header::HeaderValue::from_bytes(
                b"application/x-www-form-urlencoded, application/fhir+json; x=\xe9",
            )
            .unwrap(),
        )
        .body(bundle.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // FHIR content is UTF-8: a server reading it as Shift_JIS would see
    // other text than fhirwall decided on.
    let writer = gw.mint("user/Observation.u", None);
    let r = gw
        .send(
            "PUT",
            "Observation/hidden-7",
            &writer,
            "application/fhir+json; charset=Shift_JIS",
            r#"{"resourceType":"Observation","id":"hidden-7","status":"final"}"#,
        )
        .await;
    assert_eq!(r.status(), 415);
    let o = outcome(r).await;
    assert!(diagnostics(&o).contains("not charset 'Shift_JIS'"), "{o}");
    assert_eq!(
        gw.upstream.count_containing("hidden-"),
        0,
        "a refused request reached the upstream"
    );
    // The refusals reach no other route either: nothing at all went up.
    assert!(gw.upstream.seen().is_empty(), "{:?}", gw.upstream.seen());

    // A UTF-8 form, said or not, is a form.
    for content_type in [
        "application/x-www-form-urlencoded; charset=\"utf-8\"",
        "application/x-www-form-urlencoded",
    ] {
        let r = gw
            .send(
                "POST",
                "Observation/_search",
                &obs,
                content_type,
                "code=shown-1",
            )
            .await;
        assert_eq!(r.status(), 200, "{content_type}");
    }
}

/// With every library's trace logging asked for, Pingora's, hyper's and
/// reqwest's stay at info: their debug lines print request headers (the
/// token), query values and bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_keeps_tokens_and_query_values_out_of_the_log() {
    let gw = Gateway::start(Options {
        rust_log: Some("trace".into()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Observation?code=Tracedvalue-1", Some(&token)).await;
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging is on"
    );
    assert!(!log.contains(&token), "the token was logged");
    assert!(!log.contains("Tracedvalue"), "a query value was logged");
}

/// `server.threads: 0` (the default) runs one proxy worker per core; a
/// number runs that many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_uses_every_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for (threads, want) in [(0, cores), (1, 1), (3, 3)] {
        let gw = Gateway::start(Options {
            server_yaml: format!("  threads: {threads}\n"),
            ..Options::default()
        })
        .await;
        let token = gw.mint("user/*.rs", None);
        assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
        let tasks = std::fs::read_dir(format!("/proc/{}/task", gw.pid())).unwrap();
        let workers = tasks
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|comm| comm.trim() == "fhirwall proxy")
            .count();
        assert_eq!(workers, want, "threads: {threads} on {cores} cores");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_until_idle() {
    let gw = Gateway::start(Options {
        upstream_yaml: "  idle_timeout_ms: 400\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let peers = |from: usize| {
        let seen = gw.upstream.seen();
        let mut peers: Vec<_> = seen[from..].iter().map(|s| s.peer).collect();
        peers.sort();
        peers.dedup();
        (seen.len() - from, peers)
    };
    // One request after another: a pooled connection carries them all
    // (two workers may each hold one).
    for _ in 0..20 {
        assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
    }
    let (seen, first) = peers(0);
    assert_eq!(seen, 20);
    assert!(
        first.len() <= 2,
        "20 requests used {} connections",
        first.len()
    );
    // Idle past idle_timeout_ms, the pooled connections are closed and the
    // next request opens a new one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
    let (seen, after) = peers(20);
    assert_eq!(seen, 1);
    assert!(
        !first.contains(&after[0]),
        "a connection idle for 1.2 s was reused despite idle_timeout_ms: 400"
    );
}

/// `PUT Observation/<id>` under `user/Observation.u` with a note of
/// `note_len` bytes (over 64 KiB: relayed by fhirwall); the client gives
/// up after 20 s (without the gateway's own timeouts it would wait for
/// ever).
async fn put_large_observation(gw: &Gateway, id: &str, note_len: usize) -> reqwest::Response {
    let token = gw.mint("user/Observation.u", None);
    let body = json!({"resourceType": "Observation", "id": id,
                      "note": [{"text": "x".repeat(note_len)}]})
    .to_string();
    gw.client
        .put(format!("{}/Observation/{id}", gw.base))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap()
}

/// An upstream answer Pingora cannot parse is a 502, and the failure is
/// logged by its kind: none of the bytes read (a cookie fhirwall strips,
/// resource data) reach the log, as Pingora's own line would print them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_upstream_answer_is_logged_without_its_bytes() {
    let (addr, upstream) = support::raw_upstream(
        |_| {
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=SECRET-COOKIE\r\n\
              Bad Header\x01: x\r\nContent-Length: 40\r\n\r\n\
              {\"resourceType\":\"Patient\",\"PHI-MARK\":1}"
                .to_vec()
        },
        Duration::ZERO,
    )
    .await;
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 502);
    let log = gw.stderr_containing("fail to proxy").await;
    assert!(log.contains("InvalidHTTPHeader"), "{log}");
    for secret in ["SECRET-COOKIE", "PHI-MARK", "Bad Header"] {
        assert!(!log.contains(secret), "{secret} logged: {log}");
    }
    upstream.abort();
}

/// A body larger than Pingora's buffer is relayed by fhirwall's own
/// client, which times reads only: an upstream that accepts the request
/// and then takes none of its body is given up after
/// `upstream.write_timeout_ms` (504), not held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_taking_a_relayed_body_is_given_up() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let sink = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(c); // open, never read
        }
    });
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        read_timeout_ms: 30_000,
        upstream_yaml: "  write_timeout_ms: 500\n".into(),
        ..Options::default()
    })
    .await;
    let r = put_large_observation(&gw, "o1", 6_000_000).await;
    assert_eq!(r.status(), 504);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let o = outcome(r).await;
    assert!(
        o.to_string().contains("write_timeout_ms"),
        "not the write timeout: {o}"
    );
    assert!(accepted.load(Ordering::SeqCst) >= 1);
    let rec = gw.audit_for(&id);
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason"], "upstream_timeout");
    sink.abort();
}

/// Once a relayed body is all taken, the write timeout is done with: an
/// upstream slow to answer meets the read timeout (counted from then), not
/// the shorter write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_body_taken_whole_waits_for_the_answer_by_the_read_timeout() {
    let gw = Gateway::start(Options {
        read_timeout_ms: 1_000,
        upstream_yaml: "  write_timeout_ms: 300\n".into(),
        ..Options::default()
    })
    .await;
    // The sandbox takes the body, then stalls 5 s on "slow" ids.
    let r = put_large_observation(&gw, "slow-3", 200_000).await;
    assert_eq!(r.status(), 504);
    let o = outcome(r).await.to_string();
    assert!(o.contains("read_timeout_ms"), "{o}");
    assert!(!o.contains("write_timeout_ms"), "{o}");

    // An answer whose header came and whose body stalls: the client sees
    // the connection end, the record says it was the read timeout.
    let r = put_large_observation(&gw, "trickle", 200_000).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(r.bytes().await.is_err(), "the body was cut short");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "upstream_timeout", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_named_by_host_is_resolved_off_the_workers() {
    // (Looked up again in the background, its last addresses kept through
    // a failed lookup: `resolve.rs`'s tests; `check` refuses a name that
    // does not resolve at start.)
    let (upstream, addr) = fhirwall::sandbox::fhir::FhirSandbox::spawn("/r4").await;
    let named = Gateway::start_with(
        Options {
            upstream_url: Some(format!("http://localhost:{}/r4", addr.port())),
            ..Options::default()
        },
        upstream,
        addr,
    )
    .await;
    let token = named.mint("user/*.rs", None);
    for _ in 0..3 {
        assert_eq!(named.get("Patient/p1", Some(&token)).await.status(), 200);
    }
    assert_eq!(named.upstream.count_containing("/r4/Patient/p1"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_and_slow_answer_502_and_504() {
    let closed = free_port();
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://127.0.0.1:{closed}/r4")),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 502);
    // The connection is not kept after a failed proxying, and the answer
    // says so (a client reusing it would meet a closed connection).
    assert_eq!(r.headers()["connection"], "close");
    let o = outcome(r).await;
    assert!(o["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("upstream"));
    // Pingora logs the failure; the log names the request, never its query
    // values (PHI).
    let r = gw
        .client
        .get(format!(
            "{}/Patient?family=Secretname-1&birthdate=1970",
            gw.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    // (Pingora writes its line after the answer: wait for it, bounded.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
        if log.contains(&id) || log.contains("Secretname") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failure was not logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !log.contains("Secretname"),
        "a query value was logged: {log}"
    );

    let gw = Gateway::start(Options {
        read_timeout_ms: 300,
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/slow-1", Some(&token)).await;
    assert_eq!(r.status(), 504);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let o = outcome(r).await;
    assert_eq!(o["issue"][0]["code"], "timeout");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["path"], "/fhir/Patient/slow-1");
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason"], "upstream_timeout");
    // The time the upstream was waited for is recorded and measured.
    assert!(
        rec["upstream_ms"].as_f64().is_some_and(|ms| ms >= 250.0),
        "{rec}"
    );
    let m = gw.metrics().await;
    let series = "fhirwall_upstream_duration_seconds";
    assert_eq!(support::metric(&m, &format!("{series}_count")), 1.0, "{m}");
    assert_eq!(
        support::metric(&m, &format!("{series}_bucket{{le=\"0.1\"}}")),
        0.0,
        "{m}"
    );

    // An upstream that never completes the TCP handshake: a listener on
    // loopback with its accept queue full, so the kernel drops new SYNs.
    // The connect timeout (1 s in these tests) answers 504.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(c)) => held.push(c),
            _ => break,
        }
    }
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let started = std::time::Instant::now();
    let r = gw.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 504, "after {:?}", started.elapsed());
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "upstream_timeout");
    // The connect timed out, not a read on a connection that opened.
    assert!(
        rec["detail"]
            .as_str()
            .unwrap_or("")
            .contains("ConnectTimedout"),
        "{rec}"
    );
    drop((held, full));
}

/// An issuer that withdraws every key (`{"keys": []}`, a compromised key
/// pulled) is believed: the keys loaded before are dropped and its tokens
/// are refused (401, nothing upstream), cached ones too, until it
/// publishes a key again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_jwks_drops_the_keys_loaded_before() {
    let gw = Gateway::start(Options {
        min_refetch_interval_seconds: 1,
        ..Options::default()
    })
    .await;
    let old = gw.issuer.signing_key();
    let cached = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&cached)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gw.issuer.set_keys(Vec::new());
    // An unknown kid makes fhirwall look again: it finds no key.
    let stranger = SigningKey::generate(KeyKind::P256, "k-stranger");
    let r = gw
        .get("Patient/p1", Some(&stranger.sign(&gw.claims("user/*.rs"))))
        .await;
    assert_eq!(r.status(), 401);
    let m = gw.metrics().await;
    assert_eq!(
        support::metric(&m, "fhirwall_jwks_keys{issuer=\"test\"}"),
        0.0,
        "{m}"
    );
    // A token (never seen, so not cached) signed by the withdrawn key.
    let before = gw.upstream.seen().len();
    let r = gw
        .get(
            "Patient/withdrawn-1",
            Some(&old.sign(&gw.claims("user/*.rs"))),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert!(www(&r).contains("invalid_token"), "{}", www(&r));
    // Nor one verified (and cached) before the key was withdrawn.
    let r = gw.get("Patient/withdrawn-2", Some(&cached)).await;
    assert_eq!(r.status(), 401);
    assert_eq!(gw.upstream.seen().len(), before);
    // A key published again is taken at the next look.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gw.issuer
        .rotate_to(SigningKey::generate(KeyKind::P256, "k-back"));
    assert_eq!(
        gw.get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
            .await
            .status(),
        200
    );
}

/// A gateway holding a token in its cache (returned), after the issuer's
/// keys were changed by `change` (given the signing key's kid) and
/// fhirwall fetched them (an unknown kid made it look again).
async fn cached_then_keys_changed(change: impl FnOnce(&Gateway, &str)) -> (Gateway, String) {
    let gw = Gateway::start(Options {
        min_refetch_interval_seconds: 1,
        ..Options::default()
    })
    .await;
    let kid = gw.issuer.signing_key().kid.clone();
    let cached = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&cached)).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    change(&gw, &kid);
    let stranger = SigningKey::generate(KeyKind::P256, "k-stranger");
    let r = gw
        .get("Patient/p1", Some(&stranger.sign(&gw.claims("user/*.rs"))))
        .await;
    assert_eq!(r.status(), 401, "the unknown kid makes fhirwall look again");
    (gw, cached)
}

/// An issuer that replaces a key under the same `kid` (a key pulled and
/// a new one published in its place) is believed for cached tokens too:
/// a token verified with the old key is refused once the new key set is
/// seen (401, nothing upstream), while the new key's tokens pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replaced_under_its_kid_refuses_tokens_cached_under_the_old_one() {
    let (gw, cached) = cached_then_keys_changed(|gw, kid| {
        gw.issuer
            .set_keys(vec![SigningKey::generate(KeyKind::P256, kid)])
    })
    .await;
    let before = gw.upstream.seen().len();
    let r = gw.get("Patient/replaced-1", Some(&cached)).await;
    assert_eq!(r.status(), 401);
    assert!(www(&r).contains("invalid_token"), "{}", www(&r));
    assert_eq!(gw.upstream.seen().len(), before);
    // The key now published under that kid verifies its own tokens.
    assert_eq!(
        gw.get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
            .await
            .status(),
        200
    );
}

/// An issuer that replaces its key under the same kid, or signs without
/// a kid, is looked at again when a token does not verify against the
/// loaded key (no stranger kid needed to notice): the new key's tokens
/// pass at once, within the shared re-fetch budget; forged tokens under
/// the known kid cost at most one fetch per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_replaced_under_its_kid_or_without_one_is_fetched_again() {
    let gw = Gateway::start(Options {
        min_refetch_interval_seconds: 2,
        ..Options::default()
    })
    .await;
    let fetches = || gw.issuer.jwks_fetches.load(Ordering::SeqCst);
    let kid = gw.issuer.signing_key().kid.clone();
    assert_eq!(
        gw.get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
            .await
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Same kid, new key of the same type (the sandbox's is RSA): its
    // token is verified after one fetch.
    gw.issuer
        .set_keys(vec![SigningKey::generate(KeyKind::Rsa2048, &kid)]);
    let before = fetches();
    let r = gw
        .get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
        .await;
    assert_eq!(r.status(), 200, "{}", www(&r));
    assert_eq!(fetches() - before, 1);
    // Forged tokens under that kid: refused, at most one more fetch.
    let forger = SigningKey::generate(KeyKind::Rsa2048, &kid);
    let before = fetches();
    for i in 0..5 {
        let r = gw
            .get(
                &format!("Patient/forged-{i}"),
                Some(&forger.sign(&gw.claims("user/*.rs"))),
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    assert!(fetches() - before <= 1, "{} fetches", fetches() - before);
    assert_eq!(gw.upstream.count_containing("forged-"), 0);
    // An issuer signing without a kid rotates its key: found the same way.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    gw.issuer
        .set_keys(vec![SigningKey::generate(KeyKind::P256, "unnamed")]);
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = None;
    let token = gw
        .issuer
        .signing_key()
        .sign_with_header(&h, &gw.claims("user/*.rs"));
    let r = gw.get("Patient/p1", Some(&token)).await;
    assert_eq!(r.status(), 200, "{}", www(&r));
}

/// Two keys of the token's algorithm under one kid make a fresh token
/// naming it ambiguous; a token cached before the second key came gets the
/// same answer, not a pass from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_key_under_a_tokens_kid_refuses_it_cached_or_fresh() {
    // The old key stays published; another RSA key joins it under its kid.
    let (gw, cached) = cached_then_keys_changed(|gw, kid| {
        gw.issuer
            .rotate_to(SigningKey::generate(KeyKind::Rsa2048, kid))
    })
    .await;
    let before = gw.upstream.seen().len();
    for token in [cached, gw.mint("user/*.rs", None)] {
        let r = gw.get("Patient/p1", Some(&token)).await;
        assert_eq!(r.status(), 401);
        assert!(www(&r).contains("invalid_token"), "{}", www(&r));
    }
    assert_eq!(gw.upstream.seen().len(), before, "nothing went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kid_refetches_once_and_key_rotation_works() {
    let gw = Gateway::start(Options {
        min_refetch_interval_seconds: 2,
        ..Options::default()
    })
    .await;
    let fetches = || gw.issuer.jwks_fetches.load(Ordering::SeqCst);
    // Let the start-up fetch fall out of the re-fetch interval.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let start = fetches();
    // Rotation: the issuer publishes a new key and signs with it.
    gw.issuer
        .rotate_to(SigningKey::generate(KeyKind::P256, "k2"));
    let tokens: Vec<String> = (0..20).map(|_| gw.mint("user/*.rs", None)).collect();
    let mut tasks = Vec::new();
    for t in tokens.clone() {
        let c = gw.client.clone();
        let url = format!("{}/Patient/p1", gw.base);
        tasks.push(tokio::spawn(async move {
            c.get(url).bearer_auth(t).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fetches() - start, 1, "concurrent misses share one fetch");

    // A truly unknown kid: at most one re-fetch per interval.
    let stranger = SigningKey::generate(KeyKind::Rsa2048, "k-stranger");
    let claims = gw.claims("user/*.rs");
    let before = fetches();
    for i in 0..5 {
        let r = gw
            .get(
                &format!("Patient/stranger-{i}"),
                Some(&stranger.sign(&claims)),
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    assert!(
        fetches() - before <= 1,
        "unknown kids re-fetched {} times",
        fetches() - before
    );
    assert_eq!(gw.upstream.count_containing("stranger-"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_outage_keeps_loaded_keys_and_answers_503_for_new_ones() {
    let gw = Gateway::start(Options {
        min_refetch_interval_seconds: 1,
        ..Options::default()
    })
    .await;
    gw.issuer.down.store(true, Ordering::SeqCst);
    // A new token with a loaded kid verifies from the loaded keys.
    let t = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&t)).await.status(), 200);
    // A token needing a key we do not have: 503 with Retry-After, never an allow.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let k3 = SigningKey::generate(KeyKind::P256, "k3");
    let r = gw
        .get("Patient/outage-1", Some(&k3.sign(&gw.claims("user/*.rs"))))
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    outcome(r).await;
    assert_eq!(gw.upstream.count_containing("outage-1"), 0);
    // After that failed fetch, loaded keys still verify new tokens.
    let fresh = gw.mint("user/*.rs", None);
    assert_ne!(fresh, t);
    assert_eq!(gw.get("Patient/p1", Some(&fresh)).await.status(), 200);
    // Back up: the rotated key is picked up.
    gw.issuer.rotate_to(k3);
    gw.issuer.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        gw.get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_cache_audit_and_metrics() {
    let gw = Gateway::start(Options {
        discovery: true,
        ..Options::default()
    })
    .await;
    // Token expiring in 2 s: cached, then refused once expired.
    let short = gw.issuer.mint(&fhirwall::sandbox::issuer::Mint {
        scope: "user/*.rs".into(),
        patient: None,
        sub: "user-1".into(),
        client_id: "test-app".into(),
        lifetime_seconds: 2,
    });
    let r1 = gw.get("Patient/p1", Some(&short)).await;
    assert_eq!(r1.status(), 200);
    let id1 = r1.headers()["x-request-id"].to_str().unwrap().to_string();
    let r2 = gw.get("Patient/p2", Some(&short)).await;
    let id2 = r2.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(gw.audit_for(&id1)["token_cache_hit"], false);
    let rec = gw.audit_for(&id2);
    assert_eq!(rec["token_cache_hit"], true);
    assert_eq!(rec["client_id"], "test-app");
    assert_eq!(rec["interaction"], "read");
    assert_eq!(rec["resource_type"], "Patient");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["token_sha256"].as_str().unwrap().len(), 64);
    // The cache-size gauge is read at scrape time: one token, one entry.
    assert!(
        gw.metrics()
            .await
            .lines()
            .any(|l| l == "fhirwall_token_cache_entries 1"),
        "the token cache holds the one token"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = gw.get("Patient/expired-cached-1", Some(&short)).await;
    assert_eq!(r.status(), 401, "a cached token never outlives its exp");
    assert_eq!(gw.upstream.count_containing("expired-cached-1"), 0);

    // Metrics are recorded in the logging phase, just after the answer is
    // sent: wait (bounded) until the last request has been counted.
    let mut m = String::new();
    for _ in 0..50 {
        m = gw.metrics().await;
        if m.contains("fhirwall_request_outcomes_total{reason=\"token_expired\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        m.contains("fhirwall_requests_total{decision=\"allow\",interaction=\"read\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("fhirwall_request_outcomes_total{reason=\"token_expired\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fhirwall_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(
        m.contains("fhirwall_jwks_fetches_total{issuer=\"test\",result=\"success\"}"),
        "{m}"
    );
    let h = gw
        .client
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    // The admin endpoints are read-only: a probe or a scanner that posts
    // is told so.
    for path in ["healthz", "readyz", "metrics"] {
        let r = gw
            .client
            .post(format!("{}/{path}", gw.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path}");
        assert_eq!(r.headers()["allow"], "GET, HEAD", "{path}");
    }
}

#[test]
fn check_reports_every_problem_and_run_refuses_to_start() {
    let dir = support::TempDir::new("check");
    let bad = dir.0.join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: nowhere\nlisten_typo: 1\npublic_base_url: http://x/fhir\nupstream:\n  url: ftp://x\n  timeout_ms: 5\nissuers:\n  - name: a\n    issuer: https://i\n    audiences: []\n    audince: x\n    algorithms: [HS256]\nadmin:\n  listen: 127.0.0.1:1\n",
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(support::bin())
            .args([cmd, "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        // Unknown keys are problems like the others: all reported, each
        // by its path, and `run` starts with none of them.
        for path in [
            "listen:",
            "listen_typo: unknown key",
            "upstream.url:",
            "upstream.timeout_ms: unknown key",
            "issuers[0].jwks_uri:",
            "issuers[0].audiences:",
            "issuers[0].audince: unknown key",
            "issuers[0].algorithms[0]:",
        ] {
            assert!(err.contains(path), "{cmd}: missing {path} in {err}");
        }
    }
    let good = std::process::Command::new(support::bin())
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&good.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    // Valid but weaker than it may look: `check` says so, as `run` does
    // at start; clients' tokens sent in clear are refused.
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"))
        .unwrap()
        .replace("http://127.0.0.1:9090/r4", "http://10.0.0.5:9090/r4");
    let plain = dir.0.join("plain.yaml");
    std::fs::write(&plain, &reference).unwrap();
    let out = std::process::Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&plain)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: upstream.url: plain http off the loopback interface"),
        "{err}"
    );
    std::fs::write(
        &plain,
        reference.replace(
            "forward_authorization: false",
            "forward_authorization: true",
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(support::bin())
            .args([cmd, "--config"])
            .arg(&plain)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(
            err.contains("upstream.forward_authorization: the clients' tokens would go"),
            "{cmd}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_refresh_honours_cache_control() {
    let gw = Gateway::start(Options {
        jwks_yaml: "  refresh_min_seconds: 1\n".into(),
        min_refetch_interval_seconds: 1,
        ..Options::default()
    })
    .await;
    let fetches = || gw.issuer.jwks_fetches.load(Ordering::SeqCst);
    // max-age 300 (the sandbox default): no refresh within 2.5 s.
    let before = fetches();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fetches(), before, "refreshed before max-age");
    // max-age 1: the next refresh (due at 300 s) is far away, so publish the
    // new max-age and a new key, and force one fetch via an unknown kid.
    gw.issuer.max_age_seconds.store(1, Ordering::SeqCst);
    gw.issuer
        .rotate_to(SigningKey::generate(KeyKind::P256, "k-periodic"));
    assert_eq!(
        gw.get("Patient/p1", Some(&gw.mint("user/*.rs", None)))
            .await
            .status(),
        200
    );
    let after_kid = fetches();
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let refreshed = fetches() - after_kid;
    assert!(
        (2..=5).contains(&refreshed),
        "with max-age 1 s expected 2-5 refreshes in 3.6 s, got {refreshed}"
    );
}

/// Reads one response head (up to the blank line) from a raw connection.
fn read_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A client that sends `Expect: 100-continue` and holds its body back
/// (as curl does for large bodies) is told to go on once its token has
/// been checked, and its bundle goes through — without it waiting for a
/// timeout, and without a second `100` from the upstream. A client with a
/// bad token gets its 401 at once and never sends the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_once_the_token_is_checked() {
    use std::io::Write;
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("user/Patient.rs", None);
    let body = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Patient/p1"}}
    ]})
    .to_string();
    let addr = gw.proxy_addr();
    let path = url::Url::parse(&gw.base).unwrap().path().to_string();
    let head = move |auth: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {auth}\r\n\
             Content-Type: application/fhir+json\r\nContent-Length: {len}\r\n\
             Expect: 100-continue\r\n\r\n"
        )
    };
    let forbidden = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Condition/cond-1"}}
    ]})
    .to_string();
    let (good, bad) = (head(&token, body.len()), head("not-a-token", body.len()));
    let outside = head(&token, forbidden.len());
    let (interim, last, refused, denied) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(good.as_bytes()).unwrap();
        let interim = read_head(&mut s);
        s.write_all(body.as_bytes()).unwrap();
        let last = read_head(&mut s);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bad.as_bytes()).unwrap();
        let refused = read_head(&mut s);
        // Told to go on, then refused for what the body asks.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(outside.as_bytes()).unwrap();
        let go_on = read_head(&mut s);
        s.write_all(forbidden.as_bytes()).unwrap();
        (interim, last, refused, (go_on, read_head(&mut s)))
    })
    .await
    .unwrap();
    assert!(interim.starts_with("HTTP/1.1 100"), "interim: {interim:?}");
    assert!(last.starts_with("HTTP/1.1 200"), "final: {last:?}");
    assert!(
        last.to_ascii_lowercase().contains("connection: keep-alive"),
        "the connection stays open after a 100: {last:?}"
    );
    assert!(refused.starts_with("HTTP/1.1 401"), "refused: {refused:?}");
    assert!(denied.0.starts_with("HTTP/1.1 100"), "{denied:?}");
    assert!(denied.1.starts_with("HTTP/1.1 403"), "{denied:?}");
    let posts: Vec<_> = gw
        .upstream
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "only the admitted bundle went upstream");
    assert!(
        !posts[0]
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("expect")),
        "the body was already read: the upstream is not asked to send 100"
    );
}

/// Behind a trusted proxy (an Ingress) the client is the address that
/// proxy forwarded for: it is the audit's `source`, what policies match
/// `source` against, and heads the X-Forwarded-For sent upstream, while
/// whatever the client claimed itself is dropped. (Without trusted
/// proxies the header changes nothing:
/// `spoofable_headers_are_stripped_and_context_forwarded`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_client_is_the_forwarded_address() {
    let dir = support::TempDir::new("trusted-proxy");
    std::fs::write(
        dir.0.join("10-network.yaml"),
        "rules:\n  - name: not-from-the-lab\n    effect: deny\n    when: {source: [203.0.113.0/24]}\n",
    )
    .unwrap();
    let gw = Gateway::start(Options {
        server_yaml: "  trusted_proxies: [127.0.0.1/32]\n".into(),
        extra_yaml: format!("policies:\n  dir: {}\n", dir.0.display()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let get = |id: &'static str, forwarded_for: &'static str| {
        gw.client
            .get(format!("{}/Patient/p1", gw.base))
            .bearer_auth(&token)
            .header("X-Forwarded-For", forwarded_for)
            .header("X-Request-Id", id)
            .send()
    };
    let forwarded = |id: &str| -> Vec<String> {
        let seen = gw.upstream.seen();
        let s = seen
            .iter()
            .find(|s| {
                s.headers
                    .iter()
                    .any(|(k, v)| k == "x-client-request-id" && v == id)
            })
            .expect("reached the upstream");
        s.headers
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .map(|(_, v)| v.clone())
            .collect()
    };

    // The client's own claim (left) is dropped; the Ingress's is taken.
    let r = get("via-ingress-1", "192.0.2.66, 198.51.100.7")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(forwarded("via-ingress-1"), vec!["198.51.100.7, 127.0.0.1"]);
    assert_eq!(gw.audit_for("via-ingress-1")["source"], "198.51.100.7");

    // A policy on `source` sees the forwarded client.
    let r = get("via-ingress-2", "203.0.113.9").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(gw.upstream.seen().iter().all(|s| !s
        .headers
        .iter()
        .any(|(k, v)| k == "x-client-request-id" && v == "via-ingress-2")));
    let rec = gw.audit_for("via-ingress-2");
    assert_eq!(rec["source"], "203.0.113.9");
    assert_eq!(rec["policy_rule"], "10-network.yaml#not-from-the-lab");

    // An entry that is no address ends the walk at the proxy itself.
    let r = get("via-ingress-3", "203.0.113.9, unknown").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(forwarded("via-ingress-3"), vec!["127.0.0.1"]);
    assert_eq!(gw.audit_for("via-ingress-3")["source"], "127.0.0.1");
}

/// The upstream names its product and version on every answer (HAPI's
/// `X-Powered-By`, `Server`); fhirwall passes neither on, whether the
/// answer is proxied, checked (patient/ scopes) or on a public route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_product_and_version_are_not_passed_on() {
    let gw = Gateway::start(Options::default()).await;
    let direct = gw
        .client
        .get(format!("http://{}/r4/metadata", gw.upstream_addr))
        .send()
        .await
        .unwrap();
    assert!(direct.headers().contains_key("x-powered-by"));
    assert!(direct.headers().contains_key("server"));
    let user = gw.mint("user/*.rs", None);
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    for (path, token) in [
        ("metadata", None),
        ("Patient/p1", Some(&user)),
        ("Observation/obs-p1-0", Some(&p1)),
        ("Observation/no-such-1", Some(&p1)),
    ] {
        let r = gw.get(path, token.map(String::as_str)).await;
        assert!(
            matches!(r.status().as_u16(), 200 | 404),
            "{path}: {}",
            r.status()
        );
        for name in ["x-powered-by", "server"] {
            assert!(!r.headers().contains_key(name), "{path}: {name} passed on");
        }
    }
}

/// An upstream's interim answer (103 Early Hints) is passed on without the
/// upstream's private headers, and it is not the upstream's answer: when
/// the upstream then stalls, the record says the read timed out, with no
/// upstream status, and the client's final answer is fhirwall's 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_answer_then_a_stall_is_a_timeout_not_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An interim answer, and then nothing.
    let (addr, upstream) = support::raw_upstream(
        |_| {
            b"HTTP/1.1 103 Early Hints\r\nLink: </r4/Patient/p2>; rel=preload\r\n\
              Set-Cookie: session=SECRET-COOKIE\r\nServer: Legacy-FHIR/1.0\r\n\
              X-Powered-By: HAPI FHIR 5.0\r\n\r\n"
                .to_vec()
        },
        Duration::from_secs(30),
    )
    .await;
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        read_timeout_ms: 500,
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    let mut c = tokio::net::TcpStream::connect(gw.proxy_addr())
        .await
        .unwrap();
    let head = format!(
        "GET /fhir/Patient/p1 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n",
        gw.proxy_addr()
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(text.starts_with("HTTP/1.1 103"), "{text}");
    for private in ["SECRET-COOKIE", "Legacy-FHIR", "HAPI FHIR"] {
        assert!(!text.contains(private), "{private} passed on: {text}");
    }
    // Its link is under the public base, as the client may follow it.
    assert!(
        text.to_ascii_lowercase()
            .contains("link: </fhir/patient/p2>; rel=preload"),
        "{text}"
    );
    let final_head = text
        .split("\r\n\r\n")
        .nth(1)
        .expect("a final answer after the interim one");
    assert!(final_head.starts_with("HTTP/1.1 504"), "{text}");
    let id = final_head
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("the final answer names its request")
        .to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "upstream_timeout", "{rec}");
    assert_eq!(rec["status"], 504, "{rec}");
    assert!(rec.get("upstream_status").is_none(), "{rec}");
    upstream.abort();
}

/// An upstream answer's hop-by-hop headers (and those its `Connection`
/// lists) stay behind; an upstream that switches protocols, which no
/// request fhirwall sends asks for (the client's `Upgrade` is not
/// forwarded), is a failure, never a tunnel between client and upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_hop_by_hop_headers_and_protocol_switch_stay_behind_its_paths_move() {
    let (addr, upstream) = support::raw_upstream(
        |head| {
            if head.contains("/switch") {
                return b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                      Upgrade: websocket\r\n\r\nRAW-TUNNEL-BYTES"
                    .to_vec();
            }
            // p1's Observation, or p1 (42 bytes).
            let body = if head.contains("/Observation/") {
                r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"}}"#
            } else {
                r#"{"resourceType":"Patient","id":"p1","a":1}"#
            };
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n\
                 Connection: X-Internal-Route\r\nX-Internal-Route: db-7\r\n\
                 Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\
                 Upgrade: h2c\r\nContent-Location: /r4/Patient/p1/_history/3\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        },
        Duration::from_secs(3),
    )
    .await;
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    // Passed on as it came (user/), and fetched and checked (patient/).
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let checked = gw.get("Observation/o1", Some(&p1)).await;
    let r = gw.get("Patient/p1", Some(&token)).await;
    for r in [&checked, &r] {
        assert_eq!(r.status(), 200);
        for name in [
            "x-internal-route",
            "keep-alive",
            "proxy-authenticate",
            "upgrade",
        ] {
            assert!(r.headers().get(name).is_none(), "{name}: {:?}", r.headers());
        }
    }
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    // A path-absolute URL under the upstream's path is moved too.
    assert_eq!(
        r.headers()["content-location"],
        "/fhir/Patient/p1/_history/3"
    );
    assert_eq!(r.text().await.unwrap().len(), 42);

    let r = gw.get("Patient/switch", Some(&token)).await;
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(!body.contains("RAW-TUNNEL"), "{body}");
    upstream.abort();
}
