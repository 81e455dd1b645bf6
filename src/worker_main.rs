//! The worker process: flags and configuration resolved, listeners bound or
//! inherited, then `rotor_worker::run`. Shared by `rotor-worker` and
//! `rotor worker` (which `rotor up` starts).

use std::process::ExitCode;

use rotor_protocol::error_chain;
use rotor_worker::{listener, LeaseClient, Stopped};
use tracing::error;

use crate::activation;
use crate::cli::{FileConfig, WorkerArgs};

/// Exit codes: drained cleanly.
const EXIT_DRAINED: u8 = 0;
/// Bad flags or configuration.
const EXIT_CONFIG: u8 = 2;
/// The drain deadline passed with requests or tunnels still in flight.
const EXIT_DRAIN_CUT: u8 = 3;
/// SIGINT: stopped at once.
const EXIT_FAST: u8 = 130;

/// A certificate given with no TLS listener: every listener is plain, the
/// proxy's passwords in clear where TLS was meant.
const CERT_UNUSED: &str =
    "tls-cert and tls-key are given but there is no TLS listener (tls-listen): every listener is plain";

/// The whole life of worker process, after logging is set up. Must run
/// before any other thread starts (socket activation clears variables).
pub fn worker(args: WorkerArgs) -> ExitCode {
    // A password check's 19 MiB (argon2, on a blocking thread) mapped
    // and given back each time: kept in that thread's arena, a flood of
    // wrong passwords left a worker holding 350–730 MB for good.
    rotor_protocol::map_large_allocations();
    let fail = |e: &dyn std::error::Error| {
        error!("{}", error_chain(e));
        ExitCode::from(EXIT_CONFIG)
    };
    // Before any thread exists: this clears the activation variables.
    let mut passed = match activation::take_systemd() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    if let Some(e) = activation::misnamed(&passed) {
        return fail(&crate::cli::ConfigError::Invalid(e));
    }
    let file = match FileConfig::load(args.common.at.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let mut tuning = match args.settings.resolve(&file) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    // Descriptors given by flag, named as their flag says (`None`: the
    // name they came with).
    let by_flag = [
        (&args.listen_fd, None),
        (&args.socks_listen_fd, Some("socks")),
        (&args.tls_listen_fd, Some("tls")),
    ];
    for (fds, name) in by_flag {
        for fd in fds {
            match activation::take_fd(*fd) {
                Ok(mut p) => {
                    if let Some(name) = name {
                        p.name = name.into();
                    }
                    passed.push(p);
                }
                Err(e) => return fail(&e),
            }
        }
    }
    // Sockets named `socks` (systemd's FileDescriptorName, or
    // --socks-listen-fd) serve SOCKS5, those named `tls` (or
    // --tls-listen-fd) HTTP over TLS; the others HTTP.
    let (tls_passed, passed): (Vec<_>, Vec<_>) = passed.into_iter().partition(|p| p.name == "tls");
    let (socks_passed, http_passed): (Vec<_>, Vec<_>) =
        passed.into_iter().partition(|p| p.name == "socks");
    let merged = args.settings.merge(&file.worker);
    if args.common.check || args.common.check_config {
        // Nothing is bound: the unit runs this as ExecStartPre, while
        // systemd holds the ports (and passes them to ExecStart only).
        let mut named: Vec<(&str, std::net::SocketAddr)> = Vec::new();
        for p in &http_passed {
            match activation::tcp_listener(p).map(|l| l.local_addr()) {
                Ok(Ok(a)) => named.push(("listen (passed)", a)),
                Ok(Err(e)) => return fail(&e),
                Err(e) => return fail(&e),
            }
        }
        let passed_any =
            !(http_passed.is_empty() && socks_passed.is_empty() && tls_passed.is_empty());
        for a in args.settings.listen(&file, usize::from(passed_any)) {
            named.push(("listen", a));
        }
        named.extend(merged.socks_listen.iter().map(|a| ("SOCKS5", *a)));
        named.extend(merged.tls_listen.iter().map(|a| ("TLS", *a)));
        // The addresses given, and those of sockets passed: not the
        // default, which a socket systemd passes at the start (unseen
        // here, as ExecStartPre) replaces.
        let plain_listen: Vec<std::net::SocketAddr> = named
            .iter()
            .filter(|(what, _)| *what == "listen (passed)")
            .map(|(_, a)| *a)
            .chain(args.settings.given_listen(&file))
            .collect();
        if let Err(e) = crate::cli::worker::one_kind_each(
            &plain_listen,
            &merged.socks_listen,
            &merged.tls_listen,
        ) {
            return fail(&e);
        }
        let addrs: Vec<std::net::SocketAddr> = named.iter().map(|(_, a)| *a).collect();
        if addrs.is_empty() && !passed_any {
            say!("note: nothing to listen on unless systemd passes sockets (listen = [], and no socks-listen or tls-listen)");
        }
        let (tls, plain): (Vec<_>, Vec<_>) = named.iter().partition(|(what, _)| *what == "TLS");
        let plain: Vec<std::net::SocketAddr> = plain.iter().map(|(_, a)| *a).collect();
        let tls: Vec<std::net::SocketAddr> = tls.iter().map(|(_, a)| *a).collect();
        if let Err(e) = tuning.check_exposure(&plain, &tls) {
            return fail(&e);
        }
        for (what, a) in &named {
            say!("ok: {what} {a} (not bound by --check)");
        }
        if tls.is_empty() && tuning.config.tls.is_some() {
            say!("warning: {CERT_UNUSED} (unless systemd passes a socket named `tls`)");
        }
        if !passed_any {
            // ExecStartPre gets no sockets: those systemd passes to the
            // start are checked then (a public one without --auth-file is
            // refused at the start, not here).
            say!(
                "note: sockets systemd passes at the start (Sockets=) are not seen by --check; they are checked when the worker starts"
            );
        }
        say!(
            "ok: allocator socket {}",
            args.common.socket(&file).display()
        );
        check_summary(&tuning);
        return ExitCode::SUCCESS;
    }
    if let Err(e) = tuning.open_access_log() {
        return fail(&e);
    }
    let given = (&args.settings.socks_listen, &args.settings.tls_listen);
    let (tls_listeners, tls_inherited) =
        match passed_or_bound(&tls_passed, &merged.tls_listen, given.1) {
            Ok(x) => x,
            Err(e) => return fail(e.as_ref()),
        };
    let mut listeners = Vec::new();
    for p in activation::select(&http_passed, "proxy") {
        match activation::tcp_listener(p) {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(&e),
        }
    }
    let (socks, socks_inherited) =
        match passed_or_bound(&socks_passed, &merged.socks_listen, given.0) {
            Ok(x) => x,
            Err(e) => return fail(e.as_ref()),
        };
    // The listeners hold copies: the descriptors as they came go now, so
    // that when the listeners close (at the drain) the port closes with
    // them, unless the one who passed it holds it (systemd does; `rotor
    // up` shuts it at a stop, and killed outright holds nothing).
    drop((http_passed, socks_passed, tls_passed));
    // Sockets passed (of any kind) replace the default HTTP listener.
    let inherited = listeners.len() + socks_inherited + tls_inherited;
    for addr in args.settings.listen(&file, inherited) {
        match listener::bind_reuseport(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => return fail(&e),
        }
    }
    let addrs: Vec<std::net::SocketAddr> = listeners
        .iter()
        .chain(&socks)
        .chain(&tls_listeners)
        .filter_map(|l| l.local_addr().ok())
        .collect();
    if addrs.is_empty() {
        return fail(&crate::cli::ConfigError::Invalid(
            crate::cli::worker::NOTHING_TO_LISTEN_ON.into(),
        ));
    }
    let address = |l: &std::net::TcpListener| l.local_addr().ok();
    let http: Vec<std::net::SocketAddr> = listeners.iter().filter_map(address).collect();
    let socks_at: Vec<std::net::SocketAddr> = socks.iter().filter_map(address).collect();
    let tls: Vec<std::net::SocketAddr> = tls_listeners.iter().filter_map(address).collect();
    // Of what is bound (sockets passed replace the file's listen), before
    // anything is served: two kinds on one address (both bound, with
    // SO_REUSEPORT) would split clients between handlers at random.
    if let Err(e) = crate::cli::worker::one_kind_each(&http, &socks_at, &tls) {
        return fail(&e);
    }
    let plain: Vec<std::net::SocketAddr> = http.iter().chain(&socks_at).copied().collect();
    if let Err(e) = tuning.check_exposure(&plain, &tls) {
        return fail(&e);
    }
    // A TLS socket systemd passed (rotor-worker-tls.socket) with no
    // certificate: refused here, not left open to clients that would hang
    // in its backlog (--check cannot see it: systemd passes sockets to
    // ExecStart= only).
    if !tls_listeners.is_empty() && tuning.config.tls.is_none() {
        return fail(&crate::cli::ConfigError::Invalid(
            "a TLS listener (tls-listen, or a socket named `tls`) needs tls-cert and tls-key"
                .into(),
        ));
    }
    if tls_listeners.is_empty() && tuning.config.tls.is_some() {
        tracing::warn!("{CERT_UNUSED}");
    }
    let socket = args.common.socket(&file);
    let report_to = socket.clone();
    // The meter of a run whose drain was cut: its last requests are counted
    // as the runtime drops them, after the last report.
    let cut_meter = std::sync::Arc::new(std::sync::Mutex::new(None));
    let leaving = cut_meter.clone();

    fit_fd_limit(&mut tuning.config, tuning.max_connections_given);
    let code = crate::run_daemon(tuning.threads, |signals| async move {
        let leases = LeaseClient::start(socket, tuning.lease_timeout, signals.fast.clone());
        if let Some(auth) = tuning.config.proxy.auth.clone() {
            tracing::info!(users = auth.len(), "proxy authentication on");
            // Read once more now the handler is in place (the worker's
            // reloads re-read it from here on, see `rotor_worker::run`): a
            // SIGHUP between the first read (at the start) and now was
            // ignored, and a user it removed would be served until the
            // next one.
            if let Err(e) = auth.reload() {
                tracing::warn!(error = %error_chain(&e), "users file not re-read at start; keeping the users read first");
            }
        }
        // `rotor reload` (or SIGHUP) to the allocator reaches every worker
        // through the lease table, or asked over the socket by a worker
        // that may not map it: the same reload as a SIGHUP here.
        {
            let leases = leases.clone();
            let signals = signals.clone();
            tokio::spawn(async move {
                let mut seen = None;
                // The allocator process of the last look.
                let mut allocator: Option<u32> = None;
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
                loop {
                    // (On through the drain: a draining worker is still
                    // connected, and `rotor reload` waits for its word.)
                    tokio::select! {
                        _ = signals.fast.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    // Not before the connection was told its first count
                    // (its first request): it counts from that, as the
                    // allocator counts this worker's.
                    let Some(at) = leases.reloads_at_attach() else {
                        continue;
                    };
                    let Some(now) = leases.reloads_asked().await else {
                        continue;
                    };
                    let pid = leases.allocator_pid();
                    let restarted = restarted(pid, allocator, started_after_this_worker);
                    let since = counted_from(at, seen, restarted);
                    // (A look that lost the connection half-way keeps the
                    // allocator it knew: the same one next is no restart.)
                    allocator = pid.or(allocator);
                    if reload_asked(since, now) {
                        tracing::info!("the allocator was asked to reload; reloading");
                        leases.asked_to_reload(now);
                        signals.reload_now();
                    }
                    seen = Some(now);
                }
            });
        }
        let result = rotor_worker::run(
            rotor_worker::Listeners {
                http: listeners,
                socks,
                tls: tls_listeners,
            },
            leases,
            tuning.config,
            signals.shutdown.clone(),
            signals.fast.clone(),
            signals.reloads(),
        )
        .await;
        if let Ok((Stopped::Cut, meter)) = &result {
            *leaving.lock().unwrap_or_else(|e| e.into_inner()) = Some(meter.clone());
        }
        match result {
            _ if signals.fast.is_cancelled() => ExitCode::from(EXIT_FAST),
            Ok((Stopped::Drained, _)) => ExitCode::from(EXIT_DRAINED),
            Ok((Stopped::Cut, _)) => ExitCode::from(EXIT_DRAIN_CUT),
            Err(e) => {
                error!("worker failed: {e}");
                ExitCode::FAILURE
            }
        }
    });
    let cut = cut_meter.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(meter) = cut {
        report_left(&report_to, &meter);
    }
    code
}

/// Sends the allocator what `meter` counted after the last report (the
/// requests a drain cut dropped, `worker_stopped`), over a connection of
/// its own: the runtime that held the worker's is gone. Bounded by 2 s.
fn report_left(socket: &std::path::Path, meter: &rotor_worker::meter::Meter) {
    let Some(m) = meter.take_left() else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    // (The timer is made inside the runtime: made outside, it panicked.)
    let sent = rt.block_on(async {
        let ask = crate::control::request_by_minor(socket, |minor| {
            match minor >= rotor_protocol::MINOR_METRICS {
                true => m.request().for_minor(minor),
                false => rotor_protocol::Request::Status,
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(2), ask).await
    });
    if !matches!(sent, Ok(Ok(rotor_protocol::Response::Noted { .. }))) {
        tracing::warn!("the requests the drain's end dropped were not reported to the allocator (its metrics miss them; the access log has them)");
    }
}

/// The listeners of one kind: those passed and those given as `flags`,
/// or else those bound at `addrs` (SO_REUSEPORT); and how many were
/// passed.
fn passed_or_bound(
    passed: &[activation::Passed],
    addrs: &[std::net::SocketAddr],
    flags: &[std::net::SocketAddr],
) -> Result<(Vec<std::net::TcpListener>, usize), Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for p in passed {
        out.push(activation::tcp_listener(p)?);
    }
    let inherited = out.len();
    // Passed sockets replace the file's addresses (the socket unit's
    // `ListenStream=` is where they are), not those given as flags, which
    // are bound beside them, as `--listen` is (one was dropped without a
    // word: review as). `rotor up` gives its children none.
    let bound = match inherited {
        0 => addrs,
        _ => flags,
    };
    // (A flag naming a passed socket's own address is that socket: bound
    // again, the start failed, address in use.)
    let held: Vec<std::net::SocketAddr> = out.iter().filter_map(|l| l.local_addr().ok()).collect();
    for addr in bound.iter().filter(|a| !held.contains(a)) {
        out.push(listener::bind_reuseport(*addr)?);
    }
    Ok((out, inherited))
}

/// What a descriptor `limit` holds: `max_connections` clients at most, each
/// busy upstream at once (two descriptors: the client's and its upstream
/// one), beside the idle upstream pool (a quarter of the limit at most,
/// `MAX_IDLE_TOTAL` at most), the relays' kept pipes (two each) and
/// [`crate::FD_RESERVE`], each of these an eighth of the limit at most (a limit
/// of 300 had left one client); and the idle pool's size. As HAProxy derives `maxconn`
/// from `ulimit -n`: a worker under a limit of 1024 had accepted clients
/// it could not serve, each answered 503 `Proxy Out Of Sockets` once its
/// upstream socket failed, while the idle pool held descriptors.
fn fitted(limit: u64, max_connections: usize) -> (usize, usize) {
    let (idle, pipes, reserve) = set_aside(limit);
    let clients = (limit.saturating_sub(reserve + pipes + idle) / 2).max(1);
    let max = (max_connections as u64).min(clients);
    (max as usize, idle as usize)
}

/// What [`fitted`] sets aside of `limit` beside the clients: the idle
/// upstream pool's descriptors, the kept pipes', and the reserve.
fn set_aside(limit: u64) -> (u64, u64, u64) {
    let idle = (rotor_worker::upstream::MAX_IDLE_TOTAL as u64).min(limit / 4);
    let pipes = (2 * rotor_worker::relay::PIPES_KEPT as u64).min(limit / 8);
    let reserve = crate::FD_RESERVE.min(limit / 8);
    (idle, pipes, reserve)
}

/// The descriptors pipes may hold (see `relay::set_pipe_budget`): what
/// `limit` leaves beside `max` clients busy upstream, `idle` idle upstream
/// connections and the reserve; at least what [`fitted`] set aside for
/// them.
fn pipe_budget(limit: u64, max: usize, idle: usize) -> usize {
    let (_, pipes, reserve) = set_aside(limit);
    let left = limit.saturating_sub(reserve + idle as u64 + 2 * max as u64);
    usize::try_from(left.max(pipes)).unwrap_or(usize::MAX)
}

/// Fits `config` to the descriptor limit (see [`fitted`]), saying so when
/// it lowers `max_connections`: with a warning when the cap was `given`,
/// at info when it is the default (10 000 is more than a hard limit of
/// 20 000 holds, and such a host warned at every start).
fn fit_fd_limit(config: &mut rotor_worker::Config, given: bool) {
    let Some(limit) = crate::raise_fd_limit() else {
        return;
    };
    let asked = config.max_connections;
    let (max, idle) = fitted(limit, asked);
    config.max_connections = max;
    config.proxy.upstream_idle_total = idle;
    rotor_worker::relay::set_pipe_budget(pipe_budget(limit, max, idle));
    match (max < asked, given) {
        (false, _) => {}
        (true, true) => tracing::warn!(
            limit,
            max_connections = max,
            asked,
            idle_upstream = idle,
            "the descriptor limit holds fewer clients than max_connections (two descriptors each, busy upstream, beside the idle upstream pool and the relays' pipes): max_connections lowered to fit, so that a client accepted is served (past it a new client gets 503 at once); raise LimitNOFILE (ulimit -n)"
        ),
        (true, false) => tracing::info!(
            limit,
            max_connections = max,
            default = asked,
            idle_upstream = idle,
            "max_connections fitted to the descriptor limit (two descriptors a client busy upstream, beside the idle upstream pool and the relays' pipes); raise LimitNOFILE (ulimit -n) for more"
        ),
    }
}

/// Whether the allocator of a look (its process, `now`) is a restarted
/// one, whose reloads all count: another process than the last look's
/// (`last`); at the first look, one that started after this worker (by
/// `started_after`), whose reloads all came after this worker read its
/// files — the first allocator may have died before the watcher first
/// looked, its successor counted a reload (a SIGHUP `rotor up` held) before
/// this worker attached, and it was missed.
fn restarted(now: Option<u32>, last: Option<u32>, started_after: impl Fn(u32) -> bool) -> bool {
    match (now, last) {
        (Some(now), Some(last)) => now != last,
        (Some(now), None) => started_after(now),
        (None, _) => false,
    }
}

/// Whether process `pid` started after this one (their start times in
/// `/proc`, in clock ticks; the same tick counts as after). False where
/// it cannot be told.
fn started_after_this_worker(pid: u32) -> bool {
    // Field 22 of stat, the 20th after the command's closing parenthesis.
    let start = |path: String| -> Option<u64> {
        let stat = std::fs::read_to_string(path).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(19)?
            .parse()
            .ok()
    };
    match (
        start(format!("/proc/{pid}/stat")),
        start("/proc/self/stat".into()),
    ) {
        (Some(it), Some(me)) => it >= me,
        _ => false,
    }
}

/// Where a look at the reloads asked counts from: what was seen last, over
/// this connection or an earlier one to the same allocator (a reload
/// asked while this worker was away — frozen past the allocator's
/// patience, say — is not lost: the new connection's first count includes
/// it); at the first look, the first count the connection was told (`at`:
/// a reload asked in between is not lost); but to a `restarted` allocator
/// (another process than the last look's), from 0 in its table: its count
/// started over, and a reload asked of it before this worker reconnected
/// (`rotor up` passing on a SIGHUP that came during the restart) was
/// counted before the worker was told, and was missed.
fn counted_from(at: (u64, u64), seen: Option<(u64, u64)>, restarted: bool) -> (u64, u64) {
    match restarted {
        true => (at.0, 0),
        false => seen.unwrap_or(at),
    }
}

/// Whether the allocator was asked to reload between two readings of the
/// lease table's (id, reload count). In the same table, the count moved.
/// In another table, only a count above the last: a table replaced while
/// the allocator runs (a pool grown past it, a repair) carries the count
/// over — a `rotor reload` whose refresh grows the pool lands in the new
/// table, and must not be missed (a revoked user would keep access) —
/// while a restarted allocator's table starts from 0.
fn reload_asked((table, count): (u64, u64), (now_table, now_count): (u64, u64)) -> bool {
    match table == now_table {
        true => now_count != count,
        false => now_count > count,
    }
}

/// What `--check` read, in words (the settings a worker would run with).
fn check_summary(t: &crate::cli::worker::WorkerSettingsTuning) {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let list = |v: &[rotor_worker::acl::Cidr]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (c, p) = (&t.config, &t.config.proxy);
    say!(
        "ok: {} runtime thread(s); timeouts: lease {}, connect {}, response {}, header read {}, idle {}, tunnel idle {}, drain {}",
        t.threads,
        d(t.lease_timeout),
        d(p.connect_timeout),
        d(p.response_timeout),
        d(c.header_read_timeout),
        d(p.idle_timeout),
        d(p.tunnel_idle_timeout),
        d(c.drain_timeout)
    );
    // As the worker would fit it to its descriptor limit (raised to the
    // hard one here as there).
    let asked = c.max_connections;
    let limit = crate::raise_fd_limit();
    let max = limit.map_or(asked, |limit| fitted(limit, asked).0);
    match (limit, max < asked, t.max_connections_given) {
        (Some(limit), true, true) => say!("warning: the descriptor limit ({limit}) holds {max} clients, not max-connections {asked} (two descriptors each, busy upstream, beside the idle upstream pool and the relays' pipes): the worker would serve {max} at most; raise LimitNOFILE (ulimit -n)"),
        (Some(limit), true, false) => say!("ok: the descriptor limit ({limit}) holds {max} clients: the default max-connections ({asked}) is fitted to it; raise LimitNOFILE (ulimit -n) for more"),
        _ => {}
    }
    say!(
        "ok: at most {} connections, {} from one client address (0: no limit); heads of {} bytes at most",
        max, c.max_client_connections, p.max_head_bytes
    );
    let (allow, deny) = p.acl.operator_rules();
    say!(
        "ok: destinations: public addresses; allowed too: [{}]; denied: [{}]; ports denied: {:?}",
        list(allow),
        list(deny),
        p.acl.deny_ports()
    );
    match &p.auth {
        Some(a) => say!("ok: {} user(s) in the users file", a.len()),
        None if t.no_auth => say!("ok: no authentication (--no-auth)"),
        None => say!("ok: no authentication (loopback listeners only)"),
    }
    say!(
        "ok: TLS certificate: {}; access log: {}; names resolved by {}",
        if c.tls.is_some() { "loaded" } else { "none" },
        if t.access_log.is_some() { "on" } else { "off" },
        match &p.resolver {
            rotor_worker::dns::ResolverChoice::System => "getaddrinfo".to_string(),
            rotor_worker::dns::ResolverChoice::Dns { servers } if servers.is_empty() => {
                "rotor, from /etc/resolv.conf".to_string()
            }
            rotor_worker::dns::ResolverChoice::Dns { servers } => format!(
                "rotor, from {}",
                servers
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    );
}

#[cfg(test)]
mod tests {
    use super::{
        counted_from, fitted, pipe_budget, reload_asked, restarted, started_after_this_worker,
    };

    /// A descriptor limit holds the clients busy upstream, two each,
    /// beside the idle pool (a quarter of it at most) and the pipes; a
    /// large one leaves `max_connections` as asked.
    #[test]
    fn the_connection_cap_fits_the_descriptor_limit() {
        assert_eq!(fitted(1 << 20, 10_000), (10_000, 4096));
        assert_eq!(fitted(65_536, 10_000), (10_000, 4096));
        assert_eq!(fitted(65_536, 50_000), (30_584, 4096));
        assert_eq!(fitted(1024, 10_000), (256, 256));
        assert_eq!(fitted(1024, 100), (100, 256));
        assert_eq!(fitted(300, 10_000), (75, 75));
        assert_eq!(fitted(64, 10_000), (16, 16));
        assert_eq!(fitted(0, 10_000), (1, 0));
        // Pipes take what the clients leave: at 256, the 32 set aside.
        assert_eq!(pipe_budget(256, 64, 64), 32);
        assert_eq!(
            pipe_budget(1 << 20, 10_000, 4096),
            (1 << 20) - 128 - 4096 - 20_000
        );
        assert_eq!(pipe_budget(1024, 256, 256), 1024 - 128 - 256 - 512);
    }

    /// Another allocator than the last look's is a restarted one; at the
    /// first look, one that started after this worker.
    #[test]
    fn an_allocator_started_after_the_worker_is_a_restarted_one() {
        let after = |pid| pid >= 100;
        assert!(!restarted(None, None, after));
        assert!(!restarted(None, Some(10), after));
        assert!(!restarted(Some(10), None, after));
        assert!(restarted(Some(100), None, after));
        assert!(!restarted(Some(10), Some(10), after));
        assert!(!restarted(Some(100), Some(100), after));
        assert!(restarted(Some(20), Some(10), after));
        // By /proc: this process is no later than itself, pid 1 started
        // before it, a child started after.
        assert!(started_after_this_worker(std::process::id()));
        assert!(!started_after_this_worker(1));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(started_after_this_worker(child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!started_after_this_worker(u32::MAX));
    }

    /// A reload asked of a restarted allocator before this worker mapped
    /// its table is seen (counted from 0); one asked of the same
    /// allocator before a reconnection is not taken twice, nor is the
    /// first connection's count at its mapping (read at the start).
    #[test]
    fn a_restarted_allocators_reloads_count_from_its_start() {
        let look = |at, seen, restarted, now| reload_asked(counted_from(at, seen, restarted), now);
        // The first look: from the table as mapped.
        assert!(!look((7, 2), None, false, (7, 2)));
        assert!(look((7, 2), None, false, (7, 3)));
        // The same connection: from what was seen.
        assert!(!look((7, 2), Some((7, 3)), false, (7, 3)));
        // A new allocator process, asked once before the worker came back.
        assert!(look((9, 1), Some((7, 3)), true, (9, 1)));
        // Nothing asked of it.
        assert!(!look((9, 0), Some((7, 3)), true, (9, 0)));
        // The same allocator, reconnected: from what was seen, not taken
        // twice, nor missed when asked while this worker was away.
        assert!(!look((7, 3), Some((7, 3)), false, (7, 3)));
        assert!(look((7, 4), Some((7, 3)), false, (7, 4)));
    }

    #[test]
    fn a_reload_is_seen_in_a_table_that_replaced_the_last() {
        assert!(!reload_asked((1, 3), (1, 3)));
        assert!(reload_asked((1, 3), (1, 4)));
        // Grown past its table by the reload's own refresh: the new one
        // carries 3 and the reload made it 4.
        assert!(reload_asked((1, 3), (2, 4)));
        // Replaced with nothing asked, or a restarted allocator's table.
        assert!(!reload_asked((1, 3), (2, 3)));
        assert!(!reload_asked((1, 3), (2, 0)));
    }
}
