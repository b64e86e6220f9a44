//! The Pingora glue: one [`Gateway`] implementing `ProxyHttp`. Each phase
//! calls into a pipeline module and records what it decided in the
//! per-request [`Ctx`]:
//!
//! - `request_filter`: route → extract → validate → bind → classify →
//!   decide; a refusal is answered here and never reaches the upstream.
//! - `upstream_peer` / `upstream_request_filter`: proxy (path mapping, Host,
//!   header stripping, forwarded context).
//! - `response_filter`: request id on the answer.
//! - `fail_to_proxy`: upstream refused/timed out → 502/504 OperationOutcome.
//! - `logging`: record (audit line + metrics) on every path.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::ErrorType;
use tracing::Instrument;

use crate::audit::{hex, AuditLog, Event, Record};
use crate::authorise::Refusal;
use crate::check::rewrite_links;
use crate::check::{judge, judge_bundle_answer, judge_write_body, narrow_bundle, Verdict};
use crate::config::{ForwardedContext, Settings};
use crate::decide::{DecideOptions, EntryCheck, ResponseCheck, WriteCheck};
use crate::deny::Denial;
use crate::extract::{extract, has_access_token_param, ExtractError, Extracted};
use crate::fhir::classify::{self, ClassifyError, FhirRequest, HttpRequest, Interaction};
use crate::fhir::compartment::{references_other_patient, Bases};
use crate::fhir::entry_sieve::Sift;
use crate::metrics::Metrics;
use crate::pages::{EverythingPages, Origin};
use crate::policy::binding_holds;
use crate::proxy_headers;
use crate::route::{normalise, route, Route};
use crate::token::validator::{Validated, Validator};
use crate::token::TokenError;
use crate::upstream::{self, CheckedClient};

/// The operators' rules that `SIGHUP` reloads without a restart: swapped
/// whole, so a request sees either the old set or the new one.
#[derive(Debug, Clone)]
pub struct Rules {
    pub policies: crate::policy::PolicySet,
    pub roles: Option<crate::config::Roles>,
    pub break_glass: crate::config::BreakGlassConfig,
}

impl Rules {
    /// Whether a policy rule has a rate limit (which the shared state
    /// counts).
    pub fn any_rate_limit(&self) -> bool {
        self.policies.rules.iter().any(|r| r.rate_limit.is_some())
    }

    pub fn from_settings(s: &Settings) -> Rules {
        Rules {
            policies: s.policies.clone(),
            roles: s.roles.clone(),
            break_glass: s.break_glass.clone(),
        }
    }
}

/// Everything the request path needs, shared by all workers.
pub struct Gateway {
    pub settings: Settings,
    pub validator: Validator,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    realm: String,
    /// [`crate::config::Settings::upstream_bases`].
    upstream_bases: Vec<String>,
    context_header_names: Vec<String>,
    /// `X-Forwarded-Proto` and `X-Forwarded-Host`, fixed by the public base URL.
    forwarded_proto: http::HeaderValue,
    forwarded_host: Option<http::HeaderValue>,
    host_header: http::HeaderValue,
    /// Fetches answers that must be checked before they are passed on.
    checked: CheckedClient,
    /// Base URLs under which a reference may name the context patient.
    bases: Bases,
    decide_opts: DecideOptions,
    /// `scheme://host[:port]` of the public base: DPoP `htu` is checked
    /// against it and the request path.
    public_origin: String,
    /// Issues and checks `DPoP-Nonce`s, when required.
    dpop_nonces: Option<crate::dpop::Nonces>,
    /// DPoP proofs seen (and counted per client) and the rate limits'
    /// buckets: in Redis when configured (shared by the replicas), else here.
    pub shared: Arc<crate::shared::SharedState>,
    /// The upstream's addresses (a host name resolved off the workers).
    pub upstream_addrs: Arc<crate::resolve::Addresses>,
    /// Policies, roles and break-glass, reloadable.
    pub rules: Arc<arc_swap::ArcSwap<Rules>>,
    /// Draining after SIGTERM, and the requests in flight (`lifecycle.rs`).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// Bytes of request bodies all requests may hold together
    /// (`server.max_held_body_bytes`), one permit a byte.
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Whose `$everything` gave which page ids (`pages.rs`).
    everything_pages: EverythingPages,
}

impl Gateway {
    pub fn new(
        settings: Settings,
        validator: Validator,
        metrics: Arc<Metrics>,
        audit: AuditLog,
    ) -> Gateway {
        let realm = settings
            .public_base
            .as_str()
            .trim_end_matches('/')
            .to_string();
        let context_header_names = settings
            .forward_headers
            .iter()
            .map(|(_, n)| n.as_str().to_string())
            .collect();
        let b = &settings.public_base;
        let forwarded_proto = http::HeaderValue::from_str(b.scheme()).expect("URL scheme");
        let forwarded_host = b.host_str().and_then(|h| {
            let v = match b.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            };
            http::HeaderValue::from_str(&v).ok()
        });
        let host_header = http::HeaderValue::from_str(&settings.upstream.host_header)
            .expect("validated upstream host");
        // Request bodies and checked answers held, together.
        let body_budget = Arc::new(tokio::sync::Semaphore::new(
            settings
                .server
                .max_held_body_bytes
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let checked = CheckedClient::new(
            &settings.upstream,
            body_budget.clone(),
            settings.server.max_held_body_bytes,
        );
        let decide_opts = DecideOptions::from_settings(&settings);
        let upstream_bases = settings.upstream_bases();
        let bases = decide_opts.bases.clone();
        let public_origin = settings.public_base.origin().ascii_serialization();
        let rules = Arc::new(arc_swap::ArcSwap::from_pointee(Rules::from_settings(
            &settings,
        )));
        let dpop_nonces =
            settings
                .dpop
                .nonce_lifetime_seconds
                .map(|lifetime| match &settings.dpop.nonce_key {
                    Some(key) => crate::dpop::Nonces::with_key(&key.0, lifetime),
                    None => crate::dpop::Nonces::new(lifetime),
                });
        // A proof is good from iat - leeway to iat + max_age on the wall
        // clock; it is remembered beyond that window by a margin for clock
        // steps.
        let remembered = std::time::Duration::from_secs(
            (settings.dpop.policy.max_age_seconds + 2 * settings.dpop.policy.leeway_seconds + 5)
                as u64,
        );
        let upstream_addrs = Arc::new(crate::resolve::Addresses::new(
            settings.upstream.url.host_str().unwrap_or_default(),
            settings.upstream.url.port_or_known_default().unwrap_or(80),
            settings.upstream.resolved.clone(),
        ));
        let shared = Arc::new(crate::shared::SharedState::new(
            crate::shared::DpopLimits {
                remembered,
                max_entries: settings.dpop.replay_cache_max_entries,
                quota: settings.dpop.max_proofs_per_key,
                user_quota: settings.dpop.max_proofs_per_user,
            },
            settings.dpop.enabled,
            settings.redis.clone().map(|r| (r, metrics.redis())),
        ));
        shared.set_rate_limited(rules.load().any_rate_limit());
        Gateway {
            settings,
            validator,
            metrics,
            audit,
            realm,
            upstream_bases,
            context_header_names,
            forwarded_proto,
            forwarded_host,
            host_header,
            checked,
            bases,
            decide_opts,
            public_origin,
            dpop_nonces,
            shared,
            upstream_addrs,
            rules,
            body_budget,
            everything_pages: EverythingPages::default(),
            lifecycle: crate::lifecycle::Lifecycle::new(),
        }
    }
}

/// How the client presented its token, for stage 4.
#[derive(Clone, Copy)]
struct Presented<'a> {
    token: &'a str,
    dpop_scheme: bool,
    proofs: &'a [String],
    method: &'a str,
    /// The request path as the client sent it (with the public origin, the
    /// URL a DPoP `htu` must name).
    path: &'a str,
    /// base64url SHA-256 of the TLS client certificate, if one was sent.
    client_cert: Option<&'a str>,
}

/// Writes to prove against the upstream's current versions before they
/// are forwarded.
struct Proofs {
    write: Option<WriteCheck>,
    entry_writes: Vec<(usize, WriteCheck)>,
    /// The Bundle, for its entries.
    bundle: Bytes,
}

/// One write to prove: the path it lands on, what it stores (with its
/// Content-Type), and the client's `If-Match` values (none: empty).
struct Target<'a> {
    rel: &'a str,
    body: Option<(Option<&'a str>, &'a [u8])>,
    preconditions: &'a [&'a str],
}

/// Per-request state handed from phase to phase.
pub struct Ctx {
    started: Instant,
    time: SystemTime,
    request_id: String,
    /// `request_id` is the client's own `X-Request-Id`.
    request_id_from_client: bool,
    rel_path: Option<String>,
    fhir: Option<FhirRequest>,
    token: Option<Validated>,
    scopes_used: Vec<String>,
    /// What stage 8 must prove about the upstream's answer.
    check: Option<ResponseCheck>,
    /// Parameters added upstream to narrow a search to the patient and a
    /// scope's filter.
    narrow: Vec<(String, String)>,
    /// `If-Match` for a write proved against the version fetched first.
    if_match: Option<http::HeaderValue>,
    /// Bundle entries whose answers stage 8 must check.
    entry_checks: Vec<EntryCheck>,
    /// How the token was bound: `bearer` or `dpop`.
    binding: Option<&'static str>,
    /// The request named the `DPoP` scheme: its challenges are `DPoP`.
    dpop_scheme: bool,
    /// The policy rule that decided (`file#rule`), if one did.
    policy_rule: Option<String>,
    /// Break-glass-able policy rules this request passed, and why.
    broke_glass: Vec<String>,
    break_glass_reason: Option<String>,
    /// The rules the request was decided by (a reload meanwhile changes
    /// nothing for it: the break-glass header it was read from is the one
    /// kept from the upstream).
    rules: Option<Arc<Rules>>,
    denial: Option<Denial>,
    public: bool,
    upstream_status: Option<u16>,
    /// Names of the query parameters (for the audit record).
    query_names: Vec<String>,
    /// Writes the decision left to prove against the upstream.
    proofs: Option<Proofs>,
    /// SHA-256 of a token that failed validation (for the audit).
    refused_token_hash: Option<[u8; 32]>,
    /// Id of the request's audit record (its decision record adds `-d`).
    record_id: String,
    /// Time spent validating the token.
    validation: Option<std::time::Duration>,
    /// When the request went upstream, and how long the upstream took to
    /// answer.
    upstream_started: Option<Instant>,
    upstream_time: Option<std::time::Duration>,
    /// The upstream's addresses for this request, where it starts among
    /// them, and which connection attempt this is (a connection that
    /// cannot be made tries the next address).
    upstream_addrs: Option<(Arc<Vec<std::net::SocketAddr>>, usize)>,
    connect_attempt: usize,
    /// The request's method and path (capped as recorded), for a record
    /// written without the session.
    method: Option<http::Method>,
    path: String,
    /// The client (the peer, or behind a trusted proxy the address it
    /// forwarded for), resolved once.
    client: Option<crate::client_addr::Client>,
    /// Header names the client's `Connection` lists, read once: refused
    /// when they name a header the decision reads, removed upstream.
    connection: Vec<String>,
    /// The request body, once fhirwall has read it (to classify the
    /// request or prove a write).
    body: Option<Bytes>,
    /// A batch/transaction answer as it passes (up to
    /// `upstream.max_checked_answer_bytes`), read for its entries'
    /// statuses at its end; `None` when not collected or too large.
    answer_buf: Option<Vec<Bytes>>,
    /// `answer_buf`'s share of `Gateway::body_budget`.
    answer_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Each Bundle entry's answered status, once read (for the record).
    entry_statuses: Vec<Option<u16>>,
    /// The entries whose answer fhirwall withheld (checked Bundles).
    entry_withheld: Vec<bool>,
    /// Included resources left out of a checked search's answer (outside
    /// the grant).
    left_out: usize,
    /// The patients the request names (`decide::patients_named`).
    patients: Vec<String>,
    /// Entries of a checked search's answer let go unjudged, each larger
    /// than `upstream.max_checked_answer_bytes` by itself.
    too_large_entries: usize,
    /// A checked search's answer ends with a warning that it is short
    /// (`check::with_left_out_warning`).
    warned_short: bool,
    /// A write under `patient/` scopes: the details of a failure answer
    /// that may name other patients' resources are withheld
    /// ([`withheld_error`]).
    withhold_error_detail: bool,
    /// The body that replaces the upstream's, once it is withheld.
    replaced_body: Option<Bytes>,
    /// Write entries of a Bundle under `patient/` scopes: a failed one's
    /// outcome is withheld (the answer is then fetched and judged).
    withheld_entries: Vec<usize>,
    /// The status of the answer whose header went to the client, once one
    /// did (for the record of a request dropped before it finished).
    answered: Option<u16>,
    /// `body` differs from what the client sent (a Bundle whose proved
    /// entries carry `ifMatch`): fhirwall sends it upstream itself.
    body_rewritten: bool,
    /// Its share of `Gateway::body_budget`, returned when the request ends.
    body_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Set once the request record is written; until then, dropping the
    /// context (a task Pingora abandoned at shutdown, a panic) writes a
    /// record of what is known, and counts the request.
    audit: Option<(AuditLog, Arc<Metrics>)>,
    /// Counts the request as in flight; dropped after `audit` has done its
    /// work, so a shutdown that waits for no request in flight waits for
    /// its record to be queued too.
    _in_flight: crate::lifecycle::InFlight,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let Some((audit, metrics)) = self.audit.take() else {
            return;
        };
        let interaction = self.fhir.as_ref().map(|f| f.interaction);
        let seconds = self.started.elapsed().as_secs_f64();
        metrics.request("error", interaction, "abandoned", seconds);
        let record = Record {
            decision: "error",
            reason: "abandoned",
            stage: "proxy",
            // The status whose header the client got, or 0 for none (as
            // the documentation says of status 0).
            status: Some(self.answered.unwrap_or(0)),
            detail: Some(match self.answered {
                None => "the request ended without finishing (shutdown or internal error)".into(),
                Some(s) => format!(
                    "the request ended without finishing (shutdown or internal error) after \
                     the header of its {s} answer was sent: the client got part of the answer \
                     at most"
                ),
            }),
            ..self.record(Event::Request)
        };
        metrics.resource(record.resource_type, "error");
        audit.record_now(&record);
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An HTTP/1.1 request that waits for `100 Continue` before its body.
fn expects_continue(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A `Cache-Control` value that lets a shared cache keep an answer to a
/// request with credentials (RFC 9111 §3.5: `public`, `s-maxage`,
/// `must-revalidate`).
fn shared_cacheable(value: &[u8]) -> bool {
    directives(value).any(|(name, _)| {
        [&b"public"[..], b"s-maxage", b"must-revalidate"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    })
}

/// Whether an answer says how long it may be kept, or that it may not be
/// (`Expires`, or a `Cache-Control` with `max-age`, `s-maxage`, `no-store`
/// or `no-cache`): a cache keeps one that says neither on heuristics.
fn caching_explicit(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::EXPIRES)
        || headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            directives(v.as_bytes()).any(|(name, _)| {
                [&b"max-age"[..], b"s-maxage", b"no-store", b"no-cache"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n))
            })
        })
}

/// A `Cache-Control` value's directives: (name, the whole directive).
fn directives(value: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    value.split(|b| *b == b',').filter_map(|d| {
        let d = d.trim_ascii();
        let name = d.split(|b| *b == b'=').next().unwrap_or(d).trim_ascii();
        (!d.is_empty()).then_some((name, d))
    })
}

/// The upstream's `Cache-Control` values made `private`: `public` and
/// `s-maxage` (what only shared caches read) dropped, every other
/// directive kept (`no-store`, `no-cache`, `max-age`, `must-revalidate`:
/// what the upstream asked of any cache still holds).
fn private_cache_control<'a>(values: impl Iterator<Item = &'a [u8]>) -> String {
    let mut out = vec!["private".to_string()];
    for v in values {
        for (name, d) in directives(v) {
            let dropped = [&b"public"[..], b"s-maxage", b"private"]
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n));
            if !dropped {
                out.push(String::from_utf8_lossy(d).into_owned());
            }
        }
    }
    out.join(", ")
}

/// What caused a Pingora error, for the log: the innermost cause's text
/// (an I/O or TLS or parse error), never an error's context, which may
/// hold bytes read from the wire; a Pingora error at the root gives its
/// type only.
fn error_cause(e: &pingora::Error) -> String {
    let root = e.root_cause();
    match root.downcast_ref::<pingora::Error>() {
        Some(inner) => inner.etype().as_str().to_string(),
        None => crate::audit::capped(&root.to_string(), 300).to_string(),
    }
}

/// The final response sent to the client, if any (not a `100 Continue`).
fn final_response(session: &Session) -> Option<&ResponseHeader> {
    session
        .response_written()
        .filter(|r| !r.status.is_informational())
}

/// The answer when stage 8's check of an upstream answer about `fhir`'s
/// resource failed (`what` names that answer in the message).
/// Why a request is refused when its record cannot be written.
fn audit_denial(r: crate::audit::Refusal) -> Denial {
    Denial::Unavailable {
        code: "audit_unavailable",
        description: r.describe().into(),
        retry_after_seconds: 1,
    }
}

/// An upstream that switched protocols unasked (fhirwall never forwards
/// `Upgrade`): a failure, never passed on.
fn switched_protocols() -> Denial {
    Denial::Upstream {
        status: 502,
        code: "upstream_error",
        description: "upstream switched protocols unasked".into(),
    }
}

/// Cache directives addressed to CDNs, which take them over
/// `Cache-Control`.
const CDN_CACHE_HEADERS: &[&str] = &[
    "cdn-cache-control",
    "cloudflare-cdn-cache-control",
    "surrogate-control",
    "edge-control",
];

/// Drops what an upstream's answer says that is not the client's: its
/// hop-by-hop headers (and those its `Connection` lists), its cookies, and
/// its product and version (HAPI names both on every answer).
fn drop_upstream_private(h: &mut ResponseHeader) {
    let hop_by_hop = crate::proxy_headers::response_hop_by_hop(
        h.headers
            .get_all(header::CONNECTION)
            .iter()
            .map(|v| v.as_bytes()),
    );
    for name in hop_by_hop {
        h.remove_header(&name);
    }
    h.remove_header(&header::SET_COOKIE);
    h.remove_header("x-powered-by");
    h.remove_header(&header::SERVER);
}

/// The answer to a resource asked for by id whose stored form is too large
/// to check: it could be anyone's, so it is answered 404 as another
/// patient's would be (a 502 would tell that it exists, and is large).
fn hidden_too_large(fhir: &FhirRequest) -> Denial {
    let hide = Verdict::Hide {
        why: "upstream_answer_too_large",
    };
    check_denial(hide, fhir, "")
}

fn check_denial(verdict: Verdict, fhir: &FhirRequest, what: &str) -> Denial {
    match verdict {
        Verdict::Hide { why } => Denial::Hidden {
            resource: format!(
                "{}/{}",
                fhir.resource_type.as_deref().unwrap_or(""),
                fhir.id.as_deref().unwrap_or("")
            ),
            why,
        },
        Verdict::Refuse { why } => Denial::InsufficientScope {
            description: why,
            scope: None,
        },
        Verdict::PolicyRefuse { rule, why } => Denial::PolicyDenied {
            description: format!("refused by policy rule {rule}: {why}"),
            rule,
        },
        Verdict::Unverifiable { why } => Denial::Upstream {
            status: 502,
            code: "upstream_answer_unchecked",
            description: format!("{what} could not be checked: {why}"),
        },
        // Not a failure: callers take a pass first. Were one to get here,
        // the request still fails closed.
        Verdict::Pass | Verdict::Trim { .. } => Denial::Upstream {
            status: 502,
            code: "upstream_answer_unchecked",
            description: format!("{what} could not be checked"),
        },
    }
}

/// The OperationOutcome that replaces the upstream's answer to a write
/// under `patient/` scopes that failed with 409, 412 or 5xx: its details
/// may name other patients' resources (HAPI's 409 to a DELETE names the
/// first resource referencing the deleted one, whoever's it is). The
/// status goes on; 400 and 422 (the written body's own faults) keep their
/// details.
fn withheld_error(ctx: &Ctx, status: u16) -> Option<Bytes> {
    if !ctx.withhold_error_detail {
        return None;
    }
    crate::check::withheld_write_outcome(status).map(|o| Bytes::from(o.to_string()))
}

/// An answer's header for a body of `len` bytes fhirwall writes instead.
fn replace_body_headers(h: &mut ResponseHeader, len: usize) -> Result<()> {
    for name in [
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::ETAG,
        header::LAST_MODIFIED,
        header::LOCATION,
        header::CONTENT_LOCATION,
    ] {
        h.remove_header(&name);
    }
    h.insert_header(header::CONTENT_TYPE, "application/fhir+json")?;
    h.insert_header(header::CONTENT_LENGTH, len.to_string())?;
    Ok(())
}

/// How many referenced resources one request's writes may make fhirwall
/// look up (under `patient/` scopes).
const MAX_PROVED_REFERENCES: usize = 32;

/// A failed DPoP binding (with no nonce to hand out).
fn dpop_denial(code: &'static str, error: &'static str, description: String) -> Denial {
    Denial::InvalidDpop {
        code,
        error,
        description,
        nonce: None,
    }
}

fn token_denial(e: &TokenError, retry_after: u64) -> Denial {
    match e {
        TokenError::IntrospectionThrottled(wait) => Denial::RateLimited {
            code: e.code(),
            description: e.to_string(),
            retry_after_seconds: *wait,
        },
        TokenError::KeysUnavailable(_)
        | TokenError::IntrospectionUnavailable(_)
        | TokenError::IntrospectionBusy { .. } => Denial::Unavailable {
            code: e.code(),
            description: e.to_string(),
            retry_after_seconds: retry_after,
        },
        _ => Denial::InvalidToken {
            code: e.code(),
            description: e.to_string(),
        },
    }
}

fn extract_denial(e: &ExtractError) -> Denial {
    match e {
        ExtractError::UnsupportedScheme(_)
        | ExtractError::MalformedToken
        | ExtractError::DpopNotEnabled => Denial::InvalidToken {
            code: "credentials_refused",
            description: e.to_string(),
        },
        _ => Denial::InvalidRequest {
            code: "credentials_refused",
            description: e.to_string(),
        },
    }
}

/// Whether a request says it carries a body (a non-zero Content-Length,
/// or any Transfer-Encoding).
fn declares_body(headers: &http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

/// The denial for a refused request to public route `rel` (`explain`
/// gives its description too).
pub(crate) fn public_denial(r: &crate::route::PublicRefusal, rel: &str) -> Denial {
    use crate::route::PublicRefusal;
    match r {
        PublicRefusal::Method => Denial::MethodNotAllowed {
            description: format!("public route '{rel}' only answers GET"),
        },
        PublicRefusal::Query(e) => classify_denial(e),
        PublicRefusal::TokenInQuery => extract_denial(&ExtractError::TokenInQuery),
        PublicRefusal::Body => Denial::BadFhirRequest {
            code: "fhir_malformed",
            description: format!("public route '{rel}' takes no request body"),
        },
        PublicRefusal::Reaching(name) => Denial::BadFhirRequest {
            code: "fhir_malformed",
            description: format!(
                "parameter {name} is refused on public route '{rel}': it reaches resources \
                 beyond the route, which need a token"
            ),
        },
    }
}

fn classify_denial(e: &ClassifyError) -> Denial {
    match e {
        ClassifyError::MethodNotAllowed { .. } => Denial::MethodNotAllowed {
            description: e.to_string(),
        },
        ClassifyError::UnreadableMediaType { .. } => Denial::UnsupportedMediaType {
            description: format!(
                "{e}: send it as application/fhir+json, unencoded (a server that does not \
                 resolve conditional references, such as HAPI with \
                 allowInlineMatchUrlReferences off, can be declared with \
                 upstream.resolves_conditional_references: false)"
            ),
        },
        _ => Denial::BadFhirRequest {
            code: "fhir_malformed",
            description: e.to_string(),
        },
    }
}

impl Gateway {
    /// Answers `denial` as the complete response and keeps it for the
    /// request's record.
    async fn refuse(&self, session: &mut Session, ctx: &mut Ctx, denial: Denial) -> Result<()> {
        let r = self.answer(session, ctx, &denial).await;
        // A rule that refused an answer (a stored page's) is the record's.
        if let Denial::PolicyDenied { rule, .. } = &denial {
            ctx.policy_rule = Some(rule.clone());
        }
        ctx.denial = Some(denial);
        r
    }

    /// The upstream's base URLs as its answers may spell them, without a
    /// trailing `/` (links under them are moved to the public base):
    /// [`crate::config::Settings::upstream_bases`].
    fn upstream_bases(&self) -> &[String] {
        &self.upstream_bases
    }

    /// `u` (absolute, or path-absolute as a `Location` may be) moved from
    /// the upstream's base to the public one, if it is under the former.
    fn moved_url(&self, u: &str) -> Option<String> {
        crate::check::rewrite_url(u, self.upstream_bases(), &self.realm).or_else(|| {
            crate::check::rewrite_path(
                u,
                &self.settings.upstream.base_path,
                &self.settings.public_base_path,
            )
        })
    }

    /// Moves the targets of an answer's `Link` headers (RFC 8288,
    /// `<url>; rel=…`, also on a 103) from the upstream's base to the
    /// public one.
    fn move_links(&self, h: &mut ResponseHeader) -> Result<()> {
        let values: Vec<String> = h
            .headers
            .get_all(header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let moved: Vec<String> = values
            .iter()
            .map(|v| crate::check::rewrite_link_targets(v, |u| self.moved_url(u)))
            .collect();
        if moved != values {
            h.remove_header(&header::LINK);
            for v in moved {
                h.append_header(header::LINK, v)?;
            }
        }
        Ok(())
    }

    /// Marks an upstream answer passed on to the client: the request id
    /// and, for a DPoP-bound request, a nonce for its next proof. The
    /// upstream's cookies stay behind (a client's never reach it), and a
    /// `Location` or `Content-Location` under the upstream's base (a
    /// create's new resource) is moved to the public base.
    fn stamp(&self, h: &mut ResponseHeader, ctx: &mut Ctx) -> Result<()> {
        ctx.answered = Some(h.status.as_u16());
        drop_upstream_private(h);
        // The upstream's own challenge (its realm and scheme, e.g. Basic)
        // is not the client's to answer: the client authenticates to
        // fhirwall. A 401 keeps a challenge (RFC 9110 §11.6.1), fhirwall's.
        if h.headers.contains_key(header::WWW_AUTHENTICATE) {
            h.remove_header(&header::WWW_AUTHENTICATE);
        }
        if h.status == http::StatusCode::UNAUTHORIZED {
            let scheme = if ctx.binding.is_some_and(|b| binding_holds(b, "dpop")) {
                "DPoP"
            } else {
                "Bearer"
            };
            h.insert_header(
                header::WWW_AUTHENTICATE,
                format!(
                    "{scheme} realm=\"{}\", error=\"invalid_token\", error_description=\"the \
                     upstream FHIR server refused the request as unauthenticated\"",
                    self.realm
                ),
            )?;
        }
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let moved = h
                .headers
                .get(&name)
                .and_then(|v| self.moved_url(v.to_str().ok()?));
            if let Some(public) = moved {
                h.insert_header(name, public)?;
            }
        }
        self.move_links(h)?;
        // An answer given for a token is that caller's: a cache shared by
        // several clients (a CDN, a corporate proxy before fhirwall) may
        // not keep it for the next, whatever the upstream allowed.
        if !ctx.public
            && h.headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .any(|v| shared_cacheable(v.as_bytes()))
        {
            let kept = private_cache_control(
                h.headers
                    .get_all(header::CACHE_CONTROL)
                    .iter()
                    .map(|v| v.as_bytes()),
            );
            h.insert_header(header::CACHE_CONTROL, kept)?;
        }
        // Nor may a CDN keep it by the headers addressed to it, which it
        // reads instead of Cache-Control (RFC 9213, Surrogate-Control,
        // Akamai's Edge-Control).
        if !ctx.public {
            for name in CDN_CACHE_HEADERS {
                h.remove_header(*name);
            }
        }
        // Without a lifetime or a ban from the upstream, a browser may keep
        // the answer on heuristics (its Last-Modified) and give it,
        // unasked, to the next user of the same browser on a shared
        // workstation. An answer given for a token without one is not to
        // be stored.
        if !ctx.public && !caching_explicit(&h.headers) {
            let mut value: Vec<String> = h
                .headers
                .get_all(header::CACHE_CONTROL)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            value.push("no-store".into());
            h.insert_header(header::CACHE_CONTROL, value.join(", "))?;
        }
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(n) = &self.dpop_nonces {
            if ctx.binding.is_some_and(|b| binding_holds(b, "dpop")) {
                h.insert_header("dpop-nonce", n.current(now_unix()))?;
            }
        }
        Ok(())
    }

    /// Writes a denial as the complete response.
    async fn answer(&self, session: &mut Session, ctx: &mut Ctx, denial: &Denial) -> Result<()> {
        let a = denial.answer_to(&self.realm, self.dpop_algs(), ctx.dpop_scheme);
        let mut h = ResponseHeader::build(a.status, Some(6))?;
        h.insert_header(header::CONTENT_TYPE, "application/fhir+json")?;
        h.insert_header(header::CONTENT_LENGTH, a.body.len().to_string())?;
        h.insert_header(header::CACHE_CONTROL, "no-store")?;
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        if let Some(w) = &a.www_authenticate {
            h.insert_header(header::WWW_AUTHENTICATE, w.as_str())?;
        }
        if let Some(r) = a.retry_after {
            h.insert_header(header::RETRY_AFTER, r.to_string())?;
        }
        if let Some(n) = &a.dpop_nonce {
            h.insert_header("dpop-nonce", n.as_str())?;
        }
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), head).await?;
        ctx.answered = Some(a.status);
        if !head {
            session
                .write_response_body(Some(Bytes::from(a.body)), true)
                .await?;
        }
        Ok(())
    }

    /// Reads the whole request body (bounded) so it can be classified, and
    /// keeps it in `ctx.body`: forwarded unchanged, from Pingora's retry
    /// buffer when it fits there, else by fhirwall itself (see
    /// [`Gateway::relayed`]).
    async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Bytes, Denial> {
        // Read before (to classify it, now to prove it): the same bytes.
        if let Some(body) = &ctx.body {
            return Ok(body.clone());
        }
        let limit = self.settings.server.max_classified_body_bytes;
        let too_large = || Denial::TooLarge {
            description: format!(
                "request body is larger than the {limit} bytes fhirwall reads to classify it"
            ),
        };
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|l| l > limit) {
            return Err(too_large());
        }
        // A client that asked to be told to go on (`Expect: 100-continue`)
        // is told so now that its token is checked; else it would wait
        // for its own timeout before sending the body.
        if expects_continue(session.req_header()) {
            // Straight to the connection (response modules are for the
            // final answer), once (a body read twice is told once). Pingora
            // would mark the connection to close for a header written before
            // the body is read: not for this one, which asks for the body.
            let client = &mut session.downstream_session;
            client.set_close_on_response_before_downstream_finish(false);
            let written = client.write_continue_response().await;
            client.set_close_on_response_before_downstream_finish(true);
            if let Err(e) = written {
                return Err(Denial::InvalidRequest {
                    code: "fhir_malformed",
                    description: format!(
                        "could not answer Expect: 100-continue: {}",
                        e.etype().as_str()
                    ),
                });
            }
        }
        session.enable_retry_buffering();
        let mut body = BytesMut::new();
        let server = &self.settings.server;
        let deadline =
            Instant::now() + std::time::Duration::from_millis(server.body_read_timeout_ms);
        loop {
            let read = tokio::time::timeout_at(deadline.into(), session.read_request_body());
            match read.await {
                Ok(Ok(Some(chunk))) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    // Held bytes count against the budget of all requests.
                    if !self.hold(&mut ctx.body_permit, chunk.len()) {
                        return Err(Denial::Unavailable {
                            code: "body_budget_exhausted",
                            description: format!(
                                "fhirwall holds as many request-body bytes as it may \
                                 (server.max_held_body_bytes: {}); try again",
                                server.max_held_body_bytes
                            ),
                            retry_after_seconds: 1,
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    return Err(Denial::InvalidRequest {
                        code: "fhir_malformed",
                        description: format!(
                            "could not read the request body: {}",
                            e.etype().as_str()
                        ),
                    })
                }
                Err(_) => {
                    return Err(Denial::RequestTimeout {
                        description: format!(
                            "the request body did not arrive whole within {} ms \
                             (server.body_read_timeout_ms)",
                            server.body_read_timeout_ms
                        ),
                    })
                }
            }
        }
        let body = body.freeze();
        ctx.body = Some(body.clone());
        Ok(body)
    }

    /// Adds `bytes` to the share of `Gateway::body_budget` held in `slot`;
    /// false when the budget has no room for them.
    fn hold(&self, slot: &mut Option<tokio::sync::OwnedSemaphorePermit>, bytes: usize) -> bool {
        upstream::hold(&self.body_budget, slot, bytes)
    }

    /// Starts keeping a batch/transaction's answer as it passes, to read
    /// its entries' statuses for the record, if it is a 2xx, not encoded.
    fn start_collecting(&self, ctx: &mut Ctx, status: u16, headers: &http::HeaderMap) {
        let bundle = ctx.fhir.as_ref().is_some_and(|f| !f.entries.is_empty());
        let identity = headers
            .get(header::CONTENT_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
        ctx.answer_buf = (bundle && identity && (200..300).contains(&status)).then(Vec::new);
        ctx.answer_permit = None;
    }

    /// Keeps a piece of a collected answer; at its end, reads the entries'
    /// statuses. What is kept counts against `server.max_held_body_bytes`
    /// with the bodies fhirwall holds, and may take only its first half
    /// (request bodies keep the rest); an answer larger than
    /// `upstream.max_checked_answer_bytes`, or beyond that, is let go (its
    /// entries' statuses stay unknown; the answer passes on as ever).
    fn collect_answer(&self, ctx: &mut Ctx, piece: Option<&Bytes>, end: bool) {
        let Some(buf) = ctx.answer_buf.as_mut() else {
            return;
        };
        if let Some(p) = piece.filter(|p| !p.is_empty()) {
            let reserve = self.settings.server.max_held_body_bytes / 2;
            let held: usize = buf.iter().map(Bytes::len).sum();
            // Taken first, then checked: what is left must stay at least
            // half the budget.
            let kept = held + p.len() <= self.settings.upstream.max_checked_answer_bytes
                && self.hold(&mut ctx.answer_permit, p.len())
                && self.body_budget.available_permits() >= reserve;
            if !kept {
                ctx.answer_buf = None;
                ctx.answer_permit = None;
                return;
            }
            // The piece itself, not a copy: memory as counted.
            buf.push(p.clone());
        }
        if end {
            if let Some(buf) = ctx.answer_buf.take() {
                let entries = ctx.fhir.as_ref().map_or(0, |f| f.entries.len());
                ctx.entry_statuses =
                    crate::check::entry_statuses(crate::check::Pieces::new(buf), entries)
                        .unwrap_or_default();
            }
            ctx.answer_permit = None;
        }
    }

    /// Whether fhirwall sends the request upstream itself: the body it
    /// read is larger than Pingora's retry buffer, which then holds none of
    /// it to forward (or fhirwall rewrote it).
    fn relayed(session: &Session, ctx: &Ctx) -> bool {
        ctx.body.is_some() && (session.retry_buffer_truncated() || ctx.body_rewritten)
    }

    /// The proxy's header policy for a request going upstream, as a plan
    /// both upstream paths apply: client headers to remove (hop-by-hop,
    /// spoofable, fhirwall's own and `Authorization` unless forwarded), and
    /// the headers fhirwall sets (forwarding context, request id, verified
    /// context). `Host` is each path's business. `body_in_hand`: fhirwall
    /// has the whole body and sends it at once, so `Expect` goes too (the
    /// client was told to go on already; the upstream is not asked again).
    fn header_plan(
        &self,
        headers: &http::HeaderMap,
        ctx: &Ctx,
        body_in_hand: bool,
    ) -> (
        Vec<http::HeaderName>,
        Vec<(http::HeaderName, http::HeaderValue)>,
    ) {
        let conn = &ctx.connection;
        let rules = match &ctx.rules {
            Some(r) => r.clone(),
            None => self.rules.load_full(),
        };
        let bg_header = rules.break_glass.header.as_str();
        let mut remove: Vec<http::HeaderName> = headers
            .keys()
            .filter(|n| {
                proxy_headers::strip(n.as_str(), conn, &self.context_header_names)
                    // The break-glass header, whatever its name (reloadable).
                    || proxy_headers::same(n.as_str(), bg_header)
            })
            .cloned()
            .collect();
        // On a public route credentials were never looked at: an upstream
        // must not act on them as if fhirwall had checked them.
        if !self.settings.upstream.forward_authorization || ctx.public {
            remove.push(header::AUTHORIZATION);
            // A DPoP proof is checked here and of no use without its token.
            if headers.contains_key("dpop") {
                remove.push(http::HeaderName::from_static("dpop"));
            }
        }
        if body_in_hand && headers.contains_key(header::EXPECT) {
            remove.push(header::EXPECT);
        }
        let mut set = Vec::with_capacity(8);
        // A search whose answer is checked is handled strictly: a lenient
        // server would drop a parameter it does not support, the
        // narrowing too, and count every patient's matches in its total.
        let searched = |c: &ResponseCheck| matches!(c, ResponseCheck::Search { .. });
        if ctx.check.as_ref().is_some_and(searched)
            || ctx.entry_checks.iter().any(|e| searched(&e.check))
        {
            let name = http::HeaderName::from_static("prefer");
            let prefer =
                proxy_headers::strict_handling(headers.get_all(&name).iter().map(|v| v.as_bytes()));
            let value = http::HeaderValue::from_str(&prefer)
                .unwrap_or(http::HeaderValue::from_static("handling=strict"));
            set.push((name, value));
        }
        // The client and the trusted proxies it came through, then the
        // peer; never what the client itself claimed.
        if let Some(c) = &ctx.client {
            let chain = crate::client_addr::forwarded_for(&c.chain);
            if let Ok(v) = http::HeaderValue::from_str(&chain) {
                set.push((http::HeaderName::from_static("x-forwarded-for"), v));
            }
        }
        set.push((
            http::HeaderName::from_static("x-forwarded-proto"),
            self.forwarded_proto.clone(),
        ));
        if let Some(host) = &self.forwarded_host {
            set.push((
                http::HeaderName::from_static("x-forwarded-host"),
                host.clone(),
            ));
        }
        // fhirwall's own id, never the client's: servers keep it as the
        // request's identity (HAPI records it in a write's meta.source), and
        // a client could repeat another request's. It is the audit record's
        // `id` (and `request_id`, unless the client chose that).
        if let Ok(v) = http::HeaderValue::from_str(&ctx.record_id) {
            set.push((http::HeaderName::from_static("x-request-id"), v));
        }
        // The client's own id, for tracing across, marked as the client's.
        if ctx.request_id_from_client {
            if let Ok(v) = http::HeaderValue::from_str(&ctx.request_id) {
                set.push((http::HeaderName::from_static("x-client-request-id"), v));
            }
        }
        if let Some(t) = &ctx.token {
            let c = &t.claims;
            for (what, name) in &self.settings.forward_headers {
                let value = match what {
                    ForwardedContext::Sub => c.sub.clone(),
                    ForwardedContext::ClientId => c.client_id.clone(),
                    ForwardedContext::Patient => c.patient.clone(),
                    ForwardedContext::FhirUser => c.fhir_user.clone(),
                    ForwardedContext::Scope => Some(ctx.scopes_used.join(" ")),
                    ForwardedContext::Issuer => Some(c.iss.clone()),
                    // Checked when the token was validated.
                    ForwardedContext::Claim(name) => crate::token::claim_header_value(&c.raw, name)
                        .ok()
                        .flatten(),
                };
                if let Some(v) = value.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
                    set.push((name.clone(), v));
                }
            }
        }
        (remove, set)
    }

    /// The client's headers with the proxy's header plan applied, for a
    /// request fhirwall sends upstream itself.
    fn checked_headers(&self, session: &Session, ctx: &Ctx) -> http::HeaderMap {
        let req = session.req_header();
        let mut headers = req.headers.clone();
        let (remove, set) = self.header_plan(&req.headers, ctx, true);
        for name in remove {
            headers.remove(&name);
        }
        for (name, value) in set {
            headers.insert(name, value);
        }
        headers
    }

    /// Stage 7 for a request whose body fhirwall read and which is larger
    /// than Pingora's retry buffer (which then holds none of it to
    /// forward): fhirwall sends it upstream itself, with the same path,
    /// header plan and (for a proved write) `If-Match` as the proxy path,
    /// and streams the answer back as it comes.
    async fn relay_exchange(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let req = session.req_header();
        let mut headers = self.checked_headers(session, ctx);
        if let Some(v) = &ctx.if_match {
            headers.insert(header::IF_MATCH, v.clone());
        }
        let method = req.method.clone();
        let query = req.uri.query().map(str::to_string);
        let rel = ctx.rel_path.clone().unwrap_or_default();
        let sent = Instant::now();
        ctx.upstream_started = Some(sent);
        let answer = self
            .checked
            .send(
                method,
                &rel,
                query.as_deref(),
                headers,
                ctx.body.clone(),
                false,
            )
            .await;
        ctx.upstream_time = Some(sent.elapsed());
        let mut answer = match answer {
            Ok(a) => a,
            Err(denial) => return self.refuse(session, ctx, denial).await,
        };
        ctx.upstream_status = Some(answer.status().as_u16());
        if answer.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return self.refuse(session, ctx, switched_protocols()).await;
        }
        let mut h = ResponseHeader::build(answer.status(), Some(answer.headers().len() + 3))?;
        for (name, value) in answer.headers() {
            if upstream::passes_on(name) || name == header::CONTENT_ENCODING {
                h.append_header(name.clone(), value.clone())?;
            }
        }
        match answer.content_length() {
            Some(len) => h.insert_header(header::CONTENT_LENGTH, len.to_string())?,
            None => h.insert_header(header::TRANSFER_ENCODING, "chunked")?,
        }
        self.start_collecting(ctx, answer.status().as_u16(), answer.headers());
        if let Some(outcome) = withheld_error(ctx, answer.status().as_u16()) {
            replace_body_headers(&mut h, outcome.len())?;
            self.stamp(&mut h, ctx)?;
            session.write_response_header(Box::new(h), false).await?;
            session.write_response_body(Some(outcome), true).await?;
            return Ok(());
        }
        self.stamp(&mut h, ctx)?;
        session.write_response_header(Box::new(h), false).await?;
        loop {
            match self.checked.next_chunk(&mut answer).await {
                Ok(Some(chunk)) => {
                    self.collect_answer(ctx, Some(&chunk), false);
                    session.write_response_body(Some(chunk), false).await?
                }
                Ok(None) => {
                    self.collect_answer(ctx, None, true);
                    break;
                }
                // The status is out: the client sees the connection end.
                // The record says why (a timeout is no other error).
                Err(e) => {
                    let description = e.description();
                    ctx.denial = Some(e);
                    return Err(pingora::Error::explain(
                        ErrorType::ReadError,
                        format!("upstream failed while answering a relayed request: {description}"),
                    ));
                }
            }
        }
        session.write_response_body(None, true).await?;
        Ok(())
    }

    /// Stages 7-8 for a request whose answer must be checked: fetch it
    /// whole, judge it, then pass it on or answer the denial instead.
    async fn checked_exchange(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let req = session.req_header();
        let headers = self.checked_headers(session, ctx);
        // HEAD is answered from a GET: the check needs the body.
        let head = req.method == http::Method::HEAD;
        let method = if head {
            http::Method::GET
        } else {
            req.method.clone()
        };
        // The narrowing goes first: a server that reads only so many
        // parameters reads it whatever follows.
        let query = match (ctx.narrow.as_slice(), req.uri.query()) {
            ([], q) => q.map(str::to_string),
            (narrow, q) => {
                let mut s = url::form_urlencoded::Serializer::new(String::new());
                for (name, value) in narrow {
                    s.append_pair(name, value);
                }
                let mut s = s.finish();
                if let Some(q) = q.filter(|q| !q.is_empty()) {
                    s.push('&');
                    s.push_str(q);
                }
                Some(s)
            }
        };
        let rel = ctx.rel_path.clone().unwrap_or_default();
        // A body read to classify the request (POST _search, a Bundle) goes
        // along; a Bundle's checked entries narrowed.
        let mut body = ctx.body.clone();
        if !ctx.entry_checks.is_empty() {
            let narrowed = body
                .as_deref()
                .and_then(|b| narrow_bundle(b, &ctx.entry_checks));
            let Some(narrowed) = narrowed else {
                let denial = Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: "the Bundle's entries could not be narrowed".into(),
                };
                return self.refuse(session, ctx, denial).await;
            };
            body = Some(Bytes::from(narrowed));
        }
        let sent = Instant::now();
        // An answer too large to hold whole is read entry by entry: a
        // search's includes outside the grant let go as they come, a
        // Bundle's entries its checks do not pass replaced as they come.
        // Whether it is too large then depends only on what the caller may
        // see.
        let bases = &self.bases;
        let bundle = !ctx.entry_checks.is_empty() || !ctx.withheld_entries.is_empty();
        let search_keep = |_: usize, e: Option<&[u8]>| match &ctx.check {
            Some(check) => crate::check::search_entry_sift(check, e, bases),
            None => Sift::Drop,
        };
        let (entry_checks, fhir_req) = (&ctx.entry_checks, ctx.fhir.as_ref());
        // The entries replaced as they came, with what the upstream
        // answered them (for the record).
        let replaced = std::sync::Mutex::new(Vec::<(usize, Option<u16>)>::new());
        let bundle_keep = |i: usize, e: Option<&[u8]>| {
            let Some(f) = fhir_req else {
                return Sift::Fail;
            };
            let sift = crate::check::bundle_entry_sift(entry_checks, f, i, e, bases);
            if matches!(sift, Sift::Replace(_)) {
                let status = e.and_then(crate::check::response_status);
                replaced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i, status));
            }
            sift
        };
        let keep: Option<crate::upstream::EntryKeep> = if bundle {
            Some(&bundle_keep)
        } else if matches!(ctx.check, Some(ResponseCheck::Search { .. })) {
            Some(&search_keep)
        } else {
            None
        };
        let fetched = self
            .checked
            .fetch(method, &rel, query.as_deref(), headers, body, keep)
            .await;
        let replaced = replaced.into_inner().unwrap_or_else(|p| p.into_inner());
        // Entries replaced as they came are final: judged again, a refusal
        // would read as the upstream's own answer.
        let still_judged: Vec<EntryCheck> = ctx
            .entry_checks
            .iter()
            .filter(|c| !replaced.iter().any(|(i, _)| *i == c.index))
            .cloned()
            .collect();
        ctx.upstream_time = Some(sent.elapsed());
        let answer = match fetched {
            Ok(a) => a,
            Err(denial) => {
                // A resource asked for by id, too large to check.
                let hidden = match (&ctx.fhir, &ctx.check) {
                    (Some(f), Some(ResponseCheck::Resource { .. }))
                        if ctx.entry_checks.is_empty()
                            && denial.code() == "upstream_answer_too_large" =>
                    {
                        Some(hidden_too_large(f))
                    }
                    _ => None,
                };
                return self.refuse(session, ctx, hidden.unwrap_or(denial)).await;
            }
        };
        ctx.upstream_status = Some(answer.status);
        ctx.left_out = answer.left_out;
        ctx.too_large_entries = answer.too_large;
        let Some(fhir) = &ctx.fhir else {
            return Err(pingora::Error::explain(
                ErrorType::InternalError,
                "checked exchange without a request",
            ));
        };
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let judged: std::result::Result<Bytes, Verdict> = match &ctx.check {
            _ if !ctx.entry_checks.is_empty() || !ctx.withheld_entries.is_empty() => {
                judge_bundle_answer(
                    &still_judged,
                    &ctx.withheld_entries,
                    fhir,
                    answer.status,
                    content_type,
                    &answer.body,
                    &self.bases,
                    self.upstream_bases(),
                    &self.realm,
                )
                .map(|(body, left_out)| {
                    ctx.left_out += left_out;
                    // Written one way, whether entries were replaced as
                    // read or after (the upstream's spacing would tell).
                    Bytes::from(crate::check::entries_written_one_way(&body))
                })
            }
            Some(check) => match judge(
                check,
                fhir,
                answer.status,
                content_type,
                &answer.body,
                &self.bases,
            ) {
                // Included resources outside the grant, and resources also
                // in another patient's compartment, are left out.
                Verdict::Trim { entries } => {
                    ctx.left_out += entries.len();
                    if let (ResponseCheck::Everything { patient }, Some(t)) = (check, &ctx.token) {
                        self.everything_pages.remember(
                            &answer.body,
                            &self.bases.urls,
                            &Origin::of(&t.claims, patient),
                        );
                    }
                    match crate::check::without_entries(&answer.body, &entries) {
                        Some(kept) => Ok(rewrite_links(&kept, self.upstream_bases(), &self.realm)
                            .map(Bytes::from)
                            .unwrap_or_else(|| Bytes::from(kept))),
                        None => Err(Verdict::Unverifiable {
                            why: "the upstream's search answer could not be trimmed of \
                                  resources outside the grant"
                                .into(),
                        }),
                    }
                }
                // Bundles (searches, `$everything`, an instance's history)
                // point through the gateway, not at the upstream. The page
                // ids of a `$everything` answer are its caller's.
                Verdict::Pass => Ok(match check {
                    ResponseCheck::Everything { patient } => {
                        if let Some(t) = &ctx.token {
                            self.everything_pages.remember(
                                &answer.body,
                                // The public base and the upstream's:
                                // where its paging links may point.
                                &self.bases.urls,
                                &Origin::of(&t.claims, patient),
                            );
                        }
                        // Written one way, as a trimmed one is (the
                        // upstream's spacing would tell).
                        let body = crate::check::entries_written_one_way(&answer.body);
                        rewrite_links(&body, self.upstream_bases(), &self.realm)
                            .map(Bytes::from)
                            .unwrap_or_else(|| Bytes::from(body))
                    }
                    ResponseCheck::Resource { .. }
                        if fhir.interaction != Interaction::HistoryInstance =>
                    {
                        answer.body.clone()
                    }
                    // A history's later pages are not offered.
                    ResponseCheck::Resource { .. } => {
                        let body = crate::check::without_paging_links(&answer.body)
                            .map(Bytes::from)
                            .unwrap_or_else(|| answer.body.clone());
                        rewrite_links(&body, self.upstream_bases(), &self.realm)
                            .map(Bytes::from)
                            .unwrap_or(body)
                    }
                    ResponseCheck::Search { .. } => {
                        let body = crate::check::entries_written_one_way(&answer.body);
                        rewrite_links(&body, self.upstream_bases(), &self.realm)
                            .map(Bytes::from)
                            .unwrap_or_else(|| Bytes::from(body))
                    }
                }),
                v => Err(v),
            },
            None => {
                return Err(pingora::Error::explain(
                    ErrorType::InternalError,
                    "checked exchange without a check",
                ))
            }
        };
        let body = match judged {
            Ok(body) => body,
            Err(verdict) => {
                let denial = check_denial(verdict, fhir, "the upstream's answer");
                return self.refuse(session, ctx, denial).await;
            }
        };
        // Matches left out as if absent (on this page or another) would
        // be counted by the total: it goes.
        let body = match &ctx.check {
            Some(c) if crate::check::counts_hidden(c, &self.bases) => {
                crate::check::without_total(&body).map_or(body, Bytes::from)
            }
            _ => body,
        };
        // Matches too large to check were let go unjudged (they could be
        // anyone's). A search that brings its matches only, narrowed to
        // the caller's, says so: its page is short. One that may bring
        // includes (another patient's, maybe) does not.
        let body = match &ctx.check {
            Some(ResponseCheck::Search { .. })
                if ctx.too_large_entries > 0
                    && ctx.entry_checks.is_empty()
                    && ctx.withheld_entries.is_empty()
                    && crate::check::brings_only_matches(fhir) =>
            {
                match crate::check::with_left_out_warning(&body, ctx.too_large_entries) {
                    Some(warned) => {
                        ctx.warned_short = true;
                        Bytes::from(warned)
                    }
                    None => body,
                }
            }
            _ => body,
        };
        // An earlier version is read only while the resource still is in
        // the grant: one moved to another patient (a misfiled record,
        // corrected) is theirs, every version of it, as its history is.
        // (So is a history: `_at` leaves the current version out.)
        if let (
            Interaction::Vread | Interaction::HistoryInstance,
            Some(check @ ResponseCheck::Resource { .. }),
        ) = (fhir.interaction, &ctx.check)
        {
            let (fhir, check) = (fhir.clone(), check.clone());
            if let Err(denial) = self
                .current_version_inside(session, ctx, &fhir, &check)
                .await
            {
                return self.refuse(session, ctx, denial).await;
            }
        }
        // A Bundle with writes under patient/ scopes that failed whole.
        let withheld = withheld_error(ctx, answer.status);
        let body = withheld.clone().unwrap_or(body);
        let Some(fhir) = &ctx.fhir else {
            return Err(pingora::Error::explain(
                ErrorType::InternalError,
                "checked exchange without a request",
            ));
        };
        if !fhir.entries.is_empty() {
            // What the upstream answered each entry, and which answers the
            // client did not get (replaced by a denial).
            let n = fhir.entries.len();
            let mut upstream =
                crate::check::entry_statuses(&answer.body[..], n).unwrap_or_default();
            // (What the upstream answered those replaced as they came.)
            for (i, status) in replaced {
                if let Some(s) = upstream.get_mut(i) {
                    *s = status;
                }
            }
            let client = crate::check::entry_statuses(&body[..], n).unwrap_or_default();
            ctx.entry_withheld = (0..n).map(|i| upstream.get(i) != client.get(i)).collect();
            ctx.entry_statuses = upstream;
        }
        let mut h = ResponseHeader::build(answer.status, Some(answer.headers.len() + 2))?;
        for (name, value) in &answer.headers {
            if upstream::passes_on(name) {
                h.append_header(name.clone(), value.clone())?;
            }
        }
        h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        if withheld.is_some() {
            replace_body_headers(&mut h, body.len())?;
        }
        self.stamp(&mut h, ctx)?;
        session.write_response_header(Box::new(h), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// A write under `patient/` scopes: the body must keep the resource in
    /// the compartment, and the resource as stored now must be in it (an
    /// update of a missing one creates it). The write then goes upstream
    /// with `If-Match` on the version that was checked, so it cannot land on
    /// a resource changed in between.
    async fn prove_write(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        w: &WriteCheck,
    ) -> std::result::Result<(), Denial> {
        let Some(fhir) = ctx.fhir.clone() else {
            return Err(Denial::BadFhirRequest {
                code: "fhir_malformed",
                description: "write without a classified request".into(),
            });
        };
        let body = if w.body {
            Some(self.read_body(session, ctx).await?)
        } else {
            None
        };
        let content_type = session
            .req_header()
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let rel = ctx.rel_path.clone().unwrap_or_default();
        let theirs: Vec<&str> = session
            .req_header()
            .headers
            .get_all(header::IF_MATCH)
            .iter()
            .map(|v| v.to_str().unwrap_or("(not text)"))
            .collect();
        let mut proved = Vec::new();
        ctx.if_match = self
            .prove_one_write(
                session,
                ctx,
                &mut proved,
                &fhir,
                Target {
                    rel: &rel,
                    body: body.as_deref().map(|b| (content_type.as_deref(), b)),
                    preconditions: &theirs,
                },
                w,
            )
            .await?;
        Ok(())
    }

    /// Writes inside a Bundle under `patient/` scopes: each entry's resource
    /// must keep the compartment and each stored resource it changes must be
    /// in it. Each such entry then goes with `request.ifMatch` on the version
    /// that was checked (a client's own `ifMatch` must name it), so an
    /// update or patch cannot land on a resource changed in between; the
    /// Bundle so rewritten is sent upstream by fhirwall. (A delete goes with
    /// it too, but HAPI does not apply `If-Match` to deletes: one changed
    /// between the proof and the delete is deleted as it then is.)
    async fn prove_bundle_writes(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        bundle: &[u8],
        writes: &[(usize, WriteCheck)],
    ) -> std::result::Result<(), Denial> {
        let Some(fhir) = ctx.fhir.clone() else {
            return Ok(());
        };
        let doc: serde_json::Value =
            serde_json::from_slice(bundle).map_err(|_| Denial::BadFhirRequest {
                code: "fhir_malformed",
                description: "the Bundle is not JSON".into(),
            })?;
        // A transaction's ids are substituted across its entries (a
        // batch's entries are each processed alone).
        if fhir.interaction == Interaction::Transaction {
            let checked: Vec<usize> = writes.iter().map(|(i, _)| *i).collect();
            crate::check::bundle_ids_hold(&doc, &checked).map_err(|why| {
                Denial::InsufficientScope {
                    description: format!("{} refused: {why}", fhir.interaction),
                    scope: None,
                }
            })?;
        }
        let mut versions: Vec<(usize, http::HeaderValue)> = Vec::new();
        // References proved once for the whole Bundle.
        let mut proved = Vec::new();
        for (i, w) in writes {
            let (Some(entry_req), Some(entry)) =
                (fhir.entries.get(*i), doc.pointer(&format!("/entry/{i}")))
            else {
                continue;
            };
            let resource = entry.get("resource").map(|r| r.to_string());
            if w.body && resource.is_none() {
                return Err(Denial::InsufficientScope {
                    description: format!(
                        "{} entry {i} carries no resource to check",
                        fhir.interaction
                    ),
                    scope: None,
                });
            }
            // A client's `ifMatch` that is not a string names no version.
            let theirs: Vec<&str> = entry
                .pointer("/request/ifMatch")
                .map(|v| v.as_str().unwrap_or("(not a string)"))
                .into_iter()
                .collect();
            let rel = format!(
                "{}/{}",
                entry_req.resource_type.as_deref().unwrap_or(""),
                entry_req.id.as_deref().unwrap_or("")
            );
            let proved = self
                .prove_one_write(
                    session,
                    ctx,
                    &mut proved,
                    entry_req,
                    Target {
                        rel: &rel,
                        body: resource
                            .as_deref()
                            .map(|r| (Some("application/fhir+json"), r.as_bytes())),
                        preconditions: &theirs,
                    },
                    w,
                )
                .await
                .map_err(|d| match d {
                    Denial::InsufficientScope { description, scope } => Denial::InsufficientScope {
                        description: format!(
                            "{} entry {i} refused: {description}",
                            fhir.interaction
                        ),
                        scope,
                    },
                    // A Bundle is refused whole; an entry on another
                    // patient's resource reads exactly like one on a missing
                    // resource.
                    Denial::Hidden { resource, .. } => Denial::InsufficientScope {
                        description: format!(
                            "{} entry {i} refused: {resource} is not known",
                            fhir.interaction
                        ),
                        scope: None,
                    },
                    // An entry that would fail: the Bundle is refused whole.
                    Denial::PreconditionFailed { description } => Denial::PreconditionFailed {
                        description: format!("{} entry {i}: {description}", fhir.interaction),
                    },
                    d => d,
                })?;
            if let Some(ours) = proved {
                versions.push((*i, ours));
            }
        }
        if versions.is_empty() {
            return Ok(());
        }
        let tags: Vec<(usize, String)> = versions
            .iter()
            .map(|(i, v)| (*i, v.to_str().unwrap_or_default().to_string()))
            .collect();
        let rewritten = crate::check::bundle_with_if_match(bundle, &tags).ok_or_else(|| {
            Denial::BadFhirRequest {
                code: "fhir_malformed",
                description: "the Bundle could not be given its entries' ifMatch".into(),
            }
        })?;
        ctx.body = Some(Bytes::from(rewritten));
        ctx.body_rewritten = true;
        Ok(())
    }

    /// The checks of one write (`fhir` at its target, with its body): returns
    /// the `If-Match` for the version of the stored resource that was
    /// checked, which the client's own `If-Match` must name (else 412).
    async fn prove_one_write(
        &self,
        session: &Session,
        ctx: &Ctx,
        proved: &mut Vec<(String, String)>,
        fhir: &FhirRequest,
        target: Target<'_>,
        w: &WriteCheck,
    ) -> std::result::Result<Option<http::HeaderValue>, Denial> {
        let Target {
            rel,
            body,
            preconditions,
        } = target;
        let refuse = |description: String| Denial::InsufficientScope {
            description,
            scope: None,
        };
        if w.body {
            let (content_type, body) = body.unwrap_or((None, b""));
            let refs =
                judge_write_body(fhir, content_type, body, w, &self.bases).map_err(refuse)?;
            if let Some(p) = &w.patient {
                self.prove_references(session, ctx, proved, refs, p).await?;
            }
        }
        if !w.existing {
            return Ok(None);
        }
        let read = FhirRequest {
            interaction: Interaction::Read,
            params: Vec::new(),
            entries: Vec::new(),
            ..fhir.clone()
        };
        let check = ResponseCheck::Resource {
            patient: w.patient.clone(),
            filters: w.filters.clone(),
        };
        // A stored resource too large to check: as if absent.
        let (verdict, answer) = self
            .judge_stored(session, ctx, rel, &read, &check)
            .await
            .map_err(|denial| match denial.code() {
                "upstream_answer_too_large" => hidden_too_large(fhir),
                _ => denial,
            })?;
        match verdict {
            Verdict::Pass => {
                let stored = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
                if let (Some(p), Some(doc)) = (&w.patient, &stored) {
                    if references_other_patient(doc, p, &self.bases) {
                        return Err(refuse(format!(
                            "{}/{} is shared with another patient's record; under the scopes of \
                             Patient/{p} it may be read but not changed",
                            fhir.resource_type.as_deref().unwrap_or(""),
                            fhir.id.as_deref().unwrap_or("")
                        )));
                    }
                }
                let unusable = |why: &str| {
                    check_denial(
                        Verdict::Unverifiable {
                            why: format!("the stored resource's meta.versionId {why}"),
                        },
                        fhir,
                        "the stored resource",
                    )
                };
                // A version fhirwall cannot pin the write to fails closed;
                // only a server that keeps none (no meta.versionId) gets
                // the write unpinned.
                let v = match stored.as_ref().and_then(|d| d.pointer("/meta/versionId")) {
                    None => return Ok(None),
                    Some(serde_json::Value::String(v)) => v.clone(),
                    Some(_) => return Err(unusable("is not a string")),
                };
                let pin = http::HeaderValue::from_str(&format!("W/\"{v}\""))
                    .ok()
                    .filter(|_| !v.is_empty() && !v.contains('"'));
                let Some(pin) = pin else {
                    return Err(unusable("cannot be sent in If-Match"));
                };
                // The client's own precondition still holds: were it let go
                // for ours, a client updating version 1 would overwrite
                // version 2.
                if !preconditions.is_empty()
                    && !crate::check::if_match_admits(preconditions.iter().copied(), &v)
                {
                    return Err(Denial::PreconditionFailed {
                        description: format!(
                            "{rel} is at version {v}, not one its If-Match names ({})",
                            preconditions.join(", ")
                        ),
                    });
                }
                Ok(Some(pin))
            }
            // Under patient/ scopes an update never creates (so a 404 for
            // another patient's id cannot be told from a missing one).
            // Under a scope with a query filter neither: nothing pins the
            // write to the absence fhirwall saw, so a resource created at
            // that id meanwhile, outside the filter, would be overwritten.
            // (Under a filter, a missing one is answered as one outside
            // the filter is, 404: which ids exist outside it stays unknown.)
            Verdict::Hide {
                why: "upstream_not_found",
            } if fhir.interaction == Interaction::Update
                && answer.status == 404
                && w.patient.is_none()
                && w.filters.is_none() =>
            {
                Ok(None)
            }
            failed => Err(check_denial(failed, fhir, "the stored resource")),
        }
    }

    /// Under the scopes of `Patient/{patient}`, every resource of the
    /// compartment's types that a written body references (`refs`, as
    /// [`judge_write_body`] found them) must be in the compartment (fetched
    /// and judged): the upstream looks references up, so the write's
    /// answer would tell whether another patient's resource exists. A missing one and another
    /// patient's are refused alike. `proved` holds those already proved for
    /// this request; at most [`MAX_PROVED_REFERENCES`] are looked up.
    async fn prove_references(
        &self,
        session: &Session,
        ctx: &Ctx,
        proved: &mut Vec<(String, String)>,
        refs: Vec<(String, String)>,
        patient: &str,
    ) -> std::result::Result<(), Denial> {
        let refuse = |description: String| Denial::InsufficientScope {
            description,
            scope: None,
        };
        for (t, id) in refs {
            if proved.iter().any(|(pt, pid)| *pt == t && *pid == id) {
                continue;
            }
            if proved.len() >= MAX_PROVED_REFERENCES {
                return Err(Denial::TooLarge {
                    description: format!(
                        "the written resources reference more than {MAX_PROVED_REFERENCES} \
                         resources of the patient's compartment, each of which fhirwall must \
                         look up: split the request"
                    ),
                });
            }
            let not_known = || {
                refuse(format!(
                    "the written resource references {t}/{}, which is not known in the \
                     compartment of Patient/{patient}",
                    id.chars().take(64).collect::<String>()
                ))
            };
            let rel = format!("{t}/{id}");
            let Ok(read) = classify::classify(HttpRequest {
                method: "GET",
                path: &rel,
                query: None,
                if_none_exist: None,
            }) else {
                return Err(not_known());
            };
            if read.interaction != Interaction::Read {
                return Err(not_known());
            }
            let check = ResponseCheck::in_compartment(patient);
            let verdict = match self.judge_stored(session, ctx, &rel, &read, &check).await {
                Ok((verdict, _)) => verdict,
                // Too large to check: as if absent.
                Err(d) if d.code() == "upstream_answer_too_large" => return Err(not_known()),
                Err(d) => return Err(d),
            };
            match verdict {
                Verdict::Pass => proved.push((t, id)),
                Verdict::Hide { .. } | Verdict::Refuse { .. } => return Err(not_known()),
                failed => return Err(check_denial(failed, &read, "a referenced resource")),
            }
        }
        Ok(())
    }

    /// A stored resource fhirwall reads for itself (GET `rel`: no query,
    /// no body), judged by `check` as the read `read`: the verdict, and
    /// the answer. One too large to check is the fetch's denial
    /// `upstream_answer_too_large`, for each caller to hide as it must.
    async fn judge_stored(
        &self,
        session: &Session,
        ctx: &Ctx,
        rel: &str,
        read: &FhirRequest,
        check: &ResponseCheck,
    ) -> std::result::Result<(Verdict, upstream::Answer), Denial> {
        let mut headers = self.checked_headers(session, ctx);
        headers.remove(header::CONTENT_TYPE);
        let answer = self
            .checked
            .fetch(http::Method::GET, rel, None, headers, None, None)
            .await?;
        let content_type = answer
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let verdict = judge(
            check,
            read,
            answer.status,
            content_type,
            &answer.body,
            &self.bases,
        );
        Ok((verdict, answer))
    }

    /// For a vread: the resource's current version must pass `check` too
    /// (fetched and judged as a read); else it is hidden, as another
    /// patient's is.
    async fn current_version_inside(
        &self,
        session: &Session,
        ctx: &Ctx,
        vread: &FhirRequest,
        check: &ResponseCheck,
    ) -> std::result::Result<(), Denial> {
        let read = FhirRequest {
            interaction: Interaction::Read,
            version_id: None,
            ..vread.clone()
        };
        let rel = format!(
            "{}/{}",
            read.resource_type.as_deref().unwrap_or(""),
            read.id.as_deref().unwrap_or("")
        );
        let (verdict, _) = self
            .judge_stored(session, ctx, &rel, &read, check)
            .await
            .map_err(|d| match d.code() {
                "upstream_answer_too_large" => hidden_too_large(vread),
                _ => d,
            })?;
        match verdict {
            Verdict::Pass => Ok(()),
            failed => Err(check_denial(
                failed,
                vread,
                "the resource's current version",
            )),
        }
    }

    /// The DPoP algorithms for `WWW-Authenticate`, when DPoP is enabled.
    fn dpop_algs(&self) -> Option<&str> {
        self.settings
            .dpop
            .enabled
            .then_some(self.settings.dpop.algs.as_str())
    }

    /// The break-glass reason declared with this request (the configured
    /// claim when there is one, else the header), if break-glass is
    /// possible now: a non-empty,
    /// printable reason of at most 500 characters, from a token young
    /// enough when a maximum age is configured.
    fn break_glass_reason(
        &self,
        bg: &crate::config::BreakGlassConfig,
        session: &Session,
        claims: &crate::token::Claims,
        now: i64,
    ) -> Option<String> {
        let header = session
            .req_header()
            .headers
            .get(bg.header.as_str())
            .and_then(|v| v.to_str().ok());
        crate::policy::break_glass_reason(bg, header, &claims.raw, now)
    }

    /// Stage 4, bind: a token bound to a key (`cnf.jkt`) needs a valid,
    /// fresh DPoP proof by that key for this request; an unbound token may
    /// carry no proof and may not use the DPoP scheme. Returns the binding
    /// for the audit record, and a DPoP proof to remember (the caller does,
    /// in the shared replay set).
    fn bind(
        &self,
        claims: &crate::token::Claims,
        p: &Presented,
    ) -> std::result::Result<(&'static str, Option<crate::shared::Proof>), Denial> {
        let Presented {
            token,
            dpop_scheme,
            proofs,
            method,
            path,
            client_cert,
        } = *p;
        let dpop = dpop_denial;
        let cnf = claims.cnf.as_ref();
        // Every confirmation method the token names must be one enforced
        // here: one that is not (`jwk`, `kid`, `jku`, `x5t#s256` misspelt)
        // would otherwise be dropped beside one that is.
        // A token refused before its proof is looked at: challenged in the
        // scheme it came with (RFC 9449 §7.1).
        let invalid = |code: &'static str, description: String| {
            if dpop_scheme {
                dpop(code, "invalid_token", description)
            } else {
                Denial::InvalidToken { code, description }
            }
        };
        if let Some(member) = crate::token::unenforced_cnf_member(cnf) {
            return Err(invalid(
                "token_binding_unsupported",
                format!(
                    "token carries a cnf member this gateway does not enforce ('{}'); only jkt \
                     (DPoP) and x5t#S256 (mTLS) are",
                    member.chars().take(32).collect::<String>()
                ),
            ));
        }
        // RFC 8705: a certificate-bound token only over a TLS connection
        // whose client certificate has that SHA-256 thumbprint.
        let x5t = cnf.and_then(|c| c.get("x5t#S256"));
        if let Some(x5t) = x5t {
            let bound = x5t.as_str().filter(|t| !t.is_empty());
            match (bound, client_cert) {
                (Some(want), Some(got)) if want == got => {}
                (_, None) => {
                    return Err(invalid(
                        "mtls_no_certificate",
                        "the token is bound to a TLS client certificate (cnf x5t#S256) but none \
                         was presented"
                            .into(),
                    ))
                }
                _ => {
                    return Err(invalid(
                        "mtls_wrong_certificate",
                        "the TLS client certificate is not the one the token is bound to (cnf \
                         x5t#S256)"
                            .into(),
                    ))
                }
            }
        }
        let jkt = cnf.and_then(|c| c.get("jkt"));
        if cnf.is_some() && jkt.is_none() && x5t.is_none() {
            return Err(invalid(
                "token_binding_unsupported",
                "token carries a cnf claim with no binding this gateway knows".into(),
            ));
        }
        let Some(jkt) = jkt else {
            if dpop_scheme {
                return Err(dpop(
                    "dpop_token_not_bound",
                    "invalid_token",
                    "the DPoP scheme was used with a token that is not DPoP-bound (no cnf.jkt)"
                        .into(),
                ));
            }
            if !proofs.is_empty() {
                return Err(dpop(
                    "dpop_proof_without_binding",
                    "invalid_dpop_proof",
                    "a DPoP proof came with a token that is not DPoP-bound".into(),
                ));
            }
            if x5t.is_some() {
                return Ok(("mtls", None));
            }
            if let Some(why) = crate::token::binding_required(&self.settings.issuers, claims) {
                return Err(Denial::InvalidToken {
                    code: "binding_required",
                    description: format!(
                        "{why} requires sender-constrained tokens (DPoP or mTLS); this is a plain bearer token"
                    ),
                });
            }
            return Ok(("bearer", None));
        };
        let Some(jkt) = jkt.as_str() else {
            return Err(dpop(
                "dpop_bad_claim",
                "invalid_token",
                "the token's cnf.jkt is not a string".into(),
            ));
        };
        if !self.settings.dpop.enabled {
            return Err(Denial::InvalidToken {
                code: "token_binding_unsupported",
                description: "the token is DPoP-bound (cnf.jkt) and DPoP is not enabled on this \
                              gateway (dpop.enabled: false)"
                    .into(),
            });
        }
        if !dpop_scheme {
            return Err(dpop(
                "dpop_bound_as_bearer",
                "invalid_token",
                "the token is DPoP-bound (cnf.jkt): present it with the DPoP scheme and a proof"
                    .into(),
            ));
        }
        let proof = match proofs {
            [one] => one,
            [] => {
                return Err(dpop(
                    "dpop_missing",
                    "invalid_dpop_proof",
                    "the DPoP scheme needs a DPoP proof header".into(),
                ))
            }
            _ => {
                return Err(dpop(
                    "dpop_malformed",
                    "invalid_dpop_proof",
                    "several DPoP proof headers".into(),
                ))
            }
        };
        let now = now_unix();
        let accepted = self
            .dpop_nonces
            .as_ref()
            .map(|n| n.accepted(now))
            .unwrap_or_default();
        let proof = crate::dpop::check_proof(
            proof,
            &crate::dpop::ProofContext {
                method,
                url: &format!("{}{path}", self.public_origin),
                access_token: token,
                jkt,
                nonces: &accepted,
                now,
            },
            &self.settings.dpop.policy,
        )
        .map_err(|e| match e {
            // RFC 9449 §9: tell the client the nonce to use.
            crate::dpop::DpopError::NonceRequired => Denial::InvalidDpop {
                code: e.code(),
                error: "use_dpop_nonce",
                description: "Resource server requires nonce in DPoP proof".into(),
                nonce: self.dpop_nonces.as_ref().map(|n| n.current(now)),
            },
            e => dpop(e.code(), "invalid_dpop_proof", e.to_string()),
        })?;
        // A proof is good once: the caller remembers it (see
        // `remember_proof`), counted against its client (issuer and
        // client_id: a client may bind its tokens to any number of keys),
        // else its subject (a token naming no client, as an introspection
        // answer may not: its user would otherwise get a quota per key it
        // binds a token to), else its key; and first against its user (a
        // `sub` other than the client's own, on a token with `patient/` or
        // `user/` scopes: a backend service acts as itself whatever its
        // `sub`), so that one user cannot spend the client's quota for all
        // its users.
        use crate::scope::Context;
        let for_a_user =
            claims.scopes.has_context(Context::Patient) || claims.scopes.has_context(Context::User);
        let (counted_as, user) = match (&claims.client_id, &claims.sub) {
            (Some(c), sub) => (
                format!("client\0{}\0{c}", claims.iss),
                sub.as_deref()
                    .filter(|s| s != c && for_a_user)
                    .map(|s| format!("user\0{}\0{c}\0{s}", claims.iss)),
            ),
            (None, Some(s)) => (format!("subject\0{}\0{s}", claims.iss), None),
            (None, None) => (format!("key\0{jkt}"), None),
        };
        // Bound both ways, both held (the certificate was checked above):
        // a policy on either binding sees it.
        let binding = if x5t.is_some() { "dpop+mtls" } else { "dpop" };
        Ok((
            binding,
            Some(crate::shared::Proof {
                jkt: jkt.to_string(),
                jti: proof.jti,
                counted_as,
                user,
            }),
        ))
    }

    /// Remembers a DPoP proof in the (shared) replay set: a proof is good
    /// once, and one client may not fill the set for every other.
    async fn remember_proof(
        &self,
        proof: &crate::shared::Proof,
    ) -> std::result::Result<(), Denial> {
        use crate::shared::{ProofOutcome, Quota};
        let outcome = self
            .shared
            .remember_proof(proof)
            .await
            .map_err(|_| Denial::Unavailable {
                code: "dpop_replay_check_unavailable",
                description: "the DPoP replay check (Redis) is unavailable; retry later".into(),
                retry_after_seconds: 1,
            })?;
        match outcome {
            ProofOutcome::Fresh => Ok(()),
            ProofOutcome::Replayed => {
                let e = crate::dpop::DpopError::Replayed;
                Err(dpop_denial(e.code(), "invalid_dpop_proof", e.to_string()))
            }
            ProofOutcome::OverQuota(level, left) => {
                let d = &self.settings.dpop;
                let (who, quota, key) = match level {
                    Quota::Client => (
                        "this client (or, for tokens naming none, this subject)",
                        d.max_proofs_per_key,
                        "max_proofs_per_key",
                    ),
                    Quota::User => (
                        "this user of this client",
                        d.max_proofs_per_user,
                        "max_proofs_per_user",
                    ),
                };
                Err(Denial::RateLimited {
                    code: "dpop_quota_exceeded",
                    description: format!(
                        "{who} has presented {quota} DPoP proofs within the replay window \
                         (dpop.{key}); slow down"
                    ),
                    retry_after_seconds: left.as_secs().max(1),
                })
            }
            ProofOutcome::Full => Err(Denial::Unavailable {
                code: "dpop_replay_cache_full",
                description: "too many DPoP proofs in flight to check them for replay; retry later"
                    .into(),
                retry_after_seconds: 1,
            }),
        }
    }

    /// Stages 1-6 for one request. `Ok(())` means allowed.
    async fn admit(&self, session: &mut Session, ctx: &mut Ctx) -> std::result::Result<(), Denial> {
        let req = session.req_header();
        // Each stage runs in a span of its own (debug level: free unless
        // asked for). Entered guards are dropped before every await.
        // 1. Route
        let stage = tracing::debug_span!("route").entered();
        let path = normalise(req.uri.path()).map_err(|e| Denial::BadFhirRequest {
            code: "bad_path",
            description: e.to_string(),
        })?;
        let rel = match route(
            &path,
            &self.settings.public_base_path,
            &self.settings.public_routes,
        ) {
            Route::NotFound => {
                return Err(Denial::NotFound {
                    description: format!(
                        "'{}' is not below the FHIR base",
                        crate::audit::capped(&path, 200)
                    ),
                })
            }
            Route::Public(rel) => {
                // No token, so nothing beyond the route itself: no
                // parameter that brings in other resources or a stored
                // search's page (`route::check_public`, as explain does).
                let has_body = declares_body(&req.headers);
                match crate::route::check_public(
                    req.method.as_str(),
                    req.uri.query(),
                    has_body,
                    &self.decide_opts.special_params,
                ) {
                    Ok(params) => ctx.query_names = audit_param_names(&params),
                    Err(refusal) => {
                        // The refused request's parameter names, for its
                        // record, when its query can be read at all.
                        if let Some(Ok(params)) = req.uri.query().map(classify::parse_params) {
                            ctx.query_names = audit_param_names(&params);
                        }
                        return Err(public_denial(&refusal, &rel));
                    }
                }
                ctx.public = true;
                ctx.rel_path = Some(rel);
                return Ok(());
            }
            Route::Fhir(rel) => rel,
        };
        ctx.rel_path = Some(rel.clone());
        if let Some(name) = proxy_headers::connection_names_read_header(&ctx.connection) {
            return Err(Denial::BadFhirRequest {
                code: "fhir_malformed",
                description: format!(
                    "Connection lists {name}, a header fhirwall reads to decide the request: \
                     it would be removed before the upstream reads the request"
                ),
            });
        }
        let query = req.uri.query().map(str::to_string);
        let query_params = match &query {
            Some(q) => classify::parse_params(q).map_err(|e| classify_denial(&e))?,
            None => Vec::new(),
        };
        ctx.query_names = audit_param_names(&query_params);
        drop(stage);

        // 2. Extract
        let stage = tracing::debug_span!("extract").entered();
        if has_access_token_param(&query_params) {
            return Err(extract_denial(&ExtractError::TokenInQuery));
        }
        let auth: Vec<&[u8]> = req
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        ctx.dpop_scheme = crate::extract::names_dpop_scheme(&auth);
        let (token, dpop_scheme) = match extract(&auth).map_err(|e| extract_denial(&e))? {
            Extracted::None => return Err(Denial::NoToken),
            Extracted::Bearer(t) => (t.to_string(), false),
            Extracted::Dpop(_) if !self.settings.dpop.enabled => {
                return Err(extract_denial(&ExtractError::DpopNotEnabled))
            }
            Extracted::Dpop(t) => (t.to_string(), true),
        };
        let proofs: Vec<String> = req
            .headers
            .get_all("dpop")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        // SHA-256 of the TLS client certificate (base64url), if one was
        // presented; Pingora leaves the digest empty when none was.
        let client_cert = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .map(|s| s.cert_digest.clone())
            .filter(|d| !d.is_empty())
            .map(|d| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
            });
        // Read as written, or refused: a value that is not visible ASCII
        // would be judged as something else than the upstream reads.
        let one_ascii = |name: header::HeaderName| -> std::result::Result<Option<String>, Denial> {
            let mut values = req.headers.get_all(&name).iter();
            let first = values.next();
            if values.next().is_some() {
                return Err(Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: format!("more than one {name} header"),
                });
            }
            first
                .map(|v| {
                    v.to_str()
                        .map(str::to_string)
                        .map_err(|_| Denial::UnsupportedMediaType {
                            description: format!("{name} is not visible ASCII"),
                        })
                })
                .transpose()
        };
        let content_type = one_ascii(header::CONTENT_TYPE)?;
        let content_encoding = one_ascii(header::CONTENT_ENCODING)?;
        classify::check_content_type(content_type.as_deref())
            .map_err(|description| Denial::UnsupportedMediaType { description })?;
        let is_form = classify::form_body(content_type.as_deref(), content_encoding.as_deref())
            .map_err(|description| Denial::UnsupportedMediaType { description })?;
        let method = req.method.as_str().to_string();
        // Decided like a query, so it must be one the gateway can read;
        // never left to the upstream alone.
        let mut ine = req.headers.get_all("if-none-exist").iter();
        let if_none_exist = match (ine.next(), ine.next()) {
            (None, _) => None,
            (Some(v), None) => Some(
                v.to_str()
                    .map_err(|_| Denial::BadFhirRequest {
                        code: "fhir_malformed",
                        description: "If-None-Exist is not ASCII".into(),
                    })?
                    .to_string(),
            ),
            (Some(_), Some(_)) => {
                return Err(Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: "more than one If-None-Exist header".into(),
                })
            }
        };

        // A server-side cascade (HAPI's `X-Cascade: delete`) deletes
        // resources no scope was checked against.
        if req.headers.contains_key("x-cascade") {
            return Err(Denial::InsufficientScope {
                description: "X-Cascade is refused: a cascading delete reaches resources the \
                              token's grant was not checked against"
                    .into(),
                scope: None,
            });
        }

        // 3. Validate
        drop(stage);
        let started = Instant::now();
        // The client's address as its introspection budget names it (made
        // only where an issuer introspects).
        let source = ctx
            .client
            .as_ref()
            .filter(|_| self.validator.introspects())
            .map(|c| crate::client_addr::rate_limit_key(c.ip, &self.settings.nat64_prefixes));
        let v = self
            .validator
            .validate(&token, now_unix(), source.as_deref())
            .instrument(tracing::debug_span!("validate"))
            .await;
        // A refused token was not in the cache of verified tokens (one too
        // long is refused before the cache is asked): a flood of forged
        // tokens shows in the hit ratio. (One refused below, for a claim it
        // cannot forward, was looked up like any other.)
        match &v {
            Ok(v) if v.cache_hit => self.metrics.token_cache_hits.inc(),
            Err(crate::token::TokenError::TooLong(_)) => {}
            _ => self.metrics.token_cache_misses.inc(),
        }
        let v = v.and_then(|v| {
            crate::token::forwarded_claims_fit(&v.claims.raw, &self.settings.forward_headers)?;
            Ok(v)
        });
        let took = started.elapsed();
        ctx.validation = Some(took);
        let kind = match &v {
            Ok(v) => v.kind,
            Err(_) => crate::token::token_kind(&token),
        };
        self.metrics.validation(kind, took.as_secs_f64());
        if v.is_err() {
            // A refused token is audited by its hash too: repeated attacks
            // with one token can then be told apart.
            ctx.refused_token_hash = Some(crate::token::token_hash(&token));
        }
        let v = v.map_err(|e| {
            match token_denial(&e, self.settings.jwks.min_refetch_interval_seconds.max(1)) {
                Denial::InvalidToken { code, description } if dpop_scheme => Denial::InvalidDpop {
                    code,
                    error: "invalid_token",
                    description,
                    nonce: None,
                },
                d => d,
            }
        })?;
        let claims = v.claims.clone();
        ctx.token = Some(v);

        // 4. Bind
        let span = tracing::debug_span!("bind");
        let stage = span.clone().entered();
        let kind = ctx.token.as_ref().map_or("jwt", |t| t.kind);
        let (binding, proof) = self.bind(
            &claims,
            &Presented {
                token: &token,
                dpop_scheme,
                proofs: &proofs,
                method: &method,
                path: req.uri.path(),
                client_cert: client_cert.as_deref(),
            },
        )?;
        drop(stage);
        if let Some(proof) = proof {
            Box::pin(self.remember_proof(&proof).instrument(span)).await?;
        }
        ctx.binding = Some(binding);
        self.metrics.binding(kind, binding);

        // 5. Classify (reading the body where it decides the interaction).
        let span = tracing::debug_span!("classify");
        let body = if classify::body_classifies(&method, &rel, is_form) {
            Some(
                self.read_body(session, ctx)
                    .instrument(span.clone())
                    .await?,
            )
        } else {
            None
        };
        let mut fhir = classify::classify(HttpRequest {
            method: &method,
            path: &rel,
            query: query.as_deref(),
            if_none_exist: if_none_exist.as_deref(),
        })
        .map_err(|e| classify_denial(&e))?;
        // What a create, update or patch stores may hold conditional
        // references the server would resolve by searching: read them.
        if classify::writes_resource(&fhir)
            && self.settings.upstream.resolves_conditional_references
        {
            let headers = &session.req_header().headers;
            let text = |name: header::HeaderName| -> Vec<String> {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            };
            // (Content-Type and Content-Encoding: one each, visible
            // ASCII, checked above for every request.)
            let security_context = text(header::HeaderName::from_static("x-security-context"));
            if security_context.len() > 1 {
                return Err(Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: "a write with more than one X-Security-Context header".into(),
                });
            }
            fhir = classify::security_context_reference(
                fhir,
                security_context.first().map(String::as_str),
            )
            .map_err(|e| classify_denial(&e))?;
            let reads = classify::reads_written_body(
                &fhir,
                content_type.as_deref(),
                content_encoding.as_deref(),
            )
            .map_err(|e| classify_denial(&e))?;
            if reads {
                let written = self
                    .read_body(session, ctx)
                    .instrument(span.clone())
                    .await
                    .map_err(|d| match d {
                        Denial::TooLarge { description } => Denial::TooLarge {
                            description: format!(
                                "{description}: a written resource is read for conditional \
                                 references (upstream.resolves_conditional_references)"
                            ),
                        },
                        d => d,
                    })?;
                fhir = classify::classify_written_body(fhir, &written)
                    .map_err(|e| classify_denial(&e))?;
            }
        }
        let stage = span.entered();
        if !fhir.condition.is_empty() {
            let searched: Vec<_> = fhir.params.iter().chain(&fhir.condition).cloned().collect();
            ctx.query_names = audit_param_names(&searched);
        }
        if let Some(body) = &body {
            // An empty form carries no parameters: no body at all.
            if is_form && !body.is_empty() {
                let text = std::str::from_utf8(body).map_err(|_| Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: "form body is not UTF-8".into(),
                })?;
                classify::add_form(&mut fhir, &method, &rel, text).map_err(|e| match e {
                    classify::FormError::Malformed(e) => classify_denial(&e),
                    classify::FormError::AccessToken => extract_denial(&ExtractError::TokenInBody),
                    classify::FormError::NotASearch(description) => Denial::BadFhirRequest {
                        code: "fhir_malformed",
                        description,
                    },
                })?;
                ctx.query_names = audit_param_names(&fhir.params);
            } else if !body.is_empty() && !fhir.is_bundle() {
                return Err(Denial::UnsupportedMediaType {
                    description: classify::not_a_form(fhir.interaction, content_type.as_deref()),
                });
            }
            if fhir.is_bundle() {
                fhir = classify::classify_bundle(fhir, body).map_err(|e| classify_denial(&e))?;
            }
        }
        fhir.within_parameter_limit(self.settings.server.max_parameters)
            .map_err(|e| classify_denial(&e))?;
        // The values naming patients, walked once: whose data it reaches
        // for both of its records, and ids the upstream would read as
        // numbers.
        let mut named = Vec::new();
        crate::decide::each_patient_named(&fhir, &self.bases, |id| named.push(id));
        if !self.settings.upstream.allow_zero_padded_ids {
            if let Some(id) = classify::numeric_alias(&fhir, &named) {
                return Err(classify_denial(&ClassifyError::ZeroPaddedId(
                    id.to_string(),
                )));
            }
        }
        ctx.patients = crate::decide::patients_of(&named);
        ctx.fhir = Some(fhir);
        let fhir = ctx.fhir.as_ref().expect("just set");

        drop(stage);

        // 6. Decide: scopes and patient context, the role ceiling, then
        // the policies (which can only narrow the grant); one pure step,
        // the same `fhirwall explain` runs.
        let stage = tracing::debug_span!("decide").entered();
        let rules = self.rules.load_full();
        ctx.rules = Some(rules.clone());
        let now = now_unix();
        // A declared emergency is read only where a policy could use it.
        let break_glass = if rules.policies.rules.is_empty() {
            None
        } else {
            self.break_glass_reason(&rules.break_glass, session, &claims, now)
        };
        let source = ctx.client.as_ref().map(|c| c.ip);
        let cx = crate::authorise::Context {
            claims: &claims,
            source,
            binding: ctx.binding.unwrap_or("bearer"),
            now,
            break_glass: break_glass.as_deref(),
        };
        let applied = crate::authorise::Rules {
            decide: &self.decide_opts,
            roles: rules.roles.as_ref(),
            policies: &rules.policies,
        };
        let granted = crate::authorise::authorise(fhir, &cx, &applied);
        let mut grant = match granted {
            Ok(g) => g,
            Err(Refusal::Scopes {
                reason,
                missing_scope,
            }) => {
                return Err(Denial::InsufficientScope {
                    description: reason,
                    scope: missing_scope,
                })
            }
            Err(Refusal::Roles { reason, .. }) => {
                return Err(Denial::InsufficientScope {
                    description: reason,
                    scope: None,
                })
            }
            Err(Refusal::Policy { rule, reason, .. }) => {
                ctx.policy_rule = Some(rule.clone());
                return Err(Denial::PolicyDenied {
                    rule,
                    description: reason,
                });
            }
            Err(Refusal::Uncheckable(why)) => {
                return Err(Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: why,
                })
            }
        };
        // A later page of this caller's own `$everything` is judged as it.
        // (Only a stored page is looked up: the caller's names are not
        // copied for every request.)
        let stored_page = crate::pages::page_id(fhir).is_some();
        if let Some(patient) = claims.patient.as_deref().filter(|_| stored_page) {
            if self
                .everything_pages
                .made_for(fhir, &Origin::of(&claims, patient))
            {
                if let Some((check, allow)) =
                    crate::authorise::everything_page(fhir, &grant, patient, &cx, &applied)
                {
                    grant.decision.check = Some(check);
                    // Widened by an emergency: audited as one; and counted
                    // against the operation's rate limits.
                    grant.allows.push(allow);
                }
            }
        }
        ctx.policy_rule = grant.rule().map(str::to_string);
        // Recorded, counted and logged once nothing here refuses the
        // request any more (a rate limit, a 413): an emergency access that
        // did not happen is no break-glass access.
        let broke_glass = grant.broke_glass();
        // Rate limits of the matching rules, counted once per request. A
        // token naming no user counts as its client, one naming no client
        // by its source address: never one bucket shared by all such
        // tokens, nor a fresh bucket per token (which a client could mint).
        let nat64 = &self.settings.nat64_prefixes;
        let source = source.map(|ip| crate::client_addr::rate_limit_key(ip, nat64));
        let by_source = || {
            source
                .as_ref()
                .map_or_else(|| "(none)".to_string(), |s| format!("source:{s}"))
        };
        // A client or user is named within its issuer: another issuer's
        // namesake is another caller.
        let iss = &claims.issuer_name;
        let by_client = || {
            claims
                .client_id
                .as_ref()
                .map_or_else(by_source, |c| format!("client:{iss}/{c}"))
        };
        let counted = grant.limits();
        if let Some(description) = crate::authorise::beyond_any_bucket(&counted) {
            return Err(Denial::TooLarge { description });
        }
        let limits: Vec<_> = counted
            .into_iter()
            .map(|(rule, limit, n)| {
                let who = match limit.per.as_str() {
                    "client" => by_client(),
                    "user" => claims
                        .sub
                        .as_ref()
                        .map_or_else(by_client, |s| format!("user:{iss}/{s}")),
                    _ => by_source(),
                };
                (rule, limit, who, n)
            })
            .collect();
        let d = grant.decision;
        drop(stage);
        // Counted against every limit at once: a request one limit
        // refuses spends nothing of the others (a user over its own limit
        // does not empty its client's bucket for the client's other users).
        let asks: Vec<crate::ratelimit::Ask> = limits
            .iter()
            .map(|(rule, limit, who, n)| crate::ratelimit::Ask {
                rule,
                limit,
                who,
                n: *n,
            })
            .collect();
        // Boxed, as the other waits that only some requests make: the
        // pipeline's future stays small for the rest (and requests that no
        // limit counts make no allocation for it).
        let taken = if asks.is_empty() {
            Ok(Ok(()))
        } else {
            Box::pin(self.shared.take_all(&asks)).await
        };
        let taken = taken.map_err(|_| Denial::Unavailable {
            code: "rate_limit_unavailable",
            description: format!(
                "the rate limits of policy rules {} cannot be counted (Redis is \
                 unavailable); retry later",
                limits
                    .iter()
                    .map(|(rule, ..)| rule.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            retry_after_seconds: 1,
        })?;
        if let Err((i, wait)) = taken {
            let (rule, limit, _, n) = &limits[i];
            let entries = if *n > 1 {
                format!(" (this Bundle counts {n})")
            } else {
                String::new()
            };
            return Err(Denial::RateLimited {
                code: "rate_limited",
                description: format!(
                    "rate limit of policy rule {rule}: {} requests per {} s per {}{entries}",
                    limit.requests, limit.per_seconds, limit.per
                ),
                retry_after_seconds: wait.ceil().max(1.0) as u64,
            });
        }
        // A checked answer is fetched by fhirwall, which sends only a body
        // it read: one it did not read (a Parameters body of
        // `POST …/$everything`) would be dropped unseen, so the upstream
        // would run another request than the client's.
        if d.check.is_some() && body.is_none() && declares_body(&session.req_header().headers) {
            // HAPI's client sends `POST …/$everything` with an empty
            // Parameters: read it, and pass that (and only that) on.
            let unread = self.read_body(session, ctx).await?;
            if !classify::is_empty_parameters(&unread) {
                return Err(Denial::BadFhirRequest {
                    code: "fhir_malformed",
                    description: "this request's answer is checked and its body is not read: \
                                  send its parameters in the query (e.g. GET \
                                  …/$everything?_since=…)"
                        .into(),
                });
            }
        }
        if !broke_glass.is_empty() {
            ctx.break_glass_reason = break_glass;
            self.metrics.break_glass();
            tracing::warn!(
                request_id = %ctx.request_id,
                rules = %broke_glass.join(","),
                "break-glass access"
            );
            ctx.broke_glass = broke_glass;
        }
        ctx.scopes_used = d.scopes_used;
        ctx.check = d.check;
        ctx.narrow = d.narrow;
        ctx.entry_checks = d.entry_checks;
        // Proving a write fetches from the upstream: that waits for the
        // decision record (see `request_filter`).
        if d.write.is_some() || !d.entry_writes.is_empty() {
            ctx.proofs = Some(Proofs {
                write: d.write,
                entry_writes: d.entry_writes,
                bundle: body.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Proves the writes a decision left to prove against the upstream's
    /// current versions (under `patient/` scopes).
    async fn prove(&self, session: &mut Session, ctx: &mut Ctx) -> std::result::Result<(), Denial> {
        let Some(p) = ctx.proofs.take() else {
            return Ok(());
        };
        if let Some(w) = &p.write {
            ctx.withhold_error_detail = w.patient.is_some();
            self.prove_write(session, ctx, w).await?;
        }
        if !p.entry_writes.is_empty() {
            ctx.withhold_error_detail |= p.entry_writes.iter().any(|(_, w)| w.patient.is_some());
            // A batch answers each entry: a failed one's outcome is
            // withheld in the checked exchange. (A transaction fails
            // whole, and its answer is withheld as a write's is: it keeps
            // the proxy path, unbounded by the checked answer's size.)
            let batch = ctx
                .fhir
                .as_ref()
                .is_some_and(|f| f.interaction == Interaction::Batch);
            ctx.withheld_entries = p
                .entry_writes
                .iter()
                .filter(|(_, w)| batch && w.patient.is_some())
                .map(|(i, _)| *i)
                .collect();
            self.prove_bundle_writes(session, ctx, &p.bundle, &p.entry_writes)
                .await?;
        }
        Ok(())
    }
}

/// Names of the query parameters as the audit records them: each once,
/// at most 64; a name that does not look like a FHIR parameter name (which
/// could carry anything), or that was given no value, is recorded as `?`.
fn audit_param_names(params: &[(String, String)]) -> Vec<String> {
    audit_names(params.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Parameter names a record lists for all of a Bundle's entries together.
const MAX_ENTRY_PARAM_NAMES: usize = 256;

/// `names`, as many as `left` allows (taken from it): when some do not fit,
/// the last one kept is `…` (more were there).
fn within_budget<'a>(mut names: Vec<&'a str>, left: &mut usize) -> Vec<&'a str> {
    if names.len() > *left {
        names.truncate(left.saturating_sub(1));
        names.push("…");
    }
    *left = left.saturating_sub(names.len());
    names
}

/// Parameter names (with their values) as the audit shows them: once
/// each, at most 64, and as `?` a name that does not look like a FHIR one
/// (it could carry a value or a secret) or that has no value (a word
/// without `=`, `?Smith`, is a value typed where a name goes).
fn audit_names<'a>(params: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for (name, value) in params {
        let looks_fhir = !name.is_empty()
            && !value.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        let n = if looks_fhir { name } else { "?" };
        if out.len() < 64 && !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The pipeline stage a reason code comes from.
fn stage_of(reason: &str) -> &'static str {
    match reason {
        "allowed" | "insufficient_scope" => "decide",
        "public" | "not_found" | "bad_path" | "method_not_allowed" => "route",
        "no_token" | "token_too_long" | "credentials_refused" => "extract",
        "policy_denied" | "rate_limited" | "rate_limit_unavailable" => "policy",
        "outside_compartment"
        | "outside_scope_filter"
        | "shared_with_other_patient"
        | "upstream_not_found"
        | "upstream_answer_unchecked"
        | "upstream_answer_too_large" => "check",
        "fhir_malformed"
        | "body_too_large"
        | "unsupported_media_type"
        | "body_timeout"
        | "body_budget_exhausted" => "classify",
        "answer_budget_exhausted" => "check",
        "precondition_failed" => "check",
        "audit_unavailable" => "audit",
        r if r == "client_closed" || r.starts_with("upstream_") => "proxy",
        r if r.starts_with("dpop_")
            || r.starts_with("mtls_")
            || matches!(r, "binding_required" | "token_binding_unsupported") =>
        {
            "bind"
        }
        _ => "validate",
    }
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Ctx {
    /// The decision, reason code and detail a request ended with.
    fn outcome(&self) -> (&'static str, &'static str, Option<String>) {
        match &self.denial {
            Some(d @ Denial::Upstream { .. }) => ("error", d.code(), Some(d.description())),
            Some(d @ Denial::Unavailable { .. }) => ("error", d.code(), Some(d.description())),
            // Allowed, and the upstream did not have it.
            Some(
                d @ Denial::Hidden {
                    why: "upstream_not_found",
                    ..
                },
            ) => ("allow", d.code(), None),
            Some(
                d @ Denial::Hidden {
                    resource,
                    why: "upstream_answer_too_large",
                },
            ) => (
                "error",
                d.code(),
                Some(format!(
                    "{resource}: the upstream's answer is larger than \
                     upstream.max_checked_answer_bytes, so whether it is in the grant could \
                     not be checked; answered 404, as another patient's would be"
                )),
            ),
            Some(d @ Denial::Hidden { resource, why }) => (
                "deny",
                d.code(),
                Some(if *why == "outside_scope_filter" {
                    format!("{resource} matches none of the token's scope filters; answered 404")
                } else {
                    format!("{resource} is outside the compartment of the token's patient; answered 404")
                }),
            ),
            Some(d) => ("deny", d.code(), Some(d.description())),
            None if self.public => ("allow", "public", None),
            None if self.left_out > 0 || self.too_large_entries > 0 => {
                let mut detail = Vec::new();
                if self.left_out > 0 {
                    detail.push(format!(
                        "{} included resources outside the grant left out of the answer",
                        self.left_out
                    ));
                }
                if self.too_large_entries > 0 {
                    let bundle = self.fhir.as_ref().is_some_and(|f| !f.entries.is_empty());
                    detail.push(if bundle {
                        format!(
                            "{} entries too large for what upstream.max_checked_answer_bytes \
                             leaves, their answers withheld unjudged",
                            self.too_large_entries
                        )
                    } else if self.warned_short {
                        format!(
                            "{} entries left out unjudged, too large for what \
                             upstream.max_checked_answer_bytes leaves; the answer ends with a \
                             warning saying so",
                            self.too_large_entries
                        )
                    } else {
                        format!(
                            "{} entries left out unjudged, too large for what \
                             upstream.max_checked_answer_bytes leaves",
                            self.too_large_entries
                        )
                    });
                }
                ("allow", "allowed", Some(detail.join("; ")))
            }
            None => ("allow", "allowed", None),
        }
    }
}

/// The most of a request's method recorded and logged: a method is any
/// token, as long as the request head allows (1 MiB), and a client without
/// a token must not fill the audit with it.
const MAX_METHOD_RECORDED: usize = 32;

impl Gateway {
    /// The audit record of a request: its decision record (written before
    /// it goes upstream) or its request record (when it ends).
    fn record<'a>(&self, session: &'a Session, ctx: &'a Ctx, event: Event) -> Record<'a> {
        let req = session.req_header();
        let done = event == Event::Request;
        let status = final_response(session).map(|r| r.status.as_u16());
        Record {
            method: crate::audit::capped(req.method.as_str(), MAX_METHOD_RECORDED),
            // As early_request_filter keeps it (`audit::recorded_path`).
            path: &ctx.path,
            status: done.then(|| status.unwrap_or(0)),
            request_bytes: done.then(|| session.body_bytes_read() as u64),
            response_bytes: done.then(|| session.body_bytes_sent() as u64),
            ..ctx.record(event)
        }
    }
}

impl Ctx {
    /// The audit record of what this context knows (all but what only the
    /// session knows: method, path, status, bytes).
    fn record(&self, event: Event) -> Record<'_> {
        let (decision, reason, detail) = self.outcome();
        let claims = self.token.as_ref().map(|t| &t.claims);
        let fhir = self.fhir.as_ref();
        Record {
            event,
            id: match event {
                Event::Request => self.record_id.clone(),
                Event::Decision => format!("{}-d", self.record_id),
            },
            time: rfc3339(self.time),
            request_id: &self.request_id,
            request_id_from_client: self.request_id_from_client,
            source: self.client.as_ref().map(|c| c.ip.to_string()),
            method: self.method.as_ref().map_or("", |m| {
                crate::audit::capped(m.as_str(), MAX_METHOD_RECORDED)
            }),
            path: &self.path,
            query_params: &self.query_names,
            narrowed_with: self.narrow.iter().map(|(n, _)| n.as_str()).collect(),
            issuer: claims.map(|c| c.issuer_name.as_str()),
            client_id: claims.and_then(|c| c.client_id.as_deref()),
            sub: claims.and_then(|c| c.sub.as_deref()),
            fhir_user: claims.and_then(|c| c.fhir_user.as_deref()),
            patient: claims.and_then(|c| c.patient.as_deref()),
            patients: &self.patients,
            token_sha256: self
                .token
                .as_ref()
                .map(|t| t.hash)
                .or(self.refused_token_hash)
                .map(|h| hex(&h)),
            token_kind: self.token.as_ref().map(|t| t.kind),
            token_cache_hit: self.token.as_ref().map(|t| t.cache_hit),
            binding: self.binding,
            scopes_used: &self.scopes_used,
            interaction: fhir.map(|f| f.interaction.as_str()),
            resource_type: fhir.and_then(|f| f.resource_type.as_deref()),
            resource_id: fhir.and_then(|f| f.id.as_deref()),
            operation: fhir.and_then(|f| f.operation.as_ref().map(|(n, _)| n.as_str())),
            entries: fhir.map_or_else(Vec::new, |f| {
                // A record is bounded: the entries' parameter names count
                // against one budget (a Bundle of 1000 entries each naming
                // 64 long parameters would otherwise make a record of
                // megabytes, more than an audit endpoint takes).
                let mut names_left = MAX_ENTRY_PARAM_NAMES;
                f.entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| crate::audit::EntryRecord {
                        interaction: e.interaction.as_str(),
                        resource_type: e.resource_type.as_deref(),
                        resource_id: e.id.as_deref(),
                        operation: e.operation.as_ref().map(|(n, _)| n.as_str()),
                        params: within_budget(
                            audit_names(
                                e.params
                                    .iter()
                                    .chain(&e.condition)
                                    .map(|(n, v)| (n.as_str(), v.as_str())),
                            ),
                            &mut names_left,
                        ),
                        status: self.entry_statuses.get(i).copied().flatten(),
                        withheld: self.entry_withheld.get(i).copied().unwrap_or(false),
                    })
                    .collect()
            }),
            decision,
            reason,
            stage: if self.policy_rule.is_some() && decision == "allow" {
                "policy"
            } else {
                stage_of(reason)
            },
            policy_rule: self.policy_rule.as_deref(),
            detail: detail.map(|d| crate::audit::scrub(&d)),
            break_glass_rules: &self.broke_glass,
            break_glass_reason: self.break_glass_reason.as_deref(),
            status: None,
            upstream_status: self.upstream_status,
            request_bytes: None,
            response_bytes: None,
            latency_ms: millis(self.started.elapsed()),
            upstream_ms: self.upstream_time.map(millis),
            validation_ms: self.validation.map(millis),
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context inside its per-request futures
    /// (several times over, one copy per stage that owns it) and moves them
    /// about; a pointer moves for free where the whole context (well over a
    /// KiB) would be copied each time.
    type CTX = Box<Ctx>;

    /// Pingora's own line for a failed request prints the error whole,
    /// and for an upstream answer it could not parse its context is the
    /// raw bytes read (headers fhirwall strips, body bytes): fhirwall
    /// logs the failure itself, without the context.
    fn suppress_error_log(&self, session: &Session, ctx: &Self::CTX, e: &pingora::Error) -> bool {
        let summary = self.request_summary(session, ctx);
        let (kind, source, cause) = (e.etype().as_str(), e.esource().as_str(), error_cause(e));
        if e.esource() == &pingora::ErrorSource::Downstream {
            tracing::warn!(error = kind, source, cause, request = %summary, "fail to proxy");
        } else {
            tracing::error!(error = kind, source, cause, request = %summary, "fail to proxy");
        }
        true
    }

    fn suppress_proxy_warn_log(
        &self,
        session: &Session,
        ctx: &Self::CTX,
        e: &pingora::Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        tracing::warn!(
            error = e.etype().as_str(),
            source = e.esource().as_str(),
            cause = error_cause(e),
            request = %self.request_summary(session, ctx),
            "fail to proxy; retrying"
        );
        true
    }

    /// What error log lines say about a request: method, path (capped)
    /// and request id — never the query, whose values may be PHI
    /// (Pingora's default prints the whole request line).
    fn request_summary(&self, session: &Session, ctx: &Self::CTX) -> String {
        let req = session.req_header();
        format!(
            "{} {}{} request_id={}",
            crate::audit::capped(req.method.as_str(), MAX_METHOD_RECORDED),
            crate::audit::capped(req.uri.path(), 200),
            if req.uri.query().is_some() {
                "?…"
            } else {
                ""
            },
            ctx.request_id
        )
    }

    fn new_ctx(&self) -> Self::CTX {
        Box::new(Ctx {
            started: Instant::now(),
            time: SystemTime::now(),
            request_id: String::new(),
            request_id_from_client: false,
            rel_path: None,
            fhir: None,
            token: None,
            scopes_used: Vec::new(),
            check: None,
            narrow: Vec::new(),
            if_match: None,
            entry_checks: Vec::new(),
            binding: None,
            dpop_scheme: false,
            broke_glass: Vec::new(),
            break_glass_reason: None,
            rules: None,
            policy_rule: None,
            denial: None,
            public: false,
            upstream_status: None,
            query_names: Vec::new(),
            record_id: crate::audit::new_id(),
            proofs: None,
            refused_token_hash: None,
            method: None,
            path: String::new(),
            client: None,
            connection: Vec::new(),
            body: None,
            answer_buf: None,
            answer_permit: None,
            entry_statuses: Vec::new(),
            entry_withheld: Vec::new(),
            left_out: 0,
            patients: Vec::new(),
            too_large_entries: 0,
            warned_short: false,
            withhold_error_detail: false,
            replaced_body: None,
            withheld_entries: Vec::new(),
            answered: None,
            body_rewritten: false,
            body_permit: None,
            audit: Some((self.audit.clone(), self.metrics.clone())),
            _in_flight: self.lifecycle.enter(),
            validation: None,
            upstream_started: None,
            upstream_time: None,
            upstream_addrs: None,
            connect_attempt: 0,
        })
    }

    /// The path a record keeps is known from the first (Pingora runs this
    /// before anything that may end the request, `logging` included): a
    /// request dropped before `request_filter` is recorded with it.
    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        ctx.path = crate::audit::recorded_path(session.req_header().uri.path());
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        if self.lifecycle.closing_connections() {
            // Shutting down: this answer closes its connection (Pingora
            // says `Connection: close`), so the client's next request opens
            // a new one, which a load balancer sends to another replica.
            session.set_keepalive(None);
        }
        ctx.method = Some(session.req_header().method.clone());
        ctx.connection = proxy_headers::connection_tokens(
            session
                .req_header()
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .map(|v| v.as_bytes()),
        );
        ctx.client = session.client_addr().and_then(|a| a.as_inet()).map(|a| {
            crate::client_addr::resolve(
                a.ip(),
                session
                    .req_header()
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .map(|v| v.as_bytes()),
                &self.settings.trusted_proxies,
            )
        });
        let theirs = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v));
        ctx.request_id_from_client = theirs.is_some();
        // fhirwall's own id is the request record's: the same either way
        // when the client chose none.
        ctx.request_id = theirs.map_or_else(|| ctx.record_id.clone(), str::to_string);
        let span = tracing::debug_span!("request", request_id = %ctx.request_id);
        let mut admitted = self.admit(session, ctx).instrument(span.clone()).await;
        // Nothing goes upstream — not even fhirwall's own fetches to prove
        // a write — before the decision is on record.
        if admitted.is_ok() && self.audit.records_before_upstream() {
            let record = self.record(session, ctx, Event::Decision);
            admitted = self
                .audit
                .commit_decision(&record)
                .instrument(tracing::debug_span!(parent: &span, "audit"))
                .await
                .map_err(audit_denial);
        } else if admitted.is_ok() && !self.audit.ready() {
            // Only a request record follows: while it could not be
            // written, nothing is served (`on_failure: refuse`; with a
            // spill file the audit is ready while the spill file works).
            admitted = Err(audit_denial(crate::audit::Refusal::SinkFailed));
        }
        // Writes to prove are few: their wait is boxed (as the checked
        // and relayed exchanges' and a refusal's), so every other request
        // carries and copies a small future.
        if admitted.is_ok() && ctx.proofs.is_some() {
            admitted = Box::pin(
                self.prove(session, ctx)
                    .instrument(tracing::debug_span!(parent: &span, "prove_write")),
            )
            .await;
        }
        match admitted {
            Ok(())
                if ctx.check.is_some()
                    || !ctx.entry_checks.is_empty()
                    || !ctx.withheld_entries.is_empty() =>
            {
                Box::pin(
                    self.checked_exchange(session, ctx)
                        .instrument(tracing::debug_span!(parent: &span, "check")),
                )
                .await?;
                Ok(true)
            }
            Ok(()) if Self::relayed(session, ctx) => {
                Box::pin(
                    self.relay_exchange(session, ctx)
                        .instrument(tracing::debug_span!(parent: &span, "relay")),
                )
                .await?;
                Ok(true)
            }
            Ok(()) => Ok(false),
            Err(denial) => Box::pin(self.refuse(session, ctx, denial))
                .await
                .map(|_| true),
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let u = &self.settings.upstream;
        let (addrs, start) = ctx
            .upstream_addrs
            .get_or_insert_with(|| self.upstream_addrs.get())
            .clone();
        let addr = crate::resolve::nth(&addrs, start, ctx.connect_attempt).ok_or_else(|| {
            pingora::Error::explain(ErrorType::ConnectNoRoute, "the upstream has no address")
        })?;
        let mut peer = HttpPeer::new(addr, u.tls, u.sni.clone());
        peer.options.connection_timeout = Some(u.connect_timeout);
        peer.options.total_connection_timeout = Some(u.connect_timeout * 2);
        peer.options.read_timeout = Some(u.read_timeout);
        peer.options.write_timeout = Some(u.write_timeout);
        peer.options.idle_timeout = Some(u.idle_timeout);
        peer.options.verify_cert = u.verify_tls;
        peer.options.verify_hostname = u.verify_tls;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let u = &self.settings.upstream;
        // Path: the normalised path we classified, mapped below the upstream base.
        let rel = ctx.rel_path.as_deref().unwrap_or("");
        let mut path = u.base_path.clone();
        if !rel.is_empty() {
            path.push('/');
            path.push_str(rel);
        }
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = session.req_header().uri.query() {
            path.push('?');
            path.push_str(q);
        }
        let uri: http::Uri = path.parse().map_err(|_| {
            pingora::Error::explain(
                ErrorType::InternalError,
                "mapped upstream path is not a valid URI",
            )
        })?;
        up.set_uri(uri);

        // Headers: strip what the client may not assert, then set ours.
        // Read by fhirwall (or empty): it goes at once, nothing to wait for.
        let body_in_hand = session.is_body_done();
        let (remove, set) = self.header_plan(&up.headers, ctx, body_in_hand);
        for name in remove {
            up.remove_header(&name);
        }
        for (name, value) in set {
            up.insert_header(name, value)?;
        }
        up.insert_header(header::HOST, self.host_header.clone())?;
        ctx.upstream_started = Some(Instant::now());
        // The version that was checked: the write lands on it or fails.
        if let Some(v) = &ctx.if_match {
            up.insert_header(header::IF_MATCH, v.clone())?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // No request fhirwall sends asks to switch protocols (a client's
        // `Upgrade` is not forwarded): an upstream that does would have
        // the rest of the connection pass between client and upstream
        // unseen. A failure (502).
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(pingora::Error::create(
                ErrorType::Custom("upstream switched protocols unasked"),
                pingora::ErrorSource::Upstream,
                None,
                None,
            ));
        }
        // An interim answer (100 Continue to a body fhirwall streams) is
        // passed on as it is: it is not the upstream's answer.
        if resp.status.is_informational() {
            // (103 Early Hints may carry headers: not these.)
            drop_upstream_private(resp);
            self.move_links(resp)?;
            return Ok(());
        }
        ctx.upstream_status = Some(resp.status.as_u16());
        ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
        // (A body-less answer holds no details, and would give the body
        // filter no call to write fhirwall's.)
        let bodiless = |h: &ResponseHeader| {
            !h.headers.contains_key(header::TRANSFER_ENCODING)
                && h.headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n == 0)
        };
        if let Some(outcome) = withheld_error(ctx, resp.status.as_u16()) {
            if !bodiless(resp) {
                replace_body_headers(resp, outcome.len())?;
                ctx.replaced_body = Some(outcome);
            }
        }
        self.start_collecting(ctx, resp.status.as_u16(), &resp.headers);
        self.stamp(resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.replaced_body.is_some() {
            // The upstream's bytes go nowhere; fhirwall's once.
            *body = ctx.replaced_body.as_mut().map(std::mem::take);
            return Ok(None);
        }
        self.collect_answer(ctx, body.as_ref(), end_of_stream);
        Ok(None)
    }

    /// A connection that could not be made sent nothing: the next of the
    /// upstream's addresses may take the request (a bounded few), and
    /// later requests start there. Not after a failure reported as TLS's:
    /// every address would present the same certificate. (A handshake
    /// that stalls counts as a connect timeout, and is retried.)
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        let reachability = matches!(
            e.etype(),
            ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectTimedout
                | ErrorType::ConnectError
        );
        let Some((addrs, start)) = &ctx.upstream_addrs else {
            return e;
        };
        if reachability {
            self.upstream_addrs.failed(*start, ctx.connect_attempt);
            if crate::resolve::may_retry(addrs.len(), ctx.connect_attempt) {
                ctx.connect_attempt += 1;
                e.set_retry(true);
            }
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let downstream = e.esource() == &pingora::ErrorSource::Downstream;
        let denial = match e.etype() {
            // The client's own connection failing is no upstream error.
            _ if downstream => None,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Some(Denial::Upstream {
                    status: 504,
                    code: "upstream_timeout",
                    description: format!(
                        "upstream did not answer in time ({})",
                        e.etype().as_str()
                    ),
                })
            }
            ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure => Some(Denial::Upstream {
                status: 502,
                code: "upstream_unreachable",
                description: format!("upstream could not be reached ({})", e.etype().as_str()),
            }),
            _ => match e.esource() {
                pingora::ErrorSource::Upstream => Some(Denial::Upstream {
                    status: 502,
                    code: "upstream_error",
                    description: format!("upstream failed ({})", e.etype().as_str()),
                }),
                _ => Some(Denial::Upstream {
                    status: 502,
                    code: "upstream_error",
                    description: format!("proxy error ({})", e.etype().as_str()),
                }),
            },
        };
        let code = match &denial {
            Some(d) if final_response(session).is_none() => {
                // Pingora drops the connection after this answer (it is
                // not reused below): said so, or a client sending its next
                // request on it meets a closed connection.
                session.set_keepalive(None);
                let _ = self.answer(session, ctx, d).await;
                d.status()
            }
            Some(d) => d.status(),
            None => 0,
        };
        // An attempt that failed upstream (a timeout above all) took this
        // long: its record and the upstream histogram show it.
        if !downstream && ctx.upstream_time.is_none() {
            ctx.upstream_time = ctx.upstream_started.map(|t| t.elapsed());
        }
        // A denial already decided (the client hung up on it) stays what
        // it was: a refusal must not be recorded as a client error.
        ctx.denial = ctx.denial.take().or(denial).or(Some(Denial::Upstream {
            status: 499,
            code: "client_closed",
            description: format!("client connection failed ({})", e.etype().as_str()),
        }));
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(
        &self,
        session: &mut Session,
        _e: Option<&pingora::Error>,
        ctx: &mut Self::CTX,
    ) {
        // Pingora may end a body without a last piece marked as such: a
        // collected answer is read here (cut short, it reads as nothing).
        self.collect_answer(ctx, None, true);
        // Written from here on, even if this task is dropped while it
        // waits for room in the queue (`AuditLog::record`): no longer the
        // context's to write as abandoned (which made two records, and
        // counted the request twice).
        ctx.audit = None;
        let record = self.record(session, ctx, Event::Request);
        let interaction = ctx.fhir.as_ref().map(|f| f.interaction);
        let seconds = ctx.started.elapsed().as_secs_f64();
        let m = &self.metrics;
        m.request(record.decision, interaction, record.reason, seconds);
        m.resource(record.resource_type, record.decision);
        if let Some(t) = ctx.upstream_time {
            m.upstream_duration.observe(t.as_secs_f64());
        }
        self.audit.record(&record).await;
    }
}

#[cfg(test)]
mod tests {
    /// A Bundle's entries share one budget of parameter names in a
    /// record; an entry cut short ends with `…`.
    #[test]
    fn entry_parameter_names_share_a_budget() {
        use super::within_budget;
        let mut left = 5;
        assert_eq!(within_budget(vec!["a", "b"], &mut left), ["a", "b"]);
        assert_eq!(
            within_budget(vec!["c", "d", "e", "f"], &mut left),
            ["c", "d", "…"]
        );
        assert_eq!(left, 0);
        assert_eq!(within_budget(vec!["g"], &mut left), ["…"]);
        assert!(within_budget(vec![], &mut left).is_empty());
    }

    /// What lets a shared cache keep an answer given for a token goes;
    /// what any cache must do stays.
    #[test]
    fn cache_control_made_private_keeps_the_rest() {
        use super::{private_cache_control, shared_cacheable};
        for (upstream, shared, private) in [
            (&["public, max-age=600"][..], true, "private, max-age=600"),
            (
                &["no-cache, no-store, max-age=0, must-revalidate"][..],
                true,
                "private, no-cache, no-store, max-age=0, must-revalidate",
            ),
            (
                &["s-maxage=60", "max-age=5"][..],
                true,
                "private, max-age=5",
            ),
            (&["Public"][..], true, "private"),
            (&["max-age=60"][..], false, ""),
            (&["no-store"][..], false, ""),
        ] {
            let values = || upstream.iter().map(|v| v.as_bytes());
            assert_eq!(values().any(shared_cacheable), shared, "{upstream:?}");
            if shared {
                assert_eq!(private_cache_control(values()), private, "{upstream:?}");
            }
        }
    }

    /// Only token and key reasons fall to `validate`: a reason added
    /// without its stage would be recorded at the wrong one.
    #[test]
    fn every_reason_has_its_stage() {
        for r in crate::metrics::REASONS {
            let validating = matches!(
                *r,
                "keys_unavailable"
                    | "introspection_unavailable"
                    | "introspection_throttled"
                    | "abandoned"
                    | "other"
            ) || r.starts_with("token_")
                && !matches!(*r, "token_too_long" | "token_binding_unsupported");
            assert_eq!(super::stage_of(r) == "validate", validating, "{r}");
        }
    }
}
