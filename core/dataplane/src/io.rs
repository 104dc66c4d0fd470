//! A downstream connection's byte stream, metered for the listener's TCP metrics and
//! for idle detection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::ListenerMetrics;

/// What a connection's tasks share: how many I/O operations moved bytes (compared
/// between idle checks, cheaper than reading the clock on every read and write) and
/// how many requests are open.
pub struct ConnState {
    io_ops: AtomicU64,
    pub in_flight: AtomicUsize,
    metrics: Arc<ListenerMetrics>,
}

impl ConnState {
    pub fn new(metrics: Arc<ListenerMetrics>) -> Arc<Self> {
        metrics.opened.fetch_add(1, Relaxed);
        Arc::new(Self { io_ops: AtomicU64::new(0), in_flight: AtomicUsize::new(0), metrics })
    }

    fn touch(&self) {
        self.io_ops.fetch_add(1, Relaxed);
    }

    /// A number that changes whenever bytes move on the connection.
    pub fn activity(&self) -> u64 {
        self.io_ops.load(Relaxed)
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        self.metrics.closed.fetch_add(1, Relaxed);
    }
}

pin_project! {
    pub struct MeteredIo<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
    }
}

impl<T> MeteredIo<T> {
    pub fn new(inner: T, state: Arc<ConnState>) -> Self {
        Self { inner, state }
    }
}

impl<T: AsyncRead> AsyncRead for MeteredIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let poll = this.inner.poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.state.metrics.read_bytes.fetch_add(read as u64, Relaxed);
            this.state.touch();
        }
        poll
    }
}

impl<T: AsyncWrite> AsyncWrite for MeteredIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.state.metrics.write_bytes.fetch_add(n as u64, Relaxed);
            this.state.touch();
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let poll = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            this.state.metrics.write_bytes.fetch_add(n as u64, Relaxed);
            this.state.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project! {
    /// A stream with bytes already read from it put back in front: the HTTP/1.1 fast
    /// path hands a connection to hyper with the request it looked at but did not serve.
    pub struct Rewind<T> {
        prefix: bytes::Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> Rewind<T> {
    pub fn new(inner: T, prefix: bytes::Bytes) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead> AsyncRead for Rewind<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.prefix.is_empty() {
            return this.inner.poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite> AsyncWrite for Rewind<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
