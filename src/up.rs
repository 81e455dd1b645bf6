//! `rotor up`: one allocator and N workers as child processes on one port,
//! supervised: a child that dies is restarted, SIGTERM/SIGINT are passed
//! on (SIGHUP to the allocator, whose reload reaches the workers), and
//! every child is stopped before `rotor up` exits.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cli::{AllocatorFlags, CommonArgs, FileConfig, UpFlags, WorkerFlags};
use crate::signals::Signals;

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub up: UpFlags,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub allocator: AllocatorFlags,
    #[command(flatten)]
    pub worker: WorkerFlags,
}

/// Most listening sockets `rotor up` passes to a worker.
const MAX_LISTENERS: usize = 64;

/// Allocator connections kept beyond the workers' own (see `run`).
const PEERS_SPARE: usize = 8;

/// The configuration file as `rotor up` read it, for its children: a
/// child started again (it crashed, or its drain ended) reads what its
/// siblings did, not the file as edited since (a change half made took
/// the allocator down for good, and a raised drain timeout was cut at
/// the old one). A private file in the temporary directory, removed when
/// `rotor up` ends, and written again before a child's start if it is
/// gone: the temporary directory's cleaning (systemd-tmpfiles ages /tmp
/// out after 10 days) took it from a `rotor up` that had run that long,
/// and no child that crashed after could start again.
struct Snapshot {
    path: std::path::PathBuf,
    text: String,
}

impl Snapshot {
    fn write(text: &str) -> std::io::Result<Snapshot> {
        let path = std::env::temp_dir().join(format!("rotor-up-{}.toml", std::process::id()));
        // A file left by a killed rotor up of the same pid goes first, and
        // those of others killed outright (SIGKILL runs no drop).
        let _ = std::fs::remove_file(&path);
        Snapshot::sweep(&std::env::temp_dir());
        let s = Snapshot {
            path,
            text: text.to_string(),
        };
        s.create()?;
        Ok(s)
    }

    /// Removes the copies in `dir` of rotor ups that are gone: this
    /// user's plain files named as ours, of a pid no process has.
    fn sweep(dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let me = nix::unistd::geteuid().as_raw();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("rotor-up-")?.strip_suffix(".toml"))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let ours =
                std::fs::symlink_metadata(e.path()).is_ok_and(|m| m.is_file() && m.uid() == me);
            if ours && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn create(&self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(self.text.as_bytes())
    }

    /// Whether the file at the path is ours as written: this user's, for
    /// it alone, a plain file (not followed), holding the text. (The path
    /// is predictable: once /tmp's cleaning removed ours, another user
    /// could put a file there, with a pool command in it.)
    fn intact(&self) -> std::io::Result<bool> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            // (Not blocking on a FIFO put in its place.)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path)?;
        let m = f.metadata()?;
        if !m.is_file() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o077 != 0 {
            return Ok(false);
        }
        let mut held = String::new();
        f.read_to_string(&mut held)?;
        Ok(held == self.text)
    }

    /// The file, as written, before a child's start: written again if it
    /// is gone; one in its place that is not it is removed and ours
    /// written (an error, and no child started, if that fails).
    fn ensure(&self) -> std::io::Result<()> {
        match self.intact() {
            Ok(true) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(file = %self.path.display(), "the copy of the configuration file for the children was gone (a cleaning of the temporary directory?); written again");
            }
            _ => {
                warn!(file = %self.path.display(), "the copy of the configuration file for the children is not the one written; removed, and written again");
                std::fs::remove_file(&self.path)?;
            }
        }
        self.create()
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// At each SIGHUP (`systemctl reload`), says if the configuration file
/// differs from the copy the children read: a reload reads the pool's
/// sources, users files and certificates again, not the file, and an edit
/// passed over in silence seemed applied (`rotor reload --config` says so
/// too, and exits 3).
async fn tell_edits_unread(path: std::path::PathBuf, snap: Arc<Snapshot>, signals: Signals) {
    let mut reloads = signals.reloads();
    loop {
        tokio::select! {
            r = reloads.changed() => if r.is_err() { return },
            _ = signals.shutdown.cancelled() => return,
        }
        match rotor_protocol::read_text_file(&path) {
            Ok(text) if text == snap.text => {}
            Ok(_) => {
                warn!(file = %path.display(), "the configuration file changed since rotor up started, and a reload does not read it again: restart rotor to apply it")
            }
            Err(e) => {
                warn!(file = %path.display(), error = %e, "cannot read the configuration file to tell whether it changed since rotor up started (a reload does not read it again)")
            }
        }
    }
}

/// A child's command line: `rotor NAME`, the file and socket every child
/// gets, then its `flags`.
fn child_args(
    name: &str,
    args: &UpArgs,
    socket: &std::path::Path,
    config: Option<&std::path::Path>,
    flags: Vec<OsString>,
) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![name.into()];
    out.extend(args.common.to_args(socket, config));
    out.extend(flags);
    out
}

/// The flags a worker of `workers` gets (its listeners still in them):
/// the operator's, and rotor up's defaults where neither they nor the
/// file set one.
fn child_worker_flags(args: &UpArgs, file: &FileConfig, workers: u16) -> WorkerFlags {
    let mut flags = args.worker.clone();
    // Single-threaded workers, one per CPU by default: measured faster than
    // fewer workers with a thread per CPU each (the README's figures).
    if flags.threads.is_none() && file.worker.threads.is_none() {
        flags.threads = Some(1);
    }
    // The CPUs' password checks shared among the workers: each alone
    // would take one per CPU, and N workers N times the CPUs (and 19 MiB
    // each) under a flood of bad logins.
    if flags.auth_checks.is_none() && file.worker.auth_checks.is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        flags.auth_checks = Some((cpus / usize::from(workers)).max(1));
    }
    flags
}

/// `rotor up --check`: the allocator's and a worker's own checks, run as
/// the children would be (their flags and the file), so what either
/// would refuse at its start is said now: a state directory it cannot
/// use, the pool's sources (not read by `--check-config`), an access log
/// it cannot open. (A worker's check binds nothing: a running rotor
/// holding the ports does not fail it.) The worst exit of the two.
async fn children_check(
    args: &UpArgs,
    socket: &std::path::Path,
    worker_flags: WorkerFlags,
) -> ExitCode {
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            error!("cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = args.common.at.config.as_deref();
    let check: OsString = match args.common.check_config {
        true => "--check-config".into(),
        false => "--check".into(),
    };
    let alloc = child_args("allocator", args, socket, config, args.allocator.to_args());
    let worker = child_args("worker", args, socket, config, worker_flags.to_args());
    let mut worst = 0;
    for (name, mut child) in [("allocator", alloc), ("worker", worker)] {
        child.push(check.clone());
        let status = tokio::process::Command::new(&me)
            .args(&child)
            .status()
            .await;
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                error!("the {name}'s check failed ({s})");
                worst = worst.max(s.code().unwrap_or(1));
            }
            Err(e) => {
                error!("cannot run the {name}'s check: {e}");
                worst = worst.max(1);
            }
        }
    }
    ExitCode::from(u8::try_from(worst).unwrap_or(1))
}

/// The first and the longest pause before the allocator is started again
/// while the workers drain.
const DRAIN_RESTART_FIRST: Duration = Duration::from_millis(100);
const DRAIN_RESTART_MOST: Duration = Duration::from_secs(2);

/// How long children get to stop after the drain timeout before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

pub async fn run(args: UpArgs, signals: Signals) -> ExitCode {
    // The file as it is now, read once: every child, started again or
    // not, reads this copy (see `Snapshot`).
    let text = match &args.common.at.config {
        Some(path) => match rotor_protocol::read_text_file(path) {
            Ok(t) => Some((path.clone(), t)),
            Err(e) => {
                let e = crate::cli::ConfigError::Read(path.clone(), e);
                error!("{}", rotor_protocol::error_chain(&e));
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let parsed = match &text {
        Some((path, t)) => FileConfig::parse(path, t),
        None => Ok(FileConfig::default()),
    };
    let file = match parsed {
        Ok(f) => f,
        Err(e) => {
            error!("{}", rotor_protocol::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    // Validate here, so a mistake is reported once, not by every child.
    let up = args.up.merge(&file.up);
    let (tuning, max_peers, (state_dir, state_given), metrics_listen) =
        match up.check().and_then(|()| {
            let pool = args.allocator.pool(&file)?;
            args.allocator.access(&file)?;
            Ok((
                args.worker.resolve(&file)?,
                pool.max_peers,
                (pool.state_dir, pool.state_given),
                pool.metrics_listen,
            ))
        }) {
            Ok(t) => t,
            Err(e) => {
                error!("{}", rotor_protocol::error_chain(&e));
                return ExitCode::from(2);
            }
        };
    let workers = up.workers();
    // A worker the allocator turns away still accepts its share of the
    // clients, and answers each 503: refused here instead.
    if max_peers < usize::from(workers) + PEERS_SPARE {
        error!(
            "{workers} workers need --max-peers {} at least (one allocator connection each, and {PEERS_SPARE} for `rotor status` and restarts); it is {max_peers}",
            usize::from(workers) + PEERS_SPARE
        );
        return ExitCode::from(2);
    }
    let listen = args.worker.listen(&file, 0);
    let socks_listen = args.worker.merge(&file.worker).socks_listen;
    let tls_listen = args.worker.merge(&file.worker).tls_listen;
    // What a worker would refuse, refused here, once, before anything runs.
    let every: Vec<SocketAddr> = listen
        .iter()
        .chain(&socks_listen)
        .chain(&tls_listen)
        .copied()
        .collect();
    if let Err(e) = crate::cli::worker::one_kind_each(&listen, &socks_listen, &tls_listen) {
        error!("{}", rotor_protocol::error_chain(&e));
        return ExitCode::from(2);
    }
    let plain: Vec<SocketAddr> = listen.iter().chain(&socks_listen).copied().collect();
    if let Err(e) = tuning.check_exposure(&plain, &tls_listen) {
        error!("{}", rotor_protocol::error_chain(&e));
        return ExitCode::from(2);
    }
    if every.is_empty() {
        error!("{}", crate::cli::worker::NOTHING_TO_LISTEN_ON);
        return ExitCode::from(2);
    }
    if every.len() > MAX_LISTENERS {
        error!("at most {MAX_LISTENERS} listen addresses");
        return ExitCode::from(2);
    }
    // The allocator's metrics port is no proxy port (bound here first,
    // the allocator failed at every start and rotor up gave up, exit 1).
    // The proxy's listeners are IPv6-only; the metrics socket, bound
    // plainly, is dual-stack: `[::]` takes every address of the port.
    let clash = |m: &SocketAddr| {
        let mi = m.ip().to_canonical();
        every.iter().any(|a| {
            let ai = a.ip();
            a.port() == m.port()
                && (ai == mi
                    || (ai.is_unspecified() && ai.is_ipv4() == mi.is_ipv4())
                    || (mi.is_unspecified() && (m.is_ipv6() || ai.is_ipv4())))
        })
    };
    if let Some(addr) = metrics_listen.filter(clash) {
        error!("{addr} is --metrics-listen and a listen address (or within a wildcard one) on the same port: give the metrics their own port");
        return ExitCode::from(2);
    }
    let socket = args.common.socket(&file);
    if args.common.check || args.common.check_config {
        // (Making nothing: a directory not there yet would be made.)
        if let Err(e) = rotor_allocator::socket_dir_unmade(&socket) {
            error!("{}", rotor_protocol::error_chain(&e));
            return ExitCode::from(2);
        }
        say!("ok: {workers} workers on {listen:?} (HTTP), {socks_listen:?} (SOCKS5), {tls_listen:?} (TLS)");
        return children_check(&args, &socket, child_worker_flags(&args, &file, workers)).await;
    }
    // A socket directory the allocator would refuse (one others can
    // change), or cannot make: refused at every start, after ten seconds
    // of them; said once, here.
    if let Err(e) = rotor_allocator::socket_dir(&socket) {
        error!("{}", rotor_protocol::error_chain(&e));
        return ExitCode::from(2);
    }
    // (Asked without waiting: a listener whose queue is full, one that
    // is stopped, serves it all the same.)
    if rotor_allocator::listened_on(&socket) {
        error!(
            socket = %socket.display(),
            "an allocator already serves this socket: is another rotor up running? Stop it, or give this one its own --socket and --listen"
        );
        return ExitCode::from(2);
    }
    // The state directory another allocator holds: its allocator would
    // exit at every restart; said once, here.
    // So is one given that cannot be used (the default one is run
    // without, with a warning).
    if let Some(dir) = &state_dir {
        match rotor_allocator::persist::probe(dir) {
            Err(e @ rotor_allocator::persist::PersistError::Locked(_)) => {
                error!(
                    "{}: is another rotor up running? Stop it, or give this one its own --state-dir",
                    rotor_protocol::error_chain(&e)
                );
                return ExitCode::from(2);
            }
            Err(e) if state_given => {
                error!(
                    "{}: {}",
                    rotor_protocol::error_chain(&e),
                    rotor_allocator::persist::UNUSABLE_HINT
                );
                return ExitCode::from(2);
            }
            _ => {}
        }
    }
    // The metrics port another process holds: the allocator would exit at
    // every start; said once, here (bound and let go: the allocator binds
    // it, SO_REUSEADDR as here).
    if let Some(addr) = metrics_listen {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                error!("cannot listen for metrics on {addr}: {e}: is another rotor up running? Stop it, or give this one its own --metrics-listen");
                return ExitCode::from(2);
            }
            Err(e) => {
                error!("cannot listen for metrics on {addr}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // One listening socket per address, shared by every worker: a worker
    // that stops leaves queued connections to the others instead of
    // resetting them (as closing one SO_REUSEPORT socket would).
    let mut listeners = Vec::new();
    // What is bound, for the log: a port 0 asked for is the one given.
    let mut bound = Vec::new();
    for addr in &every {
        match rotor_worker::listener::bind_exclusive(*addr) {
            Ok(l) => {
                bound.push(l.local_addr().unwrap_or(*addr));
                listeners.push(std::os::fd::OwnedFd::from(l))
            }
            Err(e) if e.source.kind() == std::io::ErrorKind::AddrInUse => {
                error!(
                    "{}: another process (another rotor up?) listens there",
                    rotor_protocol::error_chain(&e)
                );
                return ExitCode::from(2);
            }
            // (An address not on this host, a port below 1024 without
            // the right: refused before anything starts, as a worker's
            // own bind is, exit 2.)
            Err(e) => {
                error!("{}", rotor_protocol::error_chain(&e));
                return ExitCode::from(2);
            }
        }
    }
    // The children are this same program, as `rotor allocator` and
    // `rotor worker`: one binary is all `rotor up` needs.
    let path = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            error!("cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let me = Program::own(path);
    let snapshot = match text.map(|(_, t)| Snapshot::write(&t)).transpose() {
        Ok(s) => s.map(Arc::new),
        Err(e) => {
            error!("cannot keep a copy of the configuration file for the children: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let (Some(path), Some(snap)) = (args.common.at.config.clone(), snapshot.clone()) {
        tokio::spawn(tell_edits_unread(path, snap, signals.clone()));
    }
    let config = snapshot.as_ref().map(|s| s.path.as_path());
    let alloc_args = child_args(
        "allocator",
        &args,
        &socket,
        config,
        args.allocator.to_args(),
    );
    // The workers take the listening sockets made here, not addresses.
    let mut worker_flags = child_worker_flags(&args, &file, workers);
    worker_flags.listen.clear();
    worker_flags.socks_listen.clear();
    worker_flags.tls_listen.clear();
    let mut worker_args = child_args("worker", &args, &socket, config, worker_flags.to_args());
    for i in 0..listeners.len() {
        let flag = match i {
            i if i < listen.len() => "--listen-fd",
            i if i < listen.len() + socks_listen.len() => "--socks-listen-fd",
            _ => "--tls-listen-fd",
        };
        worker_args.extend([flag.into(), (3 + i).to_string().into()]);
    }
    // Held by every worker slot too: a descriptor number stays this
    // socket's for as long as a slot may pass it on.
    let listeners: Arc<Vec<OwnedFd>> = Arc::new(listeners);
    let outcome = Arc::new(Outcome::default());

    let alloc_stop = CancellationToken::new();
    let alloc = tokio::spawn(supervise(
        Slot {
            name: "allocator".into(),
            program: me.clone(),
            args: alloc_args,
            fds: Arc::default(),
            cpus: None,
            first_backoff: FIRST_BACKOFF,
            steady: STEADY,
            config: snapshot.clone(),
            death_signal: libc::SIGUSR2,
            answers_at: Some(socket.clone()),
        },
        alloc_stop.clone(),
        signals.clone(),
        true,
        KILL_GRACE,
        Streaks::alone(outcome.clone()),
    ));
    let came_up = tokio::select! {
        up = wait_for_socket(&socket, Duration::from_secs(10)) => up,
        // Stopped while starting: no worker is started to be stopped.
        _ = signals.shutdown.cancelled() => {
            alloc_stop.cancel();
            let _ = alloc.await;
            info!("rotor is down");
            return outcome.code(signals.fast.is_cancelled());
        }
    };
    if !came_up {
        error!(socket = %socket.display(), "the allocator did not come up");
        alloc_stop.cancel();
        let _ = alloc.await;
        return ExitCode::FAILURE;
    }

    let pinned = match cpus_allowed() {
        Ok(cpus) => up.worker_cpus(usize::from(workers), &cpus),
        Err(e) => {
            warn!(error = %e, "cannot read the CPUs rotor up may run on; workers are not pinned");
            None
        }
    };
    let slots = TaskTracker::new();
    let worker_streaks = Streaks::shared(usize::from(workers), outcome.clone());
    for i in 1..=workers {
        let cpus = pinned.as_ref().map(|p| p[usize::from(i) - 1].clone());
        if let Some(c) = &cpus {
            info!(worker = i, cpus = ?c, "worker pinned");
        }
        slots.spawn(supervise(
            Slot {
                name: format!("worker {i}"),
                program: me.clone(),
                args: worker_args.clone(),
                fds: listeners.clone(),
                cpus: cpus.map(|c| cpu_set(&c)),
                first_backoff: FIRST_BACKOFF,
                steady: STEADY,
                config: snapshot.clone(),
                death_signal: libc::SIGTERM,
                answers_at: None,
            },
            signals.shutdown.clone(),
            signals.clone(),
            // Not passed on to workers: the allocator's reload reaches
            // them (through the lease table, or its socket), as `rotor
            // reload` does; passed on as well, every worker reloaded
            // twice (its users file, certificate and resolver).
            false,
            tuning.config.drain_timeout + KILL_GRACE,
            worker_streaks.clone(),
        ));
    }
    slots.close();
    // Up once the allocator answers: it binds its socket before its first
    // pool load, which a slow --pool-command or metadata service makes
    // long (READY=1 at its bind had systemd start what depends on rotor
    // while every request got 503). The workers run meanwhile, so a client
    // is told (503) rather than left queued. No limit of its own: under
    // systemd its TimeoutStartSec is the one.
    let answered = tokio::select! {
        () = crate::control::answering(&socket, Duration::from_secs(5)) => true,
        _ = signals.shutdown.cancelled() => false,
    };
    // Ready for systemd (`Type=notify`): the allocator answers, and the
    // listeners, bound here, queue what comes until the workers take it.
    if answered {
        let (http, rest) = bound.split_at(listen.len());
        let (socks, tls) = rest.split_at(socks_listen.len());
        info!(
            workers,
            listen = ?http,
            socks_listen = ?socks,
            tls_listen = ?tls,
            socket = %socket.display(),
            "rotor is up"
        );
        let status = format!("{workers} workers, allocator at {}", socket.display());
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }
    signals.shutdown.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // New clients are refused from now on (and those queued but not yet
    // taken are reset), not left to wait out the drain in a queue no
    // worker reads: the workers stop accepting now.
    for l in listeners.iter() {
        // SAFETY: shutdown on a descriptor this process owns.
        unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RD) };
    }
    // Workers drain first: they still need leases while they do.
    slots.wait().await;
    alloc_stop.cancel();
    let _ = alloc.await;
    info!("rotor is down");
    outcome.code(signals.fast.is_cancelled())
}

/// How the children ended, for `rotor up`'s exit code.
#[derive(Default)]
struct Outcome {
    /// A child failed to start again and again, and rotor up gave up.
    gave_up: std::sync::atomic::AtomicBool,
    /// A child did not stop cleanly (its drain cut, or killed).
    unclean: std::sync::atomic::AtomicBool,
}

impl Outcome {
    /// 1 when rotor up gave up on a child, 130 on a fast stop, 3 when a
    /// child's drain was cut (as a worker's own exit says), else 0.
    fn code(&self, fast: bool) -> ExitCode {
        use std::sync::atomic::Ordering::Relaxed;
        if self.gave_up.load(Relaxed) {
            ExitCode::FAILURE
        } else if fast {
            ExitCode::from(130)
        } else if self.unclean.load(Relaxed) {
            ExitCode::from(3)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// Starts in a row that failed quickly: past [`GIVE_UP_AFTER`] of them for
/// the allocator, or for every worker at once, rotor up stops (exit 1)
/// rather than restart for ever, so the service manager or the operator
/// sees it.
#[derive(Clone)]
struct Streaks {
    /// Slots failing now, of `of`.
    failing: Arc<std::sync::atomic::AtomicUsize>,
    of: usize,
    outcome: Arc<Outcome>,
}

/// Quick failures in a row after which a slot counts as failing.
const GIVE_UP_AFTER: u32 = 10;

/// A run this long is no quick failure (the backoff starts over).
const STEADY: Duration = Duration::from_secs(10);

impl Streaks {
    fn alone(outcome: Arc<Outcome>) -> Streaks {
        Streaks::shared(1, outcome)
    }

    fn shared(of: usize, outcome: Arc<Outcome>) -> Streaks {
        Streaks {
            failing: Arc::default(),
            of,
            outcome,
        }
    }

    /// A slot's streak reached the limit; whether every slot's has (time
    /// to give up).
    fn failing(&self) -> bool {
        let n = self
            .failing
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        n >= self.of
    }

    /// A failing slot's child ran steadily again.
    fn recovered(&self) {
        self.failing
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn wait_for_socket(path: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// How a child ended, for the log: `exit 3`, `signal 9 (SIGKILL)`.
fn how(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => match Signal::try_from(sig) {
                Ok(named) => format!("signal {sig} ({named})"),
                Err(_) => format!("signal {sig}"),
            },
            (None, None) => format!("{s}"),
        },
        Err(e) => format!("unknown ({e})"),
    }
}

/// What a slot runs, and the name it shows.
#[derive(Clone)]
struct Program {
    exec: PathBuf,
    /// Its argv\[0\] (the path `rotor up` was started from).
    shown: PathBuf,
}

impl Program {
    /// `rotor up`'s own image, by `/proc/self/exe` (the children run the
    /// binary this `rotor up` runs, even once an upgrade replaced the file
    /// at `path`: a restarted child of the new version beside old ones
    /// could be refused by the old allocator, or refuse a flag, and
    /// `rotor up` would give up on it at a random time after the upgrade
    /// rather than at the operator's restart), shown as `path`. Without
    /// `/proc`, `path`.
    fn own(path: PathBuf) -> Program {
        let proc = PathBuf::from("/proc/self/exe");
        let exec = match proc.exists() {
            true => proc,
            false => path.clone(),
        };
        Program { exec, shown: path }
    }

    #[cfg(test)]
    fn at(path: &str) -> Program {
        Program {
            exec: path.into(),
            shown: path.into(),
        }
    }
}

struct Slot {
    name: String,
    program: Program,
    args: Vec<OsString>,
    /// Descriptors the child gets as 3, 4, … (`--listen-fd`).
    fds: Arc<Vec<OwnedFd>>,
    /// The CPUs the child runs on (`--pin-workers`); it and its threads
    /// inherit them.
    cpus: Option<CpuSet>,
    /// The wait before a failed child's first restart (it doubles with
    /// each quick failure, up to [`BACKOFF_MAX`]).
    first_backoff: Duration,
    /// A run this long is no quick failure ([`STEADY`]).
    steady: Duration,
    /// The configuration file's copy the child reads, if any.
    config: Option<Arc<Snapshot>>,
    /// What the child gets if `rotor up` dies (killed outright): SIGTERM
    /// for a worker (it drains), SIGUSR2 for the allocator (it serves the
    /// workers' drain, then stops).
    death_signal: libc::c_int,
    /// The socket the child answers on once its handlers are in place
    /// (the allocator's): a SIGHUP that came while no child ran is passed
    /// on then.
    answers_at: Option<PathBuf>,
}

/// The CPUs this process may run on, ascending.
fn cpus_allowed() -> nix::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

fn cpu_set(cpus: &[usize]) -> CpuSet {
    let mut set = CpuSet::new();
    for &c in cpus {
        // Below CpuSet::count(): read from one.
        let _ = set.set(c);
    }
    set
}

impl Slot {
    fn spawn(&self) -> std::io::Result<Child> {
        if let Some(c) = &self.config {
            c.ensure()?;
        }
        let mut cmd = Command::new(&self.program.exec);
        cmd.arg0(&self.program.shown);
        // `rotor up` is the service systemd knows: a child's READY=1 or
        // STATUS= is not its to send (refused, and logged, under systemd's
        // NotifyAccess=main; under =all, the allocator's READY=1 before a
        // worker runs).
        cmd.env_remove("NOTIFY_SOCKET");
        cmd.env(crate::LOG_NAME, &self.name);
        cmd.args(&self.args).kill_on_drop(true);
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let cpus = self.cpus;
        let death_signal = self.death_signal;
        let parent = std::process::id() as libc::pid_t;
        // Its own process group: a terminal's Ctrl-C reaches rotor up
        // alone, which stops the children in order (workers, then the
        // allocator).
        cmd.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, getppid, signal,
        // sched_setaffinity, fcntl, dup2) on memory it reads but does not
        // allocate or free.
        unsafe {
            cmd.pre_exec(move || {
                // PDEATHSIG: the child stops if `rotor up` is killed outright,
                // so no orphan keeps the port.
                if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // `rotor up` killed between the fork and the prctl: no
                // signal will come, so the child goes now (seen once: a
                // worker of an `up` killed right after its start lived on,
                // retrying the allocator that had gone with it). No
                // allocation here: an error from a raw code.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                // A SIGHUP before the child's handler is in place (it
                // loads its files first) would kill it, the default
                // action: ignored until then (the handler replaces this;
                // the child reads its files as it starts anyway).
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                if let Some(set) = &cpus {
                    sched_setaffinity(Pid::from_raw(0), set)?;
                }
                // Move the listeners out of the way of 3.. first, then onto
                // 3.. (dup2 clears close-on-exec on the copies).
                let mut high = [0 as RawFd; MAX_LISTENERS];
                for (i, fd) in fds.iter().enumerate() {
                    // Above 3 + MAX_LISTENERS, not a fixed 1024: with a
                    // soft descriptor limit of 1024 (a login shell's) that
                    // is EINVAL, and no worker would ever start.
                    high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + MAX_LISTENERS as RawFd);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, fd) in high.iter().take(fds.len()).enumerate() {
                    if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

/// How long a child's exit waits for `rotor up`'s own stop before it counts
/// as a crash.
const STOP_GRACE: Duration = Duration::from_millis(200);

/// The wait before a failed child is started again, at first.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait before a failed child is started again.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Runs one child until `stop`, restarting it when it dies (waiting
/// longer after each quick failure, and giving up as `streaks` says).
/// `forward_hup` passes SIGHUP on (the allocator reloads on it).
async fn supervise(
    slot: Slot,
    stop: CancellationToken,
    signals: Signals,
    forward_hup: bool,
    patience: Duration,
    streaks: Streaks,
) {
    let mut restarts = Restarts::new(slot.first_backoff);
    let mut reloads = signals.reloads();
    // A SIGHUP not passed on yet: it came while no child ran, or before
    // the one running answered on its socket (see below).
    let mut held = false;
    // Whether a SIGHUP was passed on to the running child: one it died
    // after may never have been acted on (see below).
    let mut hup_passed = false;
    // The pause before the allocator is started again while the workers
    // drain: doubled while it fails at once (a port another process took
    // since), not a start every 100 ms for the whole drain.
    let mut drain_pause = DRAIN_RESTART_FIRST;
    loop {
        // Never a child started after the stop (its descriptors may be
        // shut down).
        if stop.is_cancelled() {
            return;
        }
        let mut child = match slot.spawn() {
            Ok(c) => c,
            Err(e) => {
                error!(child = %slot.name, program = %slot.program.shown.display(), error = %e, "cannot start");
                // A start that cannot even be made counts as a failed one.
                if restarts.failed(&slot.name, &streaks, &signals) || !restarts.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        info!(child = %slot.name, pid = pid.map_or(0, Pid::as_raw), "started");
        // A SIGHUP that came while no child ran, or while this one starts,
        // is held until it answers on its socket (its handlers are in
        // place then; before them the SIGHUP it ignores is lost), then
        // passed on, through crash loops too: the allocator reads its
        // sources as it starts, but the workers re-read their users files
        // and certificates only when it tells them of a reload (a user
        // removed, then SIGHUP during an allocator's restart, kept
        // access). A child with no socket to answer on (`answers_at`) is
        // passed SIGHUPs as they come.
        held |= forward_hup && reloads.has_changed().unwrap_or(false);
        reloads.borrow_and_update();
        let mut answered = slot.answers_at.is_none();
        let answers = async {
            match &slot.answers_at {
                Some(path) => wait_for_socket(path, Duration::from_secs(60)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(answers);
        // A child that runs steadily ends this slot's streak there and
        // then, not when (weeks later) it exits.
        let steady = tokio::time::sleep(slot.steady);
        tokio::pin!(steady);
        let mut ran_steadily = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break Some(s),
                _ = stop.cancelled() => break None,
                () = &mut steady, if !ran_steadily => {
                    ran_steadily = true;
                    restarts.steady(&streaks);
                }
                Ok(()) = reloads.changed(), if forward_hup => match (pid, answered) {
                    (Some(pid), true) => {
                        let _ = kill(pid, Signal::SIGHUP);
                        hup_passed = true;
                    }
                    _ => held = true,
                },
                up = &mut answers, if !answered => {
                    // (Not answering within the wait: SIGHUPs go as they
                    // come from now on, the held one with the next.)
                    answered = true;
                    if let (Some(pid), true, true) = (pid, up, held) {
                        info!(child = %slot.name, "a SIGHUP came while it was down or starting: passed on now it answers");
                        let _ = kill(pid, Signal::SIGHUP);
                        hup_passed = true;
                        held = false;
                    }
                }
            }
        };
        // A SIGHUP passed on to a child that died since may never have
        // been acted on: it came as the child was dying, or the child
        // died in the reload (an allocator re-reads its sources before
        // it tells the workers, a pool command may take its whole
        // timeout), and whether it was cannot be told from here. Passed
        // on again to the next (one reload too many is harmless; one
        // lost left a removed user served).
        if status.is_some() && std::mem::take(&mut hup_passed) {
            held = true;
        }
        match status {
            Some(s) => {
                // A signal sent to the whole control group (systemd's
                // stop) reaches the child as it reaches `rotor up`: that
                // child stopped, it did not crash.
                let stopping = tokio::time::timeout(STOP_GRACE, stop.cancelled()).await;
                if stopping.is_ok() {
                    info!(child = %slot.name, status = %how(&s), "stopped");
                    // Its own exit says how it stopped (a worker's cut
                    // drain: 3), as when rotor up stops it.
                    if !stopped_cleanly(&s) {
                        streaks
                            .outcome
                            .unclean
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return;
                }
                if signals.shutdown.is_cancelled() {
                    // The allocator stopped by a signal to the whole group
                    // while the workers drain: started again for them
                    // (after a pause that grows while it fails at once),
                    // and stopped after them.
                    if ran_steadily {
                        drain_pause = DRAIN_RESTART_FIRST;
                    }
                    match s.as_ref().is_ok_and(|s| s.success()) {
                        true => {
                            info!(child = %slot.name, retry_in = ?drain_pause, "stopped while rotor up stops; started again until the workers are done")
                        }
                        false => {
                            warn!(child = %slot.name, status = %how(&s), retry_in = ?drain_pause, "exited while rotor up stops; started again until the workers are done")
                        }
                    }
                    if !pause(&stop, drain_pause).await {
                        return;
                    }
                    drain_pause = (drain_pause * 2).min(DRAIN_RESTART_MOST);
                    continue;
                }
                let clean = s.as_ref().is_ok_and(|s| s.success());
                // Stopped cleanly by a signal from outside (an operator's
                // SIGTERM to one child): no failed start, restarted after
                // the first pause. Counted as one, it doubled the pause
                // at each such stop, and the tenth in a row stopped
                // rotor up, "failed 10 starts".
                if clean {
                    restarts.steady(&streaks);
                } else if restarts.failed(&slot.name, &streaks, &signals) {
                    return;
                }
                match clean {
                    true => {
                        info!(child = %slot.name, retry_in = ?restarts.backoff, "stopped cleanly, not by rotor up; restarting")
                    }
                    false => {
                        warn!(child = %slot.name, status = %how(&s), retry_in = ?restarts.backoff, "exited unexpectedly; restarting")
                    }
                }
                if !restarts.wait(&stop).await {
                    return;
                }
            }
            None => {
                if !stop_child(&slot.name, &mut child, pid, &signals, patience).await {
                    streaks
                        .outcome
                        .unclean
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// A slot's restarts: the wait before the next, and the quick failures in
/// a row (and whether they made it a failing slot).
struct Restarts {
    first: Duration,
    backoff: Duration,
    quick: u32,
    failing: bool,
}

impl Restarts {
    fn new(first: Duration) -> Restarts {
        Restarts {
            first,
            backoff: first,
            quick: 0,
            failing: false,
        }
    }

    /// A start failed: whether rotor up gives up (see [`give_up`]).
    fn failed(&mut self, name: &str, streaks: &Streaks, signals: &Signals) -> bool {
        self.quick += 1;
        give_up(name, self.quick, &mut self.failing, streaks, signals)
    }

    /// The child ran steadily: the streak and the backoff start over.
    fn steady(&mut self, streaks: &Streaks) {
        self.backoff = self.first;
        self.quick = 0;
        if std::mem::take(&mut self.failing) {
            streaks.recovered();
        }
    }

    /// Waits the backoff, doubled for the next time; false if `stop` came
    /// first.
    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let waited = pause(stop, self.backoff).await;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        waited
    }
}

/// Waits `d`; false if `stop` came first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// After `quick` failed starts in a row: whether rotor up gives up (this
/// slot's streak made every one of its kind a failing one), and then
/// stops it all, saying so.
fn give_up(
    name: &str,
    quick: u32,
    failing: &mut bool,
    streaks: &Streaks,
    signals: &Signals,
) -> bool {
    if quick < GIVE_UP_AFTER || *failing {
        return false;
    }
    *failing = true;
    if !streaks.failing() {
        return false;
    }
    error!(child = %name, starts = quick, "failed {quick} starts in a row (and so did every other of its kind): rotor up stops; see the child's errors above");
    streaks
        .outcome
        .gave_up
        .store(true, std::sync::atomic::Ordering::Relaxed);
    signals.shutdown.cancel();
    true
}

/// SIGTERM (SIGINT on a fast stop), then SIGKILL if the child is still
/// there `patience` later. Whether it stopped cleanly (exit 0).
/// Whether a child told to stop stopped cleanly: exit 0, or ended by
/// the SIGTERM itself, which only a child whose handler was not in place
/// yet dies of (it was starting: it held nothing to drain; a stop right
/// after a start or a restart was counted a cut drain, exit 3).
fn stopped_cleanly(s: &std::io::Result<std::process::ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.as_ref()
        .is_ok_and(|s| s.success() || s.signal() == Some(libc::SIGTERM))
}

async fn stop_child(
    name: &str,
    child: &mut Child,
    pid: Option<Pid>,
    signals: &Signals,
    patience: Duration,
) -> bool {
    let fast = signals.fast.is_cancelled();
    if let Some(pid) = pid {
        let _ = kill(
            pid,
            if fast {
                Signal::SIGINT
            } else {
                Signal::SIGTERM
            },
        );
    }
    let deadline = tokio::time::sleep(patience);
    tokio::pin!(deadline);
    let mut hurried = fast;
    loop {
        tokio::select! {
            s = child.wait() => {
                info!(child = %name, status = %how(&s), "stopped");
                return stopped_cleanly(&s);
            }
            // SIGINT arrived while draining: hurry the child too.
            _ = signals.fast.cancelled(), if !hurried => {
                hurried = true;
                if let Some(pid) = pid {
                    let _ = kill(pid, Signal::SIGINT);
                }
            }
            _ = &mut deadline => {
                warn!(child = %name, "did not stop in time; killing it");
                let _ = child.start_kill();
                let _ = child.wait().await;
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's end reads as an operator says it, not as Rust's debug
    /// form (`Some(ExitStatus(unix_wait_status(768)))`).
    #[test]
    fn a_childs_end_is_said_plainly() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        assert_eq!(how(&Ok(ExitStatus::from_raw(3 << 8))), "exit 3");
        assert_eq!(how(&Ok(ExitStatus::from_raw(0))), "exit 0");
        assert_eq!(how(&Ok(ExitStatus::from_raw(9))), "signal 9 (SIGKILL)");
        let gone = std::io::Error::from_raw_os_error(libc::ECHILD);
        assert!(how(&Err(gone)).starts_with("unknown ("));
    }

    fn slot(name: &str, program: &str) -> Slot {
        Slot {
            name: name.into(),
            program: Program::at(program),
            args: vec![],
            fds: Arc::default(),
            cpus: None,
            first_backoff: Duration::from_millis(1),
            steady: Duration::from_millis(300),
            config: None,
            death_signal: libc::SIGTERM,
            answers_at: None,
        }
    }

    fn signals() -> Signals {
        Signals {
            shutdown: CancellationToken::new(),
            fast: CancellationToken::new(),
            reload: Arc::new(tokio::sync::watch::channel(0).0),
            orphaned: CancellationToken::new(),
        }
    }

    /// The children's copy of the configuration file, removed under a
    /// running `rotor up` (a cleaning of /tmp), is written again before
    /// the next child's start, as it was; and removed when `rotor up` ends.
    #[tokio::test]
    async fn the_configuration_copy_is_written_again_if_gone() {
        let text = "# rotor up's copy\nworkers = 2\n";
        let snap = Arc::new(Snapshot::write(text).unwrap());
        let path = snap.path.clone();
        std::fs::remove_file(&path).unwrap();
        let mut one = slot("worker 1", "/bin/true");
        one.config = Some(snap.clone());
        one.spawn().unwrap().wait().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Another file put in its place (another user's, after /tmp's
        // cleaning): not handed on; ours written again. A FIFO does not
        // hold the start up.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "pool-command = \"evil\"\n").unwrap();
        one.spawn().unwrap().wait().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = tokio::time::timeout(Duration::from_secs(5), async {
            one.spawn().unwrap().wait().await.unwrap()
        });
        started.await.expect("not held by a FIFO");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        drop(one);
        drop(snap);
        assert!(!path.exists());
    }

    /// A child that fails every start is given up on after
    /// `GIVE_UP_AFTER` starts in a row, for the last of its kind: rotor up
    /// stops, exit 1. While another of its kind runs, it is retried.
    #[tokio::test]
    async fn a_child_failing_every_start_is_given_up_when_none_of_its_kind_runs() {
        let s = signals();
        let outcome = Arc::new(Outcome::default());
        let streaks = Streaks::shared(2, outcome.clone());
        let stop = s.shutdown.clone();
        let failing = tokio::spawn(supervise(
            slot("worker 1", "/bin/false"),
            stop.clone(),
            s.clone(),
            false,
            Duration::from_secs(1),
            streaks.clone(),
        ));
        // Ten quick failures (each a start, the stop grace and a backoff
        // doubling from 1 ms) take some 2.5 s; waited for, not slept on.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while streaks.failing.load(std::sync::atomic::Ordering::Relaxed) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "never counted as failing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!failing.is_finished(), "given up while another runs");
        assert!(!s.shutdown.is_cancelled());
        // The other fails too: rotor up stops.
        let other = tokio::spawn(supervise(
            slot("worker 2", "/bin/false"),
            stop.clone(),
            s.clone(),
            false,
            Duration::from_secs(1),
            streaks.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(20), other)
            .await
            .expect("given up")
            .unwrap();
        assert!(s.shutdown.is_cancelled());
        tokio::time::timeout(Duration::from_secs(5), failing)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome.code(false), ExitCode::FAILURE);
    }

    /// A slot that failed its streak and then runs steadily is no longer
    /// failing: another slot's streak later does not stop rotor up.
    #[tokio::test]
    async fn a_slot_that_recovers_no_longer_counts_as_failing() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ok");
        let s = signals();
        let outcome = Arc::new(Outcome::default());
        let streaks = Streaks::shared(2, outcome.clone());
        let mut sl = slot("worker 1", "/bin/sh");
        sl.args = vec![
            "-c".into(),
            format!("test -e {} && exec sleep 30; exit 1", flag.display()).into(),
        ];
        let one = tokio::spawn(supervise(
            sl,
            s.shutdown.clone(),
            s.clone(),
            false,
            Duration::from_secs(1),
            streaks.clone(),
        ));
        let failing = || streaks.failing.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), async {
            while failing() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a streak");
        // It recovers, and says so while it runs.
        std::fs::write(&flag, "").unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while failing() != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("recovered");
        // The other slot's streak alone does not give up.
        let two = tokio::spawn(supervise(
            slot("worker 2", "/bin/false"),
            s.shutdown.clone(),
            s.clone(),
            false,
            Duration::from_secs(1),
            streaks.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!s.shutdown.is_cancelled());
        s.shutdown.cancel();
        one.await.unwrap();
        two.await.unwrap();
    }

    /// A program that cannot even be started counts the same.
    #[tokio::test]
    async fn a_child_that_cannot_start_is_given_up_too() {
        let s = signals();
        let outcome = Arc::new(Outcome::default());
        let run = tokio::spawn(supervise(
            slot("allocator", "/nonexistent/rotor"),
            s.shutdown.clone(),
            s.clone(),
            false,
            Duration::from_secs(1),
            Streaks::alone(outcome.clone()),
        ));
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("given up")
            .unwrap();
        assert!(s.shutdown.is_cancelled());
        assert_eq!(outcome.code(false), ExitCode::FAILURE);
    }

    /// A SIGHUP that came while the allocator was down (between a crash
    /// and its restart) or starting reaches the one that runs once it
    /// answers on its socket; it had been dropped (or sent to a child that
    /// still ignored it), and the workers never reloaded.
    #[tokio::test]
    async fn a_sighup_while_the_child_is_down_reaches_the_next_once_it_answers() {
        if std::process::Command::new("python3")
            .arg("-V")
            .output()
            .is_err()
        {
            assert!(std::env::var_os("CI").is_none(), "python3 is missing");
            eprintln!("SKIPPED: needs python3");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (ran, hups) = (dir.path().join("ran"), dir.path().join("hups"));
        let trapped = dir.path().join("trapped");
        let socket = dir.path().join("a.sock");
        // The first run fails at once; the next counts its SIGHUPs (its
        // socket answers once its handler is in place, as the
        // allocator's does). (Python: a shell cannot trap the SIGHUP its
        // start ignores, as a child's does until its handler is set.)
        let script = "import os, signal, sys, time\n\
            ran, hups, trapped = sys.argv[1:4]\n\
            if not os.path.exists(ran):\n    open(ran, 'w').close()\n    sys.exit(1)\n\
            signal.signal(signal.SIGHUP, lambda *a: open(hups, 'a').write('hup\\n'))\n\
            open(trapped, 'w').close()\n\
            while True:\n    time.sleep(0.05)\n";
        let s = signals();
        let mut sl = slot("allocator", "python3");
        sl.args = vec!["-c".into(), script.into()];
        sl.args
            .extend([&ran, &hups, &trapped].map(|p| p.as_os_str().to_owned()));
        sl.first_backoff = Duration::from_millis(500);
        sl.answers_at = Some(socket.clone());
        let outcome = Arc::new(Outcome::default());
        let run = tokio::spawn(supervise(
            sl,
            s.shutdown.clone(),
            s.clone(),
            true,
            Duration::from_millis(300),
            Streaks::alone(outcome),
        ));
        while !ran.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While no child answers (the first failed, the next starts).
        s.reload_now();
        while !trapped.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _answering = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&hups).is_ok_and(|t| t == "hup\n") {
            assert!(
                Instant::now() < deadline,
                "the SIGHUP was not passed on: {:?} {:?}",
                std::fs::read_to_string(&hups),
                std::fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.shutdown.cancel();
        run.await.unwrap();
    }

    /// A stop that the child ends cleanly is exit 0 (also one it dies of,
    /// its handler not in place yet: a start); one it does not (its drain
    /// cut: exit 3, or killed), 3; a fast stop, 130.
    #[tokio::test]
    async fn the_exit_code_says_how_the_children_stopped() {
        for (program, args, want) in [
            (
                "/bin/sh",
                &["-c", "trap '' TERM; sleep 30"][..],
                ExitCode::from(3),
            ),
            ("/bin/sleep", &["30"], ExitCode::SUCCESS),
            ("/bin/true", &[], ExitCode::SUCCESS),
        ] {
            let s = signals();
            let outcome = Arc::new(Outcome::default());
            let mut sl = slot("worker", program);
            sl.args = args.iter().map(Into::into).collect();
            let run = tokio::spawn(supervise(
                sl,
                s.shutdown.clone(),
                s.clone(),
                false,
                Duration::from_millis(300),
                Streaks::alone(outcome.clone()),
            ));
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.shutdown.cancel();
            run.await.unwrap();
            assert_eq!(outcome.code(false), want, "{program} {args:?}");
        }
        let outcome = Outcome::default();
        outcome
            .unclean
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(outcome.code(true), ExitCode::from(130));
    }
}
