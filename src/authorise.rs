//! Stage 6 as one pure step, shared by the proxy (`proxy.rs`, `admit`) and
//! `fhirwall explain`, so that what `explain` says is what the gateway
//! does: the scopes and patient context decide, the user's role ceiling
//! bounds that grant, the operators' policies narrow it, and a request
//! whose answer must be checked may only ask for answers the check can
//! read. Counting rate limits and logging break-glass stay with the
//! caller (they have state and effects).

use std::net::IpAddr;

use crate::config::Roles;
use crate::decide::{decide_with, DecideOptions, Decision, ResponseCheck};
use crate::fhir::classify::FhirRequest;
use crate::policy::{role_ceiling, PolicyInput, PolicySet, RateLimit, RefusedType, Verdict};
use crate::token::Claims;

/// What stage 6 looks at besides the classified request.
pub struct Context<'a> {
    pub claims: &'a Claims,
    /// The client's address (see `client_addr`).
    pub source: Option<IpAddr>,
    /// `bearer`, `dpop` or `mtls`.
    pub binding: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// The declared emergency, if the request declared one.
    pub break_glass: Option<&'a str>,
}

/// The rules stage 6 applies.
pub struct Rules<'a> {
    pub decide: &'a DecideOptions,
    pub roles: Option<&'a Roles>,
    pub policies: &'a PolicySet,
}

/// What a policy that let the request through said, in order.
#[derive(Debug, Clone)]
pub struct PolicyAllow {
    pub by: Option<String>,
    pub limits: Vec<(String, RateLimit)>,
    pub broke_glass: Vec<String>,
}

/// An allowed request.
#[derive(Debug)]
pub struct Grant {
    pub decision: Decision,
    /// What the policies said, for the request and each Bundle entry in
    /// order (none when no policy is configured).
    pub allows: Vec<PolicyAllow>,
}

impl Grant {
    /// The first policy rule that allowed it by name, if one did.
    pub fn rule(&self) -> Option<&str> {
        self.allows.iter().find_map(|a| a.by.as_deref())
    }

    /// Rate limits of every matching rule, once per rule, with how many
    /// requests it counts: each Bundle entry it matched (a batch of 1,000
    /// searches is 1,000 searches), else the request itself.
    pub fn limits(&self) -> Vec<(String, RateLimit, u32)> {
        let mut limits: Vec<(String, RateLimit, u32)> = Vec::new();
        for (i, a) in self.allows.iter().enumerate() {
            for (rule, limit) in &a.limits {
                let n = u32::from(i > 0);
                match limits.iter_mut().find(|l| &l.0 == rule) {
                    Some(l) => l.2 += n,
                    None => limits.push((rule.clone(), limit.clone(), n)),
                }
            }
        }
        for l in &mut limits {
            l.2 = l.2.max(1);
        }
        limits.sort_by(|a, b| a.0.cmp(&b.0));
        limits
    }

    /// Break-glass-able rules the declared emergency passed (sorted, once
    /// each).
    pub fn broke_glass(&self) -> Vec<String> {
        let mut rules: Vec<String> = self
            .allows
            .iter()
            .flat_map(|a| a.broke_glass.iter().cloned())
            .collect();
        rules.sort();
        rules.dedup();
        rules
    }
}

/// Why stage 6 refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The scopes or patient context do not grant it.
    Scopes {
        reason: String,
        missing_scope: Option<String>,
    },
    /// Beyond the user's role ceiling (`granted_by`: the scopes that
    /// granted it).
    Roles {
        reason: String,
        granted_by: Vec<String>,
    },
    /// A policy rule (`file#rule`) refused it.
    Policy {
        rule: String,
        reason: String,
        granted_by: Vec<String>,
    },
    /// The answer must be checked, and a parameter asks for one the check
    /// cannot read.
    Uncheckable(String),
}

/// Stage 6 for a classified request.
pub fn authorise(fhir: &FhirRequest, cx: &Context, rules: &Rules) -> Result<Grant, Refusal> {
    let c = cx.claims;
    let mut decision =
        decide_with(fhir, &c.scopes, c.patient.as_deref(), rules.decide).map_err(|d| {
            Refusal::Scopes {
                reason: d.reason,
                missing_scope: d.missing_scope,
            }
        })?;
    if let Some(roles) = rules.roles {
        // The ceiling's decision replaces the token's: it is decided on
        // the token's scopes cut down to the ceiling, so it carries the
        // checks a narrower ceiling (e.g. `patient/`) demands.
        match role_ceiling(roles, c, fhir, rules.decide) {
            Ok(Some(bounded)) => decision = bounded,
            Ok(None) => {}
            Err(reason) => {
                return Err(Refusal::Roles {
                    reason,
                    granted_by: decision.scopes_used,
                })
            }
        }
    }
    let mut grant = Grant {
        decision,
        allows: Vec::new(),
    };
    if !rules.policies.rules.is_empty() {
        // Every scope the token carries, `launch` or `offline_access` too.
        let scopes = c.scopes.all_raw();
        let base = PolicyInput {
            issuer: &c.issuer_name,
            client_id: c.client_id.as_deref(),
            claims: &c.raw,
            scopes: &scopes,
            interaction: "",
            resource_type: None,
            operation: None,
            path: "",
            source: cx.source,
            binding: cx.binding,
            now: cx.now,
            break_glass: cx.break_glass,
            special_params: &rules.decide.special_params,
            request: None,
        };
        for (i, judged) in rules
            .policies
            .evaluate_each(&base, fhir)
            .into_iter()
            .enumerate()
        {
            match judged.verdict {
                Verdict::Deny { by, reason } => {
                    return Err(Refusal::Policy {
                        rule: by,
                        reason,
                        granted_by: grant.decision.scopes_used,
                    })
                }
                Verdict::Allow {
                    by,
                    limits,
                    broke_glass,
                } => grant.allows.push(PolicyAllow {
                    by,
                    limits,
                    broke_glass,
                }),
            }
            if i == 0 && !judged.refused_types.is_empty() {
                refuse_in_answer(&mut grant.decision, judged.refused_types)?;
            }
        }
    }
    if grant.decision.check.is_some() {
        checkable_params(fhir)?;
    }
    for e in &grant.decision.entry_checks {
        if let Some(entry) = fhir.entries.get(e.index) {
            checkable_params(entry)?;
        }
    }
    Ok(grant)
}

/// A stored page that a `Patient/{patient}/$everything` of this caller
/// gave (`pages.rs` remembers whose): judged as that operation's answer
/// (the shared types it returns, Practitioner, Medication, …, pass; every
/// resource of a compartment type must be the patient's) when the page is
/// allowed as a stored
/// page in `patient`'s context, its check is the plain compartment check
/// (no filter, no type granted beyond the compartment, none refused by a
/// policy), and the operation itself is allowed to this token now, by the
/// same scopes, role ceiling and policies: the check, and the break-glass
/// rules the operation passed now (the page is widened by them, so they are
/// audited with it). `None` leaves the page judged as any stored page.
pub fn everything_page(
    page: &FhirRequest,
    grant: &Grant,
    patient: &str,
    cx: &Context,
    rules: &Rules,
) -> Option<(ResponseCheck, PolicyAllow)> {
    if !crate::decide::is_stored_page(page)
        || cx.claims.patient.as_deref() != Some(patient)
        || !grant.decision.entry_checks.is_empty()
    {
        return None;
    }
    match &grant.decision.check {
        Some(ResponseCheck::Search {
            patient: Some(p),
            filters: None,
            open_types,
            refused_types,
            ..
        }) if p == patient && open_types.is_empty() && refused_types.is_empty() => {}
        _ => return None,
    }
    let path = format!("Patient/{patient}/$everything");
    let operation = crate::fhir::classify::classify(crate::fhir::classify::HttpRequest {
        method: "GET",
        path: &path,
        query: None,
        if_none_exist: None,
    })
    .ok()?;
    let everything = authorise(&operation, cx, rules).ok()?;
    // The operation's break-glass rules and rate limits go with its pages
    // (else paging would be the way round a limit on `$everything`).
    let allow = PolicyAllow {
        by: None,
        limits: everything
            .limits()
            .into_iter()
            .map(|(rule, limit, _)| (rule, limit))
            .collect(),
        broke_glass: everything.broke_glass(),
    };
    match everything.decision.check {
        Some(ResponseCheck::Everything { patient: p }) if p == patient => {
            Some((ResponseCheck::Everything { patient: p }, allow))
        }
        _ => None,
    }
}

/// A stored page allowed for some types only: its answer is checked, and
/// a resource of a refused type refuses it. The page's scope decision
/// checks its answer already (`decide::unbound_page`, or the compartment);
/// were there none, a check is made for the refused types alone.
fn refuse_in_answer(decision: &mut Decision, refused: Vec<RefusedType>) -> Result<(), Refusal> {
    if decision.check.is_none() {
        decision.check = Some(ResponseCheck::Search {
            patient: None,
            types: None,
            filters: None,
            open_types: Vec::new(),
            refused_types: Vec::new(),
        });
    }
    match &mut decision.check {
        Some(ResponseCheck::Search { refused_types, .. }) => {
            refused_types.extend(refused);
            Ok(())
        }
        // Not a search's check, which cannot carry the refusals: refused
        // whole, as the first type's rule would.
        _ => {
            let first = refused.into_iter().next();
            let (rule, reason) = first.map(|r| (r.rule, r.reason)).unwrap_or_default();
            Err(Refusal::Policy {
                rule,
                reason,
                granted_by: decision.scopes_used.clone(),
            })
        }
    }
}

/// An answer fhirwall must check has to come whole and as JSON: parameters
/// that change its format or cut elements out are refused (they would make
/// the check fail, or tell a hidden resource apart from a missing one).
fn checkable_params(req: &FhirRequest) -> Result<(), Refusal> {
    for (name, value) in &req.params {
        let ok = match name.as_str() {
            "_format" => matches!(
                value.as_str(),
                "json" | "application/json" | "application/fhir+json"
            ),
            "_summary" => matches!(value.as_str(), "count" | "false"),
            "_elements" => false,
            // With a modifier (HAPI's `_elements:exclude`), these cut or
            // change the answer too.
            n => !["_format", "_summary", "_elements", "_pretty"]
                .iter()
                .any(|p| n.strip_prefix(p).is_some_and(|rest| rest.starts_with(':'))),
        };
        if !ok {
            return Err(Refusal::Uncheckable(format!(
                "{name}={value} is refused here: this answer is checked before it is passed \
                 on, so it must be whole FHIR JSON"
            )));
        }
    }
    Ok(())
}

/// Why no wait for a rate limit helps a request with these `limits` (a
/// grant's [`Grant::limits`]), if none does: a Bundle with more entries a
/// rule counts than its bucket ever holds (the gateway answers 413).
pub fn beyond_any_bucket(limits: &[(String, RateLimit, u32)]) -> Option<String> {
    limits.iter().find_map(|(rule, limit, n)| {
        (*n > limit.requests).then(|| {
            format!(
                "this Bundle has {n} entries that policy rule {rule} counts; it allows at \
                 most {} per {} s: split it",
                limit.requests, limit.per_seconds
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Vec<RefusedType> {
        vec![RefusedType {
            resource_type: "Condition".into(),
            rule: "t.yaml#no-conditions".into(),
            reason: "refused by policy rule t.yaml#no-conditions".into(),
        }]
    }

    #[test]
    fn a_page_s_refused_types_join_its_answer_check_or_refuse_it() {
        // No check yet: one is made for the refused types alone.
        let mut d = Decision::default();
        refuse_in_answer(&mut d, refused()).unwrap();
        match &d.check {
            Some(ResponseCheck::Search {
                types: None,
                refused_types,
                ..
            }) => assert_eq!(refused_types.len(), 1),
            c => panic!("{c:?}"),
        }
        // A search's check carries them beside its own grant.
        refuse_in_answer(&mut d, refused()).unwrap();
        assert!(matches!(&d.check,
            Some(ResponseCheck::Search { refused_types, .. }) if refused_types.len() == 2));
        // Any other check cannot: refused whole, by the rule.
        let mut d = Decision {
            check: Some(ResponseCheck::in_compartment("p1")),
            ..Decision::default()
        };
        match refuse_in_answer(&mut d, refused()) {
            Err(Refusal::Policy { rule, .. }) => assert_eq!(rule, "t.yaml#no-conditions"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn checked_answers_come_whole_whatever_the_modifier() {
        use crate::fhir::classify::{classify, HttpRequest};
        let check = |q: &str| {
            checkable_params(
                &classify(HttpRequest {
                    method: "GET",
                    path: "Observation",
                    query: Some(q),
                    if_none_exist: None,
                })
                .unwrap(),
            )
        };
        assert!(check("code=x&_summary=count&_format=json").is_ok());
        for q in [
            "_elements=id",
            "_elements:exclude=subject",
            "_summary=true",
            "_summary:x=count",
            "_format:x=json",
            "_format=xml",
        ] {
            assert!(check(q).is_err(), "{q}");
        }
    }
}

#[cfg(test)]
mod everything_pages {
    use super::*;
    use crate::fhir::classify::{classify, HttpRequest};
    use crate::scope::ScopeSet;

    fn claims(scope: &str, patient: &str) -> Claims {
        Claims {
            issuer_name: "main".into(),
            iss: "https://idp".into(),
            sub: Some("u1".into()),
            client_id: Some("app".into()),
            fhir_user: None,
            patient: Some(patient.into()),
            scopes: ScopeSet::parse(scope),
            exp: i64::MAX,
            jti: None,
            cnf: None,
            raw: serde_json::json!({"client_id": "app"}),
        }
    }

    fn get(path: &str, query: &str) -> FhirRequest {
        classify(HttpRequest {
            method: "GET",
            path,
            query: Some(query),
            if_none_exist: None,
        })
        .unwrap()
    }

    /// The check `everything_page` gives `page` as a page of
    /// `Patient/p1/$everything`, for a token of `scope` in `Patient/p1`'s
    /// context, under `policies`.
    fn judged(scope: &str, page: &FhirRequest, policies: &PolicySet) -> Option<ResponseCheck> {
        judged_in("p1", scope, page, policies)
    }

    /// The same for a token in `context`'s patient context.
    fn judged_in(
        context: &str,
        scope: &str,
        page: &FhirRequest,
        policies: &PolicySet,
    ) -> Option<ResponseCheck> {
        let c = claims(scope, context);
        let cx = Context {
            claims: &c,
            source: None,
            binding: "bearer",
            now: 0,
            break_glass: None,
        };
        let opts = DecideOptions::default();
        let rules = Rules {
            decide: &opts,
            roles: None,
            policies,
        };
        // Every page asked for here is allowed as a search of its own.
        let grant = authorise(page, &cx, &rules).expect("the page is allowed");
        everything_page(page, &grant, "p1", &cx, &rules).map(|(check, allow)| {
            assert!(allow.broke_glass.is_empty(), "{:?}", allow.broke_glass);
            check
        })
    }

    #[test]
    fn a_page_is_judged_as_everything_only_when_the_operation_is_allowed_now() {
        let none = PolicySet::default();
        let page = get("", "_getpages=abc&_getpagesoffset=2&_count=2");
        assert_eq!(
            judged("patient/*.rs", &page, &none),
            Some(ResponseCheck::Everything {
                patient: "p1".into()
            })
        );
        // Searches that are no page.
        for (path, query) in [("Observation", "code=x"), ("Patient/p1/Condition", "")] {
            assert_eq!(judged("patient/*.rs", &get(path, query), &none), None);
        }
        // A policy refusing the operation to this client. (Scopes alone
        // cannot tell them apart: a stored page and `$everything` both
        // need `patient/*.rs`.)
        let mut refusing = PolicySet::default();
        let problems = refusing.add_file(
            "t.yaml",
            &crate::policy::parse_file(
                "rules:\n  - name: no-everything\n    effect: deny\n    when: {client_id: [app], operation: [everything]}\n",
            )
            .unwrap(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(judged("patient/*.rs", &page, &refusing), None);
        // The page's own patient context must be the operation's.
        assert_eq!(judged_in("p2", "patient/*.rs", &page, &none), None);
    }

    /// A page widened only because the caller declares an emergency again
    /// names the break-glass rule it passed, for its audit record.
    #[test]
    fn a_page_widened_by_break_glass_names_the_rule() {
        let mut glass = PolicySet::default();
        let problems = glass.add_file(
            "t.yaml",
            &crate::policy::parse_file(
                "rules:\n  - name: no-everything\n    effect: deny\n    break_glass: true\n    when: {operation: [everything]}\n",
            )
            .unwrap(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        let page = get("", "_getpages=abc&_getpagesoffset=2&_count=2");
        let c = claims("patient/*.rs", "p1");
        let opts = DecideOptions::default();
        let rules = Rules {
            decide: &opts,
            roles: None,
            policies: &glass,
        };
        let judged = |reason: Option<&str>| {
            let cx = Context {
                claims: &c,
                source: None,
                binding: "bearer",
                now: 0,
                break_glass: reason,
            };
            let grant = authorise(&page, &cx, &rules).expect("the page is allowed");
            everything_page(&page, &grant, "p1", &cx, &rules).map(|(c, a)| (c, a.broke_glass))
        };
        assert_eq!(judged(None), None);
        assert_eq!(
            judged(Some("patient unconscious")),
            Some((
                ResponseCheck::Everything {
                    patient: "p1".into()
                },
                vec!["t.yaml#no-everything".to_string()]
            ))
        );
    }
}
