//! The Patient compartment (pure): which resources belong to a patient.
//!
//! The table ([`PATIENT_COMPARTMENT`]) is generated from the FHIR R4
//! `CompartmentDefinition` for Patient and the R4 `SearchParameter`
//! definitions by `tools/gen_compartment.py`. A resource of type T is in
//! Patient/{id}'s compartment when one of T's compartment parameters holds a
//! reference to that patient, i.e. when an element on one of the parameter's
//! paths is a `Reference` whose `reference` names `Patient/{id}`. The
//! Patient resource itself is in its own compartment by id only (the
//! definition's `link` parameter would also admit other Patient records that
//! link to it; fhirwall does not follow links).

use serde_json::Value;

pub use super::patient_compartment::PATIENT_COMPARTMENT;

/// A search parameter that links a resource type to a Patient.
#[derive(Debug)]
pub struct LinkParam {
    pub name: &'static str,
    /// Element paths (dotted, below the resource) the parameter searches.
    pub paths: &'static [&'static str],
    /// Every path can only hold a Patient reference (so a bare id in the
    /// parameter names a Patient).
    pub patient_only: bool,
    /// Listed in the CompartmentDefinition itself; otherwise a parameter
    /// whose every path is a compartment path (e.g. Observation `patient`).
    pub in_definition: bool,
}

/// One resource type of the compartment definition.
#[derive(Debug)]
pub struct CompartmentType {
    pub resource_type: &'static str,
    /// Empty: the type is not in the Patient compartment.
    pub params: &'static [LinkParam],
}

/// The compartment parameters of `resource_type`; empty when the type is not
/// in the Patient compartment (or unknown).
pub fn link_params(resource_type: &str) -> &'static [LinkParam] {
    PATIENT_COMPARTMENT
        .binary_search_by(|t| t.resource_type.cmp(resource_type))
        .map(|i| PATIENT_COMPARTMENT[i].params)
        .unwrap_or(&[])
}

/// Is `resource_type` in the Patient compartment at all?
pub fn is_compartment_type(resource_type: &str) -> bool {
    resource_type == "Patient" || !link_params(resource_type).is_empty()
}

/// How references to the context patient may be spelled: relative
/// (`Patient/{id}`) or absolute below one of these FHIR base URLs (the
/// gateway's public base and the upstream's), without a trailing slash;
/// and whether a resource also in other patients' compartments counts as
/// the patient's.
#[derive(Debug, Clone, Default)]
pub struct Bases {
    pub urls: Vec<String>,
    pub shared: SharedResources,
}

/// What becomes, under `patient/` scopes, of a resource in the patient's
/// compartment that also names another Patient on a compartment path (a
/// Group listing other members, an Observation of another patient that
/// this one performed, a Coverage whose subscriber is another patient):
/// `patient_context.shared_resources`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SharedResources {
    /// Left out: a read is answered 404, a search or `$everything` passes
    /// without it.
    #[default]
    LeaveOut,
    /// Passed, as the CompartmentDefinition has it.
    Pass,
}

impl Bases {
    /// `urls`, shared resources left out.
    pub fn new(urls: Vec<String>) -> Bases {
        Bases {
            urls,
            shared: SharedResources::default(),
        }
    }

    /// What an absolute `reference` under one of these bases names below
    /// it (`Observation/o1`): below the longest it is under (a public base
    /// at `/` is a prefix of the upstream's base on the same host).
    fn below<'r>(&self, reference: &'r str) -> Option<&'r str> {
        self.urls
            .iter()
            .filter_map(|b| {
                reference
                    .strip_prefix(b.as_str())
                    .and_then(|r| r.strip_prefix('/'))
            })
            .min_by_key(|rest| rest.len())
    }

    /// Does this `Reference.reference` value name `Patient/{patient}`
    /// (optionally with a `/_history/{v}` suffix)?
    pub fn names_patient(&self, reference: &str, patient: &str) -> bool {
        let rel = match reference.strip_prefix("Patient/") {
            Some(_) => reference,
            None => match self.below(reference) {
                Some(r) => r,
                None => return false,
            },
        };
        let Some(rest) = rel.strip_prefix("Patient/") else {
            return false;
        };
        let id = match rest.split_once("/_history/") {
            Some((id, v)) if !v.is_empty() && !v.contains('/') => id,
            Some(_) => return false,
            None => rest,
        };
        id == patient
    }
}

/// Is `resource` (a FHIR resource as JSON) in the compartment of
/// `Patient/{patient}`? Fails closed: anything that is not a well-formed
/// resource of a compartment type that references the patient is outside.
pub fn in_compartment(resource: &Value, patient: &str, bases: &Bases) -> bool {
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
        return false;
    };
    if rtype == "Patient" {
        return resource.get("id").and_then(Value::as_str) == Some(patient);
    }
    link_params(rtype).iter().any(|p| {
        p.paths
            .iter()
            .any(|path| references_at(resource, path, &mut |r| bases.names_patient(r, patient)))
    })
}

/// Is `resource` also in another patient's compartment: does it name, on
/// one of its compartment paths, a Patient other than `Patient/{patient}`
/// — relative, an absolute URL to a Patient not under `bases`, a
/// contained Patient (`#x`), or one by identifier alone (no `reference`)
/// that says it is a Patient's (`type: Patient`) or sits where the
/// parameter searches Patients only (`Coverage.beneficiary`; also
/// `Observation.subject`, whose identifier-only Device is then taken for
/// another patient: it fails closed)? A Patient is judged by its id alone
/// ([`in_compartment`]): never. (A write is held to more:
/// [`references_other_patient`] counts any reference by identifier alone
/// on a compartment path.)
pub fn names_other_patient(resource: &Value, patient: &str, bases: &Bases) -> bool {
    resource.get("resourceType").and_then(Value::as_str) != Some("Patient")
        && other_patient_on_paths(resource, patient, bases, &|p, v| {
            p.patient_only || v.get("type").and_then(Value::as_str) == Some("Patient")
        })
}

/// Does `resource` reference, on one of its compartment paths, a Patient
/// other than `Patient/{patient}` (relative, or under one of `bases`, or
/// any absolute URL to a Patient), or anyone by identifier alone (a
/// logical reference, which fhirwall cannot tie to a record and readers
/// may resolve to another patient's)? A resource written under a
/// patient's scopes must not also land in another patient's compartment.
pub fn references_other_patient(resource: &Value, patient: &str, bases: &Bases) -> bool {
    other_patient_on_paths(resource, patient, bases, &|_, _| true)
}

/// Whether one of `resource`'s compartment paths references a Patient
/// other than `Patient/{patient}`: relative, an absolute URL to a Patient
/// not under `bases`, or a contained Patient (`#x`: no record fhirwall
/// can tie to this patient; readers may resolve it, by its identifier, to
/// another's); or holds a reference by identifier alone that
/// `logical_counts` (given the parameter and the reference) counts.
fn other_patient_on_paths(
    resource: &Value,
    patient: &str,
    bases: &Bases,
    logical_counts: &dyn Fn(&LinkParam, &Value) -> bool,
) -> bool {
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
        return false;
    };
    let contained_patient = |id: &str| {
        resource
            .get("contained")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter().any(|x| {
                    x.get("resourceType").and_then(Value::as_str) == Some("Patient")
                        && x.get("id").and_then(Value::as_str) == Some(id)
                })
            })
    };
    let other = |r: &str| match r.strip_prefix('#') {
        Some(id) => contained_patient(id),
        None => {
            (r.starts_with("Patient/") || r.contains("/Patient/"))
                && !bases.names_patient(r, patient)
        }
    };
    // A `reference` of null or blank text is no reference: HAPI parses
    // `{"reference": null}` as an empty one, and keeps the identifier.
    let logical = |v: &Value| {
        v.get("reference")
            .and_then(Value::as_str)
            .is_none_or(|r| r.trim().is_empty())
            && v.get("identifier").is_some()
    };
    link_params(rtype).iter().any(|p| {
        p.paths.iter().any(|path| {
            references_at(resource, path, &mut |r| other(r))
                || any_at(resource, path, &mut |v| logical(v) && logical_counts(p, v))
        })
    })
}

/// The resources a resource written under the scopes of
/// `Patient/{patient}` references, anywhere in it, that the upstream would
/// look up (HAPI refuses a write whose reference has no target): each
/// `(type, id)` of a Patient-compartment type, to be proved in the
/// compartment before the write goes. Otherwise the write's answer (201,
/// or 400 "not found") would tell whether another patient's resource
/// exists, which a read of it hides. `Err` with the reference when it
/// names another Patient: refused as it stands. Not looked up: this
/// patient, contained resources (`#id`), a transaction's own entries
/// (`urn:`), other servers' URLs, and types outside the compartment
/// (Practitioner, Organization, Medication…).
pub fn references_to_prove(
    resource: &Value,
    patient: &str,
    bases: &Bases,
) -> Result<Vec<(String, String)>, String> {
    let mut found = Vec::new();
    let mut other = None;
    let mut visit = |r: &str| {
        if other.is_some() || r.starts_with('#') || r.starts_with("urn:") {
            return;
        }
        let rel = match bases.below(r) {
            Some(rel) => rel,
            None if r.contains("://") => return,
            None => r,
        };
        let mut parts = rel.split('/');
        let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
            return;
        };
        if t == "Patient" {
            if !bases.names_patient(rel, patient) {
                other = Some(r.to_string());
            }
            return;
        }
        if is_compartment_type(t) && !id.is_empty() {
            let key = (t.to_string(), id.to_string());
            if !found.contains(&key) {
                found.push(key);
            }
        }
    };
    every_reference(resource, &mut visit);
    // A JSON Patch sets a reference as a plain string at a path ending in
    // `/reference` (`{"op": "add", "path": "/focus/0/reference", "value":
    // "Condition/c9"}`).
    if let Value::Array(ops) = resource {
        for op in ops {
            let path = op.get("path").and_then(Value::as_str).unwrap_or("");
            if path.rsplit('/').next().map(str::trim) == Some("reference") {
                if let Some(Value::String(r)) = op.get("value") {
                    visit(r);
                }
            }
        }
    }
    match other {
        Some(r) => Err(r),
        None => Ok(found),
    }
}

/// Calls `f` on every `reference` string anywhere below `node`.
fn every_reference(node: &Value, f: &mut dyn FnMut(&str)) {
    match node {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("reference") {
                f(r);
            }
            for v in m.values() {
                every_reference(v, f);
            }
        }
        Value::Array(a) => {
            for v in a {
                every_reference(v, f);
            }
        }
        _ => {}
    }
}

/// Calls `hit` on every `reference` string found at `path` (arrays are
/// walked at every step); true as soon as one call returns true.
fn references_at(node: &Value, path: &str, hit: &mut dyn FnMut(&str) -> bool) -> bool {
    any_at(node, path, &mut |v| {
        v.get("reference")
            .and_then(Value::as_str)
            .is_some_and(&mut *hit)
    })
}

/// Calls `f` on every element at the dotted `path` below `node` (arrays
/// are walked at every step); true as soon as one call returns true.
pub fn any_at(node: &Value, path: &str, f: &mut dyn FnMut(&Value) -> bool) -> bool {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let mut one = |v: &Value| match rest {
        Some(rest) => any_at(v, rest, f),
        None => f(v),
    };
    match node.get(head) {
        Some(Value::Array(items)) => items.iter().any(&mut one),
        Some(v) => one(v),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_naming_other_patients() {
        let bases = Bases::new(vec!["https://gw/fhir".into()]);
        for (resource, other) in [
            (
                json!({"resourceType": "Group", "member": [
                    {"entity": {"reference": "Patient/p1"}}, {"entity": {"reference": "Patient/p2"}}]}),
                true,
            ),
            (
                json!({"resourceType": "Group", "member": [{"entity": {"reference": "https://gw/fhir/Patient/p1"}}]}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "performer": [{"reference": "https://elsewhere/fhir/Patient/p1"}]}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "performer": [{"reference": "Practitioner/d1"}]}),
                false,
            ),
            // Not a compartment element: Observation.focus.
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "focus": [{"reference": "Patient/p2"}]}),
                false,
            ),
            // Another patient by identifier alone, or contained.
            (
                json!({"resourceType": "Group", "member": [{"entity": {"reference": "Patient/p1"}},
                    {"entity": {"type": "Patient", "identifier": {"system": "urn:mrn", "value": "2"}}}]}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "performer": [{"identifier": {"system": "urn:npi", "value": "9"}}]}),
                false,
            ),
            (
                json!({"resourceType": "Coverage", "subscriber": {"reference": "Patient/p1"},
                       "beneficiary": {"identifier": {"system": "urn:mrn", "value": "2"}}}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "performer": [{"reference": "Patient/p1"}],
                       "contained": [{"resourceType": "Patient", "id": "x"}],
                       "subject": {"reference": "#x"}}),
                true,
            ),
            // A Patient is judged by its id.
            (
                json!({"resourceType": "Patient", "id": "p1",
                       "link": [{"other": {"reference": "Patient/p2"}}]}),
                false,
            ),
        ] {
            assert_eq!(
                names_other_patient(&resource, "p1", &bases),
                other,
                "{resource}"
            );
        }
    }
    use crate::fhir::resource_types::RESOURCE_TYPES;
    use serde_json::json;

    fn bases() -> Bases {
        Bases::new(vec![
            "https://gw.example/fhir".into(),
            "http://legacy:8080/baseR4".into(),
        ])
    }

    #[test]
    fn written_references_to_prove() {
        let r = json!({"resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "basedOn": [{"reference": "https://gw.example/fhir/ServiceRequest/s1"},
                        {"reference": "Encounter/e1/_history/2"}],
            "performer": [{"reference": "Practitioner/d1"}, {"reference": "#c"}],
            "hasMember": [{"reference": "urn:uuid:0e0c"},
                          {"reference": "https://other.example/fhir/Observation/o9"}],
            "contained": [{"resourceType": "Provenance", "id": "c",
                           "target": [{"reference": "Condition/c7"}]}]});
        let got = references_to_prove(&r, "p1", &bases()).unwrap();
        let mut got: Vec<(&str, &str)> =
            got.iter().map(|(t, i)| (t.as_str(), i.as_str())).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                ("Condition", "c7"),
                ("Encounter", "e1"),
                ("ServiceRequest", "s1")
            ]
        );
        for other in ["Patient/p2", "http://legacy:8080/baseR4/Patient/p2"] {
            let mut r = r.clone();
            r["focus"] = json!([{"reference": other}]);
            assert_eq!(
                references_to_prove(&r, "p1", &bases()),
                Err(other.to_string())
            );
        }
        let mut r = r.clone();
        r["focus"] = json!([{"reference": "Patient/p1/_history/3"}]);
        assert!(references_to_prove(&r, "p1", &bases()).is_ok());
        // A JSON Patch: references as objects and as plain strings.
        let patch = json!([
            {"op": "add", "path": "/derivedFrom", "value": [{"reference": "Observation/o2"}]},
            {"op": "replace", "path": "/hasMember/0/reference", "value": "Observation/o3"},
            {"op": "replace", "path": "/status", "value": "Observation/not-a-reference"}
        ]);
        let mut got = references_to_prove(&patch, "p1", &bases()).unwrap();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                ("Observation".to_string(), "o2".to_string()),
                ("Observation".into(), "o3".into())
            ]
        );
        let other = json!([{"op": "add", "path": "/focus/0/reference", "value": "Patient/p2"}]);
        assert!(references_to_prove(&other, "p1", &bases()).is_err());
    }

    #[test]
    fn table_is_sorted_and_covers_r4() {
        let names: Vec<&str> = PATIENT_COMPARTMENT
            .iter()
            .map(|t| t.resource_type)
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted, "binary search needs sorted types");
        // Every R4 resource type but Parameters is listed in the definition.
        for t in RESOURCE_TYPES {
            assert_eq!(names.contains(t), *t != "Parameters", "{t}");
        }
        let members = PATIENT_COMPARTMENT
            .iter()
            .filter(|t| !t.params.is_empty())
            .count();
        assert_eq!(members, 66);
    }

    #[test]
    fn spec_examples() {
        let names = |t: &str| -> Vec<&str> {
            link_params(t)
                .iter()
                .filter(|p| p.in_definition)
                .map(|p| p.name)
                .collect()
        };
        assert_eq!(names("Observation"), ["subject", "performer"]);
        assert_eq!(names("Encounter"), ["patient"]);
        assert_eq!(names("Patient"), ["link"]);
        assert!(names("Practitioner").is_empty());
        assert!(names("Medication").is_empty());
        assert!(!is_compartment_type("Organization"));
        assert!(is_compartment_type("Patient"));
        assert!(is_compartment_type("Condition"));
        let obs_patient = link_params("Observation")
            .iter()
            .find(|p| p.name == "patient")
            .unwrap();
        assert!(obs_patient.patient_only && !obs_patient.in_definition);
        assert_eq!(obs_patient.paths, ["subject"]);
        let obs_subject = &link_params("Observation")[0];
        assert!(!obs_subject.patient_only);
    }

    #[test]
    fn references() {
        let b = bases();
        for (r, ok) in [
            ("Patient/p1", true),
            ("Patient/p1/_history/3", true),
            ("https://gw.example/fhir/Patient/p1", true),
            ("http://legacy:8080/baseR4/Patient/p1", true),
            ("Patient/p10", false),
            ("Patient/p", false),
            ("Group/p1", false),
            ("p1", false),
            ("https://evil.example/fhir/Patient/p1", false),
            ("https://gw.example/fhirX/Patient/p1", false),
            ("Patient/p1/_history/", false),
            ("Patient/p1/extra", false),
            ("#p1", false),
            ("", false),
        ] {
            assert_eq!(b.names_patient(r, "p1"), ok, "{r}");
        }
    }

    /// A public base at `/` is a prefix of the upstream's base on the same
    /// host (links built from the forwarded host): the longer decides.
    #[test]
    fn references_below_the_longest_base() {
        let b = Bases::new(vec!["https://gw".into(), "https://gw/r4".into()]);
        assert!(b.names_patient("https://gw/r4/Patient/p1", "p1"));
        assert!(b.names_patient("https://gw/Patient/p1", "p1"));
        assert!(!b.names_patient("https://gw/r4/Patient/p2", "p1"));
        assert!(!b.names_patient("https://gw/r5/Patient/p1", "p1"));
    }

    #[test]
    fn other_patients() {
        let b = bases();
        for (r, other) in [
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "performer": [{"reference": "Patient/p2"}]}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "performer": [{"reference": "Practitioner/d"}]}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "https://other.example/fhir/Patient/p1"}}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "focus": [{"reference": "Patient/p2"}]}),
                false,
            ),
            // By identifier alone on a compartment path: anyone's.
            (
                json!({"resourceType": "Observation", "performer": [{"reference": "Patient/p1"}],
                       "subject": {"type": "Patient", "identifier": {"system": "urn:mrn", "value": "2"}}}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1",
                       "identifier": {"system": "urn:mrn", "value": "1"}}}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "focus": [{"identifier": {"value": "2"}}]}),
                false,
            ),
            // A contained Patient as subject (p1 only as performer).
            (
                json!({"resourceType": "Observation", "performer": [{"reference": "Patient/p1"}],
                       "contained": [{"resourceType": "Patient", "id": "x"}],
                       "subject": {"reference": "#x"}}),
                true,
            ),
            // A contained resource of another type: not a patient.
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"},
                       "contained": [{"resourceType": "Device", "id": "d"}],
                       "device": {"reference": "#d"}}),
                false,
            ),
        ] {
            assert_eq!(references_other_patient(&r, "p1", &b), other, "{r}");
        }
    }

    #[test]
    fn membership() {
        let b = bases();
        let cases = [
            (json!({"resourceType": "Patient", "id": "p1"}), true),
            (json!({"resourceType": "Patient", "id": "p2"}), false),
            (
                json!({"resourceType": "Patient", "id": "p2", "link": [{"other": {"reference": "Patient/p1"}}]}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"},
                       "performer": [{"reference": "Practitioner/x"}, {"reference": "Patient/p1"}]}),
                true,
            ),
            (
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"}}),
                false,
            ),
            (
                json!({"resourceType": "Observation", "focus": [{"reference": "Patient/p1"}]}),
                false,
            ),
            (
                json!({"resourceType": "Appointment", "participant": [
                    {"actor": {"reference": "Practitioner/d"}},
                    {"actor": {"reference": "https://gw.example/fhir/Patient/p1"}}]}),
                true,
            ),
            (json!({"resourceType": "Practitioner", "id": "p1"}), false),
            (json!({"resourceType": "Observation"}), false),
            (json!({"subject": {"reference": "Patient/p1"}}), false),
            (json!("Patient/p1"), false),
            (
                json!({"resourceType": "Observation", "subject": {"reference": ["Patient/p1"]}}),
                false,
            ),
        ];
        for (r, ok) in cases {
            assert_eq!(in_compartment(&r, "p1", &b), ok, "{r}");
        }
    }
}
