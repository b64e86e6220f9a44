//! Stage 1, route: public route, protected FHIR path, or not ours (404).
//!
//! Matching is done on the percent-decoded, normalised path only, never on
//! the query or fragment. Paths that could be read differently by fhirwall
//! and the upstream are refused outright: an encoded `/` or `\`, `;`
//! parameters, `.`/`..` segments, empty segments, control characters.

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A public route below the FHIR base: no token needed. Holds the path
    /// relative to the base.
    Public(String),
    /// A protected FHIR path relative to the base (may be empty: the base itself).
    Fhir(String),
    /// Outside the FHIR base.
    NotFound,
}

/// Why a request to a public route is refused: it has no token, so it may
/// do nothing beyond reading the route itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicRefusal {
    /// Not GET or HEAD.
    Method,
    /// A query fhirwall cannot read.
    Query(crate::fhir::classify::ClassifyError),
    /// `access_token` in the query (it would reach the upstream's logs).
    TokenInQuery,
    /// A parameter that reaches resources beyond the route (`_include`, a
    /// stored page, …), named.
    Reaching(String),
    /// A body: some servlet containers read a form body's parameters on a
    /// GET without a query, which nothing here would have judged.
    Body,
}

/// Checks a request to a public route; its query parameters when allowed.
/// `special`: the upstream's own `_` parameters that reach nothing
/// (`upstream.special_params`).
pub fn check_public(
    method: &str,
    query: Option<&str>,
    has_body: bool,
    special: &[String],
) -> Result<Vec<(String, String)>, PublicRefusal> {
    if !matches!(method, "GET" | "HEAD") {
        return Err(PublicRefusal::Method);
    }
    if has_body {
        return Err(PublicRefusal::Body);
    }
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    let params = crate::fhir::classify::parse_params(q).map_err(PublicRefusal::Query)?;
    if crate::extract::has_access_token_param(&params) {
        return Err(PublicRefusal::TokenInQuery);
    }
    if let Some(name) = crate::decide::reaching_param(&params, special) {
        return Err(PublicRefusal::Reaching(name.to_string()));
    }
    Ok(params)
}

/// Why a path is refused before routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path contains an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("path contains ';' parameters")]
    Semicolon,
    #[error("path contains a '.' or '..' segment or an empty segment")]
    DotSegment,
    #[error("path is not valid percent-encoded UTF-8")]
    BadEncoding,
    #[error("path contains a control character or backslash")]
    BadCharacter,
}

/// Decodes and checks a raw request path (without query).
pub fn normalise(raw: &str) -> Result<String, PathError> {
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(PathError::EncodedSeparator);
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| PathError::BadEncoding)?;
    if decoded.contains(';') {
        return Err(PathError::Semicolon);
    }
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return Err(PathError::BadCharacter);
    }
    if !decoded.starts_with('/') {
        return Err(PathError::DotSegment);
    }
    let trimmed = decoded.trim_end_matches('/');
    if trimmed
        .split('/')
        .skip(1)
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(PathError::DotSegment);
    }
    Ok(trimmed.to_string())
}

/// Routes a normalised path (from [`normalise`]) against the base path
/// (e.g. `/fhir`, or `` for a base at the root) and the public routes.
pub fn route(path: &str, base_path: &str, public_routes: &[String]) -> Route {
    let rel = if path == base_path {
        ""
    } else if let Some(rest) = path
        .strip_prefix(base_path)
        .and_then(|r| r.strip_prefix('/'))
    {
        rest
    } else {
        return Route::NotFound;
    };
    if public_routes.iter().any(|p| p == rel) {
        Route::Public(rel.to_string())
    } else {
        Route::Fhir(rel.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publics() -> Vec<String> {
        vec!["metadata".into(), ".well-known/smart-configuration".into()]
    }

    #[test]
    fn routes() {
        let p = publics();
        let cases: &[(&str, &str, Route)] = &[
            ("/fhir/metadata", "/fhir", Route::Public("metadata".into())),
            ("/fhir/metadata/", "/fhir", Route::Public("metadata".into())),
            (
                "/fhir/.well-known/smart-configuration",
                "/fhir",
                Route::Public(".well-known/smart-configuration".into()),
            ),
            ("/fhir/Patient/1", "/fhir", Route::Fhir("Patient/1".into())),
            ("/fhir", "/fhir", Route::Fhir("".into())),
            ("/fhir/", "/fhir", Route::Fhir("".into())),
            ("/fhirx/Patient", "/fhir", Route::NotFound),
            ("/other", "/fhir", Route::NotFound),
            ("/Patient/1", "", Route::Fhir("Patient/1".into())),
            (
                "/fhir/Patient/metadata",
                "/fhir",
                Route::Fhir("Patient/metadata".into()),
            ),
        ];
        for (path, base, want) in cases {
            let n = normalise(path).unwrap();
            assert_eq!(&route(&n, base, &p), want, "{path}");
        }
    }

    #[test]
    fn tricks_are_refused() {
        for bad in [
            "/fhir/metadata%2F..%2FPatient",
            "/fhir/metadata%2fx",
            "/fhir/Patient%5C1",
            "/fhir/metadata;/Patient",
            "/fhir/metadata/..",
            "/fhir/./metadata",
            "/fhir/%2e%2e/admin",
            "/fhir//Patient",
            "/fhir/Patient/%ff",
            "/fhir/Patient/%00",
            "/fhir/a\\b",
        ] {
            assert!(normalise(bad).is_err(), "{bad} must be refused");
        }
        // A public route name in the query is not a public route.
        let n = normalise("/fhir/Patient").unwrap();
        assert_eq!(
            route(&n, "/fhir", &publics()),
            Route::Fhir("Patient".into())
        );
    }
}
