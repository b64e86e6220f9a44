//! State that replicas behind one load balancer must share, so that they
//! behave as one: the DPoP proofs already seen (a proof replayed against
//! another replica is refused too), each client's and user's count of them, and the
//! policies' rate-limit buckets. In Redis when `redis:` is configured
//! (one Lua script per check, so each is atomic and one round trip), in
//! this process otherwise.
//!
//! Redis keys hold hashes, never a client id, user or source address:
//! `{prefix}dpop:jti:<proof hash>`, `{prefix}dpop:count:<client or user
//! hash>`, `{prefix}rl:<bucket hash>` (and `{prefix}probe`, see
//! [`RedisStore::run`]).
//! Every key expires by itself. Buckets are timed by Redis's clock, so
//! replicas whose clocks differ still share one rate.
//!
//! When Redis does not answer within `redis.timeout_ms`, a check is
//! *unavailable*: the request is refused with 503 (`on_failure: refuse`),
//! or this process's own state decides (`on_failure: local`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::Redis;
use crate::metrics::RedisMetrics;
use crate::policy::RateLimit;
use crate::ratelimit::Limiter;

/// A DPoP proof to remember: its key (the binding key's thumbprint and the
/// proof's `jti`) and who it counts against.
pub struct Proof {
    pub jkt: String,
    pub jti: String,
    /// Issuer and `client_id`, else issuer and `sub`, else the key: whose
    /// quota it takes.
    pub counted_as: String,
    /// The user of that client (issuer, `client_id` and `sub`) whose own,
    /// smaller quota it takes first, when the token names one.
    pub user: Option<String>,
}

/// Whose quota a proof exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// The client's, shared by all its users (`dpop.max_proofs_per_key`).
    Client,
    /// The user's own (`dpop.max_proofs_per_user`).
    User,
}

/// What remembering a proof found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofOutcome {
    /// Not seen before: now remembered.
    Fresh,
    /// Seen before: a replay.
    Replayed,
    /// The client, or this user of it, presented its quota of proofs this
    /// window; the window's rest.
    OverQuota(Quota, Duration),
    /// This process's set is full (local state only).
    Full,
}

/// Redis did not answer (or answered with an error): why.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

/// DPoP settings the stores need.
pub struct DpopLimits {
    /// How long a proof is remembered (its validity window plus margins).
    pub remembered: Duration,
    /// Proofs this process remembers at most (local state).
    pub max_entries: u64,
    /// Proofs one client may have remembered per window.
    pub quota: u64,
    /// Proofs one user of a client may have remembered per window.
    pub user_quota: u64,
}

/// One client's (or user's) proofs in the current window (local state).
struct ProofCount {
    since: Instant,
    count: std::sync::atomic::AtomicU64,
}

/// This process's own state.
struct Local {
    replay: moka::sync::Cache<[u8; 32], ()>,
    counts: moka::sync::Cache<String, Arc<ProofCount>>,
    limiter: Limiter,
}

/// The shared state: Redis (if configured) and this process's own.
pub struct SharedState {
    dpop: DpopLimits,
    local: Local,
    redis: Option<RedisStore>,
    /// Something needs the shared state: DPoP is on, or a policy rule has
    /// a rate limit (updated on reload). Redis down matters only then.
    dpop_enabled: bool,
    rate_limited: AtomicBool,
}

impl SharedState {
    pub fn new(
        dpop: DpopLimits,
        dpop_enabled: bool,
        redis: Option<(Redis, RedisMetrics)>,
    ) -> SharedState {
        // No max_capacity: a size-bounded moka cache admits new entries by
        // TinyLFU and may drop a remembered proof (which could then be
        // replayed). The bound is checked before each insert instead, and a
        // full set refuses new proofs (fail closed); entries leave only by
        // age.
        let replay = moka::sync::Cache::builder()
            .time_to_live(dpop.remembered)
            .build();
        // A client's count restarts a window after its first proof; proofs
        // of the window before are still remembered, so a client holds at
        // most twice its quota. (Were a counter dropped for capacity, that
        // client would merely start counting afresh.)
        let counts = moka::sync::Cache::builder()
            .time_to_live(dpop.remembered)
            .max_capacity(dpop.max_entries)
            .build();
        SharedState {
            local: Local {
                replay,
                counts,
                limiter: Limiter::default(),
            },
            redis: redis.map(|(cfg, metrics)| RedisStore::new(cfg, metrics)),
            dpop,
            dpop_enabled,
            rate_limited: AtomicBool::new(false),
        }
    }

    /// The Redis store, if one is configured.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.redis.as_ref()
    }

    /// Whether a policy rule (of the rules in force) has a rate limit.
    pub fn set_rate_limited(&self, any: bool) {
        self.rate_limited.store(any, Ordering::Relaxed);
    }

    /// Why this process should get no traffic, if it should not: Redis
    /// is configured with `on_failure: refuse`, something needs it (DPoP,
    /// a rate limit) and it has not answered the checks' probe since the
    /// process started (a wrong password, a missing ACL permission, an
    /// unreachable address: a new replica that could never pass a check
    /// stays out of the load balancer, and a rolling update stops there).
    ///
    /// Once it has answered, an outage does not make the process unready:
    /// every replica shares one Redis, so all would leave the load balancer
    /// together, and the requests that need no shared state (bearer
    /// tokens, rules without a rate limit) would fail with those that do.
    /// Those that need it are refused (503) and `fhirwall_redis_up` says
    /// so.
    pub fn not_ready(&self) -> Option<String> {
        let r = self.redis.as_ref()?;
        if !self.dpop_enabled && !self.rate_limited.load(Ordering::Relaxed) {
            return None;
        }
        (!r.cfg.fallback_local && !r.answered.load(Ordering::Relaxed)).then(|| {
            format!(
                "Redis at {} has not answered since start (the checks' probe fails)",
                r.cfg.url
            )
        })
    }

    /// Remembers a DPoP proof, unless it was seen before or its client is
    /// over its quota.
    pub async fn remember_proof(&self, p: &Proof) -> Result<ProofOutcome, Unavailable> {
        let key = proof_key(&p.jkt, &p.jti);
        if let Some(r) = &self.redis {
            // This process's own record first: a proof it accepted while
            // Redis was away (`on_failure: local`), or that Redis lost, is
            // still a replay here.
            if self.local.replay.contains_key(&key) {
                return Ok(ProofOutcome::Replayed);
            }
            match r.ask(r.remember_proof(&key, p, &self.dpop)).await {
                Some(Ok(ProofOutcome::Fresh)) => {
                    // Kept here too while there is room (Redis bounds the
                    // set then), for the case above.
                    if self.local.replay.entry_count() < self.dpop.max_entries {
                        self.local.replay.insert(key, ());
                    }
                    return Ok(ProofOutcome::Fresh);
                }
                Some(decided) => return decided,
                None => {}
            }
        }
        Ok(self.remember_locally(key, p))
    }

    fn remember_locally(&self, key: [u8; 32], p: &Proof) -> ProofOutcome {
        let l = &self.local;
        // Full, the cache would drop new entries and let replays through:
        // refuse instead (fail closed) until proofs age out.
        if l.replay.entry_count() >= self.dpop.max_entries {
            l.replay.run_pending_tasks();
            if l.replay.entry_count() >= self.dpop.max_entries {
                return ProofOutcome::Full;
            }
        }
        if l.replay.contains_key(&key) {
            return ProofOutcome::Replayed;
        }
        // The user's own quota first: a user over it takes nothing from
        // the client's, which the client's other users share.
        let counted = [
            (p.user.as_deref(), self.dpop.user_quota, Quota::User),
            (Some(p.counted_as.as_str()), self.dpop.quota, Quota::Client),
        ];
        for (who, quota, level) in counted {
            let Some(who) = who else { continue };
            let window = l.counts.get_with(who.to_string(), || {
                Arc::new(ProofCount {
                    since: Instant::now(),
                    count: std::sync::atomic::AtomicU64::new(0),
                })
            });
            if window.count.fetch_add(1, Ordering::Relaxed) >= quota {
                let left = self.dpop.remembered.saturating_sub(window.since.elapsed());
                return ProofOutcome::OverQuota(level, left);
            }
        }
        if l.replay.entry(key).or_insert(()).is_fresh() {
            ProofOutcome::Fresh
        } else {
            ProofOutcome::Replayed
        }
    }

    /// Counts a request against every rate limit in `asks` at once: taken
    /// from all their buckets, or (refused) from none. When refused, the
    /// first refusing ask's index and the seconds to wait.
    pub async fn take_all(
        &self,
        asks: &[crate::ratelimit::Ask<'_>],
    ) -> Result<Result<(), (usize, f64)>, Unavailable> {
        if asks.is_empty() {
            return Ok(Ok(()));
        }
        if let Some(r) = &self.redis {
            if let Some(decided) = r.ask(r.take_all(asks)).await {
                return decided;
            }
        }
        Ok(self.local.limiter.check_all(asks))
    }
}

/// The replay key of a proof: SHA-256 of the key's thumbprint and the jti.
fn proof_key(jkt: &str, jti: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(jkt.as_bytes());
    h.update(b"\0");
    h.update(jti.as_bytes());
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// SHA-256 of `parts` joined by NUL, in hex.
fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"\0");
        }
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

/// The Redis keys of a proof (by key thumbprint and `jti` only, as in
/// this process's set), of its client's count and of its user's, if any.
pub fn proof_keys(
    prefix: &str,
    proof: &[u8; 32],
    counted_as: &str,
    user: Option<&str>,
) -> (String, String, Option<String>) {
    (
        format!("{prefix}dpop:jti:{}", hex(proof)),
        format!("{prefix}dpop:count:{}", digest(&[counted_as])),
        user.map(|u| format!("{prefix}dpop:count:{}", digest(&[u]))),
    )
}

/// The Redis key of a rate-limit bucket: the rule, what it counts by and
/// who, as this process's buckets are keyed. Not the limit's numbers: a
/// limit tightened by a reload (during an attack) applies to the bucket as
/// it is, its tokens cut to the new capacity, instead of a fresh full one.
pub fn bucket_key(prefix: &str, rule: &str, limit: &RateLimit, who: &str) -> String {
    format!("{prefix}rl:{}", digest(&[rule, &limit.per, who]))
}

/// KEYS: the proof, its client's count, and its user's count if the
/// token names a user. ARGV: milliseconds a proof is remembered, the
/// client's quota, the user's quota. Returns `{0}` replayed, `{1}` fresh,
/// `{2, ms}` over the client's quota and `{3, ms}` over the user's, with
/// the window's rest. The same order of steps as the local state: seen?
/// counted (the user first, then the client), remembered.
const PROOF_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, 0}
end
local function over(key, quota)
  local n = redis.call('INCR', key)
  if n == 1 then
    redis.call('PEXPIRE', key, ARGV[1])
  end
  if n <= tonumber(quota) then
    return nil
  end
  local left = redis.call('PTTL', key)
  if left < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
    left = tonumber(ARGV[1])
  end
  return left
end
if KEYS[3] then
  local left = over(KEYS[3], ARGV[3])
  if left then
    return {3, left}
  end
end
local left = over(KEYS[2], ARGV[2])
if left then
  return {2, left}
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return {1, 0}
";

/// Token buckets (the arithmetic of `ratelimit::Bucket::take`) timed by
/// Redis's clock, taken from together: every bucket gives its tokens or
/// none does. KEYS: the buckets (each once). ARGV: for each, its capacity,
/// refill per second and tokens to take (a Bundle's matching entries).
/// Returns `{1, 0, 0}` taken, or `{0, ms, i}`: the wait for the first
/// bucket `i` (from 0) that holds too few (the whole window when asked for
/// more than its capacity). Time is kept in whole microseconds (exact in a
/// Lua number).
const BUCKETS_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = {}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1]) / 1000000
  local n = tonumber(ARGV[3 * i])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local tokens = tonumber(b[1]) or cap
  local at = tonumber(b[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - at) * rate)
  if n > cap then
    return {0, math.ceil(cap / rate / 1000), i - 1}
  end
  if tokens < n then
    return {0, math.ceil((n - tokens) / rate / 1000), i - 1}
  end
  state[i] = {cap, rate, tokens - n}
end
for i = 1, #KEYS do
  local cap, rate, tokens = state[i][1], state[i][2], state[i][3]
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - tokens) / rate / 1000) + 1000)
end
return {1, 0, 0}
";

/// The Redis side: one multiplexed connection (reconnected by the
/// connection manager, replaced by [`RedisStore::run`]'s probe when that
/// fails).
pub struct RedisStore {
    cfg: Redis,
    /// Replaced when a probe fails (see [`RedisStore::probe`]).
    conn: arc_swap::ArcSwapOption<redis::aio::ConnectionManager>,
    /// A probe has passed since start (readiness). Whether Redis is up
    /// now (the last probe passed, no command failed since) is
    /// `!failing` once it has, and the `fhirwall_redis_up` gauge.
    answered: AtomicBool,
    /// A command or probe failed and no probe has passed since: with
    /// `on_failure: local`, Redis is not asked meanwhile. (False at
    /// start: a process asks Redis until it has seen it fail.)
    failing: AtomicBool,
    proof_script: redis::Script,
    buckets_script: redis::Script,
    metrics: RedisMetrics,
    /// When a failed command was last logged.
    last_log: Mutex<Option<Instant>>,
}

impl RedisStore {
    fn new(cfg: Redis, metrics: RedisMetrics) -> RedisStore {
        metrics.up.set(0);
        RedisStore {
            cfg,
            conn: arc_swap::ArcSwapOption::empty(),
            answered: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            proof_script: redis::Script::new(PROOF_SCRIPT),
            buckets_script: redis::Script::new(BUCKETS_SCRIPT),
            metrics,
            last_log: Mutex::new(None),
        }
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        let c = &self.cfg;
        let mut settings = redis::RedisConnectionInfo::default().set_db(c.db);
        if let Some(u) = &c.username {
            settings = settings.set_username(u);
        }
        if let Some(p) = &c.password {
            settings = settings.set_password(String::from_utf8_lossy(&p.0));
        }
        use redis::IntoConnectionInfo;
        let addr = match &c.tls {
            None => redis::ConnectionAddr::Tcp(c.host.clone(), c.port),
            Some(_) => redis::ConnectionAddr::TcpTls {
                host: c.host.clone(),
                port: c.port,
                insecure: false,
                tls_params: None,
            },
        };
        let info = addr.into_connection_info()?.set_redis_settings(settings);
        match &c.tls {
            Some(tls) if tls.ca_pem.is_some() || tls.client.is_some() => {
                let certs = redis::TlsCertificates {
                    client_tls: tls
                        .client
                        .as_ref()
                        .map(|(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert.clone(),
                            client_key: key.0.clone(),
                        }),
                    root_cert: tls.ca_pem.clone(),
                };
                redis::Client::build_with_tls(info, certs)
            }
            _ => redis::Client::open(info),
        }
    }

    /// A new connection manager (it connects on first use). Errors only
    /// for an address configuration checks rule out.
    fn connect(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.cfg.timeout))
            .set_response_timeout(Some(self.cfg.timeout))
            // A failed connect is reported to the command that needed it
            // (and the next one connects again), not retried behind it.
            .set_number_of_retries(0);
        self.client()
            .and_then(|c| redis::aio::ConnectionManager::new_lazy_with_config(c, config))
    }

    /// Probes Redis every `every`, keeping `up` (and `fhirwall_redis_up`)
    /// true to what it finds. Runs until the process ends.
    pub async fn run(&self, every: Duration) {
        let mut was_up = None;
        loop {
            let ok = self.probe().await;
            if was_up != Some(ok) {
                if ok {
                    tracing::info!(url = %self.cfg.url, "Redis answers");
                } else {
                    tracing::error!(url = %self.cfg.url, "Redis does not answer as fhirwall needs");
                }
                was_up = Some(ok);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Runs both checks' scripts on short-lived probe keys under the
    /// prefix: what the checks need (login, database, permission on the
    /// keys and on scripts, `TIME` in a script, memory for a write), so an
    /// answer is "up" only when they could pass (a user allowed `SET` but
    /// not scripts would pass a plain write and refuse every check). A
    /// failed probe starts over with a new connection: the connection
    /// manager reconnects by itself only after I/O errors, and keeps a
    /// refused login or database selection (a user created later, a
    /// password set back to the configured one) until it is replaced. The
    /// password is the one read at start: a rotated one needs a restart.
    async fn probe(&self) -> bool {
        if self.conn.load().is_none() {
            match self.connect() {
                Ok(m) => self.conn.store(Some(Arc::new(m))),
                Err(e) => {
                    let _ = self.failed(format!("Redis client: {e}"));
                    return false;
                }
            }
        }
        // The checks themselves, on probe keys: a proof never seen (a
        // remembered one would end the script before its writes), counted
        // against a quota it cannot meet and kept 10 s; a bucket of one,
        // taken nothing from.
        let proof = Proof {
            jkt: String::new(),
            jti: String::new(),
            counted_as: "probe".into(),
            user: None,
        };
        let limits = DpopLimits {
            remembered: Duration::from_secs(10),
            max_entries: 0,
            quota: u64::MAX,
            user_quota: u64::MAX,
        };
        let fresh = matches!(
            self.remember_proof(&rand::random(), &proof, &limits).await,
            Ok(ProofOutcome::Fresh)
        );
        let bucket = RateLimit {
            per: "client".into(),
            requests: 1,
            per_seconds: 1,
        };
        let ask = crate::ratelimit::Ask {
            rule: "probe",
            limit: &bucket,
            who: "probe",
            n: 0,
        };
        let ok = fresh && matches!(self.take_all(&[ask]).await, Ok(Ok(())));
        if ok {
            self.set_up(true);
        } else {
            self.set_up(false);
            if let Ok(m) = self.connect() {
                self.conn.store(Some(Arc::new(m)));
            }
        }
        ok
    }

    /// Runs a check in Redis. `None`: this process decides instead
    /// (`on_failure: local`, counted): the check failed (`failed` logged
    /// why), or Redis is down. Once a command or probe has failed, Redis
    /// is not asked until a probe passes (each check would wait
    /// `timeout_ms` for a Redis that may say nothing): under `refuse` the
    /// check is refused at once.
    async fn ask<T>(
        &self,
        check: impl std::future::Future<Output = Result<T, Unavailable>>,
    ) -> Option<Result<T, Unavailable>> {
        let local = self.cfg.fallback_local;
        if self.failing.load(Ordering::Relaxed) {
            if local {
                self.metrics.fallbacks.inc();
                return None;
            }
            return Some(Err(Unavailable(
                "Redis is down until a probe passes".into(),
            )));
        }
        match check.await {
            Err(_) if local => {
                self.metrics.fallbacks.inc();
                None
            }
            decided => Some(decided),
        }
    }

    fn set_up(&self, up: bool) {
        if up {
            self.answered.store(true, Ordering::Relaxed);
        }
        self.failing.store(!up, Ordering::Relaxed);
        self.metrics.up.set(i64::from(up));
    }

    /// Runs one command with the configured timeout, recording its outcome.
    /// A failure of any kind marks Redis down until the next probe passes.
    async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        // Connected on first use if the probe has not yet (a request can
        // come first).
        let conn = match self.conn.load_full() {
            Some(c) => c,
            None => match self.connect() {
                Ok(m) => {
                    let m = Arc::new(m);
                    self.conn.store(Some(m.clone()));
                    m
                }
                Err(e) => {
                    self.metrics.commands("error");
                    return Err(self.failed(format!("Redis client: {e}")));
                }
            },
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.cfg.timeout, f((*conn).clone())).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let why = match result {
            Ok(Ok(v)) => {
                self.metrics.commands("ok");
                return Ok(v);
            }
            Ok(Err(e)) => {
                // The connection's own timeouts (connect, response) are
                // ours too.
                self.metrics
                    .commands(if e.is_timeout() { "timeout" } else { "error" });
                format!("Redis {what}: {e}")
            }
            Err(_) => {
                self.metrics.commands("timeout");
                format!(
                    "Redis {what}: no answer within {} ms (redis.timeout_ms)",
                    self.cfg.timeout.as_millis()
                )
            }
        };
        // An error reply (out of memory, read-only, no permission) refuses
        // the checks as surely as a lost connection.
        self.set_up(false);
        Err(self.failed(why))
    }

    /// Logs why a command failed, at most once every ten seconds (an
    /// outage would otherwise log every request), and returns it.
    fn failed(&self, why: String) -> Unavailable {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            let then = if self.cfg.fallback_local {
                "this process's own state decides (redis.on_failure: local)"
            } else {
                "requests that need it are refused (redis.on_failure: refuse)"
            };
            tracing::warn!(url = %self.cfg.url, error = %why, then, "Redis command failed");
        }
        Unavailable(why)
    }

    async fn remember_proof(
        &self,
        proof: &[u8; 32],
        p: &Proof,
        dpop: &DpopLimits,
    ) -> Result<ProofOutcome, Unavailable> {
        let (proof_key, count_key, user_key) = proof_keys(
            &self.cfg.key_prefix,
            proof,
            &p.counted_as,
            p.user.as_deref(),
        );
        let ms = dpop.remembered.as_millis() as u64;
        let mut inv = self.proof_script.key(proof_key);
        inv.key(count_key);
        if let Some(k) = user_key {
            inv.key(k);
        }
        inv.arg(ms).arg(dpop.quota).arg(dpop.user_quota);
        let (what, left): (i64, i64) = self
            .call("DPoP replay check", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(match what {
            0 => ProofOutcome::Replayed,
            1 => ProofOutcome::Fresh,
            2 | 3 => ProofOutcome::OverQuota(
                if what == 3 {
                    Quota::User
                } else {
                    Quota::Client
                },
                Duration::from_millis(left.max(0) as u64),
            ),
            other => {
                return Err(self.failed(format!(
                    "Redis DPoP replay check: unexpected answer {other}"
                )));
            }
        })
    }

    async fn take_all(
        &self,
        asks: &[crate::ratelimit::Ask<'_>],
    ) -> Result<Result<(), (usize, f64)>, Unavailable> {
        // One key once (its asks summed): the script reads each bucket
        // once, so a repeated key would be charged only for its last ask.
        let mut buckets: Vec<(String, &RateLimit, u64, usize)> = Vec::new();
        for (i, a) in asks.iter().enumerate() {
            let key = bucket_key(&self.cfg.key_prefix, a.rule, a.limit, a.who);
            match buckets.iter_mut().find(|(k, ..)| *k == key) {
                Some((_, _, n, _)) => *n += u64::from(a.n),
                None => buckets.push((key, a.limit, u64::from(a.n), i)),
            }
        }
        let mut inv = self.buckets_script.prepare_invoke();
        for (key, limit, n, _) in &buckets {
            let capacity = f64::from(limit.requests);
            let rate = capacity / f64::from(limit.per_seconds);
            inv.key(key)
                .arg(limit.requests)
                .arg(format!("{rate:.17}"))
                .arg(*n);
        }
        let (taken, wait_ms, index): (i64, i64, i64) = self
            .call("rate limit", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(if taken == 1 {
            Ok(())
        } else {
            let first = usize::try_from(index)
                .ok()
                .and_then(|i| buckets.get(i))
                .map_or(0, |b| b.3);
            Err((first, wait_ms.max(1) as f64 / 1000.0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_entries: u64, quota: u64) -> DpopLimits {
        DpopLimits {
            remembered: Duration::from_secs(60),
            max_entries,
            quota,
            user_quota: quota,
        }
    }

    fn proof(jti: &str, client: &str) -> Proof {
        Proof {
            jkt: "thumb".into(),
            jti: jti.into(),
            counted_as: client.into(),
            user: None,
        }
    }

    fn user_proof(jti: &str, client: &str, user: &str) -> Proof {
        Proof {
            user: Some(format!("{client}\0{user}")),
            ..proof(jti, client)
        }
    }

    #[tokio::test]
    async fn local_state_refuses_replays_counts_clients_and_fills_up() {
        let s = SharedState::new(limits(3, 2), true, None);
        assert_eq!(
            s.remember_proof(&proof("a", "c1")).await.unwrap(),
            ProofOutcome::Fresh
        );
        assert_eq!(
            s.remember_proof(&proof("a", "c1")).await.unwrap(),
            ProofOutcome::Replayed
        );
        assert_eq!(
            s.remember_proof(&proof("b", "c1")).await.unwrap(),
            ProofOutcome::Fresh
        );
        assert!(matches!(
            s.remember_proof(&proof("c", "c1")).await.unwrap(),
            ProofOutcome::OverQuota(Quota::Client, d) if d > Duration::from_secs(50)
        ));
        assert_eq!(
            s.remember_proof(&proof("d", "c2")).await.unwrap(),
            ProofOutcome::Fresh
        );
        // moka counts entries eventually.
        s.local.replay.run_pending_tasks();
        assert_eq!(
            s.remember_proof(&proof("e", "c2")).await.unwrap(),
            ProofOutcome::Full
        );
        assert!(s.not_ready().is_none());
    }

    /// A user has a quota of its own within its client's: one user over it
    /// is refused without spending the client's, which its other users
    /// still have; the client's still bounds them all.
    #[tokio::test]
    async fn local_state_counts_each_user_before_the_client() {
        let s = SharedState::new(
            DpopLimits {
                user_quota: 2,
                ..limits(100, 5)
            },
            true,
            None,
        );
        let outcome = async |jti: &str, user: &str| {
            s.remember_proof(&user_proof(jti, "c1", user))
                .await
                .unwrap()
        };
        assert_eq!(outcome("a1", "alice").await, ProofOutcome::Fresh);
        assert_eq!(outcome("a2", "alice").await, ProofOutcome::Fresh);
        for jti in ["a3", "a4", "a5", "a6"] {
            assert!(matches!(
                outcome(jti, "alice").await,
                ProofOutcome::OverQuota(Quota::User, _)
            ));
        }
        // Alice's refused proofs took none of the client's five.
        assert_eq!(outcome("b1", "bob").await, ProofOutcome::Fresh);
        assert_eq!(outcome("b2", "bob").await, ProofOutcome::Fresh);
        assert_eq!(outcome("c1", "carol").await, ProofOutcome::Fresh);
        assert!(matches!(
            outcome("c2", "carol").await,
            ProofOutcome::OverQuota(Quota::Client, _)
        ));
        // A proof without a user counts against the client only.
        assert!(matches!(
            s.remember_proof(&proof("n1", "c1")).await.unwrap(),
            ProofOutcome::OverQuota(Quota::Client, _)
        ));
        assert_eq!(
            s.remember_proof(&proof("n2", "c2")).await.unwrap(),
            ProofOutcome::Fresh
        );
    }

    #[test]
    fn keys_hold_hashes_only() {
        let p = proof_key("thumb", "jti-1");
        let (a, b, u) = proof_keys(
            "fw:",
            &p,
            "client\0https://iss\0app-7",
            Some("user\0https://iss\0app-7\0alice"),
        );
        let u = u.unwrap();
        assert!(
            a.starts_with("fw:dpop:jti:")
                && b.starts_with("fw:dpop:count:")
                && u.starts_with("fw:dpop:count:"),
            "{a} {b} {u}"
        );
        assert!(!a.contains("app-7") && !b.contains("app-7") && !a.contains("jti-1"));
        assert!(!u.contains("alice") && u != b, "{u}");
        // A proof is one proof whoever it is counted against.
        let (a8, b8, u8) = proof_keys("fw:", &p, "client\0https://iss\0app-8", None);
        assert_eq!(a8, a);
        assert_ne!(b8, b);
        assert!(u8.is_none());
        assert_ne!(
            proof_keys("fw:", &proof_key("thumb", "jti-2"), "x", None).0,
            a
        );
        let limit = RateLimit {
            requests: 3,
            per_seconds: 60,
            per: "user".into(),
        };
        let k = bucket_key("fw:", "rule-1", &limit, "user:alice");
        assert!(k.starts_with("fw:rl:") && !k.contains("alice"), "{k}");
        let other = RateLimit {
            requests: 4,
            ..limit.clone()
        };
        // A changed limit is the same bucket (tightened, it applies at once).
        assert_eq!(bucket_key("fw:", "rule-1", &other, "user:alice"), k);
        assert_ne!(bucket_key("fw:", "rule-2", &other, "user:alice"), k);
        assert_ne!(bucket_key("fw:", "rule-1", &other, "user:bob"), k);
    }
}
