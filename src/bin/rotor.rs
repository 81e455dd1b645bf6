//! `rotor`: the operator's command — start everything, ask for status,
//! reload the pool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rotor::cli::ControlArgs;
use rotor::signals::Signals;
use rotor::up::UpArgs;
use rotor_protocol::{error_chain, Request, Response, StatusReport};

/// rotor: a backconnect forward proxy that sends each request from the next
/// source address of a pool.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start one allocator and N workers sharing one port, and supervise them.
    Up(Box<UpArgs>),
    /// Show the allocator's pool, lease counts, cursor and connected workers.
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the pool sources now (as SIGHUP to the allocator does).
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    rotor::init_logging("info");
    // `rotor up` forks its children from this thread; PR_SET_PDEATHSIG is
    // tied to the forking thread, so it must live as long as the process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    rt.block_on(async {
        match cli.command {
            Cmd::Up(args) => match Signals::install() {
                Ok(signals) => rotor::up::run(*args, signals).await,
                Err(e) => {
                    tracing::error!("cannot install signal handlers: {e}");
                    ExitCode::FAILURE
                }
            },
            Cmd::Status { control, json } => {
                report(request(&control, Request::Status).await, |r| match r {
                    Response::Status(s) if json => {
                        Some(serde_json::to_string_pretty(&s).expect("status serializes"))
                    }
                    Response::Status(s) => Some(format_status(&s)),
                    _ => None,
                })
            }
            Cmd::Reload { control } => {
                report(request(&control, Request::Reload).await, |r| match r {
                    Response::Reloaded { generation, size } => Some(format!(
                        "pool reloaded: {size} addresses, generation {generation}"
                    )),
                    _ => None,
                })
            }
        }
    })
}

async fn request(control: &ControlArgs, body: Request) -> anyhow::Result<Response> {
    rotor::control::request(&control.socket()?, body).await
}

#[allow(clippy::print_stdout)]
fn report(
    result: anyhow::Result<Response>,
    render: impl FnOnce(Response) -> Option<String>,
) -> ExitCode {
    match result {
        Ok(Response::Error { message }) => {
            eprintln!("rotor: the allocator refused: {message}");
            ExitCode::FAILURE
        }
        Ok(resp) => {
            let shown = format!("{resp:?}");
            match render(resp) {
                Some(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("rotor: unexpected answer from the allocator: {shown}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("rotor: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn format_status(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let refreshed = s
        .last_refresh_unix
        .map(|t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            )
            .to_string()
        })
        .unwrap_or_else(|| "never".into());
    let _ = writeln!(
        out,
        "pool: {} addresses, generation {}, {} leases, up {}s, last refresh {refreshed}",
        s.pool.len(),
        s.generation,
        s.leases_total,
        s.uptime_secs
    );
    for (i, a) in s.pool.iter().enumerate() {
        let mark = if i as u32 == s.cursor {
            "  <- next"
        } else {
            ""
        };
        let _ = writeln!(out, "  {:<40} {:>10} leases{mark}", a.ip, a.leases);
    }
    let _ = writeln!(out, "sources:");
    for src in &s.sources {
        match &src.error {
            None => {
                let _ = writeln!(out, "  {}: {} addresses", src.name, src.addresses);
            }
            Some(e) => {
                let _ = writeln!(
                    out,
                    "  {}: {} addresses kept; last read failed: {e}",
                    src.name, src.addresses
                );
            }
        }
    }
    let _ = writeln!(out, "peers: {}", s.peers.len());
    for p in &s.peers {
        let _ = writeln!(
            out,
            "  {:?} pid {} ({}) connected {}s, {} leases",
            p.role, p.pid, p.software, p.connected_secs, p.leases
        );
    }
    out.trim_end().to_string()
}
