//! Prometheus metrics (stage 9, record). Names carry the `fhirwall_` prefix
//! and base units; labels have bounded cardinality only (decision,
//! interaction, reason code, configured issuer name) and every label value
//! is registered at start-up.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::fhir::classify::Interaction;

/// Decisions, as labels.
pub const DECISIONS: &[&str] = &["allow", "deny", "error"];

pub const TOKEN_KINDS: &[&str] = &["jwt", "opaque"];

pub const BINDINGS: &[&str] = &["bearer", "dpop", "mtls", "dpop+mtls"];

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
    "dpop_too_large",
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
    "dpop_replay_check_unavailable",
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
    "dpop_quota_exceeded",
    "introspection_throttled",
    "not_found",
    "outside_compartment",
    "outside_scope_filter",
    "shared_with_other_patient",
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
    "audit_unavailable",
    "client_closed",
    "abandoned",
    "unsupported_media_type",
    "body_timeout",
    "body_budget_exhausted",
    "answer_budget_exhausted",
    "precondition_failed",
    "rate_limit_unavailable",
    // A code missing above (a bug): counted apart, never as another.
    "other",
];

/// The audit writer's metrics, shared with its thread.
#[derive(Clone)]
pub struct AuditMetrics {
    pub written_primary: IntCounter,
    pub written_spill: IntCounter,
    pub failures_primary: IntCounter,
    pub failures_spill: IntCounter,
    pub dropped: IntCounter,
    pub refused: IntCounter,
    pub sink_up: IntGauge,
    pub rotations: IntCounter,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
}

/// Metrics of the Redis shared state, registered only when Redis is
/// configured.
#[derive(Clone)]
pub struct RedisMetrics {
    pub up: IntGauge,
    commands: IntCounterVec,
    pub duration: Histogram,
    pub fallbacks: IntCounter,
}

impl RedisMetrics {
    /// Counts a command by outcome: `ok`, `error` or `timeout`.
    pub fn commands(&self, outcome: &str) {
        self.commands.with_label_values(&[outcome]).inc();
    }
}

/// Why a client certificate was refused, as `fhirwall_tls_client_certificates_refused_total` says.
pub const TLS_CERT_REASONS: &[&str] = &[
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "revoked",
    "wrong_purpose",
    "bad_signature",
    "other",
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
    /// 1 while a reloaded file holds changes only a restart applies.
    pub restart_pending: IntGauge,
    /// `[kind: jwt, opaque][binding: bearer, dpop, mtls]`.
    bindings_by: Vec<Vec<IntCounter>>,
    /// Handles resolved at start-up, so the request path never hashes labels:
    /// `[decision][0 = none, 1.. = Interaction::ALL]`.
    requests_by: Vec<Vec<IntCounter>>,
    /// Aligned with [`REASONS`].
    outcomes_by: Vec<IntCounter>,
    /// Aligned with [`DECISIONS`].
    duration_by: Vec<Histogram>,
    /// `[resource type (RESOURCE_TYPES order)][decision]`.
    resource_by: Vec<Vec<IntCounter>>,
    pub upstream_duration: Histogram,
    /// Aligned with [`TOKEN_KINDS`].
    validation_by: Vec<Histogram>,
    jwks_keys: IntGaugeVec,
    jwks_last_success: GaugeVec,
    jwks_age: GaugeVec,
    issuers: Vec<String>,
    dpop_replays: IntCounter,
    rate_limited: IntCounter,
    tls_client_certs_refused: IntCounterVec,
    pub ready: IntGauge,
    pub in_flight: IntGauge,
    pub audit: AuditMetrics,
}

/// Makes metrics and registers each as it is made, so a metric is named in
/// one place only.
struct Maker(Registry);

impl Maker {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("unique metric names");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn float_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets);
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}

impl Metrics {
    /// Counts a client certificate the handshake refused, by why.
    pub fn tls_client_cert_refused(&self, e: &rustls::Error) {
        use rustls::CertificateError as C;
        let reason = match e {
            rustls::Error::InvalidCertificate(c) => match c {
                C::Expired | C::ExpiredContext { .. } => "expired",
                C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
                C::UnknownIssuer => "unknown_issuer",
                C::Revoked => "revoked",
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => "wrong_purpose",
                C::BadSignature | C::UnsupportedSignatureAlgorithmContext { .. } => "bad_signature",
                _ => "other",
            },
            _ => "other",
        };
        self.tls_client_certs_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Registers the Redis metrics (once: Redis is configured).
    pub fn redis(&self) -> RedisMetrics {
        let m = Maker(self.registry.clone());
        let commands = m.counter_vec(
            "fhirwall_redis_commands_total",
            "Commands sent to Redis (shared state), by outcome: ok, error, timeout",
            &["outcome"],
        );
        for o in ["ok", "error", "timeout"] {
            commands.with_label_values(&[o]);
        }
        RedisMetrics {
            up: m.gauge(
                "fhirwall_redis_up",
                "1 when the last probe of Redis (shared state) passed and no command failed since",
            ),
            commands,
            duration: m.histogram(
                "fhirwall_redis_command_duration_seconds",
                "Time a Redis command took, a (re)connection included",
                vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            fallbacks: m.counter(
                "fhirwall_redis_fallbacks_total",
                "Checks this process decided alone because Redis was unavailable (redis.on_failure: local)",
            ),
        }
    }
}

/// Buckets for latencies from half a millisecond to a minute (an
/// upstream's read timeout, `upstream.read_timeout_ms`, is 30 s by default).
fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
        30.0, 60.0,
    ]
}

/// Unix time in seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Metrics {
    /// Registers every metric and pre-creates every label combination.
    pub fn new(issuers: &[String]) -> Metrics {
        let m = Maker(Registry::new());
        let requests = m.counter_vec(
            "fhirwall_requests_total",
            "Requests by decision and FHIR interaction",
            &["decision", "interaction"],
        );
        let denials = m.counter_vec(
            "fhirwall_request_outcomes_total",
            "Requests by the reason code they ended with",
            &["reason"],
        );
        let duration = m.histogram_vec(
            "fhirwall_request_duration_seconds",
            "Time from request to response, by decision",
            latency_buckets(),
            &["decision"],
        );
        let jwks_fetches = m.counter_vec(
            "fhirwall_jwks_fetches_total",
            "JWKS fetches by issuer and result",
            &["issuer", "result"],
        );
        let token_cache_hits = m.counter(
            "fhirwall_token_cache_hits_total",
            "Verified-token cache hits",
        );
        let token_cache_misses = m.counter(
            "fhirwall_token_cache_misses_total",
            "Verified-token cache misses",
        );
        let introspections = m.counter_vec(
            "fhirwall_introspections_total",
            "Token introspection calls by issuer and result",
            &["issuer", "result"],
        );
        let introspection_duration = m.histogram_vec(
            "fhirwall_introspection_duration_seconds",
            "Time of token introspection calls, by issuer",
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            &["issuer"],
        );
        let bindings = m.counter_vec(
            "fhirwall_token_bindings_total",
            "Requests whose token passed the bind stage, by token kind and binding",
            &["kind", "binding"],
        );
        let bindings_by = TOKEN_KINDS
            .iter()
            .map(|k| {
                BINDINGS
                    .iter()
                    .map(|b| bindings.with_label_values(&[k, b]))
                    .collect()
            })
            .collect();
        let break_glass = m.counter(
            "fhirwall_break_glass_total",
            "Requests that passed a policy rule by break-glass",
        );
        let reloads = m.counter_vec(
            "fhirwall_reloads_total",
            "Reloads of policies, roles and break-glass on SIGHUP, by result",
            &["result"],
        );
        for r in ["success", "failure"] {
            reloads.with_label_values(&[r]);
        }
        let restart_pending = m.gauge(
            "fhirwall_config_restart_pending",
            "1 when the last reload found changed settings that only a restart applies (see the log)",
        );
        let token_cache_entries = m.gauge(
            "fhirwall_token_cache_entries",
            "Entries in the verified-token cache",
        );
        let resource_requests = m.counter_vec(
            "fhirwall_resource_requests_total",
            "Requests by FHIR resource type and decision",
            &["resource_type", "decision"],
        );
        let resource_by = crate::fhir::resource_types::RESOURCE_TYPES
            .iter()
            .map(|t| {
                DECISIONS
                    .iter()
                    .map(|d| resource_requests.with_label_values(&[t, d]))
                    .collect()
            })
            .collect();
        let upstream_duration = m.histogram(
            "fhirwall_upstream_duration_seconds",
            "Time the upstream took to answer (to its response header)",
            latency_buckets(),
        );
        let validation = m.histogram_vec(
            "fhirwall_token_validation_duration_seconds",
            "Time to validate a token (cache, JWKS, introspection), by token kind",
            vec![
                0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
                0.5, 1.0, 5.0,
            ],
            &["kind"],
        );
        let validation_by = TOKEN_KINDS
            .iter()
            .map(|k| validation.with_label_values(&[k]))
            .collect();
        let jwks_keys = m.gauge_vec(
            "fhirwall_jwks_keys",
            "Usable keys in an issuer's JWKS",
            &["issuer"],
        );
        let jwks_last_success = m.float_gauge_vec(
            "fhirwall_jwks_last_success_timestamp_seconds",
            "Unix time of an issuer's last successful JWKS fetch",
            &["issuer"],
        );
        let jwks_age = m.float_gauge_vec(
            "fhirwall_jwks_age_seconds",
            "Seconds since an issuer's JWKS was last fetched successfully (-1: never)",
            &["issuer"],
        );
        let tls_client_certs_refused = m.counter_vec(
            "fhirwall_tls_client_certificates_refused_total",
            "Client certificates the TLS handshake refused (tls.client_auth), by why; \
             the connection ends before any request, so no request record counts them",
            &["reason"],
        );
        for r in TLS_CERT_REASONS {
            tls_client_certs_refused.with_label_values(&[r]);
        }
        let dpop_replays = m.counter(
            "fhirwall_dpop_replays_total",
            "DPoP proofs refused because their jti was seen before",
        );
        let rate_limited = m.counter(
            "fhirwall_rate_limited_total",
            "Requests refused by a policy rule's rate limit",
        );
        let ready = m.gauge(
            "fhirwall_ready",
            "1 when every issuer's keys are loaded, the audit sink takes records, Redis (if it must) answers and no shutdown has begun",
        );
        let in_flight = m.gauge(
            "fhirwall_requests_in_flight",
            "Requests read and not yet finished (a shutdown waits for them)",
        );
        m.gauge_vec(
            "fhirwall_build_info",
            "Version of the running fhirwall",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        let audit_written = m.counter_vec(
            "fhirwall_audit_records_written_total",
            "Audit records written, to the sink or the spill file",
            &["sink"],
        );
        let audit_failures = m.counter_vec(
            "fhirwall_audit_write_failures_total",
            "Failed attempts to write audit records, by sink",
            &["sink"],
        );
        let audit = AuditMetrics {
            written_primary: audit_written.with_label_values(&["primary"]),
            written_spill: audit_written.with_label_values(&["spill"]),
            failures_primary: audit_failures.with_label_values(&["primary"]),
            failures_spill: audit_failures.with_label_values(&["spill"]),
            dropped: m.counter(
                "fhirwall_audit_records_dropped_total",
                "Audit records that could be written nowhere and were lost",
            ),
            refused: m.counter(
                "fhirwall_audit_records_refused_total",
                "Audit records the audit endpoint refused for themselves (too large or invalid)",
            ),
            sink_up: m.gauge(
                "fhirwall_audit_sink_up",
                "1 when the audit sink took its last write",
            ),
            rotations: m.counter(
                "fhirwall_audit_rotations_total",
                "Rotations of the audit file",
            ),
            queue_depth: m.gauge(
                "fhirwall_audit_queue_depth",
                "Audit records waiting for the writer",
            ),
            queue_capacity: m.gauge(
                "fhirwall_audit_queue_capacity",
                "Audit records the queue holds before requests wait or are refused",
            ),
        };
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
            jwks_keys.with_label_values(&[i]);
            jwks_age.with_label_values(&[i]).set(-1.0);
        }
        Metrics {
            registry: m.0,
            jwks_fetches,
            token_cache_hits,
            token_cache_misses,
            token_cache_entries,
            introspections,
            introspection_duration,
            bindings_by,
            break_glass,
            reloads,
            restart_pending,
            requests_by,
            outcomes_by,
            duration_by,
            resource_by,
            upstream_duration,
            validation_by,
            jwks_keys,
            jwks_last_success,
            jwks_age,
            issuers: issuers.to_vec(),
            dpop_replays,
            tls_client_certs_refused,
            rate_limited,
            ready,
            in_flight,
            audit,
        }
    }

    /// Counts a request against its resource type (when it names one).
    pub fn resource(&self, resource_type: Option<&str>, decision: &str) {
        let Some(t) = resource_type.and_then(|t| {
            crate::fhir::resource_types::RESOURCE_TYPES
                .binary_search(&t)
                .ok()
        }) else {
            return;
        };
        let d = DECISIONS.iter().position(|x| *x == decision).unwrap_or(2);
        self.resource_by[t][d].inc();
    }

    /// Time spent validating a token of `kind` (`jwt` or `opaque`).
    pub fn validation(&self, kind: &str, seconds: f64) {
        if let Some(k) = TOKEN_KINDS.iter().position(|x| *x == kind) {
            self.validation_by[k].observe(seconds);
        }
    }

    /// A successful JWKS fetch of `issuer` with `keys` usable keys.
    pub fn jwks_loaded(&self, issuer: &str, keys: usize) {
        self.jwks_keys.with_label_values(&[issuer]).set(keys as i64);
        self.jwks_last_success
            .with_label_values(&[issuer])
            .set(unix_now());
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
            .or_else(|| REASONS.iter().position(|x| *x == "other"))
            .expect("other is a reason");
        self.outcomes_by[r].inc();
        match reason {
            "dpop_replayed" => self.dpop_replays.inc(),
            "rate_limited" => self.rate_limited.inc(),
            _ => {}
        }
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
        let now = unix_now();
        for i in &self.issuers {
            let last = self.jwks_last_success.with_label_values(&[i]).get();
            if last > 0.0 {
                self.jwks_age.with_label_values(&[i]).set(now - last);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::REASONS;
    use crate::deny::Denial;

    /// Every reason code a denial can carry is counted as itself: an
    /// unknown one would be counted as `other`.
    #[test]
    fn every_denial_code_is_a_counted_reason() {
        let d = |s: &str| s.to_string();
        let mut codes: Vec<String> = [
            Denial::NoToken,
            Denial::InsufficientScope {
                description: d(""),
                scope: None,
            },
            Denial::PolicyDenied {
                rule: d(""),
                description: d(""),
            },
            Denial::RateLimited {
                code: "rate_limited",
                description: d(""),
                retry_after_seconds: 1,
            },
            Denial::NotFound { description: d("") },
            Denial::MethodNotAllowed { description: d("") },
            Denial::TooLarge { description: d("") },
            Denial::UnsupportedMediaType { description: d("") },
            Denial::RequestTimeout { description: d("") },
            Denial::PreconditionFailed { description: d("") },
        ]
        .iter()
        .map(|x| x.code().to_string())
        .collect();
        // Codes given where a denial is made (`code: "…"`, `why: "…"`).
        let mut files = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // And every string a `code()` returns (`TokenError`,
            // `DpopError`, …): the body up to the method's closing brace.
            for (i, _) in text.match_indices("fn code(&self) -> &'static str {") {
                let body = &text[i..];
                let body = &body[..body.find("\n    }\n").unwrap()];
                for quoted in body.split('"').skip(1).step_by(2) {
                    if !quoted.is_empty()
                        && quoted.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    {
                        codes.push(quoted.to_string());
                    }
                }
            }
            for key in ["code: \"", "why: \""] {
                for (i, _) in text.match_indices(key) {
                    let rest = &text[i + key.len()..];
                    let code = &rest[..rest.find('"').unwrap()];
                    if code.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        codes.push(code.to_string());
                    }
                }
            }
        }
        codes.sort();
        codes.dedup();
        assert!(codes.len() > 20, "{codes:?}");
        let missing: Vec<_> = codes
            .iter()
            .filter(|c| !REASONS.contains(&c.as_str()))
            .collect();
        assert!(missing.is_empty(), "not in REASONS: {missing:?}");
    }
}
