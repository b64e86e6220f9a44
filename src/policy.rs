//! Stage 6, second half: the operators' YAML policies (pure). Rules can
//! only narrow what the token's scopes and patient context already grant.
//!
//! `policies/*.yaml` files are read in file-name order; each holds ordered
//! `rules`. A request is matched against the rules in order:
//!
//! - a matching `allow` rule ends evaluation: allowed;
//! - a matching `deny` rule ends it: refused (403), naming the rule;
//! - a matching `require` rule refuses the request unless its requirement
//!   (a binding, claim values) holds, then evaluation goes on;
//! - no rule matching: allowed (the scopes already granted it).
//!
//! Every condition of a rule's `when` must hold (an absent one always
//! does); a list means any of its values.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::client_addr::{in_cidr, parse_cidr, Cidr};

/// One policy file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub when: Match,
    /// `allow`, `deny` or `require`.
    pub effect: String,
    #[serde(default)]
    pub require: Option<Requirement>,
    /// A token bucket for the requests this rule matches.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// A `deny` that a declared emergency (break-glass, with a reason) may
    /// pass. Never applies to scopes or the patient context.
    #[serde(default)]
    pub break_glass: bool,
}

/// `requests` per `per_seconds`, as a token bucket (that many at once,
/// refilled evenly), counted separately for each client, user or source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// `client` (client_id), `user` (sub) or `source` (client address).
    pub per: String,
    pub requests: u32,
    pub per_seconds: u32,
}

/// Conditions of a rule; all present ones must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Configured issuer names.
    #[serde(default, deserialize_with = "non_empty")]
    pub issuer: Vec<String>,
    #[serde(default, deserialize_with = "non_empty")]
    pub client_id: Vec<String>,
    /// Claim name → accepted values (a claim holding a list matches when
    /// any element does).
    #[serde(default, deserialize_with = "non_empty_claims")]
    pub claims: BTreeMap<String, Vec<String>>,
    /// Raw scopes, any of which the token carries.
    #[serde(default, deserialize_with = "non_empty")]
    pub scope: Vec<String>,
    /// FHIR interactions (`read`, `search-type`, `delete`, …).
    #[serde(default, deserialize_with = "non_empty")]
    pub interaction: Vec<String>,
    #[serde(default, deserialize_with = "non_empty")]
    pub resource_type: Vec<String>,
    /// Operation names without `$`.
    #[serde(default, deserialize_with = "non_empty")]
    pub operation: Vec<String>,
    /// Paths below the FHIR base: `*` matches one segment, a final `**`
    /// any rest (e.g. `Patient/*/$everything`, `Binary/**`).
    #[serde(default, deserialize_with = "non_empty")]
    pub path: Vec<String>,
    /// Client addresses, as CIDR blocks (`10.0.0.0/8`, `::1/128`): the
    /// client as [`crate::client_addr`] resolves it (behind a trusted
    /// proxy, from `X-Forwarded-For`).
    #[serde(default, deserialize_with = "non_empty")]
    pub source: Vec<String>,
    /// `bearer`, `dpop` or `mtls`.
    #[serde(default, deserialize_with = "non_empty")]
    pub binding: Vec<String>,
    /// Parameter names, any of which the request carries (in its query, a
    /// search's form body, a conditional create's `If-None-Exist` or a
    /// written conditional reference's search): matched without a
    /// modifier or chain (`_include` holds for `_include:iterate`,
    /// `subject` for `subject.name`), in any case.
    #[serde(default, deserialize_with = "non_empty")]
    pub param: Vec<String>,
    /// A UTC time window (`days` of the week, `from`–`to` as HH:MM).
    #[serde(default)]
    pub time: Option<TimeWindow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    /// `mon` … `sun`; empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// HH:MM, UTC, inclusive.
    pub from: String,
    /// HH:MM, UTC, exclusive; before `from` means the window spans midnight.
    pub to: String,
}

/// What a `require` rule demands.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// One of these bindings.
    #[serde(default)]
    pub binding: Vec<String>,
    /// Claim name → accepted values.
    #[serde(default, deserialize_with = "non_empty_claims")]
    pub claims: BTreeMap<String, Vec<String>>,
}

/// A condition's list of values, which may not be empty: elsewhere a list
/// means any of its values, and an empty one (a template left blank, every
/// value edited out) would read as "any request" where absent, as "no
/// request" under `claims` — an allow for everyone or a deny for no one,
/// with nothing said.
fn non_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(EMPTY_LIST));
    }
    Ok(v)
}

/// `claims`, each with at least one value, and at least one claim.
fn non_empty_claims<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    let m = BTreeMap::<String, Vec<String>>::deserialize(d)?;
    if m.is_empty() || m.values().any(Vec::is_empty) {
        return Err(serde::de::Error::custom(EMPTY_LIST));
    }
    Ok(m)
}

const EMPTY_LIST: &str = "an empty list (or map) of values: list the values the condition \
     accepts, or leave the key out for any value";

/// A rule ready to evaluate, with where it came from.
#[derive(Debug, Clone)]
pub struct Rule {
    pub file: String,
    pub name: String,
    pub effect: Effect,
    pub rate_limit: Option<RateLimit>,
    pub break_glass: bool,
    pub when: Match,
    sources: Vec<Cidr>,
    window: Option<(Vec<u8>, u16, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    Require(Requirement),
}

impl PartialEq for Requirement {
    fn eq(&self, o: &Self) -> bool {
        self.binding == o.binding && self.claims == o.claims
    }
}
impl Eq for Requirement {}

/// Every rule of every file, in order.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub rules: Vec<Rule>,
}

impl PolicySet {
    /// Rules whose `when.issuer` names an issuer not among `names` (such a
    /// condition never holds: a deny rule naming it would refuse nothing),
    /// as (file, rule, issuer).
    pub fn unknown_issuers<'a>(&'a self, names: &[&str]) -> Vec<(&'a str, &'a str, &'a str)> {
        let mut out = Vec::new();
        for r in &self.rules {
            for i in &r.when.issuer {
                if !names.contains(&i.as_str()) {
                    out.push((r.file.as_str(), r.name.as_str(), i.as_str()));
                }
            }
        }
        out
    }
}

/// What is known of a request when policies are evaluated.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    pub issuer: &'a str,
    pub client_id: Option<&'a str>,
    pub claims: &'a Value,
    pub scopes: &'a [String],
    pub interaction: &'a str,
    pub resource_type: Option<&'a str>,
    pub operation: Option<&'a str>,
    /// The path below the FHIR base.
    pub path: &'a str,
    pub source: Option<IpAddr>,
    pub binding: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// A declared emergency's reason (break-glass), when there is one.
    pub break_glass: Option<&'a str>,
    /// The upstream's own `_` parameters that reach nothing
    /// (`upstream.special_params`).
    pub special_params: &'a [String],
    /// The request (or Bundle entry) whose parameters `when.param` reads:
    /// its query and form body's, its conditional create's
    /// (`If-None-Exist`), its written conditional references'; `None` for
    /// a type it reaches.
    pub request: Option<&'a crate::fhir::classify::FhirRequest>,
}

/// A verdict, and for an allowed stored page the resource types its
/// answer may not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub verdict: Verdict,
    pub refused_types: Vec<RefusedType>,
}

/// A resource type a policy rule refuses on a stored page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedType {
    pub resource_type: String,
    /// `file#rule`.
    pub rule: String,
    pub reason: String,
}

/// The policies' verdict, naming the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule refused it; `by` names the allowing rule, if one matched;
    /// `limits` are the rate limits of every rule that matched on the way
    /// (`file#rule`, limit), for the caller to count.
    Allow {
        by: Option<String>,
        limits: Vec<(String, RateLimit)>,
        /// The break-glass-able deny rules the emergency passed.
        broke_glass: Vec<String>,
    },
    Deny {
        by: String,
        reason: String,
    },
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

impl PolicySet {
    /// Builds the rules of one parsed file; every problem found is
    /// reported as `(rule index, key, message)`.
    pub fn add_file(&mut self, file: &str, spec: &PolicyFile) -> Vec<(usize, String, String)> {
        let mut problems = Vec::new();
        for (i, r) in spec.rules.iter().enumerate() {
            let mut p = |key: &str, msg: String| problems.push((i, key.to_string(), msg));
            if r.name.is_empty() {
                p("name", "must not be empty".into());
            }
            if self.rules.iter().any(|o| o.name == r.name)
                || spec.rules[..i].iter().any(|o| o.name == r.name)
            {
                p("name", format!("duplicate rule name '{}'", r.name));
            }
            let effect = match (r.effect.as_str(), &r.require) {
                ("allow", None) => Some(Effect::Allow),
                ("deny", None) => Some(Effect::Deny),
                ("require", Some(req)) => {
                    if req.binding.is_empty() && req.claims.is_empty() {
                        p("require", "names nothing to require".into());
                    }
                    for b in &req.binding {
                        if !RULE_BINDINGS.contains(&b.as_str()) {
                            p(
                                "require.binding",
                                format!("'{b}' is not one of {}", RULE_BINDINGS.join(", ")),
                            );
                        }
                    }
                    Some(Effect::Require(req.clone()))
                }
                ("require", None) => {
                    p("require", "effect: require needs a require section".into());
                    None
                }
                ("allow" | "deny", Some(_)) => {
                    p("require", "only used with effect: require".into());
                    None
                }
                (other, _) => {
                    p(
                        "effect",
                        format!("'{other}' is not one of: allow, deny, require"),
                    );
                    None
                }
            };
            if let Some(l) = &r.rate_limit {
                if !matches!(l.per.as_str(), "client" | "user" | "source") {
                    p(
                        "rate_limit.per",
                        format!("'{}' is not one of: client, user, source", l.per),
                    );
                }
                if l.requests == 0 || l.per_seconds == 0 {
                    p(
                        "rate_limit",
                        "requests and per_seconds must be at least 1".into(),
                    );
                }
                // A bucket idle a day is forgotten (full again): longer
                // windows would be kept only while used.
                if l.per_seconds > 86_400 {
                    p(
                        "rate_limit.per_seconds",
                        format!("{} is more than a day (86400)", l.per_seconds),
                    );
                }
            }
            if r.break_glass && r.effect != "deny" {
                p(
                    "break_glass",
                    "only a deny rule can be passed by break-glass".into(),
                );
            }
            let w = &r.when;
            for x in &w.interaction {
                if x == "capabilities" {
                    p(
                        "when.interaction",
                        "'capabilities' never holds: /metadata is a public route, answered \
                         before any policy"
                            .into(),
                    );
                }
                if !crate::fhir::classify::Interaction::ALL
                    .iter()
                    .any(|i| i.as_str() == x)
                {
                    p(
                        "when.interaction",
                        format!("'{x}' is not a FHIR interaction fhirwall knows"),
                    );
                }
            }
            for t in &w.resource_type {
                if !crate::fhir::resource_types::is_resource_type(t) {
                    p(
                        "when.resource_type",
                        format!("'{t}' is not an R4 resource type"),
                    );
                }
            }
            for o in &w.operation {
                // Matched against the name the classifier keeps: without
                // its `$` (a rule naming `$everything` would never hold).
                let name = o.strip_prefix('$').unwrap_or(o);
                if !crate::fhir::classify::is_valid_operation(&format!("${name}")) {
                    p(
                        "when.operation",
                        format!("'{o}' is not an operation name (letters, digits, - and _)"),
                    );
                } else if name != o {
                    p(
                        "when.operation",
                        format!("'{o}': name operations without the $ ('{name}')"),
                    );
                }
            }
            for pattern in &w.path {
                if pattern.contains(['?', '#', '%']) {
                    p(
                        "when.path",
                        format!(
                            "'{pattern}': a path pattern is matched against the decoded path below \
                             the FHIR base, without a query"
                        ),
                    );
                }
                let segments: Vec<&str> = pattern.trim_matches('/').split('/').collect();
                let first = segments[0];
                // What a path below the base begins with (the empty
                // pattern is the base itself: a batch, a system search).
                let starts_well = (first.is_empty() && segments.len() == 1)
                    || ["*", "**", "_history", "_search"].contains(&first)
                    || crate::fhir::resource_types::is_resource_type(first)
                    || first.starts_with('$') && crate::fhir::classify::is_valid_operation(first);
                if first == "metadata" || first == ".well-known" {
                    p(
                        "when.path",
                        format!(
                            "'{pattern}' never holds: '{first}' is a public route, answered \
                             before any policy"
                        ),
                    );
                } else if !starts_well {
                    p(
                        "when.path",
                        format!(
                            "'{pattern}': '{first}' begins no path below the FHIR base (a \
                             resource type, spelt as in R4, '*', '**', '_history', '_search' \
                             or a '$operation'); write paths without the base \
                             ('Patient/**', not '/fhir/Patient/**'), or the rule never holds"
                        ),
                    );
                }
                let last = segments.len() - 1;
                let misplaced = segments.iter().enumerate().find(|(n, seg)| {
                    seg.contains('*') && !(**seg == "*" || (**seg == "**" && *n == last))
                });
                if let Some((_, seg)) = misplaced {
                    p(
                        "when.path",
                        format!(
                            "'{pattern}': '{seg}' — a '*' stands for one whole segment, and '**' \
                             only as the last one for any rest (e.g. 'Patient/*/$everything', \
                             'Observation/**')"
                        ),
                    );
                }
            }
            for name in &w.param {
                if !crate::fhir::classify::is_plain_param_name(name) {
                    p(
                        "when.param",
                        format!(
                            "'{name}' is not a parameter name (letters, digits, '_', '-'); \
                             name it without a modifier, chain or value ('_include', not \
                             '_include:iterate'; 'subject', not 'subject.name'), or the rule \
                             never holds"
                        ),
                    );
                }
            }
            for b in &w.binding {
                if !RULE_BINDINGS.contains(&b.as_str()) {
                    p(
                        "when.binding",
                        format!("'{b}' is not one of {}", RULE_BINDINGS.join(", ")),
                    );
                }
            }
            let mut sources = Vec::new();
            for s in &w.source {
                match parse_cidr(s) {
                    Some(c) => sources.push(c),
                    None => p(
                        "when.source",
                        format!("'{s}' is not an IP address or CIDR block"),
                    ),
                }
            }
            let window = match &w.time {
                None => None,
                Some(t) => {
                    let mut days = Vec::new();
                    for d in &t.days {
                        match DAYS.iter().position(|x| x == d) {
                            Some(i) => days.push(i as u8),
                            None => p(
                                "when.time.days",
                                format!("'{d}' is not one of {}", DAYS.join(", ")),
                            ),
                        }
                    }
                    // `to` may be 24:00, the end of the day.
                    let to = if t.to == "24:00" {
                        Some(24 * 60)
                    } else {
                        hhmm(&t.to)
                    };
                    match (hhmm(&t.from), to) {
                        (Some(f), Some(to)) if f == to => {
                            p(
                                "when.time",
                                format!(
                                    "from '{}' and to '{}' are the same: an empty window (a whole \
                                     day is from '00:00' to '24:00')",
                                    t.from, t.to
                                ),
                            );
                            None
                        }
                        (Some(f), Some(to)) => Some((days, f, to)),
                        _ => {
                            p(
                                "when.time",
                                format!(
                                    "from '{}' / to '{}' must be HH:MM (to may be 24:00)",
                                    t.from, t.to
                                ),
                            );
                            None
                        }
                    }
                }
            };
            if let Some(effect) = effect {
                self.rules.push(Rule {
                    file: file.to_string(),
                    name: r.name.clone(),
                    effect,
                    rate_limit: r.rate_limit.clone(),
                    break_glass: r.break_glass,
                    when: w.clone(),
                    sources,
                    window,
                });
            }
        }
        problems
    }

    /// Verdicts for a request and for each of its Bundle entries, in that
    /// order: `base` with the interaction, type, operation and path of
    /// each (the path it was classified with: below the FHIR base, or an
    /// entry's URL, so a compartment search, `_history` or an operation is
    /// matched whole either way). A stored search's page as the request
    /// itself is judged type by type ([`PolicySet::evaluate_page`]); as an
    /// entry, a rule refusing any type refuses it.
    pub fn evaluate_each(
        &self,
        base: &PolicyInput,
        fhir: &crate::fhir::classify::FhirRequest,
    ) -> Vec<Judged> {
        // The verdicts on reached types depend on the caller (the same for
        // every entry), the type and the interaction only: judged once
        // each per request, however many entries reach them.
        let reached = std::cell::RefCell::new(std::collections::HashMap::new());
        let page_entries = std::cell::RefCell::new(std::collections::HashMap::new());
        std::iter::once(fhir)
            .chain(&fhir.entries)
            .enumerate()
            .map(|(i, r)| {
                let page = crate::decide::is_stored_page(r);
                let input = PolicyInput {
                    interaction: r.interaction.as_str(),
                    resource_type: r.resource_type.as_deref(),
                    operation: r.operation.as_ref().map(|(n, _)| n.as_str()),
                    path: &r.path,
                    request: Some(r),
                    ..*base
                };
                if page && i == 0 {
                    self.evaluate_page(&input)
                } else if page {
                    // A Bundle entry's answer is not trimmed by type: a
                    // page that may hold a refused type is refused. Page
                    // entries alike to the rules are judged once.
                    // (Alike: the same path and parameter names, which
                    // `when.param` reads.)
                    let names: Vec<&str> = r.params.iter().map(|(n, _)| n.as_str()).collect();
                    let mut judged = page_entries
                        .borrow_mut()
                        .entry((input.interaction, input.path, names))
                        .or_insert_with(|| self.evaluate_page(&input))
                        .clone();
                    if !judged.refused_types.is_empty() {
                        let first = judged.refused_types.swap_remove(0);
                        judged.verdict = Verdict::Deny {
                            by: first.rule,
                            reason: format!(
                                "{}: a stored page may hold {} resources, and a Bundle entry's \
                                 answer is not trimmed by type",
                                first.reason, first.resource_type
                            ),
                        };
                        judged.refused_types.clear();
                    }
                    judged
                } else {
                    let verdict = match self.evaluate(&input) {
                        Verdict::Allow {
                            by,
                            mut limits,
                            mut broke_glass,
                        } if !page => match self.evaluate_reached(
                            &input,
                            r,
                            by.as_deref(),
                            &mut reached.borrow_mut(),
                        ) {
                            Ok(more) => {
                                merge(&mut limits, &mut broke_glass, more);
                                Verdict::Allow {
                                    by,
                                    limits,
                                    broke_glass,
                                }
                            }
                            Err(deny) => deny,
                        },
                        v => v,
                    };
                    Judged {
                        verdict,
                        refused_types: Vec::new(),
                    }
                }
            })
            .collect()
    }

    /// The types a request reaches beyond its own (includes, `_has`,
    /// chains, `_type`, conditional searches; every type for a whole-system
    /// search or history, `$everything`, `$export`, an include of `*`): each
    /// must be allowed as a direct read and search of it by the same
    /// caller, else a rule refusing that type (an allow-list's catch-all
    /// too) would be evaded by reaching it indirectly; and each such read
    /// or search meets its rate limits. An operation a rule allowed by
    /// name (`operation: [export]`) reaches what it reaches by nature
    /// unless a rule before that one refuses it (first match: the allow
    /// stands over a later catch-all, not over an earlier refusal); its
    /// parameters' reach is judged by every rule. `Ok`: the rate limits and
    /// the rules whose glass the declared emergency broke on the way;
    /// `Err`: the refusal.
    fn evaluate_reached(
        &self,
        input: &PolicyInput,
        r: &crate::fhir::classify::FhirRequest,
        allowed_by: Option<&str>,
        judged: &mut std::collections::HashMap<(String, &'static str), Verdict>,
    ) -> Result<Reach, Verdict> {
        let named_at = r.operation.as_ref().and_then(|_| {
            self.rules.iter().position(|rule| {
                !rule.when.operation.is_empty()
                    && matches!(rule.effect, Effect::Allow)
                    && allowed_by == Some(rule.id().as_str())
            })
        });
        let mut reach = Reach::default();
        // The request's own type, read by another name, is judged as that
        // reading too (`own_reading`): by every rule, or, when a rule that
        // names this interaction allowed it, by the rules before that one
        // (first match: `allow {interaction: [search-compartment]}` before
        // a catch-all deny allows compartment searches without plain ones).
        if let Some(t) = r.resource_type.as_deref() {
            let allowed_at = self.rules.iter().position(|rule| {
                matches!(rule.effect, Effect::Allow)
                    && rule
                        .when
                        .interaction
                        .iter()
                        .any(|i| i == r.interaction.as_str())
                    && allowed_by == Some(rule.id().as_str())
            });
            let rules = &self.rules[..allowed_at.unwrap_or(self.rules.len())];
            for interaction in ["read", "search-type", "history-instance"]
                .into_iter()
                .filter(|i| own_reading(r, i))
            {
                let verdict = first_match(rules, &as_direct(input, interaction, t));
                reach.take(verdict, |reason| {
                    format!("{reason}: the request reads {t} resources (as a {interaction})")
                })?;
            }
        }
        let (any, reached) =
            crate::decide::reached_types(r, named_at.is_none(), input.special_params);
        self.judge_reach(
            input,
            r,
            any,
            &reached,
            &self.rules,
            Some(judged),
            &mut reach,
        )?;
        if let Some(at) = named_at {
            let (any, by_nature) = crate::decide::reached_types(r, true, input.special_params);
            let by_nature: Vec<String> = by_nature
                .into_iter()
                .filter(|t| !reached.contains(t))
                .collect();
            self.judge_reach(
                input,
                r,
                any,
                &by_nature,
                &self.rules[..at],
                None,
                &mut reach,
            )?;
        }
        Ok(reach)
    }

    /// Judges `types` (every type when `any`) as reached by `r`, by
    /// `rules`, into `reach` (through `judged`, the verdicts of every rule
    /// already given this request, when `rules` are all).
    #[allow(clippy::too_many_arguments)]
    fn judge_reach(
        &self,
        input: &PolicyInput,
        r: &crate::fhir::classify::FhirRequest,
        any: bool,
        types: &[String],
        rules: &[Rule],
        mut judged: Option<&mut std::collections::HashMap<(String, &'static str), Verdict>>,
        reach: &mut Reach,
    ) -> Result<(), Verdict> {
        let own = r.resource_type.as_deref();
        let types: Vec<&str> = if any {
            crate::fhir::resource_types::RESOURCE_TYPES.to_vec()
        } else {
            types.iter().map(String::as_str).collect()
        };
        // A whole-system search or history reaching a type is also judged
        // as that interaction of it (so a rule on `search-system` or
        // `history-*` of a type holds for it), beyond the read and search
        // every reached type is judged as.
        use crate::fhir::classify::Interaction;
        // So is a compartment search of every type (`Patient/p1/*`), as
        // a compartment search of each: `Patient/p1/Condition` would be.
        let interactions: &[&'static str] = match r.interaction {
            Interaction::SearchSystem => &["read", "search-type", "search-system"],
            Interaction::HistorySystem => &[
                "read",
                "search-type",
                "history-instance",
                "history-type",
                "history-system",
            ],
            Interaction::SearchCompartment if own.is_none() => {
                &["read", "search-type", "search-compartment"]
            }
            _ => &["read", "search-type"],
        };
        for t in types {
            for &interaction in interactions {
                // The request's own type was judged for its interaction and
                // above as what that reads it as; any other reading of it (an
                // operation's, a write's conditional search) is judged here.
                if Some(t) == own
                    && (interaction == r.interaction.as_str() || own_reading(r, interaction))
                {
                    continue;
                }
                let direct = as_direct(input, interaction, t);
                let verdict = match judged.as_deref_mut() {
                    Some(judged) => judged
                        .entry((t.to_string(), interaction))
                        .or_insert_with(|| first_match(rules, &direct))
                        .clone(),
                    None => first_match(rules, &direct),
                };
                reach.take(verdict, |reason| {
                    format!(
                        "{reason}: the request reaches {t} resources (by {interaction}), which \
                         the policies refuse to this caller"
                    )
                })?;
            }
        }
        Ok(())
    }

    /// A stored search's page names no type but may hold resources of any,
    /// and continues a search whatever it was: each type is judged as a
    /// read and a search of it (path and all, as a type a request reaches
    /// is: [`as_direct`]). Allowed when some type is, with the others'
    /// refusals to be applied to its answer; refused when every type is.
    /// An allowed page meets the rate limits (and records the broken
    /// glass) of every type it is allowed for.
    pub fn evaluate_page(&self, input: &PolicyInput) -> Judged {
        let mut refused_types = Vec::new();
        let mut by = None;
        let mut limits: Vec<(String, RateLimit)> = Vec::new();
        let mut broke_glass: Vec<String> = Vec::new();
        // Rules written for what the page is as a request (its
        // `search-system` interaction, or the base's empty path) hold for
        // it too, type by type: a refusal of whole-system searches reaches
        // their pages. Only those rules: an allow-list's catch-all would
        // otherwise refuse every page its reads and searches allow.
        let own: Vec<Rule> = self
            .rules
            .iter()
            .filter(|r| {
                r.when.interaction.iter().any(|i| i == input.interaction)
                    || r.when.path.iter().any(|p| path_matches(p, input.path))
                    || carries_param(&r.when.param, input.request)
            })
            .cloned()
            .collect();
        for t in crate::fhir::resource_types::RESOURCE_TYPES {
            let mut reach = Reach::default();
            let mut allowed_by = None;
            let mut denied = None;
            // (rules, the type as they judge it, whether an allow names
            // the rule the page is allowed by)
            let judgements = [
                (&self.rules[..], as_direct(input, "read", t), true),
                (&self.rules[..], as_direct(input, "search-type", t), true),
                (
                    &own[..],
                    PolicyInput {
                        resource_type: Some(t),
                        ..*input
                    },
                    false,
                ),
            ];
            for (rules, judged, names_allower) in judgements {
                let v = first_match(rules, &judged);
                if let (true, Verdict::Allow { by: Some(b), .. }) = (names_allower, &v) {
                    allowed_by = Some(b.clone());
                }
                if let Err(deny) = reach.take(v, |reason| reason) {
                    denied = Some(deny);
                    break;
                }
            }
            let verdict = denied.unwrap_or(Verdict::Allow {
                by: allowed_by,
                limits: reach.limits,
                broke_glass: reach.broke_glass,
            });
            match verdict {
                Verdict::Deny { by: rule, reason } => {
                    refused_types.push(RefusedType {
                        resource_type: t.to_string(),
                        rule,
                        reason,
                    });
                }
                Verdict::Allow {
                    by: b,
                    limits: l,
                    broke_glass: g,
                } => {
                    by = by.or(b);
                    merge(
                        &mut limits,
                        &mut broke_glass,
                        Reach {
                            limits: l,
                            broke_glass: g,
                        },
                    );
                }
            }
        }
        if refused_types.len() == crate::fhir::resource_types::RESOURCE_TYPES.len() {
            // Refused for every type: say so in the words of a rule that
            // names no type, if one refuses it.
            let verdict = match self.evaluate(&PolicyInput {
                resource_type: None,
                ..*input
            }) {
                deny @ Verdict::Deny { .. } => deny,
                Verdict::Allow { .. } => {
                    let first = refused_types.swap_remove(0);
                    Verdict::Deny {
                        by: first.rule,
                        reason: format!(
                            "policy rules refuse every resource type this stored page may hold ({}, …)",
                            first.reason
                        ),
                    }
                }
            };
            return Judged {
                verdict,
                refused_types: Vec::new(),
            };
        }
        Judged {
            verdict: Verdict::Allow {
                by,
                limits,
                broke_glass,
            },
            refused_types,
        }
    }

    /// The verdict for `input`.
    pub fn evaluate(&self, input: &PolicyInput) -> Verdict {
        first_match(&self.rules, input)
    }
}

/// The emergency a request declares, if the break-glass settings `bg`
/// accept it: with `bg.claim` set, that claim of the token (the
/// authorization server vouches for it; what the client writes in the
/// header does not count), else the header's value (`header`); not empty,
/// at most 500 characters, no control characters, and from a token at
/// most `bg.max_token_age_seconds` old at `now` when that is set.
pub fn break_glass_reason(
    bg: &crate::config::BreakGlassConfig,
    header: Option<&str>,
    claims: &Value,
    now: i64,
) -> Option<String> {
    let reason = match bg.claim.as_deref() {
        Some(c) => claim(claims, c).and_then(|v| v.as_str())?,
        None => header?,
    };
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 || reason.chars().any(char::is_control) {
        return None;
    }
    if let Some(max) = bg.max_token_age_seconds {
        let iat = claims.get("iat").and_then(|v| v.as_i64())?;
        if now.saturating_sub(iat) > max as i64 {
            return None;
        }
    }
    Some(reason.to_string())
}

/// Whether a request does to its own type what `interaction` does, by
/// another name, so that a rule on that `read`, `search-type` or
/// `history-instance` is not dodged by the other spelling: a vread or an
/// instance's history reads it; a compartment search (`Patient/p1/Condition`)
/// or a type's history searches it; a vread (an earlier version) or a
/// type's history (every instance's) reads instances' histories. (A
/// conditional write's search of its own type is judged with the types it
/// reaches.)
fn own_reading(r: &crate::fhir::classify::FhirRequest, interaction: &str) -> bool {
    use crate::fhir::classify::Interaction::*;
    match interaction {
        "read" => matches!(r.interaction, Vread | HistoryInstance),
        "search-type" => matches!(r.interaction, SearchCompartment | HistoryType),
        "history-instance" => matches!(r.interaction, Vread | HistoryType),
        _ => false,
    }
}

/// What the types a request reaches add to its verdict: their rules' rate
/// limits and broken glass.
#[derive(Default)]
struct Reach {
    limits: Vec<(String, RateLimit)>,
    broke_glass: Vec<String>,
}

impl Reach {
    /// Adds what an allowing `verdict` brings (its rate limits and broken
    /// glass); a refusal is returned, its reason completed by `why`.
    fn take(
        &mut self,
        verdict: Verdict,
        why: impl FnOnce(String) -> String,
    ) -> Result<(), Verdict> {
        match verdict {
            Verdict::Deny { by, reason } => Err(Verdict::Deny {
                by,
                reason: why(reason),
            }),
            Verdict::Allow {
                limits,
                broke_glass,
                ..
            } => {
                merge(
                    &mut self.limits,
                    &mut self.broke_glass,
                    Reach {
                        limits,
                        broke_glass,
                    },
                );
                Ok(())
            }
        }
    }
}

/// `input` as a direct `interaction` (`read`, `search-type`) of type `t`:
/// how a request reaching `t` is judged (without the request's
/// parameters: they are judged with the request).
fn as_direct<'a>(input: &PolicyInput<'a>, interaction: &'a str, t: &'a str) -> PolicyInput<'a> {
    PolicyInput {
        interaction,
        resource_type: Some(t),
        operation: None,
        path: t,
        request: None,
        ..*input
    }
}

/// Whether any parameter of `request` is named one of `names` (ASCII
/// case ignored: a server may read `_EXPUNGE` as `_expunge`), its
/// modifier or chain aside.
fn carries_param(names: &[String], request: Option<&crate::fhir::classify::FhirRequest>) -> bool {
    let Some(r) = request else {
        return false;
    };
    let searches = r.reference_searches.iter().map(|s| s.params.as_slice());
    [r.params.as_slice(), r.condition.as_slice()]
        .into_iter()
        .chain(searches)
        .flatten()
        .any(|(n, _)| {
            // Without its modifier or chain (`subject:Patient.name`,
            // `subject.name`: a search on `subject`).
            let base = n.split([':', '.']).next().unwrap_or(n);
            names.iter().any(|x| x.eq_ignore_ascii_case(base))
        })
}

/// Adds `more` to `limits` and `broke_glass`, each rule once.
fn merge(limits: &mut Vec<(String, RateLimit)>, broke_glass: &mut Vec<String>, more: Reach) {
    for l in more.limits {
        if !limits.iter().any(|x| x.0 == l.0) {
            limits.push(l);
        }
    }
    for g in more.broke_glass {
        if !broke_glass.contains(&g) {
            broke_glass.push(g);
        }
    }
}

/// The verdict of the first of `rules` that decides `input` (allow, deny,
/// or a requirement unmet), with the rate limits and broken glass of the
/// rules matched on the way; allowed when none decides.
fn first_match(rules: &[Rule], input: &PolicyInput) -> Verdict {
    {
        let mut limits = Vec::new();
        let mut broke_glass = Vec::new();
        for r in rules {
            if !r.matches(input) {
                continue;
            }
            let by = r.id();
            if let Some(l) = &r.rate_limit {
                limits.push((by.clone(), l.clone()));
            }
            match &r.effect {
                Effect::Allow => {
                    return Verdict::Allow {
                        by: Some(by),
                        limits,
                        broke_glass,
                    }
                }
                Effect::Deny if r.break_glass && input.break_glass.is_some() => {
                    broke_glass.push(by);
                }
                Effect::Deny => {
                    return Verdict::Deny {
                        reason: format!("refused by policy rule {by}"),
                        by,
                    }
                }
                Effect::Require(req) => {
                    if let Some(missing) = unmet(req, input) {
                        return Verdict::Deny {
                            reason: format!("policy rule {by} requires {missing}"),
                            by,
                        };
                    }
                }
            }
        }
        Verdict::Allow {
            by: None,
            limits,
            broke_glass,
        }
    }
}

/// The claim `name`: a top-level claim of that name, else, for a dotted
/// name, the nested one it spells (`realm_access.roles`, where Keycloak
/// puts realm roles). A claim whose own name holds dots (a namespaced
/// `https://example.org/roles`) is found by its name first.
pub fn claim<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    if !name.contains('.') {
        return None;
    }
    name.split('.').try_fold(claims, |v, key| v.get(key))
}

/// A claim holds one of `values` (string, number or bool; or a list
/// holding one).
fn claim_matches(claims: &Value, name: &str, values: &[String]) -> bool {
    // `fhirUser_type`: the resource type of the fhirUser reference.
    if name == "fhirUser_type" {
        let t = claims
            .get("fhirUser")
            .and_then(Value::as_str)
            .and_then(|u| u.rsplit('/').nth(1));
        return t.is_some_and(|t| values.iter().any(|v| v == t));
    }
    let one = |v: &Value| match v {
        Value::String(s) => values.iter().any(|x| x == s),
        Value::Number(_) | Value::Bool(_) => {
            let text = v.to_string();
            values.contains(&text)
        }
        _ => false,
    };
    match claim(claims, name) {
        Some(Value::Array(a)) => a.iter().any(one),
        Some(v) => one(v),
        None => false,
    }
}

/// The bindings a rule may name (a token bound both ways holds `dpop` and
/// `mtls`; `dpop+mtls` is how it is recorded, not a value to match).
const RULE_BINDINGS: &[&str] = &["bearer", "dpop", "mtls"];

/// Whether a request's binding (`bearer`, `dpop`, `mtls`, or `dpop+mtls`
/// for a token bound both ways) holds `wanted`.
pub fn binding_holds(binding: &str, wanted: &str) -> bool {
    binding.split('+').any(|b| b == wanted)
}

fn unmet(req: &Requirement, input: &PolicyInput) -> Option<String> {
    if !req.binding.is_empty() && !req.binding.iter().any(|b| binding_holds(input.binding, b)) {
        return Some(format!("a {} binding", req.binding.join(" or ")));
    }
    for (name, values) in &req.claims {
        if !claim_matches(input.claims, name, values) {
            return Some(format!("claim {name} to be one of {}", values.join(", ")));
        }
    }
    None
}

fn path_matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.trim_matches('/').split('/');
    let mut s = path.trim_matches('/').split('/');
    loop {
        match (p.next(), s.next()) {
            // Only ever the last segment (`add_file` refuses others).
            (Some("**"), _) => return true,
            // One segment: not the empty path of the base itself.
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Rule {
    /// How verdicts name the rule: `file#name`.
    fn id(&self) -> String {
        format!("{}#{}", self.file, self.name)
    }

    fn matches(&self, i: &PolicyInput) -> bool {
        let w = &self.when;
        let any = |list: &[String], v: Option<&str>| {
            list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x == v))
        };
        any(&w.issuer, Some(i.issuer))
            && any(&w.client_id, i.client_id)
            && any(&w.interaction, Some(i.interaction))
            && any(&w.resource_type, i.resource_type)
            && any(&w.operation, i.operation)
            && (w.binding.is_empty() || w.binding.iter().any(|b| binding_holds(i.binding, b)))
            && (w.scope.is_empty() || w.scope.iter().any(|s| i.scopes.contains(s)))
            && w.claims
                .iter()
                .all(|(name, values)| claim_matches(i.claims, name, values))
            && (w.path.is_empty() || w.path.iter().any(|p| path_matches(p, i.path)))
            && (w.param.is_empty() || carries_param(&w.param, i.request))
            && (self.sources.is_empty()
                || i.source
                    .is_some_and(|ip| self.sources.iter().any(|c| in_cidr(ip, *c))))
            && self.window.as_ref().is_none_or(|(days, from, to)| {
                let day = (i.now.div_euclid(86_400) + 3).rem_euclid(7) as u8; // 1970-01-01 was a Thursday
                let minute = (i.now.rem_euclid(86_400) / 60) as u16;
                let in_time = if from <= to {
                    *from <= minute && minute < *to
                } else {
                    minute >= *from || minute < *to
                };
                (days.is_empty() || days.contains(&day)) && in_time
            })
    }
}

/// Roles (pure): the request must also be allowed by the ceiling of one of
/// the token's roles (its scopes, and its interactions when listed).
///
/// A ceiling bounds the token's scopes: the request is decided again on
/// the part of the token's scopes the ceiling also grants
/// ([`ScopeSet::intersect`](crate::scope::ScopeSet::intersect)), and that
/// decision — with any answer check, narrowing or write proof the narrower
/// scopes bring, e.g. a `patient/` ceiling over a `user/` token — is the
/// one that stands. `Ok(None)`: no role is mapped and unmapped tokens are
/// let through, so the token's own decision stands. `Err`: why not.
pub fn role_ceiling(
    roles: &crate::config::Roles,
    claims: &crate::token::Claims,
    fhir: &crate::fhir::classify::FhirRequest,
    opts: &crate::decide::DecideOptions,
) -> Result<Option<crate::decide::Decision>, String> {
    let names: Vec<String> = if roles.claim == "fhirUser" {
        claims
            .fhir_user
            .as_deref()
            .and_then(|u| u.rsplit('/').nth(1))
            .map(|t| vec![t.to_string()])
            .unwrap_or_default()
    } else {
        match claim(&claims.raw, &roles.claim) {
            Some(Value::String(r)) => vec![r.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mapped: Vec<_> = names
        .iter()
        .filter_map(|n| roles.map.get_key_value(n))
        .collect();
    if mapped.is_empty() {
        return if roles.unmapped_deny {
            Err(format!(
                "no role of the token (claim '{}') is mapped to a ceiling",
                roles.claim
            ))
        } else {
            Ok(None)
        };
    }
    let requests: Vec<&crate::fhir::classify::FhirRequest> = if fhir.is_bundle() {
        fhir.entries.iter().collect()
    } else {
        vec![fhir]
    };
    // Allowed if some role's ceiling allows it (the ceilings add up); the
    // first that does decides.
    let bounded = mapped.iter().find_map(|(_, (ceiling, interactions))| {
        let listed = requests.iter().all(|r| {
            interactions.is_empty() || interactions.iter().any(|i| i == r.interaction.as_str())
        });
        if !listed {
            return None;
        }
        let scopes = claims.scopes.intersect(ceiling);
        crate::decide::decide_with(fhir, &scopes, claims.patient.as_deref(), opts).ok()
    });
    if let Some(decision) = bounded {
        Ok(Some(decision))
    } else {
        let list: Vec<&str> = mapped.iter().map(|(n, _)| n.as_str()).collect();
        Err(format!(
            "the ceiling of role(s) {} does not allow this {}",
            list.join(", "),
            fhir.interaction
        ))
    }
}

/// Parses one policy file's YAML (errors carry line and column).
pub fn parse_file(text: &str) -> Result<PolicyFile, String> {
    // No source snippet: a rule's lines may hold a patient's id or claim
    // values, and the message is logged on a rejected reload (it still
    // names line and column). A tag is refused, not read as its text.
    let options = serde_saphyr::options! { with_snippet: false, reject_unsupported_tags: true };
    serde_saphyr::from_str_with_options(text, options).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(yaml: &str) -> PolicySet {
        let mut s = PolicySet::default();
        let problems = s.add_file("t.yaml", &parse_file(yaml).unwrap());
        assert!(problems.is_empty(), "{problems:?}");
        s
    }

    // 2026-11-25 was a Wednesday; 14:30 UTC.
    const WED_1430: i64 = 1_795_616_999 - (1_795_616_999 % 86_400) + 14 * 3600 + 30 * 60;

    /// `method url` classified (`url` below the FHIR base, with its query).
    fn request(method: &str, url: &str) -> crate::fhir::classify::FhirRequest {
        use crate::fhir::classify::{classify, HttpRequest};
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        classify(HttpRequest {
            method,
            path,
            query: (!query.is_empty()).then_some(query),
            if_none_exist: None,
        })
        .unwrap()
    }

    /// A batch `POST` of GET entries at `urls`, classified.
    fn batch_of(urls: &[&str]) -> crate::fhir::classify::FhirRequest {
        let entries: Vec<Value> = urls
            .iter()
            .map(|u| json!({"request": {"method": "GET", "url": u}}))
            .collect();
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
        crate::fhir::classify::classify_bundle(request("POST", ""), bundle.to_string().as_bytes())
            .unwrap()
    }

    fn input<'a>(claims: &'a Value, scopes: &'a [String]) -> PolicyInput<'a> {
        PolicyInput {
            issuer: "hospital",
            client_id: Some("app"),
            claims,
            scopes,
            interaction: "read",
            resource_type: Some("Observation"),
            operation: None,
            path: "Observation/o1",
            source: Some("10.1.2.3".parse().unwrap()),
            binding: "bearer",
            now: WED_1430,
            break_glass: None,
            special_params: &[],
            request: None,
        }
    }

    #[test]
    fn claims_are_found_by_name_then_by_dotted_path() {
        let claims = json!({
            "realm_access": {"roles": ["research-viewer"]},
            "https://example.org/roles": ["admin"],
            "tier": 2
        });
        let m = |name: &str, v: &str| claim_matches(&claims, name, &[v.to_string()]);
        assert!(m("realm_access.roles", "research-viewer"));
        assert!(!m("realm_access.roles", "admin"));
        assert!(m("https://example.org/roles", "admin"));
        assert!(m("tier", "2"));
        assert!(!m("realm_access.missing", "research-viewer"));
        assert!(!m("roles", "research-viewer"));
    }

    /// An empty list in a condition is refused where it is written: it
    /// would allow everyone (`client_id: []`) or deny no one (`claims`).
    #[test]
    fn an_empty_condition_list_is_refused_with_its_line() {
        for (yaml, line) in [
            (
                "rules:\n  - name: a\n    effect: allow\n    when: {client_id: []}\n",
                4,
            ),
            (
                "rules:\n  - name: a\n    effect: deny\n    when:\n      claims: {roles: []}\n",
                5,
            ),
            (
                "rules:\n  - name: a\n    effect: deny\n    when:\n      claims: {}\n",
                5,
            ),
            (
                "rules:\n  - name: a\n    effect: require\n    require: {claims: {acr: []}}\n",
                4,
            ),
        ] {
            let e = parse_file(yaml).unwrap_err();
            assert!(e.contains("empty list"), "{yaml}: {e}");
            assert!(e.contains(&format!("line {line}")), "{yaml}: {e}");
        }
        // Absent keys, and a time window's empty days, are fine.
        assert!(parse_file("rules:\n  - name: a\n    effect: deny\n    when: {}\n").is_ok());
        assert!(parse_file(
            "rules:\n  - name: a\n    effect: deny\n    when: {time: {days: [], from: '08:00', to: '18:00'}}\n"
        )
        .is_ok());
    }

    /// A rule on a compartment search of a type holds for the compartment
    /// search of every type; one on an instance's history for a vread (an
    /// earlier version) and for a type's or the system's history.
    #[test]
    fn compartment_and_history_rules_are_not_dodged_by_another_spelling() {
        let claims = json!({});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let verdict = |rules: &PolicySet, url: &str| {
            let fhir = request("GET", url);
            match rules.evaluate_each(&base, &fhir).remove(0).verdict {
                Verdict::Allow { .. } => Ok(()),
                Verdict::Deny { by, reason } => Err(format!("{by}: {reason}")),
            }
        };
        let no_condition_compartment = set("rules:
  - {name: no-cc, effect: deny, when: {interaction: [search-compartment], resource_type: [Condition]}}
");
        for url in ["Patient/p1/Condition", "Patient/p1/*"] {
            let e = verdict(&no_condition_compartment, url).unwrap_err();
            assert!(e.starts_with("t.yaml#no-cc"), "{url}: {e}");
        }
        for url in ["Patient/p1/Observation", "Condition?patient=p1"] {
            assert!(verdict(&no_condition_compartment, url).is_ok(), "{url}");
        }
        let no_versions = set("rules:
  - {name: no-versions, effect: deny, when: {interaction: [history-instance], resource_type: [Observation]}}
");
        for url in [
            "Observation/o1/_history",
            "Observation/o1/_history/3",
            "Observation/_history",
            "_history",
        ] {
            let e = verdict(&no_versions, url).unwrap_err();
            assert!(e.starts_with("t.yaml#no-versions"), "{url}: {e}");
        }
        for url in [
            "Observation/o1",
            "Condition/c1/_history/2",
            "Observation?code=x",
        ] {
            assert!(verdict(&no_versions, url).is_ok(), "{url}");
        }
        // An allow-list naming vread still allows it.
        let reads = set("rules:
  - {name: reads, effect: allow, when: {interaction: [read, vread]}}
  - {name: nothing-else, effect: deny, when: {}}
");
        assert!(verdict(&reads, "Observation/o1/_history/3").is_ok());
        assert!(verdict(&reads, "Observation/o1/_history").is_err());
    }

    #[test]
    fn types_a_request_reaches_are_judged_as_direct_reads_and_searches() {
        use crate::fhir::classify::{classify, HttpRequest};
        let claims = json!({"roles": ["research-viewer"]});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let verdict = |rules: &PolicySet, method: &str, url: &str| {
            let fhir = request(method, url);
            match rules.evaluate_each(&base, &fhir).remove(0).verdict {
                Verdict::Allow { .. } => Ok(()),
                Verdict::Deny { by, reason } => Err(format!("{by}: {reason}")),
            }
        };
        // An allow-list: Observations only, then nothing else.
        let research = set("rules:
  - name: research
    effect: allow
    when: {claims: {roles: [research-viewer]}, resource_type: [Observation], interaction: [read, search-type]}
  - name: nothing-else
    effect: deny
    when: {claims: {roles: [research-viewer]}}
");
        assert!(verdict(&research, "GET", "Observation?code=x").is_ok());
        assert!(verdict(
            &research,
            "GET",
            "Observation?_include=Observation:has-member:Observation"
        )
        .is_ok());
        for url in [
            "Observation?_include=Observation:subject:Patient",
            "Observation?_include=Observation:subject",
            "Observation?_include=*",
            "Observation?_revinclude=Provenance:target",
            "Observation?_has:Condition:subject:code=x",
            "Observation?subject:Patient.name=Smith",
        ] {
            let e = verdict(&research, "GET", url).unwrap_err();
            assert!(e.starts_with("t.yaml#nothing-else"), "{url}: {e}");
            assert!(e.contains("the request reaches"), "{url}: {e}");
        }
        // A deny-list: no DocumentReference for this client, whichever way.
        let no_docs = set("rules:
  - name: no-docs
    effect: deny
    when: {client_id: [app], resource_type: [DocumentReference]}
");
        // An operation allowed by name reaches what it reaches, by the
        // operator's word.
        let export_only = set("rules:
  - name: export
    effect: allow
    when: {client_id: [app], operation: [export]}
  - name: nothing-else
    effect: deny
    when: {client_id: [app]}
");
        assert!(verdict(&export_only, "GET", "$export").is_ok());
        assert!(verdict(&export_only, "GET", "Observation").is_err());
        // But not over a refusal before it: first match.
        let docs_first = set("rules:
  - name: no-docs
    effect: deny
    when: {resource_type: [DocumentReference]}
  - name: app-everything
    effect: allow
    when: {client_id: [app], operation: [everything, export]}
  - name: nothing-else
    effect: deny
    when: {client_id: [app]}
");
        for url in ["Patient/p1/$everything", "$export"] {
            let e = verdict(&docs_first, "GET", url).unwrap_err();
            assert!(e.starts_with("t.yaml#no-docs"), "{url}: {e}");
        }
        assert!(verdict(&no_docs, "GET", "Encounter?patient=p1").is_ok());
        for (method, url) in [
            ("GET", "DocumentReference?patient=p1"),
            (
                "GET",
                "Encounter?patient=p1&_revinclude=DocumentReference:encounter",
            ),
            ("GET", "Patient/p1/$everything"),
            ("GET", "_history"),
            ("GET", "?_type=Encounter,DocumentReference"),
            ("GET", "Patient?_has:DocumentReference:patient:type=x"),
            (
                "GET",
                "Patient?_has:Encounter:patient:_has:DocumentReference:encounter:type=x",
            ),
            (
                "GET",
                "Encounter?subject:Patient.link:DocumentReference.type=x",
            ),
            ("GET", "Patient/p1/*"),
        ] {
            let e = verdict(&no_docs, method, url).unwrap_err();
            assert!(e.starts_with("t.yaml#no-docs"), "{url}: {e}");
        }
        assert!(verdict(&no_docs, "GET", "?_type=Encounter,Condition").is_ok());
        // A conditional create searches its own type.
        let no_patient_search = set("rules:
  - name: no-patient-search
    effect: deny
    when: {client_id: [app], resource_type: [Patient], interaction: [search-type]}
");
        let create = |ine: Option<&str>| {
            let fhir = classify(HttpRequest {
                method: "POST",
                path: "Patient",
                query: None,
                if_none_exist: ine,
            })
            .unwrap();
            matches!(
                no_patient_search
                    .evaluate_each(&base, &fhir)
                    .remove(0)
                    .verdict,
                Verdict::Allow { .. }
            )
        };
        assert!(create(None));
        assert!(!create(Some("name=Smith&birthdate=1970-01-01")));

        // An operation on a type reads that type too: a rule on reading
        // Patient holds for its $everything and $export, also before an
        // allow naming the operation.
        let no_patient_reads = set("rules:
  - name: no-patient-reads
    effect: deny
    when: {client_id: [app], resource_type: [Patient], interaction: [read, search-type]}
  - name: everything
    effect: allow
    when: {client_id: [app], operation: [everything, export]}
");
        for url in [
            "Patient/p1/$everything",
            "Patient/$everything",
            "Patient/$export",
        ] {
            let e = verdict(&no_patient_reads, "GET", url).unwrap_err();
            assert!(e.starts_with("t.yaml#no-patient-reads"), "{url}: {e}");
        }
        assert!(verdict(&no_patient_reads, "GET", "Group/g1/$export").is_err());
        // A whole-system search or history reaching a type is judged as
        // that interaction of it, and a history as its type's history.
        for (rule, url) in [
            ("[history-type]", "_history"),
            ("[history-system]", "_history"),
            ("[search-system]", "?_type=DocumentReference"),
        ] {
            let rules = set(&format!(
                "rules:\n  - name: r\n    effect: deny\n    when: {{resource_type: [DocumentReference], interaction: {rule}}}\n"
            ));
            let e = verdict(&rules, "GET", url).unwrap_err();
            assert!(e.starts_with("t.yaml#r"), "{rule} {url}: {e}");
            assert!(verdict(&rules, "GET", "?_type=Encounter").is_ok(), "{rule}");
        }
    }

    /// A type a request reaches meets the rate limits of its direct read
    /// and search, each rule once: a system search by `_type` is counted
    /// like a search of that type.
    #[test]
    fn types_a_request_reaches_meet_their_rate_limits() {
        let claims = json!({});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let rules = set("rules:
  - name: obs-searches
    effect: allow
    when: {resource_type: [Observation], interaction: [search-type]}
    rate_limit: {per: client, requests: 3, per_seconds: 60}
  - name: searches
    effect: allow
    when: {interaction: [search-type, search-system]}
    rate_limit: {per: client, requests: 10, per_seconds: 60}
");
        let limits = |url: &str| {
            let fhir = request("GET", url);
            match rules.evaluate_each(&base, &fhir).remove(0).verdict {
                Verdict::Allow { limits, .. } => {
                    let mut names: Vec<String> = limits.into_iter().map(|l| l.0).collect();
                    names.sort();
                    names
                }
                v => panic!("{url}: {v:?}"),
            }
        };
        assert_eq!(limits("Observation?code=x"), ["t.yaml#obs-searches"]);
        assert_eq!(
            limits("?_type=Observation&code=x"),
            ["t.yaml#obs-searches", "t.yaml#searches"]
        );
        assert_eq!(
            limits("Encounter?_revinclude=Observation:encounter"),
            ["t.yaml#obs-searches", "t.yaml#searches"]
        );
        assert_eq!(limits("Encounter?patient=p1"), ["t.yaml#searches"]);
    }

    /// A rule on `read` or `search-type` of a type is not dodged by
    /// another spelling of it: a vread or an instance's history is a read;
    /// a compartment search or a type's history is a search of it.
    #[test]
    fn a_type_read_by_another_name_meets_the_rules_on_that_reading() {
        let claims = json!({});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let rules = set("rules:
  - name: no-condition-searches
    effect: deny
    when: {resource_type: [Condition], interaction: [search-type]}
  - name: no-allergy-reads
    effect: deny
    when: {resource_type: [AllergyIntolerance], interaction: [read]}
  - name: obs-searches
    effect: allow
    when: {resource_type: [Observation], interaction: [search-type]}
    rate_limit: {per: client, requests: 3, per_seconds: 60}
");
        let judged = |url: &str| {
            let fhir = request("GET", url);
            rules.evaluate_each(&base, &fhir).remove(0)
        };
        let denied_by = |url: &str| match judged(url).verdict {
            Verdict::Deny { by, .. } => Some(by),
            Verdict::Allow { .. } => None,
        };
        for (url, rule) in [
            ("Condition?code=x", Some("t.yaml#no-condition-searches")),
            ("Patient/p1/Condition", Some("t.yaml#no-condition-searches")),
            ("Condition/_history", Some("t.yaml#no-condition-searches")),
            ("Condition/c1", None),
            ("Condition/c1/_history", None),
            ("AllergyIntolerance/a1", Some("t.yaml#no-allergy-reads")),
            (
                "AllergyIntolerance/a1/_history/2",
                Some("t.yaml#no-allergy-reads"),
            ),
            (
                "AllergyIntolerance/a1/_history",
                Some("t.yaml#no-allergy-reads"),
            ),
            ("AllergyIntolerance?code=x", None),
        ] {
            assert_eq!(denied_by(url).as_deref(), rule, "{url}");
        }
        match judged("Patient/p1/Observation").verdict {
            Verdict::Allow { limits, .. } => {
                assert_eq!(limits.len(), 1, "{limits:?}");
                assert_eq!(limits[0].0, "t.yaml#obs-searches");
            }
            v => panic!("{v:?}"),
        }
        // An allow naming the interaction stands over a later catch-all:
        // compartment searches without plain ones.
        let compartment_only = set("rules:
  - name: compartment-searches
    effect: allow
    when: {interaction: [search-compartment, vread]}
  - name: nothing-else
    effect: deny
    when: {}
");
        let verdict = |url: &str| {
            let fhir = request("GET", url);
            match compartment_only
                .evaluate_each(&base, &fhir)
                .remove(0)
                .verdict
            {
                Verdict::Allow { .. } => None,
                Verdict::Deny { by, .. } => Some(by),
            }
        };
        assert_eq!(verdict("Patient/p1/Observation"), None);
        assert_eq!(verdict("Observation/o1/_history/2"), None);
        assert_eq!(
            verdict("Observation?code=x").as_deref(),
            Some("t.yaml#nothing-else")
        );
        // But not over a refusal before it.
        let docs_first = set("rules:
  - name: no-condition-searches
    effect: deny
    when: {resource_type: [Condition], interaction: [search-type]}
  - name: compartment-searches
    effect: allow
    when: {interaction: [search-compartment]}
");
        let fhir = request("GET", "Patient/p1/Condition");
        assert!(matches!(
            docs_first.evaluate_each(&base, &fhir).remove(0).verdict,
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn entries_are_matched_on_their_whole_path() {
        let claims = json!({});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        for (url, pattern) in [
            ("Patient/p1/$everything", "Patient/*/$everything"),
            ("Patient/vip/Observation", "Patient/vip/**"),
            ("Observation/o1/_history/2", "Observation/*/_history/*"),
            ("Observation/o1/_history", "Observation/*/_history"),
            ("_history", "_history"),
            ("$meta", "$meta"),
        ] {
            let fhir = batch_of(&[url]);
            let rules = set(&format!(
                "rules:\n  - name: r\n    effect: deny\n    when: {{path: ['{pattern}']}}\n"
            ));
            let verdicts = rules.evaluate_each(&base, &fhir);
            assert!(
                matches!(verdicts[1].verdict, Verdict::Deny { .. }),
                "{url} against {pattern}: {verdicts:?}"
            );
        }
    }

    #[test]
    fn every_match_field() {
        let claims = json!({"roles": ["clinician", "nurse"], "amr": "mfa", "level": 2,
                            "fhirUser": "https://ehr.example/fhir/Practitioner/d1"});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let deny = |when: &str| {
            set(&format!(
                "rules:\n  - name: r\n    effect: deny\n    when:\n{when}"
            ))
        };
        let cases: Vec<(&str, bool)> =
            vec![
            ("      issuer: [hospital]\n", true),
            ("      issuer: [other]\n", false),
            ("      client_id: [app, x]\n", true),
            ("      client_id: [x]\n", false),
            ("      claims:\n        roles: [nurse]\n", true),
            ("      claims:\n        roles: [admin]\n", false),
            ("      claims:\n        amr: [mfa]\n", true),
            ("      claims:\n        level: ['2']\n", true),
            ("      claims:\n        missing: [x]\n", false),
            ("      claims:\n        fhirUser_type: [Practitioner]\n", true),
            ("      claims:\n        fhirUser_type: [Patient]\n", false),
            ("      scope: [user/*.rs]\n", true),
            ("      scope: [patient/*.rs]\n", false),
            ("      interaction: [read, vread]\n", true),
            ("      interaction: [delete]\n", false),
            ("      resource_type: [Observation]\n", true),
            ("      resource_type: [Condition]\n", false),
            ("      operation: [export]\n", false),
            ("      path: [Observation/*]\n", true),
            ("      path: ['Observation/**']\n", true),
            ("      path: [Condition/*]\n", false),
            ("      path: [Observation]\n", false),
            ("      source: [10.0.0.0/8]\n", true),
            ("      source: [192.168.0.0/16, 10.1.2.3]\n", true),
            ("      source: [192.168.0.0/16]\n", false),
            ("      binding: [bearer]\n", true),
            ("      binding: [dpop, mtls]\n", false),
            (
                "      time:\n        days: [wed]\n        from: '14:00'\n        to: '15:00'\n",
                true,
            ),
            (
                "      time:\n        days: [thu]\n        from: '14:00'\n        to: '15:00'\n",
                false,
            ),
            (
                "      time:\n        from: '15:00'\n        to: '16:00'\n",
                false,
            ),
            (
                "      time:\n        from: '22:00'\n        to: '15:00'\n",
                true,
            ),
            (
                "      time:\n        days: [wed]\n        from: '00:00'\n        to: '24:00'\n",
                true,
            ),
            (
                "      time:\n        days: [tue]\n        from: '00:00'\n        to: '24:00'\n",
                false,
            ),
        ];
        for (when, hit) in cases {
            let v = deny(when).evaluate(&base);
            assert_eq!(matches!(v, Verdict::Deny { .. }), hit, "{when}");
        }
    }

    /// A token bound both ways (DPoP and a certificate) holds each
    /// binding: rules on either see it, rules on bearer do not.
    #[test]
    fn a_token_bound_both_ways_holds_each_binding() {
        let claims = json!({});
        let scopes = vec![];
        let s = set("rules:
  - {name: no-mtls, effect: deny, when: {binding: [mtls]}}
");
        let mut i = input(&claims, &scopes);
        for (binding, denied) in [
            ("dpop+mtls", true),
            ("mtls", true),
            ("dpop", false),
            ("bearer", false),
        ] {
            i.binding = binding;
            assert_eq!(
                matches!(s.evaluate(&i), Verdict::Deny { .. }),
                denied,
                "{binding}"
            );
        }
        // The recorded label is no value a rule may name (it would never
        // match: a deny on it would let everything through).
        let mut named = PolicySet::default();
        let problems = named.add_file(
            "t.yaml",
            &parse_file("rules:\n  - {name: both, effect: deny, when: {binding: [dpop+mtls]}}\n")
                .unwrap(),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        let s = set("rules:
  - {name: bound, effect: require, require: {binding: [mtls]}}
");
        for (binding, refused) in [("dpop+mtls", false), ("dpop", true), ("bearer", true)] {
            i.binding = binding;
            assert_eq!(
                matches!(s.evaluate(&i), Verdict::Deny { .. }),
                refused,
                "{binding}"
            );
        }
    }

    #[test]
    fn order_effects_and_requirements() {
        let claims = json!({"roles": ["researcher"]});
        let scopes = vec![];
        let s = set("rules:
  - name: mfa-for-writes
    effect: require
    when: {interaction: [create, update, delete]}
    require: {claims: {amr: [mfa]}}
  - name: researchers-read-only-observations
    effect: allow
    when: {claims: {roles: [researcher]}, resource_type: [Observation]}
  - name: no-researchers-elsewhere
    effect: deny
    when: {claims: {roles: [researcher]}}
");
        let mut i = input(&claims, &scopes);
        assert_eq!(
            s.evaluate(&i),
            Verdict::Allow {
                by: Some("t.yaml#researchers-read-only-observations".into()),
                limits: vec![],
                broke_glass: vec![]
            }
        );
        i.resource_type = Some("Condition");
        assert!(
            matches!(s.evaluate(&i), Verdict::Deny { by, .. } if by == "t.yaml#no-researchers-elsewhere")
        );
        i.interaction = "delete";
        match s.evaluate(&i) {
            Verdict::Deny { by, reason } => {
                assert_eq!(by, "t.yaml#mfa-for-writes");
                assert!(reason.contains("amr"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        let other = json!({"roles": ["clinician"]});
        let i = input(&other, &scopes);
        assert_eq!(
            s.evaluate(&i),
            Verdict::Allow {
                by: None,
                limits: vec![],
                broke_glass: vec![]
            }
        );
    }

    #[test]
    fn readme_examples_are_valid() {
        let readme = include_str!("../policies/README.md");
        let start = readme.find("```yaml\nrules:").expect("example block") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let mut s = PolicySet::default();
        let problems = s.add_file("README.md", &parse_file(&readme[start..end]).unwrap());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.rules.len(), 6);
    }

    #[test]
    fn a_stored_page_in_a_bundle_meets_the_rules_of_every_type() {
        let claims = json!({});
        let scopes = vec!["user/*.rs".to_string()];
        let base = input(&claims, &scopes);
        let fhir = batch_of(&["?_getpages=abc&_getpagesoffset=20"]);
        let entry = |yaml: &str| set(yaml).evaluate_each(&base, &fhir).remove(1);
        // A page may hold Conditions: refused whole (an entry's answer is
        // not trimmed), whether the rule names the type or its path; the
        // allow rule for Observations does not take it.
        for rule in [
            "{name: no-conditions, effect: deny, when: {resource_type: [Condition]}}",
            "{name: no-conditions, effect: deny, when: {path: ['Condition/**']}}",
            "{name: no-conditions, effect: deny, when: {path: ['*']}}",
        ] {
            let j = entry(&format!(
                "rules:\n  - {{name: obs, effect: allow, when: {{resource_type: [Observation]}}}}\n  - {rule}\n"
            ));
            assert!(
                matches!(&j.verdict, Verdict::Deny { by, reason }
                    if by == "t.yaml#no-conditions" && reason.contains("may hold")),
                "{rule}: {j:?}"
            );
            assert!(j.refused_types.is_empty());
        }
        // A rule on one record only, or on other interactions, leaves it.
        for rule in [
            "{name: vip, effect: deny, when: {path: ['Patient/vip/**']}}",
            "{name: no-writes, effect: deny, when: {interaction: [create, update]}}",
        ] {
            let j = entry(&format!("rules:\n  - {rule}\n"));
            assert!(matches!(j.verdict, Verdict::Allow { .. }), "{rule}: {j:?}");
        }
    }

    #[test]
    fn a_stored_page_is_judged_type_by_type() {
        let n = crate::fhir::resource_types::RESOURCE_TYPES.len();
        let claims = json!({"role": "nurse"});
        let scopes = vec![];
        let mut i = input(&claims, &scopes);
        i.interaction = "search-system";
        i.resource_type = None;
        i.path = "";
        let page = |yaml: &str| set(yaml).evaluate_page(&i);
        let types = |j: &Judged| -> Vec<String> {
            j.refused_types
                .iter()
                .map(|r| r.resource_type.clone())
                .collect()
        };

        // One type refused: the page is allowed, that type refused in its
        // answer, named with its rule; the allowing rule and the limits of
        // the types it is allowed for come along.
        let j = page("rules:
  - {name: obs, effect: allow, rate_limit: {per: client, requests: 5, per_seconds: 1}, when: {resource_type: [Observation]}}
  - {name: no-conditions, effect: deny, when: {resource_type: [Condition]}}
");
        match &j.verdict {
            Verdict::Allow { by, limits, .. } => {
                assert_eq!(by.as_deref(), Some("t.yaml#obs"));
                assert_eq!(limits.len(), 1, "{limits:?}");
                assert_eq!(limits[0].0, "t.yaml#obs");
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(types(&j), ["Condition"]);
        assert_eq!(j.refused_types[0].rule, "t.yaml#no-conditions");
        assert!(j.refused_types[0].reason.contains("no-conditions"));

        // Allowed for one type before a rule refusing the rest: only that
        // type may be on the page.
        let j = page(
            "rules:
  - {name: obs, effect: allow, when: {resource_type: [Observation]}}
  - {name: nothing-else, effect: deny}
",
        );
        assert!(matches!(j.verdict, Verdict::Allow { .. }));
        assert_eq!(j.refused_types.len(), n - 1);
        assert!(!types(&j).contains(&"Observation".to_string()));

        // A requirement on a type the token does not meet refuses that type.
        let j = page("rules:
  - {name: doctors-for-conditions, effect: require, require: {claims: {role: [doctor]}}, when: {resource_type: [Condition]}}
");
        assert_eq!(types(&j), ["Condition"]);
        assert!(
            j.refused_types[0].reason.contains("requires claim role"),
            "{j:?}"
        );

        // Refused for every type: the page is refused, in the words of the
        // rule that names no type.
        let j = page("rules:\n  - {name: closed, effect: deny}\n");
        assert!(
            matches!(&j.verdict, Verdict::Deny { by, .. } if by == "t.yaml#closed"),
            "{j:?}"
        );
        assert!(j.refused_types.is_empty());

        // A rule on a type's path refuses that type on the page, as it
        // refuses an include of it (a page's own path is empty).
        let j = page(
            "rules:\n  - {name: no-docs, effect: deny, when: {path: ['DocumentReference/**']}}\n",
        );
        assert!(matches!(j.verdict, Verdict::Allow { .. }));
        assert_eq!(types(&j), ["DocumentReference"]);
        assert_eq!(j.refused_types[0].rule, "t.yaml#no-docs");

        // A page continues a search, whatever it was: an allow-list of
        // reads and searches lets its types through (not only
        // `search-system`), a refusal of searches of a type refuses it.
        let j = page("rules:
  - {name: no-doc-search, effect: deny, when: {interaction: [search-type], resource_type: [DocumentReference]}}
  - {name: viewer, effect: allow, when: {interaction: [read, search-type], resource_type: [Observation, DocumentReference]}}
  - {name: nothing-else, effect: deny}
");
        match &j.verdict {
            Verdict::Allow { by, .. } => assert_eq!(by.as_deref(), Some("t.yaml#viewer")),
            v => panic!("{v:?}"),
        }
        assert_eq!(j.refused_types.len(), n - 1);
        assert!(!types(&j).contains(&"Observation".to_string()));
        assert!(j
            .refused_types
            .iter()
            .any(|r| r.resource_type == "DocumentReference" && r.rule == "t.yaml#no-doc-search"));

        // Rules on what the page is as a request (a whole-system search,
        // the base's path) hold for it, type by type; the allow-list above
        // is not disturbed by them.
        for rule in [
            "{name: no-system-searches, effect: deny, when: {interaction: [search-system]}}",
            "{name: no-system-searches, effect: deny, when: {path: ['']}}",
        ] {
            let j = page(&format!("rules:\n  - {rule}\n"));
            assert!(
                matches!(&j.verdict, Verdict::Deny { by, .. } if by == "t.yaml#no-system-searches"),
                "{rule}: {j:?}"
            );
        }
        let j = page("rules:
  - {name: no-system-conditions, effect: deny, when: {interaction: [search-system], resource_type: [Condition]}}
");
        assert_eq!(types(&j), ["Condition"]);

        // No rule about types or what a page does: allowed, nothing
        // refused.
        let j = page("rules:\n  - {name: obs, effect: deny, when: {interaction: [create]}}\n");
        assert!(matches!(j.verdict, Verdict::Allow { .. }));
        assert!(j.refused_types.is_empty());
    }

    #[test]
    fn break_glass_passes_only_marked_denies() {
        let s = set("rules:
  - {name: after-hours, effect: deny, break_glass: true, when: {interaction: [read]}}
  - {name: never, effect: deny, when: {resource_type: [Condition]}}
");
        let claims = json!({});
        let scopes = vec![];
        let mut i = input(&claims, &scopes);
        assert!(matches!(s.evaluate(&i), Verdict::Deny { by, .. } if by == "t.yaml#after-hours"));
        i.break_glass = Some("patient unconscious in ED");
        match s.evaluate(&i) {
            Verdict::Allow { broke_glass, .. } => assert_eq!(broke_glass, ["t.yaml#after-hours"]),
            v => panic!("{v:?}"),
        }
        i.resource_type = Some("Condition");
        assert!(matches!(s.evaluate(&i), Verdict::Deny { by, .. } if by == "t.yaml#never"));
        let mut bad = PolicySet::default();
        let problems = bad.add_file(
            "b.yaml",
            &parse_file("rules:\n  - {name: a, effect: allow, break_glass: true}\n").unwrap(),
        );
        assert_eq!(problems[0].1, "break_glass");
    }

    /// `when.param` holds for a request (or Bundle entry, or conditional
    /// create) carrying a named parameter, modifier aside, in any case;
    /// not for the types it reaches; for a stored page, type by type.
    #[test]
    fn rules_on_parameters() {
        let claims = json!({});
        let scopes = vec!["user/*.cruds".to_string()];
        let base = input(&claims, &scopes);
        let rules = set("rules:
  - {name: no-erasing, effect: deny, when: {interaction: [delete], param: [_expunge, _hardDelete]}}
  - {name: no-includes-of-conditions, effect: deny, when: {resource_type: [Condition], param: [_include]}}
  - {name: no-paging, effect: deny, when: {param: [_getpages]}}
  - {name: no-late-pages, effect: deny, when: {param: [_getpagesoffset]}}
  - {name: no-has, effect: deny, when: {param: [_has]}}
  - {name: no-organization-chains, effect: deny, when: {resource_type: [Patient], param: [organization]}}
");
        let verdict = |fhir: &crate::fhir::classify::FhirRequest, at: usize| match rules
            .evaluate_each(&base, fhir)
            .remove(at)
            .verdict
        {
            Verdict::Allow { .. } => Ok(()),
            Verdict::Deny { by, .. } => Err(by),
        };
        for (method, url, by) in [
            ("DELETE", "Observation/o1?_expunge=true", Some("no-erasing")),
            (
                "DELETE",
                "Observation/o1?_HardDelete=true",
                Some("no-erasing"),
            ),
            (
                "DELETE",
                "Observation?code=x&_expunge:x=true",
                Some("no-erasing"),
            ),
            ("DELETE", "Observation/o1", None),
            ("GET", "Observation/o1?_expunge=true", None),
            (
                "GET",
                "Condition?_include:iterate=Condition:subject",
                Some("no-includes-of-conditions"),
            ),
            ("GET", "Condition?code=x", None),
            // Reaching Condition is judged as a plain search of it.
            (
                "GET",
                "Patient?_revinclude=Condition:subject&_include=Patient:link",
                None,
            ),
            ("GET", "?_getpages=abc", Some("no-paging")),
            // A chain is a search on its first parameter.
            (
                "GET",
                "Patient?organization.name=x",
                Some("no-organization-chains"),
            ),
            (
                "GET",
                "Patient?organization:Organization.name=x",
                Some("no-organization-chains"),
            ),
        ] {
            let got = verdict(&request(method, url), 0);
            let want = by.map(|b| format!("t.yaml#{b}"));
            assert_eq!(got.err(), want, "{method} {url}");
        }
        // A Bundle entry's own parameters.
        let entries = batch_of(&["Condition?_include=Condition:subject", "Condition?code=y"]);
        assert_eq!(
            verdict(&entries, 1).unwrap_err(),
            "t.yaml#no-includes-of-conditions"
        );
        assert!(verdict(&entries, 2).is_ok());
        // Stored pages in a Bundle, alike but for their parameters: each
        // judged with its own.
        let pages = batch_of(&["?_getpages=abc", "?_getpages=abc&_getpagesoffset=500"]);
        let rules_on_pages = set("rules:
  - {name: no-late-pages, effect: deny, when: {param: [_getpagesoffset]}}
");
        let judged = rules_on_pages.evaluate_each(&base, &pages);
        assert!(
            matches!(judged[1].verdict, Verdict::Allow { .. }),
            "{judged:?}"
        );
        assert!(
            matches!(&judged[2].verdict, Verdict::Deny { by, .. } if by == "t.yaml#no-late-pages"),
            "{judged:?}"
        );
        // The searches a written conditional reference makes.
        let mut write = request("POST", "Observation");
        write.reference_searches = crate::fhir::classify::written_references(
            &json!({"resourceType": "Observation",
                    "subject": {"reference": "Patient?_has:Condition:subject:code=x"}}),
            false,
        )
        .unwrap();
        assert_eq!(verdict(&write, 0).unwrap_err(), "t.yaml#no-has");
        // A conditional create's search.
        use crate::fhir::classify::{classify, HttpRequest};
        let create = classify(HttpRequest {
            method: "POST",
            path: "Condition",
            query: None,
            if_none_exist: Some("_include=Condition:subject"),
        })
        .unwrap();
        assert_eq!(
            verdict(&create, 0).unwrap_err(),
            "t.yaml#no-includes-of-conditions"
        );
        // Names only, without modifiers or values.
        let mut bad = PolicySet::default();
        let problems = bad.add_file(
            "b.yaml",
            &parse_file(
                "rules:\n  - {name: a, effect: deny, when: {param: ['_include:iterate', 'a=b', '', subject.name]}}\n",
            )
            .unwrap(),
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().all(|p| p.1 == "when.param"), "{problems:?}");
    }

    #[test]
    fn problems_name_rule_and_key() {
        let mut s = PolicySet::default();
        let f = parse_file("rules:
  - {name: a, effect: allow, when: {interaction: [reed], resource_type: [Foo], source: [300.1.1.1/8], binding: [tls]}}
  - {name: a, effect: maybe}
  - {name: b, effect: require}
  - {name: c, effect: deny, when: {time: {days: [someday], from: '25:00', to: '10:00'}}}
  - {name: d, effect: deny, when: {operation: [$everything], path: ['Patient?name=x']}}
  - {name: e, effect: deny, when: {operation: ['every thing']}}
  - {name: f, effect: deny, when: {operation: [everything, export, member-match], path: ['Patient/*/$everything']}}
  - {name: g, effect: allow, rate_limit: {per: client, requests: 6, per_seconds: 604800}}
  - {name: h, effect: allow, when: {path: ['**/$everything']}}
  - {name: i, effect: deny, when: {path: ['Obs*']}}
  - {name: j, effect: deny, when: {time: {days: [sat], from: '00:00', to: '00:00'}}}
  - {name: k, effect: deny, when: {time: {days: [sun], from: '00:00', to: '24:00'}, path: [Patient/**, '*']}}
  - {name: l, effect: deny, when: {path: ['/fhir/Patient/vip/**']}}
  - {name: m, effect: deny, when: {path: ['patient/*']}}
  - {name: n, effect: deny, when: {path: ['', '$meta', _history, '_search', '**', 'Patient/*/$everything']}}
  - {name: o, effect: deny, when: {interaction: [capabilities], path: [metadata, .well-known/smart-configuration]}}
").unwrap();
        let problems = s.add_file("p.yaml", &f);
        let keys: Vec<String> = problems
            .iter()
            .map(|(i, k, _)| format!("{i}:{k}"))
            .collect();
        for want in [
            "0:when.interaction",
            "0:when.resource_type",
            "0:when.source",
            "0:when.binding",
            "1:name",
            "1:effect",
            "2:require",
            "3:when.time.days",
            "3:when.time",
            "4:when.operation",
            "4:when.path",
            "5:when.operation",
            "7:rate_limit.per_seconds",
            "8:when.path",
            "9:when.path",
            "10:when.time",
            "12:when.path",
            "13:when.path",
            "15:when.interaction",
            "15:when.path",
        ] {
            assert!(
                keys.contains(&want.to_string()),
                "{want} missing in {keys:?}"
            );
        }
        assert!(!keys.iter().any(|k| k.starts_with("6:")), "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("11:")), "{keys:?}");
        assert!(!keys.iter().any(|k| k.starts_with("14:")), "{keys:?}");
        let base = problems.iter().find(|(i, _, _)| *i == 12).unwrap();
        assert!(base.2.contains("without the base"), "{problems:?}");
        let public: Vec<&str> = problems
            .iter()
            .filter(|(i, _, _)| *i == 15)
            .map(|(_, _, m)| m.as_str())
            .collect();
        assert_eq!(public.len(), 3, "{public:?}");
        assert!(
            public.iter().all(|m| m.contains("public route")),
            "{public:?}"
        );
        let dollar = problems.iter().find(|(i, _, _)| *i == 4).unwrap();
        assert!(dollar.2.contains("'everything'"), "{problems:?}");
        assert!(parse_file("rules:\n  - {name: a, effect: deny, whenn: {}}\n").is_err());
        assert!(parse_file("rules:\n  - {name: a, effect: deny}\n  rules: []\n").is_err());
    }

    #[test]
    fn path_patterns_match_whole_segments() {
        for (pattern, path, want) in [
            ("Observation/*", "Observation/o1", true),
            ("Observation/*", "Observation", false),
            ("Observation/**", "Observation", true),
            ("Observation/**", "Observation/o1/_history/2", true),
            ("**", "", true),
            ("*", "Patient", true),
            // The base itself (a batch, a system search) is no segment.
            ("*", "", false),
            ("Patient/*/$everything", "Patient/p1/$everything", true),
            ("Patient/*/$everything", "Patient//$everything", false),
        ] {
            assert_eq!(path_matches(pattern, path), want, "{pattern} ~ {path:?}");
        }
    }
}
