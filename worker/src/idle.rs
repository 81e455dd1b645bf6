//! Inactivity timeouts: an I/O wrapper that records when bytes last moved,
//! and a watch that fires once nothing has moved for a while. Used for idle
//! keep-alive client connections and idle CONNECT tunnels.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When bytes last moved, in milliseconds since `base`, and how many moved
/// each way (counted by `IdleIo` and the tunnel relay), so a tunnel that
/// ends in an error or for silence still has its bytes counted.
///
/// Each read and write notes the time, so it is read from the coarse
/// clock (the kernel's last tick, no TSC read: a fifth of the fine
/// clock's instructions); it runs up to a tick (1–10 ms) behind, nothing
/// to a timeout of seconds.
#[derive(Clone)]
pub struct Activity {
    base: Instant,
    /// `base` on the coarse clock, in milliseconds.
    base_ms: u64,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    last_ms: AtomicU64,
    /// Since when a write to the client waits (its ms + 1; 0: none waits).
    write_waits: AtomicU64,
    /// From the client (up), to the client (down).
    up: AtomicU64,
    down: AtomicU64,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            base: Instant::now(),
            base_ms: crate::os::coarse_ms(),
            state: Arc::default(),
        }
    }

    pub fn touch(&self) {
        let ms = crate::os::coarse_ms().saturating_sub(self.base_ms);
        // Relaxed: a few milliseconds of staleness do not matter here.
        self.state.last_ms.store(ms, Ordering::Relaxed);
    }

    /// `n` bytes moved, from the client (`up`) or to it; touches too.
    pub fn moved(&self, up: bool, n: u64) {
        self.touch();
        let count = if up { &self.state.up } else { &self.state.down };
        count.fetch_add(n, Ordering::Relaxed);
    }

    /// A write to the client could not go (its send buffer is full).
    fn write_waits(&self) {
        if self.state.write_waits.load(Ordering::Relaxed) == 0 {
            let ms = crate::os::coarse_ms().saturating_sub(self.base_ms);
            self.state.write_waits.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// A write to the client went.
    fn write_went(&self) {
        if self.state.write_waits.load(Ordering::Relaxed) != 0 {
            self.state.write_waits.store(0, Ordering::Relaxed);
        }
    }

    /// Resolves once a write to the client has waited `limit` with none
    /// going meanwhile: a client that reads nothing, whatever it sends,
    /// which the caller drops (said here, for every caller). (Over TLS,
    /// bytes that make no record, trickled in, kept the idle watch awake
    /// while the client read none of its response.)
    pub async fn write_stuck_for(&self, limit: Duration) {
        loop {
            let since = self.state.write_waits.load(Ordering::Relaxed);
            if since == 0 {
                tokio::time::sleep(limit).await;
                continue;
            }
            let due = self.base + Duration::from_millis(since - 1) + limit;
            if Instant::now() >= due {
                tracing::debug!("client took none of its response for the idle timeout; dropped");
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }

    /// Bytes moved so far: from the client, to the client.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.state.up.load(Ordering::Relaxed),
            self.state.down.load(Ordering::Relaxed),
        )
    }

    /// Resolves once nothing has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let last =
                self.base + Duration::from_millis(self.state.last_ms.load(Ordering::Relaxed));
            let due = last + limit;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

pub struct IdleIo<T> {
    inner: T,
    activity: Activity,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, activity: Activity) -> IdleIo<T> {
        IdleIo { inner, activity }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n @ 1..)) => {
                self.activity.moved(false, *n as u64);
                self.activity.write_went();
            }
            Poll::Pending => self.activity.write_waits(),
            _ => {}
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.activity.moved(true, n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Real time: the coarse clock does not follow tokio's paused one.
    #[tokio::test]
    async fn fires_only_after_a_quiet_period() {
        let (a, mut b) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = IdleIo::new(a, activity.clone());
        let limit = Duration::from_millis(400);
        // Bytes every 250 ms for a second: longer than the limit in all.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            b.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 1];
            io.read_exact(&mut buf).await.unwrap();
        }
        let started = Instant::now();
        activity.idle_for(limit).await;
        let waited = started.elapsed();
        // The coarse clock runs up to a tick (at most 10 ms) behind.
        assert!(
            waited >= limit - Duration::from_millis(20)
                && waited <= limit + Duration::from_millis(500),
            "{waited:?}"
        );
    }
}
