//! This host's local routes: the prefixes the kernel delivers to the host
//! itself — every interface address, and prefixes routed to it (`ip route
//! add local PREFIX dev lo`, the "AnyIP" set-up), which no interface lists.
//! IPv4's from `/proc/net/fib_trie` (entries of type `LOCAL` in the main
//! and local tables), IPv6's from a netlink route dump (routes of type
//! `RTN_LOCAL` in the same two tables: `/proc/net/ipv6_route` lists every
//! table and does not say which, so a `local` route of a policy table no
//! rule points at had counted).
//!
//! A catch-all local route (`local 0.0.0.0/0`, `local ::/0`) is never
//! taken, nor is an IPv4 table of its own (`Id 100:`): that is a
//! transparent proxy's policy routing (TPROXY: `ip rule add fwmark 1
//! lookup 100; ip route add local 0.0.0.0/0 dev lo table 100`, as
//! Cilium, Istio and Clash set up), which only marked packets see;
//! taken, every destination was this host's own, and refused.
//!
//! The routing table is the answer to "is this address this host's?":
//! a test bind is not. An IPv6 address of a local route does not bind
//! without `IPV6_FREEBIND`, and with `net.ipv4.ip_nonlocal_bind=1` (or
//! its IPv6 twin, common on keepalived hosts) every address binds.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{PrefixSet, Segment};

/// How old a reading of the routes may be when the allocator asks whether
/// an address is still this host's after a worker reported it: fresh
/// enough to see a route deleted a moment before, and one reading in
/// 100 ms at most however many report.
pub const AFTER_A_FAILURE: Duration = Duration::from_millis(100);

/// The reading `LocalRoutes::current` shares.
struct Cache {
    at: Instant,
    /// `changes()` when it was read: a change since makes it stale.
    changes: u64,
    routes: Arc<LocalRoutes>,
    reading: bool,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// Changes to this host's addresses and local routes seen (`changed`).
static CHANGES: AtomicU64 = AtomicU64::new(0);

/// Of them, those that took an address or local route away.
static DEPARTURES: AtomicU64 = AtomicU64::new(0);

/// How many changes to this host's addresses and local routes this
/// process was told of (a watcher of the kernel's word, `netlink::watch`,
/// calls `changed`): a reading made before one is stale. One atomic load.
pub fn changes() -> u64 {
    CHANGES.load(Ordering::Acquire)
}

/// How many of [`changes`] took an address or a local route away: what
/// was kept from before one (an idle connection) may be from an address
/// the host no longer holds. An address added makes none. One atomic load.
pub fn departures() -> u64 {
    DEPARTURES.load(Ordering::Acquire)
}

/// This host's addresses or local routes changed (`departed`: one went
/// away, or that cannot be ruled out): the shared reading is stale (the
/// next `current` reads them again, whatever its age), and `changes`
/// (and `departures`) move on.
pub fn changed(departed: bool) {
    if departed {
        DEPARTURES.fetch_add(1, Ordering::AcqRel);
    }
    CHANGES.fetch_add(1, Ordering::AcqRel);
}

/// The local routes of both families; a family whose table could not be
/// read (no `/proc`, IPv6 disabled) is unknown, not empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoutes {
    v4: Option<PrefixSet>,
    v6: Option<PrefixSet>,
    /// IPv4's broadcast addresses of the main and local tables: inside a
    /// local route (`ip addr add 10.0.0.1/29 dev lo` makes 10.0.0.0/29
    /// local, 10.0.0.7 its broadcast), yet no source: bound, its
    /// connections leave from another address, the host's own.
    v4_broadcast: PrefixSet,
    /// IPv4's routes that take part of a local route from this host (see
    /// [`Shadowed`]); `None` where there are none (nearly every host).
    v4_shadowed: Option<Box<Shadowed>>,
    /// IPv6's, likewise.
    v6_shadowed: Option<Box<Shadowed>>,
}

/// Routes of the main table inside a local route of the main table (`ip
/// -6 route add local 2001:db8::/63 dev lo table main`, then `ip -6 route
/// add unreachable 2001:db8:0:1::/64`): the kernel takes the longest
/// match, so the part they cover is not this host's, and a prefix entry
/// holding it failed the leases that fell there (a local route of the
/// local table, looked up first, wins whatever the main table holds).
///
/// IPv4's local and main tables are one while no rule but the defaults
/// is set (the kernel merges them, and `fib_trie` lists the one trie
/// twice): then a narrower route of either takes its part of a local
/// route of either, `ip route add local 10.0.0.0/15 dev lo` (the local
/// table's) too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Shadowed {
    table_local: PrefixSet,
    main_local: PrefixSet,
    /// Each narrower than a local route of the main table holding it.
    shadows: Vec<Segment>,
}

impl Shadowed {
    /// From a table's routes: the local table's local ones, the main
    /// table's, and the main table's others (but its catch-all); `None`
    /// where none of those takes part of a local one of the main table.
    fn find(
        table_local: PrefixSet,
        main_local: PrefixSet,
        main_other: impl Iterator<Item = Segment>,
    ) -> Option<Box<Shadowed>> {
        if main_local.is_empty() {
            return None;
        }
        let shadows: Vec<Segment> = main_other
            .filter(|s| main_local.holds(s, s.prefix_len() - 1))
            .collect();
        if shadows.is_empty() {
            return None;
        }
        Some(Box::new(Shadowed {
            table_local,
            main_local,
            shadows,
        }))
    }

    /// Whether a shadow takes any address of `e` from this host.
    fn takes_any(&self, e: &Segment) -> bool {
        self.shadows.iter().any(|s| {
            if !(s.contains(e.base()) || e.contains(s.base())) {
                return false;
            }
            // Where they meet: the narrower of the two.
            let b = match s.prefix_len() >= e.prefix_len() {
                true => *s,
                false => *e,
            };
            // The local table's routes win; so do local routes of the main
            // table narrower than the shadow that cover it between them.
            let narrower = self.main_local.covers_all_from(&b, s.prefix_len() + 1);
            !(narrower || self.table_local.covers_all(&b))
        })
    }
}

impl LocalRoutes {
    /// This host's, now.
    pub fn read() -> LocalRoutes {
        let file = |path| std::fs::read_to_string(path).ok();
        let (v4, v4_broadcast, v4_shadowed) =
            match file("/proc/net/fib_trie").map(|t| parse_fib_trie(&t)) {
                Some(t) => (Some(t.local), t.broadcast, t.shadowed),
                None => (None, PrefixSet::default(), None),
            };
        let (v6, v6_shadowed) = match netlink::local_routes(crate::Family::V6) {
            Ok(dumped) => {
                let (local, shadowed) = dumped.into_routes();
                (Some(local), shadowed)
            }
            // A sandbox refusing netlink sockets (a unit's
            // `RestrictAddressFamilies=` without AF_NETLINK, as the
            // worker's own had): the file, which lists every table's
            // local routes without saying which.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EPERM | libc::EACCES)
                ) =>
            {
                (
                    file("/proc/net/ipv6_route").map(|t| parse_ipv6_route(&t)),
                    None,
                )
            }
            Err(_) => (None, None),
        };
        LocalRoutes {
            v4,
            v4_broadcast,
            v4_shadowed,
            v6,
            v6_shadowed,
        }
    }

    /// A reading at most `max_age` old, shared by the whole process (one
    /// reading of the files per `max_age` at most, however many
    /// connections ask).
    ///
    /// The files are read outside the lock, by the one caller that found
    /// the reading stale; the others meanwhile take the stale one (a host
    /// with a full BGP table has a `fib_trie` of megabytes).
    pub fn current(max_age: Duration) -> Arc<LocalRoutes> {
        let lock = || CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &mut *lock() {
            if c.reading || (c.at.elapsed() < max_age && c.changes == changes()) {
                return c.routes.clone();
            }
            c.reading = true;
        }
        // (A change counted from here on is read again next time.)
        let seen = changes();
        let routes = Arc::new(LocalRoutes::read());
        *lock() = Some(Cache {
            at: Instant::now(),
            changes: seen,
            routes: routes.clone(),
            reading: false,
        });
        routes
    }

    /// Whether a local route covers `ip` (false if its family is unknown).
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.holds(ip).unwrap_or(false)
    }

    /// Whether a local route covers `ip` (and no narrower route takes it:
    /// see [`Shadowed`]); `None` if its family's table could not be read.
    /// (A broadcast address is the host's here, as the destination rules
    /// ask; as a source it is not: see [`holds_all`](Self::holds_all).)
    pub fn holds(&self, ip: IpAddr) -> Option<bool> {
        let routes = match ip {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        let one = Segment::single(ip);
        routes.map(|r| r.holds(&one, 128) && !self.shadowed(&one))
    }

    /// Whether a route of the main table takes any of `e` from this host
    /// (see [`Shadowed`]).
    fn shadowed(&self, e: &Segment) -> bool {
        let shadowed = match e.family() {
            crate::Family::V4 => &self.v4_shadowed,
            crate::Family::V6 => &self.v6_shadowed,
        };
        shadowed.as_ref().is_some_and(|s| s.takes_any(e))
    }

    /// Whether `ip` is one of this host's IPv4 broadcast addresses: bound,
    /// its connections leave from another address (the host's own).
    pub fn is_broadcast(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() && self.v4_broadcast.holds(&Segment::single(ip), 128)
    }

    /// Whether local routes cover every address of `entry` (see
    /// [`PrefixSet::covers_all`]), and a single one is no broadcast
    /// address (a larger entry's leases that are one are refused by the
    /// worker, which checks where each connection left from); `None` if
    /// its family's table could not be read.
    pub fn holds_all(&self, entry: &Segment) -> Option<bool> {
        if entry.is_single() {
            let ip = entry.at(0);
            return self.holds(ip).map(|h| h && !self.is_broadcast(ip));
        }
        let routes = match entry.family() {
            crate::Family::V4 => self.v4.as_ref(),
            crate::Family::V6 => self.v6.as_ref(),
        };
        routes.map(|r| r.covers_all(entry) && !self.shadowed(entry))
    }
}

/// `/proc/net/ipv6_route`'s local routes (the `RTF_LOCAL` flag), of every
/// table: where netlink is refused.
fn parse_ipv6_route(table: &str) -> PrefixSet {
    const RTF_LOCAL: u32 = 0x8000_0000;
    let mut prefixes = PrefixSet::default();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = (|| {
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            (flags & RTF_LOCAL != 0 && len > 0).then_some(())?;
            Segment::prefix(IpAddr::from(dest.to_be_bytes()), len)
        })();
        if let Some(p) = parsed {
            prefixes.insert(p);
        }
    }
    prefixes
}

/// IPv4's local routes, broadcast addresses and shadows (see
/// [`Shadowed`]), as `fib_trie` lists them.
struct FibTrie {
    local: PrefixSet,
    broadcast: PrefixSet,
    shadowed: Option<Box<Shadowed>>,
}

/// A route's kind, as far as it matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    Broadcast,
    /// Any other (unicast, unreachable, blackhole, prohibit, throw, …).
    Other,
}

/// `fib_trie` lists each table as a tree whose leaves are `|-- ADDRESS`
/// lines, each followed by its routes, one a line: `/LEN SCOPE TYPE`.
/// Of the main and local tables (`Main:`, `Local:`; a policy table, `Id
/// 100:`, is not looked at), the local routes, the broadcast addresses,
/// and the routes that take part of a local route (see [`Shadowed`]).
///
/// Two passes over the text, the second only where the main table has a
/// local route: the others are kept only if they lie inside one, so a
/// host with a full BGP table keeps none of its routes.
fn parse_fib_trie(trie: &str) -> FibTrie {
    // The tables' listings: a header at a line's start, its lines after.
    let (mut main, mut table_local) = ("", "");
    let mut at = 0;
    let mut header: Option<(&str, usize)> = Some(("Main:", 0));
    for line in trie.split_inclusive('\n').chain(["X"]) {
        if !line.starts_with(' ') {
            match header {
                Some(("Main:", from)) => main = &trie[from..at],
                Some(("Local:", from)) => table_local = &trie[from..at],
                _ => {}
            }
            header = Some((line.trim_end(), at + line.len()));
        }
        at += line.len();
    }
    let (mut local, mut broadcast) = (PrefixSet::default(), PrefixSet::default());
    let (mut main_local, mut local_local) = (PrefixSet::default(), PrefixSet::default());
    for (table, into) in [(main, &mut main_local), (table_local, &mut local_local)] {
        for (p, kind) in fib_routes(table) {
            match kind {
                Kind::Local => {
                    local.insert(p);
                    into.insert(p);
                }
                Kind::Broadcast => broadcast.insert(p),
                Kind::Other => {}
            }
        }
    }
    // Merged, the two listings are one trie's: one longest match over
    // both tables' routes, as if all were the main table's.
    if main == table_local {
        (main_local, local_local) = (local.clone(), PrefixSet::default());
    }
    let others = fib_routes(main).filter_map(|(p, kind)| (kind == Kind::Other).then_some(p));
    let shadowed = Shadowed::find(local_local, main_local, others);
    FibTrie {
        local,
        broadcast,
        shadowed,
    }
}

/// The routes of one table's listing in `fib_trie` (but catch-alls).
fn fib_routes(table: &str) -> impl Iterator<Item = (Segment, Kind)> + '_ {
    let mut leaf: Option<Ipv4Addr> = None;
    table.lines().filter_map(move |line| {
        let line = line.trim_start();
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
            return None;
        }
        let Some(route) = line.strip_prefix('/') else {
            leaf = None;
            return None;
        };
        let mut f = route.split_whitespace();
        let len = f.next()?.parse::<u8>().ok().filter(|&l| l > 0)?;
        let kind = match f.nth(1)? {
            "LOCAL" => Kind::Local,
            "BROADCAST" => Kind::Broadcast,
            _ => Kind::Other,
        };
        Some((Segment::prefix(IpAddr::V4(leaf?), len)?, kind))
    })
}

/// One family's local routes from a netlink route dump (`ip route show
/// table all`): those of type `RTN_LOCAL` in the main and local tables,
/// as `fib_trie`'s are read for IPv4. A policy table (a transparent
/// proxy's, a VRF's) serves only what a rule sends it, so its local routes
/// do not make an address this host's.
mod netlink {
    use std::io;
    use std::time::Duration;

    use crate::netlink::*;
    use crate::{Family, PrefixSet, Segment};

    /// The routes of the main and local tables a dump gave.
    #[derive(Default)]
    pub struct Dumped {
        /// Local routes, of either table.
        pub local: PrefixSet,
        table_local: PrefixSet,
        main_local: PrefixSet,
        /// The main table's others (a route to a gateway, an unreachable
        /// one), but its catch-all.
        main_other: Vec<Segment>,
    }

    impl Dumped {
        /// The local routes, and those of the main table that take part
        /// of one (see [`super::Shadowed`]), if any.
        pub fn into_routes(self) -> (PrefixSet, Option<Box<super::Shadowed>>) {
            let shadowed = super::Shadowed::find(
                self.table_local,
                self.main_local,
                self.main_other.into_iter(),
            );
            (self.local, shadowed)
        }
    }

    /// This host's, now. A dump the kernel marks interrupted (the routes
    /// changed while it was read) is read again, three times at most.
    pub fn local_routes(family: Family) -> io::Result<Dumped> {
        let mut tries = 0;
        loop {
            match dump(family) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && tries < 2 => tries += 1,
                other => return other,
            }
        }
    }

    fn dump(family: Family) -> io::Result<Dumped> {
        let mut socket = RouteSocket::open(Duration::from_secs(2))?;
        let mut rtmsg = [0; RTMSG];
        rtmsg[0] = af(family);
        socket.send(&message(
            RTM_GETROUTE,
            NLM_F_REQUEST | NLM_F_DUMP,
            &rtmsg,
            &[],
        ))?;
        let mut dumped = Dumped::default();
        while !read(socket.receive()?, family, &mut dumped)? {}
        Ok(dumped)
    }

    /// Reads one datagram of a dump into `dumped`; whether it ended the
    /// dump.
    pub(super) fn read(buf: &[u8], family: Family, dumped: &mut Dumped) -> io::Result<bool> {
        for m in messages(buf)? {
            if m.flags & NLM_F_DUMP_INTR != 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            match m.kind {
                // With its error, if the kernel could not finish the dump.
                NLMSG_DONE => match m.body.len() < 4 {
                    true => return Ok(true),
                    false => return m.error()?.map_or(Ok(true), Err),
                },
                NLMSG_ERROR => {
                    return Err(m
                        .error()?
                        .unwrap_or_else(|| io::Error::other("an acknowledgement, not a dump")))
                }
                RTM_NEWROUTE => match route(m, family) {
                    Some((p, true, table)) => {
                        dumped.local.insert(p);
                        match table == RT_TABLE_MAIN {
                            true => dumped.main_local.insert(p),
                            false => dumped.table_local.insert(p),
                        }
                    }
                    Some((p, false, RT_TABLE_MAIN)) => dumped.main_other.push(p),
                    _ => {}
                },
                _ => {}
            }
        }
        Ok(false)
    }

    /// The prefix of a route of the main or local table, whether it is a
    /// local one, and its table; `None` for any other route (and a
    /// catch-all one).
    fn route(m: Message<'_>, family: Family) -> Option<(Segment, bool, u32)> {
        let rtmsg = m.rtmsg()?;
        let (len, kind) = (rtmsg[1], rtmsg[7]);
        if rtmsg[0] != af(family) || len == 0 {
            return None;
        }
        // A table past 255 is named in its attribute only.
        let (mut table, mut dst) = (u32::from(rtmsg[4]), None);
        for (kind, data) in m.attributes() {
            match kind {
                RTA_TABLE if data.len() == 4 => table = u32_at(data, 0),
                RTA_DST => dst = address(rtmsg[0], data),
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN && table != RT_TABLE_LOCAL {
            return None;
        }
        Some((Segment::prefix(dst?, len)?, kind == RTN_LOCAL, table))
    }

    /// A dump's datagram, as the kernel writes it, for the tests.
    #[cfg(test)]
    pub(super) mod fake {
        use super::*;

        pub struct Route<'a> {
            pub dst: &'a str,
            pub len: u8,
            pub kind: u8,
            pub table: u32,
        }

        pub const LOCAL: u8 = RTN_LOCAL;
        pub const UNICAST: u8 = 1;

        /// Routes, then the end of the dump.
        pub fn dump(routes: &[Route<'_>]) -> Vec<u8> {
            let mut out = Vec::new();
            for r in routes {
                let ip: std::net::IpAddr = r.dst.parse().unwrap();
                // A table past 255 is `RT_TABLE_COMPAT` in the header.
                let short = u8::try_from(r.table).unwrap_or(252);
                let rtmsg = [
                    af(Family::of(&ip)),
                    r.len,
                    0,
                    0,
                    short,
                    2,
                    0,
                    r.kind,
                    0,
                    0,
                    0,
                    0,
                ];
                let table = r.table.to_ne_bytes();
                let attributes = [(RTA_TABLE, &table[..]), (RTA_DST, &octets(ip))];
                out.extend(message(RTM_NEWROUTE, NLM_F_DUMP, &rtmsg, &attributes));
            }
            out.extend(message(NLMSG_DONE, NLM_F_DUMP, &0u32.to_ne_bytes(), &[]));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The IPv6 routes a dump gives, read (IPv4's unknown).
    fn v6_only(routes: &[netlink::fake::Route<'_>]) -> LocalRoutes {
        let mut dumped = netlink::Dumped::default();
        let done = netlink::read(&netlink::fake::dump(routes), crate::Family::V6, &mut dumped);
        assert!(done.unwrap(), "the dump's end read");
        let (local, shadowed) = dumped.into_routes();
        LocalRoutes {
            v6: Some(local),
            v6_shadowed: shadowed,
            ..LocalRoutes::default()
        }
    }

    /// The IPv4 routes `fib_trie` lists, read (IPv6's unknown).
    fn v4_only(trie: &str) -> LocalRoutes {
        let t = parse_fib_trie(trie);
        LocalRoutes {
            v4: Some(t.local),
            v4_broadcast: t.broadcast,
            v4_shadowed: t.shadowed,
            ..LocalRoutes::default()
        }
    }

    fn route(dst: &str, len: u8, kind: u8, table: u32) -> netlink::fake::Route<'_> {
        netlink::fake::Route {
            dst,
            len,
            kind,
            table,
        }
    }

    #[test]
    fn local_routes_cover_their_prefix_only() {
        use netlink::fake::{LOCAL, UNICAST};
        let table = [
            route("2001:db8:77::", 64, LOCAL, 255),
            route("2001:db8:88::", 64, UNICAST, 254),
            route("2001:db8:5::1", 128, LOCAL, 255),
        ];
        let r = v6_only(&table);
        assert!(r.covers(ip("2001:db8:77::5")));
        assert!(r.covers(ip("2001:db8:77:0:ffff::1")));
        assert!(!r.covers(ip("2001:db8:78::5")));
        assert!(!r.covers(ip("2001:db8:88::5")), "not a local route");
        assert!(r.covers(ip("2001:db8:5::1")), "an interface address");
        assert!(!r.covers(ip("2001:db8:5::2")));
        assert_eq!(r.holds(ip("10.0.0.1")), None, "IPv4 not read");
        assert!(!r.covers(ip("10.0.0.1")));
        // A prefix, whole: inside the /64 routed to lo, or not.
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert_eq!(r.holds_all(&seg("2001:db8:77::/80")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:77::/64")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:76::/63")), Some(false));
        assert_eq!(r.holds_all(&seg("2001:db8::/48")), Some(false));
        assert_eq!(r.holds_all(&seg("10.0.0.0/24")), None);
    }

    /// A local route counts in the main and local tables only: one in a
    /// policy table (`ip -6 route add local PREFIX dev lo table 100`, no
    /// rule to it; a table past 255 is named in the route's attributes
    /// only) serves nothing the host sends, so its addresses are not the
    /// host's. Nor is a catch-all, in whichever table.
    #[test]
    fn ipv6_local_routes_of_policy_tables_are_not_the_hosts() {
        use netlink::fake::LOCAL;
        let r = v6_only(&[
            route("2001:db8:99::", 64, LOCAL, 100),
            route("2001:db8:98::", 64, LOCAL, 1000),
            route("2001:db8:97::", 64, LOCAL, 254),
            route("2001:db8:96::", 64, LOCAL, 255),
            route("::", 0, LOCAL, 255),
            route("10.0.0.0", 8, LOCAL, 255),
        ]);
        for (addr, local) in [
            ("2001:db8:99::1", false),
            ("2001:db8:98::1", false),
            ("2001:db8:97::1", true),
            ("2001:db8:96::1", true),
            ("2001:db8:95::1", false),
        ] {
            assert_eq!(r.holds(ip(addr)), Some(local), "{addr}");
        }
        // A datagram cut inside a message is an error, not a short table.
        let dump = netlink::fake::dump(&[route("2001:db8:97::", 64, LOCAL, 254)]);
        let mut set = netlink::Dumped::default();
        assert!(netlink::read(&dump[..20], crate::Family::V6, &mut set).is_err());
    }

    /// A dump comes in several datagrams; a message of another request is
    /// not of it; its end may carry an error, and a message flagged
    /// interrupted asks for it again: each an error, not a short table.
    #[test]
    fn a_dump_is_read_over_datagrams_to_its_end() {
        use crate::netlink::{message, NLMSG_DONE, NLM_F_DUMP, NLM_F_DUMP_INTR};
        use crate::Family::V6;
        use netlink::fake::{dump, LOCAL};
        // The end of a dump: a header and an int.
        let end = 20;
        let first = dump(&[route("2001:db8:97::", 64, LOCAL, 254)]);
        let last = dump(&[route("2001:db8:96::", 64, LOCAL, 255)]);
        let mut other = dump(&[route("2001:db8:95::", 64, LOCAL, 255)]);
        other.truncate(other.len() - end);
        other[8..12].copy_from_slice(&7u32.to_ne_bytes());
        let mut set = netlink::Dumped::default();
        assert!(!netlink::read(&first[..first.len() - end], V6, &mut set).unwrap());
        assert!(!netlink::read(&other, V6, &mut set).unwrap());
        assert!(netlink::read(&last, V6, &mut set).unwrap());
        let r = LocalRoutes {
            v6: Some(set.local),
            ..LocalRoutes::default()
        };
        assert_eq!(r.holds(ip("2001:db8:97::1")), Some(true));
        assert_eq!(r.holds(ip("2001:db8:96::1")), Some(true));
        assert_eq!(r.holds(ip("2001:db8:95::1")), Some(false));
        let failed = message(NLMSG_DONE, NLM_F_DUMP, &(-libc::EBUSY).to_ne_bytes(), &[]);
        let mut set = netlink::Dumped::default();
        let err = netlink::read(&failed, V6, &mut set).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
        let mut interrupted = first.clone();
        interrupted[6..8].copy_from_slice(&(NLM_F_DUMP | NLM_F_DUMP_INTR).to_ne_bytes());
        let err = netlink::read(&interrupted, V6, &mut set).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
    }

    /// A route of the main table narrower than a local one of the main
    /// table takes its part from the host (the kernel's longest match): a
    /// prefix holding that part is not all the host's, and was served with
    /// about half its leases timing out (review ao). A local route of the
    /// local table wins whatever the main table holds, and so does a
    /// narrower local route inside the shadow.
    #[test]
    fn a_narrower_route_of_the_main_table_takes_its_part_of_a_local_one() {
        use netlink::fake::{LOCAL, UNICAST};
        const UNREACHABLE: u8 = 7;
        let r = v6_only(&[
            route("2001:db8:e1::", 63, LOCAL, 254),
            route("2001:db8:e1:1::", 64, UNREACHABLE, 254),
            route("2001:db8:e5::", 64, LOCAL, 254),
            route("2001:db8:e5:0:8000::", 65, UNICAST, 254),
            route("2001:db8:e5:0:8000::", 80, LOCAL, 254),
            // Narrower local routes covering the shadow between them; a
            // narrowest one inside them (review ap: both were refused).
            route("2001:db8:e3::", 63, LOCAL, 254),
            route("2001:db8:e3:1::", 64, UNREACHABLE, 254),
            route("2001:db8:e3:1::", 65, LOCAL, 254),
            route("2001:db8:e3:1:8000::", 65, LOCAL, 254),
            route("2001:db8:e3:1::", 96, LOCAL, 254),
            // The local table's, with a narrower route of the main table
            // inside it: still the host's.
            route("2001:db8:f0::", 64, LOCAL, 255),
            route("2001:db8:f0:0:8000::", 65, UNREACHABLE, 254),
            // A wider route holding a local one takes nothing.
            route("2001:db8::", 32, UNICAST, 254),
        ]);
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert_eq!(r.holds_all(&seg("2001:db8:e1::/63")), Some(false));
        assert_eq!(r.holds_all(&seg("2001:db8:e1::/64")), Some(true));
        assert_eq!(r.holds(ip("2001:db8:e1:1::5")), Some(false));
        assert_eq!(r.holds(ip("2001:db8:e1::5")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:e5::/64")), Some(false));
        assert_eq!(r.holds_all(&seg("2001:db8:e5::/65")), Some(true));
        assert_eq!(r.holds(ip("2001:db8:e5:0:8000::1")), Some(true), "its /80");
        assert_eq!(r.holds(ip("2001:db8:e5:0:8001::1")), Some(false));
        assert_eq!(r.holds_all(&seg("2001:db8:f0::/64")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:e3::/63")), Some(true));
        assert_eq!(r.holds_all(&seg("2001:db8:e3:1::/80")), Some(true));
        // None of it, where no local route of the main table is.
        let plain = v6_only(&[
            route("2001:db8:f0::", 64, LOCAL, 255),
            route("2001:db8:f0:0:8000::", 65, UNREACHABLE, 254),
        ]);
        assert!(plain.v6_shadowed.is_none());
    }

    /// IPv4's likewise, from `fib_trie`; while the kernel has merged the
    /// local and main tables (no rule but the defaults: it lists the one
    /// trie twice), a narrower route takes its part of the local table's
    /// local route too (`ip route add local 10.0.0.0/15 dev lo`, then `ip
    /// route add unreachable 10.1.0.0/16`: review ap measured 40 % of the
    /// /15's requests failed). Both listings as a kernel gave them.
    #[test]
    fn a_narrower_ipv4_route_takes_its_part_of_a_local_one() {
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        // lo's routes, as the kernel lists them.
        const LO: &str = concat!(
            "     +-- 127.0.0.0/8 2 0 2\n",
            "        +-- 127.0.0.0/31 1 0 0\n",
            "           |-- 127.0.0.0\n",
            "              /8 host LOCAL\n",
            "           |-- 127.0.0.1\n",
            "              /32 host LOCAL\n",
            "        |-- 127.255.255.255\n",
            "           /32 link BROADCAST\n",
        );
        let merged = "
  +-- 0.0.0.0/1 2 0 2
     +-- 10.0.0.0/15 2 0 2
        |-- 10.0.0.0
           /15 host LOCAL
        |-- 10.1.0.0
           /16 universe UNREACHABLE
";
        let merged = format!("Main:{merged}{LO}Local:{merged}{LO}");
        let r = v4_only(&merged);
        assert_eq!(r.holds_all(&seg("10.0.0.0/15")), Some(false));
        assert_eq!(r.holds_all(&seg("10.0.0.0/16")), Some(true));
        assert_eq!(r.holds(ip("10.1.0.5")), Some(false));
        assert_eq!(r.holds(ip("10.0.0.5")), Some(true));
        // A broadcast address takes no prefix (its lease alone is refused).
        assert_eq!(r.holds_all(&seg("127.0.0.0/8")), Some(true));
        // Unmerged (a rule of its own set), the local table is looked up
        // first and keeps its /15; the main table's local /15 loses its
        // half.
        let unmerged = "\
Main:
  +-- 10.0.0.0/13 3 0 5
     |-- 10.1.0.0
        /16 universe UNREACHABLE
     |-- 10.4.0.0
        /15 host LOCAL
     |-- 10.5.0.0
        /16 universe UNREACHABLE
Local:
  +-- 0.0.0.0/1 2 0 2
     |-- 10.0.0.0
        /15 host LOCAL
";
        let r = v4_only(&format!("{unmerged}{LO}"));
        assert_eq!(r.holds_all(&seg("10.0.0.0/15")), Some(true));
        assert_eq!(r.holds(ip("10.1.0.5")), Some(true));
        assert_eq!(r.holds_all(&seg("10.4.0.0/15")), Some(false));
        assert_eq!(r.holds(ip("10.5.0.5")), Some(false));
        assert_eq!(r.holds(ip("10.4.0.5")), Some(true));
        // An interface's prefix route beside its address takes nothing.
        assert!(v4_only(FIB_TRIE).v4_shadowed.is_none());
    }

    /// Where netlink is refused, `/proc/net/ipv6_route`'s local routes.
    #[test]
    fn ipv6_route_local_entries_are_read() {
        let table = "\
20010db8007700000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
20010db8008800000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80000001       lo
garbage
";
        let r = LocalRoutes {
            v6: Some(parse_ipv6_route(table)),
            ..LocalRoutes::default()
        };
        assert_eq!(r.holds(ip("2001:db8:77::5")), Some(true));
        assert_eq!(r.holds(ip("2001:db8:88::5")), Some(false), "not local");
        assert_eq!(r.holds(ip("2001:db8:99::5")), Some(false), "no catch-all");
    }

    /// This host's own routes, read over netlink: `::1` is on lo wherever
    /// IPv6 is.
    #[test]
    fn this_hosts_ipv6_routes_are_read() {
        let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        if !inet6.contains("00000000000000000000000000000001") {
            return;
        }
        let routes = LocalRoutes::read();
        assert_eq!(routes.holds(ip("::1")), Some(true));
        assert_eq!(routes.holds(ip("2001:db8:ffff::1")), Some(false));
    }

    /// A prefix is held whole by one route, or by routes that between
    /// them hold every address of it (interface addresses one by one).
    #[test]
    fn a_prefix_is_held_only_if_all_of_it_is() {
        let mut set = PrefixSet::default();
        for i in 0..16u8 {
            set.insert(Segment::single(IpAddr::V4(Ipv4Addr::new(
                203,
                0,
                113,
                16 + i,
            ))));
        }
        set.insert("198.51.100.0/25".parse().unwrap());
        set.insert("198.51.100.128/25".parse().unwrap());
        set.insert("127.0.0.0/8".parse().unwrap());
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        assert!(set.covers_all(&seg("203.0.113.16/28")));
        assert!(set.covers_all(&seg("203.0.113.24/29")));
        assert!(!set.covers_all(&seg("203.0.113.16/27")), "half of it");
        assert!(!set.covers_all(&seg("203.0.113.0/28")));
        assert!(set.covers_all(&seg("198.51.100.0/24")), "two halves");
        assert!(set.covers_all(&seg("127.0.0.0/9")));
        assert!(!set.covers_all(&seg("124.0.0.0/6")), "a quarter of it");
        assert!(!set.covers_all(&seg("0.0.0.0/1")));
    }

    /// As a network namespace with `10.9.0.1/24` on lo, `ip route add
    /// local 10.20.0.0/16 dev lo` and `192.0.2.5/24` on an interface shows
    /// it (the main table merged with the local one, as without policy
    /// rules).
    const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/11 2 0 2
        +-- 10.9.0.0/24 2 0 2
           +-- 10.9.0.0/31 1 0 0
              |-- 10.9.0.0
                 /24 host LOCAL
              |-- 10.9.0.1
                 /32 host LOCAL
           |-- 10.9.0.255
              /32 link BROADCAST
        |-- 10.20.0.0
           /16 host LOCAL
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.5
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 127.0.0.0/8 2 0 2
     +-- 127.0.0.0/31 1 0 0
        |-- 127.0.0.0
           /8 host LOCAL
        |-- 127.0.0.1
           /32 host LOCAL
";

    /// A transparent proxy's policy routing (a catch-all local route in a
    /// table of its own) makes no destination this host's.
    #[test]
    fn a_catch_all_local_route_is_not_taken() {
        let trie = format!(
            "{FIB_TRIE}Id 100:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 host LOCAL
     |-- 203.0.113.0
        /24 host LOCAL
"
        );
        use netlink::fake::LOCAL;
        let six = [
            route("::", 0, LOCAL, 100),
            route("2001:db8:9::", 64, LOCAL, 100),
            route("2001:db8:5::1", 128, LOCAL, 255),
        ];
        let r = LocalRoutes {
            v6: v6_only(&six).v6,
            ..v4_only(&trie)
        };
        for not in ["8.8.8.8", "203.0.113.5", "2001:db8:9::1"] {
            assert_eq!(r.holds(ip(not)), Some(false), "{not}");
        }
        for local in ["10.9.0.1", "127.0.0.1", "2001:db8:5::1"] {
            assert_eq!(r.holds(ip(local)), Some(true), "{local}");
        }
    }

    #[test]
    fn fib_trie_local_entries_are_the_hosts_ipv4_prefixes() {
        let r = v4_only(FIB_TRIE);
        for local in [
            "10.9.0.7",
            "10.20.255.1",
            "192.0.2.5",
            "127.0.0.1",
            "127.9.9.9",
        ] {
            assert_eq!(r.holds(ip(local)), Some(true), "{local}");
        }
        // The default route, a link's prefix and broadcast are not local.
        for not in [
            "8.8.8.8",
            "192.0.2.6",
            "192.0.2.255",
            "10.21.0.1",
            "10.9.1.1",
        ] {
            assert_eq!(r.holds(ip(not)), Some(false), "{not}");
        }
        // A local /24's broadcast: inside its local route (the host's, to
        // the destination rules), yet no source: bound, its connections
        // left from the host's own address.
        assert_eq!(r.holds(ip("10.9.0.255")), Some(true));
        assert!(r.is_broadcast(ip("10.9.0.255")) && !r.is_broadcast(ip("10.9.0.254")));
        let single = |s: &str| Segment::single(ip(s));
        assert_eq!(r.holds_all(&single("10.9.0.255")), Some(false));
        assert_eq!(r.holds_all(&single("10.9.0.254")), Some(true));
        assert_eq!(r.holds(ip("::1")), None);
    }

    #[test]
    fn this_hosts_loopback_is_local_and_a_documentation_address_is_not() {
        let r = LocalRoutes::read();
        assert_eq!(r.holds(ip("127.0.0.1")), Some(true));
        assert_eq!(r.holds(ip("127.3.4.5")), Some(true));
        assert_eq!(r.holds(ip("203.0.113.77")), Some(false));
        assert!(!r.covers(ip("2001:db8:ffff::1")));
        assert!(Arc::ptr_eq(
            &LocalRoutes::current(Duration::from_secs(60)),
            &LocalRoutes::current(Duration::from_secs(60))
        ));
    }
}
