//! Listening sockets handed to the process instead of bound by it: by
//! systemd socket activation (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`),
//! or by `rotor up` (`--listen-fd N`), so that every worker accepts from the
//! one shared socket and a worker that stops loses no queued connection.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Socket, Type};

/// A socket passed in, with the name systemd gave it (`FileDescriptorName=`,
/// default `unknown`).
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("invalid socket-activation environment")]
    Env(#[source] io::Error),
    #[error("file descriptor {fd} ({name}) is not a listening {want} socket")]
    WrongKind {
        fd: RawFd,
        name: String,
        want: &'static str,
    },
    #[error("file descriptor {0} is not open")]
    NotOpen(RawFd),
    #[error("LISTEN_FDS says {count} sockets were passed (descriptors 3 on), but file descriptor {fd} is not open")]
    PassedNotOpen { fd: RawFd, count: i32 },
    #[error("cannot prepare passed socket {0}")]
    Io(RawFd, #[source] io::Error),
}

/// Takes the sockets systemd passed, once, and clears the variables so no
/// child inherits them.
///
/// Must be called before any thread is started (it changes the environment).
pub fn take_systemd() -> Result<Vec<Passed>, ActivationError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(|e| closed_passed().unwrap_or(ActivationError::Env(e)))?
        .collect();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: documented precondition of this function: no other thread
        // exists yet that could read the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    Ok(fds
        .into_iter()
        .map(|(fd, name)| Passed {
            // SAFETY: systemd passed these descriptors to this process for it
            // to own; `listen_fds` checked LISTEN_PID, and they are taken once
            // (the variables are now cleared).
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            name,
        })
        .collect())
}

/// Which descriptor `LISTEN_FDS` counts that is not open, if one is
/// (the error then was only "Bad file descriptor", naming none).
fn closed_passed() -> Option<ActivationError> {
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    (3..3i32.saturating_add(n.clamp(0, 1 << 16)))
        .find(|&fd| nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err())
        .map(|fd| ActivationError::PassedNotOpen { fd, count: n })
}

/// Takes descriptor `fd`, inherited from `rotor up`.
pub fn take_fd(fd: RawFd) -> Result<Passed, ActivationError> {
    if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(ActivationError::NotOpen(fd));
    }
    Ok(Passed {
        // SAFETY: the descriptor is open (checked above) and was passed to
        // this process, by `--listen-fd`, to own.
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        name: format!("fd {fd}"),
    })
}

fn check(
    p: &Passed,
    domain_ok: impl Fn(Domain) -> bool,
    want: &'static str,
) -> Result<Socket, ActivationError> {
    use std::os::fd::AsRawFd;
    let raw = p.fd.as_raw_fd();
    let sock = Socket::from(p.fd.try_clone().map_err(|e| ActivationError::Io(raw, e))?);
    let wrong = || ActivationError::WrongKind {
        fd: raw,
        name: p.name.clone(),
        want,
    };
    let addr = sock.local_addr().map_err(|_| wrong())?;
    let domain = addr.domain();
    if sock.r#type().map_err(|_| wrong())? != Type::STREAM || !domain_ok(domain) {
        return Err(wrong());
    }
    if !sock.is_listener().unwrap_or(false) {
        return Err(wrong());
    }
    sock.set_nonblocking(true)
        .map_err(|e| ActivationError::Io(raw, e))?;
    sock.set_cloexec(true)
        .map_err(|e| ActivationError::Io(raw, e))?;
    Ok(sock)
}

/// The passed socket as a TCP listener.
pub fn tcp_listener(p: &Passed) -> Result<std::net::TcpListener, ActivationError> {
    check(p, |d| d == Domain::IPV4 || d == Domain::IPV6, "TCP").map(Into::into)
}

/// The passed socket as a Unix stream listener.
pub fn unix_listener(p: &Passed) -> Result<std::os::unix::net::UnixListener, ActivationError> {
    check(p, |d| d == Domain::UNIX, "Unix stream")
        .map(|s| std::os::unix::net::UnixListener::from(OwnedFd::from(s)))
}

/// The names a worker serves passed sockets by (`FileDescriptorName=`):
/// HTTP, SOCKS5, HTTP over TLS.
pub const WORKER_NAMES: [&str; 3] = ["proxy", "socks", "tls"];

/// Why a worker cannot serve the sockets systemd passed as their names
/// say, if it cannot: a socket of another name beside named ones (a typo
/// in `FileDescriptorName=`: it was left unserved), or one whose name
/// says TLS or SOCKS without being `tls` or `socks` (`https`, or a unit
/// `rotor-worker-tls.socket` with no `FileDescriptorName=`: it was served
/// as plain HTTP).
pub fn misnamed(passed: &[Passed]) -> Option<String> {
    let known = |p: &Passed| WORKER_NAMES.contains(&p.name.as_str());
    let some_named = passed.iter().any(known);
    let odd = passed.iter().find(|p| {
        let lower = p.name.to_ascii_lowercase();
        let says = ["tls", "ssl", "https", "socks"]
            .iter()
            .any(|w| lower.contains(w));
        !known(p) && (some_named || says)
    })?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&odd.fd);
    Some(format!(
        "the socket systemd passed as `{}` (descriptor {fd}) is of no kind a worker serves: name it (FileDescriptorName=) `proxy` for HTTP, `socks` for SOCKS5 or `tls` for HTTP over TLS",
        odd.name
    ))
}

/// The sockets named `name` if any has that name, else all of them: a unit
/// that passes several kinds names them; one that passes one need not.
pub fn select<'a>(passed: &'a [Passed], name: &str) -> Vec<&'a Passed> {
    if passed.iter().any(|p| p.name == name) {
        passed.iter().filter(|p| p.name == name).collect()
    } else {
        passed.iter().collect()
    }
}
