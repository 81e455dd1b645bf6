//! The proxy service: one lease per request, an upstream connection bound to
//! the leased address, then the request forwarded (absolute-form) or a tunnel
//! opened (CONNECT).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{request, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use rotor_protocol::{error_chain, Families, Lease, NoAddress};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::access::{AccessLog, Entry};
use crate::acl::{Acl, LocalAddrs};
use crate::auth::{Auth, Standing};
use crate::connect::connect_from;
use crate::dns::Resolver;
use crate::error::{Failed, ProxyError};
use crate::fields::{Fields, Message};
use crate::h1::{self, Conn, ResponseBody};
use crate::idle::Activity;
use crate::lease::{Granted, LeaseClient, LeaseError};
use crate::meter::Meter;
use crate::pushback::Verdict;
use crate::session;
use crate::upstream::{Key, PooledBody, UpstreamPool};

/// A client's request body: what hyper's server reads as the client sends
/// it, or what the fast path has read whole.
pub trait ClientBody:
    http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send>
    + Unpin
    + Send
    + 'static
{
}

impl<B> ClientBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send>
        + Unpin
        + Send
        + 'static
{
}

pub type ProxyBody = Either<PooledBody, Either<Full<Bytes>, Empty<Bytes>>>;

/// A response for the client: its status line, fields and body. (Not an
/// `http::Response`: its own map would be room, moved with it through each
/// layer, for fields that are not there.)
pub struct Answer {
    pub status: StatusCode,
    /// The version hyper's server is given (it answers an HTTP/1.0
    /// client in 1.0 whatever this says).
    pub version: Version,
    /// When the destination's is not the status's usual one.
    pub reason: Option<hyper::ext::ReasonPhrase>,
    pub fields: Fields,
    pub body: ProxyBody,
}

impl Answer {
    /// The response as hyper's server takes it.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(self.body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.fields.into_map();
        if let Some(reason) = self.reason {
            resp.extensions_mut().insert(reason);
        }
        resp
    }
}

impl From<&ProxyError> for Answer {
    /// Rotor's own answer for `e` (a failure before any request was served).
    fn from(e: &ProxyError) -> Answer {
        Answer::from(e.to_response().map(|b| Either::Right(Either::Left(b))))
    }
}

impl From<Response<ProxyBody>> for Answer {
    fn from(resp: Response<ProxyBody>) -> Answer {
        let (mut parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            version: parts.version,
            reason: parts.extensions.remove(),
            fields: Fields::Map(parts.headers),
            body,
        }
    }
}

/// A response head from the destination (its fields as they came) and
/// the body to read.
type Exchanged = (h1::ResponseHead, ResponseBody);

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// A client connection with no bytes moving for this long is closed
    /// (after the request in flight, if any): a response body whose
    /// destination was silent this long was cut by it.
    pub idle_timeout: Duration,
    /// How long an idle upstream connection is kept for the next request
    /// from the same source address to the same destination; zero: never.
    pub upstream_idle_timeout: Duration,
    /// Most idle connections kept per (source address, destination).
    pub upstream_max_idle: usize,
    /// Most idle connections kept in all (`upstream::MAX_IDLE_TOTAL`, less
    /// under a low descriptor limit).
    pub upstream_idle_total: usize,
    /// Destinations the proxy may connect to.
    pub acl: Acl,
    /// A CONNECT tunnel with no bytes moving either way for this long is
    /// closed.
    pub tunnel_idle_timeout: Duration,
    /// Users who may use the proxy; `None`: anyone who can connect.
    pub auth: Option<Arc<Auth>>,
    /// The longest a resolved name is reused (the DNS resolver keeps an
    /// answer for its TTL, up to this; the system one, this long); zero:
    /// resolve every time.
    pub dns_cache_ttl: Duration,
    /// How destination names are resolved.
    pub resolver: crate::dns::ResolverChoice,
    /// Largest request head accepted; a larger one gets 431.
    pub max_head_bytes: usize,
    /// Adds `Rotor-Source` (the leased address) to responses and to the
    /// CONNECT `200`.
    pub expose_source: bool,
    /// A sticky session's lifetime when its name does not say, and the
    /// longest it may say.
    pub session_ttl: Duration,
    pub session_max_ttl: Duration,
    /// How long a request waits for an address with budget left for its
    /// site before it gets 429.
    pub budget_wait: Duration,
    /// Destination statuses that cool the address for the site (429 and
    /// 503 with a `Retry-After` always do).
    pub cooldown_status: Vec<u16>,
    /// Whether connects that fail to a site from one address while it
    /// answers others are told to the allocator (which cools the pair on
    /// a repeat).
    pub cooldown_connect_failures: bool,
    /// Where a line per request and tunnel goes, if anywhere.
    pub access_log: Option<Arc<AccessLog>>,
}

/// Who sent a request: the user name given (never the password), and the
/// sticky session it names.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub user: Option<String>,
    pub sticky: Option<Sticky>,
    /// With a users file: what a tunnel of the user stands on, taken when
    /// the password was checked (a reload from then on is seen).
    pub standing: Option<Standing>,
}

impl Caller {
    /// Who, in an access log entry.
    pub fn stamp(&self, e: &mut Entry) {
        e.user.clone_from(&self.user);
        e.session = self.sticky.as_ref().map(|s| s.id.clone());
    }
}

/// The sticky session a request belongs to: its key at the allocator
/// (user and session id), its lifetime, and whether it may move.
#[derive(Debug, Clone)]
pub struct Sticky {
    key: String,
    /// The session's id, as the user name gave it.
    id: String,
    ttl: Duration,
    strict: bool,
}

/// Marks a CONNECT that came after another request on its connection
/// (see `Proxy::open_tunnel`).
#[derive(Clone, Copy)]
pub struct KeptAlive;

pub struct Proxy {
    leases: Arc<LeaseClient>,
    config: ProxyConfig,
    upstream: Arc<UpstreamPool>,
    dns: Resolver,
    local: LocalAddrs,
    /// CONNECT tunnels outlive the HTTP connection they came from; the
    /// tracker lets shutdown wait for them.
    tunnels: TaskTracker,
    /// Cancelled when the drain's time is up: the tunnels still open end,
    /// each counted and logged.
    tunnels_cut: tokio_util::sync::CancellationToken,
    /// Requests handled, for the status line.
    pub requests: std::sync::atomic::AtomicU64,
    /// What was served, for the host's metrics.
    pub meter: Arc<Meter>,
}

/// Counts a tunnel as open while it lives.
struct TunnelOpen(Arc<Meter>);

impl TunnelOpen {
    fn new(meter: &Arc<Meter>) -> TunnelOpen {
        meter
            .tunnels_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TunnelOpen(meter.clone())
    }
}

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        self.0
            .tunnels_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Proxy {
    /// `own`: the addresses the worker's listeners are bound to (a
    /// request to one is a loop, refused).
    pub fn new(
        leases: Arc<LeaseClient>,
        config: ProxyConfig,
        tunnels: TaskTracker,
        own: Vec<std::net::SocketAddr>,
    ) -> Proxy {
        Proxy {
            leases,
            upstream: UpstreamPool::capped(
                config.upstream_idle_timeout,
                config.upstream_max_idle,
                config.upstream_idle_total,
            ),
            dns: Resolver::new(&config.resolver, config.dns_cache_ttl),
            local: LocalAddrs::with_listeners(own),
            tunnels_cut: tokio_util::sync::CancellationToken::new(),
            config,
            tunnels,
            requests: Default::default(),
            meter: Arc::default(),
        }
    }

    /// Serves one request hyper's server read: a forward or a CONNECT.
    pub async fn handle<B: ClientBody>(
        self: Arc<Self>,
        req: Request<B>,
        client: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let (mut parts, body) = req.into_parts();
        let fields = Fields::Map(std::mem::take(&mut parts.headers));
        Ok(self
            .serve(parts, fields, body, client)
            .await
            .into_response())
    }

    /// Serves one request: a forward or a CONNECT. `fields` are the
    /// request's (`parts`' own map is not read). The body is hyper's
    /// (requests hyper's server read) or one the fast path read whole
    /// (see `fast`).
    pub async fn serve<B: ClientBody>(
        self: Arc<Self>,
        parts: request::Parts,
        fields: Fields,
        body: B,
        client: SocketAddr,
    ) -> Answer {
        let start = Instant::now();
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let method = parts.method.clone();
        // Formatted only if a line is logged; without userinfo or query,
        // which may carry the destination's credentials or tokens.
        let target = LogTarget(parts.uri.clone());
        let head = head_len(&parts, &fields);
        // Until an answer is made, a client that goes away (its server
        // drops this future), during the credentials' check too, leaves
        // its request counted and logged.
        let mut abandoned = Abandoned {
            proxy: &self,
            start,
            client,
            method: &method,
            target: &target,
            entry: None,
            leased: None,
            armed: true,
        };
        let checked = match head > self.config.max_head_bytes {
            true => Err(ProxyError::HeadTooLarge {
                size: head,
                limit: self.config.max_head_bytes,
            }),
            false => match self.credentials(&fields) {
                // The common request: no credentials, none asked for. (No
                // future made for it: the user check's is ≈ 900 bytes,
                // copied into place on every request that awaits it.)
                Ok(None) => Ok(Caller::default()),
                Ok(Some((name, password))) => {
                    self.authenticate_user(&name, &password, client.ip()).await
                }
                Err(e) => Err(e),
            },
        };
        // The access log's line, begun once the caller is known. Boxed:
        // inline, its ≈ 200 bytes were copied with the request's state.
        abandoned.entry = self.config.access_log.as_ref().map(|_| {
            let mut e = abandoned.new_entry();
            if let Ok(c) = &checked {
                c.stamp(&mut e);
            }
            e
        });
        // RFC 9110 §7.6.2: a TRACE or OPTIONS with `Max-Forwards: 0` is
        // answered here, rotor being its final recipient (after the
        // credentials' check: nothing is told to a client not let in).
        let mut fields = fields;
        if checked.is_ok() && (method == Method::TRACE || method == Method::OPTIONS) {
            match max_forwards(&fields) {
                // Two Host fields are refused here too (RFC 9112 §3.2).
                Some(0) if only_host(&fields).is_ok() => {
                    abandoned.armed = false;
                    return self.answer_itself(
                        &parts,
                        &fields,
                        abandoned.entry.take(),
                        client,
                        start,
                    );
                }
                // Two Host fields: left for `forward`'s 400, untouched.
                Some(0) => {}
                Some(n) => fields.insert(header::MAX_FORWARDS, HeaderValue::from(n - 1)),
                _ => {}
            }
        }
        // A CONNECT or a WebSocket handshake whose head says content follows
        // (RFC 9110 §9.3.6, RFC 6455 §4.1: they have none; hyper would read
        // what follows the head as a body, and the first tunnel bytes, a
        // ClientHello sent at once, would be lost): refused, whatever else
        // is wrong with it (a 407 first), its body read and thrown away
        // while the answer goes out (see `drain_refused`: dropped unread,
        // hyper's server closed some such connections with the answer
        // unsent, a 407 or a 400 alike).
        let websocket = matches!(fields, Fields::Map(_)) && asks_websocket(&parts, &fields);
        let upgrade_content =
            (method == Method::CONNECT || websocket) && declares_content(fields.iter());
        let result = match checked {
            _ if upgrade_content => {
                drain_refused(body);
                Err(match (checked, only_host(&fields)) {
                    (Err(e), _) => e.into(),
                    (Ok(_), Err(e)) => e.into(),
                    (Ok(_), Ok(_)) if method == Method::CONNECT => {
                        ProxyError::BadRequest(CONNECT_CONTENT.into()).into()
                    }
                    (Ok(_), Ok(_)) => ProxyError::BadRequest(WEBSOCKET_CONTENT.into()).into(),
                })
            }
            Err(e) => Err(e.into()),
            // (A forward checks its Host where it replaces it.)
            Ok(caller) if method == Method::CONNECT => match only_host(&fields) {
                Err(e) => Err(e.into()),
                Ok(_) => {
                    let req = Request::from_parts(parts, body);
                    self.connect(
                        req,
                        (client, start),
                        (caller.sticky.as_ref(), caller.standing.clone()),
                        abandoned.entry.as_deref().cloned(),
                        &mut abandoned.leased,
                    )
                    .await
                }
            },
            // A WebSocket's opening handshake (hyper's server takes it; the
            // fast path's requests are never one): relayed as a tunnel.
            Ok(caller) if websocket => {
                let sticky = (caller.sticky.as_ref(), caller.standing.clone());
                let entry = abandoned.entry.as_deref().cloned();
                // Boxed: inline, its state made every request's future
                // larger (135 instructions a new connection's request,
                // callgrind).
                let leased = &mut abandoned.leased;
                let handshake =
                    self.websocket(parts, fields, (client, start), sticky, (entry, leased));
                Box::pin(handshake).await
            }
            Ok(caller) => {
                self.forward(
                    parts,
                    fields,
                    body,
                    caller.sticky.as_ref(),
                    &mut abandoned.leased,
                )
                .await
            }
        };
        abandoned.armed = false;
        let mut entry = abandoned.entry.take();
        let took = start.elapsed();
        let ms = took.as_millis() as u64;
        match result {
            Ok((mut resp, lease)) => {
                match method == Method::CONNECT || resp.status == StatusCode::SWITCHING_PROTOCOLS {
                    true => {
                        // Counted, and logged when it closes, by the
                        // tunnel's task once the client has taken the 200
                        // (a WebSocket's 101).
                        entry = None;
                    }
                    false => {
                        let status = resp.status.as_u16();
                        self.meter
                            .response(lease.ip, || target.dest(), status, took)
                    }
                }
                debug!(%client, %method, %target, source = %lease.ip, seq = lease.seq, status = resp.status.as_u16(), ms, "request");
                if let (Some(mut e), Some(log)) = (entry, &self.config.access_log) {
                    e.source = Some(lease.ip);
                    e.status = resp.status.as_u16();
                    // Written when the body has been sent, with its bytes.
                    match &mut resp.body {
                        Either::Left(body) => body.log_when_done(log.clone(), e),
                        Either::Right(_) => log.log(&e),
                    }
                }
                resp
            }
            Err(Failed {
                error: e,
                source,
                sent,
            }) => {
                let kind = e.classify().1;
                self.meter.error(kind, took);
                // What of its body went before it failed, counted as a
                // served request's is.
                if let (Some(ip), 1..) = (source, sent) {
                    self.meter.bytes(ip, sent, 0);
                }
                let mut resp = e.to_response();
                // The address that failed, told as a served one's is.
                if let Some(v) = source.and_then(|ip| self.source_value(ip)) {
                    resp.headers_mut().insert(ROTOR_SOURCE.clone(), v);
                }
                // A refused tunnel ends its connection: a client that sent
                // its first tunnel bytes with the CONNECT would otherwise
                // have them read as its next request. (Not a 407: a client
                // asks again with credentials on the same connection.)
                if method == Method::CONNECT
                    && resp.status() != StatusCode::PROXY_AUTHENTICATION_REQUIRED
                {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                if let (Some(mut en), Some(log)) = (entry, &self.config.access_log) {
                    en.source = source;
                    en.status = resp.status().as_u16();
                    en.error = kind;
                    en.sent = sent;
                    log.log(&en);
                }
                log_failed(
                    &e,
                    (client, &method, &target),
                    source,
                    resp.status().as_u16(),
                    ms,
                );
                Answer::from(resp.map(|b| Either::Right(Either::Left(b))))
            }
        }
    }

    /// A request hyper's server answered itself (`status`: 400 for a head
    /// it could not parse, 431 or 414 for one too large): counted, and
    /// logged with method and target `-`, as rotor's own answers are, so a
    /// flood of malformed requests shows.
    #[cold]
    pub fn answered_by_hyper(&self, client: SocketAddr, status: u16) {
        self.unserved(client, None, (status, None), Instant::now());
    }

    /// A request the fast path did not get whole (`parts`: its head, if
    /// that came): rotor answered 408 for its slowness, or the client went
    /// (499 `client_closed`) mid-body. Counted and logged as the others
    /// are (the same on hyper's path was; here it went without a line).
    #[cold]
    #[inline(never)]
    pub(crate) fn unserved(
        &self,
        client: SocketAddr,
        parts: Option<&request::Parts>,
        (status, kind): (u16, Option<&'static str>),
        start: Instant,
    ) {
        self.meter.untimed(kind);
        if let Some(log) = &self.config.access_log {
            let mut e = match parts {
                Some(p) => {
                    let target = log_target(&p.uri, p.method == Method::CONNECT);
                    Entry::new(start, client, p.method.clone(), target)
                }
                None => Entry::new(start, client, unread_method(b"-"), "-".into()),
            };
            e.status = status;
            e.error = kind;
            log.log(&e);
        }
    }

    /// A connection refused at a connection limit (`kind`) before any of
    /// it was read: counted, and logged as a 503 with target `-` and
    /// method `-` (`SOCKS5` from a SOCKS5 listener), so a flood turned
    /// away shows in the access log as in `rotor_errors_total`.
    #[cold]
    #[inline(never)]
    pub(crate) fn refused_at_limit(&self, client: SocketAddr, socks: bool, kind: &'static str) {
        self.meter.untimed(Some(kind));
        if let Some(log) = &self.config.access_log {
            let method = unread_method(if socks { b"SOCKS5" } else { b"-" });
            let mut e = Entry::new(Instant::now(), client, method, "-".into());
            e.status = 503;
            e.error = Some(kind);
            log.log(&e);
        }
    }

    /// Rotor's own answer to a TRACE or OPTIONS with `Max-Forwards: 0`,
    /// logged. (Out of line: the fast path's `serve` stays as it was.)
    #[cold]
    #[inline(never)]
    fn answer_itself(
        &self,
        parts: &request::Parts,
        fields: &Fields,
        entry: Option<Box<Entry>>,
        client: SocketAddr,
        start: Instant,
    ) -> Answer {
        let resp = own_answer(parts, fields);
        let status = resp.status().as_u16();
        self.meter.answered(start.elapsed());
        if let (Some(mut e), Some(log)) = (entry, &self.config.access_log) {
            e.status = status;
            log.log(&e);
        }
        let (method, target) = (&parts.method, LogTarget(parts.uri.clone()));
        let ms = start.elapsed().as_millis() as u64;
        debug!(%client, %method, %target, status, ms, "request answered by rotor (Max-Forwards: 0)");
        Answer::from(resp.map(|b| Either::Right(Either::Left(b))))
    }

    /// The credentials a request gives, checked only if it gives some (a
    /// users file asks for them; without one, the user name may still
    /// name a sticky session and the password is ignored): `None` for a
    /// request without any where none are asked for. Without a users
    /// file, Basic credentials that cannot be read (too long, not base64
    /// or UTF-8, no colon) are refused as with one: their user name may
    /// have named a session, which must not be dropped unsaid; another
    /// scheme is no rotor credentials, and is ignored.
    fn credentials(&self, fields: &Fields) -> Result<Option<(String, String)>, ProxyError> {
        // One field only (RFC 9110 §11.7.2): with two, a front that
        // routes by one (deploy/multi-host's HAProxy reads the last)
        // would send the request where rotor logs in as the other.
        let header = fields.get_only(&header::PROXY_AUTHORIZATION).map_err(|_| {
            ProxyError::BadRequest("more than one Proxy-Authorization field".into())
        })?;
        match (crate::auth::credentials(header), &self.config.auth) {
            (Ok(given), _) => Ok(Some(given)),
            (Err(_), None) if !crate::auth::is_basic(header) => Ok(None),
            (Err(e), _) => Err(ProxyError::Auth(e)),
        }
    }

    /// Whether clients are told the leased source address
    /// (`--expose-source`).
    pub fn exposes_source(&self) -> bool {
        self.config.expose_source
    }

    /// Whether clients must authenticate (a users file is configured).
    pub fn auth_required(&self) -> bool {
        self.config.auth.is_some()
    }

    /// `name` (a user, perhaps with session parameters) and `password`,
    /// checked against the users file if there is one; the sticky session
    /// the name asks for.
    pub async fn authenticate_user(
        &self,
        name: &str,
        password: &str,
        client: std::net::IpAddr,
    ) -> Result<Caller, ProxyError> {
        let mut standing = None;
        let user = match &self.config.auth {
            // Without a users file a name is only read for a session when
            // it names one: `my-app` (or `my-sessionless-app`) stays a
            // plain name, as before sessions.
            None if !session::names_params(name) => {
                return Ok(Caller {
                    user: Some(name.to_string()),
                    ..Caller::default()
                })
            }
            None => session::parse(name, |_| false).map_err(ProxyError::Session)?,
            Some(auth) => match session::parse(name, |n| auth.has_user(n)) {
                Ok(user) => {
                    // Watched from before the check (no revocation meanwhile
                    // is missed), judged by the users it passed against.
                    let mut watch = auth.standing(&user.user);
                    let (_, users) = auth
                        .checked_against(&user.user, password, client)
                        .await
                        .map_err(ProxyError::Auth)?;
                    watch.checked(users);
                    standing = Some(watch);
                    user
                }
                // Which parameter is wrong is said only to someone whose
                // password checks out (else it would tell whether a dashed
                // name is a user): a wrong password is just that.
                Err(e) => {
                    let (base, _) = session::split_user(name, |n| auth.has_user(n));
                    auth.check_credentials(base, password, client)
                        .await
                        .map_err(ProxyError::Auth)?;
                    return Err(ProxyError::Session(e));
                }
            },
        };
        let name = user.user.clone();
        // Sessions of different users are different sessions, and those
        // of names nobody checked (a worker without a users file sharing
        // the allocator) are never those of a user who logged in.
        let checked = if self.config.auth.is_some() {
            ""
        } else {
            "\u{1}"
        };
        let sticky = user.session.map(|p| Sticky {
            key: format!("{checked}{}\0{}", user.user, p.id),
            id: p.id.clone(),
            ttl: p
                .ttl
                .unwrap_or(self.config.session_ttl)
                .min(self.config.session_max_ttl),
            strict: p.strict,
        });
        if sticky
            .as_ref()
            .is_some_and(|s| s.key.len() > rotor_protocol::MAX_SESSION_KEY)
        {
            return Err(ProxyError::BadRequest(format!(
                "the user name is too long for a sticky session (at most {} bytes with the session id)",
                rotor_protocol::MAX_SESSION_KEY - 1
            )));
        }
        Ok(Caller {
            user: Some(name),
            sticky,
            standing,
        })
    }

    /// A tunnel's connection to `host:port` from the next address (an
    /// HTTP CONNECT's or a SOCKS5 one's): the destination rules, the lease
    /// and the retry on an unusable address. A CONNECT on a `kept_alive`
    /// connection is refused once the drain began (the tunnels' tracker is
    /// closed then): the tunnel would be cut at the drain's end, and
    /// another worker takes it. A connection's first request is served in
    /// the drain, as any request is: its connection was accepted before the
    /// drain, and only this worker can answer it (refused, it was lost to
    /// a client that does not ask again, as few do after a 503 to a
    /// CONNECT).
    ///
    /// `leased`: the address it goes out from, once leased (for the line
    /// of a tunnel given up as it opens, its client gone).
    pub async fn open_tunnel(
        &self,
        (host, port, authority): (&str, u16, &str),
        sticky: Option<&Sticky>,
        kept_alive: bool,
        leased: &mut Option<IpAddr>,
    ) -> Result<(TcpStream, Lease), Failed> {
        if kept_alive && self.tunnels.is_closed() {
            return Err(ProxyError::Stopping.into());
        }
        let (addrs, granted) = self.resolve_and_lease(host, port, sticky).await?;
        *leased = Some(granted.0.ip);
        let (stream, (lease, watch)) = self
            .connect_leased(granted, &addrs, (host, authority), sticky)
            .await?;
        *leased = Some(lease.ip);
        // A tunnel's answers are encrypted: its connect made is all it
        // tells of the site, and stands for its answer (a pair on
        // probation after a plain request's push-back had let in one
        // tunnel every 2 s, for the 30 min its repeats are kept).
        if watch {
            self.leases
                .site_answered(lease.ip, rotor_protocol::site_of(host));
        }
        Ok((stream, lease))
    }

    /// Relays a tunnel in the background (tracked for the drain, closed
    /// after --tunnel-idle-timeout of silence), holding `held` (its places
    /// under the limits).
    pub fn relay_tunnel(
        &self,
        client_stream: TcpStream,
        upstream: TcpStream,
        (client, dest): (SocketAddr, String),
        lease: Lease,
        (held, standing): (crate::server::Held, Option<Standing>),
        entry: Option<Entry>,
    ) {
        let idle_limit = self.config.tunnel_idle_timeout;
        let open = TunnelOpen::new(&self.meter);
        let log = self.config.access_log.clone().zip(entry);
        let cut = self.tunnels_cut.clone();
        self.tunnels.spawn(async move {
            let _held = held;
            let activity = Activity::new();
            let relay = crate::relay::tcp_tunnel(client_stream, upstream, &activity, idle_limit);
            let mut counted = Counted::new(&open.0, lease.ip);
            let result =
                until_ended(relay, &activity, idle_limit, (&cut, standing), &mut counted).await;
            log_tunnel_end(log, (client, &dest, &lease), result, &activity, counted);
        });
    }

    /// Ends the tunnels still open (the drain's time is up), each with its
    /// bytes counted and its access-log line.
    pub fn cut_tunnels(&self) {
        WORKER_CUT.store(true, std::sync::atomic::Ordering::Relaxed);
        self.tunnels_cut.cancel();
    }

    pub fn access_log(&self) -> Option<&Arc<AccessLog>> {
        self.config.access_log.as_ref()
    }

    /// A tunnel from `source` to `dest` answered, until its client takes
    /// the answer (see [`Unopened`]).
    pub(crate) fn unopened(
        &self,
        entry: Option<Entry>,
        (source, dest): (IpAddr, &str),
        start: Instant,
    ) -> Unopened {
        Unopened {
            meter: self.meter.clone(),
            log: self.config.access_log.clone().zip(entry),
            source,
            dest: dest.to_owned(),
            start,
            stopping: self.tunnels_cut.clone(),
            armed: true,
        }
    }

    /// A request whose answer is not given yet (see [`Pending`]).
    pub(crate) fn pending(&self, entry: Option<Entry>, start: Instant) -> Pending {
        Pending {
            meter: self.meter.clone(),
            log: self.config.access_log.clone().zip(entry),
            start,
            stopping: self.tunnels_cut.clone(),
            armed: true,
        }
    }

    pub fn leases(&self) -> &LeaseClient {
        &self.leases
    }

    pub fn upstream(&self) -> &Arc<UpstreamPool> {
        &self.upstream
    }

    /// Name resolution starts over: cache dropped, configuration re-read;
    /// else why not (see `dns::Resolver::reload`).
    pub fn reload_dns(&self) -> Result<(), String> {
        self.dns.reload()
    }

    /// The users file's, with `--auth-file`.
    pub fn auth(&self) -> Option<&Arc<Auth>> {
        self.config.auth.as_ref()
    }

    /// A lease for a request to `host`: a sticky session's address, or
    /// the next one (for a site with budgets or cooldowns, the next that
    /// may serve it, waiting up to --budget-wait for one).
    async fn lease(
        &self,
        families: Families,
        host: &str,
        sticky: Option<&Sticky>,
        may_wait: bool,
    ) -> Result<Granted, ProxyError> {
        // From the first refusal: the clock is read only then.
        let mut deadline = None;
        let asked = Instant::now();
        // The answer of a wait the allocator held; asked for once (a
        // refusal with time left, past the allocator's cap of held
        // requests, is slept on and asked again).
        let mut held = None;
        let mut hold_asked = false;
        loop {
            let answer = match (held.take(), sticky) {
                (Some(answer), _) => answer,
                (None, None) => self.leases.lease(families, host).await,
                (None, Some(s)) => {
                    self.leases
                        .lease_session(families, &s.key, s.ttl, s.strict, host)
                        .await
                }
            };
            let refused = match answer {
                Ok(granted) => {
                    self.meter.leased(asked.elapsed());
                    return Ok(granted);
                }
                Err(LeaseError::Throttled { retry_after, block }) => {
                    let now = tokio::time::Instant::now();
                    let wait = match may_wait {
                        true => self.config.budget_wait,
                        false => Duration::ZERO,
                    };
                    let deadline = *deadline.get_or_insert(now + wait);
                    if now + retry_after <= deadline {
                        // Its client is watched while it waits (the fast
                        // path's): one gone is not sent when the budget
                        // comes.
                        crate::h1::call_watch();
                        // Held by the allocator with the site's other
                        // waiters, served in arrival order; an older one
                        // is asked again at the refusal's end.
                        if sticky.is_none() && !hold_asked {
                            hold_asked = true;
                            held = self.leases.lease_site_wait(families, host, deadline).await;
                        }
                        if held.is_none() {
                            // A session's request (never held) asks again
                            // sooner while its address cools: a probe's
                            // answer ends the hold early, and it had waited
                            // the whole hold out.
                            // (A cooldown longer than a probe's hold ends
                            // when it says.)
                            let probing = retry_after <= rotor_protocol::PROBE_HOLD;
                            let cooling = block == rotor_protocol::Block::Cooling;
                            let nap = match sticky.is_some() && cooling && probing {
                                true => retry_after.min(SESSION_LOOK_AGAIN),
                                false => retry_after,
                            };
                            tokio::time::sleep(nap).await;
                        }
                        continue;
                    }
                    ProxyError::Throttled {
                        site: rotor_protocol::site_of(host),
                        retry_after,
                        block,
                        session: sticky.is_some(),
                    }
                }
                Err(LeaseError::NoAddress(reason)) => ProxyError::NoAddress(reason),
                Err(LeaseError::SessionLost(ip)) => ProxyError::SessionLost { ip },
                Err(LeaseError::SessionsFull { retry_after }) => {
                    ProxyError::SessionsFull { retry_after }
                }
                Err(other) => ProxyError::Allocator(other),
            };
            // A wait that ended refused is a wait too (an allocator that
            // did not answer, a budget that did not free in time): the
            // histogram's worst.
            self.meter.leased(asked.elapsed());
            return Err(refused);
        }
    }

    /// Tells the allocator what the destination's response says of the
    /// address for its site (see `pushback`): push-back cools the pair for
    /// every worker; any other answer, when the allocator asked (`watch`),
    /// clears its backoff and ends its probe's hold: the site served the
    /// address. (A 404 or a 500, not counted so, had left an address on
    /// probation, a request every 2 s, for the 30 min its repeats are
    /// kept.)
    fn observe(&self, host: &str, lease: &Lease, watch: bool, status: StatusCode, fields: &Fields) {
        match crate::pushback::judge(status, fields, &self.config.cooldown_status) {
            Verdict::Pushback { retry_after } => {
                let site = rotor_protocol::site_of(host);
                debug!(%site, source = %lease.ip, status = status.as_u16(), ?retry_after, "site pushed back; reported");
                self.leases
                    .site_pushed_back(lease.ip, site, status.as_u16(), retry_after);
            }
            Verdict::Normal | Verdict::Other if watch => {
                self.leases
                    .site_answered(lease.ip, rotor_protocol::site_of(host));
            }
            _ => {}
        }
    }

    /// Resolves the destination and leases an address of a family it has.
    async fn resolve_and_lease(
        &self,
        host: &str,
        port: u16,
        sticky: Option<&Sticky>,
    ) -> Result<(Vec<SocketAddr>, Granted), ProxyError> {
        // A denied port is refused before the name is looked up: no lookup
        // made for nothing, and the answer does not tell whether the name
        // exists.
        self.config
            .acl
            .check_port(port)
            .map_err(ProxyError::Denied)?;
        // A name whose one family answered in time, which the pool lacks,
        // is looked up again with both waited for: its other family may
        // have come after the moment it is given once one family answers
        // (a slow AAAA, or an A whose shorter TTL has it asked again while
        // the AAAA is cached), and a pool of that family alone would
        // refuse every request until the answer expired. A name known to
        // have one family is refused at once. (A loop, not a second call:
        // one call site keeps the lookup's future inlined, on every
        // request's path.)
        let mut both = false;
        loop {
            let (addrs, partial) = self
                .dns
                .resolve_marked(host, port, self.config.connect_timeout, both)
                .await?;
            self.allowed(&addrs)?;
            match self.lease_for(&addrs, host, sticky).await {
                Err(ProxyError::NoAddress(NoAddress::NoFamily { wanted }))
                    if partial && !both && wanted != Families::ANY =>
                {
                    both = true;
                }
                r => return Ok((addrs, r?)),
            }
        }
    }

    /// Every address the name resolved to must be allowed: a name with one
    /// private address among public ones is refused, not half-served. The
    /// connection is made to these same addresses, so a second DNS answer
    /// cannot slip another one in.
    #[inline]
    fn allowed(&self, addrs: &[SocketAddr]) -> Result<(), ProxyError> {
        for a in addrs {
            self.config
                .acl
                .check_with(*a, &self.local)
                .map_err(ProxyError::Denied)?;
        }
        Ok(())
    }

    /// Without a session, a lease of the family `addrs` (a resolved destination) lists first;
    /// of its other family only when the pool has none of the first, or
    /// the site's budget has none of it now (a dual-stack site whose IPv6
    /// addresses are spent is served from IPv4 ones at once, not after a
    /// wait or a 429). Never the host's own address.
    ///
    /// A session's lease is asked in every family the destination has:
    /// the allocator answers with the address the session holds in any
    /// of them, and pins a new one IPv4 first (as rotor's resolver lists
    /// a name's addresses). Asked in the first alone, a session holding an IPv6
    /// address (its IPv4 lease was throttled once, or the name's answer
    /// lacked A records a moment) was pinned a second, IPv4 one, and the
    /// site saw the session change address.
    async fn lease_for(
        &self,
        addrs: &[SocketAddr],
        host: &str,
        sticky: Option<&Sticky>,
    ) -> Result<Granted, ProxyError> {
        let all = Families::of(addrs.iter().map(SocketAddr::ip));
        if sticky.is_some() {
            return self.lease(all, host, sticky, true).await;
        }
        let first = match addrs.first() {
            Some(a) => Families::of([a.ip()]),
            None => all,
        };
        let narrow = first != all;
        match self.lease(first, host, sticky, !narrow).await {
            Err(ProxyError::NoAddress(NoAddress::NoFamily { .. })) if narrow => self
                .lease(all, host, sticky, true)
                .await
                .map_err(|e| match e {
                    ProxyError::NoAddress(NoAddress::NoFamily { .. }) => {
                        ProxyError::NoAddress(NoAddress::NoFamily { wanted: all })
                    }
                    other => other,
                }),
            Err(ProxyError::Throttled { .. }) if narrow => {
                self.lease(all, host, sticky, true).await
            }
            r => r,
        }
    }

    /// Connects to `addrs` from `lease`'s address. If this host cannot use
    /// that address, the allocator is told (it takes it out of the rotation
    /// for every worker) and the connection is tried once more from the
    /// next address: nothing has reached the destination yet.
    ///
    /// Boxed: its future (≈ 2 KB: the connect, the report, a second lease)
    /// inline would be room in the state of every request that may dial —
    /// all of them, though most reuse a pooled connection — moved at each
    /// await; boxed, it costs an allocation beside a TCP handshake.
    ///
    /// Its lease's `watch` (the lease asked for its answer, see
    /// `Answer::Address`): a connect made from it is told to the
    /// allocator, and clears the pair's failed connects (a suspicion of
    /// the site's refusal). Only a new connect does: an answer on a
    /// kept-alive connection, opened before, says nothing of a ban on new
    /// ones. The lease used comes back with its own.
    fn connect_leased<'a>(
        &'a self,
        granted: Granted,
        addrs: &'a [SocketAddr],
        named: (&'a str, &'a str),
        sticky: Option<&'a Sticky>,
    ) -> crate::Boxed<'a, Result<(TcpStream, Granted), Failed>> {
        Box::pin(self.connect_leased_unboxed(granted, addrs, named, sticky))
    }

    async fn connect_leased_unboxed(
        &self,
        (lease, watch): Granted,
        addrs: &[SocketAddr],
        named @ (host, _): (&str, &str),
        sticky: Option<&Sticky>,
    ) -> Result<(TcpStream, Granted), Failed> {
        let mut leased = Instant::now();
        let first = self.connect_counted(lease.ip, addrs, named).await;
        let (stream, granted) = match first {
            Err(ProxyError::SourceUnavailable { ip, source }) => {
                let reason = source.to_string();
                static SAID: rotor_protocol::Moment = rotor_protocol::Moment::new();
                match SAID.count_in(Duration::from_secs(10)) {
                    Some(n) => {
                        warn!(source = %ip, error = %reason, times = n, "this host cannot use a pool address; reported, trying the next (said once in 10 s)")
                    }
                    None => {
                        debug!(source = %ip, error = %reason, "this host cannot use a pool address; reported, trying the next")
                    }
                }
                self.leases.report_unusable(ip, reason).await;
                let next = self.lease_for(addrs, host, sticky).await?;
                // (Its start, if a site's, was counted at this lease.)
                leased = Instant::now();
                self.connect_again(next, addrs, named).await?
            }
            // A name of both families whose addresses of the leased one
            // refuse or cannot be reached: tried once over the other
            // (from an address of that family), as a client doing Happy
            // Eyeballs would (it was a 502). Not after a timeout: the
            // connect timeout is spent.
            Err(e) if e.is_unreached() => {
                let other = Families::of(
                    addrs
                        .iter()
                        .map(SocketAddr::ip)
                        .filter(|ip| ip.is_ipv4() != lease.ip.is_ipv4()),
                );
                let next = match !other.v4 && !other.v6 {
                    true => None,
                    false => self.lease(other, host, sticky, false).await.ok(),
                };
                let Some(next) = next else {
                    return Err(e.from_source(lease.ip));
                };
                debug!(host, from = %lease.ip, to = %next.0.ip, error = %e, "unreachable over one family; trying the other");
                leased = Instant::now();
                self.connect_again(next, addrs, named).await?
            }
            r => (r.map_err(|e| e.from_source(lease.ip))?, (lease, watch)),
        };
        if granted.1 && self.config.cooldown_connect_failures {
            self.leases
                .site_connected(granted.0.ip, rotor_protocol::site_of(host));
        }
        // A site's budget counted this request at its lease: one that
        // reaches the site a connect later than that by enough to matter
        // (a site far away) has its start moved to now.
        let since = leased.elapsed();
        if since >= SITE_START_LATE {
            self.leases.site_started(granted.0.ip, host, since);
        }
        Ok((stream, granted))
    }

    /// The one retry of a connect that failed, from `next`'s address: one
    /// this host cannot use either is reported too (and the request fails).
    async fn connect_again(
        &self,
        next: Granted,
        addrs: &[SocketAddr],
        named: (&str, &str),
    ) -> Result<(TcpStream, Granted), Failed> {
        let stream = self.connect_counted(next.0.ip, addrs, named).await;
        if let Err(ProxyError::SourceUnavailable { ip, source }) = &stream {
            self.leases.report_unusable(*ip, source.to_string()).await;
        }
        Ok((stream.map_err(|e| e.from_source(next.0.ip))?, next))
    }

    /// One connect from `ip` to `addrs` (of `named`: the host, and the
    /// request's authority) within the connect timeout, counted
    /// (`count_connect`; one its client gave up on too, see `Dialing`).
    async fn connect_counted(
        &self,
        ip: IpAddr,
        addrs: &[SocketAddr],
        named: (&str, &str),
    ) -> Result<TcpStream, ProxyError> {
        let started = Instant::now();
        let mut dialing = Dialing {
            meter: &self.meter,
            ip,
            addrs,
            named,
            started,
            armed: true,
        };
        let mut r = connect_from(ip, addrs, self.config.connect_timeout).await;
        if let Err(ProxyError::Socket(e)) = &r {
            // Out of descriptors: the idle pool's older half makes room.
            let out = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
            if out && self.upstream.shed() > 0 {
                debug!(source = %ip, "out of descriptors: idle upstream connections closed, connecting again");
                r = connect_from(ip, addrs, self.config.connect_timeout).await;
            }
        }
        dialing.armed = false;
        self.count_connect(ip, (addrs, named), &r, started);
        r
    }

    /// Counts one connect from `ip` to `addrs` (of `named`): its time, or
    /// a failure the destination caused. (None of `addrs` of `ip`'s family
    /// — a session's address for a destination of the other — is no
    /// connect.)
    fn count_connect(
        &self,
        ip: IpAddr,
        (addrs, named): (&[SocketAddr], (&str, &str)),
        r: &Result<TcpStream, ProxyError>,
        started: Instant,
    ) {
        match r {
            Ok(_) => self.meter.connected(ip, named.0, started.elapsed()),
            Err(
                ProxyError::SourceUnavailable { .. }
                | ProxyError::Socket(_)
                | ProxyError::Ports { .. },
            ) => {}
            Err(_) if !addrs.iter().any(|d| d.is_ipv4() == ip.is_ipv4()) => {}
            Err(_) => self.meter.connect_failed(ip, named, addrs, started),
        }
    }

    /// A new HTTP/1.1 connection from `lease`'s address (or, should this
    /// host not be able to use it, from the next: see `connect_leased`).
    async fn dial(
        &self,
        granted: Granted,
        addrs: &[SocketAddr],
        named: (&str, &str),
        sticky: Option<&Sticky>,
    ) -> Result<(Conn, Granted), Failed> {
        let (stream, granted) = self.connect_leased(granted, addrs, named, sticky).await?;
        Ok((Conn::new(stream), granted))
    }

    /// Sends the request on `conn` and waits up to the response timeout for
    /// the response head (after the body, which may take longer, as long as
    /// the destination takes some of it every response timeout). A timeout
    /// is an error; a failed exchange is
    /// returned (with whether the head went out) for the caller to decide
    /// whether to re-send.
    async fn exchange<B: ClientBody>(
        &self,
        conn: Conn,
        head: &request::Parts,
        fields: &Fields,
        body: Option<B>,
        expect_continue: bool,
        dest: Dest<'_>,
    ) -> Result<Result<Exchanged, (h1::Error, h1::Went)>, Failed> {
        let timeout = self.config.response_timeout;
        let mut went = h1::Went::default();
        let e = match conn
            .exchange(head, fields, body, expect_continue, timeout, &mut went)
            .await
        {
            Ok(r) => return Ok(Ok(r)),
            Err(h1::Error::Timeout { writing: false, .. }) => ProxyError::ResponseTimeout {
                dest: dest.to_string(),
                timeout,
            },
            Err(h1::Error::Timeout { writing: true, .. }) => ProxyError::WriteTimeout {
                dest: dest.to_string(),
                timeout,
            },
            // The client's body broke (it went, or sent a bad chunk): its
            // fault, not the destination's.
            Err(h1::Error::ClientBody(source)) => ProxyError::ClientBody(source),
            Err(h1::Error::ClientStalled { after }) => ProxyError::ClientTimeout { timeout: after },
            Err(e) => return Ok(Err((e, went))),
        };
        Err(Failed {
            error: e,
            source: None,
            sent: went.body(),
        })
    }

    async fn forward<B: ClientBody>(
        &self,
        mut parts: request::Parts,
        mut fields: Fields,
        body: B,
        sticky: Option<&Sticky>,
        leased: &mut Option<IpAddr>,
    ) -> Result<(Answer, Lease), Failed> {
        let target = absolute_target(&parts.uri, false)?;
        // RFC 9112 §3.2.2: the target's authority replaces any Host sent
        // (most clients send that same text: then it is kept as it is).
        // Two Host fields are refused, not forwarded (`only_host`).
        let authority = target.host_value;
        let host_as_sent = only_host(&fields)? == Some(authority.as_bytes());
        // hyper's server takes chunked off a request body and nothing else;
        // a body still coded (`gzip, chunked`) would go on with its coding's
        // name gone (Transfer-Encoding is hop-by-hop). (The fast path takes
        // no request with a Transfer-Encoding.)
        // Chunked twice (`chunked, chunked`, which RFC 9112 §6.1 forbids):
        // hyper takes off one, and the other's framing would go on as data.
        if let Fields::Map(m) = &fields {
            let values = m.get_all(header::TRANSFER_ENCODING).iter();
            let mut chunked = 0;
            for c in values.flat_map(|v| h1::codings(v.as_bytes())) {
                match c {
                    h1::Coding::Other => {
                        return Err(ProxyError::NotImplemented(
                            "a request body with a transfer coding other than chunked",
                        )
                        .into())
                    }
                    h1::Coding::Chunked => chunked += 1,
                    _ => {}
                }
            }
            if chunked > 1 {
                return Err(
                    ProxyError::BadRequest("a request body chunked more than once".into()).into(),
                );
            }
        }
        // Names are case-insensitive: one lower-case copy serves the lookup,
        // the site and the pool's key.
        // The client's `100-continue` is the destination's to answer (RFC
        // 9110 §10.1.1), so that a body it would refuse is not sent: `h1`
        // writes the field again (it goes with the hop-by-hop ones). One
        // hyper's server will not answer is refused before a lease.
        let expect_continue = parts.version == Version::HTTP_11
            && !body.is_end_stream()
            && match expectation(&fields) {
                Expectation::None => false,
                Expectation::Continue => true,
                Expectation::Unmet => return Err(ProxyError::ExpectationFailed.into()),
            };
        let host = target.host.to_ascii_lowercase();
        let port = target.port;
        let (addrs, (mut lease, mut watch)) = self.resolve_and_lease(&host, port, sticky).await?;
        // For the line of a request given up from here (its client gone):
        // the address it went out from.
        *leased = Some(lease.ip);
        let mut key = Key {
            source: lease.ip,
            host,
            port,
        };
        let host = &key.host;
        // Formatted only for an error or a log line.
        let dest = Dest(host, port);

        outgoing(&mut fields, authority, host_as_sent)?;
        // (The absolute form kept: its authority names the destination to
        // the witness, as the request's answer will.)
        let origin = origin_form(&parts.uri);
        let absolute = std::mem::replace(&mut parts.uri, origin);
        let named = (host.as_str(), uri_authority(&absolute));
        parts.version = Version::HTTP_11;
        let body = (!body.is_end_stream()).then_some(body);
        // A request with a body goes on a new connection: one that carried
        // a body is not pooled again after it (see `h1`), and on a reused
        // one the destination's idle close, crossing the upload, failed
        // the request with a 502 that could not be retried (the body is
        // gone once sent). So does one that may not be sent twice (a
        // POST without a body), as squid sends it: a reused connection's
        // close crossing it was a 502 too.
        let pooled = match body {
            None if idempotent(&parts.method, &fields) => self.upstream.checkout(&key),
            _ => None,
        };
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => {
                let (c, dialed) = self.dial((lease, watch), &addrs, named, sticky).await?;
                // Another address, if the leased one could not be used.
                (lease, watch) = dialed;
                *leased = Some(lease.ip);
                key.source = lease.ip;
                (c, false)
            }
        };
        // A reused connection (a request without a body) may be sent the
        // request again, should the destination have closed it.
        let first = match self
            .exchange(conn, &parts, &fields, body, expect_continue, dest)
            .await
            .map_err(|e| e.from_source(lease.ip))?
        {
            // A 408 on a reused connection is the destination's word that
            // it closed the connection for being idle, sent as it closed
            // (RFC 9110 §15.5.9), not an answer to this request, whose
            // head went whole: Go's client, too, sends the request again
            // (if it may be: else the 408 is the answer).
            Ok((resp, _))
                if reused
                    && resp.status == StatusCode::REQUEST_TIMEOUT
                    && may_resend(
                        &parts.method,
                        &fields,
                        &h1::Error::ClosedBeforeResponse,
                        true,
                    ) =>
            {
                Err((h1::Error::ClosedBeforeResponse, h1::Went::head_only()))
            }
            first => first,
        };
        let (resp, body) = match first {
            Ok(r) => r,
            Err((e, went)) if reused && may_resend(&parts.method, &fields, &e, went.head) => {
                debug!(%dest, source = %lease.ip, error = %e, "reused upstream connection was closed; retrying on a new one");
                (conn, (lease, watch)) = self.dial((lease, watch), &addrs, named, sticky).await?;
                key.source = lease.ip;
                self.exchange(conn, &parts, &fields, None::<B>, false, dest)
                    .await
                    .map_err(|e| e.from_source(lease.ip))?
                    .map_err(|(source, _)| {
                        ProxyError::Upstream {
                            dest: dest.to_string(),
                            source,
                        }
                        .from_source(lease.ip)
                    })?
            }
            Err((source, went)) => {
                return Err(Failed {
                    error: ProxyError::Upstream {
                        dest: dest.to_string(),
                        source,
                    },
                    source: Some(lease.ip),
                    sent: went.body(),
                })
            }
        };
        let answer = self.answer(resp, body, (key, sticky.is_some()), (&lease, watch));
        Ok((answer, lease))
    }

    /// The client's answer: the destination's response (from `key`'s
    /// source, `lease`; in a sticky session or not), its hop-by-hop fields
    /// taken out, its push-back told the allocator; the connection pooled
    /// again after the body if it may be.
    #[inline(always)]
    fn answer(
        &self,
        resp: h1::ResponseHead,
        body: h1::ResponseBody,
        (key, sticky): (Key, bool),
        (lease, watch): (&Lease, bool),
    ) -> Answer {
        let mut resp_fields = Fields::Wire(resp.fields);
        self.observe(&key.host, lease, watch, resp.status, &resp_fields);
        resp_fields.strip_hop_by_hop(Message::Response);
        // Kept for the next request from its source, unless no request
        // will come from it in time: a source of a vast rotation (a /64),
        // outside a sticky session.
        let home = (sticky || crate::lease::source_recurs(lease.ip)).then(|| self.upstream.clone());
        let body = PooledBody::new(body, home, key, &self.meter, self.config.idle_timeout);
        self.expose_source(&mut resp_fields, lease);
        // RFC 9110 §6.2: rotor's own version, whatever the destination's
        // (hyper answers an HTTP/1.0 client in 1.0).
        Answer {
            status: resp.status,
            version: Version::HTTP_11,
            reason: resp.reason,
            fields: resp_fields,
            body: Either::Left(body),
        }
    }

    /// A WebSocket's opening handshake (RFC 6455 §4) to an `http://`
    /// target: sent from the next address on a connection of its own with
    /// its `Upgrade` (the one hop-by-hop field passed on), and on the
    /// destination's `101` the two connections are relayed as a CONNECT
    /// tunnel is (the drain, `--tunnel-idle-timeout`, a revoked user's
    /// cut), logged when it closes with status 101 and its bytes. Any
    /// other answer (a 400, a 426) reaches the client as a response.
    async fn websocket(
        &self,
        mut parts: request::Parts,
        mut fields: Fields,
        (client, start): (SocketAddr, Instant),
        (sticky, standing): (Option<&Sticky>, Option<Standing>),
        (entry, leased): (Option<Entry>, &mut Option<IpAddr>),
    ) -> Result<(Answer, Lease), Failed> {
        let target = absolute_target(&parts.uri, true)?;
        let authority = target.host_value;
        let host_as_sent = only_host(&fields)? == Some(authority.as_bytes());
        // As a CONNECT's: refused on a kept-alive connection once the
        // drain began (its relay would be cut at the drain's end).
        if parts.extensions.get::<KeptAlive>().is_some() && self.tunnels.is_closed() {
            return Err(ProxyError::Stopping.into());
        }
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| ProxyError::BadRequest("an upgrade on this connection".into()))?;
        let host = target.host.to_ascii_lowercase();
        let port = target.port;
        outgoing(&mut fields, authority, host_as_sent)?;
        // The WebSocket alone of what the client named (an `h2c` beside it
        // is not passed on).
        fields.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        fields.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let origin = origin_form(&parts.uri);
        let absolute = std::mem::replace(&mut parts.uri, origin);
        let named = (host.as_str(), uri_authority(&absolute));
        still_stands(standing.as_ref())?;
        let (addrs, granted) = self.resolve_and_lease(&host, port, sticky).await?;
        *leased = Some(granted.0.ip);
        let (conn, (lease, watch)) = self.dial(granted, &addrs, named, sticky).await?;
        *leased = Some(lease.ip);
        let timeout = self.config.response_timeout;
        let dest = Dest(&host, port);
        let switched = conn.upgrade(&parts, &fields, timeout).await.map_err(|e| {
            match e {
                h1::Error::Timeout { writing: false, .. } => ProxyError::ResponseTimeout {
                    dest: dest.to_string(),
                    timeout,
                },
                h1::Error::Timeout { writing: true, .. } => ProxyError::WriteTimeout {
                    dest: dest.to_string(),
                    timeout,
                },
                source => ProxyError::Upstream {
                    dest: dest.to_string(),
                    source,
                },
            }
            .from_source(lease.ip)
        })?;
        let (resp, upstream, early) = match switched {
            h1::Upgrade::Refused(resp, body) => {
                let key = Key {
                    source: lease.ip,
                    host,
                    port,
                };
                return Ok((
                    self.answer(resp, body, (key, sticky.is_some()), (&lease, watch)),
                    lease,
                ));
            }
            h1::Upgrade::Switched(resp, upstream, early) => (resp, upstream, early),
        };
        let mut resp_fields = Fields::Wire(resp.fields);
        // A switch to anything but the WebSocket asked for is not relayed.
        let upgrade = resp_fields
            .get(&header::UPGRADE)
            .map(HeaderValue::from_bytes);
        let upgrade = match upgrade {
            Some(Ok(u)) if names_token(u.as_bytes(), b"websocket") => u,
            _ => {
                let source =
                    h1::Error::Malformed("101 Switching Protocols to other than websocket");
                let dest = dest.to_string();
                return Err(ProxyError::Upstream { dest, source }.from_source(lease.ip));
            }
        };
        still_stands(standing.as_ref())?;
        self.observe(&host, &lease, watch, resp.status, &resp_fields);
        resp_fields.strip_hop_by_hop(Message::Response);
        resp_fields.insert(header::UPGRADE, upgrade);
        resp_fields.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        self.expose_source(&mut resp_fields, &lease);
        let entry = entry.map(|mut e| {
            e.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
            e
        });
        let unopened = self.unopened(entry, (lease.ip, uri_authority(&absolute)), start);
        let dest = format!("{host}:{port}");
        self.relay_upgraded(
            on_upgrade,
            (upstream, early),
            (client, dest, lease),
            standing,
            unopened,
        );
        let answer = Answer {
            status: resp.status,
            version: Version::HTTP_11,
            reason: resp.reason,
            fields: resp_fields,
            body: Either::Right(Either::Right(Empty::new())),
        };
        Ok((answer, lease))
    }

    async fn connect<B>(
        &self,
        mut req: Request<B>,
        (client, start): (SocketAddr, Instant),
        (sticky, standing): (Option<&Sticky>, Option<Standing>),
        entry: Option<Entry>,
        leased: &mut Option<IpAddr>,
    ) -> Result<(Answer, Lease), Failed> {
        let (host, port) = connect_target(req.uri())?;
        // 200 only once the upstream connection is up.
        let kept_alive = req.extensions().get::<KeptAlive>().is_some();
        let named = (host.as_str(), port, uri_authority(req.uri()));
        still_stands(standing.as_ref())?;
        let (upstream, lease) = self.open_tunnel(named, sticky, kept_alive, leased).await?;
        still_stands(standing.as_ref())?;
        let on_upgrade = hyper::upgrade::on(&mut req);
        let dest = format!("{host}:{port}");
        let unopened = self.unopened(entry, (lease.ip, uri_authority(req.uri())), start);
        let upstream = (upstream, Bytes::new());
        self.relay_upgraded(
            on_upgrade,
            upstream,
            (client, dest, lease),
            standing,
            unopened,
        );
        let mut resp = Answer::from(Response::new(Either::Right(Either::Right(Empty::new()))));
        self.expose_source(&mut resp.fields, &lease);
        Ok((resp, lease))
    }

    /// Relays a tunnel answered through hyper's server (a CONNECT's 200, a
    /// WebSocket's 101) once its client has taken the answer: `early`,
    /// what the destination sent behind its answer, first, then both
    /// ways, as every tunnel is (counted as it goes, closed after
    /// --tunnel-idle-timeout of silence, cut at the drain's end or for a
    /// removed user), tracked for the drain and logged when it ends. The
    /// tunnel takes over its connection's place under the limits
    /// (`Lingering::into_tunnel`), so it needs none of its own.
    fn relay_upgraded(
        &self,
        on_upgrade: hyper::upgrade::OnUpgrade,
        (upstream, early): (TcpStream, Bytes),
        (client, dest, lease): (SocketAddr, String, Lease),
        standing: Option<Standing>,
        unopened: Unopened,
    ) {
        let idle_limit = self.config.tunnel_idle_timeout;
        let open = TunnelOpen::new(&self.meter);
        let cut = self.tunnels_cut.clone();
        self.tunnels.spawn(async move {
            let (upgraded, log) = match on_upgrade.await {
                Ok(u) => (u, unopened.opened()),
                Err(e) => {
                    debug!(%client, %dest, error = %error_chain(&e), "client left before the tunnel opened");
                    return;
                }
            };
            let activity = Activity::new();
            let mut counted = Counted::new(&open.0, lease.ip);
            // Under the tunnel's limits (a client that takes none of it
            // is idle).
            let relay = async {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                if !early.is_empty() {
                    use tokio::io::AsyncWriteExt;
                    io.write_all(&early).await?;
                    io.flush().await?;
                    activity.moved(false, early.len() as u64);
                }
                crate::relay::tunnel(io.into_inner(), upstream, &activity, idle_limit).await
            };
            let result = until_ended(relay, &activity, idle_limit, (&cut, standing), &mut counted).await;
            log_tunnel_end(log, (client, &dest, &lease), result, &activity, counted);
        });
    }

    /// `Rotor-Source: ADDRESS` with `--expose-source`: which address served
    /// the request, for the client's logs.
    fn expose_source(&self, fields: &mut Fields, lease: &Lease) {
        if let Some(v) = self.source_value(lease.ip) {
            fields.insert(ROTOR_SOURCE.clone(), v);
        }
    }

    /// `Rotor-Source`'s value for `ip` (its name `ROTOR_SOURCE`), with
    /// `--expose-source`.
    fn source_value(&self, ip: IpAddr) -> Option<HeaderValue> {
        match self.config.expose_source {
            true => HeaderValue::from_str(&ip.to_string()).ok(),
            false => None,
        }
    }
}

/// A tunnel's access log line, when it closes: its bytes each way.
fn log_tunnel(
    log: Option<(Arc<AccessLog>, Entry)>,
    lease: &Lease,
    bytes: (u64, u64),
    error: Option<&'static str>,
) {
    if let Some((log, mut e)) = log {
        e.source = Some(lease.ip);
        e.error = e.error.or(error);
        // A CONNECT's or SOCKS5's success; a WebSocket's 101 is set.
        if e.status == 0 {
            e.status = 200;
        }
        (e.sent, e.received) = bytes;
        log.log(&e);
    }
}

/// The body of a request refused for declaring content it may not have
/// (a CONNECT's, a WebSocket handshake's), read and thrown away off the
/// request's task while the answer (a 400, a 407) goes out: a second,
/// 64 KiB at most (hyper's server closes the connection after the answer
/// once it is done with the body). Dropped unread before the answer was
/// written, hyper's server took the content for the start of the upgrade
/// it asked for and closed the connection with the answer unsent (3 in 20
/// on a connection it served after a chunked upload; the fast path
/// refuses these heads itself on the connections it serves).
fn drain_refused<B: ClientBody>(body: B) {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let mut body = body;
        let mut left = 64usize << 10;
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                let n = frame.data_ref().map_or(0, |d| d.len());
                match left.checked_sub(n) {
                    Some(l) => left = l,
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    });
}

/// Why a CONNECT whose head says content follows is refused.
pub(crate) const CONNECT_CONTENT: &str =
    "a CONNECT has no content: no Content-Length or Transfer-Encoding";
/// Why a WebSocket handshake whose head says content follows is refused.
pub(crate) const WEBSOCKET_CONTENT: &str =
    "a WebSocket handshake has no content: no Content-Length or Transfer-Encoding";

/// Whether a head's fields (name, value) say content follows it: a
/// Transfer-Encoding, or a Content-Length other than 0 (a CONNECT and a
/// WebSocket handshake have none). Hyper's path and the fast path's.
pub(crate) fn declares_content<'a>(mut fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> bool {
    fields.any(|(name, value)| {
        name.eq_ignore_ascii_case(b"transfer-encoding")
            || (name.eq_ignore_ascii_case(b"content-length") && value.trim_ascii() != b"0")
    })
}

/// The request's `Host`, if it sent one; two are refused (RFC 9112 §3.2):
/// a destination that read the second would serve another site than the
/// one leased, budgeted and judged for.
fn only_host(fields: &Fields) -> Result<Option<&[u8]>, ProxyError> {
    fields
        .get_only(&header::HOST)
        .map_err(|_| ProxyError::BadRequest("more than one Host field".into()))
}

/// The field `--expose-source` names the leased address in.
static ROTOR_SOURCE: HeaderName = HeaderName::from_static("rotor-source");

/// How long after its lease a request's connect must end for the
/// allocator to be told its site's budget start is late (a site's
/// window holds a margin of 50 ms at least; loopback connects take
/// well under a millisecond, and send nothing).
const SITE_START_LATE: Duration = Duration::from_millis(20);

/// The most of a port that is no port the access log writes.
const LOGGED_BAD_PORT: usize = 8;

/// What the access log says a request went to: host and port, never a
/// path, a query or userinfo.
pub(crate) fn log_target(uri: &Uri, connect: bool) -> String {
    let Some(auth) = uri.authority() else {
        return "-".into();
    };
    // Most targets are `host:port` already, after any userinfo: taken as
    // they are (a search from each end), with no split and no parse.
    let auth = auth.as_str();
    let host_port = auth
        .bytes()
        .rposition(|b| b == b'@')
        .map_or(auth, |i| &auth[i + 1..]);
    if let Some(colon) = host_port.bytes().rposition(|b| b == b':') {
        let port = &host_port.as_bytes()[colon + 1..];
        let host = &host_port[..colon];
        let bracketed = host.starts_with('[') && host.ends_with(']');
        let plain = bracketed || !host.bytes().any(|b| matches!(b, b':' | b'[' | b']'));
        // (Longer or larger ports, valid or not, the way below.)
        let port_ok = (1..=5).contains(&port.len())
            && port.iter().all(u8::is_ascii_digit)
            && (port.len() < 5 || port <= &b"65535"[..]);
        if plain && port_ok {
            return host_port.to_string();
        }
    }
    let parts = split_authority(auth);
    let (host, port) = (parts.host, parts.port);
    let default = match (connect, uri.scheme_str()) {
        (false, Some("https")) => "443",
        _ => "80",
    };
    let port = match (h1::decimal::<u16>(port.as_bytes()), port) {
        (Some(_), _) => port,
        // None written: the scheme's.
        (None, "") => default,
        // No port (the request's 400 says so): as written, cut, rather
        // than a port it never named. (A URI's text is ASCII.)
        (None, text) => &text[..text.len().min(LOGGED_BAD_PORT)],
    };
    let bracket = host.contains(':') && !host.starts_with('[');
    let mut s = String::with_capacity(host.len() + port.len() + 3);
    if bracket {
        s.push('[');
    }
    s.push_str(host);
    if bracket {
        s.push(']');
    }
    s.push(':');
    s.push_str(port);
    s
}

/// When a tunnel ends (`None`: closed for silence): its bytes, however it
/// ended (counted in `activity` as they moved), to the meter and the
/// access log, and one debug line.
/// Runs a tunnel's `relay` until it ends, nothing moves on it for
/// `idle_limit`, or the drain's time is up (`cut`).
async fn until_ended(
    relay: impl std::future::Future<Output = std::io::Result<()>>,
    activity: &Activity,
    idle_limit: Duration,
    (cut, mut standing): (&tokio_util::sync::CancellationToken, Option<Standing>),
    counted: &mut Counted<'_>,
) -> Ended {
    let revoked = async {
        match standing.as_mut() {
            Some(s) => s.revoked().await,
            None => std::future::pending().await,
        }
    };
    let idle = activity.idle_for(idle_limit);
    tokio::pin!(relay, revoked, idle);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + counted.every, counted.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The relay first: polled once, it holds its sockets under the
            // guard that resets a tunnel rotor ends (`relay::ResetUnlessDone`).
            // Never polled (the drain's cut already made), it was dropped
            // with its sockets' FIN.
            biased;
            r = &mut relay => return Ended::Relay(r),
            _ = &mut idle => return Ended::Idle,
            _ = cut.cancelled() => return Ended::Cut,
            _ = &mut revoked => return Ended::Revoked,
            _ = tick.tick() => counted.count(activity),
        }
    }
}

/// A tunnel's bytes as the meter has them: counted as they go, every
/// [`TUNNEL_COUNTED_EVERY`], not only when it ends (a tunnel open for
/// hours showed nothing in `rotor_bytes_total`, then all at once; a
/// worker killed meanwhile never counted them).
struct Counted<'a> {
    meter: &'a Meter,
    ip: IpAddr,
    every: Duration,
    /// Up and down, as counted so far.
    so_far: (u64, u64),
}

/// How often an open tunnel's bytes reach the meter.
const TUNNEL_COUNTED_EVERY: Duration = Duration::from_secs(10);

impl<'a> Counted<'a> {
    fn new(meter: &'a Meter, ip: IpAddr) -> Counted<'a> {
        Counted {
            meter,
            ip,
            every: TUNNEL_COUNTED_EVERY,
            so_far: (0, 0),
        }
    }

    /// Counts what moved since the last count.
    fn count(&mut self, activity: &Activity) {
        let (up, down) = activity.bytes();
        let (was_up, was_down) = std::mem::replace(&mut self.so_far, (up, down));
        self.meter.bytes(
            self.ip,
            up.saturating_sub(was_up),
            down.saturating_sub(was_down),
        );
    }
}

/// How a tunnel ended.
enum Ended {
    Relay(std::io::Result<()>),
    /// Nothing moved for --tunnel-idle-timeout.
    Idle,
    /// Still open when the drain's time was up.
    Cut,
    /// Its user was removed from the users file, or given another
    /// password.
    Revoked,
}

fn log_tunnel_end(
    log: Option<(Arc<AccessLog>, Entry)>,
    (client, dest, lease): (SocketAddr, &str, &Lease),
    result: Ended,
    activity: &Activity,
    mut counted: Counted<'_>,
) {
    counted.count(activity);
    let (up, down) = activity.bytes();
    // One the worker's stop cut says so: it read as one that ended.
    let cut = matches!(result, Ended::Cut).then_some(WORKER_STOPPED);
    log_tunnel(log, lease, (up, down), cut);
    match result {
        Ended::Idle => debug!(%client, %dest, source = %lease.ip, up, down, "tunnel idle; closed"),
        Ended::Cut => {
            debug!(%client, %dest, source = %lease.ip, up, down, "tunnel cut by the stop")
        }
        Ended::Revoked => {
            tracing::info!(%client, %dest, source = %lease.ip, up, down, "tunnel closed: its user was removed from the users file or given another password")
        }
        Ended::Relay(Ok(_)) => {
            debug!(%client, %dest, source = %lease.ip, up, down, "tunnel closed")
        }
        Ended::Relay(Err(e)) => {
            debug!(%client, %dest, source = %lease.ip, up, down, error = %e, "tunnel ended with an error")
        }
    }
}

/// A request target as logged: scheme, host, port and path only.
struct LogTarget(Uri);

/// A connect its request gave up on (the client left, its future dropped)
/// after [`ABANDONED_AFTER`] counts as failed: a source whose SYNs go
/// nowhere is seen even where clients give up before `--connect-timeout`.
struct Dialing<'a> {
    meter: &'a crate::meter::Meter,
    ip: IpAddr,
    addrs: &'a [SocketAddr],
    named: (&'a str, &'a str),
    started: Instant,
    armed: bool,
}

/// Two SYNs sent again (at 1 s and 3 s) and no answer.
const ABANDONED_AFTER: Duration = Duration::from_secs(3);

impl Drop for Dialing<'_> {
    fn drop(&mut self) {
        if self.armed && self.started.elapsed() >= ABANDONED_AFTER {
            self.meter
                .connect_failed(self.ip, self.named, self.addrs, self.started);
        }
    }
}

impl LogTarget {
    /// The destination's authority, as written ("" if none).
    fn dest(&self) -> &str {
        uri_authority(&self.0)
    }
}

/// `uri`'s authority as written ("" if none): what the witness knows a
/// destination by (`witness::dest_base`).
fn uri_authority(uri: &Uri) -> &str {
    uri.authority().map_or("", |a| a.as_str())
}

impl std::fmt::Display for LogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = &self.0;
        if let Some(s) = uri.scheme_str() {
            write!(f, "{s}://")?;
        }
        if let Some(a) = uri.authority() {
            f.write_str(a.host())?;
            if let Some(p) = a.port() {
                write!(f, ":{p}")?;
            }
        }
        if uri.scheme().is_some() || uri.authority().is_none() {
            f.write_str(uri.path())?;
        }
        Ok(())
    }
}

/// A destination as `host:port`, formatted only when shown.
#[derive(Clone, Copy)]
struct Dest<'a>(&'a str, u16);

impl std::fmt::Display for Dest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// The `Max-Forwards` of a TRACE or OPTIONS (RFC 9110 §7.6.2; other
/// methods' is passed on as it came): the least of its values (fields or
/// list members), one too
/// large for a u64 taken as u64::MAX; values that are not numbers are
/// passed over, and none is `None`. (Cold: the common request asks
/// nothing of it.)
#[cold]
fn max_forwards(fields: &Fields) -> Option<u64> {
    fields
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"max-forwards"))
        // A field may be a list (`0, 5`), as two fields would be.
        .flat_map(|(_, value)| value.split(|b| *b == b','))
        .filter_map(|value| {
            let value = value.trim_ascii();
            (!value.is_empty() && value.iter().all(u8::is_ascii_digit)).then(|| {
                value.iter().fold(0u64, |n, d| {
                    n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                })
            })
        })
        .min()
}

/// Rotor's own answer to a TRACE or OPTIONS it is the final recipient of.
/// TRACE reflects the request as it came, as `message/http`, less the
/// fields that carry credentials (RFC 9110 §9.3.8); OPTIONS says which
/// methods rotor forwards.
fn own_answer(parts: &request::Parts, fields: &Fields) -> Response<Full<Bytes>> {
    const SECRET: [&[u8]; 3] = [b"proxy-authorization", b"authorization", b"cookie"];
    if parts.method != Method::TRACE {
        let mut resp = Response::new(Full::new(Bytes::new()));
        resp.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(
                "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT",
            ),
        );
        return resp;
    }
    // The target less any userinfo (`http://user:pass@host/`).
    let uri = &parts.uri;
    let mut target = String::new();
    if let (Some(scheme), Some(a)) = (uri.scheme_str(), uri.authority()) {
        target.push_str(scheme);
        target.push_str("://");
        target.push_str(a.host());
        if let Some(p) = a.port() {
            target.push(':');
            target.push_str(p.as_str());
        }
    }
    target.push_str(uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut head = format!("TRACE {target} {:?}\r\n", parts.version).into_bytes();
    for (name, value) in fields.iter() {
        if SECRET.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            continue;
        }
        head.extend_from_slice(name);
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut resp = Response::new(Full::new(Bytes::from(head)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("message/http"),
    );
    resp
}

/// Whether a request that failed on a reused upstream connection, before any
/// response, may be sent again on a new one: the destination closing an idle
/// connection just as a request goes out is routine. As other HTTP clients
/// do (RFC 9110 §9.2.2), only idempotent requests are re-sent, unless
/// nothing of the request was written.
fn may_resend(method: &Method, fields: &Fields, e: &h1::Error, written: bool) -> bool {
    e.before_response() && (!written || idempotent(method, fields))
}

/// Whether a request may be sent twice (RFC 9110 §9.2.2): its method is
/// idempotent, or it carries an `Idempotency-Key`.
#[inline]
fn idempotent(method: &Method, fields: &Fields) -> bool {
    static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    ) || fields.get(&IDEMPOTENCY_KEY).is_some()
}

/// The method an access line names for a request not read (`-`), or a
/// SOCKS5 client's.
fn unread_method(name: &'static [u8]) -> Method {
    Method::from_bytes(name).expect("a token")
}

/// A request's fields as they go on: the hop-by-hop ones out, and `Host`
/// set from the target's `authority` unless the client sent that very
/// text (RFC 9112 §3.2.2).
#[inline]
fn outgoing(fields: &mut Fields, authority: &str, host_as_sent: bool) -> Result<(), ProxyError> {
    fields.strip_hop_by_hop(Message::Request);
    if !host_as_sent {
        let value = HeaderValue::from_str(authority).map_err(|_| {
            ProxyError::BadRequest("the target host is not a valid header value".into())
        })?;
        fields.insert(header::HOST, value);
    }
    Ok(())
}

/// Whether a request is a WebSocket's opening handshake (RFC 6455 §4.1):
/// a `GET` in HTTP/1.1 whose `Upgrade` names `websocket` and whose
/// `Connection` names `upgrade`. Other upgrades (`h2c`, which curl asks
/// for unprompted) are not passed on: the request goes as a plain one,
/// rotating as every request does.
fn asks_websocket(parts: &request::Parts, fields: &Fields) -> bool {
    let names = |name: &str, token: &[u8]| match fields {
        Fields::Map(m) => m
            .get_all(name)
            .iter()
            .any(|v| names_token(v.as_bytes(), token)),
        Fields::Wire(_) => false,
    };
    parts.method == Method::GET && parts.version == Version::HTTP_11 && websocket_fields(names)
}

/// Whether a `GET`'s fields ask for a WebSocket: `Upgrade` names
/// `websocket` and `Connection` names `upgrade`; `names(field, token)`
/// whether a field of that (lower-case) name names the token. (The fast
/// path's look at a head, and hyper's path's.)
pub(crate) fn websocket_fields(names: impl Fn(&str, &[u8]) -> bool) -> bool {
    names("upgrade", b"websocket") && names("connection", b"upgrade")
}

/// What a request's `Expect` fields ask for.
#[derive(Debug, PartialEq)]
enum Expectation {
    /// No `100-continue` (any other expectation is not rotor's to meet,
    /// and goes no further: `Expect` is hop-by-hop here).
    None,
    /// `100-continue`, which the client's `100` answers.
    Continue,
    /// `100-continue` in a form hyper's server sends no `100` for: in a
    /// list (`100-continue, foo`), beside another `Expect` field, or with
    /// an empty member. hyper reads only the last field, whole; rotor
    /// cannot write the `100` itself, so the client, waiting for one,
    /// would wait until its own timer (or forever) and rotor's body
    /// timeout answer it 408: a 417 at once tells it (curl then sends
    /// the request again without `Expect`).
    Unmet,
}

/// What `fields` expect (RFC 9110 §10.1.1), as hyper's server reads it.
fn expectation(fields: &Fields) -> Expectation {
    let mut asked = false;
    let mut last = None;
    for (name, value) in fields.iter() {
        if name.eq_ignore_ascii_case(b"expect") {
            asked |= names_token(value, b"100-continue");
            last = Some(value);
        }
    }
    match last {
        _ if !asked => Expectation::None,
        // hyper's own test (`proto::h1::role`, `Server::parse`).
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => Expectation::Continue,
        _ => Expectation::Unmet,
    }
}

/// Whether a list field's value names `token` (case-insensitively): an
/// `Expect` its `100-continue`, an `Upgrade` its `websocket`.
pub(crate) fn names_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Checks a request target as the proxy would (for fuzzing and tests):
/// `connect` for a CONNECT authority, else an absolute-form URI.
pub fn check_target(uri: &Uri, connect: bool) -> Result<(String, u16), ProxyError> {
    if connect {
        connect_target(uri)
    } else {
        let t = absolute_target(uri, false)?;
        origin_form(uri);
        Ok((t.host.to_string(), t.port))
    }
}

/// An absolute-form target's destination, and the `Host` value it
/// gives: `host[:port]` as the target wrote it, without the userinfo (and
/// without the colon of an empty port).
#[derive(Debug)]
struct Target<'a> {
    host: &'a str,
    port: u16,
    host_value: &'a str,
}

/// The destination of an absolute-form target. `ws://` is taken for a
/// WebSocket's opening handshake (`websocket`: aiohttp writes its URL's
/// scheme into the request line), as `http://`.
fn absolute_target(uri: &Uri, websocket: bool) -> Result<Target<'_>, ProxyError> {
    match uri.scheme_str() {
        Some("http") => {}
        Some("ws") if websocket => {}
        Some("ws") => {
            return Err(ProxyError::BadRequest(
                "a ws:// target is a WebSocket's opening handshake: a GET with \
                 `Upgrade: websocket` and `Connection: Upgrade`"
                    .into(),
            ))
        }
        Some(tls @ ("https" | "wss")) => {
            return Err(ProxyError::BadRequest(format!(
                "{tls}:// targets need a CONNECT tunnel (set the proxy for {tls} too)"
            )))
        }
        Some(other) => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported scheme `{other}`"
            )))
        }
        None => {
            return Err(ProxyError::BadRequest(
                "rotor is a forward proxy: send an absolute http:// URI or CONNECT host:port"
                    .into(),
            ))
        }
    }
    let auth = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("the target URI has no host".into()))?;
    let parts = split_authority(auth.as_str());
    if parts.host.is_empty() {
        return Err(ProxyError::BadRequest(
            "the target URI has an empty host".into(),
        ));
    }
    crate::dns::check_spelling(parts.host)?;
    // `http::Uri` accepts `host:99999`, `host:abc` and `host:+80`, with no
    // port number to give (a port is digits, RFC 3986 §3.2.3): refuse
    // rather than fall back to 80 or read a sign. (The userinfo is not in
    // `port`: its `:` is no port, and it must never reach an error message
    // or a log.)
    let port = match parts.port {
        "" => 80,
        text => port_written(text)?,
    };
    Ok(Target {
        host: parts.host,
        port,
        host_value: parts.host_value,
    })
}

/// A target's port as written (`text`, not empty), for an absolute
/// target and a CONNECT alike: digits of a port other than 0.
#[inline]
fn port_written(text: &str) -> Result<u16, ProxyError> {
    match h1::decimal::<u16>(text.as_bytes()) {
        Some(0) => Err(ProxyError::BadRequest("port 0 is not a destination".into())),
        Some(port) => Ok(port),
        None => Err(ProxyError::BadRequest(format!("invalid port `{text}`"))),
    }
}

/// An authority's parts, as `http`'s `Authority::host` and `port` find
/// them, in one pass over it (each of those searches it again, and the
/// `Host` value a third time).
#[derive(Debug, PartialEq)]
struct AuthorityParts<'a> {
    /// `[v6]` with its brackets, or up to the first `:`.
    host: &'a str,
    /// After the last `:` of `host:port` (empty without one, or when it
    /// is inside the brackets).
    port: &'a str,
    /// `host[:port]`, the userinfo and a trailing `:` left out.
    host_value: &'a str,
}

fn split_authority(auth: &str) -> AuthorityParts<'_> {
    let b = auth.as_bytes();
    let start = b.iter().rposition(|&c| c == b'@').map_or(0, |i| i + 1);
    let host_port = &auth[start..];
    let (mut first_colon, mut last_colon) = (None, None);
    let (mut first_close, mut last_close) = (None, None);
    for (i, &c) in host_port.as_bytes().iter().enumerate() {
        match c {
            b':' => {
                first_colon.get_or_insert(i);
                last_colon = Some(i);
            }
            b']' => {
                first_close.get_or_insert(i);
                last_close = Some(i);
            }
            _ => {}
        }
    }
    let host = match (host_port.starts_with('['), first_close) {
        (true, Some(i)) => &host_port[..=i],
        (true, None) => host_port,
        (false, _) => &host_port[..first_colon.unwrap_or(host_port.len())],
    };
    let port = match (last_colon, last_close) {
        (Some(c), Some(b)) if b > c => "",
        (Some(c), _) => &host_port[c + 1..],
        (None, _) => "",
    };
    let host_value = host_port.strip_suffix(':').unwrap_or(host_port);
    AuthorityParts {
        host,
        port,
        host_value,
    }
}

/// `host` and `port` of a CONNECT target (`authority-form`, port required).
fn connect_target(uri: &Uri) -> Result<(String, u16), ProxyError> {
    let auth = uri
        .authority()
        .filter(|_| {
            uri.scheme().is_none()
                && uri
                    .path_and_query()
                    .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
        })
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
    // authority-form is `uri-host ":" port` (RFC 9112 §3.2.3): `user@` is
    // no part of it, and taken off quietly it would tunnel a target the
    // client did not write.
    if auth.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "a CONNECT target is host:port, with no userinfo".into(),
        ));
    }
    let port = match split_authority(auth.as_str()).port {
        "" => return Err(ProxyError::BadRequest("CONNECT target has no port".into())),
        text => port_written(text)?,
    };
    if auth.host().is_empty() {
        return Err(ProxyError::BadRequest(
            "CONNECT target is not a host:port".into(),
        ));
    }
    crate::dns::check_spelling(auth.host())?;
    Ok((auth.host().to_string(), port))
}

fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        // The path and query as parsed (shared bytes: no copy, no parse).
        Some(pq) if pq.as_str().starts_with('/') => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(pq.clone());
            Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
        }
        // `http://host?q` has a query but an empty path.
        Some(pq) => format!("/{}", pq.as_str())
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/")),
        None => Uri::from_static("/"),
    }
}

/// The size of `req`'s head as sent: request line, header lines, and the
/// blank line (hyper's read buffer, which also bounds it, may hold more).
fn head_len(req: &request::Parts, fields: &Fields) -> usize {
    // The target as it came (no string built): scheme://authority, then
    // the path and query.
    let uri = &req.uri;
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    fields.encoded_len() + line + 2
}

/// A request dropped before it was answered: its client went away (its
/// server — hyper's, or the fast path watching the connection — dropped
/// the request's future, and with it the lease, the upstream connection
/// and the body), or the worker stopped with it in flight. Counted as
/// `client_closed` and logged with status 499 (as nginx does), or
/// `worker_stopped` and 503, so an operator sees requests given up.
struct Abandoned<'a> {
    proxy: &'a Proxy,
    start: Instant,
    client: SocketAddr,
    method: &'a Method,
    target: &'a LogTarget,
    entry: Option<Box<Entry>>,
    /// The address a forward went out from, once leased (its line's
    /// source: a request given up after its lease said `-`).
    leased: Option<IpAddr>,
    armed: bool,
}

/// A tunnel answered (CONNECT's 200, SOCKS5's success) whose client has
/// not taken the answer yet. Dropped so, it is counted and logged as a
/// request given up, as [`Abandoned`] does (`client_closed` and 499, or
/// `worker_stopped` and 503 when the worker stops with it), not as a
/// tunnel that opened and moved nothing: the destination did answer.
/// [`Unopened::opened`] counts it as a tunnel instead.
pub(crate) struct Unopened {
    meter: Arc<Meter>,
    log: Option<(Arc<AccessLog>, Entry)>,
    source: IpAddr,
    /// The destination's authority, as the witness knows it.
    dest: String,
    start: Instant,
    /// The drain's cut (`Proxy::tunnels_cut`).
    stopping: tokio_util::sync::CancellationToken,
    armed: bool,
}

impl Unopened {
    /// The client took the answer: a tunnel opened, counted; its access
    /// log line's beginning, for when it closes.
    pub fn opened(mut self) -> Option<(Arc<AccessLog>, Entry)> {
        self.armed = false;
        let took = self.start.elapsed();
        self.meter.tunnel(self.source, || &self.dest, took);
        self.log.take()
    }
}

impl Drop for Unopened {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (why, status) = given_up(&self.stopping);
        let took = self.start.elapsed();
        self.meter
            .tunnel_unopened(self.source, || &self.dest, why, took);
        log_given_up(self.log.take(), Some(self.source), (why, status));
    }
}

/// The access-log line of a request given up (`given_up`'s error and
/// status), from `source` if it had one.
fn log_given_up(
    log: Option<(Arc<AccessLog>, Entry)>,
    source: Option<IpAddr>,
    (why, status): (&'static str, u16),
) {
    if let Some((log, mut e)) = log {
        if source.is_some() {
            e.source = source;
        }
        e.status = status;
        e.error = Some(why);
        log.log(&e);
    }
}

/// A request whose answer is not given yet (a SOCKS5 tunnel being
/// opened). Dropped so (its task dropped with the worker at the drain's
/// cut), it is counted and logged as given up, as [`Abandoned`] does:
/// `worker_stopped` and 503, or `client_closed` and 499. It had no line.
pub(crate) struct Pending {
    meter: Arc<Meter>,
    log: Option<(Arc<AccessLog>, Entry)>,
    start: Instant,
    stopping: tokio_util::sync::CancellationToken,
    armed: bool,
}

impl Pending {
    /// It is answered (or its end said otherwise): its line, to go on
    /// with.
    pub fn answered(mut self) -> Option<Entry> {
        self.armed = false;
        self.log.take().map(|(_, e)| e)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (why, status) = given_up(&self.stopping);
        self.meter.error(Some(why), self.start.elapsed());
        log_given_up(self.log.take(), None, (why, status));
    }
}

/// Logs a request (HTTP or SOCKS5) that failed with `e`, answered
/// `status` after `ms`: at warn when each is worth an operator's look, else
/// at debug. The client is told the log says why a lease failed: so it
/// does, at the default level, once in 10 s (a dead allocator fails every
/// request).
pub(crate) fn log_failed(
    e: &ProxyError,
    (client, method, target): (SocketAddr, &Method, &dyn std::fmt::Display),
    source: Option<IpAddr>,
    status: u16,
    ms: u64,
) {
    let error = error_chain(e);
    // Written as a served request's is (`source=127.0.0.2`, not quoted),
    // `-` for none.
    let source = source.map_or_else(|| "-".to_string(), |ip| ip.to_string());
    debug!(fault = ?e.fault(), %client, %method, %target, source = %source, status, %error, ms, "request failed");
    if let Some((said, what)) = must_act(e) {
        if let Some(failed) = said.count_in(SAID_EVERY) {
            warn!(failed, %error, "requests failed {what} (said once in 10 s)");
        }
    }
}

/// How soon a sticky session's request refused while its address cools
/// asks again (see `Proxy::lease`).
const SESSION_LOOK_AGAIN: Duration = Duration::from_millis(200);

/// How often a failure an operator must act on is said at most.
const SAID_EVERY: Duration = Duration::from_secs(10);

/// What an operator must act on, said once in 10 s with how many failed
/// since (a warning a request would flood the log; each is at debug): the
/// allocator, this host's ports or sockets, a pool address it cannot use,
/// the resolver, an empty pool, this host's routes or firewall. Each
/// one's moment, and what the requests failed for.
static MUST_ACT: [(rotor_protocol::Moment, &str); 6] = [
    (rotor_protocol::Moment::new(), "for want of a lease from the allocator"),
    (rotor_protocol::Moment::new(), "for want of a local port or socket on this host"),
    (rotor_protocol::Moment::new(), "as this host cannot use the pool's addresses"),
    (
        rotor_protocol::Moment::new(),
        "as name resolution failed (the DNS servers did not answer, or failed)",
    ),
    (
        rotor_protocol::Moment::new(),
        "as the pool has no address in the rotation (it is empty, or every entry is out: see `rotor status`)",
    ),
    (
        rotor_protocol::Moment::new(),
        "as this host's routes or firewall forbid their destinations (a `prohibit` route, a rule that rejects)",
    ),
];

/// `e`'s entry of [`MUST_ACT`], if an operator must act on it.
fn must_act(e: &ProxyError) -> Option<&'static (rotor_protocol::Moment, &'static str)> {
    let i = match e {
        ProxyError::Allocator(_) => 0,
        ProxyError::Ports { .. } | ProxyError::Socket(_) => 1,
        ProxyError::SourceUnavailable { .. } => 2,
        ProxyError::DnsTimeout { .. } | ProxyError::DnsAgain { .. } => 3,
        ProxyError::NoAddress(rotor_protocol::NoAddress::EmptyPool) => 4,
        ProxyError::Connect { source, .. } if crate::error::prohibited(source) => 5,
        _ => return None,
    };
    Some(&MUST_ACT[i])
}

/// Says how many failed since the last warning of each kind, once that is
/// 10 s old (call it every second): a storm that ended left its last
/// failures unsaid ("failed=1" for 151 requests), with nothing to say it
/// was over.
pub fn say_failed_since() {
    for (said, what) in &MUST_ACT {
        if let Some(failed) = said.unsaid(SAID_EVERY) {
            warn!(
                failed,
                "requests failed {what}, since the last warning of it (said once in 10 s)"
            );
        }
    }
}

/// A 407 if `standing`'s user no longer stands (a reload removed it, or
/// gave it another password, since it logged in): looked at before a
/// tunnel is opened and again before it is answered, so a revoked user is
/// given no lease, connect or success in between.
pub(crate) fn still_stands(standing: Option<&Standing>) -> Result<(), ProxyError> {
    match standing.is_some_and(Standing::is_revoked) {
        true => Err(ProxyError::Auth(crate::auth::AuthError::Wrong)),
        false => Ok(()),
    }
}

/// Status of an access log line for a request its client gave up on,
/// and its error.
pub(crate) const CLIENT_CLOSED: u16 = 499;
pub(crate) const CLIENT_CLOSED_ERROR: &str = "client_closed";

/// The worker's stop cut what was still open (`Proxy::cut_tunnels`): a
/// response cut then is `worker_stopped`, whatever it waited for.
static WORKER_CUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the worker's stop cut what was still open.
pub(crate) fn worker_cut() -> bool {
    WORKER_CUT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The error of a request the worker dropped as it stopped (a drain that
/// ran out): logged 503, as the connection closes with no answer.
pub(crate) const WORKER_STOPPED: &str = "worker_stopped";

/// A request given up, by whom: with the runtime after a drain that ran
/// out (`stopping`: the drain's cut made), `worker_stopped` and 503, else
/// its client's going, `client_closed` and 499.
fn given_up(stopping: &tokio_util::sync::CancellationToken) -> (&'static str, u16) {
    match stopping.is_cancelled() {
        true => (WORKER_STOPPED, StatusCode::SERVICE_UNAVAILABLE.as_u16()),
        false => (CLIENT_CLOSED_ERROR, CLIENT_CLOSED),
    }
}

impl Abandoned<'_> {
    /// The request's access-log line, begun.
    fn new_entry(&self) -> Box<Entry> {
        let target = log_target(&self.target.0, *self.method == Method::CONNECT);
        Box::new(Entry::new(
            self.start,
            self.client,
            self.method.clone(),
            target,
        ))
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let took = self.start.elapsed();
        let (why, status) = given_up(&self.proxy.tunnels_cut);
        self.proxy.meter.error(Some(why), took);
        // (Gone while its credentials were checked: a line without them.)
        let entry = self.entry.take().or_else(|| {
            self.proxy
                .config
                .access_log
                .as_ref()
                .map(|_| self.new_entry())
        });
        let source = self.leased;
        if let (Some(mut e), Some(log)) = (entry, &self.proxy.config.access_log) {
            e.status = status;
            e.error = Some(why);
            e.source = e.source.or(source);
            log.log(&e);
        }
        debug!(client = %self.client, method = %self.method, target = %self.target, source = %source.map_or_else(|| "-".into(), |ip| ip.to_string()), ms = took.as_millis() as u64, error = why, "request given up before its answer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Expect` read as hyper's server reads it: a `100` is asked for
    /// only by a last field of `100-continue` alone.
    #[test]
    fn an_expectation_is_read_as_hyper_reads_it() {
        for (pairs, want) in [
            (&[][..], Expectation::None),
            (&[("expect", "x-foo")][..], Expectation::None),
            (&[("expect", "100-continue")][..], Expectation::Continue),
            (&[("expect", "100-CONTINUE")][..], Expectation::Continue),
            (
                &[("expect", "x-foo"), ("expect", "100-continue")][..],
                Expectation::Continue,
            ),
            (&[("expect", "100-continue, x-foo")][..], Expectation::Unmet),
            (&[("expect", "100-continue,")][..], Expectation::Unmet),
            (
                &[("expect", "100-continue"), ("expect", "x-foo")][..],
                Expectation::Unmet,
            ),
        ] {
            let map = Fields::Map(crate::fields::map_for_tests(pairs));
            assert_eq!(expectation(&map), want, "{pairs:?}");
            let wire = Fields::Wire(crate::fields::wire_for_tests(pairs));
            assert_eq!(expectation(&wire), want, "{pairs:?}");
        }
    }

    /// Two ends of a loopback TCP connection.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (near, l.accept().await.unwrap().0)
    }

    /// A tunnel cut before its relay ran at all (the drain's time was up
    /// already) is reset on both sides, as one cut while it runs is.
    #[tokio::test]
    async fn a_tunnel_cut_before_it_ran_is_reset() {
        use tokio::io::AsyncReadExt;
        let cut = tokio_util::sync::CancellationToken::new();
        cut.cancel();
        // The select's order is random unless fixed: a few times over.
        for _ in 0..8 {
            let (mut client, relay_client) = socket_pair().await;
            let (relay_up, mut server) = socket_pair().await;
            let activity = Activity::new();
            let idle = Duration::from_secs(60);
            let relay = crate::relay::tcp_tunnel(relay_client, relay_up, &activity, idle);
            let meter = Meter::default();
            let mut counted = Counted::new(&meter, "127.0.0.1".parse().unwrap());
            let ended = until_ended(relay, &activity, idle, (&cut, None), &mut counted).await;
            assert!(matches!(ended, Ended::Cut));
            for peer in [&mut client, &mut server] {
                let mut rest = Vec::new();
                let end = tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut rest))
                    .await
                    .unwrap();
                assert_eq!(
                    end.map_err(|e| e.kind()),
                    Err(std::io::ErrorKind::ConnectionReset)
                );
            }
        }
    }

    #[test]
    fn log_targets_are_host_and_port_only() {
        for (uri, connect, want) in [
            (
                "http://user:pw@example.com:8080/a?token=1",
                false,
                "example.com:8080",
            ),
            ("http://example.com/", false, "example.com:80"),
            ("http://Example.com:/x", false, "Example.com:80"),
            ("https://example.com/", false, "example.com:443"),
            ("example.com:443", true, "example.com:443"),
            ("http://[2001:db8::1]:81/", false, "[2001:db8::1]:81"),
            ("http://[2001:db8::1]/", false, "[2001:db8::1]:80"),
            ("[2001:db8::1]:443", true, "[2001:db8::1]:443"),
            ("http://h:99999/", false, "h:99999"),
            ("http://127.0.0.1:abc/", false, "127.0.0.1:abc"),
            ("http://h:123456789/", false, "h:12345678"),
            ("127.0.0.1:abc", true, "127.0.0.1:abc"),
            ("http://h:65535/", false, "h:65535"),
            ("http://h:065535/", false, "h:065535"),
            ("http://h:0080/", false, "h:0080"),
            ("http://u@[::1]:8/", false, "[::1]:8"),
            ("/origin-form", false, "-"),
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(log_target(&uri, connect), want, "{uri}");
        }
    }

    #[test]
    fn absolute_targets() {
        let t = |uri: &str, host: &str, port: u16, value: &str| {
            let uri: Uri = uri.parse().unwrap();
            let t = absolute_target(&uri, false).unwrap();
            assert_eq!((t.host, t.port, t.host_value), (host, port, value));
        };
        t("http://example.com/x", "example.com", 80, "example.com");
        t("http://Example.COM:/x", "Example.COM", 80, "Example.COM");
        // The head's size counts the target as sent.
        let (req, ()) = Request::get("http://example.com:8080/a?b")
            .body(())
            .unwrap()
            .into_parts();
        let want = "GET http://example.com:8080/a?b HTTP/1.1\r\nX: yy\r\n\r\n".len();
        let map = Fields::Map(crate::fields::map_for_tests(&[("x", "yy")]));
        assert_eq!(head_len(&req, &map), want);
        let wire = Fields::Wire(crate::fields::wire_for_tests(&[("X", "yy")]));
        assert_eq!(head_len(&req, &wire), want);
        // A password in the target is no port, and shows nowhere.
        t(
            "http://user:TopSecret@origin.test/",
            "origin.test",
            80,
            "origin.test",
        );
        // A WebSocket's handshake may name its own scheme (aiohttp does).
        let uri = "ws://origin.test/chat".parse().unwrap();
        let ws = absolute_target(&uri, true).unwrap();
        assert_eq!((ws.host, ws.port), ("origin.test", 80));
        let wss = absolute_target(&"wss://origin.test/".parse().unwrap(), true).unwrap_err();
        assert!(wss.to_string().contains("CONNECT"), "{wss}");
        let err = absolute_target(
            &"http://user:TopSecret@origin.test:x/".parse().unwrap(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("TopSecret"), "{err}");
        t("http://u:pw@[::1]:8080/", "[::1]", 8080, "[::1]:8080");
        t("http://[::1]/", "[::1]", 80, "[::1]");
        for bad in [
            "/x",
            "https://example.com/",
            "ftp://example.com/",
            // Not a WebSocket's handshake (see below), or one over TLS.
            "ws://example.com/",
            "wss://example.com/",
            "http://example.com:99999/",
            "http://example.com:abc/",
            "http://example.com:0/",
            "http://example.com:+80/",
            // Other spellings of an address or a name than the one.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://a.0x1/",
            "http://[example.com]/",
            "http://[127.0.0.1]/",
        ] {
            assert!(
                matches!(
                    absolute_target(&bad.parse().unwrap(), false),
                    Err(ProxyError::BadRequest(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_host_longer_than_any_name_is_refused() {
        let long = format!("{}127.0.0.1", "0".repeat(300));
        for uri in [format!("http://{long}/"), format!("http://{long}:80/")] {
            let got = absolute_target(&uri.parse().unwrap(), false).err();
            assert!(matches!(got, Some(ProxyError::BadRequest(_))), "{got:?}");
        }
        let got = connect_target(&format!("{long}:443").parse().unwrap()).err();
        assert!(matches!(got, Some(ProxyError::BadRequest(_))), "{got:?}");
        let most = format!("{}.test", "a".repeat(crate::dns::MAX_NAME - 5));
        assert!(absolute_target(&format!("http://{most}/").parse().unwrap(), false).is_ok());
        assert!(connect_target(&format!("{most}:443").parse().unwrap()).is_ok());
    }

    #[test]
    fn connect_targets() {
        assert_eq!(
            connect_target(&"example.com:443".parse().unwrap()).unwrap(),
            ("example.com".into(), 443)
        );
        assert_eq!(
            connect_target(&"[::1]:8443".parse().unwrap()).unwrap(),
            ("[::1]".into(), 8443)
        );
        for bad in [
            "example.com",
            "http://example.com:443/",
            "/path",
            "example.com:0",
            "example.com:+443",
            "2130706433:443",
            "[example.com]:443",
            "10.0.0.1.:443",
            // userinfo is no part of authority-form (RFC 9112 §3.2.3).
            "user:pw@example.com:443",
            "user@127.0.0.1:443",
            "@example.com:443",
        ] {
            assert!(connect_target(&bad.parse().unwrap()).is_err(), "{bad}");
        }
        // What is wrong with the port, said.
        for (bad, says) in [
            ("example.com", "has no port"),
            ("example.com:", "has no port"),
            ("example.com:abc", "invalid port `abc`"),
            ("example.com:99999", "invalid port `99999`"),
            ("example.com:0", "port 0 is not a destination"),
            ("example.com:-1", "invalid port `-1`"),
        ] {
            let e = connect_target(&bad.parse().unwrap()).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        // One spelling of each is taken: a name, a name ending in a
        // number-like label that is not one, dotted decimal, IPv6 in
        // brackets.
        for good in [
            "a.test:1",
            "v1.x2:1",
            "1x.test:1",
            "10.0.0.1:1",
            "[2001:db8::1]:1",
        ] {
            assert!(connect_target(&good.parse().unwrap()).is_ok(), "{good}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_targets_never_panic(target in "\\PC{0,80}") {
            if let Ok(uri) = target.parse::<Uri>() {
                let _ = absolute_target(&uri, false);
                let _ = connect_target(&uri);
                let _ = origin_form(&uri);
            }
        }

        /// The one pass finds what `http`'s `Authority::host` and
        /// `port_u16` find.
        #[test]
        fn authorities_split_as_http_splits_them(auth in "([a-z:]{0,6}@)?(\\[[0-9a-f:]{0,10}\\]|[a-z0-9.-]{0,12})(:[0-9+a]{0,6})?:?") {
            if let Ok(a) = auth.parse::<http::uri::Authority>() {
                let parts = split_authority(a.as_str());
                proptest::prop_assert_eq!(parts.host, a.host());
                proptest::prop_assert_eq!(parts.port.parse::<u16>().ok(), a.port_u16());
                let host_port = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
                proptest::prop_assert_eq!(parts.host_value, host_port.strip_suffix(':').unwrap_or(host_port));
            }
        }

        /// The log's shortcut for `host:port` writes what the split does.
        #[test]
        fn log_targets_as_the_split_writes_them(auth in "([a-z:]{0,6}@)?(\\[[0-9a-f:]{0,10}\\]|[a-z0-9.:-]{0,12})(:[0-9]{0,7})?:?") {
            if let Ok(uri) = format!("http://{auth}/").parse::<Uri>() {
                let a = uri.authority().unwrap();
                let parts = split_authority(a.as_str());
                let port = match (h1::decimal::<u16>(parts.port.as_bytes()), parts.port) {
                    (Some(_), _) => parts.port,
                    (None, "") => "80",
                    (None, text) => &text[..text.len().min(LOGGED_BAD_PORT)],
                };
                let bracket = parts.host.contains(':') && !parts.host.starts_with('[');
                let want = match bracket {
                    true => format!("[{}]:{port}", parts.host),
                    false => format!("{}:{port}", parts.host),
                };
                proptest::prop_assert_eq!(log_target(&uri, false), want);
            }
        }

        #[test]
        fn arbitrary_authorities_never_panic(host in "[a-z0-9.:\\[\\]-]{0,40}", port in proptest::option::of(0u32..70000)) {
            let target = match port { Some(p) => format!("{host}:{p}"), None => host };
            if let Ok(uri) = target.parse::<Uri>() {
                if let Ok((h, p)) = connect_target(&uri) {
                    proptest::prop_assert!(!h.is_empty() && p != 0);
                }
            }
        }
    }

    #[test]
    fn logged_targets_carry_no_secrets() {
        let t = |s: &str| LogTarget(s.parse().unwrap()).to_string();
        assert_eq!(
            t("http://user:pw@example.com:8080/a/b?token=x"),
            "http://example.com:8080/a/b"
        );
        assert_eq!(t("example.com:443"), "example.com:443");
    }

    #[test]
    fn origin_forms() {
        assert_eq!(
            origin_form(&"http://h/a/b?c=d".parse().unwrap()),
            "/a/b?c=d"
        );
        assert_eq!(origin_form(&"http://h".parse().unwrap()), "/");
        assert_eq!(origin_form(&"http://h?q=1".parse().unwrap()), "/?q=1");
    }

    /// An open tunnel's bytes reach the meter as they go, not only when it
    /// ends; what its end counts is the rest, so nothing is counted twice.
    #[tokio::test]
    async fn an_open_tunnels_bytes_are_counted_as_they_go() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, relay_client) = socket_pair().await;
        let (relay_up, mut server) = socket_pair().await;
        let activity = Activity::new();
        let idle = Duration::from_secs(60);
        let meter = Meter::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let mut counted = Counted::new(&meter, ip);
        counted.every = Duration::from_millis(50);
        let cut = tokio_util::sync::CancellationToken::new();
        let relay = crate::relay::tcp_tunnel(relay_client, relay_up, &activity, idle);
        let tunnel = until_ended(relay, &activity, idle, (&cut, None), &mut counted);
        let talk = async {
            client.write_all(&[1; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(&[2; 300]).await.unwrap();
            let mut back = [0u8; 300];
            client.read_exact(&mut back).await.unwrap();
            // Counted while open.
            let open = tokio::time::Instant::now();
            while meter.bytes_of(ip) != (1000, 300) {
                assert!(
                    open.elapsed() < Duration::from_secs(5),
                    "{:?}",
                    meter.bytes_of(ip)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.write_all(&[3; 24]).await.unwrap();
            server.read_exact(&mut got[..24]).await.unwrap();
            cut.cancel();
        };
        let (ended, ()) = tokio::join!(tunnel, talk);
        assert!(matches!(ended, Ended::Cut));
        log_tunnel_end(
            None,
            (
                "127.0.0.1:1".parse().unwrap(),
                "d",
                &Lease {
                    ip,
                    seq: 0,
                    generation: 0,
                },
            ),
            ended,
            &activity,
            counted,
        );
        assert_eq!(meter.bytes_of(ip), (1024, 300));
    }
}
