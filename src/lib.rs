//! What the three rotor binaries share: command-line flags, default paths,
//! logging and signal handling, the control client, and `rotor up`'s
//! supervisor. The binaries themselves only parse flags and call in here.

/// `eprintln!` that does not panic when standard error is a closed pipe
/// (`rotor-worker --check 2>&1 | head -1` exited 101, not the check's
/// code): what cannot be written is dropped.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// This build: the package's version, with the commit it was built from
/// when built in a git checkout (`0.1.0+0c0d455a1`; see src/build.rs).
pub const VERSION: &str = env!("ROTOR_VERSION");

/// `n` things, singular or plural as `n` says: `1 entry`, `2 entries`.
pub fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

pub mod activation;
pub mod allocator_main;
pub mod cli;
pub mod control;
pub mod paths;
pub mod signals;
pub mod up;
pub mod worker_main;

/// Descriptors a worker or the allocator keeps for itself beside its
/// connections or peers, as it fits its cap to the descriptor limit: its
/// listeners (the allocator's metrics listener's 64 places), the other
/// daemon's socket, logs, files read, DNS sockets, pool commands and
/// metadata requests.
pub const FD_RESERVE: u64 = 128;

/// Raises the soft descriptor limit to the hard one, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do (the default soft limit of
/// 1024 would refuse clients long before a worker's `max_connections`, or
/// peers before the allocator's `max_peers`); each fits itself to the
/// result. The limit, or `None` if it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the descriptor limit");
            return None;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the descriptor limit"),
        }
    }
    if limit > soft {
        tracing::debug!(from = soft, to = limit, "descriptor limit raised");
    }
    Some(limit)
}

/// Forgets `ROTOR_SOCKET` and `ROTOR_CONFIG` set empty (`ROTOR_SOCKET=`
/// left in a shell), as `XDG_RUNTIME_DIR` empty is: clap took an empty
/// one for a `--socket` given no value, and every command failed with
/// "a value is required for '--socket'". Called first in `main`, while
/// the process has one thread.
pub fn forget_empty_env() {
    rotor_protocol::name_build(VERSION);
    for name in ["ROTOR_SOCKET", "ROTOR_CONFIG"] {
        if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(name);
        }
    }
}

/// Logs to stderr; `RUST_LOG` (e.g. `info,rotor_worker=debug`) overrides
/// `default`. A stderr that is gone (`rotor up 2>&1 | head -1`) loses the
/// lines and nothing else: tracing's own report of a failed write would
/// panic on that same stderr, so it is off.
///
/// A child of `rotor up` (which sets `ROTOR_LOG_NAME`, e.g. `worker 3`)
/// starts each line with that name and its pid, `worker 3[1234]: `: its
/// lines share `rotor up`'s stderr (and, under systemd, its pid in the
/// journal), and which worker said what could not be told.
pub fn init_logging(default: &str) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .ok()
        .filter(|_| !spec.is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    // rustls warns of each client's own quirk, once a connection (an IP
    // address as SNI, as Node's undici sends one: a line a connection at
    // thousands a second); rotor says what matters of a handshake itself.
    // Unless the filter names rustls.
    if !spec.contains("rustls") {
        filter = filter.add_directive("rustls=error".parse().expect("a directive"));
    }
    let name = std::env::var(LOG_NAME).ok().filter(|n| !n.is_empty());
    let prefix: &'static str = match name {
        Some(n) => Box::leak(format!("{}[{}]: ", n, std::process::id()).into_boxed_str()),
        None => "",
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || Prefixed(prefix))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
}

/// The environment variable naming a child of `rotor up` in its log lines.
pub const LOG_NAME: &str = "ROTOR_LOG_NAME";

/// Standard error, each write (one a line: tracing writes a formatted
/// event at once) after a prefix.
struct Prefixed(&'static str);

impl std::io::Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        if self.0.is_empty() {
            return err.write(buf);
        }
        // In one write, so lines of processes sharing the stream do not
        // interleave between prefix and line.
        let mut line = Vec::with_capacity(self.0.len() + buf.len());
        line.extend_from_slice(self.0.as_bytes());
        line.extend_from_slice(buf);
        err.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Builds the runtime, installs the signal handlers, and runs `main` with
/// them: the common start of the daemons. `threads`: 1 runs everything on
/// the main thread; more, a multi-threaded runtime of that many.
pub fn run_daemon<F, Fut>(threads: usize, main: F) -> std::process::ExitCode
where
    F: FnOnce(signals::Signals) -> Fut,
    Fut: std::future::Future<Output = std::process::ExitCode>,
{
    let rt = if threads > 1 {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
    .expect("cannot start the tokio runtime");
    let code = rt.block_on(async {
        match signals::Signals::install() {
            Ok(s) => main(s).await,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    });
    // Blocking work still running (a pool source's read, until its
    // timeout) is not waited for: the daemon has stopped.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}
