//! Stage 6, decide: does the token's SMART grant allow this classified
//! request?
//!
//! Pure: takes a [`FhirRequest`], the token's [`ScopeSet`] and its patient
//! launch context, returns the scopes that allowed it or a [`ScopeDenial`]
//! naming what is missing.
//!
//! What each interaction needs follows SMART App Launch 2.x: `c` create,
//! `r` read/vread/instance history, `u` update/patch, `d` delete, `s`
//! search and type/system history. Conditional interactions also need `s`
//! (the server runs a search). Parameters that reach other resource types
//! (`_include`, `_revinclude`, `_has`, chains, `_type`) need the matching
//! grant on those types too; parameters whose reach cannot be bounded
//! (`_filter`, `_query`, `_contained`) are refused.
//!
//! Patient context. A request allowed only by `patient/` scopes must be
//! provably inside the context patient's compartment. Provable from the
//! request alone: the Patient resource itself (`Patient/{ctx}` by id,
//! `Patient?_id={ctx}`), compartment searches `Patient/{ctx}/{type}` and
//! `Patient/{ctx}/$everything`. A read, vread or instance history of a
//! compartment type is allowed with a [`ResponseCheck`]: the upstream's
//! answer must show the resource in the compartment (stage 8). Types
//! outside the compartment are never reached. Everything else under
//! patient-only grants is refused with a reason that says so.
//!
//! v2 scopes with a query filter grant only what matches their filter
//! (see `filtered_grant`); `$export` needs `system/` scopes; other
//! operations are not granted by scopes at all.

use crate::fhir::classify::{FhirRequest, Interaction, OperationLevel};
use crate::fhir::compartment::{self, Bases};
use crate::fhir::search_param::Filter;
use crate::scope::{Context, Perm, Resources, Scope, ScopeSet};

/// Why the grant does not allow the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeDenial {
    /// Human-readable reason naming the failed check.
    pub reason: String,
    /// A scope that would have allowed it, when one can be named.
    pub missing_scope: Option<String>,
}

/// What the grant allows, and what must still be proved about the answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// The raw scopes that granted the request.
    pub scopes_used: Vec<String>,
    /// Set when the request alone cannot prove that the answer stays inside
    /// the grant: the upstream's answer must be checked (stage 8).
    pub check: Option<ResponseCheck>,
    /// Search parameters (name, value) to add to the request upstream so it
    /// is narrowed to the context patient and to a scope's filter.
    pub narrow: Vec<(String, String)>,
    /// A write under `patient/` scopes: what must be proved before it may go
    /// upstream.
    pub write: Option<WriteCheck>,
    /// The same for the writes inside a batch/transaction, by entry index.
    pub entry_writes: Vec<(usize, WriteCheck)>,
    /// Reads and searches inside a batch/transaction whose answers must be
    /// checked, by entry index, with the parameters to add to the entry's
    /// URL.
    pub entry_checks: Vec<EntryCheck>,
}

/// A Bundle entry whose answer stage 8 must check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryCheck {
    pub index: usize,
    pub check: ResponseCheck,
    pub narrow: Vec<(String, String)>,
}

/// Proof a write under `patient/` or filtered scopes needs before it goes
/// upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCheck {
    /// The compartment the resource must stay in, if patient-bound.
    pub patient: Option<String>,
    /// The filters of the scopes that granted it: the resource must match
    /// one of them (`None`: no filter).
    pub filters: Option<Vec<Filter>>,
    /// The request body (the resource to create or store, or the patch)
    /// must keep the resource inside.
    pub body: bool,
    /// The resource as stored now (fetched first) must be inside; a missing
    /// one is acceptable only for an update (which then creates it).
    pub existing: bool,
}

/// What a type search under `patient/` scopes that names no patient does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnnarrowedSearch {
    /// Add the patient parameter (SMART: patient-level scopes mean "this
    /// patient's data", so the search is read as "this patient's X").
    #[default]
    Narrow,
    /// Refuse it (403), so apps must name the patient themselves.
    Refuse,
}

/// Deployment choices that shape decisions.
#[derive(Debug, Clone, Default)]
pub struct DecideOptions {
    pub unnarrowed_search: UnnarrowedSearch,
    /// Base URLs under which an absolute reference may name a patient.
    pub bases: Bases,
    /// Parameters starting with `_` the upstream defines that reach
    /// nothing beyond the request's own resources, besides those fhirwall
    /// knows ([`KNOWN_SPECIAL_PARAMS`]): `upstream.special_params`.
    pub special_params: Vec<String>,
}

impl DecideOptions {
    /// The options the configuration gives: a patient may be named under
    /// the public base and the upstream's ([`Settings::upstream_bases`]),
    /// the gateway's and `fhirwall explain`'s alike.
    ///
    /// [`Settings::upstream_bases`]: crate::config::Settings::upstream_bases
    pub fn from_settings(s: &crate::config::Settings) -> DecideOptions {
        let base = |u: &url::Url| u.as_str().trim_end_matches('/').to_string();
        DecideOptions {
            unnarrowed_search: s.unnarrowed_search,
            bases: Bases {
                urls: [base(&s.public_base)]
                    .into_iter()
                    .chain(s.upstream_bases())
                    .collect(),
                shared: s.shared_resources,
            },
            special_params: s.upstream.special_params.clone(),
        }
    }
}

/// A check stage 8 must make on the upstream's answer before it is passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseCheck {
    /// The resource read (or every version in an instance history) must be
    /// in the compartment of `Patient/{patient}` (when set) and match one of
    /// `filters` (when set); otherwise the answer is a 404 as if the
    /// resource did not exist.
    Resource {
        patient: Option<String>,
        filters: Option<Vec<Filter>>,
    },
    /// A searchset Bundle: every resource in it must be of one of
    /// `open_types` (granted by `user/` or `system/` scopes beside
    /// `patient/` ones: passed whoever's it is), or else in the compartment
    /// (when `patient` is set), of a type the scopes grant (unless `types`
    /// is `None`: a wildcard grant) and, for its matches, match one of
    /// `filters` (when set); otherwise nothing of it is passed on. A
    /// resource of one of `refused_types` (a policy rule refuses it on a
    /// stored page, `authorise.rs`) refuses the answer whatever else grants
    /// it, and so does one of a type not in R4 when any is refused (the
    /// rules were judged for R4 types only).
    Search {
        patient: Option<String>,
        types: Option<Vec<String>>,
        filters: Option<Vec<Filter>>,
        open_types: Vec<String>,
        refused_types: Vec<crate::policy::RefusedType>,
    },
    /// `Patient/{patient}/$everything`: the answer may hold resources of
    /// types outside the compartment (Practitioner, Medication, …, as the
    /// operation defines), but every resource of a compartment type must be
    /// in the compartment of `Patient/{patient}`, and no other Patient.
    Everything { patient: String },
}

impl Decision {
    /// Allowed by `scopes_used`, with nothing left to prove.
    pub fn allow(scopes_used: Vec<String>) -> Decision {
        Decision {
            scopes_used,
            ..Decision::default()
        }
    }
}

impl ResponseCheck {
    /// The read check for the compartment of `patient`, no filter.
    pub fn in_compartment(patient: &str) -> ResponseCheck {
        ResponseCheck::Resource {
            patient: Some(patient.to_string()),
            filters: None,
        }
    }
}

/// One permission the request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    perm: Perm,
    /// `None`: every resource type (a wildcard scope is needed).
    resource: Option<String>,
    /// Only scopes in this context may grant it.
    context: Option<Context>,
}

impl Need {
    fn on(perm: Perm, resource: Option<&str>) -> Need {
        Need {
            perm,
            resource: resource.map(str::to_string),
            context: None,
        }
    }

    /// Scope values that would grant this, for RFC 6750's `scope`
    /// attribute (a space-delimited list of real scopes): in the context
    /// the need is limited to, else in those the token already uses
    /// (`user/` when it uses none).
    fn scope_values(&self, held: &ScopeSet) -> String {
        let contexts: Vec<Context> = match self.context {
            Some(c) => vec![c],
            None => {
                let used: Vec<Context> = [Context::Patient, Context::User, Context::System]
                    .into_iter()
                    .filter(|c| held.has_context(*c))
                    .collect();
                if used.is_empty() {
                    vec![Context::User]
                } else {
                    used
                }
            }
        };
        contexts
            .iter()
            .map(|c| {
                format!(
                    "{}/{}.{}",
                    c.as_str(),
                    self.resource.as_deref().unwrap_or("*"),
                    self.perm.letter()
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn describe(&self) -> String {
        let ctx = self
            .context
            .map(Context::as_str)
            .unwrap_or("patient|user|system");
        format!(
            "{ctx}/{}.{}",
            self.resource.as_deref().unwrap_or("*"),
            self.perm.letter()
        )
    }
}

fn deny(reason: impl Into<String>) -> ScopeDenial {
    ScopeDenial {
        reason: reason.into(),
        missing_scope: None,
    }
}

/// Decides one request (a batch/transaction entry by entry) with the
/// default [`DecideOptions`].
pub fn decide(
    req: &FhirRequest,
    scopes: &ScopeSet,
    patient: Option<&str>,
) -> Result<Decision, ScopeDenial> {
    decide_with(req, scopes, patient, &DecideOptions::default())
}

/// Decides one request (a batch/transaction entry by entry).
pub fn decide_with(
    req: &FhirRequest,
    scopes: &ScopeSet,
    patient: Option<&str>,
    opts: &DecideOptions,
) -> Result<Decision, ScopeDenial> {
    if req.is_bundle() {
        // The Bundle's own URL parameters apply to every entry on some
        // servers (HAPI reads `_cascade` there): only formatting ones pass.
        if let Some((name, _)) = req
            .params
            .iter()
            .find(|(n, _)| !matches!(n.as_str(), "_format" | "_pretty"))
        {
            return Err(deny(format!(
                "parameter {name} on a {} is refused: it would apply to entries fhirwall decides one by one",
                req.interaction
            )));
        }
        let mut used = Vec::new();
        let mut entry_writes = Vec::new();
        let mut entry_checks = Vec::new();
        for (i, entry) in req.entries.iter().enumerate() {
            let refused = |why: String| ScopeDenial {
                reason: format!(
                    "{} entry {i} ({}) refused: {why}",
                    req.interaction, entry.interaction
                ),
                missing_scope: None,
            };
            match decide_with(entry, scopes, patient, opts) {
                // A checked vread needs the current version checked too
                // (one moved to another patient is theirs), which is done
                // for a vread alone, not inside a Bundle.
                Ok(Decision {
                    check: Some(ResponseCheck::Resource { .. }),
                    ..
                }) if entry.interaction == Interaction::Vread
                    || entry.interaction == Interaction::HistoryInstance
                        && entry
                            .params
                            .iter()
                            .any(|(n, _)| n == "_at" || n == "_since") =>
                {
                    return Err(refused(
                        "a version of a resource (vread, or a history with _at or _since) \
                         inside a Bundle cannot be checked against its current version: read it \
                         alone"
                            .into(),
                    ))
                }
                // A checked search's includes may be others' resources,
                // left out of its answer; inside a Bundle the search's
                // answer is held whole as one entry, so its size would
                // count them (a search alone is read entry by entry).
                Ok(Decision {
                    check: Some(ResponseCheck::Search { .. }),
                    ..
                }) if is_stored_page(entry)
                    || entry.params.iter().any(|(n, _)| {
                        let base = n.split(':').next().unwrap_or("");
                        matches!(base, "_include" | "_revinclude" | "_getpages" | "_pageId")
                    }) =>
                {
                    return Err(refused(
                        "a checked search's _include or _revinclude, or a stored search's page \
                         (which brings the includes of its search), inside a Bundle is \
                         refused: the resources it brings in need not be in the grant, and the \
                         entry's size would tell whether they exist; search alone"
                            .into(),
                    ))
                }
                Ok(Decision {
                    check: Some(check),
                    narrow,
                    scopes_used,
                    ..
                }) => {
                    // Its answer is checked in the batch/transaction response.
                    entry_checks.push(EntryCheck {
                        index: i,
                        check,
                        narrow,
                    });
                    used.extend(scopes_used)
                }
                Ok(Decision { write: Some(_), .. }) if entry.interaction == Interaction::Patch => {
                    return Err(refused(
                        "a PATCH inside a Bundle cannot be confined to the patient's compartment"
                            .into(),
                    ))
                }
                Ok(d) => {
                    if let Some(w) = d.write {
                        entry_writes.push((i, w));
                    }
                    used.extend(d.scopes_used)
                }
                Err(d) => {
                    return Err(ScopeDenial {
                        reason: format!(
                            "{} entry {i} ({}) refused: {}",
                            req.interaction, entry.interaction, d.reason
                        ),
                        missing_scope: d.missing_scope,
                    })
                }
            }
        }
        used.sort();
        used.dedup();
        return Ok(Decision {
            scopes_used: used,
            entry_writes,
            entry_checks,
            ..Decision::default()
        });
    }
    let needs = needs(req, &opts.special_params)?;
    if needs.is_empty() {
        return Ok(Decision::allow(Vec::new()));
    }
    // Unfiltered scopes; v2 filtered scopes are tried separately (their
    // filters must be proved on the request or the answer).
    let usable: Vec<&Scope> = scopes
        .scopes
        .iter()
        .filter(|s| s.filter.is_none())
        .collect();

    // First: can scopes that are not bound to a patient grant everything?
    let unbound = |s: &&Scope| s.context != Context::Patient;
    if let Some(used) = grant(&needs, usable.iter().copied().filter(unbound)) {
        return Ok(Decision::allow(used));
    }
    // A stored search's page under scopes that do not cover every type.
    if let Some(d) = stored_page(req, scopes, patient) {
        return Ok(d);
    }
    // Patient scopes, unfiltered: when they take the request as it is
    // (it stays in the compartment by itself, or names the patient: no
    // narrowing added), they give all of it that filtered scopes not
    // bound to a patient would, and more (`Observation?patient=p1` whole
    // rather than narrowed to `user/Observation.rs?category=…`'s filter).
    let patient_result = patient_grant(req, &needs, &usable, scopes, patient, opts);
    if let Ok(d) = &patient_result {
        let whole = d.narrow.is_empty()
            && matches!(d.check, None | Some(ResponseCheck::Search { .. }))
            && d.write.is_none();
        if whole {
            return patient_result;
        }
    }
    // Then scopes with a query filter that are not bound to a patient.
    let mut filtered_refusal = match filtered_grant(req, &needs, scopes, None, opts) {
        Some(Ok(d)) => return Ok(d),
        Some(Err(e)) => Some(e),
        None => None,
    };
    // Then patient scopes: unfiltered if the request stays in the
    // compartment, else filtered ones (compartment and filter).
    if patient_result.is_err() {
        match filtered_grant(req, &needs, scopes, Some(patient), opts) {
            Some(Ok(d)) => return Ok(d),
            Some(Err(e)) => filtered_refusal = Some(e),
            None => {}
        }
    }
    // A filtered scope that covers the request but refuses it tells more
    // than "no scope grants it".
    match (patient_result, filtered_refusal) {
        // (The scope that would grant it is still named to the client.)
        (Err(e), Some(filtered)) if e.missing_scope.is_some() => Err(ScopeDenial {
            missing_scope: e.missing_scope,
            ..filtered
        }),
        (result, _) => result,
    }
}

/// The request under unfiltered scopes including `patient/` ones: needs a
/// patient context and the compartment rules.
fn patient_grant(
    req: &FhirRequest,
    needs: &[Need],
    usable: &[&Scope],
    scopes: &ScopeSet,
    patient: Option<&str>,
    opts: &DecideOptions,
) -> Result<Decision, ScopeDenial> {
    let Some(used) = grant(needs, usable.iter().copied()) else {
        let missing = needs
            .iter()
            .find(|n| {
                !usable
                    .iter()
                    .any(|s| s.covers(n.perm, n.resource.as_deref()) && ctx_ok(s, n))
            })
            .expect("some need is unmet when grant fails");
        let filtered = scopes
            .scopes
            .iter()
            .any(|s| s.filter.is_some() && s.covers(missing.perm, missing.resource.as_deref()));
        let mut reason = format!(
            "{} needs scope {} and the token has none that grants it",
            req.interaction,
            missing.describe()
        );
        if filtered {
            reason.push_str(
                " (scopes with a query filter grant only plain reads, type searches, creates, updates \
                 and deletes of their resource type, with token filters fhirwall can evaluate)",
            );
        }
        return Err(ScopeDenial {
            reason,
            missing_scope: Some(missing.scope_values(scopes)),
        });
    };
    let Some(ctx) = patient else {
        return Err(deny(
            "the request is granted only by patient/ scopes, but the token carries no patient launch context (claim 'patient')",
        ));
    };
    if let Some(name) = stray_read_param(req) {
        return Err(deny(format!(
            "parameter {name} is not accepted on a {} under patient/ scopes",
            req.interaction
        )));
    }
    if in_patient_compartment(req, ctx) {
        return Ok(Decision::allow(used));
    }
    if req.interaction == Interaction::Operation
        && req.resource_type.as_deref() == Some("Patient")
        && req.id.as_deref() == Some(ctx)
        && matches!(&req.operation, Some((n, OperationLevel::Instance)) if n == "everything")
        && !reaches_other_types(req)
        // A stored search's id is no parameter of the operation: a server
        // might serve that search instead, or echo the id in its links.
        && !req.params.iter().any(|(n, _)| n == "_getpages" || n == "_pageId")
    {
        return Ok(Decision {
            scopes_used: used,
            check: Some(ResponseCheck::Everything {
                patient: ctx.to_string(),
            }),
            ..Decision::default()
        });
    }
    if read_checkable(req) {
        return Ok(Decision {
            scopes_used: used,
            check: Some(ResponseCheck::in_compartment(ctx)),
            ..Decision::default()
        });
    }
    if let Some(write) = patient_write(req, ctx)? {
        return Ok(Decision {
            scopes_used: used,
            write: Some(write),
            ..Decision::default()
        });
    }
    if let Some(narrow) = patient_search(req, ctx, opts)? {
        return Ok(Decision {
            scopes_used: used,
            check: Some(ResponseCheck::Search {
                patient: Some(ctx.to_string()),
                types: granted_types(usable),
                filters: None,
                open_types: Vec::new(),
                refused_types: Vec::new(),
            }),
            narrow: narrow.into_iter().collect(),
            ..Decision::default()
        });
    }
    let t = req.resource_type.as_deref().unwrap_or("");
    if !t.is_empty() && !compartment::is_compartment_type(t) {
        return Err(deny(format!(
            "{t} is not in the Patient compartment, so patient/ scopes do not reach it"
        )));
    }
    Err(deny(format!(
        "under patient/ scopes only requests provably inside the compartment of Patient/{ctx} are allowed: \
         the Patient itself, reads and type searches of resources in its compartment, Patient/{ctx}/[type] \
         compartment searches and Patient/{ctx}/$everything; this {} is not",
        req.interaction
    )))
}

/// The request under v2 scopes with a query filter, not bound to a patient
/// (`patient: None`) or bound to the token's patient (`Some(claim)`).
/// `None` when no such scope applies. Filters apply to one need on one
/// type — a read, type search, create, update or delete that reaches no
/// other type — and must be understood (see [`Filter::parse`]); a scope
/// set grants the union of its filters.
fn filtered_grant(
    req: &FhirRequest,
    needs: &[Need],
    scopes: &ScopeSet,
    patient: Option<Option<&str>>,
    opts: &DecideOptions,
) -> Option<Result<Decision, ScopeDenial>> {
    use Interaction::*;
    let [need] = needs else { return None };
    let t = need.resource.as_deref()?;
    if req.conditional
        || reaches_other_types(req)
        || !matches!(
            req.interaction,
            Read | Vread | HistoryInstance | SearchType | Create | Update | Delete
        )
    {
        return None;
    }
    let bound = patient.is_some();
    let mut used = Vec::new();
    let mut filters = Vec::new();
    for s in &scopes.scopes {
        let Some(q) = &s.filter else { continue };
        if (s.context == Context::Patient) != bound
            || !s.covers(need.perm, Some(t))
            || !ctx_ok(s, need)
        {
            continue;
        }
        if let Ok(f) = Filter::parse(t, q) {
            used.push(s.raw.clone());
            filters.push(f);
        }
    }
    if filters.is_empty() {
        return None;
    }
    let ctx = match patient {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => {
            return Some(Err(deny(
                "the request is granted only by patient/ scopes, but the token carries no patient launch context (claim 'patient')",
            )))
        }
    };
    Some(filtered_decision(req, t, ctx, filters, used, opts))
}

/// The first parameter of a read, vread or instance history that is none
/// of those a checked answer is judged with. A read takes no search
/// parameters; where its answer is checked stray ones are refused rather
/// than passed to a server that may read them (HAPI's `_offset` on a
/// history leaves out its newest versions, the one that tells whose the
/// resource now is among them).
fn stray_read_param(req: &FhirRequest) -> Option<&str> {
    if !matches!(
        req.interaction,
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance
    ) {
        return None;
    }
    req.params
        .iter()
        .find(|(n, _)| {
            !matches!(
                n.as_str(),
                "_format" | "_pretty" | "_summary" | "_elements" | "_since" | "_at" | "_count"
            )
        })
        .map(|(n, _)| n.as_str())
}

fn filtered_decision(
    req: &FhirRequest,
    t: &str,
    ctx: Option<&str>,
    filters: Vec<Filter>,
    used: Vec<String>,
    opts: &DecideOptions,
) -> Result<Decision, ScopeDenial> {
    use Interaction::*;
    let decision = |check, narrow, write| Decision {
        scopes_used: used.clone(),
        check,
        narrow,
        write,
        ..Decision::default()
    };
    match req.interaction {
        Read | Vread | HistoryInstance => {
            if let Some(name) = stray_read_param(req) {
                return Err(deny(format!(
                    "parameter {name} is not accepted on a {} under a scope with a filter",
                    req.interaction
                )));
            }
            if let Some(ctx) = ctx {
                let own_patient = t == "Patient" && req.id.as_deref() == Some(ctx);
                if !own_patient && !read_checkable(req) {
                    return Err(deny(format!(
                        "under patient/ scopes only Patient/{ctx} and resources in its compartment can be read"
                    )));
                }
            }
            Ok(decision(
                Some(ResponseCheck::Resource {
                    patient: ctx.map(str::to_string),
                    filters: Some(filters),
                }),
                Vec::new(),
                None,
            ))
        }
        SearchType => {
            let mut narrow = Vec::new();
            // Only the query confines: a form body may go unread upstream.
            if !filters.iter().any(|f| f.carried_by(req.query_params())) {
                narrow.extend(filter_narrowing(&filters));
            }
            if let Some(ctx) = ctx {
                match patient_search(req, ctx, opts)? {
                    Some(n) => narrow.extend(n),
                    None => {
                        return Err(deny(format!(
                            "this search cannot be confined to Patient/{ctx}"
                        )))
                    }
                }
            }
            Ok(decision(
                Some(ResponseCheck::Search {
                    patient: ctx.map(str::to_string),
                    types: Some(vec![t.to_string()]),
                    filters: Some(filters),
                    open_types: Vec::new(),
                    refused_types: Vec::new(),
                }),
                narrow,
                None,
            ))
        }
        _ => {
            let mut w = match ctx {
                Some(ctx) => patient_write(req, ctx)?.ok_or_else(|| deny("not a write"))?,
                None => WriteCheck {
                    patient: None,
                    filters: None,
                    body: req.interaction != Delete,
                    existing: req.interaction != Create,
                },
            };
            w.filters = Some(filters);
            Ok(decision(None, Vec::new(), Some(w)))
        }
    }
}

/// Parameters that narrow a search to the filters' union: one parameter
/// with the values OR-ed when every filter is one value of the same
/// parameter, else the first filter's parameters (narrower than the union).
fn filter_narrowing(filters: &[Filter]) -> Vec<(String, String)> {
    let first = &filters[0].params;
    let same_param = filters
        .iter()
        .all(|f| f.params.len() == 1 && f.params[0].0 == first[0].0);
    if same_param {
        let values: Vec<&str> = filters.iter().map(|f| f.params[0].1.as_str()).collect();
        vec![(first[0].0.clone(), values.join(","))]
    } else {
        first.clone()
    }
}

/// A write under patient-only scopes: `Ok(Some(check))` when it can be
/// proved to keep the compartment, `Ok(None)` when this is not a write.
fn patient_write(req: &FhirRequest, ctx: &str) -> Result<Option<WriteCheck>, ScopeDenial> {
    use Interaction::*;
    if !matches!(req.interaction, Create | Update | Patch | Delete) {
        return Ok(None);
    }
    if req.conditional {
        return Err(deny(format!(
            "conditional {} is refused under patient/ scopes: its target is chosen by a search \
             fhirwall cannot confine to Patient/{ctx}",
            req.interaction
        )));
    }
    // The patient/ scopes that grant the searches do not confine them: the
    // server resolves a conditional reference across every record.
    if let Some(r) = req.reference_searches.first() {
        return Err(deny(format!(
            "a {} with a conditional reference (a search of {}) is refused under patient/ \
             scopes: the server would resolve it by a search fhirwall cannot confine to \
             Patient/{ctx}",
            req.interaction,
            r.resource_type.as_deref().unwrap_or("any type")
        )));
    }
    // Parameters on a write can widen it (e.g. HAPI's `_cascade=delete`
    // deletes other resources, possibly other patients'); only formatting
    // ones pass.
    if let Some((name, _)) = req
        .params
        .iter()
        .find(|(n, _)| !matches!(n.as_str(), "_format" | "_pretty"))
    {
        return Err(deny(format!(
            "parameter {name} on a {} is refused under patient/ scopes",
            req.interaction
        )));
    }
    let t = req.resource_type.as_deref().unwrap_or("");
    if t == "Patient" {
        return match (req.interaction, req.id.as_deref()) {
            // The stored record is fetched too: one linked to another
            // patient's record (`Patient.link`) is shared with it, so not
            // writable, and the write is pinned to the version checked.
            (Update | Patch, Some(id)) if id == ctx => Ok(Some(WriteCheck {
                patient: Some(ctx.into()),
                filters: None,
                body: true,
                existing: true,
            })),
            (Create, _) => Err(deny(format!(
                "creating a Patient is outside the compartment of Patient/{ctx}"
            ))),
            _ => Err(deny(format!(
                "under patient/ scopes only Patient/{ctx} itself may be written, not Patient/{}",
                req.id.as_deref().unwrap_or("")
            ))),
        };
    }
    if compartment::link_params(t).is_empty() {
        return Err(deny(format!(
            "{t} is not in the Patient compartment, so patient/ scopes do not reach it"
        )));
    }
    Ok(Some(WriteCheck {
        patient: Some(ctx.into()),
        filters: None,
        body: req.interaction != Delete,
        existing: req.interaction != Create,
    }))
}

/// Parameters that only page through, format or count a result: a search
/// made only of them (a server's paging link) names nothing.
const PAGING_PARAMS: &[&str] = &[
    // HAPI repeats the search's includes in its paging links; a page's
    // every entry is judged whatever they are.
    "_include",
    "_include:iterate",
    "_include:recurse",
    "_revinclude",
    "_revinclude:iterate",
    "_revinclude:recurse",
    "_getpages",
    "_getpagesoffset",
    "_pageId",
    "_page",
    "_offset",
    "_count",
    "_bundletype",
    "_format",
    "_pretty",
];

/// A server's paging link (`?_getpages=…`, `?_pageId=…`) and nothing else
/// that names what is searched.
pub fn is_stored_page(req: &FhirRequest) -> bool {
    req.interaction == Interaction::SearchSystem
        && req
            .params
            .iter()
            .any(|(n, _)| matches!(n.as_str(), "_getpages" | "_pageId"))
        && req
            .params
            .iter()
            .all(|(n, _)| PAGING_PARAMS.contains(&n.as_str()))
        // HAPI relabels a page as asked: a history page called a searchset
        // would be judged as one.
        && req
            .params
            .iter()
            .all(|(n, v)| n != "_bundletype" || v == "searchset")
}

/// A stored search's page under scopes that search some types but not
/// every one, or some only within a patient's compartment or a filter.
/// The server serves whatever search the page id names, so the page is
/// checked instead: passed on only if every resource in it is of a type
/// those scopes search, in the patient's compartment where they are
/// `patient/` scopes, and matching a scope's filter where the only scopes
/// for its type have one. `user/` (or `system/`) scopes beside `patient/`
/// ones let their types through whoever's they are (an EHR launch's
/// pages of the patient's own searches pass too); filtered scopes are
/// then left aside.
fn stored_page(req: &FhirRequest, scopes: &ScopeSet, patient: Option<&str>) -> Option<Decision> {
    if !is_stored_page(req) {
        return None;
    }
    let searching = |bound: bool, filtered: bool| -> Vec<&Scope> {
        scopes
            .scopes
            .iter()
            .filter(|s| {
                (s.context == Context::Patient) == bound
                    && s.filter.is_some() == filtered
                    && s.perms.contains(Perm::Search)
            })
            .collect()
    };
    let bound_ok = patient.is_some();
    let (unbound, bound) = (searching(false, false), searching(true, false));
    let (unbound_f, bound_f) = (searching(false, true), searching(true, true));
    let bound_any = bound_ok && (!bound.is_empty() || !bound_f.is_empty());
    let unbound_any = !unbound.is_empty() || !unbound_f.is_empty();
    let mut used: Vec<&Scope> = Vec::new();
    let check = match (unbound_any, bound_any) {
        (false, false) => return None,
        // Both: the patient's types in the compartment, the user's open.
        (true, true) if !unbound.is_empty() && !bound.is_empty() => {
            used.extend(unbound.iter().chain(&bound));
            match granted_types(&unbound) {
                Some(open_types) => ResponseCheck::Search {
                    patient: patient.map(str::to_string),
                    types: granted_types(&bound),
                    filters: None,
                    open_types,
                    refused_types: Vec::new(),
                },
                None => ResponseCheck::Search {
                    patient: None,
                    types: None,
                    filters: None,
                    open_types: Vec::new(),
                    refused_types: Vec::new(),
                },
            }
        }
        // One kind only (or, of both, one has filtered scopes only: those
        // are left aside).
        (u, b) => {
            let patient_side = b && (!u || unbound.is_empty());
            let (plain, filtered) = if patient_side {
                (&bound, &bound_f)
            } else {
                (&unbound, &unbound_f)
            };
            // A filter binds a type only when no plain scope covers it.
            let mut filters = Vec::new();
            let mut filtered_types = Vec::new();
            for s in filtered.iter() {
                let Resources::Type(t) = &s.resources else {
                    continue;
                };
                if plain.iter().any(|p| p.covers(Perm::Search, Some(t))) {
                    continue;
                }
                let Some(f) = s.filter.as_deref().and_then(|q| Filter::parse(t, q).ok()) else {
                    continue;
                };
                filters.push(f);
                filtered_types.push(t.clone());
                used.push(s);
            }
            used.extend(plain.iter());
            if used.is_empty() {
                return None;
            }
            let types = granted_types(plain).map(|mut types| {
                types.extend(filtered_types);
                types.sort();
                types.dedup();
                types
            });
            ResponseCheck::Search {
                patient: patient.filter(|_| patient_side).map(str::to_string),
                types,
                filters: (!filters.is_empty()).then_some(filters),
                open_types: Vec::new(),
                refused_types: Vec::new(),
            }
        }
    };
    let mut used: Vec<String> = used.iter().map(|s| s.raw.clone()).collect();
    used.sort();
    used.dedup();
    Some(Decision {
        scopes_used: used,
        check: Some(check),
        ..Decision::default()
    })
}

/// A search under patient-only scopes: `Ok(Some(narrow))` when it can go
/// upstream (with the answer checked), `narrow` being the parameter to add
/// when the request names no patient; `Ok(None)` when this is not such a
/// search; an error when it names another patient or may not be narrowed.
#[allow(clippy::type_complexity)]
fn patient_search(
    req: &FhirRequest,
    ctx: &str,
    opts: &DecideOptions,
) -> Result<Option<Option<(String, String)>>, ScopeDenial> {
    // A server's paging link (`?_getpages=…`): nothing to narrow; every page
    // is checked. It must carry a page id: `?_summary=count` alone would
    // count every patient's resources.
    if is_stored_page(req) {
        return Ok(Some(None));
    }
    // Whatever the search and the parameter (chains and non-compartment
    // ones too), no value may name another patient (`Patient/x`, a Patient
    // URL, or a bare id in a parameter called `patient`, which in FHIR
    // always means one, or in `_id` of a search for Patients, type-level or
    // in a compartment).
    let searches_patients = req.resource_type.as_deref() == Some("Patient");
    for (name, value) in &req.params {
        let base = name.split(['.', ':']).next().unwrap_or("");
        let modifier = name
            .split('.')
            .next()
            .and_then(|h| h.split_once(':'))
            .map(|(_, m)| m);
        if searches_patients && base == "_id" && name != "_id" {
            return Err(deny(format!(
                "under patient/ scopes {name} is refused on a search for Patients: only \
                 Patient/{ctx} itself is reachable"
            )));
        }
        // A chained sort (`_sort=Condition:focus.code`) orders the
        // patient's resources by values of the resources they link to,
        // which need not be the patient's: repeated, the order tells those
        // values.
        if base == "_sort" && value.split(',').any(|k| k.contains('.')) {
            return Err(deny(format!(
                "under patient/ scopes a chained sort ({name}={value}) is refused: the resources \
                 it sorts by need not be Patient/{ctx}'s"
            )));
        }
        // `_list=id` tests membership in List/id (HAPI searches it as
        // `_has:List:item:_id=id`), which need not be the patient's: the
        // answer would tell whether the patient is on another's List (a
        // worklist, another patient's).
        if base == "_list" {
            return Err(deny(format!(
                "under patient/ scopes {name} is refused: the List it names need not be \
                 Patient/{ctx}'s, and the answer would tell whether it holds the patient's \
                 resources"
            )));
        }
        // Microsoft's `_not-referenced=Type:param`: the matches no `Type`
        // resource points to, whoever's it is (another patient's
        // Observation naming p1 as performer), and whatever the type.
        if base == "_not-referenced" {
            return Err(deny(format!(
                "under patient/ scopes {name} is refused: the resources it tests need not be \
                 Patient/{ctx}'s"
            )));
        }
        let bare = bare_id_is_patient(name, base, modifier, searches_patients);
        for v in value.split(',') {
            if let Some(other) = named_patient(v, bare, &opts.bases).filter(|id| *id != ctx) {
                return Err(names_other(name, other, ctx));
            }
        }
    }
    if req.interaction == Interaction::SearchCompartment
        && !reaches_other_types(req)
        && req
            .compartment
            .as_ref()
            .is_some_and(|c| c.resource_type == "Patient" && c.id == ctx)
    {
        // Patient/{ctx}/[type]: narrowed by its path; the answer is still
        // checked, in case the upstream does not implement compartments.
        return Ok(Some(None));
    }
    if req.interaction != Interaction::SearchType || req.conditional {
        return Ok(None);
    }
    let t = req.resource_type.as_deref().unwrap_or("");
    let (narrowed, add) = if t == "Patient" {
        // The Patient is in its own compartment by id only.
        let mut named = false;
        // Only the query's parameters confine the search: a form body's are
        // checked alike, but the narrowing is then added to the query.
        let in_query = req.query_params().len();
        for (i, (name, value)) in req.params.iter().enumerate() {
            if name == "_id" {
                if value != ctx {
                    let other = value.split(',').find(|v| *v != ctx).unwrap_or(value);
                    return Err(names_other(name, other, ctx));
                }
                named |= i < in_query;
            } else if let Some(has) = name.strip_prefix("_has:") {
                // `_has:X:p:…` on Patient: X resources whose `p` is this
                // patient — inside only when `p` links X to a Patient.
                let mut parts = has.split(':');
                let (x, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let inner = parts.collect::<Vec<_>>().join(":");
                if inner.contains('.') || inner.starts_with("_has") {
                    return Err(deny(format!(
                        "under patient/ scopes {name} may not chain further: the resources it \
                         would test need not be Patient/{ctx}'s"
                    )));
                }
                // (A Patient is in its own compartment by id only: one
                // whose `link` names this patient is another's record.)
                let links_back = compartment::link_params(x)
                    .iter()
                    .any(|l| l.name == p && !(x == "Patient" && p == "link"));
                if !links_back {
                    return Err(deny(format!(
                        "under patient/ scopes {name} must reach back through a parameter that \
                         links {x} to the patient, which '{p}' does not"
                    )));
                }
            } else if name.contains('.') {
                return Err(deny(format!(
                    "under patient/ scopes a Patient search may not chain ({name}): the chained \
                     resources need not be Patient/{ctx}'s"
                )));
            } else if name == "link" || name.starts_with("link:") {
                return Err(deny(format!(
                    "under patient/ scopes Patient searches may not follow links ({name}): \
                     only Patient/{ctx} itself is reachable"
                )));
            }
        }
        (named, ("_id".to_string(), ctx.to_string()))
    } else {
        let links = compartment::link_params(t);
        if links.is_empty() {
            return Err(deny(format!(
                "{t} is not in the Patient compartment, so patient/ scopes do not reach it"
            )));
        }
        let mut narrowed = false;
        let in_query = req.query_params().len();
        for (i, (name, value)) in req.params.iter().enumerate() {
            let (head, chained) = match name.split_once('.') {
                Some((h, _)) => (h, true),
                None => (name.as_str(), false),
            };
            let (base, modifier) = match head.split_once(':') {
                Some((b, m)) => (b, Some(m)),
                None => (head, None),
            };
            if name.starts_with("_has:") {
                return Err(deny(format!(
                    "under patient/ scopes {name} is refused on {t}: the resources it tests need \
                     not be Patient/{ctx}'s"
                )));
            }
            let link = links.iter().find(|l| l.name == base);
            if chained {
                // Even through a compartment parameter a chain can test
                // another patient (performer, Group.member, Account.subject
                // hold several; later hops go anywhere).
                return Err(deny(format!(
                    "under patient/ scopes chained parameters ({name}) are refused: the chained \
                     resources need not be Patient/{ctx}'s"
                )));
            }
            let Some(link) = link else {
                continue;
            };
            if chained || !matches!(modifier, None | Some("Patient")) {
                // Chains and other modifiers filter further; they never name
                // the patient that narrows the search.
                continue;
            }
            let bare_is_patient = link.patient_only || modifier == Some("Patient");
            let mut names_ctx = true;
            for v in value.split(',') {
                match named_patient(v, bare_is_patient, &opts.bases) {
                    Some(id) if id == ctx => {}
                    Some(other) => return Err(names_other(name, other, ctx)),
                    None => names_ctx = false,
                }
            }
            // One value only: `a,b` is an OR, wider than the patient; and
            // in the query (see `in_query`).
            narrowed |= names_ctx && !value.contains(',') && i < in_query;
        }
        let add = match links.iter().find(|l| l.patient_only) {
            Some(l) => (l.name.to_string(), ctx.to_string()),
            None => (links[0].name.to_string(), format!("Patient/{ctx}")),
        };
        (narrowed, add)
    };
    if narrowed {
        return Ok(Some(None));
    }
    match opts.unnarrowed_search {
        UnnarrowedSearch::Narrow => Ok(Some(Some(add))),
        UnnarrowedSearch::Refuse => Err(deny(format!(
            "under patient/ scopes a {t} search must name the context patient \
             (e.g. {}={}); this deployment does not add it",
            add.0, add.1
        ))),
    }
}

/// The resource types the scopes let an answer hold (read or search);
/// `None` when a wildcard scope covers every type.
fn granted_types(scopes: &[&Scope]) -> Option<Vec<String>> {
    let reach = |s: &&&Scope| s.perms.contains(Perm::Read) || s.perms.contains(Perm::Search);
    if scopes
        .iter()
        .filter(reach)
        .any(|s| s.resources == Resources::All)
    {
        return None;
    }
    let mut types: Vec<String> = scopes
        .iter()
        .filter(reach)
        .filter_map(|s| match &s.resources {
            Resources::Type(t) => Some(t.clone()),
            Resources::All => None,
        })
        .collect();
    types.sort();
    types.dedup();
    Some(types)
}

/// Names the other patient (what a security review needs), never the
/// rest of the value: other values in it may be a name or a birth date.
fn names_other(name: &str, other: &str, ctx: &str) -> ScopeDenial {
    // Shown only when it is spelt as a FHIR id: anything else the client
    // typed (a name, a birth date) stays out of the denial and the audit.
    let named = if spelt_as_id(other) {
        format!("patient '{other}'")
    } else {
        "a patient".to_string()
    };
    deny(format!(
        "search parameter {name} names {named}, other than the token's (Patient/{ctx})"
    ))
}

/// The patient a reference search value names, if it names one:
/// `Patient/{id}` or `{base}/Patient/{id}` under a known base give the id;
/// a Patient URL on any other server gives the whole URL (never equal to
/// the context patient's id, so it counts as another patient); a bare
/// `{id}` counts where the parameter can only mean a Patient.
fn named_patient<'a>(value: &'a str, bare_is_patient: bool, bases: &Bases) -> Option<&'a str> {
    if let Some(id) = value.strip_prefix("Patient/") {
        return Some(id);
    }
    if value.contains("://") {
        let (prefix, id) = value.rsplit_once("/Patient/")?;
        if id.is_empty() || id.contains('/') {
            return None;
        }
        return Some(if bases.urls.iter().any(|b| b == prefix) {
            id
        } else {
            value
        });
    }
    if value.contains('/') {
        return None;
    }
    bare_is_patient.then_some(value)
}

/// Whether a bare id in parameter `name` (its `base` and `modifier`) is a
/// Patient's: in one called `patient`, which in FHIR always means one, or
/// in `_id` of a search for Patients.
fn bare_id_is_patient(
    name: &str,
    base: &str,
    modifier: Option<&str>,
    searches_patients: bool,
) -> bool {
    base == "patient" && matches!(modifier, None | Some("Patient"))
        || searches_patients && name == "_id"
}

/// Spelt as a FHIR id (what may be shown in a denial or the audit: not a
/// name or a birth date the client typed).
fn spelt_as_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The patients a request names, by id: its `Patient/{id}` (read, history,
/// operation, compartment), and the patients its parameters name
/// (`patient=`, a `Patient/{id}` reference, a Patient search's `_id`),
/// also in a Bundle's entries; only values spelt as FHIR ids, at most 32.
/// Whose data it reaches, for the audit, whatever the token's launch
/// patient (under `user/` scopes, `Observation?patient=p2` reads p2's).
pub fn patients_named(req: &FhirRequest, bases: &Bases) -> Vec<String> {
    let mut named = Vec::new();
    each_patient_named(req, bases, |id| named.push(id));
    patients_of(&named)
}

/// What [`patients_named`] keeps of the values [`each_patient_named`]
/// gave: those spelt as FHIR ids, once each, at most 32.
pub fn patients_of(named: &[&str]) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for id in named {
        if spelt_as_id(id) && kept.len() < 32 && !kept.iter().any(|n| n == id) {
            kept.push(id.to_string());
        }
    }
    kept
}

/// Every value by which `req` names a patient, as written (any length,
/// any characters, every one): what [`patients_named`] keeps of, and what
/// `classify::numeric_alias` looks at whole. Beside `patient=` and
/// `Patient/{id}` references, a `:Patient` modifier's bare id
/// (`subject:Patient=123`), a chain to a patient's `_id`
/// (`patient._id=123`), and the search of a conditional create.
pub fn each_patient_named<'r>(req: &'r FhirRequest, bases: &Bases, mut f: impl FnMut(&'r str)) {
    for r in std::iter::once(req).chain(&req.entries) {
        if let Some(c) = r
            .compartment
            .as_ref()
            .filter(|c| c.resource_type == "Patient")
        {
            f(&c.id);
        }
        let searches_patients = r.resource_type.as_deref() == Some("Patient");
        if searches_patients {
            if let Some(id) = &r.id {
                f(id);
            }
        }
        for (name, value) in r.params.iter().chain(&r.condition) {
            // A chain's value names what it chains to, not a patient,
            // unless it chains to a patient's own id.
            let (name, chained_id) = match name.split_once('.') {
                Some((link, "_id")) => (link, true),
                Some(_) => continue,
                None => (name.as_str(), false),
            };
            let (base, modifier) = match name.split_once(':') {
                Some((b, m)) => (b, Some(m)),
                None => (name, None),
            };
            let bare = bare_id_is_patient(name, base, modifier, searches_patients && !chained_id)
                || modifier == Some("Patient")
                || chained_id && base == "patient";
            for v in value.split(',') {
                if let Some(id) = named_patient(v, bare, bases) {
                    f(id.split_once("/_history/").map_or(id, |(id, _)| id));
                }
            }
        }
    }
}

/// A read, vread or instance history of a (non-Patient) compartment type,
/// with nothing that reaches further: its answer can be checked.
fn read_checkable(req: &FhirRequest) -> bool {
    matches!(
        req.interaction,
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance
    ) && !req.conditional
        && !reaches_other_types(req)
        && req
            .resource_type
            .as_deref()
            .is_some_and(|t| t != "Patient" && !compartment::link_params(t).is_empty())
}

fn ctx_ok(s: &Scope, n: &Need) -> bool {
    n.context.is_none_or(|c| c == s.context)
}

/// Every need granted by some scope: the raw scopes used, or `None`.
fn grant<'a>(
    needs: &[Need],
    scopes: impl Iterator<Item = &'a Scope> + Clone,
) -> Option<Vec<String>> {
    let mut used = Vec::new();
    for n in needs {
        let s = scopes
            .clone()
            .find(|s| s.covers(n.perm, n.resource.as_deref()) && ctx_ok(s, n))?;
        if !used.contains(&s.raw) {
            used.push(s.raw.clone());
        }
    }
    Some(used)
}

/// What a single (non-bundle) request needs.
fn needs(req: &FhirRequest, special: &[String]) -> Result<Vec<Need>, ScopeDenial> {
    let mut needs = own_needs(req)?;
    needs.extend(reaching_needs(req, special)?);
    Ok(needs)
}

/// What the interaction itself needs.
fn own_needs(req: &FhirRequest) -> Result<Vec<Need>, ScopeDenial> {
    use Interaction::*;
    let t = req.resource_type.as_deref();
    Ok(match req.interaction {
        Read | Vread | HistoryInstance => vec![Need::on(Perm::Read, t)],
        Update | Patch => vec![Need::on(Perm::Update, t)],
        Delete => vec![Need::on(Perm::Delete, t)],
        Create => vec![Need::on(Perm::Create, t)],
        SearchType | HistoryType | SearchCompartment => vec![Need::on(Perm::Search, t)],
        SearchSystem => match type_list(req) {
            Some(types) => types
                .into_iter()
                .map(|ty| Need::on(Perm::Search, Some(ty)))
                .collect(),
            None => vec![Need::on(Perm::Search, None)],
        },
        // R4's whole-system history takes `_count`, `_since`, `_at` and
        // `_list`, not `_type`: a server that ignores it (HAPI does) answers
        // with every type, so `_type` narrows nothing here.
        HistorySystem => vec![Need::on(Perm::Search, None)],
        Capabilities => Vec::new(),
        Batch | Transaction => unreachable!("bundles are decided entry by entry"),
        Operation => operation_needs(req)?,
    })
}

/// What the request's parameters, conditional search and conditional
/// references reach beyond the interaction itself; `special`: the
/// upstream's own `_` parameters ([`DecideOptions::special_params`]).
fn reaching_needs(req: &FhirRequest, special: &[String]) -> Result<Vec<Need>, ScopeDenial> {
    let t = req.resource_type.as_deref();
    let mut needs = Vec::new();
    if req.conditional {
        needs.push(Need::on(Perm::Search, t));
        // The server runs the If-None-Exist search: its parameters reach
        // what a query's would (an answer of 200 or 201 tells a match).
        needs.extend(param_needs(&req.condition, special)?);
    }
    needs.extend(param_needs(&req.params, special)?);
    // Conditional references in a written resource: the server searches
    // to resolve them, and whether the write succeeds tells the answer.
    for r in &req.reference_searches {
        needs.push(Need::on(Perm::Search, r.resource_type.as_deref()));
        needs.extend(param_needs(&r.params, special)?);
    }
    Ok(needs)
}

/// The resource types a request (not a Bundle) reaches, for the policies:
/// every type its scopes must cover — its own, and those its includes,
/// `_has`, chains and conditional searches reach — and `true` when it may
/// reach any type (a whole-system search or history, `$everything`,
/// `$export`, an include of `*` or without a target type). A request the
/// scopes could not judge reaches any type. `by_nature: false` leaves out
/// what the interaction reaches by itself (an operation a rule allowed by
/// name), keeping what its parameters reach. `special`: the upstream's
/// own `_` parameters ([`DecideOptions::special_params`]).
pub fn reached_types(
    req: &FhirRequest,
    by_nature: bool,
    special: &[String],
) -> (bool, Vec<String>) {
    if req.is_bundle() {
        return (false, Vec::new());
    }
    // The interaction's own type is the policies' own business; beyond it,
    // what it reaches by nature (a system search: `_type`'s or any) and by
    // its parameters.
    let own = match req.interaction {
        _ if !by_nature => Ok(Vec::new()),
        Interaction::SearchSystem | Interaction::HistorySystem | Interaction::Operation => {
            own_needs(req)
        }
        // Any other interaction reaching every type by nature
        // (`Patient/p1/*`).
        _ => own_needs(req).map(|n| n.into_iter().filter(|n| n.resource.is_none()).collect()),
    };
    let Ok(needs) = own.and_then(|mut n| {
        n.extend(reaching_needs(req, special)?);
        Ok(n)
    }) else {
        return (true, Vec::new());
    };
    let mut any = false;
    let mut types: Vec<String> = Vec::new();
    for n in needs {
        match n.resource {
            None => any = true,
            Some(t) if !types.contains(&t) => types.push(t),
            Some(_) => {}
        }
    }
    (any, types)
}

/// `_type=A,B` of a system search, when present and well-formed (R4
/// defines it for the whole-system search, not for history).
fn type_list(req: &FhirRequest) -> Option<Vec<&str>> {
    // Only the query confines: a server may leave a form body unread (as
    // HAPI does one sent with a Content-Encoding), and search every type.
    let query = req.query_params();
    if req.params[query.len()..].iter().any(|(n, _)| n == "_type") {
        return None;
    }
    let mut values = query.iter().filter(|(n, _)| n == "_type");
    let (_, v) = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let types: Vec<&str> = v.split(',').collect();
    types
        .iter()
        .all(|t| crate::fhir::resource_types::is_resource_type(t))
        .then_some(types)
}

fn operation_needs(req: &FhirRequest) -> Result<Vec<Need>, ScopeDenial> {
    let (name, level) = req
        .operation
        .as_ref()
        .expect("operation interaction has an operation");
    let t = req.resource_type.as_deref();
    match (name.as_str(), level, t) {
        ("everything", OperationLevel::Instance | OperationLevel::Type, Some("Patient")) => {
            Ok(vec![
                Need::on(Perm::Read, None),
                Need::on(Perm::Search, None),
            ])
        }
        ("export", OperationLevel::System, None)
        | ("export", OperationLevel::Type, Some("Patient"))
        | ("export", OperationLevel::Instance, Some("Group")) => Ok([Perm::Read, Perm::Search]
            .into_iter()
            .map(|perm| Need {
                perm,
                resource: None,
                context: Some(Context::System),
            })
            .collect()),
        _ => Err(deny(format!(
            "operation ${name} is not granted by SMART scopes; no policy allows it"
        ))),
    }
}

/// The first parameter that reaches resources beyond the ones a request
/// names, for routes that need no token: every parameter a grant would
/// have to cover or that is refused outright ([`param_needs`]: includes,
/// `_has`, chains, a stored search's page, `_filter`, `_query`,
/// `_contained`, …), and besides those `_type`, `_list` and the modifiers
/// that read other resources (`:in`, `:not-in` on a ValueSet, HAPI's
/// `:mdm`). `special`: the upstream's own `_` parameters
/// ([`DecideOptions::special_params`]), which reach nothing.
pub fn reaching_param<'p>(params: &'p [(String, String)], special: &[String]) -> Option<&'p str> {
    params
        .iter()
        .find(|p| {
            let name = p.0.as_str();
            let mut parts = name.split(':');
            let base = parts.next().unwrap_or(name);
            param_needs(std::slice::from_ref(*p), special).map_or(true, |n| !n.is_empty())
                || matches!(base, "_has" | "_type" | "_list")
                || parts.any(|m| matches!(m, "in" | "not-in" | "mdm"))
        })
        .map(|p| p.0.as_str())
}

/// Parameters that reach other resource types, and ones refused outright;
/// `special`: the upstream's own `_` parameters that reach nothing
/// ([`DecideOptions::special_params`]).
fn param_needs(params: &[(String, String)], special: &[String]) -> Result<Vec<Need>, ScopeDenial> {
    // Which of two stored pages a server serves is its choice, and a
    // page fhirwall could not name is judged as no operation's page (a
    // `$everything`'s rules, its limits, would not hold for it).
    let ids = params
        .iter()
        .filter(|(n, _)| matches!(n.as_str(), "_getpages" | "_pageId"))
        .count();
    if ids > 1 {
        return Err(deny(
            "more than one stored search page id (_getpages, _pageId): which page the server \
             serves would be its choice",
        ));
    }
    let mut needs = Vec::new();
    for (name, value) in params {
        let base = name.split(':').next().unwrap_or(name);
        match base {
            "_filter" | "_query" | "_contained" | "_containedType" => {
                return Err(deny(format!(
                    "search parameter {base} cannot be bounded to the grant and is refused"
                )))
            }
            // A server-side cascade (HAPI) deletes resources the scopes were
            // never checked against.
            "_cascade" => {
                return Err(deny(
                    "_cascade is refused: a cascading delete reaches resources the token's grant \
                     was not checked against",
                ))
            }
            // A page of a stored search: HAPI serves whatever search the id
            // names, whoever ran it and whatever types it holds, so only a
            // grant on every type covers it.
            "_getpages" | "_getpagesoffset" | "_pageId" => {
                needs.push(Need::on(Perm::Read, None));
                needs.push(Need::on(Perm::Search, None));
            }
            "_include" | "_revinclude" => {
                // value: Source:param[:Target] or *. A `*` parameter
                // (`Observation:*:Patient`) includes whatever the matches
                // reference, the target notwithstanding (HAPI's match-all
                // does not apply it): any type. A reverse one
                // (`Observation:*`) still returns its source type only.
                let mut parts = value.split(':');
                let source = parts.next().unwrap_or("");
                let param = parts.next();
                let target = parts.next();
                let reached = if base != "_include" {
                    Some(source)
                } else if param == Some("*") {
                    None
                } else {
                    target
                };
                let reached = reached
                    .filter(|t| *t != "*" && crate::fhir::resource_types::is_resource_type(t));
                needs.push(Need::on(Perm::Read, reached));
                needs.push(Need::on(Perm::Search, reached));
            }
            _ if name.starts_with("_has:") || name.contains('.') => chain_needs(name, &mut needs),
            // `_list=id`: the List resource's entries. HAPI runs it as
            // `_has:List:item:_id=id`, a search of Lists.
            "_list" => {
                needs.push(Need::on(Perm::Read, Some("List")));
                needs.push(Need::on(Perm::Search, Some("List")));
            }
            // A chained sort (`_sort=subject.birthdate`, HAPI): the order
            // tells the linked resources' values, so it searches their type
            // like a chain.
            "_sort" => {
                for key in value.split(',') {
                    let key = key.trim().trim_start_matches('-');
                    if key.contains('.') {
                        chain_needs(key, &mut needs);
                    }
                }
            }
            // Microsoft's reverse-reference test (`Type:param`, `*:*`):
            // the matches no `Type.param` points to, the complement of a
            // `_has`, which tells who has such resources.
            "_not-referenced" => {
                let ty = value
                    .split(':')
                    .next()
                    .filter(|t| crate::fhir::resource_types::is_resource_type(t));
                needs.push(Need::on(Perm::Search, ty));
            }
            // A parameter starting with `_` is the server's to define, and
            // servers keep adding ones that read other resources
            // (Microsoft's `_not-referenced`), or match names whatever
            // their case (`_LIST` as `_list`): one fhirwall does not know,
            // spelt exactly, is refused rather than passed unjudged.
            _ if base.starts_with('_')
                && !KNOWN_SPECIAL_PARAMS.contains(&base)
                && !special.iter().any(|s| s == base) =>
            {
                return Err(deny(format!(
                    "parameter {base} is not one fhirwall knows (names starting with '_' are \
                     matched exactly, case included: a server may read an unknown one as \
                     reaching other resources); if the upstream defines it and it reaches \
                     nothing beyond the resources the request names, list it in \
                     upstream.special_params"
                )))
            }
            _ => {}
        }
    }
    Ok(needs)
}

/// Parameters starting with `_` that fhirwall knows (besides those
/// [`param_needs`] judges or refuses by name): FHIR R4's common and result
/// parameters, history's, paging ones (HAPI, IBM, Google, Medplum),
/// `$export`'s (Bulk Data, and Microsoft's), deletes without history
/// (Microsoft's `_hardDelete`, HAPI's `_expunge`), and HAPI's `_language`,
/// `_narrative`. (HAPI's `_mdm` is not: it brings linked patients.)
/// None of them reaches a resource the request does not name.
pub const KNOWN_SPECIAL_PARAMS: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_source",
    "_text",
    "_content",
    "_type",
    "_has",
    "_count",
    "_summary",
    "_total",
    "_elements",
    "_format",
    "_pretty",
    "_since",
    "_at",
    "_offset",
    "_page",
    "_page_token",
    "_bundletype",
    "_language",
    "_narrative",
    "_outputFormat",
    "_typeFilter",
    "_until",
    "_till",
    "_container",
    "_anonymizationConfig",
    "_anonymizationConfigEtag",
    "_anonymizationConfigCollectionReference",
    "_isParallel",
    "_maxCount",
    "_includeHistory",
    "_includeDeleted",
    // Deletes that leave no history (Microsoft, Smile/HAPI), paging and
    // history markers (Medplum's cursor, IBM's).
    "_hardDelete",
    "_expunge",
    "_cursor",
    "_before",
    "_changeIdMarker",
];

/// Parameters starting with `_` that [`param_needs`] judges by name (what
/// they reach, or refuses them), and HAPI's `_mdm` (it brings linked
/// patients), `_type` (it narrows a system search), `_has`: none may be
/// declared as reaching nothing (`upstream.special_params`), in any case.
pub const JUDGED_SPECIAL_PARAMS: &[&str] = &[
    "_filter",
    "_query",
    "_contained",
    "_containedType",
    "_cascade",
    "_getpages",
    "_getpagesoffset",
    "_pageId",
    "_include",
    "_revinclude",
    "_has",
    "_list",
    "_sort",
    "_not-referenced",
    "_mdm",
    "_type",
];

/// The types a reverse chain (`_has:T:p:rest`) or a chain (`p:Type.rest`)
/// searches, however they nest: each `_has` searches its `T`, each chained
/// hop its type, named (`p:Type`) or not (any type); `rest` is a parameter
/// of that type, itself perhaps a chain or a reverse chain
/// (`subject:Patient._has:Condition:subject:code`,
/// `_has:Encounter:subject:diagnosis:Condition.code`). A last plain
/// parameter reaches nothing further.
fn chain_needs(mut name: &str, needs: &mut Vec<Need>) {
    let is_type = |t: &&str| crate::fhir::resource_types::is_resource_type(t);
    loop {
        let (ty, rest) = if let Some(has) = name.strip_prefix("_has:") {
            let mut parts = has.splitn(3, ':');
            let ty = parts.next().filter(is_type);
            let _link = parts.next();
            (ty, parts.next().unwrap_or(""))
        } else if let Some((hop, rest)) = name.split_once('.') {
            (hop.split(':').nth(1).filter(is_type), rest)
        } else {
            return;
        };
        needs.push(Need::on(Perm::Search, ty));
        name = rest;
    }
}

fn reaches_other_types(req: &FhirRequest) -> bool {
    req.params.iter().any(|(n, _)| {
        n.starts_with("_include")
            || n.starts_with("_revinclude")
            || n.starts_with("_has:")
            || n.starts_with("_not-referenced")
            || n.contains('.')
    })
}

/// The provable compartment cases (see module docs).
fn in_patient_compartment(req: &FhirRequest, ctx: &str) -> bool {
    use Interaction::*;
    if reaches_other_types(req) {
        return false;
    }
    let is_patient = req.resource_type.as_deref() == Some("Patient");
    match req.interaction {
        Read | Vread | HistoryInstance => {
            is_patient && req.id.as_deref() == Some(ctx) && !req.conditional
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::classify::{classify, classify_bundle, classify_written_body, HttpRequest};

    fn req(method: &str, url: &str) -> FhirRequest {
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        classify(HttpRequest {
            method,
            path,
            query,
            if_none_exist: None,
        })
        .unwrap()
    }

    fn check(
        scopes: &str,
        patient: Option<&str>,
        method: &str,
        url: &str,
    ) -> Result<Decision, ScopeDenial> {
        decide(&req(method, url), &ScopeSet::parse(scopes), patient)
    }

    #[test]
    fn a_conditional_create_search_is_decided_like_a_query() {
        let create = |search: &str| {
            classify(HttpRequest {
                method: "POST",
                path: "Observation",
                query: None,
                if_none_exist: Some(search),
            })
            .unwrap()
        };
        let scopes = ScopeSet::parse("user/Observation.cs");
        for (search, ok) in [
            ("identifier=http://lab.example|42", true),
            ("?identifier=42", true),
            ("Observation?identifier=42", true),
            // The type before `?` is dropped (as HAPI does): what follows
            // is decided.
            (
                "Patient?_has:Condition:subject:code=B20&identifier=1",
                false,
            ),
            // Each reaches Conditions or Patients the scopes do not cover:
            // 200 (a match) or 201 (none) would tell.
            ("_has:Condition:subject:code=hiv", false),
            ("subject:Patient.name=Smith", false),
            ("_filter=code eq x", false),
            ("identifier=42&_include=Observation:subject:Patient", false),
        ] {
            let d = decide(&create(search), &scopes, None);
            assert_eq!(d.is_ok(), ok, "If-None-Exist: {search}: {d:?}");
        }
        // With the types it reaches granted, the same search passes.
        let wide = ScopeSet::parse("user/Observation.cs user/Condition.s");
        assert!(decide(&create("_has:Condition:subject:code=hiv"), &wide, None).is_ok());
        // An entry's ifNoneExist is the same search.
        let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction",
            "entry": [{"request": {"method": "POST", "url": "Observation",
                                   "ifNoneExist": "_has:Condition:subject:code=hiv"},
                       "resource": {"resourceType": "Observation"}}]});
        let t = classify_bundle(req("POST", ""), bundle.to_string().as_bytes()).unwrap();
        assert!(decide(&t, &scopes, None).is_err());
        assert!(decide(&t, &wide, None).is_ok());
    }

    #[test]
    fn conditional_references_in_a_bundle_are_decided_like_queries() {
        let tx = |reference: &str| {
            let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction",
                "entry": [{"request": {"method": "POST", "url": "Observation"},
                           "resource": {"resourceType": "Observation",
                                        "subject": {"reference": reference},
                                        "performer": [{"reference": "Practitioner/9"}]}}]});
            classify_bundle(req("POST", ""), bundle.to_string().as_bytes()).unwrap()
        };
        let ok = |scopes: &str, reference: &str| {
            decide(&tx(reference), &ScopeSet::parse(scopes), None).is_ok()
        };
        let plain = "Patient?identifier=urn:mrn|1";
        let probing = "Patient?identifier=urn:mrn|1&_has:Condition:subject:code=B20";
        assert!(ok("user/Observation.c", "Patient/1"));
        assert!(
            !ok("user/Observation.c", plain),
            "the Patient search needs Patient.s"
        );
        assert!(ok("user/Observation.c user/Patient.s", plain));
        assert!(
            !ok("user/Observation.c user/Patient.s", probing),
            "_has reaches Conditions"
        );
        assert!(ok(
            "user/Observation.c user/Patient.s user/Condition.s",
            probing
        ));
        assert!(!ok("user/*.cruds", "Patient?_filter=name eq x"));
        // A `?` further on does not hide the parameters before it.
        let hidden = "Patient?identifier=urn:mrn|1&_has:Condition:subject:code=B20&_x=?";
        assert!(!ok("user/Observation.c user/Patient.s", hidden));

        // A JSON Patch in an entry is a Binary's base64 data: read too.
        use base64::Engine as _;
        let patch_entry = |data: &str| {
            let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch",
                "entry": [{"request": {"method": "PATCH", "url": "Observation/o1"},
                           "resource": {"resourceType": "Binary",
                                        "contentType": "application/json-patch+json",
                                        "data": data}}]});
            classify_bundle(req("POST", ""), bundle.to_string().as_bytes())
        };
        let patch = serde_json::json!([{"op": "replace", "path": "/subject/reference",
                                         "value": probing}]);
        let data = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
        let b = patch_entry(&data).unwrap();
        let ok = |scopes: &str| decide(&b, &ScopeSet::parse(scopes), None).is_ok();
        assert!(!ok("user/Observation.u"));
        assert!(ok("user/Observation.u user/Patient.s user/Condition.s"));
        for (data, says) in [("!!", "not base64"), ("PE9icy8+", "not JSON")] {
            let e = patch_entry(data).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn conditional_references_in_single_writes_are_decided_like_queries() {
        let probing = "Patient?identifier=urn:mrn|1&_has:Condition:subject:code=B20";
        let obs = |reference: &str| {
            serde_json::json!({"resourceType": "Observation", "id": "o1",
                               "subject": {"reference": reference}})
            .to_string()
        };
        let bodies = [
            ("POST", "Observation", obs(probing)),
            ("PUT", "Observation/o1", obs(probing)),
            // A patch can set the reference as a bare string ...
            (
                "PATCH",
                "Observation/o1",
                serde_json::json!([{"op": "replace", "path": "/subject/reference",
                                    "value": probing}])
                .to_string(),
            ),
            // ... or as a Reference in a FHIRPath Patch's Parameters.
            (
                "PATCH",
                "Observation/o1",
                serde_json::json!({"resourceType": "Parameters", "parameter": [{
                    "name": "operation", "part": [
                        {"name": "type", "valueCode": "replace"},
                        {"name": "path", "valueString": "Observation.subject.reference"},
                        {"name": "value", "valueString": probing}]}]})
                .to_string(),
            ),
        ];
        let writes = "user/Observation.cu";
        for (method, url, body) in bodies {
            let r = classify_written_body(req(method, url), body.as_bytes()).unwrap();
            let ok = |scopes: &str| decide(&r, &ScopeSet::parse(scopes), None).is_ok();
            assert!(
                !ok(writes),
                "{method} {url}: needs Patient.s and Condition.s"
            );
            assert!(!ok(&format!("{writes} user/Patient.s")), "{method} {url}");
            assert!(
                ok(&format!("{writes} user/Patient.s user/Condition.s")),
                "{method} {url}"
            );
            // patient/ scopes grant the searches but cannot confine them.
            let e = decide(&r, &ScopeSet::parse("patient/*.cruds"), Some("p1")).unwrap_err();
            assert!(
                e.reason.contains("cannot confine"),
                "{method} {url}: {}",
                e.reason
            );
        }
        // A plain reference, and a patch's text with a `?`, need nothing
        // more than the write.
        for (method, url, body) in [
            ("POST", "Observation", obs("Patient/1")),
            (
                "PATCH",
                "Observation/o1",
                serde_json::json!([{"op": "add", "path": "/note/0/text",
                                    "value": "Patient? Not sure?"}])
                .to_string(),
            ),
        ] {
            let r = classify_written_body(req(method, url), body.as_bytes()).unwrap();
            assert!(r.reference_searches.is_empty(), "{method} {url}");
            assert!(decide(&r, &ScopeSet::parse(writes), None).is_ok());
        }
    }

    #[test]
    fn public_routes_refuse_what_reaches_beyond_them() {
        let p = |names: &[&str]| -> Vec<(String, String)> {
            names.iter().map(|n| (n.to_string(), "x".into())).collect()
        };
        for ok in [
            &["name"][..],
            &["_format", "_summary", "mode"],
            &["family:exact", "_count"],
        ] {
            assert_eq!(reaching_param(&p(ok), &[]), None, "{ok:?}");
        }
        for bad in [
            "_include",
            "_revinclude:iterate",
            "_has:Observation:performer:code",
            "organization.name",
            "_type",
            "_getpages",
            "_filter",
            "_list",
            "code:in",
            "code:not-in",
            "subject:mdm",
        ] {
            assert_eq!(reaching_param(&p(&["name", bad]), &[]), Some(bad), "{bad}");
        }
    }

    #[test]
    fn decision_table() {
        // (name, scopes, patient, method, url, allowed)
        type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, &'a str, bool);
        let cases: &[Case] = &[
            (
                "user read",
                "user/Observation.rs",
                None,
                "GET",
                "Observation/1",
                true,
            ),
            (
                "user v1 read",
                "user/Observation.read",
                None,
                "GET",
                "Observation/1",
                true,
            ),
            (
                "user read other type",
                "user/Observation.rs",
                None,
                "GET",
                "Condition/1",
                false,
            ),
            (
                "user search",
                "user/Observation.s",
                None,
                "GET",
                "Observation?code=x",
                true,
            ),
            (
                "r does not search",
                "user/Observation.r",
                None,
                "GET",
                "Observation?code=x",
                false,
            ),
            (
                "s does not read",
                "user/Observation.s",
                None,
                "GET",
                "Observation/1",
                false,
            ),
            (
                "vread needs r",
                "user/Observation.r",
                None,
                "GET",
                "Observation/1/_history/2",
                true,
            ),
            (
                "instance history needs r",
                "user/Observation.r",
                None,
                "GET",
                "Observation/1/_history",
                true,
            ),
            (
                "type history needs s",
                "user/Observation.r",
                None,
                "GET",
                "Observation/_history",
                false,
            ),
            (
                "type history with s",
                "user/Observation.s",
                None,
                "GET",
                "Observation/_history",
                true,
            ),
            (
                "system history needs wildcard",
                "user/Observation.s",
                None,
                "GET",
                "_history",
                false,
            ),
            (
                "system history wildcard",
                "user/*.s",
                None,
                "GET",
                "_history",
                true,
            ),
            (
                "a stored search's page, named on a type: any type",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_getpages=abc&_getpagesoffset=20",
                false,
            ),
            (
                "a stored search's page with every type granted",
                "user/*.rs",
                None,
                "GET",
                "?_getpages=abc&_getpagesoffset=20",
                true,
            ),
            (
                "a stored search's page under one type: allowed, the page checked",
                "user/Observation.rs",
                None,
                "GET",
                "?_getpages=abc&_getpagesoffset=20",
                true,
            ),
            (
                "a stored search's page, patient/ and user/ scopes",
                "patient/*.rs user/Practitioner.rs",
                Some("p1"),
                "GET",
                "?_getpages=abc",
                true,
            ),
            (
                "a stored search's page without a search scope",
                "user/Observation.r",
                None,
                "GET",
                "?_getpages=abc&_getpagesoffset=20",
                false,
            ),
            (
                "a page id with a search parameter is a search of every type",
                "user/Observation.rs",
                None,
                "GET",
                "?_getpages=abc&code=x",
                false,
            ),
            (
                "system history: _type is not R4's, it narrows nothing",
                "user/Observation.rs",
                None,
                "GET",
                "_history?_type=Observation",
                false,
            ),
            (
                "write v1 create",
                "user/Observation.write",
                None,
                "POST",
                "Observation",
                true,
            ),
            (
                "write v1 update",
                "user/Observation.write",
                None,
                "PUT",
                "Observation/1",
                true,
            ),
            (
                "write v1 delete",
                "user/Observation.write",
                None,
                "DELETE",
                "Observation/1",
                true,
            ),
            (
                "write does not read",
                "user/Observation.write",
                None,
                "GET",
                "Observation/1",
                false,
            ),
            (
                "patch needs u",
                "user/Observation.u",
                None,
                "PATCH",
                "Observation/1",
                true,
            ),
            (
                "delete needs d",
                "user/Observation.cru",
                None,
                "DELETE",
                "Observation/1",
                false,
            ),
            (
                "conditional delete needs s",
                "user/Observation.d",
                None,
                "DELETE",
                "Observation?code=1",
                false,
            ),
            (
                "conditional delete d+s",
                "user/Observation.ds",
                None,
                "DELETE",
                "Observation?code=1",
                true,
            ),
            (
                "conditional update u only",
                "user/Observation.u",
                None,
                "PUT",
                "Observation?code=1",
                false,
            ),
            (
                "system search needs wildcard",
                "user/Observation.rs",
                None,
                "GET",
                "?code=x",
                false,
            ),
            (
                "system search _type narrowed",
                "user/Observation.rs user/Condition.s",
                None,
                "GET",
                "?_type=Observation,Condition",
                true,
            ),
            (
                "system search _type partly",
                "user/Observation.rs",
                None,
                "GET",
                "?_type=Observation,Condition",
                false,
            ),
            (
                "wildcard read",
                "user/*.read",
                None,
                "GET",
                "Condition/1",
                true,
            ),
            (
                "system context",
                "system/*.rs",
                None,
                "GET",
                "Condition/1",
                true,
            ),
            (
                "filtered scope: search carrying its filter",
                "user/Observation.rs?category=laboratory",
                None,
                "GET",
                "Observation?category=laboratory",
                true,
            ),
            (
                "non-resource scopes",
                "openid fhirUser launch/patient offline_access",
                None,
                "GET",
                "Observation/1",
                false,
            ),
            (
                "malformed letters",
                "user/Observation.sr",
                None,
                "GET",
                "Observation/1",
                false,
            ),
            (
                "include needs target",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_include=Observation:subject:Patient",
                false,
            ),
            (
                "include with target granted",
                "user/Observation.rs user/Patient.rs",
                None,
                "GET",
                "Observation?_include=Observation:subject:Patient",
                true,
            ),
            (
                "include of every parameter needs wildcard, whatever its target",
                "user/Observation.rs user/Patient.rs",
                None,
                "GET",
                "Observation?_include=Observation:*:Patient",
                false,
            ),
            (
                "iterated include of every parameter needs wildcard",
                "user/Observation.rs user/Patient.rs",
                None,
                "GET",
                "Observation?_include:iterate=Observation:*:Patient",
                false,
            ),
            (
                "include of every parameter with a wildcard grant",
                "user/*.rs",
                None,
                "GET",
                "Observation?_include=Observation:*:Patient",
                true,
            ),
            (
                "revinclude of every parameter needs its source",
                "user/Patient.rs user/Observation.rs",
                None,
                "GET",
                "Patient?_revinclude=Observation:*",
                true,
            ),
            (
                "revinclude of every parameter without its source",
                "user/Patient.rs",
                None,
                "GET",
                "Patient?_revinclude=Observation:*",
                false,
            ),
            (
                "include without target needs wildcard",
                "user/Observation.rs user/Patient.rs",
                None,
                "GET",
                "Observation?_include=Observation:subject",
                false,
            ),
            (
                "revinclude needs source",
                "user/Patient.rs",
                None,
                "GET",
                "Patient?_revinclude=Observation:subject",
                false,
            ),
            (
                "has needs type",
                "user/Patient.rs",
                None,
                "GET",
                "Patient?_has:Observation:patient:code=1234",
                false,
            ),
            (
                "has with type",
                "user/Patient.rs user/Observation.s",
                None,
                "GET",
                "Patient?_has:Observation:patient:code=1234",
                true,
            ),
            // Microsoft's `_not-referenced`: the complement of a `_has`.
            (
                "not-referenced needs type",
                "user/Patient.rs",
                None,
                "GET",
                "Patient?_not-referenced=Condition:subject",
                false,
            ),
            (
                "not-referenced with type",
                "user/Patient.rs user/Condition.s",
                None,
                "GET",
                "Patient?_not-referenced=Condition:subject",
                true,
            ),
            (
                "not-referenced by any type",
                "user/Patient.rs user/Condition.s",
                None,
                "GET",
                "Patient?_not-referenced=*:*",
                false,
            ),
            (
                "not-referenced under patient scopes",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient?_not-referenced=*:*",
                false,
            ),
            (
                "not-referenced compartment search under patient scopes",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient/p1/Observation?_not-referenced=DiagnosticReport:result",
                false,
            ),
            // A `_` parameter fhirwall does not know, or spelt otherwise
            // (a server may match `_LIST` as `_list`): refused.
            (
                "unknown special parameter",
                "user/*.rs",
                None,
                "GET",
                "Observation?_frobnicate=1",
                false,
            ),
            (
                "special parameter in another case",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_LIST=worklist-1",
                false,
            ),
            (
                "special parameter in another case, patient",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Observation?_Id=o1",
                false,
            ),
            (
                "known special parameters",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_lastUpdated=gt2020&_tag=x&_security:not=R&_total=accurate\
                 &_elements=id&_summary=false&_count=5&_source=s&_profile=p",
                true,
            ),
            (
                "known special parameters, patient",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Observation?_lastUpdated=gt2020&_count=5",
                true,
            ),
            (
                "chain typed",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?subject:Patient.name=peter",
                false,
            ),
            (
                "chain typed granted",
                "user/Observation.rs user/Patient.s",
                None,
                "GET",
                "Observation?subject:Patient.name=peter",
                true,
            ),
            (
                "chain untyped needs wildcard",
                "user/Observation.rs user/Patient.s",
                None,
                "GET",
                "Observation?subject.name=peter",
                false,
            ),
            (
                "chain ending in _has needs the _has type",
                "user/Observation.rs user/Patient.rs",
                None,
                "GET",
                "Observation?subject:Patient._has:Condition:subject:code=B20",
                false,
            ),
            (
                "chain ending in _has granted",
                "user/Observation.rs user/Patient.rs user/Condition.s",
                None,
                "GET",
                "Observation?subject:Patient._has:Condition:subject:code=B20",
                true,
            ),
            (
                "chain inside _has needs the chained type",
                "user/Patient.rs user/Encounter.s",
                None,
                "GET",
                "Patient?_has:Encounter:subject:diagnosis:Condition.code=B20",
                false,
            ),
            (
                "chain inside _has granted",
                "user/Patient.rs user/Encounter.s user/Condition.s",
                None,
                "GET",
                "Patient?_has:Encounter:subject:diagnosis:Condition.code=B20",
                true,
            ),
            (
                "untyped chain inside _has needs wildcard",
                "user/Patient.rs user/Encounter.s user/Condition.s",
                None,
                "GET",
                "Patient?_has:Encounter:subject:diagnosis.code=B20",
                false,
            ),
            (
                "_has inside a chain inside _has",
                "user/Patient.rs user/Encounter.s user/Condition.s",
                None,
                "GET",
                "Patient?_has:Encounter:subject:diagnosis:Condition._has:Provenance:target:agent=x",
                false,
            ),
            (
                "chained sort needs the linked type",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_sort=-subject:Patient.birthdate",
                false,
            ),
            (
                "chained sort granted",
                "user/Observation.rs user/Patient.s",
                None,
                "GET",
                "Observation?_sort=date,-subject:Patient.birthdate",
                true,
            ),
            (
                "untyped chained sort needs wildcard",
                "user/Observation.rs user/Patient.s",
                None,
                "GET",
                "Observation?_sort=subject.birthdate",
                false,
            ),
            (
                "plain sort",
                "user/Observation.rs",
                None,
                "GET",
                "Observation?_sort=-date,code",
                true,
            ),
            (
                "_filter refused",
                "user/*.cruds",
                None,
                "GET",
                "Observation?_filter=x",
                false,
            ),
            (
                "_query refused",
                "user/*.cruds",
                None,
                "GET",
                "Observation?_query=x",
                false,
            ),
            (
                "_contained refused",
                "user/*.cruds",
                None,
                "GET",
                "Observation?_contained=true",
                false,
            ),
            (
                "compartment search",
                "user/Observation.s",
                None,
                "GET",
                "Patient/1/Observation",
                true,
            ),
            (
                "compartment * needs wildcard",
                "user/Observation.s",
                None,
                "GET",
                "Patient/1/*",
                false,
            ),
            (
                "capabilities needs nothing",
                "",
                None,
                "GET",
                "metadata",
                true,
            ),
            (
                "export needs system",
                "user/*.rs",
                None,
                "GET",
                "$export",
                false,
            ),
            (
                "export with system",
                "system/*.rs",
                None,
                "GET",
                "$export",
                true,
            ),
            (
                "group export",
                "system/*.read",
                None,
                "GET",
                "Group/g1/$export",
                true,
            ),
            (
                "patient export under patient",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient/$export",
                false,
            ),
            (
                "unknown operation",
                "user/*.cruds",
                None,
                "POST",
                "Observation/$lastn",
                false,
            ),
            (
                "everything type level user",
                "user/*.rs",
                None,
                "GET",
                "Patient/$everything",
                true,
            ),
            // Patient context.
            (
                "patient own record",
                "patient/Patient.r",
                Some("p1"),
                "GET",
                "Patient/p1",
                true,
            ),
            (
                "patient other record",
                "patient/Patient.r",
                Some("p1"),
                "GET",
                "Patient/p2",
                false,
            ),
            (
                "patient no context",
                "patient/Patient.r",
                None,
                "GET",
                "Patient/p1",
                false,
            ),
            (
                "patient _id search own",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient?_id=p1",
                true,
            ),
            (
                "patient _id search other",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient?_id=p2",
                false,
            ),
            (
                "patient _id two values",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient?_id=p1&_id=p2",
                false,
            ),
            (
                "patient _id of another in the own compartment",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient/p1/Patient?_id=p2",
                false,
            ),
            (
                "_id:not in the own compartment's Patients",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient/p1/Patient?_id:not=p1",
                false,
            ),
            (
                "a stored page relabelled",
                "user/Observation.rs",
                None,
                "GET",
                "?_getpages=abc&_bundletype=history",
                false,
            ),
            (
                "a stored page as HAPI links it",
                "user/Observation.rs",
                None,
                "GET",
                "?_getpages=abc&_getpagesoffset=20&_count=20&_bundletype=searchset",
                true,
            ),
            (
                "another type's _id in the own compartment",
                "patient/Observation.s",
                Some("p1"),
                "GET",
                "Patient/p1/Observation?_id=p2",
                true,
            ),
            (
                "patient unscoped search (narrowed by default)",
                "patient/Patient.s",
                Some("p1"),
                "GET",
                "Patient?name=x",
                true,
            ),
            (
                "patient compartment own",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Patient/p1/Observation",
                true,
            ),
            (
                "patient compartment other",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Patient/p2/Observation",
                false,
            ),
            (
                "patient compartment include",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient/p1/Observation?_include=Observation:subject",
                false,
            ),
            (
                "patient type search naming the patient",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Observation?patient=p1",
                true,
            ),
            (
                "patient read of a compartment type (answer checked)",
                "patient/Observation.rs",
                Some("p1"),
                "GET",
                "Observation/o1",
                true,
            ),
            (
                "patient everything own",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient/p1/$everything",
                true,
            ),
            (
                "patient everything other",
                "patient/*.rs",
                Some("p1"),
                "GET",
                "Patient/p2/$everything",
                false,
            ),
            (
                "patient create (body checked)",
                "patient/Observation.c",
                Some("p1"),
                "POST",
                "Observation",
                true,
            ),
            (
                "user beats patient",
                "patient/Observation.rs user/Observation.rs",
                Some("p1"),
                "GET",
                "Observation/o1",
                true,
            ),
        ];
        for (name, scopes, patient, method, url, allowed) in cases {
            let got = check(scopes, *patient, method, url);
            assert_eq!(got.is_ok(), *allowed, "{name}: {got:?}");
        }
    }

    #[test]
    fn denial_names_missing_scope() {
        // RFC 6750's scope attribute: real scope values, in the contexts
        // the token uses; the reason says which contexts would do.
        let d = check("user/Observation.r", None, "GET", "Observation?code=1").unwrap_err();
        assert_eq!(d.missing_scope.as_deref(), Some("user/Observation.s"));
        assert!(d.reason.contains("search-type"), "{}", d.reason);
        assert!(
            d.reason.contains("patient|user|system/Observation.s"),
            "{}",
            d.reason
        );
        for (held, want) in [
            ("patient/Observation.r", "patient/Condition.r"),
            (
                "patient/Observation.r user/Patient.r",
                "patient/Condition.r user/Condition.r",
            ),
            ("system/Observation.r", "system/Condition.r"),
            ("openid", "user/Condition.r"),
        ] {
            let d = check(held, Some("p1"), "GET", "Condition/c1").unwrap_err();
            assert_eq!(d.missing_scope.as_deref(), Some(want), "{held}");
        }
        // A filter on a parameter fhirwall cannot evaluate grants nothing.
        let d = check(
            "user/Observation.rs?date=ge2020",
            None,
            "GET",
            "Observation/1",
        )
        .unwrap_err();
        assert!(d.reason.contains("query filter"), "{}", d.reason);
    }

    #[test]
    fn filtered_scopes_grant_their_filter_only() {
        const LAB: &str = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
        let lab = Filter::parse("Observation", &format!("category={LAB}")).unwrap();
        let vs = Filter::parse("Observation", "category=vital-signs").unwrap();
        let user_lab = format!("user/Observation.rs?category={LAB}");
        // Read: the answer must match.
        let d = check(&user_lab, None, "GET", "Observation/o1").unwrap();
        assert_eq!(
            d.check,
            Some(ResponseCheck::Resource {
                patient: None,
                filters: Some(vec![lab.clone()])
            })
        );
        // Search carrying the filter: not narrowed; without it: narrowed.
        let d = check(
            &user_lab,
            None,
            "GET",
            &format!("Observation?category={LAB}&code=x"),
        )
        .unwrap();
        assert!(d.narrow.is_empty());
        let d = check(&user_lab, None, "GET", "Observation?code=x").unwrap();
        assert_eq!(d.narrow, vec![("category".to_string(), LAB.to_string())]);
        // Union of two filters on the same parameter: OR-ed.
        let both = format!("{user_lab} user/Observation.rs?category=vital-signs");
        let d = check(&both, None, "GET", "Observation?code=x").unwrap();
        assert_eq!(
            d.narrow,
            vec![("category".to_string(), format!("{LAB},vital-signs"))]
        );
        assert!(
            matches!(&d.check, Some(ResponseCheck::Search { filters: Some(f), .. }) if f == &vec![lab.clone(), vs.clone()])
        );
        // A form body carrying the filter and the patient is checked, but
        // does not confine the search: both go into the query.
        let mut form = req("POST", "Observation/_search?code=x");
        form.params.extend([
            ("category".to_string(), LAB.to_string()),
            ("patient".to_string(), "p1".to_string()),
        ]);
        form.form_params = 2;
        let scopes = ScopeSet::parse(&format!("patient/Observation.rs?category={LAB}"));
        let d = decide(&form, &scopes, Some("p1")).unwrap();
        assert_eq!(
            d.narrow,
            vec![
                ("category".to_string(), LAB.to_string()),
                ("patient".to_string(), "p1".to_string())
            ]
        );
        form.params[2].1 = "p2".into();
        assert!(decide(&form, &scopes, Some("p1")).is_err());
        // Patient-bound filter: compartment and filter.
        let d = check(
            &format!("patient/Observation.rs?category={LAB}"),
            Some("p1"),
            "GET",
            "Observation?code=x",
        )
        .unwrap();
        assert_eq!(
            d.narrow,
            vec![
                ("category".to_string(), LAB.to_string()),
                ("patient".to_string(), "p1".to_string())
            ]
        );
        assert!(
            matches!(&d.check, Some(ResponseCheck::Search { patient: Some(p), .. }) if p == "p1")
        );
        assert!(check(
            &format!("patient/Observation.rs?category={LAB}"),
            Some("p1"),
            "GET",
            "Observation?patient=p2"
        )
        .is_err());
        assert!(check(
            &format!("patient/Observation.rs?category={LAB}"),
            None,
            "GET",
            "Observation/o1"
        )
        .is_err());
        // Writes: the body (and the stored resource) must match.
        let d = check(
            &format!("user/Observation.cud?category={LAB}"),
            None,
            "PUT",
            "Observation/o1",
        )
        .unwrap();
        assert_eq!(
            d.write,
            Some(WriteCheck {
                patient: None,
                filters: Some(vec![lab.clone()]),
                body: true,
                existing: true
            })
        );
        // Not covered by filters: other types, includes, conditional, patch, history of the type.
        for (scope, method, url) in [
            (user_lab.as_str(), "GET", "Condition/c1"),
            (
                user_lab.as_str(),
                "GET",
                "Observation?_include=Observation:subject",
            ),
            (user_lab.as_str(), "GET", "Observation/_history"),
            (
                "user/Observation.u?category=laboratory",
                "PATCH",
                "Observation/o1",
            ),
            (
                "user/Observation.d?category=laboratory",
                "DELETE",
                "Observation?code=1",
            ),
            // On a wildcard the filter is evaluated per type: Patient has no `category`.
            ("user/*.rs?category=laboratory", "GET", "Patient/p1"),
        ] {
            assert!(
                check(scope, None, method, url).is_err(),
                "{scope} {method} {url}"
            );
        }
        // An unfiltered scope still wins over a filtered one.
        let d = check(
            &format!("{user_lab} user/Observation.r"),
            None,
            "GET",
            "Observation/o1",
        )
        .unwrap();
        assert_eq!(d.check, None);
    }

    #[test]
    fn patient_reads_carry_a_response_check() {
        let checked = Some(ResponseCheck::in_compartment("p1"));
        for url in [
            "Observation/o1",
            "Observation/o1/_history/2",
            "Condition/c/_history",
        ] {
            let d = check("patient/*.rs", Some("p1"), "GET", url).unwrap();
            assert_eq!(d.check, checked, "{url}");
        }
        // The Patient itself is decided from the request; user/ scopes need no check.
        let d = check("patient/*.rs", Some("p1"), "GET", "Patient/p1").unwrap();
        assert_eq!(d.check, None);
        let d = check(
            "patient/*.rs user/Observation.r",
            Some("p1"),
            "GET",
            "Observation/o1",
        )
        .unwrap();
        assert_eq!(d.check, None);
        // Refused outright: another Patient, a type outside the compartment,
        // a read that reaches further, a read inside a Bundle.
        let d = check("patient/*.rs", Some("p1"), "GET", "Patient/p2").unwrap_err();
        assert!(d.reason.contains("Patient/p1"), "{}", d.reason);
        let d = check("patient/*.rs", Some("p1"), "GET", "Practitioner/x").unwrap_err();
        assert!(
            d.reason.contains("not in the Patient compartment"),
            "{}",
            d.reason
        );
        assert!(check(
            "patient/*.rs",
            Some("p1"),
            "GET",
            "Observation/o1?_include=Observation:performer"
        )
        .is_err());
        assert!(check("patient/*.rs", None, "GET", "Observation/o1").is_err());
        let body = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Observation/o1"}}]}"#;
        let b = classify_bundle(req("POST", ""), body).unwrap();
        let d = decide(&b, &ScopeSet::parse("patient/*.rs"), Some("p1")).unwrap();
        assert_eq!(
            d.entry_checks,
            vec![EntryCheck {
                index: 0,
                check: ResponseCheck::in_compartment("p1"),
                narrow: Vec::new()
            }]
        );
        // A vread inside: refused (its current version is checked alone).
        let body = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Observation/o1/_history/1"}}]}"#;
        let b = classify_bundle(req("POST", ""), body).unwrap();
        let d = decide(&b, &ScopeSet::parse("patient/*.rs"), Some("p1"));
        assert!(d.is_err_and(|e| e.reason.contains("vread")));
        // So is a history that may leave the current version out, under
        // patient/ scopes or a filter, bound to a patient or not (HAPI's
        // `_offset` skips the newest versions).
        for (scopes, patient) in [
            ("patient/*.rs", Some("p1")),
            ("patient/Observation.rs?category=laboratory", Some("p1")),
            ("user/Observation.rs?category=laboratory", None),
        ] {
            for (url, ok) in [
                ("Observation/o1/_history?_at=le2020-01-01", false),
                ("Observation/o1/_history?_since=2020-01-01", false),
                ("Observation/o1/_history?_offset=1", false),
                ("Observation/o1/_history?_getpagesoffset=1", false),
                ("Observation/o1/_history?_count=5", true),
                ("Observation/o1/_history", true),
            ] {
                let body = format!(
                    r#"{{"resourceType":"Bundle","type":"batch","entry":[
                    {{"request":{{"method":"GET","url":"{url}"}}}}]}}"#
                );
                let b = classify_bundle(req("POST", ""), body.as_bytes()).unwrap();
                let d = decide(&b, &ScopeSet::parse(scopes), patient);
                assert_eq!(d.is_ok(), ok, "{scopes} {url}: {d:?}");
                // Alone, the current version is fetched and checked too,
                // but a stray parameter is refused all the same.
                if url.contains("_offset") {
                    let d = check(scopes, patient, "GET", url);
                    assert!(
                        d.as_ref().is_err_and(|e| e.reason.contains("_offset")),
                        "{scopes} {url}: {d:?}"
                    );
                }
            }
        }
        // Under user/ scopes nothing is checked: allowed.
        assert!(decide(&b, &ScopeSet::parse("user/*.rs"), None).is_ok());
    }

    /// Whose data a request reaches, for the audit: its Patient, its
    /// compartment, the patients its parameters name (spelt as ids).
    #[test]
    fn the_patients_a_request_names() {
        let bases = Bases::new(vec!["https://gw/fhir".into()]);
        for (url, want) in [
            ("Observation?patient=p2", vec!["p2"]),
            (
                "Observation?subject=Patient/p2,Patient/p3&code=x",
                vec!["p2", "p3"],
            ),
            ("Observation?subject=https://gw/fhir/Patient/p4", vec!["p4"]),
            ("Patient/p5/$everything", vec!["p5"]),
            ("Patient/p6/Observation?patient=p6", vec!["p6"]),
            ("Patient/p7", vec!["p7"]),
            ("Patient?_id=p8", vec!["p8"]),
            // Not ids, or not patients: nothing.
            ("Observation?subject=Group/g1&code=p9", vec![]),
            ("Patient?name=Alice", vec![]),
            ("Observation?subject:Patient.name=Alice", vec![]),
            ("Observation?patient=Alice%20Smith", vec![]),
            ("Observation?subject=https://evil/fhir/Patient/p1", vec![]),
        ] {
            assert_eq!(patients_named(&req("GET", url), &bases), want, "{url}");
        }
    }

    /// A stored page (a server's `next` link) under scopes that search
    /// some types within the patient's compartment or a filter: allowed,
    /// its answer checked against exactly that grant.
    #[test]
    fn stored_pages_are_checked_against_the_grant_they_fall_under() {
        let page = "?_getpages=abc&_getpagesoffset=10&_count=10&_include=Observation:performer&_bundletype=searchset";
        let run = |scopes: &str, patient: Option<&str>| {
            decide(&req("GET", page), &ScopeSet::parse(scopes), patient)
        };
        let search = |patient: Option<&str>, types: Option<&[&str]>, filters: Option<&str>| {
            Some(ResponseCheck::Search {
                patient: patient.map(str::to_string),
                types: types.map(|t| t.iter().map(|t| t.to_string()).collect()),
                filters: filters.map(|q| vec![Filter::parse("Observation", q).unwrap()]),
                open_types: Vec::new(),
                refused_types: Vec::new(),
            })
        };
        let d = run("patient/Observation.rs patient/Condition.rs", Some("p1")).unwrap();
        assert_eq!(
            d.check,
            search(Some("p1"), Some(&["Condition", "Observation"]), None)
        );
        let d = run("patient/Observation.rs?category=laboratory", Some("p1")).unwrap();
        assert_eq!(
            d.check,
            search(
                Some("p1"),
                Some(&["Observation"]),
                Some("category=laboratory")
            )
        );
        assert_eq!(
            d.scopes_used,
            ["patient/Observation.rs?category=laboratory"]
        );
        // A plain scope for the type makes its filter moot.
        let d = run(
            "patient/Observation.rs patient/Observation.rs?category=laboratory",
            Some("p1"),
        )
        .unwrap();
        assert_eq!(d.check, search(Some("p1"), Some(&["Observation"]), None));
        let d = run("user/Observation.rs?category=laboratory", None).unwrap();
        assert_eq!(
            d.check,
            search(None, Some(&["Observation"]), Some("category=laboratory"))
        );
        // patient/ scopes without a patient context grant no page.
        assert!(run("patient/Observation.rs", None).is_err());
        // Nor does a filter fhirwall cannot evaluate.
        assert!(run("patient/Observation.rs?code:text=x", Some("p1")).is_err());
    }

    /// A system search's `_type` confines it only in the query: a server
    /// may leave the form body unread and search every type.
    #[test]
    fn a_type_list_in_a_form_body_confines_nothing() {
        let grant = ScopeSet::parse("user/Observation.rs");
        let mut r = req("POST", "_search");
        crate::fhir::classify::add_form(&mut r, "POST", "_search", "_type=Observation").unwrap();
        assert!(decide(&r, &grant, None).is_err());
        assert!(decide(&req("GET", "?_type=Observation"), &grant, None).is_ok());
        let mut r = req("POST", "_search?_type=Observation");
        crate::fhir::classify::add_form(&mut r, "POST", "_search", "_type=Observation,Patient")
            .unwrap();
        assert!(decide(&r, &grant, None).is_err());
        // A form with no _type leaves the query's list as it is.
        let mut r = req("POST", "_search?_type=Observation");
        crate::fhir::classify::add_form(&mut r, "POST", "_search", "code=x").unwrap();
        assert!(decide(&r, &grant, None).is_ok());
    }

    /// A `patient/` grant that takes a search as it is (it names the
    /// patient) wins over a filtered `user/` one, which would narrow it to
    /// its filter; one that would have to narrow it does not.
    #[test]
    fn a_patient_grant_taking_the_request_whole_wins_over_a_filter() {
        let grant =
            ScopeSet::parse("user/Observation.rs?category=laboratory patient/Observation.rs");
        let run = |url: &str| decide(&req("GET", url), &grant, Some("p1")).unwrap();
        for url in ["Observation?patient=p1", "Patient/p1/Observation"] {
            let d = run(url);
            assert!(d.narrow.is_empty(), "{url}: {d:?}");
            assert!(
                matches!(
                    &d.check,
                    Some(ResponseCheck::Search { patient: Some(p), filters: None, .. }) if p == "p1"
                ),
                "{url}: {d:?}"
            );
            assert_eq!(d.scopes_used, ["patient/Observation.rs"], "{url}");
        }
        // Naming no patient: either grant narrows; the filter's is kept.
        let d = run("Observation?code=x");
        assert!(d.narrow.iter().any(|(n, _)| n == "category"), "{d:?}");
        // Another patient: the filter grants it, narrowed.
        let d = run("Observation?patient=p2");
        assert!(d.narrow.iter().any(|(n, _)| n == "category"), "{d:?}");
    }

    /// The upstream's own `_` parameters, listed, reach nothing; a name
    /// fhirwall judges is judged whatever the list says.
    #[test]
    fn listed_special_params_reach_nothing() {
        let listed = DecideOptions {
            special_params: vec!["_skip".into(), "_include".into()],
            ..DecideOptions::default()
        };
        let grant = ScopeSet::parse("user/Observation.rs");
        let run = |url: &str, o: &DecideOptions| decide_with(&req("GET", url), &grant, None, o);
        let plain = DecideOptions::default();
        let refused = run("Observation?code=x&_skip=5", &plain).unwrap_err();
        assert!(
            refused.reason.contains("upstream.special_params"),
            "{refused:?}"
        );
        assert!(run("Observation?code=x&_skip=5", &listed).is_ok());
        assert!(run("Observation?code=x&_skip:exact=5", &listed).is_ok());
        assert!(run("Observation?code=x&_SKIP=5", &listed).is_err());
        assert!(run("Observation?_include=Observation:subject:Patient", &listed).is_err());
        // The policies read it alike: it reaches no type.
        let r = req("GET", "Observation?code=x&_skip=5");
        assert_eq!(reached_types(&r, true, &[]), (true, Vec::new()));
        assert_eq!(
            reached_types(&r, true, &listed.special_params),
            (false, Vec::new())
        );
        // So do public routes.
        let p = |q: &str| crate::fhir::classify::parse_params(q).unwrap();
        assert_eq!(reaching_param(&p("name=x&_skip=1"), &[]), Some("_skip"));
        assert_eq!(
            reaching_param(&p("name=x&_skip=1"), &listed.special_params),
            None
        );
    }

    #[test]
    fn patient_searches_are_narrowed_or_refused() {
        let opts = DecideOptions {
            unnarrowed_search: UnnarrowedSearch::Narrow,
            bases: Bases::new(vec!["https://gw/fhir".into()]),
            ..DecideOptions::default()
        };
        let strict = DecideOptions {
            unnarrowed_search: UnnarrowedSearch::Refuse,
            ..opts.clone()
        };
        let grant = ScopeSet::parse("patient/*.rs");
        let run =
            |url: &str, o: &DecideOptions| decide_with(&req("GET", url), &grant, Some("p1"), o);
        let add = |n: &str, v: &str| Some((n.to_string(), v.to_string()));
        let checked = Some(ResponseCheck::Search {
            patient: Some("p1".into()),
            types: None,
            filters: None,
            open_types: Vec::new(),
            refused_types: Vec::new(),
        });
        // (url, narrowing parameter to add: None = already narrowed)
        for (url, narrow) in [
            ("Observation?patient=p1", None),
            ("Observation?patient=Patient/p1", None),
            ("Observation?subject=Patient/p1&code=1", None),
            ("Observation?subject:Patient=p1", None),
            ("Observation?performer=Patient/p1", None),
            ("Observation?subject=https://gw/fhir/Patient/p1", None),
            ("Observation?patient=p1&_count=2&_offset=4", None),
            ("Patient?_id=p1&name=x", None),
            ("Observation?code=1", add("patient", "p1")),
            // A bare id in a parameter that may hold other types names no patient.
            ("Observation?subject=p1", add("patient", "p1")),
            ("Observation?subject=Group/g1", add("patient", "p1")),
            ("Observation?patient=p1,p1", add("patient", "p1")),
            ("Observation?patient:missing=false", add("patient", "p1")),
            ("Encounter?date=ge2020", add("patient", "p1")),
            ("Appointment?status=booked", add("patient", "p1")),
            ("Patient?name=Alice", add("_id", "p1")),
            ("AdverseEvent?date=ge2020", add("subject", "Patient/p1")),
        ] {
            let d = run(url, &opts).unwrap_or_else(|e| panic!("{url}: {}", e.reason));
            assert_eq!(d.check, checked, "{url}");
            assert_eq!(
                d.narrow,
                narrow.clone().into_iter().collect::<Vec<_>>(),
                "{url}"
            );
            let strict_ok = run(url, &strict).is_ok();
            assert_eq!(strict_ok, narrow.is_none(), "{url} (refuse mode)");
        }
        // Naming another patient anywhere is refused, in either mode.
        for url in [
            "Observation?patient=p2",
            "Observation?patient=Patient/p2",
            "Observation?subject=Patient/p2",
            "Observation?subject:Patient=p2",
            "Observation?patient=p1&performer=Patient/p2",
            "Observation?patient=p1,p2",
            "Observation?subject=https://gw/fhir/Patient/p2",
            "Observation?subject=https://evil/fhir/Patient/p1",
            "Observation?patient=p1&focus=Patient/p2",
            "Condition?subject=Patient/p2",
            "Observation?patient=p1&subject:Patient.link=Patient/p2",
            "Patient?_id=p2",
            "Patient?_id=p1,p2",
        ] {
            let e = run(url, &opts).unwrap_err();
            assert!(
                e.reason.contains("other than the token's"),
                "{url}: {}",
                e.reason
            );
        }
        // Chains and reverse chains that could test other patients' data.
        for url in [
            "Observation?patient=p1&focus:Condition.code=x",
            "Observation?patient=p1&encounter.status=x",
            "Observation?patient=p1&_has:Provenance:target:agent=x",
            "Patient?_id=p1&general-practitioner.name=x",
            "Patient?_has:Observation:focus:code=x",
        ] {
            assert!(run(url, &opts).is_err(), "{url}");
        }
        for url in [
            "Observation?patient=p1&subject:Patient.name=x",
            "Observation?patient=p1&performer.name=x",
            "Observation?subject.name=Alice",
            "Group?member:Patient.birthdate=lt1980-01-01",
            "Observation?subject:Patient.link:Patient.birthdate=lt1980",
            "Patient?_has:Observation:patient:focus.code=x",
            "Patient?_has:Observation:patient:_has:Provenance:target:agent=x",
            // A Patient whose `link` names p1 is another's record.
            "Patient?_has:Patient:link:birthdate=ge1980-01-01",
            // Sorted by the values of linked resources (HAPI's chained
            // sort): the order tells them.
            "Observation?patient=p1&_sort=Condition:focus.code",
            "Observation?performer=Patient/p1&_sort=-Patient:subject.birthdate",
            "Observation?patient=p1&_sort=date,subject.birthdate",
            "Patient/p1/Observation?_sort=Observation:derived-from.date",
            "Patient?_id=p1&_sort=general-practitioner.name",
            // Membership in a List that need not be the patient's (HAPI:
            // `_has:List:item:_id`).
            "Patient?_list=9001",
            "Observation?patient=p1&_list=9001,9002",
            "Patient/p1/Observation?_list=9001",
            "Observation?_list:missing=false",
        ] {
            assert!(run(url, &opts).is_err(), "{url}");
        }
        for url in [
            "Patient?_has:Observation:patient:code=x",
            "Patient?_id=p1&_has:Observation:subject:code=x",
            "Observation?patient=p1&_sort=-date,code",
            "Patient/p1/Observation?_sort=date",
        ] {
            assert!(run(url, &opts).is_ok(), "{url}");
        }
        // Not narrowable: links of Patient, types outside the compartment,
        // history, unbounded parameters, conditional interactions.
        for url in [
            "Patient?link=Patient/p1",
            "Practitioner?name=x",
            "Observation/_history",
            "Observation?patient=p1&_filter=x",
            "Observation?patient=p1&_contained=true",
            "?code=1",
        ] {
            assert!(run(url, &opts).is_err(), "{url}");
        }
        // A server's opaque paging link: allowed, every page checked.
        let d = run("?_getpages=abc&_getpagesoffset=20&_count=10", &opts).unwrap();
        assert_eq!((d.check, d.narrow), (checked, Vec::new()));
        // Without a page id it is a search of every patient's data.
        assert!(run("?_summary=count", &opts).is_err());
        assert!(run("?_count=0", &opts).is_err());
    }

    #[test]
    fn patient_writes_carry_a_write_check() {
        let w = |body, existing| {
            Some(WriteCheck {
                patient: Some("p1".into()),
                filters: None,
                body,
                existing,
            })
        };
        for (method, url, want) in [
            ("POST", "Observation", w(true, false)),
            ("PUT", "Observation/o1", w(true, true)),
            ("PATCH", "Observation/o1", w(true, true)),
            ("DELETE", "Observation/o1", w(false, true)),
            ("PUT", "Patient/p1", w(true, true)),
            ("PATCH", "Patient/p1", w(true, true)),
        ] {
            let d = check("patient/*.cruds", Some("p1"), method, url).unwrap();
            assert_eq!(d.write, want, "{method} {url}");
            assert_eq!(d.check, None);
        }
        for (method, url, why) in [
            ("POST", "Patient", "creating a Patient"),
            ("PUT", "Patient/p2", "only Patient/p1 itself"),
            ("DELETE", "Patient/p1", "only Patient/p1 itself"),
            ("PUT", "Practitioner/x", "not in the Patient compartment"),
            ("PUT", "Observation?code=1", "conditional"),
            ("DELETE", "Observation?code=1", "conditional"),
        ] {
            let e = check("patient/*.cruds", Some("p1"), method, url).unwrap_err();
            assert!(e.reason.contains(why), "{method} {url}: {}", e.reason);
        }
        // user/ scopes: no write check.
        let d = check("user/*.cruds", None, "PUT", "Observation/o1").unwrap();
        assert_eq!(d.write, None);
    }

    #[test]
    fn patient_bundles_carry_entry_write_checks() {
        let grant = ScopeSet::parse("patient/*.cruds");
        let bundle = |kind: &str, entries: &str| {
            let body =
                format!(r#"{{"resourceType":"Bundle","type":"{kind}","entry":[{entries}]}}"#);
            classify_bundle(req("POST", ""), body.as_bytes()).unwrap()
        };
        let create = r#"{"resource":{"resourceType":"Observation"},"request":{"method":"POST","url":"Observation"}}"#;
        let update = r#"{"resource":{"resourceType":"Observation","id":"o1"},"request":{"method":"PUT","url":"Observation/o1"}}"#;
        let delete = r#"{"request":{"method":"DELETE","url":"Condition/c1"}}"#;
        let d = decide(
            &bundle("transaction", &format!("{create},{update},{delete}")),
            &grant,
            Some("p1"),
        )
        .unwrap();
        let w = |body, existing| WriteCheck {
            patient: Some("p1".into()),
            filters: None,
            body,
            existing,
        };
        assert_eq!(
            d.entry_writes,
            vec![(0, w(true, false)), (1, w(true, true)), (2, w(false, true))]
        );
        // Reads and searches: checked in the response, searches narrowed.
        let d = decide(
            &bundle(
                "batch",
                &format!(
                    r#"{create},{{"request":{{"method":"GET","url":"Observation/o1"}}}},{{"request":{{"method":"GET","url":"Condition?code=x"}}}}"#
                ),
            ),
            &grant,
            Some("p1"),
        )
        .unwrap();
        assert_eq!(d.entry_checks.len(), 2);
        assert_eq!(d.entry_checks[0].index, 1);
        assert_eq!(d.entry_checks[1].index, 2);
        assert_eq!(
            d.entry_checks[1].narrow,
            vec![("patient".to_string(), "p1".to_string())]
        );
        for (entries, why) in [
            (
                r#"{"request":{"method":"GET","url":"Observation?patient=p2"}}"#,
                "other than the token's",
            ),
            (
                r#"{"request":{"method":"PATCH","url":"Observation/o1"}}"#,
                "PATCH inside a Bundle",
            ),
            (
                r#"{"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}}"#,
                "creating a Patient",
            ),
            (
                r#"{"request":{"method":"DELETE","url":"Observation?code=1"}}"#,
                "conditional",
            ),
        ] {
            for kind in ["batch", "transaction"] {
                let e = decide(
                    &bundle(kind, &format!("{create},{entries}")),
                    &grant,
                    Some("p1"),
                )
                .unwrap_err();
                assert!(
                    e.reason.contains("entry 1") && e.reason.contains(why),
                    "{kind} {entries}: {}",
                    e.reason
                );
            }
        }
    }

    #[test]
    fn bundles_need_every_entry() {
        let body = br#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"request":{"method":"GET","url":"Observation/1"}},
            {"request":{"method":"DELETE","url":"Condition/1"}}]}"#;
        let t = classify_bundle(req("POST", ""), body).unwrap();
        let d = decide(
            &t,
            &ScopeSet::parse("user/Observation.rs user/Condition.rs"),
            None,
        )
        .unwrap_err();
        assert!(d.reason.contains("entry 1"), "{}", d.reason);
        let ok = decide(
            &t,
            &ScopeSet::parse("user/Observation.rs user/Condition.d"),
            None,
        )
        .unwrap();
        assert_eq!(
            ok.scopes_used,
            vec![
                "user/Condition.d".to_string(),
                "user/Observation.rs".to_string()
            ]
        );
    }
}
