//! Shared state in a real Redis: `redis-server` started here on loopback,
//! two real fhirwall replicas behind one public URL, each refusing what
//! the other has seen. Needs `redis-server` (or `FHIRWALL_REDIS_SERVER`);
//! runs with `cargo test --features redis-tests --test redis` (.ci/run
//! installs it). Redis being absent, silent or never there is tested
//! without it, in `tests/shared_state.rs`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::dpop::{bound_token, send, Client};
use support::{free_port, Gateway, Options, TempDir};

/// A `redis-server` on 127.0.0.1, stopped when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// Extra `redis-server` arguments (users, passwords).
    args: Vec<String>,
}

fn redis_server_binary() -> String {
    let bin = std::env::var("FHIRWALL_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    let found = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "'{bin}' cannot be run: these tests need a Redis server (apt-get install redis-server, \
         or set FHIRWALL_REDIS_SERVER to one); .ci/run installs it"
    );
    bin
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    fn start_with(args: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir: TempDir::new("redis"),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    /// Starts the server (again) on its port, and waits until it answers.
    fn restart(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .args(["--dir", &self.dir.0.display().to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 7];
        // Up, whether or not it wants a login first.
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The `redis:` section for gateways sharing this server.
    fn yaml(&self, extra: &str) -> String {
        format!(
            "redis:\n  url: redis://127.0.0.1:{}/0\n  timeout_ms: 500\n{extra}",
            self.port
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two replicas (one upstream, one issuer, one public URL) sharing `redis`.
async fn replicas(redis: &RedisServer, extra_yaml: &str) -> (Gateway, Gateway) {
    let opts = Options {
        extra_yaml: format!("{}{extra_yaml}", redis.yaml("")),
        ..Options::default()
    };
    let a = Gateway::start(opts.clone()).await;
    let b = a.replica(opts).await;
    (a, b)
}

/// The value of the metric line starting with `name` (labels included).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in metrics"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_replayed_at_another_replica_is_refused() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis, "").await;
    let client = Client::new(fhirwall::sandbox::keys::KeyKind::P256, "ec-client");
    let token = bound_token(&a, &client.jkt);
    // The URL both replicas are reached at (behind the balancer).
    let url = format!("{}/Patient/p1", a.base);
    let proof = client.proof("GET", &url, &token);
    let (s, www, body) = send(&a, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 200, "{www} {body}");
    let before = a.upstream.seen().len();
    let (s, www, _) = send(&b, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 401, "the other replica took a replayed proof");
    assert!(
        www.contains("invalid_dpop_proof") && www.contains("already used"),
        "{www}"
    );
    assert_eq!(
        a.upstream.seen().len(),
        before,
        "a replay reached the upstream"
    );
    let audit = b.audit_containing("\"reason\":\"dpop_replayed\"");
    assert!(audit.contains("dpop_replayed"), "{audit}");
    // A fresh proof passes at either.
    let fresh = client.proof("GET", &url, &token);
    let (s, _, _) = send(&b, "Patient/p1", "DPoP", &token, &[&fresh]).await;
    assert_eq!(s, 200);
    let m = b.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 1.0, "{m}");
    assert!(metric(&m, "fhirwall_redis_commands_total{outcome=\"ok\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_counted_across_replicas() {
    let redis = RedisServer::start();
    let dir = TempDir::new("redis-policies");
    std::fs::write(
        dir.0.join("10-limits.yaml"),
        "rules:\n  - name: three-searches-a-minute\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 3, per_seconds: 60}\n",
    )
    .unwrap();
    let (a, b) = replicas(&redis, &format!("policies:\n  dir: {}\n", dir.0.display())).await;
    let token = a.mint("user/*.rs", None);
    for (i, gw) in [&a, &b, &a].into_iter().enumerate() {
        let r = gw
            .get(&format!("Observation?code=shared-{i}"), Some(&token))
            .await;
        assert_eq!(r.status(), 200, "request {i}");
    }
    let r = b.get("Observation?code=shared-over", Some(&token)).await;
    assert_eq!(r.status(), 429, "the fourth search, at the other replica");
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    assert_eq!(a.upstream.count_containing("shared-over"), 0);
    // Another client has its own bucket, in Redis too.
    let mut c = a.claims("user/*.rs");
    c["client_id"] = serde_json::json!("another-app");
    let other = a.issuer.signing_key().sign(&c);
    assert_eq!(
        b.get("Observation?code=other", Some(&other)).await.status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_what_needs_it_is_refused_until_it_is_back() {
    let mut redis = RedisServer::start();
    let dir = TempDir::new("redis-down-policies");
    std::fs::write(
        dir.0.join("10-limits.yaml"),
        "rules:\n  - name: searches-limited\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 100, per_seconds: 60}\n",
    )
    .unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: format!("{}policies:\n  dir: {}\n", redis.yaml(""), dir.0.display()),
        ..Options::default()
    })
    .await;
    let client = Client::new(fhirwall::sandbox::keys::KeyKind::P256, "ec-client");
    let token = bound_token(&gw, &client.jkt);
    let url = format!("{}/Patient/p1", gw.base);
    let (s, _, _) = send(
        &gw,
        "Patient/p1",
        "DPoP",
        &token,
        &[&client.proof("GET", &url, &token)],
    )
    .await;
    assert_eq!(s, 200);

    redis.stop();
    let before = gw.upstream.seen().len();
    let (s, _, body) = send(
        &gw,
        "Patient/p1",
        "DPoP",
        &token,
        &[&client.proof("GET", &url, &token)],
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert!(
        body.contains("replay check") && body.contains("Redis"),
        "{body}"
    );
    let bearer = gw.mint("user/*.rs", None);
    let r = gw.get("Observation?code=limited", Some(&bearer)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    assert!(body.contains("searches-limited"), "{body}");
    assert_eq!(
        gw.upstream.seen().len(),
        before,
        "a request reached the upstream"
    );
    // What needs no shared state still passes.
    assert_eq!(gw.get("Patient/p1", Some(&bearer)).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.readyz().await != 503 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 200 without Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = gw.admin_get("readyz").await.text().await.unwrap();
    assert!(why.contains("Redis at redis://127.0.0.1"), "{why}");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 0.0);
    for reason in ["dpop_replay_check_unavailable", "rate_limit_unavailable"] {
        assert!(
            gw.audit_containing(&format!("\"reason\":\"{reason}\""))
                .contains(reason),
            "{reason} not audited"
        );
    }

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.readyz().await != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 503 with Redis back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, body) = send(
        &gw,
        "Patient/p1",
        "DPoP",
        &token,
        &[&client.proof("GET", &url, &token)],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        gw.get("Observation?code=back", Some(&bearer))
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_the_prefix_is_enough_and_a_wrong_password_is_not() {
    // The least a replica needs: its own keys, scripts, no dangerous commands.
    let redis = RedisServer::start_with(&[
        "--user",
        "default",
        "off",
        "--user",
        "fhirwall",
        "on",
        ">s3cret-pw",
        "~fhirwall:*",
        "+@all",
        "-@dangerous",
    ]);
    let dir = TempDir::new("redis-auth");
    std::fs::write(dir.0.join("good.pw"), "s3cret-pw\n").unwrap();
    std::fs::write(dir.0.join("bad.pw"), "guess\n").unwrap();
    let with = |file: &str, ready: bool| Options {
        extra_yaml: redis.yaml(&format!(
            "  username: fhirwall\n  password_file: {}\n",
            dir.0.join(file).display()
        )),
        expect_ready: ready,
        ..Options::default()
    };
    let gw = Gateway::start(with("good.pw", true)).await;
    let client = Client::new(fhirwall::sandbox::keys::KeyKind::P256, "ec-client");
    let token = bound_token(&gw, &client.jkt);
    let url = format!("{}/Patient/p1", gw.base);
    let proof = client.proof("GET", &url, &token);
    let (s, _, body) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = send(&gw, "Patient/p1", "DPoP", &token, &[&proof]).await;
    assert_eq!(s, 401);

    let refused = Gateway::start(with("bad.pw", false)).await;
    let token = bound_token(&refused, &client.jkt);
    let url = format!("{}/Patient/p1", refused.base);
    let (s, _, body) = send(
        &refused,
        "Patient/p1",
        "DPoP",
        &token,
        &[&client.proof("GET", &url, &token)],
    )
    .await;
    assert_eq!(s, 503, "{body}");
    assert!(refused.upstream.seen().is_empty());
    assert_eq!(refused.readyz().await, 503);
    // The log says why, without the password.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(refused.dir.join("stderr.log")).unwrap_or_default();
        if log.contains("Redis command failed") {
            assert!(!log.contains("guess"), "the password is logged");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log of the refused login: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
