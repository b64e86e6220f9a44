//! Verified-token cache: keyed by the SHA-256 of the token (never the token
//! itself), each entry living no longer than the token's `exp` and the
//! configured ceiling.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use super::{Claims, KeySet};

/// A cached token: its claims, and what they were verified with — the
/// issuer's key set then and the token's `kid` — so that a hit can be
/// refused once that key is no longer published
/// ([`super::jwks::JwksStore::still_published`]).
#[derive(Clone)]
pub struct Hit {
    pub claims: Arc<Claims>,
    pub keys: Arc<KeySet>,
    pub kid: Option<Arc<str>>,
}

#[derive(Clone)]
struct Entry {
    hit: Hit,
    ttl: Duration,
}

struct ExpireAtTokenExp;

impl moka::Expiry<[u8; 32], Entry> for ExpireAtTokenExp {
    fn expire_after_create(
        &self,
        _k: &[u8; 32],
        v: &Entry,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// Cache of verified claims by token hash. Clones share the cache.
#[derive(Clone)]
pub struct TokenCache {
    cache: Cache<[u8; 32], Entry>,
    max_ttl: Duration,
}

impl TokenCache {
    pub fn new(max_entries: u64, max_ttl: Duration) -> TokenCache {
        TokenCache {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(ExpireAtTokenExp)
                .build(),
            max_ttl,
        }
    }

    /// Cached claims for this hash, if still valid at `now` (Unix seconds).
    /// The expiry is re-checked here, so a hit never outlives `exp`.
    pub fn get(&self, hash: &[u8; 32], now: i64) -> Option<Hit> {
        let e = self.cache.get(hash)?;
        (e.hit.claims.exp > now).then_some(e.hit)
    }

    /// Stores claims verified with `keys` (the token naming `kid`) until
    /// `exp` (capped by the ceiling).
    pub fn insert(
        &self,
        hash: [u8; 32],
        claims: Arc<Claims>,
        keys: Arc<KeySet>,
        kid: Option<&str>,
        now: i64,
    ) {
        let left = claims.exp.saturating_sub(now);
        if left <= 0 {
            return;
        }
        let ttl = Duration::from_secs(left as u64).min(self.max_ttl);
        let hit = Hit {
            claims,
            keys,
            kid: kid.map(Arc::from),
        };
        self.cache.insert(hash, Entry { hit, ttl });
    }

    /// Entries now (pending inserts and evictions applied first: for the
    /// gauge at scrape time, not for the request path).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}
