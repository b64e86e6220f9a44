//! Stage 4, bind — DPoP proofs (RFC 9449), resource-server side. Pure:
//! the proof, the request as the client sent it, the access token, the
//! token's `cnf.jkt` and `now` in; the proof's `jti` (for the caller's
//! replay cache) or a [`DpopError`] out.
//!
//! Checks, in order: JWS shape; header `typ` = `dpop+jwt` (a media type), an allowed
//! asymmetric `alg`, a public `jwk` (private members refused) that fits
//! the `alg` and verifies the signature; claims `htm` = method, `htu` = the
//! request's public URL without query and fragment (RFC 3986 normalised),
//! `iat` within the window, a `jti`, `ath` = base64url(SHA-256(token)),
//! and the key's RFC 7638 thumbprint = `cnf.jkt`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::token::{algorithm, verify_key};

/// Why a DPoP proof is refused. Every variant answers 401 with
/// `WWW-Authenticate: DPoP error="invalid_dpop_proof"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    #[error("DPoP proof is not a compact JWS")]
    Malformed,
    #[error("DPoP proof is larger than {MAX_PROOF_BYTES} bytes")]
    TooLarge,
    #[error("DPoP proof header typ must be 'dpop+jwt'")]
    BadType,
    #[error("DPoP proof algorithm '{0}' is not allowed")]
    AlgNotAllowed(String),
    #[error("DPoP proof jwk is not a usable public key: {0}")]
    BadJwk(String),
    #[error("DPoP proof signature does not verify with its jwk")]
    BadSignature,
    #[error("DPoP proof claim {0} is missing or malformed")]
    BadClaim(&'static str),
    #[error("DPoP proof htm '{0}' does not match the request method")]
    WrongMethod(String),
    #[error("DPoP proof htu does not match the request URL")]
    WrongUrl,
    #[error("DPoP proof iat is too old")]
    Stale,
    #[error("DPoP proof iat is in the future")]
    Future,
    #[error("DPoP proof ath does not match the access token")]
    WrongAth,
    #[error("DPoP proof key does not match the token's cnf.jkt")]
    WrongKey,
    #[error("DPoP proof jti was already used")]
    Replayed,
    #[error("DPoP proof must carry the nonce this server issued")]
    NonceRequired,
}

impl DpopError {
    /// Reason code for the audit record and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            DpopError::Malformed => "dpop_malformed",
            DpopError::TooLarge => "dpop_too_large",
            DpopError::BadType => "dpop_bad_typ",
            DpopError::AlgNotAllowed(_) => "dpop_alg_not_allowed",
            DpopError::BadJwk(_) => "dpop_bad_jwk",
            DpopError::BadSignature => "dpop_bad_signature",
            DpopError::BadClaim(_) => "dpop_bad_claim",
            DpopError::WrongMethod(_) => "dpop_wrong_htm",
            DpopError::WrongUrl => "dpop_wrong_htu",
            DpopError::Stale => "dpop_stale",
            DpopError::Future => "dpop_future",
            DpopError::WrongAth => "dpop_wrong_ath",
            DpopError::WrongKey => "dpop_wrong_key",
            DpopError::Replayed => "dpop_replayed",
            DpopError::NonceRequired => "dpop_nonce_required",
        }
    }
}

/// Policy for proofs.
#[derive(Debug, Clone)]
pub struct DpopPolicy {
    /// Algorithms a proof may use (asymmetric only).
    pub algorithms: Vec<Algorithm>,
    /// How old a proof's `iat` may be, in seconds.
    pub max_age_seconds: i64,
    /// How far in the future a proof's `iat` may be (clock skew), in seconds.
    pub leeway_seconds: i64,
}

/// The request a proof must match.
#[derive(Debug, Clone, Copy)]
pub struct ProofContext<'a> {
    pub method: &'a str,
    /// The request's URL as the client sees it (public base origin + path);
    /// a query or fragment is ignored.
    pub url: &'a str,
    pub access_token: &'a str,
    /// The token's `cnf.jkt`.
    pub jkt: &'a str,
    /// Nonces the server currently accepts; when not empty the proof must
    /// carry one of them.
    pub nonces: &'a [String],
    pub now: i64,
}

/// Server-issued DPoP nonces (RFC 9449 §8): a nonce names a time bucket
/// and carries an HMAC of it under a key made at start-up (or configured,
/// shared by replicas), so any worker can check it without shared state.
/// The current and the previous bucket's nonces are accepted.
pub struct Nonces {
    key: aws_lc_rs::hmac::Key,
    lifetime: i64,
}

impl Nonces {
    /// A source with a fresh random key; nonces live `lifetime_seconds`
    /// (to twice that, across a bucket change).
    pub fn new(lifetime_seconds: u64) -> Nonces {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key =
            aws_lc_rs::hmac::Key::generate(aws_lc_rs::hmac::HMAC_SHA256, &rng).expect("system RNG");
        Nonces {
            key,
            lifetime: lifetime_seconds.max(1) as i64,
        }
    }

    /// A source with the key `secret` (shared by replicas: each accepts
    /// the others' nonces).
    pub fn with_key(secret: &[u8], lifetime_seconds: u64) -> Nonces {
        Nonces {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            lifetime: lifetime_seconds.max(1) as i64,
        }
    }

    fn for_bucket(&self, bucket: i64) -> String {
        let b = bucket.to_be_bytes();
        let tag = aws_lc_rs::hmac::sign(&self.key, &b);
        let mut raw = b.to_vec();
        raw.extend_from_slice(&tag.as_ref()[..16]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The nonce to hand out at `now`.
    pub fn current(&self, now: i64) -> String {
        self.for_bucket(now.div_euclid(self.lifetime))
    }

    /// The nonces accepted at `now`.
    pub fn accepted(&self, now: i64) -> Vec<String> {
        let b = now.div_euclid(self.lifetime);
        vec![self.for_bucket(b), self.for_bucket(b - 1)]
    }
}

/// A proof that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub jti: String,
    pub iat: i64,
}

fn b64_json(part: &str) -> Option<Value> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// base64url(SHA-256(bytes)), as `ath` and thumbprints are written.
pub fn sha256_b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(bytes))
}

/// The RFC 7638 JWK thumbprint: the required members of the key type in
/// lexicographic order, no white space, SHA-256, base64url.
pub fn thumbprint(jwk: &Value) -> Result<String, String> {
    let members: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("RSA") => &["e", "kty", "n"],
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("OKP") => &["crv", "kty", "x"],
        other => return Err(format!("no thumbprint for kty {other:?}")),
    };
    let mut canonical = serde_json::Map::new();
    for m in members {
        let v = jwk
            .get(*m)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("jwk has no '{m}'"))?;
        canonical.insert((*m).to_string(), Value::String(v.to_string()));
    }
    // serde_json's map keeps keys sorted (no `preserve_order` feature), and
    // `to_string` writes no white space.
    Ok(sha256_b64(Value::Object(canonical).to_string().as_bytes()))
}

/// `url` per RFC 9449 §4.3: scheme and host lowercased, default port
/// dropped, dot segments resolved, percent-encodings normalised (RFC 3986
/// §6.2.2: hex digits in upper case, unreserved characters decoded, so
/// `%7ep1` is `~p1`), query and fragment removed.
pub fn normalise_htu(url: &str) -> Option<String> {
    let mut u = url::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return None;
    }
    u.set_query(None);
    u.set_fragment(None);
    let path = normal_percent_encoding(u.path());
    u.set_path(&path);
    Some(u.to_string())
}

/// `path` with every percent-encoding in upper case, and those of
/// unreserved characters (letters, digits, `-._~`) decoded.
fn normal_percent_encoding(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if let (b'%', Some(&h), Some(&l)) = (b[i], b.get(i + 1), b.get(i + 2)) {
            if let (Some(h), Some(l)) = (hex(h), hex(l)) {
                let byte = (h * 16 + l) as u8;
                if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                    out.push(byte as char);
                } else {
                    out.push_str(&format!("%{byte:02X}"));
                }
                i += 3;
                continue;
            }
        }
        // Whole characters, as the path holds them.
        let c = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// The largest proof read. A proof is a header with a public key (an
/// RSA-8192 `jwk` is about 1.5 KB) and a handful of claims: anything much
/// larger is padding, which would be decoded, parsed and hashed for
/// nothing (Pingora lets a header reach 1 MiB).
pub const MAX_PROOF_BYTES: usize = 8 * 1024;

/// Checks a DPoP proof against the request, the token and its `cnf.jkt`.
pub fn check_proof(
    proof: &str,
    ctx: &ProofContext,
    policy: &DpopPolicy,
) -> Result<Proof, DpopError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(DpopError::TooLarge);
    }
    let mut parts = proof.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(DpopError::Malformed);
    };
    let header = b64_json(h)
        .filter(Value::is_object)
        .ok_or(DpopError::Malformed)?;
    let claims = b64_json(c)
        .filter(Value::is_object)
        .ok_or(DpopError::Malformed)?;
    // A media type: its case does not count, nor an `application/` prefix
    // (RFC 7515 §4.1.9), as for the access token's (`token::inspect`).
    let typ = header.get("typ").and_then(Value::as_str).unwrap_or("");
    if !matches!(
        typ.to_ascii_lowercase().as_str(),
        "dpop+jwt" | "application/dpop+jwt"
    ) {
        return Err(DpopError::BadType);
    }
    let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let alg = algorithm(alg_name)
        .filter(|a| policy.algorithms.contains(a))
        .ok_or_else(|| DpopError::AlgNotAllowed(alg_name.chars().take(16).collect()))?;
    if header.get("crit").is_some() {
        return Err(DpopError::Malformed);
    }
    let jwk = header
        .get("jwk")
        .filter(|j| j.is_object())
        .ok_or_else(|| DpopError::BadJwk("no jwk in the header".into()))?;
    // verify_key refuses private members (d, p, q, …) and symmetric keys.
    let key = verify_key(jwk).map_err(DpopError::BadJwk)?;
    if !key.algorithms.contains(&alg) {
        return Err(DpopError::BadJwk(format!(
            "key does not fit alg {alg_name}"
        )));
    }
    let message = &proof[..h.len() + 1 + c.len()];
    match jsonwebtoken::crypto::verify(sig, message.as_bytes(), key.decoding_key(), alg) {
        Ok(true) => {}
        _ => return Err(DpopError::BadSignature),
    }

    let s = |name: &'static str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or(DpopError::BadClaim(name))
    };
    let jti = s("jti")?;
    if jti.len() > 256 {
        return Err(DpopError::BadClaim("jti"));
    }
    let htm = s("htm")?;
    if htm != ctx.method {
        return Err(DpopError::WrongMethod(htm.chars().take(16).collect()));
    }
    let htu = s("htu")?;
    match (normalise_htu(htu), normalise_htu(ctx.url)) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(DpopError::WrongUrl),
    }
    let iat = match claims.get("iat") {
        Some(Value::Number(n)) => crate::token::numeric_date(n),
        _ => None,
    }
    .ok_or(DpopError::BadClaim("iat"))?;
    if iat > ctx.now + policy.leeway_seconds {
        return Err(DpopError::Future);
    }
    if iat < ctx.now - policy.max_age_seconds {
        return Err(DpopError::Stale);
    }
    if s("ath")? != sha256_b64(ctx.access_token.as_bytes()) {
        return Err(DpopError::WrongAth);
    }
    if !ctx.nonces.is_empty() {
        let n = claims.get("nonce").and_then(Value::as_str);
        if !n.is_some_and(|n| ctx.nonces.iter().any(|x| x == n)) {
            return Err(DpopError::NonceRequired);
        }
    }
    let tp = thumbprint(jwk).map_err(DpopError::BadJwk)?;
    if tp != ctx.jkt {
        return Err(DpopError::WrongKey);
    }
    Ok(Proof {
        jti: jti.to_string(),
        iat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::keys::{hs256_token, raw_token, KeyKind, SigningKey};
    use serde_json::json;

    const URL: &str = "https://fhir.example.org/fhir/Patient/p1";
    const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    const NOW: i64 = 1_800_000_000;

    fn policy() -> DpopPolicy {
        use Algorithm::*;
        DpopPolicy {
            algorithms: vec![RS256, PS256, ES256, ES384, EdDSA],
            max_age_seconds: 60,
            leeway_seconds: 5,
        }
    }

    fn public_jwk(key: &SigningKey) -> Value {
        let mut jwk = key.jwk().clone();
        let o = jwk.as_object_mut().unwrap();
        o.remove("kid");
        o.remove("use");
        o.remove("alg");
        jwk
    }

    fn alg_name(key: &SigningKey) -> &'static str {
        match key.alg {
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
            _ => unreachable!(),
        }
    }

    fn claims() -> Value {
        json!({"jti": "j-1", "htm": "GET", "htu": URL, "iat": NOW,
               "ath": sha256_b64(TOKEN.as_bytes())})
    }

    fn proof(key: &SigningKey, header: Value, claims: Value) -> String {
        key.sign_json(&header, &claims)
    }

    fn header(key: &SigningKey) -> Value {
        json!({"typ": "dpop+jwt", "alg": alg_name(key), "jwk": public_jwk(key)})
    }

    fn ctx<'a>(jkt: &'a str) -> ProofContext<'a> {
        ProofContext {
            method: "GET",
            url: URL,
            access_token: TOKEN,
            jkt,
            nonces: &[],
            now: NOW,
        }
    }

    #[test]
    fn valid_proofs_of_every_key_kind() {
        for kind in [
            KeyKind::P256,
            KeyKind::P384,
            KeyKind::Rsa2048,
            KeyKind::Ed25519,
        ] {
            let key = SigningKey::generate(kind, "k");
            let jkt = thumbprint(&public_jwk(&key)).unwrap();
            let p = proof(&key, header(&key), claims());
            assert_eq!(
                check_proof(&p, &ctx(&jkt), &policy()),
                Ok(Proof {
                    jti: "j-1".into(),
                    iat: NOW
                }),
                "{kind:?}"
            );
        }
    }

    /// `typ` is a media type: any case, with or without `application/`;
    /// anything else is refused.
    #[test]
    fn typ_is_read_as_a_media_type() {
        let key = SigningKey::generate(KeyKind::P256, "k");
        let jkt = thumbprint(&public_jwk(&key)).unwrap();
        for (typ, ok) in [
            ("DPoP+JWT", true),
            ("application/dpop+jwt", true),
            ("Application/DPoP+jwt", true),
            ("application/jwt", false),
            ("dpop+jwt ", false),
            ("xapplication/dpop+jwt", false),
            ("applicatiön/dpop+jwt", false),
        ] {
            let mut h = header(&key);
            h["typ"] = json!(typ);
            let got = check_proof(&proof(&key, h, claims()), &ctx(&jkt), &policy());
            if ok {
                assert!(got.is_ok(), "{typ}: {got:?}");
            } else {
                assert_eq!(got, Err(DpopError::BadType), "{typ}");
            }
        }
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn nonces_rotate_and_cannot_be_forged() {
        // Two replicas sharing a key accept each other's nonces.
        let shared = [7u8; 32];
        let (a, b) = (Nonces::with_key(&shared, 60), Nonces::with_key(&shared, 60));
        assert!(b.accepted(1_000).contains(&a.current(1_000)));
        assert!(!Nonces::with_key(&[8u8; 32], 60)
            .accepted(1_000)
            .contains(&a.current(1_000)));
        let n = Nonces::new(60);
        let other = Nonces::new(60);
        let now = 1_000_020;
        let cur = n.current(now);
        assert!(n.accepted(now).contains(&cur));
        assert!(
            n.accepted(now + 60).contains(&cur),
            "the previous bucket's still counts"
        );
        assert!(!n.accepted(now + 120).contains(&cur), "expired");
        assert!(
            !n.accepted(now).contains(&other.current(now)),
            "another key's"
        );
    }

    #[test]
    fn htu_normalisation() {
        for (a, b, same) in [
            (URL, "https://FHIR.example.org:443/fhir/Patient/p1", true),
            (URL, "https://fhir.example.org/fhir/Patient/p1?x=1#f", true),
            (URL, "https://fhir.example.org/fhir/./Patient/p1", true),
            (URL, "http://fhir.example.org/fhir/Patient/p1", false),
            (URL, "https://fhir.example.org:8443/fhir/Patient/p1", false),
            (URL, "https://fhir.example.org/fhir/Patient/p1/", false),
            (URL, "https://fhir.example.org/fhir/Patient/p2", false),
            (URL, "https://other.example.org/fhir/Patient/p1", false),
            (URL, "https://fhir.example.org/fhir/Patient/%70%31", true),
            (URL, "https://fhir.example.org/fhir/%50atient/p1", true),
            (
                "https://fhir.example.org/fhir/Patient/~p1",
                "https://fhir.example.org/fhir/Patient/%7ep1",
                true,
            ),
            (
                "https://fhir.example.org/fhir/a%2fb",
                "https://fhir.example.org/fhir/a%2Fb",
                true,
            ),
            // An encoded reserved character is not the character.
            (
                "https://fhir.example.org/fhir/a%2Fb",
                "https://fhir.example.org/fhir/a/b",
                false,
            ),
        ] {
            assert_eq!(normalise_htu(a) == normalise_htu(b), same, "{a} vs {b}");
        }
        assert!(normalise_htu("urn:x").is_none());
        assert!(normalise_htu("not a url").is_none());
    }

    #[test]
    fn every_failure() {
        let key = SigningKey::generate(KeyKind::P256, "k");
        let other = SigningKey::generate(KeyKind::P256, "o");
        let jkt = thumbprint(&public_jwk(&key)).unwrap();
        let c = ctx(&jkt);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut cl = claims();
            f(&mut cl);
            proof(&key, header(&key), cl)
        };
        let mut private = header(&key);
        private["jwk"]["d"] = json!("AAAA");
        let mut typ = header(&key);
        typ["typ"] = json!("JWT");
        let mut hs = header(&key);
        hs["alg"] = json!("HS256");
        let mut none = header(&key);
        none["alg"] = json!("none");
        let mut rsa_on_ec = header(&key);
        rsa_on_ec["alg"] = json!("RS256");
        let mut no_jwk = header(&key);
        no_jwk.as_object_mut().unwrap().remove("jwk");
        let mut oct = header(&key);
        oct["jwk"] = json!({"kty": "oct", "k": "c2VjcmV0"});
        let cases: Vec<(&str, String, DpopError)> = vec![
            ("not a JWS", "abc".into(), DpopError::Malformed),
            // Signed by the bound key, every claim right: padded.
            (
                "padded",
                with(&|c| c["pad"] = json!("A".repeat(MAX_PROOF_BYTES))),
                DpopError::TooLarge,
            ),
            ("typ", proof(&key, typ, claims()), DpopError::BadType),
            (
                "HS256",
                hs256_token("k", &claims(), b"secret"),
                DpopError::BadType,
            ),
            (
                "alg HS256 header",
                proof(&key, hs, claims()),
                DpopError::AlgNotAllowed("HS256".into()),
            ),
            (
                "alg none",
                raw_token(&none, &claims(), b""),
                DpopError::AlgNotAllowed("none".into()),
            ),
            (
                "private key in jwk",
                proof(&key, private, claims()),
                DpopError::BadJwk("carries private or secret member 'd'".into()),
            ),
            (
                "symmetric jwk",
                proof(&key, oct, claims()),
                DpopError::BadJwk("carries private or secret member 'k'".into()),
            ),
            (
                "no jwk",
                proof(&key, no_jwk, claims()),
                DpopError::BadJwk("no jwk in the header".into()),
            ),
            (
                "alg does not fit the key",
                proof(&key, rsa_on_ec, claims()),
                DpopError::BadJwk("key does not fit alg RS256".into()),
            ),
            (
                "signed by another key",
                proof(&other, header(&key), claims()),
                DpopError::BadSignature,
            ),
            (
                "wrong htm",
                with(&|c| c["htm"] = json!("POST")),
                DpopError::WrongMethod("POST".into()),
            ),
            (
                "lowercase htm",
                with(&|c| c["htm"] = json!("get")),
                DpopError::WrongMethod("get".into()),
            ),
            (
                "wrong htu path",
                with(&|c| c["htu"] = json!("https://fhir.example.org/fhir/Patient/p2")),
                DpopError::WrongUrl,
            ),
            (
                "wrong htu scheme",
                with(&|c| c["htu"] = json!("http://fhir.example.org/fhir/Patient/p1")),
                DpopError::WrongUrl,
            ),
            (
                "wrong htu port",
                with(&|c| c["htu"] = json!("https://fhir.example.org:8443/fhir/Patient/p1")),
                DpopError::WrongUrl,
            ),
            (
                "trailing slash",
                with(&|c| c["htu"] = json!("https://fhir.example.org/fhir/Patient/p1/")),
                DpopError::WrongUrl,
            ),
            (
                "stale",
                with(&|c| c["iat"] = json!(NOW - 61)),
                DpopError::Stale,
            ),
            (
                "future",
                with(&|c| c["iat"] = json!(NOW + 6)),
                DpopError::Future,
            ),
            (
                "iat string",
                with(&|c| c["iat"] = json!(NOW.to_string())),
                DpopError::BadClaim("iat"),
            ),
            (
                "no jti",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("jti");
                }),
                DpopError::BadClaim("jti"),
            ),
            (
                "no ath",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("ath");
                }),
                DpopError::BadClaim("ath"),
            ),
            (
                "wrong ath",
                with(&|c| c["ath"] = json!(sha256_b64(b"another token"))),
                DpopError::WrongAth,
            ),
        ];
        for (name, p, want) in cases {
            assert_eq!(check_proof(&p, &c, &policy()), Err(want), "{name}");
        }
        // A NumericDate may have a fraction (RFC 7519): rounded down, as
        // the access token's times are; past the window it is stale still.
        let p = with(&|c| c["iat"] = json!(NOW as f64 - 0.25));
        assert!(check_proof(&p, &c, &policy()).is_ok());
        let p = with(&|c| c["iat"] = json!(NOW as f64 - 60.5));
        assert_eq!(check_proof(&p, &c, &policy()), Err(DpopError::Stale));
        // The right proof for another key than the token is bound to.
        let p = proof(&other, header(&other), claims());
        assert_eq!(check_proof(&p, &c, &policy()), Err(DpopError::WrongKey));
        // A required nonce.
        let accepted = vec!["n-0".to_string(), "n-1".to_string()];
        let nonce_ctx = ProofContext {
            nonces: &accepted,
            ..c
        };
        let p = proof(&key, header(&key), claims());
        assert_eq!(
            check_proof(&p, &nonce_ctx, &policy()),
            Err(DpopError::NonceRequired)
        );
        let p = with(&|c| c["nonce"] = json!("n-1"));
        assert!(check_proof(&p, &nonce_ctx, &policy()).is_ok());
        // An algorithm the policy does not allow, though asymmetric.
        let strict = DpopPolicy {
            algorithms: vec![Algorithm::RS256],
            ..policy()
        };
        let p = proof(&key, header(&key), claims());
        assert_eq!(
            check_proof(&p, &c, &strict),
            Err(DpopError::AlgNotAllowed("ES256".into()))
        );
    }
}
