//! The planner: a pure function from the store and this node to the node's table.
//!
//! Endpoint selection follows kube-proxy exactly (see DESIGN.md "Endpoint selection"); the
//! result keeps every usable endpoint in ordered tiers, and the programmed set is the first
//! non-empty tier, which is the set kube-proxy would program.

mod endpoints;
pub mod explain;
#[cfg(test)]
mod tests;
mod topology;

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::{IpFamily, Node, Service, ServiceKey, ServicePort, ServiceType};
use crate::store::Store;
use crate::table::{
    Backend, Frontend, NodeTable, Tier, TopologyMode, TrafficPolicy, VirtualServer, VsKey,
};

use endpoints::{merge, Candidate};
pub use topology::TopologyReason;
use topology::{cluster_tiers, decide_mode, local_tiers, IndexTiers};

/// The IPVS scheduler when none is configured (kube-proxy's default too).
pub const DEFAULT_SCHEDULER: &str = "rr";

/// This proxy's `service.kubernetes.io/service-proxy-name` when none is configured.
pub const DEFAULT_PROXY_NAME: &str = "topoproxy";

/// Knobs the planner takes from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// IPVS scheduler for every virtual server (kube-proxy's `--ipvs-scheduler`).
    pub scheduler: String,
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: String,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            scheduler: DEFAULT_SCHEDULER.to_owned(),
            proxy_name: DEFAULT_PROXY_NAME.to_owned(),
        }
    }
}

/// Plans the whole table for `node`.
pub fn plan(store: &Store, node: &Node, config: &PlanConfig) -> NodeTable {
    let mut table = NodeTable::new();
    for service in store.services() {
        let servers = plan_service(store, service, node, config);
        table.replace_service(&service.key, servers);
    }
    table
}

/// Re-plans one Service in place (removes it from the table if it is gone from the store).
pub fn replan_service(
    table: &mut NodeTable,
    store: &Store,
    key: &ServiceKey,
    node: &Node,
    config: &PlanConfig,
) {
    let servers = match store.service(key) {
        Some(service) => plan_service(store, service, node, config),
        None => Vec::new(),
    };
    table.replace_service(key, servers);
}

/// The virtual servers one Service contributes on `node`.
pub fn plan_service(
    store: &Store,
    service: &Service,
    node: &Node,
    config: &PlanConfig,
) -> Vec<VirtualServer> {
    if skip_reason(service, config).is_some() {
        return Vec::new();
    }
    let mut servers = Vec::new();
    for port_plan in port_plans(store, service, node) {
        let cluster = port_plan.cluster.as_ref().map(|t| port_plan.tiers(t));
        let local = port_plan.local.as_ref().map(|t| port_plan.tiers(t));
        for frontend in &port_plan.frontends {
            // A NodePort on a node address that is also an externalIP, say: first one wins.
            if servers
                .iter()
                .any(|vs: &VirtualServer| vs.key == frontend.key)
            {
                continue;
            }
            let tiers = match frontend.policy {
                TrafficPolicy::Cluster => cluster.clone(),
                TrafficPolicy::Local => local.clone(),
            };
            servers.push(VirtualServer {
                key: frontend.key,
                service: service.key.clone(),
                port_name: port_plan.port.name.clone(),
                frontend: frontend.kind,
                scheduler: config.scheduler.clone(),
                persistence_timeout: service.session_affinity_timeout,
                traffic_policy: frontend.policy,
                intent: service.topology_intent,
                topology: port_plan.mode,
                tiers: tiers.unwrap_or_default(),
            });
        }
    }
    servers
}

/// Why a Service gets no virtual servers at all from this proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SkipReason {
    /// `type: ExternalName` is DNS only.
    ExternalName,
    /// `clusterIP: None`: clients resolve the endpoints themselves.
    Headless,
    /// No usable cluster IP (missing or invalid).
    NoClusterIp,
    /// Labelled `service.kubernetes.io/service-proxy-name` for another proxy.
    OtherProxy(String),
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExternalName => f.write_str("type ExternalName is served by DNS, not proxied"),
            Self::Headless => f.write_str("headless (clusterIP: None), not proxied"),
            Self::NoClusterIp => f.write_str("no usable cluster IP"),
            Self::OtherProxy(name) => write!(
                f,
                "labelled service.kubernetes.io/service-proxy-name={name:?}, handled by another proxy"
            ),
        }
    }
}

/// Whether this proxy leaves `service` alone, and why.
pub fn skip_reason(service: &Service, config: &PlanConfig) -> Option<SkipReason> {
    if service.service_type == ServiceType::ExternalName {
        return Some(SkipReason::ExternalName);
    }
    if service.headless {
        return Some(SkipReason::Headless);
    }
    // kube-proxy selects Services *without* the label; naming ourselves opts a Service in.
    if let Some(name) = &service.proxy_name {
        if name != &config.proxy_name {
            return Some(SkipReason::OtherProxy(name.clone()));
        }
    }
    if service.cluster_ips.is_empty() {
        return Some(SkipReason::NoClusterIp);
    }
    None
}

/// One address:port a Service port is reachable on, and the policy that governs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrontendSpec {
    pub key: VsKey,
    pub kind: Frontend,
    pub policy: TrafficPolicy,
}

/// Everything decided for one Service port in one IP family.
pub(crate) struct PortPlan<'a> {
    pub family: IpFamily,
    pub port: &'a ServicePort,
    pub candidates: Vec<Candidate<'a>>,
    pub mode: TopologyMode,
    pub reason: TopologyReason,
    /// Present when some frontend uses Cluster policy.
    pub cluster: Option<IndexTiers>,
    /// Present when some frontend uses Local policy.
    pub local: Option<IndexTiers>,
    pub frontends: Vec<FrontendSpec>,
}

impl PortPlan<'_> {
    fn tiers(&self, tiers: &IndexTiers) -> Vec<Tier> {
        tiers
            .iter()
            .map(|(kind, members)| Tier {
                kind: *kind,
                backends: members
                    .iter()
                    .map(|&index| {
                        let candidate = &self.candidates[index];
                        Backend {
                            address: candidate.address(),
                            port: candidate.port,
                            weight: 1,
                            node_name: candidate.endpoint.node_name.clone(),
                            zone: candidate.endpoint.zone.clone(),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Plans every port of `service` in every IP family it has a cluster IP in. Each family is
/// planned on its own, as kube-proxy runs one proxier per family.
pub(crate) fn port_plans<'a>(
    store: &'a Store,
    service: &'a Service,
    node: &Node,
) -> Vec<PortPlan<'a>> {
    let mut families: Vec<IpFamily> = service.cluster_ips.iter().map(IpFamily::of).collect();
    families.sort();
    families.dedup();
    let mut plans = Vec::new();
    for family in families {
        for port in &service.ports {
            let frontends = frontends(service, port, family, node);
            let candidates = merge(
                store.slices_of(&service.key),
                family,
                &port.name,
                port.protocol,
            );
            let (mode, reason) = decide_mode(&candidates, node);
            let uses = |policy| frontends.iter().any(|f| f.policy == policy);
            let cluster =
                uses(TrafficPolicy::Cluster).then(|| cluster_tiers(&candidates, node, mode));
            let local = uses(TrafficPolicy::Local).then(|| local_tiers(&candidates, node));
            plans.push(PortPlan {
                family,
                port,
                candidates,
                mode,
                reason,
                cluster,
                local,
                frontends,
            });
        }
    }
    plans
}

fn frontends(
    service: &Service,
    port: &ServicePort,
    family: IpFamily,
    node: &Node,
) -> Vec<FrontendSpec> {
    let in_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
    let internal = policy(service.internal_traffic_local);
    let external = policy(service.external_traffic_local);
    let mut specs = Vec::new();
    let mut add = |address: IpAddr, port_number: u16, kind: Frontend, policy: TrafficPolicy| {
        specs.push(FrontendSpec {
            key: VsKey::new(port.protocol, address, port_number),
            kind,
            policy,
        });
    };
    for ip in service.cluster_ips.iter().filter(in_family) {
        add(*ip, port.port, Frontend::ClusterIP, internal);
    }
    for ip in service.external_ips.iter().filter(in_family) {
        add(*ip, port.port, Frontend::ExternalIP, external);
    }
    for ip in service.load_balancer_ips.iter().filter(in_family) {
        add(*ip, port.port, Frontend::LoadBalancer, external);
    }
    if let Some(node_port) = port.node_port {
        for ip in node.addresses.iter().filter(in_family) {
            add(*ip, node_port, Frontend::NodePort, external);
        }
    }
    specs
}

fn policy(local: bool) -> TrafficPolicy {
    if local {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    }
}
