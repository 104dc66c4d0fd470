//! meshpy's data plane: a sidecar proxy for HTTP/1.1, HTTP/2, gRPC, WebSocket and
//! TCP, configured by a JSON snapshot and reloaded atomically. Nothing here knows
//! about Python; the binding crate wraps [`Proxy`].

mod access_log;
mod admin;
mod authz;
mod balance;
mod body;
mod cluster;
pub mod config;
mod date;
mod drain;
mod executor;
pub mod filter;
mod http1;
mod http_proxy;
mod identity;
mod io;
mod listener;
mod logging;
mod metrics;
mod pool;
mod proxy;
mod routing;
mod snapshot;
mod tcp_proxy;
mod tls;

pub use config::Config;
pub use logging::init_logging;
pub use proxy::Proxy;

/// What the core can refuse: a config it cannot build, or a socket it cannot bind.
#[derive(Debug)]
pub enum Error {
    Config(String),
    Listen(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(message) | Self::Listen(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}
