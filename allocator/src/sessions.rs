//! Sticky sessions: the address a session (a user's session id) was given,
//! kept for the session's lifetime, the same for every worker and across
//! worker restarts (the allocator holds the table).
//!
//! A session lasts `ttl` from its first lease (not renewed by use). The
//! table is bounded: past `max` sessions the oldest goes first; expired
//! ones are dropped every second.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use rotor_protocol::Family;

/// One session: its address per family (a session may reach destinations
/// of both), and its lifetime.
#[derive(Debug, Clone)]
struct Session {
    ips: [Option<IpAddr>; 2],
    created: Instant,
    expires: Instant,
    strict: bool,
}

#[derive(Debug)]
pub struct Sessions {
    map: HashMap<String, Session>,
    /// Keys by creation, oldest first, for eviction past `max` (entries
    /// whose session is gone or newer are skipped when met).
    order: VecDeque<(Instant, String)>,
    max: usize,
    /// Strict sessions evicted before their end, until then: they fail
    /// (as their address gone) rather than quietly take another address.
    /// Bounded like the table.
    evicted_strict: HashMap<String, Instant>,
}

/// What a session says of a lease of `family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// Its address, still good.
    Address(IpAddr),
    /// None yet (new session, or none of this family).
    Nothing,
    /// It had one, which `good` refused (left the pool, or quarantined).
    Gone(IpAddr),
    /// A strict session evicted (the table was full) before its end.
    Evicted,
}

impl Sessions {
    pub fn new(max: usize) -> Sessions {
        Sessions {
            map: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
            evicted_strict: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The address session `key` holds for `family`, checked by `good`.
    pub fn pinned(
        &mut self,
        key: &str,
        family: Family,
        now: Instant,
        good: impl Fn(IpAddr) -> bool,
    ) -> Pinned {
        match self.map.get(key) {
            Some(s) if s.expires <= now => {
                self.map.remove(key);
                Pinned::Nothing
            }
            Some(s) => match s.ips[family.index()] {
                Some(ip) if good(ip) => Pinned::Address(ip),
                Some(ip) => Pinned::Gone(ip),
                None => Pinned::Nothing,
            },
            None if self
                .evicted_strict
                .get(key)
                .is_some_and(|until| *until > now) =>
            {
                Pinned::Evicted
            }
            None => Pinned::Nothing,
        }
    }

    /// Pins `ip` for session `key` (created now, lasting `ttl`, if new).
    pub fn pin(&mut self, key: &str, ip: IpAddr, ttl: Duration, strict: bool, now: Instant) {
        let family = Family::of(&ip);
        if let Some(s) = self.map.get_mut(key) {
            s.ips[family.index()] = Some(ip);
            return;
        }
        while self.map.len() >= self.max {
            let Some((created, old)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|s| s.created == created) {
                if let Some(s) = self
                    .map
                    .remove(&old)
                    .filter(|s| s.strict && s.expires > now)
                {
                    if self.evicted_strict.len() >= self.max {
                        self.evicted_strict.retain(|_, until| *until > now);
                    }
                    if self.evicted_strict.len() < self.max {
                        self.evicted_strict.insert(old, s.expires);
                    }
                }
            }
        }
        let mut ips = [None, None];
        ips[family.index()] = Some(ip);
        self.map.insert(
            key.to_string(),
            Session {
                ips,
                created: now,
                expires: now + ttl,
                strict,
            },
        );
        self.order.push_back((now, key.to_string()));
    }

    /// Drops the expired sessions (and what the order no longer needs).
    pub fn expire(&mut self, now: Instant) {
        self.map.retain(|_, s| s.expires > now);
        self.evicted_strict.retain(|_, until| *until > now);
        let map = &self.map;
        self.order
            .retain(|(created, key)| map.get(key).is_some_and(|s| s.created == *created));
    }

    /// Sessions pinned to each address (one pass over the table).
    pub fn by_address(&self) -> std::collections::HashMap<IpAddr, u64> {
        let mut out = std::collections::HashMap::new();
        for s in self.map.values() {
            for ip in s.ips.iter().flatten() {
                *out.entry(*ip).or_default() += 1;
            }
        }
        out
    }

    /// Sessions pinned to `ip`.
    pub fn on(&self, ip: IpAddr) -> usize {
        self.map
            .values()
            .filter(|s| s.ips.contains(&Some(ip)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn pins_expire_move_and_are_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut s = Sessions::new(2);
        let all_good = |_| true;
        assert_eq!(s.pinned("a", Family::V4, t0, all_good), Pinned::Nothing);
        s.pin("a", ip("10.0.0.1"), ttl, false, t0);
        assert_eq!(
            s.pinned("a", Family::V4, t0, all_good),
            Pinned::Address(ip("10.0.0.1"))
        );
        assert_eq!(s.pinned("a", Family::V6, t0, all_good), Pinned::Nothing);
        // The address left: said so, and a new pin keeps the lifetime.
        let gone = |a| a != ip("10.0.0.1");
        assert_eq!(
            s.pinned("a", Family::V4, t0, gone),
            Pinned::Gone(ip("10.0.0.1"))
        );
        s.pin(
            "a",
            ip("10.0.0.2"),
            Duration::from_secs(1000),
            false,
            t0 + ttl / 2,
        );
        assert_eq!(
            s.pinned("a", Family::V4, t0 + ttl / 2, all_good),
            Pinned::Address(ip("10.0.0.2"))
        );
        assert_eq!(
            s.pinned("a", Family::V4, t0 + ttl, all_good),
            Pinned::Nothing,
            "fixed from the first lease"
        );
        // Bounded: the oldest goes first.
        s.pin("b", ip("10.0.0.3"), ttl, false, t0 + Duration::from_secs(1));
        s.pin("c", ip("10.0.0.4"), ttl, false, t0 + Duration::from_secs(2));
        s.pin("d", ip("10.0.0.5"), ttl, false, t0 + Duration::from_secs(3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.pinned("b", Family::V4, t0, all_good), Pinned::Nothing);
        assert_eq!(s.on(ip("10.0.0.5")), 1);
        s.expire(t0 + Duration::from_secs(100));
        assert!(s.is_empty() && s.order.is_empty());
        // A strict session pushed out early says so, until its end.
        let mut s = Sessions::new(1);
        s.pin("strict", ip("10.0.0.1"), ttl, true, t0);
        s.pin("other", ip("10.0.0.2"), ttl, false, t0);
        assert_eq!(
            s.pinned("strict", Family::V4, t0, all_good),
            Pinned::Evicted
        );
        assert_eq!(
            s.pinned("strict", Family::V4, t0 + ttl, all_good),
            Pinned::Nothing
        );
    }
}
