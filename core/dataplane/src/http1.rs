//! The HTTP/1.1 fast path.
//!
//! A request that has everything in hand — its whole head and body in the bytes read
//! so far, a route whose filters (if any) have only request hooks, an HTTP/1.1
//! upstream (plain or mesh mTLS) — is forwarded by copying bytes: its head is parsed
//! once in place, checked against the authorization policy and routed, rewritten
//! straight into the upstream write, and the response head is relayed the same way, all
//! on the downstream connection's own task. The first request that needs more (an
//! upgrade, `Expect`, a chunked or large body, a partial or invalid head, response or
//! log hooks, an HTTP/2 upstream, gRPC) hands the connection, with the bytes already
//! read, to hyper for the rest of its life, so every rule hyper enforces (400, 413,
//! 431, slow headers, smuggling) still applies.

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::header::{CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::access_log::Entry;
use crate::balance::InFlight;
use crate::cluster::Cluster;
use crate::config::OnError;
use crate::date::push_date;
use crate::drain::Drain;
use crate::filter::{call_request, RequestHead, RequestVerdict};
use crate::http_proxy::{
    prepare_request_headers, request_head, request_id, routed_cluster, ConnCtx, Exchanged, ProxyError,
};
use crate::io::{ConnState, MeteredIo, Rewind};
use crate::listener::serve_hyper;
use crate::pool::{EndpointPool, RawConn, Upstream};
use crate::routing::host_without_port;
use crate::snapshot::{HttpServer, Kind, Route};

/// The most request headers the fast path parses; a request with more goes to hyper.
const MAX_REQUEST_HEADERS: usize = 64;
const MAX_RESPONSE_HEADERS: usize = 128;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How much a client may pipeline while a request is upstream before the proxy stops
/// reading from it (and so stops noticing that it closed) until the response is out.
const MAX_PIPELINED_BYTES: usize = 64 * 1024;
/// Spare room made before each downstream read.
const READ_RESERVE: usize = 4 * 1024;
/// Room made for the request as it goes upstream, and for the response head.
const WRITE_RESERVE: usize = 512;
/// The upstream read buffer of one exchange, sized for relaying larger bodies.
const RELAY_BUFFER: usize = 32 * 1024;

/// What a connection's exchanges reuse.
struct Buffers<'r> {
    /// Bytes read from the client and not yet served.
    read: &'r mut BytesMut,
    /// The request as it goes upstream.
    request: Vec<u8>,
    /// The response head (and the body bytes that came with it) as it goes downstream.
    response: Vec<u8>,
}

#[derive(PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Not for the fast path: hyper serves the rest of the connection.
    Hyper,
}

/// Serves an HTTP/1 connection, on the fast path for as long as its requests allow.
pub async fn serve<T>(mut io: MeteredIo<T>, server: &HttpServer, ctx: Arc<ConnCtx>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Empty: the first read makes room once the client has sent something.
    let mut read = BytesMut::new();
    if serve_fast(&mut io, &mut read, &ctx).await == Next::Hyper {
        // Boxed: the connection's future would otherwise hold hyper's states from the start.
        Box::pin(serve_hyper(Rewind::new(io, read.freeze()), false, server, ctx)).await;
    }
}

/// Serves requests until the connection closes (`Next::Close`) or one needs hyper
/// (`Next::Hyper`, with its bytes left at the front of `read`).
async fn serve_fast<T>(io: &mut MeteredIo<T>, read: &mut BytesMut, ctx: &ConnCtx) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut buffers = Buffers { read, request: Vec::new(), response: Vec::new() };
    // One future for the connection's life rather than a timer per request.
    let mut idle_or_drained =
        std::pin::pin!(idle_or_drained(&ctx.shared.drain, &ctx.state, ctx.accepted.idle_timeout));
    loop {
        if buffers.read.is_empty() {
            if ctx.shared.drain.is_draining() {
                return Next::Close;
            }
            tokio::select! {
                read = read_next_request(io, &mut buffers) => match read {
                    Ok(n) if n > 0 => {}
                    _ => return Next::Close,
                },
                () = &mut idle_or_drained => return Next::Close,
            }
        }
        match exchange(io, &mut buffers, ctx).await {
            Next::KeepAlive => {}
            Next::Close => {
                let _ = io.shutdown().await;
                return Next::Close;
            }
            Next::Hyper => return Next::Hyper,
        }
    }
}

/// Resolves when the proxy starts draining, or once a whole idle period went by with
/// no byte moved on the connection (so it closes one to two periods after its last).
async fn idle_or_drained(drain: &Drain, state: &ConnState, limit: Duration) {
    let mut drained = drain.watcher();
    let idle = async {
        if limit.is_zero() {
            return std::future::pending().await;
        }
        let mut seen = state.activity();
        loop {
            tokio::time::sleep(limit).await;
            let now = state.activity();
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    tokio::select! {
        _ = drained.changed() => {}
        () = idle => {}
    }
}

/// Resolves when the client closes its connection (or it fails). Bytes it sends meanwhile
/// (pipelined requests) are kept in `read` for the next exchange, up to a limit.
async fn client_gone<R: AsyncRead + Unpin>(from: &mut R, read: &mut BytesMut) {
    while read.len() < MAX_PIPELINED_BYTES {
        match read_more(from, read).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
    std::future::pending().await
}

/// Reads the first bytes of the connection's next request into the empty read buffer,
/// through the stack: while the client has sent nothing the buffers are let go, so an
/// idle keep-alive connection holds none.
async fn read_next_request<R: AsyncRead + Unpin>(
    from: &mut R,
    buffers: &mut Buffers<'_>,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_RESERVE];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        if Pin::new(&mut *from).poll_read(cx, &mut chunk)?.is_pending() {
            *buffers.read = BytesMut::new();
            buffers.request = Vec::new();
            buffers.response = Vec::new();
            return Poll::Pending;
        }
        buffers.read.reserve(READ_RESERVE);
        buffers.read.extend_from_slice(chunk.filled());
        buffers.request.reserve(WRITE_RESERVE);
        buffers.response.reserve(WRITE_RESERVE);
        Poll::Ready(Ok(chunk.filled().len()))
    })
    .await
}

async fn read_more<R: AsyncRead + Unpin>(from: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
    from.read_buf(buf).await
}

/// One request, from the bytes at the front of `buffers.read`.
async fn exchange<T>(io: &mut MeteredIo<T>, buffers: &mut Buffers<'_>, ctx: &ConnCtx) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let listener = ctx.listener();
    let Kind::Http { routes, server } = &listener.kind else { return Next::Hyper };
    let log = ctx.accepted.access_log.as_ref();
    let decision = plan(buffers.read, &mut buffers.request, ctx, routes, server, &listener, log.is_some());
    if !matches!(decision, Decision::Hyper) {
        if let Some(inbound) = &ctx.inbound {
            inbound.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let (mut plan, filtered) = match decision {
        Decision::Forward(plan) => (plan, None),
        Decision::Filter { plan, head, body_start } => (plan, Some((head, body_start))),
        Decision::Answer { error, consumed, close, head, mut entry } => {
            buffers.read.advance(consumed);
            if let (Some(log), Some(entry)) = (log, entry.as_mut()) {
                entry.status = error.status().as_u16();
                entry.duration = started.elapsed();
                log.write(entry);
            }
            return answer(io, ctx, &mut buffers.response, &error, head, close).await;
        }
        Decision::Hyper => return Next::Hyper,
    };
    plan.route.metrics.request();
    let answered = match filtered {
        // Boxed, so routes without filters do not carry the filter call's states.
        Some((head, body_start)) => {
            Box::pin(filter(io, buffers, ctx, &mut plan, *head, body_start, started)).await
        }
        None => None,
    };
    buffers.read.advance(plan.consumed);
    let outcome = match answered {
        Some(next) => next,
        None => forward(io, buffers, ctx, &mut plan, started).await,
    };
    if let (Some(log), Some(entry)) = (log, plan.entry.as_ref()) {
        log.write(entry);
    }
    outcome
}

/// A request the fast path forwards: its request bytes are in `Buffers::request`.
struct Plan<'l> {
    route: &'l Route,
    /// The cluster a filter routed the request to, instead of the route's.
    cluster: Option<Arc<Cluster>>,
    /// How many bytes of the read buffer the request took (head and body).
    consumed: usize,
    head: bool,
    /// Safe to send again on another connection when a reused one turns out closed.
    idempotent: bool,
    /// The client asked to close the connection after this exchange.
    close: bool,
    entry: Option<Entry>,
}

enum Decision<'l> {
    Forward(Plan<'l>),
    /// The route's request hooks come first; the body starts at `body_start` in the read
    /// buffer, and the request to send is written once they have seen the head.
    Filter {
        plan: Plan<'l>,
        head: Box<RequestHead>,
        body_start: usize,
    },
    /// Refused by the authorization policy, or no route: the proxy answers itself.
    Answer {
        error: ProxyError,
        consumed: usize,
        close: bool,
        head: bool,
        entry: Option<Entry>,
    },
    Hyper,
}

/// Parses the request at the front of `read` and, if the fast path can take it, writes
/// the request to send upstream into `out`.
fn plan<'l>(
    read: &[u8],
    out: &mut Vec<u8>,
    ctx: &ConnCtx,
    routes: &'l [Route],
    server: &HttpServer,
    listener: &crate::snapshot::Listener,
    logging: bool,
) -> Decision<'l> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = request.parse(read) else { return Decision::Hyper };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Decision::Hyper;
    };
    if head_len > server.max_header_bytes || request.headers.len() > server.max_headers {
        return Decision::Hyper;
    }
    // Origin form only; the same check hyper makes, so the same requests get a 400.
    if !target.starts_with('/') {
        return Decision::Hyper;
    }
    let Ok(path_and_query) = PathAndQuery::try_from(target) else { return Decision::Hyper };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Decision::Hyper };
    if method == Method::CONNECT {
        return Decision::Hyper;
    }

    let mut content_length = None;
    let mut close = false;
    let mut host = None;
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("content-length") {
            match (content_length, parse_length(value)) {
                (None, Some(n)) => content_length = Some(n),
                _ => return Decision::Hyper,
            }
        } else if name.eq_ignore_ascii_case("host") {
            match (host, std::str::from_utf8(value)) {
                (None, Ok(value)) => host = Some(value),
                _ => return Decision::Hyper,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Decision::Hyper;
                }
            }
        } else if ["transfer-encoding", "upgrade", "expect"].iter().any(|n| name.eq_ignore_ascii_case(n))
            || name.eq_ignore_ascii_case("content-type") && value.starts_with(b"application/grpc")
        {
            return Decision::Hyper;
        }
    }
    let Some(host) = host else { return Decision::Hyper };
    let body_len = content_length.unwrap_or(0);
    if listener.max_body_bytes.is_some_and(|limit| body_len > limit) {
        return Decision::Hyper;
    }
    let consumed = match usize::try_from(body_len).ok().and_then(|n| n.checked_add(head_len)) {
        Some(total) if total <= read.len() => total,
        _ => return Decision::Hyper,
    };
    let head = method == Method::HEAD;

    let mut entry = logging.then(|| Entry {
        listener: ctx.accepted.name.clone(),
        method: method.to_string(),
        authority: host.to_owned(),
        path: target.to_owned(),
        client: ctx.peer.ip().to_string(),
        identity: ctx.identity.as_deref().map(str::to_owned),
        ..Entry::default()
    });
    let answer = |error: ProxyError, mut entry: Option<Entry>| {
        if let Some(entry) = entry.as_mut() {
            // As on the hyper path, a logged request gets an id even when refused.
            let id = header_value(request.headers, "x-request-id");
            entry.request_id = id.or_else(|| request_id().to_str().ok().map(str::to_owned));
        }
        Decision::Answer { error, consumed, close, head, entry }
    };

    let path = path_and_query.path();
    let mut header_map = None;
    if let Some(policy) = &listener.authz {
        let headers = header_map.get_or_insert_with(|| to_header_map(request.headers));
        if let Err(denied) = policy.check(ctx.identity.as_deref(), &method, path, headers) {
            return answer(ProxyError::Denied(denied), entry);
        }
    }
    let matched_host = host_without_port(host);
    let no_headers = HeaderMap::new();
    let route = routes.iter().find(|route| {
        let headers = if route.matcher.has_header_conditions() {
            &*header_map.get_or_insert_with(|| to_header_map(request.headers))
        } else {
            &no_headers
        };
        route.matcher.matches(&matched_host, path, &method, headers)
    });
    let Some(route) = route else { return answer(ProxyError::NoRoute(matched_host.into_owned()), entry) };
    let cluster = &route.cluster;
    if cluster.upstream_http2(false) || route.filters.is_some() && !route.fast_filters {
        return Decision::Hyper;
    }
    let idempotent = matches!(method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
        || method == Method::PUT
        || method == Method::DELETE;

    if route.filters.is_some() {
        // The hooks see the headers as they would go upstream, as on the hyper path.
        let mut headers = header_map.unwrap_or_else(|| to_header_map(request.headers));
        prepare_request_headers(&mut headers, None, ctx, false);
        if let Some(entry) = entry.as_mut() {
            entry.request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
            entry.route = Some(route.name.to_string());
            entry.cluster = Some(cluster.name().to_owned());
        }
        let filtered = request_head(method, host, target, headers, ctx, route);
        let plan = Plan { route, cluster: None, consumed, head, idempotent, close, entry };
        return Decision::Filter { plan, head: Box::new(filtered), body_start: head_len };
    }

    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = Vec::new();
    let mut request_id_value = None;
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.push(value);
            continue;
        }
        if name.eq_ignore_ascii_case("x-request-id") {
            request_id_value = Some(value);
        } else if HOP_BY_HOP.iter().chain(&OURS).any(|n| name.eq_ignore_ascii_case(n))
            || name.eq_ignore_ascii_case("te") && !value.eq_ignore_ascii_case(b"trailers")
        {
            continue;
        }
        push_header(out, name.as_bytes(), value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for previous in forwarded_for {
        out.extend_from_slice(previous);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ctx.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"forwarded", ctx.forwarded.as_bytes());
    push_header(out, b"x-forwarded-proto", if ctx.tls { b"https" } else { b"http" });
    if let Some(xfcc) = &ctx.xfcc {
        push_header(out, b"x-forwarded-client-cert", xfcc.as_bytes());
    }
    let generated;
    let request_id_value = match request_id_value {
        Some(value) => value,
        None => {
            generated = request_id();
            push_header(out, b"x-request-id", generated.as_bytes());
            generated.as_bytes()
        }
    };
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&read[head_len..consumed]);

    if let Some(entry) = entry.as_mut() {
        entry.request_id = std::str::from_utf8(request_id_value).ok().map(str::to_owned);
        entry.route = Some(route.name.to_string());
        entry.cluster = Some(cluster.name().to_owned());
    }
    Decision::Forward(Plan { route, cluster: None, consumed, head, idempotent, close, entry })
}

/// Headers that describe one hop (RFC 9110 §7.6.1), dropped in both directions; `te`
/// and `upgrade` are decided per direction, and the names a `Connection` header lists too.
const HOP_BY_HOP: [&str; 3] = ["connection", "keep-alive", "proxy-connection"];
/// Request headers only this proxy sets: whatever a client sent is dropped.
const OURS: [&str; 2] = ["x-forwarded-client-cert", "x-forwarded-proto"];

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn header_value(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    let header = headers.iter().find(|h| h.name.eq_ignore_ascii_case(name))?;
    std::str::from_utf8(header.value).ok().map(str::to_owned)
}

fn to_header_map(headers: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for header in headers {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(header.name.as_bytes()), HeaderValue::from_bytes(header.value))
        {
            map.append(name, value);
        }
    }
    map
}

/// A `Content-Length` value: digits only, as RFC 9110 §8.6 has it.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Runs the route's request hooks on a planned request. `None`: the request, as they
/// left it, is in `buffers.request`; else they, or their failure, answered it.
async fn filter<T>(
    io: &mut MeteredIo<T>,
    buffers: &mut Buffers<'_>,
    ctx: &ConnCtx,
    plan: &mut Plan<'_>,
    head: RequestHead,
    body_start: usize,
    started: Instant,
) -> Option<Next>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let route = plan.route;
    let chain = route.filters.as_ref().expect("a filtered plan's route has filters");
    let method = head.method.clone();
    // Kept only where a failing filter may be skipped: the request then goes on as it came.
    let original = (chain.on_error == OnError::FailOpen).then(|| head.headers.clone());
    let mut exchanged = Exchanged::default();
    // A client that leaves while the hooks run takes its request with it, as on hyper.
    let verdict = tokio::select! {
        verdict = call_request(&ctx.shared.filters, chain, head) => verdict,
        () = client_gone(io, buffers.read) => {
            tracing::debug!(route = %route.name, "client closed its connection while its request was filtered");
            return Some(Next::Close);
        }
    };
    let (headers, target, cluster) = match verdict {
        RequestVerdict::Continue { headers, path_and_query, cluster, .. } => {
            let cluster = match cluster {
                Some(name) => match routed_cluster(ctx, route, chain, name, &mut exchanged) {
                    Ok(cluster) => cluster,
                    Err(error) => return Some(fail(io, buffers, ctx, plan, &error, started).await),
                },
                None => None,
            };
            (headers, path_and_query, cluster)
        }
        RequestVerdict::Respond { status, headers, body } => {
            return Some(respond(io, buffers, ctx, plan, status, &headers, &body, started).await);
        }
        RequestVerdict::Failed(failure) => {
            let closed = exchanged.failed(failure);
            match original {
                Some(headers) => {
                    let target = String::from_utf8_lossy(request_target(buffers.read)).into_owned();
                    (headers, target, None)
                }
                None => return Some(fail(io, buffers, ctx, plan, &closed, started).await),
            }
        }
    };
    // The target still at the front of the read buffer is the one the hooks were given.
    let target = if target.as_bytes() == request_target(buffers.read) {
        target
    } else {
        match Uri::try_from(target) {
            Ok(uri) => uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            Err(_) => {
                let error = ProxyError::BadRequest("a filter set an invalid path");
                return Some(fail(io, buffers, ctx, plan, &error, started).await);
            }
        }
    };
    if let Some(chosen) = cluster.as_ref().filter(|c| c.upstream_http2(false)) {
        // Only a reload between routing and the verdict can get here: `fast_filters`
        // keeps these routes off the fast path while any cluster speaks HTTP/2.
        let error = ProxyError::Filter {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "cluster \"{}\" changed to HTTP/2 while the request was filtered",
                chosen.name()
            ),
        };
        return Some(fail(io, buffers, ctx, plan, &error, started).await);
    }
    plan.cluster = cluster;
    let body = &buffers.read[body_start..plan.consumed];
    write_request(&mut buffers.request, &method, &target, &headers, body);
    None
}

/// The target of the request line at the front of `head`, which httparse accepted as
/// `method SP target SP version`.
fn request_target(head: &[u8]) -> &[u8] {
    head.split(|&b| b == b' ').nth(1).unwrap_or_default()
}

/// Writes a request whose headers a filter had; its framing is the body's own.
fn write_request(out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap, body: &[u8]) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length = !body.is_empty();
    for (name, value) in headers {
        if *name == CONTENT_LENGTH {
            length = true;
        } else if *name != TRANSFER_ENCODING {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if length {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Sends the planned request to its cluster and relays the response.
async fn forward<T>(
    io: &mut MeteredIo<T>,
    buffers: &mut Buffers<'_>,
    ctx: &ConnCtx,
    plan: &mut Plan<'_>,
    started: Instant,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let route = plan.route;
    let chosen = plan.cluster.take();
    let cluster = chosen.as_ref().unwrap_or(&route.cluster);
    let mut relay = BytesMut::with_capacity(RELAY_BUFFER);
    // A refused connection means nothing reached the upstream: one more endpoint is
    // tried, as on the hyper path.
    let mut exclude = None;
    let mut refused = None;
    let mut attempt = None;
    for _ in 0..2 {
        let Some((index, in_flight)) = cluster.balancer.pick_at(exclude, started) else { break };
        let pool = cluster.pool(index);
        let conn = match pool.take_raw(started) {
            Some(conn) => Ok((conn, true)),
            None => pool.connect_raw().await.map(|conn| (conn, false)),
        };
        match conn {
            Ok((conn, reused)) => {
                attempt = Some((index, in_flight, conn, reused));
                break;
            }
            Err(cause) => {
                cluster.balancer.eject(in_flight.endpoint());
                tracing::debug!(cluster = cluster.name(), endpoint = %in_flight.endpoint().address, %cause, "connect failed");
                refused = Some((in_flight.endpoint().address.clone(), cause));
                exclude = Some(index);
            }
        }
    }
    let Some((index, in_flight, mut conn, reused)) = attempt else {
        let error = match refused {
            Some((endpoint, cause)) => {
                ProxyError::Connect { cluster: cluster.name().to_owned(), endpoint, cause }
            }
            None => ProxyError::NoEndpoint(cluster.name().to_owned()),
        };
        return fail(io, buffers, ctx, plan, &error, started).await;
    };

    let request = &buffers.request[..];
    let head_out = &mut buffers.response;
    let exchange = async {
        let result: Result<ResponseHead, Failure> = match round_trip(
            &mut conn.stream,
            request,
            &mut relay,
            plan.head,
            head_out,
        )
        .await
        {
            Err(Failure::Silent(cause)) if reused && plan.idempotent => {
                // The pooled connection had been closed by the upstream: a fresh one.
                tracing::debug!(cluster = cluster.name(), %cause, "pooled connection was closed; retrying");
                conn = cluster.pool(index).connect_raw().await.map_err(Failure::Connect)?;
                relay.clear();
                round_trip(&mut conn.stream, request, &mut relay, plan.head, head_out).await
            }
            result => result,
        };
        result
    };
    let waiting = async {
        match route.timeout {
            Some(limit) => {
                tokio::time::timeout(limit, exchange).await.unwrap_or(Err(Failure::Timeout(limit)))
            }
            None => exchange.await,
        }
    };
    // A client that goes away while its request is upstream cancels it (the upstream
    // connection is closed), as on the hyper path.
    let result = tokio::select! {
        result = waiting => result,
        () = client_gone(io, buffers.read) => {
            tracing::debug!(route = %route.name, "client closed its connection before the response");
            return Next::Close;
        }
    };
    let endpoint = || in_flight.endpoint().address.clone();
    let response = match result {
        Ok(response) => response,
        Err(failure) => {
            let cluster = cluster.name().to_owned();
            let error = match failure {
                Failure::Timeout(after) => ProxyError::Timeout { cluster, after },
                Failure::Connect(cause) => ProxyError::Connect { cluster, endpoint: endpoint(), cause },
                Failure::Silent(cause) | Failure::Broken(cause) => {
                    ProxyError::Upstream { cluster, endpoint: endpoint(), cause }
                }
            };
            tracing::debug!(route = %route.name, error = %error, "request failed");
            return fail(io, buffers, ctx, plan, &error, started).await;
        }
    };
    let answered = Instant::now();
    in_flight.observe_latency(answered);
    route.metrics.response(response.status, answered - started);
    if let Some(entry) = plan.entry.as_mut() {
        entry.status = response.status;
        entry.duration = answered - started;
    }
    let close = plan.close || response.framing == Framing::Close || ctx.shared.drain.is_draining();
    let source = Source { conn, pool: cluster.pool(index), in_flight, answered };
    relay_response(io, buffers, &mut relay, response, close, source).await
}

/// Why no response head came back.
enum Failure {
    /// The connection failed before a byte of response: the request may not have been seen.
    Silent(String),
    /// The response was cut short or is not HTTP.
    Broken(String),
    Connect(String),
    Timeout(Duration),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (no length, HTTP/1.0 style).
    Close,
}

/// A response head, parsed and rewritten for the client.
struct ResponseHead {
    status: u16,
    /// The head's length in the relay buffer, where the body starts.
    head_len: usize,
    framing: Framing,
    /// The upstream connection may carry another request afterwards.
    reusable: bool,
    /// The upstream sent a `date` header (passed on as it is).
    dated: bool,
}

/// Writes the request and reads until a final response head is in `relay`; its status
/// line and headers for the client are then in `out`.
async fn round_trip(
    upstream: &mut Upstream,
    request: &[u8],
    relay: &mut BytesMut,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, Failure> {
    let sent = async {
        upstream.write_all(request).await?;
        // Pushes TLS records out on a mesh connection; nothing to do on a plain one.
        upstream.flush().await
    };
    sent.await.map_err(|e| Failure::Silent(e.to_string()))?;
    let mut received = false;
    loop {
        if !relay.is_empty() {
            match parse_response(relay, head_request, out)? {
                Some(head) if (100..200).contains(&head.status) => {
                    // Interim responses (103 Early Hints and the like) are not relayed.
                    relay.advance(head.head_len);
                    continue;
                }
                Some(head) => return Ok(head),
                None if relay.len() > MAX_RESPONSE_HEAD => {
                    return Err(Failure::Broken("response head too large".into()))
                }
                None => {}
            }
        }
        match upstream.read_buf(relay).await {
            Ok(0) if !received => {
                return Err(Failure::Silent("connection closed before a response was received".into()))
            }
            Ok(0) => return Err(Failure::Broken("connection closed before the response head ended".into())),
            Ok(_) => received = true,
            Err(e) if !received => return Err(Failure::Silent(e.to_string())),
            Err(e) => return Err(Failure::Broken(e.to_string())),
        }
    }
}

/// Parses the response head at the front of `relay` and writes its status line and
/// headers, hop-by-hop ones removed, into `out` (emptied first). `None`: the head is not
/// complete yet.
fn parse_response(
    relay: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(relay) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failure::Broken(format!("invalid response: {e}"))),
    };
    let status = response.code.unwrap_or_default();
    if status == 101 {
        return Err(Failure::Broken("101 Switching Protocols without an upgrade request".into()));
    }
    let mut content_length = None;
    let mut chunked = None;
    let mut reusable = response.version == Some(1);
    let mut dated = false;
    let mut named = Vec::new();
    for header in response.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("date") {
            dated = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            let length =
                parse_length(value).ok_or_else(|| Failure::Broken("invalid content-length".into()))?;
            if content_length.is_some_and(|n| n != length) {
                return Err(Failure::Broken("conflicting content-length".into()));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default().trim_ascii();
            chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    named.push(token);
                }
            }
        }
    }
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, content_length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    let reason = match response.reason {
        Some(reason) if !reason.is_empty() => reason,
        _ => StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or(""),
    };
    out.clear();
    // httparse gives a three-digit code.
    let digits =
        [b'0' + (status / 100 % 10) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name;
        let hop = HOP_BY_HOP.iter().chain(&["te", "upgrade"]).any(|n| name.eq_ignore_ascii_case(n))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_bytes()));
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3); passing both on
        // would let the next hop frame the body differently.
        let overridden_length = chunked.is_some() && name.eq_ignore_ascii_case("content-length");
        if !hop && !overridden_length {
            push_header(out, name.as_bytes(), header.value);
        }
    }
    Ok(Some(ResponseHead { status, head_len, framing, reusable, dated }))
}

/// The connection a response comes from, and what to do with it once the body ends.
struct Source<'a> {
    conn: RawConn,
    pool: &'a EndpointPool,
    /// Keeps the endpoint's request counted as in flight until the body ends.
    in_flight: InFlight,
    /// When the response head arrived.
    answered: Instant,
}

/// Sends the response head and streams its body; returns the upstream connection to
/// its pool if the exchange ended cleanly.
async fn relay_response<T>(
    io: &mut MeteredIo<T>,
    buffers: &mut Buffers<'_>,
    relay: &mut BytesMut,
    head: ResponseHead,
    close: bool,
    source: Source<'_>,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    // The status line and headers are there already (`round_trip`).
    let out = &mut buffers.response;
    if !head.dated {
        push_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    relay.advance(head.head_len);
    let mut body = Body::new(head.framing);
    let Source { mut conn, pool, in_flight, answered } = source;
    // The first body bytes go out with the head, in one write.
    let Ok(first) = body.take(relay) else { return Next::Close };
    out.extend_from_slice(&relay[..first]);
    let mut extra = relay.len() > first;
    if io.write_all(out).await.is_err() {
        return Next::Close;
    }
    let mut streamed = false;
    while !body.done() {
        streamed = true;
        relay.clear();
        match conn.stream.read_buf(relay).await {
            Ok(0) if head.framing == Framing::Close => break,
            Ok(0) | Err(_) => {
                tracing::debug!("upstream connection closed in the middle of a response body");
                return Next::Close;
            }
            Ok(_) => {}
        }
        let Ok(n) = body.take(relay) else { return Next::Close };
        extra = relay.len() > n;
        if io.write_all(&relay[..n]).await.is_err() {
            return Next::Close;
        }
    }
    drop(in_flight);
    if head.reusable && !extra && head.framing != Framing::Close {
        // A body that took more reads may have taken a while.
        let ended = if streamed { Instant::now() } else { answered };
        pool.release_raw(conn, ended);
    }
    if close {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Answers the request itself (before any response byte went out).
async fn fail<T>(
    io: &mut MeteredIo<T>,
    buffers: &mut Buffers<'_>,
    ctx: &ConnCtx,
    plan: &mut Plan<'_>,
    error: &ProxyError,
    started: Instant,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let status = error.status().as_u16();
    plan.route.metrics.response(status, started.elapsed());
    if let Some(entry) = plan.entry.as_mut() {
        entry.status = status;
        entry.duration = started.elapsed();
    }
    answer(io, ctx, &mut buffers.response, error, plan.head, plan.close).await
}

/// Writes the proxy's own answer to `error`. The connection closes after it if the client
/// asked (`close`) or the proxy is draining.
async fn answer<T>(
    io: &mut MeteredIo<T>,
    ctx: &ConnCtx,
    out: &mut Vec<u8>,
    error: &ProxyError,
    head: bool,
    close: bool,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let close = close || ctx.shared.drain.is_draining();
    let body = error.local_body();
    out.clear();
    status_line(out, error.status());
    push_date(out);
    let _ = write!(out, "content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n", body.len());
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    match io.write_all(out).await {
        Ok(()) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

/// Answers with the response a filter made; the connection closes after it if the client
/// asked or the proxy is draining.
#[allow(clippy::too_many_arguments)]
async fn respond<T>(
    io: &mut MeteredIo<T>,
    buffers: &mut Buffers<'_>,
    ctx: &ConnCtx,
    plan: &mut Plan<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Next
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let close = plan.close || ctx.shared.drain.is_draining();
    plan.route.metrics.response(status.as_u16(), started.elapsed());
    if let Some(entry) = plan.entry.as_mut() {
        entry.status = status.as_u16();
        entry.duration = started.elapsed();
    }
    let out = &mut buffers.response;
    out.clear();
    status_line(out, status);
    if !headers.contains_key(DATE) {
        push_date(out);
    }
    for (name, value) in headers {
        let framing = *name == CONTENT_LENGTH || *name == TRANSFER_ENCODING;
        if !framing && !HOP_BY_HOP.contains(&name.as_str()) {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    let bodiless =
        status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless && !plan.head {
        out.extend_from_slice(body);
    }
    match io.write_all(out).await {
        Ok(()) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    let reason = status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {} {reason}\r\n", status.as_u16());
}

/// Where a response body ends, tracked as its bytes go by unchanged.
struct Body {
    framing: Framing,
    remaining: u64,
    chunks: Chunks,
}

impl Body {
    fn new(framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self { framing, remaining, chunks: Chunks::default() }
    }

    fn done(&self) -> bool {
        match self.framing {
            Framing::Empty => true,
            Framing::Length(_) => self.remaining == 0,
            Framing::Chunked => self.chunks.done(),
            Framing::Close => false,
        }
    }

    /// How many of `bytes` belong to the body; an error for broken chunked framing.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, ()> {
        match self.framing {
            Framing::Empty => Ok(0),
            Framing::Length(_) => {
                let n = usize::try_from(self.remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                self.remaining -= n as u64;
                Ok(n)
            }
            Framing::Chunked => self.chunks.feed(bytes),
            Framing::Close => Ok(bytes.len()),
        }
    }
}

/// The chunked transfer coding (RFC 9112 §7.1), followed byte by byte only to find
/// its end; the bytes themselves are relayed as they came.
#[derive(Default, Debug, PartialEq, Eq)]
enum Chunks {
    #[default]
    SizeStart,
    Size(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunks {
    fn done(&self) -> bool {
        *self == Chunks::Done
    }

    /// Consumes bytes up to the end of the body; returns how many were part of it.
    fn feed(&mut self, bytes: &[u8]) -> Result<usize, ()> {
        let mut at = 0;
        while at < bytes.len() && !self.done() {
            if let Chunks::Data(left) = *self {
                let n = usize::try_from(left).map_or(bytes.len() - at, |l| l.min(bytes.len() - at));
                at += n;
                let left = left - n as u64;
                *self = if left == 0 { Chunks::DataCr } else { Chunks::Data(left) };
                continue;
            }
            let byte = bytes[at];
            at += 1;
            *self = match (&*self, byte) {
                (Chunks::SizeStart, _) => Chunks::Size(hex(byte).ok_or(())?),
                (Chunks::Size(size), b'\r') => Chunks::SizeLf(*size),
                (Chunks::Size(size), b';' | b' ' | b'\t') => Chunks::Extension(*size),
                (Chunks::Size(size), _) => {
                    let digit = hex(byte).ok_or(())?;
                    Chunks::Size(size.checked_mul(16).and_then(|s| s.checked_add(digit)).ok_or(())?)
                }
                (Chunks::Extension(size), b'\r') => Chunks::SizeLf(*size),
                (Chunks::Extension(_), b'\n') => return Err(()),
                (Chunks::Extension(size), _) => Chunks::Extension(*size),
                (Chunks::SizeLf(0), b'\n') => Chunks::TrailerStart,
                (Chunks::SizeLf(size), b'\n') => Chunks::Data(*size),
                (Chunks::DataCr, b'\r') => Chunks::DataLf,
                (Chunks::DataLf, b'\n') => Chunks::SizeStart,
                (Chunks::TrailerStart, b'\r') => Chunks::EndLf,
                (Chunks::Trailer, b'\r') => Chunks::TrailerLf,
                (Chunks::TrailerStart | Chunks::Trailer, _) => Chunks::Trailer,
                (Chunks::TrailerLf, b'\n') => Chunks::TrailerStart,
                (Chunks::EndLf, b'\n') => Chunks::Done,
                _ => return Err(()),
            };
        }
        Ok(at)
    }
}

fn hex(byte: u8) -> Option<u64> {
    (byte as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_ends_after_the_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\nNEXT";
        let mut chunks = Chunks::default();
        assert_eq!(chunks.feed(body), Ok(body.len() - 4));
        assert!(chunks.done());
    }

    #[test]
    fn chunked_body_split_anywhere_gives_the_same_end() {
        let body = b"a\r\n0123456789\r\n0\r\n\r\n";
        for split in 0..body.len() {
            let mut chunks = Chunks::default();
            let first = chunks.feed(&body[..split]).unwrap();
            assert_eq!(first, split);
            assert_eq!(chunks.feed(&body[split..]), Ok(body.len() - split), "split at {split}");
            assert!(chunks.done());
        }
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        assert!(Chunks::default().feed(b"x\r\n").is_err());
        assert!(Chunks::default().feed(b"5\r\nhelloXX").is_err());
        assert!(Chunks::default().feed(b"ffffffffffffffffff\r\n").is_err());
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_length(b"42"), Some(42));
        assert_eq!(parse_length(b"+42"), None);
        assert_eq!(parse_length(b"4 2"), None);
        assert_eq!(parse_length(b""), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_keep_their_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\ncontent-length: 3\r\nx-kept: 2\r\n\r\nabc";
        let mut out = b"stale".to_vec();
        let head = parse_response(raw, false, &mut out).ok().flatten().unwrap();
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.reusable);
        let lines = String::from_utf8(out).unwrap();
        assert_eq!(lines, "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-kept: 2\r\n");
        assert_eq!(&raw[head.head_len..], b"abc");
        assert!(!head.dated, "the relay adds a date to a response that came without one");
    }

    #[test]
    fn an_upstream_date_is_passed_on_as_it_is() {
        let raw = b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-length: 0\r\n\r\n";
        let mut out = Vec::new();
        let head = parse_response(raw, false, &mut out).ok().flatten().unwrap();
        assert!(head.dated);
        let lines = String::from_utf8(out).unwrap();
        assert!(lines.contains("Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"), "{lines}");
    }

    #[test]
    fn the_request_target_is_read_back_from_the_request_line() {
        assert_eq!(request_target(b"GET /a?b=c HTTP/1.1\r\nhost: x\r\n\r\n"), b"/a?b=c");
        assert_eq!(request_target(b"OPTIONS * HTTP/1.1\r\n\r\n"), b"*");
    }

    #[test]
    fn a_chunked_response_loses_its_content_length() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut out = Vec::new();
        let head = parse_response(raw, false, &mut out).ok().flatten().unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        let lines = String::from_utf8(out).unwrap();
        assert_eq!(lines, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n");
    }

    #[test]
    fn responses_without_length_run_to_close_and_head_has_no_body() {
        let raw = b"HTTP/1.0 200 OK\r\n\r\n";
        let head = parse_response(raw, false, &mut Vec::new()).ok().flatten().unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert!(!head.reusable);
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n";
        let head = parse_response(raw, true, &mut Vec::new()).ok().flatten().unwrap();
        assert_eq!(head.framing, Framing::Empty);
    }
}
