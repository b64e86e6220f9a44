//! Whole-proxy load benchmark: the same requests, in one run, through
//!
//! (a) a plain Pingora pass-through (this binary re-executed in
//!     pass-through mode, built from the same dependencies),
//! (b) fhirwall (the real binary) with one valid JWT for every request,
//! (c) fhirwall with 10,000 distinct valid JWTs used round-robin,
//!
//! each in front of a fresh in-process sandbox FHIR upstream, with a
//! closed-loop load generator (N concurrent keep-alive workers) in this
//! process. Everything runs on 127.0.0.1 and shares the machine's cores.
//!
//!     cargo bench --bench load
//!
//! Knobs (environment): `FHIRWALL_BENCH_SECONDS` (measured seconds per
//! side, default 8, split over `FHIRWALL_BENCH_ROUNDS` alternating rounds,
//! default 4), `FHIRWALL_BENCH_WORKERS` (default 32),
//! `FHIRWALL_BENCH_MAX_REQUESTS` (per side, default 2,000,000),
//! `FHIRWALL_BENCH_TOKENS` (distinct tokens of side (c), default 10,000).
//! The table is printed and written to `/tmp/load-results.md`.
//!
//! Internal mode: with `FHIRWALL_BENCH_PASSTHROUGH=<listen addr>` and
//! `FHIRWALL_BENCH_UPSTREAM=<addr>` the binary runs the pass-through
//! Pingora server instead (it exits when its stdin closes, i.e. when the
//! benchmark that started it goes away).

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fhirwall::sandbox::fhir::FhirSandbox;
use fhirwall::sandbox::issuer::{Mint, SandboxIssuer};
use fhirwall::sandbox::keys::KeyKind;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;

/// The same allocator as the `fhirwall` binary, so the pass-through differs
/// from fhirwall only by what fhirwall does per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSTHROUGH_ENV: &str = "FHIRWALL_BENCH_PASSTHROUGH";
const UPSTREAM_ENV: &str = "FHIRWALL_BENCH_UPSTREAM";
const REQUEST_PATH: &str = "/fhir/Patient/p1";
const SCOPE: &str = "user/*.rs";
const THREADS: usize = 2;
const WARMUP: Duration = Duration::from_secs(1);
const RESULTS_FILE: &str = "/tmp/load-results.md";
const COMMAND: &str = "cargo bench --bench load";

// ---------------------------------------------------------------------------
// (a) The pass-through: a minimal ProxyHttp forwarding everything unchanged.

struct PassThrough {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn run_passthrough(listen: String, upstream: String) -> ! {
    // Exit when the parent goes away (its end of our stdin closes).
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let conf = ServerConf {
        threads: THREADS,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, PassThrough { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever()
}

// ---------------------------------------------------------------------------
// Child processes and temporary files.

/// Kills and reaps the child on drop (also when unwinding from a panic).
struct ChildGuard {
    name: &'static str,
    child: Child,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// CPU time (user + system) the child has used so far, from
    /// `/proc/<pid>/stat`; `None` where there is no procfs.
    fn cpu(&self) -> Option<Duration> {
        process_cpu(self.child.id())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100
/// on every Linux we run on).
const CLOCK_TICKS: f64 = 100.0;

/// utime + stime of process `pid` (all its threads).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of the line are the 12th and 13th after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS))
}

/// Busy CPU time of the whole machine (all but idle and iowait), from
/// `/proc/stat`: the proxy, the generator and upstream in this process,
/// and the kernel's own threads (network, journal, block I/O).
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq (then steal and guest
    // times, which are not this machine's work or counted in user).
    let busy: u64 = v
        .iter()
        .take(7)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    Some(Duration::from_secs_f64(busy as f64 / CLOCK_TICKS))
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "fhirwall-load-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// One side under test: the proxy child, its temp dir and the tokens.
struct Side {
    name: &'static str,
    base: String,
    tokens: Arc<Vec<String>>,
    admin: Option<String>,
    upstream: Arc<FhirSandbox>,
    // Declared before `_dir`: the child is killed before its dir goes.
    child: ChildGuard,
    _dir: TempDir,
}

async fn start_passthrough(name: &'static str, n_tokens: usize) -> Side {
    let (upstream, up_addr) = FhirSandbox::spawn("/fhir").await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    // Tokens like fhirwall's; they are forwarded unchanged and nobody
    // checks them.
    let issuer = SandboxIssuer::spawn(&base, KeyKind::P256, "k1").await;
    let tokens = Arc::new(mint(&issuer, n_tokens));
    let dir = TempDir::new("passthrough");
    let stderr_path = dir.0.join("stderr.log");
    let child = Command::new(std::env::current_exe().expect("current exe"))
        .env(PASSTHROUGH_ENV, format!("127.0.0.1:{port}"))
        .env(UPSTREAM_ENV, up_addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&stderr_path).expect("stderr file"),
        ))
        .spawn()
        .expect("start the pass-through");
    let mut side = Side {
        name,
        base,
        tokens,
        admin: None,
        upstream,
        child: ChildGuard {
            name: "pass-through",
            child,
            stderr_path,
        },
        _dir: dir,
    };
    wait_ready(&mut side).await;
    side
}

async fn start_fhirwall(name: &'static str, n_tokens: usize) -> Side {
    let (upstream, up_addr) = FhirSandbox::spawn("/fhir").await;
    let port = free_port();
    let admin_port = free_port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let issuer = SandboxIssuer::spawn(&base, KeyKind::P256, "k1").await;
    let dir = TempDir::new("fhirwall");
    let audit_path = dir.0.join("audit.jsonl");
    let yaml = format!(
        "listen: 127.0.0.1:{port}\n\
         public_base_url: {base}\n\
         upstream:\n  url: http://{up_addr}/fhir\n  connect_timeout_ms: 1000\n  read_timeout_ms: 10000\n\
         issuers:\n  - name: bench\n    issuer: {iss}\n    jwks_uri: {iss}/jwks.json\n    audiences: [{base}]\n    algorithms: [ES256]\n    leeway_seconds: 30\n\
         admin:\n  listen: 127.0.0.1:{admin_port}\n\
         {audit}\
         server:\n  threads: {THREADS}\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n",
        iss = issuer.issuer,
        audit = if audit_to_stdout() {
            "audit:\n  sink: stdout\n".to_string()
        } else {
            format!("audit:\n  sink: file\n  path: {}\n", audit_path.display())
        } + &audit_extra(),
    );
    let config = dir.0.join("config.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let stderr_path = dir.0.join("stderr.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fhirwall"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&stderr_path).expect("stderr file"),
        ))
        .spawn()
        .expect("start fhirwall");
    let child = ChildGuard {
        name: "fhirwall",
        child,
        stderr_path,
    };
    let tokens = Arc::new(mint(&issuer, n_tokens));
    let mut side = Side {
        name,
        base,
        tokens,
        admin: Some(format!("http://127.0.0.1:{admin_port}")),
        upstream,
        child,
        _dir: dir,
    };
    wait_ready(&mut side).await;
    side
}

/// `FHIRWALL_BENCH_AUDIT=stdout`: audit to stdout (discarded) instead of
/// a file, to see what the file write costs.
fn audit_to_stdout() -> bool {
    std::env::var("FHIRWALL_BENCH_AUDIT").is_ok_and(|v| v == "stdout")
}

/// `FHIRWALL_BENCH_AUDIT_YAML`: extra lines for the `audit:` section
/// (`;`-separated `key: value`), e.g. `fsync: never;record_before_upstream: false`.
fn audit_extra() -> String {
    std::env::var("FHIRWALL_BENCH_AUDIT_YAML")
        .unwrap_or_default()
        .split(';')
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("  {}\n", l.trim()))
        .collect()
}

fn mint(issuer: &SandboxIssuer, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            issuer.mint(&Mint {
                scope: SCOPE.into(),
                patient: None,
                sub: format!("user-{i}"),
                client_id: "load-bench".into(),
                lifetime_seconds: 3600,
            })
        })
        .collect()
}

/// fhirwall: admin `/readyz` 200; pass-through: one successful request.
async fn wait_ready(side: &mut Side) {
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        side.child.assert_running();
        let ok = match &side.admin {
            Some(admin) => client
                .get(format!("{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200),
            None => client
                .get(format!("http://{}{REQUEST_PATH}", host(&side.base)))
                .bearer_auth(&side.tokens[0])
                .send()
                .await
                .is_ok_and(|r| r.status() == 200),
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready in 30 s; stderr:\n{}",
            side.name,
            side.child.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn host(base: &str) -> &str {
    base.trim_start_matches("http://")
        .split('/')
        .next()
        .expect("host")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

// ---------------------------------------------------------------------------
// The load generator.

struct Limits {
    workers: usize,
    duration: Duration,
    max_requests: usize,
}

#[derive(Default)]
struct Outcome {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    /// Nanoseconds, sorted.
    latencies: Vec<u64>,
}

impl Outcome {
    /// Adds another measurement of the same side.
    fn merge(&mut self, other: Outcome) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
    }

    fn ok(&self) -> usize {
        self.requests - self.errors
    }
    /// Successful (200) responses per second.
    fn throughput(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.latencies.len() as f64).ceil() as usize).max(1);
        self.latencies[rank.min(self.latencies.len()) - 1] as f64 / 1e6
    }
}

/// Runs `workers` closed-loop workers until `duration` has passed or
/// `max_requests` have been started. Tokens are used round-robin.
async fn drive(side: &Side, workers: usize, duration: Duration, max_requests: usize) -> Outcome {
    let url: Arc<str> = format!("http://{}{REQUEST_PATH}", host(&side.base)).into();
    let counter = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (url, counter, tokens) = (url.clone(), counter.clone(), side.tokens.clone());
        handles.push(tokio::spawn(async move {
            let client = client();
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut errors = 0usize;
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                if n >= max_requests {
                    break;
                }
                let token = &tokens[n % tokens.len()];
                let t0 = Instant::now();
                let ok = match client.get(&*url).bearer_auth(token).send().await {
                    Ok(r) => {
                        let status = r.status();
                        r.bytes().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                latencies.push(t0.elapsed().as_nanos() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut out = Outcome::default();
    for h in handles {
        let (l, e) = h.await.expect("load worker panicked");
        out.latencies.extend(l);
        out.errors += e;
    }
    out.elapsed = start.elapsed();
    out.requests = out.latencies.len();
    out.latencies.sort_unstable();
    out
}

/// `fhirwall_token_cache_{hits,misses}_total` from the admin listener.
async fn cache_counters(admin: &str) -> Option<(u64, u64)> {
    let text = client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let read = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    };
    Some((
        read("fhirwall_token_cache_hits_total")?,
        read("fhirwall_token_cache_misses_total")?,
    ))
}

struct Row {
    name: &'static str,
    tokens: usize,
    outcome: Outcome,
    upstream_seen: usize,
    cache: Option<(u64, u64)>,
    /// Throughput of each round, to compare with the pass-through's round.
    rounds: Vec<f64>,
    /// CPU used during the measured rounds by the proxy process, and by
    /// the whole machine.
    proxy_cpu: Duration,
    machine_cpu: Duration,
}

impl Row {
    fn new(side: &Side) -> Row {
        Row {
            name: side.name,
            tokens: side.tokens.len(),
            outcome: Outcome::default(),
            upstream_seen: 0,
            cache: Some((0, 0)).filter(|_| side.admin.is_some()),
            rounds: Vec::new(),
            proxy_cpu: Duration::ZERO,
            machine_cpu: Duration::ZERO,
        }
    }
}

/// Warm-up: the connection pools fill and every token has been seen once,
/// so fhirwall's measured requests are token-cache hits.
async fn warm_up(side: &Side, limits: &Limits) {
    let pass = side.tokens.len().max(limits.workers * 8);
    let warm = drive(
        side,
        limits.workers,
        WARMUP.max(Duration::from_secs(60)),
        pass,
    )
    .await;
    let more = drive(side, limits.workers, WARMUP, usize::MAX).await;
    println!(
        "{}: warm-up {} + {} requests ({} errors)",
        side.name,
        warm.requests,
        more.requests,
        warm.errors + more.errors
    );
}

/// One measured round of one side, added to its row.
async fn measure(side: &Side, row: &mut Row, limits: &Limits, duration: Duration) {
    let before = match &side.admin {
        Some(a) => cache_counters(a).await,
        None => None,
    };
    let seen_before = side.upstream.count_containing("/Patient/p1");
    let cpu_before = (side.child.cpu(), machine_busy());
    let outcome = drive(side, limits.workers, duration, limits.max_requests).await;
    if let (Some(p0), Some(p1)) = (cpu_before.0, side.child.cpu()) {
        row.proxy_cpu += p1.saturating_sub(p0);
    }
    if let (Some(m0), Some(m1)) = (cpu_before.1, machine_busy()) {
        row.machine_cpu += m1.saturating_sub(m0);
    }
    row.upstream_seen += side.upstream.count_containing("/Patient/p1") - seen_before;
    if let (Some(a), Some((h0, m0)), Some((h, m))) = (&side.admin, before, row.cache) {
        row.cache = cache_counters(a)
            .await
            .map(|(h1, m1)| (h + h1 - h0, m + m1 - m0));
    }
    println!(
        "  {}: {} requests, {} errors, {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
        side.name,
        outcome.requests,
        outcome.errors,
        outcome.throughput(),
        outcome.percentile_ms(0.50),
        outcome.percentile_ms(0.99),
    );
    row.rounds.push(outcome.throughput());
    row.outcome.merge(outcome);
}

fn per_request_us(cpu: Duration, requests: usize) -> f64 {
    cpu.as_secs_f64() * 1e6 / requests.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The command, with any `FHIRWALL_BENCH_*` knobs that were set.
fn command() -> String {
    let mut knobs: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("FHIRWALL_BENCH_"))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    knobs.sort();
    format!("{}{COMMAND}", knobs.concat())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

async fn bench() -> String {
    let limits = Limits {
        workers: env_or("FHIRWALL_BENCH_WORKERS", 32usize).max(1),
        duration: Duration::from_secs_f64(env_or("FHIRWALL_BENCH_SECONDS", 8.0f64)),
        max_requests: env_or("FHIRWALL_BENCH_MAX_REQUESTS", 2_000_000usize),
    };
    let rounds = env_or("FHIRWALL_BENCH_ROUNDS", 4usize).max(1);
    let n_tokens = env_or("FHIRWALL_BENCH_TOKENS", 10_000usize).max(1);
    let many = |what: &str| -> &'static str {
        Box::leak(format!("{what}, {n_tokens} tokens").into_boxed_str())
    };

    // The same requests through each proxy: the pass-through once with the
    // single token and once with the distinct tokens, as fhirwall.
    let sides = [
        start_passthrough("Pingora pass-through, 1 token", 1).await,
        start_fhirwall("fhirwall, 1 token", 1).await,
        start_passthrough(many("Pingora pass-through"), n_tokens).await,
        start_fhirwall(many("fhirwall"), n_tokens).await,
    ];
    for side in &sides {
        warm_up(side, &limits).await;
    }
    let mut rows: Vec<Row> = sides.iter().map(Row::new).collect();
    // The machine's speed drifts (other tenants, turbo): the sides take
    // turns, a short round each, the starting side rotating every round.
    let per_round = limits.duration / rounds as u32;
    for round in 0..rounds {
        println!("round {}/{rounds}:", round + 1);
        for k in 0..sides.len() {
            let i = (round + k) % sides.len();
            measure(&sides[i], &mut rows[i], &limits, per_round).await;
        }
    }
    drop(sides);
    let [a1, b, a2, c] = &rows[..] else {
        unreachable!("four sides")
    };
    // Against its pass-through: the total, and the median of the per-round
    // ratios (each against the pass-through's turn in that round).
    let total_ratio = |r: &Row, p: &Row| r.outcome.throughput() / p.outcome.throughput();
    let round_ratio =
        |r: &Row, p: &Row| median(r.rounds.iter().zip(&p.rounds).map(|(x, p)| x / p).collect());

    let mut md = String::new();
    md.push_str(&format!(
        "Whole proxy, `{}`: `GET {REQUEST_PATH}` with a Bearer ES256 JWT (scope `{SCOPE}`), \
         {} concurrent keep-alive clients, {:?} measured per side in {rounds} alternating rounds, \
         after a warm-up that presents every token once (so fhirwall's measured requests are token-cache hits); \
         proxy threads: {THREADS}; load generator, sandbox upstream and \
         proxy share the {} cores of this machine on 127.0.0.1. fhirwall writes its audit {}.\n\n",
        command(),
        limits.workers,
        per_round * rounds as u32,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if audit_to_stdout() {
            "to stdout (/dev/null)"
        } else {
            "to a file"
        },
    ));
    md.push_str(
        "| side | tokens | requests | errors | req/s | p50 ms | p99 ms | proxy CPU µs/req | machine CPU µs/req | vs its pass-through (total) | (median of rounds) |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (r, p) in [(a1, a1), (b, a1), (a2, a2), (c, a2)] {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.2}× | {:.2}× |\n",
            r.name,
            r.tokens,
            r.outcome.requests,
            r.outcome.errors,
            r.outcome.throughput(),
            r.outcome.percentile_ms(0.50),
            r.outcome.percentile_ms(0.99),
            per_request_us(r.proxy_cpu, r.outcome.requests),
            per_request_us(r.machine_cpu, r.outcome.requests),
            total_ratio(r, p),
            round_ratio(r, p),
        ));
    }
    let ratio_b = round_ratio(b, a1);
    let ratio_c = round_ratio(c, a2);
    md.push_str(&format!(
        "\nfhirwall / pass-through throughput (median of rounds): {ratio_b:.2}× with 1 token, {ratio_c:.2}× with {n_tokens} tokens; \
         target ≥ 0.90× with tokens in cache: {}.\n",
        if ratio_b.min(ratio_c) >= 0.9 { "met" } else { "NOT met" }
    ));
    for r in [a1, b, a2, c] {
        match r.cache {
            Some((h, m)) => md.push_str(&format!(
                "\n{}: token cache hits {h}, misses {m} during the measurement; upstream saw {} requests.",
                r.name, r.upstream_seen
            )),
            None => md.push_str(&format!(
                "\n{}: upstream saw {} requests.",
                r.name, r.upstream_seen
            )),
        }
    }
    md.push('\n');
    md
}

fn main() {
    if let Ok(listen) = std::env::var(PASSTHROUGH_ENV) {
        let upstream = std::env::var(UPSTREAM_ENV).expect("FHIRWALL_BENCH_UPSTREAM must be set");
        run_passthrough(listen, upstream);
    }
    // `cargo test --benches` runs bench binaries without `--bench`: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load bench: run it with `{COMMAND}`");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let md = rt.block_on(bench());
    println!("\n{md}");
    let file = format!(
        "# fhirwall load benchmark\n\nCommand:\n\n    {}\n\n{md}",
        command()
    );
    match std::fs::write(RESULTS_FILE, file) {
        Ok(()) => println!("written to {RESULTS_FILE}"),
        Err(e) => eprintln!("could not write {RESULTS_FILE}: {e}"),
    }
}
