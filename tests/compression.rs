//! Pingora's gzip goes through flate2, which fhirwall patches in from
//! `vendor/flate2` with its `zlib-ng` feature mapped to the pure-Rust
//! zlib-rs backend (so the build needs no cmake: `vendor/README.md`). These
//! run gzip both ways through Pingora's own compression context, so a
//! backend that links but fails at run time (as a cc-built zlib-ng once did:
//! `Z_VERSION_ERROR`) is caught here, not in production.

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::compression::ResponseCompressionCtx;

fn body() -> Bytes {
    Bytes::from(
        r#"{"resourceType":"Observation","status":"final","subject":{"reference":"Patient/p1"}}"#
            .repeat(100),
    )
}

/// Runs `data` through the context's body filter in two pieces, then the end.
fn filter(ctx: &mut ResponseCompressionCtx, data: &Bytes) -> Vec<u8> {
    let mut out = Vec::new();
    let half = data.len() / 2;
    for piece in [data.slice(..half), data.slice(half..)] {
        if let Some(b) = ctx.response_body_filter(Some(&piece), false) {
            out.extend_from_slice(&b);
        }
    }
    if let Some(b) = ctx.response_body_filter(None, true) {
        out.extend_from_slice(&b);
    }
    out
}

fn request(accept_encoding: Option<&str>) -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/fhir/Observation", None).unwrap();
    if let Some(v) = accept_encoding {
        req.insert_header("accept-encoding", v).unwrap();
    }
    req
}

fn response(content_encoding: Option<&str>) -> ResponseHeader {
    let mut resp = ResponseHeader::build(200, None).unwrap();
    resp.insert_header("content-type", "application/fhir+json")
        .unwrap();
    if let Some(v) = content_encoding {
        resp.insert_header("content-encoding", v).unwrap();
    }
    resp
}

/// Compresses `data` as Pingora would for a client that accepts gzip.
fn gzip(data: &Bytes) -> Vec<u8> {
    let mut ctx = ResponseCompressionCtx::new(6, false, false);
    ctx.request_filter(&request(Some("gzip")));
    let mut resp = response(None);
    ctx.response_header_filter(&mut resp, false);
    assert_eq!(
        resp.headers.get("content-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..]),
        "Pingora chose not to compress"
    );
    filter(&mut ctx, data)
}

#[test]
fn pingora_gzips_a_response() {
    let data = body();
    let gz = gzip(&data);
    assert_eq!(gz.get(..2), Some(&[0x1f, 0x8b][..]), "not a gzip stream");
    assert!(
        gz.len() < data.len() / 4,
        "{} bytes from {}: not compressed",
        gz.len(),
        data.len()
    );
}

#[test]
fn pingora_gunzips_what_it_gzipped() {
    let data = body();
    let gz = Bytes::from(gzip(&data));
    // The upstream answers gzip; the client did not ask for it.
    let mut ctx = ResponseCompressionCtx::new(0, true, false);
    ctx.request_filter(&request(None));
    let mut resp = response(Some("gzip"));
    ctx.response_header_filter(&mut resp, false);
    assert!(
        resp.headers.get("content-encoding").is_none(),
        "Pingora chose not to decompress"
    );
    assert_eq!(filter(&mut ctx, &gz), data.to_vec());
}
