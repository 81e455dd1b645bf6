//! The allocator's shared state: the pool, the lease sequence, each source's
//! last good read, and the connected peers. Every lease takes the one lock
//! briefly, never across an await, so leases are atomic and globally ordered.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rotor_protocol::{
    error_chain, AddrStatus, Families, Hello, PeerStatus, Response, SourceStatus, StatusReport,
};

use crate::persist::{Saved, StateFile};
use crate::pool::Pool;
use crate::source::{Source, SourceError};

pub struct Allocator {
    inner: Mutex<Inner>,
    started: Instant,
}

struct Inner {
    pool: Pool,
    seq: u64,
    sources: Vec<SourceState>,
    last_refresh: Option<SystemTime>,
    peers: BTreeMap<u64, Peer>,
    /// Where to resume the rotation once the first refresh loaded the pool.
    resume_at: Option<IpAddr>,
    state: Option<StateFile>,
    /// Leases or a refresh not yet written to the state file.
    dirty: bool,
    /// Whether a failed state write has already been logged.
    state_failed: bool,
}

struct SourceState {
    source: Source,
    /// The last successful read; kept when a later read fails.
    last_good: Vec<IpAddr>,
    error: Option<String>,
}

struct Peer {
    hello: Hello,
    since: Instant,
    leases: u64,
}

/// What one refresh changed, for the log and the `Reload` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    pub changed: bool,
    pub generation: u64,
    pub size: usize,
    pub failed_sources: usize,
}

impl Allocator {
    pub fn new(sources: Vec<Source>) -> Allocator {
        Allocator::resuming(sources, None, Saved::default())
    }

    /// An allocator that continues the rotation `saved` in `state`.
    pub fn resuming(sources: Vec<Source>, state: Option<StateFile>, saved: Saved) -> Allocator {
        Allocator {
            inner: Mutex::new(Inner {
                pool: Pool::continuing(saved.generation),
                seq: saved.seq,
                resume_at: saved.next_due,
                state,
                dirty: false,
                state_failed: false,
                sources: sources
                    .into_iter()
                    .map(|source| SourceState {
                        source,
                        last_good: Vec::new(),
                        error: None,
                    })
                    .collect(),
                last_refresh: None,
                peers: BTreeMap::new(),
            }),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the pool half-updated
        // (every update is a single assignment), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sources(&self) -> Vec<Source> {
        self.lock()
            .sources
            .iter()
            .map(|s| s.source.clone())
            .collect()
    }

    /// Applies one read of every source (in the order of `sources()`): a
    /// failed read keeps that source's last good addresses.
    pub fn apply_refresh(&self, reads: Vec<Result<Vec<IpAddr>, SourceError>>) -> RefreshOutcome {
        let mut inner = self.lock();
        let mut failed = 0;
        for (state, read) in inner.sources.iter_mut().zip(reads) {
            match read {
                Ok(addrs) => {
                    state.last_good = addrs;
                    state.error = None;
                }
                Err(e) => {
                    failed += 1;
                    let msg = error_chain(&e);
                    tracing::warn!(
                        source = %state.source.name(),
                        error = %msg,
                        kept = state.last_good.len(),
                        "pool source failed to read; keeping its last good addresses"
                    );
                    state.error = Some(msg);
                }
            }
        }
        let addrs: Vec<IpAddr> = inner
            .sources
            .iter()
            .flat_map(|s| s.last_good.iter().copied())
            .collect();
        let changed = inner.pool.replace(addrs);
        if let Some(ip) = inner.resume_at.take() {
            if inner.pool.resume_at(ip) {
                tracing::info!(next = %ip, seq = inner.seq, "resuming the saved rotation");
            } else {
                tracing::info!(saved = %ip, "the saved next address is no longer in the pool; starting at the first");
            }
        }
        inner.dirty |= changed;
        inner.last_refresh = Some(SystemTime::now());
        RefreshOutcome {
            changed,
            generation: inner.pool.generation(),
            size: inner.pool.len(),
            failed_sources: failed,
        }
    }

    /// One lease for `peer`.
    pub fn lease(&self, peer: u64, families: Families) -> Response {
        let mut inner = self.lock();
        match inner.pool.lease(families) {
            Ok(l) => {
                inner.seq += 1;
                inner.dirty = true;
                let seq = inner.seq;
                if let Some(p) = inner.peers.get_mut(&peer) {
                    p.leases += 1;
                }
                Response::Leased {
                    ip: l.ip,
                    seq,
                    generation: l.generation,
                }
            }
            Err(reason) => Response::NoAddress {
                reason,
                generation: inner.pool.generation(),
            },
        }
    }

    /// Writes the rotation to the state file if it changed since the last
    /// write. Called before lease replies are flushed, so no address is
    /// handed out that a restart would hand out again.
    pub fn persist(&self) {
        let mut inner = self.lock();
        if !inner.dirty {
            return;
        }
        inner.dirty = false;
        let saved = Saved {
            generation: inner.pool.generation(),
            seq: inner.seq,
            next_due: inner.pool.next_due(),
        };
        let Some(state) = &inner.state else { return };
        match state.write(&saved) {
            Ok(()) => inner.state_failed = false,
            Err(e) => {
                if !inner.state_failed {
                    tracing::warn!(file = %state.path().display(), error = %e, "cannot write the rotation state");
                }
                inner.state_failed = true;
            }
        }
    }

    pub fn peer_connected(&self, id: u64, hello: Hello) {
        self.lock().peers.insert(
            id,
            Peer {
                hello,
                since: Instant::now(),
                leases: 0,
            },
        );
    }

    pub fn peer_gone(&self, id: u64) {
        self.lock().peers.remove(&id);
    }

    pub fn pool_size(&self) -> usize {
        self.lock().pool.len()
    }

    pub fn status(&self) -> StatusReport {
        let inner = self.lock();
        StatusReport {
            generation: inner.pool.generation(),
            cursor: inner.pool.cursor() as u32,
            pool: inner
                .pool
                .lease_counts()
                .map(|(ip, leases)| AddrStatus { ip, leases })
                .collect(),
            leases_total: inner.seq,
            last_refresh_unix: inner
                .last_refresh
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            sources: inner
                .sources
                .iter()
                .map(|s| SourceStatus {
                    name: s.source.name(),
                    addresses: s.last_good.len() as u32,
                    error: s.error.clone(),
                })
                .collect(),
            peers: inner
                .peers
                .values()
                .map(|p| PeerStatus {
                    role: p.hello.role,
                    pid: p.hello.pid,
                    software: p.hello.software.clone(),
                    connected_secs: p.since.elapsed().as_secs(),
                    leases: p.leases,
                })
                .collect(),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_source_keeps_last_good_and_empty_read_empties() {
        let a = Allocator::new(vec![
            Source::File("/nonexistent".into()),
            Source::list("10.0.0.9").unwrap(),
        ]);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let out = a.apply_refresh(vec![Ok(vec![ip("10.0.0.1")]), Ok(vec![ip("10.0.0.9")])]);
        assert_eq!((out.changed, out.size), (true, 2));
        let err = SourceError::NoInterface("x".into());
        let out = a.apply_refresh(vec![Err(err), Ok(vec![ip("10.0.0.9")])]);
        assert_eq!((out.changed, out.size, out.failed_sources), (false, 2, 1));
        assert!(a.status().sources[0].error.is_some());
        let out = a.apply_refresh(vec![Ok(vec![]), Ok(vec![ip("10.0.0.9")])]);
        assert_eq!((out.changed, out.size), (true, 1));
        assert!(a.status().sources[0].error.is_none());
    }

    #[test]
    fn leases_count_per_peer_and_sequence() {
        let a = Allocator::new(vec![Source::list("10.0.0.1-10.0.0.2").unwrap()]);
        a.apply_refresh(vec![Ok("10.0.0.1,10.0.0.2"
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect())]);
        a.peer_connected(1, Hello::new(rotor_protocol::Role::Worker, "t"));
        for expect in 1..=3u64 {
            match a.lease(1, Families::ANY) {
                Response::Leased { seq, .. } => assert_eq!(seq, expect),
                other => panic!("{other:?}"),
            }
        }
        let st = a.status();
        assert_eq!(st.peers[0].leases, 3);
        assert_eq!(st.leases_total, 3);
        assert_eq!(st.pool[0].leases, 2);
    }
}
