//! The HTTP forwarding path: route, rewrite headers, pick an endpoint, stream.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::balance::InFlight;
use crate::body::{BodyTooLarge, RequestBody, ResponseBody};
use crate::drain::DrainGuard;
use crate::io::ConnState;
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
    client_ip: HeaderValue,
    /// This hop's `Forwarded` element (`for` and `proto`), made once per connection.
    forwarded: HeaderValue,
}

impl ConnCtx {
    pub fn new(
        shared: Arc<Shared>,
        key: Arc<str>,
        accepted: Arc<Listener>,
        peer: SocketAddr,
        tls: bool,
        state: Arc<ConnState>,
    ) -> Self {
        let ip = peer.ip();
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
            forwarded: header(format!("for={node};proto={proto}")),
        }
    }

    fn listener(&self) -> Arc<Listener> {
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

pub async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    ctx.state.in_flight.fetch_add(1, Relaxed);
    let _open = OpenRequest(&ctx.state);
    let grpc = is_grpc(req.headers());
    let listener = ctx.listener();
    let Kind::Http { routes, .. } = &listener.kind else {
        return Ok(ProxyError::NotHttp.into_response(grpc));
    };
    let host = request_host(req.uri(), req.headers());
    let path = req.uri().path();
    let Some(route) = routes.iter().find(|r| r.matcher.matches(&host, path, req.method(), req.headers()))
    else {
        let host = host.into_owned();
        return Ok(ProxyError::NoRoute(host).into_response(grpc));
    };
    route.metrics.request();
    let response = match forward(&ctx, &listener, route, req).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(route = %route.name, error = %e, "request failed");
            e.into_response(grpc)
        }
    };
    route.metrics.response(response.status().as_u16(), started.elapsed());
    Ok(response)
}

async fn forward(
    ctx: &ConnCtx,
    listener: &Listener,
    route: &Route,
    mut req: Request<Incoming>,
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
    prepare_request_headers(&mut parts.headers, &parts.uri, ctx, downstream_upgrade.is_some());

    let cluster = &route.cluster;
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
    let mut request = Request::from_parts(parts, RequestBody::new(body, listener.max_body_bytes));

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
                in_flight.observe_latency();
                let downstream_upgrade = downstream_upgrade.map(|u| (u, ctx.shared.drain.guard()));
                return Ok(finish_response(
                    response,
                    in_flight,
                    checkout,
                    downstream_version,
                    downstream_upgrade,
                ));
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

fn prepare_request_headers(headers: &mut HeaderMap, uri: &Uri, ctx: &ConnCtx, upgrading: bool) {
    strip_hop_by_hop(headers, upgrading);
    // HTTP/2 carries the host in the URI; an HTTP/1 upstream needs it as a header.
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = uri.authority() {
            if let Ok(value) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, value);
            }
        }
    }
    let client_ip = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(previous) => {
            let chained = format!("{previous}, {}", ctx.client_ip.to_str().unwrap_or_default());
            HeaderValue::try_from(chained).unwrap_or_else(|_| ctx.client_ip.clone())
        }
        None => ctx.client_ip.clone(),
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
fn request_id() -> HeaderValue {
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
    BadRequest(&'static str),
    TooLarge(u64),
    NoEndpoint(String),
    Connect { cluster: String, endpoint: String, cause: String },
    Upstream { cluster: String, endpoint: String, cause: String },
    Timeout { cluster: String, after: Duration },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRoute(host) => write!(f, "no route for host \"{host}\""),
            Self::NotHttp => write!(f, "listener does not serve HTTP"),
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
        }
    }
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::NotHttp => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoEndpoint(_) | Self::Connect { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
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
            Self::NoEndpoint(_) | Self::Connect { .. } | Self::Upstream { .. } => "14",
        }
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
            .body(ResponseBody::local(format!("meshpy: {message}\n")))
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
    fn request_ids_are_version_4_uuids() {
        let id = request_id();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        assert_ne!(request_id(), request_id());
    }
}
