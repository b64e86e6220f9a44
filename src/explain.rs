//! `fhirwall explain` and `fhirwall test`: replay the pure pipeline stages
//! (route, validate claims, bind, classify, decide, policies, and whether
//! the answer would be checked) for a request and a token's claims,
//! without contacting the upstream, the issuer or the JWKS.
//!
//! The token is given as its claims (JSON): a signature cannot be checked
//! offline, so `explain` says so and checks everything else.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::authorise::{authorise, Context, Refusal, Rules};
use crate::config::Settings;
use crate::decide::DecideOptions;
use crate::fhir::classify::{self, HttpRequest};
use crate::route::{normalise, route, Route};
use crate::token::check_claims;

/// A request to explain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    pub method: String,
    /// A path below the public base (`Observation?code=x`) or a full URL.
    pub url: String,
    /// A request body: a Bundle, a search by POST (a form, with
    /// `content_type: application/x-www-form-urlencoded`), or what a
    /// create, update or patch writes.
    #[serde(default)]
    pub body: Option<String>,
    /// A conditional create's `If-None-Exist` header.
    #[serde(default)]
    pub if_none_exist: Option<String>,
    /// When the request is made (RFC 3339, e.g. `2026-11-25T14:30:00Z`),
    /// for `time` rules and token ages; now when absent.
    #[serde(default)]
    pub at: Option<String>,
    /// The body's `Content-Type` (JSON when absent).
    #[serde(default)]
    pub content_type: Option<String>,
    /// `bearer`, `dpop` or `mtls` (assumed verified).
    #[serde(default = "d_binding")]
    pub binding: String,
    /// The client's address, for `source` rules.
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// A break-glass reason declared with the request.
    #[serde(default)]
    pub break_glass: Option<String>,
}

fn d_binding() -> String {
    "bearer".into()
}

/// Each stage's verdict, and the outcome.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub stages: Vec<(&'static str, String)>,
    /// `allow`, `deny`, or `error`: the question itself is not one the
    /// gateway could be asked (a time or URL that does not parse), so
    /// nothing was decided.
    pub decision: &'static str,
    /// The deciding policy rule (`file#rule`), if a rule decided.
    pub rule: Option<String>,
}

impl Explanation {
    fn deny(mut self, stage: &'static str, why: String) -> Explanation {
        self.stages.push((stage, format!("DENY: {why}")));
        self.decision = "deny";
        self
    }

    /// The question cannot be asked as given: no decision (a test case
    /// expecting a deny must not pass on its own broken input).
    fn error(mut self, stage: &'static str, why: String) -> Explanation {
        self.stages.push((stage, format!("ERROR: {why}")));
        self.decision = "error";
        self
    }
}

/// Explains `req` with `token` (a JWT) at `now`: its header is checked as
/// the gateway checks it (size, shape, algorithm, `crit`, `typ`), its
/// claims as [`explain`] does; only the signature is not.
pub fn explain_token(s: &Settings, token: &str, req: &ExplainRequest, now: i64) -> Explanation {
    // A public route, or a path the gateway does not route, is answered
    // before the token is looked at.
    let routed = match route_stage(s, req, now) {
        Ok(routed) => routed,
        Err(done) => return done,
    };
    let e = Explanation {
        stages: Vec::new(),
        decision: "allow",
        rule: None,
    };
    let u = match crate::token::inspect(token, s.tokens.max_bytes) {
        Ok(u) => u,
        Err(err) => return e.deny("validate", err.to_string()),
    };
    let Some(issuer) = s.issuers.iter().find(|i| i.issuer == u.iss) else {
        return e.deny(
            "validate",
            format!(
                "issuer '{}' is not configured",
                u.iss.chars().take(128).collect::<String>()
            ),
        );
    };
    if let Err(err) = crate::token::header_precheck(&u, issuer) {
        return e.deny("validate", err.to_string());
    }
    if issuer.introspection.is_some() {
        return e.error(
            "validate",
            format!(
                "issuer '{}' introspects its tokens: the gateway judges the introspection \
                 answer, not the token's own claims; give that answer as --claims",
                issuer.name
            ),
        );
    }
    let claims = token.split('.').nth(1).and_then(crate::token::b64_json);
    let Some(claims) = claims else {
        return e.deny("validate", "the token's payload is not JSON".into());
    };
    let mut out = explain_claims(s, &claims, false, req, routed);
    for (stage, note) in &mut out.stages {
        if *stage == "extract" {
            *note = "the token's header and claims are read; its signature is not checked offline"
                .into();
        }
    }
    out
}

/// A request past stage 1: the explanation so far, the FHIR path and
/// query below the base, and the time to judge at.
type Routed = (Explanation, String, Option<String>, i64);

/// Stage 1 as the gateway runs it: `Ok` with the FHIR path and query
/// below the base (and the time to judge at) when the request goes on to
/// its token; `Err` with the whole explanation when it is decided here (a
/// public route, a path not routed, a question that cannot be asked).
fn route_stage(s: &Settings, req: &ExplainRequest, now: i64) -> Result<Routed, Explanation> {
    let mut e = Explanation {
        stages: Vec::new(),
        decision: "allow",
        rule: None,
    };
    let now = match req.at.as_deref().map(at) {
        None => now,
        Some(Ok(t)) => t,
        Some(Err(why)) => return Err(e.error("request", why)),
    };
    // 1. Route
    // A full URL (`https://…/fhir/Observation?…`), not a path whose query
    // holds one (`Observation?subject=https://…`).
    let full = req.url.split('?').next().is_some_and(|p| p.contains("://"));
    let target = if full {
        match url::Url::parse(&req.url) {
            Ok(u) => format!(
                "{}{}",
                u.path(),
                u.query().map(|q| format!("?{q}")).unwrap_or_default()
            ),
            Err(err) => return Err(e.error("route", format!("'{}' is not a URL: {err}", req.url))),
        }
    } else {
        format!("{}/{}", s.public_base_path, req.url.trim_start_matches('/'))
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.clone(), None),
    };
    let path = match normalise(&path) {
        Ok(p) => p,
        Err(err) => return Err(e.deny("route", err.to_string())),
    };
    let rel = match route(&path, &s.public_base_path, &s.public_routes) {
        Route::NotFound => {
            return Err(e.deny("route", format!("'{path}' is not below the FHIR base")))
        }
        Route::Public(r) => {
            let has_body = req.body.as_deref().is_some_and(|b| !b.is_empty());
            if let Err(refusal) = crate::route::check_public(
                &req.method,
                query.as_deref(),
                has_body,
                &s.upstream.special_params,
            ) {
                let why = crate::proxy::public_denial(&refusal, &r).description();
                return Err(e.deny("route", why));
            }
            e.stages
                .push(("route", format!("public route '{r}': no token needed")));
            return Err(e);
        }
        Route::Fhir(r) => r,
    };
    e.stages.push(("route", format!("FHIR path '{rel}'")));
    // The query is read before the token: a malformed one is refused
    // first, then a token in it (RFC 6750 §2.3 is not accepted).
    let params = match query.as_deref().map(classify::parse_params) {
        Some(Err(err)) => return Err(e.deny("classify", err.to_string())),
        Some(Ok(p)) => p,
        None => Vec::new(),
    };
    if crate::extract::has_access_token_param(&params) {
        return Err(e.deny(
            "extract",
            "an access_token query parameter (RFC 6750 §2.3) is not accepted".into(),
        ));
    }
    Ok((e, rel, query, now))
}

/// Explains `req` under `claims` at `now` (Unix seconds), or at the
/// request's own `at`. `claims` are a JWT's, or an introspection answer
/// (it has `active`), judged as the gateway judges the answer.
pub fn explain(s: &Settings, claims: &Value, req: &ExplainRequest, now: i64) -> Explanation {
    match route_stage(s, req, now) {
        Ok(routed) => explain_claims(s, claims, true, req, routed),
        Err(done) => done,
    }
}

/// [`explain`] past its route stage (`routed`, from [`route_stage`]);
/// `may_be_answer`: the claims may be an introspection answer (not when
/// they are a JWT's payload, which may say `active` too).
fn explain_claims(
    s: &Settings,
    claims: &Value,
    may_be_answer: bool,
    req: &ExplainRequest,
    routed: Routed,
) -> Explanation {
    let (mut e, rel, query, now) = routed;

    // 2-3. Extract, validate: the claims, without the signature.
    e.stages.push((
        "extract",
        "not replayed: the token is given as its claims".into(),
    ));
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    let answer = may_be_answer && claims.get("active").is_some();
    let issuer = if answer {
        // The issuer whose introspection gave it (a JWT's issuer that
        // introspects), else the one opaque tokens go to.
        s.issuers
            .iter()
            .find(|i| i.introspection.is_some() && i.issuer == iss)
            .or_else(|| s.issuers.iter().find(|i| i.takes_opaque_tokens()))
    } else {
        s.issuers.iter().find(|i| i.issuer == iss)
    };
    let Some(issuer) = issuer else {
        if answer {
            return e.deny(
                "validate",
                "an introspection answer, and no issuer's introspection takes opaque tokens".into(),
            );
        }
        return e.deny("validate", format!("issuer '{iss}' is not configured"));
    };
    let checked = match &issuer.introspection {
        Some(cfg) if answer => crate::token::introspect::answer_claims(claims, issuer, cfg, now),
        _ => check_claims(claims, issuer, now),
    };
    let checked = checked.and_then(|c| {
        crate::token::forwarded_claims_fit(&c.raw, &s.forward_headers)?;
        Ok(c)
    });
    let c = match checked {
        Ok(c) => c,
        Err(err) => return e.deny("validate", err.to_string()),
    };
    e.stages.push((
        "validate",
        format!(
            "claims accepted for issuer '{}' (signature not checked offline)",
            issuer.name
        ),
    ));
    // 4. Bind, as the gateway binds (a proof or certificate assumed valid).
    if let Some(member) = crate::token::unenforced_cnf_member(c.cnf.as_ref()) {
        return e.deny(
            "bind",
            format!(
                "the token's cnf names '{member}', a confirmation method fhirwall does not enforce"
            ),
        );
    }
    let has = |m: &str| c.cnf.as_ref().and_then(|x| x.get(m)).is_some();
    // Shapes the gateway never accepts: a key thumbprint that is not a
    // string, a certificate thumbprint no certificate can match.
    let text = |m: &str| {
        c.cnf
            .as_ref()
            .and_then(|x| x.get(m))
            .map(|v| v.as_str().is_some_and(|t| !t.is_empty()))
    };
    if text("jkt") == Some(false) {
        return e.deny("bind", "the token's cnf.jkt is not a string".into());
    }
    if text("x5t#S256") == Some(false) {
        return e.deny(
            "bind",
            "the token's cnf x5t#S256 is not a certificate thumbprint: no client certificate \
             matches it"
                .into(),
        );
    }
    if c.cnf.is_some() && !has("jkt") && !has("x5t#S256") {
        return e.deny(
            "bind",
            "the token carries a cnf claim with no binding this gateway knows".into(),
        );
    }
    let bound = match (has("jkt"), has("x5t#S256")) {
        (true, true) => Some("dpop+mtls"),
        (true, false) => Some("dpop"),
        (false, true) => Some("mtls"),
        (false, false) => None,
    };
    if req.binding == "dpop" && !s.dpop.enabled {
        return e.deny(
            "bind",
            "DPoP is disabled (dpop.enabled: false): the DPoP scheme is refused".into(),
        );
    }
    let takes_certificates = s
        .tls
        .as_ref()
        .is_some_and(|t| t.client_auth != crate::config::ClientAuthMode::None);
    if has("x5t#S256") && !takes_certificates {
        return e.deny(
            "bind",
            "the token is bound to a client certificate (cnf x5t#S256), but the listener takes \
             none (no tls section, or client_auth: none)"
                .into(),
        );
    }
    match (bound, req.binding.as_str()) {
        // Bound both ways: sent in the DPoP scheme, over the certificate.
        (Some(b), given) if b != given && !(b == "dpop+mtls" && given == "dpop") => {
            return e.deny(
                "bind",
                format!("the token is {b}-bound but the request is explained as {given}"),
            )
        }
        (Some(b), _) => e
            .stages
            .push(("bind", format!("{b}-bound; proof assumed valid"))),
        (None, "bearer") => {
            if let Some(why) = crate::token::binding_required(&s.issuers, &c) {
                return e.deny(
                    "bind",
                    format!("{why} requires sender-constrained tokens (DPoP or mTLS); this is a plain bearer token"),
                );
            }
            e.stages.push(("bind", "bearer token".into()))
        }
        (None, other) => {
            return e.deny(
                "bind",
                format!("a {other} binding needs a bound token (cnf)"),
            )
        }
    }
    // 5. Classify, reading the body where the gateway does.
    let mut fhir = match classify::classify(HttpRequest {
        method: &req.method,
        path: &rel,
        query: query.as_deref(),
        if_none_exist: req.if_none_exist.as_deref(),
    }) {
        Ok(f) => f,
        Err(err) => return e.deny("classify", err.to_string()),
    };
    let is_form = match classify::check_content_type(req.content_type.as_deref())
        .and_then(|()| classify::form_body(req.content_type.as_deref(), None))
    {
        Ok(f) => f,
        Err(why) => return e.deny("classify", why),
    };
    let body = req.body.as_deref().unwrap_or("");
    if is_form && !body.is_empty() {
        use classify::FormError;
        match classify::add_form(&mut fhir, &req.method, &rel, body) {
            Ok(()) => {}
            Err(FormError::AccessToken) => {
                return e.deny(
                    "extract",
                    "an access_token form parameter (RFC 6750 §2.2) is not accepted".into(),
                )
            }
            Err(FormError::Malformed(err)) => return e.deny("classify", err.to_string()),
            Err(FormError::NotASearch(why)) => return e.deny("classify", why),
        }
    } else if !body.is_empty()
        && !fhir.is_bundle()
        && classify::body_classifies(&req.method, &rel, is_form)
    {
        return e.deny(
            "classify",
            classify::not_a_form(fhir.interaction, req.content_type.as_deref()),
        );
    }
    if fhir.is_bundle() {
        fhir = match classify::classify_bundle(fhir, body.as_bytes()) {
            Ok(f) => f,
            Err(err) => return e.deny("classify", err.to_string()),
        };
    }
    // A written resource's conditional references, as the gateway reads
    // them.
    if let Some(body) = req
        .body
        .as_deref()
        .filter(|_| classify::writes_resource(&fhir) && s.upstream.resolves_conditional_references)
    {
        match classify::reads_written_body(&fhir, req.content_type.as_deref(), None) {
            Ok(true) => {
                fhir = match classify::classify_written_body(fhir, body.as_bytes()) {
                    Ok(f) => f,
                    Err(err) => return e.deny("classify", err.to_string()),
                };
            }
            // Raw content (a Binary's image, PDF, …): not read.
            Ok(false) => {}
            Err(err) => return e.deny("classify", err.to_string()),
        }
    }
    if let Err(err) = fhir.within_parameter_limit(s.server.max_parameters) {
        return e.deny("classify", err.to_string());
    }
    let opts = DecideOptions::from_settings(s);
    if !s.upstream.allow_zero_padded_ids {
        let mut named = Vec::new();
        crate::decide::each_patient_named(&fhir, &opts.bases, |id| named.push(id));
        if let Some(id) = classify::numeric_alias(&fhir, &named) {
            let err = classify::ClassifyError::ZeroPaddedId(id.to_string());
            return e.deny("classify", err.to_string());
        }
    }
    e.stages.push((
        "classify",
        format!(
            "{} {}{}",
            fhir.interaction,
            fhir.resource_type.as_deref().unwrap_or(""),
            fhir.id
                .as_deref()
                .map(|i| format!("/{i}"))
                .unwrap_or_default()
        ),
    ));
    // 6. Decide: scopes and patient context, the role ceiling, policies —
    // the gateway's own step.
    // The declared emergency, as the gateway accepts it.
    let break_glass =
        crate::policy::break_glass_reason(&s.break_glass, req.break_glass.as_deref(), claims, now);
    if break_glass.is_none() {
        let declared = req.break_glass.is_some()
            || s.break_glass
                .claim
                .as_deref()
                .is_some_and(|c| crate::policy::claim(claims, c).is_some());
        if declared {
            let why = match &s.break_glass.claim {
                Some(c) => format!(
                    "not accepted: break_glass.claim is set, so only the token's '{c}' claim \
                     declares one (a string, not empty, at most 500 characters, no control \
                     characters, from a token no older than \
                     break_glass.max_token_age_seconds; the header does not count)"
                ),
                None => "not accepted: empty, over 500 characters, control characters, or \
                         a token older than break_glass.max_token_age_seconds"
                    .into(),
            };
            e.stages.push(("break-glass", why));
        }
    }
    let decide_from = |source: Option<IpAddr>| {
        authorise(
            &fhir,
            &Context {
                claims: &c,
                source,
                binding: bound.unwrap_or(&req.binding),
                now,
                break_glass: break_glass.as_deref(),
            },
            &Rules {
                decide: &opts,
                roles: s.roles.as_ref(),
                policies: &s.policies,
            },
        )
    };
    let granted = decide_from(req.source);
    // The gateway always knows the client's address. Without one here, a
    // rule on `source` never holds: if the decision would be another from
    // an address in one of the rules' blocks, the question is not one the
    // gateway could be asked (a test of such a policy would pass without
    // testing it).
    if req.source.is_none() {
        let outcome = |g: &Result<crate::authorise::Grant, Refusal>| match g {
            Ok(g) => (true, g.rule().map(str::to_string)),
            Err(Refusal::Policy { rule, .. }) => (false, Some(rule.clone())),
            Err(_) => (false, None),
        };
        let without = outcome(&granted);
        let differs = s
            .policies
            .rules
            .iter()
            .flat_map(|r| r.when.source.iter().map(move |b| (r, b)))
            .find(|(_, block)| {
                // Its first and last addresses: the last tells a block
                // apart from a smaller one at its start (an earlier
                // `10.0.0.0/24` within a later `10.0.0.0/8`).
                crate::client_addr::parse_cidr(block)
                    .map(crate::client_addr::cidr_ends)
                    .into_iter()
                    .flatten()
                    .any(|a| outcome(&decide_from(Some(a))) != without)
            });
        if let Some((r, block)) = differs {
            return e.error(
                "request",
                format!(
                    "the decision depends on the client's address (rule {}#{} names {block}): \
                     give the request's source, as --source or source:",
                    r.file, r.name
                ),
            );
        }
    }
    let grant = match granted {
        Ok(g) => g,
        Err(Refusal::Scopes { reason, .. }) => return e.deny("decide", reason),
        Err(Refusal::Roles { reason, granted_by }) => {
            e.stages.push(("decide", granted_note(&granted_by)));
            return e.deny("roles", reason);
        }
        Err(Refusal::Policy {
            rule,
            reason,
            granted_by,
        }) => {
            e.stages.push(("decide", granted_note(&granted_by)));
            if s.roles.is_some() {
                e.stages.push(("roles", "within the role ceiling".into()));
            }
            e.rule = Some(rule);
            return e.deny("policies", reason);
        }
        Err(Refusal::Uncheckable(why)) => return e.deny("check", why),
    };
    e.rule = grant.rule().map(str::to_string);
    if let Some(why) = crate::authorise::beyond_any_bucket(&grant.limits()) {
        e.stages
            .push(("decide", granted_note(&grant.decision.scopes_used)));
        return e.deny("policies", format!("413: {why}"));
    }
    let d = grant.decision;
    e.stages.push(("decide", granted_note(&d.scopes_used)));
    if s.roles.is_some() {
        e.stages.push(("roles", "within the role ceiling".into()));
    }
    if s.policies.rules.is_empty() {
        e.stages.push(("policies", "none configured".into()));
    }
    for allow in grant.allows {
        let mut note = match &allow.by {
            Some(b) => format!("allowed by rule {b}"),
            None => "no rule refused it".into(),
        };
        for rule in allow.broke_glass {
            note.push_str(&format!("; BREAK-GLASS past {rule}"));
        }
        for (rule, l) in allow.limits {
            note.push_str(&format!(
                "; rate limit {rule}: {} per {} s per {}",
                l.requests, l.per_seconds, l.per
            ));
        }
        e.stages.push(("policies", note));
    }
    // 7-8. Proxy and check.
    let mut proxy = "forwarded to the upstream".to_string();
    if !d.narrow.is_empty() {
        let add: Vec<String> = d.narrow.iter().map(|(n, v)| format!("{n}={v}")).collect();
        proxy.push_str(&format!(", narrowed with {}", add.join("&")));
    }
    e.stages.push(("proxy", proxy));
    if d.check.is_some()
        || !d.entry_checks.is_empty()
        || d.write.is_some()
        || !d.entry_writes.is_empty()
    {
        let mut note = "the answer (or, for a write, the body and the stored resource) is checked before anything is passed on".to_string();
        if let Some(crate::decide::ResponseCheck::Search { refused_types, .. }) = &d.check {
            if !refused_types.is_empty() {
                let names: Vec<&str> = refused_types
                    .iter()
                    .map(|r| r.resource_type.as_str())
                    .collect();
                let which = if names.len() <= 5 {
                    names.join(", ")
                } else {
                    format!("{} types (all but those a policy allows)", names.len())
                };
                note.push_str(&format!(
                    "; a resource of a type a policy refuses on this page ({which}) refuses it"
                ));
            }
        }
        e.stages.push(("check", note));
    }
    e
}

/// Unix seconds of an RFC 3339 time (`2026-11-25T14:30:00Z`).
fn at(text: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("at: '{text}' is not an RFC 3339 time ({e})"))
}

/// The decide stage's note: the scopes that granted the request.
fn granted_note(scopes: &[String]) -> String {
    if scopes.is_empty() {
        "granted by -".into()
    } else {
        format!("granted by {}", scopes.join(" "))
    }
}

/// One case of a policy test file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub claims: Value,
    pub request: ExplainRequest,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `allow`, `deny`, or `error` (the case's input cannot be asked).
    pub decision: String,
    /// The deciding rule (`file#rule`), when a rule must decide.
    #[serde(default)]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    pub cases: Vec<TestCase>,
}

/// Runs a test file's cases; the failures, described.
pub fn run_tests(s: &Settings, file: &TestFile, now: i64) -> Vec<String> {
    let mut failures = Vec::new();
    for case in &file.cases {
        let e = explain(s, &case.claims, &case.request, now);
        let rule_ok = case.expect.rule.is_none() || case.expect.rule == e.rule;
        // A case whose own input is broken decided nothing: it passes only
        // when it says so (`error`), never as a deny.
        if e.decision != case.expect.decision || !rule_ok {
            let last = e
                .stages
                .last()
                .map(|(st, v)| format!("{st}: {v}"))
                .unwrap_or_default();
            failures.push(format!(
                "{}: expected {}{}, got {}{} ({last})",
                case.name,
                case.expect.decision,
                case.expect
                    .rule
                    .as_deref()
                    .map(|r| format!(" by {r}"))
                    .unwrap_or_default(),
                e.decision,
                e.rule
                    .as_deref()
                    .map(|r| format!(" by {r}"))
                    .unwrap_or_default(),
            ));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use crate::client_addr::{cidr_ends, parse_cidr};

    #[test]
    fn a_blocks_ends_are_probed() {
        let ends = |b: &str| -> Vec<String> {
            parse_cidr(b)
                .map(cidr_ends)
                .into_iter()
                .flatten()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(ends("10.0.0.0/8"), ["10.0.0.0", "10.255.255.255"]);
        assert_eq!(ends("10.50.3.4/16"), ["10.50.0.0", "10.50.255.255"]);
        assert_eq!(ends("192.0.2.7"), ["192.0.2.7", "192.0.2.7"]);
        assert_eq!(ends("0.0.0.0/0"), ["0.0.0.0", "255.255.255.255"]);
        assert_eq!(
            ends("2001:db8::/32"),
            ["2001:db8::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"]
        );
        assert_eq!(ends("::1/128"), ["::1", "::1"]);
        assert!(ends("not an address").is_empty());
    }
}
