//! The HTTP forwarding path: route, rewrite headers, pick an endpoint, stream.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::access_log::Entry;
use crate::authz::Denied;
use crate::balance::InFlight;
use crate::body::{read_to_limit, BodyTooLarge, ReadError, RequestBody, ResponseBody};
use crate::cluster::Cluster;
use crate::config::OnError;
use crate::drain::DrainGuard;
use crate::filter::{
    call_request, call_response, FailReason, Failure, FilterChain, LogOnDrop, LogRecord, Phase, RequestHead,
    RequestState, RequestVerdict, ResponseVerdict,
};
use crate::io::ConnState;
use crate::metrics::InboundMetrics;
use crate::pool::{Checkout, SendError};
use crate::proxy::Shared;
use crate::routing::request_host;
use crate::snapshot::{Kind, Listener, Route};

/// What every request on one downstream connection shares.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub key: Arc<str>,
    /// The listener as configured when the connection was accepted, used if a reload
    /// removed it while the connection is still open.
    pub accepted: Arc<Listener>,
    pub tls: bool,
    pub state: Arc<ConnState>,
    /// The client's address as `X-Forwarded-For` carries it, made once per connection.
    pub(crate) client_ip: HeaderValue,
    pub(crate) peer: SocketAddr,
    /// This hop's `Forwarded` element (`for` and `proto`), made once per connection.
    pub(crate) forwarded: HeaderValue,
    /// The caller's SPIFFE ID, on an mTLS connection.
    pub(crate) identity: Option<Arc<str>>,
    /// `x-forwarded-client-cert` for the app, on an mTLS connection.
    pub(crate) xfcc: Option<HeaderValue>,
    /// The per-caller request counter of an mTLS listener.
    pub(crate) inbound: Option<Arc<InboundMetrics>>,
}

impl ConnCtx {
    pub fn new(
        shared: Arc<Shared>,
        key: Arc<str>,
        accepted: Arc<Listener>,
        peer: SocketAddr,
        tls: bool,
        state: Arc<ConnState>,
        identity: Option<Arc<str>>,
    ) -> Self {
        let ip = peer.ip();
        let xfcc = match (&accepted.mtls, &identity) {
            (Some(mtls), Some(id)) => HeaderValue::try_from(format!("By={};URI={id}", mtls.own_id)).ok(),
            _ => None,
        };
        let inbound = accepted.mtls.as_ref().map(|_| {
            let metrics = shared.registry.inbound(&accepted.name, identity.as_deref().unwrap_or_default());
            metrics.connections.fetch_add(1, Relaxed);
            metrics
        });
        let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
        let proto = if tls { "https" } else { "http" };
        let header =
            |text: String| HeaderValue::try_from(text).expect("an IP address is a valid header value");
        Self {
            shared,
            key,
            accepted,
            tls,
            state,
            client_ip: header(ip.to_string()),
            peer,
            forwarded: header(format!("for={node};proto={proto}")),
            identity,
            xfcc,
            inbound,
        }
    }

    pub(crate) fn listener(&self) -> Arc<Listener> {
        let snapshot = self.shared.snapshot.load();
        snapshot.listeners.get(&*self.key).cloned().unwrap_or_else(|| self.accepted.clone())
    }
}

/// Counts a request as open on its connection so idle detection leaves it alone.
struct OpenRequest<'a>(&'a ConnState);

impl Drop for OpenRequest<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

pub async fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // The log is the listener's as the connection was accepted: a reload that turns it
    // on or off applies to new connections.
    let Some(log) = ctx.accepted.access_log.clone() else { return serve(ctx, req, None).await };
    let started = Instant::now();
    // Made here rather than with the other forwarded headers, so the line can carry it.
    if !req.headers().contains_key(&X_REQUEST_ID) {
        req.headers_mut().insert(X_REQUEST_ID.clone(), request_id());
    }
    let mut entry = Entry {
        listener: ctx.accepted.name.clone(),
        method: req.method().to_string(),
        authority: authority(req.uri(), req.headers()).to_owned(),
        path: req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        client: ctx.peer.ip().to_string(),
        identity: ctx.identity.as_deref().map(str::to_owned),
        request_id: req.headers().get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned),
        ..Entry::default()
    };
    let response = serve(ctx, req, Some(&mut entry)).await?;
    entry.status = response.status().as_u16();
    entry.duration = started.elapsed();
    log.write(&entry);
    Ok(response)
}

async fn serve(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
    entry: Option<&mut Entry>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    ctx.state.in_flight.fetch_add(1, Relaxed);
    let _open = OpenRequest(&ctx.state);
    if let Some(inbound) = &ctx.inbound {
        inbound.requests.fetch_add(1, Relaxed);
    }
    let grpc = is_grpc(req.headers());
    let listener = ctx.listener();
    let Kind::Http { routes, .. } = &listener.kind else {
        return Ok(ProxyError::NotHttp.into_response(grpc));
    };
    if let Some(policy) = &listener.authz {
        if let Err(denied) =
            policy.check(ctx.identity.as_deref(), req.method(), req.uri().path(), req.headers())
        {
            return Ok(ProxyError::Denied(denied).into_response(grpc));
        }
    }
    let host = request_host(req.uri(), req.headers());
    let path = req.uri().path();
    let Some(route) = routes.iter().find(|r| r.matcher.matches(&host, path, req.method(), req.headers()))
    else {
        let host = host.into_owned();
        return Ok(ProxyError::NoRoute(host).into_response(grpc));
    };
    route.metrics.request();
    if let Some(entry) = entry {
        entry.route = Some(route.name.to_string());
        entry.cluster = Some(route.cluster.name().to_owned());
    }
    let Some(chain) = &route.filters else {
        let response = match forward(&ctx, &listener, route, req, None).await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "request failed");
                e.into_response(grpc)
            }
        };
        route.metrics.response(response.status().as_u16(), started.elapsed());
        return Ok(response);
    };

    // The request line, for the log hooks of a request refused before the filters saw it.
    let request_line = chain.on_log.then(|| head_of(req.method(), req.uri(), req.headers(), &ctx, route));
    let mut exchanged = Exchanged::default();
    let mut response = match forward(&ctx, &listener, route, req, Some((chain, &mut exchanged))).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(route = %route.name, error = %e, "request failed");
            exchanged.error.get_or_insert_with(|| e.to_string());
            e.into_response(grpc)
        }
    };
    route.metrics.response(response.status().as_u16(), started.elapsed());
    if let Some(line) = request_line {
        let request = exchanged.request.unwrap_or(RequestState::Head(Box::new(line)));
        let record = LogRecord {
            status: response.status().as_u16(),
            duration: Duration::ZERO,
            cluster: exchanged.cluster.unwrap_or_else(|| route.cluster.name().into()),
            error: exchanged.error,
        };
        let log = LogOnDrop::new(ctx.shared.filters.clone(), chain.clone(), request, record, started);
        response = response.map(|body| body.logged(log));
    }
    Ok(response)
}

/// What the filter phases of one request leave for the next ones.
#[derive(Default)]
pub(crate) struct Exchanged {
    request: Option<RequestState>,
    /// A filter's choice of cluster.
    cluster: Option<Arc<str>>,
    /// Why the proxy or a filter answered instead of the upstream.
    error: Option<String>,
}

/// The host the client asked for: the URI's authority (HTTP/2, absolute form) or `Host`.
fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> &'a str {
    match uri.authority() {
        Some(authority) => authority.as_str(),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default(),
    }
}

/// The request line as filters see it; the caller adds the headers (taken or copied).
fn head_of(method: &Method, uri: &Uri, headers: &HeaderMap, ctx: &ConnCtx, route: &Route) -> RequestHead {
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    request_head(method.clone(), authority(uri, headers), path_and_query, HeaderMap::new(), ctx, route)
}

/// The request as the hooks of `route` see it, on either path.
pub(crate) fn request_head(
    method: Method,
    authority: &str,
    path_and_query: &str,
    headers: HeaderMap,
    ctx: &ConnCtx,
    route: &Route,
) -> RequestHead {
    RequestHead {
        method,
        scheme: if ctx.tls { "https" } else { "http" },
        authority: authority.to_owned(),
        path_and_query: path_and_query.to_owned(),
        headers,
        body: None,
        client_addr: ctx.peer.ip().to_string(),
        identity: ctx.identity.clone(),
        route: route.name.clone(),
        cluster: route.cluster.name().into(),
    }
}

/// Where the request phase leaves a request: on its way upstream, or answered.
enum Filtered {
    Forward { parts: http::request::Parts, body: RequestBody, cluster: Option<Arc<Cluster>> },
    Respond(Response<ResponseBody>),
}

/// Runs the route's `on_request` hooks, reading the body first when they asked for it.
async fn request_phase(
    ctx: &ConnCtx,
    listener: &Listener,
    route: &Route,
    chain: &Arc<FilterChain>,
    mut parts: http::request::Parts,
    body: Incoming,
    exchanged: &mut Exchanged,
) -> Result<Filtered, ProxyError> {
    let buffered = match chain.body_limit {
        Some(limit) => {
            let limit = listener.max_body_bytes.map_or(limit, |max| max.min(limit));
            match read_to_limit(body, limit).await {
                Ok(data) => Err(data),
                Err(ReadError::TooLarge(limit)) => return Err(ProxyError::TooLarge(limit)),
                Err(ReadError::Client(e)) => {
                    tracing::debug!(error = %e, "request body could not be read");
                    return Err(ProxyError::BadRequest("request body could not be read"));
                }
            }
        }
        None => Ok(body),
    };
    let fail_open = chain.on_error == OnError::FailOpen;
    // Kept only where a failing filter may be skipped: the request then goes on as it came.
    let original = fail_open.then(|| parts.headers.clone());
    let mut head = head_of(&parts.method, &parts.uri, &parts.headers, ctx, route);
    head.headers = std::mem::take(&mut parts.headers);
    head.body = buffered.as_ref().err().cloned();
    let forward_body = |buffered: Result<Incoming, Bytes>| match buffered {
        Ok(body) => RequestBody::new(body, listener.max_body_bytes),
        Err(data) => RequestBody::buffered(data),
    };
    let failure = match call_request(&ctx.shared.filters, chain, head).await {
        RequestVerdict::Continue { exchange, headers, path_and_query, body, cluster } => {
            exchanged.request = exchange.map(RequestState::Exchange);
            parts.headers = headers;
            if path_and_query != parts.uri.path_and_query().map_or("/", |p| p.as_str()) {
                parts.uri = Uri::try_from(path_and_query)
                    .map_err(|_| ProxyError::BadRequest("a filter set an invalid path"))?;
            }
            let buffered = match (buffered, body) {
                (Err(_), Some(data)) => {
                    if !data.is_empty() || parts.headers.contains_key(header::CONTENT_LENGTH) {
                        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
                    }
                    Err(data)
                }
                (buffered, _) => buffered,
            };
            let cluster = match cluster {
                Some(name) => routed_cluster(ctx, route, chain, name, exchanged)?,
                None => None,
            };
            return Ok(Filtered::Forward { parts, body: forward_body(buffered), cluster });
        }
        RequestVerdict::Respond { status, headers, body } => {
            let mut response = Response::new(ResponseBody::local(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            *response.version_mut() = parts.version;
            return Ok(Filtered::Respond(response));
        }
        RequestVerdict::Failed(failure) => failure,
    };
    let closed = exchanged.failed(failure);
    match original {
        Some(headers) => {
            parts.headers = headers;
            Ok(Filtered::Forward { parts, body: forward_body(buffered), cluster: None })
        }
        None => Err(closed),
    }
}

/// Runs the route's `on_response` hooks on the upstream's response head.
async fn response_phase(
    ctx: &ConnCtx,
    chain: &Arc<FilterChain>,
    response: Response<ResponseBody>,
    exchanged: &mut Exchanged,
) -> Result<Response<ResponseBody>, ProxyError> {
    let Some(request) = exchanged.request.take() else { return Ok(response) };
    let (mut parts, body) = response.into_parts();
    let fail_open = chain.on_error == OnError::FailOpen;
    let original = fail_open.then(|| parts.headers.clone());
    let headers = std::mem::take(&mut parts.headers);
    match call_response(&ctx.shared.filters, chain, request, parts.status, headers).await {
        ResponseVerdict::Continue { exchange, status, headers } => {
            exchanged.request = Some(RequestState::Exchange(exchange));
            parts.status = status;
            parts.headers = headers;
            Ok(Response::from_parts(parts, body))
        }
        ResponseVerdict::Failed(failure) => {
            let closed = exchanged.failed(failure);
            match original {
                Some(headers) => {
                    parts.headers = headers;
                    Ok(Response::from_parts(parts, body))
                }
                None => Err(closed),
            }
        }
    }
}

/// The cluster a filter routed the request to. An unknown name is the filter's failure:
/// a fail-closed route answers 500, a fail-open one (`Ok(None)`) keeps its own cluster.
pub(crate) fn routed_cluster(
    ctx: &ConnCtx,
    route: &Route,
    chain: &FilterChain,
    name: String,
    exchanged: &mut Exchanged,
) -> Result<Option<Arc<Cluster>>, ProxyError> {
    if let Some(cluster) = ctx.shared.snapshot.load().clusters.get(&name) {
        exchanged.cluster = Some(cluster.name().into());
        return Ok(Some(cluster.clone()));
    }
    tracing::warn!(route = %route.name, cluster = %name, "a filter routed to an unknown cluster");
    chain.metrics.failure(Phase::Request, &chain.names, FailReason::Exception);
    let message = format!("filter {} routed to unknown cluster \"{name}\"", chain.names);
    exchanged.error = Some(message.clone());
    match chain.on_error {
        OnError::FailOpen => Ok(None),
        OnError::FailClosed => Err(ProxyError::Filter { status: StatusCode::INTERNAL_SERVER_ERROR, message }),
    }
}

impl Exchanged {
    /// Records a filter failure; returns the answer a fail-closed route gives: 500 for
    /// a filter that raised, 503 for one that could not answer.
    pub(crate) fn failed(&mut self, failure: Failure) -> ProxyError {
        tracing::debug!(error = %failure, "filter failed");
        let message = failure.to_string();
        self.error = Some(message.clone());
        self.request = failure.exchange.map(RequestState::Exchange);
        let status = match failure.reason {
            FailReason::Exception => StatusCode::INTERNAL_SERVER_ERROR,
            FailReason::Timeout | FailReason::Overload => StatusCode::SERVICE_UNAVAILABLE,
        };
        ProxyError::Filter { status, message }
    }
}

async fn forward(
    ctx: &ConnCtx,
    listener: &Listener,
    route: &Route,
    mut req: Request<Incoming>,
    mut filters: Option<(&Arc<FilterChain>, &mut Exchanged)>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if let Some(limit) = listener.max_body_bytes {
        if req.body().size_hint().lower() > limit {
            return Err(ProxyError::TooLarge(limit));
        }
    }
    let downstream_version = req.version();
    let downstream_http2 = downstream_version == Version::HTTP_2;
    let downstream_upgrade =
        (!downstream_http2 && is_upgrade(req.headers())).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_request_headers(&mut parts.headers, parts.uri.authority(), ctx, downstream_upgrade.is_some());

    let (mut parts, body, chosen) = match &mut filters {
        Some((chain, exchanged)) if chain.on_request => {
            // The filter phases are boxed: their states would otherwise make every
            // request's future larger, filtered or not.
            match Box::pin(request_phase(ctx, listener, route, chain, parts, body, exchanged)).await? {
                Filtered::Forward { parts, body, cluster } => (parts, body, cluster),
                Filtered::Respond(response) => return Ok(response),
            }
        }
        _ => (parts, RequestBody::new(body, listener.max_body_bytes), None),
    };
    if let Some((chain, exchanged)) = &mut filters {
        // Later phases without the request phase's object see the request as forwarded.
        if chain.keeps_exchange() && exchanged.request.is_none() {
            let mut head = head_of(&parts.method, &parts.uri, &parts.headers, ctx, route);
            head.headers = parts.headers.clone();
            exchanged.request = Some(RequestState::Head(Box::new(head)));
        }
    }
    let cluster = chosen.as_ref().unwrap_or(&route.cluster);
    let upgrading = downstream_upgrade.is_some();
    let upstream_http2 = !upgrading && cluster.upstream_http2(downstream_http2);
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = if upstream_http2 {
        // HTTP/2 carries the host as :authority; a Host header beside it would conflict.
        let host = parts.headers.remove(header::HOST);
        let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        Uri::try_from(format!("http://{authority}{path_and_query}"))
    } else {
        Uri::try_from(path_and_query)
    }
    .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
    parts.version = if upstream_http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let mut request = Request::from_parts(parts, body);

    // A refused connection means nothing reached the upstream, so the request (body
    // included) can go to another endpoint: one more try, like Envoy's connect-failure retry.
    let mut exclude = None;
    let mut refused: Option<(String, String)> = None;
    for _ in 0..2 {
        let Some((index, in_flight)) = cluster.balancer.pick(exclude) else { break };
        let sending = cluster.pool(index).send(request, upstream_http2, upgrading);
        let result = match route.timeout {
            Some(limit) => tokio::time::timeout(limit, sending)
                .await
                .map_err(|_| ProxyError::Timeout { cluster: cluster.name().to_owned(), after: limit })?,
            None => sending.await,
        };
        let endpoint = in_flight.endpoint().address.clone();
        match result {
            Ok((response, checkout)) => {
                in_flight.observe_latency(Instant::now());
                let downstream_upgrade = downstream_upgrade.map(|u| (u, ctx.shared.drain.guard()));
                let response =
                    finish_response(response, in_flight, checkout, downstream_version, downstream_upgrade);
                return match filters {
                    Some((chain, exchanged))
                        if chain.on_response && response.status() != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        Box::pin(response_phase(ctx, chain, response, exchanged)).await
                    }
                    _ => Ok(response),
                };
            }
            Err(SendError::Connect { cause, request: unsent }) => {
                cluster.balancer.eject(in_flight.endpoint());
                tracing::debug!(cluster = cluster.name(), %endpoint, %cause, "connect failed");
                refused = Some((endpoint, cause));
                request = *unsent;
                exclude = Some(index);
            }
            Err(SendError::Upstream(e)) => {
                if let Some(too_large) = find_cause::<BodyTooLarge>(&e) {
                    return Err(ProxyError::TooLarge(too_large.0));
                }
                return Err(ProxyError::Upstream {
                    cluster: cluster.name().to_owned(),
                    endpoint,
                    cause: chain(&e),
                });
            }
        }
    }
    Err(match refused {
        Some((endpoint, cause)) => {
            ProxyError::Connect { cluster: cluster.name().to_owned(), endpoint, cause }
        }
        None => ProxyError::NoEndpoint(cluster.name().to_owned()),
    })
}

fn finish_response(
    response: Response<Incoming>,
    in_flight: InFlight,
    checkout: Option<Checkout>,
    downstream_version: Version,
    downstream_upgrade: Option<(OnUpgrade, DrainGuard)>,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    // The downstream connection speaks its own version, whatever the upstream spoke.
    parts.version = downstream_version;
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, switching);
    match downstream_upgrade {
        Some((downstream, guard)) if switching => {
            let mut upstream = Response::from_parts(parts, body);
            let upstream_upgrade = hyper::upgrade::on(&mut upstream);
            tokio::spawn(tunnel(downstream, upstream_upgrade, in_flight, guard));
            let (parts, _) = upstream.into_parts();
            Response::from_parts(parts, ResponseBody::local(Bytes::new()))
        }
        _ => Response::from_parts(parts, ResponseBody::upstream(body, in_flight, checkout)),
    }
}

/// Joins the two upgraded connections (WebSocket and friends) byte for byte.
async fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade, in_flight: InFlight, _guard: DrainGuard) {
    let _in_flight = in_flight;
    match tokio::try_join!(downstream, upstream) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!(error = %e, "upgraded tunnel closed with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

static HOP_BY_HOP: [HeaderName; 4] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
];

/// Removes the headers that describe one hop only (RFC 9110 §7.6.1): those listed
/// above, any named in `Connection`, `Upgrade` unless the tunnel is being set up,
/// and `TE` except the `trailers` value gRPC needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    if headers.contains_key(header::CONNECTION) {
        let mut named = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or_default().split(',').map(str::trim) {
                // The usual tokens name nothing beyond what is removed below anyway,
                // so the common request allocates nothing here.
                let usual = ["keep-alive", "close", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t));
                if let (false, Ok(name)) = (usual, HeaderName::from_bytes(token.as_bytes())) {
                    named.push(name);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers")) {
        headers.remove(header::TE);
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// The headers every forwarded request carries; `authority` is the request target's,
/// for an HTTP/2 request that has no `Host`.
pub(crate) fn prepare_request_headers(
    headers: &mut HeaderMap,
    authority: Option<&Authority>,
    ctx: &ConnCtx,
    upgrading: bool,
) {
    strip_hop_by_hop(headers, upgrading);
    // Only this proxy vouches for the caller's certificate: whatever a client sent is dropped.
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(xfcc) = &ctx.xfcc {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), xfcc.clone());
    }
    // HTTP/2 carries the host in the URI; an HTTP/1 upstream needs it as a header.
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = authority {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, value);
            }
        }
    }
    // Every earlier hop's value, in order, then this client's address.
    let client_ip = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut chained = Vec::new();
        for previous in headers.get_all(&X_FORWARDED_FOR) {
            chained.extend_from_slice(previous.as_bytes());
            chained.extend_from_slice(b", ");
        }
        chained.extend_from_slice(ctx.client_ip.as_bytes());
        HeaderValue::from_bytes(&chained).unwrap_or_else(|_| ctx.client_ip.clone())
    } else {
        ctx.client_ip.clone()
    };
    headers.insert(X_FORWARDED_FOR.clone(), client_ip);
    headers.append(header::FORWARDED, ctx.forwarded.clone());
    let proto = if ctx.tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), request_id());
    }
}

/// A random (version 4) UUID.
pub(crate) fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = (fastrand::u128(..) & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let mut text = [b'-'; 36];
    let mut nibble = 32;
    for (i, byte) in text.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *byte = HEX[((bits >> (nibble * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Why the proxy answered a request itself.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute(String),
    NotHttp,
    /// The listener's authorization policy refused the request.
    Denied(Denied),
    BadRequest(&'static str),
    TooLarge(u64),
    NoEndpoint(String),
    Connect {
        cluster: String,
        endpoint: String,
        cause: String,
    },
    Upstream {
        cluster: String,
        endpoint: String,
        cause: String,
    },
    Timeout {
        cluster: String,
        after: Duration,
    },
    /// A filter failed on a fail-closed route.
    Filter {
        status: StatusCode,
        message: String,
    },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRoute(host) => write!(f, "no route for host \"{host}\""),
            Self::NotHttp => write!(f, "listener does not serve HTTP"),
            Self::Denied(Denied::Rule(rule)) => write!(f, "denied by authorization rule \"{rule}\""),
            Self::Denied(Denied::Default) => write!(f, "denied by authorization policy (default deny)"),
            Self::BadRequest(why) => write!(f, "bad request: {why}"),
            Self::TooLarge(limit) => write!(f, "request body larger than {limit} bytes"),
            Self::NoEndpoint(cluster) => write!(f, "no endpoint available in cluster \"{cluster}\""),
            Self::Connect { cluster, endpoint, cause } => {
                write!(f, "upstream connect error: cluster \"{cluster}\" endpoint {endpoint}: {cause}")
            }
            Self::Upstream { cluster, endpoint, cause } => {
                write!(f, "upstream error: cluster \"{cluster}\" endpoint {endpoint}: {cause}")
            }
            Self::Timeout { cluster, after } => {
                write!(f, "upstream timeout: cluster \"{cluster}\" did not respond within {after:?}")
            }
            Self::Filter { message, .. } => f.write_str(message),
        }
    }
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::NotHttp => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Denied(_) => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoEndpoint(_) | Self::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Filter { status, .. } => *status,
        }
    }

    /// gRPC clients get a trailers-only gRPC error instead of a bare HTTP status.
    fn grpc_status(&self) -> &'static str {
        match self {
            Self::NoRoute(_) => "12",
            Self::BadRequest(_) => "3",
            Self::TooLarge(_) => "8",
            Self::Timeout { .. } => "4",
            Self::NotHttp => "13",
            Self::Denied(_) => "7",
            Self::Filter { status, .. } if *status == StatusCode::INTERNAL_SERVER_ERROR => "13",
            Self::Filter { .. } => "14",
            Self::NoEndpoint(_) | Self::Connect { .. } | Self::Upstream { .. } => "14",
        }
    }

    /// The plain-text body of the proxy's own answer.
    pub(crate) fn local_body(&self) -> String {
        format!("meshpy: {self}\n")
    }

    pub fn into_response(self, grpc: bool) -> Response<ResponseBody> {
        let message = self.to_string();
        let mut builder = Response::builder();
        if grpc {
            builder = builder
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", self.grpc_status())
                .header("grpc-message", percent_encode(&message));
            return builder.body(ResponseBody::local(Bytes::new())).expect("valid response parts");
        }
        builder
            .status(self.status())
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(ResponseBody::local(self.local_body()))
            .expect("valid response parts")
    }
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_connection_tokens_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert(header::TE, "gzip".parse().unwrap());
        headers.insert(header::UPGRADE, "h2c".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn te_trailers_and_upgrade_survive_when_needed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::TE], "trailers");
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn a_requests_future_holds_no_connect_or_filter_states() {
        fn future_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // hyper moves it whole into every HTTP/2 stream's task, and each request in flight
        // holds one. With a new connection's and the filter phases' states inline it was 12 KB.
        let request = future_size(handle);
        assert!(request <= 6144, "a request's future is {request} bytes");
    }

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(request_id(), request_id());
    }
}
