//! `fhirwall demo`: a self-contained sandbox in one process — a synthetic
//! FHIR upstream, a local issuer and the real gateway in front — that
//! prints ready-to-paste requests showing an allow, a 401 and a 403.

use std::sync::mpsc;

use crate::sandbox::fhir::FhirSandbox;
use crate::sandbox::issuer::{Mint, SandboxIssuer};
use crate::sandbox::keys::KeyKind;

/// Starts the sandbox servers on a background runtime, then runs the gateway.
pub fn run(listen: &str, admin: &str) -> Result<(), String> {
    let base = format!("http://{listen}/fhir");
    let (tx, rx) = mpsc::channel();
    let audience = base.clone();
    std::thread::Builder::new()
        .name("fhirwall-sandbox".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("sandbox runtime");
            rt.block_on(async move {
                let (fhir, upstream) = FhirSandbox::spawn("/r4").await;
                fhir.forget_requests();
                let issuer = SandboxIssuer::spawn(&audience, KeyKind::P256, "sandbox-key-1").await;
                tx.send((upstream, issuer)).expect("demo main thread waits");
                std::future::pending::<()>().await;
            });
        })
        .map_err(|e| format!("cannot start the sandbox thread: {e}"))?;
    let (upstream, issuer) = rx
        .recv()
        .map_err(|_| "sandbox servers did not start".to_string())?;

    let yaml = format!(
        r#"
listen: {listen}
public_base_url: {base}
upstream:
  url: http://{upstream}/r4
issuers:
  - name: sandbox
    issuer: {iss}
    discovery: true
    audiences: [{base}]
    algorithms: [ES256]
admin:
  listen: {admin}
server:
  threads: 2
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
"#,
        iss = issuer.issuer
    );
    let config = crate::config::Config::parse(&yaml).map_err(|e| format!("demo config: {e}"))?;
    let settings = config.validate().map_err(|p| {
        format!(
            "demo config: {}",
            p.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;

    let patient_token = issuer.mint(&Mint {
        scope: "openid fhirUser launch/patient patient/*.rs".into(),
        patient: Some("p1".into()),
        sub: "patient-user-p1".into(),
        client_id: "demo-patient-app".into(),
        lifetime_seconds: 3600,
    });
    let clinician_token = issuer.mint(&Mint {
        scope: "openid fhirUser user/Observation.rs user/Patient.rs".into(),
        patient: None,
        sub: "practitioner-1".into(),
        client_id: "demo-clinician-app".into(),
        lifetime_seconds: 3600,
    });
    println!(
        r#"
================================================================================
 fhirwall demo — a SANDBOX. The issuer below mints tokens for anyone; the
 FHIR server holds synthetic patients p1 (Alice), p2 (Bob), p3 (Carol).
 Nothing here is for real data.
================================================================================
 gateway      {base}
 admin        http://{admin}/metrics  /healthz  /readyz
 upstream     http://{upstream}/r4  (synthetic FHIR server, no auth)
 issuer       {iss}  (JWKS at /jwks.json)

 Patient app token (patient/*.rs, patient = p1):
   export PT='{patient_token}'
 Clinician app token (user/Observation.rs user/Patient.rs):
   export CT='{clinician_token}'

 200 — the patient reads their own record:
   curl -i {base}/Patient/p1 -H "Authorization: Bearer $PT"
 200 — the patient searches their own compartment:
   curl -i {base}/Patient/p1/Observation -H "Authorization: Bearer $PT"
 401 — no token:
   curl -i {base}/Patient/p1
 401 — a tampered token:
   curl -i {base}/Patient/p1 -H "Authorization: Bearer ${{PT}}x"
 403 — the patient reads another patient:
   curl -i {base}/Patient/p2 -H "Authorization: Bearer $PT"
 404 — the patient reads another patient's Observation (the answer is checked, then withheld):
   curl -i {base}/Observation/obs-p2-0 -H "Authorization: Bearer $PT"
 200 — the patient searches without naming themselves (narrowed to p1):
   curl -i '{base}/Observation?code=8867-4' -H "Authorization: Bearer $PT"
 403 — the clinician reads Conditions (no Condition scope):
   curl -i {base}/Condition/cond-p1 -H "Authorization: Bearer $CT"
 200 — the clinician searches Observations:
   curl -i '{base}/Observation?code=8867-4' -H "Authorization: Bearer $CT"
 Mint your own:
   curl '{iss}/token?scope=user/*.rs&patient=p2'

 Audit records (JSON lines) follow on stdout; logs on stderr. Ctrl-C stops.
================================================================================
"#,
        iss = issuer.issuer
    );
    crate::server::run(settings, None, None)
}
