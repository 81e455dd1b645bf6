//! This host's local routes: the prefixes the kernel delivers to the host
//! itself — every interface address, and prefixes routed to it (`ip route
//! add local PREFIX dev lo`, the "AnyIP" set-up), which no interface lists.
//! IPv4's from `/proc/net/fib_trie` (entries of type `LOCAL` in the main
//! and local tables), IPv6's from `/proc/net/ipv6_route` (the `RTF_LOCAL`
//! flag; the file does not say which table).
//!
//! A catch-all local route (`local 0.0.0.0/0`, `local ::/0`) is never
//! taken, nor is an IPv4 table of its own (`Id 100:`): that is a
//! transparent proxy's policy routing (TPROXY: `ip rule add fwmark 1
//! lookup 100; ip route add local 0.0.0.0/0 dev lo table 100`, as
//! Cilium, Istio and Clash set up), which only marked packets see;
//! taken, every destination was this host's own, and refused.
//!
//! The routing table is the answer to "is this address this host's?":
//! a test bind is not. An IPv6 address of a local route does not bind
//! without `IPV6_FREEBIND`, and with `net.ipv4.ip_nonlocal_bind=1` (or
//! its IPv6 twin, common on keepalived hosts) every address binds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{PrefixSet, Segment};

/// RTF_LOCAL in `/proc/net/ipv6_route`'s flags.
const RTF_LOCAL: u32 = 0x8000_0000;

/// The local routes of both families; a family whose table could not be
/// read (no `/proc`, IPv6 disabled) is unknown, not empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoutes {
    v4: Option<PrefixSet>,
    v6: Option<PrefixSet>,
}

impl LocalRoutes {
    /// This host's, now.
    pub fn read() -> LocalRoutes {
        let file = |path| std::fs::read_to_string(path).ok();
        LocalRoutes {
            v4: file("/proc/net/fib_trie").map(|t| parse_fib_trie(&t)),
            v6: file("/proc/net/ipv6_route").map(|t| parse_ipv6_route(&t)),
        }
    }

    /// A reading at most `max_age` old, shared by the whole process (one
    /// reading of the files per `max_age` at most, however many
    /// connections ask).
    ///
    /// The files are read outside the lock, by the one caller that found
    /// the reading stale; the others meanwhile take the stale one (a host
    /// with a full BGP table has a `fib_trie` of megabytes).
    pub fn current(max_age: Duration) -> Arc<LocalRoutes> {
        struct Cache {
            at: Instant,
            routes: Arc<LocalRoutes>,
            reading: bool,
        }
        static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
        let lock = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &mut *lock() {
            if c.reading || c.at.elapsed() < max_age {
                return c.routes.clone();
            }
            c.reading = true;
        }
        let routes = Arc::new(LocalRoutes::read());
        *lock() = Some(Cache {
            at: Instant::now(),
            routes: routes.clone(),
            reading: false,
        });
        routes
    }

    /// Whether a local route covers `ip` (false if its family is unknown).
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.holds(ip).unwrap_or(false)
    }

    /// Whether a local route covers `ip`; `None` if its family's table
    /// could not be read.
    pub fn holds(&self, ip: IpAddr) -> Option<bool> {
        let routes = match ip {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        routes.map(|r| r.holds(&Segment::single(ip), 128))
    }

    /// Whether local routes cover every address of `entry` (see
    /// [`PrefixSet::covers_all`]); `None` if its family's table could not
    /// be read.
    pub fn holds_all(&self, entry: &Segment) -> Option<bool> {
        let routes = match entry.family() {
            crate::Family::V4 => self.v4.as_ref(),
            crate::Family::V6 => self.v6.as_ref(),
        };
        routes.map(|r| r.covers_all(entry))
    }
}

fn parse_ipv6_route(table: &str) -> PrefixSet {
    let mut prefixes = PrefixSet::default();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = (|| {
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            (flags & RTF_LOCAL != 0 && len > 0).then_some(())?;
            Segment::prefix(IpAddr::V6(Ipv6Addr::from(dest)), len)
        })();
        if let Some(p) = parsed {
            prefixes.insert(p);
        }
    }
    prefixes
}

/// `fib_trie` lists each table as a tree whose leaves are `|-- ADDRESS`
/// lines, each followed by its routes, one a line: `/LEN SCOPE TYPE`.
fn parse_fib_trie(trie: &str) -> PrefixSet {
    let mut prefixes = PrefixSet::default();
    let mut leaf: Option<Ipv4Addr> = None;
    // Whether the table being read counts (a header at the line's start:
    // `Main:`, `Local:`, `Id 100:`).
    let mut counted = true;
    for line in trie.lines() {
        if !line.starts_with(' ') {
            counted = matches!(line.trim_end(), "Main:" | "Local:");
            leaf = None;
            continue;
        }
        if !counted {
            continue;
        }
        let line = line.trim_start();
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
        } else if let Some(route) = line.strip_prefix('/') {
            let mut f = route.split_whitespace();
            let len = f.next().and_then(|l| l.parse::<u8>().ok());
            let len = len.filter(|&l| l > 0);
            if let (Some(net), Some(len), Some("LOCAL")) = (leaf, len, f.nth(1)) {
                if let Some(p) = Segment::prefix(IpAddr::V4(net), len) {
                    prefixes.insert(p);
                }
            }
        } else {
            leaf = None;
        }
    }
    prefixes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_routes_cover_their_prefix_only() {
        let table = "\
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
20010db8008800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
20010db8000500000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
garbage
";
        let r = LocalRoutes {
            v4: None,
            v6: Some(parse_ipv6_route(table)),
        };
        assert!(r.covers(ip("2001:db8:77::5")));
        assert!(r.covers(ip("2001:db8:77:0:ffff::1")));
        assert!(!r.covers(ip("2001:db8:78::5")));
        assert!(!r.covers(ip("2001:db8:88::5")), "not a local route");
        assert!(r.covers(ip("2001:db8:5::1")), "an interface address");
        assert!(!r.covers(ip("2001:db8:5::2")));
        assert_eq!(r.holds(ip("10.0.0.1")), None, "IPv4 not read");
        assert!(!r.covers(ip("10.0.0.1")));
        // A prefix, whole: inside the /64 routed to lo, or not.
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert_eq!(r.holds_all(&seg("2001:db8:77::/80")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:77::/64")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:76::/63")), Some(false));
        assert_eq!(r.holds_all(&seg("2001:db8::/48")), Some(false));
        assert_eq!(r.holds_all(&seg("10.0.0.0/24")), None);
    }

    /// A prefix is held whole by one route, or by routes that between
    /// them hold every address of it (interface addresses one by one).
    #[test]
    fn a_prefix_is_held_only_if_all_of_it_is() {
        let mut set = PrefixSet::default();
        for i in 0..16u8 {
            set.insert(Segment::single(IpAddr::V4(Ipv4Addr::new(
                203,
                0,
                113,
                16 + i,
            ))));
        }
        set.insert("198.51.100.0/25".parse().unwrap());
        set.insert("198.51.100.128/25".parse().unwrap());
        set.insert("127.0.0.0/8".parse().unwrap());
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert!(set.covers_all(&seg("203.0.113.16/28")));
        assert!(set.covers_all(&seg("203.0.113.24/29")));
        assert!(!set.covers_all(&seg("203.0.113.16/27")), "half of it");
        assert!(!set.covers_all(&seg("203.0.113.0/28")));
        assert!(set.covers_all(&seg("198.51.100.0/24")), "two halves");
        assert!(set.covers_all(&seg("127.0.0.0/9")));
        assert!(!set.covers_all(&seg("124.0.0.0/6")), "a quarter of it");
        assert!(!set.covers_all(&seg("0.0.0.0/1")));
    }

    /// As a network namespace with `10.9.0.1/24` on lo, `ip route add
    /// local 10.20.0.0/16 dev lo` and `192.0.2.5/24` on an interface shows
    /// it (the main table merged with the local one, as without policy
    /// rules).
    const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/11 2 0 2
        +-- 10.9.0.0/24 2 0 2
           +-- 10.9.0.0/31 1 0 0
              |-- 10.9.0.0
                 /24 host LOCAL
              |-- 10.9.0.1
                 /32 host LOCAL
           |-- 10.9.0.255
              /32 link BROADCAST
        |-- 10.20.0.0
           /16 host LOCAL
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.5
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 127.0.0.0/8 2 0 2
     +-- 127.0.0.0/31 1 0 0
        |-- 127.0.0.0
           /8 host LOCAL
        |-- 127.0.0.1
           /32 host LOCAL
";

    /// A transparent proxy's policy routing (a catch-all local route in a
    /// table of its own) makes no destination this host's.
    #[test]
    fn a_catch_all_local_route_is_not_taken() {
        let trie = format!(
            "{FIB_TRIE}Id 100:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 host LOCAL
     |-- 203.0.113.0
        /24 host LOCAL
"
        );
        let six = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
20010db8000500000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
";
        let r = LocalRoutes {
            v4: Some(parse_fib_trie(&trie)),
            v6: Some(parse_ipv6_route(six)),
        };
        for not in ["8.8.8.8", "203.0.113.5", "2001:db8:9::1"] {
            assert_eq!(r.holds(ip(not)), Some(false), "{not}");
        }
        for local in ["10.9.0.1", "127.0.0.1", "2001:db8:5::1"] {
            assert_eq!(r.holds(ip(local)), Some(true), "{local}");
        }
    }

    #[test]
    fn fib_trie_local_entries_are_the_hosts_ipv4_prefixes() {
        let r = LocalRoutes {
            v4: Some(parse_fib_trie(FIB_TRIE)),
            v6: None,
        };
        for local in [
            "10.9.0.7",
            "10.20.255.1",
            "192.0.2.5",
            "127.0.0.1",
            "127.9.9.9",
        ] {
            assert_eq!(r.holds(ip(local)), Some(true), "{local}");
        }
        // The default route, a link's prefix and broadcast are not local.
        for not in [
            "8.8.8.8",
            "192.0.2.6",
            "192.0.2.255",
            "10.21.0.1",
            "10.9.1.1",
        ] {
            assert_eq!(r.holds(ip(not)), Some(false), "{not}");
        }
        assert_eq!(r.holds(ip("::1")), None);
    }

    #[test]
    fn this_hosts_loopback_is_local_and_a_documentation_address_is_not() {
        let r = LocalRoutes::read();
        assert_eq!(r.holds(ip("127.0.0.1")), Some(true));
        assert_eq!(r.holds(ip("127.3.4.5")), Some(true));
        assert_eq!(r.holds(ip("203.0.113.77")), Some(false));
        assert!(!r.covers(ip("2001:db8:ffff::1")));
        assert!(Arc::ptr_eq(
            &LocalRoutes::current(Duration::from_secs(60)),
            &LocalRoutes::current(Duration::from_secs(60))
        ));
    }
}
