//! A cluster: its endpoints, their balancer, and pooled client connections to them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::balance::Balancer;
use crate::body::{BoxError, RequestBody};
use crate::config::{ClusterConfig, UpstreamProtocol};
use crate::metrics::{ClusterMetrics, Registry};

type HttpClient = Client<MeteredConnector, RequestBody>;

pub struct Cluster {
    pub config: ClusterConfig,
    pub balancer: Balancer,
    pub metrics: Arc<ClusterMetrics>,
    http1: HttpClient,
    http2: HttpClient,
}

impl Cluster {
    pub fn new(config: ClusterConfig, registry: &Registry) -> Self {
        let metrics = registry.cluster(&config.name);
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs_f64(config.connect_timeout)));
        let connector = MeteredConnector { http, metrics: metrics.clone() };
        let client = |http2_only: bool| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs_f64(config.idle_timeout))
                .http2_only(http2_only)
                .http2_adaptive_window(true)
                .build(connector.clone())
        };
        Self {
            balancer: Balancer::new(config.lb, &config.endpoints),
            http1: client(false),
            http2: client(true),
            metrics,
            config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The client for a request that arrived as HTTP/2 (`true`) or HTTP/1.
    pub fn client(&self, downstream_http2: bool) -> (&HttpClient, bool) {
        let http2 = match self.config.protocol {
            UpstreamProtocol::Auto => downstream_http2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        (if http2 { &self.http2 } else { &self.http1 }, http2)
    }

    pub fn http1_client(&self) -> &HttpClient {
        &self.http1
    }
}

/// Plain TCP connector that counts connections in the cluster's metrics.
#[derive(Clone)]
pub struct MeteredConnector {
    http: HttpConnector,
    metrics: Arc<ClusterMetrics>,
}

type ConnectFuture = Pin<
    Box<dyn Future<Output = Result<Metered<<HttpConnector as Service<Uri>>::Response>, BoxError>> + Send>,
>;

impl Service<Uri> for MeteredConnector {
    type Response = Metered<<HttpConnector as Service<Uri>>::Response>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            match connecting.await {
                Ok(io) => {
                    metrics.connects.fetch_add(1, Relaxed);
                    metrics.connections_open.fetch_add(1, Relaxed);
                    Ok(Metered { inner: io, guard: OpenConnection(metrics) })
                }
                Err(e) => {
                    metrics.connect_errors.fetch_add(1, Relaxed);
                    Err(e.into())
                }
            }
        })
    }
}

/// Decrements the open-connection gauge when the upstream connection is dropped.
pub struct OpenConnection(Arc<ClusterMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

pin_project! {
    pub struct Metered<T> {
        #[pin]
        inner: T,
        guard: OpenConnection,
    }
}

impl<T: Connection> Connection for Metered<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: Read> Read for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: Write> Write for Metered<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
