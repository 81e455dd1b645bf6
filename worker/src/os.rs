//! Every system call the worker makes that the standard library does not:
//! through `nix` and `socket2` where they wrap it safely, and those that
//! they do not (`TCP_INFO`, registering a listener with the reactor, the C
//! library's `gai_strerror`) here, each with its SAFETY note. The rest of the worker has no `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{SockRef, Socket};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The most of what rotor writes that the kernel holds unsent on a socket
/// limited by [`limit_unsent`].
pub const UNSENT: u32 = 256 * 1024;

/// `TCP_NOTSENT_LOWAT` of [`UNSENT`] on `sock` (a listener's accepted
/// sockets inherit it: no system call per connection).
///
/// Without it a write to a peer that reads slowly waits until a third of
/// the socket's send buffer has gone (the kernel's wake-up): with the MiBs
/// a long path autotunes to, minutes apart for a peer reading a few KB/s,
/// which the idle and write timeouts took for a peer that reads nothing.
/// With it, the write wakes once less than half of [`UNSENT`] is left
/// unsent, so a peer that takes 128 KiB within a timeout is moving. It
/// also keeps what a slow peer's socket holds in kernel memory to what is
/// in flight and this much more.
pub fn limit_unsent(sock: &impl AsFd) -> io::Result<()> {
    SockRef::from(sock).set_tcp_notsent_lowat(UNSENT)
}

/// accept4(2): the connection non-blocking and close-on-exec in one call.
pub fn accept(listener: &impl AsFd) -> io::Result<(TcpStream, SocketAddr)> {
    let (sock, addr) = SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let stream = TcpStream::from(sock);
    let peer = match addr.as_socket() {
        Some(a) => a,
        None => stream.peer_addr()?,
    };
    Ok((stream, peer))
}

/// The coarse monotonic clock (CLOCK_MONOTONIC_COARSE), in milliseconds:
/// the kernel's last tick, read from the vDSO without the TSC — for the
/// timestamps taken at every request (when bytes last moved, when a pooled
/// connection went idle). It runs up to a tick (1–10 ms) behind the fine
/// clock, nothing to a timeout of seconds.
pub fn coarse_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_or(0, |t| {
        t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000
    })
}

/// Whether a connection waits in `listener`'s queue now (poll(2), no
/// wait): what the reactor's readiness, kept from an earlier wake, may
/// no longer say.
pub fn queued(listener: &impl AsFd) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; a zero timeout.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

/// Registers `owner` (a listener, a watch socket) with the reactor for
/// readiness to read.
pub fn register_readable<T: Owns>(owner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `owner` owns its descriptor (`Owns`), which stays open and
    // the same until the AsyncFd (its owner from here) is dropped.
    unsafe { AsyncFd::register_with_interest(owner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A type that owns the descriptor it gives (closed when it drops).
pub trait Owns: AsRawFd {}
impl Owns for TcpListener {}
impl Owns for std::os::fd::OwnedFd {}

/// The inode of an open descriptor (an inherited socket keeps its own).
pub fn inode(fd: &impl AsFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_fd().as_raw_fd())
        .ok()
        .map(|st| st.st_ino)
}

/// IP_BIND_ADDRESS_NO_PORT: `bind(ip, 0)` takes no port until `connect`,
/// which picks one for the whole 4-tuple, so many source addresses do not
/// exhaust the ephemeral ports at bind time (the IPPROTO_IP option, which
/// the kernel honours for both families).
pub fn set_bind_address_no_port(sock: &Socket) -> io::Result<()> {
    setsockopt(sock, sockopt::IpBindAddressNoPort, &true).map_err(io::Error::from)
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Grows a pipe to `size` bytes; false where the kernel refuses (past the
/// user's pipe budget) or gives less.
pub fn set_pipe_size(pipe: &OwnedFd, size: usize) -> bool {
    let want = i32::try_from(size).unwrap_or(i32::MAX);
    nix::fcntl::fcntl(pipe.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(want)).is_ok_and(|got| got >= want)
}

/// A pipe's capacity in bytes (F_GETPIPE_SZ).
pub fn pipe_size(pipe: &OwnedFd) -> Option<usize> {
    nix::fcntl::fcntl(pipe.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
}

/// splice(2) without blocking between two stream descriptors (one a pipe).
pub fn splice(from: &impl AsFd, to: &impl AsFd, len: usize) -> io::Result<usize> {
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

/// The kernel's smoothed round-trip estimate of a TCP socket, in µs.
pub fn smoothed_rtt_us(sock: &impl AsRawFd) -> Option<u32> {
    tcp_info(
        sock.as_raw_fd(),
        std::mem::offset_of!(libc::tcp_info, tcpi_rtt) + 4,
    )
    .map(|i| i.tcpi_rtt)
}

/// A TCP socket's `TCP_INFO`, if the kernel wrote `need` bytes of it at
/// least.
fn tcp_info(fd: std::os::fd::RawFd, need: usize) -> Option<libc::tcp_info> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a zeroed tcp_info whose size `len` gives; the
    // kernel writes at most that much. (Neither nix nor socket2 reads
    // TCP_INFO.)
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zeroed is a valid tcp_info (plain integers), written or not.
    let info = unsafe { info.assume_init() };
    (r == 0 && len as usize >= need).then_some(info)
}

/// Whether a TCP socket is closed (its peer reset it): what it holds
/// unsent is never sent.
pub fn is_closed(fd: std::os::fd::RawFd) -> bool {
    // <netinet/tcp.h>'s TCP_CLOSE (libc does not name the states).
    const TCP_CLOSE: u8 = 7;
    tcp_info(fd, 1).is_some_and(|i| i.tcpi_state == TCP_CLOSE)
}

/// Whether a TCP socket's next byte to read is at the urgent mark (TCP
/// urgent data, `MSG_OOB`): splice stops there for good, a read goes past.
pub fn at_urgent_mark(sock: &impl AsRawFd) -> bool {
    // <asm-generic/sockios.h> (x86, Arm, RISC-V; libc does not name it).
    const SIOCATMARK: libc::Ioctl = 0x8905;
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int, ours. (Neither nix nor socket2
    // asks it.)
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCATMARK, &mut at) };
    r == 0 && at != 0
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet
/// (`SIOCOUTQ`: sent or not); `None` if it cannot be read. Fewer than a
/// moment ago, with nothing written meanwhile, is the peer taking them.
pub fn send_queue(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a socket) writes one int, ours. A
    // closed `fd` gives EBADF; the callers' sockets are open meanwhile.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (r == 0).then_some(n.max(0) as u32)
}

/// Whether `e` is a peer's reset (or a write it refused): a tunnel passes
/// that on as a reset ([`reset_at_close`]).
pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// Makes the close of the TCP socket `fd` a reset (`SO_LINGER` of 0): its
/// peer learns the stream was cut, not that it ended.
pub fn reset_at_close(fd: std::os::fd::RawFd) {
    // SAFETY: the caller's socket is open while it asks; a borrow for the
    // one call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// A descriptor of its own on the socket `fd` (open while the caller asks),
/// which keeps the socket open until it closes too.
pub fn held(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: open while the caller asks; a borrow for the one call,
    // duplicated into a descriptor of its own.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fd.try_clone_to_owned()
}

/// A stream of its own on the client socket `fd`, to watch it for its end
/// (a duplicate: registered with the reactor apart, closed apart).
///
/// `fd` must be open: the caller's connection, whose request is being
/// served (hyper's connection holds it while it polls the request).
pub fn watchable(fd: std::os::fd::RawFd) -> std::io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(std::net::TcpStream::from(held(fd)?))
}

/// The C library's text for getaddrinfo's error `code` (`gai_strerror`),
/// which is what the standard library's lookup error says after its own
/// prefix.
pub fn gai_strerror(code: libc::c_int) -> String {
    // SAFETY: gai_strerror returns a pointer to a static NUL-terminated
    // string for any code, known or not.
    let text = unsafe { std::ffi::CStr::from_ptr(libc::gai_strerror(code)) };
    text.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_with_the_peer_address_and_non_blocking() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = accept(&l).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let mut b = [0u8; 1];
        let e = std::io::Read::read(&mut &s, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(inode(&l).is_some_and(|i| i != 0));
        assert!(smoothed_rtt_us(&s).is_some());
    }

    #[test]
    fn pipes_grow_and_splice() {
        let (r, w) = pipe().unwrap();
        assert!(set_pipe_size(&w, 1 << 16));
        nix::unistd::write(&w, b"abc").unwrap();
        let (r2, w2) = pipe().unwrap();
        assert_eq!(splice(&r, &w2, 16).unwrap(), 3);
        let mut b = [0u8; 8];
        assert_eq!(nix::unistd::read(r2.as_raw_fd(), &mut b).unwrap(), 3);
        assert_eq!(
            nix::unistd::read(r.as_raw_fd(), &mut b).unwrap_err(),
            nix::errno::Errno::EAGAIN
        );
    }
}
