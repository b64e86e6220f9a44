//! The token validator the proxy calls: cache lookup by token hash, then
//! [`inspect`], issuer lookup, keys (with at most one
//! shared re-fetch on an unknown `kid`) and [`verify`].

use std::sync::Arc;
use std::time::Duration;

use super::cache::TokenCache;
use super::introspect::{CallRecord, Introspector};
use super::jwks::JwksStore;
use super::{
    header_precheck, inspect, not_a_misspelt_jws, token_hash, token_kind, verify, Claims,
    TokenError,
};
use crate::config::Settings;

/// Validates access tokens for the configured issuers.
pub struct Validator {
    pub store: Arc<JwksStore>,
    cache: TokenCache,
    max_bytes: usize,
    /// One per issuer configured for introspection, in config order; the
    /// first also takes opaque tokens.
    introspectors: Vec<Introspector>,
}

/// A validated token.
#[derive(Debug, Clone)]
pub struct Validated {
    pub claims: Arc<Claims>,
    pub hash: [u8; 32],
    pub cache_hit: bool,
    /// `jwt` or `opaque`.
    pub kind: &'static str,
}

impl Validator {
    pub fn new(
        settings: &Settings,
        store: Arc<JwksStore>,
        on_call: Arc<dyn Fn(CallRecord) + Send + Sync>,
    ) -> Validator {
        let introspectors = settings
            .issuers
            .iter()
            .filter_map(|i| {
                Introspector::new(
                    i,
                    &settings.jwks_roots,
                    settings.tokens.cache_max_entries,
                    on_call.clone(),
                )
            })
            .collect();
        Validator {
            introspectors,
            store,
            cache: TokenCache::new(
                settings.tokens.cache_max_entries,
                Duration::from_secs(settings.tokens.cache_max_ttl_seconds),
            ),
            max_bytes: settings.tokens.max_bytes,
        }
    }

    /// Validates `token` at `now` (Unix seconds), for a client at `source`
    /// (its rate-limit key: introspection budgets are per address).
    ///
    /// Every path that waits (a key fetch, an introspection call) is boxed:
    /// a cached token, the common case, then builds a future of a few
    /// hundred bytes instead of several KiB, which every request's
    /// pipeline would otherwise carry and copy.
    pub async fn validate(
        &self,
        token: &str,
        now: i64,
        source: Option<&str>,
    ) -> Result<Validated, TokenError> {
        if token.len() > self.max_bytes {
            return Err(TokenError::TooLong(self.max_bytes));
        }
        let hash = token_hash(token);
        // Fewer or more than three dot-separated parts: opaque. (Three
        // parts are looked at more closely below, only if they are no JWT.)
        if token.split('.').count() != 3 {
            not_a_misspelt_jws(token)?;
            return Box::pin(self.opaque(token, hash, now, source)).await;
        }
        // A cached token stands while the key it was verified with is
        // still published (a key the issuer withdrew refuses its tokens at
        // once, cached or not).
        if let Some(hit) = self
            .cache
            .get(&hash, now)
            .filter(|h| self.store.still_published(h))
        {
            return Ok(Validated {
                claims: hit.claims,
                hash,
                cache_hit: true,
                kind: "jwt",
            });
        }
        let u = match inspect(token, self.max_bytes) {
            Ok(u) => u,
            // An opaque token that happens to have two dots (its first part
            // no JOSE header) is introspected where opaque tokens are.
            Err(_) if token_kind(token) == "opaque" && self.opaque_introspector().is_some() => {
                return Box::pin(self.opaque(token, hash, now, source)).await;
            }
            Err(e) => return Err(e),
        };
        let ik = self
            .store
            .issuer(&u.iss)
            .ok_or_else(|| TokenError::UnknownIssuer(u.iss.chars().take(128).collect()))?;
        // A JWT of an issuer configured for introspection is introspected.
        if let Some(i) = self
            .introspectors
            .iter()
            .find(|i| i.issuer.name == ik.issuer.name)
        {
            // One whose header has not the `typ` the issuer requires, or
            // that says it has expired, is refused without a call (nor a
            // charge to its sender's budget of inactive answers).
            header_precheck(&u, &ik.issuer)?;
            // So is one whose own `aud` names another resource server: an
            // answer without `aud` (`require_aud: false`) would otherwise
            // let it through here.
            if let Some(aud) = &u.aud {
                super::audience_fits(aud, &ik.issuer)?;
            }
            let leeway = ik.issuer.leeway_seconds;
            if let Some(exp) = u.exp.filter(|e| e.saturating_add(leeway as i64) < now) {
                return Err(TokenError::Expired { exp, now, leeway });
            }
            let (claims, cache_hit) = Box::pin(i.claims(token, hash, now, source)).await?;
            // The token's own binding is a floor: an answer that leaves it
            // out (or names another) would make a stolen bound token a
            // bearer token.
            if u.cnf.is_some() && claims.cnf != u.cnf {
                return Err(TokenError::UnconfirmedBinding);
            }
            return Ok(Validated {
                claims,
                hash,
                cache_hit,
                kind: "jwt",
            });
        }
        let mut keys = Box::pin(self.store.keys_for(ik, u.kid.as_deref())).await?;
        let claims = match verify(token, &u, &ik.issuer, &keys, now) {
            // The loaded key under its kid (or every key, for a token
            // without one) does not verify it: the issuer may have
            // replaced it. Tried once more against a newer set, if one
            // can be had.
            Err(
                e @ (TokenError::BadSignature
                | TokenError::KeyAlgorithmMismatch { .. }
                | TokenError::AmbiguousKey(0)),
            ) => match Box::pin(self.store.keys_after_failure(ik, &keys)).await {
                Some(newer) => {
                    keys = newer;
                    verify(token, &u, &ik.issuer, &keys, now)?
                }
                None => return Err(e),
            },
            verified => verified?,
        };
        let claims = Arc::new(claims);
        self.cache
            .insert(hash, claims.clone(), keys, u.kid.as_deref(), now);
        Ok(Validated {
            claims,
            hash,
            cache_hit: false,
            kind: "jwt",
        })
    }

    /// The introspector that opaque tokens go to, if any takes them.
    fn opaque_introspector(&self) -> Option<&Introspector> {
        self.introspectors
            .iter()
            .find(|i| i.issuer.takes_opaque_tokens())
    }

    /// Validates an opaque token by introspection.
    async fn opaque(
        &self,
        token: &str,
        hash: [u8; 32],
        now: i64,
        source: Option<&str>,
    ) -> Result<Validated, TokenError> {
        let i = self
            .opaque_introspector()
            .ok_or(TokenError::OpaqueNotAccepted)?;
        let (claims, cache_hit) = i.claims(token, hash, now, source).await?;
        Ok(Validated {
            claims,
            hash,
            cache_hit,
            kind: "opaque",
        })
    }

    /// Whether any issuer's tokens are introspected.
    pub fn introspects(&self) -> bool {
        !self.introspectors.is_empty()
    }

    /// The token cache (shared), for the admin listener's gauge.
    pub fn token_cache(&self) -> TokenCache {
        self.cache.clone()
    }
}
