//! Addresses shared by every crate: an IPv6 literal in brackets, what
//! counts a client, what can be a source.

/// `host` without the brackets of an IPv6 literal (`[2001:db8::1]`).
pub fn unbracketed(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The address a client is counted by in limits: an IPv6 one by its /64
/// (a host holds a /64, and would take a place per address), an
/// IPv4-mapped one as IPv4.
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Why no address of `lo..=hi` (of one family) may be in a pool, if one
/// may not: a socket bound to the unspecified address leaves from the
/// host's own address (what a rotating proxy must never do), and
/// multicast, broadcast or "this network" addresses are no TCP source.
pub fn not_a_source(v4: bool, lo: u128, hi: u128) -> Option<&'static str> {
    let overlaps = |a: u128, b: u128| lo <= b && a <= hi;
    if v4 {
        if overlaps(0, 0) {
            return Some(
                "0.0.0.0, the unspecified address (the kernel would pick the host's own address)",
            );
        }
        if overlaps(1, 0x00ff_ffff) {
            return Some("an address of 0.0.0.0/8 (\"this network\")");
        }
        if overlaps(0xe000_0000, 0xefff_ffff) {
            return Some("a multicast address (224.0.0.0/4)");
        }
        if overlaps(0xffff_ffff, 0xffff_ffff) {
            return Some("255.255.255.255, the broadcast address");
        }
    } else {
        if overlaps(0, 0) {
            return Some(
                "::, the unspecified address (the kernel would pick the host's own address)",
            );
        }
        if overlaps(0xff00 << 112, u128::MAX) {
            return Some("a multicast address (ff00::/8)");
        }
        if overlaps(0xffff << 32, (0xffff << 32) | 0xffff_ffff) {
            return Some("an IPv4-mapped address (::ffff:0:0/96): write the IPv4 address");
        }
        if overlaps(0xfe80 << 112, (0xfebf << 112) | (u128::MAX >> 16)) {
            return Some(
                "a link-local address (fe80::/10), which needs an interface's scope to bind",
            );
        }
    }
    None
}

/// As [`not_a_source`], for one address (a worker's last look at a lease
/// before it binds: a lease table's file can say anything).
pub fn not_a_source_ip(ip: std::net::IpAddr) -> Option<&'static str> {
    let (v4, n) = match ip {
        std::net::IpAddr::V4(v4) => (true, u128::from(u32::from(v4))),
        std::net::IpAddr::V6(v6) => (false, u128::from(v6)),
    };
    not_a_source(v4, n, n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn brackets_go_and_nothing_else_does() {
        assert_eq!(super::unbracketed("[::1]"), "::1");
        assert_eq!(super::unbracketed("::1"), "::1");
        assert_eq!(super::unbracketed("[::1"), "[::1");
        assert_eq!(super::unbracketed("example.com"), "example.com");
    }
}
