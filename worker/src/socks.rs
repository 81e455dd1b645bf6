//! SOCKS5 (RFC 1928): CONNECT to an IPv4, IPv6 or domain-name address
//! (names resolved by rotor, so `socks5h` works), through the same leases,
//! destination rules, limits and drain as the HTTP listener. BIND and UDP
//! ASSOCIATE are answered "command not supported".
//!
//! Authentication (RFC 1929): with a users file, username/password is the
//! only method offered, checked against it, the user name carrying the
//! same session parameters as the HTTP proxy's (`USER-session-ID`).
//! Without one, username/password is still taken when the client offers
//! it (for the session parameters; the password is ignored), else no
//! authentication. Written by hand: the protocol is a few fixed fields, and
//! rotor must open its own source-bound upstream socket, which the crates'
//! server loops do for you.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::access::Entry;
use crate::error::ProxyError;
use crate::proxy::Proxy;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_METHOD: u8 = 0xff;

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    Refused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressNotSupported = 8,
}

impl Reply {
    /// What a failed tunnel says, by how it failed.
    pub fn of(e: &ProxyError) -> Reply {
        use ProxyError::*;
        match e {
            // (A user revoked since its login: not allowed now.)
            Denied(_) | Auth(_) => Reply::NotAllowed,
            Connect { source, .. } if crate::error::prohibited(source) => Reply::NotAllowed,
            Dns { .. } | DnsEmpty { .. } => Reply::HostUnreachable,
            Unreachable { source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::ENETDOWN)
                ) =>
            {
                Reply::NetworkUnreachable
            }
            Unreachable { .. } => Reply::HostUnreachable,
            // A destination of a family the pool has none of.
            NoAddress(rotor_protocol::NoAddress::NoFamily { .. }) => Reply::AddressNotSupported,
            Refused { .. } => Reply::Refused,
            DnsTimeout { .. }
            | DnsAgain { .. }
            | ConnectTimeout { .. }
            | ResponseTimeout { .. }
            | WriteTimeout { .. } => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The username and password, when that method was used.
    pub credentials: Option<(String, String)>,
    pub host: String,
    pub port: u16,
}

/// Why a handshake ended without a CONNECT to make.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not SOCKS5 (version {0})")]
    Version(u8),
    #[error("no acceptable authentication method offered")]
    NoMethod,
    #[error("bad username/password subnegotiation")]
    BadAuth,
    #[error("credentials refused")]
    Refused,
    #[error("command {0} not supported")]
    Command(u8),
    #[error("address type {0} not supported")]
    AddressType(u8),
    /// (Logged as address type 3 unsupported, which sent an operator the
    /// wrong way: a name is the type SOCKS5 clients send most.)
    #[error("the destination name is not a host name (letters, digits, '-', '_' and dots, or an IP address)")]
    BadName,
    #[error("port 0 is not a destination")]
    PortZero,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The answer to HTTP sent to a SOCKS5 listener.
const HTTP_ON_SOCKS: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    proxy-status: rotor; error=http_request_error; details=\"HTTP sent to a SOCKS5 port\"\r\n\
    content-type: text/plain\r\ncontent-length: 93\r\nconnection: close\r\n\r\n\
    rotor: this port speaks SOCKS5 (a socks5h:// proxy URL); the request came in HTTP (http://).\n";

/// Reads a greeting, chooses a method (and reads the credentials), and
/// reads the request. Answers what it refuses itself (no method, BIND/UDP,
/// unknown address types); the caller answers the CONNECT.
pub async fn handshake<S>(s: &mut S, auth_required: bool) -> Result<Handshake, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let version = s.read_u8().await?;
    if version != VERSION {
        // Told in its own terms, not just closed: a SOCKS4 client gets
        // "request rejected" (91), an HTTP client pointed at this port a
        // 400 saying so.
        match version {
            4 => s.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await?,
            b'A'..=b'Z' => s.write_all(HTTP_ON_SOCKS).await?,
            _ => {}
        }
        return Err(HandshakeError::Version(version));
    }
    let n = s.read_u8().await? as usize;
    let mut methods = vec![0u8; n];
    s.read_exact(&mut methods).await?;
    let method = if methods.contains(&USER_PASS) {
        USER_PASS
    } else if !auth_required && methods.contains(&NO_AUTH) {
        NO_AUTH
    } else {
        s.write_all(&[VERSION, NO_METHOD]).await?;
        return Err(HandshakeError::NoMethod);
    };
    s.write_all(&[VERSION, method]).await?;
    let credentials = match method {
        USER_PASS => {
            if s.read_u8().await? != 1 {
                // A status before the close (as dante and 3proxy).
                s.write_all(&[1, 1]).await?;
                return Err(HandshakeError::BadAuth);
            }
            // RFC 1929 names bytes; rotor's users file is text: read as
            // UTF-8, else ISO-8859-1, as Basic's (never lossily: different
            // passwords would be one). Without a users file the password
            // is not looked at.
            let user = crate::auth::credential_text(read_bytes(s).await?);
            let password = read_bytes(s).await?;
            match auth_required {
                true => Some((user, crate::auth::credential_text(password))),
                false => Some((user, String::new())),
            }
        }
        _ => None,
    };
    // The subnegotiation's answer comes from the caller, once checked.
    if credentials.is_some() {
        return Ok(Handshake {
            credentials,
            host: String::new(),
            port: 0,
        });
    }
    read_request(s, None).await
}

/// After the credentials were answered: the request.
pub async fn read_request<S>(
    s: &mut S,
    credentials: Option<(String, String)>,
) -> Result<Handshake, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    let [version, command, _, atyp] = head;
    if version != VERSION {
        reply(s, Reply::GeneralFailure, None).await?;
        return Err(HandshakeError::Version(version));
    }
    let host = match atyp {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ok(Ipv4Addr::from(a).to_string())
        }
        3 => read_name(s).await?,
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ok(Ipv6Addr::from(a).to_string())
        }
        other => {
            reply(s, Reply::AddressNotSupported, None).await?;
            return Err(HandshakeError::AddressType(other));
        }
    };
    // The whole request read, the command first (a BIND or UDP ASSOCIATE
    // is unsupported whatever its address), then the name.
    let port = s.read_u16().await?;
    if command != 1 {
        reply(s, Reply::CommandNotSupported, None).await?;
        return Err(HandshakeError::Command(command));
    }
    let host = match host {
        Ok(host) => host,
        Err(e) => {
            reply(s, Reply::GeneralFailure, None).await?;
            return Err(e);
        }
    };
    // Never a destination (the HTTP path refuses it too): connecting to it
    // would only count a failure against a pool address.
    if port == 0 {
        reply(s, Reply::NotAllowed, None).await?;
        return Err(HandshakeError::PortZero);
    }
    Ok(Handshake {
        credentials,
        host,
        port,
    })
}

/// A length byte and that many bytes.
async fn read_bytes<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Vec<u8>> {
    let n = s.read_u8().await? as usize;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    Ok(b)
}

async fn read_string<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<String> {
    Ok(String::from_utf8_lossy(&read_bytes(s).await?).into_owned())
}

/// A domain name: read (the I/O error), then checked (the inner error).
async fn read_name<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Result<String, HandshakeError>> {
    let name = read_string(s).await?;
    Ok(host_name(name).ok_or(HandshakeError::BadName))
}

/// A name a SOCKS5 client sent, as a host: letters, digits, `-`, `_` and
/// dots (a name as HTTP's target carries one, so one site's budget is
/// not dodged by another spelling: the resolvers read `exampl\e.com` as
/// `example.com`; nor a number, see `dns::check_spelling`), or an IP
/// address (bracketed or not; the host is the
/// address unbracketed, as the address types give it). None: empty,
/// longer than any name, or anything else.
fn host_name(name: String) -> Option<String> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(&name);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let hostname = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let spelled = crate::dns::check_spelling(&name).is_ok();
    (!name.is_empty() && name.bytes().all(hostname) && spelled).then_some(name)
}

/// The answer to the request: `code`, and the address bound upstream.
pub async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    code: Reply,
    bound: Option<SocketAddr>,
) -> io::Result<()> {
    let bound = bound.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut out = vec![VERSION, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(a) => {
            out.push(1);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    s.write_all(&out).await
}

/// How long a SOCKS5 password check may take: a wait for the client's
/// own slot and one for argon2's, each up to `VERIFY_WAIT`, and the hash.
const AUTH_BUDGET: Duration = Duration::from_secs(2 * crate::auth::VERIFY_WAIT.as_secs() + 1);

/// Answers a refused login (RFC 1929: status 1), counted and logged as
/// HTTP's answer for `why` is (407, or 503 for a check that could not be
/// made in time): password guesses over SOCKS5 show in the access log too.
async fn refuse_login(
    proxy: &Proxy,
    stream: &mut TcpStream,
    (began, client): (std::time::Instant, SocketAddr),
    why: &ProxyError,
) -> io::Result<()> {
    let nobody = crate::proxy::Caller::default();
    count_refusal(proxy, (began, client, &nobody), why.classify());
    stream.write_all(&[1, 1]).await
}

/// A handshake refused (before any tunnel), counted and logged as HTTP's
/// answer (`status`, `kind`) to the same request would be.
fn count_refusal(
    proxy: &Proxy,
    (began, client, who): (std::time::Instant, SocketAddr, &crate::proxy::Caller),
    (status, kind): (http::StatusCode, Option<&'static str>),
) {
    proxy.meter.error(kind, began.elapsed());
    if let Some(log) = proxy.access_log() {
        let mut en = Entry::new(began, client, method(), "-".into());
        who.stamp(&mut en);
        en.status = status.as_u16();
        en.error = kind;
        log.log(&en);
    }
}

impl HandshakeError {
    /// What HTTP answers the same refusal with (status, `Proxy-Status`
    /// kind); `None` for a handshake that ended without one (the client
    /// left, or was too slow: not a request).
    fn as_http(&self) -> Option<(http::StatusCode, Option<&'static str>)> {
        use http::StatusCode;
        match self {
            // No method offered that the users file allows: HTTP's 407.
            HandshakeError::NoMethod | HandshakeError::BadAuth => {
                Some((StatusCode::PROXY_AUTHENTICATION_REQUIRED, None))
            }
            HandshakeError::Command(_) => Some((StatusCode::NOT_IMPLEMENTED, None)),
            HandshakeError::Version(_)
            | HandshakeError::AddressType(_)
            | HandshakeError::BadName
            | HandshakeError::PortZero => Some((StatusCode::BAD_REQUEST, None)),
            HandshakeError::Refused | HandshakeError::Io(_) => None,
        }
    }
}

/// What the access log names a SOCKS5 tunnel's method.
fn method() -> http::Method {
    http::Method::from_bytes(b"SOCKS5").expect("a token")
}

/// Serves one SOCKS5 client: the handshake within `within` (and the wait
/// for a password check's slot on top), then the tunnel, which holds
/// `held` (its place under the connection limit, and its address's). At
/// `stop`, a handshake is cut after `grace` of silence (from the stop, or
/// from its last bytes if later): one whose bytes go on coming across the
/// grace's end is let finish, as an HTTP head begun in the grace is (a
/// tunnel open by then drains as HTTP's do).
pub async fn serve(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    client: SocketAddr,
    held: crate::server::Held,
    within: Duration,
    stop: CancellationToken,
    grace: Duration,
) {
    let auth_required = proxy.auth_required();
    let began = std::time::Instant::now();
    // The client's bytes within `within` (a slow or silent client is cut
    // off then); the password check, which may wait for two slots (the
    // client's own, then argon2's), has a budget of its own on top, so a
    // busy check is answered, not cut off.
    let start = tokio::time::Instant::now();
    let slow = |_| HandshakeError::Io(io::ErrorKind::TimedOut.into());
    // When the client's bytes last came (see `stopped`).
    let heard = crate::idle::Activity::new();
    // While its password is checked: rotor's wait, not the client's
    // silence.
    let checking = std::sync::atomic::AtomicBool::new(false);
    // Who logged in: a request refused after it is logged as theirs.
    let mut caller = crate::proxy::Caller::default();
    let opened = async {
        let mut noting = crate::idle::IdleIo::new(&mut stream, heard.clone());
        let read = tokio::time::timeout_at(start + within, handshake(&mut noting, auth_required));
        let mut hs = read.await.map_err(slow)??;
        if let Some((user, password)) = hs.credentials.take() {
            let checked_at = tokio::time::Instant::now();
            checking.store(true, std::sync::atomic::Ordering::Relaxed);
            let check = proxy.authenticate_user(&user, &password, client.ip());
            let checked = tokio::time::timeout(AUTH_BUDGET, check).await;
            checking.store(false, std::sync::atomic::Ordering::Relaxed);
            heard.touch();
            let spent = checked_at.elapsed();
            match checked {
                Ok(Ok(c)) => {
                    noting.write_all(&[1, 0]).await?;
                    caller = c;
                }
                refused => {
                    let why = match refused {
                        Ok(Err(e)) => {
                            debug!(%client, error = %e, "SOCKS5 authentication refused");
                            e
                        }
                        _ => {
                            debug!(%client, "SOCKS5 authentication not checked in time; refused");
                            ProxyError::Auth(crate::auth::AuthError::Busy)
                        }
                    };
                    refuse_login(&proxy, &mut stream, (began, client), &why).await?;
                    return Err(HandshakeError::Refused);
                }
            }
            let read =
                tokio::time::timeout_at(start + within + spent, read_request(&mut noting, None));
            hs = read.await.map_err(slow)??;
        }
        Ok::<_, HandshakeError>(hs)
    };
    let stopped = async {
        stop.cancelled().await;
        // `grace` of silence from the stop, or from the client's last
        // bytes if later. (Cut at the grace's end whatever came, a client
        // told to go on by its greeting's answer lost the request it sent
        // next.) A password check under way is no silence: the grace
        // starts again at its end.
        heard.touch();
        loop {
            heard.idle_for(grace).await;
            if !checking.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            heard.touch();
        }
    };
    let opened = tokio::select! {
        r = opened => r,
        () = stopped => {
            debug!(%client, "SOCKS5 handshake not done at the stop; closed");
            return;
        }
    };
    let hs = match opened {
        Ok(x) => x,
        Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
            debug!(%client, "SOCKS5 handshake too slow; closed");
            return;
        }
        Err(e) => {
            debug!(%client, error = %e, "SOCKS5 handshake ended");
            if let Some(answer) = e.as_http() {
                count_refusal(&proxy, (began, client, &caller), answer);
            }
            // Whatever it said after, read: the answer is not lost to a
            // reset.
            crate::server::linger_close(stream).await;
            return;
        }
    };
    // Host and port as the logs write them (an IPv6 address bracketed).
    let dest = match hs.host.contains(':') {
        true => format!("[{}]:{}", hs.host, hs.port),
        false => format!("{}:{}", hs.host, hs.port),
    };
    let started = std::time::Instant::now();
    // A request, as an HTTP one counts (the status line's rate).
    proxy
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entry = proxy.access_log().map(|_| {
        let mut e = Entry::new(started, client, method(), dest.clone());
        caller.stamp(&mut e);
        e
    });
    // Counted and logged however this ends, also dropped at the drain's
    // cut while the tunnel opens.
    let pending = proxy.pending(entry, started);
    // The address it goes out from, once leased (for its line should its
    // client leave as it opens).
    let mut leased = None;
    // A client gone while its tunnel waits has it given up; one that only
    // shut its side is answered (see `h1::unless_gone`). Bytes it sends
    // early are the tunnel's, left unread.
    let opened = crate::h1::unless_gone(
        async {
            let standing = caller.standing.as_ref();
            crate::proxy::still_stands(standing)?;
            let opened = proxy
                .open_tunnel(
                    (&hs.host, hs.port, &dest),
                    caller.sticky.as_ref(),
                    false,
                    &mut leased,
                )
                .await?;
            crate::proxy::still_stands(standing)?;
            Ok(opened)
        },
        |cx| crate::h1::peek_one(&stream, cx),
    )
    .await;
    let entry = pending.answered();
    // A tunnel that did not open: counted, and logged as its HTTP twin.
    let not_opened = |entry: Option<Entry>,
                      (status, kind): (u16, Option<&'static str>),
                      source: Option<std::net::IpAddr>| {
        proxy.meter.error(kind, started.elapsed());
        if let (Some(mut en), Some(log)) = (entry, proxy.access_log()) {
            en.source = source;
            en.status = status;
            en.error = kind;
            log.log(&en);
        }
    };
    let (upstream, lease) = match opened {
        Some(Ok(x)) => x,
        // The client left while its tunnel was opened (a wait for a site's
        // budget, a slow lookup or connect): given up, as over HTTP, with
        // its places and any wait the allocator held for it.
        None => {
            let gone = (
                crate::proxy::CLIENT_CLOSED,
                Some(crate::proxy::CLIENT_CLOSED_ERROR),
            );
            not_opened(entry, gone, leased);
            debug!(%client, %dest, "SOCKS5 client left before its tunnel opened");
            return;
        }
        Some(Err(crate::error::Failed {
            error: e, source, ..
        })) => {
            let (status, kind) = e.classify();
            not_opened(entry, (status.as_u16(), kind), source);
            let code = match Reply::of(&e) {
                // No address of the family the name resolved to: that
                // host cannot be reached, not an address type (8, which
                // clients show as `socks5h` unsupported).
                Reply::AddressNotSupported if hs.host.parse::<IpAddr>().is_err() => {
                    Reply::HostUnreachable
                }
                code => code,
            };
            let ms = started.elapsed().as_millis() as u64;
            crate::proxy::log_failed(&e, (client, &method(), &dest), source, status.as_u16(), ms);
            let _ = reply(&mut stream, code, None).await;
            crate::server::linger_close(stream).await;
            return;
        }
    };
    // The bound address (the leased one) only with --expose-source, as
    // over HTTP; else 0.0.0.0:0, which RFC 1928 clients take.
    let bound = match proxy.exposes_source() {
        true => upstream.local_addr().ok(),
        false => None,
    };
    // A client gone by now (the reply not taken) is counted and logged
    // as one that left (499), as over HTTP: the destination did answer.
    let unopened = proxy.unopened(entry, (lease.ip, &dest), started);
    if let Err(e) = reply(&mut stream, Reply::Succeeded, bound).await {
        debug!(%client, %dest, error = %e, "SOCKS5 client left before the tunnel opened");
        return;
    }
    debug!(%client, %dest, source = %lease.ip, seq = lease.seq, "SOCKS5 tunnel");
    let entry = unopened.opened().map(|(_, e)| e);
    let standing = caller.standing.clone();
    proxy.relay_tunnel(
        stream,
        upstream,
        (client, dest),
        lease,
        (held, standing),
        entry,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(input: &[u8], auth: bool) -> (Result<Handshake, HandshakeError>, Vec<u8>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(input).await.unwrap();
        // The client has said all it will: a short handshake ends in an
        // error, never a wait.
        a.shutdown().await.unwrap();
        let r = handshake(&mut b, auth).await;
        drop(b);
        let mut out = Vec::new();
        a.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn requests_of_each_address_type() {
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80], false).await;
        let h = r.unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, out),
            ("127.0.0.1", 80, vec![5, 0])
        );
        let mut name = vec![5, 1, 0, 5, 1, 0, 3, 11];
        name.extend_from_slice(b"example.com");
        name.extend_from_slice(&[1, 187]);
        assert_eq!(run(&name, false).await.0.unwrap().host, "example.com");
        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 22]);
        assert_eq!(run(&v6, false).await.0.unwrap().host, "::1");
    }

    #[tokio::test]
    async fn methods_credentials_and_refusals() {
        // With a users file, no-auth alone is refused with 0xff.
        let (r, out) = run(&[5, 1, 0], true).await;
        assert!(matches!(r, Err(HandshakeError::NoMethod)) && out == [5, 0xff]);
        // Username/password chosen when offered.
        let mut up = vec![5, 2, 0, 2, 1, 5];
        up.extend_from_slice(b"alice");
        up.push(2);
        up.extend_from_slice(b"pw");
        let (r, out) = run(&up, true).await;
        assert_eq!(r.unwrap().credentials, Some(("alice".into(), "pw".into())));
        assert_eq!(out, [5, 2]);
        // BIND: command not supported.
        let (r, out) = run(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 1], false).await;
        assert!(matches!(r, Err(HandshakeError::Command(2))));
        assert_eq!(
            out[..4],
            [5, 0, 5, Reply::CommandNotSupported as u8],
            "{out:?}"
        );
        // A password that is not UTF-8 is read as ISO-8859-1, a character
        // a byte (never lossily: two such passwords would be one).
        let (r, out) = run(&[5, 1, 2, 1, 1, b'a', 2, b'p', 0xe4], true).await;
        assert_eq!(r.unwrap().credentials, Some(("a".into(), "p\u{e4}".into())));
        assert_eq!(out, [5, 2]);
        // Without a users file the password is not looked at: any bytes
        // pass.
        let (r, out) = run(&[5, 1, 2, 1, 2, b'a', 0xff, 1, 0xff], false).await;
        assert_eq!(
            r.unwrap().credentials,
            Some(("a\u{ff}".into(), String::new()))
        );
        assert_eq!(out, [5, 2]);
        // Port 0: not a destination.
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 0], false).await;
        assert!(matches!(r, Err(HandshakeError::PortZero)), "{r:?}");
        assert_eq!(out[..4], [5, 0, 5, Reply::NotAllowed as u8], "{out:?}");
        // Not SOCKS5 at all: HTTP gets a 400 saying so, SOCKS4 its
        // "rejected" (91), anything else the close.
        let (r, out) = run(b"GET / HTTP/1.1\r\n", false).await;
        assert!(matches!(r, Err(HandshakeError::Version(b'G'))), "{r:?}");
        assert_eq!(out, HTTP_ON_SOCKS);
        let body = &out[out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains(&format!("content-length: {}\r\n", body.len())),
            "{text}"
        );
        let (r, out) = run(&[4, 1, 0, 80, 127, 0, 0, 1, 0], false).await;
        assert!(matches!(r, Err(HandshakeError::Version(4))), "{r:?}");
        assert_eq!(out, [0, 91, 0, 0, 0, 0, 0, 0]);
        let (_, out) = run(&[0x16, 3, 1], false).await;
        assert!(out.is_empty());
        // A truncated handshake is an error, not a hang (the peer closed).
        assert!(run(&[5, 3, 0], false).await.0.is_err());
        // UDP ASSOCIATE with an empty name: the command is what is not
        // supported (0x07; the name was answered 0x01 before the command
        // was read).
        let (r, out) = run(&[5, 1, 0, 5, 3, 0, 3, 0, 0, 0], false).await;
        assert!(matches!(r, Err(HandshakeError::Command(3))), "{r:?}");
        assert_eq!(out[..4], [5, 0, 5, Reply::CommandNotSupported as u8]);
        // A CONNECT to an empty name: a general failure, once all was read.
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80], false).await;
        assert!(matches!(r, Err(HandshakeError::BadName)), "{r:?}");
        assert_eq!(out[..4], [5, 0, 5, Reply::GeneralFailure as u8]);
        // A request of another version, and a subnegotiation of another
        // version: each answered before the close, not just closed.
        let (r, out) = run(&[5, 1, 0, 4, 1, 0, 1, 127, 0, 0, 1, 0, 80], false).await;
        assert!(matches!(r, Err(HandshakeError::Version(4))), "{r:?}");
        assert_eq!(out[..4], [5, 0, 5, Reply::GeneralFailure as u8]);
        let (r, out) = run(&[5, 1, 2, 5, 1, b'a', 1, b'b'], true).await;
        assert!(matches!(r, Err(HandshakeError::BadAuth)), "{r:?}");
        assert_eq!(out, [5, 2, 1, 1]);
    }

    /// A name is a host name's letters, or an IP address: another
    /// spelling the resolvers read as the same name (`\\e` for `e`) is
    /// refused, so it cannot dodge the site's budget; a bracketed address
    /// is the address.
    #[tokio::test]
    async fn names_are_host_names_or_addresses() {
        let name = |n: &str| host_name(n.to_string());
        assert_eq!(
            name("www.Example-1_a.com.").as_deref(),
            Some("www.Example-1_a.com.")
        );
        assert_eq!(name("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(name("[2001:db8::1]").as_deref(), Some("2001:db8::1"));
        assert_eq!(name("2001:db8:0::1").as_deref(), Some("2001:db8::1"));
        for bad in [
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "127.1",
            "",
            "www.exampl\\e.com",
            "exampl\\101.com",
            "a b",
            "a:b",
            "[a]",
            "a%2e",
            // Past any DNS name (255 bytes: what SOCKS5 can carry).
            &[
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(63),
            ]
            .join("."),
        ] {
            assert_eq!(name(bad), None, "{bad:?}");
        }
        let mut req = vec![5, 1, 0, 5, 1, 0, 3, 16];
        req.extend_from_slice(b"www.exampl\\e.com");
        req.extend_from_slice(&[1, 187]);
        let (r, out) = run(&req, false).await;
        assert!(matches!(r, Err(HandshakeError::BadName)), "{r:?}");
        assert_eq!(out[..4], [5, 0, 5, Reply::GeneralFailure as u8]);
    }

    /// A network down is the network's failure (3), as dante answers it; a
    /// host down or unreachable the host's (4).
    #[test]
    fn unreachable_networks_and_hosts_get_their_own_codes() {
        let reply = |errno| {
            let e = ProxyError::from_connect("d:1".into(), io::Error::from_raw_os_error(errno));
            Reply::of(&e) as u8
        };
        assert_eq!(reply(libc::ENETUNREACH), Reply::NetworkUnreachable as u8);
        assert_eq!(reply(libc::ENETDOWN), Reply::NetworkUnreachable as u8);
        assert_eq!(reply(libc::EHOSTUNREACH), Reply::HostUnreachable as u8);
        assert_eq!(reply(libc::EHOSTDOWN), Reply::HostUnreachable as u8);
        assert_eq!(reply(libc::ECONNREFUSED), Reply::Refused as u8);
    }

    #[test]
    fn refusals_are_answered_as_http_would() {
        use http::StatusCode as S;
        let as_http = |e: HandshakeError| e.as_http().map(|(s, _)| s);
        assert_eq!(
            as_http(HandshakeError::NoMethod),
            Some(S::PROXY_AUTHENTICATION_REQUIRED)
        );
        assert_eq!(
            as_http(HandshakeError::Command(2)),
            Some(S::NOT_IMPLEMENTED)
        );
        assert_eq!(as_http(HandshakeError::PortZero), Some(S::BAD_REQUEST));
        // A client that left or was too slow made no request.
        assert_eq!(
            as_http(HandshakeError::Io(io::ErrorKind::TimedOut.into())),
            None
        );
    }

    proptest::proptest! {
        /// Any bytes end the handshake (a request or an error), without a
        /// panic, with or without a users file.
        #[test]
        fn arbitrary_handshakes_end_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            auth in proptest::prelude::any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let r = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), run(&bytes, auth)).await });
            proptest::prop_assert!(r.is_ok(), "the handshake waited");
        }
    }
}
