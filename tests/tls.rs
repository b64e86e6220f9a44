//! Real TLS with a CA and server certificate generated here: an https
//! upstream (the sandbox FHIR server behind a TLS relay on loopback) and an
//! issuer whose JWKS is served over https.

mod support;

use std::sync::Arc;

use fhirwall::sandbox::fhir::FhirSandbox;
use fhirwall::sandbox::issuer::SandboxIssuer;
use fhirwall::sandbox::keys::KeyKind;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::{Gateway, Options, TempDir};
use tokio::net::{TcpListener, TcpStream};

struct Pki {
    ca_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    }
}

/// Terminates TLS on a free port and relays bytes to `plain`.
async fn tls_relay(pki: &Pki, plain: String) -> u16 {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert_der.clone().into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let plain = plain.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    if let Ok(mut up) = TcpStream::connect(plain).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    }
                }
            });
        }
    });
    port
}

/// A gateway in front of the sandbox behind a TLS relay; `trust_ca` puts
/// the generated CA in `upstream.ca_file`. Returns the gateway and the port.
async fn gateway_over_tls(trust_ca: bool) -> (Gateway, u16, TempDir) {
    let pki = pki();
    let dir = TempDir::new("tls");
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (upstream, plain) = FhirSandbox::spawn("/r4").await;
    let port = tls_relay(&pki, plain.to_string()).await;
    let upstream_yaml = if trust_ca {
        format!("  ca_file: {}\n", ca_file.display())
    } else {
        String::new()
    };
    let opts = Options {
        upstream_url: Some(format!("https://localhost:{port}/r4")),
        upstream_yaml,
        ..Options::default()
    };
    (Gateway::start_with(opts, upstream, plain).await, port, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_configured_ca() {
    let (gw, port, _dir) = gateway_over_tls(true).await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/p2", Some(&token)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["id"], "p2");
    let seen = gw.upstream.seen();
    let s = seen
        .iter()
        .find(|s| s.uri == "/r4/Patient/p2")
        .expect("reached the upstream over TLS");
    assert!(s
        .headers
        .iter()
        .any(|(k, v)| k == "host" && v == &format!("localhost:{port}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_untrusted_certificate_is_502() {
    let (gw, _port, _dir) = gateway_over_tls(false).await;
    let token = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/untrusted-1", Some(&token)).await;
    assert_eq!(r.status(), 502);
    assert_eq!(
        gw.upstream.count_containing("untrusted-1"),
        0,
        "nothing sent over an unverified connection"
    );
}

/// `upstream.ca_file` is the upstream's whole trust on every path: an
/// upstream whose CA the system trusts (`SSL_CERT_FILE` here) but the file
/// does not is refused by the proxied path (a `user/` read) and by
/// fhirwall's own client (a `patient/` read, whose answer it checks) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_ca_file_replaces_the_systems_cas_on_every_path() {
    let pki = pki();
    let other = self::pki();
    let dir = TempDir::new("tls-only");
    let system_ca = dir.0.join("system-ca.pem");
    std::fs::write(&system_ca, &pki.ca_pem).unwrap();
    let ca_file = dir.0.join("other-ca.pem");
    std::fs::write(&ca_file, &other.ca_pem).unwrap();
    let (upstream, plain) = FhirSandbox::spawn("/r4").await;
    let port = tls_relay(&pki, plain.to_string()).await;
    let opts = Options {
        upstream_url: Some(format!("https://localhost:{port}/r4")),
        upstream_yaml: format!("  ca_file: {}\n", ca_file.display()),
        namespace_setup: Some(format!("export SSL_CERT_FILE={}", system_ca.display())),
        ..Options::default()
    };
    let gw = Gateway::start_with(opts, upstream, plain).await;
    let user = gw.mint("user/*.rs", None);
    let r = gw.get("Patient/only-user-1", Some(&user)).await;
    assert_eq!(r.status(), 502);
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let r = gw.get("Observation/obs-p1-0", Some(&p1)).await;
    assert_eq!(r.status(), 502, "{}", r.text().await.unwrap());
    assert_eq!(
        gw.upstream.seen().len(),
        0,
        "nothing sent over TLS the file does not trust"
    );
}

/// The JWKS over https: trusted through `jwks.ca_file`, the gateway gets
/// ready and verifies tokens with the keys fetched over TLS; without it, it
/// never becomes ready and tokens get 503, never an allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_over_https_needs_a_trusted_ca() {
    let pki = pki();
    let dir = TempDir::new("jwks-tls");
    let ca_file = dir.0.join("idp-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (upstream, plain) = FhirSandbox::spawn("/r4").await;
    // The key server behind TLS; tokens carry the harness issuer's iss and
    // aud but are signed with this server's key.
    let idp = SandboxIssuer::spawn("unused", KeyKind::P256, "k-tls").await;
    let port = tls_relay(&pki, idp.issuer.trim_start_matches("http://").to_string()).await;

    for trusted in [true, false] {
        let opts = Options {
            jwks_uri: Some(format!("https://localhost:{port}/jwks.json")),
            jwks_yaml: if trusted {
                format!("  ca_file: {}\n", ca_file.display())
            } else {
                String::new()
            },
            expect_ready: trusted,
            ..Options::default()
        };
        let gw = Gateway::start_with(opts, upstream.clone(), plain).await;
        let token = idp.signing_key().sign(&gw.claims("user/*.rs"));
        if trusted {
            assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
        } else {
            let r = gw.get("Patient/jwks-untrusted-1", Some(&token)).await;
            assert_eq!(r.status(), 503);
            assert!(r.headers().contains_key("retry-after"));
            let ready = gw
                .client
                .get(format!("{}/readyz", gw.admin))
                .send()
                .await
                .unwrap();
            assert_eq!(ready.status(), 503);
            assert_eq!(upstream.count_containing("jwks-untrusted-1"), 0);
        }
    }
}

/// `SSL_CERT_FILE` and `SSL_CERT_DIR` naming an empty file and directory:
/// what a slim image without the `ca-certificates` package gives the
/// verifier (no CA certificate at all).
fn no_system_cas(dir: &TempDir) -> String {
    let file = dir.0.join("no-cas.pem");
    std::fs::write(&file, "").unwrap();
    let cas = dir.0.join("no-cas");
    std::fs::create_dir_all(&cas).unwrap();
    format!(
        "export SSL_CERT_FILE={} SSL_CERT_DIR={}",
        file.display(),
        cas.display()
    )
}

/// A machine without CA certificates: a gateway whose endpoints are all
/// plain http on loopback starts and serves (it panicked building its
/// HTTPS clients), checked answers included; keys over https are
/// verified against `jwks.ca_file` alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_without_ca_certificates_serves_what_needs_none() {
    let dir = TempDir::new("no-cas");
    let gw = Gateway::start(Options {
        namespace_setup: Some(no_system_cas(&dir)),
        ..Options::default()
    })
    .await;
    let user = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&user)).await.status(), 200);
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let r = gw.get("Observation/obs-p1-0", Some(&p1)).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let pki = pki();
    let ca_file = dir.0.join("idp-ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();
    let (upstream, plain) = FhirSandbox::spawn("/r4").await;
    let idp = SandboxIssuer::spawn("unused", KeyKind::P256, "k-tls").await;
    let port = tls_relay(&pki, idp.issuer.trim_start_matches("http://").to_string()).await;
    let gw = Gateway::start_with(
        Options {
            jwks_uri: Some(format!("https://localhost:{port}/jwks.json")),
            jwks_yaml: format!("  ca_file: {}\n", ca_file.display()),
            namespace_setup: Some(no_system_cas(&dir)),
            ..Options::default()
        },
        upstream,
        plain,
    )
    .await;
    let token = idp.signing_key().sign(&gw.claims("user/*.rs"));
    assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 200);
}

/// On a machine without CA certificates, `check` (and so `run`) names
/// every https endpoint that would have nothing to be verified against,
/// at its key, and says how to give it one; one whose CA is configured
/// passes.
#[test]
fn check_names_https_endpoints_a_machine_without_cas_cannot_verify() {
    let dir = TempDir::new("no-cas-check");
    let file = dir.0.join("no-cas.pem");
    std::fs::write(&file, "").unwrap();
    let cas = dir.0.join("no-cas");
    std::fs::create_dir_all(&cas).unwrap();
    let ca_file = dir.0.join("ca.pem");
    std::fs::write(&ca_file, pki().ca_pem).unwrap();
    let config = dir.0.join("config.yaml");
    let check = |upstream: &str, jwks: &str, extra: &str, system_cas: bool| {
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:1
public_base_url: https://gw.example/fhir
upstream:
  url: {upstream}
issuers:
  - name: a
    issuer: https://a.example
    audiences: [x]
    jwks_uri: https://a.example/jwks
  - name: b
    issuer: https://b.example
    audiences: [x]
    discovery: true
    introspection:
      endpoint: https://b.example/introspect
      client_id: gw
      client_secret: s
  - name: c
    issuer: http://127.0.0.1:4
    audiences: [x]
    jwks_uri: http://127.0.0.1:4/jwks
{jwks}admin:
  listen: 127.0.0.1:3
{extra}"
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(support::bin());
        cmd.args(["check", "--config", config.to_str().unwrap()]);
        if !system_cas {
            cmd.env("SSL_CERT_FILE", &file).env("SSL_CERT_DIR", &cas);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let audit = "audit:\n  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: https://audit.example/fhir\n";
    let redis = format!(
        "redis:\n  url: rediss://127.0.0.1:6\n  password_file: {}\n",
        {
            let pw = dir.0.join("redis.pw");
            std::fs::write(&pw, "a-long-enough-redis-password").unwrap();
            pw.display().to_string()
        }
    );
    let extra = format!("{audit}{redis}");
    let (ok, out) = check("https://127.0.0.1:2/fhir", "", &extra, false);
    assert!(!ok, "{out}");
    for key in [
        "issuers[0].jwks_uri",
        "issuers[1].issuer",
        "issuers[1].introspection.endpoint",
        "upstream.url",
        "audit.fhir.endpoint",
        "redis.url",
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(key) && l.contains("no CA certificates")),
            "{key} not named: {out}"
        );
    }
    assert!(
        out.contains("jwks.ca_file") && out.contains("upstream.ca_file"),
        "{out}"
    );
    assert!(
        !out.contains("issuers[2]"),
        "plain http on loopback needs none: {out}"
    );
    // The same configuration on a machine with CAs passes.
    let (ok, out) = check("https://127.0.0.1:2/fhir", "", &extra, true);
    assert!(ok, "{out}");
    // CAs configured, plain http: nothing to say.
    let jwks = format!("jwks:\n  ca_file: {}\n", ca_file.display());
    let upstream = format!("https://127.0.0.1:2/fhir\n  ca_file: {}", ca_file.display());
    let (ok, out) = check(&upstream, &jwks, "", false);
    assert!(ok, "{out}");
    let (ok, out) = check("http://127.0.0.1:2/fhir", "", "", false);
    assert!(
        !ok && out.contains("issuers[0].jwks_uri") && !out.contains("upstream"),
        "{out}"
    );
}
