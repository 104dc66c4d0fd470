//! A downstream connection's byte stream, metered for the listener's TCP metrics and
//! for idle detection.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::ListenerMetrics;

/// What a connection's tasks share: when bytes last moved and how many requests are open.
pub struct ConnState {
    started: Instant,
    last_activity_ms: AtomicU64,
    pub in_flight: AtomicUsize,
    metrics: Arc<ListenerMetrics>,
}

impl ConnState {
    pub fn new(metrics: Arc<ListenerMetrics>) -> Arc<Self> {
        metrics.opened.fetch_add(1, Relaxed);
        Arc::new(Self {
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            metrics,
        })
    }

    fn touch(&self) {
        self.last_activity_ms.store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Milliseconds since bytes last moved on the connection.
    pub fn idle_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).saturating_sub(self.last_activity_ms.load(Relaxed))
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
