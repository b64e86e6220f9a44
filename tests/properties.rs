//! Property tests over the pure pipeline stages: no input makes them panic
//! (Pingora swallows request panics, which would leave no audit record),
//! and decisions behave like grants should.

use fhirwall::decide::{decide, ResponseCheck};
use fhirwall::extract::extract;
use fhirwall::fhir::classify::{classify, classify_bundle, HttpRequest, Interaction};
use fhirwall::route::{normalise, route};
use fhirwall::scope::ScopeSet;
use fhirwall::token::inspect;
use proptest::prelude::*;

fn method() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
    ])
}

/// Paths built from FHIR-looking pieces, so the classifier's branches are reached.
fn fhir_path() -> impl Strategy<Value = String> {
    let seg = prop::sample::select(vec![
        "Patient",
        "Observation",
        "Condition",
        "Group",
        "Encounter",
        "Foo",
        "patient",
        "p1",
        "p2",
        "o-1",
        "a_b",
        "_history",
        "_search",
        "$everything",
        "$export",
        "$lastn",
        "metadata",
        "*",
        "1",
        "..",
        "",
        "Resource",
    ]);
    prop::collection::vec(seg, 0..6).prop_map(|v| v.join("/"))
}

fn query() -> impl Strategy<Value = Option<String>> {
    let param = prop::sample::select(vec![
        "patient=p1",
        "patient=p2",
        "subject=Patient/p2",
        "subject=Patient/p1,Patient/p2",
        "performer=Patient/p2",
        "_id=p1",
        "_id=p2",
        "code=x",
        "_include=Observation:subject",
        "_include=*",
        "_revinclude=Observation:subject",
        "_has:Observation:patient:code=1",
        "subject:Patient.name=a",
        "subject.name=b",
        "_type=Observation,Condition",
        "_type=Foo",
        "_filter=x",
        "_count=5",
        "=",
        "%ff",
        "a=%zz",
    ]);
    prop::option::of(prop::collection::vec(param, 0..4).prop_map(|v| v.join("&")))
}

fn scopes() -> impl Strategy<Value = String> {
    let scope = prop::sample::select(vec![
        "patient/*.rs",
        "patient/Observation.rs",
        "patient/Patient.r",
        "patient/*.cruds",
        "user/*.rs",
        "user/Observation.read",
        "user/Condition.cud",
        "user/Patient.s",
        "system/*.rs",
        "system/Group.read",
        "openid",
        "launch/patient",
        "user/Observation.rs?category=laboratory",
        "user/Observation.sr",
        "patient/*.write",
    ]);
    prop::collection::vec(scope, 0..5).prop_map(|v| v.join(" "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn route_never_panics(raw in "\\PC{0,80}") {
        if let Ok(p) = normalise(&raw) {
            let _ = route(&p, "/fhir", &["metadata".to_string()]);
        }
    }

    #[test]
    fn classify_never_panics_on_arbitrary_text(m in method(), path in "\\PC{0,60}", q in prop::option::of("\\PC{0,60}")) {
        let _ = classify(HttpRequest { method: m, path: &path, query: q.as_deref(), if_none_exist: None });
    }

    #[test]
    fn bundle_classification_never_panics(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let base = classify(HttpRequest { method: "POST", path: "", query: None, if_none_exist: None }).unwrap();
        let _ = classify_bundle(base, &body);
    }

    #[test]
    fn token_inspection_never_panics(t in "[A-Za-z0-9_.~+/=-]{0,300}") {
        let _ = inspect(&t, 16 * 1024);
    }

    #[test]
    fn extraction_never_panics(h in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..3)) {
        let refs: Vec<&[u8]> = h.iter().map(|v| v.as_slice()).collect();
        let _ = extract(&refs);
    }

    /// Adding scopes never turns an allowed request into a denied one, and
    /// a token without clinical scopes reaches nothing but capabilities.
    #[test]
    fn decisions_are_monotone_in_scopes(m in method(), path in fhir_path(), q in query(), a in scopes(), b in scopes(),
                                         patient in prop::option::of(prop::sample::select(vec!["p1", "p2"]))) {
        let Ok(req) = classify(HttpRequest { method: m, path: &path, query: q.as_deref(), if_none_exist: None }) else {
            return Ok(());
        };
        let small = ScopeSet::parse(&a);
        let large = ScopeSet::parse(&format!("{a} {b}"));
        if decide(&req, &small, patient).is_ok() {
            prop_assert!(decide(&req, &large, patient).is_ok(), "{m} {path} {q:?}: allowed by '{a}' but not by '{a} {b}'");
        }
        let none = ScopeSet::parse("openid fhirUser launch/patient offline_access");
        if req.interaction != Interaction::Capabilities && !req.is_bundle() {
            prop_assert!(decide(&req, &none, patient).is_err(), "{m} {path} {q:?} allowed without clinical scopes");
        }
    }

    /// Under patient scopes only, nothing naming another patient passes.
    #[test]
    fn patient_scopes_never_reach_another_patient(m in method(), path in fhir_path(), q in query()) {
        let Ok(req) = classify(HttpRequest { method: m, path: &path, query: q.as_deref(), if_none_exist: None }) else {
            return Ok(());
        };
        let grant = ScopeSet::parse("patient/*.cruds");
        // Bundles are decided entry by entry from their body (tested in decide.rs and tests/gateway.rs).
        // Capabilities is public and carries no patient data.
        let judged = !req.is_bundle() && req.interaction != Interaction::Capabilities;
        if !judged {
            return Ok(());
        }
        match decide(&req, &grant, Some("p1")) {
            // Writes are proved against the body and the stored resource;
            // the Patient itself only as p1.
            Ok(d) if d.write.is_some() => {
                prop_assert!(matches!(req.interaction, Interaction::Create | Interaction::Update | Interaction::Patch | Interaction::Delete), "{m} {path} {q:?}");
                prop_assert!(!req.conditional, "{m} {path} {q:?}");
                if req.resource_type.as_deref() == Some("Patient") {
                    prop_assert_eq!(req.id.as_deref(), Some("p1"), "{} {} {:?}", m, path, q);
                }
            }
            // Decided from the request alone: it must not name p2.
            Ok(d) if d.check.is_none() => {
                // (A version id `p2` names no patient.)
                let names_other = req.id.as_deref() == Some("p2")
                    || req.compartment.as_ref().is_some_and(|c| c.id == "p2")
                    || q.as_deref().is_some_and(|q| q.contains("p2"));
                prop_assert!(!names_other, "{m} {path} {q:?} reached p2 under patient/ scopes of p1");
            }
            // Left to the answer check: plain reads of compartment types (not Patient) ...
            Ok(d) if d.check == Some(ResponseCheck::in_compartment("p1")) => {
                prop_assert!(matches!(req.interaction, Interaction::Read | Interaction::Vread | Interaction::HistoryInstance), "{m} {path} {q:?}");
                prop_assert!(req.resource_type.as_deref() != Some("Patient"), "{m} {path} {q:?}");
            }
            // ... p1's $everything, whose answer is judged ...
            Ok(d) if matches!(&d.check, Some(ResponseCheck::Everything { patient }) if patient == "p1") => {
                prop_assert_eq!(req.id.as_deref(), Some("p1"), "{} {} {:?}", m, path, q);
            }
            // ... and searches, which must never name p2 in a patient parameter.
            Ok(d) => {
                prop_assert!(matches!(&d.check, Some(ResponseCheck::Search { patient: Some(patient), .. }) if patient == "p1"), "{:?}", d.check);
                prop_assert!(matches!(req.interaction, Interaction::SearchType | Interaction::SearchCompartment | Interaction::SearchSystem), "{m} {path} {q:?}");
                let params = q.as_deref().unwrap_or("");
                let on_patient = req.resource_type.as_deref() == Some("Patient");
                let names_p2 = params.split('&').any(|p| {
                    p.starts_with("patient=") && p.contains("p2")
                        || p.starts_with("subject=") && p.contains("p2")
                        || p.starts_with("performer=") && p.contains("p2")
                        || on_patient && p == "_id=p2"
                }) || path.split('/').any(|s| s == "p2");
                prop_assert!(!names_p2, "{m} {path} {q:?} searched p2 under patient/ scopes of p1");
                for (n, v) in &d.narrow {
                    prop_assert!(v == "p1" || v == "Patient/p1", "narrowed by {n}={v}");
                }
            }
            Err(_) => {}
        }
    }
}

/// JSON values whose strings hold what could confuse a framer (quotes,
/// backslashes, brackets, the word `entry`, non-ASCII).
fn tricky_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let text = prop::collection::vec(
        prop::sample::select(vec![
            "\"",
            "\\",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "entry",
            "a",
            " ",
            "\n",
            "é",
            "\u{1F600}",
        ]),
        0..8,
    )
    .prop_map(|v| v.concat());
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        text.clone().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec!["entry", "resource", "id", "x", "drop", "\"q\""]),
                    inner
                ),
                0..4
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The entry sieve keeps exactly the entries its judge accepts, in
    /// order, and the Bundle around them, however the answer is cut into
    /// chunks and laid out; what it keeps parses to what was sent less
    /// the entries turned down.
    #[test]
    fn entry_sieve_keeps_what_its_judge_accepts(
        entries in prop::collection::vec((tricky_json(), any::<bool>()), 0..6),
        around in prop::collection::vec(
            (prop::sample::select(vec!["resourceType", "link", "total", "meta"]), tricky_json()),
            0..3,
        ),
        pretty in any::<bool>(),
        chunk in 1usize..40,
    ) {
        use fhirwall::fhir::entry_sieve::{EntrySieve, Sift};
        use serde_json::{json, Value};
        let mut bundle = serde_json::Map::new();
        for (k, v) in &around {
            bundle.insert(k.to_string(), v.clone());
        }
        // Each entry is an object; `keep` is carried in a member the judge reads.
        let entry_values: Vec<Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (v, keep))| json!({"n": i, "keep": keep, "resource": v}))
            .collect();
        bundle.insert("entry".into(), Value::Array(entry_values.clone()));
        let doc = Value::Object(bundle);
        let text = if pretty {
            serde_json::to_vec_pretty(&doc).unwrap()
        } else {
            serde_json::to_vec(&doc).unwrap()
        };
        let mut sieve = EntrySieve::new(1 << 20, |_, e: Option<&[u8]>| {
            let e: Value = serde_json::from_slice(e.expect("held")).expect("a framed entry parses");
            if e["keep"] == Value::Bool(true) { Sift::Keep } else { Sift::Drop }
        });
        for c in text.chunks(chunk) {
            sieve.push(c).unwrap();
        }
        let out = sieve.finish().unwrap();
        let got: Value = serde_json::from_slice(&out.body).expect("what is kept parses");
        let mut want = doc.clone();
        want["entry"] = Value::Array(
            entry_values.into_iter().filter(|e| e["keep"] == Value::Bool(true)).collect(),
        );
        prop_assert_eq!(got, want);
        prop_assert_eq!(out.kept + out.left_out, entries.len());
    }
}
