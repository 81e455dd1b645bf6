//! The messages. Compatibility rules (bincode encodes a variant by its index
//! and fields by position, and frames are decoded strictly):
//! - within a major version, a message's shape never changes: something new
//!   is a new enum variant, appended (an older peer answers a request it does
//!   not know with a decode error on that connection, never a misreading);
//! - `Hello` alone may grow fields at its end: its readers ignore the rest;
//! - anything else bumps `PROTOCOL_MAJOR`, and peers refuse each other.
//!
//! `tests/golden.rs` pins the bytes of every message.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::segment::{Family, Segment};

/// The start of the allocator's `Error` answer to `Pool` when its pool,
/// even merged into blocks, is too large for a frame: workers then do not
/// check their leases against it.
pub const POOL_TOO_LARGE: &str = "pool too large to describe";

/// Bumped on any change an older peer would misread. Peers with different
/// majors refuse each other with a reason.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Bumped when something is appended that an older peer may ignore.
pub const PROTOCOL_MINOR: u16 = 21;
/// The first minor whose allocator answers `Request::Attach`.
pub const MINOR_LEASE_TABLE: u16 = 1;
/// The first minor whose allocator answers `Request::StatusV2`,
/// `Request::Unusable` and `Request::Pool` (per-family rotation, prefixes,
/// quarantine, leases checked against the pool).
pub const MINOR_FAMILIES: u16 = 2;
/// The first minor whose allocator answers `Request::LeaseSite`,
/// `Request::Pushback`, `Request::SiteOk` and `Request::Sites` (per-site
/// budgets and cooldowns), and publishes the site filter in its table.
pub const MINOR_SITES: u16 = 3;
/// The first minor whose allocator takes `Request::Metrics` (what workers
/// served, for the host's Prometheus endpoint) and answers
/// `Request::Steer` (an address taken out or put back by hand).
pub const MINOR_METRICS: u16 = 4;
/// The first minor whose worker reads `Response::SessionsFull` (an older
/// one is sent `Response::Error`).
pub const MINOR_SESSIONS_FULL: u16 = 5;
/// The first minor whose allocator answers `Request::ReloadReport` (the
/// reload's outcome with the sources that failed, in one small answer).
pub const MINOR_RELOAD_REPORT: u16 = 6;
/// The first minor whose allocator answers `Request::Reloads` (the reloads
/// asked of it, for a worker that cannot map its lease table).
pub const MINOR_RELOADS: u16 = 7;
/// The first minor whose allocator answers `Request::LeaseSiteWait` (a
/// wait for a site's budget held by the allocator, in arrival order) and
/// takes `Request::CancelWait`.
pub const MINOR_SITE_WAIT: u16 = 8;
/// The first minor whose allocator answers `Request::SitesV2` (the per-site
/// state with the prefix length an IPv6 source is counted by).
pub const MINOR_SITES_V2: u16 = 9;
/// The first minor whose allocator answers `Request::LeaseSessionSite` (a
/// sticky session's lease for a request to a site: a new session's first
/// address taken as the site's, a session's requests counted against the
/// site's budget).
pub const MINOR_SESSION_SITE: u16 = 10;
/// The first minor whose worker leases a prefix from the lease table in
/// the order its key gives (`segment::set_order`): an older worker is
/// not handed a keyed table (it would lease in the fixed order on the
/// shared cursor, repeating addresses of a small prefix within a cycle);
/// it leases over the socket.
pub const MINOR_ORDER_KEY: u16 = 11;
/// The first minor whose allocator takes `Request::WorkerReloaded` (how a
/// worker's part of a reload went) and answers `Request::ReloadReportV2`
/// (a reload's outcome with each worker's).
pub const MINOR_WORKER_RELOADS: u16 = 12;
/// The first minor whose allocator takes `Request::Unreached` (connects
/// that failed from a source while their destination answered others).
pub const MINOR_UNREACHED: u16 = 13;
/// Sources an `Unreached` names at most (a worker's report names at most
/// as many).
pub const UNREACHED_LISTED: usize = 10_000;
/// Sites an `Unreached` names per source at most.
pub const UNREACHED_DESTINATIONS: usize = 4;
/// The first minor whose allocator takes `Request::SiteUnreached` (a
/// connect to a site that failed from one source while the site answered
/// others: the site's refusal of that address) and
/// `Request::SiteConnected`.
pub const MINOR_SITE_UNREACHED: u16 = 14;
/// The first minor whose worker asks `Request::Reloads` first on each
/// connection and counts the reloads asked from its answer: its allocator
/// expects the worker's word of the reloads after that count (an older
/// worker's, of those after its Hello).
pub const MINOR_FIRST_RELOADS: u16 = 15;
/// The first minor whose control client reads `Response::StatusCut` (a
/// status too large for a frame, sent without its entries in rotation);
/// an older one is told the status is too large.
pub const MINOR_STATUS_CUT: u16 = 16;
/// The first minor whose allocator reads `Request::Until` (a request
/// given up at a deadline: not served when read after it), and takes
/// `Request::SiteStarted` (when a site's request started, for its
/// budget) and `Request::Clock` (the peer's clock, which those times are
/// of).
pub const MINOR_DEADLINE: u16 = 17;
/// The first minor whose worker leases a prefix from the lease table in
/// the prefix's own order (`segment::Order::by_prefix`, said in the
/// table): an older worker is not handed such a table (it would lease in
/// the key's order alone, off the allocator's); it leases over the socket.
pub const MINOR_PREFIX_ORDER: u16 = 18;
/// The first minor whose allocator answers `Request::TicketKeys` (the
/// keys every worker seals and opens TLS session tickets with, so a
/// client resumes its session on whichever worker takes its connection).
pub const MINOR_TICKET_KEYS: u16 = 19;
/// The first minor whose worker names the destinations of an `Unreached`
/// by the network of the address connected to (an older one names them
/// by site): the allocator compares only names of one kind.
pub const MINOR_UNREACHED_BY_NET: u16 = 19;
/// The first minor whose control client reads `Response::SteeredV2`
/// (whether an address taken out or put back by hand is kept over an
/// allocator restart); an older one is answered `Steered`.
pub const MINOR_STEER_KEPT: u16 = 20;
/// The first minor whose worker reads `Response::SessionShared` (a
/// session's request held back at its share of the address's budget); an
/// older one is answered `Throttled`, the budget spent.
pub const MINOR_SESSION_SHARE: u16 = 21;
/// How long the key new TLS session tickets are sealed with stays the one
/// (the allocator's change of keys); a ticket opens for that long at
/// least, which is the lifetime workers give their tickets.
pub const TICKET_KEY_SECS: u64 = 6 * 3600;

/// Upper bounds (seconds) of the histograms' buckets, the same on both
/// sides; the last bucket (+Inf) is implicit. Up to an hour: what they
/// time waits up to the connect and response timeouts and a site's budget
/// wait (ending at 5 s, a p99 of 40 s read as 5 s).
pub const HISTOGRAM_BOUNDS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    10.0, 30.0, 60.0, 300.0, 3600.0,
];

/// How many of `HISTOGRAM_BOUNDS` a worker of an earlier version sends
/// (they end at 5 s): its histograms are added in, what it counted past
/// 5 s to +Inf.
const HISTOGRAM_BOUNDS_BEFORE: usize = 14;

/// What a connecting peer is; the allocator lists workers in its status,
/// counts them for `/health` and waits for their word on a reload. A peer
/// that leases but proxies nothing (`rotor-bench`, a tool of one's own)
/// says `Control`: the role grants nothing, every peer may lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Worker,
    Control,
    Allocator,
}

/// First frame from each side.
///
/// The first two fields are frozen forever, so a peer of any version can read
/// the other's version and refuse it with a reason; fields after them may be
/// appended (a reader ignores trailing bytes of a `Hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub major: u16,
    pub minor: u16,
    pub role: Role,
    pub pid: u32,
    /// Free-form software name and version, for logs and status.
    pub software: String,
}

impl Hello {
    pub fn new(role: Role, software: impl Into<String>) -> Self {
        Hello {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            role,
            pid: std::process::id(),
            software: software.into(),
        }
    }
}

/// The allocator's answer to a client's `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted(Hello),
    /// `server` stays last so that a newer `Hello` with appended fields
    /// still decodes.
    Refused {
        reason: String,
        server: Hello,
    },
}

/// Frames a client sends: exactly one `Hello`, then requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    Hello(Hello),
    Request(Envelope<Request>),
}

/// Frames the allocator sends: exactly one `HelloReply`, then responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    Hello(HelloReply),
    Response(Envelope<Response>),
}

/// A request or response with the id that ties them together, so one
/// connection carries many requests in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<B> {
    pub id: u64,
    pub body: B,
}

/// Address families a destination resolved to; a lease must be of one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    pub const ANY: Families = Families { v4: true, v6: true };
    pub const V4: Families = Families {
        v4: true,
        v6: false,
    };
    pub const V6: Families = Families {
        v4: false,
        v6: true,
    };

    pub fn of(addrs: impl IntoIterator<Item = IpAddr>) -> Families {
        let mut f = Families {
            v4: false,
            v6: false,
        };
        for a in addrs {
            match a {
                IpAddr::V4(_) => f.v4 = true,
                IpAddr::V6(_) => f.v6 = true,
            }
        }
        f
    }

    /// Only `family`.
    pub fn only(family: Family) -> Families {
        Families {
            v4: family == Family::V4,
            v6: family == Family::V6,
        }
    }

    pub fn accepts_family(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    pub fn accepts(&self, ip: &IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }
}

impl std::fmt::Display for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.v4, self.v6) {
            (true, true) => f.write_str("IPv4 or IPv6"),
            (true, false) => f.write_str("IPv4"),
            (false, true) => f.write_str("IPv6"),
            (false, false) => f.write_str("no family"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The next source address of one of these families.
    Lease { families: Families },
    /// A snapshot of the allocator's state.
    Status,
    /// Re-read the pool sources now.
    Reload,
    /// Where the lease table is (since minor 1), to lease from it directly.
    Attach,
    /// A snapshot with families, prefixes and quarantine (since minor 2).
    StatusV2,
    /// A worker could not use source address `ip` (since minor 2): the
    /// allocator takes its entry out of the rotation for a while.
    Unusable { ip: IpAddr, reason: String },
    /// The rotation the lease table should hold now (since minor 2): a
    /// worker checks what it leases from the table against it.
    Pool,
    /// A lease for a sticky session (since minor 2; a `key` of at most
    /// `MAX_SESSION_KEY` bytes): the address `key`
    /// (user and session id) was given before, while the session lasts
    /// (`ttl_secs` from its first lease) and the address is in the
    /// rotation; else the next address, kept for it. `strict`: an address
    /// that left is not replaced (`SessionLost`).
    LeaseSession {
        families: Families,
        key: String,
        ttl_secs: u32,
        strict: bool,
    },
    /// A lease for a request to `site` (since minor 3): the next address,
    /// in the site's own rotation, with budget left for the site and not
    /// cooling for it; a site the allocator holds nothing for is served
    /// from the shared rotation, as `Lease`.
    LeaseSite { families: Families, site: String },
    /// `site` pushed back on `ip` (since minor 3): answered `status` (429,
    /// 503 with a `Retry-After`, or one the operator counts), saying to
    /// wait `retry_after_secs` if it said; the pair cools for that long,
    /// else for a backoff that grows with each repeat.
    Pushback {
        ip: IpAddr,
        site: String,
        status: u16,
        retry_after_secs: Option<u32>,
    },
    /// `site` answered a request from `ip` normally (since minor 3): the
    /// pair's backoff starts over. Sent only when a `SiteLeased` asked.
    SiteOk { ip: IpAddr, site: String },
    /// The per-site state (since minor 3): at most `max` sites, the most
    /// recently used first.
    Sites { max: u32 },
    /// What a worker served since its last report (since minor 4): the
    /// allocator adds it to the host's totals (answered `Noted`).
    Metrics(WorkerMetrics),
    /// Takes the pool entry holding `ip` out of the rotation for
    /// `for_secs` (None: until released), or puts it back (`release`), for
    /// every worker (since minor 4). Answered `Steered`.
    Steer {
        ip: IpAddr,
        release: bool,
        for_secs: Option<u64>,
    },
    /// What the workers served, for `rotor status` (since minor 4).
    /// Answered `HostStatus`.
    HostStatus,
    /// Re-read the pool sources now (since minor 6), answered
    /// `ReloadReport`: `Reload`'s answer has no room for the sources that
    /// failed, and a status to learn them can outgrow a frame.
    ReloadReport,
    /// The reloads asked of the allocator (`rotor reload`, SIGHUP), as its
    /// lease table counts them (since minor 7): how a worker that cannot
    /// map the table learns of them. Answered `Reloads`.
    Reloads,
    /// As `LeaseSite`, but a refusal whose end comes within `wait_ms` is
    /// not answered (since minor 8): the allocator holds the request with
    /// the site's other waiters, in arrival order across every peer, and
    /// answers it as an address may serve it (the longest waiting first),
    /// or with `Throttled` at the end of its wait.
    LeaseSiteWait {
        families: Families,
        site: String,
        wait_ms: u64,
    },
    /// The request of envelope `id` (a `LeaseSiteWait` of this peer) is
    /// no longer waited for (its client left): not served (since minor 8).
    /// Answered `Noted`.
    CancelWait { id: u64 },
    /// The per-site state as `Sites`, with the length of the prefix an
    /// IPv6 address is counted by (since minor 9). Answered `SitesV2`.
    SitesV2 { max: u32 },
    /// `LeaseSession` for a request to `site` (since minor 10): a session
    /// pinned already keeps its address, its request counted against the
    /// site's budget for it (never refused: the session asked for that
    /// address); a new one gets the site's next address with budget left
    /// and not cooling, as `LeaseSite` would. Answered as `LeaseSession`,
    /// or `SiteLeased` / `Throttled` as `LeaseSite`.
    LeaseSessionSite {
        families: Families,
        key: String,
        ttl_secs: u32,
        strict: bool,
        site: String,
    },
    /// A worker reloaded as the allocator asked (since minor 12): `asked`
    /// is the lease table's id and reload count it acted on (as `Reloads`
    /// answers), `failed` each part that did not reload (what, and why;
    /// the part in use is kept). Answered `Noted`.
    WorkerReloaded {
        asked: (u64, u64),
        failed: Vec<(String, String)>,
    },
    /// As `ReloadReport`, then how each worker's reload went (since minor
    /// 12): the allocator waits a few seconds for their word. Answered
    /// `ReloadReportV2`.
    ReloadReportV2,
    /// Connects from these sources that failed, since the last such word,
    /// to a destination that answered another source within seconds
    /// before and after each (since minor 13), for sources that got no
    /// answer from anywhere meanwhile: the allocator takes an entry whose
    /// connects keep failing, to more than one destination, out of the
    /// rotation. At most `UNREACHED_LISTED`. Answered `Noted`.
    Unreached { by_source: Vec<SourceUnreached> },
    /// A connect from `ip` to `site` failed while the site answered other
    /// sources within seconds before and after it (since minor 14): the
    /// site drops or refuses that address. The first since the pair's last
    /// connect is a suspicion (the pair is watched: leases of it for the
    /// site ask for the answer); one at least 10 s later cools the pair,
    /// as a push-back does. Answered `Noted`.
    SiteUnreached { ip: IpAddr, site: String },
    /// A connect from `ip` to `site` was made, on a lease that asked for
    /// its answer (since minor 14): the pair's failed connects start over
    /// (its push-backs do not: a connect says nothing of rate limits).
    /// Answered `Noted`.
    SiteConnected { ip: IpAddr, site: String },
    /// `request`, which its peer gives up at `deadline_us` (since minor
    /// 17): microseconds of `CLOCK_MONOTONIC`, one clock for every process
    /// of the host (see [`crate::clock`]). Read after that, it is not
    /// served (answered `Error`, which nobody waits for); a site wait
    /// ends by then. Workers send their leases so: one given up while the
    /// allocator stalled, and read when it resumed, spent a site's budget
    /// or started a session no request used. Not nested: one inside
    /// another does not decode (a chain of them, two bytes a level,
    /// overflowed the reader's stack).
    Until {
        deadline_us: u64,
        #[serde(deserialize_with = "not_nested")]
        request: Box<Request>,
    },
    /// A request to `site` from `ip`, whose lease counted it against the
    /// site's budget at about `leased_us`, started only at `started_us`
    /// (its connection made, a site's round trip or more later; both as
    /// `Until`'s deadline, since minor 17): the allocator moves that start
    /// to then, so that the site's window is held from when the request
    /// reached it. Sent only for a start late enough to matter. Answered
    /// `Noted`.
    SiteStarted {
        ip: IpAddr,
        site: String,
        leased_us: u64,
        started_us: u64,
    },
    /// The peer's `CLOCK_MONOTONIC` now, in microseconds (since minor
    /// 17): a worker's first request on each connection, before any time
    /// it tells (`Until`, `SiteStarted`), which the allocator reads on its
    /// own clock by the difference (a worker in another time namespace
    /// reads the clock with an offset of its own), the least of the
    /// samples (a worker sends one with each metrics report: one read
    /// late counts that much more). Answered `Noted`.
    Clock { now_us: u64 },
    /// The keys TLS session tickets are sealed and opened with, the same
    /// for every worker of the host (since minor 19), so that a client
    /// resumes its session on whichever worker takes its next connection.
    /// For root and the allocator's own user only (a user let in only to
    /// lease is refused them). Answered `TicketKeys`.
    TicketKeys,
    /// What a worker served since its last report, with counters by name
    /// (since minor 21): as `Metrics`, and `counters`, deltas since the
    /// last report, each of [`WORKER_COUNTERS`] or ignored (a counter
    /// added later needs no new minor). A worker sends an allocator older
    /// than minor 21 `Metrics` (see [`Request::for_minor`]).
    MetricsV2 {
        metrics: WorkerMetrics,
        counters: Vec<(String, u64)>,
    },
}

/// Access-log lines a worker lost: dropped as its writer fell behind, or
/// in a write that failed (a full disk).
pub const COUNTER_ACCESS_LOG_LOST: &str = "access_log_lost_lines";

/// The counters a worker reports by name (`Request::MetricsV2`) that an
/// allocator reads.
pub const WORKER_COUNTERS: &[&str] = &[COUNTER_ACCESS_LOG_LOST];

/// The first minor whose allocator reads `Request::MetricsV2`.
pub const MINOR_COUNTERS: u16 = 21;

thread_local! {
    /// Whether an `Until`'s request is being decoded on this thread.
    static IN_UNTIL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An `Until`'s request, which is no `Until`: decoded with a mark that an
/// `Until` inside it finds, and refuses, before it goes deeper.
fn not_nested<'de, D>(d: D) -> Result<Box<Request>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    if IN_UNTIL.with(|c| c.replace(true)) {
        return Err(serde::de::Error::custom("a deadline inside a deadline"));
    }
    // Unmarked however the inner decoding ends (an unwinding panic too:
    // left marked, the thread would refuse every `Until` after).
    struct Unmark;
    impl Drop for Unmark {
        fn drop(&mut self) {
            IN_UNTIL.with(|c| c.set(false));
        }
    }
    let _unmark = Unmark;
    Ok(Box::new(Request::deserialize(d)?))
}

impl Request {
    /// The first protocol minor whose allocator reads this request: an
    /// older one closes the connection on it, so it is not sent there.
    pub fn min_minor(&self) -> u16 {
        match self {
            Request::Lease { .. } | Request::Status | Request::Reload => 0,
            Request::Attach => MINOR_LEASE_TABLE,
            Request::StatusV2
            | Request::Unusable { .. }
            | Request::Pool
            | Request::LeaseSession { .. } => MINOR_FAMILIES,
            Request::LeaseSite { .. }
            | Request::Pushback { .. }
            | Request::SiteOk { .. }
            | Request::Sites { .. } => MINOR_SITES,
            Request::Metrics(_) | Request::Steer { .. } | Request::HostStatus => MINOR_METRICS,
            Request::ReloadReport => MINOR_RELOAD_REPORT,
            Request::Reloads => MINOR_RELOADS,
            Request::LeaseSiteWait { .. } | Request::CancelWait { .. } => MINOR_SITE_WAIT,
            Request::SitesV2 { .. } => MINOR_SITES_V2,
            Request::LeaseSessionSite { .. } => MINOR_SESSION_SITE,
            Request::WorkerReloaded { .. } | Request::ReloadReportV2 => MINOR_WORKER_RELOADS,
            Request::Unreached { .. } => MINOR_UNREACHED,
            Request::SiteUnreached { .. } | Request::SiteConnected { .. } => MINOR_SITE_UNREACHED,
            Request::Until { .. } | Request::SiteStarted { .. } | Request::Clock { .. } => {
                MINOR_DEADLINE
            }
            Request::TicketKeys => MINOR_TICKET_KEYS,
            Request::MetricsV2 { .. } => MINOR_COUNTERS,
        }
    }

    /// This request as an allocator of protocol `minor` reads it: a report
    /// with counters goes to an older one without them.
    pub fn for_minor(self, minor: u16) -> Request {
        match self {
            Request::MetricsV2 { metrics, .. } if minor < MINOR_COUNTERS => {
                Request::Metrics(metrics)
            }
            other => other,
        }
    }

    /// Whether this is a worker's metrics report (either form).
    pub fn is_metrics(&self) -> bool {
        matches!(self, Request::Metrics(_) | Request::MetricsV2 { .. })
    }
}

/// What a reload did: the answer to `ReloadReport`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub generation: u64,
    /// Entries in the pool (an entry may be a range or prefix).
    pub entries: u64,
    /// Addresses in rotation.
    pub addresses: u64,
    /// The sources that could not be read (their last good addresses are
    /// kept): name and error, each cut to `REPORT_TEXT_MAX` bytes and a
    /// `…`; at most 64, and then one naming how many more failed.
    pub failed: Vec<(String, String)>,
}

/// How one worker's part of a reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReload {
    pub pid: u32,
    pub outcome: WorkerReloadOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerReloadOutcome {
    /// Reloaded; the parts that failed (what, why), each kept as it was,
    /// their texts cut to `REPORT_TEXT_MAX` bytes.
    Done { failed: Vec<(String, String)> },
    /// It did not say within the allocator's wait.
    NoWord,
    /// Its protocol minor is older than `MINOR_WORKER_RELOADS`: it cannot
    /// say.
    TooOld,
}

/// The answer to `ReloadReportV2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReportV2 {
    pub report: ReloadReport,
    /// Each connected worker's reload (at most `WORKERS_LISTED`, then the
    /// count of those left out in `more_workers`).
    pub workers: Vec<WorkerReload>,
    pub more_workers: u32,
}

/// The most workers a `ReloadReportV2` lists, so that it fits a frame.
pub const WORKERS_LISTED: usize = 256;

/// The longest sticky session key (`USER\0ID`) an allocator keeps: a user
/// name and a session id of at most 64 characters (a SOCKS5 name is at
/// most 255 bytes).
pub const MAX_SESSION_KEY: usize = 1024;

/// The longest source name or error a `ReloadReport` carries, so that one
/// with many failing sources still fits a frame.
pub const REPORT_TEXT_MAX: usize = 1024;

/// The host's figures as the workers reported them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Requests and tunnels handled since the allocator started.
    pub requests: u64,
    /// rotor's own error answers, by `Proxy-Status` error.
    pub errors: Vec<(String, u64)>,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: u32,
    /// Where it accepts clients (`http 127.0.0.1:8080`, `socks5 …`).
    pub listen: Vec<String>,
    pub connections_open: u64,
    pub tunnels_open: u64,
    pub requests: u64,
}

/// One worker's figures since its last report (counters are deltas;
/// gauges are as they stand).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    /// This worker run (random at its start) and the report's number in it:
    /// a report sent twice is counted once.
    pub boot: u64,
    pub seq: u64,
    /// Client connections and tunnels open now.
    pub connections_open: u64,
    pub tunnels_open: u64,
    /// Where the worker accepts clients.
    pub listen: Vec<String>,
    /// Requests and tunnels handled.
    pub requests: u64,
    /// At most [`MAX_REPORTED_SOURCES`] (the rest in one under 0.0.0.0).
    pub by_source: Vec<SourceMetrics>,
    /// rotor's own error answers, by `Proxy-Status` error (or `none` for
    /// 400, 407, 431); at most [`MAX_REPORTED_ERRORS`].
    pub errors: Vec<(String, u64)>,
    pub request_seconds: Histogram,
    pub connect_seconds: Histogram,
    pub lease_wait_seconds: Histogram,
}

/// The most sources a worker's report lists (`WorkerMetrics::by_source`);
/// an allocator reads no more of one (a report is added up under its
/// lock: a peer's 4 MiB of sources held it).
pub const MAX_REPORTED_SOURCES: usize = 10_000;

/// The most error kinds a report lists that an allocator reads.
pub const MAX_REPORTED_ERRORS: usize = 256;

/// A source's connects that failed where other sources' were answered
/// (`Request::Unreached`): how many, and the destinations they were to
/// (the first `UNREACHED_DESTINATIONS`, each the FNV-1a hash of the
/// network of the address connected to, the same in every worker: see
/// the worker's `witness::net_key`; workers older than
/// `MINOR_UNREACHED_BY_NET` hash `site_of` the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceUnreached {
    pub ip: IpAddr,
    pub failed: u64,
    pub destinations: Vec<u64>,
}

/// What went out of one source address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMetrics {
    pub ip: IpAddr,
    /// Destination responses by class: 1xx to 5xx.
    pub responses: [u64; 5],
    pub tunnels: u64,
    pub connect_errors: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
}

/// Observations by bucket (`HISTOGRAM_BOUNDS`, then +Inf), and their sum
/// in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum_micros: u64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        if self.counts.len() != HISTOGRAM_BOUNDS.len() + 1 {
            self.counts = vec![0; HISTOGRAM_BOUNDS.len() + 1];
        }
        let i = HISTOGRAM_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(HISTOGRAM_BOUNDS.len());
        self.counts[i] += 1;
        self.sum_micros += (secs * 1e6) as u64;
    }

    /// Adds `other`'s observations (of the same buckets, or of the
    /// earlier ones that end at 5 s; others are ignored).
    pub fn add(&mut self, other: &Histogram) {
        let n = HISTOGRAM_BOUNDS.len() + 1;
        let before = other.counts.len() == HISTOGRAM_BOUNDS_BEFORE + 1;
        if other.counts.len() != n && !before {
            return;
        }
        if self.counts.len() != n {
            self.counts = vec![0; n];
        }
        for (i, b) in other.counts.iter().enumerate() {
            // (An earlier layout's +Inf is this one's.)
            let at = match before && i == HISTOGRAM_BOUNDS_BEFORE {
                true => n - 1,
                false => i,
            };
            self.counts[at] = self.counts[at].saturating_add(*b);
        }
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |n, c| n.saturating_add(*c))
    }
}

/// One lease: the source address a request leaves from. The same value
/// comes from the lease table, crosses the socket in `Response::Leased`, and
/// reaches the worker's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: IpAddr,
    /// Counts leases since the allocator started (or since the state it
    /// resumed).
    pub seq: u64,
    /// Identifies the pool the address came from.
    pub generation: u64,
}

/// Why no address could be leased: a configuration error, reported to
/// clients. Crosses the socket in `Response::NoAddress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: NoAddress,
    /// The pool that had no address.
    pub generation: u64,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reason.fmt(f)
    }
}

// A newtype variant holding a struct encodes exactly as the struct variant
// with the same fields did (bincode writes fields by position): the golden
// bytes of `Leased` and `NoAddress` did not move when they became these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Leased(Lease),
    NoAddress(Refusal),
    Status(StatusReport),
    Reloaded {
        generation: u64,
        size: u32,
    },
    /// The request could not be served (e.g. a control request a worker may
    /// not make).
    Error {
        message: String,
    },
    /// The lease table to map (see `LeaseTable`): its file, its id (so a
    /// stale file at that path is not taken for it), and the counter the
    /// peer counts its leases in, if one was free.
    Attached {
        path: String,
        id: u64,
        slot: Option<u32>,
    },
    StatusV2(StatusReportV2),
    /// The answer to `Unusable`: whether the address's entry is out of the
    /// rotation now.
    Noted {
        quarantined: bool,
    },
    /// The answer to `Pool`: the entries in rotation, of `generation`.
    Pool {
        generation: u64,
        entries: Vec<Segment>,
    },
    /// The answer to a strict `LeaseSession` whose address left the
    /// rotation.
    SessionLost {
        ip: IpAddr,
    },
    /// The answer to `LeaseSite` when the site has state: the lease, and
    /// whether the allocator wants to hear how the site answered it
    /// (`SiteOk`: the pair has a backoff to clear; since minor 14, also
    /// `SiteConnected` for a new connect: it has failed connects to
    /// clear).
    SiteLeased {
        lease: Lease,
        watch: bool,
    },
    /// The answer to `LeaseSite` when no address may serve the site now:
    /// the first frees in `retry_after_ms`; `cooling`: every address is
    /// cooling for it (else the budget is used up).
    Throttled {
        retry_after_ms: u64,
        cooling: bool,
    },
    /// The answer to `Sites`.
    Sites(SitesReport),
    /// The answer to `Steer`: the entry it applied to, if `ip` is in the
    /// pool.
    Steered {
        entry: Option<Segment>,
    },
    /// The answer to `HostStatus`.
    HostStatus(HostReport),
    /// The answer to `LeaseSession` for a new session when the session
    /// table is full of strict sessions that may not move: room frees in
    /// about `retry_after_ms`.
    SessionsFull {
        retry_after_ms: u64,
    },
    /// The answer to `ReloadReport`.
    ReloadReport(ReloadReport),
    /// The answer to `Reloads`: the lease table's id and its count of
    /// reloads asked (a new table of a new allocator counts from its
    /// predecessor's last count, or from 0).
    Reloads {
        table: u64,
        count: u64,
    },
    /// The answer to `SitesV2`.
    SitesV2(SitesReportV2),
    /// The answer to `ReloadReportV2`.
    ReloadReportV2(ReloadReportV2),
    /// The answer to `StatusV2` when the whole of it is larger than a
    /// frame: the report with only the entries out of the rotation
    /// listed, and how many in rotation were left out (to a client of
    /// `MINOR_STATUS_CUT` on).
    StatusCut {
        report: StatusReportV2,
        unlisted: u64,
    },
    /// The answer to `TicketKeys`: the key to seal new tickets with first,
    /// then the others to open tickets with (the one it replaced, and the
    /// one that replaces it next, which a worker may meet in a ticket
    /// before it asks again); `next_secs`: when it asks again at the
    /// latest (the next change of keys, or sooner).
    TicketKeys {
        keys: Vec<TicketKey>,
        next_secs: u64,
    },
    /// The answer to `Steer` to a client of `MINOR_STEER_KEPT` on: as
    /// `Steered`, and why the addresses out by hand cannot be kept over
    /// an allocator restart (its file's write failed: a full disk, a
    /// read-only state directory), if they cannot.
    SteeredV2 {
        entry: Option<Segment>,
        not_kept: Option<String>,
    },
    /// The answer to `LeaseSession` for a site, to a worker of
    /// `MINOR_SESSION_SHARE` on, when the session's address has served the
    /// sessions' share of its budget for the site (half) while the site's
    /// other requests want the rest: room frees in `retry_after_ms` (as
    /// `Throttled`, which an older worker is told, the budget spent).
    SessionShared {
        retry_after_ms: u64,
    },
}

/// A key TLS session tickets are sealed with (AES-256-GCM), and its name,
/// which a ticket carries in clear to say which key opens it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketKey {
    pub name: [u8; 16],
    pub key: [u8; 32],
}

impl TicketKey {
    /// A new key and name from the kernel's random source.
    pub fn random() -> std::io::Result<TicketKey> {
        let mut k = TicketKey {
            name: [0; 16],
            key: [0; 32],
        };
        crate::random_bytes(&mut k.name)?;
        crate::random_bytes(&mut k.key)?;
        Ok(k)
    }
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (The key itself is never written out.)
        f.debug_struct("TicketKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The per-site state, and how its IPv6 entries are keyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitesReportV2 {
    pub report: SitesReport,
    /// An IPv6 address is counted by its prefix of this length
    /// (`--site-v6-prefix`): a [`PairStatus`]'s IPv6 `ip` is that prefix's
    /// first address, and stands for all of it.
    pub v6_prefix: u8,
}

/// The per-site state: budgets and cooldowns by site and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitesReport {
    /// Sites held in all (the list may be cut short).
    pub total: u64,
    /// (address, site) pairs held in all, and at most.
    pub pairs: u64,
    pub max_entries: u64,
    pub sites: Vec<SiteStatus>,
}

impl SitesReport {
    /// The entries `max_entries` bounds: sites and pairs together.
    pub fn entries(&self) -> u64 {
        self.total.saturating_add(self.pairs)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: String,
    /// Its budget per address: `count` requests per `period_ms`.
    pub limit: Option<SiteLimit>,
    pub idle_secs: u64,
    pub addrs: Vec<PairStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteLimit {
    pub count: u32,
    pub period_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    pub ip: IpAddr,
    /// Requests started within the last period.
    pub used: u32,
    /// Milliseconds until it may serve the site again, if it is cooling.
    pub cooling_ms: Option<u64>,
    /// Pushbacks, and connects that failed while the site answered other
    /// addresses (since minor 14), since the last normal answer (the
    /// backoff grows with it).
    pub strikes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoAddress {
    /// The pool has no addresses at all.
    EmptyPool,
    /// The pool has addresses, none of an acceptable family.
    NoFamily { wanted: Families },
}

impl std::fmt::Display for NoAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The table knows only what is in the rotation: a pool whose
            // every entry is quarantined reads as empty, and is said so.
            NoAddress::EmptyPool => f.write_str(
                "the source address pool has no address in the rotation (it is empty, or every entry is out of it: see `rotor status`)",
            ),
            NoAddress::NoFamily { wanted } => {
                write!(f, "the source address pool has no {wanted} address in the rotation")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub generation: u64,
    /// Index into `pool` of the next address to lease.
    pub cursor: u32,
    pub pool: Vec<AddrStatus>,
    pub leases_total: u64,
    /// Seconds since the Unix epoch of the last refresh, if any ran.
    pub last_refresh_unix: Option<u64>,
    pub sources: Vec<SourceStatus>,
    pub peers: Vec<PeerStatus>,
    pub uptime_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrStatus {
    pub ip: IpAddr,
    pub leases: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// How the operator named it: `--pool 10.0.0.0/30`, `--pool-file /etc/…`.
    pub name: String,
    pub addresses: u32,
    /// `None` when the last read succeeded; else why it failed (the last good
    /// addresses are kept).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub role: Role,
    pub pid: u32,
    pub software: String,
    pub connected_secs: u64,
    pub leases: u64,
}

/// The allocator's state (minor 2): each family's rotation, every entry
/// with its quarantine, the sources and the peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReportV2 {
    pub generation: u64,
    /// Sticky sessions held.
    pub sessions: u32,
    pub families: Vec<FamilyStatus>,
    pub pool: Vec<EntryStatus>,
    pub leases_total: u64,
    /// Seconds since the Unix epoch of the last refresh, if any ran.
    pub last_refresh_unix: Option<u64>,
    pub sources: Vec<SourceStatus>,
    pub peers: Vec<PeerStatus>,
    pub uptime_secs: u64,
}

/// The reason a status too large to carry each sends for a quarantined
/// entry whose reason is the same as the quarantined entry's before it.
pub const REASON_AS_ABOVE: &str = "(as above)";

impl StatusReportV2 {
    /// Each quarantined entry's reason that repeats the one before it (of
    /// the quarantined entries) sent as [`REASON_AS_ABOVE`]: a listed /16
    /// taken out whole said the same 100 bytes 65 536 times.
    pub fn compact_reasons(&mut self) {
        let mut last: Option<String> = None;
        for q in self.pool.iter_mut().filter_map(|e| e.quarantine.as_mut()) {
            match last.as_deref() == Some(q.reason.as_str()) {
                true => q.reason = REASON_AS_ABOVE.into(),
                false => last = Some(q.reason.clone()),
            }
        }
    }

    /// Undoes [`compact_reasons`](Self::compact_reasons): every reason
    /// said again, as the client shows it.
    pub fn fill_reasons(&mut self) {
        let mut last: Option<String> = None;
        for q in self.pool.iter_mut().filter_map(|e| e.quarantine.as_mut()) {
            match (q.reason == REASON_AS_ABOVE, &last) {
                (true, Some(l)) => q.reason = l.clone(),
                _ => last = Some(q.reason.clone()),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyStatus {
    pub family: Family,
    /// Position of the cursor in the family's rotation.
    pub cursor: u64,
    /// What the cursor counts through: the family's addresses in rotation
    /// (at most 2^44).
    pub total: u64,
    pub next: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryStatus {
    pub entry: Segment,
    pub leases: u64,
    /// Why the entry is out of the rotation, if it is.
    pub quarantine: Option<QuarantineStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineStatus {
    pub reason: String,
    pub since_secs: u64,
    /// When it is checked again.
    pub retry_in_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report with counters goes to an older allocator without them;
    /// other requests go as they are.
    #[test]
    fn a_report_with_counters_goes_to_an_older_allocator_without_them() {
        let report = Request::MetricsV2 {
            metrics: WorkerMetrics::default(),
            counters: vec![(COUNTER_ACCESS_LOG_LOST.into(), 1)],
        };
        assert_eq!(
            report.clone().for_minor(MINOR_COUNTERS - 1),
            Request::Metrics(WorkerMetrics::default())
        );
        assert_eq!(report.clone().for_minor(MINOR_COUNTERS), report);
        assert!(report.is_metrics());
        assert_eq!(Request::Status.for_minor(0), Request::Status);
    }

    /// Waits past 5 s fall in buckets of their own, up to an hour; an
    /// earlier worker's histogram (buckets ending at 5 s) is added in, its
    /// count past 5 s to +Inf.
    #[test]
    fn histograms_reach_an_hour_and_take_the_earlier_buckets() {
        let mut h = Histogram::default();
        for secs in [0.001, 7.0, 40.0, 200.0, 3000.0, 5000.0] {
            h.observe(secs);
        }
        let at = |b: f64| HISTOGRAM_BOUNDS.iter().position(|x| *x == b).unwrap();
        assert_eq!(h.counts[at(10.0)], 1);
        assert_eq!(h.counts[at(60.0)], 1);
        assert_eq!(h.counts[at(300.0)], 1);
        assert_eq!(h.counts[at(3600.0)], 1);
        assert_eq!(h.counts[HISTOGRAM_BOUNDS.len()], 1);
        let earlier = Histogram {
            counts: (1..=15).collect(),
            sum_micros: 7,
        };
        let mut total = Histogram::default();
        total.add(&h);
        total.add(&earlier);
        assert_eq!(total.count(), h.count() + (1..=15).sum::<u64>());
        assert_eq!(total.counts[at(5.0)], 14);
        assert_eq!(total.counts[at(10.0)], 1);
        assert_eq!(total.counts[HISTOGRAM_BOUNDS.len()], 1 + 15);
        // Another shape is not added.
        total.add(&Histogram {
            counts: vec![1; 3],
            sum_micros: 1,
        });
        assert_eq!(total.count(), h.count() + (1..=15).sum::<u64>());
    }

    /// A status's repeated reasons are sent once and said again whole,
    /// entries in rotation between them or not.
    #[test]
    fn compacted_reasons_fill_back_as_they_were() {
        let entry = |last: u8, reason: Option<&str>| EntryStatus {
            entry: crate::Segment::single(std::net::IpAddr::from([10, 0, 0, last])),
            leases: 0,
            quarantine: reason.map(|r| QuarantineStatus {
                reason: r.into(),
                since_secs: 1,
                retry_in_secs: 2,
            }),
        };
        let mut s = StatusReportV2 {
            generation: 1,
            sessions: 0,
            families: Vec::new(),
            pool: vec![
                entry(1, Some("a")),
                entry(2, None),
                entry(3, Some("a")),
                entry(4, Some("b")),
                entry(5, Some("b")),
                entry(6, Some("a")),
            ],
            leases_total: 0,
            last_refresh_unix: None,
            sources: Vec::new(),
            peers: Vec::new(),
            uptime_secs: 0,
        };
        let whole = s.clone();
        s.compact_reasons();
        let said: Vec<Option<&str>> = s
            .pool
            .iter()
            .map(|e| e.quarantine.as_ref().map(|q| q.reason.as_str()))
            .collect();
        let above = Some(REASON_AS_ABOVE);
        assert_eq!(said, [Some("a"), None, above, Some("b"), above, Some("a")]);
        s.fill_reasons();
        assert_eq!(s, whole);
    }
}
