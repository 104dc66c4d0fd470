//! A cluster: its endpoints, their balancer, and a connection pool per endpoint.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::Balancer;
use crate::config::{ClusterConfig, UpstreamProtocol};
use crate::metrics::Registry;
use crate::pool::EndpointPool;

pub struct Cluster {
    pub config: ClusterConfig,
    pub balancer: Balancer,
    /// One pool per endpoint, in the balancer's order.
    pools: Vec<Arc<EndpointPool>>,
}

impl Cluster {
    pub fn new(config: ClusterConfig, registry: &Registry) -> Self {
        let metrics = registry.cluster(&config.name);
        let connect_timeout = Duration::from_secs_f64(config.connect_timeout);
        let idle_timeout = Duration::from_secs_f64(config.idle_timeout);
        let pools = config
            .endpoints
            .iter()
            .map(|address| {
                Arc::new(EndpointPool::new(address.clone(), connect_timeout, idle_timeout, metrics.clone()))
            })
            .collect();
        Self { balancer: Balancer::new(config.lb, &config.endpoints), pools, config }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn pool(&self, endpoint: usize) -> &Arc<EndpointPool> {
        &self.pools[endpoint]
    }

    /// Whether a request that arrived as HTTP/2 (`true`) or HTTP/1 goes upstream as HTTP/2.
    pub fn upstream_http2(&self, downstream_http2: bool) -> bool {
        match self.config.protocol {
            UpstreamProtocol::Auto => downstream_http2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        }
    }
}
