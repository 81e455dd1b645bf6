//! IPv6 prefixes routed to this host (`ip -6 route add local PREFIX dev
//! lo`, the "AnyIP" set-up): an address inside one is this host's, though
//! no interface lists it and binding it needs `IPV6_FREEBIND`. Read from
//! `/proc/net/ipv6_route` (every table, with the RTF_LOCAL flag). IPv4 has
//! no such gap: an address of an IPv4 local route binds as it is.

use std::io;
use std::net::IpAddr;

/// RTF_LOCAL in `/proc/net/ipv6_route`'s flags.
const RTF_LOCAL: u32 = 0x8000_0000;

/// The local IPv6 routes: (network, prefix length).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoutes(Vec<(u128, u8)>);

impl LocalRoutes {
    /// This host's, now.
    pub fn read() -> io::Result<LocalRoutes> {
        Ok(LocalRoutes::parse(&std::fs::read_to_string(
            "/proc/net/ipv6_route",
        )?))
    }

    /// Lines of `ipv6_route`: destination, prefix length, …, flags.
    pub fn parse(table: &str) -> LocalRoutes {
        let routes = table
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let dest = u128::from_str_radix(f.first()?, 16).ok()?;
                let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
                let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
                (flags & RTF_LOCAL != 0 && len <= 128).then_some((dest, len))
            })
            .collect();
        LocalRoutes(routes)
    }

    /// Whether a local route covers `ip` (always false for IPv4).
    pub fn covers(&self, ip: IpAddr) -> bool {
        let IpAddr::V6(v6) = ip else { return false };
        let addr = u128::from(v6);
        self.0.iter().any(|&(dest, len)| {
            let mask = match len {
                0 => 0,
                l => u128::MAX << (128 - u32::from(l)),
            };
            addr & mask == dest & mask
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_routes_cover_their_prefix_only() {
        let table = "\
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
20010db8008800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
garbage
";
        let r = LocalRoutes::parse(table);
        let ip = |s: &str| s.parse().unwrap();
        assert!(r.covers(ip("2001:db8:77::5")));
        assert!(r.covers(ip("2001:db8:77:0:ffff::1")));
        assert!(!r.covers(ip("2001:db8:78::5")));
        assert!(!r.covers(ip("2001:db8:88::5")), "not a local route");
        assert!(!r.covers(ip("10.0.0.1")));
    }
}
