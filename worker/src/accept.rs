//! Accepting client connections, balanced between the workers that share a
//! listening socket.
//!
//! Workers started by `rotor up`, or by systemd with one `Sockets=` unit,
//! accept from one kernel queue: every one of them is woken for a new
//! connection and the first to call accept gets it. When connections arrive
//! in a burst, as a client's keep-alive pool opens, where they land is the
//! luck of that race, and they stay there: splits of 40/10 and 1/49 were
//! seen on the bench for 50 connections and 2 workers, with the busier
//! worker's p99 twice the other's.
//!
//! So each worker publishes its load (client connections and tunnels held)
//! in its line of the allocator's lease table, under its accept group (the
//! identity of the listening sockets it accepts from), and a worker woken
//! for a connection while it holds clearly more than the least loaded of
//! its siblings leaves it to them a moment (see [`Defer`]). It still accepts
//! whatever remains queued after that, once, so a sibling that is busy,
//! stopped or gone costs a new connection a millisecond at most (10 ms when
//! this worker is full: it then takes the connection to refuse it), never
//! the connection. Measured on the bench (2 workers, 50 keep-alive connections):
//! splits within 19/31, and p99 1.6–2.2 ms against 1.8–5.1 ms without.
//! Workers that bind their own `SO_REUSEPORT` sockets are each their own
//! group (the kernel spreads connections between those queues), and so is a
//! worker without a table slot: both accept as they always did.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::lease::LeaseClient;
use crate::os;

/// How long a worker holding more than its share leaves a new connection to
/// its siblings before it accepts it itself.
const DEFER: Duration = Duration::from_millis(1);

/// How long a full worker leaves a connection to a sibling with room
/// before it takes it (to answer 503): a sibling stopped or wedged with
/// room to spare must not leave connections in the queue for ever, nor
/// the full worker awake every millisecond while it waits.
const FULL_DEFER_MAX: Duration = Duration::from_millis(10);

/// How long a sibling that let a full worker's connection wait
/// [`FULL_DEFER_MAX`] is taken for stalled.
const STALLED_FOR: Duration = Duration::from_millis(500);

/// How often the load is published besides at each accept, so siblings
/// also see connections close.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// This worker's load and its siblings', for the accept loops.
pub struct Balance {
    leases: Arc<LeaseClient>,
    limit: Arc<Semaphore>,
    max: usize,
    group: u64,
    /// Stopped accepting (draining): out of the group, so siblings do not
    /// hold back for a load this worker no longer takes on.
    left: std::sync::atomic::AtomicBool,
}

impl Balance {
    /// `limit` holds a permit per client connection and tunnel, out of
    /// `max`; `listeners` (every one whose accept loop this balance
    /// holds back: HTTP, TLS and SOCKS5) name the accept group.
    pub fn new<'a>(
        leases: Arc<LeaseClient>,
        limit: Arc<Semaphore>,
        max: usize,
        listeners: impl IntoIterator<Item = &'a std::net::TcpListener>,
    ) -> Balance {
        Balance {
            leases,
            limit,
            max,
            group: accept_group(listeners),
            left: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Connections held (each holds its permit from its accept on).
    fn load(&self) -> u64 {
        self.max.saturating_sub(self.limit.available_permits()) as u64
    }

    /// Publishes the load; whether a sibling should take the next
    /// connection.
    fn leave_to_sibling(&self) -> Defer {
        if self.left.load(std::sync::atomic::Ordering::Relaxed) {
            return Defer::No;
        }
        let mine = self.load();
        self.leases.publish_load(self.group, mine);
        Defer::choose(
            mine,
            self.leases.least_sibling_load(self.group),
            self.max as u64,
        )
    }

    /// Out of the group for good (the stop): siblings no longer hold back
    /// for a load this worker no longer takes on.
    fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::Relaxed);
        self.leases.leave_group();
    }

    /// Publishes the load every [`PUBLISH_EVERY`] until `stop`, then
    /// leaves the group.
    pub async fn publish(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.leave();
                    return;
                }
                _ = tick.tick() => {
                    self.leases.publish_load(self.group, self.load());
                }
            }
        }
    }
}

/// How a worker woken for a new connection leaves it to its siblings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defer {
    /// Accept it.
    No,
    /// Run this worker's other tasks first: a sibling already awake takes
    /// it meanwhile. Costs nothing measurable when connections churn (the
    /// bench's new-connection rate was the same with and without).
    Yield,
    /// Wait [`DEFER`]: this worker holds more than twice the least loaded
    /// sibling's share, which has room to take it.
    Wait,
    /// Wait [`DEFER`], again and again for [`FULL_DEFER_MAX`]: this worker
    /// is full (it could only refuse the connection) and a sibling has
    /// room.
    Full,
}

impl Defer {
    /// For a worker holding `mine` of its `max` whose least loaded sibling
    /// holds `least`: a sibling should take the next connection when this
    /// worker holds more by more than one and a sixteenth, and always when
    /// this one is full and the sibling is not.
    fn choose(mine: u64, least: Option<u64>, max: u64) -> Defer {
        match least {
            Some(least) if mine >= max && least < max => Defer::Full,
            Some(least) if mine > 2 * least + 4 => Defer::Wait,
            Some(least) if mine > least + 1 + mine / 16 => Defer::Yield,
            _ => Defer::No,
        }
    }
}

/// Accepts from `listener` until `stop`, handing each connection to
/// `serve` (which spawns its task).
pub async fn accept_loop(
    listener: std::net::TcpListener,
    balance: Arc<Balance>,
    serve: impl Fn(ClientTcp, SocketAddr),
    stop: CancellationToken,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from their listener on Linux:
    // set it once here instead of a system call per connection. The first
    // connection tells whether it took; if not, each is set.
    let _ = socket2::SockRef::from(&listener).set_tcp_nodelay(true);
    let mut inherits_nodelay: Option<bool> = None;
    let listener = os::register_readable(listener)?;
    let mut deferral = Deferral::default();
    // At the stop, this loop's last word in the group is a leave: its own
    // publish of its load, racing the stop's leave on another thread,
    // could otherwise land last and keep a draining worker in the group.
    struct LeaveAtStop<'a>(&'a Balance, &'a CancellationToken);
    impl Drop for LeaveAtStop<'_> {
        fn drop(&mut self) {
            if self.1.is_cancelled() {
                self.0.leave();
            }
        }
    }
    let _leave = LeaveAtStop(&balance, &stop);
    let at_stop = |listener: &std::net::TcpListener| {
        for (std, peer) in queued_at_stop(listener) {
            let _ = std.set_nodelay(true);
            serve(ClientTcp::new(std), peer);
        }
        Ok(())
    };
    loop {
        let mut ready = tokio::select! {
            _ = stop.cancelled() => return at_stop(listener.get_ref()),
            r = listener.readable() => r?,
        };
        let defer = deferral.decide(balance.leave_to_sibling(), tokio::time::Instant::now());
        if defer != Defer::No {
            match defer {
                Defer::Wait | Defer::Full => tokio::select! {
                    _ = stop.cancelled() => return at_stop(listener.get_ref()),
                    _ = tokio::time::sleep(DEFER) => {}
                },
                _ => tokio::task::yield_now().await,
            }
            // A full worker's sibling took what woke it (nothing queued
            // now): the next connection is waited for, and left to the
            // sibling afresh. (The readiness kept from the wake had it
            // wake every 1 ms and, 10 ms on, accept a newer connection
            // the sibling had not reached yet, and take it for stalled.)
            if defer == Defer::Full && !os::queued(listener.get_ref()) {
                ready.clear_ready();
                deferral = Deferral::default();
            }
            continue;
        }
        let accepted = ready.try_io(|l| os::accept(l.get_ref()));
        deferral.accepted(matches!(accepted, Ok(Ok(_))), tokio::time::Instant::now());
        match accepted {
            Ok(Ok((std, peer))) => {
                let inherited =
                    *inherits_nodelay.get_or_insert_with(|| std.nodelay().unwrap_or(false));
                if !inherited {
                    let _ = std.set_nodelay(true);
                }
                // Registered with the reactor when it first has to wait.
                let stream = ClientTcp::new(std);
                serve(stream, peer);
            }
            Ok(Err(e)) if is_transient(&e) => {}
            // The listening socket was shut (`rotor up` stopping: the stop
            // reaches this worker a moment later): nothing more to accept.
            Ok(Err(e)) if is_shut(&e) => {
                debug!("listening socket shut; no more accepts");
                return Ok(());
            }
            Ok(Err(e)) => accept_failed(&e).await,
            // Nothing queued after all (a sibling took it): wait again.
            Err(_would_block) => {}
        }
    }
}

/// The most connections taken from a listener's queue at the stop (its
/// backlog's).
const MAX_QUEUED_AT_STOP: usize = 4096;

/// At the stop, the connections waiting in the queue of a listener this
/// worker bound itself (`SO_REUSEPORT`, `--listen` without `rotor up` or
/// systemd): no other worker accepts from that queue, and closing it
/// resets them (unless `net.ipv4.tcp_migrate_req` is 1), so they are
/// taken, to be served as the drain serves a connection's first request.
/// A socket shared with siblings (passed to each: `rotor up`, socket
/// activation) keeps them for the siblings: none are taken.
pub(crate) fn queued_at_stop(
    listener: &impl std::os::fd::AsFd,
) -> Vec<(std::net::TcpStream, SocketAddr)> {
    let mut taken = Vec::new();
    if !socket2::SockRef::from(listener)
        .reuse_port()
        .unwrap_or(false)
    {
        return taken;
    }
    while taken.len() < MAX_QUEUED_AT_STOP {
        match os::accept(listener) {
            Ok(c) => taken.push(c),
            Err(e) if is_transient(&e) => {}
            Err(_) => break,
        }
    }
    if !taken.is_empty() {
        debug!(
            connections = taken.len(),
            "stopping: served the connections queued to this worker's own listener"
        );
    }
    taken
}

/// An accept loop's leaving of connections to its siblings, over its
/// wakes.
#[derive(Debug, Default)]
struct Deferral {
    /// Since when the connection queued now was left to siblings.
    deferred: Option<tokio::time::Instant>,
    /// Whether this accept comes after waiting the whole
    /// [`FULL_DEFER_MAX`] (a full worker's last resort).
    forced: bool,
    /// When such an accept last found a connection still queued: for a
    /// moment after, the sibling is taken for stalled, and what is queued
    /// is taken (and refused) at once, not 10 ms a connection. (Only when
    /// it found one: a wake left over after a sibling took the connection
    /// finds none, and taking the sibling for stalled then had a full
    /// worker race it for every connection, refusing what it won, while
    /// the sibling had room.)
    sibling_stalled: Option<tokio::time::Instant>,
}

impl Deferral {
    /// What to do with a wake, given what the loads say (`wanted`).
    fn decide(&mut self, wanted: Defer, now: tokio::time::Instant) -> Defer {
        let stalled = self
            .sibling_stalled
            .is_some_and(|t| now.duration_since(t) < STALLED_FOR);
        let defer = match (self.deferred, wanted) {
            (_, Defer::Full) if stalled => Defer::No,
            (Some(at), Defer::Full) if now.duration_since(at) < FULL_DEFER_MAX => Defer::Full,
            (Some(_), Defer::Full) => {
                self.forced = true;
                Defer::No
            }
            (Some(_), _) => Defer::No,
            (None, d) => d,
        };
        match defer {
            Defer::No => self.deferred = None,
            _ => {
                self.deferred.get_or_insert(now);
            }
        }
        defer
    }

    /// The accept a wake led to, and whether it took a connection.
    fn accepted(&mut self, took: bool, now: tokio::time::Instant) {
        if std::mem::take(&mut self.forced) && took {
            self.sibling_stalled = Some(now);
        }
    }
}

/// An accept that failed for the listener's sake (EMFILE, ENOBUFS and
/// friends; the connection waits in the listen queue): logged once in
/// 10 s with how many there were (one every 50 ms filled the log, for
/// each listener), and waited on 50 ms rather than spun.
pub(crate) async fn accept_failed(e: &io::Error) {
    static WARNED: crate::Moment = crate::Moment::new();
    match WARNED.count_in(Duration::from_secs(10)) {
        Some(n) => {
            warn!(error = %e, failures = n, "accept failed (said once in 10 s: connections wait in the listen queue meanwhile; at the descriptor limit, raise LimitNOFILE or lower --max-connections)")
        }
        None => debug!(error = %e, "accept failed"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Errors of one connection that the next accept does not share (as tokio
/// and std treat them).
/// With the network errors accept(2) passes on from the new connection,
/// which its page says to retry at once as EAGAIN (each had cost a 50 ms
/// pause and a warning).
pub(crate) fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// A listening socket shut down (`shutdown(2)` on a shared one): accept
/// says EINVAL, for good.
pub(crate) fn is_shut(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// The identity of a set of listening sockets: the same in every process
/// that shares them (an inherited socket keeps its inode), different for
/// sockets of their own. Never 0, which means none. A worker with none
/// (SOCKS5 alone) is a group of its own: one shared value would have made
/// all such workers of the allocator siblings.
fn accept_group<'a>(listeners: impl IntoIterator<Item = &'a std::net::TcpListener>) -> u64 {
    let mut inodes: Vec<u64> = listeners.into_iter().filter_map(os::inode).collect();
    if inodes.is_empty() {
        inodes.push(u64::from(std::process::id()) | 1 << 63);
    }
    inodes.sort_unstable();
    rotor_protocol::fnv1a(inodes.iter().flat_map(|i| i.to_le_bytes())).max(1)
}

/// An accepted client connection, registered with the reactor only when it
/// first has to wait. A client that sends its request with its connection
/// (most do: the head is there by the time the connection is served) and
/// reads the answer — one request per connection, or the first of many —
/// is read and answered with plain system calls: no `epoll_ctl` to add the
/// socket and none to remove it, and no trip through `epoll_wait` before
/// the first read (tokio's own stream waits for the reactor's word before
/// it tries). HAProxy serves a connection the same way.
#[derive(Debug)]
pub struct ClientTcp(Tcp);

#[derive(Debug)]
enum Tcp {
    Fresh(std::net::TcpStream),
    Registered(TcpStream),
    /// The reactor would not take it (its error was returned).
    Gone,
}

impl ClientTcp {
    /// `stream` must be non-blocking.
    pub fn new(stream: std::net::TcpStream) -> ClientTcp {
        ClientTcp(Tcp::Fresh(stream))
    }

    /// The connection as tokio's stream (registered now if it was not).
    pub fn into_tokio(self) -> io::Result<TcpStream> {
        match self.0 {
            Tcp::Fresh(s) => TcpStream::from_std(s),
            Tcp::Registered(s) => Ok(s),
            Tcp::Gone => Err(gone()),
        }
    }

    /// Its socket (`None` once gone).
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match &self.0 {
            Tcp::Fresh(s) => Some(s.as_raw_fd()),
            Tcp::Registered(s) => Some(s.as_raw_fd()),
            Tcp::Gone => None,
        }
    }

    /// Waits for bytes and copies those there into `buf`, leaving them to
    /// be read (a PROXY protocol header's: see [`crate::proxied`]).
    pub async fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Tcp::Fresh(s) = &self.0 {
            match s.peek(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
        self.registered()?.peek(buf).await
    }

    #[cfg(test)]
    fn is_registered(&self) -> bool {
        matches!(self.0, Tcp::Registered(_))
    }

    /// The registered stream, registering it now if need be.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let Tcp::Fresh(_) = self.0 {
            let Tcp::Fresh(s) = std::mem::replace(&mut self.0, Tcp::Gone) else {
                unreachable!()
            };
            // A connection the reactor cannot take is that connection's
            // loss (it closes), not the listener's.
            // (Said once in 10 s: a kernel out of memory for it fails
            // every connection alike.)
            let s = TcpStream::from_std(s).inspect_err(|e| {
                static WARNED: crate::Moment = crate::Moment::new();
                match WARNED.count_in(Duration::from_secs(10)) {
                    Some(n) => warn!(error = %e, failures = n, "cannot register a client connection with the reactor; closing it (said once in 10 s, with how many)"),
                    None => debug!(error = %e, "cannot register a client connection with the reactor; closing it"),
                }
            })?;
            self.0 = Tcp::Registered(s);
        }
        match &mut self.0 {
            Tcp::Registered(s) => Ok(s),
            _ => Err(gone()),
        }
    }

    /// One read or write of `arg`: `plain` on the socket while it is not
    /// registered; once that would block, registered and `polled` through
    /// the reactor.
    fn poll_io<A, T>(
        &mut self,
        cx: &mut Context<'_>,
        arg: &mut A,
        mut plain: impl FnMut(&std::net::TcpStream, &mut A) -> io::Result<T>,
        polled: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>, &mut A) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Tcp::Fresh(s) = &self.0 {
            loop {
                match plain(s, arg) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    r => return Poll::Ready(r),
                }
            }
        }
        match self.registered() {
            Ok(s) => polled(Pin::new(s), cx, arg),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl crate::proxied::Peek for ClientTcp {
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl std::future::Future<Output = io::Result<usize>> + Send + 'a {
        ClientTcp::peek(self, buf)
    }
}

/// One `recv` into the unfilled part of `buf`, left uninitialised: zeroing
/// it first, as the safe `Read` would need, cleared 4–8 KiB for each
/// connection's first read.
#[allow(unsafe_code)]
fn recv(s: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: `recv` only writes to the slice (never de-initialises it),
    // and reports how many of its bytes it wrote.
    let n = socket2::SockRef::from(s).recv(unsafe { buf.unfilled_mut() })?;
    // SAFETY: the kernel wrote the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection not registered with the reactor",
    )
}

impl AsyncRead for ClientTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_io(
            cx,
            &mut buf,
            |s, buf| recv(s, buf),
            |s, cx, buf| s.poll_read(cx, buf),
        )
    }
}

impl AsyncWrite for ClientTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(
            cx,
            &mut data,
            |mut s, data| io::Write::write(&mut s, data),
            |s, cx, data| s.poll_write(cx, data),
        )
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(
            cx,
            &mut data,
            |mut s, data| io::Write::write_vectored(&mut s, data),
            |s, cx, data| s.poll_write_vectored(cx, data),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.0 {
            Tcp::Fresh(s) => Poll::Ready(s.shutdown(std::net::Shutdown::Write)),
            Tcp::Registered(s) => Pin::new(s).poll_shutdown(cx),
            Tcp::Gone => Poll::Ready(Err(gone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clearly_busier_worker_leaves_connections_to_its_siblings() {
        assert_eq!(Defer::choose(40, None, 10_000), Defer::No, "no sibling");
        assert_eq!(Defer::choose(0, Some(0), 10_000), Defer::No);
        assert_eq!(
            Defer::choose(1, Some(0), 10_000),
            Defer::No,
            "one apart: fine"
        );
        assert_eq!(Defer::choose(2, Some(0), 10_000), Defer::Yield);
        assert_eq!(Defer::choose(5, Some(0), 10_000), Defer::Wait);
        assert_eq!(Defer::choose(26, Some(24), 10_000), Defer::No);
        assert_eq!(Defer::choose(30, Some(20), 10_000), Defer::Yield);
        assert_eq!(Defer::choose(49, Some(1), 10_000), Defer::Wait);
        // Thousands of connections: a sixteenth of slack.
        assert_eq!(Defer::choose(5_300, Some(5_000), 10_000), Defer::No);
        assert_eq!(Defer::choose(5_400, Some(5_000), 10_000), Defer::Yield);
        assert_eq!(
            Defer::choose(10, Some(20), 10_000),
            Defer::No,
            "the lighter one"
        );
        // Full: leave it to a sibling with room, whatever the ratio.
        assert_eq!(Defer::choose(100, Some(99), 100), Defer::Full);
        assert_eq!(Defer::choose(100, Some(100), 100), Defer::No, "both full");
        assert_eq!(Defer::choose(100, None, 100), Defer::No, "no sibling");
    }

    #[test]
    fn shared_sockets_make_one_group_and_own_sockets_their_own() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a2 = a.try_clone().unwrap(); // as another process inherits it
        let g = accept_group(std::slice::from_ref(&a));
        assert_eq!(g, accept_group(std::slice::from_ref(&a2)));
        assert_ne!(g, accept_group(std::slice::from_ref(&b)));
        assert_ne!(g, 0);
        let ab = [a.try_clone().unwrap(), b.try_clone().unwrap()];
        let ba = [b, a];
        assert_eq!(accept_group(&ab), accept_group(&ba));
        // HTTP shared, TLS of its own (bound by each worker): its own
        // group, not the shared socket's siblings' (whose TLS queue is
        // not this worker's).
        assert_ne!(accept_group(&ab), g);
        // None: not the one value every such worker had shared.
        let none: [std::net::TcpListener; 0] = [];
        assert_ne!(accept_group(&none), 0);
        assert_ne!(
            accept_group(&none),
            rotor_protocol::fnv1a(std::iter::empty::<u8>()).max(1)
        );
    }

    /// A connected pair: the client's std stream, and the accepted side as
    /// `ClientTcp`.
    fn pair() -> (std::net::TcpStream, ClientTcp) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = os::accept(&l).unwrap();
        (client, ClientTcp::new(s))
    }

    #[tokio::test]
    async fn a_request_already_there_is_read_and_answered_without_the_reactor() {
        use std::io::{Read, Write};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, mut server) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = bytes::BytesMut::with_capacity(4096);
        assert_eq!(server.read_buf(&mut buf).await.unwrap(), 18);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\n");
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        server.shutdown().await.unwrap();
        assert!(!server.is_registered());
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"answer", "the FIN came after the answer");
    }

    #[tokio::test]
    async fn a_read_that_would_wait_registers_and_is_woken() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut server) = pair();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::io::Write::write_all(&mut client, b"late").unwrap();
            client
        });
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("woken when the bytes came")
            .unwrap();
        assert_eq!(&buf[..n], b"late");
        assert!(server.is_registered());
        // The client's close is seen through the reactor.
        drop(late.join().unwrap());
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn a_write_that_would_wait_registers_and_finishes() {
        use tokio::io::AsyncWriteExt;
        let (client, mut server) = pair();
        // More than the socket buffers hold: the write waits for the
        // client to read.
        let size = 32 << 20;
        let reader = std::thread::spawn(move || {
            let mut client = client;
            std::thread::sleep(Duration::from_millis(100));
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut got).unwrap();
            got
        });
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        tokio::time::timeout(Duration::from_secs(20), async {
            server.write_all(&data).await.unwrap();
            server.shutdown().await.unwrap();
        })
        .await
        .expect("the write finished");
        assert!(server.is_registered());
        let got = reader.join().unwrap();
        assert!(got == data, "all of it, in order");
        // And as tokio's stream, which the relay takes.
        assert!(server.into_tokio().is_ok());
    }

    /// A full worker waits FULL_DEFER_MAX for a sibling with room, then
    /// accepts; only if that accept found a connection still queued is the
    /// sibling taken for stalled (what is queued then taken at once). A
    /// wake left over after the sibling took the connection finds none:
    /// the next connection is left to the sibling again.
    #[test]
    fn a_full_worker_takes_its_sibling_for_stalled_only_on_a_connection_it_found() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Deferral::default();
        assert_eq!(d.decide(Defer::Full, ms(0)), Defer::Full);
        assert_eq!(d.decide(Defer::Full, ms(5)), Defer::Full);
        assert_eq!(d.decide(Defer::Full, ms(11)), Defer::No, "forced");
        d.accepted(false, ms(11));
        assert_eq!(
            d.decide(Defer::Full, ms(12)),
            Defer::Full,
            "the sibling took it"
        );
        assert_eq!(d.decide(Defer::Full, ms(23)), Defer::No, "forced again");
        d.accepted(true, ms(23));
        assert_eq!(d.decide(Defer::Full, ms(24)), Defer::No, "stalled: at once");
        d.accepted(true, ms(24));
        assert_eq!(
            d.decide(Defer::Full, ms(600)),
            Defer::Full,
            "the moment over"
        );
        // Other deferrals are one wake each.
        let mut d = Deferral::default();
        assert_eq!(d.decide(Defer::Wait, ms(0)), Defer::Wait);
        assert_eq!(d.decide(Defer::Wait, ms(1)), Defer::No);
        assert_eq!(d.decide(Defer::Yield, ms(2)), Defer::Yield);
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let leases = LeaseClient::start(
            "/nonexistent/rotor-test.sock".into(),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        let balance = Arc::new(Balance::new(leases, Arc::new(Semaphore::new(8)), 8, &[]));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let serve = move |s, _| {
            let _ = tx.send(s);
        };
        tokio::spawn(accept_loop(l, balance, serve, stop.clone()));
        let _clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        for _ in 0..3 {
            let s: ClientTcp = rx.recv().await.unwrap();
            assert!(s.into_tokio().unwrap().nodelay().unwrap());
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn accepts_with_the_peer_address_of_either_family() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(bind) else {
                continue; // no IPv6 here
            };
            let addr = l.local_addr().unwrap();
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (s, peer) = os::accept(&l).unwrap();
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(s.peer_addr().unwrap(), peer);
        }
    }
}
