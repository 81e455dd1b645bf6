//! `rotor up`: one allocator and N workers as child processes on one port,
//! supervised: a child that dies is restarted, SIGTERM/SIGINT/SIGHUP are
//! passed on, and every child is stopped before `rotor up` exits.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cli::{PoolArgs, SocketArg, WorkerTuning, DEFAULT_LISTEN};
use crate::signals::Signals;

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Worker processes sharing the listening port.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// Address the workers accept proxy clients on; repeatable.
    #[arg(long = "listen", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: Vec<SocketAddr>,
    #[command(flatten)]
    pub socket: SocketArg,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub tuning: WorkerTuning,
}

/// How long children get to stop after the drain timeout before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

pub async fn run(args: UpArgs, signals: Signals) -> ExitCode {
    if let Err(e) = args.pool.sources() {
        error!("invalid --pool: {e}");
        return ExitCode::from(2);
    }
    let dir = match std::env::current_exe() {
        Ok(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        Err(e) => {
            error!("cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = args.socket.path();
    let mut alloc_args: Vec<OsString> = vec!["--socket".into(), socket.clone().into()];
    alloc_args.extend(args.pool.to_args());
    let mut worker_args: Vec<OsString> = vec!["--socket".into(), socket.clone().into()];
    for l in &args.listen {
        worker_args.extend(["--listen".into(), l.to_string().into()]);
    }
    worker_args.extend(args.tuning.to_args());

    let alloc_stop = CancellationToken::new();
    let alloc = tokio::spawn(supervise(
        Slot {
            name: "allocator".into(),
            program: dir.join("rotor-allocator"),
            args: alloc_args,
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

    let workers = TaskTracker::new();
    for i in 1..=args.workers {
        workers.spawn(supervise(
            Slot {
                name: format!("worker {i}"),
                program: dir.join("rotor-worker"),
                args: worker_args.clone(),
            },
            signals.shutdown.clone(),
            signals.clone(),
            false,
            args.tuning.drain_timeout + KILL_GRACE,
        ));
    }
    workers.close();
    info!(
        workers = args.workers,
        listen = ?args.listen,
        socket = %socket.display(),
        "rotor is up"
    );
    signals.shutdown.cancelled().await;
    // Workers drain first: they still need leases while they do.
    workers.wait().await;
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
}

impl Slot {
    fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe, and this closure touches no
        // memory shared with the parent. PDEATHSIG makes the child stop if
        // `rotor up` is killed outright, so no orphan keeps the port.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

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
        let status = loop {
            tokio::select! {
                s = child.wait() => break Some(s),
                _ = stop.cancelled() => break None,
                _ = signals.reload.notified(), if forward_hup => {
                    if let Some(pid) = pid {
                        let _ = kill(pid, Signal::SIGHUP);
                    }
                }
            }
        };
        match status {
            Some(s) => {
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
