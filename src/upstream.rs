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
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Method};

use crate::config::Upstream;
use crate::deny::Denial;
use crate::fhir::entry_sieve::{EntrySieve, SieveError, Sift};

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

/// How many bytes of the memory budget each byte of a checked answer
/// takes while fhirwall holds it: the text, the tree parsed from it to
/// judge it, and the copy passed on (links rewritten).
pub const ANSWER_WEIGHT: usize = 3;

/// Adds `bytes` to the share of `budget` held in `slot`; false when the
/// budget has no room for them (what `slot` held stays held).
pub fn hold(
    budget: &Arc<tokio::sync::Semaphore>,
    slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: usize,
) -> bool {
    let share = u32::try_from(bytes)
        .ok()
        .and_then(|n| Arc::clone(budget).try_acquire_many_owned(n).ok());
    match (share, slot.as_mut()) {
        (None, _) => return false,
        (Some(share), Some(held)) => held.merge(share),
        (Some(share), None) => *slot = Some(share),
    }
    true
}

/// The upstream's whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Entries of a Bundle read entry by entry that were let go: turned
    /// down by its [`EntryKeep`] ...
    pub left_out: usize,
    /// ... and too large for what the cap left of what was kept.
    pub too_large: usize,
    /// Its share of the memory budget, given back when it is dropped.
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// What becomes of each entry of a 2xx Bundle answer, judged alone as
/// the answer is read ([`crate::fhir::entry_sieve`]): only what is kept
/// counts against `upstream.max_checked_answer_bytes`, so whether an
/// answer is too large never depends on what is left out of it.
pub type EntryKeep<'a> = &'a (dyn Fn(usize, Option<&[u8]>) -> Sift + Sync);

/// How many bytes of a sieved answer are read at most, as a multiple of
/// `upstream.max_checked_answer_bytes`: an answer that never ends is cut
/// off.
const MAX_SIEVED_FACTOR: usize = 16;

/// HTTP client for checked exchanges (its own connection pool).
pub struct CheckedClient {
    client: reqwest::Client,
    base: String,
    max_body: usize,
    /// How long the upstream may leave the request body untaken.
    write_timeout: Duration,
    /// How long the upstream may keep fhirwall waiting for its answer's
    /// header (once the request is sent) and for each read of its body.
    read_timeout: Duration,
    /// How long an answer to be checked may take to arrive whole: an
    /// upstream sending a byte within each read timeout would otherwise
    /// hold the request, and the memory it took, for as long as it likes.
    answer_timeout: Duration,
    /// The memory all requests together may hold
    /// (`server.max_held_body_bytes`, shared with request bodies): each
    /// answer read takes [`ANSWER_WEIGHT`] times its size of it.
    budget: Arc<tokio::sync::Semaphore>,
    /// `server.max_held_body_bytes`, for the message.
    budget_bytes: usize,
}

impl CheckedClient {
    pub fn new(
        u: &Upstream,
        budget: Arc<tokio::sync::Semaphore>,
        budget_bytes: usize,
    ) -> CheckedClient {
        let max_body = u.max_checked_answer_bytes;
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(u.connect_timeout)
            // No reqwest read timeout: it counts from the send, so a long
            // upload would eat it. Reads are timed here (`send`,
            // `next_chunk`), as Pingora times them.
            .pool_idle_timeout(u.idle_timeout)
            .tcp_nodelay(true);
        // `upstream.ca_file` is the upstream's trust, as Pingora holds it on
        // the proxied path: its CAs instead of the system's, not beside
        // them (else one path would pin the upstream and the other not).
        b = if u.roots.is_empty() {
            crate::trust::trusting(b, &[])
        } else {
            b.tls_certs_only(u.roots.iter().cloned())
        };
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
            read_timeout: u.read_timeout,
            answer_timeout: u.checked_answer_timeout,
            budget,
            budget_bytes,
        }
    }

    /// Sends `method` `rel?query` below the upstream base with `headers`
    /// (already filtered by the proxy's header policy) and `body`, and reads
    /// the whole answer, at most `max_body` bytes, asked for whole, as FHIR
    /// JSON, unencoded, to be checked. With `keep`, a 2xx answer is read
    /// as a Bundle entry by entry instead (see [`EntryKeep`]).
    pub async fn fetch(
        &self,
        method: Method,
        rel: &str,
        query: Option<&str>,
        headers: HeaderMap,
        body: Option<Bytes>,
        keep: Option<EntryKeep<'_>>,
    ) -> Result<Answer, Denial> {
        let mut resp = self.send(method, rel, query, headers, body, true).await?;
        let status = resp.status().as_u16();
        let headers = std::mem::take(resp.headers_mut());
        // An error answer too large to read is judged by its status alone
        // (its body is never passed on as it is): only a 2xx one too large
        // is "too large", which a read answers as if absent.
        let max_body = self.max_body;
        let too_large = move |headers: HeaderMap| {
            if (200..300).contains(&status) {
                Err(Denial::Upstream {
                    status: 502,
                    code: "upstream_answer_too_large",
                    description: format!(
                        "the upstream's answer is larger than the {max_body} bytes fhirwall \
                         reads to check it"
                    ),
                })
            } else {
                Ok(Answer {
                    status,
                    headers,
                    body: Bytes::new(),
                    left_out: 0,
                    too_large: 0,
                    _held: None,
                })
            }
        };
        let ok = (200..300).contains(&status);
        // A 2xx answer with entries to judge one by one is read so from
        // its first byte, whatever its size: one path, whose accounting
        // counts only what is kept (had the sieve begun only past the cap,
        // whether it began would depend on what is left out).
        if let Some(keep) = keep.filter(|_| ok) {
            return self.sieved(resp, status, headers, keep).await;
        }
        if resp
            .content_length()
            .is_some_and(|l| l > self.max_body as u64)
        {
            return too_large(headers);
        }
        let mut body = BytesMut::new();
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let deadline = Instant::now() + self.answer_timeout;
        while let Some(chunk) = self.chunk_before(&mut resp, deadline).await? {
            if body.len() + chunk.len() > self.max_body {
                return too_large(headers);
            }
            // Held answers count against the memory of all requests: many
            // large ones at once are refused, not held until memory runs out.
            if !hold(&self.budget, &mut held, chunk.len() * ANSWER_WEIGHT) {
                return Err(self.budget_exhausted());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            headers,
            body: body.freeze(),
            left_out: 0,
            too_large: 0,
            _held: held,
        })
    }

    fn budget_exhausted(&self) -> Denial {
        Denial::Unavailable {
            code: "answer_budget_exhausted",
            description: format!(
                "fhirwall holds as many request bodies and upstream answers being checked as \
                 it may (server.max_held_body_bytes: {}); try again",
                self.budget_bytes
            ),
            retry_after_seconds: 1,
        }
    }

    /// Reads an answer entry by entry, keeping the entries `keep` accepts:
    /// only what is kept counts against the cap.
    async fn sieved(
        &self,
        mut resp: reqwest::Response,
        status: u16,
        headers: HeaderMap,
        keep: EntryKeep<'_>,
    ) -> Result<Answer, Denial> {
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let max_body = self.max_body;
        let unjudgeable = |why: String| Denial::Upstream {
            status: 502,
            code: "upstream_answer_too_large",
            description: why,
        };
        let failed = |e: SieveError| match e {
            SieveError::TooLarge => unjudgeable(format!(
                "the upstream's answer is larger than the {max_body} bytes fhirwall reads to \
                 check it, even with the resources outside the grant left out"
            )),
            SieveError::Malformed(why) => Denial::Upstream {
                status: 502,
                code: "upstream_answer_unchecked",
                description: format!(
                    "the upstream's answer could not be read entry by entry: {why}"
                ),
            },
        };
        let mut sieve = EntrySieve::new(max_body, keep);
        let (mut total, mut held_bytes) = (0usize, 0usize);
        let deadline = Instant::now() + self.answer_timeout;
        while let Some(c) = self.chunk_before(&mut resp, deadline).await? {
            total += c.len();
            if total > max_body.saturating_mul(MAX_SIEVED_FACTOR) {
                return Err(unjudgeable(format!(
                    "the upstream's answer is longer than {MAX_SIEVED_FACTOR} times the \
                     {max_body} bytes fhirwall reads to check it"
                )));
            }
            sieve.push(&c).map_err(failed)?;
            // What the sieve holds (what it keeps and the entry it reads)
            // counts against the memory of all requests, at its highest.
            let now = sieve.held();
            if now > held_bytes {
                if !hold(&self.budget, &mut held, (now - held_bytes) * ANSWER_WEIGHT) {
                    return Err(self.budget_exhausted());
                }
                held_bytes = now;
            }
        }
        let sieved = sieve.finish().map_err(failed)?;
        Ok(Answer {
            status,
            headers,
            body: Bytes::from(sieved.body),
            left_out: sieved.left_out,
            too_large: sieved.too_large,
            _held: held,
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
        let body = body.unwrap_or_default();
        if body.is_empty() {
            // Nothing to pace: the answer's header is due within the read
            // timeout.
            return match tokio::time::timeout(self.read_timeout, request.body(body).send()).await {
                Ok(r) => r.map_err(|e| failure(&e)),
                Err(_) => Err(answer_timeout(self.read_timeout)),
            };
        }
        // The body goes in slices: a stall of the upstream taking them
        // longer than the write timeout ends the exchange, and once all
        // are taken the answer's header is due within the read timeout.
        let progress = Arc::new(Progress::new());
        let sent = request
            .body(reqwest::Body::wrap(PacedBody {
                rest: body,
                progress: progress.clone(),
            }))
            .send();
        tokio::pin!(sent);
        let every = (self.write_timeout.min(self.read_timeout) / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                r = &mut sent => return r.map_err(|e| failure(&e)),
                _ = tokio::time::sleep(every) => match progress.stalled(self.write_timeout, self.read_timeout) {
                    None => {}
                    Some(Stall::Writing) => {
                        return Err(Denial::Upstream {
                            status: 504,
                            code: "upstream_timeout",
                            description: format!(
                                "upstream took none of the request body for {} ms (upstream.write_timeout_ms)",
                                self.write_timeout.as_millis()
                            ),
                        })
                    }
                    Some(Stall::Answering) => return Err(answer_timeout(self.read_timeout)),
                },
            }
        }
    }

    /// The next piece of an answer's body, due within the read timeout.
    pub async fn next_chunk(&self, resp: &mut reqwest::Response) -> Result<Option<Bytes>, Denial> {
        match tokio::time::timeout(self.read_timeout, resp.chunk()).await {
            Ok(r) => r.map_err(|e| failure(&e)),
            Err(_) => Err(answer_timeout(self.read_timeout)),
        }
    }
}

impl CheckedClient {
    /// The answer's next piece, as [`CheckedClient::next_chunk`], and
    /// only before `deadline` (the whole answer's).
    async fn chunk_before(
        &self,
        resp: &mut reqwest::Response,
        deadline: Instant,
    ) -> Result<Option<Bytes>, Denial> {
        let late = || Denial::Upstream {
            status: 504,
            code: "upstream_timeout",
            description: format!(
                "the upstream's answer did not arrive whole within {} ms \
                 (upstream.checked_answer_timeout_ms)",
                self.answer_timeout.as_millis()
            ),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        if left < self.read_timeout {
            return match tokio::time::timeout(left, resp.chunk()).await {
                Ok(r) => r.map_err(|e| failure(&e)),
                Err(_) => Err(late()),
            };
        }
        self.next_chunk(resp).await
    }
}

fn answer_timeout(read_timeout: Duration) -> Denial {
    Denial::Upstream {
        status: 504,
        code: "upstream_timeout",
        description: format!(
            "upstream did not answer within {} ms (upstream.read_timeout_ms)",
            read_timeout.as_millis()
        ),
    }
}

/// Where a body's exchange is stuck.
#[derive(Debug, PartialEq, Eq)]
enum Stall {
    /// The upstream takes no more of the body.
    Writing,
    /// The body is all taken; no answer comes.
    Answering,
}

/// How far a request body has been taken.
struct Progress {
    start: Instant,
    /// Milliseconds from `start` when the last slice was taken, plus one
    /// (0: the client has not asked for the body yet, e.g. still
    /// connecting, which the connect timeout bounds).
    last_ms: AtomicU64,
    /// Every slice taken (the last may still be on its way).
    done: AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64 + 1;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the exchange has been stuck too long: taking no slice for
    /// `write`, or, all taken, with no answer for `read`.
    fn stalled(&self, write: Duration, read: Duration) -> Option<Stall> {
        self.stalled_at(self.start.elapsed().as_millis() as u64 + 1, write, read)
    }

    /// [`Progress::stalled`] at `now` (milliseconds from `start`, plus one).
    fn stalled_at(&self, now: u64, write: Duration, read: Duration) -> Option<Stall> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        let idle = now.saturating_sub(last);
        if self.done.load(Ordering::Relaxed) {
            (idle >= read.as_millis() as u64).then_some(Stall::Answering)
        } else {
            (idle >= write.as_millis() as u64).then_some(Stall::Writing)
        }
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

/// Upstream response headers that are not copied from a checked answer:
/// framing (fhirwall sets its own `Content-Length`) and the request id.
/// (A relayed answer keeps its `Content-Encoding`: its body passes as it
/// came.) Hop-by-hop headers, and those `Connection` lists, are copied and
/// left to the answer's stamp, which drops them on every path alike.
pub fn passes_on(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "transfer-encoding" | "content-length" | "content-encoding" | "x-request-id"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_exchange_stalls_by_the_write_then_the_read_timeout() {
        let (write, read) = (Duration::from_millis(40), Duration::from_millis(120));
        let p = Progress::new();
        // Not asked for the body yet (connecting): never stalled here.
        assert_eq!(p.stalled_at(10_000, write, read), None);
        p.last_ms.store(100, Ordering::Relaxed);
        assert_eq!(p.stalled_at(139, write, read), None);
        assert_eq!(p.stalled_at(140, write, read), Some(Stall::Writing));
        // All taken: the read timeout counts from the last slice.
        p.done.store(true, Ordering::Relaxed);
        assert_eq!(p.stalled_at(219, write, read), None);
        assert_eq!(p.stalled_at(220, write, read), Some(Stall::Answering));
    }
}
