//! `healthCheckNodePort`, exactly as kube-proxy serves it (`pkg/proxy/healthcheck`): for each
//! `type: LoadBalancer` Service with `externalTrafficPolicy: Local`, an HTTP server on its
//! health-check port, on every address, answering any path with `200` while the Service has
//! ready endpoints on this node and the proxy is healthy, `503` otherwise, and kube-proxy's JSON
//! body. Cloud load balancers probe it to send external traffic only to nodes with local pods.
//!
//! [`desired`] is pure (store → ports and local endpoint counts), and [`update_desired`] keeps
//! one up to date from the Services that changed; [`HealthCheckServers`] opens and closes the
//! servers to match, in both proxy modes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::oneshot;

use crate::model::{Service, ServiceKey};
use crate::planner::{skip_reason, PlanConfig};
use crate::state::AgentState;
use crate::store::Store;

/// One Service's health check: its port and ready endpoints on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// Distinct addresses of ready endpoints on this node (an endpoint serving two ports
    /// counts once, as in kube-proxy's `LocalReadyEndpoints`).
    pub local_endpoints: usize,
}

/// The health checks this node serves: every Service of ours with a `healthCheckNodePort`.
pub fn desired(
    store: &Store,
    node_name: &str,
    config: &PlanConfig,
) -> BTreeMap<ServiceKey, HealthCheck> {
    store
        .services()
        .filter_map(|service| {
            let check = check_of(store, service, node_name, config)?;
            Some((service.key.clone(), check))
        })
        .collect()
}

/// Brings `desired`, a [`desired`] of an earlier state of `store`, up to date by looking
/// again only at the `changed` Services: the caller names every Service whose object or
/// EndpointSlices changed since (the keys the store's upserts and removals return). Every
/// other entry depends only on its own Service and slices, so it stays as it was; a sync of
/// one Service costs one lookup, not a walk of every Service.
pub fn update_desired<'a>(
    desired: &mut BTreeMap<ServiceKey, HealthCheck>,
    store: &Store,
    changed: impl IntoIterator<Item = &'a ServiceKey>,
    node_name: &str,
    config: &PlanConfig,
) {
    for key in changed {
        match store
            .service(key)
            .and_then(|service| check_of(store, service, node_name, config))
        {
            Some(check) => {
                desired.insert(key.clone(), check);
            }
            None => {
                desired.remove(key);
            }
        }
    }
}

/// `service`'s health check on this node, if it is ours and has a `healthCheckNodePort`.
fn check_of(
    store: &Store,
    service: &Service,
    node_name: &str,
    config: &PlanConfig,
) -> Option<HealthCheck> {
    if skip_reason(service, config).is_some() {
        return None;
    }
    let port = service.health_check_node_port?;
    // Terminating endpoints may still serve, but the node should stop getting new traffic
    // once only they are left: ready ones only.
    let local: BTreeSet<IpAddr> = store
        .slices_of(&service.key)
        .flat_map(|slice| &slice.endpoints)
        .filter(|endpoint| endpoint.ready && endpoint.node_name.as_deref() == Some(node_name))
        .map(|endpoint| endpoint.address)
        .collect();
    Some(HealthCheck {
        port,
        local_endpoints: local.len(),
    })
}

/// kube-proxy's body, byte for byte: its tab-indented template, dedented, without the
/// surrounding newlines.
pub fn body(service: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&service.namespace),
        quote(&service.name)
    )
}

/// The answer to every request on a Service's health-check port.
pub fn reply(service: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> Response {
    let status = if local_endpoints != 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body(service, local_endpoints, proxy_healthy)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

type Counts = Arc<RwLock<HashMap<ServiceKey, usize>>>;

/// One Service's servers: one per address listened on.
struct Running {
    port: u16,
    stops: Vec<oneshot::Sender<()>>,
}

impl Running {
    fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
    }
}

/// The open health-check servers, kept in step with [`desired`] by the sync loop.
pub struct HealthCheckServers {
    state: Arc<AgentState>,
    counts: Counts,
    running: BTreeMap<ServiceKey, Running>,
    /// Where the servers listen: `None` on every address, else on each of these (kube-proxy
    /// with `--nodeport-addresses`).
    addresses: Option<Vec<IpAddr>>,
}

impl HealthCheckServers {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self {
            state,
            counts: Counts::default(),
            running: BTreeMap::new(),
            addresses: None,
        }
    }

    /// Where each Service's server listens now.
    pub fn ports(&self) -> BTreeMap<ServiceKey, u16> {
        self.running
            .iter()
            .map(|(key, running)| (key.clone(), running.port))
            .collect()
    }

    /// Opens servers for new Services, closes those of gone ones (or of a changed port), and
    /// updates every count; listens on `addresses` (`None`: every address), and moves every
    /// server when they change. A port that cannot be opened is logged and retried next time.
    pub fn sync(
        &mut self,
        desired: &BTreeMap<ServiceKey, HealthCheck>,
        addresses: Option<Vec<IpAddr>>,
    ) {
        if addresses != self.addresses {
            for (key, running) in std::mem::take(&mut self.running) {
                tracing::info!(service = %key, port = running.port, ?addresses, "moving health check");
                running.stop();
            }
            self.addresses = addresses;
        }
        {
            let mut counts = self.counts.write().unwrap_or_else(PoisonError::into_inner);
            counts.clear();
            counts.extend(
                desired
                    .iter()
                    .map(|(key, check)| (key.clone(), check.local_endpoints)),
            );
        }
        let stale: Vec<ServiceKey> = self
            .running
            .iter()
            .filter(|(key, running)| desired.get(*key).map(|c| c.port) != Some(running.port))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(running) = self.running.remove(&key) {
                tracing::info!(service = %key, port = running.port, "closing health check");
                running.stop();
            }
        }
        for (key, check) in desired {
            if self.running.contains_key(key) {
                continue;
            }
            match self.open(key, check.port) {
                Ok(running) => {
                    tracing::info!(service = %key, port = check.port, "opened health check");
                    self.running.insert(key.clone(), running);
                }
                Err(error) => {
                    tracing::warn!(service = %key, port = check.port, %error, "cannot open health check");
                }
            }
        }
    }

    fn open(&self, key: &ServiceKey, port: u16) -> std::io::Result<Running> {
        let listeners = match &self.addresses {
            None => vec![listen_all(port)?],
            Some(addresses) => addresses
                .iter()
                .map(|address| listen_on(SocketAddr::new(*address, port)))
                .collect::<std::io::Result<Vec<_>>>()?,
        };
        let mut stops = Vec::with_capacity(listeners.len());
        for listener in listeners {
            stops.push(self.serve(key, port, listener));
        }
        Ok(Running { port, stops })
    }

    /// Serves `key`'s health on `listener` until the returned sender fires or is dropped.
    fn serve(
        &self,
        key: &ServiceKey,
        port: u16,
        listener: tokio::net::TcpListener,
    ) -> oneshot::Sender<()> {
        let (stop, stopped) = oneshot::channel();
        let (counts, state, service) = (
            Arc::clone(&self.counts),
            Arc::clone(&self.state),
            key.clone(),
        );
        let router = Router::new().fallback(move || {
            let (counts, state, service) =
                (Arc::clone(&counts), Arc::clone(&state), service.clone());
            async move {
                let count = counts
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&service)
                    .copied()
                    .unwrap_or(0);
                let healthy = state.health.status(SystemTime::now()).healthy;
                reply(&service, count, healthy)
            }
        });
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(%error, port, "health check server stopped");
            }
        });
        stop
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for (_, running) in std::mem::take(&mut self.running) {
            running.stop();
        }
    }
}

/// One address only.
fn listen_on(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Every address, IPv4 and IPv6 (one dual-stack socket), as kube-proxy's default; IPv4 only
/// where the host has no IPv6.
fn listen_all(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let listener = match std::net::TcpListener::bind(any6) {
        Ok(listener) => listener,
        Err(_) => std::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?,
    };
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_kube_proxys_byte_for_byte() {
        let service = ServiceKey::new("default", "web");
        assert_eq!(
            body(&service, 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&body(&service, 0, false)).expect("json");
        assert_eq!(parsed["localEndpoints"], 0);
        assert_eq!(parsed["serviceProxyHealthy"], false);
        assert_eq!(parsed["service"]["name"], "web");
    }

    #[test]
    fn only_local_endpoints_and_a_healthy_proxy_give_200() {
        let service = ServiceKey::new("ns", "lb");
        let check = |count, healthy| reply(&service, count, healthy).status();
        assert_eq!(check(1, true), StatusCode::OK);
        assert_eq!(check(0, true), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(check(3, false), StatusCode::SERVICE_UNAVAILABLE);
        let response = reply(&service, 1, true);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            response.headers()[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff"
        );
    }
}
