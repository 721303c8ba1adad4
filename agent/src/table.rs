//! The node's desired load-balancing table: virtual servers, each with ordered tiers of backends.
//!
//! A [`NodeTable`] is what the planner produces for one node and what the dataplanes program.
//! It is ordered exactly as `ipvsadm -Ln` lists its table (family, protocol, address, port),
//! so rendering, diffing and comparing with the kernel are deterministic.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::model::{IpFamily, LocalityPolicy, Protocol, ServiceKey, TopologyIntent};
use crate::scheduler::Scheduler;

/// Identity of a virtual server, as IPVS knows it. Field order gives `ipvsadm`'s sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VsKey {
    pub family: IpFamily,
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

impl VsKey {
    pub fn new(protocol: Protocol, address: IpAddr, port: u16) -> Self {
        Self {
            family: IpFamily::of(&address),
            protocol,
            address,
            port,
        }
    }
}

/// How traffic reaches a virtual server; decides which traffic policy applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Frontend {
    ClusterIP,
    ExternalIP,
    LoadBalancer,
    NodePort,
}

impl Frontend {
    /// ClusterIPs follow `internalTrafficPolicy`; everything else `externalTrafficPolicy`.
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIP)
    }
}

/// The traffic policy in force for one virtual server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// The topology filter kube-proxy applies, decided from the hints of Ready endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TopologyMode {
    /// No filter: every Ready endpoint.
    None,
    /// Only endpoints whose zone hints name this node's zone.
    SameZone,
    /// Only endpoints whose node hints name this node.
    SameNode,
}

/// Why a group of backends sits where it does in the fallback order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TierKind {
    /// Ready, hinted for this node (or, under the `node` locality policy, on this node).
    SameNode,
    /// Ready, hinted for (or, as a fallback tier, located in) this node's zone.
    SameZone,
    /// Ready, in this node's region (locality policies only; from the endpoint's Node labels).
    SameRegion,
    /// Ready, anywhere in this cluster.
    Cluster,
    /// Ready, in another cluster (MCS slices).
    RemoteClusters,
    /// Not ready but still serving while terminating, anywhere in this cluster.
    ServingTerminating,
    /// Ready, on this node (Local traffic policy).
    NodeLocal,
    /// Serving-terminating, on this node (Local traffic policy).
    NodeLocalServingTerminating,
}

impl TierKind {
    /// The tier's name in explanations and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SameNode => "same-node",
            Self::SameZone => "same-zone",
            Self::SameRegion => "same-region",
            Self::Cluster => "cluster",
            Self::RemoteClusters => "remote-clusters",
            Self::ServingTerminating => "serving-terminating",
            Self::NodeLocal => "node-local",
            Self::NodeLocalServingTerminating => "node-local-serving-terminating",
        }
    }
}

/// A real server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
}

/// Backends of equal preference. Backends are sorted by (address, port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    pub kind: TierKind,
    pub backends: Vec<Backend>,
    /// Under a locality policy, the share of new connections this tier takes, in parts per
    /// million (the tiers of a virtual server sum to 1,000,000, or all are 0 when nothing is
    /// usable). `None` under kube-proxy's behaviour: the first tier takes everything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_ppm: Option<u32>,
}

/// The whole, in parts per million.
pub use topoproxy_common::SHARE_WHOLE;

impl Tier {
    /// Whether this tier takes new connections, given its position in the fallback order.
    pub fn takes_connections(&self, position: usize) -> bool {
        match self.share_ppm {
            Some(share) => share > 0,
            None => position == 0,
        }
    }

    /// The share of new connections this tier takes, in parts per million.
    pub fn share(&self, position: usize) -> u32 {
        match self.share_ppm {
            Some(share) => share,
            None if position == 0 => SHARE_WHOLE,
            None => 0,
        }
    }
}

/// One IPVS virtual server (or BPF service entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServer {
    pub key: VsKey,
    pub service: ServiceKey,
    /// The Service port's name (`""` when unnamed).
    pub port_name: String,
    pub frontend: Frontend,
    /// The IPVS scheduler and its flags (the eBPF dataplane reads `sh`/`mh` too).
    pub scheduler: Scheduler,
    /// Persistence timeout in seconds (`sessionAffinity: ClientIP`).
    pub persistence_timeout: Option<u32>,
    pub traffic_policy: TrafficPolicy,
    pub intent: TopologyIntent,
    pub topology: TopologyMode,
    /// The locality policy in force; `KubeProxy` for Local traffic policy, whatever the
    /// Service asked, since a Local set never leaves the node.
    #[serde(skip_serializing_if = "LocalityPolicy::is_kube_proxy")]
    pub locality: LocalityPolicy,
    /// Fallback order. Under kube-proxy's behaviour the programmed set is the first tier;
    /// under a locality policy every tier with a share above 0 (see [`Tier::share_ppm`]),
    /// each backend weighted. Tiers are never empty.
    pub tiers: Vec<Tier>,
    /// Who may reach it: `spec.loadBalancerSourceRanges` on a load-balancer frontend; open
    /// everywhere else.
    #[serde(skip_serializing_if = "SourceRanges::is_open")]
    pub source_ranges: SourceRanges,
}

/// The sources a load-balancer frontend accepts (`spec.loadBalancerSourceRanges`), with
/// kube-proxy's meaning: traffic to the load-balancer IP:port from any other source is
/// dropped before it is balanced (its `KUBE-SOURCE-RANGES-FIREWALL`); the node itself may
/// reach the IP only when a range holds the node's own address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceRanges {
    /// The allowed source networks, canonical (host bits cleared), sorted, deduplicated;
    /// empty: every source (no firewall).
    pub allowed: Vec<IpNetwork>,
    /// A range holds this node's primary address of the frontend's family, so connections
    /// the node makes to the IP itself (which carry the IP as their source) are let through.
    pub from_node: bool,
}

impl SourceRanges {
    /// The firewall of one load-balancer frontend of `family`: the ranges of that family
    /// (a range inside another left out), none at all if one of them is zero-masked
    /// (`0.0.0.0/0` allows everything, as no ranges do), and whether one holds `node_address`.
    pub fn for_frontend(
        ranges: &[IpNetwork],
        family: IpFamily,
        node_address: Option<IpAddr>,
    ) -> Self {
        let in_family: Vec<IpNetwork> = ranges
            .iter()
            .filter(|net| IpFamily::of(&net.ip()) == family)
            .map(|net| canonical(*net))
            .collect();
        if in_family.iter().any(|net| net.prefix() == 0) {
            return Self::default();
        }
        // A range inside another adds nothing, and nft's interval sets refuse overlaps.
        let mut allowed: Vec<IpNetwork> = in_family
            .iter()
            .filter(|net| {
                !in_family
                    .iter()
                    .any(|wider| wider.prefix() < net.prefix() && wider.contains(net.network()))
            })
            .copied()
            .collect();
        allowed.sort();
        allowed.dedup();
        let from_node =
            node_address.is_some_and(|node| allowed.iter().any(|net| net.contains(node)));
        Self { allowed, from_node }
    }

    /// No firewall: every source is accepted.
    pub fn is_open(&self) -> bool {
        self.allowed.is_empty()
    }

    /// Whether a connection from `source` (not the node itself) passes.
    pub fn admits(&self, source: IpAddr) -> bool {
        self.is_open() || self.allowed.iter().any(|net| net.contains(source))
    }
}

/// `net` with its host bits cleared (`10.1.2.3/8` → `10.0.0.0/8`), as the kernel's sets store it.
pub fn canonical(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

impl Serialize for SourceRanges {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let allowed: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
        let mut fields = serializer.serialize_struct("SourceRanges", 2)?;
        fields.serialize_field("allowed", &allowed)?;
        fields.serialize_field("fromNode", &self.from_node)?;
        fields.end()
    }
}

impl VirtualServer {
    /// The backends to program now. Under kube-proxy's behaviour that is the nearest non-empty
    /// tier, exactly the set kube-proxy would program; under a locality policy, the backends of
    /// every tier that takes a share, with their weights.
    pub fn programmed(&self) -> Vec<&Backend> {
        self.programmed_tiers()
            .flat_map(|(_, tier)| &tier.backends)
            .collect()
    }

    /// How many backends [`Self::programmed`] returns, without collecting them.
    pub fn programmed_len(&self) -> usize {
        self.programmed_tiers()
            .map(|(_, tier)| tier.backends.len())
            .sum()
    }

    /// The tiers that take new connections, with their positions in the fallback order.
    pub fn programmed_tiers(&self) -> impl Iterator<Item = (usize, &Tier)> {
        self.tiers
            .iter()
            .enumerate()
            .filter(|(position, tier)| tier.takes_connections(*position))
    }

    /// Whether the tiers carry spill shares (a locality policy, or a ServiceImport).
    pub fn has_shares(&self) -> bool {
        self.tiers.iter().any(|tier| tier.share_ppm.is_some())
    }

    /// The tier the programmed backends come from, if any.
    pub fn active_tier(&self) -> Option<TierKind> {
        self.tiers.first().map(|tier| tier.kind)
    }

    /// The Service asked for topology-aware routing, has Ready endpoints, and this node
    /// nevertheless serves it cluster-wide (hints missing, partial, or not for this node).
    pub fn is_falling_back(&self) -> bool {
        self.intent.wants_topology()
            && self.traffic_policy == TrafficPolicy::Cluster
            && self.topology == TopologyMode::None
            && self.active_tier() == Some(TierKind::Cluster)
    }
}

/// A virtual-server key that two Services both want. A ClusterIP claim wins over any other
/// kind of claim ([`ClaimRank`]); between claims of one rank the smaller Service key wins, so
/// the outcome does not depend on the order objects arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    pub key: VsKey,
    pub winner: ServiceKey,
    pub loser: ServiceKey,
    /// How each side claims the key (a ClusterIP, an externalIP, ...).
    pub winner_frontend: Frontend,
    pub loser_frontend: Frontend,
}

impl Conflict {
    /// Why the winner keeps the key, in words for logs and `plan --explain`.
    pub fn reason(&self) -> &'static str {
        if ClaimRank::of(self.winner_frontend) < ClaimRank::of(self.loser_frontend) {
            "a ClusterIP the API server allocated wins over any other claim on its address"
        } else {
            "between claims of one kind the smaller namespace/name wins"
        }
    }
}

/// How strongly a frontend kind holds an address:port against another Service's claim.
///
/// The API server allocates ClusterIPs and refuses duplicates, but anyone who may write a
/// Service can put any address into `externalIPs` or (with status access) a load-balancer
/// ingress. kube-proxy leaves the outcome of such a collision undefined (the CVE-2020-8554
/// class); letting the smaller key win made it deterministic, so a Service in namespace `aaa`
/// naming cluster DNS's ClusterIP took DNS over on every node. An allocated ClusterIP always
/// wins instead (docs/security.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClaimRank {
    /// A ClusterIP (or a ServiceImport's clusterset IP, allocated the same way).
    Allocated,
    /// An externalIP, load-balancer ingress or NodePort claim.
    Declared,
}

impl ClaimRank {
    pub fn of(frontend: Frontend) -> Self {
        match frontend {
            Frontend::ClusterIP => Self::Allocated,
            Frontend::ExternalIP | Frontend::LoadBalancer | Frontend::NodePort => Self::Declared,
        }
    }
}

/// The order of claims on one key: the first one wins.
fn claim_order(vs: &VirtualServer) -> (ClaimRank, &ServiceKey) {
    (ClaimRank::of(vs.frontend), &vs.service)
}

/// The node's table, maintained per Service so one Service can be re-planned alone.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    servers: BTreeMap<VsKey, VirtualServer>,
    /// Every key each Service claims, won or lost.
    claims: HashMap<ServiceKey, Vec<VsKey>>,
    /// Claims that lost to a smaller Service key, kept so they take over when it leaves.
    shadowed: BTreeMap<VsKey, BTreeMap<ServiceKey, VirtualServer>>,
    /// Programmed backends over all of `servers`, kept current on every change.
    programmed_backends: usize,
    /// Over the servers under a locality policy: their count and, per tier kind, the sum of
    /// their tiers' shares (ppm), kept current on every change for the metrics.
    locality_servers: usize,
    locality_shares: BTreeMap<TierKind, u64>,
}

impl NodeTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces everything `service` contributes with `servers` (empty to remove it).
    pub fn replace_service(&mut self, service: &ServiceKey, servers: Vec<VirtualServer>) {
        self.remove_service(service);
        if servers.is_empty() {
            return;
        }
        let keys = servers.iter().map(|vs| vs.key).collect();
        for vs in servers {
            self.insert_claim(vs);
        }
        self.claims.insert(service.clone(), keys);
    }

    /// Rebuilds the map of virtual servers with full B-tree nodes: inserted in the planner's
    /// (Service) order, its nodes are about two thirds full, 1.5 MiB of empty slots at 10,000
    /// virtual servers. The sync loop calls it after the initial sync (not the planner: a
    /// full plan stays as fast as it was).
    pub fn compact(&mut self) {
        self.servers = std::mem::take(&mut self.servers).into_iter().collect();
    }

    fn remove_service(&mut self, service: &ServiceKey) {
        let Some(keys) = self.claims.remove(service) else {
            return;
        };
        for key in keys {
            if self
                .servers
                .get(&key)
                .is_some_and(|vs| &vs.service == service)
            {
                self.take(&key);
                self.promote_shadowed(key);
            } else if let Some(waiting) = self.shadowed.get_mut(&key) {
                waiting.remove(service);
                if waiting.is_empty() {
                    self.shadowed.remove(&key);
                }
            }
        }
    }

    fn promote_shadowed(&mut self, key: VsKey) {
        let Some(waiting) = self.shadowed.get_mut(&key) else {
            return;
        };
        let first = waiting
            .values()
            .min_by(|a, b| claim_order(a).cmp(&claim_order(b)))
            .map(|vs| vs.service.clone());
        let next = first.and_then(|service| waiting.remove(&service));
        if waiting.is_empty() {
            self.shadowed.remove(&key);
        }
        if let Some(next) = next {
            self.put(next);
        }
    }

    fn insert_claim(&mut self, vs: VirtualServer) {
        let key = vs.key;
        match self.servers.get(&key) {
            None => {
                self.put(vs);
            }
            Some(current) if claim_order(&vs) < claim_order(current) => {
                if let Some(displaced) = self.put(vs) {
                    self.shadowed
                        .entry(key)
                        .or_default()
                        .insert(displaced.service.clone(), displaced);
                }
            }
            Some(_) => {
                self.shadowed
                    .entry(key)
                    .or_default()
                    .insert(vs.service.clone(), vs);
            }
        }
    }

    fn put(&mut self, vs: VirtualServer) -> Option<VirtualServer> {
        self.count(&vs, true);
        let displaced = self.servers.insert(vs.key, vs);
        if let Some(old) = &displaced {
            self.count(old, false);
        }
        displaced
    }

    fn take(&mut self, key: &VsKey) -> Option<VirtualServer> {
        let removed = self.servers.remove(key);
        if let Some(old) = &removed {
            self.count(old, false);
        }
        removed
    }

    /// Adds `vs` to (or, with `added` false, removes it from) the running totals.
    fn count(&mut self, vs: &VirtualServer, added: bool) {
        let backends = vs.programmed_len();
        if added {
            self.programmed_backends += backends;
        } else {
            self.programmed_backends -= backends;
        }
        if vs.locality.is_kube_proxy() && !vs.has_shares() {
            return;
        }
        if added {
            self.locality_servers += 1;
        } else {
            self.locality_servers -= 1;
        }
        for tier in &vs.tiers {
            let share = u64::from(tier.share_ppm.unwrap_or(0));
            let sum = self.locality_shares.entry(tier.kind).or_default();
            if added {
                *sum += share;
            } else {
                *sum -= share;
            }
        }
    }

    /// Number of virtual servers under a locality policy.
    pub fn locality_servers(&self) -> usize {
        self.locality_servers
    }

    /// Per tier kind, the mean share of new connections (0..=1) over the virtual servers
    /// under a locality policy; every kind that ever appeared is listed (0 when unused now).
    pub fn locality_share_means(&self) -> Vec<(TierKind, f64)> {
        let servers = self.locality_servers.max(1) as f64;
        self.locality_shares
            .iter()
            .map(|(kind, sum)| (*kind, *sum as f64 / f64::from(SHARE_WHOLE) / servers))
            .collect()
    }

    /// Every key `service` claims, whether it won it or not.
    pub fn claimed_keys(&self, service: &ServiceKey) -> &[VsKey] {
        self.claims.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Virtual servers in `ipvsadm -Ln` order.
    pub fn servers(&self) -> impl Iterator<Item = &VirtualServer> {
        self.servers.values()
    }

    pub fn get(&self, key: &VsKey) -> Option<&VirtualServer> {
        self.servers.get(key)
    }

    /// Number of virtual servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Keys claimed by more than one Service, with who won.
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.shadowed
            .iter()
            .flat_map(|(key, losers)| {
                let winner = self.servers.get(key);
                losers.values().filter_map(move |loser| {
                    winner.map(|winner| Conflict {
                        key: *key,
                        winner: winner.service.clone(),
                        loser: loser.service.clone(),
                        winner_frontend: winner.frontend,
                        loser_frontend: loser.frontend,
                    })
                })
            })
            .collect()
    }

    /// Virtual servers of one Service that it won, in order.
    pub fn service_servers<'a>(
        &'a self,
        service: &'a ServiceKey,
    ) -> impl Iterator<Item = &'a VirtualServer> + 'a {
        self.claims
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(move |key| self.servers.get(key).filter(|vs| &vs.service == service))
    }

    /// Number of programmed backends over all virtual servers.
    pub fn programmed_backends(&self) -> usize {
        self.programmed_backends
    }
}

impl PartialEq for NodeTable {
    /// Two tables are equal when they would program the same thing.
    fn eq(&self, other: &Self) -> bool {
        self.servers == other.servers
    }
}
