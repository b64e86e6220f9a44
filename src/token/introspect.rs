//! Stage 3 for opaque tokens (and JWTs of issuers configured for it): RFC
//! 7662 token introspection. The answer feeds the same [`Claims`] model as
//! a verified JWT, so scopes, patient context and binding work alike.
//!
//! Results are cached by the token's SHA-256: active ones no longer than
//! the token's `exp` and the configured ceiling (so a revocation takes
//! effect within it), inactive ones for the negative TTL. Concurrent
//! requests with the same uncached token share one call (moka's
//! `try_get_with`). A failed call is not cached: the request gets 503 with
//! `Retry-After` — never an allow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use moka::future::Cache;
use serde_json::Value;

use super::{check_claims, Claims, TokenError};
use crate::config::{ClientAuth, Issuer};

/// Largest introspection answer read.
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// What the authorization server said about a token.
#[derive(Clone)]
enum Outcome {
    Active {
        claims: Arc<Claims>,
        ttl: Duration,
    },
    Inactive {
        ttl: Duration,
    },
    /// Active, but not acceptable here (another audience, not an access
    /// token, …): cached like an inactive answer, with its reason.
    Refused {
        error: TokenError,
        ttl: Duration,
    },
}

struct ByOutcome;

impl moka::Expiry<[u8; 32], Outcome> for ByOutcome {
    fn expire_after_create(&self, _k: &[u8; 32], v: &Outcome, _now: Instant) -> Option<Duration> {
        Some(match v {
            Outcome::Active { ttl, .. }
            | Outcome::Inactive { ttl }
            | Outcome::Refused { ttl, .. } => *ttl,
        })
    }
}

/// The window of `max_inactive_per_source_per_minute`.
const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// Outcome of one introspection, for metrics.
pub struct CallRecord {
    pub issuer: String,
    pub ok: bool,
    pub seconds: f64,
}

/// A client address's inactive answers in the current minute (and calls
/// in flight for it).
struct Budget {
    since: Instant,
    spent: u32,
}

/// How long a call waits for one in flight to end when
/// `max_concurrent_calls` are.
const BUSY_WAIT: Duration = Duration::from_millis(250);

/// Introspects tokens for one issuer.
pub struct Introspector {
    pub issuer: Issuer,
    client: reqwest::Client,
    cache: Cache<[u8; 32], Outcome>,
    /// Inactive (or refused) answers per client address this minute
    /// (`max_inactive_per_source_per_minute`).
    budgets: moka::sync::Cache<String, Arc<std::sync::Mutex<Budget>>>,
    /// Calls in flight (`max_concurrent_calls`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Called after every introspection call (metrics).
    on_call: Arc<dyn Fn(CallRecord) + Send + Sync>,
}

impl Introspector {
    pub fn new(
        issuer: &Issuer,
        roots: &[reqwest::Certificate],
        max_entries: u64,
        on_call: Arc<dyn Fn(CallRecord) + Send + Sync>,
    ) -> Option<Introspector> {
        let cfg = issuer.introspection.as_ref()?;
        let client = crate::trust::trusting(reqwest::Client::builder(), roots)
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("reqwest client with rustls builds");
        Some(Introspector {
            issuer: issuer.clone(),
            client,
            cache: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(ByOutcome)
                .build(),
            // An address forgotten early (capacity) only starts afresh.
            budgets: moka::sync::Cache::builder()
                .time_to_idle(BUDGET_WINDOW)
                .max_capacity(100_000)
                .build(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                cfg.max_concurrent_calls as usize,
            )),
            on_call,
        })
    }

    /// Takes one unit of `source`'s budget for a call (made before the
    /// call, so that a burst of concurrent made-up tokens cannot all pass
    /// the check): `Ok(true)` when taken (give it back with [`refund`] if
    /// the answer is active), `Ok(false)` when no budget applies, `Err`
    /// with the seconds to wait when it is spent.
    fn reserve(&self, source: Option<&str>) -> Result<bool, u64> {
        let (Some(limit), Some(source)) = (self.limit(), source) else {
            return Ok(false);
        };
        let b = self.budgets.get_with(source.to_string(), || {
            Arc::new(std::sync::Mutex::new(Budget {
                since: Instant::now(),
                spent: 0,
            }))
        });
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = b.since.elapsed();
        if elapsed >= BUDGET_WINDOW {
            b.since = Instant::now();
            b.spent = 0;
        } else if b.spent >= limit {
            return Err((BUDGET_WINDOW - elapsed).as_secs().max(1));
        }
        b.spent += 1;
        Ok(true)
    }

    /// Gives back a unit [`reserve`] took: the answer was active. A failed
    /// call is not given back: an endpoint that fails or throttles under a
    /// flood of made-up tokens would otherwise let the flood through
    /// uncounted (errors are not cached), every one a call.
    fn refund(&self, source: Option<&str>) {
        if let Some(b) = source.and_then(|s| self.budgets.get(s)) {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            b.spent = b.spent.saturating_sub(1);
        }
    }

    fn limit(&self) -> Option<u32> {
        let n = self
            .issuer
            .introspection
            .as_ref()
            .map_or(0, |c| c.max_inactive_per_source_per_minute);
        (n > 0).then_some(n)
    }

    /// The claims of `token` (hash `hash`) at `now`, and whether they came
    /// from the cache. `source` is the client's address (its rate-limit
    /// key): one whose tokens were inactive too often this minute has no
    /// new ones introspected until the minute is over.
    pub async fn claims(
        &self,
        token: &str,
        hash: [u8; 32],
        now: i64,
        source: Option<&str>,
    ) -> Result<(Arc<Claims>, bool), TokenError> {
        let hit = self.cache.get(&hash).await;
        let (outcome, cached) = match hit {
            Some(o) => (o, true),
            None => {
                // Only the request that makes the call pays for it: the
                // others asking for the same token meanwhile wait for its
                // answer (a dashboard's burst on an expired token costs
                // one unit, not one each).
                let reserved = std::sync::atomic::AtomicBool::new(false);
                let called = self
                    .cache
                    .try_get_with(hash, async {
                        let taken = self
                            .reserve(source)
                            .map_err(TokenError::IntrospectionThrottled)?;
                        reserved.store(taken, std::sync::atomic::Ordering::Relaxed);
                        self.call(token, now).await
                    })
                    .await
                    .map_err(|e| (*e).clone());
                // An active answer, or no call made (too many in flight),
                // costs the address nothing.
                if reserved.load(std::sync::atomic::Ordering::Relaxed)
                    && matches!(
                        called,
                        Ok(Outcome::Active { .. }) | Err(TokenError::IntrospectionBusy { .. })
                    )
                {
                    self.refund(source);
                }
                (called?, false)
            }
        };
        match outcome {
            // A cached result never outlives the token's exp.
            // (Within the leeway, as a JWT.)
            Outcome::Active { claims, .. }
                if claims.exp.saturating_add(self.issuer.leeway_seconds as i64) > now =>
            {
                Ok((claims, cached))
            }
            Outcome::Active { claims, .. } => Err(TokenError::Expired {
                exp: claims.exp,
                now,
                leeway: self.issuer.leeway_seconds,
            }),
            Outcome::Inactive { .. } => Err(TokenError::Inactive),
            Outcome::Refused { error, .. } => Err(error),
        }
    }

    /// One call to the endpoint. Errors are not cached (the caller retries).
    async fn call(&self, token: &str, now: i64) -> Result<Outcome, TokenError> {
        let cfg = self
            .issuer
            .introspection
            .as_ref()
            .expect("an introspector has introspection settings");
        // At most so many calls at once, whoever sends the tokens: past
        // it, a token waits a moment for one to end (a burst of new
        // sessions), then is refused rather than queued.
        let wait = BUSY_WAIT.min(cfg.timeout);
        let Ok(Ok(_in_flight)) = tokio::time::timeout(wait, self.in_flight.acquire()).await else {
            return Err(TokenError::IntrospectionBusy {
                issuer: self.issuer.name.clone(),
                limit: cfg.max_concurrent_calls,
            });
        };
        let unavailable = || TokenError::IntrospectionUnavailable(self.issuer.name.clone());
        let mut form: Vec<(&str, String)> = vec![
            ("token", token.to_string()),
            ("token_type_hint", "access_token".into()),
        ];
        let mut request = self.client.post(cfg.endpoint.clone());
        match &cfg.auth {
            ClientAuth::Basic { secret } => {
                // RFC 6749 §2.3.1: both parts form-encoded before Basic.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let creds = format!("{}:{}", enc(&cfg.client_id), enc(secret));
                request = request.header(
                    reqwest::header::AUTHORIZATION,
                    format!("Basic {}", STANDARD.encode(creds)),
                );
            }
            ClientAuth::Post { secret } => {
                form.push(("client_id", cfg.client_id.clone()));
                form.push(("client_secret", secret.clone()));
            }
            ClientAuth::PrivateKeyJwt { key, alg } => {
                let claims = serde_json::json!({
                    "iss": cfg.client_id, "sub": cfg.client_id,
                    "aud": cfg.assertion_audience,
                    "jti": crate::audit::hex(&rand::random::<[u8; 16]>()),
                    "iat": now, "exp": now + 60,
                });
                let mut header = jsonwebtoken::Header::new(*alg);
                header.kid = cfg.assertion_kid.clone();
                let assertion =
                    jsonwebtoken::encode(&header, &claims, key).map_err(|_| unavailable())?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", assertion));
            }
        }
        let body = {
            let mut b = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &form {
                b.append_pair(k, v);
            }
            b.finish()
        };
        let started = Instant::now();
        let result = async {
            let resp = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
                .send()
                .await
                .map_err(|e| {
                let e = crate::call_error(e);
                tracing::warn!(issuer = %self.issuer.name, error = %e, "introspection call failed");
                unavailable()
            })?;
            let status = resp.status();
            if !status.is_success() {
                tracing::error!(issuer = %self.issuer.name, %status, "introspection endpoint refused the call");
                return Err(unavailable());
            }
            let body = match super::read_capped(resp, MAX_ANSWER_BYTES).await {
                Ok(body) => body,
                Err(super::ReadError::TooLarge) => {
                    tracing::error!(issuer = %self.issuer.name, "introspection answer larger than {MAX_ANSWER_BYTES} bytes");
                    return Err(unavailable());
                }
                Err(super::ReadError::Http(_)) => return Err(unavailable()),
            };
            // RFC 7662 §2.2: an object with a boolean `active`. Anything
            // else (`[]`, `"ok"`, `{"error": …}`, a proxy's page) is a
            // failing endpoint, not a token found inactive: 503, not
            // cached (the call is charged as any failed call).
            let answer = serde_json::from_slice::<Value>(&body).map_err(|_| unavailable())?;
            if !answer.get("active").is_some_and(Value::is_boolean) {
                tracing::error!(issuer = %self.issuer.name, "introspection answer is not a JSON object with a boolean 'active'");
                return Err(unavailable());
            }
            Ok(answer)
        }
        .await;
        (self.on_call)(CallRecord {
            issuer: self.issuer.name.clone(),
            ok: result.is_ok(),
            seconds: started.elapsed().as_secs_f64(),
        });
        let answer = result?;
        outcome(&answer, &self.issuer, cfg, now)
    }
}

/// The cached outcome of an introspection answer (pure).
fn outcome(
    answer: &Value,
    issuer: &Issuer,
    cfg: &crate::config::Introspection,
    now: i64,
) -> Result<Outcome, TokenError> {
    match answer_claims(answer, issuer, cfg, now) {
        Ok(claims) => {
            let left = Duration::from_secs(claims.exp.saturating_sub(now).max(0) as u64);
            Ok(Outcome::Active {
                ttl: left.min(cfg.cache_max_ttl),
                claims: Arc::new(claims),
            })
        }
        Err(TokenError::Inactive) => Ok(Outcome::Inactive {
            ttl: cfg.negative_ttl,
        }),
        Err(error) => Ok(Outcome::Refused {
            error,
            ttl: cfg.negative_ttl,
        }),
    }
}

/// What an introspection answer says of its token (pure): its claims when
/// it is active and they hold, else why not (`Inactive` when the server
/// does not call it active). The gateway's judgement and `fhirwall
/// explain`'s.
pub fn answer_claims(
    answer: &Value,
    issuer: &Issuer,
    cfg: &crate::config::Introspection,
    now: i64,
) -> Result<Claims, TokenError> {
    if answer.get("active").and_then(Value::as_bool) != Some(true) {
        return Err(TokenError::Inactive);
    }
    // Only access tokens: a refresh or ID token the server also calls
    // active is refused by the claims' check (`check_claims`), as a JWT
    // saying so is.
    let s = |k: &str| {
        answer
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    };
    // A DPoP token must say which key it is bound to.
    if s("token_type").as_deref() == Some("dpop") && answer.pointer("/cnf/jkt").is_none() {
        return Err(TokenError::BadClaim("cnf"));
    }
    if cfg.require_aud && answer.get("aud").is_none() {
        return Err(TokenError::MissingClaim("aud"));
    }
    claims_from_answer(answer, issuer, cfg.cache_max_ttl, now)
}

/// An active introspection answer as [`Claims`] (pure). The answer is
/// checked like a JWT's claims; what RFC 7662 leaves optional is filled in
/// conservatively: no `iss` means this issuer, no `aud` means the
/// authorization server vouches for this resource server, no `exp` means
/// the token is trusted for the cache ceiling only.
fn claims_from_answer(
    answer: &Value,
    issuer: &Issuer,
    ceiling: Duration,
    now: i64,
) -> Result<Claims, TokenError> {
    let mut c = answer.clone();
    let Some(obj) = c.as_object_mut() else {
        return Err(TokenError::BadPayload);
    };
    obj.entry("iss")
        .or_insert_with(|| Value::String(issuer.issuer.clone()));
    if !obj.contains_key("aud") {
        if let Some(a) = issuer.audiences.first() {
            obj.insert("aud".into(), Value::String(a.clone()));
        }
    }
    obj.entry("exp")
        .or_insert_with(|| Value::from(now + ceiling.as_secs() as i64));
    check_claims(&c, issuer, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Introspection;
    use serde_json::json;

    fn issuer() -> Issuer {
        Issuer {
            name: "as".into(),
            issuer: "https://as.example".into(),
            jwks_uri: None,
            discovery: false,
            audiences: vec!["https://gw.example/fhir".into()],
            algorithms: vec![],
            leeway_seconds: 0,
            require_at_jwt_typ: false,
            require_binding: false,
            require_binding_for_clients: vec![],
            introspection: Some(Introspection {
                endpoint: url::Url::parse("https://as.example/introspect").unwrap(),
                client_id: "gw".into(),
                auth: ClientAuth::Basic { secret: "s".into() },
                timeout: Duration::from_secs(1),
                cache_max_ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(10),
                require_aud: false,
                opaque_tokens: true,
                max_inactive_per_source_per_minute: 60,
                max_concurrent_calls: 32,
                assertion_kid: None,
                assertion_audience: "https://as.example/introspect".into(),
            }),
        }
    }

    #[test]
    fn answers_map_to_claims() {
        let i = issuer();
        let cfg = i.introspection.clone().unwrap();
        let now = 1_000;
        let full = json!({"active": true, "scope": "patient/*.rs launch", "client_id": "app",
            "sub": "u1", "patient": "p1", "fhirUser": "Practitioner/d", "exp": now + 30,
            "iss": "https://as.example", "aud": ["https://gw.example/fhir"],
            "cnf": {"jkt": "abc"}});
        match outcome(&full, &i, &cfg, now).unwrap() {
            Outcome::Active { claims, ttl } => {
                assert_eq!(claims.patient.as_deref(), Some("p1"));
                assert_eq!(claims.client_id.as_deref(), Some("app"));
                assert_eq!(claims.fhir_user.as_deref(), Some("Practitioner/d"));
                assert!(claims.cnf.is_some());
                assert_eq!(ttl, Duration::from_secs(30), "no longer than exp");
            }
            _ => panic!("active"),
        }
        // Keycloak's access tokens say `typ: Bearer` (or DPoP).
        for typ in ["Bearer", "DPoP"] {
            let answer = json!({"active": true, "scope": "user/*.rs", "typ": typ});
            assert!(
                matches!(outcome(&answer, &i, &cfg, now), Ok(Outcome::Active { .. })),
                "{typ}"
            );
        }
        // Minimal answer: the ceiling bounds it.
        match outcome(
            &json!({"active": true, "scope": "user/*.rs"}),
            &i,
            &cfg,
            now,
        )
        .unwrap()
        {
            Outcome::Active { ttl, .. } => assert_eq!(ttl, Duration::from_secs(60)),
            _ => panic!("active"),
        }
        for inactive in [
            json!({"active": false}),
            json!({}),
            json!({"active": "true"}),
        ] {
            assert!(matches!(
                outcome(&inactive, &i, &cfg, now).unwrap(),
                Outcome::Inactive { .. }
            ));
        }
        // With require_aud, an answer without aud is refused.
        let strict = Introspection {
            require_aud: true,
            ..cfg.clone()
        };
        assert!(matches!(
            outcome(&json!({"active": true}), &i, &strict, now),
            Ok(Outcome::Refused { .. })
        ));
        // Checked like a JWT: another issuer, another audience, expired.
        for (bad, code) in [
            (
                json!({"active": true, "iss": "https://evil.example"}),
                "token_unknown_issuer",
            ),
            (
                json!({"active": true, "aud": "https://other/fhir"}),
                "token_wrong_audience",
            ),
            (json!({"active": true, "exp": now - 1}), "token_expired"),
            (
                json!({"active": true, "token_use": "refresh_token"}),
                "token_bad_claims",
            ),
            (
                json!({"active": true, "typ": "Refresh"}),
                "token_bad_claims",
            ),
            (json!({"active": true, "typ": "ID"}), "token_bad_claims"),
            (
                json!({"active": true, "token_type": "id_token"}),
                "token_bad_claims",
            ),
            (
                json!({"active": true,
                       "token_type": "urn:ietf:params:oauth:token-type:id_token"}),
                "token_bad_claims",
            ),
            (
                json!({"active": true,
                       "token_type": "urn:ietf:params:oauth:token-type:refresh_token"}),
                "token_bad_claims",
            ),
            (
                json!({"active": true, "token_type": "DPoP"}),
                "token_bad_claims",
            ),
        ] {
            match outcome(&bad, &i, &cfg, now) {
                Ok(Outcome::Refused { error, .. }) => assert_eq!(error.code(), code, "{bad}"),
                _ => panic!("{bad} accepted"),
            }
        }
    }
}
