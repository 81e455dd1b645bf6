//! Idle upstream HTTP/1.1 connections kept for reuse, keyed by (source
//! address, destination): a connection is only ever reused for a request
//! leased the same source address, so reuse never changes the address a
//! destination sees. (hyper-util's pooled client keys by destination only,
//! which would send requests out of whichever address connected first.)

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use foldhash::HashMap;
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use crate::h1::{Conn, ResponseBody};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: IpAddr,
    /// Lower-cased host of the request target.
    pub host: String,
    pub port: u16,
}

struct Idle {
    conn: Conn,
    /// When it went idle (`os::coarse_ms`).
    since_ms: u64,
    /// `routes::departures()` then: after an address or local route of
    /// the host went away, its source may be one the host no longer
    /// holds (a failover address moved away), whose answers go elsewhere:
    /// not reused.
    routes: u64,
}

impl Idle {
    /// Not idle for `timeout` yet, no address gone since, and still open.
    fn fresh(&self, now_ms: u64, timeout: Duration) -> bool {
        self.young(now_ms, timeout) && self.conn.is_usable()
    }

    /// Not idle for `timeout` yet, and no address gone since.
    fn young(&self, now_ms: u64, timeout: Duration) -> bool {
        u128::from(now_ms.saturating_sub(self.since_ms)) < timeout.as_millis()
            && self.routes == rotor_protocol::routes::departures()
    }
}

/// Idle connections a worker keeps in all. A pool of prefixes (an IPv6
/// /64) gives each request an address never leased again, so what it
/// checks in is never checked out: without a cap, every connection of the
/// last `idle_timeout` would sit open (40 000 at 10 000 requests/s).
pub const MAX_IDLE_TOTAL: usize = 4096;

/// A key's idle connections. A key is `proven` once one of its
/// connections has been checked out again: a pool of prefixes (an IPv6
/// /64) checks in connections whose key no request asks for again, and
/// those may hold only part of the pool ([`unproven_max`]), so that they
/// cannot crowd out the keys that are reused.
#[derive(Default)]
struct List {
    idle: Vec<Idle>,
    proven: bool,
    /// When one was last checked out (`os::coarse_ms`): a proven list
    /// left empty is kept while this is within the idle timeout.
    used_ms: u64,
}

#[derive(Default)]
struct Idles {
    map: HashMap<Key, List>,
    /// Connections in `map`.
    total: usize,
    /// … of keys not proven.
    unproven: usize,
    /// When a full pool was last swept of expired connections.
    swept_ms: u64,
}

/// Connections of keys not yet reused the pool keeps at most: three
/// quarters of it, the rest for keys that are.
fn unproven_max(total: usize) -> usize {
    total - total / 4
}

pub struct UpstreamPool {
    idle: Mutex<Idles>,
    /// How long an idle connection is kept; `ZERO` disables reuse.
    idle_timeout: Duration,
    max_idle_per_key: usize,
    max_idle_total: usize,
}

impl UpstreamPool {
    pub fn new(idle_timeout: Duration, max_idle_per_key: usize) -> Arc<UpstreamPool> {
        UpstreamPool::capped(idle_timeout, max_idle_per_key, MAX_IDLE_TOTAL)
    }

    /// … keeping `max_idle_total` in all at most.
    pub fn capped(
        idle_timeout: Duration,
        max_idle_per_key: usize,
        max_idle_total: usize,
    ) -> Arc<UpstreamPool> {
        Arc::new(UpstreamPool {
            idle: Mutex::new(Idles::default()),
            idle_timeout,
            max_idle_per_key,
            max_idle_total,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether connections are kept at all (`--upstream-idle-timeout 0`
    /// or `--upstream-max-idle 0` keeps none: no list is made for them).
    pub fn enabled(&self) -> bool {
        !self.idle_timeout.is_zero() && self.max_idle_per_key > 0
    }

    /// An idle connection for `key`, ready for a request (the most
    /// recently used first: the likeliest to be still open). A list left
    /// empty stays, with its room, until the reaper's next round: the
    /// connection checked out now is usually checked in again a moment
    /// later, and then finds it (no second lookup, no new list).
    pub fn checkout(&self, key: &Key) -> Option<Conn> {
        let mut idles = self.lock();
        let Idles {
            map,
            total,
            unproven,
            ..
        } = &mut *idles;
        let list = map.get_mut(key)?;
        let now = crate::os::coarse_ms();
        while let Some(idle) = list.idle.pop() {
            *total -= 1;
            if !list.proven {
                *unproven -= 1;
            }
            if idle.fresh(now, self.idle_timeout) {
                if !list.proven {
                    list.proven = true;
                    *unproven -= list.idle.len();
                }
                list.used_ms = now;
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request with the same key (closed
    /// instead when its list, or the pool, or the part of it for keys not
    /// proven is full: a full pool is swept of expired connections first,
    /// at most every 100 ms).
    pub fn checkin(&self, key: Key, conn: Conn) {
        if !self.enabled() {
            return;
        }
        let mut idles = self.lock();
        let now = crate::os::coarse_ms();
        let most_unproven = unproven_max(self.max_idle_total);
        let full = |i: &Idles| i.total >= self.max_idle_total || i.unproven >= most_unproven;
        if full(&idles) && now.saturating_sub(idles.swept_ms) >= 100 {
            idles.swept_ms = now;
            // By age alone: under the lock, no system call per connection.
            self.sweep(&mut idles, now, false);
        }
        if idles.total >= self.max_idle_total {
            return;
        }
        let Idles {
            map,
            total,
            unproven,
            ..
        } = &mut *idles;
        let list = match map.get_mut(&key) {
            Some(list) => list,
            // (No list made for a connection refused.)
            None if *unproven >= most_unproven => return,
            None => map.entry(key).or_default(),
        };
        if !list.proven && *unproven >= most_unproven {
            return;
        }
        if list.idle.len() < self.max_idle_per_key {
            list.idle.push(Idle {
                conn,
                since_ms: now,
                routes: rotor_protocol::routes::departures(),
            });
            *total += 1;
            if !list.proven {
                *unproven += 1;
            }
        }
    }

    /// Drops expired connections (and, `closed`, those the destination
    /// closed: a system call each), and lists left empty.
    /// (A proven list left empty stays while it was used within the idle
    /// timeout: its connection is usually out serving a request.)
    fn sweep(&self, idles: &mut Idles, now_ms: u64, closed: bool) {
        let timeout = self.idle_timeout;
        idles.map.retain(|_, list| {
            list.idle.retain(|i| match closed {
                true => i.fresh(now_ms, timeout),
                false => i.young(now_ms, timeout),
            });
            let used = u128::from(now_ms.saturating_sub(list.used_ms)) < timeout.as_millis();
            !list.idle.is_empty() || (list.proven && used)
        });
        idles.total = idles.map.values().map(|l| l.idle.len()).sum();
        idles.unproven = idles
            .map
            .values()
            .filter(|l| !l.proven)
            .map(|l| l.idle.len())
            .sum();
    }

    /// Closes the older half of the idle connections (a worker out of
    /// descriptors needs one for a connect: nginx frees idle keep-alive
    /// connections so too). How many it closed.
    pub fn shed(&self) -> usize {
        let gone: Vec<(Key, Idle)> = {
            let mut idles = self.lock();
            let mut all: Vec<(Key, Idle)> = (idles.map.iter_mut())
                .flat_map(|(k, l)| l.idle.drain(..).map(move |i| (k.clone(), i)))
                .collect();
            // The newer half stays: the likeliest to be asked for again.
            all.sort_by_key(|(_, i)| i.since_ms);
            let kept = all.split_off(all.len().div_ceil(2));
            for (k, i) in kept {
                if let Some(list) = idles.map.get_mut(&k) {
                    list.idle.push(i);
                }
            }
            self.sweep(&mut idles, crate::os::coarse_ms(), false);
            all
        };
        // (Closed here, outside the lock.)
        gone.len()
    }

    /// Idle connections now (for status and tests).
    pub fn idle_count(&self) -> usize {
        self.lock().total
    }

    /// Keys with a list, empty or not.
    #[cfg(test)]
    fn lists(&self) -> usize {
        self.lock().map.len()
    }

    /// Drops expired connections each quarter of `idle_timeout`, and those
    /// the destination closed each `idle_timeout` (a system call each),
    /// so idle sockets do not pile up. (Swept once an `idle_timeout`, an
    /// expired connection stayed open up to twice it: a destination saw
    /// rotor's 4 s idle connections for up to 8 s.)
    pub async fn reap(self: Arc<Self>, shutdown: CancellationToken) {
        if !self.enabled() {
            return;
        }
        let mut tick =
            tokio::time::interval((self.idle_timeout / REAPS).max(Duration::from_millis(100)));
        // Rounds since the last look at closed connections.
        let mut round = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    *self.lock() = Idles::default();
                    return;
                }
                _ = tick.tick() => {}
            }
            round = (round + 1) % REAPS;
            self.sweep(&mut self.lock(), crate::os::coarse_ms(), round == 0);
        }
    }
}

/// Sweeps for expired connections an `idle_timeout` (see `reap`).
const REAPS: u32 = 4;

/// A response body that hands its connection back to the pool once it has
/// been read to the end. Dropped early (the client went away), the
/// connection is closed instead: it may still carry unread bytes.
pub struct PooledBody {
    inner: ResponseBody,
    home: Option<(Arc<UpstreamPool>, Key)>,
    /// Where the bytes are counted (from the key's source address): those
    /// of the request's body, and those of this body as it streams.
    meter: Arc<crate::meter::Meter>,
    source: std::net::IpAddr,
    received: u64,
    /// The request's access log line, written when this body is done.
    access: Option<(Arc<crate::access::AccessLog>, Box<crate::access::Entry>)>,
    /// What broke it, as a `Proxy-Status` error type (a body that ended
    /// whole says so: `is_end_stream`).
    broken: Option<&'static str>,
    /// Since when (`coarse_ms`) its polls have waited for the destination,
    /// if they do now; and how long a wait the client connection's idle
    /// timeout cuts. Dropped after such a wait, it was cut by that timeout
    /// while the destination sent nothing: not its client's going (which
    /// the fast path's watch sees after 500 ms of a stall).
    stalled_since: Option<u64>,
    idle_cut_ms: u64,
}

/// What the idle cut of a stalled body may come short of its timeout by
/// (the coarse clock's steps, the timer's).
const IDLE_CUT_SLACK_MS: u64 = 100;

impl Drop for PooledBody {
    fn drop(&mut self) {
        // All of the request body that went, with what went after an early
        // answer.
        let sent = self.inner.sent();
        self.meter.bytes(self.source, sent, self.received);
        if let Some((log, mut e)) = self.access.take() {
            e.sent = sent;
            e.received = self.received;
            // A response cut short says so (it read as a whole 200): what
            // broke it at the destination, else what cut it (`cut_by`).
            let whole = self.inner.is_end_stream();
            let cut = self.broken.or_else(|| (!whole).then(|| self.cut_by()));
            e.error = e.error.or(cut);
            log.log(&e);
        }
    }
}

impl PooledBody {
    /// What cut this body short, not the destination's error: the
    /// worker's stop, the idle timeout while the destination sent nothing
    /// (it fires that long after the last byte the client took, a moment
    /// after the body's last frame), or else its client.
    fn cut_by(&self) -> &'static str {
        let stalled = self.stalled_since.is_some_and(|t| {
            crate::os::coarse_ms().saturating_sub(t) + IDLE_CUT_SLACK_MS >= self.idle_cut_ms
        });
        match (crate::proxy::worker_cut(), stalled) {
            (true, _) => crate::proxy::WORKER_STOPPED,
            (false, true) => "http_response_timeout",
            (false, false) => "client_closed",
        }
    }

    /// `inner`, whose connection goes back to `pool` under `key` once it
    /// is done (`None`: closed, as one no request would ask for);
    /// `idle_cut`, the client connection's idle timeout (see `stalled_since`).
    pub fn new(
        inner: ResponseBody,
        pool: Option<Arc<UpstreamPool>>,
        key: Key,
        meter: &Arc<crate::meter::Meter>,
        idle_cut: std::time::Duration,
    ) -> PooledBody {
        let source = key.source;
        let mut body = PooledBody {
            inner,
            home: pool.map(|pool| (pool, key)),
            meter: meter.clone(),
            source,
            received: 0,
            access: None,
            broken: None,
            stalled_since: None,
            idle_cut_ms: u64::try_from(idle_cut.as_millis()).unwrap_or(u64::MAX),
        };
        // An empty body (HEAD, 204, 304, Content-Length: 0) may never be
        // polled.
        if body.inner.is_end_stream() {
            body.go_home();
        }
        body
    }

    /// Writes `e` to `log` once the body is done (sent, or dropped).
    pub fn log_when_done(
        &mut self,
        log: Arc<crate::access::AccessLog>,
        e: Box<crate::access::Entry>,
    ) {
        self.access = Some((log, e));
    }

    fn go_home(&mut self) {
        if let Some((pool, key)) = self.home.take() {
            if let Some(conn) = self.inner.take_conn() {
                pool.checkin(key, conn);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = crate::h1::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::h1::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match r.is_pending() {
            true => {
                if self.stalled_since.is_none() {
                    self.stalled_since = Some(crate::os::coarse_ms());
                }
            }
            false => self.stalled_since = None,
        }
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.received += d.len() as u64;
            }
        }
        match &r {
            Poll::Ready(None) => self.go_home(),
            // A length-delimited body is complete with its last byte; the
            // server need not poll again to see the end.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.go_home(),
            Poll::Ready(Some(Err(e))) => {
                self.broken = Some(e.proxy_status());
                self.home = None
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real connection on loopback; the peer closes its end when told.
    async fn conn() -> (Conn, tokio::sync::oneshot::Sender<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = closed.await;
            drop(s);
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        (Conn::new(s), close)
    }

    fn key(source: &str) -> Key {
        Key {
            source: source.parse().unwrap(),
            host: "h".into(),
            port: 80,
        }
    }

    /// An expired connection is closed within a quarter of the idle
    /// timeout after it expired, not up to a whole one (it stayed open up
    /// to twice the timeout).
    #[tokio::test]
    async fn an_expired_connection_is_closed_soon_after() {
        let pool = UpstreamPool::new(Duration::from_secs(1), 4);
        let stop = CancellationToken::new();
        tokio::spawn(pool.clone().reap(stop.clone()));
        // Past the reaper's first round, which comes at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        tokio::time::sleep(Duration::from_millis(850)).await;
        assert_eq!(pool.idle_count(), 1, "closed before it expired");
        // Expired at 1.05 s; swept at 1.25 s (at 2 s before).
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(pool.idle_count(), 0, "still open 0.65 s after it expired");
        stop.cancel();
    }

    #[tokio::test]
    async fn reuse_is_per_source_and_expires() {
        let pool = UpstreamPool::new(Duration::from_millis(200), 4);
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        assert!(
            pool.checkout(&key("127.0.0.3")).is_none(),
            "another source must not get it"
        );
        let c = pool
            .checkout(&key("127.0.0.2"))
            .expect("same source reuses");
        assert!(pool.checkout(&key("127.0.0.2")).is_none(), "taken");
        assert_eq!(pool.lists(), 1, "the emptied list waits for the checkin");
        pool.checkin(key("127.0.0.2"), c);
        assert_eq!((pool.lists(), pool.idle_count()), (1, 1));
        let stop = CancellationToken::new();
        tokio::spawn(pool.clone().reap(stop.clone()));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            (pool.idle_count(), pool.lists()),
            (0, 0),
            "the reaper dropped the expired connection and its list"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_not_checked_out() {
        let pool = UpstreamPool::new(Duration::from_millis(600), 4);
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = pool
            .checkout(&key("127.0.0.2"))
            .expect("within the timeout");
        pool.checkin(key("127.0.0.2"), c);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(pool.checkout(&key("127.0.0.2")).is_none(), "expired");
    }

    #[tokio::test]
    async fn a_connection_the_destination_closed_is_not_reused() {
        let pool = UpstreamPool::new(Duration::from_secs(10), 4);
        let (c, peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        peer.send(()).unwrap();
        // The close reaches the socket (and the reactor) shortly.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pool.checkout(&key("127.0.0.2")).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    /// Out of descriptors, the older half of the idle connections is
    /// closed (the newer kept, for the keys they serve).
    #[tokio::test]
    async fn shedding_closes_the_older_half() {
        let pool = UpstreamPool::new(Duration::from_secs(10), 4);
        assert_eq!(pool.shed(), 0);
        let mut peers = Vec::new();
        for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            let (c, peer) = conn().await;
            peers.push(peer);
            pool.checkin(key(source), c);
            // (The pool's clock is coarse: a few ms a tick.)
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(pool.shed(), 2);
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.checkout(&key("127.0.0.2")).is_none());
        assert!(
            pool.checkout(&key("127.0.0.4")).is_some(),
            "the newest stays"
        );
    }

    /// A pool of prefixes checks in connections no request will ask for:
    /// the whole pool is capped, and a full one makes room from expired
    /// connections before it refuses one.
    #[tokio::test]
    async fn the_pool_is_capped_as_a_whole() {
        let pool = UpstreamPool::capped(Duration::from_millis(300), 4, 2);
        let mut peers = Vec::new();
        for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
            let (c, peer) = conn().await;
            peers.push(peer);
            pool.checkin(key(source), c);
        }
        assert_eq!(pool.idle_count(), 2);
        assert!(
            pool.checkout(&key("127.0.0.4")).is_none(),
            "the third was closed"
        );
        let c = pool.checkout(&key("127.0.0.2")).unwrap();
        assert_eq!(pool.idle_count(), 1);
        pool.checkin(key("127.0.0.2"), c);
        // Once they expire, a full pool sweeps them and takes a new one.
        tokio::time::sleep(Duration::from_millis(450)).await;
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.5"), c);
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.checkout(&key("127.0.0.5")).is_some());
    }

    /// Connections of keys never reused (a prefix pool's) hold three
    /// quarters of the pool at most: a key that is reused keeps its
    /// connection when they would fill it.
    #[tokio::test]
    async fn keys_never_reused_cannot_crowd_out_those_that_are() {
        let pool = UpstreamPool::capped(Duration::from_secs(10), 4, 4);
        let mut peers = Vec::new();
        let (c, peer) = conn().await;
        peers.push(peer);
        pool.checkin(key("127.0.0.2"), c);
        // Reused: proven.
        let c = pool.checkout(&key("127.0.0.2")).unwrap();
        pool.checkin(key("127.0.0.2"), c);
        for n in 10..20 {
            let (c, peer) = conn().await;
            peers.push(peer);
            pool.checkin(key(&format!("2001:db8::{n}")), c);
        }
        assert_eq!(pool.idle_count(), 4, "one proven, three not");
        // Out for a request: a never-reused key takes no place meanwhile,
        // and it comes back.
        let c = pool.checkout(&key("127.0.0.2")).unwrap();
        let (other, peer) = conn().await;
        peers.push(peer);
        pool.checkin(key("2001:db8::99"), other);
        assert_eq!(pool.idle_count(), 3);
        pool.checkin(key("127.0.0.2"), c);
        assert!(pool.checkout(&key("127.0.0.2")).is_some(), "crowded out");
        // Lists of refused connections are not kept.
        assert_eq!(pool.lists(), 4);
    }

    #[tokio::test]
    async fn zero_idle_timeout_keeps_nothing() {
        let pool = UpstreamPool::new(Duration::ZERO, 4);
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        assert_eq!(pool.idle_count(), 0);
        // Nor --upstream-max-idle 0, which made an empty list a checkin.
        let pool = UpstreamPool::new(Duration::from_secs(4), 0);
        let (c, _peer) = conn().await;
        pool.checkin(key("127.0.0.2"), c);
        assert_eq!((pool.idle_count(), pool.lists()), (0, 0));
    }
}
