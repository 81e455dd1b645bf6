//! The worker's allocator client: one Unix-socket connection carrying many
//! leases in flight (matched by envelope id), reconnected with backoff when
//! the allocator restarts. Requests wait up to the lease timeout for it; the
//! worker never picks an address by itself, so the rotation stays global.
//!
//! Once connected, the client asks where the allocator's lease table is and
//! maps it: leases are then one compare-and-swap on the rotation every worker
//! shares, with no round trip. The table is used only while the connection
//! is up, and dropped when the allocator closes it (at exit, or when it moves
//! the pool to a bigger table, which is then asked for again); meanwhile, and
//! with an allocator that shares no table, leases go over the socket.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rotor_protocol::{
    client_handshake, error_chain, Channel, ClientChannel, ClientFrame, Envelope, Families,
    HandshakeError, Hello, Lease, LeaseTable, NoAddress, Refusal, Request, Response, Role, Segment,
    ServerFrame, SiteMode, TableError, MINOR_DEADLINE, MINOR_FAMILIES, MINOR_LEASE_TABLE,
    MINOR_RELOADS, MINOR_SESSION_SITE, MINOR_SITES, MINOR_SITE_WAIT, POOL_TOO_LARGE,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The longest a report of an address this host cannot use waits for
/// the allocator's word (see `LeaseClient::report_unusable`).
const REPORT_WAIT: Duration = Duration::from_secs(1);

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{0}")]
    NoAddress(NoAddress),
    #[error("no answer from the allocator at {} within {after:?} (is it running?)", socket.display())]
    Timeout { after: Duration, socket: PathBuf },
    #[error("unexpected answer from the allocator: {0}")]
    Unexpected(String),
    #[error("{}", crate::error::session_lost(*.0))]
    SessionLost(IpAddr),
    #[error("the session table is full of strict sessions; room frees in {retry_after:?}")]
    SessionsFull { retry_after: Duration },
    #[error("no address may serve the site for {retry_after:?}")]
    Throttled {
        retry_after: Duration,
        block: rotor_protocol::Block,
    },
    #[error("the allocator (protocol minor {has}) is too old for this (minor {needs} or newer)")]
    TooOld { has: u16, needs: u16 },
    #[error("the allocator has not read the {0} requests queued for it (is it stopped?)")]
    Backlogged(usize),
}

impl LeaseError {
    /// The allocator did not answer: it timed out, or did not even read
    /// what waits for it (where a fallback stands in for its answer).
    fn unanswered(&self) -> bool {
        matches!(self, LeaseError::Timeout { .. } | LeaseError::Backlogged(_))
    }
}

/// A lease, and whether the allocator wants to hear how the site answered
/// it (`LeaseClient::site_answered`).
pub type Granted = (Lease, bool);

type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>;

/// What waits to be written to the allocator, at most [`MAX_QUEUED`]: an
/// allocator that stops reading (SIGSTOP, a stall) would otherwise have
/// every socket request of its outage queued here, long after each one's
/// client was answered.
struct Queue {
    tx: mpsc::UnboundedSender<Queued>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// A metrics report is queued, not yet taken by the writer: one at a
    /// time (each holds a copy of the worker's figures, up to a MB; an
    /// allocator not reading had every retry's kept, a report every 2 s).
    metrics: Arc<std::sync::atomic::AtomicBool>,
}

/// A request queued for the allocator, and, for a push-back, when: its
/// wait is told less its time in the queue ([`due`]), as a held one's is
/// (an allocator that stopped reading had a site cooled for as long as it
/// asked after that, not from when it asked).
type Queued = (Envelope<Request>, Option<Instant>);

/// Requests waiting for the allocator to read them, at most (≈ 220 bytes
/// each, and a site's name or a session's key: about 15 MB a worker at
/// the cap): far past a worker's rate for the lease timeout.
const MAX_QUEUED: usize = 65_536;

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
enum Unsent {
    /// The connection is gone.
    Closed,
    /// The allocator has not read what is queued already.
    Full,
}

impl Queue {
    /// Queues `env`, unless the connection is gone or the queue full.
    fn send(&self, env: Envelope<Request>) -> Result<(), Unsent> {
        let metrics = env.body.is_metrics();
        if metrics && self.metrics.swap(true, Ordering::Relaxed) {
            return Err(Unsent::Full);
        }
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if metrics {
                self.metrics.store(false, Ordering::Relaxed);
            }
            return Err(Unsent::Full);
        }
        let at = matches!(env.body, Request::Pushback { .. }).then(Instant::now);
        self.tx.send((env, at)).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            Unsent::Closed
        })
    }

    /// The writer took `env` off the queue.
    fn taken(&self, env: &Envelope<Request>) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        if env.body.is_metrics() {
            self.metrics.store(false, Ordering::Relaxed);
        }
    }
}

struct Conn {
    requests: Queue,
    /// `None` once the connection is gone, so no waiter is left behind.
    pending: Pending,
    /// The allocator's lease table, once mapped, and this worker's counter.
    table: RwLock<Option<(Arc<LeaseTable>, Option<u32>)>>,
    /// Woken when the table was found closed, to ask for its successor.
    reattach: Notify,
    /// The first count of reloads asked over this connection (its first
    /// request; without an answer, the first table it mapped's count
    /// then): what a reload asked later is told from
    /// (`reloads_at_attach`), as the allocator counts this worker's from.
    first_reloads: Mutex<Option<(u64, u64)>>,
    /// The allocator's protocol minor.
    minor: u16,
    /// The allocator's process (the kernel's word on the connection where
    /// it gives one, else its Hello's: see `connect`): another one is a
    /// restarted allocator, whose reload count started over.
    allocator_pid: u32,
    /// The id of a table found tampered with: not mapped again (the
    /// allocator replaces it; a new id is attached to).
    distrusted: Mutex<Option<u64>>,
    /// The last two pools this allocator described (a lease taken just
    /// before a refresh is of the one before); per connection, as a
    /// restarted allocator may count generations anew.
    copies: RwLock<[Option<Arc<PoolCopy>>; 2]>,
    /// One fetch of the pool at a time.
    fetching: tokio::sync::Mutex<()>,
    /// When a fetch of the pool last went unanswered: for a moment after,
    /// leases from the table are used unchecked rather than each request
    /// waiting for an allocator that is stopped or busy.
    copy_failed: Mutex<Option<Instant>>,
}

impl Conn {
    /// Waits for the answer to request `id`: its receiver, and the guard
    /// that takes its entry out however the wait ends (`cancel`: tell the
    /// allocator so, see [`Registered`]). `None`: the connection is gone.
    fn register<'a>(
        &'a self,
        id: u64,
        cancel: Option<&'a Queue>,
    ) -> Option<(oneshot::Receiver<Response>, Registered<'a>)> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()?
            .insert(id, tx);
        let registered = Registered {
            pending: &self.pending,
            id,
            cancel,
        };
        Some((rx, registered))
    }

    /// The table mapped now, if any, and this worker's counter in it.
    fn mapped(&self) -> Option<(Arc<LeaseTable>, Option<u32>)> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A lease from `table` (the one mapped), if it is open; a closed one
    /// is dropped, and its successor asked for.
    fn lease_from_table(
        &self,
        (table, slot): &(Arc<LeaseTable>, Option<u32>),
        families: Families,
    ) -> Option<Result<Lease, Refusal>> {
        let resp = table.lease(families, *slot);
        if resp.is_none() {
            let mut current = self.table.write().unwrap_or_else(|e| e.into_inner());
            // Unless another lease already found it closed and its
            // successor is in.
            if current.as_ref().is_some_and(|(t, _)| Arc::ptr_eq(t, table)) {
                *current = None;
                self.reattach.notify_one();
            }
        }
        resp
    }

    /// Stops using `table` (found tampered with): leases go over the socket
    /// until the allocator, which checks its table every second, has
    /// replaced it.
    fn distrust(&self, table: &Arc<LeaseTable>) {
        *self.distrusted.lock().unwrap_or_else(|e| e.into_inner()) = Some(table.id());
        let mut current = self.table.write().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(t, _)| Arc::ptr_eq(t, table)) {
            *current = None;
            self.reattach.notify_one();
        }
    }

    /// Whether a copy of any pool held (this one's or the one before)
    /// has `ip`.
    fn ever_published(&self, ip: IpAddr) -> bool {
        let copies = self.copies.read().unwrap_or_else(|e| e.into_inner());
        copies.iter().flatten().any(|c| c.contains(ip))
    }

    /// Keeps `copy` of the allocator's pool (with the one before it).
    fn keep_copy(&self, copy: PoolCopy) {
        *self.copy_failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut copies = self.copies.write().unwrap_or_else(|e| e.into_inner());
        if copies[0]
            .as_ref()
            .is_none_or(|c| c.generation != copy.generation)
        {
            for (vast, now) in VAST.iter().zip(copy.vast) {
                vast.store(now, Ordering::Relaxed);
            }
            copies[1] = copies[0].take();
            copies[0] = Some(Arc::new(copy));
        }
    }

    /// `Some(whether lease is in its pool)` when a copy of that pool is
    /// held.
    fn check_copy(&self, lease: &Lease) -> Option<Vouch> {
        let copies = self.copies.read().unwrap_or_else(|e| e.into_inner());
        copies
            .iter()
            .flatten()
            .find(|c| c.generation == lease.generation)
            .map(|c| match c.contains(lease.ip) {
                true => Vouch::Yes,
                false => Vouch::No,
            })
    }

    /// [`Conn::site_path`] by the table mapped now.
    fn site_path_now(&self, host: &str) -> Option<String> {
        let mapped = self.mapped();
        self.site_path(mapped.as_ref().map(|(t, _)| &**t), host)
    }

    /// The site of `host`, if a request to it must lease through the
    /// allocator's site path: the site has budgets or cooldowns there, as
    /// the site filter of `table` (the one mapped) says; without a table,
    /// always.
    fn site_path(&self, table: Option<&LeaseTable>, host: &str) -> Option<String> {
        if self.minor < MINOR_SITES {
            return None;
        }
        let Some(table) = table else {
            return Some(rotor_protocol::site_of(host));
        };
        match table.site_mode() {
            SiteMode::None => None,
            SiteMode::All => Some(rotor_protocol::site_of(host)),
            SiteMode::Filter => {
                let site = rotor_protocol::site_of(host);
                table.site_flagged(&site).then_some(site)
            }
        }
    }

    /// The reloads asked of the allocator when this connection's first
    /// request (`id`) was answered: where it counts from (`first_reloads`),
    /// as the allocator counts this worker's from. Waited for as long as
    /// it takes (the allocator answers a connection's requests in order:
    /// nothing else would come sooner); `None` from an allocator older
    /// than minor 7, or a connection gone.
    async fn first_reloads_asked(&self, id: u64) -> Option<(u64, u64)> {
        let first = self.ask_reloads(id).await?;
        *self.first_reloads.lock().unwrap_or_else(|e| e.into_inner()) = Some(first);
        Some(first)
    }

    /// The reloads asked of the allocator, asked over this connection
    /// (minor 7), with the table's id, within a second (the connection
    /// counts from its first request's answer: `first_reloads_asked`).
    async fn socket_reloads(&self, id: u64) -> Option<(u64, u64)> {
        tokio::time::timeout(Duration::from_secs(1), self.ask_reloads(id))
            .await
            .ok()
            .flatten()
    }

    /// `Request::Reloads` (an allocator of minor 7 or later answers it).
    async fn ask_reloads(&self, id: u64) -> Option<(u64, u64)> {
        if self.minor < MINOR_RELOADS {
            return None;
        }
        match self.call(id, Request::Reloads).await {
            Some(Response::Reloads { table, count }) => Some((table, count)),
            _ => None,
        }
    }

    /// Sends `body` with `id` and waits for the answer; `None` if the
    /// connection ended first.
    async fn call(&self, id: u64, body: Request) -> Option<Response> {
        // Its entry goes however this ends: answered, not sent, or the
        // call dropped (a timeout around it): none left behind (the
        // reload watch asks every half second).
        let (rx, _registered) = self.register(id, None)?;
        self.requests.send(Envelope { id, body }).ok()?;
        rx.await.ok()
    }
}

/// The pool as the allocator says it is, by generation: what a lease from
/// the table must be in (whoever can write the table's file could put any
/// address there; a worker binds none the allocator did not publish).
#[derive(Default)]
struct PoolCopy {
    generation: u64,
    singles: HashSet<IpAddr>,
    prefixes: Vec<Segment>,
    /// Too large for the allocator to describe: every lease passes.
    unchecked: bool,
    /// Each family's rotation is past [`RECURS_AT_MOST`] addresses.
    vast: [bool; 2],
}

/// The most addresses a family's rotation may hold for a source of it to
/// come round again while a connection from it is kept idle (a million:
/// at 100 000 requests a second, 10 s): past it (a /64 pool), an idle
/// upstream connection from a source is never reused (see
/// [`source_recurs`]).
const RECURS_AT_MOST: u64 = 1 << 20;

/// Whether each family's rotation, as the newest pool copy held says, is
/// past [`RECURS_AT_MOST`] (false until a copy is held).
static VAST: [std::sync::atomic::AtomicBool; 2] = [
    std::sync::atomic::AtomicBool::new(false),
    std::sync::atomic::AtomicBool::new(false),
];

/// Whether a lease of `ip`'s family may come round to `ip` again while
/// an upstream connection from it is kept idle: not in a rotation of
/// more than [`RECURS_AT_MOST`] addresses (a /64), whose every request
/// left a connection no request would ask for (up to 3 000 of them open
/// to a destination from one /64). One atomic load.
pub fn source_recurs(ip: IpAddr) -> bool {
    let family = rotor_protocol::Family::of(&ip);
    !VAST[family.index()].load(Ordering::Relaxed)
}

/// What a lease from the table is, checked against the pool.
enum Vouch {
    Yes,
    No,
    /// No copy of its pool could be had.
    Unknown,
    /// The allocator does not answer (stopped, busy, swapped out), and
    /// the address is one an earlier copy holds: used, as the table is
    /// there for exactly that.
    Unanswered,
}

/// How long a worker waits for the allocator's copy of a new pool before
/// it uses a table lease unchecked, and how long after such a wait it does
/// not wait again.
const COPY_WAIT: Duration = Duration::from_millis(500);
const COPY_RETRY: Duration = Duration::from_secs(1);
/// How long a copy asked again (with no request waiting) is waited for.
const COPY_AGAIN_WAIT: Duration = Duration::from_secs(10);

impl PoolCopy {
    fn unchecked(generation: u64) -> PoolCopy {
        PoolCopy {
            generation,
            unchecked: true,
            ..PoolCopy::default()
        }
    }

    fn new(generation: u64, entries: Vec<Segment>) -> PoolCopy {
        let vast = rotor_protocol::Family::ALL
            .map(|f| rotor_protocol::family_total(&entries, f) > RECURS_AT_MOST);
        let (singles, prefixes): (Vec<Segment>, Vec<Segment>) =
            entries.into_iter().partition(|e| e.is_single());
        PoolCopy {
            generation,
            singles: singles.iter().map(|e| e.base()).collect(),
            prefixes,
            unchecked: false,
            vast,
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.unchecked || self.singles.contains(&ip) || self.prefixes.iter().any(|p| p.contains(ip))
    }
}

pub struct LeaseClient {
    conn: watch::Receiver<Option<Arc<Conn>>>,
    /// Push-backs the allocator could not be told (see [`Held`]).
    held: Arc<Held>,

    next_id: AtomicU64,
    timeout: Duration,
    /// The allocator's socket, for messages.
    socket: PathBuf,
    /// The reload the allocator asked that this worker has yet to say it
    /// made (see `asked_to_reload`).
    reload_asked: std::sync::Mutex<Option<(u64, u64)>>,
}

impl LeaseClient {
    /// Starts the connection manager; it runs until `shutdown`.
    pub fn start(
        path: PathBuf,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Arc<LeaseClient> {
        let (tx, rx) = watch::channel(None);
        let held = Arc::new(Held::default());
        tokio::spawn(manage(path.clone(), tx, held.clone(), shutdown));
        Arc::new(LeaseClient {
            conn: rx,
            held,

            next_id: AtomicU64::new(1),
            timeout,
            socket: path,
            reload_asked: Default::default(),
        })
    }

    /// Waits until the allocator connection is up (for readiness).
    pub async fn connected(&self, within: Duration) -> bool {
        let mut rx = self.conn.clone();
        tokio::time::timeout(within, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn is_connected(&self) -> bool {
        self.conn.borrow().is_some()
    }

    /// Whether leases come from the allocator's shared table.
    pub fn uses_table(&self) -> bool {
        self.conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.table.read().unwrap_or_else(|e| e.into_inner()).is_some())
    }

    /// Reloads the operator asked of the allocator, as its lease table
    /// counts them, with the table's id (a new allocator's table counts
    /// from 0 again); `None` without a table.
    pub fn allocator_reloads(&self) -> Option<(u64, u64)> {
        let conn = self.conn.borrow().clone()?;
        let current = conn.table.read().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            // A closed table's count may be gone (a table cut short reads
            // as zeros): no reload is read from it.
            .filter(|(table, _)| !table.is_closed())
            .map(|(table, _)| (table.id(), table.reloads()))
    }

    /// As `allocator_reloads`, for every worker: a worker without the
    /// table (one that may not map it) asks the allocator over its socket
    /// (an allocator of minor 7 or later answers; `None` from an older one,
    /// or without an answer within a second).
    pub async fn reloads_asked(&self) -> Option<(u64, u64)> {
        if let Some(n) = self.allocator_reloads() {
            return Some(n);
        }
        let conn = self.conn.borrow().clone()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conn.socket_reloads(id).await
    }

    /// The reload this worker is about to make is the one the allocator's
    /// count `asked` (as `reloads_asked` gives it) stands for: said to it
    /// by `reloaded`, for `rotor reload` to tell.
    pub fn asked_to_reload(&self, asked: (u64, u64)) {
        *self.reload_asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(asked);
    }

    /// The reload the allocator asked for that the reload starting now
    /// makes (taken as it starts: one asked while an earlier reload was
    /// under way is made by the next, which reads the files anew).
    pub fn take_reload_asked(&self) -> Option<(u64, u64)> {
        self.reload_asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A reload is done, these parts of it failed (what, and why): said to
    /// the allocator if it asked for the reload (`asked`, from
    /// `take_reload_asked`; an allocator older than minor 12 is not told:
    /// `rotor reload` says it cannot know).
    pub async fn reloaded(&self, asked: Option<(u64, u64)>, failed: Vec<(String, String)>) {
        let Some(asked) = asked else {
            return;
        };
        let told = self
            .request_within(
                Request::WorkerReloaded { asked, failed },
                Duration::from_secs(2),
            )
            .await;
        match told {
            Ok(_) | Err(LeaseError::TooOld { .. }) => {}
            Err(e) => debug!(error = %e, "could not tell the allocator how the reload went"),
        }
    }

    /// The keys TLS session tickets are sealed with, the same for every
    /// worker of the host (the key to seal with first), and when to ask
    /// again at the latest; else why not (an allocator older than minor
    /// 19, one that refuses them to a user let in only to lease, none
    /// connected).
    pub async fn ticket_keys(&self) -> Result<(Vec<rotor_protocol::TicketKey>, Duration), String> {
        match self
            .request_within(Request::TicketKeys, Duration::from_secs(2))
            .await
        {
            Ok(Response::TicketKeys { keys, next_secs }) if !keys.is_empty() => {
                Ok((keys, Duration::from_secs(next_secs)))
            }
            Ok(Response::Error { message }) => Err(message),
            Ok(other) => Err(format!("an unexpected answer: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The allocator's process id (see `Conn::allocator_pid`), while
    /// connected.
    pub fn allocator_pid(&self) -> Option<u32> {
        Some(self.conn.borrow().as_ref()?.allocator_pid)
    }

    /// The reloads asked of the allocator as this connection was first told
    /// them (its first request; an allocator older than minor 7, its table
    /// when mapped): where a watcher that first looks later counts from (a
    /// reload asked in between is not lost).
    pub fn reloads_at_attach(&self) -> Option<(u64, u64)> {
        let conn = self.conn.borrow().clone()?;
        let first = *conn.first_reloads.lock().unwrap_or_else(|e| e.into_inner());
        first
    }

    /// `f` on the lease table and this worker's slot in it, if it has both.
    fn with_slot<T>(&self, f: impl FnOnce(&LeaseTable, u32) -> Option<T>) -> Option<T> {
        let conn = self.conn.borrow().clone()?;
        let current = conn.table.read().unwrap_or_else(|e| e.into_inner());
        let (table, slot) = current.as_ref()?;
        f(table, (*slot)?)
    }

    /// Publishes this worker's `load` among the workers of accept `group`
    /// (those sharing its listening sockets) in the lease table.
    pub fn publish_load(&self, group: u64, load: u64) {
        self.with_slot(|table, slot| {
            table.set_peer_load(slot, group, load);
            Some(())
        });
    }

    /// The least load another worker of accept `group` published; `None`
    /// without a table slot or siblings.
    pub fn least_sibling_load(&self, group: u64) -> Option<u64> {
        self.with_slot(|table, slot| table.least_sibling_load(slot, group))
    }

    /// Leaves every accept group (group 0 is none: no sibling compares with
    /// this worker's line any more).
    pub fn leave_group(&self) {
        self.publish_load(0, 0);
    }

    /// The next address of one of `families` for a request to `host`, or
    /// why there is none.
    pub async fn lease(&self, families: Families, host: &str) -> Result<Granted, LeaseError> {
        // Whether the site takes the site path is the connection's to say:
        // while there is none (the allocator restarting), wait for it, not
        // lease past the site's budget or cooldown from the shared rotation.
        // One bound for all of it: the wait for a connection, the check
        // of a table lease, the request over the socket. It starts at the
        // first wait: a lease from the table with its pool known takes no
        // clock reading.
        let start = std::sync::OnceLock::new();
        let deadline = || *start.get_or_init(|| Instant::now() + self.timeout);
        let current = self.conn.borrow().clone();
        let c = match current {
            Some(c) => c,
            None => self.connection(deadline()).await?,
        };
        let mapped = c.mapped();
        if let Some(site) = c.site_path(mapped.as_ref().map(|(t, _)| &**t), host) {
            return self.lease_site(families, site, deadline()).await;
        }
        let answer = mapped
            .as_ref()
            .and_then(|m| c.lease_from_table(m, families));
        let table = mapped.map(|(t, _)| t);
        // An empty pool is asked again over the socket, whose answer is
        // the allocator's own: a table cut or zeroed in place (within its
        // first page, which no SIGBUS catches) reads so until the
        // allocator's check replaces it, and its refusals would turn every
        // client away meanwhile. Should the allocator not answer, the
        // table's refusal stands. (A family the pool lacks is answered at
        // once: a dual-stack name asked of an IPv6 pool asks it for IPv4
        // first, on every request.)
        let refused = match answer {
            Some(Ok(lease)) => {
                match self.vouch(&c, &lease, &deadline).await {
                    Vouch::Yes | Vouch::Unanswered => return Ok((lease, false)),
                    // The pool moved on meanwhile (or the allocator did
                    // not answer): this lease over the socket instead.
                    Vouch::Unknown => {}
                    Vouch::No => {
                        if let Some(t) = table {
                            error!(source = %lease.ip, generation = lease.generation, "the lease table handed out an address the allocator did not publish: not used; leasing over the socket until the allocator replaces the table");
                            c.distrust(&t);
                        }
                    }
                }
                None
            }
            Some(Err(r)) if r.reason == NoAddress::EmptyPool => Some(r.reason),
            Some(Err(r)) => return Err(LeaseError::NoAddress(r.reason)),
            None => None,
        };
        let asked = self
            .request_until(Request::Lease { families }, deadline())
            .await;
        match (asked, refused) {
            (Ok(Response::Leased(lease)), _) => Ok((lease, false)),
            (Ok(Response::NoAddress(refusal)), _) => Err(LeaseError::NoAddress(refusal.reason)),
            (Err(e), Some(reason)) if e.unanswered() => Err(LeaseError::NoAddress(reason)),
            (Ok(other), _) => Err(LeaseError::Unexpected(format!("{other:?}"))),
            (Err(e), _) => Err(e),
        }
    }

    /// A lease through the allocator's site path: the site's own rotation
    /// among the addresses with budget left for it and not cooling for it.
    async fn lease_site(
        &self,
        families: Families,
        site: String,
        deadline: Instant,
    ) -> Result<Granted, LeaseError> {
        site_answer(
            self.request_until(Request::LeaseSite { families, site }, deadline)
                .await?,
        )
    }

    /// As `lease`, for a request to `host` that its site's budget refused:
    /// the allocator holds it (up to `until`) with the site's other
    /// waiters from every worker, and answers it in arrival order, as an
    /// address may serve it, or with `Throttled` at its end. `None` where
    /// the allocator cannot (older than minor 8), or the site takes no site
    /// path now: the caller sleeps and asks again.
    pub async fn lease_site_wait(
        &self,
        families: Families,
        host: &str,
        until: Instant,
    ) -> Option<Result<Granted, LeaseError>> {
        let c = self.conn.borrow().clone()?;
        if c.minor < MINOR_SITE_WAIT {
            return None;
        }
        let site = c.site_path_now(host)?;
        // (`wait_ms` is set as it is sent: up to `until`, the deadline
        // given below less the lease timeout.)
        let body = Request::LeaseSiteWait {
            families,
            site,
            wait_ms: 0,
        };
        match self.request_until(body, until + self.timeout).await {
            Ok(answer) => Some(site_answer(answer)),
            // An older allocator came back meanwhile: asked again as it
            // can be.
            Err(LeaseError::TooOld { .. }) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Tells the allocator that `site` pushed back on `ip` (it cools the
    /// pair for every worker). Not waited for; held while the allocator is
    /// away (see [`Held`]).
    pub fn site_pushed_back(
        &self,
        ip: IpAddr,
        site: String,
        status: u16,
        retry_after: Option<u32>,
    ) {
        self.tell(Request::Pushback {
            ip,
            site,
            status,
            retry_after_secs: retry_after,
        });
    }

    /// Tells the allocator that `site` answered `ip` normally (its backoff
    /// starts over). Not waited for.
    pub fn site_answered(&self, ip: IpAddr, site: String) {
        self.tell(Request::SiteOk { ip, site });
    }

    /// Sends a worker's figures to the allocator; gives them back if it
    /// could not (they are kept for the next report). An allocator too old
    /// to take them is not sent any.
    pub async fn report_metrics(
        &self,
        m: crate::meter::Report,
    ) -> Result<(), Box<crate::meter::Report>> {
        // This worker's clock again with each report: the allocator keeps
        // the least offset of the samples, so one it read late (stalled
        // at the connection's start) does not stand.
        self.tell(Request::Clock {
            now_us: rotor_protocol::clock::now_us(),
        });
        // An allocator too old for metrics (`TooOld`, checked on the
        // connection the report would go on) is not sent it.
        match self.request(m.clone().request()).await {
            Ok(_) | Err(LeaseError::TooOld { .. }) => Ok(()),
            Err(_) => Err(Box::new(m)),
        }
    }

    /// Tells the allocator of connects that failed from these sources
    /// while their destination answered others (see `witness`). Not waited
    /// for; an allocator older than minor 13 is not told.
    pub fn unreached(&self, by_source: Vec<rotor_protocol::SourceUnreached>) {
        if !by_source.is_empty() {
            self.tell(Request::Unreached { by_source });
        }
    }

    /// Tells the allocator that a connect from `ip` to `site` failed while
    /// the site answered other sources (see `witness`): on a repeat it
    /// cools the pair for every worker. Not waited for; an allocator older
    /// than minor 14 is not told.
    pub fn site_unreached(&self, ip: IpAddr, site: String) {
        self.tell(Request::SiteUnreached { ip, site });
    }

    /// Tells the allocator that a request to `host` from `ip`, leased
    /// `since` ago, started only now (its connection made): where the
    /// site has a budget, its start is moved to now (see
    /// `Request::SiteStarted`). Not waited for; a site the allocator holds
    /// nothing for (its filter says so), or an allocator older than minor
    /// 17, is not told.
    pub fn site_started(&self, ip: IpAddr, host: &str, since: Duration) {
        let Some(c) = self.conn.borrow().clone() else {
            return;
        };
        if c.minor < MINOR_DEADLINE {
            return;
        }
        let Some(site) = c.site_path_now(host) else {
            return;
        };
        let started_us = rotor_protocol::clock::now_us();
        let since_us = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
        self.tell(Request::SiteStarted {
            ip,
            site,
            leased_us: started_us.saturating_sub(since_us),
            started_us,
        });
    }

    /// Tells the allocator that a new connect from `ip` to `site` was made,
    /// on a lease that asked (the pair's failed connects start over). Not
    /// waited for; an allocator older than minor 14 is not told.
    pub fn site_connected(&self, ip: IpAddr, site: String) {
        self.tell(Request::SiteConnected { ip, site });
    }

    /// Sends `body` without waiting for the answer (its reply, matched to
    /// no waiter, is dropped), to an allocator that reads it. A push-back
    /// that cannot go (no allocator, or one not reading) is held for the
    /// next connection (see [`Held`]).
    fn tell(&self, body: Request) {
        let conn = self.conn.borrow().clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // (Rare: a copy only of a push-back, for should it not go.)
        let keep = matches!(body, Request::Pushback { .. }).then(|| body.clone());
        let sent = match conn {
            Some(c) if c.minor >= body.min_minor() => {
                let sent = c.requests.send(Envelope { id, body }).is_ok();
                if sent && self.held.any() {
                    self.held.send(&c);
                }
                sent
            }
            // An allocator too old for it is not told.
            Some(_) => true,
            None => false,
        };
        if let (false, Some(body)) = (sent, keep) {
            self.held.hold(Envelope { id, body });
            // A connection made meanwhile (its own flush found nothing
            // held yet) takes it now.
            if let Some(c) = self.conn.borrow().clone() {
                self.held.send(&c);
            }
        }
    }

    /// Whether `lease`, from the table, is of a pool the allocator
    /// published: checked against a copy asked of it (once per
    /// generation). An allocator too old to be asked is taken at its word.
    async fn vouch(
        &self,
        conn: &Arc<Conn>,
        lease: &Lease,
        deadline: &impl Fn() -> Instant,
    ) -> Vouch {
        if conn.minor < MINOR_FAMILIES {
            return Vouch::Yes;
        }
        if let Some(known) = conn.check_copy(lease) {
            return known;
        }
        let failed_lately = || {
            conn.copy_failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < COPY_RETRY)
        };
        // Unanswered, a lease is used unchecked only if its address is one
        // the allocator published before (in a copy of an earlier pool):
        // what a quarantine or a shrunk pool leaves. An address no copy
        // holds (a table written by someone else, or a pool grown while
        // the allocator is away) goes over the socket.
        let unanswered = || match conn.ever_published(lease.ip) {
            true => Vouch::Unanswered,
            false => Vouch::Unknown,
        };
        if failed_lately() {
            return unanswered();
        }
        // Asked before and not answered (an allocator stopped or busy
        // since): asked again behind the requests, a second after the
        // last time, and meanwhile no lease waits. Each lease that asked
        // again waited `COPY_WAIT`, and every lease queued behind it: a
        // stopped allocator held a worker's requests half a second in
        // every second and a half.
        {
            let mut failed = conn.copy_failed.lock().unwrap_or_else(|e| e.into_inner());
            if failed.is_some() {
                *failed = Some(Instant::now());
                drop(failed);
                self.ask_copy_behind(conn.clone());
                return unanswered();
            }
        }
        // Within the lease's own bound too.
        let wait = || COPY_WAIT.min(deadline().saturating_duration_since(Instant::now()));
        let one = tokio::time::timeout(wait(), conn.fetching.lock()).await;
        if let Some(known) = conn.check_copy(lease) {
            return known;
        }
        if one.is_err() || failed_lately() {
            return unanswered();
        }
        let copy = match self.request_within(Request::Pool, wait()).await {
            Ok(Response::Pool {
                generation,
                entries,
            }) => PoolCopy::new(generation, entries),
            // A pool too large to describe in a frame is not checked.
            Ok(Response::Error { message }) if message.starts_with(POOL_TOO_LARGE) => {
                PoolCopy::unchecked(lease.generation)
            }
            Err(e) if e.unanswered() => {
                let mut failed = conn.copy_failed.lock().unwrap_or_else(|e| e.into_inner());
                if failed.is_none() {
                    warn!("the allocator does not answer; leasing from its table unchecked until it does");
                }
                *failed = Some(Instant::now());
                drop(failed);
                return unanswered();
            }
            _ => return Vouch::Unknown,
        };
        conn.keep_copy(copy);
        conn.check_copy(lease).unwrap_or(Vouch::Unknown)
    }

    /// Asks the allocator for its pool's copy without a request waiting
    /// for it: kept when it comes (within `COPY_AGAIN_WAIT`), which ends
    /// the unchecked leases. One at a time (`fetching`).
    fn ask_copy_behind(&self, conn: Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let Ok(_one) = conn.fetching.try_lock() else {
                return;
            };
            match tokio::time::timeout(COPY_AGAIN_WAIT, conn.call(id, Request::Pool)).await {
                Ok(Some(Response::Pool {
                    generation,
                    entries,
                })) => {
                    info!("the allocator answers again; table leases are checked again");
                    conn.keep_copy(PoolCopy::new(generation, entries));
                }
                // Answered otherwise (a pool too large to describe): it
                // answers, so the next lease asks as a lease does, and
                // takes that answer as it would.
                Ok(Some(_)) => {
                    *conn.copy_failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                _ => {}
            }
        });
    }

    /// A lease for sticky session `key` (user and id) for a request to
    /// `host`: the allocator holds the sessions, so every worker gives a
    /// session the same address. For a site with budgets or cooldowns (an
    /// allocator of minor 10 on), a new session starts on an address that
    /// may serve the site, and every session request counts against the
    /// site's budget of its address.
    pub async fn lease_session(
        &self,
        families: Families,
        key: &str,
        ttl: Duration,
        strict: bool,
        host: &str,
    ) -> Result<Granted, LeaseError> {
        // An allocator too old for sessions is TooOld, as `request` checks
        // every request's minor on the connection it goes on.
        let ttl_secs = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        // Whether the site takes the site path is the connection's to say:
        // waited for (an allocator restarting), as `lease` does.
        // One lease timeout in all: the connection, the request and an
        // older allocator's second request share it.
        let deadline = Instant::now() + self.timeout;
        let current = self.conn.borrow().clone();
        let c = match current {
            Some(c) => c,
            None => self.connection(deadline).await?,
        };
        let site = match c.minor >= MINOR_SESSION_SITE {
            true => c.site_path_now(host),
            false => None,
        };
        let plain = || Request::LeaseSession {
            families,
            key: key.to_string(),
            ttl_secs,
            strict,
        };
        let answer = match site {
            Some(site) => {
                let body = Request::LeaseSessionSite {
                    families,
                    key: key.to_string(),
                    ttl_secs,
                    strict,
                    site,
                };
                match self.request_until(body, deadline).await {
                    // Reconnected meanwhile to an older allocator.
                    Err(LeaseError::TooOld { .. }) => self.request_until(plain(), deadline).await,
                    r => r,
                }
            }
            None => self.request_until(plain(), deadline).await,
        };
        match answer? {
            Response::SessionLost { ip } => Err(LeaseError::SessionLost(ip)),
            Response::SessionsFull { retry_after_ms } => Err(LeaseError::SessionsFull {
                retry_after: Duration::from_millis(retry_after_ms),
            }),
            Response::SessionShared { retry_after_ms } => Err(LeaseError::Throttled {
                retry_after: Duration::from_millis(retry_after_ms),
                block: rotor_protocol::Block::Shared,
            }),
            other => site_answer(other),
        }
    }

    /// Tells the allocator that this host could not use `ip` (it takes the
    /// address out of the rotation for every worker, and has done so when
    /// this returns). Whether it did; an allocator too old to be told, or
    /// out of reach, is not waited for, and one that does not answer is
    /// waited for [`REPORT_WAIT`] at most (the request it came from waits
    /// for a second lease after it, which has a lease timeout of its own).
    pub async fn report_unusable(&self, ip: IpAddr, reason: String) -> bool {
        let knows = self
            .conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.minor >= MINOR_FAMILIES);
        if !knows {
            return false;
        }
        let told = self.request_within(
            Request::Unusable { ip, reason },
            REPORT_WAIT.min(self.timeout),
        );
        matches!(told.await, Ok(Response::Noted { quarantined: true }))
    }

    /// The allocator connection, once there is one (until `deadline`).
    async fn connection(&self, deadline: Instant) -> Result<Arc<Conn>, LeaseError> {
        self.connection_in(&mut self.conn.clone(), deadline).await
    }

    async fn connection_in(
        &self,
        watch: &mut watch::Receiver<Option<Arc<Conn>>>,
        deadline: Instant,
    ) -> Result<Arc<Conn>, LeaseError> {
        // The fast path watches its client once this passes 500 ms (an
        // allocator restarting): one gone is given up, not kept waiting.
        match crate::h1::within_until(deadline, watch.wait_for(Option::is_some)).await {
            Some(Ok(c)) => Ok(c.clone().expect("waited for Some")),
            _ => Err(LeaseError::Timeout {
                after: self.timeout,
                socket: self.socket.clone(),
            }),
        }
    }

    /// A request over the allocator's socket, and its answer. Boxed: the
    /// socket path is rare next to the table's and its future large (about
    /// 1 KB), which inline would be room in every request's state, moved
    /// at each await.
    fn request(&self, body: Request) -> crate::Boxed<'_, Result<Response, LeaseError>> {
        self.request_within(body, self.timeout)
    }

    /// As `request`, answered within `within`.
    fn request_within(
        &self,
        body: Request,
        within: Duration,
    ) -> crate::Boxed<'_, Result<Response, LeaseError>> {
        self.request_until(body, Instant::now() + within)
    }

    /// As `request`, answered by `deadline`.
    fn request_until(
        &self,
        body: Request,
        deadline: Instant,
    ) -> crate::Boxed<'_, Result<Response, LeaseError>> {
        Box::pin(self.request_unboxed(body, deadline))
    }

    /// A request answered by `deadline`.
    async fn request_unboxed(
        &self,
        body: Request,
        deadline: Instant,
    ) -> Result<Response, LeaseError> {
        let mut watch = self.conn.clone();
        loop {
            let conn = self.connection_in(&mut watch, deadline).await?;
            // Checked on each connection (the first may come only now, or
            // a new one be an older allocator's): a request an older
            // allocator cannot read would make it close the connection,
            // and the retry on the next would close that one too.
            // (As this connection's allocator reads it: a report with
            // counters goes to an older one without them.)
            let mut body = body.clone().for_minor(conn.minor);
            if conn.minor < body.min_minor() {
                return Err(LeaseError::TooOld {
                    has: conn.minor,
                    needs: body.min_minor(),
                });
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            // Its entry goes however this ends: answered (already gone),
            // timed out, or the request given up (its client went away,
            // and this future with it), which left entries behind for the
            // connection's life.
            let cancel = matches!(body, Request::LeaseSiteWait { .. }).then_some(&conn.requests);
            let Some((rx, _registered)) = conn.register(id, cancel) else {
                // Gone between the watch and here: wait for the next one.
                wait_replaced(&mut watch, &conn, deadline).await;
                continue;
            };
            if let Request::LeaseSiteWait { wait_ms, .. } = &mut body {
                // The wait left (sent again, its connection died: not the
                // whole wait again), up to the answer's deadline less the
                // time an answer takes.
                let until = deadline.checked_sub(self.timeout).unwrap_or(deadline);
                *wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64;
            }
            let body = with_deadline(body, conn.minor, deadline);
            let sent = conn.requests.send(Envelope { id, body });
            if sent == Err(Unsent::Full) {
                // Not reading: as good as not answering.
                return Err(LeaseError::Backlogged(MAX_QUEUED));
            }
            if sent.is_ok() {
                match crate::h1::within_until(deadline, rx).await {
                    Some(Ok(resp)) => return Ok(resp),
                    // The connection died with our request in flight: the
                    // allocator may or may not have counted it; ask again.
                    Some(Err(_)) => {}
                    None => {
                        return Err(LeaseError::Timeout {
                            after: self.timeout,
                            socket: self.socket.clone(),
                        });
                    }
                }
            }
            // Let the manager publish the connection's end before retrying.
            wait_replaced(&mut watch, &conn, deadline).await;
        }
    }
}

/// Waits (until `deadline`) for the manager to publish that `conn` is gone.
async fn wait_replaced(
    watch: &mut watch::Receiver<Option<Arc<Conn>>>,
    conn: &Arc<Conn>,
    deadline: Instant,
) {
    let replaced = |c: &Option<Arc<Conn>>| c.as_ref().is_none_or(|c| !Arc::ptr_eq(c, conn));
    let _ = crate::h1::within_until(deadline, watch.wait_for(replaced)).await;
}

/// Whether `body` asks for a lease (for a requester that waits for it).
fn is_lease(body: &Request) -> bool {
    match body {
        Request::Lease { .. }
        | Request::LeaseSite { .. }
        | Request::LeaseSiteWait { .. }
        | Request::LeaseSession { .. }
        | Request::LeaseSessionSite { .. } => true,
        Request::Until { request, .. } => is_lease(request),
        _ => false,
    }
}

/// `body` as it goes to an allocator of `minor`: a lease with the
/// deadline its requester gives it up at (`Request::Until`), where the
/// allocator reads one, so that one read after it (the allocator stalled
/// meanwhile) spends no site's budget and starts no session.
fn with_deadline(body: Request, minor: u16, deadline: Instant) -> Request {
    if minor < MINOR_DEADLINE || !is_lease(&body) {
        return body;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    Request::Until {
        deadline_us: rotor_protocol::clock::after(left),
        request: Box::new(body),
    }
}

/// Whether `env` is still to be sent: a lease only while its requester
/// waits for it; anything else always (what is told without an answer
/// waited for is sent as it is).
fn still_wanted(pending: &Pending, env: &Envelope<Request>) -> bool {
    !is_lease(&env.body)
        || pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            // Its waiter there and not dropped (a request whose client
            // went away drops it without removing it).
            .is_some_and(|p| p.get(&env.id).is_some_and(|tx| !tx.is_closed()))
}

/// A request's entry in its connection's `pending`, removed when dropped.
/// A site wait the allocator holds (`cancel`: the connection's requests)
/// is given up there if dropped unanswered: no lease taken for nobody.
struct Registered<'a> {
    pending: &'a Pending,
    id: u64,
    cancel: Option<&'a Queue>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if remove_pending(self.pending, self.id) {
            if let Some(requests) = self.cancel {
                // Its own id from the top of the range (answered `Noted`,
                // which nobody waits for).
                let _ = requests.send(Envelope {
                    id: u64::MAX / 2 + self.id,
                    body: Request::CancelWait { id: self.id },
                });
            }
        }
    }
}

/// A lease as the site path answers it.
fn site_answer(answer: Response) -> Result<Granted, LeaseError> {
    match answer {
        Response::SiteLeased { lease, watch } => Ok((lease, watch)),
        Response::Leased(lease) => Ok((lease, false)),
        Response::NoAddress(refusal) => Err(LeaseError::NoAddress(refusal.reason)),
        Response::Throttled {
            retry_after_ms,
            cooling,
        } => Err(LeaseError::Throttled {
            retry_after: Duration::from_millis(retry_after_ms),
            block: rotor_protocol::Block::of_throttled(cooling),
        }),
        other => Err(LeaseError::Unexpected(format!("{other:?}"))),
    }
}

/// Removes request `id`'s entry; whether it was there (unanswered).
fn remove_pending(pending: &Pending, id: u64) -> bool {
    pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .is_some_and(|p| p.remove(&id).is_some())
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot connect")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("no handshake reply within 5s")]
    Timeout,
}

/// A connected channel and the allocator's protocol minor.
async fn connect(path: &PathBuf) -> Result<(ClientChannel<UnixStream>, Hello), ConnectError> {
    let stream = UnixStream::connect(path).await?;
    // The allocator's process as this worker sees it (the kernel's word,
    // in this pid namespace): its Hello's pid is its own namespace's, pid 1
    // at every restart in a container of its own, and a restart was not
    // told from a reconnection. (0: not visible from here.)
    let seen_pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|p| *p > 0);
    let mut chan: ClientChannel<UnixStream> = Channel::new(stream);
    let mut server = tokio::time::timeout(
        Duration::from_secs(5),
        client_handshake(
            &mut chan,
            Hello::new(Role::Worker, rotor_protocol::software("rotor-worker")),
        ),
    )
    .await
    .map_err(|_| ConnectError::Timeout)??;
    if let Some(pid) = seen_pid {
        server.pid = pid as u32;
    }
    Ok((chan, server))
}

/// Asks where the lease table is and maps it. Returns whether to ask again
/// when this one closes (not when the allocator has none, or it cannot be
/// mapped from here: leases then go over the socket).
async fn attach(conn: &Conn, id: u64) -> bool {
    match conn.call(id, Request::Attach).await {
        Some(Response::Attached { id, .. })
            if *conn.distrusted.lock().unwrap_or_else(|e| e.into_inner()) == Some(id) =>
        {
            // Still the table found tampered with: over the socket until
            // the allocator has replaced it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            conn.reattach.notify_one();
            true
        }
        Some(Response::Attached { path, id, slot }) => {
            match LeaseTable::open(Path::new(&path), Some(id)) {
                Ok(table) => {
                    debug!(table = %path, ?slot, "leasing from the allocator's table");
                    // Prefixes leased from the table in the allocator's
                    // order, as it computes the addresses it is asked for.
                    rotor_protocol::set_order(table.order());
                    conn.first_reloads
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert((table.id(), table.reloads()));
                    *conn.table.write().unwrap_or_else(|e| e.into_inner()) =
                        Some((Arc::new(table), slot));
                    true
                }
                // Not the table announced (replaced or cut short since):
                // over the socket, and asked for again shortly.
                Err(e @ TableError::Invalid(_)) => {
                    debug!(error = %error_chain(&e), "the allocator's lease table changed under this worker; asking again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    conn.reattach.notify_one();
                    true
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot map the allocator's lease table; leasing over its socket, which is slower (see README: the lease table)");
                    false
                }
            }
        }
        Some(Response::Error { message }) => {
            debug!(%message, "the allocator shares no lease table; leasing over its socket");
            false
        }
        _ => false,
    }
}

async fn manage(
    path: PathBuf,
    publish: watch::Sender<Option<Arc<Conn>>>,
    held: Arc<Held>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff(BACKOFF_MIN);
    let mut failures = 0u32;
    // Whether this run of connections was said at info.
    let mut announced = false;
    loop {
        let chan = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect(&path) => r,
        };
        let (chan, server) = match chan {
            Ok((chan, hello)) => (chan, hello),
            Err(e) => {
                failures += 1;
                // One warning per outage, not one per retry.
                if failures == 1 {
                    warn!(allocator = %path.display(), error = %error_chain(&e), "allocator unreachable; retrying");
                } else {
                    debug!(allocator = %path.display(), error = %error_chain(&e), failures, "allocator still unreachable");
                }
                match backoff.pause(&shutdown).await {
                    true => continue,
                    false => return,
                }
            }
        };
        // The backoff starts over only once a connection has lasted: one
        // that ends at once (a peer that takes the Hello and then closes,
        // or sends what does not decode) is a failure too, waited on, not
        // a reconnect storm.
        let connected_at = tokio::time::Instant::now();
        // Said at info once an outage (or the start) ends, not at each
        // connection of a run that ends at once.
        match announced {
            false => info!(allocator = %path.display(), "connected to the allocator"),
            true => debug!(allocator = %path.display(), failures, "connected to the allocator"),
        }
        announced = true;

        let (requests_tx, mut requests_rx) = mpsc::unbounded_channel::<Queued>();
        let conn = Arc::new(Conn {
            requests: Queue {
                tx: requests_tx,
                queued: Default::default(),
                metrics: Default::default(),
            },
            pending: Mutex::new(Some(HashMap::new())),
            table: RwLock::new(None),
            reattach: Notify::new(),
            first_reloads: Mutex::new(None),
            minor: server.minor,
            allocator_pid: server.pid,
            distrusted: Mutex::new(None),
            copies: RwLock::new([None, None]),
            fetching: tokio::sync::Mutex::new(()),
            copy_failed: Mutex::new(None),
        });
        let (mut tx, mut rx) = chan.split();
        if server.minor >= MINOR_DEADLINE {
            // This worker's clock, before any time it tells (a lease's
            // deadline): the allocator reads them on its own by the
            // difference. (Answered `Noted`, which nobody waits for.)
            let now_us = rotor_protocol::clock::now_us();
            let _ = conn.requests.send(Envelope {
                id: u64::MAX / 4,
                body: Request::Clock { now_us },
            });
        }
        publish.send_replace(Some(conn.clone()));
        held.send(&conn);

        // A lease asked for by a request that has stopped waiting (the
        // allocator stopped reading, and the requests queued behind it
        // timed out) is not sent when it reads again: each would move the
        // global rotation past an address nobody uses.
        // A push-back, what is left of its wait (see `Queued`).
        let going = |(env, at): Queued| {
            conn.requests.taken(&env);
            let env = match at {
                Some(at) => due(&env, at.elapsed())?,
                None => env,
            };
            still_wanted(&conn.pending, &env).then_some(env)
        };
        let writer = async {
            while let Some(queued) = requests_rx.recv().await {
                if let Some(env) = going(queued) {
                    tx.feed(&ClientFrame::Request(env)).await?;
                }
                // Batch whatever else is queued into one write.
                while let Ok(queued) = requests_rx.try_recv() {
                    if let Some(env) = going(queued) {
                        tx.feed(&ClientFrame::Request(env)).await?;
                    }
                }
                tx.flush().await?;
            }
            Ok::<_, rotor_protocol::ChannelError>(())
        };
        let reader = async {
            loop {
                match rx.recv().await? {
                    Some(ServerFrame::Response(env)) => {
                        let waiter = conn
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_mut()
                            .and_then(|p| p.remove(&env.id));
                        if let Some(w) = waiter {
                            let _ = w.send(env.body);
                        }
                    }
                    Some(ServerFrame::Hello(_)) => {
                        warn!("allocator sent a second Hello; reconnecting");
                        return Ok(());
                    }
                    None => return Ok::<_, rotor_protocol::ChannelError>(()),
                }
            }
        };
        let attacher = async {
            if server.minor >= MINOR_LEASE_TABLE {
                // Ids from the top, apart from the requests' ids.
                let mut id = u64::MAX;
                // The reloads asked, first: this connection counts them
                // from the answer, and the allocator expects word of
                // those after it, the same count (from the table's count
                // when mapped, a reload asked between the Hello and the
                // mapping was expected and never made).
                conn.first_reloads_asked(id).await;
                id -= 1;
                // A copy of the pool first, before the table is mapped:
                // table leases are checked against it, also when the
                // allocator stops answering before this worker's first
                // request (without a copy they went over the socket, and
                // waited for it).
                if server.minor >= MINOR_FAMILIES {
                    if let Some(Response::Pool {
                        generation,
                        entries,
                    }) = conn.call(id, Request::Pool).await
                    {
                        conn.keep_copy(PoolCopy::new(generation, entries));
                    }
                    id -= 1;
                }
                while attach(&conn, id).await {
                    id -= 1;
                    conn.reattach.notified().await;
                }
            }
            std::future::pending::<()>().await
        };
        let ended = tokio::select! {
            _ = shutdown.cancelled() => None,
            r = writer => Some(r),
            r = reader => Some(r),
            _ = attacher => None,
        };
        publish.send_replace(None);
        // The table is only used while the allocator that owns it is there.
        *conn.table.write().unwrap_or_else(|e| e.into_inner()) = None;
        // Dropping the waiters wakes every request in flight to retry.
        conn.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(ended) = ended else {
            return;
        };
        if connected_at.elapsed() >= STEADY_CONNECTION {
            failures = 0;
            backoff = Backoff(BACKOFF_MIN);
            announced = false;
        }
        failures += 1;
        // An outage warned of has its end said at info too (a connection
        // that ended within its first second had left it at debug).
        if failures == 1 {
            announced = false;
        }
        let why = ended.err().map(|e| error_chain(&e));
        match (failures, why) {
            (1, None) => warn!("allocator closed the connection; reconnecting"),
            (1, Some(e)) => warn!(error = %e, "allocator connection failed; reconnecting"),
            (_, why) => {
                debug!(error = ?why, failures, retry_in = ?backoff.0, "allocator connection ended at once again; reconnecting after a pause")
            }
        }
        if failures > 1 && !backoff.pause(&shutdown).await {
            return;
        }
    }
}

/// The pause before the next try at the allocator: `BACKOFF_MIN`
/// doubling to `BACKOFF_MAX` while the tries fail.
struct Backoff(Duration);

impl Backoff {
    /// Waits the pause, and doubles the next; false if `shutdown` came
    /// first.
    async fn pause(&mut self, shutdown: &CancellationToken) -> bool {
        let pause = self.0;
        self.0 = (pause * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

/// Push-backs (a site's 429 or 503 for a source) the allocator could not
/// be told: it was away (a restart) or not reading. Sent at the next
/// connection (or the next push-back that goes), each with its wait less
/// the time it was held; one whose wait is over is dropped, and one
/// without a wait (the allocator's backoff decides) is kept for
/// [`HELD_BARE`]. A 429 met while the allocator restarted was lost, and
/// the pair not cooled for any worker. At most [`HELD_MAX`], the oldest
/// going first (about 150 bytes each with the site's name).
#[derive(Default)]
struct Held {
    held: Mutex<std::collections::VecDeque<(Instant, Envelope<Request>)>>,
    /// Whether any is held (looked at without the lock by every told
    /// message that went).
    any: std::sync::atomic::AtomicBool,
}

const HELD_MAX: usize = 1024;
/// How long a push-back without a wait of its own is held: the backoff's
/// first wait.
const HELD_BARE: Duration = Duration::from_secs(30);

impl Held {
    fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    fn hold(&self, env: Envelope<Request>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= HELD_MAX {
            held.pop_front();
        }
        held.push_back((Instant::now(), env));
        self.any.store(true, Ordering::Relaxed);
    }

    /// Sends what is held and still due to `conn` (what it does not take
    /// stays held, as it was).
    fn send(&self, conn: &Conn) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, env)) = held.pop_front() {
            let Some(due) = due(&env, at.elapsed()) else {
                continue;
            };
            if conn.minor < due.body.min_minor() {
                continue;
            }
            // Not taken (the connection gone, or not read): held still.
            if conn.requests.send(due).is_err() {
                held.push_front((at, env));
                break;
            }
        }
        self.any.store(!held.is_empty(), Ordering::Relaxed);
    }
}

/// A held push-back as it goes after `waited`: its wait less that; `None`
/// once its wait is over (or, without one, once held [`HELD_BARE`]).
fn due(env: &Envelope<Request>, waited: Duration) -> Option<Envelope<Request>> {
    let mut due = env.clone();
    let going = match &mut due.body {
        Request::Pushback {
            retry_after_secs: Some(secs),
            ..
        } => {
            // ("Retry now", 0, is the allocator's to make a second of:
            // sent as it is, not taken for a wait that ended.)
            let asked = *secs;
            let left = u64::from(asked).saturating_sub(waited.as_secs());
            *secs = left as u32;
            asked == 0 || left > 0
        }
        _ => waited < HELD_BARE,
    };
    going.then_some(due)
}

/// How long a connection to the allocator must last for the reconnect
/// backoff to start over.
const STEADY_CONNECTION: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use rotor_protocol::{server_handshake, ClientFrame, Role, ServerChannel, WorkerMetrics};

    /// An allocator's socket in a directory of its own whose every
    /// connection (counted) is served by `serve`.
    fn fake_allocator<F, Fut>(serve: F) -> (tempfile::TempDir, PathBuf, Arc<AtomicU64>)
    where
        F: Fn(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let conns = Arc::new(AtomicU64::new(0));
        let seen = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(s));
            }
        });
        (dir, path, conns)
    }

    /// A fake allocator's side of a connection once it said `ours` in the
    /// handshake; `None` if the handshake failed.
    async fn greeted(
        s: tokio::net::UnixStream,
        ours: Hello,
    ) -> Option<ServerChannel<tokio::net::UnixStream>> {
        let mut chan: ServerChannel<_> = ServerChannel::new(s);
        server_handshake(&mut chan, ours).await.ok()?;
        Some(chan)
    }

    /// One metrics report queued at a time: the next is refused (the
    /// meter keeps its figures for the next try) until the writer takes
    /// the first; other requests are queued as ever.
    #[test]
    fn one_metrics_report_is_queued_at_a_time() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue {
            tx,
            queued: Default::default(),
            metrics: Default::default(),
        };
        let report = |id| Envelope {
            id,
            body: Request::Metrics(WorkerMetrics::default()),
        };
        assert_eq!(q.send(report(1)), Ok(()));
        assert_eq!(q.send(report(2)), Err(Unsent::Full));
        let status = Envelope {
            id: 3,
            body: Request::HostStatus,
        };
        assert_eq!(q.send(status), Ok(()));
        let first = rx.try_recv().unwrap();
        q.taken(&first.0);
        assert_eq!(q.send(report(4)), Ok(()));
        assert_eq!(q.queued.load(Ordering::Relaxed), 2);
    }

    /// A push-back is stamped as it is queued, and told with what is left
    /// of its wait when the writer takes it (an allocator that stopped
    /// reading, its socket's buffer full); other requests are not.
    #[test]
    fn a_queued_pushback_is_told_less_its_time_queued() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue {
            tx,
            queued: Default::default(),
            metrics: Default::default(),
        };
        let pushback = |secs| Request::Pushback {
            ip: "127.0.0.2".parse().unwrap(),
            site: "a.com".into(),
            status: 429,
            retry_after_secs: secs,
        };
        q.send(Envelope {
            id: 1,
            body: pushback(Some(10)),
        })
        .unwrap();
        q.send(Envelope {
            id: 2,
            body: Request::Status,
        })
        .unwrap();
        let (env, at) = rx.try_recv().unwrap();
        let at = at.expect("a push-back is stamped");
        assert!(at.elapsed() < Duration::from_secs(1));
        let told = due(&env, Duration::from_secs(3)).unwrap();
        assert_eq!(told.body, pushback(Some(7)));
        assert!(
            due(&env, Duration::from_secs(10)).is_none(),
            "its wait ended"
        );
        // "Retry now" goes (the allocator makes it a second), not dropped.
        let now = Envelope {
            id: 3,
            body: pushback(Some(0)),
        };
        assert_eq!(due(&now, Duration::ZERO).unwrap().body, pushback(Some(0)));
        assert!(rx.try_recv().unwrap().1.is_none());
    }

    #[test]
    fn a_lease_nobody_waits_for_is_not_sent() {
        let pending: Pending = Mutex::new(Some(HashMap::new()));
        let (tx, _rx) = oneshot::channel();
        pending.lock().unwrap().as_mut().unwrap().insert(1, tx);
        let (dropped, rx) = oneshot::channel();
        drop(rx);
        pending.lock().unwrap().as_mut().unwrap().insert(5, dropped);
        let env = |id, body| Envelope { id, body };
        let lease = || Request::Lease {
            families: Families::ANY,
        };
        assert!(still_wanted(&pending, &env(1, lease())));
        assert!(!still_wanted(&pending, &env(2, lease())), "timed out");
        assert!(
            !still_wanted(&pending, &env(5, lease())),
            "its requester gone"
        );
        let site = Request::LeaseSite {
            families: Families::ANY,
            site: "example.com".into(),
        };
        assert!(!still_wanted(&pending, &env(3, site)));
        let session = Request::LeaseSessionSite {
            families: Families::ANY,
            key: "u\0s".into(),
            ttl_secs: 60,
            strict: false,
            site: "example.com".into(),
        };
        assert!(!still_wanted(&pending, &env(6, session)));
        let told = Request::SiteOk {
            ip: "127.0.0.2".parse().unwrap(),
            site: "example.com".into(),
        };
        assert!(still_wanted(&pending, &env(4, told)), "told, not asked");
        *pending.lock().unwrap() = None;
        assert!(!still_wanted(&pending, &env(1, lease())), "connection gone");
    }

    /// What waits for an allocator that stopped reading is bounded: past
    /// the cap a request is refused at once (and counted out again), and
    /// the queue takes more once the writer read some.
    #[test]
    fn the_queue_to_the_allocator_is_bounded() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let q = Queue {
            tx,
            queued: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            metrics: Default::default(),
        };
        let env = |id| Envelope {
            id,
            body: Request::Status,
        };
        for id in 0..MAX_QUEUED as u64 {
            assert_eq!(q.send(env(id)), Ok(()));
        }
        assert_eq!(q.send(env(0)), Err(Unsent::Full));
        assert_eq!(q.queued.load(Ordering::Relaxed), MAX_QUEUED);
        // The writer's read, and its count.
        rx.try_recv().unwrap();
        q.queued.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(q.send(env(1)), Ok(()));
        drop(rx);
        q.queued.store(0, Ordering::Relaxed);
        assert_eq!(q.send(env(2)), Err(Unsent::Closed));
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }

    /// An allocator of protocol minor 0 (before the lease table and
    /// metrics), which closes a connection on a request it cannot read,
    /// as an old one does: the worker does not send it one (before, each
    /// metrics report closed the connection, and the retry on the next
    /// closed that one too: a reconnect storm for the report's timeout).
    #[tokio::test]
    async fn a_request_an_older_allocator_cannot_read_is_not_sent() {
        let (_dir, path, conns) = fake_allocator(|s| async move {
            let mut ours = Hello::new(Role::Allocator, "old");
            ours.minor = 0;
            let Some(mut chan) = greeted(s, ours).await else {
                return;
            };
            while let Ok(Some(frame)) = chan.recv().await {
                if let ClientFrame::Request(e) = frame {
                    if e.body.min_minor() > 0 {
                        return;
                    }
                }
            }
        });
        let client = LeaseClient::start(path, Duration::from_secs(2), CancellationToken::new());
        assert!(client.connected(Duration::from_secs(2)).await);
        let started = Instant::now();
        assert!(client
            .report_metrics(crate::meter::Report::default())
            .await
            .is_ok());
        assert!(started.elapsed() < Duration::from_millis(500));
        let err = client.request(Request::HostStatus).await.unwrap_err();
        assert!(
            matches!(err, LeaseError::TooOld { has: 0, needs: 4 }),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(conns.load(Ordering::Relaxed), 1, "no reconnection");
    }

    /// The allocator's process is the kernel's word for it (this process,
    /// here), not its Hello's pid (its own pid namespace's).
    #[tokio::test]
    async fn the_allocators_pid_is_the_kernels_word() {
        let (_dir, path, _) = fake_allocator(|s| async move {
            let mut ours = Hello::new(Role::Allocator, "in a container");
            ours.pid = 1;
            let Some(mut chan) = greeted(s, ours).await else {
                return;
            };
            while let Ok(Some(_)) = chan.recv().await {}
        });
        let client = LeaseClient::start(path, Duration::from_secs(2), CancellationToken::new());
        assert!(client.connected(Duration::from_secs(2)).await);
        assert_eq!(client.allocator_pid(), Some(std::process::id()));
    }

    /// Push-backs told while no allocator is there go to it once it is,
    /// each with its wait less the time it was held; one whose wait ended
    /// meanwhile does not go.
    #[tokio::test]
    async fn a_pushback_told_while_the_allocator_is_away_goes_when_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let client = LeaseClient::start(
            path.clone(),
            Duration::from_secs(2),
            CancellationToken::new(),
        );
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        client.site_pushed_back(ip, "example.com".into(), 429, Some(60));
        client.site_pushed_back(ip, "over.test".into(), 429, Some(1));
        client.site_pushed_back(ip, "bare.test".into(), 503, None);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut chan: ServerChannel<_> = ServerChannel::new(s);
            server_handshake(&mut chan, Hello::new(Role::Allocator, "back"))
                .await
                .unwrap();
            while let Ok(Some(ClientFrame::Request(e))) = chan.recv().await {
                if let Request::Pushback {
                    site,
                    retry_after_secs,
                    ..
                } = e.body
                {
                    let _ = tx.send((site, retry_after_secs));
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            let told = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
            got.push(told.expect("told within 5 s").unwrap());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "a push-back whose wait ended went");
        got.sort();
        assert_eq!(
            got,
            [
                ("bare.test".to_string(), None),
                ("example.com".to_string(), Some(59))
            ]
        );
        assert!(!client.held.any());
    }

    /// A peer on the socket that takes the Hello and closes at once is
    /// reconnected to with the backoff (a pause that doubles to half a
    /// second), not in a loop as fast as it closes.
    #[tokio::test]
    async fn a_connection_that_ends_at_once_is_retried_with_a_pause() {
        let (_dir, path, conns) = fake_allocator(|s| async move {
            let mut chan: ServerChannel<_> = ServerChannel::new(s);
            let _ = server_handshake(&mut chan, Hello::new(Role::Allocator, "closer")).await;
        });
        let stop = CancellationToken::new();
        let _client = LeaseClient::start(path, Duration::from_secs(2), stop.clone());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.cancel();
        // 20, 40, 80, 160, 320, 500, 500 ms: some eight in 1.5 s.
        let n = conns.load(Ordering::Relaxed);
        assert!((2..=12).contains(&n), "{n} connections in 1.5 s");
    }
}
