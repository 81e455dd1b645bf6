//! The lease table: the pool and its rotation cursors in a shared-memory
//! file, so a worker takes its next address with one compare-and-swap
//! instead of a round trip to the allocator — with the same global, atomic
//! rotation.
//!
//! The allocator owns the table: it creates the file next to its socket,
//! writes every pool into it, and hands workers its path over the socket
//! (`Request::Attach`); it is the only writer of the pool. Workers (and the
//! allocator itself, for leases asked over the socket) move the cursors.
//!
//! Layout 3 (native-endian `u64` words; one file per allocator run):
//!
//! ```text
//! line 0  magic, layout, capacity, peer slots, id, peer slots handed out,
//!         reloads asked for, order by prefix (1: each prefix in an order
//!         of its own, `segment::Order`; zero in a table of an allocator
//!         before it: the key's order alone)
//! line 1  IPv4 state, seq, IPv6 state, site mode, order key (4 words;
//!         zero in a table of an allocator before the key: the fixed order)
//! line 2  half 0: generation, IPv4 entries, IPv6 entries, IPv4 total, IPv6 total
//! line 3  half 1: the same
//! 256 peer lines: leases, accept group, load
//! site filter: 2^16 bits (1024 words)
//! half 0: capacity entries, then half 1: capacity entries
//!         entry = family (4 or 6) | host bits << 8, high and low 64 bits,
//!                 leases, first index
//! ```
//!
//! Each family rotates on its own cursor over its own entries (IPv4 entries
//! first in a half, then IPv6), so requests to IPv4 and IPv6 destinations,
//! however they interleave, each see their family's addresses in exact
//! order. An entry is one address or a whole prefix (`segment`); a family's
//! cursor counts through the sum of its entries' sizes (its total, at most
//! 2^44), and index `i` is lease `i - first` of the entry that holds it.
//!
//! A state word packs a closed bit, a 19-bit tag (its low bit names the
//! half in use) and the cursor. A lease reads the half its family's state
//! names, finds the entry at the cursor, and moves the cursor past it with a
//! compare-and-swap of the whole state, which fails if the allocator swapped
//! in another pool meanwhile: the allocator only rewrites a half no state
//! names (it moves both states to a new half before it writes again), and
//! changes the states with read-modify-writes, so a lease whose swap
//! succeeded read a whole, current pool (the seqlock argument, per state).
//! Closing sets the closed bit of both: no lease succeeds afterwards, and
//! the closer reads the final cursors exactly. The lease sequence and the
//! counters are bumped just after a lease's swap, so a reading taken at a
//! close may miss the few leases still finishing: they count leases for
//! status and logs; the rotation itself is the cursors, which are exact.
//!
//! A peer line also carries what its worker publishes for accept balancing
//! (see the worker's `accept`): the identity of the listening sockets it
//! accepts from (its group; 0 for none) and its load, the client
//! connections and tunnels it holds. Words a layout-1 peer did not know of
//! are zero, so older workers simply take no part.
//!
//! The site mode and filter (layout 3) tell a worker which requests need
//! the allocator's per-site state (budgets, cooldowns: see the allocator's
//! `sites`): mode 0, none (every lease from the table); 1, the sites whose
//! bit (`site_bit`) is set in the filter; 2, every site. A bit set for a
//! site the allocator holds nothing for only costs that site's requests a
//! round trip, answered from the shared rotation all the same.
//!
//! Whoever can write the file can disturb the rotation: it gets the
//! socket's group, so run workers only as the allocator's user or group, as
//! `deploy/` does. What they write is never trusted blindly: workers check
//! every lease against the pool the allocator describes over the socket,
//! and the allocator checks the table every second and replaces it when it
//! is not what it published. A file cut short under its mappings crashes no
//! one either: the pages past its end would raise SIGBUS, and `guard` turns
//! the mapping into a closed, empty table instead (`is_broken`).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::guard::Guard;
use crate::message::{Families, Lease, NoAddress, Refusal};
use crate::segment::{from_u128, Family, Segment};
use crate::site::{site_bit, SITE_FILTER_BITS};

const MAGIC: u64 = u64::from_le_bytes(*b"RTRLEASE");
/// Bumped on any change of the layout above.
pub const TABLE_LAYOUT: u64 = 3;
/// Workers that can count their leases in the table; later ones lease
/// through it all the same, counted by the allocator as unattributed.
pub const PEER_SLOTS: usize = 256;

const LINE: usize = 8; // words
/// Line 0: one past the highest peer slot ever handed out, so a scan of
/// the peer lines stops there.
const SLOTS_USED: usize = 5;
/// Line 0: reloads asked of the allocator (`rotor reload`, SIGHUP); workers
/// re-read what they read at start (users file, resolver) when it moves.
const RELOADS: usize = 6;
/// Words of a peer line.
const PEER_GROUP: usize = 1;
const PEER_LOAD: usize = 2;

/// The first word of peer `slot`'s line; `None` past the last slot.
fn peer_line(slot: u32) -> Option<usize> {
    let slot = slot as usize;
    (slot < PEER_SLOTS).then_some(PEERS + slot * LINE)
}
/// The state word of each family, by `Family::index`.
const STATES: [usize; 2] = [LINE, LINE + 2];
const SEQ: usize = LINE + 1;
/// Line 1: which requests take the site path (see above).
const SITE_MODE: usize = LINE + 3;
/// Line 1: the host's order key, the order a prefix's addresses are leased
/// in (`segment::set_order`), so that a worker leases from the table in
/// the allocator's order.
const ORDER_KEY: usize = LINE + 4;
/// Line 0: the order's `by_prefix`, 1 or 0 (see `ORDER_KEY`).
const ORDER_BY_PREFIX: usize = 7;
/// Line of each half's metadata: generation, then entries and total by
/// family.
const HALVES: usize = 2 * LINE;
const H_ENTRIES: usize = 1;
const H_TOTAL: usize = 3;
const PEERS: usize = 4 * LINE;
const SITES: usize = PEERS + PEER_SLOTS * LINE;
const SITE_WORDS: usize = SITE_FILTER_BITS / 64;
const ENTRIES: usize = SITES + SITE_WORDS;
const ENTRY: usize = 5; // words
const E_LEASES: usize = 3;
const E_FIRST: usize = 4;

const CLOSED: u64 = 1 << 63;
const TAG_SHIFT: u32 = 44;
const TAG_MASK: u64 = (1 << 19) - 1;
const CURSOR_MASK: u64 = (1 << TAG_SHIFT) - 1;
/// Most addresses one family's cursor counts through: past it, the rest of
/// a family (what comes after a prefix this large) is not reached.
pub const MAX_FAMILY_TOTAL: u64 = 1 << TAG_SHIFT;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot open the lease table {0}")]
    Open(String, #[source] io::Error),
    #[error("cannot map the lease table")]
    Map(#[source] io::Error),
    #[error("{0} is not a lease table of this layout, or not the one announced")]
    Invalid(String),
    #[error("{0} is a lease table of another layout (another rotor version's: upgrade rotor's binaries together)")]
    Layout(String),
    #[error("the lease table holds at most {capacity} entries, not {wanted}")]
    TooSmall { capacity: usize, wanted: usize },
    #[error("the lease table is closed")]
    Closed,
}

/// What is at `path`, if it is there and is no lease table: an allocator
/// starting does not replace it with one. (The table's path is the
/// socket's with `.leases` added: `--socket` given another file's path
/// had that file's `.leases` sibling replaced, whatever it was.) Asked
/// only at the start: a running allocator replaces the table it made
/// whatever was done to it (a first word overwritten), as it must.
pub fn not_a_table(path: &Path) -> Option<&'static str> {
    use std::io::Read;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() {
        return Some("not a regular file");
    }
    let mut word = [0u8; 8];
    match File::open(path).and_then(|mut f| f.read_exact(&mut word)) {
        Ok(()) if u64::from_ne_bytes(word) == MAGIC => None,
        // An empty file (a table whose making was cut short) is nothing.
        _ if meta.len() == 0 => None,
        _ => Some("not a lease table"),
    }
}

/// A mapped lease table.
pub struct LeaseTable {
    base: NonNull<AtomicU64>,
    words: usize,
    capacity: usize,
    id: u64,
    /// Keeps a file mapping alive should the file be cut short (`guard`).
    guard: Option<Guard>,
    /// The file mapped, to see it was cut short before any page faults,
    /// and to cut a broken table's file for every other process
    /// (`condemn`).
    file: Option<File>,
    /// By family: the state tag this process published last ([`NO_TAG`]
    /// before it published any). Only a publish moves a tag, and only the
    /// allocator publishes: another tag is someone else's writing.
    published: [AtomicU64; 2],
}

/// No tag published by this process (a worker's view of a table).
const NO_TAG: u64 = u64::MAX;

/// The most times a reading of the table, or a lease's compare-and-swap
/// on its states, is tried again: each retry is some other lease or a
/// publish between, which never comes this many times in a row, but a
/// writer of the file changing a state word without end held the
/// allocator's lock in the loop for as long as it went on. Past it the
/// table is taken for broken (replaced), or the reading taken as it is.
const MAX_TRIES: u32 = 4096;

/// How long a publish retries its compare-and-swap (see `publish`).
const PUBLISH_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

// SAFETY: `base` points into a shared mapping that lives as long as the
// table (unmapped only in `drop`) and is only ever read or written through
// `AtomicU64`s (`word`), so moving the table to another thread or using it
// from several at once is no different from sharing an `&[AtomicU64]`.
// Other processes write the same memory, through atomics too.
unsafe impl Send for LeaseTable {}
// SAFETY: as for `Send`: every access is atomic.
unsafe impl Sync for LeaseTable {}

impl Drop for LeaseTable {
    fn drop(&mut self) {
        // Unguarded first: the addresses may be reused once unmapped.
        self.guard = None;
        // SAFETY: `base` and `words` are the mapping made in `map`, unmapped
        // once, here; nothing borrowed from it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.words * 8) };
    }
}

impl std::fmt::Debug for LeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseTable")
            .field("id", &self.id)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// An entry's words as a lease read them, and the lease's offset in it.
struct Pick {
    k: usize,
    family: Family,
    meta: u64,
    hi: u64,
    lo: u64,
    offset: u64,
}

impl Pick {
    #[inline]
    fn address(&self) -> Option<IpAddr> {
        match (self.meta, self.family) {
            (4, Family::V4) => Some(IpAddr::V4(std::net::Ipv4Addr::from(self.lo as u32))),
            (6, Family::V6) => Some(IpAddr::V6(std::net::Ipv6Addr::from(
                (u128::from(self.hi) << 64) | u128::from(self.lo),
            ))),
            _ => {
                // A prefix: the family must match and the host bits fit.
                let family = match self.meta & 0xff {
                    4 => Family::V4,
                    6 => Family::V6,
                    _ => return None,
                };
                let host_bits = (self.meta >> 8) as u8;
                if family != self.family || host_bits > family.bits() {
                    return None;
                }
                let base = (u128::from(self.hi) << 64) | u128::from(self.lo);
                Some(crate::segment::lease_address(
                    family,
                    base,
                    host_bits,
                    u128::from(self.offset),
                ))
            }
        }
    }
}

/// The rotation at one instant, without the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub generation: u64,
    pub seq: u64,
    /// By `Family::index`.
    pub cursors: [u64; 2],
    pub next_due: [Option<IpAddr>; 2],
}

/// The table's rotation at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    pub generation: u64,
    /// Each family's cursor, by `Family::index`.
    pub cursors: [u64; 2],
    pub seq: u64,
    pub closed: bool,
    /// The pool in order (IPv4 entries, then IPv6), with the leases each
    /// entry was given.
    pub pool: Vec<(Segment, u64)>,
    /// The order its prefixes were leased in (the table's).
    pub order: crate::segment::Order,
}

impl TableSnapshot {
    /// The address the next lease of `family` would return, in the
    /// table's order (a killed allocator's, of an older release, is read
    /// in its own).
    pub fn next_due(&self, family: Family) -> Option<IpAddr> {
        let entries: Vec<Segment> = self.pool.iter().map(|(s, _)| *s).collect();
        address_at_in(&entries, family, self.cursors[family.index()], self.order)
    }

    /// The cursor of `family`.
    pub fn cursor(&self, family: Family) -> u64 {
        self.cursors[family.index()]
    }
}

/// What one family's cursor counts through: the sizes of its entries
/// added up, at most [`MAX_FAMILY_TOTAL`].
pub fn family_total(entries: &[Segment], family: Family) -> u64 {
    entries
        .iter()
        .filter(|e| e.family() == family)
        .fold(0u64, |t, e| {
            t.saturating_add(u64::try_from(e.len()).unwrap_or(u64::MAX))
        })
        .min(MAX_FAMILY_TOTAL)
}

/// The entries of `entries` that a family's cursor never reaches: those
/// that come after [`MAX_FAMILY_TOTAL`] addresses of their family (behind
/// a /64 or wider prefix listed before them).
pub fn unreached(entries: &[Segment]) -> Vec<Segment> {
    let mut first = [0u64; 2];
    let mut out = Vec::new();
    for e in entries {
        let at = &mut first[e.family().index()];
        if *at >= MAX_FAMILY_TOTAL {
            out.push(*e);
        }
        *at = at.saturating_add(u64::try_from(e.len()).unwrap_or(u64::MAX));
    }
    out
}

/// The address at index `i` of `family`'s rotation over `entries`.
pub fn address_at(entries: &[Segment], family: Family, i: u64) -> Option<IpAddr> {
    address_at_in(entries, family, i, crate::segment::order())
}

/// `address_at` in `order`.
fn address_at_in(
    entries: &[Segment],
    family: Family,
    i: u64,
    order: crate::segment::Order,
) -> Option<IpAddr> {
    let mut first = 0u64;
    for e in entries.iter().filter(|e| e.family() == family) {
        let len = u64::try_from(e.len()).unwrap_or(u64::MAX);
        if i - first < len {
            return Some(e.at_with(u128::from(i - first), order));
        }
        first = first.saturating_add(len);
        if first > i {
            break;
        }
    }
    None
}

/// Each family's rotation over a pool's entries, worked out once, when the
/// pool changes: the family's entries, the index each begins at, the
/// total. A walk from an index is then found by a binary search, not by a
/// scan of the pool's entries (and a copy of those of the family) at each
/// of a site's leases: a list of 100 000 addresses cost hundreds of µs a
/// lease, under the allocator's lock.
#[derive(Debug, Default, Clone)]
pub struct Rotations([Rotation; 2]);

#[derive(Debug, Default, Clone)]
struct Rotation {
    mine: Vec<Segment>,
    first: Vec<u64>,
    total: u64,
    /// Where each single address the cursor reaches is (a site's first
    /// lease is counted at its index: a scan of the pool a new site, else).
    singles: std::collections::HashMap<IpAddr, u64>,
    /// The prefixes, by their place in `mine` (few: looked over).
    prefixes: Vec<usize>,
    /// Where each prefix the cursor reaches begins (a refresh that
    /// replaces thousands of prefixes looks up each).
    prefix_first: std::collections::HashMap<Segment, u64>,
}

impl Rotation {
    /// The place in `mine` of the entry index `i` is in (the last one
    /// beginning at or before it).
    fn entry_of(&self, i: u64) -> Option<usize> {
        self.first.partition_point(|&f| f <= i).checked_sub(1)
    }
}

impl Rotations {
    pub fn new(entries: &[Segment]) -> Rotations {
        Rotations(Family::ALL.map(|family| {
            let mut r = Rotation {
                total: family_total(entries, family),
                ..Rotation::default()
            };
            let mut first = 0u64;
            for e in entries.iter().filter(|e| e.family() == family) {
                match e.is_single() {
                    true if first < r.total => {
                        r.singles.entry(e.base()).or_insert(first);
                    }
                    true => {}
                    false => {
                        r.prefixes.push(r.mine.len());
                        if first < r.total {
                            r.prefix_first.entry(*e).or_insert(first);
                        }
                    }
                }
                r.mine.push(*e);
                r.first.push(first);
                first = first.saturating_add(entry_len(e));
            }
            r
        }))
    }

    /// As [`index_of`].
    pub fn index_of(&self, ip: IpAddr) -> Option<u64> {
        let r = &self.0[Family::of(&ip).index()];
        let single = r.singles.get(&ip).copied();
        // The first entry holding it, as `index_of` finds: a single one
        // listed before a prefix holding it too is the one.
        let prefix = r.prefixes.iter().find_map(|&k| {
            let i = u64::try_from(r.mine[k].index_of(ip)?).ok()?;
            Some(r.first[k].checked_add(i)?).filter(|i| *i < r.total)
        });
        match (single, prefix) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Where a rotation over `next` goes on from `due`, an address of this
    /// one that `next` no longer has (a refresh or a quarantine took its
    /// entry out): at the first entry after `due`'s own, in this rotation's
    /// order and wrapping around, that `next` still holds; its index in
    /// `next`. `None` when `next` holds none of them (or `due` is not
    /// here). Continuing at `due`'s old index instead would repeat or skip
    /// addresses: A B C D with C due, replaced by X A B D, went on at B,
    /// just leased. The entry found is passed over when it is the one
    /// leased last (A B C D with C due, replaced by B Y: Y, not B again),
    /// unless it is all there is.
    pub fn next_kept(&self, next: &Rotations, due: IpAddr) -> Option<u64> {
        let family = Family::of(&due);
        let r = &self.0[family.index()];
        let at = self.index_of(due)?;
        let own = r.entry_of(at)?;
        let n = r.mine.len();
        let (d, first) = (1..=n).find_map(|d| Some((d, next.first_of(&r.mine[(own + d) % n])?)))?;
        // The entry before `due`'s own held the last lease when `due`
        // begins its own (else that one did).
        let last = d == n - 1 && at == r.first[own];
        Some(match last {
            true => {
                let after = first.saturating_add(entry_len(&r.mine[(own + d) % n]));
                after % next.total(family).max(1)
            }
            false => first,
        })
    }

    /// The entry index `i` of `family`'s rotation is in, and the index
    /// of its first address.
    pub fn entry_at(&self, family: Family, i: u64) -> Option<(Segment, u64)> {
        let r = &self.0[family.index()];
        if i >= r.total {
            return None;
        }
        let k = r.entry_of(i)?;
        Some((r.mine[k], r.first[k]))
    }

    /// The prefixes of `family`'s rotation the cursor reaches, each with
    /// the index of its first address, in the rotation's order.
    pub fn reached_prefixes(&self, family: Family) -> impl Iterator<Item = (Segment, u64)> + '_ {
        let r = &self.0[family.index()];
        r.prefixes
            .iter()
            .map(|&k| (r.mine[k], r.first[k]))
            .filter(|(_, first)| *first < r.total)
    }

    /// Whether `entry` is one of the entries and the cursor reaches it.
    pub fn reaches(&self, entry: &Segment) -> bool {
        self.first_of(entry).is_some()
    }

    /// The index of `entry`'s first address, if it is one of the
    /// entries and the cursor reaches it.
    fn first_of(&self, entry: &Segment) -> Option<u64> {
        let r = &self.0[entry.family().index()];
        match entry.is_single() {
            true => r.singles.get(&entry.base()).copied(),
            false => r.prefix_first.get(entry).copied(),
        }
    }

    /// The addresses of `family`'s rotation (as [`family_total`] counts
    /// them).
    pub fn total(&self, family: Family) -> u64 {
        self.0[family.index()].total
    }

    /// The addresses of `family`'s rotation from index `start` on, with
    /// their indices, wrapping around (each index once): a binary search
    /// to find `start`, then a step an address — not a scan of the entries
    /// a step, as `address_at` in a loop would (a throttled site's walk of
    /// a pool of 65 536 listed addresses: 2·10⁹ entry visits, under the
    /// allocator's lock).
    pub fn walk(&self, family: Family, start: u64) -> Walk<'_> {
        let r = &self.0[family.index()];
        let (mut at, mut offset) = (0usize, 0u64);
        if r.total > 0 {
            let start = start % r.total;
            // The last entry beginning at or before it (each holds at
            // least one address: that entry holds it).
            at = r.first.partition_point(|&f| f <= start).saturating_sub(1);
            offset = start - r.first[at];
        }
        Walk {
            index: if r.total > 0 { start % r.total } else { 0 },
            mine: &r.mine,
            total: r.total,
            at,
            offset,
            left: r.total,
            last: None,
        }
    }
}

fn entry_len(e: &Segment) -> u64 {
    u64::try_from(e.len()).unwrap_or(u64::MAX)
}

/// A walk of a family's rotation (see [`Rotations::walk`]): each index
/// once, from its start, wrapping around.
pub struct Walk<'a> {
    mine: &'a [Segment],
    total: u64,
    /// The next address's index, entry and offset in it.
    index: u64,
    at: usize,
    offset: u64,
    /// Addresses not yet walked.
    left: u64,
    /// The entry of the address yielded last.
    last: Option<usize>,
}

impl Walk<'_> {
    /// Moves on past the entry of the address yielded last, if it has
    /// more (a site's walk passes a whole /64 that one pair blocks in a
    /// step, not 2^64). How many addresses were passed.
    pub fn skip_entry(&mut self) -> u64 {
        if self.offset == 0 || self.left == 0 {
            return 0;
        }
        // Up to the entry's end, or the rotation's (a prefix counted past
        // it by the family's cap), then on from where the walk goes next.
        let n = (entry_len(&self.mine[self.at]) - self.offset)
            .min(self.total - self.index)
            .min(self.left);
        self.left -= n;
        self.index += n;
        if self.index >= self.total {
            (self.index, self.at, self.offset) = (0, 0, 0);
        } else {
            (self.at, self.offset) = (self.at + 1, 0);
        }
        n
    }

    /// The entry of the address yielded last.
    pub fn last_entry(&self) -> Option<&Segment> {
        self.last.map(|k| &self.mine[k])
    }
}

impl Iterator for Walk<'_> {
    type Item = (u64, IpAddr);

    fn next(&mut self) -> Option<(u64, IpAddr)> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.last = Some(self.at);
        let here = (self.index, self.mine[self.at].at(u128::from(self.offset)));
        self.index += 1;
        self.offset += 1;
        if self.index == self.total {
            (self.index, self.at, self.offset) = (0, 0, 0);
        } else if self.offset == entry_len(&self.mine[self.at]) {
            (self.at, self.offset) = (self.at + 1, 0);
        }
        Some(here)
    }
}

/// The index of `ip` in its family's rotation over `entries`, if it is in
/// the part the cursor reaches.
pub fn index_of(entries: &[Segment], ip: IpAddr) -> Option<u64> {
    let family = Family::of(&ip);
    let total = family_total(entries, family);
    let mut first = 0u64;
    for e in entries.iter().filter(|e| e.family() == family) {
        if let Some(k) = e.index_of(ip) {
            let i = u64::try_from(k).ok()?.checked_add(first)?;
            return (i < total).then_some(i);
        }
        first = first.saturating_add(u64::try_from(e.len()).unwrap_or(u64::MAX));
    }
    None
}

/// Which requests a worker sends to the allocator's site path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteMode {
    /// None: every lease from the table.
    None,
    /// Those to a site whose filter bit is set.
    Filter,
    /// Every request (a budget for every site).
    All,
}

fn words_for(capacity: usize) -> usize {
    ENTRIES + 2 * capacity * ENTRY
}

/// A shared mapping of `words` words: of `file`, guarded against the file
/// being cut short (see `guard`), or anonymous.
fn map(
    file: Option<&File>,
    words: usize,
) -> Result<(NonNull<AtomicU64>, Option<Guard>), TableError> {
    let (flags, fd) = match file {
        Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing; the
    // file (if any) is at least `words * 8` bytes long (checked or set by
    // the callers).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(TableError::Map(io::Error::last_os_error()));
    }
    let guard = file.and_then(|_| Guard::register(p, words * 8, STATES, CLOSED));
    let base = NonNull::new(p.cast()).expect("mmap returned a null mapping");
    Ok((base, guard))
}

fn decode_entry(meta: u64, hi: u64, lo: u64) -> Option<Segment> {
    let v = (u128::from(hi) << 64) | u128::from(lo);
    let (family, v) = match meta & 0xff {
        4 => (Family::V4, v & u128::from(u32::MAX)),
        6 => (Family::V6, v),
        _ => return None,
    };
    let host_bits = (meta >> 8) as u8;
    Segment::prefix(from_u128(family, v), family.bits().checked_sub(host_bits)?)
}

fn encode_entry(e: &Segment) -> (u64, u64, u64) {
    let v = crate::segment::to_u128(e.base());
    let family = match e.family() {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    (
        family | (u64::from(e.host_bits()) << 8),
        (v >> 64) as u64,
        v as u64,
    )
}

/// A number unlikely to repeat between two tables at one path.
fn fresh_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)).max(1)
}

impl LeaseTable {
    /// A table in a new file at `path` with permissions `mode`, replacing
    /// whatever was there, with room for `capacity` addresses. It starts
    /// open and empty, its lease sequence at `seq`.
    pub fn create(
        path: &Path,
        capacity: usize,
        seq: u64,
        mode: u32,
        group: Option<u32>,
    ) -> Result<LeaseTable, TableError> {
        let name = || path.display().to_string();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| TableError::Open(name(), e))?;
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| TableError::Open(name(), e))?;
        if group.is_some() {
            std::os::unix::fs::fchown(&file, None, group)
                .map_err(|e| TableError::Open(name(), e))?;
        }
        let words = words_for(capacity);
        // The file's room taken now, not at each page's first write: on a
        // full filesystem (its tmpfs) a sparse file faulted there, and the
        // table read as closed before it served a lease. A file that
        // cannot have its room is an error the allocator falls back from
        // (workers lease over the socket).
        let len = libc::off_t::try_from(words * 8).unwrap_or(libc::off_t::MAX);
        nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len)
            .map_err(|e| TableError::Open(name(), std::io::Error::from(e)))?;
        let table = LeaseTable::init(Some(&file), capacity, seq)?;
        std::fs::rename(&tmp, path).map_err(|e| TableError::Open(name(), e))?;
        Ok(table)
    }

    /// A table in memory only, for an allocator that serves no workers
    /// through a table, and for tests.
    pub fn anonymous(capacity: usize, seq: u64) -> Result<LeaseTable, TableError> {
        LeaseTable::init(None, capacity, seq)
    }

    /// Whether the file at `path` is this table's (the same device and
    /// inode): an allocator stopping removes its own table, not one
    /// another allocator made at the path since.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Some(file), Ok(there)) = (&self.file, std::fs::symlink_metadata(path)) else {
            return false;
        };
        file.metadata()
            .is_ok_and(|m| (m.dev(), m.ino()) == (there.dev(), there.ino()))
    }

    fn init(file: Option<&File>, capacity: usize, seq: u64) -> Result<LeaseTable, TableError> {
        let words = words_for(capacity);
        let (base, guard) = map(file, words)?;
        let table = LeaseTable {
            base,
            words,
            capacity,
            id: fresh_id(),
            guard,
            file: file.and_then(|f| f.try_clone().ok()),
            published: [AtomicU64::new(NO_TAG), AtomicU64::new(NO_TAG)],
        };
        // A new file or anonymous mapping is zero-filled: state 0 is half 0,
        // empty, open.
        table.word(SEQ).store(seq, Ordering::Relaxed);
        let order = crate::segment::order();
        for (k, w) in order.key.into_iter().enumerate() {
            table.word(ORDER_KEY + k).store(w, Ordering::Relaxed);
        }
        let by_prefix = u64::from(order.by_prefix);
        table
            .word(ORDER_BY_PREFIX)
            .store(by_prefix, Ordering::Relaxed);
        table.word(2).store(capacity as u64, Ordering::Relaxed);
        table.word(3).store(PEER_SLOTS as u64, Ordering::Relaxed);
        table.word(4).store(table.id, Ordering::Relaxed);
        table.word(1).store(TABLE_LAYOUT, Ordering::Relaxed);
        table.word(0).store(MAGIC, Ordering::Release);
        Ok(table)
    }

    /// The order its allocator leases prefixes in (a zero key: the fixed
    /// order of an allocator before the key; not by prefix: one before
    /// that).
    pub fn order(&self) -> crate::segment::Order {
        crate::segment::Order {
            key: std::array::from_fn(|k| self.word(ORDER_KEY + k).load(Ordering::Relaxed)),
            by_prefix: self.word(ORDER_BY_PREFIX).load(Ordering::Relaxed) == 1,
        }
    }

    /// Maps the table at `path`; with `id`, only if it is that table.
    pub fn open(path: &Path, id: Option<u64>) -> Result<LeaseTable, TableError> {
        let name = || path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| TableError::Open(name(), e))?;
        let bytes = file
            .metadata()
            .map_err(|e| TableError::Open(name(), e))?
            .len() as usize;
        if bytes < ENTRIES * 8 || bytes % 8 != 0 {
            return Err(TableError::Invalid(name()));
        }
        let words = bytes / 8;
        let (base, guard) = map(Some(&file), words)?;
        let mut table = LeaseTable {
            base,
            words,
            capacity: 0,
            id: 0,
            guard,
            file: Some(file),
            published: [AtomicU64::new(NO_TAG), AtomicU64::new(NO_TAG)],
        };
        let capacity = table.word(2).load(Ordering::Relaxed) as usize;
        table.id = table.word(4).load(Ordering::Relaxed);
        let magic = table.word(0).load(Ordering::Acquire) == MAGIC;
        // A table whole but of another layout will not become this one's
        // by asking again (unlike one replaced or cut short since).
        if magic
            && (table.word(1).load(Ordering::Relaxed) != TABLE_LAYOUT
                || table.word(3).load(Ordering::Relaxed) != PEER_SLOTS as u64)
        {
            return Err(TableError::Layout(name()));
        }
        let valid = magic
            && capacity <= (words - ENTRIES) / (2 * ENTRY)
            && words_for(capacity) == words
            && id.is_none_or(|id| id == table.id);
        if !valid {
            return Err(TableError::Invalid(name()));
        }
        table.capacity = capacity;
        Ok(table)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a page past the end of the table's cut file was touched:
    /// the mapping now reads as a closed, empty table (see `guard`), and
    /// what was read may be its zeros. No system call.
    pub fn is_broken(&self) -> bool {
        self.guard.as_ref().is_some_and(Guard::is_broken)
    }

    /// Whether the table's file was cut short under it, touched or not
    /// (`is_broken`, or the file shorter than the mapping): its rotation is
    /// to be taken from elsewhere. One `fstat`.
    pub fn is_cut_short(&self) -> bool {
        self.is_broken()
            || self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .is_some_and(|m| m.len() < (self.words * 8) as u64)
    }

    /// Cuts a cut-short table's file to nothing (it has been replaced: the
    /// path names its successor), so that every process still mapping it
    /// finds it closed at its next lease, whichever pages it touches; a
    /// file cut past the pages they use would otherwise go on serving.
    pub fn condemn(&self) {
        if let Some(f) = &self.file {
            let _ = f.set_len(0);
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words, "lease table word {i} out of range");
        // SAFETY: in bounds (checked above) of a live mapping that is
        // 8-byte aligned (page-aligned) and only accessed atomically.
        unsafe { &*self.base.as_ptr().add(i) }
    }

    fn entry(&self, half: usize, i: usize) -> usize {
        ENTRIES + (half * self.capacity + i) * ENTRY
    }

    fn segment_at(&self, half: usize, i: usize) -> Option<Segment> {
        let e = self.entry(half, i);
        decode_entry(
            self.word(e).load(Ordering::Relaxed),
            self.word(e + 1).load(Ordering::Relaxed),
            self.word(e + 2).load(Ordering::Relaxed),
        )
    }

    fn half_of(state: u64) -> usize {
        ((state >> TAG_SHIFT) & 1) as usize
    }

    fn generation(&self, half: usize) -> u64 {
        self.word(HALVES + half * LINE).load(Ordering::Relaxed)
    }

    /// Where `family`'s entries of `half` are, how many, and its total;
    /// `None` if the words do not describe a possible layout (a torn or
    /// tampered table: the lease is retried or refused, never read out of
    /// bounds).
    fn family_meta(&self, half: usize, family: Family) -> Option<(usize, usize, u64)> {
        let line = HALVES + half * LINE;
        let n4 = self.word(line + H_ENTRIES).load(Ordering::Relaxed) as usize;
        let n6 = self.word(line + H_ENTRIES + 1).load(Ordering::Relaxed) as usize;
        let total = self
            .word(line + H_TOTAL + family.index())
            .load(Ordering::Relaxed);
        if n4.checked_add(n6)? > self.capacity || total > MAX_FAMILY_TOTAL {
            return None;
        }
        Some(match family {
            Family::V4 => (0, n4, total),
            Family::V6 => (n4, n6, total),
        })
    }

    /// The address at index `i` of `family` in `half`: a binary search over
    /// the entries' first indexes (direct when each entry is one address).
    fn address_in(&self, half: usize, family: Family, i: u64) -> Option<(usize, IpAddr)> {
        let meta = self.family_meta(half, family)?;
        self.address_at(half, family, meta, i)
    }

    /// As [`address_in`](Self::address_in), with the family's metadata
    /// read already.
    fn address_at(
        &self,
        half: usize,
        family: Family,
        (start, n, total): (usize, usize, u64),
        i: u64,
    ) -> Option<(usize, IpAddr)> {
        let pick = self.pick(half, family, (start, n, total), i)?;
        Some((pick.k, pick.address()?))
    }

    /// The words of the entry at index `i` of `family` in `half`, read
    /// (so that a compare-and-swap of the state that named `half` vouches
    /// for them), and the lease's offset in it; the address is worked out
    /// from them after the swap, outside the contended window.
    #[inline]
    fn pick(
        &self,
        half: usize,
        family: Family,
        (start, n, total): (usize, usize, u64),
        i: u64,
    ) -> Option<Pick> {
        if i >= total || n == 0 {
            return None;
        }
        let first = |k: usize| {
            self.word(self.entry(half, start + k) + E_FIRST)
                .load(Ordering::Relaxed)
        };
        let k = if total == n as u64 {
            i as usize
        } else {
            // The last entry whose first index is at most `i`.
            let (mut lo, mut hi) = (0usize, n);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if first(mid) <= i {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        let e = self.entry(half, start + k);
        let meta = self.word(e).load(Ordering::Relaxed);
        let offset = match meta >> 8 {
            // One address (the common case): no offset to read.
            0 => 0,
            _ => i.checked_sub(first(k))?,
        };
        Some(Pick {
            k: start + k,
            family,
            meta,
            hi: self.word(e + 1).load(Ordering::Relaxed),
            lo: self.word(e + 2).load(Ordering::Relaxed),
            offset,
        })
    }

    /// The address state `s` of `family` has due next.
    fn due_at(&self, family: Family, s: u64) -> Option<IpAddr> {
        self.address_in(Self::half_of(s), family, s & CURSOR_MASK)
            .map(|(_, ip)| ip)
    }

    /// The next address of one of `families` (IPv4 first when both are
    /// acceptable and the pool has both), counted for peer `slot`, or why
    /// there is none, as the allocator would answer; `None` once the table
    /// is closed (ask the allocator instead).
    pub fn lease(&self, families: Families, slot: Option<u32>) -> Option<Result<Lease, Refusal>> {
        let wanted = |f: Family| match f {
            Family::V4 => families.v4,
            Family::V6 => families.v6,
        };
        for family in Family::ALL.into_iter().filter(|f| wanted(*f)) {
            if let Ok(lease) = self.lease_family(family, true, slot)? {
                return Some(Ok(lease));
            }
        }
        // None: say whether the pool has addresses at all.
        let mut any_address = false;
        let mut generation = 0;
        for family in Family::ALL {
            if let Err((g, had)) = self.lease_family(family, false, slot)? {
                generation = g;
                any_address |= had;
            }
        }
        let reason = match any_address {
            false => NoAddress::EmptyPool,
            true => NoAddress::NoFamily { wanted: families },
        };
        Some(Err(Refusal { reason, generation }))
    }

    /// A lease of `family` if `wanted`; else (or with none of it) the
    /// generation and whether the family has addresses. `None` if closed.
    #[inline(always)]
    fn lease_family(
        &self,
        family: Family,
        wanted: bool,
        slot: Option<u32>,
    ) -> Option<Result<Lease, (u64, bool)>> {
        let state = self.word(STATES[family.index()]);
        let mut s = state.load(Ordering::Acquire);
        // Retries, counted as they come (a state changed without end
        // ends this as a closed table does: the allocator replaces it, a
        // worker asks it).
        let mut tries = 0;
        loop {
            if s & CLOSED != 0 {
                return None;
            }
            let half = Self::half_of(s);
            let generation = self.generation(half);
            let meta = self.family_meta(half, family);
            let total = meta.map_or(0, |m| m.2);
            let cursor = s & CURSOR_MASK;
            let found = match (wanted, meta) {
                (true, Some(m)) if total > 0 => self.pick(half, family, m, cursor % total),
                _ => None,
            };
            let Some(pick) = found else {
                // Only an answer if the pool did not change while read.
                std::sync::atomic::fence(Ordering::Acquire);
                let now = state.load(Ordering::Acquire);
                if now != s {
                    tries += 1;
                    if tries == MAX_TRIES {
                        return None;
                    }
                    s = now;
                    continue;
                }
                return Some(Err((generation, total > 0)));
            };
            let next = (s & !CURSOR_MASK) | ((cursor % total + 1) % total);
            match state.compare_exchange_weak(s, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // Words that decode to no address of this family (a
                    // tampered table) end this lease as a refusal.
                    let Some(ip) = pick.address() else {
                        return Some(Err((generation, true)));
                    };
                    self.word(self.entry(half, pick.k) + E_LEASES)
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(line) = slot.and_then(peer_line) {
                        self.word(line).fetch_add(1, Ordering::Relaxed);
                    }
                    let seq = self
                        .word(SEQ)
                        .fetch_add(1, Ordering::Relaxed)
                        .wrapping_add(1);
                    return Some(Ok(Lease {
                        ip,
                        seq,
                        generation,
                    }));
                }
                Err(now) => {
                    tries += 1;
                    if tries == MAX_TRIES {
                        return None;
                    }
                    s = now;
                }
            }
        }
    }

    /// Whether the table was closed (the allocator stopped, or replaced it).
    pub fn is_closed(&self) -> bool {
        STATES
            .iter()
            .any(|&w| self.word(w).load(Ordering::Acquire) & CLOSED != 0)
    }

    /// Writes a new pool (allocator only; one writer at a time) with each
    /// entry's lease count, into the half no lease reads, then swaps it in,
    /// one family at a time. The entries are laid out IPv4 first, then
    /// IPv6, each family in the order given. `cursor` gets a family, the
    /// address it has due next and its cursor as they stand, and returns
    /// the cursor into the new pool; only that is redone, and the swap
    /// retried, when a lease moved the cursor meanwhile, so a busy table
    /// cannot starve a refresh.
    pub fn publish<F>(
        &self,
        entries: &[Segment],
        counts: &[u64],
        generation: u64,
        mut cursor: F,
    ) -> Result<(), TableError>
    where
        F: FnMut(Family, Option<IpAddr>, u64) -> u64,
    {
        if entries.len() > self.capacity {
            return Err(TableError::TooSmall {
                capacity: self.capacity,
                wanted: entries.len(),
            });
        }
        let s4 = self.word(STATES[0]).load(Ordering::Acquire);
        if self.is_closed() {
            return Err(TableError::Closed);
        }
        // The only writer, and both states name the same half between
        // publishes: the other half stays unread until the swaps below.
        // Leases that read the other half before the last swap are
        // ordered before these writes.
        std::sync::atomic::fence(Ordering::Release);
        let half = 1 - Self::half_of(s4);
        let mut k = 0;
        let line = HALVES + half * LINE;
        for family in Family::ALL {
            let mut first = 0u64;
            let mut n = 0u64;
            for (i, e) in entries.iter().enumerate() {
                if e.family() != family {
                    continue;
                }
                let (meta, hi, lo) = encode_entry(e);
                let w = self.entry(half, k);
                self.word(w).store(meta, Ordering::Relaxed);
                self.word(w + 1).store(hi, Ordering::Relaxed);
                self.word(w + 2).store(lo, Ordering::Relaxed);
                self.word(w + E_LEASES)
                    .store(counts.get(i).copied().unwrap_or(0), Ordering::Relaxed);
                self.word(w + E_FIRST).store(first, Ordering::Relaxed);
                first = first.saturating_add(u64::try_from(e.len()).unwrap_or(u64::MAX));
                k += 1;
                n += 1;
            }
            self.word(line + H_ENTRIES + family.index())
                .store(n, Ordering::Relaxed);
            self.word(line + H_TOTAL + family.index())
                .store(first.min(MAX_FAMILY_TOTAL), Ordering::Relaxed);
        }
        self.word(line).store(generation, Ordering::Relaxed);
        for family in Family::ALL {
            let total = family_total(entries, family);
            let state = self.word(STATES[family.index()]);
            let mut s = state.load(Ordering::Acquire);
            // Since the first retry: each is a lease that moved the cursor
            // while the new one was worked out (a walk of the pool), which
            // a busy large pool does often, but not for long.
            let mut retrying: Option<std::time::Instant> = None;
            loop {
                if s & CLOSED != 0 {
                    return Err(TableError::Closed);
                }
                // A state changed without end (a writer of the file): the
                // table is closed, whatever half a family's state names,
                // and replaced by its caller as any closed one.
                if retrying.is_some_and(|t| t.elapsed() >= PUBLISH_PATIENCE) {
                    self.close();
                    return Err(TableError::Closed);
                }
                let c = cursor(family, self.due_at(family, s), s & CURSOR_MASK);
                let c = if c < total { c } else { 0 };
                let tag = ((s >> TAG_SHIFT) + 1) & TAG_MASK;
                // Both states move to the half just written.
                let tag = (tag & !1) | half as u64;
                let next = (tag << TAG_SHIFT) | c;
                match state.compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        self.published[family.index()].store(tag, Ordering::Relaxed);
                        break;
                    }
                    Err(actual) => {
                        retrying.get_or_insert_with(std::time::Instant::now);
                        s = actual;
                    }
                }
            }
        }
        Ok(())
    }

    /// What is wrong with the table, against what was published (`want`,
    /// of `generation`), if anything: whoever can write its file can
    /// change any word. Checked: closed bits, that both states name the
    /// same half, the generation, each family's entry count, total and
    /// cursor, and every entry with its first index.
    pub fn fault(&self, want: &[Segment], generation: u64) -> Option<String> {
        // Reading the words may find the file cut short (and the table
        // replaced by a closed, empty one while read).
        let fault = self.words_fault(want, generation);
        if self.is_cut_short() {
            return Some("its file was cut short (truncated)".into());
        }
        // Grown (and its header changed): a process mapping it afresh would
        // take another layout, with entries where no one writes or checks.
        let grown = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .is_some_and(|m| m.len() > (self.words * 8) as u64);
        match grown {
            true => Some("its file was grown".into()),
            false => fault,
        }
    }

    fn words_fault(&self, want: &[Segment], generation: u64) -> Option<String> {
        // The header: what a process mapping the file takes its layout from.
        let header = [
            MAGIC,
            TABLE_LAYOUT,
            self.capacity as u64,
            PEER_SLOTS as u64,
            self.id,
        ];
        if let Some(i) =
            (0..header.len()).find(|&i| self.word(i).load(Ordering::Relaxed) != header[i])
        {
            return Some(format!("header word {i} changed"));
        }
        // (The allocator's: the key it made the table with.)
        if self.order() != crate::segment::order() {
            return Some("its order changed".into());
        }
        let s = self.states();
        if s.iter().any(|s| s & CLOSED != 0) {
            return Some("closed by someone else".into());
        }
        let half = Self::half_of(s[0]);
        if Self::half_of(s[1]) != half {
            return Some("its two states name different halves".into());
        }
        for family in Family::ALL {
            let published = self.published[family.index()].load(Ordering::Relaxed);
            if published != NO_TAG && (s[family.index()] >> TAG_SHIFT) & TAG_MASK != published {
                return Some(format!("{family}: its state was changed by someone else"));
            }
        }
        if self.generation(half) != generation {
            return Some(format!(
                "generation {}, not {generation}",
                self.generation(half)
            ));
        }
        for family in Family::ALL {
            let total = family_total(want, family);
            let of: Vec<&Segment> = want.iter().filter(|e| e.family() == family).collect();
            let Some((start, n, t)) = self.family_meta(half, family) else {
                return Some("impossible entry counts".into());
            };
            if n != of.len() || t != total {
                return Some(format!(
                    "{family}: {n} entries and {t} addresses, not {} and {total}",
                    of.len()
                ));
            }
            if s[family.index()] & CURSOR_MASK >= total.max(1) {
                return Some(format!("{family}: cursor past the end"));
            }
            let mut first = 0u64;
            for (k, e) in of.iter().enumerate() {
                let w = self.entry(half, start + k);
                let at_first = self.word(w + E_FIRST).load(Ordering::Relaxed);
                if self.segment_at(half, start + k) != Some(**e) || at_first != first {
                    return Some(format!("{family}: entry {k} is not {e}"));
                }
                first = first.saturating_add(u64::try_from(e.len()).unwrap_or(u64::MAX));
            }
        }
        None
    }

    /// Sets the lease sequence of a table no lease has used yet (allocator
    /// only: a table that replaces a closed one continues its sequence).
    pub fn set_seq(&self, seq: u64) {
        self.word(SEQ).store(seq, Ordering::Relaxed);
    }

    /// Moves `family`'s cursor to `cursor` of the current pool (tests and
    /// the bench: the allocator's saved position is the publish's own
    /// cursor, as a set after a publish rewinds leases taken meanwhile).
    pub fn set_cursor(&self, family: Family, cursor: u64) {
        let state = self.word(STATES[family.index()]);
        let _ = state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            let total = self
                .family_meta(Self::half_of(s), family)
                .map_or(0, |m| m.2);
            (s & CLOSED == 0 && cursor < total).then_some((s & !CURSOR_MASK) | cursor)
        });
    }

    /// Closes the table for good and returns its final rotation: no lease
    /// succeeds after this returns.
    pub fn close(&self) -> TableSnapshot {
        let s = STATES.map(|w| self.word(w).fetch_or(CLOSED, Ordering::AcqRel) | CLOSED);
        self.snapshot_at(s)
    }

    fn states(&self) -> [u64; 2] {
        STATES.map(|w| self.word(w).load(Ordering::Acquire))
    }

    /// Whether `then` and now name the same pools (a cursor may have moved).
    fn same_pools(&self, then: [u64; 2]) -> bool {
        std::sync::atomic::fence(Ordering::Acquire);
        let now = self.states();
        (0..2).all(|f| (now[f] ^ then[f]) & !CURSOR_MASK == 0)
    }

    /// The rotation now, without the pool: generation, lease sequence, and
    /// each family's cursor and address due next.
    pub fn position(&self) -> Position {
        let mut tries = 0;
        loop {
            tries += 1;
            let s = self.states();
            let p = Position {
                generation: self.generation(Self::half_of(s[0])),
                seq: self.word(SEQ).load(Ordering::Relaxed),
                cursors: [s[0] & CURSOR_MASK, s[1] & CURSOR_MASK],
                next_due: [self.due_at(Family::V4, s[0]), self.due_at(Family::V6, s[1])],
            };
            // A lease moving a cursor meanwhile is fine (this is a reading
            // of one instant); a pool swapped in is read again (a state
            // changed without end is taken as read: `fault` finds it).
            if self.same_pools(s) || tries == MAX_TRIES {
                return p;
            }
        }
    }

    /// The rotation now.
    pub fn snapshot(&self) -> TableSnapshot {
        let mut tries = 0;
        loop {
            tries += 1;
            let s = self.states();
            let snap = self.snapshot_at(s);
            // A pool swapped in while read is read again (a state changed
            // without end is taken as read: `fault` finds it).
            if self.same_pools(s) || tries == MAX_TRIES {
                return snap;
            }
        }
    }

    fn snapshot_at(&self, s: [u64; 2]) -> TableSnapshot {
        let half = Self::half_of(s[0]);
        let mut pool = Vec::new();
        for family in Family::ALL {
            let Some((start, n, _)) = self.family_meta(half, family) else {
                continue;
            };
            for k in start..start + n {
                if let Some(seg) = self.segment_at(half, k) {
                    let leases = self.word(self.entry(half, k) + E_LEASES);
                    pool.push((seg, leases.load(Ordering::Relaxed)));
                }
            }
        }
        TableSnapshot {
            generation: self.generation(half),
            cursors: [s[0] & CURSOR_MASK, s[1] & CURSOR_MASK],
            seq: self.word(SEQ).load(Ordering::Relaxed),
            closed: s[0] & CLOSED != 0,
            pool,
            order: self.order(),
        }
    }

    /// The next lease sequence number, for a lease not taken from the
    /// rotation (a sticky session's).
    pub fn next_seq(&self) -> u64 {
        self.word(SEQ)
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
    }

    /// Counts a lease of index `i` of `family`'s rotation taken outside
    /// the table (the allocator's site path) in that entry's lease count.
    pub fn count_lease(&self, family: Family, i: u64) {
        let s = self.word(STATES[family.index()]).load(Ordering::Acquire);
        let half = Self::half_of(s);
        let Some(meta) = self.family_meta(half, family) else {
            return;
        };
        if i < meta.2 {
            if let Some(pick) = self.pick(half, family, meta, i) {
                self.word(self.entry(half, pick.k) + E_LEASES)
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Which requests take the site path: [`SiteMode`].
    #[inline]
    pub fn site_mode(&self) -> SiteMode {
        match self.word(SITE_MODE).load(Ordering::Acquire) {
            0 => SiteMode::None,
            1 => SiteMode::Filter,
            _ => SiteMode::All,
        }
    }

    /// Whether `site`'s bit is set in the site filter.
    pub fn site_flagged(&self, site: &str) -> bool {
        let bit = site_bit(site);
        self.word(SITES + bit / 64).load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    /// Publishes the site filter (allocator only): `all`, every site takes
    /// the site path; else those whose bit `filter` sets (its words, of
    /// [`SITE_FILTER_BITS`] bits; none set: mode 0).
    pub fn publish_sites(&self, all: bool, filter: &[u64]) {
        let mut any = false;
        for (i, w) in filter.iter().take(SITE_WORDS).enumerate() {
            any |= *w != 0;
            self.word(SITES + i).store(*w, Ordering::Release);
        }
        let mode = match (all, any) {
            (true, _) => 2,
            (false, true) => 1,
            (false, false) => 0,
        };
        self.word(SITE_MODE).store(mode, Ordering::Release);
    }

    /// Sets `site`'s bit (allocator only), and mode 1 unless it is 2.
    pub fn flag_site(&self, site: &str) {
        let bit = site_bit(site);
        self.word(SITES + bit / 64)
            .fetch_or(1 << (bit % 64), Ordering::AcqRel);
        let _ = self
            .word(SITE_MODE)
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Counts a reload the operator asked for (allocator only).
    pub fn bump_reloads(&self) {
        self.word(RELOADS).fetch_add(1, Ordering::Relaxed);
    }

    /// Carries the count over to a table that replaces this one (allocator
    /// only), so workers see no reload that nobody asked for.
    pub fn set_reloads(&self, n: u64) {
        self.word(RELOADS).store(n, Ordering::Relaxed);
    }

    /// Reloads the operator asked for: a worker reloads when it moves.
    pub fn reloads(&self) -> u64 {
        self.word(RELOADS).load(Ordering::Relaxed)
    }

    /// Leases counted for peer `slot` since it was last reset.
    pub fn peer_leases(&self, slot: u32) -> u64 {
        peer_line(slot).map_or(0, |line| self.word(line).load(Ordering::Relaxed))
    }

    /// Zeroes peer `slot`'s line, for a new peer or when one is gone.
    pub fn reset_peer(&self, slot: u32) {
        if let Some(line) = peer_line(slot) {
            self.word(line + PEER_GROUP).store(0, Ordering::Relaxed);
            self.word(line + PEER_LOAD).store(0, Ordering::Relaxed);
            self.word(line).store(0, Ordering::Relaxed);
        }
    }

    /// Hands peer `slot` out: its line zeroed, and counted in the peer
    /// lines [`least_sibling_load`](Self::least_sibling_load) reads.
    pub fn assign_peer(&self, slot: u32) {
        if peer_line(slot).is_some() {
            self.reset_peer(slot);
            self.word(SLOTS_USED)
                .fetch_max(u64::from(slot) + 1, Ordering::Relaxed);
        }
    }

    /// Publishes peer `slot`'s `load` among the peers of accept `group`
    /// (nonzero: the peers that accept from the same listening sockets).
    pub fn set_peer_load(&self, slot: u32, group: u64, load: u64) {
        if let Some(line) = peer_line(slot) {
            self.word(line + PEER_LOAD).store(load, Ordering::Relaxed);
            self.word(line + PEER_GROUP).store(group, Ordering::Relaxed);
        }
    }

    /// The least load another peer of `group` published; `None` if no other
    /// peer is in it. Values may be a moment old: they guide, not decide.
    pub fn least_sibling_load(&self, slot: u32, group: u64) -> Option<u64> {
        if group == 0 {
            return None;
        }
        let used = self
            .word(SLOTS_USED)
            .load(Ordering::Relaxed)
            .min(PEER_SLOTS as u64) as u32;
        (0..used)
            .filter(|&s| s != slot)
            .filter_map(peer_line)
            .filter(|&line| self.word(line + PEER_GROUP).load(Ordering::Relaxed) == group)
            .map(|line| self.word(line + PEER_LOAD).load(Ordering::Relaxed))
            .min()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn entries_behind_a_64_in_their_family_are_unreached() {
        let seg = |t: &str| -> Segment { t.parse().unwrap() };
        let pool = [
            seg("10.0.0.1"),
            seg("2001:db8:2::/64"),
            seg("10.0.0.2"),
            seg("2001:db8:4::/64"),
            seg("2001:db8:2:1::7"),
        ];
        assert_eq!(super::unreached(&pool), [pool[3], pool[4]]);
        let last = [
            seg("2001:db8:2:1::7"),
            seg("10.0.0.1"),
            seg("2001:db8:2::/64"),
        ];
        assert!(super::unreached(&last).is_empty());
        // Two halves of the cap (2^43 addresses each): both reached, and
        // what comes after them not.
        let halves = [
            seg("2001:db8::/85"),
            seg("2001:db8:1::/85"),
            seg("2001:db8:2::1"),
        ];
        assert_eq!(super::unreached(&halves), [halves[2]]);
    }

    use super::*;

    /// A table's next address is read in the table's own order: a killed
    /// allocator's of an older release (its prefixes by the key alone) was
    /// read in this one's, and the rotation resumed at an address the old
    /// one would never have handed out.
    #[test]
    fn a_tables_next_address_is_read_in_its_own_order() {
        let seg: Segment = "2001:db8:5::/96".parse().unwrap();
        let key = [7, 8, 9, 10];
        let by_key = crate::segment::Order {
            key,
            by_prefix: false,
        };
        let snapshot = |order| TableSnapshot {
            generation: 1,
            cursors: [0, 500],
            seq: 500,
            closed: true,
            pool: vec![(seg, 500)],
            order,
        };
        for order in [by_key, crate::segment::Order::of(key)] {
            assert_eq!(
                snapshot(order).next_due(Family::V6),
                Some(seg.at_with(500, order))
            );
        }
        assert_ne!(
            seg.at_with(500, by_key),
            seg.at_with(500, crate::segment::Order::of(key))
        );
    }

    #[test]
    fn walks_follow_the_rotation_as_address_at_does() {
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let p = |s: &str, l| Segment::prefix(s.parse().unwrap(), l).unwrap();
        let entries = vec![
            e("10.0.0.1"),
            p("10.1.0.0", 30),
            e("2001:db8::1"),
            e("10.0.0.2"),
            p("10.2.0.0", 31),
        ];
        let total = family_total(&entries, Family::V4);
        assert_eq!(total, 8);
        let r = Rotations::new(&entries);
        for start in 0..total + 3 {
            let walked: Vec<(u64, IpAddr)> = r.walk(Family::V4, start).collect();
            let want: Vec<(u64, IpAddr)> = (0..total)
                .map(|k| {
                    let i = (start + k) % total;
                    (i, address_at(&entries, Family::V4, i).unwrap())
                })
                .collect();
            assert_eq!(walked, want, "from {start}");
        }
        assert_eq!(r.walk(Family::V6, 5).count(), 1);
        assert_eq!(Rotations::new(&[]).walk(Family::V6, 0).count(), 0);
    }

    /// The rotations' walks, from every start (a prefix past the family's
    /// cap too), give each index's address as `address_at` does, and a
    /// skip passes the rest of the entry just yielded.
    #[test]
    fn rotations_walk_from_any_start_and_skip_as_counted() {
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let p = |s: &str, l| Segment::prefix(s.parse().unwrap(), l).unwrap();
        let entries = vec![
            e("10.0.0.1"),
            p("10.1.0.0", 30),
            e("2001:db8::1"),
            e("10.0.0.2"),
            p("2001:db8:1::", 64),
            p("10.2.0.0", 31),
            e("2001:db8::2"),
        ];
        let r = Rotations::new(&entries);
        for family in Family::ALL {
            assert_eq!(r.total(family), family_total(&entries, family));
            let starts = [0, 1, 2, 3, 5, 7, 8, 11, MAX_FAMILY_TOTAL - 1, u64::MAX];
            let total = r.total(family);
            for start in starts {
                let walked: Vec<_> = r.walk(family, start).take(20).collect();
                let want: Vec<_> = (0..total.min(20))
                    .map(|k| {
                        let i = (start % total + k) % total;
                        (i, address_at(&entries, family, i).unwrap())
                    })
                    .collect();
                assert_eq!(walked, want, "{family:?} from {start}");
                // After a skip of `n`, the walk goes on `n` past the next
                // index; the entry it names holds what it yielded.
                let mut w = r.walk(family, start);
                let mut next = None;
                let mut left = total;
                for _ in 0..6 {
                    let Some((i, ip)) = w.next() else {
                        assert_eq!(left, 0, "{family:?} from {start}");
                        break;
                    };
                    if let Some(n) = next {
                        assert_eq!(i, n, "{family:?} from {start}");
                    }
                    assert!(w.last_entry().unwrap().contains(ip));
                    let n = w.skip_entry();
                    left -= 1 + n;
                    next = Some((i + 1 + n) % total);
                }
            }
        }
        assert_eq!(Rotations::new(&[]).walk(Family::V4, 3).count(), 0);
        // Every address's index as `index_of` finds it, and none for one
        // not in the pool.
        for family in Family::ALL {
            for (i, ip) in r.walk(family, 0).take(40) {
                assert_eq!(r.index_of(ip), Some(i), "{ip}");
                assert_eq!(r.index_of(ip), index_of(&entries, ip));
            }
        }
        for ip in ["10.0.0.3", "2001:db8::3", "10.1.0.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(r.index_of(ip), None, "{ip}");
        }
    }

    #[test]
    fn a_walk_skips_the_rest_of_an_entry_and_still_walks_each_index_once() {
        let e = |s: &str| Segment::single(s.parse().unwrap());
        let p = |s: &str, l| Segment::prefix(s.parse().unwrap(), l).unwrap();
        let entries = vec![e("10.0.0.1"), p("10.1.0.0", 30), e("10.0.0.2")];
        let r = Rotations::new(&entries);
        // From inside the prefix: its addresses after the start are
        // passed (the one before it comes at the wrap).
        let mut w = r.walk(Family::V4, 2);
        assert_eq!(w.next(), Some((2, entries[1].at(1))));
        assert_eq!(w.last_entry(), Some(&entries[1]));
        assert_eq!(w.skip_entry(), 2);
        let rest: Vec<u64> = w.map(|(i, _)| i).collect();
        assert_eq!(rest, [5, 0, 1]);
        // At an entry's last address, or a single one, nothing to pass.
        let mut w = r.walk(Family::V4, 4);
        w.next();
        assert_eq!(w.skip_entry(), 0);
        assert_eq!(w.next().map(|(i, _)| i), Some(5));
        assert_eq!(w.skip_entry(), 0);
        assert_eq!(w.next().map(|(i, _)| i), Some(0));
        // Started inside the prefix: the wrap ends the walk before its
        // start, so what is passed is only what is left.
        let mut w = r.walk(Family::V4, 3);
        let seen: Vec<u64> = w.by_ref().take(4).map(|(i, _)| i).collect();
        assert_eq!(seen, [3, 4, 5, 0]);
        w.next();
        assert_eq!(w.skip_entry(), 1);
        assert_eq!(w.next(), None);
        // A /64 (2^64 addresses, more than a family's rotation counts)
        // passed in one step, to the rotation's end: the wrap goes on to
        // what is listed before it.
        let big = vec![e("2001:db8:9::1"), p("2001:db8::", 64)];
        let r = Rotations::new(&big);
        let mut w = r.walk(Family::V6, 7);
        w.next();
        assert_eq!(w.skip_entry(), MAX_FAMILY_TOTAL - 8);
        assert_eq!(w.next(), Some((0, big[0].base())));
        assert_eq!(w.next(), Some((1, big[1].at(0))));
        assert_eq!(w.skip_entry(), 5);
        assert_eq!(w.next(), None);
    }
    use std::collections::HashMap;
    use std::sync::Arc;

    fn ips(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    fn singles(addrs: &[IpAddr]) -> Vec<Segment> {
        addrs.iter().copied().map(Segment::single).collect()
    }

    fn publish(t: &LeaseTable, addrs: &[IpAddr], generation: u64) {
        t.publish(&singles(addrs), &[], generation, |_, _, _| 0)
            .unwrap();
    }

    fn leased(r: Option<Result<Lease, Refusal>>) -> IpAddr {
        match r {
            Some(Ok(Lease { ip, .. })) => ip,
            other => panic!("{other:?}"),
        }
    }

    /// A writer of the file changing a state word (its tag, the bits a
    /// reading checks): readings and leases meanwhile return (the bound on
    /// their retries is not what this shows: a writer thread seldom wins
    /// every race), and the table's check finds the tag changed, so the
    /// allocator replaces the table.
    #[test]
    fn a_state_changed_without_end_holds_nobody_and_is_found() {
        let t = LeaseTable::anonymous(8, 0).unwrap();
        let pool = singles(&ips(3));
        publish(&t, &ips(3), 1);
        assert_eq!(t.fault(&pool, 1), None);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let toggles = std::thread::scope(|sc| {
            let writer = sc.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    t.word(STATES[0])
                        .fetch_xor(4 << TAG_SHIFT, Ordering::AcqRel);
                    n += 1;
                }
                n
            });
            // Each returns, however long the writer goes on.
            for _ in 0..200 {
                let _ = t.position();
                let _ = t.snapshot();
                let _ = t.lease(Families::V4, None);
            }
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap()
        });
        if toggles % 2 == 0 {
            t.word(STATES[0])
                .fetch_xor(4 << TAG_SHIFT, Ordering::AcqRel);
        }
        let fault = t.fault(&pool, 1).unwrap_or_default();
        assert!(fault.contains("changed by someone else"), "{fault:?}");
        // A table this process did not publish (a worker's) has no tag to
        // hold against it.
        let fresh = LeaseTable::anonymous(8, 0).unwrap();
        assert_eq!(fresh.fault(&[], 0), None);
    }

    #[test]
    fn peers_see_the_least_load_of_their_own_accept_group_only() {
        let t = LeaseTable::anonymous(4, 0).unwrap();
        for slot in 0..4 {
            t.assign_peer(slot);
        }
        assert_eq!(t.least_sibling_load(0, 7), None, "nobody published yet");
        t.set_peer_load(0, 7, 30);
        t.set_peer_load(1, 7, 12);
        t.set_peer_load(2, 7, 20);
        t.set_peer_load(3, 9, 1); // another listening socket
        assert_eq!(t.least_sibling_load(0, 7), Some(12));
        assert_eq!(t.least_sibling_load(1, 7), Some(20), "not its own");
        assert_eq!(t.least_sibling_load(3, 9), None);
        assert_eq!(t.least_sibling_load(0, 0), None, "group 0 is none");
        // A peer gone: its line no longer counts.
        t.reset_peer(1);
        assert_eq!(t.least_sibling_load(0, 7), Some(20));
        // A slot beyond those ever handed out is not read.
        t.set_peer_load(9, 7, 0);
        assert_eq!(t.least_sibling_load(0, 7), Some(20));
    }

    #[test]
    fn rotates_wraps_and_counts() {
        let t = LeaseTable::anonymous(8, 100).unwrap();
        assert!(matches!(
            t.lease(Families::ANY, None),
            Some(Err(Refusal {
                reason: NoAddress::EmptyPool,
                generation: 0
            }))
        ));
        publish(&t, &ips(3), 1);
        let got: Vec<IpAddr> = (0..7)
            .map(|_| leased(t.lease(Families::ANY, Some(2))))
            .collect();
        let want: Vec<IpAddr> = ips(3).into_iter().cycle().take(7).collect();
        assert_eq!(got, want);
        let snap = t.snapshot();
        assert_eq!((snap.seq, snap.cursors, snap.generation), (107, [1, 0], 1));
        assert_eq!(snap.pool.iter().map(|p| p.1).collect::<Vec<_>>(), [3, 2, 2]);
        assert_eq!(t.peer_leases(2), 7);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        publish(&t, &[v6], 2);
        assert_eq!(leased(t.lease(Families::ANY, None)), v6);
        assert!(matches!(
            t.lease(
                Families {
                    v4: true,
                    v6: false
                },
                None
            ),
            Some(Err(Refusal {
                reason: NoAddress::NoFamily { .. },
                ..
            }))
        ));
    }

    #[test]
    fn closed_tables_lease_nothing_and_tell_the_final_cursor() {
        let t = LeaseTable::anonymous(4, 0).unwrap();
        publish(&t, &ips(4), 1);
        leased(t.lease(Families::ANY, None));
        let snap = t.close();
        assert!(snap.closed && t.is_closed());
        assert_eq!(snap.next_due(Family::V4), Some(ips(4)[1]));
        assert_eq!(t.lease(Families::ANY, None), None);
        assert!(matches!(
            t.publish(&singles(&ips(2)), &[], 2, |_, _, _| 0),
            Err(TableError::Closed)
        ));
        assert!(matches!(
            t.publish(&singles(&ips(5)), &[], 2, |_, _, _| 0),
            Err(TableError::TooSmall { .. })
        ));
    }

    #[test]
    fn a_file_table_is_shared_and_checked_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases");
        let a = LeaseTable::create(&path, 16, 0, 0o600, None).unwrap();
        publish(&a, &ips(4), 1);
        let b = LeaseTable::open(&path, Some(a.id())).unwrap();
        assert_eq!(leased(a.lease(Families::ANY, None)), ips(4)[0]);
        assert_eq!(leased(b.lease(Families::ANY, None)), ips(4)[1]);
        assert_eq!(leased(a.lease(Families::ANY, None)), ips(4)[2]);
        assert!(matches!(
            LeaseTable::open(&path, Some(a.id() + 1)),
            Err(TableError::Invalid(_))
        ));
        // Whole, but another version's layout: said so (asking again
        // would not help).
        let other = dir.path().join("other");
        let o = LeaseTable::create(&other, 16, 0, 0o600, None).unwrap();
        drop(o);
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&other)
                .unwrap();
            f.write_all_at(&(TABLE_LAYOUT + 1).to_ne_bytes(), 8)
                .unwrap();
        }
        assert!(matches!(
            LeaseTable::open(&other, None),
            Err(TableError::Layout(_))
        ));
        std::fs::write(dir.path().join("junk"), vec![7u8; 100_000]).unwrap();
        assert!(LeaseTable::open(&dir.path().join("junk"), None).is_err());
        assert!(LeaseTable::open(&dir.path().join("none"), None).is_err());
        // A new table at the same path: the old mapping lives on, apart.
        a.close();
        let c = LeaseTable::create(&path, 16, 0, 0o600, None).unwrap();
        assert_ne!(c.id(), a.id());
        assert_eq!(b.lease(Families::ANY, None), None);
    }

    /// A filesystem without room for the table (a full tmpfs): an error
    /// at create, not a table that reads as closed at its first lease.
    /// (Mounts a 64 KiB tmpfs: as root only; CI runs as root.)
    #[test]
    fn a_table_without_room_is_an_error_at_create() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "mount -t tmpfs");
        struct Unmount<'a>(&'a std::path::Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let path = dir.path().join("leases");
        // A small one fits; one of 100 000 addresses does not.
        assert!(LeaseTable::create(&path, 16, 0, 0o600, None).is_ok());
        let big = LeaseTable::create(&dir.path().join("big"), 100_000, 0, 0o600, None);
        assert!(matches!(big, Err(TableError::Open(..))), "{:?}", big.err());
    }

    /// Threads lease while the pool is swapped under them: every lease is
    /// of the pool current at its swap, and within one pool the addresses
    /// come out in exact rotation order, none twice out of turn.
    #[test]
    fn concurrent_leases_are_unique_and_in_order_across_pool_swaps() {
        let t = Arc::new(LeaseTable::anonymous(64, 0).unwrap());
        let pools: Vec<Vec<IpAddr>> = (0..20u8)
            .map(|g| {
                (0..(3 + g % 5))
                    .map(|i| IpAddr::from([10, g, 0, i]))
                    .collect()
            })
            .collect();
        publish(&t, &pools[0], 1);
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for _ in 0..20_000 {
                        match t.lease(Families::ANY, Some(n)) {
                            Some(Ok(Lease {
                                ip,
                                seq,
                                generation,
                            })) => got.push((seq, ip, generation)),
                            other => panic!("{other:?}"),
                        }
                    }
                    got
                })
            })
            .collect();
        for (g, pool) in pools.iter().enumerate().skip(1) {
            std::thread::sleep(std::time::Duration::from_millis(2));
            publish(&t, pool, g as u64 + 1);
        }
        let mut all: Vec<(u64, IpAddr, u64)> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(all.len(), 80_000);
        all.sort();
        all.dedup_by_key(|l| l.0);
        assert_eq!(all.len(), 80_000, "a sequence number was handed out twice");
        // Every address belongs to the pool of its generation.
        for (_, ip, g) in &all {
            assert!(
                pools[*g as usize - 1].contains(ip),
                "{ip} not in generation {g}"
            );
        }
        // Per generation, the counts differ by at most one between
        // addresses (each swap restarts at index 0 here).
        let mut per: HashMap<(u64, IpAddr), u64> = HashMap::new();
        for (_, ip, g) in &all {
            *per.entry((*g, *ip)).or_default() += 1;
        }
        for (g, pool) in pools.iter().enumerate() {
            let counts: Vec<u64> = pool
                .iter()
                .map(|ip| per.get(&(g as u64 + 1, *ip)).copied().unwrap_or(0))
                .collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(max - min <= 1, "generation {}: {counts:?}", g + 1);
        }
        let total: u64 = (0..4).map(|n| t.peer_leases(n)).sum();
        assert_eq!(total, 80_000);
    }

    const V4: Families = Families::V4;
    const V6: Families = Families::V6;

    /// Requests alternating between families each see their family's
    /// addresses in exact order (one shared cursor gave the first address
    /// of each family every time).
    #[test]
    fn each_family_rotates_on_its_own() {
        let t = LeaseTable::anonymous(16, 0).unwrap();
        let v6: Vec<IpAddr> = (2..=5)
            .map(|i| format!("fd00:1::{i}").parse().unwrap())
            .collect();
        let v4: Vec<IpAddr> = (2..=5).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        // Interleaved in the list on purpose: the table groups them.
        let mixed: Vec<IpAddr> = v4.iter().zip(&v6).flat_map(|(a, b)| [*a, *b]).collect();
        publish(&t, &mixed, 1);
        let mut got4 = Vec::new();
        let mut got6 = Vec::new();
        for _ in 0..8 {
            got6.push(leased(t.lease(V6, None)));
            got4.push(leased(t.lease(V4, None)));
        }
        assert_eq!(got4, v4.iter().cycle().take(8).copied().collect::<Vec<_>>());
        assert_eq!(got6, v6.iter().cycle().take(8).copied().collect::<Vec<_>>());
        let snap = t.snapshot();
        assert_eq!(snap.cursors, [0, 0]);
        assert!(snap.pool.iter().all(|(_, n)| *n == 2), "{:?}", snap.pool);
        // Both acceptable: IPv4 first; only IPv6 in the pool: IPv6.
        assert!(leased(t.lease(Families::ANY, None)).is_ipv4());
        publish(&t, &v6, 2);
        assert!(leased(t.lease(Families::ANY, None)).is_ipv6());
        assert!(matches!(
            t.lease(V4, None),
            Some(Err(Refusal {
                reason: NoAddress::NoFamily { .. },
                generation: 2
            }))
        ));
    }

    /// A prefix is leased in its segment's order, never enumerated; single
    /// addresses around it keep their places.
    #[test]
    fn prefixes_rotate_by_permutation_beside_single_addresses() {
        let t = LeaseTable::anonymous(8, 0).unwrap();
        let one: IpAddr = "2001:db8::1".parse().unwrap();
        let p64 = Segment::prefix("2001:db8:1::".parse().unwrap(), 64).unwrap();
        let small = Segment::prefix("2001:db8:2::".parse().unwrap(), 126).unwrap();
        let pool = [Segment::single(one), small, p64];
        t.publish(&pool, &[], 1, |_, _, _| 0).unwrap();
        let got: Vec<IpAddr> = (0..1000).map(|_| leased(t.lease(V6, None))).collect();
        assert_eq!(got[0], one);
        assert_eq!(
            &got[1..5],
            &(0..4).map(|i| small.at(i)).collect::<Vec<_>>()[..]
        );
        assert_eq!(
            &got[5..],
            &(0..995).map(|i| p64.at(i)).collect::<Vec<_>>()[..]
        );
        let snap = t.snapshot();
        assert_eq!(snap.cursors[1], 1000);
        assert_eq!(snap.next_due(Family::V6), Some(p64.at(995)));
        assert_eq!(index_of(&pool, p64.at(995)), Some(1000));
        assert_eq!(family_total(&pool, Family::V6), MAX_FAMILY_TOTAL);
        // Resumed at an address of the prefix, after a restart.
        t.set_cursor(Family::V6, index_of(&pool, p64.at(5)).unwrap());
        assert_eq!(leased(t.lease(V6, None)), p64.at(5));
    }

    /// Garbage in the metadata words (a torn or tampered table) refuses or
    /// retries; it never reads out of bounds or panics.
    #[test]
    fn bad_metadata_is_refused_not_followed() {
        let t = LeaseTable::anonymous(4, 0).unwrap();
        publish(&t, &ips(3), 1);
        let half = LeaseTable::half_of(t.word(STATES[0]).load(Ordering::Relaxed));
        let line = HALVES + half * LINE;
        t.word(line + H_ENTRIES).store(u64::MAX, Ordering::Relaxed);
        assert!(matches!(t.lease(V4, None), Some(Err(_))));
        t.word(line + H_ENTRIES).store(3, Ordering::Relaxed);
        t.word(line + H_TOTAL).store(u64::MAX, Ordering::Relaxed);
        assert!(matches!(t.lease(V4, None), Some(Err(_))));
        let _ = t.snapshot();
    }
}
