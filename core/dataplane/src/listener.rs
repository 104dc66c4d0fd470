//! Accept loops and per-connection serving: TLS, protocol detection, HTTP or TCP.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::admin;
use crate::cluster::Cluster;
use crate::config::MtlsMode;
use crate::executor::spawn_boxed;
use crate::http1;
use crate::http_proxy::{self, ConnCtx};
use crate::identity;
use crate::io::{ConnState, MeteredIo};
use crate::proxy::Shared;
use crate::snapshot::{HttpServer, Kind, Listener, Mtls};
use crate::tcp_proxy;

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts connections until `stop` fires; the socket closes when this returns.
pub async fn accept_loop(
    socket: TcpListener,
    key: Arc<str>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let key = key.clone();
                    spawn_boxed(serve_connection(stream, peer, key, shared));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %key, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, key: Arc<str>, shared: Arc<Shared>) {
    let Some(listener) = shared.snapshot.load().listeners.get(&*key).cloned() else { return };
    let _ = stream.set_nodelay(true);
    let state = ConnState::new(listener.metrics.clone());
    // Admin connections carry no traffic: draining does not wait for them.
    let _guard = (!matches!(listener.kind, Kind::Admin)).then(|| shared.drain.guard());
    // Every connection's task holds this future for as long as it is open, idle or not,
    // sized by its largest state. Plaintext HTTP, the common case, is served inline and
    // every other kind boxed, so a plaintext connection carries none of their states.
    match &listener.kind {
        Kind::Http { server, .. } if listener.tls.is_none() && listener.mtls.is_none() => {
            serve_plaintext_http(stream, peer, key, &shared, &listener, server, state).await
        }
        Kind::Http { server, .. } => {
            Box::pin(serve_secure_http(stream, peer, key, &shared, &listener, server, state)).await
        }
        Kind::Tcp { cluster } => Box::pin(serve_tcp(stream, peer, &shared, &listener, cluster, state)).await,
        Kind::Admin => Box::pin(serve_admin(stream, shared.clone(), state)).await,
    }
}

async fn serve_plaintext_http(
    stream: TcpStream,
    peer: SocketAddr,
    key: Arc<str>,
    shared: &Arc<Shared>,
    listener: &Arc<Listener>,
    server: &HttpServer,
    state: Arc<ConnState>,
) {
    let Some(http2) = detect_http2(&stream, listener.header_read_timeout).await else { return };
    let ctx = conn_ctx(shared, key, listener, peer, false, state.clone(), None);
    serve_http(MeteredIo::new(stream, state), http2, server, ctx).await;
}

/// An HTTP listener with TLS, or with mTLS (whose permissive mode also admits plaintext).
async fn serve_secure_http(
    stream: TcpStream,
    peer: SocketAddr,
    key: Arc<str>,
    shared: &Arc<Shared>,
    listener: &Arc<Listener>,
    server: &HttpServer,
    state: Arc<ConnState>,
) {
    let stream = match (&listener.tls, &listener.mtls) {
        (Some(acceptor), _) => {
            let handshake = tokio::time::timeout(listener.header_read_timeout, acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let ctx = conn_ctx(shared, key, listener, peer, true, state.clone(), None);
            // Boxed as the mTLS stream is: each async fn it passes through keeps its
            // arguments for as long as it runs, so an inline stream would be held twice.
            return serve_http(MeteredIo::new(Box::new(tls), state), http2, server, ctx).await;
        }
        (None, Some(mtls)) => match accept_mtls(stream, peer, listener, mtls).await {
            None => return,
            Some(Inbound::Plain(stream)) => stream,
            Some(Inbound::Mesh(tls, id)) => {
                let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let ctx = conn_ctx(shared, key, listener, peer, true, state.clone(), Some(id));
                return serve_http(MeteredIo::new(tls, state), http2, server, ctx).await;
            }
        },
        (None, None) => stream,
    };
    serve_plaintext_http(stream, peer, key, shared, listener, server, state).await
}

async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    listener: &Listener,
    cluster: &Cluster,
    state: Arc<ConnState>,
) {
    let Some(mtls) = &listener.mtls else {
        if tcp_allowed(listener, None, peer) {
            tcp_proxy::forward(MeteredIo::new(stream, state), cluster).await
        }
        return;
    };
    let Some(inbound) = accept_mtls(stream, peer, listener, mtls).await else { return };
    let caller = match &inbound {
        Inbound::Plain(_) => None,
        Inbound::Mesh(_, id) => Some(&**id),
    };
    shared.registry.inbound(&listener.name, caller.unwrap_or_default()).connections.fetch_add(1, Relaxed);
    // Denied: the connection is dropped, so closed, before anything is forwarded.
    if !tcp_allowed(listener, caller, peer) {
        return;
    }
    match inbound {
        Inbound::Plain(stream) => tcp_proxy::forward(MeteredIo::new(stream, state), cluster).await,
        Inbound::Mesh(tls, _) => tcp_proxy::forward(MeteredIo::new(tls, state), cluster).await,
    }
}

async fn serve_admin(stream: TcpStream, shared: Arc<Shared>, state: Arc<ConnState>) {
    let io = TokioIo::new(MeteredIo::new(stream, state));
    // While draining, each admin request gets its answer on a connection of its own.
    let keep_alive = !shared.drain.is_draining();
    let service = service_fn(move |req| admin::handle(shared.clone(), req));
    let _ =
        hyper::server::conn::http1::Builder::new().keep_alive(keep_alive).serve_connection(io, service).await;
}

/// A connection accepted by an mTLS listener: plaintext (permissive only), or mutual
/// TLS with the caller's SPIFFE ID.
/// A tcp listener's authorization policy, applied once per connection by the caller's identity.
fn tcp_allowed(listener: &Listener, caller: Option<&str>, peer: SocketAddr) -> bool {
    let Some(policy) = &listener.authz else { return true };
    match policy.check_caller(caller) {
        Ok(()) => true,
        Err(denied) => {
            tracing::debug!(listener = %listener.name, %peer, ?caller, ?denied, "tcp connection denied by authorization policy");
            false
        }
    }
}

enum Inbound {
    Plain(TcpStream),
    Mesh(Box<TlsStream<TcpStream>>, Arc<str>),
}

/// Tells TLS from plaintext (permissive: a TLS record starts with 0x16, a handshake),
/// then runs the mTLS handshake and learns the caller's SPIFFE ID. `None`: refused,
/// with the reason logged at debug level.
async fn accept_mtls(
    stream: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    mtls: &Mtls,
) -> Option<Inbound> {
    const TLS_HANDSHAKE_RECORD: u8 = 0x16;
    let name = &listener.name;
    if mtls.mode == MtlsMode::Permissive {
        let mut first = [0u8; 1];
        let peek = tokio::time::timeout(listener.header_read_timeout, stream.peek(&mut first));
        match peek.await {
            Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(1)) => return Some(Inbound::Plain(stream)),
            _ => return None,
        }
    }
    let handshake = tokio::time::timeout(listener.header_read_timeout, mtls.acceptor.accept(stream));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let cause = identity::describe(&e);
            tracing::debug!(listener = %name, %peer, %cause, "mTLS connection refused: handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(listener = %name, %peer, "mTLS connection refused: handshake timed out");
            return None;
        }
    };
    let id = match identity::peer_identity(tls.get_ref().1) {
        Ok(id) => id,
        Err(cause) => {
            tracing::debug!(listener = %name, %peer, %cause, "mTLS connection refused: no usable identity");
            return None;
        }
    };
    if id.trust_domain() != mtls.own_id.trust_domain() {
        tracing::debug!(
            listener = %name, %peer, caller = %id,
            "mTLS connection refused: caller is not in the trust domain {}", mtls.own_id.trust_domain()
        );
        return None;
    }
    tracing::trace!(listener = %name, %peer, caller = %id, "mTLS connection accepted");
    Some(Inbound::Mesh(Box::new(tls), id.uri))
}

fn conn_ctx(
    shared: &Arc<Shared>,
    key: Arc<str>,
    listener: &Arc<Listener>,
    peer: SocketAddr,
    tls: bool,
    state: Arc<ConnState>,
    identity: Option<Arc<str>>,
) -> Arc<ConnCtx> {
    Arc::new(ConnCtx::new(shared.clone(), key, listener.clone(), peer, tls, state, identity))
}

/// Peeks at the first bytes: the HTTP/2 connection preface means h2c with prior
/// knowledge, anything else is HTTP/1. `None` when the client went away or stalled.
async fn detect_http2(stream: &TcpStream, deadline: Duration) -> Option<bool> {
    let peek = async {
        let mut buf = [0u8; HTTP2_PREFACE.len()];
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != HTTP2_PREFACE[..n] {
                return Some(false);
            }
            if n == HTTP2_PREFACE.len() {
                return Some(true);
            }
            // A partial preface: wait for more bytes rather than spin on peek.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(deadline, peek).await.ok().flatten()
}

async fn serve_http<T>(io: MeteredIo<T>, http2: bool, server: &HttpServer, ctx: Arc<ConnCtx>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if http2 {
        // Boxed, as its states are larger than the HTTP/1 fast path's (see serve_connection).
        Box::pin(serve_hyper(io, true, server, ctx)).await
    } else {
        http1::serve(io, server, ctx).await
    }
}

/// Serves a connection with hyper: HTTP/2, and HTTP/1 connections the fast path handed over.
pub(crate) async fn serve_hyper<I>(io: I, http2: bool, server: &HttpServer, ctx: Arc<ConnCtx>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = ctx.shared.clone();
    let listener = ctx.accepted.clone();
    let state = ctx.state.clone();
    let service = service_fn(move |req| http_proxy::handle(ctx.clone(), req));
    let io = TokioIo::new(io);
    let result = if http2 {
        let conn = server.http2.serve_connection(io, service);
        serve_until_done(conn, |c| c.graceful_shutdown(), &shared, &listener, &state).await
    } else {
        let conn = server.http1.serve_connection(io, service).with_upgrades();
        serve_until_done(conn, |c| c.graceful_shutdown(), &shared, &listener, &state).await
    };
    if let Err(e) = result {
        tracing::debug!(listener = %listener.name, error = %e, "connection closed with an error");
    }
}

/// Drives a connection to its end. When the proxy drains, or the connection has
/// been idle (no bytes, no open request) for the listener's idle timeout, asks it to
/// finish its open requests and close.
async fn serve_until_done<F>(
    conn: F,
    shutdown: impl FnOnce(Pin<&mut F>),
    shared: &Shared,
    listener: &Listener,
    state: &ConnState,
) -> Result<(), hyper::Error>
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    let mut drain = shared.drain.watcher();
    let mut shutdown = Some(shutdown);
    if shared.drain.is_draining() {
        if let Some(begin) = shutdown.take() {
            begin(conn.as_mut());
        }
    }
    // Idle means no byte moved and no request was open during a whole idle period,
    // so a connection closes between one and two periods after its last activity.
    let idle_limit = listener.idle_timeout;
    let mut last_activity = state.activity();
    loop {
        let idle_wait = async {
            if idle_limit.is_zero() {
                return std::future::pending().await;
            }
            tokio::time::sleep(idle_limit).await;
            let activity = state.activity();
            let idle =
                last_activity == activity && state.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0;
            (idle, activity)
        };
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = drain.changed(), if shutdown.is_some() => {
                if let Some(begin) = shutdown.take() {
                    begin(conn.as_mut());
                }
            }
            (idle, activity) = idle_wait, if shutdown.is_some() => {
                last_activity = activity;
                if idle {
                    if let Some(begin) = shutdown.take() {
                        begin(conn.as_mut());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns: what a task running it holds while it runs.
    fn future_size<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn connection_futures_hold_only_their_own_kinds_states() {
        // Every open connection, idle or not, holds one of these for its whole life.
        // Before their states were boxed apart, both were over 7 KB.
        let plaintext = future_size(serve_connection);
        assert!(plaintext <= 4096, "a plaintext connection's future is {plaintext} bytes");
        let secure =
            future_size(|(stream, peer, key): (TcpStream, SocketAddr, Arc<str>), shared, listener, state| {
                let (listener, server): (&Arc<Listener>, &HttpServer) = listener;
                serve_secure_http(stream, peer, key, shared, listener, server, state)
            });
        assert!(secure <= 5120, "a TLS connection's future is {secure} bytes");
    }
}
