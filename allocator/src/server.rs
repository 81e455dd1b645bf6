//! The lease server: accepts worker and control connections on the Unix
//! socket, runs the refresh loop, and answers requests in order.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rotor_protocol::clock::Standing;
use rotor_protocol::{
    error_chain, server_handshake, Channel, ChannelError, ClientFrame, Envelope, Family,
    HandshakeError, Hello, HelloReply, LeaseTable, ReloadReport, ReloadReportV2, Request, Response,
    Role, Segment, ServerChannel, ServerFrame, StatusReport, TableError, REPORT_TEXT_MAX,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::access::{Access, AccessError, Rights};
use crate::persist::{PersistError, Saved, StateFile};
use crate::pool::TableHome;
use crate::source::Source;
use crate::state::{Allocator, RefreshOutcome};

/// A peer must say Hello this fast, or it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A peer that does not read its replies for this long is dropped, so it
/// cannot pin memory or a task.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to send the rest of a frame it began.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    pub sources: Vec<Source>,
    pub refresh: Duration,
    /// Where the rotation state is kept across restarts; `None`: nowhere.
    pub state_dir: Option<PathBuf>,
    /// `state_dir` was given, not the default: if it cannot be used, the
    /// allocator does not start (it ran without, with a warning: every
    /// restart then started the rotation, sessions and quarantines by
    /// hand over).
    pub state_required: bool,
    /// Who may connect.
    pub access: Access,
    /// Sticky sessions held at most.
    pub max_sessions: usize,
    /// … of which one user holds at most.
    pub max_sessions_per_user: usize,
    /// Per-site budgets.
    pub site_rules: crate::sites::Rules,
    /// Sites and (address, site) pairs held at most.
    pub max_site_entries: usize,
    /// The first time out of an entry whose connects fail while its
    /// family's others connect (`reach`); zero: none is taken out.
    pub unreachable_quarantine: Duration,
    /// How often sessions and site state are written while they change
    /// (zero: only at a clean stop).
    pub checkpoint: Duration,
    /// Connections to the socket served at once; past it one is refused.
    pub max_peers: usize,
    /// Where `GET /metrics` is served (Prometheus), if anywhere.
    pub metrics: Option<Arc<std::net::TcpListener>>,
    /// Pool entries with series of their own; past it, `other`.
    pub metrics_max_sources: usize,
    /// The admin API's bearer token (on the metrics listener), read
    /// again at each reload; none: off.
    pub admin_token: Option<Arc<crate::metrics::AdminToken>>,
    /// Cancelled when the `rotor up` that started this allocator is gone
    /// (killed outright): the allocator serves its workers' drain (they
    /// were told to stop too), and stops once none is connected.
    pub orphaned: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] PersistError),
    #[error(transparent)]
    Table(TableError),
}

/// How often the allocator tells systemd how it is doing (`STATUS=`).
const STATUS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create the socket directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("an allocator is already serving {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket ({1}): not replaced; is --socket (or ROTOR_SOCKET, or the configuration's socket) the path meant?")]
    NotASocket(PathBuf, &'static str),
    #[error("the socket path {0} is {1} bytes long; a Unix socket's path takes at most {SOCKET_PATH_MAX}: give --socket a shorter one")]
    TooLong(PathBuf, usize),
    #[error("this user (uid {1}) may not create files in {0}, so not the socket there: give --socket a directory rotor's user owns (e.g. /run/rotor, which the unit's RuntimeDirectory= makes)")]
    Unwritable(PathBuf, u32),
    #[error("the socket directory {0} is world-writable: put the socket where only rotor's user can write (e.g. /run/rotor)")]
    WorldWritable(PathBuf),
    #[error("the socket directory {0} belongs to uid {1}, not to this user or root: its owner could replace the socket (e.g. a /tmp/rotor-UID made by another user); remove it, or give --socket elsewhere")]
    ForeignDir(PathBuf, u32),
    #[error("the socket directory {0} is a symbolic link of uid {1}: its owner could point it elsewhere; give --socket in a real directory")]
    LinkedDir(PathBuf, u32),
    #[error("cannot bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Binds the allocator's socket with the mode and group of `access`. A
/// socket file left by a dead allocator is replaced; one a live allocator
/// answers on is not.
pub fn bind_socket(path: &Path, access: &Access) -> Result<UnixListener, BindError> {
    let listener = bind_path(path)?;
    access.apply(path)?;
    Ok(listener)
}

/// Makes the directory of socket `path` (0755) if it is missing, and
/// checks it is one only this user (or root) can change: what
/// `bind_socket` checks first, for `rotor up` to refuse at once (exit 2)
/// a directory its allocator would refuse at every start.
pub fn socket_dir(path: &Path) -> Result<(), BindError> {
    fits(path)?;
    if let Some(dir) = socket_parent(path) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| BindError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        dir_is_ours(dir)?;
        writable(dir)?;
    }
    socket_or_nothing(path)
}

/// As `socket_dir`, making nothing (`--check`): a directory that is not
/// there yet passes if it can be made (the nearest one there is writable).
pub fn socket_dir_unmade(path: &Path) -> Result<(), BindError> {
    fits(path)?;
    let there = |d: &Path| std::fs::symlink_metadata(d).is_ok();
    match socket_parent(path) {
        Some(dir) if there(dir) => {
            dir_is_ours(dir)?;
            writable(dir)?;
        }
        Some(dir) => {
            // (A relative path's ancestors end at "": the working
            // directory's.)
            let mut above = dir.ancestors().skip(1).map(here_if_empty);
            if let Some(above) = above.find(|d| there(d)) {
                writable(above).map_err(|_| BindError::Dir {
                    path: dir.to_path_buf(),
                    source: io::Error::from(io::ErrorKind::PermissionDenied),
                })?;
            }
        }
        None => {}
    }
    socket_or_nothing(path)
}

/// Whether this process may create the socket in `dir` (`--check` passed
/// a root-owned 0755 directory for an allocator run as another user,
/// which then failed at each start: review as).
fn writable(dir: &Path) -> Result<(), BindError> {
    use nix::unistd::AccessFlags;
    // As this process would create it: its effective ids and capabilities
    // (a plain access(2) asks as the real uid, and refused a process with
    // CAP_DAC_OVERRIDE: review au).
    let asked = nix::unistd::faccessat(
        None,
        dir,
        AccessFlags::W_OK | AccessFlags::X_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    );
    match asked {
        Ok(()) => Ok(()),
        Err(_) => Err(BindError::Unwritable(
            dir.to_path_buf(),
            nix::unistd::Uid::effective().as_raw(),
        )),
    }
}

/// The longest path a Unix socket takes (`sun_path`'s 108 bytes, less
/// its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Whether `path` fits a Unix socket's address: a longer one passed the
/// checks, and the allocator then failed at each start.
fn fits(path: &Path) -> Result<(), BindError> {
    match path.as_os_str().len() {
        n if n > SOCKET_PATH_MAX => Err(BindError::TooLong(path.to_path_buf(), n)),
        _ => Ok(()),
    }
}

/// The directory of socket `path` (a bare name's is the working
/// directory, checked as any other).
fn socket_parent(path: &Path) -> Option<&Path> {
    path.parent().map(here_if_empty)
}

/// `dir`, or the working directory for the empty path a relative path's
/// parent ends at.
fn here_if_empty(dir: &Path) -> &Path {
    match dir.as_os_str().is_empty() {
        true => Path::new("."),
        false => dir,
    }
}

/// Whether `dir` is one only this user (or root) can change.
fn dir_is_ours(dir: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Anyone could replace or pre-create the socket in a world-writable
    // directory (such as /tmp) and take the workers' leases.
    // Nor may another user own it (a /tmp/rotor-UID made first by
    // someone else).
    // A link another user made (in /tmp) could be pointed elsewhere
    // after the check; root's (/var/run) or our own could not.
    let me = nix::unistd::Uid::effective().as_raw();
    let dir_error = |source| BindError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let link = std::fs::symlink_metadata(dir).map_err(dir_error)?;
    if link.file_type().is_symlink() && link.uid() != me && link.uid() != 0 {
        return Err(BindError::LinkedDir(dir.to_path_buf(), link.uid()));
    }
    let meta = std::fs::metadata(dir).map_err(dir_error)?;
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(BindError::WorldWritable(dir.to_path_buf()));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(BindError::ForeignDir(dir.to_path_buf(), meta.uid()));
    }
    Ok(())
}

/// Whether a process listens on the socket at `path`, asked without
/// waiting: a listener whose queue is full (a stopped or hung allocator's)
/// is one (EAGAIN). A blocking connect to it waited for ever, on the
/// allocator's one thread.
pub fn listened_on(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let Ok(fd) = socket(AddressFamily::Unix, SockType::Stream, flags, None) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => true,
        Err(e) => matches!(
            e,
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS
        ),
    }
}

/// What is at `path`, if it is there and is not a socket (a file, a
/// directory…): never replaced. A stale socket was removed whatever the
/// path held, and `--socket` given a configuration file's path (or
/// `/etc/passwd`) deleted it.
pub fn not_a_socket(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::symlink_metadata(path).ok()?.file_type();
    match () {
        _ if t.is_socket() => None,
        _ if t.is_dir() => Some("a directory"),
        _ if t.is_symlink() => Some("a symbolic link"),
        _ if t.is_file() => Some("a regular file"),
        _ => Some("a device or a pipe"),
    }
}

/// `Ok` if `path` holds a socket or nothing, else the refusal that names
/// what it holds (see [`not_a_socket`]).
fn socket_or_nothing(path: &Path) -> Result<(), BindError> {
    match not_a_socket(path) {
        Some(what) => Err(BindError::NotASocket(path.to_path_buf(), what)),
        None => Ok(()),
    }
}

fn bind_path(path: &Path) -> Result<UnixListener, BindError> {
    socket_dir(path)?;
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if listened_on(path) {
                return Err(BindError::InUse(path.to_path_buf()));
            }
            // (Made between the look and the bind: not ours either.)
            socket_or_nothing(path)?;
            info!(socket = %path.display(), "replacing a stale socket file");
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|source| BindError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(BindError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// How often the socket's file is looked at (see [`SocketFile`]).
const SOCKET_FILE_LOOK: Duration = Duration::from_secs(2);

/// The socket's file, watched. Removed (a cleaning of its directory, an
/// `rm`, another allocator started on the path that failed and took it
/// with it), no worker or `rotor` command starting after could reach this
/// allocator, which went on serving those it had, saying nothing: a
/// worker restarted then answered 503 to its share of the port. A file
/// gone (or a dead socket in its place) is bound again, and said; one
/// another process listens on is left to it, and said.
struct SocketFile {
    path: PathBuf,
    /// The file's device and inode as bound.
    id: (u64, u64),
    /// What was said of the path as it is now (said once).
    said: Option<(u64, u64)>,
}

impl SocketFile {
    /// `listener`'s file (none for an abstract or unnamed socket).
    fn of(listener: &UnixListener) -> Option<SocketFile> {
        let addr = listener.local_addr().ok()?;
        let path = addr.as_pathname()?.to_path_buf();
        let id = file_id(&path).ok()?;
        Some(SocketFile {
            path,
            id,
            said: None,
        })
    }

    /// A listener bound again if the file is gone: the one to accept on
    /// from now (the old one's connections are served on).
    fn look(&mut self, access: &Access) -> Option<UnixListener> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let path = self.path.display();
        let now = match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                self.said = None;
                return None;
            }
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                say(
                    &mut self.said,
                    (0, 0),
                    || warn!(socket = %path, error = %e, "cannot look at the allocator's socket file"),
                );
                return None;
            }
        };
        if let Some(m) = &now {
            let other = (m.dev(), m.ino());
            // Said already: not looked at again (each look at another's
            // listener is a connection it must take).
            if self.said == Some(other) {
                return None;
            }
            if !m.file_type().is_socket() {
                say(
                    &mut self.said,
                    other,
                    || warn!(socket = %path, "the allocator's socket file was replaced by another kind of file: workers and `rotor` commands starting now cannot reach this allocator (it serves the workers it has); remove the file, and it is bound again"),
                );
                return None;
            }
            if listened_on(&self.path) {
                say(
                    &mut self.said,
                    other,
                    || warn!(socket = %path, "another process listens on the allocator's socket path (a second allocator?): workers and `rotor` commands starting now reach it, not this allocator, which serves the workers it has"),
                );
                return None;
            }
        }
        match bind_socket(&self.path, access) {
            Ok(listener) => {
                let Ok(id) = file_id(&self.path) else {
                    return None;
                };
                let was = match now {
                    None => "was removed",
                    Some(_) => "was replaced by a dead socket",
                };
                warn!(socket = %path, "the allocator's socket file {was}: bound again (a worker or `rotor` command that started since could not reach this allocator)");
                self.id = id;
                self.said = None;
                Some(listener)
            }
            Err(e) => {
                say(
                    &mut self.said,
                    (0, 1),
                    || warn!(socket = %path, error = %error_chain(&e), "the allocator's socket file is gone, and cannot be bound again: workers and `rotor` commands starting now cannot reach this allocator (it serves the workers it has)"),
                );
                None
            }
        }
    }
}

/// `say`s once for the socket's path as it is `now` (what is there).
fn say(said: &mut Option<(u64, u64)>, now: (u64, u64), say: impl FnOnce()) {
    if *said != Some(now) {
        say();
        *said = Some(now);
    }
}

/// `path`'s device and inode.
fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok((m.dev(), m.ino()))
}

type ReloadReply = oneshot::Sender<RefreshOutcome>;

/// Serves until `shutdown` is cancelled. Each change of `reload` (SIGHUP)
/// re-reads the pool sources at once.
pub async fn run(
    listener: UnixListener,
    config: Config,
    reload: watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (state, saved) = match &config.state_dir {
        None => (None, Saved::default()),
        Some(dir) => match StateFile::open(dir) {
            Ok((file, saved)) => {
                info!(file = %file.path().display(), resumed = saved.is_some(), "rotation state");
                (Some(file), saved.unwrap_or_default())
            }
            Err(e @ PersistError::Locked(_)) => return Err(e.into()),
            Err(e) if config.state_required => return Err(e.into()),
            Err(e) => {
                warn!(error = %error_chain(&e), "running without a rotation state file: a restart starts the rotation over");
                (None, Saved::default())
            }
        },
    };
    // The order prefixes are leased in: the state directory's key (the
    // lock on it held), else one of this run's own.
    // A position saved under no key (an upgrade) or another (the key file
    // lost), or in the key's order alone (an upgrade), is not one in this
    // order: said once the position is known (below).
    let mut order_new = None;
    let key = match (&config.state_dir, &state) {
        (Some(dir), Some(_)) => match crate::persist::order_key(dir) {
            Ok((key, made)) => {
                order_new = Some((dir.clone(), made, crate::persist::order_by_prefix_new(dir)));
                Ok(key)
            }
            Err(e) => {
                warn!(error = %e, dir = %dir.display(), "cannot keep the order key in the state directory: prefixes are leased in an order of this run's own");
                Err(())
            }
        },
        _ => Err(()),
    };
    match key.or_else(|()| rotor_protocol::random_order_key()) {
        Ok(key) => rotor_protocol::set_order(rotor_protocol::Order::of(key)),
        // No random source: the fixed order, said.
        Err(e) => {
            rotor_protocol::set_order(rotor_protocol::Order::of([0; 4]));
            warn!(error = %e, "no random order key (getrandom failed): prefixes are leased in rotor's fixed order, the same on every host")
        }
    }
    // The lease table lives next to the socket. One left by an allocator
    // that was killed holds the rotation exactly as it stopped: it is
    // closed (so no worker still mapping it leases from it) and, with a
    // state directory, resumed from when it is ahead of the state file.
    // A file there that is no table is not replaced (nor opened): the
    // workers lease over the socket.
    let table_path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().and_then(table_path_for))
        .filter(|path| match rotor_protocol::not_a_table(path) {
            None => true,
            Some(what) => {
                warn!(file = %path.display(), "no lease table: the file at its path is {what}, and is not replaced (is --socket the path meant? the table goes beside the socket, as SOCKET.leases); workers lease over the socket");
                false
            }
        });
    let mut saved = saved;
    if let Some(path) = &table_path {
        if let Ok(old) = LeaseTable::open(path, None) {
            let last = old.close();
            let next_due = Family::ALL.map(|f| last.next_due(f));
            if config.state_dir.is_some() && last.seq > saved.seq {
                info!(seq = last.seq, next = ?next_due, "resuming the rotation from the last lease table");
                saved = Saved {
                    generation: saved.generation.max(last.generation),
                    seq: last.seq,
                    next_due,
                };
            }
        }
    }
    // Who may connect may map it: the socket's own mode and group (a
    // passed socket's are systemd's `SocketMode=` and `SocketGroup=`, not
    // the settings), less what it gives others; with per-user rules, only
    // this user (others lease over the socket, where the rules are
    // checked).
    let (mode, group) = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().and_then(|p| std::fs::metadata(p).ok()))
        .map_or((config.access.mode, config.access.group), |m| {
            use std::os::unix::fs::MetadataExt;
            let gid = nix::unistd::Gid::from_raw(m.gid());
            match may_give_group(gid) {
                true => (m.mode(), Some(gid)),
                // (A group this user cannot give its file: its members
                // lease over the socket.)
                false => (m.mode() & 0o700, None),
            }
        });
    let home = table_path.map(|path| TableHome {
        path,
        mode: match config.access.uids.is_empty() && config.access.gids.is_empty() {
            true => mode & 0o660,
            false => 0o600,
        },
        group,
    });
    let resumed = saved.seq > 0;
    let sources = config.sources.clone();
    let alloc = match Allocator::resuming(sources.clone(), state, saved, home) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %error_chain(&e), "no lease table: workers lease over the socket");
            // `state` went with the failed attempt: reopen it.
            let state = match &config.state_dir {
                None => None,
                Some(dir) => match StateFile::open(dir) {
                    Ok((f, _)) => Some(f),
                    Err(e) => {
                        warn!(error = %error_chain(&e), "running without a rotation state file: a restart starts the rotation over");
                        None
                    }
                },
            };
            Allocator::resuming(sources, state, saved, None).map_err(RunError::Table)?
        }
    };
    alloc.limit_sessions(config.max_sessions, config.max_sessions_per_user);
    alloc.set_site_rules(config.site_rules.clone(), config.max_site_entries);
    alloc.set_unreachable_quarantine(config.unreachable_quarantine);
    alloc.set_metrics_max_sources(config.metrics_max_sources);
    match &config.state_dir {
        // Without the state file there is no lock on the directory: another
        // allocator may be writing the same files.
        Some(dir) if !alloc.holds_state_file() => {
            warn!(dir = %dir.display(), "no lock on the state directory: sticky sessions, site state and quarantines by hand are not kept there");
        }
        Some(dir) => alloc.keep_state_in(dir, !config.checkpoint.is_zero()),
        None => {}
    }
    let alloc = Arc::new(alloc);
    let shutdown = stop_when_orphaned(shutdown, config.orphaned.clone(), alloc.clone());
    // The pool is loaded before the first connection is accepted, so no
    // worker ever sees the empty pool of a starting allocator.
    // A stop meanwhile (a pool command may take its whole timeout) is
    // not kept waiting for it: the command's group is ended as the
    // allocator exits (else a supervisor's SIGKILL left it running), and
    // the state files stay as the last run left them (nothing was served).
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => {
            info!("stopped while the pool was first read");
            alloc.close_table();
            return Ok(());
        }
        outcome = refresh(&alloc) => outcome,
    };
    info!(
        pool = outcome.size,
        generation = outcome.generation,
        sources = config.sources.len(),
        "allocator ready"
    );
    if outcome.size == 0 {
        warn!("the pool is empty: every proxy request will get 503 until it is not");
    }
    // Said once the pool is known: whether it has a prefix.
    match order_new {
        Some((dir, true, _)) if resumed && alloc.leases_a_prefix() => {
            info!(dir = %dir.display(), "order key made: the pool's prefixes are leased in this host's own order from now on, each continuing at its saved address's place in that order (a /64's is past the cursor's reach: it starts at its first)");
        }
        // (Only a prefix is leased in an order: a listed address is not.)
        Some((dir, false, true)) if resumed && alloc.leases_a_prefix() => {
            warn!(dir = %dir.display(), "prefixes are leased each in an order of its own from now on (this release's order: the key mixed with the prefix), each continuing at its saved address's place in that order (a /64's is past the cursor's reach: it starts at its first); a prefix partly leased may lease some of its addresses again before its cycle ends");
        }
        _ => {}
    }
    alloc.persist();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(&alloc.status(), 0.0)),
    ]);

    let tracker = TaskTracker::new();
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadReply>(16);
    tracker.spawn(refresh_loop(
        alloc.clone(),
        (config.refresh, outcome.unread, outcome.size == 0),
        (reload, reload_rx),
        config.admin_token.clone(),
        shutdown.clone(),
    ));

    tracker.spawn(report_status(alloc.clone(), shutdown.clone()));
    if let Some(l) = config.metrics.as_ref().and_then(|l| l.try_clone().ok()) {
        match l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
        {
            Ok(l) => {
                info!(listen = ?l.local_addr().ok(), "serving metrics at /metrics");
                tracker.spawn(crate::metrics::serve(
                    l,
                    alloc.clone(),
                    config.admin_token.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => warn!(error = %e, "cannot serve metrics"),
        }
    }
    tracker.spawn(persist_loop(
        alloc.clone(),
        config.checkpoint,
        shutdown.clone(),
    ));
    tracker.spawn(serve_waiters(alloc.clone(), shutdown.clone()));

    let ids = AtomicU64::new(1);
    // Each connection may hold a frame's room while it sends one, so their
    // number is capped; one past it is told why, by a few tasks at most.
    let peers = Arc::new(tokio::sync::Semaphore::new(config.max_peers));
    let lease_only_most = lease_only_places(config.max_peers);
    let lease_only = Arc::new(tokio::sync::Semaphore::new(lease_only_most));
    let refusing = Arc::new(tokio::sync::Semaphore::new(REFUSING));
    // A warning for the first refused, then one every 10 s with how many.
    let refused = rotor_protocol::Moment::new();
    // The same for peers without the right to connect (a user who may
    // reach the socket file, trying again and again).
    let strangers = rotor_protocol::Moment::new();
    // And failed accepts (a descriptor limit reached: one every 100 ms).
    let failed_accepts = rotor_protocol::Moment::new();
    let mut listener = listener;
    let mut socket_file = SocketFile::of(&listener);
    let mut look = tokio::time::interval(SOCKET_FILE_LOOK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = look.tick(), if socket_file.is_some() => {
                if let Some(again) = socket_file.as_mut().and_then(|f| f.look(&config.access)) {
                    listener = again;
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    match failed_accepts.count_in(Duration::from_secs(10)) {
                        Some(n) => {
                            warn!(error = %e, failed = n, "accept failed: peers wait unaccepted (said once in 10 s, with how many); at the descriptor limit, raise LimitNOFILE (ulimit -n)")
                        }
                        None => debug!(error = %e, "accept failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (rights, uid) = match stream.peer_cred() {
            Ok(cred) => match config.access.rights(cred.uid(), cred.gid(), cred.pid()) {
                Some(rights) => (rights, cred.uid()),
                None => {
                    match strangers.count_in(Duration::from_secs(10)) {
                        Some(n) => {
                            warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), refused = n, "refused a peer that is not allowed to lease (said once in 10 s, with how many)")
                        }
                        None => {
                            debug!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "refused a peer that is not allowed to lease")
                        }
                    }
                    continue;
                }
            },
            Err(e) => {
                warn!(error = %e, "cannot read a peer's credentials; refused");
                continue;
            }
        };
        let share = match rights {
            Rights::Control => None,
            Rights::Lease => match lease_only.clone().try_acquire_owned() {
                Ok(share) => Some(share),
                Err(_) => {
                    if let Some(n) = refused.count_in(Duration::from_secs(10)) {
                        warn!(
                            refused = n,
                            uid,
                            most = lease_only_most,
                            "refused a connection to the socket: the users let in to lease only hold half of --max-peers"
                        );
                    }
                    if let Ok(telling) = refusing.clone().try_acquire_owned() {
                        tracker.spawn(refuse(stream, Full::Share(lease_only_most), telling));
                    }
                    continue;
                }
            },
        };
        let Ok(place) = peers.clone().try_acquire_owned() else {
            if let Some(n) = refused.count_in(Duration::from_secs(10)) {
                warn!(
                    refused = n,
                    max_peers = config.max_peers,
                    "refused a connection to the socket: --max-peers are connected"
                );
            }
            if let Ok(telling) = refusing.clone().try_acquire_owned() {
                tracker.spawn(refuse(stream, Full::All(config.max_peers), telling));
            }
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let alloc = alloc.clone();
        let reload_tx = reload_tx.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let _place = (place, share);
                tokio::select! {
                    r = serve(stream, (id, rights), &alloc, &reload_tx) => {
                        if let Err(e) = r {
                            log_conn_error(&e);
                        }
                    }
                    _ = shutdown.cancelled() => {}
                }
                alloc.peer_gone(id);
            }
            .instrument(tracing::info_span!("conn", id)),
        );
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracker.close();
    tracker.wait().await;
    alloc.save_at_stop();
    alloc.close_table();
    Ok(())
}

/// The longest an orphaned allocator serves its workers' drain (theirs
/// is 30 s by default).
const ORPHAN_SERVES_MOST: Duration = Duration::from_secs(120);

/// A stop that comes with `shutdown`, or once `orphaned` and no worker is
/// connected any more (its supervisor killed outright, the workers drain:
/// a request they take meanwhile still needs a lease), within
/// [`ORPHAN_SERVES_MOST`].
fn stop_when_orphaned(
    shutdown: CancellationToken,
    orphaned: CancellationToken,
    alloc: Arc<Allocator>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = orphaned.cancelled() => {
                info!("rotor up is gone: serving the workers' drain, then stopping");
                let until = tokio::time::Instant::now() + ORPHAN_SERVES_MOST;
                while alloc.serving() && tokio::time::Instant::now() < until {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        s.cancel();
    });
    stop
}

/// The lease table's path for the socket at `socket`: the socket's own
/// name with `.leases` appended, in its directory made absolute (workers
/// open it from wherever they run).
/// Whether this process may make `gid` a file's group: its own, one of its
/// supplementary groups, or any as root.
fn may_give_group(gid: nix::unistd::Gid) -> bool {
    gid == nix::unistd::getegid()
        || nix::unistd::geteuid().is_root()
        || nix::unistd::getgroups().is_ok_and(|g| g.contains(&gid))
}

pub fn table_path_for(socket: &Path) -> Option<PathBuf> {
    let name = socket.file_name()?;
    let dir = match socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => std::fs::canonicalize(d).ok()?,
        None => std::env::current_dir().ok()?,
    };
    let mut file = name.to_owned();
    file.push(".leases");
    Some(dir.join(file))
}

/// How often the leases workers take from the table reach the state file
/// (a restart after a crash reads the table's own file first), and entries
/// out of the rotation are looked at.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Answers the requests held waiting for a site's budget as they fall
/// due (see `waiters`): woken at the next due time, or when one is held
/// or the pool changed.
async fn serve_waiters(alloc: Arc<Allocator>, shutdown: CancellationToken) {
    let mut next = None;
    loop {
        let due = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = alloc.waiting.notified() => {}
            _ = due => {}
        }
        next = alloc.serve_waiters();
    }
}

async fn persist_loop(alloc: Arc<Allocator>, checkpoint: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PERSIST_EVERY);
    let mut last_checkpoint = tokio::time::Instant::now();
    // A checkpoint being written: the second's other work goes on
    // meanwhile (re-checks of quarantined addresses, expiry, the rotation
    // state), not held for its encoding and syncs (seconds, for large
    // state on a slow disk).
    let mut writing: Option<tokio::task::JoinHandle<bool>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                // The stop's own write comes after it, never beside it.
                if let Some(w) = writing.take() {
                    alloc.checkpointed(w.await.unwrap_or(false));
                }
                return;
            }
            _ = tick.tick() => {
                recheck(&alloc).await;
                alloc.repair_table();
                alloc.expire_sessions();
                alloc.expire_sites();
                alloc.persist();
                if writing.as_ref().is_some_and(|w| w.is_finished()) {
                    if let Some(w) = writing.take() {
                        alloc.checkpointed(w.await.unwrap_or(false));
                    }
                }
                if writing.is_none() && !checkpoint.is_zero() && last_checkpoint.elapsed() >= checkpoint {
                    last_checkpoint = tokio::time::Instant::now();
                    // Copied under the lock; encoded and written (synced)
                    // on a blocking thread.
                    if let Some(kept) = alloc.checkpoint() {
                        writing = Some(tokio::task::spawn_blocking(move || kept.write(false)));
                    }
                }
            }
        }
    }
}

fn status_line(s: &StatusReport, leases_per_sec: f64) -> String {
    let workers = s.peers.iter().filter(|p| p.role == Role::Worker).count();
    format!(
        "pool {} addresses (generation {}), {leases_per_sec:.0} leases/s, {workers} workers",
        s.pool.len(),
        s.generation
    )
}

/// `STATUS=` for `systemctl status`, every few seconds.
async fn report_status(alloc: Arc<Allocator>, shutdown: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut last = alloc.status().leases_total;
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let report = alloc.status();
        // Saturating: a table rebuilt from its last sound reading may
        // count from a little further back.
        let rate = report.leases_total.saturating_sub(last) as f64 / STATUS_EVERY.as_secs_f64();
        last = report.leases_total;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status_line(&report, rate))]);
    }
}

/// Reads every source and checks that this host can use what they list.
async fn refresh(alloc: &Arc<Allocator>) -> RefreshOutcome {
    let sources = alloc.sources();
    let a = alloc.clone();
    let (reads, checks, misrouted) = tokio::task::spawn_blocking(move || {
        let reads = read_all(&sources);
        // A source that failed keeps its last good entries: checked as
        // well (an interface deleted, `--interface` failing since, kept
        // its addresses in the rotation until each failed a worker's bind).
        let kept: Vec<Segment> = (0..reads.len())
            .filter(|&i| reads[i].is_err())
            .flat_map(|i| a.kept(i))
            .collect();
        let listed = || reads.iter().flatten().flatten().chain(&kept);
        let checks = check_all(listed());
        let misrouted = crate::usable::misrouted(listed());
        (reads, checks, misrouted)
    })
    .await
    .expect("reading pool sources panicked");
    alloc.note_misrouted(misrouted);
    alloc.apply_refresh(reads, &checks)
}

/// Reads every source (blocking), at once: a refresh (and the `rotor
/// reload` waiting for it) takes as long as the slowest source, not the sum
/// of their timeouts. The reads come back in the order of `sources`.
fn read_all(sources: &[Source]) -> Vec<Result<Vec<Segment>, crate::source::SourceError>> {
    if sources.len() < 2 {
        return sources.iter().map(Source::read).collect();
    }
    std::thread::scope(|scope| {
        let reads: Vec<_> = sources
            .iter()
            .map(|s| {
                std::thread::Builder::new()
                    .name("pool-source".into())
                    .spawn_scoped(scope, || s.read())
            })
            .collect();
        // A thread that cannot be made (thread limit) reads in this one.
        reads
            .into_iter()
            .zip(sources)
            .map(|(t, s)| match t {
                Ok(t) => t.join().expect("reading a pool source panicked"),
                Err(_) => s.read(),
            })
            .collect()
    })
}

/// Whether this host can use each entry (blocking: a socket each).
fn check_all<'a>(
    entries: impl Iterator<Item = &'a Segment>,
) -> HashMap<Segment, Result<(), String>> {
    check_each(entries, crate::usable::Checker::check)
}

/// Each entry judged by `check`, with the local routes read once for all.
fn check_each<'a>(
    entries: impl Iterator<Item = &'a Segment>,
    check: fn(&mut crate::usable::Checker, &Segment) -> Result<(), String>,
) -> HashMap<Segment, Result<(), String>> {
    let mut out = HashMap::new();
    let mut checker = crate::usable::Checker::default();
    for e in entries {
        out.entry(*e).or_insert_with(|| check(&mut checker, e));
    }
    out
}

/// Checks again the entries out of the rotation whose wait is over.
async fn recheck(alloc: &Arc<Allocator>) {
    let due = alloc.due_checks();
    if due.is_empty() {
        return;
    }
    let checks = tokio::task::spawn_blocking(move || check_all(due.iter()))
        .await
        .expect("checking pool addresses panicked");
    alloc.apply_checks(&checks);
}

/// The first retry of a source that has never read.
const UNREAD_RETRY: Duration = Duration::from_secs(1);

/// Refreshes the pool every `every`, and at each reload (a signal, or a
/// request over the socket), when the admin token is read again too.
/// While a source has never read (`unread`: a provider's API down as the
/// allocator starts, its pool perhaps empty), it is read again sooner, a
/// second after the last try and twice as long each time up to `every`:
/// else a restart during a provider's blip cost a whole `--refresh` of
/// 503s.
async fn refresh_loop(
    alloc: Arc<Allocator>,
    (every, mut unread, empty): (Duration, bool, bool),
    (mut reload, mut requests): (watch::Receiver<u64>, mpsc::Receiver<ReloadReply>),
    admin_token: Option<Arc<crate::metrics::AdminToken>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The sooner reads made since the source went unread.
    let mut tries: u32 = 0;
    // Whether the pool was empty at the last refresh (said once as it
    // empties, and once as it fills again).
    let mut was_empty = empty;
    let mut was_all_out = false;
    let sooner = |tries: u32| {
        let next = UNREAD_RETRY.saturating_mul(1 << tries.min(20));
        (next < every).then_some(next)
    };
    loop {
        let retry = async {
            match unread.then(|| sooner(tries)).flatten() {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let (why, reply) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => ("interval", None),
            _ = retry => ("unread source", None),
            Ok(()) = reload.changed() => ("signal", None),
            Some(r) = requests.recv() => ("request", Some(r)),
        };
        // A stop does not wait for a refresh (a pool command may take
        // its whole timeout): what is kept at the stop is written now,
        // not after a supervisor's SIGKILL.
        let mut outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            outcome = refresh(&alloc) => outcome,
        };
        alloc.persist();
        if why == "signal" || why == "request" {
            alloc.repair_table();
            alloc.announce_reload();
            // A token file that cannot be read fails the reload as a
            // source does (`rotor reload` exit 3), the token in use kept.
            if let Some(t) = &admin_token {
                if let Err(e) = t.reload() {
                    outcome.failed.push((t.source_name(), e));
                }
            }
        }
        unread = outcome.unread;
        tries = match unread {
            true => tries + u32::from(why == "unread source"),
            false => 0,
        };
        if outcome.changed {
            info!(
                why,
                pool = outcome.size,
                generation = outcome.generation,
                "pool refreshed"
            );
        } else {
            debug!(why, pool = outcome.size, "pool unchanged");
        }
        // Serving nothing is the fault an operator must act on: it left
        // only "pool refreshed pool=0" at info (a source that lists
        // nothing reads well).
        match (outcome.size == 0, was_empty) {
            (true, false) => warn!(why, "the pool is empty: every request is answered 503 (Pool Empty) until a source lists an address; see `rotor status` for the sources"),
            (false, true) => info!(why, pool = outcome.size, "the pool has addresses again"),
            _ => {}
        }
        was_empty = outcome.size == 0;
        // So is a pool of which nothing is in rotation: every entry one
        // this host cannot use, or taken out (it read as a success,
        // `rotor reload` exit 0, with only each entry's line logged).
        let all_out = outcome.size > 0 && outcome.in_rotation == 0;
        match (all_out, was_all_out) {
            (true, false) => warn!(why, pool = outcome.size, "no address of the pool is in rotation (every entry is one this host cannot use, or taken out): every request is answered 503 until one is back; see `rotor status`"),
            (false, true) if outcome.size > 0 => info!(why, "addresses of the pool are in rotation again"),
            _ => {}
        }
        was_all_out = all_out;
        if let Some(r) = reply {
            let _ = r.send(outcome);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake")]
    Handshake(#[from] HandshakeError),
    #[error("no Hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("a second Hello on the same connection")]
    DuplicateHello,
    #[error("peer did not read its replies for {0:?}")]
    WriteTimeout(Duration),
    #[error("peer did not finish a frame it began within {0:?} to twice that")]
    StalledMidFrame(Duration),
}

fn log_conn_error(e: &ConnError) {
    let msg = error_chain(e);
    let garbage = match e {
        ConnError::Channel(c) => c.is_protocol_violation(),
        ConnError::Handshake(HandshakeError::Channel(c)) => c.is_protocol_violation(),
        ConnError::Handshake(HandshakeError::Closed) => false,
        ConnError::Handshake(_) | ConnError::DuplicateHello => true,
        ConnError::HandshakeTimeout(_)
        | ConnError::WriteTimeout(_)
        | ConnError::StalledMidFrame(_) => true,
    };
    // A peer of another major retries its connection twice a second for
    // as long as it runs: said once a minute, not at each attempt.
    if let ConnError::Handshake(HandshakeError::VersionMismatch { .. }) = e {
        static SAID: rotor_protocol::Moment = rotor_protocol::Moment::new();
        match SAID.first_in(Duration::from_secs(60)) {
            true => {
                warn!(error = %msg, "refused a peer of another protocol version (upgrade rotor's binaries together); said once a minute")
            }
            false => debug!(error = %msg, "refused a peer of another protocol version"),
        }
        return;
    }
    // Said once in 10 s with how many: a local peer that sends garbage in
    // a loop does not flood the log.
    static BROKE: rotor_protocol::Moment = rotor_protocol::Moment::new();
    match garbage.then(|| BROKE.count_in(Duration::from_secs(10))) {
        Some(Some(n)) => {
            warn!(error = %msg, broken = n, "closing connection: peer broke the protocol (said once in 10 s, with how many)")
        }
        Some(None) => debug!(error = %msg, "closing connection: peer broke the protocol"),
        None => debug!(error = %msg, "connection ended"),
    }
}

/// The most failed sources a `ReloadReport` names (64 × 2 KiB of text).
const FAILED_LISTED: usize = 64;

/// Whether `frame` is one of the answers that may be as large as a frame.
fn is_report(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Response(Envelope {
            body: Response::Status(_)
                | Response::StatusV2(_)
                | Response::Sites(_)
                | Response::SitesV2(_)
                | Response::HostStatus(_)
                | Response::Pool { .. },
            ..
        })
    )
}

/// `text` as shown (`crate::shown`): escaped, cut to `REPORT_TEXT_MAX`
/// bytes at a character's boundary.
fn cut(text: String) -> String {
    crate::shown(text, REPORT_TEXT_MAX)
}

/// The most failed parts a worker's reload names (it has three), and
/// their texts' longest: 256 workers' fit a frame, however they fail.
const WORKER_FAILED_LISTED: usize = 4;
const WORKER_TEXT_MAX: usize = 512;

/// How long a reload's answer waits for the workers to say how theirs
/// went: each looks for a reload every 500 ms, and reloads in a moment.
const WORKER_RELOAD_WAIT: Duration = Duration::from_secs(5);

/// `report` with how each worker's reload went: once every worker that
/// can say has said, or after `WORKER_RELOAD_WAIT`.
async fn workers_reloaded(alloc: &Allocator, report: ReloadReport) -> ReloadReportV2 {
    // The reload just announced (or a later one).
    let asked = alloc.reloads_asked();
    let deadline = tokio::time::Instant::now() + WORKER_RELOAD_WAIT;
    let mut workers = loop {
        let (workers, all) = alloc.worker_reloads(asked);
        if all || tokio::time::Instant::now() >= deadline {
            break workers;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let more = workers.len().saturating_sub(rotor_protocol::WORKERS_LISTED);
    workers.truncate(rotor_protocol::WORKERS_LISTED);
    ReloadReportV2 {
        report,
        workers,
        more_workers: more as u32,
    }
}

/// Most requests answered per batch (per state write and flush).
const BATCH: usize = 64;

/// A connected peer: its id, what it may ask, and where the answers to its
/// requests held for later go (a site wait's, see `waiters`).
struct Peer {
    id: u64,
    /// The protocol minor it said in its Hello.
    minor: u16,
    rights: Rights,
    /// Its user, as the kernel says (`None`: not known).
    uid: Option<u32>,
    late: mpsc::UnboundedSender<ServerFrame>,
    /// This allocator's clock less the peer's (`Request::Clock`), in
    /// microseconds, the least of its samples; `i64::MIN` until it says.
    clock_offset: std::sync::atomic::AtomicI64,
}

impl Peer {
    /// A time the peer told (`CLOCK_MONOTONIC`, µs), on this allocator's
    /// clock: the same where the peer has not said its own (none of its
    /// times are then of another clock, or the span's guard takes them
    /// for one).
    fn local_us(&self, us: u64) -> u64 {
        match self.clock_offset.load(std::sync::atomic::Ordering::Relaxed) {
            i64::MIN => us,
            offset => (i128::from(us) + i128::from(offset)).clamp(0, i128::from(u64::MAX)) as u64,
        }
    }

    /// The sticky session key `key` as the allocator keeps it: a peer let
    /// in only to lease has the session keys of its own user (its uid
    /// before them), so that it cannot name another user's sessions (the
    /// key's user part is its worker's word) and push them out of that
    /// user's share. (`\u{2}` begins no key a worker makes: names it did
    /// not check begin with `\u{1}`, and a user name of the users file is
    /// the operator's.)
    fn session_key(&self, key: String) -> String {
        match (self.rights, self.uid) {
            (Rights::Lease, Some(uid)) => format!("\u{2}{uid}\u{2}{key}"),
            (Rights::Lease, None) => format!("\u{2}?\u{2}{key}"),
            (Rights::Control, _) => key,
        }
    }
}

/// `answer`'s refusal of request `id`, with why.
fn refused(id: u64, message: String) -> Result<Option<ServerFrame>, ConnError> {
    Ok(Some(ServerFrame::Response(Envelope {
        id,
        body: Response::Error { message },
    })))
}

/// The answer to `frame` from `peer`; `None` if it is held to be answered
/// later (through `peer.late`).
async fn answer(
    frame: ClientFrame,
    peer: &Peer,
    alloc: &Allocator,
    reload: &mpsc::Sender<ReloadReply>,
) -> Result<Option<ServerFrame>, ConnError> {
    let (id, rights) = (peer.id, peer.rights);
    let env = match frame {
        ClientFrame::Request(env) => env,
        ClientFrame::Hello(_) => return Err(ConnError::DuplicateHello),
    };
    // A request given up at a deadline: not served once it passed; a
    // site wait ends by then.
    let (env, left) = match env.body {
        Request::Until {
            deadline_us,
            request,
        } => match rotor_protocol::clock::standing(peer.local_us(deadline_us)) {
            Standing::Passed(late) => {
                debug!(
                    peer = id,
                    late_ms = late.as_millis() as u64,
                    "not served: read after its deadline (its worker gave up on it)"
                );
                let late = late.as_millis();
                return refused(
                    env.id,
                    format!("not served: read {late} ms after its deadline"),
                );
            }
            Standing::Ahead(left) => (
                Envelope {
                    id: env.id,
                    body: *request,
                },
                Some(left),
            ),
            Standing::Foreign => (
                Envelope {
                    id: env.id,
                    body: *request,
                },
                None,
            ),
        },
        _ => (env, None),
    };
    // (The ticket keys would let a user let in only to lease read the
    // TLS sessions of every client that resumes one.)
    if matches!(env.body, Request::TicketKeys) && rights != Rights::Control {
        tracing::debug!(
            peer = id,
            "refused the TLS ticket keys to a peer let in only to lease"
        );
        return refused(env.id, "only root and the allocator's own user are given the TLS ticket keys (this user is let in to lease only): this worker seals tickets with a key of its own".into());
    }
    let control = matches!(
        env.body,
        Request::Reload | Request::ReloadReport | Request::ReloadReportV2 | Request::Steer { .. }
    );
    if control && rights != Rights::Control {
        warn!(
            peer = id,
            "refused a reload or steering from a peer let in only to lease"
        );
        return refused(env.id, "only root and the allocator's own user may reload or steer the pool (this user is let in to lease only); run it as one of them, e.g. with sudo".into());
    }
    // Reports: a walk of the pool or the sites table each, under the lock.
    let report = matches!(
        env.body,
        Request::Status
            | Request::StatusV2
            | Request::Sites { .. }
            | Request::SitesV2 { .. }
            | Request::HostStatus
    );
    let metered = (report && rights == Rights::Lease).then(std::time::Instant::now);
    if metered.is_some() {
        if let Some(wait) = alloc.lease_only_report_wait() {
            let wait = wait.as_millis().max(1);
            return refused(env.id, format!("the allocator gives reports for users let in only to lease a tenth of its time: ask again in {wait} ms (or as root or the allocator's own user)"));
        }
    }
    let body = match env.body {
        Request::Lease { families } => alloc.lease(id, families),
        Request::Status => Response::Status(alloc.status()),
        Request::StatusV2 => Response::StatusV2(alloc.status_v2()),
        // (The reason is kept with the entry's quarantine and shown in
        // every status: cut, as a reload's report is.)
        Request::Unusable { ip, reason } => {
            // One report at a time: a second waits for the first's check
            // of the rotation (see `Allocator::reports`).
            let _judging = alloc.reports.lock().await;
            let quarantined = alloc.unusable(ip, &cut(reason));
            // The rest of the rotation checked before the answer: the
            // worker's retry leases after it, from what is left.
            // By the routes alone: a lookup an entry, no bind (the
            // peer's later requests wait behind this answer).
            if let Some(due) = alloc.sweep_due() {
                let check = crate::usable::Checker::check_routes;
                let mut checks = tokio::task::spawn_blocking(move || check_each(due.iter(), check))
                    .await
                    .expect("checking pool addresses panicked");
                // Only what it took out: a pass read before another
                // worker's report (of an address that went meanwhile)
                // would put that address back.
                checks.retain(|_, r| r.is_err());
                alloc.apply_checks(&checks);
            }
            Response::Noted { quarantined }
        }
        Request::Pool => alloc.pool_copy(),
        Request::LeaseSession {
            families,
            key,
            ttl_secs,
            strict,
        } => alloc.lease_session(
            id,
            families,
            &peer.session_key(key),
            Duration::from_secs(u64::from(ttl_secs)),
            strict,
            None,
        ),
        Request::LeaseSessionSite {
            families,
            key,
            ttl_secs,
            strict,
            site,
        } => alloc.lease_session(
            id,
            families,
            &peer.session_key(key),
            Duration::from_secs(u64::from(ttl_secs)),
            strict,
            Some(&site),
        ),
        // A worker older than the order (the key, each prefix's own)
        // would lease the table's prefixes in another: over the socket
        // instead.
        Request::Attach if peer.minor < rotor_protocol::order().minor_needed() => {
            info!(peer = id, minor = peer.minor, "a worker older than the order prefixes are leased in: not handed the lease table (it leases over the socket, more slowly, until it is upgraded)");
            Response::Error {
                message: "this worker is older than the allocator's order of prefixes: it leases over the socket (upgrade it to lease from the table)".into(),
            }
        }
        Request::Attach => alloc.attach(id, peer.rights == Rights::Lease),
        Request::Reloads => alloc.reloads_for(id),
        Request::TicketKeys => alloc.tickets.answer(std::time::Instant::now()),
        Request::LeaseSite { families, site } => alloc.lease_site(id, families, &site),
        Request::LeaseSiteWait {
            families,
            site,
            wait_ms,
        } => {
            let reply = crate::waiters::Reply {
                peer: id,
                id: env.id,
                tx: peer.late.clone(),
                given_up: left.and_then(|left| std::time::Instant::now().checked_add(left)),
            };
            let wait = Duration::from_millis(wait_ms);
            let wait = left.map_or(wait, |left| wait.min(left));
            match alloc.lease_site_wait(families, &site, wait, reply) {
                Some(answer) => answer,
                None => return Ok(None),
            }
        }
        Request::CancelWait { id: held } => {
            alloc.cancel_wait(id, held);
            Response::Noted { quarantined: false }
        }
        Request::Pushback {
            ip,
            site,
            status,
            retry_after_secs,
        } => Response::Noted {
            quarantined: alloc.pushback(
                ip,
                &site,
                status,
                retry_after_secs,
                rights == Rights::Control,
            ),
        },
        Request::SiteUnreached { ip, site } => Response::Noted {
            quarantined: alloc.site_unreached(ip, &site, rights == Rights::Control),
        },
        Request::SiteConnected { ip, site } => {
            alloc.site_connected(ip, &site);
            Response::Noted { quarantined: false }
        }
        Request::SiteOk { ip, site } => {
            alloc.site_answered(ip, &site);
            Response::Noted { quarantined: false }
        }
        Request::SiteStarted {
            ip,
            site,
            leased_us,
            started_us,
        } => {
            let (leased_us, started_us) = (peer.local_us(leased_us), peer.local_us(started_us));
            alloc.site_started(ip, &site, leased_us, started_us);
            Response::Noted { quarantined: false }
        }
        Request::Clock { now_us } => {
            let offset = i128::from(rotor_protocol::clock::now_us()) - i128::from(now_us);
            // (`i64::MIN` is "not said": one short of it at most.)
            let offset = offset.clamp(i128::from(i64::MIN) + 1, i128::from(i64::MAX)) as i64;
            // The least of its samples: one read late (this allocator
            // stalled) is larger by the stall, and would read every
            // deadline of the connection that much late.
            let _ = peer.clock_offset.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |was| {
                    Some(if was == i64::MIN {
                        offset
                    } else {
                        was.min(offset)
                    })
                },
            );
            Response::Noted { quarantined: false }
        }
        Request::Sites { max } => Response::Sites(alloc.sites_report(max.min(10_000) as usize)),
        Request::SitesV2 { max } => {
            Response::SitesV2(alloc.sites_report_v2(max.min(10_000) as usize))
        }
        Request::Metrics(m) => {
            alloc.record_metrics(id, m, &[], rights == Rights::Control);
            Response::Noted { quarantined: false }
        }
        Request::MetricsV2 {
            metrics,
            mut counters,
        } => {
            // Those this allocator knows (WORKER_COUNTERS) only: a newer
            // worker's others, before them or not, take no room.
            counters.retain(|(name, _)| rotor_protocol::WORKER_COUNTERS.contains(&name.as_str()));
            counters.truncate(rotor_protocol::WORKER_COUNTERS.len() * 4);
            alloc.record_metrics(id, metrics, &counters, rights == Rights::Control);
            Response::Noted { quarantined: false }
        }
        Request::Unreached { by_source } => {
            alloc.unreached(id, &by_source, rights == Rights::Control);
            Response::Noted { quarantined: false }
        }
        Request::HostStatus => Response::HostStatus(alloc.host_report()),
        Request::WorkerReloaded { asked, failed } => {
            // (Cut as a reload's report is: the answer that lists them
            // must fit a frame.)
            let failed = failed
                .into_iter()
                .take(WORKER_FAILED_LISTED)
                .map(|(what, why)| {
                    (
                        crate::shown(what, WORKER_TEXT_MAX),
                        crate::shown(why, WORKER_TEXT_MAX),
                    )
                })
                .collect();
            alloc.worker_reloaded(id, asked, failed);
            Response::Noted { quarantined: false }
        }
        Request::Steer {
            ip,
            release,
            for_secs,
        } => {
            let entry = alloc.steer(
                ip,
                release,
                for_secs.map(Duration::from_secs),
                &crate::usable::usable_now,
            );
            match peer.minor >= rotor_protocol::MINOR_STEER_KEPT {
                true => Response::SteeredV2 {
                    entry,
                    not_kept: alloc.hand_not_kept(),
                },
                false => Response::Steered { entry },
            }
        }
        Request::Until { .. } => Response::Error {
            message: "a deadline inside a deadline: send one".into(),
        },
        kind @ (Request::Reload | Request::ReloadReport | Request::ReloadReportV2) => {
            let report = !matches!(kind, Request::Reload);
            let workers = matches!(kind, Request::ReloadReportV2);
            let (reply_tx, reply_rx) = oneshot::channel();
            let outcome = match reload.send(reply_tx).await {
                Ok(()) => reply_rx.await.ok(),
                Err(_) => None,
            };
            match outcome {
                Some(o) if report => {
                    // At most FAILED_LISTED sources, each text cut: the
                    // answer fits a frame whatever the sources.
                    let more = o.failed.len().saturating_sub(FAILED_LISTED);
                    let mut failed: Vec<(String, String)> = o
                        .failed
                        .into_iter()
                        .take(FAILED_LISTED)
                        .map(|(name, error)| (cut(name), cut(error)))
                        .collect();
                    if more > 0 {
                        failed.push((
                            format!("{more} more sources"),
                            "each named in the allocator's log".into(),
                        ));
                    }
                    let report = ReloadReport {
                        generation: o.generation,
                        entries: o.size as u64,
                        addresses: o.in_rotation,
                        failed,
                    };
                    match workers {
                        true => Response::ReloadReportV2(workers_reloaded(alloc, report).await),
                        false => Response::ReloadReport(report),
                    }
                }
                Some(o) => Response::Reloaded {
                    generation: o.generation,
                    size: o.size as u32,
                },
                None => Response::Error {
                    message: "the allocator is shutting down".into(),
                },
            }
        }
    };
    // Whether the client could not read it: past a frame, or past what
    // decoding may claim (strings count twice there, as read and as made,
    // so a status heavy in quarantine reasons failed at the client with
    // `LimitExceeded` under a frame's length). Asked of reports only.
    let too_large = |f: &ServerFrame| match rotor_protocol::encode(f) {
        Ok(bytes) => {
            bytes.len() > rotor_protocol::MAX_FRAME_LEN
                || rotor_protocol::decode::<ServerFrame>(&bytes).is_err()
        }
        Err(_) => true,
    };
    let mut frame = ServerFrame::Response(Envelope { id: env.id, body });
    // A report can outgrow a frame (a status of 200 000 listed IPv6
    // addresses): an error the client can print, not a closed connection.
    // (An error answer is no report: its size is known.)
    let report = report
        && !matches!(
            &frame,
            ServerFrame::Response(Envelope {
                body: Response::Error { .. },
                ..
            })
        );
    let mut large = report && too_large(&frame);
    // A status of a listed /16 taken out whole (each of 65 536 entries with
    // its reason) outgrew a frame and was refused just when it was wanted:
    // a reason the same as the entry's before is said "(as above)".
    if let ServerFrame::Response(Envelope {
        body: Response::StatusV2(s),
        ..
    }) = &mut frame
    {
        if large {
            // (`rotor status` says each again.)
            s.compact_reasons();
            large = too_large(&frame);
        }
    }
    // Still too large: the entries in rotation left out (a client that
    // reads that), the rest said — the families, the entries out and why,
    // the sources, the workers.
    if large && peer.minor >= rotor_protocol::MINOR_STATUS_CUT {
        if let ServerFrame::Response(Envelope {
            id,
            body: Response::StatusV2(mut report),
        }) = frame
        {
            let listed = report.pool.len();
            report.pool.retain(|e| e.quarantine.is_some());
            let unlisted = (listed - report.pool.len()) as u64;
            frame = ServerFrame::Response(Envelope {
                id,
                body: Response::StatusCut { report, unlisted },
            });
            large = too_large(&frame);
        }
    }
    if let Some(started) = metered {
        alloc.lease_only_report_took(started.elapsed());
    }
    match large {
        true => Ok(Some(ServerFrame::Response(Envelope {
            id: env.id,
            body: Response::Error {
                message: format!(
                    "the answer is larger than a frame ({} MiB): too many pool entries to list; \
                         the metrics endpoint and the pool's sources say what is in it",
                    rotor_protocol::MAX_FRAME_LEN >> 20
                ),
            },
        }))),
        false => Ok(Some(frame)),
    }
}

/// Connections past `--max-peers` told why at once, at most; any more are
/// closed unanswered.
const REFUSING: usize = 16;

/// Tells a connection past `--max-peers` why it is refused, as the answer
/// to its Hello, within a second; its Hello is read into a small buffer
/// (not as a frame, whose room a peer could make 4 MiB).
/// The connections to the socket that the users let in only to lease
/// (`--allow-uid`, `--allow-gid`, the socket's group) may hold at once, all
/// of them together: half of `--max-peers`, so that they cannot take every
/// place from the workers and commands of root and the allocator's own
/// user.
fn lease_only_places(max_peers: usize) -> usize {
    (max_peers / 2).max(1)
}

/// Why a peer is turned away, told to it.
enum Full {
    /// `--max-peers` are connected.
    All(usize),
    /// The users let in only to lease hold their share (so many).
    Share(usize),
}

async fn refuse(mut stream: UnixStream, full: Full, _telling: OwnedSemaphorePermit) {
    use tokio::io::AsyncReadExt;
    let reason = match full {
        Full::All(max) => format!(
            "the allocator serves {max} connections at most (--max-peers), and has them; retry later"
        ),
        Full::Share(most) => format!(
            "the users let in to lease only hold {most} connections to the allocator, half of --max-peers, their most; retry later"
        ),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut hello = [0u8; 256];
        // (Whatever part of it has come: the answer does not depend on it.)
        let _said = stream.read(&mut hello).await?;
        let mut chan: ServerChannel<UnixStream> = Channel::new(stream);
        chan.send(&ServerFrame::Hello(HelloReply::Refused {
            reason,
            server: Hello::new(Role::Allocator, rotor_protocol::software("rotor-allocator")),
        }))
        .await
        .map_err(io::Error::other)
    })
    .await;
}

async fn serve(
    stream: UnixStream,
    (id, rights): (u64, Rights),
    alloc: &Allocator,
    reload: &mpsc::Sender<ReloadReply>,
) -> Result<(), ConnError> {
    // The peer's process as the kernel says, not as its Hello claims
    // (what `rotor status` lists and a reload names).
    let cred = stream.peer_cred().ok();
    let pid = cred
        .and_then(|c| c.pid())
        // (0: a process of a namespace this one does not see.)
        .and_then(|p| u32::try_from(p).ok().filter(|&p| p > 0));
    let uid = cred.map(|c| c.uid());
    let mut chan: ServerChannel<UnixStream> = Channel::new(stream);
    let mut hello = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_handshake(
            &mut chan,
            Hello::new(Role::Allocator, rotor_protocol::software("rotor-allocator")),
        ),
    )
    .await
    .map_err(|_| ConnError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
    if let Some(pid) = pid {
        hello.pid = pid;
    }
    let pid_seen = pid.is_some();
    let minor = hello.minor;
    // (Logged as kept: escaped and cut.)
    let (role, pid) = (hello.role, hello.pid);
    let software = alloc.peer_connected(id, hello, pid_seen);
    debug!(?role, pid, %software, "peer connected");

    let (mut tx, mut rx) = chan.split();
    let mut replies = Vec::with_capacity(BATCH);
    // Answers to requests held for later (site waits) come back here, to
    // be written as the others are: after the state file.
    let (late, mut late_rx) = mpsc::unbounded_channel();
    let peer = Peer {
        id,
        minor,
        rights,
        uid,
        late,
        clock_offset: i64::MIN.into(),
    };
    // A peer quiet between frames is waited for as long as it likes; one
    // that began a frame and stopped holds the room its length asked for
    // (up to a frame, 4 MiB): closed when two ticks 10 s apart found the
    // same frame begun (it had 10–20 s to finish it). One timer lives as
    // long as the connection, not one per wait.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + FRAME_TIMEOUT, FRAME_TIMEOUT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frames = 0u64;
    // `frames` counts the outer loop's passes (progress); `begun_at`, its
    // value when the last tick found a frame begun.
    let mut begun_at = None;
    loop {
        let frame = tokio::select! {
            biased;
            // Held answers first: a peer that keeps sending cannot keep
            // them back (their leases are taken already).
            Some(held) = late_rx.recv() => {
                replies.push(held);
                take_late(&mut late_rx, &mut replies);
                write_replies(alloc, &mut tx, &mut replies).await?;
                continue;
            }
            frame = rx.recv() => frame?,
            _ = tick.tick() => {
                let mid = rx.mid_frame();
                if mid && begun_at == Some(frames) {
                    return Err(ConnError::StalledMidFrame(FRAME_TIMEOUT));
                }
                begun_at = mid.then_some(frames);
                continue;
            }
        };
        let Some(frame) = frame else {
            break;
        };
        frames += 1;
        // Answer every request already received as one batch: the state
        // file is written once, before any reply of the batch is sent, so
        // no lease leaves that a restart would hand out again.
        // A report (a status, the pool, the sites) ends its batch: up to a
        // frame each, 64 of them built before any was written would hold
        // hundreds of MiB.
        replies.extend(answer(frame, &peer, alloc, reload).await?);
        while replies.len() < BATCH
            && !replies.last().is_some_and(is_report)
            && rx.has_complete_frame()
        {
            match rx.recv().await? {
                Some(frame) => replies.extend(answer(frame, &peer, alloc, reload).await?),
                None => break,
            }
        }
        take_late(&mut late_rx, &mut replies);
        write_replies(alloc, &mut tx, &mut replies).await?;
    }
    debug!("peer disconnected");
    Ok(())
}

/// Held answers ready now, with `replies` (up to twice a batch).
fn take_late(late: &mut mpsc::UnboundedReceiver<ServerFrame>, replies: &mut Vec<ServerFrame>) {
    while replies.len() < 2 * BATCH {
        match late.try_recv() {
            Ok(held) => replies.push(held),
            Err(_) => break,
        }
    }
}

/// Writes `replies` (emptied) once the state file holds the leases among
/// them.
async fn write_replies(
    alloc: &Allocator,
    tx: &mut rotor_protocol::ChannelTx<tokio::io::WriteHalf<UnixStream>, ServerFrame>,
    replies: &mut Vec<ServerFrame>,
) -> Result<(), ConnError> {
    if replies.is_empty() {
        return Ok(());
    }
    alloc.persist();
    let write = async {
        for msg in replies.drain(..) {
            tx.feed(&msg).await?;
        }
        tx.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| ConnError::WriteTimeout(WRITE_TIMEOUT))??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that takes no connection (a stopped allocator's) is
    /// one, its queue full or not, and the look does not wait; a socket
    /// nobody listens on is not; a file is none.
    #[test]
    fn a_listener_is_seen_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t0 = std::time::Instant::now();
        // Past its queue (128, or somaxconn).
        for _ in 0..5000 {
            assert!(listened_on(&path));
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(listener);
        assert!(!listened_on(&path));
        assert_eq!(not_a_socket(&path), None);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "x").unwrap();
        assert!(!listened_on(&path));
        assert_eq!(not_a_socket(&path), Some("a regular file"));
    }

    /// A socket path past a Unix socket's 107 bytes is refused by the
    /// checks (it passed them, then failed each bind); one that fits
    /// passes.
    #[test]
    fn a_socket_path_too_long_for_a_unix_socket_is_refused() {
        let long = PathBuf::from(format!("/nonexistent/{}/a.sock", "d".repeat(100)));
        for check in [socket_dir_unmade, socket_dir] {
            let e = check(&long).unwrap_err();
            assert!(matches!(e, BindError::TooLong(_, 120)), "{e}");
        }
        let most = PathBuf::from(format!("/nonexistent/{}", "d".repeat(SOCKET_PATH_MAX - 13)));
        assert_eq!(most.as_os_str().len(), SOCKET_PATH_MAX);
        socket_dir_unmade(&most).unwrap();
    }

    /// An allocator whose pool `spec` lists, read.
    fn allocator_of(spec: &str) -> Allocator {
        let source = crate::source::Source::list(spec).unwrap();
        let entries = source.read().unwrap();
        let alloc = Allocator::new(vec![source]);
        alloc.apply_refresh(vec![Ok(entries)], &HashMap::new());
        alloc
    }

    fn peer(rights: Rights) -> Peer {
        Peer {
            id: 1,
            minor: rotor_protocol::PROTOCOL_MINOR,
            rights,
            uid: Some(1000),
            late: mpsc::unbounded_channel().0,
            clock_offset: i64::MIN.into(),
        }
    }

    /// A peer let in only to lease keeps its user's own sessions: the same
    /// key from root's worker and from it are two sessions, so it cannot
    /// name (and push out) another user's.
    #[tokio::test]
    async fn a_lease_only_peers_sessions_are_its_users_own() {
        let alloc = allocator_of("10.0.0.1,10.0.0.2");
        let (reload, _rx) = mpsc::channel(1);
        let session = |rights| {
            let (alloc, reload) = (&alloc, &reload);
            async move {
                let body = Request::LeaseSession {
                    families: rotor_protocol::Families::ANY,
                    key: "alice\0s1".into(),
                    ttl_secs: 600,
                    strict: false,
                };
                match answered(body, rights, alloc, reload).await {
                    Response::Leased(lease) => lease.ip,
                    other => panic!("{other:?}"),
                }
            }
        };
        let root = session(Rights::Control).await;
        let other = session(Rights::Lease).await;
        assert_ne!(root, other, "a session of its own, from the rotation");
        assert_eq!(session(Rights::Control).await, root);
        assert_eq!(session(Rights::Lease).await, other);
    }

    /// However many sources failed, the reload's answer names at most 64
    /// and how many more, each text cut: it fits a frame.
    #[tokio::test]
    async fn a_reload_report_of_many_failed_sources_fits_a_frame() {
        let alloc = Allocator::new(vec![]);
        let (reload, mut asked) = mpsc::channel::<ReloadReply>(1);
        tokio::spawn(async move {
            let reply = asked.recv().await.unwrap();
            let failed = (0..5000)
                .map(|i| (format!("--pool-file /p/{i}"), "x".repeat(4000)))
                .collect();
            let _ = reply.send(RefreshOutcome {
                changed: false,
                generation: 3,
                size: 0,
                in_rotation: 0,
                failed,
                unread: false,
            });
        });
        let ask = ClientFrame::Request(Envelope {
            id: 1,
            body: Request::ReloadReport,
        });
        let frame = answer(ask, &peer(Rights::Control), &alloc, &reload)
            .await
            .unwrap()
            .unwrap();
        let len = rotor_protocol::encode(&frame).unwrap().len();
        assert!(len < rotor_protocol::MAX_FRAME_LEN / 8, "{len}");
        let ServerFrame::Response(Envelope {
            body: Response::ReloadReport(r),
            ..
        }) = frame
        else {
            panic!("not a reload report");
        };
        assert_eq!(r.generation, 3);
        assert_eq!(r.failed.len(), FAILED_LISTED + 1);
        assert_eq!(r.failed[0].0, "--pool-file /p/0");
        assert_eq!(r.failed[FAILED_LISTED].0, "4936 more sources");
    }

    /// A peer let in only to lease (`--allow-uid`, `--allow-gid`, the
    /// socket's group) may not steer or reload the pool: told so, and
    /// nothing changes; root and the allocator's own user may.
    #[tokio::test]
    async fn only_control_peers_steer_or_reload() {
        let alloc = allocator_of("10.0.0.1,10.0.0.2");
        let (reload, mut asked) = mpsc::channel::<ReloadReply>(1);
        let steer = || Request::Steer {
            ip: "10.0.0.1".parse().unwrap(),
            release: false,
            for_secs: None,
        };
        for body in [steer(), Request::Reload, Request::ReloadReport] {
            match answered(body, Rights::Lease, &alloc, &reload).await {
                Response::Error { message } => assert!(message.contains("only root"), "{message}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(asked.try_recv().is_err(), "no reload was asked");
        assert_eq!(alloc.addresses_in_rotation(), 2);
        // Leases are served.
        let lease = Request::Lease {
            families: rotor_protocol::Families::ANY,
        };
        let body = answered(lease, Rights::Lease, &alloc, &reload).await;
        assert!(matches!(body, Response::Leased(_)), "{body:?}");
        let body = answered(steer(), Rights::Control, &alloc, &reload).await;
        assert!(
            matches!(
                body,
                Response::SteeredV2 {
                    entry: Some(_),
                    not_kept: None
                }
            ),
            "{body:?}"
        );
        assert_eq!(alloc.addresses_in_rotation(), 1);
    }

    /// The answer to `body` from a peer of `rights`.
    async fn answered(
        body: Request,
        rights: Rights,
        alloc: &Allocator,
        reload: &mpsc::Sender<ReloadReply>,
    ) -> Response {
        let frame = ClientFrame::Request(Envelope { id: 5, body });
        match answer(frame, &peer(rights), alloc, reload).await {
            Ok(Some(ServerFrame::Response(env))) => env.body,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn report_texts_are_cut_at_a_character() {
        assert_eq!(cut("short".into()), "short");
        // A megabyte of control characters is cut before it is escaped
        // (not made five megabytes first), and again after.
        let escaped = cut("\u{1}".repeat(1 << 20));
        assert!(
            escaped.len() <= REPORT_TEXT_MAX + '…'.len_utf8(),
            "{}",
            escaped.len()
        );
        assert!(escaped.starts_with("\\u{1}"), "{escaped}");
        // A peer's text forges no line and drives no terminal.
        assert_eq!(
            cut("a\n  pid 1: forged\u{1b}]0;x\u{7}é".into()),
            "a\\n  pid 1: forged\\u{1b}]0;x\\u{7}é"
        );
        let long = cut("é".repeat(REPORT_TEXT_MAX));
        assert!(
            long.len() <= REPORT_TEXT_MAX + '…'.len_utf8(),
            "{}",
            long.len()
        );
        assert!(long.ends_with("é…"), "{long}");
    }

    /// A status of 262 144 listed addresses is larger than a frame: a
    /// client of minor 16 on is sent it without its entries in rotation
    /// (and how many), an older one is told so, and the connection stays
    /// (before, the encoder failed and the connection was closed: "the
    /// allocator closed the connection").
    #[tokio::test]
    async fn a_report_larger_than_a_frame_is_an_error_not_a_closed_connection() {
        let spec = "2001:db8:1::/112,2001:db8:2::/112,2001:db8:3::/112,2001:db8:4::/112";
        let alloc = allocator_of(spec);
        assert_eq!(alloc.addresses_in_rotation(), 4 << 16);
        let (reload, _rx) = mpsc::channel(1);
        match answered(Request::StatusV2, Rights::Lease, &alloc, &reload).await {
            Response::StatusCut { report, unlisted } => {
                assert_eq!((report.pool.len(), unlisted), (0, 4 << 16));
                assert_eq!(
                    report.families.iter().map(|f| f.total).sum::<u64>(),
                    4 << 16
                );
            }
            other => panic!("{:?}", std::mem::discriminant(&other)),
        }
        let frame = ClientFrame::Request(Envelope {
            id: 5,
            body: Request::StatusV2,
        });
        let older = Peer {
            minor: rotor_protocol::MINOR_STATUS_CUT - 1,
            ..peer(Rights::Control)
        };
        match answer(frame, &older, &alloc, &reload).await {
            Ok(Some(ServerFrame::Response(Envelope {
                body: Response::Error { message },
                ..
            }))) => assert!(message.contains("larger than a frame"), "{message}"),
            other => panic!("{other:?}"),
        }
        // A small answer is as it was.
        let body = answered(Request::HostStatus, Rights::Control, &alloc, &reload).await;
        assert!(matches!(body, Response::HostStatus(_)));
    }

    /// Reports for peers let in only to lease take a tenth of the time at
    /// most, all together (a second of it ahead, so `rotor status` asks its
    /// two at once): one asked past that is refused with when to ask
    /// again; root's (and leases) are not held back.
    #[tokio::test]
    async fn lease_only_reports_take_a_tenth_of_the_time() {
        let alloc = allocator_of("10.0.0.0/24");
        let (reload, _rx) = mpsc::channel(1);
        for _ in 0..2 {
            let body = answered(Request::StatusV2, Rights::Lease, &alloc, &reload).await;
            assert!(matches!(body, Response::StatusV2(_)));
        }
        // As if one had taken 200 ms: 1.8 s owed, 0.8 s past what may run
        // ahead.
        alloc.lease_only_report_took(Duration::from_millis(200));
        match answered(Request::Sites { max: 10 }, Rights::Lease, &alloc, &reload).await {
            Response::Error { message } => assert!(message.contains("ask again in"), "{message}"),
            other => panic!("{:?}", std::mem::discriminant(&other)),
        }
        let body = answered(Request::StatusV2, Rights::Control, &alloc, &reload).await;
        assert!(matches!(body, Response::StatusV2(_)));
        let families = rotor_protocol::Families::ANY;
        let body = answered(Request::Lease { families }, Rights::Lease, &alloc, &reload).await;
        assert!(matches!(body, Response::Leased(_)), "{body:?}");
        tokio::time::sleep(Duration::from_millis(900)).await;
        let body = answered(Request::HostStatus, Rights::Lease, &alloc, &reload).await;
        assert!(matches!(body, Response::HostStatus(_)));
    }

    /// A report's counters the allocator knows are added wherever they
    /// stand among a newer worker's others (a cut to the first four had
    /// dropped a known one listed fifth).
    #[tokio::test]
    async fn a_reports_known_counters_count_among_unknown_ones() {
        let alloc = allocator_of("127.0.0.2");
        let (reload, _rx) = mpsc::channel(1);
        let mut counters: Vec<(String, u64)> = (0..10).map(|i| (format!("newer_{i}"), 1)).collect();
        counters.push((rotor_protocol::COUNTER_ACCESS_LOG_LOST.into(), 7));
        let body = Request::MetricsV2 {
            metrics: rotor_protocol::WorkerMetrics {
                boot: 1,
                seq: 1,
                ..Default::default()
            },
            counters,
        };
        let answer = answered(body, Rights::Lease, &alloc, &reload).await;
        assert!(matches!(answer, Response::Noted { .. }), "{answer:?}");
        let text = alloc.render_metrics(true);
        assert!(
            text.contains("rotor_access_log_lost_lines_total 7"),
            "{text}"
        );
    }

    /// A request read after its deadline is not served; one before it, or
    /// with a deadline of another clock (a time namespace's), is.
    #[tokio::test]
    async fn a_request_past_its_deadline_is_not_served() {
        use rotor_protocol::clock;
        let alloc = allocator_of("127.0.0.2-127.0.0.3");
        let (reload, _rx) = mpsc::channel(1);
        let until = |deadline_us| Request::Until {
            deadline_us,
            request: Box::new(Request::Lease {
                families: rotor_protocol::Families::ANY,
            }),
        };
        let late = clock::now_us() - 2_000;
        match answered(until(late), Rights::Lease, &alloc, &reload).await {
            Response::Error { message } => assert!(message.contains("after its deadline")),
            other => panic!("{other:?}"),
        }
        // (Another clock's ahead of this one: one behind it by more than
        // the span cannot be written on a host up for less than an hour,
        // where the subtraction overflowed.)
        let served = [
            clock::after(Duration::from_secs(1)),
            clock::after(clock::SPAN + Duration::from_secs(60)),
        ];
        for deadline_us in served {
            let body = answered(until(deadline_us), Rights::Lease, &alloc, &reload).await;
            assert!(matches!(body, Response::Leased(_)), "{body:?}");
        }
        // The late one took none.
        assert_eq!(alloc.status_v2().leases_total, 2);
        let nested = Request::Until {
            deadline_us: clock::after(Duration::from_secs(1)),
            request: Box::new(until(clock::after(Duration::from_secs(1)))),
        };
        let body = answered(nested, Rights::Lease, &alloc, &reload).await;
        assert!(matches!(body, Response::Error { .. }), "{body:?}");
    }
}
