//! The PROXY protocol (HAProxy's, versions 1 and 2) on connections from a
//! front proxy (`--proxy-protocol-from`): a load balancer in TCP mode in
//! front of several rotor hosts makes every client arrive from its own
//! address, so the per-client connection limit, the limit on password
//! guesses, the access log and the logs would all see one client. HAProxy
//! (`send-proxy-v2` on a `server` line), nginx's stream module
//! (`proxy_protocol on`), Envoy and the cloud load balancers send the
//! client's address in a header before the client's first byte.
//!
//! Only a peer in the trusted ranges is read this way, and every
//! connection from it must start with a header: anyone else could name any
//! address. The header's bytes, and no more, are taken off the
//! connection (it is peeked first), so what follows — an HTTP request, a
//! TLS hello, a SOCKS5 greeting — is served as from the client.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::acl::Cidr;

/// The longest header taken: version 1's are at most 107 bytes; version
/// 2's carry TLVs after the addresses (HAProxy's are a few dozen bytes:
/// a unique id, the TLS version and cipher), and the specification asks a
/// receiver for 536 at least. A longer one closes the connection.
pub const MAX_HEADER: usize = 1024;

/// How soon a header that came in part is looked at again, at first (a
/// front proxy writes it whole, in one segment: this is the rare split);
/// doubling to [`PART_AGAIN_MOST`]. A peek cannot wait for more bytes
/// than those there, nor see a close behind them.
const PART_AGAIN: Duration = Duration::from_millis(2);
const PART_AGAIN_MOST: Duration = Duration::from_millis(64);

/// How long the rest of a header begun may take: it is written at once,
/// and one cut short (a front that stalled or closed part-way) is not
/// looked at for the whole `--header-read-timeout`.
const PART_WITHIN: Duration = Duration::from_secs(1);

/// The peers whose connections start with a PROXY protocol header.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    pub fn new(ranges: Vec<Cidr>) -> Trusted {
        Trusted(ranges)
    }

    /// Whether a connection from `peer` starts with a header.
    pub fn covers(&self, peer: IpAddr) -> bool {
        !self.0.is_empty() && self.0.iter().any(|c| c.contains(peer.to_canonical()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a trusted peer's connection was closed before it was served.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("closed before its PROXY protocol header was whole")]
    Closed,
    #[error("a PROXY protocol header begun was not whole within {PART_WITHIN:?}")]
    Cut,
    #[error("not a PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// A connection whose next bytes can be looked at without taking them.
pub trait Peek: AsyncRead + Unpin + Send {
    /// Waits for bytes and copies those there into `buf`, leaving them
    /// to be read.
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a;
}

impl Peek for tokio::net::TcpStream {
    fn peek<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        tokio::net::TcpStream::peek(self, buf)
    }
}

/// Takes the header off `io`, within `within`: the client's address it
/// names, or `None` when it names none (a version 2 `LOCAL` — the front
/// proxy's own health check — or `UNKNOWN`, `UNSPEC`, a Unix socket): the
/// connection is then the peer's own.
pub async fn read_header<S: Peek>(
    io: &mut S,
    within: Duration,
) -> Result<Option<SocketAddr>, HeaderError> {
    tokio::time::timeout(within, take(io))
        .await
        .map_err(|_| HeaderError::Timeout(within))?
}

async fn take<S: Peek>(io: &mut S) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut seen = 0;
    let mut again = PART_AGAIN;
    let mut begun = None;
    loop {
        let n = io.peek(&mut buf).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let header = HeaderResult::parse(&buf[..n]);
        if header.is_incomplete() {
            if n == buf.len() {
                return Err(HeaderError::TooLong);
            }
            // A peek returns at once while bytes wait, however few: wait
            // a moment for the rest rather than spin on them.
            let begun = *begun.get_or_insert_with(tokio::time::Instant::now);
            if begun.elapsed() >= PART_WITHIN {
                return Err(HeaderError::Cut);
            }
            if n == seen {
                tokio::time::sleep(again).await;
                again = (again * 2).min(PART_AGAIN_MOST);
            } else {
                again = PART_AGAIN;
            }
            seen = n;
            continue;
        }
        let (len, client) = match header {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_client(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_client(&h)),
            HeaderResult::V1(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
        };
        // Exactly the header's bytes: they are there (peeked), so this
        // read does not wait.
        io.read_exact(&mut buf[..len]).await?;
        return Ok(client.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())));
    }
}

fn v1_client(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(t) => Some((t.source_address, t.source_port).into()),
        v1::Addresses::Tcp6(t) => Some((t.source_address, t.source_port).into()),
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match &h.addresses {
        v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

/// The client a front proxy's connection from `peer` names (its own
/// address for a header that names none), its header taken off `io`
/// within `within`; `None` when the connection is to be closed: no header
/// (said by [`refused`]), or none begun by `grace` after `stop` (a drain
/// lets a header on its way come, as a TLS handshake under way).
pub async fn client_of<S: Peek>(
    io: &mut S,
    peer: SocketAddr,
    within: Duration,
    (stop, grace): (&tokio_util::sync::CancellationToken, Duration),
) -> Option<SocketAddr> {
    let header = Box::pin(read_header(io, within));
    let draining = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await
    };
    let named = tokio::select! {
        r = header => r,
        _ = draining => return None,
    };
    match named {
        Ok(named) => Some(named.unwrap_or(peer)),
        Err(e) => {
            refused(peer, &e);
            None
        }
    }
}

/// A connection from a trusted peer that did not start with a header:
/// a front proxy not set to send one (or not the front proxy at all).
/// Said once in 10 s at warn (it is a setting to fix), else at debug.
fn refused(peer: SocketAddr, e: &HeaderError) {
    static WARNED: crate::Moment = crate::Moment::new();
    match (e, WARNED.first_in(Duration::from_secs(10))) {
        // A peer that connected and left, sent nothing for long, or
        // stalled part-way through, is not a setting to fix.
        (HeaderError::Closed | HeaderError::Timeout(_) | HeaderError::Cut, _) | (_, false) => {
            tracing::debug!(%peer, error = %e, "connection from a --proxy-protocol-from address closed")
        }
        (_, true) => tracing::warn!(
            %peer,
            error = %e,
            "a connection from a --proxy-protocol-from address did not start with a PROXY protocol header; closed (said once in 10 s: is the front proxy sending one, e.g. HAProxy's send-proxy-v2?)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A connected pair: the client side and the accepted side.
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = v2::PROTOCOL_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend(((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend(addresses);
        h.extend(tlvs);
        h
    }

    /// What the server reads after the header, the header taken.
    async fn served(sent: &[&[u8]]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let (mut c, mut s) = pair().await;
        let parts: Vec<Vec<u8>> = sent.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in parts {
                c.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        let got = read_header(&mut s, Duration::from_secs(1)).await;
        writer.await.unwrap();
        let mut rest = Vec::new();
        if got.is_ok() {
            s.read_to_end(&mut rest).await.unwrap();
        }
        (got, rest)
    }

    #[tokio::test]
    async fn a_version_1_header_names_the_client_and_only_it_is_taken() {
        let (got, rest) = served(&[
            b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 8080\r\nGET http://a/ HTTP/1.1\r\n\r\n",
        ])
        .await;
        assert_eq!(got.unwrap(), Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(rest, b"GET http://a/ HTTP/1.1\r\n\r\n");
        let (got, rest) =
            served(&[b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 8080\r\n\x05\x01\x00"]).await;
        assert_eq!(got.unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(rest, b"\x05\x01\x00", "a SOCKS5 greeting after it");
        let (got, _) = served(&[b"PROXY UNKNOWN\r\n"]).await;
        assert_eq!(got.unwrap(), None, "the peer's own");
        // An IPv4-mapped client is its IPv4 address (the limits key it so).
        let (got, _) = served(&[b"PROXY TCP6 ::ffff:198.51.100.9 ::1 1 2\r\n"]).await;
        assert_eq!(got.unwrap(), Some("198.51.100.9:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_version_2_header_with_tlvs_names_the_client_and_local_names_none() {
        // 198.51.100.7:40000 -> 192.0.2.1:8080, and a TLV (unique id).
        let addrs = [198, 51, 100, 7, 192, 0, 2, 1, 0x9c, 0x40, 0x1f, 0x90];
        let tlv = [0x05, 0x00, 0x03, b'a', b'b', b'c'];
        let mut sent = v2(1, 0x11, &addrs, &tlv);
        sent.extend(b"\x16\x03\x01"); // a TLS hello's start
        let (got, rest) = served(&[&sent]).await;
        assert_eq!(got.unwrap(), Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
        let mut a6 = Vec::new();
        a6.extend(
            "2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a6.extend(
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        a6.extend([0x9c, 0x40, 0x1f, 0x90]);
        let (got, _) = served(&[&v2(1, 0x21, &a6, &[])]).await;
        assert_eq!(got.unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));
        // HAProxy's health check: LOCAL, the peer's own address.
        let (got, rest) = served(&[&[v2(0, 0x00, &[], &[]), b"x".to_vec()].concat()]).await;
        assert_eq!(got.unwrap(), None);
        assert_eq!(rest, b"x");
    }

    #[tokio::test]
    async fn a_header_split_over_segments_is_waited_for() {
        let (got, rest) = served(&[b"PROXY TCP4 198.51.", b"100.7 192.0.2.1 1 2\r\nrest"]).await;
        assert_eq!(got.unwrap(), Some("198.51.100.7:1".parse().unwrap()));
        assert_eq!(rest, b"rest");
        let addrs = [198, 51, 100, 7, 192, 0, 2, 1, 0, 1, 0, 2];
        let h = v2(1, 0x11, &addrs, &[]);
        let (got, _) = served(&[&h[..10], &h[10..20], &h[20..]]).await;
        assert_eq!(got.unwrap(), Some("198.51.100.7:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let (got, _) = served(&[b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"]).await;
        assert!(matches!(got, Err(HeaderError::Malformed(_))), "{got:?}");
        let (got, _) = served(&[b"\x05\x01\x00"]).await;
        assert!(matches!(got, Err(HeaderError::Malformed(_))), "{got:?}");
        let (got, _) = served(&[b"PROXY TCP4 nonsense 192.0.2.1 1 2\r\n"]).await;
        assert!(matches!(got, Err(HeaderError::Malformed(_))), "{got:?}");
        // Over the length a version 1 header may have.
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (got, _) = served(&[long.as_bytes()]).await;
        assert!(got.is_err(), "{got:?}");
        // A version 2 header claiming more than is taken.
        let mut big = v2(1, 0x11, &[0; 12], &[]);
        big[14..16].copy_from_slice(&4000u16.to_be_bytes());
        big.resize(MAX_HEADER + 10, 0);
        let (got, _) = served(&[&big]).await;
        assert!(matches!(got, Err(HeaderError::TooLong)), "{got:?}");
        // Closed part-way (a peek still sees the part: a second ends it,
        // not the whole header timeout), and with nothing sent.
        let (mut c, mut s) = pair().await;
        c.write_all(b"PROXY TCP4 1").await.unwrap();
        drop(c);
        let t = tokio::time::Instant::now();
        let got = read_header(&mut s, Duration::from_secs(30)).await;
        assert!(matches!(got, Err(HeaderError::Cut)), "{got:?}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let (got, _) = served(&[]).await;
        assert!(matches!(got, Err(HeaderError::Closed)), "{got:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_at_the_deadline() {
        let (_c, mut s) = pair().await;
        let got = read_header(&mut s, Duration::from_millis(100)).await;
        assert!(matches!(got, Err(HeaderError::Timeout(_))), "{got:?}");
    }

    #[test]
    fn only_the_trusted_ranges_are_read() {
        let t = Trusted::new(vec!["10.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()]);
        assert!(t.covers("10.1.2.3".parse().unwrap()));
        assert!(
            t.covers("::ffff:10.1.2.3".parse().unwrap()),
            "as a dual-stack socket sees it"
        );
        assert!(t.covers("::1".parse().unwrap()));
        assert!(!t.covers("127.0.0.1".parse().unwrap()));
        assert!(!Trusted::default().covers("10.1.2.3".parse().unwrap()));
    }
}
