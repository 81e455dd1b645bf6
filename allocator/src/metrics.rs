//! The host's metrics: what every worker reported (`Request::Metrics`),
//! added up by source entry, with the allocator's own figures, in the
//! Prometheus / OpenMetrics text format (`prometheus-client` writes it).
//!
//! Counters live here, not in the workers, so they do not go back when a
//! worker restarts. Label sets are bounded: a source label is a pool entry
//! (an address, or a prefix for addresses of a prefix), at most
//! `MAX_SOURCES` of them (the rest as `other`); errors by their RFC 9209
//! kind; workers by pid while connected.

use std::collections::{BTreeMap, HashMap};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rotor_protocol::{Histogram, WorkerMetrics, HISTOGRAM_BOUNDS};

/// Source labels kept at most (a pool's entries, and addresses that left
/// it) unless configured (`--metrics-max-sources`); past it, `other`.
pub const MAX_SOURCES: usize = 10_000;

/// Source labels kept at most ([`MAX_SOURCES`] unless configured).
#[derive(Debug, Clone, Copy)]
pub struct SourceCap(pub usize);

impl Default for SourceCap {
    fn default() -> SourceCap {
        SourceCap(MAX_SOURCES)
    }
}
/// Error kinds kept at most (rotor's are a score of RFC 9209's); past it,
/// `other`: a label set a peer's reports cannot grow.
const MAX_ERROR_KINDS: usize = 64;
/// How long a worker run's last report number is remembered.
const RUNS_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);
/// Worker runs remembered at most: past it the least recently heard of
/// go first (a peer that sends a new boot id with every report would
/// otherwise grow `applied` for an hour).
const MAX_RUNS: usize = 16_384;
/// A worker's listen addresses kept for its status, and their length.
const MAX_LISTEN: usize = 32;
const MAX_LISTEN_LEN: usize = 128;

#[derive(Debug, Default, Clone)]
pub struct SourceTotals {
    pub responses: [u64; 5],
    pub tunnels: u64,
    pub connect_errors: u64,
    pub bytes_to: u64,
    pub bytes_from: u64,
    /// Times the entry was taken out because its connects failed while
    /// the others' answered (`reach`).
    pub unreachable: u64,
}

#[derive(Debug, Default, Clone)]
pub struct WorkerGauges {
    pub pid: u32,
    /// Whether the kernel gave `pid` (the allocator sees the worker's
    /// process); else it is the worker's own word, its pid in a namespace
    /// of its own (a container's, where every worker may be pid 1).
    pub seen: bool,
    pub listen: Vec<String>,
    pub connections_open: u64,
    pub tunnels_open: u64,
    /// Requests of the worker's run (all its connections so far).
    pub requests: u64,
    /// The run (`WorkerMetrics::boot`).
    pub boot: u64,
    /// When its last report came, in Unix seconds.
    pub reported_at: u64,
}

impl WorkerGauges {
    /// Its `worker` label: its pid, or, where that is only its word (a
    /// pid of another namespace: two containers' workers are both pid 1,
    /// and were one series), that and its run, `1@5f3a09c2`.
    pub fn name(&self) -> String {
        match self.seen {
            true => self.pid.to_string(),
            false => format!("{}@{:08x}", self.pid, self.boot as u32),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct HostMetrics {
    pub by_source: HashMap<String, SourceTotals>,
    pub errors: HashMap<String, u64>,
    pub requests: u64,
    pub request_seconds: Histogram,
    pub connect_seconds: Histogram,
    pub lease_wait_seconds: Histogram,
    /// The allocator's own time to answer a lease over its socket.
    pub allocator_lease_seconds: Histogram,
    /// By peer id, while connected.
    pub workers: BTreeMap<u64, WorkerGauges>,
    pub refreshes: u64,
    pub source_errors: u64,
    /// Checkpoints of the sessions and site state written, and those
    /// that failed (a file not written: the next start lacks it).
    pub checkpoints: u64,
    pub checkpoint_errors: u64,
    /// Access-log lines the workers lost (their writer behind, a write
    /// that failed).
    pub access_log_lost: u64,
    /// The last report applied of each worker run (by its boot id), so a
    /// report sent again is not counted twice; runs not heard of for
    /// `RUNS_KEPT` are forgotten.
    applied: HashMap<u64, (u64, std::time::Instant)>,
    /// The size of `applied` at which it is next pruned: twice what the
    /// last pruning kept (at least 1 024), so a host with more runs in an
    /// hour than that scans it once per doubling, not at every report.
    prune_at: usize,
    /// When it was last pruned: past 1 024 runs it is pruned at least
    /// every `RUNS_KEPT` too, so runs of a burst that left `prune_at`
    /// high are forgotten all the same.
    pruned: Option<std::time::Instant>,
    /// Requests of each worker run, kept as `applied` is: a worker that
    /// reconnects (the same process, a new peer) goes on counting where it
    /// was, so its counter never goes back.
    run_requests: HashMap<u64, u64>,
    /// Per entry: leases carried over from tables (or publications) whose
    /// counts went away, and the count last seen, so the counter only
    /// grows.
    leases_seen: HashMap<String, (u64, u64)>,
    /// Status snapshots taken (numbered under the allocator's lock), and
    /// the number of the last whose lease counts were applied.
    snapshots: u64,
    leases_applied: u64,
    /// Source labels kept at most.
    pub max_sources: SourceCap,
}

impl HostMetrics {
    /// The next status snapshot's number.
    pub fn snapshot_number(&mut self) -> u64 {
        self.snapshots += 1;
        self.snapshots
    }

    /// Adds a report of worker `peer` (pid `pid`); `label` names the
    /// source entry of an address. Whether it was added (not a report
    /// sent again).
    pub fn add(
        &mut self,
        peer: u64,
        (pid, seen): (u32, bool),
        m: &WorkerMetrics,
        counters: &[(String, u64)],
        label: impl Fn(std::net::IpAddr) -> String,
    ) -> bool {
        // A report sent again (its acknowledgement lost) counts once.
        let now = std::time::Instant::now();
        if self
            .applied
            .get(&m.boot)
            .is_some_and(|(seq, _)| m.seq <= *seq)
        {
            return false;
        }
        self.applied.insert(m.boot, (m.seq, now));
        let len = self.applied.len();
        let due = self
            .pruned
            .is_none_or(|t| now.duration_since(t) >= RUNS_KEPT);
        if len > 1024 && (len > self.prune_at.min(MAX_RUNS) || due) {
            self.applied
                .retain(|_, (_, t)| now.duration_since(*t) < RUNS_KEPT);
            if self.applied.len() > MAX_RUNS / 2 {
                // Past half the cap, the most recent half of it is kept.
                let mut heard: Vec<std::time::Instant> =
                    self.applied.values().map(|(_, t)| *t).collect();
                let keep = MAX_RUNS / 2;
                let at = heard.len() - keep;
                let (_, cutoff, _) = heard.select_nth_unstable(at);
                let cutoff = *cutoff;
                self.applied.retain(|_, (_, t)| *t >= cutoff);
            }
            let applied = &self.applied;
            self.run_requests
                .retain(|boot, _| applied.contains_key(boot));
            self.prune_at = 2 * self.applied.len();
            self.pruned = Some(now);
        }
        // Sums saturate: a peer's report is not trusted not to wrap them.
        self.requests = self.requests.saturating_add(m.requests);
        for (name, n) in counters {
            // (Another name is a newer worker's: not read here.)
            if name == rotor_protocol::COUNTER_ACCESS_LOG_LOST {
                self.access_log_lost = self.access_log_lost.saturating_add(*n);
            }
        }
        for s in &m.by_source {
            let mut key = match s.ip.is_unspecified() {
                // The worker's own `other`.
                true => "other".to_string(),
                false => label(s.ip),
            };
            if !self.by_source.contains_key(&key) && self.sources_full() {
                key = "other".into();
            }
            let t = self.by_source.entry(key).or_default();
            for (a, b) in t.responses.iter_mut().zip(s.responses) {
                *a = a.saturating_add(b);
            }
            t.tunnels = t.tunnels.saturating_add(s.tunnels);
            t.connect_errors = t.connect_errors.saturating_add(s.connect_errors);
            t.bytes_to = t.bytes_to.saturating_add(s.bytes_to);
            t.bytes_from = t.bytes_from.saturating_add(s.bytes_from);
        }
        for (k, n) in &m.errors {
            // RFC 9209 kinds are short words, and a few dozen of them
            // (rotor uses a score): anything else, or past the cap, is
            // `other`.
            let word = k.len() <= 40 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            let room = self.errors.contains_key(k) || self.errors.len() < MAX_ERROR_KINDS;
            let k = match word && room {
                true => k.clone(),
                false => "other".into(),
            };
            let sum = self.errors.entry(k).or_default();
            *sum = sum.saturating_add(*n);
        }
        self.request_seconds.add(&m.request_seconds);
        self.connect_seconds.add(&m.connect_seconds);
        self.lease_wait_seconds.add(&m.lease_wait_seconds);
        let w = self.workers.entry(peer).or_default();
        (w.pid, w.seen) = (pid, seen);
        // (Cut: a peer's report is not trusted to be a worker's.)
        w.listen = m
            .listen
            .iter()
            .take(MAX_LISTEN)
            .map(|l| crate::shown(l.clone(), MAX_LISTEN_LEN))
            .collect();
        w.connections_open = m.connections_open;
        w.tunnels_open = m.tunnels_open;
        w.reported_at = crate::state::unix_now();
        let run = self.run_requests.entry(m.boot).or_default();
        *run = run.saturating_add(m.requests);
        w.requests = *run;
        w.boot = m.boot;
        true
    }
}

impl HostMetrics {
    /// The pool's entries now `listed`, in pool order: keeps the
    /// per-source totals of the first of them up to the cap (and
    /// `other`), the ones the scrape's gauges name, and starts each new
    /// one's at 0: a series that appeared with its first count, not 0,
    /// lost that count from `increase()` — a source's first burst of
    /// connect errors among them.
    pub fn track_sources(&mut self, listed: &[String]) {
        let kept: std::collections::HashSet<&str> = listed
            .iter()
            .take(self.max_sources.0)
            .map(String::as_str)
            .collect();
        self.by_source
            .retain(|k, _| k == "other" || kept.contains(k.as_str()));
        for k in kept {
            self.by_source.entry(k.to_string()).or_default();
        }
        if listed.len() > self.max_sources.0 {
            self.by_source.entry("other".into()).or_default();
        }
    }

    /// Whether the source labels are all taken (`other` aside).
    fn sources_full(&self) -> bool {
        let other = usize::from(self.by_source.contains_key("other"));
        self.by_source.len() - other >= self.max_sources.0
    }

    /// For `rotor status`.
    pub fn report(&self) -> rotor_protocol::HostReport {
        let mut errors: Vec<(String, u64)> =
            self.errors.iter().map(|(k, n)| (k.clone(), *n)).collect();
        errors.sort();
        rotor_protocol::HostReport {
            requests: self.requests,
            errors,
            workers: self
                .workers
                .values()
                .map(|w| rotor_protocol::WorkerStatus {
                    pid: w.pid,
                    listen: w.listen.clone(),
                    connections_open: w.connections_open,
                    tunnels_open: w.tunnels_open,
                    requests: w.requests,
                })
                .collect(),
        }
    }
}

/// A histogram already counted (by buckets), for the encoder.
#[derive(Debug)]
struct Counted(Histogram);

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        // The encoder sums the buckets as it writes them: each is given
        // as what its saturated running sum adds, so that sum never wraps.
        let mut sum = 0u64;
        let mut buckets: Vec<(f64, u64)> = HISTOGRAM_BOUNDS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.0.counts.iter().copied().chain(std::iter::repeat(0)))
            .map(|(bound, n)| {
                let next = sum.saturating_add(n);
                let added = next - sum;
                sum = next;
                (bound, added)
            })
            .collect();
        if let Some(last) = buckets.last_mut() {
            last.0 = f64::INFINITY;
        }
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum_micros as f64 / 1e6,
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(String, String)>;

/// Registers a family of `M` (a counter or a gauge), each label set set
/// to its value by `set`.
fn family<M, V>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, V)>,
    set: impl Fn(&M, V),
) where
    M: prometheus_client::metrics::TypedMetric
        + EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<Labels, M>::default();
    for (l, v) in values {
        set(&f.get_or_create(&l), v);
    }
    registry.register(name, help, f);
}

fn counter_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    family::<Counter, u64>(registry, name, help, values, |c, v| {
        c.inc_by(v);
    });
}

fn gauge_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, i64)>,
) {
    family::<Gauge, i64>(registry, name, help, values, |g, v| {
        g.set(v);
    });
}

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_string(), v.into())]
}

/// What the allocator knows of the pool, for the scrape.
#[derive(Default)]
pub struct PoolFigures {
    /// Per entry: its label, leases, whether out of the rotation, how many
    /// sites it cools for, sticky sessions on it.
    pub entries: Vec<(String, u64, bool, u64, u64)>,
    /// Per entry: its leases, never going back (`HostMetrics::leases`).
    pub leases: Vec<(String, u64)>,
    pub family_totals: Vec<(String, u64)>,
    /// (A /64 lists 2^64: as many as a u128 holds.)
    pub source_addresses: Vec<(String, u128)>,
    pub leases_total: u64,
    pub sessions: u64,
    pub sites: u64,
    pub site_entries: u64,
    /// Cooldowns of (address, site) pairs begun: by push-backs, by failed
    /// connects.
    pub cooldowns_begun: [u64; 2],
    /// Requests held waiting for a site's budget.
    pub site_waiters: u64,
    /// Whether the rotation state file's last write failed.
    pub state_write_failing: bool,
}

impl HostMetrics {
    /// Lease counts that never go back: a count that fell (the entry's
    /// table count started over) carries what it had. `other`, a sum over
    /// the entries past the cap, also falls when some of them leave the
    /// pool: there it holds at what it was, and grows from there (taking
    /// the fall for a start over would add the whole sum again). So it
    /// does when all of them leave (the pool shrunk below the cap): its
    /// series stays, held, as `other`'s responses and bytes do, and goes
    /// on from there when the pool grows past the cap again (it had gone,
    /// and came back at the sum of the entries then past the cap: a
    /// counter reset to Prometheus, fewer leases than responses).
    ///
    /// `number` is the snapshot's (`snapshot_number`): two scrapes at once
    /// may apply theirs out of order, and an older one's counts, below the
    /// newer's, read as a start over (the entry's whole count carried
    /// again, for good). One older than the last applied changes nothing
    /// and reads what that one left.
    pub fn leases(
        &mut self,
        entries: &[(String, u64, bool, u64, u64)],
        number: u64,
    ) -> Vec<(String, u64)> {
        if number < self.leases_applied {
            let mut out: Vec<(String, u64)> = entries
                .iter()
                .map(|(k, n, ..)| {
                    let total = self.leases_seen.get(k).map_or(*n, |(c, last)| c + last);
                    (k.clone(), total)
                })
                .collect();
            self.held_other(&mut out);
            return out;
        }
        self.leases_applied = number;
        let out: Vec<(String, u64)> = entries
            .iter()
            .map(|(k, n, ..)| {
                let (carried, last) = self.leases_seen.entry(k.clone()).or_default();
                if *n < *last {
                    *carried += match k == "other" {
                        true => *last - *n,
                        false => *last,
                    };
                }
                *last = *n;
                (k.clone(), *carried + *n)
            })
            .collect();
        let mut out = out;
        self.held_other(&mut out);
        // Entries gone from the pool are forgotten (a return starts over).
        if self.leases_seen.len() > out.len() {
            let keep: std::collections::HashSet<&String> = out.iter().map(|(k, _)| k).collect();
            self.leases_seen.retain(|k, _| keep.contains(k));
        }
        out
    }
}

impl HostMetrics {
    /// `other` held in `out` where no entry is past the cap now.
    fn held_other(&self, out: &mut Vec<(String, u64)>) {
        if !out.iter().any(|(k, _)| k == "other") {
            if let Some((carried, last)) = self.leases_seen.get("other") {
                out.push(("other".into(), carried + last));
            }
        }
    }
}

/// The scrape: OpenMetrics text, or the classic Prometheus text format
/// (`classic`: what `promtool check metrics` and older scrapers read).
pub fn render(m: &HostMetrics, pool: &PoolFigures, classic: bool) -> String {
    let leases = &pool.leases;
    let mut r = Registry::default();
    let src = |k: &String| label("source", k.clone());
    counter_family(
        &mut r,
        "rotor_source_leases",
        "Leases of each pool entry (an address, or a prefix)",
        leases.iter().map(|(k, n)| (src(k), *n)),
    );
    gauge_family(
        &mut r,
        "rotor_source_quarantined",
        "1 while the entry is out of the rotation (unusable, its connects failing, or taken out by hand)",
        pool.entries
            .iter()
            .map(|(k, _, q, ..)| (src(k), i64::from(*q))),
    );
    gauge_family(
        &mut r,
        "rotor_source_cooling_sites",
        "Sites the entry's addresses are cooling for (they pushed back, or refused its connects)",
        pool.entries
            .iter()
            .map(|(k, _, _, c, _)| (src(k), *c as i64)),
    );
    gauge_family(
        &mut r,
        "rotor_source_sessions",
        "Sticky sessions pinned to the entry's addresses",
        pool.entries.iter().map(|(k, .., n)| (src(k), *n as i64)),
    );
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    counter_family(
        &mut r,
        "rotor_source_responses",
        "Destination responses by status class, by source entry",
        m.by_source.iter().flat_map(|(k, t)| {
            classes.iter().zip(t.responses).map(move |(c, n)| {
                (
                    vec![
                        ("source".to_string(), k.clone()),
                        ("class".to_string(), c.to_string()),
                    ],
                    n,
                )
            })
        }),
    );
    counter_family(
        &mut r,
        "rotor_source_tunnels",
        "Tunnels opened (HTTP CONNECT and SOCKS5), by source entry",
        m.by_source.iter().map(|(k, t)| (src(k), t.tunnels)),
    );
    counter_family(
        &mut r,
        "rotor_source_connect_errors",
        "Upstream connections that failed (refused, unreachable, timed out), by source entry",
        m.by_source.iter().map(|(k, t)| (src(k), t.connect_errors)),
    );
    counter_family(
        &mut r,
        "rotor_source_unreachable",
        "Times the entry was taken out of the rotation because its connects failed while the other entries' answered",
        m.by_source.iter().map(|(k, t)| (src(k), t.unreachable)),
    );
    counter_family(
        &mut r,
        "rotor_source_sent_bytes",
        "Bytes sent to destinations (tunnels; request bodies of known length), by source entry",
        m.by_source.iter().map(|(k, t)| (src(k), t.bytes_to)),
    );
    counter_family(
        &mut r,
        "rotor_source_received_bytes",
        "Bytes received from destinations (tunnels; response bodies), by source entry",
        m.by_source.iter().map(|(k, t)| (src(k), t.bytes_from)),
    );
    counter_family(
        &mut r,
        "rotor_requests",
        "Requests and tunnels the workers handled",
        [(vec![], m.requests)],
    );
    counter_family(
        &mut r,
        "rotor_errors",
        "Answers rotor gave itself, by Proxy-Status error (none: 400, 407, 414, 431, 501, 505)",
        // Every kind a worker counts, from 0 (see `ERROR_KINDS`).
        rotor_protocol::ERROR_KINDS
            .iter()
            .filter(|k| !m.errors.contains_key(**k))
            .map(|k| (k.to_string(), 0))
            .chain(m.errors.iter().map(|(k, n)| (k.clone(), *n)))
            .map(|(k, n)| (label("error", k), n)),
    );
    r.register(
        "rotor_request_duration_seconds",
        "Time from a request's head to its response head (or the tunnel's 200, or rotor's own answer, or the request given up: its client gone)",
        Counted(m.request_seconds.clone()),
    );
    r.register(
        "rotor_upstream_connect_seconds",
        "Time to connect to a destination from a leased address (connects made; failed ones are in rotor_source_connect_errors_total)",
        Counted(m.connect_seconds.clone()),
    );
    r.register(
        "rotor_lease_wait_seconds",
        "Time a request waited for its lease, answered or refused (with --budget-wait, its wait for a site's budget)",
        Counted(m.lease_wait_seconds.clone()),
    );
    r.register(
        "rotor_allocator_lease_seconds",
        "Time the allocator itself took to answer a lease over its socket (its own work, not the round trip: see rotor_lease_wait_seconds)",
        Counted(m.allocator_lease_seconds.clone()),
    );
    let worker = |w: &WorkerGauges| label("worker", w.name());
    gauge_family(
        &mut r,
        "rotor_worker_up",
        "1 for each worker connected to the allocator (a stuck worker stays connected: see rotor_worker_last_report_timestamp_seconds)",
        m.workers.values().map(|w| (worker(w), 1)),
    );
    gauge_family(
        &mut r,
        "rotor_worker_last_report_timestamp_seconds",
        "When a worker last reported (each second while it runs): `time() - rotor_worker_last_report_timestamp_seconds > 5` is a stuck worker, which stays connected",
        m.workers
            .values()
            .map(|w| (worker(w), i64::try_from(w.reported_at).unwrap_or(i64::MAX))),
    );
    gauge_family(
        &mut r,
        "rotor_worker_connections_open",
        "Client connections a worker holds",
        m.workers
            .values()
            .map(|w| (worker(w), w.connections_open as i64)),
    );
    gauge_family(
        &mut r,
        "rotor_worker_tunnels_open",
        "Tunnels a worker holds",
        m.workers
            .values()
            .map(|w| (worker(w), w.tunnels_open as i64)),
    );
    // One series a worker run, however many connections it has had (an
    // old one not yet seen gone and its successor are the same run).
    let mut runs: BTreeMap<u64, &WorkerGauges> = BTreeMap::new();
    for w in m.workers.values() {
        let run = runs.entry(w.boot).or_insert(w);
        if w.requests > run.requests {
            *run = w;
        }
    }
    counter_family(
        &mut r,
        "rotor_worker_requests",
        "Requests a worker handled, across its reconnections to the allocator",
        runs.values().map(|w| (worker(w), w.requests)),
    );
    gauge_family(
        &mut r,
        "rotor_pool_addresses",
        "Addresses in the rotation, by family",
        pool.family_totals
            .iter()
            .map(|(f, n)| (label("family", f.clone()), *n as i64)),
    );
    // A float: a /64 lists 2^64 addresses, past any integer gauge (an
    // i64 from the status's u32 said 4294967295).
    family::<Gauge<f64, std::sync::atomic::AtomicU64>, f64>(
        &mut r,
        "rotor_pool_source_addresses",
        "Addresses each pool source lists",
        pool.source_addresses
            .iter()
            .map(|(s, n)| (label("pool_source", s.clone()), *n as f64)),
        |g, v| {
            g.set(v);
        },
    );
    counter_family(
        &mut r,
        "rotor_pool_refreshes",
        "Reads of the pool sources",
        [(vec![], m.refreshes)],
    );
    counter_family(
        &mut r,
        "rotor_pool_source_errors",
        "Reads of a pool source that failed (its last good addresses kept)",
        [(vec![], m.source_errors)],
    );
    counter_family(
        &mut r,
        "rotor_state_checkpoints",
        "Checkpoints of the sticky sessions and site state written to the state directory",
        [(vec![], m.checkpoints)],
    );
    counter_family(
        &mut r,
        "rotor_state_checkpoint_errors",
        "Checkpoints that failed to write (logged; a crash now would lose what changed since the last good one)",
        [(vec![], m.checkpoint_errors)],
    );
    counter_family(
        &mut r,
        "rotor_access_log_lost_lines",
        "Access-log lines the workers lost: dropped as a writer fell behind (16 MB waiting), or in a write that failed (a full disk)",
        [(vec![], m.access_log_lost)],
    );
    counter_family(
        &mut r,
        "rotor_leases",
        "Leases handed out: the rotation's own count, which goes on across an allocator restart with a state directory (the per-source counts start over)",
        [(vec![], pool.leases_total)],
    );
    gauge_family(
        &mut r,
        "rotor_sessions",
        "Sticky sessions held",
        [(vec![], pool.sessions as i64)],
    );
    gauge_family(
        &mut r,
        "rotor_sites",
        "Sites with budgets or cooldowns held",
        [(vec![], pool.sites as i64)],
    );
    gauge_family(
        &mut r,
        "rotor_site_entries",
        "Entries of per-site state held (sites and (address, site) pairs)",
        [(vec![], pool.site_entries as i64)],
    );
    counter_family(
        &mut r,
        "rotor_site_cooldowns",
        "Cooldowns of an (address, site) pair begun: by the site's push-back (429, a 503 with Retry-After, --cooldown-status, rate-limit headers), or by connects to it failing from the address while it answered others",
        [
            (label("reason", "pushback"), pool.cooldowns_begun[0]),
            (label("reason", "connect"), pool.cooldowns_begun[1]),
        ],
    );
    gauge_family(
        &mut r,
        "rotor_site_waiters",
        "Requests held waiting for a site's budget (--budget-wait), every worker's",
        [(vec![], pool.site_waiters as i64)],
    );
    gauge_family(
        &mut r,
        "rotor_state_write_failing",
        "1 while the rotation state file's last write failed (a restart would not resume the rotation where it is)",
        [(vec![], i64::from(pool.state_write_failing))],
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    match classic {
        true => to_classic(&out),
        false => out,
    }
}

/// OpenMetrics text as the classic Prometheus text format: a counter's
/// HELP and TYPE name its `_total` samples, and no `# UNIT` or `# EOF`.
fn to_classic(open: &str) -> String {
    let counters: std::collections::HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The admin API's bearer token, read from its file at start and again at
/// each reload (SIGHUP, `rotor reload`): a token is changed without a
/// restart. A file that does not read then, or holds no good token, keeps
/// the token in use, and the log says why.
pub struct AdminToken {
    path: std::path::PathBuf,
    token: std::sync::RwLock<std::sync::Arc<str>>,
}

/// (The path only: a log line never holds the token.)
impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .finish()
    }
}

impl AdminToken {
    /// The token of `path`, checked as at each reload.
    pub fn load(path: &std::path::Path) -> Result<AdminToken, String> {
        Ok(AdminToken {
            path: path.to_path_buf(),
            token: std::sync::RwLock::new(read_token(path)?),
        })
    }

    /// The token in use.
    pub fn current(&self) -> std::sync::Arc<str> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the file again; logs a change, or why the token in use stays
    /// (and says why, for the reload's report).
    pub fn reload(&self) -> Result<(), String> {
        match read_token(&self.path) {
            Ok(t) => {
                let mut held = self.token.write().unwrap_or_else(|e| e.into_inner());
                if *held != t {
                    *held = t;
                    tracing::info!(file = %self.path.display(), "admin token changed");
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the admin token again; the one in use stays");
                Err(e)
            }
        }
    }

    /// The name a reload's report gives the token's file.
    pub fn source_name(&self) -> String {
        format!("{ADMIN_TOKEN_SOURCE} {}", self.path.display())
    }
}

/// How a reload's report names the admin token's file among what failed
/// (`rotor reload` says the token in use was kept).
pub const ADMIN_TOKEN_SOURCE: &str = "--admin-token-file";

/// The token in `path`: 16 or more printable characters, in a file that
/// not every user can read (as sshd its keys: a token every user can read
/// is every user's to take addresses out with).
fn read_token(path: &std::path::Path) -> Result<std::sync::Arc<str>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode());
    if mode.is_ok_and(|m| m & 0o004 != 0) {
        return Err(format!(
            "admin-token-file {}: readable by every user; chmod 600 it (or 640 with rotor's group)",
            path.display()
        ));
    }
    let t = rotor_protocol::read_text_file(path)
        .map_err(|e| format!("admin-token-file {}: {e}", path.display()))?;
    let t = t.trim();
    if t.len() < 16 || t.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "admin-token-file {}: the token must be 16 or more printable characters, no spaces",
            path.display()
        ));
    }
    Ok(std::sync::Arc::from(t))
}

/// Serves `GET /metrics` (and `/` with a pointer to it), and with an
/// admin token the admin API (`POST /admin/quarantine`, `POST
/// /admin/release`), until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    alloc: std::sync::Arc<crate::state::Allocator>,
    admin_token: Option<std::sync::Arc<AdminToken>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Connections served at once, and from one address: past either, a
    // new connection is answered 503 at once (a scraper or a health check
    // learns it now, not by timing out in the listen queue), so a client
    // holding connections open cannot starve the others.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Refusals in flight (each holds its descriptor half a second at
    // most): past these, a connection is closed at once, so a flood
    // cannot take the allocator's descriptors.
    let refusing = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
    // Scrapes served past the places (see `past_the_places`).
    let scrapes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES_PAST));
    let peers = PeerCounts::new(MAX_PER_PEER);
    let scrapers = PeerCounts::new(1);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // An IPv6 peer by its /64: a host holds one, and would take a
        // place per address of it (and every place, failing `/health`).
        let place = peers.enter(rotor_protocol::addr::client_key(peer.ip()));
        let permit = slots.clone().try_acquire_owned();
        let (Some(place), Ok(permit)) = (place, permit) else {
            let Ok(refusal) = refusing.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let scraper = (scrapes.clone(), scrapers.clone(), peer.ip());
            let (alloc, stop) = (alloc.clone(), shutdown.clone());
            tokio::spawn(past_the_places(stream, alloc, refusal, scraper, stop));
            continue;
        };
        let alloc = alloc.clone();
        let token = admin_token.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let (_permit, _place) = (permit, place);
            serve_connection(stream, alloc, token, stop, (true, LIFETIME)).await;
        });
    }
}

/// Serves one connection of the listener: its requests while `keep_alive`,
/// else one; the admin API with `token`. Served `lifetime`, then what is
/// in flight is finished for as long again at most, and it closes.
async fn serve_connection<I>(
    io: I,
    alloc: std::sync::Arc<crate::state::Allocator>,
    token: Option<std::sync::Arc<AdminToken>>,
    stop: tokio_util::sync::CancellationToken,
    (keep_alive, lifetime): (bool, std::time::Duration),
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let alloc = alloc.clone();
        // The token in use when the request came.
        let token = token.as_ref().map(|t| t.current());
        async move { Ok::<_, std::convert::Infallible>(answer(req, &alloc, token.as_deref()).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(std::time::Duration::from_secs(10))
        .keep_alive(keep_alive)
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    // Then an answer in flight (a large pool's scrape to a slow scraper) is
    // finished: cut at once, a scrape kept alive across the lifetime would
    // arrive truncated.
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(lifetime) => {}
        _ = stop.cancelled() => return,
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = tokio::time::timeout(lifetime, conn) => {}
        _ = stop.cancelled() => {}
    }
}

/// A connection past the listener's places (every one held, or its
/// address's): answered at once, not left in the listen queue. A load
/// balancer's `GET /health` is answered as it would be, and a scrape
/// (`GET` or `HEAD /metrics`) is served that one request, its head whole
/// within half a second, for [`SCRAPE_PAST_LIFETIME`], while one of
/// `scraper`'s [`MAX_SCRAPES_PAST`] places is free, and its address's one
/// (`scraper`: those places, and the client's address): clients
/// holding every place (stalled, a flood) must neither take the host out
/// of its rotation nor leave Prometheus without its scrape (it got 503s
/// for up to their 10 s header timeout). Else 503, once what was read
/// can be nothing else.
async fn past_the_places(
    mut stream: tokio::net::TcpStream,
    alloc: std::sync::Arc<crate::state::Allocator>,
    refusal: tokio::sync::OwnedSemaphorePermit,
    (scrapes, scrapers, client): (
        std::sync::Arc<tokio::sync::Semaphore>,
        PeerCounts,
        std::net::IpAddr,
    ),
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Half a second for the head, the answer and a FIN, and what the
    // client sent read for a moment: closed unread, the kernel would reset
    // the connection, perhaps before the client read the answer.
    let by = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    let mut head = Vec::new();
    let mut seen = Past::Wait;
    let _ = tokio::time::timeout_at(by, async {
        let mut buf = [0u8; 1024];
        loop {
            seen = past(&head);
            if seen != Past::Wait || head.len() >= HEAD_PAST {
                return Ok(());
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or(Ok::<_, std::io::Error>(()));
    let scraper = (seen == Past::Scrape)
        .then(|| scrapes.try_acquire_owned().ok())
        .flatten()
        .and_then(|slot| {
            let place = scrapers.enter(rotor_protocol::addr::client_key(client))?;
            Some((slot, place))
        });
    if let Some(scraper) = scraper {
        drop(refusal);
        let io = rotor_protocol::Rewind::new(head.into(), stream);
        serve_connection(io, alloc, None, stop, (false, SCRAPE_PAST_LIFETIME)).await;
        drop(scraper);
        return;
    }
    let answer = match seen {
        Past::Health => health_line(&alloc),
        _ => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            .to_vec(),
    };
    // (Its own half second: a head cut off by the first one is answered.)
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    drop(refusal);
}

/// What the start of a request past the places is (see
/// `past_the_places`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// A `GET /health`.
    Health,
    /// A scrape, its head whole.
    Scrape,
    /// Either, read only in part.
    Wait,
    /// Anything else.
    Refuse,
}

fn past(head: &[u8]) -> Past {
    if head.starts_with(b"GET /health ") {
        return Past::Health;
    }
    if is_scrape(head) {
        return match head.windows(4).any(|w| w == b"\r\n\r\n") {
            true => Past::Scrape,
            false => Past::Wait,
        };
    }
    let may_be = |p: &&[u8]| p.starts_with(head);
    match may_be(&&b"GET /health "[..]) || SCRAPES.iter().any(may_be) {
        true => Past::Wait,
        false => Past::Refuse,
    }
}

/// How a scrape's request line starts: `GET` or `HEAD` of `/metrics`, a
/// query or not.
const SCRAPES: [&[u8]; 4] = [
    b"GET /metrics ",
    b"GET /metrics?",
    b"HEAD /metrics ",
    b"HEAD /metrics?",
];

/// Whether a request line (or its start) is a scrape (see [`SCRAPES`]).
fn is_scrape(line: &[u8]) -> bool {
    SCRAPES.iter().any(|p| line.starts_with(p))
}

/// The status and body of a `GET /health` (see `Allocator::health`).
fn health(alloc: &crate::state::Allocator) -> (hyper::StatusCode, String) {
    match alloc.health() {
        Ok(()) => (hyper::StatusCode::OK, "serving\n".into()),
        Err(why) => (hyper::StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// The whole answer to a `GET /health` past the connection limits.
fn health_line(alloc: &crate::state::Allocator) -> Vec<u8> {
    let (status, body) = health(alloc);
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Logs an admin request refused for its token: a warning, then at most
/// one every 10 s with how many more (a flood of them is no flood of log
/// lines).
fn refused_admin(path: &str) {
    static REFUSED: rotor_protocol::Moment = rotor_protocol::Moment::new();
    if let Some(n) = REFUSED.count_in(std::time::Duration::from_secs(10)) {
        tracing::warn!(
            %path,
            refused = n,
            "admin API: refused a request without the right token (said once in 10 s)"
        );
    }
}

/// Connections the metrics listener serves at once.
const MAX_CONNECTIONS: usize = 64;
/// … and from one address.
const MAX_PER_PEER: usize = 8;
/// 503s being answered at once.
const MAX_REFUSING: usize = 256;
/// Scrapes served at once past the places (see `past_the_places`), one
/// an address.
const MAX_SCRAPES_PAST: usize = 4;
/// The most of a scrape's head read past the places.
const HEAD_PAST: usize = 8192;
/// How long a scrape past the places is served (and then finished for as
/// long again at most): Prometheus gives a scrape 10 s by default.
const SCRAPE_PAST_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a connection of the listener is served (see
/// `serve_connection`).
const LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Open connections by client address.
#[derive(Clone)]
struct PeerCounts {
    counts: std::sync::Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    /// The most an address holds.
    most: usize,
}

/// A connection's place in its address's count, given back when dropped.
struct Place(PeerCounts, std::net::IpAddr);

impl PeerCounts {
    fn new(most: usize) -> PeerCounts {
        PeerCounts {
            counts: Default::default(),
            most,
        }
    }

    fn enter(&self, ip: std::net::IpAddr) -> Option<Place> {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.most {
            return None;
        }
        *n += 1;
        Some(Place(self.clone(), ip))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut map = self.0.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// The token of an `Authorization: Bearer TOKEN` value (the scheme's
/// name in any case, RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

type Reply = hyper::Response<Held>;

/// A reply's body, holding the place of the render it is (if it is one)
/// until it has been sent or dropped: see [`MAX_RENDERS`].
pub struct Held {
    /// The whole body, until it is taken.
    data: Option<bytes::Bytes>,
    _render: Option<std::sync::Arc<tokio::sync::OwnedSemaphorePermit>>,
}

impl hyper::body::Body for Held {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let data = self.data.take().filter(|d| !d.is_empty());
        std::task::Poll::Ready(data.map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(|d| d.is_empty())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Whether an `Accept` value prefers OpenMetrics to the classic text
/// format: its media ranges read case-insensitively, each with its `q`
/// (1 if not given; 0: not acceptable), OpenMetrics' best weight at least
/// that of `text/plain`, `text/*` or `*/*`.
fn prefers_openmetrics(accept: &str) -> bool {
    let (mut open, mut plain) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        match kind.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" | "text/*" | "*/*" => plain = plain.max(q),
            _ => {}
        }
    }
    open > 0.0 && open >= plain
}

fn reply(status: hyper::StatusCode, ctype: &'static str, body: String) -> Reply {
    reply_bytes(status, ctype, body.into())
}

fn reply_bytes(status: hyper::StatusCode, ctype: &'static str, body: bytes::Bytes) -> Reply {
    let mut resp = hyper::Response::new(Held {
        data: Some(body),
        _render: None,
    });
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    resp
}

fn json_reply(status: hyper::StatusCode, v: serde_json::Value) -> Reply {
    reply(status, "application/json", format!("{v}\n"))
}

/// Whether `given` is `token`, compared in constant time: every byte of
/// the token is looked at whatever `given`'s length (a length that
/// differs is a difference too), so the time tells neither.
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    let differs = token.iter().enumerate().fold(0u8, |d, (i, t)| {
        d | (given.get(i).copied().unwrap_or(!*t) ^ t)
    });
    differs == 0 && given.len() == token.len()
}

/// How long a rendered scrape is served again to scrapes that come while
/// it is fresh.
const RENDER_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A scrape rendered: when, whether in the classic format, the text, and
/// its place among the renders alive.
pub type Rendered = (
    std::time::Instant,
    bool,
    bytes::Bytes,
    std::sync::Arc<tokio::sync::OwnedSemaphorePermit>,
);

/// Renders alive at once (being sent to scrapers, or the last kept): a
/// render is ≈ 90 MB for a pool of 100 000 entries, and scrapers that
/// read slowly each held theirs up to two minutes, a new one every second
/// for each format. Past it the last render is served again, or 503.
pub const MAX_RENDERS: usize = 4;

/// The metrics text (`classic`: the classic format, else OpenMetrics):
/// rendered once at a time, and served again to the scrapes that come
/// within [`RENDER_REUSE`] of it. A scrape of a pool of 100 000 entries is
/// ≈ 90 MB of text built in memory under the allocator's lock three
/// times; the listener's 64 connections rendering at once held gigabytes
/// and kept leases waiting. Rendered off the allocator's one thread: a
/// large pool's scrape takes a while, and leases over the socket would
/// wait for it.
async fn rendered(
    alloc: &std::sync::Arc<crate::state::Allocator>,
    classic: bool,
) -> Result<Held, &'static str> {
    let mut last = alloc.rendered.lock().await;
    let held = |(_, _, body, place): &Rendered| Held {
        data: Some(body.clone()),
        _render: Some(place.clone()),
    };
    let same = last.as_ref().filter(|r| r.1 == classic);
    if let Some(r) = same.filter(|r| r.0.elapsed() < RENDER_REUSE) {
        return Ok(held(r));
    }
    // The last one's place is given up first when it is of no use now (a
    // scraper still sending it keeps it).
    if last.as_ref().is_some_and(|r| r.1 != classic) {
        *last = None;
    }
    let place = match alloc.renders.clone().try_acquire_owned() {
        Ok(p) => std::sync::Arc::new(p),
        Err(_) => {
            return match last.as_ref() {
                Some(r) => Ok(held(r)),
                None => Err("too many scrapes are being sent (slow scrapers); retry\n"),
            }
        }
    };
    let rendering = alloc.clone();
    let body: bytes::Bytes = tokio::task::spawn_blocking(move || rendering.render_metrics(classic))
        .await
        .map_err(|_| "the metrics could not be rendered\n")?
        .into();
    let r = (std::time::Instant::now(), classic, body, place);
    let out = held(&r);
    *last = Some(r);
    Ok(out)
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    alloc: &std::sync::Arc<crate::state::Allocator>,
    token: Option<&str>,
) -> Reply {
    use hyper::{Method, StatusCode};
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path().to_string();
    // (hyper sends a HEAD's answer without its body.)
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    match (req.method().clone(), path.as_str()) {
        (_, "/metrics" | "/" | "/health") if !read => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                text,
                "only GET and HEAD here\n".into(),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET, HEAD"),
            );
            r
        }
        (_, "/metrics") => {
            // OpenMetrics to a scraper that prefers it (Prometheus does),
            // else the classic text format.
            let open = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(prefers_openmetrics);
            let body = match rendered(alloc, !open).await {
                Ok(body) => body,
                Err(why) => return reply(StatusCode::SERVICE_UNAVAILABLE, text, why.into()),
            };
            let ctype = match open {
                true => "application/openmetrics-text; version=1.0.0; charset=utf-8",
                false => "text/plain; version=0.0.4; charset=utf-8",
            };
            let mut resp = hyper::Response::new(body);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(ctype),
            );
            resp
        }
        (_, "/") => reply(StatusCode::OK, text, "rotor: metrics at /metrics\n".into()),
        // For a load balancer in front of several hosts: whether this
        // host can serve (`Allocator::health`).
        (_, "/health") => {
            let (status, body) = health(alloc);
            reply(status, text, body)
        }
        (_, "/admin/quarantine" | "/admin/release") => {
            let Some(token) = token else {
                return json_reply(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "the admin API is off: start the allocator with --admin-token-file"}),
                );
            };
            let given = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| bearer_token(v.as_bytes()))
                .unwrap_or_default();
            if !token_matches(given, token.as_bytes()) {
                refused_admin(&path);
                return json_reply(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "an Authorization: Bearer header with the admin token is needed"}),
                );
            }
            // (Only after the token: without it, nothing about the API.)
            if req.method() != Method::POST {
                return json_reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    serde_json::json!({"error": "POST a JSON object"}),
                );
            }
            admin(req, alloc, path == "/admin/release").await
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "not found: metrics are at GET /metrics\n".into(),
        ),
    }
}

/// `{"address": "10.0.0.5"}` (and for a quarantine `"for": "30m"`).
async fn admin(
    req: hyper::Request<hyper::body::Incoming>,
    alloc: &crate::state::Allocator,
    release: bool,
) -> Reply {
    use http_body_util::BodyExt;
    use hyper::StatusCode;
    let bad =
        |why: String| json_reply(StatusCode::BAD_REQUEST, serde_json::json!({ "error": why }));
    let body = match http_body_util::Limited::new(req.into_body(), 4096)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("the body must be a JSON object of at most 4096 bytes".into()),
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("not JSON: {e}")),
    };
    let Some(ip) = v["address"]
        .as_str()
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
    else {
        return bad("\"address\" must be an IP address".into());
    };
    let for_ = match (&v["for"], release) {
        (serde_json::Value::Null, _) => None,
        // As `rotor quarantine --for`.
        (serde_json::Value::String(d), false) => match crate::state::hand_out_for(d) {
            Ok(d) => Some(d),
            Err(why) => return bad(format!("\"for\": {why}")),
        },
        _ => return bad("\"for\" is a duration (30m, 2h), for a quarantine".into()),
    };
    let Some(entry) = alloc.steer(ip, release, for_, &crate::usable::usable_now) else {
        return json_reply(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("{ip} is not in the pool; nothing changed")}),
        );
    };
    // Released, but this host cannot use it: it stays out.
    match release.then(|| alloc.out_reason(&entry)).flatten() {
        Some(reason) => json_reply(
            StatusCode::CONFLICT,
            serde_json::json!({
                "entry": entry.to_string(),
                "in_rotation": false,
                "error": format!("{entry} stays out of the rotation: {reason}"),
            }),
        ),
        None => match alloc.hand_not_kept() {
            // Done now, but a restart would undo it: a failure a script
            // must see, as `rotor quarantine`'s exit 1.
            Some(why) => json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({
                    "entry": entry.to_string(),
                    "in_rotation": release,
                    "for_secs": for_.map(|d| d.as_secs()),
                    "kept": false,
                    "error": format!("done, but not kept over an allocator restart, which would undo it: {why}"),
                }),
            ),
            None => json_reply(
                StatusCode::OK,
                serde_json::json!({
                    "entry": entry.to_string(),
                    "in_rotation": release,
                    "for_secs": for_.map(|d| d.as_secs()),
                    // Out by hand, inside a prefix that stays in the
                    // rotation (no entry of its own in the status).
                    "inside": (!release).then(|| alloc.held_by_wider(&entry)).flatten().map(|w| w.to_string()),
                }),
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the start of a request past the places is: waited for only
    /// while it may still be a health check or a scrape, a scrape only
    /// once its head is whole.
    #[test]
    fn a_request_past_the_places_is_told_apart_as_it_comes() {
        for (head, want) in [
            ("", Past::Wait),
            ("GET /he", Past::Wait),
            ("GET /health ", Past::Health),
            ("GET /health HTTP/1.1\r\n", Past::Health),
            ("GET /metrics", Past::Wait),
            ("HEAD /metrics?x HTTP/1.1\r\n", Past::Wait),
            ("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", Past::Scrape),
            ("GET /metricsx", Past::Refuse),
            ("GET / HTTP/1.1\r\n", Past::Refuse),
            ("POST /admin/release HTTP/1.1\r\n", Past::Refuse),
            ("\x16\x03\x01", Past::Refuse),
            ("G", Past::Wait),
            ("X", Past::Refuse),
        ] {
            assert_eq!(past(head.as_bytes()), want, "{head:?}");
        }
    }

    /// A scrape past the places is a `GET` or `HEAD` of `/metrics`, and
    /// only that: the admin API and other paths get their 503.
    #[test]
    fn a_scrape_is_a_get_or_head_of_metrics() {
        for line in [
            "GET /metrics HTTP/1.1\r\n",
            "GET /metrics?name[]=x HTTP/1.1\r\n",
            "HEAD /metrics HTTP/1.1\r\n",
            "GET /metrics ",
        ] {
            assert!(is_scrape(line.as_bytes()), "{line}");
        }
        for line in [
            "GET /metricsx HTTP/1.1\r\n",
            "GET /metrics",
            "POST /metrics HTTP/1.1\r\n",
            "POST /admin/release HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\n",
            "get /metrics HTTP/1.1\r\n",
            "",
        ] {
            assert!(!is_scrape(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn openmetrics_when_preferred() {
        // Prometheus's own Accept.
        assert!(prefers_openmetrics("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"));
        assert!(prefers_openmetrics("Application/OpenMetrics-Text"));
        assert!(!prefers_openmetrics(
            "application/openmetrics-text;q=0, text/plain"
        ));
        assert!(!prefers_openmetrics(
            "text/plain;q=1, application/openmetrics-text;q=0.1"
        ));
        assert!(!prefers_openmetrics("*/*"));
        assert!(!prefers_openmetrics("text/plain"));
        assert!(!prefers_openmetrics(""));
    }

    #[test]
    fn lease_counters_never_go_back_and_other_does_not_jump() {
        let mut h = HostMetrics::default();
        let e = |k: &str, n: u64| (k.to_string(), n, false, 0, 0);
        assert_eq!(
            h.leases(&[e("a", 5), e("other", 100)], 1),
            [("a".into(), 5), ("other".into(), 100)]
        );
        // a's table count started over; some entries past the cap left,
        // taking 60 of other's sum with them.
        assert_eq!(
            h.leases(&[e("a", 2), e("other", 40)], 2),
            [("a".into(), 7), ("other".into(), 100)]
        );
        assert_eq!(
            h.leases(&[e("a", 3), e("other", 45)], 3),
            [("a".into(), 8), ("other".into(), 105)]
        );
        // An entry gone and back starts over.
        assert_eq!(h.leases(&[e("other", 45)], 4), [("other".into(), 105)]);
        assert_eq!(
            h.leases(&[e("a", 1), e("other", 45)], 5),
            [("a".into(), 1), ("other".into(), 105)]
        );
        // The pool shrunk below the cap: `other` holds; past it again,
        // the entries then past the cap (11 leases, counted before under
        // their own labels) hold it still, and it grows from there.
        assert_eq!(
            h.leases(&[e("a", 2)], 6),
            [("a".into(), 2), ("other".into(), 105)]
        );
        assert_eq!(
            h.leases(&[e("a", 2)], 7),
            [("a".into(), 2), ("other".into(), 105)]
        );
        assert_eq!(
            h.leases(&[e("a", 2), e("other", 11)], 8),
            [("a".into(), 2), ("other".into(), 105)]
        );
        assert_eq!(
            h.leases(&[e("a", 2), e("other", 20)], 9),
            [("a".into(), 2), ("other".into(), 114)]
        );
    }

    /// Scrapes within a second of a render get that render (one render
    /// at a time); a scrape in the other format, or later, a new one.
    #[tokio::test]
    async fn scrapes_at_once_share_one_render() {
        let alloc = std::sync::Arc::new(crate::state::Allocator::new(vec![]));
        let text = |h: Result<Held, &str>| h.unwrap().data.unwrap();
        let (a, b) = tokio::join!(rendered(&alloc, true), rendered(&alloc, true));
        let (a, b) = (text(a), text(b));
        assert_eq!(a.as_ptr(), b.as_ptr(), "rendered twice");
        let open = text(rendered(&alloc, false).await);
        assert_ne!(open.as_ptr(), a.as_ptr());
        assert!(String::from_utf8_lossy(&open).contains("# EOF"));
        alloc.rendered.lock().await.as_mut().unwrap().0 -= RENDER_REUSE;
        let later = text(rendered(&alloc, false).await);
        assert_ne!(later.as_ptr(), open.as_ptr());
    }

    /// Renders still being sent hold their places: past `MAX_RENDERS` of
    /// them a scrape gets the last render again (or, in the other format,
    /// a 503), not one more render held in memory; places come back as
    /// the scrapes end.
    #[tokio::test]
    async fn slow_scrapes_hold_a_few_renders_at_most() {
        let alloc = std::sync::Arc::new(crate::state::Allocator::new(vec![]));
        let mut slow = Vec::new();
        for _ in 0..MAX_RENDERS {
            if let Some(r) = alloc.rendered.lock().await.as_mut() {
                r.0 -= RENDER_REUSE;
            }
            slow.push(rendered(&alloc, false).await.unwrap());
        }
        let ptr = |h: &Held| h.data.as_ref().unwrap().as_ptr();
        let distinct: std::collections::HashSet<_> = slow.iter().map(ptr).collect();
        assert_eq!(distinct.len(), MAX_RENDERS);
        if let Some(r) = alloc.rendered.lock().await.as_mut() {
            r.0 -= RENDER_REUSE;
        }
        let again = rendered(&alloc, false).await.unwrap();
        assert_eq!(
            ptr(&again),
            ptr(slow.last().unwrap()),
            "the last render again"
        );
        assert!(rendered(&alloc, true).await.is_err(), "none in that format");
        drop((slow, again));
        assert!(rendered(&alloc, true).await.is_ok());
    }

    /// Two scrapes at once: the one whose snapshot is older applies its
    /// counts last. It changes nothing (its lower count is no start over)
    /// and reads what the newer one left.
    #[test]
    fn an_older_snapshot_applied_late_changes_nothing() {
        let mut h = HostMetrics::default();
        let e = |k: &str, n: u64| (k.to_string(), n, false, 0, 0);
        let (older, newer) = (h.snapshot_number(), h.snapshot_number());
        assert_eq!(h.leases(&[e("a", 12)], newer), [("a".into(), 12)]);
        assert_eq!(h.leases(&[e("a", 10)], older), [("a".into(), 12)]);
        let next = h.snapshot_number();
        assert_eq!(h.leases(&[e("a", 13)], next), [("a".into(), 13)]);
    }

    #[test]
    fn the_token_matches_only_itself() {
        let token = b"0123456789abcdef";
        assert!(super::token_matches(token, token));
        for given in [
            &b""[..],
            b"0123456789abcde",
            b"0123456789abcdeF",
            b"0123456789abcdef0",
        ] {
            assert!(!super::token_matches(given, token), "{given:?}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(super::bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(super::bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(super::bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(super::bearer_token(b"Basic abc"), None);
        assert_eq!(super::bearer_token(b"Bear"), None);
    }

    /// More worker runs within an hour than 1 024 are all kept (a report
    /// sent again still counts once), and the map is not scanned at each
    /// report past that: its next pruning waits for it to double.
    #[test]
    fn many_runs_in_an_hour_are_kept_and_not_scanned_at_each_report() {
        let mut h = HostMetrics::default();
        let report = |boot| WorkerMetrics {
            boot,
            seq: 1,
            requests: 1,
            ..WorkerMetrics::default()
        };
        for boot in 0..3000 {
            h.add(1, (100, true), &report(boot), &[], |ip| ip.to_string());
        }
        assert_eq!(h.applied.len(), 3000);
        assert!(h.prune_at >= 2048, "{}", h.prune_at);
        // Each report again: counted once.
        for boot in 0..3000 {
            h.add(1, (100, true), &report(boot), &[], |ip| ip.to_string());
        }
        assert_eq!(h.requests, 3000);
    }

    /// A peer that sends a new run with every report (and listen
    /// addresses by the million) holds a bounded share: the most recent
    /// runs, and a worker's first addresses, cut.
    #[test]
    fn runs_and_listen_addresses_are_bounded() {
        let mut h = HostMetrics::default();
        let mut report = WorkerMetrics {
            seq: 1,
            requests: 1,
            ..WorkerMetrics::default()
        };
        for boot in 0..(3 * MAX_RUNS as u64) {
            report.boot = boot;
            h.add(1, (100, true), &report, &[], |ip| ip.to_string());
            assert!(h.applied.len() <= MAX_RUNS + 1, "{}", h.applied.len());
        }
        assert_eq!(h.requests, 3 * MAX_RUNS as u64);
        // The latest run is remembered: sent again, it counts once.
        h.add(1, (100, true), &report, &[], |ip| ip.to_string());
        assert_eq!(h.requests, 3 * MAX_RUNS as u64);
        report.boot += 1;
        report.listen = vec!["x".repeat(1000); 1000];
        h.add(1, (100, true), &report, &[], |ip| ip.to_string());
        let w = &h.workers[&1];
        assert_eq!(w.listen.len(), MAX_LISTEN);
        assert!(w
            .listen
            .iter()
            .all(|l| l.len() == MAX_LISTEN_LEN + '…'.len_utf8()));
        assert!(h.run_requests.len() <= MAX_RUNS + 1);
    }

    /// Error kinds from reports are bounded: not a word, or one past
    /// the cap, counts as `other` (each was a label of its own).
    #[test]
    fn error_kinds_are_bounded() {
        let mut h = HostMetrics::default();
        let m = WorkerMetrics {
            boot: 7,
            seq: 1,
            errors: (0..200)
                .map(|i| {
                    (
                        format!("kind_{}", "x".repeat(i % 30 + 1)) + &"y".repeat(i / 30),
                        1,
                    )
                })
                .chain([("Not A Kind".to_string(), 1), ("dns_error".to_string(), 1)])
                .collect(),
            ..WorkerMetrics::default()
        };
        h.add(1, (100, true), &m, &[], |ip| ip.to_string());
        assert!(h.errors.len() <= MAX_ERROR_KINDS + 1, "{}", h.errors.len());
        assert_eq!(h.errors.values().sum::<u64>(), 202, "none lost");
        assert!(h.errors["other"] >= 1);
    }

    /// A peer's report of huge counts (a broken or hostile peer) leaves
    /// the sums at their top, never wrapped round to small ones (a
    /// counter going back reads as a restart to Prometheus).
    #[test]
    fn sums_saturate() {
        let mut h = HostMetrics::default();
        let big = rotor_protocol::Histogram {
            counts: vec![u64::MAX; rotor_protocol::HISTOGRAM_BOUNDS.len() + 1],
            sum_micros: u64::MAX,
        };
        for seq in 1..=2 {
            let m = WorkerMetrics {
                boot: 7,
                seq,
                requests: u64::MAX,
                by_source: vec![rotor_protocol::SourceMetrics {
                    ip: "10.0.0.1".parse().unwrap(),
                    responses: [u64::MAX; 5],
                    tunnels: u64::MAX,
                    connect_errors: u64::MAX,
                    bytes_to: u64::MAX,
                    bytes_from: u64::MAX,
                }],
                errors: vec![("dns_error".into(), u64::MAX)],
                request_seconds: big.clone(),
                ..WorkerMetrics::default()
            };
            h.add(1, (100, true), &m, &[], |ip| ip.to_string());
        }
        assert_eq!(h.requests, u64::MAX);
        let t = &h.by_source["10.0.0.1"];
        assert_eq!(t.responses, [u64::MAX; 5]);
        assert_eq!(
            [t.tunnels, t.connect_errors, t.bytes_to, t.bytes_from],
            [u64::MAX; 4]
        );
        assert_eq!(h.errors["dns_error"], u64::MAX);
        assert_eq!(h.request_seconds.count(), u64::MAX);
        assert_eq!(h.request_seconds.sum_micros, u64::MAX);
        assert_eq!(h.workers[&1].requests, u64::MAX);
        let text = render(&h, &PoolFigures::default(), true);
        assert!(
            text.contains(&format!(
                "rotor_request_duration_seconds_bucket{{le=\"+Inf\"}} {}",
                u64::MAX
            )),
            "{text}"
        );
    }

    #[test]
    fn totals_of_entries_that_left_the_pool_go() {
        let mut h = HostMetrics::default();
        for (seq, ip) in [(1, "10.0.0.1"), (2, "10.0.0.2")] {
            let m = WorkerMetrics {
                boot: 7,
                seq,
                by_source: vec![rotor_protocol::SourceMetrics {
                    ip: ip.parse().unwrap(),
                    responses: [0; 5],
                    tunnels: 1,
                    connect_errors: 0,
                    bytes_to: 0,
                    bytes_from: 0,
                }],
                ..WorkerMetrics::default()
            };
            h.add(1, (100, true), &m, &[], |ip| ip.to_string());
        }
        assert_eq!(h.by_source.len(), 2);
        h.track_sources(&["10.0.0.2".to_string()]);
        assert_eq!(h.by_source.keys().collect::<Vec<_>>(), ["10.0.0.2"]);
    }

    /// A worker that reconnects (the same run, a new peer) counts on from
    /// where it was: its counter never goes back.
    #[test]
    fn a_workers_requests_survive_its_reconnection() {
        let mut h = HostMetrics::default();
        let m = |seq, requests| WorkerMetrics {
            boot: 7,
            seq,
            requests,
            ..WorkerMetrics::default()
        };
        h.add(1, (100, true), &m(1, 5), &[], |ip| ip.to_string());
        h.workers.remove(&1);
        h.add(2, (100, true), &m(2, 3), &[], |ip| ip.to_string());
        assert_eq!(h.workers[&2].requests, 8);
        // Both connections seen at once: one series.
        h.add(1, (100, true), &m(3, 1), &[], |ip| ip.to_string());
        let text = render(&h, &PoolFigures::default(), true);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("rotor_worker_requests_total{"))
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].ends_with(" 9"), "{lines:?}");
    }

    /// Workers the allocator cannot see (each in a PID namespace of its
    /// own, as containers run them: both pid 1) are two series, not one
    /// that sums their counters and takes either's gauges (review as).
    #[test]
    fn workers_of_other_namespaces_are_told_apart() {
        let mut h = HostMetrics::default();
        let m = |boot| WorkerMetrics {
            boot,
            seq: 1,
            requests: 5,
            ..WorkerMetrics::default()
        };
        h.add(1, (1, false), &m(0x1_0000_00aa), &[], |ip| ip.to_string());
        h.add(2, (1, false), &m(0x2_0000_00bb), &[], |ip| ip.to_string());
        h.add(3, (4242, true), &m(0xcc), &[], |ip| ip.to_string());
        let text = render(&h, &PoolFigures::default(), true);
        for family in ["rotor_worker_requests_total", "rotor_worker_up"] {
            let mut names: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .map(|l| l.split('"').nth(1).unwrap())
                .collect();
            names.sort();
            assert_eq!(names, ["1@000000aa", "1@000000bb", "4242"], "{family}");
        }
    }

    #[test]
    fn a_report_sent_twice_counts_once() {
        let mut h = HostMetrics::default();
        let m = WorkerMetrics {
            boot: 7,
            seq: 1,
            requests: 5,
            ..WorkerMetrics::default()
        };
        h.add(1, (100, true), &m, &[], |ip| ip.to_string());
        h.add(1, (100, true), &m, &[], |ip| ip.to_string());
        assert_eq!(h.requests, 5);
        h.add(
            1,
            (100, true),
            &WorkerMetrics {
                seq: 2,
                ..m.clone()
            },
            &[],
            |ip| ip.to_string(),
        );
        assert_eq!(h.requests, 10);
        // Another run of a worker counts from its own first report.
        h.add(2, (101, true), &WorkerMetrics { boot: 8, ..m }, &[], |ip| {
            ip.to_string()
        });
        assert_eq!(h.requests, 15);
    }
}
