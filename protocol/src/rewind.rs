//! A connection with bytes already read of it put back in front.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection with bytes already read of it in front: what hyper's server
/// is given when the worker's fast path hands a connection over, or the
/// allocator's metrics listener a scrape past its places.
pub struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Bytes, inner: I) -> Rewind<I> {
        Rewind { prefix, inner }
    }

    /// The bytes not read yet, and the connection.
    pub fn into_parts(self) -> (Bytes, I) {
        (self.prefix, self.inner)
    }

    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Read whole: the fast path's buffer goes with it, not
                // when the connection does.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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
    /// Bytes read whole are let go (the buffer they are in is the worker's
    /// fast path's, up to 128 KiB), and the connection is read after them.
    #[tokio::test]
    async fn a_rewind_reads_its_bytes_then_the_connection_and_lets_them_go() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let prefix = bytes::Bytes::from(vec![7u8; 1000]);
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = super::Rewind::new(prefix.clone(), a);
        let mut got = [0u8; 1000];
        r.read_exact(&mut got).await.unwrap();
        assert!(prefix.is_unique(), "the rewind still holds its buffer");
        b.write_all(b"next").await.unwrap();
        let mut next = [0u8; 4];
        r.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
    }
}
