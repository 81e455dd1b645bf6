//! `rotor-worker`: the proxy process.

use std::process::ExitCode;

use clap::Parser;
use rotor::cli::WorkerArgs;

/// rotor's worker: an HTTP/1.1 forward proxy that sends every request (and
/// every CONNECT tunnel) from the next address the allocator leases it.
#[derive(Parser)]
#[command(version = rotor::VERSION)]
struct Cli {
    #[command(flatten)]
    args: WorkerArgs,
}

fn main() -> ExitCode {
    rotor::forget_empty_env();
    let cli = Cli::parse_from(rotor::cli::args());
    rotor::init_logging("info");
    rotor::worker_main::worker(cli.args)
}
