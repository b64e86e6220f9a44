//! Stage 2, extract: the access token from the `Authorization` header.
//!
//! Pure. Exactly one `Authorization` header with the `Bearer` scheme
//! (case-insensitive) and an RFC 6750 `b64token`. Tokens in the query
//! string or a form body are refused, as are several `Authorization`
//! headers. The `DPoP` scheme (RFC 9449) is recognised; whether it is
//! accepted, and the proof, are decided by the bind stage.

/// What the request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted<'a> {
    /// No credentials at all.
    None,
    /// A bearer token.
    Bearer(&'a str),
    /// A token presented with the DPoP scheme (a proof must come along).
    Dpop(&'a str),
}

/// Why the credentials are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtractError {
    #[error("several Authorization headers")]
    SeveralHeaders,
    #[error("access tokens in the query string are not accepted; use the Authorization header")]
    TokenInQuery,
    #[error("access tokens in the request body are not accepted; use the Authorization header")]
    TokenInBody,
    #[error("Authorization header is not valid ASCII")]
    NotAscii,
    #[error("Authorization scheme '{0}' is not supported; use Bearer or DPoP")]
    UnsupportedScheme(String),
    #[error("the DPoP scheme is not enabled on this gateway (dpop.enabled: false)")]
    DpopNotEnabled,
    #[error("Bearer token is empty or not an RFC 6750 b64token")]
    MalformedToken,
}

fn is_b64token(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// True if a decoded parameter list carries an `access_token`.
pub fn has_access_token_param(params: &[(String, String)]) -> bool {
    params.iter().any(|(n, _)| n == "access_token")
}

/// Whether the request names the `DPoP` scheme (one `Authorization`
/// header, whatever follows the scheme): its challenges are then `DPoP`
/// ones (RFC 9449 §7.1), a malformed token's too.
pub fn names_dpop_scheme(authorization: &[&[u8]]) -> bool {
    match authorization {
        [one] => one
            .split(|b| *b == b' ')
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case(b"dpop")),
        _ => false,
    }
}

/// Extracts the token from the `Authorization` header values.
pub fn extract<'a>(authorization: &[&'a [u8]]) -> Result<Extracted<'a>, ExtractError> {
    let value = match authorization {
        [] => return Ok(Extracted::None),
        [one] => std::str::from_utf8(one).map_err(|_| ExtractError::NotAscii)?,
        _ => return Err(ExtractError::SeveralHeaders),
    };
    if !value.is_ascii() {
        return Err(ExtractError::NotAscii);
    }
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let dpop = scheme.eq_ignore_ascii_case("dpop");
    if !dpop && !scheme.eq_ignore_ascii_case("bearer") {
        // Named only if it is a scheme we know: what stands there could be
        // a credential sent without a scheme, never to be echoed.
        const KNOWN: &[&str] = &[
            "Basic",
            "Digest",
            "Negotiate",
            "NTLM",
            "HOBA",
            "Mutual",
            "MAC",
            "GNAP",
            "Token",
            "OAuth",
            "AWS4-HMAC-SHA256",
            "Hawk",
        ];
        let named = KNOWN
            .iter()
            .find(|k| k.eq_ignore_ascii_case(scheme))
            .map_or("(not a known scheme)", |k| k);
        return Err(ExtractError::UnsupportedScheme(named.to_string()));
    }
    let token = rest.trim_matches(' ');
    if !is_b64token(token) {
        return Err(ExtractError::MalformedToken);
    }
    Ok(if dpop {
        Extracted::Dpop(token)
    } else {
        Extracted::Bearer(token)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok: &[(&str, &[&[u8]], Extracted)] = &[
            ("none", &[], Extracted::None),
            (
                "bearer",
                &[b"Bearer abc.def.ghi"],
                Extracted::Bearer("abc.def.ghi"),
            ),
            (
                "case-insensitive",
                &[b"bearer abc"],
                Extracted::Bearer("abc"),
            ),
            ("padding", &[b"Bearer abc=="], Extracted::Bearer("abc==")),
            (
                "dpop",
                &[b"DPoP abc.def.ghi"],
                Extracted::Dpop("abc.def.ghi"),
            ),
            ("dpop case", &[b"dpop abc"], Extracted::Dpop("abc")),
        ];
        for (name, h, want) in ok {
            assert_eq!(&extract(h).unwrap(), want, "{name}");
        }
        let bad: &[(&str, &[&[u8]], ExtractError)] = &[
            (
                "two headers",
                &[b"Bearer a", b"Bearer b"],
                ExtractError::SeveralHeaders,
            ),
            (
                "basic",
                &[b"Basic dXNlcjpwYXNz"],
                ExtractError::UnsupportedScheme("Basic".into()),
            ),
            (
                "a bare credential is not echoed as a scheme",
                &[b"s3cr3tOpaqueTok"],
                ExtractError::UnsupportedScheme("(not a known scheme)".into()),
            ),
            (
                "dpop without token",
                &[b"DPoP "],
                ExtractError::MalformedToken,
            ),
            ("empty", &[b"Bearer "], ExtractError::MalformedToken),
            ("no token", &[b"Bearer"], ExtractError::MalformedToken),
            (
                "space inside",
                &[b"Bearer a b"],
                ExtractError::MalformedToken,
            ),
            ("quote", &[b"Bearer a\"b"], ExtractError::MalformedToken),
            (
                "only padding",
                &[b"Bearer =="],
                ExtractError::MalformedToken,
            ),
            ("non-ascii", &[b"Bearer \xc3\xa9"], ExtractError::NotAscii),
        ];
        for (name, h, want) in bad {
            assert_eq!(&extract(h).unwrap_err(), want, "{name}");
        }
    }

    #[test]
    fn access_token_param() {
        assert!(has_access_token_param(&[(
            "access_token".into(),
            "x".into()
        )]));
        assert!(!has_access_token_param(&[(
            "code".into(),
            "access_token".into()
        )]));
    }
}
