//! `rotor up`: one allocator and N workers as child processes on one port,
//! supervised: a child that dies is restarted, SIGTERM/SIGINT/SIGHUP are
//! passed on, and every child is stopped before `rotor up` exits.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
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

/// How long children get to stop after the drain timeout before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

pub async fn run(args: UpArgs, signals: Signals) -> ExitCode {
    let file = match FileConfig::load(args.common.at.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            error!("{}", rotor_protocol::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    // Validate here, so a mistake is reported once, not by every child.
    let up = args.up.merge(&file.up);
    let tuning = match up
        .check()
        .and_then(|()| args.allocator.pool(&file))
        .and_then(|_| args.allocator.access(&file))
        .and_then(|_| args.worker.resolve(&file))
    {
        Ok(t) => t,
        Err(e) => {
            error!("{}", rotor_protocol::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let workers = up.workers();
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
    if let Err(e) = tuning.check_exposure(&every) {
        error!("{}", rotor_protocol::error_chain(&e));
        return ExitCode::from(2);
    }
    if every.len() > MAX_LISTENERS {
        error!("at most {MAX_LISTENERS} listen addresses");
        return ExitCode::from(2);
    }
    if args.common.check {
        eprintln!("ok: {workers} workers on {listen:?}");
        return ExitCode::SUCCESS;
    }
    let socket = args.common.socket(&file);
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        error!(
            socket = %socket.display(),
            "an allocator already serves this socket: is another rotor up running? Stop it, or give this one its own --socket and --listen"
        );
        return ExitCode::from(2);
    }
    // One listening socket per address, shared by every worker: a worker
    // that stops leaves queued connections to the others instead of
    // resetting them (as closing one SO_REUSEPORT socket would).
    let mut listeners = Vec::new();
    for addr in &every {
        match rotor_worker::listener::bind_exclusive(*addr) {
            Ok(l) => listeners.push(std::os::fd::OwnedFd::from(l)),
            Err(e) if e.source.kind() == std::io::ErrorKind::AddrInUse => {
                error!(
                    "{}: another process (another rotor up?) listens there",
                    rotor_protocol::error_chain(&e)
                );
                return ExitCode::from(2);
            }
            Err(e) => {
                error!("{}", rotor_protocol::error_chain(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    // The children are this same program, as `rotor allocator` and
    // `rotor worker`: one binary is all `rotor up` needs.
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            error!("cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut alloc_args: Vec<OsString> = vec!["allocator".into()];
    alloc_args.extend(args.common.to_args(&socket));
    alloc_args.extend(args.allocator.to_args());
    let mut worker_args: Vec<OsString> = vec!["worker".into()];
    worker_args.extend(args.common.to_args(&socket));
    for i in 0..listeners.len() {
        let flag = match i {
            i if i < listen.len() => "--listen-fd",
            i if i < listen.len() + socks_listen.len() => "--socks-listen-fd",
            _ => "--tls-listen-fd",
        };
        worker_args.extend([flag.into(), (3 + i).to_string().into()]);
    }
    // The workers take the listening sockets made here, not addresses.
    let mut worker_flags = args.worker.clone();
    worker_flags.listen.clear();
    worker_flags.socks_listen.clear();
    worker_flags.tls_listen.clear();
    // Single-threaded workers, one per CPU by default: measured faster than
    // fewer workers with a thread per CPU each (the README's figures).
    if worker_flags.threads.is_none() && file.worker.threads.is_none() {
        worker_flags.threads = Some(1);
    }
    worker_args.extend(worker_flags.to_args());
    let listener_fds: Arc<Vec<RawFd>> = Arc::new(listeners.iter().map(|l| l.as_raw_fd()).collect());

    let alloc_stop = CancellationToken::new();
    let alloc = tokio::spawn(supervise(
        Slot {
            name: "allocator".into(),
            program: me.clone(),
            args: alloc_args,
            fds: Arc::default(),
            cpus: None,
        },
        alloc_stop.clone(),
        signals.clone(),
        true,
        KILL_GRACE,
    ));
    if !wait_for_socket(&socket, Duration::from_secs(10)).await {
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
                fds: listener_fds.clone(),
                cpus: cpus.map(|c| cpu_set(&c)),
            },
            signals.shutdown.clone(),
            signals.clone(),
            // Workers re-read their users file on SIGHUP.
            true,
            tuning.config.drain_timeout + KILL_GRACE,
        ));
    }
    slots.close();
    info!(
        workers,
        ?listen,
        socket = %socket.display(),
        "rotor is up"
    );
    signals.shutdown.cancelled().await;
    // Workers drain first: they still need leases while they do.
    slots.wait().await;
    drop(listeners);
    alloc_stop.cancel();
    let _ = alloc.await;
    info!("rotor is down");
    if signals.fast.is_cancelled() {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
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

struct Slot {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    /// Descriptors the child gets as 3, 4, … (`--listen-fd`).
    fds: Arc<Vec<RawFd>>,
    /// The CPUs the child runs on (`--pin-workers`); it and its threads
    /// inherit them.
    cpus: Option<CpuSet>,
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
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).kill_on_drop(true);
        let fds = self.fds.clone();
        let cpus = self.cpus;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (prctl, getppid, sched_setaffinity,
        // fcntl, dup2) on memory it reads but does not allocate or free.
        unsafe {
            cmd.pre_exec(move || {
                // PDEATHSIG: the child stops if `rotor up` is killed outright,
                // so no orphan keeps the port.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
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

/// Runs one child until `stop`, restarting it when it dies. `forward_hup`
/// passes SIGHUP on (the allocator reloads on it).
async fn supervise(
    slot: Slot,
    stop: CancellationToken,
    signals: Signals,
    forward_hup: bool,
    patience: Duration,
) {
    let mut backoff = Duration::from_millis(100);
    let mut reloads = signals.reloads();
    loop {
        let started = Instant::now();
        let mut child = match slot.spawn() {
            Ok(c) => c,
            Err(e) => {
                error!(child = %slot.name, program = %slot.program.display(), error = %e, "cannot start");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let pid = child.id().map(|p| Pid::from_raw(p as i32));
        info!(child = %slot.name, pid = ?pid, "started");
        // A SIGHUP seen while no child ran is not passed to the new one:
        // it reads its files as it starts, and a SIGHUP before its
        // handlers are in place would kill it (the default action).
        reloads.borrow_and_update();
        let status = loop {
            tokio::select! {
                s = child.wait() => break Some(s),
                _ = stop.cancelled() => break None,
                Ok(()) = reloads.changed(), if forward_hup => {
                    if let Some(pid) = pid {
                        let _ = kill(pid, Signal::SIGHUP);
                    }
                }
            }
        };
        match status {
            Some(s) => {
                // A signal sent to the whole process group (Ctrl-C in a
                // terminal) or control group reaches the child as it reaches
                // `rotor up`: that child stopped, it did not crash.
                let stopping = tokio::time::timeout(STOP_GRACE, stop.cancelled()).await;
                if stopping.is_ok() {
                    info!(child = %slot.name, status = ?s.ok(), "stopped");
                    return;
                }
                warn!(child = %slot.name, status = ?s.ok(), "exited unexpectedly; restarting");
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            None => {
                stop_child(&slot.name, &mut child, pid, &signals, patience).await;
                return;
            }
        }
    }
}

/// SIGTERM (SIGINT on a fast stop), then SIGKILL if the child is still
/// there `patience` later.
async fn stop_child(
    name: &str,
    child: &mut Child,
    pid: Option<Pid>,
    signals: &Signals,
    patience: Duration,
) {
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
                info!(child = %name, status = ?s.ok(), "stopped");
                return;
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
                return;
            }
        }
    }
}
