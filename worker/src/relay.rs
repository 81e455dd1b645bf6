//! The byte relay of a CONNECT tunnel.
//!
//! Between the two TCP sockets of a tunnel, bytes move with splice(2)
//! through a pipe: the kernel passes page references from one socket to the
//! other and the worker copies nothing, where a read/write relay copies
//! every byte out of the kernel and back in. On loopback that is half the
//! copying of the whole path (measured in the README's CONNECT bulk row).
//!
//! A pipe is held only while bytes are in it: each chunk takes one from a
//! small per-process pool and gives it back empty. So an idle tunnel holds
//! neither a pipe nor a buffer, and the number of pipes open follows the
//! transfers in progress, not the tunnels open (each pipe is two file
//! descriptors, and a user's pipes share a kernel page budget). Should no
//! pipe be had (descriptor limit), the chunk is copied through user space
//! instead, and the tunnel goes on.
//!
//! Where the client's path is short (on this host or next to it, by the
//! handshake's round trip), its socket's receive buffer is fixed at 256 KiB
//! when the tunnel starts, and so is the upstream socket's send buffer if
//! the destination's path is short, instead of the kernel's autotuning,
//! which grows them to MiBs that no short path needs and that push relayed
//! data out of the CPU caches; see [`SHORT_PATH_BUFFER`].
//!
//! A tunnel whose client side hyper cannot hand back as a plain TCP socket
//! is relayed with `copy_bidirectional`.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tracing::warn;

use crate::idle::{Activity, IdleIo};
use crate::os;

/// Relay buffer per direction when the tunnel cannot splice. Measured on
/// the bench (2 workers): 16 KiB moves bulk data as fast as 64 KiB and sets
/// tunnels up faster (less to allocate and zero per tunnel); tokio's
/// default 8 KiB was ≈40 % slower in bulk.
const COPY_BUFFER: usize = 16 * 1024;

/// Bytes asked of one splice: more than any pipe holds, so the pipe's room
/// is the limit.
const CHUNK: usize = 1 << 20;

/// The pipe a direction moves to once it has carried [`BULK_AFTER`] bytes:
/// fewer, larger splices move bulk faster than the default 16 pages. Pipes
/// count against a per-user budget (`fs.pipe-user-pages-soft`, 64 MiB by
/// default, shared by every worker of the user), so only bulk transfers
/// get big ones and few are kept; past the budget the kernel refuses the
/// growth and the pipe stays at its default size.
const BIG_PIPE: usize = 1 << 20;
const BULK_AFTER: u64 = 1 << 20;

/// The buffers on the way from client to destination (the client
/// socket's receive buffer and the upstream socket's send buffer), each if
/// its path is short ([`SHORT_PATH_RTT_US`]: on this host or next to it),
/// set when the tunnel starts. Left to the kernel's autotuning, a bulk
/// stream over such a path grows them to several MiB, and relayed data
/// waits in memory long enough to leave the CPU caches between the copy in
/// at the sender and the copy out at the receiver. The README's
/// performance section has the A/B that chose this (and the variants that
/// lost). The kernel doubles the value for its bookkeeping.
const SHORT_PATH_BUFFER: usize = 256 * 1024;
/// The longest smoothed round trip (µs) of a short path. A window of
/// [`SHORT_PATH_BUFFER`] still carries ≈ 2.6 GB/s over it, so the cap does
/// not hold back a link slower than ≈ 20 Gbit/s; a longer path (a
/// destination across a network) keeps the kernel's autotuning, which it
/// needs.
const SHORT_PATH_RTT_US: u32 = 100;

/// Empty pipes kept for the next chunk, of each size.
const POOL_MAX: usize = 64;
const BIG_POOL_MAX: usize = 8;
/// Empty pipes kept in all (two descriptors each).
pub const PIPES_KEPT: usize = POOL_MAX + BIG_POOL_MAX;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
static BIG_POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// Pipes open, kept and in use (each two descriptors).
static PIPES_OPEN: AtomicUsize = AtomicUsize::new(0);
/// The most pipes open at once ([`set_pipe_budget`]); unbounded until set.
static PIPES_MOST: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The descriptors pipes may hold in all: what the descriptor limit
/// leaves beside the clients' sockets, the idle upstream pool and the
/// reserve. A tunnel whose reader stalls holds a full pipe each way it
/// stalls, so pipes unbounded took the descriptors the connection cap had
/// counted on, and new clients waited unanswered in the listen queue
/// (review at: 60 stalled downloads under a limit of 256). Past it a chunk
/// is copied through user space.
pub fn set_pipe_budget(descriptors: usize) {
    PIPES_MOST.store(descriptors / 2, Ordering::Relaxed);
}

/// How the client side of the tunnel was served, as hyper hands it back.
type ClientIo = TokioIo<crate::server::Lingering<crate::fast::Rewind<crate::server::ClientIo>>>;

/// Relays `client` ↔ `upstream` until both sides have ended (each end's EOF
/// is passed on as a half-close), or either fails. `activity` counts the
/// bytes each way as they move (whatever ends the tunnel, they are there).
/// A side that takes none of what waits for it for `stall` ends the tunnel:
/// bytes moving the other way do not keep it open.
pub async fn tunnel(
    client: Upgraded,
    upstream: TcpStream,
    activity: &Activity,
    stall: Duration,
) -> io::Result<()> {
    match client.downcast::<ClientIo>() {
        Ok(parts) => {
            // What the client sent behind its CONNECT: what hyper read and
            // did not use, then what the fast path read and hyper did not.
            // The connection's places (under the connection limit, and its
            // address's) are the tunnel's while it lasts.
            let (rewind, _held) = parts.io.into_inner().into_tunnel();
            let (unread, io) = rewind.into_parts();
            let early = match unread.is_empty() {
                true => parts.read_buf,
                false => [parts.read_buf, unread].concat().into(),
            };
            match io {
                tokio_util::either::Either::Left(plain) => {
                    let plain = plain.into_inner().into_tokio()?;
                    // (Boxed, as below: the tunnel's task, moved as it is
                    // spawned, stays small.)
                    Box::pin(splice_tcp(plain, early, upstream, activity, (true, stall))).await
                }
                // TLS: the bytes are the session's to decrypt; copied.
                tokio_util::either::Either::Right(tls) => {
                    let fd = tls.get_ref().0.get_ref().raw_fd();
                    let client = (EndWithoutNotify(tls), fd);
                    Box::pin(copy_tunnel(client, early, upstream, activity, stall)).await
                }
            }
        }
        Err(client) => {
            let client = (TokioIo::new(client), None);
            Box::pin(copy_tunnel(client, Bytes::new(), upstream, activity, stall)).await
        }
    }
}

/// The relay through user space, for a client side that is not a plain
/// TCP socket: `IdleIo` counts what is read from the client (up) and
/// written to it (down); a side that takes nothing for `stall` ends it.
async fn copy_tunnel<T>(
    (client, client_fd): (T, Option<RawFd>),
    early: Bytes,
    upstream: TcpStream,
    activity: &Activity,
    stall: Duration,
) -> io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let client = IdleIo::new(client, activity.clone());
    let client = Stalls::new(client, client_fd, stall, activity.clone());
    let fd = Some(upstream.as_raw_fd());
    let mut upstream = Stalls::new(upstream, fd, stall, activity.clone());
    upstream.taking = upstream.taking.watching(client_fd);
    // Each way on its own (see `both_ways`).
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream);
    // (Declared after the sockets' halves: dropped before them.)
    let mut ending = ResetUnlessDone([client_fd, fd], false);
    // What the client sent right behind its CONNECT goes first (under the
    // guard: a cut meanwhile is a reset too).
    if !early.is_empty() {
        upstream_w.write_all(&early).await?;
        activity.moved(true, early.len() as u64);
    }
    let ends = Ends::default();
    let up = copy_one_way(&mut client_r, &mut upstream_w, &ends);
    let down = copy_one_way(&mut upstream_r, &mut client_w, &ends);
    let relayed = both_ways(up, down, client_fd).await;
    // A reset passes on as a reset (see `splice_tcp`); a TLS client's
    // session ends without its close_notify, so it too reads a cut.
    if relayed.as_ref().is_err_and(os::is_reset) {
        reset_once_sent([client_fd, fd].into_iter().flatten()).await;
    }
    ending.1 = relayed.is_ok();
    relayed
}

/// Copies `r` into `w` until `r` ends, then shuts `w` for writing, as
/// `tokio::io::copy` does (reading on into the buffer's room while a write
/// waits; what `w` buffers, a TLS session's records, flushed whenever `r`
/// has nothing), but a read's error waits for what the buffer holds: at a
/// reset of `r`, the buffer goes out and is flushed, for [`RESET_WAIT`]
/// at most, before the reset is passed on. (`copy_bidirectional` returned
/// the read-ahead's error at once, with what its buffer held: a slow TLS
/// client lost the destination's last bytes before its reset, 372 736 of
/// 400 000 came through, where a plain tunnel passed all of them.)
async fn copy_one_way<R, W>(r: &mut R, w: &mut W, ends: &Ends) -> io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut way = OneWay {
        buf: vec![0u8; COPY_BUFFER].into_boxed_slice(),
        pos: 0,
        cap: 0,
        eof: false,
        read_err: None,
        need_flush: false,
    };
    let moved = std::future::poll_fn(|cx| way.poll(cx, &mut *r, &mut *w)).await;
    if let Err(e) = moved {
        return ends.noted(Err(e));
    }
    if let Some(e) = way.read_err.take() {
        if os::is_reset(&e) {
            let rest = &way.buf[way.pos..way.cap];
            let _ = tokio::time::timeout(RESET_WAIT, async {
                w.write_all(rest).await?;
                w.flush().await
            })
            .await;
        }
        return ends.noted(Err(e));
    }
    ends.noted(w.flush().await)?;
    ends.reset_end()?;
    ends.noted(w.shutdown().await)
}

/// One way's copy (see [`copy_one_way`]): `buf[pos..cap]` read and not
/// written yet.
struct OneWay {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    /// The source ended.
    eof: bool,
    /// The source's error, kept until the buffer before it is written.
    read_err: Option<io::Error>,
    /// Written since the last flush.
    need_flush: bool,
}

impl OneWay {
    /// Reads into the buffer's room, if there is room and the source goes
    /// on: whether it read anything (or ended).
    fn fill<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: &mut R,
    ) -> bool {
        if self.eof || self.read_err.is_some() || self.cap == self.buf.len() {
            return false;
        }
        let mut rb = tokio::io::ReadBuf::new(&mut self.buf[self.cap..]);
        match std::pin::Pin::new(r).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => {
                match rb.filled().len() {
                    0 => self.eof = true,
                    n => self.cap += n,
                }
                true
            }
            std::task::Poll::Ready(Err(e)) => {
                self.read_err = Some(e);
                true
            }
            std::task::Poll::Pending => false,
        }
    }

    /// Until the source ends or fails (`Ok`: see `eof`, `read_err`), with
    /// what was read before written; `Err`: the writer's error.
    fn poll<R, W>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> std::task::Poll<io::Result<()>>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        use std::task::Poll;
        loop {
            if self.pos == self.cap {
                self.pos = 0;
                self.cap = 0;
                if self.eof || self.read_err.is_some() {
                    return Poll::Ready(Ok(()));
                }
                if !self.fill(cx, r) {
                    // Nothing to read now: what the writer holds goes out.
                    if self.need_flush {
                        std::task::ready!(std::pin::Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                continue;
            }
            match std::pin::Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..self.cap]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pos += n;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Read on into the room meanwhile (a larger next write);
                    // an error waits for the buffer (see `copy_one_way`).
                    if self.read_err.is_some() {
                        return Poll::Ready(Ok(()));
                    }
                    self.fill(cx, r);
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A tunnel's two ways, `up` (client to destination) and `down`, until
/// both end, or either fails. A reset while `up` went on, the client's
/// socket open (`client_fd`: the destination refused the rest of an
/// upload, as a server answering early does), ends only the upload: what
/// the destination sent before its reset is relayed for [`RESET_WAIT`]
/// at most, then the reset passed on. (Ended both ways at once, the
/// client got the destination's answer in 3 uploads of 10, where a direct
/// connection got it in 10 of 10.)
async fn both_ways(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
    client_fd: Option<RawFd>,
) -> io::Result<()> {
    tokio::pin!(up, down);
    let reset = tokio::select! {
        r = &mut up => match r {
            Err(e) if os::is_reset(&e) && !client_fd.is_some_and(os::is_closed) => e,
            Err(e) => return Err(e),
            Ok(()) => return down.await,
        },
        r = &mut down => match r {
            Err(e) => return Err(e),
            Ok(()) => return up.await,
        },
    };
    match tokio::time::timeout(RESET_WAIT, down).await {
        Ok(Err(e)) => Err(e),
        _ => Err(reset),
    }
}

/// How long a reset waits for what the other socket still holds unsent.
const RESET_WAIT: Duration = Duration::from_secs(2);

/// What a tunnel's two ways tell each other of their ends.
#[derive(Default)]
struct Ends {
    /// One way reached its end (see [`one_way`]).
    ended: AtomicBool,
    /// One way was reset: the other's end, read after it, is the reset's
    /// (the socket's error was told to the first reader only), not a FIN
    /// to pass on.
    cut: AtomicBool,
}

impl Ends {
    /// `r`, a way's end: a reset is noted for the other way.
    fn noted<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.as_ref().is_err_and(os::is_reset) {
            self.cut.store(true, Ordering::Relaxed);
        }
        r
    }

    /// A way's source ended: the reset that ended the other way, if so.
    fn reset_end(&self) -> io::Result<()> {
        match self.cut.load(Ordering::Relaxed) {
            true => Err(io::ErrorKind::ConnectionReset.into()),
            false => Ok(()),
        }
    }
}

/// Closes the sockets `fds` with a reset (`SO_LINGER` 0), each once what
/// it holds unsent has been taken by its peer, or `RESET_WAIT` has passed:
/// a client reading slower than the destination sent gets every byte
/// rotor took before the destination's reset, then the reset (a reset
/// at once discards what the socket still holds).
/// (A socket its peer reset holds what it will never send: not waited
/// for. Its queue stayed put, and each such tunnel took the whole wait.)
pub(crate) async fn reset_once_sent(fds: impl IntoIterator<Item = RawFd>) {
    let deadline = tokio::time::Instant::now() + RESET_WAIT;
    for fd in fds {
        while os::send_queue(fd).is_some_and(|n| n > 0)
            && !os::is_closed(fd)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        os::reset_at_close(fd);
    }
}

/// A stream whose writes fail once it has taken nothing for `stall` while
/// bytes wait for it (as `writable` for the splice path): a TLS client
/// that stopped reading a download while it trickles bytes up would keep
/// its tunnel for ever. The timer is armed only while a write waits; what
/// the kernel sends meanwhile (see [`Taking`]) touches `activity`.
struct Stalls<T> {
    inner: T,
    taking: Taking,
    activity: Activity,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl<T> Stalls<T> {
    /// `inner`, whose socket is `fd` (if known).
    fn new(inner: T, fd: Option<RawFd>, stall: Duration, activity: Activity) -> Stalls<T> {
        Stalls {
            inner,
            taking: Taking::new(fd, stall),
            activity,
            timer: None,
            waiting: false,
        }
    }

    /// `r`, a write's poll: while it waits, whether the side has taken
    /// nothing for the stall limit since it began to.
    fn watch<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<io::Result<R>>,
    ) -> std::task::Poll<io::Result<R>> {
        use std::task::Poll;
        if r.is_ready() {
            if self.waiting {
                self.waiting = false;
                self.taking = self.taking.fresh();
            }
            return r;
        }
        let timer = match (&mut self.timer, self.waiting) {
            (Some(t), true) => t,
            (Some(t), false) => {
                t.as_mut()
                    .reset(tokio::time::Instant::now() + self.taking.next_look());
                t
            }
            (None, _) => {
                let first = tokio::time::sleep(self.taking.next_look());
                self.timer.insert(Box::pin(first))
            }
        };
        self.waiting = true;
        while std::future::Future::poll(timer.as_mut(), cx).is_ready() {
            match self.taking.looked() {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(true) => self.activity.touch(),
                Ok(false) => {}
            }
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.taking.next_look());
        }
        Poll::Pending
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Stalls<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Stalls<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

/// A TLS client's side of a tunnel, whose TCP half-close without a
/// close_notify first (Python's `shutdown(SHUT_WR)`, many clients') reads
/// as the end it is: the session reports it as an error (`UnexpectedEof`),
/// which would end the relay both ways and drop what the destination still
/// sends back. What a tunnel carries is the client's own stream, which
/// says itself whether it is whole.
struct EndWithoutNotify<T>(T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for EndWithoutNotify<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match std::pin::Pin::new(&mut self.0).poll_read(cx, buf) {
            std::task::Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                std::task::Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for EndWithoutNotify<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Relays a tunnel between two plain TCP sockets (a SOCKS5 client's and
/// its upstream), as `tunnel` does.
pub async fn tcp_tunnel(
    client: TcpStream,
    upstream: TcpStream,
    activity: &Activity,
    stall: Duration,
) -> io::Result<()> {
    Box::pin(splice_tcp(
        client,
        Bytes::new(),
        upstream,
        activity,
        (true, stall),
    ))
    .await
}

/// The relay between two TCP sockets. `early` are bytes the client sent
/// behind its CONNECT head, already read. `pipes: false` copies through user
/// space throughout (the path taken when no pipe can be had; tests use it).
/// A side that takes nothing for `stall` while bytes wait for it fails the
/// relay.
async fn splice_tcp(
    client: TcpStream,
    early: Bytes,
    mut upstream: TcpStream,
    activity: &Activity,
    (pipes, stall): (bool, Duration),
) -> io::Result<()> {
    // (Dropped before the sockets, which are arguments.)
    let mut ending = ResetUnlessDone(
        [Some(client.as_raw_fd()), Some(upstream.as_raw_fd())],
        false,
    );
    if !early.is_empty() {
        if let Err(e) = upstream.write_all(&early).await {
            if os::is_reset(&e) {
                reset_once_sent([client.as_raw_fd()]).await;
            }
            return Err(e);
        }
        activity.moved(true, early.len() as u64);
    }
    cap_if_short(&client, Buffer::Receive);
    cap_if_short(&upstream, Buffer::Send);
    let ended = Ends::default();
    let up = one_way((&client, &upstream, true), &ended, activity, (pipes, stall));
    let down = one_way(
        (&upstream, &client, false),
        &ended,
        activity,
        (pipes, stall),
    );
    let relayed = both_ways(up, down, Some(client.as_raw_fd())).await;
    // A side that reset (or refused what was written) is passed on as a
    // reset, not as the FIN the sockets' close would send: a peer reading
    // to the end (an HTTP/1.0 body, a raw stream) must not take a cut
    // stream for a whole one. (What a pipe held in between is lost: the
    // stream was cut.)
    if relayed.as_ref().is_err_and(os::is_reset) {
        reset_once_sent([client.as_raw_fd(), upstream.as_raw_fd()]).await;
    }
    ending.1 = relayed.is_ok();
    relayed
}

/// A tunnel's sockets (`.0`), closed with a reset unless the relay ended
/// as both peers did (`.1`): one that rotor ends itself — its future
/// dropped at the drain's cut, for silence, for a revoked user — or that a
/// stall or an error other than a peer's reset ended, must not end in the
/// FIN that tells a peer reading to the end (an HTTP/1.0 body, a raw
/// stream) that the stream is whole. (What waits unsent is lost: the
/// stream was cut.)
struct ResetUnlessDone([Option<RawFd>; 2], bool);

impl Drop for ResetUnlessDone {
    fn drop(&mut self) {
        if !self.1 {
            for fd in self.0.into_iter().flatten() {
                os::reset_at_close(fd);
            }
        }
    }
}

/// Moves bytes from `src` to `dst` until `src` ends, then shuts `dst` for
/// writing, unless the other way had `ended` already: then both sockets are
/// about to close, which sends the FIN (one system call fewer per tunnel).
/// The bytes moved are counted in `activity` (`up`: from the client).
async fn one_way(
    (src, dst, up): (&TcpStream, &TcpStream, bool),
    ends: &Ends,
    activity: &Activity,
    (pipes, stall): (bool, Duration),
) -> io::Result<()> {
    let mut total = 0u64;
    let mut buf: Option<Box<[u8]>> = None;
    // An upload's waits watch the client's socket (see `Taking::watching`).
    let client = up.then(|| src.as_raw_fd());
    // Reading past TCP urgent data (see below) until `src` has nothing.
    let mut past_mark = false;
    loop {
        // (Past the mark, tokio may have been told `src` has nothing when
        // it has: read until it says so itself.)
        if !past_mark {
            src.readable().await?;
        }
        let pipe = if pipes && !past_mark {
            take_pipe(total >= BULK_AFTER)
        } else {
            None
        };
        // Counted as each write goes: a slow but moving transfer keeps
        // the idle timer off (a chunk may be a MiB), and what went before
        // an error is counted.
        let count = |k: usize| activity.moved(up, k as u64);
        let spliced = match pipe {
            Some(pipe) => match splice_chunk(src, dst, pipe, (&count, stall, client)).await {
                // splice stops at TCP urgent data for good (0, as at the
                // end, or EAGAIN): a read goes past the mark, so this
                // chunk is copied (one ioctl, only when splice moved
                // nothing). Only the read's answers: a write's error (or
                // a stall) with bytes left in the pipe ends the tunnel,
                // whatever `src` is at.
                // splice's EAGAIN there cleared tokio's readiness with
                // bytes waiting: they are read past it with no readiness
                // asked (tokio's read would not even try), and what comes
                // behind them too, until `src` itself has none.
                Ok(0) if os::at_urgent_mark(src) => {
                    past_mark = true;
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && os::at_urgent_mark(src) => {
                    past_mark = true;
                    None
                }
                r => Some(r),
            },
            None => None,
        };
        let moved = match spliced {
            Some(r) => r,
            None => {
                let buf = buf.get_or_insert_with(|| vec![0; COPY_BUFFER].into_boxed_slice());
                copy_chunk(src, dst, buf, past_mark, (&count, stall, client)).await
            }
        };
        match moved {
            Ok(0) => {
                ends.reset_end()?;
                if ends.ended.swap(true, Ordering::Relaxed) {
                    return Ok(());
                }
                return match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                    Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                    _ => Ok(()),
                };
            }
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                past_mark = false;
                continue;
            }
            Err(e) => return ends.noted(Err(e)),
        }
    }
}

/// One chunk from `src` into `pipe` and on to `dst`, each write counted by
/// `count`; 0 at `src`'s end, `WouldBlock` if `src` had nothing after all.
/// The pipe goes back to the pool only empty: on an error it is closed
/// with whatever it holds.
async fn splice_chunk(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: Pipe,
    (count, stall, client): (&impl Fn(usize), Duration, Option<RawFd>),
) -> io::Result<usize> {
    let n = match src.try_io(Interest::READABLE, || os::splice(src, &pipe.w, CHUNK)) {
        Ok(n) => n,
        Err(e) => {
            give_back(pipe);
            return Err(e);
        }
    };
    send_counted(dst, n, (count, stall, client), |sent| {
        dst.try_io(Interest::WRITABLE, || os::splice(&pipe.r, dst, n - sent))
    })
    .await?;
    give_back(pipe);
    Ok(n)
}

/// One chunk through `buf`, each write counted by `count`; 0 at `src`'s
/// end, `WouldBlock` if `src` had nothing after all. `past_mark`: read
/// whatever tokio's readiness says (see `one_way`).
async fn copy_chunk(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut [u8],
    past_mark: bool,
    (count, stall, client): (&impl Fn(usize), Duration, Option<RawFd>),
) -> io::Result<usize> {
    let n = match past_mark {
        false => src.try_read(buf)?,
        // Through the readiness when it is set (an EAGAIN clears it as
        // it should), else a read of the socket itself.
        true => match src.try_io(Interest::READABLE, || read_raw(src, buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => read_raw(src, buf)?,
            r => r?,
        },
    };
    send_counted(dst, n, (count, stall, client), |sent| {
        dst.try_write(&buf[sent..n])
    })
    .await?;
    Ok(n)
}

/// `n` bytes to `dst` by `write` (given how many went so far, it sends
/// some of the rest once `dst` is writable), each write counted by
/// `count`: a chunk's way out, spliced or copied.
async fn send_counted(
    dst: &TcpStream,
    n: usize,
    (count, stall, client): (&impl Fn(usize), Duration, Option<RawFd>),
    mut write: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < n {
        writable(dst, (count, stall, client)).await?;
        match write(sent) {
            Ok(k) => {
                sent += k;
                count(k);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `recv` from `src`, whatever tokio's readiness of it says.
fn read_raw(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    (&*socket2::SockRef::from(src)).read(buf)
}

/// `dst` writable, unless it took nothing of what waits for it for `stall`
/// (a client that stopped reading a download while it trickles bytes up):
/// that is an error, which ends the tunnel and frees its pipe. Bytes the
/// peer takes meanwhile (see [`Taking`]) are counted as movement, none
/// written (`count(0)`: the idle timer stays off).
async fn writable(
    dst: &TcpStream,
    (count, stall, client): (&impl Fn(usize), Duration, Option<RawFd>),
) -> io::Result<()> {
    let mut taking = Taking::new(Some(dst.as_raw_fd()), stall).watching(client);
    loop {
        match tokio::time::timeout(taking.next_look(), dst.writable()).await {
            Ok(r) => return r,
            Err(_) => {
                if taking.looked()? {
                    count(0);
                }
            }
        }
    }
}

/// Whether a side whose writer has waited long is taking bytes at all.
///
/// The kernel wakes a writer only once a third of a full send buffer has
/// gone. Autotuned to MiBs (a client's send buffer always; any buffer on
/// a path that is not short), with a peer reading a few KB/s, that can
/// take longer than the stall limit while the peer takes bytes all along.
/// So while a write waits, the send queue is looked at: first soon after
/// the wait began ([`FIRST_LOOK`]), then each quarter of the limit. A
/// shorter queue than at the last look is progress (bytes the peer
/// acknowledged); the whole limit since the wait began, or since the last
/// progress, without any is a stall. Nothing else writes to the socket
/// while its writer waits (a TLS session may flush a record of its own:
/// that only hides one look's progress). A side whose socket is not known
/// counts none.
struct Taking {
    fd: Option<RawFd>,
    stall: Duration,
    /// The client's socket, for an upload's wait (see [`Taking::watching`]).
    client: Option<RawFd>,
    /// The wait's start, or its last progress (from the first look on).
    since: Option<tokio::time::Instant>,
    queued: Option<u32>,
}

/// When a waiting write first looks at its send queue: what later looks
/// compare with. (Waits this long are rare in a bulk transfer.)
const FIRST_LOOK: Duration = Duration::from_millis(50);

/// How often an upload's wait looks at its client's socket at most (see
/// [`Taking::watching`]).
const CLIENT_LOOK: Duration = Duration::from_secs(1);

impl Taking {
    fn new(fd: Option<RawFd>, stall: Duration) -> Taking {
        Taking {
            fd,
            stall,
            client: None,
            since: None,
            queued: None,
        }
    }

    /// An upload's wait, whose `client` (its socket) may reset meanwhile:
    /// the wait ends then, within [`CLIENT_LOOK`] (nothing else reads the
    /// client's socket while its bytes wait for a destination that takes
    /// none, and answers none: the tunnel, its sockets and its places were
    /// held until the stall limit, 5 min by default).
    fn watching(self, client: Option<RawFd>) -> Taking {
        Taking { client, ..self }
    }

    /// The same, for a new wait.
    fn fresh(&self) -> Taking {
        Taking::new(self.fd, self.stall).watching(self.client)
    }

    /// How long until the next look: [`FIRST_LOOK`], then a quarter of the
    /// limit (at least a millisecond), and none past the limit.
    fn next_look(&self) -> Duration {
        match self.since {
            None => FIRST_LOOK.min(self.stall),
            Some(since) => {
                let left =
                    (since + self.stall).saturating_duration_since(tokio::time::Instant::now());
                let every = match self.client {
                    Some(_) => (self.stall / 4).min(CLIENT_LOOK),
                    None => self.stall / 4,
                };
                every.max(Duration::from_millis(1)).min(left)
            }
        }
    }

    /// The time for a look came without a wake: whether the peer took
    /// bytes since the last look; the stall error once the limit passed
    /// without.
    fn looked(&mut self) -> io::Result<bool> {
        if self.client.is_some_and(os::is_closed) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the client reset its tunnel while its upload waited",
            ));
        }
        let now = tokio::time::Instant::now();
        let queued = self.fd.and_then(os::send_queue);
        let moved = matches!((self.queued, queued), (Some(before), Some(q)) if q < before);
        self.queued = queued;
        let since = match (moved, self.since) {
            (true, _) => now,
            (false, Some(since)) => since,
            // The first look: the wait began about that long ago.
            (false, None) => now.checked_sub(FIRST_LOOK.min(self.stall)).unwrap_or(now),
        };
        self.since = Some(since);
        match now.saturating_duration_since(since) >= self.stall {
            true => Err(stalled(self.stall)),
            false => Ok(moved),
        }
    }
}

/// The error that ends a tunnel whose side took nothing for `stall`.
fn stalled(stall: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the peer took none of what waits for it for {stall:?}"),
    )
}

#[derive(Clone, Copy)]
enum Buffer {
    Receive,
    Send,
}

/// Sets `sock`'s `buffer` to [`SHORT_PATH_BUFFER`] if its path is short,
/// by the kernel's round-trip estimate (from the handshake, this early);
/// a longer path keeps autotuning. Best effort: a socket whose round trip
/// cannot be read keeps what it has. Returns whether it was capped.
fn cap_if_short(sock: &TcpStream, buffer: Buffer) -> bool {
    if os::smoothed_rtt_us(sock).is_none_or(|rtt| rtt > SHORT_PATH_RTT_US) {
        return false;
    }
    let sock = socket2::SockRef::from(sock);
    let _ = match buffer {
        Buffer::Receive => sock.set_recv_buffer_size(SHORT_PATH_BUFFER),
        Buffer::Send => sock.set_send_buffer_size(SHORT_PATH_BUFFER),
    };
    true
}

/// The two ends of a non-blocking pipe, counted in [`PIPES_OPEN`].
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Grown to [`BIG_PIPE`].
    big: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        PIPES_OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One more counted in `open` if fewer than `most` are; whether it was.
fn counted(open: &AtomicUsize, most: usize) -> bool {
    if open.fetch_add(1, Ordering::AcqRel) >= most {
        open.fetch_sub(1, Ordering::AcqRel);
        return false;
    }
    true
}

/// The smallest pipe worth splicing through: the default 16 pages. Past
/// the user's pipe budget (`pipe-user-pages-soft`, shared by every process
/// of the user: all the workers) the kernel makes pipes of 2 pages, which
/// move less per call than the copy path's buffer.
const SMALLEST_PIPE: usize = 16 * 4096;

impl Pipe {
    /// A new pipe; `None` when the kernel made it too small to be worth
    /// using (the user's pipe budget is spent).
    /// An error past [`set_pipe_budget`]'s.
    fn new(big: bool) -> io::Result<Option<Pipe>> {
        let most = PIPES_MOST.load(Ordering::Relaxed);
        if !counted(&PIPES_OPEN, most) {
            return Err(io::Error::other(format!(
                "the {} descriptors the limit leaves pipes are in use (tunnels whose readers stall each hold theirs)",
                most.saturating_mul(2)
            )));
        }
        let (r, w) = os::pipe().inspect_err(|_| {
            PIPES_OPEN.fetch_sub(1, Ordering::AcqRel);
        })?;
        let mut pipe = Pipe { r, w, big: false };
        if os::pipe_size(&pipe.w).is_some_and(|n| n < SMALLEST_PIPE) {
            return Ok(None);
        }
        // Refused past the user's pipe budget: the pipe stays small.
        pipe.big = big && os::set_pipe_size(&pipe.w, BIG_PIPE);
        Ok(Some(pipe))
    }

    fn pool(big: bool) -> (&'static Mutex<Vec<Pipe>>, usize) {
        if big {
            (&BIG_POOL, BIG_POOL_MAX)
        } else {
            (&POOL, POOL_MAX)
        }
    }
}

/// An empty pipe (`big` or of the default size) from the pool, or a new
/// one; `None` (logged, at most once a minute) if none can be made.
///
/// When the kernel refuses to grow a pipe (the user's pipe budget is spent),
/// big ones are not asked for again for a while: each refusal costs a new
/// pipe and its system calls for a chunk that a pooled small one moves.
fn take_pipe(big: bool) -> Option<Pipe> {
    use crate::Moment;
    static REFUSED: Moment = Moment::new();
    // Pipes came out too small a moment ago: copied, without a new pipe
    // made and closed for each chunk meanwhile.
    static SMALL: Moment = Moment::new();
    static WARNED: Moment = Moment::new();
    const REFUSAL_HOLDS: std::time::Duration = std::time::Duration::from_secs(10);
    let big = big && !REFUSED.within(REFUSAL_HOLDS);
    let (pool, _) = Pipe::pool(big);
    if let Some(p) = pool.lock().expect("pipe pool poisoned").pop() {
        return Some(p);
    }
    if SMALL.within(REFUSAL_HOLDS) {
        // A small one kept, if any, rather than none.
        return match big {
            true => Pipe::pool(false)
                .0
                .lock()
                .expect("pipe pool poisoned")
                .pop(),
            false => None,
        };
    }
    match Pipe::new(big) {
        Ok(Some(p)) => {
            if big && !p.big {
                REFUSED.mark();
            }
            Some(p)
        }
        // The budget is spent: this chunk is copied, and the next ones
        // for a while.
        Ok(None) => {
            SMALL.mark();
            None
        }
        Err(e) => {
            // (Past the budget, kept pipes of the other size are open
            // already: one of them rather than none.)
            if let Some(p) = Pipe::pool(!big).0.lock().expect("pipe pool poisoned").pop() {
                return Some(p);
            }
            if WARNED.first_in(std::time::Duration::from_secs(60)) {
                warn!(error = %e, "no pipe for a tunnel; copying through user space (raise the descriptor limit)");
            }
            None
        }
    }
}

/// Keeps an empty pipe for the next chunk, or closes it if enough are kept.
fn give_back(pipe: Pipe) {
    let (pool, max) = Pipe::pool(pipe.big);
    let mut pool = pool.lock().expect("pipe pool poisoned");
    if pool.len() < max {
        pool.push(pipe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// The relay between `client` and `up` on a task of its own (idle
    /// limit out of the way).
    fn spawn_relay(
        client: TcpStream,
        early: Bytes,
        up: TcpStream,
        activity: Activity,
        pipes: bool,
    ) -> tokio::task::JoinHandle<io::Result<()>> {
        tokio::spawn(async move {
            splice_tcp(
                client,
                early,
                up,
                &activity,
                (pipes, Duration::from_secs(300)),
            )
            .await
        })
    }

    /// Two connected loopback sockets.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Client ↔ relay ↔ server, `n` bytes each way at once, then each side
    /// half-closes in turn; both streams must arrive whole, `early` first.
    async fn relay_both_ways(pipes: bool, n: usize) {
        let (mut client, relay_client) = socket_pair().await;
        let (relay_up, mut server) = socket_pair().await;
        let activity = Activity::new();
        let counted = activity.clone();
        let early = Bytes::from_static(b"early:");
        let relay = spawn_relay(relay_client, early, relay_up, activity, pipes);
        let up = data(n, 0x5a);
        let down = data(n, 0xa5);
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let client_side = async {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
            let mut got = Vec::new();
            cr.read_to_end(&mut got).await.unwrap();
            got
        };
        let server_side = async {
            let send = async {
                sw.write_all(&down).await.unwrap();
            };
            let mut got = Vec::new();
            let recv = sr.read_to_end(&mut got);
            let (_, r) = tokio::join!(send, recv);
            r.unwrap();
            // The client's end arrived as EOF while the way down is still
            // open: answer after it, then end too.
            sw.write_all(b":after").await.unwrap();
            sw.shutdown().await.unwrap();
            got
        };
        let (at_client, at_server) =
            tokio::time::timeout(std::time::Duration::from_secs(60), async {
                tokio::join!(client_side, server_side)
            })
            .await
            .expect("the relay stalled (a half-close not passed on?)");
        let mut want_up = b"early:".to_vec();
        want_up.extend_from_slice(&up);
        let mut want_down = down.clone();
        want_down.extend_from_slice(b":after");
        assert!(at_server == want_up, "upstream bytes differ");
        assert!(at_client == want_down, "downstream bytes differ");
        relay.await.unwrap().unwrap();
        let (n_up, n_down) = counted.bytes();
        assert_eq!(n_up, want_up.len() as u64);
        assert_eq!(n_down, want_down.len() as u64);
        pools_hold_only_empty_pipes();
    }

    fn pools_hold_only_empty_pipes() {
        for big in [false, true] {
            let (pool, _) = Pipe::pool(big);
            for p in pool.lock().unwrap().iter() {
                let mut b = [0u8; 1];
                assert_eq!(
                    nix::unistd::read(p.r.as_raw_fd(), &mut b),
                    Err(nix::errno::Errno::EAGAIN),
                    "a pooled pipe held bytes"
                );
            }
        }
    }

    /// The up direction alone, `client` → `up`, on a task of its own.
    fn spawn_one_way(
        client: TcpStream,
        up: TcpStream,
        activity: Activity,
        (pipes, stall): (bool, Duration),
    ) -> tokio::task::JoinHandle<io::Result<()>> {
        tokio::spawn(async move {
            let ends = Ends::default();
            one_way((&client, &up, true), &ends, &activity, (pipes, stall)).await
        })
    }

    /// `sender`'s send buffer and `reader`'s receive buffer set (the
    /// kernel doubles each).
    fn buffers(sender: &TcpStream, send: usize, reader: &TcpStream, receive: usize) {
        socket2::SockRef::from(sender)
            .set_send_buffer_size(send)
            .unwrap();
        socket2::SockRef::from(reader)
            .set_recv_buffer_size(receive)
            .unwrap();
    }

    /// Reads `reads` × 64 KiB off `reader`, 100 ms apart (about 650 KB/s),
    /// while `relay` runs: panics if it ends, or `watched` is idle for
    /// 1.2 s, meanwhile.
    async fn read_slowly(
        reader: &mut TcpStream,
        reads: usize,
        relay: &mut tokio::task::JoinHandle<io::Result<()>>,
        watched: &Activity,
        case: &str,
    ) {
        let mut b = vec![0u8; 64 << 10];
        let slowly = async {
            for _ in 0..reads {
                tokio::time::sleep(Duration::from_millis(100)).await;
                reader.read_exact(&mut b).await.unwrap();
            }
        };
        tokio::select! {
            () = slowly => {}
            r = relay => panic!("{case}: the relay ended: {r:?}"),
            () = watched.idle_for(Duration::from_millis(1200)) => {
                panic!("{case}: a moving tunnel taken for idle");
            }
        }
    }

    /// A destination reading slowly (about 650 KB/s, a MiB chunk in 1.6 s):
    /// the bytes are counted, and the idle timer kept off, as each part of
    /// a chunk goes (about every 0.1 s here), not once a whole chunk went
    /// (every 1.6 s: past the 1.2 s limit).
    ///
    /// One direction, with its buffers set here, not by [`cap_if_short`]
    /// (which goes by the handshake's round trip: over
    /// [`SHORT_PATH_RTT_US`] on a loaded host's loopback at times). The
    /// source's is large, so a chunk is a whole MiB; the destination's are
    /// small, so the kernel wakes the writer as each 64 KiB is read.
    #[tokio::test]
    async fn a_slow_reader_keeps_the_tunnel_active() {
        for pipes in [true, false] {
            let (mut client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            socket2::SockRef::from(&relay_client)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
            buffers(&relay_up, 64 << 10, &server, 64 << 10);
            let activity = Activity::new();
            let watched = activity.clone();
            let stall = Duration::from_secs(300);
            let mut relay = spawn_one_way(relay_client, relay_up, activity, (pipes, stall));
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&data(16 << 20, 1)).await;
                client
            });
            // Past BULK_AFTER first (the big pipe and chunks), then slowly.
            let mut b = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < (2 << 20) {
                got += server.read(&mut b).await.unwrap();
            }
            let case = format!("pipes {pipes}");
            read_slowly(&mut server, 30, &mut relay, &watched, &case).await;
            relay.abort();
            writer.abort();
        }
    }

    /// A destination reading slowly (about 650 KB/s) from a send buffer as
    /// large as autotuning makes them (4 MiB set, doubled): the kernel wakes
    /// the writer only once a third of it has gone, seconds apart, past the
    /// 0.8 s stall limit. The send queue, looked at while the write waits,
    /// shrinks: neither the stall error nor the idle timer ends the tunnel.
    #[tokio::test]
    async fn a_slow_reader_of_a_large_send_buffer_is_not_stalled() {
        for pipes in [true, false] {
            let (mut client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            buffers(&relay_up, 4 << 20, &server, 64 << 10);
            let activity = Activity::new();
            let watched = activity.clone();
            let stall = Duration::from_millis(800);
            let mut relay = spawn_one_way(relay_client, relay_up, activity, (pipes, stall));
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&data(32 << 20, 1)).await;
                client
            });
            let case = format!("pipes {pipes}");
            read_slowly(&mut server, 25, &mut relay, &watched, &case).await;
            relay.abort();
            writer.abort();
        }
    }

    /// As above, through the copy path (a TLS client's), either way: the
    /// slow reader is the destination, then the client.
    #[tokio::test]
    async fn a_slow_reader_of_a_large_send_buffer_is_not_stalled_when_copied() {
        for down in [false, true] {
            let (client, relay_client) = socket_pair().await;
            let (relay_up, server) = socket_pair().await;
            let (mut writer, mut reader, big) = match down {
                false => (client, server, &relay_up),
                true => (server, client, &relay_client),
            };
            buffers(big, 4 << 20, &reader, 64 << 10);
            let activity = Activity::new();
            let watched = activity.clone();
            let mut relay = tokio::spawn(async move {
                let fd = Some(relay_client.as_raw_fd());
                let stall = Duration::from_millis(800);
                copy_tunnel((relay_client, fd), Bytes::new(), relay_up, &activity, stall).await
            });
            let writing = tokio::spawn(async move {
                let _ = writer.write_all(&data(32 << 20, 1)).await;
                writer
            });
            let case = format!("down {down}");
            read_slowly(&mut reader, 25, &mut relay, &watched, &case).await;
            relay.abort();
            writing.abort();
        }
    }

    /// TCP urgent data (MSG_OOB, telnet's or FTP's ABOR) does not stall a
    /// direction, nor cut what follows it: splice stops at the urgent
    /// mark for good, so that chunk is copied (recv reads past the mark).
    #[tokio::test]
    async fn urgent_data_does_not_stall_a_spliced_direction() {
        for pipes in [true, false] {
            let (client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            let activity = Activity::new();
            let relay = spawn_relay(relay_client, Bytes::new(), relay_up, activity, pipes);
            let client = client.into_std().unwrap();
            client.set_nonblocking(false).unwrap();
            let send =
                |b: &[u8], flags| nix::sys::socket::send(client.as_raw_fd(), b, flags).unwrap();
            send(b"before", nix::sys::socket::MsgFlags::empty());
            send(b"!", nix::sys::socket::MsgFlags::MSG_OOB);
            send(b"after", nix::sys::socket::MsgFlags::empty());
            // What follows the mark arrives while the tunnel stays open (a
            // telnet interrupt, an FTP ABOR, then the session goes on):
            // no FIN to end a splice that stopped at the mark.
            let mut first = [0u8; 11];
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                server.read_exact(&mut first),
            )
            .await
            .unwrap_or_else(|_| panic!("pipes {pipes}: stalled at the mark"))
            .unwrap();
            assert_eq!(&first, b"beforeafter", "pipes {pipes}");
            send(b"more", nix::sys::socket::MsgFlags::empty());
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = first.to_vec();
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                server.read_to_end(&mut got),
            )
            .await
            .unwrap_or_else(|_| panic!("pipes {pipes}: the direction stalled"))
            .unwrap();
            // The urgent byte itself is out of band (not inline), as a
            // direct connection's reader sees it.
            assert_eq!(got, b"beforeaftermore", "pipes {pipes}");
            drop(server);
            drop(client);
            let _ = relay.await;
        }
    }

    /// Reads `s` to its end, within 5 s, which must be a reset.
    async fn ends_in_a_reset(s: &mut TcpStream, case: &str) {
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{case}: no end"));
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "{case}"
        );
    }

    /// A tunnel relayed spliced (`pipes`), copied, or (`copied`) through
    /// the copy path a TLS client takes.
    fn spawn_in_mode(
        client: TcpStream,
        up: TcpStream,
        (pipes, copied): (bool, bool),
    ) -> tokio::task::JoinHandle<io::Result<()>> {
        match copied {
            false => spawn_relay(client, Bytes::new(), up, Activity::new(), pipes),
            true => tokio::spawn(async move {
                let fd = Some(client.as_raw_fd());
                let (activity, stall) = (Activity::new(), Duration::from_secs(300));
                copy_tunnel((client, fd), Bytes::new(), up, &activity, stall).await
            }),
        }
    }

    /// A tunnel rotor ends itself (its relay dropped: the drain's cut,
    /// silence, a revoked user) is reset on both sides, not closed with
    /// the FIN that would tell a client reading to the end that a cut
    /// download was whole; one both peers ended closes as they did.
    #[tokio::test]
    async fn a_tunnel_rotor_ends_is_reset_not_finished() {
        // Spliced, copied, and through the copy path a TLS client takes.
        for (pipes, copied) in [(true, false), (false, false), (false, true)] {
            let (mut client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            let relay = spawn_in_mode(relay_client, relay_up, (pipes, copied));
            server.write_all(b"part of a download").await.unwrap();
            let mut got = [0u8; 18];
            client.read_exact(&mut got).await.unwrap();
            relay.abort();
            let _ = relay.await;
            ends_in_a_reset(
                &mut client,
                &format!("pipes {pipes}, copied {copied}: the client"),
            )
            .await;
            ends_in_a_reset(
                &mut server,
                &format!("pipes {pipes}, copied {copied}: the destination"),
            )
            .await;
        }
    }

    /// A destination that reads part of an upload, answers and resets
    /// (refusing the rest, as a server answering a large upload early
    /// does): its answer reaches the client, then the reset, as over a
    /// direct connection, and at once: the reset socket's unsent bytes are
    /// not waited for (they never go). Before, the upload's reset ended
    /// the download too (the answer came through in 3 runs of 10), and the
    /// tunnel took the reset's whole wait (2 s) to end.
    #[tokio::test]
    async fn an_answer_sent_before_a_reset_during_an_upload_reaches_the_client() {
        const ANSWER: usize = 100_000;
        for (pipes, copied) in [(true, false), (false, false), (false, true)] {
            let case = format!("pipes {pipes}, copied {copied}");
            let (client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            let relay = spawn_in_mode(relay_client, relay_up, (pipes, copied));
            let (mut from, mut to) = client.into_split();
            let upload = tokio::spawn(async move {
                let chunk = vec![b'u'; 64 << 10];
                for _ in 0..80 {
                    if to.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                to
            });
            let mut head = vec![0u8; 1000];
            server.read_exact(&mut head).await.unwrap();
            server.write_all(&data(ANSWER, 7)).await.unwrap();
            socket2::SockRef::from(&server)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(server);
            let reset = std::time::Instant::now();
            let mut got = Vec::new();
            let end = tokio::time::timeout(Duration::from_secs(10), from.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("{case}: the tunnel stays open"));
            assert_eq!(got.len(), ANSWER, "{case}: the answer");
            assert!(got == data(ANSWER, 7), "{case}: the answer's bytes");
            assert_eq!(
                end.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset),
                "{case}"
            );
            let ended = relay.await.unwrap();
            assert!(ended.is_err_and(|e| os::is_reset(&e)), "{case}");
            // (Well within the reset's wait, 2 s, which it took whole.)
            assert!(
                reset.elapsed() < RESET_WAIT * 3 / 4,
                "{case}: {:?}",
                reset.elapsed()
            );
            drop(upload.await);
        }
    }

    /// A client that resets its tunnel while its upload waits for a
    /// destination that takes nothing (and sends nothing): the tunnel
    /// ends within seconds, the destination told by a reset (nothing read
    /// the client's socket: it was held until the stall limit, 5 min).
    #[tokio::test]
    async fn a_client_reset_while_its_upload_waits_ends_the_tunnel() {
        for (pipes, copied) in [(true, false), (false, false), (false, true)] {
            let case = format!("pipes {pipes}, copied {copied}");
            let (client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            let relay = spawn_in_mode(relay_client, relay_up, (pipes, copied));
            // Uploads until nothing more goes (the destination reads none).
            let chunk = vec![b'u'; 64 << 10];
            loop {
                match client.try_write(&chunk) {
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{case}: {e}"),
                }
                let wait = tokio::time::timeout(Duration::from_millis(300), client.writable());
                if wait.await.is_err() {
                    break;
                }
            }
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
            let ended = tokio::time::timeout(Duration::from_secs(10), relay)
                .await
                .unwrap_or_else(|_| panic!("{case}: the tunnel stays open"))
                .unwrap();
            assert!(ended.is_err_and(|e| os::is_reset(&e)), "{case}");
            ends_in_a_reset(&mut server, &format!("{case}: the destination")).await;
        }
    }

    #[tokio::test]
    async fn splices_both_ways_whole_with_half_closes() {
        // Past BULK_AFTER, so the big pipes are used too.
        relay_both_ways(true, 8 << 20).await;
        relay_both_ways(true, 10).await;
    }

    #[tokio::test]
    async fn copies_both_ways_whole_without_pipes() {
        relay_both_ways(false, 8 << 20).await;
        relay_both_ways(false, 10).await;
    }

    /// A loopback path is short: the sender's send buffer and the
    /// receiver's receive buffer are capped and stay so through a bulk
    /// transfer, while an uncapped pair's grow past the cap (which is what
    /// makes the first assertion mean something).
    #[tokio::test]
    async fn short_paths_get_capped_buffers_that_do_not_grow() {
        /// A pair whose ends were both taken as short and capped: on a
        /// loaded host a handshake's round trip can measure long, now and
        /// then, so it has a few tries.
        async fn capped_pair() -> (TcpStream, TcpStream) {
            for _ in 0..20 {
                let (a, b) = socket_pair().await;
                if cap_if_short(&a, Buffer::Send) && cap_if_short(&b, Buffer::Receive) {
                    return (a, b);
                }
            }
            panic!("loopback not taken as short in 20 tries");
        }
        async fn bulk_through(cap: bool) -> (usize, usize) {
            let (mut a, mut b) = if cap {
                capped_pair().await
            } else {
                socket_pair().await
            };
            let chunk = vec![7u8; 1 << 20];
            let send = async {
                for _ in 0..64 {
                    a.write_all(&chunk).await.unwrap();
                }
                a.shutdown().await.unwrap();
            };
            let recv = async {
                let mut sink = vec![0u8; 1 << 20];
                while b.read(&mut sink).await.unwrap() > 0 {}
            };
            tokio::join!(send, recv);
            let rcv = socket2::SockRef::from(&b).recv_buffer_size().unwrap();
            let snd = socket2::SockRef::from(&a).send_buffer_size().unwrap();
            (rcv, snd)
        }
        // The kernel doubles what is set (less if net.core.*mem_max is lower).
        let (rcv, snd) = bulk_through(true).await;
        assert!(
            rcv <= 2 * SHORT_PATH_BUFFER && snd <= 2 * SHORT_PATH_BUFFER,
            "{rcv} {snd}"
        );
        let (rcv, snd) = bulk_through(false).await;
        assert!(
            rcv > 2 * SHORT_PATH_BUFFER || snd > 2 * SHORT_PATH_BUFFER,
            "{rcv} {snd}"
        );
    }

    /// Past the budget no pipe is counted (none is made: the chunk is
    /// copied), and one closed makes room again.
    #[test]
    fn no_pipe_is_made_past_the_budget() {
        let open = AtomicUsize::new(0);
        assert!((0..3).all(|_| counted(&open, 3)));
        assert!(!counted(&open, 3) && !counted(&open, 3));
        assert_eq!(open.load(Ordering::Acquire), 3);
        open.fetch_sub(1, Ordering::AcqRel);
        assert!(counted(&open, 3));
    }

    #[test]
    fn the_pools_keep_no_more_than_their_bound() {
        for big in [false, true] {
            let (pool, max) = Pipe::pool(big);
            let taken: Vec<Pipe> = (0..max + 5).filter_map(|_| take_pipe(big)).collect();
            assert_eq!(taken.len(), max + 5);
            for p in taken {
                give_back(p);
            }
            assert!(pool.lock().unwrap().len() <= max);
        }
    }
}
