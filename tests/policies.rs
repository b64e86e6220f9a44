//! Operators' policies through the real binary: rules narrow what the
//! scopes grant, name themselves in the denial, and are checked by
//! `fhirwall check` with file, rule and key.

mod support;

use serde_json::json;
use support::{Gateway, Options, TempDir};

const POLICY: &str = "rules:
  - name: no-deletes
    description: nobody deletes through the gateway
    effect: deny
    when: {interaction: [delete]}
  - name: conditions-need-dpop
    effect: require
    when: {resource_type: [Condition]}
    require: {binding: [dpop]}
  - name: no-everything-for-the-research-client
    effect: deny
    when: {client_id: [test-app], path: ['Patient/*/$everything']}
";

async fn start(dir: &TempDir) -> Gateway {
    std::fs::write(dir.0.join("10-hospital.yaml"), POLICY).unwrap();
    std::fs::write(dir.0.join("README.md"), "not a policy").unwrap();
    with_policies(dir).await
}

/// Three searches `Observation?code=<prefix>-<i>` with `token`, each
/// served, then the answer to a fourth (`<prefix>-over`).
async fn past_three_searches(gw: &Gateway, token: &str, prefix: &str) -> reqwest::Response {
    gw.searches_served(token, prefix, 3).await;
    gw.get(&format!("Observation?code={prefix}-over"), Some(token))
        .await
}

/// A gateway whose policy directory (`tag`'s) holds `file` with `yaml`.
async fn with_rules(tag: &str, file: &str, yaml: &str) -> (TempDir, Gateway) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.0.join(file), yaml).unwrap();
    let gw = with_policies(&dir).await;
    (dir, gw)
}

/// A gateway whose `policies.dir` is `dir`.
async fn with_policies(dir: &TempDir) -> Gateway {
    Gateway::start(Options {
        extra_yaml: format!("policies:\n  dir: {}\n", dir.0.display()),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_narrow_the_grant_and_name_themselves() {
    let dir = TempDir::new("policies");
    let gw = start(&dir).await;
    let token = gw.mint("user/*.cruds", None);

    // Allowed by the scopes, refused by a rule; nothing reaches the upstream.
    let r = gw
        .client
        .delete(format!("{}/Observation/policy-delete-1", gw.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("10-hospital.yaml#no-deletes"), "{www}");
    let body = r.text().await.unwrap();
    assert!(body.contains("policy_denied"), "{body}");
    assert_eq!(gw.upstream.count_containing("policy-delete-1"), 0);

    // A requirement not met.
    let r = gw.get("Condition/cond-p1", Some(&token)).await;
    assert_eq!(r.status(), 403);
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(www.contains("requires a dpop binding"), "{www}");

    // A path pattern for one client.
    let r = gw.get("Patient/p1/$everything", Some(&token)).await;
    assert_eq!(r.status(), 403);

    // Untouched by the rules: allowed.
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&token)).await.status(),
        200
    );

    // A Bundle entry is checked too.
    let batch = |entries: serde_json::Value| {
        gw.client
            .post(format!("{}/", gw.base))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "Bundle", "type": "batch", "entry": entries}).to_string())
            .send()
    };
    let r = batch(json!([
        {"request": {"method": "GET", "url": "Observation/obs-p1-0"}},
        {"request": {"method": "DELETE", "url": "Observation/policy-delete-2"}}]))
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.count_containing("policy-delete-2"), 0);

    // A path rule sees an entry's whole path, not only its type and id:
    // `$everything` refused at the top level is refused inside a batch.
    let before = gw.upstream.seen().len();
    let r = batch(json!([{"request": {"method": "GET", "url": "Patient/p1/$everything"}}]))
        .await
        .unwrap();
    let status = r.status();
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(status, 403);
    assert!(
        www.contains("no-everything-for-the-research-client"),
        "{www}"
    );
    assert_eq!(gw.upstream.seen().len(), before, "the batch went upstream");

    // The audit names the rule.
    let audit = gw.audit_containing("\"reason\":\"policy_denied\"");
    assert!(audit.contains("\"reason\":\"policy_denied\""), "{audit}");
    assert!(
        audit.contains("\"policy_rule\":\"10-hospital.yaml#no-deletes\""),
        "{audit}"
    );
}

#[test]
fn check_names_file_rule_and_key() {
    let dir = TempDir::new("policies-bad");
    let pol = dir.0.join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::write(
        pol.join("a.yaml"),
        "rules:\n  - {name: x, effect: deny, when: {interaction: [reed]}}\n",
    )
    .unwrap();
    std::fs::write(
        pol.join("b.yaml"),
        "rules:\n  - {name: y, effect: deny, whenn: {}}\n",
    )
    .unwrap();
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: http://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: a\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [x]\n\
         admin:\n  listen: 127.0.0.1:3\npolicies:\n  dir: policies\n",
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("a.yaml (line 2): rules[0].when.interaction"),
        "{text}"
    );
    assert!(text.contains("b.yaml") && text.contains("whenn"), "{text}");
    assert!(text.contains("line"), "YAML errors carry a line: {text}");
    // A rule naming an issuer that is not configured could never hold.
    std::fs::write(
        pol.join("c.yaml"),
        "rules:\n  - {name: z, effect: deny, when: {issuer: [lokal], interaction: [delete]}}\n",
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("c.yaml: rule 'z' when.issuer") && text.contains("'lokal'"),
        "{text}"
    );
    // Mended: check says how many rules it read.
    for f in ["b.yaml", "c.yaml"] {
        std::fs::remove_file(pol.join(f)).unwrap();
    }
    std::fs::write(
        pol.join("a.yaml"),
        "rules:\n  - {name: x, effect: deny, when: {interaction: [delete]}}\n  \
         - {name: w, effect: deny, when: {interaction: [patch]}}\n",
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(ok && text.contains("2 policy rule(s)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_client() {
    let (_dir, gw) = with_rules(
        "policies-rate",
        "10-limits.yaml",
        "rules:\n  - name: three-searches-a-minute\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 3, per_seconds: 60}\n",
    )
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = past_three_searches(&gw, &token, "rate").await;
    assert_eq!(r.status(), 429);
    let wait = support::retry_after(&r);
    assert!((1..=20).contains(&wait), "{wait}");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("throttled") && body.contains("three-searches-a-minute"),
        "{body}"
    );
    assert_eq!(gw.upstream.count_containing("rate-over"), 0);
    // Reads are not limited by that rule; another client has its own bucket.
    assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
    let mut c = gw.claims("user/*.rs");
    c["client_id"] = json!("another-app");
    let other = gw.issuer.signing_key().sign(&c);
    assert_eq!(
        gw.get("Observation?code=rate-other", Some(&other))
            .await
            .status(),
        200
    );
    // A token naming no client counts by its source address: a fresh token
    // buys no fresh bucket (this test's tokens all come from 127.0.0.1).
    let anonymous = |jti: &str| {
        let mut c = gw.claims("user/*.rs");
        let o = c.as_object_mut().unwrap();
        o.remove("client_id");
        o.remove("azp");
        o.insert("jti".into(), json!(jti));
        gw.issuer.signing_key().sign(&c)
    };
    let r = past_three_searches(&gw, &anonymous("a"), "anon").await;
    assert_eq!(r.status(), 429);
    let r = gw
        .get("Observation?code=anon-second", Some(&anonymous("b")))
        .await;
    assert_eq!(r.status(), 429);
    // ... while a token naming its client still has that client's bucket.
    assert_eq!(
        gw.get("Observation?code=rate-other-2", Some(&other))
            .await
            .status(),
        200
    );

    // A batch counts each entry the rule matches: four searches are more
    // than the bucket ever holds, two leave room for one more.
    let mut c = gw.claims("user/*.rs");
    c["client_id"] = json!("batch-app");
    let batcher = gw.issuer.signing_key().sign(&c);
    let batch = |n: usize, tag: &str| {
        let entries: Vec<_> = (0..n)
            .map(|i| json!({"request": {"method": "GET", "url": format!("Observation?code={tag}-{i}")}}))
            .collect();
        json!({"resourceType": "Bundle", "type": "batch", "entry": entries}).to_string()
    };
    let before = gw.upstream.seen().len();
    let r = gw
        .post_bundle(&batcher, batch(4, "batch-big"))
        .send()
        .await
        .unwrap();
    // More than the bucket ever holds: no wait helps (413, no Retry-After).
    assert_eq!(r.status(), 413);
    assert!(r.headers().get("retry-after").is_none());
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("this Bundle has 4 entries"));
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a throttled batch went upstream"
    );
    let r = gw
        .post_bundle(&batcher, batch(2, "batch-two"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        gw.get("Observation?code=batch-third", Some(&batcher))
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.get("Observation?code=batch-fourth", Some(&batcher))
            .await
            .status(),
        429
    );
}

/// A request counted against several limits is taken from all or none:
/// one user over its own limit does not empty its client's bucket for the
/// client's other users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_one_limit_spends_none_of_the_others() {
    let (_dir, gw) = with_rules(
        "policies-rate-all",
        "10-limits.yaml",
        "rules:\n  - name: user-budget\n    effect: require\n    require: {binding: [bearer]}\n    when: {interaction: [search-type]}\n    rate_limit: {per: user, requests: 2, per_seconds: 3600}\n  - name: client-budget\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 4, per_seconds: 3600}\n",
    )
    .await;
    let as_user = |sub: &str| {
        let mut c = gw.claims("user/*.rs");
        c["sub"] = json!(sub);
        gw.issuer.signing_key().sign(&c)
    };
    let (u1, u2, u3) = (as_user("u1"), as_user("u2"), as_user("u3"));
    let search = |token: &str, tag: String| {
        let (gw, token) = (&gw, token.to_string());
        async move {
            let r = gw
                .get(&format!("Observation?code={tag}"), Some(&token))
                .await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    };
    for i in 0..2 {
        assert_eq!(search(&u1, format!("all-u1-{i}")).await.0, 200);
    }
    for i in 2..8 {
        let (status, body) = search(&u1, format!("all-u1-{i}")).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("user-budget"), "{body}");
    }
    // The client's bucket still holds the two u1's refusals did not take.
    for i in 0..2 {
        let (status, body) = search(&u2, format!("all-u2-{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = search(&u3, "all-u3".into()).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("client-budget"), "{body}");
    assert_eq!(gw.upstream.count_containing("all-u1-"), 2);
    assert_eq!(gw.upstream.count_containing("all-u3"), 0);
}

/// A stored search's page is served whatever search its id names, so it
/// is judged type by type, as a read and a search of each: under a rule
/// denying a resource type (by name or by path) the page is asked for,
/// and refused only if its answer holds that type (paging through other
/// searches keeps working, under an allow-list of reads and searches
/// too); a rule refusing every type refuses it before the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_page_is_refused_only_for_the_types_rules_deny() {
    for (rules, rule) in [
        (
            "rules:\n  - {name: no-conditions, effect: deny, when: {resource_type: [Condition]}}\n  \
             - {name: no-launch-apps, effect: deny, when: {scope: [launch]}}\n",
            "no-conditions",
        ),
        (
            "rules:\n  - {name: no-condition-paths, effect: deny, when: {path: ['Condition/**']}}\n",
            "no-condition-paths",
        ),
        (
            "rules:\n  - {name: viewer, effect: allow, when: {interaction: [read, search-type], resource_type: [Observation]}}\n  \
             - {name: nothing-else, effect: deny}\n",
            "nothing-else",
        ),
    ] {
        let (_dir, gw) = with_rules("policies-pages", "10-types.yaml", rules).await;
        let token = gw.mint("user/Observation.rs user/Condition.rs", None);
        let r = gw.get("?_getpages=Observation", Some(&token)).await;
        assert_eq!(r.status(), 200, "{rule}");
        assert!(r.text().await.unwrap().contains("obs-p1-1"));

        let before = gw.upstream.seen().len();
        let r = gw.get("?_getpages=Condition", Some(&token)).await;
        assert_eq!(r.status(), 403, "{rule}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let text = r.text().await.unwrap();
        assert!(text.contains(rule), "{text}");
        assert!(
            !text.contains("cond-p1"),
            "a refused page's resources were passed on"
        );
        assert_eq!(
            gw.upstream.seen().len(),
            before + 1,
            "the page was asked for"
        );
        let rec = gw.audit_for(&id);
        assert_eq!(rec["reason"], "policy_denied", "{rec}");
        assert_eq!(rec["policy_rule"], format!("10-types.yaml#{rule}"), "{rec}");
        if rule != "no-conditions" {
            continue;
        }

        // (A rule may name any scope, `launch` too.)
        let launch = gw.mint("user/Observation.rs launch", None);
        let before = gw.upstream.seen().len();
        let r = gw.get("?_getpages=Observation", Some(&launch)).await;
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("no-launch-apps"));
        assert_eq!(
            gw.upstream.seen().len(),
            before,
            "a page refused for every type went upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_type_is_not_reached_through_includes_or_everything() {
    let (_dir, gw) = with_rules(
        "policies-reach",
        "10-types.yaml",
        "rules:\n  - {name: no-conditions, effect: deny, when: {resource_type: [Condition]}}\n",
    )
    .await;
    let token = gw.mint("user/*.rs", None);
    assert_eq!(
        gw.get("Observation?code=reach-0", Some(&token))
            .await
            .status(),
        200
    );
    let before = gw.upstream.seen().len();
    for rel in [
        "Patient?_id=p1&_revinclude=Condition:subject&code=reach-1",
        "Patient?_has:Condition:subject:code=reach-2",
        "Patient/p1/$everything",
        "_history",
        "Observation?code=reach-3&_include=*",
        "Observation?code=reach-4&_include=Observation:*:Patient",
        "Observation?code=reach-5&_include:iterate=Observation:*:Patient",
    ] {
        let r = gw.get(rel, Some(&token)).await;
        assert_eq!(r.status(), 403, "{rel}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("no-conditions") && text.contains("reaches Condition"),
            "{rel}: {text}"
        );
    }
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a request reaching a refused type went upstream"
    );
}

/// An operation on a type reads that type too: a rule refusing reads of
/// Patient holds for `Patient/p1/$everything`, though an allow naming the
/// operation follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_reading_a_type_holds_for_its_operations() {
    let (_dir, gw) = with_rules(
        "policies-own-type",
        "10-types.yaml",
        "rules:\n  - {name: no-patient-reads, effect: deny, when: {resource_type: [Patient], interaction: [read, search-type]}}\n  \
         - {name: everything, effect: allow, when: {operation: [everything]}}\n",
    )
    .await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Observation?code=own-0", Some(&token)).await;
    assert_eq!(r.status(), 200);
    let before = gw.upstream.seen().len();
    let r = gw.get("Patient/p1/$everything", Some(&token)).await;
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("no-patient-reads") && text.contains("reaches Patient"),
        "{text}"
    );
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "the operation went upstream"
    );
}

/// Every `.yaml`/`.yml` entry of the policy directory, in any case, is a
/// policy file and must be readable: one skipped without a word (a
/// symlink into a volume not mounted, a directory) would look enforced.
/// Other names are not policies.
#[test]
fn every_policy_file_is_read_or_named() {
    let dir = TempDir::new("policies-entries");
    let pol = dir.0.join("policies");
    std::fs::create_dir_all(pol.join("d.yml")).unwrap();
    std::fs::write(
        pol.join("a.yaml"),
        "rules:\n  - {name: ok, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    std::fs::write(
        pol.join("B.YAML"),
        "rules:\n  - {name: upper, effect: deny, when: {interaction: [reed]}}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(dir.0.join("not-mounted/deny.yaml"), pol.join("c.yaml")).unwrap();
    std::fs::write(pol.join("README.md"), "not a policy").unwrap();
    // An editor's lock: a hidden dangling symlink, not a policy.
    std::os::unix::fs::symlink("user@host.1234", pol.join(".#a.yaml")).unwrap();
    std::fs::write(pol.join("e.yaml.off"), "not: [a policy").unwrap();
    let config = offline_config(&dir);
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    assert!(text.contains("B.YAML") && text.contains("reed"), "{text}");
    assert!(
        text.contains("c.yaml: cannot be read") && text.contains("dangling symlink"),
        "{text}"
    );
    assert!(text.contains("d.yml: is not a regular file"), "{text}");
    assert!(
        !text.contains("README") && !text.contains("e.yaml.off") && !text.contains(".#a.yaml"),
        "{text}"
    );
}

/// The offline commands decide from the rules and the claims: they run
/// without the secrets, certificates and upstream that serving needs (a
/// CI job reviewing policies), which `check` still requires.
#[test]
fn explain_and_test_need_no_serving_secrets() {
    let dir = TempDir::new("policies-offline-secrets");
    let config = offline_config(&dir);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "upstream:\n  url: http://127.0.0.1:2/fhir\n",
        "upstream:\n  url: http://fhir.internal.invalid/fhir\n",
    );
    text.push_str(
        "dpop:\n  require_nonce: true\n  nonce_key_file: /run/secrets/absent.key\n\
         tls:\n  cert_file: /run/secrets/absent.pem\n  key_file: /run/secrets/absent-key.pem\n",
    );
    std::fs::write(&config, text).unwrap();
    let claims = dir.0.join("claims.json");
    std::fs::write(
        &claims,
        r#"{"iss": "https://as.example", "aud": "https://gw.example/fhir", "exp": 4000000000, "client_id": "test-app", "scope": "user/*.rs"}"#,
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let (ok, out) = support::run_bin(&[
        "explain",
        "--config",
        c,
        "--claims",
        claims.to_str().unwrap(),
        "--url",
        "Observation/o1",
    ]);
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    let (ok, out) = support::check(&config);
    assert!(!ok, "{out}");
    for key in ["dpop.nonce_key_file", "tls.cert_file", "upstream.url"] {
        assert!(out.contains(key), "{key}: {out}");
    }
}

/// A config with the hospital policy, for the offline commands.
fn offline_config(dir: &TempDir) -> std::path::PathBuf {
    let pol = dir.0.join("policies");
    std::fs::create_dir_all(pol.join("tests")).unwrap();
    std::fs::write(pol.join("10-hospital.yaml"), POLICY).unwrap();
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: hospital\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [https://gw.example/fhir]\n\
         admin:\n  listen: 127.0.0.1:3\npolicies:\n  dir: policies\n",
    )
    .unwrap();
    config
}

#[test]
fn explain_and_test_replay_decisions_offline() {
    let dir = TempDir::new("explain");
    let config = offline_config(&dir);
    // A claims file for patient p1 with these scopes.
    let claims_file = |name: &str, scope: &str| {
        let path = dir.0.join(name);
        std::fs::write(
            &path,
            json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
                   "exp": 4_000_000_000u64, "client_id": "test-app", "scope": scope,
                   "patient": "p1"})
            .to_string(),
        )
        .unwrap();
        path
    };
    let claims = claims_file("claims.json", "user/*.cruds patient/*.rs");
    let c = config.to_str().unwrap();
    let cl = claims.to_str().unwrap();
    // `fhirwall explain` with this config and a claims file.
    let explain = |claims: &str, rest: &[&str]| {
        let mut args = vec!["explain", "--config", c, "--claims", claims];
        args.extend_from_slice(rest);
        support::run_bin(&args)
    };
    let (ok, out) = explain(cl, &["--url", "Observation?code=1"]);
    assert!(ok, "{out}");
    for stage in [
        "route", "validate", "bind", "classify", "decide", "policies", "proxy",
    ] {
        assert!(out.contains(stage), "{stage}: {out}");
    }
    assert!(out.contains("=> ALLOW"), "{out}");
    let (ok, out) = explain(cl, &["--method", "DELETE", "--url", "Observation/o1"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("=> DENY (rule 10-hospital.yaml#no-deletes)"),
        "{out}"
    );
    let (ok, out) = explain(cl, &["--url", "Condition/c1"]);
    assert!(!ok && out.contains("requires a dpop binding"), "{out}");
    // A stored page may hold Conditions: allowed, and its answer refused
    // if it does.
    let (ok, out) = explain(cl, &["--url", "?_getpages=abc"]);
    assert!(
        ok && out.contains("refuses on this page (Condition)"),
        "{out}"
    );
    // What the gateway refuses after the decision, explain refuses too: an
    // answer checked under patient scopes must come whole.
    let patient_only = claims_file("patient-claims.json", "patient/*.rs");
    let (ok, out) = explain(
        patient_only.to_str().unwrap(),
        &["--url", "Observation/o1?_elements=id"],
    );
    assert!(!ok && out.contains("must be whole FHIR JSON"), "{out}");
    // A written resource's conditional reference is decided like a search.
    let narrow = claims_file("writer-claims.json", "user/Observation.cu");
    let written = dir.0.join("observation.json");
    std::fs::write(
        &written,
        json!({"resourceType": "Observation",
               "subject": {"reference": "Patient?identifier=urn:mrn|1"}})
        .to_string(),
    )
    .unwrap();
    let (ok, out) = explain(
        narrow.to_str().unwrap(),
        &[
            "--method",
            "POST",
            "--url",
            "Observation",
            "--body",
            written.to_str().unwrap(),
        ],
    );
    assert!(!ok && out.contains("Patient.s"), "{out}");
    // The body is read as its Content-Type says: a Binary's raw content is
    // not, an XML resource cannot be.
    let binary = claims_file("binary-claims.json", "user/Binary.c user/Observation.c");
    let raw = dir.0.join("scan.png");
    std::fs::write(&raw, "PNG Patient?identifier=x").unwrap();
    for (url, content_type, allowed) in [
        ("Binary", "image/png", true),
        ("Observation", "application/fhir+xml", false),
    ] {
        let (ok, out) = explain(
            binary.to_str().unwrap(),
            &[
                "--method",
                "POST",
                "--url",
                url,
                "--body",
                raw.to_str().unwrap(),
                "--content-type",
                content_type,
            ],
        );
        assert_eq!(ok, allowed, "{url} as {content_type}: {out}");
        if !allowed {
            assert!(out.contains("cannot read 'application/fhir+xml'"), "{out}");
        }
    }
    // A Bundle with more entries than a rule's bucket ever holds: the
    // gateway answers 413 whatever the bucket holds, and explain says so.
    std::fs::write(
        dir.0.join("policies/20-limits.yaml"),
        "rules:\n  - {name: two-searches, effect: allow, when: {scope: [user/Observation.rs], interaction: [search-type]}, \
         rate_limit: {per: client, requests: 2, per_seconds: 60}}\n",
    )
    .unwrap();
    let searcher = claims_file("searcher-claims.json", "user/Observation.rs");
    let batch = |n: usize| {
        let path = dir.0.join(format!("batch-{n}.json"));
        let entries: Vec<_> = (0..n)
            .map(|i| json!({"request": {"method": "GET", "url": format!("Observation?code={i}")}}))
            .collect();
        std::fs::write(
            &path,
            json!({"resourceType": "Bundle", "type": "batch", "entry": entries}).to_string(),
        )
        .unwrap();
        path
    };
    for (n, allowed) in [(2, true), (3, false)] {
        let body = batch(n);
        let (ok, out) = explain(
            searcher.to_str().unwrap(),
            &[
                "--method",
                "POST",
                "--url",
                "",
                "--body",
                body.to_str().unwrap(),
            ],
        );
        assert_eq!(ok, allowed, "{n} entries: {out}");
        assert_eq!(
            out.contains("413: this Bundle has 3 entries that policy rule 20-limits.yaml#two-searches counts"),
            !allowed,
            "{out}"
        );
    }
    std::fs::remove_file(dir.0.join("policies/20-limits.yaml")).unwrap();
    // The token itself: its claims are read (the signature is not checked offline).
    use base64::Engine;
    let payload =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(std::fs::read(&claims).unwrap());
    let token = format!("eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln");
    let (ok, out) = support::run_bin(&[
        "explain",
        "--config",
        c,
        "--token",
        &token,
        "--url",
        "Observation?code=1",
    ]);
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    // `--token -`: from standard input, off the command line.
    let mut child = std::process::Command::new(support::bin())
        .args([
            "explain",
            "--config",
            c,
            "--token",
            "-",
            "--url",
            "Observation?code=1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{token}").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("=> ALLOW"), "{text}");

    // Policy tests: expectations met, then one that is not.
    let tests = dir.0.join("policies/tests/hospital.yaml");
    let case = |name: &str, method: &str, url: &str, decision: &str, rule: &str| {
        format!(
            "  - name: {name}\n    claims: {{iss: 'https://as.example', aud: 'https://gw.example/fhir', exp: 4000000000, client_id: test-app, scope: 'user/*.cruds'}}\n    request: {{method: {method}, url: '{url}'}}\n    expect: {{decision: {decision}{rule}}}\n"
        )
    };
    let good = format!(
        "cases:\n{}{}{}",
        case("reads pass", "GET", "Observation/o1", "allow", ""),
        case(
            "no deletes",
            "DELETE",
            "Observation/o1",
            "deny",
            ", rule: '10-hospital.yaml#no-deletes'"
        ),
        case(
            "everything is refused for the app",
            "GET",
            "Patient/p1/$everything",
            "deny",
            ", rule: '10-hospital.yaml#no-everything-for-the-research-client'"
        ),
    );
    std::fs::write(&tests, &good).unwrap();
    let t = tests.to_str().unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", c, t]);
    assert!(ok, "{out}");
    assert!(out.contains("3 case(s), 0 failed"), "{out}");
    std::fs::write(
        &tests,
        format!(
            "cases:\n{}",
            case("wrong expectation", "DELETE", "Observation/o1", "allow", "")
        ),
    )
    .unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", c, t]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("wrong expectation"),
        "{out}"
    );
    // A case whose own input is broken (a time that does not parse) fails
    // when it expects a deny: nothing was decided.
    std::fs::write(
        &tests,
        "cases:\n  - name: broken time\n    claims: {iss: 'https://as.example', aud: 'https://gw.example/fhir', exp: 4000000000, client_id: test-app, scope: 'user/*.cruds'}\n    request: {method: DELETE, url: 'Observation/o1', at: 'yesterday'}\n    expect: {decision: deny}\n",
    )
    .unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", c, t]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("broken time") && out.contains("got error"),
        "{out}"
    );
    // explain says so with its own exit code: 2, not a deny's 1.
    let claims = dir.0.join("claims.json");
    std::fs::write(
        &claims,
        r#"{"iss": "https://as.example", "aud": "https://gw.example/fhir", "exp": 4000000000, "scope": "user/*.rs"}"#,
    )
    .unwrap();
    let out = std::process::Command::new(support::bin())
        .args(["explain", "--config", c, "--claims"])
        .arg(&claims)
        .args(["--url", "Observation/o1", "--at", "yesterday"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("=> ERROR"), "{text}");
}

/// The shipped example policy sets pass their own tests (so `cargo test`,
/// and .ci/run, review them like code).
#[test]
fn shipped_examples_pass_their_tests() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, out) = support::run_bin(&[
        "test",
        "--config",
        &format!("{root}/policies/examples/config/example-config.yaml"),
        &format!("{root}/policies/examples/tests"),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("19 case(s), 0 failed"), "{out}");
}

/// A later page of `$everything` is widened to the operation's answer
/// (the Practitioners it references) only while the operation is allowed:
/// when that takes a declared emergency, each such page is audited as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_everything_widened_by_break_glass_is_audited() {
    let (_dir, gw) = with_rules(
        "policies-bg-pages",
        "10-bg.yaml",
        "rules:\n  - name: no-everything\n    effect: deny\n    break_glass: true\n    when: {operation: [everything]}\n",
    )
    .await;
    let token = gw.mint("patient/*.rs", Some("p1"));
    let get = |url: String, reason: Option<&'static str>| {
        let mut r = gw.client.get(url).bearer_auth(&token);
        if let Some(reason) = reason {
            r = r.header("x-fhirwall-break-glass", reason);
        }
        async move { r.send().await.unwrap() }
    };
    let reason = "patient unconscious in ED";
    let first = format!("{}/Patient/p1/$everything?_count=2", gw.base);
    assert_eq!(get(first.clone(), None).await.status(), 403);
    // Walk the pages in the emergency, to the one holding the Practitioner.
    let mut next = Some(first);
    let mut practitioner_page = None;
    while let Some(url) = next.take() {
        let r = get(url.clone(), Some(reason)).await;
        assert_eq!(r.status(), 200, "{url}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let page: serde_json::Value = r.json().await.unwrap();
        let rec = gw.audit_for(&id);
        assert_eq!(
            rec["break_glass_rules"],
            json!(["10-bg.yaml#no-everything"]),
            "{url}: {rec}"
        );
        assert_eq!(rec["break_glass_reason"], reason, "{rec}");
        if page.to_string().contains("\"Practitioner\"") {
            practitioner_page = Some(url.clone());
        }
        next = page["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str().map(str::to_string))
        });
    }
    // Without the emergency that page is any stored page: the
    // Practitioner is in no patient's compartment.
    let page = practitioner_page.expect("a page with the Practitioner");
    assert!(page.contains("_getpages="), "{page}");
    assert_eq!(get(page, None).await.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_passes_marked_denies_only() {
    let (_dir, gw) = with_rules(
        "policies-bg",
        "10-bg.yaml",
        "rules:\n  - name: conditions-locked\n    effect: deny\n    break_glass: true\n    when: {resource_type: [Condition]}\n  - name: no-deletes\n    effect: deny\n    when: {interaction: [delete]}\n  - name: one-condition-read\n    effect: require\n    require: {binding: [bearer]}\n    when: {resource_type: [Condition]}\n    rate_limit: {per: client, requests: 1, per_seconds: 3600}\n",
    )
    .await;
    let token = gw.mint("user/*.cruds", None);
    let with = |rel: &str, method: reqwest::Method, reason: Option<&str>, tok: &str| {
        let mut r = gw
            .client
            .request(method, format!("{}/{rel}", gw.base))
            .bearer_auth(tok);
        if let Some(reason) = reason {
            r = r.header("x-fhirwall-break-glass", reason);
        }
        r.send()
    };
    let get = reqwest::Method::GET;
    assert_eq!(
        with("Condition/cond-p1", get.clone(), None, &token)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        with("Condition/cond-p1", get.clone(), Some("  "), &token)
            .await
            .unwrap()
            .status(),
        403,
        "no reason"
    );
    let r = with(
        "Condition/cond-p1",
        get.clone(),
        Some("patient unconscious in ED"),
        &token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(
        rec["break_glass_reason"], "patient unconscious in ED",
        "{rec}"
    );
    assert_eq!(
        rec["break_glass_rules"][0], "10-bg.yaml#conditions-locked",
        "{rec}"
    );
    // The reason never reaches the upstream.
    let seen = gw.upstream.seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("cond-p1"))
        .unwrap();
    assert!(!last
        .headers
        .iter()
        .any(|(k, _)| k == "x-fhirwall-break-glass"));
    // Not break-glass-able: still refused.
    let r = with(
        "Observation/bg-delete-1",
        reqwest::Method::DELETE,
        Some("emergency"),
        &token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.count_containing("bg-delete-1"), 0);
    // Scopes are never passed.
    let narrow = gw.mint("user/Observation.rs", None);
    let r = with("Condition/cond-p2", get, Some("emergency"), &narrow)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("Condition"));
    // An emergency access a later check refuses (the rate limit) did not
    // happen: not recorded, counted or logged as break-glass.
    let r = with(
        "Condition/cond-p1",
        reqwest::Method::GET,
        Some("still unconscious"),
        &token,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 429);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "rate_limited", "{rec}");
    assert!(
        rec.get("break_glass_rules")
            .is_none_or(|r| r.as_array().is_some_and(|a| a.is_empty())),
        "{rec}"
    );
    assert!(
        rec.get("break_glass_reason")
            .is_none_or(serde_json::Value::is_null),
        "{rec}"
    );
    let m = gw.metrics().await;
    assert!(m.contains("fhirwall_break_glass_total 1"), "{m}");
    assert!(!std::fs::read_to_string(gw.dir.join("stderr.log"))
        .unwrap()
        .contains("still unconscious"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_ceilings_bound_the_grant() {
    let gw = Gateway::start(Options {
        extra_yaml: "roles:\n  claim: roles\n  map:\n    ward-nurse: {scopes: ['user/Observation.rs'], interactions: [read, search-type]}\n    pharmacist: {scopes: ['user/MedicationRequest.cruds']}\n".into(),
        ..Options::default()
    })
    .await;
    let token = |roles: serde_json::Value| {
        let mut c = gw.claims("user/*.cruds");
        c["roles"] = roles;
        gw.issuer.signing_key().sign(&c)
    };
    let nurse = token(json!(["ward-nurse"]));
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&nurse)).await.status(),
        200
    );
    // The token's scopes allow Conditions; the role's ceiling does not.
    let r = gw.get("Condition/role-cond-1", Some(&nurse)).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("ward-nurse"));
    assert_eq!(gw.upstream.count_containing("role-cond-1"), 0);
    let r = gw
        .client
        .delete(format!("{}/Observation/role-del-1", gw.base))
        .bearer_auth(&nurse)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Two roles: the ceilings add up.
    let both = token(json!(["ward-nurse", "pharmacist"]));
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&both)).await.status(),
        200
    );
    assert_ne!(
        gw.get("MedicationRequest/role-mr-1", Some(&both))
            .await
            .status(),
        403
    );
    // No mapped role: refused (roles.unmapped: deny by default).
    let nobody = token(json!(["visitor"]));
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&nobody)).await.status(),
        403
    );
    let none = gw.mint("user/*.cruds", None);
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&none)).await.status(),
        403
    );
}

/// A ceiling of `patient/` scopes over a `user/` token: the request is
/// decided as the narrower scopes would decide it, with their answer check
/// and narrowing, not merely "allowed by both".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_ceiling_confines_a_user_token_to_the_patient() {
    let gw = Gateway::start(Options {
        extra_yaml: "roles:\n  claim: roles\n  map:\n    clinician: {scopes: ['patient/*.read']}\n"
            .into(),
        ..Options::default()
    })
    .await;
    let token = |patient: Option<&str>| {
        let mut c = gw.claims("user/*.cruds");
        c["roles"] = json!(["clinician"]);
        if let Some(p) = patient {
            c["patient"] = json!(p);
        }
        gw.issuer.signing_key().sign(&c)
    };
    let p1 = token(Some("p1"));
    let r = gw.get("Observation/obs-p1-0", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.status(), 200);
    let rec = gw.audit_for(&id);
    assert_eq!(rec["scopes_used"], json!(["patient/*.rs"]), "{rec}");

    // Another patient's Observation: the answer is checked and hidden.
    let r = gw.get("Observation/obs-p2-0", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("Patient/p2"), "{body}");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "outside_compartment", "{rec}");

    // A search naming no patient is narrowed to the token's.
    let r = gw.get("Observation?code=ceiling-probe", Some(&p1)).await;
    assert_eq!(r.status(), 200);
    let seen = gw.upstream.seen();
    let sent = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("ceiling-probe"))
        .expect("the search reached the upstream");
    assert!(sent.uri.contains("patient=p1"), "{}", sent.uri);

    // The ceiling's letters bound the token's too: `cruds` gives no
    // delete under a `read` ceiling.
    let before = gw.upstream.seen().len();
    let r = gw
        .client
        .delete(format!("{}/Observation/obs-p1-0", gw.base))
        .bearer_auth(&p1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Without a patient in the token, patient/ scopes grant nothing.
    let nobody = token(None);
    let r = gw.get("Observation/obs-p1-0", Some(&nobody)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused request went upstream"
    );
}

/// A gateway whose one rule locks Conditions unless break-glass is
/// declared, with the header `Emergency-Reason` and `break_glass` lines
/// `more`; the policy directory lives as long as the first value.
async fn locked_conditions(tag: &str, more: &str) -> (TempDir, Gateway) {
    let dir = TempDir::new(tag);
    std::fs::write(
        dir.0.join("10-bg.yaml"),
        "rules:\n  - name: conditions-locked\n    effect: deny\n    break_glass: true\n    when: {resource_type: [Condition]}\n",
    )
    .unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: format!(
            "policies:\n  dir: {}\nbreak_glass:\n  header: Emergency-Reason\n{more}",
            dir.0.display()
        ),
        ..Options::default()
    })
    .await;
    (dir, gw)
}

/// With `break_glass.claim` set, only the authorization server can declare
/// an emergency: a reason the client writes in the header does not count.
/// A break-glass header of any name never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_by_claim_ignores_the_header() {
    let (_dir, gw) = locked_conditions("policies-bg-claim", "  claim: bg_reason\n").await;
    let plain = gw.mint("user/*.rs", None);
    let before = gw.upstream.seen().len();
    let r = gw
        .client
        .get(format!("{}/Condition/cond-p1", gw.base))
        .bearer_auth(&plain)
        .header("Emergency-Reason", "typed by the client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused request went upstream"
    );
    let mut claims = gw.claims("user/*.rs");
    claims["bg_reason"] = json!("cardiac arrest, ward 4");
    let vouched = gw.issuer.signing_key().sign(&claims);
    let r = gw
        .client
        .get(format!("{}/Condition/cond-p1", gw.base))
        .bearer_auth(&vouched)
        .header("Emergency-Reason", "typed by the client")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        gw.audit_for(&id)["break_glass_reason"],
        "cardiac arrest, ward 4"
    );
    let seen = gw.upstream.seen();
    let sent = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("cond-p1"))
        .unwrap();
    assert!(
        !sent.headers.iter().any(|(k, _)| k == "emergency-reason"),
        "the break-glass header reached the upstream: {:?}",
        sent.headers
    );
}

/// The break-glass header can be renamed by a reload: the new name then
/// declares emergencies and is stripped before the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_break_glass_header_is_read_and_stripped() {
    let (_dir, gw) = locked_conditions("policies-bg-reload", "").await;
    let token = gw.mint("user/*.rs", None);
    let get = |header: &'static str, marker: &str| {
        gw.client
            .get(format!("{}/Condition/cond-p1?marker={marker}", gw.base))
            .bearer_auth(&token)
            .header(header, "patient unconscious in ED")
            .send()
    };
    assert_eq!(
        get("Emergency-Reason", "before").await.unwrap().status(),
        200
    );
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replace("header: Emergency-Reason", "header: Code-Red-Reason"),
    )
    .unwrap();
    sighup(&gw);
    let mut status = 0;
    for _ in 0..50 {
        status = get("Code-Red-Reason", "after")
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "the renamed header did not declare an emergency"
    );
    // The old name declares nothing any more.
    assert_eq!(get("Emergency-Reason", "old").await.unwrap().status(), 403);
    let seen = gw.upstream.seen();
    let sent = |marker: &str| {
        seen.iter()
            .find(|s| s.uri.contains(&format!("marker={marker}")))
            .map(|s| s.headers.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
            .unwrap()
    };
    assert!(!sent("before").contains(&"emergency-reason".to_string()));
    assert!(
        !sent("after").contains(&"code-red-reason".to_string()),
        "the reloaded break-glass header reached the upstream: {:?}",
        sent("after")
    );
    assert_eq!(gw.upstream.count_containing("marker=old"), 0);
}

/// `DELETE Observation/{id}` with `token`: the status answered.
async fn delete_observation(gw: &Gateway, token: &str, id: &str) -> u16 {
    gw.client
        .delete(format!("{}/Observation/{id}", gw.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn sighup(gw: &Gateway) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP failed");
}

async fn metric(gw: &Gateway, line: &str) -> bool {
    gw.metrics().await.contains(line)
}

/// A reload reads the rules, not the files only a restart applies: a
/// secret gone since start (a rotated mount, here the DPoP nonce key) does
/// not keep a new deny from applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_rules_though_a_restart_only_file_is_gone() {
    let dir = TempDir::new("policies-reload-secret");
    std::fs::write(
        dir.0.join("10-rules.yaml"),
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .unwrap();
    let secrets = TempDir::new("policies-reload-secret-key");
    let key = secrets.0.join("nonce.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: format!(
            "policies:\n  dir: {}\ndpop:\n  require_nonce: true\n  nonce_key_file: {}\n",
            dir.0.display(),
            key.display()
        ),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.cruds", None);
    let delete = |id: &'static str| delete_observation(&gw, &token, id);
    assert_eq!(delete("secret-1").await, 204);
    std::fs::remove_file(&key).unwrap();
    std::fs::write(
        dir.0.join("20-emergency.yaml"),
        "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    sighup(&gw);
    gw.until_metric("fhirwall_reloads_total{result=\"success\"}", 1.0)
        .await;
    assert_eq!(delete("secret-2").await, 403);
    assert_eq!(gw.upstream.count_containing("secret-2"), 0);
    // A start, by contrast, needs the file: check says where.
    let (ok, text) = support::check(gw.config_path());
    assert!(!ok && text.contains("dpop.nonce_key_file"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_atomically_and_rejects_bad_ones() {
    let (dir, gw) = with_rules(
        "policies-reload",
        "10-rules.yaml",
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .await;
    let file = dir.0.join("10-rules.yaml");
    let token = gw.mint("user/*.cruds", None);
    let delete = |id: &'static str| delete_observation(&gw, &token, id);
    assert_eq!(delete("reload-1").await, 204);

    // Load runs while the rules change: no request fails for the reload.
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, token) = (
            gw.client.clone(),
            format!("{}/Observation/obs-p1-0", gw.base),
            token.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..50 {
                let s = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                statuses.push(s.unwrap_or(0));
            }
            statuses
        }));
    }
    std::fs::write(
        &file,
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    for _ in 0..3 {
        sighup(&gw);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for t in load {
        assert!(
            t.await.unwrap().iter().all(|s| *s == 200),
            "a request failed during reload"
        );
    }
    // The new rules are in force (bounded wait for the signal to land).
    let mut status = 0;
    for _ in 0..50 {
        status = delete("reload-2").await;
        if status == 403 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 403);
    assert!(metric(&gw, "fhirwall_reloads_total{result=\"success\"}").await);

    // A broken file: rejected whole, counted, the previous rules keep serving.
    std::fs::write(&file, "rules:\n  - {name: x, effect: perhaps}\n").unwrap();
    sighup(&gw);
    gw.until_metric("fhirwall_reloads_total{result=\"failure\"}", 1.0)
        .await;
    assert_eq!(delete("reload-3").await, 403);
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&token)).await.status(),
        200
    );
    assert_eq!(
        gw.upstream.count_containing("reload-2") + gw.upstream.count_containing("reload-3"),
        0
    );

    // The issuer renamed in config.yaml and the rules following it: the
    // running gateway still names its tokens' issuer `test` (issuers
    // change on restart only), so rules naming `renamed` would never hold
    // and the deletes they refuse would go through. Rejected whole.
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replace("  - name: test\n", "  - name: renamed\n"),
    )
    .unwrap();
    std::fs::write(
        &file,
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n  - {name: no-deletes, effect: deny, when: {issuer: [renamed], interaction: [delete]}}\n",
    )
    .unwrap();
    sighup(&gw);
    // (Refused: the failure count goes up.)
    gw.until_metric("fhirwall_reloads_total{result=\"failure\"}", 2.0)
        .await;
    assert_eq!(delete("reload-4").await, 403);
    assert_eq!(gw.upstream.count_containing("reload-4"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_policies_reload_on_change() {
    let dir = TempDir::new("policies-watch");
    let gw = Gateway::start(Options {
        extra_yaml: format!("policies:\n  dir: {}\n  watch: true\n", dir.0.display()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.cruds", None);
    let delete = |id: &'static str| delete_observation(&gw, &token, id);
    assert_eq!(delete("watch-1").await, 204);
    std::fs::write(
        dir.0.join("10-rules.yaml"),
        "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    until_delete_refused(&delete, "watch-2", "the new file was not picked up").await;
}

/// A reload that names another policy directory is followed: the watch
/// looks at the new one from then on, and nothing waits for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_follows_a_policy_directory_a_reload_names() {
    let (old, new) = (TempDir::new("policies-old"), TempDir::new("policies-new"));
    let gw = Gateway::start(Options {
        extra_yaml: format!("policies:\n  dir: {}\n  watch: true\n", old.0.display()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.cruds", None);
    let delete = |id: &'static str| delete_observation(&gw, &token, id);
    assert_eq!(delete("moved-1").await, 204);
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replace(&old.0.display().to_string(), &new.0.display().to_string()),
    )
    .unwrap();
    sighup(&gw);
    gw.until_metric("fhirwall_reloads_total{result=\"success\"}", 1.0)
        .await;
    assert_eq!(
        support::metric(&gw.metrics().await, "fhirwall_config_restart_pending"),
        0.0
    );
    // A rule in the new directory is picked up by the watch alone.
    std::fs::write(
        new.0.join("10-rules.yaml"),
        "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .unwrap();
    until_delete_refused(&delete, "moved-2", "the new directory was not watched").await;
}

/// With a watch, a SIGHUP's reload counts as applied too: a file put back
/// afterwards as it was (its modification time kept, as `cp -p` or a
/// backup moved back does) is a change the watch applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_applies_a_file_restored_after_a_sighup() {
    let dir = TempDir::new("policies-restore");
    let file = dir.0.join("10-rules.yaml");
    let original = "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n";
    std::fs::write(&file, original).unwrap();
    let stamp = std::fs::metadata(&file).unwrap().modified().unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: format!("policies:\n  dir: {}\n  watch: true\n", dir.0.display()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.cruds", None);
    let delete = |id: &'static str| delete_observation(&gw, &token, id);
    assert_eq!(delete("restore-1").await, 403);
    // Replaced and applied by a SIGHUP (before the watch's own poll).
    std::fs::write(&file, "rules: []\n").unwrap();
    sighup(&gw);
    gw.until_metric("fhirwall_reloads_total{result=\"success\"}", 1.0)
        .await;
    assert_eq!(delete("restore-2").await, 204);
    // Put back as it was, modification time included.
    std::fs::write(&file, original).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(stamp)
        .unwrap();
    until_delete_refused(&delete, "restore-3", "the restored file was not applied").await;
}

/// Sends `delete(id)` every 100 ms, for at most 8 s, until it is refused
/// (403): a watched policy change applied; `what` says which when not.
async fn until_delete_refused<F: std::future::Future<Output = u16>>(
    delete: &impl Fn(&'static str) -> F,
    id: &'static str,
    what: &str,
) {
    let mut status = 0;
    for _ in 0..80 {
        status = delete(id).await;
        if status == 403 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 403, "{what}");
}

/// A reload that leaves no rule at all (a policy directory emptied, as
/// while being replaced) is applied but said loudly: every emergency deny
/// is gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_leaving_no_rule_is_warned_about() {
    let (dir, gw) = with_rules(
        "policies-emptied",
        "10-rules.yaml",
        "rules:\n  - {name: no-deletes, effect: deny, when: {interaction: [delete]}}\n",
    )
    .await;
    let token = gw.mint("user/*.cruds", None);
    assert_eq!(delete_observation(&gw, &token, "emptied-1").await, 403);
    std::fs::remove_file(dir.0.join("10-rules.yaml")).unwrap();
    sighup(&gw);
    let log = gw.stderr_containing("leaves no policy rule").await;
    assert!(log.contains("policy_rules_before"), "{log}");
}

/// Waits (bounded) until the metrics' `series` has `value`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_what_only_a_restart_applies() {
    let (_dir, gw) = with_rules(
        "policies-restart",
        "10-rules.yaml",
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .await;
    let pending = "fhirwall_config_restart_pending";
    assert_eq!(support::metric(&gw.metrics().await, pending), 0.0);
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let changed = original
        .replace("read_timeout_ms: 5000", "read_timeout_ms: 6000")
        .replace("leeway_seconds: 0", "leeway_seconds: 30");
    assert_ne!(changed, original);
    std::fs::write(gw.config_path(), &changed).unwrap();
    sighup(&gw);
    gw.until_metric(pending, 1.0).await;
    let reloads = "fhirwall_reloads_total{result=\"success\"}";
    assert_eq!(support::metric(&gw.metrics().await, reloads), 1.0);
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("only after a restart"))
        .unwrap_or_else(|| panic!("no warning in {log}"));
    assert!(
        line.contains("upstream, issuers") && !line.contains("dpop"),
        "{line}"
    );
    // Back as it runs: nothing pending.
    std::fs::write(gw.config_path(), &original).unwrap();
    sighup(&gw);
    gw.until_metric(pending, 0.0).await;
    assert_eq!(support::metric(&gw.metrics().await, reloads), 2.0);
}

/// A reload does not look the upstream's host name up (only a restart
/// applies the upstream): a name that does not resolve now keeps no
/// emergency rule from applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_rules_while_the_upstream_name_does_not_resolve() {
    let (dir, gw) = with_rules(
        "policies-dns",
        "10-rules.yaml",
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .await;
    let token = gw.mint("user/*.rs", None);
    assert_eq!(
        gw.get("Observation/obs-p1-0", Some(&token)).await.status(),
        200
    );
    let original = std::fs::read_to_string(gw.config_path()).unwrap();
    let up = format!("url: http://{}/r4", gw.upstream_addr);
    assert!(original.contains(&up), "{original}");
    // RFC 2606: `.invalid` never resolves.
    let changed = original.replace(&up, "url: http://fhir-upstream.invalid:8080/r4");
    std::fs::write(gw.config_path(), changed).unwrap();
    std::fs::write(
        dir.0.join("10-rules.yaml"),
        "rules:\n  - {name: no-observations, effect: deny, when: {resource_type: [Observation]}}\n",
    )
    .unwrap();
    sighup(&gw);
    gw.until_metric("fhirwall_reloads_total{result=\"success\"}", 1.0)
        .await;
    let before = gw.upstream.seen().len();
    let r = gw.get("Observation/obs-p1-0", Some(&token)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.seen().len(), before);
    // The running upstream still serves; its change waits for a restart.
    assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
    assert_eq!(
        support::metric(&gw.metrics().await, "fhirwall_config_restart_pending"),
        1.0
    );
}

/// `explain` refuses what the gateway refuses before any decision: a
/// bearer token where binding is required, the DPoP scheme with DPoP off,
/// a certificate-bound token without a TLS listener taking certificates, a
/// cnf method fhirwall does not enforce, a claim `forward_headers` forwards
/// that cannot be a header value, a public route asked for more than a
/// read of itself, and a token header the issuer does not accept.
#[test]
fn explain_refuses_what_the_gateway_refuses_before_deciding() {
    let dir = TempDir::new("explain-parity");
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: hospital\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [https://gw.example/fhir]\n\
         \x20   require_at_jwt_typ: true\n    require_binding_for_clients: [strict-app]\n\
         admin:\n  listen: 127.0.0.1:3\ndpop:\n  enabled: false\n\
         forward_headers:\n  \"claim:tenant\": X-Tenant\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let claims = |name: &str, extra: serde_json::Value| {
        let mut v = json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
                           "exp": 4_000_000_000u64, "client_id": "test-app", "scope": "user/*.rs"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let path = dir.0.join(name);
        std::fs::write(&path, v.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let explain = |claims: &str, rest: &[&str]| {
        let mut args = vec!["explain", "--config", c, "--claims", claims];
        args.extend_from_slice(rest);
        support::run_bin(&args)
    };
    let plain = claims("plain.json", json!({}));
    let (ok, out) = explain(&plain, &["--url", "Observation?code=1"]);
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    let (ok, out) = explain(&plain, &["--url", "metadata"]);
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    for (what, file, extra, args, why) in [
        (
            "binding required",
            "strict.json",
            json!({"client_id": "strict-app"}),
            vec!["--url", "Observation?code=1"],
            "requires sender-constrained tokens",
        ),
        (
            "DPoP disabled",
            "dpop.json",
            json!({"cnf": {"jkt": "abc"}}),
            vec!["--url", "Observation?code=1", "--binding", "dpop"],
            "DPoP is disabled",
        ),
        (
            "no TLS listener",
            "mtls.json",
            json!({"cnf": {"x5t#S256": "abc"}}),
            vec!["--url", "Observation?code=1", "--binding", "mtls"],
            "takes none",
        ),
        (
            "forwarded claim not a header value",
            "tenant.json",
            json!({"tenant": {"id": "a"}}),
            vec!["--url", "Observation?code=1"],
            "cannot be forwarded upstream",
        ),
        (
            "cnf naming no binding",
            "empty-cnf.json",
            json!({"cnf": {}}),
            vec!["--url", "Observation?code=1"],
            "no binding this gateway knows",
        ),
        (
            "cnf method not enforced",
            "kid.json",
            json!({"cnf": {"jkt": "abc", "kid": "k"}}),
            vec!["--url", "Observation?code=1", "--binding", "dpop"],
            "does not enforce",
        ),
        (
            "public route written to",
            "plain.json",
            json!({}),
            vec!["--method", "DELETE", "--url", "metadata"],
            "only answers GET",
        ),
        (
            "public route reaching beyond itself",
            "plain.json",
            json!({}),
            vec!["--url", "metadata?_include=*"],
            "reaches resources beyond the route",
        ),
    ] {
        let path = claims(file, extra);
        let (ok, out) = explain(&path, &args);
        assert!(!ok, "{what}: {out}");
        assert!(
            out.contains("=> DENY") && out.contains(why),
            "{what}: {out}"
        );
    }
    // A token's header, checked as the gateway checks it.
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let payload = b64(
        json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
                             "exp": 4_000_000_000u64, "client_id": "test-app", "scope": "user/*.rs"}),
    );
    for (header, why) in [
        (json!({"alg": "none"}), "not allowed"),
        (json!({"alg": "HS256", "typ": "at+jwt"}), "not allowed"),
        (json!({"alg": "ES256"}), "typ"),
        (json!({"alg": "ES256", "typ": "at+jwt"}), ""),
    ] {
        let token = format!("{}.{payload}.c2ln", b64(header.clone()));
        let (ok, out) = support::run_bin(&[
            "explain",
            "--config",
            c,
            "--token",
            &token,
            "--url",
            "Observation?code=1",
        ]);
        if why.is_empty() {
            assert!(ok && out.contains("=> ALLOW"), "{header}: {out}");
        } else {
            assert!(!ok && out.contains(why), "{header}: {out}");
        }
    }
}

/// `fhirwall explain` reaches the gateway's verdict where it used not to:
/// an introspection answer given as claims is judged as the gateway
/// judges the answer (inactive, `active` not a boolean, a DPoP token
/// without its key; an answer without `iss`, `exp` or, with `require_aud:
/// false`, `aud` is filled in as the gateway fills it); a JWT of an
/// issuer that introspects cannot be explained from its own claims; a
/// public route is answered before the token is looked at; a token in the
/// query is refused; a reference under the upstream's base names the
/// patient; a `cnf` the gateway can never match is refused.
#[test]
fn explain_reaches_the_gateways_verdict() {
    let dir = TempDir::new("explain-parity-2");
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: hospital\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [https://gw.example/fhir]\n\
         \x20 - name: opaque\n    issuer: https://op.example\n    audiences: [https://gw.example/fhir]\n    introspection:\n\
         \x20     endpoint: https://op.example/introspect\n      client_id: gw\n      client_secret: s\n      require_aud: false\n\
         admin:\n  listen: 127.0.0.1:3\n\
         tls:\n  cert_file: absent.pem\n  key_file: absent.key\n  client_auth: request\n  client_ca_file: absent-ca.pem\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let write = |name: &str, v: serde_json::Value| {
        let path = dir.0.join(name);
        std::fs::write(&path, v.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let explain = |claims: &str, rest: &[&str]| {
        let mut args = vec!["explain", "--config", c, "--claims", claims];
        args.extend_from_slice(rest);
        support::run_bin(&args)
    };
    let read = ["--url", "Observation?code=1"];
    // Introspection answers.
    let answer = |name: &str, v: serde_json::Value| write(name, v);
    for (what, v, verdict) in [
        (
            "active",
            json!({"active": true, "iss": "https://op.example", "aud": "https://gw.example/fhir",
                   "exp": 4_000_000_000u64, "scope": "user/*.rs"}),
            "=> ALLOW",
        ),
        (
            "no iss, exp or aud: filled in",
            json!({"active": true, "scope": "user/*.rs"}),
            "=> ALLOW",
        ),
        (
            "inactive",
            json!({"active": false, "iss": "https://op.example", "exp": 4_000_000_000u64,
                   "scope": "user/*.rs"}),
            "not active",
        ),
        (
            "active as a string",
            json!({"active": "true", "scope": "user/*.rs"}),
            "not active",
        ),
        (
            "a DPoP token without its key",
            json!({"active": true, "token_type": "DPoP", "scope": "user/*.rs"}),
            "cnf",
        ),
        (
            "another issuer's",
            json!({"active": true, "iss": "https://as.example", "scope": "user/*.rs"}),
            "=> DENY",
        ),
    ] {
        let (ok, out) = explain(&answer("answer.json", v), &read);
        assert_eq!(ok, verdict == "=> ALLOW", "{what}: {out}");
        assert!(out.contains(verdict), "{what}: {out}");
    }
    // A JWT of the introspecting issuer: its answer decides, not its claims.
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let jwt = |iss: &str, alg: &str| {
        format!(
            "{}.{}.c2ln",
            b64(json!({"alg": alg})),
            b64(json!({"iss": iss, "aud": "https://gw.example/fhir",
                       "exp": 4_000_000_000u64, "scope": "user/*.rs"}))
        )
    };
    let by_token = |token: &str, url: &str| {
        support::run_bin(&["explain", "--config", c, "--token", token, "--url", url])
    };
    let (ok, out) = by_token(&jwt("https://op.example", "ES256"), "Observation?code=1");
    assert!(
        !ok && out.contains("=> ERROR") && out.contains("introspects"),
        "{out}"
    );
    // A public route never reads the token: even one the gateway refuses.
    let (ok, out) = by_token(&jwt("https://unknown.example", "HS256"), "metadata");
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    let (ok, out) = by_token(&jwt("https://as.example", "HS256"), "Observation?code=1");
    assert!(!ok && out.contains("=> DENY"), "{out}");
    // A JWT's payload may say `active` too: it is no introspection answer.
    let active = format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "ES256"})),
        b64(
            json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
                   "exp": 4_000_000_000u64, "scope": "user/*.rs", "active": true})
        )
    );
    let (ok, out) = by_token(&active, "Observation?code=1");
    assert!(ok && out.contains("=> ALLOW"), "{out}");

    let plain = write(
        "plain.json",
        json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
               "exp": 4_000_000_000u64, "scope": "user/*.rs"}),
    );
    let (ok, out) = explain(&plain, &["--url", "Observation?code=1&access_token=abc"]);
    assert!(!ok && out.contains("access_token"), "{out}");
    // The patient named under the upstream's base, as the gateway reads it.
    let p1 = write(
        "p1.json",
        json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
               "exp": 4_000_000_000u64, "scope": "patient/Observation.rs", "patient": "p1"}),
    );
    let (ok, out) = explain(
        &p1,
        &[
            "--url",
            "Observation?subject=http://127.0.0.1:2/fhir/Patient/p1",
        ],
    );
    assert!(ok && out.contains("=> ALLOW"), "{out}");
    // Bindings no request can satisfy.
    for (cnf, binding, why) in [
        (json!({"jkt": 5}), "dpop", "not a string"),
        (
            json!({"x5t#S256": ""}),
            "mtls",
            "not a certificate thumbprint",
        ),
    ] {
        let bound = write(
            "bound.json",
            json!({"iss": "https://as.example", "aud": "https://gw.example/fhir",
                   "exp": 4_000_000_000u64, "scope": "user/*.rs", "cnf": cnf}),
        );
        let (ok, out) = explain(
            &bound,
            &["--url", "Observation?code=1", "--binding", binding],
        );
        assert!(!ok && out.contains(why), "{cnf}: {out}");
    }
}

/// `fhirwall test` (and `explain`) read a request as the gateway does: a
/// POST `_search` form's parameters, a conditional create's
/// `If-None-Exist`, a break-glass reason only when the gateway would accept
/// it, and `time` rules at the case's own `at`.
#[test]
fn policy_tests_read_forms_conditions_emergencies_and_time_like_the_gateway() {
    let dir = TempDir::new("explain-reads");
    let rules = dir.0.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("10-rules.yaml"),
        "rules:\n\
         \x20 - {name: no-patients, effect: deny, when: {resource_type: [Patient]}}\n\
         \x20 - {name: conditions-locked, effect: deny, break_glass: true, when: {resource_type: [Condition]}}\n\
         \x20 - {name: no-deletes-wed-afternoon, effect: deny, when: {interaction: [delete], time: {days: [wed], from: '14:00', to: '15:00'}}}\n",
    )
    .unwrap();
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
             issuers:\n  - name: hospital\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [https://gw.example/fhir]\n\
             admin:\n  listen: 127.0.0.1:3\npolicies:\n  dir: {}\nbreak_glass:\n  max_token_age_seconds: 600\n",
            rules.display()
        ),
    )
    .unwrap();
    // 2026-11-25 (a Wednesday) 16:00 UTC.
    let four_pm = 1_795_622_400i64;
    let claims = |iat: i64| {
        format!(
            "{{iss: 'https://as.example', aud: 'https://gw.example/fhir', exp: 4000000000, iat: {iat}, client_id: test-app, scope: 'user/*.cruds'}}"
        )
    };
    let case = |name: &str, iat: i64, request: &str, expect: &str| {
        format!(
            "  - name: {name}\n    claims: {}\n    request: {{{request}}}\n    expect: {{{expect}}}\n",
            claims(iat)
        )
    };
    let form = "content_type: application/x-www-form-urlencoded";
    let cases = [
        case(
            "a form's include reaches Patients",
            four_pm,
            &format!("method: POST, url: Observation/_search, {form}, body: '_include=Observation:subject:Patient'"),
            "decision: deny, rule: '10-rules.yaml#no-patients'",
        ),
        case(
            "a plain form search passes",
            four_pm,
            &format!("method: POST, url: Observation/_search, {form}, body: 'code=1'"),
            "decision: allow",
        ),
        case(
            "a form is a POST _search body only",
            four_pm,
            &format!("method: POST, url: Observation, {form}, body: 'code=1'"),
            "decision: deny",
        ),
        case(
            "a token in a form is refused",
            four_pm,
            &format!("method: POST, url: Observation/_search, {form}, body: 'access_token=x'"),
            "decision: deny",
        ),
        case(
            "a conditional create searches Conditions",
            four_pm,
            "method: POST, url: Observation, if_none_exist: '_has:Condition:subject:code=x', body: '{\"resourceType\":\"Observation\"}'",
            "decision: deny, rule: '10-rules.yaml#conditions-locked'",
        ),
        case(
            "break-glass from a fresh token",
            four_pm - 60,
            "method: GET, url: Condition/c1, break_glass: code blue, at: '2026-11-25T16:00:00Z'",
            "decision: allow",
        ),
        case(
            "break-glass from a token too old",
            four_pm - 3600,
            "method: GET, url: Condition/c1, break_glass: code blue, at: '2026-11-25T16:00:00Z'",
            "decision: deny, rule: '10-rules.yaml#conditions-locked'",
        ),
        case(
            "break-glass with an empty reason",
            four_pm - 60,
            "method: GET, url: Condition/c1, break_glass: ' ', at: '2026-11-25T16:00:00Z'",
            "decision: deny, rule: '10-rules.yaml#conditions-locked'",
        ),
        case(
            "deletes in the window",
            four_pm - 7200,
            "method: DELETE, url: Observation/o1, at: '2026-11-25T14:30:00Z'",
            "decision: deny, rule: '10-rules.yaml#no-deletes-wed-afternoon'",
        ),
        case(
            "deletes after it",
            four_pm,
            "method: DELETE, url: Observation/o1, at: '2026-11-25T16:00:00+00:00'",
            "decision: allow",
        ),
        case(
            "a time that is none",
            four_pm,
            "method: GET, url: Observation/o1, at: 'Wednesday afternoon'",
            "decision: error",
        ),
    ];
    let tests = dir.0.join("cases.yaml");
    std::fs::write(&tests, format!("cases:\n{}", cases.concat())).unwrap();
    let (ok, out) = support::run_bin(&[
        "test",
        "--config",
        config.to_str().unwrap(),
        tests.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("11 case(s), 0 failed"), "{out}");
    // explain says why an emergency does not count.
    let claims_file = dir.0.join("old.json");
    std::fs::write(
        &claims_file,
        json!({"iss": "https://as.example", "aud": "https://gw.example/fhir", "exp": 4_000_000_000u64,
               "iat": four_pm - 3600, "client_id": "test-app", "scope": "user/*.rs"})
        .to_string(),
    )
    .unwrap();
    let (ok, out) = support::run_bin(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--claims",
        claims_file.to_str().unwrap(),
        "--url",
        "Condition/c1",
        "--break-glass",
        "code blue",
        "--at",
        "2026-11-25T16:00:00Z",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("break-glass") && out.contains("max_token_age_seconds"),
        "{out}"
    );
}

/// A rate limit on `$everything` counts the operation's later pages too
/// (a page of the caller's own `$everything` is judged as it): paging is
/// no way round the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_on_everything_counts_its_pages() {
    let (_dir, gw) = with_rules(
        "policies-everything-rate",
        "10-limits.yaml",
        "rules:\n  - name: everything-budget\n    effect: allow\n    when: {operation: [everything]}\n    rate_limit: {per: user, requests: 2, per_seconds: 3600}\n",
    )
    .await;
    let token = gw.mint("patient/*.rs", Some("p1"));
    let r = gw
        .get("Patient/p1/$everything?_count=2", Some(&token))
        .await;
    assert_eq!(r.status(), 200);
    let first: serde_json::Value = r.json().await.unwrap();
    let next = |page: &serde_json::Value| -> String {
        let url = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .expect("a next page")
            .to_string();
        url.strip_prefix(&gw.base)
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or_else(|| panic!("{url} is not through the gateway"))
            .to_string()
    };
    let second_page = next(&first);
    let r = gw.get(&second_page, Some(&token)).await;
    assert_eq!(r.status(), 200);
    let second: serde_json::Value = r.json().await.unwrap();
    let before = gw.upstream.seen().len();
    let r = gw.get(&next(&second), Some(&token)).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("everything-budget"));
    assert_eq!(gw.upstream.seen().len(), before, "nothing went upstream");
}

/// `fhirwall test` finds test files spelt in any case, as policy files are
/// read; a file without cases, or a case whose decision would differ with
/// the client's address a `source` rule names, fails instead of passing
/// untested.
#[test]
fn policy_tests_cannot_pass_without_testing() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = format!("{root}/policies/examples/config/example-config.yaml");
    let dir = support::TempDir::new("policy-tests");
    let case = |source: &str| {
        format!(
            "cases:\n  - name: research reads\n    claims: {{iss: https://idp.example.org/realms/hospital, aud: http://localhost:8080/fhir, exp: 4000000000, client_id: research-portal, roles: [research-viewer], scope: user/*.rs}}\n    request: {{method: GET, url: Observation?code=8867-4{source}}}\n    expect: {{decision: deny}}\n"
        )
    };
    std::fs::write(dir.0.join("Outside.YAML"), case(", source: 192.0.2.1")).unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", &config, dir.0.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("1 case(s), 0 failed"), "{out}");

    // Without a source the deny would hold only because no rule on
    // `source` can: an error, not a pass.
    std::fs::write(dir.0.join("Outside.YAML"), case("")).unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", &config, dir.0.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("depends on the client's address") && out.contains("10.50.0.0/16"),
        "{out}"
    );

    std::fs::write(dir.0.join("Outside.YAML"), "cases: []\n").unwrap();
    let (ok, out) = support::run_bin(&["test", "--config", &config, dir.0.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("no cases"), "{out}");
}

/// A `_` parameter the upstream defines is refused until
/// `upstream.special_params` lists it; listed, it passes as reaching
/// nothing — the scopes, a rule refusing another type and a public route
/// alike — spelt exactly as listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_special_params_pass_as_reaching_nothing() {
    let rules =
        "rules:\n  - {name: no-conditions, effect: deny, when: {resource_type: [Condition]}}\n";
    let (_dir, plain) = with_rules("special-plain", "10-types.yaml", rules).await;
    let token = plain.mint("user/Observation.rs", None);
    let r = plain
        .get("Observation?code=special-0&_skip=10", Some(&token))
        .await;
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("_skip is not one fhirwall knows")
            && text.contains("upstream.special_params"),
        "{text}"
    );
    assert_eq!(plain.upstream.count_containing("special-0"), 0);

    let dir = TempDir::new("special-listed");
    std::fs::write(dir.0.join("10-types.yaml"), rules).unwrap();
    let gw = Gateway::start(Options {
        upstream_yaml: "  special_params: [_skip, _vendorCursor]\n".into(),
        extra_yaml: format!(
            "policies:\n  dir: {}\npublic_routes: [Practitioner]\n",
            dir.0.display()
        ),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/Observation.rs", None);
    for rel in [
        "Observation?code=special-1&_skip=10",
        "Observation?code=special-2&_vendorCursor=abc",
    ] {
        assert_eq!(gw.get(rel, Some(&token)).await.status(), 200, "{rel}");
    }
    let r = gw.get("Practitioner?name=special-3&_skip=10", None).await;
    assert!(
        !matches!(r.status().as_u16(), 400 | 401 | 403),
        "{}",
        r.status()
    );
    for needle in ["special-1", "special-2", "special-3"] {
        assert_eq!(gw.upstream.count_containing(needle), 1, "{needle}");
    }
    // Spelt otherwise, or not listed: refused, as before.
    for rel in [
        "Observation?code=special-4&_SKIP=10",
        "Observation?code=special-5&_other=1",
    ] {
        assert_eq!(gw.get(rel, Some(&token)).await.status(), 403, "{rel}");
    }
    assert_eq!(
        gw.get("Practitioner?name=special-6&_other=1", None)
            .await
            .status(),
        400
    );
    for needle in ["special-4", "special-5", "special-6"] {
        assert_eq!(gw.upstream.count_containing(needle), 0, "{needle}");
    }
}

/// A rule on a parameter: deletes that erase history are refused, naming
/// the rule, in a batch too, and reach nothing upstream; plain deletes
/// pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_refuses_requests_carrying_a_parameter() {
    let (_dir, gw) = with_rules(
        "policies-param",
        "10-erasing.yaml",
        "rules:\n  - {name: no-erasing, effect: deny, when: {interaction: [delete], param: [_expunge, _hardDelete]}}\n",
    )
    .await;
    let token = gw.mint("user/Observation.rds", None);
    for rel in [
        "Observation/erase-1?_expunge=true",
        "Observation/erase-2?_hardDelete=true",
    ] {
        let r = gw
            .client
            .delete(format!("{}/{rel}", gw.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{rel}");
        let text = r.text().await.unwrap();
        assert!(text.contains("10-erasing.yaml#no-erasing"), "{rel}: {text}");
    }
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/erase-3?_expunge=true"}}
    ]});
    let r = gw
        .post_bundle(&token, batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for needle in ["erase-1", "erase-2"] {
        assert_eq!(gw.upstream.count_containing(needle), 0, "{needle}");
    }
    assert!(
        !gw.upstream
            .seen()
            .iter()
            .any(|s| String::from_utf8_lossy(&s.body).contains("erase-3")),
        "the batch reached the upstream"
    );
    assert_ne!(delete_observation(&gw, &token, "erase-4").await, 403);
    assert_eq!(gw.upstream.count_containing("erase-4"), 1);
}
