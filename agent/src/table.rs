//! The node's desired load-balancing table: virtual servers, each with ordered tiers of backends.
//!
//! A [`NodeTable`] is what the planner produces for one node and what the dataplanes program.
//! It is ordered exactly as `ipvsadm -Ln` lists its table (family, protocol, address, port),
//! so rendering, diffing and comparing with the kernel are deterministic.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::model::{IpFamily, LocalityPolicy, Protocol, ServiceKey, TopologyIntent};

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
    pub scheduler: String,
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

/// A virtual-server key that two Services both want. The smaller Service key wins, so the
/// outcome does not depend on the order objects arrived in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Conflict {
    pub key: VsKey,
    pub winner: ServiceKey,
    pub loser: ServiceKey,
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
        let next = waiting.pop_first().map(|(_, next)| next);
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
            Some(current) if vs.service < current.service => {
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
                let winner = self.servers.get(key).map(|vs| vs.service.clone());
                losers.keys().filter_map(move |loser| {
                    winner.clone().map(|winner| Conflict {
                        key: *key,
                        winner,
                        loser: loser.clone(),
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
