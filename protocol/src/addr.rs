//! Address text shared by every crate: an IPv6 literal in brackets.

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
