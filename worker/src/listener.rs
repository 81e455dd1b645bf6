//! The proxy's listening sockets: bound here with SO_REUSEPORT (so several
//! workers share a port), or inherited from systemd socket activation.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections the kernel queues per listener before accept.
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// A listener that other processes may share (SO_REUSEPORT): for workers
/// started on their own, each binding the same port.
pub fn bind_reuseport(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    bind(addr, true)
}

/// A listener of this process alone (`rotor up` binds once and passes it
/// to its workers): a second `rotor up` on the same port fails here
/// instead of joining the first one's workers.
pub fn bind_exclusive(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    bind(addr, false)
}

fn bind(addr: SocketAddr, shared: bool) -> Result<std::net::TcpListener, ListenError> {
    let wrap = |source| ListenError { addr, source };
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(wrap)?;
    sock.set_reuse_address(true).map_err(wrap)?;
    sock.set_reuse_port(shared).map_err(wrap)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(wrap)?;
    }
    sock.bind(&addr.into()).map_err(wrap)?;
    sock.listen(BACKLOG).map_err(wrap)?;
    sock.set_nonblocking(true).map_err(wrap)?;
    Ok(sock.into())
}
