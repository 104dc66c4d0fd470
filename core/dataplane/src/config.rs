//! The normalized configuration handed over by the Python layer.
//!
//! Python validates the user's YAML (field paths, defaults, units) and passes this
//! shape as JSON: durations in seconds, sizes in bytes, every key present. The core
//! re-checks only what Python cannot know (Rust regex syntax, TLS files, sockets).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub admin: Option<AdminConfig>,
    /// This sidecar's mesh identity, for `mtls` listeners and `tls: mesh` clusters.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminConfig {
    pub listen: String,
}

/// The workload's certificate (its URI SAN is its SPIFFE ID), key, and the trust
/// bundle peers' certificates must chain to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityConfig {
    pub cert: String,
    pub key: String,
    pub bundle: String,
    pub min_tls: MinTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MinTls {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// How a listener treats connections that are not mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Only mTLS with a client certificate chaining to the bundle.
    Strict,
    /// mTLS, or plaintext on the same port (told apart by the first byte).
    Permissive,
}

/// Originate mTLS to the cluster's endpoints with this sidecar's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamTls {
    /// The SPIFFE ID the upstream must present; `None`: any ID of our trust domain.
    pub server_identity: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: String,
    pub protocol: Protocol,
    /// The destination of a `tcp` listener.
    pub cluster: Option<String>,
    pub tls: Option<TlsServerConfig>,
    #[serde(default)]
    pub mtls: Option<MtlsMode>,
    pub limits: Limits,
    pub routes: Vec<RouteConfig>,
    /// The listener's authorization policy; `None`: every request is allowed.
    #[serde(default)]
    pub authz: Option<AuthzConfig>,
    /// `stderr` or a file path for JSON access log lines; `None`: no access log.
    #[serde(default)]
    pub access_log: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// Deny rules win over allow rules; with neither matching, `default` applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthzConfig {
    pub default: AuthzAction,
    pub rules: Vec<AuthzRuleConfig>,
}

/// Every non-empty condition must hold; within one, any item may match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthzRuleConfig {
    pub name: String,
    pub action: AuthzAction,
    /// SPIFFE IDs, or prefixes of them ending in `/*`.
    pub from: Vec<String>,
    /// Exact paths, or prefixes ending in `*`.
    pub paths: Vec<String>,
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatchConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsServerConfig {
    pub cert: String,
    pub key: String,
    /// Let clients resume sessions (TLS 1.3 tickets, TLS 1.2 session IDs) from an
    /// in-memory cache; off, every connection is a full handshake.
    pub session_resumption: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: Option<u64>,
    pub header_read_timeout: f64,
    pub idle_timeout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: MatchConfig,
    pub cluster: String,
    pub timeout: Option<f64>,
    pub filters: Option<FilterChainConfig>,
}

/// A route's Python filters, as the data plane needs to know them: which phases have
/// hooks, the body they want, their budget. The filter objects themselves are handed
/// to the core beside the config, keyed by `chain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterChainConfig {
    pub chain: u64,
    /// The filters' import paths, in order.
    pub names: Vec<String>,
    pub on_request: bool,
    pub on_response: bool,
    pub on_log: bool,
    /// Buffer the request body up to this many bytes for `on_request`; over it, 413.
    pub body_limit: Option<u64>,
    /// Seconds one phase may take, queueing included.
    pub timeout: f64,
    pub on_error: OnError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Answer 500 (the filter raised) or 503 (it timed out or could not run).
    FailClosed,
    /// Carry on as if the failing filter were not there.
    FailOpen,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchConfig {
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatchConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderMatchConfig {
    pub name: String,
    pub exact: Option<String>,
    pub regex: Option<String>,
    pub present: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    P2cEwma,
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// Speak to the upstream in the HTTP version the downstream client used.
    Auto,
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub name: String,
    pub endpoints: Vec<String>,
    pub lb: LbPolicy,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: f64,
    pub idle_timeout: f64,
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

impl Config {
    pub fn from_json(text: &str) -> Result<Self, crate::Error> {
        serde_json::from_str(text).map_err(|e| crate::Error::Config(format!("invalid core config: {e}")))
    }
}
