//! The FHIR R4 `AuditEvent` form of a record, shaped after the IHE Basic
//! Audit Log Patterns (BALP 1.1) RESTful profiles:
//!
//! - `type` `audit-event-type#rest`, `subtype` the `restful-interaction`
//!   code, `action` C/R/U/D/E;
//! - agents: the client application (with its source address), the FHIR
//!   server behind fhirwall, and the user (`sub`, `fhirUser`) as requestor,
//!   with role codes as BALP assigns them per interaction;
//! - entities: the patient (the token's launch context), the resource, the
//!   query (parameter *names* only: values are replaced, as they can be PHI —
//!   a deliberate deviation from BALP's "raw query"), and the transaction
//!   (`X-Request-Id`), whose `detail`s carry fhirwall's own fields (reason
//!   code, stage, rule, scopes, bytes, latencies);
//! - break-glass: `purposeOfEvent` and the user's `purposeOfUse` `BTG`.
//!
//! A BALP profile is claimed in `meta.profile` only where BALP defines one
//! (read, query, create, update, delete) and the outcome is success: BALP
//! has no profile for failures. Outcomes: `0` allowed and answered below
//! 400, `4` denied or a 4xx answer, `8` errors and 5xx. The token appears
//! only as its SHA-256, in the user agent's `policy`.

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{Event, Record};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const BALP: &str = "https://profiles.ihe.net/ITI/BALP";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";

/// What every event says about where it was recorded.
#[derive(Debug, Clone, Default)]
pub struct Site {
    /// The public FHIR base URL clients use.
    public_base: String,
    /// Its `scheme://host[:port]` and its host.
    public_origin: String,
    public_host: String,
    /// The upstream FHIR base URL (the server agent).
    upstream: String,
    /// Configured issuer name → `iss` URL (the user's identifier system).
    issuers: Vec<(String, String)>,
}

impl Site {
    pub fn new(
        public_base: &url::Url,
        upstream: &url::Url,
        issuers: Vec<(String, String)>,
    ) -> Site {
        Site {
            public_base: public_base.to_string(),
            public_origin: public_base.origin().ascii_serialization(),
            public_host: public_base.host_str().unwrap_or_default().to_string(),
            upstream: upstream.to_string(),
            issuers,
        }
    }
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn dcm(code: &str, display: &str) -> Value {
    coding(DCM, code, display)
}

/// `(BALP profile, client role, server role)` for an interaction.
fn shape(interaction: &str) -> (Option<&'static str>, Value, Value) {
    let source = || dcm("110153", "Source Role ID");
    let destination = || dcm("110152", "Destination Role ID");
    match interaction {
        "read" | "vread" => (Some("Read"), destination(), source()),
        "search-type" | "search-system" | "search-compartment" => {
            (Some("Query"), source(), destination())
        }
        "create" => (Some("Create"), source(), destination()),
        "update" | "patch" => (Some("Update"), source(), destination()),
        "delete" => (
            Some("Delete"),
            dcm("110150", "Application"),
            coding(
                "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                "custodian",
                "Custodian",
            ),
        ),
        // No BALP profile: history as a read, the rest as a query.
        i if i.starts_with("history") => (None, destination(), source()),
        _ => (None, source(), destination()),
    }
}

fn action(interaction: Option<&str>) -> &'static str {
    match interaction {
        Some("create") => "C",
        Some("read" | "vread" | "history-instance" | "history-type" | "history-system") => "R",
        Some("update" | "patch") => "U",
        Some("delete") => "D",
        _ => "E",
    }
}

/// The `restful-interaction` code (a compartment search is a type search).
fn subtype(interaction: &str) -> &str {
    match interaction {
        "search-compartment" => "search-type",
        i => i,
    }
}

fn outcome(r: &Record) -> &'static str {
    let status = r.status.unwrap_or(0);
    match r.decision {
        "allow" if status < 400 => "0",
        "allow" if status < 500 => "4",
        // An access-control refusal is a security alert (BALP), a serious
        // failure; a request refused for its form (malformed, too large,
        // throttled, a write conflict) a minor one.
        "deny" if !is_access_refusal(r.reason) => "4",
        _ => "8",
    }
}

/// Whether a denial's reason is access control refusing the caller (its
/// token, binding, scopes, policies or patient context), not the request's
/// form or the gateway's availability.
fn is_access_refusal(reason: &str) -> bool {
    (reason.starts_with("token_") || reason.starts_with("dpop_") || reason.starts_with("mtls_"))
        && !matches!(
            reason,
            "dpop_replay_cache_full"
                | "dpop_replay_check_unavailable"
                | "dpop_quota_exceeded"
                | "token_too_long"
                // RFC 9449's routine challenge: every client meets it.
                | "dpop_nonce_required"
        )
        || matches!(
            reason,
            "no_token"
                | "binding_required"
                | "credentials_refused"
                | "insufficient_scope"
                | "policy_denied"
                | "outside_compartment"
                | "outside_scope_filter"
        )
}

fn detail(kind: &str, value: impl Into<String>) -> Value {
    json!({"type": kind, "valueString": value.into()})
}

/// Interactions BALP records as a query (the entity's `query`), not as a
/// resource.
fn is_query(interaction: &str) -> bool {
    matches!(
        interaction,
        "search-type" | "search-system" | "search-compartment" | "operation"
    )
}

/// The object role of an entity: a query, or the resource acted on.
fn object_role(query: bool) -> Value {
    if query {
        coding(OBJECT_ROLE, "24", "Query")
    } else {
        coding(OBJECT_ROLE, "4", "Domain Resource")
    }
}

/// The resource an entity names: `Type/id`, or the type alone when there
/// is no id yet (a create, a type-level operation).
fn what(resource_type: &str, id: Option<&str>) -> Value {
    match id {
        Some(id) => json!({"reference": format!("{resource_type}/{id}")}),
        None => json!({"display": resource_type}),
    }
}

/// Whether a refusal at the bind stage (`reason`) says the sender did
/// not prove it holds the token's key or certificate, as opposed to a
/// token that is not bound, or a proof fhirwall could not check for want
/// of capacity.
fn possession_failed(reason: &str) -> bool {
    (reason.starts_with("dpop_") || reason.starts_with("mtls_"))
        && !matches!(
            reason,
            "dpop_quota_exceeded"
                | "dpop_replay_cache_full"
                | "dpop_replay_check_unavailable"
                | "dpop_proof_without_binding"
                | "dpop_token_not_bound"
        )
}

/// The AuditEvent for a record.
pub fn audit_event(r: &Record, site: &Site) -> Value {
    let interaction = r.interaction;
    let (profile, client_role, server_role) = shape(interaction.unwrap_or(""));
    let out = outcome(r);
    let decision_event = r.event == Event::Decision;
    let recorded = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();

    let mut ev = Map::new();
    ev.insert("resourceType".into(), "AuditEvent".into());
    ev.insert("id".into(), r.id.clone().into());
    // The data is the context patient's only when a `patient/` scope
    // granted the request (its compartment enforced). Under `user/` or
    // `system/` scopes the launch patient says nothing of whose data was
    // touched: it is a detail, not the Patient entity (else a search for
    // who accessed another patient's data would miss this access, and
    // name the launch patient instead).
    // Every scope used must be a `patient/` one: a page or a Bundle a
    // `user/` scope granted too may hold anyone's.
    let patient_scoped = r.patient.is_some()
        && !r.scopes_used.is_empty()
        && r.scopes_used.iter().all(|s| s.starts_with("patient/"));
    if let Some(p) = profile.filter(|_| out == "0" && !decision_event) {
        let name = if patient_scoped {
            format!("Patient{p}")
        } else {
            p.to_string()
        };
        ev.insert(
            "meta".into(),
            json!({"profile": [format!("{BALP}/StructureDefinition/IHE.BasicAudit.{name}")]}),
        );
    }
    // A refusal is a Security Alert (DICOM 110113), as BALP records an
    // access control denial; anything else a RESTful operation.
    let event_type = if r.decision == "deny" && is_access_refusal(r.reason) {
        dcm("110113", "Security Alert")
    } else {
        coding(
            "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "rest",
            "RESTful Operation",
        )
    };
    ev.insert("type".into(), event_type);
    if let Some(i) = interaction {
        let code = subtype(i);
        ev.insert(
            "subtype".into(),
            json!([coding(
                "http://hl7.org/fhir/restful-interaction",
                code,
                code
            )]),
        );
    }
    ev.insert("action".into(), action(interaction).into());
    let mut period = json!({"start": r.time});
    if !decision_event {
        period["end"] = recorded.clone().into();
    }
    ev.insert("period".into(), period);
    ev.insert("recorded".into(), recorded.into());
    // A decision record is written before the request goes on: it has no
    // outcome yet (the request record that follows has it), and a report
    // counting successful reads must not count it.
    if !decision_event {
        ev.insert("outcome".into(), out.into());
    }
    let desc = match (decision_event, &r.detail) {
        (true, _) => format!(
            "{} ({}): authorised, about to go upstream; its outcome is in the request's \
             second record",
            r.decision, r.reason
        ),
        (false, Some(d)) => format!(
            "{} {} ({}): {d}",
            r.status.unwrap_or(0),
            r.decision,
            r.reason
        ),
        (false, None) => format!("{} {} ({})", r.status.unwrap_or(0), r.decision, r.reason),
    };
    ev.insert("outcomeDesc".into(), desc.into());
    if r.break_glass_reason.is_some() {
        ev.insert("purposeOfEvent".into(), json!([btg()]));
    }

    // Agents: client application, server, user.
    let mut client_type = vec![client_role];
    if client_type[0]["code"] != "110150" {
        client_type.push(dcm("110150", "Application"));
    }
    // A token whose proof of possession failed (a stolen bound token
    // replayed without its key) names its owner, not who sent it: the
    // user is no requestor then; the client at the source address is.
    let possessed = !(r.stage == "bind" && r.decision == "deny" && possession_failed(r.reason));
    let mut agents = vec![json!({
        "type": {"coding": client_type},
        "who": {"identifier": {"value": r.client_id.unwrap_or("unknown")}},
        "requestor": r.sub.is_none() || !possessed,
    })];
    if let Some(addr) = &r.source {
        agents[0]["network"] = json!({"address": addr, "type": "2"});
    }
    // With no user (a backend service's token, a token refused before its
    // claims were read) the token's hash goes with the client, the
    // requestor: repeated use of one token stays traceable.
    if let (None, Some(h)) = (r.sub, &r.token_sha256) {
        agents[0]["policy"] = json!([format!("urn:fhirwall:token-sha256:{h}")]);
    }
    agents.push(json!({
        "type": {"coding": [server_role]},
        "who": {"identifier": {"value": site.upstream}},
        "requestor": false,
        "network": {"address": site.upstream, "type": "5"},
    }));
    if let Some(sub) = r.sub {
        let user_role = match interaction {
            Some("create" | "update" | "patch" | "delete") => {
                coding(PARTICIPATION, "AUT", "author (originator)")
            }
            _ => coding(PARTICIPATION, "IRCP", "information recipient"),
        };
        let mut types = vec![
            user_role,
            json!({"system": format!("{BALP}/CodeSystem/UserAgentTypes"), "code": "UserOauthAgent"}),
        ];
        if r.fhir_user.is_some_and(is_patient_ref) {
            types.push(coding(
                "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                "PAT",
                "patient",
            ));
        }
        let mut identifier = json!({"value": sub});
        if let Some(iss) = r
            .issuer
            .and_then(|n| site.issuers.iter().find(|(name, _)| name == n))
        {
            identifier["system"] = iss.1.clone().into();
        }
        let mut who = json!({"identifier": identifier});
        if let Some(u) = r.fhir_user {
            who["reference"] = u.into();
        }
        let mut user = json!({"type": {"coding": types}, "who": who, "requestor": possessed});
        if let Some(h) = &r.token_sha256 {
            user["policy"] = json!([format!("urn:fhirwall:token-sha256:{h}")]);
        }
        if r.break_glass_reason.is_some() {
            user["purposeOfUse"] = json!([btg()]);
        }
        agents.push(user);
    }
    ev.insert("agent".into(), agents.into());

    ev.insert(
        "source".into(),
        json!({
            "site": site.public_host,
            "observer": {"display": format!("fhirwall {}", site.public_base)},
            "type": [coding(
                "http://terminology.hl7.org/CodeSystem/security-source-type",
                "6",
                "Security Server",
            )],
        }),
    );

    // Entities: patient, resource or query, transaction.
    let mut entities = Vec::new();
    let patient_entity = |p: &str| {
        json!({
            "what": {"reference": format!("Patient/{p}")},
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        })
    };
    if let Some(p) = r.patient.filter(|_| patient_scoped) {
        entities.push(patient_entity(p));
    }
    // Under other scopes, the patients the request names are whose data
    // it reaches (a search for another patient, their `$everything`).
    // (Under `patient/` scopes it names none but the launch patient.)
    for p in r.patients.iter().filter(|_| !patient_scoped) {
        entities.push(patient_entity(p));
    }
    let system_object = coding(ENTITY_TYPE, "2", "System Object");
    if interaction.is_some_and(is_query) {
        let mut line = format!("{} {}{}", r.method, site.public_origin, r.path);
        for (i, name) in r.query_params.iter().enumerate() {
            line.push(if i == 0 { '?' } else { '&' });
            line.push_str(name);
            line.push_str("=<redacted>");
        }
        entities.push(json!({
            "type": system_object,
            "role": object_role(true),
            "query": base64::engine::general_purpose::STANDARD.encode(line),
        }));
    } else if let Some(t) = r.resource_type {
        entities.push(json!({
            "what": what(t, r.resource_id),
            "type": system_object,
            "role": object_role(false),
        }));
    }
    // A batch or transaction: one entity per entry, in order, so who read
    // or changed which resources can be told from the record.
    for (i, e) in r.entries.iter().enumerate() {
        let mut entity = json!({
            "what": e.resource_type.map_or_else(
                || json!({"display": "(system)"}),
                |t| what(t, e.resource_id),
            ),
            "type": system_object,
            "role": object_role(is_query(e.interaction)),
            "description": format!("entry {i}: {}", e.interaction),
        });
        let mut entry_details = Vec::new();
        if let Some(op) = e.operation {
            entry_details.push(detail("operation", op));
        }
        if !e.params.is_empty() {
            entry_details.push(detail("query_params", e.params.join(",")));
        }
        if let Some(s) = e.status {
            entry_details.push(detail("status", s.to_string()));
        }
        if e.withheld {
            entry_details.push(detail("withheld", "true"));
        }
        if !entry_details.is_empty() {
            entity["detail"] = entry_details.into();
        }
        entities.push(entity);
    }
    let mut details = vec![
        detail(
            "event",
            if decision_event {
                "decision"
            } else {
                "request"
            },
        ),
        detail("decision", r.decision),
        detail("reason", r.reason),
        detail("stage", r.stage),
    ];
    if let Some(rule) = r.policy_rule {
        details.push(detail("policy_rule", rule));
    }
    if !r.scopes_used.is_empty() {
        details.push(detail("scopes_used", r.scopes_used.join(" ")));
    }
    if let Some(p) = r.patient.filter(|_| !patient_scoped) {
        details.push(detail("launch_patient", format!("Patient/{p}")));
    }
    if !r.query_params.is_empty() {
        details.push(detail("query_params", r.query_params.join(",")));
    }
    if !r.narrowed_with.is_empty() {
        details.push(detail("narrowed_with", r.narrowed_with.join(",")));
    }
    if let Some(kind) = r.token_kind {
        details.push(detail("token_kind", kind));
    }
    // The client's own X-Request-Id (the entity names fhirwall's).
    if r.request_id_from_client {
        details.push(detail("client_request_id", r.request_id));
    }
    if let Some(b) = r.binding {
        details.push(detail("binding", b));
    }
    if let Some(reason) = r.break_glass_reason {
        details.push(detail("break_glass_reason", reason));
    }
    for (k, v) in [
        ("status", r.status.map(u64::from)),
        ("upstream_status", r.upstream_status.map(u64::from)),
        ("request_bytes", r.request_bytes),
        ("response_bytes", r.response_bytes),
    ] {
        if let Some(v) = v {
            details.push(detail(k, v.to_string()));
        }
    }
    details.push(detail("latency_ms", r.latency_ms.to_string()));
    for (k, v) in [
        ("upstream_ms", r.upstream_ms),
        ("validation_ms", r.validation_ms),
    ] {
        if let Some(v) = v {
            details.push(detail(k, v.to_string()));
        }
    }
    // The X-Request-Id the upstream got: fhirwall's own, the request
    // record's id (also in its decision record's).
    let sent = if decision_event {
        r.id.strip_suffix("-d").unwrap_or(&r.id)
    } else {
        &r.id
    };
    entities.push(json!({
        "what": {"identifier": {"value": sent}},
        "type": {"system": format!("{BALP}/CodeSystem/BasicAuditEntityType"), "code": "XrequestId"},
        "detail": details,
    }));
    ev.insert("entity".into(), entities.into());
    Value::Object(ev)
}

fn is_patient_ref(fhir_user: &str) -> bool {
    fhir_user.rsplit('/').nth(1).is_some_and(|t| t == "Patient")
}

fn btg() -> Value {
    json!({"coding": [coding(
        "http://terminology.hl7.org/CodeSystem/v3-ActReason",
        "BTG",
        "break the glass",
    )]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Site {
        Site::new(
            &url::Url::parse("https://gw.example.org/fhir").unwrap(),
            &url::Url::parse("http://10.0.0.5:8080/r4").unwrap(),
            vec![("hospital".into(), "https://idp.example.org".into())],
        )
    }

    fn codes(v: &Value) -> Vec<String> {
        v["coding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_batch_names_each_entry() {
        use crate::audit::EntryRecord;
        let r = Record {
            id: "b1".into(),
            time: "2026-11-25T10:00:00Z".into(),
            request_id: "req-b",
            method: "POST",
            path: "/fhir",
            client_id: Some("app"),
            interaction: Some("batch"),
            entries: vec![
                EntryRecord {
                    interaction: "read",
                    resource_type: Some("Patient"),
                    resource_id: Some("p7"),
                    status: Some(404),
                    withheld: true,
                    ..EntryRecord::default()
                },
                EntryRecord {
                    interaction: "search-type",
                    resource_type: Some("Observation"),
                    params: vec!["patient", "code"],
                    ..EntryRecord::default()
                },
            ],
            decision: "allow",
            reason: "allowed",
            stage: "decide",
            status: Some(200),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        let entities = ev["entity"].as_array().unwrap();
        let entry = |i: usize| {
            entities
                .iter()
                .find(|e| e["description"] == format!("entry {i}: {}", ["read", "search-type"][i]))
                .unwrap_or_else(|| panic!("no entity for entry {i}: {entities:?}"))
        };
        assert_eq!(entry(0)["what"]["reference"], "Patient/p7");
        assert_eq!(entry(0)["role"]["code"], "4");
        assert_eq!(entry(0)["detail"][0]["type"], "status");
        assert_eq!(entry(0)["detail"][0]["valueString"], "404");
        assert_eq!(entry(0)["detail"][1]["type"], "withheld");
        assert_eq!(entry(1)["what"]["display"], "Observation");
        assert_eq!(entry(1)["role"]["code"], "24");
        assert_eq!(entry(1)["detail"][0]["valueString"], "patient,code");
        // The JSON-lines record carries the same.
        let line = serde_json::to_value(&r).unwrap();
        assert_eq!(line["entries"][0]["resource_id"], "p7");
        assert_eq!(line["entries"][0]["status"], 404);
        assert!(line["entries"][1].get("status").is_none());
        assert_eq!(line["entries"][1]["params"], json!(["patient", "code"]));
    }

    /// A token with a launch patient whose `user/` scope granted the read:
    /// the resource may be anyone's, so no PatientRead and no Patient
    /// entity naming the launch patient.
    #[test]
    fn a_read_under_user_scopes_names_no_patient_as_its_subject() {
        let scopes = vec!["user/Observation.rs".to_string()];
        let r = Record {
            id: "u".into(),
            request_id: "req-u",
            method: "GET",
            path: "/fhir/Observation/o9",
            patient: Some("p1"),
            scopes_used: &scopes,
            interaction: Some("read"),
            resource_type: Some("Observation"),
            resource_id: Some("o9"),
            decision: "allow",
            reason: "allowed",
            stage: "decide",
            status: Some(200),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert_eq!(
            ev["meta"]["profile"][0],
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Read"
        );
        let entities = ev["entity"].as_array().unwrap();
        assert!(
            !entities.iter().any(|e| e["role"]["code"] == "1"),
            "{entities:?}"
        );
        assert!(ev.to_string().contains(r#""launch_patient""#), "{ev}");
    }

    /// Under `user/` scopes, a search naming a patient records that
    /// patient as an entity (whose data it reaches), not the launch one.
    #[test]
    fn a_user_search_records_the_patients_it_names() {
        let scopes = vec!["user/Observation.rs".to_string()];
        let r = Record {
            id: "n".into(),
            request_id: "req-n",
            method: "GET",
            path: "/fhir/Observation",
            patient: Some("p1"),
            patients: &["p2".to_string()],
            query_params: &[],
            scopes_used: &scopes,
            interaction: Some("search-type"),
            resource_type: Some("Observation"),
            decision: "allow",
            reason: "allowed",
            stage: "decide",
            status: Some(200),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        let patients: Vec<&Value> = ev["entity"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["role"]["code"] == "1")
            .collect();
        assert_eq!(patients.len(), 1, "{ev}");
        assert_eq!(patients[0]["what"]["reference"], "Patient/p2");
    }

    /// A request both a `patient/` and a `user/` scope granted (a page, a
    /// Bundle's entries) may hold anyone's data: no Patient profile.
    #[test]
    fn a_grant_mixing_patient_and_user_scopes_claims_no_patient() {
        let scopes = vec![
            "user/Observation.rs".to_string(),
            "patient/Condition.rs".to_string(),
        ];
        let r = Record {
            id: "m".into(),
            request_id: "req-m",
            method: "GET",
            path: "/fhir",
            patient: Some("p1"),
            scopes_used: &scopes,
            interaction: Some("search-system"),
            decision: "allow",
            reason: "allowed",
            stage: "decide",
            status: Some(200),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        let profile = ev["meta"]["profile"][0].as_str().unwrap_or("");
        assert!(!profile.contains(".Patient"), "{profile}");
        let entities = ev["entity"].as_array().unwrap();
        assert!(
            !entities.iter().any(|e| e["role"]["code"] == "1"),
            "{entities:?}"
        );
    }

    #[test]
    fn a_failed_proof_of_possession_names_no_user_as_requestor() {
        for (stage, decision, reason, user_requests) in [
            ("bind", "deny", "dpop_wrong_key", false),
            ("bind", "deny", "mtls_wrong_certificate", false),
            ("bind", "deny", "dpop_bound_as_bearer", false),
            // The token is no bound one, or the proof was not judged.
            ("bind", "deny", "binding_required", true),
            ("bind", "deny", "dpop_quota_exceeded", true),
            ("decide", "deny", "insufficient_scope", true),
            ("bind", "allow", "allowed", true),
        ] {
            let r = Record {
                id: "pop".into(),
                request_id: "req-pop",
                method: "GET",
                path: "/fhir/Observation/o1",
                client_id: Some("app"),
                sub: Some("victim"),
                interaction: Some("read"),
                decision,
                reason,
                stage,
                status: Some(401),
                ..Record::default()
            };
            let ev = audit_event(&r, &site());
            let agents = ev["agent"].as_array().unwrap();
            let user = agents.last().unwrap();
            assert_eq!(user["who"]["identifier"]["value"], "victim");
            assert_eq!(user["requestor"], user_requests, "{reason}");
            assert_eq!(agents[0]["requestor"], !user_requests, "{reason}");
        }
    }

    #[test]
    fn an_allowed_patient_read_claims_balp_patient_read() {
        let scopes = vec!["patient/Observation.rs".to_string()];
        let r = Record {
            id: "abc".into(),
            time: "2026-11-25T10:00:00Z".into(),
            request_id: "req-1",
            source: Some("192.0.2.7".into()),
            method: "GET",
            path: "/fhir/Observation/o1",
            issuer: Some("hospital"),
            client_id: Some("app"),
            sub: Some("u1"),
            fhir_user: Some("https://gw.example.org/fhir/Practitioner/9"),
            patient: Some("p1"),
            token_sha256: Some("ff00".into()),
            scopes_used: &scopes,
            interaction: Some("read"),
            resource_type: Some("Observation"),
            resource_id: Some("o1"),
            decision: "allow",
            reason: "allowed",
            stage: "decide",
            status: Some(200),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert_eq!(
            ev["meta"]["profile"][0],
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
        );
        assert_eq!(ev["id"], "abc");
        assert_eq!(ev["type"]["code"], "rest");
        assert_eq!(ev["subtype"][0]["code"], "read");
        assert_eq!(ev["action"], "R");
        assert_eq!(ev["outcome"], "0");
        // Read: the client is the destination, the server the source.
        assert_eq!(codes(&ev["agent"][0]["type"]), ["110152", "110150"]);
        assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "app");
        assert_eq!(ev["agent"][0]["network"]["address"], "192.0.2.7");
        assert_eq!(codes(&ev["agent"][1]["type"]), ["110153"]);
        let user = &ev["agent"][2];
        assert_eq!(user["requestor"], true);
        assert_eq!(
            user["who"]["identifier"]["system"],
            "https://idp.example.org"
        );
        assert_eq!(user["who"]["identifier"]["value"], "u1");
        assert_eq!(user["policy"][0], "urn:fhirwall:token-sha256:ff00");
        assert_eq!(ev["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(ev["entity"][0]["role"]["code"], "1");
        assert_eq!(ev["entity"][1]["what"]["reference"], "Observation/o1");
        assert_eq!(ev["entity"][1]["role"]["code"], "4");
        assert_eq!(ev["entity"][2]["type"]["code"], "XrequestId");
        // The id the upstream got (fhirwall's, the record's), not the
        // request id a client may have chosen.
        assert_eq!(ev["entity"][2]["what"]["identifier"]["value"], "abc");
        let detail_types = |ev: &Value| -> Vec<String> {
            ev["entity"][2]["detail"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["type"].as_str().unwrap().to_string())
                .collect()
        };
        assert!(!detail_types(&ev).contains(&"client_request_id".to_string()));
        assert!(ev.get("purposeOfEvent").is_none());
        // A client-chosen request id is a detail of its own.
        let theirs = Record {
            request_id_from_client: true,
            ..r.clone()
        };
        let ev = audit_event(&theirs, &site());
        assert!(detail_types(&ev).contains(&"client_request_id".to_string()));
        assert!(ev.to_string().contains(r#""valueString":"req-1""#), "{ev}");
        assert_eq!(ev["entity"][2]["what"]["identifier"]["value"], "abc");
        // A decision record names the id its request went upstream with.
        let decided = Record {
            id: "abc-d".into(),
            event: Event::Decision,
            ..r.clone()
        };
        let ev = audit_event(&decided, &site());
        let xid = ev["entity"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"]["code"] == "XrequestId")
            .unwrap()
            .clone();
        assert_eq!(xid["what"]["identifier"]["value"], "abc");
    }

    #[test]
    fn a_denied_search_claims_no_profile_and_keeps_no_query_values() {
        let names = vec!["code".to_string(), "patient".to_string()];
        let r = Record {
            id: "x".into(),
            request_id: "req-2",
            method: "GET",
            path: "/fhir/Condition",
            query_params: &names,
            sub: Some("u1"),
            patient: Some("p1"),
            interaction: Some("search-type"),
            resource_type: Some("Condition"),
            decision: "deny",
            reason: "insufficient_scope",
            stage: "decide",
            status: Some(403),
            break_glass_reason: Some("code blue"),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert!(ev.get("meta").is_none(), "no BALP profile for a failure");
        // A denial is a Security Alert, a serious failure (BALP).
        assert_eq!(ev["outcome"], "8");
        assert_eq!(ev["type"]["code"], "110113");
        assert_eq!(
            ev["type"]["system"],
            "http://dicom.nema.org/resources/ontology/DCM"
        );
        assert_eq!(ev["action"], "E");
        assert_eq!(codes(&ev["agent"][0]["type"]), ["110153", "110150"]);
        // Nothing was granted under a patient/ scope: the launch patient
        // is a detail, not whose data this was.
        let entities = ev["entity"].as_array().unwrap();
        assert!(
            entities.iter().all(|e| e["role"]["code"] != "1"),
            "{entities:?}"
        );
        let launch = ev["entity"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["detail"].as_array().cloned().unwrap_or_default())
            .find(|d| d["type"] == "launch_patient")
            .expect("the launch patient kept as a detail");
        assert_eq!(launch["valueString"], "Patient/p1");
        let q = ev["entity"][0]["query"].as_str().unwrap();
        let q = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(q).unwrap())
            .unwrap();
        assert_eq!(
            q,
            "GET https://gw.example.org/fhir/Condition?code=<redacted>&patient=<redacted>"
        );
        assert_eq!(ev["entity"][0]["role"]["code"], "24");
        assert_eq!(ev["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
        assert_eq!(
            ev["agent"][2]["purposeOfUse"][0]["coding"][0]["code"],
            "BTG"
        );
        assert_eq!(codes(&ev["agent"][2]["type"])[0], "IRCP");
    }

    #[test]
    fn outcomes_follow_decision_and_status() {
        let mut r = Record {
            decision: "allow",
            status: Some(200),
            ..Record::default()
        };
        assert_eq!(outcome(&r), "0");
        r.status = Some(404);
        assert_eq!(outcome(&r), "4");
        r.decision = "error";
        r.status = Some(504);
        assert_eq!(outcome(&r), "8");
        r.decision = "deny";
        r.status = Some(401);
        r.reason = "token_expired";
        assert_eq!(outcome(&r), "8");
        // Refused for its form, not its access: a minor failure.
        for reason in [
            "fhir_malformed",
            "rate_limited",
            "body_too_large",
            "not_found",
            "dpop_nonce_required",
        ] {
            r.reason = reason;
            assert_eq!(outcome(&r), "4", "{reason}");
            assert_eq!(audit_event(&r, &site())["type"]["code"], "rest", "{reason}");
        }
    }

    #[test]
    fn a_decision_record_claims_no_outcome() {
        let r = Record {
            event: Event::Decision,
            sub: Some("u1"),
            interaction: Some("read"),
            resource_type: Some("Observation"),
            resource_id: Some("o1"),
            decision: "allow",
            reason: "allowed",
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert!(ev.get("outcome").is_none(), "{ev}");
        assert!(ev.get("meta").is_none(), "{ev}");
        assert!(ev["outcomeDesc"].as_str().unwrap().contains("authorised"));
        // Its request record has one.
        let ev = audit_event(
            &Record {
                event: Event::Request,
                status: Some(200),
                ..r
            },
            &site(),
        );
        assert_eq!(ev["outcome"], "0");
    }

    #[test]
    fn a_token_without_a_user_is_traced_by_its_hash_on_the_client() {
        let r = Record {
            decision: "deny",
            reason: "token_bad_signature",
            status: Some(401),
            token_sha256: Some("ab12".into()),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert_eq!(ev["agent"][0]["requestor"], true);
        assert_eq!(
            ev["agent"][0]["policy"][0],
            "urn:fhirwall:token-sha256:ab12"
        );
        // With a user, it is the user's.
        let r = Record {
            sub: Some("u1"),
            ..r
        };
        let ev = audit_event(&r, &site());
        assert!(ev["agent"][0].get("policy").is_none());
        assert_eq!(
            ev["agent"][2]["policy"][0],
            "urn:fhirwall:token-sha256:ab12"
        );
    }

    #[test]
    fn a_delete_uses_balp_delete_roles_and_author() {
        let r = Record {
            sub: Some("u"),
            interaction: Some("delete"),
            resource_type: Some("Observation"),
            resource_id: Some("o1"),
            decision: "allow",
            status: Some(204),
            ..Record::default()
        };
        let ev = audit_event(&r, &site());
        assert_eq!(ev["action"], "D");
        assert_eq!(codes(&ev["agent"][0]["type"]), ["110150"]);
        assert_eq!(codes(&ev["agent"][1]["type"]), ["custodian"]);
        assert_eq!(codes(&ev["agent"][2]["type"])[0], "AUT");
        assert_eq!(
            ev["meta"]["profile"][0],
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.Delete"
        );
    }
}
