//! Signing keys for the sandbox issuer (`fhirwall demo`), the tests and the
//! benches: generated at run time with aws-lc-rs, published as JWKs, used
//! to mint tokens. Never used by the gateway to verify anything.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// Which kind of key to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa2048,
    P256,
    P384,
    Ed25519,
}

/// A generated signing key with its public JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// SubjectPublicKeyInfo PEM of the public key (used by tests that try
    /// the "HS256 signed with the public key" confusion attack).
    pub public_pem: String,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// Generates a fresh key. Panics only if the system RNG fails.
    pub fn generate(kind: KeyKind, kid: &str) -> SigningKey {
        match kind {
            KeyKind::Rsa2048 => {
                let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .expect("RSA keygen");
                let pkcs8 = kp.as_der().expect("RSA pkcs8");
                let pem_priv = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
                let encoding =
                    EncodingKey::from_rsa_pem(pem_priv.as_bytes()).expect("RSA encoding key");
                let public = kp.public_key();
                let spki = public.as_der().expect("RSA spki");
                let n = public.modulus().big_endian_without_leading_zero().to_vec();
                let e = public.exponent().big_endian_without_leading_zero().to_vec();
                SigningKey {
                    kid: kid.to_string(),
                    alg: Algorithm::RS256,
                    encoding,
                    jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&n), "e": b64(&e)}),
                    public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec())),
                }
            }
            KeyKind::P256 | KeyKind::P384 => {
                let (signing, alg, crv, len) = if kind == KeyKind::P256 {
                    (
                        &ECDSA_P256_SHA256_FIXED_SIGNING,
                        Algorithm::ES256,
                        "P-256",
                        32,
                    )
                } else {
                    (
                        &ECDSA_P384_SHA384_FIXED_SIGNING,
                        Algorithm::ES384,
                        "P-384",
                        48,
                    )
                };
                let kp = EcdsaKeyPair::generate(signing).expect("EC keygen");
                let pkcs8 = kp.to_pkcs8v1().expect("EC pkcs8");
                let point = kp.public_key().as_ref().to_vec();
                let (x, y) = (&point[1..1 + len], &point[1 + len..]);
                let spki = kp.public_key().as_der().expect("EC spki");
                SigningKey {
                    kid: kid.to_string(),
                    alg,
                    encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
                    jwk: json!({"kty": "EC", "kid": kid, "use": "sig", "crv": crv, "x": b64(x), "y": b64(y)}),
                    public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki.as_ref().to_vec())),
                }
            }
            KeyKind::Ed25519 => {
                let pkcs8 =
                    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("Ed25519 keygen");
                let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("Ed25519 parse");
                let x = kp.public_key().as_ref().to_vec();
                SigningKey {
                    kid: kid.to_string(),
                    alg: Algorithm::EdDSA,
                    encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
                    jwk: json!({"kty": "OKP", "kid": kid, "use": "sig", "crv": "Ed25519", "x": b64(&x)}),
                    public_pem: String::new(),
                }
            }
        }
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Value {
        &self.jwk
    }

    /// Signs `claims` with this key (header: alg, kid, typ `at+jwt`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("at+jwt".into());
        self.sign_with_header(&header, claims)
    }

    /// Signs `claims` under a header given as JSON (DPoP proofs carry the
    /// public JWK in theirs; tests build hostile ones).
    pub fn sign_json(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.alg)
            .expect("signing cannot fail");
        format!("{message}.{sig}")
    }

    /// Signs with a caller-made header (tests use it for hostile headers).
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding)
            .expect("signing a JSON value cannot fail")
    }
}

/// A JWKS document holding the public keys given.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk().clone()).collect::<Vec<_>>()})
}

/// A token with an arbitrary header and signature part, for hostile tests.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// An HS256 token whose HMAC secret is `secret` (e.g. an RSA public key PEM).
pub fn hs256_token(kid: &str, claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("HS256 signing")
}
