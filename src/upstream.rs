//! Stage 7 for answers that stage 8 must check: fhirwall fetches the
//! upstream's whole answer itself, so nothing reaches the client before the
//! check has judged it. (Pingora's proxy path writes the response header
//! downstream before the body is seen, so it cannot replace a 200 by a 404
//! once the body shows the resource is someone else's.)
//!
//! The request is the one the proxy path would send — same mapped path and
//! query, same header policy — except that the answer must be checkable:
//! JSON (`Accept: application/fhir+json`), not compressed, and whole (no
//! conditional or range headers).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Method};

use crate::config::Upstream;
use crate::deny::Denial;

/// Client headers that would make the answer uncheckable or partial.
const UNCHECKABLE: &[HeaderName] = &[
    http::header::ACCEPT,
    http::header::ACCEPT_ENCODING,
    http::header::IF_NONE_MATCH,
    http::header::IF_MODIFIED_SINCE,
    http::header::IF_MATCH,
    http::header::IF_UNMODIFIED_SINCE,
    http::header::IF_RANGE,
    http::header::RANGE,
];

/// The upstream's whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// HTTP client for checked exchanges (its own connection pool).
pub struct CheckedClient {
    client: reqwest::Client,
    base: String,
    max_body: usize,
    /// How long the upstream may leave the request body untaken.
    write_timeout: std::time::Duration,
}

impl CheckedClient {
    pub fn new(u: &Upstream) -> CheckedClient {
        let max_body = u.max_checked_answer_bytes;
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(u.connect_timeout)
            .read_timeout(u.read_timeout)
            .pool_idle_timeout(u.idle_timeout)
            .tcp_nodelay(true)
            .tls_certs_merge(u.roots.iter().cloned());
        if !u.verify_tls {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        CheckedClient {
            client: b.build().expect("reqwest client with rustls builds"),
            base: format!(
                "{}://{}{}",
                u.url.scheme(),
                u.host_header,
                u.base_path.trim_end_matches('/')
            ),
            max_body,
            write_timeout: u.write_timeout,
        }
    }

    /// Sends `method` `rel?query` below the upstream base with `headers`
    /// (already filtered by the proxy's header policy) and `body`, and reads
    /// the whole answer, at most `max_body` bytes, asked for whole, as FHIR
    /// JSON, unencoded, to be checked.
    pub async fn fetch(
        &self,
        method: Method,
        rel: &str,
        query: Option<&str>,
        headers: HeaderMap,
        body: Option<Bytes>,
    ) -> Result<Answer, Denial> {
        let mut resp = self.send(method, rel, query, headers, body, true).await?;
        let status = resp.status().as_u16();
        let headers = std::mem::take(resp.headers_mut());
        let too_large = || Denial::Upstream {
            status: 502,
            code: "upstream_answer_too_large",
            description: format!(
                "the upstream's answer is larger than the {} bytes fhirwall reads to check it",
                self.max_body
            ),
        };
        if resp
            .content_length()
            .is_some_and(|l| l > self.max_body as u64)
        {
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| failure(&e))? {
            if body.len() + chunk.len() > self.max_body {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers,
            body: body.freeze(),
        })
    }
}

fn failure(e: &reqwest::Error) -> Denial {
    if e.is_timeout() {
        Denial::Upstream {
            status: 504,
            code: "upstream_timeout",
            description: "upstream did not answer in time".into(),
        }
    } else if e.is_connect() {
        Denial::Upstream {
            status: 502,
            code: "upstream_unreachable",
            description: "upstream could not be reached".into(),
        }
    } else {
        Denial::Upstream {
            status: 502,
            code: "upstream_error",
            description: "upstream failed while answering".into(),
        }
    }
}

impl CheckedClient {
    /// Sends the request as [`CheckedClient::fetch`] does and returns the
    /// answer as it starts, for the caller to stream on. `checked`: ask for
    /// an answer fhirwall can judge (FHIR JSON, whole, unencoded);
    /// otherwise (a relayed write) the client's `Accept`, `Accept-Encoding`
    /// and preconditions go as sent.
    pub async fn send(
        &self,
        method: Method,
        rel: &str,
        query: Option<&str>,
        mut headers: HeaderMap,
        body: Option<Bytes>,
        checked: bool,
    ) -> Result<reqwest::Response, Denial> {
        let mut url = self.base.clone();
        if !rel.is_empty() {
            url.push('/');
            url.push_str(rel);
        }
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        if checked {
            for h in UNCHECKABLE {
                headers.remove(h);
            }
            headers.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static("application/fhir+json"),
            );
            headers.insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            );
        }
        headers.remove(http::header::HOST);
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove(http::header::TRANSFER_ENCODING);
        let request = self.client.request(method, &url).headers(headers);
        let Some(body) = body else {
            return request.send().await.map_err(|e| failure(&e));
        };
        // reqwest times reads only: an upstream that stops taking the body
        // would hold the request for ever. The body goes in slices, and a
        // stall longer than the write timeout ends the exchange.
        let progress = Arc::new(Progress::new());
        let sent = request
            .body(reqwest::Body::wrap(PacedBody {
                rest: body,
                progress: progress.clone(),
            }))
            .send();
        tokio::pin!(sent);
        let every = (self.write_timeout / 4).max(std::time::Duration::from_millis(10));
        loop {
            tokio::select! {
                r = &mut sent => return r.map_err(|e| failure(&e)),
                _ = tokio::time::sleep(every) => {
                    if progress.stalled_for(self.write_timeout) {
                        return Err(Denial::Upstream {
                            status: 504,
                            code: "upstream_timeout",
                            description: format!(
                                "upstream took none of the request body for {} ms (upstream.write_timeout_ms)",
                                self.write_timeout.as_millis()
                            ),
                        });
                    }
                }
            }
        }
    }
}

/// How far a request body has been taken.
struct Progress {
    start: std::time::Instant,
    /// Milliseconds from `start` when the last slice was taken.
    last_ms: AtomicU64,
    /// Every slice taken: what is left is reqwest's read timeout's.
    done: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn stalled_for(&self, limit: std::time::Duration) -> bool {
        if self.done.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.start.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_ms.load(Ordering::Relaxed)) >= limit.as_millis() as u64
    }
}

/// A request body handed over a slice at a time (the client takes the
/// next one once the last is written), each taking noted in `progress`.
/// Its exact length is known, so it goes with a `Content-Length`.
struct PacedBody {
    rest: Bytes,
    progress: Arc<Progress>,
}

/// Small enough that a stalled upstream stops the slices well before the
/// whole body sits in socket buffers.
const SLICE: usize = 16 * 1024;

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.progress.touch();
        if self.rest.is_empty() {
            self.progress.done.store(true, Ordering::Relaxed);
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(SLICE);
        let slice = self.rest.split_to(n);
        if self.rest.is_empty() {
            self.progress.done.store(true, Ordering::Relaxed);
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// Upstream response headers that are not passed on from a checked answer:
/// hop-by-hop and framing (fhirwall sets its own `Content-Length`).
/// (A relayed answer keeps its `Content-Encoding`: its body passes as it
/// came.)
pub fn passes_on(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "content-encoding"
            | "x-request-id"
    )
}
