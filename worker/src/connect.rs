//! Upstream connections bound to a leased source address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::error::ProxyError;

/// Connects to the first of `dests` (of `source`'s family) that answers,
/// from `source`, within `timeout` overall. The addresses are tried in
/// turn, each with an equal share of the time left but at least
/// [`ATTEMPT_MIN`] of it (a live address on a slow path, or one SYN lost
/// and sent again a second later, still connects), so one that drops the
/// SYN costs its share, not the whole timeout, and the next is still
/// tried: a name with one dead address among four answers from the others.
pub async fn connect_from(
    source: IpAddr,
    dests: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let candidates: Vec<SocketAddr> = dests
        .iter()
        .copied()
        .filter(|d| d.is_ipv4() == source.is_ipv4())
        .collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    for (i, dest) in candidates.iter().enumerate() {
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        // Out of time: the addresses left get no SYN (a timeout polls the
        // connect once, which sends one, before it looks at the clock).
        if left.is_zero() && last.is_some() {
            break;
        }
        let share = (left / u32::try_from(candidates.len() - i).unwrap_or(u32::MAX))
            .max(ATTEMPT_MIN.min(left));
        let (sock, freebound) = bound_socket(source, *dest)?;
        // (`within`: a slow connect has the fast path watch its client.)
        let waited = match crate::h1::within(share, sock.connect(*dest))
            .await
            .ok_or(())
        {
            Ok(Ok(stream)) => {
                // Where the kernel says it left from: a broadcast address
                // of the host's (a subnet's last on an interface) binds,
                // and its connection leaves from the host's own address,
                // which a rotating proxy must never send from. Nothing is
                // sent on it (the allocator, told, takes such an address
                // out: see `routes::LocalRoutes::is_broadcast`).
                if let Ok(at) = stream.local_addr() {
                    if at.ip().to_canonical() != source.to_canonical() {
                        return Err(unavailable(source, format!("bound, its connection left from {} instead (a broadcast address?): closed unused", at.ip())));
                    }
                }
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            // The kernel gave up first (its SYN retries, `tcp_syn_retries`,
            // ran out within the share): a timeout all the same.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ETIMEDOUT) => now.elapsed(),
            // With `ip_nonlocal_bind` an address this host no longer holds
            // (a VIP moved to another node) binds, and its connect finds no
            // route: the source's fault, not the destination's (another
            // lease is tried, and the allocator told).
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENETUNREACH) && !this_hosts(source) => {
                return Err(ProxyError::SourceUnavailable {
                    ip: source,
                    source: e,
                });
            }
            Ok(Err(e)) => {
                last = Some(ProxyError::from_connect(dest.to_string(), e));
                continue;
            }
            Err(_) => share,
        };
        // Timed out.
        if let Some(gone) = freebound.then(|| gone(source, now)).flatten() {
            return Err(gone);
        }
        last = Some(ProxyError::ConnectTimeout {
            dest: dest.to_string(),
            timeout: waited,
        });
    }
    Err(last.unwrap_or_else(|| ProxyError::Unreachable {
        dest: format!("{dests:?}"),
        source: io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no address of the leased family",
        ),
    }))
}

/// The least time an address is given (the time left, if less): covers a
/// SYN sent again (Linux waits 1 s, then 2 s more) on a slow path.
const ATTEMPT_MIN: Duration = Duration::from_secs(3);

/// A non-blocking TCP socket bound to `(source, 0)`.
///
/// An IPv6 address inside a prefix routed to this host (`ip -6 route add
/// local PREFIX dev lo`) is not bindable as it is: when a local route
/// covers it, the bind is retried with `IPV6_FREEBIND`, so such a prefix
/// works with no sysctl. An address that is not this host's still fails
/// (freebind would let it send from an address whose answers go
/// elsewhere), and an address that binds as it is costs nothing more.
///
/// Only a failed `bind` is the source address's fault (`SourceUnavailable`,
/// which the allocator is told of); a socket this process cannot open
/// (descriptor limit, memory) is this worker's (`Socket`), and no pool
/// address pays for it.
///
/// What the allocator refuses in a pool is refused before any socket,
/// whatever a lease says (a lease table's file can say anything): the
/// unspecified address, bound, leaves from whatever address the kernel
/// picks — the host's own — which a rotating proxy must never do, and so
/// does `::ffff:0.0.0.0`, IPv4's unspecified address on a dual-stack
/// socket.
///
/// Whether it was bound with freebind, beside it.
fn bound_socket(source: IpAddr, dest: SocketAddr) -> Result<(TcpSocket, bool), ProxyError> {
    if let Some(why) = rotor_protocol::addr::not_a_source_ip(source) {
        return Err(unavailable(source, format!("not a source: {why}")));
    }
    // A broadcast address of the host's binds, but its connection leaves
    // from the host's own address: refused before a SYN goes (checked
    // again after the connect, where the routes could not be read).
    if source.is_ipv4() && broadcast(source) {
        return Err(unavailable(
            source,
            "a broadcast address of this host's: its connections would leave from another address",
        ));
    }
    let sock = Socket::new(
        Domain::for_address(dest),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
    .and_then(|sock| crate::os::set_bind_address_no_port(&sock).map(|()| sock))
    .map_err(ProxyError::Socket)?;
    let unusable = |e| ProxyError::SourceUnavailable {
        ip: source,
        source: e,
    };
    // With IPv6's `ip_nonlocal_bind` set any address binds, and the SYN
    // would leave from an address whose answers go elsewhere. (IPv4's
    // connect from an address the host does not hold finds no route,
    // ENETUNREACH, without IP_TRANSPARENT: handled above.)
    if source.is_ipv6() && nonlocal_bind_v6() && !this_hosts(source) {
        return Err(unusable(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
    }
    let at = SocketAddr::new(source, 0).into();
    let freebound = match sock.bind(&at) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && locally_routed(source) => {
            sock.set_freebind_v6(true).map_err(ProxyError::Socket)?;
            sock.bind(&at).map_err(unusable)?;
            true
        }
        r => r.map(|()| false).map_err(unusable)?,
    };
    Ok((TcpSocket::from_std_stream(sock.into()), freebound))
}

/// `ip` cannot be a source here, for `why`: the address's fault (the
/// allocator is told, and another lease tried).
fn unavailable(ip: IpAddr, why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ProxyError {
    ProxyError::SourceUnavailable {
        ip,
        source: io::Error::new(io::ErrorKind::AddrNotAvailable, why),
    }
}

/// Whether `ip` is one of this host's broadcast addresses, by the reading
/// of the routes the destination rules take (`acl::LOCAL_TTL` old at most:
/// a connect is no reason to read them each second; the kernel's word of
/// a change, watched, makes it stale at once): a lock and a hash probe.
fn broadcast(ip: IpAddr) -> bool {
    rotor_protocol::routes::LocalRoutes::current(crate::acl::LOCAL_TTL).is_broadcast(ip)
}

/// Whether this host holds `ip` (a local route covers it), by a reading of
/// the routes at most a second old; `true` if that cannot be read.
fn this_hosts(ip: IpAddr) -> bool {
    rotor_protocol::routes::LocalRoutes::current(Duration::from_secs(1))
        .holds(ip)
        .unwrap_or(true)
}

/// A connect from `source`, bound with freebind, that timed out because
/// `source` left this host while its SYN waited: the source's fault, not
/// the destination's (another lease is tried, and the allocator told).
/// The bind took it by a reading of the routes up to a second old: a
/// prefix's local route deleted within that second still bound, and the
/// SYN's answers went elsewhere. Asked of a reading made since the
/// attempt `began` (one a connect timeout at most, however many time out).
fn gone(source: IpAddr, began: tokio::time::Instant) -> Option<ProxyError> {
    let routes = rotor_protocol::routes::LocalRoutes::current(began.elapsed());
    (routes.holds(source) == Some(false))
        .then(|| unavailable(source, "no longer this host's: no local route covers it"))
}

/// Listens to the kernel's word of changes to this host's addresses and
/// local routes until `stop`, and tells each to `routes::changed`: the
/// shared reading of the routes is read again at once (a prefix's route
/// deleted was still bound with freebind for up to a second, each connect
/// from it waiting out `--connect-timeout`), and idle upstream
/// connections kept from before are not reused (one from an address the
/// host no longer holds waited out `--response-timeout`). Where netlink
/// is refused (a sandbox), nothing is watched: the reading's second of
/// age stands, as before.
pub async fn watch_local_routes(stop: tokio_util::sync::CancellationToken) {
    let fd = match rotor_protocol::netlink::watch() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch this host's addresses and routes (netlink); their reading is kept up to a second");
            return;
        }
    };
    let fd = match crate::os::register_readable(fd) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(error = %e, "cannot watch this host's addresses and routes");
            return;
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    let overflows = rotor_protocol::Moment::new();
    loop {
        let mut ready = tokio::select! {
            _ = stop.cancelled() => return,
            r = fd.readable() => match r {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut heard = rotor_protocol::netlink::LocalChange::default();
        loop {
            use std::os::fd::AsRawFd;
            let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::recv(ready.get_inner().as_raw_fd(), &mut buf, flags) {
                Ok(n) => {
                    let said = rotor_protocol::netlink::local_change(&buf[..n]);
                    heard.changed |= said.changed;
                    heard.departed |= said.departed;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    break;
                }
                // The kernel's words overflowed the socket (a router's
                // table churning fills it): a removal may have gone
                // unheard. Taken for one once a second at most, as the
                // reading's age was before this watch, not at every
                // overflow (each drops every idle connection, and has the
                // routes read again on a request's path).
                Err(nix::errno::Errno::ENOBUFS) => {
                    if overflows.first_in(Duration::from_secs(1)) {
                        heard.changed = true;
                        heard.departed = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stopped watching this host's addresses and routes; their reading is kept up to a second");
                    return;
                }
            }
        }
        if heard.changed {
            rotor_protocol::routes::changed(heard.departed);
        }
    }
}

/// Whether `net.ipv6.ip_nonlocal_bind` is set, by a reading at most 10 s
/// old (keepalived may set it after the worker started): one atomic load
/// per connection, one file read per 10 s.
fn nonlocal_bind_v6() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    // When it was read (coarse milliseconds, shifted), and its value (bit 0).
    static READ: AtomicU64 = AtomicU64::new(0);
    let now = crate::os::coarse_ms();
    let last = READ.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last >> 1) < 10_000 {
        return last & 1 == 1;
    }
    let set = std::fs::read_to_string("/proc/sys/net/ipv6/ip_nonlocal_bind")
        .is_ok_and(|v| v.trim() != "0");
    READ.store((now.max(1) << 1) | u64::from(set), Ordering::Relaxed);
    set
}

/// Whether a local IPv6 route covers `ip`, by a reading of the routes at
/// most a second old (one reading a second at most, however many
/// connections a /64 pool makes).
fn locally_routed(ip: IpAddr) -> bool {
    ip.is_ipv6() && rotor_protocol::routes::LocalRoutes::current(Duration::from_secs(1)).covers(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_the_given_source() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let src: IpAddr = "127.0.0.7".parse().unwrap();
        let client = connect_from(src, &[dest], Duration::from_secs(2))
            .await
            .unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), src);
        assert_eq!(client.local_addr().unwrap().ip(), src);
    }

    /// A broadcast address of the host's (lo's 127.255.255.255) binds, but
    /// its connection leaves from another address (127.0.0.1, which a
    /// rotating proxy must never send from): refused as the source's
    /// fault before its SYN. (Where the routes cannot be read, the check
    /// of where a connection left from refuses it after the connect.)
    #[tokio::test]
    async fn a_connection_that_left_from_another_address_is_refused() {
        let routes = rotor_protocol::routes::LocalRoutes::read();
        let bcast: IpAddr = "127.255.255.255".parse().unwrap();
        if !routes.is_broadcast(bcast) {
            // (No loopback broadcast route here: nothing to try.)
            eprintln!("skipped: 127.255.255.255 is no broadcast address here");
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let e = connect_from(bcast, &[dest], Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ProxyError::SourceUnavailable { ip, .. } if *ip == bcast),
            "{e:?}"
        );
        // (Refused before its SYN: review ap saw the destination accept a
        // connection from 127.0.0.1 when it was checked after.)
        assert!(
            format!("{e:?}").contains("a broadcast address of this host"),
            "{e:?}"
        );
    }

    /// A listener whose accept queue is full drops SYNs: a dead address.
    fn silent_listener() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.listen(0).unwrap();
        let listener: std::net::TcpListener = sock.into();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        // Fill the queue (the kernel takes backlog + 1); later SYNs wait.
        for _ in 0..4 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            held.push(s.into());
        }
        std::thread::sleep(Duration::from_millis(50));
        (listener, held)
    }

    #[tokio::test]
    async fn an_address_that_drops_the_syn_leaves_time_for_the_next() {
        let (dead, _held) = silent_listener();
        let dead = dead.local_addr().unwrap();
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let src: IpAddr = "127.0.0.9".parse().unwrap();
        let started = std::time::Instant::now();
        let stream = connect_from(
            src,
            &[dead, good.local_addr().unwrap()],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good.local_addr().unwrap());
        let took = started.elapsed();
        // Half of 5 s is less than the least share: 3 s.
        assert!(
            took >= Duration::from_millis(2900),
            "the first had its share: {took:?}"
        );
        assert!(took < Duration::from_millis(4500), "{took:?}");
        // Alone, the dead one has the whole timeout, and says so.
        let err = connect_from(src, &[dead], Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::ConnectTimeout { .. }), "{err}");
        // Out of time after the first: the next is sent no SYN (it was,
        // and the socket dropped at once, or on loopback even connected).
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = connect_from(
            src,
            &[dead, good.local_addr().unwrap()],
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::ConnectTimeout { .. }), "{err}");
        let accepted = tokio::time::timeout(Duration::from_millis(300), good.accept()).await;
        assert!(accepted.is_err(), "a SYN went past the deadline");
    }

    #[tokio::test]
    async fn the_unspecified_address_is_never_a_source() {
        // Dual-stack (where the host has IPv6): `::ffff:0.0.0.0` on an IPv6
        // socket is IPv4's unspecified address, and would connect.
        let listener = match tokio::net::TcpListener::bind("[::]:0").await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap(),
        };
        let port = listener.local_addr().unwrap().port();
        let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{port}").parse().unwrap();
        for (src, dest) in [
            ("0.0.0.0", SocketAddr::from(([127, 0, 0, 1], port))),
            ("224.0.0.1", SocketAddr::from(([127, 0, 0, 1], port))),
            ("::ffff:0.0.0.0", mapped),
            ("::ffff:127.0.0.1", mapped),
        ] {
            let err = connect_from(src.parse().unwrap(), &[dest], Duration::from_secs(2))
                .await
                .unwrap_err();
            assert!(
                matches!(err, ProxyError::SourceUnavailable { .. }),
                "{src}: {err}"
            );
        }
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "nothing connected");
    }

    #[tokio::test]
    async fn refused_and_foreign_source_are_classified() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        drop(listener);
        let err = connect_from(
            "127.0.0.2".parse().unwrap(),
            &[dest],
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ProxyError::Refused { .. }), "{err:?}");
        // TEST-NET-3 is never configured here: binding to it must fail, not
        // fall back to another address.
        let err = connect_from(
            "203.0.113.9".parse().unwrap(),
            &[dest],
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, ProxyError::SourceUnavailable { .. }),
            "{err:?}"
        );
    }
}
