//! Who the client is (pure): the TCP peer, or — when the peer is one of
//! the configured trusted proxies (an Ingress, a load balancer) — the
//! address that proxy recorded in `X-Forwarded-For`. The audit's `source`,
//! the policies' `sources` and the `X-Forwarded-For` sent upstream all use
//! this one answer.
//!
//! `X-Forwarded-For` is read from the right: each trusted proxy appends
//! the address it received the request from, so the rightmost entry that
//! is not a trusted proxy is the client; what lies left of it was written
//! by the client itself and is ignored. With no trusted proxies (the
//! default) the header is never read: the peer is the client.

use std::net::IpAddr;

/// An address block: network address and prefix length.
pub type Cidr = (IpAddr, u8);

/// Most `X-Forwarded-For` entries looked at (hops through trusted proxies).
const MAX_HOPS: usize = 32;

/// `10.0.0.0/8`, `::1/128`, or a bare address (a block of one).
pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip.parse::<IpAddr>().ok()?, bits.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return None;
    }
    // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it
    // maps: addresses are compared as IPv4 (see `in_cidr`), so kept as
    // written it would never match.
    match ip.to_canonical() {
        IpAddr::V4(v4) if ip.is_ipv6() && bits >= 96 => Some((IpAddr::V4(v4), bits - 96)),
        _ => Some((ip, bits)),
    }
}

/// Whether `ip` lies in the block (an IPv4-mapped IPv6 address counts as
/// its IPv4 address).
pub fn in_cidr(ip: IpAddr, (net, bits): Cidr) -> bool {
    let (a, b, width) = match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if bits == 0 {
        return true;
    }
    let shift = width - bits as u32;
    (a >> shift) == (b >> shift)
}

/// The first and last addresses of a block.
pub fn cidr_ends((net, bits): Cidr) -> [IpAddr; 2] {
    let (n, width) = match net {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    let host_bits = width - u32::from(bits).min(width);
    let mask = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
    let ip = |n: u128| match net {
        IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(n)),
    };
    [ip(n & !mask), ip(n | mask)]
}

fn trusted(ip: IpAddr, proxies: &[Cidr]) -> bool {
    proxies.iter().any(|c| in_cidr(ip, *c))
}

/// The client, and the chain to send upstream as `X-Forwarded-For`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    /// The client, then each trusted proxy the request passed through, the
    /// peer last. Just the peer when it is not a trusted proxy.
    pub chain: Vec<IpAddr>,
}

/// Resolves the client of a request from its TCP peer and its
/// `X-Forwarded-For` header values (in the order received).
pub fn resolve<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    proxies: &[Cidr],
) -> Client {
    // An IPv4 client of a dual-stack (`[::]`) listener, or written so by a
    // proxy, is named as IPv4 (`::ffff:203.0.113.7` is 203.0.113.7), so
    // the audit and the upstream see one form whatever the listener.
    let peer = peer.to_canonical();
    let mut chain = vec![peer];
    if !trusted(peer, proxies) {
        return Client { ip: peer, chain };
    }
    let entries: Vec<&[u8]> = forwarded_for
        .flat_map(|v| v.split(|b| *b == b','))
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev().take(MAX_HOPS) {
        // An entry that is no address (`unknown`, garbage) ends the walk:
        // the last trusted hop is the client we can vouch for.
        let Some(ip) = std::str::from_utf8(entry)
            .ok()
            .and_then(entry_ip)
            .map(|ip| ip.to_canonical())
        else {
            break;
        };
        chain.push(ip);
        client = ip;
        if !trusted(ip, proxies) {
            break;
        }
    }
    chain.reverse();
    Client { ip: client, chain }
}

/// The address of an `X-Forwarded-For` entry: a bare address, or one with
/// a port as some proxies write them (`203.0.113.7:4711`, Azure's
/// Application Gateway; `[2001:db8::1]:4711`, `[2001:db8::1]`). Without
/// this, such a proxy would make itself every request's client.
fn entry_ip(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = e.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    e.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|v6| v6.parse::<std::net::Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// The chain as an `X-Forwarded-For` value.
pub fn forwarded_for(chain: &[IpAddr]) -> String {
    use std::fmt::Write;
    // One buffer (this runs for every request going upstream).
    let mut out = String::with_capacity(chain.len() * 17);
    for (i, ip) in chain.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{ip}");
    }
    out
}

/// The key of a `per: source` rate limit: an IPv4 address, or an IPv6
/// address's /64 (one host holds a whole /64 and could rotate through it
/// for fresh buckets). An IPv4 client reached through NAT64 (an address in
/// one of `nat64`, `server.nat64_prefixes`) is keyed by its IPv4 address,
/// not one /64 shared by every IPv4 client of the translator.
pub fn rate_limit_key(ip: IpAddr, nat64: &[Cidr]) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => match nat64.iter().find_map(|p| embedded_ipv4(v6, *p)) {
                Some(v4) => v4.to_string(),
                None => {
                    let s = v6.segments();
                    let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                    format!("{prefix}/64")
                }
            },
        },
    }
}

/// The NAT64 prefix lengths RFC 6052 (section 2.2) defines.
pub const NAT64_PREFIX_LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

/// The IPv4 address RFC 6052 embeds in `v6` under the NAT64 prefix
/// `prefix`, if `v6` lies in it and is in that form: after the prefix,
/// skipping bits 64–71, which must be zero, as must the suffix after the
/// IPv4 address (else a native host in the prefix could vary those bits
/// into fresh rate-limit keys).
pub fn embedded_ipv4(v6: std::net::Ipv6Addr, prefix: Cidr) -> Option<std::net::Ipv4Addr> {
    let (IpAddr::V6(_), bits) = prefix else {
        return None;
    };
    if !in_cidr(IpAddr::V6(v6), prefix) {
        return None;
    }
    let o = v6.octets();
    // The IPv4 address's octets, and where the zero suffix starts.
    let (at, suffix): (&[usize; 4], usize) = match bits {
        32 => (&[4, 5, 6, 7], 9),
        40 => (&[5, 6, 7, 9], 10),
        48 => (&[6, 7, 9, 10], 11),
        56 => (&[7, 9, 10, 11], 12),
        64 => (&[9, 10, 11, 12], 13),
        96 => (&[12, 13, 14, 15], 16),
        _ => return None,
    };
    let u_zero = bits == 96 || o[8] == 0;
    if !u_zero || o[suffix..].iter().any(|b| *b != 0) {
        return None;
    }
    Some(std::net::Ipv4Addr::new(
        o[at[0]], o[at[1]], o[at[2]], o[at[3]],
    ))
}

/// RFC 6052's well-known prefix.
pub fn well_known_nat64() -> Cidr {
    (
        IpAddr::V6(std::net::Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0)),
        96,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    fn run(peer: &str, xff: &[&str], proxies: &[&str]) -> (String, String) {
        let c = resolve(ip(peer), xff.iter().map(|v| v.as_bytes()), &nets(proxies));
        (c.ip.to_string(), forwarded_for(&c.chain))
    }

    #[test]
    fn cidr_blocks_parse_and_match() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Some((ip("10.0.0.0"), 8)));
        assert_eq!(parse_cidr("::1"), Some((ip("::1"), 128)));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("ten"), None);
        let net = parse_cidr("10.1.0.0/16").unwrap();
        assert!(in_cidr(ip("10.1.200.3"), net));
        assert!(!in_cidr(ip("10.2.0.1"), net));
        assert!(in_cidr(ip("::ffff:10.1.0.9"), net), "IPv4-mapped");
        // A block written IPv4-mapped is its IPv4 block.
        let mapped = parse_cidr("::ffff:10.1.0.0/112").unwrap();
        assert_eq!(mapped, (ip("10.1.0.0"), 16));
        assert!(in_cidr(ip("10.1.200.3"), mapped));
        assert!(in_cidr(ip("::ffff:10.1.200.3"), mapped));
        assert!(!in_cidr(ip("10.2.0.1"), mapped));
        assert_eq!(parse_cidr("::ffff:192.0.2.1"), Some((ip("192.0.2.1"), 32)));
        assert!(in_cidr(ip("192.0.2.1"), parse_cidr("0.0.0.0/0").unwrap()));
        assert!(!in_cidr(ip("2001:db8::1"), net));
    }

    /// Peer, X-Forwarded-For values, trusted proxies → client, chain sent
    /// upstream.
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a str, &'a str);

    #[test]
    fn the_client_is_the_rightmost_address_not_a_trusted_proxy() {
        let ingress = ["10.0.0.0/8"];
        let table: &[Case] = &[
            // No trusted proxies: the header is not read at all.
            (
                "198.51.100.9",
                &["203.0.113.7"],
                &[],
                "198.51.100.9",
                "198.51.100.9",
            ),
            // An untrusted peer cannot assert an address.
            (
                "198.51.100.9",
                &["203.0.113.7"],
                &ingress,
                "198.51.100.9",
                "198.51.100.9",
            ),
            // Through the Ingress.
            (
                "10.0.0.5",
                &["203.0.113.7"],
                &ingress,
                "203.0.113.7",
                "203.0.113.7, 10.0.0.5",
            ),
            // The client's own claim left of it is dropped.
            (
                "10.0.0.5",
                &["192.0.2.66, 203.0.113.7"],
                &ingress,
                "203.0.113.7",
                "203.0.113.7, 10.0.0.5",
            ),
            // Two trusted hops; values over several header lines.
            (
                "10.0.0.5",
                &["192.0.2.66, 203.0.113.7", "10.9.9.9"],
                &ingress,
                "203.0.113.7",
                "203.0.113.7, 10.9.9.9, 10.0.0.5",
            ),
            // Garbage ends the walk at the last trusted hop.
            (
                "10.0.0.5",
                &["203.0.113.7, unknown"],
                &ingress,
                "10.0.0.5",
                "10.0.0.5",
            ),
            // An address with a port, as some proxies write it.
            (
                "10.0.0.5",
                &["203.0.113.7:4711"],
                &ingress,
                "203.0.113.7",
                "203.0.113.7, 10.0.0.5",
            ),
            (
                "fd00::1",
                &["[2001:db8::7]:4711, [fd00::9]"],
                &["fd00::/8"],
                "2001:db8::7",
                "2001:db8::7, fd00::9, fd00::1",
            ),
            (
                "10.0.0.5",
                &["203.0.113.7:port"],
                &ingress,
                "10.0.0.5",
                "10.0.0.5",
            ),
            // Only trusted addresses: the leftmost is all we know.
            (
                "10.0.0.5",
                &["10.3.3.3"],
                &ingress,
                "10.3.3.3",
                "10.3.3.3, 10.0.0.5",
            ),
            // A trusted peer that sent no header.
            ("10.0.0.5", &[], &ingress, "10.0.0.5", "10.0.0.5"),
            // IPv4 as a dual-stack listener or a proxy writes it: IPv4.
            (
                "::ffff:198.51.100.9",
                &["203.0.113.7"],
                &ingress,
                "198.51.100.9",
                "198.51.100.9",
            ),
            (
                "::ffff:10.0.0.5",
                &["::ffff:203.0.113.7"],
                &ingress,
                "203.0.113.7",
                "203.0.113.7, 10.0.0.5",
            ),
            // IPv6.
            (
                "fd00::1",
                &[" 2001:db8::7 "],
                &["fd00::/8"],
                "2001:db8::7",
                "2001:db8::7, fd00::1",
            ),
        ];
        for (peer, xff, proxies, client, chain) in table {
            assert_eq!(
                run(peer, xff, proxies),
                (client.to_string(), chain.to_string()),
                "{peer} {xff:?} {proxies:?}"
            );
        }
    }

    #[test]
    fn a_long_chain_of_trusted_hops_is_cut() {
        let hops: Vec<String> = (0..100)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let joined = hops.join(", ");
        let (client, chain) = run("10.0.0.5", &[joined.as_str()], &["10.0.0.0/8"]);
        assert_eq!(chain.split(", ").count(), MAX_HOPS + 1);
        assert_eq!(client, hops[100 - MAX_HOPS]);
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let wk = [well_known_nat64()];
        let key = |s: &str| rate_limit_key(s.parse().unwrap(), &wk);
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(
            key("2001:db8:1:2:bbbb:cccc:dddd:eeee"),
            key("2001:db8:1:2::9")
        );
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        // NAT64: each IPv4 client its own.
        assert_eq!(key("64:ff9b::c000:207"), "192.0.2.7");
        assert_ne!(key("64:ff9b::c000:207"), key("64:ff9b::c000:208"));
        // Not configured: a /64 like any other.
        assert_eq!(rate_limit_key(ip("64:ff9b::c000:207"), &[]), "64:ff9b::/64");
    }

    /// RFC 6052 section 2.4's examples: 192.0.2.33 under each prefix length.
    #[test]
    fn nat64_addresses_embed_ipv4_as_rfc_6052_says() {
        for (prefix, addr) in [
            ("2001:db8::/32", "2001:db8:c000:221::"),
            ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
            ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
            ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
            ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
            ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
            ("64:ff9b::/96", "64:ff9b::192.0.2.33"),
        ] {
            let p = parse_cidr(prefix).unwrap();
            assert_eq!(rate_limit_key(ip(addr), &[p]), "192.0.2.33", "{prefix}");
        }
        // Outside the prefix, or not in RFC 6052's form (bits 64-71 or the
        // suffix set): not unwrapped, keyed by its /64.
        let p = parse_cidr("2001:db8:122:344::/64").unwrap();
        assert_eq!(embedded_ipv4("2001:db8:999::1".parse().unwrap(), p), None);
        assert_eq!(
            embedded_ipv4("2001:db8:122:344:c0:2:2100:1".parse().unwrap(), p),
            None
        );
        let p40 = parse_cidr("2001:db8:100::/40").unwrap();
        assert_eq!(
            embedded_ipv4("2001:db8:1c0:2:121::".parse().unwrap(), p40),
            None
        );
    }
}
