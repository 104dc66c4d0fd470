//! Prometheus metrics, named as Linkerd names them so existing dashboards apply.
//!
//! Every series the hot path touches is a pre-allocated atomic reached through an
//! `Arc` held by the route, cluster or listener: no map lookup or lock per request.
//! Series are keyed by name in the registry so they survive config reloads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::filter::{FailReason, Phase};

/// Upper bounds of the latency buckets, in milliseconds (Linkerd's buckets).
const LATENCY_BUCKETS_MS: [u64; 25] = [
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000, 10000, 20000,
    30000, 40000, 50000,
];

const MIN_STATUS: u16 = 100;
const STATUS_SLOTS: usize = 500;

/// A latency histogram over [`LATENCY_BUCKETS_MS`].
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_us: AtomicU64::new(0) }
    }

    fn observe(&self, latency: Duration) {
        let ms = latency.as_millis() as u64;
        let bucket = LATENCY_BUCKETS_MS.partition_point(|&bound| bound < ms);
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = LATENCY_BUCKETS_MS.get(i).map_or("+Inf".to_owned(), u64::to_string);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum_ms = self.sum_us.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum_ms}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

pub struct RouteMetrics {
    requests: AtomicU64,
    responses: Box<[AtomicU64]>,
    latency: Histogram,
}

impl RouteMetrics {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            responses: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::new(),
        }
    }

    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn response(&self, status: u16, latency: Duration) {
        let slot = usize::from(status.saturating_sub(MIN_STATUS)).min(STATUS_SLOTS - 1);
        self.responses[slot].fetch_add(1, Relaxed);
        self.latency.observe(latency);
    }
}

const PHASES: [Phase; 3] = [Phase::Request, Phase::Response, Phase::Log];

/// Calls into a route's filter chain: counts and latency per phase on the hot path,
/// failures (rare) in a locked map keyed by phase, filter and reason.
pub struct FilterMetrics {
    calls: [AtomicU64; 3],
    latency: [Histogram; 3],
    failures: Mutex<BTreeMap<(&'static str, String, &'static str), u64>>,
}

impl FilterMetrics {
    fn new() -> Self {
        Self {
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| Histogram::new()),
            failures: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn call(&self, phase: Phase) {
        self.calls[phase as usize].fetch_add(1, Relaxed);
    }

    pub fn latency(&self, phase: Phase, latency: Duration) {
        self.latency[phase as usize].observe(latency);
    }

    pub fn failure(&self, phase: Phase, filter: &str, reason: FailReason) {
        let key = (phase.as_str(), filter.to_owned(), reason.as_str());
        *self.failures.lock().unwrap().entry(key).or_default() += 1;
    }
}

#[derive(Default)]
pub struct ClusterMetrics {
    pub connections_open: AtomicI64,
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
}

#[derive(Default)]
pub struct ListenerMetrics {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

/// Requests and connections on an mTLS listener by the caller's SPIFFE ID (empty for
/// plaintext on a permissive listener), resolved once per connection.
#[derive(Default)]
pub struct InboundMetrics {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
}

/// Authorization decisions of one listener's rule (or its default action).
#[derive(Default)]
pub struct AuthzMetrics {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

#[derive(Default)]
struct Series {
    routes: BTreeMap<(String, String, String), Arc<RouteMetrics>>,
    filters: BTreeMap<(String, String), Arc<FilterMetrics>>,
    clusters: BTreeMap<String, Arc<ClusterMetrics>>,
    listeners: BTreeMap<String, Arc<ListenerMetrics>>,
    inbound: BTreeMap<(String, String), Arc<InboundMetrics>>,
    authz: BTreeMap<(String, String), Arc<AuthzMetrics>>,
}

#[derive(Default)]
pub struct Registry {
    series: Mutex<Series>,
    pub config_version: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl Registry {
    pub fn route(&self, listener: &str, route: &str, cluster: &str) -> Arc<RouteMetrics> {
        let key = (listener.to_owned(), route.to_owned(), cluster.to_owned());
        let mut series = self.series.lock().unwrap();
        series.routes.entry(key).or_insert_with(|| Arc::new(RouteMetrics::new())).clone()
    }

    pub fn filters(&self, listener: &str, route: &str) -> Arc<FilterMetrics> {
        let key = (listener.to_owned(), route.to_owned());
        let mut series = self.series.lock().unwrap();
        series.filters.entry(key).or_insert_with(|| Arc::new(FilterMetrics::new())).clone()
    }

    pub fn cluster(&self, name: &str) -> Arc<ClusterMetrics> {
        let mut series = self.series.lock().unwrap();
        series.clusters.entry(name.to_owned()).or_default().clone()
    }

    pub fn listener(&self, name: &str) -> Arc<ListenerMetrics> {
        let mut series = self.series.lock().unwrap();
        series.listeners.entry(name.to_owned()).or_default().clone()
    }

    pub fn inbound(&self, listener: &str, client_id: &str) -> Arc<InboundMetrics> {
        let key = (listener.to_owned(), client_id.to_owned());
        let mut series = self.series.lock().unwrap();
        series.inbound.entry(key).or_default().clone()
    }

    pub fn authz(&self, listener: &str, rule: &str) -> Arc<AuthzMetrics> {
        let key = (listener.to_owned(), rule.to_owned());
        let mut series = self.series.lock().unwrap();
        series.authz.entry(key).or_default().clone()
    }

    /// Renders every series in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let series = self.series.lock().unwrap();
        let mut out = String::with_capacity(8192);
        render_routes(&mut out, &series.routes);
        render_filters(&mut out, &series.filters);
        render_clusters(&mut out, &series.clusters);
        render_listeners(&mut out, &series.listeners);
        render_inbound(&mut out, &series.inbound);
        render_authz(&mut out, &series.authz);
        header(&mut out, "config_version", "gauge", "Version of the active configuration.");
        let _ = writeln!(out, "config_version {}", self.config_version.load(Relaxed));
        header(&mut out, "config_reload_total", "counter", "Configuration reloads by result.");
        let _ = writeln!(out, "config_reload_total{{result=\"success\"}} {}", self.reloads_ok.load(Relaxed));
        let _ =
            writeln!(out, "config_reload_total{{result=\"failure\"}} {}", self.reloads_failed.load(Relaxed));
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value per the exposition format.
fn esc(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_routes(out: &mut String, routes: &BTreeMap<(String, String, String), Arc<RouteMetrics>>) {
    let labels = |(l, r, c): &(String, String, String)| {
        format!("listener=\"{}\",route=\"{}\",cluster=\"{}\"", esc(l), esc(r), esc(c))
    };
    header(out, "request_total", "counter", "HTTP requests received, by route.");
    for (key, m) in routes {
        let _ = writeln!(out, "request_total{{{}}} {}", labels(key), m.requests.load(Relaxed));
    }
    header(out, "response_total", "counter", "HTTP responses sent, by route and status code.");
    for (key, m) in routes {
        for (slot, count) in m.responses.iter().enumerate() {
            let count = count.load(Relaxed);
            if count == 0 {
                continue;
            }
            let status = slot as u16 + MIN_STATUS;
            let class = if status >= 500 { "failure" } else { "success" };
            let _ = writeln!(
                out,
                "response_total{{{},status_code=\"{status}\",classification=\"{class}\"}} {count}",
                labels(key)
            );
        }
    }
    header(
        out,
        "response_latency_ms",
        "histogram",
        "Time from receiving a request to sending the response headers, in milliseconds.",
    );
    for (key, m) in routes {
        m.latency.render(out, "response_latency_ms", &labels(key));
    }
}

fn render_filters(out: &mut String, filters: &BTreeMap<(String, String), Arc<FilterMetrics>>) {
    let labels = |(l, r): &(String, String), phase: Phase| {
        format!("listener=\"{}\",route=\"{}\",phase=\"{}\"", esc(l), esc(r), phase.as_str())
    };
    header(out, "filter_calls_total", "counter", "Calls into a route's Python filters, by phase.");
    for (key, m) in filters {
        for phase in PHASES {
            let count = m.calls[phase as usize].load(Relaxed);
            if count > 0 {
                let _ = writeln!(out, "filter_calls_total{{{}}} {count}", labels(key, phase));
            }
        }
    }
    header(
        out,
        "filter_errors_total",
        "counter",
        "Filter calls that raised, ran out of time, or found the filter queue full.",
    );
    for (key, m) in filters {
        for ((phase, filter, reason), count) in m.failures.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "filter_errors_total{{listener=\"{}\",route=\"{}\",phase=\"{phase}\",filter=\"{}\",reason=\"{reason}\"}} {count}",
                esc(&key.0),
                esc(&key.1),
                esc(filter)
            );
        }
    }
    header(
        out,
        "filter_latency_ms",
        "histogram",
        "Time a request waited for its filters in one phase, queueing included, in milliseconds.",
    );
    for (key, m) in filters {
        for phase in [Phase::Request, Phase::Response] {
            if m.calls[phase as usize].load(Relaxed) > 0 {
                m.latency[phase as usize].render(out, "filter_latency_ms", &labels(key, phase));
            }
        }
    }
}

fn render_clusters(out: &mut String, clusters: &BTreeMap<String, Arc<ClusterMetrics>>) {
    header(out, "upstream_connections_open", "gauge", "Open connections to upstream endpoints.");
    for (name, m) in clusters {
        let _ = writeln!(
            out,
            "upstream_connections_open{{cluster=\"{}\"}} {}",
            esc(name),
            m.connections_open.load(Relaxed)
        );
    }
    header(out, "upstream_connect_total", "counter", "Connections opened to upstream endpoints.");
    for (name, m) in clusters {
        let _ =
            writeln!(out, "upstream_connect_total{{cluster=\"{}\"}} {}", esc(name), m.connects.load(Relaxed));
    }
    header(out, "upstream_connect_errors_total", "counter", "Failed upstream connection attempts.");
    for (name, m) in clusters {
        let _ = writeln!(
            out,
            "upstream_connect_errors_total{{cluster=\"{}\"}} {}",
            esc(name),
            m.connect_errors.load(Relaxed)
        );
    }
}

/// A listener series: name, type, help text, and how to read it.
type ListenerRow = (&'static str, &'static str, &'static str, fn(&ListenerMetrics) -> u64);

fn render_listeners(out: &mut String, listeners: &BTreeMap<String, Arc<ListenerMetrics>>) {
    let rows: [ListenerRow; 5] = [
        ("tcp_open_total", "counter", "Downstream connections accepted.", |m| m.opened.load(Relaxed)),
        ("tcp_close_total", "counter", "Downstream connections closed.", |m| m.closed.load(Relaxed)),
        ("tcp_open_connections", "gauge", "Downstream connections open now.", |m| {
            m.opened.load(Relaxed).saturating_sub(m.closed.load(Relaxed))
        }),
        ("tcp_read_bytes_total", "counter", "Bytes read from downstream clients.", |m| {
            m.read_bytes.load(Relaxed)
        }),
        ("tcp_write_bytes_total", "counter", "Bytes written to downstream clients.", |m| {
            m.write_bytes.load(Relaxed)
        }),
    ];
    for (name, kind, help, value) in rows {
        header(out, name, kind, help);
        for (listener, m) in listeners {
            let _ = writeln!(out, "{name}{{listener=\"{}\"}} {}", esc(listener), value(m));
        }
    }
}

fn render_inbound(out: &mut String, inbound: &BTreeMap<(String, String), Arc<InboundMetrics>>) {
    type Row = (&'static str, &'static str, fn(&InboundMetrics) -> u64);
    let rows: [Row; 2] = [
        ("inbound_requests_total", "HTTP requests on mTLS listeners, by the caller's SPIFFE ID.", |m| {
            m.requests.load(Relaxed)
        }),
        (
            "inbound_connections_total",
            "Connections accepted by mTLS listeners, by the caller's SPIFFE ID.",
            |m| m.connections.load(Relaxed),
        ),
    ];
    for (name, help, value) in rows {
        header(out, name, "counter", help);
        for ((listener, client_id), m) in inbound {
            let _ = writeln!(
                out,
                "{name}{{listener=\"{}\",client_id=\"{}\"}} {}",
                esc(listener),
                esc(client_id),
                value(m)
            );
        }
    }
}

fn render_authz(out: &mut String, authz: &BTreeMap<(String, String), Arc<AuthzMetrics>>) {
    type Row = (&'static str, &'static str, fn(&AuthzMetrics) -> u64);
    let rows: [Row; 2] = [
        ("authz_allow_total", "Requests allowed by an authorization rule or the default action.", |m| {
            m.allowed.load(Relaxed)
        }),
        ("authz_deny_total", "Requests denied by an authorization rule or the default action.", |m| {
            m.denied.load(Relaxed)
        }),
    ];
    for (name, help, value) in rows {
        header(out, name, "counter", help);
        for ((listener, rule), m) in authz {
            let _ =
                writeln!(out, "{name}{{listener=\"{}\",rule=\"{}\"}} {}", esc(listener), esc(rule), value(m));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_first_bucket_at_or_above_it() {
        let registry = Registry::default();
        let route = registry.route("edge", "api", "backend");
        route.request();
        route.response(200, Duration::from_millis(3));
        route.response(503, Duration::from_secs(100));
        let text = registry.render();
        assert!(text.contains("request_total{listener=\"edge\",route=\"api\",cluster=\"backend\"} 1"));
        assert!(text.contains("status_code=\"200\",classification=\"success\"} 1"));
        assert!(text.contains("status_code=\"503\",classification=\"failure\"} 1"));
        assert!(text.contains("cluster=\"backend\",le=\"2\"} 0"));
        assert!(text.contains("cluster=\"backend\",le=\"3\"} 1"));
        assert!(text.contains("cluster=\"backend\",le=\"50000\"} 1"));
        assert!(text.contains("cluster=\"backend\",le=\"+Inf\"} 2"));
    }

    #[test]
    fn series_are_shared_by_name_across_reloads() {
        let registry = Registry::default();
        let first = registry.cluster("payments");
        first.connects.fetch_add(1, Relaxed);
        assert_eq!(registry.cluster("payments").connects.load(Relaxed), 1);
    }
}
