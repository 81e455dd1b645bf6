//! The client side's fast path: the requests most clients of a rotating
//! proxy send — an absolute-form `http://` request over HTTP/1.1 with no
//! body or a small one of known length — read, parsed once (`httparse`)
//! and answered on the connection's own task, with one buffer for the
//! connection and no timer armed per request.
//!
//! Anything else — CONNECT, an upgrade, `Expect`, a chunked upload or a
//! large one, HTTP/1.0, a malformed or oversized head — is not this path's:
//! the connection, with every byte read so far, is handed to hyper's server
//! (see [`Rewind`]), which serves it from there as before, errors included.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Either, Empty, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub use rotor_protocol::Rewind;

use crate::fields::{Fields, Spans, Wire};
use crate::h1::{write_data, MAX_HEADERS};
use crate::idle::Activity;
use crate::proxy::{Answer, Proxy, ProxyBody};

/// A client connection as the fast path serves it.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin {
    /// Whether dropping the connection ends it properly (a plain socket:
    /// the close sends the FIN after what was written), so no shutdown is
    /// needed first.
    fn closes_on_drop(&self) -> bool {
        false
    }
}

/// The largest request body the fast path reads whole before forwarding
/// (larger ones stream through hyper's server).
const SMALL_BODY: usize = 64 * 1024;

/// What the fast path needs of its connection.
pub struct Conn {
    pub proxy: Arc<Proxy>,
    pub client: SocketAddr,
    /// Bytes moving on the connection (the idle watch).
    pub activity: Activity,
    pub idle_timeout: Duration,
    /// A head must arrive whole this long after its first byte.
    pub header_timeout: Duration,
    /// A head not complete in this many bytes is not this path's.
    pub max_head: usize,
    /// The worker is draining.
    pub stop: CancellationToken,
    /// How long a draining connection waits for its next request.
    pub grace: Duration,
    /// Over TLS: when the first request's head must be whole (the later of
    /// `header_timeout` and `idle_timeout` after the accept, the handshake
    /// counted in). As bytes below
    /// TLS (a record trickled a byte at a time) keep the idle watch awake
    /// without one byte of a request, each wait for a request over TLS has
    /// a timer of its own: `idle_timeout` at most.
    pub tls_first_head_due: Option<tokio::time::Instant>,
    /// The connection came through a front that routes by connection
    /// (`--proxy-protocol-from`): a 407 closes the connection, so the
    /// client's retry with its credentials is a new one, which the front
    /// routes by its user name (a session's host). Kept open, the retry
    /// went where the nameless first request had been sent.
    pub fronted: bool,
}

/// How the fast path left a connection.
pub enum Outcome<I> {
    /// Closed (by the client, for silence, after `Connection: close`, on
    /// an error, or drained).
    Closed,
    /// Answered with `Connection: close` at the drain's word, not the
    /// client's: closed lingering (see `server::linger_close_for`), as
    /// the client may have sent its next request before it read that.
    Drained(I),
    /// A request this path does not serve is next: hyper's server takes
    /// the connection, the bytes read of it first, and whether this path
    /// served a request on it before (a CONNECT then is on a kept-alive
    /// connection: see `proxy::KeptAlive`).
    Handover(Rewind<I>, bool),
}

/// What was made of the bytes at the start of the buffer. (Returned once
/// per request and taken apart at once: boxing the request would cost an
/// allocation each.)
#[allow(clippy::large_enum_variant)]
enum Take {
    /// Not a whole head yet.
    Partial,
    /// A request for hyper's server.
    NotMine,
    /// A head no path serves, refused here with the reason: handed to
    /// hyper's server, it answered a bare 431 or 400, or closed with no
    /// word (see `take_request`).
    Refused(crate::error::ProxyError),
    /// A whole head refused here, as [`Take::Refused`], with its request
    /// for its line in the access log.
    RefusedRequest(crate::error::ProxyError, Box<http::request::Parts>),
    Request {
        parts: http::request::Parts,
        fields: Wire,
        body: usize,
        close: bool,
    },
}

/// Serves requests on `io` until it closes or a request that is not the
/// fast path's is next.
pub async fn serve<I>(mut io: I, conn: &Conn) -> Outcome<I>
where
    I: ClientStream,
{
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(512);
    // One idle watch and one drain watch for the connection's life: no
    // timer per request.
    let idle = conn.activity.idle_for(conn.idle_timeout);
    let stopped = conn.stop.cancelled();
    tokio::pin!(idle, stopped);
    // Once draining: when a request still coming must be whole (the
    // drain's grace), whatever the header timeout leaves it.
    let mut drain_due: Option<tokio::time::Instant> = None;
    let tls = conn.tls_first_head_due.is_some();
    let mut first_head_due = conn.tls_first_head_due;
    let mut served = false;
    loop {
        // A whole head, taken off the buffer, within the header timeout
        // from its first byte (over TLS, the first from the accept).
        let mut first_byte = first_head_due.take();
        // When the head's first bytes came (over TLS the deadline above
        // is not counted from them).
        let mut head_began: Option<tokio::time::Instant> = None;
        // How much of `buf` a parse found no whole head in: a head that
        // comes in pieces is parsed again only once an empty line may
        // have come (a byte at a time, each parse of the whole head made
        // a 64 KiB one cost gigabytes of scanning).
        let mut scanned = 0;
        let (mut parts, fields, body_len, close) = loop {
            // Empty lines before a request line are ignored (RFC 9112
            // §2.2): a client's stray CRLF after a body is no head begun
            // (it was answered 408 at the header timeout).
            if matches!(buf.first(), Some(b'\r' | b'\n')) {
                let n = buf
                    .iter()
                    .take_while(|b| matches!(b, b'\r' | b'\n'))
                    .count();
                buf.advance(n);
                scanned = 0;
            }
            if !buf.is_empty() && !head_may_end(&buf, scanned, conn.max_head) {
                // Looked at: the next look starts past these bytes.
                scanned = buf.len();
            } else if !buf.is_empty() {
                match take_request(&mut buf, conn.max_head) {
                    Take::Request {
                        parts,
                        fields,
                        body,
                        close,
                    } => break (parts, fields, body, close),
                    Take::NotMine => {
                        return Outcome::Handover(Rewind::new(buf.freeze(), io), served)
                    }
                    Take::Refused(e) => {
                        let began = head_began.unwrap_or_else(tokio::time::Instant::now);
                        return refuse(io, &mut out, conn, (None, began), &e, true).await;
                    }
                    Take::RefusedRequest(e, parts) => {
                        let began = head_began.unwrap_or_else(tokio::time::Instant::now);
                        let parts = Some(&*parts);
                        return refuse(io, &mut out, conn, (parts, began), &e, true).await;
                    }
                    Take::Partial => scanned = buf.len(),
                }
            }
            buf.reserve(4096);
            let read = match (buf.is_empty(), drain_due.is_some()) {
                // Over TLS, a timer of its own (see `tls_first_head_due`).
                (true, false) if tls => {
                    let idle = tokio::time::Instant::now() + conn.idle_timeout;
                    let due = first_byte.map_or(idle, |head| head.min(idle));
                    tokio::select! {
                        biased;
                        r = tokio::time::timeout_at(due, io.read_buf(&mut buf)) => match r {
                            Ok(r) => r,
                            Err(_) => {
                                tracing::debug!("no request over TLS in time; closed");
                                return Outcome::Closed;
                            }
                        },
                        _ = &mut stopped => {
                            drain_due = Some(tokio::time::Instant::now() + conn.grace);
                            continue;
                        }
                    }
                }
                (true, false) => tokio::select! {
                    biased;
                    r = io.read_buf(&mut buf) => r,
                    _ = &mut idle => return Outcome::Closed,
                    _ = &mut stopped => {
                        // HAProxy's idle-close-on-response, as hyper's
                        // path does: the next request, if it comes soon,
                        // is served and answered `Connection: close`.
                        drain_due = Some(tokio::time::Instant::now() + conn.grace);
                        continue;
                    }
                },
                (true, true) => {
                    match tokio::time::timeout(conn.grace, io.read_buf(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => return Outcome::Closed,
                    }
                }
                // Part of a head: the rest within the header timeout, and
                // once draining, within the drain's grace (a head half
                // sent held the stop up to the header timeout).
                (false, _) => {
                    let began = *head_began.get_or_insert_with(tokio::time::Instant::now);
                    let due = *first_byte.get_or_insert(began + conn.header_timeout);
                    // (A head begun late in the grace has the grace from
                    // its first byte: cut mid-way it would go unanswered.
                    // From its first byte, not from the deadline: a TLS
                    // connection's first one is counted from the accept,
                    // and a half-sent head held the drain up to it.)
                    let cut = drain_due
                        .map(|d| d.max(began + conn.grace))
                        .filter(|d| *d < due);
                    tokio::select! {
                        biased;
                        r = tokio::time::timeout_at(cut.unwrap_or(due), io.read_buf(&mut buf)) => match r {
                            Ok(r) => r,
                            Err(_) if cut.is_some() => {
                                tracing::debug!("draining: request head not whole in the grace; closed");
                                return Outcome::Closed;
                            }
                            Err(_) => {
                                return too_slow(io, &mut out, conn, None, began).await;
                            }
                        },
                        _ = &mut stopped, if drain_due.is_none() => {
                            drain_due = Some(tokio::time::Instant::now() + conn.grace);
                            continue;
                        }
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        };
        served = true;
        // A small body of known length, read whole, as the head is: within
        // the header timeout (a byte now and then does not hold the slot).
        let mut body_due = None;
        while buf.len() < body_len {
            buf.reserve(body_len - buf.len());
            let due =
                *body_due.get_or_insert_with(|| tokio::time::Instant::now() + conn.header_timeout);
            // The request's start, for its log line should the body not
            // come: its head's first byte (else the head came whole, as
            // the body's wait began).
            let began = head_began.unwrap_or(due - conn.header_timeout);
            let read = tokio::select! {
                biased;
                r = tokio::time::timeout_at(due, io.read_buf(&mut buf)) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        return too_slow(io, &mut out, conn, Some(&parts), began).await;
                    }
                },
                _ = &mut idle => return too_slow(io, &mut out, conn, Some(&parts), began).await,
            };
            match read {
                // Its side shut with the body short (it may still read):
                // told so, as hyper's server tells a longer body's.
                Ok(0) => {
                    let e = crate::error::ProxyError::ClientBody(
                        format!(
                            "the request body ended after {} of its {body_len} bytes",
                            buf.len()
                        )
                        .into(),
                    );
                    return refuse(io, &mut out, conn, (Some(&parts), began), &e, false).await;
                }
                Err(_) => {
                    let gone = (
                        crate::proxy::CLIENT_CLOSED,
                        Some(crate::proxy::CLIENT_CLOSED_ERROR),
                    );
                    conn.proxy
                        .unserved(conn.client, Some(&parts), gone, began.into_std());
                    return Outcome::Closed;
                }
                Ok(_) => {}
            }
        }
        let body = match body_len {
            0 => Either::Left(Empty::new()),
            n => Either::Right(Full::new(buf.split_to(n).freeze())),
        };
        let head = parts.method == Method::HEAD;
        parts.version = Version::HTTP_11;
        // A client that closes (or resets) its connection while its request
        // waits has the request given up, with its upstream connection, as
        // hyper's server does. It is watched once the request has waited
        // `WATCH_CLIENT_AFTER` for its answer (that wait wakes the task
        // then, and says so); a pipelined request's bytes are kept for
        // later, and from then on the client is not read until the answer
        // (as hyper). In a block of its own and matched whole: the
        // request's future alive past it, or a named `Option` of the
        // answer, took 4 KB and 368 bytes in every connection's state,
        // idle ones' too.
        #[allow(clippy::blocks_in_conditions)]
        let resp = match {
            let serving = conn
                .proxy
                .clone()
                .serve(parts, Fields::Wire(fields), body, conn.client);
            // Bytes already read (a pipelined request) end the watch;
            // else the watch reads into the buffer, kept for later.
            crate::h1::unless_gone(serving, |cx| match buf.is_empty() {
                false => Poll::Ready(Ok(buf.len())),
                // (No room reserved: a full buffer makes 64 bytes itself.)
                true => tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut buf),
            })
            .await
        } {
            Some(resp) => resp,
            None => return Outcome::Closed,
        };
        // The wait for the destination was not the client's silence.
        conn.activity.touch();
        // Closed at rotor's word (the drain), not at the client's: it may
        // have sent its next request already.
        // So is a 407 behind a front (see `Conn::fronted`).
        let relogin = relogin(conn.fronted, resp.status);
        let ours = !close && (drain_due.is_some() || conn.stop.is_cancelled() || relogin);
        let close = close || ours;
        let sent = tokio::select! {
            biased;
            r = respond(&mut io, &mut out, resp, head, close, Some(&mut buf)) => r,
            // A client that stops reading, or a destination that stops
            // sending, for the idle timeout: the connection goes.
            _ = &mut idle => Err(io::ErrorKind::TimedOut.into()),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "response not sent whole; connection closed");
            return Outcome::Closed;
        }
        if ours {
            // A close of rotor's (the drain's) after an answer: the end
            // said first (FIN, or TLS's close_notify), then what the
            // client still sends — a request it sent before it read
            // `Connection: close`, pipelined or racing the answer — read
            // and dropped, within the grace. Closed with those bytes
            // unread, the kernel resets the connection, and drops what of
            // the answer it has not sent yet (RFC 9112 §9.6). Done by the
            // connection's task: an await here cost every request.
            return Outcome::Drained(io);
        }
        if close {
            // TLS says goodbye (close_notify); a plain socket's close sends
            // the FIN after what was written, one system call fewer.
            // Bounded: a client that stopped reading leaves no room for
            // the alert, and would hold the connection for ever.
            if !io.closes_on_drop() {
                let _ = tokio::time::timeout(conn.grace, io.shutdown()).await;
            }
            return Outcome::Closed;
        }
        trim(&mut buf, &mut out);
    }
}

/// Whether an answer of `status` closes a connection that came through
/// a front (`fronted`, see `Conn::fronted`): a 407, for the client's
/// retry with credentials to be routed by them. Both paths ask it.
pub(crate) fn relogin(fronted: bool, status: StatusCode) -> bool {
    fronted && status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
}

/// How an HTTP/2 connection begins (RFC 9113 §3.4): its first line.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// The most the drain's lingering close reads and drops.
pub const LINGER_MOST: u64 = 256 * 1024;

/// Tells a client whose request did not come whole within the header
/// timeout so (408, as hyper's path), then closes: within the grace, as a
/// client this slow may not read either. `began`: the request's first
/// byte (its log line's time and duration).
async fn too_slow<I: ClientStream>(
    io: I,
    out: &mut Vec<u8>,
    conn: &Conn,
    parts: Option<&http::request::Parts>,
    began: tokio::time::Instant,
) -> Outcome<I> {
    let e = crate::error::ProxyError::HeadTimeout {
        timeout: conn.header_timeout,
        body: parts.is_some(),
    };
    refuse(io, out, conn, (parts, began), &e, false).await
}

/// Answers `e` to a request refused before it was read whole, counted and
/// logged, and closes; `linger`ing, what the client is still sending is
/// read a moment first (`REFUSAL_LINGER`): a close with it unread is a
/// reset, which can reach the client before the answer.
async fn refuse<I: ClientStream>(
    mut io: I,
    out: &mut Vec<u8>,
    conn: &Conn,
    (parts, began): (Option<&http::request::Parts>, tokio::time::Instant),
    e: &crate::error::ProxyError,
    linger: bool,
) -> Outcome<I> {
    let (status, kind) = e.classify();
    // Its one line at debug, as a served request's (the target made only
    // then: a flood of refusals at info makes none).
    // (The target as the access log writes it: host and port only.)
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (method, target) = parts.map_or(("-", "-".to_string()), |p| {
            let connect = p.method == Method::CONNECT;
            (p.method.as_str(), crate::proxy::log_target(&p.uri, connect))
        });
        tracing::debug!(client = %conn.client, method, target, status = status.as_u16(), error = %e, "request refused");
    }
    conn.proxy.unserved(
        conn.client,
        parts,
        (status.as_u16(), kind),
        began.into_std(),
    );
    let answer = crate::proxy::Answer::from(e);
    let sent = tokio::time::timeout(conn.grace, async {
        respond(&mut io, out, answer, false, true, None).await?;
        match linger {
            true => Ok(()),
            false => io.shutdown().await,
        }
    })
    .await;
    if linger && matches!(sent, Ok(Ok(()))) {
        crate::server::linger_close_for(io, crate::server::REFUSAL_LINGER).await;
    }
    Outcome::Closed
}

/// A large head or body grew a buffer: it goes back to its first size
/// before the connection idles (a kept-alive connection would hold up to
/// 512 KiB for its life). Bytes already read of the next request stay.
fn trim(buf: &mut BytesMut, out: &mut Vec<u8>) {
    if out.capacity() > KEEP_BUFFER {
        *out = Vec::with_capacity(512);
    }
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = BytesMut::with_capacity(4096);
    }
}

/// The most a connection's buffers keep between requests.
const KEEP_BUFFER: usize = 16 * 1024;

/// Whether `buf`, of which the first `scanned` bytes held no whole head,
/// may hold one now: an empty line (`\n\n` or `\n\r\n`) in what came
/// since, or as much as a head may be (then the parse hands it over).
pub(crate) fn head_may_end(buf: &[u8], scanned: usize, max_head: usize) -> bool {
    if scanned == 0 || buf.len() >= max_head {
        return true;
    }
    // From two bytes back: an empty line may straddle the reads.
    let from = scanned.saturating_sub(2);
    buf[from..].iter().enumerate().any(|(i, &b)| {
        b == b'\n' && matches!(&buf[from + i + 1..], [b'\n', ..] | [b'\r', b'\n', ..])
    })
}

/// Why a CONNECT or a WebSocket handshake (an HTTP/1.1 `GET` with
/// `Upgrade: websocket` and `Connection: upgrade`) whose head says content
/// follows (a `Transfer-Encoding`, a `Content-Length` other than 0) is
/// refused, if it is one: here, not by hyper's server, which (its request
/// body dropped unread, taken for the start of the upgrade) mostly closed
/// the connection with the 400 unsent.
fn upgrade_with_content(method: &str, headers: &[httparse::Header<'_>]) -> Option<&'static str> {
    let named = |name: &str, token: &[u8]| {
        headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name) && crate::proxy::names_token(h.value, token))
    };
    let fields = headers.iter().map(|h| (h.name.as_bytes(), h.value));
    match method {
        _ if !crate::proxy::declares_content(fields) => None,
        "CONNECT" => Some(crate::proxy::CONNECT_CONTENT),
        "GET" if crate::proxy::websocket_fields(named) => Some(crate::proxy::WEBSOCKET_CONTENT),
        _ => None,
    }
}

/// The request at the start of `buf`, if it is whole and the fast path's;
/// its head leaves the buffer (its body stays).
fn take_request(buf: &mut BytesMut, max_head: usize) -> Take {
    use crate::error::ProxyError;
    // A request line as long as a whole head may be: 414 (RFC 9112 §3).
    // Handed over, hyper's buffer (as large) filled before its own look
    // at the target, and it answered 431 for what is no header field.
    if buf.len() >= max_head && !buf.contains(&b'\n') {
        return Take::Refused(ProxyError::TargetTooLong { limit: max_head });
    }
    // Left uninitialised, as the response's (h1::parse_head).
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Take::Partial,
        // No whole head within `--max-head-bytes`, or more fields than
        // any path takes (`MAX_HEADERS`, as hyper's server).
        Ok(httparse::Status::Partial) => {
            let (size, limit) = (buf.len(), max_head);
            return Take::Refused(ProxyError::HeadTooLarge { size, limit });
        }
        Err(httparse::Error::TooManyHeaders) => {
            let limit = MAX_HEADERS;
            return Take::Refused(ProxyError::TooManyFields { limit });
        }
        // HTTP/2's preface (hyper's server closed on it with no word, no
        // count and no log line); its first line cut short, read on.
        Err(_) if buf.starts_with(H2_PREFACE) => return Take::Refused(ProxyError::Http2Preface),
        Err(_) if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) => {
            return Take::Partial
        }
        _ => return Take::NotMine,
    };
    // Where the target is, for a request handed to hyper's path (see
    // `not_mine`).
    let target = req
        .path
        .map(|p| (p.as_ptr() as usize - buf.as_ptr() as usize, p.len()));
    // (Looked at only for a request leaving this path: the common ones
    // pay nothing.)
    let refused = |method: &str, path: &str, headers: &[httparse::Header<'_>]| {
        let why = upgrade_with_content(method, headers)?;
        let parts = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).ok()?)
            .uri(Uri::try_from(path).ok()?)
            .body(())
            .ok()?;
        let parts = Box::new(parts.into_parts().0);
        Some(Take::RefusedRequest(
            ProxyError::BadRequest(why.into()),
            parts,
        ))
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        // An HTTP/1.0 CONNECT with content too (hyper's server closed
        // that unanswered as well).
        if let (Some(m @ "CONNECT"), Some(path)) = (req.method, req.path) {
            if let Some(take) = refused(m, path, req.headers) {
                return take;
            }
        }
        return not_mine(buf, target, max_head);
    };
    if method == "CONNECT" || !path.starts_with("http://") {
        return refused(method, path, req.headers).unwrap_or(Take::NotMine);
    }
    let mut body = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = crate::h1::decimal::<usize>(h.value);
            match (n, body) {
                (Some(n), None) if n <= SMALL_BODY => body = Some(n),
                _ => {
                    return refused(method, path, req.headers)
                        .unwrap_or_else(|| not_mine(buf, target, max_head))
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return refused(method, path, req.headers)
                .unwrap_or_else(|| not_mine(buf, target, max_head));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= crate::h1::says_close(h.value);
        }
    }
    let base = buf.as_ptr() as usize;
    let method_at = method.as_ptr() as usize - base;
    let path_at = (path.as_ptr() as usize - base, path.len());
    let method_len = method.len();
    let spans = Spans::of(buf, req.headers);
    let head = buf.split_to(len).freeze();
    let Ok(method) = Method::from_bytes(&head[method_at..method_at + method_len]) else {
        return put_back(buf, head);
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at.0..path_at.0 + path_at.1)) else {
        // Its bytes are gone from the buffer: put them back for hyper.
        put_back(buf, head);
        return not_mine(buf, Some(path_at), max_head);
    };
    let Some(fields) = Wire::new(head.clone(), spans) else {
        return put_back(buf, head);
    };
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    Take::Request {
        parts,
        fields,
        body: body.unwrap_or(0),
        close,
    }
}

/// Takes requests off `data` as the fast path would (for fuzzing): every
/// request it takes is whole, and what it leaves for hyper is exactly the
/// bytes it had not taken (panics otherwise).
#[doc(hidden)]
pub fn take_all_for_fuzzing(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let mut before = buf.clone();
        // (A target `http::Uri` refuses for a character a browser would
        // have encoded goes on encoded: worked out here on its own.)
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        if let Ok(httparse::Status::Complete(_)) =
            req.parse_with_uninit_headers(&before, &mut slots)
        {
            let path = req.path.unwrap_or_default();
            let odd = b"\"<>`{}|\\^";
            if path.starts_with("http://")
                && path.bytes().any(|b| odd.contains(&b))
                && path.parse::<Uri>().is_err()
            {
                let encoded: String = path
                    .chars()
                    .map(|c| match c.is_ascii() && odd.contains(&(c as u8)) {
                        true => format!("%{:02X}", c as u32),
                        false => c.to_string(),
                    })
                    .collect();
                let start = path.as_ptr() as usize - before.as_ptr() as usize;
                let end = start + path.len();
                let mut expected = BytesMut::from(&before[..start]);
                expected.extend_from_slice(encoded.as_bytes());
                expected.extend_from_slice(&before[end..]);
                before = expected;
            }
        }
        match take_request(&mut buf, 8192) {
            Take::Request { body, .. } => {
                assert!(buf.len() < before.len(), "a request took no bytes");
                assert!(before.ends_with(&buf), "bytes after the head changed");
                if body > buf.len() {
                    return;
                }
                buf.advance(body);
            }
            Take::NotMine => {
                assert_eq!(buf, before, "bytes lost on the way to hyper");
                return;
            }
            Take::Partial | Take::Refused(_) | Take::RefusedRequest(..) => {
                assert_eq!(buf, before);
                return;
            }
        }
    }
}

/// Whether the fast path takes the request at the start of `buf` (its
/// fields read).
#[cfg(test)]
pub(crate) fn take_for_tests(buf: &mut BytesMut) -> bool {
    matches!(take_request(buf, 8192), Take::Request { .. })
}

/// What a browser percent-encodes in a URL's path or query (the URL
/// standard's sets, less the space, which ends the target) and
/// `http::Uri` may refuse.
fn encoded_in_targets(b: u8) -> bool {
    matches!(
        b,
        b'"' | b'<' | b'>' | b'`' | b'{' | b'}' | b'|' | b'\\' | b'^'
    )
}

/// The request whose head starts `buf` (whole, its target at `target`)
/// is not this path's: hyper's path gets it. A target with `"`, `<`, `>`
/// or the like that `http::Uri` refuses (curl sends them as typed;
/// hyper's server answered a bare 400) is encoded first, as a browser
/// sends it (the URL standard's percent-encode sets), and the head looked
/// at again, for this path or hyper's; one it takes goes on as sent.
/// (Looked for here, where a request leaves this path, not at each one.)
fn not_mine(buf: &mut BytesMut, target: Option<(usize, usize)>, max_head: usize) -> Take {
    if let Some((at, len)) = target.filter(|&(at, len)| unsafe_target(&buf[at..at + len])) {
        encode_target(buf, at, len);
        return take_request(buf, max_head);
    }
    Take::NotMine
}

/// Whether `path` is an absolute-form target `http::Uri` refuses for a
/// character a browser would have encoded.
fn unsafe_target(path: &[u8]) -> bool {
    path.starts_with(b"http://")
        && path.iter().copied().any(encoded_in_targets)
        && std::str::from_utf8(path).map_or(true, |p| Uri::try_from(p).is_err())
}

/// The target at `at` (`len` bytes) of the head in `buf` with what
/// [`encoded_in_targets`] percent-encoded.
fn encode_target(buf: &mut BytesMut, at: usize, len: usize) {
    let mut out = BytesMut::with_capacity(buf.len() + 2 * len);
    out.extend_from_slice(&buf[..at]);
    for &b in &buf[at..at + len] {
        match encoded_in_targets(b) {
            true => out.extend_from_slice(format!("%{b:02X}").as_bytes()),
            false => out.extend_from_slice(&[b]),
        }
    }
    out.extend_from_slice(&buf[at + len..]);
    *buf = out;
}

/// Puts a head taken off `buf` back in front of it (a rare path: a target
/// or header `httparse` accepts and `http` does not).
fn put_back(buf: &mut BytesMut, head: Bytes) -> Take {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(&head);
    whole.extend_from_slice(buf);
    *buf = whole;
    Take::NotMine
}

/// Writes `resp` to the client: head and (if it is ready) the first of
/// the body in one write, then the rest as it comes. With `watch` (the
/// connection's read buffer), a client that goes while the body stalls
/// ends it (see [`next_frame`]).
async fn respond<I>(
    io: &mut I,
    out: &mut Vec<u8>,
    resp: Answer,
    head_request: bool,
    close: bool,
    mut watch: Option<&mut BytesMut>,
) -> io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Answer {
        status,
        reason,
        fields,
        mut body,
        ..
    } = resp;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match (bodiless, body.size_hint().exact()) {
        (true, _) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Chunked,
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    let reason = reason
        .as_ref()
        .map(|r| r.as_bytes())
        .or_else(|| status.canonical_reason().map(str::as_bytes))
        .unwrap_or(b"");
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    let written = fields.encode(out, true);
    drop(fields);
    if !written.date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) if !written.content_length => {
            crate::h1::encode_content_length(out, n);
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if matches!(framing, Framing::None) {
        // A HEAD response's body, if any, is not sent (its connection went
        // back to the pool already, or is dropped with it).
        drop(body);
        io.write_all(out).await?;
        return io.flush().await;
    }
    // The first piece of the body, if it is there already, goes with the
    // head; a small one is copied (one write instead of two).
    let mut pending = None;
    let mut ended = body.is_end_stream();
    if !ended {
        match futures_now(&mut body) {
            Some(Some(Ok(data))) if data.len() <= 16 * 1024 => {
                chunk(out, &framing, &data);
            }
            Some(Some(Ok(data))) => pending = Some(data),
            // Broken at once (a chunk-size line past its limit, a reset
            // behind the head): the head still goes, and the body ends
            // there, as one broken a moment later does. The client had
            // nothing, not even the status its access line says.
            Some(Some(Err(e))) => {
                io.write_all(out).await?;
                io.flush().await?;
                return Err(io::Error::other(e));
            }
            Some(None) => ended = true,
            None => {}
        }
        ended |= pending.is_none() && body.is_end_stream();
    }
    if ended && matches!(framing, Framing::Chunked) {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    io.write_all(out).await?;
    if let Some(data) = pending {
        write_data(io, data, matches!(framing, Framing::Chunked), |_| ()).await?;
    }
    if !ended {
        // Until the body says it has ended (a length-delimited one need
        // not be polled past its last byte). What was written is flushed
        // before each wait for more: over TLS a write the socket did not
        // take stays in the session's buffer (up to 64 KiB) until the next
        // write or flush, so a destination pausing between bursts held
        // that much back from the client. (A plain socket's flush does
        // nothing.)
        io.flush().await?;
        // Bytes came from the client (a pipelined request): not watched.
        // The client's watch: one timer a response, set again while the
        // body flows (see `next_frame`).
        let mut client = BodyWatch::default();
        while !body.is_end_stream() {
            let frame = match watch.as_deref_mut() {
                Some(buf) => match next_frame(&mut body, io, buf, &mut client).await {
                    Some(frame) => frame,
                    None => {
                        let gone = "the client went away while the body stalled";
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, gone));
                    }
                },
                None => body.frame().await,
            };
            let Some(frame) = frame else {
                break;
            };
            let frame = frame.map_err(io::Error::other)?;
            if let Ok(data) = frame.into_data() {
                if !data.is_empty() {
                    write_data(io, data, matches!(framing, Framing::Chunked), |_| ()).await?;
                    io.flush().await?;
                }
            }
        }
        if matches!(framing, Framing::Chunked) {
            io.write_all(b"0\r\n\r\n").await?;
        }
    }
    io.flush().await
}

/// A response's watch of its client while its body is awaited (see
/// [`next_frame`]).
#[derive(Default)]
struct BodyWatch {
    /// Fires `WATCH_CLIENT_AFTER` after it was set: made at the body's
    /// first wait (boxed: a word in every connection's state, where the
    /// timer inline was about a hundred bytes).
    after: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since it was set.
    came: bool,
    /// The body stalled a whole `WATCH_CLIENT_AFTER`: the client is looked at.
    watching: bool,
    /// Bytes came from the client (a pipelined request): not watched.
    early: bool,
}

/// `body`'s next frame, unless its client goes first (`None`). Once the
/// body has brought no frame for `WATCH_CLIENT_AFTER`, the client is
/// looked at, as in the wait for the answer's head (`h1::unless_gone`):
/// an end of its stream or an error is its going, and the destination's
/// connection goes with it (it was held until the destination wrote
/// again). Bytes from the client (a pipelined request, kept in `buf`)
/// end the watch for the rest of the response. One timer a response, set
/// again when it fires while frames come (a timer a frame was a
/// registration in the wheel for each wait of a streamed body).
async fn next_frame<I>(
    body: &mut ProxyBody,
    io: &mut I,
    buf: &mut BytesMut,
    w: &mut BodyWatch,
) -> Option<Option<Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>>
where
    I: AsyncRead + Unpin,
{
    let mut next = body.frame();
    use std::future::Future;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(frame) = Pin::new(&mut next).poll(cx) {
            w.came = true;
            return Poll::Ready(Some(frame));
        }
        w.early |= !buf.is_empty();
        if w.early {
            return Poll::Pending;
        }
        while !w.watching {
            let after = w.after.get_or_insert_with(|| {
                w.came = false;
                Box::pin(tokio::time::sleep(crate::h1::WATCH_CLIENT_AFTER))
            });
            if after.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match std::mem::take(&mut w.came) {
                // Frames came within it: set again from now.
                true => {
                    let again = tokio::time::Instant::now() + crate::h1::WATCH_CLIENT_AFTER;
                    after.as_mut().reset(again);
                }
                false => w.watching = true,
            }
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(None),
            Poll::Ready(Ok(_)) => {
                w.early = true;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// `data` appended to `out`, in a chunk when the body is chunked.
fn chunk(out: &mut Vec<u8>, framing: &Framing, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    if matches!(framing, Framing::Chunked) {
        out.extend_from_slice(&crate::h1::size_line(data.len()));
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// The next frame of `body` if it is ready now (`None`: not yet).
fn futures_now(
    body: &mut ProxyBody,
) -> Option<Option<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>>> {
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Pending => None,
        Poll::Ready(None) => Some(None),
        Poll::Ready(Some(Err(e))) => Some(Some(Err(e))),
        Poll::Ready(Some(Ok(f))) => Some(Some(Ok(f.into_data().unwrap_or_default()))),
    }
}

/// Today's `Date` value (RFC 9110 §5.6.7), formatted once a second per
/// thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_head_in_pieces_is_parsed_again_only_once_it_may_end() {
        use super::head_may_end;
        let head = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        // Every split of a whole head: once all of it came, it may end.
        for cut in 1..head.len() {
            assert!(head_may_end(&head[..], cut, 65536), "cut at {cut}");
        }
        // Not before its empty line.
        let part = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nX: y";
        assert!(!head_may_end(part, 30, 65536));
        // An empty line straddling two reads is found from where the
        // last look ended.
        let whole = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(head_may_end(whole, whole.len() - 1, 65536));
        assert!(head_may_end(whole, whole.len() - 2, 65536));
        // A fresh buffer is always parsed; so is a full one.
        assert!(head_may_end(part, 0, 65536));
        assert!(head_may_end(part, 30, part.len()));
        // Bare LFs end a head too.
        assert!(head_may_end(
            b"GET http://a/ HTTP/1.1\nHost: a\n\n",
            30,
            65536
        ));
    }

    #[test]
    fn grown_buffers_are_given_back() {
        let mut buf = bytes::BytesMut::with_capacity(128 * 1024);
        let mut out = Vec::with_capacity(512 * 1024);
        buf.extend_from_slice(b"GET");
        super::trim(&mut buf, &mut out);
        assert!(out.capacity() <= super::KEEP_BUFFER);
        assert_eq!(&buf[..], b"GET", "the next request's bytes stay");
        buf.clear();
        super::trim(&mut buf, &mut out);
        assert!(buf.capacity() <= super::KEEP_BUFFER);
    }

    use super::*;

    fn take(text: &str) -> (Take, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        (take_request(&mut buf, 8192), buf)
    }

    #[test]
    fn the_fast_path_takes_only_its_requests() {
        let mine = [
            "GET http://a.test/x?y HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "HEAD http://a.test/ HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n",
        ];
        for text in mine {
            assert!(matches!(take(text).0, Take::Request { .. }), "{text}");
        }
        let (t, rest) = take(mine[1]);
        let Take::Request {
            parts, body, close, ..
        } = t
        else {
            unreachable!()
        };
        assert_eq!((parts.method, body, close), (Method::POST, 3, false));
        assert_eq!(&rest[..], b"abc", "the body stays in the buffer");
        let Take::Request { parts, close, .. } = take(mine[2]).0 else {
            unreachable!()
        };
        assert!(close);
        assert_eq!(parts.uri, "http://a.test/");
        let (Take::Request { parts, fields, .. }, _) = take(mine[0]) else {
            unreachable!()
        };
        assert_eq!(parts.uri.path_and_query().unwrap().as_str(), "/x?y");
        assert_eq!(
            Fields::Wire(fields).get(&http::header::HOST),
            Some(&b"a.test"[..])
        );

        let not_mine = [
            "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET http://a.test/ HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET https://a.test/ HTTP/1.1\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
            "PUT http://a.test/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nX: \x01\r\n\r\n",
            "\x16\x03\x01\x02\x00",
        ];
        for text in not_mine {
            let (t, buf) = take(text);
            assert!(matches!(t, Take::NotMine), "{text:?}");
            assert_eq!(&buf[..], text.as_bytes(), "every byte stays for hyper");
        }
        assert!(matches!(
            take("GET http://a.test/ HTTP/1.1\r\nHo").0,
            Take::Partial
        ));
        // No whole head within the limit: refused here (it went to hyper,
        // whose 431 said no reason), its bytes left as they were.
        let mut big = BytesMut::from(&b"GET http://a.test/ HTTP/1.1\r\nX: "[..]);
        big.extend_from_slice(&[b'a'; 9000]);
        let before = big.clone();
        assert!(matches!(
            take_request(&mut big, 8192),
            Take::Refused(crate::error::ProxyError::HeadTooLarge { .. })
        ));
        assert_eq!(big, before);
    }

    /// `"`, `<`, `>` and the like in a target `http::Uri` refuses are
    /// encoded, for this path and for hyper's (an HTTP/1.0 request,
    /// handed over encoded), the rest of the buffer kept; one it takes
    /// goes on as sent.
    #[test]
    fn quotes_and_angle_brackets_in_a_target_are_encoded() {
        let (t, buf) = take("GET http://a.test/x?q=\"a\"&b=<c>`d HTTP/1.1\r\n\r\nnext");
        let Take::Request { parts, .. } = t else {
            panic!("not taken")
        };
        assert_eq!(parts.uri, "http://a.test/x?q=%22a%22&b=%3Cc%3E%60d");
        assert_eq!(&buf[..], b"next");
        let (t, buf) = take("GET http://a.test/<x> HTTP/1.0\r\n\r\nnext");
        assert!(matches!(t, Take::NotMine));
        assert_eq!(&buf[..], b"GET http://a.test/%3Cx%3E HTTP/1.0\r\n\r\nnext");
        let (t, _) = take("GET http://a.test/x\"y?{z} HTTP/1.1\r\n\r\n");
        let Take::Request { parts, .. } = t else {
            panic!("not taken")
        };
        assert_eq!(parts.uri, "http://a.test/x\"y?{z}");
        take_all_for_fuzzing(b"GET http://a.test/<x>?\"%22\" HTTP/1.0\r\n\r\nGET");
    }

    #[test]
    fn a_head_http_refuses_is_put_back_whole() {
        // httparse takes a target `http::Uri` refuses (a space-free but
        // invalid authority): hyper's server answers it, from every byte.
        let text = "GET http://a b/ HTTP/1.1\r\n\r\n";
        let (t, buf) = take(text);
        assert!(matches!(t, Take::NotMine));
        assert_eq!(&buf[..], text.as_bytes());
        let text = "GET http://[::1/ HTTP/1.1\r\n\r\nnext";
        let (t, buf) = take(text);
        assert!(matches!(t, Take::NotMine));
        assert_eq!(&buf[..], text.as_bytes());
    }

    #[test]
    fn the_fuzzing_entry_holds_its_promises_on_a_mixed_stream() {
        take_all_for_fuzzing(
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n\
              POST http://a/ HTTP/1.1\r\nContent-Length: 2\r\n\r\nxy\
              CONNECT a:1 HTTP/1.1\r\n\r\nrest",
        );
        take_all_for_fuzzing(b"GET http://a/ HTTP/1.1\r\nContent-Length: 9\r\n\r\nshort");
        take_all_for_fuzzing(b"");
    }

    /// The response head gets a `Date` and a length only where the
    /// response has none of its own (its fields a map, or as they came,
    /// in any case).
    #[tokio::test]
    async fn date_and_length_are_added_only_when_missing() {
        for wire in [false, true] {
            date_and_length(wire).await;
        }
    }

    async fn date_and_length(wire: bool) {
        let run = |fields: &'static [(&'static str, &'static str)]| async move {
            let body = Either::Right(Either::Left(Full::new(Bytes::from_static(b"abc"))));
            let mut resp = Answer::from(http::Response::new(body));
            if wire {
                let upper: Vec<(String, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.to_ascii_uppercase(), *v))
                    .collect();
                let upper: Vec<(&str, &str)> =
                    upper.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                resp.fields = Fields::Wire(crate::fields::wire_for_tests(&upper));
            } else {
                resp.fields = Fields::Map(crate::fields::map_for_tests(fields));
            }
            let (mut io, mut out) = (io::Cursor::new(Vec::new()), Vec::new());
            respond(&mut io, &mut out, resp, false, false, None)
                .await
                .unwrap();
            String::from_utf8(io.into_inner())
                .unwrap()
                .to_ascii_lowercase()
        };
        let count = |text: &str, field: &str| text.matches(&format!("\r\n{field}: ")).count();
        let plain = run(&[]).await;
        assert_eq!(
            (count(&plain, "date"), count(&plain, "content-length")),
            (1, 1),
            "{plain}"
        );
        assert!(plain.ends_with("content-length: 3\r\n\r\nabc"), "{plain}");
        let own = run(&[
            ("date", "Tue, 01 Dec 2026 00:00:00 GMT"),
            ("content-length", "3"),
        ])
        .await;
        assert_eq!(
            (count(&own, "date"), count(&own, "content-length")),
            (1, 1),
            "{own}"
        );
        assert!(
            own.contains("date: tue, 01 dec 2026 00:00:00 gmt\r\n"),
            "{own}"
        );
    }

    #[test]
    fn dates() {
        let mut out = Vec::new();
        date(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
    }
}
