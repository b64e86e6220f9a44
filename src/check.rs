//! Stage 8, check the response (pure): where the request alone cannot prove
//! that the answer stays inside the grant, the upstream's answer is judged
//! here before any byte of it is passed on.
//!
//! Read, vread and instance history under `patient/` scopes: the resource
//! (every version, for a history) must be in the context patient's
//! compartment. Otherwise the client gets the same 404 as for a resource
//! that does not exist, so it cannot learn that another patient's resource
//! is there. An answer that cannot be judged (not JSON, not the resource
//! asked for) is refused as an upstream error — never passed on unchecked.

use serde_json::Value;

use crate::decide::ResponseCheck;
use crate::fhir::classify::{FhirRequest, Interaction};
use crate::fhir::compartment::{in_compartment, Bases};

/// What to do with the upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the answer on unchanged.
    Pass,
    /// Answer 404 as if the resource did not exist; `why` is for the audit.
    Hide { why: &'static str },
    /// Answer 502: the upstream's answer could not be judged.
    Unverifiable { why: String },
}

/// Judges an upstream answer (`status`, `content_type`, `body`) to `req`.
pub fn judge(
    check: &ResponseCheck,
    req: &FhirRequest,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    bases: &Bases,
) -> Verdict {
    let ResponseCheck::InCompartment { patient } = check;
    match status {
        200 => {}
        500..=599 => {
            return Verdict::Unverifiable {
                why: format!("upstream answered {status}"),
            }
        }
        // Not found, gone, not modified, redirects, refusals: nothing of the
        // resource is passed on, and all look alike to the client.
        _ => {
            return Verdict::Hide {
                why: "upstream_not_found",
            }
        }
    }
    let json_type = content_type.is_some_and(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t.eq_ignore_ascii_case("application/fhir+json")
            || t.eq_ignore_ascii_case("application/json")
    });
    if !json_type {
        return Verdict::Unverifiable {
            why: format!(
                "upstream answer is {}, not FHIR JSON",
                content_type.unwrap_or("untyped")
            ),
        };
    }
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return Verdict::Unverifiable {
            why: "upstream answer is not valid JSON".into(),
        };
    };
    let rtype = req.resource_type.as_deref().unwrap_or("");
    let id = req.id.as_deref().unwrap_or("");
    let is_asked = |r: &Value| {
        r.get("resourceType").and_then(Value::as_str) == Some(rtype)
            && r.get("id").and_then(Value::as_str) == Some(id)
    };
    let inside = |r: &Value| in_compartment(r, patient, bases);
    match req.interaction {
        Interaction::Read | Interaction::Vread => {
            if !is_asked(&doc) {
                Verdict::Unverifiable {
                    why: format!("upstream answer is not {rtype}/{id}"),
                }
            } else if inside(&doc) {
                Verdict::Pass
            } else {
                Verdict::Hide {
                    why: "outside_compartment",
                }
            }
        }
        Interaction::HistoryInstance => {
            if doc.get("resourceType").and_then(Value::as_str) != Some("Bundle")
                || doc.get("type").and_then(Value::as_str) != Some("history")
            {
                return Verdict::Unverifiable {
                    why: "upstream answer to a history is not a history Bundle".into(),
                };
            }
            let entries = doc.get("entry").and_then(Value::as_array);
            let resources: Vec<&Value> = entries
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("resource"))
                .collect();
            if resources.iter().any(|r| !is_asked(r)) {
                return Verdict::Unverifiable {
                    why: format!("upstream history holds resources other than {rtype}/{id}"),
                };
            }
            // Every version must be inside: a resource moved between patients
            // would otherwise show the other patient's versions. A history
            // with no version to judge proves nothing.
            if !resources.is_empty() && resources.iter().all(|r| inside(r)) {
                Verdict::Pass
            } else {
                Verdict::Hide {
                    why: "outside_compartment",
                }
            }
        }
        _ => Verdict::Unverifiable {
            why: format!("no answer check for {}", req.interaction),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::classify::{classify, HttpRequest};
    use serde_json::json;

    fn req(path: &str) -> FhirRequest {
        classify(HttpRequest {
            method: "GET",
            path,
            query: None,
            if_none_exist: None,
        })
        .unwrap()
    }

    fn judge_json(path: &str, status: u16, body: Value) -> Verdict {
        let check = ResponseCheck::InCompartment {
            patient: "p1".into(),
        };
        judge(
            &check,
            &req(path),
            status,
            Some("application/fhir+json; charset=utf-8"),
            body.to_string().as_bytes(),
            &Bases(vec!["http://gw/fhir".into()]),
        )
    }

    fn obs(id: &str, patient: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "subject": {"reference": format!("Patient/{patient}")}})
    }

    #[test]
    fn reads() {
        assert_eq!(
            judge_json("Observation/o1", 200, obs("o1", "p1")),
            Verdict::Pass
        );
        assert_eq!(
            judge_json("Observation/o1/_history/2", 200, obs("o1", "p1")),
            Verdict::Pass
        );
        let hidden = Verdict::Hide {
            why: "outside_compartment",
        };
        assert_eq!(judge_json("Observation/o2", 200, obs("o2", "p2")), hidden);
        // Not what was asked for: refused, never passed on.
        assert!(matches!(
            judge_json("Observation/o1", 200, obs("o9", "p1")),
            Verdict::Unverifiable { .. }
        ));
        assert!(matches!(
            judge_json(
                "Observation/o1",
                200,
                json!({"resourceType": "Condition", "id": "o1"})
            ),
            Verdict::Unverifiable { .. }
        ));
        for status in [404, 410, 304, 301, 403, 401, 400] {
            assert!(
                matches!(
                    judge_json("Observation/o1", status, json!({})),
                    Verdict::Hide { .. }
                ),
                "{status}"
            );
        }
        assert!(matches!(
            judge_json("Observation/o1", 503, json!({})),
            Verdict::Unverifiable { .. }
        ));
    }

    #[test]
    fn unjudgeable_answers() {
        let check = ResponseCheck::InCompartment {
            patient: "p1".into(),
        };
        let r = req("Observation/o1");
        let bases = Bases::default();
        let body = obs("o1", "p1").to_string();
        for ct in [None, Some("application/fhir+xml"), Some("text/html")] {
            assert!(matches!(
                judge(&check, &r, 200, ct, body.as_bytes(), &bases),
                Verdict::Unverifiable { .. }
            ));
        }
        assert!(matches!(
            judge(
                &check,
                &r,
                200,
                Some("application/json"),
                b"{not json",
                &bases
            ),
            Verdict::Unverifiable { .. }
        ));
    }

    #[test]
    fn histories() {
        let bundle = |versions: Vec<Value>| {
            json!({"resourceType": "Bundle", "type": "history",
                   "entry": versions.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
        };
        let path = "Observation/o1/_history";
        assert_eq!(
            judge_json(path, 200, bundle(vec![obs("o1", "p1"), obs("o1", "p1")])),
            Verdict::Pass
        );
        // Moved from p2 to p1: the old version belongs to p2.
        assert!(matches!(
            judge_json(path, 200, bundle(vec![obs("o1", "p1"), obs("o1", "p2")])),
            Verdict::Hide { .. }
        ));
        assert!(matches!(
            judge_json(path, 200, bundle(vec![])),
            Verdict::Hide { .. }
        ));
        assert!(matches!(
            judge_json(path, 200, bundle(vec![obs("o1", "p1"), obs("o7", "p1")])),
            Verdict::Unverifiable { .. }
        ));
        assert!(matches!(
            judge_json(path, 200, obs("o1", "p1")),
            Verdict::Unverifiable { .. }
        ));
    }
}
