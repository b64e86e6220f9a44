//! A small in-memory FHIR R4 server with synthetic patients, for
//! `fhirwall demo`, the integration tests and the load bench. It records
//! every request it receives, so tests can prove what never reached it.
//! Not a real FHIR server: enough reads and searches to show the gateway.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as received.
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// The body, when at most 64 KiB (tests read what was forwarded).
    pub body: Bytes,
    /// The client's address: requests over one pooled connection share it.
    pub peer: SocketAddr,
}

/// Shared state of a running sandbox upstream.
pub struct FhirSandbox {
    pub base_path: String,
    resources: BTreeMap<(String, String), Value>,
    seen: Mutex<Vec<Seen>>,
    /// Whether requests are kept in `seen` (tests read them; `demo`, left
    /// running, does not keep them).
    keep_seen: std::sync::atomic::AtomicBool,
    /// See [`FhirSandbox::trust_forwarded_headers`].
    trust_forwarded: std::sync::atomic::AtomicBool,
}

/// Synthetic data: three patients, their Observations and Conditions.
pub fn synthetic_resources() -> Vec<Value> {
    let mut out = Vec::new();
    let people = [
        ("p1", "Alice", "Example"),
        ("p2", "Bob", "Sample"),
        ("p3", "Carol", "Test"),
    ];
    for (i, (id, given, family)) in people.iter().enumerate() {
        out.push(json!({
            "resourceType": "Patient", "id": id,
            "name": [{"given": [given], "family": family}],
            "gender": if i == 1 { "male" } else { "female" },
            "birthDate": format!("19{}-0{}-1{}", 70 + i * 7, i + 1, i)
        }));
        for (n, (code, display, value)) in [
            ("8867-4", "Heart rate", 72 + i),
            ("2339-0", "Glucose", 95 + 3 * i),
        ]
        .iter()
        .enumerate()
        {
            out.push(json!({
                "resourceType": "Observation", "id": format!("obs-{id}-{n}"), "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": if n == 0 { "vital-signs" } else { "laboratory" }}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
                "subject": {"reference": format!("Patient/{id}")},
                "performer": if n == 0 { json!([{"reference": "Practitioner/dr-1"}]) } else { json!([]) },
                "valueQuantity": {"value": value}
            }));
        }
        let condition = ["Hypertension", "Asthma", "Type 2 diabetes"][i];
        out.push(json!({
            "resourceType": "Condition", "id": format!("cond-{id}"),
            "code": {"text": condition},
            "subject": {"reference": format!("Patient/{id}")}
        }));
    }
    // In p1's compartment only as performer (the subject is p2).
    out.push(json!({
        "resourceType": "Observation", "id": "obs-shared", "status": "final",
        "code": {"text": "Observation by p1 about p2"},
        "subject": {"reference": "Patient/p2"},
        "performer": [{"reference": "Practitioner/dr-1"}, {"reference": "Patient/p1"}]
    }));
    // Moved from p2 to p1: version 1 (see `history`) belonged to p2.
    out.push(json!({
        "resourceType": "Observation", "id": "obs-moved", "status": "final",
        "meta": {"versionId": "2"},
        "code": {"text": "Reassigned observation"},
        "subject": {"reference": "Patient/p1"}
    }));
    // Outside every patient's compartment.
    out.push(json!({
        "resourceType": "Practitioner", "id": "dr-1",
        "name": [{"family": "Welby"}]
    }));
    out
}

/// Earlier versions, oldest first, of resources that have them.
fn earlier_versions(t: &str, id: &str) -> Vec<Value> {
    match (t, id) {
        ("Observation", "obs-moved") => vec![json!({
            "resourceType": "Observation", "id": "obs-moved", "status": "preliminary",
            "meta": {"versionId": "1"},
            "code": {"text": "Glucose of Bob (p2)"},
            "subject": {"reference": "Patient/p2"}
        })],
        _ => Vec::new(),
    }
}

impl FhirSandbox {
    pub fn new(base_path: &str) -> Arc<FhirSandbox> {
        FhirSandbox::with_resources(base_path, Vec::new())
    }

    /// A sandbox holding `extra` resources besides the synthetic ones (a
    /// test's own data).
    pub fn with_resources(base_path: &str, extra: Vec<Value>) -> Arc<FhirSandbox> {
        let resources = synthetic_resources()
            .into_iter()
            .chain(extra)
            .map(|r| {
                (
                    (
                        r["resourceType"].as_str().unwrap().to_string(),
                        r["id"].as_str().unwrap().to_string(),
                    ),
                    r,
                )
            })
            .collect();
        Arc::new(FhirSandbox {
            base_path: base_path.trim_end_matches('/').to_string(),
            resources,
            seen: Mutex::new(Vec::new()),
            keep_seen: std::sync::atomic::AtomicBool::new(true),
            trust_forwarded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Builds its links from `X-Forwarded-Proto` and `X-Forwarded-Host`
    /// when they are sent, as HAPI does with `ApacheProxyAddressStrategy`
    /// (its own path kept).
    pub fn trust_forwarded_headers(&self) {
        self.trust_forwarded
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `scheme://host` of the links in an answer to a request with
    /// `headers`: the `Host` it was sent (HAPI's default), or the
    /// forwarded ones if trusted.
    fn origin(&self, headers: &HeaderMap) -> String {
        let get = |name: &str| headers.get(name).and_then(|h| h.to_str().ok());
        let host = get("host").unwrap_or("localhost");
        if self
            .trust_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(forwarded) = get("x-forwarded-host") {
                let proto = get("x-forwarded-proto").unwrap_or("http");
                return format!("{proto}://{forwarded}");
            }
        }
        format!("http://{host}")
    }

    /// Stops keeping received requests (and forgets those kept): a
    /// long-running sandbox would otherwise grow with every request.
    pub fn forget_requests(&self) {
        self.keep_seen
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.seen.lock().unwrap().clear();
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many received requests have a URI containing `needle`.
    pub fn count_containing(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.uri.contains(needle))
            .count()
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let app = Router::new().fallback(handle).with_state(self);
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    }

    /// Binds 127.0.0.1 on a free port and serves in a spawned task.
    pub async fn spawn(base_path: &str) -> (Arc<FhirSandbox>, SocketAddr) {
        FhirSandbox::spawn_with(base_path, Vec::new()).await
    }

    /// [`FhirSandbox::spawn`] holding `extra` resources too.
    pub async fn spawn_with(base_path: &str, extra: Vec<Value>) -> (Arc<FhirSandbox>, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sandbox upstream");
        let addr = listener.local_addr().expect("local addr");
        let s = FhirSandbox::with_resources(base_path, extra);
        tokio::spawn(s.clone().serve(listener));
        (s, addr)
    }

    fn matches(&self, r: &Value, params: &[(String, String)]) -> bool {
        // A reference parameter's value: `Type/id`, or a bare id taken as
        // a Patient's.
        let reference = |v: &str| {
            if v.contains('/') {
                v.to_string()
            } else {
                format!("Patient/{v}")
            }
        };
        params.iter().all(|(k, v)| match k.as_str() {
            "_id" => r["id"] == *v,
            "patient" | "subject" => r["subject"]["reference"] == reference(v).as_str(),
            "performer" => {
                let want = reference(v);
                r["performer"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["reference"] == want.as_str())
            }
            "code" => r["code"]["coding"][0]["code"] == v.rsplit('|').next().unwrap_or(v),
            // Token search on category: `code`, `system|code`, OR-ed with `,`.
            "category" => v.split(',').any(|want| {
                let (system, code) = match want.split_once('|') {
                    Some((s, c)) => (Some(s), c),
                    None => (None, want),
                };
                r["category"].as_array().into_iter().flatten().any(|cc| {
                    cc["coding"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["code"] == code && system.is_none_or(|s| c["system"] == s))
                })
            }),
            _ => true,
        })
    }

    /// A batch or transaction, entry by entry: reads and searches answered
    /// from the data, writes acknowledged (nothing is stored).
    /// An instance's history Bundle, its URLs at `origin`, as HAPI links it
    /// (its next page a stored search's id).
    fn history(&self, t: &str, id: &str, origin: &str) -> Option<Value> {
        let r = self.resources.get(&(t.to_string(), id.to_string()))?;
        let mut versions = earlier_versions(t, id);
        versions.push(r.clone());
        versions.reverse();
        let url = format!("{origin}{}/{t}/{id}", self.base_path);
        let entries: Vec<Value> = versions
            .into_iter()
            .map(|v| json!({"fullUrl": url, "resource": v}))
            .collect();
        let next = format!(
            "{origin}{}?_getpages=history-{t}-{id}&_getpagesoffset=20&_count=20&_bundletype=history",
            self.base_path
        );
        Some(
            json!({"resourceType": "Bundle", "type": "history", "total": entries.len(),
               "link": [{"relation": "self", "url": format!("{url}/_history")},
                        {"relation": "next", "url": next}],
               "entry": entries}),
        )
    }

    fn bundle(&self, body: &[u8], origin: &str) -> Value {
        let doc: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let kind = match doc["type"].as_str() {
            Some("transaction") => "transaction-response",
            _ => "batch-response",
        };
        let entries: Vec<Value> = doc["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let method = e["request"]["method"].as_str().unwrap_or("");
                let url = e["request"]["url"].as_str().unwrap_or("");
                let (path, query) = url.split_once('?').unwrap_or((url, ""));
                let segs: Vec<&str> = path.split('/').filter(|x| !x.is_empty()).collect();
                let params: Vec<(String, String)> =
                    url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
                match (method, segs.as_slice()) {
                    // Read entries with their absolute fullUrl, as HAPI
                    // writes them.
                    ("GET", [t, id]) => match self.resources.get(&(t.to_string(), id.to_string())) {
                        Some(r) => json!({"fullUrl": format!("{origin}{}/{t}/{id}", self.base_path),
                            "resource": r, "response": {"status": "200 OK"}}),
                        None => json!({"response": {"status": "404 Not Found"}}),
                    },
                    ("GET", [t]) => json!({"resource": self.search(&[t], &params), "response": {"status": "200 OK"}}),
                    ("GET", [t, id, "_history"]) => match self.history(t, id, origin) {
                        Some(h) => json!({"resource": h, "response": {"status": "200 OK"}}),
                        None => json!({"response": {"status": "404 Not Found"}}),
                    },
                    ("POST", _) => json!({"response": {"status": "201 Created"}}),
                    ("PUT", _) | ("PATCH", _) => json!({"response": {"status": "200 OK"}}),
                    ("DELETE", _) => json!({"response": {"status": "204 No Content"}}),
                    _ => json!({"response": {"status": "400 Bad Request"}}),
                }
            })
            .collect();
        json!({"resourceType": "Bundle", "type": kind,
            "link": [{"relation": "self", "url": format!("{origin}{}", self.base_path)}],
            "entry": entries})
    }

    /// `Patient/{id}/$everything`, paged as HAPI pages it: with `_count`,
    /// a `next` link to the stored result (`?_getpages=everything:{id}`,
    /// the offset in `_getpagesoffset`).
    fn everything(&self, id: &str, params: &[(String, String)], base: &str) -> Value {
        let mut p: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| !k.starts_with("_getpages") && k != "_count" && k != "_bundletype")
            .cloned()
            .collect();
        let mut by_performer = p.clone();
        p.push(("patient".into(), id.to_string()));
        let mut b = self.search(&["Observation", "Condition"], &p);
        let mut entries = b["entry"].as_array().cloned().unwrap_or_default();
        // The compartment's other links: what the patient performed.
        by_performer.push(("performer".into(), format!("Patient/{id}")));
        let performed = self.search(&["Observation"], &by_performer);
        for e in performed["entry"].as_array().into_iter().flatten() {
            if !entries.contains(e) {
                entries.push(e.clone());
            }
        }
        if let Some(r) = self.resources.get(&("Patient".into(), id.to_string())) {
            entries.insert(0, json!({"resource": r}));
        }
        // What the patient's resources reference comes along (the
        // Practitioner performer) — and, for p3, a misbehaving server's
        // extra: another patient's Condition.
        let mut extra = vec![("Practitioner", "dr-1")];
        if id == "p3" {
            extra.push(("Condition", "cond-p2"));
        }
        for (t, x) in extra {
            if let Some(r) = self.resources.get(&(t.to_string(), x.to_string())) {
                entries.push(json!({"resource": r}));
            }
        }
        let number = |n: &str| {
            params
                .iter()
                .find(|(k, _)| k == n)
                .and_then(|(_, v)| v.parse::<usize>().ok())
        };
        let total = entries.len();
        b["total"] = json!(total);
        if let Some(count) = number("_count") {
            let offset = number("_getpagesoffset").unwrap_or(0);
            entries = entries.into_iter().skip(offset).take(count).collect();
            if offset + count < total {
                let next = format!(
                    "{base}?_getpages=everything:{id}&_getpagesoffset={}&_count={count}&_bundletype=searchset",
                    offset + count
                );
                b["link"] = json!([{"relation": "next", "url": next}]);
            }
        }
        b["entry"] = Value::Array(entries);
        b
    }

    fn search(&self, types: &[&str], params: &[(String, String)]) -> Value {
        let entries: Vec<Value> = self
            .resources
            .iter()
            .filter(|((t, _), r)| types.contains(&t.as_str()) && self.matches(r, params))
            .map(|(_, r)| json!({"resource": r, "search": {"mode": "match"}}))
            .collect();
        let total = entries.len();
        // `_include=Type:element`: the resources the matches reference there.
        let mut included: Vec<Value> = Vec::new();
        for (_, inc) in params.iter().filter(|(k, _)| k == "_include") {
            let Some(element) = inc.split(':').nth(1) else {
                continue;
            };
            for e in &entries {
                let refs = match &e["resource"][element] {
                    Value::Array(a) => a.clone(),
                    v @ Value::Object(_) => vec![v.clone()],
                    _ => Vec::new(),
                };
                for r in refs {
                    let Some((t, id)) = r["reference"].as_str().and_then(|x| x.split_once('/'))
                    else {
                        continue;
                    };
                    if let Some(found) = self.resources.get(&(t.to_string(), id.to_string())) {
                        if !included.iter().any(|i| i["resource"] == *found) {
                            included
                                .push(json!({"resource": found, "search": {"mode": "include"}}));
                        }
                    }
                }
            }
        }
        let mut all = entries;
        all.extend(included);
        json!({"resourceType": "Bundle", "type": "searchset", "total": total, "entry": all})
    }
}

/// `_count` / `_offset` paging of a searchset, with `self` and `next` links
/// carrying every other parameter (as a server's paging links do).
fn page(mut bundle: Value, self_url: &str, params: &[(String, String)]) -> Value {
    let get = |n: &str| {
        params
            .iter()
            .find(|(k, _)| k == n)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let rest: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_count" && k != "_offset")
        .cloned()
        .collect();
    let url = |extra: &[(&str, String)]| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &rest {
            q.append_pair(k, v);
        }
        for (k, v) in extra {
            q.append_pair(k, v);
        }
        format!("{self_url}?{}", q.finish())
    };
    let mut links = vec![json!({"relation": "self", "url": url(&[])})];
    if let Some(count) = get("_count") {
        let offset = get("_offset").unwrap_or(0);
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let total = entries.len();
        bundle["entry"] = Value::Array(entries.into_iter().skip(offset).take(count).collect());
        if offset + count < total {
            links.push(json!({"relation": "next", "url": url(&[
                ("_count", count.to_string()),
                ("_offset", (offset + count).to_string()),
            ])}));
        }
    }
    bundle["link"] = Value::Array(links);
    bundle
}

/// A 200 FHIR JSON answer, indented as HAPI writes it when `params` ask
/// `_pretty=true`.
fn fhir_as_asked(params: &[(String, String)], body: Value) -> Response {
    if !params.iter().any(|(k, v)| k == "_pretty" && v == "true") {
        return fhir(StatusCode::OK, body);
    }
    (
        StatusCode::OK,
        [("content-type", "application/fhir+json")],
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
        .into_response()
}

fn fhir(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

/// A body that sends its first piece at once and ends after a stall,
/// unfinished as JSON.
struct Trickle {
    first: Option<Bytes>,
    stall: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        self.stall.as_mut().poll(cx).map(|()| None)
    }
}

/// A body that comes a space at a time, one every `every`, between its
/// `head` and its `tail` (`left` spaces in all): each read is quick, the
/// whole slow.
struct Drip {
    head: Option<Bytes>,
    tail: Option<Bytes>,
    left: usize,
    every: Duration,
    next: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Drip {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        if self.left == 0 {
            return Poll::Ready(self.tail.take().map(|t| Ok(http_body::Frame::data(t))));
        }
        if self.next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let every = self.every;
        self.next = Box::pin(tokio::time::sleep(every));
        self.left -= 1;
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b" ")))))
    }
}

fn not_found(what: &str) -> Response {
    fhir(
        StatusCode::NOT_FOUND,
        json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found", "diagnostics": what}]}),
    )
}

/// Every answer names its server and product, as HAPI's do
/// (`X-Powered-By: HAPI FHIR 7.x REST Server …`).
async fn handle(
    state: State<Arc<FhirSandbox>>,
    peer: ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut r = answer(state, peer, method, uri, headers, body).await;
    let h = r.headers_mut();
    h.insert(
        "x-powered-by",
        axum::http::HeaderValue::from_static("fhirwall sandbox FHIR server"),
    );
    h.insert(
        "server",
        axum::http::HeaderValue::from_static("fhirwall-sandbox/1"),
    );
    r
}

async fn answer(
    State(s): State<Arc<FhirSandbox>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if s.keep_seen.load(std::sync::atomic::Ordering::Relaxed) {
        s.seen.lock().unwrap().push(Seen {
            method: method.to_string(),
            uri: uri.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: body.len(),
            body: if body.len() <= 64 * 1024 {
                body.clone()
            } else {
                Bytes::new()
            },
            peer,
        });
    }
    let Some(rel) = uri.path().strip_prefix(&s.base_path) else {
        return not_found("outside the sandbox base");
    };
    let segs: Vec<&str> = rel.split('/').filter(|x| !x.is_empty()).collect();
    let params: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    // A resource id starting with "slow" makes the sandbox stall (timeout tests).
    if segs.iter().any(|x| x.starts_with("slow")) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let all = ["Patient", "Observation", "Condition", "Practitioner"];
    match (method.as_str(), segs.as_slice()) {
        (_, ["metadata"]) => fhir(
            StatusCode::OK,
            json!({"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                   "fhirVersion": "4.0.1", "format": ["json"], "rest": [{"mode": "server"}]}),
        ),
        (_, [".well-known", "smart-configuration"]) => fhir(
            StatusCode::OK,
            json!({"capabilities": ["permission-v2", "permission-v1"], "scopes_supported": ["patient/*.rs", "user/*.rs"]}),
        ),
        // Misbehaving upstream answers, for the answer-check tests.
        ("GET", ["Observation", "xml-answer"]) => (
            StatusCode::OK,
            [("content-type", "application/fhir+xml")],
            "<Observation xmlns=\"http://hl7.org/fhir\"><subject><reference value=\"Patient/p2\"/></subject></Observation>",
        )
            .into_response(),
        // An answer whose header and first 900 bytes come at once and whose
        // rest never does (5 s), for the tests of requests cut short and
        // of answers held.
        ("GET", ["Observation", "trickle"]) | ("PUT", ["Observation", "trickle"]) => (
            StatusCode::OK,
            [("content-type", "application/fhir+json")],
            axum::body::Body::new(Trickle {
                first: Some(Bytes::from(format!(
                    "{{\"resourceType\": \"Observation\",{:880}",
                    ""
                ))),
                stall: Box::pin(tokio::time::sleep(Duration::from_secs(5))),
            }),
        )
            .into_response(),
        // Patient p1's Observation, whose answer comes a space every
        // 100 ms for 5 s: each read quick, the whole slow.
        ("GET", ["Observation", "drip"]) => (
            StatusCode::OK,
            [("content-type", "application/fhir+json")],
            axum::body::Body::new(Drip {
                head: Some(Bytes::from_static(
                    b"{\"resourceType\": \"Observation\", \"id\": \"drip\",",
                )),
                tail: Some(Bytes::from_static(
                    b"\"status\": \"final\", \"code\": {\"text\": \"drip\"}, \"subject\": {\"reference\": \"Patient/p1\"}}",
                )),
                left: 50,
                every: Duration::from_millis(100),
                next: Box::pin(tokio::time::sleep(Duration::from_millis(100))),
            }),
        )
            .into_response(),
        // Patient p1's Observation whose version is a number, not the
        // string FHIR says (a write to it cannot be pinned).
        ("GET", ["Observation", "numeric-version"]) => fhir(
            StatusCode::OK,
            json!({"resourceType": "Observation", "id": "numeric-version", "status": "final",
                   "meta": {"versionId": 3},
                   "code": {"text": "odd"}, "subject": {"reference": "Patient/p1"}}),
        ),
        // Patient p1's Observation, which the server lets any cache keep.
        ("GET", ["Observation", "cacheable"]) => {
            let mut r = fhir(
                StatusCode::OK,
                json!({"resourceType": "Observation", "id": "cacheable", "status": "final",
                       "code": {"text": "cacheable"}, "subject": {"reference": "Patient/p1"}}),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("public, max-age=600"),
            );
            // And told the CDNs so, in their own headers.
            for name in ["cdn-cache-control", "surrogate-control"] {
                r.headers_mut().insert(
                    name,
                    axum::http::HeaderValue::from_static("public, max-age=600"),
                );
            }
            r
        }
        // Patient p1's Observation marked private, with no lifetime.
        ("GET", ["Observation", "private-only"]) => {
            let mut r = fhir(
                StatusCode::OK,
                json!({"resourceType": "Observation", "id": "private-only", "status": "final",
                       "code": {"text": "private"}, "subject": {"reference": "Patient/p1"}}),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("private"),
            );
            r
        }
        // A server error with a large page.
        ("GET", ["Observation", "large-error"]) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/html")],
            format!("<html>{}</html>", "x".repeat(2000)),
        )
            .into_response(),
        // Patient p1's Observation with a 2,000-character note.
        ("GET", ["Observation", "large"]) => fhir(
            StatusCode::OK,
            json!({"resourceType": "Observation", "id": "large", "status": "final",
                   "code": {"text": "large"}, "subject": {"reference": "Patient/p1"},
                   "valueString": "x".repeat(2000)}),
        ),
        // An upstream that wants credentials of its own.
        ("GET", ["Observation", "upstream-401"]) => (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"hapi-internal\"")],
            "",
        )
            .into_response(),
        ("GET", ["Observation", "wrong-answer"]) => match s.resources.get(&("Observation".into(), "obs-p2-0".into())) {
            Some(r) => fhir(StatusCode::OK, r.clone()),
            None => not_found("gone"),
        },
        ("GET", [t, id]) => match s.resources.get(&(t.to_string(), id.to_string())) {
            Some(r) => fhir(StatusCode::OK, r.clone()),
            None => not_found(&format!("{t}/{id} is not known")),
        },
        ("GET", [t, id, "_history"]) => {
            // Absolute URLs from the Host it was sent, as HAPI's.
            let origin = s.origin(&headers);
            match s.history(t, id, &origin) {
                Some(h) => fhir(StatusCode::OK, h),
                None => not_found(&format!("{t}/{id} is not known")),
            }
        }
        ("GET", [t, id, "_history", v]) => {
            let current = s.resources.get(&(t.to_string(), id.to_string()));
            let version = earlier_versions(t, id)
                .into_iter()
                .chain(current.cloned())
                .find(|r| r["meta"]["versionId"].as_str().unwrap_or("1") == *v);
            match version {
                Some(r) => fhir(StatusCode::OK, r),
                None => not_found(&format!("{t}/{id}/_history/{v} is not known")),
            }
        }
        ("GET", [t]) | ("POST", [t, "_search"]) => {
            // POST _search: form parameters count like query parameters.
            let mut params = params.clone();
            if method == Method::POST {
                params.extend(url::form_urlencoded::parse(&body).into_owned());
            }
            let origin = s.origin(&headers);
            let self_url = format!("{origin}{}/{t}", s.base_path);
            let answer = page(s.search(&[t], &params), &self_url, &params);
            fhir_as_asked(&params, answer)
        }
        // A stored search's page: here `_getpages` names the stored search,
        // `Type`, `Type:patient`, `Type:patient:category` or
        // `everything:patient` (a real server's id is opaque).
        ("GET", []) if params.iter().any(|(k, _)| k == "_getpages") => {
            let id = params
                .iter()
                .find(|(k, _)| k == "_getpages")
                .map_or("", |(_, v)| v.as_str());
            if let Some(patient) = id.strip_prefix("everything:") {
                let origin = s.origin(&headers);
                let base = format!("{origin}{}", s.base_path);
                return fhir(StatusCode::OK, s.everything(patient, &params, &base));
            }
            let (t, patient) = id.split_once(':').unwrap_or((id, ""));
            let (patient, category) = patient.split_once(':').unwrap_or((patient, ""));
            let stored: Vec<&str> = all.iter().copied().filter(|a| *a == t).collect();
            let mut rest: Vec<(String, String)> = params
                .iter()
                .filter(|(k, _)| !k.starts_with("_getpages"))
                .cloned()
                .collect();
            if !patient.is_empty() {
                rest.push(("patient".into(), patient.to_string()));
            }
            if !category.is_empty() {
                rest.push(("category".into(), category.to_string()));
            }
            fhir(StatusCode::OK, s.search(&stored, &rest))
        }
        ("GET", []) => fhir(StatusCode::OK, s.search(&all, &params)),
        ("GET" | "POST", ["Patient", id, "$everything"]) => {
            let origin = s.origin(&headers);
            let base = format!("{origin}{}", s.base_path);
            fhir(StatusCode::OK, s.everything(id, &params, &base))
        }
        ("GET", ["Patient", id, t]) => {
            let mut p = params.clone();
            p.push(("patient".into(), id.to_string()));
            let types: Vec<&str> = if *t == "*" {
                vec!["Observation", "Condition"]
            } else {
                vec![t]
            };
            fhir(StatusCode::OK, s.search(&types, &p))
        }
        ("POST", []) => {
            let origin = s.origin(&headers);
            fhir_as_asked(&params, s.bundle(&body, &origin))
        }
        ("POST", [t]) => {
            // As HAPI answers a create: the new resource's absolute URL,
            // built from the Host it was sent; and, as a servlet container
            // would, a session cookie.
            let origin = s.origin(&headers);
            let location = format!("{origin}{}/{t}/new-1/_history/1", s.base_path);
            let mut r = fhir(
                StatusCode::CREATED,
                json!({"resourceType": t, "id": "new-1"}),
            );
            for (name, value) in [
                (header::LOCATION, location.as_str()),
                (header::SET_COOKIE, "JSESSIONID=sandbox-1; Path=/; HttpOnly"),
            ] {
                if let Ok(v) = header::HeaderValue::from_str(value) {
                    r.headers_mut().insert(name, v);
                }
            }
            r
        }
        ("PUT", [t, id]) | ("PATCH", [t, id]) => {
            fhir(StatusCode::OK, json!({"resourceType": t, "id": id}))
        }
        ("DELETE", [_, _]) => StatusCode::NO_CONTENT.into_response(),
        _ => not_found("not supported by the sandbox"),
    }
}
