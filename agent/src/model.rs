//! The cluster model the planner reads: Services, EndpointSlices and Nodes, already validated.
//!
//! These types are converted once, at the edge, from the Kubernetes API objects
//! (see [`crate::source::convert`]). Everything here is well-formed: addresses parse, ports are in
//! range, protocols are known. Anything that was not is dropped during conversion with a
//! [`crate::source::convert::Warning`], so the planner never has to second-guess its input.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

/// Label on a Node naming its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label on a Node naming its region.
pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
/// Label tying an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label on a Service handing it to a named proxy instead of the default one.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label the endpoints controllers put on the slices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label on EndpointSlices imported from another cluster (Multi-Cluster Services API).
pub const LABEL_SOURCE_CLUSTER: &str = "multicluster.kubernetes.io/source-cluster";
/// Label tying an imported EndpointSlice to its `ServiceImport` (KEP-1645).
pub const LABEL_MCS_SERVICE_NAME: &str = "multicluster.kubernetes.io/service-name";
/// Annotation asking the EndpointSlice controller for topology hints (Kubernetes ≥ 1.27).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
/// The older spelling of [`ANNOTATION_TOPOLOGY_MODE`] (Kubernetes 1.21–1.26).
pub const ANNOTATION_TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
/// Annotation opting a Service into topoproxy's locality tiers (see [`LocalityPolicy`]).
pub const ANNOTATION_LOCALITY: &str = "topoproxy.io/topology";
/// The IPVS scheduler of a Service's virtual servers (`crate::scheduler` has the syntax).
pub const ANNOTATION_IPVS_SCHEDULER: &str = "topoproxy.io/ipvs-scheduler";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (three hours), as the API defines it.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// Which kind of object a [`ServiceKey`] names. A `ServiceImport` often shares its
/// `namespace/name` with a Service (the exported one), so the kind is part of the key.
/// `Service` sorts first: when both claim one address, the Service wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ServiceKind {
    #[default]
    Service,
    /// A Multi-Cluster Services `ServiceImport` (multicluster.x-k8s.io/v1alpha1).
    ServiceImport,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::ServiceImport => "ServiceImport",
        }
    }

    pub fn is_service(&self) -> bool {
        *self == Self::Service
    }
}

/// `namespace/name` of a Service (or a ServiceImport); the unit of re-planning.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    #[serde(skip_serializing_if = "ServiceKind::is_service")]
    pub kind: ServiceKind,
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    /// The key of a Service.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind: ServiceKind::Service,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a ServiceImport.
    pub fn import(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            kind: ServiceKind::ServiceImport,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn is_import(&self) -> bool {
        self.kind == ServiceKind::ServiceImport
    }
}

impl fmt::Display for ServiceKey {
    /// `namespace/name` for a Service (as everywhere in Kubernetes), prefixed with the kind
    /// for a ServiceImport so the two never read the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ServiceKind::Service => write!(f, "{}/{}", self.namespace, self.name),
            ServiceKind::ServiceImport => {
                write!(f, "serviceimport/{}/{}", self.namespace, self.name)
            }
        }
    }
}

/// Transport protocol of a Service port. The order is IPPROTO number order, which is the
/// order `ipvsadm -Ln` lists services in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`); the API is case-sensitive.
    pub fn from_api(value: &str) -> Option<Self> {
        match value {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The IANA protocol number, as IPVS takes it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IP family. `V4` sorts before `V6`, as `AF_INET` (2) before `AF_INET6` (10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub fn of(address: &IpAddr) -> Self {
        match address {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// `spec.type` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// What the Service itself asks of topology, as opposed to what the hints say.
///
/// kube-proxy decides from hints alone; we keep the intent to explain a fallback
/// ("asked for same-zone, got cluster-wide because …") and to count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TopologyIntent {
    /// No topology annotation and no `spec.trafficDistribution`.
    None,
    /// `service.kubernetes.io/topology-mode: Auto` or `topology-aware-hints: auto`.
    Auto,
    /// `spec.trafficDistribution: PreferClose` (same-zone, an alias since 1.33).
    PreferClose,
    /// `spec.trafficDistribution: PreferSameZone`.
    PreferSameZone,
    /// `spec.trafficDistribution: PreferSameNode`.
    PreferSameNode,
}

impl TopologyIntent {
    pub fn wants_topology(self) -> bool {
        !matches!(self, Self::None)
    }
}

/// How far topoproxy goes beyond kube-proxy for one Service: the value of the
/// `topoproxy.io/topology` annotation, or the agent's `--topology-default`.
///
/// Only [`LocalityPolicy::KubeProxy`] programs exactly what kube-proxy would; the others order
/// endpoints into locality tiers and spill gradually between them (see `docs/topology.md`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum LocalityPolicy {
    /// kube-proxy's behaviour: hints all or nothing, then every Ready endpoint.
    #[default]
    KubeProxy,
    /// Tiers zone → region → cluster → other clusters (node first only for node hints).
    Zone,
    /// Tiers node → zone → region → cluster → other clusters.
    Node,
}

impl LocalityPolicy {
    /// The annotation's spelling of each value.
    pub const VALUES: [(&'static str, Self); 3] = [
        ("kube-proxy", Self::KubeProxy),
        ("zone", Self::Zone),
        ("node", Self::Node),
    ];

    /// Parses the annotation value (case-insensitive, surrounding blanks ignored).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        Self::VALUES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(value))
            .map(|(_, policy)| *policy)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::KubeProxy => "kube-proxy",
            Self::Zone => "zone",
            Self::Node => "node",
        }
    }

    pub fn is_kube_proxy(&self) -> bool {
        *self == Self::KubeProxy
    }
}

impl fmt::Display for LocalityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// The port's name; `""` when the Service has a single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service, reduced to what a proxy needs.
///
/// A `ServiceImport` of type `ClusterSetIP` is one too (its key's kind says so): its
/// clusterset IPs are `cluster_ips`, its ports `ports`, and its endpoints the slices labelled
/// `multicluster.kubernetes.io/service-name`; a `Headless` import is `headless`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ServiceKey,
    pub service_type: ServiceType,
    /// `spec.clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs` (primary family first); empty for headless and ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except ingresses with `ipMode: Proxy`, whose
    /// traffic arrives from the load balancer addressed to the node, not to the VIP.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`, both families, as given (trimmed, parsed). Like
    /// kube-proxy, the `service.beta.kubernetes.io/load-balancer-source-ranges` annotation is
    /// not read: cloud load balancers read it, no proxy does.
    #[serde(
        serialize_with = "networks_as_text",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_source_ranges: Vec<ipnetwork::IpNetwork>,
    pub ports: Vec<ServicePort>,
    /// `Some(timeout seconds)` for `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    pub internal_traffic_local: bool,
    /// `externalTrafficPolicy: Local`; only meaningful (and only set) for NodePort and
    /// LoadBalancer Services, as the API defines it.
    pub external_traffic_local: bool,
    pub topology_intent: TopologyIntent,
    /// Value of the `service.kubernetes.io/service-proxy-name` label, if any.
    pub proxy_name: Option<String>,
    /// The `topoproxy.io/topology` annotation: `None` when absent (the agent's default
    /// applies); an invalid value was turned into `KubeProxy` with a warning.
    pub locality: Option<LocalityPolicy>,
    /// `spec.healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy:
    /// Local` (the only ones the API gives one).
    pub health_check_node_port: Option<u16>,
    /// The `topoproxy.io/ipvs-scheduler` annotation: `None` when absent or invalid (the
    /// agent's `--ipvs-scheduler` applies; an invalid value was warned about).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<crate::scheduler::Scheduler>,
}

/// Networks as `addr/len` text (ipnetwork has no serde here).
fn networks_as_text<S: serde::Serializer>(
    networks: &[ipnetwork::IpNetwork],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(networks.iter().map(ToString::to_string))
}

impl Service {
    /// Reachable from outside the cluster network: NodePorts, externalIPs or LB ingress IPs.
    pub fn externally_accessible(&self) -> bool {
        !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
            || self.ports.iter().any(|p| p.node_port.is_some())
    }
}

/// Where an EndpointSlice's endpoints live.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SliceOrigin {
    /// This cluster.
    Local,
    /// Labelled `multicluster.kubernetes.io/source-cluster` with this name: another cluster,
    /// unless the name is this cluster's own id (the planner's `cluster_id`).
    Remote(String),
}

/// One port of an EndpointSlice. Ports with a nil name or nil port are dropped at
/// conversion, as kube-proxy ignores them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint of an EndpointSlice, with its conditions resolved the way the API
/// defines nil: `ready` and `serving` nil mean true, `terminating` nil means false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// `addresses[0]`; the API says consumers use only the first address.
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared, not copied, into every virtual server's backend (see [`crate::table::Backend`]).
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `hints.forZones[].name`; empty when the endpoint carries no zone hint.
    pub zone_hints: Hints,
    /// `hints.forNodes[].name`; empty when the endpoint carries no node hint.
    pub node_hints: Hints,
}

/// A sorted, duplicate-free set of hint names (zones or nodes).
///
/// An endpoint carries one hint, rarely a few, and the endpoints of a cluster carry only as
/// many distinct sets as it has zones (or nodes): the set is shared, so a store can keep one
/// copy of each ([`Hints::shared_mut`]) instead of a vector and a string per endpoint — tens
/// of MiB at 100,000 endpoints. No hints: nothing allocated. The handle is one pointer wide
/// (the names sit behind it), so an endpoint's two hint sets cost 16 bytes, not 32.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints(Option<Arc<HintNames>>);

/// The names of a hint set, shared between the endpoints that carry the same set.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HintNames(Box<[Arc<str>]>);

/// As the vector of names it used to be: `Hints(["zone-a"])`.
impl fmt::Debug for Hints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Hints")
            .field(&self.iter().collect::<Vec<_>>())
            .finish()
    }
}

impl Hints {
    fn names(&self) -> &[Arc<str>] {
        self.0.as_deref().map(|names| &*names.0).unwrap_or_default()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names().iter().any(|hint| &**hint == name)
    }

    pub fn is_empty(&self) -> bool {
        self.names().is_empty()
    }

    pub fn len(&self) -> usize {
        self.names().len()
    }

    /// Hint names in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.names().iter().map(|name| &**name)
    }

    /// Adds `name`; false if it was already there.
    pub fn insert(&mut self, name: String) -> bool {
        let names = self.names();
        match names.binary_search_by(|hint| (**hint).cmp(name.as_str())) {
            Ok(_) => false,
            Err(at) => {
                let mut grown: Vec<Arc<str>> = Vec::with_capacity(names.len() + 1);
                grown.extend_from_slice(&names[..at]);
                grown.push(Arc::from(name));
                grown.extend_from_slice(&names[at..]);
                self.0 = Some(Arc::new(HintNames(grown.into())));
                true
            }
        }
    }

    /// The shared set itself (`None` when there are no hints), for a store that replaces it
    /// with an equal set it already holds.
    pub fn shared_mut(&mut self) -> Option<&mut Arc<HintNames>> {
        self.0.as_mut()
    }
}

impl FromIterator<String> for Hints {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Self(None);
        }
        Self(Some(Arc::new(HintNames(
            names.into_iter().map(Arc::from).collect(),
        ))))
    }
}

impl Serialize for Hints {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

/// An EndpointSlice, reduced to what a proxy needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    /// The slice's own name; its namespace is its Service's (`service.namespace`): the API
    /// ties a slice to a Service of its own namespace.
    pub name: String,
    /// From the `kubernetes.io/service-name` label, or for the slices of a ServiceImport
    /// from `multicluster.kubernetes.io/service-name` (the key's kind says which).
    pub service: ServiceKey,
    /// `addressType`; FQDN slices are dropped at conversion.
    pub family: IpFamily,
    pub origin: SliceOrigin,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// Where a Node sits, from its labels; all the planner needs of Nodes other than its own.
/// Zone and region names are shared (`Arc`) between the Nodes of a zone, so 5,000 Nodes cost
/// little more than their names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeLocality {
    pub zone: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
}

/// What the planner needs of a Node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// `status.addresses` of type InternalIP and ExternalIP, in API order, deduplicated.
    pub addresses: Vec<IpAddr>,
    /// Why the node is on its way out (being deleted, or tainted
    /// `ToBeDeletedByClusterAutoscaler`); load balancers should stop sending to it. The
    /// planner ignores it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaving: Option<String>,
    /// The node's own addresses as the agent read them from the host it runs on (kube-proxy's
    /// node address set: every interface but the dataplane's own, without loopback and IPv6
    /// link-local); `None` where no host is looked at (`plan`, dry-run), and NodePorts then
    /// sit on [`Node::addresses`]. Not part of the API object.
    #[serde(skip)]
    pub local_addresses: Option<std::collections::BTreeSet<IpAddr>>,
}

/// What planning depends on of a [`Node`].
pub type NodeTopology<'a> = (
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a [IpAddr],
    Option<&'a std::collections::BTreeSet<IpAddr>>,
);

impl Node {
    /// The node without [`Node::leaving`]: what planning depends on.
    pub fn topology(&self) -> NodeTopology<'_> {
        (
            &self.name,
            self.zone.as_deref(),
            self.region.as_deref(),
            &self.addresses,
            self.local_addresses.as_ref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint is held once per address of every slice (100,000 at 10,000 Services):
    /// each byte here is about 0.1 MiB there (docs/benchmarks.md).
    #[test]
    fn an_endpoint_stays_small() {
        assert_eq!(std::mem::size_of::<Hints>(), 8);
        assert!(
            std::mem::size_of::<Endpoint>() <= 72,
            "Endpoint grew to {} bytes",
            std::mem::size_of::<Endpoint>()
        );
    }

    #[test]
    fn hints_stay_sorted_and_unique() {
        let mut hints: Hints = ["b", "a", "b"].map(str::to_owned).into_iter().collect();
        assert_eq!(hints.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(!hints.insert("a".to_owned()));
        assert!(hints.insert("c".to_owned()));
        assert_eq!(hints.len(), 3);
        assert!(hints.contains("c") && !hints.contains("d"));
        assert!(Hints::default().is_empty());
    }
}
