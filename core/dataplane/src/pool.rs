//! Connections to one upstream endpoint: a stack of idle HTTP/1.1 connections and
//! one shared HTTP/2 connection, each driven by its own task.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::metrics::ClusterMetrics;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when released.
const MAX_IDLE: usize = 256;

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

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

pub struct EndpointPool {
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    metrics: Arc<ClusterMetrics>,
    idle: Mutex<Vec<Idle>>,
    http2: Mutex<Option<http2::SendRequest<RequestBody>>>,
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
    ) -> Self {
        Self {
            address,
            connect_timeout,
            idle_timeout,
            metrics,
            idle: Mutex::new(Vec::new()),
            http2: Mutex::new(None),
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

    async fn connect(&self) -> Result<TokioIo<TcpStream>, String> {
        self.connect_tcp().await.map(TokioIo::new)
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

    async fn connect_http1(&self) -> Result<http1::SendRequest<RequestBody>, String> {
        let io = self.connect().await?;
        let (sender, connection) = http1::Builder::new().handshake(io).await.map_err(|e| e.to_string())?;
        self.drive(connection.with_upgrades());
        Ok(sender)
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<RequestBody>, String> {
        let io = self.connect().await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
        self.drive(connection);
        Ok(sender)
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
