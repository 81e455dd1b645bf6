//! What a worker served, counted as it happens and sent to the allocator
//! every second (`Request::Metrics`): the allocator keeps the host's
//! totals and serves them to Prometheus, so one scrape covers every worker
//! and counters do not go back when a worker restarts.
//!
//! One uncontended lock per event; what could not be sent (the allocator
//! away) is kept for the next report. Bounded: one entry per source
//! address used since the last report, one per error kind.

use foldhash::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rotor_protocol::{Histogram, SourceMetrics, SourceUnreached, WorkerMetrics};
use tokio_util::sync::CancellationToken;

use crate::lease::LeaseClient;

/// A report as it goes to the allocator: what was served, and counters
/// by name (`Request::MetricsV2`; an allocator older than minor 21 is
/// sent the metrics alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub metrics: WorkerMetrics,
    pub counters: Vec<(String, u64)>,
}

impl Report {
    pub fn request(self) -> rotor_protocol::Request {
        rotor_protocol::Request::MetricsV2 {
            metrics: self.metrics,
            counters: self.counters,
        }
    }
}

#[derive(Default)]
struct Acc {
    requests: u64,
    sources: HashMap<IpAddr, SourceMetrics>,
    errors: HashMap<String, u64>,
    request_seconds: Histogram,
    connect_seconds: Histogram,
    lease_wait_seconds: Histogram,
    /// Failed connects confirmed as their source's fault (kept across
    /// reports: the destinations it watches).
    witness: crate::witness::Witness,
}

/// Source addresses counted apart between two reports at most (a prefix
/// pool leases a new address each time); the rest are counted together
/// under 0.0.0.0, which the allocator labels `other`. Keeps a report far
/// under the frame limit. (One fewer than an allocator reads: the
/// 0.0.0.0 line is one more.)
const MAX_SOURCES: usize = rotor_protocol::MAX_REPORTED_SOURCES - 1;

/// How long the report at a worker's stop may wait for the allocator (one
/// that answers takes microseconds).
const LAST_REPORT_WAIT: Duration = Duration::from_millis(250);

impl Acc {
    /// One request more, its head (or rotor's answer) after `took`.
    fn request(&mut self, took: Duration) {
        self.requests += 1;
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// One more request that ended in the error `kind` (its name copied
    /// only the first time).
    fn error(&mut self, kind: &str) {
        debug_assert!(
            rotor_protocol::ERROR_KINDS.contains(&kind),
            "error kind {kind} is not in rotor_protocol::ERROR_KINDS"
        );
        match self.errors.get_mut(kind) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(kind.to_string(), 1);
            }
        }
    }

    fn source(&mut self, ip: IpAddr) -> &mut SourceMetrics {
        let ip = match self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&ip) {
            true => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            false => ip,
        };
        self.sources.entry(ip).or_insert_with(|| SourceMetrics {
            ip,
            responses: [0; 5],
            tunnels: 0,
            connect_errors: 0,
            bytes_to: 0,
            bytes_from: 0,
        })
    }
}

pub struct Meter {
    acc: Mutex<Acc>,
    /// This run, for the allocator to tell a report sent again.
    boot: u64,
    seq: AtomicU64,
    /// Where the worker accepts clients, for `rotor status`.
    pub listen: Mutex<Vec<String>>,
    /// Tunnels open now (HTTP CONNECT and SOCKS5).
    pub tunnels_open: AtomicU64,
}

impl Default for Meter {
    fn default() -> Meter {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 40);
        Meter {
            acc: Mutex::default(),
            boot: rotor_protocol::fnv1a(boot.to_le_bytes()),
            seq: AtomicU64::new(0),
            listen: Mutex::default(),
            tunnels_open: AtomicU64::new(0),
        }
    }
}

impl Meter {
    fn with(&self, f: impl FnOnce(&mut Acc)) {
        f(&mut self.acc.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A request answered by the destination of authority `dest` (read
    /// only while a destination is watched, see `witness`) with `status`,
    /// from `ip`, its head after `took`.
    pub fn response<'a>(
        &self,
        ip: IpAddr,
        dest: impl FnOnce() -> &'a str,
        status: u16,
        took: Duration,
    ) {
        self.with(|a| {
            a.witness.answered_host(ip, dest);
            a.request(took);
            if let Some(class) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
                a.source(ip).responses[class as usize] += 1;
            }
        });
    }

    /// A tunnel opened from `ip` to the destination of authority `dest`,
    /// after `took`.
    pub fn tunnel<'a>(&self, ip: IpAddr, dest: impl FnOnce() -> &'a str, took: Duration) {
        self.with(|a| {
            a.witness.answered_host(ip, dest);
            a.request(took);
            a.source(ip).tunnels += 1;
        });
    }

    /// A tunnel to `dest` from `ip` whose client left before it opened
    /// (before it took the 200), after `took`: the destination answered,
    /// the request is counted with the error `kind`, not as a tunnel.
    pub fn tunnel_unopened<'a>(
        &self,
        ip: IpAddr,
        dest: impl FnOnce() -> &'a str,
        kind: &str,
        took: Duration,
    ) {
        self.with(|a| {
            a.witness.answered_host(ip, dest);
            a.request(took);
            a.error(kind);
        });
    }

    /// rotor answered by itself, not an error (a TRACE or OPTIONS with
    /// `Max-Forwards: 0`): a request, from no source.
    pub fn answered(&self, took: Duration) {
        self.with(|a| a.request(took));
    }

    /// rotor answered by itself (`kind`: the `Proxy-Status` error).
    pub fn error(&self, kind: Option<&str>, took: Duration) {
        self.with(|a| {
            a.request(took);
            a.error(kind.unwrap_or("none"));
        });
    }

    /// A request rotor (or hyper's server, for a head it could not read)
    /// answered by itself (`kind`: the error) without having it whole (a
    /// head unreadable or too slow, a body too slow, a client gone
    /// mid-body): counted, but not timed (it had no time of its own, or
    /// the client's slowness, which would pull the percentiles about).
    pub fn untimed(&self, kind: Option<&str>) {
        self.with(|a| {
            a.requests += 1;
            a.error(kind.unwrap_or("none"));
        });
    }

    /// A connect from `ip` to `host` was made, after `took`.
    pub fn connected(&self, ip: IpAddr, host: &str, took: Duration) {
        self.with(|a| {
            a.connect_seconds.observe(took.as_secs_f64());
            a.witness.connected(ip, host);
        });
    }

    /// A connect from `ip` to `host` (of the request's `authority`, at
    /// addresses `addrs`), begun at `started`, failed.
    pub fn connect_failed(
        &self,
        ip: IpAddr,
        (host, authority): (&str, &str),
        addrs: &[std::net::SocketAddr],
        started: Instant,
    ) {
        let dest = crate::witness::dest_key(crate::witness::dest_base(authority), ip.is_ipv4());
        // The address it went to first, of its source's family (see
        // `witness::net_key`).
        let to = addrs
            .iter()
            .find(|d| d.is_ipv4() == ip.is_ipv4())
            .map(std::net::SocketAddr::ip);
        self.with(|a| {
            a.source(ip).connect_errors += 1;
            a.witness
                .failed(ip, (dest, host, to), started, Instant::now());
        });
    }

    pub fn leased(&self, waited: Duration) {
        self.with(|a| a.lease_wait_seconds.observe(waited.as_secs_f64()));
    }

    /// Bytes sent to and received from destinations from `ip`.
    pub fn bytes(&self, ip: IpAddr, to: u64, from: u64) {
        if to == 0 && from == 0 {
            return;
        }
        self.with(|a| {
            let s = a.source(ip);
            s.bytes_to += to;
            s.bytes_from += from;
        });
    }

    /// The bytes counted to and from `ip` so far (tests).
    #[cfg(test)]
    pub(crate) fn bytes_of(&self, ip: IpAddr) -> (u64, u64) {
        let acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        acc.sources
            .get(&ip)
            .map_or((0, 0), |s| (s.bytes_to, s.bytes_from))
    }

    /// Everything counted since the last take, and the failed connects
    /// confirmed as their source's fault (`witness`) of sources that got
    /// no answer meanwhile.
    fn take(&self, connections_open: u64) -> (Report, Vec<SourceUnreached>) {
        let (acc, confirmed) = {
            let mut acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
            let confirmed = acc.witness.take(Instant::now());
            let witness = std::mem::take(&mut acc.witness);
            let taken = std::mem::replace(
                &mut *acc,
                Acc {
                    witness,
                    ..Acc::default()
                },
            );
            (taken, confirmed)
        };
        let unreached = match confirmed.is_empty() {
            true => Vec::new(),
            false => Self::unreached(&acc, confirmed),
        };
        let m = WorkerMetrics {
            boot: self.boot,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            connections_open,
            tunnels_open: self.tunnels_open.load(Ordering::Relaxed),
            listen: self
                .listen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            requests: acc.requests,
            by_source: acc.sources.into_values().collect(),
            errors: acc.errors.into_iter().collect(),
            request_seconds: acc.request_seconds,
            connect_seconds: acc.connect_seconds,
            lease_wait_seconds: acc.lease_wait_seconds,
        };
        let lost = crate::access::LOST_LINES.swap(0, Ordering::Relaxed);
        let counters = match lost {
            0 => Vec::new(),
            n => vec![(rotor_protocol::COUNTER_ACCESS_LOG_LOST.to_string(), n)],
        };
        (
            Report {
                metrics: m,
                counters,
            },
            unreached,
        )
    }

    /// Each (source, site) of a failed connect confirmed since the last
    /// take (see `witness`).
    fn take_refused(&self) -> Vec<(IpAddr, Arc<str>)> {
        let mut acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        acc.witness.take_refused()
    }

    /// Of the failed connects `confirmed` (see `witness`), those of sources
    /// that got no answer in `acc`'s time, as the allocator is told them.
    fn unreached(
        acc: &Acc,
        confirmed: HashMap<IpAddr, crate::witness::Confirmed>,
    ) -> Vec<SourceUnreached> {
        // Sources that got an answer meanwhile (an IPv6 one by its /64:
        // an entry of many addresses answers from some while others fail)
        // are not at fault; past the sources counted apart, it is not known.
        let answered: std::collections::HashSet<IpAddr> = acc
            .sources
            .values()
            .filter(|s| s.tunnels > 0 || s.responses.iter().any(|n| *n > 0))
            .map(|s| crate::witness::source_net(s.ip))
            .collect();
        let full = acc.sources.len() >= MAX_SOURCES;
        let unreached = confirmed
            .into_iter()
            .filter(|(ip, _)| {
                !answered.contains(&crate::witness::source_net(*ip))
                    && (acc.sources.contains_key(ip) || !full)
            })
            .take(rotor_protocol::UNREACHED_LISTED)
            .map(|(ip, c)| SourceUnreached {
                ip,
                failed: c.failed,
                destinations: c.destinations,
            })
            .collect::<Vec<_>>();
        if !unreached.is_empty() {
            tracing::debug!(
                ?unreached,
                "connects that failed where other addresses' were answered"
            );
        }
        unreached
    }

    /// What was counted since the last report, if anything: the requests a
    /// drain cut dropped with the runtime, after the last report went.
    pub fn take_left(&self) -> Option<Report> {
        let counted = {
            let acc = self.acc.lock().unwrap_or_else(|e| e.into_inner());
            acc.requests > 0
                || !acc.errors.is_empty()
                || !acc.sources.is_empty()
                // (The access log's last write, as the runtime went.)
                || crate::access::LOST_LINES.load(Ordering::Relaxed) > 0
        };
        counted.then(|| {
            let mut r = self.take(0).0;
            r.metrics.tunnels_open = 0;
            r
        })
    }

    /// Sends what was counted every second until `stop` (and once more
    /// then, waited for [`LAST_REPORT_WAIT`] at most). `connections_open` reads the client connections open now.
    /// `cool_refused`: each site a source's connects were confirmed to fail
    /// to is told too (the allocator cools the pair on a repeat).
    pub async fn report(
        self: Arc<Self>,
        leases: Arc<LeaseClient>,
        connections_open: impl Fn() -> u64,
        cool_refused: bool,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A report not acknowledged is sent again as it is (same number:
        // the allocator counts it once); what is counted meanwhile waits.
        let mut unsent: Option<Report> = None;
        loop {
            let last = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            // Each second, whatever became of the last report: the
            // allocator takes reports of one event, seconds apart, as one.
            let refused = self.take_refused();
            if cool_refused {
                for (ip, site) in refused {
                    leases.site_unreached(ip, site.to_string());
                }
            }
            // At the stop with no allocator to tell (one stopped or
            // restarting; a socket systemd holds queues the connect
            // rather than refuse it): not waited for, so a worker with
            // nothing in flight exits at once. Its last counts are lost,
            // as a killed worker's are.
            if last && !leases.is_connected() {
                tracing::debug!("no allocator at the stop: the last counts are not reported");
                return;
            }
            let (m, unreached, resent) = match unsent.take() {
                Some(mut m) => {
                    m.metrics.connections_open = connections_open();
                    (m, Vec::new(), true)
                }
                None => {
                    let (m, unreached) = self.take(connections_open());
                    (m, unreached, false)
                }
            };
            // (The last waits a moment at most: an allocator that is
            // there but does not answer, stopped, holds no worker's exit.)
            let sent = match last {
                true => tokio::time::timeout(LAST_REPORT_WAIT, leases.report_metrics(m))
                    .await
                    .ok(),
                // A report waiting for an allocator that went (or stalled)
                // is left at the stop, kept for the last pass: waited for,
                // it held the worker's exit a second or two.
                false => {
                    let kept = Box::new(m.clone());
                    tokio::select! {
                        sent = leases.report_metrics(m) => Some(sent),
                        _ = stop.cancelled() => Some(Err(kept)),
                    }
                }
            };
            let Some(sent) = sent else {
                tracing::debug!("the allocator did not take the last report in time");
                return;
            };
            match sent {
                // Said once, after the report whose answers they go with
                // (the allocator does not hear failures of an entry that
                // report answered from): one lost delays a quarantine, no
                // more; so does one dropped with a report that did not go.
                Ok(()) => leases.unreached(unreached),
                Err(m) => unsent = Some(*m),
            }
            if last {
                // The last pass: a report sent again carried nothing
                // counted since it was made (the drain's requests, an
                // outage's) — those go in one more, of their own number.
                if resent && unsent.is_none() {
                    let m = self.take(connections_open()).0;
                    let _ = tokio::time::timeout(LAST_REPORT_WAIT, leases.report_metrics(m)).await;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Past `MAX_SOURCES` sources since the last report, the rest are
    /// counted together under 0.0.0.0 (the allocator's `other`): the report
    /// keeps within what the allocator reads, and nothing is lost.
    #[test]
    fn a_report_counts_sources_past_the_cut_together() {
        let m = Meter::default();
        let n = MAX_SOURCES + 500;
        let ip = |k: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k as u32));
        for k in 0..n {
            m.response(ip(k), || "a.test:80", 200, Duration::from_millis(1));
            m.bytes(ip(k), 10, 100);
        }
        // A source already counted apart stays apart past the cut.
        m.response(ip(0), || "a.test:80", 503, Duration::from_millis(1));
        let r = m.take(0).0.metrics;
        assert_eq!(r.requests, n as u64 + 1);
        assert_eq!(r.by_source.len(), rotor_protocol::MAX_REPORTED_SOURCES);
        let other = r
            .by_source
            .iter()
            .find(|s| s.ip == IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            .expect("the rest together");
        assert_eq!(other.responses[1], 500);
        assert_eq!((other.bytes_to, other.bytes_from), (5_000, 50_000));
        let first = r.by_source.iter().find(|s| s.ip == ip(0)).unwrap();
        assert_eq!((first.responses[1], first.responses[4]), (1, 1));
        let all: u64 = r
            .by_source
            .iter()
            .map(|s| s.responses.iter().sum::<u64>())
            .sum();
        assert_eq!(all, n as u64 + 1);
        // The next report starts over: sources apart again.
        m.response(ip(n + 1), || "a.test:80", 200, Duration::from_millis(1));
        let r = m.take(0).0.metrics;
        assert_eq!(r.by_source.len(), 1);
        assert_eq!(r.by_source[0].ip, ip(n + 1));
    }
}
