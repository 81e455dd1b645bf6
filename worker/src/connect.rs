//! Upstream connections bound to a leased source address, and destination
//! name resolution.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use rotor_protocol::addr::unbracketed;

use crate::error::ProxyError;

/// The address `host` spells, if it is an IP literal (`192.0.2.1`,
/// `[2001:db8::1]`): no lookup needed.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    unbracketed(host).parse().ok()
}

/// Resolves `host:port`. An IP literal needs no lookup.
pub async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ProxyError> {
    if let Some(ip) = ip_literal(host) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let bare = unbracketed(host);
    let lookup = tokio::net::lookup_host((bare, port));
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(source)) => {
            return Err(ProxyError::Dns {
                host: bare.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(ProxyError::DnsTimeout {
                host: bare.to_string(),
                timeout,
            })
        }
    };
    if addrs.is_empty() {
        return Err(ProxyError::DnsEmpty {
            host: bare.to_string(),
        });
    }
    Ok(addrs)
}

/// Connects to the first of `dests` (of `source`'s family) that answers,
/// from `source`, within `timeout` overall.
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
    let attempt = async {
        let mut last = None;
        for dest in &candidates {
            let sock = bound_socket(source, *dest).map_err(|e| ProxyError::SourceUnavailable {
                ip: source,
                source: e,
            })?;
            match sock.connect(*dest).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = Some(ProxyError::from_connect(dest.to_string(), e)),
            }
        }
        Err(last.unwrap_or_else(|| ProxyError::Unreachable {
            dest: format!("{dests:?}"),
            source: io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "no address of the leased family",
            ),
        }))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::ConnectTimeout {
            dest: candidates
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            timeout,
        }),
    }
}

/// A non-blocking TCP socket bound to `(source, 0)`.
fn bound_socket(source: IpAddr, dest: SocketAddr) -> io::Result<TcpSocket> {
    let sock = Socket::new(
        Domain::for_address(dest),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    set_bind_address_no_port(&sock)?;
    sock.bind(&SocketAddr::new(source, 0).into())?;
    Ok(TcpSocket::from_std_stream(sock.into()))
}

/// `IP_BIND_ADDRESS_NO_PORT`: choose the ephemeral port at connect time, by
/// the full 4-tuple, instead of at bind time by (address, port) alone. Without
/// it, every bound socket reserves a port of its source address for its whole
/// life and thousands of connections exhaust the range. socket2 does not
/// expose it. Applies to IPv6 sockets too (it is an IPPROTO_IP option the
/// kernel honours for both families).
fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `sock` is an open socket for the duration of the call, and the
    // option value is a valid c_int whose size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

    #[tokio::test]
    async fn ip_literals_skip_dns() {
        let a = resolve("[::1]", 80, Duration::from_secs(1)).await.unwrap();
        assert_eq!(a, vec!["[::1]:80".parse().unwrap()]);
    }
}
