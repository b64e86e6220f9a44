//! Stage 7 header policy (pure): which client request headers never reach
//! the upstream. Hop-by-hop headers (and those named in `Connection`),
//! every forwarding header a client could spoof (`X-Forwarded-*`,
//! `Forwarded`, `X-Real-IP`, `X-Original-URL`, …, also spelled with
//! underscores), fhirwall's own `X-Fhirwall-*` namespace and any header
//! configured to carry verified context are removed before fhirwall sets
//! its own; so are headers an upstream may act on that fhirwall does not
//! decide (a PUT's `Content-Location`, cookies, forwarded client
//! certificates, asserted users, a server's own switches that change what
//! a write does). Every header whose name holds an `_` goes too (nginx's
//! default): a server or framework that reads `_` as `-` (CGI, WSGI,
//! PHP-FPM, some proxies) would otherwise act on `X_Cascade` or
//! `If_None_Exist`, which fhirwall, reading only the `-` spelling, did
//! not decide.

/// Hop-by-hop headers (RFC 9110 §7.6.1), except the framing headers
/// (`Transfer-Encoding`, `Content-Length`) Pingora manages itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Headers that carry a client-asserted origin or routing; the upstream
/// must only ever see the values fhirwall sets.
const SPOOFABLE: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-request-id",
    "x-client-request-id",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    // Jetty's ForwardedRequestCustomizer: mark the request secure, give it
    // TLS attributes.
    "x-proxied-https",
    "proxy-auth-cert",
    "proxy-ssl-id",
    "x-original-host",
    "x-host",
    "x-forwarded",
    // The client's address as CDNs and load balancers assert it (Tomcat's
    // RemoteIpValve and the like can be told to believe any of them).
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "client-ip",
    "forwarded-for",
    "x-proxyuser-ip",
    // The scheme as proxies assert it (ingress-nginx's `X-Scheme`, IIS
    // ARR's `X-ARR-SSL`, Microsoft's `Front-End-Https`): a framework that
    // believes one builds its links, and judges the request secure, from
    // the client's word.
    "x-scheme",
    "x-url-scheme",
    "front-end-https",
    "x-arr-ssl",
];

/// Headers an upstream may act on that fhirwall neither decides nor sets:
/// a PUT's `Content-Location` (HAPI updates the resource it names, not the
/// one in the path that was decided), the client's session cookie, a
/// client certificate as a TLS-terminating proxy forwards it (Tomcat's
/// `SSLValve` trusts `ssl_client_cert`; RFC 9440's `Client-Cert`), and a
/// user as an authenticating proxy asserts it. Removed; a context header
/// configured under one of these names (`forward_headers`) is then
/// fhirwall's own.
const NOT_FORWARDED: &[&str] = &[
    "content-location",
    "cookie",
    "ssl-client-cert",
    "ssl-client-verify",
    "ssl-client-s-dn",
    "ssl-client-i-dn",
    "x-ssl-client-cert",
    "x-ssl-cert",
    "x-client-cert",
    "x-client-certificate",
    "x-client-verify",
    "client-cert",
    "client-cert-chain",
    "x-arr-clientcert",
    "x-amzn-mtls-clientcert",
    "remote-user",
    "x-remote-user",
    "x-user",
    "x-webauth-user",
    "x-authenticated-user",
    // Users, tokens and claims as authenticating gateways assert them
    // (oauth2-proxy's `X-Auth-Request-*` under the prefixes below, Kong's
    // consumers and OIDC plugins, lua-resty-openidc).
    "x-userinfo",
    "x-access-token",
    "x-id-token",
    "x-credential-identifier",
    // A storage partition or tenant chosen by the caller: HAPI's
    // RequestHeaderPartitionInterceptor (`_ALL` reads every partition; a
    // create lands in the first named), the IBM/LinuxForHealth server's
    // tenant and datastore (and the URL it builds links from). fhirwall
    // decides nothing per partition, so the client may not pick one.
    "x-request-partition-ids",
    "x-partition-name",
    "x-fhir-tenant-id",
    "x-fhir-dsid",
    "x-fhir-forwarded-url",
    "x-tenant-id",
    // HAPI FHIR's switches (JpaConstants, HapiHeaderConstants; every
    // `HAPI-` header goes too): an update that drops the stored tags and
    // security labels it does not repeat, an update-as-create without the
    // existence check (the version fhirwall pinned is not checked), a past
    // version rewritten in place, a write retried on a version conflict,
    // and the provenance recorded in `meta.source`.
    "x-meta-snapshot-mode",
    "x-upsert-extistence-check",
    "x-upsert-existence-check",
    "x-rewrite-history",
    "x-retry-on-version-conflict",
    "x-request-source",
];

/// Name prefixes of headers an upstream or a proxy in front of it acts on
/// (HAPI's own switches; an Envoy or Istio sidecar's retries and routing,
/// which could repeat a write fhirwall decided once), and of the users
/// authenticating proxies assert (Google IAP, an AWS load balancer's OIDC,
/// Azure App Service's authentication), which an upstream once behind one
/// may still believe.
const NOT_FORWARDED_PREFIXES: &[&str] = &[
    "hapi-",
    "x-envoy-",
    "x-goog-authenticated-user-",
    "x-goog-iap-",
    "x-amzn-oidc-",
    "x-ms-client-principal",
    "x-ms-token-",
    // oauth2-proxy (`X-Auth-Request-User`, `-Access-Token`, …), Kong
    // (`X-Consumer-Id`, `X-Authenticated-Userid`, `-Scope`), Cloudflare
    // Access, Pomerium.
    "x-auth-request-",
    "x-consumer-",
    "x-authenticated-",
    "cf-access-",
    "x-pomerium-",
];

/// Header-name equality with ASCII case folded and `_` read as `-`.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

fn fold(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        _ => b.to_ascii_lowercase(),
    }
}

/// `name` starts with `prefix` (lowercase, with `-`), compared as in [`same`].
fn has_prefix(name: &str, prefix: &str) -> bool {
    name.len() >= prefix.len() && same(&name[..prefix.len()], prefix)
}

/// Managed by fhirwall in every configuration: hop-by-hop, spoofable and
/// `X-Forwarded-*`.
fn always_managed(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| same(name, h))
        || SPOOFABLE.iter().any(|h| same(name, h))
        || has_prefix(name, "x-forwarded-")
}

/// Headers fhirwall manages and that may not be configured as context headers.
pub fn is_reserved(name: &str) -> bool {
    always_managed(name)
        || [
            "host",
            "authorization",
            "content-length",
            "transfer-encoding",
            "dpop",
        ]
        .iter()
        .any(|h| same(name, h))
}

/// Should this client header be removed before the request goes upstream?
/// `connection_tokens` are the header names listed in `Connection`;
/// `context_headers` are the configured verified-context header names.
pub fn strip(name: &str, connection_tokens: &[String], context_headers: &[String]) -> bool {
    always_managed(name)
        || name.contains('_')
        || has_prefix(name, "x-fhirwall-")
        || NOT_FORWARDED.iter().any(|h| same(name, h))
        || NOT_FORWARDED_PREFIXES.iter().any(|p| has_prefix(name, p))
        || connection_tokens.iter().any(|t| same(t, name))
        || context_headers.iter().any(|c| same(c, name))
}

/// The header names listed in `Connection` values.
pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

/// The headers of an upstream answer that are not the client's (RFC 9110
/// §7.6.1): the hop-by-hop ones and those its `Connection` headers
/// (`values`) list — but not those that frame or describe the body,
/// which only a broken server would list, and which Pingora or the client
/// need.
pub fn response_hop_by_hop<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    const KEPT: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "content-type",
        "content-encoding",
    ];
    HOP_BY_HOP
        .iter()
        .map(|h| h.to_string())
        .chain(connection_tokens(values))
        .filter(|h| !KEPT.contains(&h.as_str()))
        .collect()
}

/// End-to-end headers that frame the request or that fhirwall reads to
/// classify and decide it. `Connection` may not list them: a proxy removes
/// what `Connection` lists, so the upstream would run another request than
/// the one decided (e.g. a form `_search` whose `Content-Type` is gone is
/// run without the body that carried its patient).
const READ_BY_FHIRWALL: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "authorization",
    "dpop",
    "if-none-exist",
    "if-match",
    "if-none-match",
    "if-modified-since",
];

/// Does fhirwall read this header to decide a request (see
/// [`READ_BY_FHIRWALL`])?
pub fn read_by_fhirwall(name: &str) -> bool {
    READ_BY_FHIRWALL.iter().any(|h| same(name, h))
}

/// The first `Connection` token naming a header fhirwall reads, if any.
pub fn connection_names_read_header(connection_tokens: &[String]) -> Option<&str> {
    connection_tokens
        .iter()
        .find(|t| read_by_fhirwall(t))
        .map(String::as_str)
}

/// The `Prefer` value for a search whose answer fhirwall checks:
/// `handling=strict` first (RFC 7240; FHIR's search handling), then the
/// client's plain preferences (every `Prefer` line): none that mentions
/// `handling` anywhere (`return=minimal;handling=lenient`) or holds a
/// quote (which a parser honouring quotes could let swallow what
/// follows). First, on the one line: Microsoft's server reads the line
/// that starts with `handling=`. A server told to be lenient (Microsoft's
/// default) drops a search parameter it does not support, the narrowing
/// fhirwall added too, and answers with what the narrowing would have
/// left out: its entries are then checked away, but its `total` counts
/// every patient's matches. Strict, it refuses.
pub fn strict_handling<'a>(values: impl Iterator<Item = &'a [u8]>) -> String {
    let mut kept: Vec<&str> = vec!["handling=strict"];
    kept.extend(
        values
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| {
                !p.is_empty() && !p.contains('"') && !p.to_ascii_lowercase().contains("handling")
            }),
    );
    kept.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_search_is_handled_strictly() {
        for (lines, want) in [
            (&[][..], "handling=strict"),
            (&["handling=lenient"][..], "handling=strict"),
            (
                &[
                    "return=minimal, Handling = lenient",
                    "respond-async; wait=10",
                ][..],
                "handling=strict, return=minimal, respond-async; wait=10",
            ),
            (
                &["handling;x=1, , return=representation"][..],
                "handling=strict, return=representation",
            ),
            // Smuggled in a parameter, or behind a quote: dropped.
            (
                &["return=minimal;handling=lenient, x=\"", "wait=5"][..],
                "handling=strict, wait=5",
            ),
        ] {
            assert_eq!(
                strict_handling(lines.iter().map(|l| l.as_bytes())),
                want,
                "{lines:?}"
            );
        }
        // Not UTF-8: dropped, not passed on unread.
        assert_eq!(
            strict_handling([b"handling=lenient\xff".as_slice()].into_iter()),
            "handling=strict"
        );
    }

    #[test]
    fn an_answers_hop_by_hop_headers_are_dropped_but_not_its_framing() {
        let drop = response_hop_by_hop(
            [
                b"close, X-Internal".as_slice(),
                b"Content-Length, transfer-encoding, Content-Type".as_slice(),
            ]
            .into_iter(),
        );
        for name in [
            "connection",
            "keep-alive",
            "upgrade",
            "trailer",
            "x-internal",
        ] {
            assert!(drop.iter().any(|d| d == name), "{name}: {drop:?}");
        }
        for name in [
            "content-length",
            "transfer-encoding",
            "content-type",
            "close",
        ] {
            assert!(!drop.iter().any(|d| d == name), "{name}: {drop:?}");
        }
    }

    #[test]
    fn strip_table() {
        let ctx = vec!["X-Patient".to_string()];
        let conn = connection_tokens([b"keep-alive, X-Secret".as_slice()].into_iter());
        for name in [
            "Connection",
            "keep-alive",
            "Upgrade",
            "TE",
            "X-Forwarded-For",
            "x-forwarded-uri",
            "X_Forwarded_Host",
            "x_forwarded_proto",
            "Forwarded",
            "X-Real-IP",
            "X-Original-URL",
            "x-fhirwall-patient",
            "X_Fhirwall_Sub",
            "x-patient",
            "X_PATIENT",
            "x-secret",
            "X-Request-Id",
            "Content-Location",
            "Cookie",
            "ssl_client_cert",
            "Client-Cert",
            "X-Remote-User",
            "X_Cascade",
            "If_None_Exist",
            "x_security_context",
            "X-Meta-Snapshot-Mode",
            "X-Upsert-Extistence-Check",
            "X-Rewrite-History",
            "HAPI-Rewrite-History",
            "HAPI-Request-Id",
            "x-envoy-retry-on",
            "X-Proxied-Https",
            "Proxy-auth-cert",
            "X-Forwarded",
            "CF-Connecting-IP",
            "Fastly-Client-IP",
            "X-Cluster-Client-IP",
            "Client-IP",
            "Forwarded-For",
            "X-ProxyUser-IP",
            "X-Scheme",
            "X-Url-Scheme",
            "Front-End-Https",
            "X-ARR-SSL",
            "X-Auth-Request-User",
            "X-Auth-Request-Access-Token",
            "X-Authenticated-Userid",
            "X-Authenticated-Scope",
            "X-Consumer-Username",
            "X-Credential-Identifier",
            "X-Userinfo",
            "X-Access-Token",
            "X-Id-Token",
            "Cf-Access-Jwt-Assertion",
            "X-Pomerium-Jwt-Assertion",
            "X-Original-Forwarded-For",
            "X-Request-Partition-IDs",
            "X-FHIR-TENANT-ID",
            "X-FHIR-DSID",
            "X-FHIR-Forwarded-URL",
            "X-Tenant-ID",
            "X-Goog-Authenticated-User-Email",
            "X-Goog-IAP-JWT-Assertion",
            "X-Amzn-Oidc-Identity",
            "X-MS-CLIENT-PRINCIPAL-NAME",
            "X-MS-CLIENT-PRINCIPAL",
            "X-MS-TOKEN-AAD-ACCESS-TOKEN",
        ] {
            assert!(strip(name, &conn, &ctx), "{name} must be stripped");
        }
        for name in [
            "Accept",
            "Content-Type",
            "Prefer",
            "If-Match",
            "Content-Length",
            "User-Agent",
            "X-Cascade",
            "If-None-Exist",
            "X-Security-Context",
        ] {
            assert!(!strip(name, &conn, &ctx), "{name} must pass");
        }
    }

    #[test]
    fn connection_may_not_list_what_fhirwall_reads() {
        for (value, named) in [
            ("keep-alive", None),
            ("close", None),
            ("Upgrade, HTTP2-Settings", None),
            ("TE, X-Secret", None),
            ("content-type", Some("content-type")),
            ("keep-alive, Content-Length", Some("content-length")),
            ("Transfer_Encoding", Some("transfer_encoding")),
            ("If-None-Exist", Some("if-none-exist")),
            ("close,host", Some("host")),
        ] {
            let tokens = connection_tokens([value.as_bytes()].into_iter());
            assert_eq!(connection_names_read_header(&tokens), named, "{value}");
        }
    }

    #[test]
    fn reserved() {
        assert!(is_reserved("X-Forwarded-User"));
        assert!(is_reserved("authorization"));
        assert!(!is_reserved("X-Fhirwall-Patient"));
    }
}
