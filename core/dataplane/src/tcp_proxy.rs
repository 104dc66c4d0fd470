//! Opaque TCP forwarding: bytes both ways, each direction closed on its own.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::cluster::Cluster;

/// Connects to an endpoint of `cluster` (trying the others when one refuses) and
/// copies bytes until both sides have closed.
pub async fn forward<T: AsyncRead + AsyncWrite + Unpin>(mut downstream: T, cluster: &Cluster) {
    let connect_timeout = Duration::from_secs_f64(cluster.config.connect_timeout);
    let attempts = cluster.balancer.endpoints().len();
    let mut exclude = None;
    for _ in 0..attempts {
        let Some((index, in_flight)) = cluster.balancer.pick(exclude) else { break };
        let endpoint = &in_flight.endpoint().address;
        let connected = tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint.as_str())).await;
        let mut upstream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(cluster = cluster.name(), %endpoint, error = %e, "tcp connect failed");
                cluster.metrics.connect_errors.fetch_add(1, Relaxed);
                cluster.balancer.eject(in_flight.endpoint());
                exclude = Some(index);
                continue;
            }
            Err(_) => {
                tracing::debug!(cluster = cluster.name(), %endpoint, "tcp connect timed out");
                cluster.metrics.connect_errors.fetch_add(1, Relaxed);
                cluster.balancer.eject(in_flight.endpoint());
                exclude = Some(index);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        cluster.metrics.connects.fetch_add(1, Relaxed);
        cluster.metrics.connections_open.fetch_add(1, Relaxed);
        // copy_bidirectional shuts down each write side when its read side hits EOF,
        // so a client's half-close reaches the upstream and the reply still flows back.
        let result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
        cluster.metrics.connections_open.fetch_sub(1, Relaxed);
        if let Err(e) = result {
            tracing::debug!(cluster = cluster.name(), %endpoint, error = %e, "tcp stream ended with an error");
        }
        return;
    }
    tracing::warn!(cluster = cluster.name(), "tcp connection dropped: no endpoint accepted it");
}
