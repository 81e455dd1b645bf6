//! Which failed connects were the source's fault: a connect from one pool
//! address that failed to a destination answering the others. Such a
//! failure is *confirmed* when the destination answered another source
//! within [`NEAR`] before it and again within [`NEAR`] after it. A
//! destination that is down fails every source alike and confirms none
//! (nothing answers after the failures, or, once it is back, nothing had
//! answered just before them); a user asking a closed port again and again
//! confirms none; a source the network no longer routes fails where the
//! others answer, and its failures are confirmed. The allocator is told of
//! confirmed failures only (`Request::Unreached`), for sources that got no
//! answer meanwhile, and takes an entry out of the rotation when its
//! connects keep failing so. It is told each confirmed (source, site) too
//! (`Request::SiteUnreached`), whatever the source answered elsewhere: a
//! site that drops or refuses one address has that address cooled for
//! it, as when it pushes back.
//!
//! A destination is watched from its first failed connect, for [`WATCH`]
//! after its last one ([`WATCH_DEAD`] if it never answered): answers to a
//! destination not watched are not looked at (one branch on an empty map,
//! under the meter's lock the answer takes anyway; a hash of its
//! authority while some are). Bounded: [`MAX_WATCHED`] destinations, each with its
//! last [`ANSWERS_KEPT`] answers and at most [`MAX_PENDING`] failures
//! waiting for the answer after.

use foldhash::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How close in time, before and after, another source's answer must be.
pub const NEAR: Duration = Duration::from_secs(2);
/// How long a destination that answered stays watched after its last
/// failed connect: an address out of a large pool fails to one
/// destination minutes apart, and must find it watched (its answers to
/// others seen) each time.
const WATCH: Duration = Duration::from_secs(300);
/// … and one that never answered (a dead site: a crawler meets many).
const WATCH_DEAD: Duration = Duration::from_secs(30);
/// Its answers kept, the latest last: whether another source was
/// answered just before a connect began, at any rate of answers.
const ANSWERS_KEPT: usize = 8;
/// Destinations watched at most (past it, room is made: see
/// [`Witness::make_room`]).
const MAX_WATCHED: usize = 4096;
/// Failures waiting for their answer after, per destination.
const MAX_PENDING: usize = 16;

/// A destination by its authority as the request named it (`host:port`,
/// case folded; one written two ways is two, which only confirms less):
/// hashed where the request is made, not parsed again for each answer.
pub fn dest_base(authority: &str) -> u64 {
    rotor_protocol::fnv1a(authority.bytes().map(|b| b.to_ascii_lowercase()))
}

/// … and the family it is reached over (an IPv4 source's answer says
/// nothing of an IPv6 source's route).
pub fn dest_key(base: u64, v4: bool) -> u64 {
    (base ^ u64::from(v4)).wrapping_mul(0x0000_0100_0000_01b3)
}

/// What failures to a destination count as toward the two destinations
/// or more the allocator asks for (see the module's doc): the network
/// (IPv4 /16, IPv6 /32) of the address connected to, `to`. One server's
/// several names are then one (a client naming its own server twice, as
/// two sites, took a pool address out for every user), and so are one
/// site's several addresses (round-robin DNS). Without an address of the
/// source's family, the host's: by its network if it is an address, else
/// its site (see `rotor_protocol::site_of`).
pub fn net_key(host: &str, to: Option<IpAddr>) -> u64 {
    let site = rotor_protocol::site_of(host);
    match to.or_else(|| site.parse::<IpAddr>().ok()) {
        Some(IpAddr::V4(a)) => {
            let [x, y, ..] = a.octets();
            rotor_protocol::fnv1a([4, x, y])
        }
        Some(IpAddr::V6(a)) => {
            // (An IPv4 address mapped into IPv6 is the IPv4 one's.)
            if let Some(v4) = a.to_ipv4_mapped() {
                return net_key(host, Some(IpAddr::V4(v4)));
            }
            let o = a.octets();
            rotor_protocol::fnv1a([6, o[0], o[1], o[2], o[3]])
        }
        None => rotor_protocol::fnv1a(site.bytes()),
    }
}

/// A source as destinations tell it: the address, or for IPv6 its /64
/// (an entry of many addresses answers from some while others are leased;
/// sites count IPv6 clients by their /64), as rotor counts its own clients.
pub fn source_net(ip: IpAddr) -> IpAddr {
    rotor_protocol::addr::client_key(ip)
}

fn same_source(a: IpAddr, b: IpAddr) -> bool {
    source_net(a) == source_net(b)
}

#[derive(Debug)]
struct Dest {
    /// When its answers last began again after a gap of more than
    /// [`NEAR`] (or at all).
    answering_since: Option<Instant>,
    /// Its last few answers, the latest last: when, and to which source.
    recent: std::collections::VecDeque<(Instant, IpAddr)>,
    /// Failures with an answer to another source just before, waiting
    /// for one just after: the source, and when the connect ended.
    pending: Vec<(IpAddr, Instant)>,
    /// Its network (`net_key`), and its site by name.
    site: (u64, Arc<str>),
    /// Its last failed connect (answers do not keep it watched).
    last: Instant,
}

/// A source's confirmed failures since the last take, and the networks
/// they were to (the first few, by `net_key`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Confirmed {
    pub failed: u64,
    pub destinations: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct Witness {
    watched: HashMap<u64, Dest>,
    confirmed: HashMap<IpAddr, Confirmed>,
    /// Each (source, site) of a confirmed failure since the last take: a
    /// source by [`source_net`] (the first address seen of it).
    refused: HashMap<(IpAddr, Arc<str>), IpAddr>,
}

impl Witness {
    /// A connect from `source` to `dest` (of `host`, at address `to`),
    /// begun at `started`, failed at `now`. It waits for an answer after only if the
    /// destination answered another source within [`NEAR`] before it
    /// began (a connect begun after that long a silence, timed out as the
    /// destination came back, began while it was down).
    pub fn failed(
        &mut self,
        source: IpAddr,
        (dest, host, to): (u64, &str, Option<IpAddr>),
        started: Instant,
        now: Instant,
    ) {
        if !self.watched.contains_key(&dest) && self.watched.len() >= MAX_WATCHED {
            self.make_room();
        }
        let d = self.watched.entry(dest).or_insert_with(|| Dest {
            answering_since: None,
            recent: std::collections::VecDeque::new(),
            pending: Vec::new(),
            site: (net_key(host, to), rotor_protocol::site_of(host).into()),
            last: now,
        });
        d.last = now;
        // It answered another source within [`NEAR`] before the connect
        // began (one of its last answers did; or, where more came since
        // than are kept, it has answered without a gap since before then).
        let other = |(t, ip): &(Instant, IpAddr)| !same_source(*ip, source) && *t <= started;
        let just_before = d.recent.iter().any(|a| other(a) && a.0 + NEAR >= started);
        let kept_since = d.recent.front().is_none_or(|(t, _)| *t > started);
        let throughout = kept_since
            && d.answering_since.is_some_and(|t| t <= started)
            && d.recent
                .back()
                .is_some_and(|(_, ip)| !same_source(*ip, source));
        if (just_before || throughout) && d.pending.len() < MAX_PENDING {
            d.pending.push((source, now));
        }
    }

    /// Room for destinations in a full map: the eighth least worth
    /// watching goes, those that never answered first (a dead site
    /// confirms nothing, and a crawler meets thousands; one client asking
    /// closed ports of one host makes as many), then those longest since a
    /// failed connect. (Past the cap, a new destination had not been
    /// watched: 800 dead ones a second kept a source that could connect
    /// nowhere in the rotation, its failures to live sites unseen.) A
    /// live destination new to the map answers within the time the next
    /// eighth takes to fill.
    fn make_room(&mut self) {
        let mut rank: Vec<(bool, Instant, u64)> = (self.watched.iter())
            .map(|(k, d)| (!d.recent.is_empty(), d.last, *k))
            .collect();
        let n = (MAX_WATCHED / 8).min(rank.len());
        if n == 0 {
            return;
        }
        rank.select_nth_unstable(n - 1);
        for (_, _, k) in &rank[..n] {
            self.watched.remove(k);
        }
    }

    /// The destination of authority `dest` (read only while some
    /// destination is watched) answered `source` now.
    pub fn answered_host<'a>(&mut self, source: IpAddr, dest: impl FnOnce() -> &'a str) {
        if !self.watched.is_empty() {
            let key = dest_key(dest_base(dest()), source.is_ipv4());
            self.answered(source, key, Instant::now());
        }
    }

    /// `dest` answered `source` at `now`.
    pub fn answered(&mut self, source: IpAddr, dest: u64, now: Instant) {
        let Some(d) = self.watched.get_mut(&dest) else {
            return;
        };
        let site = d.site.0;
        for (ip, at) in d.pending.drain(..) {
            // (Its own earlier failure is forgotten: it answers now.)
            if same_source(ip, source) || now.saturating_duration_since(at) > NEAR {
                continue;
            }
            let room = self.confirmed.len() < rotor_protocol::UNREACHED_LISTED
                || self.confirmed.contains_key(&ip);
            if room {
                let c = self.confirmed.entry(ip).or_default();
                c.failed += 1;
                if c.destinations.len() < rotor_protocol::UNREACHED_DESTINATIONS
                    && !c.destinations.contains(&site)
                {
                    c.destinations.push(site);
                }
            }
            if self.refused.len() < rotor_protocol::UNREACHED_LISTED {
                self.refused
                    .entry((source_net(ip), d.site.1.clone()))
                    .or_insert(ip);
            }
        }
        let gap = d
            .recent
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) > NEAR);
        if gap {
            d.answering_since = Some(now);
        }
        if d.recent.len() == ANSWERS_KEPT {
            d.recent.pop_front();
        }
        d.recent.push_back((now, source));
    }

    /// The confirmed failures since the last take, and forgets the
    /// destinations with no failed connect for [`WATCH`] ([`WATCH_DEAD`]
    /// if they never answered).
    pub fn take(&mut self, now: Instant) -> HashMap<IpAddr, Confirmed> {
        self.watched.retain(|_, d| {
            let keep = match d.recent.is_empty() {
                false => WATCH,
                true => WATCH_DEAD,
            };
            now.saturating_duration_since(d.last) < keep
        });
        std::mem::take(&mut self.confirmed)
    }

    /// A connect from `source` to `host` was made: a failure to its site
    /// confirmed since the last take is not told (a connect the allocator
    /// did not ask to hear of, on a lease from before the suspicion,
    /// would otherwise leave it standing). One branch while none is.
    pub fn connected(&mut self, source: IpAddr, host: &str) {
        if !self.refused.is_empty() {
            let site: Arc<str> = rotor_protocol::site_of(host).into();
            self.refused.remove(&(source_net(source), site));
        }
    }

    /// Each (source, site) of a failure confirmed since the last take.
    pub fn take_refused(&mut self) -> Vec<(IpAddr, Arc<str>)> {
        self.refused
            .drain()
            .map(|((_, site), ip)| (ip, site))
            .collect()
    }

    #[cfg(test)]
    fn watched(&self) -> usize {
        self.watched.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An immediate failure (refused, unreachable): begun and ended at
    /// `at`.
    fn fail(w: &mut Witness, source: IpAddr, d: u64, at: Instant) {
        w.failed(source, (d, "a.example", None), at, at);
    }

    #[test]
    fn a_failure_between_answers_to_others_is_confirmed() {
        let mut w = Witness::default();
        let t = Instant::now();
        let d = dest_key(dest_base("Example.COM:443"), true);
        assert_eq!(d, dest_key(dest_base("example.com:443"), true));
        assert_ne!(d, dest_key(dest_base("example.com:80"), true));
        assert_ne!(d, dest_key(dest_base("example.com:443"), false));
        // Not watched yet: the answer before is not seen.
        w.answered(ip("10.0.0.1"), d, t);
        fail(&mut w, ip("10.0.0.4"), d, t);
        w.answered(ip("10.0.0.2"), d, t + Duration::from_millis(10));
        assert!(w.take(t).is_empty());
        // Watched now: answered before and after.
        fail(&mut w, ip("10.0.0.4"), d, t + Duration::from_millis(20));
        w.answered(ip("10.0.0.3"), d, t + Duration::from_millis(30));
        fail(&mut w, ip("10.0.0.4"), d, t + Duration::from_millis(40));
        fail(&mut w, ip("10.0.0.5"), d, t + Duration::from_millis(41));
        w.answered(ip("10.0.0.1"), d, t + Duration::from_millis(50));
        let c = w.take(t + Duration::from_millis(60));
        assert_eq!(c[&ip("10.0.0.4")].failed, 2);
        assert_eq!(
            c[&ip("10.0.0.4")].destinations,
            [net_key("a.example", None)]
        );
        assert_eq!(c[&ip("10.0.0.5")].failed, 1);
        // Each source once for the site, by name; but for one that has
        // connected to it since.
        w.connected(ip("10.0.0.5"), "a.example");
        w.connected(ip("10.0.0.4"), "b.example");
        let site: Arc<str> = "a.example".into();
        assert_eq!(w.take_refused(), [(ip("10.0.0.4"), site)]);
        assert!(w.take_refused().is_empty());
    }

    /// Dead destinations past the cap make room for a live one (the dead
    /// first, the oldest of them): a source's failures to it are still
    /// confirmed. Before, a full map watched nothing new.
    #[test]
    fn dead_destinations_past_the_cap_leave_room_for_live_ones() {
        let mut w = Witness::default();
        let t = Instant::now();
        let live = dest_key(dest_base("live.example:80"), true);
        let kept = dest_key(dest_base("kept.example:80"), true);
        // A live destination watched early, answered since.
        fail(&mut w, ip("10.0.0.9"), kept, t);
        w.answered(ip("10.0.0.1"), kept, t);
        for i in 0..3 * MAX_WATCHED as u64 {
            let dead = dest_key(dest_base(&format!("dead.example:{i}")), true);
            fail(&mut w, ip("10.0.0.1"), dead, t + Duration::from_micros(i));
            assert!(w.watched() <= MAX_WATCHED);
        }
        let at = t + Duration::from_millis(100);
        fail(&mut w, ip("10.0.0.9"), live, at);
        w.answered(ip("10.0.0.1"), live, at);
        fail(&mut w, ip("10.0.0.9"), live, at + Duration::from_millis(10));
        w.answered(ip("10.0.0.2"), live, at + Duration::from_millis(20));
        // The one watched before them, too.
        w.answered(ip("10.0.0.1"), kept, at);
        fail(&mut w, ip("10.0.0.8"), kept, at + Duration::from_millis(30));
        w.answered(ip("10.0.0.2"), kept, at + Duration::from_millis(40));
        let c = w.take(at + Duration::from_millis(50));
        assert_eq!(c[&ip("10.0.0.9")].failed, 1, "{c:?}");
        assert_eq!(c[&ip("10.0.0.8")].failed, 1, "{c:?}");
    }

    #[test]
    fn a_destination_that_goes_down_confirms_nothing() {
        let mut w = Witness::default();
        let t = Instant::now();
        let d = dest_key(dest_base("down.example:80"), true);
        let other = dest_key(dest_base("up.example:80"), true);
        fail(&mut w, ip("10.0.0.1"), d, t);
        for i in 0..100u64 {
            let at = t + Duration::from_millis(100 * i);
            fail(&mut w, ip(&format!("10.0.0.{}", i % 4 + 1)), d, at);
            // Answers elsewhere say nothing of it.
            w.answered(ip(&format!("10.0.0.{}", (i + 1) % 4 + 1)), other, at);
        }
        // Back after 10 s: the failures had no answer just before them.
        w.answered(ip("10.0.0.2"), d, t + Duration::from_secs(10));
        w.answered(ip("10.0.0.3"), d, t + Duration::from_secs(10));
        assert!(w.take(t + Duration::from_secs(10)).is_empty());
        assert!(w.take_refused().is_empty());
    }

    #[test]
    fn answers_too_far_apart_confirm_nothing_and_quiet_ones_are_forgotten() {
        let mut w = Witness::default();
        let t = Instant::now();
        let d = dest_key(dest_base("a:80"), true);
        fail(&mut w, ip("10.0.0.4"), d, t);
        w.answered(ip("10.0.0.1"), d, t);
        fail(&mut w, ip("10.0.0.4"), d, t + Duration::from_secs(3));
        w.answered(ip("10.0.0.1"), d, t + Duration::from_secs(4));
        fail(&mut w, ip("10.0.0.4"), d, t + Duration::from_secs(5));
        w.answered(ip("10.0.0.1"), d, t + Duration::from_secs(8));
        assert!(w.take(t + Duration::from_secs(8)).is_empty());
        // Its own answer confirms none of its failures.
        fail(&mut w, ip("10.0.0.4"), d, t + Duration::from_secs(9));
        w.answered(ip("10.0.0.4"), d, t + Duration::from_secs(9));
        assert!(w.take(t + Duration::from_secs(9)).is_empty());
        assert_eq!(w.watched(), 1);
        // Answers do not keep it watched: 5 min after its last failure it
        // is forgotten (one that never answered, after 30 s).
        w.answered(ip("10.0.0.1"), d, t + Duration::from_secs(280));
        w.take(t + Duration::from_secs(280));
        assert_eq!(w.watched(), 1);
        let dead = dest_key(dest_base("dead:80"), true);
        fail(&mut w, ip("10.0.0.4"), dead, t + Duration::from_secs(280));
        w.take(t + Duration::from_secs(311));
        assert_eq!(w.watched(), 0);
    }

    #[test]
    fn a_connect_begun_while_the_destination_was_down_is_not_confirmed() {
        let mut w = Witness::default();
        let t = Instant::now();
        let s = |ms: u64| t + Duration::from_millis(ms);
        let d = dest_key(dest_base("a:80"), true);
        fail(&mut w, ip("10.0.0.9"), d, s(0));
        w.answered(ip("10.0.0.1"), d, s(100));
        // Down from 0.2 s to 12 s: a connect begun at 5 s times out at 15
        // s, when the destination answers again.
        w.failed(ip("10.0.0.4"), (d, "a", None), s(5_000), s(15_000));
        w.answered(ip("10.0.0.2"), d, s(15_100));
        assert!(w.take(s(15_200)).is_empty());
        // One begun while it answered others, failed, answered after:
        // confirmed.
        w.failed(ip("10.0.0.4"), (d, "a", None), s(15_150), s(16_000));
        w.answered(ip("10.0.0.2"), d, s(16_100));
        assert_eq!(w.take(s(16_200))[&ip("10.0.0.4")].failed, 1);
        // Down again from 17 s to 24.5 s: a connect begun at 20 s that
        // times out at 30 s is not confirmed by the answers from 25 s on
        // (one of them within 2 s of its end): none came just before it.
        w.answered(ip("10.0.0.1"), d, s(17_000));
        w.answered(ip("10.0.0.2"), d, s(25_000));
        w.failed(ip("10.0.0.4"), (d, "a", None), s(20_000), s(28_000));
        w.answered(ip("10.0.0.3"), d, s(26_000));
        w.answered(ip("10.0.0.1"), d, s(28_100));
        assert!(w.take(s(28_200)).is_empty());
    }

    /// A destination answered every 3 s (a gap each time), a connect that
    /// times out after 10 s: the answer just before its start counts.
    #[test]
    fn a_timed_out_connect_to_a_destination_answered_seldom_is_confirmed() {
        let mut w = Witness::default();
        let t = Instant::now();
        let s = |ms: u64| t + Duration::from_millis(ms);
        let d = dest_key(dest_base("a:80"), true);
        fail(&mut w, ip("10.0.0.9"), d, s(0));
        for i in 0..6u64 {
            w.answered(
                ip(&format!("10.0.0.{}", i % 3 + 1)),
                d,
                s(1_000 + 3_000 * i),
            );
        }
        // Begun at 5 s (an answer at 4 s), timed out at 15 s.
        w.failed(ip("10.0.0.4"), (d, "a", None), s(5_000), s(15_000));
        w.answered(ip("10.0.0.2"), d, s(16_000));
        assert_eq!(w.take(s(16_000))[&ip("10.0.0.4")].failed, 1);
    }

    #[test]
    fn addresses_of_one_ipv6_64_are_one_source() {
        let mut w = Witness::default();
        let t = Instant::now();
        let d = dest_key(dest_base("a:80"), false);
        fail(&mut w, ip("fd00:1::9"), d, t);
        w.answered(ip("fd00:1::1"), d, t);
        // An address of its own /64 answered before and after: not
        // another source.
        fail(&mut w, ip("fd00:1::2"), d, t);
        w.answered(ip("fd00:1::3"), d, t);
        assert!(w.take(t).is_empty());
        // Another /64's answers confirm it.
        w.answered(ip("fd00:2::1"), d, t);
        fail(&mut w, ip("fd00:1::2"), d, t);
        w.answered(ip("fd00:2::5"), d, t);
        w.answered(ip("fd00:2::1"), d, t);
        fail(&mut w, ip("fd00:1::7"), d, t);
        w.answered(ip("fd00:2::5"), d, t);
        assert_eq!(w.take(t)[&ip("fd00:1::2")].failed, 1);
        // The site is told of the /64 once (the allocator counts it as
        // one source).
        let site: Arc<str> = "a.example".into();
        assert_eq!(w.take_refused(), [(ip("fd00:1::2"), site)]);
        assert_eq!(source_net(ip("fd00:1::2")), ip("fd00:1::"));
        // Destinations: the network of the address connected to, /16
        // (/32), whatever the name: two names of one server are one.
        let at = |a: &str| Some(ip(a));
        assert_eq!(
            net_key("a.example", at("192.0.2.1")),
            net_key("b.example", at("192.0.9.9"))
        );
        assert_ne!(
            net_key("a.example", at("192.0.2.1")),
            net_key("a.example", at("192.1.2.1"))
        );
        assert_eq!(
            net_key("a.example", at("::ffff:192.0.2.1")),
            net_key("x", at("192.0.2.1"))
        );
        assert_eq!(
            net_key("a", at("2001:db8::1")),
            net_key("b", at("2001:db8:ffff::1"))
        );
        // Without one: a name's registrable domain; an address by its
        // network.
        assert_eq!(
            net_key("www.example.com", None),
            net_key("API.example.com", None)
        );
        assert_ne!(net_key("example.com", None), net_key("example.org", None));
        assert_eq!(net_key("93.184.216.34", None), net_key("93.184.1.2", None));
        assert_ne!(
            net_key("93.184.216.34", None),
            net_key("93.185.216.34", None)
        );
        assert_eq!(
            net_key("[2001:db8::1]", None),
            net_key("2001:db8:ffff::1", None)
        );
        assert_eq!(source_net(ip("10.0.0.2")), ip("10.0.0.2"));
    }
}
