//! `rotor-worker`: the proxy process.

use std::process::ExitCode;

use clap::Parser;
use rotor::cli::WorkerArgs;
use rotor::signals::Signals;
use rotor_protocol::error_chain;
use rotor_worker::{listener, LeaseClient, Stopped};

/// rotor's worker: an HTTP/1.1 forward proxy that sends every request (and
/// every CONNECT tunnel) from the next address the allocator leases it.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: WorkerArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rotor::init_logging("info");
    let rt = tokio::runtime::Builder::new_multi_thread()
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
        let mut listeners = Vec::new();
        for addr in &cli.args.listen {
            match listener::bind_reuseport(*addr) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::error!("{}", error_chain(&e));
                    return ExitCode::FAILURE;
                }
            }
        }
        let tuning = &cli.args.tuning;
        let leases = LeaseClient::start(
            cli.args.socket.path(),
            tuning.lease_timeout,
            signals.fast.clone(),
        );
        match rotor_worker::run(
            listeners,
            leases,
            tuning.config(),
            signals.shutdown,
            signals.fast.clone(),
        )
        .await
        {
            Ok(Stopped::Drained) if !signals.fast.is_cancelled() => ExitCode::SUCCESS,
            // SIGINT, or work was cut at the drain deadline.
            Ok(_) => ExitCode::from(130),
            Err(e) => {
                tracing::error!("worker failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
