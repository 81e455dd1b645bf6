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

pub mod activation;
pub mod allocator_main;
pub mod cli;
pub mod control;
pub mod paths;
pub mod signals;
pub mod up;
pub mod worker_main;

/// Logs to stderr; `RUST_LOG` (e.g. `info,rotor_worker=debug`) overrides
/// `default`. A stderr that is gone (`rotor up 2>&1 | head -1`) loses the
/// lines and nothing else: tracing's own report of a failed write would
/// panic on that same stderr, so it is off.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
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
