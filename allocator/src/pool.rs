//! The pool and its rotation cursor: pure logic, no I/O.
//!
//! Pool `[A B C D]`: leases return A B C D A B … A lease asks for a set of
//! address families; the next address of an acceptable family is returned and
//! the cursor moves past it. Replacing the pool keeps the rotation going from
//! the address that was due next, when it is still in the pool.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use rotor_protocol::{Families, NoAddress};

#[derive(Debug, Default)]
pub struct Pool {
    addrs: Vec<IpAddr>,
    /// Leases handed out per address, parallel to `addrs`.
    leases: Vec<u64>,
    /// Index of the next address to consider.
    cursor: usize,
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leased {
    pub ip: IpAddr,
    pub generation: u64,
}

impl Pool {
    pub fn new(addrs: Vec<IpAddr>) -> Pool {
        let mut pool = Pool::default();
        pool.replace(addrs);
        pool
    }

    /// An empty pool whose generations continue from `generation` (the one
    /// a previous allocator reached).
    pub fn continuing(generation: u64) -> Pool {
        Pool {
            generation,
            ..Pool::default()
        }
    }

    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    pub fn lease_counts(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.addrs.iter().copied().zip(self.leases.iter().copied())
    }

    pub fn cursor(&self) -> usize {
        self.cursor
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

    /// The next address of an acceptable family; advances the cursor past it.
    pub fn lease(&mut self, families: Families) -> Result<Leased, NoAddress> {
        if self.addrs.is_empty() {
            return Err(NoAddress::EmptyPool);
        }
        let n = self.addrs.len();
        for step in 0..n {
            let i = (self.cursor + step) % n;
            if families.accepts(&self.addrs[i]) {
                self.cursor = (i + 1) % n;
                self.leases[i] += 1;
                return Ok(Leased {
                    ip: self.addrs[i],
                    generation: self.generation,
                });
            }
        }
        Err(NoAddress::NoFamily { wanted: families })
    }

    /// Swaps in a new address list (duplicates removed, first one kept).
    /// Returns whether anything changed; an identical list keeps the
    /// generation, the cursor and the counts as they are.
    pub fn replace(&mut self, addrs: Vec<IpAddr>) -> bool {
        let mut seen = HashSet::with_capacity(addrs.len());
        let addrs: Vec<IpAddr> = addrs.into_iter().filter(|a| seen.insert(*a)).collect();
        if addrs == self.addrs && self.generation != 0 {
            return false;
        }
        let old: HashMap<IpAddr, u64> = self.lease_counts().collect();
        let next_due = self.addrs.get(self.cursor).copied();
        self.cursor = match next_due.and_then(|ip| addrs.iter().position(|a| *a == ip)) {
            Some(i) => i,
            // The address due next is gone: stay at the same place in the
            // list, which past the end means the first address.
            None if self.cursor < addrs.len() => self.cursor,
            None => 0,
        };
        self.leases = addrs
            .iter()
            .map(|a| old.get(a).copied().unwrap_or(0))
            .collect();
        self.addrs = addrs;
        self.generation += 1;
        true
    }

    /// Restores the cursor to an address saved earlier, if it is in the pool.
    pub fn resume_at(&mut self, next_due: IpAddr) -> bool {
        match self.addrs.iter().position(|a| *a == next_due) {
            Some(i) => {
                self.cursor = i;
                true
            }
            None => false,
        }
    }

    /// The address the next unrestricted lease would return.
    pub fn next_due(&self) -> Option<IpAddr> {
        self.addrs.get(self.cursor).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn take(pool: &mut Pool, n: usize, families: Families) -> Vec<String> {
        (0..n)
            .map(|_| pool.lease(families).unwrap().ip.to_string())
            .collect()
    }

    const V4: Families = Families {
        v4: true,
        v6: false,
    };
    const V6: Families = Families {
        v4: false,
        v6: true,
    };

    #[test]
    fn rotates_and_wraps_around() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        assert_eq!(
            take(&mut pool, 6, Families::ANY),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.2"]
        );
        let counts: Vec<u64> = pool.lease_counts().map(|(_, n)| n).collect();
        assert_eq!(counts, [2, 2, 1, 1]);
    }

    #[test]
    fn single_address_pool_always_returns_it() {
        let mut pool = Pool::new(ips(&["10.0.0.1"]));
        assert_eq!(take(&mut pool, 3, Families::ANY), ["10.0.0.1"; 3]);
    }

    #[test]
    fn empty_pool_is_an_error() {
        let mut pool = Pool::new(vec![]);
        assert_eq!(pool.lease(Families::ANY), Err(NoAddress::EmptyPool));
        assert_eq!(pool.generation(), 1);
    }

    #[test]
    fn family_selection_skips_other_families_without_consuming_them() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "2001:db8::1", "10.0.0.2", "2001:db8::2"]));
        assert_eq!(take(&mut pool, 1, V6), ["2001:db8::1"]);
        assert_eq!(take(&mut pool, 3, V4), ["10.0.0.2", "10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            take(&mut pool, 2, Families::ANY),
            ["2001:db8::2", "10.0.0.1"]
        );
    }

    #[test]
    fn missing_family_is_an_error_never_a_fallback() {
        let mut pool = Pool::new(ips(&["10.0.0.1"]));
        assert_eq!(pool.lease(V6), Err(NoAddress::NoFamily { wanted: V6 }));
        // The failed lease did not move the rotation.
        assert_eq!(take(&mut pool, 1, V4), ["10.0.0.1"]);
    }

    #[test]
    fn duplicates_are_removed_keeping_first_position() {
        let pool = Pool::new(ips(&["10.0.0.2", "10.0.0.1", "10.0.0.2"]));
        assert_eq!(pool.addrs(), ips(&["10.0.0.2", "10.0.0.1"]));
    }

    #[test]
    fn replacement_continues_from_the_address_due_next() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&mut pool, 2, Families::ANY); // next due: .3
        assert!(pool.replace(ips(&["10.0.0.9", "10.0.0.3", "10.0.0.4", "10.0.0.1"])));
        assert_eq!(pool.generation(), 2);
        assert_eq!(
            take(&mut pool, 5, Families::ANY),
            ["10.0.0.3", "10.0.0.4", "10.0.0.1", "10.0.0.9", "10.0.0.3"]
        );
        // Counts follow their address across the swap.
        let counts: HashMap<IpAddr, u64> = pool.lease_counts().collect();
        assert_eq!(counts[&"10.0.0.1".parse().unwrap()], 2);
        assert_eq!(counts[&"10.0.0.9".parse().unwrap()], 1);
    }

    #[test]
    fn replacement_without_the_next_address_keeps_position_or_wraps() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&mut pool, 1, Families::ANY); // next due: .2 at index 1
        pool.replace(ips(&["10.0.0.5", "10.0.0.6", "10.0.0.7"]));
        assert_eq!(take(&mut pool, 1, Families::ANY), ["10.0.0.6"]);

        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]));
        take(&mut pool, 3, Families::ANY); // next due: .4 at index 3
        pool.replace(ips(&["10.0.0.5", "10.0.0.6"]));
        assert_eq!(take(&mut pool, 1, Families::ANY), ["10.0.0.5"]);
    }

    #[test]
    fn identical_replacement_changes_nothing() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2"]));
        take(&mut pool, 1, Families::ANY);
        assert!(!pool.replace(ips(&["10.0.0.1", "10.0.0.2"])));
        assert_eq!(pool.generation(), 1);
        assert_eq!(take(&mut pool, 1, Families::ANY), ["10.0.0.2"]);
    }

    #[test]
    fn emptied_pool_then_refilled() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2"]));
        take(&mut pool, 1, Families::ANY);
        pool.replace(vec![]);
        assert_eq!(pool.lease(Families::ANY), Err(NoAddress::EmptyPool));
        pool.replace(ips(&["10.0.0.3"]));
        assert_eq!(take(&mut pool, 2, Families::ANY), ["10.0.0.3", "10.0.0.3"]);
    }

    #[test]
    fn resume_at_a_saved_address() {
        let mut pool = Pool::new(ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
        assert!(pool.resume_at("10.0.0.3".parse().unwrap()));
        assert_eq!(take(&mut pool, 2, Families::ANY), ["10.0.0.3", "10.0.0.1"]);
        assert!(!pool.resume_at("10.9.9.9".parse().unwrap()));
        assert_eq!(pool.next_due(), Some("10.0.0.2".parse().unwrap()));
    }
}
