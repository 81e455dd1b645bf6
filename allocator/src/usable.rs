//! Whether this host can send from a pool entry: an address it holds, or
//! one inside a prefix routed to it (`ip route add local PREFIX dev lo`, the
//! "AnyIP" set-up). Checked at load, at every refresh, and again with a
//! backoff for entries out of the rotation.
//!
//! The check asks the routing table (`rotor_protocol::routes`) whether a
//! local route covers the address — with `ip_nonlocal_bind` set, a bind
//! alone would pass any address — and binds a socket to it without
//! `IP_FREEBIND`: that succeeds for a configured address and, for IPv4,
//! for any address of a local route. An IPv6 address of a local route is
//! not bindable without `IPV6_FREEBIND` (which the worker sets then), so
//! for IPv6 the covering route counts (and the bind still tells a
//! tentative address, whose duplicate detection is not done). An IPv4
//! address a local route covers is not bound: it always would. Nothing is
//! sent anywhere.

use std::io;
use std::net::{IpAddr, SocketAddr};

use nix::sys::socket::{setsockopt, sockopt};
use rotor_protocol::routes::LocalRoutes;
use rotor_protocol::Segment;
use socket2::{Domain, Socket, Type};

/// Checks of many entries, with the local routes read once (at most) for
/// all of them.
#[derive(Default)]
pub struct Checker {
    routes: Option<std::sync::Arc<LocalRoutes>>,
}

impl Checker {
    /// Checks with the local routes as read at most `max_age` ago (a
    /// worker's reports come in bursts: one read of a BGP host's
    /// megabytes of routes a second, not one a report).
    pub fn recent(max_age: std::time::Duration) -> Checker {
        Checker {
            routes: Some(LocalRoutes::current(max_age)),
        }
    }

    /// As [`check`](Self::check), by the local routes alone (no bind: a
    /// sweep of a listed IPv6 /112 bound 65 536 sockets): what a route
    /// withdrawn or an address removed takes away. An entry the routes
    /// still hold, or where they cannot be read, passes.
    pub fn check_routes(&mut self, entry: &Segment) -> Result<(), String> {
        let routes = self
            .routes
            .get_or_insert_with(|| std::sync::Arc::new(LocalRoutes::read()));
        match routes.holds_all(entry) {
            Some(false) => self.check(entry),
            _ => Ok(()),
        }
    }

    /// `Ok` if this host can use `entry` as a source (all of it, for a
    /// prefix); else why not.
    pub fn check(&mut self, entry: &Segment) -> Result<(), String> {
        let ip = entry.at(0);
        let routes = self
            .routes
            .get_or_insert_with(|| std::sync::Arc::new(LocalRoutes::read()));
        // A prefix is this host's only if all of it is: one whose first
        // address alone is (a /48 of which one /64 is routed) would fail
        // most of its leases, be taken out, and be put back at each look.
        let local = routes.holds_all(entry);
        if entry.is_single() && routes.is_broadcast(ip) {
            return Err(format!(
                "{ip} is a broadcast address of this host's (the last address of a subnet on an interface: `ip -4 route show table local type broadcast`): it binds, but its connections leave from another address, the host's own"
            ));
        }
        // With `ip_nonlocal_bind` set every address binds: the routing
        // table has the last word where it can be read.
        if local == Some(false) {
            if !entry.is_single() {
                return Err(format!(
                    "not all of {entry} is this host's: local routes of the main or local table (its interfaces' addresses, or `ip route add local {entry} dev lo`) must cover every address of it, and no narrower route of the main table take part of it (`unreachable`, a gateway's); one in a table of its own (`table 100`) does not count"
                ));
            }
            return Err(describe(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
        }
        // An IPv4 address a local route covers binds without IP_FREEBIND,
        // always: the bind would tell nothing, and a refresh of a listed
        // /16 made 65 536 sockets (0.6 s of system time) to learn it.
        if local == Some(true) && ip.is_ipv4() {
            return Ok(());
        }
        match bind(ip) {
            Ok(()) => Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL)
                    && ip.is_ipv6()
                    && local == Some(true) =>
            {
                Ok(())
            }
            Err(e) => Err(describe(&e)),
        }
    }
}

/// Whether this host can use `entry` now, by the routes read now (an
/// operator's release: a route added a moment before counts).
pub fn usable_now(entry: &Segment) -> Result<(), String> {
    Checker::default().check(entry)
}

/// The index of the interface this host sends from `src` to `dst` through
/// (what `ip route get DST from SRC` says): a route lookup over rtnetlink,
/// rules on the source included. Nothing is sent to `dst`. `Ok(None)`: no
/// route there from `src` (unreachable, prohibited).
pub fn egress_interface(src: IpAddr, dst: IpAddr) -> io::Result<Option<u32>> {
    use rotor_protocol::netlink::*;
    let family = rotor_protocol::Family::of(&dst);
    let bits = family.bits();
    let rtmsg = [af(family), bits, bits, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let (to, from) = (octets(dst), octets(src));
    let request = message(
        RTM_GETROUTE,
        NLM_F_REQUEST,
        &rtmsg,
        &[(RTA_DST, &to), (RTA_SRC, &from)],
    );
    let mut socket = RouteSocket::open(std::time::Duration::from_secs(1))?;
    socket.send(&request)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a route reply rotor cannot read",
        )
    };
    let reply = socket.receive()?;
    let m = *messages(reply)?.first().ok_or_else(bad)?;
    match m.kind {
        NLMSG_ERROR => match m.error()? {
            None => Err(bad()),
            Some(e) => match e.raw_os_error() {
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES) => Ok(None),
                _ => Err(e),
            },
        },
        RTM_NEWROUTE => Ok(m
            .attributes()
            .find(|&(kind, data)| kind == RTA_OIF && data.len() == 4)
            .map(|(_, data)| u32_at(data, 0))),
        _ => Err(bad()),
    }
}

/// The single-address entries this host holds on an interface other than
/// lo but sends to the internet from through another interface, each with
/// what to do about it: a secondary network interface's address (AWS,
/// GCP, Azure) without source routing. A cloud network drops packets that
/// leave with another interface's address, so requests from such an entry
/// time out; a switch on one L2 segment may carry them, so this is a
/// warning, not a quarantine. Nothing is said when the host has no route
/// to the internet from the entry at all (local destinations only).
pub fn misrouted<'a>(entries: impl Iterator<Item = &'a Segment>) -> Misrouted {
    use std::collections::HashMap;
    let mut out = Misrouted::default();
    let Ok(all) = crate::source::list_interfaces() else {
        return out;
    };
    let index = |name: &str| nix::net::if_::if_nametoindex(name).ok();
    let lo = index("lo");
    // Each interface address, by the interface's index (a label, `eth1:0`,
    // is the kernel's `eth1`).
    let held: HashMap<IpAddr, (u32, String)> = all
        .into_iter()
        .filter_map(|a| {
            let ip = a.ip?;
            let i = index(&a.name)?;
            let name = a.name.split(':').next().unwrap_or(&a.name).to_string();
            (Some(i) != lo).then_some((ip, (i, name)))
        })
        .collect();
    for e in entries {
        if !e.is_single() || held.is_empty() {
            continue;
        }
        let ip = e.at(0);
        let Some((own, name)) = held.get(&ip) else {
            continue;
        };
        if out.looked.contains(e) {
            continue;
        }
        // Looked at only with an answer: a lookup that failed, or found no
        // route out at all (a moment without one), tells nothing.
        let Ok(Some(via)) = egress_interface(ip, internet(ip)) else {
            continue;
        };
        out.looked.insert(*e);
        if via == *own {
            continue;
        }
        let via = nix::net::if_::if_indextoname(via)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("interface {via}"));
        let v6 = if ip.is_ipv6() { " -6" } else { "" };
        out.found.push((
            *e,
            format!(
                "{ip} is {name}'s, but this host sends to the internet from it through {via}: a cloud network drops packets with another interface's source address, so requests from it would time out; route its traffic out of {name} (`ip{v6} rule add from {ip} table 100` and `ip{v6} route add default via GATEWAY dev {name} table 100`)"
            ),
        ));
    }
    out
}

/// What `misrouted` found: the entries sending through another interface,
/// each with what to do, and every entry it could look at (the single
/// addresses of an interface other than lo with a route out).
#[derive(Debug, Default)]
pub struct Misrouted {
    pub found: Vec<(Segment, String)>,
    pub looked: std::collections::HashSet<Segment>,
}

/// An address of the internet at large, of `ip`'s family, to ask the
/// routing table about (a documentation address: the default route, and
/// no other, holds it; nothing is sent to it).
pub(crate) fn internet(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::new(198, 51, 100, 1).into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
    }
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => {
            "not an address of this host (EADDRNOTAVAIL: not configured on any interface, nor in a local route)".into()
        }
        _ => format!("cannot bind it: {e}"),
    }
}

fn bind(ip: IpAddr) -> io::Result<()> {
    let sock = Socket::new(
        Domain::for_address(SocketAddr::new(ip, 0)),
        Type::STREAM,
        None,
    )?;
    // No port is taken: the check leaves the ephemeral ports alone.
    let _ = setsockopt(&sock, sockopt::IpBindAddressNoPort, &true);
    sock.bind(&SocketAddr::new(ip, 0).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(entry: &Segment) -> Result<(), String> {
        Checker::default().check(entry)
    }

    #[test]
    fn the_route_lookup_names_the_interface_out() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            egress_interface(ip("127.0.0.1"), ip("127.0.0.2")).unwrap(),
            Some(lo)
        );
        // (where the host has IPv6 at all)
        if std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|t| !t.is_empty()) {
            assert_eq!(egress_interface(ip("::1"), ip("::1")).unwrap(), Some(lo));
        }
    }

    #[test]
    fn loopback_is_usable_and_a_foreign_address_is_not() {
        let one = |s: &str| Segment::single(s.parse().unwrap());
        assert_eq!(check(&one("127.0.0.5")), Ok(()));
        // TEST-NET-3: never configured here; nothing is sent by the check.
        let err = check(&one("203.0.113.77")).unwrap_err();
        assert!(err.contains("EADDRNOTAVAIL"), "{err}");
        assert!(check(&one("2001:db8:ffff::1")).is_err());
    }

    /// A prefix is usable only if all of it is this host's: 124.0.0.0/6
    /// starts inside 127.0.0.0/8 (lo's) for a quarter of it only.
    #[test]
    fn a_prefix_partly_this_hosts_is_not_usable() {
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert_eq!(check(&seg("127.0.0.0/9")), Ok(()));
        assert_eq!(check(&seg("127.1.2.0/24")), Ok(()));
        for (entry, shown) in [
            ("127.0.0.0/7", "126.0.0.0/7"),
            ("124.0.0.0/6", "124.0.0.0/6"),
        ] {
            let err = check(&seg(entry)).unwrap_err();
            assert!(err.contains(&format!("not all of {shown}")), "{err}");
        }
    }
}
