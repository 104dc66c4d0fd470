//! One immutable, versioned view of the whole configuration, swapped atomically.
//!
//! Requests take the snapshot current when they start and finish on it; clusters
//! whose config did not change are carried over so their pools and latency
//! estimates survive a reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;

use crate::access_log::AccessLog;
use crate::authz::Policy;
use crate::cluster::Cluster;
use crate::config::{Config, ListenerConfig, MtlsMode, Protocol, UpstreamProtocol};
use crate::executor::BoxingExecutor;
use crate::filter::{ChainHandle, FilterChain};
use crate::identity::{Identity, SpiffeId};
use crate::metrics::{ListenerMetrics, Registry, RouteMetrics};
use crate::routing::Matcher;
use crate::tls;
use crate::Error;

pub struct Route {
    pub name: Arc<str>,
    pub matcher: Matcher,
    pub cluster: Arc<Cluster>,
    pub timeout: Option<Duration>,
    pub metrics: Arc<RouteMetrics>,
    pub filters: Option<Arc<FilterChain>>,
    /// The HTTP/1.1 fast path can run the filters: request hooks only, and no cluster
    /// a filter may route to speaks HTTP/2.
    pub fast_filters: bool,
}

pub enum Kind {
    Http { routes: Vec<Route>, server: Box<HttpServer> },
    Tcp { cluster: Arc<Cluster> },
    Admin,
}

pub struct Listener {
    pub name: String,
    pub listen: String,
    pub kind: Kind,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub mtls: Option<Mtls>,
    /// Checked once per request before routing; `None`: no policy, nothing to do.
    pub authz: Option<Policy>,
    /// Where this listener's JSON access log lines go, if anywhere.
    pub access_log: Option<Arc<AccessLog>>,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub metrics: Arc<ListenerMetrics>,
}

/// An inbound listener's mutual TLS: the mode and this sidecar's identity.
pub struct Mtls {
    pub mode: MtlsMode,
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// This sidecar's SPIFFE ID, the `By` of `x-forwarded-client-cert`.
    pub own_id: SpiffeId,
}

impl Listener {
    /// The key under which the accept loop finds this listener in every snapshot: its
    /// address, so a renamed listener keeps its socket; port 0 is per name.
    pub fn key(name: &str, listen: &str) -> String {
        match listen.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => listen.to_owned(),
            _ => format!("{name}@{listen}"),
        }
    }
}

pub struct Snapshot {
    pub version: u64,
    pub config: Config,
    /// By [`Listener::key`].
    pub listeners: HashMap<String, Arc<Listener>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
}

pub const ADMIN_LISTENER: &str = "admin";

impl Snapshot {
    /// `chains` holds the filter runner's object for every `filters.chain` the config names.
    pub fn build(
        config: Config,
        version: u64,
        previous: Option<&Snapshot>,
        registry: &Registry,
        chains: &HashMap<u64, ChainHandle>,
    ) -> Result<Self, Error> {
        // Read from its files on every build, so a reload picks up a rotated certificate.
        let identity = config.identity.as_ref().map(Identity::load).transpose().map_err(Error::Config)?;
        let mut clusters = HashMap::new();
        for c in &config.clusters {
            let reused =
                previous.and_then(|p| p.clusters.get(&c.name)).filter(|old| old.config == *c).cloned();
            let cluster = reused.unwrap_or_else(|| Arc::new(Cluster::new(c.clone(), registry)));
            clusters.insert(c.name.clone(), cluster);
        }
        let mut connectors = Vec::new();
        for (i, c) in config.clusters.iter().enumerate() {
            let connector = clusters[&c.name]
                .mesh_connector(identity.as_ref())
                .map_err(|e| Error::Config(format!("clusters[{i}].{e}")))?;
            connectors.push((c.name.clone(), connector));
        }
        let lookup = |name: &str, at: &str| {
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Config(format!("{at}: unknown cluster {name:?}")))
        };

        let no_http2_cluster = config.clusters.iter().all(|c| c.protocol != UpstreamProtocol::Http2);
        let mut listeners = HashMap::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            let kind = match l.protocol {
                Protocol::Tcp => {
                    let name = l
                        .cluster
                        .as_deref()
                        .ok_or_else(|| Error::Config(format!("{at}.cluster: required for tcp")))?;
                    Kind::Tcp { cluster: lookup(name, &format!("{at}.cluster"))? }
                }
                Protocol::Http => {
                    let mut routes = Vec::with_capacity(l.routes.len());
                    for (j, r) in l.routes.iter().enumerate() {
                        let at = format!("{at}.routes[{j}]");
                        let cluster = lookup(&r.cluster, &format!("{at}.cluster"))?;
                        let filters = match &r.filters {
                            Some(f) => {
                                let handle = chains.get(&f.chain).cloned().ok_or_else(|| {
                                    Error::Config(format!(
                                        "{at}.filters: filter chain {} was not provided",
                                        f.chain
                                    ))
                                })?;
                                Some(Arc::new(FilterChain::new(
                                    f,
                                    handle,
                                    registry.filters(&l.name, &r.name),
                                )))
                            }
                            None => None,
                        };
                        routes.push(Route {
                            matcher: Matcher::compile(&r.matches, &at)?,
                            metrics: registry.route(&l.name, &r.name, cluster.name()),
                            timeout: r.timeout.map(Duration::from_secs_f64),
                            name: r.name.as_str().into(),
                            cluster,
                            fast_filters: no_http2_cluster
                                && filters.as_ref().is_some_and(|chain| chain.request_only()),
                            filters,
                        });
                    }
                    Kind::Http { routes, server: Box::new(HttpServer::new(l)) }
                }
            };
            let tls = match &l.tls {
                Some(t) => {
                    Some(tls::server_acceptor(t).map_err(|e| Error::Config(format!("{at}.tls: {e}")))?)
                }
                None => None,
            };
            let mtls = match (l.mtls, &identity) {
                (None, _) => None,
                (Some(_), _) if tls.is_some() => {
                    return Err(Error::Config(format!("{at}.mtls: cannot be combined with tls")))
                }
                (Some(_), None) => {
                    return Err(Error::Config(format!("{at}.mtls: needs the top-level identity")))
                }
                (Some(mode), Some(identity)) => {
                    Some(Mtls { mode, acceptor: identity.acceptor.clone(), own_id: identity.id.clone() })
                }
            };
            let authz = match (&l.authz, l.protocol) {
                (None, _) => None,
                (Some(a), protocol) => {
                    if let (Protocol::Tcp, Err(i)) = (protocol, Policy::only_from(a)) {
                        return Err(Error::Config(format!(
                            "{at}.authz.rules[{i}]: only `from` applies on a tcp listener"
                        )));
                    }
                    Some(Policy::compile(a, &l.name, registry, &format!("{at}.authz"))?)
                }
            };
            let access_log = match &l.access_log {
                Some(target) => Some(Arc::new(
                    AccessLog::open(target).map_err(|e| Error::Config(format!("{at}.access_log: {e}")))?,
                )),
                None => None,
            };
            let listener = Listener {
                name: l.name.clone(),
                listen: l.listen.clone(),
                kind,
                tls,
                mtls,
                authz,
                access_log,
                max_body_bytes: l.limits.max_body_bytes,
                header_read_timeout: Duration::from_secs_f64(l.limits.header_read_timeout),
                idle_timeout: Duration::from_secs_f64(l.limits.idle_timeout),
                metrics: registry.listener(&l.name),
            };
            if listeners.insert(Listener::key(&l.name, &l.listen), Arc::new(listener)).is_some() {
                return Err(Error::Config(format!("{at}.listen: address {} used twice", l.listen)));
            }
        }
        if let Some(admin) = &config.admin {
            let listener = Listener {
                name: ADMIN_LISTENER.to_owned(),
                listen: admin.listen.clone(),
                kind: Kind::Admin,
                tls: None,
                mtls: None,
                authz: None,
                access_log: None,
                max_body_bytes: Some(0),
                header_read_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                metrics: registry.listener(ADMIN_LISTENER),
            };
            if listeners.insert(Listener::key(ADMIN_LISTENER, &admin.listen), Arc::new(listener)).is_some() {
                return Err(Error::Config(format!(
                    "admin.listen: address {} already used by a listener",
                    admin.listen
                )));
            }
        }
        // Last, once nothing can fail: reused clusters switch to the (re)loaded identity.
        for (name, connector) in connectors {
            clusters[&name].set_mesh_connector(connector);
        }
        Ok(Self { version, config, listeners, clusters })
    }
}

/// Per-listener HTTP settings for both protocol versions; which one serves a
/// connection is decided by ALPN or by the HTTP/2 connection preface.
pub struct HttpServer {
    pub http1: http1::Builder,
    pub http2: http2::Builder<BoxingExecutor>,
    /// The request head limits, which the HTTP/1.1 fast path leaves to hyper to enforce.
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl HttpServer {
    fn new(l: &ListenerConfig) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .max_headers(l.limits.max_headers)
            .max_header_size(l.limits.max_header_bytes)
            .header_read_timeout(Duration::from_secs_f64(l.limits.header_read_timeout));
        let mut h2 = http2::Builder::new(BoxingExecutor);
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(l.limits.max_header_bytes).unwrap_or(u32::MAX))
            .adaptive_window(true)
            .max_concurrent_streams(1024);
        Self {
            http1: h1,
            http2: h2,
            max_header_bytes: l.limits.max_header_bytes,
            max_headers: l.limits.max_headers,
        }
    }
}
