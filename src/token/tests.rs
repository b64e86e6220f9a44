//! Table tests for the pure token checks, with real keys and signatures.

use jsonwebtoken::{Algorithm, Header};
use serde_json::{json, Value};

use super::*;
use crate::config::Issuer;
use crate::sandbox::keys::{hs256_token, jwks, raw_token, KeyKind, SigningKey};

const NOW: i64 = 1_800_000_000;
const ISS: &str = "https://idp.example";
const AUD: &str = "https://fhir.example/fhir";

fn issuer(algs: &[Algorithm]) -> Issuer {
    Issuer {
        name: "idp".into(),
        issuer: ISS.into(),
        jwks_uri: None,
        discovery: true,
        audiences: vec![AUD.into()],
        algorithms: algs.to_vec(),
        leeway_seconds: 30,
        require_at_jwt_typ: false,
        require_binding: false,
        require_binding_for_clients: Vec::new(),
        introspection: None,
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "u1", "client_id": "app", "scope": "user/*.rs openid",
           "exp": NOW + 300, "iat": NOW - 10, "patient": "p1", "fhirUser": "Practitioner/9", "jti": "j1"})
}

fn check(token: &str, keys: &KeySet, iss: &Issuer) -> Result<Claims, TokenError> {
    let u = inspect(token, 16 * 1024)?;
    verify(token, &u, iss, keys, NOW)
}

fn keyset(keys: &[&SigningKey]) -> KeySet {
    KeySet::from_jwks(&jwks(keys)).unwrap().0
}

#[test]
fn every_supported_key_kind_verifies() {
    for (kind, alg) in [
        (KeyKind::Rsa2048, Algorithm::RS256),
        (KeyKind::P256, Algorithm::ES256),
        (KeyKind::P384, Algorithm::ES384),
        (KeyKind::Ed25519, Algorithm::EdDSA),
    ] {
        let k = SigningKey::generate(kind, "k1");
        let c = check(&k.sign(&claims()), &keyset(&[&k]), &issuer(&[alg]))
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert_eq!(c.patient.as_deref(), Some("p1"));
        assert_eq!(c.client_id.as_deref(), Some("app"));
        assert_eq!(c.fhir_user.as_deref(), Some("Practitioner/9"));
        assert_eq!(c.scopes.scopes.len(), 1);
    }
    // One RSA key (its JWK naming no alg) signs with every RSA algorithm
    // of the allow-list; each verifies when the issuer allows it, and only
    // then.
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "k1");
    let mut jwk = rsa.jwk().clone();
    jwk.as_object_mut().unwrap().remove("alg");
    let keys = KeySet::from_jwks(&json!({ "keys": [jwk] })).unwrap().0;
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        let mut header = Header::new(alg);
        header.kid = Some("k1".into());
        let token = rsa.sign_with_header(&header, &claims());
        let c = check(&token, &keys, &issuer(&[alg])).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(c.sub.as_deref(), Some("u1"));
        let other = if alg == Algorithm::RS256 {
            Algorithm::PS256
        } else {
            Algorithm::RS256
        };
        assert!(
            check(&token, &keys, &issuer(&[other])).is_err(),
            "{alg:?} passed an issuer allowing only {other:?}"
        );
    }
}

#[test]
fn hostile_tokens_are_refused() {
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "rsa1");
    let ec = SigningKey::generate(KeyKind::P256, "ec1");
    let keys = keyset(&[&rsa, &ec]);
    let iss = issuer(&[Algorithm::RS256, Algorithm::ES256]);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        rsa.sign(&c)
    };
    let other = SigningKey::generate(KeyKind::Rsa2048, "rsa1");
    let mut ps_header = Header::new(Algorithm::PS256);
    ps_header.kid = Some("rsa1".into());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            with(&|c| c["exp"] = json!(NOW - 31)),
            "token_expired",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(NOW + 31)),
            "token_not_yet_valid",
        ),
        (
            "issued in the future",
            with(&|c| c["iat"] = json!(NOW + 60)),
            "token_not_yet_valid",
        ),
        (
            "no exp",
            with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))),
            "token_bad_claims",
        ),
        (
            "string exp",
            with(&|c| c["exp"] = json!("1900000000")),
            "token_bad_claims",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("https://other")),
            "token_wrong_audience",
        ),
        (
            "no audience",
            with(&|c| drop(c.as_object_mut().unwrap().remove("aud"))),
            "token_bad_claims",
        ),
        // Tokens that say they are not access tokens.
        (
            "Keycloak ID token",
            with(&|c| c["typ"] = json!("ID")),
            "token_bad_claims",
        ),
        (
            "Keycloak refresh token",
            with(&|c| c["typ"] = json!("Refresh")),
            "token_bad_claims",
        ),
        (
            "Cognito ID token",
            with(&|c| c["token_use"] = json!("id")),
            "token_bad_claims",
        ),
        (
            "an RFC 8693 ID token type",
            with(&|c| c["token_type"] = json!("urn:ietf:params:oauth:token-type:id_token")),
            "token_bad_claims",
        ),
        // Claims that could not be a header value to the upstream.
        (
            "sub with a line break",
            with(&|c| c["sub"] = json!("u1\r\nX-Fhirwall-Patient: p2")),
            "token_bad_claims",
        ),
        (
            "client_id with a NUL",
            with(&|c| c["client_id"] = json!("app\u{0}")),
            "token_bad_claims",
        ),
        (
            "azp with a tab",
            with(&|c| {
                c.as_object_mut().unwrap().remove("client_id");
                c["azp"] = json!("app\t2");
            }),
            "token_bad_claims",
        ),
        (
            "fhirUser with a C1 control",
            with(&|c| c["fhirUser"] = json!("Practitioner/9\u{85}")),
            "token_bad_claims",
        ),
        (
            "scope with DEL",
            with(&|c| c["scope"] = json!("user/*.rs\u{7f}")),
            "token_bad_claims",
        ),
        (
            "scp list with a line break",
            with(&|c| {
                c.as_object_mut().unwrap().remove("scope");
                c["scp"] = json!(["user/*.rs", "openid\nuser/*.cruds"]);
            }),
            "token_bad_claims",
        ),
        (
            "audience list without ours",
            with(&|c| c["aud"] = json!(["a", "b"])),
            "token_wrong_audience",
        ),
        (
            "issuer mismatch after lookup",
            with(&|c| c["iss"] = json!("https://evil")),
            "token_unknown_issuer",
        ),
        (
            "alg none",
            raw_token(&json!({"alg": "none", "kid": "rsa1"}), &claims(), b""),
            "token_malformed",
        ),
        (
            "alg none with sig",
            raw_token(&json!({"alg": "none", "kid": "rsa1"}), &claims(), b"x"),
            "token_alg_not_allowed",
        ),
        (
            "HS256 with the RSA public key",
            hs256_token("rsa1", &claims(), rsa.public_pem.as_bytes()),
            "token_alg_not_allowed",
        ),
        (
            "unknown kid",
            {
                let k = SigningKey::generate(KeyKind::Rsa2048, "rsa9");
                k.sign(&claims())
            },
            "token_unknown_key",
        ),
        (
            "signed by another key, same kid",
            other.sign(&claims()),
            "token_bad_signature",
        ),
        (
            "alg not allowed for issuer",
            rsa.sign_with_header(&ps_header, &claims()),
            "token_alg_not_allowed",
        ),
        (
            "kid of an EC key with RS256",
            raw_token(&json!({"alg": "RS256", "kid": "ec1"}), &claims(), b"sig"),
            "token_unknown_key",
        ),
        (
            "crit header",
            raw_token(
                &json!({"alg": "RS256", "kid": "rsa1", "crit": ["exp"]}),
                &claims(),
                b"s",
            ),
            "token_header_refused",
        ),
        (
            "dpop typ",
            raw_token(
                &json!({"alg": "RS256", "kid": "rsa1", "typ": "dpop+jwt"}),
                &claims(),
                b"s",
            ),
            "token_header_refused",
        ),
        (
            "malformed base64",
            "a!b.c$d.e%f".to_string(),
            "token_malformed",
        ),
        ("two parts", "abc.def".to_string(), "token_malformed"),
        (
            "payload not json",
            format!(
                "{}.bm90IGpzb24.c2ln",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#)
            ),
            "token_malformed",
        ),
        (
            "tampered payload",
            {
                let t = rsa.sign(&claims());
                let p: Vec<&str> = t.split('.').collect();
                let c = URL_SAFE_NO_PAD.encode(with_scope("user/*.cruds").to_string());
                format!("{}.{}.{}", p[0], c, p[2])
            },
            "token_bad_signature",
        ),
        ("oversized", "a".repeat(20_000), "token_too_long"),
    ];
    for (name, token, code) in cases {
        let e = check(&token, &keys, &iss).expect_err(name);
        assert_eq!(e.code(), code, "{name}: {e}");
    }
}

/// Access tokens that say so pass.
#[test]
fn tokens_saying_they_are_access_tokens_pass() {
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "rsa1");
    let (keys, iss) = (keyset(&[&rsa]), issuer(&[Algorithm::RS256]));
    for (k, v) in [
        ("typ", "Bearer"),
        ("typ", "DPoP"),
        ("token_use", "access"),
        ("token_use", "access_token"),
        (
            "token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
    ] {
        let mut c = claims();
        c[k] = json!(v);
        check(&rsa.sign(&c), &keys, &iss).unwrap_or_else(|e| panic!("{k} {v}: {e}"));
    }
    let mut c = claims();
    c["typ"] = json!("ID");
    let e = check(&rsa.sign(&c), &keys, &iss).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the token is not an access token (its typ is 'ID')"
    );
}

fn with_scope(s: &str) -> Value {
    let mut c = claims();
    c["scope"] = json!(s);
    c
}

#[test]
fn leeway_is_honoured() {
    let k = SigningKey::generate(KeyKind::P256, "k");
    let keys = keyset(&[&k]);
    let iss = issuer(&[Algorithm::ES256]);
    let mut c = claims();
    c["exp"] = json!(NOW - 29);
    c["nbf"] = json!(NOW + 29);
    c["iat"] = json!(NOW + 29);
    assert!(check(&k.sign(&c), &keys, &iss).is_ok());
    // One second past the 30 s leeway, each is refused on its own.
    for (claim, value, code, says) in [
        ("exp", NOW - 30, "token_expired", "expired"),
        ("nbf", NOW + 31, "token_not_yet_valid", "not valid before"),
        (
            "iat",
            NOW + 31,
            "token_not_yet_valid",
            "issued in the future",
        ),
    ] {
        let mut c = claims();
        c[claim] = json!(value);
        let e = check(&k.sign(&c), &keys, &iss).unwrap_err();
        assert_eq!(e.code(), code, "{claim}: {e}");
        assert!(e.to_string().contains(says), "{claim}: {e}");
    }
}

#[test]
fn at_jwt_typ_can_be_required() {
    let k = SigningKey::generate(KeyKind::P256, "k");
    let keys = keyset(&[&k]);
    let mut iss = issuer(&[Algorithm::ES256]);
    iss.require_at_jwt_typ = true;
    assert!(
        check(&k.sign(&claims()), &keys, &iss).is_ok(),
        "sign() sets typ at+jwt"
    );
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k".into());
    assert_eq!(
        check(&k.sign_with_header(&h, &claims()), &keys, &iss)
            .unwrap_err()
            .code(),
        "token_header_refused"
    );
    // Not required: `JWT` in any of its spellings passes.
    iss.require_at_jwt_typ = false;
    for typ in ["JWT", "application/jwt", "at+JWT"] {
        h.typ = Some(typ.into());
        let got = check(&k.sign_with_header(&h, &claims()), &keys, &iss);
        assert!(got.is_ok(), "{typ}: {got:?}");
    }
}

#[test]
fn jwks_filtering() {
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "r");
    let mut doc = jwks(&[&rsa]);
    let keys = doc["keys"].as_array_mut().unwrap();
    keys.push(json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}));
    let mut private = rsa.jwk().clone();
    private["kid"] = json!("priv");
    private["d"] = json!("AAAA");
    keys.push(private);
    let mut enc = rsa.jwk().clone();
    enc["kid"] = json!("enc");
    enc["use"] = json!("enc");
    keys.push(enc);
    let mut wrong_alg = rsa.jwk().clone();
    wrong_alg["kid"] = json!("wa");
    wrong_alg["alg"] = json!("ES256");
    keys.push(wrong_alg);
    keys.push(json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"}));
    // Sizes the verifier would refuse at every token: said at load.
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    keys.push(json!({"kty": "RSA", "kid": "rsa1024", "n": b64(&[0xc5; 128]), "e": "AQAB"}));
    keys.push(json!({"kty": "EC", "kid": "short", "crv": "P-256", "x": b64(&[7; 31]), "y": b64(&[7; 32])}));
    // An `alg` that is no string is no absent one (which would leave the
    // key every RSA algorithm).
    let mut listed_alg = rsa.jwk().clone();
    listed_alg["kid"] = json!("listed");
    listed_alg["alg"] = json!(["RS256"]);
    keys.push(listed_alg);
    let (set, skipped) = KeySet::from_jwks(&doc).unwrap();
    assert_eq!(set.keys.len(), 1, "{skipped:?}");
    assert_eq!(skipped.len(), 8, "{skipped:?}");
    assert!(
        skipped.iter().any(|s| s.contains("alg is not a string")),
        "{skipped:?}"
    );
    assert!(skipped[0].contains("private or secret"), "{skipped:?}");
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("RSA modulus of 1024 bits")),
        "{skipped:?}"
    );
    assert!(
        skipped.iter().any(|s| s.contains("x is not 32 bytes")),
        "{skipped:?}"
    );
    // An HS256 token against a JWKS holding a symmetric key is still refused.
    let hs = hs256_token("h", &claims(), b"secret");
    assert_eq!(
        check(&hs, &set, &issuer(&[Algorithm::RS256]))
            .unwrap_err()
            .code(),
        "token_alg_not_allowed"
    );
}

#[test]
fn scp_array_and_azp() {
    let k = SigningKey::generate(KeyKind::P256, "k");
    let mut c = claims();
    c.as_object_mut().unwrap().remove("scope");
    c.as_object_mut().unwrap().remove("client_id");
    c["scp"] = json!(["user/Patient.rs", "openid"]);
    c["azp"] = json!("azp-app");
    let got = check(&k.sign(&c), &keyset(&[&k]), &issuer(&[Algorithm::ES256])).unwrap();
    assert_eq!(got.client_id.as_deref(), Some("azp-app"));
    assert_eq!(got.scopes.scopes[0].raw, "user/Patient.rs");
    // An Okta access token: `cid`, `uid`, `scp`, and no other client claim.
    c.as_object_mut().unwrap().remove("azp");
    c["cid"] = json!("0oa-okta-app");
    c["uid"] = json!("00u-user");
    let got = check(&k.sign(&c), &keyset(&[&k]), &issuer(&[Algorithm::ES256])).unwrap();
    assert_eq!(got.client_id.as_deref(), Some("0oa-okta-app"));
    c["cid"] = json!(7);
    let bad = check(&k.sign(&c), &keyset(&[&k]), &issuer(&[Algorithm::ES256]));
    assert!(bad.is_err(), "a cid that is no string");
}

/// `scope` as an array (Duende/IdentityServer, Spring Authorization
/// Server, UAA) is read as the list of scopes it is; an item that is not
/// one scope (not text, empty, holding a space) refuses the token.
#[test]
fn scope_as_an_array() {
    let k = SigningKey::generate(KeyKind::P256, "k");
    let mut c = claims();
    c["scope"] = json!(["openid", "patient/Observation.rs"]);
    let got = check(&k.sign(&c), &keyset(&[&k]), &issuer(&[Algorithm::ES256])).unwrap();
    let raw: Vec<&str> = got.scopes.scopes.iter().map(|s| s.raw.as_str()).collect();
    assert_eq!(raw, ["patient/Observation.rs"]);
    for bad in [
        json!(["openid", 7]),
        json!(["", "user/*.rs"]),
        json!(["patient/Observation.rs user/*.cruds"]),
    ] {
        c["scope"] = bad.clone();
        let got = check(&k.sign(&c), &keyset(&[&k]), &issuer(&[Algorithm::ES256]));
        assert!(
            matches!(got, Err(TokenError::BadClaim("scope"))),
            "{bad}: {got:?}"
        );
    }
}

/// Keys of different types may share a kid (RFC 7517 §4.5): the token's
/// algorithm picks one; two that fit it are ambiguous.
#[test]
fn a_kid_shared_by_keys_of_different_types() {
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "k");
    let ec = SigningKey::generate(KeyKind::P256, "k");
    let both = issuer(&[Algorithm::RS256, Algorithm::ES256]);
    let set = keyset(&[&rsa, &ec]);
    for key in [&rsa, &ec] {
        check(&key.sign(&claims()), &set, &both).unwrap_or_else(|e| panic!("{}: {e}", key.kid));
    }
    let ec2 = SigningKey::generate(KeyKind::P256, "k");
    let twice = keyset(&[&ec, &ec2]);
    assert!(matches!(
        check(&ec.sign(&claims()), &twice, &both),
        Err(TokenError::AmbiguousKey(2))
    ));
    // A kid whose keys fit no allowed algorithm of the token's.
    let only_rsa = keyset(&[&rsa]);
    assert!(matches!(
        check(&ec.sign(&claims()), &only_rsa, &both),
        Err(TokenError::KeyAlgorithmMismatch { .. })
    ));
}

/// A JWT is three dot-separated parts whose first is a JSON object, well
/// formed or not (it is then refused as a JWT, never introspected);
/// anything else is opaque, dots or not.
#[test]
fn token_kinds() {
    let good = raw_token(&json!({"alg": "RS256"}), &claims(), b"sig");
    let none = raw_token(&json!({"alg": "none"}), &claims(), b"");
    let array = raw_token(&json!(["alg"]), &claims(), b"sig");
    for (token, kind) in [
        (good.as_str(), "jwt"),
        (none.as_str(), "jwt"),
        (array.as_str(), "opaque"),
        ("opaque-token", "opaque"),
        ("abc.def.ghi", "opaque"),
        ("a.b", "opaque"),
        ("a.b.c.d", "opaque"),
        ("..", "opaque"),
    ] {
        assert_eq!(token_kind(token), kind, "{token}");
    }
    let four = format!("{good}.x");
    assert_eq!(token_kind(&four), "opaque");
}

/// A token of other than three parts is introspected as opaque, but a
/// JWS with a stray dot is refused (an authorization server may read it
/// as the JWT inside, past the checks fhirwall holds JWTs to); a JWE's
/// five parts are opaque.
#[test]
fn a_jws_with_a_dot_more_or_less_is_not_opaque() {
    let good = raw_token(&json!({"alg": "RS256"}), &claims(), b"sig");
    let (h, rest) = good.split_once('.').unwrap();
    let (p, _) = rest.split_once('.').unwrap();
    let jwe_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"dir","enc":"A256GCM"}"#);
    let jwe = format!("{jwe_header}..iv.ciphertext.tag");
    let jws_header_five = format!("{h}.{p}.a.b.c");
    for (token, refused) in [
        (format!("{good}."), true),
        (format!(".{good}"), true),
        (format!("{good}.."), true),
        (format!("{h}.{p}"), true),
        (jws_header_five, true),
        (format!("{jwe}."), true),
        ("a..b.c".to_string(), true),
        ("a.b.c.".to_string(), true),
        (jwe, false),
        ("opaque-token".to_string(), false),
        ("a.b".to_string(), false),
        ("a.b.c.d".to_string(), false),
    ] {
        assert_eq!(not_a_misspelt_jws(&token).is_err(), refused, "{token}");
    }
}

/// A token without a `kid` is tried against the few keys of its algorithm
/// (an issuer rotating publishes the old and the new one): it verifies
/// with the one that signed it; a forged one with none; and a set with
/// more such keys than fhirwall tries is ambiguous.
#[test]
fn a_token_without_a_kid_is_tried_against_the_keys_of_its_algorithm() {
    let (old, new) = (
        SigningKey::generate(KeyKind::Rsa2048, "old"),
        SigningKey::generate(KeyKind::Rsa2048, "new"),
    );
    let ec = SigningKey::generate(KeyKind::P256, "ec");
    let rs = issuer(&[Algorithm::RS256, Algorithm::ES256]);
    let set = keyset(&[&old, &new, &ec]);
    let no_kid = |k: &SigningKey| k.sign_with_header(&Header::new(Algorithm::RS256), &claims());
    for k in [&old, &new] {
        let c = check(&no_kid(k), &set, &rs).unwrap_or_else(|e| panic!("{}: {e}", k.kid));
        assert_eq!(c.sub.as_deref(), Some("u1"));
    }
    let stranger = SigningKey::generate(KeyKind::Rsa2048, "stranger");
    assert!(matches!(
        check(&no_kid(&stranger), &set, &rs),
        Err(TokenError::BadSignature)
    ));
    let more: Vec<SigningKey> = (0..MAX_KEYS_WITHOUT_KID)
        .map(|i| SigningKey::generate(KeyKind::Rsa2048, &format!("extra-{i}")))
        .collect();
    let mut all: Vec<&SigningKey> = more.iter().collect();
    all.push(&old);
    assert!(matches!(
        check(&no_kid(&old), &keyset(&all), &rs),
        Err(TokenError::AmbiguousKey(n)) if n == MAX_KEYS_WITHOUT_KID + 1
    ));
}

/// A key set fetched again holds a cached token's key when the same key
/// is still published under its kid — not when another key took the kid,
/// or its `alg` changed.
#[test]
fn a_new_key_set_still_holds_a_kid_only_with_the_same_key() {
    let a = SigningKey::generate(KeyKind::P256, "k1");
    let b = SigningKey::generate(KeyKind::P256, "k2");
    let replaced = SigningKey::generate(KeyKind::P256, "k1");
    let set = |keys: &[&SigningKey]| KeySet::from_jwks(&jwks(keys)).unwrap().0;
    let then = set(&[&a]);
    assert!(set(&[&a]).still_holds(&then, "k1"), "the same key again");
    assert!(
        set(&[&b, &a]).still_holds(&then, "k1"),
        "a key added beside"
    );
    assert!(!set(&[&replaced]).still_holds(&then, "k1"), "replaced");
    assert!(!set(&[&b]).still_holds(&then, "k1"), "withdrawn");
    assert!(!set(&[&a]).still_holds(&then, "k2"), "a kid it never had");
    // A second key under the kid: a fresh token naming it would be refused
    // as ambiguous, so the cached one is verified again too.
    assert!(
        !set(&[&a, &replaced]).still_holds(&then, "k1"),
        "another key added under the kid"
    );
    assert!(!set(&[&a, &a]).still_holds(&then, "k1"), "the key twice");
    // An RSA key published without `alg` verifies RS* and PS*; the same
    // key narrowed to RS256 is not the key a PS256 token was verified by.
    let rsa = SigningKey::generate(KeyKind::Rsa2048, "r1");
    let mut wide = rsa.jwk().clone();
    wide.as_object_mut().unwrap().remove("alg");
    let mut narrowed = rsa.jwk().clone();
    narrowed["alg"] = json!("RS256");
    let of = |jwk: &Value| KeySet::from_jwks(&json!({ "keys": [jwk] })).unwrap().0;
    assert!(of(&wide).still_holds(&of(&wide), "r1"));
    assert!(!of(&narrowed).still_holds(&of(&wide), "r1"), "alg narrowed");
}

#[test]
fn a_forwarded_claim_is_a_header_value_or_refused() {
    let c = json!({"s": "hospital-a", "n": 7, "b": true, "l": ["1", 2, false],
        "none": null, "o": {"a": 1}, "e": [], "deep": [["a"]], "ctl": "a\u{0}b",
        "ctl-in-list": ["a", "b\nc"], "u": "Zoë"});
    for (name, want) in [
        ("s", Some("hospital-a")),
        ("n", Some("7")),
        ("b", Some("true")),
        ("l", Some("1,2,false")),
        ("u", Some("Zoë")),
        ("missing", None),
        ("none", None),
    ] {
        assert_eq!(
            claim_header_value(&c, name).unwrap().as_deref(),
            want,
            "{name}"
        );
    }
    for name in ["o", "e", "deep", "ctl", "ctl-in-list"] {
        let err = claim_header_value(&c, name).unwrap_err();
        assert_eq!(err.code(), "token_bad_claims", "{name}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
}
