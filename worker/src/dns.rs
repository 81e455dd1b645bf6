//! A cache in front of the system resolver, so a worker does not run a
//! blocking getaddrinfo (on the blocking pool) for every request to the same
//! host. getaddrinfo does not report record TTLs, so answers are kept for a
//! fixed time (`--dns-cache-ttl`); failures are not cached. The system
//! resolver is kept on purpose: it honours /etc/hosts and nsswitch as every
//! other program on the host does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::connect::{ip_literal, resolve};
use crate::error::ProxyError;

/// Most names kept; past it the oldest half is dropped.
const MAX_NAMES: usize = 10_000;

/// (lower-cased name, port) → (addresses, when resolved).
type Entries = HashMap<(String, u16), (Vec<SocketAddr>, Instant)>;

pub struct DnsCache {
    ttl: Duration,
    entries: Mutex<Entries>,
}

impl DnsCache {
    /// `ttl` zero: no caching.
    pub fn new(ttl: Duration) -> DnsCache {
        DnsCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, ProxyError> {
        // IP literals and a disabled cache go straight through.
        if self.ttl.is_zero() || ip_literal(host).is_some() {
            return resolve(host, port, timeout).await;
        }
        let key = (host.to_ascii_lowercase(), port);
        if let Some(addrs) = self.lookup(&key) {
            return Ok(addrs);
        }
        let addrs = resolve(host, port, timeout).await?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_NAMES {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| at.elapsed() < ttl);
            // Still full of live names: start over rather than grow.
            if entries.len() >= MAX_NAMES {
                entries.clear();
            }
        }
        entries.insert(key, (addrs.clone(), Instant::now()));
        Ok(addrs)
    }

    fn lookup(&self, key: &(String, u16)) -> Option<Vec<SocketAddr>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(a, _)| a.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_are_cached_and_literals_are_not() {
        let cache = DnsCache::new(Duration::from_secs(30));
        // `localhost` comes from /etc/hosts: no query leaves the machine.
        let a = cache
            .resolve("localhost", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(a.iter().all(|s| s.ip().is_loopback()), "{a:?}");
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        let b = cache
            .resolve("LOCALHOST", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        cache
            .resolve("127.0.0.1", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
    }
}
