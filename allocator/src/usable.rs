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
//! for IPv6 the covering route counts. Nothing is sent anywhere.

use std::io;
use std::net::{IpAddr, SocketAddr};

use nix::sys::socket::{setsockopt, sockopt};
use rotor_protocol::routes::LocalRoutes;
use rotor_protocol::Segment;
use socket2::{Domain, Socket, Type};

/// `Ok` if this host can use `entry` as a source (its first address, for
/// a prefix); else why not.
pub fn check(entry: &Segment) -> Result<(), String> {
    Checker::default().check(entry)
}

/// Checks of many entries, with the local routes read once (at most) for
/// all of them.
#[derive(Default)]
pub struct Checker {
    routes: Option<LocalRoutes>,
}

impl Checker {
    pub fn check(&mut self, entry: &Segment) -> Result<(), String> {
        let ip = entry.at(0);
        let local = self.routes.get_or_insert_with(LocalRoutes::read).holds(ip);
        // With `ip_nonlocal_bind` set every address binds: the routing
        // table has the last word where it can be read.
        if local == Some(false) {
            return Err(describe(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
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

    #[test]
    fn loopback_is_usable_and_a_foreign_address_is_not() {
        let one = |s: &str| Segment::single(s.parse().unwrap());
        assert_eq!(check(&one("127.0.0.5")), Ok(()));
        // TEST-NET-3: never configured here; nothing is sent by the check.
        let err = check(&one("203.0.113.77")).unwrap_err();
        assert!(err.contains("EADDRNOTAVAIL"), "{err}");
        assert!(check(&one("2001:db8:ffff::1")).is_err());
    }
}
