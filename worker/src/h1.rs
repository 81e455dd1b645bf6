//! rotor's HTTP/1.1 client side: one upstream connection, driven by the
//! task that serves the client's request.
//!
//! hyper's client runs each connection in a task of its own and hands every
//! request and response across a channel to it: two task wake-ups, a
//! channel and a oneshot per request, and a request encoder and response
//! parser working on maps built for the purpose. A forward proxy needs less:
//! it writes the head it already has, parses the response head once
//! (`httparse`, as hyper does) and streams the body straight from the
//! socket into the client's response. The connection is plain data — a
//! socket and its read buffer — so an idle one sits in the pool with no
//! task behind it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, request, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fields::{Fields, Spans, Wire};

/// The longest response head read: squid's `reply_header_max_size`
/// (HAProxy's whole buffer is 16 KiB). hyper's client allows 408 KiB, but
/// a head is held whole while a slow client takes it: at 408 KiB, a
/// destination answering every request with one had 4 096 connections
/// pin 1.6 GiB.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head (hyper's client default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;
/// The longest chunk-size line (with extensions) or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange with the destination failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the destination closed the connection before a response")]
    ClosedBeforeResponse,
    #[error("the destination closed the connection in the middle of the response head")]
    ClosedInHead,
    #[error("the connection to the destination broke")]
    Io(#[source] io::Error),
    #[error("the destination sent an invalid response head")]
    Parse(#[source] httparse::Error),
    #[error("the destination sent a response head of more than {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("the destination's response is malformed: {0}")]
    Malformed(&'static str),
    #[error("reading the client's request body failed")]
    ClientBody(#[source] BoxError),
    #[error("the destination closed the connection before the end of the body")]
    Incomplete,
    /// `writing`: the destination took none of the request for `after`;
    /// else it sent no response head within `after` of the request.
    #[error("{}", if *writing { "the destination took none of the request" } else { "the destination sent no response head" })]
    Timeout {
        writing: bool,
        after: std::time::Duration,
    },
    #[error("the client sent none of its request body for {after:?}")]
    ClientStalled { after: std::time::Duration },
}

/// How many times an upload's progress is looked at in a wait for it
/// (see `Conn::exchange`).
const STALL_LOOKS: u32 = 4;

impl Error {
    /// The `Proxy-Status` error type (RFC 9209 §2.3).
    pub fn proxy_status(&self) -> &'static str {
        match self {
            Error::ClosedBeforeResponse | Error::ClosedInHead | Error::Io(_) => {
                "connection_terminated"
            }
            Error::HeadTooLarge => "http_response_header_section_size",
            Error::Incomplete => "http_response_incomplete",
            Error::ClientBody(_) | Error::ClientStalled { .. } => "http_request_error",
            Error::Timeout { writing: true, .. } => "connection_write_timeout",
            Error::Timeout { .. } => "http_response_timeout",
            Error::Parse(_) | Error::Malformed(_) => "http_protocol_error",
        }
    }

    /// Whether nothing of a response arrived: the request may not have
    /// reached the destination at all (a reused connection it had closed).
    pub fn before_response(&self) -> bool {
        match self {
            Error::ClosedBeforeResponse => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Whether `status` says the destination may not have read the request
/// head whole (400 Bad Request, 408 Request Timeout, 413 Content Too
/// Large, 414 URI Too Long, 431 Request Header Fields Too Large): a
/// server that answers those after part of the head and keeps the
/// connection takes the rest of it for a request of its own, whose answer
/// would be the next client's. Such a connection is not pooled, with or
/// without `Connection: close`.
fn refused_head(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 408 | 413 | 414 | 431)
}

/// One connection to a destination, between exchanges: the socket and
/// what was read of it.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the destination closes the connection.
    Close,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        let _ = io.set_nodelay(true);
        Conn {
            io,
            // The room the first response's read reserves anyway, taken now:
            // the request head is made in it first (`exchange`), in one
            // allocation rather than grown from nothing.
            buf: BytesMut::with_capacity(READ_SIZE),
        }
    }

    /// Whether an idle connection can take a request: nothing arrived on
    /// it since its last response (no close, no stray bytes). Costs no
    /// system call unless the socket was seen readable.
    pub fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        matches!(self.io.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends the request (`head` and `fields`, which are final, and `body`,
    /// if the request has one) and reads the response head: its status,
    /// version and reason phrase, and its fields. The response's
    /// body reads from this connection; once read to its end the
    /// connection is handed back by [`ResponseBody::take_conn`].
    ///
    /// `wait` bounds the destination's taking the request (a body takes as
    /// long as it takes, but one the destination takes none of for `wait`
    /// ends it) and then its answer's head.
    ///
    /// `went` tells, on an error, whether the head went out, and how much
    /// of the body.
    ///
    /// `expect_continue`: the client asked for `100 (Continue)` before its
    /// body (RFC 9110 §10.1.1). The head goes out saying so, and the body
    /// (whose first read has hyper send the client its `100`) waits for
    /// the destination's `100`, or for [`CONTINUE_WAIT`] should none come;
    /// a final answer first goes to the client with none of the body sent.
    pub async fn exchange<B>(
        self,
        head: &request::Parts,
        fields: &Fields,
        body: Option<B>,
        expect_continue: bool,
        wait: std::time::Duration,
        went: &mut Went,
    ) -> Result<(ResponseHead, ResponseBody), Error>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        let Conn { mut io, mut buf } = self;
        let sending = match &body {
            None => Sending::None,
            Some(b) => b
                .size_hint()
                .exact()
                .map_or(Sending::Chunked, Sending::Length),
        };
        // The head is made in the read buffer (empty between exchanges, its
        // room kept with the connection), and the buffer emptied again for
        // the response once it went.
        buf.clear();
        let expect_continue = expect_continue && sending != Sending::None;
        let private = encode_head(&mut buf, head, fields, sending, expect_continue);
        let timed_out = |writing| Error::Timeout {
            writing,
            after: wait,
        };
        let mut early = false;
        let mut upload = None;
        // Counted only for a body (no allocation for the common request).
        let sent = body.as_ref().map(|_| Arc::new(Progress::default()));
        went.sent.clone_from(&sent);
        let (io, (status, headers, version, reason)) = match body {
            None => {
                // One bound for the head's going and the answer's coming.
                let exchanged = within(wait, async {
                    if let Err(e) = io.write_all(&buf).await {
                        // A head too large for the destination: it may
                        // have answered what it read of it (a 431) and
                        // closed, and that answer is the client's. What
                        // it sent before its reset is still to be read.
                        buf.clear();
                        return match read_head(&mut io, &mut buf).await {
                            Ok(head) => Ok((head, true)),
                            Err(_) => Err(Error::Io(e)),
                        };
                    }
                    buf.clear();
                    went.head = true;
                    read_head(&mut io, &mut buf).await.map(|head| (head, false))
                })
                .await;
                let (head, cut) = exchanged.ok_or_else(|| timed_out(!went.head))??;
                // (A connection with part of a request in it is not reused.)
                early = cut;
                (Io::Whole(io), head)
            }
            Some(body) => 'sent: {
                // A body past what the kernel holds unsent, or of unknown
                // length: a destination taking it slowly wakes the write
                // each 128 KiB it takes, not a third of a send buffer of
                // MiBs apart, which `wait` took for one taking none.
                if !matches!(sending, Sending::Length(n) if n <= u64::from(crate::os::UNSENT)) {
                    let _ = crate::os::limit_unsent(&io);
                }
                tokio::time::timeout(wait, io.write_all(&buf))
                    .await
                    .map_err(|_| timed_out(true))?
                    .map_err(Error::Io)?;
                buf.clear();
                went.head = true;
                // What is read meanwhile stays in `buf` (a `100` cut by
                // the wait's end is skipped there as the answer is read).
                if expect_continue {
                    let waited = within(
                        CONTINUE_WAIT.min(wait),
                        read_reply(&mut io, &mut buf, Ends::Continue),
                    );
                    match waited.await {
                        // The `100`, or none within the wait: the body goes.
                        Some(Ok(None)) | None => {}
                        // The destination answered without the body: the
                        // client is told, and keeps its body (hyper sends
                        // it no `100` and closes its connection after the
                        // answer); the destination's connection, told a
                        // length it did not get, is not reused.
                        Some(Ok(Some(head))) => {
                            early = true;
                            break 'sent (Io::Whole(io), head);
                        }
                        Some(Err(e)) => return Err(e),
                    }
                }
                // Owned halves: should the destination answer before it
                // has the whole body, the rest can go on being sent (it may
                // still be reading it) while the answer is relayed.
                let (mut rd, wr) = io.into_split();
                let progress = sent.clone().unwrap_or_default();
                let mut send = Box::pin(send_body(wr, body, sending, progress.clone()));
                let first = {
                    let recv = read_head(&mut rd, &mut buf);
                    tokio::pin!(recv);
                    // An upload takes as long as it takes, as long as it
                    // moves: `wait` bounds a destination taking none of
                    // it, a client sending none of it, then the answer.
                    // Looked at four times a `wait`: a stall is cut within
                    // a quarter of it late (looked at once a `wait`, it was
                    // cut up to twice `wait` after the last byte).
                    let tick = wait / STALL_LOOKS;
                    let timer = tokio::time::sleep(tick);
                    tokio::pin!(timer);
                    let mut seen = (0, 0);
                    let mut still = 0;
                    loop {
                        tokio::select! {
                            biased;
                            r = &mut send => {
                                let (first, deadline) = deadlines(tokio::time::Instant::now(), wait);
                                // The answer's wait first fires early (the
                                // fast path's client watch); a failed send's
                                // wait for an answer already sent does not.
                                timer.as_mut().reset(match r.is_ok() {
                                    true => first,
                                    false => deadline,
                                });
                                break match r {
                                    Ok(wr) => loop {
                                        tokio::select! {
                                            biased;
                                            head = &mut recv => break First::Sent(wr, head),
                                            () = &mut timer => if wait_over(timer.as_mut(), deadline) {
                                                return Err(timed_out(false));
                                            },
                                        }
                                    },
                                    // The destination stopped taking the
                                    // body: it may have answered (a 413)
                                    // and closed, and its answer is the
                                    // client's.
                                    Err(e @ Error::Io(_)) => tokio::select! {
                                        biased;
                                        head = &mut recv => First::Failed(e, Some(head)),
                                        () = &mut timer => First::Failed(e, None),
                                    },
                                    Err(e) => First::Failed(e, None),
                                }
                            }
                            r = &mut recv => break First::Answered(r),
                            () = &mut timer => {
                                let moved = progress.moved();
                                still = match moved == seen {
                                    true => still + 1,
                                    false => 0,
                                };
                                if still >= STALL_LOOKS {
                                    return Err(match progress.writing.load(Ordering::Relaxed) {
                                        true => timed_out(true),
                                        false => Error::ClientStalled { after: wait },
                                    });
                                }
                                seen = moved;
                                timer.as_mut().reset(tokio::time::Instant::now() + tick);
                            }
                        }
                    }
                };
                match first {
                    First::Sent(wr, head) => {
                        let io = rd.reunite(wr).expect("the halves of one stream");
                        (Io::Whole(io), head?)
                    }
                    First::Failed(_, Some(Ok(head))) => {
                        early = true;
                        (Io::Read(rd), head)
                    }
                    First::Failed(e, _) => return Err(e),
                    // The answer came before the whole body went: the
                    // rest goes on in the background while the answer is
                    // read; the connection, with part of a request in it,
                    // is not reused.
                    First::Answered(head) => {
                        let head = head?;
                        early = true;
                        upload = Some(send);
                        (Io::Read(rd), head)
                    }
                }
            }
        };
        // A connection NTLM or Negotiate authenticated is the client's
        // alone: not pooled for others (as HAProxy's private connections).
        // Nor is one that carried a request body: a destination that
        // answers without reading the body (the CL.0 desync) takes it for
        // the start of the next request on the connection, which another
        // client may send — one client's bytes heading another's request.
        let carried_body = !matches!(sending, Sending::None | Sending::Length(0));
        let reuse = !early && !private && !carried_body;
        // The rest of the upload, once the answer is known to be relayed
        // (aborted with the answer, should its framing be refused). Its
        // end sends no FIN (the destination may take the client's going
        // as a cancel while it still answers): the connection closes with
        // the response.
        let upload = upload.map(|send| {
            let task = tokio::spawn(async move {
                if let Ok(wr) = send.await {
                    wr.forget();
                }
            });
            AbortOnDrop(task.abort_handle())
        });
        let parsed = (status, headers, version, reason);
        answered(&head.method, parsed, (io, buf), reuse, (sent, upload))
    }

    /// Sends a WebSocket opening handshake (`head` and `fields`, final:
    /// `Upgrade` and `Connection: upgrade` among them; no body) and reads
    /// the answer's head within `wait`. A `101` hands over the connection,
    /// with what the destination sent past its head; any other answer is
    /// a response as [`Conn::exchange`]'s (its connection not reused).
    pub async fn upgrade(
        self,
        head: &request::Parts,
        fields: &Fields,
        wait: std::time::Duration,
    ) -> Result<Upgrade, Error> {
        let Conn { mut io, mut buf } = self;
        buf.clear();
        encode_head(&mut buf, head, fields, Sending::None, false);
        let mut written = false;
        let read = within(wait, async {
            if let Err(e) = io.write_all(&buf).await {
                // A head too large for the destination: its answer (a
                // 431) before its reset is the client's, as `exchange`'s.
                buf.clear();
                return read_reply(&mut io, &mut buf, Ends::Final)
                    .await
                    .map_err(|_| Error::Io(e));
            }
            written = true;
            buf.clear();
            read_reply(&mut io, &mut buf, Ends::Switching).await
        })
        .await;
        let parsed = match read {
            Some(r) => r?.expect("a 100 ends only an Expect's wait"),
            None => {
                return Err(Error::Timeout {
                    writing: !written,
                    after: wait,
                })
            }
        };
        let (status, fields, version, reason) = parsed;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let head = ResponseHead {
                status,
                version,
                reason,
                fields,
            };
            return Ok(Upgrade::Switched(head, io, buf.freeze()));
        }
        let parsed = (status, fields, version, reason);
        let (head, body) = answered(
            &head.method,
            parsed,
            (Io::Whole(io), buf),
            false,
            (None, None),
        )?;
        Ok(Upgrade::Refused(head, body))
    }
}

/// What a WebSocket opening handshake got ([`Conn::upgrade`]).
pub enum Upgrade {
    /// `101 (Switching Protocols)`: its head, the connection, and what the
    /// destination sent past the head (the new protocol's first bytes).
    Switched(ResponseHead, TcpStream, Bytes),
    /// Any other answer, and its body.
    Refused(ResponseHead, ResponseBody),
}

/// A response whose head came (`parsed`, to `method`), with its body to
/// read from `io` after what `buf` holds. `reuse`: whether the exchange
/// left the connection fit for another (the answer's framing and fields
/// decide the rest). `sent` counts an upload, whose `upload` (the rest of
/// it, should the answer have come first) goes on in the background.
/// (Inlined, as [`Conn::exchange`]'s tail was: out of line, its head and
/// body moved out through a return cost a keep-alive request some 120
/// instructions, callgrind.)
#[inline(always)]
fn answered(
    method: &Method,
    (status, headers, version, reason): Parsed,
    (io, buf): (Io, BytesMut),
    reuse: bool,
    (sent, upload): (Option<Arc<Progress>>, Option<AbortOnDrop>),
) -> Result<(ResponseHead, ResponseBody), Error> {
    let Framed {
        framing,
        close,
        length_field,
    } = framing(method, status, version, headers.iter())?;
    if framing == Framing::Chunked {
        chunked_start(&buf)?;
    }
    let mut headers = headers;
    length_field.apply(&mut headers);
    let reusable = reuse
        && framing != Framing::Close
        && version == Version::HTTP_11
        && !close
        && !refused_head(status);
    let head = ResponseHead {
        status,
        version,
        reason,
        fields: headers,
    };
    let body = ResponseBody {
        io: Some(io),
        buf,
        decoder: framing.into(),
        reusable,
        sent,
        _upload: upload,
    };
    Ok((head, body))
}

/// How long a request waits for its answer (or its name, its connection,
/// its credentials' check) before the fast path watches its client
/// (`fast::serve`): a waiting request's task is woken then, and told so
/// (`take_watch_call`). (Watching at once would cost a connection not yet
/// registered with the reactor — one request per connection — its
/// registration, two system calls; most answers come sooner.)
pub const WATCH_CLIENT_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// How long a request body held for the destination's `100 (Continue)`
/// waits for it before going anyway (a destination may send none: RFC
/// 9110 §10.1.1): curl's wait for its own.
pub const CONTINUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// Set when a request's wait passed `WATCH_CLIENT_AFTER` (or it began
    /// to wait for a site's budget), and read by the server polling that
    /// request, in the same poll on the same thread.
    static WATCH_CALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the request just polled has waited `WATCH_CLIENT_AFTER` for its
/// answer (once: the call is taken).
pub fn take_watch_call() -> bool {
    WATCH_CALL.with(|c| c.replace(false))
}

/// Tells the server polling this request to watch its client from now:
/// the request is about to wait long (for a site's budget).
pub fn call_watch() {
    WATCH_CALL.with(|c| c.set(true));
}

/// `fut`, unless its client goes first (`None`): the watch every path
/// keeps on a waiting request's client (the fast path's, hyper's on a
/// plain connection, SOCKS5's), begun only once the wait has called for it
/// (`take_watch_call`: past `WATCH_CLIENT_AFTER`, or a wait for a site's
/// budget begun). `peek` looks at the client's socket without taking
/// anything: an end of its stream (or an error) is its going; bytes end
/// the watch (a request or tunnel bytes sent early, left for later).
///
/// A client that sends its request and shuts its side (`nc -N`, one that
/// only reads) still reads: watched at once, it was taken for gone and
/// left unanswered. Watched from `WATCH_CLIENT_AFTER`, an answer that
/// comes sooner reaches it; a request that waits longer for a client
/// that only shut its side is given up, as nginx and hyper do.
///
/// A future of its own, not an `async fn` around a `poll_fn`: the fast
/// path waits in it for every request, and an async layer there cost
/// about 270 instructions a request.
pub(crate) fn unless_gone<F, P>(fut: F, peek: P) -> UnlessGone<F, P>
where
    F: std::future::Future,
    P: FnMut(&mut Context<'_>) -> Poll<io::Result<usize>>,
{
    UnlessGone {
        fut,
        peek,
        watching: false,
        early: false,
    }
}

pin_project_lite::pin_project! {
    /// See [`unless_gone`].
    pub(crate) struct UnlessGone<F, P> {
        #[pin]
        fut: F,
        peek: P,
        watching: bool,
        // Bytes came: the watch is over.
        early: bool,
    }
}

impl<F, P> std::future::Future for UnlessGone<F, P>
where
    F: std::future::Future,
    P: FnMut(&mut Context<'_>) -> Poll<io::Result<usize>>,
{
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.project();
        // (A call another task left.)
        take_watch_call();
        if let Poll::Ready(out) = me.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        *me.watching |= take_watch_call();
        if *me.watching && !*me.early {
            match (me.peek)(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) => *me.early = true,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

/// A look at `stream`'s next byte, for [`unless_gone`].
pub(crate) fn peek_one(stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let mut byte = [0u8; 1];
    stream.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut byte))
}

/// The first deadline of a wait of `wait` from `now` (`WATCH_CLIENT_AFTER`
/// in, if sooner), and its end.
fn deadlines(
    now: tokio::time::Instant,
    wait: std::time::Duration,
) -> (tokio::time::Instant, tokio::time::Instant) {
    // (No overflow: a duration setting is at most 10 years.)
    let deadline = now + wait;
    (first_deadline(now, deadline), deadline)
}

/// The first deadline of a wait from `now` to `deadline`.
fn first_deadline(
    now: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> tokio::time::Instant {
    deadline.min(now + WATCH_CLIENT_AFTER)
}

/// A wait's timer fired: whether the wait is over (`deadline`), else it
/// was the first deadline, and the task is told to watch its client.
fn wait_over(
    timer: std::pin::Pin<&mut tokio::time::Sleep>,
    deadline: tokio::time::Instant,
) -> bool {
    if timer.deadline() >= deadline {
        return true;
    }
    call_watch();
    timer.reset(deadline);
    false
}

pin_project_lite::pin_project! {
    /// `fut` within a wait (`None`: not), as `tokio::time::timeout`, but
    /// its timer first fires `WATCH_CLIENT_AFTER` in, ending nothing: the
    /// task is woken and told so, and the fast path begins watching its
    /// client. (A future of its own, as tokio's: an async function's
    /// layer moved the exchange's state once more, ≈ 270 instructions a
    /// request.)
    pub(crate) struct Within<F> {
        #[pin]
        fut: F,
        #[pin]
        timer: tokio::time::Sleep,
        deadline: tokio::time::Instant,
    }
}

pub(crate) fn within<F: std::future::Future>(wait: std::time::Duration, fut: F) -> Within<F> {
    let now = tokio::time::Instant::now();
    // (No overflow: a duration setting is at most 10 years.)
    Within::starting(now, now + wait, fut)
}

/// As [`within`], until `deadline`.
pub(crate) fn within_until<F: std::future::Future>(
    deadline: tokio::time::Instant,
    fut: F,
) -> Within<F> {
    Within::starting(tokio::time::Instant::now(), deadline, fut)
}

impl<F> Within<F> {
    /// `fut` within a wait from `now` to `deadline`.
    fn starting(now: tokio::time::Instant, deadline: tokio::time::Instant, fut: F) -> Within<F> {
        Within {
            fut,
            timer: tokio::time::sleep_until(first_deadline(now, deadline)),
            deadline,
        }
    }
}

impl<F: std::future::Future> std::future::Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut me = self.project();
        if let Poll::Ready(r) = me.fut.poll(cx) {
            return Poll::Ready(Some(r));
        }
        while me.timer.as_mut().poll(cx).is_ready() {
            if wait_over(me.timer.as_mut(), *me.deadline) {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}

/// A response head as read: its status line and fields.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// When it is not the status's usual one (passed on as sent).
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub fields: Wire,
}

/// A response head: status, fields, version, and the reason phrase when it
/// is not the status's usual one (passed on as sent).
type Parsed = (StatusCode, Wire, Version, Option<hyper::ext::ReasonPhrase>);

/// What happened first while a request body was going out.
enum First<W> {
    /// All of it went, then came this answer (within the wait).
    Sent(W, Result<Parsed, Error>),
    /// Sending failed; and the answer, if one was looked for and came
    /// within the wait.
    Failed(Error, Option<Result<Parsed, Error>>),
    /// The answer came first.
    Answered(Result<Parsed, Error>),
}

/// The read side of a connection a response comes on: all of it, or its
/// read half while the rest of a request body is still being sent.
#[derive(Debug)]
enum Io {
    Whole(TcpStream),
    Read(tokio::net::tcp::OwnedReadHalf),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Whole(s) => Pin::new(s).poll_read(cx, buf),
            Io::Read(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// How a request's body is delimited on the wire: told by the body itself,
/// never by the headers that came with it (a client's `Connection:
/// content-length`, or a length that does not match, must not unframe it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// No body: a `Content-Length: 0` only if the client sent a length.
    None,
    Length(u64),
    Chunked,
}

/// `METHOD target HTTP/1.1`, then the fields, then the framing `sending`
/// says (the head's own `Content-Length` and `Transfer-Encoding` are not
/// written).
/// Whether the request authenticates its connection (see
/// `Written::connection_auth`).
/// `expect_continue`: with `Expect: 100-continue`.
fn encode_head(
    out: &mut impl BufMut,
    head: &request::Parts,
    fields: &Fields,
    sending: Sending,
    expect_continue: bool,
) -> bool {
    out.put_slice(head.method.as_str().as_bytes());
    out.put_u8(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let written = fields.encode(out, false);
    match sending {
        Sending::None if !written.content_length => {}
        Sending::None => encode_content_length(out, 0),
        Sending::Length(n) => encode_content_length(out, n),
        Sending::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    if expect_continue {
        out.put_slice(b"expect: 100-continue\r\n");
    }
    out.put_slice(b"\r\n");
    written.connection_auth
}

/// `content-length: N`, its line.
pub(crate) fn encode_content_length(out: &mut impl BufMut, n: u64) {
    out.put_slice(b"content-length: ");
    out.put_slice(crate::text::itoa(n, &mut [0; 20]));
    out.put_slice(b"\r\n");
}

/// Writes `data`, as one chunk when `chunked` (RFC 9112 §7.1), in one
/// vectored write where it can; `wrote` is told the bytes of each write.
pub(crate) async fn write_data<W>(
    wr: &mut W,
    data: Bytes,
    chunked: bool,
    wrote: impl Fn(usize),
) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    if chunked {
        let size = size_line(data.len());
        let mut all = Buf::chain(&size[..], data).chain(&b"\r\n"[..]);
        write_all_counted(wr, &mut all, wrote).await
    } else {
        let mut data = data;
        write_all_counted(wr, &mut data, wrote).await
    }
}

/// `write_all_buf`, telling `wrote` the bytes of each write.
async fn write_all_counted<W, B>(wr: &mut W, buf: &mut B, wrote: impl Fn(usize)) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: Buf,
{
    while buf.has_remaining() {
        match wr.write_buf(buf).await {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => wrote(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A chunk's size line (RFC 9112 §7.1): its length in hex and CRLF,
/// made without an allocation.
pub(crate) struct SizeLine {
    buf: [u8; 18],
    len: u8,
}

impl std::ops::Deref for SizeLine {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

pub(crate) fn size_line(n: usize) -> SizeLine {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1) as usize;
    let mut buf = [0u8; 18];
    for (i, b) in buf.iter_mut().take(digits).enumerate() {
        *b = b"0123456789abcdef"[(n >> (4 * (digits - 1 - i))) & 0xf];
    }
    buf[digits..digits + 2].copy_from_slice(b"\r\n");
    SizeLine {
        buf,
        len: digits as u8 + 2,
    }
}

/// Streams the client's body to the destination (in chunks when its
/// length is unknown), counting it in `progress`; the writer back once all
/// of it went.
/// `sending`: as the head announced it; a length is what the bytes sent
/// are held to (a body yielding more would put a request of its own on
/// the connection; one yielding less would leave the destination waiting).
async fn send_body<W, B>(
    mut wr: W,
    mut body: B,
    sending: Sending,
    progress: Arc<Progress>,
) -> Result<W, Error>
where
    W: tokio::io::AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let chunked = sending == Sending::Chunked;
    let length = match sending {
        Sending::Length(n) => Some(n),
        _ => None,
    };
    let mut ended = false;
    while !ended {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|e| Error::ClientBody(e.into()))?;
        let Ok(data) = frame.into_data() else {
            // Trailers: not forwarded (nor were they by hyper's client).
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let (data, after) = join_ready(&mut body, data).await;
        ended = !matches!(after, After::More);
        let n = data.len() as u64;
        if length.is_some_and(|l| progress.sent.load(Ordering::Relaxed) + n > l) {
            return Err(Error::ClientBody(
                "the body is longer than its length".into(),
            ));
        }
        progress.received.fetch_add(n, Ordering::Relaxed);
        progress.writing.store(true, Ordering::Relaxed);
        write_data(&mut wr, data, chunked, progress.wrote())
            .await
            .map_err(Error::Io)?;
        progress.writing.store(false, Ordering::Relaxed);
        progress.sent.fetch_add(n, Ordering::Relaxed);
        if let After::Failed(e) = after {
            return Err(e);
        }
    }
    if length.is_some_and(|l| progress.sent.load(Ordering::Relaxed) != l) {
        return Err(Error::ClientBody(
            "the body is shorter than its length".into(),
        ));
    }
    progress.writing.store(true, Ordering::Relaxed);
    if chunked {
        write_all_counted(&mut wr, &mut &b"0\r\n\r\n"[..], progress.wrote())
            .await
            .map_err(Error::Io)?;
    }
    wr.flush().await.map_err(Error::Io)?;
    Ok(wr)
}

/// The most of a body's small frames that are joined into one write.
const JOIN_UP_TO: usize = 64 * 1024;

/// A frame this small is joined with what follows it.
const JOIN_BELOW: usize = 4096;

/// `data` and what more of `body` comes at once, joined up to
/// [`JOIN_UP_TO`] bytes (a frame that would pass it is joined whole), so
/// that a client's small chunks go out in one write: hyper gives a frame
/// a chunk, and decodes the next only once that one is taken (a yield to
/// the connection's task), and a body of one-byte chunks cost a write and
/// a segment to the destination for each 6 bytes from the client, and a
/// core for a few MB. Joining stops at a yield that brought nothing (the
/// client sends no more now), so a small body waits one yield; a frame
/// of [`JOIN_BELOW`] or more is not joined or copied. And what follows
/// them.
async fn join_ready<B>(body: &mut B, data: Bytes) -> (Bytes, After)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if data.len() >= JOIN_BELOW {
        return (data, After::More);
    }
    let mut joined: Option<BytesMut> = None;
    let mut yielded = false;
    let after = loop {
        if joined.as_ref().map_or(data.len(), BytesMut::len) >= JOIN_UP_TO {
            break After::More;
        }
        let next = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)));
        match next.await {
            Poll::Pending if yielded => break After::More,
            Poll::Pending => {
                tokio::task::yield_now().await;
                yielded = true;
            }
            Poll::Ready(None) => break After::Ended,
            Poll::Ready(Some(Err(e))) => break After::Failed(Error::ClientBody(e.into())),
            Poll::Ready(Some(Ok(frame))) => {
                yielded = false;
                if let Ok(more) = frame.into_data() {
                    joined
                        .get_or_insert_with(|| BytesMut::from(&data[..]))
                        .extend_from_slice(&more);
                }
            }
        }
    };
    (joined.map_or(data, BytesMut::freeze), after)
}

/// What follows the frames [`join_ready`] joined.
enum After {
    /// More may come.
    More,
    Ended,
    /// The client's body failed: the bytes before it go first.
    Failed(Error),
}

/// What of a request went out before an exchange failed: the head
/// (whole), and the body's bytes.
#[derive(Debug, Default)]
pub struct Went {
    pub head: bool,
    sent: Option<Arc<Progress>>,
}

impl Went {
    /// A head that went whole, and no body.
    pub fn head_only() -> Went {
        Went {
            head: true,
            sent: None,
        }
    }

    /// The request body's bytes that went out.
    pub fn body(&self) -> u64 {
        self.sent
            .as_ref()
            .map_or(0, |s| s.sent.load(Ordering::Relaxed))
    }
}

/// How an upload goes: the body's bytes sent (for the access log), and
/// for the waits, the bytes taken from the client and written to the
/// destination so far, and whether a write waits on the destination (not
/// on the client's body).
#[derive(Debug, Default)]
pub(crate) struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    written: AtomicU64,
    writing: AtomicBool,
}

impl Progress {
    /// Bytes taken from the client and written to the destination.
    fn moved(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        )
    }

    /// What counts each write to the destination.
    fn wrote(&self) -> impl Fn(usize) + '_ {
        |n| {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// A connection's buffer as it waits in the pool: one that a large head
/// grew (up to `MAX_HEAD` and a read more: up to 128 KiB allocated) is
/// not kept while the connection idles (4 096 idle connections would pin
/// 512 MiB). Told by its room alone: a `reserve` here, with the
/// response's head still sharing the allocation, allocated 16 KiB anew at
/// every request (+3 % of a keep-alive request's instructions). A head
/// that filled nearly all of its allocation leaves little room: that
/// buffer is caught at the connection's next return, once its next read
/// took the whole of it back.
fn idle_buffer(buf: BytesMut) -> BytesMut {
    match buf.is_empty() && buf.capacity() > 2 * READ_SIZE {
        true => BytesMut::with_capacity(READ_SIZE),
        false => buf,
    }
}

/// Reads a response head into `buf` and parses it, skipping interim
/// (1xx) responses; the head's bytes leave `buf`, the body's stay.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Parsed, Error> {
    match read_reply(rd, buf, Ends::Final).await? {
        Some(head) => Ok(head),
        None => unreachable!("a 100 ends the read only when asked"),
    }
}

/// Which answers end [`read_reply`] but a final one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    Final,
    /// A `100 (Continue)` too, as `None`.
    Continue,
    /// A `101 (Switching Protocols)` too (the request asked for an
    /// upgrade; to any other, a 101 is an error).
    Switching,
}

/// As [`read_head`], ending at what `ends` says too.
async fn read_reply<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    ends: Ends,
) -> Result<Option<Parsed>, Error> {
    let mut any = false;
    // What of `buf` is known to hold no whole head: a head trickled in a
    // byte at a time is parsed once its empty line may have come, not
    // again over all of it at each byte (up to `MAX_HEAD`, 64 KiB: a
    // destination would have the worker scan gigabytes).
    let mut scanned = 0;
    loop {
        if !buf.is_empty() {
            any = true;
            if crate::fast::head_may_end(buf, scanned, MAX_HEAD) {
                if let Some(parsed) = parse_head(buf)? {
                    match parsed {
                        Head::Interim(StatusCode::CONTINUE) if ends == Ends::Continue => {
                            return Ok(None)
                        }
                        Head::Interim(_) => {
                            scanned = 0;
                            continue;
                        }
                        Head::Final(h) => return Ok(Some(h)),
                        Head::Switching(h) if ends == Ends::Switching => return Ok(Some(h)),
                        // The request asked for no upgrade (Upgrade does
                        // not cross but for a WebSocket's handshake).
                        Head::Switching(_) => {
                            return Err(Error::Malformed(
                                "101 Switching Protocols to a request without Upgrade",
                            ))
                        }
                    }
                }
            }
            scanned = buf.len();
            if buf.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
        }
        buf.reserve(READ_SIZE);
        if rd.read_buf(buf).await.map_err(Error::Io)? == 0 {
            return Err(match any {
                false => Error::ClosedBeforeResponse,
                true => Error::ClosedInHead,
            });
        }
    }
}

enum Head {
    /// A 1xx response, consumed: its status.
    Interim(StatusCode),
    Final(Parsed),
    /// A `101 (Switching Protocols)`: the rest is another protocol's.
    Switching(Parsed),
}

/// The response head at the start of `buf`, if all of it is there.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    #[cfg(test)]
    tests::PARSES.with(|n| n.set(n.get() + 1));
    // Left uninitialised: the parser writes the fields it finds (filling
    // 100 empty ones first cost as much as parsing a short head).
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    // Whitespace between a field's name and its colon is not part of the
    // name (a proxy MUST remove it from a response, RFC 9112 §5.1): the
    // name's span leaves it out, so the field goes on without it.
    let parsed = httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
        .map_err(|e| match e {
            httparse::Error::TooManyHeaders => Error::HeadTooLarge,
            e => Error::Parse(e),
        });
    let len = match parsed? {
        httparse::Status::Partial => return Ok(None),
        // All of it may have come in the last read.
        httparse::Status::Complete(len) if len > MAX_HEAD => return Err(Error::HeadTooLarge),
        httparse::Status::Complete(len) => len,
    };
    let code = resp.code.ok_or(Error::Malformed("no status code"))?;
    let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("invalid status code"))?;
    let version = match resp.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if status.is_informational() && !switching {
        buf.advance(len);
        return Ok(Some(Head::Interim(status)));
    }
    let reason = resp
        .reason
        .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes().to_vec()).ok());
    let spans = Spans::of(buf, resp.headers);
    let head = buf.split_to(len).freeze();
    let headers = Wire::new(head, spans).ok_or(Error::Malformed("invalid header name"))?;
    let parsed = (status, headers, version, reason);
    Ok(Some(match switching {
        true => Head::Switching(parsed),
        false => Head::Final(parsed),
    }))
}

/// How the response's body is delimited (RFC 9112 §6.3), and whether the
/// response ends its connection's reuse: `Connection: close`, or both
/// `Transfer-Encoding` and `Content-Length` (a message to close after).
/// One pass over the fields, not a lookup (a hash) for each name.
fn framing<'a>(
    method: &Method,
    status: StatusCode,
    version: Version,
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Framed, Error> {
    let mut te = false;
    // The last transfer coding named, over every value in order.
    let mut last_coding = None;
    // Codings other than chunked (identity aside), and how often chunked.
    let (mut other_coding, mut chunked) = (false, 0);
    let mut length = None;
    let mut bad_length = None;
    let mut has_length = false;
    // More than one Content-Length field, or a list in one.
    let mut length_repeated = false;
    let mut close = false;
    for (name, value) in fields {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            for c in codings(value) {
                match c {
                    Coding::Chunked => chunked += 1,
                    // No coding: nor the last one (`chunked, identity`
                    // is chunked; its framing went on as the body).
                    Coding::Identity => continue,
                    Coding::Other => other_coding = true,
                }
                last_coding = Some(c);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length_repeated |= has_length || value.contains(&b',');
            has_length = true;
            for part in value.split(|&b| b == b',') {
                let n = decimal::<u64>(part.trim_ascii());
                // The first fault found is the one told.
                match (n, length) {
                    (None, _) => bad_length = bad_length.or(Some("invalid Content-Length")),
                    (Some(n), Some(l)) if l != n => {
                        bad_length = bad_length.or(Some("conflicting Content-Length values"))
                    }
                    (Some(n), _) => length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= says_close(value);
        }
    }
    close |= te && has_length;
    // RFC 9110 §8.6: a Content-Length that is not one number is not
    // forwarded as it came (clients reject `5, 5` and two fields): as one
    // value where the values agree, else not at all (without a body to
    // frame, a bad one is no error of the response's).
    // RFC 9112 §6.3: with a Transfer-Encoding, a Content-Length is not
    // forwarded, however many; nor on a 204 (RFC 9110 §8.6: a client that
    // took it would wait for a body that never comes).
    let length_field = match (length_repeated, bad_length, length) {
        _ if te || status == StatusCode::NO_CONTENT => LengthField::Drop,
        (_, Some(_), _) => LengthField::Drop,
        (true, None, Some(n)) => LengthField::One(n),
        _ => LengthField::AsSent,
    };
    let framed = |framing| Framed {
        framing,
        close,
        length_field,
    };
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(framed(Framing::Empty));
    }
    if te {
        // RFC 9112 §6.1: an HTTP/1.0 message's framing is faulty with a
        // Transfer-Encoding, whatever its Content-Length says (hyper's
        // client refuses it too).
        if version == Version::HTTP_10 {
            return Err(Error::Malformed(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        // Codings rotor would pass on still applied, with their name
        // taken off (Transfer-Encoding is hop-by-hop): the client would
        // read a gzip body as plain. A destination applies no coding
        // but chunked unasked (RFC 9110 §10.1.4), and rotor asks for none.
        if other_coding {
            return Err(Error::Malformed("a transfer coding other than chunked"));
        }
        if chunked > 1 {
            return Err(Error::Malformed("chunked applied more than once"));
        }
        // Chunked must be the last coding; with identity alone the body
        // ends at the close.
        let framing = match last_coding {
            Some(Coding::Chunked) => Framing::Chunked,
            _ => Framing::Close,
        };
        return Ok(framed(framing));
    }
    if let Some(e) = bad_length {
        return Err(Error::Malformed(e));
    }
    Ok(framed(length.map_or(Framing::Close, Framing::Length)))
}

/// A transfer coding, as rotor relays it: chunked it takes off and puts
/// on again, identity is none, any other it cannot pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Chunked,
    Identity,
    Other,
}

/// The codings a `Transfer-Encoding` value lists, in order (a value that
/// is not text is a coding that is not chunked).
pub(crate) fn codings(value: &[u8]) -> impl Iterator<Item = Coding> + '_ {
    let text = crate::fields::text(value).unwrap_or("?");
    text.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| match c {
            c if c.eq_ignore_ascii_case("chunked") => Coding::Chunked,
            c if c.eq_ignore_ascii_case("identity") => Coding::Identity,
            _ => Coding::Other,
        })
}

/// A response's framing (see [`framing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Framed {
    framing: Framing,
    /// The destination closes the connection after it.
    close: bool,
    length_field: LengthField,
}

/// What becomes of a response's `Content-Length` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LengthField {
    /// One field, one number (or none): as it came.
    AsSent,
    /// Repeated, or a list, of one number: one field with it.
    One(u64),
    /// Not a number, and no body framed by it, or beside a
    /// Transfer-Encoding: not passed on.
    Drop,
}

impl LengthField {
    /// Makes `fields`' Content-Length what it should be.
    fn apply(self, fields: &mut Wire) {
        match self {
            LengthField::AsSent => {}
            LengthField::One(n) => fields.insert(header::CONTENT_LENGTH, HeaderValue::from(n)),
            LengthField::Drop => fields.remove(&header::CONTENT_LENGTH),
        }
    }
}

/// The number `text` spells in decimal digits and nothing else (no sign,
/// no space, not empty), if it fits in `T`: a Content-Length, a port. (A
/// number parser alone would take `+5`.)
pub(crate) fn decimal<T: std::str::FromStr>(text: &[u8]) -> Option<T> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Digits are ASCII: the text is UTF-8.
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Whether a `Connection` value lists `close`.
pub(crate) fn says_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

#[derive(Debug)]
enum Decoder {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

impl From<Framing> for Decoder {
    /// Where reading a body delimited so starts.
    fn from(framing: Framing) -> Decoder {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::Chunked(Chunked::Size(0)),
            Framing::Close => Decoder::Close,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Chunked {
    /// At a chunk-size line, this much of which is known to hold no CRLF
    /// (a line trickled in a byte at a time is searched once, not again
    /// from its start at each read: 64 KiB of trailer line took seconds
    /// of CPU).
    Size(u32),
    /// In a chunk's data, this much left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// In the trailer section, this much of it read, and of the line
    /// coming, this much known to hold no CRLF.
    Trailers(u32, u32),
}

/// A response body read from the destination's connection as the client
/// takes it; the connection is kept for reuse once the body has ended.
#[derive(Debug)]
pub struct ResponseBody {
    io: Option<Io>,
    buf: BytesMut,
    decoder: Decoder,
    reusable: bool,
    /// The request body's bytes that went out (`None`: there was none).
    sent: Option<Arc<Progress>>,
    /// The rest of the request body, still going out after an early
    /// answer: stopped when the answer has been relayed (or dropped).
    _upload: Option<AbortOnDrop>,
}

/// Stops a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ResponseBody {
    /// A body decoded from `buf` alone, with no connection behind it (the
    /// fuzzing entry, tests).
    fn from_buffer(buf: BytesMut, decoder: Decoder) -> ResponseBody {
        ResponseBody {
            io: None,
            buf,
            decoder,
            reusable: true,
            sent: None,
            _upload: None,
        }
    }

    /// The request body's bytes that went out.
    pub fn sent(&self) -> u64 {
        self.sent
            .as_ref()
            .map_or(0, |s| s.sent.load(Ordering::Relaxed))
    }

    /// The connection, once the body has ended and it can take another
    /// request.
    pub fn take_conn(&mut self) -> Option<Conn> {
        if !matches!(self.decoder, Decoder::Done) || !self.reusable {
            return None;
        }
        match self.io.take() {
            Some(Io::Whole(io)) => Some(Conn {
                io,
                buf: idle_buffer(std::mem::take(&mut self.buf)),
            }),
            _ => None,
        }
    }

    /// Reads more of the connection into its buffer; `Ok(false)` at the
    /// end of the stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        let io = self.io.as_mut().ok_or(Error::Incomplete)?;
        self.buf.reserve(READ_SIZE);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(io),
            cx,
            &mut self.buf
        ))
        .map_err(Error::Io)?;
        Poll::Ready(Ok(n > 0))
    }

    /// The next piece of the body out of the buffer, if the buffer holds
    /// one; `None`: more must be read.
    fn decode(&mut self) -> Result<Option<Option<Bytes>>, Error> {
        // The end, even once the connection has gone back to the pool.
        if matches!(self.decoder, Decoder::Done) {
            return Ok(Some(None));
        }
        let buf = &mut self.buf;
        loop {
            match &mut self.decoder {
                Decoder::Done => return Ok(Some(None)),
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Some(buf.split().freeze())));
                }
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = (*left).min(buf.len() as u64) as usize;
                    *left -= take as u64;
                    if *left == 0 {
                        self.decoder = Decoder::Done;
                    }
                    return Ok(Some(Some(buf.split_to(take).freeze())));
                }
                Decoder::Chunked(state) => match *state {
                    Chunked::Size(scanned) => {
                        let Some(end) = find_crlf(buf, scanned)? else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(Error::Malformed("chunk-size line too long"));
                            }
                            *state = Chunked::Size(buf.len() as u32);
                            return Ok(None);
                        };
                        let size = chunk_size(&buf[..end])?;
                        buf.advance(end + 2);
                        *state = match size {
                            0 => Chunked::Trailers(0, 0),
                            n => Chunked::Data(n),
                        };
                    }
                    Chunked::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let take = left.min(buf.len() as u64) as usize;
                        *state = match left - take as u64 {
                            0 => Chunked::DataEnd,
                            n => Chunked::Data(n),
                        };
                        return Ok(Some(Some(buf.split_to(take).freeze())));
                    }
                    Chunked::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(Error::Malformed("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *state = Chunked::Size(0);
                    }
                    Chunked::Trailers(seen, scanned) => {
                        // Trailer fields are read past, line by line, up
                        // to the empty line that ends the message.
                        let Some(end) = find_crlf(buf, scanned)? else {
                            if seen as usize + buf.len() > MAX_TRAILERS {
                                return Err(Error::Malformed("trailer section too long"));
                            }
                            *state = Chunked::Trailers(seen, buf.len() as u32);
                            return Ok(None);
                        };
                        buf.advance(end + 2);
                        // Counted over whole lines too: a destination whose
                        // every read ends a line is held to the bound.
                        let seen = seen as usize + end + 2;
                        match end {
                            0 => self.decoder = Decoder::Done,
                            _ if seen > MAX_TRAILERS => {
                                return Err(Error::Malformed("trailer section too long"));
                            }
                            _ => *state = Chunked::Trailers(seen as u32, 0),
                        }
                    }
                },
            }
        }
    }
}

/// Reads `data` as a destination's response would be read (for
/// fuzzing): the head (past interim responses), its framing, and the body
/// from what follows, to its end or an error; never a panic, and never a
/// body byte that was not in `data`.
#[doc(hidden)]
pub fn read_response_for_fuzzing(data: &[u8], head_request: bool) {
    let mut buf = BytesMut::from(data);
    let (status, headers, version) = loop {
        match parse_head(&mut buf) {
            Ok(Some(Head::Final((status, headers, version, _)))) => {
                break (status, headers, version)
            }
            Ok(Some(Head::Interim(_))) => continue,
            // (Another protocol follows: no body to read.)
            Ok(Some(Head::Switching(_))) | Ok(None) | Err(_) => return,
        }
    };
    let method = if head_request {
        Method::HEAD
    } else {
        Method::GET
    };
    let Ok(Framed { framing, .. }) = framing(&method, status, version, headers.iter()) else {
        return;
    };
    let available = buf.len();
    let mut body = ResponseBody::from_buffer(buf, framing.into());
    let mut total = 0;
    while let Ok(Some(Some(piece))) = body.decode() {
        total += piece.len();
        assert!(total <= available, "more body than bytes");
    }
}

/// A chunked body's first bytes, those that came with the head, checked
/// as its reader will read them: a body malformed from its start is an
/// error before the head goes to the client (a 502 then, not a connection
/// closed with nothing sent, which a client may take for a reused
/// connection's close and send the request again). A length or a close
/// cannot fail this way; a body going bad later ends the connection.
fn chunked_start(buf: &[u8]) -> Result<(), Error> {
    let Some(end) = find_crlf(buf, 0)? else {
        return Ok(());
    };
    let size = chunk_size(&buf[..end])?;
    let data_end = (end as u64 + 2).saturating_add(size);
    if size > 0 && data_end.saturating_add(2) <= buf.len() as u64 {
        let at = data_end as usize;
        if &buf[at..at + 2] != b"\r\n" {
            return Err(Error::Malformed("chunk data not followed by CRLF"));
        }
    }
    Ok(())
}

/// Where the first line of `buf` ends (its CRLF), looked for past the
/// `scanned` bytes known to hold no LF. An LF without its CR can end no
/// line of a chunked body (RFC 9112 §7.1): an error at once, not a wait
/// for a CRLF that would never come.
fn find_crlf(buf: &[u8], scanned: u32) -> Result<Option<usize>, Error> {
    let from = (scanned as usize).min(buf.len());
    #[cfg(test)]
    tests::LOOKED.with(|n| n.set(n.get() + buf.len() - from));
    match buf[from..].iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(at) if from + at > 0 && buf[from + at - 1] == b'\r' => Ok(Some(from + at - 1)),
        Some(_) => Err(Error::Malformed("a chunked body's line ended by a bare LF")),
    }
}

/// The size of a chunk-size line (hex digits, then perhaps extensions).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Then nothing, or spaces or tabs and an extension (`;…`) without
    // control bytes (RFC 9112 §7.1.1: no CR, LF or form feed in a line).
    let after = &line[digits..];
    let rest = &after[after
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    let bad_byte = |&b: &u8| (b < 0x20 && b != b'\t') || b == 0x7f;
    // Leading zeros are no size (RFC 9112 §7.1: `1*HEXDIG`; hyper's
    // decoder takes them): 16 digits past them fill a u64.
    let zeros = line[..digits].iter().take_while(|&&b| b == b'0').count();
    if digits == 0
        || digits - zeros > 16
        || !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(bad_byte)
    {
        return Err(Error::Malformed("invalid chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(text, 16).map_err(|_| Error::Malformed("invalid chunk size"))
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            match self.decode() {
                Err(e) => {
                    self.reusable = false;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(None)) => return Poll::Ready(None),
                Ok(None) => {}
            }
            match ready!(self.fill(cx)) {
                Ok(true) => {}
                // A body that ends at the close has ended.
                Ok(false) if matches!(self.decoder, Decoder::Close) => {
                    self.decoder = Decoder::Done;
                    self.reusable = false;
                }
                Ok(false) => {
                    self.reusable = false;
                    return Poll::Ready(Some(Err(Error::Incomplete)));
                }
                Err(e) => {
                    self.reusable = false;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.decoder {
            Decoder::Done => http_body::SizeHint::with_exact(0),
            Decoder::Length(n) => http_body::SizeHint::with_exact(n),
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    thread_local! {
        /// Response heads parsed on this thread.
        pub(super) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// Bytes looked at for a chunk-size or trailer line's end.
        pub(super) static LOOKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    use super::*;
    use http::header::{self, HeaderMap, HeaderName, HeaderValue};
    use http::Response;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::net::TcpListener;

    /// The exchanges' wait in these tests: long enough never to end one.
    const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

    /// `head`'s own map as the request's fields.
    fn fields_of(head: &request::Parts) -> Fields {
        Fields::Map(head.headers.clone())
    }

    /// An exchange's response head as one response, its fields a map.
    fn joined((head, body): (ResponseHead, ResponseBody)) -> (Response<()>, ResponseBody) {
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = Fields::Wire(head.fields).into_map();
        (resp, body)
    }

    /// A destination that reads one request head (and `body` bytes more,
    /// if any), then writes `reply` in `pieces` (a byte at a time for 1)
    /// and, with `close`, closes; what it read is returned.
    /// An origin answering one request `200 ok`.
    async fn answering_ok() -> (Conn, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        origin(vec![(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            1,
            false,
        )])
        .await
    }

    async fn origin(
        replies: Vec<(&'static [u8], usize, bool)>,
    ) -> (Conn, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            for (reply, pieces, close) in replies {
                let mut got = Vec::new();
                let mut b = [0u8; 4096];
                // The request: up to its blank line, and a body that ends
                // with the last chunk's `0\r\n\r\n` or a length given
                // in the test by the reply being sent only then.
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&b[..n]);
                }
                seen.push(got);
                for piece in reply.chunks(reply.len().div_ceil(pieces.max(1))) {
                    s.write_all(piece).await.unwrap();
                    s.flush().await.unwrap();
                    if pieces > 1 {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                if close {
                    return seen;
                }
            }
            seen
        });
        let s = TcpStream::connect(addr).await.unwrap();
        (Conn::new(s), task)
    }

    fn get(method: Method) -> request::Parts {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = method;
        parts.uri = "/p?q=1".parse().unwrap();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("example.test"));
        parts
    }

    async fn send(
        conn: Conn,
        head: &request::Parts,
    ) -> Result<(Response<()>, ResponseBody), Error> {
        let mut written = Went::default();
        conn.exchange(
            head,
            &fields_of(head),
            None::<Empty<Bytes>>,
            false,
            WAIT,
            &mut written,
        )
        .await
        .map(joined)
    }

    async fn all(body: &mut ResponseBody) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f?.into_data() {
                out.extend_from_slice(&d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn length_bodies_and_keep_alive() {
        let (conn, origin) = origin(vec![
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
                1,
                false,
            ),
            (
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\n\r\nnop",
                1,
                false,
            ),
        ])
        .await;
        let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(all(&mut body).await.unwrap(), b"hello");
        let conn = body
            .take_conn()
            .expect("a finished body gives its connection back");
        assert!(conn.is_usable());
        let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(all(&mut body).await.unwrap(), b"nop");
        let seen = origin.await.unwrap();
        assert!(seen[0].starts_with(b"GET /p?q=1 HTTP/1.1\r\nhost: example.test\r\n\r\n"));
    }

    /// A connection a request authenticated with NTLM or Negotiate is not
    /// given back for others; one with Basic (per request) is.
    #[tokio::test]
    async fn a_connection_authenticated_by_ntlm_is_not_pooled() {
        for (value, pooled) in [
            ("NTLM TlRMTVNTUAADAAAA", false),
            ("  negotiate YIIB", false),
            ("Basic YTpi", true),
            ("NTLMish x", true),
        ] {
            let (conn, _origin) = answering_ok().await;
            let mut req = get(Method::GET);
            req.headers
                .insert("authorization", HeaderValue::from_static(value));
            let (_, mut body) = send(conn, &req).await.unwrap();
            assert_eq!(all(&mut body).await.unwrap(), b"ok");
            assert_eq!(body.take_conn().is_some(), pooled, "{value}");
        }
    }

    /// The body sent is held to the length its head announced: one that
    /// yields more (which would put bytes of a request of its own on the
    /// connection) or less is an error, and nothing past the length goes.
    #[tokio::test]
    async fn a_body_is_held_to_its_announced_length() {
        struct Lying(Option<Bytes>, u64);
        impl Body for Lying {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                std::task::Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
            }
            fn size_hint(&self) -> http_body::SizeHint {
                http_body::SizeHint::with_exact(self.1)
            }
        }
        for (data, length, why) in [(&b"hello GET /x"[..], 5, "longer"), (b"hi", 5, "shorter")] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let seen = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_millis(500),
                    s.read_to_end(&mut got),
                )
                .await;
                got
            });
            let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
            let head = get(Method::POST);
            let mut written = Went::default();
            let r = conn
                .exchange(
                    &head,
                    &fields_of(&head),
                    Some(Lying(Some(Bytes::from_static(data)), length)),
                    false,
                    WAIT,
                    &mut written,
                )
                .await;
            match r {
                Err(Error::ClientBody(e)) => assert!(e.to_string().contains(why), "{e}"),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("{why}: sent"),
            }
            let got = seen.await.unwrap();
            assert!(
                !got.windows(6).any(|w| w == b"GET /x"),
                "{}",
                String::from_utf8_lossy(&got)
            );
        }
    }

    /// A connection that carried a request body is not pooled: a
    /// destination that answered without reading it (CL.0) would take it
    /// for the start of the next request, perhaps another client's. One
    /// whose request had an empty body is.
    #[tokio::test]
    async fn a_connection_that_carried_a_body_is_not_pooled() {
        // The origin helper reads a request up to its blank line; the body
        // (5 bytes, or none) is left unread, as a CL.0 destination does.
        for (body, pooled) in [(&b"GET /"[..], false), (b"", true)] {
            let (conn, _origin) = answering_ok().await;
            let mut head = get(Method::POST);
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let mut written = Went::default();
            let (_, mut resp) = conn
                .exchange(
                    &head,
                    &fields_of(&head),
                    Some(Full::new(Bytes::from_static(body))),
                    false,
                    WAIT,
                    &mut written,
                )
                .await
                .map(joined)
                .unwrap();
            assert_eq!(all(&mut resp).await.unwrap(), b"ok");
            assert_eq!(resp.take_conn().is_some(), pooled, "{body:?}");
        }
    }

    /// A connection whose response head grew its buffer goes back to the
    /// pool with a buffer of the usual size: at once when the head left
    /// room, at the next return when it filled nearly all of it.
    #[tokio::test]
    async fn a_large_head_does_not_stay_with_the_idle_connection() {
        for fields in [12, 20] {
            let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n".to_vec();
            for i in 0..fields {
                reply.extend_from_slice(format!("X-{i}: {}\r\n", "v".repeat(3000)).as_bytes());
            }
            reply.extend_from_slice(b"\r\nhello");
            let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
            let small: &'static [u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            let (mut conn, _origin) = origin(vec![(reply, 1, false), (small, 1, false)]).await;
            for (i, (headers, want)) in [(fields + 1, &b"hello"[..]), (1, b"ok")]
                .into_iter()
                .enumerate()
            {
                let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
                assert_eq!(resp.headers().len(), headers);
                drop(resp);
                assert_eq!(all(&mut body).await.unwrap(), want);
                conn = body.take_conn().expect("reusable");
                let room = conn.buf.capacity();
                assert!(
                    room <= 2 * READ_SIZE,
                    "{fields} fields, request {i}: {room}"
                );
            }
            assert!(conn.buf.capacity() >= READ_SIZE);
        }
    }

    #[tokio::test]
    async fn chunked_bodies_with_extensions_and_trailers_arrive_byte_by_byte() {
        let reply: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-T: 1\r\n\r\n";
        for pieces in [1, reply.len()] {
            let (conn, _origin) = origin(vec![(reply, pieces, false)]).await;
            let (_, mut body) = send(conn, &get(Method::GET)).await.unwrap();
            assert_eq!(all(&mut body).await.unwrap(), b"hello, world");
            assert!(body.take_conn().is_some(), "reusable after the last chunk");
        }
    }

    /// A trailer section past `MAX_TRAILERS` is refused also when every
    /// read holds whole lines (it was counted only over a partial line).
    #[tokio::test]
    async fn a_trailer_section_past_the_bound_is_refused() {
        let mut reply =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n".to_vec();
        for i in 0..(MAX_TRAILERS / 100 + 1) {
            reply.extend_from_slice(format!("X-T{i:05}: {}\r\n", "t".repeat(89)).as_bytes());
        }
        reply.extend_from_slice(b"\r\n");
        let reply: &'static [u8] = Box::leak(reply.into_boxed_slice());
        let (conn, _origin) = origin(vec![(reply, 1, false)]).await;
        let (_, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert!(
            matches!(all(&mut body).await, Err(Error::Malformed(m)) if m.contains("trailer")),
            "refused"
        );
    }

    #[tokio::test]
    async fn a_body_to_the_close_and_one_cut_short() {
        let (conn, _o) = origin(vec![(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 2, true)]).await;
        let (_, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert_eq!(all(&mut body).await.unwrap(), b"until the end");
        assert!(
            body.take_conn().is_none(),
            "a close-delimited body ends its connection"
        );

        let (conn, _o) = origin(vec![(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            1,
            true,
        )])
        .await;
        let (_, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert!(matches!(all(&mut body).await, Err(Error::Incomplete)));
        assert!(body.take_conn().is_none());

        let (conn, _o) = origin(vec![(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            1,
            true,
        )])
        .await;
        let (_, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert!(matches!(all(&mut body).await, Err(Error::Incomplete)));
    }

    /// A connection whose answer says the request head may not have been
    /// read whole (a 400, 408, 413, 414 or 431 kept alive) is not pooled:
    /// the head's unread rest would be the server's next request, its
    /// answer the next client's. Other answers are, a 404 and a 500 too.
    #[tokio::test]
    async fn a_connection_that_refused_the_head_is_not_pooled() {
        for (status, pooled) in [
            (400, false),
            (408, false),
            (413, false),
            (414, false),
            (431, false),
            (404, true),
            (500, true),
        ] {
            let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            let reply: &'static [u8] = Box::leak(reply.into_bytes().into_boxed_slice());
            let (conn, _o) = origin(vec![(reply, 1, false)]).await;
            let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
            assert_eq!(resp.status(), status);
            assert!(body.is_end_stream());
            assert_eq!(body.take_conn().is_some(), pooled, "{status}");
        }
    }

    #[tokio::test]
    async fn interim_responses_and_bodiless_answers() {
        let (conn, _o) = origin(vec![
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", 1, false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 1, false),
        ])
        .await;
        let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), 204);
        assert!(body.is_end_stream());
        let conn = body.take_conn().unwrap();
        let (resp, mut body) = send(conn, &get(Method::HEAD)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(body.is_end_stream(), "a HEAD response has no body");
        assert!(body.take_conn().is_some());
    }

    /// Whitespace before a field's colon (old embedded servers send it) is
    /// taken out, not a 502: the field is read, and written on without it.
    #[tokio::test]
    async fn whitespace_before_a_colon_is_taken_out() {
        let (conn, _o) = origin(vec![(
            b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\nX-A\t: b\r\n\r\nok",
            1,
            false,
        )])
        .await;
        let (resp, mut body) = send(conn, &get(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-a"], "b");
        assert_eq!(all(&mut body).await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        type Check = fn(&Error) -> bool;
        let cases: [(&'static [u8], Check); 5] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
                |e| matches!(e, Error::Malformed(_)),
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", |e| {
                matches!(e, Error::Malformed(_))
            }),
            (b"SSH-2.0-OpenSSH\r\n\r\n", |e| matches!(e, Error::Parse(_))),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", |e| {
                matches!(e, Error::Malformed(_))
            }),
            (b"HTTP/1.1 200 OK\r\nX: y", |e| {
                matches!(e, Error::ClosedInHead)
            }),
        ];
        for (reply, is) in cases {
            let (conn, _o) = origin(vec![(reply, 1, true)]).await;
            let e = send(conn, &get(Method::GET)).await.unwrap_err();
            assert!(is(&e), "{reply:?}: {e:?}");
            assert!(!e.before_response());
        }
        let (conn, _o) = origin(vec![(b"", 1, true)]).await;
        let e = send(conn, &get(Method::GET)).await.unwrap_err();
        assert!(e.before_response(), "{e:?}");
        assert_eq!(e.proxy_status(), "connection_terminated");

        let (conn, _o) = origin(vec![(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            1,
            false,
        )])
        .await;
        // Malformed in what came with the head: an error before the head
        // is handed on (a 502), not a body that fails once it is sent.
        let e = send(conn, &get(Method::GET)).await.unwrap_err();
        assert!(matches!(e, Error::Malformed(_)), "{e:?}");
        // The size line fine and the chunk's CRLF missing, likewise; a
        // size line still coming is left to the body.
        for (wire, bad) in [
            (&b"3\r\nabcX\r\n0\r\n\r\n"[..], true),
            (b"3\r\nabc\r\n0\r\n\r\n", false),
            (b"3\r\nab", false),
            (b"3", false),
            // A line a bare LF ends never becomes one.
            (b"5\nhello\n0\n\n", true),
            (b"5;a\n", true),
            (b"5\r", false),
        ] {
            assert_eq!(chunked_start(wire).is_err(), bad, "{wire:?}");
        }
    }

    /// The request head's framing is the body's, a client's own
    /// `Content-Length` and `Transfer-Encoding` never written; a bodiless
    /// request says `Content-Length: 0` only if the client gave a length.
    #[test]
    fn request_heads_are_framed_by_their_bodies() {
        let head = |fields: &[(&'static str, &'static str)], sending: Sending| {
            let mut parts = get(Method::POST);
            for (n, v) in fields {
                parts.headers.append(*n, HeaderValue::from_static(v));
            }
            let mut out = Vec::new();
            encode_head(&mut out, &parts, &fields_of(&parts), sending, false);
            String::from_utf8(out).unwrap()
        };
        let line = "POST /p?q=1 HTTP/1.1\r\nhost: example.test\r\n";
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(Pairs, Sending, &str)] = &[
            (&[], Sending::None, ""),
            (
                &[("content-length", "7")],
                Sending::None,
                "content-length: 0\r\n",
            ),
            (&[("transfer-encoding", "chunked")], Sending::None, ""),
            (
                &[("content-length", "9"), ("x", "y")],
                Sending::Length(3),
                "x: y\r\ncontent-length: 3\r\n",
            ),
            (
                &[("content-length", "9")],
                Sending::Chunked,
                "transfer-encoding: chunked\r\n",
            ),
        ];
        for (fields, sending, tail) in cases {
            assert_eq!(
                head(fields, *sending),
                format!("{line}{tail}\r\n"),
                "{fields:?} {sending:?}"
            );
        }
    }

    /// The one pass over a response's fields gives each case's framing
    /// and whether the connection is done.
    #[test]
    fn framing_and_close_in_one_pass() {
        let ok = |f: Framing, close: bool| Ok::<_, &str>((f, close));
        let get = Method::GET;
        type Pairs = &'static [(&'static str, &'static str)];
        type Want = Result<(Framing, bool), &'static str>;
        let cases: &[(Method, u16, Pairs, Want)] = &[
            (get.clone(), 200, &[], ok(Framing::Close, false)),
            (
                get.clone(),
                200,
                &[("content-length", "5")],
                ok(Framing::Length(5), false),
            ),
            (
                get.clone(),
                200,
                &[("content-length", "5, 5"), ("content-length", "5")],
                ok(Framing::Length(5), false),
            ),
            (
                get.clone(),
                200,
                &[("content-length", "5"), ("content-length", "6")],
                Err("conflicting Content-Length values"),
            ),
            (
                get.clone(),
                200,
                &[("content-length", "x, 5")],
                Err("invalid Content-Length"),
            ),
            (
                get.clone(),
                200,
                &[("content-length", "5, 6, x")],
                Err("conflicting Content-Length values"),
            ),
            (
                get.clone(),
                200,
                &[("content-length", "")],
                Err("invalid Content-Length"),
            ),
            (
                get.clone(),
                200,
                &[("transfer-encoding", "chunked")],
                ok(Framing::Chunked, false),
            ),
            // Codings other than chunked would cross still applied, their
            // name gone with the hop-by-hop field: refused.
            (
                get.clone(),
                200,
                &[("transfer-encoding", "gzip, Chunked ,")],
                Err("a transfer coding other than chunked"),
            ),
            (
                get.clone(),
                200,
                &[("transfer-encoding", "chunked, gzip")],
                Err("a transfer coding other than chunked"),
            ),
            (
                get.clone(),
                200,
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "gzip"),
                ],
                Err("a transfer coding other than chunked"),
            ),
            (
                get.clone(),
                200,
                &[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", " "),
                ],
                Err("a transfer coding other than chunked"),
            ),
            (
                get.clone(),
                200,
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "Chunked"),
                ],
                Err("chunked applied more than once"),
            ),
            // identity is no coding at all.
            (
                get.clone(),
                200,
                &[("transfer-encoding", "Identity, chunked")],
                ok(Framing::Chunked, false),
            ),
            (
                get.clone(),
                200,
                &[("transfer-encoding", "chunked, identity")],
                ok(Framing::Chunked, false),
            ),
            (
                get.clone(),
                200,
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "identity"),
                ],
                ok(Framing::Chunked, false),
            ),
            (
                get.clone(),
                200,
                &[("transfer-encoding", "identity")],
                ok(Framing::Close, false),
            ),
            // No body: nothing to decode, nothing refused.
            (
                Method::HEAD,
                200,
                &[("transfer-encoding", "gzip, chunked")],
                ok(Framing::Empty, false),
            ),
            // Both: chunked wins, the length is not even read, and the
            // connection is not reused.
            (
                get.clone(),
                200,
                &[("content-length", "x"), ("transfer-encoding", "chunked")],
                ok(Framing::Chunked, true),
            ),
            (
                get.clone(),
                200,
                &[("connection", "keep-alive, Close"), ("content-length", "0")],
                ok(Framing::Length(0), true),
            ),
            (
                get.clone(),
                200,
                &[("connection", "closed"), ("connection", "upgrade")],
                ok(Framing::Close, false),
            ),
            (
                Method::HEAD,
                200,
                &[("content-length", "x")],
                ok(Framing::Empty, false),
            ),
            (
                get.clone(),
                204,
                &[("connection", "close")],
                ok(Framing::Empty, true),
            ),
            (
                get.clone(),
                304,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                ok(Framing::Empty, true),
            ),
        ];
        for (method, status, fields, want) in cases {
            let mut headers = HeaderMap::new();
            for (n, v) in *fields {
                headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
            }
            let status = StatusCode::from_u16(*status).unwrap();
            let map = Fields::Map(headers);
            let wire = Fields::Wire(crate::fields::wire_for_tests(fields));
            for given in [&map, &wire] {
                let got = framing(method, status, Version::HTTP_11, given.iter())
                    .map(|f| (f.framing, f.close))
                    .map_err(|e| match e {
                        Error::Malformed(m) => m,
                        e => panic!("{e:?}"),
                    });
                assert_eq!(got, *want, "{method} {status} {fields:?}");
            }
        }
    }

    #[test]
    fn a_content_length_crosses_as_one_number() {
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: &[(Method, u16, Pairs, LengthField, Option<&str>)] = &[
            (
                Method::GET,
                200,
                &[("content-length", "5")],
                LengthField::AsSent,
                Some("5"),
            ),
            (Method::GET, 200, &[], LengthField::AsSent, None),
            (
                Method::GET,
                200,
                &[("Content-Length", "5, 5")],
                LengthField::One(5),
                Some("5"),
            ),
            (
                Method::GET,
                200,
                &[("content-length", "5"), ("Content-Length", "5")],
                LengthField::One(5),
                Some("5"),
            ),
            (
                Method::HEAD,
                200,
                &[("content-length", "7,7")],
                LengthField::One(7),
                Some("7"),
            ),
            (
                Method::HEAD,
                200,
                &[("content-length", "x")],
                LengthField::Drop,
                None,
            ),
            (
                Method::GET,
                304,
                &[("content-length", "1, 2")],
                LengthField::Drop,
                None,
            ),
        ];
        for (method, status, pairs, want, after) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            let mut wire = crate::fields::wire_for_tests(pairs);
            let got = framing(method, status, Version::HTTP_11, wire.iter())
                .unwrap()
                .length_field;
            assert_eq!(got, *want, "{method} {status} {pairs:?}");
            got.apply(&mut wire);
            let fields = Fields::Wire(wire);
            let lengths: Vec<_> = fields
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(b"content-length"))
                .map(|(_, v)| std::str::from_utf8(v).unwrap().to_string())
                .collect();
            assert_eq!(
                lengths,
                after.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn size_lines_are_hex_and_crlf() {
        for n in [0, 1, 9, 10, 15, 16, 255, 4096, 65_535, usize::MAX] {
            assert_eq!(&size_line(n)[..], format!("{n:x}\r\n").as_bytes());
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_out_in_chunks() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let origin = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            while !got.ends_with(b"0\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            got
        });
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let frames = futures_util::stream::iter(
            [&b"abc"[..], b"", b"defgh"]
                .map(|d| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(d)))),
        );
        let mut written = Went::default();
        let (resp, body) = conn
            .exchange(
                &get(Method::POST),
                &fields_of(&get(Method::POST)),
                Some(StreamBody::new(frames)),
                false,
                WAIT,
                &mut written,
            )
            .await
            .map(joined)
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(body.sent(), 8);
        let got = origin.await.unwrap();
        let text = String::from_utf8(got).unwrap();
        assert!(text.starts_with("POST /p?q=1 HTTP/1.1\r\n"), "{text}");
        // (Frames that come at once go as one chunk.)
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n8\r\nabcdefgh\r\n0\r\n\r\n"),
            "{text}"
        );
    }

    /// The wait bounds a destination taking none of the upload, and then
    /// its answer; not the upload's whole length.
    #[tokio::test]
    async fn the_wait_bounds_a_stalled_upload_and_the_answer_not_a_long_upload() {
        let wait = std::time::Duration::from_millis(300);
        // `read_every`: the origin reads 1 MiB that often (None: nothing);
        // `answer`: whether it answers once it has the whole body.
        async fn origin(read_every: Option<u64>, answer: bool) -> std::net::SocketAddr {
            // Small buffers: what the origin has not read is not taken
            // for read (and nothing is left to read after the last write).
            let l = tokio::net::TcpSocket::new_v4().unwrap();
            l.set_recv_buffer_size(64 << 10).unwrap();
            l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l = l.listen(8).unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let Some(ms) = read_every else {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                    return;
                };
                let mut b = vec![0u8; 1 << 20];
                let mut got = 0;
                while got < (16 << 20) {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    let mut n = 0;
                    while n < b.len() {
                        match s.read(&mut b[n..]).await.unwrap() {
                            0 => return,
                            k => n += k,
                        }
                    }
                    got += n;
                }
                // The rest: the head's bytes.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), s.read(&mut b))
                    .await;
                if answer {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            });
            addr
        }
        let mut head = get(Method::PUT);
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("16777216"));
        let body = || Full::new(Bytes::from(vec![b'x'; 16 << 20]));
        let connect = |addr| async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.set_send_buffer_size(64 << 10).unwrap();
            Conn::new(s.connect(addr).await.unwrap())
        };
        // 16 MiB at 1 MiB every 100 ms: about 1.6 s, five times the wait.
        // The whole body, on `conn`.
        let upload = |conn: Conn| {
            let (head, body) = (&head, &body);
            async move {
                let mut written = Went::default();
                let fields = fields_of(head);
                conn.exchange(head, &fields, Some(body()), false, wait, &mut written)
                    .await
            }
        };
        let conn = connect(origin(Some(100), true).await).await;
        let started = std::time::Instant::now();
        let mut written = Went::default();
        let (resp, _) = upload(conn).await.map(joined).unwrap();
        assert_eq!(resp.status(), 200);
        assert!(started.elapsed() > wait * 3, "{:?}", started.elapsed());
        // Taking none of it.
        let conn = connect(origin(None, true).await).await;
        let started = std::time::Instant::now();
        let e = upload(conn).await.unwrap_err();
        assert!(matches!(e, Error::Timeout { writing: true, .. }), "{e:?}");
        assert!(started.elapsed() < wait * 4, "{:?}", started.elapsed());
        // All of it, and no answer.
        let conn = connect(origin(Some(1), false).await).await;
        let e = upload(conn).await.unwrap_err();
        assert!(matches!(e, Error::Timeout { writing: false, .. }), "{e:?}");
        // A client that stops sending its body (the origin reads on).
        let conn = connect(origin(Some(1), false).await).await;
        let started = std::time::Instant::now();
        let stalled = futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
                Bytes::from_static(b"abc"),
            ))]),
            futures_util::stream::pending(),
        );
        let mut chunked = get(Method::POST);
        chunked.headers.remove(header::CONTENT_LENGTH);
        let e = conn
            .exchange(
                &chunked,
                &fields_of(&chunked),
                Some(StreamBody::new(stalled)),
                false,
                wait,
                &mut written,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ClientStalled { .. }), "{e:?}");
        assert!(started.elapsed() < wait * 4, "{:?}", started.elapsed());
    }

    /// A client's `100-continue` is the destination's to answer: the body
    /// goes after its `100`, or not at all after a final answer, or after
    /// the wait when it sends neither.
    #[tokio::test]
    async fn the_body_waits_for_the_destinations_continue() {
        use std::sync::atomic::AtomicBool;
        #[derive(Clone, Copy, PartialEq)]
        enum Origin {
            Continues,
            Refuses,
            Silent,
        }
        // The origin's time of its `100` (or of the head's arrival when it
        // sends none), to hold the body's first read against.
        async fn origin(
            how: Origin,
            at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
        ) -> std::net::SocketAddr {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut got = Vec::new();
                let mut b = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    assert_ne!(n, 0);
                    got.extend_from_slice(&b[..n]);
                }
                let head = String::from_utf8_lossy(&got).to_string();
                assert!(head.contains("\r\nexpect: 100-continue\r\n"), "{head}");
                *at.lock().unwrap() = Some(std::time::Instant::now());
                match how {
                    Origin::Refuses => {
                        s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
                            .await
                            .unwrap();
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        return;
                    }
                    Origin::Continues => {
                        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap()
                    }
                    Origin::Silent => {}
                }
                // The chunked body `abc` and its end.
                while !got.ends_with(b"0\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    assert_ne!(n, 0);
                    got.extend_from_slice(&b[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            });
            addr
        }
        let wait = std::time::Duration::from_millis(400);
        for how in [Origin::Continues, Origin::Refuses, Origin::Silent] {
            let at = Arc::new(std::sync::Mutex::new(None));
            let conn = Conn::new(
                TcpStream::connect(origin(how, at.clone()).await)
                    .await
                    .unwrap(),
            );
            let polled = Arc::new(AtomicBool::new(false));
            let body = {
                let (polled, at) = (polled.clone(), at.clone());
                futures_util::stream::once(Box::pin(async move {
                    polled.store(true, Ordering::Relaxed);
                    let since = at.lock().unwrap().expect("the head went first").elapsed();
                    // Without the `100`, the body goes at the wait's end.
                    if how == Origin::Silent {
                        assert!(
                            since >= wait.min(CONTINUE_WAIT) - std::time::Duration::from_millis(50),
                            "{since:?}"
                        );
                    }
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc")))
                }))
            };
            let mut head = get(Method::POST);
            head.headers.remove(header::CONTENT_LENGTH);
            let mut written = Went::default();
            let (resp, mut resp_body) = conn
                .exchange(
                    &head,
                    &fields_of(&head),
                    Some(StreamBody::new(body)),
                    true,
                    wait,
                    &mut written,
                )
                .await
                .map(joined)
                .unwrap();
            match how {
                Origin::Refuses => {
                    assert_eq!(resp.status(), 401);
                    assert_eq!(all(&mut resp_body).await.unwrap(), b"no");
                    assert!(!polled.load(Ordering::Relaxed), "the body was read");
                    assert!(resp_body.take_conn().is_none(), "a length it did not get");
                }
                _ => {
                    assert_eq!(resp.status(), 200);
                    assert_eq!(all(&mut resp_body).await.unwrap(), b"ok");
                    assert!(polled.load(Ordering::Relaxed));
                }
            }
        }
    }

    #[tokio::test]
    async fn an_early_answer_stops_the_upload() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await.unwrap();
            s.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig!")
                .await
                .unwrap();
            // Keeps the connection open, reading nothing more.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let mut head = get(Method::PUT);
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("67108864"));
        // 64 MiB that the origin never reads: without the early answer the
        // upload would wait for ever.
        let big = Full::new(Bytes::from(vec![b'x'; 64 << 20]));
        let mut written = Went::default();
        let (resp, mut body) = tokio::time::timeout(
            std::time::Duration::from_secs(3),
            conn.exchange(
                &head,
                &fields_of(&head),
                Some(big),
                false,
                WAIT,
                &mut written,
            ),
        )
        .await
        .expect("the answer came before the body went out")
        .map(joined)
        .unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(all(&mut body).await.unwrap(), b"big!");
        assert!(body.take_conn().is_none(), "half a request is in it");
    }

    #[tokio::test]
    async fn an_answer_to_a_head_it_could_not_take_is_read_after_the_write_fails() {
        // A destination that reads a little of a head too large for it,
        // answers 431 and closes (a reset: the rest is unread).
        let l = tokio::net::TcpSocket::new_v4().unwrap();
        l.set_recv_buffer_size(4 << 10).unwrap();
        l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = l.listen(8).unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
                .await
                .unwrap();
        });
        let io = tokio::net::TcpSocket::new_v4().unwrap();
        io.set_send_buffer_size(4 << 10).unwrap();
        let conn = Conn::new(io.connect(addr).await.unwrap());
        let mut head = get(Method::GET);
        // 16 MiB of head: more than the two sockets' buffers hold, so the
        // write is under way when the reset comes.
        let big = HeaderValue::from_str(&"x".repeat(16 << 20)).unwrap();
        head.headers.insert("x-big", big);
        let (resp, mut body) =
            tokio::time::timeout(std::time::Duration::from_secs(5), send(conn, &head))
                .await
                .expect("the answer came")
                .unwrap();
        assert_eq!(resp.status(), 431);
        assert_eq!(all(&mut body).await.unwrap(), b"big");
        assert!(body.take_conn().is_none(), "part of a request is in it");
    }

    #[tokio::test]
    async fn a_head_trickled_in_is_parsed_when_it_may_have_ended() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let head = format!(
            "HTTP/1.1 200 OK\r\nx-long: {}\r\nContent-Length: 2\r\n\r\nok",
            "a".repeat(60 << 10)
        );
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b).await.unwrap();
            // In 256 pieces, each its own segment.
            for piece in head.as_bytes().chunks(head.len().div_ceil(256)) {
                s.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        });
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let head = get(Method::GET);
        PARSES.with(|n| n.set(0));
        let (resp, mut body) = send(conn, &head).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(all(&mut body).await.unwrap(), b"ok");
        // Once at its first piece, once when its empty line came: not at
        // each of the reads between (a parse over all of it each time).
        let parses = PARSES.with(|n| n.get());
        assert!(parses <= 3, "{parses} parses");
    }

    /// Decodes `wire` as a chunked body fed in pieces cut at `cuts`: the
    /// body, and what is left in the buffer after it.
    fn dechunk_in_pieces(wire: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut body =
            ResponseBody::from_buffer(BytesMut::new(), Decoder::Chunked(Chunked::Size(0)));
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts = cuts.iter().copied().chain([wire.len()]);
        loop {
            match body.decode()? {
                Some(Some(d)) => out.extend_from_slice(&d),
                Some(None) => return Ok((out, body.buf.to_vec())),
                None => {
                    let next = cuts.next().ok_or(Error::Incomplete)?.clamp(at, wire.len());
                    body.buf.extend_from_slice(&wire[at..next]);
                    at = next;
                }
            }
        }
    }

    /// A chunk-size or trailer line that comes a byte at a time is looked
    /// over once, not again from its start at each byte.
    #[test]
    fn a_line_trickled_in_is_searched_once() {
        let long = "a".repeat(20_000);
        for wire in [
            format!("3\r\nabc\r\n0\r\nX-T: {long}\r\n\r\n"),
            // (a chunk-size line is at most 4 KiB)
            format!("3;ext={}\r\nabc\r\n0\r\n\r\n", &long[..4000]),
        ] {
            let cuts: Vec<usize> = (1..wire.len()).collect();
            LOOKED.with(|n| n.set(0));
            let (body, _) = dechunk_in_pieces(wire.as_bytes(), &cuts).unwrap();
            assert_eq!(body, b"abc");
            let looked = LOOKED.with(|n| n.get());
            assert!(looked < 3 * wire.len(), "{looked} bytes looked at");
        }
    }

    proptest::proptest! {
        /// Any body, chunked at any sizes (with extensions and trailers),
        /// arriving cut at any points, decodes to itself and stops at the
        /// message's end (the next message's bytes stay).
        #[test]
        fn chunked_bodies_decode_whole_however_they_arrive(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..8),
            extension in proptest::prelude::any::<bool>(),
            trailers in proptest::prelude::any::<bool>(),
            mut cuts in proptest::collection::vec(0usize..4000, 0..12),
        ) {
            let mut wire = Vec::new();
            let mut rest = &data[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, after) = rest.split_at((*size).min(rest.len()));
                wire.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
                if extension {
                    wire.extend_from_slice(b" ;name=\"v\"");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                rest = after;
            }
            wire.extend_from_slice(b"0\r\n");
            if trailers {
                wire.extend_from_slice(b"X-Sum: 1\r\nX-Other: 2\r\n");
            }
            wire.extend_from_slice(b"\r\nNEXT");
            cuts.sort_unstable();
            let (body, left) = dechunk_in_pieces(&wire, &cuts).unwrap();
            proptest::prop_assert_eq!(body, data);
            // Only bytes fed past the end are left, untouched.
            proptest::prop_assert!(b"NEXT".starts_with(&left), "{:?}", left);
        }
    }

    /// Heads with more fields than the spans keep in place keep them all,
    /// in order, up to the most a head may have.
    #[test]
    fn many_fields_are_all_kept_in_order() {
        for count in [0, 1, 2, 24, MAX_HEADERS] {
            let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..count {
                wire.extend_from_slice(format!("x-{}: v{i}\r\n", i % 7).as_bytes());
            }
            wire.extend_from_slice(b"\r\nbody");
            let mut buf = BytesMut::from(&wire[..]);
            let Ok(Some(Head::Final((_, headers, _, _)))) = parse_head(&mut buf) else {
                panic!("{count} fields not parsed");
            };
            let headers = Fields::Wire(headers).into_map();
            assert_eq!(&buf[..], b"body");
            assert_eq!(headers.len(), count);
            for k in 0..7 {
                let got: Vec<&str> = headers
                    .get_all(format!("x-{k}"))
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                let want: Vec<String> = (k..count).step_by(7).map(|i| format!("v{i}")).collect();
                assert_eq!(got, want, "{count} fields, x-{k}");
            }
        }
    }

    /// What `Spans::header_map` relies on: a value httparse accepts is a
    /// valid `HeaderValue`, for every byte, wherever it falls in a value
    /// (short values are checked a byte at a time, long ones 8, 16 or 32
    /// at a time); and it accepts every byte a `HeaderValue` may hold.
    #[test]
    fn parsed_values_are_header_values() {
        for b in (0..=255u8).filter(|b| !matches!(b, b'\r' | b'\n')) {
            let valid = HeaderValue::from_bytes(&[b'a', b]).is_ok();
            for (len, at) in [(2, 1), (20, 9), (64, 5), (64, 40), (100, 99)] {
                let mut value = vec![b'a'; len];
                value[at] = b;
                let mut wire = b"HTTP/1.1 200 OK\r\nx-a: ".to_vec();
                wire.extend_from_slice(&value);
                wire.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
                let mut buf = BytesMut::from(&wire[..]);
                let parsed = matches!(parse_head(&mut buf), Ok(Some(Head::Final(_))));
                assert_eq!(parsed, valid, "response, byte {b:#04x} at {at} of {len}");
                let mut wire = b"GET http://a/ HTTP/1.1\r\nx-a: ".to_vec();
                wire.extend_from_slice(&value);
                wire.extend_from_slice(b"\r\n\r\n");
                let mut buf = BytesMut::from(&wire[..]);
                let taken = crate::fast::take_for_tests(&mut buf);
                assert_eq!(taken, valid, "request, byte {b:#04x} at {at} of {len}");
            }
        }
    }

    #[test]
    fn the_fuzzing_entry_reads_responses() {
        for (data, head) in [
            (&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..], false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort", false),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", true),
            (b"HTTP/1.0 200 OK\r\n\r\nto the close", false),
            (b"\x00\xff", false),
        ] {
            read_response_for_fuzzing(data, head);
        }
    }

    #[test]
    fn numbers() {
        let mut out = Vec::new();
        encode_content_length(&mut out, 42);
        assert_eq!(out, b"content-length: 42\r\n");
        // Digits only, in range.
        assert_eq!(decimal::<u16>(b"007"), Some(7));
        assert_eq!(decimal::<u16>(b"65535"), Some(65535));
        for bad in [
            &b""[..],
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"65536",
            b"0x1",
            b"\xd9\xa3",
        ] {
            assert_eq!(decimal::<u16>(bad), None, "{bad:?}");
        }
        assert_eq!(decimal::<u64>(b"18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn an_http_1_0_response_with_transfer_encoding_is_faulty() {
        let wire = crate::fields::wire_for_tests(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
        ]);
        let got = framing(&Method::GET, StatusCode::OK, Version::HTTP_10, wire.iter());
        assert!(matches!(got, Err(Error::Malformed(_))), "{got:?}");
        // Without a body to frame, nothing to get wrong.
        let got = framing(&Method::HEAD, StatusCode::OK, Version::HTTP_10, wire.iter());
        assert_eq!(got.unwrap().framing, Framing::Empty);
        let got = framing(&Method::GET, StatusCode::OK, Version::HTTP_11, wire.iter());
        assert_eq!(got.unwrap().framing, Framing::Chunked);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a").unwrap(), 26);
        assert_eq!(chunk_size(b"A;name=value").unwrap(), 10);
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"x").is_err());
        assert!(chunk_size(b"1 ;x").is_ok(), "BWS before an extension");
        assert!(chunk_size(b"1 2").is_err());
        assert!(
            chunk_size(b"11111111111111111").is_err(),
            "more than 64 bits"
        );
        // Leading zeros are no size, however many.
        assert_eq!(chunk_size(b"00000000000000005").unwrap(), 5);
        assert_eq!(chunk_size(b"000000000000000000").unwrap(), 0);
        assert!(chunk_size(b"0011111111111111111").is_err());
        assert!(chunk_size(b"-1").is_err());
        // Only spaces and tabs before an extension; no control bytes in it.
        assert!(chunk_size(b"5\t;x").is_ok());
        assert!(chunk_size(b"5\r;x").is_err());
        assert!(chunk_size(b"5\n;").is_err());
        assert!(chunk_size(b"5\x0c;x").is_err());
        assert!(chunk_size(b"5;x\ny").is_err());
        assert!(chunk_size(b"5;x=\"a\tb\"").is_ok());
    }

    /// A body of frames given one at a time, `Pending` where a step is
    /// `None` (each once), then ended or failed.
    struct Steps {
        steps: std::collections::VecDeque<Option<Result<Frame<Bytes>, BoxError>>>,
    }

    impl Body for Steps {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.steps.pop_front() {
                None => Poll::Ready(None),
                Some(None) => Poll::Pending,
                Some(Some(step)) => Poll::Ready(Some(step)),
            }
        }
    }

    fn data(text: &str) -> Option<Result<Frame<Bytes>, BoxError>> {
        Some(Ok(Frame::data(Bytes::copy_from_slice(text.as_bytes()))))
    }

    /// Small frames that come at once are joined into one write, up to
    /// `JOIN_UP_TO`, until a yield brings nothing; a frame alone, or a
    /// large one, is not copied; what follows them (more later, the end,
    /// the client's failure) is said after them.
    #[tokio::test]
    async fn small_frames_that_come_at_once_are_joined() {
        let first = || Bytes::from_static(b"a");
        // (One `Pending` is waited out with a yield; two end the joining.)
        let mut body = Steps {
            steps: [data("b"), None, data("c"), None, None, data("d")].into(),
        };
        let (joined, after) = join_ready(&mut body, first()).await;
        assert_eq!(&joined[..], b"abc");
        assert!(matches!(after, After::More));
        let (joined, after) = join_ready(&mut body, first()).await;
        assert_eq!(&joined[..], b"ad");
        assert!(matches!(after, After::Ended));
        let trailers = Some(Ok(Frame::trailers(HeaderMap::new())));
        let mut body = Steps {
            steps: [trailers, Some(Err("cut".into()))].into(),
        };
        let a = first();
        let at = a.as_ptr();
        let (alone, after) = join_ready(&mut body, a).await;
        assert_eq!(alone.as_ptr(), at, "copied");
        assert!(matches!(after, After::Failed(_)));
        let mut body = Steps {
            steps: (0..JOIN_UP_TO * 2).map(|_| data("x")).collect(),
        };
        let (joined, after) = join_ready(&mut body, first()).await;
        assert_eq!(joined.len(), JOIN_UP_TO);
        assert!(matches!(after, After::More));
        // A large frame goes as it is, the next not waited for.
        let large = Bytes::from(vec![7u8; JOIN_BELOW]);
        let at = large.as_ptr();
        let (alone, after) = join_ready(&mut body, large).await;
        assert_eq!((alone.as_ptr(), alone.len()), (at, JOIN_BELOW));
        assert!(matches!(after, After::More));
    }
}
