//! The source address of a webhook: the peer's, unless the peer is a trusted
//! proxy (`webhooks.trusted_proxies`), in which case the nearest address in
//! `Forwarded` (RFC 7239) or `X-Forwarded-For` that is not itself a trusted
//! proxy. Anyone can write these headers, so they are read only from trusted
//! peers, and right to left (the entries a proxy appended, not the client's).

use std::net::IpAddr;

use ipnet::IpNet;

/// The source address of a request from `peer` with `headers` (names in
/// lower case).
pub fn source(peer: IpAddr, headers: &[(String, String)], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // `Forwarded` wins over `X-Forwarded-For` when both are present. An entry
    // that is not an address (`unknown`, an obfuscated `_id`) ends the walk:
    // what lies left of it was not written by a trusted proxy.
    let forwarded: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "forwarded")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    let chain: Vec<Option<IpAddr>> = if forwarded.is_empty() {
        headers
            .iter()
            .filter(|(k, _)| k == "x-forwarded-for")
            .flat_map(|(_, v)| v.split(','))
            .map(|a| plain_address(a.trim()))
            .collect()
    } else {
        forwarded.into_iter().map(forwarded_for).collect()
    };
    for entry in chain.into_iter().rev() {
        match entry {
            Some(ip) if is_trusted(&ip) => continue,
            Some(ip) => return ip,
            None => return peer,
        }
    }
    peer
}

/// The `for=` of one `Forwarded` element: `for=192.0.2.60`,
/// `for="[2001:db8::1]:4711"`; obfuscated identifiers are skipped.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        plain_address(v.trim().trim_matches('"'))
    })
}

/// An address, with or without a port or IPv6 brackets.
fn plain_address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    text.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_trusted_peers_name_another_source() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        let xff = h(&[("x-forwarded-for", "198.51.100.7, 192.0.2.1")]);
        // An untrusted peer's header is ignored: it could name anyone.
        assert_eq!(source(outsider, &xff, &trusted), outsider);
        // A trusted proxy: the rightmost address it did not add itself.
        assert_eq!(
            source(proxy, &xff, &trusted),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        // Chains of trusted proxies are skipped, right to left.
        let chain = h(&[("x-forwarded-for", "192.0.2.1, 10.9.9.9")]);
        assert_eq!(
            source(proxy, &chain, &trusted),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        // No header, or only trusted entries: the peer.
        assert_eq!(source(proxy, &[], &trusted), proxy);
        assert_eq!(
            source(proxy, &h(&[("x-forwarded-for", "10.0.0.1")]), &trusted),
            proxy
        );
        // Nothing trusted at all: always the peer.
        assert_eq!(source(proxy, &xff, &[]), proxy);
    }

    #[test]
    fn forwarded_wins_and_reads_its_forms() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let both = h(&[
            ("x-forwarded-for", "198.51.100.1"),
            (
                "forwarded",
                "for=192.0.2.43, for=\"[2001:db8:cafe::17]:4711\";proto=https",
            ),
        ]);
        assert_eq!(
            source(peer, &both, &trusted),
            "2001:db8:cafe::17".parse::<IpAddr>().unwrap()
        );
        // An entry that is not an address ends the walk: left of it, the
        // client may have written anything.
        let hidden = h(&[("forwarded", "for=192.0.2.43, for=_hidden, for=unknown")]);
        assert_eq!(source(peer, &hidden, &trusted), peer);
        let spoofed = h(&[("x-forwarded-for", "6.6.6.6, unknown, 10.1.1.1")]);
        assert_eq!(
            source(peer, &spoofed, &[trusted[0], "10.0.0.0/8".parse().unwrap()]),
            peer
        );
        assert_eq!(
            source(peer, &h(&[("x-forwarded-for", "192.0.2.5:8080")]), &trusted),
            "192.0.2.5".parse::<IpAddr>().unwrap()
        );
    }
}
