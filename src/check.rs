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

use serde_json::value::RawValue;
use serde_json::Value;

use crate::decide::{EntryCheck, ResponseCheck, WriteCheck};
use crate::fhir::classify::{FhirRequest, Interaction};
use crate::fhir::compartment::{in_compartment, references_other_patient, Bases, SharedResources};
use crate::fhir::entry_sieve::Sift;
use crate::fhir::json_edit::{self, JsonEdit};
use crate::fhir::search_param::Filter;

/// What to do with the upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the answer on unchanged.
    Pass,
    /// Answer 404 as if the resource did not exist; `why` is for the audit.
    Hide { why: &'static str },
    /// Answer 502: the upstream's answer could not be judged, or the
    /// upstream did not honour the narrowing.
    Unverifiable { why: String },
    /// Answer 403: the answer reaches beyond the grant (e.g. an included
    /// resource outside the compartment).
    Refuse { why: String },
    /// Answer 403: a policy rule (`file#rule`) refuses what the answer
    /// holds.
    PolicyRefuse { rule: String, why: String },
    /// Pass the searchset on without these entries (by index): resources
    /// it includes (`search.mode: include`) that are outside the grant.
    /// Left out as if they did not exist: refusing the whole answer would
    /// tell that they do.
    Trim { entries: Vec<usize> },
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
    let (patient, filters) = match check {
        ResponseCheck::Resource { patient, filters } => (patient.as_deref(), filters.as_deref()),
        ResponseCheck::Search { .. } => {
            let grant = Grant::of(check).expect("a search's check");
            return judge_search(&grant, status, content_type, body, bases);
        }
        ResponseCheck::Everything { patient } => {
            return judge_everything(patient, status, content_type, body, bases)
        }
    };
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
    let doc = match parse(content_type, body) {
        Ok(doc) => doc,
        Err(v) => return v,
    };
    let rtype = req.resource_type.as_deref().unwrap_or("");
    let id = req.id.as_deref().unwrap_or("");
    let is_asked = |r: &Value| {
        r.get("resourceType").and_then(Value::as_str) == Some(rtype)
            && r.get("id").and_then(Value::as_str) == Some(id)
    };
    // Why a resource is outside the grant, if it is.
    let outside = |r: &Value| outside_grant(r, patient, filters, bases);
    match req.interaction {
        Interaction::Read | Interaction::Vread => {
            if !is_asked(&doc) {
                Verdict::Unverifiable {
                    why: format!("upstream answer is not {rtype}/{id}"),
                }
            } else {
                match outside(&doc) {
                    None => Verdict::Pass,
                    Some(why) => Verdict::Hide { why },
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
            if resources.is_empty() {
                return Verdict::Hide {
                    why: "outside_compartment",
                };
            }
            match resources.iter().find_map(|r| outside(r)) {
                None => Verdict::Pass,
                Some(why) => Verdict::Hide { why },
            }
        }
        _ => Verdict::Unverifiable {
            why: format!("no answer check for {}", req.interaction),
        },
    }
}

/// What a checked answer may hold.
struct Grant<'a> {
    patient: Option<&'a str>,
    types: Option<&'a [String]>,
    filters: Option<&'a [Filter]>,
    /// Types passed whoever's they are (see `ResponseCheck::Search`).
    open_types: &'a [String],
    /// Types refused whatever grants them, with the rule.
    refused_types: &'a [crate::policy::RefusedType],
}

impl<'a> Grant<'a> {
    /// What a search's check lets its answer hold.
    fn of(check: &'a ResponseCheck) -> Option<Grant<'a>> {
        let ResponseCheck::Search {
            patient,
            types,
            filters,
            open_types,
            refused_types,
        } = check
        else {
            return None;
        };
        Some(Grant {
            patient: patient.as_deref(),
            types: types.as_deref(),
            filters: filters.as_deref(),
            open_types,
            refused_types,
        })
    }
}

/// Why `r` is outside the compartment of `patient` (when set), or also in
/// another patient's where such resources are left out
/// (`shared_with_other_patient`), or matches none of `filters` (when
/// set); `None` when it is inside.
fn outside_grant(
    r: &Value,
    patient: Option<&str>,
    filters: Option<&[Filter]>,
    bases: &Bases,
) -> Option<&'static str> {
    if let Some(p) = patient {
        if !in_compartment(r, p, bases) {
            return Some("outside_compartment");
        }
        if shared_left_out(r, p, bases) {
            return Some(SHARED);
        }
    }
    if filters.is_some_and(|fs| !fs.iter().any(|f| f.matches(r))) {
        return Some("outside_scope_filter");
    }
    None
}

/// The reason a resource also in another patient's compartment is left
/// out for.
const SHARED: &str = "shared_with_other_patient";

/// Whether `r`, in the compartment of `patient`, is left out as also in
/// another patient's (`patient_context.shared_resources: leave_out`).
fn shared_left_out(r: &Value, patient: &str, bases: &Bases) -> bool {
    bases.shared == SharedResources::LeaveOut
        && crate::fhir::compartment::names_other_patient(r, patient, bases)
}

/// Judges the body of a write under `patient/` scopes (create, update,
/// patch of `req`'s type and id): the resource as it would be stored must
/// be in the compartment of `Patient/{patient}`. Returns why not, or the
/// resources it references that must be looked up ([`to_prove`]).
pub fn judge_write_body(
    req: &FhirRequest,
    content_type: Option<&str>,
    body: &[u8],
    w: &WriteCheck,
    bases: &Bases,
) -> Result<Vec<(String, String)>, String> {
    let patient = w.patient.as_deref().unwrap_or("");
    let media = crate::fhir::classify::media_type(content_type);
    let rtype = req.resource_type.as_deref().unwrap_or("");
    if req.interaction == Interaction::Patch {
        if w.filters.is_some() {
            return Err(
                "a PATCH under a scope with a query filter cannot be proved to keep matching it"
                    .into(),
            );
        }
        if media != "application/json-patch+json" {
            return Err(format!(
                "under patient/ scopes only JSON Patch (application/json-patch+json) is accepted, not '{media}'"
            ));
        }
        let ops = match crate::fhir::strict_json::parse(body) {
            Ok(Value::Array(ops)) => ops,
            Ok(_) => return Err("the JSON Patch is not a JSON array of operations".into()),
            Err(e) => return Err(format!("the JSON Patch is not JSON fhirwall can read: {e}")),
        };
        no_conditional_reference(&Value::Array(ops.clone()), true, rtype, patient)?;
        // Paths the patch may not touch: identity, every element that
        // links the resource to a patient, and the contained resources
        // such a link may point at (`#id`: a contained Patient holding
        // another's identifier is refused in a written body too).
        let mut guarded: Vec<&str> = vec!["resourceType", "id", "contained"];
        if rtype == "Patient" {
            guarded.push("link");
        }
        for p in crate::fhir::compartment::link_params(rtype) {
            guarded.extend(p.paths.iter().map(|p| p.split('.').next().unwrap_or(p)));
        }
        for op in &ops {
            for key in ["path", "from"] {
                let Some(path) = op.get(key) else { continue };
                let path = path.as_str().ok_or("a JSON Patch path is not a string")?;
                let head = path.strip_prefix('/').unwrap_or("");
                let head = head
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .replace("~1", "/")
                    .replace("~0", "~");
                if head.is_empty() || guarded.contains(&head.as_str()) {
                    return Err(format!(
                        "the patch touches '{path}', which decides whether the resource is in the \
                         compartment of Patient/{patient}"
                    ));
                }
            }
        }
        return to_prove(&Value::Array(ops), w, bases);
    }
    if media != "application/fhir+json" && media != "application/json" {
        return Err(format!(
            "under patient/ scopes the resource must be sent as FHIR JSON, not '{media}'"
        ));
    }
    let doc = crate::fhir::strict_json::parse(body)
        .map_err(|e| format!("the request body is not JSON fhirwall can read: {e}"))?;
    if doc.get("resourceType").and_then(Value::as_str) != Some(rtype) {
        return Err(format!("the request body is not a {rtype}"));
    }
    if req.interaction == Interaction::Update
        && doc.get("id").and_then(Value::as_str) != req.id.as_deref()
    {
        return Err(format!(
            "the resource's id does not match {rtype}/{}",
            req.id.as_deref().unwrap_or("")
        ));
    }
    if w.patient.is_some() {
        no_conditional_reference(&doc, false, rtype, patient)?;
    }
    match outside_grant(&doc, w.patient.as_deref(), w.filters.as_deref(), bases) {
        Some(SHARED) | None
            if w.patient.is_some() && references_other_patient(&doc, patient, bases) =>
        {
            Err(format!(
                "the {rtype} would also reference another patient (or one by identifier \
                 alone) on a compartment element; under the scopes of Patient/{patient} it may \
                 reference no other patient there"
            ))
        }
        None => to_prove(&doc, w, bases),
        Some("outside_compartment") => Err(format!(
            "the {rtype} would be outside the compartment of Patient/{patient}"
        )),
        Some(_) => Err(format!(
            "the {rtype} would match none of the token's scope filters"
        )),
    }
}

/// Under the scopes of a patient, the resources a written `doc` (or a JSON
/// Patch) references that must be looked up before the write goes
/// ([`references_to_prove`](crate::fhir::compartment::references_to_prove));
/// refused when it references another Patient. None otherwise.
fn to_prove(doc: &Value, w: &WriteCheck, bases: &Bases) -> Result<Vec<(String, String)>, String> {
    let Some(patient) = w.patient.as_deref() else {
        return Ok(Vec::new());
    };
    crate::fhir::compartment::references_to_prove(doc, patient, bases).map_err(|r| {
        format!(
            "the written resource references another patient ({}); under the scopes of \
             Patient/{patient} it may reference no other",
            r.chars().take(80).collect::<String>()
        )
    })
}

/// Refuses a written resource (or a `patch`) that holds a conditional
/// reference: the server would resolve it by a search fhirwall cannot
/// confine to the patient's compartment.
fn no_conditional_reference(
    doc: &Value,
    patch: bool,
    rtype: &str,
    patient: &str,
) -> Result<(), String> {
    let found = crate::fhir::classify::written_references(doc, patch).map_err(|e| e.to_string())?;
    match found.first() {
        None => Ok(()),
        Some(r) => Err(format!(
            "the {rtype} {} a conditional reference (a search of {}), which the server would \
             resolve by a search fhirwall cannot confine to Patient/{patient}",
            if patch { "patch sets" } else { "holds" },
            r.resource_type.as_deref().unwrap_or("any type")
        )),
    }
}

/// The answer as JSON, or the verdict for an answer that is not.
fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Value, Verdict> {
    let media = crate::fhir::classify::media_type(content_type);
    if !matches!(media.as_str(), "application/fhir+json" | "application/json") {
        return Err(Verdict::Unverifiable {
            why: format!(
                "upstream answer is {}, not FHIR JSON",
                content_type.unwrap_or("untyped")
            ),
        });
    }
    // Strictly: with a key repeated, what is judged (the last) and what a
    // client reads (maybe the first) could differ, and the answer passes
    // on as written.
    crate::fhir::strict_json::parse(body).map_err(|e| Verdict::Unverifiable {
        why: format!("upstream answer is not valid JSON, or repeats a key: {e}"),
    })
}

/// A search answer: every resource in the searchset must be in the
/// compartment. A match outside means the upstream ignored the narrowing
/// (502); an include outside means the request reached beyond the grant
/// (403). Error answers pass only as an `OperationOutcome`.
fn judge_search(
    grant: &Grant,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    bases: &Bases,
) -> Verdict {
    if status >= 500 {
        return Verdict::Unverifiable {
            why: format!("upstream answered {status}"),
        };
    }
    let doc = match parse(content_type, body) {
        Ok(doc) => doc,
        Err(v) => return v,
    };
    let rtype = doc.get("resourceType").and_then(Value::as_str);
    if status != 200 {
        return if rtype == Some("OperationOutcome") {
            Verdict::Pass
        } else {
            Verdict::Unverifiable {
                why: format!("upstream answered {status} without an OperationOutcome"),
            }
        };
    }
    if rtype != Some("Bundle") || doc.get("type").and_then(Value::as_str) != Some("searchset") {
        return Verdict::Unverifiable {
            why: "upstream answer to a search is not a searchset Bundle".into(),
        };
    }
    // Shapes a lenient client would read as entries (one object for the
    // array, an array for the resource) cannot be judged.
    let entries = match doc.get("entry") {
        None => None,
        Some(Value::Array(a)) => Some(a),
        Some(_) => {
            return Verdict::Unverifiable {
                why: "upstream searchset's entry is not an array".into(),
            }
        }
    };
    let mut trimmed = Vec::new();
    for (i, e) in entries.into_iter().flatten().enumerate() {
        match judge_search_entry(grant, e, bases) {
            EntryJudgement::Keep => {}
            EntryJudgement::Trim => trimmed.push(i),
            EntryJudgement::Fail(v) => return v,
        }
    }
    if trimmed.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Trim { entries: trimmed }
    }
}

/// The verdict on one entry of a batch or transaction answer, checked by
/// `check` as the answer to `entry_req`.
fn judge_entry(
    check: &ResponseCheck,
    entry_req: &FhirRequest,
    entry: &Value,
    bases: &Bases,
) -> Verdict {
    let code = entry
        .pointer("/response/status")
        .and_then(Value::as_str)
        .and_then(status_code)
        .unwrap_or(0);
    let resource = entry
        .get("resource")
        .or_else(|| entry.pointer("/response/outcome"))
        .map(|r| r.to_string())
        .unwrap_or_default();
    judge(
        check,
        entry_req,
        code,
        Some("application/fhir+json"),
        resource.as_bytes(),
        bases,
    )
}

/// The entry written in place of one the verdict does not pass.
fn refused_entry(verdict: Verdict) -> Value {
    let (status, issue, text) = match verdict {
        Verdict::Pass | Verdict::Trim { .. } => (
            "502 Bad Gateway",
            "exception",
            "the upstream answered a search entry with a Bundle in place of its outcome"
                .to_string(),
        ),
        Verdict::Hide { .. } => ("404 Not Found", "not-found", "not_found".to_string()),
        Verdict::Refuse { why } | Verdict::PolicyRefuse { why, .. } => {
            ("403 Forbidden", "forbidden", why)
        }
        Verdict::Unverifiable { why } => ("502 Bad Gateway", "exception", why),
    };
    serde_json::json!({
        "response": {
            "status": status,
            "outcome": {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": issue, "diagnostics": format!("fhirwall: {text}")}]
            }
        }
    })
}

/// What becomes of one entry (index `index`, its text, or `None` when
/// too large to hold) of a batch or transaction answer read entry by entry
/// ([`crate::fhir::entry_sieve`]): one its check does not pass is replaced
/// as [`judge_bundle_answer`] would; one too large to hold is answered as
/// if absent when it is a read by id (another patient's of that size
/// would be), else as an entry that could not be checked. Anything else is
/// kept, to be judged with the whole answer.
pub fn bundle_entry_sift(
    checks: &[EntryCheck],
    req: &FhirRequest,
    index: usize,
    entry: Option<&[u8]>,
    bases: &Bases,
) -> Sift {
    let check = checks.iter().find(|c| c.index == index);
    let replace = |v: Verdict| Sift::Replace(refused_entry(v).to_string().into_bytes());
    let Some(entry) = entry else {
        return match check.map(|c| &c.check) {
            Some(ResponseCheck::Resource { .. }) => replace(Verdict::Hide {
                why: "upstream_answer_too_large",
            }),
            Some(_) => replace(Verdict::Unverifiable {
                why: "the upstream's answer to this entry is larger than fhirwall reads to \
                      check it"
                    .into(),
            }),
            // Not checked (a write's answer): no refusal may stand in for
            // what was done; the answer fails whole, as too large.
            None => Sift::Fail,
        };
    };
    let (Some(c), Some(entry_req)) = (check, req.entries.get(index)) else {
        return Sift::Keep;
    };
    let Ok(entry) = serde_json::from_slice::<Value>(entry) else {
        return Sift::Keep;
    };
    match judge_entry(&c.check, entry_req, &entry, bases) {
        Verdict::Pass => Sift::Keep,
        Verdict::Trim { .. } if entry.get("resource").is_some() => Sift::Keep,
        v => replace(v),
    }
}

/// The status of one Bundle entry's `response` (its JSON text).
pub fn response_status(entry: &[u8]) -> Option<u16> {
    let entry: Value = serde_json::from_slice(entry).ok()?;
    entry
        .pointer("/response/status")
        .and_then(Value::as_str)
        .and_then(status_code)
}

/// Whether a search's answer holds its matches only: the request names no
/// `_include`/`_revinclude` and is no stored search's page (which brings
/// its search's includes, whatever they were). Its matches are narrowed
/// to what the caller may see, so what becomes of them may be told.
pub fn brings_only_matches(req: &FhirRequest) -> bool {
    !crate::decide::is_stored_page(req)
        && !req.params.iter().any(|(n, _)| {
            let base = n.split(':').next().unwrap_or("");
            matches!(
                base,
                "_include" | "_revinclude" | "_getpages" | "_getpagesoffset" | "_pageId"
            )
        })
}

/// A searchset (its text) with a warning entry at the end of its
/// entries (`search.mode: outcome`, an OperationOutcome with issue
/// `incomplete`): `left_out` matches were too large to check and are not
/// in it (its only entry when none is left). `None` if it is not a
/// Bundle whose `entry`, when it has one, is an array.
pub fn with_left_out_warning(body: &[u8], left_out: usize) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let top = json_edit::parse(text)?;
    let Some(array) = top.get("entry") else {
        // Every entry left out (and with them the array): the warning
        // alone.
        let mut doc: Value = serde_json::from_slice(body).ok()?;
        let warning = left_out_warning(left_out);
        doc.as_object_mut()?
            .insert("entry".into(), Value::Array(vec![warning]));
        return Some(doc.to_string().into_bytes());
    };
    let mut entries: Vec<String> = json_edit::elements(array)?
        .iter()
        .map(|e| e.get().to_string())
        .collect();
    entries.push(left_out_warning(left_out).to_string());
    let mut edit = JsonEdit::new(text);
    edit.replace(array, format!("[{}]", entries.join(",")))?;
    edit.finish().map(String::into_bytes)
}

/// The warning entry [`with_left_out_warning`] adds.
fn left_out_warning(left_out: usize) -> Value {
    serde_json::json!({
        "search": {"mode": "outcome"},
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "warning",
                "code": "incomplete",
                "diagnostics": format!(
                    "fhirwall: {left_out} of this page's entries were left out: each is larger \
                     than what upstream.max_checked_answer_bytes leaves once the page's other \
                     entries are kept, too large for fhirwall to check it; ask for smaller pages \
                     (_count)"
                )
            }]
        }
    })
}

/// Whether one entry (its JSON text) of the answer to a search checked by
/// `check` is kept while the answer is read entry by entry
/// ([`crate::fhir::entry_sieve`]): not when it is an included resource
/// outside the grant, which [`judge`] would leave out too. Anything else
/// is kept, to be judged with the whole answer (an entry that does not
/// parse, or fails the answer, included). One too large to hold is let go
/// unjudged: it could be anyone's (but see [`with_left_out_warning`]).
pub fn search_entry_sift(check: &ResponseCheck, entry: Option<&[u8]>, bases: &Bases) -> Sift {
    // Too large to hold: it could be anyone's.
    let Some(entry) = entry else {
        return Sift::Drop;
    };
    let (Some(grant), Ok(e)) = (Grant::of(check), serde_json::from_slice::<Value>(entry)) else {
        return Sift::Keep;
    };
    match judge_search_entry(&grant, &e, bases) {
        EntryJudgement::Trim => Sift::Drop,
        _ => Sift::Keep,
    }
}

/// An instance history's Bundle without its paging links (all but
/// `self`), or `None` when it has none. Under a checked grant a later page
/// could not be judged as the history (its resource's current version
/// fetched): a server serves a stored page whatever it is called, and
/// called a searchset it would be judged as one. Without the link, the
/// page's id is never known to the caller.
pub fn without_paging_links(body: &[u8]) -> Option<Vec<u8>> {
    // Edited in place: the rest (numbers as written) stays byte for byte.
    let text = std::str::from_utf8(body).ok()?;
    let top = json_edit::parse(text)?;
    let array = top.get("link")?;
    let links = json_edit::elements(array)?;
    let kept: Vec<&str> = links
        .iter()
        .filter(|l| {
            json_edit::member(l, "relation")
                .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
                .as_deref()
                == Some("self")
        })
        .map(|l| l.get())
        .collect();
    if kept.len() == links.len() {
        return None;
    }
    let mut edit = JsonEdit::new(text);
    edit.replace(array, format!("[{}]", kept.join(",")))?;
    edit.finish().map(String::into_bytes)
}

/// A searchset as [`without_entries`] writes it (its entries joined by
/// `,`, without the upstream's spacing between them), whether or not any
/// were left out: passed on as the upstream spaced it, an answer from
/// which nothing was left out would look unlike one trimmed, and tell
/// that a resource outside the grant is there. The body as it is when it
/// has no entries to rewrite.
pub fn entries_written_one_way(body: &[u8]) -> Vec<u8> {
    without_entries(body, &[]).unwrap_or_else(|| body.to_vec())
}

/// How one entry of a searchset answer stands.
enum EntryJudgement {
    Keep,
    /// An included resource outside the grant: left out.
    Trim,
    /// The whole answer fails.
    Fail(Verdict),
}

fn judge_search_entry(grant: &Grant, e: &Value, bases: &Bases) -> EntryJudgement {
    // An entry without a resource is nothing a searchset holds, and its
    // fullUrl and response would pass unjudged.
    let Some(r) = e.get("resource") else {
        return EntryJudgement::Fail(Verdict::Unverifiable {
            why: "upstream searchset holds an entry without a resource".into(),
        });
    };
    if !r.is_object() {
        return EntryJudgement::Fail(Verdict::Unverifiable {
            why: "upstream searchset holds an entry whose resource is not an object".into(),
        });
    }
    let mode = e.pointer("/search/mode").and_then(Value::as_str);
    let outcome = r.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome");
    if outcome && mode == Some("outcome") {
        return EntryJudgement::Keep;
    }
    let what = r
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("a resource");
    if let Some(r) = grant.refused_types.iter().find(|r| r.resource_type == what) {
        return EntryJudgement::Fail(Verdict::PolicyRefuse {
            rule: r.rule.clone(),
            why: format!("the answer would hold {what} resources: {}", r.reason),
        });
    }
    if !grant.refused_types.is_empty() && !crate::fhir::resource_types::is_resource_type(what) {
        let r = &grant.refused_types[0];
        return EntryJudgement::Fail(Verdict::PolicyRefuse {
            rule: r.rule.clone(),
            why: format!(
                "the answer would hold {what} resources, which policy rules were not judged \
                 for (they refuse some types here: {}, …)",
                r.resource_type
            ),
        });
    }
    if grant.open_types.iter().any(|t| t == what) {
        return EntryJudgement::Keep;
    }
    if grant.types.is_some_and(|t| !t.iter().any(|t| t == what)) {
        // An included resource of a type the scopes do not grant is left
        // out as one outside the compartment is (a refusal would tell
        // that it exists).
        if mode == Some("include") {
            return EntryJudgement::Trim;
        }
        return EntryJudgement::Fail(Verdict::Refuse {
            why: format!(
                "the answer would hold {what} resources, which the token's scopes do not grant"
            ),
        });
    }
    // A scope filter is on its type: it judges resources of that type,
    // whatever their label (the upstream's `search.mode` is no proof one
    // is not a match), and no other (includes; a stored page's other
    // types, which scopes without a filter grant).
    let filtered_type = grant
        .filters
        .is_some_and(|fs| fs.iter().any(|f| f.resource_type == what));
    let filters = if filtered_type { grant.filters } else { None };
    let Some(why) = outside_grant(r, grant.patient, filters, bases) else {
        return EntryJudgement::Keep;
    };
    // Also another patient's: left out, as if absent, match or not (a
    // narrowed search rightly finds it).
    if mode == Some("include") || why == SHARED {
        return EntryJudgement::Trim;
    }
    let inside_what = match why {
        "outside_compartment" => format!(
            "outside the compartment of Patient/{}",
            grant.patient.unwrap_or("")
        ),
        _ => "that match none of the token's scope filters".to_string(),
    };
    EntryJudgement::Fail(Verdict::Unverifiable {
        why: format!(
            "the upstream's search answer holds {what} resources {inside_what} \
             (did it ignore a narrowing parameter?)"
        ),
    })
}

/// A Bundle's text without the entries at `drop` (indexes), everything
/// else byte for byte — but its `total` when a dropped entry is no
/// include (a match left out as if absent, which the total would count),
/// and its `entry` when none is left (an empty array, which no server
/// writes, would tell); `None` if it is not a Bundle with those entries.
pub fn without_entries(body: &[u8], drop: &[usize]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let top = json_edit::parse(text)?;
    let array = top.get("entry")?;
    let entries = json_edit::elements(array)?;
    if drop.iter().any(|i| *i >= entries.len()) {
        return None;
    }
    let kept: Vec<&str> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(_, e)| e.get())
        .collect();
    let match_dropped = drop.iter().any(|i| {
        let mode =
            json_edit::member(entries[*i], "search").and_then(|s| json_edit::member(s, "mode"));
        mode.and_then(|m| serde_json::from_str::<String>(m.get()).ok())
            .as_deref()
            != Some("include")
    });
    let spliced = || {
        let mut edit = JsonEdit::new(text);
        // No entry left: none at all, as a server writes a page without
        // matches (an empty array would tell that some were left out).
        if kept.is_empty() {
            edit.remove_member("entry", array)?;
        } else {
            edit.replace(array, format!("[{}]", kept.join(",")))?;
        }
        edit.finish().map(String::into_bytes)
    };
    let out = spliced().or_else(|| {
        // An `entry` key the text spells with escapes: from the tree.
        let mut doc: Value = serde_json::from_slice(body).ok()?;
        let obj = doc.as_object_mut()?;
        let list = obj.get_mut("entry")?.as_array_mut()?;
        drop_at(list, drop);
        if list.is_empty() {
            obj.remove("entry");
        }
        Some(doc.to_string().into_bytes())
    })?;
    // The total, in a second pass over what is left: removed with the
    // entries in one, side by side at the start, the two edits would
    // overlap (and the page, rewritten from the tree, tell).
    Some(match match_dropped {
        true => without_total(&out).unwrap_or(out),
        false => out,
    })
}

/// Removes the elements of `list` at the indexes `drop`.
fn drop_at(list: &mut Vec<Value>, drop: &[usize]) {
    let mut at = 0;
    list.retain(|_| {
        at += 1;
        !drop.contains(&(at - 1))
    });
}

/// The batch/transaction body with each checked entry's `request.url`
/// narrowed by its parameters; `None` when the body is not a Bundle.
pub fn narrow_bundle(body: &[u8], checks: &[EntryCheck]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let entries = json_edit::bundle_entries(text)?;
    let mut edit = JsonEdit::new(text);
    for c in checks.iter().filter(|c| !c.narrow.is_empty()) {
        let request = json_edit::member(entries.get(c.index)?, "request")?;
        let url = json_edit::member(request, "url")?;
        let u: String = serde_json::from_str(url.get()).ok()?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (n, v) in &c.narrow {
            q.append_pair(n, v);
        }
        // The narrowing first, as in a request's own query.
        let u = match u.split_once('?') {
            Some((path, rest)) if !rest.is_empty() => format!("{path}?{}&{rest}", q.finish()),
            Some((path, _)) => format!("{path}?{}", q.finish()),
            None => format!("{u}?{}", q.finish()),
        };
        edit.replace(url, json_edit::string(&u))?;
    }
    edit.finish().map(String::into_bytes)
}

/// Whether a Bundle's ids keep what its `checked` entries (writes proved
/// in a compartment or a filter) were proved to reference. The upstream
/// gives each entry the id its `fullUrl` names (else a POSTed resource's
/// own `id`), maps it to the id the entry ends up with (a conditional
/// create's match, a conditional update's target), and rewrites every
/// reference to it in the whole Bundle (HAPI's transaction processor).
/// So an entry creating `Patient?identifier=<p2's MRN>` with `fullUrl:
/// Patient/p1` would turn a checked entry's `Patient/p1` into `Patient/p2`.
/// Hence, beside checked entries: a `fullUrl` is a `urn:uuid:`/`urn:oid:`
/// placeholder, or names the very resource its entry's request names
/// (`PUT Patient/p1` with `…/Patient/p1`); no two entries share one;
/// without a placeholder, a resource's own `id` is the one its request
/// names; and a checked entry names another entry's placeholder only when
/// that entry is checked too.
pub fn bundle_ids_hold(doc: &Value, checked: &[usize]) -> Result<(), String> {
    let Some(entries) = doc.get("entry").and_then(Value::as_array) else {
        return Ok(());
    };
    let mut placeholders: Vec<(&str, usize)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let request = entry.get("request");
        let field = |name: &str| request.and_then(|r| r.get(name)).and_then(Value::as_str);
        let (method, url) = (field("method").unwrap_or(""), field("url").unwrap_or(""));
        let full = match entry.get("fullUrl") {
            None | Some(Value::Null) => None,
            Some(Value::String(f)) => Some(f.as_str()),
            Some(_) => return Err(format!("entry {i}'s fullUrl is not a string")),
        };
        // The id of a `Type/id` request (no query): the entry ends as the
        // resource it names, so references to that name keep their meaning.
        let url_id = url
            .split_once('/')
            .filter(|(t, id)| {
                !url.contains('?') && !t.is_empty() && !id.is_empty() && !id.contains('/')
            })
            .map(|(_, id)| id);
        if let Some(f) = full {
            if seen.contains(&f) {
                return Err(format!("two entries have the fullUrl {f}"));
            }
            seen.push(f);
            if f.starts_with("urn:uuid:") || f.starts_with("urn:oid:") {
                placeholders.push((f, i));
                continue;
            }
            let names_it = f == url || f.ends_with(&format!("/{url}"));
            if !(url_id.is_some() && names_it) {
                return Err(format!(
                    "entry {i}'s fullUrl ({f}) is neither a urn:uuid: placeholder nor the \
                     resource its request names ({method} {url}): the upstream would put \
                     what the entry ends up as in place of every reference to it"
                ));
            }
        }
        // Without a placeholder the upstream names the entry by its
        // resource's own id too: it must be the one its request names (a
        // conditional update or a create has none to give).
        if let Some(id) = entry.pointer("/resource/id").filter(|v| !v.is_null()) {
            let named =
                !method.eq_ignore_ascii_case("POST") && url_id.is_some() && id.as_str() == url_id;
            if !named {
                return Err(format!(
                    "entry {i}'s resource has an id of its own ({id}) that its request \
                     ({method} {url}) does not name, and no urn:uuid: fullUrl: the upstream \
                     would put what the entry ends up as in place of every reference to that id"
                ));
            }
        }
    }
    let unconfined: Vec<(&str, usize)> = placeholders
        .into_iter()
        .filter(|(_, j)| !checked.contains(j))
        .collect();
    for &c in checked {
        let Some(resource) = entries.get(c).and_then(|e| e.get("resource")) else {
            continue;
        };
        let mut unchecked = None;
        every_string(resource, &mut |v| {
            if unchecked.is_none() {
                unchecked = unconfined.iter().find(|(p, _)| *p == v).copied();
            }
        });
        if let Some((p, j)) = unchecked {
            return Err(format!(
                "entry {c} references entry {j} ({p}), which these scopes do not confine: \
                 the upstream would put what that entry ends up as in its place"
            ));
        }
    }
    Ok(())
}

fn every_string<'a>(v: &'a Value, f: &mut impl FnMut(&'a str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| every_string(x, f)),
        Value::Object(o) => o.values().for_each(|x| every_string(x, f)),
        _ => {}
    }
}

/// The batch/transaction body with `request.ifMatch` of each entry
/// `(index, entity tag)` set (replacing the client's); `None` when it
/// cannot be edited.
pub fn bundle_with_if_match(body: &[u8], tags: &[(usize, String)]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let entries = json_edit::bundle_entries(text)?;
    let mut edit = JsonEdit::new(text);
    for (i, tag) in tags {
        let request = json_edit::member(entries.get(*i)?, "request")?;
        match json_edit::member(request, "ifMatch") {
            Some(theirs) => edit.replace(theirs, json_edit::string(tag))?,
            None => edit.insert_first(request, "ifMatch", &json_edit::string(tag))?,
        }
    }
    edit.finish().map(String::into_bytes)
}

/// Each entry's status in a batch/transaction response Bundle (the code of
/// its `response.status`, e.g. `201` of "201 Created"); `None` when the
/// body is not such a Bundle of `entries` entries (the answer to the
/// request, entry for entry).
pub fn entry_statuses(body: impl std::io::Read, entries: usize) -> Option<Vec<Option<u16>>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "resourceType")]
        resource_type: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        entry: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        response: Option<Response>,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        status: Option<String>,
    }
    let doc: Doc = serde_json::from_reader(body).ok()?;
    if doc.resource_type.as_deref() != Some("Bundle")
        || !matches!(
            doc.kind.as_deref(),
            Some("batch-response" | "transaction-response")
        )
        || doc.entry.len() != entries
    {
        return None;
    }
    Some(
        doc.entry
            .iter()
            .map(|e| {
                let status = e.response.as_ref()?.status.as_deref()?;
                status_code(status)
            })
            .collect(),
    )
}

/// A body kept as the pieces it came in, read in order (no copy into one
/// buffer).
pub struct Pieces {
    pieces: std::collections::VecDeque<bytes::Bytes>,
}

impl Pieces {
    pub fn new(pieces: Vec<bytes::Bytes>) -> Pieces {
        Pieces {
            pieces: pieces.into(),
        }
    }
}

impl std::io::Read for Pieces {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while let Some(front) = self.pieces.front_mut() {
            if front.is_empty() {
                self.pieces.pop_front();
                continue;
            }
            let n = front.len().min(out.len());
            out[..n].copy_from_slice(&front[..n]);
            bytes::Buf::advance(front, n);
            return Ok(n);
        }
        Ok(0)
    }
}

/// Judges a batch/transaction response entry by entry: each checked entry's
/// answer passes, or is replaced by an entry carrying only its own denial
/// (404 as if absent, 403, or 502) — the other entries are untouched but
/// for a passed search or history, whose links are moved to the public
/// base and unbacked `total` dropped as for one asked alone
/// ([`rewrite_links`]), as are the answer's own links, its entries'
/// `fullUrl`s and `response.location`s. The whole answer is refused (502)
/// when it is not the response Bundle of the request, entry for entry.
#[allow(clippy::too_many_arguments)]
pub fn judge_bundle_answer<B: AsRef<str>>(
    checks: &[EntryCheck],
    writes: &[usize],
    req: &FhirRequest,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    bases: &Bases,
    upstream_bases: &[B],
    public_base: &str,
) -> Result<(Vec<u8>, usize), Verdict> {
    let mut doc = parse(content_type, body)?;
    if status != 200 {
        // The whole Bundle failed: an OperationOutcome holds no entry's data.
        return if doc.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome") {
            Ok((body.to_vec(), 0))
        } else {
            Err(Verdict::Unverifiable {
                why: format!("upstream answered the Bundle with {status} and no OperationOutcome"),
            })
        };
    }
    let want = match req.interaction {
        Interaction::Transaction => "transaction-response",
        _ => "batch-response",
    };
    if doc.get("type").and_then(Value::as_str) != Some(want) {
        return Err(Verdict::Unverifiable {
            why: format!("upstream answer to the Bundle is not a {want}"),
        });
    }
    let Some(entries) = doc.get_mut("entry").and_then(Value::as_array_mut) else {
        return Err(Verdict::Unverifiable {
            why: "upstream answer to the Bundle has no entries".into(),
        });
    };
    if entries.len() != req.entries.len() {
        return Err(Verdict::Unverifiable {
            why: format!(
                "upstream answer to the Bundle has {} entries for {} requested",
                entries.len(),
                req.entries.len()
            ),
        });
    }
    let mut withheld: Vec<(usize, Value)> = Vec::new();
    // Passed entries whose resource is a Bundle (a search's, a history's),
    // with the entries of it to leave out (includes outside the grant).
    // (entry, entries left out, a history, its total to go)
    let mut relinked: Vec<(usize, Vec<usize>, bool, bool)> = Vec::new();
    for c in checks {
        let (Some(entry), Some(entry_req)) = (entries.get_mut(c.index), req.entries.get(c.index))
        else {
            continue;
        };
        match judge_entry(&c.check, entry_req, entry, bases) {
            Verdict::Pass => {
                if entry
                    .pointer("/resource/resourceType")
                    .and_then(Value::as_str)
                    == Some("Bundle")
                {
                    let history = entry_req.interaction == Interaction::HistoryInstance;
                    relinked.push((c.index, Vec::new(), history, counts_hidden(&c.check, bases)));
                }
            }
            // (Only a searchset is trimmed: a Bundle, which must be the
            // entry's resource to be trimmed.)
            Verdict::Trim { entries } if entry.get("resource").is_some() => {
                relinked.push((c.index, entries, false, counts_hidden(&c.check, bases)));
            }
            verdict => {
                *entry = refused_entry(verdict);
                withheld.push((c.index, entry.clone()));
            }
        }
    }
    // Writes under patient/ scopes that failed: their outcome may name
    // other patients' resources.
    for i in writes {
        let Some(entry) = entries.get_mut(*i) else {
            continue;
        };
        let status = entry
            .pointer("/response/status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let code = status_code(&status).unwrap_or(0);
        if let Some(outcome) = withheld_write_outcome(code) {
            *entry = serde_json::json!({"response": {"status": status, "outcome": outcome}});
            withheld.push((*i, entry.clone()));
        }
    }
    // Included resources left out of the entries' searches.
    let left_out = relinked.iter().map(|(_, drop, _, _)| drop.len()).sum();
    // The answer's own links, its entries' `fullUrl`s and where writes
    // went (`response.location`) point through the gateway too.
    let outer = |text: Vec<u8>| rewrite_links(&text, upstream_bases, public_base).unwrap_or(text);
    if withheld.is_empty() && relinked.is_empty() {
        return Ok((outer(body.to_vec()), 0));
    }
    // A passed Bundle, trimmed, its links through the gateway.
    let relink = |resource: &[u8], drop: &[usize], history: bool, no_total: bool| {
        // A search's entries are written one way whether some were left
        // out or not (`without_entries`): the upstream's spacing between
        // them would tell.
        let trimmed = match drop {
            [] if history => without_paging_links(resource),
            [] => without_entries(resource, &[]),
            drop => Some(without_entries(resource, drop)?),
        };
        let trimmed = match trimmed {
            Some(t) if no_total => Some(without_total(&t).unwrap_or(t)),
            None if no_total => without_total(resource),
            t => t,
        };
        let text = trimmed.as_deref().unwrap_or(resource);
        rewrite_links(text, upstream_bases, public_base)
            .or(trimmed)
            .or_else(|| Some(resource.to_vec()))
    };
    // The passed entries as the upstream wrote them; written back from the
    // tree only if the text cannot be edited.
    let spliced = || -> Option<Vec<u8>> {
        let text = std::str::from_utf8(body).ok()?;
        let raw = json_edit::bundle_entries(text)?;
        let mut edit = JsonEdit::new(text);
        for (i, entry) in &withheld {
            edit.replace(raw.get(*i)?, entry.to_string())?;
        }
        for (i, drop, history, no_total) in &relinked {
            let resource = json_edit::member(raw.get(*i)?, "resource")?;
            let new = relink(resource.get().as_bytes(), drop, *history, *no_total)?;
            if new != resource.get().as_bytes() {
                edit.replace(resource, String::from_utf8(new).ok()?)?;
            }
        }
        edit.finish().map(String::into_bytes)
    };
    let text = spliced().unwrap_or_else(|| {
        if let Some(entries) = doc.get_mut("entry").and_then(Value::as_array_mut) {
            for (i, drop, history, no_total) in &relinked {
                let Some(resource) = entries.get_mut(*i).and_then(|e| e.get_mut("resource")) else {
                    continue;
                };
                if let Some(list) = resource.get_mut("entry").and_then(Value::as_array_mut) {
                    drop_at(list, drop);
                }
                if let Some(new) = relink(resource.to_string().as_bytes(), &[], *history, *no_total)
                    .and_then(|n| serde_json::from_slice(&n).ok())
                {
                    *resource = new;
                }
            }
        }
        doc.to_string().into_bytes()
    });
    Ok((outer(text), left_out))
}

/// Whether the answer to a search or `$everything` checked by `check` may
/// count matches left out as if absent in its `total`: resources also in
/// another patient's compartment, left out under a patient's grant
/// (`patient_context.shared_resources: leave_out`) on any page. Its total
/// then goes, on every page.
pub fn counts_hidden(check: &ResponseCheck, bases: &Bases) -> bool {
    bases.shared == SharedResources::LeaveOut
        && matches!(
            check,
            ResponseCheck::Search {
                patient: Some(_),
                ..
            } | ResponseCheck::Everything { .. }
        )
}

/// A Bundle's text without its `total`; `None` when it has none (or is
/// not JSON fhirwall can edit).
pub fn without_total(body: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    // Keys decoded: no total here is none however spelt.
    let top = json_edit::parse(text)?;
    let total = top.get("total")?;
    let mut edit = JsonEdit::new(text);
    if edit.remove_member("total", total).is_some() {
        if let Some(out) = edit.finish() {
            return Some(out.into_bytes());
        }
    }
    // A key the text spells otherwise (`"tot\u0061l"`): from the tree.
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    doc.as_object_mut()?.remove("total")?;
    Some(doc.to_string().into_bytes())
}

/// The code of a Bundle entry's `response.status` (`201` of "201 Created").
fn status_code(status: &str) -> Option<u16> {
    status.split_whitespace().next()?.parse().ok()
}

/// The OperationOutcome that stands for a write's failure answer under
/// `patient/` scopes (409, 412, 5xx), whose details may name other
/// patients' resources (HAPI's 409 to a DELETE names the first resource
/// referencing the deleted one). `None` for other statuses: 400 and 422
/// are the written body's own faults.
pub fn withheld_write_outcome(status: u16) -> Option<Value> {
    if !(status == 409 || status == 412 || status >= 500) {
        return None;
    }
    let code = if status == 409 {
        "conflict"
    } else {
        "exception"
    };
    Some(serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": format!(
            "fhirwall: the upstream refused the write ({status}); its details are withheld \
             under patient/ scopes, since they may name other patients' resources"
        )}]
    }))
}

/// `u` moved from an upstream base ([`Settings::upstream_bases`]) to the
/// public one, if it is under one (the base itself, or followed by `/` or
/// `?`) and not under a public base that is longer ([`moved_from`]).
///
/// [`Settings::upstream_bases`]: crate::config::Settings::upstream_bases
pub fn rewrite_url<B: AsRef<str>>(
    u: &str,
    upstream_bases: &[B],
    public_base: &str,
) -> Option<String> {
    moved_from(u, upstream_bases.iter().map(|b| b.as_ref()), public_base)
}

/// `u` under the longest of `upstream_bases` and `public_base` it is under
/// (the base itself, or followed by `/` or `?`), moved to `public_base` if
/// that is an upstream base. The longest: one base may be a prefix of
/// another (the public origin, for an upstream at `/` that builds its
/// links from the forwarded host, is a prefix of the public base; a public
/// base at `/` is a prefix of that upstream's).
fn moved_from<'b>(
    u: &str,
    upstream_bases: impl Iterator<Item = &'b str>,
    public_base: &str,
) -> Option<String> {
    let below = |base: &str| {
        u.strip_prefix(base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
    };
    let upstream = upstream_bases
        .filter(|b| below(b))
        .max_by_key(|b| b.len())?;
    if below(public_base) && public_base.len() >= upstream.len() {
        return None;
    }
    Some(format!("{public_base}{}", &u[upstream.len()..]))
}

/// A `Link` header value (RFC 8288) with each `<target>` replaced by
/// `moved(target)` where that gives one.
pub fn rewrite_link_targets(value: &str, moved: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>').map(|c| open + c) else {
            break;
        };
        let target = &rest[open + 1..close];
        out.push_str(&rest[..=open]);
        match moved(target) {
            Some(m) => out.push_str(&m),
            None => out.push_str(target),
        }
        out.push('>');
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A path-absolute reference (`/r4/Patient/1`, as a `Location` may be)
/// moved from the upstream's base path to the public one, as
/// [`rewrite_url`] moves absolute ones. (`//host/…` is no path.)
pub fn rewrite_path(u: &str, upstream_path: &str, public_path: &str) -> Option<String> {
    if !u.starts_with('/') || u.starts_with("//") {
        return None;
    }
    // With the public base at `/` (an empty path) the rest alone could be
    // no path: empty, a query (`?_getpages=…`), or `//host/…` (another
    // host; `///host/…` too, to a browser). One `/` leads.
    moved_from(u, std::iter::once(upstream_path), public_path)
        .map(|m| format!("/{}", m.trim_start_matches('/')))
}

/// Types outside the Patient compartment that `$everything` may return as
/// what the patient's resources reference: shared reference data about
/// providers, places and products, never a patient's own content.
const EVERYTHING_SHARED_TYPES: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "HealthcareService",
    "Endpoint",
    "Medication",
    "Substance",
];

/// `Patient/{patient}/$everything`: resources of types outside the
/// compartment may come along (the operation returns what the patient's
/// resources reference), but every resource of a compartment type must be
/// in the patient's compartment — otherwise nothing is passed on (403);
/// one also in another patient's is left out where such are.
fn judge_everything(
    patient: &str,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    bases: &Bases,
) -> Verdict {
    let grant = Grant {
        patient: None,
        types: None,
        filters: None,
        open_types: &[],
        refused_types: &[],
    };
    // The shape checks of a search answer (status, JSON, searchset).
    match judge_search(&grant, status, content_type, body, bases) {
        Verdict::Pass if status == 200 => {}
        v => return v,
    }
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return Verdict::Unverifiable {
            why: "upstream answer is not valid JSON".into(),
        };
    };
    let mut shared = Vec::new();
    for (i, r) in doc
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, e)| Some((i, e.get("resource")?)))
    {
        let t = r.get("resourceType").and_then(Value::as_str).unwrap_or("");
        if t == "OperationOutcome" || EVERYTHING_SHARED_TYPES.contains(&t) {
            continue;
        }
        if !crate::fhir::compartment::is_compartment_type(t) {
            // Binary, Bundle, Linkage, …: anything could be in them.
            return Verdict::Refuse {
                why: format!(
                    "the answer would include {t} resources, which fhirwall cannot tie to Patient/{patient}"
                ),
            };
        }
        if !in_compartment(r, patient, bases) {
            return Verdict::Refuse {
                why: format!(
                    "the answer would include {t} resources outside the compartment of Patient/{patient}"
                ),
            };
        }
        // Also another patient's (a Group with other members): left out.
        if shared_left_out(r, patient, bases) {
            shared.push(i);
        }
    }
    if shared.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Trim { entries: shared }
    }
}

/// Rewrites a checked searchset's (or batch answer's) paging links,
/// `fullUrl`s and entries' `response.location`s from the upstream's base
/// to the public base, so paging goes through the gateway
/// (and is decided and checked again), and drops a `total` that no entry
/// backs (an OperationOutcome entry, `search.mode: outcome`, backs none).
/// `None` when there is nothing to change.
pub fn rewrite_links<B: AsRef<str>>(
    body: &[u8],
    upstream_bases: &[B],
    public_base: &str,
) -> Option<Vec<u8>> {
    let rewrite = |u: &str| rewrite_url(u, upstream_bases, public_base);
    // Edited in place, numbers as written; from the tree only if the text
    // cannot be edited (the total must go all the same).
    let spliced = || -> Option<Option<Vec<u8>>> {
        let text = std::str::from_utf8(body).ok()?;
        let top = json_edit::parse(text)?;
        let mut edit = JsonEdit::new(text);
        let mut fix = |raw: &RawValue| -> Option<()> {
            if let Ok(u) = serde_json::from_str::<String>(raw.get()) {
                if let Some(new) = rewrite(&u) {
                    edit.replace(raw, json_edit::string(&new))?;
                }
            }
            Some(())
        };
        let links = top.get("link").and_then(|l| json_edit::elements(l));
        for l in links.iter().flatten() {
            if let Some(url) = json_edit::member(l, "url") {
                fix(url)?;
            }
        }
        let entries = top.get("entry").and_then(|e| json_edit::elements(e));
        for e in entries.iter().flatten() {
            if let Some(url) = json_edit::member(e, "fullUrl") {
                fix(url)?;
            }
            // A batch or transaction answer's entries: where a write went.
            if let Some(url) =
                json_edit::member(e, "response").and_then(|r| json_edit::member(r, "location"))
            {
                fix(url)?;
            }
        }
        // A total with no entry to check proves nothing: an upstream that
        // ignored the narrowing would be counting every patient's
        // resources (`_summary=count`, `_count=0`). It is dropped.
        let backed = entries.iter().flatten().any(|e| {
            let mode = json_edit::member(e, "search").and_then(|s| json_edit::member(s, "mode"));
            mode.is_none_or(|m| {
                serde_json::from_str::<String>(m.get()).ok().as_deref() != Some("outcome")
            })
        });
        if !backed {
            if let Some(total) = top.get("total") {
                if total.get().trim() != "0" {
                    edit.remove_member("total", total)?;
                }
            }
        }
        if !edit.changed() {
            return Some(None);
        }
        edit.finish().map(|t| Some(t.into_bytes()))
    };
    if let Some(out) = spliced() {
        return out;
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    let mut fix = |v: &mut Value| {
        if let Some(new) = v.as_str().and_then(rewrite) {
            *v = Value::String(new);
            changed = true;
        }
    };
    if let Some(links) = doc.get_mut("link").and_then(Value::as_array_mut) {
        for l in links {
            if let Some(u) = l.get_mut("url") {
                fix(u);
            }
        }
    }
    if let Some(entries) = doc.get_mut("entry").and_then(Value::as_array_mut) {
        for e in entries {
            if let Some(u) = e.get_mut("fullUrl") {
                fix(u);
            }
            if let Some(u) = e.pointer_mut("/response/location") {
                fix(u);
            }
        }
    }
    let backed = doc
        .get("entry")
        .and_then(Value::as_array)
        .is_some_and(|e| e.iter().any(|e| e["search"]["mode"] != "outcome"));
    if !backed {
        if let Some(obj) = doc.as_object_mut() {
            changed |= obj.remove("total").is_some_and(|t| t != 0);
        }
    }
    changed.then(|| doc.to_string().into_bytes())
}

/// The version an entity tag names: `W/"3"`, `"3"` (or a bare `3`) → `3`.
fn etag_version(tag: &str) -> &str {
    let tag = tag.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag)
}

/// Whether a client's `If-Match` values (each possibly a list) admit the
/// stored `version`: `*`, or a tag naming it (weak or strong: FHIR servers
/// compare version ids).
pub fn if_match_admits<'a>(values: impl IntoIterator<Item = &'a str>, version: &str) -> bool {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || etag_version(t) == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_ids_keep_what_checked_entries_reference() {
        let doc = |entries: Value| json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        let obs = |subject: &str| {
            json!({"resource": {"resourceType": "Observation",
            "subject": {"reference": subject}}, "request": {"method": "POST", "url": "Observation"}})
        };
        let ok = |d: Value, checked: &[usize]| bundle_ids_hold(&d, checked);
        // Placeholders, own-resource fullUrls, no fullUrl: fine.
        assert!(ok(doc(json!([
            {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "urn:oid:1.2.3", "resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": "https://x/fhir/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"},
             "request": {"method": "PUT", "url": "Patient/p1"}},
            {"resource": {"resourceType": "Patient", "id": "p3"}, "request": {"method": "PUT", "url": "Patient/p3"}},
            {"fullUrl": "Observation/o1", "request": {"method": "DELETE", "url": "Observation/o1"}},
            obs("urn:uuid:a"),
        ])), &[0, 5]).is_ok());
        // A fullUrl naming something else than its request, or its
        // request conditional; shared; not a string.
        for (entries, why) in [
            (
                json!([{"fullUrl": "Patient/p1", "request": {"method": "POST", "url": "Patient"}}, obs("Patient/p1")]),
                "fullUrl (Patient/p1)",
            ),
            (
                json!([{"fullUrl": "Patient/p1", "request": {"method": "PUT", "url": "Patient?identifier=x"}}, obs("Patient/p1")]),
                "fullUrl (Patient/p1)",
            ),
            (
                json!([{"fullUrl": "Patient/p1", "request": {"method": "PUT", "url": "Patient/p2"}}, obs("Patient/p1")]),
                "fullUrl (Patient/p1)",
            ),
            (
                json!([{"fullUrl": "xPatient/p1", "request": {"method": "PUT", "url": "Patient/p1"}}, obs("Patient/p1")]),
                "fullUrl (xPatient/p1)",
            ),
            (
                json!([{"fullUrl": "urn:uuid:a", "request": {"method": "POST", "url": "Patient"}},
                    {"fullUrl": "urn:uuid:a", "request": {"method": "POST", "url": "Patient"}}, obs("Patient/p1")]),
                "two entries",
            ),
            (
                json!([{"fullUrl": 7, "request": {"method": "POST", "url": "Patient"}}, obs("Patient/p1")]),
                "not a string",
            ),
            (
                json!([{"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "POST", "url": "Patient"}}, obs("Patient/p1")]),
                "an id of its own",
            ),
            (
                json!([{"resource": {"resourceType": "Patient", "id": "p1"}, "request": {"method": "PUT", "url": "Patient?identifier=x"}}, obs("Patient/p1")]),
                "an id of its own",
            ),
            (
                json!([{"fullUrl": "https://x/fhir/Patient/p2", "resource": {"resourceType": "Patient", "id": "p1"},
                        "request": {"method": "PUT", "url": "Patient/p2"}}, obs("Patient/p1")]),
                "an id of its own",
            ),
            (
                json!([{"fullUrl": "urn:uuid:p", "request": {"method": "POST", "url": "Patient"}}, obs("urn:uuid:p")]),
                "references entry 0",
            ),
        ] {
            let e = ok(doc(entries), &[1]).err().unwrap_or_default();
            assert!(e.contains(why), "{why}: {e}");
        }
        // A placeholder named anywhere in a checked entry, not only in a
        // reference (the upstream rewrites matching uris too).
        let mut tagged = obs("Patient/p1");
        tagged["resource"]["derivedFrom"] =
            json!([{"reference": "Patient/p1", "display": "urn:uuid:p"}]);
        let e = ok(
            doc(
                json!([{"fullUrl": "urn:uuid:p", "request": {"method": "POST", "url": "Patient"}}, tagged]),
            ),
            &[1],
        );
        assert!(e.is_err());
    }
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
        let check = ResponseCheck::in_compartment("p1");
        judge(
            &check,
            &req(path),
            status,
            Some("application/fhir+json; charset=utf-8"),
            body.to_string().as_bytes(),
            &Bases::new(vec!["http://gw/fhir".into()]),
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
        let check = ResponseCheck::in_compartment("p1");
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

    fn searchset(entries: Vec<(Value, &str)>) -> Value {
        json!({"resourceType": "Bundle", "type": "searchset",
               "entry": entries.into_iter().map(|(r, mode)| json!({"resource": r, "search": {"mode": mode}})).collect::<Vec<_>>()})
    }

    /// A search's check in the compartment of `patient`, any type.
    fn search_in(patient: &str) -> ResponseCheck {
        ResponseCheck::Search {
            patient: Some(patient.into()),
            types: None,
            filters: None,
            open_types: Vec::new(),
            refused_types: Vec::new(),
        }
    }

    fn judge_search_json(status: u16, body: Value) -> Verdict {
        let check = search_in("p1");
        judge(
            &check,
            &req("Observation"),
            status,
            Some("application/fhir+json"),
            body.to_string().as_bytes(),
            &Bases::default(),
        )
    }

    /// A scope filter judges every resource of its type, whatever the
    /// upstream labelled it: an `include` label is no proof it is not a
    /// match (a filtered grant carries no includes).
    #[test]
    fn scope_filters_judge_entries_labelled_include() {
        let lab = |id: &str, code: &str| {
            json!({"resourceType": "Observation", "id": id,
                   "category": [{"coding": [{"code": code}]}]})
        };
        let check = ResponseCheck::Search {
            patient: None,
            types: None,
            filters: Some(vec![crate::fhir::search_param::Filter::parse(
                "Observation",
                "category=laboratory",
            )
            .unwrap()]),
            open_types: Vec::new(),
            refused_types: Vec::new(),
        };
        let run = |body: Value| {
            judge(
                &check,
                &req("Observation"),
                200,
                Some("application/fhir+json"),
                body.to_string().as_bytes(),
                &Bases::default(),
            )
        };
        assert_eq!(
            run(searchset(vec![(lab("a", "laboratory"), "match")])),
            Verdict::Pass
        );
        for mode in ["match", "include"] {
            let body = searchset(vec![
                (lab("a", "laboratory"), "match"),
                (lab("b", "vital-signs"), mode),
            ]);
            assert_ne!(run(body), Verdict::Pass, "{mode}");
        }
    }

    #[test]
    fn searches() {
        let patient = |id: &str| json!({"resourceType": "Patient", "id": id});
        let outcome = json!({"resourceType": "OperationOutcome", "issue": []});
        for ok in [
            searchset(vec![]),
            searchset(vec![(obs("a", "p1"), "match"), (obs("b", "p1"), "match")]),
            searchset(vec![(obs("a", "p1"), "match"), (patient("p1"), "include")]),
            searchset(vec![
                (obs("a", "p1"), "match"),
                (outcome.clone(), "outcome"),
            ]),
        ] {
            assert_eq!(judge_search_json(200, ok.clone()), Verdict::Pass, "{ok}");
        }
        // Shapes a lenient client would read as entries are not judged.
        let one_entry = json!({"resourceType": "Bundle", "type": "searchset",
            "entry": {"resource": obs("b", "p2")}});
        let arrayed = json!({"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": [obs("b", "p2")]}]});
        // An entry without a resource (its fullUrl would pass unjudged).
        let bare = json!({"resourceType": "Bundle", "type": "searchset",
            "entry": [{"fullUrl": "http://up/fhir/Observation/b", "search": {"mode": "match"}}]});
        for odd in [one_entry, arrayed, bare] {
            assert!(
                matches!(
                    judge_search_json(200, odd.clone()),
                    Verdict::Unverifiable { .. }
                ),
                "{odd}"
            );
        }
        // A match of another patient: the upstream ignored the narrowing.
        assert!(matches!(
            judge_search_json(
                200,
                searchset(vec![(obs("a", "p1"), "match"), (obs("b", "p2"), "match")])
            ),
            Verdict::Unverifiable { .. }
        ));
        // Unmarked entries count as matches.
        assert!(matches!(
            judge_search_json(
                200,
                json!({"resourceType": "Bundle", "type": "searchset",
                "entry": [{"resource": obs("b", "p2")}]})
            ),
            Verdict::Unverifiable { .. }
        ));
        // Includes outside the compartment: left out, as if they did not
        // exist (a refusal would tell that they do).
        assert_eq!(
            judge_search_json(
                200,
                searchset(vec![
                    (patient("p2"), "include"),
                    (obs("a", "p1"), "match"),
                    (patient("p1"), "include"),
                    (obs("c", "p3"), "include"),
                ])
            ),
            Verdict::Trim {
                entries: vec![0, 3]
            }
        );
        // An OperationOutcome dressed as a match proves nothing.
        assert!(matches!(
            judge_search_json(200, searchset(vec![(outcome.clone(), "match")])),
            Verdict::Unverifiable { .. }
        ));
        assert!(matches!(
            judge_search_json(200, json!({"resourceType": "Bundle", "type": "collection"})),
            Verdict::Unverifiable { .. }
        ));
        assert_eq!(judge_search_json(400, outcome), Verdict::Pass);
        assert!(matches!(
            judge_search_json(400, obs("b", "p2")),
            Verdict::Unverifiable { .. }
        ));
        assert!(matches!(
            judge_search_json(500, json!({})),
            Verdict::Unverifiable { .. }
        ));
    }

    /// Entries are left out of the text itself: the rest, decimals
    /// included, stays as the upstream wrote it.
    #[test]
    fn entries_are_left_out_byte_for_byte() {
        let text = br#"{"resourceType":"Bundle","type":"searchset","total":2,"entry":[
  {"resource":{"resourceType":"Observation","id":"a","valueQuantity":{"value":5.10}}},
  {"resource":{"resourceType":"Patient","id":"p2"},"search":{"mode":"include"}},
  {"resource":{"resourceType":"Observation","id":"b","valueQuantity":{"value":1.50}}},
  {"resource":{"resourceType":"Patient","id":"p3"},"search":{"mode":"include"}}
 ],"link":[]}"#;
        let kept = String::from_utf8(without_entries(text, &[1, 3]).unwrap()).unwrap();
        assert!(kept.contains("5.10") && kept.contains("1.50"), "{kept}");
        assert!(!kept.contains("p2") && !kept.contains("p3"), "{kept}");
        let v: Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(v["entry"].as_array().unwrap().len(), 2);
        assert_eq!(v["link"], json!([]));
        // Includes only left out: the matches' total stands.
        assert_eq!(v["total"], 2);
        let all = String::from_utf8(without_entries(text, &[0, 1, 2, 3]).unwrap()).unwrap();
        let v: Value = serde_json::from_str(&all).unwrap();
        // None left: no entry at all, as a server writes a page without
        // matches.
        assert!(v.get("entry").is_none(), "{v}");
        // A match left out (as absent): the total, which counts it, goes.
        assert!(v.get("total").is_none(), "{v}");
        let one = String::from_utf8(without_entries(text, &[2]).unwrap()).unwrap();
        let v: Value = serde_json::from_str(&one).unwrap();
        assert!(
            v.get("total").is_none() && v["entry"].as_array().unwrap().len() == 3,
            "{v}"
        );
        let after = br#"{"entry":[{"resource":{"id":"a"},"search":{"mode":"match"}}],"total":1}"#;
        let v: Value = serde_json::from_slice(&without_entries(after, &[0]).unwrap()).unwrap();
        assert_eq!(v, json!({}));
        // Side by side at the start, both go in two passes over the text:
        // the rest as the upstream wrote it (a page rewritten from the
        // tree would tell its matches were left out).
        let first =
            br#"{"total":1, "entry":[{"resource":{"id":"a"}}], "type":"searchset", "id":"s"}"#;
        let out = String::from_utf8(without_entries(first, &[0]).unwrap()).unwrap();
        assert_eq!(out, r#"{ "type":"searchset", "id":"s"}"#);
        // An empty array as the upstream wrote it is written alike.
        let empty = br#"{"resourceType":"Bundle","entry":[ ],"total":0}"#;
        let v: Value = serde_json::from_slice(&entries_written_one_way(empty)).unwrap();
        assert_eq!(v, json!({"resourceType": "Bundle", "total": 0}));
        // A total however spelt goes.
        let escaped = br#"{"resourceType":"Bundle","tot\u0061l":3}"#;
        let v: Value = serde_json::from_slice(&without_total(escaped).unwrap()).unwrap();
        assert_eq!(v, json!({"resourceType": "Bundle"}));
        assert!(without_total(br#"{"resourceType":"Bundle"}"#).is_none());
        // Every entry left out as too large: the warning alone.
        let warned = with_left_out_warning(br#"{"resourceType":"Bundle"}"#, 2).unwrap();
        let v: Value = serde_json::from_slice(&warned).unwrap();
        assert_eq!(v["entry"][0]["search"]["mode"], "outcome", "{v}");
        assert!(without_entries(text, &[4]).is_none(), "no such entry");
        assert!(without_entries(b"{\"entry\":{}}", &[0]).is_none());
    }

    /// `check` on a 200 FHIR JSON answer `body` to a request for `path`.
    fn judge_answer(check: &ResponseCheck, path: &str, body: Value) -> Verdict {
        judge(
            check,
            &req(path),
            200,
            Some("application/fhir+json"),
            body.to_string().as_bytes(),
            &Bases::default(),
        )
    }

    #[test]
    fn searches_hold_only_granted_types() {
        let check = ResponseCheck::Search {
            patient: Some("p1".into()),
            types: Some(vec!["Observation".into()]),
            filters: None,
            open_types: Vec::new(),
            refused_types: Vec::new(),
        };
        let run = |body: Value| judge_answer(&check, "Observation", body);
        assert_eq!(
            run(searchset(vec![(obs("a", "p1"), "match")])),
            Verdict::Pass
        );
        // Included, a type not granted is left out (a refusal would tell
        // it exists); as a match, the answer is refused.
        let own = json!({"resourceType": "Patient", "id": "p1"});
        assert_eq!(
            run(searchset(vec![
                (obs("a", "p1"), "match"),
                (own.clone(), "include")
            ])),
            Verdict::Trim { entries: vec![1] }
        );
        assert!(matches!(
            run(searchset(vec![(obs("a", "p1"), "match"), (own, "match")])),
            Verdict::Refuse { .. }
        ));
    }

    /// A stored page under a filtered scope beside a plain one: the filter
    /// judges its own type only.
    #[test]
    fn a_filter_judges_only_its_own_type() {
        let check = ResponseCheck::Search {
            patient: Some("p1".into()),
            types: Some(vec!["Condition".into(), "Observation".into()]),
            filters: Some(vec![
                Filter::parse("Observation", "category=laboratory").unwrap()
            ]),
            open_types: Vec::new(),
            refused_types: Vec::new(),
        };
        let run = |body: Value| judge_answer(&check, "Observation", body);
        let lab = |id: &str, category: &str| {
            let mut o = obs(id, "p1");
            o["category"] = json!([{"coding": [{"code": category}]}]);
            o
        };
        let condition = json!({"resourceType": "Condition", "id": "c1",
            "subject": {"reference": "Patient/p1"}});
        assert_eq!(
            run(searchset(vec![
                (lab("a", "laboratory"), "match"),
                (condition, "match")
            ])),
            Verdict::Pass
        );
        assert!(matches!(
            run(searchset(vec![(lab("b", "vital-signs"), "match")])),
            Verdict::Unverifiable { .. }
        ));
    }

    #[test]
    fn if_match_names_versions_weak_or_strong() {
        assert_eq!(etag_version("W/\"3\""), "3");
        assert_eq!(etag_version(" \"3\" "), "3");
        assert_eq!(etag_version("3"), "3");
        for (values, admitted) in [
            (vec!["W/\"3\""], true),
            (vec!["\"3\""], true),
            (vec!["*"], true),
            (vec!["W/\"2\", W/\"3\""], true),
            (vec!["W/\"2\"", "W/\"3\""], true),
            (vec!["W/\"2\""], false),
            (vec!["W/\"33\""], false),
            // Unquoted, read leniently: admitting only sends the proved
            // version, which is what the client named.
            (vec!["W/3"], true),
            (vec![""], false),
        ] {
            assert_eq!(
                if_match_admits(values.iter().copied(), "3"),
                admitted,
                "{values:?}"
            );
        }
    }

    #[test]
    fn refused_types_refuse_whatever_else_grants_them() {
        let check = ResponseCheck::Search {
            patient: None,
            types: None,
            filters: None,
            open_types: vec!["Condition".into()],
            refused_types: vec![crate::policy::RefusedType {
                resource_type: "Condition".into(),
                rule: "t.yaml#no-conditions".into(),
                reason: "refused by policy rule t.yaml#no-conditions".into(),
            }],
        };
        let run = |body: Value| judge_answer(&check, "", body);
        assert_eq!(
            run(searchset(vec![(obs("a", "p1"), "match")])),
            Verdict::Pass
        );
        let cond = json!({"resourceType": "Condition", "id": "c1"});
        // A refused type, and (rules being judged for R4 types only) a type
        // R4 does not know or a resource naming none.
        let r5 = json!({"resourceType": "SubscriptionTopic", "id": "t1"});
        let nameless = json!({"id": "x1"});
        for (other, mode) in [
            (&cond, "match"),
            (&cond, "include"),
            (&r5, "match"),
            (&nameless, "include"),
        ] {
            match run(searchset(vec![
                (obs("a", "p1"), "match"),
                (other.clone(), mode),
            ])) {
                Verdict::PolicyRefuse { rule, why } => {
                    assert_eq!(rule, "t.yaml#no-conditions");
                    assert!(why.contains("would hold"), "{why}");
                }
                v => panic!("{other} {mode}: {v:?}"),
            }
        }
    }

    /// An answer repeating a key is not judged: the key judged (the last)
    /// and the one a client reads (maybe the first) could differ.
    #[test]
    fn answers_repeating_a_key_are_unverifiable() {
        let check = search_in("p1");
        for body in [
            r#"{"resourceType":"Bundle","type":"searchset","total":9,"total":9}"#,
            r#"{"resourceType":"Bundle","type":"searchset","entry":[],"entry":[]}"#,
        ] {
            assert!(
                matches!(
                    judge(
                        &check,
                        &req("Observation"),
                        200,
                        Some("application/fhir+json"),
                        body.as_bytes(),
                        &Bases::default()
                    ),
                    Verdict::Unverifiable { .. }
                ),
                "{body}"
            );
        }
    }

    /// What fhirwall edits in a Bundle leaves the rest as written: a
    /// decimal keeps its precision (`5.10` is not `5.1` in FHIR).
    #[test]
    fn edited_bundles_keep_their_numbers_as_written() {
        let answer = r#"{"resourceType":"Bundle","type":"searchset","total":1,
            "link":[{"relation":"next","url":"http://up:9/r4?_getpages=x"}],
            "entry":[{"fullUrl":"http://up:9/r4/Observation/a",
              "resource":{"resourceType":"Observation","id":"a","valueQuantity":{"value":5.10}}}]}"#;
        let out = rewrite_links(answer.as_bytes(), &["http://up:9/r4"], "https://gw/fhir").unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(r#"{"value":5.10}"#), "{out}");
        assert!(out.contains("https://gw/fhir?_getpages=x"), "{out}");

        let bundle = r#"{"resourceType":"Bundle","type":"batch","entry":[
            {"resource":{"resourceType":"Observation","valueQuantity":{"value":1.50E2}},
             "request":{"method":"PUT","url":"Observation/o1","ifMatch":"W/\"1\""}},
            {"request":{"method":"GET","url":"Condition?_count=10"}}]}"#;
        let tagged = bundle_with_if_match(bundle.as_bytes(), &[(0, "W/\"2\"".into())]).unwrap();
        let tagged = String::from_utf8(tagged).unwrap();
        assert!(tagged.contains("1.50E2"), "{tagged}");
        let v: Value = serde_json::from_str(&tagged).unwrap();
        assert_eq!(v["entry"][0]["request"]["ifMatch"], "W/\"2\"");
        let checks = [EntryCheck {
            index: 1,
            narrow: vec![("patient".into(), "p1".into())],
            check: search_in("p1"),
        }];
        let narrowed = narrow_bundle(tagged.as_bytes(), &checks).unwrap();
        let narrowed = String::from_utf8(narrowed).unwrap();
        assert!(narrowed.contains("1.50E2"), "{narrowed}");
        let v: Value = serde_json::from_str(&narrowed).unwrap();
        assert_eq!(
            v["entry"][1]["request"]["url"],
            "Condition?patient=p1&_count=10"
        );
    }

    /// A URL is moved from the first upstream base it is under, unless it
    /// is the gateway's already (the forwarded base of an upstream at `/`
    /// is the public origin, a prefix of the public base).
    #[test]
    fn urls_move_from_any_upstream_base_but_not_from_the_public_one() {
        let bases = ["http://up:9/r4", "https://gw"];
        let moved = |u: &str| rewrite_url(u, &bases, "https://gw/fhir");
        assert_eq!(moved("https://gw/fhir/Patient/1"), None);
        assert_eq!(moved("https://gw/fhir?_getpages=a"), None);
        assert_eq!(
            moved("https://gw/Patient/1").as_deref(),
            Some("https://gw/fhir/Patient/1")
        );
        assert_eq!(
            moved("http://up:9/r4?_getpages=a").as_deref(),
            Some("https://gw/fhir?_getpages=a")
        );
        assert_eq!(moved("https://gw.evil/Patient/1"), None);
        assert_eq!(moved("http://up:9/r45/Patient/1"), None);
        // `/fhirx` is not under `/fhir`: an upstream path of its own.
        assert_eq!(
            moved("https://gw/fhirx/Patient/1").as_deref(),
            Some("https://gw/fhir/fhirx/Patient/1")
        );
    }

    #[test]
    fn link_header_targets_are_moved_and_the_rest_kept() {
        let moved = |u: &str| rewrite_url(u, &["http://up:9/r4"], "https://gw/fhir");
        assert_eq!(
            rewrite_link_targets(
                "<http://up:9/r4/Patient/p2>; rel=\"preload\", <https://other/x>; rel=next",
                moved
            ),
            "<https://gw/fhir/Patient/p2>; rel=\"preload\", <https://other/x>; rel=next"
        );
        assert_eq!(rewrite_link_targets("no target <", moved), "no target <");
        assert_eq!(rewrite_link_targets("", moved), "");
    }

    /// A public base at `/` is a prefix of the upstream's forwarded base:
    /// the longer base decides. Path-absolute references move alike.
    #[test]
    fn the_longest_base_a_url_is_under_decides() {
        let bases = ["http://up:9/r4", "https://gw/r4"];
        let moved = |u: &str| rewrite_url(u, &bases, "https://gw");
        assert_eq!(
            moved("https://gw/r4/Patient/1").as_deref(),
            Some("https://gw/Patient/1")
        );
        assert_eq!(moved("https://gw/Patient/1"), None);
        assert_eq!(moved("https://gw/r45/Patient/1"), None);

        let path = |u: &str, up: &str, public: &str| rewrite_path(u, up, public);
        assert_eq!(
            path("/r4/Patient/1/_history/1", "/r4", "/fhir").as_deref(),
            Some("/fhir/Patient/1/_history/1")
        );
        assert_eq!(path("/fhir/Patient/1", "/r4", "/fhir"), None);
        assert_eq!(
            path("/r4/Patient/1", "/r4", "").as_deref(),
            Some("/Patient/1")
        );
        assert_eq!(path("/Patient/1", "/r4", ""), None);
        assert_eq!(
            path("/Patient/1", "", "/fhir").as_deref(),
            Some("/fhir/Patient/1")
        );
        assert_eq!(path("/fhir/Patient/1", "", "/fhir"), None);
        assert_eq!(path("/fhir/Patient/1", "/fhir", "/fhir"), None);
        assert_eq!(path("//evil/r4/Patient/1", "/r4", "/fhir"), None);
        // A public base at `/`: still a path on the gateway.
        assert_eq!(path("/r4", "/r4", "").as_deref(), Some("/"));
        assert_eq!(
            path("/r4?_getpages=x", "/r4", "").as_deref(),
            Some("/?_getpages=x")
        );
        assert_eq!(
            path("/r4//evil.example/x", "/r4", "").as_deref(),
            Some("/evil.example/x")
        );
        assert_eq!(path("https://gw/r4", "/r4", "/fhir"), None);
    }

    #[test]
    fn paging_links_are_rewritten_to_the_public_base() {
        let body = json!({"resourceType": "Bundle", "type": "searchset",
            "link": [
                {"relation": "self", "url": "http://up:9/r4/Observation?patient=p1"},
                {"relation": "next", "url": "http://up:9/r4?_getpages=x"},
                {"relation": "other", "url": "http://up:9/r4x/Observation"},
                {"relation": "elsewhere", "url": "https://other/r4/Observation"}],
            "entry": [{"fullUrl": "http://up:9/r4/Observation/a"}]});
        let out = rewrite_links(
            body.to_string().as_bytes(),
            &["http://up:9/r4"],
            "https://gw/fhir",
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            out["link"][0]["url"],
            "https://gw/fhir/Observation?patient=p1"
        );
        assert_eq!(out["link"][1]["url"], "https://gw/fhir?_getpages=x");
        assert_eq!(out["link"][2]["url"], "http://up:9/r4x/Observation");
        assert_eq!(out["link"][3]["url"], "https://other/r4/Observation");
        assert_eq!(out["entry"][0]["fullUrl"], "https://gw/fhir/Observation/a");
        assert!(rewrite_links(b"{}", &["http://up:9/r4"], "https://gw/fhir").is_none());
        // A count with nothing to check is dropped; a zero count stays.
        let count = json!({"resourceType": "Bundle", "type": "searchset", "total": 42});
        let out = rewrite_links(
            count.to_string().as_bytes(),
            &["http://up:9/r4"],
            "https://gw/fhir",
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert!(out.get("total").is_none(), "{out}");
        let zero = json!({"resourceType": "Bundle", "type": "searchset", "total": 0});
        assert!(rewrite_links(
            zero.to_string().as_bytes(),
            &["http://up:9/r4"],
            "https://gw/fhir"
        )
        .is_none());
        // An OperationOutcome entry (a warning) backs no count; a resource
        // entry does.
        let outcome = json!({"resourceType": "OperationOutcome", "issue": []});
        let warned = json!({"resourceType": "Bundle", "type": "searchset", "total": 42,
            "entry": [{"resource": outcome, "search": {"mode": "outcome"}}]});
        let out = rewrite_links(
            warned.to_string().as_bytes(),
            &["http://up:9/r4"],
            "https://gw/fhir",
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert!(out.get("total").is_none(), "{out}");
        let matched = json!({"resourceType": "Bundle", "type": "searchset", "total": 42,
            "entry": [{"resource": {"resourceType": "Observation", "id": "a"},
                       "search": {"mode": "match"}},
                      {"resource": outcome, "search": {"mode": "outcome"}}]});
        assert!(rewrite_links(
            matched.to_string().as_bytes(),
            &["http://up:9/r4"],
            "https://gw/fhir"
        )
        .is_none());
    }

    #[test]
    fn entry_statuses_are_read_from_response_bundles() {
        let answer = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "404"}},
            {"response": {}},
            {"response": {"status": "OK"}}]});
        let text = answer.to_string();
        assert_eq!(
            entry_statuses(text.as_bytes(), 4),
            Some(vec![Some(201), Some(404), None, None])
        );
        // Not the answer to the request, entry for entry: nothing.
        assert_eq!(entry_statuses(text.as_bytes(), 3), None);
        // Read from the pieces it came in, the same.
        let pieces: Vec<bytes::Bytes> = text
            .as_bytes()
            .chunks(7)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        assert_eq!(
            entry_statuses(Pieces::new(pieces), 4),
            Some(vec![Some(201), Some(404), None, None])
        );
        let search = json!({"resourceType": "Bundle", "type": "searchset", "entry": []});
        assert_eq!(entry_statuses(search.to_string().as_bytes(), 0), None);
        assert_eq!(entry_statuses(&b"not json"[..], 0), None);
        let doubled = r#"{"resourceType":"Bundle","type":"batch-response","entry":[],"entry":[]}"#;
        assert_eq!(entry_statuses(doubled.as_bytes(), 0), None);
    }

    /// `request` (a Bundle) POSTed to the base, classified.
    fn posted_bundle(request: &Value) -> FhirRequest {
        let post = classify(HttpRequest {
            method: "POST",
            path: "",
            query: None,
            if_none_exist: None,
        })
        .unwrap();
        crate::fhir::classify::classify_bundle(post, request.to_string().as_bytes()).unwrap()
    }

    /// A 200 FHIR JSON `text` answering `b`, judged by `checks` (upstream
    /// `http://up:9/r4`, public `https://gw/fhir`): the text passed on, and
    /// how many included resources were left out of it.
    fn judged_bundle_answer(checks: &[EntryCheck], b: &FhirRequest, text: &str) -> (String, usize) {
        let (out, left_out) = judge_bundle_answer(
            checks,
            &[],
            b,
            200,
            Some("application/fhir+json"),
            text.as_bytes(),
            &Bases::default(),
            &["http://up:9/r4"],
            "https://gw/fhir",
        )
        .unwrap();
        (String::from_utf8(out).unwrap(), left_out)
    }

    /// Entry checks at `indexes`, each in Patient/p1's compartment.
    fn in_p1(indexes: &[usize]) -> Vec<EntryCheck> {
        indexes
            .iter()
            .map(|&index| EntryCheck {
                index,
                check: ResponseCheck::in_compartment("p1"),
                narrow: Vec::new(),
            })
            .collect()
    }

    /// [`judged_bundle_answer`]'s text.
    fn passed_bundle_answer(checks: &[EntryCheck], b: &FhirRequest, text: &str) -> String {
        judged_bundle_answer(checks, b, text).0
    }

    /// Read entry by entry: a checked entry that fails is replaced as the
    /// whole answer's judgement replaces it (so judged again, it stays
    /// the same); one too large to hold is a 404 for a read, and the
    /// whole answer fails when it is an unchecked one (a write's).
    #[test]
    fn bundle_entries_are_sifted_as_judged_whole() {
        let request = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation/o1"}},
            {"request": {"method": "GET", "url": "Observation/o2"}},
            {"request": {"method": "DELETE", "url": "Observation/o3"}}]});
        let b = posted_bundle(&request);
        let checks = in_p1(&[0, 1]);
        let bases = Bases::default();
        let sift = |i: usize, e: Option<Value>| {
            let text = e.map(|e| e.to_string());
            bundle_entry_sift(&checks, &b, i, text.as_deref().map(str::as_bytes), &bases)
        };
        let own = json!({"resource": obs("o1", "p1"), "response": {"status": "200 OK"}});
        assert_eq!(sift(0, Some(own)), Sift::Keep);
        let other = json!({"resource": obs("o2", "p2"), "response": {"status": "200 OK"}});
        let Sift::Replace(hidden) = sift(1, Some(other)) else {
            panic!("another patient's entry is replaced")
        };
        let missing = json!({"response": {"status": "404 Not Found"}});
        assert_eq!(sift(1, Some(missing)), Sift::Replace(hidden.clone()));
        assert_eq!(sift(1, None), Sift::Replace(hidden.clone()));
        assert_eq!(sift(2, None), Sift::Fail);
        assert_eq!(
            sift(2, Some(json!({"response": {"status": "204 No Content"}}))),
            Sift::Keep
        );
        // Judged whole afterwards, the replacement stays as it is.
        let answer = format!(
            r#"{{"resourceType":"Bundle","type":"batch-response","entry":[{},{},{}]}}"#,
            json!({"resource": obs("o1", "p1"), "response": {"status": "200 OK"}}),
            String::from_utf8(hidden.clone()).unwrap(),
            json!({"response": {"status": "204 No Content"}})
        );
        let (out, _) = judged_bundle_answer(&checks, &b, &answer);
        let out: Value = serde_json::from_str(&out).unwrap();
        let hidden: Value = serde_json::from_slice(&hidden).unwrap();
        assert_eq!(out["entry"][1], hidden);
    }

    #[test]
    fn bundle_answers_are_judged_entry_by_entry() {
        let request = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation/o1"}},
            {"request": {"method": "GET", "url": "Observation/o2"}},
            {"request": {"method": "DELETE", "url": "Observation/o3"}},
            {"request": {"method": "GET", "url": "Observation/o4"}}]});
        let b = posted_bundle(&request);
        let checks = in_p1(&[0, 1, 3]);
        let answer = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": obs("o1", "p1"), "response": {"status": "200 OK"}},
            {"resource": obs("o2", "p2"), "response": {"status": "200 OK"}},
            {"response": {"status": "204 No Content"}},
            {"response": {"status": "404 Not Found"}}]});
        let run = |a: &Value| {
            judge_bundle_answer(
                &checks,
                &[],
                &b,
                200,
                Some("application/fhir+json"),
                a.to_string().as_bytes(),
                &Bases::default(),
                &["http://up:9/r4"],
                "https://gw/fhir",
            )
        };
        let out: Value = serde_json::from_slice(&run(&answer).unwrap().0).unwrap();
        assert_eq!(out["entry"][0]["resource"]["id"], "o1");
        assert_eq!(out["entry"][1]["response"]["status"], "404 Not Found");
        assert!(!out.to_string().contains("Patient/p2"), "{out}");
        assert_eq!(out["entry"][2]["response"]["status"], "204 No Content");
        assert_eq!(out["entry"][3]["response"]["status"], "404 Not Found");
        // Not the answer to this request: refused whole.
        let mut short = answer.clone();
        short["entry"].as_array_mut().unwrap().pop();
        assert!(run(&short).is_err());
        let mut wrong = answer.clone();
        wrong["type"] = json!("transaction-response");
        assert!(run(&wrong).is_err());
        // The entries passed on are as the upstream wrote them.
        let text = answer.to_string().replace(
            r#""id":"o1""#,
            r#""id":"o1","valueQuantity":{"value":5.10}"#,
        );
        let out = passed_bundle_answer(&checks, &b, &text);
        assert!(out.contains(r#"{"value":5.10}"#), "{out}");
        assert!(!out.contains("Patient/p2"), "{out}");
    }

    /// A search answered inside a batch is passed on as one asked alone:
    /// its links through the gateway, a total no entry backs dropped.
    #[test]
    fn searches_in_a_bundle_answer_are_relinked() {
        let request = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation?code=x&_count=0"}},
            {"request": {"method": "GET", "url": "Observation/o1"}}]});
        let b = posted_bundle(&request);
        let checks = vec![
            EntryCheck {
                index: 0,
                check: ResponseCheck::Search {
                    patient: Some("p1".into()),
                    types: None,
                    filters: None,
                    open_types: Vec::new(),
                    refused_types: Vec::new(),
                },
                narrow: Vec::new(),
            },
            EntryCheck {
                index: 1,
                check: ResponseCheck::in_compartment("p1"),
                narrow: Vec::new(),
            },
        ];
        let text = r#"{"resourceType":"Bundle","type":"batch-response","entry":[
            {"resource":{"resourceType":"Bundle","type":"searchset","total":5,
              "link":[{"relation":"self","url":"http://up:9/r4/Observation?code=x"}]},
             "response":{"status":"200 OK"}},
            {"resource":{"resourceType":"Observation","id":"o1","valueQuantity":{"value":5.10},
              "subject":{"reference":"Patient/p1"}},"response":{"status":"200 OK"}}]}"#;
        let out = passed_bundle_answer(&checks, &b, text);
        let v: Value = serde_json::from_str(&out).unwrap();
        let search = &v["entry"][0]["resource"];
        assert!(search.get("total").is_none(), "{out}");
        assert_eq!(
            search["link"][0]["url"],
            "https://gw/fhir/Observation?code=x"
        );
        assert!(!out.contains("http://up:9"), "{out}");
        // The other entries as the upstream wrote them.
        assert!(out.contains(r#"{"value":5.10}"#), "{out}");
        // A total of 0 (`_summary=count`, nothing visible matched) goes too
        // where shared resources are left out: it would tell them from
        // none.
        let zero = text.replace(r#""total":5"#, r#""total":0"#);
        let out = passed_bundle_answer(&checks, &b, &zero);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v["entry"][0]["resource"].get("total").is_none(), "{out}");

        // An include outside the compartment is left out of the entry's
        // search, the rest of it kept.
        let text = r#"{"resourceType":"Bundle","type":"batch-response","entry":[
            {"resource":{"resourceType":"Bundle","type":"searchset","entry":[
              {"resource":{"resourceType":"Observation","id":"o9","valueQuantity":{"value":2.50},
                "subject":{"reference":"Patient/p1"},"focus":[{"reference":"Condition/c2"}]},
               "search":{"mode":"match"}},
              {"resource":{"resourceType":"Condition","id":"c2","code":{"text":"SECRET-DX"},
                "subject":{"reference":"Patient/p2"}},"search":{"mode":"include"}}]},
             "response":{"status":"200 OK"}},
            {"resource":{"resourceType":"Observation","id":"o1",
              "subject":{"reference":"Patient/p1"}},"response":{"status":"200 OK"}}]}"#;
        let (out, left_out) = judged_bundle_answer(&checks, &b, text);
        assert_eq!(left_out, 1, "counted for the record");
        assert!(!out.contains("SECRET-DX"), "{out}");
        assert!(out.contains(r#"{"value":2.50}"#), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["entry"][0]["response"]["status"], "200 OK");
        assert_eq!(
            v["entry"][0]["resource"]["entry"].as_array().unwrap().len(),
            1
        );
        assert_eq!(v["entry"][1]["resource"]["id"], "o1");
    }

    #[test]
    fn bundle_entries_are_narrowed() {
        let body = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation?code=1"}},
            {"request": {"method": "GET", "url": "Condition"}},
            {"request": {"method": "GET", "url": "Encounter?"}}]});
        let checks = vec![
            EntryCheck {
                index: 0,
                check: ResponseCheck::in_compartment("p1"),
                narrow: vec![("patient".into(), "p1".into())],
            },
            EntryCheck {
                index: 1,
                check: ResponseCheck::in_compartment("p1"),
                narrow: vec![("category".into(), "a|b".into())],
            },
            EntryCheck {
                index: 2,
                check: ResponseCheck::in_compartment("p1"),
                narrow: vec![("patient".into(), "p1".into())],
            },
        ];
        let out: Value =
            serde_json::from_slice(&narrow_bundle(body.to_string().as_bytes(), &checks).unwrap())
                .unwrap();
        assert_eq!(
            out["entry"][0]["request"]["url"],
            "Observation?patient=p1&code=1"
        );
        assert_eq!(
            out["entry"][1]["request"]["url"],
            "Condition?category=a%7Cb"
        );
        assert_eq!(out["entry"][2]["request"]["url"], "Encounter?patient=p1");
    }

    #[test]
    fn everything_passes_shared_reference_data_only() {
        let check = ResponseCheck::Everything {
            patient: "p1".into(),
        };
        let everything = |extra: Value| {
            let body = searchset(vec![
                (json!({"resourceType": "Patient", "id": "p1"}), "match"),
                (obs("a", "p1"), "match"),
                (extra, "match"),
            ]);
            let r = classify(HttpRequest {
                method: "GET",
                path: "Patient/p1/$everything",
                query: None,
                if_none_exist: None,
            })
            .unwrap();
            judge(
                &check,
                &r,
                200,
                Some("application/fhir+json"),
                body.to_string().as_bytes(),
                &Bases::default(),
            )
        };
        assert_eq!(
            everything(json!({"resourceType": "Practitioner", "id": "d"})),
            Verdict::Pass
        );
        assert_eq!(
            everything(json!({"resourceType": "Medication", "id": "m"})),
            Verdict::Pass
        );
        for other in [
            json!({"resourceType": "Binary", "id": "b", "data": "JVBERi0="}),
            json!({"resourceType": "Bundle", "id": "d", "type": "document"}),
            json!({"resourceType": "Linkage", "id": "l"}),
            json!({"resourceType": "Patient", "id": "p2"}),
            obs("b", "p2"),
        ] {
            assert!(
                matches!(everything(other.clone()), Verdict::Refuse { .. }),
                "{other}"
            );
        }
    }
}
