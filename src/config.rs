//! Configuration: `config.yaml` is parsed into plain data ([`Config`]),
//! validated in its own step ([`Config::validate`]) — every problem is
//! collected with its key path — and only then turned into the runtime
//! [`Settings`]. Parsing, validating and running never mix.
//!
//! YAML is read with `serde-saphyr`: it rejects duplicate keys and reports
//! line and column, and every struct denies unknown fields.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use url::Url;

/// Algorithms an issuer may be allowed to use: asymmetric only.
pub const ALLOWED_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Routes below the FHIR base that pass without a token by default.
pub const DEFAULT_PUBLIC_ROUTES: &[&str] = &["metadata", ".well-known/smart-configuration"];

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Address the FHIR proxy listens on, e.g. `0.0.0.0:8080`.
    pub listen: String,
    /// The FHIR base URL as clients see it, e.g. `https://fhir.example.org/fhir`.
    pub public_base_url: String,
    /// Extra paths below the base that need no token (besides the defaults).
    #[serde(default)]
    pub public_routes: Vec<String>,
    pub upstream: UpstreamConfig,
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub tokens: TokenConfig,
    #[serde(default)]
    pub jwks: JwksConfig,
    pub admin: AdminConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub server: ServerConfig,
    /// Verified context forwarded to the upstream as headers: context name
    /// (`sub`, `client_id`, `patient`, `fhir_user`, `scope`, `issuer`) → header name.
    #[serde(default)]
    pub forward_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub patient_context: PatientContextConfig,
    #[serde(default)]
    pub dpop: DpopConfig,
    /// TLS on the proxy listener (and client certificates for RFC 8705).
    #[serde(default, deserialize_with = "present")]
    pub tls: Option<TlsConfig>,
    /// Operators' policies: every `*.yaml` in this directory (relative to
    /// the config file), in file-name order. See `policies/README.md`.
    #[serde(default, deserialize_with = "present")]
    pub policies: Option<PoliciesConfig>,
    /// How an emergency is declared (break-glass): see policies/README.md.
    #[serde(default)]
    pub break_glass: BreakGlassConfig,
    /// Roles: a claim's values mapped to ceilings of scopes and interactions.
    #[serde(default, deserialize_with = "present")]
    pub roles: Option<RolesConfig>,
    /// State shared by replicas (DPoP proofs seen, rate-limit buckets)
    /// kept in Redis; without it, each process keeps its own.
    #[serde(default, deserialize_with = "present")]
    pub redis: Option<RedisConfig>,
    /// The directory of the config file (relative paths are below it).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Keys that are not settings, by path (`issuers[0].audince`): each
    /// is a problem [`Config::validate`] reports, with everything else.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
    /// The files [`load`] read, as they were before it read them.
    #[serde(skip)]
    pub loaded_stamp: FilesStamp,
    /// Read for a reload ([`load_for_reload`]) or the offline commands
    /// ([`load_offline`]): the upstream's host name
    /// is not looked up, and the files of settings only a restart applies
    /// (keys, certificates, passwords; the audit file's and the upgrade
    /// socket's directories) are neither read nor judged: the running
    /// process keeps what it read at start, and a file gone since (a
    /// rotated secret, a volume not mounted) must not keep new rules, an
    /// emergency deny above all, from applying. The settings hold
    /// placeholders for them.
    #[serde(skip)]
    pub for_reload: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PoliciesConfig {
    pub dir: String,
    /// Also reload when a file of the directory (or the config) changes,
    /// checked every couple of seconds (SIGHUP always works).
    #[serde(default)]
    pub watch: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RolesConfig {
    /// The claim naming the user's roles (string or list); `fhirUser`
    /// means the resource type of the `fhirUser` reference.
    pub claim: String,
    /// Role → its ceiling.
    pub map: BTreeMap<String, RoleCeiling>,
    /// Tokens with no mapped role: `deny` (default) or `allow` (no ceiling).
    #[serde(default = "d_unmapped")]
    pub unmapped: String,
}

fn d_unmapped() -> String {
    "deny".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct RoleCeiling {
    /// The most the role's tokens may be granted (SMART scopes).
    pub scopes: Vec<String>,
    /// Interactions the role may use; empty: any the scopes allow.
    #[serde(default)]
    pub interactions: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    /// `redis://host[:port][/db]`, without credentials.
    pub url: String,
    /// ACL user name (Redis 6+), if the server has users.
    #[serde(default, deserialize_with = "present")]
    pub username: Option<String>,
    /// A file holding the password (relative to the config file).
    #[serde(default, deserialize_with = "present")]
    pub password_file: Option<String>,
    /// With `rediss://`: CA certificates (PEM) the server's certificate
    /// must chain to, instead of the system's.
    #[serde(default, deserialize_with = "present")]
    pub ca_file: Option<String>,
    /// With `rediss://`: fhirwall's client certificate chain and key (PEM),
    /// for a server that asks for one (Redis's `tls-auth-clients`).
    #[serde(default, deserialize_with = "present")]
    pub client_cert_file: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_key_file: Option<String>,
    /// Prefix of every key fhirwall writes.
    #[serde(default = "d_redis_prefix")]
    pub key_prefix: String,
    /// How long one command may take before Redis counts as unavailable.
    #[serde(default = "d_redis_timeout")]
    pub timeout_ms: u64,
    /// Redis unavailable: `refuse` (503 for requests that need it) or
    /// `local` (this process's own state, as without Redis).
    #[serde(default = "d_redis_on_failure")]
    pub on_failure: String,
}

fn d_redis_prefix() -> String {
    "fhirwall:".into()
}
fn d_redis_timeout() -> u64 {
    200
}
fn d_redis_on_failure() -> String {
    "refuse".into()
}

/// Redis, validated.
#[derive(Debug, Clone)]
pub struct Redis {
    /// The URL as configured (it holds no credentials).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `rediss://`: TLS, with these settings.
    pub tls: Option<RedisTls>,
    pub key_prefix: String,
    pub timeout: Duration,
    /// `on_failure: local`.
    pub fallback_local: bool,
}

/// TLS to Redis, validated.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// PEM CA certificates (else the system's).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and key.
    pub client: Option<(Vec<u8>, Secret)>,
}

/// Roles, validated.
#[derive(Debug, Clone)]
pub struct Roles {
    pub claim: String,
    pub map: BTreeMap<String, (crate::scope::ScopeSet, Vec<String>)>,
    pub unmapped_deny: bool,
}

/// Break-glass: a request carrying a reason may pass policy rules marked
/// `break_glass: true` (never scopes or the patient context).
#[derive(Debug, Clone, Deserialize)]
pub struct BreakGlassConfig {
    /// Request header carrying the reason (never sent upstream). Ignored
    /// when `claim` is set.
    #[serde(default = "d_bg_header")]
    pub header: String,
    /// Or a token claim carrying it (set by the authorization server): when
    /// set, only the claim can declare an emergency.
    #[serde(default, deserialize_with = "present")]
    pub claim: Option<String>,
    /// Only tokens issued (`iat`) at most this long ago may break glass.
    #[serde(default, deserialize_with = "present")]
    pub max_token_age_seconds: Option<u64>,
}

impl Default for BreakGlassConfig {
    fn default() -> Self {
        BreakGlassConfig {
            header: d_bg_header(),
            claim: None,
            max_token_age_seconds: None,
        }
    }
}

fn d_bg_header() -> String {
    "X-Fhirwall-Break-Glass".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct TlsConfig {
    /// PEM certificate chain of the listener.
    pub cert_file: String,
    /// PEM private key of the listener.
    pub key_file: String,
    /// PEM bundle of the CAs client certificates must chain to.
    #[serde(default, deserialize_with = "present")]
    pub client_ca_file: Option<String>,
    /// `none`, `request` (verified when sent) or `require`.
    #[serde(default = "d_client_auth")]
    pub client_auth: String,
}

fn d_client_auth() -> String {
    "none".into()
}

/// Whether the listener asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    None,
    Request,
    Require,
}

/// TLS settings of the proxy listener, validated (files readable, PEM
/// parsed), so that starting the listener cannot fail on them.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// DER certificates of the client CAs.
    pub client_cas: Vec<Vec<u8>>,
    pub client_auth: ClientAuthMode,
}

/// DPoP (RFC 9449) proof checking for DPoP-bound tokens.
#[derive(Debug, Clone, Deserialize)]
pub struct DpopConfig {
    /// Accept the DPoP scheme (DPoP-bound tokens are refused when off).
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Algorithms a proof may use; default: every allowed asymmetric one.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// How old a proof's `iat` may be.
    #[serde(default = "d_dpop_max_age")]
    pub max_age_seconds: u64,
    /// How far a proof's `iat` may lie in the future (clock skew).
    #[serde(default = "d_dpop_leeway")]
    pub leeway_seconds: u64,
    /// Proof `jti`s remembered (for `max_age_seconds`) to refuse replays.
    #[serde(default = "d_dpop_replay")]
    pub replay_cache_max_entries: u64,
    /// Proofs one client (issuer and `client_id`, else the key) may have
    /// remembered per replay window, so that one client cannot fill the set
    /// for all; default a tenth of the set.
    #[serde(default, deserialize_with = "present")]
    pub max_proofs_per_key: Option<u64>,
    /// Proofs one user of a client (issuer, `client_id` and a `sub` other
    /// than the client's own, on a token with `patient/` or `user/`
    /// scopes) may have remembered per window, counted
    /// before the client's, so that one user cannot spend the client's
    /// quota for its other users; default a hundredth of the client's, at
    /// least 1000 (at most the client's).
    #[serde(default, deserialize_with = "present")]
    pub max_proofs_per_user: Option<u64>,
    /// Issue `DPoP-Nonce` and require proofs to carry it (RFC 9449 §9).
    #[serde(default)]
    pub require_nonce: bool,
    /// How long an issued nonce is good (up to twice this across a change).
    #[serde(default = "d_nonce_lifetime")]
    pub nonce_lifetime_seconds: u64,
    /// A secret (32 to 1024 bytes) the nonces are made with, shared by
    /// every replica, so a nonce one issues another accepts; without it
    /// each process makes its own at start.
    #[serde(default, deserialize_with = "present")]
    pub nonce_key_file: Option<String>,
}

fn d_nonce_lifetime() -> u64 {
    120
}

impl Default for DpopConfig {
    fn default() -> Self {
        DpopConfig {
            enabled: true,
            algorithms: Vec::new(),
            max_age_seconds: d_dpop_max_age(),
            leeway_seconds: d_dpop_leeway(),
            replay_cache_max_entries: d_dpop_replay(),
            max_proofs_per_key: None,
            max_proofs_per_user: None,
            require_nonce: false,
            nonce_lifetime_seconds: d_nonce_lifetime(),
            nonce_key_file: None,
        }
    }
}

fn d_dpop_max_age() -> u64 {
    60
}
fn d_dpop_leeway() -> u64 {
    5
}
fn d_dpop_replay() -> u64 {
    1_000_000
}

/// DPoP settings, validated.
#[derive(Debug, Clone)]
pub struct Dpop {
    pub enabled: bool,
    pub policy: crate::dpop::DpopPolicy,
    /// The proof algorithms, space-separated, for `WWW-Authenticate` `algs`.
    pub algs: String,
    pub replay_cache_max_entries: u64,
    pub max_proofs_per_key: u64,
    pub max_proofs_per_user: u64,
    /// Nonce lifetime when nonces are required.
    pub nonce_lifetime_seconds: Option<u64>,
    /// The nonces' key from `dpop.nonce_key_file`, if one is set.
    pub nonce_key: Option<Secret>,
}

/// Secret bytes: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// How requests under `patient/` scopes are treated.
#[derive(Debug, Clone, Deserialize)]
pub struct PatientContextConfig {
    /// A type search that names no patient: `narrow` (add the patient
    /// parameter) or `refuse` (403).
    #[serde(default = "d_unnarrowed")]
    pub unnarrowed_search: String,
    /// A resource in the patient's compartment that also names another
    /// Patient there: `leave_out` (404 for a read, left out of searches
    /// and `$everything`) or `pass` (the CompartmentDefinition's reading).
    #[serde(default = "d_shared_resources")]
    pub shared_resources: String,
}

impl Default for PatientContextConfig {
    fn default() -> Self {
        PatientContextConfig {
            unnarrowed_search: d_unnarrowed(),
            shared_resources: d_shared_resources(),
        }
    }
}

fn d_shared_resources() -> String {
    "leave_out".into()
}

fn d_unnarrowed() -> String {
    "narrow".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamConfig {
    /// Upstream FHIR base, `http://` or `https://`, e.g. `http://10.0.0.5:8080/fhir`.
    pub url: String,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_read_timeout")]
    pub read_timeout_ms: u64,
    #[serde(default = "d_read_timeout")]
    pub write_timeout_ms: u64,
    #[serde(default = "d_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// Verify the upstream's TLS certificate (https only).
    #[serde(default = "d_true")]
    pub verify_tls: bool,
    /// PEM bundle of CAs to trust for the upstream (https only).
    #[serde(default, deserialize_with = "present")]
    pub ca_file: Option<String>,
    /// Pass the client's `Authorization` header on to the upstream.
    #[serde(default)]
    pub forward_authorization: bool,
    /// Accept that the tokens go to an upstream nobody verifies (plain
    /// http off loopback, or `verify_tls: false`): a mesh's sidecar
    /// encrypting the hop, say. Warned of at start.
    #[serde(default)]
    pub forward_authorization_unverified: bool,
    /// Largest upstream answer fhirwall reads whole to check it (reads by id
    /// under patient/ scopes); a larger one is refused with 502.
    #[serde(default = "d_max_checked_answer")]
    pub max_checked_answer_bytes: usize,
    /// The most an answer read to be checked may take to arrive whole,
    /// from its header on (each read is also timed by `read_timeout_ms`).
    #[serde(default = "d_checked_answer_timeout")]
    pub checked_answer_timeout_ms: u64,
    /// The upstream resolves conditional references (`"reference":
    /// "Patient?identifier=…"`) in what is written (HAPI does unless
    /// `allowInlineMatchUrlReferences` is off): fhirwall then reads every
    /// written resource and decides them like searches.
    #[serde(default = "d_true")]
    pub resolves_conditional_references: bool,
    /// Ids that are numbers written with leading zeros (`0123`) pass. Off
    /// by default: HAPI's JPA server reads an all-digit id as its database
    /// key, so `Patient/0123` and `?patient=0123` reach Patient/123 there,
    /// which fhirwall's audit and `path` rules would not see.
    #[serde(default)]
    pub allow_zero_padded_ids: bool,
    /// Parameters starting with `_` the upstream defines, beyond those
    /// fhirwall knows, that reach nothing beyond the resources a request
    /// names (a paging cursor continuing the same search, say): passed as
    /// reaching nothing. Any other unknown `_` parameter is refused.
    #[serde(default)]
    pub special_params: Vec<String>,
}

fn d_max_checked_answer() -> usize {
    16 * 1024 * 1024
}

fn d_checked_answer_timeout() -> u64 {
    120_000
}

#[derive(Debug, Clone, Deserialize)]
pub struct IssuerConfig {
    /// Short name used in metrics and audit records.
    pub name: String,
    /// Exact `iss` value of the tokens.
    pub issuer: String,
    /// JWKS location; when absent, `discovery` must be true.
    #[serde(default, deserialize_with = "present")]
    pub jwks_uri: Option<String>,
    /// Find `jwks_uri` via `{issuer}/.well-known/openid-configuration`,
    /// then `{issuer}/.well-known/smart-configuration`.
    #[serde(default)]
    pub discovery: bool,
    /// Accepted `aud` values; the token's `aud` must contain one.
    pub audiences: Vec<String>,
    #[serde(default = "d_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "d_leeway")]
    pub leeway_seconds: u64,
    /// Require the JWT header `typ` to be `at+jwt` (RFC 9068).
    #[serde(default)]
    pub require_at_jwt_typ: bool,
    /// Refuse plain bearer tokens of this issuer: every token must be
    /// sender-constrained (DPoP today; mTLS with issue 4).
    #[serde(default)]
    pub require_binding: bool,
    /// Refuse plain bearer tokens issued to these clients (`client_id`).
    #[serde(default)]
    pub require_binding_for_clients: Vec<String>,
    /// RFC 7662 token introspection: opaque tokens (and this issuer's JWTs)
    /// are checked by the authorization server.
    #[serde(default, deserialize_with = "present")]
    pub introspection: Option<IntrospectionConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IntrospectionConfig {
    /// The introspection endpoint (RFC 7662), http(s).
    pub endpoint: String,
    /// How fhirwall authenticates: client_secret_basic, client_secret_post
    /// or private_key_jwt.
    #[serde(default = "d_auth_method")]
    pub auth_method: String,
    pub client_id: String,
    /// The client secret, for the client_secret_* methods…
    #[serde(default, deserialize_with = "present")]
    pub client_secret: Option<String>,
    /// …or the environment variable holding it (keeps it out of the file).
    #[serde(default, deserialize_with = "present")]
    pub client_secret_env: Option<String>,
    /// PEM private key (PKCS#8 RSA or EC P-256) for private_key_jwt.
    #[serde(default, deserialize_with = "present")]
    pub private_key_file: Option<String>,
    /// Signing algorithm of the client assertion (RS256 or ES256).
    #[serde(default, deserialize_with = "present")]
    pub private_key_alg: Option<String>,
    /// The `kid` the client assertion names (the key's id as registered
    /// with the authorization server, for one that holds several).
    #[serde(default, deserialize_with = "present")]
    pub private_key_id: Option<String>,
    /// The client assertion's `aud` (default: the endpoint). Some servers
    /// want their issuer or token endpoint there.
    #[serde(default, deserialize_with = "present")]
    pub assertion_audience: Option<String>,
    #[serde(default = "d_introspection_timeout")]
    pub timeout_ms: u64,
    /// Active results are cached no longer than the token's exp and this
    /// ceiling: a revocation takes effect within it.
    #[serde(default = "d_introspection_ttl")]
    pub cache_max_ttl_seconds: u64,
    /// Inactive results are cached this long.
    #[serde(default = "d_introspection_negative")]
    pub negative_cache_seconds: u64,
    /// Refuse active answers that carry no `aud` (the server must say the
    /// token is for this gateway).
    #[serde(default = "d_true")]
    pub require_aud: bool,
    /// Send opaque tokens (not JWTs) to this issuer. Needed when several
    /// issuers introspect; with one, it takes them by default.
    #[serde(default, deserialize_with = "present")]
    pub opaque_tokens: Option<bool>,
    /// Introspections a client address may have answered inactive (or
    /// refused) per minute; past it, its tokens not already cached are
    /// refused (429) without a call until the minute is over, so made-up
    /// tokens cannot drive the authorization server's load. 0: no limit.
    #[serde(default = "d_inactive_budget")]
    pub max_inactive_per_source_per_minute: u32,
    /// Calls to the endpoint in flight at once; a token not already cached
    /// that would make one more gets 503 without a call, so a flood of
    /// made-up tokens from many addresses cannot drive the authorization
    /// server beyond this (the budget per address bounds each one).
    #[serde(default = "d_max_concurrent_calls")]
    pub max_concurrent_calls: u32,
}

fn d_inactive_budget() -> u32 {
    60
}

fn d_max_concurrent_calls() -> u32 {
    32
}

fn d_auth_method() -> String {
    "client_secret_basic".into()
}
fn d_introspection_timeout() -> u64 {
    2000
}
fn d_introspection_ttl() -> u64 {
    60
}
fn d_introspection_negative() -> u64 {
    10
}

/// How fhirwall authenticates to an introspection endpoint.
#[derive(Clone)]
pub enum ClientAuth {
    Basic {
        secret: String,
    },
    Post {
        secret: String,
    },
    PrivateKeyJwt {
        key: jsonwebtoken::EncodingKey,
        alg: Algorithm,
    },
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret or a key.
        f.write_str(match self {
            ClientAuth::Basic { .. } => "client_secret_basic",
            ClientAuth::Post { .. } => "client_secret_post",
            ClientAuth::PrivateKeyJwt { .. } => "private_key_jwt",
        })
    }
}

/// Introspection settings of an issuer, validated.
#[derive(Debug, Clone)]
pub struct Introspection {
    pub endpoint: Url,
    pub client_id: String,
    pub auth: ClientAuth,
    pub timeout: Duration,
    pub cache_max_ttl: Duration,
    pub negative_ttl: Duration,
    pub require_aud: bool,
    /// This issuer introspects opaque tokens.
    pub opaque_tokens: bool,
    /// Inactive answers a client address may have per minute (0: no limit).
    pub max_inactive_per_source_per_minute: u32,
    /// Calls to the endpoint in flight at once.
    pub max_concurrent_calls: u32,
    /// private_key_jwt: the assertion's `kid`, if one is configured.
    pub assertion_kid: Option<String>,
    /// private_key_jwt: the assertion's `aud` (the endpoint by default).
    pub assertion_audience: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenConfig {
    #[serde(default = "d_max_token")]
    pub max_bytes: usize,
    #[serde(default = "d_cache_entries")]
    pub cache_max_entries: u64,
    #[serde(default = "d_cache_ttl")]
    pub cache_max_ttl_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JwksConfig {
    /// An unknown `kid` re-fetches an issuer's JWKS at most this often.
    #[serde(default = "d_refetch")]
    pub min_refetch_interval_seconds: u64,
    /// Refresh period when the JWKS response has no Cache-Control max-age.
    #[serde(default = "d_refresh")]
    pub refresh_default_seconds: u64,
    #[serde(default = "d_refresh_min")]
    pub refresh_min_seconds: u64,
    #[serde(default = "d_refresh_max")]
    pub refresh_max_seconds: u64,
    #[serde(default = "d_fetch_timeout")]
    pub fetch_timeout_ms: u64,
    /// PEM bundle of extra CAs to trust for JWKS and discovery over https
    /// (added to the system roots), e.g. a hospital's internal CA.
    #[serde(default, deserialize_with = "present")]
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditConfig {
    /// `stdout`, `file` or `fhir`.
    #[serde(default = "d_sink")]
    pub sink: String,
    /// `json` (one JSON line per record) or `audit_event` (FHIR AuditEvent
    /// resources shaped after IHE BALP).
    #[serde(default = "d_audit_format")]
    pub format: String,
    /// File to append to when `sink: file` (relative to the config file).
    #[serde(default, deserialize_with = "present")]
    pub path: Option<String>,
    /// The FHIR server AuditEvents are sent to when `sink: fhir`.
    #[serde(default, deserialize_with = "present")]
    pub fhir: Option<AuditFhirConfig>,
    /// A request goes upstream only once its decision record is written.
    #[serde(default = "d_true")]
    pub record_before_upstream: bool,
    /// `batch` (every batch is fsynced before its records count as
    /// written), `interval` or `never`.
    #[serde(default = "d_fsync")]
    pub fsync: String,
    #[serde(default = "d_fsync_interval")]
    pub fsync_interval_ms: u64,
    /// Rotate the file when it reaches this size (0: never).
    #[serde(default = "d_rotate_bytes")]
    pub rotate_max_bytes: u64,
    /// Rotate the file when it is this old (0: never).
    #[serde(default = "d_rotate_age")]
    pub rotate_max_age_seconds: u64,
    /// Rotated files kept (0: all).
    #[serde(default = "d_rotate_keep")]
    pub rotate_keep: usize,
    /// Records queued for the writer.
    #[serde(default = "d_audit_queue")]
    pub queue_capacity: usize,
    /// When the sink fails or cannot keep up: `refuse` new requests (503)
    /// or `spill` records to `spill_path`.
    #[serde(default = "d_on_failure")]
    pub on_failure: String,
    #[serde(default, deserialize_with = "present")]
    pub spill_path: Option<String>,
    /// How often a failed sink is tried again.
    #[serde(default = "d_audit_retry")]
    pub retry_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditFhirConfig {
    /// FHIR base URL; batches are POSTed to it as `batch` Bundles.
    pub endpoint: String,
    #[serde(default = "d_audit_fhir_timeout")]
    pub timeout_ms: u64,
    /// Most AuditEvents per Bundle.
    #[serde(default = "d_audit_fhir_batch")]
    pub batch_max: usize,
    /// Environment variable holding a bearer token for the endpoint.
    #[serde(default, deserialize_with = "present")]
    pub bearer_token_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerConfig {
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    #[serde(default = "d_grace")]
    pub grace_period_seconds: u64,
    #[serde(default = "d_shutdown")]
    pub graceful_shutdown_timeout_seconds: u64,
    /// Largest request body fhirwall reads to classify (Bundles, `_search`
    /// forms, written resources).
    #[serde(default = "d_max_body")]
    pub max_classified_body_bytes: usize,
    /// The most request-body bytes all requests together may hold while
    /// they are decided; beyond it new ones are refused with 503.
    #[serde(default = "d_max_held")]
    pub max_held_body_bytes: usize,
    /// How long a body fhirwall reads may take to arrive, whole.
    #[serde(default = "d_read_timeout")]
    pub body_read_timeout_ms: u64,
    /// The most parameters (query and form together; each Bundle entry's
    /// on its own) a request may carry, below the upstream's own limit.
    #[serde(default = "d_max_parameters")]
    pub max_parameters: usize,
    /// Proxies in front of fhirwall (CIDR blocks or addresses) whose
    /// `X-Forwarded-For` names the client. Empty: the TCP peer is the
    /// client and the header is ignored.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// NAT64 prefixes (RFC 6052) IPv4 clients may reach fhirwall through:
    /// such a client is rate-limited by its IPv4 address.
    #[serde(default = "d_nat64")]
    pub nat64_prefixes: Vec<String>,
    /// The Unix socket a process started with `run --upgrade` takes the
    /// listening sockets over on (zero-downtime restart; see config.yaml).
    /// Unset: no takeover (SIGQUIT is ignored).
    #[serde(default, deserialize_with = "present")]
    pub upgrade_sock: Option<String>,
}

fn d_nat64() -> Vec<String> {
    vec!["64:ff9b::/96".into()]
}

fn d_connect_timeout() -> u64 {
    2_000
}
fn d_read_timeout() -> u64 {
    30_000
}
fn d_max_parameters() -> usize {
    100
}
/// Whether a URL holds a user or password (shown wherever the URL is).
fn has_credentials(u: &Url) -> bool {
    !u.username().is_empty() || u.password().is_some()
}

fn d_idle_timeout() -> u64 {
    60_000
}
fn d_true() -> bool {
    true
}
fn d_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}
fn d_leeway() -> u64 {
    30
}
fn d_max_token() -> usize {
    16 * 1024
}
fn d_cache_entries() -> u64 {
    100_000
}
fn d_cache_ttl() -> u64 {
    300
}
fn d_refetch() -> u64 {
    30
}
fn d_refresh() -> u64 {
    300
}
fn d_refresh_min() -> u64 {
    60
}
fn d_refresh_max() -> u64 {
    3_600
}
fn d_fetch_timeout() -> u64 {
    5_000
}
fn d_sink() -> String {
    "stdout".into()
}
fn d_audit_format() -> String {
    "json".into()
}
fn d_fsync() -> String {
    "batch".into()
}
fn d_fsync_interval() -> u64 {
    1_000
}
fn d_rotate_bytes() -> u64 {
    256 * 1024 * 1024
}
fn d_rotate_age() -> u64 {
    86_400
}
fn d_rotate_keep() -> usize {
    // Audit records are kept: deleting them is the operator's choice.
    0
}
fn d_audit_queue() -> usize {
    16 * 1024
}
fn d_on_failure() -> String {
    "refuse".into()
}
fn d_audit_retry() -> u64 {
    1_000
}
fn d_audit_fhir_timeout() -> u64 {
    5_000
}
fn d_audit_fhir_batch() -> usize {
    100
}
fn d_grace() -> u64 {
    5
}
fn d_shutdown() -> u64 {
    25
}
/// A regular file's bytes, read only if it holds at most `max` (a device
/// or a FIFO named by mistake is refused, not read for ever); a larger
/// one reads as its first `max + 1` bytes, for the caller to refuse.
/// `server.upgrade_sock`: whoever listens there is handed the proxy's
/// listening sockets, so it must live in a directory only fhirwall's
/// user (or root) can write to — not `/tmp`.
fn check_upgrade_sock(sock: &Path, problem: &mut impl FnMut(&str, String)) -> Option<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let key = "server.upgrade_sock";
    let dir = match sock.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let me = rustix::process::geteuid().as_raw();
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => problem(key, format!("'{}' is not a directory", dir.display())),
        Ok(m) if m.permissions().mode() & 0o022 != 0 => problem(
            key,
            format!(
                "'{}' is writable by other users, who could take the listening sockets \
                 over: use a directory only fhirwall's user can write to (e.g. /run/fhirwall)",
                dir.display()
            ),
        ),
        // Its owner could put a socket of its own there.
        Ok(m) if m.uid() != me && m.uid() != 0 => problem(
            key,
            format!(
                "'{}' belongs to user {}, not to fhirwall's user ({me}) or root: its owner \
                 could take the listening sockets over",
                dir.display(),
                m.uid()
            ),
        ),
        // Pingora makes the socket connectable by anyone who can reach
        // it, and the waiting process takes the first sockets sent: a
        // local user connecting first would hand it sockets of their own
        // (and have the port once the old process is gone).
        Ok(m) if m.permissions().mode() & 0o011 != 0 => problem(
            key,
            format!(
                "'{}' can be entered by other users (mode {:o}), who could connect first \
                 and hand the new process sockets of their own: make it 0700 (systemd: \
                 RuntimeDirectoryMode=0700)",
                dir.display(),
                m.permissions().mode() & 0o777
            ),
        ),
        // One spelling for the old and the new process, whatever their
        // working directories or symlinks (SIGQUIT compares names).
        Ok(_) => {
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            let sock = sock.file_name().map_or(dir.clone(), |f| dir.join(f));
            // A Unix socket's path holds at most 107 bytes.
            if sock.as_os_str().len() > 107 {
                problem(
                    key,
                    format!(
                        "'{}' is longer than a Unix socket path may be (107 bytes)",
                        sock.display()
                    ),
                );
                return None;
            }
            return Some(sock);
        }
        Err(e) => problem(key, format!("its directory '{}': {e}", dir.display())),
    }
    None
}

/// A regular file's bytes, at most `max + 1` (the caller tells a file too
/// large by its length). Anything else named by mistake (a FIFO, a device,
/// a directory) is refused before it is opened: opening a FIFO waits for a
/// writer, which would hang `fhirwall check`.
fn read_small_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The largest configuration or policy file read: far beyond any real one,
/// small enough that a wrong name (a log, an image) is refused at once.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// A regular file's text ([`read_small_file`]): a FIFO or a device named
/// by mistake is refused rather than read for ever, a file larger than
/// `max` or not UTF-8 is refused by what is wrong with it.
fn read_text_file(path: &Path, max: u64) -> std::io::Result<String> {
    let bytes = read_small_file(path, max)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB: not a configuration file",
            max >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::other(format!(
            "not UTF-8 text (an invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The most `server.max_classified_body_bytes` may be.
const MAX_CLASSIFIED_BODY: usize = 64 << 20;

fn d_max_held() -> usize {
    256 << 20
}

fn d_max_body() -> usize {
    8 << 20
}

macro_rules! default_from_serde {
    ($t:ty) => {
        impl Default for $t {
            fn default() -> Self {
                serde_saphyr::from_str("{}").expect("all fields have defaults")
            }
        }
    };
}
default_from_serde!(TokenConfig);
default_from_serde!(JwksConfig);
default_from_serde!(AuditConfig);
default_from_serde!(ServerConfig);

/// One configuration problem, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

/// Validated, runtime form of the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_base: Url,
    /// Path of the public base without a trailing slash, e.g. `/fhir` (or ``).
    pub public_base_path: String,
    /// Public routes relative to the base, without leading `/`.
    pub public_routes: Vec<String>,
    pub upstream: Upstream,
    pub issuers: Vec<Issuer>,
    pub tokens: TokenConfig,
    pub unnarrowed_search: crate::decide::UnnarrowedSearch,
    /// `patient_context.shared_resources`.
    pub shared_resources: crate::fhir::compartment::SharedResources,
    pub dpop: Dpop,
    pub jwks: JwksConfig,
    /// Certificates from `jwks.ca_file`, parsed.
    pub jwks_roots: Vec<reqwest::Certificate>,
    pub admin_listen: SocketAddr,
    pub tls: Option<Tls>,
    pub policies: crate::policy::PolicySet,
    /// The policy directory, when `policies.watch` asks to follow changes.
    pub policies_watch: Option<PathBuf>,
    /// The policy directory, when policies are configured.
    pub policies_dir: Option<PathBuf>,
    /// The files read, as they were just before (any change since, during
    /// start-up, is reloaded once fhirwall serves).
    pub loaded_stamp: FilesStamp,
    pub break_glass: BreakGlassConfig,
    pub roles: Option<Roles>,
    pub audit: Audit,
    pub server: ServerConfig,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<crate::client_addr::Cidr>,
    /// `server.nat64_prefixes`, parsed.
    pub nat64_prefixes: Vec<crate::client_addr::Cidr>,
    pub forward_headers: Vec<(ForwardedContext, http::HeaderName)>,
    pub redis: Option<Redis>,
    /// The settings a reload does not apply, each section as read, to tell
    /// which of them a reloaded file changed ([`Settings::needs_restart`]).
    pub restart_only: Vec<(&'static str, String)>,
    /// `server.upgrade_sock`, below the config file's directory if relative.
    pub upgrade_sock: Option<PathBuf>,
}

impl Settings {
    /// What the rules (reloadable: policies, break-glass) allow but that
    /// weakens a guarantee; a reload logs them too.
    pub fn rule_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.break_glass.claim.is_none() && self.policies.rules.iter().any(|r| r.break_glass) {
            w.push(format!(
                "break_glass.claim is not set: an emergency is declared by the {} header, which \
                 any caller may send, so every caller whose token the break_glass rules' deny \
                 would refuse can pass it by declaring one (it is on record); set \
                 break_glass.claim to have the authorization server vouch for it",
                self.break_glass.header
            ));
        }
        w
    }

    /// What the configuration allows but that weakens a guarantee: `run`
    /// logs each at start, `check` prints them (the configuration is
    /// still valid).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let u = &self.upstream;
        let tokens = if u.forward_authorization {
            ", the clients' tokens with them (forward_authorization_unverified)"
        } else {
            ""
        };
        if !u.tls && !is_loopback_host(u.url.host_str().unwrap_or("")) {
            w.push(format!(
                "upstream.url: plain http off the loopback interface: requests and answers, \
                 patients' data, cross the network unencrypted{tokens}; use https"
            ));
        }
        if u.tls && !u.verify_tls {
            w.push(format!(
                "upstream.verify_tls: false: the upstream's certificate is not checked, so \
                 anyone on the path can read the requests{tokens} and answer in its place"
            ));
        }
        if let Some(r) = &self.redis {
            if r.tls.is_none() && !is_loopback_host(&r.host) {
                w.push(format!(
                    "redis.url: plain redis:// off the loopback interface{}: anyone on the path \
                     can read it and answer the DPoP replay and rate-limit checks in its place \
                     (a replayed proof would pass); use rediss://",
                    if r.password.is_some() {
                        ", with the password sent in clear"
                    } else {
                        ""
                    }
                ));
            }
        }
        w.extend(self.rule_warnings());
        let d = &self.dpop;
        if d.enabled && self.redis.as_ref().is_some_and(|r| r.fallback_local) {
            w.push(
                "redis.on_failure: local with dpop on: while Redis cannot be reached, each \
                 process checks a DPoP proof only against those it saw itself (and does not \
                 record in Redis those it accepts meanwhile), so a proof replayed to another \
                 replica passes within dpop.max_age_seconds; use on_failure: refuse to keep \
                 the replay check whole"
                    .into(),
            );
        }
        if d.enabled && self.redis.is_none() && self.upgrade_sock.is_some() {
            w.push(
                "dpop is on without redis: the proofs this process has seen are not known to \
                 the one taking over at a zero-downtime restart (a proof can be replayed to it \
                 within dpop.max_age_seconds); configure redis to share them"
                    .into(),
            );
        }
        if d.enabled
            && d.nonce_lifetime_seconds.is_some()
            && d.nonce_key.is_none()
            && (self.redis.is_some() || self.upgrade_sock.is_some())
        {
            w.push(
                "dpop.require_nonce without dpop.nonce_key_file: each process makes its own \
                 nonces, which another replica or the process taking over at a restart \
                 refuses; give every process the same dpop.nonce_key_file"
                    .into(),
            );
        }
        w
    }

    /// The bases the upstream may write its links and absolute references
    /// under, without a trailing `/`: its URL as configured and, if it
    /// differs, the public origin with the upstream's path. A server that
    /// takes the `X-Forwarded-Host`/`-Proto` fhirwall sends (HAPI's
    /// `ApacheProxyAddressStrategy`, Tomcat's `RemoteIpValve`, Spring's
    /// forwarded-header support) writes its links that second way: the
    /// gateway's host, its own path.
    pub fn upstream_bases(&self) -> Vec<String> {
        let own = self.upstream.url.as_str().trim_end_matches('/').to_string();
        let forwarded = format!(
            "{}{}",
            self.public_base.origin().ascii_serialization(),
            self.upstream.url.path().trim_end_matches('/')
        );
        let public = self.public_base.as_str().trim_end_matches('/');
        let mut bases = vec![own];
        if forwarded != bases[0] && forwarded != public {
            bases.push(forwarded);
        }
        bases
    }

    /// The sections that differ between the running settings and `new`
    /// but that only a restart applies (everything but policies, roles
    /// and break-glass). Files they name are read at start only: a
    /// changed file behind an unchanged name is not seen here.
    pub fn needs_restart(&self, new: &Settings) -> Vec<&'static str> {
        self.restart_only
            .iter()
            .zip(&new.restart_only)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0)
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    /// The addresses the host resolved to at start, never empty
    /// (`resolve.rs` looks the name up again as the proxy runs); empty
    /// only in settings read for a reload ([`load_for_reload`]), which
    /// never apply the upstream.
    pub resolved: Vec<SocketAddr>,
    pub tls: bool,
    pub sni: String,
    /// `Host` header sent upstream (host, plus port when not the default).
    pub host_header: String,
    /// Upstream base path without trailing slash, e.g. `/r4` (or ``).
    pub base_path: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub verify_tls: bool,
    pub ca_file: Option<PathBuf>,
    /// Certificates from `upstream.ca_file`, parsed (for the checked-answer client).
    pub roots: Vec<reqwest::Certificate>,
    /// The upstream FHIR base URL as configured.
    pub url: Url,
    pub max_checked_answer_bytes: usize,
    pub checked_answer_timeout: Duration,
    pub forward_authorization: bool,
    pub resolves_conditional_references: bool,
    pub allow_zero_padded_ids: bool,
    /// `upstream.special_params`, checked ([`special_param_problem`]).
    pub special_params: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Issuer {
    pub name: String,
    pub issuer: String,
    pub jwks_uri: Option<Url>,
    pub discovery: bool,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway_seconds: u64,
    pub require_at_jwt_typ: bool,
    pub require_binding: bool,
    pub require_binding_for_clients: Vec<String>,
    pub introspection: Option<Introspection>,
}

impl Issuer {
    /// Verifies JWTs with keys from a JWKS (rather than only introspecting).
    pub fn needs_keys(&self) -> bool {
        self.jwks_uri.is_some() || self.discovery
    }

    /// Opaque tokens are introspected by this issuer.
    pub fn takes_opaque_tokens(&self) -> bool {
        self.introspection.as_ref().is_some_and(|x| x.opaque_tokens)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
    Fhir {
        endpoint: Url,
        timeout: Duration,
        batch_max: usize,
        /// Bearer token read from the configured environment variable.
        bearer_token: Option<Secret>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFormat {
    /// One JSON object per line.
    Json,
    /// FHIR AuditEvent resources (IHE BALP), one per line in a file.
    AuditEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Batch,
    Interval(Duration),
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnAuditFailure {
    Refuse,
    Spill(PathBuf),
}

/// The validated audit section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub sink: AuditSink,
    pub format: AuditFormat,
    pub record_before_upstream: bool,
    pub fsync: Fsync,
    pub rotate_max_bytes: u64,
    pub rotate_max_age: Option<Duration>,
    pub rotate_keep: usize,
    pub queue_capacity: usize,
    pub on_failure: OnAuditFailure,
    pub retry: Duration,
}

impl Audit {
    /// Records to stdout as JSON lines, refusing when stdout fails.
    pub fn stdout() -> Audit {
        Audit {
            sink: AuditSink::Stdout,
            format: AuditFormat::Json,
            record_before_upstream: true,
            fsync: Fsync::Never,
            rotate_max_bytes: 0,
            rotate_max_age: None,
            rotate_keep: 0,
            queue_capacity: d_audit_queue(),
            on_failure: OnAuditFailure::Refuse,
            retry: Duration::from_millis(d_audit_retry()),
        }
    }
}

/// Verified context that can be forwarded upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardedContext {
    Sub,
    ClientId,
    Patient,
    FhirUser,
    Scope,
    Issuer,
    /// `claim:<name>`: any claim of the verified token (a tenant or
    /// partition the authorization server puts in its tokens).
    Claim(String),
}

impl ForwardedContext {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sub" => Self::Sub,
            "client_id" => Self::ClientId,
            "patient" => Self::Patient,
            "fhir_user" => Self::FhirUser,
            "scope" => Self::Scope,
            "issuer" => Self::Issuer,
            _ => {
                let name = s.strip_prefix("claim:")?;
                if name.is_empty() || name.chars().any(|c| c.is_control()) {
                    return None;
                }
                Self::Claim(name.to_string())
            }
        })
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_with(path, false)
}

/// Like [`load`], for a reload (SIGHUP): the upstream's host name is not
/// looked up, and the files of restart-only settings are not read (see
/// `Config::for_reload`). Only a restart applies them, and a lookup
/// failing meanwhile (a headless service with no ready endpoints, a DNS
/// outage) or a file gone must not keep new rules, an emergency deny
/// above all, from applying. Only the rules of what this returns may be
/// used: `upstream.resolved` is empty, and keys and certificates are
/// placeholders.
pub fn load_for_reload(path: &Path) -> Result<Settings, ConfigError> {
    load_with(path, true)
}

/// Like [`load_for_reload`], for the offline commands (`explain`, `test`):
/// they decide from the rules and the claims alone, so they run where the
/// gateway's secrets, certificates and upstream are not (a CI job that
/// reviews policy changes). `check` still reads everything, as `run`.
pub fn load_offline(path: &Path) -> Result<Settings, ConfigError> {
    load_with(path, true)
}

/// Files and their modification times (absent: unreadable or gone).
pub type FilesStamp = Vec<(PathBuf, Option<std::time::SystemTime>)>;

/// The configuration file and every entry of the policy directory `dir`,
/// sorted, each with its modification time: what a reload would read. Two
/// stamps differ when a file changed, was added, removed or renamed.
pub fn files_stamp(config: &Path, dir: Option<&Path>) -> FilesStamp {
    let mut files = vec![config.to_path_buf()];
    if let Some(d) = dir {
        if let Ok(entries) = std::fs::read_dir(d) {
            files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).and_then(|m| m.modified()).ok();
            (f, m)
        })
        .collect()
}

fn load_with(path: &Path, for_reload: bool) -> Result<Settings, ConfigError> {
    // Each before it is read: a file changed while it is read counts as
    // changed since.
    let config_stamp = files_stamp(path, None);
    let file = path.display().to_string();
    let text = read_text_file(path, MAX_CONFIG_BYTES).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
        file: file.clone(),
        message,
    })?;
    config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    config.for_reload = for_reload;
    config.resolve_paths();
    let dir = config
        .policies
        .as_ref()
        .map(|p| config.base_dir.join(&p.dir));
    let mut stamp = files_stamp(path, dir.as_deref());
    // The configuration file as it was before it was read.
    for (f, m) in &mut stamp {
        if let Some((_, before)) = config_stamp.iter().find(|(c, _)| c == f) {
            *m = *before;
        }
    }
    config.loaded_stamp = stamp;
    config
        .validate()
        .map_err(|problems| ConfigError::Invalid { file, problems })
}

/// `text` with the user information of every URL in it (`scheme://user:
/// password@host`) replaced by `***`.
fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The user information ends at the last '@' on the line (a
        // password may hold '/', '?', '#', a quote or a space, mostly in a
        // URL that failed to parse, the one echoed): hiding more of the
        // line is the lesser harm. Without one, the authority runs to the
        // first '/', '?', '#', quote or space.
        let line_end = tail.find('\n').unwrap_or(tail.len());
        // ... or before the next URL on it.
        let line_end = tail[..line_end].find("://").unwrap_or(line_end);
        let url_end = match tail[..line_end].rfind('@') {
            Some(_) => line_end,
            None => tail
                .find(|c: char| matches!(c, '\'' | '"' | '`') || c.is_whitespace())
                .unwrap_or(tail.len()),
        };
        rest = match tail[..url_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                &tail[at..]
            }
            None => {
                let host_end = tail[..url_end].find(['/', '?', '#']).unwrap_or(url_end);
                out.push_str(&tail[..host_end]);
                &tail[host_end..]
            }
        };
    }
    out.push_str(rest);
    out
}

/// The resource types a public route may name (besides `metadata` and
/// `.well-known`): conformance, terminology, knowledge and directory
/// resources (none holds a patient's data).
const PUBLIC_ROUTE_TYPES: &[&str] = &[
    "ActivityDefinition",
    "CapabilityStatement",
    "CodeSystem",
    "CompartmentDefinition",
    "ConceptMap",
    "Endpoint",
    "GraphDefinition",
    "HealthcareService",
    "ImplementationGuide",
    "InsurancePlan",
    "Library",
    "Location",
    "Measure",
    "Medication",
    "MedicationKnowledge",
    "MessageDefinition",
    "NamingSystem",
    "OperationDefinition",
    "Organization",
    "OrganizationAffiliation",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Questionnaire",
    "SearchParameter",
    "StructureDefinition",
    "StructureMap",
    "TerminologyCapabilities",
    "ValueSet",
];

/// Operations a public route may name: terminology ones, which read code
/// systems, value sets and concept maps only.
const PUBLIC_OPERATIONS: &[&str] = &[
    "$expand",
    "$lookup",
    "$validate-code",
    "$subsumes",
    "$translate",
    "$versions",
];

/// Whether a public route (below the base, without its leading and
/// trailing `/`) has a shape that serves no patient's data: `metadata`, a
/// path below `.well-known`, or one of [`PUBLIC_ROUTE_TYPES`] as `Type`,
/// `Type/id`, `Type/$op` or `Type/id/$op` with `$op` one of
/// [`PUBLIC_OPERATIONS`]. Anything else (a history, `_search`, a
/// compartment such as `Practitioner/1/Patient`, an operation such as
/// `Questionnaire/$populate?subject=Patient/1`) may read a patient's data.
fn public_route_shape(route: &str) -> bool {
    let segs: Vec<&str> = route.split('/').collect();
    let op = |s: &str| PUBLIC_OPERATIONS.contains(&s);
    let id = |s: &str| crate::fhir::classify::is_valid_id(s);
    match segs.as_slice() {
        ["metadata"] => true,
        [".well-known", rest @ ..] => !rest.is_empty() && rest.iter().all(|s| !s.is_empty()),
        [t, rest @ ..] if PUBLIC_ROUTE_TYPES.contains(t) => match rest {
            [] => true,
            [x] => id(x) || op(x),
            [i, x] => id(i) && op(x),
            _ => false,
        },
        _ => false,
    }
}

/// `text` with the query of every URL in it cut to `?…`: an endpoint's
/// query may hold a key (`?apikey=`), and problems are printed and, on a
/// rejected reload, logged. A URL ends at a quote or white space.
fn without_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let url_end = tail
            .find(|c: char| matches!(c, '\'' | '"' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..url_end].find('?') {
            Some(q) => {
                out.push_str(&tail[..q]);
                out.push_str("?…");
            }
            None => out.push_str(&tail[..url_end]),
        }
        rest = &tail[url_end..];
    }
    out.push_str(rest);
    out
}

/// An optional setting given with a value. A key written with none
/// (`roles:`, `tls:` with every line below it commented out, a template
/// that rendered empty) is an error, not the setting left out: read as
/// "none", it would turn off role ceilings, policies, TLS or a limit
/// without a word.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)?.map(Some).ok_or_else(|| {
        serde::de::Error::custom(
            "the key has no value: give it one, or remove the key (left empty, it would turn \
             the setting off)",
        )
    })
}

/// A serde_ignored path in the form problems use: `a.b[2].c`.
fn key_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

fn parse_algorithm(s: &str) -> Option<Algorithm> {
    Some(match s {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

impl Config {
    /// Makes the certificate and key files' relative paths relative to the
    /// configuration file, as every other file it names is (not to the
    /// working directory, which an upgrade may start from elsewhere).
    fn resolve_paths(&mut self) {
        let base = self.base_dir.clone();
        let at = |p: &mut String| {
            if !p.is_empty() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        };
        if let Some(t) = &mut self.tls {
            at(&mut t.cert_file);
            at(&mut t.key_file);
            if let Some(f) = &mut t.client_ca_file {
                at(f);
            }
        }
        if let Some(f) = &mut self.upstream.ca_file {
            at(f);
        }
        if let Some(f) = &mut self.jwks.ca_file {
            at(f);
        }
        for i in &mut self.issuers {
            if let Some(f) = i
                .introspection
                .as_mut()
                .and_then(|x| x.private_key_file.as_mut())
            {
                at(f);
            }
        }
    }

    /// Parses YAML text; the message carries line and column. Keys that
    /// are not settings do not stop the parse: they are collected, every
    /// one by its path, for [`Config::validate`] to report as problems.
    /// (Duplicate keys and wrong types do stop it.)
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut unknown = Vec::new();
        // No source snippet in the message: the lines around an error may
        // hold a client secret or a password, and the message goes to the
        // terminal and, on a rejected reload, to the log.
        // A tag (`!env NAME`) is refused, not read as the text after it (a
        // secret `NAME`).
        let options = serde_saphyr::options! { with_snippet: false, reject_unsupported_tags: true };
        // The key a wrong value sits under is named (`upstream.url: …`), as
        // the problems found later are, besides its line and column.
        let mut at = String::new();
        let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
            let mut ignored = |path: serde_ignored::Path| unknown.push(key_path(&path));
            let de = serde_ignored::Deserializer::new(de, &mut ignored);
            serde_path_to_error::deserialize(de).map_err(|e| {
                at = e.path().to_string();
                e.into_inner()
            })
        });
        let mut config: Config = match parsed {
            Ok(c) => c,
            // The keys met before the error are named too: a misspelt
            // `admn:` is what makes `admin` missing.
            Err(e) => {
                let mut message = e
                    .to_string()
                    .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
                if !at.is_empty() && at != "." {
                    message = format!("{at}: {message}");
                }
                if !unknown.is_empty() {
                    message.push_str(&format!(
                        "; also, not fhirwall settings (unknown keys): {}",
                        unknown.join(", ")
                    ));
                }
                return Err(message);
            }
        };
        config.unknown_keys = unknown;
        Ok(config)
    }

    /// Checks every setting and returns the runtime form, or every problem found.
    pub fn validate(&self) -> Result<Settings, Vec<Problem>> {
        let mut p = Vec::new();
        // A URL echoed in a problem never shows its credentials (they are
        // refused, and the message is printed and logged).
        let mut problem = |path: &str, message: String| {
            p.push(Problem {
                path: path.to_string(),
                message: without_query(&without_userinfo(&message)),
            })
        };
        for key in &self.unknown_keys {
            problem(
                key,
                "unknown key: not a fhirwall setting (config.yaml is the annotated reference)"
                    .into(),
            );
        }

        let listen = parse_addr(&self.listen, "listen", &mut problem);
        let admin_listen = parse_addr(&self.admin.listen, "admin.listen", &mut problem);
        let tls = match &self.tls {
            None => Some(None),
            Some(t) => validate_tls(t, self.for_reload, &mut problem).map(Some),
        };
        if let Some(age) = self.break_glass.max_token_age_seconds {
            if !(1..=86_400).contains(&age) {
                problem(
                    "break_glass.max_token_age_seconds",
                    format!("{age} must be between 1 and 86400 (a day)"),
                );
            }
        }
        let bg_header = &self.break_glass.header;
        if http::HeaderName::from_bytes(bg_header.as_bytes()).is_err() {
            problem(
                "break_glass.header",
                format!("'{bg_header}' is not a header name"),
            );
        } else if crate::proxy_headers::is_reserved(bg_header)
            || crate::proxy_headers::read_by_fhirwall(bg_header)
        {
            // It is removed before the upstream: it may not be one the
            // request needs or fhirwall manages.
            problem(
                "break_glass.header",
                format!(
                    "'{bg_header}' is a header the request needs or fhirwall manages; \
                     use a name of its own, e.g. X-Fhirwall-Break-Glass"
                ),
            );
        }
        let roles = match &self.roles {
            None => Some(None),
            Some(r) => {
                let mut ok = true;
                let mut map = BTreeMap::new();
                for (name, c) in &r.map {
                    let set = crate::scope::ScopeSet::parse(&c.scopes.join(" "));
                    if !set.unrecognised.is_empty() || set.scopes.len() != c.scopes.len() {
                        problem(
                            &format!("roles.map.{name}.scopes"),
                            format!("not all SMART resource scopes: {:?}", c.scopes),
                        );
                        ok = false;
                    }
                    for i in &c.interactions {
                        if !crate::fhir::classify::Interaction::ALL
                            .iter()
                            .any(|x| x.as_str() == i)
                        {
                            problem(
                                &format!("roles.map.{name}.interactions"),
                                format!("'{i}' is not a FHIR interaction fhirwall knows"),
                            );
                            ok = false;
                        }
                    }
                    map.insert(name.clone(), (set, c.interactions.clone()));
                }
                let unmapped_deny = match r.unmapped.as_str() {
                    "deny" => true,
                    "allow" => false,
                    other => {
                        problem("roles.unmapped", format!("'{other}' is not deny or allow"));
                        ok = false;
                        true
                    }
                };
                ok.then(|| {
                    Some(Roles {
                        claim: r.claim.clone(),
                        map,
                        unmapped_deny,
                    })
                })
            }
        };
        let policies = match &self.policies {
            None => crate::policy::PolicySet::default(),
            Some(pc) => load_policies(&self.base_dir.join(&pc.dir), &mut problem),
        };
        if let Some(pc) = &self.policies {
            let names: Vec<&str> = self.issuers.iter().map(|i| i.name.as_str()).collect();
            for (file, rule, issuer) in policies.unknown_issuers(&names) {
                problem(
                    &format!("{}/{file}: rule '{rule}' when.issuer", pc.dir),
                    format!(
                        "'{issuer}' is not the name of a configured issuer ({}): the condition \
                         could never hold",
                        names.join(", ")
                    ),
                );
            }
        }
        if let (Some(a), Some(b)) = (listen, admin_listen) {
            if sockets_clash(a, b) {
                problem(
                    "admin.listen",
                    format!(
                        "{b} takes the port of listen ({a}): one of them listens on every \
                         address (0.0.0.0 or [::], which also takes IPv4), so the second \
                         could not be bound"
                    ),
                );
            }
        }

        let public_base = match Url::parse(&self.public_base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.query().is_some() || u.fragment().is_some() {
                    problem(
                        "public_base_url",
                        "must not carry a query or fragment".into(),
                    );
                }
                // It is the realm of every challenge and the base of every
                // rewritten link: no credentials in it.
                if has_credentials(&u) {
                    problem(
                        "public_base_url",
                        "must not carry a user name or password".into(),
                    );
                }
                // Requests are routed by their decoded path, which an
                // escaped or `;` path would never equal (every request
                // would get 404, or 400).
                if u.path().contains('%') || u.path().contains(';') {
                    problem(
                        "public_base_url",
                        format!(
                            "its path '{}' must be plain: no escaped characters (a space), no ';'",
                            u.path()
                        ),
                    );
                }
                Some(u)
            }
            Ok(_) => {
                problem(
                    "public_base_url",
                    format!(
                        "'{}' must be an http(s) URL with a host",
                        self.public_base_url
                    ),
                );
                None
            }
            Err(e) => {
                problem(
                    "public_base_url",
                    format!("'{}' is not a URL: {e}", self.public_base_url),
                );
                None
            }
        };
        let mut public_routes: Vec<String> = DEFAULT_PUBLIC_ROUTES
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, r) in self.public_routes.iter().enumerate() {
            let r = r.trim_start_matches('/');
            let bad = r.is_empty()
                || r.contains("..")
                || r.contains('%')
                || r.contains('?')
                || r.contains('#')
                || r.contains(';')
                || r.contains("//")
                || r.contains('\\');
            // A route served to anyone without a token, scopes, policies or
            // a check of the answer: only the server's description,
            // conformance, terminology, knowledge and directory resources
            // (many types outside the Patient compartment still hold
            // patients' data: Task, Device, Binary, Bundle…), and no
            // history, search or bulk operation of them.
            let reaches_patients = !public_route_shape(r.trim_end_matches('/'));
            if bad {
                problem(
                    &format!("public_routes[{i}]"),
                    format!("'{r}' must be a plain path below the FHIR base (no '..', '%', '?', '#', ';', '//')"),
                );
            } else if reaches_patients {
                problem(
                    &format!("public_routes[{i}]"),
                    format!(
                        "'{r}' could serve patient data without a token: a public route is \
                         one of {} (conformance, terminology, knowledge and directory \
                         resources) as Type, Type/id, or one of its \
                         terminology operations ({}) as Type/$op or Type/id/$op, or a path \
                         below .well-known; no history, compartment or other operation (an \
                         operation such as $populate, $evaluate-measure or $apply reads a \
                         patient's data, a compartment search lists it)",
                        PUBLIC_ROUTE_TYPES.join(", "),
                        PUBLIC_OPERATIONS.join(", ")
                    ),
                );
            } else {
                public_routes.push(r.trim_end_matches('/').to_string());
            }
        }

        let upstream = self.validate_upstream(&mut problem);

        if self.issuers.is_empty() {
            problem("issuers", "at least one issuer is required".into());
        }
        let mut issuers = Vec::new();
        for (i, c) in self.issuers.iter().enumerate() {
            let at = |k: &str| format!("issuers[{i}].{k}");
            let mut ok = true;
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                problem(
                    &at("name"),
                    format!("'{}' must be non-empty letters, digits, '-' or '_'", c.name),
                );
                ok = false;
            }
            if self.issuers[..i].iter().any(|o| o.name == c.name) {
                problem(&at("name"), format!("duplicate issuer name '{}'", c.name));
                ok = false;
            }
            if self.issuers[..i].iter().any(|o| o.issuer == c.issuer) {
                problem(&at("issuer"), format!("duplicate issuer '{}'", c.issuer));
                ok = false;
            }
            match Url::parse(&c.issuer) {
                Err(_) => {
                    problem(&at("issuer"), format!("'{}' is not a URL", c.issuer));
                    ok = false;
                }
                // Discovery fetches where the keys are from the issuer.
                Ok(u) if c.discovery && !is_secure_or_loopback(&u) => {
                    problem(
                        &at("issuer"),
                        format!(
                            "'{}' is not https (plain http only on loopback): discovery would \
                             fetch where the signing keys are over plain http",
                            c.issuer
                        ),
                    );
                    ok = false;
                }
                Ok(_) => {}
            }
            let jwks_uri = match (&c.jwks_uri, c.discovery) {
                (Some(u), false) => match Url::parse(u) {
                    Ok(url) if has_credentials(&url) => {
                        problem(
                            &at("jwks_uri"),
                            "must not hold credentials (they would be shown wherever the URL \
                             is, and a key set is public)"
                                .into(),
                        );
                        ok = false;
                        None
                    }
                    Ok(url) if is_secure_or_loopback(&url) => Some(url),
                    Ok(url) if url.scheme() == "http" => {
                        problem(
                            &at("jwks_uri"),
                            format!(
                                "'{u}' is not https (plain http only on loopback): anyone on \
                                 the way could swap the signing keys"
                            ),
                        );
                        ok = false;
                        None
                    }
                    _ => {
                        problem(&at("jwks_uri"), format!("'{u}' is not an http(s) URL"));
                        ok = false;
                        None
                    }
                },
                (Some(_), true) => {
                    problem(
                        &at("jwks_uri"),
                        "set either jwks_uri or discovery: true, not both".into(),
                    );
                    ok = false;
                    None
                }
                (None, true) => None,
                (None, false) if c.introspection.is_some() => None,
                (None, false) => {
                    problem(
                        &at("jwks_uri"),
                        "missing: set jwks_uri, or discovery: true (or introspection)".into(),
                    );
                    ok = false;
                    None
                }
            };
            if c.audiences.is_empty() || c.audiences.iter().any(String::is_empty) {
                problem(
                    &at("audiences"),
                    "at least one non-empty audience is required".into(),
                );
                ok = false;
            }
            if c.algorithms.is_empty() {
                problem(
                    &at("algorithms"),
                    "at least one algorithm is required".into(),
                );
                ok = false;
            }
            let mut algorithms = Vec::new();
            for (j, a) in c.algorithms.iter().enumerate() {
                match parse_algorithm(a) {
                    Some(alg) => algorithms.push(alg),
                    None => {
                        problem(
                            &format!("issuers[{i}].algorithms[{j}]"),
                            format!(
                                "'{a}' is not allowed; allowed: {}",
                                ALLOWED_ALGORITHMS.join(", ")
                            ),
                        );
                        ok = false;
                    }
                }
            }
            if c.leeway_seconds > 300 {
                problem(
                    &at("leeway_seconds"),
                    format!("{} is more than the 300 s maximum", c.leeway_seconds),
                );
                ok = false;
            }
            let introspection = match &c.introspection {
                None => None,
                Some(ic) => {
                    let r = validate_introspection(
                        ic,
                        &at("introspection"),
                        self.for_reload,
                        &mut problem,
                    );
                    ok &= r.is_some();
                    r
                }
            };
            if ok {
                issuers.push(Issuer {
                    name: c.name.clone(),
                    issuer: c.issuer.clone(),
                    jwks_uri,
                    discovery: c.discovery,
                    audiences: c.audiences.clone(),
                    algorithms,
                    leeway_seconds: c.leeway_seconds,
                    require_at_jwt_typ: c.require_at_jwt_typ,
                    require_binding: c.require_binding,
                    require_binding_for_clients: c.require_binding_for_clients.clone(),
                    introspection,
                });
            }
        }

        // Opaque tokens carry no issuer: exactly one introspecting issuer
        // takes them (the only one, or the one marked opaque_tokens).
        let introspecting: Vec<usize> = issuers
            .iter()
            .enumerate()
            .filter(|(_, i)| i.introspection.is_some())
            .map(|(n, _)| n)
            .collect();
        let marked: Vec<usize> = introspecting
            .iter()
            .copied()
            .filter(|n| issuers[*n].takes_opaque_tokens())
            .collect();
        match (introspecting.as_slice(), marked.len()) {
            ([only], 0) => {
                if let Some(x) = issuers[*only].introspection.as_mut() {
                    x.opaque_tokens = self.issuers.iter().filter(|c| c.introspection.is_some())
                        .all(|c| c.introspection.as_ref().is_some_and(|x| x.opaque_tokens != Some(false)));
                }
            }
            (_, 0 | 1) => {}
            _ => problem(
                "issuers",
                "more than one issuer has introspection.opaque_tokens: true; opaque tokens must go to one".into(),
            ),
        }
        let all_declined = self
            .issuers
            .iter()
            .filter_map(|c| c.introspection.as_ref())
            .all(|x| x.opaque_tokens == Some(false));
        if introspecting.len() > 1 && marked.is_empty() && !all_declined {
            problem(
                "issuers",
                "several issuers introspect: mark the one that takes opaque tokens with \
                 introspection.opaque_tokens: true (or set it false on all to refuse opaque tokens)"
                    .into(),
            );
        }
        if self.tokens.max_bytes < 256 || self.tokens.max_bytes > 64 * 1024 {
            problem(
                "tokens.max_bytes",
                format!("{} must be between 256 and 65536", self.tokens.max_bytes),
            );
        }
        if self.tokens.cache_max_entries == 0 {
            problem("tokens.cache_max_entries", "must be at least 1".into());
        }
        // A cached token is checked again on every hit that its key is
        // still published (a withdrawn key ends it), but not against a
        // revocation the issuer cannot publish in the JWKS: this bounds how
        // long such a token is served from the cache.
        if self.tokens.cache_max_ttl_seconds > 3600 {
            problem(
                "tokens.cache_max_ttl_seconds",
                format!(
                    "{} must not be more than 3600",
                    self.tokens.cache_max_ttl_seconds
                ),
            );
        }
        let j = &self.jwks;
        if j.refresh_min_seconds == 0 || j.refresh_min_seconds > j.refresh_max_seconds {
            problem(
                "jwks.refresh_min_seconds",
                format!(
                    "{} must be at least 1 and not more than jwks.refresh_max_seconds ({}; \
                     its default is {}, the longest a withdrawn key keeps verifying new tokens)",
                    j.refresh_min_seconds,
                    j.refresh_max_seconds,
                    d_refresh_max()
                ),
            );
        }
        // A week at most: keys older than that are stale anyway, and a
        // larger period would overflow the time of the next refresh.
        if j.refresh_max_seconds > 604_800 {
            problem(
                "jwks.refresh_max_seconds",
                format!(
                    "{} must not be more than 604800 (a week)",
                    j.refresh_max_seconds
                ),
            );
        }
        if !(1..=60_000).contains(&j.fetch_timeout_ms) {
            problem(
                "jwks.fetch_timeout_ms",
                "must be between 1 and 60000 (a request waiting for keys waits this long)".into(),
            );
        }
        // Every token naming an unknown kid may make a fetch this often:
        // 0 would let anyone drive the identity provider's load.
        if !(1..=3600).contains(&j.min_refetch_interval_seconds) {
            problem(
                "jwks.min_refetch_interval_seconds",
                format!(
                    "{} must be between 1 and 3600",
                    j.min_refetch_interval_seconds
                ),
            );
        }
        let jwks_roots = match &j.ca_file {
            Some(ca) if !self.for_reload => pem_bundle("jwks.ca_file", ca, &mut problem),
            _ => Vec::new(),
        };

        let dpop = {
            let d = &self.dpop;
            let names: Vec<String> = if d.algorithms.is_empty() {
                ALLOWED_ALGORITHMS.iter().map(|a| a.to_string()).collect()
            } else {
                d.algorithms.clone()
            };
            let mut algorithms = Vec::new();
            let mut ok = true;
            for (i, a) in names.iter().enumerate() {
                match crate::token::algorithm(a)
                    .filter(|_| ALLOWED_ALGORITHMS.contains(&a.as_str()))
                {
                    Some(alg) => algorithms.push(alg),
                    None => {
                        problem(
                            &format!("dpop.algorithms[{i}]"),
                            format!("'{a}' is not one of {}", ALLOWED_ALGORITHMS.join(", ")),
                        );
                        ok = false;
                    }
                }
            }
            if !(1..=3600).contains(&d.max_age_seconds) {
                problem("dpop.max_age_seconds", "must be between 1 and 3600".into());
                ok = false;
            }
            if d.leeway_seconds > 300 {
                problem("dpop.leeway_seconds", "must be at most 300".into());
                ok = false;
            }
            if !(5..=3600).contains(&d.nonce_lifetime_seconds) {
                problem(
                    "dpop.nonce_lifetime_seconds",
                    "must be between 5 and 3600".into(),
                );
                ok = false;
            }
            let nonce_key = match &d.nonce_key_file {
                None => None,
                // Read at start only (see `Config::for_reload`).
                Some(_) if self.for_reload => Some(Secret(Vec::new())),
                Some(f) => match read_small_file(&self.base_dir.join(f), 1024) {
                    Ok(k) if (32..=1024).contains(&k.len()) => Some(Secret(k)),
                    Ok(k) => {
                        problem(
                            "dpop.nonce_key_file",
                            format!(
                                "'{f}' holds {} bytes; the key must be 32 to 1024 bytes \
                                 (e.g. head -c 32 /dev/urandom > {f})",
                                if k.len() > 1024 {
                                    "more than 1024".to_string()
                                } else {
                                    k.len().to_string()
                                }
                            ),
                        );
                        ok = false;
                        None
                    }
                    Err(e) => {
                        problem("dpop.nonce_key_file", format!("'{f}' cannot be read: {e}"));
                        ok = false;
                        None
                    }
                },
            };
            if nonce_key.is_some() && !d.require_nonce {
                problem(
                    "dpop.nonce_key_file",
                    "set without dpop.require_nonce: true, it would not be used".into(),
                );
                ok = false;
            }
            if d.replay_cache_max_entries < 1000 {
                problem(
                    "dpop.replay_cache_max_entries",
                    "must be at least 1000".into(),
                );
                ok = false;
            }
            let per_key = d
                .max_proofs_per_key
                .unwrap_or(d.replay_cache_max_entries / 10);
            if per_key == 0 || per_key > d.replay_cache_max_entries {
                problem(
                    "dpop.max_proofs_per_key",
                    format!(
                        "{per_key} must be between 1 and dpop.replay_cache_max_entries ({})",
                        d.replay_cache_max_entries
                    ),
                );
                ok = false;
            }
            let per_user = d
                .max_proofs_per_user
                .unwrap_or((per_key / 100).max(1000).min(per_key));
            // (Not when the client's quota is wrong already: its default
            // would be too.)
            if (1..=d.replay_cache_max_entries).contains(&per_key)
                && (per_user == 0 || per_user > per_key)
            {
                problem(
                    "dpop.max_proofs_per_user",
                    format!("{per_user} must be between 1 and dpop.max_proofs_per_key ({per_key})"),
                );
                ok = false;
            }
            ok.then(|| Dpop {
                enabled: d.enabled,
                algs: names.join(" "),
                policy: crate::dpop::DpopPolicy {
                    algorithms,
                    max_age_seconds: d.max_age_seconds as i64,
                    leeway_seconds: d.leeway_seconds as i64,
                },
                replay_cache_max_entries: d.replay_cache_max_entries,
                max_proofs_per_key: per_key,
                max_proofs_per_user: per_user,
                nonce_lifetime_seconds: d.require_nonce.then_some(d.nonce_lifetime_seconds),
                nonce_key,
            })
        };
        let shared_resources = match self.patient_context.shared_resources.as_str() {
            "leave_out" => Some(crate::fhir::compartment::SharedResources::LeaveOut),
            "pass" => Some(crate::fhir::compartment::SharedResources::Pass),
            other => {
                problem(
                    "patient_context.shared_resources",
                    format!("'{other}' is not one of: leave_out, pass"),
                );
                None
            }
        };
        let unnarrowed = match self.patient_context.unnarrowed_search.as_str() {
            "narrow" => Some(crate::decide::UnnarrowedSearch::Narrow),
            "refuse" => Some(crate::decide::UnnarrowedSearch::Refuse),
            other => {
                problem(
                    "patient_context.unnarrowed_search",
                    format!("'{other}' is not one of: narrow, refuse"),
                );
                None
            }
        };
        let audit = self.validate_audit(&mut problem);

        if !(1..=1000).contains(&self.server.max_parameters) {
            problem(
                "server.max_parameters",
                format!(
                    "{} must be between 1 and 1000 (and below the upstream's own limit)",
                    self.server.max_parameters
                ),
            );
        }
        if !(1024..=MAX_CLASSIFIED_BODY).contains(&self.server.max_classified_body_bytes) {
            problem(
                "server.max_classified_body_bytes",
                format!(
                    "{} must be between 1024 and {MAX_CLASSIFIED_BODY} (64 MiB): each such body \
                     is held in memory while it is decided",
                    self.server.max_classified_body_bytes
                ),
            );
        }
        if self.server.max_held_body_bytes < self.server.max_classified_body_bytes
            || self.server.max_held_body_bytes > 1 << 40
        {
            problem(
                "server.max_held_body_bytes",
                format!(
                    "{} must be at least server.max_classified_body_bytes ({}) and at most 1 TiB",
                    self.server.max_held_body_bytes, self.server.max_classified_body_bytes
                ),
            );
        }
        // A checked answer takes three times its size of the same budget
        // (text, parsed tree, copy passed on): one of the largest must fit.
        let answer_share = self
            .upstream
            .max_checked_answer_bytes
            .saturating_mul(crate::upstream::ANSWER_WEIGHT);
        if self.server.max_held_body_bytes < answer_share {
            problem(
                "server.max_held_body_bytes",
                format!(
                    "{} is less than {} (three times upstream.max_checked_answer_bytes, {}): \
                     an answer of that size, held to be checked, takes three times its size \
                     of this budget and would always be refused",
                    self.server.max_held_body_bytes,
                    answer_share,
                    self.upstream.max_checked_answer_bytes
                ),
            );
        }
        // Bounded: a deadline beyond them overflows the clock (a panic at
        // SIGTERM, before the audit's last flush).
        for (key, value, max) in [
            ("server.threads", self.server.threads as u64, 1024),
            (
                "server.grace_period_seconds",
                self.server.grace_period_seconds,
                86_400,
            ),
            (
                "server.graceful_shutdown_timeout_seconds",
                self.server.graceful_shutdown_timeout_seconds,
                86_400,
            ),
        ] {
            if value > max {
                problem(key, format!("{value} must not be more than {max}"));
            }
        }
        if !(100..=600_000).contains(&self.server.body_read_timeout_ms) {
            problem(
                "server.body_read_timeout_ms",
                format!(
                    "{} must be between 100 and 600000",
                    self.server.body_read_timeout_ms
                ),
            );
        }

        let upgrade_sock = self.server.upgrade_sock.as_ref().and_then(|sock| {
            // Absolute: the old and the new process may have other
            // working directories.
            let path = self.base_dir.join(sock);
            let path = std::path::absolute(&path).unwrap_or(path);
            if self.for_reload {
                return Some(path);
            }
            check_upgrade_sock(&path, &mut problem)
        });

        let mut trusted_proxies = Vec::new();
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            match crate::client_addr::parse_cidr(p.trim()) {
                // Trusting every address lets any client name its own
                // audit source and pass policies on `source`.
                Some((_, 0)) => problem(
                    &format!("server.trusted_proxies[{i}]"),
                    format!("'{p}' trusts every address; list your proxies' addresses"),
                ),
                Some(c) => trusted_proxies.push(c),
                None => problem(
                    &format!("server.trusted_proxies[{i}]"),
                    format!("'{p}' is not an IP address or CIDR block (e.g. 10.0.0.0/8)"),
                ),
            }
        }

        let mut nat64_prefixes = Vec::new();
        for (i, p) in self.server.nat64_prefixes.iter().enumerate() {
            let key = format!("server.nat64_prefixes[{i}]");
            match crate::client_addr::parse_cidr(p.trim()) {
                Some(c @ (std::net::IpAddr::V6(_), bits))
                    if crate::client_addr::NAT64_PREFIX_LENGTHS.contains(&bits) =>
                {
                    nat64_prefixes.push(c)
                }
                _ => problem(
                    &key,
                    format!(
                        "'{p}' is not a NAT64 prefix: an IPv6 block of length 32, 40, 48, 56, 64 \
                         or 96 (RFC 6052), e.g. 64:ff9b::/96"
                    ),
                ),
            }
        }

        let mut forward_headers = Vec::new();
        for (k, v) in &self.forward_headers {
            let path = format!("forward_headers.{k}");
            let ctx = ForwardedContext::parse(k);
            if ctx.is_none() {
                problem(
                    &path,
                    "unknown context; use sub, client_id, patient, fhir_user, scope, issuer \
                     or claim:<name> (a claim of the token)"
                        .into(),
                );
            }
            let name = http::HeaderName::from_bytes(v.as_bytes()).ok();
            if name.is_none() {
                problem(&path, format!("'{v}' is not a valid header name"));
            }
            if let (Some(c), Some(n)) = (ctx, name) {
                if crate::proxy_headers::is_reserved(n.as_str()) {
                    problem(
                        &path,
                        format!(
                            "'{v}' is a hop-by-hop or forwarding header fhirwall manages itself"
                        ),
                    );
                } else if crate::proxy_headers::read_by_fhirwall(n.as_str()) {
                    // The client's would be replaced upstream by the
                    // context: a write's Content-Type or pinned If-Match.
                    problem(
                        &path,
                        format!("'{v}' is a header the request needs and fhirwall reads"),
                    );
                } else if let Some((other, _)) = forward_headers
                    .iter()
                    .find(|(_, m): &&(ForwardedContext, http::HeaderName)| *m == n)
                {
                    problem(
                        &path,
                        format!("'{v}' already carries {other:?}: one header per context"),
                    );
                }
                forward_headers.push((c, n));
            }
        }

        let redis = self
            .redis
            .as_ref()
            .map(|r| self.validate_redis(r, &mut problem));

        // Only a start builds the clients (a reload keeps them).
        if !self.for_reload && !crate::trust::system_has_roots() {
            let needs = needs_system_roots(
                &issuers,
                !jwks_roots.is_empty(),
                upstream.as_ref(),
                audit.as_ref(),
                redis.as_ref().and_then(|r| r.as_ref()),
            );
            for (key, url, ca_key) in needs {
                problem(&key, crate::trust::no_roots_message(&url, ca_key));
            }
        }

        if !p.is_empty() {
            return Err(p);
        }
        let public_base = public_base.expect("validated");
        Ok(Settings {
            listen: listen.expect("validated"),
            public_base_path: public_base.path().trim_end_matches('/').to_string(),
            public_base,
            public_routes,
            upstream: upstream.expect("validated"),
            issuers,
            tokens: self.tokens.clone(),
            unnarrowed_search: unnarrowed.expect("validated"),
            shared_resources: shared_resources.expect("validated"),
            dpop: dpop.expect("validated"),
            jwks: self.jwks.clone(),
            jwks_roots,
            admin_listen: admin_listen.expect("validated"),
            tls: tls.expect("validated"),
            policies,
            policies_watch: self
                .policies
                .as_ref()
                .filter(|p| p.watch)
                .map(|p| self.base_dir.join(&p.dir)),
            policies_dir: self.policies.as_ref().map(|p| self.base_dir.join(&p.dir)),
            loaded_stamp: self.loaded_stamp.clone(),
            break_glass: self.break_glass.clone(),
            roles: roles.expect("validated"),
            audit: audit.expect("validated"),
            server: self.server.clone(),
            trusted_proxies,
            nat64_prefixes,
            forward_headers,
            redis: redis.map(|r| r.expect("validated")),
            restart_only: self.restart_only(),
            upgrade_sock,
        })
    }

    /// Each section a reload does not apply, as read: the SHA-256 of its
    /// Debug form (plain data, maps ordered), so that no secret written
    /// inline (a client secret) is kept in the settings.
    fn restart_only(&self) -> Vec<(&'static str, String)> {
        use sha2::Digest;
        let d = |v: &dyn fmt::Debug| {
            let hash = sha2::Sha256::digest(format!("{v:?}").as_bytes());
            hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        vec![
            ("listen", d(&self.listen)),
            ("public_base_url", d(&self.public_base_url)),
            ("public_routes", d(&self.public_routes)),
            ("upstream", d(&self.upstream)),
            ("issuers", d(&self.issuers)),
            ("tokens", d(&self.tokens)),
            ("jwks", d(&self.jwks)),
            ("admin", d(&self.admin)),
            ("audit", d(&self.audit)),
            ("server", d(&self.server)),
            ("forward_headers", d(&self.forward_headers)),
            ("patient_context", d(&self.patient_context)),
            ("dpop", d(&self.dpop)),
            ("tls", d(&self.tls)),
            ("redis", d(&self.redis)),
            // (policies.dir and policies.watch are followed by a reload.)
        ]
    }

    fn validate_redis(
        &self,
        r: &RedisConfig,
        problem: &mut impl FnMut(&str, String),
    ) -> Option<Redis> {
        let mut ok = true;
        let mut bad = |key: &str, msg: String| {
            ok = false;
            problem(key, msg)
        };
        let mut addr = None;
        match Url::parse(&r.url) {
            Err(e) => bad("redis.url", format!("'{}' is not a URL: {e}", r.url)),
            Ok(u) if u.scheme() != "redis" && u.scheme() != "rediss" => bad(
                "redis.url",
                format!("'{}' must start with redis:// or rediss:// (TLS)", r.url),
            ),
            Ok(u) if has_credentials(&u) => bad(
                "redis.url",
                "must not hold credentials (they would be shown wherever the URL is): \
                 use redis.username and redis.password_file"
                    .into(),
            ),
            Ok(u) if u.query().is_some() || u.fragment().is_some() => bad(
                "redis.url",
                format!("'{}' may not have a query or fragment", r.url),
            ),
            Ok(u) => {
                let db = match u.path() {
                    "" | "/" => Some(0),
                    p => p
                        .strip_prefix('/')
                        .filter(|n| n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|n| n.parse::<i64>().ok()),
                };
                match (u.host_str(), db) {
                    (None | Some(""), _) => bad("redis.url", format!("'{}' names no host", r.url)),
                    (_, None) => bad(
                        "redis.url",
                        format!("the path of '{}' must be a database number, e.g. /0", r.url),
                    ),
                    _ if u.port() == Some(0) => {
                        bad("redis.url", format!("'{}' names port 0", r.url))
                    }
                    (Some(h), Some(db)) => {
                        let host = h.trim_start_matches('[').trim_end_matches(']').to_string();
                        let tls = u.scheme() == "rediss";
                        addr = Some((host, u.port().unwrap_or(6379), db, tls));
                    }
                }
            }
        }
        if r.username.as_deref().is_some_and(str::is_empty) {
            bad("redis.username", "must not be empty".into());
        } else if r.username.is_some() && r.password_file.is_none() {
            // Redis logs in only with a password.
            bad(
                "redis.username",
                "needs redis.password_file (a user logs in with its password)".into(),
            );
        }
        let password = match &r.password_file {
            None => None,
            Some(_) if self.for_reload => Some(Secret(Vec::new())),
            Some(f) => match read_small_file(&self.base_dir.join(f), 1024) {
                Ok(b) => {
                    let text = String::from_utf8(b).ok();
                    match text.as_deref().map(|t| t.trim_end_matches(['\n', '\r'])) {
                        Some(t) if !t.is_empty() && t.len() <= 512 => {
                            Some(Secret(t.as_bytes().to_vec()))
                        }
                        _ => {
                            bad(
                                "redis.password_file",
                                format!("'{f}' must hold one password of 1 to 512 bytes of UTF-8"),
                            );
                            None
                        }
                    }
                }
                Err(e) => {
                    bad("redis.password_file", format!("'{f}' cannot be read: {e}"));
                    None
                }
            },
        };
        let tls_wanted = addr.as_ref().is_some_and(|a| a.3);
        // PEM read as the Redis client reads it (rustls), so what passes
        // here loads there.
        let mut pem_file = |key: &str, file: &Option<String>, is_key: bool| {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let f = file.as_ref()?;
            if addr.is_some() && !tls_wanted {
                bad(key, "is only used with a rediss:// (TLS) redis.url".into());
                return None;
            }
            if self.for_reload {
                return Some(Vec::new());
            }
            let text = match read_small_file(&self.base_dir.join(f), 1 << 20) {
                Ok(t) => t,
                Err(e) => {
                    bad(key, format!("'{f}' cannot be read: {e}"));
                    return None;
                }
            };
            let found = if is_key {
                PrivateKeyDer::from_pem_slice(&text)
                    .map(|_| ())
                    .map_err(|e| format!("'{f}' holds no PEM private key: {e}"))
            } else {
                match CertificateDer::pem_slice_iter(&text).collect::<Result<Vec<_>, _>>() {
                    Ok(certs) if !certs.is_empty() => Ok(()),
                    Ok(_) => Err(format!("'{f}' holds no PEM certificate")),
                    Err(e) => Err(format!("'{f}' holds no PEM certificate: {e}")),
                }
            };
            match found {
                Ok(()) => Some(text),
                Err(why) => {
                    bad(key, why);
                    None
                }
            }
        };
        let ca_pem = pem_file("redis.ca_file", &r.ca_file, false);
        let cert = pem_file("redis.client_cert_file", &r.client_cert_file, false);
        let key = pem_file("redis.client_key_file", &r.client_key_file, true);
        if r.client_cert_file.is_some() != r.client_key_file.is_some() {
            bad(
                "redis.client_cert_file",
                "redis.client_cert_file and redis.client_key_file go together".into(),
            );
        }
        let client = cert.zip(key).map(|(c, k)| (c, Secret(k)));
        if r.key_prefix.is_empty()
            || r.key_prefix.len() > 64
            || !r.key_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            bad(
                "redis.key_prefix",
                format!(
                    "'{}' must be 1 to 64 printable ASCII characters without spaces",
                    r.key_prefix
                ),
            );
        }
        if !(1..=10_000).contains(&r.timeout_ms) {
            bad("redis.timeout_ms", "must be between 1 and 10000".into());
        }
        let fallback_local = match r.on_failure.as_str() {
            "refuse" => false,
            "local" => true,
            other => {
                bad(
                    "redis.on_failure",
                    format!("'{other}' is not one of: refuse, local"),
                );
                false
            }
        };
        let (host, port, db, tls) = addr?;
        ok.then(|| Redis {
            url: r.url.clone(),
            host,
            port,
            db,
            username: r.username.clone(),
            password,
            tls: tls.then_some(RedisTls { ca_pem, client }),
            key_prefix: r.key_prefix.clone(),
            timeout: Duration::from_millis(r.timeout_ms),
            fallback_local,
        })
    }

    fn validate_audit(&self, problem: &mut impl FnMut(&str, String)) -> Option<Audit> {
        let a = &self.audit;
        let mut ok = true;
        let mut bad = |key: &str, msg: String| {
            ok = false;
            problem(key, msg)
        };
        let format = match a.format.as_str() {
            "json" => AuditFormat::Json,
            "audit_event" => AuditFormat::AuditEvent,
            other => {
                bad(
                    "audit.format",
                    format!("'{other}' is not a format; use json or audit_event"),
                );
                AuditFormat::Json
            }
        };
        if a.path.is_some() && a.sink != "file" {
            bad("audit.path", "only used with sink: file".into());
        }
        if a.fhir.is_some() && a.sink != "fhir" {
            bad("audit.fhir", "only used with sink: fhir".into());
        }
        let sink = match a.sink.as_str() {
            "stdout" => Some(AuditSink::Stdout),
            "file" => match &a.path {
                Some(p) => {
                    let path = self.base_dir.join(p);
                    if let Some(why) = unwritable(&path).filter(|_| !self.for_reload) {
                        bad("audit.path", why);
                    }
                    Some(AuditSink::File(path))
                }
                None => {
                    bad("audit.path", "required with sink: file".into());
                    None
                }
            },
            "fhir" => match &a.fhir {
                None => {
                    bad("audit.fhir.endpoint", "required with sink: fhir".into());
                    None
                }
                Some(f) => {
                    if format != AuditFormat::AuditEvent {
                        bad(
                            "audit.format",
                            "sink: fhir sends AuditEvent resources; set format: audit_event".into(),
                        );
                    }
                    let endpoint = match Url::parse(&f.endpoint) {
                        Ok(u) if has_credentials(&u) => {
                            bad(
                                "audit.fhir.endpoint",
                                "must not hold credentials (they would be shown wherever the \
                                 URL is): use audit.fhir.bearer_token_env"
                                    .into(),
                            );
                            None
                        }
                        Ok(u) if is_secure_or_loopback(&u) => Some(u),
                        Ok(_) => {
                            bad(
                                "audit.fhir.endpoint",
                                format!(
                                    "'{}' must be https (plain http only on loopback)",
                                    f.endpoint
                                ),
                            );
                            None
                        }
                        Err(e) => {
                            bad(
                                "audit.fhir.endpoint",
                                format!("'{}' is not a URL: {e}", f.endpoint),
                            );
                            None
                        }
                    };
                    if !(1..=10_000).contains(&f.batch_max) {
                        bad(
                            "audit.fhir.batch_max",
                            format!("{} must be between 1 and 10000", f.batch_max),
                        );
                    }
                    if !(1..=60_000).contains(&f.timeout_ms) {
                        bad(
                            "audit.fhir.timeout_ms",
                            "must be between 1 and 60000".into(),
                        );
                    }
                    let bearer_token = match &f.bearer_token_env {
                        None => None,
                        Some(var) => match std::env::var(var) {
                            Ok(v) if !v.is_empty() => Some(Secret(v.into_bytes())),
                            _ => {
                                bad(
                                    "audit.fhir.bearer_token_env",
                                    format!("environment variable {var} is not set"),
                                );
                                None
                            }
                        },
                    };
                    endpoint.map(|endpoint| AuditSink::Fhir {
                        endpoint,
                        timeout: Duration::from_millis(f.timeout_ms),
                        batch_max: f.batch_max,
                        bearer_token,
                    })
                }
            },
            other => {
                bad(
                    "audit.sink",
                    format!("'{other}' is not a sink; use stdout, file or fhir"),
                );
                None
            }
        };
        let fsync = match a.fsync.as_str() {
            "batch" => Fsync::Batch,
            "interval" if (1..=60_000).contains(&a.fsync_interval_ms) => {
                Fsync::Interval(Duration::from_millis(a.fsync_interval_ms))
            }
            "interval" => {
                bad(
                    "audit.fsync_interval_ms",
                    "must be between 1 and 60000 (longer is fsync: never in effect; say so)".into(),
                );
                Fsync::Batch
            }
            "never" => Fsync::Never,
            other => {
                bad(
                    "audit.fsync",
                    format!("'{other}' is not one of: batch, interval, never"),
                );
                Fsync::Batch
            }
        };
        if !(16..=1_048_576).contains(&a.queue_capacity) {
            bad(
                "audit.queue_capacity",
                format!("{} must be between 16 and 1048576", a.queue_capacity),
            );
        }
        if !(1..=60_000).contains(&a.retry_ms) {
            bad(
                "audit.retry_ms",
                "must be between 1 and 60000 (requests are refused until the sink is tried \
                 again)"
                    .into(),
            );
        }
        let sink_path = match &sink {
            Some(AuditSink::File(p)) => Some(p.clone()),
            _ => None,
        };
        let on_failure = match (a.on_failure.as_str(), &a.spill_path) {
            ("refuse", None) => OnAuditFailure::Refuse,
            ("refuse", Some(_)) => {
                bad(
                    "audit.spill_path",
                    "only used with on_failure: spill".into(),
                );
                OnAuditFailure::Refuse
            }
            ("spill", Some(p)) => {
                let p = self.base_dir.join(p);
                if let Some(why) = unwritable(&p).filter(|_| !self.for_reload) {
                    bad("audit.spill_path", why);
                }
                if sink_path.as_ref() == Some(&p) {
                    bad(
                        "audit.spill_path",
                        "must differ from audit.path (it is where records go when that fails)"
                            .into(),
                    );
                }
                OnAuditFailure::Spill(p)
            }
            ("spill", None) => {
                bad("audit.spill_path", "required with on_failure: spill".into());
                OnAuditFailure::Refuse
            }
            (other, _) => {
                bad(
                    "audit.on_failure",
                    format!("'{other}' is not one of: refuse, spill"),
                );
                OnAuditFailure::Refuse
            }
        };
        let sink = sink?;
        ok.then_some(Audit {
            sink,
            format,
            record_before_upstream: a.record_before_upstream,
            fsync,
            rotate_max_bytes: a.rotate_max_bytes,
            rotate_max_age: (a.rotate_max_age_seconds > 0)
                .then(|| Duration::from_secs(a.rotate_max_age_seconds)),
            rotate_keep: a.rotate_keep,
            queue_capacity: a.queue_capacity,
            on_failure,
            retry: Duration::from_millis(a.retry_ms),
        })
    }

    fn validate_upstream(&self, problem: &mut impl FnMut(&str, String)) -> Option<Upstream> {
        let u = &self.upstream;
        let url = match Url::parse(&u.url) {
            Ok(url) if has_credentials(&url) => {
                problem(
                    "upstream.url",
                    "must not hold credentials: the upstream URL is shown in logs and audit \
                     records"
                        .into(),
                );
                return None;
            }
            Ok(url) => url,
            Err(e) => {
                problem("upstream.url", format!("'{}' is not a URL: {e}", u.url));
                return None;
            }
        };
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            s => {
                problem(
                    "upstream.url",
                    format!("scheme '{s}' is not supported; use http or https"),
                );
                return None;
            }
        };
        let Some(host) = url.host_str() else {
            problem("upstream.url", "has no host".into());
            return None;
        };
        if url.query().is_some() || url.fragment().is_some() {
            problem("upstream.url", "must not carry a query or fragment".into());
        }
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut ok = true;
        for (k, v, max) in [
            ("connect_timeout_ms", u.connect_timeout_ms, 60_000),
            ("read_timeout_ms", u.read_timeout_ms, 3_600_000),
            ("write_timeout_ms", u.write_timeout_ms, 3_600_000),
            ("idle_timeout_ms", u.idle_timeout_ms, 3_600_000),
            (
                "checked_answer_timeout_ms",
                u.checked_answer_timeout_ms,
                3_600_000,
            ),
        ] {
            if !(1..=max).contains(&v) {
                problem(
                    &format!("upstream.{k}"),
                    format!("must be between 1 and {max}"),
                );
                ok = false;
            }
        }
        if !(1024..=1 << 30).contains(&u.max_checked_answer_bytes) {
            problem(
                "upstream.max_checked_answer_bytes",
                "must be between 1024 and 1073741824".into(),
            );
            ok = false;
        }
        // The clients' tokens are bearer credentials: sent where nobody
        // verifies who reads them, they can be replayed.
        let unverified = !tls && !is_secure_or_loopback(&url) || tls && !u.verify_tls;
        if u.forward_authorization_unverified && !u.forward_authorization {
            problem(
                "upstream.forward_authorization_unverified",
                "only used with forward_authorization: true".into(),
            );
            ok = false;
        }
        if u.forward_authorization && unverified && !u.forward_authorization_unverified {
            problem(
                "upstream.forward_authorization",
                "the clients' tokens would go to an upstream nobody verifies (plain http off \
                 the loopback interface, or https with verify_tls: false), where anyone on the \
                 path could take and replay them; use https with verify_tls: true, leave \
                 forward_authorization off, or accept it with \
                 forward_authorization_unverified: true (a sidecar encrypting the hop)"
                    .into(),
            );
            ok = false;
        }
        for (i, name) in u.special_params.iter().enumerate() {
            if let Some(why) = special_param_problem(name, &u.special_params[..i]) {
                problem(&format!("upstream.special_params[{i}]"), why);
                ok = false;
            }
        }
        let mut roots = Vec::new();
        if let Some(ca) = &u.ca_file {
            if !tls {
                problem(
                    "upstream.ca_file",
                    "only used with an https upstream".into(),
                );
                ok = false;
            } else if !u.verify_tls {
                problem(
                    "upstream.ca_file",
                    "not used with verify_tls: false (nothing is verified); remove one".into(),
                );
                ok = false;
            } else if !self.for_reload {
                roots = pem_bundle("upstream.ca_file", ca, problem);
                ok &= !roots.is_empty();
            }
        }
        // Host may be a name; pingora connects to a socket address, so
        // resolve at start (every address; `resolve.rs` follows the name).
        let addr = format!("{host}:{port}");
        let addr = addr.trim_start_matches('[').replace("]:", ":");
        let resolved = if self.for_reload {
            Some(Vec::new())
        } else {
            std::net::ToSocketAddrs::to_socket_addrs(&(
                host.trim_matches(|c| c == '[' || c == ']'),
                port,
            ))
            .ok()
            .map(|a| a.collect::<Vec<_>>())
            .filter(|a| !a.is_empty())
        };
        let Some(resolved) = resolved else {
            problem(
                "upstream.url",
                format!("cannot resolve host '{host}' ({addr})"),
            );
            return None;
        };
        ok.then(|| Upstream {
            resolved,
            tls,
            sni: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            host_header,
            base_path: url.path().trim_end_matches('/').to_string(),
            connect_timeout: Duration::from_millis(u.connect_timeout_ms),
            read_timeout: Duration::from_millis(u.read_timeout_ms),
            write_timeout: Duration::from_millis(u.write_timeout_ms),
            idle_timeout: Duration::from_millis(u.idle_timeout_ms),
            verify_tls: u.verify_tls,
            ca_file: u.ca_file.as_ref().map(PathBuf::from),
            roots,
            url: url.clone(),
            max_checked_answer_bytes: u.max_checked_answer_bytes,
            checked_answer_timeout: Duration::from_millis(u.checked_answer_timeout_ms),
            forward_authorization: u.forward_authorization,
            resolves_conditional_references: u.resolves_conditional_references,
            allow_zero_padded_ids: u.allow_zero_padded_ids,
            special_params: u.special_params.clone(),
        })
    }
}

/// Why `name` cannot be one of `upstream.special_params` (`before`: the
/// ones listed before it), if it cannot: it must be a plain `_` name
/// (modifiers and chains are the parameter's, not its name's), not one
/// fhirwall judges by what it reaches or refuses ([`JUDGED_SPECIAL_PARAMS`],
/// in any case: a server may match names whatever their case), nor one it
/// already knows, nor listed twice.
///
/// [`JUDGED_SPECIAL_PARAMS`]: crate::decide::JUDGED_SPECIAL_PARAMS
fn special_param_problem(name: &str, before: &[String]) -> Option<String> {
    let plain =
        name.len() > 1 && name.starts_with('_') && crate::fhir::classify::is_plain_param_name(name);
    if !plain {
        return Some(format!(
            "'{name}' is not a parameter name starting with '_' (letters, digits, '_' and '-' \
             after it; no modifier or chain)"
        ));
    }
    if let Some(judged) = crate::decide::JUDGED_SPECIAL_PARAMS
        .iter()
        .find(|j| j.eq_ignore_ascii_case(name))
    {
        return Some(format!(
            "'{name}' is {judged}, which reaches other resources or cannot be bounded to a \
             grant: fhirwall judges it itself (a server may match it whatever its case), and \
             it cannot be passed as reaching nothing"
        ));
    }
    // Known in another case: fhirwall's own checks of it (what a checked
    // read takes, say) match its exact spelling only.
    if let Some(known) = crate::decide::KNOWN_SPECIAL_PARAMS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
    {
        return Some(if *known == name {
            format!("'{name}' is already known to fhirwall; remove it")
        } else {
            format!(
                "'{name}' is {known} in another case, which fhirwall judges by its exact \
                 spelling; a server matching it whatever its case would read it as {known}"
            )
        });
    }
    if before.iter().any(|b| b == name) {
        return Some(format!("'{name}' is listed twice"));
    }
    None
}

/// The most of a PEM file (key, certificate, CA bundle) read: a system CA
/// bundle is a few hundred KiB.
const MAX_PEM_BYTES: u64 = 4 << 20;

/// A PEM file's bytes ([`read_small_file`]), refused when larger than
/// [`MAX_PEM_BYTES`].
fn read_pem_file(path: &str) -> Result<Vec<u8>, String> {
    let bytes = read_small_file(Path::new(path), MAX_PEM_BYTES).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("larger than {MAX_PEM_BYTES} bytes"));
    }
    Ok(bytes)
}

/// PEM blocks with one of `tags` in `path`, as DER; a problem at `key` when
/// the file cannot be read or holds none.
fn pem_blocks(
    key: &str,
    path: &str,
    tags: &[&str],
    problem: &mut impl FnMut(&str, String),
) -> Option<Vec<Vec<u8>>> {
    let text = match read_pem_file(path) {
        Ok(t) => t,
        Err(e) => {
            problem(key, format!("cannot read '{path}': {e}"));
            return None;
        }
    };
    let blocks: Vec<Vec<u8>> = match pem::parse_many(&text) {
        Ok(b) => b
            .into_iter()
            .filter(|p| tags.contains(&p.tag()))
            .map(|p| p.into_contents())
            .collect(),
        Err(e) => {
            problem(key, format!("'{path}' is not PEM: {e}"));
            return None;
        }
    };
    if blocks.is_empty() {
        problem(key, format!("'{path}' holds no {}", tags.join(" or ")));
        return None;
    }
    Some(blocks)
}

/// Reads every `*.yaml` of `dir` in file-name order into one policy set;
/// each problem is reported at `<dir>/<file>` with the rule and key, and a
/// YAML error with its line and column.
fn load_policies(dir: &Path, problem: &mut impl FnMut(&str, String)) -> crate::policy::PolicySet {
    let mut set = crate::policy::PolicySet::default();
    let shown = dir.display().to_string();
    let entries: Vec<std::io::Result<std::fs::DirEntry>> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.collect(),
        Err(e) => {
            problem("policies.dir", format!("cannot read '{shown}': {e}"));
            return set;
        }
    };
    // Every `.yaml`/`.yml` name (in any case) is a policy file, and must
    // be one that can be read: a rule skipped without a word (a symlink
    // into a volume not mounted, a directory) would look enforced.
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = match entry {
            Ok(e) => e.path(),
            Err(e) => {
                problem("policies.dir", format!("cannot list '{shown}': {e}"));
                continue;
            }
        };
        let policy = path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("yaml") || x.eq_ignore_ascii_case("yml"));
        // Hidden names are editors' and tools' (an Emacs lock
        // `.#10-rules.yaml` is a dangling symlink), never policies.
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !policy || hidden {
            continue;
        }
        if path.is_file() {
            files.push(path);
        } else {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            problem(
                &format!("{shown}/{name}"),
                match std::fs::metadata(&path) {
                    Ok(_) => "is not a regular file".into(),
                    Err(e) => format!("cannot be read ({e}; a dangling symlink?)"),
                },
            );
        }
    }
    files.sort();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let at = format!("{shown}/{name}");
        let text = match read_text_file(&f, MAX_CONFIG_BYTES) {
            Ok(t) => t,
            Err(e) => {
                problem(&at, format!("cannot read: {e}"));
                continue;
            }
        };
        match crate::policy::parse_file(&text) {
            Ok(spec) => {
                for (i, key, msg) in set.add_file(&name, &spec) {
                    // The line of the rule: where its name is written (the
                    // n-th such line for the n-th rule of that name).
                    let rule = spec.rules.get(i).map(|r| r.name.as_str()).unwrap_or("");
                    let earlier = spec.rules[..i.min(spec.rules.len())]
                        .iter()
                        .filter(|r| r.name == rule)
                        .count();
                    let line = text
                        .lines()
                        .enumerate()
                        .filter(|(_, l)| names_rule(l, rule))
                        .nth(earlier)
                        .map(|(n, _)| format!(" (line {})", n + 1))
                        .unwrap_or_default();
                    problem(&format!("{at}{line}: rules[{i}].{key}"), msg);
                }
            }
            Err(e) => problem(&at, e),
        }
    }
    set
}

/// Validates the `tls` section.
/// The listener's TLS. `for_reload`: its files are not read (see
/// `Config::for_reload`), and what they hold is not judged.
fn validate_tls(
    t: &TlsConfig,
    for_reload: bool,
    problem: &mut impl FnMut(&str, String),
) -> Option<Tls> {
    let pem = |key: &str, file: &str, tags: &[&str], problem: &mut dyn FnMut(&str, String)| {
        if for_reload {
            Some(Vec::new())
        } else {
            pem_blocks(key, file, tags, &mut |k: &str, m: String| problem(k, m))
        }
    };
    let cert = pem("tls.cert_file", &t.cert_file, &["CERTIFICATE"], problem);
    let key = pem(
        "tls.key_file",
        &t.key_file,
        &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
        problem,
    );
    let client_auth = match t.client_auth.as_str() {
        "none" => Some(ClientAuthMode::None),
        "request" => Some(ClientAuthMode::Request),
        "require" => Some(ClientAuthMode::Require),
        other => {
            problem(
                "tls.client_auth",
                format!("'{other}' is not one of: none, request, require"),
            );
            None
        }
    };
    let client_cas = match (&t.client_ca_file, client_auth) {
        // Certificates would never be asked for: every token bound to one
        // would get 401, while the setting looks like mTLS is on.
        (Some(_), Some(ClientAuthMode::None)) => {
            problem(
                "tls.client_ca_file",
                "is used only with client_auth: request or require (client_auth is none, the \
                 default, so no client certificate is asked for)"
                    .into(),
            );
            None
        }
        (Some(f), _) => {
            // A revocation list (or a key) beside the CAs would be dropped
            // without a word: revocation is not checked.
            if let Err(e) = read_pem_file(f).and_then(|b| ca_certificates(&b).map(|_| ())) {
                if e.contains("block beside") {
                    problem(
                        "tls.client_ca_file",
                        format!(
                            "'{f}': {e} (revocation lists are not read: fhirwall does not check \
                             revocation)"
                        ),
                    );
                }
            }
            pem("tls.client_ca_file", f, &["CERTIFICATE"], problem)
        }
        (None, Some(ClientAuthMode::None)) => Some(Vec::new()),
        (None, Some(_)) => {
            problem(
                "tls.client_ca_file",
                "required when client_auth is request or require".into(),
            );
            None
        }
        (None, None) => None,
    };
    let (_, _, client_auth, client_cas) = (cert?, key?, client_auth?, client_cas?);
    if for_reload {
        return Some(Tls {
            cert_file: PathBuf::from(&t.cert_file),
            key_file: PathBuf::from(&t.key_file),
            client_cas,
            client_auth,
        });
    }
    // Built as the listener builds it (rustls), so that what passes here
    // starts there: a key that does not fit the certificate, or that
    // rustls cannot read, would stop the listener only once it starts.
    if let Err(e) = tls_server_fits(&t.cert_file, &t.key_file) {
        problem("tls.key_file", e);
        return None;
    }
    if client_auth != ClientAuthMode::None {
        if let Err(e) = client_verifier(&client_cas, client_auth == ClientAuthMode::Request) {
            problem("tls.client_ca_file", e);
            return None;
        }
    }
    Some(Tls {
        cert_file: PathBuf::from(&t.cert_file),
        key_file: PathBuf::from(&t.key_file),
        client_cas,
        client_auth,
    })
}

/// Whether a TLS server can be made of this certificate chain and key.
fn tls_server_fits(cert_file: &str, key_file: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!("'{cert_file}' (tls.cert_file) cannot be read as certificates: {e}")
        })?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("'{key_file}' cannot be read as a private key: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            format!(
                "'{key_file}' and the certificate in '{cert_file}' (tls.cert_file) do not make a \
                 TLS server: {e} (is the key the certificate's?)"
            )
        })?;
    Ok(())
}

/// The verifier of client certificates against the CAs `cas` (DER); with
/// `optional`, a client may present none. `check` builds it as the
/// listener does (`server::tls_settings`), so what passes one starts.
pub fn client_verifier(
    cas: &[Vec<u8>],
    optional: bool,
) -> Result<std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for der in cas {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| format!("a CA certificate cannot be used: {e}"))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    );
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| format!("client certificates cannot be verified against it: {e}"))
}

/// Why a file fhirwall appends to (and creates if missing) cannot be: a
/// directory in its place, a missing directory, or no write access (for
/// the user running this; `run` as another user may differ).
fn unwritable(path: &Path) -> Option<String> {
    use rustix::fs::{access, Access};
    if path.is_dir() {
        return Some(format!("{} is a directory", path.display()));
    }
    // A pipe, a terminal or a device (`/dev/stdout`) cannot be fsynced,
    // and a rotation would rename it away: records to stdout go with
    // `sink: stdout`.
    if path.exists() && !path.is_file() {
        return Some(format!(
            "{} is not a regular file (a pipe or a device cannot be fsynced or rotated); for \
             stdout use audit.sink: stdout",
            path.display()
        ));
    }
    if path.exists() {
        return access(path, Access::WRITE_OK)
            .err()
            .map(|e| format!("{} cannot be written by this user: {e}", path.display()));
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    if !dir.is_dir() {
        return Some(format!("directory {} does not exist", dir.display()));
    }
    access(dir, Access::WRITE_OK | Access::EXEC_OK)
        .err()
        .map(|e| {
            format!(
                "{} cannot be created in {} by this user: {e}",
                path.display(),
                dir.display()
            )
        })
}

/// The https endpoints fhirwall's own clients would verify against the
/// system's CA certificates alone, each with its key and the setting
/// that could name its CA instead: on a machine without any
/// ([`crate::trust::system_has_roots`]) they cannot be reached.
/// `jwks_cas`: `jwks.ca_file` names CAs (for keys, discovery and
/// introspection), which may be the ones these endpoints need.
fn needs_system_roots(
    issuers: &[Issuer],
    jwks_cas: bool,
    upstream: Option<&Upstream>,
    audit: Option<&Audit>,
    redis: Option<&Redis>,
) -> Vec<(String, Url, Option<&'static str>)> {
    let mut needs = Vec::new();
    let https = |u: &Url| u.scheme() == "https";
    if !jwks_cas {
        for (i, c) in issuers.iter().enumerate() {
            let mut urls = Vec::new();
            if c.discovery {
                if let Ok(u) = Url::parse(&c.issuer) {
                    urls.push(("issuer", u));
                }
            }
            if let Some(u) = &c.jwks_uri {
                urls.push(("jwks_uri", u.clone()));
            }
            if let Some(t) = &c.introspection {
                urls.push(("introspection.endpoint", t.endpoint.clone()));
            }
            for (k, u) in urls.into_iter().filter(|(_, u)| https(u)) {
                needs.push((format!("issuers[{i}].{k}"), u, Some("jwks.ca_file")));
            }
        }
    }
    if let Some(u) = upstream {
        if u.tls && u.verify_tls && u.ca_file.is_none() {
            needs.push((
                "upstream.url".into(),
                u.url.clone(),
                Some("upstream.ca_file"),
            ));
        }
    }
    if let Some(Audit {
        sink: AuditSink::Fhir { endpoint, .. },
        ..
    }) = audit
    {
        if https(endpoint) {
            needs.push(("audit.fhir.endpoint".into(), endpoint.clone(), None));
        }
    }
    if let Some(r) = redis {
        if matches!(&r.tls, Some(t) if t.ca_pem.is_none()) {
            if let Ok(u) = Url::parse(&r.url) {
                needs.push(("redis.url".into(), u, Some("redis.ca_file")));
            }
        }
    }
    needs
}

/// An https URL, or plain http on the loopback interface: what keys,
/// secrets, tokens and audit records may be fetched or sent over.
pub fn is_secure_or_loopback(u: &Url) -> bool {
    u.scheme() == "https" || u.scheme() == "http" && is_loopback_host(u.host_str().unwrap_or(""))
}

/// `localhost`, `127.0.0.1` or `::1` (bracketed or not): the loopback
/// addresses trusted with plain http. (Not the rest of `127.0.0.0/8`,
/// which the tests use as addresses off it.)
pub fn is_loopback_host(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1")
}

/// Validates an issuer's `introspection` section (key prefix `at`).
/// An issuer's introspection settings. `for_reload`: the private key file
/// is not read (see `Config::for_reload`); a placeholder stands for it.
fn validate_introspection(
    c: &IntrospectionConfig,
    at: &str,
    for_reload: bool,
    problem: &mut impl FnMut(&str, String),
) -> Option<Introspection> {
    let key = |k: &str| format!("{at}.{k}");
    let mut ok = true;
    // Secrets and users' tokens travel to it: https, or plain http only on
    // the loopback interface.
    let endpoint = match Url::parse(&c.endpoint) {
        Ok(u) if has_credentials(&u) => {
            problem(
                &key("endpoint"),
                "must not hold credentials (they would be shown wherever the URL is): \
                 use auth_method with client_secret_env or private_key_file"
                    .into(),
            );
            None
        }
        Ok(u) if is_secure_or_loopback(&u) => Some(u),
        _ => {
            problem(
                &key("endpoint"),
                format!(
                    "'{}' is not an https URL (plain http only on loopback)",
                    c.endpoint
                ),
            );
            None
        }
    };
    if c.client_id.is_empty() {
        problem(&key("client_id"), "must not be empty".into());
        ok = false;
    }
    let secret = || -> Option<String> {
        match (&c.client_secret, &c.client_secret_env) {
            (Some(s), None) if !s.is_empty() => Some(s.clone()),
            (None, Some(var)) => std::env::var(var).ok().filter(|s| !s.is_empty()),
            _ => None,
        }
    };
    let auth = match c.auth_method.as_str() {
        m @ ("client_secret_basic" | "client_secret_post") => match secret() {
            Some(secret) if m == "client_secret_basic" => Some(ClientAuth::Basic { secret }),
            Some(secret) => Some(ClientAuth::Post { secret }),
            None => {
                problem(
                    &key("client_secret"),
                    format!(
                        "{m} needs exactly one of client_secret or client_secret_env (naming a set, non-empty variable)"
                    ),
                );
                None
            }
        },
        "private_key_jwt" => {
            let alg = match c.private_key_alg.as_deref().unwrap_or("RS256") {
                "RS256" => Some(Algorithm::RS256),
                "ES256" => Some(Algorithm::ES256),
                other => {
                    problem(
                        &key("private_key_alg"),
                        format!("'{other}' is not RS256 or ES256"),
                    );
                    None
                }
            };
            let pem = match &c.private_key_file {
                Some(_) if for_reload => None,
                Some(f) => match read_pem_file(f) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        problem(&key("private_key_file"), format!("cannot read '{f}': {e}"));
                        None
                    }
                },
                None => {
                    problem(
                        &key("private_key_file"),
                        "required with private_key_jwt".into(),
                    );
                    None
                }
            };
            match (alg, pem) {
                (Some(alg), None) if for_reload && c.private_key_file.is_some() => {
                    Some(ClientAuth::PrivateKeyJwt {
                        key: jsonwebtoken::EncodingKey::from_secret(&[]),
                        alg,
                    })
                }
                (Some(alg), Some(pem)) => {
                    let k = match alg {
                        Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
                        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem),
                    };
                    match k {
                        Ok(key) => Some(ClientAuth::PrivateKeyJwt { key, alg }),
                        Err(e) => {
                            problem(
                                &key("private_key_file"),
                                format!("not a PEM private key for {alg:?}: {e}"),
                            );
                            None
                        }
                    }
                }
                _ => None,
            }
        }
        other => {
            problem(
                &key("auth_method"),
                format!(
                    "'{other}' is not client_secret_basic, client_secret_post or private_key_jwt"
                ),
            );
            None
        }
    };
    for (k, v, max) in [
        ("timeout_ms", c.timeout_ms, 60_000),
        ("cache_max_ttl_seconds", c.cache_max_ttl_seconds, 3600),
        ("negative_cache_seconds", c.negative_cache_seconds, 3600),
        (
            "max_concurrent_calls",
            u64::from(c.max_concurrent_calls),
            4096,
        ),
    ] {
        if v == 0 || v > max {
            problem(&key(k), format!("must be between 1 and {max}"));
            ok = false;
        }
    }
    let private_key_jwt = c.auth_method == "private_key_jwt";
    // A setting of the other method is a mistake about which one is used
    // (a key file nobody reads, a secret that is not sent).
    for (k, set, wanted) in [
        ("private_key_file", c.private_key_file.is_some(), true),
        ("private_key_alg", c.private_key_alg.is_some(), true),
        ("client_secret", c.client_secret.is_some(), false),
        ("client_secret_env", c.client_secret_env.is_some(), false),
    ] {
        if set
            && wanted != private_key_jwt
            && matches!(
                c.auth_method.as_str(),
                "client_secret_basic" | "client_secret_post" | "private_key_jwt"
            )
        {
            problem(
                &key(k),
                format!(
                    "not used with auth_method: {} (only with {})",
                    c.auth_method,
                    if wanted {
                        "private_key_jwt"
                    } else {
                        "client_secret_basic or client_secret_post"
                    }
                ),
            );
            ok = false;
        }
    }
    for (k, v) in [
        ("private_key_id", &c.private_key_id),
        ("assertion_audience", &c.assertion_audience),
    ] {
        match v {
            Some(_) if !private_key_jwt => {
                problem(
                    &key(k),
                    "only used with auth_method: private_key_jwt".into(),
                );
                ok = false;
            }
            Some(v) if v.is_empty() || v.len() > 1024 || v.chars().any(char::is_control) => {
                problem(&key(k), "must be 1 to 1024 printable characters".into());
                ok = false;
            }
            _ => {}
        }
    }
    let (endpoint, auth) = (endpoint?, auth?);
    let assertion_audience = c
        .assertion_audience
        .clone()
        .unwrap_or_else(|| endpoint.as_str().to_string());
    ok.then(|| Introspection {
        endpoint,
        client_id: c.client_id.clone(),
        auth,
        timeout: Duration::from_millis(c.timeout_ms),
        cache_max_ttl: Duration::from_secs(c.cache_max_ttl_seconds),
        negative_ttl: Duration::from_secs(c.negative_cache_seconds),
        require_aud: c.require_aud,
        opaque_tokens: c.opaque_tokens.unwrap_or(false),
        max_inactive_per_source_per_minute: c.max_inactive_per_source_per_minute,
        max_concurrent_calls: c.max_concurrent_calls,
        assertion_kid: c.private_key_id.clone(),
        assertion_audience,
    })
}

/// The certificates of a PEM bundle named at config key `key`; empty (with
/// a problem reported) when the file cannot be read or holds none.
fn pem_bundle(
    key: &str,
    path: &str,
    problem: &mut impl FnMut(&str, String),
) -> Vec<reqwest::Certificate> {
    let certs = read_pem_file(path).and_then(|pem| ca_certificates(&pem));
    match certs {
        Ok(certs) if !certs.is_empty() => certs,
        Ok(_) => {
            problem(key, format!("'{path}' holds no certificate"));
            Vec::new()
        }
        Err(e) => {
            problem(key, format!("cannot use '{path}': {e}"));
            Vec::new()
        }
    }
}

/// A CA file's certificates. It holds certificates only: a key, CRL or
/// request beside them (which reqwest would skip) makes Pingora's loader
/// fail when the proxy starts, so `check` refuses it too.
fn ca_certificates(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    use rustls::pki_types::pem::{from_buf, SectionKind};
    let mut rest = pem;
    let mut certs = Vec::new();
    loop {
        match from_buf(&mut rest) {
            Ok(None) => return Ok(certs),
            Ok(Some((SectionKind::Certificate, der))) => certs.push(
                reqwest::Certificate::from_der(&der)
                    .map_err(|e| format!("not a PEM certificate bundle: {e}"))?,
            ),
            Ok(Some((kind, _))) => {
                return Err(format!(
                    "it holds a {kind:?} block beside the certificates; a CA file must hold \
                     certificates only"
                ))
            }
            Err(e) => return Err(format!("not a PEM certificate bundle: {e}")),
        }
    }
}

/// Whether a policy file's `line` writes `name: <rule>` (block or flow
/// style, quoted or not): the whole name, not a longer one it begins.
fn names_rule(line: &str, rule: &str) -> bool {
    line.match_indices("name:").any(|(at, _)| {
        let value = line[at + 5..].trim_start().trim_start_matches(['\'', '"']);
        value.strip_prefix(rule).is_some_and(|rest| {
            let rest = rest.trim_start_matches(['\'', '"']);
            rest.is_empty() || rest.starts_with([',', '}', ' ', '\t', '#'])
        })
    })
}

/// Whether two listening sockets cannot both be bound: the same address,
/// or the same port where one listens on every address of a family that
/// takes the other (`[::]` takes IPv4 too on Linux).
fn sockets_clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

fn parse_addr(s: &str, path: &str, problem: &mut impl FnMut(&str, String)) -> Option<SocketAddr> {
    match s.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            problem(
                path,
                format!("'{s}' is not an address:port such as 0.0.0.0:8080"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:8080
public_base_url: http://localhost:8080/fhir
upstream:
  url: http://127.0.0.1:9090/r4
issuers:
  - name: local
    issuer: http://127.0.0.1:9999
    jwks_uri: http://127.0.0.1:9999/jwks.json
    audiences: [http://localhost:8080/fhir]
admin:
  listen: 127.0.0.1:9901
"#;

    #[test]
    fn good_config_validates_with_defaults() {
        let s = Config::parse(GOOD).unwrap().validate().unwrap();
        assert_eq!(s.public_base_path, "/fhir");
        assert_eq!(s.upstream.base_path, "/r4");
        assert_eq!(s.upstream.host_header, "127.0.0.1:9090");
        assert_eq!(
            s.issuers[0].algorithms,
            vec![Algorithm::RS256, Algorithm::ES256]
        );
        assert_eq!(s.audit.sink, AuditSink::Stdout);
        assert_eq!(
            s.public_routes,
            vec!["metadata", ".well-known/smart-configuration"]
        );
    }

    /// The upstream's links may be under its URL or, when it builds them
    /// from the forwarded host, under the public origin with its own path;
    /// a second base that is the public base or the first is not listed.
    #[test]
    fn the_upstream_writes_links_under_its_url_or_the_forwarded_host() {
        let bases = |public: &str, upstream: &str| {
            let yaml = GOOD
                .replace(
                    "http://localhost:8080/fhir\nupstream",
                    &format!("{public}\nupstream"),
                )
                .replace("http://127.0.0.1:9090/r4", upstream);
            Config::parse(&yaml)
                .unwrap()
                .validate()
                .unwrap()
                .upstream_bases()
        };
        assert_eq!(
            bases("https://gw.example/fhir", "http://127.0.0.1:9090/r4"),
            ["http://127.0.0.1:9090/r4", "https://gw.example/r4"]
        );
        assert_eq!(
            bases("https://gw.example:8443/fhir/", "http://127.0.0.1:9090/"),
            ["http://127.0.0.1:9090", "https://gw.example:8443"]
        );
        assert_eq!(
            bases("https://gw.example/fhir", "http://127.0.0.1:9090/fhir"),
            ["http://127.0.0.1:9090/fhir"]
        );
    }

    /// Problems `extra` (appended to GOOD) gives, as (path, message).
    fn problems_of(extra: &str) -> Vec<(String, String)> {
        match Config::parse(&format!("{GOOD}{extra}")).unwrap().validate() {
            Ok(_) => Vec::new(),
            Err(p) => p.into_iter().map(|p| (p.path, p.message)).collect(),
        }
    }

    #[test]
    fn public_routes_may_not_serve_patient_data() {
        let p = problems_of(
            "public_routes: [Patient, Observation/x, _history, _search, $export, \
             Group/g1/$export, Binary, Task, ValueSet/_history, Questionnaire/$populate, \
             Measure/$evaluate-measure, PlanDefinition/p1/$apply, Library/$evaluate, \
             Practitioner/123/Patient, ValueSet/_search, CodeSystem/c1/_history/1, metadata/x, \
             ValueSet/$expand/x, Questionnaire/q1/$populate, \
             ValueSet, CodeSystem/$lookup, ValueSet/vs1/$expand, ConceptMap/$translate, \
             StructureDefinition, StructureDefinition/sd-1, .well-known/udap, Practitioner]\n",
        );
        let paths: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            paths,
            [
                "public_routes[0]",
                "public_routes[1]",
                "public_routes[2]",
                "public_routes[3]",
                "public_routes[4]",
                "public_routes[5]",
                "public_routes[6]",
                "public_routes[7]",
                "public_routes[8]",
                "public_routes[9]",
                "public_routes[10]",
                "public_routes[11]",
                "public_routes[12]",
                "public_routes[13]",
                "public_routes[14]",
                "public_routes[15]",
                "public_routes[16]",
                "public_routes[17]",
                "public_routes[18]",
            ],
            "{p:?}"
        );
        assert!(p[0].1.contains("could serve patient data"), "{p:?}");
        let s = Config::parse(&format!(
            "{GOOD}public_routes: [ValueSet, CodeSystem/$lookup, ValueSet/vs1/$expand, \
             StructureDefinition/sd-1/, .well-known/udap]\n"
        ))
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(
            s.public_routes[2..],
            [
                "ValueSet",
                "CodeSystem/$lookup",
                "ValueSet/vs1/$expand",
                "StructureDefinition/sd-1",
                ".well-known/udap"
            ]
        );
    }

    #[test]
    fn a_misspelt_required_key_is_named_with_the_error_it_causes() {
        let e = Config::parse(&GOOD.replace("admin:\n", "admn:\n")).unwrap_err();
        assert!(e.contains("admin") && e.contains("admn"), "{e}");
        // A tag is refused, not taken for the text after it.
        let tagged = GOOD.replace("listen: 127.0.0.1:8080", "listen: !env FHIRWALL_LISTEN");
        assert!(Config::parse(&tagged).is_err());
    }

    #[test]
    fn endpoint_queries_and_base_credentials_are_not_echoed_or_taken() {
        let p = problems_of(
            "audit:\n  sink: fhir\n  fhir:\n    endpoint: ftp://audit.example/fhir?apikey=S3cr3t\n",
        );
        assert!(!p.is_empty());
        assert!(!format!("{p:?}").contains("S3cr3t"), "{p:?}");
        for base in [
            "http://u:pw@localhost:8080/fhir",
            "http://localhost:8080/my%20fhir",
            "http://localhost:8080/fhir;v4",
        ] {
            let text = GOOD.replace(
                "http://localhost:8080/fhir\nupstream",
                &format!("{base}\nupstream"),
            );
            let p = Config::parse(&text)
                .unwrap()
                .validate()
                .err()
                .unwrap_or_default();
            assert!(
                p.iter().any(|p| p.path == "public_base_url"),
                "{base}: {:?}",
                p.iter().map(|p| &p.path).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn numbers_with_no_sane_use_are_refused() {
        for (yaml, path) in [
            (
                "jwks:\n  min_refetch_interval_seconds: 0\n",
                "jwks.min_refetch_interval_seconds",
            ),
            ("server:\n  threads: 1000000\n", "server.threads"),
            (
                "server:\n  graceful_shutdown_timeout_seconds: 18446744073709551615\n",
                "server.graceful_shutdown_timeout_seconds",
            ),
            (
                "server:\n  grace_period_seconds: 100000\n",
                "server.grace_period_seconds",
            ),
            (
                "tokens:\n  cache_max_ttl_seconds: 86400\n",
                "tokens.cache_max_ttl_seconds",
            ),
            ("server:\n  max_parameters: 0\n", "server.max_parameters"),
            (
                "jwks:\n  refresh_min_seconds: 10000000000000000000\n  refresh_max_seconds: 10000000000000000000\n",
                "jwks.refresh_max_seconds",
            ),
            ("server:\n  max_parameters: 1001\n", "server.max_parameters"),
            // Below three times upstream.max_checked_answer_bytes (16 MiB).
            (
                "server:\n  max_held_body_bytes: 50331647\n",
                "server.max_held_body_bytes",
            ),
        ] {
            let problems = Config::parse(&format!("{GOOD}{yaml}"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].path, path);
        }
        for yaml in [
            "jwks:\n  min_refetch_interval_seconds: 1\n",
            "server:\n  threads: 64\n  grace_period_seconds: 30\n",
            "tokens:\n  cache_max_ttl_seconds: 3600\n",
            "server:\n  max_held_body_bytes: 50331648\n",
        ] {
            assert!(
                Config::parse(&format!("{GOOD}{yaml}"))
                    .unwrap()
                    .validate()
                    .is_ok(),
                "{yaml}"
            );
        }
    }

    /// A user's proof quota defaults to a hundredth of its client's, at
    /// least 1000 and at most the client's; set, it must fit in the
    /// client's.
    #[test]
    fn a_user_proof_quota_fits_in_its_client_quota() {
        let quotas = |yaml: &str| {
            Config::parse(&format!("{GOOD}dpop:\n{yaml}"))
                .unwrap()
                .validate()
                .map(|s| (s.dpop.max_proofs_per_key, s.dpop.max_proofs_per_user))
        };
        assert_eq!(quotas("  enabled: true\n").unwrap(), (100_000, 1000));
        assert_eq!(
            quotas("  replay_cache_max_entries: 10000000\n").unwrap(),
            (1_000_000, 10_000)
        );
        assert_eq!(quotas("  max_proofs_per_key: 300\n").unwrap(), (300, 300));
        assert_eq!(
            quotas("  max_proofs_per_key: 300\n  max_proofs_per_user: 20\n").unwrap(),
            (300, 20)
        );
        for yaml in [
            "  max_proofs_per_key: 300\n  max_proofs_per_user: 301\n",
            "  max_proofs_per_user: 0\n",
        ] {
            let problems = quotas(yaml).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].path, "dpop.max_proofs_per_user");
            assert!(
                problems[0].message.contains("max_proofs_per_key"),
                "{problems:?}"
            );
        }
        // A wrong client quota is one problem, not two.
        let problems = quotas("  max_proofs_per_key: 0\n").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "dpop.max_proofs_per_key");
    }

    #[test]
    fn context_headers_never_replace_what_the_request_needs() {
        for (yaml, ok) in [
            (
                "forward_headers: {sub: X-User-Sub, patient: X-Patient}\n",
                true,
            ),
            ("forward_headers: {sub: Content-Type}\n", false),
            ("forward_headers: {patient: If-Match}\n", false),
            ("forward_headers: {sub: If-None-Exist}\n", false),
            (
                "forward_headers: {client_id: X-Who, issuer: x-who}\n",
                false,
            ),
            (
                "forward_headers: {\"claim:tenant\": X-Request-Partition-IDs}\n",
                true,
            ),
            ("forward_headers: {\"claim:\": X-Tenant}\n", false),
            ("forward_headers: {\"tenant\": X-Tenant}\n", false),
            (
                "forward_headers: {\"claim:tenant\": X-T, \"claim:org\": x-t}\n",
                false,
            ),
        ] {
            let r = Config::parse(&format!("{GOOD}{yaml}")).unwrap().validate();
            match r {
                Ok(_) => assert!(ok, "{yaml}"),
                Err(p) => {
                    assert!(!ok, "{yaml}: {p:?}");
                    assert!(p[0].path.starts_with("forward_headers."), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn a_rules_line_is_where_its_whole_name_is_written() {
        for (line, rule, want) in [
            ("  - name: deny", "deny", true),
            ("  - name: deny-exports", "deny", false),
            ("  - name: 'deny'  # the catch-all", "deny", true),
            ("  - {name: \"a\", effect: deny}", "a", true),
            ("  - {name: ab, effect: deny}", "a", false),
            ("    effect: deny", "deny", false),
        ] {
            assert_eq!(names_rule(line, rule), want, "{line}");
        }
        let dir = std::env::temp_dir().join(format!("fhirwall-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("p.yaml"),
            "rules:\n  - name: deny-exports\n    effect: deny\n  - name: a\n    effect: deny\n  \
             - name: a\n    effect: deny\n  - name: deny\n    effect: maybe\n",
        )
        .unwrap();
        let mut problems = Vec::new();
        load_policies(&dir, &mut |k: &str, _m: String| {
            problems.push(k.to_string())
        });
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("(line 6): rules[2].name")),
            "the second 'a' is on line 6: {problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("(line 8): rules[3].effect")),
            "'deny' is on line 8, not deny-exports' line 2: {problems:?}"
        );
    }

    #[test]
    fn listeners_that_cannot_both_be_bound_clash() {
        for (a, b, clash) in [
            ("127.0.0.1:8080", "127.0.0.1:8080", true),
            ("0.0.0.0:8080", "127.0.0.1:8080", true),
            ("127.0.0.1:8080", "0.0.0.0:8080", true),
            ("[::]:9901", "0.0.0.0:9901", true),
            ("[::]:9901", "127.0.0.1:9901", true),
            ("0.0.0.0:9901", "[::1]:9901", false),
            ("127.0.0.1:8080", "127.0.0.2:8080", false),
            ("0.0.0.0:8080", "0.0.0.0:9901", false),
        ] {
            let (a, b): (SocketAddr, SocketAddr) = (a.parse().unwrap(), b.parse().unwrap());
            assert_eq!(sockets_clash(a, b), clash, "{a} {b}");
        }
        // The proxy on every IPv4 address, the admin listener on the
        // loopback one, the same port.
        let text = GOOD.replace("listen: 127.0.0.1:8080", "listen: 0.0.0.0:9901");
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.path == "admin.listen" && p.message.contains("0.0.0.0:9901")),
            "{problems:?}"
        );
    }

    /// A CA file with a key or CRL beside its certificates is refused by
    /// `check` (Pingora's loader would fail on it when the proxy starts).
    #[test]
    fn a_ca_file_holds_certificates_only() {
        let issued = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        let cert = issued.cert.pem();
        let dir = std::env::temp_dir().join(format!("fhirwall-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, refused) in [
            ("certs.pem", cert.clone(), None),
            (
                "with-key.pem",
                format!("{cert}{}", issued.signing_key.serialize_pem()),
                Some("PrivateKey"),
            ),
            (
                "with-crl.pem",
                format!("{cert}-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"),
                Some("Crl"),
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let mut problems = Vec::new();
            let certs = pem_bundle("upstream.ca_file", path.to_str().unwrap(), &mut |k, m| {
                problems.push((k.to_string(), m))
            });
            match refused {
                None => assert!(
                    problems.is_empty() && certs.len() == 1,
                    "{name}: {problems:?}"
                ),
                Some(kind) => {
                    assert_eq!(problems.len(), 1, "{name}");
                    assert_eq!(problems[0].0, "upstream.ca_file");
                    assert!(
                        problems[0].1.contains(kind) && problems[0].1.contains("certificates only"),
                        "{name}: {problems:?}"
                    );
                }
            }
        }
        // A FIFO (or a directory) named by mistake is refused, not read: a
        // FIFO would hang `check`.
        let fifo = dir.join("fifo.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for path in [fifo.to_str().unwrap(), dir.to_str().unwrap()] {
            let mut problems = Vec::new();
            let certs = pem_bundle("upstream.ca_file", path, &mut |k, m| {
                problems.push((k.to_string(), m))
            });
            assert!(certs.is_empty());
            assert!(
                problems.len() == 1 && problems[0].1.contains("not a regular file"),
                "{path}: {problems:?}"
            );
            let mut problems = Vec::new();
            assert!(
                pem_blocks("tls.key_file", path, &["PRIVATE KEY"], &mut |k, m| {
                    problems.push((k.to_string(), m))
                })
                .is_none()
            );
            assert!(problems[0].1.contains("not a regular file"), "{problems:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        // Nor is one accepted where nothing is verified.
        let text = GOOD.replace(
            "  url: http://127.0.0.1:9090/r4\n",
            "  url: https://127.0.0.1:9090/r4\n  verify_tls: false\n  ca_file: ca.pem\n",
        );
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.path == "upstream.ca_file" && p.message.contains("verify_tls")),
            "{problems:?}"
        );
    }

    /// `upstream.special_params` takes plain `_` names fhirwall does not
    /// know; never one it judges by what it reaches, in any case.
    #[test]
    fn special_params_are_plain_unknown_names() {
        let with = |list: &str| {
            let text = GOOD.replace(
                "  url: http://127.0.0.1:9090/r4\n",
                &format!("  url: http://127.0.0.1:9090/r4\n  special_params: {list}\n"),
            );
            let config = Config::parse(&text).map_err(|e| vec![e.to_string()])?;
            match config.validate() {
                Ok(s) => Ok(s.upstream.special_params),
                Err(p) => Err(p
                    .into_iter()
                    .map(|p| format!("{}: {}", p.path, p.message))
                    .collect::<Vec<_>>()),
            }
        };
        assert_eq!(
            with("[_skip, _vendor-cursor_2]").unwrap(),
            ["_skip", "_vendor-cursor_2"]
        );
        assert_eq!(with("[]").unwrap(), Vec::<String>::new());
        let p =
            with("[skip, _, '_a:b', _a.b, _INCLUDE, _Has, _mdm, _sort, _getpages, _count, _x, _x, _Elements]")
                .unwrap_err();
        let want = [
            ("[0]", "not a parameter name"),
            ("[1]", "not a parameter name"),
            ("[2]", "not a parameter name"),
            ("[3]", "not a parameter name"),
            ("[4]", "is _include, which reaches"),
            ("[5]", "is _has, which reaches"),
            ("[6]", "is _mdm, which reaches"),
            ("[7]", "is _sort, which reaches"),
            ("[8]", "is _getpages, which reaches"),
            ("[9]", "already known"),
            ("[11]", "listed twice"),
            ("[12]", "is _elements in another case"),
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (p, (at, says)) in p.iter().zip(want) {
            assert!(
                p.starts_with(&format!("upstream.special_params{at}: ")) && p.contains(says),
                "{p} ({at}: {says})"
            );
        }
        // Given without a value: an error naming the key and line.
        let p = with("").unwrap_err();
        assert!(
            p[0].contains("special_params") && p[0].contains("line 6"),
            "{p:?}"
        );
    }

    /// Clients' tokens go only where the upstream is verified; an upstream
    /// reached in clear, or unverified, is said to be so.
    #[test]
    fn tokens_are_forwarded_only_to_a_verified_upstream() {
        let with = |upstream: &str| {
            Config::parse(&GOOD.replace("  url: http://127.0.0.1:9090/r4\n", upstream))
                .unwrap()
                .validate()
        };
        for (upstream, warning) in [
            ("  url: http://127.0.0.1:9090/r4\n", None),
            ("  url: http://[::1]:9090/r4\n", None),
            ("  url: https://10.0.0.5/r4\n", None),
            (
                "  url: http://10.0.0.5:9090/r4\n",
                Some("upstream.url: plain http"),
            ),
            (
                "  url: https://10.0.0.5/r4\n  verify_tls: false\n",
                Some("upstream.verify_tls: false"),
            ),
        ] {
            let w = with(upstream).unwrap().warnings();
            match warning {
                None => assert!(w.is_empty(), "{upstream}: {w:?}"),
                Some(start) => {
                    assert!(w.len() == 1 && w[0].starts_with(start), "{upstream}: {w:?}")
                }
            }
            let forwarding = format!("{upstream}  forward_authorization: true\n");
            let result = with(&forwarding);
            match warning {
                None => assert!(result.is_ok(), "{forwarding}: {:?}", result.err()),
                Some(start) => {
                    let p = result.err().unwrap_or_default();
                    assert!(
                        p.iter().any(|p| p.path == "upstream.forward_authorization"),
                        "{forwarding}: {p:?}"
                    );
                    // Accepted explicitly (a sidecar encrypting the hop):
                    // valid, and warned of, tokens named.
                    let accepted =
                        format!("{forwarding}  forward_authorization_unverified: true\n");
                    let w = with(&accepted).unwrap().warnings();
                    assert!(
                        w.len() == 1 && w[0].starts_with(start) && w[0].contains("tokens"),
                        "{accepted}: {w:?}"
                    );
                }
            }
        }
    }

    /// A break-glass rule whose emergency anyone may declare by a header
    /// is said to be so; vouched for by a claim, it is not.
    #[test]
    fn break_glass_declared_by_a_header_is_warned_of() {
        let mut s = Config::parse(GOOD).unwrap().validate().unwrap();
        let warned = |s: &Settings| s.warnings().iter().any(|w| w.starts_with("break_glass"));
        assert!(!warned(&s));
        let problems = s.policies.add_file(
            "t.yaml",
            &crate::policy::parse_file(
                "rules:\n  - name: nights\n    effect: deny\n    break_glass: true\n    when: {interaction: [read]}\n",
            )
            .unwrap(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(warned(&s));
        assert!(s
            .warnings()
            .iter()
            .any(|w| w.contains("X-Fhirwall-Break-Glass header")));
        s.break_glass.claim = Some("break_glass_reason".into());
        assert!(!warned(&s));
    }

    #[test]
    fn urls_in_problems_never_show_credentials() {
        assert_eq!(
            without_userinfo("'http://gw:S3cret@idp/x' and 'redis://:pw@c:6379/0', http://plain/"),
            "'http://***@idp/x' and 'redis://***@c:6379/0', http://plain/"
        );
        assert_eq!(without_userinfo("no url at all"), "no url at all");
        assert_eq!(without_userinfo("ftp://a@b@c"), "ftp://***@c");
        assert_eq!(
            without_userinfo("'https://gw:pa/ss?w#rd@idp/x'"),
            "'https://***@idp/x'"
        );
        assert_eq!(
            without_userinfo("'http://gw:pa ss@idp/x' is not a URL\nnext: http://h/"),
            "'http://***@idp/x' is not a URL\nnext: http://h/"
        );
        let text = GOOD.replace(
            "    audiences: [http://localhost:8080/fhir]",
            "    audiences: [http://localhost:8080/fhir]\n    introspection:\n      endpoint: http://gw:IntroSecret1@idp.example/introspect\n      client_id: gw\n      client_secret: s",
        ) + "redis:\n  url: http://user:RedisSecret2@cache/0\n";
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        let shown = format!("{problems:?}");
        assert!(
            shown.contains("issuers[0].introspection.endpoint"),
            "{shown}"
        );
        assert!(shown.contains("redis.url"), "{shown}");
        for secret in ["IntroSecret1", "RedisSecret2"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn config_file_must_be_a_small_regular_text_file() {
        let dir = std::env::temp_dir().join(format!("fhirwall-cfgfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A FIFO named by mistake is refused at once, not waited on (the
        // test would hang).
        let fifo = dir.join("config.yaml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let Err(err) = load(&fifo) else {
            panic!("a FIFO is not a configuration")
        };
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::remove_file(&fifo).unwrap();
        // Too large: refused by its size, not parsed.
        let big = dir.join("big.yaml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_BYTES + 1) as usize]).unwrap();
        let Err(err) = load(&big) else {
            panic!("a huge file is refused")
        };
        assert!(err.to_string().contains("larger than 16 MiB"), "{err}");
        // Not UTF-8: the offset of the first bad byte.
        let bin = dir.join("bin.yaml");
        std::fs::write(&bin, b"server:\n  \xff\n").unwrap();
        let Err(err) = load(&bin) else {
            panic!("binary is refused")
        };
        assert!(err.to_string().contains("offset 10"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parse_errors_show_no_source_lines() {
        let text = GOOD.replace(
            "    audiences: [http://localhost:8080/fhir]",
            "    audiences: [http://localhost:8080/fhir]\n    introspection:\n      endpoint: https://idp.example/introspect\n      client_id: gw\n      client_secret: SuperSecretValue123\n      client_secret: Another456",
        );
        let e = Config::parse(&text).err().unwrap();
        assert!(e.contains("duplicate mapping key: client_secret"), "{e}");
        assert!(e.contains("line "), "{e}");
        assert!(
            !e.contains("SuperSecret") && !e.contains("Another456"),
            "{e}"
        );
        assert!(!e.contains("DuplicateKeyPolicy"), "{e}");
        let text = text.replace("      client_secret: Another456", "      timeout_ms: x");
        let e = Config::parse(&text).err().unwrap();
        assert!(e.contains("line ") && !e.contains("SuperSecret"), "{e}");
        // A wrong value is named by its key path, as later problems are.
        assert!(
            e.starts_with("issuers[0].introspection.timeout_ms: "),
            "{e}"
        );
    }

    /// A key written without a value (a template that rendered empty,
    /// every line below it commented out) is an error naming it, not the
    /// setting turned off.
    #[test]
    fn a_setting_written_without_a_value_is_an_error() {
        for (extra, key) in [
            ("roles:\n", "roles"),
            ("policies:\n", "policies"),
            ("tls:\n  # cert_file: c.pem\n", "tls"),
            ("redis: ~\n", "redis"),
            (
                "break_glass:\n  max_token_age_seconds:\n",
                "break_glass.max_token_age_seconds",
            ),
            ("break_glass:\n  claim: null\n", "break_glass.claim"),
        ] {
            let e = Config::parse(&format!("{GOOD}{extra}")).err();
            let e = e.unwrap_or_else(|| panic!("{extra:?} parsed"));
            assert!(
                e.starts_with(&format!("{key}: ")) && e.contains("has no value"),
                "{extra:?}: {e}"
            );
            assert!(e.contains("line "), "{e}");
        }
        // Left out, they are simply not set.
        let c = Config::parse(GOOD).unwrap();
        assert!(c.roles.is_none() && c.tls.is_none() && c.policies.is_none());
    }

    #[test]
    fn signing_keys_come_over_tls_or_loopback() {
        let with = |issuer: &str, keys: &str| {
            GOOD.replace(
                "    issuer: http://127.0.0.1:9999",
                &format!("    issuer: {issuer}"),
            )
            .replace("    jwks_uri: http://127.0.0.1:9999/jwks.json", keys)
        };
        for (text, path, ok) in [
            (
                with(
                    "https://idp.example",
                    "    jwks_uri: https://idp.example/certs",
                ),
                "",
                true,
            ),
            (
                with(
                    "http://idp.example",
                    "    jwks_uri: https://idp.example/certs",
                ),
                "",
                true,
            ),
            (
                with(
                    "https://idp.example",
                    "    jwks_uri: http://localhost:1/certs",
                ),
                "",
                true,
            ),
            (
                with(
                    "https://idp.example",
                    "    jwks_uri: http://idp.example/certs",
                ),
                "issuers[0].jwks_uri",
                false,
            ),
            (with("https://idp.example", "    discovery: true"), "", true),
            (
                with("http://127.0.0.1:1/realm", "    discovery: true"),
                "",
                true,
            ),
            (
                with("http://idp.example/realm", "    discovery: true"),
                "issuers[0].issuer",
                false,
            ),
        ] {
            match Config::parse(&text).unwrap().validate() {
                Ok(_) => assert!(ok, "{text}"),
                Err(p) => {
                    assert!(!ok, "{p:?}");
                    assert_eq!(p.len(), 1, "{p:?}");
                    assert_eq!(p[0].path, path);
                    assert!(p[0].message.contains("not https"), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn unknown_and_duplicate_keys_are_errors() {
        // Every unknown key is reported by its path, with the other
        // problems; none stops the others from being found.
        let text = format!("{GOOD}\nbogus: 1\n")
            .replace("    audiences:", "    audience: x\n    audiences:")
            .replace("listen: 127.0.0.1:8080", "listen: nowhere\nlisten_port: 1");
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in ["bogus", "issuers[0].audience", "listen_port", "listen"] {
            assert!(paths.contains(&want), "{want} not in {paths:?}");
        }
        let unknown = problems.iter().find(|p| p.path == "bogus").unwrap();
        assert!(unknown.message.contains("unknown key"), "{unknown:?}");
        // Deeper: inside a map of roles and an optional section.
        let text = format!(
            "{GOOD}roles:\n  claim: roles\n  map:\n    nurse: {{scopes: [user/*.rs], scopez: [x]}}\n"
        );
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        assert_eq!(problems[0].path, "roles.map.nurse.scopez", "{problems:?}");
        // A duplicate key still stops the parse, with its line.
        let e =
            Config::parse(&GOOD.replace("admin:\n", "listen: 1.2.3.4:1\nadmin:\n")).unwrap_err();
        assert!(e.to_lowercase().contains("duplicate"), "{e}");
    }

    /// The audit endpoint's bearer token is read from the environment and
    /// never printed with the settings.
    #[test]
    fn the_audit_bearer_token_is_kept_out_of_debug_output() {
        let var = format!("FHIRWALL_TEST_AUDIT_TOKEN_{}", std::process::id());
        // SAFETY: a variable only this test reads, set before it is read.
        unsafe { std::env::set_var(&var, "tok-hunter2") };
        let text = format!(
            "{GOOD}audit:\n  sink: fhir\n  format: audit_event\n  fhir:\n    \
             endpoint: https://audit.example/fhir\n    bearer_token_env: {var}\n"
        );
        let s = Config::parse(&text).unwrap().validate().unwrap();
        match &s.audit.sink {
            AuditSink::Fhir { bearer_token, .. } => {
                assert_eq!(
                    bearer_token.as_ref().map(|t| &t.0[..]),
                    Some(&b"tok-hunter2"[..])
                )
            }
            other => panic!("{other:?}"),
        }
        let shown = format!("{s:?}");
        assert!(shown.contains("Secret(11 bytes)"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn urls_with_credentials_are_refused() {
        let text = GOOD.replace("http://127.0.0.1:9090/r4", "http://svc:hunter2@127.0.0.1:9090/r4")
            .replace("http://127.0.0.1:9999/jwks.json", "https://k:hunter2@idp.example/jwks")
            .replace(
                "admin:\n",
                "  - name: other\n    issuer: https://other.example\n    audiences: [x]\n    \
                 introspection:\n      endpoint: https://gw:hunter2@other.example/introspect\n      \
                 client_id: gw\n      client_secret: s\nadmin:\n",
            )
            + "audit:\n  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: https://u:hunter2@audit.example/fhir\n";
        let problems = Config::parse(&text).unwrap().validate().unwrap_err();
        for key in [
            "upstream.url",
            "audit.fhir.endpoint",
            "issuers[0].jwks_uri",
            "issuers[1].introspection.endpoint",
        ] {
            let p = problems.iter().find(|p| p.path == key);
            assert!(
                p.is_some_and(
                    |p| p.message.contains("credentials") && !p.message.contains("hunter2")
                ),
                "{key}: {problems:?}"
            );
        }
    }

    /// Waits and intervals have an upper bound as well as a lower one: a
    /// day-long fsync interval is `never`, an hour-long retry refuses
    /// every request for an hour, and a token age beyond `i64` turned
    /// negative.
    #[test]
    fn waits_and_ages_are_bounded() {
        for (extra, key) in [
            (
                "audit:\n  fsync: interval\n  fsync_interval_ms: 86400000\n",
                "audit.fsync_interval_ms",
            ),
            ("audit:\n  retry_ms: 3600000\n", "audit.retry_ms"),
            (
                "jwks:\n  fetch_timeout_ms: 600000\n",
                "jwks.fetch_timeout_ms",
            ),
            (
                "break_glass:\n  max_token_age_seconds: 18446744073709551615\n",
                "break_glass.max_token_age_seconds",
            ),
            (
                "break_glass:\n  max_token_age_seconds: 0\n",
                "break_glass.max_token_age_seconds",
            ),
        ] {
            let p = problems_of(extra);
            assert!(p.iter().any(|(k, _)| k == key), "{extra}: {p:?}");
        }
        let p = problems_of("");
        assert!(p.is_empty(), "{p:?}");
        let slow = GOOD.replace(
            "  url: http://127.0.0.1:9090/r4\n",
            "  url: http://127.0.0.1:9090/r4\n  connect_timeout_ms: 600000\n  read_timeout_ms: 3600001\n",
        );
        let p: Vec<String> = Config::parse(&slow)
            .unwrap()
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(
            p,
            ["upstream.connect_timeout_ms", "upstream.read_timeout_ms"]
        );
        assert!(problems_of("break_glass:\n  max_token_age_seconds: 900\n").is_empty());
    }

    /// A setting of the client authentication method not chosen is named
    /// as unused (a key file nobody reads, a secret never sent).
    #[test]
    fn introspection_settings_of_the_other_method_are_problems() {
        let with = |auth: &str| {
            let text = GOOD.replace(
                "admin:\n",
                &format!(
                    "  - name: other\n    issuer: https://other.example\n    audiences: [x]\n    \
                     introspection:\n      endpoint: https://other.example/introspect\n      \
                     client_id: gw\n{auth}admin:\n"
                ),
            );
            match Config::parse(&text).unwrap().validate() {
                Ok(_) => Vec::new(),
                Err(p) => p.into_iter().map(|p| p.path).collect::<Vec<_>>(),
            }
        };
        assert!(with("      client_secret: s\n").is_empty());
        assert_eq!(
            with("      client_secret: s\n      private_key_file: k.pem\n      private_key_alg: ES256\n"),
            [
                "issuers[1].introspection.private_key_file",
                "issuers[1].introspection.private_key_alg"
            ]
        );
        let p = with("      auth_method: private_key_jwt\n      private_key_file: /nonexistent-k.pem\n      client_secret_env: X\n");
        assert!(
            p.contains(&"issuers[1].introspection.client_secret_env".to_string()),
            "{p:?}"
        );
    }

    #[test]
    fn the_upgrade_socket_is_below_the_config_in_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fhirwall-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut c = Config::parse(&format!("{GOOD}server:\n  upgrade_sock: up.sock\n")).unwrap();
        c.base_dir = dir.clone();
        assert_eq!(
            c.validate().unwrap().upgrade_sock,
            Some(dir.join("up.sock"))
        );
        assert_eq!(
            Config::parse(GOOD)
                .unwrap()
                .validate()
                .unwrap()
                .upgrade_sock,
            None
        );
        let open = dir.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        // Not writable by others, but others may reach the socket in it.
        let enterable = dir.join("enterable");
        std::fs::create_dir_all(&enterable).unwrap();
        std::fs::set_permissions(&enterable, std::fs::Permissions::from_mode(0o711)).unwrap();
        for (sock, why) in [
            (
                format!("{}/up.sock", enterable.display()),
                "can be entered by other users (mode 711)",
            ),
            // Where anyone could listen first and be handed the sockets.
            ("/tmp/fhirwall.sock".to_string(), "writable by other users"),
            (
                format!("{}/up.sock", open.display()),
                "writable by other users",
            ),
            ("/nonexistent-dir/up.sock".to_string(), "No such file"),
            (
                format!("{}/{}.sock", dir.display(), "x".repeat(120)),
                "107 bytes",
            ),
            (format!("{}/file/up.sock", dir.display()), "not a directory"),
        ] {
            std::fs::write(dir.join("file"), "").unwrap();
            let problems = Config::parse(&format!("{GOOD}server:\n  upgrade_sock: {sock}\n"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert_eq!(problems[0].path, "server.upgrade_sock", "{problems:?}");
            assert!(problems[0].message.contains(why), "{sock}: {problems:?}");
        }
        // A private directory of another user: its owner could listen
        // there. (Only root can give a directory away; CI runs as root.)
        if rustix::process::geteuid().is_root() {
            let theirs = dir.join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let problems = Config::parse(&format!(
                "{GOOD}server:\n  upgrade_sock: {}/up.sock\n",
                theirs.display()
            ))
            .unwrap()
            .validate()
            .unwrap_err();
            assert!(
                problems[0].message.contains("belongs to user 65534"),
                "{problems:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reload_tells_the_sections_only_a_restart_applies() {
        let load = |extra: &str| {
            Config::parse(&format!("{GOOD}{extra}"))
                .unwrap()
                .validate()
                .unwrap()
        };
        let running = load("");
        assert!(running.needs_restart(&load("")).is_empty());
        // What a reload applies is not listed.
        assert!(running
            .needs_restart(&load("break_glass:\n  header: X-Emergency\n"))
            .is_empty());
        assert_eq!(
            running.needs_restart(&load(
                "dpop:\n  max_age_seconds: 30\nserver:\n  threads: 3\n"
            )),
            ["server", "dpop"]
        );
        let audiences = GOOD.replace(
            "audiences: [http://localhost:8080/fhir]",
            "audiences: [http://localhost:8080/fhir, https://fhir.example.org]",
        );
        let new = Config::parse(&audiences).unwrap().validate().unwrap();
        assert_eq!(running.needs_restart(&new), ["issuers"]);
    }

    #[test]
    fn redis_settings_are_checked_and_the_password_kept_secret() {
        let dir = std::env::temp_dir().join(format!("fhirwall-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("redis.pw"), "s3cret-pw\n").unwrap();
        std::fs::write(dir.join("empty.pw"), "\n").unwrap();
        std::fs::write(dir.join("long.pw"), format!("{}\n", "p".repeat(512))).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["redis".into()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("not.pem"), "hello").unwrap();
        let with = |redis: &str| {
            let mut c = Config::parse(&format!("{GOOD}redis:\n{redis}")).unwrap();
            c.base_dir = dir.clone();
            c.validate()
        };
        let s = with(
            "  url: redis://cache.internal:6380/3\n  username: fhirwall\n  password_file: redis.pw\n  on_failure: local\n",
        )
        .unwrap();
        let r = s.redis.unwrap();
        assert_eq!((r.host.as_str(), r.port, r.db), ("cache.internal", 6380, 3));
        assert_eq!(r.password.as_ref().unwrap().0, b"s3cret-pw");
        assert!(r.fallback_local);
        assert_eq!(
            (r.key_prefix.as_str(), r.timeout),
            ("fhirwall:", Duration::from_millis(200))
        );
        assert!(
            !format!("{r:?}").contains("s3cret"),
            "the password is printed"
        );
        let r = with("  url: rediss://[::1]\n  ca_file: ca.pem\n  password_file: long.pw\n")
            .unwrap()
            .redis
            .unwrap();
        assert!(r.tls.as_ref().unwrap().ca_pem.is_some());
        assert_eq!(r.password.unwrap().0.len(), 512);
        // Off loopback, plain redis:// is said to be readable and
        // answerable by anyone on the path (a warning, not a problem).
        let warned = |s: Settings| {
            s.warnings()
                .into_iter()
                .filter(|w| w.starts_with("redis.url"))
                .collect::<Vec<_>>()
        };
        let w = warned(
            with("  url: redis://cache.internal:6380/3\n  password_file: redis.pw\n").unwrap(),
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("with the password sent in clear"), "{w:?}");
        assert!(warned(with("  url: redis://127.0.0.1/\n").unwrap()).is_empty());
        assert!(warned(with("  url: rediss://cache.internal\n").unwrap()).is_empty());
        let r = with("  url: redis://[::1]/\n").unwrap();
        assert!(warned(r.clone()).is_empty());
        let r = r.redis.unwrap();
        assert!(r.tls.is_none());
        assert_eq!(
            (r.host.as_str(), r.port, r.db, r.fallback_local),
            ("::1", 6379, 0, false)
        );
        assert!(Config::parse(GOOD)
            .unwrap()
            .validate()
            .unwrap()
            .redis
            .is_none());
        for (redis, path, why) in [
            ("  url: redis://:pw@cache/0\n", "redis.url", "credentials"),
            ("  url: redis://user@cache/0\n", "redis.url", "credentials"),
            ("  url: redis://cache//3\n", "redis.url", "database number"),
            ("  url: redis://cache/+3\n", "redis.url", "database number"),
            ("  url: redis://cache:0/\n", "redis.url", "port 0"),
            (
                "  url: redis://cache\n  username: fhirwall\n",
                "redis.username",
                "password_file",
            ),
            (
                "  url: redis://cache\n  ca_file: ca.pem\n",
                "redis.ca_file",
                "rediss://",
            ),
            (
                "  url: rediss://cache\n  ca_file: not.pem\n",
                "redis.ca_file",
                "no PEM",
            ),
            (
                "  url: rediss://cache\n  client_cert_file: ca.pem\n  client_key_file: ca.pem\n",
                "redis.client_key_file",
                "no PEM private key",
            ),
            (
                "  url: rediss://cache\n  ca_file: missing.pem\n",
                "redis.ca_file",
                "cannot be read",
            ),
            (
                "  url: rediss://cache\n  client_cert_file: ca.pem\n",
                "redis.client_cert_file",
                "go together",
            ),
            ("  url: http://cache/0\n", "redis.url", "redis://"),
            (
                "  url: redis://cache/zero\n",
                "redis.url",
                "database number",
            ),
            ("  url: redis://cache/0?x=1\n", "redis.url", "query"),
            ("  url: cache:6379\n", "redis.url", "redis://"),
            (
                "  url: redis://cache\n  password_file: missing.pw\n",
                "redis.password_file",
                "cannot be read",
            ),
            (
                "  url: redis://cache\n  password_file: empty.pw\n",
                "redis.password_file",
                "1 to 512 bytes",
            ),
            (
                "  url: redis://cache\n  key_prefix: \"a b\"\n",
                "redis.key_prefix",
                "printable",
            ),
            (
                "  url: redis://cache\n  timeout_ms: 0\n",
                "redis.timeout_ms",
                "between",
            ),
            (
                "  url: redis://cache\n  on_failure: ignore\n",
                "redis.on_failure",
                "refuse, local",
            ),
            (
                "  url: redis://cache\n  username: \"\"\n",
                "redis.username",
                "empty",
            ),
            (
                "  url: redis://cache\n  pasword_file: x\n",
                "redis.pasword_file",
                "unknown key",
            ),
        ] {
            let problems = with(redis).unwrap_err();
            assert_eq!(problems.len(), 1, "{redis}: {problems:?}");
            assert_eq!(problems[0].path, path, "{redis}: {problems:?}");
            assert!(problems[0].message.contains(why), "{redis}: {problems:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Redis given up for this process's own memory: DPoP proofs can be
    /// replayed across replicas meanwhile, which is said.
    #[test]
    fn local_redis_fallback_with_dpop_is_warned_of() {
        let warned = |extra: &str| {
            let s = Config::parse(&format!("{GOOD}{extra}"))
                .unwrap()
                .validate()
                .unwrap();
            s.warnings()
                .iter()
                .any(|w| w.starts_with("redis.on_failure: local with dpop on"))
        };
        let redis = "redis:\n  url: redis://127.0.0.1:6379/0\n";
        assert!(warned(&format!("{redis}  on_failure: local\n")));
        assert!(!warned(redis));
        assert!(!warned(&format!(
            "{redis}  on_failure: local\ndpop:\n  enabled: false\n"
        )));
    }

    #[test]
    fn a_nonce_key_file_must_hold_a_key_and_be_used() {
        let dir = std::env::temp_dir().join(format!("fhirwall-nonce-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, short) = (dir.join("good.key"), dir.join("short.key"));
        std::fs::write(&good, [1u8; 32]).unwrap();
        std::fs::write(&short, [1u8; 16]).unwrap();
        let with = |extra: &str| {
            Config::parse(&format!("{GOOD}dpop:\n{extra}"))
                .unwrap()
                .validate()
        };
        let s = with(&format!(
            "  require_nonce: true\n  nonce_key_file: {}\n",
            good.display()
        ))
        .unwrap();
        assert_eq!(s.dpop.nonce_key.as_ref().unwrap().0, [1u8; 32]);
        assert!(
            !format!("{:?}", s.dpop).contains("[1, 1"),
            "the key is printed"
        );
        // A relative path is below the config file's directory.
        let mut c = Config::parse(&format!(
            "{GOOD}dpop:\n  require_nonce: true\n  nonce_key_file: good.key\n"
        ))
        .unwrap();
        assert!(
            c.validate().is_err(),
            "good.key found outside the config's directory"
        );
        c.base_dir = dir.clone();
        assert_eq!(c.validate().unwrap().dpop.nonce_key.unwrap().0, [1u8; 32]);
        for (extra, why) in [
            (
                format!(
                    "  require_nonce: true\n  nonce_key_file: {}\n",
                    short.display()
                ),
                "16 bytes",
            ),
            (
                format!(
                    "  require_nonce: true\n  nonce_key_file: {}\n",
                    dir.join("missing.key").display()
                ),
                "cannot be read",
            ),
            (
                format!("  nonce_key_file: {}\n", good.display()),
                "require_nonce",
            ),
            (
                "  require_nonce: true\n  nonce_key_file: /dev/urandom\n".to_string(),
                "not a regular file",
            ),
        ] {
            let problems = with(&extra).unwrap_err();
            assert_eq!(problems[0].path, "dpop.nonce_key_file", "{problems:?}");
            assert!(problems[0].message.contains(why), "{problems:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nat64_prefixes_are_rfc_6052_blocks() {
        let s = Config::parse(GOOD).unwrap().validate().unwrap();
        assert_eq!(
            s.nat64_prefixes,
            vec![crate::client_addr::well_known_nat64()]
        );
        let c = Config::parse(&format!(
            "{GOOD}server:\n  nat64_prefixes: [64:ff9b:1::/48, 10.0.0.0/8, 2001:db8::/36, nope]\n"
        ))
        .unwrap();
        let problems = c.validate().unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.nat64_prefixes[1]",
                "server.nat64_prefixes[2]",
                "server.nat64_prefixes[3]"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn trusted_proxies_are_address_blocks_named_by_their_index() {
        let with =
            |list: &str| Config::parse(&format!("{GOOD}server:\n  trusted_proxies: {list}\n"));
        let s = with("[10.0.0.0/8, '::1']").unwrap().validate().unwrap();
        assert_eq!(s.trusted_proxies.len(), 2);
        let problems = with("[10.0.0.0/8, ingress, 10.0.0.0/40, 0.0.0.0/0]")
            .unwrap()
            .validate()
            .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.trusted_proxies[1]",
                "server.trusted_proxies[2]",
                "server.trusted_proxies[3]"
            ]
        );
        assert!(
            problems[2].message.contains("every address"),
            "{}",
            problems[2].message
        );
        assert!(
            problems[0].message.contains("'ingress'"),
            "{}",
            problems[0].message
        );
        assert!(Config::parse(GOOD)
            .unwrap()
            .validate()
            .unwrap()
            .trusted_proxies
            .is_empty());
    }

    /// Problems of GOOD plus an `audit:` section.
    fn audit_problems(audit: &str) -> Vec<(String, String)> {
        match Config::parse(&format!("{GOOD}audit:\n{audit}"))
            .unwrap()
            .validate()
        {
            Ok(_) => Vec::new(),
            Err(ps) => ps.into_iter().map(|p| (p.path, p.message)).collect(),
        }
    }

    #[test]
    fn audit_settings_are_checked_with_their_keys() {
        let paths = |audit: &str| -> Vec<String> {
            audit_problems(audit).into_iter().map(|(p, _)| p).collect()
        };
        assert!(paths("  sink: stdout\n").is_empty());
        assert_eq!(paths("  sink: file\n"), ["audit.path"]);
        assert_eq!(
            paths("  sink: file\n  path: /nonexistent-dir-fhirwall/a.jsonl\n"),
            ["audit.path"]
        );
        assert_eq!(paths("  sink: syslog\n"), ["audit.sink"]);
        assert_eq!(paths("  format: xml\n"), ["audit.format"]);
        assert_eq!(paths("  fsync: sometimes\n"), ["audit.fsync"]);
        assert_eq!(paths("  on_failure: spill\n"), ["audit.spill_path"]);
        assert_eq!(paths("  spill_path: /tmp/x\n"), ["audit.spill_path"]);
        assert_eq!(paths("  queue_capacity: 1\n"), ["audit.queue_capacity"]);
        // The FHIR sink sends AuditEvents, over https (or on loopback).
        assert_eq!(
            paths("  sink: fhir\n  fhir:\n    endpoint: https://audit.example.org/fhir\n"),
            ["audit.format"]
        );
        assert_eq!(
            paths("  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: http://audit.example.org/fhir\n"),
            ["audit.fhir.endpoint"]
        );
        assert!(paths(
            "  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: http://127.0.0.1:1/fhir\n"
        )
        .is_empty());
        let msg = &audit_problems("  sink: file\n  path: /nonexistent-dir-fhirwall/a.jsonl\n")[0].1;
        assert!(msg.contains("/nonexistent-dir-fhirwall"), "{msg}");
        // A directory where the file should be: it cannot be appended to.
        let dir = std::env::temp_dir();
        let p = audit_problems(&format!("  sink: file\n  path: {}\n", dir.display()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].0 == "audit.path" && p[0].1.contains("is a directory"),
            "{p:?}"
        );
        let p = audit_problems(&format!(
            "  on_failure: spill\n  spill_path: {}\n",
            dir.display()
        ));
        assert!(
            p[0].0 == "audit.spill_path" && p[0].1.contains("is a directory"),
            "{p:?}"
        );
        // Nor a pipe or a device, which cannot be fsynced or rotated.
        let p = audit_problems("  sink: file\n  path: /dev/null\n");
        assert!(
            p.len() == 1 && p[0].0 == "audit.path" && p[0].1.contains("not a regular file"),
            "{p:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = GOOD
            .replace("listen: 127.0.0.1:8080", "listen: nowhere")
            .replace("http://127.0.0.1:9090/r4", "ftp://127.0.0.1/r4")
            .replace(
                "    audiences: [http://localhost:8080/fhir]",
                "    audiences: []\n    algorithms: [RS256, HS256, none]",
            );
        let problems = Config::parse(&bad).unwrap().validate().unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "listen",
                "upstream.url",
                "issuers[0].audiences",
                "issuers[0].algorithms[1]",
                "issuers[0].algorithms[2]"
            ],
            "{problems:?}"
        );
        assert!(problems[3].message.contains("HS256"));
    }

    #[test]
    fn the_break_glass_header_has_a_name_of_its_own() {
        for (header, ok) in [
            ("X-Fhirwall-Break-Glass", true),
            ("Emergency-Reason", true),
            ("Authorization", false),
            ("Host", false),
            ("content-type", false),
            ("If-None-Exist", false),
            ("Content-Encoding", false),
            ("X-Forwarded-For", false),
            ("Connection", false),
        ] {
            let text = format!("{GOOD}break_glass:\n  header: {header}\n");
            let problems = match Config::parse(&text).unwrap().validate() {
                Ok(_) => Vec::new(),
                Err(p) => p,
            };
            let refused = problems.iter().any(|p| p.path == "break_glass.header");
            assert_eq!(!refused, ok, "{header}: {problems:?}");
        }
    }

    #[test]
    fn jwks_source_must_be_exactly_one() {
        let both = GOOD.replace("    audiences:", "    discovery: true\n    audiences:");
        let p = Config::parse(&both).unwrap().validate().unwrap_err();
        assert_eq!(p[0].path, "issuers[0].jwks_uri");
        let neither = GOOD.replace("    jwks_uri: http://127.0.0.1:9999/jwks.json\n", "");
        let p = Config::parse(&neither).unwrap().validate().unwrap_err();
        assert_eq!(p[0].path, "issuers[0].jwks_uri");
    }

    #[test]
    fn reference_config_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
        Config::parse(&text).unwrap().validate().unwrap();
    }
}
