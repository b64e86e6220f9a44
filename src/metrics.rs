//! Prometheus metrics (stage 9, record). Names carry the `fhirwall_` prefix
//! and base units; labels have bounded cardinality only (decision,
//! interaction, reason code, configured issuer name) and every label value
//! is registered at start-up.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::fhir::classify::Interaction;

/// Decisions, as labels.
pub const DECISIONS: &[&str] = &["allow", "deny", "error"];

pub const TOKEN_KINDS: &[&str] = &["jwt", "opaque"];

pub const BINDINGS: &[&str] = &["bearer", "dpop", "mtls"];

/// Reason codes a request can end with, as labels.
pub const REASONS: &[&str] = &[
    "allowed",
    "public",
    "no_token",
    "token_too_long",
    "token_malformed",
    "token_alg_not_allowed",
    "token_header_refused",
    "token_unknown_issuer",
    "token_unknown_key",
    "token_bad_signature",
    "token_bad_claims",
    "token_expired",
    "token_not_yet_valid",
    "token_wrong_audience",
    "token_binding_unsupported",
    "dpop_malformed",
    "dpop_bad_typ",
    "dpop_alg_not_allowed",
    "dpop_bad_jwk",
    "dpop_bad_signature",
    "dpop_bad_claim",
    "dpop_wrong_htm",
    "dpop_wrong_htu",
    "dpop_stale",
    "dpop_future",
    "dpop_wrong_ath",
    "dpop_wrong_key",
    "dpop_replayed",
    "dpop_nonce_required",
    "dpop_missing",
    "dpop_token_not_bound",
    "dpop_bound_as_bearer",
    "dpop_proof_without_binding",
    "dpop_replay_cache_full",
    "binding_required",
    "mtls_no_certificate",
    "mtls_wrong_certificate",
    "keys_unavailable",
    "token_inactive",
    "introspection_unavailable",
    "credentials_refused",
    "insufficient_scope",
    "policy_denied",
    "rate_limited",
    "not_found",
    "outside_compartment",
    "outside_scope_filter",
    "upstream_not_found",
    "bad_path",
    "fhir_malformed",
    "method_not_allowed",
    "body_too_large",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_error",
    "upstream_answer_unchecked",
    "upstream_answer_too_large",
];

/// The registry and the handles the request path uses.
pub struct Metrics {
    pub registry: Registry,
    jwks_fetches: IntCounterVec,
    pub token_cache_hits: IntCounter,
    pub token_cache_misses: IntCounter,
    pub token_cache_entries: IntGauge,
    introspections: IntCounterVec,
    introspection_duration: HistogramVec,
    break_glass: IntCounter,
    reloads: IntCounterVec,
    /// `[kind: jwt, opaque][binding: bearer, dpop, mtls]`.
    bindings_by: Vec<Vec<IntCounter>>,
    /// Handles resolved at start-up, so the request path never hashes labels:
    /// `[decision][0 = none, 1.. = Interaction::ALL]`.
    requests_by: Vec<Vec<IntCounter>>,
    /// Aligned with [`REASONS`].
    outcomes_by: Vec<IntCounter>,
    /// Aligned with [`DECISIONS`].
    duration_by: Vec<Histogram>,
}

impl Metrics {
    /// Registers every metric and pre-creates every label combination.
    pub fn new(issuers: &[String]) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "fhirwall_requests_total",
                "Requests by decision and FHIR interaction",
            ),
            &["decision", "interaction"],
        )
        .expect("valid metric");
        let denials = IntCounterVec::new(
            Opts::new(
                "fhirwall_request_outcomes_total",
                "Requests by the reason code they ended with",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "fhirwall_request_duration_seconds",
                "Time from request to response, by decision",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["decision"],
        )
        .expect("valid metric");
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "fhirwall_jwks_fetches_total",
                "JWKS fetches by issuer and result",
            ),
            &["issuer", "result"],
        )
        .expect("valid metric");
        let token_cache_hits = IntCounter::new(
            "fhirwall_token_cache_hits_total",
            "Verified-token cache hits",
        )
        .expect("valid metric");
        let token_cache_misses = IntCounter::new(
            "fhirwall_token_cache_misses_total",
            "Verified-token cache misses",
        )
        .expect("valid metric");
        let introspections = IntCounterVec::new(
            Opts::new(
                "fhirwall_introspections_total",
                "Token introspection calls by issuer and result",
            ),
            &["issuer", "result"],
        )
        .expect("valid metric");
        let introspection_duration = HistogramVec::new(
            HistogramOpts::new(
                "fhirwall_introspection_duration_seconds",
                "Time of token introspection calls, by issuer",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["issuer"],
        )
        .expect("valid metric");
        let bindings = IntCounterVec::new(
            Opts::new(
                "fhirwall_token_bindings_total",
                "Requests whose token passed the bind stage, by token kind and binding",
            ),
            &["kind", "binding"],
        )
        .expect("valid metric");
        let bindings_by = TOKEN_KINDS
            .iter()
            .map(|k| {
                BINDINGS
                    .iter()
                    .map(|b| bindings.with_label_values(&[k, b]))
                    .collect()
            })
            .collect();
        let break_glass = IntCounter::new(
            "fhirwall_break_glass_total",
            "Requests that passed a policy rule by break-glass",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "fhirwall_reloads_total",
                "Reloads of policies, roles and break-glass on SIGHUP, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in ["success", "failure"] {
            reloads.with_label_values(&[r]);
        }
        let token_cache_entries = IntGauge::new(
            "fhirwall_token_cache_entries",
            "Entries in the verified-token cache",
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(denials.clone()),
            Box::new(duration.clone()),
            Box::new(jwks_fetches.clone()),
            Box::new(token_cache_hits.clone()),
            Box::new(token_cache_misses.clone()),
            Box::new(token_cache_entries.clone()),
            Box::new(introspections.clone()),
            Box::new(bindings.clone()),
            Box::new(break_glass.clone()),
            Box::new(reloads.clone()),
            Box::new(introspection_duration.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        let duration_by = DECISIONS
            .iter()
            .map(|d| duration.with_label_values(&[d]))
            .collect();
        let requests_by = DECISIONS
            .iter()
            .map(|d| {
                std::iter::once("none")
                    .chain(Interaction::ALL.iter().map(|i| i.as_str()))
                    .map(|i| requests.with_label_values(&[d, i]))
                    .collect()
            })
            .collect();
        let outcomes_by = REASONS
            .iter()
            .map(|r| denials.with_label_values(&[r]))
            .collect();
        for i in issuers {
            for r in ["success", "failure"] {
                jwks_fetches.with_label_values(&[i, r]);
                introspections.with_label_values(&[i, r]);
            }
            introspection_duration.with_label_values(&[i]);
        }
        Metrics {
            registry,
            jwks_fetches,
            token_cache_hits,
            token_cache_misses,
            token_cache_entries,
            introspections,
            introspection_duration,
            bindings_by,
            break_glass,
            reloads,
            requests_by,
            outcomes_by,
            duration_by,
        }
    }

    /// Counts one finished request.
    pub fn request(
        &self,
        decision: &str,
        interaction: Option<Interaction>,
        reason: &str,
        seconds: f64,
    ) {
        let d = DECISIONS.iter().position(|x| *x == decision).unwrap_or(2);
        let i = interaction
            .and_then(|i| Interaction::ALL.iter().position(|x| *x == i))
            .map_or(0, |p| p + 1);
        self.requests_by[d][i].inc();
        let r = REASONS
            .iter()
            .position(|x| *x == reason)
            .or_else(|| REASONS.iter().position(|x| *x == "upstream_error"))
            .expect("upstream_error is a reason");
        self.outcomes_by[r].inc();
        self.duration_by[d].observe(seconds);
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    pub fn break_glass(&self) {
        self.break_glass.inc();
    }

    /// A token that passed the bind stage.
    pub fn binding(&self, kind: &str, binding: &str) {
        let k = TOKEN_KINDS.iter().position(|x| *x == kind);
        let b = BINDINGS.iter().position(|x| *x == binding);
        if let (Some(k), Some(b)) = (k, b) {
            self.bindings_by[k][b].inc();
        }
    }

    pub fn introspection(&self, issuer: &str, ok: bool, seconds: f64) {
        self.introspections
            .with_label_values(&[issuer, if ok { "success" } else { "failure" }])
            .inc();
        self.introspection_duration
            .with_label_values(&[issuer])
            .observe(seconds);
    }

    pub fn jwks_fetch(&self, issuer: &str, ok: bool) {
        self.jwks_fetches
            .with_label_values(&[issuer, if ok { "success" } else { "failure" }])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}
