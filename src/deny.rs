//! The one mapping from a refusal to an HTTP answer: status,
//! `WWW-Authenticate` (RFC 6750) and a FHIR `OperationOutcome` body.
//!
//! - No token: 401, `Bearer realm="…"`, no error code.
//! - Bad token: 401 `error="invalid_token"` with a description naming the
//!   failed check (never the token).
//! - Bad request for credentials: 400 `error="invalid_request"`.
//! - Valid token, not allowed: 403 `error="insufficient_scope"` (+ `scope`).
//! - Keys or upstream unavailable: 503 with `Retry-After` / 502 / 504.

use serde_json::json;

/// A refusal, with everything needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No credentials on a protected route.
    NoToken,
    /// Credentials malformed or presented in a refused way (400).
    InvalidRequest {
        code: &'static str,
        description: String,
    },
    /// The token failed validation (401).
    InvalidToken {
        code: &'static str,
        description: String,
    },
    /// A DPoP request (RFC 9449) failed: the proof (`invalid_dpop_proof`)
    /// or the token presented with it (`invalid_token`). 401 with a `DPoP`
    /// challenge.
    InvalidDpop {
        code: &'static str,
        /// `invalid_dpop_proof`, `invalid_token` or `use_dpop_nonce`.
        error: &'static str,
        description: String,
        /// A fresh nonce to send as `DPoP-Nonce` (with `use_dpop_nonce`).
        nonce: Option<String>,
    },
    /// The grant does not allow the request (403).
    InsufficientScope {
        description: String,
        scope: Option<String>,
    },
    /// Over a rate limit: 429 with Retry-After. `code`: whose limit
    /// (`rate_limited` for a policy rule's, `dpop_quota_exceeded`,
    /// `introspection_throttled`).
    RateLimited {
        code: &'static str,
        description: String,
        retry_after_seconds: u64,
    },
    /// A policy rule refused it (403); `rule` is `file#name`.
    PolicyDenied { rule: String, description: String },
    /// Outside the FHIR base, or not a FHIR path (404).
    NotFound { description: String },
    /// Not a well-formed FHIR interaction (400).
    BadFhirRequest {
        code: &'static str,
        description: String,
    },
    /// The method does not apply to the path (405).
    MethodNotAllowed { description: String },
    /// Body larger than what fhirwall reads to classify (413).
    TooLarge { description: String },
    /// A body fhirwall must read to decide, in a format it does not read
    /// (415).
    UnsupportedMediaType { description: String },
    /// A body fhirwall must read did not arrive in time (408).
    RequestTimeout { description: String },
    /// The client's `If-Match` names another version than the one stored
    /// (and checked) now (412): the write would not land.
    PreconditionFailed { description: String },
    /// A dependency (JWKS) is unavailable: 503 with Retry-After.
    Unavailable {
        code: &'static str,
        description: String,
        retry_after_seconds: u64,
    },
    /// A checked answer is withheld (404): the resource is outside the
    /// patient's compartment (`why: "outside_compartment"`) or the upstream
    /// did not return it (`why: "upstream_not_found"`). Both look the same
    /// to the client; `why` is for the audit.
    Hidden { resource: String, why: &'static str },
    /// The upstream failed: 502 (refused, reset) or 504 (timeout).
    Upstream {
        status: u16,
        code: &'static str,
        description: String,
    },
}

/// The HTTP answer for a [`Denial`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub retry_after: Option<u64>,
    /// `DPoP-Nonce` for the client to use in its next proof.
    pub dpop_nonce: Option<String>,
    pub body: Vec<u8>,
}

/// Keeps a header quoted-string safe: printable ASCII without `"` and `\`.
fn quoted(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(300)
        .collect()
}

impl Denial {
    /// Stable reason code for metrics and the audit record.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::NoToken => "no_token",
            Denial::InvalidRequest { code, .. }
            | Denial::InvalidToken { code, .. }
            | Denial::InvalidDpop { code, .. }
            | Denial::BadFhirRequest { code, .. }
            | Denial::Unavailable { code, .. }
            | Denial::Upstream { code, .. }
            | Denial::RateLimited { code, .. } => code,
            Denial::InsufficientScope { .. } => "insufficient_scope",
            Denial::PolicyDenied { .. } => "policy_denied",
            Denial::NotFound { .. } => "not_found",
            Denial::Hidden { why, .. } => why,
            Denial::MethodNotAllowed { .. } => "method_not_allowed",
            Denial::TooLarge { .. } => "body_too_large",
            Denial::UnsupportedMediaType { .. } => "unsupported_media_type",
            Denial::RequestTimeout { .. } => "body_timeout",
            Denial::PreconditionFailed { .. } => "precondition_failed",
        }
    }

    /// The human-readable reason.
    pub fn description(&self) -> String {
        match self {
            Denial::NoToken => "no access token: send Authorization: Bearer <token>".into(),
            Denial::Hidden { resource, .. } => format!("{resource} is not known"),
            Denial::InvalidRequest { description, .. }
            | Denial::InvalidToken { description, .. }
            | Denial::InvalidDpop { description, .. }
            | Denial::InsufficientScope { description, .. }
            | Denial::PolicyDenied { description, .. }
            | Denial::RateLimited { description, .. }
            | Denial::NotFound { description }
            | Denial::BadFhirRequest { description, .. }
            | Denial::MethodNotAllowed { description }
            | Denial::TooLarge { description }
            | Denial::UnsupportedMediaType { description }
            | Denial::RequestTimeout { description }
            | Denial::PreconditionFailed { description }
            | Denial::Unavailable { description, .. }
            | Denial::Upstream { description, .. } => description.clone(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Denial::NoToken | Denial::InvalidToken { .. } | Denial::InvalidDpop { .. } => 401,
            Denial::InvalidRequest { .. } | Denial::BadFhirRequest { .. } => 400,
            Denial::InsufficientScope { .. } | Denial::PolicyDenied { .. } => 403,
            Denial::RateLimited { .. } => 429,
            Denial::NotFound { .. } | Denial::Hidden { .. } => 404,
            Denial::MethodNotAllowed { .. } => 405,
            Denial::TooLarge { .. } => 413,
            Denial::UnsupportedMediaType { .. } => 415,
            Denial::RequestTimeout { .. } => 408,
            Denial::PreconditionFailed { .. } => 412,
            Denial::Unavailable { .. } => 503,
            Denial::Upstream { status, .. } => *status,
        }
    }

    /// Builds the answer; `realm` is the protected resource's realm and
    /// `dpop_algs` the DPoP proof algorithms when DPoP is enabled (a `DPoP`
    /// challenge then accompanies `Bearer` on 401s without a token).
    pub fn answer(&self, realm: &str, dpop_algs: Option<&str>) -> Answer {
        self.answer_to(realm, dpop_algs, false)
    }

    /// [`Denial::answer`] to a request that used the `DPoP` scheme (with
    /// DPoP enabled): its challenges — a malformed request or token, a
    /// scope or policy refusal — are `DPoP` ones with the algorithms
    /// (RFC 9449 §7.1), not `Bearer`, a scheme its token is refused under.
    pub fn answer_to(&self, realm: &str, dpop_algs: Option<&str>, dpop_scheme: bool) -> Answer {
        let (scheme, algs) = match dpop_algs {
            Some(a) if dpop_scheme => ("DPoP", format!(", algs=\"{}\"", quoted(a))),
            _ => ("Bearer", String::new()),
        };
        let realm = quoted(realm);
        let desc = quoted(&self.description());
        let dpop = dpop_algs
            .map(|a| format!(", DPoP algs=\"{}\"", quoted(a)))
            .unwrap_or_default();
        let www_authenticate = match self {
            Denial::NoToken => Some(format!("Bearer realm=\"{realm}\"{dpop}")),
            Denial::InvalidDpop { error, .. } => Some(format!(
                "DPoP realm=\"{realm}\", error=\"{error}\", error_description=\"{desc}\"{}",
                dpop_algs
                    .map(|a| format!(", algs=\"{}\"", quoted(a)))
                    .unwrap_or_default()
            )),
            Denial::InvalidRequest { .. } => Some(format!(
                "{scheme} realm=\"{realm}\", error=\"invalid_request\", error_description=\"{desc}\"{algs}"
            )),
            // Refused under Bearer: the DPoP challenge says the other
            // scheme (and its algorithms) would be heard (RFC 9449 §7.1).
            Denial::InvalidToken { .. } => Some(format!(
                "{scheme} realm=\"{realm}\", error=\"invalid_token\", error_description=\"{desc}\"{algs}{}",
                if dpop_scheme { "" } else { dpop.as_str() }
            )),
            Denial::PolicyDenied { .. } => Some(format!(
                "{scheme} realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{desc}\"{algs}"
            )),
            Denial::InsufficientScope { scope, .. } => Some(match scope {
                Some(s) => format!(
                    "{scheme} realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{desc}\", scope=\"{}\"{algs}",
                    quoted(s)
                ),
                None => format!("{scheme} realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{desc}\"{algs}"),
            }),
            _ => None,
        };
        let (severity, issue_code) = match self {
            Denial::NoToken | Denial::InvalidToken { .. } | Denial::InvalidDpop { .. } => {
                ("error", "login")
            }
            Denial::InvalidRequest { .. }
            | Denial::BadFhirRequest { .. }
            | Denial::MethodNotAllowed { .. } => ("error", "invalid"),
            Denial::InsufficientScope { .. } | Denial::PolicyDenied { .. } => {
                ("error", "forbidden")
            }
            Denial::NotFound { .. } | Denial::Hidden { .. } => ("error", "not-found"),
            Denial::TooLarge { .. } => ("error", "too-costly"),
            Denial::UnsupportedMediaType { .. } => ("error", "not-supported"),
            Denial::RequestTimeout { .. } => ("error", "timeout"),
            Denial::PreconditionFailed { .. } => ("error", "conflict"),
            Denial::RateLimited { .. } => ("error", "throttled"),
            Denial::Unavailable { .. } => ("error", "transient"),
            Denial::Upstream { status: 504, .. } => ("error", "timeout"),
            Denial::Upstream { .. } => ("error", "exception"),
        };
        let body = json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": severity,
                "code": issue_code,
                // A withheld answer must not tell why it was withheld.
                "details": {"text": match self {
                    Denial::Hidden { .. } => "not_found",
                    _ => self.code(),
                }},
                "diagnostics": format!("fhirwall: {}", self.description()),
            }]
        });
        let retry_after = match self {
            Denial::Unavailable {
                retry_after_seconds,
                ..
            }
            | Denial::RateLimited {
                retry_after_seconds,
                ..
            } => Some(*retry_after_seconds),
            _ => None,
        };
        let dpop_nonce = match self {
            Denial::InvalidDpop { nonce, .. } => nonce.clone(),
            _ => None,
        };
        Answer {
            status: self.status(),
            www_authenticate,
            retry_after,
            dpop_nonce,
            body: body.to_string().into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpop_challenges() {
        let a = Denial::NoToken.answer("r", Some("ES256 RS256"));
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("Bearer realm=\"r\", DPoP algs=\"ES256 RS256\"")
        );
        let a = Denial::InvalidDpop {
            code: "dpop_stale",
            error: "invalid_dpop_proof",
            description: "DPoP proof iat is too old".into(),
            nonce: None,
        }
        .answer("r", Some("ES256"));
        assert_eq!(a.status, 401);
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("DPoP realm=\"r\", error=\"invalid_dpop_proof\", error_description=\"DPoP proof iat is too old\", algs=\"ES256\"")
        );
        // A token refused under Bearer: the DPoP challenge goes along
        // (RFC 9449 §7.1); under DPoP, its algorithms are in its own.
        let expired = Denial::InvalidToken {
            code: "token_expired",
            description: "token expired".into(),
        };
        assert_eq!(
            expired.answer("r", Some("ES256")).www_authenticate.as_deref(),
            Some("Bearer realm=\"r\", error=\"invalid_token\", error_description=\"token expired\", DPoP algs=\"ES256\"")
        );
        assert_eq!(
            expired.answer_to("r", Some("ES256"), true).www_authenticate.as_deref(),
            Some("DPoP realm=\"r\", error=\"invalid_token\", error_description=\"token expired\", algs=\"ES256\"")
        );
        assert_eq!(
            expired.answer("r", None).www_authenticate.as_deref(),
            Some(
                "Bearer realm=\"r\", error=\"invalid_token\", error_description=\"token expired\""
            )
        );
    }

    #[test]
    fn answers() {
        let a = Denial::NoToken.answer("https://fhir.example/fhir", None);
        assert_eq!(a.status, 401);
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("Bearer realm=\"https://fhir.example/fhir\"")
        );

        let a = Denial::InvalidToken {
            code: "token_expired",
            description: "token \"expired\"\n".into(),
        }
        .answer("r", None);
        assert_eq!(a.status, 401);
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("Bearer realm=\"r\", error=\"invalid_token\", error_description=\"token ?expired??\"")
        );
        let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert_eq!(body["issue"][0]["code"], "login");

        let a = Denial::InsufficientScope {
            description: "needs s".into(),
            scope: Some("user/Observation.s".into()),
        }
        .answer("r", None);
        assert_eq!(a.status, 403);
        assert!(a
            .www_authenticate
            .unwrap()
            .ends_with("scope=\"user/Observation.s\""));

        let a = Denial::Unavailable {
            code: "keys_unavailable",
            description: "x".into(),
            retry_after_seconds: 5,
        }
        .answer("r", None);
        assert_eq!(
            (a.status, a.retry_after, a.www_authenticate),
            (503, Some(5), None)
        );
        assert_eq!(
            Denial::Upstream {
                status: 504,
                code: "upstream_timeout",
                description: "t".into()
            }
            .status(),
            504
        );
    }
}
