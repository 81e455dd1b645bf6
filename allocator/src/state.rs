//! The allocator's shared state: the pool, the lease sequence, each source's
//! last good read, and the connected peers. Every lease takes the one lock
//! briefly, never across an await, so leases are atomic and globally ordered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rotor_protocol::{
    error_chain, family_total, AddrStatus, EntryStatus, Families, Family, FamilyStatus, Hello,
    Lease, PeerStatus, QuarantineStatus, Refusal, Response, Segment, SourceStatus, StatusReport,
    StatusReportV2, TableError, PEER_SLOTS,
};

use crate::persist::{
    HandOut, Saved, SavedSource, StateFile, SESSIONS_FILE_NAME, SITES_FILE_NAME, SOURCES_FILE_NAME,
};
use crate::pool::{Pool, TableHome};
use crate::sessions::{Pinned, Sessions};
use crate::sites::{Answer, Rules, Sites, DEFAULT_MAX_ENTRIES};
use crate::source::{Source, SourceError};
use crate::waiters::{refusal, throttled};

pub struct Allocator {
    inner: Mutex<Inner>,
    started: Instant,
    /// Wakes the task that answers held site waits (`serve_waiters`): a
    /// request held, or the pool changed.
    pub waiting: tokio::sync::Notify,
    /// The last metrics scrape rendered, behind the one render running at
    /// a time (see `metrics::rendered`).
    pub rendered: tokio::sync::Mutex<Option<crate::metrics::Rendered>>,
    /// Held by a worker's report of an address it cannot use while it is
    /// judged, with the check of the rotation it may ask for: another
    /// report waits for that check (answered before it, its worker's
    /// retry leased from what the check was about to take out).
    pub reports: tokio::sync::Mutex<()>,
    /// The places of the renders alive at once (`metrics::MAX_RENDERS`).
    pub renders: Arc<tokio::sync::Semaphore>,
    /// Until when the reports made for peers let in only to lease are
    /// owed (see [`Allocator::lease_only_report_wait`]).
    lease_only_reports: std::sync::Mutex<Option<Instant>>,
    /// The keys every worker seals TLS session tickets with.
    pub tickets: crate::tickets::Tickets,
}

/// Reports (status, sites, host status) for the peers let in only to lease
/// take a tenth of the allocator's one thread at most, all together: each
/// is a walk of the pool or the sites table under the lock (tens of
/// milliseconds for 150 000 entries), and twenty such peers asking in a
/// loop held every worker's socket leases past their timeout.
const LEASE_ONLY_REPORT_SHARE: u32 = 10;

/// How far ahead of the time owed such reports may run: `rotor status`
/// asks a status and the sites one after the other.
const LEASE_ONLY_REPORT_AHEAD: Duration = Duration::from_secs(1);

struct Inner {
    pool: Pool,
    sources: Vec<SourceState>,
    last_refresh: Option<SystemTime>,
    peers: BTreeMap<u64, Peer>,
    /// Where to resume the rotation once the first refresh loaded the pool.
    resume_at: [Option<IpAddr>; 2],
    state: Option<StateFile>,
    /// What the state file holds now.
    saved: Saved,
    /// Whether a failed state write has already been logged.
    state_failed: bool,
    /// Set when the table is closed for good (at exit).
    closing: bool,
    /// Sticky sessions (bounded; expired every second).
    sessions: Sessions,
    /// Per-site budgets and cooldowns (bounded; expired every second).
    sites: Sites,
    /// What the workers reported, and the allocator's own figures.
    metrics: crate::metrics::HostMetrics,
    /// Entries out of the rotation: one per listed entry at most (entries
    /// that leave the pool leave this too), so it is bounded by the pool.
    quarantine: HashMap<Segment, Quarantine>,
    /// Entries taken out by hand that are not in the pool now (it changed,
    /// or the allocator restarted before its first refresh): out again
    /// when they come back, until their time ends. At most
    /// [`MAX_HELD`], oldest dropped first.
    held: Vec<HandOut>,
    /// The entries last found sending to the internet through another
    /// interface than their own (`usable::misrouted`): said once, and
    /// again once mended. Within the pool, so bounded by it.
    misrouted: HashSet<Segment>,
    /// Runs of failed connects by entry, from the workers' reports
    /// (`reach`): bounded by the pool.
    reach: crate::reach::Reach,
    /// Where the hand quarantines are kept over a restart (the state
    /// directory's `quarantine.json`), and what it holds.
    hand_file: Option<std::path::PathBuf>,
    hand_saved: Vec<HandOut>,
    /// How many the kept file brought back: held while the pool is read
    /// (a first read that finds nothing, a source not up yet) however
    /// many, not cut to `MAX_HELD` and lost for good.
    hand_restored: usize,
    /// Why its last write failed, if it did (logged once).
    hand_failed: Option<String>,
    /// Where the sticky sessions and the site state go when the allocator
    /// stops cleanly and at each checkpoint (the state directory).
    kept_dir: Option<std::path::PathBuf>,
    /// Changes to the sessions and the site state (leases of a session or
    /// a site, push-backs, normal answers), counted; and the count the
    /// last checkpoint wrote. A checkpoint with nothing new writes nothing.
    changes: u64,
    changes_kept: u64,
    /// Requests waiting for a site's budget, in arrival order (bounded).
    waiters: crate::waiters::Waiters,
    /// When the entries in the rotation were last checked after a worker
    /// found one unusable (see [`Allocator::sweep_due`]), and whether a
    /// report since asks for another.
    swept: Option<Instant>,
    sweep_asked: bool,
}

/// The least time between two checks of the whole rotation that workers'
/// reports ask for (a withdrawn route reported address by address).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The sticky sessions and the site state, copied under the lock (a few
/// words an entry, no allocation each), to be made into what is kept and
/// written outside it ([`Kept::write`]).
pub struct Kept {
    dir: std::path::PathBuf,
    /// The copy's moment on the wall clock.
    wall_ms: u64,
    sessions: crate::sessions::Copied,
    sites: crate::sites::Copied,
    /// The last good lists of the sources kept over a restart (see
    /// `kept_over_restart`), by source key.
    sources: Vec<(String, Vec<Segment>)>,
}

/// What each kept file holds, as the log names it.
const SESSIONS_WHAT: &str = "sticky sessions";
const SITES_WHAT: &str = "site budgets and cooldowns";
const SOURCES_WHAT: &str = "last good lists of the metadata services and pool commands";

/// Whether a source's last good list is kept over a restart: a service
/// or a command (down as the allocator starts, it would leave no
/// addresses where a running allocator keeps them); not a file, an
/// interface or a list, which read as they are.
fn kept_over_restart(source: &Source) -> bool {
    matches!(source, Source::Metadata(_) | Source::Command { .. })
}

/// A source as its saved list names it (`SavedSource`).
fn source_key(source: &Source) -> String {
    format!("{:016x}", rotor_protocol::fnv1a(source.name().bytes()))
}

/// The most entries of a source's list kept over a restart (a larger
/// one is not kept: its copy under the lock at each change would cost).
const SOURCE_KEPT_MAX: usize = 65_536;

impl Kept {
    /// Writes them for the next allocator (each file replaced whole:
    /// written aside, synced, renamed); an empty one is removed. `stop`:
    /// the last write (told at info; a checkpoint at debug). Whether both
    /// were written (a failure is logged).
    pub fn write(self, stop: bool) -> bool {
        let sessions = self.sessions.saved(self.wall_ms);
        let a = keep(
            &self.dir,
            SESSIONS_FILE_NAME,
            SESSIONS_WHAT,
            &sessions,
            stop,
        );
        let sites = self.sites.saved(self.wall_ms);
        let b = keep(&self.dir, SITES_FILE_NAME, SITES_WHAT, &sites, stop);
        let sources: Vec<SavedSource> = self
            .sources
            .into_iter()
            .map(|(source, entries)| SavedSource {
                source,
                entries: entries.iter().map(Segment::to_string).collect(),
            })
            .collect();
        let c = keep(&self.dir, SOURCES_FILE_NAME, SOURCES_WHAT, &sources, stop);
        a && b && c
    }
}

/// The most blocks a copy of the pool for the workers holds: as many as a
/// worker's decoder takes. It counts up to 21 bytes of its frame limit for
/// an IPv6 block (the variant's 4, 16, the length's 1) whatever the wire
/// holds, and a copy past that had failed to decode at every connection;
/// less a margin for the envelope.
const POOL_COPY_MAX_ENTRIES: usize = rotor_protocol::MAX_FRAME_LEN / 21 - 1024;

/// Hand quarantines of entries out of the pool kept for their return.
const MAX_HELD: usize = 4096;

/// Why and until when an entry is out of the rotation.
#[derive(Debug, Clone)]
struct Quarantine {
    reason: String,
    since: Instant,
    next_check: Instant,
    backoff: Duration,
    /// Taken out by hand (`rotor quarantine`): checks do not put it back;
    /// it comes back at `next_check`, or by `rotor release`.
    by_hand: bool,
    /// By hand: when it ends, in Unix seconds (None: until released); what
    /// a restart reads back.
    until: Option<u64>,
    /// Taken out because its connects failed while its family's other
    /// entries connected (`reach`): checks do not put it back before
    /// `next_check`, then one that passes puts it back on trial.
    unreachable: bool,
}

/// Ten years (humantime's `10y`, of 365.25 days) stands for "until
/// released", and is the longest time out by hand.
const TEN_YEARS: Duration = Duration::from_secs(10 * 31_557_600);

/// A time out by hand as `rotor quarantine --for` and the admin API take
/// it: from a second (the clock counts seconds; `0s` was taken as 1 s) to
/// ten years (longer was kept as given: an end in the year 584 billion,
/// said as such by `rotor status`).
pub fn hand_out_for(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|_| format!("`{text}` is not a duration (30m, 2h)"))?;
    if d < Duration::from_secs(1) {
        return Err("at least 1s (to put it back now, release it)".into());
    }
    if d > TEN_YEARS {
        return Err("at most 10 years (leave it out to keep it out until released)".into());
    }
    Ok(d)
}

/// The wall clock in Unix seconds (hand quarantines' ends, workers' last
/// reports).
pub(crate) fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// The wall clock in Unix milliseconds (sessions' times).
fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a clean stop kept in `dir`'s `name` (`what`, for the log), given
/// to `restore` with the wall clock in Unix milliseconds (`wall_ms`, or the
/// file's time of writing if that is later: a clock set back since, by a
/// start before NTP or a VM snapshot, would lengthen what was kept): how
/// many were kept, how many it took back, and whether the file was set
/// aside for an item that did not read; `None` if nothing was kept (or the
/// file was unreadable: logged, and they start over).
fn take_kept<T: serde::de::DeserializeOwned>(
    dir: &std::path::Path,
    name: &str,
    what: &str,
    remove: bool,
    wall_ms: u64,
    restore: impl FnOnce(Vec<T>, u64) -> usize,
) -> Option<(usize, usize, bool)> {
    let path = dir.join(name);
    let written_ms = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    match crate::persist::take_kept::<T>(&path, remove) {
        Ok((saved, bad)) => {
            if bad > 0 {
                tracing::warn!(file = %path.display(), unreadable = bad, read = saved.len(), "some of the {what} kept before the restart could not be read: those start over, the others are back (the file is kept aside as .corrupt)");
            }
            if saved.is_empty() {
                return None;
            }
            let kept = saved.len();
            Some((kept, restore(saved, wall_ms.max(written_ms)), bad > 0))
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the {what} kept before the restart (a file that does not parse is kept aside as .corrupt); they start over");
            None
        }
    }
}

/// Writes `items` (`what`, for the log) to `dir`'s `name` for the next
/// start; removes the file if there are none. `stop`: the last write.
/// Whether it was written.
fn keep<T: serde::Serialize>(
    dir: &std::path::Path,
    name: &'static str,
    what: &str,
    items: &[T],
    stop: bool,
) -> bool {
    // The files whose last write failed: a failure is warned of once
    // until a write succeeds again (a full disk or a directory made
    // read-only had been warned of at every checkpoint).
    static FAILING: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let path = dir.join(name);
    let written = match items.is_empty() {
        true => crate::persist::clear_kept(&path),
        false => crate::persist::write_kept(&path, items),
    };
    let was_failing = {
        let mut failing = FAILING.lock().unwrap_or_else(|e| e.into_inner());
        let at = failing.iter().position(|n| *n == name);
        match (&written, at) {
            (Ok(()), Some(i)) => {
                failing.swap_remove(i);
                true
            }
            (Err(_), None) => {
                failing.push(name);
                false
            }
            (_, at) => at.is_some(),
        }
    };
    if written.is_ok() && was_failing {
        tracing::info!(file = %path.display(), "the {what} are written again");
    }
    match written {
        Ok(()) if stop && !items.is_empty() => {
            tracing::info!(file = %path.display(), entries = items.len(), "{what} kept for the next start");
            true
        }
        Ok(()) => {
            tracing::debug!(file = %path.display(), entries = items.len(), "{what} checkpointed");
            true
        }
        Err(e) if was_failing => {
            tracing::debug!(file = %path.display(), error = %e, "cannot write the {what} still");
            false
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the {what}: a start now would have the last one written, if any (tried again at each checkpoint; said again only once written)");
            false
        }
    }
}

impl Quarantine {
    /// Out by hand for `for_` (None: until released) from `now`.
    fn by_hand(for_: Option<Duration>, now: Instant, restored: bool) -> Quarantine {
        // (A peer's `for_secs` is not trusted to be `hand_out_for`'s.)
        let for_ = for_.map(|d| d.clamp(Duration::from_secs(1), TEN_YEARS));
        let wait = for_.unwrap_or(TEN_YEARS);
        let mut reason = match for_ {
            Some(d) => format!("taken out by hand for {}", humantime::format_duration(d)),
            None => "taken out by hand until released".to_string(),
        };
        if restored {
            reason += " (kept over a restart or a pool change)";
        }
        Quarantine {
            reason,
            since: now,
            next_check: now + wait,
            backoff: wait,
            by_hand: true,
            until: for_.map(|d| unix_now().saturating_add(d.as_secs())),
            unreachable: false,
        }
    }
}

/// The first wait before an entry out of the rotation is checked again;
/// each failed check doubles it, up to [`QUARANTINE_MAX`].
pub const QUARANTINE_MIN: Duration = Duration::from_secs(1);
pub const QUARANTINE_MAX: Duration = Duration::from_secs(300);
/// Whether a worker's site name is one (a name or an address, short).
/// Warns of pool entries no lease reaches: listed after 2^44 addresses of
/// their family (behind a /64 or wider prefix), they would sit in the pool,
/// shown as in the rotation, and never be leased.
pub fn warn_unreached(entries: &[rotor_protocol::Segment]) {
    if let Some(text) = unreached_text(entries) {
        tracing::warn!("{text}");
    }
}

/// What `warn_unreached` says (and `--check`), if there is anything to say.
pub fn unreached_text(entries: &[rotor_protocol::Segment]) -> Option<String> {
    const NAMED: usize = 5;
    let unreached = rotor_protocol::unreached(entries);
    if unreached.is_empty() {
        return None;
    }
    let named: Vec<String> = unreached
        .iter()
        .take(NAMED)
        .map(ToString::to_string)
        .collect();
    let mut names = named.join(", ");
    if unreached.len() > NAMED {
        names.push_str(&format!(" and {} more", unreached.len() - NAMED));
    }
    Some(format!(
        "{} pool entries are never leased while the prefixes listed before them are in the rotation: {names} come after 2^44 addresses of their family (behind a prefix of a /64 or wider, which the cursor never gets past). List such a prefix last in its family (sources are combined by kind: --pool, then --pool-file, --interface, --metadata, --pool-command; so give it in the last kind that has that family's entries, or move those entries before it), or list the prefix that holds several /64s (a /56, a /48) instead of each",
        unreached.len()
    ))
}

fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= 255
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
}

/// The longest software name a peer's Hello is kept with.
const MAX_SOFTWARE: usize = 128;

/// The longest a push-back from a peer let in only to lease cools an
/// (address, site) pair (a trusted worker's: a day, `RETRY_AFTER_MAX`).
pub const LEASE_ONLY_PUSHBACK_MOST: Duration = Duration::from_secs(600);

/// Sticky sessions held at most, unless configured.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;

impl Inner {
    /// The addresses in rotation (an entry may be a prefix of many).
    fn in_rotation(&self) -> u64 {
        let rotations = self.pool.rotations();
        Family::ALL
            .into_iter()
            .map(|f| rotations.total(f))
            .fold(0u64, u64::saturating_add)
    }

    /// `answer`, to a request to `site` outside sticky sessions, refused
    /// it for the site's budget: the sessions keep to their share of it
    /// a while (see `Sites::others_refused`).
    fn note_refused(&mut self, site: &str, answer: &Response, now: Instant) {
        if let Response::Throttled { cooling: false, .. } = answer {
            self.sites.others_refused(site, now);
        }
    }

    /// A lease for a request to `site` (see [`Allocator::lease_site`]).
    fn lease_site(&mut self, peer: u64, families: Families, site: &str, now: Instant) -> Response {
        // No state for what is no site's name (a worker sends a resolved
        // host's; a peer that sends megabytes of anything holds none of
        // it): from the shared rotation, as a push-back for it is ignored.
        if !valid_site(site) {
            let answer = self.lease_checked(families);
            return self.answer(peer, answer);
        }
        // Ends within three turns: a start per family at most (its cursor
        // is set then), and a walk answers.
        loop {
            let Inner { sites, pool, .. } = &mut *self;
            let answer = sites.lease_in(site, families, pool.rotations(), pool.generation(), now);
            // (A refusal changes nothing a checkpoint keeps: a site only
            // refused is not written again at every interval.)
            if !matches!(answer, Answer::Shared | Answer::Throttled { .. }) {
                self.changes += 1;
            }
            match answer {
                Answer::Shared => break,
                Answer::Address { ip, index, watch } => {
                    self.pool.table().flag_site(site);
                    let ip = match self.fresh_in_prefix(ip) {
                        Some(fresh) => fresh,
                        None => {
                            self.pool.table().count_lease(Family::of(&ip), index);
                            ip
                        }
                    };
                    return self.site_lease(peer, ip, watch);
                }
                Answer::Throttled {
                    retry_after,
                    cooling,
                } => {
                    self.pool.table().flag_site(site);
                    return throttled(now + retry_after, cooling, now);
                }
                Answer::Start(family) => {
                    self.pool.table().flag_site(site);
                    // A site with no cursor may hold pairs (kept over an
                    // allocator's restart, its cursors not): if it has
                    // spent the shared rotation's next address, its own
                    // begins there with no lease of it. Leased, that
                    // address was counted and passed over in the shared
                    // rotation, and not used.
                    let rotations = self.pool.rotations();
                    let due = self.pool.table().position().next_due[family.index()];
                    if let Some(due) = due.filter(|ip| self.sites.spent(site, *ip, now)) {
                        let index = rotations.index_of(due).unwrap_or(0);
                        let total = rotations.total(family);
                        self.sites.place(site, family, index, total);
                        continue;
                    }
                    let lease = match self.lease_checked(Families::only(family)) {
                        Some(Ok(l)) => l,
                        other => return self.answer(peer, other),
                    };
                    // (No scan of the pool: a new site's first lease.)
                    let rotations = self.pool.rotations();
                    let total = rotations.total(family);
                    let index = rotations.index_of(lease.ip).unwrap_or(0);
                    if let Some(watch) = self.sites.started(site, lease.ip, index, total, now) {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.leases += 1;
                        }
                        return Response::SiteLeased { lease, watch };
                    }
                }
            }
        }
        let answer = self.lease_checked(families);
        self.answer(peer, answer)
    }

    /// A site lease behind the requests held waiting for the site: in the
    /// families they claim a new one is refused until they are served
    /// (and, with a wait of its own, held behind them); in its others, if
    /// the pool has any, it is tried at once.
    fn lease_site_behind(
        &mut self,
        peer: u64,
        families: Families,
        site: &str,
        now: Instant,
    ) -> Response {
        let Some((claimed, until, cooling)) = self.waiters.ahead(site, families) else {
            return self.lease_site(peer, families, site, now);
        };
        let rest = Families {
            v4: families.v4 && !claimed.v4,
            v6: families.v6 && !claimed.v6,
        };
        let rotations = self.pool.rotations();
        if !Family::ALL
            .into_iter()
            .any(|f| rest.accepts_family(f) && rotations.total(f) > 0)
        {
            return throttled(until, cooling, now);
        }
        let answer = self.lease_site(peer, rest, site, now);
        match refusal(&answer, now) {
            // Refused in its other family too: whichever frees first.
            Some((u, c)) if u < until => throttled(u, c, now),
            Some(_) => throttled(until, cooling, now),
            None => answer,
        }
    }

    /// The sessions and the site state as they are now, for the state
    /// directory (none without one); the changes counted so far are
    /// theirs.
    fn copy_kept(&mut self) -> Option<Kept> {
        let dir = self.kept_dir.clone()?;
        self.changes_kept = self.changes;
        let (now, wall_ms) = (Instant::now(), unix_now_ms());
        Some(Kept {
            dir,
            wall_ms,
            sessions: self.sessions.copy(now),
            sites: self.sites.copy(now),
            sources: self
                .sources
                .iter()
                .filter(|s| kept_over_restart(&s.source))
                .filter(|s| !s.last_good.is_empty() && s.last_good.len() <= SOURCE_KEPT_MAX)
                .map(|s| (source_key(&s.source), s.last_good.clone()))
                .collect(),
        })
    }

    /// The next address of one of `families` from the table, checked
    /// against the pool: the table's file can be written by others, so a
    /// lease of an address not in the pool, or a table closed while
    /// serving, is a table to replace before anything is handed out.
    fn lease_checked(&mut self, families: Families) -> Option<Result<Lease, Refusal>> {
        let mut answer = self.pool.lease(families);
        let bad = match &answer {
            Some(Ok(l)) => !self.pool.holds(l.ip),
            None => !self.closing,
            // An empty pool where the rotation has entries: the table's
            // pages were cut or zeroed under it (within its first page,
            // which faults nowhere). (A family it lacks is looked at no
            // further: checked on each such refusal, it would cost a walk
            // of the pool.)
            Some(Err(r)) => {
                r.reason == rotor_protocol::NoAddress::EmptyPool && !self.pool.active().is_empty()
            }
        };
        if bad {
            match (self.pool.table().is_cut_short(), &answer) {
                (true, _) => tracing::error!("the lease table's file was cut short (truncated) under rotor; replacing it"),
                (false, Some(Err(_))) => tracing::error!("the lease table refused a lease the pool has addresses for (its file was cut or overwritten under rotor); replacing it"),
                (false, _) => tracing::error!("the lease table handed out an address not in the pool, or was closed by someone else; replacing it"),
            }
            answer = match self.rebuild_table(false) {
                true => self.pool.lease(families),
                // Never an address not in the pool: no answer this time.
                false => None,
            };
            if matches!(&answer, Some(Ok(l)) if !self.pool.holds(l.ip)) {
                answer = None;
            }
        }
        answer
    }

    /// The reply to a lease asked by `peer`.
    fn answer(&mut self, peer: u64, answer: Option<Result<Lease, Refusal>>) -> Response {
        match answer {
            Some(Ok(lease)) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.leases += 1;
                }
                Response::Leased(lease)
            }
            Some(Err(refusal)) => Response::NoAddress(refusal),
            None if self.closing => Response::Error {
                message: "the allocator is stopping".into(),
            },
            None => Response::Error {
                message: "the lease table is being repaired; ask again".into(),
            },
        }
    }

    /// See [`Allocator::repair_table`].
    fn repair_table(&mut self) -> bool {
        if self.closing {
            return false;
        }
        if let Some(fault) = self.pool.table_fault() {
            tracing::error!(%fault, "the lease table was tampered with; replacing it (its rotation and lease count taken from its last sound check)");
            return self.rebuild_table(false);
        }
        // Its file removed (with the socket's directory, say): the
        // workers mapping it lease on, but one that starts could not map
        // it, and leased over the socket for the rest of this allocator's
        // life. Made again (a file another put there is left).
        let home = self.pool.home().cloned();
        let gone = home.as_ref().is_some_and(|p| {
            std::fs::symlink_metadata(p).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        });
        if gone {
            let path = home.unwrap_or_default();
            tracing::warn!(file = %path.display(), "the lease table's file was removed; made again");
            return self.rebuild_table(true);
        }
        false
    }

    /// Replaces a tampered table (see `Pool::rebuild_table`; `trusted`:
    /// its words are as rotor wrote them, its file only removed); whether
    /// it was.
    fn rebuild_table(&mut self, trusted: bool) -> bool {
        let old_table = self.pool.table().clone();
        if let Err(e) = self.pool.rebuild_table(trusted) {
            tracing::error!(error = %error_chain(&e), "cannot replace the lease table");
            return false;
        }
        self.table_moved(&old_table, trusted);
        true
    }

    /// After the pool moved to a new table (grown or rebuilt): leases
    /// counted in `old` stay with their peers, which attach to the new one.
    /// From a table not `trusted` (its counts may be anyone's words), a
    /// peer's count is no more than every lease counted (the sequence of
    /// its last sound check, which the new table goes on from).
    fn table_moved(&mut self, old: &Arc<rotor_protocol::LeaseTable>, trusted: bool) {
        if Arc::ptr_eq(old, self.pool.table()) {
            return;
        }
        let most = match trusted {
            true => u64::MAX,
            false => self.pool.table().position().seq,
        };
        for p in self.peers.values_mut() {
            if let Some(slot) = p.slot.take() {
                p.leases += old.peer_leases(slot).min(most);
            }
        }
        self.publish_sites();
    }

    /// Writes the site filter into the table (see `sites`).
    fn publish_sites(&mut self) {
        let (all, filter) = self.sites.filter();
        self.pool.table().publish_sites(all, &filter);
    }

    /// Counts a lease handed out for `peer` outside the shared rotation.
    /// For a site lease of `ip` in a prefix: a fresh address of its key
    /// from the shared rotation. A site's own rotation walks the pool's
    /// order from a cursor of its own, so in a prefix it handed out the
    /// addresses the shared rotation had handed out (each site and each
    /// session the same ones, a site starting over its own again), where
    /// no address of a prefix is to repeat until the prefix is used up. A
    /// budget and a cooldown go by key (`--site-v6-prefix`), never by the
    /// host part: the shared rotation's next address is taken when it is
    /// in `ip`'s entry, and moved into `ip`'s key (the same one, where the
    /// entry is no wider than a key). `None`: `ip` is no prefix's, a key
    /// is one address, or the shared rotation is in another entry (a
    /// worker's lease meanwhile may take it there: that address is
    /// passed over).
    fn fresh_in_prefix(&mut self, ip: IpAddr) -> Option<IpAddr> {
        self.sites.into_key_of(ip, ip)?;
        let entry = self.pool.entry_of(ip).filter(|e| !e.is_single())?;
        let family = Family::of(&ip);
        let due = self.pool.table().position().next_due[family.index()]?;
        if !entry.contains(due) {
            return None;
        }
        let lease = match self.lease_checked(Families::only(family)) {
            Some(Ok(lease)) => lease,
            _ => return None,
        };
        match entry.contains(lease.ip) {
            true => self.sites.into_key_of(ip, lease.ip),
            false => None,
        }
    }

    fn site_lease(&mut self, peer: u64, ip: IpAddr, watch: bool) -> Response {
        let lease = Lease {
            ip,
            seq: self.pool.table().next_seq(),
            generation: self.pool.generation(),
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.leases += 1;
        }
        Response::SiteLeased { lease, watch }
    }

    /// Records one check of `e`: into quarantine (logged once), a longer
    /// wait, or out of quarantine (logged).
    fn judge(&mut self, e: Segment, check: &Result<(), String>, now: Instant, told: &mut Told) {
        self.judge_as(e, check, now, false, told)
    }

    /// As `judge`; a worker's `report` puts an entry in quarantine but does
    /// not lengthen one (a burst of reports must not reach the longest
    /// wait at once: only failed checks double it).
    fn judge_as(
        &mut self,
        e: Segment,
        check: &Result<(), String>,
        now: Instant,
        report: bool,
        told: &mut Told,
    ) {
        if let Some(q) = self.quarantine.get(&e).filter(|q| q.by_hand) {
            if q.next_check <= now {
                self.quarantine.remove(&e);
                tracing::info!(entry = %e, "pool address back in the rotation: its time out by hand ended");
            }
            return;
        }
        if let Some(q) = self.quarantine.get(&e).filter(|q| q.unreachable) {
            match check {
                Ok(()) if q.next_check > now => return,
                Ok(()) => {
                    self.quarantine.remove(&e);
                    tracing::info!(entry = %e, "pool address back in the rotation on trial after its time out for failed connects (out again, for twice as long, if its connects fail again)");
                    return;
                }
                // It cannot be used at all: out as any such entry once its
                // time is over (a check failing for a moment does not cut
                // that time short).
                Err(_) if q.next_check > now => return,
                Err(_) => {
                    self.quarantine.remove(&e);
                }
            }
        }
        match (check, self.quarantine.get_mut(&e)) {
            (Err(_), Some(_)) if report => {}
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => {
                self.quarantine.remove(&e);
                told.back += 1;
                if told.back <= Told::EACH {
                    tracing::info!(entry = %e, "pool address usable again; back in the rotation");
                }
            }
            (Err(reason), Some(q)) => {
                q.backoff = (q.backoff * 2).min(QUARANTINE_MAX);
                q.next_check = now + q.backoff;
                q.reason.clone_from(reason);
            }
            (Err(reason), None) => {
                told.out += 1;
                if told.out <= Told::EACH {
                    tracing::warn!(entry = %e, %reason, "pool address out of the rotation until it can be used");
                }
                self.quarantine.insert(
                    e,
                    Quarantine {
                        reason: reason.clone(),
                        since: now,
                        next_check: now + QUARANTINE_MIN,
                        backoff: QUARANTINE_MIN,
                        by_hand: false,
                        until: None,
                        unreachable: false,
                    },
                );
            }
        }
    }

    /// Counts a worker's report of answers by source (`reach`): an entry
    /// that answers is not at fault.
    fn reach_answers(&mut self, peer: u64, m: &rotor_protocol::WorkerMetrics, now: Instant) {
        let mut ok: HashMap<Segment, u64> = HashMap::new();
        for s in &m.by_source {
            let n = s
                .responses
                .iter()
                .fold(s.tunnels, |a, n| a.saturating_add(*n));
            if n == 0 || s.ip.is_unspecified() {
                continue;
            }
            if let Some(e) = self.pool.entry_of(s.ip) {
                let d = ok.entry(e).or_default();
                *d = d.saturating_add(n);
            }
        }
        let connects_ok = m
            .connect_seconds
            .counts
            .iter()
            .fold(0u64, |a, n| a.saturating_add(*n));
        self.reach.answers(now, connects_ok, &ok);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.answered = ok.into_keys().collect();
        }
    }

    /// Counts a worker's confirmed connect failures by source (`reach`),
    /// and takes out the entries whose connects keep failing where the
    /// others' answer: at most a quarter of a family's entries (one at
    /// least) out so at once.
    fn reach_failures(
        &mut self,
        peer: u64,
        by_source: &[rotor_protocol::SourceUnreached],
        now: Instant,
    ) {
        let answered = self
            .peers
            .get_mut(&peer)
            .map(|p| std::mem::take(&mut p.answered))
            .unwrap_or_default();
        // A worker of before `MINOR_UNREACHED_BY_NET` names destinations
        // by site, a newer one by network: the kind is in the name's top
        // bit, and only names of one kind are compared (in a rolling
        // upgrade, one site's two names read as two destinations).
        let by_site = self
            .peers
            .get(&peer)
            .is_some_and(|p| p.hello.minor < rotor_protocol::MINOR_UNREACHED_BY_NET);
        let kind = |k: u64| match by_site {
            true => k | crate::reach::BY_SITE,
            false => k & !crate::reach::BY_SITE,
        };
        let mut failed: HashMap<Segment, (u64, Vec<u64>)> = HashMap::new();
        for s in by_source.iter().take(rotor_protocol::UNREACHED_LISTED) {
            let entry = self.pool.entry_of(s.ip).filter(|e| !answered.contains(e));
            if let Some(e) = entry {
                let d = failed.entry(e).or_default();
                d.0 = d.0.saturating_add(s.failed);
                let dests = s.destinations.iter();
                for k in dests
                    .take(rotor_protocol::UNREACHED_DESTINATIONS)
                    .map(|k| kind(*k))
                {
                    if d.1.len() < rotor_protocol::UNREACHED_DESTINATIONS && !d.1.contains(&k) {
                        d.1.push(k);
                    }
                }
            }
        }
        if failed.is_empty() {
            return;
        }
        let quarantine = &self.quarantine;
        // Counted once, when a first entry might go out.
        let mut room: Option<[usize; 2]> = None;
        let pool = &self.pool;
        let out = self.reach.failures(
            now,
            &failed,
            |e| quarantine.contains_key(e),
            |e| {
                let room = room.get_or_insert_with(|| {
                    // A quarter of the family's entries not out for another
                    // reason (by hand, unusable), one at least of two or
                    // more: never the last.
                    let mut serving = [0usize; 2];
                    for x in pool.addrs() {
                        if quarantine.get(x).is_none_or(|q| q.unreachable) {
                            serving[x.family().index()] += 1;
                        }
                    }
                    let mut left = serving.map(|n| match n {
                        0 | 1 => 0,
                        n => (n / 4).max(1),
                    });
                    for (x, q) in quarantine {
                        if q.unreachable {
                            let l = &mut left[x.family().index()];
                            *l = l.saturating_sub(1);
                        }
                    }
                    left
                });
                let left = &mut room[e.family().index()];
                let some = *left > 0;
                *left = left.saturating_sub(1);
                some
            },
        );
        if out.is_empty() {
            return;
        }
        let mut told = 0;
        for o in &out {
            let reason = format!(
                "its last {} connects failed where other addresses' were answered (not routed to this host upstream?); tried again after {}",
                o.failed,
                humantime::format_duration(o.wait)
            );
            told += 1;
            if told <= Told::EACH {
                tracing::warn!(entry = %o.entry, %reason, "pool address out of the rotation: connects from it fail");
            }
            if let Some(t) = self.metrics.by_source.get_mut(&o.entry.to_string()) {
                t.unreachable += 1;
            }
            self.quarantine.insert(
                o.entry,
                Quarantine {
                    reason,
                    since: now,
                    next_check: now + o.wait,
                    backoff: o.wait,
                    by_hand: false,
                    until: None,
                    unreachable: true,
                },
            );
        }
        if told > Told::EACH {
            tracing::warn!(
                more = told - Told::EACH,
                "more pool addresses out of the rotation: connects from them fail (rotor_source_unreachable_total counts them)"
            );
        }
        self.publish_quarantine();
    }

    /// Every entry the sources list (their last good reads), in order:
    /// what the pool is made from. (`pool.addrs()` leaves out the entries
    /// another holds; one of those serves while that other is out.)
    fn listed(&self) -> Vec<Segment> {
        self.sources
            .iter()
            .flat_map(|s| s.last_good.iter().copied())
            .collect()
    }

    /// The narrowest listed entry holding `ip` (as the sources list them:
    /// the pool leaves out an entry another holds): the address's own
    /// entry if it is listed, not the prefix it lies in. (The prefix's
    /// rotation may reach the address, once in its 65 536 or more; a
    /// prefix taken out for it had the address's own entry serve alone,
    /// the very address asked out, for every request of its family.)
    fn narrowest(&self, ip: IpAddr) -> Option<Segment> {
        self.listed()
            .into_iter()
            .filter(|x| x.contains(ip))
            .max_by_key(|x| x.prefix_len())
    }

    /// Says which saved positions a publish used up (the pool applies
    /// one in the first publish with addresses of its family), and
    /// forgets them.
    fn note_resumed(&mut self) {
        let resumed = self.pool.take_resumed();
        for (family, resumed) in Family::ALL.into_iter().zip(resumed) {
            let saved = match resumed {
                Some(_) => self.resume_at[family.index()].take(),
                None => None,
            };
            match (saved, resumed) {
                (Some(next), Some(true)) => {
                    tracing::info!(%family, %next, seq = self.saved.seq, "resuming the saved rotation")
                }
                (Some(saved), _) => tracing::info!(
                    %family,
                    %saved,
                    "the saved next address is no longer in the rotation (or its prefix is leased in a new order); the family starts at its first address"
                ),
                (None, _) => {}
            }
        }
    }

    fn publish_quarantine(&mut self) {
        let q: HashSet<Segment> = self.quarantine.keys().copied().collect();
        // From the sources' lists, not the pool's: an entry inside one
        // taken out now serves meanwhile (it had left the rotation until
        // the next refresh, its family with it if it was the only one).
        let addrs = self.listed();
        if let Err(e) = self.pool.update(addrs, q) {
            tracing::error!(error = %error_chain(&e), "cannot grow the lease table; keeping the previous pool");
        }
        self.note_resumed();
        self.save_hand();
    }

    /// Before the pool becomes `listed`: hand quarantines of entries that
    /// leave it are held, and held ones listed again (the same entry) are
    /// out again for the rest of their time; those whose time ended are
    /// forgotten.
    fn carry_hand(&mut self, listed: &HashSet<Segment>, now: Instant) {
        let leaving: Vec<HandOut> = self
            .quarantine
            .iter()
            .filter(|(e, q)| q.by_hand && !listed.contains(e))
            .map(|(e, q)| HandOut {
                entry: *e,
                until: q.until,
            })
            .collect();
        self.held.extend(leaving);
        if self.held.is_empty() {
            return;
        }
        let wall = unix_now();
        let held = std::mem::take(&mut self.held);
        for h in held {
            if h.until.is_some_and(|u| u <= wall) {
                continue;
            }
            // Back out when its own entry is listed again, only: as
            // `steer` takes out the narrowest entry holding an address, a
            // single (or a /64) held is not the prefix that now holds it
            // (a /48 out until released for one address, once that
            // address was dropped from the list).
            if !listed.contains(&h.entry) {
                self.held.push(h);
                continue;
            }
            let e = h.entry;
            if self.quarantine.get(&e).is_some_and(|q| q.by_hand) {
                continue;
            }
            let for_ = h.until.map(|u| Duration::from_secs(u - wall));
            let q = Quarantine::by_hand(for_, now, true);
            tracing::warn!(entry = %e, reason = %q.reason, "pool address out of the rotation");
            self.quarantine.insert(e, q);
        }
        let over = self
            .held
            .len()
            .saturating_sub(MAX_HELD.max(self.hand_restored));
        self.held.drain(..over);
    }

    /// Writes the hand quarantines (in the pool and held) to the state
    /// directory when they changed. Each end in the pool is written on the
    /// wall clock of now, from its end on the monotonic one: a quarantine
    /// made while the clock was a year off (a host before NTP), then put
    /// right, had its end kept as made, and a restart had it end a year
    /// early or late. Called at each pool load, so a clock that steps by a
    /// minute or more is written again within a refresh.
    fn save_hand(&mut self) {
        let Some(path) = &self.hand_file else { return };
        let (mono, wall) = (Instant::now(), unix_now());
        let mut now: Vec<HandOut> = self
            .quarantine
            .iter()
            .filter(|(_, q)| q.by_hand)
            .map(|(e, q)| HandOut {
                entry: *e,
                until: q.until.map(|_| {
                    let left = q.next_check.saturating_duration_since(mono);
                    wall.saturating_add(left.as_secs().max(1))
                }),
            })
            .chain(self.held.iter().copied())
            .collect();
        now.sort_by_key(|h| (h.entry.base(), h.entry.prefix_len()));
        // (Ends within a minute of what was written are the same.)
        let near = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => a.abs_diff(b) < 60,
            (a, b) => a == b,
        };
        let same = now.len() == self.hand_saved.len()
            && (now.iter().zip(&self.hand_saved))
                .all(|(a, b)| a.entry == b.entry && near(a.until, b.until));
        if same {
            // The file holds them (a failed write's wish undone since): kept.
            self.hand_failed = None;
            return;
        }
        match crate::persist::write_hand(path, &now) {
            Ok(()) => {
                self.hand_saved = now;
                self.hand_failed = None;
            }
            Err(e) => {
                if self.hand_failed.is_none() {
                    tracing::warn!(file = %path.display(), error = %e, "cannot keep the addresses taken out by hand: a restart would put them back");
                }
                self.hand_failed = Some(format!("{}: {e}", path.display()));
            }
        }
    }
}

struct SourceState {
    source: Source,
    /// The last successful read; kept when a later read fails.
    last_good: Vec<Segment>,
    error: Option<String>,
    /// When its failure was last warned of: a failure is warned of when it
    /// begins or changes, and again every `SOURCE_FAILING_SAID` it lasts
    /// (not at each refresh).
    warned: Option<Instant>,
    /// Whether a read of it has succeeded since the start.
    read_once: bool,
}

/// How often a pool source's failure that goes on unchanged is warned of
/// again.
const SOURCE_FAILING_SAID: Duration = Duration::from_secs(600);

impl SourceState {
    /// The addresses its last good read listed (saturated at `u128::MAX`).
    fn listed(&self) -> u128 {
        self.last_good
            .iter()
            .fold(0u128, |n, e| n.saturating_add(e.len()))
    }
}

struct Peer {
    hello: Hello,
    /// Whether the kernel gave its pid (see `WorkerGauges::seen`).
    pid_seen: bool,
    since: Instant,
    /// Leases asked over the socket, and those counted in a table the peer
    /// no longer uses.
    leases: u64,
    /// The peer's lease counter in the current table, once it attached.
    slot: Option<u32>,
    /// Whether it was let in to lease only (`--allow-uid` and the like):
    /// such peers hold half the table's slots at most.
    lease_only: bool,
    /// The last reload a worker said it made: the table's id and reload
    /// count it acted on, and the parts that failed.
    reloaded: Option<((u64, u64), Failed)>,
    /// The table's id and reload count when it connected, or, once it
    /// asked (`reloads_for`, a worker's first request), the count it was
    /// told: a reload asked before is not one it makes (it read its files
    /// as it started, and counts from what it was told).
    joined: (u64, u64),
    /// Whether `joined` is the count it was told.
    told: bool,
    /// The entries its last metrics report had answers from: its word of
    /// failed connects that follows is not heard for them (an entry of
    /// many addresses, a /64, answers from some while others fail; one
    /// that answers is not at fault). At most a report's sources.
    answered: HashSet<Segment>,
    /// When it connected or last sent a metrics report (a worker sends
    /// one a second): `/health`.
    heard: Instant,
    /// Whether its last report listed a listener: a draining worker
    /// closed its listeners, and reports none (`/health`).
    accepting: bool,
}

/// How long `/health` waits for a word from some worker (each reports
/// every second) before it says none serves: a worker stopped (SIGSTOP)
/// or stuck stays connected.
const HEALTH_SILENCE: Duration = Duration::from_secs(5);

/// Parts of a worker's reload that failed: what, and why.
type Failed = Vec<(String, String)>;

/// Entries that left or came back to the rotation in one pass of checks:
/// the first few are logged each, the rest summed up in one line (a /16
/// listed address by address that is not this host's would be 65 536
/// warnings).
#[derive(Default)]
struct Told {
    out: usize,
    back: usize,
}

impl Told {
    const EACH: usize = 8;

    fn sum_up(&self) {
        if self.out > Told::EACH {
            tracing::warn!(
                more = self.out - Told::EACH,
                total = self.out,
                "more pool addresses out of the rotation until they can be used (rotor_source_quarantined counts them; `rotor status` lists them with the reason if the pool is small enough to list)"
            );
        }
        if self.back > Told::EACH {
            tracing::info!(
                more = self.back - Told::EACH,
                total = self.back,
                "more pool addresses usable again; back in the rotation"
            );
        }
    }
}

/// What one refresh changed, for the log and the `Reload` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    pub changed: bool,
    pub generation: u64,
    pub size: usize,
    /// The addresses in rotation then (an entry may be a prefix of many).
    pub in_rotation: u64,
    /// The sources that could not be read this time: name and why.
    pub failed: Vec<(String, String)>,
    /// Whether a source has not been read once since the start (its
    /// addresses missing, not kept from a good read).
    pub unread: bool,
}

/// How long after the start a session taken back from the state file is
/// spared a move while a source has not been read (its address may be
/// that source's): past it, a source that never reads moves them.
const RESTORED_GRACE: Duration = Duration::from_secs(600);

impl Allocator {
    pub fn new(sources: Vec<Source>) -> Allocator {
        Allocator::resuming(sources, None, Saved::default(), None)
            .expect("an anonymous lease table")
    }

    /// An allocator that continues the rotation `saved` in `state`, with
    /// its lease table at `table` (a file workers map) or in memory.
    pub fn resuming(
        sources: Vec<Source>,
        state: Option<StateFile>,
        saved: Saved,
        table: Option<TableHome>,
    ) -> Result<Allocator, TableError> {
        Ok(Allocator {
            inner: Mutex::new(Inner {
                pool: {
                    // Armed once: the first publish with addresses of a
                    // family uses its saved position up (a refresh's, or
                    // one between refreshes).
                    let mut pool = Pool::continuing(saved.generation, saved.seq, table)?;
                    pool.resume_from(saved.next_due);
                    pool
                },
                resume_at: saved.next_due,
                state,
                saved,
                state_failed: false,
                closing: false,
                sessions: Sessions::new(DEFAULT_MAX_SESSIONS),
                sites: Sites::new(Rules::default(), DEFAULT_MAX_ENTRIES),
                metrics: Default::default(),
                quarantine: HashMap::new(),
                held: Vec::new(),
                hand_file: None,
                hand_restored: 0,
                hand_saved: Vec::new(),
                hand_failed: None,
                kept_dir: None,
                changes: 0,
                changes_kept: 0,
                waiters: Default::default(),
                swept: None,
                sweep_asked: false,
                sources: sources
                    .into_iter()
                    .map(|source| SourceState {
                        source,
                        last_good: Vec::new(),
                        error: None,
                        warned: None,
                        read_once: false,
                    })
                    .collect(),
                last_refresh: None,
                peers: BTreeMap::new(),
                misrouted: HashSet::new(),
                reach: crate::reach::Reach::new(crate::reach::FIRST),
            }),
            started: Instant::now(),
            waiting: tokio::sync::Notify::new(),
            rendered: tokio::sync::Mutex::const_new(None),
            reports: tokio::sync::Mutex::const_new(()),
            renders: Arc::new(tokio::sync::Semaphore::new(crate::metrics::MAX_RENDERS)),
            lease_only_reports: std::sync::Mutex::new(None),
            tickets: Default::default(),
        })
    }

    /// How long a peer let in only to lease must wait for its next report,
    /// if it must (reports for such peers take a tenth of the time at most,
    /// see [`LEASE_ONLY_REPORT_SHARE`]).
    pub fn lease_only_report_wait(&self) -> Option<Duration> {
        let owed = *self
            .lease_only_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        owed.and_then(|t| t.checked_sub(LEASE_ONLY_REPORT_AHEAD))
            .and_then(|t| t.checked_duration_since(Instant::now()))
    }

    /// A report for a peer let in only to lease took `took`: the time owed
    /// grows by the rest of its share.
    pub fn lease_only_report_took(&self, took: Duration) {
        let mut owed = self
            .lease_only_reports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let from = owed.map_or(now, |t| t.max(now));
        *owed = Some(from + took.saturating_mul(LEASE_ONLY_REPORT_SHARE - 1));
    }

    /// Whether this allocator holds the rotation state file, and with it
    /// the state directory's lock.
    pub fn holds_state_file(&self) -> bool {
        self.lock().state.is_some()
    }

    /// Keeps what outlives a restart in `dir` (the state directory): the
    /// entries taken out by hand, taken out again once the pool holds them
    /// (those whose time has not ended), and the sticky sessions and site
    /// budgets and cooldowns an allocator that stopped cleanly left there
    /// (see `save_at_stop`) or checkpointed before it died. Call after
    /// `limit_sessions` and `set_site_rules`. With `checkpoints` (the files
    /// are rewritten as things change) the files stay, so that a crash
    /// before the first checkpoint loses nothing; without, they go.
    pub fn keep_state_in(&self, dir: &std::path::Path, checkpoints: bool) {
        let mut inner = self.lock();
        let (now, wall) = (Instant::now(), unix_now_ms());
        let remove = !checkpoints;
        if let Some((kept, n, set_aside)) = take_kept(
            dir,
            SESSIONS_FILE_NAME,
            SESSIONS_WHAT,
            remove,
            wall,
            |saved, wall| inner.sessions.restore(saved, now, wall),
        ) {
            tracing::info!(
                sessions = n,
                ended_or_over_the_cap = kept - n,
                "sticky sessions kept from before the restart"
            );
            // Their file was set aside (an item in it did not read): the
            // next checkpoint writes what was read back, or a crash
            // before anything changes would lose it.
            if set_aside {
                inner.changes += 1;
            }
        }
        if let Some((kept, n, set_aside)) = take_kept(
            dir,
            SITES_FILE_NAME,
            SITES_WHAT,
            remove,
            wall,
            |mut saved: Vec<crate::sites::SavedPair>, wall| {
                // The file is the allocator's own; still, no name a site
                // could not have.
                saved.retain(|p| valid_site(&p.site));
                inner.sites.restore(saved, now, wall)
            },
        ) {
            tracing::info!(
                pairs = n,
                sites = inner.sites.len(),
                ended_or_over_the_cap = kept - n,
                "site budgets used and cooldowns kept from before the restart"
            );
            inner.publish_sites();
            if set_aside {
                inner.changes += 1;
            }
        }
        // The metadata services' and commands' last good lists, served
        // until they read (a failed first read keeps them, as any failed
        // read keeps the last good list); checked for use as any read is.
        let sources = &mut inner.sources;
        if let Some((kept, n, _)) = take_kept(
            dir,
            SOURCES_FILE_NAME,
            SOURCES_WHAT,
            remove,
            wall,
            |saved: Vec<SavedSource>, _| {
                let mut n = 0;
                for s in sources.iter_mut().filter(|s| kept_over_restart(&s.source)) {
                    let key = source_key(&s.source);
                    let Some(saved) = saved.iter().find(|x| x.source == key) else {
                        continue;
                    };
                    s.last_good = saved
                        .entries
                        .iter()
                        .filter_map(|e| e.parse().ok())
                        .collect();
                    n += usize::from(!s.last_good.is_empty());
                }
                n
            },
        ) {
            tracing::info!(
                sources = n,
                not_configured_now = kept - n,
                "last good lists of metadata services and pool commands kept from before the restart: served until each reads"
            );
            // (Lists of sources no longer configured: gone at the next
            // checkpoint.)
            if kept != n {
                inner.changes += 1;
            }
        }
        inner.kept_dir = Some(dir.to_owned());
        let path = dir.join(crate::persist::HAND_FILE_NAME);
        match crate::persist::read_hand(&path) {
            Ok((kept, bad)) => {
                if !bad.is_empty() {
                    tracing::warn!(file = %path.display(), entries = ?bad, "entries taken out by hand before the restart that are not addresses or prefixes; ignored");
                }
                // The file's time of writing is the least the clock is
                // taken to be: a clock behind at the start (before NTP, a
                // host without one) kept an address out by its error, up
                // to ten years. Each end is moved onto this clock (by the
                // error), as quarantines made now are on it.
                let floor = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                let now = unix_now();
                let behind = floor.saturating_sub(now);
                let kept: Vec<HandOut> = kept
                    .into_iter()
                    .filter(|h| h.until.is_none_or(|u| u > now + behind))
                    .map(|h| HandOut {
                        until: h.until.map(|u| u - behind),
                        ..h
                    })
                    .collect();
                if !kept.is_empty() {
                    tracing::info!(file = %path.display(), entries = kept.len(), "addresses taken out by hand before the restart stay out");
                }
                // What the file holds (but ended ones, forgotten at the
                // first change).
                inner.hand_saved.clone_from(&kept);
                inner.hand_restored = kept.len();
                inner.held.extend(kept);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the addresses taken out by hand before the restart (a file that does not parse is set aside as .corrupt); they are back in the rotation");
            }
        }
        inner.hand_file = Some(path);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the pool half-updated
        // (every update is a single assignment), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, for a lease asked over the socket at `started`: see
    /// [`Timed`].
    fn lock_timed(&self, started: Instant) -> Timed<'_> {
        Timed {
            inner: self.lock(),
            started: Some(started),
        }
    }

    pub fn sources(&self) -> Vec<Source> {
        self.lock()
            .sources
            .iter()
            .map(|s| s.source.clone())
            .collect()
    }

    /// The entries source `i` (of `sources()`) last read well: what a
    /// failed read of it keeps.
    pub fn kept(&self, i: usize) -> Vec<Segment> {
        self.lock()
            .sources
            .get(i)
            .map(|s| s.last_good.clone())
            .unwrap_or_default()
    }

    /// Applies one read of every source (in the order of `sources()`): a
    /// failed read keeps that source's last good addresses. `checks` says
    /// of the entries read whether this host can use them (`usable`):
    /// those it cannot are kept listed but out of the rotation.
    pub fn apply_refresh(
        &self,
        reads: Vec<Result<Vec<Segment>, SourceError>>,
        checks: &HashMap<Segment, Result<(), String>>,
    ) -> RefreshOutcome {
        let mut inner = self.lock();
        let mut failed = Vec::new();
        let mut inner_source_errors = 0;
        let mut kept_changed = false;
        for (place, (state, read)) in inner.sources.iter_mut().zip(reads).enumerate() {
            match read {
                Ok(mut addrs) => {
                    // An entry a source lists twice counts once (its
                    // count in `rotor status` and the metrics said 6 for
                    // a file of 4 distinct addresses); the first kept.
                    let mut seen = HashSet::with_capacity(addrs.len());
                    addrs.retain(|e| seen.insert(*e));
                    if state.error.take().is_some() {
                        tracing::info!(
                            source = %state.source.metric_label(place + 1),
                            entries = addrs.len(),
                            "pool source reads again"
                        );
                    }
                    kept_changed |= kept_over_restart(&state.source) && state.last_good != addrs;
                    state.last_good = addrs;
                    state.warned = None;
                    state.read_once = true;
                }
                Err(e) => {
                    inner_source_errors += 1;
                    let msg = error_chain(&e);
                    failed.push((state.source.name(), msg.clone()));
                    let again = state.error.as_deref() == Some(msg.as_str())
                        && state
                            .warned
                            .is_some_and(|t| t.elapsed() < SOURCE_FAILING_SAID);
                    // (By its place, as in the metrics: a command's text
                    // may carry a token.)
                    let source = state.source.metric_label(place + 1);
                    let kept = state.last_good.len();
                    match again {
                        false => {
                            tracing::warn!(%source, error = %msg, kept, "pool source failed to read; keeping its last good addresses (said again if it changes, or every 10 min)");
                            state.warned = Some(Instant::now());
                        }
                        true => {
                            tracing::debug!(%source, error = %msg, kept, "pool source failed to read again")
                        }
                    }
                    state.error = Some(msg);
                }
            }
        }
        // (A new list of a source kept over a restart: for the next
        // checkpoint.)
        if kept_changed {
            inner.changes += 1;
        }
        inner.metrics.refreshes += 1;
        inner.metrics.source_errors += inner_source_errors;
        let addrs = inner.listed();
        let listed: HashSet<Segment> = addrs.iter().copied().collect();
        let now = Instant::now();
        inner.carry_hand(&listed, now);
        inner.quarantine.retain(|e, _| listed.contains(e));
        inner.reach.retain(&listed);
        let mut told = Told::default();
        for (e, check) in checks {
            inner.judge(*e, check, now, &mut told);
        }
        told.sum_up();
        let quarantined: HashSet<Segment> = inner.quarantine.keys().copied().collect();
        let old_table = inner.pool.table().clone();
        let changed = match inner.pool.update(addrs, quarantined) {
            Ok(changed) => changed,
            Err(e) => {
                // Only a bigger table's file can fail; the pool stays as
                // it was, and so does the rotation.
                tracing::error!(error = %error_chain(&e), "cannot grow the lease table; keeping the previous pool");
                false
            }
        };
        inner.table_moved(&old_table, true);
        inner.save_hand();
        if changed {
            // Series of entries that left the pool go (an entry that comes
            // back starts again: a counter reset, as Prometheus reads it),
            // so a pool that churns does not fill the label cap with the
            // departed and push new entries into `other`.
            let listed: Vec<String> = inner.pool.addrs().iter().map(ToString::to_string).collect();
            inner.metrics.track_sources(&listed);
            warn_unreached(inner.pool.addrs());
        }
        inner.note_resumed();
        inner.last_refresh = Some(SystemTime::now());
        if changed {
            self.retry_waiters(&mut inner);
        }
        RefreshOutcome {
            changed,
            generation: inner.pool.generation(),
            size: inner.pool.len(),
            in_rotation: inner.in_rotation(),
            failed,
            unread: inner.sources.iter().any(|s| !s.read_once),
        }
    }

    /// The addresses in rotation (an entry may be a prefix of many).
    pub fn addresses_in_rotation(&self) -> u64 {
        self.lock().in_rotation()
    }

    /// Whether the pool holds a prefix (an entry leased in an order, not
    /// address by address).
    pub fn leases_a_prefix(&self) -> bool {
        self.lock().pool.addrs().iter().any(|e| !e.is_single())
    }

    /// The entries in rotation, for a worker to check its leases against.
    /// Merged into blocks (the same addresses, in far fewer entries when
    /// they came from ranges and CIDRs), and only while that fits a frame.
    pub fn pool_copy(&self) -> Response {
        let inner = self.lock();
        let entries = rotor_protocol::cover(inner.pool.active());
        if entries.len() > POOL_COPY_MAX_ENTRIES {
            return Response::Error {
                message: format!(
                    "{}: {} blocks (workers do not check their leases against it)",
                    rotor_protocol::POOL_TOO_LARGE,
                    entries.len()
                ),
            };
        }
        Response::Pool {
            generation: inner.pool.generation(),
            entries,
        }
    }

    /// Checks the lease table still holds what was published, and if not
    /// (someone who can write its file changed it), replaces it: workers
    /// then attach to the new one. Whether it was replaced.
    pub fn repair_table(&self) -> bool {
        self.lock().repair_table()
    }

    /// Tells workers that the operator asked for a reload: they re-read
    /// their users file and start name resolution over.
    pub fn announce_reload(&self) {
        self.lock().pool.table().bump_reloads();
    }

    /// Entries out of the rotation whose next check is due.
    pub fn due_checks(&self) -> Vec<Segment> {
        let now = Instant::now();
        self.lock()
            .quarantine
            .iter()
            .filter(|(_, q)| q.next_check <= now)
            .map(|(e, _)| *e)
            .collect()
    }

    /// Logs the entries a refresh found (among those it looked at)
    /// leaving through another interface than their own (once each, until
    /// mended) and those mended since. One not looked at this time (its
    /// source failed, and keeps its last good entries) is left as it was;
    /// one gone from the pool is forgotten.
    pub fn note_misrouted(&self, m: crate::usable::Misrouted) {
        let crate::usable::Misrouted { found, looked } = m;
        let mut inner = self.lock();
        for (entry, why) in &found {
            if !inner.misrouted.contains(entry) {
                tracing::warn!(%entry, "pool address may not reach the internet: {why}");
            }
        }
        let now: HashSet<Segment> = found.iter().map(|(e, _)| *e).collect();
        let before = std::mem::take(&mut inner.misrouted);
        for entry in before {
            if now.contains(&entry) {
                continue;
            }
            if looked.contains(&entry) {
                tracing::info!(%entry, "pool address now sends to the internet through its own interface");
            } else if inner.pool.addrs().contains(&entry) {
                inner.misrouted.insert(entry);
            }
        }
        inner.misrouted.extend(now);
    }

    /// Applies checks of entries (from `due_checks`): usable ones go back
    /// into the rotation, the others wait twice as long.
    pub fn apply_checks(&self, checks: &HashMap<Segment, Result<(), String>>) {
        let mut inner = self.lock();
        let now = Instant::now();
        // A set, not a scan a check: a /16 listed address by address falls
        // due at once (65 536 checks against 65 536 entries under the lock).
        let listed: HashSet<Segment> = inner.pool.addrs().iter().copied().collect();
        let mut told = Told::default();
        for (e, check) in checks {
            if listed.contains(e) {
                inner.judge(*e, check, now, &mut told);
            }
        }
        told.sum_up();
        inner.publish_quarantine();
        self.retry_waiters(&mut inner);
    }

    /// A worker could not use `ip`: its entry leaves the rotation until a
    /// check finds it usable again. Whether it is out now. The allocator
    /// checks it first, as at a refresh: a report of an address this host
    /// can use (stale, or a peer let in to lease steering the pool, which
    /// only root and the allocator's user may) takes nothing out.
    pub fn unusable(&self, ip: IpAddr, reason: &str) -> bool {
        // The entry serving it (an entry inside a prefix that is out
        // serves meanwhile: that one, not the prefix, is reported).
        let entry = |inner: &Inner| inner.pool.entry_of(ip);
        let listed = {
            // Requests in flight on an address that went away report it
            // many times: once it is out, no check again.
            let inner = self.lock();
            match entry(&inner) {
                None => return false,
                Some(e) if inner.pool.is_quarantined(&e) => return true,
                Some(e) => e,
            }
        };
        let mut checker = crate::usable::Checker::recent(rotor_protocol::routes::AFTER_A_FAILURE);
        let checked = checker.check(&Segment::single(ip));
        if checked.is_ok() {
            tracing::debug!(%ip, reason, "a worker reported an address this host can use: left in the rotation");
            return false;
        }
        // An address of a prefix the rest of which this host can use (a
        // broadcast address inside it): that lease failed (the worker took
        // the next), the prefix stays. It had left the rotation whole,
        // each time its rotation came to that address (review ap).
        if !listed.is_single() && checker.check(&listed).is_ok() {
            tracing::debug!(%ip, entry = %listed, reason, "a worker could not use an address of a prefix this host can use: the prefix stays in the rotation");
            return false;
        }
        let mut inner = self.lock();
        let Some(e) = entry(&inner) else {
            return false;
        };
        let now = Instant::now();
        // A report: the entry goes out, its wait not lengthened (requests
        // in flight on an address that went away report it many times).
        inner.judge_as(
            e,
            &Err(format!("a worker could not use {ip}: {reason}")),
            now,
            true,
            &mut Told::default(),
        );
        inner.publish_quarantine();
        // An address gone is seldom gone alone (a route withdrawn, an
        // interface down): the rest of the rotation is checked too.
        inner.sweep_asked = true;
        inner.pool.is_quarantined(&e)
    }

    /// The entries in the rotation, to check now, if a worker's report
    /// found an address this host cannot use since the last such check
    /// (at most one a [`SWEEP_EVERY`]). A route withdrawn took out only the
    /// addresses workers reported, two a request (the leased one and the
    /// retry's): a /24 withdrawn from a listed pool was 128 requests
    /// answered 503 while other addresses worked.
    pub fn sweep_due(&self) -> Option<Vec<Segment>> {
        let mut inner = self.lock();
        let now = Instant::now();
        if !inner.sweep_asked || inner.swept.is_some_and(|t| now < t + SWEEP_EVERY) {
            return None;
        }
        inner.sweep_asked = false;
        inner.swept = Some(now);
        let Inner {
            pool, quarantine, ..
        } = &*inner;
        let due = pool.addrs().iter().filter(|e| !quarantine.contains_key(e));
        Some(due.copied().collect())
    }

    /// Takes the entry holding `ip` out of the rotation by hand (for `for_`,
    /// or until released), or puts it back (`release`): for every worker
    /// at once. The entry, if `ip` is in the pool.
    ///
    /// A release puts the entry back only if this host can use it now (as
    /// a check finds it, outside the lock: a bind): one that is still not
    /// this host's stays out with the check's reason, and comes back when
    /// a check passes (put back untested, its next lease had failed, once
    /// in each worker). `check` is the check ([`crate::usable::usable_now`]);
    /// [`Allocator::out_reason`] tells which.
    pub fn steer(
        &self,
        ip: IpAddr,
        release: bool,
        for_: Option<Duration>,
        check: &dyn Fn(&Segment) -> Result<(), String>,
    ) -> Option<Segment> {
        let narrowest = release.then(|| self.lock().narrowest(ip)).flatten();
        let checked = narrowest.map(|e| (e, check(&e)));
        let mut inner = self.lock();
        // One held for its return (its entry is not in the pool now) is
        // released too.
        let held = match release {
            true => inner
                .held
                .iter()
                .find(|h| h.entry.contains(ip))
                .map(|h| h.entry),
            false => None,
        };
        inner.held.retain(|h| !(release && h.entry.contains(ip)));
        let Some(e) = inner.pool.entry_of(ip) else {
            inner.save_hand();
            return held;
        };
        let now = Instant::now();
        let e = inner.narrowest(ip).unwrap_or(e);
        if release {
            inner.reach.forget(&e);
            let out = inner.quarantine.remove(&e).is_some();
            match checked {
                // (judged as at a check: out, and said so with its reason)
                Some((c, Err(reason))) if c == e => {
                    inner.judge(e, &Err(reason), now, &mut Told::default())
                }
                _ if out => {
                    tracing::info!(entry = %e, "pool address put back into the rotation by hand")
                }
                _ => {}
            }
        } else {
            let q = Quarantine::by_hand(for_, now, false);
            tracing::warn!(entry = %e, reason = %q.reason, "pool address out of the rotation");
            inner.quarantine.insert(e, q);
        }
        inner.publish_quarantine();
        self.retry_waiters(&mut inner);
        Some(e)
    }

    /// Why the addresses out by hand cannot be kept over a restart now,
    /// if they cannot (the last write of their file failed).
    pub fn hand_not_kept(&self) -> Option<String> {
        self.lock().hand_failed.clone()
    }

    /// The wider entry (a prefix) in the rotation that holds `e`, leasing
    /// its addresses all the same, if one does (`e` an address listed on
    /// its own inside it, out by hand).
    pub fn held_by_wider(&self, e: &Segment) -> Option<Segment> {
        let held = self.lock().pool.prefix_in_rotation(e.base())?;
        (held != *e).then_some(held)
    }

    /// Why `e` is out of the rotation, if it is.
    pub fn out_reason(&self, e: &Segment) -> Option<String> {
        self.lock().quarantine.get(e).map(|q| q.reason.clone())
    }

    /// One lease for `peer`, asked over the socket.
    pub fn lease(&self, peer: u64, families: Families) -> Response {
        let mut inner = self.lock_timed(Instant::now());
        let answer = inner.lease_checked(families);
        inner.answer(peer, answer)
    }

    /// Adds what worker `peer` reported to the host's metrics; its answers
    /// by source count for `reach` if it may steer the pool (`trusted`, as
    /// `unreached`).
    pub fn record_metrics(
        &self,
        peer: u64,
        mut m: rotor_protocol::WorkerMetrics,
        counters: &[(String, u64)],
        trusted: bool,
    ) {
        // No more than a worker sends, cut before the lock.
        m.by_source.truncate(rotor_protocol::MAX_REPORTED_SOURCES);
        m.errors.truncate(rotor_protocol::MAX_REPORTED_ERRORS);
        let m = &m;
        let mut inner = self.lock();
        let pid = match inner.peers.get_mut(&peer) {
            Some(p) => {
                p.heard = Instant::now();
                p.accepting = !m.listen.is_empty();
                (p.hello.pid, p.pid_seen)
            }
            None => (0, true),
        };
        let Inner { metrics, pool, .. } = &mut *inner;
        let applied = metrics.add(peer, pid, m, counters, |ip| match pool.entry_of(ip) {
            Some(e) => e.to_string(),
            // Left the pool, or the worker's own `other`.
            None => "other".to_string(),
        });
        if applied && trusted {
            inner.reach_answers(peer, m, Instant::now());
        }
    }

    /// Worker `peer`'s connects that failed where other sources' were
    /// answered (`Request::Unreached`); heard only from a peer that may
    /// steer the pool (`trusted`: root or the allocator's own user, as
    /// workers run), since no check here can tell them false.
    pub fn unreached(
        &self,
        peer: u64,
        by_source: &[rotor_protocol::SourceUnreached],
        trusted: bool,
    ) {
        if !trusted {
            static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(peer, "a worker let in only to lease reports connects failing from pool addresses: not heard (no check here can tell them false); run workers as root or the allocator's own user for such addresses to be taken out");
            }
            return;
        }
        self.lock().reach_failures(peer, by_source, Instant::now());
    }

    /// Sets the first time out of an entry whose connects fail while its
    /// family's others connect (zero: none is taken out).
    pub fn set_unreachable_quarantine(&self, first: Duration) {
        self.lock().reach.set_first(first);
    }

    /// What the workers served, for `rotor status`.
    pub fn host_report(&self) -> rotor_protocol::HostReport {
        self.lock().metrics.report()
    }

    /// The host's metrics, for a Prometheus scrape (`classic`: the
    /// classic text format, else OpenMetrics).
    pub fn render_metrics(&self, classic: bool) -> String {
        let (v2, number) = self.status_v2_numbered();
        // What the scrape needs, copied under the lock; the per-entry work
        // (a pool's worth of labels) done without it, leases and reports
        // going on meanwhile; written after.
        let (cooling, cooling_keys, rules, sessions, cap) = {
            let inner = self.lock();
            let now = Instant::now();
            let by_entry = |inner: &Inner, counts: &HashMap<IpAddr, u64>| {
                let mut out: HashMap<String, u64> = HashMap::new();
                for (&ip, &n) in counts {
                    if let Some(e) = inner.pool.entry_of(ip) {
                        *out.entry(e.to_string()).or_default() += n;
                    }
                }
                out
            };
            // Sites count an IPv6 source by its prefix (a /64): what
            // cools is a prefix, and each entry inside one takes its count;
            // an entry holding many (a /48) counts each site once (it
            // counted each of its /64s cooling).
            let keys = inner.sites.cooling_by_address(now);
            let mut sites_of: HashMap<String, HashSet<u64>> = HashMap::new();
            for (key, site) in inner.sites.cooling(now) {
                if let Some(e) = inner.pool.entry_of(key) {
                    sites_of.entry(e.to_string()).or_default().insert(site);
                }
            }
            (
                sites_of
                    .into_iter()
                    .map(|(e, sites)| (e, sites.len() as u64))
                    .collect::<HashMap<String, u64>>(),
                keys,
                inner.sites.rules().clone(),
                by_entry(&inner, &inner.sessions.by_address()),
                inner.metrics.max_sources.0,
            )
        };
        let cooling_of = |e: &Segment, k: &String| match rules.one_key(e) {
            true => cooling_keys.get(&rules.key(e.base())).copied(),
            false => cooling.get(k).copied(),
        };
        let (figures, snapshot) = {
            let mut entries: Vec<(String, u64, bool, u64, u64)> = v2
                .pool
                .iter()
                .take(cap)
                .map(|e| {
                    let k = e.entry.to_string();
                    let c = cooling_of(&e.entry, &k).unwrap_or(0);
                    let s = sessions.get(&k).copied().unwrap_or(0);
                    (k, e.leases, e.quarantine.is_some(), c, s)
                })
                .collect();
            // Past `--metrics-max-sources` entries, one series each would
            // make a scrape of millions: the rest are summed as `other`
            // (its quarantine gauge 1 if any of them is out).
            if v2.pool.len() > cap {
                let mut other = ("other".to_string(), 0, false, 0, 0);
                for e in &v2.pool[cap..] {
                    let k = e.entry.to_string();
                    other.1 += e.leases;
                    other.2 |= e.quarantine.is_some();
                    other.3 += cooling_of(&e.entry, &k).unwrap_or(0);
                    other.4 += sessions.get(&k).copied().unwrap_or(0);
                }
                entries.push(other);
            }
            let mut inner = self.lock();
            let leases = inner.metrics.leases(&entries, number);
            let figures = crate::metrics::PoolFigures {
                entries,
                leases,
                family_totals: v2
                    .families
                    .iter()
                    .map(|f| (f.family.to_string(), f.total))
                    .collect(),
                source_addresses: inner
                    .sources
                    .iter()
                    .enumerate()
                    .map(|(i, state)| (state.source.metric_label(i + 1), state.listed()))
                    .collect(),
                leases_total: v2.leases_total,
                sessions: u64::from(v2.sessions),
                sites: inner.sites.len() as u64,
                site_entries: inner.sites.entries() as u64,
                cooldowns_begun: inner.sites.cooldowns_begun(),
                site_waiters: inner.waiters.len() as u64,
                state_write_failing: inner.state_failed,
            };
            (figures, inner.metrics.clone())
        };
        crate::metrics::render(&snapshot, &figures, classic)
    }

    /// Whether any worker is connected (an orphaned allocator serves their
    /// drain while one is; `/health` asks more: see [`Allocator::health`]).
    pub fn serving(&self) -> bool {
        self.lock()
            .peers
            .values()
            .any(|p| p.hello.role == rotor_protocol::Role::Worker)
    }

    /// The `/health` of the metrics listener: `Ok` while a worker is
    /// connected and one has been heard from within [`HEALTH_SILENCE`],
    /// and the pool has an address in the rotation; else why not. (Only a
    /// connected worker was asked: a host whose pool was empty, or whose
    /// one worker was stopped, stayed in a load balancer's rotation.)
    pub fn health(&self) -> Result<(), &'static str> {
        let inner = self.lock();
        let mut workers = inner
            .peers
            .values()
            .filter(|p| p.hello.role == rotor_protocol::Role::Worker)
            .peekable();
        if workers.peek().is_none() {
            return Err("no worker connected");
        }
        let heard: Vec<&Peer> = workers
            .filter(|p| p.heard.elapsed() <= HEALTH_SILENCE)
            .collect();
        if heard.is_empty() {
            return Err("no worker has reported for 5 s (stopped or stuck?)");
        }
        // A front must stop sending new clients to a host whose workers
        // are all draining (`rotor up` stopping): their listeners are
        // closed, and a connection to them is refused.
        if !heard.iter().any(|p| p.accepting) {
            return Err("every worker is draining (its listeners closed)");
        }
        let rotations = inner.pool.rotations();
        if Family::ALL.iter().all(|f| rotations.total(*f) == 0) {
            return Err("no address in the rotation (the pool is empty, or every entry is out)");
        }
        Ok(())
    }

    /// A lease for sticky session `key` (see `sessions`): its address
    /// while the session lasts and the address is in the rotation, else
    /// the next one, kept for it; `strict`, an address that left is not
    /// replaced. For a request to `site` (`Some`): a session
    /// pinned already keeps its address whatever the site's budget (the
    /// client asked for that address), its request counted against the
    /// budget so the site's other requests keep the address under it; but
    /// while the site has the address cooling (it answered 429 or 503),
    /// the request is refused (`Throttled`, cooling) and keeps it, as any
    /// other request to the site would be: sent on, it would meet the
    /// site's refusal and lengthen the cooldown. A new session's first address is the site's next one
    /// with budget left and not cooling for it (refused, `Throttled`, as
    /// a site lease is, when there is none).
    pub fn lease_session(
        &self,
        peer: u64,
        families: Families,
        key: &str,
        ttl: Duration,
        strict: bool,
        site: Option<&str>,
    ) -> Response {
        let started = Instant::now();
        // What is no site's name holds no state (as `lease_site`).
        let site = site.filter(|s| valid_site(s));
        if !crate::sessions::valid_key(key) {
            return Response::Error {
                message: format!("a session key is 1 to {} bytes", crate::sessions::MAX_KEY),
            };
        }
        let mut inner = self.lock_timed(started);
        let now = Instant::now();
        // (A change for the checkpoint: a restart must not bring it back
        // loose.)
        if strict && inner.sessions.make_strict(key) {
            inner.changes += 1;
        }
        let mut last = None;
        // With a site, its answer when no family served (a refusal rather
        // than a lease the session is not pinned to).
        let mut refused = None;
        // The address the session holds in any family asked for, before a
        // new one in any: a worker asks in every family its destination
        // resolved to, and a session holding an IPv6 address must keep it
        // when the site's IPv4 ones are also there (or back in its name's
        // answer), not be pinned a second address. A strict session whose
        // address left fails only when it holds no other it may use.
        let (mut lost, mut moves) = (None, None);
        // A session taken back at a restart whose address is missing while
        // a source has not been read yet (a metadata service down at the
        // start) is served from the rotation for now, not moved for good:
        // its address may be that source's. (Only those, and for
        // `RESTORED_GRACE` at most: one begun in this run moves, and so does
        // one kept whose source never reads.)
        let unread = now < self.started + RESTORED_GRACE
            && inner.sources.iter().any(|s| !s.read_once)
            && inner.sessions.restored(key);
        let mut keep_pin = false;
        // The soonest end of the blocks of the session's addresses for the
        // site, and by what (a push-back, a budget spent, the sessions'
        // share of it), should every address it holds be blocked.
        let mut blocked: Option<(Duration, rotor_protocol::Block)> = None;
        for family in Family::ALL {
            if !families.accepts_family(family) {
                continue;
            }
            let Inner { sessions, pool, .. } = &mut *inner;
            match sessions.pinned(key, family, now, |ip| pool.holds(ip)) {
                Pinned::Address(ip) => {
                    if let Some(b) = site.and_then(|site| {
                        let others = inner.waiters.ahead(site, Families::only(family));
                        inner.sites.session_blocked(site, ip, others.is_some(), now)
                    }) {
                        blocked = Some(blocked.map_or(b, |c| c.min(b)));
                        continue;
                    }
                    // Counted in its entry's leases (the per-source series
                    // beside its connect errors), as a site lease is.
                    if let Some(i) = inner.pool.rotations().index_of(ip) {
                        inner.pool.table().count_lease(family, i);
                    }
                    if let Some(site) = site {
                        if let Some(watch) = inner.sites.session_use(site, ip, now) {
                            inner.changes += 1;
                            return inner.site_lease(peer, ip, watch);
                        }
                    }
                    let lease = Lease {
                        ip,
                        seq: inner.pool.table().next_seq(),
                        generation: inner.pool.generation(),
                    };
                    return inner.answer(peer, Some(Ok(lease)));
                }
                // Strict by this request (made so above) or an earlier
                // one: a request that leaves the parameter out moves no
                // strict session.
                Pinned::Gone { ip, strict: true } => {
                    lost.get_or_insert(Response::SessionLost { ip });
                }
                // A strict session pushed out of a full table: its address
                // is unknown now.
                Pinned::Evicted => {
                    lost.get_or_insert(Response::SessionLost {
                        ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    });
                }
                Pinned::Gone { .. } if unread => keep_pin = true,
                Pinned::Gone { ip, .. } => {
                    moves.get_or_insert(ip);
                }
                Pinned::Nothing => {}
            }
        }
        // The session has its address, to use once the site's cooldown
        // ends or its budget frees (not a new one meanwhile, nor its loss).
        if let Some((left, block)) = blocked {
            let minor = inner.peers.get(&peer).map_or(0, |p| p.hello.minor);
            return match block {
                rotor_protocol::Block::Shared if minor >= rotor_protocol::MINOR_SESSION_SHARE => {
                    Response::SessionShared {
                        retry_after_ms: left.as_millis().max(1) as u64,
                    }
                }
                block => crate::waiters::throttled(
                    now + left,
                    block == rotor_protocol::Block::Cooling,
                    now,
                ),
            };
        }
        if let Some(lost) = lost {
            return lost;
        }
        // The session's address now `ip` (unless it keeps its own while a
        // source is unread): a change for the next checkpoint, and said
        // once it has moved (one that cannot have an address now said it
        // at each request).
        let pin = |inner: &mut Inner, ip: IpAddr| {
            if keep_pin {
                return;
            }
            inner.changes += 1;
            inner.sessions.pin(key, ip, ttl, strict, now);
            if let Some(from) = moves {
                tracing::info!(session = %key.split('\0').nth(1).unwrap_or(""), %from, to = %ip, "session address left the rotation; the session moved");
            }
        };
        for family in Family::ALL {
            if !families.accepts_family(family) {
                continue;
            }
            if let Err(wait) = inner.sessions.room(key, now) {
                let minor = inner.peers.get(&peer).map_or(0, |p| p.hello.minor);
                return match minor >= rotor_protocol::MINOR_SESSIONS_FULL {
                    true => Response::SessionsFull {
                        retry_after_ms: wait.as_millis().max(1) as u64,
                    },
                    false => Response::Error {
                        message:
                            "the session table, or this user's share of it, is full of strict sessions; raise --max-sessions (or --max-sessions-per-user)"
                                .into(),
                    },
                };
            }
            if let Some(site) = site {
                let answer = inner.lease_site_behind(peer, Families::only(family), site, now);
                match &answer {
                    Response::Leased(lease) | Response::SiteLeased { lease, .. } => {
                        pin(&mut inner, lease.ip);
                        inner.sites.session_started(site, lease.ip, now);
                        return answer;
                    }
                    // A refusal for the site outranks another family's
                    // want of addresses.
                    Response::Throttled { .. } => refused = Some(answer),
                    _ if refused.is_none() => refused = Some(answer),
                    _ => {}
                }
                continue;
            }
            match inner.lease_checked(Families::only(family)) {
                Some(Ok(lease)) => {
                    // A session's first address of this family (a session
                    // that only keeps its address changes nothing).
                    pin(&mut inner, lease.ip);
                    return inner.answer(peer, Some(Ok(lease)));
                }
                other => last = Some(other),
            }
        }
        if let Some(refused) = refused {
            return refused;
        }
        let answer = last.unwrap_or_else(|| inner.lease_checked(families));
        inner.answer(peer, answer)
    }

    /// A lease for a request to `site` (see `sites`): from the site's own
    /// rotation, skipping addresses out of budget or cooling for it, when
    /// the allocator holds state for the site; else from the shared one.
    pub fn lease_site(&self, peer: u64, families: Families, site: &str) -> Response {
        let now = Instant::now();
        let mut inner = self.lock_timed(now);
        let answer = inner.lease_site_behind(peer, families, site, now);
        inner.note_refused(site, &answer, now);
        answer
    }

    /// As `lease_site`, but a refusal that ends within `wait` is not
    /// answered: the request is held with the site's other waiters, in
    /// arrival order, and answered through `reply` (see `waiters`); `None`
    /// then. Held requests of its families put it behind them.
    pub fn lease_site_wait(
        &self,
        families: Families,
        site: &str,
        wait: Duration,
        reply: crate::waiters::Reply,
    ) -> Option<Response> {
        let now = Instant::now();
        let mut inner = self.lock_timed(now);
        let deadline = now + wait.min(crate::waiters::MAX_WAIT);
        let answer = inner.lease_site_behind(reply.peer, families, site, now);
        inner.note_refused(site, &answer, now);
        let Some(refused) = refusal(&answer, now) else {
            return Some(answer);
        };
        if refused.0 > deadline {
            // Its wait ends before an address may serve it.
            return Some(throttled(refused.0, refused.1, now));
        }
        match inner.waiters.hold(site, families, deadline, refused, reply) {
            Ok(wake) => {
                // Answered later, not now.
                inner.started = None;
                drop(inner);
                if wake {
                    self.waiting.notify_one();
                }
                None
            }
            // Past the cap: the refusal (the worker sleeps and asks again).
            Err(_) => Some(throttled(refused.0, refused.1, now)),
        }
    }

    /// A held wait (envelope `id` of `peer`) is given up.
    pub fn cancel_wait(&self, peer: u64, id: u64) {
        self.lock().waiters.cancel(peer, id);
    }

    /// Answers the held site waits that are due; when the next is.
    pub fn serve_waiters(&self) -> Option<Instant> {
        let mut inner = self.lock();
        let now = Instant::now();
        if inner.waiters.is_empty() {
            // (Noted: the task now waits for a hold's wake-up alone, and
            // a hold must wake it whenever it is due.)
            return inner.waiters.arm();
        }
        let mut waiters = std::mem::take(&mut inner.waiters);
        waiters.serve(now, |site, families, peer| {
            inner.lease_site(peer, families, site, now)
        });
        let next = waiters.arm();
        inner.waiters = waiters;
        next
    }

    /// The held site waits are tried again now (the pool changed, or a
    /// probe's answer freed an address).
    fn retry_waiters(&self, inner: &mut Inner) {
        if inner.waiters.try_all_now(Instant::now()) {
            self.waiting.notify_one();
        }
    }

    /// A probe's hold ended (its answer, a push-back or a failed
    /// connect): the requests it kept waiting are tried now (another
    /// address may serve them, or they are told how long the site wants),
    /// not at the hold's end.
    fn hold_ended(&self, inner: &mut Inner) {
        if inner.sites.take_hold_ended() {
            self.retry_waiters(inner);
        }
    }

    /// `site` pushed back on `ip` (a worker saw it): the pair cools, for
    /// every worker at once. Whether it started cooling now.
    ///
    /// From a peer let in only to lease (not `trusted`) the wait is
    /// [`LEASE_ONLY_PUSHBACK_MOST`] at most: nothing here can tell a
    /// push-back false, and one such user could otherwise keep a site from
    /// every address of the pool, for everyone, for a day.
    pub fn pushback(
        &self,
        ip: IpAddr,
        site: &str,
        status: u16,
        retry_after: Option<u32>,
        trusted: bool,
    ) -> bool {
        let mut inner = self.lock();
        // An address of the pool, in the rotation or not: one taken out
        // while its request was in flight still cools for the site, or a
        // release would send it straight back there.
        if inner.pool.entry_of(ip).is_none() || !valid_site(site) {
            return false;
        }
        let most = LEASE_ONLY_PUSHBACK_MOST.as_secs() as u32;
        let retry_after = match trusted {
            true => retry_after,
            false => retry_after.map(|s| s.min(most)),
        };
        let wait = retry_after.map(|s| Duration::from_secs(u64::from(s)));
        inner.changes += 1;
        let started = inner.sites.pushback(site, ip, status, wait, Instant::now());
        inner.pool.table().flag_site(site);
        self.hold_ended(&mut inner);
        started
    }

    /// A connect from `ip` to `site` failed while the site answered other
    /// addresses (a worker saw it): a suspicion, or with one already, a
    /// cooldown of the pair for every worker (see `Sites::unreached`).
    /// Whether it started cooling now. Heard only from a peer that may
    /// steer the pool (`trusted`), as [`Allocator::unreached`] is.
    pub fn site_unreached(&self, ip: IpAddr, site: &str, trusted: bool) -> bool {
        if !trusted {
            static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(site, "a worker let in only to lease reports connects to a site failing from a pool address: not heard (no check here can tell it false); run workers as root or the allocator's own user for such pairs to cool");
            }
            return false;
        }
        let mut inner = self.lock();
        if inner.pool.entry_of(ip).is_none() || !valid_site(site) {
            return false;
        }
        inner.changes += 1;
        let Inner { sites, pool, .. } = &mut *inner;
        let active = (pool.active(), pool.generation());
        let started = sites.unreached(site, ip, active, Instant::now());
        // (A suspicion too: its leases must come by the site's path, which
        // asks for the answer that clears it.)
        inner.pool.table().flag_site(site);
        self.hold_ended(&mut inner);
        started
    }

    /// A new connect from `ip` to `site` was made: the pair's failed
    /// connects start over.
    pub fn site_connected(&self, ip: IpAddr, site: &str) {
        self.site_cleared(|sites, now| sites.connected(site, ip, now));
    }

    /// `site` answered `ip` normally: the pair's backoff starts over (and
    /// the requests waiting for the site, held by its probe, are tried).
    pub fn site_answered(&self, ip: IpAddr, site: &str) {
        self.site_cleared(|sites, now| sites.answered(site, ip, now));
    }

    /// A pair's repeats cleared by `clear`; the held waits are tried if
    /// that ended a probe's hold (see `hold_ended`).
    fn site_cleared(&self, clear: impl FnOnce(&mut crate::sites::Sites, Instant) -> bool) {
        let mut inner = self.lock();
        inner.changes += 1;
        clear(&mut inner.sites, Instant::now());
        self.hold_ended(&mut inner);
    }

    /// A request to `site` from `ip`, counted at its lease (about
    /// `leased_us`), started at `started_us` (`rotor_protocol::clock`):
    /// its start is moved to then (see `Sites::started_late`). Times of
    /// another clock are dropped.
    pub fn site_started(&self, ip: IpAddr, site: &str, leased_us: u64, started_us: u64) {
        let (Some(leased), Some(started)) = (
            rotor_protocol::clock::instant(leased_us),
            rotor_protocol::clock::instant(started_us),
        ) else {
            return;
        };
        let mut inner = self.lock();
        // (A change only if one moved: each slow connect to a site with
        // no budget had the state written again.)
        let now = Instant::now();
        if inner.sites.started_late(site, ip, (leased, started), now) {
            inner.changes += 1;
        }
    }

    /// The per-site state, the most recently used `max` sites.
    pub fn sites_report(&self, max: usize) -> rotor_protocol::SitesReport {
        self.lock().sites.report(max, Instant::now())
    }

    /// [`Allocator::sites_report`] with the prefix length IPv6 sources
    /// are counted by.
    pub fn sites_report_v2(&self, max: usize) -> rotor_protocol::SitesReportV2 {
        let inner = self.lock();
        rotor_protocol::SitesReportV2 {
            report: inner.sites.report(max, Instant::now()),
            v6_prefix: inner.sites.rules().v6_prefix(),
        }
    }

    /// Pool entries with series of their own in the metrics.
    pub fn set_metrics_max_sources(&self, n: usize) {
        self.lock().metrics.max_sources = crate::metrics::SourceCap(n);
    }

    /// Sets the budgets and the cap of the site table (at start).
    pub fn set_site_rules(&self, rules: Rules, max_entries: usize) {
        let mut inner = self.lock();
        inner.sites = Sites::new(rules, max_entries);
        inner.publish_sites();
    }

    /// Drops expired site state and republishes the filter (every second).
    pub fn expire_sites(&self) {
        let mut inner = self.lock();
        inner.sites.expire(Instant::now());
        inner.publish_sites();
    }

    /// Drops the sessions that ended (every second).
    pub fn expire_sessions(&self) {
        self.lock().sessions.expire(Instant::now());
    }

    /// Writes the live sticky sessions and the site state (budgets used,
    /// cooldowns, repeats) to the state directory for the next allocator
    /// (at a clean stop: one that dies keeps none). Their copies are taken
    /// under the lock, written outside it.
    pub fn save_at_stop(&self) {
        let kept = {
            let mut inner = self.lock();
            inner.copy_kept()
        };
        if let Some(kept) = kept {
            kept.write(true);
        }
    }

    /// Counts a checkpoint written (`ok`) or failed, for the metrics; a
    /// failed one is tried again at the next interval, changes or not.
    pub fn checkpointed(&self, ok: bool) {
        let mut inner = self.lock();
        match ok {
            true => inner.metrics.checkpoints += 1,
            false => {
                inner.metrics.checkpoint_errors += 1;
                inner.changes_kept = inner.changes_kept.wrapping_sub(1);
            }
        }
    }

    /// The sessions and the site state to write, if they changed since
    /// the last checkpoint (a copy taken under the lock; see `Kept`).
    pub fn checkpoint(&self) -> Option<Kept> {
        let mut inner = self.lock();
        if inner.changes == inner.changes_kept {
            return None;
        }
        inner.copy_kept()
    }

    /// Holds at most `n` sticky sessions (the oldest go first past it).
    pub fn limit_sessions(&self, n: usize, per_user: usize) {
        self.lock().sessions = Sessions::per_user(n, per_user);
    }

    /// The reloads asked of this allocator, as its lease table counts them,
    /// with the table's id, asked by `peer` (a worker that cannot map the
    /// table; every worker of minor 15, first on each connection). The
    /// first count a worker is told is where it counts reloads from, and
    /// where this allocator expects its word of them from
    /// (`worker_reloads`), read and kept under one lock.
    /// (From its Hello, a reload asked before it mapped the table was one
    /// it never made, and `rotor reload` waited for its word, then said 3.)
    pub fn reloads_for(&self, peer: u64) -> Response {
        let mut inner = self.lock();
        let (table, count) = {
            let t = inner.pool.table();
            (t.id(), t.reloads())
        };
        if let Some(p) = inner.peers.get_mut(&peer) {
            // (An older worker asks later, if at all, and counts from its
            // table: its Hello's count stands.)
            let first = p.hello.minor >= rotor_protocol::MINOR_FIRST_RELOADS;
            if first && !std::mem::replace(&mut p.told, true) {
                p.joined = (table, count);
            }
        }
        Response::Reloads { table, count }
    }

    /// The lease table's id and its count of reloads asked.
    pub fn reloads_asked(&self) -> (u64, u64) {
        let inner = self.lock();
        let table = inner.pool.table();
        (table.id(), table.reloads())
    }

    /// Worker `peer` made the reload `asked` (see `reloads_asked`), and
    /// these parts of it failed.
    pub fn worker_reloaded(&self, peer: u64, asked: (u64, u64), failed: Vec<(String, String)>) {
        if let Some(p) = self.lock().peers.get_mut(&peer) {
            p.reloaded = Some((asked, failed));
        }
    }

    /// How each connected worker's reload went, for a reload that made
    /// the count `asked`: done (that reload or a later one; or it
    /// connected after it was asked, having read its files as it
    /// started), not yet, or too old to say. And whether every worker
    /// that can say has.
    pub fn worker_reloads(&self, asked: (u64, u64)) -> (Vec<rotor_protocol::WorkerReload>, bool) {
        use rotor_protocol::WorkerReloadOutcome as Outcome;
        let inner = self.lock();
        let mut all = true;
        let workers = inner
            .peers
            .values()
            .filter(|p| p.hello.role == rotor_protocol::Role::Worker)
            .map(|p| {
                let outcome = match &p.reloaded {
                    _ if p.joined.0 == asked.0 && p.joined.1 >= asked.1 => {
                        Outcome::Done { failed: Vec::new() }
                    }
                    _ if p.hello.minor < rotor_protocol::MINOR_WORKER_RELOADS => Outcome::TooOld,
                    Some(((table, count), failed)) if *table == asked.0 && *count >= asked.1 => {
                        Outcome::Done {
                            failed: failed.clone(),
                        }
                    }
                    _ => {
                        all = false;
                        Outcome::NoWord
                    }
                };
                rotor_protocol::WorkerReload {
                    pid: p.hello.pid,
                    outcome,
                }
            })
            .collect();
        (workers, all)
    }

    /// Where `peer` finds the lease table, and the counter it counts its
    /// leases in (the lowest free one, if any is).
    pub fn attach(&self, peer: u64, lease_only: bool) -> Response {
        let mut inner = self.lock();
        let Some(path) = inner.pool.home().map(|p| p.display().to_string()) else {
            return Response::Error {
                message: "this allocator shares no lease table; lease over the socket".into(),
            };
        };
        // A worker that found the table closed or broken asks for its
        // successor: never hand out one that is not sound.
        inner.repair_table();
        let table = inner.pool.table().clone();
        let taken: Vec<u32> = inner
            .peers
            .iter()
            .filter(|(id, _)| **id != peer)
            .filter_map(|(_, p)| p.slot)
            .collect();
        // Users let in to lease only hold half the slots at most, all of
        // them together (they hold half of --max-peers): the workers of
        // root or the allocator's user always find one.
        let shared = inner
            .peers
            .iter()
            .filter(|(id, p)| **id != peer && p.lease_only && p.slot.is_some())
            .count();
        let full = lease_only && shared >= PEER_SLOTS / 2;
        let Some(p) = inner.peers.get_mut(&peer) else {
            return Response::Error {
                message: "unknown peer".into(),
            };
        };
        if let Some(old) = p.slot.take() {
            p.leases += table.peer_leases(old);
        }
        p.lease_only = lease_only;
        p.slot = match full {
            true => None,
            false => (0..PEER_SLOTS as u32).find(|s| !taken.contains(s)),
        };
        if let Some(slot) = p.slot {
            table.assign_peer(slot);
        }
        Response::Attached {
            path,
            id: table.id(),
            slot: p.slot,
        }
    }

    /// Closes the lease table for good (at exit): workers go back to
    /// asking over the socket, and the state file gets the final rotation.
    pub fn close_table(&self) {
        self.lock().closing = true;
        let closed = self.lock().pool.table().close();
        tracing::debug!(seq = closed.seq, "lease table closed");
        self.persist();
        // On the disk before the process ends: a power loss after a clean
        // stop must not take the rotation back.
        if let Some(state) = &self.lock().state {
            if let Err(e) = state.sync() {
                tracing::warn!(file = %state.path().display(), error = %e, "cannot sync the rotation state");
            }
        }
        // Its own file only: another allocator may have made one at the
        // path since (its socket file removed, this one's taken).
        let inner = self.lock();
        if let Some(path) = inner.pool.home().filter(|p| inner.pool.table().is_at(p)) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Writes the rotation to the state file if it changed since the last
    /// write. Called before lease replies are flushed, so no address is
    /// handed out over the socket that a restart would hand out again, and
    /// every second for the leases workers take from the table (whose file
    /// a restarted allocator reads first: see `server::run`).
    pub fn persist(&self) {
        let mut inner = self.lock();
        let p = inner.pool.table().position();
        // Read from a table cut short, the rotation may be zeros: the last
        // good record stays until the table is replaced. (Checked after
        // the read, and with no system call: this runs before every batch
        // of socket replies.)
        if inner.pool.table().is_broken() {
            return;
        }
        // A family with no address now keeps the position it had (or the
        // one read at start and not used yet).
        let held = inner.pool.held_due();
        let next_due = [0, 1].map(|i| p.next_due[i].or(inner.resume_at[i]).or(held[i]));
        let saved = Saved {
            generation: inner.pool.generation().max(p.generation),
            seq: p.seq,
            next_due,
        };
        if saved == inner.saved {
            return;
        }
        let Some(state) = &inner.state else {
            inner.saved = saved;
            return;
        };
        // Counted as written only once it is: a write that failed is
        // tried again at the next call, not when the rotation moves.
        match state.write(&saved) {
            Ok(()) => {
                inner.saved = saved;
                inner.state_failed = false;
            }
            Err(e) => {
                if !inner.state_failed {
                    tracing::warn!(file = %state.path().display(), error = %e, "cannot write the rotation state");
                }
                inner.state_failed = true;
            }
        }
    }

    /// Keeps `hello` for peer `id`; its software name as kept (escaped and
    /// cut: see `crate::shown`).
    /// A peer came (`pid_seen`: the kernel gave `hello.pid`, not only the
    /// peer's word): what software it said it runs, as kept.
    pub fn peer_connected(&self, id: u64, mut hello: Hello, pid_seen: bool) -> String {
        // Kept for each peer and copied into every status: a name, not
        // the megabytes a peer may send.
        hello.software = crate::shown(std::mem::take(&mut hello.software), MAX_SOFTWARE);
        let software = hello.software.clone();
        let joined = self.reloads_asked();
        let mut inner = self.lock();
        if hello.role == rotor_protocol::Role::Worker
            && hello.minor < rotor_protocol::MINOR_SITES
            && !inner.sites.rules().is_empty()
        {
            tracing::warn!(pid = hello.pid, software = %hello.software, "a worker too old for site budgets connected: its requests take the shared rotation, over no budget and no cooldown; upgrade it");
        }
        inner.peers.insert(
            id,
            Peer {
                hello,
                pid_seen,
                since: Instant::now(),
                leases: 0,
                slot: None,
                lease_only: false,
                reloaded: None,
                joined,
                told: false,
                answered: HashSet::new(),
                heard: Instant::now(),
                accepting: true,
            },
        );
        software
    }

    pub fn peer_gone(&self, id: u64) {
        let mut inner = self.lock();
        inner.waiters.forget_peer(id);
        inner.metrics.workers.remove(&id);
        if let Some(slot) = inner.peers.remove(&id).and_then(|p| p.slot) {
            // Its published load must not hold its siblings back.
            inner.pool.table().reset_peer(slot);
        }
    }

    /// Whether `peer` holds a lease counter in the table.
    #[cfg(test)]
    fn slot_of(&self, peer: u64) -> Option<u32> {
        self.lock().peers.get(&peer).and_then(|p| p.slot)
    }

    pub fn pool_size(&self) -> usize {
        self.lock().pool.len()
    }

    /// The status for control clients of minor 0 and 1: one cursor (the
    /// IPv4 one), and each entry as an address (a prefix by its first).
    pub fn status(&self) -> StatusReport {
        let v2 = self.status_v2();
        StatusReport {
            generation: v2.generation,
            cursor: v2
                .families
                .first()
                .map_or(0, |f| f.cursor.min(u32::MAX.into()) as u32),
            pool: v2
                .pool
                .iter()
                .filter(|e| e.quarantine.is_none())
                .map(|e| AddrStatus {
                    ip: e.entry.base(),
                    leases: e.leases,
                })
                .collect(),
            leases_total: v2.leases_total,
            last_refresh_unix: v2.last_refresh_unix,
            sources: v2.sources,
            peers: v2.peers,
            uptime_secs: v2.uptime_secs,
        }
    }

    pub fn status_v2(&self) -> StatusReportV2 {
        self.status_v2_numbered().0
    }

    /// The status, and its number in the order status reports were taken
    /// (under the lock): a scrape applies its lease counts only if no later
    /// one applied its own (see `HostMetrics::leases`).
    fn status_v2_numbered(&self) -> (StatusReportV2, u64) {
        let mut inner = self.lock();
        let number = inner.metrics.snapshot_number();
        let table = inner.pool.table();
        let snap = inner.pool.snapshot();
        let counts: HashMap<Segment, u64> = snap.pool.iter().copied().collect();
        let active: Vec<Segment> = snap.pool.iter().map(|(e, _)| *e).collect();
        let now = Instant::now();
        let report = StatusReportV2 {
            generation: inner.pool.generation(),
            sessions: inner.sessions.len().min(u32::MAX as usize) as u32,
            families: Family::ALL
                .into_iter()
                .map(|f| FamilyStatus {
                    family: f,
                    cursor: snap.cursor(f),
                    total: family_total(&active, f),
                    next: snap.next_due(f),
                })
                .collect(),
            pool: inner
                .pool
                .addrs()
                .iter()
                .map(|e| EntryStatus {
                    entry: *e,
                    leases: counts
                        .get(e)
                        .copied()
                        .or_else(|| inner.pool.parked_leases(e))
                        .unwrap_or(0),
                    quarantine: inner.quarantine.get(e).map(|q| QuarantineStatus {
                        reason: q.reason.clone(),
                        since_secs: now.duration_since(q.since).as_secs(),
                        retry_in_secs: q.next_check.saturating_duration_since(now).as_secs(),
                    }),
                })
                .collect(),
            leases_total: snap.seq,
            last_refresh_unix: inner
                .last_refresh
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            sources: inner
                .sources
                .iter()
                .map(|s| SourceStatus {
                    name: s.source.name(),
                    addresses: s.listed().min(u32::MAX.into()) as u32,
                    error: s.error.clone(),
                })
                .collect(),
            peers: inner
                .peers
                .values()
                .map(|p| PeerStatus {
                    role: p.hello.role,
                    pid: p.hello.pid,
                    // With the protocol it speaks: in a rolling upgrade,
                    // which peers run the new build.
                    software: format!(
                        "{}, protocol {}.{}{}",
                        p.hello.software,
                        p.hello.major,
                        p.hello.minor,
                        match p.pid_seen {
                            true => "",
                            false => ", its pid of another namespace (a container's)",
                        }
                    ),
                    connected_secs: p.since.elapsed().as_secs(),
                    leases: p.leases + p.slot.map_or(0, |s| table.peer_leases(s)),
                })
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
        };
        (report, number)
    }
}

/// The allocator's lock held for a lease asked over the socket (plain,
/// a session's, a site's): its time from the ask to the lock's release is
/// observed in `rotor_allocator_lease_seconds` under the same lock, as
/// the lock goes (unless `started` was taken: a request held to be
/// answered later).
struct Timed<'a> {
    inner: std::sync::MutexGuard<'a, Inner>,
    started: Option<Instant>,
}

impl std::ops::Deref for Timed<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl std::ops::DerefMut for Timed<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        if let Some(started) = self.started {
            self.inner
                .metrics
                .allocator_lease_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    /// The largest copy of the pool sent decodes within the frame limit,
    /// all IPv6 (the costliest block to decode).
    #[test]
    fn the_largest_pool_copy_decodes() {
        use rotor_protocol::{Envelope, Response, ServerFrame};
        let entries: Vec<Segment> = (0..POOL_COPY_MAX_ENTRIES as u128)
            .map(|i| Segment::single(IpAddr::V6((0x2001_0db8_u128 << 96 | i << 8).into())))
            .collect();
        let frame = ServerFrame::Response(Envelope {
            id: u64::MAX,
            body: Response::Pool {
                generation: u64::MAX,
                entries,
            },
        });
        let bytes = rotor_protocol::encode(&frame).unwrap();
        assert!(bytes.len() <= rotor_protocol::MAX_FRAME_LEN);
        assert!(rotor_protocol::decode::<ServerFrame>(&bytes).is_ok());
    }

    use super::*;

    /// The check of a release, passed (the tests' pools are not this
    /// host's).
    fn usable(_: &Segment) -> Result<(), String> {
        Ok(())
    }

    fn ok() -> HashMap<Segment, Result<(), String>> {
        HashMap::new()
    }

    /// A peer's software name is kept short, whatever it sent.
    #[test]
    fn a_peer_is_kept_with_a_short_software_name() {
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        let mut hello = Hello::new(rotor_protocol::Role::Worker, "rotor 1");
        hello.software = "é".repeat(1 << 20);
        a.peer_connected(7, hello, true);
        let kept = a.lock().peers[&7].hello.software.clone();
        assert!(
            kept.len() <= MAX_SOFTWARE + '…'.len_utf8() && kept.starts_with('é'),
            "{}",
            kept.len()
        );
        let mut hello = Hello::new(rotor_protocol::Role::Worker, "rotor 1");
        hello.software = "rotor\n  pid 1: forged".into();
        a.peer_connected(8, hello, true);
        assert_eq!(a.lock().peers[&8].hello.software, "rotor\\n  pid 1: forged");
    }

    /// A scrape of a pool past `MAX_SOURCES` entries has a series per
    /// entry for the first of them, and one `other` for the rest.
    #[test]
    fn a_scrape_of_a_huge_pool_sums_the_entries_past_the_cap() {
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        // Every other address: no two entries merge into a range.
        let n = crate::metrics::MAX_SOURCES as u32 + 5;
        let entries = (0..n)
            .map(|k| Segment::single(std::net::Ipv4Addr::from(0x0a00_0000u32 + 2 * k).into()))
            .collect();
        a.apply_refresh(vec![Ok(entries)], &ok());
        let m = a.render_metrics(true);
        let series = m
            .lines()
            .filter(|l| l.starts_with("rotor_source_quarantined{"))
            .count();
        assert_eq!(series, crate::metrics::MAX_SOURCES + 1);
        assert!(
            m.contains("rotor_source_quarantined{source=\"other\"} 0"),
            "no other"
        );
        assert!(m.contains("rotor_source_quarantined{source=\"10.0.0.0\"} 0"));
        // A cap set lower (`--metrics-max-sources`): every source series
        // names the first entries in pool order, the counters' as the
        // gauges'.
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.set_metrics_max_sources(3);
        let entries = (0..8u32)
            .map(|k| Segment::single(std::net::Ipv4Addr::from(0x0a00_0000u32 + 2 * k).into()))
            .collect();
        a.apply_refresh(vec![Ok(entries)], &ok());
        let m = a.render_metrics(true);
        for name in [
            "rotor_source_quarantined{",
            "rotor_source_connect_errors_total{",
        ] {
            let mut named: Vec<&str> = m
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.split('"').nth(1))
                .collect();
            named.sort();
            assert_eq!(
                named,
                ["10.0.0.0", "10.0.0.2", "10.0.0.4", "other"],
                "{name}"
            );
        }
    }

    /// A failing write of the rotation state shows as a gauge until a
    /// write succeeds.
    #[test]
    fn a_failing_state_write_shows_in_the_metrics() {
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.apply_refresh(
            vec![Ok(vec![Segment::single("10.0.0.1".parse().unwrap())])],
            &ok(),
        );
        assert!(a
            .render_metrics(true)
            .contains("rotor_state_write_failing 0"));
        a.lock().state_failed = true;
        assert!(a
            .render_metrics(true)
            .contains("rotor_state_write_failing 1"));
    }

    /// An allocator of `pool` (addresses) with the budget `rule`.
    fn budgeted(pool: &[&str], rule: &str) -> Allocator {
        let a = Allocator::new(vec![Source::list(&pool.join(",")).unwrap()]);
        let entries = pool.iter().map(|s| Segment::single(s.parse().unwrap()));
        a.apply_refresh(vec![Ok(entries.collect())], &ok());
        a.set_site_rules(
            crate::sites::Rules::parse(&[rule.to_string()]).unwrap(),
            1000,
        );
        a
    }

    /// In a prefix, every lease is a fresh address, the sites' own too:
    /// a site's rotation handed out the addresses the shared rotation had
    /// (one site's the other's, a session's a site's), where none is to
    /// repeat until the prefix is used up. The budgets still count by
    /// key: a site limited to 3 is refused at its fourth.
    #[test]
    fn site_leases_in_a_prefix_are_fresh_addresses() {
        let p = Segment::prefix("fd00::".parse().unwrap(), 64).unwrap();
        let a = Allocator::new(vec![Source::list("fd00::/64").unwrap()]);
        a.apply_refresh(vec![Ok(vec![p])], &ok());
        let rules = ["a.test=3/1h".to_string(), "*=100/1h".to_string()];
        a.set_site_rules(crate::sites::Rules::parse(&rules).unwrap(), 1000);
        let leased = |r: Response| match r {
            Response::Leased(l) | Response::SiteLeased { lease: l, .. } => l.ip,
            other => panic!("{other:?}"),
        };
        let mut seen = Vec::new();
        for site in ["a.test", "b.test", "a.test", "b.test", "c.test", "a.test"] {
            seen.push(leased(a.lease_site(1, Families::ANY, site)));
            seen.push(leased(a.lease(1, Families::ANY)));
        }
        let distinct: HashSet<IpAddr> = seen.iter().copied().collect();
        assert_eq!(distinct.len(), seen.len(), "{seen:?}");
        assert!(seen.iter().all(|ip| p.contains(*ip)), "{seen:?}");
        // a.test's budget (one key: the /64) is spent.
        assert!(matches!(
            a.lease_site(1, Families::ANY, "a.test"),
            Response::Throttled { .. }
        ));
    }

    /// `rotor_source_cooling_sites` counts sites: a /48 entry whose /64s
    /// a site pushed back on, one after the other, cools for one site (it
    /// said 3, a pair each).
    #[test]
    fn an_entry_cools_for_each_site_once_however_many_of_its_keys() {
        let p = Segment::prefix("2001:db8:200::".parse().unwrap(), 48).unwrap();
        let a = Allocator::new(vec![Source::list("2001:db8:200::/48").unwrap()]);
        a.apply_refresh(vec![Ok(vec![p])], &ok());
        a.set_site_rules(crate::sites::Rules::default(), 1000);
        for (net, site) in [(1, "a.test"), (2, "a.test"), (3, "a.test"), (4, "b.test")] {
            let ip: IpAddr = format!("2001:db8:200:{net}::5").parse().unwrap();
            assert!(a.pushback(ip, site, 429, Some(600), true));
        }
        let m = a.render_metrics(true);
        assert!(
            m.contains("rotor_source_cooling_sites{source=\"2001:db8:200::/48\"} 2"),
            "{m}"
        );
    }

    /// A site lease for what is no site's name (a peer's megabyte of
    /// anything) is a lease from the shared rotation, and makes no site
    /// state under a `*` budget (it made a site of that name).
    #[test]
    fn a_site_lease_for_no_site_name_holds_nothing() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2"], "*=5/1m");
        for bad in ["x".repeat(300), "a b".into(), String::new()] {
            assert!(matches!(
                a.lease_site(1, Families::ANY, &bad),
                Response::Leased(_)
            ));
        }
        assert_eq!(a.sites_report(10).sites.len(), 0);
        // A name is served from its own rotation, with its state.
        assert!(matches!(
            a.lease_site(1, Families::ANY, "example.com"),
            Response::SiteLeased { .. }
        ));
        assert_eq!(a.sites_report(10).sites.len(), 1);
    }

    /// A session for a site: a new one starts on an address the site did
    /// not push back on; a pinned one keeps its address, and its requests
    /// count against its budget, so the site's other requests leave that
    /// address alone (and leave it a start for the session); past the
    /// budget, it waits as any request would, keeping its address.
    #[test]
    fn sessions_for_a_site_start_where_it_may_be_served_and_count_against_its_budget() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], "example.com=6/1m");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        a.pushback(ip("10.0.0.1"), "example.com", 429, Some(600), true);
        a.pushback(ip("10.0.0.2"), "example.com", 429, Some(600), true);
        let session = |key: &str| match a.lease_session(
            1,
            Families::V4,
            key,
            Duration::from_secs(600),
            false,
            Some("example.com"),
        ) {
            Response::SiteLeased { lease, .. } | Response::Leased(lease) => lease.ip,
            other => panic!("{other:?}"),
        };
        // Both new sessions begin on the one address not cooling.
        assert_eq!(session("u\0a"), ip("10.0.0.3"));
        assert_eq!(session("u\0b"), ip("10.0.0.3"));
        // The site's other requests take three more, and leave the last of
        // the budget of 6 to the sessions (under their share, half)...
        for _ in 0..3 {
            assert!(matches!(
                a.lease_site(1, Families::V4, "example.com"),
                Response::SiteLeased { .. }
            ));
        }
        assert!(matches!(
            a.lease_site(1, Families::V4, "example.com"),
            Response::Throttled { cooling: false, .. }
        ));
        // ...whose next request takes it, on its address.
        assert_eq!(session("u\0a"), ip("10.0.0.3"));
        // Past the budget, a session's request waits, not sent past the
        // site's limit; it keeps its address.
        assert!(matches!(
            a.lease_session(
                1,
                Families::V4,
                "u\0a",
                Duration::from_secs(600),
                false,
                Some("example.com")
            ),
            Response::Throttled { cooling: false, .. }
        ));
        // A new session with none left is refused as a site lease is.
        assert!(matches!(
            a.lease_session(
                1,
                Families::V4,
                "u\0c",
                Duration::from_secs(600),
                false,
                Some("example.com")
            ),
            Response::Throttled { .. }
        ));
        // Without the site (an older worker), the session is served as
        // before.
        assert!(matches!(
            a.lease_session(
                1,
                Families::V4,
                "u\0d",
                Duration::from_secs(600),
                false,
                None
            ),
            Response::Leased(_)
        ));
    }

    /// Every lease of a session's address counts in its entry's leases
    /// (`rotor_source_leases_total`), with a site or without, as the
    /// requests it serves count in the entry's answers and errors.
    #[test]
    fn a_sessions_leases_count_in_its_entrys() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2"], "example.com=100/1m");
        let leases_of = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            a.lock()
                .pool
                .snapshot()
                .pool
                .iter()
                .find(|(s, _)| s.contains(ip))
                .map_or(0, |(_, n)| *n)
        };
        let session = |site: Option<&str>| match a.lease_session(
            1,
            Families::V4,
            "u\0a",
            Duration::from_secs(600),
            false,
            site,
        ) {
            Response::SiteLeased { lease, .. } | Response::Leased(lease) => lease.ip,
            other => panic!("{other:?}"),
        };
        let held = session(None).to_string();
        let before = leases_of(&held);
        for site in [None, Some("example.com"), None, Some("other.test")] {
            assert_eq!(session(site).to_string(), held);
        }
        assert_eq!(leases_of(&held) - before, 4);
    }

    /// Every lease answered over the socket is timed, under the lock it
    /// was answered under: plain, a session's, a site's.
    #[test]
    fn socket_leases_are_timed() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2"], "example.com=100/1m");
        let timed = || -> u64 { a.lock().metrics.allocator_lease_seconds.counts.iter().sum() };
        a.lease(1, Families::V4);
        a.lease_session(
            1,
            Families::V4,
            "u\0a",
            Duration::from_secs(60),
            false,
            None,
        );
        a.lease_site(1, Families::V4, "example.com");
        assert_eq!(timed(), 3);
    }

    /// A session whose address the site pushed back on is refused while
    /// the pair cools (as the site's other requests are), keeping its
    /// address: no new one is pinned meanwhile, in this family or another,
    /// and once the cooldown ends the session is served from it again. A
    /// session holding an address of another family not cooling is served
    /// from that one.
    #[test]
    fn a_sessions_address_cooling_for_the_site_is_waited_for_not_used() {
        let a = budgeted(
            &["10.0.0.1", "10.0.0.2", "2001:db8::1"],
            "example.com=100/1m",
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let session = |key: &str, families: Families| {
            a.lease_session(
                1,
                families,
                key,
                Duration::from_secs(600),
                false,
                Some("example.com"),
            )
        };
        let leased = |r: Response| match r {
            Response::SiteLeased { lease, .. } | Response::Leased(lease) => lease.ip,
            other => panic!("{other:?}"),
        };
        let held = leased(session("u\0a", Families::V4));
        assert!(a.pushback(held, "example.com", 429, Some(1), true));
        for families in [Families::V4, Families::ANY] {
            match session("u\0a", families) {
                Response::Throttled {
                    retry_after_ms,
                    cooling: true,
                } => {
                    assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}")
                }
                other => panic!("{other:?}"),
            }
        }
        // Another site is no matter of this cooldown.
        let other = a.lease_session(
            1,
            Families::V4,
            "u\0a",
            Duration::from_secs(600),
            false,
            Some("other.test"),
        );
        assert_eq!(leased(other), held);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(leased(session("u\0a", Families::V4)), held);
        // A session holding both families' addresses: the one not cooling.
        let v6 = leased(session("u\0b", Families::V6));
        let v4 = leased(session("u\0b", Families::V4));
        assert_eq!(v6, ip("2001:db8::1"));
        assert!(a.pushback(v6, "example.com", 429, Some(60), true));
        assert_eq!(leased(session("u\0b", Families::ANY)), v4);
    }

    /// A session asked in both families (a dual-stack destination) keeps
    /// the address it holds in either, whichever family the name listed
    /// first; a strict one whose address of one family left is served
    /// from the other's, and lost only when it has none.
    #[test]
    fn a_session_keeps_its_address_of_either_family() {
        let a = budgeted(
            &["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2"],
            "example.com=100/1m",
        );
        let session = |key: &str, families: Families, strict: bool| match a.lease_session(
            1,
            families,
            key,
            Duration::from_secs(600),
            strict,
            None,
        ) {
            Response::Leased(lease) => Some(lease.ip),
            Response::SessionLost { .. } => None,
            other => panic!("{other:?}"),
        };
        // Its first request went to an IPv6-only name (or the IPv4 lease
        // was throttled): pinned to an IPv6 address, which both-family
        // requests keep.
        let v6 = session("u\0a", Families::V6, false).unwrap();
        assert!(v6.is_ipv6());
        for _ in 0..3 {
            assert_eq!(session("u\0a", Families::ANY, false), Some(v6));
        }
        // An IPv4-only destination needs an IPv4 address: pinned too.
        let v4 = session("u\0a", Families::V4, false).unwrap();
        assert!(v4.is_ipv4());
        assert_eq!(session("u\0a", Families::ANY, false), Some(v4));
        assert_eq!(session("u\0a", Families::V6, false), Some(v6));
        // Strict, holding both: its IPv4 address taken out, the IPv6 one
        // serves both-family requests; with that out too, it is lost.
        let v4 = session("u\0s", Families::V4, true).unwrap();
        let v6 = session("u\0s", Families::V6, true).unwrap();
        a.steer(v4, false, None, &usable);
        assert_eq!(session("u\0s", Families::ANY, true), Some(v6));
        assert_eq!(session("u\0s", Families::V4, true), None);
        a.steer(v6, false, None, &usable);
        assert_eq!(session("u\0s", Families::ANY, true), None);
    }

    /// A push-back for an address taken out of the rotation while its
    /// request was in flight is kept: once put back, the address is not
    /// sent to the site that asked it to wait.
    #[test]
    fn a_pushback_for_an_address_out_of_the_rotation_is_kept() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2"], "example.com=100/1m");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        a.steer(ip("10.0.0.1"), false, None, &usable);
        assert!(a.pushback(ip("10.0.0.1"), "example.com", 429, Some(600), true));
        a.steer(ip("10.0.0.1"), true, None, &usable);
        for _ in 0..3 {
            match a.lease_site(1, Families::V4, "example.com") {
                Response::SiteLeased { lease, .. } => assert_eq!(lease.ip, ip("10.0.0.2")),
                other => panic!("{other:?}"),
            }
        }
        // Not an address of the pool at all: nothing kept.
        assert!(!a.pushback(ip("10.9.9.9"), "example.com", 429, Some(600), true));
    }

    /// A peer let in only to lease cools a pair for 10 minutes at most,
    /// whatever Retry-After it reports: nothing can tell it false, and one
    /// such user could keep a site from every address, for everyone, for
    /// a day.
    #[test]
    fn a_lease_only_peers_pushback_is_capped() {
        let a = budgeted(&["10.0.0.1", "10.0.0.2"], "example.com=100/1m");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(a.pushback(ip("10.0.0.1"), "example.com", 429, Some(86_400), false));
        assert!(a.pushback(ip("10.0.0.2"), "example.com", 429, Some(86_400), true));
        let report = a.sites_report(10);
        let cooling = |at: &str| {
            report.sites[0]
                .addrs
                .iter()
                .find(|p| p.ip == ip(at))
                .and_then(|p| p.cooling_ms)
                .expect("cooling")
        };
        assert!(cooling("10.0.0.1") <= 600_000, "{report:?}");
        assert!(cooling("10.0.0.2") > 86_000_000, "{report:?}");
    }

    /// An allocator of 10.0.0.1 whose budget for example.com (`rule`) is
    /// spent by a first lease.
    /// A request of peer 1 (envelope 1) for `site`, held to wait for it
    /// (5 s at most); where its answer comes.
    fn held_for(
        a: &Allocator,
        families: Families,
        site: &str,
    ) -> tokio::sync::mpsc::UnboundedReceiver<rotor_protocol::ServerFrame> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let reply = crate::waiters::Reply {
            peer: 1,
            id: 1,
            tx,
            given_up: None,
        };
        let wait = Duration::from_secs(5);
        assert_eq!(a.lease_site_wait(families, site, wait, reply), None, "held");
        rx
    }

    fn one_address_spent_for(rule: &str) -> Allocator {
        let a = budgeted(&["10.0.0.1"], rule);
        assert!(matches!(
            a.lease_site(1, Families::V4, "example.com"),
            Response::SiteLeased { .. }
        ));
        a
    }

    /// A site's held waiters go first: a new request of their families
    /// is refused (and a new wait held behind them) even when an address
    /// frees before the serving task looked; one of another family is
    /// tried at once. The held one is served when the budget comes.
    #[tokio::test]
    async fn held_waiters_go_before_new_requests() {
        let a = one_address_spent_for("example.com=1/300ms");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let reply = |id| crate::waiters::Reply {
            peer: 1,
            id,
            tx: tx.clone(),
            given_up: None,
        };
        let wait = Duration::from_secs(5);
        assert_eq!(
            a.lease_site_wait(Families::V4, "example.com", wait, reply(1)),
            None,
            "held"
        );
        // The budget came back; the serving task has not looked yet.
        std::thread::sleep(Duration::from_millis(450));
        assert!(matches!(
            a.lease_site(2, Families::V4, "example.com"),
            Response::Throttled { .. }
        ));
        assert_eq!(
            a.lease_site_wait(Families::V4, "example.com", wait, reply(2)),
            None,
            "held behind"
        );
        // Another family is not held up (none of it here: the shared
        // rotation says so).
        assert!(matches!(
            a.lease_site(2, Families::V6, "example.com"),
            Response::NoAddress(_)
        ));
        a.serve_waiters();
        match rx.try_recv() {
            Ok(rotor_protocol::ServerFrame::Response(env)) => {
                assert_eq!(env.id, 1, "the first held first");
                assert!(matches!(env.body, Response::SiteLeased { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one address a window");
        assert_eq!(a.lock().waiters.len(), 1);
    }

    /// A dual-stack request behind waiters of one family: served from
    /// the other family at once, never from the address the waiters are
    /// owed (it freed before the serving task looked).
    #[tokio::test]
    async fn a_dual_stack_request_is_served_from_the_family_no_one_waits_for() {
        let a = budgeted(&["10.0.0.1", "2001:db8::1"], "example.com=1/300ms");
        let leased_ip = |r: Response| match r {
            Response::SiteLeased { lease, .. } => lease.ip,
            other => panic!("{other:?}"),
        };
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(leased_ip(a.lease_site(1, Families::V4, "example.com")), v4);
        let mut rx = held_for(&a, Families::V4, "example.com");
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(leased_ip(a.lease_site(2, Families::ANY, "example.com")), v6);
        assert!(matches!(
            a.lease_site(2, Families::ANY, "example.com"),
            Response::Throttled { .. }
        ));
        a.serve_waiters();
        match rx.try_recv() {
            Ok(rotor_protocol::ServerFrame::Response(env)) => {
                assert_eq!(leased_ip(env.body), v4, "the waiter's address kept for it");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Sessions keep to half a budget only beside other requests: a new
    /// session refused is none (it capped the site's existing sessions),
    /// and a plain request refused caps them for its window (up to
    /// `SHARE_HELD`), not longer.
    #[test]
    fn sessions_keep_to_their_share_only_beside_other_requests() {
        let a = budgeted(&["10.0.0.1"], "example.com=4/2s");
        let t0 = Instant::now();
        let at = |ms: u64| {
            let until = t0 + Duration::from_millis(ms);
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        };
        let session = |key: &str| {
            a.lease_session(
                1,
                Families::V4,
                key,
                Duration::from_secs(600),
                false,
                Some("example.com"),
            )
        };
        let served = |r: &Response| matches!(r, Response::SiteLeased { .. });
        for _ in 0..4 {
            assert!(served(&session("u\0a")));
        }
        at(1_500);
        assert!(matches!(session("u\0b"), Response::Throttled { .. }));
        // The budget back: all of it the session's.
        at(2_100);
        for _ in 0..4 {
            assert!(
                served(&session("u\0a")),
                "capped by a new session's refusal"
            );
        }
        // A plain request refused: the next window, the sessions keep to
        // half while it may ask again...
        at(3_100);
        assert!(matches!(
            a.lease_site(1, Families::V4, "example.com"),
            Response::Throttled { cooling: false, .. }
        ));
        at(4_300);
        assert!(served(&session("u\0a")));
        assert!(served(&session("u\0a")));
        assert!(matches!(
            session("u\0a"),
            Response::Throttled { cooling: false, .. }
        ));
        // ...and not past its window.
        at(5_300);
        assert!(served(&session("u\0a")), "capped past the window");
        assert!(served(&session("u\0a")), "capped past the window");
    }

    /// A probe pushed back: the requests its hold kept waiting are tried
    /// at once (here told the site's new wait), not at the hold's end.
    #[tokio::test]
    async fn a_probe_pushed_back_tries_its_waiters_at_once() {
        let a = budgeted(&["10.0.0.1"], "example.com=100/1s");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(a.pushback(ip, "example.com", 429, Some(1), true));
        std::thread::sleep(Duration::from_millis(1_050));
        // The cooldown ended: this is the probe.
        assert!(matches!(
            a.lease_site(1, Families::V4, "example.com"),
            Response::SiteLeased { .. }
        ));
        // Held by the probe.
        let mut rx = held_for(&a, Families::V4, "example.com");
        a.serve_waiters();
        assert!(rx.try_recv().is_err(), "held");
        assert!(a.pushback(ip, "example.com", 429, Some(60), true));
        a.serve_waiters();
        match rx.try_recv() {
            Ok(rotor_protocol::ServerFrame::Response(env)) => match env.body {
                Response::Throttled { retry_after_ms, .. } => {
                    assert!(retry_after_ms > 50_000, "{retry_after_ms}")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("not tried at once: {other:?}"),
        }
    }

    /// After a look that found no waiter (all given up), the serving
    /// task sleeps until woken: the next hold wakes it, whenever it is
    /// due (a stale time it was armed for kept it asleep for ever).
    #[tokio::test]
    async fn a_hold_after_an_empty_look_wakes_the_serving_task() {
        let a = one_address_spent_for("example.com=1/1s");
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let reply = |id| crate::waiters::Reply {
            peer: 1,
            id,
            tx: tx.clone(),
            given_up: None,
        };
        let woken = || async {
            tokio::time::timeout(Duration::from_millis(50), a.waiting.notified())
                .await
                .is_ok()
        };
        let wait = Duration::from_secs(5);
        assert_eq!(
            a.lease_site_wait(Families::V4, "example.com", wait, reply(1)),
            None
        );
        assert!(woken().await);
        assert!(a.serve_waiters().is_some(), "armed for the budget's return");
        a.cancel_wait(1, 1);
        assert_eq!(a.serve_waiters(), None, "nothing to look at");
        assert_eq!(
            a.lease_site_wait(Families::V4, "example.com", wait, reply(2)),
            None
        );
        assert!(woken().await, "the task must look again");
    }

    /// Every error kind a worker counts is exported from the start, at 0,
    /// so `increase()` sees its first count.
    #[test]
    fn error_kinds_are_exported_at_zero() {
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        let m = a.render_metrics(false);
        for kind in rotor_protocol::ERROR_KINDS {
            let line = format!("rotor_errors_total{{error=\"{kind}\"}} 0");
            assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
        }
    }

    /// A /64 source's gauge says its 2^64 addresses (an integer from the
    /// status's u32 said 4294967295).
    #[test]
    fn a_64_sources_gauge_is_its_size() {
        let a = Allocator::new(vec![Source::list("2001:db8::/64").unwrap()]);
        let p = Segment::prefix("2001:db8::".parse().unwrap(), 64).unwrap();
        a.apply_refresh(vec![Ok(vec![p])], &ok());
        let m = a.render_metrics(false);
        let line = m
            .lines()
            .find(|l| l.starts_with("rotor_pool_source_addresses{"))
            .unwrap();
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(n, 2f64.powi(64), "{line}");
    }

    #[test]
    fn failed_source_keeps_last_good_and_empty_read_empties() {
        let a = Allocator::new(vec![
            Source::File("/nonexistent".into()),
            Source::list("10.0.0.9").unwrap(),
        ]);
        let ip = |s: &str| Segment::single(s.parse().unwrap());
        let out = a.apply_refresh(
            vec![Ok(vec![ip("10.0.0.1")]), Ok(vec![ip("10.0.0.9")])],
            &ok(),
        );
        assert_eq!((out.changed, out.size), (true, 2));
        let err = SourceError::NoInterface("x".into());
        let out = a.apply_refresh(vec![Err(err), Ok(vec![ip("10.0.0.9")])], &ok());
        assert_eq!((out.changed, out.size, out.failed.len()), (false, 2, 1));
        assert!(a.status().sources[0].error.is_some());
        let out = a.apply_refresh(vec![Ok(vec![]), Ok(vec![ip("10.0.0.9")])], &ok());
        assert_eq!((out.changed, out.size), (true, 1));
        assert!(a.status().sources[0].error.is_none());
        // A file listing an address twice: counted once, in the status
        // as in the pool.
        let twice = vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.1")];
        a.apply_refresh(vec![Ok(twice), Ok(vec![ip("10.0.0.9")])], &ok());
        assert_eq!(a.status().sources[0].addresses, 2);
        assert_eq!(a.kept(0), [ip("10.0.0.1"), ip("10.0.0.2")]);
    }

    /// A report of an address this host can use takes nothing out.
    #[test]
    fn a_report_of_a_usable_address_is_checked_and_ignored() {
        let a = Allocator::new(vec![Source::list("127.0.0.5").unwrap()]);
        let e = Segment::single("127.0.0.5".parse().unwrap());
        a.apply_refresh(vec![Ok(vec![e])], &ok());
        assert!(!a.unusable("127.0.0.5".parse().unwrap(), "EADDRNOTAVAIL"));
        assert!(a.status_v2().pool[0].quarantine.is_none());
    }

    /// A report of a broadcast address (lo's 127.255.255.255) inside a
    /// prefix this host can use leaves the prefix in (it went out whole,
    /// and came back, each time its rotation came to that address); the
    /// address listed alone goes out.
    #[test]
    fn a_broadcast_address_inside_a_usable_prefix_leaves_it_in() {
        let bcast: IpAddr = "127.255.255.255".parse().unwrap();
        let routes = rotor_protocol::routes::LocalRoutes::read();
        if !routes.is_broadcast(bcast) {
            eprintln!("skipped: 127.255.255.255 is no broadcast address here");
            return;
        }
        let prefix: Segment = "127.254.0.0/15".parse().unwrap();
        let a = Allocator::new(vec![Source::list("127.254.0.0/15").unwrap()]);
        a.apply_refresh(vec![Ok(vec![prefix])], &ok());
        assert!(!a.unusable(bcast, "a broadcast address"));
        assert!(a.status_v2().pool[0].quarantine.is_none());
        let a = Allocator::new(vec![Source::list("127.255.255.255").unwrap()]);
        a.apply_refresh(vec![Ok(vec![Segment::single(bcast)])], &ok());
        assert!(a.unusable(bcast, "a broadcast address"));
    }

    /// A worker's report of an address this host cannot use asks for a
    /// check of the rest of the rotation (what is in it), once a second
    /// at most; a report of one already out asks for none.
    #[test]
    fn a_report_of_an_unusable_address_asks_for_a_sweep_once_a_second() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let all = vec![e("10.0.0.1"), e("10.0.0.2"), e("10.0.0.3")];
        a.apply_refresh(vec![Ok(all)], &ok());
        assert_eq!(a.sweep_due(), None, "nothing reported");
        assert!(a.unusable("10.0.0.3".parse().unwrap(), "EADDRNOTAVAIL"));
        assert_eq!(a.sweep_due(), Some(vec![e("10.0.0.1"), e("10.0.0.2")]));
        assert_eq!(a.sweep_due(), None, "asked once");
        // Found out by the sweep; its report then asks for nothing more.
        let mut found = ok();
        found.insert(e("10.0.0.2"), Err("gone too".into()));
        a.apply_checks(&found);
        assert!(a.unusable("10.0.0.2".parse().unwrap(), "EADDRNOTAVAIL"));
        a.lock().swept = Some(Instant::now() - SWEEP_EVERY);
        assert_eq!(a.sweep_due(), None, "a report of one already out");
        assert!(a.unusable("10.0.0.1".parse().unwrap(), "EADDRNOTAVAIL"));
        assert_eq!(a.sweep_due(), Some(vec![]));
    }

    #[test]
    fn unusable_entries_stay_listed_out_of_the_rotation_until_checked_good() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let all = vec![e("10.0.0.1"), e("10.0.0.2"), e("10.0.0.3")];
        let mut checks = ok();
        checks.insert(e("10.0.0.2"), Err("not here".into()));
        a.apply_refresh(vec![Ok(all.clone())], &checks);
        let leased = |a: &Allocator| match a.lease(1, Families::ANY) {
            Response::Leased(l) => l.ip.to_string(),
            other => panic!("{other:?}"),
        };
        let got: Vec<String> = (0..4).map(|_| leased(&a)).collect();
        assert_eq!(got, ["10.0.0.1", "10.0.0.3", "10.0.0.1", "10.0.0.3"]);
        let st = a.status_v2();
        assert_eq!(st.pool.len(), 3, "still listed");
        let q = st.pool[1].quarantine.as_ref().expect("quarantined");
        assert_eq!(q.reason, "not here");
        assert!(a.due_checks().is_empty(), "not before its backoff");
        // A worker's report takes another out at once.
        assert!(a.unusable("10.0.0.3".parse().unwrap(), "EADDRNOTAVAIL"));
        assert_eq!(leased(&a), "10.0.0.1");
        // More reports (requests in flight on it) do not lengthen its wait.
        for _ in 0..10 {
            assert!(a.unusable("10.0.0.3".parse().unwrap(), "EADDRNOTAVAIL"));
        }
        assert!(
            a.status_v2().pool[2]
                .quarantine
                .as_ref()
                .unwrap()
                .retry_in_secs
                <= 1
        );
        assert!(!a.unusable("10.9.9.9".parse().unwrap(), "not in the pool"));
        // A good check puts it back; a bad one doubles the wait.
        let mut back = ok();
        back.insert(e("10.0.0.2"), Ok(()));
        back.insert(e("10.0.0.3"), Err("still not".into()));
        a.apply_checks(&back);
        let st = a.status_v2();
        assert!(st.pool[1].quarantine.is_none());
        assert_eq!(st.pool[2].quarantine.as_ref().unwrap().retry_in_secs, 1);
        // Every address out: clients are told, as for an empty pool.
        let mut none = ok();
        for x in &all {
            none.insert(*x, Err("gone".into()));
        }
        a.apply_checks(&none);
        assert!(matches!(a.lease(1, Families::ANY), Response::NoAddress(_)));
    }

    /// Workers' reports of connects failing from one entry while the
    /// others answer take it out for every worker; a refresh's check does
    /// not put it back early; once its time is up a check does, on trial.
    #[test]
    fn an_entry_whose_connects_fail_while_the_others_answer_goes_out() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let all = vec![e("10.0.0.1"), e("10.0.0.2"), e("10.0.0.3")];
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        a.set_unreachable_quarantine(Duration::from_millis(300));
        let source = |ip: &str, ok: u64| rotor_protocol::SourceMetrics {
            ip: ip.parse().unwrap(),
            responses: [0, ok, 0, 0, 0],
            tunnels: 0,
            connect_errors: 0,
            bytes_to: 0,
            bytes_from: 0,
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // Failures from `s`, to two destinations.
        let lost = |s: &str, failed: u64| rotor_protocol::SourceUnreached {
            ip: s.parse().unwrap(),
            failed,
            destinations: vec![1, 2],
        };
        let mut seq = 0;
        // A worker's tick: answers from `ok`, then its confirmed failures
        // from 10.0.0.2.
        let mut report = |a: &Allocator, ok: &str, failed: u64| {
            seq += 1;
            let mut m = rotor_protocol::WorkerMetrics {
                boot: 7,
                seq,
                by_source: vec![source(ok, 1)],
                ..Default::default()
            };
            m.connect_seconds.observe(0.001);
            a.record_metrics(1, m.clone(), &[], true);
            a.unreached(1, &[lost("10.0.0.2", failed)], true);
        };
        for _ in 0..7 {
            report(&a, "10.0.0.1", 1);
        }
        assert!(
            a.status_v2().pool[1].quarantine.is_none(),
            "7 are not enough"
        );
        // A peer let in only to lease is not heard.
        a.unreached(2, &[lost("10.0.0.2", 50)], false);
        assert!(a.status_v2().pool[1].quarantine.is_none());
        report(&a, "10.0.0.3", 1);
        let q = a.status_v2().pool[1].quarantine.clone().expect("out");
        assert!(
            q.reason.contains("its last 8 connects failed"),
            "{}",
            q.reason
        );
        let leased = |a: &Allocator| match a.lease(1, Families::ANY) {
            Response::Leased(l) => l.ip.to_string(),
            other => panic!("{other:?}"),
        };
        let got: Vec<String> = (0..4).map(|_| leased(&a)).collect();
        assert!(!got.contains(&"10.0.0.2".to_string()), "{got:?}");
        // A refresh finds it usable (it binds), or a check fails for a
        // moment: it stays out for its time all the same.
        let binds: HashMap<Segment, Result<(), String>> =
            all.iter().map(|x| (*x, Ok(()))).collect();
        a.apply_refresh(vec![Ok(all.clone())], &binds);
        assert!(a.status_v2().pool[1].quarantine.is_some());
        let mut bad = ok();
        bad.insert(e("10.0.0.2"), Err("gone a moment".into()));
        a.apply_checks(&bad);
        let q = a.status_v2().pool[1].quarantine.clone().expect("still out");
        assert!(q.reason.contains("connects failed"), "{}", q.reason);
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(a.due_checks(), vec![e("10.0.0.2")]);
        let mut back = ok();
        back.insert(e("10.0.0.2"), Ok(()));
        a.apply_checks(&back);
        assert!(a.status_v2().pool[1].quarantine.is_none(), "on trial");
        // Failing again: out for twice as long, after two.
        report(&a, "10.0.0.1", 2);
        let q = a.status_v2().pool[1].quarantine.clone().expect("out again");
        assert!(q.reason.contains("after 600ms"), "{}", q.reason);
        // Released by hand, it starts over: two more do not take it out.
        a.steer(ip("10.0.0.2"), true, None, &usable);
        report(&a, "10.0.0.1", 2);
        assert!(a.status_v2().pool[1].quarantine.is_none());
        // One entry of three at most (a quarter, one at least): a second
        // failing entry stays in.
        report(&a, "10.0.0.1", 6);
        assert!(a.status_v2().pool[1].quarantine.is_some());
        for _ in 0..3 {
            a.unreached(1, &[lost("10.0.0.3", 8)], true);
        }
        assert!(a.status_v2().pool[2].quarantine.is_none(), "no room");
        // Off: nothing is taken out.
        let off = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        off.apply_refresh(vec![Ok(all)], &ok());
        off.set_unreachable_quarantine(Duration::ZERO);
        report(&off, "10.0.0.1", 50);
        assert!(off.status_v2().pool[1].quarantine.is_none());
    }

    /// A worker's failures from an entry its own report of that second
    /// had answers from (an entry of many addresses, answering from some)
    /// are not heard.
    #[test]
    fn failures_from_an_entry_the_same_report_answered_from_are_not_heard() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        let e = |s: &str| Segment::single(s.parse().unwrap());
        a.apply_refresh(
            vec![Ok(vec![e("10.0.0.1"), e("10.0.0.2"), e("10.0.0.3")])],
            &ok(),
        );
        a.peer_connected(9, Hello::new(rotor_protocol::Role::Worker, "t"), true);
        let answers = |seq, ips: &[&str]| rotor_protocol::WorkerMetrics {
            boot: 3,
            seq,
            by_source: ips
                .iter()
                .map(|ip| rotor_protocol::SourceMetrics {
                    ip: ip.parse().unwrap(),
                    responses: [0, 1, 0, 0, 0],
                    tunnels: 0,
                    connect_errors: 0,
                    bytes_to: 0,
                    bytes_from: 0,
                })
                .collect(),
            ..Default::default()
        };
        let lost = [rotor_protocol::SourceUnreached {
            ip: "10.0.0.2".parse().unwrap(),
            failed: 50,
            destinations: vec![1, 2],
        }];
        a.record_metrics(9, answers(1, &["10.0.0.1", "10.0.0.2"]), &[], true);
        a.unreached(9, &lost, true);
        assert!(a.status_v2().pool[1].quarantine.is_none());
        // The next second it answered nothing: heard.
        a.record_metrics(9, answers(2, &["10.0.0.1"]), &[], true);
        a.unreached(9, &lost, true);
        assert!(a.status_v2().pool[1].quarantine.is_some());
    }

    /// An allocator over [`three`] keeping its state in `dir`
    /// (checkpoints on; its pool not read yet).
    fn kept_in(dir: &std::path::Path) -> Allocator {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.3").unwrap()]);
        a.keep_state_in(dir, true);
        a
    }

    /// 10.0.0.1, .2 and .3.
    fn three() -> Vec<Segment> {
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .map(|s| Segment::single(s.parse().unwrap()))
            .to_vec()
    }

    /// A checkpoint writes the sessions and the site state when they
    /// changed, and only then; a successor of an allocator that never
    /// stopped takes them back.
    #[test]
    fn checkpoints_write_what_changed_and_a_successor_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            let a = kept_in(dir.path());
            a.apply_refresh(vec![Ok(three())], &ok());
            a
        };
        let session = |a: &Allocator| match a.lease_session(
            1,
            Families::ANY,
            "u\0s1",
            Duration::from_secs(600),
            false,
            None,
        ) {
            Response::Leased(l) => l.ip,
            other => panic!("{other:?}"),
        };
        let a = start();
        assert!(a.checkpoint().is_none(), "nothing changed yet");
        a.lease(1, Families::ANY);
        let pinned = session(&a);
        assert!(a.checkpoint().expect("a session began").write(false));
        a.checkpointed(true);
        assert_eq!(session(&a), pinned);
        assert!(
            a.checkpoint().is_none(),
            "nothing changed since: the session kept its address"
        );
        // A write that failed is tried again with nothing new.
        a.checkpointed(false);
        assert!(a.checkpoint().is_some(), "tried again");
        assert!(a.checkpoint().is_none());
        let m = a.render_metrics(false);
        assert!(m.contains("rotor_state_checkpoints_total 1"), "{m}");
        assert!(m.contains("rotor_state_checkpoint_errors_total 1"), "{m}");
        assert!(a.pushback(pinned, "example.com", 429, Some(600), true));
        a.checkpoint().expect("a cooldown began").write(false);
        // Never stopped: the successor has what the last checkpoint wrote.
        let b = start();
        assert_eq!(session(&b), pinned);
        let report = b.sites_report(10);
        let cooling = report.sites[0].addrs[0].cooling_ms.expect("cooling");
        assert!(cooling > 590_000, "{cooling}");
        assert!(dir.path().join(SESSIONS_FILE_NAME).exists());
    }

    /// A site kept over a restart (its pairs, not its cursor) that has
    /// spent the shared rotation's next address begins its own rotation
    /// there without a lease of it: that address is still the shared
    /// rotation's next, not passed over and counted unused.
    #[test]
    fn a_kept_site_begins_without_spending_a_shared_lease() {
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            let a = kept_in(dir.path());
            a.apply_refresh(vec![Ok(three())], &ok());
            a
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = start();
        assert!(a.pushback(ip("10.0.0.1"), "example.com", 429, Some(600), true));
        a.checkpoint().expect("a cooldown began").write(false);
        let b = start();
        let leased = |r: Response| match r {
            Response::Leased(l) | Response::SiteLeased { lease: l, .. } => l.ip,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            leased(b.lease_site(1, Families::ANY, "example.com")),
            ip("10.0.0.2")
        );
        assert_eq!(leased(b.lease(1, Families::ANY)), ip("10.0.0.1"));
        let counts: Vec<u64> = b.status_v2().pool.iter().map(|e| e.leases).collect();
        assert_eq!(counts, [1, 1, 0]);
    }

    /// A session kept over a restart whose address is missing while a
    /// source has not been read yet (down at the start) is served from the
    /// rotation meanwhile, not moved for good: back on its address once
    /// that source reads.
    #[test]
    fn a_restored_session_waits_for_every_source_before_it_moves() {
        let dir = tempfile::tempdir().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let start = || {
            let a = Allocator::new(vec![
                Source::list("10.0.0.1").unwrap(),
                Source::list("10.0.0.2").unwrap(),
            ]);
            a.keep_state_in(dir.path(), true);
            a
        };
        let one = || {
            vec![
                Segment::single(ip("10.0.0.1")),
                Segment::single(ip("10.0.0.5")),
            ]
        };
        let two = || vec![Segment::single(ip("10.0.0.2"))];
        let named = |a: &Allocator, key: &str| match a.lease_session(
            1,
            Families::ANY,
            key,
            Duration::from_secs(600),
            false,
            None,
        ) {
            Response::Leased(l) => l.ip,
            other => panic!("{other:?}"),
        };
        let session = |a: &Allocator| named(a, "u\0s1");
        let a = start();
        a.apply_refresh(vec![Ok(one()), Ok(two())], &ok());
        a.lease(1, Families::ANY);
        a.lease(1, Families::ANY);
        assert_eq!(session(&a), ip("10.0.0.2"));
        a.checkpoint().expect("a session began").write(false);
        drop(a);
        let b = start();
        let down = SourceError::Read {
            path: "/nonexistent".into(),
            source: std::io::Error::other("down"),
        };
        b.apply_refresh(vec![Ok(one()), Err(down)], &ok());
        let meanwhile = session(&b);
        assert_ne!(meanwhile, ip("10.0.0.2"), "served meanwhile");
        // A session begun in this run moves as ever while the source is
        // unread (its address out by hand: it moves for good).
        let new = named(&b, "u\0new");
        b.steer(new, false, None, &usable);
        let moved = named(&b, "u\0new");
        assert_ne!(moved, new);
        b.steer(new, true, None, &usable);
        assert_eq!(named(&b, "u\0new"), moved, "moved for good");
        b.apply_refresh(vec![Ok(one()), Ok(two())], &ok());
        assert_eq!(session(&b), ip("10.0.0.2"), "not moved");
        // Once every source has read, an address gone is gone: it moves.
        b.apply_refresh(vec![Ok(one()), Ok(vec![])], &ok());
        let moved = session(&b);
        assert_ne!(moved, ip("10.0.0.2"));
        b.apply_refresh(vec![Ok(one()), Ok(two())], &ok());
        assert_eq!(session(&b), moved, "moved for good");
        drop(b);
        // Past the grace after the start, a source that still has not read
        // does not keep a kept session from moving.
        let mut c = start();
        c.started -= RESTORED_GRACE + Duration::from_secs(1);
        let down = SourceError::Read {
            path: "/nonexistent".into(),
            source: std::io::Error::other("down"),
        };
        c.apply_refresh(vec![Ok(one()), Err(down)], &ok());
        let moved = session(&c);
        c.apply_refresh(vec![Ok(one()), Ok(two())], &ok());
        assert_eq!(session(&c), moved, "moved for good past the grace");
    }

    /// A sessions file with an item that does not read: the others come
    /// back, the file is set aside, and the next checkpoint writes them
    /// again (a crash before anything changed would lose them otherwise).
    #[test]
    fn a_file_read_in_part_is_written_again_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let a = kept_in(dir.path());
        a.apply_refresh(vec![Ok(three())], &ok());
        let Response::Leased(l) = a.lease_session(
            1,
            Families::ANY,
            "u\0s1",
            Duration::from_secs(600),
            false,
            None,
        ) else {
            panic!("no session");
        };
        a.checkpoint().expect("a session began").write(false);
        let path = dir.path().join(SESSIONS_FILE_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replacen('[', "[{\"key\":\"bad\"},", 1);
        std::fs::write(&path, text).unwrap();
        let b = kept_in(dir.path());
        b.apply_refresh(vec![Ok(three())], &ok());
        assert!(!path.exists(), "set aside");
        b.checkpoint()
            .expect("what was read, written again")
            .write(false);
        assert!(path.exists());
        let c = kept_in(dir.path());
        c.apply_refresh(vec![Ok(three())], &ok());
        match c.lease_session(
            1,
            Families::ANY,
            "u\0s1",
            Duration::from_secs(600),
            false,
            None,
        ) {
            Response::Leased(again) => assert_eq!(again.ip, l.ip),
            other => panic!("{other:?}"),
        }
    }

    /// A wall clock set back since the file was written (a start before NTP
    /// has set it, a VM snapshot) does not lengthen what was kept: the
    /// file's time of writing counts as now when it is later.
    #[test]
    fn a_clock_set_back_does_not_lengthen_kept_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let a = kept_in(dir.path());
        a.apply_refresh(vec![Ok(three())], &ok());
        let r = a.lease_session(
            1,
            Families::ANY,
            "u\0s1",
            Duration::from_secs(600),
            false,
            None,
        );
        assert!(matches!(r, Response::Leased(_)), "{r:?}");
        // A key past the bound is no session's: refused, not kept.
        let long = format!("u\0{}", "s".repeat(crate::sessions::MAX_KEY));
        let r = a.lease_session(
            1,
            Families::ANY,
            &long,
            Duration::from_secs(600),
            false,
            None,
        );
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
        assert_eq!(a.status_v2().sessions, 1);
        a.checkpoint().expect("a session began").write(false);
        drop(a);
        let path = dir.path().join(SESSIONS_FILE_NAME);
        let sessions = |a: &Allocator| a.status_v2().sessions;
        // Written a minute ago by this clock: the session is back.
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        let b = kept_in(dir.path());
        assert_eq!(sessions(&b), 1);
        drop(b);
        // (with checkpoints the file stays once read)
        // Written 11 minutes ahead of this clock (it has been set back since):
        // its 10 minutes are over.
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(660))
            .unwrap();
        let c = kept_in(dir.path());
        assert_eq!(sessions(&c), 0);
    }

    /// A restart whose first read is empty (an interface not up yet) keeps
    /// the saved rotation for the first pool with addresses, in memory and
    /// in the state file, and raises no false alarm about the table.
    #[test]
    fn an_empty_first_read_keeps_the_saved_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let start = || {
            let (file, saved) = StateFile::open(dir.path()).unwrap();
            let sources = vec![Source::list("10.0.0.1-10.0.0.3").unwrap()];
            Allocator::resuming(sources, Some(file), saved.unwrap_or_default(), None).unwrap()
        };
        let next = |a: &Allocator| match a.lease(1, Families::ANY) {
            Response::Leased(l) => l.ip.to_string(),
            other => panic!("{other:?}"),
        };
        let a = start();
        a.apply_refresh(vec![Ok(three())], &ok());
        assert_eq!(next(&a), "10.0.0.1");
        a.persist();
        drop(a);
        for _ in 0..2 {
            let a = start();
            a.apply_refresh(vec![Ok(vec![])], &ok());
            assert!(
                !a.repair_table(),
                "no table fault after an empty first read"
            );
            a.persist();
        }
        let a = start();
        a.apply_refresh(vec![Ok(vec![])], &ok());
        a.apply_refresh(vec![Ok(three())], &ok());
        assert_eq!(next(&a), "10.0.0.2");
    }

    /// A saved position is applied once, by the first publish with
    /// addresses of its family, also one between refreshes: not again at
    /// a later refresh (that rewound the rotation and handed its addresses
    /// out again).
    #[test]
    fn a_saved_position_is_applied_once() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let saved = Saved {
            generation: 5,
            seq: 9,
            next_due: [Some(ip("10.0.0.2")), None],
        };
        let a = Allocator::resuming(
            vec![Source::list("10.0.0.1-10.0.0.3").unwrap()],
            None,
            saved,
            None,
        )
        .unwrap();
        let bad: HashMap<Segment, Result<(), String>> = three()
            .into_iter()
            .map(|e| (e, Err("not usable".to_string())))
            .collect();
        a.apply_refresh(vec![Ok(three())], &bad);
        // Every address out: the family empty, its position kept.
        a.steer(ip("10.0.0.2"), true, None, &usable);
        a.steer(ip("10.0.0.3"), true, None, &usable);
        let lease = || match a.lease(1, Families::ANY) {
            Response::Leased(l) => l.ip.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            [lease(), lease(), lease()],
            ["10.0.0.2", "10.0.0.3", "10.0.0.2"]
        );
        // All usable again: the rotation goes on from where it is.
        let good: HashMap<Segment, Result<(), String>> =
            three().into_iter().map(|e| (e, Ok(()))).collect();
        a.apply_refresh(vec![Ok(three())], &good);
        assert_eq!([lease(), lease()], ["10.0.0.3", "10.0.0.1"]);
    }

    /// A prefix that goes out between refreshes (a worker could not bind
    /// its address): an entry inside it serves at once, as after a refresh,
    /// not only from the next one.
    #[test]
    fn an_entry_inside_a_prefix_taken_out_serves_at_once() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let outer = Segment::prefix(ip("10.0.0.2"), 31).unwrap();
        let list = vec![
            Segment::single(ip("10.0.0.1")),
            outer,
            Segment::single(ip("10.0.0.3")),
        ];
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.apply_refresh(vec![Ok(list)], &ok());
        assert!(a.unusable(ip("10.0.0.2"), "test: no such address"));
        assert_eq!(leased_set(&a, 4), ["10.0.0.1", "10.0.0.3"]);
    }

    /// The addresses `n` leases gave, each once, sorted.
    fn leased_set(a: &Allocator, n: usize) -> Vec<String> {
        let mut v: Vec<String> = (0..n)
            .map(|_| match a.lease(1, Families::ANY) {
                Response::Leased(l) => l.ip.to_string(),
                other => panic!("{other:?}"),
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// An address taken out by hand that is listed on its own and inside a
    /// listed prefix: its own entry goes out (not the prefix), and stays
    /// out when the prefix goes out too (the prefix taken out in its place
    /// had the address's own entry serve alone at the next refresh).
    #[test]
    fn a_hand_quarantine_takes_out_the_addresss_own_entry() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let outer = Segment::prefix(ip("10.0.0.2"), 31).unwrap();
        let inner = Segment::single(ip("10.0.0.3"));
        let list = vec![Segment::single(ip("10.0.0.1")), outer, inner];
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.apply_refresh(vec![Ok(list.clone())], &ok());
        let leased = |a: &Allocator| leased_set(a, 6);
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(a.steer(ip("10.0.0.3"), false, None, &usable), Some(inner));
        // The prefix out too (its route gone): the address does not serve.
        let bad: HashMap<Segment, Result<(), String>> = [(outer, Err("not usable".to_string()))]
            .into_iter()
            .collect();
        a.apply_refresh(vec![Ok(list.clone())], &bad);
        assert_eq!(leased(&a), ["10.0.0.1"]);
        a.apply_refresh(vec![Ok(list.clone())], &bad);
        assert_eq!(leased(&a), ["10.0.0.1"], "still out after a refresh");
        // Released: its own entry serves while the prefix is out.
        assert_eq!(a.steer(ip("10.0.0.3"), true, None, &usable), Some(inner));
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.3"]);
        // An address in the prefix alone: the prefix is its entry.
        assert_eq!(a.steer(ip("10.0.0.2"), true, None, &usable), Some(outer));
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    }

    /// Nested prefixes out by hand (a /64 inside a listed /48) each come
    /// back out after a restart, as themselves (the /64 was taken for the
    /// /48 holding its base, found out already, and dropped).
    #[test]
    fn nested_prefixes_out_by_hand_outlive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let wide = Segment::prefix(ip("2001:db8::"), 48).unwrap();
        let narrow = Segment::prefix(ip("2001:db8::"), 64).unwrap();
        let list = vec![Segment::single(ip("10.0.0.1")), wide, narrow];
        let start = || {
            let a = kept_in(dir.path());
            a.apply_refresh(vec![Ok(list.clone())], &ok());
            a
        };
        let out = |a: &Allocator| -> Vec<Segment> {
            let mut v: Vec<Segment> = a
                .status_v2()
                .pool
                .into_iter()
                .filter(|p| p.quarantine.is_some())
                .map(|p| p.entry)
                .collect();
            v.sort_by_key(|e| e.prefix_len());
            v
        };
        let a = start();
        assert_eq!(
            a.steer(ip("2001:db8:0:1::1"), false, None, &usable),
            Some(wide)
        );
        assert_eq!(
            a.steer(ip("2001:db8::1"), false, None, &usable),
            Some(narrow)
        );
        drop(a);
        let b = start();
        assert_eq!(out(&b), [wide, narrow]);
    }

    /// A hand quarantine's end is written on the clock of its writing,
    /// from its monotonic end: made while the wall clock was a year off
    /// (here: its wall end skewed), the file says the right end once a
    /// pool load writes it again.
    #[test]
    fn a_hand_quarantines_end_is_written_on_the_clock_of_now() {
        let dir = tempfile::tempdir().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = kept_in(dir.path());
        a.apply_refresh(vec![Ok(three())], &ok());
        a.steer(
            ip("10.0.0.3"),
            false,
            Some(Duration::from_secs(3600)),
            &usable,
        );
        let year = 365 * 86_400;
        for q in a.lock().quarantine.values_mut() {
            q.until = q.until.map(|u| u - year);
        }
        a.apply_refresh(vec![Ok(three())], &ok());
        let path = dir.path().join(crate::persist::HAND_FILE_NAME);
        let (kept, _) = crate::persist::read_hand(&path).unwrap();
        let until = kept[0].until.unwrap();
        let left = until.saturating_sub(unix_now());
        assert!((3590..=3600).contains(&left), "{left}");
    }

    #[test]
    fn hand_quarantines_outlive_a_restart_and_a_pool_change() {
        let dir = tempfile::tempdir().unwrap();
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let all = three();
        let start = || kept_in(dir.path());
        let leased = |a: &Allocator| -> Vec<String> {
            (0..4)
                .map(|_| match a.lease(1, Families::ANY) {
                    Response::Leased(l) => l.ip.to_string(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = start();
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        a.steer(ip("10.0.0.2"), false, None, &usable);
        a.steer(
            ip("10.0.0.3"),
            false,
            Some(Duration::from_secs(3600)),
            &usable,
        );
        // Out for a second only: gone by the restart below.
        a.steer(ip("10.0.0.1"), false, Some(Duration::from_secs(1)), &usable);
        let kept = crate::persist::read_hand(&dir.path().join(crate::persist::HAND_FILE_NAME));
        assert_eq!(kept.unwrap().0.len(), 3);
        drop(a);
        std::thread::sleep(Duration::from_millis(1100));

        // A restart: out again once the pool is loaded, for the rest of
        // their time.
        let a = start();
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased(&a), ["10.0.0.1"; 4]);
        let st = a.status_v2();
        let q = st.pool[2].quarantine.as_ref().expect("out by hand");
        assert!(q.reason.contains("kept over a restart"), "{}", q.reason);
        assert!(
            (3590..=3600).contains(&q.retry_in_secs),
            "{}",
            q.retry_in_secs
        );
        // A refresh without 10.0.0.2 and then with it: still out.
        a.apply_refresh(vec![Ok(vec![e("10.0.0.1"), e("10.0.0.3")])], &ok());
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased(&a), ["10.0.0.1"; 4]);
        // Released while out of the pool: not out when it comes back.
        a.apply_refresh(vec![Ok(vec![e("10.0.0.1"), e("10.0.0.3")])], &ok());
        assert_eq!(
            a.steer(ip("10.0.0.2"), true, None, &usable),
            Some(e("10.0.0.2"))
        );
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]);
        // Held while out of the pool, then back inside a prefix: the
        // prefix is not what was taken out (it serves); back as itself,
        // it is out again.
        a.apply_refresh(vec![Ok(vec![e("10.0.0.1"), e("10.0.0.2")])], &ok());
        let slash31 = Segment::prefix(ip("10.0.0.2"), 31).unwrap();
        a.apply_refresh(vec![Ok(vec![e("10.0.0.1"), slash31])], &ok());
        assert_eq!(leased_set(&a, 4), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased_set(&a, 4), ["10.0.0.1", "10.0.0.2"]);
        a.steer(ip("10.0.0.3"), true, None, &usable);
        drop(a);
        let a = start();
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]);
        // A file that does not parse: logged, set aside, nothing out, and a
        // new one at the first change.
        drop(a);
        let path = dir.path().join(crate::persist::HAND_FILE_NAME);
        std::fs::write(&path, "{").unwrap();
        let a = start();
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        assert_eq!(leased(&a), ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]);
        a.steer(ip("10.0.0.1"), false, None, &usable);
        assert_eq!(crate::persist::read_hand(&path).unwrap().0.len(), 1);
        assert!(path.with_extension("json.corrupt").exists());

        // Written by a clock a year ahead of this one (this one behind, as
        // before NTP): an hour's quarantine has its hour left from the
        // file's writing, not a year and an hour.
        drop(a);
        let year = 365 * 86_400;
        let ahead = unix_now() + year;
        let hand = format!(
            "{{\"taken_out_by_hand\":[{{\"entry\":\"10.0.0.3\",\"until\":{}}}]}}",
            ahead + 3600
        );
        std::fs::write(&path, hand).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::from_secs(ahead))
            .unwrap();
        drop(file);
        let a = start();
        a.apply_refresh(vec![Ok(all.clone())], &ok());
        let st = a.status_v2();
        let q = st.pool[2].quarantine.as_ref().expect("out by hand");
        assert!(q.retry_in_secs <= 3600, "{}", q.retry_in_secs);
    }

    /// More hand quarantines kept than `MAX_HELD`, and a first read of the
    /// pool that finds nothing (a source not up yet): every one is out
    /// again once the pool is read, none cut and lost.
    #[test]
    fn every_kept_hand_quarantine_waits_for_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let n = MAX_HELD + 10;
        let addrs: Vec<Segment> = (0..n as u32)
            .map(|i| Segment::single(IpAddr::V4((0x0a01_0000 + i).into())))
            .collect();
        let lines: Vec<String> = addrs
            .iter()
            .map(|e| format!("{{\"entry\":\"{e}\",\"until\":null}}"))
            .collect();
        let path = dir.path().join(crate::persist::HAND_FILE_NAME);
        std::fs::write(
            &path,
            format!("{{\"taken_out_by_hand\":[{}]}}", lines.join(",")),
        )
        .unwrap();
        let a = kept_in(dir.path());
        a.apply_refresh(vec![Ok(Vec::new())], &ok());
        let mut all = addrs.clone();
        all.push(Segment::single("10.0.0.1".parse().unwrap()));
        a.apply_refresh(vec![Ok(all)], &ok());
        let out = a
            .status_v2()
            .pool
            .iter()
            .filter(|e| e.quarantine.is_some())
            .count();
        assert_eq!(out, n);
    }

    #[test]
    fn leases_count_per_peer_and_sequence() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.2").unwrap()]);
        a.apply_refresh(
            vec![Ok("10.0.0.1,10.0.0.2"
                .split(',')
                .map(|s| Segment::single(s.parse().unwrap()))
                .collect())],
            &ok(),
        );
        a.peer_connected(1, Hello::new(rotor_protocol::Role::Worker, "t"), true);
        for expect in 1..=3u64 {
            match a.lease(1, Families::ANY) {
                Response::Leased(l) => assert_eq!(l.seq, expect),
                other => panic!("{other:?}"),
            }
        }
        let st = a.status();
        assert_eq!(st.peers[0].leases, 3);
        assert_eq!(st.leases_total, 3);
        assert_eq!(st.pool[0].leases, 2);
    }

    /// A reload's outcome per worker: done once a worker said it made that
    /// reload (or a later one) of this table; an older count, another
    /// table's, or none is no word yet; a worker of an older minor cannot
    /// say; a control peer is no worker.
    #[test]
    fn workers_say_how_their_reload_went() {
        use rotor_protocol::{Role, WorkerReloadOutcome as O};
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.peer_connected(1, Hello::new(Role::Worker, "t"), true);
        a.peer_connected(2, Hello::new(Role::Worker, "t"), true);
        let mut old = Hello::new(Role::Worker, "t");
        old.minor = rotor_protocol::MINOR_WORKER_RELOADS - 1;
        a.peer_connected(3, old, true);
        a.peer_connected(4, Hello::new(Role::Control, "t"), true);
        let outcomes = |asked| {
            let (w, all) = a.worker_reloads(asked);
            (w.into_iter().map(|w| w.outcome).collect::<Vec<_>>(), all)
        };
        assert_eq!(
            outcomes((9, 2)),
            (vec![O::NoWord, O::NoWord, O::TooOld], false)
        );
        let failed = vec![("users file".to_string(), "bad".to_string())];
        a.worker_reloaded(1, (9, 2), Vec::new());
        a.worker_reloaded(2, (9, 1), failed.clone());
        assert_eq!(
            outcomes((9, 2)),
            (
                vec![O::Done { failed: vec![] }, O::NoWord, O::TooOld],
                false
            )
        );
        a.worker_reloaded(2, (8, 5), failed.clone());
        assert_eq!(outcomes((9, 2)).0[1], O::NoWord, "another table's count");
        a.worker_reloaded(2, (9, 3), failed.clone());
        assert_eq!(
            outcomes((9, 2)),
            (
                vec![O::Done { failed: vec![] }, O::Done { failed }, O::TooOld],
                true
            )
        );
        a.peer_gone(2);
        assert_eq!(outcomes((9, 2)).0.len(), 2);
        // One that connected after the reload was asked read its files as
        // it started: done, though it will not make that reload.
        a.announce_reload();
        let asked = a.reloads_asked();
        a.peer_connected(5, Hello::new(Role::Worker, "t"), true);
        let (w, _) = a.worker_reloads(asked);
        assert_eq!(
            w.iter().map(|w| &w.outcome).collect::<Vec<_>>(),
            [&O::NoWord, &O::TooOld, &O::Done { failed: vec![] }]
        );
    }

    /// A worker is expected to make the reloads after the first count it
    /// is told (its first request), not after its Hello: one asked in
    /// between is not one it makes. Asked again, the count does not move.
    #[test]
    fn a_worker_counts_reloads_from_the_first_count_it_is_told() {
        use rotor_protocol::{Role, WorkerReloadOutcome as O};
        let a = Allocator::new(vec![Source::list("10.0.0.1").unwrap()]);
        a.peer_connected(1, Hello::new(Role::Worker, "t"), true);
        a.announce_reload();
        let between = a.reloads_asked();
        let outcome = |asked| a.worker_reloads(asked).0.remove(0).outcome;
        assert_eq!(outcome(between), O::NoWord);
        assert_eq!(
            a.reloads_for(1),
            Response::Reloads {
                table: between.0,
                count: between.1
            }
        );
        assert_eq!(outcome(between), O::Done { failed: vec![] });
        a.announce_reload();
        let after = a.reloads_asked();
        let _ = a.reloads_for(1);
        assert_eq!(outcome(after), O::NoWord, "counted from the first answer");
        a.worker_reloaded(1, after, Vec::new());
        assert_eq!(outcome(after), O::Done { failed: vec![] });
        // An older worker asks later, if at all, and counts from its
        // table: its Hello's count stands.
        let mut old = Hello::new(Role::Worker, "t");
        old.minor = rotor_protocol::MINOR_FIRST_RELOADS - 1;
        a.peer_connected(2, old, true);
        a.announce_reload();
        let later = a.reloads_asked();
        let _ = a.reloads_for(2);
        assert_eq!(a.worker_reloads(later).0[1].outcome, O::NoWord);
    }

    #[test]
    fn attached_peers_get_their_own_counter_and_share_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let home = TableHome {
            path: dir.path().join("a.leases"),
            mode: 0o600,
            group: None,
        };
        let sources = vec![Source::list("10.0.0.1-10.0.0.3").unwrap()];
        let a = Allocator::resuming(sources, None, Saved::default(), Some(home)).unwrap();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        a.apply_refresh(
            vec![Ok(["10.0.0.1", "10.0.0.2", "10.0.0.3"]
                .iter()
                .map(|s| Segment::single(ip(s)))
                .collect())],
            &ok(),
        );
        for peer in [1, 2] {
            a.peer_connected(peer, Hello::new(rotor_protocol::Role::Worker, "t"), true);
        }
        let table = |peer| match a.attach(peer, false) {
            Response::Attached { path, id, slot } => (
                rotor_protocol::LeaseTable::open(path.as_ref(), Some(id)).unwrap(),
                slot,
            ),
            other => panic!("{other:?}"),
        };
        let (t1, s1) = table(1);
        let (t2, s2) = table(2);
        assert_eq!((s1, s2), (Some(0), Some(1)));
        assert_eq!((a.slot_of(1), a.slot_of(2)), (s1, s2));
        let lease = |t: &rotor_protocol::LeaseTable, s| match t.lease(Families::ANY, s) {
            Some(Ok(l)) => l.ip,
            other => panic!("{other:?}"),
        };
        assert_eq!(lease(&t1, s1), ip("10.0.0.1"));
        assert_eq!(lease(&t2, s2), ip("10.0.0.2"));
        match a.lease(2, Families::ANY) {
            Response::Leased(l) => assert_eq!((l.ip, l.seq), (ip("10.0.0.3"), 3)),
            other => panic!("{other:?}"),
        }
        assert_eq!(lease(&t1, s1), ip("10.0.0.1"));
        let st = a.status();
        let per: Vec<u64> = st.peers.iter().map(|p| p.leases).collect();
        assert_eq!((per, st.leases_total, st.cursor), (vec![2, 2], 4, 1));
        // A peer that leaves frees its counter for the next one, and its
        // published load stops counting for its siblings.
        t1.set_peer_load(s1.unwrap(), 5, 0);
        assert_eq!(t2.least_sibling_load(s2.unwrap(), 5), Some(0));
        a.peer_gone(1);
        assert_eq!(t2.least_sibling_load(s2.unwrap(), 5), None);
        a.peer_connected(3, Hello::new(rotor_protocol::Role::Worker, "t"), true);
        assert_eq!(table(3).1, Some(0));
        assert_eq!(
            a.status()
                .peers
                .iter()
                .map(|p| p.leases)
                .collect::<Vec<_>>(),
            [2, 0]
        );
        // Peers let in to lease only hold half the slots at most: past
        // that they lease without one, and a trusted worker still has one.
        let slot = |peer, lease_only| match a.attach(peer, lease_only) {
            Response::Attached { slot, .. } => slot,
            other => panic!("{other:?}"),
        };
        let mut held = 0;
        for peer in 100..(100 + PEER_SLOTS as u64) {
            a.peer_connected(peer, Hello::new(rotor_protocol::Role::Worker, "t"), true);
            held += usize::from(slot(peer, true).is_some());
        }
        assert_eq!(held, PEER_SLOTS / 2);
        a.peer_connected(4, Hello::new(rotor_protocol::Role::Worker, "t"), true);
        assert!(slot(4, false).is_some());
        // Closed at exit: workers fall back to the socket.
        a.close_table();
        assert_eq!(t2.lease(Families::ANY, s2), None);
        assert!(!dir.path().join("a.leases").exists());
    }
}
