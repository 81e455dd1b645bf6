//! The pool and its rotation cursors.
//!
//! Pool `[A B C D]`: leases return A B C D A B … Each address family has
//! its own cursor over its own entries, so IPv4 and IPv6 requests, however
//! they interleave, each rotate evenly. A lease asks for a set of address
//! families; the next address of an acceptable one is returned and that
//! family's cursor moves past it. An entry is an address or a prefix
//! (`Segment`). Replacing the pool keeps each family's rotation going from
//! the address that was due next, when it is still in the pool.
//!
//! Quarantined entries (addresses this host cannot bind) stay in the
//! listing but are left out of what the table rotates over.
//!
//! The cursor, the lease sequence and the counts live in the lease table
//! (`rotor_protocol::LeaseTable`), which workers lease from directly; the
//! allocator leases from the same table for requests over its socket, so
//! there is one rotation. The pool is written to the table only from here.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rotor_protocol::{
    family_total, index_of, Families, Family, Lease, LeaseTable, Position, PrefixSet, Refusal,
    Segment, TableError, TableSnapshot,
};

/// Room for this many entries in a first table; it grows as pools do.
const MIN_CAPACITY: usize = 64;

#[derive(Debug)]
pub struct Pool {
    /// Every entry, in order, quarantined or not.
    addrs: Vec<Segment>,
    /// Left out of the rotation.
    quarantined: HashSet<Segment>,
    /// What the table rotates over: `addrs` less `quarantined`.
    active: Vec<Segment>,
    /// `active`'s rotations, for the site path's walks.
    rotations: rotor_protocol::Rotations,
    /// `active`'s single addresses and its prefixes, to check a lease
    /// against (the table's file can be written by others).
    active_singles: HashSet<IpAddr>,
    active_prefixes: PrefixSet,
    /// Every prefix of `addrs`, in the rotation or not (found by a probe
    /// per length: a pool may list thousands, and a report from a worker
    /// asks for each of 10 000 addresses).
    prefixes: PrefixSet,
    generation: u64,
    table: Arc<LeaseTable>,
    /// Where the table's file is; `None`: in this process only.
    home: Option<TableHome>,
    /// The rotation when the table was last found sound: where a table
    /// whose file was cut short (and its cursors lost) is rebuilt from.
    last_sound: Option<(Position, u64)>,
    /// By `Family::index`: the address that was due next when the family
    /// was emptied (a source that read empty once, a file caught half
    /// written), so a refill continues there rather than at the first.
    held_due: [Option<IpAddr>; 2],
    /// By `Family::index`: an address saved by an earlier allocator,
    /// where the family's rotation continues once it is published with
    /// addresses (`resume_from`), set in the publish itself: a cursor set
    /// after it rewound leases workers had taken from the new table
    /// meanwhile, and handed their addresses out again. Then whether it
    /// was in the rotation (`take_resumed`).
    resume: [Option<IpAddr>; 2],
    resumed: [Option<bool>; 2],
    /// Whether a generation was published in this table's lineage (a
    /// pool continuing a saved generation has published nothing yet).
    published: bool,
    /// The lease counts of the listed entries out of the rotation (the
    /// table holds the rotation's only), so one put back continues its
    /// count: within `addrs`, so bounded by the pool.
    parked: HashMap<Segment, u64>,
    /// Where each listed prefix left off: the offset in its own order of
    /// its address due next when the rotation last left it (a change of
    /// the pool moved the cursor elsewhere: another entry quarantined or
    /// released, a route withdrawn, a file edited), so it goes on there
    /// when the rotation comes back to it. It started over at its first,
    /// and a prefix that flapped leased the same few addresses each time.
    /// Within `addrs`, so bounded by the pool; not kept over a restart.
    places: HashMap<Segment, u128>,
}

/// Where the lease table's file goes, and who may map it.
#[derive(Debug, Clone)]
pub struct TableHome {
    pub path: PathBuf,
    pub mode: u32,
    pub group: Option<nix::unistd::Gid>,
}

/// What a table hands on to the one that replaces it.
#[derive(Debug, Default)]
struct Carried {
    seq: u64,
    reloads: u64,
    /// By `Family::index`.
    next_due: [Option<IpAddr>; 2],
    cursors: [u64; 2],
    /// Its file was cut short.
    broken: bool,
}

/// More leases than one check of the table (each second) can see counted
/// since the last: its sequence was written by someone else (gone back,
/// or far on).
const MOST_LEASES_A_CHECK: u64 = 1 << 30;

/// A table at `home` (or in memory) with room for `capacity` addresses.
fn new_table(
    home: Option<&TableHome>,
    capacity: usize,
    seq: u64,
) -> Result<LeaseTable, TableError> {
    let capacity = capacity.max(MIN_CAPACITY).next_power_of_two();
    let Some(home) = home else {
        return LeaseTable::anonymous(capacity, seq);
    };
    LeaseTable::create(
        &home.path,
        capacity,
        seq,
        home.mode,
        home.group.map(|g| g.as_raw()),
    )
}

/// The pool's entries from `addrs` as the sources list them: duplicates
/// removed (the first kept), and the entries another holds
/// ([`without_covered`]). `--check` judges the same list the allocator
/// would serve (it warned of a /64 a /48 after it holds, which is left
/// out).
pub fn distinct(addrs: Vec<Segment>, quarantined: &HashSet<Segment>) -> Vec<Segment> {
    let mut seen = HashSet::with_capacity(addrs.len());
    let addrs: Vec<Segment> = addrs.into_iter().filter(|a| seen.insert(*a)).collect();
    without_covered(addrs, quarantined)
}

/// `addrs` less the entries another (larger) entry of the list holds: an
/// interface's address inside a /64 that is in the pool too is the same
/// address twice in the rotation, and a /64 inside a /48 the same addresses.
/// Prefixes are looked up by length (`PrefixSet`), so the cost is a probe
/// per entry and prefix length, not per pair.
/// A prefix out of the rotation (`quarantined`: its route missing, say)
/// covers nothing: what it holds stays, and serves meanwhile.
fn without_covered(addrs: Vec<Segment>, quarantined: &HashSet<Segment>) -> Vec<Segment> {
    let mut prefixes = PrefixSet::default();
    for p in addrs
        .iter()
        .filter(|e| !e.is_single() && !quarantined.contains(e))
    {
        prefixes.insert(*p);
    }
    if prefixes.is_empty() {
        return addrs;
    }
    addrs
        .into_iter()
        .filter(|e| e.prefix_len() == 0 || !prefixes.holds(e, e.prefix_len() - 1))
        .collect()
}

impl Pool {
    pub fn new(addrs: Vec<Segment>) -> Pool {
        let mut pool = Pool::continuing(0, 0, None).expect("an anonymous lease table");
        pool.replace(addrs).expect("an anonymous lease table");
        pool
    }

    /// An empty pool whose generations and lease sequence continue from
    /// those a previous allocator reached, with its table at `home` (a
    /// file workers map) or in memory.
    pub fn continuing(
        generation: u64,
        seq: u64,
        home: Option<TableHome>,
    ) -> Result<Pool, TableError> {
        let table = new_table(home.as_ref(), MIN_CAPACITY, seq)?;
        Ok(Pool {
            addrs: Vec::new(),
            quarantined: HashSet::new(),
            active: Vec::new(),
            rotations: Default::default(),
            active_singles: HashSet::new(),
            active_prefixes: PrefixSet::default(),
            prefixes: PrefixSet::default(),
            generation,
            table: Arc::new(table),
            home,
            last_sound: None,
            held_due: [None, None],
            resume: [None, None],
            resumed: [None, None],
            published: false,
            parked: HashMap::new(),
            places: HashMap::new(),
        })
    }

    /// Every entry, quarantined or not.
    pub fn addrs(&self) -> &[Segment] {
        &self.addrs
    }

    pub fn is_quarantined(&self, e: &Segment) -> bool {
        self.quarantined.contains(e)
    }

    /// The lease count of listed entry `e` while it is out of the
    /// rotation (what it had when it went out).
    pub fn parked_leases(&self, e: &Segment) -> Option<u64> {
        self.parked.get(e).copied()
    }

    pub fn table(&self) -> &Arc<LeaseTable> {
        &self.table
    }

    /// Where workers find the table, if they can.
    pub fn home(&self) -> Option<&PathBuf> {
        self.home.as_ref().map(|h| &h.path)
    }

    /// The rotation (the entries not quarantined, each with its lease
    /// count), the cursors and the lease sequence, as one consistent
    /// reading.
    pub fn snapshot(&self) -> TableSnapshot {
        self.table.snapshot()
    }

    #[cfg(test)]
    fn lease_counts(&self) -> impl Iterator<Item = (Segment, u64)> {
        self.snapshot().pool.into_iter()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The next address of an acceptable family (that family's cursor
    /// moves past it), or why there is none; `None` once the table is
    /// closed, which happens only as the allocator stops (a table replaced
    /// by a bigger one is closed under the allocator's lock, so no lease
    /// sees it).
    pub fn lease(&self, families: Families) -> Option<Result<Lease, Refusal>> {
        self.table.lease(families, None)
    }

    /// Swaps in a new entry list (duplicates removed, first one kept).
    /// Returns whether anything changed; an identical list keeps the
    /// generation, the cursors and the counts as they are. Quarantine
    /// stays with the entries still listed.
    pub fn replace(&mut self, addrs: Vec<Segment>) -> Result<bool, TableError> {
        let q = self.quarantined.clone();
        self.update(addrs, q)
    }

    /// Swaps in a new entry list (duplicates removed, first one kept) with
    /// `quarantined` (those listed) out of the rotation. Returns whether
    /// anything changed; with nothing changed, the generation, the cursors
    /// and the counts stay as they are.
    pub fn update(
        &mut self,
        addrs: Vec<Segment>,
        quarantined: HashSet<Segment>,
    ) -> Result<bool, TableError> {
        let addrs = distinct(addrs, &quarantined);
        let seen: HashSet<Segment> = addrs.iter().copied().collect();
        let quarantined: HashSet<Segment> = quarantined
            .into_iter()
            .filter(|q| seen.contains(q))
            .collect();
        if addrs == self.addrs && quarantined == self.quarantined && self.published {
            return Ok(false);
        }
        self.publish(addrs, quarantined)?;
        Ok(true)
    }

    /// Takes `entries` out of the rotation (`out`) or puts them back;
    /// whether the rotation changed.
    #[cfg(test)]
    fn set_quarantined(&mut self, entries: &[Segment], out: bool) -> Result<bool, TableError> {
        let mut q = self.quarantined.clone();
        for e in entries {
            match out {
                true => q.insert(*e),
                false => q.remove(e),
            };
        }
        self.update(self.addrs.clone(), q)
    }

    /// Publishes `addrs` less `quarantined` as a new generation, each
    /// family's rotation continuing from its address due next, or if that
    /// is gone, from the next entry of the old rotation still there.
    fn publish(
        &mut self,
        addrs: Vec<Segment>,
        quarantined: HashSet<Segment>,
    ) -> Result<(), TableError> {
        // The old rotation, put back if the publish fails.
        let old = std::mem::take(&mut self.rotations);
        let done = self.publish_after(addrs, quarantined, &old);
        if done.is_err() {
            self.rotations = old;
        }
        done
    }

    fn publish_after(
        &mut self,
        addrs: Vec<Segment>,
        quarantined: HashSet<Segment>,
        was: &rotor_protocol::Rotations,
    ) -> Result<(), TableError> {
        let active: Vec<Segment> = addrs
            .iter()
            .filter(|a| !quarantined.contains(a))
            .copied()
            .collect();
        let rotations = rotor_protocol::Rotations::new(&active);
        let held = self.held_due;
        let resume = self.resume;
        let before = self.table.position().next_due;
        // The prefix the rotation is in leaves off at its address due.
        for due in before.into_iter().flatten() {
            let Some(i) = was.index_of(due) else { continue };
            if let Some((entry, first)) = was.entry_at(Family::of(&due), i) {
                if !entry.is_single() {
                    self.places.insert(entry, u128::from(i - first));
                }
            }
        }
        let places = &self.places;
        let cursor = |family: Family, due: Option<IpAddr>, now: u64| {
            let i = family.index();
            let at = |ip: IpAddr| rotations.index_of(ip);
            // Where prefix `e`, beginning at `first`, left off, if it did.
            let place = |e: &Segment, first: u64| {
                let k = u64::try_from(*places.get(e)?).ok()?;
                first
                    .checked_add(k)
                    .filter(|&j| j < rotations.total(family))
            };
            let saved = resume[i].and_then(at);
            // A prefix back in the rotation (put back, listed again, its
            // route back) goes on where it left off, at once: reached by
            // the rotation's own advance after the address due, it began
            // at its first, and leased the same addresses again. (The
            // entries due before it wait for the next cycle.)
            let back = || {
                rotations
                    .reached_prefixes(family)
                    .filter(|(e, _)| !was.reaches(e))
                    .find_map(|(e, first)| place(&e, first))
            };
            if let Some(j) = saved.is_none().then(back).flatten() {
                return j;
            }
            // The saved address if it is listed, else the one due (or held).
            let listed = saved.or_else(|| due.or(held[i]).and_then(at));
            let at = match listed.or_else(|| due.and_then(|ip| was.next_kept(&rotations, ip))) {
                Some(at) => at,
                // None of the old entries is left: the same place.
                None if now < rotations.total(family) => now,
                None => 0,
            };
            if listed.is_some() {
                return at;
            }
            // Into a prefix from elsewhere: where it left off, if it did.
            rotations
                .entry_at(family, at)
                .and_then(|(e, first)| place(&e, first))
                .unwrap_or(at)
        };
        // Counts follow their entry, out of the rotation and back (a
        // lease finishing meanwhile may go uncounted: they are for status).
        let mut old: HashMap<Segment, u64> = self.table.snapshot().pool.into_iter().collect();
        for (e, n) in &self.parked {
            old.entry(*e).or_insert(*n);
        }
        let counts: Vec<u64> = active
            .iter()
            .map(|a| old.get(a).copied().unwrap_or(0))
            .collect();
        // (wrapping: a table left by a killed allocator may say anything)
        let generation = self.generation.wrapping_add(1);
        match self.table.publish(&active, &counts, generation, cursor) {
            Ok(()) => {}
            Err(TableError::TooSmall { .. } | TableError::Closed) => {
                // A bigger table, made (file, mode, group) before the old one
                // is touched: if that fails, the old one stays as it was.
                // Then the old one is closed, so the rotation carries over
                // exactly; workers find it closed and ask for the new one.
                let table = new_table(self.home.as_ref(), active.len() * 2, 0)?;
                let last = self.close_table(true);
                table.set_seq(last.seq);
                table.set_reloads(last.reloads);
                table.publish(&active, &counts, generation, |f, _, _| {
                    cursor(f, last.next_due[f.index()], last.cursors[f.index()])
                })?;
                match last.broken {
                    true => tracing::error!(
                        "the lease table's file was cut short (truncated) under rotor; replaced"
                    ),
                    false => tracing::info!(capacity = table.capacity(), "lease table grown"),
                }
                self.table = Arc::new(table);
            }
            Err(e) => return Err(e),
        }
        self.parked = quarantined
            .iter()
            .filter_map(|e| old.get(e).map(|n| (*e, *n)))
            .collect();
        self.addrs = addrs;
        let listed: HashSet<&Segment> = self.addrs.iter().collect();
        self.places.retain(|e, _| listed.contains(e));
        self.quarantined = quarantined;
        self.active_singles = active
            .iter()
            .filter(|e| e.is_single())
            .map(|e| e.base())
            .collect();
        self.active_prefixes = prefix_set(&active);
        self.prefixes = prefix_set(&self.addrs);
        for family in [Family::V4, Family::V6] {
            let i = family.index();
            self.held_due[i] = match family_total(&active, family) {
                0 => before[i].or(held[i]),
                _ => None,
            };
            // A saved address is used up by the first publish with
            // addresses of its family.
            if let Some(ip) = resume[i].filter(|_| family_total(&active, family) > 0) {
                self.resumed[i] = Some(index_of(&active, ip).is_some());
                self.resume[i] = None;
            }
        }
        self.rotations = rotations;
        self.active = active;
        self.generation = generation;
        self.published = true;
        Ok(())
    }

    /// By `Family::index`: the address held as due next for a family that
    /// is empty now (what a state file keeps for it).
    pub fn held_due(&self) -> [Option<IpAddr>; 2] {
        self.held_due
    }

    /// Whether `family` has an address in the rotation.
    #[cfg(test)]
    pub fn has_family(&self, family: Family) -> bool {
        family_total(&self.active, family) > 0
    }

    /// The entry holding `ip`, in the rotation or not.
    /// No walk of the entries: a metrics scrape asks it for every
    /// address sessions hold, under the allocator's lock, and a walk of
    /// 20 000 singles for each of 20 000 addresses gone from the pool
    /// (sessions keep them until their next request) held it for about
    /// a second.
    /// The prefix in the rotation that holds `ip`, if one does.
    pub fn prefix_in_rotation(&self, ip: IpAddr) -> Option<Segment> {
        self.active_prefixes.holder(ip)
    }

    pub fn entry_of(&self, ip: IpAddr) -> Option<Segment> {
        let single = Segment::single(ip);
        if self.active_singles.contains(&ip) || self.quarantined.contains(&single) {
            return Some(single);
        }
        self.active_prefixes
            .holder(ip)
            .or_else(|| self.prefixes.holder(ip))
    }

    /// Whether `ip` is an address of the rotation.
    pub fn holds(&self, ip: IpAddr) -> bool {
        self.active_singles.contains(&ip) || self.active_prefixes.holder(ip).is_some()
    }

    /// The entries in rotation (what the table should hold).
    pub fn active(&self) -> &[Segment] {
        &self.active
    }

    /// The active entries' rotations (see [`rotor_protocol::Rotations`]).
    pub fn rotations(&self) -> &rotor_protocol::Rotations {
        &self.rotations
    }

    /// Whether the table still holds what was published, open: whoever can
    /// write its file can change it (an address rewritten, the closed bit
    /// set). `None` if it is as it should be, else what is wrong.
    pub fn table_fault(&mut self) -> Option<String> {
        let fault = self.table.fault(&self.active, self.generation);
        if fault.is_none() {
            let sound = (self.table.position(), self.table.reloads());
            // The sequence only counts up, by what leases there were
            // since the last check (a second or so, never a billion).
            if let Some((was, _)) = &self.last_sound {
                let step = sound.0.seq.wrapping_sub(was.seq);
                if step > MOST_LEASES_A_CHECK {
                    return Some(format!(
                        "its lease sequence went from {} to {}",
                        was.seq, sound.0.seq
                    ));
                }
            }
            // Not if the file was cut while read.
            if !self.table.is_broken() {
                self.last_sound = Some(sound);
            }
        }
        fault
    }

    /// Closes the table (before a new one takes its place) and returns its
    /// final rotation; for a table whose file was cut short, or one found
    /// tampered with (not `trusted`: its sequence and cursors are anyone's
    /// words too, and a sequence written there had gone on into the new
    /// table, `rotor_leases_total` and the saved state), the rotation of
    /// its last sound check (at most a second of leases back). A cut-short
    /// one's file is cut to nothing so every process still mapping it
    /// moves on.
    fn close_table(&self, trusted: bool) -> Carried {
        let last = self.table.close();
        let cut_short = self.table.is_cut_short();
        if trusted && !cut_short {
            return Carried {
                seq: last.seq,
                reloads: self.table.reloads(),
                next_due: Family::ALL.map(|f| last.next_due(f)),
                cursors: last.cursors,
                broken: false,
            };
        }
        if cut_short {
            self.table.condemn();
        }
        let Some((p, reloads)) = self.last_sound else {
            return Carried {
                broken: true,
                ..Carried::default()
            };
        };
        Carried {
            seq: p.seq,
            reloads,
            next_due: p.next_due,
            // Cursors count through the pool of their generation.
            cursors: match p.generation == self.generation {
                true => p.cursors,
                false => [0, 0],
            },
            broken: true,
        }
    }

    /// A new table with the pool, in place of one that was tampered with
    /// (not `trusted`) or whose file was removed: the rotation continues
    /// from the old one's cursors where they are still sane (see
    /// `close_table`); the old one is closed, so workers attach to the new
    /// one.
    pub fn rebuild_table(&mut self, trusted: bool) -> Result<(), TableError> {
        let table = new_table(self.home.as_ref(), self.active.len() * 2, 0)?;
        let last = self.close_table(trusted);
        table.set_seq(last.seq);
        table.set_reloads(last.reloads);
        let counts: Vec<u64> = vec![0; self.active.len()];
        let active = self.active.clone();
        // From the old one's cursors (a cursor of an older generation's
        // pool reads as 0: the rotation would start over).
        table.publish(&active, &counts, self.generation, |f, _, _| {
            continue_at(
                &active,
                f,
                last.next_due[f.index()],
                last.cursors[f.index()],
            )
        })?;
        self.table = Arc::new(table);
        Ok(())
    }

    /// Each family's rotation continues at the address saved earlier
    /// (`None`: none), if it is in the rotation, from the next publish
    /// with addresses of that family.
    pub fn resume_from(&mut self, next_due: [Option<IpAddr>; 2]) {
        self.resume = next_due;
    }

    /// By family, whether a saved address was used up by a publish since
    /// the last call, and was in the rotation (`None`: none used up).
    pub fn take_resumed(&mut self) -> [Option<bool>; 2] {
        std::mem::take(&mut self.resumed)
    }

    /// The address the next lease of `family` would return.
    #[cfg(test)]
    fn next_due(&self, family: Family) -> Option<IpAddr> {
        self.table.position().next_due[family.index()]
    }
}

/// The prefixes among `entries`.
fn prefix_set(entries: &[Segment]) -> PrefixSet {
    let mut set = PrefixSet::default();
    for e in entries.iter().filter(|e| !e.is_single()) {
        set.insert(*e);
    }
    set
}

/// Where `family`'s rotation over `active` continues: at the address
/// due next, if it is still there; else at the same place (`at`), which
/// past the end means the first address.
fn continue_at(active: &[Segment], family: Family, due: Option<IpAddr>, at: u64) -> u64 {
    match due.and_then(|ip| index_of(active, ip)) {
        Some(i) => i,
        None if at < family_total(active, family) => at,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rotor_protocol::NoAddress;

    fn ips(list: &[&str]) -> Vec<Segment> {
        list.iter()
            .map(|s| Segment::single(s.parse().unwrap()))
            .collect()
    }

    fn one(s: &str) -> Segment {
        Segment::single(s.parse().unwrap())
    }

    fn take(pool: &Pool, n: usize, families: Families) -> Vec<String> {
        (0..n)
            .map(|_| pool.lease(families).unwrap().unwrap().ip.to_string())
            .collect()
    }

    const V4: Families = Families::V4;
    const V6: Families = Families::V6;

    #[test]
    fn rotates_and_wraps_around() {
        let pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        assert_eq!(
            take(&pool, 6, Families::ANY),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.2"]
        );
        let counts: Vec<u64> = pool.lease_counts().map(|(_, n)| n).collect();
        assert_eq!(counts, [2, 2, 1, 1]);
    }

    #[test]
    fn single_address_pool_always_returns_it() {
        let pool = Pool::new(ips(&["10.0.0.1"]));
        assert_eq!(take(&pool, 3, Families::ANY), ["10.0.0.1"; 3]);
    }

    #[test]
    fn empty_pool_is_an_error() {
        let pool = Pool::new(vec![]);
        assert_eq!(
            pool.lease(Families::ANY).map(|r| r.map_err(|e| e.reason)),
            Some(Err(NoAddress::EmptyPool))
        );
        assert_eq!(pool.generation(), 1);
    }

    /// A new pool (a reload, a grown or rebuilt table) continues at the
    /// address due next, else at the same place, else at the start.
    #[test]
    fn the_rotation_continues_where_it_can() {
        let one = |i: u8| Segment::single(IpAddr::from([10, 0, 0, i]));
        let active = [one(1), one(2), one(3)];
        let due = Some(IpAddr::from([10, 0, 0, 3]));
        assert_eq!(continue_at(&active, Family::V4, due, 0), 2);
        let gone = Some(IpAddr::from([10, 0, 0, 9]));
        assert_eq!(continue_at(&active, Family::V4, gone, 1), 1);
        assert_eq!(continue_at(&active, Family::V4, gone, 3), 0);
        assert_eq!(continue_at(&active, Family::V4, None, 7), 0);
        assert_eq!(continue_at(&active, Family::V6, None, 0), 0);
    }

    #[test]
    fn each_family_rotates_on_its_own_cursor() {
        let pool = Pool::new(ips(&["10.0.0.1", "2001:db8::1", "10.0.0.2", "2001:db8::2"]));
        assert_eq!(take(&pool, 1, V6), ["2001:db8::1"]);
        assert_eq!(take(&pool, 3, V4), ["10.0.0.1", "10.0.0.2", "10.0.0.1"]);
        assert_eq!(take(&pool, 1, V6), ["2001:db8::2"]);
        // Both acceptable: IPv4 first.
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.2", "10.0.0.1"]);
    }

    /// The entry of an address: its single, in the rotation or out, or
    /// the prefix holding it, in or out; none for an address gone.
    #[test]
    fn the_entry_of_an_address_in_or_out_of_the_rotation() {
        let v6: Segment = "2001:db8::/64".parse().unwrap();
        let v6b: Segment = "2001:db8:1::/64".parse().unwrap();
        let mut entries = ips(&["10.0.0.1", "10.0.0.2"]);
        entries.extend([v6, v6b]);
        let mut pool = Pool::new(entries);
        pool.set_quarantined(&[one("10.0.0.2"), v6b], true).unwrap();
        let of = |pool: &Pool, s: &str| pool.entry_of(s.parse().unwrap());
        assert_eq!(of(&pool, "10.0.0.1"), Some(one("10.0.0.1")));
        assert_eq!(
            of(&pool, "10.0.0.2"),
            Some(one("10.0.0.2")),
            "out of the rotation"
        );
        assert_eq!(of(&pool, "2001:db8::7"), Some(v6));
        assert_eq!(of(&pool, "2001:db8:1::7"), Some(v6b), "out of the rotation");
        assert_eq!(of(&pool, "10.0.0.3"), None);
        assert_eq!(of(&pool, "2001:db8:2::1"), None);
        pool.replace(ips(&["10.0.0.1"])).unwrap();
        assert_eq!(of(&pool, "10.0.0.2"), None, "gone from the pool");
        assert_eq!(of(&pool, "2001:db8::7"), None, "gone from the pool");
    }

    /// A prefix the rotation leaves (another entry quarantined or put
    /// back, a refresh) goes on where it left off when the rotation comes
    /// back to it: it started over at its first, and one that flapped
    /// leased the same few addresses each time (review).
    #[test]
    fn a_prefix_goes_on_where_it_left_off_when_the_rotation_comes_back() {
        let p64: Segment = "2001:db8:77::/64".parse().unwrap();
        let p48: Segment = "2001:db8:48::/48".parse().unwrap();
        let mut pool = Pool::new(vec![p64, p48]);
        let walk = |e: Segment, from: u128, n: u128| -> Vec<String> {
            (from..from + n).map(|k| e.at(k).to_string()).collect()
        };
        // The /48 is behind the /64 (a family's cursor counts 2^44 at most).
        assert_eq!(take(&pool, 2, V6), walk(p64, 0, 2));
        pool.set_quarantined(&[p64], true).unwrap();
        assert_eq!(take(&pool, 3, V6), walk(p48, 0, 3));
        pool.set_quarantined(&[p64], false).unwrap();
        assert_eq!(take(&pool, 2, V6), walk(p64, 2, 2), "the /64 goes on");
        pool.set_quarantined(&[p64], true).unwrap();
        assert_eq!(take(&pool, 3, V6), walk(p48, 3, 3), "the /48 goes on");
        // A refresh that lists only the /48, then a /64 before it, then
        // the /48 alone again: the /48 goes on where it left off.
        pool.replace(vec![p48]).unwrap();
        assert_eq!(take(&pool, 1, V6), walk(p48, 6, 1));
        assert!(
            !pool.places.contains_key(&p64),
            "gone from the pool: forgotten"
        );
        pool.replace(vec![p64, p48]).unwrap();
        assert!(take(&pool, 1, V6)[0].starts_with("2001:db8:77:"));
        pool.replace(vec![p48]).unwrap();
        assert_eq!(take(&pool, 1, V6), walk(p48, 7, 1));
    }

    /// The common case: a prefix and an address beside it (the prefix
    /// small enough for the cursor to reach the address). Put back, the
    /// prefix goes on where it left off at once: the address due next had
    /// been served, then the prefix from its first, again (code review).
    #[test]
    fn a_prefix_put_back_beside_an_address_goes_on_where_it_left_off() {
        let p: Segment = "2001:db8:70::/108".parse().unwrap();
        let a = one("2001:db8:99::1");
        let mut pool = Pool::new(vec![p, a]);
        let walk = |from: u128, n: u128| -> Vec<String> {
            (from..from + n).map(|k| p.at(k).to_string()).collect()
        };
        for round in 0..3u128 {
            assert_eq!(take(&pool, 4, V6), walk(round * 4, 4), "round {round}");
            pool.set_quarantined(&[p], true).unwrap();
            assert_eq!(take(&pool, 1, V6), ["2001:db8:99::1"]);
            pool.set_quarantined(&[p], false).unwrap();
        }
    }

    #[test]
    fn quarantined_entries_leave_the_rotation_and_come_back() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
        assert_eq!(take(&pool, 2, V4), ["10.0.0.1", "10.0.0.2"]);
        assert!(pool.set_quarantined(&[one("10.0.0.2")], true).unwrap());
        assert!(!pool.set_quarantined(&[one("10.0.0.2")], true).unwrap());
        assert_eq!(take(&pool, 3, V4), ["10.0.0.3", "10.0.0.1", "10.0.0.3"]);
        assert_eq!(pool.len(), 3, "still listed");
        assert!(pool.is_quarantined(&one("10.0.0.2")));
        // A refresh keeps it out while it is listed.
        pool.replace(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]))
            .unwrap();
        assert_eq!(take(&pool, 3, V4), ["10.0.0.1", "10.0.0.3", "10.0.0.4"]);
        // Its count is kept while it is out, and goes on once it is back.
        assert_eq!(pool.parked_leases(&one("10.0.0.2")), Some(1));
        assert!(pool.set_quarantined(&[one("10.0.0.2")], false).unwrap());
        assert_eq!(pool.parked_leases(&one("10.0.0.2")), None);
        assert_eq!(take(&pool, 2, V4), ["10.0.0.1", "10.0.0.2"]);
        let counts: HashMap<Segment, u64> = pool.lease_counts().collect();
        assert_eq!(counts[&one("10.0.0.2")], 2);
        // Every address out: a refusal, as for an empty family.
        pool.set_quarantined(pool.addrs().to_vec().as_slice(), true)
            .unwrap();
        assert!(matches!(pool.lease(V4), Some(Err(_))));
    }

    #[test]
    fn missing_family_is_an_error_never_a_fallback() {
        let pool = Pool::new(ips(&["10.0.0.1"]));
        assert_eq!(
            pool.lease(V6).map(|r| r.map_err(|e| e.reason)),
            Some(Err(NoAddress::NoFamily { wanted: V6 }))
        );
        // The failed lease did not move the rotation.
        assert_eq!(take(&pool, 1, V4), ["10.0.0.1"]);
    }

    #[test]
    fn duplicates_are_removed_keeping_first_position() {
        let pool = Pool::new(ips(&["10.0.0.2", "10.0.0.1", "10.0.0.2"]));
        assert_eq!(pool.addrs(), ips(&["10.0.0.2", "10.0.0.1"]));
    }

    #[test]
    fn replacement_continues_from_the_address_due_next() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&pool, 2, Families::ANY); // next due: .3
        assert!(pool
            .replace(ips(&["10.0.0.9", "10.0.0.3", "10.0.0.4", "10.0.0.1"]))
            .unwrap());
        assert_eq!(pool.generation(), 2);
        assert_eq!(
            take(&pool, 5, Families::ANY),
            ["10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.9", "10.0.0.3"]
        );
        // Counts follow their address across the swap.
        let counts: HashMap<Segment, u64> = pool.lease_counts().collect();
        assert_eq!(counts[&one("10.0.0.1")], 2);
        assert_eq!(counts[&one("10.0.0.9")], 1);
    }

    #[test]
    fn replacement_without_the_next_address_keeps_position_or_wraps() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&pool, 1, Families::ANY); // next due: .2 at index 1
        pool.replace(ips(&["10.0.0.5", "10.0.0.6", "10.0.0.7"]))
            .unwrap();
        assert_eq!(take(&pool, 1, Families::ANY), ["10.0.0.6"]);

        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&pool, 3, Families::ANY); // next due: .4 at index 3
        pool.replace(ips(&["10.0.0.5", "10.0.0.6"])).unwrap();
        assert_eq!(take(&pool, 1, Families::ANY), ["10.0.0.5"]);
    }

    /// The address due next gone: the rotation goes on at the next old
    /// entry still listed, wherever the new list has it, so no address is
    /// leased twice running and none waits a turn (it went on at the old
    /// index: B again, or D skipped).
    #[test]
    fn replacement_without_the_next_address_goes_on_at_the_next_kept_one() {
        let abcd = || ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        let mut pool = Pool::new(abcd());
        take(&pool, 2, Families::ANY); // next due: .3
        pool.replace(ips(&["10.0.0.9", "10.0.0.1", "10.0.0.2", "10.0.0.4"]))
            .unwrap();
        assert_eq!(
            take(&pool, 4, Families::ANY),
            ["10.0.0.4", "10.0.0.9", "10.0.0.1", "10.0.0.2"]
        );

        let mut pool = Pool::new(abcd());
        take(&pool, 2, Families::ANY);
        pool.replace(ips(&["10.0.0.1", "10.0.0.4"])).unwrap();
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.4", "10.0.0.1"]);

        // The next kept one is the one leased last: passed over, unless it
        // is all there is.
        let mut pool = Pool::new(abcd());
        take(&pool, 2, Families::ANY); // .2 last, .3 due
        pool.replace(ips(&["10.0.0.2", "10.0.0.9"])).unwrap();
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.9", "10.0.0.2"]);
        let mut pool = Pool::new(abcd());
        take(&pool, 2, Families::ANY);
        pool.replace(ips(&["10.0.0.2"])).unwrap();
        assert_eq!(take(&pool, 1, Families::ANY), ["10.0.0.2"]);

        // Wrapping around the old list: .4 due and gone, .1 next.
        let mut pool = Pool::new(abcd());
        take(&pool, 3, Families::ANY);
        pool.replace(ips(&["10.0.0.9", "10.0.0.2", "10.0.0.1"]))
            .unwrap();
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.1", "10.0.0.9"]);

        // A prefix and the other family between: skipped over, kept.
        let prefix = Segment::prefix("2001:db8::".parse().unwrap(), 126).unwrap();
        let mut list = abcd();
        list.insert(2, prefix);
        let mut pool = Pool::new(list);
        take(&pool, 2, Families::V4); // next due: .3
        let mut list = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        list.insert(0, prefix);
        pool.replace(list).unwrap();
        assert_eq!(take(&pool, 2, Families::V4), ["10.0.0.4", "10.0.0.1"]);
        assert_eq!(take(&pool, 4, Families::V6).len(), 4);
    }

    #[test]
    fn identical_replacement_changes_nothing() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2"]));
        take(&pool, 1, Families::ANY);
        assert!(!pool.replace(ips(&["10.0.0.1", "10.0.0.2"])).unwrap());
        assert_eq!(pool.generation(), 1);
        assert_eq!(take(&pool, 1, Families::ANY), ["10.0.0.2"]);
    }

    #[test]
    fn emptied_pool_then_refilled() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2"]));
        take(&pool, 1, Families::ANY);
        pool.replace(vec![]).unwrap();
        assert_eq!(
            pool.lease(Families::ANY).map(|r| r.map_err(|e| e.reason)),
            Some(Err(NoAddress::EmptyPool))
        );
        pool.replace(ips(&["10.0.0.3"])).unwrap();
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.3", "10.0.0.3"]);
    }

    #[test]
    fn entries_a_larger_entry_holds_are_dropped() {
        let prefix = |s: &str, len| Segment::prefix(s.parse().unwrap(), len).unwrap();
        let single = |s: &str| Segment::single(s.parse().unwrap());
        let list = vec![
            prefix("2001:db8:1::", 64),
            single("2001:db8:1::5"),
            prefix("2001:db8:1::", 112),
            single("2001:db8:2::5"),
            single("10.0.0.1"),
            prefix("2001:db8::", 32),
            prefix("10.0.0.0", 8),
            single("11.0.0.1"),
        ];
        let none = HashSet::new();
        let out = HashSet::from([prefix("2001:db8::", 32)]);
        assert_eq!(
            without_covered(list.clone(), &out),
            [
                prefix("2001:db8:1::", 64),
                single("2001:db8:2::5"),
                single("10.0.0.1"),
                prefix("2001:db8::", 32),
                prefix("10.0.0.0", 8),
                single("11.0.0.1"),
            ]
            .into_iter()
            .filter(|e| *e != single("10.0.0.1"))
            .collect::<Vec<_>>(),
            "a quarantined /32 covers nothing"
        );
        assert_eq!(
            without_covered(list, &none),
            [
                prefix("2001:db8::", 32),
                prefix("10.0.0.0", 8),
                single("11.0.0.1")
            ]
        );
        let mut pool = Pool::new(vec![prefix("2001:db8:1::", 64), single("2001:db8:1::9")]);
        assert_eq!(pool.addrs(), [prefix("2001:db8:1::", 64)]);
        assert!(
            !pool.replace(vec![prefix("2001:db8:1::", 64)]).unwrap(),
            "no change"
        );
    }

    /// A family emptied for a while (a source read empty once) continues
    /// where it was when its addresses come back, not at the first.
    #[test]
    fn an_emptied_family_continues_where_it_was_when_refilled() {
        let three = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "2001:db8::1"]);
        let mut pool = Pool::new(three.clone());
        take(&pool, 2, Families::V4);
        pool.replace(ips(&["2001:db8::1"])).unwrap();
        assert_eq!(
            pool.held_due()[Family::V4.index()],
            Some("10.0.0.3".parse().unwrap())
        );
        assert!(!pool.has_family(Family::V4));
        pool.replace(ips(&["2001:db8::1"])).unwrap();
        pool.replace(three).unwrap();
        assert_eq!(pool.held_due(), [None, None]);
        assert_eq!(take(&pool, 2, Families::V4), ["10.0.0.3", "10.0.0.1"]);
    }

    /// A saved address is where the family's rotation starts, set in
    /// the publish that first brings the family (a later cursor set would
    /// rewind leases taken meanwhile); one no longer listed is said so.
    #[test]
    fn resume_at_a_saved_address() {
        let three = || ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let mut pool = Pool::new(ips(&["2001:db8::1"]));
        pool.resume_from([Some("10.0.0.3".parse().unwrap()), None]);
        pool.replace(ips(&["2001:db8::2"])).unwrap();
        assert_eq!(pool.take_resumed(), [None, None], "no IPv4 yet: kept");
        pool.replace(three()).unwrap();
        assert_eq!(pool.take_resumed(), [Some(true), None]);
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.3", "10.0.0.1"]);
        // Used up: a later publish continues where the rotation is.
        pool.replace(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]))
            .unwrap();
        assert_eq!(pool.next_due(Family::V4), Some("10.0.0.2".parse().unwrap()));
        let mut other = Pool::new(Vec::new());
        other.resume_from([Some("10.9.9.9".parse().unwrap()), None]);
        other.replace(three()).unwrap();
        assert_eq!(other.take_resumed(), [Some(false), None]);
        assert_eq!(
            other.next_due(Family::V4),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn a_pool_too_big_for_its_table_moves_to_a_bigger_one_without_a_skip() {
        let small: Vec<Segment> = (1..=3)
            .map(|i| Segment::single(IpAddr::from([10, 0, 0, i])))
            .collect();
        let mut pool = Pool::new(small.clone());
        take(&pool, 2, Families::ANY); // next due: 10.0.0.3
        let old = pool.table().clone();
        let big: Vec<Segment> = (0..1000u32)
            .map(|i| Segment::single(std::net::Ipv4Addr::from((10u32 << 24) + 1 + i).into()))
            .collect();
        assert!(pool.replace(big).unwrap());
        assert!(old.is_closed() && !Arc::ptr_eq(&old, pool.table()));
        assert_eq!(take(&pool, 2, Families::ANY), ["10.0.0.3", "10.0.0.4"]);
        let snap = pool.snapshot();
        assert_eq!((snap.seq, snap.pool.len()), (4, 1000));
        assert_eq!(snap.pool[0].1, 1, "counts carried over");
    }
}
