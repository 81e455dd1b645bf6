//! `rotor-allocator`: owns the source-address pool and hands out leases.

use std::process::ExitCode;

use clap::Parser;
use rotor::cli::AllocatorArgs;
use rotor::signals::Signals;
use rotor_protocol::error_chain;

/// rotor's allocator: owns the pool of source addresses, refreshes it, and
/// leases the next address to workers over a Unix socket.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: AllocatorArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rotor::init_logging("info");
    let sources = match cli.args.pool.sources() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("invalid --pool: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if cli.args.check {
        return check(&sources);
    }
    // One lock serves every lease; a single thread is all it needs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    rt.block_on(async {
        let signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let path = cli.args.socket.path();
        let listener = match rotor_allocator::bind_socket(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(socket = %path.display(), "allocator listening");
        let config = rotor_allocator::Config {
            sources,
            refresh: cli.args.pool.refresh,
        };
        let result = rotor_allocator::run(listener, config, signals.reload, signals.shutdown).await;
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("allocator failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn check(sources: &[rotor_allocator::source::Source]) -> ExitCode {
    let mut ok = true;
    for s in sources {
        match s.read() {
            Ok(addrs) => eprintln!("{}: {} addresses", s.name(), addrs.len()),
            Err(e) => {
                ok = false;
                eprintln!("{}: {}", s.name(), error_chain(&e));
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
