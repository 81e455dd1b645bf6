//! The allocator process: flags and configuration resolved, socket bound
//! or inherited, then `rotor_allocator::run`. Shared by `rotor-allocator`
//! and `rotor allocator` (which `rotor up` starts).

use std::process::ExitCode;

use rotor_protocol::error_chain;
use tracing::{error, info};

use crate::activation;
use crate::cli::{AllocatorArgs, FileConfig};

/// The whole life of allocator process, after logging is set up. Must run
/// before any other thread starts (socket activation clears variables).
pub fn allocator(args: AllocatorArgs) -> ExitCode {
    rotor_protocol::map_large_allocations();
    // Before any thread exists: this clears the activation variables.
    let passed = match activation::take_systemd() {
        Ok(p) => p,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let file = match FileConfig::load(args.common.at.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let pool = match args.settings.pool(&file) {
        Ok(p) => p,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let access = match args.settings.access(&file) {
        Ok(a) => a,
        Err(e) => {
            error!("{}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let socket = args.common.socket(&file);
    let passed_socket = match activation::select(&passed, "allocator").first() {
        Some(p) => match activation::unix_listener(p) {
            Ok(l) => Some(l),
            Err(e) => {
                error!("{}", error_chain(&e));
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if args.common.check || args.common.check_config {
        return check(
            &pool,
            &socket,
            passed_socket.is_some(),
            !args.common.check_config,
        );
    }

    // One lock serves every lease; a single thread is all it needs.
    crate::run_daemon(1, |signals| async move {
        // Watched from before the socket answers (`rotor up` passes a
        // SIGHUP on once it does): a SIGHUP is a reload from then on,
        // never a change already seen. (On this one-thread runtime the
        // watch cannot move before the first await; taken here, it stays
        // right if that changes.)
        let reloads = signals.reloads();
        // Before the allocator's socket: a port that is taken leaves no
        // socket file behind.
        let metrics = match pool.metrics_listen {
            None => None,
            Some(addr) => match std::net::TcpListener::bind(addr) {
                Ok(l) => Some(std::sync::Arc::new(l)),
                Err(e) => {
                    error!("cannot listen for metrics on {addr}: {e}");
                    // Another holds it: a configuration refused, as for
                    // the socket below.
                    return match e.kind() {
                        // Another holds it, or it is not this host's.
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => {
                            ExitCode::from(2)
                        }
                        _ => ExitCode::FAILURE,
                    };
                }
            },
        };
        let (listener, owned) = match passed_socket {
            Some(l) => {
                // Workers and `rotor` commands find the allocator at the
                // configured path: a passed socket elsewhere (the socket
                // unit's `ListenStream=` and `socket =` disagreeing) left
                // them never ready, with nothing said (review as).
                let passed_at = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf));
                match passed_at {
                    Some(at) if !same_path(&at, &socket) => tracing::warn!(
                        passed = %at.display(),
                        configured = %socket.display(),
                        "the socket systemd passed is not at the configured socket path: workers and rotor commands that use the configured one will not reach this allocator; make ListenStream= and `socket` (--socket, ROTOR_SOCKET) agree"
                    ),
                    Some(at) => info!(socket = %at.display(), "using the socket passed by systemd"),
                    None => info!("using the socket passed by systemd"),
                }
                match l
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixListener::from_std(l))
                {
                    Ok(l) => (l, false),
                    Err(e) => {
                        error!("cannot use the passed socket: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            None => match rotor_allocator::bind_socket(&socket, &access) {
                Ok(l) => {
                    info!(socket = %socket.display(), "allocator listening");
                    (l, true)
                }
                Err(e) => {
                    error!("{}", error_chain(&e));
                    // Another holds it, or its directory is one others
                    // could change or cannot be made: a configuration
                    // refused, as a port in use is.
                    use rotor_allocator::BindError as B;
                    return match e {
                        B::InUse(_)
                        | B::NotASocket(..)
                        | B::TooLong(..)
                        | B::WorldWritable(_)
                        | B::ForeignDir(..)
                        | B::LinkedDir(..)
                        | B::Unwritable(..)
                        | B::Dir { .. } => ExitCode::from(2),
                        _ => ExitCode::FAILURE,
                    };
                }
            },
        };
        let max_peers = match crate::raise_fd_limit() {
            Some(limit) => fit_peers(limit, pool.max_peers),
            None => pool.max_peers,
        };
        let config = rotor_allocator::Config {
            metrics,
            admin_token: pool.admin_token.clone(),
            sources: pool.sources,
            refresh: pool.refresh,
            state_dir: pool.state_dir,
            state_required: pool.state_given,
            access,
            max_sessions: pool.max_sessions,
            max_sessions_per_user: pool.max_sessions_per_user,
            site_rules: pool.site_rules,
            max_site_entries: pool.max_site_entries,
            unreachable_quarantine: pool.unreachable_quarantine,
            checkpoint: pool.checkpoint,
            max_peers,
            metrics_max_sources: pool.metrics_max_sources,
            orphaned: signals.orphaned.clone(),
        };
        let result = rotor_allocator::run(listener, config, reloads, signals.shutdown).await;
        rotor_allocator::source::end_commands();
        // A socket systemd passed is systemd's to remove. Only a socket
        // nobody listens on now (this one's: its listener is closed) goes:
        // a file put in its place, another allocator's, stay.
        let ours = rotor_allocator::not_a_socket(&socket).is_none()
            && !rotor_allocator::listened_on(&socket);
        if owned && ours {
            let _ = std::fs::remove_file(&socket);
        }
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                match e {
                    // Another allocator's, or one given that cannot be
                    // used: a configuration refused.
                    rotor_allocator::RunError::State(e) => {
                        use rotor_allocator::persist::{PersistError, UNUSABLE_HINT};
                        match e {
                            PersistError::Locked(_) | PersistError::Kept(..) => {
                                error!("{}", error_chain(&e))
                            }
                            _ => error!("{}: {UNUSABLE_HINT}", error_chain(&e)),
                        }
                        ExitCode::from(2)
                    }
                    e => {
                        error!("{}", error_chain(&e));
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

/// `--check`: read every source once (unless `!read`: `--check-config`)
/// and report.
fn check(
    pool: &crate::cli::PoolSettings,
    socket: &std::path::Path,
    passed: bool,
    read: bool,
) -> ExitCode {
    let mut ok = true;
    let mut total = 0;
    let mut usable = 0;
    // The local routes read once for every entry (megabytes on a host
    // with a full BGP table), and the first unusable entries named.
    let mut checker = rotor_allocator::usable::Checker::default();
    const NAMED: usize = 20;
    let mut unusable = 0;
    // Said once all are checked: an error only if none can be used (then
    // the check fails); else a warning, as the check passes.
    let mut unusable_named = Vec::new();
    let mut listed = Vec::new();
    // Sources named as the log names them (a command by its place: its
    // text may carry a token, and this goes to the unit's journal).
    for (place, s) in pool.sources.iter().enumerate().filter(|_| read) {
        let name = s.metric_label(place + 1);
        match s.read() {
            Ok(addrs) => {
                total += addrs.len();
                listed.extend_from_slice(&addrs);
                say!(
                    "ok: {name}: {}",
                    crate::count(addrs.len() as u64, "entry", "entries")
                );
                for e in &addrs {
                    match checker.check(e) {
                        Ok(()) => usable += 1,
                        Err(why) => {
                            unusable += 1;
                            if unusable <= NAMED {
                                unusable_named.push(format!("{e} cannot be used here: {why}"));
                            }
                        }
                    }
                }
                let misrouted = rotor_allocator::usable::misrouted(addrs.iter());
                for (_, why) in misrouted.found.iter().take(NAMED) {
                    say!("warning: {why}");
                }
            }
            Err(e) => {
                ok = false;
                say!("error: {name}: {}", error_chain(&e));
            }
        }
    }
    let level = match usable {
        0 => "error",
        _ => "warning",
    };
    for line in &unusable_named {
        say!("{level}: {line}");
    }
    let listed = rotor_allocator::pool::distinct(listed, &Default::default());
    if let Some(text) = rotor_allocator::state::unreached_text(&listed) {
        say!("warning: {text}");
    }
    if unusable > NAMED {
        say!(
            "{level}: {} more entries cannot be used here",
            unusable - NAMED
        );
    }
    // A socket directory it would refuse at its start, refused here
    // (making nothing).
    if passed {
        say!("ok: socket passed by systemd");
    } else if let Err(e) = rotor_allocator::socket_dir_unmade(socket) {
        ok = false;
        say!("error: {}", error_chain(&e));
    } else {
        say!("ok: socket {}", socket.display());
    }
    say!(
        "ok: refresh every {}",
        humantime::format_duration(pool.refresh)
    );
    // A state directory the allocator could not use would have it run
    // without (a warning at its start, the rotation and sessions lost at
    // each restart): --check says so, making nothing.
    match (&pool.state_dir, read) {
        (None, _) => say!("ok: state not kept"),
        (Some(dir), false) => say!("ok: state {} (not tried: --check-config)", dir.display()),
        (Some(dir), true) => {
            use rotor_allocator::persist::{probe_unmade, PersistError};
            match probe_unmade(dir) {
                Ok(()) => say!("ok: state {}", dir.display()),
                Err(PersistError::Locked(_)) => {
                    say!("ok: state {} (held by a running allocator)", dir.display())
                }
                // The default directory, not given: the allocator runs
                // without it, warning, as the check does.
                Err(e) if !pool.state_given => say!(
                    "warning: {}: the allocator would run without kept state (the rotation's place and the sessions lost at each restart); give --state-dir, or --no-state",
                    error_chain(&e)
                ),
                Err(e) => {
                    ok = false;
                    say!("error: {}", error_chain(&e));
                }
            }
        }
    }
    if !pool.site_rules.is_empty() {
        say!(
            "ok: site budgets per address (IPv6 per /{}): {} (at most {} entries of site state)",
            pool.site_rules.v6_prefix(),
            pool.site_rules,
            pool.max_site_entries
        );
    }
    if !read {
        for (place, s) in pool.sources.iter().enumerate() {
            let name = s.metric_label(place + 1);
            say!("ok: source {name} (not read: --check-config)");
        }
    } else if total == 0 {
        say!("warning: the pool is empty: clients will get 503");
    } else if usable == 0 {
        say!("error: no pool address can be used on this host: clients would get 503");
        ok = false;
    } else if usable < total {
        say!(
            "warning: {} of {total} entries cannot be used here; they would stay out of the rotation until they can",
            total - usable
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `max_peers` as the descriptor `limit` holds it (one each, beside
/// [`crate::FD_RESERVE`]): past the limit, a peer was not refused with a reason
/// but left unaccepted, and lease-only peers filling the descriptors kept
/// root's workers and `rotor status` out, their half share no bound.
fn fitted_peers(limit: u64, max_peers: usize) -> usize {
    (max_peers as u64).min(limit.saturating_sub(crate::FD_RESERVE).max(1)) as usize
}

/// [`fitted_peers`], warning when it lowers `max_peers`.
fn fit_peers(limit: u64, max_peers: usize) -> usize {
    let fitted = fitted_peers(limit, max_peers);
    if fitted < max_peers {
        tracing::warn!(
            limit,
            max_peers = fitted,
            asked = max_peers,
            "the descriptor limit holds fewer peers than max_peers: max_peers lowered to fit (workers and commands past it are refused); raise LimitNOFILE (ulimit -n)"
        );
    }
    fitted
}

/// Whether `a` and `b` name one file, by their directories as they resolve
/// (a symbolic link's and its target's are one) and their names.
fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    let resolved = |p: &std::path::Path| {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
        let dir = dir.unwrap_or(std::path::Path::new("."));
        Some((std::fs::canonicalize(dir).ok()?, p.file_name()?.to_owned()))
    };
    match (resolved(a), resolved(b)) {
        (Some(a), Some(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::fitted_peers;

    /// One descriptor a peer, beside the allocator's own.
    #[test]
    fn max_peers_fits_the_descriptor_limit() {
        assert_eq!(fitted_peers(1 << 20, 256), 256);
        assert_eq!(fitted_peers(1024, 256), 256);
        assert_eq!(fitted_peers(1024, 2048), 896);
        assert_eq!(fitted_peers(128, 256), 1);
    }
}
