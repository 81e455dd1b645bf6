//! The worker's accept loop, HTTP/1.1 connection serving, and graceful drain.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rotor_protocol::error_chain;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::accept::{accept_loop, Balance, ClientTcp};
use crate::idle::{Activity, IdleIo};
use crate::lease::LeaseClient;
use crate::proxy::{Proxy, ProxyConfig};

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// A client must send a whole request head this fast.
    pub header_read_timeout: Duration,
    /// How long in-flight requests and tunnels may take to finish on
    /// shutdown.
    pub drain_timeout: Duration,
    /// Most client connections (tunnels included) served at once; past it,
    /// new ones get an immediate 503.
    pub max_connections: usize,
    /// Most connections from one client address (an IPv6 /64) at once;
    /// past it, that client's new ones get an immediate 503. 0: no limit.
    pub max_client_connections: usize,
    /// The certificate of the TLS listeners, if any.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Peers (front proxies) whose connections start with a PROXY
    /// protocol header naming the client.
    pub proxy_protocol: crate::proxied::Trusted,
}

/// A client connection: plain, or TLS (both over the idle watch).
/// (The TLS session is boxed: it is large, and a plain connection's task
/// should not carry — and move — its room.)
pub type ClientIo = tokio_util::either::Either<
    IdleIo<ClientTcp>,
    Box<tokio_rustls::server::TlsStream<IdleIo<ClientTcp>>>,
>;

impl crate::fast::ClientStream for ClientIo {
    fn closes_on_drop(&self) -> bool {
        matches!(self, tokio_util::either::Either::Left(_))
    }
}

/// How the worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything in flight finished.
    Drained,
    /// The drain deadline passed with work still in flight, or a fast stop.
    Cut,
}

/// What a worker accepts on.
#[derive(Debug, Default)]
pub struct Listeners {
    /// HTTP proxy clients.
    pub http: Vec<std::net::TcpListener>,
    pub socks: Vec<std::net::TcpListener>,
    /// HTTP proxy clients over TLS.
    pub tls: Vec<std::net::TcpListener>,
}

/// Serves the listeners until `shutdown` is cancelled, then drains: no new
/// connections, keep-alive connections answered `Connection: close` on
/// their next request (or closed after a short grace), in-flight requests
/// and tunnels given up to the drain timeout. `fast` cancelled
/// cuts the drain short. Each change of `reloads` (SIGHUP) starts name
/// resolution over, and re-reads the TLS certificate.
pub async fn run(
    Listeners {
        http: listeners,
        socks,
        tls: tls_listeners,
    }: Listeners,
    leases: Arc<LeaseClient>,
    config: Config,
    shutdown: CancellationToken,
    fast: CancellationToken,
    mut reloads: tokio::sync::watch::Receiver<u64>,
) -> io::Result<(Stopped, Arc<crate::meter::Meter>)> {
    let tunnels = TaskTracker::new();
    // The acceptors' stop: cancelled once the stop has closed `tunnels`,
    // so a listener gone means tunnels refused on kept-alive connections
    // (see below).
    let accepting = CancellationToken::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let own = listeners
        .iter()
        .chain(&socks)
        .chain(&tls_listeners)
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let proxy = Arc::new(Proxy::new(
        leases.clone(),
        config.proxy.clone(),
        tunnels.clone(),
        own,
    ));
    // hyper-util's GracefulShutdown does not take upgradeable connections,
    // so each connection task watches `shutdown` itself.
    let connections = TaskTracker::new();

    let balance = Arc::new(Balance::new(
        leases.clone(),
        limit.clone(),
        config.max_connections,
        // Every listener (their accept loops it holds back): siblings are
        // the workers that share all of them.
        listeners.iter().chain(&tls_listeners).chain(&socks),
    ));
    tokio::spawn(balance.clone().publish(shutdown.clone()));
    let acceptors = TaskTracker::new();
    {
        let mut listen = proxy.meter.listen.lock().unwrap_or_else(|e| e.into_inner());
        for l in &listeners {
            if let Ok(a) = l.local_addr() {
                listen.push(format!("http {a}"));
            }
        }
        for l in &socks {
            if let Ok(a) = l.local_addr() {
                listen.push(format!("socks5 {a}"));
            }
        }
        for l in &tls_listeners {
            if let Ok(a) = l.local_addr() {
                listen.push(format!("https {a}"));
            }
        }
    }
    for l in listeners.iter().chain(&socks).chain(&tls_listeners) {
        if let Err(e) = crate::os::limit_unsent(l) {
            warn!(
                listen = ?l.local_addr().ok(),
                error = %e,
                "cannot limit what waits unsent for a client (TCP_NOTSENT_LOWAT); a slow reader may be taken for an idle one"
            );
        }
    }
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.proxy.max_head_bytes.max(8192))
        .keep_alive(true);

    // Each accepted connection is served from here, spawned by the accept
    // loop that took it (no hop through a channel to a serving loop).
    let clients = crate::clients::Clients::new(config.max_client_connections);
    let serving = Arc::new(Serving {
        proxy: proxy.clone(),
        limit: limit.clone(),
        clients: clients.clone(),
        connections: connections.clone(),
        stop: shutdown.clone(),
        config: config.clone(),
        builder,
        last_warned: crate::Moment::new(),
    });
    // Every listener through the one accept loop, which shares out
    // connections between the workers; what serves one is its kind's.
    let every = listeners
        .into_iter()
        .map(|l| (l, Kind::Http))
        .chain(tls_listeners.into_iter().map(|l| (l, Kind::Tls)))
        .chain(socks.into_iter().map(|l| (l, Kind::Socks)));
    for (l, kind) in every {
        let what = match kind {
            Kind::Http => "",
            Kind::Tls => " for TLS",
            Kind::Socks => " for SOCKS5",
        };
        info!(listen = %l.local_addr()?, "listening{what}");
        if kind == Kind::Tls && config.tls.is_none() {
            error!("a TLS listener without --tls-cert and --tls-key; not served");
            continue;
        }
        let serving = serving.clone();
        let stop = accepting.clone();
        let balance = balance.clone();
        acceptors.spawn(async move {
            let addr = l.local_addr().ok();
            let serve = move |stream, client| match kind {
                Kind::Socks => serving.socks_accepted(stream, client),
                _ => serving.accepted(stream, client, kind == Kind::Tls),
            };
            if let Err(e) = accept_loop(l, balance, serve, stop).await {
                error!(listen = ?addr, error = %e, "cannot accept on this listener{what}");
            }
        });
    }
    acceptors.close();

    tokio::spawn(proxy.upstream().clone().reap(fast.clone()));
    tokio::spawn(crate::connect::watch_local_routes(fast.clone()));
    tokio::spawn(say_failed_since(fast.clone()));
    // The figures go to the allocator every second, and once more when the
    // drain is over.
    let reported = CancellationToken::new();
    let reporter = {
        let (meter, limit) = (proxy.meter.clone(), limit.clone());
        let max = config.max_connections;
        let cool_refused = config.proxy.cooldown_connect_failures;
        let open = move || {
            let used = max.saturating_sub(limit.available_permits()) as u64;
            used.saturating_sub(meter.tunnels_open.load(Ordering::Relaxed))
        };
        tokio::spawn(proxy.meter.clone().report(
            leases.clone(),
            open,
            cool_refused,
            reported.clone(),
        ))
    };
    let reloading = proxy.clone();
    let reloading_tls = config.tls.clone();
    // What was opened before the SIGHUP handler was in place is opened
    // once more: a SIGHUP in between was ignored (it must not kill the
    // worker), and logrotate's left the access log written to the file it
    // moved away, or a new certificate waiting, until the next one.
    if let Some(log) = proxy.access_log() {
        if let Err(e) = log.reopen() {
            tracing::warn!(error = %e, "cannot reopen the access log; writing to the old file");
        }
    }
    if let Some(tls) = &reloading_tls {
        tls.reload_at_start();
        tokio::spawn(tls.clone().watch_validity(shutdown.clone()));
        tokio::spawn(tls.clone().share_tickets(leases.clone(), shutdown.clone()));
    }
    let told = leases.clone();
    tokio::spawn(async move {
        while reloads.changed().await.is_ok() {
            let asked = told.take_reload_asked();
            // Each part that did not reload (what, and why; the one in
            // use is kept), for the allocator's `rotor reload` to say.
            let mut failed = Vec::new();
            if let Some(auth) = reloading.auth() {
                // Off the runtime's threads: a large file, or a decoy
                // hash made anew (argon2, tens of milliseconds), would
                // hold up the requests sharing the thread.
                let auth = auth.clone();
                match tokio::task::spawn_blocking(move || auth.reload()).await {
                    Ok(Ok(n)) => info!(users = n, "users file re-read"),
                    Ok(Err(e)) => {
                        let error = rotor_protocol::error_chain(&e);
                        warn!(%error, "users file not re-read; keeping the old users");
                        failed.push(("users file".into(), error));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "users file reload failed; keeping the old users");
                        failed.push(("users file".into(), e.to_string()));
                    }
                }
            }
            match reloading.reload_dns() {
                Ok(()) => {
                    info!("name resolution reloaded: cache dropped, resolv.conf and hosts re-read")
                }
                Err(error) => failed.push(("name resolution (resolv.conf)".into(), error)),
            }
            if let Some(log) = reloading.access_log() {
                // Off the runtime's threads, and waited for a while: an
                // open on a hung mount must not hold this reload's report
                // and every later reload.
                let l = log.clone();
                let opening = tokio::task::spawn_blocking(move || l.reopen());
                let error = match tokio::time::timeout(REOPEN_WAIT, opening).await {
                    Ok(Ok(Ok(()))) => None,
                    Ok(Ok(Err(e))) => Some(e.to_string()),
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("its open did not end within {REOPEN_WAIT:?}")),
                };
                if let Some(error) = error {
                    tracing::error!(%error, "cannot reopen the access log; writing to the old file");
                    failed.push(("access log".into(), error));
                }
            }
            if let Some(tls) = &reloading_tls {
                if let Err(error) = tls.reload() {
                    failed.push((
                        format!("TLS certificate {}", tls.cert_file().display()),
                        error,
                    ));
                }
            }
            told.reloaded(asked, failed).await;
        }
    });
    tokio::spawn(notify_systemd(
        proxy.clone(),
        connections.clone(),
        shutdown.clone(),
    ));

    // Every acceptor stops at the stop; then the drain.
    shutdown.cancelled().await;
    // At once: a CONNECT on a kept-alive connection is refused from the
    // stop on (`Proxy::open_tunnel`), and before the listeners close (the
    // acceptors ran on other threads than this, which a busy host could
    // wake 50 ms later: a listener seen gone, then a tunnel opened).
    tunnels.close();
    accepting.cancel();
    acceptors.wait().await;
    // Its reports say it accepts no one now: the allocator's `/health`
    // turns a front away once every worker drains.
    proxy
        .meter
        .listen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    // The drain may take longer than the unit's TimeoutStopSec (40 s in
    // deploy/): systemd is asked for the drain and a margin, rather than
    // killing the worker mid-drain, its tunnels cut unlogged.
    // (systemd reads a u64 of microseconds; sd_notify's own variant takes
    // a u32, which cut a drain past 71 minutes short.)
    let drain_and_margin = config.drain_timeout + Duration::from_secs(10);
    let usec = u64::try_from(drain_and_margin.as_micros()).unwrap_or(u64::MAX);
    let extend = format!("EXTEND_TIMEOUT_USEC={usec}");
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Custom(&extend),
    ]);
    connections.close();
    info!(
        connections = connections.len(),
        tunnels = tunnels.len(),
        "draining"
    );
    let drain = async {
        connections.wait().await;
        tunnels.wait().await;
    };
    let stopped = tokio::select! {
        r = tokio::time::timeout(config.drain_timeout, drain) => {
            if r.is_ok() { Stopped::Drained } else { Stopped::Cut }
        }
        _ = fast.cancelled() => Stopped::Cut,
    };
    if stopped == Stopped::Cut {
        // Said with what it cuts (an operator saw only "stopped=Cut").
        let why = match fast.is_cancelled() {
            true => "a fast stop (a second SIGTERM, or SIGINT)",
            false => "the drain ran out of --drain-timeout",
        };
        warn!(
            connections = connections.len(),
            tunnels = tunnels.len(),
            "{why}: cutting the connections and tunnels still open (logged as worker_stopped: requests waiting, responses cut mid-body, tunnels)"
        );
        // The tunnels still open end now, each counted and logged (their
        // tasks would otherwise be dropped with the runtime, unlogged).
        proxy.cut_tunnels();
        let _ = tokio::time::timeout(Duration::from_secs(1), tunnels.wait()).await;
    }
    // After a cut, requests still in flight are dropped with the runtime,
    // each logged then (`worker_stopped`): the log closes when it goes.
    // Drained, it closes before the last report, which counts the lines
    // its last write lost (closed after, they went uncounted).
    if let (Some(log), Stopped::Drained) = (proxy.access_log(), stopped) {
        let log = log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
    }
    reported.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), reporter).await;
    info!(?stopped, "stopped");
    // After a cut the requests still in flight are counted as they are
    // dropped with the runtime, after the last report: the caller sends
    // what the meter holds then (`Meter::take_left`).
    Ok((stopped, proxy.meter.clone()))
}

/// What serving an accepted client connection takes (the accept loops
/// share it).
struct Serving {
    proxy: Arc<Proxy>,
    /// A place per client connection and tunnel.
    limit: Arc<Semaphore>,
    /// Places per client address.
    clients: Arc<crate::clients::Clients>,
    connections: TaskTracker,
    stop: CancellationToken,
    config: Config,
    builder: http1::Builder,
    /// When the connection limit was last warned of (once in 10 s).
    last_warned: crate::Moment,
}

impl Serving {
    /// Spawns the task that serves `stream` (a 503 at once past the
    /// connection limit).
    fn accepted(self: &Arc<Self>, stream: ClientTcp, client: std::net::SocketAddr, is_tls: bool) {
        let Some(permit) = self.place(client, false) else {
            // A 503 in plain text is no answer to a TLS hello (the client
            // reports a garbled record): closed.
            return turn_away(stream, (!is_tls).then_some(HTTP_REFUSAL));
        };
        if self.config.proxy_protocol.covers(client.ip()) {
            // A front proxy's connection: the client's address comes
            // first, in its header, read in the connection's own task.
            let this = self.clone();
            self.connections.spawn(async move {
                let mut stream = stream;
                let within = this.config.header_read_timeout;
                let stop = (&this.stop, IDLE_CLOSE_GRACE);
                let named = crate::proxied::client_of(&mut stream, client, within, stop).await;
                // Served in a task of its own, as every connection.
                if let Some(client) = named {
                    this.admitted(stream, client, (is_tls, true), permit);
                }
            });
            return;
        }
        self.admitted(stream, client, (is_tls, false), permit);
    }

    /// A place under the connection limit for `client`'s new connection,
    /// or none: counted and said (once in 10 s) as refused.
    fn place(
        &self,
        client: std::net::SocketAddr,
        socks: bool,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.limit.clone().try_acquire_owned() {
            return Some(permit);
        }
        if let Some(refused) = self.last_warned.count_in(Duration::from_secs(10)) {
            warn!(
                limit = self.config.max_connections,
                refused,
                "connection limit reached; refusing new clients (plain HTTP with a 503, TLS closed, SOCKS5 with no acceptable method; said once in 10 s, with how many since; raise --max-connections, and the descriptor limit with it, if the host has room)"
            );
        }
        self.proxy.refused_at_limit(client, socks, LIMIT_ERROR);
        None
    }

    /// A connection of `client` refused at its address's connection
    /// limit: said (once in 10 s) and counted.
    #[cold]
    fn client_refused(&self, client: std::net::SocketAddr, socks: bool) {
        client_limit_reached(client, self.config.max_client_connections);
        self.proxy
            .refused_at_limit(client, socks, CLIENT_LIMIT_ERROR);
    }

    /// Spawns the task that serves a SOCKS5 client (refused at once past
    /// the connection limit, or its address's, with "no acceptable
    /// method", the answer to the greeting it sends first, read by the
    /// lingering close: a refusal, not a reset).
    fn socks_accepted(self: &Arc<Self>, stream: ClientTcp, client: std::net::SocketAddr) {
        const REFUSAL: &[u8] = &[5, 0xff];
        let Some(permit) = self.place(client, true) else {
            return turn_away(stream, Some(REFUSAL));
        };
        let within = self.config.header_read_timeout;
        let admit = move |this: &Self, stream: ClientTcp, client: std::net::SocketAddr| {
            let Ok(slot) = this.clients.admit(client.ip()) else {
                this.client_refused(client, true);
                turn_away(stream, Some(REFUSAL));
                return None;
            };
            let stream = stream.into_tokio().ok()?;
            Some(crate::socks::serve(
                this.proxy.clone(),
                stream,
                client,
                (permit, slot),
                within,
                this.stop.clone(),
                IDLE_CLOSE_GRACE,
            ))
        };
        if !self.config.proxy_protocol.covers(client.ip()) {
            if let Some(serve) = admit(self, stream, client) {
                self.connections.spawn(serve);
            }
            return;
        }
        // A front proxy's connection: the client's address comes first,
        // in its header.
        let this = self.clone();
        self.connections.spawn(async move {
            let mut stream = stream;
            let draining = (&this.stop, IDLE_CLOSE_GRACE);
            let named = crate::proxied::client_of(&mut stream, client, within, draining).await;
            if let Some(serve) = named.and_then(|client| admit(&this, stream, client)) {
                serve.await
            }
        });
    }

    /// Spawns the task that serves `stream` from `client` (refused at the
    /// client's connection limit). (The task made and spawned here, not
    /// returned: a new connection's future moved once more cost 400
    /// instructions.)
    /// `fronted`: it came through a front (its PROXY protocol header
    /// read), see `fast::Conn::fronted`.
    fn admitted(
        &self,
        stream: ClientTcp,
        client: std::net::SocketAddr,
        (is_tls, fronted): (bool, bool),
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Ok(slot) = self.clients.admit(client.ip()) else {
            self.client_refused(client, false);
            return turn_away(stream, (!is_tls).then_some(HTTP_CLIENT_REFUSAL));
        };
        let activity = Activity::new();
        let stream = IdleIo::new(stream, activity.clone());
        let idle_timeout = self.config.proxy.idle_timeout;
        let proxy = self.proxy.clone();
        let fast = crate::fast::Conn {
            proxy: proxy.clone(),
            client,
            activity: activity.clone(),
            idle_timeout,
            header_timeout: self.config.header_read_timeout,
            max_head: self.config.proxy.max_head_bytes.max(8192),
            stop: self.stop.clone(),
            grace: IDLE_CLOSE_GRACE,
            fronted,
            // As a plain connection waits: the idle timeout for a first
            // byte (a client may open its connection ahead of need), the
            // head's timeout once it comes; over TLS bytes below it say
            // nothing, so the later of the two from the accept.
            tls_first_head_due: is_tls.then(|| {
                tokio::time::Instant::now()
                    + self
                        .config
                        .header_read_timeout
                        .max(self.config.proxy.idle_timeout)
            }),
        };
        let acceptor = match (is_tls, &self.config.tls) {
            (true, Some(t)) => Some(t.acceptor()),
            _ => None,
        };
        let builder = self.builder.clone();
        let handshake_timeout = self.config.header_read_timeout;
        // The connection's task: a few hundred bytes (what is large — the
        // TLS handshake, the fast path, hyper's connection — is boxed), as
        // spawning moves it.
        let connections = self.connections.clone();
        let fut = async move {
            // Held to the end, or by a lingering close after it.
            let held: Held = (permit, slot);
            // A TLS client's handshake counts against the head's
            // deadline (and holds its place under the limit).
            let io: ClientIo = match acceptor {
                None => tokio_util::either::Either::Left(stream),
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        handshake_timeout,
                        Box::pin(async move {
                            // A TLS client's first byte is a handshake
                            // record's type (22); a plain HTTP request's,
                            // its method's first letter: a client whose
                            // proxy URL says http:// where https:// was
                            // meant is told so, not sent a TLS alert.
                            // (A HEAD is told with no body: a method cut
                            // short that may be one is looked at again a
                            // few times, 10 ms apart.)
                            let mut stream = stream;
                            let mut first = [0u8; 5];
                            let mut peeked = stream.get_mut().peek(&mut first).await;
                            for _ in 0..5 {
                                match peeked {
                                    Ok(n @ 1..=4) if b"HEAD "[..n] == first[..n] => {
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                        peeked = stream.get_mut().peek(&mut first).await;
                                    }
                                    _ => break,
                                }
                            }
                            if matches!(peeked, Ok(1..) if first[0].is_ascii_uppercase()) {
                                return Err((stream, first == *b"HEAD "));
                            }
                            // Closed before a byte (a load balancer's TCP
                            // check, a port scan): no handshake failed.
                            if matches!(peeked, Ok(0)) {
                                return Ok(None);
                            }
                            Ok(Some(acceptor.accept(stream).await))
                        }),
                    );
                    // A drain lets a handshake under way finish in the
                    // grace a connection between requests gets, no longer
                    // (a port scan's silent connection held the drain for
                    // the head's timeout).
                    let draining = async {
                        fast.stop.cancelled().await;
                        tokio::time::sleep(IDLE_CLOSE_GRACE).await
                    };
                    let done = tokio::select! {
                        r = handshake => r,
                        _ = draining => {
                            debug!("draining: TLS handshake not done; closed");
                            return;
                        }
                    };
                    match done {
                        Ok(Ok(Some(Ok(tls)))) => tokio_util::either::Either::Right(Box::new(tls)),
                        Ok(Ok(Some(Err(e)))) => {
                            tls_handshake_failed(client, &e);
                            return;
                        }
                        Ok(Ok(None)) => {
                            debug!(%client, "closed before a TLS hello");
                            return;
                        }
                        Ok(Err((plain, head))) => {
                            plain_http_on_tls(client);
                            // Counted, and its access line (method and
                            // target `-`, as hyper's own 400s).
                            fast.proxy.unserved(
                                client,
                                None,
                                (400, Some("http_request_error")),
                                std::time::Instant::now(),
                            );
                            if let Ok(tcp) = plain.into_inner().into_tokio() {
                                let answer = match head {
                                    true => head_of(PLAIN_HTTP_ON_TLS),
                                    false => PLAIN_HTTP_ON_TLS,
                                };
                                refuse_soon(tcp, Some(answer));
                            }
                            return;
                        }
                        Err(_) => {
                            debug!("TLS handshake too slow; closed");
                            return;
                        }
                    }
                }
            };
            // The common requests on the fast path; hyper's server takes
            // the connection at the first that is not.
            // Boxed, as hyper's connection below: the task (moved as it
            // is spawned) stays small for a short connection.
            let (io, served) = match Box::pin(crate::fast::serve(io, &fast)).await {
                crate::fast::Outcome::Closed => return,
                crate::fast::Outcome::Drained(io) => {
                    let linger = Linger {
                        within: fast.grace,
                        idle: fast.grace,
                        most: crate::fast::LINGER_MOST,
                    };
                    // Boxed: inline, its state would be room in every
                    // connection task's.
                    Box::pin(linger_close_for(io, linger)).await;
                    return;
                }
                crate::fast::Outcome::Handover(io, served) => (io, served),
            };
            // hyper's server from here (made only now: most connections
            // never get here). Counts the connection's requests as they
            // arrive: see the drain below.
            let fd = client_fd(io.get_ref());
            let watch_fd = fd.filter(|_| !is_tls);
            let arrivals = Arc::new(Arrivals::default());
            if served {
                arrivals.count.store(1, Ordering::Relaxed);
            }
            let seen = arrivals.clone();
            let io = Lingering {
                io: Some(io),
                arrivals: arrivals.clone(),
                held: Some(held),
                connections,
                stop: fast.stop.clone(),
            };
            // Requests whose response head is not out yet: the client waits
            // on the destination, which is bounded by --response-timeout
            // (the answer, and an upload that stops moving either way),
            // not idle.
            let waiting = Arc::new(AtomicUsize::new(0));
            let pending = waiting.clone();
            // Responses whose body is still going out: a draining
            // connection's grace for the next request starts at their end.
            let streaming = Arc::new(Going::default());
            let sending = streaming.clone();
            let stopping = fast.stop.clone();
            let fronted = fast.fronted;
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let before = seen.arrived(!hyper::body::Body::is_end_stream(req.body()));
                let arrivals = seen.clone();
                let mut req = req.map(|inner| Tracked { inner, arrivals });
                let tunnel = req.method() == hyper::Method::CONNECT;
                // (A WebSocket's handshake may become a tunnel too.)
                let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
                if (tunnel || upgrade) && before > 0 {
                    req.extensions_mut().insert(crate::proxy::KeptAlive);
                }
                let guard = Waiting::new(&pending);
                let proxy = proxy.clone();
                let told = seen.clone();
                let http10 = req.version() == hyper::Version::HTTP_10;
                let (sending, stopping) = (sending.clone(), stopping.clone());
                async move {
                    let _guard = guard;
                    let handled = proxy.handle(req, client);
                    // A plain client's going is rotor's to watch (hyper's
                    // is told its half-closes are none: see `half_close`
                    // below); over TLS hyper watches, at once.
                    let mut resp = match watch_fd {
                        None => handled.await,
                        Some(fd) => {
                            let mut dup = None;
                            let peek = |cx: &mut std::task::Context<'_>| {
                                match dup.get_or_insert_with(|| crate::os::watchable(fd)) {
                                    Ok(s) => crate::h1::peek_one(s, cx),
                                    // Not watched (no descriptor to spare).
                                    Err(_) => std::task::Poll::Ready(Ok(1)),
                                }
                            };
                            match crate::h1::unless_gone(handled, peek).await {
                                Some(resp) => resp,
                                None => return Err(ClientLeft),
                            }
                        }
                    };
                    // An answer given before the request's body was read
                    // (a 403, a 502 for a destination that refused the
                    // upload) ends the connection, with a lingering close:
                    // said in the answer, so the client does not send its
                    // next request on it. So does one given in the drain
                    // (the connection closes after it: hyper wrote an
                    // answer made at once, a 407, before its graceful
                    // shutdown could say so, and closed the connection
                    // under the client's next request). (Not a tunnel's or
                    // an upgrade's answer: its connection goes on, as the
                    // tunnel.)
                    // So does one to an HTTP/1.0 client with no length
                    // (the destination's was chunked, or ended at its
                    // close): its end is the close, and hyper's server
                    // said `keep-alive` on it to a keep-alive client.
                    let mut ends_at_close = false;
                    if let Ok(r) = &mut resp {
                        let goes_on = (tunnel && r.status().is_success())
                            || r.status() == hyper::StatusCode::SWITCHING_PROTOCOLS;
                        let bodiless = matches!(r.status().as_u16(), 204 | 304);
                        let unframed = http10
                            && !bodiless
                            && hyper::body::Body::size_hint(r.body()).exact().is_none()
                            && !r.headers().contains_key(hyper::header::CONTENT_LENGTH);
                        ends_at_close = unframed;
                        // So does a 407 behind a front (see `fast::Conn::fronted`).
                        let relogin = crate::fast::relogin(fronted, r.status());
                        if (told.carried_body() || stopping.is_cancelled() || unframed || relogin)
                            && !goes_on
                        {
                            r.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                            // An HTTP/1.0 head, or hyper adds `keep-alive`
                            // for a 1.0 keep-alive client.
                            if http10 {
                                *r.version_mut() = hyper::Version::HTTP_10;
                            }
                        }
                    }
                    let Ok(resp) = resp;
                    // A body whose end is the close, cut by rotor (the
                    // destination silent for --idle-timeout, the drain cut,
                    // a client not reading) ends in a reset, as one the
                    // destination broke off does (`body_broke`): a FIN
                    // passed for the whole body. (On the socket's own
                    // descriptor, held till then: however the connection
                    // ends, its close is the last holder's.)
                    let resets = match (ends_at_close, fd) {
                        (true, Some(fd)) => crate::os::held(fd).ok(),
                        _ => None,
                    };
                    Ok(resp.map(|body| Streamed {
                        body,
                        _going: Sent::new(&sending),
                        resets,
                        ended: false,
                        broke: None,
                    }))
                }
            });
            let stop = &fast.stop;
            // A plain client that sends its request and shuts its side
            // (`nc -N`, one that only reads: a CONNECT to a server that
            // speaks first) is answered, and its end passed on to a
            // tunnel: hyper took that end for the client's going and
            // dropped the request unanswered. Its going is watched by the
            // service above, as the fast path's. (Over TLS the end comes
            // after a close_notify, which a look at the socket cannot read:
            // hyper watches.)
            let mut builder = builder;
            if watch_fd.is_some() {
                builder.half_close(true);
            }
            let mut conn = Box::pin(
                builder
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            // Set where the connection is cut (idle, or its client not
            // reading) rather than ended.
            let cut = std::sync::atomic::AtomicBool::new(false);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = activity.write_stuck_for(idle_timeout) => {
                    cut.store(true, Ordering::Relaxed);
                    Ok(())
                }
                _ = activity.idle_for(idle_timeout) => {
                    debug!("client connection idle; closing");
                    conn.as_mut().graceful_shutdown();
                    until_finished(conn.as_mut(), &activity, idle_timeout, &waiting, &cut).await
                }
                _ = stop.cancelled() => {
                    // Boxed: inline, its timers were room in every
                    // connection task's state (moved as it is spawned),
                    // short connections' too.
                    Box::pin(async {
                        // HAProxy's idle-close-on-response: a connection
                        // between requests (or just opened) is kept a short
                        // while, and its next request is served and
                        // answered with `Connection: close`; closing it at
                        // once raced the client's next request, which a
                        // client that does not retry saw fail. A request
                        // in flight is answered with `Connection: close`.
                        arrivals.watch();
                        let since = arrivals.count();
                        // A response still going out (its head went out
                        // before the stop, saying keep-alive): the grace
                        // starts at its end, as on the fast path; cut short
                        // at the grace, the client's next request met the
                        // close. (A client that stops reading, or a
                        // response that stops coming, is dropped after
                        // --idle-timeout, as without the drain.)
                        let grace = async {
                            tokio::select! {
                                _ = streaming.none() => {}
                                _ = activity.write_stuck_for(idle_timeout) => {}
                                _ = activity.idle_for(idle_timeout) => {}
                            }
                            tokio::time::sleep(IDLE_CLOSE_GRACE).await
                        };
                        let r = match waiting.load(Ordering::Relaxed) {
                            0 => tokio::select! {
                                r = conn.as_mut() => Some(r),
                                _ = arrivals.after(since) => None,
                                _ = grace => None,
                            },
                            _ => None,
                        };
                        match r {
                            Some(r) => r,
                            None => {
                                conn.as_mut().graceful_shutdown();
                                until_finished(
                                    conn.as_mut(),
                                    &activity,
                                    idle_timeout,
                                    &waiting,
                                    &cut,
                                )
                                .await
                            }
                        }
                    })
                    .await
                }
            };
            // A response cut mid-body closes at once, not lingering (after
            // an upload, in the drain): the lingering close's shutdown sent
            // a FIN first, the clean end of a body whose end is the close
            // (`Streamed` makes its close a reset).
            if cut.load(Ordering::Relaxed) && streaming.count.load(Ordering::SeqCst) > 0 {
                arrivals.no_linger();
            }
            if let Err(e) = result {
                let answered = hyper_answered(&e);
                if let Some(status) = answered {
                    fast.proxy.answered_by_hyper(client, status);
                }
                // A response body that broke off (the destination cut it,
                // or sent a bad chunk) ends the connection with a reset,
                // as a tunnel's does: a response whose end is the close
                // (to an HTTP/1.0 client, one without a length) would
                // otherwise end in a FIN, and a client reading to the end
                // took the cut body for the whole one.
                if body_broke(&e) {
                    if let Some(fd) = fd {
                        // Once the client has taken what was written (2 s
                        // at most): a reset at once discards it.
                        crate::relay::reset_once_sent([fd]).await;
                        // Closed at once: a lingering close (an upload
                        // left unread) shuts the sending side down first,
                        // and that FIN is the clean end this must not be.
                        arrivals.no_linger();
                    }
                }
                match answered {
                    // A malformed request: its line says its answer.
                    Some(status) => {
                        debug!(status, error = %error_chain(&e), "request refused (malformed); connection closed")
                    }
                    None => debug!(error = %error_chain(&e), "client connection ended with an error"),
                }
            }
        }
        .instrument(tracing::debug_span!("client", %client));
        self.connections.spawn(fut);
    }
}

/// The error the service gives hyper for a request whose client left while
/// it waited: the connection ends, unanswered (the request's line says
/// `client_closed`, 499).
#[derive(Debug, thiserror::Error)]
#[error("the client left while its request waited")]
struct ClientLeft;

/// The client socket under `io` (a TLS session's too).
fn client_fd(io: &ClientIo) -> Option<std::os::fd::RawFd> {
    match io {
        tokio_util::either::Either::Left(plain) => plain.get_ref().raw_fd(),
        tokio_util::either::Either::Right(tls) => tls.get_ref().0.get_ref().raw_fd(),
    }
}

/// Whether hyper's server stopped for a response body of ours that failed
/// (the destination's body cut short or malformed), not the client's doing.
fn body_broke(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<crate::h1::Error>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The status hyper's server answered a request it could not read with
/// (it writes those itself: a head it cannot parse, one past its buffer),
/// if it answered one.
fn hyper_answered(e: &hyper::Error) -> Option<u16> {
    if e.is_parse_too_large() {
        return Some(match e.to_string().contains("URI") {
            true => 414,
            false => 431,
        });
    }
    // Not hyper's own failure (`Parse::Internal`), which it answers not.
    let internal = e.to_string().contains("internal error");
    (e.is_parse() && !e.is_parse_version_h2() && !e.is_parse_status() && !internal).then_some(400)
}

/// A connection told to shut down gracefully, until it ends: a request in
/// flight may finish while bytes move or the destination is still to
/// answer; a client that stops reading (a write that never ends) is
/// dropped after `idle`, and its upstream with it (also while draining:
/// it held the drain to `--drain-timeout`); `cut` is set then.
async fn until_finished<C, E>(
    mut conn: C,
    activity: &Activity,
    idle: Duration,
    waiting: &AtomicUsize,
    cut: &std::sync::atomic::AtomicBool,
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>> + Unpin,
{
    loop {
        tokio::select! {
            r = &mut conn => break r,
            _ = activity.write_stuck_for(idle) => {
                cut.store(true, Ordering::Relaxed);
                break Ok(());
            }
            _ = activity.idle_for(idle) => {
                if waiting.load(Ordering::Relaxed) == 0 {
                    cut.store(true, Ordering::Relaxed);
                    debug!("client connection idle (the client not reading, or the destination not sending); dropped");
                    break Ok(());
                }
                activity.touch();
            }
        }
    }
}

/// `READY=1` once the worker listens and has its allocator connection, then
/// a `STATUS=` line every few seconds for `systemctl status`.
async fn notify_systemd(proxy: Arc<Proxy>, connections: TaskTracker, shutdown: CancellationToken) {
    use sd_notify::{notify, NotifyState};
    use std::sync::atomic::Ordering;
    const EVERY: Duration = Duration::from_secs(5);
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = proxy.leases().connected(Duration::MAX) => {}
    }
    let _ = notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let mut last = proxy.requests.load(Ordering::Relaxed);
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = proxy.requests.load(Ordering::Relaxed);
        let line = format!(
            "{} client connections, {:.0} requests/s, allocator {}",
            connections.len(),
            (now - last) as f64 / EVERY.as_secs_f64(),
            match (proxy.leases().is_connected(), proxy.leases().uses_table()) {
                (true, true) => "connected (leasing from its table)",
                (true, false) => "connected (leasing over its socket)",
                (false, _) => "unreachable",
            }
        );
        last = now;
        let _ = notify(&[NotifyState::Status(&line)]);
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Tls,
    Socks,
}

/// What an HTTP client past the connection limit is told.
const HTTP_REFUSAL: &[u8] = b"HTTP/1.1 503 Connection Limit Reached\r\n\
    proxy-status: rotor; error=proxy_internal_error; details=\"connection limit reached\"\r\n\
    content-length: 0\r\nconnection: close\r\n\r\n";

/// The errors a refusal at `--max-connections` and at
/// `--max-client-connections` is counted as (`rotor_errors_total`), as
/// their `Proxy-Status` says: counted however told (a 503, SOCKS5's
/// 0xff, or closed unanswered past `REFUSING_MAX`), so a flood turned
/// away shows.
const LIMIT_ERROR: &str = "proxy_internal_error";
const CLIENT_LIMIT_ERROR: &str = "connection_limit_reached";

/// What an HTTP client past its address's connection limit is told.
const HTTP_CLIENT_REFUSAL: &[u8] = b"HTTP/1.1 503 Client Connection Limit Reached\r\n\
    proxy-status: rotor; error=connection_limit_reached; details=\"too many connections from this address\"\r\n\
    content-length: 0\r\nconnection: close\r\n\r\n";

/// How long a reload waits for the access log's reopen.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// The answer to plain HTTP sent to a TLS listener (nginx's 400 "The
/// plain HTTP request was sent to HTTPS port"); to a HEAD, its head
/// alone (`head_of`).
const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    proxy-status: rotor; error=http_request_error; details=\"plain HTTP sent to a TLS port\"\r\n\
    content-type: text/plain\r\ncontent-length: 94\r\nconnection: close\r\n\r\n\
    rotor: this port takes TLS (an https:// proxy URL); the request came in plain HTTP (http://).\n";

/// `answer` to its empty line, without the body.
fn head_of(answer: &'static [u8]) -> &'static [u8] {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n");
    end.map_or(answer, |at| &answer[..at + 4])
}

/// Logs plain HTTP sent to a TLS listener, once in 10 s.
fn plain_http_on_tls(client: std::net::SocketAddr) {
    static SAID: crate::Moment = crate::Moment::new();
    match SAID.first_in(Duration::from_secs(10)) {
        true => {
            info!(%client, "plain HTTP sent to a TLS port (the client's proxy URL says http:// where https:// is meant); answered 400 (said once in 10 s)")
        }
        false => debug!(%client, "plain HTTP sent to a TLS port; answered 400"),
    }
}

/// Logs a TLS handshake that failed, with its cause, once in 10 s at
/// info (every one at debug): a certificate expired, or clients that do
/// not trust its CA, fail every client while the worker looks idle.
fn tls_handshake_failed(client: std::net::SocketAddr, e: &std::io::Error) {
    static SAID: crate::Moment = crate::Moment::new();
    match SAID.count_in(Duration::from_secs(10)) {
        Some(failed) => {
            info!(%client, error = %e, failed, "a TLS handshake failed (said once in 10 s, with how many failed since; each at debug)")
        }
        None => debug!(%client, error = %e, "TLS handshake failed"),
    }
}

/// Logs a client refused at its address's limit, once in 10 s.
fn client_limit_reached(client: std::net::SocketAddr, limit: usize) {
    static WARNED: crate::Moment = crate::Moment::new();
    if let Some(refused) = WARNED.count_in(Duration::from_secs(10)) {
        let client = client.ip();
        warn!(%client, limit, refused, "a client address reached its connection limit; refusing its new connections with 503 (said once in 10 s, with how many since, of any address; --max-client-connections)");
    } else {
        debug!(%client, limit, "client connection limit reached; refused");
    }
}

/// Refusals told at once, at most (each holds its socket for a second or
/// so, under no limit); past them a connection is closed unanswered, so
/// one address flooding past its limit cannot take the worker's file
/// descriptors.
const REFUSING_MAX: usize = 512;
static REFUSING: Semaphore = Semaphore::const_new(REFUSING_MAX);

/// An accepted connection refused, as `refuse_soon` refuses it.
fn turn_away(stream: ClientTcp, answer: Option<&'static [u8]>) {
    if let Ok(stream) = stream.into_tokio() {
        refuse_soon(stream, answer);
    }
}

/// Refuses `stream`: `answer` written (none: a lingering close alone), in
/// a task of its own while fewer than [`REFUSING_MAX`] are; else closed
/// at once.
fn refuse_soon(stream: TcpStream, answer: Option<&'static [u8]>) {
    let Ok(telling) = REFUSING.try_acquire() else {
        debug!("too many refusals at once; closed unanswered");
        return;
    };
    tokio::spawn(async move {
        let _telling = telling;
        match answer {
            Some(answer) => refuse(stream, answer).await,
            None => linger_close(stream).await,
        }
    });
}

/// Answers a client past the connection limit at once with `answer`,
/// without waiting for its request, so it can retry elsewhere instead of
/// waiting in a queue.
async fn refuse(mut stream: TcpStream, answer: &'static [u8]) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    linger_close(stream).await;
}

/// How long a lingering close reads what the client still sends, at
/// most, and how much.
#[derive(Clone, Copy)]
pub(crate) struct Linger {
    pub within: Duration,
    /// Since the last bytes came.
    pub idle: Duration,
    pub most: u64,
}

/// A refused client's request: a moment, a little.
pub(crate) const REFUSAL_LINGER: Linger = Linger {
    within: Duration::from_millis(500),
    idle: Duration::from_millis(500),
    most: 64 * 1024,
};

/// The rest of an upload whose answer came first (nginx's
/// `lingering_time` and `lingering_timeout`): a client that sends its
/// whole body before it reads (as Python's `requests` does) reads the
/// answer once its body went.
const UPLOAD_LINGER: Linger = Linger {
    within: Duration::from_secs(30),
    idle: Duration::from_secs(5),
    most: u64::MAX,
};

/// A lingering close of a refused client: see [`linger_close_for`].
pub(crate) async fn linger_close(stream: TcpStream) {
    linger_close_for(stream, REFUSAL_LINGER).await
}

/// A lingering close: a FIN after what was written, and what the client
/// sent read (for `linger`) before the socket closes. Closed with its
/// request unread, the kernel answers with a reset, which can reach the
/// client before it has read the answer, and fails its sending.
pub(crate) async fn linger_close_for<S>(mut stream: S, linger: Linger)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(linger.idle, stream.shutdown()).await;
    let deadline = tokio::time::Instant::now() + linger.within;
    // On the heap: in the future a 4 KiB array made this rare path the
    // largest state of every task that may take it (a SOCKS5 handshake's
    // 5.3 KB, against 2.2 KB without it).
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    while read < linger.most {
        let due = deadline.min(tokio::time::Instant::now() + linger.idle);
        match tokio::time::timeout_at(due, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => read += n as u64,
            _ => break,
        }
    }
}

/// What a client connection holds under the limits: its place under
/// `--max-connections`, and its address's (if they are counted).
pub(crate) type Held = (
    tokio::sync::OwnedSemaphorePermit,
    Option<crate::clients::ClientSlot>,
);

/// The client connection as hyper's server has it. One that ends after a
/// request with a body closes lingering ([`UPLOAD_LINGER`]), and holds its
/// places under the limits meanwhile: the answer may have come before the
/// body was read (a 407, a 403, a 502), and a connection closed with a
/// body unread is reset by the kernel, which a client still sending saw as
/// a broken pipe, not as the answer.
pub(crate) struct Lingering<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    /// Taken only by [`Lingering::into_inner`] and the drop.
    io: Option<I>,
    arrivals: Arc<Arrivals>,
    held: Option<Held>,
    /// The drain waits for the lingering close too.
    connections: TaskTracker,
    /// The worker's stop: a lingering close lasts at most the drain's
    /// grace from it.
    stop: CancellationToken,
}

impl<I> Lingering<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    /// The connection, for a tunnel, with its places: under
    /// `--max-connections` (the connection becomes the tunnel: a CONNECT
    /// needs no second place, which with the limit reached refused every
    /// tunnel), and its address's under `--max-client-connections` (else
    /// one address could open tunnels until every place was its).
    pub(crate) fn into_tunnel(mut self) -> (I, Option<Held>) {
        let io = self.io.take().expect("the connection, until taken");
        (io, self.held.take())
    }

    fn io(&mut self) -> Pin<&mut I> {
        Pin::new(self.io.as_mut().expect("the connection, until taken"))
    }
}

impl<I> Drop for Lingering<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        // After an upload, and in the drain: a connection closed at the
        // drain's word after an answer may have the client's next request
        // unread (sent before it read the `close`), as on the fast path.
        let linger = (self.arrivals.carried_body() || self.stop.is_cancelled())
            && !self.arrivals.reset.load(Ordering::Relaxed);
        if !linger || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let (Some(io), Some(held)) = (self.io.take(), self.held.take()) {
            let stop = self.stop.clone();
            self.connections.spawn(async move {
                let _held = held;
                // Cut at the drain's grace: it holds no work, and held the
                // drain to its timeout (its 30 s being the default's),
                // which then said work was cut (exit 3).
                tokio::select! {
                    _ = linger_close_for(io, UPLOAD_LINGER) => {}
                    _ = async {
                        stop.cancelled().await;
                        tokio::time::sleep(IDLE_CLOSE_GRACE).await
                    } => {}
                }
            });
        }
    }
}

impl<I> tokio::io::AsyncRead for Lingering<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl<I> tokio::io::AsyncWrite for Lingering<I>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

/// How long a draining worker keeps a connection between requests open
/// for its next request (answered with `Connection: close`).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A response body on hyper's path, counted until it ends (hyper drops it
/// then) or is dropped: see the drain in `serve_connection`.
struct Streamed {
    body: crate::proxy::ProxyBody,
    _going: Sent,
    /// The client's socket, for a body whose end is its close: dropped
    /// before that end, the close is made a reset.
    resets: Option<std::os::fd::OwnedFd>,
    ended: bool,
    /// The body's error, given hyper one turn after it came (see
    /// `poll_frame`).
    broke: Option<<crate::proxy::ProxyBody as hyper::body::Body>::Error>,
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if let Some(fd) = &self.resets {
            if !self.ended && !hyper::body::Body::is_end_stream(&self.body) {
                crate::os::reset_at_close(std::os::fd::AsRawFd::as_raw_fd(fd));
            }
        }
    }
}

/// A connection's responses whose body is still going out.
#[derive(Default)]
struct Going {
    count: AtomicUsize,
    /// Woken as the count falls to 0.
    none_left: tokio::sync::Notify,
}

impl Going {
    /// Resolves once no response body is going out.
    async fn none(&self) {
        loop {
            // (Made before the look: a wake-up in between is not lost.)
            let woken = self.none_left.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            woken.await;
        }
    }
}

/// One response counted in its connection's `Going` until dropped.
struct Sent(Arc<Going>);

impl Sent {
    fn new(going: &Arc<Going>) -> Sent {
        going.count.fetch_add(1, Ordering::SeqCst);
        Sent(going.clone())
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

impl hyper::body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = <crate::proxy::ProxyBody as hyper::body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(e) = self.broke.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let r = Pin::new(&mut self.body).poll_frame(cx);
        match r {
            Poll::Ready(None) => self.ended = true,
            // Given one turn later: hyper stops at a body's error without
            // writing what it holds, and flushes it while the body is
            // pending. An HTTP/1.0 client of a body cut short got a reset
            // and nothing of the head and the body before it (review at).
            Poll::Ready(Some(Err(e))) => {
                self.broke = Some(e);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts a request until its response head is out.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Waiting {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The requests a connection has received, and a wake-up for each.
#[derive(Default)]
struct Arrivals {
    count: std::sync::atomic::AtomicU64,
    notify: tokio::sync::Notify,
    /// Set when the connection drains (see `arrived`).
    watched: std::sync::atomic::AtomicBool,
    /// Whether the request that came last has a body not read to its end
    /// (see [`Lingering`]).
    bodies: std::sync::atomic::AtomicBool,
    /// Closed with a reset (a response body that broke off): no lingering
    /// close, after an upload or in the drain, whose shutdown would send
    /// the FIN.
    reset: std::sync::atomic::AtomicBool,
}

/// A request body on hyper's path that tells its connection once it has
/// been read to its end: only a connection whose last body was left
/// unread closes lingering (a connection that took a whole upload, then
/// idled, timed out or drained, held its places up to 30 s more).
struct Tracked {
    inner: hyper::body::Incoming,
    arrivals: Arc<Arrivals>,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if frame.is_none() || self.inner.is_end_stream() {
            self.arrivals.bodies.store(false, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Arrivals {
    /// A request arrived, with a body or not. Returns how many came
    /// before it.
    fn arrived(&self, body: bool) -> u64 {
        // (A connection whose last request had none closes without the
        // upload's lingering, which holds its places up to 30 s.)
        self.bodies.store(body, Ordering::Relaxed);
        // Only a draining connection waits: no wake-up (and its lock) per
        // request otherwise. SeqCst both here and in `watch`: an arrival
        // counted after the drain read the count sees the flag.
        let before = self.count.fetch_add(1, Ordering::SeqCst);
        if self.watched.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
        before
    }

    fn carried_body(&self) -> bool {
        self.bodies.load(Ordering::Relaxed)
    }

    /// The connection closes without lingering (with the reset set on
    /// its socket), whatever its last body, in the drain too.
    fn no_linger(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }

    /// From now on each arrival wakes `after`.
    fn watch(&self) {
        self.watched.store(true, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once a request after the `since`-th has arrived.
    async fn after(&self, since: u64) {
        loop {
            let notified = self.notify.notified();
            if self.count() > since {
                return;
            }
            notified.await;
        }
    }
}

/// Every second until `stop`: the failures an operator must act on since
/// their last warning, said once that is 10 s old
/// ([`crate::proxy::say_failed_since`]).
async fn say_failed_since(stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => crate::proxy::say_failed_since(),
            _ = stop.cancelled() => return,
        }
    }
}
