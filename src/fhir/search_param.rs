//! Token search parameters evaluated on a resource (pure), for SMART v2
//! scope filters such as
//! `patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory`.
//!
//! The table ([`TOKEN_PARAMS`]) is generated from the R4 SearchParameter and
//! StructureDefinition resources (`tools/gen_compartment.py`). A filter that
//! names a parameter outside the table, uses a modifier, or an OR list is
//! not understood: the scope carrying it grants nothing (fail closed).

use serde_json::Value;

pub use super::search_params::TOKEN_PARAMS;

/// A token search parameter: element paths (JSON, dotted) and their datatype.
#[derive(Debug)]
pub struct TokenParam {
    pub resource_type: &'static str,
    pub name: &'static str,
    pub paths: &'static [(&'static str, &'static str)],
}

/// The token parameter `name` of `resource_type`, if fhirwall can evaluate it.
pub fn token_param(resource_type: &str, name: &str) -> Option<&'static TokenParam> {
    TOKEN_PARAMS
        .binary_search_by(|p| (p.resource_type, p.name).cmp(&(resource_type, name)))
        .ok()
        .map(|i| &TOKEN_PARAMS[i])
}

/// A scope's query filter, understood: every (parameter, value) must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub resource_type: String,
    /// Decoded `name=value` pairs, in the scope's order.
    pub params: Vec<(String, String)>,
}

impl Filter {
    /// Understands the filter `query` of a scope on `resource_type`, or says
    /// why not.
    pub fn parse(resource_type: &str, query: &str) -> Result<Filter, String> {
        if resource_type == "*" {
            return Err("a query filter on the '*' wildcard cannot be evaluated".into());
        }
        let params = super::classify::parse_params(query)
            .map_err(|e| format!("filter '{query}' is not a valid query: {e}"))?;
        if params.is_empty() {
            return Err("empty query filter".into());
        }
        for (name, value) in &params {
            if name.contains(':') || name.contains('.') {
                return Err(format!(
                    "filter parameter '{name}': modifiers and chains are not supported"
                ));
            }
            if value.is_empty() || value.contains(',') {
                return Err(format!(
                    "filter parameter '{name}': only a single value is supported, not '{value}'"
                ));
            }
            if token_param(resource_type, name).is_none() {
                return Err(format!(
                    "filter parameter '{name}' is not a token search parameter of {resource_type} fhirwall can evaluate"
                ));
            }
        }
        Ok(Filter {
            resource_type: resource_type.to_string(),
            params,
        })
    }

    /// Does `resource` match every parameter of the filter?
    pub fn matches(&self, resource: &Value) -> bool {
        resource.get("resourceType").and_then(Value::as_str) == Some(self.resource_type.as_str())
            && self.params.iter().all(|(name, value)| {
                token_param(&self.resource_type, name).is_some_and(|p| {
                    p.paths
                        .iter()
                        .any(|(path, ty)| token_at(resource, path, ty, value))
                })
            })
    }

    /// Does a search carry every parameter of the filter, with the same
    /// value (so its matches can only be narrower)?
    pub fn carried_by(&self, params: &[(String, String)]) -> bool {
        self.params
            .iter()
            .all(|(n, v)| params.iter().any(|(pn, pv)| pn == n && pv == v))
    }
}

/// Is there an element at `path` (arrays walked) of datatype `ty` matching
/// the token `value` (`code`, `system|code`, `|code` or `system|`)?
fn token_at(node: &Value, path: &str, ty: &str, value: &str) -> bool {
    super::compartment::any_at(node, path, &mut |v| token_matches(v, ty, value))
}

/// `value` split into (system, code): `None` system means "any system".
fn split_token(value: &str) -> (Option<&str>, &str) {
    match value.split_once('|') {
        Some((system, code)) => (Some(system), code),
        None => (None, value),
    }
}

fn coding_matches(coding: &Value, system: Option<&str>, code: &str, code_key: &str) -> bool {
    let s = coding.get("system").and_then(Value::as_str);
    let c = coding.get(code_key).and_then(Value::as_str);
    let system_ok = match system {
        None => true,
        Some("") => s.is_none(),
        Some(want) => s == Some(want),
    };
    let code_ok = code.is_empty() || c == Some(code);
    // `system|` alone must still name a system.
    system_ok && code_ok && (!code.is_empty() || system.is_some_and(|s| !s.is_empty()))
}

fn token_matches(v: &Value, ty: &str, value: &str) -> bool {
    let (system, code) = split_token(value);
    match ty {
        "CodeableConcept" => super::compartment::any_at(v, "coding", &mut |c| {
            coding_matches(c, system, code, "code")
        }),
        "Coding" => coding_matches(v, system, code, "code"),
        "Identifier" => coding_matches(v, system, code, "value"),
        // Plain codes carry no system: a filter that names one cannot be
        // proved to match.
        "code" | "string" | "uri" | "id" => system.is_none() && v.as_str() == Some(code),
        "boolean" => {
            system.is_none() && v.as_bool().map(|b| b.to_string()).as_deref() == Some(code)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

    fn lab() -> Value {
        json!({"resourceType": "Observation", "status": "final",
               "category": [{"coding": [{"system": CAT, "code": "laboratory"}]}],
               "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
               "identifier": [{"system": "urn:lab", "value": "L1"}]})
    }

    #[test]
    fn table() {
        let p = token_param("Observation", "category").unwrap();
        assert_eq!(p.paths, [("category", "CodeableConcept")]);
        assert!(
            token_param("Observation", "subject").is_none(),
            "a reference, not a token"
        );
        assert!(token_param("Observation", "nope").is_none());
        let mut sorted: Vec<(&str, &str)> = TOKEN_PARAMS
            .iter()
            .map(|p| (p.resource_type, p.name))
            .collect();
        let n = sorted.len();
        sorted.dedup();
        assert_eq!(sorted.len(), n);
        assert!(
            sorted.windows(2).all(|w| w[0] < w[1]),
            "sorted for binary search"
        );
    }

    #[test]
    fn parse() {
        let f = Filter::parse("Observation", &format!("category={CAT}|laboratory")).unwrap();
        assert_eq!(
            f.params,
            [("category".to_string(), format!("{CAT}|laboratory"))]
        );
        // Percent-encoded `|` is decoded.
        let f2 = Filter::parse("Observation", &format!("category={}%7Claboratory", CAT)).unwrap();
        assert_eq!(f, f2);
        for (t, q) in [
            ("*", "category=laboratory"),
            ("Observation", "category:not=laboratory"),
            ("Observation", "category=a,b"),
            ("Observation", "subject=Patient/1"),
            ("Observation", "date=ge2020"),
            ("Observation", "category="),
            ("Observation", ""),
            ("Observation", "a=%zz"),
        ] {
            assert!(Filter::parse(t, q).is_err(), "{t}?{q}");
        }
    }

    #[test]
    fn matching() {
        let f = |q: &str| Filter::parse("Observation", q).unwrap();
        for (q, ok) in [
            (format!("category={CAT}|laboratory"), true),
            ("category=laboratory".to_string(), true),
            (format!("category={CAT}|"), true),
            ("category=|laboratory".to_string(), false),
            (format!("category={CAT}|vital-signs"), false),
            ("category=http://other|laboratory".to_string(), false),
            ("code=http://loinc.org|2339-0".to_string(), true),
            ("status=final".to_string(), true),
            (
                "status=http://hl7.org/fhir/observation-status|final".to_string(),
                false,
            ),
            ("status=amended".to_string(), false),
            ("identifier=urn:lab|L1".to_string(), true),
            ("identifier=urn:lab|L2".to_string(), false),
            (format!("category={CAT}|laboratory&status=final"), true),
            (format!("category={CAT}|laboratory&status=amended"), false),
        ] {
            assert_eq!(f(&q).matches(&lab()), ok, "{q}");
        }
        let cond = json!({"resourceType": "Condition", "category": [{"coding": [{"system": CAT, "code": "laboratory"}]}]});
        assert!(!f("category=laboratory").matches(&cond), "another type");
        assert!(!f("category=laboratory").matches(&json!({"resourceType": "Observation"})));
    }

    #[test]
    fn carried() {
        let f = Filter::parse("Observation", "category=laboratory&status=final").unwrap();
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert!(f.carried_by(&p(&[
            ("status", "final"),
            ("code", "x"),
            ("category", "laboratory")
        ])));
        assert!(!f.carried_by(&p(&[("category", "laboratory")])));
        assert!(!f.carried_by(&p(&[
            ("category", "laboratory,vital-signs"),
            ("status", "final")
        ])));
    }
}
