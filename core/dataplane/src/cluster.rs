//! A cluster: its endpoints, their balancer, and a connection pool per endpoint.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::balance::Balancer;
use crate::config::{ClusterConfig, UpstreamProtocol};
use crate::identity::{Identity, MeshConnector};
use crate::metrics::Registry;
use crate::pool::EndpointPool;

pub struct Cluster {
    pub config: ClusterConfig,
    pub balancer: Balancer,
    /// One pool per endpoint, in the balancer's order.
    pools: Vec<Arc<EndpointPool>>,
    /// For `tls: mesh`: how the pools open mTLS connections, swapped when the
    /// identity is reloaded so pools and their open connections survive rotation.
    mesh: Arc<ArcSwapOption<MeshConnector>>,
}

impl Cluster {
    pub fn new(config: ClusterConfig, registry: &Registry) -> Self {
        let metrics = registry.cluster(&config.name);
        let connect_timeout = Duration::from_secs_f64(config.connect_timeout);
        let idle_timeout = Duration::from_secs_f64(config.idle_timeout);
        let mesh = Arc::new(ArcSwapOption::empty());
        let pools = config
            .endpoints
            .iter()
            .map(|address| {
                Arc::new(EndpointPool::new(
                    address.clone(),
                    connect_timeout,
                    idle_timeout,
                    metrics.clone(),
                    mesh.clone(),
                ))
            })
            .collect();
        Self { balancer: Balancer::new(config.lb, &config.endpoints), pools, config, mesh }
    }

    /// The mTLS client configuration a `tls: mesh` cluster connects with.
    pub fn mesh_connector(&self, identity: Option<&Identity>) -> Result<Option<MeshConnector>, String> {
        let Some(tls) = &self.config.tls else { return Ok(None) };
        let identity = identity.ok_or("tls: mesh needs the top-level identity")?;
        identity
            .connector(tls.server_identity.as_deref())
            .map(Some)
            .map_err(|e| format!("server_identity: {e}"))
    }

    /// Makes new connections use `connector`; open connections keep theirs.
    pub fn set_mesh_connector(&self, connector: Option<MeshConnector>) {
        self.mesh.store(connector.map(Arc::new));
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
