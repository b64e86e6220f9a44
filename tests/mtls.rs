//! RFC 8705 certificate-bound tokens through the real binary, over real TLS
//! with a CA, a server certificate and client certificates generated here:
//! the matching certificate passes, another certificate or none is 401, and
//! the upstream sees no refused request.

mod support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{Gateway, Options, TempDir};

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Pki {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate (PEM) and its key (PEM), and the SHA-256 of its DER.
fn leaf(pki: &Pki, names: &[&str]) -> (String, String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    let thumb = URL_SAFE_NO_PAD.encode(Sha256::digest(cert.der()));
    (cert.pem(), key.serialize_pem(), thumb)
}

fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    // Bounded: a handshake the gateway never finishes fails the test
    // rather than stalling the run (it happened once, under load).
    let mut b = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

async fn start(mode: &str, dir: &TempDir, pki: &Pki) -> Gateway {
    let (cert, key, _) = leaf(pki, &["127.0.0.1", "localhost"]);
    let ca_file = dir.0.join("client-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (cert_file, key_file) = (dir.0.join("server.pem"), dir.0.join("server.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    Gateway::start(Options {
        tls_yaml: format!(
            "tls:\n  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_auth: {mode}\n",
            cert_file.display(),
            key_file.display(),
            ca_file.display()
        ),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_bound_tokens_need_their_certificate() {
    let pki = ca();
    let dir = TempDir::new("mtls");
    let gw = start("request", &dir, &pki).await;
    let (cert_a, key_a, thumb_a) = leaf(&pki, &["client-a"]);
    let (cert_b, key_b, _) = leaf(&pki, &["client-b"]);
    let mut c = gw.claims("user/*.rs");
    c["cnf"] = json!({"x5t#S256": thumb_a});
    let bound = gw.issuer.signing_key().sign(&c);

    let with_a = client(&pki.ca_pem, Some((&cert_a, &key_a)));
    let with_b = client(&pki.ca_pem, Some((&cert_b, &key_b)));
    let without = client(&pki.ca_pem, None);
    let get = |c: &reqwest::Client, rel: &str| {
        c.get(format!("{}/{rel}", gw.base))
            .bearer_auth(&bound)
            .send()
    };

    let r = get(&with_a, "Patient/p1").await.unwrap();
    assert_eq!(r.status(), 200);
    for (who, c, id, code) in [
        (
            "another certificate",
            &with_b,
            "mtls-other-1",
            "not the one the token is bound to",
        ),
        (
            "no certificate",
            &without,
            "mtls-none-1",
            "none was presented",
        ),
    ] {
        let r = get(c, &format!("Patient/{id}")).await.unwrap();
        assert_eq!(r.status(), 401, "{who}");
        let www = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            www.contains("error=\"invalid_token\"") && www.contains(code),
            "{who}: {www}"
        );
        assert_eq!(
            gw.upstream.count_containing(id),
            0,
            "{who} reached the upstream"
        );
    }
    // Plain bearer tokens still work over TLS, with or without a certificate.
    let plain = gw.mint("user/*.rs", None);
    let r = without
        .get(format!("{}/Patient/p1", gw.base))
        .bearer_auth(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let audit = gw.audit_containing("\"binding\":\"mtls\"");
    assert!(audit.contains("\"binding\":\"mtls\""), "{audit}");
    let m = gw.metrics().await;
    assert!(
        m.contains("fhirwall_token_bindings_total{binding=\"mtls\",kind=\"jwt\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("fhirwall_request_outcomes_total{reason=\"mtls_wrong_certificate\"} 1"),
        "{m}"
    );
}

/// A token bound both to a DPoP key and to a certificate needs both: its
/// proof in the DPoP scheme, over that certificate. Served, it is recorded
/// and counted as bound both ways (a policy on either binding sees it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_both_ways_needs_its_proof_and_its_certificate() {
    use fhirwall::sandbox::keys::KeyKind;
    let pki = ca();
    let dir = TempDir::new("mtls-dpop");
    let gw = start("request", &dir, &pki).await;
    let (cert_a, key_a, thumb_a) = leaf(&pki, &["client-a"]);
    let dpop = support::dpop::Client::new(KeyKind::P256, "ec-client");
    let mut c = gw.claims("user/*.rs");
    c["cnf"] = json!({"jkt": dpop.jkt, "x5t#S256": thumb_a});
    let token = gw.issuer.signing_key().sign(&c);
    let with_a = client(&pki.ca_pem, Some((&cert_a, &key_a)));
    let without = client(&pki.ca_pem, None);
    let get = |c: &reqwest::Client, rel: &str| {
        let url = format!("{}/{rel}", gw.base);
        c.get(&url)
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", dpop.proof("GET", &url, &token))
            .send()
    };
    let r = get(&with_a, "Patient/p1").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get(&without, "Patient/both-no-cert").await.unwrap();
    assert_eq!(r.status(), 401);
    let r = with_a
        .get(format!("{}/Patient/both-no-proof", gw.base))
        .header("authorization", format!("DPoP {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(gw.upstream.count_containing("both-no"), 0);
    let audit = gw.audit_containing("\"binding\":\"dpop+mtls\"");
    assert!(audit.contains("\"binding\":\"dpop+mtls\""), "{audit}");
    let m = gw.metrics().await;
    assert!(
        m.contains("fhirwall_token_bindings_total{binding=\"dpop+mtls\",kind=\"jwt\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_and_untrusted_ones() {
    let pki = ca();
    let dir = TempDir::new("mtls-req");
    let gw = start("require", &dir, &pki).await;
    let plain = gw.mint("user/*.rs", None);
    // No certificate: the handshake fails, nothing is served.
    let without = client(&pki.ca_pem, None);
    let r = without
        .get(format!("{}/Patient/mtls-required-1", gw.base))
        .bearer_auth(&plain)
        .send()
        .await;
    assert!(
        r.as_ref().is_err_and(|e| !e.is_timeout()),
        "a connection without a client certificate was served, or hung: {r:?}"
    );
    // A certificate from another CA: refused in the handshake too.
    let rogue = ca();
    let (cert, key, _) = leaf(&rogue, &["rogue"]);
    let r = client(&pki.ca_pem, Some((&cert, &key)))
        .get(format!("{}/Patient/mtls-required-2", gw.base))
        .bearer_auth(&plain)
        .send()
        .await;
    assert!(
        r.as_ref().is_err_and(|e| !e.is_timeout()),
        "an untrusted client certificate was accepted, or the handshake hung: {r:?}"
    );
    // No request record counts it: the metric does (a rogue CA named as
    // ours fails on the signature).
    let m = gw.metrics().await;
    let refused: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("fhirwall_tls_client_certificates_refused_total{"))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert_eq!(
        refused,
        ["fhirwall_tls_client_certificates_refused_total{reason=\"bad_signature\"} 1"]
    );
    // A trusted one: served.
    let (cert, key, _) = leaf(&pki, &["client"]);
    let r = client(&pki.ca_pem, Some((&cert, &key)))
        .get(format!("{}/Patient/p1", gw.base))
        .bearer_auth(&plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.upstream.count_containing("mtls-required"), 0);
}

#[test]
fn check_reports_bad_tls_files() {
    let dir = TempDir::new("mtls-check");
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: a\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [x]\n\
         admin:\n  listen: 127.0.0.1:3\n\
         tls:\n  cert_file: /nonexistent/server.pem\n  key_file: /nonexistent/server.key\n  client_auth: require\n",
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    for key in ["tls.cert_file", "tls.key_file", "tls.client_ca_file"] {
        assert!(text.contains(key), "{key} not reported: {text}");
    }
    // Client CAs without client_auth: no certificate would be asked for.
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
         issuers:\n  - name: a\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [x]\n\
         admin:\n  listen: 127.0.0.1:3\n\
         tls:\n  cert_file: /nonexistent/server.pem\n  key_file: /nonexistent/server.key\n  client_ca_file: ca.pem\n",
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("tls.client_ca_file") && text.contains("client_auth is none"),
        "{text}"
    );
}

/// `check` builds the listener's TLS as `run` does: a key that is not the
/// certificate's, or one rustls cannot read, is reported (the listener
/// would otherwise fail only as it starts, after `check` said OK). Its
/// files are found relative to the configuration file.
#[test]
fn check_refuses_a_key_that_is_not_the_certificate_s() {
    let dir = TempDir::new("mtls-pair");
    let pki = ca();
    let (cert, key, _) = leaf(&pki, &["127.0.0.1"]);
    let (_, other_key, _) = leaf(&pki, &["127.0.0.1"]);
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let cert_file = dir.0.join("server.pem");
    std::fs::write(&cert_file, cert).unwrap();
    let config = dir.0.join("config.yaml");
    let write = |key_pem: &str| {
        let key_file = dir.0.join("server.key");
        std::fs::write(&key_file, key_pem).unwrap();
        std::fs::write(
            &config,
            "listen: 127.0.0.1:1\npublic_base_url: https://gw.example/fhir\nupstream:\n  url: http://127.0.0.1:2/fhir\n\
                 issuers:\n  - name: a\n    issuer: https://as.example\n    jwks_uri: https://as.example/jwks\n    audiences: [x]\n\
                 admin:\n  listen: 127.0.0.1:3\n\
                 tls:\n  cert_file: server.pem\n  key_file: server.key\n  client_ca_file: ca.pem\n  client_auth: require\n",
        )
        .unwrap();
    };
    // Named relative to the configuration file (the test runs elsewhere).
    write(&key);
    let (ok, text) = support::check(&config);
    assert!(ok, "the matching pair: {text}");
    // A revocation list beside the client CAs is refused, not dropped:
    // revocation is not checked.
    std::fs::write(
        &ca_file,
        format!(
            "{}-----BEGIN X509 CRL-----\nMIIB\n-----END X509 CRL-----\n",
            pki.ca_pem
        ),
    )
    .unwrap();
    let (ok, text) = support::check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("tls.client_ca_file") && text.contains("revocation"),
        "{text}"
    );
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    for (what, bad) in [
        ("another key", other_key.as_str()),
        (
            "a key that is not one",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ),
    ] {
        write(bad);
        let (ok, text) = support::check(&config);
        assert!(!ok, "{what}: {text}");
        assert!(text.contains("tls.key_file"), "{what}: {text}");
    }
}
