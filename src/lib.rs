//! What the three rotor binaries share: command-line flags, default paths,
//! logging and signal handling, the control client, and `rotor up`'s
//! supervisor. The binaries themselves only parse flags and call in here.

pub mod activation;
pub mod cli;
pub mod control;
pub mod paths;
pub mod signals;
pub mod up;

/// Logs to stderr; `RUST_LOG` (e.g. `rotor_worker=debug`) overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
