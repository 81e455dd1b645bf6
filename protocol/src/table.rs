//! The lease table: the pool and its rotation cursor in a shared-memory file,
//! so a worker takes its next address with one compare-and-swap instead of a
//! round trip to the allocator — with the same global, atomic rotation.
//!
//! The allocator owns the table: it creates the file next to its socket,
//! writes every pool into it, and hands workers its path over the socket
//! (`Request::Attach`); it is the only writer of the pool. Workers (and the
//! allocator itself, for leases asked over the socket) move the cursor.
//!
//! Layout (native-endian `u64` words; one file per allocator run):
//!
//! ```text
//! line 0  magic, layout, capacity, peer slots, id, peer slots handed out
//! line 1  state, seq
//! line 2  generation and length of half 0, then of half 1
//! 256 peer lines: leases, accept group, load
//! half 0: capacity entries, then half 1: capacity entries
//!         entry = family (4 or 6), high and low 64 bits, leases
//! ```
//!
//! `state` packs a closed bit, a 19-bit tag (its low bit names the half in
//! use) and the cursor. A lease reads the half the state names, picks the next
//! address of an acceptable family, and moves the cursor past it with a
//! compare-and-swap of the whole state, which fails if the allocator swapped
//! in another pool meanwhile: the allocator only rewrites a half no current
//! state names, and changes the state with read-modify-writes, so a lease
//! whose swap succeeded read a whole, current pool (the seqlock argument).
//! Closing sets the closed bit: no lease succeeds afterwards, and the closer
//! reads the final cursor exactly. The lease sequence and the counters are
//! bumped just after a lease's swap, so a reading taken at a close may miss
//! the few leases still finishing: they count leases for status and logs;
//! the rotation itself is the cursor, which is exact.
//!
//! A peer line also carries what its worker publishes for accept balancing
//! (see the worker's `accept`): the identity of the listening sockets it
//! accepts from (its group; 0 for none) and its load, the client
//! connections and tunnels it holds. Words a layout-1 peer did not know of
//! are zero, so older workers simply take no part.
//!
//! Whoever can write the file can disturb the rotation (or truncate it under
//! the processes that map it): it gets the socket's group, so run workers
//! only as the allocator's user or group, as `deploy/` does.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::{Families, Lease, NoAddress, Refusal};

const MAGIC: u64 = u64::from_le_bytes(*b"RTRLEASE");
/// Bumped on any change of the layout above.
pub const TABLE_LAYOUT: u64 = 1;
/// Workers that can count their leases in the table; later ones lease
/// through it all the same, counted by the allocator as unattributed.
pub const PEER_SLOTS: usize = 256;

const LINE: usize = 8; // words
/// Line 0: one past the highest peer slot ever handed out, so a scan of
/// the peer lines stops there.
const SLOTS_USED: usize = 5;
/// Words of a peer line.
const PEER_GROUP: usize = 1;
const PEER_LOAD: usize = 2;

/// The first word of peer `slot`'s line; `None` past the last slot.
fn peer_line(slot: u32) -> Option<usize> {
    let slot = slot as usize;
    (slot < PEER_SLOTS).then_some(PEERS + slot * LINE)
}
const STATE: usize = LINE;
const SEQ: usize = LINE + 1;
const HALVES: usize = 2 * LINE;
const PEERS: usize = 3 * LINE;
const ENTRIES: usize = PEERS + PEER_SLOTS * LINE;
const ENTRY: usize = 4; // words

const CLOSED: u64 = 1 << 63;
const TAG_SHIFT: u32 = 44;
const TAG_MASK: u64 = (1 << 19) - 1;
const CURSOR_MASK: u64 = (1 << TAG_SHIFT) - 1;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot open the lease table {0}")]
    Open(String, #[source] io::Error),
    #[error("cannot map the lease table")]
    Map(#[source] io::Error),
    #[error("{0} is not a lease table of this layout, or not the one announced")]
    Invalid(String),
    #[error("the lease table holds at most {capacity} addresses, not {wanted}")]
    TooSmall { capacity: usize, wanted: usize },
    #[error("the lease table is closed")]
    Closed,
}

/// A mapped lease table.
pub struct LeaseTable {
    base: NonNull<AtomicU64>,
    words: usize,
    capacity: usize,
    id: u64,
}

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

/// The table's rotation at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSnapshot {
    pub generation: u64,
    pub cursor: usize,
    pub seq: u64,
    pub closed: bool,
    /// The pool in order, with the leases each address was given.
    pub pool: Vec<(IpAddr, u64)>,
}

impl TableSnapshot {
    /// The address the next unrestricted lease would return.
    pub fn next_due(&self) -> Option<IpAddr> {
        self.pool.get(self.cursor).map(|(ip, _)| *ip)
    }
}

fn words_for(capacity: usize) -> usize {
    ENTRIES + 2 * capacity * ENTRY
}

fn map(file: Option<&File>, words: usize) -> Result<NonNull<AtomicU64>, TableError> {
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
    Ok(NonNull::new(p.cast()).expect("mmap returned a null mapping"))
}

fn decode_entry(family: u64, hi: u64, lo: u64) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::from(lo as u32))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(
            (u128::from(hi) << 64) | u128::from(lo),
        ))),
        _ => None,
    }
}

fn encode_entry(ip: IpAddr) -> (u64, u64, u64) {
    match ip {
        IpAddr::V4(a) => (4, 0, u64::from(u32::from(a))),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            (6, (v >> 64) as u64, v as u64)
        }
    }
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
        file.set_len((words * 8) as u64)
            .map_err(|e| TableError::Open(name(), e))?;
        let table = LeaseTable::init(Some(&file), capacity, seq)?;
        std::fs::rename(&tmp, path).map_err(|e| TableError::Open(name(), e))?;
        Ok(table)
    }

    /// A table in memory only, for an allocator that serves no workers
    /// through a table, and for tests.
    pub fn anonymous(capacity: usize, seq: u64) -> Result<LeaseTable, TableError> {
        LeaseTable::init(None, capacity, seq)
    }

    fn init(file: Option<&File>, capacity: usize, seq: u64) -> Result<LeaseTable, TableError> {
        let words = words_for(capacity);
        let table = LeaseTable {
            base: map(file, words)?,
            words,
            capacity,
            id: fresh_id(),
        };
        // A new file or anonymous mapping is zero-filled: state 0 is half 0,
        // empty, open.
        table.word(SEQ).store(seq, Ordering::Relaxed);
        table.word(2).store(capacity as u64, Ordering::Relaxed);
        table.word(3).store(PEER_SLOTS as u64, Ordering::Relaxed);
        table.word(4).store(table.id, Ordering::Relaxed);
        table.word(1).store(TABLE_LAYOUT, Ordering::Relaxed);
        table.word(0).store(MAGIC, Ordering::Release);
        Ok(table)
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
        let mut table = LeaseTable {
            base: map(Some(&file), words)?,
            words,
            capacity: 0,
            id: 0,
        };
        let capacity = table.word(2).load(Ordering::Relaxed) as usize;
        table.id = table.word(4).load(Ordering::Relaxed);
        let valid = table.word(0).load(Ordering::Acquire) == MAGIC
            && table.word(1).load(Ordering::Relaxed) == TABLE_LAYOUT
            && table.word(3).load(Ordering::Relaxed) == PEER_SLOTS as u64
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

    fn ip_at(&self, half: usize, i: usize) -> Option<IpAddr> {
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

    /// The address state `s` has due next, if its cursor is in its pool.
    fn due_at(&self, s: u64) -> Option<IpAddr> {
        let half = Self::half_of(s);
        let (_, len) = self.half_meta(half);
        let cursor = (s & CURSOR_MASK) as usize;
        (cursor < len.min(self.capacity))
            .then(|| self.ip_at(half, cursor))
            .flatten()
    }

    fn half_meta(&self, half: usize) -> (u64, usize) {
        (
            self.word(HALVES + 2 * half).load(Ordering::Relaxed),
            self.word(HALVES + 2 * half + 1).load(Ordering::Relaxed) as usize,
        )
    }

    /// The next address of one of `families`, counted for peer `slot`, or
    /// why there is none, as the allocator would answer; `None` once the
    /// table is closed (ask the allocator instead).
    pub fn lease(&self, families: Families, slot: Option<u32>) -> Option<Result<Lease, Refusal>> {
        let state = self.word(STATE);
        let mut s = state.load(Ordering::Acquire);
        loop {
            if s & CLOSED != 0 {
                return None;
            }
            let half = Self::half_of(s);
            let (generation, len) = self.half_meta(half);
            let cursor = (s & CURSOR_MASK) as usize;
            let found = if len <= self.capacity {
                (0..len).map(|k| (cursor + k) % len).find_map(|i| {
                    self.ip_at(half, i)
                        .filter(|ip| families.accepts(ip))
                        .map(|ip| (i, ip))
                })
            } else {
                None
            };
            let Some((i, ip)) = found else {
                // Only an answer if the pool did not change while read.
                std::sync::atomic::fence(Ordering::Acquire);
                let now = state.load(Ordering::Acquire);
                if now != s {
                    s = now;
                    continue;
                }
                let reason = match len {
                    0 => NoAddress::EmptyPool,
                    _ => NoAddress::NoFamily { wanted: families },
                };
                return Some(Err(Refusal { reason, generation }));
            };
            let next = (s & !CURSOR_MASK) | ((i + 1) % len) as u64;
            match state.compare_exchange_weak(s, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    self.word(self.entry(half, i) + 3)
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(line) = slot.and_then(peer_line) {
                        self.word(line).fetch_add(1, Ordering::Relaxed);
                    }
                    let seq = self.word(SEQ).fetch_add(1, Ordering::Relaxed) + 1;
                    return Some(Ok(Lease {
                        ip,
                        seq,
                        generation,
                    }));
                }
                Err(now) => s = now,
            }
        }
    }

    /// Whether the table was closed (the allocator stopped, or replaced it).
    pub fn is_closed(&self) -> bool {
        self.word(STATE).load(Ordering::Acquire) & CLOSED != 0
    }

    /// Writes a new pool (allocator only; one writer at a time) with each
    /// address's lease count, into the half no lease reads, then swaps it
    /// in. `cursor` gets the address due next and the cursor as they stand
    /// and returns the cursor into `addrs`; only that is redone, and the
    /// swap retried, when a lease moved the cursor meanwhile, so a busy
    /// table cannot starve a refresh.
    pub fn publish<F>(
        &self,
        addrs: &[IpAddr],
        counts: &[u64],
        generation: u64,
        mut cursor: F,
    ) -> Result<(), TableError>
    where
        F: FnMut(Option<IpAddr>, usize) -> usize,
    {
        if addrs.len() > self.capacity {
            return Err(TableError::TooSmall {
                capacity: self.capacity,
                wanted: addrs.len(),
            });
        }
        let state = self.word(STATE);
        let s = state.load(Ordering::Acquire);
        if s & CLOSED != 0 {
            return Err(TableError::Closed);
        }
        // The only writer: the tag cannot change under us, so the other
        // half stays unread until the swap below.
        let half = 1 - Self::half_of(s);
        for (i, ip) in addrs.iter().enumerate() {
            let (family, hi, lo) = encode_entry(*ip);
            let e = self.entry(half, i);
            self.word(e).store(family, Ordering::Relaxed);
            self.word(e + 1).store(hi, Ordering::Relaxed);
            self.word(e + 2).store(lo, Ordering::Relaxed);
            self.word(e + 3)
                .store(counts.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        self.word(HALVES + 2 * half)
            .store(generation, Ordering::Relaxed);
        self.word(HALVES + 2 * half + 1)
            .store(addrs.len() as u64, Ordering::Relaxed);
        let mut s = s;
        loop {
            if s & CLOSED != 0 {
                return Err(TableError::Closed);
            }
            let c = cursor(self.due_at(s), (s & CURSOR_MASK) as usize);
            let c = if c < addrs.len() { c } else { 0 };
            let tag = ((s >> TAG_SHIFT) + 1) & TAG_MASK;
            let next = (tag << TAG_SHIFT) | c as u64;
            match state.compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(actual) => s = actual,
            }
        }
    }

    /// Sets the lease sequence of a table no lease has used yet (allocator
    /// only: a table that replaces a closed one continues its sequence).
    pub fn set_seq(&self, seq: u64) {
        self.word(SEQ).store(seq, Ordering::Relaxed);
    }

    /// Moves the cursor to `cursor` of the current pool (allocator only).
    pub fn set_cursor(&self, cursor: usize) {
        let state = self.word(STATE);
        let _ = state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            let (_, len) = self.half_meta(Self::half_of(s));
            (s & CLOSED == 0 && cursor < len).then_some((s & !CURSOR_MASK) | cursor as u64)
        });
    }

    /// Closes the table for good and returns its final rotation: no lease
    /// succeeds after this returns.
    pub fn close(&self) -> TableSnapshot {
        let s = self.word(STATE).fetch_or(CLOSED, Ordering::AcqRel) | CLOSED;
        self.snapshot_at(s)
    }

    /// The rotation now, without the pool: generation, cursor, lease
    /// sequence, and the address due next.
    pub fn position(&self) -> (u64, usize, u64, Option<IpAddr>) {
        loop {
            let s = self.word(STATE).load(Ordering::Acquire);
            let (generation, _) = self.half_meta(Self::half_of(s));
            let cursor = (s & CURSOR_MASK) as usize;
            let next = self.due_at(s);
            let seq = self.word(SEQ).load(Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Acquire);
            // A lease moving the cursor meanwhile is fine (this is a reading
            // of one instant); a pool swapped in is read again.
            if (self.word(STATE).load(Ordering::Acquire) ^ s) & !CURSOR_MASK == 0 {
                return (generation, cursor, seq, next);
            }
        }
    }

    /// The rotation now.
    pub fn snapshot(&self) -> TableSnapshot {
        loop {
            let s = self.word(STATE).load(Ordering::Acquire);
            let snap = self.snapshot_at(s);
            std::sync::atomic::fence(Ordering::Acquire);
            // A pool swapped in while read is read again.
            if (self.word(STATE).load(Ordering::Acquire) ^ s) & !CURSOR_MASK == 0 {
                return snap;
            }
        }
    }

    fn snapshot_at(&self, s: u64) -> TableSnapshot {
        let half = Self::half_of(s);
        let (generation, len) = self.half_meta(half);
        let len = len.min(self.capacity);
        let pool = (0..len)
            .filter_map(|i| {
                let ip = self.ip_at(half, i)?;
                Some((
                    ip,
                    self.word(self.entry(half, i) + 3).load(Ordering::Relaxed),
                ))
            })
            .collect();
        TableSnapshot {
            generation,
            cursor: (s & CURSOR_MASK) as usize,
            seq: self.word(SEQ).load(Ordering::Relaxed),
            closed: s & CLOSED != 0,
            pool,
        }
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
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn ips(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    fn publish(t: &LeaseTable, addrs: &[IpAddr], generation: u64) {
        t.publish(addrs, &[], generation, |_, _| 0).unwrap();
    }

    fn leased(r: Option<Result<Lease, Refusal>>) -> IpAddr {
        match r {
            Some(Ok(Lease { ip, .. })) => ip,
            other => panic!("{other:?}"),
        }
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
        assert_eq!((snap.seq, snap.cursor, snap.generation), (107, 1, 1));
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
        assert_eq!(snap.next_due(), Some(ips(4)[1]));
        assert_eq!(t.lease(Families::ANY, None), None);
        assert!(matches!(
            t.publish(&ips(2), &[], 2, |_, _| 0),
            Err(TableError::Closed)
        ));
        assert!(matches!(
            t.publish(&ips(5), &[], 2, |_, _| 0),
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
        std::fs::write(dir.path().join("junk"), vec![7u8; 100_000]).unwrap();
        assert!(LeaseTable::open(&dir.path().join("junk"), None).is_err());
        assert!(LeaseTable::open(&dir.path().join("none"), None).is_err());
        // A new table at the same path: the old mapping lives on, apart.
        a.close();
        let c = LeaseTable::create(&path, 16, 0, 0o600, None).unwrap();
        assert_ne!(c.id(), a.id());
        assert_eq!(b.lease(Families::ANY, None), None);
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
}
