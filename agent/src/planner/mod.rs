//! The planner: a pure function from the store and this node to the node's table.
//!
//! Endpoint selection follows kube-proxy exactly (see docs/design.md, "Endpoint selection"); the
//! result keeps every usable endpoint in ordered tiers, and the programmed set is the first
//! non-empty tier, which is the set kube-proxy would program.
//!
//! A Service under a locality policy (the `topoproxy.io/topology` annotation, or the agent's
//! cluster-wide default) gets locality tiers instead ([`locality`]), each with a share of new
//! connections from the spill rule ([`spill`]) and per-backend weights; see
//! `docs/topology.md`. Without one, nothing here differs from kube-proxy.
//!
//! A ServiceImport (MCS clusterset VIP, a `Service` whose key is of kind `ServiceImport`) is
//! planned only when this cluster's id is known: its imported slices whose source cluster is
//! this one form the near tiers (one tier under `kube-proxy`, node/zone/region tiers under
//! `zone` and `node`), the other clusters' the tier behind them, with the same spill rule.

#[cfg(test)]
mod clusterset_tests;
#[cfg(test)]
mod duplicate_tests;
mod endpoints;
pub mod explain;
mod locality;
#[cfg(test)]
mod locality_tests;
pub mod spill;
#[cfg(test)]
mod tests;
mod topology;

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::{IpFamily, LocalityPolicy, Node, Service, ServiceKey, ServicePort, ServiceType};
use crate::node_addresses::NodePortAddresses;
use crate::scheduler::{Scheduler, SchedulerKind};
use crate::store::Store;
use crate::table::{
    Backend, Frontend, NodeTable, SourceRanges, Tier, TopologyMode, TrafficPolicy, VirtualServer,
    VsKey,
};

use endpoints::{merge, Candidate, Duplicate};
use locality::locality_tiers;
use spill::{backend_weights, spill, TierHealth, TierLoad};
pub use topology::TopologyReason;
use topology::{cluster_tiers, decide_mode, local_tiers, IndexTiers};

/// The IPVS scheduler when none is configured (kube-proxy's default too).
pub const DEFAULT_SCHEDULER: Scheduler = Scheduler::new(SchedulerKind::Rr);

/// This proxy's `service.kubernetes.io/service-proxy-name` when none is configured.
pub const DEFAULT_PROXY_NAME: &str = "topoproxy";

/// Knobs the planner takes from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// IPVS scheduler for the virtual servers of Services without a
    /// `topoproxy.io/ipvs-scheduler` annotation (kube-proxy's `--ipvs-scheduler`).
    pub scheduler: Scheduler,
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: String,
    /// The locality policy of Services without a `topoproxy.io/topology` annotation.
    pub default_locality: LocalityPolicy,
    /// This cluster's id in its clusterset (the `multicluster.kubernetes.io/source-cluster`
    /// value of its own exported endpoints). Without it, ServiceImports are not programmed
    /// and every slice with a source cluster counts as another cluster's.
    pub cluster_id: Option<String>,
    /// Where NodePorts are served (kube-proxy's `--nodeport-addresses`).
    pub node_port_addresses: NodePortAddresses,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            scheduler: DEFAULT_SCHEDULER,
            proxy_name: DEFAULT_PROXY_NAME.to_owned(),
            default_locality: LocalityPolicy::KubeProxy,
            cluster_id: None,
            node_port_addresses: NodePortAddresses::default(),
        }
    }
}

impl PlanConfig {
    /// The locality policy `service` is planned with.
    pub fn locality_of(&self, service: &Service) -> LocalityPolicy {
        service.locality.unwrap_or(self.default_locality)
    }

    /// The IPVS scheduler for virtual servers under `policy` of a Service without its own.
    pub fn scheduler_for(&self, policy: LocalityPolicy) -> Scheduler {
        self.scheduler.weighted(!policy.is_kube_proxy())
    }

    /// The IPVS scheduler for `service`'s virtual servers whose backends carry spill weights
    /// (`weighted`) or not: the Service's `topoproxy.io/ipvs-scheduler`, else the agent's;
    /// weight-blind ones become weighted under weights ([`Scheduler::weighted`]).
    pub fn scheduler_of(&self, service: &Service, weighted: bool) -> Scheduler {
        service
            .scheduler
            .unwrap_or(self.scheduler)
            .weighted(weighted)
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
    table.replace_service(key, planned_servers(store, key, node, config));
}

/// The virtual servers the Service `key` contributes on `node` (none if it is gone from the
/// store).
pub fn planned_servers(
    store: &Store,
    key: &ServiceKey,
    node: &Node,
    config: &PlanConfig,
) -> Vec<VirtualServer> {
    match store.service(key) {
        Some(service) => plan_service(store, service, node, config),
        None => Vec::new(),
    }
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
    for port_plan in port_plans(store, service, node, config) {
        let cluster = port_plan
            .cluster
            .as_ref()
            .map(|t| port_plan.tiers(t, port_plan.spill.as_ref()));
        let local = port_plan.local.as_ref().map(|t| port_plan.tiers(t, None));
        for frontend in &port_plan.frontends {
            // A NodePort on a node address that is also an externalIP, say: first one wins.
            if servers
                .iter()
                .any(|vs: &VirtualServer| vs.key == frontend.key)
            {
                continue;
            }
            let (tiers, locality, weighted) = match frontend.policy {
                TrafficPolicy::Cluster => (
                    cluster.clone(),
                    port_plan.locality,
                    port_plan.spill.is_some(),
                ),
                TrafficPolicy::Local => (local.clone(), LocalityPolicy::KubeProxy, false),
            };
            servers.push(VirtualServer {
                key: frontend.key,
                service: service.key.clone(),
                port_name: port_plan.port.name.clone(),
                frontend: frontend.kind,
                scheduler: config.scheduler_of(service, weighted),
                persistence_timeout: service.session_affinity_timeout,
                traffic_policy: frontend.policy,
                intent: service.topology_intent,
                topology: port_plan.mode,
                locality,
                tiers: tiers.unwrap_or_default(),
                source_ranges: source_ranges(service, frontend, port_plan.family, node),
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
    /// A ServiceImport, but this cluster's id (`--cluster-id`) is not configured, so its
    /// own endpoints cannot be told from the other clusters'.
    NoClusterId,
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
            Self::NoClusterId => f.write_str(
                "a ServiceImport, but this cluster's id is unknown (set --cluster-id to program clusterset IPs)",
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
    if service.key.is_import() && config.cluster_id.is_none() {
        return Some(SkipReason::NoClusterId);
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
    /// Copies of a candidate's `IP:port` left out, and why.
    pub duplicates: Vec<Duplicate<'a>>,
    pub mode: TopologyMode,
    pub reason: TopologyReason,
    /// The locality policy of the Cluster-policy frontends.
    pub locality: LocalityPolicy,
    /// Present when some frontend uses Cluster policy.
    pub cluster: Option<IndexTiers>,
    /// Under a locality policy: the spill rule's view of each `cluster` tier, same order.
    pub spill: Option<SpillPlan>,
    /// Present when some frontend uses Local policy.
    pub local: Option<IndexTiers>,
    pub frontends: Vec<FrontendSpec>,
}

/// What the spill rule made of one Service port's locality tiers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpillPlan {
    pub health: Vec<TierHealth>,
    pub loads: Vec<TierLoad>,
    /// Weight of each backend of each tier (tiers in order).
    pub weights: Vec<u32>,
}

impl SpillPlan {
    fn new(tiers: &IndexTiers, health: Vec<TierHealth>) -> Self {
        let loads = spill(&health);
        let shares: Vec<u32> = loads.iter().map(|load| load.share_ppm).collect();
        let sizes: Vec<usize> = tiers.iter().map(|(_, members)| members.len()).collect();
        let weights = backend_weights(&shares, &sizes);
        Self {
            health,
            loads,
            weights,
        }
    }
}

impl PortPlan<'_> {
    fn tiers(&self, tiers: &IndexTiers, spill: Option<&SpillPlan>) -> Vec<Tier> {
        tiers
            .iter()
            .enumerate()
            .map(|(position, (kind, members))| Tier {
                kind: *kind,
                backends: members
                    .iter()
                    .map(|&index| {
                        let candidate = &self.candidates[index];
                        Backend {
                            address: candidate.address(),
                            port: candidate.port,
                            weight: spill.map_or(1, |plan| plan.weights[position]),
                            node_name: candidate.endpoint.node_name.clone(),
                            zone: candidate.endpoint.zone.clone(),
                        }
                    })
                    .collect(),
                share_ppm: spill.map(|plan| plan.loads[position].share_ppm),
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
    config: &PlanConfig,
) -> Vec<PortPlan<'a>> {
    let locality = config.locality_of(service);
    let mut families: Vec<IpFamily> = service.cluster_ips.iter().map(IpFamily::of).collect();
    families.sort();
    families.dedup();
    let node_port_addresses = if service.ports.iter().any(|p| p.node_port.is_some()) {
        config.node_port_addresses.select(node)
    } else {
        Vec::new()
    };
    let mut plans = Vec::new();
    for family in families {
        for port in &service.ports {
            let frontends = frontends(service, port, family, &node_port_addresses);
            let (candidates, duplicates) = merge(
                store.slices_of(&service.key),
                family,
                &port.name,
                port.protocol,
                config.cluster_id.as_deref(),
                store,
            );
            let (mode, reason) = decide_mode(&candidates, node);
            let uses = |policy| frontends.iter().any(|f| f.policy == policy);
            // A ServiceImport always spills between clusters; kube-proxy never programmed one.
            let spills = !locality.is_kube_proxy() || service.key.is_import();
            let (cluster, spill) = match (uses(TrafficPolicy::Cluster), spills) {
                (false, _) => (None, None),
                (true, false) => (Some(cluster_tiers(&candidates, node, mode)), None),
                (true, true) => {
                    let planned = locality_tiers(
                        &candidates,
                        store,
                        node,
                        mode,
                        locality,
                        service.topology_intent,
                    );
                    let spill = SpillPlan::new(&planned.tiers, planned.health);
                    (Some(planned.tiers), Some(spill))
                }
            };
            let local = uses(TrafficPolicy::Local).then(|| local_tiers(&candidates, node));
            plans.push(PortPlan {
                family,
                port,
                candidates,
                duplicates,
                mode,
                reason,
                locality,
                cluster,
                spill,
                local,
                frontends,
            });
        }
    }
    plans
}

/// Where `port` of `service` is served in `family`; NodePorts on `node_port_addresses`.
fn frontends(
    service: &Service,
    port: &ServicePort,
    family: IpFamily,
    node_port_addresses: &[IpAddr],
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
        for ip in node_port_addresses.iter().filter(in_family) {
            add(*ip, node_port, Frontend::NodePort, external);
        }
    }
    specs
}

/// kube-proxy's firewall for a load-balancer frontend; every other frontend is open. The
/// node's primary address (its first of the family, as kube-proxy's `--bind-address`/Node
/// detection gives it) decides whether the node itself may reach the IP.
fn source_ranges(
    service: &Service,
    frontend: &FrontendSpec,
    family: IpFamily,
    node: &Node,
) -> SourceRanges {
    if frontend.kind != Frontend::LoadBalancer {
        return SourceRanges::default();
    }
    let node_address = node
        .addresses
        .iter()
        .copied()
        .find(|ip| IpFamily::of(ip) == family);
    SourceRanges::for_frontend(&service.load_balancer_source_ranges, family, node_address)
}

fn policy(local: bool) -> TrafficPolicy {
    if local {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    }
}
