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
        let mut request = self.client.request(method, &url).headers(headers);
        if let Some(body) = body {
            request = request.body(body);
        }
        request.send().await.map_err(|e| failure(&e))
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
