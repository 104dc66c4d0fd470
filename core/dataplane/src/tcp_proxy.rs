//! Opaque TCP forwarding: bytes both ways, each direction closed on its own.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::cluster::Cluster;
use crate::identity::Carrying;

/// Connects to an endpoint of `cluster` (trying the others when one refuses) and
/// copies bytes until both sides have closed.
pub async fn forward<T: AsyncRead + AsyncWrite + Unpin>(mut downstream: T, cluster: &Cluster) {
    let mut exclude = None;
    for _ in 0..cluster.balancer.endpoints().len() {
        let Some((index, in_flight)) = cluster.balancer.pick(exclude) else { break };
        let endpoint = &in_flight.endpoint().address;
        let pool = cluster.pool(index);
        let upstream = match pool.connect(Carrying::Opaque).await {
            Ok(stream) => stream,
            Err(cause) => {
                tracing::debug!(cluster = cluster.name(), %endpoint, %cause, "tcp connect failed");
                cluster.balancer.eject(in_flight.endpoint());
                exclude = Some(index);
                continue;
            }
        };
        let _open = pool.open_connection();
        // copy_bidirectional shuts down each write side when its read side hits EOF,
        // so a client's half-close reaches the upstream and the reply still flows back.
        let mut upstream = upstream;
        if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            tracing::debug!(cluster = cluster.name(), %endpoint, error = %e, "tcp stream ended with an error");
        }
        return;
    }
    tracing::warn!(cluster = cluster.name(), "tcp connection dropped: no endpoint accepted it");
}
