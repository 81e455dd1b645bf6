//! Where pool addresses come from: literal specs, a file of specs, the
//! addresses on an interface (by name or MAC address), or the host's own
//! global addresses. Sources are re-read on every refresh.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rotor_protocol::Segment;

use crate::metadata::{Metadata, MetadataError};
use crate::spec::{parse_spec, parse_spec_into, SpecError, MAX_READ_ENTRIES};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--pool SPEC`: fixed, expanded once at start.
    List { spec: String, addrs: Vec<Segment> },
    /// `--pool-file PATH`: one spec per line, `#` comments.
    File(PathBuf),
    /// `--interface NAME|MAC`.
    Interface(InterfaceSelector),
    /// The host's own global (not loopback, not link-local) addresses on all
    /// interfaces that reach the internet (see `host_addrs`): the default
    /// when no other source is given.
    HostAddresses,
    /// `--metadata PROVIDER`: the cloud's instance metadata service.
    Metadata(Arc<Metadata>),
    /// `--pool-command CMD`: what a command prints, one SPEC a line, run on
    /// every refresh with a timeout.
    Command { cmd: String, timeout: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSelector {
    Name(String),
    Mac([u8; 6]),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}")]
    Spec {
        path: PathBuf,
        line: usize,
        #[source]
        source: SpecError,
    },
    #[error("{path} was still being written after {waited:?} (replace it by rename: write aside, then `mv`)")]
    Unsettled { path: PathBuf, waited: Duration },
    #[error("cannot list network interfaces")]
    Interfaces(#[source] nix::Error),
    #[error("no interface {0}")]
    NoInterface(String),
    #[error("the metadata service")]
    Metadata(#[from] MetadataError),
    // (A command's errors leave out its text, which may carry a token:
    // the source's name says it where the operator asked for it, as in
    // `rotor status`, and its place only in the log and the metrics.)
    #[error("cannot run the command")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("the command did not finish within {timeout:?}; killed")]
    CommandTimeout { timeout: Duration },
    #[error("the command printed more than {max} bytes; none of it is used (a line cut at the limit could read as another address)", max = COMMAND_OUTPUT_MAX)]
    CommandOutputTooLarge,
    #[error("the command exited, but a process it started in a session of its own (`setsid`, a daemon) still holds its output open; none of it is used: close that process's output (`helper >/dev/null 2>&1`)")]
    CommandOutputHeld,
    #[error("the command failed ({status}){}", match stderr.is_empty() { true => String::new(), false => format!(": {stderr}") })]
    CommandFailed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the command's output, line {line}")]
    CommandSpec {
        line: usize,
        #[source]
        source: SpecError,
    },
}

impl Source {
    /// A `--pool` spec, checked and expanded now so a typo stops the start.
    pub fn list(spec: &str) -> Result<Source, SpecError> {
        Ok(Source::List {
            spec: spec.to_string(),
            addrs: parse_spec(spec)?,
        })
    }

    pub fn interface(arg: &str) -> Source {
        Source::Interface(match parse_mac(arg) {
            Some(mac) => InterfaceSelector::Mac(mac),
            None => InterfaceSelector::Name(arg.to_string()),
        })
    }

    /// How the operator named it, for logs and status.
    pub fn name(&self) -> String {
        match self {
            Source::List { spec, .. } => format!("--pool {spec}"),
            Source::File(p) => format!("--pool-file {}", p.display()),
            Source::Interface(InterfaceSelector::Name(n)) => format!("--interface {n}"),
            Source::Interface(InterfaceSelector::Mac(m)) => {
                format!("--interface {}", format_mac(m))
            }
            Source::HostAddresses => "host addresses".to_string(),
            Source::Metadata(m) => m.name(),
            Source::Command { cmd, .. } => format!("--pool-command {cmd}"),
        }
    }

    /// Its name on the unauthenticated metrics endpoint, `n` (from 1) its
    /// place among the sources: a command is named by its place only (its
    /// text may carry a token, `curl -H 'Authorization: …'`), and a long
    /// list by its place too (a label is no place for a thousand specs).
    pub fn metric_label(&self, n: usize) -> String {
        match self {
            Source::Command { .. } => format!("--pool-command #{n}"),
            Source::List { spec, .. } if spec.len() > 64 => format!("--pool #{n}"),
            _ => self.name(),
        }
    }

    /// Reads the source's current addresses. Blocking (file and netlink
    /// I/O): call from a blocking context.
    pub fn read(&self) -> Result<Vec<Segment>, SourceError> {
        match self {
            Source::List { addrs, .. } => Ok(addrs.clone()),
            Source::File(path) => read_pool_file(path),
            Source::Interface(sel) => Ok(singles(interface_addrs(sel)?)),
            Source::HostAddresses => Ok(singles(host_addrs()?)),
            Source::Metadata(m) => Ok(m.read()?),
            Source::Command { cmd, timeout } => run_pool_command(cmd, *timeout),
        }
    }
}

fn singles(addrs: Vec<IpAddr>) -> Vec<Segment> {
    addrs.into_iter().map(Segment::single).collect()
}

/// How long a pool file must have been left alone before it is taken: a
/// file rewritten in place (`cat > pool.txt`, `echo … >`) is empty, then
/// half-written, for a moment, and a refresh then took an empty or partial
/// pool for a whole `--refresh` interval (every request a 503).
const SETTLE: Duration = Duration::from_millis(300);

/// Waits this many times `SETTLE` (3 s) for a file still changing, before
/// its source is an error (it keeps its last good addresses; the next
/// refresh looks again).
const SETTLE_LOOKS: u32 = 10;

/// An empty file, or one whose last line has no end yet, must have been
/// left alone this many times `SETTLE` (1.8 s): what a slow writer
/// rewriting the file in place (`curl … > pool.txt`) leaves while it
/// waits — the file emptied by the shell, a line cut short (`10.0.0.12`
/// of `10.0.0.123`).
const SETTLE_UNFINISHED: u32 = 6;

/// The largest pool file read (256 MiB: four million IPv6 addresses and
/// their comments).
const POOL_FILE_MAX: u64 = 256 << 20;

pub fn read_pool_file(path: &PathBuf) -> Result<Vec<Segment>, SourceError> {
    let text = read_settled(path, SETTLE, SETTLE_LOOKS)?;
    parse_pool_text(&text).map_err(|(line, source)| SourceError::Spec {
        path: path.clone(),
        line,
        source,
    })
}

/// `path`'s text once the file is settled: the same (size, modification
/// time, inode) before and after the read, and last modified `settle` ago
/// or more (`SETTLE_UNFINISHED` times that if it is empty or its last line
/// has no end; a time in the future counts as settled, so a clock set
/// back does not keep the file out). Blocking: it sleeps while the file
/// is being written. Only a regular file of `POOL_FILE_MAX` at most (a
/// pipe would block the refresh, or read as empty once drained).
fn read_settled(path: &PathBuf, settle: Duration, looks: u32) -> Result<String, SourceError> {
    use std::os::unix::fs::MetadataExt;
    let err = |source| SourceError::Read {
        path: path.clone(),
        source,
    };
    let stamp = |m: &std::fs::Metadata| (m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev());
    // The whole wait, however long each look waits (an unfinished file's
    // longer settle does not stretch it to `looks` times that).
    let started = std::time::Instant::now();
    let budget = settle * looks;
    loop {
        let before = std::fs::metadata(path).map_err(err)?;
        if before.is_dir() {
            return Err(err(std::io::Error::other(
                "a directory, not a file of addresses",
            )));
        }
        if !before.is_file() {
            return Err(err(std::io::Error::other(
                "not a regular file (a pipe or a device: use --pool-command to read one)",
            )));
        }
        if before.len() > POOL_FILE_MAX {
            return Err(err(std::io::Error::other(format!(
                "larger than {} MiB",
                POOL_FILE_MAX >> 20
            ))));
        }
        let text = std::fs::read_to_string(path).map_err(err)?;
        let after = std::fs::metadata(path).map_err(err)?;
        let age = after
            .modified()
            .ok()
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .unwrap_or(settle);
        let need = match text.is_empty() || !text.ends_with('\n') {
            true => settle * SETTLE_UNFINISHED,
            false => settle,
        };
        if stamp(&before) == stamp(&after) && age >= need {
            return Ok(text);
        }
        // (The whole wait, not a count of looks: a writer that changes
        // the file every few tenths of a second had it given up early.)
        let left = budget.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(need.saturating_sub(age).max(settle / 6).min(left));
    }
    Err(SourceError::Unsettled {
        path: path.clone(),
        waited: Duration::from_millis(started.elapsed().as_millis() as u64),
    })
}

/// Runs `cmd` with `sh -c`, at most `timeout`, and reads its output as a
/// pool file. A command that fails, hangs or prints a bad line is an error
/// (the source keeps its last good addresses).
pub fn run_pool_command(cmd: &str, timeout: Duration) -> Result<Vec<Segment>, SourceError> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: whatever it starts goes with it.
        .process_group(0)
        .spawn()
        .map_err(|source| SourceError::Spawn { source })?;
    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
    // Ended with the allocator if it is still running at the stop.
    let _running = Running::enter(group);
    // Read while it runs, so a long output cannot fill the pipe and stall
    // it; what is past the limits is read and dropped.
    // Whether anything was dropped, beside the text.
    // Sent when the output ends; a process that left the group (its own
    // session) can hold it open past the kill, and is not waited for.
    fn drain(
        mut from: impl Read + Send + 'static,
        keep: usize,
    ) -> std::sync::mpsc::Receiver<(String, bool)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut dropped = false;
            let mut buf = [0u8; 8192];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = keep.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                dropped |= n > room;
            }
            // (moved, not copied, when it is UTF-8: up to 16 MiB)
            let text = match String::from_utf8(kept) {
                Ok(text) => text,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            let _ = tx.send((text, dropped));
        });
        rx
    }
    // How long the output may stay open once the group is gone.
    const HELD: Duration = Duration::from_secs(1);
    let out = drain(child.stdout.take().expect("piped"), COMMAND_OUTPUT_MAX);
    let err = drain(child.stderr.take().expect("piped"), 64 << 10);
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => break None,
        }
    };
    // Anything it left running (holding the pipes open) goes now, so the
    // readers end.
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let Some(status) = status else {
        let _ = child.wait();
        return Err(SourceError::CommandTimeout { timeout });
    };
    let Ok((text, cut)) = out.recv_timeout(HELD) else {
        return Err(SourceError::CommandOutputHeld);
    };
    let (stderr, _) = err.recv_timeout(HELD).unwrap_or_default();
    if !status.success() {
        // Its first line, escaped: often a remote API's error body, whose
        // control bytes must not drive the operator's terminal.
        let first = stderr.lines().next().unwrap_or("").to_string();
        return Err(SourceError::CommandFailed {
            status,
            stderr: crate::shown(first, 1024),
        });
    }
    if cut {
        return Err(SourceError::CommandOutputTooLarge);
    }
    parse_pool_text(&text).map_err(|(line, source)| SourceError::CommandSpec { line, source })
}

/// The process groups of the pool commands running now; `None` once the
/// allocator stops ([`end_commands`]).
static RUNNING: std::sync::Mutex<Option<Vec<nix::unistd::Pid>>> =
    std::sync::Mutex::new(Some(Vec::new()));

/// A pool command's process group, in [`RUNNING`] while it runs.
struct Running(nix::unistd::Pid);

impl Running {
    /// Listed in [`RUNNING`]; killed at once if the allocator has stopped
    /// (a refresh's blocking read may start a command just after).
    fn enter(group: nix::unistd::Pid) -> Running {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        match running.as_mut() {
            Some(list) => list.push(group),
            None => {
                let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            }
        }
        Running(group)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = running.as_mut() {
            list.retain(|g| *g != self.0);
        }
    }
}

/// Kills the pool commands still running, and any started from now on:
/// called once the allocator has stopped. A stop does not wait for a
/// refresh, and the blocking read that waited for a command's timeout is
/// dropped with the runtime, so nothing else would end a command still
/// running (it went on until it ended by itself, outside any supervision
/// but systemd's control group).
pub fn end_commands() {
    let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    for group in running.take().unwrap_or_default() {
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    }
}

/// What a pool command may print (16 MiB: a million addresses, one a line).
pub const COMMAND_OUTPUT_MAX: usize = 16 << 20;

/// One spec per line; `#` starts a comment; blank lines are skipped.
pub fn parse_pool_text(text: &str) -> Result<Vec<Segment>, (usize, SpecError)> {
    // (A byte-order mark some editors write is no part of the first line.)
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        parse_spec_into(line, &mut out, MAX_READ_ENTRIES).map_err(|e| (n + 1, e))?;
    }
    Ok(out)
}

/// A MAC address as `02:fc:00:00:00:01`, `02-FC-00-00-00-01` or (as
/// Azure writes them) `02FC00000001`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let s = s.trim();
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut m = [0u8; 6];
        for (i, b) in m.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        return Some(m);
    }
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Addresses that can serve as a source: not link-local (they need a scope
/// to bind), multicast or unspecified.
fn bindable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast(),
        IpAddr::V6(v6) => {
            !v6.is_unspecified() && !v6.is_multicast() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

fn global(ip: &IpAddr) -> bool {
    bindable(ip)
        && !ip.is_loopback()
        && match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(_) => true,
        }
}

pub(crate) struct IfAddr {
    pub name: String,
    pub ip: Option<IpAddr>,
    mac: Option<[u8; 6]>,
}

pub(crate) fn list_interfaces() -> Result<Vec<IfAddr>, SourceError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(SourceError::Interfaces)?;
    Ok(addrs
        .map(|a| {
            let (ip, mac) = match &a.address {
                Some(sa) => (
                    sa.as_sockaddr_in()
                        .map(|s| IpAddr::V4(s.ip()))
                        .or_else(|| sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip()))),
                    sa.as_link_addr().and_then(|l| l.addr()),
                ),
                None => (None, None),
            };
            IfAddr {
                name: a.interface_name,
                ip,
                mac,
            }
        })
        .collect())
}

fn interface_addrs(sel: &InterfaceSelector) -> Result<Vec<IpAddr>, SourceError> {
    let all = list_interfaces()?;
    // An IPv4 address added with a label (`eth0:1`, as ifupdown's aliases
    // and keepalived add failover addresses) is listed under the label:
    // it is the interface's all the same (a name holds no `:`). A label
    // asked for by name is that label's alone.
    let of = |listed: &str, name: &str| match name.contains(':') {
        true => listed == name,
        false => listed.split(':').next() == Some(name),
    };
    let names: Vec<&str> = match sel {
        InterfaceSelector::Name(n) => all
            .iter()
            .filter(|a| of(&a.name, n))
            .map(|_| n.as_str())
            .take(1)
            .collect(),
        InterfaceSelector::Mac(m) => all
            .iter()
            .filter(|a| a.mac.as_ref() == Some(m))
            .map(|a| a.name.as_str())
            .collect(),
    };
    if names.is_empty() {
        let what = match sel {
            InterfaceSelector::Name(n) => format!("named {n}"),
            InterfaceSelector::Mac(m) => format!("with MAC address {}", format_mac(m)),
        };
        return Err(SourceError::NoInterface(what));
    }
    let addrs: Vec<IpAddr> = all
        .iter()
        .filter(|a| names.iter().any(|n| of(&a.name, n)))
        .filter_map(|a| a.ip)
        .filter(bindable)
        .filter(|ip| !matches!(ip, IpAddr::V4(v4) if v4.is_link_local()))
        .collect();
    Ok(without_loopback_beside_others(preferred(addrs)))
}

/// Leaves out the IPv6 addresses this host holds but does not take for a
/// new connection: those deprecated as their lifetime runs out (a SLAAC
/// privacy address a day old, the old prefix of a network being
/// renumbered), which the kernel's own source selection avoids (RFC 6724
/// rule 3, RFC 4862 §5.5.4) and which go at the end of their valid
/// lifetime; and those not usable yet or at all (tentative, in duplicate
/// address detection, or having failed it). They come back at the
/// refresh after they are preferred again. A permanent address made
/// deprecated (`preferred_lft 0`, as keepalived adds its IPv6 virtual
/// addresses, to keep them out of the host's default source choice) is
/// kept: it stays, and binds.
fn preferred(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    if !addrs.iter().any(IpAddr::is_ipv6) {
        return addrs;
    }
    let unpreferred = Unpreferred::now();
    addrs
        .into_iter()
        .filter(|ip| !unpreferred.holds(ip))
        .collect()
}

/// This host's IPv6 addresses [`preferred`] leaves out, as read now.
struct Unpreferred(std::collections::HashSet<std::net::Ipv6Addr>);

impl Unpreferred {
    fn now() -> Unpreferred {
        // (No IPv6 on the host: no file, and nothing to leave out.)
        let text = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        Unpreferred(unpreferred_v6(&text))
    }

    fn holds(&self, ip: &IpAddr) -> bool {
        let out = matches!(ip, IpAddr::V6(v6) if self.0.contains(v6));
        if out {
            tracing::debug!(%ip, "left out: deprecated as its lifetime runs out, tentative, or failed duplicate address detection");
        }
        out
    }
}

/// The addresses `/proc/net/if_inet6` lists as deprecated and not
/// permanent, tentative or failed duplicate address detection (its fifth
/// column: the address's flags, in hex).
fn unpreferred_v6(text: &str) -> std::collections::HashSet<std::net::Ipv6Addr> {
    // linux/if_addr.h
    const IFA_F_DADFAILED: u32 = 0x08;
    const IFA_F_DEPRECATED: u32 = 0x20;
    const IFA_F_TENTATIVE: u32 = 0x40;
    const IFA_F_PERMANENT: u32 = 0x80;
    text.lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let addr = u128::from_str_radix(cols.next()?, 16).ok()?;
            let flags = u32::from_str_radix(cols.nth(3)?, 16).ok()?;
            let aging = flags & IFA_F_DEPRECATED != 0 && flags & IFA_F_PERMANENT == 0;
            let unusable = flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE) != 0;
            (aging || unusable).then(|| std::net::Ipv6Addr::from(addr))
        })
        .collect()
}

/// An interface's loopback addresses (127.0.0.0/8, ::1) are left out when
/// it has others: `--interface lo` on a host with a routed block on lo
/// means that block, and a lease of 127.0.0.1 or ::1 for a destination
/// elsewhere fails at every connect. An interface with loopback addresses
/// only (lo on a host with no block on it) keeps them: a test set-up.
fn without_loopback_beside_others(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    match addrs.iter().all(IpAddr::is_loopback) {
        true => addrs,
        false => addrs.into_iter().filter(|ip| !ip.is_loopback()).collect(),
    }
}

/// The host's global addresses that can reach the internet: those the
/// host routes the internet from through their own interface (eth0's, its
/// secondary ones, a full-tunnel VPN's, an uplink that source routing
/// picks for them), and those on the loopback interface (the addresses of
/// a block routed to the host, put there). A bridge's (docker0, br-…,
/// virbr0) or a split-tunnel VPN's address is left out: a request bound to
/// it leaves through another interface, where it is dropped or masqueraded
/// to that interface's address, so the pool would count addresses
/// destinations never see. When the host routes the internet from none of
/// them (no default route), every global address is kept, as the
/// destinations reachable at all are local ones.
fn host_addrs() -> Result<Vec<IpAddr>, SourceError> {
    // (Before the choices below: an address left out is no global
    // IPv6 address beside a ULA, and routes no internet.)
    let unpreferred = Unpreferred::now();
    let all: Vec<(String, IpAddr)> = list_interfaces()?
        .into_iter()
        .filter_map(|a| Some((a.name, a.ip?)))
        .filter(|(_, ip)| global(ip) && !unpreferred.holds(ip))
        .collect();
    // By index: an address added with a label (`lo:0`, as LVS and
    // ifconfig do) is listed under it, and the kernel strips it.
    let index = |name: &str| nix::net::if_::if_nametoindex(name).ok();
    let lo = index("lo");
    let own: Vec<Option<bool>> = all
        .iter()
        .map(|(name, ip)| {
            let index = index(name)?;
            if Some(index) == lo {
                return Some(true);
            }
            let out = crate::usable::egress_interface(*ip, crate::usable::internet(*ip)).ok()??;
            Some(out == index)
        })
        .collect();
    let routed = all
        .iter()
        .zip(&own)
        .any(|((name, _), own)| *own == Some(true) && index(name) != lo);
    Ok(match routed {
        false => all.into_iter().map(|(_, ip)| ip).collect(),
        true => without_ula_beside_global(
            all.into_iter()
                .zip(own)
                .filter(|(_, own)| *own != Some(false))
                .map(|((_, ip), _)| ip)
                .collect(),
        ),
    })
}

/// Unique local IPv6 addresses (fc00::/7) are left out beside global ones
/// on a host that routes the internet: on a network that hands out both,
/// the ULA reaches only the site, and the requests leased it toward the
/// internet would time out. A host whose IPv6 addresses are all ULAs keeps
/// them (its IPv6 leaves through NAT66).
fn without_ula_beside_global(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let ula = |ip: &IpAddr| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xfe00 == 0xfc00);
    let global_v6 = addrs.iter().any(|ip| ip.is_ipv6() && !ula(ip));
    match global_v6 {
        true => addrs.into_iter().filter(|ip| !ula(ip)).collect(),
        false => addrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulas_go_only_beside_global_ipv6() {
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
        let alone = ips(&["10.0.0.2", "fd00:5::2", "fc01::1"]);
        assert_eq!(without_ula_beside_global(alone.clone()), alone);
        assert_eq!(
            without_ula_beside_global(ips(&["10.0.0.2", "fd00:5::2", "2001:db8:5::2", "fc01::1"])),
            ips(&["10.0.0.2", "2001:db8:5::2"])
        );
    }

    #[test]
    fn deprecated_tentative_and_failed_ipv6_addresses_are_found() {
        // As the kernel writes it: address, index, prefix length, scope,
        // flags (permanent 0x80, nodad 0x02, deprecated 0x20, tentative
        // 0x40, dadfailed 0x08), name. A permanent one deprecated by hand
        // (keepalived's) stays.
        let text = "\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000007 02 40 00 80     eth0
20010db8000000000000000000000008 02 40 00 a0     eth0
20010db8000000000000000000000009 02 40 00 01     eth0
2001db80000000000000000000000010 02 40 00 c0     eth0
2001db80000000000000000000000011 02 40 00 48     eth0
2001db80000000000000000000000012 02 40 00 20     eth0
2001db80000000000000000000000013 02 40 00 21     eth0
20010db800000000000000000000000a 02 40 00 02     eth0
garbage
";
        let mut found: Vec<String> = unpreferred_v6(text).iter().map(|a| a.to_string()).collect();
        found.sort();
        assert_eq!(
            found,
            [
                "2001:db80::10",
                "2001:db80::11",
                "2001:db80::12",
                "2001:db80::13"
            ]
        );
    }

    #[test]
    fn loopback_addresses_go_only_beside_others() {
        let ips = |v: &[&str]| -> Vec<IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
        assert_eq!(
            without_loopback_beside_others(ips(&["127.0.0.1", "::1"])),
            ips(&["127.0.0.1", "::1"])
        );
        assert_eq!(
            without_loopback_beside_others(ips(&[
                "127.0.0.1",
                "203.0.113.7",
                "::1",
                "2001:db8::7"
            ])),
            ips(&["203.0.113.7", "2001:db8::7"])
        );
    }

    /// A thread appending `piece` to a file every `every`, until stopped.
    struct Appending {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Appending {
        fn start(path: &std::path::Path, piece: &'static str, every: Duration) -> Appending {
            use std::io::Write;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    f.write_all(piece.as_bytes()).unwrap();
                    std::thread::sleep(every);
                }
            });
            Appending { stop, thread }
        }

        fn stop(self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            self.thread.join().unwrap();
        }
    }

    /// A pool file rewritten in place is read once it is whole, never
    /// empty or cut; one that keeps changing is an error, and one dated in
    /// the future is read at once.
    #[test]
    fn a_pool_file_is_read_once_it_is_left_alone() {
        use std::io::Write;
        use std::time::{Instant, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.txt");
        let lines: String = (2..=9).map(|i| format!("127.0.0.{i}\n")).collect();
        std::fs::write(&path, "10.0.0.1\n").unwrap();
        // Rewritten in place, a line every 30 ms (truncated first).
        let writer = {
            let (path, lines) = (path.clone(), lines.clone());
            std::thread::spawn(move || {
                let mut f = std::fs::File::create(&path).unwrap();
                for line in lines.lines() {
                    std::thread::sleep(Duration::from_millis(30));
                    writeln!(f, "{line}").unwrap();
                }
            })
        };
        std::thread::sleep(Duration::from_millis(10));
        let read = read_settled(&path, Duration::from_millis(150), 20).unwrap();
        writer.join().unwrap();
        assert_eq!(read, lines, "read while it was written");
        // Still changing after every look: an error.
        let writer = Appending::start(&path, "127.0.0.2\n", Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(50));
        let err = read_settled(&path, Duration::from_millis(100), 3).unwrap_err();
        writer.stop();
        assert!(matches!(err, SourceError::Unsettled { .. }), "{err}");
        assert!(err.to_string().contains("mv"), "{err}");
        // Dated in the future (a clock set back): read at once.
        std::fs::write(&path, "127.0.0.2\n").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        let t = Instant::now();
        assert_eq!(
            read_settled(&path, Duration::from_secs(5), 3).unwrap(),
            "127.0.0.2\n"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    /// An empty file, or one whose last line has no end, waits six times
    /// as long to settle (a slow writer rewriting it in place); a pipe is
    /// refused, not read (it would block, or read as empty once drained).
    #[test]
    fn unfinished_files_settle_longer_and_pipes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.txt");
        let settle = Duration::from_millis(100);
        for (text, longer) in [("", true), ("127.0.0.1", true), ("127.0.0.12\n", false)] {
            std::fs::write(&path, text).unwrap();
            let t = std::time::Instant::now();
            assert_eq!(read_settled(&path, settle, 10).unwrap(), text);
            let took = t.elapsed();
            match longer {
                // (counted from the file's time, a moment before `t`)
                true => assert!(
                    took >= settle * (SETTLE_UNFINISHED - 1),
                    "{text:?}: {took:?}"
                ),
                false => assert!(took < settle * 3, "{text:?}: {took:?}"),
            }
        }
        // A line that keeps growing: given up within the whole wait (10
        // looks of 100 ms), not 10 times the longer settle.
        std::fs::write(&path, "127.0.0.").unwrap();
        let writer = Appending::start(&path, "1", Duration::from_millis(50));
        let t = std::time::Instant::now();
        let err = read_settled(&path, settle, 10).unwrap_err();
        let took = t.elapsed();
        writer.stop();
        assert!(matches!(err, SourceError::Unsettled { .. }), "{err}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        // Whole lines written every 60 ms (each look waits less than the
        // settle): waited for the whole wait, not given up after 10 looks.
        std::fs::write(&path, "127.0.0.1\n").unwrap();
        let writer = Appending::start(&path, "127.0.0.2\n", Duration::from_millis(60));
        let t = std::time::Instant::now();
        let err = read_settled(&path, settle, 10).unwrap_err();
        let took = t.elapsed();
        writer.stop();
        assert!(matches!(err, SourceError::Unsettled { .. }), "{err}");
        assert!(took >= Duration::from_millis(950), "{took:?}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_settled(&fifo, settle, 10).unwrap_err();
        let text = rotor_protocol::error_chain(&err);
        assert!(text.contains("not a regular file"), "{text}");
        // A directory is said to be one (it was called a pipe or a device).
        let err = read_settled(&dir.path().to_path_buf(), settle, 10).unwrap_err();
        let text = rotor_protocol::error_chain(&err);
        assert!(text.contains("a directory"), "{text}");
    }

    #[test]
    fn pool_text_with_comments_and_blank_lines() {
        let text = "# office\n127.0.0.2-127.0.0.3  # two\n\n   \n::1\n";
        let addrs = parse_pool_text(text).unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(parse_pool_text("\u{feff}127.0.0.2\n").unwrap().len(), 1);
        let err = parse_pool_text("127.0.0.1\nbogus\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(parse_pool_text("# nothing\n").unwrap().is_empty());
    }

    /// A list that expands past `MAX_READ_ENTRIES` (a /16 repeated) is an
    /// error at the line that passed it, not that many entries in memory.
    #[test]
    fn a_list_expanding_past_the_limit_is_an_error() {
        let per_line = 1usize << 16;
        let lines = MAX_READ_ENTRIES / per_line + 1;
        let text = "127.1.0.0/16\n".repeat(lines + 100);
        match parse_pool_text(&text) {
            Err((line, SpecError::TooManyEntries)) => assert_eq!(line, lines),
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        // One line of many: stopped in the line.
        let one_line = vec!["127.1.0.0/16"; lines + 100].join(",");
        match parse_pool_text(&one_line) {
            Err((1, SpecError::TooManyEntries)) => {}
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        assert_eq!(
            parse_pool_text(&"127.1.0.0/16\n".repeat(lines - 1))
                .unwrap()
                .len(),
            (lines - 1) * per_line
        );
    }

    #[test]
    fn pool_commands_print_specs_and_fail_clearly() {
        let t = Duration::from_secs(5);
        let got = run_pool_command("printf '127.0.0.2\\n# c\\n127.0.0.3-127.0.0.4\\n'", t).unwrap();
        assert_eq!(got.len(), 3);
        let err = run_pool_command("echo nope >&2; exit 3", t).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        // Its stderr's control bytes escaped (a terminal's escape
        // sequence, from a remote API's error body).
        let err = run_pool_command("printf 'err\\033[2Jline\\n' >&2; exit 3", t).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("err\\u{1b}[2Jline") && !text.contains('\u{1b}'),
            "{text}"
        );
        let err = run_pool_command("exit 3", t).unwrap_err();
        assert!(err.to_string().ends_with("(exit status: 3)"), "{err}");
        let err = run_pool_command("echo bogus", t).unwrap_err();
        assert!(rotor_protocol::error_chain(&err).contains("bogus"), "{err}");
        let started = std::time::Instant::now();
        let err = run_pool_command("sleep 10", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, SourceError::CommandTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Something it leaves behind holding its output open does not hold
        // the refresh; a chatty one is not cut short.
        let started = std::time::Instant::now();
        let got = run_pool_command("sleep 30 & echo 127.0.0.2", t).unwrap();
        assert_eq!(got.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        // One that left the group (a session of its own) survives the
        // kill: its holding the output open is an error, not a refresh
        // that never ends (nor one that times out).
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        // (It has left the group once it wrote its pid: under load, the
        // command's end could otherwise come first, and the group's kill
        // take it too.)
        let cmd = format!(
            "setsid sh -c 'echo $$ > {p}; exec sleep 30' & \
             while [ ! -s {p} ]; do sleep 0.01; done; echo 127.0.0.2",
            p = pid.display()
        );
        let started = std::time::Instant::now();
        let err = run_pool_command(&cmd, t).unwrap_err();
        assert!(matches!(err, SourceError::CommandOutputHeld), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
        if let Ok(n) = std::fs::read_to_string(&pid).map(|p| p.trim().parse::<i32>()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(n.unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let got = run_pool_command(
            "head -c 200000 /dev/zero | tr '\\0' '#' >&2; echo 127.0.0.2",
            t,
        )
        .unwrap();
        assert_eq!(got.len(), 1);
        // Past the limit on what it prints: an error, nothing half read.
        let err = run_pool_command(
            "head -c 17000000 /dev/zero | tr '\\0' '#'; echo; echo 127.0.0.2",
            t,
        )
        .unwrap_err();
        assert!(matches!(err, SourceError::CommandOutputTooLarge), "{err}");
    }

    #[test]
    fn metric_labels_name_no_command_text() {
        let cmd = Source::Command {
            cmd: "curl -H 'Authorization: Bearer s3cret' https://ipam/".into(),
            timeout: Duration::from_secs(1),
        };
        assert_eq!(cmd.metric_label(2), "--pool-command #2");
        let short = Source::list("127.0.0.2-127.0.0.9").unwrap();
        assert_eq!(short.metric_label(1), "--pool 127.0.0.2-127.0.0.9");
        let long = Source::list(&vec!["127.0.0.2"; 20].join(",")).unwrap();
        assert_eq!(long.metric_label(3), "--pool #3");
        // Nor do its errors (logged by its place): what it says on
        // stderr is its own.
        let t = Duration::from_secs(5);
        for cmd in [
            "echo 'TOKEN=s3cret' >/dev/null; echo why >&2; exit 3",
            "echo not-an-address # TOKEN=s3cret",
        ] {
            let err = rotor_protocol::error_chain(&run_pool_command(cmd, t).unwrap_err());
            assert!(!err.contains("s3cret"), "{err}");
            assert!(err.starts_with("the command"), "{err}");
        }
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("02:fc:00:00:00:01"),
            Some([0x02, 0xfc, 0, 0, 0, 1])
        );
        assert_eq!(parse_mac("02-FC-00-00-00-0a"), Some([2, 0xfc, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02FC0000000A"), Some([2, 0xfc, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02FC0000000"), None);
        assert_eq!(parse_mac("eth0"), None);
        assert_eq!(parse_mac("02:fc:00:00:00"), None);
        assert_eq!(parse_mac("02:fc:00:00:00:1"), None);
    }

    #[test]
    fn loopback_interface_by_name_and_missing_interface() {
        let lo = Source::interface("lo").read().unwrap();
        assert!(
            lo.contains(&Segment::single("127.0.0.1".parse().unwrap())),
            "{lo:?}"
        );
        let err = Source::interface("rotor-no-such0").read().unwrap_err();
        assert!(err.to_string().contains("rotor-no-such0"), "{err}");
    }

    #[test]
    fn host_addresses_exclude_loopback_and_link_local() {
        for e in Source::HostAddresses.read().unwrap() {
            assert!(e.is_single() && global(&e.base()), "{e}");
        }
        assert!(!global(&"127.0.0.1".parse().unwrap()));
        assert!(!global(&"fe80::1".parse().unwrap()));
        assert!(!global(&"169.254.1.1".parse().unwrap()));
        assert!(global(&"192.0.2.2".parse().unwrap()));
    }
}
