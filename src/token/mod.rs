//! Stage 3, validate: JWT access tokens.
//!
//! The pure part lives here: [`inspect`] reads the unverified header and
//! issuer of a token (after capping its size), [`KeySet::from_jwks`] turns a
//! JWKS document into verification keys (refusing symmetric and private
//! keys), and [`verify`] checks the signature with one allow-listed
//! asymmetric algorithm and then every claim against a `now` passed in.
//! Fetching JWKS ([`jwks`]) and caching verified tokens ([`cache`]) are the
//! I/O edges.

pub mod cache;
pub mod introspect;
pub mod jwks;
pub mod validator;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Issuer;
use crate::scope::ScopeSet;

/// Why a token is refused (or cannot be checked now).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {0} bytes")]
    TooLong(usize),
    #[error("token is not a JWS compact serialization (three base64url parts)")]
    NotJwt,
    #[error("token header is not base64url-encoded JSON")]
    BadHeader,
    #[error("token payload is not base64url-encoded JSON")]
    BadPayload,
    #[error("token algorithm '{0}' is not allowed (only asymmetric algorithms configured for the issuer)")]
    AlgorithmNotAllowed(String),
    #[error("token header carries 'crit', which is not supported")]
    CritHeader,
    #[error("token header typ '{0}' is not an access token type")]
    BadTyp(String),
    #[error("token has no 'iss' claim")]
    NoIssuer,
    #[error("issuer '{0}' is not configured")]
    UnknownIssuer(String),
    #[error("no key in the issuer's JWKS has kid '{0}'")]
    UnknownKid(String),
    #[error("the token's key is ambiguous: the issuer's JWKS has {0} usable keys for its kid (or, without a kid, for its algorithm: none, or more than the 3 fhirwall tries)")]
    AmbiguousKey(usize),
    #[error("key '{kid}' cannot be used with algorithm {alg}")]
    KeyAlgorithmMismatch { kid: String, alg: String },
    #[error("signature verification failed")]
    BadSignature,
    #[error("claim '{0}' is missing")]
    MissingClaim(&'static str),
    #[error("claim '{0}' is not a FHIR resource id (1 to 64 of A-Z a-z 0-9 - .)")]
    NotAnId(&'static str),
    #[error("claim '{0}' has the wrong type")]
    BadClaim(&'static str),
    #[error("claim '{0}' holds a control character")]
    ControlCharacter(&'static str),
    #[error("claim '{0}' cannot be forwarded upstream as forward_headers asks: it must be a string, number or boolean, or an array of them, without control characters")]
    UnforwardableClaim(String),
    #[error("the token is not an access token (its {0} is '{1}')")]
    NotAccessToken(&'static str, String),
    #[error("token expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired { exp: i64, now: i64, leeway: u64 },
    #[error("token is not valid before {nbf} (now {now}, leeway {leeway}s)")]
    NotYetValid { nbf: i64, now: i64, leeway: u64 },
    #[error("token was issued in the future (iat {iat}, now {now}, leeway {leeway}s)")]
    IssuedInFuture { iat: i64, now: i64, leeway: u64 },
    #[error("audience does not contain any accepted audience of issuer '{0}'")]
    WrongAudience(String),
    #[error("keys of issuer '{0}' are not available (JWKS endpoint unreachable); retry later")]
    KeysUnavailable(String),
    #[error("the authorization server says the token is not active")]
    Inactive,
    #[error("token introspection at issuer '{0}' is not available; retry later")]
    IntrospectionUnavailable(String),
    #[error("as many token introspections at issuer '{issuer}' are in flight as fhirwall makes at once (introspection.max_concurrent_calls: {limit}); retry later")]
    IntrospectionBusy { issuer: String, limit: u32 },
    #[error("token is not a JWT and no issuer is configured to introspect opaque tokens")]
    OpaqueNotAccepted,
    #[error("the token binds itself to a key or certificate (cnf) that the authorization server's introspection answer does not confirm")]
    UnconfirmedBinding,
    #[error("too many tokens from this address were not active, or could not be introspected, this minute; new tokens are not introspected for {0} s")]
    IntrospectionThrottled(u64),
}

impl TokenError {
    /// Short, stable code for metrics and audit.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLong(_) => "token_too_long",
            TokenError::NotJwt | TokenError::BadHeader | TokenError::BadPayload => {
                "token_malformed"
            }
            TokenError::AlgorithmNotAllowed(_) => "token_alg_not_allowed",
            TokenError::CritHeader | TokenError::BadTyp(_) => "token_header_refused",
            TokenError::NoIssuer | TokenError::UnknownIssuer(_) => "token_unknown_issuer",
            TokenError::UnknownKid(_)
            | TokenError::AmbiguousKey(_)
            | TokenError::KeyAlgorithmMismatch { .. } => "token_unknown_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::MissingClaim(_)
            | TokenError::BadClaim(_)
            | TokenError::ControlCharacter(_)
            | TokenError::UnforwardableClaim(_)
            | TokenError::NotAccessToken(..)
            | TokenError::NotAnId(_)
            | TokenError::UnconfirmedBinding => "token_bad_claims",
            TokenError::Expired { .. } => "token_expired",
            TokenError::NotYetValid { .. } | TokenError::IssuedInFuture { .. } => {
                "token_not_yet_valid"
            }
            TokenError::WrongAudience(_) => "token_wrong_audience",
            TokenError::KeysUnavailable(_) => "keys_unavailable",
            TokenError::Inactive => "token_inactive",
            TokenError::IntrospectionUnavailable(_) | TokenError::IntrospectionBusy { .. } => {
                "introspection_unavailable"
            }
            TokenError::IntrospectionThrottled(_) => "introspection_throttled",
            TokenError::OpaqueNotAccepted => "token_malformed",
        }
    }
}

/// What can be read from a token before its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    pub alg: String,
    pub kid: Option<String>,
    pub typ: Option<String>,
    pub iss: String,
    /// The payload's `cnf` as written (unverified: it may only ever make a
    /// check stricter).
    pub cnf: Option<Value>,
    /// The payload's `exp` when a number (unverified: only ever used to
    /// refuse).
    pub exp: Option<i64>,
    /// The payload's `aud` as written (unverified: only ever used to
    /// refuse).
    pub aud: Option<Value>,
}

/// A base64url part of a JWS decoded as JSON.
pub fn b64_json(part: &str) -> Option<Value> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads the header and issuer of a token without verifying it, and refuses
/// what can be refused without keys (size, shape, algorithm, `crit`, `typ`).
pub fn inspect(token: &str, max_bytes: usize) -> Result<Unverified, TokenError> {
    if token.len() > max_bytes {
        return Err(TokenError::TooLong(max_bytes));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::NotJwt);
    };
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(TokenError::NotJwt);
    }
    let header = b64_json(h)
        .filter(Value::is_object)
        .ok_or(TokenError::BadHeader)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(TokenError::BadHeader)?;
    if !crate::config::ALLOWED_ALGORITHMS.contains(&alg) {
        return Err(TokenError::AlgorithmNotAllowed(
            alg.chars().take(16).collect(),
        ));
    }
    if header.get("crit").is_some() {
        return Err(TokenError::CritHeader);
    }
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(typ)) => {
            // RFC 7515 §4.1.9: `application/jwt` is `jwt` spelt in full.
            if !["jwt", "application/jwt", "at+jwt", "application/at+jwt"]
                .contains(&typ.to_ascii_lowercase().as_str())
            {
                return Err(TokenError::BadTyp(typ.chars().take(32).collect()));
            }
            Some(typ.to_ascii_lowercase())
        }
        Some(_) => return Err(TokenError::BadHeader),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(TokenError::BadHeader),
    };
    let payload = b64_json(p)
        .filter(Value::is_object)
        .ok_or(TokenError::BadPayload)?;
    let iss = match payload.get("iss") {
        None => return Err(TokenError::NoIssuer),
        Some(Value::String(i)) => i.clone(),
        Some(_) => return Err(TokenError::BadClaim("iss")),
    };
    Ok(Unverified {
        alg: alg.to_string(),
        kid,
        typ,
        iss,
        cnf: payload.get("cnf").cloned(),
        exp: payload.get("exp").and_then(Value::as_f64).map(|e| e as i64),
        aud: payload.get("aud").cloned(),
    })
}

/// Refuses an `aud` claim (a string or an array of strings) that names
/// none of `issuer`'s audiences.
pub fn audience_fits(aud: &Value, issuer: &Issuer) -> Result<(), TokenError> {
    let auds: Vec<&str> = match aud {
        Value::String(a) => vec![a.as_str()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().ok_or(TokenError::BadClaim("aud")))
            .collect::<Result<_, _>>()?,
        _ => return Err(TokenError::BadClaim("aud")),
    };
    if !auds.iter().any(|a| issuer.audiences.iter().any(|x| x == a)) {
        return Err(TokenError::WrongAudience(issuer.name.clone()));
    }
    Ok(())
}

/// The allow-listed asymmetric algorithm of that name.
pub(crate) fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
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

/// One verification key from a JWKS.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    /// Algorithms this key may verify (its family, narrowed by the JWK `alg`).
    pub algorithms: Vec<Algorithm>,
    key: DecodingKey,
    /// The public key as published (its type, curve and components) and
    /// the algorithms it verifies: two keys are the same key when these
    /// are equal (a key replaced under its `kid` is not).
    identity: String,
}

impl VerifyKey {
    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// The usable keys of one issuer.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Builds a key set from a JWKS document. Symmetric (`oct`) keys, keys
    /// carrying private members, keys not for signatures and unsupported
    /// curves are skipped; each skip is returned as a message.
    pub fn from_jwks(doc: &Value) -> Result<(KeySet, Vec<String>), String> {
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| "JWKS has no 'keys' array".to_string())?;
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match verify_key(k) {
                Ok(mut key) => {
                    key.identity = key_identity(k, &key.algorithms);
                    set.keys.push(key)
                }
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        Ok((set, skipped))
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Whether the keys published here under `kid` are exactly those
    /// `earlier` published under it. A key added under another kid changes
    /// nothing; a key replaced, withdrawn or added under this kid does, so
    /// the cached token is verified again and gets the answer a fresh one
    /// would (a second key of its algorithm under the kid is ambiguous).
    pub fn still_holds(&self, earlier: &KeySet, kid: &str) -> bool {
        // (Asked on cache hits after each refresh: no allocation.)
        fn under<'a>(set: &'a KeySet, kid: &'a str) -> impl Iterator<Item = &'a str> {
            set.keys
                .iter()
                .filter(move |k| k.kid.as_deref() == Some(kid))
                .map(|k| k.identity.as_str())
        }
        let then = under(earlier, kid).count();
        then > 0
            && under(self, kid).count() == then
            && under(earlier, kid).all(|was| under(self, kid).any(|now| now == was))
            && under(self, kid).all(|now| under(earlier, kid).any(|was| was == now))
    }
}

/// A verification key from one JWK (also a DPoP proof's embedded key).
pub(crate) fn verify_key(k: &Value) -> Result<VerifyKey, String> {
    let s = |name: &str| k.get(name).and_then(Value::as_str);
    let kty = s("kty").ok_or("no kty")?;
    for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
        if k.get(private).is_some() {
            return Err(format!("carries private or secret member '{private}'"));
        }
    }
    if let Some(u) = k.get("use") {
        if u.as_str() != Some("sig") {
            return Err("use is not 'sig'".into());
        }
    }
    if let Some(ops) = k.get("key_ops") {
        let verify = ops
            .as_array()
            .is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
        if !verify {
            return Err("key_ops does not include 'verify'".into());
        }
    }
    let (family, key): (Vec<Algorithm>, DecodingKey) = match kty {
        "RSA" => {
            let (n, e) = (
                s("n").ok_or("RSA key without n")?,
                s("e").ok_or("RSA key without e")?,
            );
            // What the verifier takes (aws-lc's RSA_PKCS1_2048_8192 and
            // PSS alike): any other size would load, then fail every
            // token as a bad signature.
            let n_bytes = URL_SAFE_NO_PAD
                .decode(n)
                .map_err(|_| "RSA key whose n is not base64url")?;
            let bits = n_bytes.iter().position(|b| *b != 0).map_or(0, |i| {
                (n_bytes.len() - i) * 8 - n_bytes[i].leading_zeros() as usize
            });
            if !(2048..=8192).contains(&bits) {
                return Err(format!(
                    "RSA modulus of {bits} bits: only 2048 to 8192 bits are verified"
                ));
            }
            let key =
                DecodingKey::from_rsa_components(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
            use Algorithm::*;
            (vec![RS256, RS384, RS512, PS256, PS384, PS512], key)
        }
        "EC" => {
            let (alg, size) = match s("crv") {
                Some("P-256") => (Algorithm::ES256, 32),
                Some("P-384") => (Algorithm::ES384, 48),
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let (x, y) = (
                s("x").ok_or("EC key without x")?,
                s("y").ok_or("EC key without y")?,
            );
            // RFC 7518 §6.2.1.2: each coordinate the curve's full size.
            for (name, c) in [("x", x), ("y", y)] {
                let len = URL_SAFE_NO_PAD.decode(c).map_or(0, |c| c.len());
                if len != size {
                    return Err(format!(
                        "EC key whose {name} is not {size} bytes, as {} needs",
                        s("crv").unwrap_or_default()
                    ));
                }
            }
            let key =
                DecodingKey::from_ec_components(x, y).map_err(|e| format!("bad EC key: {e}"))?;
            (vec![alg], key)
        }
        "OKP" => {
            if s("crv") != Some("Ed25519") {
                return Err(format!("unsupported OKP curve {:?}", s("crv")));
            }
            let key = DecodingKey::from_ed_components(s("x").ok_or("OKP key without x")?)
                .map_err(|e| format!("bad Ed25519 key: {e}"))?;
            (vec![Algorithm::EdDSA], key)
        }
        "oct" => return Err("symmetric key (kty oct) is never used".into()),
        other => return Err(format!("unsupported kty '{other}'")),
    };
    // A JWK's `alg` is a string (RFC 7517 §4.4): another shape (but
    // `null`, as a serialiser may write an absent member) is no absent
    // `alg` (which leaves the key every algorithm of its family).
    if k.get("alg").is_some_and(|a| !a.is_string() && !a.is_null()) {
        return Err("alg is not a string".into());
    }
    let algorithms = match s("alg") {
        None => family,
        Some(a) => match algorithm(a) {
            Some(alg) if family.contains(&alg) => vec![alg],
            _ => {
                return Err(format!(
                    "alg '{a}' does not fit kty {kty} or is not allowed"
                ))
            }
        },
    };
    Ok(VerifyKey {
        kid: s("kid").map(str::to_string),
        algorithms,
        key,
        // Set for a JWKS's keys only (a DPoP proof's key is compared by
        // its thumbprint).
        identity: String::new(),
    })
}

/// A JWKS key's identity: its type, curve, public components and the
/// algorithms it verifies.
fn key_identity(k: &Value, algorithms: &[Algorithm]) -> String {
    let s = |name: &str| k.get(name).and_then(Value::as_str).unwrap_or("");
    format!(
        "{} {} {} {} {} {} {algorithms:?}",
        s("kty"),
        s("crv"),
        s("n"),
        s("e"),
        s("x"),
        s("y")
    )
}

/// A verified access token's claims, in the shape every later stage uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Configured issuer name.
    pub issuer_name: String,
    pub iss: String,
    pub sub: Option<String>,
    pub client_id: Option<String>,
    pub fhir_user: Option<String>,
    pub patient: Option<String>,
    pub scopes: ScopeSet,
    pub exp: i64,
    pub jti: Option<String>,
    /// The confirmation claim (`cnf`) when the token is sender-constrained.
    pub cnf: Option<Value>,
    /// Every claim as the token (or introspection answer) carried it, for
    /// policies that match on claims (roles, `amr`, …).
    pub raw: Value,
}

/// Why [`read_capped`] stopped.
pub(crate) enum ReadError {
    /// The body is longer than allowed.
    TooLarge,
    /// The connection failed while it was read.
    Http(reqwest::Error),
}

/// A response body read piece by piece, refused once longer than `max`
/// bytes (a body without a declared length is not held whole first).
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(ReadError::Http)? {
        if body.len() + piece.len() > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&piece);
    }
    Ok(body)
}

/// The first member of a `cnf` claim naming a confirmation method fhirwall
/// does not enforce (only `jkt`, DPoP, and `x5t#S256`, mTLS, are): such a
/// token is refused, since that binding would silently be dropped.
pub fn unenforced_cnf_member(cnf: Option<&Value>) -> Option<&str> {
    cnf.and_then(Value::as_object)
        .and_then(|c| c.keys().find(|k| !matches!(k.as_str(), "jkt" | "x5t#S256")))
        .map(String::as_str)
}

/// Why sender-constrained tokens are required of `claims`' caller (its
/// issuer's `require_binding`, or its client named in
/// `require_binding_for_clients`), if they are.
pub fn binding_required(issuers: &[crate::config::Issuer], claims: &Claims) -> Option<String> {
    let issuer = issuers.iter().find(|i| i.name == claims.issuer_name)?;
    if issuer.require_binding {
        return Some(format!("issuer '{}'", issuer.name));
    }
    let client = claims.client_id.as_deref()?;
    issuer
        .require_binding_for_clients
        .iter()
        .any(|c| c == client)
        .then(|| format!("client '{client}' of issuer '{}'", issuer.name))
}

/// `jwt` for a token of three dot-separated parts whose first is a JSON
/// object (a JOSE header, well-formed or not), else `opaque` (for
/// introspection).
pub fn token_kind(token: &str) -> &'static str {
    let mut parts = token.split('.');
    let header = parts.next().filter(|_| parts.count() == 2);
    if header.and_then(b64_json).is_some_and(|h| h.is_object()) {
        "jwt"
    } else {
        "opaque"
    }
}

/// A token that is not three dot-separated parts is opaque to fhirwall
/// and introspected, unless it is a JWS spelt with a dot more or less
/// (`h.p.s.`, `.h.p.s`, `h.p`): some authorization servers read those
/// leniently (a split that drops empty parts) and would answer for the
/// JWT inside, which then skipped every check fhirwall holds an
/// introspected JWT to (its own `aud`, `exp`, `typ`, binding). Refused:
/// a first part that is a JOSE header, unless it is a JWE's (`enc`, five
/// parts, what an issuer encrypting its tokens sends), and any empty part.
pub fn not_a_misspelt_jws(token: &str) -> Result<(), TokenError> {
    let mut parts = token.split('.');
    let first = parts.next().unwrap_or_default();
    let rest = parts.clone().count();
    if rest == 0 {
        return Ok(());
    }
    if let Some(header) = b64_json(first).filter(Value::is_object) {
        return match header.get("enc") {
            Some(_) if rest == 4 && !first.is_empty() => Ok(()),
            _ => Err(TokenError::NotJwt),
        };
    }
    if first.is_empty() || parts.any(str::is_empty) {
        return Err(TokenError::NotJwt);
    }
    Ok(())
}

/// Hex SHA-256 of a token: the only form of a token that is ever stored or audited.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether an [`inspect`]ed token's header fits `issuer` (an algorithm it
/// allows, `typ` `at+jwt` where required): its algorithm.
pub fn header_fits(u: &Unverified, issuer: &Issuer) -> Result<Algorithm, TokenError> {
    let alg = algorithm(&u.alg)
        .filter(|a| issuer.algorithms.contains(a))
        .ok_or_else(|| TokenError::AlgorithmNotAllowed(u.alg.clone()))?;
    typ_fits(u, issuer)?;
    Ok(alg)
}

/// The header's `typ`, when the issuer requires RFC 9068's `at+jwt`
/// (also of the JWTs it introspects; its `algorithms` are those fhirwall
/// verifies with its keys, which an introspected token is not).
pub fn typ_fits(u: &Unverified, issuer: &Issuer) -> Result<(), TokenError> {
    if issuer.require_at_jwt_typ
        && !matches!(u.typ.as_deref(), Some("at+jwt" | "application/at+jwt"))
    {
        return Err(TokenError::BadTyp(
            u.typ.clone().unwrap_or_else(|| "(none)".into()),
        ));
    }
    Ok(())
}

/// The header check a token of `issuer` meets before anything else: its
/// `typ` alone for an issuer that introspects (its `algorithms` are those
/// fhirwall verifies with its keys, which an introspected token is not),
/// [`header_fits`] otherwise. The gateway and `fhirwall explain` both use it.
pub fn header_precheck(u: &Unverified, issuer: &Issuer) -> Result<(), TokenError> {
    match issuer.introspection {
        Some(_) => typ_fits(u, issuer),
        None => header_fits(u, issuer).map(|_| ()),
    }
}

/// The most keys a token without a `kid` is tried against.
pub const MAX_KEYS_WITHOUT_KID: usize = 3;

/// Verifies `token` (already [`inspect`]ed) for `issuer` with `keys` at time `now` (Unix seconds).
pub fn verify(
    token: &str,
    u: &Unverified,
    issuer: &Issuer,
    keys: &KeySet,
    now: i64,
) -> Result<Claims, TokenError> {
    let alg = header_fits(u, issuer)?;
    let candidates: Vec<&VerifyKey> = match &u.kid {
        Some(kid) => {
            // RFC 7517 §4.5 lets keys of different types share a kid: the
            // one for the token's algorithm is taken (two would be
            // ambiguous).
            let named: Vec<&VerifyKey> = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if named.is_empty() {
                return Err(TokenError::UnknownKid(kid.chars().take(64).collect()));
            }
            let fitting: Vec<&VerifyKey> = named
                .into_iter()
                .filter(|k| k.algorithms.contains(&alg))
                .collect();
            match fitting.as_slice() {
                [one] => vec![*one],
                [] => {
                    return Err(TokenError::KeyAlgorithmMismatch {
                        kid: kid.chars().take(64).collect(),
                        alg: u.alg.clone(),
                    })
                }
                more => return Err(TokenError::AmbiguousKey(more.len())),
            }
        }
        // No kid: each key of the token's algorithm is tried (during a
        // rotation an issuer publishes the old and the new one), but only
        // a few, so that a forged token cannot cost a verification per key
        // of a large set.
        None => {
            let fitting: Vec<&VerifyKey> = keys
                .keys
                .iter()
                .filter(|k| k.algorithms.contains(&alg))
                .collect();
            if fitting.is_empty() || fitting.len() > MAX_KEYS_WITHOUT_KID {
                return Err(TokenError::AmbiguousKey(fitting.len()));
            }
            fitting
        }
    };
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut outcome = Err(TokenError::BadSignature);
    for key in candidates {
        outcome = jsonwebtoken::decode::<Value>(token, &key.key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
            jsonwebtoken::errors::ErrorKind::Json(_) | jsonwebtoken::errors::ErrorKind::Utf8(_) => {
                TokenError::BadPayload
            }
            _ => TokenError::BadSignature,
        });
        if !matches!(outcome, Err(TokenError::BadSignature)) {
            break;
        }
    }
    check_claims(&outcome?.claims, issuer, now)
}

/// Refuses a token that says it is not an access token: an ID, refresh or
/// logout token its issuer signs (or its server calls active) too.
/// Keycloak's `typ` is `Bearer` or `DPoP` for access tokens and `ID`,
/// `Refresh`, `Offline`, `Logout`, … for the others; Cognito's `token_use`
/// is `access` or `id`, Hydra's `access_token` or `refresh_token`; an
/// introspection answer's `token_type` may be an RFC 8693 URN.
fn access_token_only(c: &Value) -> Result<(), TokenError> {
    const NOT_ACCESS: [&str; 6] = [
        "refresh",
        "offline",
        "id",
        "id_token",
        "logout",
        "serialized-id",
    ];
    let refuses =
        |name: &'static str, says: &dyn Fn(&str) -> bool| match c.get(name).and_then(Value::as_str)
        {
            Some(v) if says(&v.to_ascii_lowercase()) => Err(TokenError::NotAccessToken(
                name,
                v.chars().take(64).collect(),
            )),
            _ => Ok(()),
        };
    // Claims only an OpenID Connect ID token carries (the hashes of the
    // access token, code and state issued beside it): an ID token whose
    // `aud` is an accepted audience (an app that is its own API) is no
    // access token, whatever its `typ` says.
    for name in ["at_hash", "c_hash", "s_hash"] {
        if c.get(name).is_some() {
            return Err(TokenError::NotAccessToken(
                name,
                "present: an ID token's claim".into(),
            ));
        }
    }
    refuses("token_use", &|t| !matches!(t, "access" | "access_token"))?;
    refuses("typ", &|t| NOT_ACCESS.contains(&t))?;
    refuses("token_type", &|t| {
        let kind = t
            .strip_prefix("urn:ietf:params:oauth:token-type:")
            .unwrap_or(t);
        kind.contains("refresh") || kind == "id_token"
    })
}

/// A claim of a verified token as the value of a header to the upstream
/// (`forward_headers: {claim:<name>: Header}`): a string as it is, a
/// number or boolean as its JSON text, an array of those joined by `,`
/// (HAPI's partition header takes a list so). No claim (or `null`): no
/// header. Any other shape, an empty array, or a control character is
/// refused — it would reach the upstream as no header at all, which it may
/// read as "no restriction".
pub fn claim_header_value(claims: &Value, name: &str) -> Result<Option<String>, TokenError> {
    let refused = || TokenError::UnforwardableClaim(name.chars().take(64).collect());
    let scalar = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) if !s.chars().any(char::is_control) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|parts| Some(parts.join(",")))
            .ok_or_else(refused),
        Some(v) => scalar(v).map(Some).ok_or_else(refused),
    }
}

/// Whether every claim `forward_headers` forwards can be a header value
/// ([`claim_header_value`]).
pub fn forwarded_claims_fit(
    claims: &Value,
    forwarded: &[(crate::config::ForwardedContext, http::HeaderName)],
) -> Result<(), TokenError> {
    for (what, _) in forwarded {
        if let crate::config::ForwardedContext::Claim(name) = what {
            claim_header_value(claims, name)?;
        }
    }
    Ok(())
}

/// Checks the claims of a token whose signature is valid.
pub fn check_claims(c: &Value, issuer: &Issuer, now: i64) -> Result<Claims, TokenError> {
    let leeway = issuer.leeway_seconds;
    let lw = leeway as i64;
    // Claims become audit fields and, configured so, headers to the
    // upstream (`forward_headers`): one that could not be a header value
    // would reach the upstream as no header at all, which it may read as
    // "no restriction". No identity or scope has a control character.
    let text = |name: &'static str, s: &str| -> Result<(), TokenError> {
        if s.chars().any(char::is_control) {
            return Err(TokenError::ControlCharacter(name));
        }
        Ok(())
    };
    let str_claim = |name: &'static str| -> Result<Option<String>, TokenError> {
        match c.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => text(name, s).map(|()| Some(s.clone())),
            Some(_) => Err(TokenError::BadClaim(name)),
        }
    };
    let time_claim = |name: &'static str| -> Result<Option<i64>, TokenError> {
        match c.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => numeric_date(n).map(Some).ok_or(TokenError::BadClaim(name)),
            Some(_) => Err(TokenError::BadClaim(name)),
        }
    };
    let iss = str_claim("iss")?.ok_or(TokenError::NoIssuer)?;
    if iss != issuer.issuer {
        return Err(TokenError::UnknownIssuer(iss));
    }
    access_token_only(c)?;
    let exp = time_claim("exp")?.ok_or(TokenError::MissingClaim("exp"))?;
    if exp.saturating_add(lw) <= now {
        return Err(TokenError::Expired { exp, now, leeway });
    }
    if let Some(nbf) = time_claim("nbf")? {
        if nbf > now.saturating_add(lw) {
            return Err(TokenError::NotYetValid { nbf, now, leeway });
        }
    }
    if let Some(iat) = time_claim("iat")? {
        if iat > now.saturating_add(lw) {
            return Err(TokenError::IssuedInFuture { iat, now, leeway });
        }
    }
    audience_fits(c.get("aud").ok_or(TokenError::MissingClaim("aud"))?, issuer)?;
    // A list of scopes is read as the space-separated string RFC 9068
    // asks for: Duende/IdentityServer, Spring Authorization Server and
    // UAA write `scope` as an array, Azure and Okta `scp`. Each item one
    // scope (an item holding a space would read as two).
    let words = |a: &[Value], name: &'static str| -> Result<String, TokenError> {
        a.iter()
            .map(|v| {
                v.as_str()
                    .filter(|w| !w.is_empty() && !w.contains(char::is_whitespace))
                    .ok_or(TokenError::BadClaim(name))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|w| w.join(" "))
    };
    let scope = match (c.get("scope"), c.get("scp")) {
        (Some(Value::String(s)), _) => s.clone(),
        (Some(Value::Array(a)), _) => words(a, "scope")?,
        (Some(_), _) => return Err(TokenError::BadClaim("scope")),
        (None, Some(Value::Array(a))) => words(a, "scp")?,
        (None, Some(Value::String(s))) => s.clone(),
        (None, Some(_)) => return Err(TokenError::BadClaim("scp")),
        (None, None) => String::new(),
    };
    text("scope", &scope)?;
    // RFC 9068's `client_id`; else OIDC's `azp`; else Okta's `cid` (its
    // access tokens carry neither of the others): without it a policy rule
    // on `client_id` could never match an Okta token, and its limits would
    // fall back to the caller's address.
    let client_id = match str_claim("client_id")? {
        Some(c) => Some(c),
        None => match str_claim("azp")? {
            Some(c) => Some(c),
            None => str_claim("cid")?,
        },
    };
    let cnf = match c.get("cnf") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err(TokenError::BadClaim("cnf")),
    };
    Ok(Claims {
        issuer_name: issuer.name.clone(),
        iss,
        sub: str_claim("sub")?,
        client_id,
        fhir_user: str_claim("fhirUser")?,
        // The patient context becomes search parameters and compartment
        // references: only an id can be one (a comma would be an OR, an
        // `&` another parameter).
        patient: match str_claim("patient")? {
            Some(p) if !crate::fhir::classify::is_valid_id(&p) => {
                return Err(TokenError::NotAnId("patient"))
            }
            p => p,
        },
        scopes: ScopeSet::parse(&scope),
        exp,
        jti: str_claim("jti")?,
        cnf,
        raw: c.clone(),
    })
}

/// A JWT NumericDate (RFC 7519 §2) in whole seconds: a fraction (as
/// `time.time()` or `Date.now() / 1000` write it) is rounded down.
pub fn numeric_date(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.floor() as i64)
    })
}

#[cfg(test)]
mod tests;
