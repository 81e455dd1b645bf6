//! `rotor-allocator`: owns the source-address pool and hands out leases.

use std::process::ExitCode;

use clap::Parser;
use rotor::cli::AllocatorArgs;

/// rotor's allocator: owns the pool of source addresses, refreshes it, and
/// leases the next address to workers over a Unix socket.
#[derive(Parser)]
#[command(version = rotor::VERSION)]
struct Cli {
    #[command(flatten)]
    args: AllocatorArgs,
}

fn main() -> ExitCode {
    rotor::forget_empty_env();
    let cli = Cli::parse_from(rotor::cli::args());
    rotor::init_logging("info");
    rotor::allocator_main::allocator(cli.args)
}
