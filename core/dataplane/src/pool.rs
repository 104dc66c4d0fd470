//! Connections to one upstream endpoint: a stack of idle HTTP/1.1 connections and
//! one shared HTTP/2 connection, each driven by its own task, and a stack of idle
//! plain TCP connections the HTTP/1.1 fast path writes to directly.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::RequestBody;
use crate::executor::BoxingExecutor;
use crate::identity::{Carrying, MeshConnector};
use crate::metrics::ClusterMetrics;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when released.
const MAX_IDLE: usize = 256;

thread_local! {
    /// The data-plane worker this thread runs, so plain connections are reused by the
    /// runtime whose reactor they are registered with.
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the calling thread as data-plane worker `index`.
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Keeps a connection counted in the cluster's open-connections gauge while it lives.
pub struct OpenConnection(Arc<ClusterMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

/// Why a request did not get a response from the endpoint.
pub enum SendError {
    /// No connection could be made: the request was not sent and is handed back.
    Connect { cause: String, request: Box<Request<RequestBody>> },
    /// The connection failed while the request was in flight.
    Upstream(hyper::Error),
}

/// A connect (and its TLS handshake) in progress, boxed so that its states stay out of
/// the futures that only sometimes connect.
pub type Connecting<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// A connection the HTTP/1.1 fast path writes to directly (mTLS for `tls: mesh`),
/// counted as open while it lives.
pub struct RawConn {
    pub stream: Upstream,
    _open: OpenConnection,
}

struct IdleRaw {
    conn: RawConn,
    since: Instant,
    worker: usize,
}

pub struct EndpointPool {
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<ClusterMetrics>,
    idle: Mutex<Vec<Idle>>,
    http2: Mutex<Option<http2::SendRequest<RequestBody>>>,
    raw_idle: Mutex<Vec<IdleRaw>>,
    /// Set for `tls: mesh` clusters: connections are mutual TLS.
    mesh: Arc<ArcSwapOption<MeshConnector>>,
}

/// A connection to an endpoint, as TCP listeners and the HTTP/1.1 fast path use it.
pub enum Upstream {
    Plain(TcpStream),
    Mesh(Box<TlsStream<TcpStream>>),
}

impl Upstream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Mesh(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Mesh(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Mesh(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Mesh(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    /// hyper's client writes a request's head and body with one `writev` only when its
    /// connection says it can.
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Mesh(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Mesh(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Mesh(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange; it goes back to the pool once the
/// response body has been read to its end, and is closed if the exchange is abandoned.
pub struct Checkout {
    pool: Arc<EndpointPool>,
    sender: http1::SendRequest<RequestBody>,
}

impl Checkout {
    pub fn release(self) {
        self.pool.release(self.sender);
    }
}

impl EndpointPool {
    pub fn new(
        address: String,
        connect_timeout: Duration,
        idle_timeout: Duration,
        metrics: Arc<ClusterMetrics>,
        mesh: Arc<ArcSwapOption<MeshConnector>>,
    ) -> Self {
        Self {
            address,
            connect_timeout,
            idle_timeout,
            metrics,
            idle: Mutex::new(Vec::new()),
            http2: Mutex::new(None),
            raw_idle: Mutex::new(Vec::new()),
            mesh,
        }
    }

    /// Sends over HTTP/1.1 (`upgrade`: the connection will be taken over by a tunnel
    /// and never pooled) or HTTP/2.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<RequestBody>,
        use_http2: bool,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<Checkout>), SendError> {
        if use_http2 {
            self.send_http2(request).await.map(|response| (response, None))
        } else {
            self.send_http1(request, upgrade).await
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<Checkout>), SendError> {
        loop {
            let (mut sender, reused) = match self.take_idle().await {
                Some(sender) => (sender, true),
                None => match self.connect_http1().await {
                    Ok(sender) => (sender, false),
                    Err(cause) => return Err(SendError::Connect { cause, request: Box::new(request) }),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let checkout = (!upgrade).then(|| Checkout { pool: self.clone(), sender });
                    return Ok((response, checkout));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection closed under us before the request left:
                    // try again on another one.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Upstream(e.into_error())),
                },
            }
        }
    }

    async fn take_idle(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let idle = self.idle.lock().unwrap().pop()?;
            if idle.sender.is_closed() || idle.since.elapsed() > self.idle_timeout {
                continue;
            }
            let mut sender = idle.sender;
            // The previous exchange may still be settling; ready() waits for that.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn release(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        // Oldest first: drop the ones idle too long so their connections close.
        let expired = idle.iter().take_while(|i| i.since.elapsed() > self.idle_timeout).count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// An idle fast-path connection opened by this worker, if there is one still
    /// usable `now`.
    pub fn take_raw(&self, now: Instant) -> Option<RawConn> {
        let worker = WORKER.with(Cell::get);
        let mut idle = self.raw_idle.lock().unwrap();
        loop {
            let at = idle.iter().rposition(|i| i.worker == worker)?;
            let candidate = idle.remove(at);
            if now.saturating_duration_since(candidate.since) > self.idle_timeout
                || !still_open(candidate.conn.stream.tcp())
            {
                continue;
            }
            return Some(candidate.conn);
        }
    }

    /// Returns a fast-path connection whose last exchange ended cleanly at `now`.
    pub fn release_raw(&self, conn: RawConn, now: Instant) {
        let mut idle = self.raw_idle.lock().unwrap();
        let expired =
            idle.iter().take_while(|i| now.saturating_duration_since(i.since) > self.idle_timeout).count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(IdleRaw { conn, since: now, worker: WORKER.with(Cell::get) });
        }
    }

    /// A new fast-path connection (mTLS for `tls: mesh`) within the connect timeout.
    /// Boxed: a connect and its handshake take kilobytes of states, which would otherwise
    /// sit in the future of every downstream connection, open or idle.
    pub fn connect_raw(&self) -> Connecting<'_, RawConn> {
        Box::pin(async move {
            let stream = self.connect(Carrying::Http1).await?;
            Ok(RawConn { stream, _open: self.open_connection() })
        })
    }

    /// Opens a TCP connection to the endpoint within the connect timeout, counting
    /// the attempt in the cluster's metrics. TCP listeners connect through this too.
    pub async fn connect_tcp(&self) -> Result<TcpStream, String> {
        let connecting =
            tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.address.as_str()));
        let failure = match connecting.await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.metrics.connects.fetch_add(1, Relaxed);
                return Ok(stream);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("connect timed out after {:?}", self.connect_timeout),
        };
        self.metrics.connect_errors.fetch_add(1, Relaxed);
        Err(failure)
    }

    /// Counts a connection in the open-connections gauge until the guard is dropped.
    pub fn open_connection(&self) -> OpenConnection {
        self.metrics.connections_open.fetch_add(1, Relaxed);
        OpenConnection(self.metrics.clone())
    }

    /// Opens a connection to the endpoint: mTLS for a `tls: mesh` cluster, naming what it
    /// will carry in ALPN. Every kind of upstream connection is opened through this.
    pub async fn connect(&self, carrying: Carrying) -> Result<Upstream, String> {
        let stream = self.connect_tcp().await?;
        match self.mesh.load_full() {
            None => Ok(Upstream::Plain(stream)),
            Some(mesh) => self.handshake(&mesh, stream, carrying).await.map(|s| Upstream::Mesh(Box::new(s))),
        }
    }

    /// The TLS handshake within what is left of the connect timeout, counted as a
    /// connect error when it fails.
    async fn handshake(
        &self,
        mesh: &MeshConnector,
        stream: TcpStream,
        carrying: Carrying,
    ) -> Result<TlsStream<TcpStream>, String> {
        let handshake =
            tokio::time::timeout(self.connect_timeout, mesh.connect(stream, &self.address, carrying));
        let failure = match handshake.await {
            Ok(Ok(tls)) => return Ok(tls),
            Ok(Err(e)) => e,
            Err(_) => format!("TLS handshake timed out after {:?}", self.connect_timeout),
        };
        tracing::debug!(endpoint = %self.address, cause = %failure, "mesh TLS connection refused");
        self.metrics.connect_errors.fetch_add(1, Relaxed);
        Err(failure)
    }

    /// Runs a connection on a task of its own.
    fn drive<F>(&self, connection: F)
    where
        F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let open = self.open_connection();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
            drop(open);
        });
    }

    /// A new HTTP/1.1 connection. Boxed, as `connect_raw`: a request's future would
    /// otherwise carry a connect's and a handshake's states (kilobytes) while it only
    /// reuses a pooled connection, and hyper moves that future whole for every HTTP/2 stream.
    fn connect_http1(&self) -> Connecting<'_, http1::SendRequest<RequestBody>> {
        Box::pin(async move {
            let stream = self.connect(Carrying::Http1).await?;
            let (sender, connection) =
                http1::Builder::new().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            self.drive(connection.with_upgrades());
            Ok(sender)
        })
    }

    /// A new HTTP/2 connection, boxed as `connect_http1` is.
    fn connect_http2(&self) -> Connecting<'_, http2::SendRequest<RequestBody>> {
        Box::pin(async move {
            let stream = self.connect(Carrying::Http2).await?;
            let (sender, connection) = http2::Builder::new(BoxingExecutor)
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
            self.drive(connection);
            Ok(sender)
        })
    }

    async fn send_http2(&self, mut request: Request<RequestBody>) -> Result<Response<Incoming>, SendError> {
        let shared = self.http2.lock().unwrap().clone().filter(|s| !s.is_closed());
        let (mut sender, reused) = match shared {
            Some(sender) => (sender, true),
            None => match self.fresh_http2().await {
                Ok(sender) => (sender, false),
                Err(cause) => return Err(SendError::Connect { cause, request: Box::new(request) }),
            },
        };
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(response),
            Err(mut e) => match e.take_message() {
                Some(unsent) if reused => request = unsent,
                _ => return Err(SendError::Upstream(e.into_error())),
            },
        }
        // The shared connection went away before the request left: one more try.
        let mut sender = match self.fresh_http2().await {
            Ok(sender) => sender,
            Err(cause) => return Err(SendError::Connect { cause, request: Box::new(request) }),
        };
        sender.try_send_request(request).await.map_err(|e| SendError::Upstream(e.into_error()))
    }

    async fn fresh_http2(&self) -> Result<http2::SendRequest<RequestBody>, String> {
        let sender = self.connect_http2().await?;
        *self.http2.lock().unwrap() = Some(sender.clone());
        Ok(sender)
    }
}

/// An idle connection the upstream closed (or wrote to out of turn) is readable;
/// one still open is not. Costs no system call while the reactor saw nothing, which
/// is the usual case: the last read of a response, shorter than the buffer, cleared
/// the readiness.
fn still_open(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upstream_connection_keeps_vectored_writes() {
        // hyper's clients write a request's head and body in one writev only when their
        // connection says it can; without the pass-through they copy both into one buffer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut upstream = Upstream::Plain(stream);
        assert!(upstream.is_write_vectored());

        let parts = [io::IoSlice::new(b"head "), io::IoSlice::new(b"body")];
        let written =
            std::future::poll_fn(|cx| Pin::new(&mut upstream).poll_write_vectored(cx, &parts)).await.unwrap();
        assert_eq!(written, 9);
        let mut received = [0u8; 9];
        tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut received).await.unwrap();
        assert_eq!(&received, b"head body");
    }
}
