//! Every way a proxied request can fail, classified once: who is at fault,
//! which status the client gets, and the RFC 9209 `Proxy-Status` error type.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use rotor_protocol::{error_chain, Block, NoAddress};

use crate::lease::LeaseError;

/// The name this proxy gives itself in `Proxy-Status`.
pub const PROXY_NAME: &str = "rotor";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("reading the request body from the client failed")]
    ClientBody(#[source] crate::h1::BoxError),
    #[error("the client sent none of its request body for {timeout:?}")]
    ClientTimeout { timeout: Duration },
    /// A head not whole within `--header-read-timeout` of its first byte,
    /// or (`body`) the small body the fast path reads with it not whole
    /// within as long again after the head.
    #[error("{}", head_timeout_text(*timeout, *body))]
    HeadTimeout { timeout: Duration, body: bool },
    /// A request rotor cannot pass on as asked (RFC 9112 §6.1: a transfer
    /// coding it does not understand is a 501).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    /// `Expect: 100-continue` in a form rotor's server sends no `100` for
    /// (see `proxy::Expectation::Unmet`).
    #[error("the request's Expect names 100-continue in a list or beside another Expect field, for which rotor cannot send the 100 (Continue): send `Expect: 100-continue` as its only Expect field, or send the body without waiting")]
    ExpectationFailed,
    /// (`size`: what was read of it, whole or not.)
    #[error("request head past the {limit} bytes accepted ({size} read)")]
    HeadTooLarge { size: usize, limit: usize },
    #[error("request head of more than {limit} header fields")]
    TooManyFields { limit: usize },
    /// A request line longer than a whole head may be.
    #[error("request line longer than the {limit} bytes a head may take")]
    TargetTooLong { limit: usize },
    /// HTTP/2's connection preface (an h2c client with prior knowledge).
    #[error("HTTP/2 is not served here: send HTTP/1.1 requests (CONNECT for https)")]
    Http2Preface,
    #[error("refused")]
    Denied(#[source] crate::acl::Denied),
    /// A CONNECT while the worker drains: a tunnel opened then would be
    /// cut at the drain's end.
    #[error("this worker is stopping: no new tunnel (ask again: another worker takes it)")]
    Stopping,
    #[error(transparent)]
    Auth(crate::auth::AuthError),
    #[error("{0}")]
    NoAddress(NoAddress),
    #[error("source address {ip} cannot be used on this host")]
    SourceUnavailable {
        ip: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error("allocator unavailable")]
    Allocator(#[source] LeaseError),
    #[error("cannot open a socket")]
    Socket(#[source] io::Error),
    /// `connect` found no local port free for (leased address, `dest`):
    /// this host's ephemeral ports, not the destination's fault.
    #[error("no local port free to connect to {dest} from the leased address (the host's ephemeral ports are in use)")]
    Ports {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Session(crate::session::ParamError),
    #[error("{}", session_lost(*ip))]
    SessionLost { ip: IpAddr },
    #[error("no room for a new session: the session table, or this user's share of it (--max-sessions-per-user), is full of strict sessions that may not move; a new session may start in {} s", retry_after_secs(*retry_after))]
    SessionsFull { retry_after: Duration },
    #[error("cannot resolve {host}")]
    Dns {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} resolved to no address")]
    DnsEmpty { host: String },
    /// `timeout`: rotor's own bound ran out; `None`: the resolver's
    /// timeouts and attempts (resolv.conf's) ended it first.
    #[error("{}", dns_timeout_text(host, *timeout))]
    DnsTimeout {
        host: String,
        timeout: Option<Duration>,
    },
    /// `--resolver system`: the C library's temporary failure
    /// (`EAI_AGAIN`): no server answered, or one answered SERVFAIL; a
    /// timeout, as far as the client is told.
    #[error("resolving {host} failed for now (no DNS server answered, or one failed)")]
    DnsAgain {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("connection to {dest} refused")]
    Refused {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("{dest} is unreachable")]
    Unreachable {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {dest} failed")]
    Connect {
        dest: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {dest} took longer than {}", to_ms(timeout))]
    ConnectTimeout { dest: String, timeout: Duration },
    #[error("{dest} sent no response within {}", to_ms(timeout))]
    ResponseTimeout { dest: String, timeout: Duration },
    #[error("{dest} took none of the request for {}", to_ms(timeout))]
    WriteTimeout { dest: String, timeout: Duration },
    #[error("upstream HTTP exchange with {dest} failed")]
    Upstream {
        dest: String,
        #[source]
        source: crate::h1::Error,
    },
    #[error("{}", throttled_text(site, *block, *retry_after, *session))]
    Throttled {
        site: String,
        retry_after: Duration,
        /// What holds the first address to free.
        block: rotor_protocol::Block,
        /// A session's: its address was the one refused (it keeps it for
        /// after the block).
        session: bool,
    },
}

/// A request's failure, the pool address it used when it had one (a
/// connect refused from it, a destination that answered it badly), and
/// the bytes of its body that went there before: the access log names
/// them, and the metrics count the bytes.
#[derive(Debug)]
pub struct Failed {
    pub error: ProxyError,
    pub source: Option<IpAddr>,
    pub sent: u64,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Failed {
        Failed {
            error,
            source: None,
            sent: 0,
        }
    }
}

impl ProxyError {
    /// A connect the destination refused, or that found no route to it:
    /// quickly known (not a timeout), and no fault of the source.
    pub fn is_unreached(&self) -> bool {
        matches!(
            self,
            ProxyError::Refused { .. } | ProxyError::Unreachable { .. }
        )
    }

    /// This failure, of a request sent from `ip`.
    pub fn from_source(self, ip: IpAddr) -> Failed {
        Failed::from(self).from_source(ip)
    }
}

impl Failed {
    /// This failure, of a request sent from `ip`.
    pub fn from_source(self, ip: IpAddr) -> Failed {
        Failed {
            source: Some(ip),
            ..self
        }
    }
}

/// A time waited, to the millisecond (a share of a timeout worked out
/// from a deadline read `9.999999583s`).
fn to_ms(d: &Duration) -> String {
    let ms = (d.as_micros() + 500) / 1000;
    format!(
        "{:?}",
        Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    )
}

fn dns_timeout_text(host: &str, timeout: Option<Duration>) -> String {
    match timeout {
        Some(t) => format!("resolving {host} took longer than {}", to_ms(&t)),
        None => format!(
            "the DNS servers did not answer for {host} (their timeouts and attempts ran out)"
        ),
    }
}

fn throttled_text(site: &str, block: Block, retry_after: Duration, session: bool) -> String {
    let secs = retry_after_secs(retry_after);
    // Named by what frees first: the other addresses may be held by the
    // other block (a spent budget beside a cooldown), so "every address
    // is cooling" was said of addresses only out of budget.
    match (block, session) {
        // (Only a session's request is held at the sessions' share; it
        // was told the address had spent its budget, with half of it left
        // for the site's other requests.)
        (Block::Shared, _) => format!(
            "the session's address has served the sessions' share of its budget for {site} (half) while other requests wait for the rest; retry in {secs} s"
        ),
        (Block::Cooling, false) => format!(
            "no address may serve {site} now; the first to free is cooling down for {site} after it pushed back; retry in {secs} s"
        ),
        // (A session keeps its address for after the cooldown; a new one
        // is refused only when no address may serve.)
        (Block::Cooling, true) => format!(
            "the session's address is cooling down for {site} after it pushed back; retry in {secs} s (a session not yet started is refused so only when no address may serve {site}, the first to free cooling)"
        ),
        (Block::Budget, false) => format!(
            "site budget exhausted for {site}: no address may serve it now, the first to free has spent its budget; retry in {secs} s"
        ),
        // (Sent on, the site would see more than its limit from the
        // address, and push back.)
        (Block::Budget, true) => format!(
            "the session's address has spent its budget for {site}; retry in {secs} s (a session not yet started is refused so only when no address may serve {site}, the first to free out of budget)"
        ),
    }
}

/// Why a strict session has no address: its address is out of the
/// rotation (left the pool, quarantined, or of a source not read yet), or
/// (unspecified, as the allocator answers then) the full table pushed the
/// session out before its end.
pub(crate) fn session_lost(ip: IpAddr) -> String {
    match ip.is_unspecified() {
        true => "the strict session was pushed out of the full session table before its end (a strict session does not move; raise --max-sessions)".to_string(),
        false => format!("the session's address {ip} is out of the rotation: it left the pool, is quarantined, or its pool source has not been read since the start (a strict session does not move)"),
    }
}

/// Whether a connect failed as this host's routes or firewall forbid the
/// destination (EACCES: a `prohibit` route; EPERM: a firewall's rule).
pub fn prohibited(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

/// Whole seconds for `Retry-After`, rounded up (a client that waits them
/// finds an address free).
fn head_timeout_text(timeout: Duration, body: bool) -> String {
    match body {
        false => {
            format!("the client sent no whole request head within {timeout:?} of its first byte")
        }
        true => format!(
            "the client sent its request head, but not its body whole within {timeout:?} after it"
        ),
    }
}

fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Who caused a failure: decides the log level and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    /// rotor's configuration or its allocator: an operator must act.
    Internal,
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        use ProxyError::*;
        match self {
            BadRequest(_)
            | ClientBody(_)
            | ClientTimeout { .. }
            | HeadTimeout { .. }
            | NotImplemented(_)
            | ExpectationFailed
            | HeadTooLarge { .. }
            | TooManyFields { .. }
            | TargetTooLong { .. }
            | Http2Preface
            | Denied(_)
            | Auth(_)
            | Session(_)
            | Throttled { .. } => Fault::Client,
            NoAddress(_)
            | SourceUnavailable { .. }
            | Allocator(_)
            | Socket(_)
            | Ports { .. }
            | SessionsFull { .. }
            | Stopping => Fault::Internal,
            _ => Fault::Upstream,
        }
    }

    /// Status code and `Proxy-Status` error type (RFC 9209 §2.3).
    pub fn classify(&self) -> (StatusCode, Option<&'static str>) {
        use ProxyError::*;
        match self {
            BadRequest(_) => (StatusCode::BAD_REQUEST, None),
            ClientBody(_) => (StatusCode::BAD_REQUEST, Some("http_request_error")),
            ClientTimeout { .. } | HeadTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, Some("http_request_error"))
            }
            NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, None),
            ExpectationFailed => (StatusCode::EXPECTATION_FAILED, Some("http_request_error")),
            HeadTooLarge { .. } | TooManyFields { .. } => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, None)
            }
            TargetTooLong { .. } => (StatusCode::URI_TOO_LONG, None),
            Http2Preface => (StatusCode::HTTP_VERSION_NOT_SUPPORTED, None),
            Auth(crate::auth::AuthError::Busy) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("proxy_internal_error"),
            ),
            Auth(crate::auth::AuthError::Spaced(_)) => {
                (StatusCode::TOO_MANY_REQUESTS, Some("http_request_denied"))
            }
            Auth(_) | Session(_) => (StatusCode::PROXY_AUTHENTICATION_REQUIRED, None),
            SessionLost { .. } => (StatusCode::BAD_GATEWAY, Some("proxy_configuration_error")),
            // (A port refused is not the address's fault.)
            Denied(crate::acl::Denied::Port(_)) => {
                (StatusCode::FORBIDDEN, Some("http_request_denied"))
            }
            Denied(crate::acl::Denied::Loop(_)) => {
                (StatusCode::FORBIDDEN, Some("proxy_loop_detected"))
            }
            Denied(_) => (StatusCode::FORBIDDEN, Some("destination_ip_prohibited")),
            NoAddress(_) | SourceUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("proxy_configuration_error"),
            ),
            Allocator(_) | Socket(_) | Ports { .. } | SessionsFull { .. } | Stopping => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("proxy_internal_error"),
            ),
            Dns { .. } | DnsEmpty { .. } => (StatusCode::BAD_GATEWAY, Some("dns_error")),
            DnsTimeout { .. } | DnsAgain { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, Some("dns_timeout"))
            }
            Refused { .. } => (StatusCode::BAD_GATEWAY, Some("connection_refused")),
            Unreachable { .. } => (StatusCode::BAD_GATEWAY, Some("destination_ip_unroutable")),
            // Reset during the handshake (a middlebox, a SYN flood guard).
            Connect { source, .. } if source.raw_os_error() == Some(libc::ECONNRESET) => {
                (StatusCode::BAD_GATEWAY, Some("connection_terminated"))
            }
            // This host's routes or firewall forbid it (a `prohibit`
            // route, a rule that rejects): it read as rotor's own fault.
            Connect { source, .. } if prohibited(source) => {
                (StatusCode::BAD_GATEWAY, Some("destination_ip_prohibited"))
            }
            Connect { .. } => (StatusCode::BAD_GATEWAY, Some("proxy_internal_error")),
            ConnectTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, Some("connection_timeout")),
            ResponseTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, Some("http_response_timeout")),
            WriteTimeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                Some("connection_write_timeout"),
            ),
            Upstream { source, .. } => (StatusCode::BAD_GATEWAY, Some(source.proxy_status())),
            Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, Some("http_request_denied")),
        }
    }

    /// The reason phrase of the status line: what an HTTPS client shows of
    /// a refused CONNECT (requests: `Tunnel connection failed: 403
    /// Destination Prohibited`), so it names rotor's reason, not only the
    /// status's.
    pub fn reason(&self) -> &'static str {
        use ProxyError::*;
        match self {
            BadRequest(_) => "Bad Request",
            ClientBody(_) => "Bad Request Body",
            ClientTimeout { .. } => "Request Body Timeout",
            HeadTimeout { .. } => "Request Timeout",
            NotImplemented(_) => "Transfer Coding Not Implemented",
            ExpectationFailed => "Expectation Failed",
            HeadTooLarge { .. } | TooManyFields { .. } => "Request Head Too Large",
            TargetTooLong { .. } => "URI Too Long",
            Http2Preface => "HTTP Version Not Supported",
            Auth(crate::auth::AuthError::Busy) => "Authentication Busy",
            Auth(crate::auth::AuthError::Spaced(_)) => "Too Many Failed Logins",
            Auth(_) => "Proxy Authentication Required",
            Session(_) => "Bad Session Parameter",
            SessionLost { .. } => "Session Address Gone",
            SessionsFull { .. } => "Session Table Full",
            Denied(crate::acl::Denied::Loop(_)) => "Forwarding Loop",
            Denied(_) => "Destination Prohibited",
            NoAddress(rotor_protocol::NoAddress::EmptyPool) => "Pool Empty",
            NoAddress(_) => "No Pool Address Of The Destination's Family",
            SourceUnavailable { .. } => "Pool Address Unusable",
            Allocator(_) => "Allocator Unavailable",
            Socket(_) => "Proxy Out Of Sockets",
            Ports { .. } => "Proxy Out Of Ports",
            Stopping => "Proxy Stopping",
            Dns { .. } | DnsEmpty { .. } => "DNS Error",
            DnsTimeout { .. } | DnsAgain { .. } => "DNS Timeout",
            Refused { .. } => "Connection Refused",
            Unreachable { .. } => "Destination Unreachable",
            Connect { source, .. } if prohibited(source) => "Destination Prohibited",
            Connect { .. } => "Connect Failed",
            ConnectTimeout { .. } => "Connection Timeout",
            ResponseTimeout { .. } => "Response Timeout",
            WriteTimeout { .. } => "Request Write Timeout",
            Upstream { .. } => "Bad Upstream Response",
            Throttled {
                block: Block::Cooling,
                ..
            } => "Site Cooling Down",
            Throttled { .. } => "Site Budget Exhausted",
        }
    }

    /// Classifies a failed connect by its errno.
    pub fn from_connect(dest: String, source: io::Error) -> ProxyError {
        match source.raw_os_error() {
            Some(libc::ECONNREFUSED) => ProxyError::Refused { dest, source },
            // (EINVAL: a `blackhole` route to it.)
            Some(
                libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::ENETDOWN
                | libc::EHOSTDOWN
                | libc::EINVAL,
            ) => ProxyError::Unreachable { dest, source },
            // With IP_BIND_ADDRESS_NO_PORT the port is chosen at connect:
            // none free for this (source, destination).
            Some(libc::EADDRNOTAVAIL) => ProxyError::Ports { dest, source },
            _ => ProxyError::Connect { dest, source },
        }
    }

    /// The response the client gets: the status, a `Proxy-Status` header and
    /// a one-line plain-text body saying what happened.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let (status, kind) = self.classify();
        let text = match self {
            // Not the address a name resolved to, nor the rule, nor that it
            // is this host's: a user could map internal addresses with it. The
            // log line has them.
            ProxyError::Denied(crate::acl::Denied::Address(..) | crate::acl::Denied::Local(_)) => {
                "refused: the destination's address is one this proxy does not connect to"
                    .to_string()
            }
            ProxyError::Denied(crate::acl::Denied::Loop(_)) => {
                "refused: the destination is this proxy itself (a loop)".to_string()
            }
            // Not the pool's address either (`--expose-source` is the
            // operator's choice): the log line has it.
            ProxyError::SessionLost { ip } if !ip.is_unspecified() => {
                "the session's address is out of the rotation: it left the pool, is quarantined, or its pool source has not been read since the start (a strict session does not move)".to_string()
            }
            ProxyError::SourceUnavailable { source, .. } => format!(
                "a pool address cannot be used on this host ({source}); reported to the allocator"
            ),
            // Not the allocator's socket path, nor what it answered: the
            // log line has them.
            ProxyError::Allocator(_) => {
                "allocator unavailable: no source address could be leased (the proxy's log says why)"
                    .to_string()
            }
            _ => error_chain(self),
        };
        let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
        *resp.status_mut() = status;
        resp.extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(
                self.reason().as_bytes(),
            ));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            h.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rotor\", charset=\"UTF-8\""),
            );
        }
        if let ProxyError::Throttled { retry_after, .. }
        | ProxyError::SessionsFull { retry_after } = self
        {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after).max(1)),
            );
        }
        if let ProxyError::Auth(crate::auth::AuthError::Spaced(secs)) = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from((*secs).max(1)));
        }
        // Every refusal says it is rotor's, and why; an error type where
        // RFC 9209 has one (none fits a 400 or a 407).
        if let Ok(v) = HeaderValue::from_str(&proxy_status(kind, &text)) {
            h.insert("proxy-status", v);
        }
        resp
    }
}

/// `rotor; error=KIND; details="…"` (without `error` when there is no
/// KIND) with `details` as a structured-field string (RFC 8941 §3.3.3):
/// printable ASCII, `"` and `\` escaped.
pub fn proxy_status(kind: Option<&str>, details: &str) -> String {
    let mut d = String::with_capacity(details.len());
    for c in details.chars() {
        match c {
            '"' | '\\' => {
                d.push('\\');
                d.push(c);
            }
            ' '..='~' => d.push(c),
            _ => d.push('?'),
        }
    }
    match kind {
        Some(kind) => format!("{PROXY_NAME}; error={kind}; details=\"{d}\""),
        None => format!("{PROXY_NAME}; details=\"{d}\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A share of a timeout is said to the millisecond.
    /// A connect this host's routes or firewall forbid is told apart from
    /// rotor's own faults (it was `proxy_internal_error`), and a blackhole
    /// route is an unroutable destination.
    #[test]
    fn connects_this_host_forbids_say_so() {
        let of =
            |errno| ProxyError::from_connect("d:1".into(), io::Error::from_raw_os_error(errno));
        for errno in [libc::EACCES, libc::EPERM] {
            let e = of(errno);
            assert_eq!(
                e.classify(),
                (StatusCode::BAD_GATEWAY, Some("destination_ip_prohibited"))
            );
            assert_eq!(e.reason(), "Destination Prohibited");
        }
        assert_eq!(
            of(libc::EINVAL).classify(),
            (StatusCode::BAD_GATEWAY, Some("destination_ip_unroutable"))
        );
        assert_eq!(of(libc::EIO).classify().1, Some("proxy_internal_error"));
    }

    #[test]
    fn timeouts_are_said_to_the_millisecond() {
        let e = ProxyError::ConnectTimeout {
            dest: "192.0.2.1:80".into(),
            timeout: Duration::from_nanos(9_999_999_583),
        };
        assert_eq!(
            e.to_string(),
            "connecting to 192.0.2.1:80 took longer than 10s"
        );
        let e = ProxyError::ResponseTimeout {
            dest: "x".into(),
            timeout: Duration::from_micros(2_500_400),
        };
        assert_eq!(e.to_string(), "x sent no response within 2.5s");
    }

    /// A refused destination's answer names neither the address its name
    /// resolved to nor the rule (the log line does); a refused port is
    /// named.
    #[tokio::test]
    async fn a_refused_destination_tells_the_client_no_address() {
        use crate::acl::Denied;
        let ip: std::net::IpAddr = "10.20.30.40".parse().unwrap();
        let rule = "10.0.0.0/8".parse().unwrap();
        for e in [Denied::Address(ip, rule), Denied::Local(ip)] {
            let e = ProxyError::Denied(e);
            let r = e.to_response();
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
            let status = r.headers()["proxy-status"].to_str().unwrap().to_string();
            assert!(status.contains("destination_ip_prohibited"), "{status}");
            let body = body_of(r).await;
            for told in [status.as_str(), body.as_str()] {
                assert!(
                    !told.contains("10.20") && !told.contains("10.0.0.0"),
                    "{told}"
                );
            }
            assert!(error_chain(&e).contains("10.20.30.40"), "the log keeps it");
        }
        let r = ProxyError::Denied(Denied::Port(25)).to_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let status = r.headers()["proxy-status"].to_str().unwrap();
        assert!(status.contains("error=http_request_denied"), "{status}");
        assert!(body_of(r).await.contains("port 25"));
    }

    async fn body_of(r: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let b = r.into_body().collect().await.unwrap();
        String::from_utf8(b.to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn empty_pool_is_503_configuration_error() {
        let r = ProxyError::NoAddress(NoAddress::EmptyPool).to_response();
        assert_eq!(r.status(), 503);
        let ps = r.headers()["proxy-status"].to_str().unwrap();
        assert!(
            ps.starts_with("rotor; error=proxy_configuration_error; details=\""),
            "{ps}"
        );
    }

    #[test]
    fn connect_errors_by_errno() {
        let e = ProxyError::from_connect(
            "x:1".into(),
            io::Error::from_raw_os_error(libc::ECONNREFUSED),
        );
        assert_eq!(
            e.classify(),
            (StatusCode::BAD_GATEWAY, Some("connection_refused"))
        );
        let e = ProxyError::from_connect(
            "x:1".into(),
            io::Error::from_raw_os_error(libc::ENETUNREACH),
        );
        assert_eq!(e.classify().1, Some("destination_ip_unroutable"));
        let e = ProxyError::from_connect(
            "x:1".into(),
            io::Error::from_raw_os_error(libc::EADDRNOTAVAIL),
        );
        assert_eq!(
            e.classify(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("proxy_internal_error")
            )
        );
        assert_eq!(e.fault(), Fault::Internal);
        let by =
            |errno| ProxyError::from_connect("x:1".into(), io::Error::from_raw_os_error(errno));
        for errno in [libc::EHOSTDOWN, libc::ENETDOWN] {
            assert_eq!(by(errno).classify().1, Some("destination_ip_unroutable"));
        }
        assert_eq!(
            by(libc::ECONNRESET).classify(),
            (StatusCode::BAD_GATEWAY, Some("connection_terminated"))
        );
    }

    #[test]
    fn details_are_escaped() {
        assert_eq!(
            proxy_status(Some("dns_error"), "a \"b\" \\ é"),
            "rotor; error=dns_error; details=\"a \\\"b\\\" \\\\ ?\""
        );
    }
}
