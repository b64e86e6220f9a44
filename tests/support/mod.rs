//! Test support: starts the real `fhirwall` binary on loopback in front of
//! an in-process sandbox FHIR upstream and sandbox issuer, and talks to it
//! over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod dpop;

use fhirwall::sandbox::fhir::FhirSandbox;
use fhirwall::sandbox::issuer::{Mint, SandboxIssuer};
use fhirwall::sandbox::keys::KeyKind;

/// An upstream on 127.0.0.1 that reads each connection's first request
/// and writes `answer(request head)` as raw bytes (a broken or unusual
/// server), then keeps the connection open, silent, for `hold`.
#[allow(dead_code)]
pub async fn raw_upstream(
    answer: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    hold: std::time::Duration,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let _ = c
                    .write_all(&answer(&String::from_utf8_lossy(&buf[..n])))
                    .await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    (addr, task)
}

/// A free loopback port for a gateway listener, which must be named in its
/// config before it binds. Taken below the kernel's ephemeral range
/// (32768+ on Linux), where the in-process sandboxes' `127.0.0.1:0` binds
/// and outgoing connections never land, so a port released here cannot be
/// handed to a concurrent test before the gateway binds it. Each test
/// binary (one process) walks its own stretch, seeded by its pid.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id() % 500 * 24;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (seed + n) % 12000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// Runs the `fhirwall` binary with `args`: whether it succeeded, and its
/// stdout and stderr together.
pub fn run_bin(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `fhirwall check --config <config>`.
pub fn check(config: &std::path::Path) -> (bool, String) {
    run_bin(&["check", "--config", config.to_str().unwrap()])
}

/// Extra YAML and knobs for one gateway.
#[derive(Clone)]
pub struct Options {
    /// Replaces the default `upstream.url` (e.g. a closed port).
    pub upstream_url: Option<String>,
    pub read_timeout_ms: u64,
    pub min_refetch_interval_seconds: u64,
    pub leeway_seconds: u64,
    /// Use discovery instead of jwks_uri.
    pub discovery: bool,
    /// Appended to the config as top-level YAML.
    pub extra_yaml: String,
    /// Appended under `upstream:` (each line indented by two spaces).
    pub upstream_yaml: String,
    /// Appended under `server:` (each line indented by two spaces).
    pub server_yaml: String,
    /// Appended under `jwks:` (each line indented by two spaces).
    pub jwks_yaml: String,
    /// Extra lines for the issuer entry (indented four spaces).
    pub issuer_yaml: String,
    /// A `tls:` section: the proxy listens with TLS and the base is https.
    pub tls_yaml: String,
    /// Replaces the issuer's `jwks_uri`.
    pub jwks_uri: Option<String>,
    /// Wait for `/readyz` (else only for `/healthz`).
    pub expect_ready: bool,
    /// Replaces the `audit:` section's lines (indented two spaces); the
    /// default is `sink: file` with `path:` the gateway's `audit_path`.
    pub audit_yaml: Option<String>,
    /// Start a replica: this public base URL and issuer (another
    /// gateway's), behind which this one listens on its own port.
    pub replica_of: Option<(String, Arc<SandboxIssuer>)>,
    /// Shell commands run before the gateway in a mount namespace of its
    /// own (`unshare --user --map-root-user --mount`), e.g. to mount a
    /// small tmpfs; the test reaches its files through
    /// [`Gateway::own_path`].
    pub namespace_setup: Option<String>,
    /// `RUST_LOG` for the gateway (default `warn`).
    pub rust_log: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            upstream_url: None,
            read_timeout_ms: 5_000,
            min_refetch_interval_seconds: 30,
            leeway_seconds: 0,
            discovery: false,
            extra_yaml: String::new(),
            upstream_yaml: String::new(),
            server_yaml: String::new(),
            jwks_yaml: String::new(),
            issuer_yaml: String::new(),
            tls_yaml: String::new(),
            jwks_uri: None,
            expect_ready: true,
            audit_yaml: None,
            replica_of: None,
            namespace_setup: None,
            rust_log: None,
        }
    }
}

pub struct Gateway {
    pub base: String,
    pub admin: String,
    pub upstream: Arc<FhirSandbox>,
    /// Where the upstream listens.
    pub upstream_addr: SocketAddr,
    pub issuer: Arc<SandboxIssuer>,
    pub audit_path: PathBuf,
    pub client: reqwest::Client,
    /// The gateway's temporary directory (config, audit file, stderr).
    pub dir: PathBuf,
    config: PathBuf,
    namespace_setup: Option<String>,
    rust_log: String,
    child: Child,
    _dir: TempDir,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "fhirwall-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seconds an answer's `Retry-After` asks for.
pub fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// The value of one series in a metrics text (`name{labels}` as printed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
        .parse()
        .unwrap()
}

/// Runs `fhirwall run --config <config>`, its stderr appended to
/// `<dir>/stderr.log`; after `setup` in a mount namespace of its own if
/// given (the child's pid is then the gateway's: `sh` execs it).
fn spawn_gateway(
    config: &std::path::Path,
    dir: &std::path::Path,
    setup: Option<&str>,
    rust_log: &str,
) -> Child {
    let append = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .unwrap()
    };
    let mut cmd = match setup {
        None => Command::new(bin()),
        Some(setup) => {
            let mut c = Command::new("unshare");
            c.args(["--user", "--map-root-user", "--mount", "sh", "-c"])
                .arg(format!("set -e; {setup}; exec \"$0\" \"$@\""))
                .arg(bin());
            c
        }
    };
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        // stdout is where `audit.sink: stdout` writes.
        .stdout(Stdio::from(append("stdout.log")))
        .stderr(Stdio::from(append("stderr.log")))
        .spawn()
        .expect("start fhirwall")
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fhirwall")
}

impl Gateway {
    /// Starts upstream, issuer (RSA key `k1`) and the gateway; waits until ready.
    pub async fn start(opts: Options) -> Gateway {
        let (upstream, up_addr) = FhirSandbox::spawn("/r4").await;
        Gateway::start_with(opts, upstream, up_addr).await
    }

    /// Like [`Gateway::start`] with an upstream the caller started.
    pub async fn start_with(
        opts: Options,
        upstream: Arc<FhirSandbox>,
        up_addr: SocketAddr,
    ) -> Gateway {
        let port = free_port();
        let admin_port = free_port();
        let scheme = if opts.tls_yaml.is_empty() {
            "http"
        } else {
            "https"
        };
        // The URL this gateway is reached at, and the public one its
        // config names (another's, for a replica behind one balancer).
        let own = format!("{scheme}://127.0.0.1:{port}/fhir");
        let (base, issuer) = match &opts.replica_of {
            Some((public, issuer)) => (public.clone(), issuer.clone()),
            None => (
                own.clone(),
                SandboxIssuer::spawn(&own, KeyKind::Rsa2048, "k1").await,
            ),
        };
        let dir = TempDir::new("gw");
        let audit_path = dir.0.join("audit.jsonl");
        let jwks = match (&opts.jwks_uri, opts.discovery) {
            (Some(uri), _) => format!("jwks_uri: {uri}"),
            (None, true) => "discovery: true".to_string(),
            (None, false) => format!("jwks_uri: {}/jwks.json", issuer.issuer),
        };
        let upstream_url = opts
            .upstream_url
            .clone()
            .unwrap_or(format!("http://{up_addr}/r4"));
        let yaml = format!(
            "listen: 127.0.0.1:{port}\n\
             public_base_url: {base}\n\
             upstream:\n  url: {upstream_url}\n  connect_timeout_ms: 1000\n  read_timeout_ms: {rt}\n{up_extra}\
             issuers:\n  - name: test\n    issuer: {iss}\n    {jwks}\n    audiences: [{base}]\n    algorithms: [RS256, ES256]\n    leeway_seconds: {lw}\n{iss_extra}\
             jwks:\n  min_refetch_interval_seconds: {mri}\n{jwks_extra}\
             admin:\n  listen: 127.0.0.1:{admin_port}\n\
             audit:\n{audit}\
             server:\n{threads}{shutdown}{server_extra}{tls}{extra}",
            // Two workers unless the test sets its own.
            threads = if opts.server_yaml.contains("threads:") {
                ""
            } else {
                "  threads: 2\n"
            },
            // A quick shutdown unless the test sets its own.
            shutdown = if opts.server_yaml.contains("grace_period_seconds:") {
                ""
            } else {
                "  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n"
            },
            rt = opts.read_timeout_ms,
            iss = issuer.issuer,
            lw = opts.leeway_seconds,
            mri = opts.min_refetch_interval_seconds,
            audit = opts.audit_yaml.clone().unwrap_or(format!(
                "  sink: file\n  path: {}\n",
                audit_path.display()
            )),
            extra = opts.extra_yaml,
            up_extra = opts.upstream_yaml,
            server_extra = opts.server_yaml,
            jwks_extra = opts.jwks_yaml,
            iss_extra = opts.issuer_yaml,
            tls = opts.tls_yaml,
        );
        let config = dir.0.join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let rust_log = opts.rust_log.clone().unwrap_or_else(|| "warn".into());
        let child = spawn_gateway(&config, &dir.0, opts.namespace_setup.as_deref(), &rust_log);
        let gw = Gateway {
            dir: dir.0.clone(),
            config,
            namespace_setup: opts.namespace_setup.clone(),
            rust_log,
            base: own,
            admin: format!("http://127.0.0.1:{admin_port}"),
            upstream,
            upstream_addr: up_addr,
            issuer,
            audit_path,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            child,
            _dir: dir,
        };
        gw.wait_for(if opts.expect_ready {
            "readyz"
        } else {
            "healthz"
        })
        .await;
        gw
    }

    /// A replica of this gateway: the same upstream, issuer and public URL,
    /// its own port (its `base`) and `opts`.
    pub async fn replica(&self, opts: Options) -> Gateway {
        let opts = Options {
            replica_of: Some((self.base.clone(), self.issuer.clone())),
            ..opts
        };
        Gateway::start_with(opts, self.upstream.clone(), self.upstream_addr).await
    }

    /// Kills the gateway process with SIGKILL (no shutdown of any kind).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (graceful shutdown) and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_term();
        self.child.wait().unwrap()
    }

    /// Sends SIGTERM and returns at once (the shutdown is under way).
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `INT`, …) and returns at once.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// The process's exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `secs` for the process to exit; its status.
    pub async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fhirwall still running after {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the gateway again with the same configuration (after
    /// [`Gateway::kill`]) and waits until it is ready.
    pub async fn restart(&mut self) {
        self.child = spawn_gateway(
            &self.config,
            &self.dir,
            self.namespace_setup.as_deref(),
            &self.rust_log,
        );
        self.wait_for("readyz").await;
    }

    /// Waits until the admin listener answers `probe` with 200 and the
    /// proxy listener accepts connections (Pingora starts its services
    /// independently).
    async fn wait_for(&self, probe: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let url = format!("{}/{probe}", self.admin);
            if let Ok(r) = self.client.get(url).send().await {
                if r.status() == 200
                    && tokio::net::TcpStream::connect(self.proxy_addr())
                        .await
                        .is_ok()
                {
                    return;
                }
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "gateway did not answer /{probe} with 200 in 30 s; the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn mint(&self, scope: &str, patient: Option<&str>) -> String {
        self.issuer.mint(&Mint {
            scope: scope.into(),
            patient: patient.map(str::to_string),
            sub: "user-1".into(),
            client_id: "test-app".into(),
            lifetime_seconds: 600,
        })
    }

    /// Standard claims of this issuer, for tests that tamper with them.
    pub fn claims(&self, scope: &str) -> serde_json::Value {
        self.issuer.claims(&Mint {
            scope: scope.into(),
            patient: None,
            sub: "user-1".into(),
            client_id: "test-app".into(),
            lifetime_seconds: 600,
        })
    }

    pub async fn get(&self, rel: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.get(format!("{}/{rel}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap()
    }

    /// `n` searches `Observation?code=<prefix>-<i>` with `token`, each
    /// served (200): a rate limit's budget spent.
    pub async fn searches_served(&self, token: &str, prefix: &str, n: usize) {
        for i in 0..n {
            let r = self
                .get(&format!("Observation?code={prefix}-{i}"), Some(token))
                .await;
            assert_eq!(r.status(), 200, "request {prefix}-{i}");
        }
    }

    /// Creates an Observation under `user/Observation.c` (the sandbox
    /// answers 201 with a `Location`, and a session cookie).
    #[allow(dead_code)]
    pub async fn create_observation(&self) -> reqwest::Response {
        let writer = self.mint("user/Observation.c", None);
        self.send(
            "POST",
            "Observation",
            &writer,
            "application/fhir+json",
            r#"{"resourceType":"Observation","status":"final","code":{"text":"loc"}}"#,
        )
        .await
    }

    /// Sends `method` to `rel` under the base with a bearer token, a
    /// Content-Type and a body.
    pub async fn send(
        &self,
        method: &str,
        rel: &str,
        token: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .request(method.parse().unwrap(), format!("{}/{rel}", self.base))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// The gateway's stderr once it contains `needle`: waits up to 5 s.
    pub async fn stderr_containing(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
            if log.contains(needle) {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "'{needle}' not logged: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The audit file's whole lines, parsed (a line still being written,
    /// without its newline yet, is left out).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// The audit file's text once it contains `needle` (records are written
    /// by a batching writer thread, just after the answer): waits up to 5 s.
    pub fn audit_containing(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
            if text.contains(needle) || Instant::now() >= deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The audit record of a request id (its `request` record, not the
    /// decision record written before it went upstream).
    pub fn audit_for(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = self
                .audit()
                .into_iter()
                .find(|r| r["request_id"] == request_id && r["event"] == "request")
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {request_id}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `POST` of FHIR JSON `body` (a batch or transaction) to the base with
    /// `token`, to be sent.
    pub fn post_bundle(
        &self,
        token: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.client
            .post(self.base.clone())
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(body)
    }

    /// POSTs a batch of one `GET url` entry.
    #[allow(dead_code)]
    pub async fn batch_get(&self, token: &str, url: &str) -> reqwest::Response {
        let batch = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": url}}
        ]});
        self.post_bundle(token, batch.to_string())
            .send()
            .await
            .unwrap()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.admin_get("metrics").await.text().await.unwrap()
    }

    /// Waits (up to 5 s) until the metrics' `series` reads `value`.
    pub async fn until_metric(&self, series: &str, value: f64) {
        for _ in 0..50 {
            if metric(&self.metrics().await, series) == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{series} never was {value}");
    }

    /// Waits (up to 10 s) until `/readyz` answers `status`; `why` names
    /// the moment in the failure.
    pub async fn until_readyz(&self, status: u16, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.readyz().await != status {
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {status}: {why}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The status of the admin listener's `/readyz`.
    pub async fn readyz(&self) -> u16 {
        self.admin_get("readyz").await.status().as_u16()
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/{path}", self.admin))
            .send()
            .await
            .unwrap()
    }

    /// The gateway process's id (to send it signals).
    /// The gateway's config file (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// `path` as the gateway process sees it (in its own mount namespace
    /// with [`Options::namespace_setup`]).
    pub fn own_path(&self, path: &std::path::Path) -> PathBuf {
        let rel = path.strip_prefix("/").expect("an absolute path");
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.base
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Sends raw bytes as one HTTP/1.1 request (for paths a client library
/// would normalise) and returns the status code and the whole response.
pub fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head.lines().find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    });
                    if len.is_some_and(|l| body.len() >= l) {
                        break;
                    }
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}
