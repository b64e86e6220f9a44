//! Patient context (issue 3) against the real binary: under `patient/`
//! scopes nothing of another patient reaches the client. The sandbox
//! upstream holds three patients (p1 Alice, p2 Bob, p3 Carol) with their
//! Observations and Conditions, an Observation of p2 performed by p1
//! (`obs-shared`), one moved from p2 to p1 (`obs-moved`, version 1 is
//! Bob's) and a Practitioner.

mod support;

use serde_json::{json, Value};
use support::{Gateway, Options};

/// Bytes that only p2's (Bob's) resources contain. (Their ids may appear:
/// the client itself sent them in the URL.)
const P2_MARKERS: &[&str] = &["Bob", "Sample", "Patient/p2", "Asthma", "\"male\""];

fn assert_nothing_of_p2(what: &str, body: &str) {
    for m in P2_MARKERS {
        assert!(!body.contains(m), "{what}: answer holds '{m}': {body}");
    }
}

async fn status_and_body(r: reqwest::Response) -> (u16, String) {
    let s = r.status().as_u16();
    (s, r.text().await.unwrap())
}

/// POSTs FHIR JSON to `rel` below the gateway's base.
async fn post_fhir(gw: &Gateway, token: &str, rel: &str, body: &Value) -> (u16, String) {
    let r = gw
        .client
        .post(format!("{}/{rel}", gw.base))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    status_and_body(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_by_id_answer_only_the_context_patients_compartment() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("launch/patient patient/*.rs", Some("p1"));

    // The patient itself: own yes; another's is refused before the upstream.
    let (s, body) = status_and_body(gw.get("Patient/p1", Some(&p1)).await).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("Alice"));
    let (s, body) = status_and_body(gw.get("Patient/p2", Some(&p1)).await).await;
    assert_eq!(s, 403, "{body}");
    assert_nothing_of_p2("Patient/p2", &body);
    assert_eq!(gw.upstream.count_containing("Patient/p2"), 0);

    // Reads of compartment types: checked against the answer.
    for (path, ok) in [
        ("Observation/obs-p1-0", true),
        ("Condition/cond-p1", true),
        // p1 is a performer, p2 the subject: p2's too, left out.
        ("Observation/obs-shared", false),
        ("Observation/obs-moved", true),
        ("Observation/obs-moved/_history/2", true),
        ("Observation/obs-p1-0/_history", true),
        ("Observation/obs-p2-0", false),
        ("Observation/obs-p2-1", false),
        ("Condition/cond-p2", false),
        ("Observation/obs-p3-0", false),
        ("Observation/obs-moved/_history/1", false), // Bob's version
        ("Observation/obs-moved/_history", false),   // holds Bob's version
        ("Observation/obs-p2-0/_history", false),
    ] {
        let r = gw.get(path, Some(&p1)).await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let (s, body) = status_and_body(r).await;
        if ok {
            assert_eq!(s, 200, "{path}: {body}");
            assert!(body.contains("Patient/p1"), "{path}: {body}");
        } else {
            assert_eq!(s, 404, "{path}: {body}");
            let o: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(o["resourceType"], "OperationOutcome");
            assert_eq!(o["issue"][0]["code"], "not-found");
            assert_eq!(o["issue"][0]["details"]["text"], "not_found");
            assert!(
                !body.contains("subject") && !body.contains("valueQuantity"),
                "{path}: {body}"
            );
            let rec = gw.audit_for(&id);
            assert_eq!(rec["decision"], "deny", "{path}: {rec}");
            let why = if path == "Observation/obs-shared" {
                "shared_with_other_patient"
            } else {
                "outside_compartment"
            };
            assert_eq!(rec["reason"], why, "{path}: {rec}");
            assert_eq!(rec["upstream_status"], 200, "{path}: {rec}");
        }
        assert_nothing_of_p2(path, &body);
    }

    // Bob's own earlier version, of a resource since moved to Alice (a
    // misfiled record corrected): no longer his, every version of it, as
    // its history is.
    let p2 = gw.mint("patient/*.rs", Some("p2"));
    let r = gw.get("Observation/obs-moved/_history/1", Some(&p2)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 404, "{body}");
    assert!(!body.contains("Glucose"), "{body}");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "outside_compartment", "{rec}");
    let (s, body) =
        status_and_body(gw.get("Observation/obs-p2-0/_history/1", Some(&p2)).await).await;
    assert_eq!(s, 200, "his own, unmoved: {body}");

    // An instance's history points through the gateway, not at the
    // upstream it came from.
    let (_, body) = status_and_body(gw.get("Observation/obs-p1-0/_history", Some(&p1)).await).await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        h["link"][0]["url"],
        format!("{}/Observation/obs-p1-0/_history", gw.base)
    );
    assert_eq!(
        h["entry"][0]["fullUrl"],
        format!("{}/Observation/obs-p1-0", gw.base)
    );
    // Its later pages are not offered: a stored page is served whatever it
    // is called, and relabelled a searchset it would escape the history's
    // check of the current version (a resource since moved to another
    // patient). Unchecked (user/ scopes), the link passes as it came.
    assert_eq!(h["link"].as_array().unwrap().len(), 1, "{body}");
    assert!(!body.contains("_getpages"), "{body}");
    let user = gw.mint("user/*.rs", None);
    let (_, body) =
        status_and_body(gw.get("Observation/obs-p1-0/_history", Some(&user)).await).await;
    assert!(body.contains("_getpages=history-"), "{body}");
    // Nor in a batch.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/obs-p1-0/_history"}}]});
    let (s, body) = post_fhir(&gw, &p1, "", &batch).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("obs-p1-0"), "{body}");
    assert!(!body.contains("_getpages"), "{body}");

    // A resource that does not exist looks exactly like one that is hidden.
    let (s, missing) = status_and_body(gw.get("Observation/no-such-1", Some(&p1)).await).await;
    assert_eq!(s, 404);
    let (_, hidden) = status_and_body(gw.get("Observation/obs-p2-0", Some(&p1)).await).await;
    let shape = |b: &str| {
        let mut v: Value = serde_json::from_str(b).unwrap();
        v["issue"][0]["diagnostics"] = Value::Null;
        v
    };
    assert_eq!(shape(&missing), shape(&hidden));

    // HEAD is judged like GET and carries no body.
    let r = gw
        .client
        .head(format!("{}/Observation/obs-p2-0", gw.base))
        .bearer_auth(&p1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = gw
        .client
        .head(format!("{}/Observation/obs-p1-0", gw.base))
        .bearer_auth(&p1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().is_empty());

    // Conditional and compression headers cannot make the answer uncheckable.
    let r = gw
        .client
        .get(format!("{}/Observation/obs-p2-0", gw.base))
        .bearer_auth(&p1)
        .header("accept-encoding", "gzip")
        .header("if-none-match", "W/\"1\"")
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 404, "{body}");
    assert_nothing_of_p2("conditional read", &body);
    let seen = gw.upstream.seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("obs-p2-0"))
        .expect("the upstream was asked");
    let header = |n: &str| {
        last.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("if-none-match"), None);
    assert_eq!(header("accept"), Some("application/fhir+json"));
    assert_eq!(header("authorization"), None);

    // Types outside the compartment are not reached under patient/ scopes.
    let (s, body) = status_and_body(gw.get("Practitioner/dr-1", Some(&p1)).await).await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("not in the Patient compartment"), "{body}");
    assert_eq!(gw.upstream.count_containing("dr-1"), 0);

    // An answer that cannot be judged is refused, not passed on.
    for path in ["Observation/xml-answer", "Observation/wrong-answer"] {
        let (s, body) = status_and_body(gw.get(path, Some(&p1)).await).await;
        assert_eq!(s, 502, "{path}: {body}");
        assert_nothing_of_p2(path, &body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_contexts_and_missing_patient_claim() {
    let gw = Gateway::start(Options::default()).await;

    // user/ scopes are not bound to a patient.
    let user = gw.mint("user/Observation.rs", None);
    let (s, body) = status_and_body(gw.get("Observation/obs-p2-0", Some(&user)).await).await;
    assert_eq!(s, 200, "{body}");

    // Both kinds: allowed if any scope allows it under its own rules.
    let both = gw.mint("patient/*.rs user/Condition.rs", Some("p1"));
    assert_eq!(gw.get("Condition/cond-p2", Some(&both)).await.status(), 200);
    assert_eq!(
        gw.get("Observation/obs-p2-0", Some(&both)).await.status(),
        404
    );

    // patient/ scopes without a patient claim: refused before the upstream.
    let before = gw.upstream.seen().len();
    let orphan = gw.mint("patient/*.rs", None);
    let (s, body) = status_and_body(gw.get("Observation/obs-p1-1", Some(&orphan)).await).await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("no patient launch context"), "{body}");
    assert_eq!(gw.upstream.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_reads_report_upstream_failures() {
    let gw = Gateway::start(Options {
        read_timeout_ms: 500,
        ..Options::default()
    })
    .await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let (s, body) = status_and_body(gw.get("Observation/slow-1", Some(&p1)).await).await;
    assert_eq!(s, 504, "{body}");
    assert!(body.contains("OperationOutcome"), "{body}");

    let down = Gateway::start(Options {
        upstream_url: Some(format!("http://127.0.0.1:{}/fhir", support::free_port())),
        ..Options::default()
    })
    .await;
    let p1 = down.mint("patient/*.rs", Some("p1"));
    let (s, body) = status_and_body(down.get("Observation/obs-p1-0", Some(&p1)).await).await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("upstream_unreachable"), "{body}");
}

/// Answers held to be checked share the memory budget of request bodies
/// (three times their size): one more that does not fit is refused with
/// 503 while the others are held, and served once they are let go. A read
/// whose answer is too large to check is answered as another patient's
/// would be (404), not with a 502 that tells it exists; a search still
/// gets its 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_held_to_be_checked_are_bounded() {
    let gw = Gateway::start(Options {
        read_timeout_ms: 10_000,
        server_yaml: "  max_classified_body_bytes: 1024\n  max_held_body_bytes: 3072\n".into(),
        upstream_yaml: "  max_checked_answer_bytes: 1024\n".into(),
        ..Options::default()
    })
    .await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));

    // Too large to check: 404 for a read, with the reason on record.
    let r = gw.get("Observation/large", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 404, "{body}");
    assert!(!body.contains("xxxxxxxx"), "{body}");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["reason"], "upstream_answer_too_large", "{rec}");
    assert_eq!(rec["decision"], "error", "{rec}");
    // So too for a write, whose stored resource is fetched to prove it:
    // too large to check is answered as a missing one is, nothing written.
    let p2 = gw.mint("patient/*.cruds", Some("p2"));
    for path in ["Observation/large", "Observation/no-such-large"] {
        let r = gw
            .client
            .delete(format!("{}/{path}", gw.base))
            .bearer_auth(&p2)
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let (s, body) = status_and_body(r).await;
        assert_eq!(s, 404, "{path}: {body}");
        assert!(!body.contains("larger than"), "{body}");
        if path == "Observation/large" {
            assert_eq!(gw.audit_for(&id)["reason"], "upstream_answer_too_large");
        }
    }
    assert!(
        !gw.upstream.seen().iter().any(|r| r.method == "DELETE"),
        "nothing deleted"
    );
    // A large error page is judged by its status: a server error stays
    // one (502), it says nothing of whether a resource exists.
    let r = gw.get("Observation/large-error", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("upstream answered 500"), "{body}");
    assert_eq!(gw.audit_for(&id)["reason"], "upstream_answer_unchecked");
    // Unchecked (user/ scopes), it passes whole.
    let user = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Observation/large", Some(&user)).await.status(), 200);
    // A search larger than the cap: read entry by entry, the entries that
    // do not fit in what the cap leaves let go (on record).
    let r = gw.get("Observation", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    let mut page: Value = serde_json::from_str(&body).unwrap();
    // (What is held never passes the cap: the warning that the page is
    // short is added after.)
    let warning = page["entry"].as_array_mut().unwrap().pop().unwrap();
    assert_eq!(warning["search"]["mode"], "outcome", "{body}");
    // (Its total goes: under a patient's grant it could count resources
    // shared with another patient, left out on some page.)
    assert!(page.get("total").is_none(), "{body}");
    assert!(page.to_string().len() <= 1024, "{body}");
    let detail = gw.audit_for(&id)["detail"].to_string();
    assert!(detail.contains("too large for what"), "{detail}");

    // 900 bytes of an answer held (2,700 of the 3,072), the rest stalled.
    let (base, t) = (gw.base.clone(), p1.clone());
    let held = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("{base}/Observation/trickle"))
            .bearer_auth(t)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let refused = loop {
        assert!(std::time::Instant::now() < deadline, "never refused");
        if gw.upstream.count_containing("trickle") == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        let r = gw.get("Observation/obs-p1-0", Some(&p1)).await;
        if r.status() == 503 {
            break r;
        }
        assert_eq!(r.status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let body = refused.text().await.unwrap();
    assert!(body.contains("max_held_body_bytes"), "{body}");
    assert_eq!(gw.audit_for(&id)["reason"], "answer_budget_exhausted");
    // The stalled answer ends unfinished (502); its share is given back.
    assert_eq!(held.await.unwrap().unwrap(), 502);
    let r = gw.get("Observation/obs-p1-0", Some(&p1)).await;
    assert_eq!(r.status(), 200);
}

/// A checked batch's answer points through the gateway: its own link and
/// its entries' `fullUrl`s, as the upstream wrote them under its own base,
/// are moved to the public base (a client following them would reach the
/// upstream, or nothing; and they name the upstream's host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_batch_answer_points_through_the_gateway() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/obs-p1-0"}},
        {"request": {"method": "GET", "url": "Patient/p1"}}]});
    let (s, body) = post_fhir(&gw, &p1, "", &batch).await;
    assert_eq!(s, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["link"][0]["url"], gw.base, "{body}");
    assert_eq!(
        answer["entry"][0]["fullUrl"],
        format!("{}/Observation/obs-p1-0", gw.base),
        "{body}"
    );
    assert_eq!(
        answer["entry"][1]["fullUrl"],
        format!("{}/Patient/p1", gw.base),
        "{body}"
    );
    assert!(!body.contains("/r4"), "the upstream's base: {body}");
}

/// An answer read to be checked must arrive whole within
/// `upstream.checked_answer_timeout_ms`, however quick each read: one
/// that drips is a 504, not held as long as the upstream likes; given
/// the time, the same answer passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_answer_must_arrive_whole_in_time() {
    for (limit, want) in [(1500, 504), (20_000, 200)] {
        let gw = Gateway::start(Options {
            read_timeout_ms: 1000,
            upstream_yaml: format!("  checked_answer_timeout_ms: {limit}\n"),
            ..Options::default()
        })
        .await;
        let p1 = gw.mint("patient/*.rs", Some("p1"));
        let r = gw.get("Observation/drip", Some(&p1)).await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let (s, body) = status_and_body(r).await;
        assert_eq!(s, want, "{limit}: {body}");
        if want == 504 {
            assert!(body.contains("checked_answer_timeout_ms"), "{body}");
            assert_eq!(gw.audit_for(&id)["reason"], "upstream_timeout");
        } else {
            assert!(body.contains("\"drip\""), "{body}");
        }
    }
}

/// A search's answer larger than `upstream.max_checked_answer_bytes` is
/// read entry by entry, included resources outside the grant let go as
/// they come: only what the caller may see counts against the cap. Padded
/// with the caller's own data to near the cap, an include of another
/// patient's resource answers the same whether that resource exists or
/// not (before, a 502 told it did). The caller's own data over the cap is
/// still a 502; an entry larger than the cap by itself is let go unjudged,
/// on record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_too_large_to_hold_count_only_what_the_caller_may_see() {
    let obs = |id: &str, patient: &str, code: &str, focus: Option<&str>, pad: usize| {
        let mut o = json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": "http://example.org", "code": code}]},
            "subject": {"reference": format!("Patient/{patient}")},
            "note": [{"text": "x".repeat(pad)}]
        });
        if let Some(f) = focus {
            o["focus"] = json!([{"reference": f}]);
        }
        o
    };
    let mut bob = obs("foreign-big", "p2", "bob", None, 0);
    bob["note"] = json!([{"text": format!("Bob {}", "y".repeat(2000))}]);
    let mut huge = obs("foreign-huge", "p2", "bob", None, 0);
    huge["note"] = json!([{"text": format!("Bob {}", "y".repeat(6000))}]);
    let extra = vec![
        obs(
            "oracle-a",
            "p1",
            "oracle-a",
            Some("Observation/foreign-big"),
            2500,
        ),
        obs(
            "oracle-b",
            "p1",
            "oracle-b",
            Some("Observation/foreign-nil"),
            2500,
        ),
        obs(
            "oracle-c",
            "p1",
            "oracle-c",
            Some("Observation/foreign-huge"),
            100,
        ),
        obs("oracle-d", "p1", "oracle-d", None, 6000),
        obs("oracle-e1", "p1", "oracle-e", None, 2500),
        obs("oracle-e2", "p1", "oracle-e", None, 2500),
        obs(
            "oracle-f",
            "p1",
            "oracle-f",
            Some("Observation/obs-p2-0"),
            10,
        ),
        obs(
            "oracle-g",
            "p1",
            "oracle-g",
            Some("Observation/obs-p2-9"),
            10,
        ),
        {
            let mut h = obs("oracle-h", "p1", "oracle-h", None, 10);
            h["focus"] = json!([{"reference": "Observation/foreign-1"},
                {"reference": "Observation/foreign-2"}, {"reference": "Observation/foreign-3"}]);
            h
        },
        obs("foreign-1", "p2", "bob", None, 1500),
        obs("foreign-2", "p2", "bob", None, 1500),
        obs("foreign-3", "p2", "bob", None, 1500),
        bob,
        huge,
    ];
    let (upstream, addr) = fhirwall::sandbox::fhir::FhirSandbox::spawn_with("/r4", extra).await;
    let gw = Gateway::start_with(
        Options {
            upstream_yaml: "  max_checked_answer_bytes: 4096\n".into(),
            ..Options::default()
        },
        upstream,
        addr,
    )
    .await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let search = |code: &str| format!("Observation?code={code}&_include=Observation:focus");

    // Own 2.5 KB, another patient's 2 KB included: over the cap whole.
    let r = gw.get(&search("oracle-a"), Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, with_other) = status_and_body(r).await;
    assert_eq!(s, 200, "{with_other}");
    assert_nothing_of_p2("include of a large resource of p2", &with_other);
    assert_eq!(
        entry_ids(&serde_json::from_str(&with_other).unwrap()),
        ["oracle-a"]
    );
    // (Too large for what the cap left once the caller's own was kept:
    // let go unjudged.)
    let rec = gw.audit_for(&id);
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(
        rec["detail"],
        "1 entries left out unjudged, too large for what upstream.max_checked_answer_bytes leaves",
        "{rec}"
    );
    // The same search whose include names nothing: the same answer (same
    // length: only the searched code and the focus differ, by a letter).
    let (s, without) = status_and_body(gw.get(&search("oracle-b"), Some(&p1)).await).await;
    assert_eq!(s, 200, "{without}");
    assert_eq!(with_other.len(), without.len(), "{with_other}\n{without}");
    assert_eq!(
        with_other
            .replace("oracle-a", "oracle-b")
            .replace("foreign-big", "foreign-nil"),
        without
    );

    // Written by a server that spaces its JSON (`_pretty=true`), an answer
    // from which an include was left out looks like one from which none
    // was: the entries are written one way (whether the answer is larger
    // than the cap or not).
    for (with, without, swaps) in [
        (
            "oracle-f",
            "oracle-g",
            [("oracle-f", "oracle-g"), ("obs-p2-0", "obs-p2-9")],
        ),
        (
            "oracle-a",
            "oracle-b",
            [("oracle-a", "oracle-b"), ("foreign-big", "foreign-nil")],
        ),
    ] {
        let pretty = |code: &str| format!("{}&_pretty=true", search(code));
        let (s, with_other) = status_and_body(gw.get(&pretty(with), Some(&p1)).await).await;
        assert_eq!(s, 200, "{with_other}");
        assert_nothing_of_p2("pretty include", &with_other);
        let (s, none) = status_and_body(gw.get(&pretty(without), Some(&p1)).await).await;
        assert_eq!(s, 200, "{none}");
        assert!(none.contains("\n  "), "spaced by the upstream: {none}");
        let mut swapped = with_other.clone();
        for (a, b) in swaps {
            swapped = swapped.replace(a, b);
        }
        assert_eq!(swapped, none);
    }

    // Three of another patient's, each judged and left out as it comes:
    // over the cap together, they are never held together.
    let r = gw.get(&search("oracle-h"), Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["oracle-h"]
    );
    assert!(!body.contains("xxxxxxxxxxx"), "{body}");
    assert_eq!(
        gw.audit_for(&id)["detail"],
        "3 included resources outside the grant left out of the answer"
    );

    // In a batch: another patient's resource read by id is replaced by a
    // 404 as it comes, and only what is kept counts against the cap: the
    // same answer whether it exists or not, spaced or not.
    for pretty in ["", "?_pretty=true"] {
        let batch = |own: &str, other: &str| {
            json!({"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": format!("Observation/{own}")}},
                {"request": {"method": "GET", "url": format!("Observation/{other}")}}]})
        };
        let (s, with_other) = post_fhir(&gw, &p1, pretty, &batch("oracle-a", "foreign-big")).await;
        assert_eq!(s, 200, "{with_other}");
        assert_nothing_of_p2("batch read of a large resource of p2", &with_other);
        let (s, none) = post_fhir(&gw, &p1, pretty, &batch("oracle-b", "foreign-nil")).await;
        assert_eq!(s, 200, "{none}");
        assert_eq!(
            with_other
                .replace("oracle-a", "oracle-b")
                .replace("foreign-big", "foreign-nil"),
            none,
            "{pretty}"
        );
        let answer: Value = serde_json::from_str(&none).unwrap();
        assert_eq!(answer["entry"][1]["response"]["status"], "404 Not Found");
    }
    // The record says which entry's answer was withheld, and what the
    // upstream answered it (when it was small enough to read).
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation/oracle-a"}},
        {"request": {"method": "GET", "url": "Observation/obs-p2-0"}},
        {"request": {"method": "GET", "url": "Observation/foreign-big"}}]});
    let r = gw
        .client
        .post(format!("{}/", gw.base))
        .bearer_auth(&p1)
        .header("content-type", "application/fhir+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.status(), 200);
    let rec = gw.audit_for(&id);
    assert_eq!(rec["entries"][1]["status"], 200, "{rec}");
    assert_eq!(rec["entries"][1]["withheld"], true, "{rec}");
    assert_eq!(rec["entries"][2]["withheld"], true, "{rec}");
    assert_ne!(rec["entries"][0]["withheld"], true, "{rec}");
    assert_eq!(
        rec["detail"],
        "1 entries too large for what upstream.max_checked_answer_bytes leaves, their answers withheld unjudged",
        "{rec}"
    );
    // A search entry too large to hold (the caller's own, over the cap):
    // its refusal says so, and is not judged again as the upstream's.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?code=oracle-e"}}]});
    let (s, body) = post_fhir(&gw, &p1, "", &batch).await;
    assert_eq!(s, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["entry"][0]["response"]["status"], "502 Bad Gateway");
    assert!(
        body.contains("larger than fhirwall reads to check it"),
        "{body}"
    );
    // A checked search's includes inside a Bundle, or a stored search's
    // page (which brings its search's includes): refused (the entry is
    // held whole, its size would count them).
    for url in [
        "Observation?code=oracle-f&_include=Observation:focus",
        "?_getpages=Observation:p1&_getpagesoffset=0&_count=10",
        "Observation?_getpages=Observation:p1",
    ] {
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": url}}]});
        let before = gw.upstream.seen().len();
        let (s, body) = post_fhir(&gw, &p1, "", &batch).await;
        assert_eq!(s, 403, "{url}: {body}");
        assert!(body.contains("inside a Bundle is refused"), "{url}: {body}");
        assert_eq!(gw.upstream.seen().len(), before);
    }

    // Another patient's resource larger than the cap by itself: let go
    // unjudged, on record.
    let r = gw.get(&search("oracle-c"), Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert_nothing_of_p2("include of a huge resource of p2", &body);
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["oracle-c"]
    );
    let rec = gw.audit_for(&id);
    assert_eq!(
        rec["detail"],
        "1 entries left out unjudged, too large for what upstream.max_checked_answer_bytes leaves",
        "{rec}"
    );
    // So is the caller's own match, unjudged (only what is kept is ever
    // held), but a search that brings only its matches, which the
    // narrowing keeps to the caller's, says that its page is short: a
    // warning entry at its end, on record.
    let warned = |body: &str| -> Vec<String> {
        let bundle: Value = serde_json::from_str(body).unwrap();
        let mut warnings = Vec::new();
        for e in bundle["entry"].as_array().into_iter().flatten() {
            if e["search"]["mode"] == "outcome" {
                assert_eq!(e["resource"]["resourceType"], "OperationOutcome", "{e}");
                assert_eq!(e["resource"]["issue"][0]["severity"], "warning", "{e}");
                assert_eq!(e["resource"]["issue"][0]["code"], "incomplete", "{e}");
                warnings.push(e["resource"]["issue"][0]["diagnostics"].to_string());
            }
        }
        warnings
    };
    let r = gw.get("Observation?code=oracle-d", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("xxxxxxxxxxx"), "{body}");
    assert_eq!(entry_ids(&serde_json::from_str(&body).unwrap()), [""]);
    let w = warned(&body);
    assert_eq!(w.len(), 1, "{body}");
    assert!(
        w[0].contains("1 of this page's entries were left out"),
        "{body}"
    );
    assert_eq!(
        gw.audit_for(&id)["detail"],
        "1 entries left out unjudged, too large for what upstream.max_checked_answer_bytes \
         leaves; the answer ends with a warning saying so"
    );
    // The caller's own entries over the cap: what does not fit in what
    // the cap leaves is let go too, and said so.
    let r = gw.get("Observation?code=oracle-e", Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["oracle-e1", ""]
    );
    assert_eq!(warned(&body).len(), 1, "{body}");
    assert_eq!(
        gw.audit_for(&id)["detail"],
        "1 entries left out unjudged, too large for what upstream.max_checked_answer_bytes \
         leaves; the answer ends with a warning saying so"
    );
    // With an include (which may bring another patient's resource), an
    // entry too large to check goes without a trace, as above (oracle-c).
    let r = gw.get(&search("oracle-d"), Some(&p1)).await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        gw.audit_for(&id)["detail"],
        "1 entries left out unjudged, too large for what upstream.max_checked_answer_bytes leaves"
    );
}

/// An answer given for a token never tells a shared cache it may keep it
/// for others, checked (patient/) or passed on as it comes (user/); one
/// the upstream gave no caching policy is not to be stored at all (a
/// browser would keep it on heuristics). Public routes are left as they
/// come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_for_a_token_are_private_to_its_caller() {
    let gw = Gateway::start(Options::default()).await;
    let cache_control = |r: &reqwest::Response| -> Vec<String> {
        r.headers()
            .get_all("cache-control")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };
    for token in [
        gw.mint("patient/*.rs", Some("p1")),
        gw.mint("user/*.rs", None),
    ] {
        let r = gw.get("Observation/cacheable", Some(&token)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(cache_control(&r), ["private, max-age=600"]);
        // A CDN reads its own header before Cache-Control: not passed on.
        for name in ["cdn-cache-control", "surrogate-control"] {
            assert!(r.headers().get(name).is_none(), "{name}: {:?}", r.headers());
        }
        let r = gw.get("Observation/obs-p1-1", Some(&token)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(cache_control(&r), ["no-store"]);
        let r = gw.get("Observation/private-only", Some(&token)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(cache_control(&r), ["private, no-store"]);
    }
    let r = gw.get("metadata", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(cache_control(&r), Vec::<String>::new());
}

/// Entry resource ids of a searchset answer.
fn entry_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["resource"]["id"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_are_narrowed_to_the_context_patient() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let get = |rel: &'static str| {
        let (gw, p1) = (&gw, p1.clone());
        async move {
            let r = gw.get(rel, Some(&p1)).await;
            status_and_body(r).await
        }
    };

    // Naming the context patient: passes, answer checked.
    let (s, body) = get("Observation?patient=p1").await;
    assert_eq!(s, 200, "{body}");
    let ids = entry_ids(&serde_json::from_str(&body).unwrap());
    assert_eq!(ids, ["obs-moved", "obs-p1-0", "obs-p1-1"], "{body}");
    assert_nothing_of_p2("Observation?patient=p1", &body);

    // Naming no patient: narrowed by adding the patient parameter.
    let (s, body) = get("Observation?code=2339-0").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["obs-p1-1"]
    );
    assert_nothing_of_p2("Observation?code", &body);
    let seen = gw.upstream.seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("code=2339-0"))
        .unwrap();
    // First in the query: a server reading only so many parameters reads
    // it whatever follows.
    assert!(last.uri.contains("?patient=p1&code=2339-0"), "{}", last.uri);
    // More parameters than server.max_parameters (100): refused unread,
    // however they are spread over the query and a form.
    let padding: String = (0..100).map(|i| format!("&_pad{i}=x")).collect();
    let (s, body) = get_owned(&gw, &p1, format!("Observation?code=many-1{padding}")).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("server.max_parameters"), "{body}");
    let r = gw
        .client
        .post(format!("{}/Observation/_search?code=many-2", gw.base))
        .bearer_auth(&p1)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(padding[1..].to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("server.max_parameters"), "{body}");
    assert_eq!(gw.upstream.count_containing("many-"), 0);
    let (s, body) = get("Patient?gender=male").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(entry_ids(&serde_json::from_str(&body).unwrap()), ["p1"]);
    assert_nothing_of_p2("Patient?gender=male", &body);

    // Naming another patient: refused before the upstream.
    for rel in [
        "Observation?patient=p2&code=other-1",
        "Observation?subject=Patient/p2&code=other-2",
        "Observation?subject=Patient/p1,Patient/p2&code=other-3",
        "Patient?_id=p2&name=other-4",
        "Patient/p2/Observation?code=other-5",
    ] {
        let (s, body) = get(rel).await;
        assert_eq!(s, 403, "{rel}: {body}");
        let o: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(o["resourceType"], "OperationOutcome");
        assert!(
            !body.contains("entry") && !body.contains("valueQuantity"),
            "{rel}: {body}"
        );
    }
    assert_eq!(gw.upstream.count_containing("other-"), 0);
    // Membership in a List that need not be the patient's (HAPI searches
    // `_list=id` as `_has:List:item:_id=id`): refused before the upstream.
    for rel in [
        "Patient?_list=9001",
        "Observation?patient=p1&_list=9001,9002",
    ] {
        let (s, body) = get(rel).await;
        assert_eq!(s, 403, "{rel}: {body}");
        assert!(body.contains("the List it names"), "{rel}: {body}");
    }
    assert_eq!(gw.upstream.count_containing("_list"), 0);

    // $everything: the patient's own, with what it references (the
    // Practitioner); an answer holding another patient's resource is refused.
    let (s, body) = get("Patient/p1/$everything").await;
    assert_eq!(s, 200, "{body}");
    let ids = entry_ids(&serde_json::from_str(&body).unwrap());
    assert!(
        ids.contains(&"p1".to_string()) && ids.contains(&"dr-1".to_string()),
        "{body}"
    );
    assert_nothing_of_p2("$everything", &body);
    let (s, _) = get("Patient/p2/$everything").await;
    assert_eq!(s, 403);
    let p3 = gw.mint("patient/*.rs", Some("p3"));
    let (s, body) = status_and_body(gw.get("Patient/p3/$everything", Some(&p3)).await).await;
    assert_eq!(s, 403, "{body}");
    assert_nothing_of_p2("$everything of p3", &body);

    // Compartment search of the context patient.
    let (s, body) = get("Patient/p1/Condition").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["cond-p1"]
    );

    // The (lenient) upstream ignores `asserter`: its answer holds every
    // patient's Conditions, so nothing of it is passed on.
    let (s, body) = get("Condition?asserter=Patient/p1").await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("outside the compartment"), "{body}");
    assert_nothing_of_p2("Condition?asserter", &body);

    // An include that leaves the compartment (the Practitioner) is left
    // out, as if it did not exist: a refusal would tell that it does.
    let (s, body) = get("Observation?patient=p1&_include=Observation:performer").await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("Welby"), "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["obs-moved", "obs-p1-0", "obs-p1-1"]
    );
    assert!(
        gw.audit_containing("included resources outside the grant left out")
            .contains("\"detail\":\"1 included resources outside the grant left out"),
        "the record says what was left out"
    );

    // An include that stays inside (the patient itself) passes, with a token
    // that grants both types; without Patient in the grant it is refused.
    let both = gw.mint("patient/Observation.rs patient/Patient.rs", Some("p1"));
    let r = gw
        .get(
            "Observation?patient=p1&_include=Observation:subject:Patient",
            Some(&both),
        )
        .await;
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    let ids = entry_ids(&serde_json::from_str(&body).unwrap());
    assert!(ids.contains(&"p1".to_string()), "{body}");
    let obs_only = gw.mint("patient/Observation.rs", Some("p1"));
    let r = gw
        .get(
            "Observation?patient=p1&_include=Observation:subject:Patient",
            Some(&obs_only),
        )
        .await;
    assert_eq!(r.status(), 403);

    // Checked answers must come whole, as JSON: no oracle through _format
    // (502 for an existing resource vs 404 for a missing one).
    for rel in [
        "Observation/obs-p2-0?_format=xml",
        "Observation/no-such-2?_format=xml",
        "Observation?patient=p1&_elements=code",
        "Observation?patient=p1&_summary=true",
    ] {
        let (s, body) = get(rel).await;
        assert_eq!(s, 400, "{rel}: {body}");
        assert!(body.contains("must be whole FHIR JSON"), "{rel}: {body}");
    }
    let (s, body) = get("Observation?patient=p1&_summary=count").await;
    assert_eq!(s, 200, "{body}");
    // A total that no entry backs is dropped (a lenient upstream ignoring
    // the narrowing would be counting every patient's resources).
    let (s, body) = get("Observation?patient=p1&_count=0").await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("\"total\""), "{body}");
    // A system search without a page id would count every patient's data.
    let (s, _) = get("?_summary=count").await;
    assert_eq!(s, 403);

    // Form bodies are search parameters; anywhere else they are refused.
    let r = gw
        .client
        .post(format!("{}/Patient/p1/Observation/_search", gw.base))
        .bearer_auth(&p1)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("_filter=code%20eq%20x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        403,
        "form parameters of a compartment search are decided"
    );

    // Unbounded parameters are refused before the upstream.
    for rel in [
        "Observation?patient=p1&_filter=code%20eq%20x",
        "Observation?patient=p1&_contained=true",
        "Observation?patient=p1&_query=everything",
    ] {
        let (s, _) = get(rel).await;
        assert_eq!(s, 403, "{rel}");
    }
    assert_eq!(gw.upstream.count_containing("_filter"), 0);

    // Orders and filters by resources that need not be the patient's: a
    // chained sort (HAPI), a Patient linked to this one.
    for rel in [
        "Observation?patient=p1&_sort=Condition:focus.code",
        "Patient/p1/Observation?_sort=-Patient:subject.birthdate",
        "Patient?_has:Patient:link:birthdate=ge1980-01-01",
    ] {
        let (s, body) = get(rel).await;
        assert_eq!(s, 403, "{rel}");
        assert!(
            body.contains("need not be") || body.contains("does not"),
            "{rel}: {body}"
        );
    }
    assert_eq!(gw.upstream.count_containing("_sort"), 0);
    assert_eq!(gw.upstream.count_containing("_has"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_links_go_through_the_gateway_and_stay_narrowed() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let mut url = format!("{}/Observation?_count=1", gw.base);
    let mut ids = Vec::new();
    for _ in 0..10 {
        let r = gw.client.get(&url).bearer_auth(&p1).send().await.unwrap();
        let (s, body) = status_and_body(r).await;
        assert_eq!(s, 200, "{url}: {body}");
        assert_nothing_of_p2(&url, &body);
        let b: Value = serde_json::from_str(&body).unwrap();
        ids.extend(entry_ids(&b));
        let next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(n) => {
                assert!(
                    n.starts_with(&gw.base),
                    "next link not through the gateway: {n}"
                );
                assert!(n.contains("patient=p1"), "next link not narrowed: {n}");
                url = n;
            }
            None => break,
        }
    }
    ids.sort();
    assert_eq!(ids, ["obs-moved", "obs-p1-0", "obs-p1-1"]);

    // A tampered next link naming another patient is refused.
    let evil = format!("{}/Observation?patient=p2&_count=1&_offset=1", gw.base);
    let r = gw.client.get(&evil).bearer_auth(&p1).send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_search_bodies_are_decided_and_narrowed() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let post = |form: &'static str| {
        let (gw, p1) = (&gw, p1.clone());
        async move {
            let r = gw
                .client
                .post(format!("{}/Observation/_search", gw.base))
                .bearer_auth(&p1)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form)
                .send()
                .await
                .unwrap();
            status_and_body(r).await
        }
    };
    let (s, body) = post("code=8867-4").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        entry_ids(&serde_json::from_str(&body).unwrap()),
        ["obs-p1-0"]
    );
    assert_nothing_of_p2("POST _search", &body);

    let before = gw.upstream.seen().len();
    let (s, body) = post("patient=p2").await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(gw.upstream.seen().len(), before);

    // What fhirwall added to confine a search is on record (names only).
    let r = gw.get("Observation?code=narrow-audit-1", Some(&p1)).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["narrowed_with"], json!(["patient"]), "{rec}");
    assert!(!rec.to_string().contains("narrow-audit-1"), "{rec}");

    // The body naming the patient does not confine the search: a server
    // may leave a body unread, so the patient goes into the query too.
    let (s, body) = post("patient=p1&code=form-named-1").await;
    assert_eq!(s, 200, "{body}");
    let seen = gw.upstream.seen();
    let sent = seen.last().unwrap();
    assert!(
        sent.uri.starts_with("/r4/Observation/_search?") && sent.uri.contains("patient=p1"),
        "the narrowing is not in the query: {}",
        sent.uri
    );

    // A form body where servers read none (a GET, whose query alone they
    // read), or spelt so they would not read it, is refused: fhirwall
    // would decide on parameters the upstream never sees.
    let before = gw.upstream.seen().len();
    for (method, content_type, status) in [
        ("GET", "application/x-www-form-urlencoded", 400),
        ("POST", "Application/x-www-form-urlencoded", 415),
    ] {
        let r = gw
            .send(
                method,
                "Condition/_search?code=hidden-form-1",
                &p1,
                content_type,
                "patient=p1",
            )
            .await;
        let (s, body) = status_and_body(r).await;
        assert_eq!(s, status, "{method} {content_type}: {body}");
    }
    let r = gw
        .send(
            "GET",
            "Condition?code=hidden-form-2",
            &p1,
            "application/x-www-form-urlencoded",
            "patient=p1",
        )
        .await;
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("only as the body of POST"), "{body}");
    // A form sent with a Content-Encoding, `identity` too, is one HAPI
    // leaves unread: its `_type` would confine nothing there, and the
    // system search would reach every type.
    let obs_only = gw.mint("user/Observation.rs", None);
    let r = gw
        .client
        .post(format!("{}/_search", gw.base))
        .bearer_auth(&obs_only)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "identity")
        .body("_type=Observation")
        .send()
        .await
        .unwrap();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 415, "{body}");
    assert!(body.contains("without a Content-Encoding header"), "{body}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused search went upstream"
    );
}

/// Bundle members in shapes HAPI's lenient parser reads but fhirwall
/// would not (a one-element array for a single value) are refused: an
/// `ifNoneExist` in an array made an unchecked conditional create, whose
/// answer (with `Prefer: return=representation`) is the matched resource;
/// a PATCH entry's `ifMatch` that is a match URL patches what it finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_members_in_shapes_fhirwall_would_not_read_are_refused() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/Observation.c", Some("p1"));
    let writer = gw.mint("user/Observation.u", None);
    let patch = json!({"resourceType": "Binary", "contentType": "application/json-patch+json",
        "data": "W3sib3AiOiJ0ZXN0IiwicGF0aCI6Ii9zdGF0dXMiLCJ2YWx1ZSI6ImZpbmFsIn1d"});
    for (token, entry, says) in [
        (
            &p1,
            json!({"request": {"method": "POST", "url": "Observation", "ifNoneExist": ["_id=obs-p2-0"]},
                   "resource": {"resourceType": "Observation", "status": "final",
                                "subject": {"reference": "Patient/p1"}}}),
            "ifNoneExist is not a string",
        ),
        (
            &writer,
            json!({"request": {"method": "PATCH", "url": "Observation/obs-p1-0",
                               "ifMatch": "Observation?subject:Patient.family=Smith"},
                   "resource": patch}),
            "is not an entity tag",
        ),
    ] {
        for kind in ["transaction", "batch"] {
            let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": [entry]});
            let r = gw
                .post_bundle(token, bundle.to_string())
                .header("Prefer", "return=representation")
                .send()
                .await
                .unwrap();
            let (s, body) = status_and_body(r).await;
            assert_eq!(s, 400, "{kind}: {body}");
            assert!(body.contains(says), "{kind}: {body}");
        }
    }
    assert!(gw.upstream.seen().is_empty(), "{:?}", gw.upstream.seen());
}

/// A checked request's answer is fetched by fhirwall, which sends only
/// bodies it read: a body it does not read is refused, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checked_request_with_a_body_fhirwall_does_not_read_is_refused() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let params = json!({"resourceType": "Parameters",
        "parameter": [{"name": "_since", "valueInstant": "2020-01-01T00:00:00Z"}]});
    let r = gw
        .send(
            "POST",
            "Patient/p1/$everything",
            &p1,
            "application/fhir+json",
            params.to_string(),
        )
        .await;
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("its body is not read"), "{body}");
    assert!(gw.upstream.seen().is_empty(), "{:?}", gw.upstream.seen());
    // Without a body it is served; so is HAPI's client's POST with an
    // empty Parameters, which is passed on as it came.
    let (s, body) = status_and_body(gw.get("Patient/p1/$everything", Some(&p1)).await).await;
    assert_eq!(s, 200, "{body}");
    let empty = r#"{"resourceType":"Parameters"}"#;
    let r = gw
        .send(
            "POST",
            "Patient/p1/$everything",
            &p1,
            "application/fhir+json",
            empty,
        )
        .await;
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    let seen = gw.upstream.seen();
    let sent = seen.last().unwrap();
    assert_eq!(
        (sent.method.as_str(), &sent.body[..]),
        ("POST", empty.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_mode_requires_searches_to_name_the_patient() {
    let gw = Gateway::start(Options {
        extra_yaml: "patient_context:\n  unnarrowed_search: refuse\n".into(),
        ..Options::default()
    })
    .await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let (s, body) = status_and_body(gw.get("Observation?code=unnamed-1", Some(&p1)).await).await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("must name the context patient"), "{body}");
    assert_eq!(gw.upstream.count_containing("unnamed-1"), 0);
    let (s, _) = status_and_body(gw.get("Observation?patient=p1", Some(&p1)).await).await;
    assert_eq!(s, 200);
}

/// Property, end to end: random GET requests under random `patient/`
/// scopes of p1, through the real gateway in front of the sandbox. Whatever
/// comes back with 200 holds only resources of p1's compartment (judged
/// independently of fhirwall's table: the Patient p1 itself, or a resource
/// whose JSON mentions `Patient/p1`) and only types the scopes grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn property_nothing_outside_the_grant_reaches_the_client() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

    let gw = Gateway::start(Options::default()).await;
    let types = [
        "Patient",
        "Observation",
        "Condition",
        "Practitioner",
        "Encounter",
    ];
    let ids = [
        "p1",
        "p2",
        "p3",
        "obs-p1-0",
        "obs-p2-0",
        "obs-shared",
        "obs-moved",
        "cond-p1",
        "cond-p2",
        "dr-1",
        "nope",
    ];
    let path = (
        0..7usize,
        prop::sample::select(types.to_vec()),
        prop::sample::select(ids.to_vec()),
    )
        .prop_map(|(shape, t, id)| match shape {
            0 => t.to_string(),
            1 => format!("{t}/{id}"),
            2 => format!("{t}/{id}/_history"),
            3 => format!("{t}/{id}/_history/1"),
            4 => format!("Patient/{id}/{t}"),
            5 => format!("Patient/{id}/$everything"),
            _ => String::new(),
        });
    let param = prop::sample::select(vec![
        "patient=p1",
        "patient=p2",
        "subject=Patient/p1",
        "subject=Patient/p2",
        "subject=p2",
        "performer=Patient/p1",
        "_id=p1",
        "_id=p2",
        "_include=Observation:performer",
        "_include=Observation:subject:Patient",
        "_revinclude=Observation:subject",
        "_count=1",
        "code=8867-4",
        "gender=male",
    ]);
    let query = prop::collection::vec(param, 0..3).prop_map(|v| v.join("&"));
    let scope = prop::sample::select(vec![
        "patient/*.rs",
        "patient/*.rs",
        "patient/*.rs",
        "patient/*.read",
        "patient/Observation.rs",
        "patient/Observation.r",
        "patient/Patient.r",
        "patient/Patient.rs",
        "patient/Condition.s",
        "patient/Practitioner.rs",
        "patient/Encounter.rs",
    ]);
    let scopes = prop::collection::vec(scope, 1..4).prop_map(|v| v.join(" "));

    let handle = tokio::runtime::Handle::current();
    // A fixed seed: the same 512 requests on every run, so CI is stable;
    // change the seed to explore others.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 512,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let passed = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&(path, query, scopes), |(path, query, scopes)| {
        let url = if query.is_empty() {
            format!("{}/{path}", gw.base)
        } else {
            format!("{}/{path}?{query}", gw.base)
        };
        let token = gw.mint(&scopes, Some("p1"));
        let (status, body) = tokio::task::block_in_place(|| {
            handle.block_on(async {
                let r = gw
                    .client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                status_and_body(r).await
            })
        });
        if status != 200 {
            return Ok(());
        }
        passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let doc: Value = serde_json::from_str(&body)
            .map_err(|e| TestCaseError::fail(format!("{url}: 200 but not JSON ({e}): {body}")))?;
        let resources: Vec<&Value> = if doc["resourceType"] == "Bundle" {
            doc["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["search"]["mode"] != "outcome")
                .filter_map(|e| e.get("resource"))
                .collect()
        } else {
            vec![&doc]
        };
        let granted = |t: &str| {
            scopes.split(' ').any(|s| {
                let (ty, _) = s.trim_start_matches("patient/").split_once('.').unwrap();
                ty == "*" || ty == t
            })
        };
        for r in resources {
            let t = r["resourceType"].as_str().unwrap_or("");
            let text = r.to_string();
            // $everything also returns what the patient's resources reference
            // outside the compartment (the sandbox's Practitioner).
            let referenced = url.contains("$everything") && t == "Practitioner";
            let inside = (t == "Patient" && r["id"] == "p1")
                || text.contains("\"Patient/p1\"")
                || referenced;
            prop_assert!(
                inside,
                "{url} [{scopes}] passed a resource outside p1's compartment: {text}"
            );
            prop_assert!(
                granted(t),
                "{url} [{scopes}] passed a {t}, not granted: {text}"
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The property must have seen allowed answers, not only refusals.
    let passed = passed.into_inner();
    eprintln!("{passed} of 512 requests were answered 200");
    assert!(
        passed >= 40,
        "only {passed} of 512 requests were answered 200"
    );
}

/// The patient's own record linked to another patient's (`Patient.link`,
/// an MPI's `seealso` or `replaced-by`) is in both compartments: under
/// patient/ scopes it is then read-only, like any shared resource — a PUT
/// could otherwise drop the link. Unlinked, its writes are pinned to the
/// version fhirwall checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patients_own_record_linked_to_another_is_read_only() {
    use axum::extract::State;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    #[derive(Default)]
    struct Upstream {
        linked: AtomicBool,
        /// (method, If-Match) of every write received.
        writes: Mutex<Vec<(String, Option<String>)>>,
    }
    const FHIR: &str = "application/fhir+json";
    async fn read(State(up): State<Arc<Upstream>>) -> impl axum::response::IntoResponse {
        let mut me = json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"},
            "name": [{"family": "Example"}]});
        if up.linked.load(Ordering::SeqCst) {
            me["link"] = json!([{"other": {"reference": "Patient/p2"}, "type": "seealso"}]);
        }
        ([("content-type", FHIR)], me.to_string())
    }
    async fn write(
        State(up): State<Arc<Upstream>>,
        method: axum::http::Method,
        headers: axum::http::HeaderMap,
    ) -> impl axum::response::IntoResponse {
        let if_match = headers
            .get("if-match")
            .map(|v| v.to_str().unwrap().to_string());
        up.writes
            .lock()
            .unwrap()
            .push((method.to_string(), if_match));
        (
            [("content-type", FHIR)],
            json!({"resourceType": "Patient", "id": "p1"}).to_string(),
        )
    }
    let up = Arc::new(Upstream::default());
    let app = axum::Router::new()
        .route(
            "/r4/Patient/p1",
            axum::routing::get(read).put(write).patch(write),
        )
        .with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        ..Options::default()
    })
    .await;
    let p1 = gw.mint("patient/Patient.ru", Some("p1"));
    let send = |method: &'static str, ctype: &'static str, body: Value| {
        let r = gw
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/Patient/p1", gw.base),
            )
            .bearer_auth(&p1)
            .header("content-type", ctype)
            .body(body.to_string())
            .send();
        async move { status_and_body(r.await.unwrap()).await }
    };
    let put = json!({"resourceType": "Patient", "id": "p1", "active": true});
    let patch = json!([{"op": "replace", "path": "/active", "value": true}]);
    let jp = "application/json-patch+json";
    let (s, body) = send("PUT", FHIR, put.clone()).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = send("PATCH", jp, patch.clone()).await;
    assert_eq!(s, 200, "{body}");
    let pinned = Some("W/\"3\"".to_string());
    assert_eq!(
        *up.writes.lock().unwrap(),
        [("PUT".into(), pinned.clone()), ("PATCH".into(), pinned)]
    );

    up.linked.store(true, Ordering::SeqCst);
    let mut keeps_link = put.clone();
    keeps_link["link"] = json!([{"other": {"reference": "Patient/p2"}, "type": "seealso"}]);
    for (method, ctype, body) in [
        ("PUT", FHIR, put),
        ("PUT", FHIR, keeps_link),
        ("PATCH", jp, patch),
    ] {
        let (s, answer) = send(method, ctype, body).await;
        assert_eq!(s, 403, "{method}: {answer}");
        assert!(answer.contains("another patient"), "{method}: {answer}");
    }
    assert_eq!(
        up.writes.lock().unwrap().len(),
        2,
        "no write reached the upstream"
    );
}

/// A write's failure answer may name other patients' resources (HAPI's
/// 409 to a DELETE names the first resource that references the deleted
/// one, whoever's it is): under patient/ scopes its details are withheld,
/// its status kept; a 400 (the written body's own fault) keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_under_patient_scopes_tell_nothing_of_others() {
    const FHIR: &str = "application/fhir+json";
    async fn read() -> impl axum::response::IntoResponse {
        let o = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "1"},
            "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}});
        ([("content-type", FHIR)], o.to_string())
    }
    async fn delete() -> impl axum::response::IntoResponse {
        let o = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error",
            "code": "processing", "diagnostics": "Unable to delete Observation/o1 because at \
            least one resource has a reference to this resource. First reference found was \
            resource DiagnosticReport/dr-of-p2 in path DiagnosticReport.result"}]});
        (
            axum::http::StatusCode::CONFLICT,
            [("content-type", FHIR)],
            o.to_string(),
        )
    }
    /// A transaction fails whole, as HAPI's does when a DELETE in it is
    /// refused; a batch answers each entry, the DELETE's with a 409.
    async fn bundle(body: String) -> axum::response::Response {
        use axum::response::IntoResponse;
        let b: Value = serde_json::from_str(&body).unwrap();
        if b["type"] == "transaction" {
            return delete().await.into_response();
        }
        let leak = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error",
            "code": "processing", "diagnostics": "First reference found was resource \
            DiagnosticReport/dr-of-p2 in path DiagnosticReport.result"}]});
        let entries: Vec<Value> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| match e["request"]["method"].as_str() {
                Some("GET") => json!({"resource": {"resourceType": "Observation", "id": "o1",
                    "status": "final", "subject": {"reference": "Patient/p1"}},
                    "response": {"status": "200 OK"}}),
                _ => json!({"response": {"status": "409 Conflict", "outcome": leak}}),
            })
            .collect();
        (
            [("content-type", FHIR)],
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries})
                .to_string(),
        )
            .into_response()
    }
    async fn put(body: String) -> impl axum::response::IntoResponse {
        let (status, why) = if body.len() > 100_000 {
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "HAPI-0550: index of Condition/c-of-p2 failed",
            )
        } else {
            (
                axum::http::StatusCode::BAD_REQUEST,
                "Observation.status: minimum required = 1",
            )
        };
        let o = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error",
            "code": "processing", "diagnostics": why}]});
        (status, [("content-type", FHIR)], o.to_string())
    }
    let app = axum::Router::new()
        .route(
            "/r4/Observation/o1",
            axum::routing::get(read).delete(delete).put(put),
        )
        .route("/r4", axum::routing::post(bundle));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let gw = Gateway::start(Options {
        upstream_url: Some(format!("http://{addr}/r4")),
        ..Options::default()
    })
    .await;
    let p1 = gw.mint("patient/Observation.rud", Some("p1"));
    let r = gw
        .client
        .delete(format!("{}/Observation/o1", gw.base))
        .bearer_auth(&p1)
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 409, "{body}");
    assert!(!body.contains("dr-of-p2"), "{body}");
    assert!(body.contains("withheld"), "{body}");
    let rec = gw.audit_for(&id);
    assert_eq!(rec["upstream_status"], 409, "{rec}");
    let put = |text: String| {
        let o = json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"text": text}, "subject": {"reference": "Patient/p1"}});
        let r = gw
            .client
            .put(format!("{}/Observation/o1", gw.base))
            .bearer_auth(&p1)
            .header("content-type", FHIR)
            .body(o.to_string())
            .send();
        async move { status_and_body(r.await.unwrap()).await }
    };
    let (s, body) = put("x".into()).await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body.contains("minimum required"),
        "a 400 keeps its details: {body}"
    );
    // Through fhirwall's own client (a body larger than Pingora's retry
    // buffer is relayed by it).
    let (s, body) = put("x".repeat(200_000)).await;
    assert_eq!(s, 500, "{body}");
    assert!(
        !body.contains("c-of-p2") && body.contains("withheld"),
        "{body}"
    );
    // The same for Bundles with writes: a transaction that fails whole,
    // and a batch's failed entry (alone, or with a read).
    let delete = json!({"request": {"method": "DELETE", "url": "Observation/o1"}});
    let read = json!({"request": {"method": "GET", "url": "Observation/o1"}});
    for (kind, entries, status) in [
        ("transaction", vec![delete.clone()], 409),
        ("batch", vec![delete.clone()], 200),
        ("batch", vec![read, delete], 200),
    ] {
        let n = entries.len();
        let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": entries});
        let r = gw
            .post_bundle(&p1, bundle.to_string())
            .send()
            .await
            .unwrap();
        let (s, body) = status_and_body(r).await;
        assert_eq!(s, status, "{kind}: {body}");
        assert!(
            !body.contains("dr-of-p2") && body.contains("withheld"),
            "{kind}: {body}"
        );
        if status == 200 {
            let b: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                b["entry"][n - 1]["response"]["status"],
                "409 Conflict",
                "{body}"
            );
            if n == 2 {
                assert_eq!(b["entry"][0]["resource"]["id"], "o1", "{body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_the_compartment() {
    use serde_json::json;
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.cruds", Some("p1"));
    let writes = |method: &str| {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == method)
            .count()
    };
    let send = |method: &'static str, rel: String, ctype: &'static str, body: String| {
        let (gw, p1) = (&gw, p1.clone());
        async move {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let mut r = gw
                .client
                .request(m, format!("{}/{rel}", gw.base))
                .bearer_auth(&p1);
            if !ctype.is_empty() {
                r = r.header("content-type", ctype).body(body);
            }
            status_and_body(r.send().await.unwrap()).await
        }
    };
    let fhir = "application/fhir+json";
    let obs = |id: Option<&str>, patient: &str| {
        let mut o = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "written"}, "subject": {"reference": format!("Patient/{patient}")}});
        if let Some(id) = id {
            o["id"] = json!(id);
        }
        o.to_string()
    };

    // Create: the new resource must be in the compartment.
    let (s, body) = send("POST", "Observation".into(), fhir, obs(None, "p1")).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(writes("POST"), 1);
    // A stored version fhirwall cannot pin the write to (a number, not
    // FHIR's string): refused, not sent unpinned.
    let (s, body) = send(
        "PUT",
        "Observation/numeric-version".into(),
        fhir,
        obs(Some("numeric-version"), "p1"),
    )
    .await;
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("versionId is not a string"), "{body}");
    assert_eq!(writes("PUT"), 0);
    // An Observation of `subject`, p1 only as performer.
    let by_mrn = |subject: Value| {
        let body = json!({"resourceType": "Observation", "status": "final",
            "code": {"text": "x"}, "subject": subject,
            "performer": [{"reference": "Patient/p1"}]});
        (fhir, body.to_string(), "by identifier")
    };
    for (ctype, body, why) in [
        (fhir, obs(None, "p2"), "outside the compartment"),
        (
            fhir,
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"}})
                .to_string(),
            "not a Observation",
        ),
        // Not readable for conditional references: refused before the
        // compartment is looked at, as for any scope.
        (
            "application/fhir+xml",
            "<Observation/>".to_string(),
            "cannot read 'application/fhir+xml'",
        ),
        (fhir, "{not json".to_string(), "not JSON fhirwall can read"),
        // In p1's compartment, but also in p2's: writing into another record.
        (
            fhir,
            json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                   "performer": [{"reference": "Patient/p2"}]})
            .to_string(),
            "reference another patient",
        ),
        // A subject named by identifier alone (another patient's MRN),
        // p1 only as performer: readers resolving it would file it as the
        // other patient's.
        by_mrn(json!({"type": "Patient", "identifier": {"system": "urn:mrn", "value": "P2"}})),
        // The same with an empty reference beside the identifier (HAPI
        // reads `null` or "" as no reference at all).
        by_mrn(json!({"reference": null, "type": "Patient",
                      "identifier": {"system": "urn:mrn", "value": "P2"}})),
        by_mrn(json!({"reference": " ", "type": "Patient",
                      "identifier": {"system": "urn:mrn", "value": "P2"}})),
        // References the upstream would look up: another patient's
        // resource and a missing one are refused alike (the upstream's 201
        // or 400 would tell which exists), as is another Patient anywhere.
        (
            fhir,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": "Patient/p1"},
                   "hasMember": [{"reference": "Observation/obs-p2-0"}]})
            .to_string(),
            "Observation/obs-p2-0, which is not known in the compartment",
        ),
        (
            fhir,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": "Patient/p1"},
                   "hasMember": [{"reference": "Observation/no-such"}]})
            .to_string(),
            "Observation/no-such, which is not known in the compartment",
        ),
        (
            fhir,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": "Patient/p1"},
                   "focus": [{"reference": "Patient/p2"}]})
            .to_string(),
            "references another patient (Patient/p2)",
        ),
        // The subject a contained Patient (another's MRN), p1 only as
        // performer.
        (
            fhir,
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "contained": [{"resourceType": "Patient", "id": "x",
                       "identifier": [{"system": "urn:mrn", "value": "P2"}]}],
                   "subject": {"reference": "#x"},
                   "performer": [{"reference": "Patient/p1"}]})
            .to_string(),
            "reference another patient",
        ),
    ] {
        let (s, answer) = send("POST", "Observation".into(), ctype, body).await;
        let want = match why {
            "cannot read 'application/fhir+xml'" => 415,
            "not JSON fhirwall can read" => 400,
            _ => 403,
        };
        assert_eq!(s, want, "{answer}");
        assert!(answer.contains(why), "{why}: {answer}");
    }
    let (s, _) = send(
        "POST",
        "Patient".into(),
        fhir,
        json!({"resourceType": "Patient"}).to_string(),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(writes("POST"), 1, "refused creates reached the upstream");
    // A reference to the patient's own resource is proved and passes.
    let own = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": "Patient/p1"},
        "hasMember": [{"reference": "Observation/obs-p1-1"}]});
    let (s, body) = send("POST", "Observation".into(), fhir, own.to_string()).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(writes("POST"), 2);

    // Update: the stored resource and the new one must both be inside.
    let (s, body) = send(
        "PUT",
        "Observation/obs-p1-0".into(),
        fhir,
        obs(Some("obs-p1-0"), "p1"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(writes("PUT"), 1);
    // Moving it out, to another patient.
    let (s, body) = send(
        "PUT",
        "Observation/obs-p1-0".into(),
        fhir,
        obs(Some("obs-p1-0"), "p2"),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    // Taking over another patient's resource: as if it did not exist.
    let (s, body) = send(
        "PUT",
        "Observation/obs-p2-0".into(),
        fhir,
        obs(Some("obs-p2-0"), "p1"),
    )
    .await;
    assert_eq!(s, 404, "{body}");
    assert_nothing_of_p2("PUT obs-p2-0", &body);
    // Id in the body differs from the URL.
    let (s, _) = send(
        "PUT",
        "Observation/obs-p1-0".into(),
        fhir,
        obs(Some("obs-p2-0"), "p1"),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(writes("PUT"), 1, "refused updates reached the upstream");
    // Under patient/ scopes an update never creates: a missing id answers
    // like another patient's (no existence oracle); creates use POST.
    let puts = writes("PUT");
    let (s, body) = send(
        "PUT",
        "Observation/brand-new".into(),
        fhir,
        obs(Some("brand-new"), "p1"),
    )
    .await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(writes("PUT"), puts);
    // A resource shared with another patient (p1 performer, p2 subject)
    // is left out (as absent: 404), so neither changed nor deleted; where
    // shared resources pass (`resources_shared_with_another_patient_…`),
    // it may be read but not written either (403).
    let mut shared = obs(Some("obs-shared"), "p1");
    shared = shared.replace("\"status\":\"final\"", "\"status\":\"amended\"");
    let (s, body) = send("PUT", "Observation/obs-shared".into(), fhir, shared).await;
    assert_eq!(s, 404, "{body}");
    let (s, _) = send("DELETE", "Observation/obs-shared".into(), "", String::new()).await;
    assert_eq!(s, 404);
    assert_eq!(writes("PUT"), puts);
    // A conditional reference would be resolved by the server: refused.
    let sneaky = json!({"resourceType": "Observation", "status": "final",
        "subject": {"reference": "Patient?identifier=urn:mrn|P2"},
        "performer": [{"reference": "Patient/p1"}]})
    .to_string();
    let (s, body) = send("POST", "Observation".into(), fhir, sneaky).await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("conditional reference"), "{body}");
    // The version that was checked goes along as If-Match: for a body
    // Pingora forwards, and for one larger than its buffer, which fhirwall
    // sends upstream itself. A client's own If-Match must name that
    // version (else 412, as the server would answer, nothing written).
    let mut large: serde_json::Value = serde_json::from_str(&obs(Some("obs-moved"), "p1")).unwrap();
    large["note"] = json!([{"text": "x".repeat(100_000)}]);
    let put_moved = |body: String, if_match: Option<&str>| {
        let mut r = gw
            .client
            .put(format!("{}/Observation/obs-moved", gw.base))
            .bearer_auth(&p1)
            .header("content-type", fhir)
            .body(body);
        if let Some(v) = if_match {
            r = r.header("if-match", v);
        }
        r.send()
    };
    for body in [obs(Some("obs-moved"), "p1"), large.to_string()] {
        let puts = writes("PUT");
        for stale in ["W/\"1\"", "\"1\"", "W/\"1\", W/\"3\""] {
            let r = put_moved(body.clone(), Some(stale)).await.unwrap();
            let (s, answer) = status_and_body(r).await;
            assert_eq!(s, 412, "{stale}: {answer}");
            assert!(answer.contains("version 2"), "{answer}");
        }
        assert_eq!(writes("PUT"), puts, "a stale If-Match reached the upstream");
        for if_match in [
            None,
            Some("W/\"2\""),
            Some("\"2\""),
            Some("*"),
            Some("W/\"1\", W/\"2\""),
        ] {
            let len = body.len();
            let r = put_moved(body.clone(), if_match).await.unwrap();
            let (s, answer) = status_and_body(r).await;
            assert_eq!(s, 200, "{if_match:?}: {answer}");
            let put = gw
                .upstream
                .seen()
                .into_iter()
                .rev()
                .find(|s| s.method == "PUT")
                .unwrap();
            assert!(put.uri.ends_with("/Observation/obs-moved"), "{}", put.uri);
            assert_eq!(put.body_len, len);
            let if_match: Vec<_> = put
                .headers
                .iter()
                .filter(|(k, _)| k == "if-match")
                .collect();
            assert_eq!(if_match.len(), 1, "{:?}", put.headers);
            assert_eq!(if_match[0].1, "W/\"2\"");
        }
    }
    // The patient's own record; not another's.
    let me =
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Example"}]}).to_string();
    let (s, body) = send("PUT", "Patient/p1".into(), fhir, me).await;
    assert_eq!(s, 200, "{body}");
    let other = json!({"resourceType": "Patient", "id": "p2"}).to_string();
    let puts = writes("PUT");
    let (s, _) = send("PUT", "Patient/p2".into(), fhir, other).await;
    assert_eq!(s, 403);
    assert_eq!(writes("PUT"), puts);

    // Patch: JSON Patch only, never on the elements that link to a patient.
    let jp = "application/json-patch+json";
    let patch = |ops: serde_json::Value| ops.to_string();
    let (s, body) = send(
        "PATCH",
        "Observation/obs-p1-0".into(),
        jp,
        patch(json!([{"op": "replace", "path": "/status", "value": "amended"}])),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    for ops in [
        json!([{"op": "replace", "path": "/subject", "value": {"reference": "Patient/p2"}}]),
        json!([{"op": "add", "path": "/performer/-", "value": {"reference": "Patient/p2"}}]),
        json!([{"op": "move", "from": "/subject", "path": "/focus"}]),
        json!([{"op": "replace", "path": "", "value": {}}]),
        json!([{"op": "replace", "path": "/id", "value": "x"}]),
        // A contained resource a compartment link may point at (`#pr`):
        // made another patient's by identifier.
        json!([{"op": "add", "path": "/contained", "value": [{"resourceType": "Patient", "id": "pr",
                "identifier": [{"system": "urn:mrn", "value": "P2"}]}]}]),
        json!([{"op": "replace", "path": "/contained/0/identifier/0/value", "value": "P2"}]),
        // A conditional reference on an element that is not a compartment
        // link: the server's search would reach every patient's record.
        json!([{"op": "add", "path": "/focus",
                "value": [{"reference": "Patient?identifier=urn:mrn|P2&_has:Condition:subject:code=B20"}]}]),
        json!([{"op": "add", "path": "/focus/0/reference", "value": "patient?identifier=urn:mrn|P2"}]),
        // A reference the upstream would look up, set as a plain string:
        // another patient's, and a missing one.
        json!([{"op": "add", "path": "/derivedFrom", "value": [{}]},
               {"op": "add", "path": "/derivedFrom/0/reference", "value": "Observation/obs-p2-0"}]),
        json!([{"op": "add", "path": "/derivedFrom", "value": [{}]},
               {"op": "add", "path": "/derivedFrom/0/reference", "value": "Observation/no-such"}]),
    ] {
        let (s, body) = send(
            "PATCH",
            "Observation/obs-p1-0".into(),
            jp,
            patch(ops.clone()),
        )
        .await;
        assert_eq!(s, 403, "{ops}: {body}");
    }
    let (s, _) = send(
        "PATCH",
        "Observation/obs-p1-0".into(),
        fhir,
        json!({"resourceType": "Parameters"}).to_string(),
    )
    .await;
    assert_eq!(s, 403, "FHIRPath Patch cannot be confined");
    let (s, _) = send(
        "PATCH",
        "Observation/obs-p2-0".into(),
        jp,
        patch(json!([{"op": "replace", "path": "/status", "value": "x"}])),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(writes("PATCH"), 1, "refused patches reached the upstream");

    // Delete: only inside; another patient's looks absent.
    let (s, _) = send("DELETE", "Observation/obs-p1-1".into(), "", String::new()).await;
    assert_eq!(s, 204);
    let (s, _) = send("DELETE", "Observation/obs-p2-1".into(), "", String::new()).await;
    assert_eq!(s, 404);
    let (s, _) = send("DELETE", "Observation/no-such".into(), "", String::new()).await;
    assert_eq!(s, 404);
    assert_eq!(writes("DELETE"), 1, "refused deletes reached the upstream");

    // Cascading deletes could reach other patients' resources: refused,
    // on the write and on a Bundle's own URL.
    let cascade = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/obs-p1-0"}}]});
    let (s, body) = post_fhir(&gw, &p1, "?_cascade=delete", &cascade).await;
    assert_eq!(s, 403, "{body}");
    let before = gw.upstream.seen().len();
    let (s, _) = send(
        "DELETE",
        "Observation/obs-p1-0?_cascade=delete".into(),
        "",
        String::new(),
    )
    .await;
    assert_eq!(s, 403);
    let r = gw
        .client
        .delete(format!("{}/Observation/obs-p1-0", gw.base))
        .bearer_auth(&p1)
        .header("x-cascade", "delete")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.seen().len(), before);

    // Conditional writes cannot be confined: refused before the upstream.
    let (s, _) = send(
        "PUT",
        "Observation?identifier=x".into(),
        fhir,
        obs(None, "p1"),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = send("DELETE", "Observation?code=1".into(), "", String::new()).await;
    assert_eq!(s, 403);
    let r = gw
        .client
        .post(format!("{}/Observation", gw.base))
        .bearer_auth(&p1)
        .header("content-type", fhir)
        .header("if-none-exist", "identifier=x")
        .body(obs(None, "p1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(gw.upstream.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_checked_entry_by_entry() {
    use serde_json::json;
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.cruds", Some("p1"));
    let obs = |patient: &str| {
        json!({"resourceType": "Observation", "status": "final",
               "subject": {"reference": format!("Patient/{patient}")}})
    };
    let post_bundle = |kind: &'static str, entries: Vec<Value>| {
        let (gw, p1) = (&gw, p1.clone());
        let body = json!({"resourceType": "Bundle", "type": kind, "entry": entries});
        async move { post_fhir(gw, &p1, "", &body).await }
    };
    let bundles_seen = || {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "POST" && s.uri.trim_end_matches('/') == "/r4")
            .count()
    };
    let create =
        |r: Value| json!({"resource": r, "request": {"method": "POST", "url": "Observation"}});
    let mut own = obs("p1");
    own["id"] = json!("obs-p1-0");
    let update_own =
        json!({"resource": own, "request": {"method": "PUT", "url": "Observation/obs-p1-0"}});
    let delete =
        |id: &str| json!({"request": {"method": "DELETE", "url": format!("Observation/{id}")}});

    // Every entry inside: forwarded.
    let (s, body) = post_bundle(
        "transaction",
        vec![create(obs("p1")), update_own.clone(), delete("obs-p1-1")],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(bundles_seen(), 1);

    // An update of a versioned resource goes with request.ifMatch on the
    // version that was checked; a client's ifMatch must name it.
    let mut moved = obs("p1");
    moved["id"] = json!("obs-moved");
    let update_moved = |if_match: Option<&str>| {
        let mut e = json!({"resource": moved.clone(),
                           "request": {"method": "PUT", "url": "Observation/obs-moved"}});
        if let Some(v) = if_match {
            e["request"]["ifMatch"] = json!(v);
        }
        e
    };
    // (An ifMatch that is no string is not FHIR's: refused as malformed.)
    for (stale, status) in [(json!("W/\"1\""), 412), (json!(2), 400)] {
        let mut entry = update_moved(None);
        entry["request"]["ifMatch"] = stale.clone();
        let (s, body) = post_bundle("transaction", vec![create(obs("p1")), entry]).await;
        assert_eq!(s, status, "{stale}: {body}");
        assert!(body.contains("entry 1"), "{body}");
    }
    assert_eq!(bundles_seen(), 1, "a stale ifMatch reached the upstream");
    for if_match in [None, Some("W/\"2\"")] {
        let (s, body) = post_bundle(
            "transaction",
            vec![create(obs("p1")), update_moved(if_match)],
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let sent = gw.upstream.seen().last().unwrap().clone();
        let sent: Value = serde_json::from_slice(&sent.body).unwrap();
        assert_eq!(sent["entry"][1]["request"]["ifMatch"], "W/\"2\"", "{sent}");
        assert!(sent["entry"][0]["request"].get("ifMatch").is_none());
        assert_eq!(sent["entry"][1]["resource"], moved);
    }
    assert_eq!(bundles_seen(), 3);
    // A delete too is sent with the version checked (which HAPI does not
    // apply to deletes: README, the limits of patient/ scopes).
    let (s, body) = post_bundle("transaction", vec![delete("obs-moved")]).await;
    assert_eq!(s, 200, "{body}");
    let sent = gw.upstream.seen().last().unwrap().clone();
    let sent: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(sent["entry"][0]["request"]["ifMatch"], "W/\"2\"", "{sent}");
    assert_eq!(bundles_seen(), 4);
    // The Bundle goes on as written but for the ifMatch: a decimal keeps
    // its precision.
    let written = r#"{"resourceType":"Bundle","type":"transaction","entry":[{"resource":
        {"resourceType":"Observation","id":"obs-moved","status":"final",
         "subject":{"reference":"Patient/p1"},"valueQuantity":{"value":5.10,"unit":"mg/dL"}},
        "request":{"method":"PUT","url":"Observation/obs-moved"}}]}"#;
    let r = gw.post_bundle(&p1, written).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let sent = gw.upstream.seen().last().unwrap().clone();
    let sent = String::from_utf8(sent.body.to_vec()).unwrap();
    assert!(sent.contains(r#""value":5.10,"unit":"mg/dL""#), "{sent}");
    assert!(sent.contains(r#""ifMatch":"W/\"2\"""#), "{sent}");
    assert_eq!(bundles_seen(), 5);

    // One entry outside: the whole transaction (and batch) is refused.
    for kind in ["transaction", "batch"] {
        for (entries, why) in [
            (vec![create(obs("p1")), create(obs("p2"))], "entry 1"),
            (vec![update_own.clone(), delete("obs-p2-0")], "entry 1"),
            (vec![delete("obs-p2-1"), create(obs("p1"))], "entry 0"),
            (
                vec![
                    create(obs("p1")),
                    json!({"request": {"method": "GET", "url": "Observation?patient=p2"}}),
                ],
                "entry 1",
            ),
        ] {
            let (s, body) = post_bundle(kind, entries).await;
            assert_eq!(s, 403, "{kind}: {body}");
            assert!(body.contains(why), "{kind}: {body}");
            assert_nothing_of_p2(kind, &body);
        }
    }
    // Deleting another patient's resource reads exactly like deleting a missing one.
    let (_, other) = post_bundle("batch", vec![delete("obs-p2-1")]).await;
    let (_, missing) = post_bundle("batch", vec![delete("obs-none")]).await;
    assert_eq!(
        other.replace("obs-p2-1", "X"),
        missing.replace("obs-none", "X")
    );
    assert_eq!(bundles_seen(), 5, "a refused Bundle reached the upstream");

    // Reads and searches inside a batch: each answer checked, a failing
    // entry replaced by its own 404; the others pass untouched.
    let get = |url: &str| json!({"request": {"method": "GET", "url": url}});
    let (s, body) = post_bundle(
        "batch",
        vec![
            get("Observation/obs-p1-0"),
            get("Observation/obs-p2-0"),
            get("Condition?_count=10"),
            get("Patient/p1"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_nothing_of_p2("batch reads", &body);
    let b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["type"], "batch-response");
    assert_eq!(b["entry"][0]["resource"]["id"], "obs-p1-0");
    assert_eq!(b["entry"][1]["response"]["status"], "404 Not Found");
    assert!(b["entry"][1].get("resource").is_none(), "{body}");
    // The search entry was narrowed to the patient (else the upstream would
    // have answered every patient's Conditions and the entry would be a 502).
    assert_eq!(b["entry"][2]["resource"]["type"], "searchset");
    assert_eq!(entry_ids(&b["entry"][2]["resource"]), ["cond-p1"]);
    assert_eq!(b["entry"][3]["resource"]["id"], "p1");
    // The record has each entry's status as the upstream answered it, and
    // marks the answer fhirwall withheld.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        get("Observation/obs-p1-0"), get("Observation/obs-p2-0")]});
    let r = gw.post_bundle(&p1, batch.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let rec = gw.audit_for(&id);
    assert_eq!(rec["entries"][0]["status"], 200, "{rec}");
    assert!(rec["entries"][0].get("withheld").is_none(), "{rec}");
    assert_eq!(rec["entries"][1]["status"], 200, "{rec}");
    assert_eq!(rec["entries"][1]["withheld"], true, "{rec}");
    // A transaction with a read: the same per-entry check.
    let (s, body) = post_bundle(
        "transaction",
        vec![create(obs("p1")), get("Condition/cond-p2")],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_nothing_of_p2("transaction read", &body);
    let b: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["entry"][1]["response"]["status"], "404 Not Found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filtered_scopes_grant_only_their_filter() {
    use serde_json::json;
    const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let gw = Gateway::start(Options::default()).await;
    let get = |rel: String, token: String| {
        let gw = &gw;
        async move { status_and_body(gw.get(&rel, Some(&token)).await).await }
    };
    let ids = |body: &str| entry_ids(&serde_json::from_str(body).unwrap());

    // user/: any patient, laboratory only.
    let user_lab = gw.mint(&format!("user/Observation.rs?category={LAB}"), None);
    let (s, body) = get("Observation/obs-p2-1".into(), user_lab.clone()).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = get("Observation/obs-p1-0".into(), user_lab.clone()).await;
    assert_eq!(s, 404, "vital signs are outside the filter: {body}");
    assert!(!body.contains("Heart rate"), "{body}");
    let (s, body) = get(format!("Observation?category={LAB}"), user_lab.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body), ["obs-p1-1", "obs-p2-1", "obs-p3-1"]);
    // Without the filter: narrowed to it.
    let (s, body) = get("Observation?_count=50".into(), user_lab.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body), ["obs-p1-1", "obs-p2-1", "obs-p3-1"]);
    let seen = gw.upstream.seen();
    let last = seen
        .iter()
        .rev()
        .find(|s| s.uri.contains("_count=50"))
        .unwrap();
    assert!(last.uri.contains("category="), "{}", last.uri);
    // Another type is not granted at all.
    let (s, _) = get("Condition/cond-p1".into(), user_lab.clone()).await;
    assert_eq!(s, 403);
    assert_eq!(gw.upstream.count_containing("cond-p1"), 0);

    // patient/: the compartment and the filter.
    let p1_lab = gw.mint(
        &format!("patient/Observation.rs?category={LAB}"),
        Some("p1"),
    );
    let (s, body) = get("Observation?code=2339-0".into(), p1_lab.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body), ["obs-p1-1"]);
    let (s, body) = get("Observation".into(), p1_lab.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(ids(&body), ["obs-p1-1"]);
    for (rel, want) in [
        ("Observation/obs-p1-1", 200),
        ("Observation/obs-p1-0", 404), // p1's, but vital signs
        ("Observation/obs-p2-1", 404), // laboratory, but p2's
        ("Observation?patient=p2", 403),
    ] {
        let (s, body) = get(rel.into(), p1_lab.clone()).await;
        assert_eq!(s, want, "{rel}: {body}");
        if want != 200 {
            assert_nothing_of_p2(rel, &body);
        }
    }

    // Writes: the resource must match the filter.
    let writer = gw.mint(&format!("user/Observation.cu?category={LAB}"), None);
    let post = |category: &str| {
        let (gw, writer) = (&gw, writer.clone());
        let body = json!({"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
            "subject": {"reference": "Patient/p3"}});
        async move { post_fhir(gw, &writer, "Observation", &body).await }
    };
    let posts = || {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "POST")
            .count()
    };
    let (s, body) = post("laboratory").await;
    assert_eq!(s, 201, "{body}");
    let (s, body) = post("vital-signs").await;
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("scope filters"), "{body}");
    assert_eq!(posts(), 1);
    // An update that would create: refused (404), since nothing could hold
    // the write to the absence fhirwall saw (a resource outside the filter
    // created there meanwhile would be overwritten).
    let lab_obs = |id: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "subject": {"reference": "Patient/p3"}})
    };
    let puts = || {
        gw.upstream
            .seen()
            .iter()
            .filter(|s| s.method == "PUT")
            .count()
    };
    let r = gw
        .send(
            "PUT",
            "Observation/lab-new",
            &writer,
            "application/fhir+json",
            lab_obs("lab-new").to_string(),
        )
        .await;
    let (s, absent) = status_and_body(r).await;
    // Answered as one that exists outside the filter is: which ids exist
    // outside it stays unknown, as it does to reads.
    let r = gw
        .send(
            "PUT",
            "Observation/obs-p1-0",
            &writer,
            "application/fhir+json",
            lab_obs("obs-p1-0").to_string(),
        )
        .await;
    let (s_outside, outside) = status_and_body(r).await;
    assert_eq!((s, s_outside), (404, 404), "{absent} / {outside}");
    assert_eq!(
        absent.replace("lab-new", "X"),
        outside.replace("obs-p1-0", "X"),
        "told apart"
    );
    assert_eq!(puts(), 0);
    // An update of one that exists and stays in the filter goes, pinned.
    let r = gw
        .send(
            "PUT",
            "Observation/obs-p2-1",
            &writer,
            "application/fhir+json",
            lab_obs("obs-p2-1").to_string(),
        )
        .await;
    let (s, body) = status_and_body(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(puts(), 1);

    // A filter fhirwall cannot evaluate grants nothing.
    let dated = gw.mint("user/Observation.rs?date=ge2020", None);
    let (s, body) = get("Observation/obs-p1-1".into(), dated).await;
    assert_eq!(s, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_under_patient_scopes() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let system = gw.mint("system/*.rs", None);
    // Bulk export: never under patient/ scopes, system- and Group-level
    // need system/ scopes.
    for (rel, token, want) in [
        ("Patient/$export", &p1, 403),
        ("$export", &p1, 403),
        ("Group/g1/$export", &p1, 403),
        ("Patient/p1/$export", &p1, 403),
        ("$export", &system, 200),
        ("Group/g1/$export", &system, 200),
    ] {
        let r = gw
            .client
            .get(format!("{}/{rel}", gw.base))
            .bearer_auth(token)
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        // The sandbox does not implement $export; what matters is whether
        // fhirwall let it through.
        let reached = gw.upstream.count_containing("$export") > 0;
        if want == 403 {
            assert_eq!(status, 403, "{rel}");
            assert!(!reached, "{rel} reached the upstream");
        } else {
            assert_ne!(status, 403, "{rel}");
        }
    }
    // Other operations are refused under patient/ scopes.
    for rel in [
        "Observation/obs-p1-0/$meta",
        "Patient/p1/$match",
        "$convert",
    ] {
        let (s, _) = status_and_body(gw.get(rel, Some(&p1)).await).await;
        assert_eq!(s, 403, "{rel}");
    }
}

/// Every page of `Patient/{id}/$everything` as the client walks it: the
/// status of each page and every resource id passed on.
async fn walk_everything(gw: &Gateway, first: &str, token: &str) -> (Vec<u16>, Vec<String>) {
    let mut statuses = Vec::new();
    let mut ids = Vec::new();
    let mut next = Some(format!("{}/{first}", gw.base));
    while let Some(url) = next.take() {
        assert!(
            url.starts_with(&gw.base),
            "a page outside the gateway: {url}"
        );
        let r = gw.client.get(&url).bearer_auth(token).send().await.unwrap();
        let (s, body) = status_and_body(r).await;
        statuses.push(s);
        assert!(statuses.len() < 20, "endless paging: {statuses:?}");
        if s != 200 {
            assert_nothing_of_p2(&url, &body);
            break;
        }
        let b: Value = serde_json::from_str(&body).unwrap();
        ids.extend(entry_ids(&b));
        next = b["link"].as_array().and_then(|links| {
            links
                .iter()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str().map(str::to_string))
        });
    }
    (statuses, ids)
}

/// `$everything` pages as a server's stored search (`?_getpages=…`): its
/// later pages are judged as `$everything` (what the patient's resources
/// reference passes) for the caller whose `$everything` made the page id,
/// and as any stored page for anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_pages_of_everything_are_judged_as_everything_for_its_caller() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let first = "Patient/p1/$everything?_count=2";
    let (statuses, ids) = walk_everything(&gw, first, &p1).await;
    assert!(statuses.len() >= 3, "too few pages to test: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?} {ids:?}");
    let (_, whole) = walk_everything(&gw, "Patient/p1/$everything", &p1).await;
    assert_eq!(ids, whole, "the pages hold what one answer holds");
    assert!(ids.contains(&"dr-1".to_string()), "{ids:?}");
    let last = statuses.len() - 1;
    let dr_page = format!(
        "?_getpages=everything:p1&_getpagesoffset={}&_count=2&_bundletype=searchset",
        2 * last
    );

    // Anyone else asking for the same page gets it judged as a stored
    // search: the Practitioner is in no patient's compartment.
    let other_user = gw.issuer.mint(&fhirwall::sandbox::issuer::Mint {
        scope: "patient/*.rs".into(),
        patient: Some("p1".into()),
        sub: "user-2".into(),
        client_id: "test-app".into(),
        lifetime_seconds: 600,
    });
    let p2 = gw.mint("patient/*.rs", Some("p2"));
    for (who, token) in [("another user", &other_user), ("another patient", &p2)] {
        let (s, body) = status_and_body(gw.get(&dr_page, Some(token)).await).await;
        assert_eq!(s, 502, "{who}: {body}");
        assert!(
            !body.contains("dr-1") && !body.contains("\"Practitioner\""),
            "{who}: {body}"
        );
    }
    // ... while the caller itself still walks it.
    let (s, body) = status_and_body(gw.get(&dr_page, Some(&p1)).await).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("dr-1"), "{body}");
    // Asked with a second id, the page would be judged as no operation's
    // (its rules and limits dodged): refused before the upstream.
    let before = gw.upstream.seen().len();
    for twice in [
        format!("{dr_page}&_getpages=everything:p1"),
        format!("{dr_page}&_pageId=junk"),
    ] {
        let (s, body) = status_and_body(gw.get(&twice, Some(&p1)).await).await;
        assert_eq!(s, 403, "{twice}: {body}");
        assert!(
            body.contains("more than one stored search page id"),
            "{body}"
        );
    }
    assert_eq!(gw.upstream.seen().len(), before);
    // A stored search's id is no parameter of the operation.
    let before = gw.upstream.seen().len();
    let (s, body) = status_and_body(
        gw.get("Patient/p1/$everything?_getpages=anything", Some(&p1))
            .await,
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(gw.upstream.seen().len(), before);
    // Later pages of a misbehaving server's answer are judged as the
    // first: another patient's resource refuses the page holding it.
    let p3 = gw.mint("patient/*.rs", Some("p3"));
    let (statuses, ids) = walk_everything(&gw, "Patient/p3/$everything?_count=1", &p3).await;
    assert!(statuses.len() >= 2, "the first page refused: {statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 403, "{statuses:?} {ids:?}");
    assert!(
        statuses[..statuses.len() - 1].iter().all(|s| *s == 200),
        "{statuses:?}"
    );
    assert!(!ids.contains(&"cond-p2".to_string()), "{ids:?}");
}

/// An upstream that builds its links from the `X-Forwarded-Host` and
/// `-Proto` fhirwall sends, keeping its own path (HAPI with
/// `ApacheProxyAddressStrategy`, a servlet container behind a proxy): the
/// links are the gateway's host with the upstream's path, and are moved
/// to the public base like links under the upstream's own URL — pages of
/// `$everything` and of a search, and a create's `Location`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_built_from_the_forwarded_host_are_moved_to_the_public_base() {
    let gw = Gateway::start(Options::default()).await;
    gw.upstream.trust_forwarded_headers();
    let forwarded_base = format!(
        "{}/r4",
        gw.base
            .strip_suffix("/fhir")
            .expect("the public base ends in /fhir")
    );
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let (statuses, ids) = walk_everything(&gw, "Patient/p1/$everything?_count=2", &p1).await;
    assert!(statuses.len() >= 3, "too few pages to test: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?} {ids:?}");
    assert!(ids.contains(&"dr-1".to_string()), "{ids:?}");

    let (s, body) =
        status_and_body(gw.get("Observation?patient=p1&_count=1", Some(&p1)).await).await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains(&forwarded_base), "{body}");
    let b: Value = serde_json::from_str(&body).unwrap();
    let next = b["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .expect("a next page");
    assert!(
        next.starts_with(&format!("{}/Observation?", gw.base)),
        "{next}"
    );

    let r = gw.create_observation().await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.headers()["location"],
        format!("{}/Observation/new-1/_history/1", gw.base).as_str()
    );
}

/// `GET rel` with `token`: status and body.
async fn get_owned(gw: &Gateway, token: &str, rel: String) -> (u16, String) {
    let r = gw.get(&rel, Some(token)).await;
    status_and_body(r).await
}

/// A transaction's ids are rewritten by the upstream (HAPI maps each
/// entry's fullUrl, else a POSTed resource's id, to what the entry ends up
/// as, in every reference of the Bundle): beside a write checked against
/// the patient's compartment, an entry granted by another scope may not
/// take the name of what the checked entry references (`fullUrl:
/// Patient/p1` on a conditional create matching another patient), nor be
/// referenced by it through a placeholder. Refused before the upstream;
/// placeholders between checked entries and fullUrls naming the entry's
/// own resource pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_cannot_swap_what_a_checked_entry_references() {
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("patient/Observation.c user/Patient.crus", Some("p1"));
    let obs = |subject: &str| {
        json!({"resourceType": "Observation", "status": "final", "code": {"text": "HIV positive"},
               "subject": {"reference": subject}, "performer": [{"reference": "Patient/p1"}]})
    };
    let p2_by_mrn = json!({"resourceType": "Patient",
        "identifier": [{"system": "urn:mrn", "value": "P2-MRN"}]});
    let observation_entry = |subject: &str| json!({"resource": obs(subject), "request": {"method": "POST", "url": "Observation"}});
    let refused = [
        (
            "a conditional create named Patient/p1",
            vec![
                json!({"fullUrl": "Patient/p1", "resource": p2_by_mrn,
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|P2-MRN"}}),
                observation_entry("Patient/p1"),
            ],
            "fullUrl (Patient/p1)",
        ),
        (
            "a created Patient with the id p1",
            vec![
                json!({"resource": {"resourceType": "Patient", "id": "p1"},
                   "request": {"method": "POST", "url": "Patient"}}),
                observation_entry("Patient/p1"),
            ],
            "an id of its own",
        ),
        (
            "a conditional update whose resource has the id p1",
            vec![
                json!({"resource": {"resourceType": "Patient", "id": "p1",
                       "identifier": [{"system": "urn:mrn", "value": "P2-MRN"}]},
                   "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|P2-MRN"}}),
                observation_entry("Patient/p1"),
            ],
            "Patient?identifier=urn:mrn|P2-MRN) does not name",
        ),
        (
            "an update of another patient named Patient/p1",
            vec![
                json!({"fullUrl": "http://elsewhere/fhir/Patient/p1",
                   "resource": {"resourceType": "Patient", "id": "p2"},
                   "request": {"method": "PUT", "url": "Patient/p2"}}),
                observation_entry("Patient/p1"),
            ],
            "fullUrl (http://elsewhere/fhir/Patient/p1)",
        ),
        (
            "a placeholder of an entry no patient scope confines",
            vec![
                json!({"fullUrl": "urn:uuid:0b6a1a7e-0000-4000-8000-000000000001", "resource": p2_by_mrn,
                   "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|P2-MRN"}}),
                observation_entry("urn:uuid:0b6a1a7e-0000-4000-8000-000000000001"),
            ],
            "references entry 0",
        ),
    ];
    let before = gw.upstream.seen().len();
    for (what, entries, why) in refused {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let (s, body) = post_fhir(&gw, &token, "", &bundle).await;
        assert_eq!(s, 403, "{what}: {body}");
        assert!(body.contains(why), "{what}: {body}");
    }
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a refused transaction reached the upstream"
    );

    // Checked entries referring to each other by placeholder, and a
    // fullUrl naming the entry's own resource: served.
    let first = "urn:uuid:0b6a1a7e-0000-4000-8000-000000000002";
    let mut grouped = obs("Patient/p1");
    grouped["hasMember"] = json!([{"reference": first}]);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": first, "resource": obs("Patient/p1"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": grouped, "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": format!("{}/Patient/p1", gw.base), "resource": {"resourceType": "Patient", "id": "p1"},
         "request": {"method": "PUT", "url": "Patient/p1"}},
    ]});
    let (s, body) = post_fhir(&gw, &token, "", &bundle).await;
    assert_eq!(s, 200, "{body}");
    // A batch's entries are processed each alone: no id crosses them.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "copied"}, "request": {"method": "POST", "url": "Patient"}},
        observation_entry("Patient/p1"),
    ]});
    let (s, body) = post_fhir(&gw, &token, "", &batch).await;
    assert_eq!(s, 200, "{body}");
}

/// A search whose answer is checked goes upstream with
/// `Prefer: handling=strict` (the client's other preferences kept): a
/// lenient server would drop a narrowing it does not support and count
/// every patient's matches. One fhirwall does not check passes as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_searches_are_handled_strictly() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let user = gw.mint("user/*.rs", None);
    let prefer_seen = |needle: &str| -> Vec<String> {
        let seen = gw.upstream.seen();
        let s = seen
            .iter()
            .rev()
            .find(|s| s.uri.contains(needle) || s.method == needle)
            .unwrap();
        s.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("prefer"))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let send = |rel: String, token: &str| {
        gw.client
            .get(format!("{}/{rel}", gw.base))
            .bearer_auth(token)
            .header("prefer", "handling=lenient, return=representation")
            .send()
    };
    let r = send("Observation?code=strict-1".into(), &p1).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        prefer_seen("strict-1"),
        ["handling=strict, return=representation"]
    );
    // Named by the client, the patient is still checked for.
    let r = send("Observation?patient=p1&code=strict-2".into(), &p1)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        prefer_seen("strict-2"),
        ["handling=strict, return=representation"]
    );
    // Without a Prefer of its own, the search is told strict all the same.
    assert_eq!(
        gw.get("Observation?code=strict-3", Some(&p1))
            .await
            .status(),
        200
    );
    assert_eq!(prefer_seen("strict-3"), ["handling=strict"]);
    // A checked search in a batch.
    let r = gw.batch_get(&p1, "Observation?code=strict-4").await;
    assert_eq!(r.status(), 200);
    assert_eq!(prefer_seen("POST"), ["handling=strict"]);
    // Not checked: as the client sent it.
    let r = send("Observation?code=strict-5".into(), &user)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        prefer_seen("strict-5"),
        ["handling=lenient, return=representation"]
    );
}

/// A resource in the patient's compartment that also names another
/// Patient there (`obs-shared`: p2's Observation, p1 its performer) is
/// left out by default — a read is 404, a search and `$everything` pass
/// without it — and passed with `shared_resources: pass`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_shared_with_another_patient_are_left_out() {
    let ids = |body: &str| entry_ids(&serde_json::from_str(body).unwrap());
    for (pass, extra) in [
        (false, String::new()),
        (
            true,
            "patient_context:\n  shared_resources: pass\n".to_string(),
        ),
    ] {
        let gw = Gateway::start(Options {
            extra_yaml: extra,
            ..Options::default()
        })
        .await;
        let p1 = gw.mint("patient/*.rs", Some("p1"));
        let r = gw.get("Observation/obs-shared", Some(&p1)).await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let (s, body) = status_and_body(r).await;
        if pass {
            assert_eq!(s, 200, "{body}");
        } else {
            assert_eq!(s, 404, "{body}");
            assert_nothing_of_p2("read", &body);
            assert_eq!(gw.audit_for(&id)["reason"], "shared_with_other_patient");
            // Counted under its own reason, not `other` (bounded wait: the
            // logging phase counts it just after the answer).
            let line = "fhirwall_request_outcomes_total{reason=\"shared_with_other_patient\"} 1";
            let mut m = String::new();
            for _ in 0..50 {
                m = gw.metrics().await;
                if m.contains(line) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert!(m.contains(line), "{m}");
        }
        let (s, body) =
            status_and_body(gw.get("Observation?performer=Patient/p1", Some(&p1)).await).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(
            ids(&body).contains(&"obs-shared".to_string()),
            pass,
            "{body}"
        );
        // The total, which counts it, goes with it — on every answer
        // that could hold one (another page of it would count it too),
        // inside a batch as well.
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v.get("total").is_some(), pass, "{body}");
        // Nothing left: no entry at all, as an answer without matches.
        assert_eq!(v.get("entry").is_some(), pass, "{body}");
        let (s, body) = status_and_body(gw.get("Observation?patient=p1", Some(&p1)).await).await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v.get("total").is_some(), pass, "{body}");
        let (s, body) = status_and_body(gw.batch_get(&p1, "Observation?patient=p1").await).await;
        assert_eq!(s, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let inner = &v["entry"][0]["resource"];
        assert_eq!(inner["type"], "searchset", "{body}");
        assert_eq!(inner.get("total").is_some(), pass, "{body}");
        if !pass {
            assert_nothing_of_p2("search", &body);
        }
        let (s, body) = status_and_body(gw.get("Patient/p1/$everything", Some(&p1)).await).await;
        assert_eq!(s, 200, "{body}");
        let got = ids(&body);
        assert!(got.contains(&"obs-p1-0".to_string()), "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v.get("total").is_some(), pass, "{body}");
        assert_eq!(got.contains(&"obs-shared".to_string()), pass, "{body}");
        // Paged: every page, as the whole (with 6 a page, the first
        // is the one left short, its next one holding the Practitioner).
        for count in [6, 2] {
            let first = format!("Patient/p1/$everything?_count={count}");
            let (statuses, paged) = walk_everything(&gw, &first, &p1).await;
            assert!(
                statuses.len() > 1 && statuses.iter().all(|s| *s == 200),
                "{count}: {statuses:?}"
            );
            assert_eq!(paged, got, "{count}");
        }
        // Whoever's it is, p2 reads its own Observation only when shared
        // ones pass.
        let p2 = gw.mint("patient/*.rs", Some("p2"));
        let s = gw.get("Observation/obs-shared", Some(&p2)).await.status();
        assert_eq!(s, if pass { 200 } else { 404 });
        // Written by neither: as absent (404), or, passed, as another
        // patient's too (403).
        let writer = gw.mint("patient/*.cruds", Some("p1"));
        let body = json!({"resourceType": "Observation", "id": "obs-shared",
            "status": "amended", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"}});
        let r = gw
            .client
            .put(format!("{}/Observation/obs-shared", gw.base))
            .bearer_auth(&writer)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let (s, text) = status_and_body(r).await;
        if pass {
            assert_eq!(s, 403, "{text}");
            assert!(text.contains("shared with another patient"), "{text}");
        } else {
            assert_eq!(s, 404, "{text}");
        }
        let r = gw
            .client
            .delete(format!("{}/Observation/obs-shared", gw.base))
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), if pass { 403 } else { 404 });
        assert!(
            !gw.upstream
                .seen()
                .iter()
                .any(|s| s.method == "PUT" || s.method == "DELETE"),
            "a write reached the upstream"
        );
    }
}
