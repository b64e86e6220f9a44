//! `redis:` when Redis is not there: a Redis that accepts connections and
//! never answers, and one that was never started. What needs the shared
//! state is refused (`on_failure: refuse`) or decided by this process
//! alone (`on_failure: local`). With a real Redis: `tests/redis.rs`.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::dpop::Caller;
use support::{free_port, metric, Gateway, Options};

/// A port that accepts connections and never says a word.
fn silent_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// A gateway whose `redis.url` names `port` on loopback; `redis` is more
/// of that section (indented), `more` top-level YAML after it.
async fn with_redis(port: u16, redis: &str, more: &str, ready: bool) -> Gateway {
    Gateway::start(Options {
        extra_yaml: format!("redis:\n  url: redis://127.0.0.1:{port}/0\n{redis}{more}"),
        expect_ready: ready,
        ..Options::default()
    })
    .await
}

/// Waits (bounded) until a Redis command (the probe) has timed out.
async fn until_a_timeout(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let timeouts = "fhirwall_redis_commands_total{outcome=\"timeout\"}";
    while metric(&gw.metrics().await, timeouts) < 1.0 {
        assert!(Instant::now() < deadline, "the probe never timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_times_out_and_dpop_requests_are_refused() {
    let gw = with_redis(silent_port(), "  timeout_ms: 100\n", "", false).await;
    let caller = Caller::new(&gw);
    let started = Instant::now();
    let (s, _, body) = caller.fresh(&gw).await;
    assert_eq!(s, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(body.contains("DPoP replay check"), "{body}");
    assert!(
        gw.upstream.seen().is_empty(),
        "a request reached the upstream"
    );
    let audit = gw.audit_containing("dpop_replay_check_unavailable");
    assert!(audit.contains("\"status\":503"), "{audit}");
    // A plain bearer token needs no shared state.
    let bearer = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&bearer)).await.status(), 200);
    assert_eq!(gw.readyz().await, 503);
    let why = gw.admin_get("readyz").await.text().await.unwrap();
    assert!(why.contains("has not answered since start"), "{why}");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_redis_up"), 0.0);
    assert!(metric(&m, "fhirwall_redis_commands_total{outcome=\"timeout\"}") >= 1.0);
    assert_eq!(metric(&m, "fhirwall_ready"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_local_decides_with_this_process_state() {
    let local = "  timeout_ms: 100\n  on_failure: local\n";
    let gw = with_redis(free_port(), local, "", true).await;
    let caller = Caller::new(&gw);
    let proof = caller.proof();
    let (s, _, body) = caller.with(&gw, &proof).await;
    assert_eq!(s, 200, "{body}");
    // The replay is still caught, by this process.
    let (s, www, _) = caller.with(&gw, &proof).await;
    assert_eq!(s, 401);
    assert!(www.contains("already used"), "{www}");
    assert_eq!(gw.upstream.seen().len(), 1);
    let m = gw.metrics().await;
    // The first proof fell back; the replay was known here before Redis
    // was asked.
    assert_eq!(metric(&m, "fhirwall_redis_fallbacks_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "fhirwall_redis_up"), 0.0);
    // Ready: with `local`, a missing Redis refuses nothing.
    assert_eq!(gw.readyz().await, 200);
    // `check` names where the shared state lives.
    let (ok, out) = support::check(gw.config_path());
    assert!(
        ok && out.contains("shared state in redis://127.0.0.1:"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_local_does_not_wait_for_a_redis_known_to_be_down() {
    no_wait_for_a_redis_known_to_be_down("  on_failure: local\n", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_refuse_refuses_at_once_while_redis_is_known_to_be_down() {
    no_wait_for_a_redis_known_to_be_down("", 503).await;
}

/// A silent Redis with a 3 s `timeout_ms`: once a command (the probe) has
/// timed out, DPoP requests get `status` without waiting for Redis again.
async fn no_wait_for_a_redis_known_to_be_down(mode: &str, status: u16) {
    let redis = format!("  timeout_ms: 3000\n{mode}");
    let gw = with_redis(silent_port(), &redis, "", status == 200).await;
    let caller = Caller::new(&gw);
    // Until a command has failed, Redis is asked (and a request may wait
    // for it): the first probe's timeout tells.
    until_a_timeout(&gw).await;
    for i in 0..3 {
        let started = Instant::now();
        let (s, _, body) = caller.fresh(&gw).await;
        assert_eq!(s, status, "{body}");
        // Redis would take timeout_ms (3 s) to say nothing.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "request {i} waited {:?} for a Redis known to be down",
            started.elapsed()
        );
    }
    if status == 503 {
        assert!(
            gw.upstream.seen().is_empty(),
            "a request reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_redis_does_not_make_the_gateway_unready_until_a_rule_needs_it() {
    let dir = support::TempDir::new("redis-unused");
    let rules = dir.0.join("10-rules.yaml");
    std::fs::write(
        &rules,
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}}\n",
    )
    .unwrap();
    // DPoP off and no rate limit: nothing asks Redis, so its silence is
    // no reason to be unready (start waits for /readyz 200).
    let more = format!(
        "dpop:\n  enabled: false\npolicies:\n  dir: {}\n",
        dir.0.display()
    );
    let gw = with_redis(silent_port(), "  timeout_ms: 100\n", &more, true).await;
    until_a_timeout(&gw).await;
    assert_eq!(gw.readyz().await, 200);
    // A reloaded rule with a rate limit needs it.
    std::fs::write(
        &rules,
        "rules:\n  - {name: reads-ok, effect: allow, when: {interaction: [read]}, rate_limit: {per: client, requests: 5, per_seconds: 60}}\n",
    )
    .unwrap();
    gw.signal("HUP");
    gw.until_readyz(503, "still ready with a rate limit and no Redis")
        .await;
    let token = gw.mint("user/*.rs", None);
    assert_eq!(gw.get("Patient/p1", Some(&token)).await.status(), 503);
}
