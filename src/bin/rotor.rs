//! `rotor`: the operator's command — start everything, ask for status,
//! reload the pool.

use rotor::{count, say};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rotor::cli::ControlArgs;
use rotor::signals::Signals;
use rotor::up::UpArgs;
use rotor_protocol::{
    error_chain, PeerStatus, Request, Response, Segment, SitesReport, SourceStatus, StatusReport,
    StatusReportV2, MINOR_FAMILIES, MINOR_METRICS, MINOR_RELOAD_REPORT, MINOR_SITES,
    MINOR_SITES_V2, MINOR_WORKER_RELOADS,
};

/// rotor: a backconnect forward proxy that sends each request from the next
/// source address of a pool.
#[derive(Parser)]
#[command(version = rotor::VERSION)]
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
    /// Re-read the pool sources now (as SIGHUP to the allocator does), and
    /// have every worker re-read its users file, TLS certificate and
    /// resolver configuration; exit 3 if any could not be read.
    Reload {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Take the pool entry holding ADDR out of the rotation, for every
    /// worker, until `rotor release` (or for --for). A prefix as `rotor
    /// status` lists it (`2001:db8:1::/64`) names that entry.
    Quarantine {
        #[arg(value_name = "ADDR", value_parser = entry_named)]
        addr: Segment,
        /// Put it back by itself after this long (`30m`, `2h`).
        #[arg(long = "for", value_name = "DURATION", value_parser = quarantine_for)]
        for_: Option<std::time::Duration>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Put the pool entry holding ADDR (or the entry a prefix names) back
    /// into the rotation.
    Release {
        #[arg(value_name = "ADDR", value_parser = entry_named)]
        addr: Segment,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Print an argon2 hash of the password read from standard input.
    HashPassword,
    /// Run an allocator (as `rotor-allocator`; `rotor up` starts it so).
    #[command(hide = true)]
    Allocator(Box<rotor::cli::AllocatorArgs>),
    /// Run a worker (as `rotor-worker`; `rotor up` starts it so).
    #[command(hide = true)]
    Worker(Box<rotor::cli::WorkerArgs>),
    /// Manage the users file of `--auth-file`.
    #[command(subcommand)]
    User(UserCmd),
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user, or set a user's password; the password is read from
    /// standard input (`printf %s "$PW" | rotor user add NAME --auth-file F`).
    Add {
        name: String,
        #[arg(long, value_name = "PATH")]
        auth_file: std::path::PathBuf,
    },
    /// Remove a user.
    Remove {
        name: String,
        #[arg(long, value_name = "PATH")]
        auth_file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    rotor::forget_empty_env();
    let cli = Cli::parse_from(rotor::cli::args());
    rotor::init_logging("info");
    let cli = match cli.command {
        Cmd::HashPassword => return hash_password(),
        Cmd::User(cmd) => return user(&cmd),
        Cmd::Allocator(args) => return rotor::allocator_main::allocator(*args),
        Cmd::Worker(args) => return rotor::worker_main::worker(*args),
        other => Cli { command: other },
    };
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
                let socket = control.socket();
                // A status too large to say each quarantine reason says
                // those that repeat once: each said again here. One too
                // large even so leaves out the entries in rotation
                // (`unlisted`), said as such.
                let mut unlisted = 0;
                let answer = status(&control).await.map(|r| {
                    let (r, n) = filled(r);
                    unlisted = n;
                    r
                });
                // Per-site state, from an allocator that keeps it.
                let sites = match (&socket, &answer) {
                    (Ok(socket), Ok(Response::StatusV2(_))) => {
                        match rotor::control::request_by_minor(socket, |minor| match minor {
                            m if m >= MINOR_SITES_V2 => Request::SitesV2 { max: SITES_SHOWN },
                            m if m >= MINOR_SITES => Request::Sites { max: SITES_SHOWN },
                            _ => Request::Status,
                        })
                        .await
                        {
                            Ok(Response::SitesV2(r)) => Some((r.report, Some(r.v6_prefix))),
                            // (an allocator before minor 9 keyed IPv6 by address)
                            Ok(Response::Sites(r)) => Some((r, None)),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                // What the workers served, from an allocator that hears it.
                let host = match (&socket, &answer) {
                    (Ok(socket), Ok(Response::StatusV2(_))) => {
                        match rotor::control::request_by_minor(socket, |minor| {
                            match minor >= MINOR_METRICS {
                                true => Request::HostStatus,
                                false => Request::Status,
                            }
                        })
                        .await
                        {
                            Ok(Response::HostStatus(r)) => Some(r),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                report(answer, |r| match r {
                    Response::StatusV2(s) if json => {
                        let mut v = status_json(&s);
                        if unlisted > 0 {
                            v["unlisted_entries"] = unlisted.into();
                        }
                        if let Some((sites, v6_prefix)) = &sites {
                            v["sites"] = sites_json(sites, *v6_prefix);
                        }
                        if let Some(h) = &host {
                            v["host"] = serde_json::to_value(h).expect("host report serializes");
                        }
                        Some(serde_json::to_string_pretty(&v).expect("status serializes"))
                    }
                    Response::StatusV2(s) => {
                        let mut text = format_status_v2(&s, unlisted);
                        if let Some(h) = &host {
                            text.push('\n');
                            text.push_str(&format_host(h));
                        }
                        if let Some((sites, v6_prefix)) = &sites {
                            text.push('\n');
                            text.push_str(&format_sites(sites, *v6_prefix));
                        }
                        Some(text.trim_end().to_string())
                    }
                    Response::Status(s) if json => {
                        Some(serde_json::to_string_pretty(&s).expect("status serializes"))
                    }
                    Response::Status(s) => Some(format_status(&s)),
                    _ => None,
                })
            }
            Cmd::HashPassword | Cmd::User(_) | Cmd::Allocator(_) | Cmd::Worker(_) => {
                unreachable!("handled before the runtime")
            }
            Cmd::Quarantine {
                addr,
                for_,
                control,
            } => steer(&control, addr, false, for_).await,
            Cmd::Release { addr, control } => steer(&control, addr, true, None).await,
            Cmd::Reload { control } => reload(&control).await,
        }
    })
}

/// An address, or a prefix as `rotor status` lists one.
fn entry_named(text: &str) -> Result<Segment, String> {
    text.parse::<Segment>()
        .map_err(|_| format!("`{text}` is not an address or a prefix (ADDR or ADDR/LEN)"))
}

/// A `--for` of `rotor quarantine`, as the admin API takes one.
fn quarantine_for(text: &str) -> Result<std::time::Duration, String> {
    rotor_allocator::state::hand_out_for(text)
}

/// `rotor reload`: the pool's sources read again, each worker's files
/// (users, certificate, resolver) too, and what came of it. A source that
/// failed (its last good addresses kept), or a worker's part that failed
/// (the one in use kept) or that it did not report, is said, and is exit
/// 3: a mistyped pool file or a bad certificate must not pass for a
/// reload.
async fn reload(control: &ControlArgs) -> ExitCode {
    let answer = match control.socket() {
        Ok(socket) => {
            rotor::control::request_by_minor(&socket, |minor| match minor {
                m if m >= MINOR_WORKER_RELOADS => Request::ReloadReportV2,
                m if m >= MINOR_RELOAD_REPORT => Request::ReloadReport,
                _ => Request::Reload,
            })
            .await
        }
        Err(e) => Err(anyhow::anyhow!("{}", rotor_protocol::error_chain(&e))),
    };
    // The workers' reloads, when the allocator can say.
    let mut workers = None;
    let (generation, size, addresses, failed) = match answer {
        Ok(Response::ReloadReportV2(v2)) => {
            let r = v2.report;
            workers = Some((v2.workers, v2.more_workers));
            (r.generation, r.entries, Some(r.addresses), r.failed)
        }
        Ok(Response::ReloadReport(r)) => (r.generation, r.entries, Some(r.addresses), r.failed),
        // An allocator before minor 6: the failed sources from its status,
        // which a pool too large to list leaves unknown (said, exit 3).
        Ok(Response::Reloaded { generation, size }) => {
            let (addresses, failed, known) = match status(control).await {
                Ok(Response::StatusV2(s)) => (
                    Some(s.families.iter().map(|f| f.total).sum::<u64>()),
                    failed_sources(s.sources),
                    true,
                ),
                Ok(Response::Status(s)) => (None, failed_sources(s.sources), true),
                _ => (None, Vec::new(), false),
            };
            // Unknown is not good: said as such, and exit 3.
            if !known {
                let entries = count(size, "entry", "entries");
                say(&format!(
                    "pool reloaded: {entries}, generation {generation}"
                ));
                say!(
                    "rotor: whether every pool source could be read is unknown: the allocator is too old to say in its answer, and its status could not be read"
                );
                return ExitCode::from(3);
            }
            (generation, size.into(), addresses, failed)
        }
        other => return report(other, |_| None),
    };
    let in_rotation = addresses.map_or(String::new(), |n| {
        format!("{} in ", count(n, "address", "addresses"))
    });
    let entries = count(size, "entry", "entries");
    if !say(&format!(
        "pool reloaded: {in_rotation}{entries}, generation {generation}"
    )) {
        return ExitCode::FAILURE;
    }
    let mut bad = !failed.is_empty();
    // An empty pool read as a success (exit 0) while every request was
    // answered 503: a source that lists nothing (a truncated file, an
    // API's empty answer) is no failure to read it.
    if size == 0 {
        bad = true;
        say!("rotor: the pool is empty: every request is answered 503 until a source lists an address");
    } else if addresses == Some(0) {
        bad = true;
        say!("rotor: no address of the pool is in rotation (every entry is one this host cannot use, or taken out; see rotor status): every request is answered 503");
    }
    for (name, error) in failed {
        let kept = match name.starts_with(rotor_allocator::metrics::ADMIN_TOKEN_SOURCE) {
            true => "the token in use kept",
            false => "last good addresses kept",
        };
        say!("rotor: {name} could not be read ({kept}): {error}");
    }
    match workers {
        Some((workers, more)) => bad |= !workers_reloaded(&workers, more),
        // Unknown is not good: said as such, and exit 3.
        None => {
            bad = true;
            say!(
                "rotor: the allocator is too old to say how the workers' reloads went (see their logs)"
            )
        }
    }
    if let Some(path) = &control.at.config {
        if edited_since_start(control, path).await {
            bad = true;
            say!(
                "rotor: {} changed since the allocator started, and a reload does not read it again: restart rotor to apply it",
                path.display()
            );
        }
    }
    match bad {
        true => ExitCode::from(3),
        false => ExitCode::SUCCESS,
    }
}

/// Whether the configuration file at `path` was written after the
/// allocator started (by its status's uptime): an edit `rotor reload`
/// (`systemctl reload`) does not apply, which it had passed over in
/// silence.
async fn edited_since_start(control: &ControlArgs, path: &std::path::Path) -> bool {
    // Under `rotor up` the allocator reads `rotor up`'s copy of the file,
    // taken at its start, and a restarted allocator reads it again: an
    // edit is told by the contents (by the allocator's start, one made
    // before its restart passed for applied).
    if let Some(read) = control.socket().ok().and_then(|s| allocator_config(&s)) {
        let same = match (std::fs::canonicalize(&read), std::fs::canonicalize(path)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            if let (Ok(theirs), Ok(ours)) = (std::fs::read(&read), std::fs::read(path)) {
                return theirs != ours;
            }
        }
    }
    let Ok(modified) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return false;
    };
    let uptime = match status(control).await {
        Ok(Response::StatusV2(s)) | Ok(Response::StatusCut { report: s, .. }) => s.uptime_secs,
        Ok(Response::Status(s)) => s.uptime_secs,
        _ => return false,
    };
    // (Whole seconds: the start was within the second before this; an
    // edit in the start's own second is not told from one before it.)
    let started = std::time::SystemTime::now() - std::time::Duration::from_secs(uptime);
    modified > started
}

/// The configuration file the allocator serving `socket` was started with
/// (`--config`), by its pid (the kernel's word on the connection) and its
/// command line.
fn allocator_config(socket: &std::path::Path) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    let pid = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .ok()?
        .pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(a) = args.next() {
        if a == b"--config" {
            return args.next().map(|v| std::ffi::OsStr::from_bytes(v).into());
        }
        if let Some(v) = a.strip_prefix(b"--config=") {
            return Some(std::ffi::OsStr::from_bytes(v).into());
        }
    }
    None
}

/// Says how each worker's reload went; whether every one reloaded whole.
fn workers_reloaded(workers: &[rotor_protocol::WorkerReload], more: u32) -> bool {
    use rotor_protocol::WorkerReloadOutcome as Outcome;
    let mut whole = 0;
    let mut good = more == 0;
    for w in workers {
        match &w.outcome {
            Outcome::Done { failed } if failed.is_empty() => whole += 1,
            Outcome::Done { failed } => {
                good = false;
                for (what, why) in failed {
                    say!(
                        "rotor: worker {}: {what} not reloaded (the one in use kept): {why}",
                        w.pid
                    );
                }
            }
            Outcome::NoWord => {
                good = false;
                say!(
                    "rotor: worker {} did not say how its reload went within 5 s (see its log)",
                    w.pid
                );
            }
            Outcome::TooOld => {
                good = false;
                say!(
                    "rotor: worker {} is too old to say how its reload went (see its log)",
                    w.pid
                );
            }
        }
    }
    if more > 0 {
        say!("rotor: {more} more workers, not listed");
    }
    let _ = say(&format!(
        "workers reloaded: {whole} of {}",
        workers.len() + more as usize
    ));
    good
}

fn failed_sources(sources: Vec<rotor_protocol::SourceStatus>) -> Vec<(String, String)> {
    sources
        .into_iter()
        .filter_map(|src| src.error.map(|e| (src.name, e)))
        .collect()
}

/// `rotor quarantine` and `rotor release`.
async fn steer(
    control: &ControlArgs,
    named: Segment,
    release: bool,
    for_: Option<std::time::Duration>,
) -> ExitCode {
    // A prefix must be an entry of the pool: its first address alone
    // named whatever entry held that (one /64 of a /48 given, an address
    // listed on its own), and took it out.
    if !named.is_single() {
        if let Some(why) = not_an_entry(control, named).await {
            say!("rotor: {why}; nothing changed");
            return ExitCode::FAILURE;
        }
    }
    let ip = named.base();
    // A release of an entry that is in the rotation says so (it said
    // "back in the rotation", as if it had been out). It is still sent: it
    // forgets an address held out by hand that the pool lists only inside
    // a wider entry now.
    let serving = match release {
        true => serving(control, named).await,
        false => None,
    };
    let answer = match control.socket() {
        Ok(socket) => {
            rotor::control::request_by_minor(&socket, |minor| match minor >= MINOR_METRICS {
                true => Request::Steer {
                    ip,
                    release,
                    for_secs: for_.map(|d| d.as_secs().max(1)),
                },
                false => Request::Status,
            })
            .await
        }
        Err(e) => Err(anyhow::anyhow!("{}", rotor_protocol::error_chain(&e))),
    };
    // (An older allocator says nothing of keeping it.)
    let (answer, not_kept) = match answer {
        Ok(Response::SteeredV2 { entry, not_kept }) => (Ok(Response::Steered { entry }), not_kept),
        other => (other, None),
    };
    // Nothing changed is a failure a script must see (a mistyped address).
    let refused = match &answer {
        Ok(Response::Steered { entry: None }) => {
            Some(format!("{named} is not in the pool; nothing changed"))
        }
        Ok(Response::Status(_)) => {
            Some("the allocator is too old to take an address out by hand".into())
        }
        _ => None,
    };
    if let Some(why) = refused {
        say!("rotor: {why}");
        return ExitCode::FAILURE;
    }
    // An address listed on its own inside a prefix the pool leases: out
    // by hand, but no entry of its own `rotor status` could list.
    let inside = match (release, &answer) {
        (false, Ok(Response::Steered { entry: Some(e) })) => held_by_wider(control, *e).await,
        _ => None,
    };
    // A release puts back only what this host can use (an older allocator
    // put anything back, untested).
    if let (true, Ok(Response::Steered { entry: Some(e) })) = (release, &answer) {
        if let Some(reason) = out_of_rotation(control, *e).await {
            say!("rotor: {e} stays out of the rotation: {reason}");
            return ExitCode::FAILURE;
        }
    }
    // Taking out a family's last address in rotation is done as asked,
    // but said: every request needing one is then a 503.
    let emptied = match (release, &answer) {
        (false, Ok(Response::Steered { entry: Some(e) })) => {
            let family = rotor_protocol::Family::of(&e.base());
            // What is left of its family, and of both (/health answers
            // 503 only with none of either: review ao).
            let left = match status(control).await.ok().map(|r| filled(r).0) {
                Some(Response::StatusV2(r)) => r
                    .families
                    .iter()
                    .find(|f| f.family == family)
                    .map(|f| (f.total, r.families.iter().map(|f| f.total).sum::<u64>())),
                _ => None,
            };
            match left {
                Some((0, all)) => Some((family, all == 0)),
                _ => None,
            }
        }
        _ => None,
    };
    let code = report(answer, |r| match r {
        Response::Steered { entry: Some(e) } => Some(match (release, for_) {
            (true, _) if serving == Some(e) => {
                format!("{e} was not out of the rotation")
            }
            (true, _) => format!("{e} is back in the rotation"),
            (false, None) => format!("{e} is out of the rotation until `rotor release {named}`"),
            (false, Some(d)) => format!(
                "{e} is out of the rotation for {}",
                humantime::format_duration(d)
            ),
        }),
        _ => None,
    });
    if let Some((family, none)) = emptied {
        let health = match none {
            true => " (and /health answers 503: no address of either family is left)",
            false => "",
        };
        say!("rotor: warning: no {family} address is left in the rotation: every request needing one gets 503{health} until one is released (`rotor release ADDRESS`)");
    }
    if let (ExitCode::SUCCESS, Some(wider)) = (code, inside) {
        say!("rotor: note: it lies inside {wider}, which stays in the rotation (its rotation reaches an address once a pass over the prefix): `rotor status` lists no entry of its own for it until the pool lists it apart from {wider}");
    }
    // Done now, but an allocator restart would undo it: a failure a
    // script must see.
    if let (ExitCode::SUCCESS, Some(why)) = (code, not_kept) {
        say!("rotor: error: done, but not kept over an allocator restart, which would undo it: {why} (the allocator writes it again at its next change or pool refresh, once it can)");
        return ExitCode::FAILURE;
    }
    code
}

/// Why the prefix `named` is no entry of the pool, if the status says so
/// (a status that left entries out, or none, says nothing).
async fn not_an_entry(control: &ControlArgs, named: Segment) -> Option<String> {
    let (Response::StatusV2(report), 0) = filled(status(control).await.ok()?) else {
        return None;
    };
    if report.pool.iter().any(|x| x.entry == named) {
        return None;
    }
    let holder = report
        .pool
        .iter()
        .filter(|x| x.entry.contains(named.base()))
        .min_by_key(|x| x.entry.len());
    Some(match holder {
        Some(h) => format!(
            "{named} is not a pool entry ({} holds its first address; name an address to steer the entry holding it)",
            h.entry
        ),
        None => format!("{named} is not a pool entry"),
    })
}

/// The entry `named` steers (an entry itself, or the smallest holding an
/// address), if the allocator's status lists it in the rotation (a status
/// that left entries out lists only some).
async fn serving(control: &ControlArgs, named: Segment) -> Option<Segment> {
    let Response::StatusV2(report) = filled(status(control).await.ok()?).0 else {
        return None;
    };
    let e = report
        .pool
        .into_iter()
        .filter(|x| x.entry == named || (named.is_single() && x.entry.contains(named.base())))
        .min_by_key(|x| x.entry.len())?;
    e.quarantine.is_none().then_some(e.entry)
}

/// The wider entry in rotation that holds `entry`, should the status
/// list no entry `entry` (a whole status only: a cut one leaves entries
/// in rotation out).
async fn held_by_wider(control: &ControlArgs, entry: Segment) -> Option<Segment> {
    let (Response::StatusV2(report), 0) = filled(status(control).await.ok()?) else {
        return None;
    };
    if report.pool.iter().any(|x| x.entry == entry) {
        return None;
    }
    report
        .pool
        .into_iter()
        .find(|x| x.quarantine.is_none() && x.entry.contains(entry.base()))
        .map(|x| x.entry)
}

/// Why `entry` is out of the rotation, if the allocator's status says it
/// is.
async fn out_of_rotation(control: &ControlArgs, entry: Segment) -> Option<String> {
    let Response::StatusV2(report) = filled(status(control).await.ok()?).0 else {
        return None;
    };
    let e = report.pool.into_iter().find(|x| x.entry == entry)?;
    e.quarantine.map(|q| q.reason)
}

/// A status answer as `StatusV2`, every quarantine reason said (a status
/// too large to say each says those that repeat once), and how many
/// entries in rotation it left out; any other answer as it is.
fn filled(r: Response) -> (Response, u64) {
    let (mut report, unlisted) = match r {
        Response::StatusV2(s) => (s, 0),
        Response::StatusCut { report, unlisted } => (report, unlisted),
        other => return (other, 0),
    };
    report.fill_reasons();
    (Response::StatusV2(report), unlisted)
}

/// The allocator's status, as much of it as its protocol minor answers.
async fn status(control: &ControlArgs) -> anyhow::Result<Response> {
    let socket = control.socket()?;
    rotor::control::request_by_minor(&socket, |minor| match minor >= MINOR_FAMILIES {
        true => Request::StatusV2,
        false => Request::Status,
    })
    .await
}

/// Writes `text` and a newline to standard output; whether that went (a
/// reader that stopped early, `rotor status | head`, is no failure:
/// println! panicked on the closed pipe).
fn say(text: &str) -> bool {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            say!("rotor: cannot write the answer: {e}");
            false
        }
    }
}

fn report(
    result: anyhow::Result<Response>,
    render: impl FnOnce(Response) -> Option<String>,
) -> ExitCode {
    match result {
        Ok(Response::Error { message }) => {
            say!("rotor: the allocator refused: {message}");
            ExitCode::FAILURE
        }
        Ok(resp) => {
            let shown = format!("{resp:?}");
            match render(resp) {
                Some(text) => match say(&text) {
                    true => ExitCode::SUCCESS,
                    false => ExitCode::FAILURE,
                },
                None => {
                    say!("rotor: unexpected answer from the allocator: {shown}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            say!("rotor: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// When the pool was last refreshed, for the status text.
fn refreshed(unix: Option<u64>) -> String {
    unix.map(|t| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
            .to_string()
    })
    .unwrap_or_else(|| "never".into())
}

/// The sources and the peers, the end of both status texts.
fn sources_and_peers(out: &mut String, sources: &[SourceStatus], peers: &[PeerStatus]) {
    use std::fmt::Write;
    let _ = writeln!(out, "sources:");
    for src in sources {
        // A prefix's size saturates the count (a u32 on the wire).
        let listed = match src.addresses {
            u32::MAX => format!("{} or more addresses", u32::MAX),
            n => count(n, "address", "addresses"),
        };
        let _ = match &src.error {
            None => writeln!(out, "  {}: {listed}", src.name),
            Some(e) => writeln!(out, "  {}: {listed} kept; last read failed: {e}", src.name),
        };
    }
    let _ = writeln!(out, "peers: {}", peers.len());
    for p in peers {
        let _ = writeln!(
            out,
            "  {:?} pid {} ({}) connected {}s, {}",
            p.role,
            p.pid,
            p.software,
            p.connected_secs,
            count(p.leases, "lease", "leases")
        );
    }
}

fn format_status(s: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let refreshed = refreshed(s.last_refresh_unix);
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
    sources_and_peers(&mut out, &s.sources, &s.peers);
    out.trim_end().to_string()
}

/// `rotor status --json`: each entry under `ip` as an address or a prefix
/// (`2001:db8::/64`), each family's rotation, quarantine with its reason.
fn status_json(s: &StatusReportV2) -> serde_json::Value {
    use serde_json::json;
    json!({
        "generation": s.generation,
        "sessions": s.sessions,
        "families": s.families.iter().map(|f| json!({
            "family": f.family.to_string(),
            "cursor": f.cursor,
            "total": f.total,
            "next": f.next.map(|ip| ip.to_string()),
        })).collect::<Vec<_>>(),
        "pool": s.pool.iter().map(|e| json!({
            "ip": e.entry.to_string(),
            "leases": e.leases,
            "quarantined": e.quarantine.as_ref().map(|q| json!({
                "reason": q.reason,
                "since_secs": q.since_secs,
                "retry_in_secs": q.retry_in_secs,
            })),
        })).collect::<Vec<_>>(),
        "leases_total": s.leases_total,
        "last_refresh_unix": s.last_refresh_unix,
        "sources": s.sources,
        "peers": s.peers.iter().map(peer_json).collect::<Vec<_>>(),
        "uptime_secs": s.uptime_secs,
    })
}

/// A peer as `--json` gives it: its software as it said it, and apart
/// the protocol the allocator names after it (from minor 16), if any.
fn peer_json(p: &rotor_protocol::PeerStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(p).expect("a peer serializes");
    if let Some((software, protocol)) = p.software.rsplit_once(", protocol ") {
        v["software"] = software.into();
        v["protocol"] = protocol.into();
    }
    v
}

/// Sites `rotor status` shows at most (the most recently used first).
const SITES_SHOWN: u32 = 200;

/// How many leading bits of `ip` a site entry stands for: an IPv6 one is
/// its prefix of `v6_prefix` (`None`: an allocator that keyed by address).
fn key_len(ip: &std::net::IpAddr, v6_prefix: Option<u8>) -> u8 {
    match ip {
        std::net::IpAddr::V4(_) => 32,
        std::net::IpAddr::V6(_) => v6_prefix.unwrap_or(128),
    }
}

/// A site entry's address as shown: an IPv6 prefix as `PREFIX/LEN`.
fn key_text(ip: &std::net::IpAddr, v6_prefix: Option<u8>) -> String {
    match key_len(ip, v6_prefix) {
        32 | 128 => ip.to_string(),
        len => format!("{ip}/{len}"),
    }
}

fn sites_json(r: &SitesReport, v6_prefix: Option<u8>) -> serde_json::Value {
    use serde_json::json;
    json!({
        "total": r.total,
        "pairs": r.pairs,
        "entries": r.entries(),
        "max_entries": r.max_entries,
        // The prefix length an IPv6 source is counted by (null: by its
        // address, as an allocator before it was settable did).
        "v6_prefix": v6_prefix,
        "shown": r.sites.iter().map(|s| json!({
            "site": s.site,
            "limit": s.limit.map(|l| json!({"count": l.count, "period_ms": l.period_ms})),
            "idle_secs": s.idle_secs,
            "addresses": s.addrs.iter().map(|p| json!({
                "ip": p.ip.to_string(),
                "prefix_len": key_len(&p.ip, v6_prefix),
                "used": p.used,
                "left": s.limit.map(|l| l.count.saturating_sub(p.used)),
                "cooling_ms": p.cooling_ms,
                // (And connects that failed there while the site
                // answered other addresses: both cool the pair.)
                "pushbacks": p.strikes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn format_sites(r: &SitesReport, v6_prefix: Option<u8>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if r.total == 0 {
        return out;
    }
    let _ = writeln!(
        out,
        "sites with budgets or cooldowns: {} ({} address entries: {} of {} entries, sites and addresses together){}",
        r.total,
        r.pairs,
        r.entries(),
        r.max_entries,
        match r.total > r.sites.len() as u64 {
            true => format!(", the {} most recent shown", r.sites.len()),
            false => String::new(),
        }
    );
    for s in &r.sites {
        let limit = match s.limit {
            Some(l) => format!(
                "budget {}/{} per address",
                l.count,
                humantime::format_duration(std::time::Duration::from_millis(l.period_ms))
            ),
            None => "no budget".into(),
        };
        let _ = writeln!(out, "  {}: {limit}, last used {}s ago", s.site, s.idle_secs);
        for p in &s.addrs {
            let used = match s.limit {
                Some(l) => format!("used {} left {}", p.used, l.count.saturating_sub(p.used)),
                None => String::new(),
            };
            let cooling = match p.cooling_ms {
                Some(ms) => format!("  COOLING {:.1}s", ms as f64 / 1000.0),
                None => String::new(),
            };
            let strikes = match p.strikes {
                0 => String::new(),
                1 => "  (1 pushback or failed connect)".into(),
                n => format!("  ({n} pushbacks or failed connects in a row)"),
            };
            let _ = writeln!(
                out,
                "    {:<44} {used}{cooling}{strikes}",
                key_text(&p.ip, v6_prefix)
            );
        }
    }
    out
}

/// `1 address`, `3 addresses`.
fn format_host(h: &rotor_protocol::HostReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let own: u64 = h.errors.iter().map(|(_, n)| n).sum();
    let kinds = h
        .errors
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "served: {}; {} by rotor itself{}",
        count(h.requests, "request", "requests"),
        count(own, "answer", "answers"),
        match kinds.is_empty() {
            true => String::new(),
            false => format!(" ({kinds})"),
        }
    );
    let _ = writeln!(out, "workers: {}", h.workers.len());
    for w in &h.workers {
        let _ = writeln!(
            out,
            "  pid {}: {}; {} open, {} open; {}",
            w.pid,
            match w.listen.is_empty() {
                true => "no listener".to_string(),
                false => w.listen.join(", "),
            },
            count(
                w.connections_open,
                "client connection",
                "client connections"
            ),
            count(w.tunnels_open, "tunnel", "tunnels"),
            count(w.requests, "request", "requests"),
        );
    }
    out
}

/// `unlisted`: entries in rotation the allocator left out (a status too
/// large for one answer).
fn format_status_v2(s: &StatusReportV2, unlisted: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let refreshed = refreshed(s.last_refresh_unix);
    let out_of = s.pool.iter().filter(|e| e.quarantine.is_some()).count();
    // Addresses counted once: what the rotation goes through.
    let addresses: u64 = s.families.iter().map(|f| f.total).sum();
    let _ = writeln!(
        out,
        "pool: {} in rotation ({}, {out_of} out of the rotation), generation {}, {}, {}, up {}s, last refresh {refreshed}",
        count(addresses, "address", "addresses"),
        count(s.pool.len() as u64 + unlisted, "entry", "entries"),
        s.generation,
        count(s.sessions, "sticky session", "sticky sessions"),
        count(s.leases_total, "lease", "leases"),
        s.uptime_secs
    );
    for f in s.families.iter().filter(|f| f.total > 0) {
        let next = f.next.map(|ip| ip.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}: {} in rotation, at {}, next {next}",
            f.family,
            count(f.total, "address", "addresses"),
            f.cursor
        );
    }
    for e in &s.pool {
        let state = match &e.quarantine {
            None => String::new(),
            // Taken out by hand: not checked, back at its end (if any).
            Some(q) if q.reason.starts_with("taken out by hand until released") => {
                format!("  QUARANTINED {}s: {}", q.since_secs, q.reason)
            }
            Some(q) if q.reason.starts_with("taken out by hand") => format!(
                "  QUARANTINED {}s: {} (back in {}s)",
                q.since_secs, q.reason, q.retry_in_secs
            ),
            Some(q) => format!(
                "  QUARANTINED {}s: {} (checked again in {}s)",
                q.since_secs, q.reason, q.retry_in_secs
            ),
        };
        let _ = writeln!(
            out,
            "  {:<40} {:>10} {}{state}",
            e.entry.to_string(),
            e.leases,
            if e.leases == 1 { "lease" } else { "leases" }
        );
    }
    if unlisted > 0 {
        let _ = writeln!(
            out,
            "  ({} in rotation not listed: too many for one answer; /metrics and the pool's sources say what is in it)",
            count(unlisted, "entry", "entries")
        );
    }
    sources_and_peers(&mut out, &s.sources, &s.peers);
    out.trim_end().to_string()
}

/// The password on standard input: its first line, without the newline.
fn read_password() -> Result<String, String> {
    // Typed at a terminal: asked for twice (a typo unseen would set a
    // password nobody knows), and not shown.
    let read = |prompt: &str| {
        let mut line = String::new();
        let echo_off = NoEcho::on_a_terminal();
        let asked = echo_off.is_some();
        if asked {
            eprint!("{prompt}");
        }
        // (ECHONL: the newline typed still shows.)
        let read = std::io::stdin().read_line(&mut line);
        drop(echo_off);
        read.map_err(|e| format!("cannot read the password from standard input: {e}"))?;
        Ok::<_, String>((line.trim_end_matches(['\n', '\r']).to_string(), asked))
    };
    let (pw, asked) = read("password: ")?;
    if pw.is_empty() {
        return Err("empty password (give it on standard input)".into());
    }
    if asked && read("again: ")?.0 != pw {
        return Err("the passwords differ; nothing changed".into());
    }
    Ok(pw)
}

/// Standard input's terminal with echo off, until dropped, and the
/// signal handlers that were in place before.
struct NoEcho(libc::termios, [libc::sighandler_t; 4]);

impl NoEcho {
    fn on_a_terminal() -> Option<NoEcho> {
        // SAFETY: tcgetattr/tcsetattr on descriptor 0 with a termios of
        // our own; a descriptor that is no terminal fails them. The
        // handler is installed only once echo is off, the saved settings
        // set before it.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            t.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            // A Ctrl-C (or a SIGTERM, SIGHUP, SIGQUIT) at the prompt gives
            // the terminal its echo back before it ends the program; a
            // signal ignored before (nohup, trap '' INT) stays ignored.
            let _ = ECHO_SAVED.set(saved);
            let handler = restore_echo_and_die as extern "C" fn(libc::c_int) as libc::sighandler_t;
            let mut before = [libc::SIG_DFL; 4];
            for (i, sig) in STOPPING.into_iter().enumerate() {
                before[i] = libc::signal(sig, handler);
                if before[i] == libc::SIG_IGN {
                    libc::signal(sig, libc::SIG_IGN);
                }
            }
            Some(NoEcho(saved, before))
        }
    }
}

/// The signals that end the program at the password prompt.
const STOPPING: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The terminal's settings before echo went off, for the signal handler.
static ECHO_SAVED: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

/// Restores the terminal, then dies of `sig` as it would have.
extern "C" fn restore_echo_and_die(sig: libc::c_int) {
    // SAFETY: tcsetattr, signal and raise are async-signal-safe; the
    // termios was set before this handler was installed.
    unsafe {
        if let Some(t) = ECHO_SAVED.get() {
            libc::tcsetattr(0, libc::TCSANOW, t);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        // SAFETY: restores what on_a_terminal read, and the handlers it
        // replaced.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
            for (sig, before) in STOPPING.into_iter().zip(self.1) {
                libc::signal(sig, before);
            }
        }
    }
}

fn hash_password() -> ExitCode {
    match read_password() {
        Ok(pw) => match say(&rotor_worker::auth::hash_password(&pw)) {
            true => ExitCode::SUCCESS,
            false => ExitCode::FAILURE,
        },
        Err(e) => {
            say!("rotor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn user(cmd: &UserCmd) -> ExitCode {
    let (name, path, add) = match cmd {
        UserCmd::Add { name, auth_file } => (name, auth_file, true),
        UserCmd::Remove { name, auth_file } => (name, auth_file, false),
    };
    if name.is_empty() || name.contains([':', '\n', '#']) || name.trim() != name {
        say!("rotor: a user name may not be empty or contain ':', '#', spaces at its ends or newlines");
        return ExitCode::from(2);
    }
    // A users file that is a link (to a file other tooling keeps) is
    // written where it leads: renamed over, the link became a file of its
    // own and the file it named stayed as it was.
    let path = &through_link(path);
    let result = (|| -> Result<String, String> {
        // One change at a time: two at once would each write the file as
        // read before the other's, one change lost.
        let _lock =
            lock_dir_of(path).map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        let old = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && add => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut found = false;
        // Read as the workers read it: a byte-order mark dropped, each
        // line trimmed.
        let old = old.strip_prefix('\u{feff}').unwrap_or(&old);
        let mut lines: Vec<String> = old
            .lines()
            .filter(|l| {
                let mine = l.trim().split_once(':').is_some_and(|(u, _)| u == name);
                found |= mine;
                !mine
            })
            .map(str::to_string)
            .collect();
        if add {
            let pw = read_password()?;
            // (Taken: HTTP carries it.)
            if name.len() > 255 || pw.len() > 255 {
                say!("rotor: note: a SOCKS5 client cannot log in as this user: its name or password is over 255 bytes, all RFC 1929 carries (HTTP and TLS clients can)");
            }
            lines.push(format!("{name}:{}", rotor_worker::auth::hash_password(&pw)));
        } else if !found {
            return Err(format!("no user {name} in {}", path.display()));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        write_private(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(match (add, found) {
            (true, true) => format!("password of {name} changed"),
            (true, false) => format!("user {name} added"),
            _ => format!("user {name} removed"),
        })
    })();
    match result {
        Ok(msg) => {
            say!(
                "rotor: {msg} in {}; apply it with `rotor reload` (or `systemctl reload rotor-worker@*`, SIGHUP): running workers read the file again then",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("rotor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The file `path` names: a symbolic link's target (through every link),
/// else `path` itself (a link that leads nowhere too: replaced by the
/// file).
fn through_link(path: &std::path::Path) -> std::path::PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// Holds an exclusive lock on `path`'s directory until dropped.
fn lock_dir_of(path: &std::path::Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let f = std::fs::File::open(dir)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

/// Writes `text` to `path` atomically: a temporary file of its own name,
/// synced, renamed over it, and the directory synced. The file keeps its
/// owner, group and mode (the workers read it as their own user: written
/// by root, a new file would be root's and unreadable to them); a new one
/// takes its directory's group, and is readable by owner and group only.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let was = std::fs::metadata(path).ok();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    // A new file takes its directory's group (/etc/rotor, root:rotor):
    // written by root it would be root's, unreadable to the workers.
    // (Root only: another user may not give a file to a group of another.)
    let dir_gid = path
        .parent()
        .map(|d| match d.as_os_str().is_empty() {
            true => std::path::Path::new("."),
            false => d,
        })
        .filter(|_| nix::unistd::geteuid().is_root())
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.gid());
    let written = (|| {
        let owner = match &was {
            Some(m) => Some((m.uid(), m.gid())),
            None => dir_gid.map(|g| (nix::unistd::geteuid().as_raw(), g)),
        };
        if let Some((uid, gid)) = owner {
            let (uid, gid) = (
                nix::unistd::Uid::from_raw(uid),
                nix::unistd::Gid::from_raw(gid),
            );
            if (uid, gid) != (nix::unistd::geteuid(), nix::unistd::getegid()) {
                nix::unistd::fchown(std::os::fd::AsRawFd::as_raw_fd(&f), Some(uid), Some(gid))
                    .map_err(std::io::Error::from)?;
            }
        }
        let mode = was.as_ref().map_or(0o640, |m| m.mode() & 0o7777);
        nix::sys::stat::fchmod(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::sys::stat::Mode::from_bits_truncate(mode),
        )
        .map_err(std::io::Error::from)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_named_by_an_address_or_a_prefix() {
        let entry = |s: &str| s.parse::<Segment>().unwrap();
        assert_eq!(entry_named("10.0.0.5"), Ok(entry("10.0.0.5")));
        assert_eq!(entry_named("2001:db8:1::/64"), Ok(entry("2001:db8:1::/64")));
        for bad in ["10.0.0.0/33", "example.com", "2001:db8::/x", ""] {
            assert!(entry_named(bad).is_err(), "{bad}");
        }
    }

    /// `--for` takes a second to ten years: `0s` was taken as 1 s, and
    /// past ten years was cut quietly.
    #[test]
    fn quarantine_for_takes_a_second_to_ten_years() {
        use std::time::Duration;
        assert_eq!(quarantine_for("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(quarantine_for("30m"), Ok(Duration::from_secs(1800)));
        assert!(quarantine_for("10y").is_ok());
        for bad in ["0s", "500ms", "11y", "soon"] {
            assert!(quarantine_for(bad).is_err(), "{bad}");
        }
    }
}
