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

use support::dpop::Caller;
use support::{free_port, metric, Gateway, Options, TempDir};

/// A `redis-server` on 127.0.0.1, stopped when dropped.
struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// Extra `redis-server` arguments (users, passwords, TLS).
    args: Vec<String>,
    /// Listens with TLS only (on `port`).
    tls: bool,
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

    /// A server that speaks TLS only, with `pki`'s server certificate,
    /// asking clients for certificates of its CA.
    fn start_tls(pki: &Pki) -> RedisServer {
        let dir = TempDir::new("redis-tls");
        let file = |name: &str, text: &str| {
            let p = dir.0.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let args = [
            "--tls-cert-file".to_string(),
            file("server.crt", &pki.server_cert),
            "--tls-key-file".to_string(),
            file("server.key", &pki.server_key),
            "--tls-ca-cert-file".to_string(),
            file("ca.crt", &pki.ca),
        ];
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir,
            args: args.to_vec(),
            tls: true,
        };
        r.restart();
        r
    }

    fn start_with(args: &[&str]) -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir: TempDir::new("redis"),
            args: args.iter().map(|a| a.to_string()).collect(),
            tls: false,
        };
        r.restart();
        r
    }

    /// Starts the server (again) on its port, and waits until it answers.
    fn restart(&mut self) {
        let port = self.port.to_string();
        let ports = match self.tls {
            true => vec!["--port", "0", "--tls-port", &port],
            false => vec!["--port", &port],
        };
        let child = Command::new(redis_server_binary())
            .args(ports)
            .args(["--bind", "127.0.0.1"])
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
        if self.tls {
            // Listening is all a plain client can see.
            return true;
        }
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

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// issued (PEM).
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: a leaf named like its CA looks self-signed to
    // OpenSSL (Redis), which then refuses it.
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fhirwall test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["fhirwall".into()]);
    Pki {
        ca: ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_replayed_at_another_replica_is_refused() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis, "").await;
    // The URL both replicas are reached at (behind the balancer).
    let caller = Caller::new(&a);
    let proof = caller.proof();
    let (s, www, body) = caller.with(&a, &proof).await;
    assert_eq!(s, 200, "{www} {body}");
    let before = a.upstream.seen().len();
    let (s, www, _) = caller.with(&b, &proof).await;
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
    let fresh = caller.proof();
    let (s, _, _) = caller.with(&b, &fresh).await;
    assert_eq!(s, 200);
    let m = b.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 1.0, "{m}");
    assert!(metric(&m, "fhirwall_redis_commands_total{outcome=\"ok\"}") >= 2.0);
}

/// The DPoP proof quotas, a user's and its client's, are counted across
/// replicas: a user over its own is refused at either without spending the
/// client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proof_quotas_are_counted_across_replicas() {
    let redis = RedisServer::start();
    let (a, b) = replicas(
        &redis,
        "dpop:\n  replay_cache_max_entries: 1000\n  max_proofs_per_key: 6\n  max_proofs_per_user: 3\n",
    )
    .await;
    let alice = Caller::of(&a, "shared-app", "alice");
    for gw in [&a, &b, &a] {
        let (s, _, body) = alice.fresh(gw).await;
        assert_eq!(s, 200, "{body}");
    }
    let before = a.upstream.seen().len();
    for gw in [&b, &a] {
        let (s, _, body) = alice.fresh(gw).await;
        assert_eq!(s, 429, "{body}");
        assert!(body.contains("dpop.max_proofs_per_user"), "{body}");
    }
    assert_eq!(
        a.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
    let bob = Caller::of(&a, "shared-app", "bob");
    for gw in [&b, &a, &b] {
        let (s, _, body) = bob.fresh(gw).await;
        assert_eq!(s, 200, "{body}");
    }
    let before = a.upstream.seen().len();
    let (s, _, body) = Caller::of(&a, "shared-app", "carol").fresh(&a).await;
    assert_eq!(s, 429, "{body}");
    assert!(body.contains("dpop.max_proofs_per_key"), "{body}");
    assert_eq!(
        a.upstream.seen().len(),
        before,
        "a refused proof went upstream"
    );
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
    let wait = support::retry_after(&r);
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

/// In Redis too, a request is taken from every limit or none: a user
/// over its own limit (at either replica) spends nothing of its client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_one_limit_spends_none_of_the_others_in_redis() {
    let redis = RedisServer::start();
    let dir = TempDir::new("redis-policies-all");
    std::fs::write(
        dir.0.join("10-limits.yaml"),
        "rules:\n  - name: user-budget\n    effect: require\n    require: {binding: [bearer]}\n    when: {interaction: [search-type]}\n    rate_limit: {per: user, requests: 2, per_seconds: 3600}\n  - name: client-budget\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 4, per_seconds: 3600}\n",
    )
    .unwrap();
    let (a, b) = replicas(&redis, &format!("policies:\n  dir: {}\n", dir.0.display())).await;
    let as_user = |sub: &str| {
        let mut c = a.claims("user/*.rs");
        c["sub"] = serde_json::json!(sub);
        a.issuer.signing_key().sign(&c)
    };
    let (u1, u2, u3) = (as_user("u1"), as_user("u2"), as_user("u3"));
    let mut got = Vec::new();
    for (i, gw) in [&a, &b, &a, &b, &a, &b].into_iter().enumerate() {
        got.push(
            gw.get(&format!("Observation?code=all-u1-{i}"), Some(&u1))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(got, [200, 200, 429, 429, 429, 429]);
    for (i, gw) in [&b, &a].into_iter().enumerate() {
        let r = gw
            .get(&format!("Observation?code=all-u2-{i}"), Some(&u2))
            .await;
        assert_eq!(r.status(), 200, "u2 request {i}");
    }
    let r = b.get("Observation?code=all-u3", Some(&u3)).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("client-budget"));
}

/// A limit tightened by a reload applies to the bucket as it is (its
/// tokens cut to the new capacity), not to a fresh full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tightened_limit_applies_to_the_bucket_as_it_is() {
    let redis = RedisServer::start();
    let dir = TempDir::new("redis-policies-tighten");
    let file = dir.0.join("10-limits.yaml");
    let limit = |n: u32| {
        format!("rules:\n  - name: searches\n    effect: allow\n    when: {{interaction: [search-type]}}\n    rate_limit: {{per: client, requests: {n}, per_seconds: 3600}}\n")
    };
    std::fs::write(&file, limit(5)).unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: format!("{}policies:\n  dir: {}\n", redis.yaml(""), dir.0.display()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/*.rs", None);
    gw.searches_served(&token, "tight", 4).await;
    // One token left; the limit goes down to 3 an hour.
    std::fs::write(&file, limit(3)).unwrap();
    gw.signal("HUP");
    gw.until_metric("fhirwall_reloads_total{result=\"success\"}", 1.0)
        .await;
    let statuses: Vec<u16> = {
        let mut out = Vec::new();
        for i in 4..7 {
            let r = gw
                .get(&format!("Observation?code=tight-{i}"), Some(&token))
                .await;
            out.push(r.status().as_u16());
        }
        out
    };
    assert_eq!(statuses, [200, 429, 429]);
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
    let caller = Caller::new(&gw);
    let (s, _, _) = caller.fresh(&gw).await;
    assert_eq!(s, 200);

    redis.stop();
    let before = gw.upstream.seen().len();
    let (s, _, body) = caller.fresh(&gw).await;
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
    // What needs no shared state still passes, and the replica stays
    // ready: every replica shares this Redis, and all leaving the load
    // balancer together would refuse that too.
    assert_eq!(gw.get("Patient/p1", Some(&bearer)).await.status(), 200);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 0.0);
    assert_eq!(gw.readyz().await, 200);
    assert_eq!(metric(&m, "fhirwall_ready"), 1.0);
    for reason in ["dpop_replay_check_unavailable", "rate_limit_unavailable"] {
        assert!(
            gw.audit_containing(&format!("\"reason\":\"{reason}\""))
                .contains(reason),
            "{reason} not audited"
        );
    }

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw.metrics().await, "fhirwall_redis_up") != 1.0 {
        assert!(Instant::now() < deadline, "Redis never seen back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        gw.get("Observation?code=back", Some(&bearer))
            .await
            .status(),
        200
    );
}

/// Sends one command as `user` (RESP) and returns the first line of the
/// answer.
fn command(port: u16, login: (&str, &str), args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    for cmd in [&["AUTH", login.0, login.1][..], args] {
        out.extend(format!("*{}\r\n", cmd.len()).bytes());
        for a in cmd {
            out.extend(format!("${}\r\n{a}\r\n", a.len()).bytes());
        }
    }
    s.write_all(&out).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    // Two lines: AUTH's answer, then the command's.
    while answer.iter().filter(|b| **b == b'\n').count() < 2 {
        s.read_exact(&mut byte).unwrap();
        answer.push(byte[0]);
    }
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("+OK"), "admin login: {text}");
    text.lines().nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_the_prefix_is_enough_once_it_exists() {
    let redis = RedisServer::start_with(&["--requirepass", "admin-pw"]);
    let admin = ("default", "admin-pw");
    let dir = TempDir::new("redis-auth");
    std::fs::write(dir.0.join("limits.yaml"), "rules:\n  - name: searches-limited\n    effect: allow\n    when: {interaction: [search-type]}\n    rate_limit: {per: client, requests: 2, per_seconds: 60}\n").unwrap();
    std::fs::write(dir.0.join("pw"), "s3cret-pw\n").unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: redis.yaml(&format!(
            "  username: fhirwall\n  password_file: {}\npolicies:\n  dir: {}\n",
            dir.0.join("pw").display(),
            dir.0.display()
        )),
        expect_ready: false,
        ..Options::default()
    })
    .await;
    // The user does not exist yet: no login, nothing that needs Redis passes.
    let caller = Caller::new(&gw);
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert!(gw.upstream.seen().is_empty());
    assert_eq!(gw.readyz().await, 503);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap_or_default();
        if log.contains("Password authentication failed") {
            assert!(!log.contains("s3cret-pw"), "the password is logged");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no log of the refused login: {log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The user fhirwall logs in as, with these permissions on its keys.
    let set_user = |allowed: &[&str]| {
        let mut args = vec![
            "ACL",
            "SETUSER",
            "fhirwall",
            "on",
            ">s3cret-pw",
            "~fhirwall:*",
        ];
        args.extend_from_slice(allowed);
        assert_eq!(command(redis.port, admin, &args), "+OK");
    };
    // Its keys but no scripts (a common least-privilege ACL): a plain
    // write would pass, the checks' scripts do not, so it is not ready.
    set_user(&["+@read", "+@write"]);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(gw.readyz().await, 503, "ready without scripts");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert!(gw.upstream.seen().is_empty());

    // The least a replica needs: its own keys and scripts, nothing
    // dangerous. Once it may, the gateway uses it by itself.
    set_user(&["+@all", "-@dangerous"]);
    gw.until_readyz(200, "after the user was created").await;
    let proof = caller.proof();
    let (s, _, body) = caller.with(&gw, &proof).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = caller.with(&gw, &proof).await;
    assert_eq!(s, 401);
    // The rate-limit script runs under the same user.
    let bearer = gw.mint("user/*.rs", None);
    gw.searches_served(&bearer, "acl", 2).await;
    let r = gw.get("Observation?code=acl-over", Some(&bearer)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(gw.upstream.count_containing("acl-over"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_refuses_what_needs_it_and_says_so() {
    let redis = RedisServer::start_with(&["--requirepass", "admin-pw"]);
    let admin = ("default", "admin-pw");
    let dir = TempDir::new("redis-oom");
    std::fs::write(dir.0.join("pw"), "admin-pw\n").unwrap();
    let gw = Gateway::start(Options {
        extra_yaml: redis.yaml(&format!(
            "  password_file: {}\n",
            dir.0.join("pw").display()
        )),
        ..Options::default()
    })
    .await;
    // Memory full, and nothing may be evicted (Redis's default policy).
    assert_eq!(
        command(redis.port, admin, &["CONFIG", "SET", "maxmemory", "1"]),
        "+OK"
    );
    let caller = Caller::new(&gw);
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert!(gw.upstream.seen().is_empty());
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 0.0);
    assert!(metric(&m, "fhirwall_redis_commands_total{outcome=\"error\"}") >= 1.0);
    // Ready still: Redis answered once, and is every replica's.
    assert_eq!(gw.readyz().await, 200);

    assert_eq!(
        command(redis.port, admin, &["CONFIG", "SET", "maxmemory", "0"]),
        "+OK"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw.metrics().await, "fhirwall_redis_up") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "Redis never seen with memory again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_local_still_refuses_replays_across_a_redis_outage() {
    let mut redis = RedisServer::start();
    let (gw, other) = replicas(&redis, "  on_failure: local\n").await;
    let caller = Caller::new(&gw);
    // Redis is asked while it answers, from the start: the replicas share.
    let shared = caller.proof();
    assert_eq!(caller.with(&gw, &shared).await.0, 200);
    assert_eq!(
        caller.with(&other, &shared).await.0,
        401,
        "replay at the other replica"
    );
    let dpop = async |p: String| caller.with(&gw, &p).await.0;
    // Accepted with Redis there, replayed with Redis gone.
    let before_outage = caller.proof();
    assert_eq!(dpop(before_outage.clone()).await, 200);
    redis.stop();
    assert_eq!(dpop(before_outage).await, 401, "replay during the outage");
    // Accepted during the outage, replayed once Redis is back (empty).
    let during_outage = caller.proof();
    assert_eq!(dpop(during_outage.clone()).await, 200);
    redis.restart();
    gw.until_readyz(200, "Redis back").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw.metrics().await, "fhirwall_redis_up") != 1.0 {
        assert!(Instant::now() < deadline, "Redis never seen again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dpop(during_outage).await, 401, "replay after the outage");
    assert_eq!(gw.upstream.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_a_client_certificate_and_only_with_a_trusted_server() {
    let pki = pki();
    let redis = RedisServer::start_tls(&pki);
    let dir = TempDir::new("redis-tls-client");
    for (name, text) in [
        ("ca.crt", &pki.ca),
        ("client.crt", &pki.client_cert),
        ("client.key", &pki.client_key),
    ] {
        std::fs::write(dir.0.join(name), text).unwrap();
    }
    let path = |name: &str| dir.0.join(name).display().to_string();
    let with = |tls_yaml: String, ready: bool| Options {
        extra_yaml: format!(
            "redis:\n  url: rediss://127.0.0.1:{}/0\n  timeout_ms: 500\n{tls_yaml}",
            redis.port
        ),
        expect_ready: ready,
        ..Options::default()
    };
    let client_yaml = format!(
        "  client_cert_file: {}\n  client_key_file: {}\n",
        path("client.crt"),
        path("client.key")
    );
    let gw = Gateway::start(with(
        format!("  ca_file: {}\n{client_yaml}", path("ca.crt")),
        true,
    ))
    .await;
    let caller = Caller::new(&gw);
    let proof = caller.proof();
    let (s, _, body) = caller.with(&gw, &proof).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, _) = caller.with(&gw, &proof).await;
    assert_eq!(s, 401, "the replay check over TLS let a replay through");

    // A server certificate the system does not trust, and no client
    // certificate for a server that wants one: no Redis, nothing passes.
    for (tls_yaml, what) in [
        (client_yaml.clone(), "untrusted server"),
        (
            format!("  ca_file: {}\n", path("ca.crt")),
            "no client certificate",
        ),
    ] {
        let gw = Gateway::start(with(tls_yaml, false)).await;
        let (s, _, body) = Caller::new(&gw).fresh(&gw).await;
        assert_eq!(s, 503, "{what}: {body}");
        assert!(gw.upstream.seen().is_empty(), "{what}");
        assert_eq!(gw.readyz().await, 503, "{what}");
    }
}
