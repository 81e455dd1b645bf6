//! Per-site budgets and cooldowns: what keeps every source address under a
//! site's per-address rate limit, and off a site that pushes back, across
//! every worker (the allocator holds it all, as it holds the rotation).
//!
//! A site with state (a budget, or an address cooling for it) rotates on a
//! cursor of its own over each family's addresses, taking the next one with
//! budget left that is not cooling for it; sites without state keep the
//! shared rotation, exact and untouched. A site's first lease is taken from
//! the shared rotation (so sites met once each still spread over the pool),
//! and its cursor continues from there.
//!
//! Budgets are a sliding window: an address may start at most `count`
//! requests to a site within any `period` (the start times are kept). A
//! cooldown is set by a site's `429` (or `503` with `Retry-After`, or a
//! status the operator counts): for the `Retry-After` given, else 30 s,
//! doubling with each repeat up to 10 min, jittered; a normal answer clears
//! the repeats. Until it does, a pair whose cooldown ended takes one
//! request at a time (its probe: see [`PROBE_HOLD`]).
//!
//! Bounded: at most `max_entries` sites and (address, site) pairs together;
//! past it the least recently used sites are forgotten first, those asked
//! once before those asked again (see [`Sites::make_room`]). State expires
//! every second: a pair goes when its window is empty, it is not cooling
//! and its repeats are old; a site when it holds no pair and was not used
//! for its period.
//!
//! Kept over a clean restart: [`Sites::snapshot`] copies every pair with
//! state (its starts still in the window, its cooldown, its repeats) with
//! wall-clock times, and [`Sites::restore`] takes them back under the
//! budgets then in force, so an allocator restarted to change a budget or
//! to upgrade neither spends a budget twice in one window nor sends to a
//! site that asked it to wait.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotor_protocol::{
    from_u128, site_bit, site_of, to_u128, Block, Families, Family, PairStatus, Rotations, Segment,
    SiteLimit, SiteStatus, SitesReport, PROBE_HOLD, SITE_FILTER_BITS,
};

/// The first cooldown without a `Retry-After`; each repeat doubles it.
pub const BACKOFF_BASE: Duration = Duration::from_secs(30);
pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
/// The longest `Retry-After` honoured.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(86_400);
/// Repeats are forgotten this long after the last one.
const STRIKES_KEPT: Duration = Duration::from_secs(1800);
/// [`PROBE_HOLD`] on the table's clock (the protocol's: a worker's sticky
/// session asks again sooner within it).
const PROBE_HOLD_MS: u64 = PROBE_HOLD.as_millis() as u64;
/// … for a pair cooled by failed connects, whose probe ends at its
/// connect: longer than a connect may take (`--connect-timeout`, 10 s by
/// default), so that a ban that drops SYNs meets one probe, not one every
/// [`PROBE_HOLD`] (five waited out the connect timeout each), and a
/// connect made frees the pair at once.
const CONNECT_PROBE_HOLD_MS: u64 = 15_000;
/// Reports of a failed connect (see [`Sites::unreached`]) this close to a
/// suspicion are of the same event: a site's moment of refusing every
/// address is confirmed by each worker, and for each of its hosts, at
/// its own report, within seconds of the others (a witness confirms only
/// failures with answers to others within 2 s before and after: an
/// outage of 4 s at most).
const UNREACHED_SAME: Duration = Duration::from_secs(10);
/// A suspicion is forgotten this long after it: an address that meets a
/// site seldom is not cooled at a failure for one raised long before.
const SUSPICION_KEPT: Duration = Duration::from_secs(600);
/// In each window this long (from the first cooldown it counts), failed
/// connects begin cooling for one site at most a quarter of a family's
/// sources in the rotation (one at least; a source's later cooldowns are
/// not counted, nor held back): a site that
/// refuses new connects from every address at once, overloaded (its SYN
/// backlog full) while its open connections answer, is in trouble of its
/// own, not refusing those addresses, and cooling all of them would have
/// rotor refuse its requests for minutes after it recovers.
const CONNECT_COOLS_WINDOW: Duration = Duration::from_secs(600);
/// How far before its creation a table's clock starts: pairs kept over a
/// restart carry times up to a window (at most 7 days and a second) or
/// the repeats' 30 min back, and times are kept as milliseconds since
/// that start.
const EPOCH_BACK: Duration = Duration::from_secs(8 * 86_400);

/// How much earlier than its worker had it a lease may have been counted
/// (the allocator's answer on its way, the worker busy): a start moved
/// later ([`Sites::started_late`]) is looked for from this much before.
const LEASE_SLACK: Duration = Duration::from_millis(20);

/// How long past a sticky session's start leaving the window the site's
/// other requests still leave its address a start of the budget (see
/// [`Pair::blocked`]): the session's next request, told to wait until its
/// start frees, asks again a round trip later.
const RESERVE_GRACE: Duration = Duration::from_secs(1);
/// [`RESERVE_GRACE`] on the table's clock.
const RESERVE_GRACE_MS: u64 = RESERVE_GRACE.as_millis() as u64;

/// Sites and pairs held at most, unless configured.
pub const DEFAULT_MAX_ENTRIES: usize = 400_000;

/// `count` requests per `period`, per source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u32,
    pub period: Duration,
}

impl std::str::FromStr for Limit {
    type Err = String;
    /// `N/PERIOD`: `60/1m`, `5/1s`, `1000/1h`.
    fn from_str(s: &str) -> Result<Limit, String> {
        let (n, period) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not COUNT/PERIOD (e.g. 60/1m)"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{n}` is not a request count"))?;
        if count == 0 {
            return Err(
                "a budget of 0 requests allows nothing; leave the site out (rotor refuses destinations by address, not by site: --deny-destination)"
                    .into(),
            );
        }
        let text = period.trim();
        let period = humantime::parse_duration(text)
            .map_err(|e| format!("`{text}` is not a period (e.g. 1s, 1m, 1h): {e}"))?;
        if period < Duration::from_millis(1) || period > Duration::from_secs(7 * 86_400) {
            return Err(format!("the period `{text}` must be from 1ms to 7 days"));
        }
        Ok(Limit { count, period })
    }
}

impl Limit {
    /// How long a start holds its place: the period and a margin of 2 %,
    /// at least 50 ms (half the period at most), at most 1 s. A request
    /// reaches the site a moment after rotor counts it, and those moments
    /// vary: on a new connection a connect's round trip later, on a
    /// kept-alive one at once. Without the margin a site that counts
    /// arrivals in a strict sliding window saw more than COUNT in a
    /// period: with a 2 % margin alone, up to twice COUNT from a site
    /// 30 ms away under a budget a second, whose 429s then cooled every
    /// address in turn. (A start is moved to its connect when that ends
    /// 20 ms or more after its lease, [`Sites::started_late`]: what the
    /// margin covers is a shorter connect, and jitter.)
    pub fn window(&self) -> Duration {
        let floor = Duration::from_millis(50).min(self.period / 2);
        self.period + (self.period / 50).max(floor).min(Duration::from_secs(1))
    }
}

/// The budgets the operator set: by site, and for every other site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    named: HashMap<String, Limit>,
    default: Option<Limit>,
    /// IPv6 sources count as one per prefix of this length: sites
    /// rate-limit IPv6 clients by their /64 (the customer's subnet), so
    /// the 2^64 addresses of a /64 pool are one client to them, and a
    /// budget or cooldown per address would hold nothing back.
    v6_prefix: u8,
}

/// The prefix length IPv6 sources are counted by, unless configured.
pub const DEFAULT_V6_PREFIX: u8 = 64;

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            named: HashMap::new(),
            default: None,
            v6_prefix: DEFAULT_V6_PREFIX,
        }
    }
}

impl Rules {
    /// Counts IPv6 sources by their /`len` (1 to 128; 128: each address).
    pub fn with_v6_prefix(mut self, len: u8) -> Result<Rules, String> {
        if !(1..=128).contains(&len) {
            return Err(format!(
                "site-v6-prefix {len}: a prefix length is 1 to 128 (64 as sites count IPv6 clients; 128 for each address)"
            ));
        }
        self.v6_prefix = len;
        Ok(self)
    }

    pub fn v6_prefix(&self) -> u8 {
        self.v6_prefix
    }

    /// What a source is counted as: an IPv4 address itself, an IPv6 one
    /// by its prefix's first address.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(_) => Segment::prefix(ip, self.v6_prefix).map_or(ip, |p| p.base()),
        }
    }

    /// How many sources (keys) `active`'s entries of `family` hold.
    /// (Entries inside one key, IPv6 addresses of one /64 listed apart,
    /// count once.)
    pub fn keys(&self, active: &[Segment], family: Family) -> u64 {
        let mut one: HashSet<IpAddr> = HashSet::new();
        let wide = active
            .iter()
            .filter(|e| e.family() == family)
            .filter_map(|e| match self.one_key(e) {
                true if family == Family::V6 => {
                    one.insert(self.key(e.base()));
                    None
                }
                true => Some(1),
                // An IPv6 prefix wider than a key: 2^(its bits above one).
                false if family == Family::V6 => {
                    Some(1u64 << (self.v6_prefix - e.prefix_len()).min(63))
                }
                false => Some(u64::try_from(e.len()).unwrap_or(u64::MAX)),
            })
            .fold(0u64, u64::saturating_add);
        wide.saturating_add(one.len() as u64)
    }

    /// Whether `e` lies inside one key: every address it holds counts as
    /// one source.
    pub fn one_key(&self, e: &Segment) -> bool {
        e.is_single() || (e.family() == Family::V6 && e.prefix_len() >= self.v6_prefix)
    }

    /// The keys inside `e` (a prefix wider than a key), in order from
    /// `ip`'s, wrapping around: each once.
    fn keys_from(&self, e: &Segment, ip: IpAddr) -> impl Iterator<Item = IpAddr> {
        let host = 128 - u32::from(self.v6_prefix);
        let bits = u32::from(self.v6_prefix) - u32::from(e.prefix_len());
        let base = to_u128(e.base());
        let first = (to_u128(ip) - base) >> host;
        // (A wider entry than a key: 1 to 127 bits.)
        let count = 1u128 << bits;
        (0..count).map(move |k| {
            let n = first.wrapping_add(k) & (count - 1);
            from_u128(Family::V6, base | n << host)
        })
    }

    /// `ip`'s host part in `key`'s prefix: the address a lease of `key`
    /// takes for `ip`.
    fn in_key(&self, key: IpAddr, ip: IpAddr) -> IpAddr {
        let host = 128 - u32::from(self.v6_prefix);
        let low = to_u128(ip) & ((1u128 << host) - 1);
        from_u128(Family::V6, to_u128(key) | low)
    }

    /// A key as logged: an IPv6 prefix with its length.
    pub fn shown(&self, key: IpAddr) -> String {
        match key {
            IpAddr::V6(_) if self.v6_prefix < 128 => format!("{key}/{}", self.v6_prefix),
            _ => key.to_string(),
        }
    }

    /// From `SITE=N/PERIOD` specs (`*` for every site not named). A site
    /// must be written as what requests are counted by: a registrable
    /// domain (or an address), not a subdomain.
    pub fn parse(specs: &[String]) -> Result<Rules, String> {
        let mut rules = Rules::default();
        for spec in specs {
            let (site, limit) = spec.split_once('=').ok_or_else(|| {
                format!("`{spec}` is not SITE=COUNT/PERIOD (e.g. example.com=60/1m)")
            })?;
            let site = site.trim();
            let limit: Limit = limit.parse().map_err(|e| format!("`{spec}`: {e}"))?;
            if site == "*" {
                if rules.default.replace(limit).is_some() {
                    return Err(format!(
                        "`*` has two budgets (`{spec}` and one before): give one"
                    ));
                }
                continue;
            }
            if site.is_empty() {
                return Err(format!("`{spec}` names no site"));
            }
            // A name as a request's host gives it: no port, scheme or path
            // (a budget for `example.com:8080` would match nothing), and
            // ASCII (an IDN as its punycode, as hosts arrive).
            let bare = site.trim_matches(['[', ']']);
            if bare.parse::<IpAddr>().is_err() && (site.contains([':', '/']) || !site.is_ascii()) {
                return Err(format!(
                    "`{site}` is not a site: write a host name without a port, scheme or path, in ASCII (an international name as its punycode, xn--…)"
                ));
            }
            // A public suffix (`co.uk`, `github.io`, `com`) is no site: names
            // under it are each their own, and the budget would cover
            // only the bare suffix.
            // Nor a number that is no dotted address (`127.1`,
            // `2130706433`): a request to one is refused (400), so its
            // budget matched nothing.
            if bare.parse::<IpAddr>().is_err() && rotor_protocol::numeric_not_dotted(site) {
                return Err(format!(
                    "`{site}` is no site: a host ending in a number must be an IPv4 address in dotted decimal (a.b.c.d), as requests to one must (write 127.0.0.1, not 127.1)"
                ));
            }
            let name = site.trim_end_matches('.').to_ascii_lowercase();
            if bare.parse::<IpAddr>().is_err() && rotor_protocol::is_public_suffix(&name) {
                return Err(format!(
                    "`{site}` is a public suffix: names under it belong to different owners and are each a site of their own (budget them one by one, or with `*`)"
                ));
            }
            let key = site_of(site);
            // An address in any spelling is its site (`2001:DB8:0::1`
            // is `2001:db8::1`, as requests to it are).
            let address = bare.parse::<IpAddr>().is_ok();
            if !address
                && key != site.trim_end_matches('.').to_ascii_lowercase()
                && key != site.trim_matches(['[', ']'])
            {
                return Err(format!(
                    "`{site}` is not a site: budgets are kept per registrable domain, so write `{key}` (it covers `{site}` and every other name under it)"
                ));
            }
            if rules.named.insert(key.clone(), limit).is_some() {
                return Err(format!(
                    "`{key}` has two budgets (`{spec}` and one before): give one"
                ));
            }
        }
        Ok(rules)
    }

    pub fn limit_for(&self, site: &str) -> Option<Limit> {
        self.named.get(site).copied().or(self.default)
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty() && self.default.is_none()
    }
}

impl std::fmt::Display for Rules {
    /// `example.com=60/1m, *=5/1s`, sites in name order.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut named: Vec<_> = self.named.iter().collect();
        named.sort_by_key(|(k, _)| *k);
        let all = named
            .into_iter()
            .map(|(k, l)| (k.as_str(), l))
            .chain(self.default.as_ref().map(|l| ("*", l)));
        for (i, (site, l)) in all.enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}{site}={}/{}",
                l.count,
                humantime::format_duration(l.period)
            )?;
        }
        Ok(())
    }
}

/// An (address, site) pair as kept over an allocator restart: times in
/// wall-clock milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedPair {
    pub site: String,
    pub source: IpAddr,
    /// Batches of starts within the site's window, oldest first: the time
    /// of a batch's last start, and how many it holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub starts: Vec<(u64, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cool_until_ms: Option<u64>,
    #[serde(default)]
    pub strikes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_strike_ms: Option<u64>,
    /// Failed connects (see `Sites::unreached`), and the last one's time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreached: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unreached_ms: Option<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Milliseconds since the table's epoch, plus one: 0 is "never".
type Ms = u64;

/// The site state as it was at a moment, copied quickly (under the
/// allocator's lock): made into what is kept with [`Copied::saved`],
/// outside it.
pub struct Copied {
    /// The moment, on the table's clock.
    t: Ms,
    names: Vec<(u64, Arc<str>)>,
    pairs: Vec<CopiedPair>,
    /// Every pair's starts, one after the other.
    starts: Vec<(Ms, u32)>,
}

struct CopiedPair {
    id: u64,
    ip: IpAddr,
    /// Where its starts are in [`Copied::starts`].
    starts: std::ops::Range<usize>,
    window: u32,
    cool_until: Ms,
    strikes: u32,
    last_strike: Ms,
    unreached: u32,
    last_unreached: Ms,
}

impl Copied {
    /// Every pair with state at the copy — its starts still in the
    /// window, its cooldown, its repeats — with wall-clock times
    /// (`wall_ms` is the copy's moment on that clock): what the next start
    /// takes back with [`Sites::restore`]. Cooling pairs first.
    pub fn saved(self, wall_ms: u64) -> Vec<SavedPair> {
        let t = self.t;
        let wall = |ms: Ms| (ms != 0).then(|| (wall_ms + ms).saturating_sub(t));
        let names: HashMap<u64, &str> = self.names.iter().map(|(id, k)| (*id, &**k)).collect();
        let mut out: Vec<SavedPair> = self
            .pairs
            .iter()
            .filter_map(|p| {
                let window = u64::from(p.window);
                Some(SavedPair {
                    site: names.get(&p.id)?.to_string(),
                    source: p.ip,
                    starts: self.starts[p.starts.clone()]
                        .iter()
                        .filter(|(at, _)| t.saturating_sub(*at) < window)
                        .filter_map(|&(at, n)| Some((wall(at)?, n)))
                        .collect(),
                    cool_until_ms: (p.cool_until > t).then(|| wall(p.cool_until)).flatten(),
                    strikes: p.strikes,
                    last_strike_ms: wall(p.last_strike),
                    unreached: p.unreached,
                    last_unreached_ms: wall(p.last_unreached),
                })
            })
            .collect();
        out.sort_by_key(|p| p.cool_until_ms.is_none());
        out
    }
}

const UNSET: u64 = u64::MAX;

#[derive(Debug)]
struct Site {
    /// Names its pairs in `Sites::pairs` (never reused).
    id: u64,
    limit: Option<Limit>,
    /// Each family's cursor in the site's own rotation (`UNSET` until it
    /// starts).
    cursor: [u64; 2],
    /// Each family's address the cursor was last moved past, and the
    /// pool's generation the cursors are of: a cursor is a place in one
    /// generation's rotation, and once the pool changes (a reload, a
    /// quarantine, a release) it goes on after that address in the new
    /// one, as the shared rotation does (taken as it stood, the site took
    /// an address twice running, or skipped some).
    last: Last,
    /// (The generation's low 32 bits: only told apart from the last.)
    placed: u32,
    /// Its pairs in `Sites::pairs`.
    pairs: u32,
    last_used: Ms,
    /// Its uses (leases, session requests): 0 to 2, or [`ASKED_AGAIN`]
    /// (see [`Site::used`]): a site asked again is forgotten after those
    /// asked once (see [`Sites::make_room`]).
    uses: u8,
    /// When a request outside sticky sessions was last refused for the
    /// budget (0: never): sessions keep to their share of each address's
    /// budget for [`SHARE_HELD`] after (see [`Pair::sessions_over`]).
    shared_refused: Ms,
    /// The latest end of a cooldown of its pairs (an early end or a pair
    /// forgotten leaves it later than true: the site is forgotten later):
    /// which sites cool, for `make_room`, without a look at every pair.
    cool_until: Ms,
    /// Its last refusal: until it ends, a lease is refused without a walk.
    refused: Refused,
    /// Sources failed connects began to cool for it, by family: when the
    /// window (see [`CONNECT_COOLS_WINDOW`]) began, and how many.
    connect_cools: [(Ms, u32); 2],
}

/// A site's second use within this of its first counts as asked again
/// only with a third (after 2Q's correlated references, which would not
/// count the third either: a busy site's burst is asked again at once): a
/// crawler asks a site's `robots.txt` and then a page within moments, and
/// its sites, asked again so, competed with a busy site by last use alone.
/// A crawler asking three times within it still makes its sites asked
/// again.
const CORRELATED_MS: Ms = 5_000;

/// `Site::uses` of a site asked again (kept before those asked once).
const ASKED_AGAIN: u8 = 3;

impl Site {
    /// A lease or a session's request for it at `t`: its second makes it
    /// asked again if it comes [`CORRELATED_MS`] or more after the first,
    /// else its third does.
    fn used(&mut self, t: Ms) {
        let gap = t.saturating_sub(self.last_used);
        self.uses = match self.uses {
            0 => 1,
            1 if gap < CORRELATED_MS => 2,
            _ => ASKED_AGAIN,
        };
        self.last_used = t;
    }
}

/// Each family's address a site's cursor last moved past (see
/// `Site::last`), packed: 20 bytes, not two `IpAddr`s' 34.
#[derive(Debug, Clone, Copy, Default)]
struct Last {
    v4: [u8; 4],
    v6: [u8; 16],
}

impl Last {
    fn get(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::from(self.v4),
            Family::V6 => IpAddr::from(self.v6),
        }
    }

    fn set(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4 = a.octets(),
            IpAddr::V6(a) => self.v6 = a.octets(),
        }
    }
}

/// A site's refusal of every address of some families (of a pool's
/// generation): each address was blocked until `until` at least, and only
/// time frees a blocked pair (a start or a push-back blocks more; pairs
/// are dropped only once free; budgets are read at start), so until then,
/// or until the pool changes, the same lease is refused again. Without it
/// each refused lease walked every pair of the site, under the allocator's
/// lock: up to `--max-site-entries` steps (tens of ms) for a large pool
/// spent, again at each client's retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Refused {
    /// 0: none.
    until: Ms,
    generation: u64,
    families: (bool, bool),
    cooling: bool,
}

/// How long after a request outside sticky sessions was refused for a
/// site's budget the sessions keep to their share of it (see
/// [`Pair::sessions_over`]), beside the requests held waiting for it: the
/// budget's window, up to a minute. A client refused without a wait asks
/// again when it asks: held 2 s, a client polling every 4 s got 1 request
/// of 15 beside a session; held a whole window, one refusal halved the
/// sessions' budget for an hour of `100/1h`, nobody else asking.
pub const SHARE_HELD: Duration = Duration::from_secs(60);

/// A site name's slot among `slots` ghosts (a power of two) and its
/// fingerprint there (22 bits, never 0: see [`ghost_word`]).
fn ghost_of(site: &str, slots: usize) -> (usize, u32) {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let h =
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(site);
    ((h as usize) & (slots - 1), ((h >> 42) as u32).max(1))
}

/// A ghost: the fingerprint `fp` of a site forgotten (its high 22 bits),
/// its `uses` then (2 bits) and the second of its last use, of 256 (8
/// bits), so that the site asked again goes on from there (see
/// [`Site::used`]): a crawler's second request to a site forgotten since
/// its first, a moment before, is not one asking it again.
fn ghost_word(fp: u32, uses: u8, last_used: Ms) -> u32 {
    fp << 10 | u32::from(uses.min(ASKED_AGAIN)) << 8 | ((last_used / 1000) as u32 & 0xff)
}

/// The uses a ghost word kept, and its site's last use as a time of the
/// table at `now` (to the second; one 256 s or more ago may read as a
/// moment ago, and count as one use less than it was).
fn from_ghost(word: u32, now: Ms) -> (u8, Ms) {
    let uses = (word >> 8 & 3) as u8;
    let ago = ((now / 1000) as u32).wrapping_sub(word & 0xff) & 0xff;
    (uses, now.saturating_sub(u64::from(ago) * 1000))
}

/// The most of the site table's sites that sites asked again keep from
/// being forgotten before sites asked once (see [`Sites::make_room`]), as
/// a fraction: the share of a segmented LRU cache's protected segment.
pub const PROTECTED_SHARE: (u64, u64) = (4, 5);

/// The fewest entries the site table is given room for.
pub const MIN_ENTRIES: usize = 16;

/// Start times a pair keeps at most: a budget of up to this many requests
/// keeps each start's time (an exact sliding window); a larger one keeps
/// its starts in this many batches, each with the time of its last start,
/// so a batch leaves the window only when all of it has (the window never
/// holds more than the budget; it frees a little late, by at most a
/// batch's span).
const BATCHES: u32 = 32;

/// Batches of starts in time order, [`BATCHES`] at most: past it,
/// neighbours are joined, the later time kept (a batch leaves the window
/// when its last start does).
fn in_batches(mut starts: Vec<(Ms, u32)>) -> VecDeque<(Ms, u32)> {
    starts.sort_unstable();
    while starts.len() > BATCHES as usize {
        let mut joined = Vec::with_capacity(starts.len().div_ceil(2));
        for two in starts.chunks(2) {
            let n = two.iter().fold(0u32, |a, b| a.saturating_add(b.1));
            joined.push((two[two.len() - 1].0, n));
        }
        starts = joined;
    }
    starts.into()
}

/// One (address, site): its starts within the window, its cooldown.
#[derive(Debug, Default)]
struct Pair {
    /// Batches of starts within the window, oldest first: the time of a
    /// batch's last start, and how many it holds.
    starts: VecDeque<(Ms, u32)>,
    /// Starts held in all.
    held: u32,
    /// How long a start is held, in ms (the site's window; 0: no budget).
    window: u32,
    /// Cooling until then (0: not cooling).
    cool_until: Ms,
    /// Push-backs since the last normal answer, and the last one's time.
    strikes: u32,
    last_strike: Ms,
    /// Connects that failed there while the site answered other addresses
    /// (reports of one event counted once), since the last new connect: one is
    /// a suspicion, more cool the pair (see [`Sites::unreached`]); and
    /// the last one's time.
    unreached: u32,
    last_unreached: Ms,
    /// Its cooldown over and its repeats not cleared ([`Pair::on_probation`]),
    /// the pair's probe was leased [`PROBE_HOLD`] before then: no other
    /// request until its answer, or then (0: none).
    probe_until: Ms,
    /// Sticky sessions' starts here, oldest first, within the window and
    /// [`RESERVE_GRACE`] after ([`SESSION_STARTS`] at most; none: `None`,
    /// a word): the site's other requests leave the pair room for the
    /// sessions' next (see [`Pair::reserve`]).
    // (Boxed: a word in every pair, where a deque inline is four; few
    // pairs have sessions.)
    #[allow(clippy::box_collection)]
    sessions: Option<Box<VecDeque<Ms>>>,
}

/// Session starts a pair keeps at most (see [`Pair::sessions`]).
const SESSION_STARTS: usize = 64;

impl Pair {
    /// Drops the starts that left the window (sessions': and the grace).
    fn prune(&mut self, window: Option<u64>, now: Ms) {
        let Some(w) = window else {
            self.starts.clear();
            self.held = 0;
            self.sessions = None;
            return;
        };
        if let Some(s) = &mut self.sessions {
            let kept = w + RESERVE_GRACE_MS;
            while s.front().is_some_and(|&t| now.saturating_sub(t) >= kept) {
                s.pop_front();
            }
            if s.is_empty() {
                self.sessions = None;
            }
        }
        while let Some(&(t, n)) = self.starts.front() {
            if now.saturating_sub(t) < w {
                break;
            }
            self.starts.pop_front();
            self.held = self.held.saturating_sub(n);
        }
        if self.starts.is_empty() && self.starts.capacity() > 0 {
            self.starts = VecDeque::new();
        }
    }

    /// Counts a start now against a budget of `count`. A pair at
    /// [`BATCHES`] batches (starts past the budget: counted without a
    /// check, as [`Sites::session_use`] does) first lets go of its oldest batches that can no
    /// longer decide when it frees (it holds its budget or more without
    /// them: `blocked` answers the same); if it is at [`BATCHES`] still,
    /// the last batch takes the start (freeing no sooner). Each start past
    /// a small budget had been a batch of its own, without end.
    fn record(&mut self, count: u32, now: Ms) {
        let per_batch = count.div_ceil(BATCHES).max(1);
        if self.starts.len() >= BATCHES as usize {
            while let Some(&(_, n)) = self.starts.front() {
                if self.held.saturating_sub(n) < count {
                    break;
                }
                self.starts.pop_front();
                self.held -= n;
            }
        }
        let full = self.starts.len() >= BATCHES as usize;
        match self.starts.back_mut() {
            Some((t, n)) if *n < per_batch || full => {
                *t = now;
                *n = n.saturating_add(1);
            }
            _ => self.starts.push_back((now, 1)),
        }
        self.held = self.held.saturating_add(1);
    }

    /// A sticky session's request started here at `t`.
    fn session_started(&mut self, t: Ms) {
        let s = self.sessions.get_or_insert_with(Default::default);
        if s.len() >= SESSION_STARTS {
            s.pop_front();
        }
        let at = s.partition_point(|&x| x <= t);
        s.insert(at, t);
    }

    /// The starts the site's other requests leave the sessions here, and
    /// until when (or 0: none): while a session started within the window
    /// and [`RESERVE_GRACE`] after, one, or as many as the sessions' starts
    /// that left the window within the grace (those sessions' next
    /// requests are due: several sessions on one address, or one sending
    /// more than once a period, lost the rest of the budget to requests
    /// held waiting as their starts left). Past the window by the grace:
    /// a session's next request, told to wait until its start frees, asks
    /// again a round trip later.
    /// Never past the sessions' share ([`Pair::sessions_over`]): a reserve
    /// of four sessions' due starts of a budget of 5 left the others one.
    fn reserve(&self, l: Limit, now: Ms) -> (u32, Ms) {
        let Some(s) = &self.sessions else {
            return (0, 0);
        };
        let w = l.window().as_millis() as u64;
        let room = match self.sessions_in(l, now) {
            (inside, share) if inside < share => share - inside,
            _ => return (0, 0),
        };
        let grace = RESERVE_GRACE_MS;
        let Some(&newest) = s.back().filter(|&&t| now < t + w + grace) else {
            return (0, 0);
        };
        let due = s
            .iter()
            .filter(|&&t| now >= t + w && now < t + w + grace)
            .count();
        (due.clamp(1, room) as u32, newest + w + grace)
    }

    /// When the sticky sessions' starts within `l`'s window here fall
    /// below their share of its budget, if they hold it now: half of it,
    /// rounded up ([`SESSION_STARTS`] at most). Past it, while the site's
    /// other requests wait for the budget (see [`Sites::session_blocked`]),
    /// a session's request waits as theirs do, and keeps them no room:
    /// with 8 sessions and 20 other clients of a `5/1s` site over 8
    /// addresses, the sessions had 383 requests served in 10 s and the
    /// others 25 (202 and 203 since).
    fn sessions_over(&self, l: Limit, now: Ms) -> Option<Ms> {
        let s = self.sessions.as_ref()?;
        let w = l.window().as_millis() as u64;
        let (inside, share) = self.sessions_in(l, now);
        let over = inside.checked_sub(share)?;
        Some(s[s.len() - inside + over] + w)
    }

    /// The sessions' starts within `l`'s window here, and their share.
    fn sessions_in(&self, l: Limit, now: Ms) -> (usize, usize) {
        let share = (l.count.div_ceil(2) as usize).clamp(1, SESSION_STARTS);
        let Some(s) = &self.sessions else {
            return (0, share);
        };
        let w = l.window().as_millis() as u64;
        (s.len() - s.partition_point(|&t| t + w <= now), share)
    }

    /// `None` if it may start a request now; else when it may, and
    /// whether it is cooling (else out of budget). A request of the
    /// `shared` rotation (not a sticky session's) finds the budget less
    /// the sessions' reserve ([`Pair::reserve`]): the sessions' next
    /// requests have room (the shared rotation spent all of it, and a
    /// session's request, served on its address, went past the site's
    /// limit and was pushed back).
    fn blocked(&self, limit: Option<Limit>, now: Ms, shared: bool) -> Option<(Ms, bool)> {
        let cooling = match self.cool_until > now {
            true => Some(self.cool_until),
            // Its probe out (held as a cooldown is: a session's request
            // waits, the site's others go elsewhere).
            false => (self.probe_until > now && self.on_probation(now)).then_some(self.probe_until),
        };
        let spent = limit.and_then(|l| {
            let w = l.window().as_millis() as u64;
            // (Sessions past their share are kept no room: see
            // `Pair::sessions_over`.)
            let (reserve, reserve_ends) = match shared {
                true => self.reserve(l, now),
                false => (0, 0),
            };
            let reserved = reserve > 0;
            let count = l.count.saturating_sub(reserve);
            if self.held < count {
                return None;
            }
            // Free once enough of the oldest batches left the window (for
            // fewer than `count` held), or the reserve ended with fewer
            // than the budget held.
            let frees = |count: u32| {
                let mut left = self.held;
                if left < count {
                    return Some(now);
                }
                self.starts.iter().find_map(|&(t, n)| {
                    left = left.saturating_sub(n);
                    (left < count).then_some(t + w)
                })
            };
            let by_starts = (count > 0).then(|| frees(count)).flatten();
            // (The reserve shrinks as due sessions' starts pass the grace:
            // asked again then.)
            let by_reserve = match reserved {
                true => frees(l.count).map(|t| t.max(reserve_ends)),
                false => None,
            };
            let shrinks = self
                .sessions
                .as_ref()
                .and_then(|s| s.iter().find(|&&t| now >= t + w))
                .map(|&t| t + w + RESERVE_GRACE_MS)
                .filter(|_| reserve > 1);
            by_starts.into_iter().chain(by_reserve).chain(shrinks).min()
        });
        match (cooling, spent) {
            (None, None) => None,
            (Some(c), None) => Some((c, true)),
            (None, Some(s)) => Some((s, false)),
            (Some(c), Some(s)) => Some((c.max(s), true)),
        }
    }

    /// Moves one start counted at `from` or later to `to`, where its
    /// request started: the first batch from `from` on gives it (an
    /// earlier one if `from` is early: moved later, the window holds more,
    /// never less), unless that batch's time is `to` or later already.
    /// The batches stay in time order, [`BATCHES`] at most (past it, the
    /// moved start joins the batch after it, whose later time it takes,
    /// or the one before, which takes `to`).
    fn restamp(&mut self, from: Ms, to: Ms) -> bool {
        let Some(i) = self.starts.iter().position(|&(t, _)| t >= from) else {
            return false;
        };
        if self.starts[i].0 >= to {
            return false;
        }
        match &mut self.starts[i].1 {
            n if *n > 1 => *n -= 1,
            _ => {
                self.starts.remove(i);
            }
        }
        self.put(to);
        true
    }

    /// One start more at `to`, in time order (see [`Pair::restamp`]).
    fn put(&mut self, to: Ms) {
        let j = self.starts.partition_point(|&(t, _)| t <= to);
        if self.starts.len() < BATCHES as usize {
            self.starts.insert(j, (to, 1));
        } else if let Some(after) = self.starts.get_mut(j) {
            after.1 = after.1.saturating_add(1);
        } else if let Some(before) = self.starts.back_mut() {
            *before = (to, before.1.saturating_add(1));
        }
    }

    /// Adds `other`'s starts, cooldown and repeats (two sources that are
    /// one key), in [`BATCHES`] batches at most (`in_batches`).
    fn merge(&mut self, other: Pair) {
        let starts: Vec<(Ms, u32)> = self.starts.drain(..).chain(other.starts).collect();
        self.starts = in_batches(starts);
        self.held = self.held.saturating_add(other.held);
        self.cool_until = self.cool_until.max(other.cool_until);
        self.strikes = self.strikes.max(other.strikes);
        self.last_strike = self.last_strike.max(other.last_strike);
        self.unreached = self.unreached.max(other.unreached);
        self.last_unreached = self.last_unreached.max(other.last_unreached);
        self.probe_until = self.probe_until.max(other.probe_until);
        if let Some(theirs) = other.sessions {
            for t in *theirs {
                self.session_started(t);
            }
        }
    }

    /// When it will be idle, as things stand (no start, push-back or
    /// failed connect after now).
    fn idle_at(&self) -> Ms {
        let last_start = self
            .starts
            .back()
            .map_or(0, |(t, _)| t + u64::from(self.window));
        let strikes = match self.last_strike {
            0 => 0,
            t => t + STRIKES_KEPT.as_millis() as u64,
        };
        let unreached = match self.unreached {
            0 => 0,
            1 => self.last_unreached + SUSPICION_KEPT.as_millis() as u64,
            _ => self.last_unreached + STRIKES_KEPT.as_millis() as u64,
        };
        // (A session's reserve outlasts its start: the pair with it.)
        let reserve = self
            .sessions
            .as_ref()
            .and_then(|s| s.back())
            .map_or(0, |t| t + u64::from(self.window) + RESERVE_GRACE_MS);
        last_start
            .max(self.cool_until)
            .max(strikes)
            .max(unreached)
            .max(reserve)
    }

    fn is_idle(&self, now: Ms) -> bool {
        self.starts.is_empty()
            && self.sessions.is_none()
            && self.cool_until == 0
            && self.strikes_old(now)
            && self.unreached_old(now)
    }

    /// Whether a request's answer is asked for: it has repeats to clear
    /// (not forgotten: a pair kept by its budget's starts is never idle,
    /// and its old push-back would have every tunnel told, for ever).
    fn watched(&self, now: Ms) -> bool {
        (self.strikes > 0 && !self.strikes_old(now)) || !self.unreached_old(now)
    }

    /// Whether its cooldown ended with its repeats (push-backs, or failed
    /// connects that cooled it) not yet cleared: it takes one request at a
    /// time ([`Pair::probe_until`]).
    fn on_probation(&self, now: Ms) -> bool {
        self.cool_until <= now
            && ((self.strikes > 0 && !self.strikes_old(now)) || self.cooled_by_connects(now))
    }

    /// It cools from `now` for `wait` (or longer, as it did): whether that
    /// ended a probe's hold (its next probe goes when this cooldown ends).
    fn cool(&mut self, now: Ms, wait: Duration) -> bool {
        self.cool_until = self.cool_until.max(now + wait.as_millis() as u64);
        std::mem::take(&mut self.probe_until) > now
    }

    /// Whether failed connects cooled it, not forgotten.
    fn cooled_by_connects(&self, now: Ms) -> bool {
        self.unreached > 1 && !self.unreached_old(now)
    }

    /// A request is leased here now: whether its answer is asked for
    /// ([`Pair::watched`]). On probation, it is the pair's probe.
    fn leased(&mut self, now: Ms) -> bool {
        if self.on_probation(now) {
            self.probe_until = now
                + match self.cooled_by_connects(now) {
                    true => CONNECT_PROBE_HOLD_MS,
                    false => PROBE_HOLD_MS,
                };
        }
        self.watched(now)
    }

    /// Its repeats were cleared: whether that ended a probe's hold (the
    /// requests waiting for the site may be served).
    fn probe_cleared(&mut self, now: Ms) -> bool {
        let held = self.probe_until > now && !self.on_probation(now);
        if held {
            self.probe_until = 0;
        }
        held
    }

    /// Its push-backs and failed connects, not forgotten.
    fn counted_repeats(&self, now: Ms) -> u32 {
        let strikes = if self.strikes_old(now) {
            0
        } else {
            self.strikes
        };
        let unreached = if self.unreached_old(now) {
            0
        } else {
            self.unreached
        };
        strikes.saturating_add(unreached)
    }

    /// Whether its push-backs are forgotten: none, or the last long ago.
    fn strikes_old(&self, now: Ms) -> bool {
        self.last_strike == 0
            || now.saturating_sub(self.last_strike) >= STRIKES_KEPT.as_millis() as u64
    }

    /// Whether its failed connects are forgotten: none, a suspicion
    /// older than [`SUSPICION_KEPT`], or repeats older than
    /// [`STRIKES_KEPT`] (counted from the cooldown's start, as push-backs
    /// are).
    fn unreached_old(&self, now: Ms) -> bool {
        let kept = match self.unreached {
            0 => return true,
            1 => SUSPICION_KEPT,
            _ => STRIKES_KEPT,
        };
        now.saturating_sub(self.last_unreached) >= kept.as_millis() as u64
    }
}

/// What the site path says of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing held for the site: the shared rotation serves it.
    Shared,
    /// The site's rotation has not started for `family`: take the shared
    /// rotation's next address of it, then `started`.
    Start(Family),
    /// This address (at `index` of its family's rotation); `watch`:
    /// report how the site answered.
    Address { ip: IpAddr, index: u64, watch: bool },
    /// No address may serve the site before `retry_after`.
    Throttled {
        retry_after: Duration,
        cooling: bool,
    },
}

/// The per-site state. Two maps, so a site costs one small entry and each
/// of its pairs one more (a map per site would cost hundreds of bytes for
/// a site with one pair).
#[derive(Debug)]
pub struct Sites {
    rules: Rules,
    /// Names shared with a checkpoint's copy (none copied under the lock).
    sites: HashMap<Arc<str>, Site>,
    pairs: HashMap<(u64, IpAddr), Pair>,
    next_id: u64,
    /// Sites held per filter bit, so the filter is not rehashed each time.
    bits: Vec<u32>,
    max_entries: usize,
    epoch: Instant,
    /// When the table was last found full (logged once a minute).
    full_logged: Option<Instant>,
    /// When a full table was last expired to make room: once a second at
    /// most (a pass over a full table takes milliseconds, under the
    /// allocator's lock; a single site holding the whole table would
    /// otherwise run one a lease).
    room_expired: Option<Instant>,
    /// Cooldown lines logged at info in the current second (its start,
    /// and how many; past `COOL_LINES` they go to debug, counted).
    cool_lines: (Ms, u32),
    /// Cooldowns begun since the start: by push-backs, by failed connects.
    begun: [u64; 2],
    /// The sources of each family in the pool of a generation (counted
    /// once a generation, not at each failed connect's report).
    keys: Option<(u64, [u64; 2])>,
    /// The site filling the table alone (its id), and when its first
    /// pair is idle, to be forgotten and make room: worked out once, not
    /// at each of its refused requests.
    full_frees: Option<(u64, Ms)>,
    /// Sites forgotten to make room, remembered by a fingerprint of their
    /// name with their uses and last use's second ([`ghost_word`]; 0:
    /// none) in a slot its hash picks, twice as many slots as the table
    /// has entries (a power of two; made when the table first fills, 4 MB
    /// at the default cap): a site asked again within about a turn of the
    /// table after it was forgotten goes on with its uses (see
    /// [`Sites::make_room`], [`Site::used`]), as 2Q's list of keys
    /// evicted.
    ghosts: Vec<u32>,
    /// A probe's hold ended since [`Sites::take_hold_ended`], by its
    /// answer or a new cooldown (the requests waiting for the site are
    /// tried again at once, not at the hold's end).
    hold_ended: bool,
    /// Times `make_room` looked for sites to forget (tests).
    #[cfg(test)]
    room_looks: usize,
    /// Leases refused by a site's last refusal, without a walk (tests).
    #[cfg(test)]
    refusals_remembered: usize,
}

impl Sites {
    pub fn new(rules: Rules, max_entries: usize) -> Sites {
        let now = Instant::now();
        Sites::with_epoch(
            rules,
            max_entries,
            now.checked_sub(EPOCH_BACK).unwrap_or(now),
        )
    }

    /// Times are kept as milliseconds since `epoch` (no time before it).
    pub fn with_epoch(rules: Rules, max_entries: usize, epoch: Instant) -> Sites {
        Sites {
            rules,
            sites: HashMap::new(),
            pairs: HashMap::new(),
            next_id: 0,
            bits: vec![0; SITE_FILTER_BITS],
            max_entries: max_entries.max(MIN_ENTRIES),
            epoch,
            full_logged: None,
            room_expired: None,
            cool_lines: (0, 0),
            begun: [0; 2],
            keys: None,
            full_frees: None,
            ghosts: Vec::new(),
            hold_ended: false,
            #[cfg(test)]
            room_looks: 0,
            #[cfg(test)]
            refusals_remembered: 0,
        }
    }

    fn ms(&self, t: Instant) -> Ms {
        t.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    #[cfg(test)]
    fn instant(&self, ms: Ms) -> Instant {
        self.epoch + Duration::from_millis(ms.saturating_sub(1))
    }

    /// Sites each address cools for now.
    pub fn cooling_by_address(&self, now: Instant) -> HashMap<IpAddr, u64> {
        let mut out = HashMap::new();
        for (ip, _) in self.cooling(now) {
            *out.entry(ip).or_default() += 1;
        }
        out
    }

    /// The pairs cooling now: each key (an address, an IPv6 prefix) with
    /// its site's id.
    pub fn cooling(&self, now: Instant) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        let t = self.ms(now);
        self.pairs
            .iter()
            .filter(move |(_, p)| p.cool_until > t)
            .map(|((id, ip), _)| (*ip, *id))
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Sites held.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Sites and pairs held.
    pub fn entries(&self) -> usize {
        self.sites.len() + self.pairs.len()
    }

    /// Makes the site's entry (room made first) if new and `create`;
    /// whether it is there.
    fn ensure(&mut self, site: &str, create: bool, now: Instant) -> bool {
        if self.sites.contains_key(site) {
            return true;
        }
        if !create {
            return false;
        }
        self.make_room(now, site, 1);
        let id = self.next_id;
        self.next_id += 1;
        let t = self.ms(now);
        self.bits[site_bit(site)] += 1;
        // Forgotten a while ago: its uses and its last use go on (its use
        // now is one more, counted by `Site::used`).
        let recalled = self.ghost(site).and_then(|(slot, fp)| {
            let word = self.ghosts[slot];
            (word >> 10 == fp).then(|| {
                self.ghosts[slot] = 0;
                word
            })
        });
        let (uses, last_used) = recalled.map_or((0, t), |word| from_ghost(word, t));
        self.sites.insert(
            site.into(),
            Site {
                id,
                limit: self.rules.limit_for(site),
                cursor: [UNSET; 2],
                last: Last::default(),
                placed: 0,
                pairs: 0,
                last_used,
                uses,
                shared_refused: 0,
                cool_until: 0,
                refused: Refused::default(),
                connect_cools: [(0, 0); 2],
            },
        );
        true
    }

    /// Room for `need` more entries: past the cap, expired state dropped,
    /// then the least recently used eighth of the sites (never `keep`, the
    /// one being served).
    ///
    /// Sites asked once go before sites asked again, as a segmented LRU
    /// cache does: a crawler touching each of many sites once would
    /// otherwise push a site asked every few seconds out between its
    /// requests (its budget spent, forgotten, spent again: 49 requests in
    /// 10 s went under a budget of 5 a minute an address, with 2 300 new
    /// sites a second against 1 000 entries). Sites asked again keep at
    /// most [`PROTECTED_SHARE`] of the table: past it the least recently
    /// used of them count as asked once, so sites asked twice long ago do
    /// not hold the table for ever. A site forgotten and asked again soon
    /// after (its ghost kept: see [`Sites::ghosts`]) comes back with its
    /// uses and one more (see [`Site::used`]): asked once every 200 ms,
    /// with the table turning over faster, it was forgotten between each
    /// two requests and never asked again; now it is at its third.
    fn make_room(&mut self, now: Instant, keep: &str, need: usize) {
        if self.entries() + need <= self.max_entries {
            return;
        }
        if crate::due(&mut self.room_expired, now, Duration::from_secs(1)) {
            self.expire(now);
            if self.entries() + need <= self.max_entries {
                return;
            }
        }
        // No other site to forget: `keep` holds the table (a prefix's
        // addresses used within its window). Before anything is looked at:
        // this is each of its requests then.
        if self.sites.len() <= usize::from(self.sites.contains_key(keep)) {
            return;
        }
        // Sites cooling on some address go last: a site that said "wait"
        // is, by that, one its polite clients stopped asking — the least
        // recently used — and forgetting it would send the next request
        // from the address it asked to rest.
        #[cfg(test)]
        {
            self.room_looks += 1;
        }
        let t = self.ms(now);
        // The least recently used sites asked again past the protected
        // share: from this (last use, id) on, the rest are protected.
        let mut again: Vec<(Ms, u64)> = self
            .sites
            .values()
            .filter(|s| s.uses >= ASKED_AGAIN)
            .map(|s| (s.last_used, s.id))
            .collect();
        let share = (self.sites.len() as u64 * PROTECTED_SHARE.0 / PROTECTED_SHARE.1) as usize;
        let protected_from = match again.len().checked_sub(share) {
            // All within the share.
            None | Some(0) => (0, 0),
            Some(over) if over < again.len() => *again.select_nth_unstable(over).1,
            // A share of none (a table of one site): none protected. (An
            // index past the end had panicked, a new site's lease with it.)
            Some(_) => (Ms::MAX, u64::MAX),
        };
        drop(again);
        // (Cooling, protected, last use, id, entries.)
        type Candidate = (bool, bool, Ms, u64, usize);
        let mut by_use: Vec<Candidate> = self
            .sites
            .iter()
            .filter(|(k, _)| &***k != keep)
            .map(|(_, s)| {
                let protected = s.uses >= ASKED_AGAIN && (s.last_used, s.id) >= protected_from;
                let size = s.pairs as usize + 1;
                (s.cool_until > t, protected, s.last_used, s.id, size)
            })
            .collect();
        if by_use.is_empty() {
            return;
        }
        // The least recently used eighth of the sites, and more of the
        // small ones (each under an eighth of the table) until an eighth of
        // the table is free: each pass goes over every pair, so it must
        // free enough not to be made again at the next new entry (a site
        // holding most of the table beside a few small ones had freed an
        // entry or two a pass, a pass a lease). A large site is trimmed
        // only as one of the least recently used (below).
        let n = (by_use.len() / 8).max(1);
        by_use.select_nth_unstable(n - 1);
        let want = need.max(self.max_entries / 8);
        // A large site (past an eighth of the table) among the least
        // recently used loses its least recently used pairs, as many as
        // make the room, not all of them: forgotten whole, every address
        // it had spent served it again (a site of 15 entries under
        // `1/1h` in a table of 16 had 15 more requests served after each
        // other site's request; now 2, from the addresses nearest to
        // freeing anyway).
        let (large, small): (Vec<&Candidate>, Vec<_>) =
            by_use[..n].iter().partition(|v| v.4 > want);
        let mut freed: usize = small.iter().map(|v| v.4).sum();
        let mut gone: std::collections::HashSet<u64> = small.iter().map(|v| v.3).collect();
        let trimmed = match want.saturating_sub(freed) {
            0 => HashSet::new(),
            short => self.least_used_pairs(large.iter().map(|v| v.3).collect(), short, t),
        };
        freed += trimmed.len();
        if freed < want && n < by_use.len() {
            // The least recently used of the rest first: a heap (made in
            // one pass) popped as far as needed, not a sort of them all.
            let mut rest: std::collections::BinaryHeap<_> = by_use[n..]
                .iter()
                .filter(|v| v.4 <= want)
                .map(|&v| std::cmp::Reverse(v))
                .collect();
            while freed < want {
                let Some(std::cmp::Reverse(v)) = rest.pop() else {
                    break;
                };
                freed += v.4;
                gone.insert(v.3);
            }
        }
        let n = gone.len();
        if self.ghosts.is_empty() {
            self.ghosts = vec![0; 2 * self.max_entries.next_power_of_two()];
        }
        // The pairs each trimmed site loses.
        let mut lost: HashMap<u64, u32> = HashMap::new();
        for (id, _) in &trimmed {
            *lost.entry(*id).or_default() += 1;
        }
        let mut ghosts = std::mem::take(&mut self.ghosts);
        let bits = &mut self.bits;
        self.sites.retain(|k, s| {
            if let Some(n) = lost.get(&s.id) {
                s.pairs -= n;
                // (Its last refusal counted the pairs forgotten.)
                s.refused = Refused::default();
            }
            let keep = !gone.contains(&s.id);
            if !keep {
                bits[site_bit(k)] -= 1;
                let (slot, fp) = ghost_of(k, ghosts.len());
                ghosts[slot] = ghost_word(fp, s.uses, s.last_used);
            }
            keep
        });
        self.ghosts = ghosts;
        self.pairs
            .retain(|k, _| !gone.contains(&k.0) && !trimmed.contains(k));
        if self
            .full_frees
            .is_some_and(|(id, _)| lost.contains_key(&id))
        {
            self.full_frees = None;
        }
        if crate::due(&mut self.full_logged, now, Duration::from_secs(60)) {
            tracing::warn!(
                max = self.max_entries,
                forgot = n,
                addresses = trimmed.len(),
                "the site table is full: the least recently used sites, or a large site's least recently used addresses, were forgotten (their budgets start over); raise --max-site-entries"
            );
        }
    }

    /// Up to `n` pairs of the sites `ids` to forget, the least recently
    /// used first: those free soonest (their last start leaves its window
    /// first), cooling ones last (forgotten, the address it asked to rest
    /// would serve the site's next request).
    fn least_used_pairs(&self, ids: HashSet<u64>, n: usize, t: Ms) -> HashSet<(u64, IpAddr)> {
        if ids.is_empty() {
            return HashSet::new();
        }
        let mut pairs: Vec<((bool, Ms), (u64, IpAddr))> = (self.pairs.iter())
            .filter(|((id, _), _)| ids.contains(id))
            .map(|(k, p)| ((p.cool_until > t, p.idle_at()), *k))
            .collect();
        if pairs.len() > n {
            pairs.select_nth_unstable(n - 1);
            pairs.truncate(n);
        }
        pairs.into_iter().map(|(_, k)| k).collect()
    }

    /// Counts a request of `ip` (a key: see [`Rules::key`]) to the site
    /// against its budget: whether the pair has repeats to clear (the
    /// worker then reports a normal answer, and a new connect: see
    /// [`Answer::Address`]). `None`: it cannot be counted
    /// (below), and must not be served.
    fn start(&mut self, site: &str, ip: IpAddr, now: Instant) -> Option<bool> {
        let Some(s) = self.sites.get(site) else {
            return Some(false);
        };
        let (id, limit) = (s.id, s.limit);
        let Some(limit) = limit else {
            let t = self.ms(now);
            return Some(self.pairs.get_mut(&(id, ip)).is_some_and(|p| p.leased(t)));
        };
        if !self.pairs.contains_key(&(id, ip)) {
            // Rather than break the cap, or serve the address uncounted
            // (its budget would be no limit at all), the request is
            // refused until the site's oldest starts leave their period.
            if self.uncountable(site, id, ip, Some(limit), now).is_some() {
                return None;
            }
            if let Some(s) = self.sites.get_mut(site) {
                s.pairs += 1;
            }
        }
        let t = self.ms(now);
        let p = self.pairs.entry((id, ip)).or_insert_with(|| Pair {
            window: limit.window().as_millis() as u32,
            ..Pair::default()
        });
        p.record(limit.count, t);
        Some(p.leased(t))
    }

    /// [`Sites::lease_in`] the rotations of `active` (the rotation's
    /// entries), worked out for this lease.
    #[cfg(test)]
    pub fn lease(
        &mut self,
        site: &str,
        families: Families,
        active: &[Segment],
        generation: u64,
        now: Instant,
    ) -> Answer {
        let rotations = Rotations::new(active);
        self.lease_in(site, families, &rotations, generation, now)
    }

    /// The next address for a request to `site` among `rotations` (the
    /// pool's, see [`Rotations`]) of one of `families`. `generation` is
    /// theirs (see [`Refused`]).
    pub fn lease_in(
        &mut self,
        site: &str,
        families: Families,
        rotations: &Rotations,
        generation: u64,
        now: Instant,
    ) -> Answer {
        let create = self.rules.limit_for(site).is_some();
        if !self.ensure(site, create, now) {
            return Answer::Shared;
        }
        let t = self.ms(now);
        let s = self.sites.get_mut(site).expect("ensured");
        s.used(t);
        let r = s.refused;
        if r.until > t && r.generation == generation && r.families == (families.v4, families.v6) {
            #[cfg(test)]
            {
                self.refusals_remembered += 1;
            }
            return Answer::Throttled {
                retry_after: Duration::from_millis(r.until - t),
                cooling: r.cooling,
            };
        }
        if s.placed != generation as u32 {
            s.placed = generation as u32;
            for family in Family::ALL {
                let f = family.index();
                let total = rotations.total(family);
                if s.cursor[f] == UNSET || total == 0 {
                    continue;
                }
                // After its last address, else (it is gone: the old order
                // is not kept for each site) at the same place.
                s.cursor[f] = match rotations.index_of(s.last.get(family)) {
                    Some(j) => (j + 1) % total,
                    None if s.cursor[f] < total => s.cursor[f],
                    None => 0,
                };
            }
        }
        let (id, limit, held) = (s.id, s.limit, s.pairs);
        let mut earliest: Option<(Ms, bool)> = None;
        let mut any = false;
        for family in Family::ALL {
            if !families.accepts_family(family) {
                continue;
            }
            let total = rotations.total(family);
            if total == 0 {
                continue;
            }
            any = true;
            let start = self.sites[site].cursor[family.index()];
            if start == UNSET {
                return Answer::Start(family);
            }
            // Every source the site holds nothing for is free, so a walk
            // meets one after looking at most at `held` blocked ones. An
            // IPv6 key (a /64) is looked at once: the rest of an entry
            // inside it is passed in a step (a /64 pool whose /64 is
            // spent: one step, not 2^64), other addresses of a key found
            // blocked one by one (a /64's addresses listed singly). A
            // prefix wider than a key (a /48 of 65 536 /64s) gives its
            // addresses, keys at random, for `WIDE_DRAWS` draws; then its
            // keys are looked at in order from the last drawn, each once:
            // the first free one serves, with the drawn address's host
            // part, and at most `held` are blocked, so that is held + 1
            // looks at most (a spent /48: 65 536 looks, 28 ms, once a
            // refusal).
            let keyed = family == Family::V6 && self.rules.v6_prefix < 128;
            let mut blocked_keys: HashSet<IpAddr> = HashSet::new();
            let mut spent_wide: Vec<Segment> = Vec::new();
            let (mut looks, mut draws, mut skipped) = (0u64, 0u32, 0usize);
            let mut rewound: Option<u64> = None;
            let mut walk = rotations.walk(family, start);
            'walk: while let Some((i, ip)) = walk.next() {
                let entry = *walk.last_entry().expect("an address was yielded");
                let (key, from) = 'pick: {
                    if keyed && !self.rules.one_key(&entry) {
                        if spent_wide.contains(&entry) {
                            walk.skip_entry();
                            continue 'walk;
                        }
                        let key = self.rules.key(ip);
                        let blocked = self
                            .blocked(id, key, limit, t)
                            .or_else(|| self.uncountable(site, id, key, limit, now));
                        match blocked {
                            None => break 'pick (key, ip),
                            Some(b) => earliest = sooner(earliest, b),
                        }
                        draws += 1;
                        if draws < WIDE_DRAWS {
                            continue 'walk;
                        }
                        let mut found = None;
                        for key in self.rules.keys_from(&entry, ip).take(held as usize + 1) {
                            let blocked = self
                                .blocked(id, key, limit, t)
                                .or_else(|| self.uncountable(site, id, key, limit, now));
                            match blocked {
                                None => {
                                    found = Some(key);
                                    break;
                                }
                                Some(b) => earliest = sooner(earliest, b),
                            }
                        }
                        let Some(key) = found else {
                            spent_wide.push(entry);
                            walk.skip_entry();
                            continue 'walk;
                        };
                        (key, self.rules.in_key(key, ip))
                    } else {
                        let key = self.rules.key(ip);
                        if keyed && blocked_keys.contains(&key) {
                            walk.skip_entry();
                            continue 'walk;
                        }
                        if let Some(b) = self.blocked(id, key, limit, t) {
                            earliest = sooner(earliest, b);
                            looks += 1;
                            if looks > u64::from(held) {
                                break 'walk;
                            }
                            if keyed {
                                blocked_keys.insert(key);
                                walk.skip_entry();
                            }
                            continue 'walk;
                        }
                        // Not among the `held` blocked looks: those are
                        // where the site's pairs are, further on.
                        if let Some(b) = self.uncountable(site, id, key, limit, now) {
                            earliest = sooner(earliest, b);
                            // The site's pairs were started in turn, the
                            // last just behind its cursor: the walk goes
                            // back there once, rather than round the whole
                            // pool (a /19 is 8 192 addresses) to reach them.
                            // (`held` counts both families' pairs: what it
                            // steps back over without a pair is not counted
                            // against the bound.)
                            let back = u64::from(held).min(total);
                            match rewound {
                                None => {
                                    let from = (start + total - back) % total;
                                    rewound = Some(from);
                                    walk = rotations.walk(family, from);
                                    continue 'walk;
                                }
                                Some(from) if (i + total - from) % total < back => {}
                                Some(_) => skipped += 1,
                            }
                            if skipped > MAX_UNCOUNTABLE {
                                break 'walk;
                            }
                            if keyed {
                                blocked_keys.insert(key);
                                walk.skip_entry();
                            }
                            continue 'walk;
                        }
                        (key, ip)
                    }
                };
                if let Some(s) = self.sites.get_mut(site) {
                    s.cursor[family.index()] = (i + 1) % total;
                    s.last.set(ip);
                }
                let Some(watch) = self.start(site, key, now) else {
                    return Answer::Throttled {
                        retry_after: Duration::from_secs(1),
                        cooling: false,
                    };
                };
                return Answer::Address {
                    ip: from,
                    index: i,
                    watch,
                };
            }
        }
        match earliest {
            Some((until, cooling)) if any => {
                if let Some(s) = self.sites.get_mut(site) {
                    s.refused = Refused {
                        until,
                        generation,
                        families: (families.v4, families.v6),
                        cooling,
                    };
                }
                Answer::Throttled {
                    retry_after: Duration::from_millis(until.saturating_sub(t)),
                    cooling,
                }
            }
            // No address of the families: the shared rotation says so.
            _ => Answer::Shared,
        }
    }

    /// A start of `site` (`id`, under `limit`) on `key` that could not be
    /// counted: no pair yet, and no room for one (the site fills the table
    /// alone). Blocked as by a budget, until the site's first pair is
    /// idle and makes room (its starts left their period); the walk goes
    /// on to the addresses whose pairs it holds.
    fn uncountable(
        &mut self,
        site: &str,
        id: u64,
        key: IpAddr,
        limit: Option<Limit>,
        now: Instant,
    ) -> Option<(Ms, bool)> {
        if limit.is_none() || self.pairs.contains_key(&(id, key)) {
            return None;
        }
        self.make_room(now, site, 1);
        if self.entries() < self.max_entries {
            return None;
        }
        // This one site holds the whole table (a prefix of many addresses
        // used within its period).
        if crate::due(&mut self.full_logged, now, Duration::from_secs(60)) {
            tracing::warn!(
                %site,
                max = self.max_entries,
                "the site table is full of one site's addresses: its requests on new addresses are refused (429) until older ones leave their period; raise --max-site-entries"
            );
        }
        let t = self.ms(now);
        let frees = match self.full_frees {
            Some((held, at)) if held == id && at > t => at,
            _ => {
                // (A pass over the table, as the expiry that frees it.)
                let at = (self.pairs.iter())
                    .filter(|((i, _), _)| *i == id)
                    .map(|(_, p)| p.idle_at())
                    .min()
                    .unwrap_or(0)
                    .max(t)
                    // Forgotten by the expiry's next pass (a second apart
                    // at most, while the table is full).
                    + 1000;
                self.full_frees = Some((id, at));
                at
            }
        };
        Some((frees, false))
    }

    /// Whether the site's (`id`) pair of `key` blocks a start now: until
    /// when, and whether by a cooldown (its old starts dropped first).
    fn blocked(&mut self, id: u64, key: IpAddr, limit: Option<Limit>, t: Ms) -> Option<(Ms, bool)> {
        let window = limit.map(|l| l.window().as_millis() as u64);
        self.pairs.get_mut(&(id, key)).and_then(|p| {
            p.prune(window, t);
            p.blocked(limit, t, true)
        })
    }

    /// `ip` moved into the key of `key_of` (its network bits, `ip`'s host
    /// bits): an address a budget or a cooldown counts as `key_of`'s.
    /// `None` where a key is one address (IPv4, `--site-v6-prefix 128`).
    pub fn into_key_of(&self, key_of: IpAddr, ip: IpAddr) -> Option<IpAddr> {
        let (IpAddr::V6(k), IpAddr::V6(a)) = (key_of, ip) else {
            return None;
        };
        let len = u32::from(self.rules.v6_prefix);
        if len >= 128 {
            return None;
        }
        let net = u128::MAX << (128 - len);
        let (k, a) = (u128::from(k), u128::from(a));
        Some(IpAddr::V6(((k & net) | (a & !net)).into()))
    }

    /// Whether `site` may not be served from `ip` now (its pair cools or
    /// spent its budget).
    pub fn spent(&mut self, site: &str, ip: IpAddr, now: Instant) -> bool {
        let t = self.ms(now);
        let Some(s) = self.sites.get(site) else {
            return false;
        };
        let (id, limit) = (s.id, s.limit);
        let key = self.rules.key(ip);
        self.blocked(id, key, limit, t).is_some()
    }

    /// The site's rotation of `family` begins at `index` of `total`
    /// without a start: its next lease walks on from there.
    pub fn place(&mut self, site: &str, family: Family, index: u64, total: u64) {
        if let Some(s) = self.sites.get_mut(site) {
            s.cursor[family.index()] = index % total.max(1);
        }
    }

    /// The site's rotation of `ip`'s family starts at `ip` (taken from the
    /// shared rotation, at `index` of `total`): counted as a start if the
    /// pair may serve: `Some(watch)` if it may (see `Answer::Address`),
    /// `None` if not, or if it cannot be counted (then `lease` walks on
    /// from it).
    pub fn started(
        &mut self,
        site: &str,
        ip: IpAddr,
        index: u64,
        total: u64,
        now: Instant,
    ) -> Option<bool> {
        self.sites.get(site)?;
        let family = Family::of(&ip);
        self.place(site, family, index, total);
        if self.spent(site, ip, now) {
            return None;
        }
        // (Its generation is set at the next lease, which finds the
        // cursor after this address again.)
        self.place(site, family, index + 1, total);
        if let Some(s) = self.sites.get_mut(site) {
            s.last.set(ip);
        }
        self.start(site, self.rules.key(ip), now)
    }

    /// `site` pushed back on `ip`: it cools for `retry_after`, else for a
    /// backoff by its repeats. Whether it started cooling now (it was not).
    pub fn pushback(
        &mut self,
        site: &str,
        ip: IpAddr,
        status: u16,
        retry_after: Option<Duration>,
        now: Instant,
    ) -> bool {
        let source = ip;
        let ip = self.rules.key(ip);
        let t = self.ms(now);
        let Some(p) = self.pair_mut(site, ip, now) else {
            return false;
        };
        // Requests already in flight when the first push-back came get
        // theirs too: one repeat per cooldown, not one per answer.
        let was_cooling = p.cool_until > t;
        if !was_cooling {
            // (Repeats 30 min old are forgotten, as the pair would be but
            // for its budget's starts.)
            if p.strikes_old(t) {
                p.strikes = 0;
            }
            p.strikes = p.strikes.saturating_add(1);
            p.last_strike = t;
        }
        let wait = match retry_after {
            // "Retry now" from a site that pushed back: a second.
            Some(d) => d.clamp(Duration::from_secs(1), RETRY_AFTER_MAX),
            None => backoff(p.strikes.max(1)),
        };
        let held = p.cool(t, wait);
        self.site_cools(site, ip, held);
        if !was_cooling {
            self.cooling_began(site, (ip, source), wait, Some(status), t);
        }
        !was_cooling
    }

    /// A connect from `ip` to `site` failed while the site answered other
    /// addresses (a worker's witness saw it): the site drops or refuses
    /// that address. The first since the pair's last new connect is a
    /// suspicion, with no cooldown: leases of the pair for the site ask
    /// for the answer (`watch`), and a connect they make clears it
    /// ([`Sites::connected`]); a site restarting refuses every address
    /// for a moment, then takes them again, and a ban does not. Reports
    /// within [`UNREACHED_SAME`] of it are of the same event; one after
    /// that cools the pair, 60 s doubling with each repeat as push-backs
    /// do (their repeats are counted apart: a connect says nothing of
    /// rate limits, nor an answer on a connection opened before of a ban
    /// on new ones). Whether it started cooling now.
    ///
    /// `active` (of pool generation `generation`): the rotation's entries,
    /// whose sources of `ip`'s family a quarter of may cool so for one
    /// site (see [`CONNECT_COOLS_WINDOW`]; past it, a failure is a
    /// suspicion still).
    pub fn unreached(
        &mut self,
        site: &str,
        ip: IpAddr,
        (active, generation): (&[Segment], u64),
        now: Instant,
    ) -> bool {
        // A worker tells IPv6 sources apart by /64: counted by a wider
        // prefix, the key that failed may be the one that answered.
        if ip.is_ipv6() && self.rules.v6_prefix < 64 {
            return false;
        }
        let t = self.ms(now);
        let key = self.rules.key(ip);
        let mut repeats = 0;
        if let Some(p) = self
            .sites
            .get(site)
            .and_then(|s| self.pairs.get(&(s.id, key)))
        {
            if p.cool_until > t {
                // A connect begun before the cooldown: nothing new.
                return false;
            }
            if !p.unreached_old(t) {
                if t.saturating_sub(p.last_unreached) < UNREACHED_SAME.as_millis() as u64 {
                    return false;
                }
                repeats = p.unreached;
            }
        }
        let family = Family::of(&ip).index();
        let room = match self.keys {
            Some((g, keys)) if g == generation => keys[family],
            _ => {
                let keys = Family::ALL.map(|f| self.rules.keys(active, f));
                self.keys = Some((generation, keys));
                keys[family]
            }
        } / 4;
        let room = room.max(1);
        let window = CONNECT_COOLS_WINDOW.as_millis() as u64;
        // (A source's first cooldown: its later ones are a ban's.)
        let first = repeats == 1;
        let full = first
            && self.sites.get(site).is_some_and(|s| {
                let (since, n) = s.connect_cools[family];
                t.saturating_sub(since) < window && u64::from(n) >= room
            });
        if full {
            tracing::debug!(%site, source = %ip, room, "a connect to the site failed again from this address, but a quarter of the pool already cools for it so: the site's own trouble, not cooled");
            return false;
        }
        let Some(p) = self.pair_mut(site, key, now) else {
            return false;
        };
        p.unreached = repeats.saturating_add(1);
        p.last_unreached = t;
        if repeats == 0 {
            tracing::debug!(%site, source = %ip, "a connect to the site failed from this address while it answered others: cooled if it fails so again before a connect from it is made");
            return false;
        }
        let wait = backoff(p.unreached);
        let held = p.cool(t, wait);
        self.site_cools(site, key, held);
        if let Some(s) = self.sites.get_mut(site).filter(|_| first) {
            let (since, n) = &mut s.connect_cools[family];
            if *n == 0 || t.saturating_sub(*since) >= window {
                (*since, *n) = (t, 0);
            }
            *n += 1;
        }
        self.cooling_began(site, (key, ip), wait, None, t);
        true
    }

    /// The pair of `site` and `key` (of `source`) began cooling for
    /// `wait`: by a push-back of `status`, or (`None`) by failed connects.
    /// Counted, and logged (at info up to `COOL_LINES` a second).
    fn cooling_began(
        &mut self,
        site: &str,
        (key, source): (IpAddr, IpAddr),
        wait: Duration,
        status: Option<u16>,
        t: Ms,
    ) {
        self.begun[usize::from(status.is_none())] += 1;
        let cooling = self.rules.shown(key);
        let secs = wait.as_secs();
        match (status, cool_line(&mut self.cool_lines, t)) {
            (Some(status), true) => {
                tracing::info!(%site, %source, %cooling, status, secs, "site pushed back: address cooling for this site")
            }
            (Some(status), false) => {
                tracing::debug!(%site, %source, %cooling, status, secs, "site pushed back: address cooling for this site")
            }
            (None, true) => {
                tracing::info!(%site, %source, %cooling, secs, "connects to the site fail from this address while it answers others: address cooling for this site")
            }
            (None, false) => {
                tracing::debug!(%site, %source, %cooling, secs, "connects to the site fail from this address while it answers others: address cooling for this site")
            }
        }
    }

    /// Cooldowns begun since the start: by push-backs, and by failed
    /// connects.
    pub fn cooldowns_begun(&self) -> [u64; 2] {
        self.begun
    }

    /// The site's latest cooldown end takes in its pair of `key`'s, which
    /// began cooling; `held`: a probe's hold ended with it (the site's
    /// remembered refusal, until the hold's end, would be late: its next
    /// probe goes when this cooldown ends).
    fn site_cools(&mut self, site: &str, key: IpAddr, held: bool) {
        if held {
            self.hold_freed(site);
        }
        let Some(s) = self.sites.get_mut(site) else {
            return;
        };
        if let Some(p) = self.pairs.get(&(s.id, key)) {
            s.cool_until = s.cool_until.max(p.cool_until);
        }
    }

    /// `site`'s ghost slot and fingerprint, once the table has ghosts.
    fn ghost(&self, site: &str) -> Option<(usize, u32)> {
        (!self.ghosts.is_empty()).then(|| ghost_of(site, self.ghosts.len()))
    }

    /// A probe's hold of `site` ended: its remembered refusal goes, and
    /// the requests waiting for it are to be tried.
    fn hold_freed(&mut self, site: &str) {
        self.unrefuse(site);
        self.hold_ended = true;
    }

    /// Whether a probe's hold ended since the last call.
    pub fn take_hold_ended(&mut self) -> bool {
        std::mem::take(&mut self.hold_ended)
    }

    /// The pair of `site` and `key` (a key: see [`Rules::key`]), made if
    /// need be (the site too); `None` when the table has no room for it
    /// (one site holding the whole table): then nothing is kept, rather
    /// than the cap broken.
    fn pair_mut(&mut self, site: &str, key: IpAddr, now: Instant) -> Option<&mut Pair> {
        let fresh_pair = self
            .sites
            .get(site)
            .is_none_or(|s| !self.pairs.contains_key(&(s.id, key)));
        if fresh_pair {
            let need = if self.sites.contains_key(site) { 1 } else { 2 };
            self.make_room(now, site, need);
            if self.entries() + need > self.max_entries {
                if crate::due(&mut self.full_logged, now, Duration::from_secs(60)) {
                    tracing::warn!(
                        %site,
                        max = self.max_entries,
                        "the site table is full of one site's addresses: a cooldown is not kept; raise --max-site-entries"
                    );
                }
                return None;
            }
        }
        self.ensure(site, true, now);
        let s = self.sites.get_mut(site)?;
        let window = s.limit.map_or(0, |l| l.window().as_millis() as u32);
        Some(self.pairs.entry((s.id, key)).or_insert_with(|| {
            s.pairs += 1;
            Pair {
                window,
                ..Pair::default()
            }
        }))
    }

    /// `site` answered `ip` normally: its repeats start over. Not while
    /// the pair cools: that answer is to a request sent before the
    /// push-back (a rate limiter's 429 is quick, a page slow), and taking
    /// it for a sign of peace would keep the backoff from ever doubling.
    /// Whether it ended a probe's hold (see [`PROBE_HOLD`]): the site's
    /// waiting requests may be served.
    pub fn answered(&mut self, site: &str, ip: IpAddr, now: Instant) -> bool {
        self.clear(site, ip, now, |p| (p.strikes, p.last_strike) = (0, 0))
    }

    /// A new connect from `ip` to `site` was made: its failed connects
    /// start over (not its push-backs: a connect says nothing of rate
    /// limits; nor does an answer on a connection opened before, of a ban
    /// on new ones). Not while the pair cools, as for an answer. Whether
    /// it ended a probe's hold, as [`Sites::answered`].
    pub fn connected(&mut self, site: &str, ip: IpAddr, now: Instant) -> bool {
        self.clear(site, ip, now, |p| (p.unreached, p.last_unreached) = (0, 0))
    }

    /// The pair's repeats of one kind cleared by `clear`, unless it cools
    /// (see [`Sites::answered`]): whether that ended a probe's hold.
    fn clear(
        &mut self,
        site: &str,
        ip: IpAddr,
        now: Instant,
        clear: impl FnOnce(&mut Pair),
    ) -> bool {
        let t = self.ms(now);
        let Some(p) = self.uncooled(site, ip, now) else {
            return false;
        };
        clear(p);
        let freed = p.probe_cleared(t);
        if freed {
            self.hold_freed(site);
        }
        freed
    }

    /// An address of `site` was freed: its remembered refusal is gone.
    fn unrefuse(&mut self, site: &str) {
        if let Some(s) = self.sites.get_mut(site) {
            s.refused.until = 0;
        }
    }

    /// A request to `site` from `ip` (a key: see [`Rules::key`]), counted
    /// against the site's budget at its lease, about `leased`, started
    /// only at `started` (its connection made): one of the pair's starts
    /// is moved to then ([`Pair::restamp`]), so that the site's window is
    /// held from when the request reached it, not a connect's round trip
    /// before. `leased` is taken [`LEASE_SLACK`] early: the lease was
    /// counted before its worker had it, and a start later than this
    /// request's, moved, would let one in early. Whether one moved.
    pub fn started_late(
        &mut self,
        site: &str,
        ip: IpAddr,
        (leased, started): (Instant, Instant),
        now: Instant,
    ) -> bool {
        let Some(limit) = self.rules.limit_for(site) else {
            return false;
        };
        let from = self.ms(leased.checked_sub(LEASE_SLACK).unwrap_or(leased));
        let to = self.ms(started.min(now));
        let leased_ms = self.ms(leased);
        // Its start, counted by the lease's time, has left the window once
        // a whole window passed since: the request is counted anew where
        // it landed (a start found from `from` on is another request's:
        // moved, the window held one request fewer than the site saw).
        let left = to >= leased_ms + limit.window().as_millis() as u64;
        let key = self.rules.key(ip);
        let id = self.sites.get(site).map(|s| s.id);
        match id.and_then(|id| self.pairs.get_mut(&(id, key))) {
            Some(p) if left => {
                p.put(to);
                p.held = p.held.saturating_add(1);
                true
            }
            Some(p) => {
                // A session's start moved holds its reserve from there.
                let ours = from..=leased_ms + LEASE_SLACK.as_millis() as u64;
                let moved = p.sessions.as_mut().and_then(|s| {
                    let i = s.iter().position(|t| ours.contains(t))?;
                    s.remove(i)
                });
                if moved.is_some() {
                    p.session_started(to);
                }
                p.restamp(from, to)
            }
            // Gone since (its starts all left the window, and it was
            // dropped idle, its site too): counted anew, now.
            None => self.ensure(site, true, now) && self.start(site, key, now).is_some(),
        }
    }

    /// The pair of `site` and `ip`, if it is held and not cooling.
    fn uncooled(&mut self, site: &str, ip: IpAddr, now: Instant) -> Option<&mut Pair> {
        let id = self.sites.get(site)?.id;
        let t = self.ms(now);
        let p = self.pairs.get_mut(&(id, self.rules.key(ip)))?;
        (p.cool_until <= t).then_some(p)
    }

    /// A request to `site` outside sticky sessions was refused for its
    /// budget (not a new session's: sessions keep to their share only
    /// beside other requests).
    pub fn others_refused(&mut self, site: &str, now: Instant) {
        let t = self.ms(now);
        if let Some(s) = self.sites.get_mut(site) {
            s.shared_refused = t;
        }
    }

    /// Whether a sticky session's request to `site` from its address `ip`
    /// must wait, as any other would: until how long from now, and by
    /// what: the site's push-back, the address's budget spent there (sent
    /// on, the site would see more than its limit from it, and push
    /// back), or the sessions' share of it. The session keeps its address
    /// meanwhile. `others_wait`: requests outside sessions are held
    /// waiting for the site's budget (with one refused within
    /// [`SHARE_HELD`], the sessions keep to their share of it).
    pub fn session_blocked(
        &mut self,
        site: &str,
        ip: IpAddr,
        others_wait: bool,
        now: Instant,
    ) -> Option<(Duration, Block)> {
        let s = self.sites.get(site)?;
        let (id, limit, shared_refused) = (s.id, s.limit, s.shared_refused);
        let t = self.ms(now);
        let window = limit.map(|l| l.window().as_millis() as u64);
        let p = self.pairs.get_mut(&(id, self.rules.key(ip)))?;
        p.prune(window, t);
        let (until, block) = match p.blocked(limit, t, false) {
            Some((until, cooling)) => (until, Block::of_throttled(cooling)),
            // The site's other requests refused within the window: the
            // sessions here keep to their share.
            None => {
                let (l, w) = limit.zip(window)?;
                let held = w.min(SHARE_HELD.as_millis() as u64);
                let refused = shared_refused > 0 && t.saturating_sub(shared_refused) < held;
                if !(others_wait || refused) {
                    return None;
                }
                (p.sessions_over(l, t)?, Block::Shared)
            }
        };
        Some((Duration::from_millis(until.saturating_sub(t)), block))
    }

    /// A sticky session's request to `site` from `ip`, the session's
    /// address (one [`Sites::session_blocked`] let through): counted
    /// against the pair's budget (so the site's other requests keep the
    /// address under it, and leave it a start for the session's next),
    /// never refused. `None` for a site without state; else whether the
    /// pair has repeats to clear (as a lease's `watch`).
    pub fn session_use(&mut self, site: &str, ip: IpAddr, now: Instant) -> Option<bool> {
        let create = self.rules.limit_for(site).is_some();
        if !self.ensure(site, create, now) {
            return None;
        }
        let t = self.ms(now);
        if let Some(s) = self.sites.get_mut(site) {
            s.used(t);
        }
        let key = self.rules.key(ip);
        let watch = self.start(site, key, now).unwrap_or(false);
        self.session_started(site, ip, now);
        Some(watch)
    }

    /// A sticky session's request to `site` started from `ip` (counted
    /// already): the site's other requests leave the pair room for the
    /// sessions' next (see [`Pair::reserve`]).
    pub fn session_started(&mut self, site: &str, ip: IpAddr, now: Instant) {
        let t = self.ms(now);
        let key = self.rules.key(ip);
        let id = self.sites.get(site).map(|s| s.id);
        if let Some(p) = id.and_then(|id| self.pairs.get_mut(&(id, key))) {
            p.session_started(t);
        }
    }

    /// Drops what expired; logs each cooldown that ended.
    pub fn expire(&mut self, now: Instant) {
        let t = self.ms(now);
        let mut gone: HashMap<u64, u32> = HashMap::new();
        let mut ended: Vec<(u64, IpAddr)> = Vec::new();
        self.pairs.retain(|(id, ip), p| {
            p.prune((p.window > 0).then_some(u64::from(p.window)), t);
            if p.cool_until != 0 && p.cool_until <= t {
                p.cool_until = 0;
                ended.push((*id, *ip));
            }
            let keep = !p.is_idle(t);
            if !keep {
                *gone.entry(*id).or_default() += 1;
            }
            keep
        });
        if !ended.is_empty() {
            let ids: HashMap<u64, &str> = self.sites.iter().map(|(k, s)| (s.id, &**k)).collect();
            let mut lines = std::mem::take(&mut self.cool_lines);
            for (id, ip) in ended {
                let site = ids.get(&id).copied().unwrap_or("?");
                let source = self.rules.shown(ip);
                match cool_line(&mut lines, t) {
                    true => {
                        tracing::info!(%site, %source, "address no longer cooling for this site")
                    }
                    false => {
                        tracing::debug!(%site, %source, "address no longer cooling for this site")
                    }
                }
            }
            self.cool_lines = lines;
        }
        let bits = &mut self.bits;
        self.sites.retain(|k, s| {
            s.pairs -= gone.get(&s.id).copied().unwrap_or(0);
            let quiet = s.limit.map_or(0, |l| l.window().as_millis() as u64);
            let keep = s.pairs > 0 || t.saturating_sub(s.last_used) < quiet;
            if !keep {
                bits[site_bit(k)] -= 1;
            }
            keep
        });
    }

    /// The site filter workers read: every site held and every site named,
    /// and whether every site takes the site path (a budget for `*`).
    pub fn filter(&self) -> (bool, Vec<u64>) {
        let mut words = vec![0u64; SITE_FILTER_BITS / 64];
        for (b, n) in self.bits.iter().enumerate() {
            if *n > 0 {
                words[b / 64] |= 1 << (b % 64);
            }
        }
        for site in self.rules.named.keys() {
            let b = site_bit(site);
            words[b / 64] |= 1 << (b % 64);
        }
        (self.rules.default.is_some(), words)
    }

    pub fn report(&self, max: usize, now: Instant) -> SitesReport {
        let t = self.ms(now);
        let mut sites: Vec<(&Arc<str>, &Site)> = self.sites.iter().collect();
        let order = |a: &(&Arc<str>, &Site), b: &(&Arc<str>, &Site)| {
            b.1.last_used.cmp(&a.1.last_used).then(a.0.cmp(b.0))
        };
        // The `max` most recently used, then only those sorted (under the
        // allocator's lock: a full table's 400 000 sorted at each report
        // took tens of ms).
        if sites.len() > max && max > 0 {
            sites.select_nth_unstable_by(max - 1, order);
        }
        sites.truncate(max);
        sites.sort_by(order);
        let shown: HashMap<u64, usize> = sites
            .iter()
            .enumerate()
            .map(|(i, (_, s))| (s.id, i))
            .collect();
        let mut addrs: Vec<Vec<PairStatus>> = vec![Vec::new(); sites.len()];
        for ((id, ip), p) in &self.pairs {
            let Some(&i) = shown.get(id) else { continue };
            let limit = sites[i].1.limit;
            addrs[i].push(PairStatus {
                ip: *ip,
                used: limit.map_or(0, |l| {
                    let w = l.window().as_millis() as u64;
                    p.starts
                        .iter()
                        .filter(|(s, _)| t.saturating_sub(*s) < w)
                        .map(|(_, n)| n)
                        .sum()
                }),
                cooling_ms: (p.cool_until > t).then(|| p.cool_until - t),
                // (Push-backs and failed connects: one count in the
                // report's shape; those forgotten, none.)
                strikes: p.counted_repeats(t),
            });
        }
        SitesReport {
            total: self.sites.len() as u64,
            pairs: self.pairs.len() as u64,
            max_entries: self.max_entries as u64,
            sites: sites
                .into_iter()
                .zip(addrs)
                .map(|((name, s), mut addrs)| {
                    addrs.sort_by_key(|p| p.ip);
                    SiteStatus {
                        site: name.to_string(),
                        limit: s.limit.map(|l| SiteLimit {
                            count: l.count,
                            period_ms: l.period.as_millis() as u64,
                        }),
                        idle_secs: t.saturating_sub(s.last_used) / 1000,
                        addrs,
                    }
                })
                .collect(),
        }
    }

    /// Every pair with state now — its starts still in the window, its
    /// cooldown, its repeats — with wall-clock times (`wall_ms` is `now`
    /// on that clock): what the next start takes back with
    /// [`Sites::restore`]. Cooling pairs first.
    pub fn snapshot(&self, now: Instant, wall_ms: u64) -> Vec<SavedPair> {
        self.copy(now).saved(wall_ms)
    }

    /// The table as it is `now`, for [`Copied::saved`]: per site its id
    /// and shared name, per pair with state its few words
    /// and starts (into one list). No allocation per entry: ≈ 20 ns a
    /// pair, where making what is kept takes ≈ 400.
    pub fn copy(&self, now: Instant) -> Copied {
        let t = self.ms(now);
        let mut starts = Vec::new();
        let pairs = self
            .pairs
            .iter()
            .filter(|(_, p)| !p.is_idle(t))
            .map(|(&(id, ip), p)| {
                let from = starts.len();
                starts.extend(p.starts.iter().copied());
                CopiedPair {
                    id,
                    ip,
                    starts: from..starts.len(),
                    window: p.window,
                    cool_until: p.cool_until,
                    strikes: p.strikes,
                    last_strike: p.last_strike,
                    unreached: p.unreached,
                    last_unreached: p.last_unreached,
                }
            })
            .collect();
        Copied {
            t,
            names: self.sites.iter().map(|(k, s)| (s.id, k.clone())).collect(),
            pairs,
            starts,
        }
    }

    /// Takes back pairs a [`Sites::snapshot`] kept (`wall_ms` is `now` on
    /// the wall clock) under the budgets in force now: starts still in the
    /// site's window (none for a site that has no budget now), cooldowns
    /// not ended, repeats not forgotten; a pair left with none of these is
    /// dropped. Up to the cap, cooling pairs first. How many came back.
    pub fn restore(&mut self, saved: Vec<SavedPair>, now: Instant, wall_ms: u64) -> usize {
        let t = self.ms(now);
        // A wall clock behind the one that wrote the file (a start before
        // NTP has set it) would drop the window's starts as "in the
        // future" — a spent budget forgotten — and lengthen cooldowns: it
        // is now at least the newest start or strike the file holds, and
        // no cooldown comes back longer than the longest one given. (A
        // pair with a time past the clock and the file's writing by more
        // than a minute is not this allocator's: dropped, not taken for
        // the clock.)
        let newest_of = |p: &SavedPair| {
            let last = [p.last_strike_ms, p.last_unreached_ms];
            p.starts
                .iter()
                .map(|&(at, _)| at)
                .chain(last.into_iter().flatten())
                .max()
                .unwrap_or(0)
        };
        let believed = wall_ms.saturating_add(crate::persist::FUTURE_SLACK_MS);
        let mut saved = saved;
        saved.retain(|p| newest_of(p) <= believed);
        let newest = saved.iter().map(newest_of).max().unwrap_or(0);
        let wall_ms = wall_ms.max(newest);
        let longest = t + RETRY_AFTER_MAX.as_millis() as u64;
        // A wall-clock time on this table's clock (`None` before its start).
        let ms = |w: u64| match w.checked_sub(wall_ms) {
            Some(ahead) => Some(t.saturating_add(ahead)),
            None => t.checked_sub(wall_ms - w).filter(|&m| m > 0),
        };
        let mut n = 0;
        for p in saved {
            let window = self
                .rules
                .limit_for(&p.site)
                .map_or(0, |l| l.window().as_millis() as u32);
            let starts: Vec<(Ms, u32)> = p
                .starts
                .iter()
                .filter_map(|&(at, n)| Some((ms(at)?, n)))
                .filter(|&(at, n)| at <= t && t - at < u64::from(window) && n > 0)
                .collect();
            // (Sums saturate: the file is the allocator's own, but not
            // trusted not to overflow them, nor to hold no more batches
            // than a pair keeps.)
            let pair = Pair {
                held: starts.iter().fold(0u32, |a, (_, n)| a.saturating_add(*n)),
                starts: in_batches(starts),
                window,
                cool_until: p
                    .cool_until_ms
                    .and_then(ms)
                    .filter(|&c| c > t)
                    .map_or(0, |c| c.min(longest)),
                strikes: p.strikes,
                last_strike: p
                    .last_strike_ms
                    .and_then(ms)
                    .filter(|&l| l <= t)
                    .unwrap_or(0),
                unreached: p.unreached,
                last_unreached: p
                    .last_unreached_ms
                    .and_then(ms)
                    .filter(|&l| l <= t)
                    .unwrap_or(0),
                // Not kept: a pair on probation sends its probe again.
                probe_until: 0,
                // Not kept: a session's reserve begins again with its
                // next request.
                sessions: None,
            };
            if pair.is_idle(t) {
                continue;
            }
            // Kept per address by an older allocator, or by another
            // --site-v6-prefix: the addresses of one key add up.
            let key = self.rules.key(p.source);
            if let Some(s) = self.sites.get_mut(&*p.site) {
                if let Some(held) = self.pairs.get_mut(&(s.id, key)) {
                    s.cool_until = s.cool_until.max(pair.cool_until);
                    held.merge(pair);
                    n += 1;
                    continue;
                }
            }
            if self.entries() + 2 > self.max_entries {
                break;
            }
            self.ensure(&p.site, true, now);
            let Some(s) = self.sites.get_mut(&*p.site) else {
                continue;
            };
            s.pairs += 1;
            // In use before the restart.
            s.uses = ASKED_AGAIN;
            s.cool_until = s.cool_until.max(pair.cool_until);
            self.pairs.insert((s.id, key), pair);
            n += 1;
        }
        n
    }

    /// The pair's cooldown end and repeats (tests).
    #[cfg(test)]
    fn pair(&self, site: &str, ip: IpAddr) -> Option<(Instant, u32)> {
        let s = self.sites.get(site)?;
        let p = self.pairs.get(&(s.id, ip))?;
        Some((
            self.instant(p.cool_until),
            p.strikes.saturating_add(p.unreached),
        ))
    }
}

/// Addresses a site's walk draws from a prefix wider than a key (the
/// permutation's next ones: keys at random) before it looks at the keys in
/// order. Drawing finds a free key in 1/(share free) draws and spreads the
/// site over the prefix; in order finds one for sure, in at most `held`
/// looks, but a run of spent keys grows as it fills them (in order alone,
/// spending a /48 of 65 536 /64s took 2.8 s, 43 µs a lease).
const WIDE_DRAWS: u32 = 16;

/// Addresses a lease passes over for want of room to count them (the site
/// fills the table alone) before it is refused: the walk's bound then,
/// beside its `held` blocked looks (≈ 0.1 ms).
const MAX_UNCOUNTABLE: usize = 4096;

/// The earlier of two blocks (until when, and whether by a cooldown): a
/// refusal's end, cooling only if every block that ends then cools.
fn sooner(earliest: Option<(Ms, bool)>, (until, cooling): (Ms, bool)) -> Option<(Ms, bool)> {
    Some(match earliest {
        None => (until, cooling),
        Some((e, _)) if until < e => (until, cooling),
        Some((e, c)) if until == e => (e, c && cooling),
        Some(earlier) => earlier,
    })
}

/// Cooldown lines logged at info a second at most.
const COOL_LINES: u32 = 20;

/// Whether a cooldown's start or end is logged at info (at most
/// `COOL_LINES` a second: a prefix pool cools a new address at each
/// push-back, and would log a line a request); the rest go to debug, and
/// the next second's first line says how many. `lines`: the second's
/// start, and the lines in it.
fn cool_line(lines: &mut (Ms, u32), t: Ms) -> bool {
    let (since, n) = lines;
    if t.saturating_sub(*since) >= 1000 {
        if *n > COOL_LINES {
            tracing::info!(
                more = *n - COOL_LINES,
                "cooldowns began or ended past {COOL_LINES} in a second: logged at debug"
            );
        }
        (*since, *n) = (t, 0);
    }
    *n += 1;
    *n <= COOL_LINES
}

/// 30 s doubling per repeat up to 10 min, within ±20 % (so addresses
/// throttled together do not come back together).
fn backoff(strikes: u32) -> Duration {
    let base = BACKOFF_BASE
        .saturating_mul(1u32 << strikes.saturating_sub(1).min(8))
        .min(BACKOFF_MAX);
    let noise = {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
            ^ u64::from(strikes);
        let x = rotor_protocol::fnv1a(t.to_le_bytes());
        (x % 401) as f64 / 1000.0 - 0.2
    };
    base.mul_f64(1.0 + noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal says why by the block that ends first: a cooldown ending
    /// before a spent budget is "cooling", the other way round not; both
    /// ending together, cooling only if both cool.
    #[test]
    fn a_refusal_is_named_by_the_block_that_ends_first() {
        let folded = |blocks: &[(Ms, bool)]| blocks.iter().fold(None, |e, b| sooner(e, *b));
        assert_eq!(folded(&[(60, false), (30, true)]), Some((30, true)));
        assert_eq!(folded(&[(30, true), (60, false)]), Some((30, true)));
        assert_eq!(folded(&[(30, false), (60, true)]), Some((30, false)));
        assert_eq!(folded(&[(30, true), (30, false)]), Some((30, false)));
        assert_eq!(folded(&[(30, true), (30, true)]), Some((30, true)));
    }
    use rotor_protocol::{address_at, family_total};

    fn pool(n: u8) -> Vec<Segment> {
        (1..=n)
            .map(|i| Segment::single(IpAddr::from([10, 0, 0, i])))
            .collect()
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    /// An address moved into another's key keeps its host part under the
    /// key's bits (`--site-v6-prefix`); a key of one address moves none.
    #[test]
    fn an_address_is_moved_into_a_key() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let sites = Sites::new(Rules::default(), 100);
        assert_eq!(
            sites.into_key_of(ip("2001:db8:0:7::1"), ip("2001:db8:0:9:aaaa::5")),
            Some(ip("2001:db8:0:7:aaaa::5"))
        );
        assert_eq!(sites.into_key_of(ip("10.0.0.1"), ip("10.0.0.2")), None);
        let one = Rules::default().with_v6_prefix(128).unwrap();
        let sites = Sites::new(one, 100);
        assert_eq!(
            sites.into_key_of(ip("2001:db8::1"), ip("2001:db8::2")),
            None
        );
    }

    fn rules(specs: &[&str]) -> Rules {
        Rules::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    /// Leases for `site` until throttled (at most `n`): the addresses.
    fn take(s: &mut Sites, site: &str, active: &[Segment], n: usize, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            match s.lease(site, Families::V4, active, 0, now) {
                Answer::Start(f) => {
                    // As the allocator does: the shared rotation's next (1).
                    let total = family_total(active, f);
                    if s.started(site, ip(1), 0, total, now).is_some() {
                        out.push(1);
                    }
                }
                Answer::Address {
                    ip: IpAddr::V4(a), ..
                } => out.push(a.octets()[3]),
                _ => break,
            }
        }
        out
    }

    /// A start moved to when its request started: the first batch from
    /// the lease on gives it, the batches stay in order, and at
    /// [`BATCHES`] the moved start joins the batch after its place.
    #[test]
    fn a_start_is_moved_to_when_its_request_started() {
        let mut p = Pair {
            starts: [(100, 1), (200, 1), (300, 1)].into(),
            held: 3,
            ..Pair::default()
        };
        assert!(p.restamp(190, 500));
        assert_eq!(Vec::from(p.starts.clone()), [(100, 1), (300, 1), (500, 1)]);
        // Between others; a batch of more gives one.
        let mut p = Pair {
            starts: [(100, 3), (300, 1)].into(),
            held: 4,
            ..Pair::default()
        };
        p.restamp(50, 200);
        assert_eq!(Vec::from(p.starts.clone()), [(100, 2), (200, 1), (300, 1)]);
        // Counted at its start or later already, or no start from the
        // lease on: nothing moves.
        let before = p.starts.clone();
        assert!(!p.restamp(250, 300));
        assert!(!p.restamp(301, 900));
        assert_eq!(p.starts, before);
        // At the cap (a batch of two gives one): into the batch after its
        // place, or the last, which takes its time.
        let full: VecDeque<(Ms, u32)> = (1..=BATCHES as u64)
            .map(|t| (t * 10, 1 + u32::from(t == 1)))
            .collect();
        let held = BATCHES + 1;
        let mut p = Pair {
            starts: full.clone(),
            held,
            ..Pair::default()
        };
        p.restamp(10, 55);
        assert_eq!(
            Vec::from(p.starts.clone())[..6],
            [(10, 1), (20, 1), (30, 1), (40, 1), (50, 1), (60, 2)]
        );
        let mut p = Pair {
            starts: full,
            held,
            ..Pair::default()
        };
        p.restamp(10, 1000);
        assert_eq!(p.starts.back(), Some(&(1000, 2)));
        assert_eq!(p.starts.len(), BATCHES as usize);
        assert_eq!(p.starts.iter().map(|b| b.1).sum::<u32>(), held);
    }

    /// A site's budget is held from when its requests started: a start
    /// counted at its lease, moved to its connect half a second later,
    /// frees half a second later.
    #[test]
    fn a_start_moved_to_its_connect_frees_from_there() {
        let mut s = Sites::new(rules(&["a.com=2/1s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        assert_eq!(take(&mut s, "a.com", &active, 3, t0), [1, 1]);
        let window = Limit {
            count: 2,
            period: Duration::from_secs(1),
        }
        .window();
        let freed = t0 + window + Duration::from_millis(10);
        s.started_late("a.com", ip(1), (t0, t0 + Duration::from_millis(500)), freed);
        // One left the window; the other is held from its start.
        assert_eq!(take(&mut s, "a.com", &active, 3, freed), [1]);
        let later = freed + Duration::from_millis(500);
        assert_eq!(take(&mut s, "a.com", &active, 3, later), [1]);
        // A site with no budget moves nothing.
        assert!(!s.started_late("b.com", ip(1), (t0, later), later));
    }

    /// A budget over [`BATCHES`] keeps starts in batches timed by their
    /// last: a request whose start a later lease joined is moved, not
    /// counted again (it was, its batch's time being past its lease's).
    #[test]
    fn a_late_start_in_a_batch_is_moved_not_counted_twice() {
        let mut s = Sites::new(rules(&["a.com=64/1m"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        assert_eq!(take(&mut s, "a.com", &active, 1, t0), [1]);
        let b = t0 + Duration::from_millis(100);
        assert_eq!(take(&mut s, "a.com", &active, 1, b), [1]);
        let landed = t0 + Duration::from_millis(300);
        assert!(s.started_late("a.com", ip(1), (t0, landed), landed));
        let (_, p) = s.pairs.iter().next().unwrap();
        assert_eq!(p.held, 2);
    }

    /// A session's reserve outlasts its start by a moment: with a budget
    /// of 1, the session's next request, asking again a round trip after
    /// its start freed, finds the address; the site's other requests find
    /// it only after that.
    #[test]
    fn a_sessions_reserve_outlasts_its_start_by_a_moment() {
        let mut s = Sites::new(rules(&["a.com=1/1s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        s.session_use("a.com", ip(1), t0);
        let window = Limit {
            count: 1,
            period: Duration::from_secs(1),
        }
        .window();
        // Just past the start's window: the others wait still...
        let freed = t0 + window + Duration::from_millis(10);
        assert_eq!(take(&mut s, "a.com", &active, 1, freed), Vec::<u8>::new());
        // ...and the session's request goes.
        assert!(s.session_blocked("a.com", ip(1), false, freed).is_none());
        // Past the grace, with no session request, the others go.
        let later = t0 + window + RESERVE_GRACE + Duration::from_millis(10);
        assert_eq!(take(&mut s, "a.com", &active, 1, later), [1]);
    }

    /// A session's reserve lives through the grace past its start's
    /// window: the table's expiry dropped the pair, reserve and all, as its
    /// last start left, and the site's other requests took the budget.
    /// Several sessions on one address each keep room for their next, up
    /// to their share of the budget (half, rounded up).
    #[test]
    fn sessions_reserves_outlive_their_starts_and_add_up() {
        let mut s = Sites::new(rules(&["a.com=5/10s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        let window = Limit {
            count: 5,
            period: Duration::from_secs(10),
        }
        .window();
        // Four sessions on the one address, a request each.
        for i in 0..4 {
            s.session_use("a.com", ip(1), t0 + Duration::from_millis(i));
        }
        let due = t0 + window + Duration::from_millis(100);
        s.expire(due);
        // Their starts left the window; their next requests are due: the
        // others get two starts of five (the sessions' share is three).
        assert_eq!(take(&mut s, "a.com", &active, 5, due), [1, 1]);
        for _ in 0..3 {
            assert!(s.session_blocked("a.com", ip(1), false, due).is_none());
            s.session_use("a.com", ip(1), due);
        }
        assert!(s.session_blocked("a.com", ip(1), false, due).is_some());
    }

    /// A session held back at the sessions' share says so (it was told
    /// the address had spent its budget, with half of it left for the
    /// others); one held back by the budget spent says that.
    #[test]
    fn a_session_held_at_its_share_is_told_so() {
        let mut s = Sites::new(rules(&["a.com=4/1s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        s.session_use("a.com", ip(1), t0);
        s.session_use("a.com", ip(1), t0);
        // Half of 4 served to sessions, the rest free: alone, they go on.
        assert!(s.session_blocked("a.com", ip(1), false, t0).is_none());
        // Others wait: the sessions keep to their half.
        let (_, block) = s.session_blocked("a.com", ip(1), true, t0).unwrap();
        assert_eq!(block, Block::Shared);
        // The others take the rest: the budget is spent.
        assert_eq!(take(&mut s, "a.com", &active, 2, t0), [1, 1]);
        let (_, block) = s.session_blocked("a.com", ip(1), true, t0).unwrap();
        assert_eq!(block, Block::Budget);
    }

    /// Sessions asking as fast as they may, beside other requests for the
    /// site refused for its budget: the sessions keep to half of it, and
    /// the others get the rest (they got almost none: each start freed
    /// went to a session, and the sessions' reserve kept the others off).
    #[test]
    fn sessions_keep_to_half_a_budget_the_sites_other_requests_want() {
        let mut s = Sites::new(rules(&["a.com=4/1s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        let (mut sessions, mut others) = (0, 0);
        for step in 0..250u64 {
            let t = t0 + Duration::from_millis(20 * step);
            let mut session = |s: &mut Sites| {
                if s.session_blocked("a.com", ip(1), false, t).is_none() {
                    s.session_use("a.com", ip(1), t);
                    sessions += 1;
                }
            };
            // Sessions first at every step: they ask again at once.
            session(&mut s);
            session(&mut s);
            match take(&mut s, "a.com", &active, 1, t).len() {
                0 => s.others_refused("a.com", t),
                n => others += n,
            }
        }
        // 5 s of a budget of 4 a second.
        assert!(
            (20..=24).contains(&(sessions + others)),
            "{sessions} {others}"
        );
        assert!(others >= 8, "sessions {sessions}, others {others}");
        assert!(sessions >= 8, "sessions {sessions}, others {others}");
    }

    /// A request whose connect ended after its start left the window (its
    /// SYNs dropped past the period) is counted where it started: the
    /// next request's start, made meanwhile, had been moved in its place,
    /// and the window held one request fewer than the site saw.
    #[test]
    fn a_connect_that_outlasts_the_window_counts_where_it_lands() {
        let mut s = Sites::new(rules(&["a.com=2/1s"]), 1000);
        let active = pool(1);
        let t0 = Instant::now();
        let window = Limit {
            count: 2,
            period: Duration::from_secs(1),
        }
        .window();
        assert_eq!(take(&mut s, "a.com", &active, 1, t0), [1]);
        // Its start left the window; another request starts, on a
        // connection kept alive.
        let next = t0 + window + Duration::from_millis(100);
        assert_eq!(take(&mut s, "a.com", &active, 1, next), [1]);
        // The first request's connect ends now: two in the window.
        let landed = next + Duration::from_millis(100);
        assert!(s.started_late("a.com", ip(1), (t0, landed), landed));
        assert_eq!(take(&mut s, "a.com", &active, 1, landed), Vec::<u8>::new());
        // Its pair dropped meanwhile (idle): counted anew all the same.
        let mut s = Sites::new(rules(&["a.com=1/1s"]), 1000);
        assert_eq!(take(&mut s, "a.com", &active, 1, t0), [1]);
        let late = t0 + window * 3;
        s.expire(late);
        assert!(s.started_late("a.com", ip(1), (t0, late), late));
        assert_eq!(take(&mut s, "a.com", &active, 1, late), Vec::<u8>::new());
    }

    /// A site's own rotation goes on after the address it took last when
    /// the pool changes (a reload, a quarantine, a release), as the shared
    /// rotation does: its cursor, a place in the old generation's order,
    /// taken as it stood in the new one, gave an address twice running or
    /// skipped some.
    #[test]
    fn a_sites_rotation_goes_on_after_its_last_address_when_the_pool_changes() {
        let mut s = Sites::new(rules(&["a.com=1000/1m"]), 1000);
        let now = Instant::now();
        let lease = |s: &mut Sites, active: &[Segment], generation: u64| -> u8 {
            match s.lease("a.com", Families::V4, active, generation, now) {
                Answer::Start(f) => {
                    let total = family_total(active, f);
                    assert!(s.started("a.com", ip(1), 0, total, now).is_some());
                    1
                }
                Answer::Address {
                    ip: IpAddr::V4(a), ..
                } => a.octets()[3],
                _ => panic!("refused"),
            }
        };
        let eight = pool(8);
        let got: Vec<u8> = (0..5).map(|_| lease(&mut s, &eight, 1)).collect();
        assert_eq!(got, [1, 2, 3, 4, 5]);
        // Entries listed before it: 6 next, not 5 again.
        let mut more: Vec<Segment> = (20..=24).map(|i| Segment::single(ip(i))).collect();
        more.extend(pool(8));
        assert_eq!(lease(&mut s, &more, 2), 6);
        // Entries before it taken out: 7 next, none skipped.
        let fewer: Vec<Segment> = pool(8).into_iter().skip(3).collect();
        assert_eq!(lease(&mut s, &fewer, 3), 7);
        // The whole pool back (a release): after 7.
        assert_eq!(lease(&mut s, &eight, 4), 8);
        assert_eq!(lease(&mut s, &eight, 4), 1);
        // Its last address gone (the old order is not kept for each
        // site): at the same place, 3 after 1 in [1 2 3 …].
        let without_1: Vec<Segment> = pool(8).into_iter().skip(1).collect();
        assert_eq!(lease(&mut s, &without_1, 5), 3);
    }

    /// Starts counted past a pair's budget (`session_use` counts without
    /// a check: the lease's `session_blocked` is that) keep
    /// the pair's batches to `BATCHES`: each had been one more, without
    /// end while the session kept sending. The pair frees no sooner.
    #[test]
    fn a_sessions_requests_past_the_budget_keep_the_batches_bounded() {
        let mut s = Sites::new(rules(&["a.com=3/1m"]), 1000);
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            assert!(s.session_use("a.com", ip(1), now).is_some());
        }
        let (_, p) = s.pairs.iter().next().unwrap();
        assert!(p.starts.len() <= BATCHES as usize, "{}", p.starts.len());
        assert!(p.held >= 3, "{}", p.held);
        // Spent until the window holds fewer than 3: when the third
        // newest leaves it, exactly as if every start were kept.
        let limit = s.rules.limit_for("a.com");
        let w = limit.unwrap().window().as_millis() as u64;
        let last = s.ms(t0 + Duration::from_millis(9_999));
        let third_newest = s.ms(t0 + Duration::from_millis(9_997));
        let (free, cooling) = p.blocked(limit, last, false).unwrap();
        assert!(!cooling);
        assert_eq!(free, third_newest + w);
        // A larger budget (batches of 32 starts), sent past: the same.
        let mut s = Sites::new(rules(&["a.com=1000/1h"]), 1000);
        for i in 0..3_000u64 {
            s.session_use("a.com", ip(1), t0 + Duration::from_millis(i));
        }
        let (_, p) = s.pairs.iter().next().unwrap();
        assert!(p.starts.len() <= BATCHES as usize, "{}", p.starts.len());
        let limit = s.rules.limit_for("a.com");
        let w = limit.unwrap().window().as_millis() as u64;
        let (free, _) = p
            .blocked(limit, s.ms(t0 + Duration::from_millis(2_999)), false)
            .unwrap();
        // Frees once fewer than 1000 are held: a batch's span late at most
        // (its last start's time), never early.
        let exact = s.ms(t0 + Duration::from_millis(2_000)) + w;
        assert!(free >= exact && free <= exact + 32, "{free} {exact}");
    }

    /// The report names the `max` most recently used sites, newest first
    /// (ties by name).
    #[test]
    fn the_report_names_the_most_recently_used() {
        let mut s = Sites::new(rules(&[]), 1000);
        let t0 = Instant::now();
        let cool = Some(Duration::from_secs(600));
        for (i, name) in ["e.com", "b.com", "d.com", "a.com", "c.com"]
            .iter()
            .enumerate()
        {
            let now = t0 + Duration::from_millis(10 * i as u64);
            assert!(s.pushback(name, ip(1), 429, cool, now));
        }
        // Two used at one moment: by name.
        s.session_use("e.com", ip(1), t0 + Duration::from_millis(40));
        let names = |max| -> Vec<String> {
            let r = s.report(max, t0 + Duration::from_millis(50));
            r.sites.into_iter().map(|x| x.site).collect()
        };
        assert_eq!(names(3), ["c.com", "e.com", "a.com"]);
        assert_eq!(names(10), ["c.com", "e.com", "a.com", "d.com", "b.com"]);
        assert_eq!(names(0), Vec::<String>::new());
    }

    /// A site holding most of the table beside a few small ones: each
    /// pass that makes room frees an eighth of the table, not an entry
    /// or two (a pass over every pair, each new site's).
    #[test]
    fn making_room_frees_an_eighth_of_the_table() {
        let mut s = Sites::new(rules(&[]), 1000);
        let t0 = Instant::now();
        let cool = Some(Duration::from_secs(600));
        let v4 = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..880 {
            assert!(s.pushback("big.com", v4(i), 429, cool, t0));
        }
        for i in 0..40 {
            let now = t0 + Duration::from_millis(i + 1);
            assert!(s.pushback(&format!("small{i}.com"), v4(0), 429, cool, now));
        }
        let looks = s.room_looks;
        for i in 0..200 {
            let now = t0 + Duration::from_millis(100 + i);
            // The big site in use all along (the most recently used).
            s.session_use("big.com", v4(0), now);
            assert!(s.pushback(&format!("new{i}.com"), v4(0), 429, cool, now));
            assert!(s.entries() <= 1000, "{}", s.entries());
        }
        // 400 entries made: a pass per 125 at least, not one per site.
        assert!(s.room_looks - looks <= 5, "{}", s.room_looks - looks);
        // The big site, in use, was not forgotten to make the room.
        assert!(s.sites.contains_key("big.com"));
    }

    /// Push-backs from more addresses than the table holds, all for one
    /// site (a /64 pool): the cap holds (each was one more pair).
    #[test]
    fn push_backs_of_one_site_keep_to_the_cap() {
        let mut s = Sites::new(rules(&[]), 16);
        let t0 = Instant::now();
        for i in 1..=100u8 {
            s.pushback("a.com", ip(i), 429, Some(Duration::from_secs(600)), t0);
        }
        assert!(s.entries() <= 16, "{}", s.entries());
        // The first ones are still cooling.
        assert!(s.pairs.values().all(|p| p.cool_until > 0));
        // With no other site to forget, a full table was not looked over
        // for one (that look went over every pair: each of the site's
        // requests, under the allocator's lock, once one site filled it).
        assert_eq!(s.room_looks, 0);
        // One entry short of the cap, a new site's push-back (two entries:
        // the site and the pair) makes room for itself, not refused.
        let mut s = Sites::new(rules(&[]), 16);
        for i in 0..7 {
            s.pushback(
                &format!("s{i}.com"),
                ip(1),
                429,
                Some(Duration::from_secs(600)),
                t0,
            );
        }
        assert!(s.ensure("alone.com", true, t0));
        assert_eq!(s.entries(), 15);
        assert!(s.pushback("new.com", ip(1), 429, Some(Duration::from_secs(600)), t0));
        assert!(s.entries() <= 16, "{}", s.entries());
    }

    /// One budgeted site using more addresses within its period than the
    /// table holds: the addresses it cannot count are passed over, not
    /// served uncounted (each would have no budget at all), for those it
    /// counts while they have budget left; then it is refused, and once
    /// the period passes, served again.
    #[test]
    fn one_site_filling_the_table_is_refused_not_served_uncounted() {
        let mut s = Sites::new(rules(&["a.com=3/1m"]), 16);
        let t0 = Instant::now();
        let active = pool(40);
        // The site's entry and 15 pairs, each served its budget of 3.
        let got = take(&mut s, "a.com", &active, 100, t0);
        assert_eq!(got.len(), 45, "{got:?}");
        let mut each: HashMap<u8, usize> = HashMap::new();
        for a in &got {
            *each.entry(*a).or_default() += 1;
        }
        assert_eq!(each.len(), 15, "{each:?}");
        assert!(each.values().all(|n| *n == 3), "{each:?}");
        assert!(s.entries() <= 16);
        // Told to come back when the first of its pairs leaves its period,
        // not in a second (to be refused again).
        match s.lease("a.com", Families::V4, &active, 0, t0) {
            Answer::Throttled {
                cooling: false,
                retry_after,
            } => assert!(retry_after >= Duration::from_secs(59), "{retry_after:?}"),
            other => panic!("{other:?}"),
        }
        let later = t0 + Duration::from_secs(61);
        s.expire(later);
        assert!(!take(&mut s, "a.com", &active, 40, later).is_empty());
    }

    /// The same with a pool far wider than the walk's bound on addresses
    /// passed over (8 192 addresses): the site's counted addresses, behind
    /// its cursor, are gone back to, not out of reach.
    #[test]
    fn one_site_filling_the_table_of_a_wide_pool_keeps_its_counted_addresses() {
        let mut s = Sites::new(rules(&["a.com=3/1m"]), 16);
        let t0 = Instant::now();
        let active = vec!["10.1.0.0/19".parse::<Segment>().unwrap()];
        let mut each: HashMap<IpAddr, usize> = HashMap::new();
        for _ in 0..100 {
            match s.lease("a.com", Families::V4, &active, 0, t0) {
                Answer::Start(f) => {
                    let total = family_total(&active, f);
                    assert!(s.started("a.com", active[0].at(0), 0, total, t0).is_some());
                    *each.entry(active[0].at(0)).or_default() += 1;
                }
                Answer::Address { ip, .. } => *each.entry(ip).or_default() += 1,
                _ => break,
            }
        }
        assert_eq!(each.len(), 15, "{each:?}");
        assert!(each.values().all(|n| *n == 3), "{each:?}");
    }

    /// A dual-stack site that spent its IPv4 addresses (8 192 entries)
    /// and then filled the table with IPv6 ones: its pairs of both
    /// families are what it holds, but the IPv6 walk's jump back to its
    /// IPv6 pairs must not count the IPv4 ones' distance against the
    /// bound on addresses passed over (it refused with budget left).
    #[test]
    fn a_dual_stack_site_filling_the_table_keeps_its_counted_addresses_of_each_family() {
        let rules = rules(&["a.com=3/1m"]).with_v6_prefix(128).unwrap();
        let mut s = Sites::new(rules, 12_000);
        let t0 = Instant::now();
        let active = vec![
            "10.1.0.0/19".parse::<Segment>().unwrap(),
            "2001:db8::/112".parse::<Segment>().unwrap(),
        ];
        let serve = |s: &mut Sites, families: Families| {
            let mut n = 0;
            for _ in 0..40_000 {
                match s.lease("a.com", families, &active, 0, t0) {
                    Answer::Start(f) => {
                        let first = active.iter().find(|e| Family::of(&e.at(0)) == f).unwrap();
                        let total = family_total(&active, f);
                        let index = rotor_protocol::index_of(&active, first.at(0)).unwrap_or(0);
                        if s.started("a.com", first.at(0), index, total, t0).is_some() {
                            n += 1;
                        }
                    }
                    Answer::Address { .. } => n += 1,
                    _ => break,
                }
            }
            n
        };
        assert_eq!(serve(&mut s, Families::V4), 8_192 * 3);
        // The site's entry and 8 192 IPv4 pairs: 3 807 IPv6 pairs fit,
        // each served its budget of 3.
        assert_eq!(serve(&mut s, Families::V6), 3_807 * 3);
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Leases of IPv6 addresses for `site` until throttled (at most `n`),
    /// the shared rotation starting at `active`'s first address.
    fn take_v6(
        s: &mut Sites,
        site: &str,
        active: &[Segment],
        n: usize,
        now: Instant,
    ) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for _ in 0..n {
            match s.lease(site, Families::V6, active, 0, now) {
                Answer::Start(f) => {
                    let total = family_total(active, f);
                    let first = address_at(active, f, 0).unwrap();
                    if s.started(site, first, 0, total, now).is_some() {
                        out.push(first);
                    }
                }
                Answer::Address { ip, .. } => out.push(ip),
                _ => break,
            }
        }
        out
    }

    /// Sites count an IPv6 client by its /64: a budget and a cooldown
    /// hold a whole /64, however its addresses are listed.
    #[test]
    fn ipv6_sources_count_by_their_prefix() {
        let t0 = Instant::now();
        let slash64 = vec![Segment::prefix(v6("2001:db8:1::"), 64).unwrap()];
        // A /64 pool is one source: 2 a minute in all, not 2 an address.
        let mut s = Sites::new(rules(&["a.com=2/1m"]), 1000);
        assert_eq!(take_v6(&mut s, "a.com", &slash64, 10, t0).len(), 2);
        assert_eq!(s.pairs.len(), 1);
        assert!(matches!(
            s.lease("a.com", Families::V6, &slash64, 0, t0),
            Answer::Throttled { cooling: false, .. }
        ));
        // An address listed before a /64, the cursor far into the /64:
        // the spent /64 is passed to the rotation's end in a step, and the
        // wrap finds the address; then the /64's part before the cursor is
        // passed in a step too.
        let mixed = vec![
            Segment::single(v6("2001:db8:9::1")),
            Segment::prefix(v6("2001:db8:1::"), 64).unwrap(),
        ];
        let mut s = Sites::new(rules(&["a.com=1/1m"]), 1000);
        assert!(matches!(
            s.lease("a.com", Families::V6, &mixed, 0, t0),
            Answer::Start(Family::V6)
        ));
        let total = family_total(&mixed, Family::V6);
        let far = 1u64 << 40;
        let at = mixed[1].at(u128::from(far - 1));
        assert!(s.started("a.com", at, far, total, t0).is_some());
        assert_eq!(take_v6(&mut s, "a.com", &mixed, 5, t0), [mixed[0].base()]);
        // Both spent, from far into the /64 again: at the wrap the /64's
        // part before the cursor (2^40 addresses) is passed in a step.
        let site = s.sites.get_mut("a.com").unwrap();
        site.cursor[Family::V6.index()] = far;
        site.refused = Refused::default();
        assert!(matches!(
            s.lease("a.com", Families::V6, &mixed, 0, t0),
            Answer::Throttled { .. }
        ));
        // Counted by each address (128), as before.
        let per_address = rules(&["a.com=2/1m"]).with_v6_prefix(128).unwrap();
        let mut s = Sites::new(per_address, 1000);
        assert_eq!(take_v6(&mut s, "a.com", &slash64, 10, t0).len(), 10);

        // Addresses listed one by one, two /64s interleaved, and a third:
        // one of each, then none (the walk passes a /64's other addresses
        // once it found it spent).
        let singles: Vec<Segment> = [
            "2001:db8:1::1",
            "2001:db8:2::1",
            "2001:db8:1::2",
            "2001:db8:2::2",
            "2001:db8:3::1",
        ]
        .iter()
        .map(|a| Segment::single(v6(a)))
        .collect();
        let mut s = Sites::new(rules(&["a.com=1/1m"]), 1000);
        assert_eq!(
            take_v6(&mut s, "a.com", &singles, 10, t0),
            [
                v6("2001:db8:1::1"),
                v6("2001:db8:2::1"),
                v6("2001:db8:3::1")
            ]
        );

        // An address, then a /64: the spent /64 is passed in one step
        // (walked address by address, 2^44 of them, this would not end).
        let mixed = vec![
            Segment::single(v6("2001:db8:9::1")),
            Segment::prefix(v6("2001:db8:1::"), 64).unwrap(),
        ];
        let mut s = Sites::new(rules(&["a.com=1/1m"]), 1000);
        let got = take_v6(&mut s, "a.com", &mixed, 10, t0);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(
            s.lease("a.com", Families::V6, &mixed, 0, t0),
            Answer::Throttled { .. }
        ));

        // A /48 holds 65 536 sources: each lease a /64 not used yet.
        let slash48 = vec![Segment::prefix(v6("2001:db8:5::"), 48).unwrap()];
        let mut s = Sites::new(rules(&["a.com=1/1m"]), 100_000);
        let got = take_v6(&mut s, "a.com", &slash48, 300, t0);
        assert_eq!(got.len(), 300);
        let nets: HashSet<IpAddr> = got.iter().map(|ip| s.rules.key(*ip)).collect();
        assert_eq!(nets.len(), 300);

        // A /56 (256 /64s) is spent exactly: each of its /64s once, every
        // address inside it, then a refusal.
        let slash56 = vec![Segment::prefix(v6("2001:db8:6::"), 56).unwrap()];
        let mut s = Sites::new(rules(&["a.com=1/1m"]), 100_000);
        let got = take_v6(&mut s, "a.com", &slash56, 1000, t0);
        assert_eq!(got.len(), 256);
        assert!(got.iter().all(|ip| slash56[0].contains(*ip)));
        let nets: HashSet<IpAddr> = got.iter().map(|ip| s.rules.key(*ip)).collect();
        assert_eq!(nets.len(), 256);
        assert!(matches!(
            s.lease("a.com", Families::V6, &slash56, 0, t0),
            Answer::Throttled { .. }
        ));

        // A push-back on one address cools its whole /64 for the site.
        let mut s = Sites::new(rules(&[]), 1000);
        let one = Segment::prefix(v6("2001:db8:1::"), 64).unwrap().at(7);
        assert!(s.pushback("a.com", one, 429, Some(Duration::from_secs(60)), t0));
        assert_eq!(
            take_v6(&mut s, "a.com", &slash64, 5, t0),
            Vec::<IpAddr>::new()
        );
        assert!(matches!(
            s.lease("a.com", Families::V6, &slash64, 0, t0),
            Answer::Throttled { cooling: true, .. }
        ));
        assert!(s.pair("a.com", v6("2001:db8:1::")).is_some());
        assert_eq!(s.rules.shown(v6("2001:db8:1::")), "2001:db8:1::/64");
        // IPv4 sources are each their own.
        assert_eq!(s.rules.key(ip(7)), ip(7));

        assert!(Rules::default().with_v6_prefix(0).is_err());
        assert!(Rules::default().with_v6_prefix(129).is_err());
    }

    /// A kept file with absurd counts and times (it is the allocator's
    /// own, but not trusted) comes back without a panic or a wrap.
    #[test]
    fn absurd_kept_state_comes_back_bounded() {
        let t0 = Instant::now();
        let wall0 = 1_900_000_000_000;
        let saved = vec![
            SavedPair {
                site: "a.com".into(),
                source: ip(1),
                starts: vec![(wall0 - 10, u32::MAX), (wall0 - 5, u32::MAX)],
                cool_until_ms: Some(u64::MAX),
                strikes: u32::MAX,
                last_strike_ms: Some(wall0 - 1),
                unreached: u32::MAX,
                last_unreached_ms: Some(wall0 - 1),
            },
            SavedPair {
                site: "a.com".into(),
                source: ip(1),
                starts: vec![(wall0 - 1, 7)],
                cool_until_ms: None,
                strikes: 0,
                last_strike_ms: None,
                unreached: 0,
                last_unreached_ms: None,
            },
        ];
        let mut s = Sites::new(rules(&["a.com=5/1m"]), 1000);
        s.restore(saved, t0, wall0);
        let active = pool(2);
        assert_eq!(take(&mut s, "a.com", &active, 3, t0), [2, 2], "1 cools");
        s.expire(t0 + Duration::from_secs(3600));
    }

    /// A kept pair with more batches than a pair keeps (only an edited
    /// file holds them) comes back in `BATCHES`, every start kept.
    #[test]
    fn kept_pairs_come_back_in_the_batches() {
        let t0 = Instant::now();
        let wall0 = 1_900_000_000_000;
        let saved = vec![SavedPair {
            site: "a.com".into(),
            source: ip(1),
            starts: (0..1000).map(|k| (wall0 - 30_000 + k * 10, 1)).collect(),
            cool_until_ms: None,
            strikes: 0,
            last_strike_ms: None,
            unreached: 0,
            last_unreached_ms: None,
        }];
        let mut s = Sites::new(rules(&["a.com=2000/1m"]), 1000);
        assert_eq!(s.restore(saved, t0, wall0), 1);
        let id = s.sites.get("a.com").unwrap().id;
        let p = &s.pairs[&(id, ip(1))];
        assert_eq!(p.starts.len(), BATCHES as usize);
        assert_eq!(p.held, 1000);
        assert_eq!(p.starts.iter().map(|b| b.1).sum::<u32>(), 1000);
    }

    /// Two pairs of 32 batches each make one of 32 at most, every start
    /// kept and none leaving the window earlier than it would have.
    #[test]
    fn merged_pairs_keep_to_the_batches() {
        let pair = |from: Ms| {
            let mut p = Pair::default();
            for k in 0..64 {
                p.record(64, from + k);
            }
            p
        };
        let mut a = pair(1000);
        assert_eq!(a.starts.len(), 32);
        a.merge(pair(1001));
        assert!(a.starts.len() <= 32, "{}", a.starts.len());
        assert_eq!(a.held, 128);
        assert_eq!(a.starts.iter().map(|b| b.1).sum::<u32>(), 128);
        assert_eq!(a.starts.back().unwrap().0, 1064);
        assert!(a
            .starts
            .iter()
            .zip(a.starts.iter().skip(1))
            .all(|(x, y)| x.0 <= y.0));
    }

    /// State kept per address (an older allocator, or a longer
    /// --site-v6-prefix) comes back added up per /64.
    #[test]
    fn kept_ipv6_state_is_added_up_by_prefix() {
        let t0 = Instant::now();
        let wall0 = 1_900_000_000_000;
        let slash64 = vec![Segment::prefix(v6("2001:db8:1::"), 64).unwrap()];
        let per_address = rules(&["a.com=3/1m"]).with_v6_prefix(128).unwrap();
        let mut s = Sites::new(per_address, 1000);
        assert_eq!(take_v6(&mut s, "a.com", &slash64, 2, t0).len(), 2);
        let other = Segment::prefix(v6("2001:db8:1::"), 64).unwrap().at(9);
        s.pushback("b.com", other, 429, Some(Duration::from_secs(60)), t0);
        s.pushback(
            "b.com",
            slash64[0].at(3),
            429,
            Some(Duration::from_secs(5)),
            t0,
        );
        let saved = s.snapshot(t0, wall0);
        assert_eq!(saved.len(), 4);

        let mut s2 = Sites::new(rules(&["a.com=3/1m"]), 1000);
        assert_eq!(s2.restore(saved, t0, wall0), 4);
        assert_eq!(s2.pairs.len(), 2, "one pair a site");
        // The two starts are the /64's: one left of 3.
        assert_eq!(take_v6(&mut s2, "a.com", &slash64, 10, t0).len(), 1);
        // The longer cooldown holds.
        let (until, _) = s2.pair("b.com", v6("2001:db8:1::")).unwrap();
        assert!(until - t0 > Duration::from_secs(50));
    }

    #[test]
    fn limits_parse_and_name_sites() {
        let r = rules(&["example.com=60/1m", "127.0.0.1=5/1s", "*=10/1s"]);
        assert_eq!(
            r.limit_for("example.com"),
            Some(Limit {
                count: 60,
                period: Duration::from_secs(60)
            })
        );
        assert_eq!(r.limit_for("other.org").unwrap().count, 10);
        for bad in [
            "www.example.com=1/1s",
            "example.com",
            "example.com=0/1s",
            "example.com=5/soon",
            "=1/1s",
            "example.com=5",
            "example.com:8080=1/1s",
            "https://example.com=1/1s",
            "bücher.de=1/1s",
            // Numbers no request may name (review ar: accepted, and
            // matched nothing), and what the refusal of `127.0.1.02` had
            // told to write.
            "127.1=1/1s",
            "2130706433=1/1s",
            "0x7f000001=1/1s",
            "1.02=1/1s",
            "127.0.1.02=1/1s",
        ] {
            assert!(Rules::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        let e = Rules::parse(&["127.1=1/1s".into()]).unwrap_err();
        assert!(e.contains("dotted decimal"), "{e}");
        let e = Rules::parse(&["127.0.1.02=1/1s".into()]).unwrap_err();
        assert!(!e.contains("`1.02`"), "{e}");
        assert!(
            Rules::parse(&["[2001:db8::1]=1/1s".into(), "xn--bcher-kva.de=1/1s".into()]).is_ok()
        );
        // An address in any spelling is the site requests to it are.
        for spelled in ["2001:DB8:0::1", "[2001:db8:0:0::1]", "::ffff:10.0.0.1"] {
            let r = Rules::parse(&[format!("{spelled}=1/1s")]).unwrap();
            let site = rotor_protocol::site_of(spelled);
            assert!(r.limit_for(&site).is_some(), "{spelled}: {r}");
        }
        let e = Rules::parse(&["api.example.co.uk=1/1s".into()]).unwrap_err();
        assert!(e.contains("`example.co.uk`"), "{e}");
        // A public suffix would cover nothing under it.
        // (A top-level one too: it was taken for a host's own name.)
        for suffix in [
            "co.uk=1/1s",
            "github.io=1/1s",
            "CO.UK.=1/1s",
            "com=1/1s",
            "io.=1/1s",
        ] {
            let e = Rules::parse(&[suffix.into()]).unwrap_err();
            assert!(e.contains("public suffix"), "{e}");
        }
        let own = ["localhost=1/1s", "intranet=1/1s", "b.github.io=1/1s"];
        assert!(Rules::parse(&own.map(String::from)).is_ok());
        // One budget a site: a second (which had silently won) is refused.
        for two in [["a.io=1/1s", "A.io=2/1s"], ["*=1/1s", "*=2/1s"]] {
            let e = Rules::parse(&two.map(String::from)).unwrap_err();
            assert!(e.contains("two budgets"), "{e}");
        }
    }

    #[test]
    fn budgets_used_and_cooldowns_outlive_a_restart() {
        let active = pool(3);
        let t0 = Instant::now();
        let wall0 = 1_900_000_000_000;
        let secs = Duration::from_secs;
        let mut s = Sites::new(rules(&["a.com=2/1m"]), 1000);
        // a.com: every address's budget spent, half of it 30 s ago.
        assert_eq!(take(&mut s, "a.com", &active, 3, t0 - secs(30)).len(), 3);
        assert_eq!(take(&mut s, "a.com", &active, 9, t0 - secs(10)).len(), 3);
        // b.com: .2 told to wait an hour; c.com: .1 pushed back a minute
        // ago (its cooldown over, its repeat remembered).
        s.pushback("b.com", ip(2), 429, Some(secs(3600)), t0 - secs(5));
        s.pushback("c.com", ip(1), 429, Some(secs(2)), t0 - secs(60));
        let saved = s.snapshot(t0, wall0);
        assert_eq!(saved.len(), 5);
        assert_eq!(saved[0].site, "b.com", "cooling pairs first");
        // As the file carries them.
        let text = serde_json::to_string(&saved).unwrap();
        let saved: Vec<SavedPair> = serde_json::from_str(&text).unwrap();

        // Back 20 s later, on another clock.
        let t1 = t0 + secs(20);
        let wall1 = wall0 + 20_000;
        // One pair far in the future (an edit, a bit flipped) is dropped,
        // not taken for the clock, which had ended every other.
        let mut bogus = saved.clone();
        bogus.push(SavedPair {
            site: "z.com".into(),
            source: ip(9),
            starts: vec![(wall0 + 10 * 365 * 86_400_000, 1)],
            cool_until_ms: None,
            strikes: 0,
            last_strike_ms: None,
            unreached: 0,
            last_unreached_ms: None,
        });
        let mut s3 = Sites::new(rules(&["a.com=2/1m"]), 1000);
        assert_eq!(s3.restore(bogus, t1, wall1), 5);
        assert_eq!(take(&mut s3, "a.com", &active, 3, t1), [0u8; 0]);
        let mut s2 = Sites::new(rules(&["a.com=2/1m"]), 1000);
        assert_eq!(s2.restore(saved.clone(), t1, wall1), 5);
        assert_eq!(take(&mut s2, "a.com", &active, 3, t1), [0u8; 0]);
        match s2.lease("a.com", Families::V4, &active, 0, t1) {
            // The first starts leave the window (61 s) at t0 + 31 s.
            Answer::Throttled {
                retry_after,
                cooling: false,
            } => assert_eq!(retry_after, secs(11)),
            other => panic!("a.com's budget was forgotten: {other:?}"),
        }
        assert_eq!(take(&mut s2, "a.com", &active, 9, t1 + secs(12)).len(), 3);
        let (until, strikes) = s2.pair("b.com", ip(2)).unwrap();
        assert_eq!(strikes, 1);
        let left = until - t1;
        assert!(left > secs(3574) && left <= secs(3575), "{left:?}");
        assert_eq!(s2.cooling_by_address(t1).get(&ip(2)), Some(&1));
        assert!(!take(&mut s2, "b.com", &active, 4, t1).contains(&2));
        let (_, words) = s2.filter();
        let bit = site_bit("b.com");
        assert!(
            words[bit / 64] & (1 << (bit % 64)) != 0,
            "workers ask for b.com"
        );
        // c.com's next push-back is its second: 60 s, jittered.
        s2.pushback("c.com", ip(1), 429, None, t1);
        let (until, strikes) = s2.pair("c.com", ip(1)).unwrap();
        assert_eq!(strikes, 2);
        assert!(until - t1 >= secs(47) && until - t1 <= secs(73));

        // A wall clock an hour behind at the restart (before NTP set it):
        // the window's starts are not dropped as "in the future" — now is
        // at least the file's time of writing (`state::take_kept` passes
        // the later of the two) and the newest time it holds — and the
        // hour's cooldown comes back no longer than it was. (Without that
        // floor, pairs with times more than a minute past the clock are
        // not believed.)
        let mut behind = Sites::new(rules(&["a.com=2/1m"]), 1000);
        let written = wall0;
        assert_eq!(
            behind.restore(saved.clone(), t1, (wall0 - 3_600_000).max(written)),
            5
        );
        let mut alone = Sites::new(rules(&["a.com=2/1m"]), 1000);
        assert!(alone.restore(saved.clone(), t1, wall0 - 3_600_000) < 5);
        assert_eq!(
            take(&mut behind, "a.com", &active, 3, t1),
            [0u8; 0],
            "a.com's budget forgotten with the clock behind"
        );
        let (until, _) = behind.pair("b.com", ip(2)).unwrap();
        assert!(until - t1 <= secs(3600), "{:?}", until - t1);

        // Budgets changed over the restart: a.com has none now.
        let mut s3 = Sites::new(Rules::default(), 1000);
        assert_eq!(s3.restore(saved.clone(), t1, wall1), 2);
        assert_eq!(
            s3.lease("a.com", Families::V4, &active, 0, t1),
            Answer::Shared
        );
        // Back two days later: everything ended.
        let mut s4 = Sites::new(rules(&["a.com=2/1m"]), 1000);
        assert_eq!(
            s4.restore(saved, t1 + secs(172_800), wall1 + 172_800_000),
            0
        );
        assert_eq!(s4.entries(), 0);

        // Over a smaller cap, the cooling pairs are kept first.
        let mut s = Sites::new(Rules::default(), 1000);
        for i in 0..10 {
            s.pushback(&format!("cool{i}.com"), ip(1), 429, Some(secs(600)), t0);
            s.pushback(
                &format!("warm{i}.com"),
                ip(1),
                429,
                Some(secs(1)),
                t0 - secs(9),
            );
        }
        let saved = s.snapshot(t0, wall0);
        assert_eq!(saved.len(), 20);
        let mut small = Sites::new(Rules::default(), 16);
        assert_eq!(small.restore(saved, t0, wall0), 8);
        assert_eq!(small.entries(), 16);
        assert_eq!(small.cooling_by_address(t0).get(&ip(1)), Some(&8));
    }

    #[test]
    fn budgets_skip_spent_addresses_in_rotation_order() {
        let active = pool(4);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["a.com=2/1s"]), 1000, t0);
        // Two rounds of the site's own rotation, then nothing left.
        assert_eq!(
            take(&mut s, "a.com", &active, 20, t0),
            [1, 2, 3, 4, 1, 2, 3, 4]
        );
        match s.lease(
            "a.com",
            Families::V4,
            &active,
            0,
            t0 + Duration::from_millis(300),
        ) {
            Answer::Throttled {
                retry_after,
                cooling,
            } => {
                // The window is the period and its margin (50 ms).
                assert_eq!(retry_after, Duration::from_millis(750));
                assert!(!cooling);
            }
            other => panic!("{other:?}"),
        }
        // Once the window slid: the next round, in order.
        let t1 = t0 + Duration::from_millis(1050);
        assert_eq!(take(&mut s, "a.com", &active, 3, t1), [1, 2, 3]);
        // Unbudgeted sites are not held at all.
        assert_eq!(
            s.lease("b.com", Families::V4, &active, 0, t1),
            Answer::Shared
        );
        // Within a window, an address still with budget is taken in turn.
        let mut s = Sites::with_epoch(rules(&["a.com=1/1s"]), 1000, t0);
        assert_eq!(take(&mut s, "a.com", &active, 2, t0), [1, 2]);
        let t = t0 + Duration::from_millis(1500);
        // 1 and 2 freed; the cursor is at 3.
        assert_eq!(take(&mut s, "a.com", &active, 10, t), [3, 4, 1, 2]);
    }

    /// The margin a start holds its place past the period: 2 %, at least
    /// 50 ms (a new connection's request reaches the site a connect after
    /// a kept-alive one's: one of 20 ms or more moves its start, one
    /// shorter and the jitter are what it covers), half the period at
    /// most, 1 s at most.
    #[test]
    fn the_margin_covers_a_connects_round_trip() {
        let window = |period: Duration| Limit { count: 5, period }.window();
        let ms = Duration::from_millis;
        assert_eq!(window(ms(1000)), ms(1050));
        assert_eq!(window(ms(10_000)), ms(10_200));
        assert_eq!(window(ms(100)), ms(150));
        assert_eq!(window(Duration::from_secs(3600)), Duration::from_secs(3601));
    }

    #[test]
    fn large_budgets_are_kept_in_batches_and_never_exceeded() {
        let t0 = Instant::now();
        let limit = Limit {
            count: 100,
            period: Duration::from_secs(1),
        };
        let w = limit.window().as_millis() as u64;
        let mut p = Pair::default();
        let mut starts = Vec::new();
        // A client asking every 3 ms for 10 s, served whenever allowed.
        let mut t = 1;
        while t < 10_000 {
            p.prune(Some(w), t);
            if p.blocked(Some(limit), t, true).is_none() {
                p.record(limit.count, t);
                starts.push(t);
            }
            assert!(p.starts.len() <= BATCHES as usize + 1, "{}", p.starts.len());
            t += 3;
        }
        let _ = t0;
        // No window holds more than the budget...
        for (i, s) in starts.iter().enumerate() {
            let within = starts[i..].iter().take_while(|x| **x < s + w).count();
            assert!(within <= 100, "{within} starts within a window from {s}");
        }
        // ...and the batches cost little of it: 100 per 1.1 s at best.
        let rate = starts.len() as f64 / 10.0;
        assert!(rate > 90.0, "{rate} per second");
        eprintln!("large budget served at {rate} per second of 100");
    }

    #[test]
    fn pushback_cools_one_address_for_one_site() {
        let active = pool(3);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        assert!(s.pushback("a.com", ip(2), 429, Some(Duration::from_secs(5)), t0));
        assert!(
            !s.pushback("a.com", ip(2), 429, Some(Duration::from_secs(1)), t0),
            "already cooling"
        );
        assert_eq!(
            s.pair("a.com", ip(2)).unwrap().1,
            1,
            "one repeat per cooldown"
        );
        assert_eq!(take(&mut s, "a.com", &active, 4, t0), [1, 3, 1, 3]);
        assert_eq!(
            s.lease("b.com", Families::V4, &active, 0, t0),
            Answer::Shared
        );
        // Every address cooling: throttled until the first comes back.
        s.pushback("a.com", ip(1), 429, Some(Duration::from_secs(3)), t0);
        s.pushback("a.com", ip(3), 429, Some(Duration::from_secs(9)), t0);
        assert_eq!(
            s.lease("a.com", Families::V4, &active, 0, t0),
            Answer::Throttled {
                retry_after: Duration::from_secs(3),
                cooling: true
            }
        );
        let t = t0 + Duration::from_secs(6);
        s.expire(t);
        match s.lease("a.com", Families::V4, &active, 0, t) {
            Answer::Address { ip: a, watch, .. } => {
                assert!(a == ip(1) || a == ip(2));
                assert!(watch, "a pair with repeats asks to hear how it went");
                s.answered("a.com", a, t);
            }
            other => panic!("{other:?}"),
        }
        // Without Retry-After: 30 s doubling, jittered, capped.
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        let mut last = Duration::ZERO;
        for strike in 1..=8u32 {
            s.pushback("c.com", ip(1), 429, None, t0 + last);
            let until = s.pair("c.com", ip(1)).unwrap().0;
            let wait = until - (t0 + last);
            let base = BACKOFF_BASE
                .saturating_mul(1 << (strike - 1))
                .min(BACKOFF_MAX);
            assert!(
                wait >= base.mul_f64(0.79) && wait <= base.mul_f64(1.21),
                "{strike}: {wait:?}"
            );
            last += wait;
        }
        // A normal answer starts the backoff over.
        s.answered("c.com", ip(1), t0 + last);
        s.pushback(
            "c.com",
            ip(1),
            429,
            None,
            t0 + last + Duration::from_secs(1),
        );
        assert_eq!(s.pair("c.com", ip(1)).unwrap().1, 1);
    }

    /// A pair whose cooldown ended with its repeats not cleared takes one
    /// request at a time, its probe: the next waits for its answer (a
    /// normal one frees the pair; a push-back cools it again, and the next
    /// probe goes when that ends), or for [`PROBE_HOLD`]. Sessions too.
    /// Before, every request waiting for the site went to the address at
    /// once, into a site still limiting it.
    #[test]
    fn a_pair_whose_cooldown_ended_takes_one_probe_at_a_time() {
        let active = pool(1);
        // A lease as the allocator makes it (a site's rotation starts on
        // the shared rotation's next: the one address).
        let lease =
            |s: &mut Sites, at: Instant| match s.lease("a.com", Families::V4, &active, 0, at) {
                Answer::Start(f) => {
                    match s.started("a.com", ip(1), 0, family_total(&active, f), at) {
                        Some(watch) => Answer::Address {
                            ip: ip(1),
                            index: 0,
                            watch,
                        },
                        None => s.lease("a.com", Families::V4, &active, 0, at),
                    }
                }
                other => other,
            };
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        let one_sec = Some(Duration::from_secs(1));
        assert!(s.pushback("a.com", ip(1), 429, one_sec, t0));
        let cooling = |until: u64, at: u64| Answer::Throttled {
            retry_after: Duration::from_millis(until - at),
            cooling: true,
        };
        assert_eq!(lease(&mut s, t0), cooling(1000, 0));
        // Its cooldown over: one request, the probe, asks for its answer.
        let probe = lease(&mut s, ms(1000));
        assert!(
            matches!(probe, Answer::Address { watch: true, .. }),
            "{probe:?}"
        );
        // The next is held for the probe's answer, as by a cooldown.
        assert_eq!(lease(&mut s, ms(1100)), cooling(1000 + PROBE_HOLD_MS, 1100));
        assert_eq!(
            s.session_blocked("a.com", ip(1), false, ms(1100)),
            Some((Duration::from_millis(PROBE_HOLD_MS - 100), Block::Cooling))
        );
        // Pushed back again: it cools (its repeat counted), and the next
        // probe goes when that cooldown ends, not the hold.
        assert!(s.pushback("a.com", ip(1), 429, one_sec, ms(1200)));
        assert_eq!(s.pair("a.com", ip(1)).unwrap().1, 2);
        assert!(matches!(
            lease(&mut s, ms(2200)),
            Answer::Address { watch: true, .. }
        ));
        // No answer within the hold (a request that failed): another probe.
        assert!(matches!(
            lease(&mut s, ms(2300)),
            Answer::Throttled { cooling: true, .. }
        ));
        let after_hold = 2200 + PROBE_HOLD_MS;
        assert!(matches!(
            lease(&mut s, ms(after_hold)),
            Answer::Address { watch: true, .. }
        ));
        // A normal answer frees the pair (the remembered refusal too): the
        // rest go, their answers no longer asked for.
        assert!(matches!(
            lease(&mut s, ms(after_hold + 10)),
            Answer::Throttled { .. }
        ));
        assert!(s.answered("a.com", ip(1), ms(after_hold + 20)));
        for n in 0..3 {
            let got = lease(&mut s, ms(after_hold + 30 + n));
            assert!(
                matches!(got, Answer::Address { watch: false, .. }),
                "{got:?}"
            );
        }
        assert!(
            !s.answered("a.com", ip(1), ms(after_hold + 40)),
            "no probe held"
        );
        // A pair cooled by failed connects: its probe's connect frees it.
        let active = pool(3);
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        assert!(!s.unreached("b.com", ip(2), (&active, 0), secs(0)));
        assert!(s.unreached("b.com", ip(2), (&active, 0), secs(10)));
        let until = s.pair("b.com", ip(2)).unwrap().0;
        let over = until + Duration::from_secs(1);
        let got = take(&mut s, "b.com", &active, 6, over);
        assert_eq!(got.iter().filter(|a| **a == 2).count(), 1, "{got:?}");
        // Held while a connect may take (past a push-back's hold).
        let later = over + PROBE_HOLD + Duration::from_secs(1);
        let got = take(&mut s, "b.com", &active, 6, later);
        assert!(!got.contains(&2), "{got:?}");
        assert!(s.connected("b.com", ip(2), later));
        let got = take(&mut s, "b.com", &active, 6, over);
        assert_eq!(got.iter().filter(|a| **a == 2).count(), 2, "{got:?}");
    }

    /// Connects from one address that fail while the site answers the
    /// others: the first is a suspicion (no cooldown, but the pair's
    /// leases ask for their answer, and a new connect clears it); reports
    /// of the same event (other workers', within 10 s) add nothing; a
    /// later one before any connect cools the pair for that site alone,
    /// 60 s doubling.
    #[test]
    fn connects_failing_twice_to_a_site_cool_the_address_for_it() {
        let active = pool(3);
        let t0 = Instant::now();
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        assert!(!s.unreached("a.com", ip(2), (&active, 0), t0));
        assert_eq!(s.pair("a.com", ip(2)).unwrap().1, 1);
        // Still served, watched; other addresses are not.
        let mut watched = Vec::new();
        for _ in 0..3 {
            match s.lease("a.com", Families::V4, &active, 0, t0) {
                Answer::Start(_) => {
                    assert_eq!(s.started("a.com", ip(1), 0, 3, t0), Some(false));
                }
                Answer::Address { ip: a, watch, .. } => watched.push((a, watch)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(watched, [(ip(2), true), (ip(3), false)]);
        // Every worker's report of one moment's refusal: one event.
        for n in 1..=9 {
            assert!(!s.unreached("a.com", ip(2), (&active, 0), secs(n)), "{n}");
        }
        assert_eq!(s.pair("a.com", ip(2)).unwrap().1, 1);
        // Connected since (a site that was restarting): the next failure
        // is a suspicion again, not a cooldown.
        s.connected("a.com", ip(2), secs(11));
        assert!(!s.unreached("a.com", ip(2), (&active, 0), secs(12)));
        assert_eq!(take(&mut s, "a.com", &active, 3, secs(12)), [1, 2, 3]);
        // A later one with no connect between: cooling, for this site alone.
        assert!(s.unreached("a.com", ip(2), (&active, 0), secs(22)));
        let (until, strikes) = s.pair("a.com", ip(2)).unwrap();
        assert_eq!(strikes, 2);
        let wait = until - secs(22);
        assert!(
            wait >= BACKOFF_BASE.mul_f64(2.0 * 0.79) && wait <= BACKOFF_BASE.mul_f64(2.0 * 1.21),
            "{wait:?}"
        );
        assert_eq!(take(&mut s, "a.com", &active, 4, secs(22)), [1, 3, 1, 3]);
        assert_eq!(
            s.lease("b.com", Families::V4, &active, 0, secs(22)),
            Answer::Shared
        );
        // A failure of a connect begun before the cooldown changes nothing.
        assert!(!s.unreached("a.com", ip(2), (&active, 0), secs(23)));
        assert_eq!(s.pair("a.com", ip(2)).unwrap(), (until, 2));
        // After it, failing again: twice as long.
        let after = until + Duration::from_secs(1);
        assert!(s.unreached("a.com", ip(2), (&active, 0), after));
        let (until, strikes) = s.pair("a.com", ip(2)).unwrap();
        assert_eq!(strikes, 3);
        assert!(until - after >= BACKOFF_BASE.mul_f64(4.0 * 0.79));
        // Kept over a restart.
        let back = || {
            let mut b = Sites::with_epoch(Rules::default(), 1000, t0);
            b.restore(s.snapshot(after, 5_000_000), after, 5_000_000);
            b
        };
        assert_eq!(back().pair("a.com", ip(2)).unwrap().1, 3);
        // Push-backs and failed connects are counted apart: a new connect
        // clears these alone (it says nothing of rate limits), a normal
        // answer those alone (it may come on a connection opened before
        // a ban on new ones).
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        s.pushback("c.com", ip(1), 429, Some(Duration::from_secs(1)), t0);
        assert!(!s.unreached("c.com", ip(1), (&active, 0), secs(5)));
        assert_eq!(s.pair("c.com", ip(1)).unwrap().1, 2);
        s.connected("c.com", ip(1), secs(6));
        assert_eq!(s.pair("c.com", ip(1)).unwrap().1, 1);
        assert!(
            !s.unreached("c.com", ip(1), (&active, 0), secs(7)),
            "a suspicion again"
        );
        s.answered("c.com", ip(1), secs(8));
        assert_eq!(s.pair("c.com", ip(1)).unwrap().1, 1, "the suspicion stands");
        assert!(s.unreached("c.com", ip(1), (&active, 0), secs(17)));
        // A busy banned pair, told every second (each worker's report):
        // cooling from the first report 10 s after the suspicion.
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        let cooled: Vec<u64> = (0..16)
            .filter(|n| s.unreached("f.com", ip(1), (&active, 0), secs(*n)))
            .collect();
        assert_eq!(cooled, [10]);
        // A suspicion is forgotten after 10 min: a failure then is one
        // again, not a cooldown.
        assert!(!s.unreached("d.com", ip(1), (&active, 0), t0));
        assert!(!s.unreached("d.com", ip(1), (&active, 0), t0 + SUSPICION_KEPT));
        assert_eq!(s.pair("d.com", ip(1)).unwrap().1, 1);
        s.expire(t0 + SUSPICION_KEPT * 2 + Duration::from_secs(1));
        assert!(s.pair("d.com", ip(1)).is_none());
        // IPv6 sources counted by a prefix wider than a /64 (the workers'
        // unit): not heard.
        let mut s = Sites::with_epoch(Rules::default().with_v6_prefix(56).unwrap(), 1000, t0);
        assert!(!s.unreached("e.com", "fd00::1".parse().unwrap(), (&active, 0), t0));
        assert!(!s.unreached("e.com", "fd00::1".parse().unwrap(), (&active, 0), secs(20)));
        assert_eq!(s.entries(), 0);
    }

    /// A site refusing new connects from every address at once (its SYN
    /// backlog full) begins cooling a quarter of the family's sources for
    /// itself at most in 10 min; the rest stay suspicions. A source's
    /// later cooldowns are neither counted nor held back.
    #[test]
    fn failed_connects_cool_a_quarter_of_the_pool_for_a_site_at_most() {
        let active = pool(8);
        let t0 = Instant::now();
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        for i in 1..=8 {
            assert!(!s.unreached("g.com", ip(i), (&active, 0), t0));
        }
        let cooled: Vec<u8> = (1..=8)
            .filter(|i| s.unreached("g.com", ip(*i), (&active, 0), secs(20)))
            .collect();
        assert_eq!(cooled, [1, 2]);
        // A cooled one's next cooldown is not held back.
        let until = s.pair("g.com", ip(1)).unwrap().0;
        let after = until + Duration::from_secs(1);
        assert!(s.unreached("g.com", ip(1), (&active, 0), after));
        // The window over, two more may begin.
        let later = t0 + CONNECT_COOLS_WINDOW + Duration::from_secs(30);
        let cooled: Vec<u8> = (3..=8)
            .filter(|i| s.unreached("g.com", ip(*i), (&active, 0), later))
            .collect();
        assert_eq!(
            cooled.len(),
            0,
            "their suspicions were forgotten: {cooled:?}"
        );
        // (Suspicions are kept 10 min: raised again, then cooled.)
        let again = later + Duration::from_secs(20);
        let cooled: Vec<u8> = (3..=8)
            .filter(|i| s.unreached("g.com", ip(*i), (&active, 0), again))
            .collect();
        assert_eq!(cooled, [3, 4]);
        // A pool of three: one at least.
        let small = pool(3);
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        for i in 1..=3 {
            s.unreached("k.com", ip(i), (&small, 0), t0);
        }
        let cooled: Vec<u8> = (1..=3)
            .filter(|i| s.unreached("k.com", ip(*i), (&small, 0), secs(20)))
            .collect();
        assert_eq!(cooled, [1]);
        // Sources are keys: a /48 of IPv6 is 65 536 /64s.
        let v6 = [Segment::prefix("2001:db8::".parse().unwrap(), 48).unwrap()];
        assert_eq!(Rules::default().keys(&v6, Family::V6), 65_536);
        assert_eq!(Rules::default().keys(&v6, Family::V4), 0);
        assert_eq!(Rules::default().keys(&active, Family::V4), 8);
        let one_64: Vec<Segment> = ["2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"]
            .iter()
            .map(|a| Segment::single(a.parse().unwrap()))
            .collect();
        assert_eq!(Rules::default().keys(&one_64, Family::V6), 2);
    }

    /// A push-back 30 min old is forgotten though its pair is kept by
    /// its budget's starts: its leases no longer ask for the answer (every
    /// tunnel would be told, for ever), and the next push-back starts the
    /// backoff over.
    #[test]
    fn old_pushbacks_are_forgotten_on_a_pair_kept_by_its_budget() {
        let active = pool(1);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["a.com=1000/1h"]), 1000, t0);
        assert_eq!(take(&mut s, "a.com", &active, 1, t0), [1]);
        s.pushback("a.com", ip(1), 429, Some(Duration::from_secs(1)), t0);
        s.pushback("a.com", ip(1), 429, None, t0 + Duration::from_secs(2));
        assert_eq!(s.pair("a.com", ip(1)).unwrap().1, 2);
        let later = t0 + STRIKES_KEPT + Duration::from_secs(120);
        s.expire(later);
        match s.lease("a.com", Families::V4, &active, 0, later) {
            Answer::Address { watch, .. } => assert!(!watch),
            other => panic!("{other:?}"),
        }
        s.pushback("a.com", ip(1), 429, None, later);
        assert_eq!(s.pair("a.com", ip(1)).unwrap().1, 1);
    }

    /// A normal answer that comes while the pair cools is to a request
    /// sent before the push-back: the repeats stand, and the next
    /// push-back after the cooldown waits twice as long.
    #[test]
    fn an_answer_in_flight_during_a_cooldown_keeps_the_repeats() {
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(Rules::default(), 1000, t0);
        s.pushback("c.com", ip(1), 429, None, t0);
        let until = s.pair("c.com", ip(1)).unwrap().0;
        s.answered("c.com", ip(1), t0 + Duration::from_secs(2));
        assert_eq!(s.pair("c.com", ip(1)).unwrap().1, 1);
        let after = until + Duration::from_secs(1);
        s.pushback("c.com", ip(1), 429, None, after);
        let (until, strikes) = s.pair("c.com", ip(1)).unwrap();
        assert_eq!(strikes, 2);
        assert!(until - after >= BACKOFF_BASE.mul_f64(2.0 * 0.79));
    }

    #[test]
    fn state_expires_and_is_bounded() {
        let active = pool(8);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=1/1s"]), 64, t0);
        for i in 0..1000 {
            let site = format!("s{i}.com");
            let t = t0 + Duration::from_millis(i);
            assert_eq!(take(&mut s, &site, &active, 1, t).len(), 1);
            assert!(s.entries() <= 64, "{}", s.entries());
        }
        s.expire(t0 + Duration::from_secs(3));
        assert_eq!((s.entries(), s.pairs.len()), (0, 0));
        // Cooldowns end, and the repeats are forgotten later.
        let mut s = Sites::with_epoch(Rules::default(), 64, t0);
        s.pushback("a.com", ip(1), 429, Some(Duration::from_secs(2)), t0);
        s.expire(t0 + Duration::from_secs(3));
        assert_eq!(s.entries(), 2, "repeats kept");
        s.expire(t0 + STRIKES_KEPT + Duration::from_secs(1));
        assert_eq!(s.entries(), 0);
        // The filter holds every site held and every site named.
        let mut s = Sites::with_epoch(rules(&["n.com=1/1s"]), 64, t0);
        s.pushback("a.com", ip(1), 429, None, t0);
        let (all, words) = s.filter();
        assert!(!all);
        let set = |site: &str| {
            let b = site_bit(site);
            words[b / 64] & (1 << (b % 64)) != 0
        };
        assert!(set("a.com") && set("n.com"));
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 2);
    }

    /// A prefix pool cools a new address at each push-back: at most
    /// `COOL_LINES` such lines a second reach the info log.
    #[test]
    fn cooldown_lines_are_bounded_a_second() {
        let mut lines = (0, 0);
        let said: Vec<bool> = (0..25).map(|i| cool_line(&mut lines, 5_000 + i)).collect();
        assert_eq!(said.iter().filter(|s| **s).count(), COOL_LINES as usize);
        assert!(said[..COOL_LINES as usize].iter().all(|s| *s));
        assert!(cool_line(&mut lines, 6_000));
        assert_eq!(lines, (6_000, 1));
    }

    /// A full table forgets sites that are not cooling first: the site
    /// that said "wait" an hour is the least recently asked (its clients
    /// obey), and forgetting it would send the next request from the
    /// address it asked to rest.
    #[test]
    fn a_full_table_keeps_its_cooling_sites() {
        let active = pool(8);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=5/1h"]), 64, t0);
        s.pushback("cool.com", ip(1), 429, Some(Duration::from_secs(3600)), t0);
        for i in 0..500 {
            let t = t0 + Duration::from_millis(10 + i);
            take(&mut s, &format!("s{i}.com"), &active, 1, t);
            assert!(s.entries() <= 64, "{}", s.entries());
        }
        assert!(
            s.sites.contains_key("cool.com"),
            "the cooling site was forgotten"
        );
        let t = t0 + Duration::from_secs(1);
        let got = take(&mut s, "cool.com", &active, 8, t);
        assert!(!got.is_empty() && !got.contains(&1), "{got:?}");
    }

    /// A crawler touching each of many sites once does not push out a
    /// site asked every few hundred ms between its requests (its budget
    /// forgotten and spent again), nor does a site asked twice long ago
    /// hold its place for ever.
    #[test]
    fn sites_asked_once_are_forgotten_before_sites_asked_again() {
        let active = pool(8);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=5/1h"]), 64, t0);
        // Asked again at the start (three times), never after.
        take(&mut s, "old.com", &active, 3, t0);
        let mut served = 0;
        for round in 0..20u64 {
            let t = t0 + Duration::from_millis(1 + round * 200);
            // The busy site: 5 requests a round; 8 addresses × 5 an hour.
            served += take(&mut s, "busy.com", &active, 5, t).len();
            // 100 new sites between its requests (the table holds 32).
            for i in 0..100 {
                let t = t + Duration::from_millis(1 + i);
                take(&mut s, &format!("s{round}-{i}.com"), &active, 1, t);
                assert!(s.entries() <= 64, "{}", s.entries());
            }
        }
        assert_eq!(served, 40, "the busy site's budget was forgotten");
        assert!(s.sites.contains_key("busy.com"));
        // Sites asked once went first, all 2 000: the one asked again long
        // ago is still there.
        assert!(s.sites.contains_key("old.com"));
    }

    /// A crawler asking each site twice at once (`robots.txt`, then a
    /// page) beside a busy site: its sites count as asked once, and the
    /// busy site keeps its budget (they counted as asked again, and
    /// pushed it out by last use: 100 served of a budget of 40).
    #[test]
    fn a_crawler_asking_each_site_twice_at_once_does_not_push_out_a_busy_site() {
        let served = busy_beside_a_crawler(20, 200, |s, active, round, t| {
            for i in 0..100 {
                let t = t + Duration::from_millis(1 + i);
                let site = format!("s{round}-{i}.com");
                take(s, &site, active, 1, t);
                take(s, &site, active, 1, t + Duration::from_micros(500));
            }
        });
        assert_eq!(served, 40, "the busy site's budget was forgotten");
    }

    /// What a busy site asking 5 at a time at each of `rounds` rounds
    /// `every` ms apart is served under `*=5/1h` over 8 addresses (40 at
    /// most) in a table of 64 entries, `crawl(sites, pool, round, t)`
    /// asking other sites after each of its rounds.
    fn busy_beside_a_crawler(
        rounds: u64,
        every: u64,
        mut crawl: impl FnMut(&mut Sites, &[Segment], u64, Instant),
    ) -> usize {
        let active = pool(8);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=5/1h"]), 64, t0);
        let mut served = 0;
        for round in 0..rounds {
            let t = t0 + Duration::from_millis(1 + round * every);
            served += take(&mut s, "busy.com", &active, 5, t).len();
            crawl(&mut s, &active, round, t);
            assert!(s.entries() <= 64, "{}", s.entries());
        }
        served
    }

    /// A crawler asking each site's `robots.txt`, then (0.3 s later) its
    /// page, the table turning over between the two: the page's request
    /// finds the site's ghost, which goes on from one use a moment ago,
    /// and the busy site keeps its budget (a ghost made a site asked
    /// again outright: 50 served of a budget of 40).
    #[test]
    fn a_crawlers_second_request_after_its_site_was_forgotten_is_no_asking_again() {
        let served = busy_beside_a_crawler(10, 700, |s, active, round, t| {
            for pass in 0..2u64 {
                for i in 0..100 {
                    let t = t + Duration::from_millis(1 + pass * 300 + i);
                    take(s, &format!("s{round}-{i}.com"), active, 1, t);
                }
            }
        });
        assert_eq!(served, 40, "the busy site's budget was forgotten");
    }

    /// A site holding the whole table, and another asking: room is made
    /// (the share of sites asked again is none of one site: an index past
    /// the end panicked, and the new site's lease with it).
    #[test]
    fn a_new_site_beside_one_holding_the_table_is_served() {
        let active = pool(40);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=1/1h"]), 16, t0);
        for i in 0..20u64 {
            take(&mut s, "big.com", &active, 1, t0 + Duration::from_millis(i));
        }
        assert_eq!(s.sites.len(), 1);
        let t = t0 + Duration::from_secs(1);
        assert_eq!(take(&mut s, "new.com", &active, 1, t).len(), 1);
    }

    /// A site holding most of the table, among the least recently used
    /// when another site asks, loses only the room asked for (an eighth
    /// of the table), from its pairs that free soonest and not cooling:
    /// forgotten whole, each of its spent addresses served it again.
    #[test]
    fn a_large_site_loses_its_least_used_pairs_not_all() {
        let active = pool(14);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=1/1h"]), 16, t0);
        let ms = |i: u64| t0 + Duration::from_millis(i);
        // 15 entries: the site and 14 pairs (its whole pool spent), the
        // first started first.
        assert_eq!(take(&mut s, "big.com", &active, 14, ms(0)).len(), 14);
        // One of its addresses cools: kept before the rest.
        assert!(s.pushback(
            "big.com",
            ip(1),
            429,
            Some(Duration::from_secs(600)),
            ms(200)
        ));
        assert_eq!(s.entries(), 15);
        let spent = |s: &Sites| {
            let id = s.sites["big.com"].id;
            let mut v: Vec<u8> = (s.pairs.keys())
                .filter(|(i, _)| *i == id)
                .map(|(_, ip)| match ip {
                    IpAddr::V4(a) => a.octets()[3],
                    _ => 0,
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(spent(&s), (1..=14).collect::<Vec<u8>>());
        // Another site asks: an eighth of 16 (2 entries) is made room for.
        assert_eq!(take(&mut s, "new.com", &active, 1, ms(1_000)).len(), 1);
        // Its two least used (2 and 3: 1 cools) forgotten; the rest kept.
        assert_eq!(
            spent(&s),
            [&[1][..], &(4..=14).collect::<Vec<u8>>()].concat()
        );
        // The big site's next requests: from those two only (all 14 had
        // been served again).
        let again = take(&mut s, "big.com", &active, 40, ms(2_000));
        assert_eq!(again, [2, 3]);
    }

    /// A ghost keeps a site's uses and the second of its last use, to the
    /// second, 256 s around.
    #[test]
    fn a_ghost_keeps_uses_and_the_last_uses_second() {
        let word = ghost_word(0x3f_ffff, ASKED_AGAIN, 123_456);
        assert_eq!(word >> 10, 0x3f_ffff);
        assert_eq!(from_ghost(word, 123_456), (ASKED_AGAIN, 123_456));
        assert_eq!(from_ghost(word, 130_100), (ASKED_AGAIN, 123_100));
        assert_eq!(from_ghost(ghost_word(1, 1, 5_000), 300_000).0, 1);
        // 256 s on, it reads as a moment ago.
        assert_eq!(from_ghost(ghost_word(1, 1, 5_000), 261_000).1, 261_000);
    }

    /// A site's second use counts as asked again when it comes
    /// [`CORRELATED_MS`] or more after its first, else with a third.
    #[test]
    fn a_second_use_soon_after_the_first_is_not_asked_again() {
        let site = |gaps: &[Ms]| {
            let mut s = Sites::new(rules(&["*=5/1h"]), 100);
            assert!(s.ensure("a.com", true, Instant::now()));
            let a = s.sites.get_mut("a.com").unwrap();
            let mut t = 1_000;
            a.used(t);
            for g in gaps {
                t += g;
                a.used(t);
            }
            a.uses
        };
        assert_eq!(site(&[]), 1);
        assert_eq!(site(&[10]), 2);
        assert_eq!(site(&[10, 10]), ASKED_AGAIN);
        assert_eq!(site(&[CORRELATED_MS]), ASKED_AGAIN);
        assert_eq!(site(&[CORRELATED_MS - 1]), 2);
    }

    /// A site asked once every round, the table turning over between its
    /// requests: forgotten, it comes back with its uses (its ghost), asked
    /// again at its third, and from then keeps its budget (it started over
    /// at each request).
    #[test]
    fn a_site_forgotten_and_asked_again_soon_is_kept() {
        let active = pool(8);
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=5/1h"]), 64, t0);
        let mut served = 0;
        for round in 0..60u64 {
            let t = t0 + Duration::from_millis(1 + round * 200);
            served += take(&mut s, "busy.com", &active, 1, t).len();
            // More than the table holds (32 sites), fewer than its turn
            // takes to forget.
            for i in 0..40 {
                let t = t + Duration::from_millis(1 + i);
                take(&mut s, &format!("s{round}-{i}.com"), &active, 1, t);
            }
        }
        // 8 addresses × 5, and the starts forgotten with it before its
        // ghost was met (its slot taken by another's, at times).
        assert!(served <= 44, "{served}");
    }

    /// Sites asked again past [`PROTECTED_SHARE`] of the sites: the least
    /// recently used of them go as if asked once, before newer sites
    /// asked once.
    #[test]
    fn sites_asked_again_keep_a_share_of_the_table() {
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["*=5/1h"]), 64, t0);
        // (Three uses at once: two are one of a crawler's.)
        let twice = |s: &mut Sites, site: &str, t| {
            for _ in 0..3 {
                s.session_use(site, ip(1), t);
            }
        };
        twice(&mut s, "old.com", t0);
        let t = t0 + Duration::from_secs(5);
        for i in 0..25u64 {
            twice(
                &mut s,
                &format!("again{i}.com"),
                t + Duration::from_millis(i),
            );
        }
        for i in 0..7u64 {
            let t = t + Duration::from_millis(100 + i);
            s.session_use(&format!("new{i}.com"), ip(1), t);
            assert!(s.entries() <= 64, "{}", s.entries());
        }
        // 26 sites asked again of 32: past four fifths, the oldest (an
        // eighth of the table freed with three sites asked once).
        assert!(!s.sites.contains_key("old.com"));
        assert!(s.sites.contains_key("again0.com"));
        assert!(s.sites.contains_key("new3.com"));
        assert!(s.sites.contains_key("new6.com"));
    }

    /// A refused lease is refused again without a walk until its end, for
    /// the same families and pool; a new pool, other families or the end
    /// walk again, and what a walk would say is what the memory says.
    #[test]
    fn a_refusal_is_remembered_until_it_ends_or_the_pool_changes() {
        let t0 = Instant::now();
        let mut s = Sites::with_epoch(rules(&["a.com=1/1m"]), 1000, t0);
        let active = pool(4);
        let lease = |s: &mut Sites, active: &[Segment], families, generation, t| match s
            .lease("a.com", families, active, generation, t)
        {
            Answer::Start(f) => {
                let total = family_total(active, f);
                s.started("a.com", ip(1), 0, total, t).expect("free");
                Answer::Address {
                    ip: ip(1),
                    index: 0,
                    watch: false,
                }
            }
            other => other,
        };
        for _ in 0..4 {
            assert!(matches!(
                lease(&mut s, &active, Families::V4, 1, t0),
                Answer::Address { .. }
            ));
        }
        let refused = |retry_after| Answer::Throttled {
            retry_after,
            cooling: false,
        };
        // The window: the period and its margin.
        let Answer::Throttled {
            retry_after: window,
            cooling: false,
        } = lease(&mut s, &active, Families::V4, 1, t0)
        else {
            panic!("not refused");
        };
        assert!(window >= Duration::from_secs(60), "{window:?}");
        assert_eq!(s.refusals_remembered, 0, "the first refusal walks");
        let t = t0 + Duration::from_secs(1);
        let again = lease(&mut s, &active, Families::V4, 1, t);
        assert_eq!(again, refused(window - Duration::from_secs(1)));
        assert_eq!(s.refusals_remembered, 1);
        // What a walk says (the memory forgotten) is the same.
        s.sites.get_mut("a.com").unwrap().refused = Refused::default();
        assert_eq!(lease(&mut s, &active, Families::V4, 1, t), again);
        assert_eq!(s.refusals_remembered, 1);
        // Other families: a walk.
        assert_eq!(lease(&mut s, &active, Families::ANY, 1, t), again);
        assert_eq!(s.refusals_remembered, 1);
        assert_eq!(lease(&mut s, &active, Families::ANY, 1, t), again);
        assert_eq!(s.refusals_remembered, 2);
        // A pool with one more address (a new generation): it serves.
        let grown = pool(5);
        assert_eq!(
            lease(&mut s, &grown, Families::V4, 2, t),
            Answer::Address {
                ip: ip(5),
                index: 4,
                watch: false
            }
        );
        assert_eq!(s.refusals_remembered, 2);
        assert_eq!(
            lease(&mut s, &grown, Families::V4, 2, t),
            refused(window - Duration::from_secs(1))
        );
        // At the refusal's end the first address is free again.
        let end = t0 + window;
        assert!(matches!(
            lease(&mut s, &grown, Families::V4, 2, end),
            Answer::Address { .. }
        ));
    }
}
/// What an entry costs, measured (resident memory, hash-table slack
/// included): `cargo test --release -p rotor-allocator entry_cost --
/// --ignored --nocapture`. The README quotes it.
#[cfg(test)]
mod memtest {
    use super::*;
    use crate::rss;
    #[test]
    #[ignore]
    fn entry_cost() {
        let active: Vec<Segment> = (1..=8u8)
            .map(|i| Segment::single(IpAddr::from([10, 0, 0, i])))
            .collect();
        let t0 = Instant::now();
        let mut s = Sites::new(Rules::parse(&["*=5/1s".to_string()]).unwrap(), 10_000_000);
        let before = rss();
        let n = 200_000;
        for i in 0..n {
            let site = format!("site{i:07}.com");
            for _ in 0..3 {
                if let Answer::Start(_) = s.lease(&site, Families::V4, &active, 0, t0) {
                    s.started(&site, IpAddr::from([10, 0, 0, 1]), 0, 8, t0);
                }
            }
        }
        let after = rss();
        eprintln!(
            "sites={} pairs={} bytes/site(with 3 pairs, 1 start each)={}",
            s.sites.len(),
            s.pairs.len(),
            (after - before) / n
        );
        let mut s2 = Sites::new(Rules::default(), 10_000_000);
        let before = rss();
        for i in 0..n {
            let site = format!("site{i:07}.com");
            s2.pushback(&site, IpAddr::from([10, 0, 0, 1]), 429, None, t0);
        }
        let after = rss();
        eprintln!(
            "cooldown only: bytes per (site + 1 pair)={}",
            (after - before) / n
        );
        // The work done every second over the table.
        let t = Instant::now();
        s2.expire(t0);
        let expire = t.elapsed();
        let t = Instant::now();
        let _ = s2.filter();
        eprintln!(
            "entries={} expire={:?} filter={:?}",
            s2.entries(),
            expire,
            t.elapsed()
        );
    }
}
