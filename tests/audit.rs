//! The audit trail end to end: the real binary, a sandbox upstream and, for
//! the FHIR sink, an in-process AuditEvent endpoint on loopback. What must
//! hold: nothing reaches the upstream before its record is written, even
//! when fhirwall is killed; a failing sink refuses requests (or spills)
//! and recovers; records carry no query values; files rotate.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{json, Value};
use support::{metric, Gateway, Options};

/// The client-chosen request ids the upstream saw (fhirwall passes them
/// on as `X-Client-Request-Id`; its `X-Request-Id` is its own).
fn upstream_ids(gw: &Gateway, prefix: &str) -> BTreeSet<String> {
    gw.upstream
        .seen()
        .iter()
        .flat_map(|s| s.headers.iter())
        .filter(|(k, v)| k == "x-client-request-id" && v.starts_with(prefix))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The client's own request id an AuditEvent's transaction entity names
/// (its `client_request_id` detail; the entity's identifier is the id
/// fhirwall sent upstream).
fn client_request_id(tx: &Value) -> String {
    tx["detail"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["type"] == "client_request_id"))
        .and_then(|d| d["valueString"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Every JSON record in a file, by request id and event.
fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is a whole JSON record"))
        .collect()
}

/// A gateway whose audit goes to the FHIR endpoint at `addr` (retried
/// every 200 ms), with `extra` audit settings.
async fn with_fhir_sink(addr: SocketAddr, extra: &str) -> Gateway {
    Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: fhir\n  format: audit_event\n  retry_ms: 200\n{extra}  fhir:\n    endpoint: http://{addr}/fhir\n    timeout_ms: 1000\n"
        )),
        ..Options::default()
    })
    .await
}

/// POSTs a batch of `n` reads (`{url}{i}`) with request id `id`.
async fn batch_of_reads(
    gw: &Gateway,
    token: &str,
    id: &str,
    n: usize,
    url: &str,
) -> reqwest::Response {
    let entries: Vec<Value> = (0..n)
        .map(|i| json!({"request": {"method": "GET", "url": format!("{url}{i}")}}))
        .collect();
    gw.client
        .post(&gw.base)
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .header("x-request-id", id)
        .body(json!({"resourceType": "Bundle", "type": "batch", "entry": entries}).to_string())
        .send()
        .await
        .unwrap()
}

async fn get_with_id(gw: &Gateway, rel: &str, token: &str, id: &str) -> reqwest::Response {
    gw.client
        .get(format!("{}/{rel}", gw.base))
        .bearer_auth(token)
        .header("x-request-id", id)
        .send()
        .await
        .unwrap()
}

/// The request ids of the request records in the gateway's audit file.
fn recorded_request_ids(gw: &Gateway) -> BTreeSet<String> {
    records(&gw.audit_path)
        .iter()
        .filter(|r| r["event"] == "request")
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_until(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `clients` loops of at most `each` GETs of `rel` with ids
/// `<prefix><client>-<n>`, stopping at the first failure; returns the ids
/// answered 200.
fn hammer(
    base: &str,
    rel: &str,
    token: &str,
    prefix: &str,
    clients: usize,
    each: usize,
) -> (Arc<Mutex<Vec<String>>>, Vec<tokio::task::JoinHandle<()>>) {
    let ok = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..clients)
        .map(|c| {
            let (ok, url, token, prefix) = (
                ok.clone(),
                format!("{base}/{rel}"),
                token.to_string(),
                prefix.to_string(),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                for n in 0..each {
                    let id = format!("{prefix}{c}-{n}");
                    let r = client
                        .get(&url)
                        .bearer_auth(&token)
                        .header("x-request-id", &id)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => ok.lock().unwrap().push(id),
                        _ => break,
                    }
                }
            })
        })
        .collect();
    (ok, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateway_leaves_a_record_of_everything_the_upstream_saw() {
    // Default: decision records go through the writer, fsynced per batch.
    killed_gateway_leaves_records(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_fsync_per_batch_requests_append_their_decision_records_themselves() {
    killed_gateway_leaves_records(Some(
        "  sink: file\n  path: audit.jsonl\n  fsync: never\n".into(),
    ))
    .await;
}

async fn killed_gateway_leaves_records(audit_yaml: Option<String>) {
    let mut gw = Gateway::start(Options {
        audit_yaml,
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let (ok, tasks) = hammer(&gw.base, "Observation/obs-p1-1", &token, "kill-", 4, 400);
    // SIGKILL mid-run: no shutdown, no flush.
    wait_until("100 answers", 20, async || ok.lock().unwrap().len() >= 100).await;
    gw.kill();
    for t in tasks {
        t.await.unwrap();
    }
    let answered: BTreeSet<String> = ok.lock().unwrap().iter().cloned().collect();
    let reached = upstream_ids(&gw, "kill-");
    assert!(answered.len() >= 100 && reached.len() >= answered.len());
    assert!(answered.is_subset(&reached));
    assert!(
        answered.len() < 1600,
        "the kill came too late to prove anything"
    );
    // Every request that reached the upstream has a decision record on
    // disk, written before it went there.
    let on_disk: BTreeSet<String> = records(&gw.audit_path)
        .iter()
        .filter(|r| r["event"] == "decision" && r["decision"] == "allow")
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<_> = reached.difference(&on_disk).collect();
    assert!(missing.is_empty(), "no record of {missing:?}");

    // Restarted on the same file, it goes on appending whole records.
    gw.restart().await;
    let (ok, tasks) = hammer(&gw.base, "Observation/obs-p1-1", &token, "again-", 2, 20);
    for t in tasks {
        t.await.unwrap();
    }
    let again = ok.lock().unwrap().clone();
    assert_eq!(again.len(), 40);
    for id in &again {
        let r = gw.audit_for(id);
        assert_eq!(
            (r["decision"].as_str(), r["status"].as_u64()),
            (Some("allow"), Some(200))
        );
    }
    // No line is torn: `records` parses every one.
    assert!(records(&gw.audit_path).len() > 2 * 100);
}

/// An in-process FHIR server that stores AuditEvents from batch Bundles,
/// and can be stopped (connections refused) and started again.
struct AuditServer {
    events: Mutex<BTreeMap<String, Value>>,
    bundles: AtomicUsize,
    down: AtomicBool,
    /// Answer an empty batch with 400, as strict servers do.
    reject_empty: AtomicBool,
    /// Non-empty Bundles still accepted before answering 503 (-1: all).
    budget: std::sync::atomic::AtomicIsize,
    /// PUTs received, by AuditEvent id.
    puts: Mutex<BTreeMap<String, usize>>,
    /// Bundles larger than this are answered 413, as by a proxy's limit.
    max_body: AtomicUsize,
    /// AuditEvents holding this text get an entry status of 400, as by a
    /// server validating each (the others are stored).
    refuse_marker: Mutex<Option<String>>,
    /// Bundles of more entries than this are answered 413, as by a body
    /// limit that only single records fit under.
    max_entries: AtomicUsize,
    /// The resources the server holds, when it checks references (HAPI's
    /// JPA server does by default): an AuditEvent whose agent or entity
    /// references another gets an entry status of 400.
    holds: Mutex<Option<BTreeSet<String>>>,
}

/// The references an AuditEvent's agents (`who`) and entities (`what`)
/// make.
fn event_references(ev: &Value) -> Vec<String> {
    let mut refs = Vec::new();
    for (list, key) in [("agent", "who"), ("entity", "what")] {
        for item in ev[list].as_array().into_iter().flatten() {
            if let Some(r) = item[key]["reference"].as_str() {
                refs.push(r.to_string());
            }
        }
    }
    refs
}

async fn take_bundle(State(s): State<Arc<AuditServer>>, body: String) -> axum::response::Response {
    if s.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if body.len() > s.max_body.load(Ordering::SeqCst) {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let b: Value = serde_json::from_str(&body).unwrap();
    if b["entry"].as_array().unwrap().len() > s.max_entries.load(Ordering::SeqCst) {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let empty = b["entry"].as_array().unwrap().is_empty();
    if s.reject_empty.load(Ordering::SeqCst) && empty {
        return StatusCode::BAD_REQUEST.into_response();
    }
    if !empty {
        let left = s.budget.load(Ordering::SeqCst);
        if left == 0 {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
        if left > 0 {
            s.budget.fetch_sub(1, Ordering::SeqCst);
        }
    }
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "batch");
    let mut answers = Vec::new();
    for e in b["entry"].as_array().unwrap() {
        let url = e["request"]["url"].as_str().unwrap();
        let id = url.strip_prefix("AuditEvent/").unwrap();
        assert_eq!(e["request"]["method"], "PUT");
        assert_eq!(e["resource"]["resourceType"], "AuditEvent");
        assert_eq!(e["resource"]["id"], id);
        let marker = s.refuse_marker.lock().unwrap().clone();
        let dangling = s.holds.lock().unwrap().as_ref().is_some_and(|held| {
            event_references(&e["resource"])
                .iter()
                .any(|r| !held.contains(r))
        });
        if dangling || marker.is_some_and(|m| e["resource"].to_string().contains(&m)) {
            answers.push(json!({"response": {"status": "400 Bad Request"}}));
            continue;
        }
        s.events
            .lock()
            .unwrap()
            .insert(id.to_string(), e["resource"].clone());
        *s.puts.lock().unwrap().entry(id.to_string()).or_default() += 1;
        answers.push(json!({"response": {"status": "201 Created"}}));
    }
    s.bundles.fetch_add(1, Ordering::SeqCst);
    (
        [("content-type", "application/fhir+json")],
        json!({"resourceType": "Bundle", "type": "batch-response", "entry": answers}).to_string(),
    )
        .into_response()
}

impl AuditServer {
    fn new() -> Arc<AuditServer> {
        Arc::new(AuditServer {
            events: Mutex::new(BTreeMap::new()),
            bundles: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            reject_empty: AtomicBool::new(false),
            budget: std::sync::atomic::AtomicIsize::new(-1),
            puts: Mutex::new(BTreeMap::new()),
            max_body: AtomicUsize::new(usize::MAX),
            refuse_marker: Mutex::new(None),
            max_entries: AtomicUsize::new(usize::MAX),
            holds: Mutex::new(None),
        })
    }

    /// Serves on `addr` (port 0: any) until the returned task is aborted.
    async fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/fhir", axum::routing::post(take_bundle))
            .with_state(self.clone());
        (
            addr,
            tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            }),
        )
    }

    /// Request ids of the AuditEvents received for `event` (decision or request).
    fn request_ids(&self, event: &str) -> BTreeSet<String> {
        self.events
            .lock()
            .unwrap()
            .values()
            .filter_map(|ev| {
                let tx = ev["entity"]
                    .as_array()?
                    .iter()
                    .find(|e| e["type"]["code"] == "XrequestId")?;
                let detail = tx["detail"].as_array()?;
                detail
                    .iter()
                    .any(|d| d["type"] == "event" && d["valueString"] == event)
                    .then(|| client_request_id(tx))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_audit_endpoint_refuses_requests_until_it_is_back() {
    let sink = AuditServer::new();
    let (addr, server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "").await;
    let token = gw.mint("system/Observation.rs", None);
    for n in 0..5 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("up-{n}")).await;
        assert_eq!(r.status(), 200);
    }

    // Kill the endpoint: new connections are refused, kept ones fail.
    sink.down.store(true, Ordering::SeqCst);
    server.abort();
    let _ = server.await;
    for n in 0..5 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("down-{n}")).await;
        assert_eq!(r.status(), 503, "served without a record");
        assert!(r.headers().contains_key("retry-after"));
        let body: Value = r.json().await.unwrap();
        assert!(body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("audit"));
    }
    // A write under a patient scope, which fhirwall proves by fetching the
    // current version first: that fetch waits for the record too.
    let p1 = gw.mint("patient/Observation.cru", Some("p1"));
    let put = gw
        .client
        .put(format!("{}/Observation/obs-p1-1", gw.base))
        .bearer_auth(&p1)
        .header("content-type", "application/fhir+json")
        .header("x-request-id", "down-put")
        .body(
            json!({"resourceType": "Observation", "id": "obs-p1-1", "status": "final",
                   "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 503);
    assert!(
        upstream_ids(&gw, "down-").is_empty(),
        "the upstream saw a refused request"
    );
    assert_eq!(gw.readyz().await, 503);
    // Metrics are counted just after the answer: wait for the sixth.
    wait_until("six refusals counted", 5, async || {
        let m = gw.metrics().await;
        metric(
            &m,
            "fhirwall_request_outcomes_total{reason=\"audit_unavailable\"}",
        ) == 6.0
    })
    .await;
    assert_eq!(metric(&gw.metrics().await, "fhirwall_audit_sink_up"), 0.0);

    // Start it again on the same address: the gateway recovers by itself.
    sink.down.store(false, Ordering::SeqCst);
    let (_, _server) = sink.serve(addr).await;
    let mut ready = false;
    for _ in 0..100 {
        if gw.readyz().await == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "the gateway did not recover after the endpoint came back"
    );
    for n in 0..5 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("back-{n}")).await;
        assert_eq!(r.status(), 200);
    }

    // Everything that reached the upstream had its decision event first;
    // every request, the refused ones too, has its request event.
    let reached: BTreeSet<String> = ["up-", "back-"]
        .iter()
        .flat_map(|p| upstream_ids(&gw, p))
        .collect();
    assert_eq!(reached.len(), 10);
    assert!(reached.is_subset(&sink.request_ids("decision")));
    let all: BTreeSet<String> = ["up", "down", "back"]
        .iter()
        .flat_map(|p| (0..5).map(move |n| format!("{p}-{n}")))
        .collect();
    wait_until("every request event", 10, async || {
        all.is_subset(&sink.request_ids("request"))
    })
    .await;
    let events = sink.events.lock().unwrap();
    let refused = events
        .values()
        .find(|e| {
            e["entity"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["type"]["code"] == "XrequestId" && client_request_id(x) == "down-0")
        })
        .unwrap();
    assert_eq!(refused["outcome"], "8");
    assert!(refused["outcomeDesc"]
        .as_str()
        .unwrap()
        .contains("audit_unavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_spill_a_dead_endpoint_does_not_stop_service_and_nothing_is_lost() {
    // Nothing listens on the endpoint's port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let spill =
        std::env::temp_dir().join(format!("fhirwall-spill-{}.ndjson", rand::random::<u64>()));
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: fhir\n  format: audit_event\n  on_failure: spill\n  spill_path: {}\n  fhir:\n    endpoint: http://{addr}/fhir\n    timeout_ms: 500\n",
            spill.display()
        )),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    for n in 0..5 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("spill-{n}")).await;
        assert_eq!(r.status(), 200);
    }
    let ids = |event: &str| -> BTreeSet<String> {
        std::fs::read_to_string(&spill)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|ev| {
                ev["entity"]
                    .to_string()
                    .contains(&format!("\"valueString\":\"{event}\""))
            })
            .filter_map(|ev| {
                ev["entity"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["type"]["code"] == "XrequestId")
                    .map(client_request_id)
            })
            .collect()
    };
    let want: BTreeSet<String> = (0..5).map(|n| format!("spill-{n}")).collect();
    assert_eq!(ids("decision"), want);
    wait_until("request events in the spill file", 10, async || {
        ids("request") == want
    })
    .await;
    // Counted just after the append: the lines can be read a moment
    // before the count moves.
    wait_until("ten records counted as spilled", 5, async || {
        let m = gw.metrics().await;
        metric(&m, "fhirwall_audit_records_written_total{sink=\"spill\"}") >= 10.0
    })
    .await;
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_audit_sink_up"), 0.0);
    assert_eq!(metric(&m, "fhirwall_audit_records_dropped_total"), 0.0);
    assert_eq!(
        gw.readyz().await,
        200,
        "spilling keeps the gateway in service"
    );
    let _ = std::fs::remove_file(&spill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_file_refuses_requests_until_it_can_be_written() {
    unwritable_file_case("batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_file_refuses_requests_also_without_fsync() {
    // Decision records are appended by the request thread: its failure
    // must hand over to the writer, which refuses.
    unwritable_file_case("never").await;
}

/// The audit file lives on a 1 MiB tmpfs in a mount namespace of the
/// gateway's own, with room at start; the disk is filled while it runs,
/// so the next record cannot be written (by the writer, or with `fsync:
/// never` by the request thread).
async fn unwritable_file_case(fsync: &str) {
    let dir = support::TempDir::new("unwritable");
    let disk = dir.0.join("disk");
    std::fs::create_dir(&disk).unwrap();
    let file = disk.join("audit.jsonl");
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: file\n  path: {}\n  retry_ms: 200\n  fsync: {fsync}\n",
            file.display()
        )),
        namespace_setup: Some(format!(
            "mount -t tmpfs -o size=1m tmpfs {}",
            disk.display()
        )),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "room-1").await;
    assert_eq!(r.status(), 200);
    let real = gw.own_path(&file);
    wait_until("the first request record", 10, async || {
        records(&real)
            .iter()
            .any(|r| r["request_id"] == "room-1" && r["event"] == "request")
    })
    .await;
    // The disk fills up, the audit file's last page too (with records of
    // nothing, `{}`, which readers skip as naming no request).
    let fill = gw.own_path(&disk.join("fill"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let mut audit = std::fs::OpenOptions::new()
            .append(true)
            .open(&real)
            .unwrap();
        while audit.write_all(b"{}\n").is_ok() {}
        // (A line cut short by the last write is cut off: the page stays
        // full all the same.)
        let text = std::fs::read(&real).unwrap();
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        audit.set_len(whole as u64).unwrap();
    }
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "full-1").await;
    assert_eq!(r.status(), 503);
    assert!(upstream_ids(&gw, "full-").is_empty());
    assert_eq!(gw.readyz().await, 503);
    assert!(
        metric(
            &gw.metrics().await,
            "fhirwall_audit_write_failures_total{sink=\"primary\"}"
        ) >= 1.0
    );

    // Room again.
    std::fs::remove_file(&fill).unwrap();
    wait_until("ready", 10, async || gw.readyz().await == 200).await;
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "full-2").await;
    assert_eq!(r.status(), 200);
    wait_until("both request records", 10, async || {
        let recs = records(&real);
        ["full-1", "full-2"].iter().all(|id| {
            recs.iter()
                .any(|r| r["request_id"] == *id && r["event"] == "request")
        })
    })
    .await;
    let recs = records(&real);
    let refused = recs
        .iter()
        .find(|r| r["request_id"] == "full-1" && r["event"] == "request")
        .unwrap();
    assert_eq!(refused["status"], 503);
    assert_eq!(refused["reason"], "audit_unavailable");
    assert_eq!(refused["stage"], "audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_gateway_unready_until_there_is_room() {
    full_disk_case("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_found_also_behind_an_audit_file_of_earlier_runs() {
    // Room below the end of a file that exists proves nothing.
    full_disk_case("  # {d}/audit.jsonl holds 150 KB of earlier records\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_file_on_the_same_full_disk_is_no_fallback() {
    full_disk_case("  on_failure: spill\n  spill_path: {d}/spill.jsonl\n").await;
}

/// The audit file (and `extra`'s spill file, `{d}` for the disk) lives
/// on a 1 MiB tmpfs, filled before the gateway starts, in a mount
/// namespace of the gateway's own. Opening a file still works on a full
/// disk: only asking for room tells.
async fn full_disk_case(extra: &str) {
    let dir = support::TempDir::new("fulldisk");
    let disk = dir.0.join("disk");
    std::fs::create_dir(&disk).unwrap();
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: file\n  path: {d}/audit.jsonl\n  retry_ms: 200\n{extra}",
            d = disk.display(),
            extra = extra.replace("{d}", &disk.display().to_string()),
        )),
        namespace_setup: Some(format!(
            "mount -t tmpfs -o size=1m tmpfs {d}; {earlier}dd if=/dev/zero of={d}/fill bs=64k 2>/dev/null || true",
            d = disk.display(),
            earlier = if extra.contains("earlier records") {
                format!("yes '{{}}' | head -n 50000 > {}/audit.jsonl; ", disk.display())
            } else {
                String::new()
            },
        )),
        expect_ready: false,
        ..Options::default()
    })
    .await;
    let fill = gw.own_path(&disk.join("fill"));
    assert!(
        std::fs::metadata(&fill).unwrap().len() >= 700 * 1024,
        "the tmpfs was filled"
    );
    // Unready from the start, before any request has failed: the start-up
    // probe found no room.
    let text = gw.metrics().await;
    assert_eq!(metric(&text, "fhirwall_audit_sink_up"), 0.0);
    assert!(
        metric(
            &text,
            "fhirwall_audit_write_failures_total{sink=\"primary\"}"
        ) >= 1.0
    );
    assert_eq!(gw.readyz().await, 503);
    // Still unready after the sink's retries, with no record to write
    // (an empty append to a spill file succeeds on a full disk).
    wait_until("two retries", 10, async || {
        metric(
            &gw.metrics().await,
            "fhirwall_audit_write_failures_total{sink=\"primary\"}",
        ) >= 3.0
    })
    .await;
    assert_eq!(gw.readyz().await, 503);
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "disk-1").await;
    assert_eq!(r.status(), 503);
    assert!(upstream_ids(&gw, "disk-").is_empty());

    // Room again: ready within a few retries, and served.
    std::fs::remove_file(&fill).unwrap();
    wait_until("ready", 10, async || gw.readyz().await == 200).await;
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "disk-2").await;
    assert_eq!(r.status(), 200);
    // With a spill file, records may be in either.
    let written = || {
        let mut recs = records(&gw.own_path(&disk.join("audit.jsonl")));
        recs.extend(records(&gw.own_path(&disk.join("spill.jsonl"))));
        recs
    };
    wait_until("both request records", 10, async || {
        let recs = written();
        ["disk-1", "disk-2"].iter().all(|id| {
            recs.iter()
                .any(|r| r["request_id"] == *id && r["event"] == "request")
        })
    })
    .await;
    let recs = written();
    let refused = recs
        .iter()
        .find(|r| r["request_id"] == "disk-1" && r["event"] == "request")
        .unwrap();
    assert_eq!(refused["status"], 503);
    assert_eq!(refused["reason"], "audit_unavailable");
}

/// During a handover two processes append to one audit file. A write the
/// full disk refuses is cut back to where the file ended when it began,
/// never to an end this process knew from before: the other process's
/// records written since (here a line the test appends) stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_cuts_back_only_its_own_bytes() {
    use std::io::Write;
    let dir = support::TempDir::new("sharedfile");
    let disk = dir.0.join("disk");
    std::fs::create_dir(&disk).unwrap();
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: file\n  path: {}/audit.jsonl\n  retry_ms: 200\n",
            disk.display()
        )),
        namespace_setup: Some(format!(
            "mount -t tmpfs -o size=1m tmpfs {}",
            disk.display()
        )),
        ..Options::default()
    })
    .await;
    let audit = gw.own_path(&disk.join("audit.jsonl"));
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "shared-1").await;
    assert_eq!(r.status(), 200);
    wait_until("the first request's record", 10, async || {
        records(&audit)
            .iter()
            .any(|r| r["request_id"] == "shared-1" && r["event"] == "request")
    })
    .await;
    // The disk filled by another file, then the other process's line
    // appended until no room is left (the room fhirwall reserved past the
    // end included), and ended.
    let mut fill = std::fs::File::create(gw.own_path(&disk.join("fill"))).unwrap();
    while fill.write_all(&[0u8; 4096]).is_ok() {}
    drop(fill);
    let mut other = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    other.write_all(b"{\"other\":\"").unwrap();
    while other.write_all(&[b'x'; 512]).is_ok() {}
    let len = std::fs::metadata(&audit).unwrap().len();
    other.set_len(len - 3).unwrap();
    other.write_all(b"\"}\n").unwrap();
    let full = std::fs::read_to_string(&audit).unwrap();
    let theirs = full.lines().last().unwrap().to_string();
    assert!(theirs.starts_with("{\"other\":") && theirs.len() > 1000);
    // This request's record cannot be written: refused (503).
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "shared-2").await;
    assert_eq!(r.status(), 503);
    // Room again: the other process's line is whole, where it was.
    std::fs::remove_file(gw.own_path(&disk.join("fill"))).unwrap();
    wait_until("ready", 10, async || gw.readyz().await == 200).await;
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "shared-3").await;
    assert_eq!(r.status(), 200);
    wait_until("the third request's record", 10, async || {
        records(&audit)
            .iter()
            .any(|r| r["request_id"] == "shared-3" && r["event"] == "request")
    })
    .await;
    let now = std::fs::read_to_string(&audit).unwrap();
    assert!(now.starts_with(&full), "the file was cut back past its end");
    assert!(now.lines().any(|l| l == theirs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_rotates_and_keeps_the_configured_number() {
    let gw = Gateway::start(Options {
        audit_yaml: Some(
            "  sink: file\n  path: audit.jsonl\n  rotate_max_bytes: 3000\n  rotate_keep: 2\n"
                .into(),
        ),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    for n in 0..40 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("rot-{n}")).await;
        assert_eq!(r.status(), 200);
    }
    // The relative path is the config file's directory.
    let current = gw.dir.join("audit.jsonl");
    wait_until("the last record", 10, async || {
        records(&current)
            .iter()
            .any(|r| r["request_id"] == "rot-39" && r["event"] == "request")
    })
    .await;
    let rotated: Vec<_> = std::fs::read_dir(&gw.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.jsonl."))
        .collect();
    assert_eq!(rotated.len(), 2, "kept: {rotated:?}");
    let m = gw.metrics().await;
    let rotations = metric(&m, "fhirwall_audit_rotations_total");
    assert!(rotations > 2.0, "{rotations} rotations");
    for name in &rotated {
        let text = std::fs::read_to_string(gw.dir.join(name)).unwrap();
        assert!(text.len() >= 3000 && text.ends_with('\n'));
    }
    // Each deletion is logged: audit records leave for good there.
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    assert!(log.contains("rotated audit file deleted"), "{log}");
}

/// An audit file moved or deleted from under fhirwall (a logrotate of
/// the host's own, a clean-up job): the next record goes to a new file at
/// its path, not after the old one where nobody looks. With the defaults
/// a request is answered only once its decision record is in the file at
/// the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_file_moved_or_deleted_underneath_is_started_again_at_once() {
    let gw = Gateway::start(Options {
        audit_yaml: Some("  sink: file\n  path: audit.jsonl\n".into()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "gone-0").await;
    assert_eq!(r.status(), 200);
    let current = gw.dir.join("audit.jsonl");
    let decided = |path: &std::path::Path, id: &str| {
        records(path)
            .iter()
            .any(|r| r["request_id"] == id && r["event"] == "decision")
    };
    assert!(decided(&current, "gone-0"));
    // Moved away, as logrotate's `create` does.
    let moved = gw.dir.join("audit.jsonl.1");
    std::fs::rename(&current, &moved).unwrap();
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "gone-1").await;
    assert_eq!(r.status(), 200);
    assert!(decided(&current, "gone-1"), "not in a file at the path");
    assert!(!decided(&moved, "gone-1"), "appended to the moved file");
    // Deleted.
    std::fs::remove_file(&current).unwrap();
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "gone-2").await;
    assert_eq!(r.status(), 200);
    assert!(decided(&current, "gone-2"), "not in a file at the path");
    wait_until(
        "the request record in the file at the path",
        10,
        async || {
            records(&current)
                .iter()
                .any(|r| r["request_id"] == "gone-2" && r["event"] == "request")
        },
    )
    .await;
    // Counted, and said in the log.
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "fhirwall_audit_rotations_total"), 2.0);
    let log = std::fs::read_to_string(gw.dir.join("stderr.log")).unwrap();
    assert!(log.contains("moved or deleted by someone else"), "{log}");
}

/// By default rotated files are all kept: deleting audit records is the
/// operator's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_audit_files_are_kept_by_default() {
    let gw = Gateway::start(Options {
        audit_yaml: Some("  sink: file\n  path: audit.jsonl\n  rotate_max_bytes: 3000\n".into()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    for n in 0..40 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("keep-{n}")).await;
        assert_eq!(r.status(), 200);
    }
    let current = gw.dir.join("audit.jsonl");
    wait_until("the last record", 10, async || {
        records(&current)
            .iter()
            .any(|r| r["request_id"] == "keep-39" && r["event"] == "request")
    })
    .await;
    let rotated = std::fs::read_dir(&gw.dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("audit.jsonl.")
        })
        .count();
    let rotations = metric(&gw.metrics().await, "fhirwall_audit_rotations_total");
    assert!(rotated >= 5, "{rotated} rotated files");
    assert_eq!(rotated as f64, rotations, "every rotated file is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_the_documented_fields_and_never_query_values() {
    let gw = Gateway::start(Options::default()).await;
    // A token as an EHR launch issues it: with fhirUser.
    let mut claims = gw.claims("patient/Observation.rs");
    claims["patient"] = json!("p1");
    claims["fhirUser"] = json!("Practitioner/dr-7");
    let token = gw.issuer.signing_key().sign(&claims);
    let r = get_with_id(
        &gw,
        "Observation?code=secret-code-value&_count=5&Smith-Jones",
        &token,
        "fields-1",
    )
    .await;
    assert_eq!(r.status(), 200);
    let rec = gw.audit_for("fields-1");
    for key in [
        "id",
        "time",
        "source",
        "issuer",
        "client_id",
        "sub",
        "fhir_user",
        "patient",
        "token_sha256",
        "token_kind",
        "binding",
        "scopes_used",
        "interaction",
        "resource_type",
        "decision",
        "reason",
        "stage",
        "status",
        "upstream_status",
        "response_bytes",
        "latency_ms",
        "upstream_ms",
        "validation_ms",
    ] {
        assert!(rec.get(key).is_some(), "no {key} in {rec}");
    }
    assert_eq!(rec["source"], "127.0.0.1");
    // The id is the client's: the record says so (one fhirwall made does
    // not carry the field).
    assert_eq!(rec["request_id_from_client"], true, "{rec}");
    let r = gw.get("Observation/obs-p1-1", Some(&token)).await;
    let own = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mine = gw.audit_for(&own);
    assert!(mine.get("request_id_from_client").is_none(), "{mine}");
    // A word without a value (a value typed where a name goes) is no name.
    assert_eq!(rec["query_params"], json!(["code", "_count", "?"]));
    assert_eq!(rec["scopes_used"], json!(["patient/Observation.rs"]));
    assert_eq!(rec["patient"], "p1");
    assert_eq!(rec["fhir_user"], "Practitioner/dr-7");
    let text = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(!text.contains("secret-code-value"));
    assert!(!text.contains("Smith-Jones"));
    assert!(!text.contains(&token), "the token itself is in the audit");

    // A denial: the deciding stage and the reason, no decision record.
    let r = get_with_id(&gw, "Condition?code=x", &token, "fields-2").await;
    assert_eq!(r.status(), 403);
    let rec = gw.audit_for("fields-2");
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["reason"], "insufficient_scope");
    assert_eq!(rec["stage"], "decide");
    assert_eq!(rec["status"], 403);
    assert!(rec.get("upstream_status").is_none());
    // A refused token is recorded by its hash as well, never itself.
    let forged = format!("{token}AA");
    let r = get_with_id(&gw, "Observation/obs-p1-1", &forged, "fields-3").await;
    assert_eq!(r.status(), 401);
    let rec = gw.audit_for("fields-3");
    use sha2::Digest;
    let want = fhirwall::audit::hex(&sha2::Sha256::digest(forged.as_bytes()));
    assert_eq!(rec["token_sha256"], want);
    assert_eq!(rec["stage"], "validate");
    assert!(!std::fs::read_to_string(&gw.audit_path)
        .unwrap()
        .contains(&forged));

    let decisions: Vec<Value> = records(&gw.audit_path)
        .into_iter()
        .filter(|r| r["event"] == "decision")
        .collect();
    assert!(decisions.iter().any(|r| r["request_id"] == "fields-1"));
    assert!(!decisions.iter().any(|r| r["request_id"] == "fields-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_writes_every_queued_record_before_exit() {
    let mut gw = Gateway::start(Options {
        // Records after the answer only: the shutdown flush must carry them.
        audit_yaml: Some(
            "  sink: file\n  path: audit.jsonl\n  record_before_upstream: false\n".into(),
        ),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let (ok, tasks) = hammer(&gw.base, "Observation/obs-p1-1", &token, "term-", 4, 400);
    // SIGTERM while requests are in flight: those answered during the
    // drain must be recorded as well.
    wait_until("100 answers", 20, async || ok.lock().unwrap().len() >= 100).await;
    let status = gw.terminate();
    assert!(status.success(), "fhirwall exited with {status}");
    for t in tasks {
        t.await.unwrap();
    }
    let answered = ok.lock().unwrap().clone();
    assert!(answered.len() >= 100 && answered.len() < 1600);
    let recorded = recorded_request_ids(&gw);
    let missing: Vec<_> = answered
        .iter()
        .filter(|id| !recorded.contains(*id))
        .collect();
    assert!(missing.is_empty(), "no record of {missing:?}");
}

/// SIGTERM with a grace period: `/readyz` says 503 at once (so a load
/// balancer withdraws the replica) while the proxy keeps serving, each
/// answer closing its connection; then the listener closes and, with
/// nothing in flight, the process exits at once rather than after the
/// drain timeout, every answered request recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_withdraws_readiness_and_keeps_serving_through_the_grace_period() {
    let mut gw = Gateway::start(Options {
        server_yaml: "  grace_period_seconds: 3\n  graceful_shutdown_timeout_seconds: 20\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "grace-0").await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers().get("connection").unwrap(), "close");
    assert_eq!(gw.readyz().await, 200);

    let signalled = Instant::now();
    gw.signal_term();
    wait_until("/readyz to answer 503", 2, async || {
        gw.readyz().await == 503
    })
    .await;
    let why = gw.admin_get("readyz").await.text().await.unwrap();
    assert!(why.contains("shutting down"), "{why}");
    assert_eq!(gw.admin_get("healthz").await.status(), 200);
    assert_eq!(metric(&gw.metrics().await, "fhirwall_ready"), 0.0);

    // Still serving, on new connections too; every answer, a denial as
    // well, closes its connection.
    let fresh = reqwest::Client::new();
    for (rel, id, status) in [
        ("Observation/obs-p1-1", "grace-1", 200),
        ("Condition/cond-p1", "grace-2", 403),
    ] {
        let r = fresh
            .get(format!("{}/{rel}", gw.base))
            .bearer_auth(&token)
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{id}");
        assert_eq!(r.headers().get("connection").unwrap(), "close", "{id}");
    }
    assert!(upstream_ids(&gw, "grace-").contains("grace-1"));
    assert!(!upstream_ids(&gw, "grace-").contains("grace-2"));
    assert!(gw.exited().is_none(), "stopped inside the grace period");

    let status = gw.wait_exit(15).await;
    assert!(status.success(), "fhirwall exited with {status}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "exited after {took:?}, inside the grace period"
    );
    assert!(
        took < Duration::from_secs(15),
        "waited out the drain timeout: {took:?}"
    );
    let recorded = recorded_request_ids(&gw);
    for id in ["grace-0", "grace-1", "grace-2"] {
        assert!(recorded.contains(id), "no record of {id}");
    }
}

/// When the listener stops, connections already accepted keep waiting a
/// moment for their request: one accepted just before (its request on the
/// way) and an idle kept-alive one are both answered — closing their
/// connections — rather than reset, and the process then exits with every
/// answer recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_when_the_listener_stops_are_answered_not_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut gw = Gateway::start(Options {
        server_yaml: "  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 20\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let kept = reqwest::Client::new();
    let first = kept
        .get(format!("{}/Observation/obs-p1-1", gw.base))
        .bearer_auth(&token)
        .header("x-request-id", "linger-0")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_ne!(first.headers().get("connection").unwrap(), "close");
    first.bytes().await.unwrap();
    let mut accepted = tokio::net::TcpStream::connect(gw.proxy_addr())
        .await
        .unwrap();
    // Taken from the kernel's queue by fhirwall (a connection still queued
    // when the listener closes is reset by the kernel, whatever fhirwall
    // does).
    let port = gw.proxy_addr().port();
    wait_until("fhirwall to accept the connection", 5, async || {
        accept_queue(port) == Some(0)
    })
    .await;

    gw.signal_term();
    let addr = gw.proxy_addr();
    wait_until("the listener to close", 5, async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    let request = format!(
        "GET /fhir/Observation/obs-p1-1 HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nX-Request-Id: linger-1\r\n\r\n"
    );
    accepted.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), accepted.read_to_end(&mut answer))
        .await
        .expect("the answer ends with its connection")
        .expect("the connection was not reset");
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    let r = kept
        .get(format!("{}/Observation/obs-p1-1", gw.base))
        .bearer_auth(&token)
        .header("x-request-id", "linger-2")
        .send()
        .await
        .expect("the kept-alive connection still answers");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get("connection").unwrap(), "close");
    assert_eq!(
        upstream_ids(&gw, "linger-"),
        ["linger-0", "linger-1", "linger-2"]
            .map(String::from)
            .into()
    );

    let status = gw.wait_exit(15).await;
    assert!(status.success(), "fhirwall exited with {status}");
    let recorded = recorded_request_ids(&gw);
    for id in ["linger-0", "linger-1", "linger-2"] {
        assert!(recorded.contains(id), "no record of {id}");
    }
}

/// How many connections wait in the kernel's queue of the IPv4 socket
/// listening on `port` (Linux: a listening socket's `rx_queue` in
/// `/proc/net/tcp`).
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let listening = *f.get(3)? == "0A";
        let rx = f.get(4)?.split(':').nth(1)?;
        (listening && local_port == port).then(|| u64::from_str_radix(rx, 16).ok())?
    })
}

/// An operator in a hurry: a second SIGTERM ends a long grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_grace_period() {
    let mut gw = Gateway::start(Options {
        server_yaml: "  grace_period_seconds: 60\n  graceful_shutdown_timeout_seconds: 60\n".into(),
        ..Options::default()
    })
    .await;
    gw.signal_term();
    wait_until("/readyz to answer 503", 2, async || {
        gw.readyz().await == 503
    })
    .await;
    assert!(gw.exited().is_none());
    gw.signal_term();
    let status = gw.wait_exit(10).await;
    assert!(status.success(), "fhirwall exited with {status}");
}

/// A gateway draining after SIGTERM (no grace period, 20 s to drain) with
/// one request in flight: `GET Observation/slow-<id>` (the sandbox stalls
/// 5 s on it) with request id `<id>`, whose answer's status the handle
/// gives. Returns once the listener has closed.
async fn draining_with_one_request(id: &str) -> (Gateway, tokio::task::JoinHandle<Option<u16>>) {
    let gw = Gateway::start(Options {
        read_timeout_ms: 10_000,
        server_yaml: "  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 20\n".into(),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let (url, id_header) = (format!("{}/Observation/slow-{id}", gw.base), id.to_string());
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .header("x-request-id", id_header)
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    });
    wait_until("the request to reach the upstream", 5, async || {
        upstream_ids(&gw, id).contains(id)
    })
    .await;
    gw.signal_term();
    let addr = gw.proxy_addr();
    wait_until("the listener to close", 5, async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    (gw, pending)
}

/// SIGINT during the drain stops at once (exit 130), not after the
/// request still in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_the_drain_stops_at_once() {
    let (mut gw, pending) = draining_with_one_request("interrupted-1").await;
    let signalled = Instant::now();
    gw.signal("INT");
    let status = gw.wait_exit(10).await;
    assert_eq!(status.code(), Some(130), "{status}");
    // The stalled request had about 5 s to go.
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "{:?}",
        signalled.elapsed()
    );
    pending.abort();
}

/// SIGINT while serving, or in the grace period after SIGTERM, stops at
/// once with the shell's code for it (130), as during the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_while_serving_stops_with_130() {
    for grace in [false, true] {
        let mut gw = Gateway::start(Options {
            server_yaml: if grace {
                "  grace_period_seconds: 30\n  graceful_shutdown_timeout_seconds: 1\n".into()
            } else {
                String::new()
            },
            ..Options::default()
        })
        .await;
        if grace {
            gw.signal_term();
            wait_until("not ready", 5, async || gw.readyz().await == 503).await;
        }
        gw.signal("INT");
        let status = gw.wait_exit(10).await;
        assert_eq!(status.code(), Some(130), "grace {grace}: {status}");
    }
}

/// Once the listener has closed, a request still in flight is carried to
/// its answer before the process exits (within the drain timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_when_the_listener_closes_is_answered_before_exit() {
    let (mut gw, pending) = draining_with_one_request("drain-1").await;
    assert!(gw.exited().is_none(), "exited with a request in flight");
    let answered = pending.await.unwrap();
    assert_eq!(answered, Some(404), "the upstream's answer came through");
    let status = gw.wait_exit(10).await;
    assert!(status.success(), "fhirwall exited with {status}");
    let rec = records(&gw.audit_path)
        .into_iter()
        .find(|r| r["request_id"] == "drain-1" && r["event"] == "request")
        .expect("no record of the drained request");
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["status"], 404, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_still_leaves_a_record() {
    let gw = Gateway::start(Options {
        read_timeout_ms: 500,
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    // The sandbox stalls on ids starting with "slow"; the client hangs up
    // long before any answer.
    let mut s = std::net::TcpStream::connect(gw.proxy_addr()).unwrap();
    use std::io::Write;
    write!(
        s,
        "GET /fhir/Observation/slow-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nX-Request-Id: gone-1\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    let rec = gw.audit_for("gone-1");
    assert_eq!(rec["decision"], "error", "{rec}");
    assert_eq!(rec["stage"], "proxy");
    assert_eq!(rec["interaction"], "read");
    assert_eq!(rec["reason"], "client_closed");
    assert_eq!(rec["status"], 0, "nothing was answered");
    assert_eq!(rec["response_bytes"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_rotates_by_age() {
    let gw = Gateway::start(Options {
        audit_yaml: Some(
            "  sink: file\n  path: audit.jsonl\n  rotate_max_age_seconds: 1\n  rotate_max_bytes: 0\n"
                .into(),
        ),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "age-1").await;
    assert_eq!(r.status(), 200);
    let current = gw.dir.join("audit.jsonl");
    wait_until("the first record", 5, async || {
        records(&current)
            .iter()
            .any(|r| r["request_id"] == "age-1" && r["event"] == "request")
    })
    .await;
    // Rotated by age with no further traffic.
    wait_until("age-1 rotated away without traffic", 5, async || {
        !records(&current).iter().any(|r| r["request_id"] == "age-1")
    })
    .await;
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "age-2").await;
    assert_eq!(r.status(), 200);
    wait_until("the second record", 5, async || {
        records(&current)
            .iter()
            .any(|r| r["request_id"] == "age-2" && r["event"] == "request")
    })
    .await;
    // The file holding age-1's request record was rotated away before
    // age-2 was written (age-1 may have rotated once itself: the file was
    // created at start).
    let holder = |id: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&gw.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("audit.jsonl")
                    && records(p)
                        .iter()
                        .any(|r| r["request_id"] == id && r["event"] == "request")
            })
            .collect()
    };
    let (one, two) = (holder("age-1"), holder("age-2"));
    assert_eq!((one.len(), two.len()), (1, 1));
    assert_eq!(two[0], current);
    assert_ne!(one[0], current, "not rotated by age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_in_a_file_follow_balp() {
    let gw = Gateway::start(Options {
        audit_yaml: Some("  sink: file\n  path: audit.jsonl\n  format: audit_event\n".into()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("patient/Observation.rs", Some("p1"));
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "ae-1").await;
    assert_eq!(r.status(), 200);
    let r = get_with_id(&gw, "Condition?code=x", &token, "ae-2").await;
    assert_eq!(r.status(), 403);
    let event_of = |id: &str| -> Option<Value> {
        records(&gw.dir.join("audit.jsonl")).into_iter().find(|ev| {
            let e = ev["entity"].to_string();
            e.contains(&format!("\"valueString\":\"{id}\""))
                && e.contains("\"valueString\":\"request\"")
        })
    };
    wait_until("both events", 5, async || {
        event_of("ae-1").is_some() && event_of("ae-2").is_some()
    })
    .await;
    let read = event_of("ae-1").unwrap();
    assert_eq!(read["resourceType"], "AuditEvent");
    assert_eq!(
        read["meta"]["profile"][0],
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
    );
    assert_eq!(read["outcome"], "0");
    assert_eq!(read["entity"][0]["what"]["reference"], "Patient/p1");
    assert_eq!(
        read["entity"][1]["what"]["reference"],
        "Observation/obs-p1-1"
    );
    assert_eq!(read["agent"][0]["network"]["address"], "127.0.0.1");
    let denied = event_of("ae-2").unwrap();
    assert_eq!(denied["outcome"], "8");
    assert_eq!(denied["type"]["code"], "110113");
    assert!(denied.get("meta").is_none());
    assert!(denied["outcomeDesc"]
        .as_str()
        .unwrap()
        .contains("insufficient_scope"));
    let text = std::fs::read_to_string(gw.dir.join("audit.jsonl")).unwrap();
    assert!(!text.contains(&token));
    assert!(!text.contains("code=x"), "a query value is in the audit");
    use base64::Engine;
    let query = denied["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["query"].as_str())
        .unwrap();
    let query = base64::engine::general_purpose::STANDARD
        .decode(query)
        .unwrap();
    assert!(
        String::from_utf8(query)
            .unwrap()
            .ends_with("/fhir/Condition?code=<redacted>"),
        "the query entity keeps names only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_at_shutdown_still_has_its_record() {
    let mut gw = Gateway::start(Options {
        read_timeout_ms: 10_000,
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    // The sandbox stalls 5 s on "slow" ids; the shutdown drains for 1 s
    // only, then Pingora drops the request's task.
    let (base, t) = (gw.base.clone(), token.clone());
    let pending = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let _ = client
            .get(format!("{base}/Observation/slow-9"))
            .bearer_auth(t)
            .header("x-request-id", "abandoned-1")
            .send()
            .await;
    });
    wait_until("the request to reach the upstream", 5, async || {
        !upstream_ids(&gw, "abandoned-").is_empty()
    })
    .await;
    let status = gw.terminate();
    assert!(status.success(), "fhirwall exited with {status}");
    let rec = records(&gw.audit_path)
        .into_iter()
        .find(|r| r["request_id"] == "abandoned-1" && r["event"] == "request")
        .expect("no request record of the abandoned request");
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason"], "abandoned");
    assert_eq!(rec["interaction"], "read");
    assert_eq!(rec["resource_id"], "slow-9");
    // As every record: the public path, and status 0 for no answer sent.
    assert!(
        rec["path"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/Observation/slow-9"),
        "{rec}"
    );
    assert_eq!(rec["status"], 0, "{rec}");
    pending.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_after_its_answer_began_records_the_status_sent() {
    let mut gw = Gateway::start(Options {
        read_timeout_ms: 10_000,
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    // The sandbox sends the header and a first piece of "trickle" at once,
    // the rest never within the 1 s the shutdown drains.
    let (base, t) = (gw.base.clone(), token.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let pending = tokio::spawn(async move {
        let mut answer = reqwest::Client::new()
            .get(format!("{base}/Observation/trickle"))
            .bearer_auth(t)
            .header("x-request-id", "cut-short-1")
            .send()
            .await
            .expect("the answer's header");
        let first = answer.chunk().await;
        let _ = tx.send((answer.status().as_u16(), first.is_ok()));
        let _ = answer.chunk().await;
    });
    let (status, got_first) = tokio::time::timeout(std::time::Duration::from_secs(5), rx)
        .await
        .expect("the answer's header within 5 s")
        .unwrap();
    assert_eq!((status, got_first), (200, true));
    let exit = gw.terminate();
    assert!(exit.success(), "fhirwall exited with {exit}");
    let rec = records(&gw.audit_path)
        .into_iter()
        .find(|r| r["request_id"] == "cut-short-1" && r["event"] == "request")
        .expect("no request record of the request cut short");
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["reason"], "abandoned");
    // The client got a 200's header: the record says so, not "no answer".
    assert_eq!(rec["status"], 200, "{rec}");
    assert!(
        rec["detail"]
            .as_str()
            .unwrap()
            .contains("200 answer was sent"),
        "{rec}"
    );
    pending.abort();
}

/// A gateway whose FHIR audit sink is `endpoint`, which takes no records:
/// it does not become ready, and a request (id `id`) is refused (503)
/// with nothing upstream.
async fn refused_for_want_of_an_audit_sink(endpoint: String, id: &str) -> Gateway {
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: {endpoint}\n"
        )),
        expect_ready: false,
        ..Options::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.readyz().await, 503);
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, id).await;
    assert_eq!(r.status(), 503);
    assert!(upstream_ids(&gw, id).is_empty());
    gw
}

/// An endpoint's query may hold a key (`?subscription-key=`): a sink that
/// cannot be reached is logged without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_audit_endpoint_is_logged_without_its_query() {
    let closed = support::free_port();
    let gw = refused_for_want_of_an_audit_sink(
        format!("http://127.0.0.1:{closed}/fhir?subscription-key=KEY-IN-QUERY"),
        "closed-sink-1",
    )
    .await;
    let log = gw.stderr_containing("audit sink failed").await;
    assert!(log.contains("127.0.0.1"), "{log}");
    assert!(
        log.contains("Connection refused"),
        "the cause is logged: {log}"
    );
    assert!(!log.contains("KEY-IN-QUERY"), "{log}");
}

/// An endpoint path that takes no batch (a 404: a wrong path) is not an
/// audit sink: the gateway does not become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_audit_endpoint_path_keeps_the_gateway_unready() {
    let sink = AuditServer::new();
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    refused_for_want_of_an_audit_sink(format!("http://{addr}/not-fhir"), "wrong-path-1").await;
}

/// Records go to the configured endpoint only: one that redirects (here
/// to a working sink) is not followed, so it is no audit sink and the
/// gateway does not become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_endpoint_that_redirects_is_not_followed() {
    let sink = AuditServer::new();
    let (sink_addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let moved = axum::Router::new().fallback(move || async move {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [("location", format!("http://{sink_addr}/fhir"))],
        )
    });
    let redirector = tokio::spawn(async move { axum::serve(listener, moved).await });
    refused_for_want_of_an_audit_sink(format!("http://{addr}/fhir"), "redirected-1").await;
    assert!(sink.request_ids("request").is_empty());
    redirector.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_empty_bundles_still_makes_the_gateway_ready() {
    let sink = AuditServer::new();
    sink.reject_empty.store(true, Ordering::SeqCst);
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    // `start` waits for /readyz: it would time out if the probe's 400
    // counted as the endpoint being down.
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: fhir\n  format: audit_event\n  fhir:\n    endpoint: http://{addr}/fhir\n"
        )),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "strict-1").await;
    assert_eq!(r.status(), 200);
    wait_until("the request event", 5, async || {
        sink.request_ids("request").contains("strict-1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_sent_in_chunks_is_not_sent_twice_after_a_partial_failure() {
    let sink = AuditServer::new();
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: fhir\n  format: audit_event\n  retry_ms: 300\n  fhir:\n    endpoint: http://{addr}/fhir\n    batch_max: 1\n"
        )),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    // The endpoint refuses everything: requests are refused, their request
    // records are held.
    sink.budget.store(0, Ordering::SeqCst);
    for n in 0..4 {
        let r = get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("chunk-{n}")).await;
        assert_eq!(r.status(), 503);
    }
    // The records the writer holds while the sink is down (taken from the
    // queue and tried again every retry_ms) show in the queue depth.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let depth = metric(&gw.metrics().await, "fhirwall_audit_queue_depth");
    assert!(depth >= 4.0, "{depth}");
    // It takes two one-event Bundles, then fails again; later all.
    sink.budget.store(2, Ordering::SeqCst);
    wait_until("two chunks taken", 10, async || {
        sink.budget.load(Ordering::SeqCst) == 0
    })
    .await;
    sink.budget.store(-1, Ordering::SeqCst);
    let want: BTreeSet<String> = (0..4).map(|n| format!("chunk-{n}")).collect();
    wait_until("every held record", 10, async || {
        want.is_subset(&sink.request_ids("request"))
    })
    .await;
    let puts = sink.puts.lock().unwrap();
    let twice: Vec<_> = puts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent again: {twice:?}");
}

/// `audit.sink: stdout`: one JSON record per line on the process's stdout,
/// decisions and denials alike, no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_sink_writes_json_lines() {
    let gw = Gateway::start(Options {
        audit_yaml: Some("  sink: stdout\n".into()),
        ..Options::default()
    })
    .await;
    let token = gw.mint("user/Patient.rs", None);
    let r = get_with_id(&gw, "Patient/p1", &token, "stdout-allow-1").await;
    assert_eq!(r.status(), 200);
    let r = get_with_id(&gw, "Condition/cond-p1", &token, "stdout-deny-1").await;
    assert_eq!(r.status(), 403);
    let stdout = gw.dir.join("stdout.log");
    let read = || std::fs::read_to_string(&stdout).unwrap_or_default();
    wait_until("both records on stdout", 5, async || {
        let t = read();
        t.contains("\"request_id\":\"stdout-allow-1\"")
            && t.contains("\"request_id\":\"stdout-deny-1\"")
    })
    .await;
    let text = read();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let find = |id: &str| {
        records
            .iter()
            .find(|r| r["request_id"] == id && r["event"] == "request")
            .unwrap_or_else(|| panic!("no request record for {id}: {text}"))
    };
    let allow = find("stdout-allow-1");
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["status"], 200);
    let deny = find("stdout-deny-1");
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["reason"], "insufficient_scope");
    assert_eq!(deny["status"], 403);
    assert!(!text.contains(&token), "the token itself is on stdout");
}

/// A refusal names what was refused, never the values a client searched
/// with: the other patient a search named, not the rest of its list; a
/// Bundle entry's path, not its query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_no_searched_values() {
    let gw = Gateway::start(Options::default()).await;
    let p1 = gw.mint("patient/*.rs", Some("p1"));
    let r = get_with_id(
        &gw,
        "Observation?patient=Smith+1970-01-01,p2&code=x",
        &p1,
        "values-1",
    )
    .await;
    assert_eq!(r.status(), 403);
    let rec = gw.audit_for("values-1").to_string();
    assert!(rec.contains("names a patient, other than"), "{rec}");
    assert!(!rec.contains("Smith"), "{rec}");
    let user = gw.mint("user/*.rs", None);
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "/Patient?name=John Smith&birthdate=1970-01-01"}}]});
    let r = gw
        .client
        .post(format!("{}/", gw.base))
        .bearer_auth(&user)
        .header("content-type", "application/fhir+json")
        .header("x-request-id", "values-2")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let rec = gw.audit_for("values-2").to_string();
    assert!(rec.contains("must be relative"), "{rec}");
    for value in ["Smith", "1970"] {
        assert!(!rec.contains(value), "{value}: {rec}");
    }
}

/// A record the audit endpoint refuses for itself does not stop the sink:
/// held, it was sent first forever and every request got 503 until a
/// restart. Too large (413): a batch of many entries, whose decision
/// record is refused (the request gets 503, nothing upstream), is counted
/// and let go, and the next request is served and recorded. Invalid (an
/// entry status of 400 while the endpoint takes the records beside it):
/// the same, once it is sent with others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_audit_endpoint_refuses_does_not_block_the_others() {
    let sink = AuditServer::new();
    sink.max_body.store(64 * 1024, Ordering::SeqCst);
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "").await;
    let token = gw.mint("system/Observation.rs", None);
    let r = batch_of_reads(&gw, &token, "too-large-1", 600, "Observation/refused-").await;
    assert_eq!(r.status(), 503, "its decision could not be recorded");
    assert_eq!(gw.upstream.count_containing("refused-"), 0);
    // Sent alone, a refused record cannot be told from an endpoint that
    // refuses every record: the sink fails until it goes with others that
    // are taken (the requests refused meanwhile have records too).
    let served_again = async |prefix: &str| {
        let mut n = 0;
        wait_until("served again", 10, async || {
            n += 1;
            let id = format!("{prefix}-{n}");
            get_with_id(&gw, "Observation/obs-p1-1", &token, &id)
                .await
                .status()
                == 200
        })
        .await;
        let last = format!("{prefix}-{n}");
        wait_until("its request record", 5, async || {
            sink.request_ids("request").contains(&last)
        })
        .await;
    };
    served_again("after-large").await;
    let refused =
        || async { support::metric(&gw.metrics().await, "fhirwall_audit_records_refused_total") };
    let after_large = refused().await;
    assert!(after_large >= 1.0, "the large request record set aside");
    assert_eq!(
        support::metric(&gw.metrics().await, "fhirwall_audit_sink_up"),
        1.0
    );

    *sink.refuse_marker.lock().unwrap() = Some("zz-poison-record".into());
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "zz-poison-record").await;
    assert_eq!(r.status(), 503, "its decision could not be recorded");
    served_again("after-invalid").await;
    assert!(
        refused().await > after_large,
        "the invalid record set aside"
    );
}

/// A repository that checks references refuses an AuditEvent naming a
/// resource it does not hold: one that is not there (a read answered 404,
/// a deleted one) or a user on another server (an absolute fhirUser). Such
/// an event is sent again with its references as text, and taken: the
/// request is served, not refused because its record could not be kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_checking_references_gets_them_as_text() {
    let sink = AuditServer::new();
    *sink.holds.lock().unwrap() = Some(BTreeSet::from(["Patient/p1".to_string()]));
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "").await;
    let token = gw.mint("user/Patient.rs", None);
    let r = get_with_id(&gw, "Patient/p1", &token, "held-1").await;
    assert_eq!(r.status(), 200);
    let r = get_with_id(&gw, "Patient/not-there-1", &token, "dangling-1").await;
    assert_eq!(r.status(), 404, "served, its record kept");
    let mut claims = gw.claims("user/Patient.rs");
    claims["fhirUser"] = json!("https://ehr.example.org/fhir/Practitioner/dr-7");
    let remote = gw.issuer.signing_key().sign(&claims);
    let r = get_with_id(&gw, "Patient/p1", &remote, "remote-user-1").await;
    assert_eq!(r.status(), 200, "served, its record kept");
    wait_until("every request event", 10, async || {
        let ids = sink.request_ids("request");
        ["held-1", "dangling-1", "remote-user-1"]
            .iter()
            .all(|id| ids.contains(*id))
    })
    .await;
    let events = sink.events.lock().unwrap().clone();
    let of = |id: &str| {
        events
            .values()
            .filter(|ev| {
                ev["entity"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["type"]["code"] == "XrequestId" && client_request_id(e) == id)
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    // Kept as they were where the repository holds what they name.
    for ev in of("held-1") {
        let refs = event_references(&ev);
        assert!(
            !refs.is_empty() && refs.iter().all(|r| r == "Patient/p1"),
            "{ev}"
        );
    }
    // As text where not.
    for ev in of("dangling-1") {
        assert!(event_references(&ev).is_empty(), "{ev}");
        assert!(
            ev.to_string()
                .contains(r#""display":"Patient/not-there-1""#),
            "{ev}"
        );
    }
    for ev in of("remote-user-1") {
        assert!(
            ev.to_string()
                .contains(r#""display":"https://ehr.example.org/fhir/Practitioner/dr-7""#),
            "{ev}"
        );
    }
    assert_eq!(
        support::metric(&gw.metrics().await, "fhirwall_audit_records_refused_total"),
        0.0
    );
}

/// Under a body limit only single records fit under, a Bundle holding an
/// invalid record is refused whole (413), then sent one record at a time:
/// the invalid one, refused by its entry status, is set aside, and the
/// records sent beside it are taken, so requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_record_in_a_bundle_refused_whole_is_found_one_by_one() {
    let sink = AuditServer::new();
    sink.max_entries.store(1, Ordering::SeqCst);
    *sink.refuse_marker.lock().unwrap() = Some("zz-poison-record".into());
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "").await;
    let token = gw.mint("system/Observation.rs", None);
    assert_eq!(
        get_with_id(&gw, "Observation/obs-p1-1", &token, "first")
            .await
            .status(),
        200
    );
    let r = get_with_id(&gw, "Observation/obs-p1-2", &token, "zz-poison-record").await;
    assert_eq!(r.status(), 503, "its decision could not be recorded");
    assert_eq!(gw.upstream.count_containing("obs-p1-2"), 0);
    // Its request record, held, goes with the next records: a Bundle of
    // more than one is refused whole, so each is sent alone.
    let mut n = 0;
    wait_until("served again", 10, async || {
        n += 1;
        get_with_id(&gw, "Observation/obs-p1-1", &token, &format!("again-{n}"))
            .await
            .status()
            == 200
    })
    .await;
    wait_until("the invalid record set aside", 5, async || {
        support::metric(&gw.metrics().await, "fhirwall_audit_records_refused_total") >= 1.0
    })
    .await;
    wait_until("the records sent beside it", 5, async || {
        sink.request_ids("request").contains("first")
    })
    .await;
    assert!(!sink.request_ids("request").contains("zz-poison-record"));
}

/// With `record_before_upstream: false` only a request record follows the
/// answer; still, once the sink is known to fail, nothing is served
/// (`on_failure: refuse`) until it works again, as the documentation
/// promises for every setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_decision_records_a_failing_sink_still_refuses_requests() {
    let sink = AuditServer::new();
    let (addr, server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "  record_before_upstream: false\n").await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "up-0").await;
    assert_eq!(r.status(), 200);

    server.abort();
    let _ = server.await;
    // The failure shows once a record fails to go: a request served
    // before that is recorded later (held).
    let mut n = 0;
    wait_until("the failing sink refuses", 10, async || {
        n += 1;
        let path = format!("Observation/before-fail-{n}");
        get_with_id(&gw, &path, &token, &format!("before-{n}"))
            .await
            .status()
            == 503
    })
    .await;
    for n in 0..3 {
        let r = get_with_id(
            &gw,
            &format!("Observation/down-{n}"),
            &token,
            &format!("down-{n}"),
        )
        .await;
        assert_eq!(r.status(), 503, "served while records cannot be written");
        assert!(r.headers().contains_key("retry-after"));
    }
    assert_eq!(gw.upstream.count_containing("Observation/down-"), 0);
    assert_eq!(gw.readyz().await, 503);

    let (_, _server) = sink.serve(addr).await;
    wait_until("served again", 10, async || {
        get_with_id(&gw, "Observation/obs-p1-1", &token, "back-0")
            .await
            .status()
            == 200
    })
    .await;
    wait_until("held records written", 10, async || {
        sink.request_ids("request").contains("down-2")
    })
    .await;
}

/// A write that the disk fills part-way through leaves no torn line: the
/// file is cut back to where it was (it had a partial record, then the
/// next open ended it as a line that is no JSON), and the records go whole
/// once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_short_by_a_full_disk_leaves_no_torn_line() {
    use std::io::Write;
    let dir = support::TempDir::new("partial");
    let disk = dir.0.join("disk");
    std::fs::create_dir(&disk).unwrap();
    let gw = Gateway::start(Options {
        audit_yaml: Some(format!(
            "  sink: file\n  path: {d}/audit.jsonl\n  retry_ms: 200\n",
            d = disk.display()
        )),
        namespace_setup: Some(format!(
            "mount -t tmpfs -o size=1m tmpfs {d}",
            d = disk.display()
        )),
        ..Options::default()
    })
    .await;
    let token = gw.mint("system/Observation.rs", None);
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "partial-0").await;
    assert_eq!(r.status(), 200);
    // No room left but what fhirwall reserved at start (64 KiB).
    let fill = gw.own_path(&disk.join("fill"));
    {
        let mut f = std::fs::File::create(&fill).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    // A decision record of about 100 KiB: a Bundle of 1000 reads.
    let url = "Observation/partial-entry-with-a-long-id-";
    let r = batch_of_reads(&gw, &token, "partial-1", 1000, url).await;
    assert_eq!(r.status(), 503, "its decision could not be recorded");
    assert_eq!(gw.upstream.count_containing("partial-entry"), 0);

    std::fs::remove_file(&fill).unwrap();
    wait_until("ready", 10, async || gw.readyz().await == 200).await;
    let r = get_with_id(&gw, "Observation/obs-p1-1", &token, "partial-2").await;
    assert_eq!(r.status(), 200);
    let audit = gw.own_path(&disk.join("audit.jsonl"));
    wait_until("the records after", 10, async || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.contains("\"partial-2\"") && text.contains("\"partial-1\"")
    })
    .await;
    // Every line is a whole record (`records` fails on a torn one).
    let recs = records(&audit);
    assert!(recs
        .iter()
        .any(|r| r["request_id"] == "partial-1" && r["event"] == "request"));
}

/// An endpoint that refuses every record (a body limit below any record)
/// is a failing sink, not a sink whose records are each set aside: with
/// only request records written (`record_before_upstream: false`), the
/// gateway stops serving instead of serving while every record is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_endpoint_refusing_every_record_is_a_failing_sink() {
    let sink = AuditServer::new();
    sink.max_body.store(200, Ordering::SeqCst);
    let (addr, _server) = sink.serve("127.0.0.1:0".parse().unwrap()).await;
    let gw = with_fhir_sink(addr, "  record_before_upstream: false\n").await;
    let token = gw.mint("system/Observation.rs", None);
    let mut n = 0;
    wait_until("requests refused", 10, async || {
        n += 1;
        let path = format!("Observation/all-refused-{n}");
        get_with_id(&gw, &path, &token, &format!("all-refused-{n}"))
            .await
            .status()
            == 503
    })
    .await;
    assert_eq!(gw.readyz().await, 503);
    let m = gw.metrics().await;
    assert_eq!(support::metric(&m, "fhirwall_audit_sink_up"), 0.0, "{m}");
    assert_eq!(
        support::metric(&m, "fhirwall_audit_records_refused_total"),
        0.0,
        "{m}"
    );
}

/// A method is any token, as long as the request head allows (1 MiB): the
/// record and the error log keep at most 32 bytes of it, so a client
/// without a token cannot fill the audit with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_method_is_recorded_cut_short() {
    let gw = Gateway::start(Options::default()).await;
    let method = "M".repeat(100_000);
    let mut s = std::net::TcpStream::connect(gw.proxy_addr()).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "{method} /fhir/Patient HTTP/1.1\r\nHost: x\r\nX-Request-Id: long-method-1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let rec = gw.audit_for("long-method-1");
    let recorded = rec["method"].as_str().unwrap_or("");
    assert_eq!(
        recorded,
        "M".repeat(32),
        "{} bytes recorded",
        recorded.len()
    );
    assert!(
        rec.to_string().len() < 4096,
        "{} bytes",
        rec.to_string().len()
    );
    assert!(gw.upstream.seen().is_empty());
}

/// Under `user/` scopes the record names the patients a request reaches
/// (a search's `patient=`, `Patient/{id}/$everything`), beside the
/// token's launch patient: an accounting of who read whose data finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_names_the_patients_a_request_reaches() {
    let gw = Gateway::start(Options::default()).await;
    let token = gw.mint("user/*.rs", Some("p1"));
    for (rel, id, want) in [
        ("Observation?patient=p2", "named-1", json!(["p2"])),
        ("Patient/p3/$everything", "named-2", json!(["p3"])),
        ("Observation?code=8867-4", "named-3", Value::Null),
    ] {
        let r = get_with_id(&gw, rel, &token, id).await;
        assert_eq!(r.status(), 200, "{rel}");
        let rec = gw.audit_for(id);
        assert_eq!(rec["patients"], want, "{rel}: {rec}");
        assert_eq!(rec["patient"], "p1", "the launch patient, as before");
    }
}

/// A path with characters that break or hide a line (Unicode's line
/// separator, a bidi override), sent raw or percent-encoded, is kept in
/// the record as text a reader sees as written: the raw path
/// percent-encoded, the decoded one in the detail by its code points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_break_or_hide_lines_are_recorded_visibly() {
    let gw = Gateway::start(Options::default()).await;
    let addr = gw.proxy_addr();
    let raw = "/fhir/x\u{2028}{\"forged\":1}\u{202E}y";
    // (Not below the base: refused for that, the decoded path named.)
    let encoded = "/elsewhere/%E2%80%A8z%E2%80%AE";
    for (id, path) in [("uni-raw", raw), ("uni-encoded", encoded)] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nX-Request-Id: {id}\r\nConnection: close\r\n\r\n"
        );
        let (status, _) = tokio::task::spawn_blocking(move || support::raw_request(addr, &request))
            .await
            .unwrap();
        assert!((400..500).contains(&status), "{id}: {status}");
    }
    let rec = gw.audit_for("uni-raw");
    assert_eq!(
        rec["path"], "/fhir/x%E2%80%A8{\"forged\":1}%E2%80%AEy",
        "{rec}"
    );
    let rec = gw.audit_for("uni-encoded");
    assert_eq!(rec["path"], encoded, "{rec}");
    assert!(
        rec["detail"]
            .as_str()
            .unwrap()
            .contains("\\u{2028}z\\u{202E}"),
        "{rec}"
    );
    let text = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(
        !text.contains('\u{2028}') && !text.contains('\u{202E}'),
        "{text}"
    );
    for line in text.lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }
}
