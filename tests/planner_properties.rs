//! Property tests of the planner over randomly generated clusters.
//!
//! The generator builds [`Store`]s straight from the model types: 1–4 zones, 1–6 nodes (some
//! without a zone, some dual-stack), 0–6 Services (ClusterIP, NodePort, LoadBalancer, the odd
//! headless or foreign-proxy one; IPv4, IPv6 or dual-stack; 1–2 TCP/UDP ports; random
//! internal/external traffic policies; externalIPs from a pool of two so Services collide),
//! and 0–3 EndpointSlices per Service (sometimes of the other family, sometimes from another
//! cluster) with 0–6 endpoints whose addresses come from a pool of eight, so the same address
//! shows up in several slices (and now and then twice in one). Conditions are random; zone and
//! node hints cover all, some or none of a Service's endpoints.
//!
//! The properties are stated from docs/design.md ("Endpoint selection"), not from the planner's
//! code:
//!
//! 1. every frontend and every backend (programmed or in a later tier) comes from the input;
//! 2. a Service port with a Ready endpoint gets a programmed backend on every node wherever
//!    Cluster traffic policy applies;
//! 3. planning does not depend on insertion order or on the order of endpoints in a slice;
//! 4. re-planning only the affected Services after a change equals a full plan;
//! 5. tiers are never empty, disjoint, sorted by (address, port), in fallback order, and
//!    consistent with the traffic policy;
//! 6. headless Services and Services of another proxy contribute nothing;
//! 7. the programmed set (first tier) is what kube-proxy would program, wherever that is
//!    well defined (no slices from other clusters, no conflicting duplicates).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use topoproxy::model::{
    Endpoint, EndpointSlice, Hints, IpFamily, LocalityPolicy, Node, Protocol, Service, ServiceKey,
    ServicePort, ServiceType, SliceOrigin, SlicePort, TopologyIntent,
};
use topoproxy::planner::spill::{spill, TierHealth, WEIGHT_TOLERANCE_PPM};
use topoproxy::planner::{plan, replan_service, PlanConfig};
use topoproxy::store::{SliceKey, Store};
use topoproxy::synthetic::with_endpoint_flipped;
use topoproxy::table::{
    Frontend, NodeTable, TierKind, TrafficPolicy, VirtualServer, VsKey, SHARE_WHOLE,
};

const ZONES: [&str; 4] = ["zone-a", "zone-b", "zone-c", "zone-d"];
const MAX_NODES: usize = 6;
/// Named by endpoints and hints, but not a Node of the cluster.
const GHOST_NODE: &str = "node-gone";
/// Endpoint addresses are drawn from this many per family, so duplicates are common.
const ADDRESS_POOL: u8 = 8;
const OTHER_PROXY: &str = "other-proxy";
const REMOTE_CLUSTER: &str = "cluster-east";

// ---------------------------------------------------------------------------------------------
// Raw (generated) cluster descriptions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Families {
    V4,
    V6,
    V4V6,
    V6V4,
}

impl Families {
    fn list(self) -> Vec<IpFamily> {
        match self {
            Self::V4 => vec![IpFamily::V4],
            Self::V6 => vec![IpFamily::V6],
            Self::V4V6 => vec![IpFamily::V4, IpFamily::V6],
            Self::V6V4 => vec![IpFamily::V6, IpFamily::V4],
        }
    }
}

/// How many of a Service's endpoints carry a hint of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    All,
    Some,
    None,
}

#[derive(Debug, Clone, Copy)]
enum SlicePortMode {
    /// The Service port's name and protocol, with this target port.
    Matching(u16),
    /// The Service port's name but the other protocol.
    OtherProtocol(u16),
    Absent,
}

#[derive(Debug, Clone)]
struct RawEndpoint {
    address: u8,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Index into the nodes; `>= nodes.len()` names [`GHOST_NODE`].
    node: Option<usize>,
    /// Zone of an endpoint that has no real node.
    zone: Option<usize>,
    zone_hint_present: bool,
    zone_hint_own: bool,
    zone_hint_pick: usize,
    node_hint_present: bool,
    node_hint_own: bool,
    node_hint_pick: usize,
}

#[derive(Debug, Clone)]
struct RawSlice {
    /// 0–2: the Service's primary family; 3: the other one.
    family_pick: u8,
    remote: bool,
    /// First letter of the slice's name, so name order differs from generation order.
    name_letter: u8,
    port_modes: [SlicePortMode; 2],
    extra_port: bool,
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Clone)]
struct RawService {
    service_type: ServiceType,
    families: Families,
    headless: bool,
    protocols: Vec<Protocol>,
    single_port_named: bool,
    internal_local: bool,
    external_local: bool,
    external_ip: Option<u8>,
    load_balancer_ip: bool,
    intent: TopologyIntent,
    proxy_name: Option<&'static str>,
    affinity: Option<u32>,
    zone_hints: Coverage,
    node_hints: Coverage,
    slices: Vec<RawSlice>,
}

#[derive(Debug, Clone)]
struct RawNode {
    zone: Option<usize>,
    region: bool,
    ipv6: bool,
}

#[derive(Debug, Clone)]
struct RawCluster {
    zones: usize,
    nodes: Vec<RawNode>,
    services: Vec<RawService>,
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn raw_endpoint() -> impl Strategy<Value = RawEndpoint> {
    (
        0..ADDRESS_POOL,
        (
            prop::bool::weighted(0.65),
            prop::bool::weighted(0.7),
            prop::bool::weighted(0.3),
        ),
        prop::option::weighted(0.85, 0..=MAX_NODES),
        prop::option::of(0..ZONES.len()),
        (any::<bool>(), prop::bool::weighted(0.8), 0..ZONES.len()),
        (any::<bool>(), prop::bool::weighted(0.8), 0..MAX_NODES),
    )
        .prop_map(
            |(address, (ready, serving, terminating), node, zone, zone_hint, node_hint)| {
                RawEndpoint {
                    address,
                    ready,
                    serving,
                    terminating,
                    node,
                    zone,
                    zone_hint_present: zone_hint.0,
                    zone_hint_own: zone_hint.1,
                    zone_hint_pick: zone_hint.2,
                    node_hint_present: node_hint.0,
                    node_hint_own: node_hint.1,
                    node_hint_pick: node_hint.2,
                }
            },
        )
}

fn slice_port_mode() -> impl Strategy<Value = SlicePortMode> {
    prop_oneof![
        6 => prop_oneof![Just(8080u16), Just(9090u16)].prop_map(SlicePortMode::Matching),
        1 => prop_oneof![Just(8080u16), Just(9090u16)].prop_map(SlicePortMode::OtherProtocol),
        1 => Just(SlicePortMode::Absent),
    ]
}

fn raw_slice() -> impl Strategy<Value = RawSlice> {
    (
        0u8..4,
        prop::bool::weighted(0.15),
        0u8..26,
        (slice_port_mode(), slice_port_mode()),
        prop::bool::weighted(0.2),
        prop::collection::vec(raw_endpoint(), 0..=6),
    )
        .prop_map(
            |(family_pick, remote, name_letter, ports, extra_port, endpoints)| RawSlice {
                family_pick,
                remote,
                name_letter,
                port_modes: [ports.0, ports.1],
                extra_port,
                endpoints,
            },
        )
}

fn coverage() -> impl Strategy<Value = Coverage> {
    prop_oneof![
        Just(Coverage::All),
        Just(Coverage::Some),
        Just(Coverage::None)
    ]
}

fn raw_service() -> impl Strategy<Value = RawService> {
    (
        (
            prop_oneof![
                3 => Just(ServiceType::ClusterIP),
                1 => Just(ServiceType::NodePort),
                1 => Just(ServiceType::LoadBalancer),
            ],
            prop_oneof![
                5 => Just(Families::V4),
                1 => Just(Families::V6),
                1 => Just(Families::V4V6),
                1 => Just(Families::V6V4),
            ],
            prop::bool::weighted(0.08),
            prop::collection::vec(prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)], 1..=2),
            any::<bool>(),
        ),
        (
            prop::bool::weighted(0.25),
            prop::bool::weighted(0.3),
            prop::option::weighted(0.35, 0u8..2),
            prop::bool::weighted(0.7),
        ),
        (
            prop_oneof![
                Just(TopologyIntent::None),
                Just(TopologyIntent::Auto),
                Just(TopologyIntent::PreferClose),
                Just(TopologyIntent::PreferSameZone),
                Just(TopologyIntent::PreferSameNode),
            ],
            prop_oneof![
                8 => Just(None),
                1 => Just(Some("topoproxy")),
                1 => Just(Some(OTHER_PROXY)),
            ],
            prop::option::weighted(0.2, Just(10_800u32)),
        ),
        (coverage(), coverage()),
        prop::collection::vec(raw_slice(), 0..=3),
    )
        .prop_map(
            |(
                (service_type, families, headless, protocols, single_port_named),
                (internal_local, external_local, external_ip, load_balancer_ip),
                (intent, proxy_name, affinity),
                (zone_hints, node_hints),
                slices,
            )| RawService {
                service_type,
                families,
                headless,
                protocols,
                single_port_named,
                internal_local,
                external_local,
                external_ip,
                load_balancer_ip,
                intent,
                proxy_name,
                affinity,
                zone_hints,
                node_hints,
                slices,
            },
        )
}

fn raw_node(zones: usize) -> impl Strategy<Value = RawNode> {
    (
        prop::option::weighted(0.8, 0..zones),
        any::<bool>(),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(zone, region, ipv6)| RawNode { zone, region, ipv6 })
}

fn raw_cluster() -> impl Strategy<Value = RawCluster> {
    (1..=ZONES.len()).prop_flat_map(|zones| {
        (
            prop::collection::vec(raw_node(zones), 1..=MAX_NODES),
            prop::collection::vec(raw_service(), 0..=6),
        )
            .prop_map(move |(nodes, services)| RawCluster {
                zones,
                nodes,
                services,
            })
    })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    raw_cluster().prop_map(|raw| Cluster::build(&raw))
}

// ---------------------------------------------------------------------------------------------
// Materialising model objects
// ---------------------------------------------------------------------------------------------

/// The model objects of one generated cluster, plus what is needed to generate more slices.
#[derive(Debug, Clone)]
struct Cluster {
    zones: usize,
    nodes: Vec<Node>,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    /// Hint coverage per Service, for slices generated later.
    coverage: BTreeMap<ServiceKey, (Coverage, Coverage)>,
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(prefix: u16, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, prefix, 0, 0, 0, 0, 0, host))
}

fn index_u8(index: usize) -> u8 {
    u8::try_from(index).unwrap_or(u8::MAX)
}

fn index_u16(index: usize) -> u16 {
    u16::try_from(index).unwrap_or(u16::MAX)
}

fn other_family(family: IpFamily) -> IpFamily {
    match family {
        IpFamily::V4 => IpFamily::V6,
        IpFamily::V6 => IpFamily::V4,
    }
}

impl Cluster {
    fn build(raw: &RawCluster) -> Self {
        let nodes: Vec<Node> = raw
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let mut addresses = vec![v4(192, 168, 0, index_u8(index + 1))];
                if node.ipv6 {
                    addresses.push(v6(1, index_u16(index + 1)));
                }
                Node {
                    name: format!("node-{index}"),
                    zone: node.zone.map(|zone| ZONES[zone].to_owned()),
                    region: node.region.then(|| "region-1".to_owned()),
                    addresses,
                    leaving: None,
                    local_addresses: None,
                }
            })
            .collect();
        let mut cluster = Self {
            zones: raw.zones,
            nodes,
            services: Vec::new(),
            slices: Vec::new(),
            coverage: BTreeMap::new(),
        };
        for (index, raw_service) in raw.services.iter().enumerate() {
            let service = build_service(index, raw_service);
            cluster.coverage.insert(
                service.key.clone(),
                (raw_service.zone_hints, raw_service.node_hints),
            );
            for (position, raw_slice) in raw_service.slices.iter().enumerate() {
                let name = format!(
                    "svc-{index}-{}{position}",
                    char::from(b'a' + raw_slice.name_letter % 26)
                );
                let slice = cluster.build_slice(raw_slice, &service, name);
                cluster.slices.push(slice);
            }
            cluster.services.push(service);
        }
        cluster
    }

    /// A slice of `service` named `name` from `raw`, with the Service's hint coverage.
    fn build_slice(&self, raw: &RawSlice, service: &Service, name: String) -> EndpointSlice {
        let primary = service
            .cluster_ips
            .first()
            .map(IpFamily::of)
            .unwrap_or(IpFamily::V4);
        let family = if raw.family_pick < 3 {
            primary
        } else {
            other_family(primary)
        };
        let mut ports = Vec::new();
        for (service_port, mode) in service.ports.iter().zip(raw.port_modes) {
            match mode {
                SlicePortMode::Matching(port) => ports.push(SlicePort {
                    name: service_port.name.clone(),
                    protocol: service_port.protocol,
                    port,
                }),
                SlicePortMode::OtherProtocol(port) => ports.push(SlicePort {
                    name: service_port.name.clone(),
                    protocol: match service_port.protocol {
                        Protocol::Tcp => Protocol::Udp,
                        _ => Protocol::Tcp,
                    },
                    port,
                }),
                SlicePortMode::Absent => {}
            }
        }
        if raw.extra_port {
            ports.push(SlicePort {
                name: "metrics".to_owned(),
                protocol: Protocol::Tcp,
                port: 9100,
            });
        }
        let (zone_coverage, node_coverage) = self
            .coverage
            .get(&service.key)
            .copied()
            .unwrap_or((Coverage::None, Coverage::None));
        let endpoints = raw
            .endpoints
            .iter()
            .map(|endpoint| self.build_endpoint(endpoint, family, zone_coverage, node_coverage))
            .collect();
        EndpointSlice {
            name,
            service: service.key.clone(),
            family,
            origin: if raw.remote {
                SliceOrigin::Remote(REMOTE_CLUSTER.to_owned())
            } else {
                SliceOrigin::Local
            },
            ports,
            endpoints,
        }
    }

    fn build_endpoint(
        &self,
        raw: &RawEndpoint,
        family: IpFamily,
        zone_coverage: Coverage,
        node_coverage: Coverage,
    ) -> Endpoint {
        let address = match family {
            IpFamily::V4 => v4(10, 244, 0, raw.address + 1),
            IpFamily::V6 => v6(0x10, u16::from(raw.address) + 1),
        };
        let node = raw.node.map(|index| self.nodes.get(index));
        let (node_name, zone) = match node {
            Some(Some(node)) => (Some(node.name.clone()), node.zone.clone()),
            Some(None) => (
                Some(GHOST_NODE.to_owned()),
                raw.zone.map(|z| ZONES[z % self.zones].to_owned()),
            ),
            None => (None, raw.zone.map(|z| ZONES[z % self.zones].to_owned())),
        };
        let with_zone_hint = match zone_coverage {
            Coverage::All => true,
            Coverage::Some => raw.zone_hint_present,
            Coverage::None => false,
        };
        let mut zone_hints = Hints::default();
        if with_zone_hint {
            match (&zone, raw.zone_hint_own) {
                (Some(zone), true) => zone_hints.insert(zone.clone()),
                _ => zone_hints.insert(ZONES[raw.zone_hint_pick % self.zones].to_owned()),
            };
        }
        let with_node_hint = match node_coverage {
            Coverage::All => true,
            Coverage::Some => raw.node_hint_present,
            Coverage::None => false,
        };
        let mut node_hints = Hints::default();
        if with_node_hint {
            match (&node_name, raw.node_hint_own) {
                (Some(name), true) => node_hints.insert(name.clone()),
                _ => match self.nodes.get(raw.node_hint_pick % self.nodes.len().max(1)) {
                    Some(node) => node_hints.insert(node.name.clone()),
                    None => node_hints.insert(GHOST_NODE.to_owned()),
                },
            };
        }
        Endpoint {
            address,
            ready: raw.ready,
            serving: raw.serving,
            terminating: raw.terminating,
            node_name: node_name.map(Into::into),
            zone: zone.map(Into::into),
            zone_hints,
            node_hints,
        }
    }

    /// Everything inserted in generation order.
    fn store(&self) -> Store {
        let mut store = Store::new();
        for node in &self.nodes {
            store.upsert_node(node.clone());
        }
        for service in &self.services {
            store.upsert_service(service.clone());
        }
        for slice in &self.slices {
            store.upsert_slice(slice.clone());
        }
        store
    }
}

fn build_service(index: usize, raw: &RawService) -> Service {
    let key = ServiceKey::new(format!("ns-{}", index % 2), format!("svc-{index}"));
    let families = raw.families.list();
    let headless = raw.headless && raw.service_type == ServiceType::ClusterIP;
    let host = index_u8(index + 1);
    let cluster_ips = if headless {
        Vec::new()
    } else {
        families
            .iter()
            .map(|family| match family {
                IpFamily::V4 => v4(10, 96, 0, host),
                IpFamily::V6 => v6(0x96, u16::from(host)),
            })
            .collect()
    };
    let primary = families.first().copied().unwrap_or(IpFamily::V4);
    let externally_typed = matches!(
        raw.service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    // Two ports of different protocols share a number (like DNS on 53); otherwise 80, 81.
    let same_number = raw.protocols.len() == 2 && raw.protocols[0] != raw.protocols[1];
    let ports = raw
        .protocols
        .iter()
        .enumerate()
        .map(|(position, protocol)| ServicePort {
            name: match (raw.protocols.len(), raw.single_port_named) {
                (1, false) => String::new(),
                (1, true) => "web".to_owned(),
                _ => format!("p{position}"),
            },
            protocol: *protocol,
            port: if same_number {
                53
            } else {
                80 + index_u16(position)
            },
            node_port: externally_typed.then(|| 30_000 + index_u16(index * 2 + position)),
        })
        .collect();
    let external_ips = if headless {
        Vec::new()
    } else {
        raw.external_ip
            .map(|pick| match primary {
                IpFamily::V4 => v4(198, 51, 100, pick + 1),
                IpFamily::V6 => v6(0xe, u16::from(pick) + 1),
            })
            .into_iter()
            .collect()
    };
    let load_balancer_ips = if raw.service_type == ServiceType::LoadBalancer && raw.load_balancer_ip
    {
        vec![match primary {
            IpFamily::V4 => v4(203, 0, 113, host),
            IpFamily::V6 => v6(0x1b, u16::from(host)),
        }]
    } else {
        Vec::new()
    };
    Service {
        key,
        service_type: raw.service_type,
        headless,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges: Vec::new(),
        ports,
        session_affinity_timeout: raw.affinity,
        internal_traffic_local: raw.internal_local,
        external_traffic_local: raw.external_local && externally_typed,
        topology_intent: raw.intent,
        proxy_name: raw.proxy_name.map(str::to_owned),
        locality: None,
        health_check_node_port: None,
        scheduler: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers for the properties
// ---------------------------------------------------------------------------------------------

fn config() -> PlanConfig {
    PlanConfig::default()
}

fn plan_all(store: &Store, nodes: &[Node]) -> Vec<NodeTable> {
    nodes
        .iter()
        .map(|node| plan(store, node, &config()))
        .collect()
}

fn json(table: &NodeTable) -> String {
    serde_json::to_string(&table.servers().collect::<Vec<_>>())
        .unwrap_or_else(|error| format!("<serialization failed: {error}>"))
}

/// Whether this proxy should serve `service` at all.
fn is_ours(service: &Service) -> bool {
    !service.headless
        && service.service_type != ServiceType::ExternalName
        && !service.cluster_ips.is_empty()
        && service
            .proxy_name
            .as_deref()
            .is_none_or(|name| name == config().proxy_name)
}

fn slice_port_matches(port: &SlicePort, name: &str, protocol: Protocol) -> bool {
    port.name == name && port.protocol == protocol
}

/// Whether Service port `port` has, in `family`, an endpoint that is Ready whichever way
/// duplicates are merged: an address that is Ready in *every* slice (of that family, with a
/// port of that name and protocol) it appears in, and appears in at least one slice of this
/// cluster.
fn has_surely_ready_endpoint(
    store: &Store,
    service: &Service,
    port: &ServicePort,
    family: IpFamily,
) -> bool {
    let mut all_ready: BTreeMap<IpAddr, bool> = BTreeMap::new();
    let mut in_local_slice: BTreeSet<IpAddr> = BTreeSet::new();
    for slice in store.slices_of(&service.key) {
        if slice.family != family
            || !slice
                .ports
                .iter()
                .any(|p| slice_port_matches(p, &port.name, port.protocol))
        {
            continue;
        }
        for endpoint in &slice.endpoints {
            *all_ready.entry(endpoint.address).or_insert(true) &= endpoint.ready;
            if slice.origin == SliceOrigin::Local {
                in_local_slice.insert(endpoint.address);
            }
        }
    }
    all_ready
        .iter()
        .any(|(address, ready)| *ready && in_local_slice.contains(address))
}

/// Every frontend key of one Service port in one family, with whether Cluster policy
/// applies to it.
fn expected_frontends(
    service: &Service,
    port: &ServicePort,
    family: IpFamily,
    node: &Node,
) -> Vec<(VsKey, Frontend, bool)> {
    let in_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
    let internal_cluster = !service.internal_traffic_local;
    let external_cluster = !service.external_traffic_local;
    let mut keys = Vec::new();
    for ip in service.cluster_ips.iter().filter(in_family) {
        keys.push((
            VsKey::new(port.protocol, *ip, port.port),
            Frontend::ClusterIP,
            internal_cluster,
        ));
    }
    for ip in service.external_ips.iter().filter(in_family) {
        keys.push((
            VsKey::new(port.protocol, *ip, port.port),
            Frontend::ExternalIP,
            external_cluster,
        ));
    }
    for ip in service.load_balancer_ips.iter().filter(in_family) {
        keys.push((
            VsKey::new(port.protocol, *ip, port.port),
            Frontend::LoadBalancer,
            external_cluster,
        ));
    }
    if let Some(node_port) = port.node_port {
        for ip in node.addresses.iter().filter(in_family) {
            keys.push((
                VsKey::new(port.protocol, *ip, node_port),
                Frontend::NodePort,
                external_cluster,
            ));
        }
    }
    keys
}

/// Property 1: every virtual server is a frontend of its Service, and every backend in every
/// tier is an endpoint of one of its slices, with the Service port's target port.
fn check_everything_from_input(
    store: &Store,
    node: &Node,
    table: &NodeTable,
) -> Result<(), TestCaseError> {
    for vs in table.servers() {
        let Some(service) = store.service(&vs.service) else {
            return Err(TestCaseError::fail(format!(
                "{:?} belongs to {} which is not in the store",
                vs.key, vs.service
            )));
        };
        let port = service
            .ports
            .iter()
            .find(|p| p.name == vs.port_name && p.protocol == vs.key.protocol);
        let Some(port) = port else {
            return Err(TestCaseError::fail(format!(
                "{:?} names port {:?}/{} that {} does not have",
                vs.key, vs.port_name, vs.key.protocol, vs.service
            )));
        };
        let frontends = expected_frontends(service, port, vs.key.family, node);
        prop_assert!(
            frontends
                .iter()
                .any(|(key, frontend, _)| *key == vs.key && *frontend == vs.frontend),
            "{:?} ({:?}) is not a frontend of {} port {:?}: {:?}",
            vs.key,
            vs.frontend,
            vs.service,
            vs.port_name,
            frontends
        );
        for backend in vs.tiers.iter().flat_map(|tier| &tier.backends) {
            let found = store.slices_of(&vs.service).any(|slice| {
                slice.family == vs.key.family
                    && slice.ports.iter().any(|p| {
                        slice_port_matches(p, &vs.port_name, vs.key.protocol)
                            && p.port == backend.port
                    })
                    && slice.endpoints.iter().any(|e| e.address == backend.address)
            });
            prop_assert!(
                found,
                "backend {}:{} of {:?} ({}) is in no {} slice of {} with port {:?}/{} = {}",
                backend.address,
                backend.port,
                vs.key,
                node.name,
                vs.key.family,
                vs.service,
                vs.port_name,
                vs.key.protocol,
                backend.port
            );
        }
    }
    Ok(())
}

/// Property 2: a Ready endpoint means a programmed backend wherever Cluster policy applies.
fn check_ready_means_programmed(
    store: &Store,
    node: &Node,
    table: &NodeTable,
) -> Result<(), TestCaseError> {
    for service in store.services().filter(|s| is_ours(s)) {
        let mut families: Vec<IpFamily> = service.cluster_ips.iter().map(IpFamily::of).collect();
        families.dedup();
        for family in families {
            for port in &service.ports {
                if !has_surely_ready_endpoint(store, service, port, family) {
                    continue;
                }
                for (key, frontend, cluster_policy) in
                    expected_frontends(service, port, family, node)
                {
                    if !cluster_policy {
                        continue;
                    }
                    let Some(vs) = table.get(&key) else {
                        return Err(TestCaseError::fail(format!(
                            "{} port {:?} has a Ready endpoint but node {} has no {:?} \
                             virtual server {:?}",
                            service.key, port.name, node.name, frontend, key
                        )));
                    };
                    if vs.service != service.key {
                        prop_assert!(
                            vs.service < service.key,
                            "{:?} is held by {} although {} has the smaller key",
                            key,
                            vs.service,
                            service.key
                        );
                        continue;
                    }
                    prop_assert!(
                        !vs.programmed().is_empty(),
                        "{} port {:?} ({}) has a Ready endpoint but {:?} {:?} on node {} \
                         programs nothing: {:?}",
                        service.key,
                        port.name,
                        family,
                        frontend,
                        key,
                        node.name,
                        vs
                    );
                }
            }
        }
    }
    Ok(())
}

/// The traffic policy docs/design.md rule 4 puts on a frontend of `service`.
fn expected_policy(service: &Service, frontend: Frontend) -> TrafficPolicy {
    let local = if frontend.is_external() {
        service.external_traffic_local
    } else {
        service.internal_traffic_local
    };
    if local {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    }
}

/// Property 5: tiers are never empty, each backend (address, port) appears once per virtual
/// server, and backends within a tier are strictly sorted by (address, port). Also: tier kinds
/// are distinct and in fallback order ([`TierKind`]'s order), a Cluster-policy server only has
/// cluster tiers, and a Local-policy server only has node-local tiers of this node's endpoints.
fn check_tiers(store: &Store, node: &Node, vs: &VirtualServer) -> Result<(), TestCaseError> {
    let mut seen = BTreeSet::new();
    for tier in &vs.tiers {
        prop_assert!(
            !tier.backends.is_empty(),
            "{:?} has an empty {:?} tier",
            vs.key,
            tier.kind
        );
        for pair in tier.backends.windows(2) {
            prop_assert!(
                (pair[0].address, pair[0].port) < (pair[1].address, pair[1].port),
                "{:?} tier {:?} is not strictly sorted by (address, port): {}:{} then {}:{}",
                vs.key,
                tier.kind,
                pair[0].address,
                pair[0].port,
                pair[1].address,
                pair[1].port
            );
        }
        for backend in &tier.backends {
            prop_assert!(
                seen.insert((backend.address, backend.port)),
                "{:?}: backend {}:{} appears in more than one tier (again in {:?})",
                vs.key,
                backend.address,
                backend.port,
                tier.kind
            );
        }
    }
    let kinds: Vec<TierKind> = vs.tiers.iter().map(|tier| tier.kind).collect();
    prop_assert!(
        kinds.windows(2).all(|pair| pair[0] < pair[1]),
        "{:?}: tier kinds not distinct and in fallback order: {:?}",
        vs.key,
        kinds
    );
    let Some(service) = store.service(&vs.service) else {
        return Err(TestCaseError::fail(format!(
            "{} not in the store",
            vs.service
        )));
    };
    let policy = expected_policy(service, vs.frontend);
    prop_assert_eq!(vs.traffic_policy, policy, "traffic policy of {:?}", vs.key);
    for tier in &vs.tiers {
        let local_kind = matches!(
            tier.kind,
            TierKind::NodeLocal | TierKind::NodeLocalServingTerminating
        );
        prop_assert_eq!(
            local_kind,
            policy == TrafficPolicy::Local,
            "{:?} with {:?} policy has a {:?} tier",
            vs.key,
            policy,
            tier.kind
        );
        if local_kind {
            for backend in &tier.backends {
                prop_assert_eq!(
                    backend.node_name.as_deref(),
                    Some(node.name.as_str()),
                    "{:?}: backend {}:{} in a node-local tier is not on node {}",
                    vs.key,
                    backend.address,
                    backend.port,
                    node.name
                );
            }
        }
    }
    Ok(())
}

/// What kube-proxy's `CategorizeEndpoints` programs for one Service port in one family under
/// `policy` on `node` (docs/design.md, "Endpoint selection", rules 1–3), as a set of
/// (address, port); `None` when the answer depends on how duplicates are merged (the same
/// `IP:port` twice with different conditions, hints or node) or when the Service has slices
/// from other clusters, which kube-proxy does not know.
fn kube_proxy_selection(
    store: &Store,
    service: &Service,
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
    node: &Node,
    policy: TrafficPolicy,
) -> Option<BTreeSet<(IpAddr, u16)>> {
    let mut merged: BTreeMap<(IpAddr, u16), &Endpoint> = BTreeMap::new();
    for slice in store.slices_of(&service.key) {
        if slice.origin != SliceOrigin::Local {
            return None;
        }
        if slice.family != family {
            continue;
        }
        for slice_port in slice
            .ports
            .iter()
            .filter(|p| slice_port_matches(p, port_name, protocol))
        {
            for endpoint in &slice.endpoints {
                let previous = merged.insert((endpoint.address, slice_port.port), endpoint);
                if previous.is_some_and(|previous| previous != endpoint) {
                    return None;
                }
            }
        }
    }
    let select = |keep: &dyn Fn(&Endpoint) -> bool| -> BTreeSet<(IpAddr, u16)> {
        merged
            .iter()
            .filter(|(_, endpoint)| keep(endpoint))
            .map(|(key, _)| *key)
            .collect()
    };
    let serving_terminating = |e: &Endpoint| e.serving && e.terminating;
    match policy {
        TrafficPolicy::Local => {
            let is_local = |e: &Endpoint| e.node_name.as_deref() == Some(node.name.as_str());
            let ready = select(&|e| is_local(e) && e.ready);
            if ready.is_empty() {
                Some(select(&|e| {
                    is_local(e) && !e.ready && serving_terminating(e)
                }))
            } else {
                Some(ready)
            }
        }
        TrafficPolicy::Cluster => {
            let ready: Vec<&Endpoint> = merged.values().copied().filter(|e| e.ready).collect();
            let all_node_hints = ready.iter().all(|e| !e.node_hints.is_empty());
            let for_node = ready.iter().any(|e| e.node_hints.contains(&node.name));
            let all_zone_hints = ready.iter().all(|e| !e.zone_hints.is_empty());
            let zone = node.zone.as_deref();
            let for_zone =
                zone.is_some_and(|zone| ready.iter().any(|e| e.zone_hints.contains(zone)));
            let filtered = if all_node_hints && for_node {
                select(&|e| e.ready && e.node_hints.contains(&node.name))
            } else if all_zone_hints && for_zone {
                select(&|e| e.ready && zone.is_some_and(|zone| e.zone_hints.contains(zone)))
            } else {
                select(&|e| e.ready)
            };
            if filtered.is_empty() {
                Some(select(&serving_terminating))
            } else {
                Some(filtered)
            }
        }
    }
}

/// Property 7: the programmed set is what kube-proxy programs, wherever that is unambiguous.
fn check_kube_proxy_parity(
    store: &Store,
    node: &Node,
    table: &NodeTable,
    compared: &mut usize,
) -> Result<(), TestCaseError> {
    for vs in table.servers() {
        let Some(service) = store.service(&vs.service) else {
            return Err(TestCaseError::fail(format!(
                "{} not in the store",
                vs.service
            )));
        };
        let policy = expected_policy(service, vs.frontend);
        let Some(expected) = kube_proxy_selection(
            store,
            service,
            &vs.port_name,
            vs.key.protocol,
            vs.key.family,
            node,
            policy,
        ) else {
            continue;
        };
        *compared += 1;
        let programmed: BTreeSet<(IpAddr, u16)> = vs
            .programmed()
            .iter()
            .map(|backend| (backend.address, backend.port))
            .collect();
        prop_assert_eq!(
            &programmed,
            &expected,
            "{:?} ({:?}, {:?} policy) of {} on node {} (zone {:?}) programs {:?}, kube-proxy \
             would program {:?}; tiers {:?}",
            vs.key,
            vs.frontend,
            policy,
            vs.service,
            node.name,
            node.zone,
            programmed,
            expected,
            vs.tiers
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Orders and changes
// ---------------------------------------------------------------------------------------------

/// A different insertion order for the same cluster.
#[derive(Debug, Clone)]
struct Reordering {
    /// Indices into services (`< services.len()`) and slices (the rest), interleaved.
    objects: Vec<usize>,
    nodes: Vec<usize>,
    /// Per slice, a permutation of its endpoints.
    endpoints: Vec<Vec<usize>>,
}

fn cluster_and_reordering() -> impl Strategy<Value = (Cluster, Reordering)> {
    cluster().prop_flat_map(|cluster| {
        let objects = cluster.services.len() + cluster.slices.len();
        let endpoints: Vec<_> = cluster
            .slices
            .iter()
            .map(|slice| Just((0..slice.endpoints.len()).collect::<Vec<_>>()).prop_shuffle())
            .collect();
        (
            Just((0..objects).collect::<Vec<_>>()).prop_shuffle(),
            Just((0..cluster.nodes.len()).collect::<Vec<_>>()).prop_shuffle(),
            endpoints,
            Just(cluster),
        )
            .prop_map(|(objects, nodes, endpoints, cluster)| {
                (
                    cluster,
                    Reordering {
                        objects,
                        nodes,
                        endpoints,
                    },
                )
            })
    })
}

fn reordered_store(cluster: &Cluster, order: &Reordering) -> Store {
    let mut store = Store::new();
    for &index in &order.nodes {
        store.upsert_node(cluster.nodes[index].clone());
    }
    for &index in &order.objects {
        if let Some(service) = cluster.services.get(index) {
            store.upsert_service(service.clone());
            continue;
        }
        let slice_index = index - cluster.services.len();
        let mut slice = cluster.slices[slice_index].clone();
        slice.endpoints = order.endpoints[slice_index]
            .iter()
            .map(|&e| cluster.slices[slice_index].endpoints[e].clone())
            .collect();
        store.upsert_slice(slice);
    }
    store
}

/// One change to the store; `pick`s select objects modulo their count.
#[derive(Debug, Clone)]
enum Change {
    ReplaceSlice {
        pick: usize,
        slice: RawSlice,
    },
    AddSlice {
        pick: usize,
        slice: RawSlice,
    },
    MoveSlice {
        pick: usize,
        to: usize,
    },
    RemoveSlice {
        pick: usize,
    },
    FlipFirstEndpoint {
        pick: usize,
    },
    TogglePolicies {
        pick: usize,
    },
    /// Adds externalIP number `ip` of the pool, or removes the Service's externalIPs.
    ToggleExternalIp {
        pick: usize,
        ip: u8,
    },
    RemoveService {
        pick: usize,
    },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<usize>(), raw_slice()).prop_map(|(pick, slice)| Change::ReplaceSlice { pick, slice }),
        2 => (any::<usize>(), raw_slice()).prop_map(|(pick, slice)| Change::AddSlice { pick, slice }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(pick, to)| Change::MoveSlice { pick, to }),
        1 => any::<usize>().prop_map(|pick| Change::RemoveSlice { pick }),
        2 => any::<usize>().prop_map(|pick| Change::FlipFirstEndpoint { pick }),
        1 => any::<usize>().prop_map(|pick| Change::TogglePolicies { pick }),
        2 => any::<usize>().prop_map(|pick| Change::RemoveService { pick }),
        2 => (any::<usize>(), 0u8..2).prop_map(|(pick, ip)| Change::ToggleExternalIp { pick, ip }),
    ]
}

fn pick<T>(items: &[T], pick: usize) -> Option<&T> {
    if items.is_empty() {
        None
    } else {
        items.get(pick % items.len())
    }
}

/// Applies `change` to `store`; returns the Service keys to re-plan.
fn apply(cluster: &Cluster, store: &mut Store, change: &Change, serial: usize) -> Vec<ServiceKey> {
    let services: Vec<Service> = store.services().cloned().collect();
    let slices: Vec<EndpointSlice> = services
        .iter()
        .flat_map(|service| store.slices_of(&service.key).cloned().collect::<Vec<_>>())
        .collect();
    match change {
        Change::ReplaceSlice { pick: p, slice } => {
            let Some(old) = pick(&slices, *p) else {
                return Vec::new();
            };
            let Some(service) = store.service(&old.service).cloned() else {
                return Vec::new();
            };
            let new = cluster.build_slice(slice, &service, old.name.clone());
            store.upsert_slice(new)
        }
        Change::AddSlice { pick: p, slice } => {
            let Some(service) = pick(&services, *p) else {
                return Vec::new();
            };
            let name = format!("{}-new{serial}", service.key.name);
            let new = cluster.build_slice(slice, service, name);
            store.upsert_slice(new)
        }
        Change::MoveSlice { pick: p, to } => {
            let (Some(old), Some(target)) = (pick(&slices, *p), pick(&services, *to)) else {
                return Vec::new();
            };
            let mut moved = old.clone();
            moved.service = target.key.clone();
            store.upsert_slice(moved)
        }
        Change::RemoveSlice { pick: p } => match pick(&slices, *p) {
            Some(old) => store.remove_slice(&SliceKey::of(old)).into_iter().collect(),
            None => Vec::new(),
        },
        Change::FlipFirstEndpoint { pick: p } => {
            let Some(service) = pick(&services, *p) else {
                return Vec::new();
            };
            match with_endpoint_flipped(store, &service.key) {
                Some(flipped) => store.upsert_slice(flipped),
                None => Vec::new(),
            }
        }
        Change::TogglePolicies { pick: p } => {
            let Some(service) = pick(&services, *p) else {
                return Vec::new();
            };
            let mut changed = service.clone();
            changed.internal_traffic_local = !changed.internal_traffic_local;
            if matches!(
                changed.service_type,
                ServiceType::NodePort | ServiceType::LoadBalancer
            ) {
                changed.external_traffic_local = !changed.external_traffic_local;
            }
            vec![store.upsert_service(changed)]
        }
        Change::ToggleExternalIp { pick: p, ip } => {
            let Some(service) = pick(&services, *p) else {
                return Vec::new();
            };
            let mut changed = service.clone();
            if changed.external_ips.is_empty() {
                changed.external_ips.push(v4(198, 51, 100, ip + 1));
            } else {
                changed.external_ips.clear();
            }
            vec![store.upsert_service(changed)]
        }
        Change::RemoveService { pick: p } => {
            let Some(service) = pick(&services, *p) else {
                return Vec::new();
            };
            let key = service.key.clone();
            store.remove_service(&key);
            vec![key]
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Keep the repository clean: no proptest-regressions files next to this test.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Property 1: frontends and backends (programmed or in any tier) all come from the input.
    #[test]
    fn every_backend_exists_in_the_input(cluster in cluster()) {
        let store = cluster.store();
        for node in &cluster.nodes {
            let table = plan(&store, node, &config());
            check_everything_from_input(&store, node, &table)?;
        }
    }

    /// Property 2: Ready endpoint ⇒ programmed backend on every node, under Cluster policy.
    #[test]
    fn ready_endpoints_are_programmed_under_cluster_policy(cluster in cluster()) {
        let store = cluster.store();
        for node in &cluster.nodes {
            let table = plan(&store, node, &config());
            check_ready_means_programmed(&store, node, &table)?;
        }
    }

    /// Property 3: the plan does not depend on the order objects arrive in, nor on the order
    /// of endpoints within a slice.
    #[test]
    fn planning_is_independent_of_order((cluster, order) in cluster_and_reordering()) {
        let first = cluster.store();
        let second = reordered_store(&cluster, &order);
        for node in &cluster.nodes {
            let a = plan(&first, node, &config());
            let b = plan(&second, node, &config());
            prop_assert_eq!(json(&a), json(&b), "node {}", node.name);
            prop_assert!(a == b, "tables differ on node {}", node.name);
            prop_assert_eq!(a.conflicts(), b.conflicts(), "node {}", node.name);
            // And planning twice gives the same answer.
            let again = plan(&first, node, &config());
            prop_assert!(a == again, "planning twice differs on node {}", node.name);
        }
    }

    /// Property 4: re-planning only the affected Services equals a full plan, after each of a
    /// few changes in a row.
    #[test]
    fn replan_equals_full_plan(
        cluster in cluster(),
        changes in prop::collection::vec(change(), 1..=3),
    ) {
        let mut store = cluster.store();
        let mut tables = plan_all(&store, &cluster.nodes);
        for (serial, change) in changes.iter().enumerate() {
            let affected = apply(&cluster, &mut store, change, serial);
            for (node, table) in cluster.nodes.iter().zip(tables.iter_mut()) {
                for key in &affected {
                    replan_service(table, &store, key, node, &config());
                }
                let full = plan(&store, node, &config());
                prop_assert_eq!(
                    json(table),
                    json(&full),
                    "after change {} ({:?}) on node {}",
                    serial,
                    change,
                    node.name
                );
                prop_assert!(*table == full);
                prop_assert_eq!(table.conflicts(), full.conflicts());
            }
        }
    }

    /// Property 5: tier invariants.
    #[test]
    fn tiers_are_non_empty_disjoint_and_sorted(cluster in cluster()) {
        let store = cluster.store();
        for node in &cluster.nodes {
            let table = plan(&store, node, &config());
            for vs in table.servers() {
                check_tiers(&store, node, vs)?;
            }
        }
    }

    /// Property 7: the programmed set matches kube-proxy's selection where that is defined.
    #[test]
    fn programmed_set_matches_kube_proxy(cluster in cluster()) {
        let store = cluster.store();
        let mut compared = 0;
        for node in &cluster.nodes {
            let table = plan(&store, node, &config());
            check_kube_proxy_parity(&store, node, &table, &mut compared)?;
        }
    }

    /// Property 6: headless Services and Services labelled for another proxy get nothing.
    #[test]
    fn skipped_services_contribute_nothing(cluster in cluster()) {
        let store = cluster.store();
        let skipped: BTreeSet<&ServiceKey> = cluster
            .services
            .iter()
            .filter(|s| !is_ours(s))
            .map(|s| &s.key)
            .collect();
        for node in &cluster.nodes {
            let table = plan(&store, node, &config());
            for vs in table.servers() {
                prop_assert!(
                    !skipped.contains(&vs.service),
                    "{} should be skipped but has {:?}",
                    vs.service,
                    vs.key
                );
            }
        }
    }
}

/// The generator really produces the situations the properties are about; without this, a
/// generator bug could make every property vacuous.
#[test]
fn generator_covers_the_interesting_cases() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    let mut runner = TestRunner::new(Config::default());
    let strategy = cluster();
    let mut seen: BTreeSet<&'static str> = BTreeSet::new();
    for _ in 0..300 {
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        let cluster = tree.current();
        let store = cluster.store();
        for service in &cluster.services {
            if service.cluster_ips.len() == 2 {
                seen.insert("dual-stack service");
            }
            if !is_ours(service) {
                seen.insert("skipped service");
            }
            let slices: Vec<_> = store.slices_of(&service.key).collect();
            let mut addresses = BTreeSet::new();
            for slice in &slices {
                if slice.family == IpFamily::V6 {
                    seen.insert("IPv6 slice");
                }
                if slice.origin != SliceOrigin::Local {
                    seen.insert("remote slice");
                }
                let mut in_slice = BTreeSet::new();
                for endpoint in &slice.endpoints {
                    if !addresses.insert(endpoint.address) && in_slice.insert(endpoint.address) {
                        seen.insert("address in two slices");
                    }
                    in_slice.insert(endpoint.address);
                    if !endpoint.zone_hints.is_empty() {
                        seen.insert("zone hint");
                    }
                    if !endpoint.node_hints.is_empty() {
                        seen.insert("node hint");
                    }
                    if !endpoint.ready && endpoint.serving && endpoint.terminating {
                        seen.insert("serving-terminating endpoint");
                    }
                }
            }
        }
        for node in &cluster.nodes {
            if node.zone.is_none() {
                seen.insert("node without zone");
            }
            let table = plan(&store, node, &config());
            if !table.conflicts().is_empty() {
                seen.insert("conflict");
            }
            for vs in table.servers() {
                if vs.programmed().is_empty() {
                    seen.insert("virtual server without backends");
                } else {
                    seen.insert("virtual server with backends");
                }
                if vs.tiers.len() > 1 {
                    seen.insert("several tiers");
                }
                if vs.topology != topoproxy::table::TopologyMode::None {
                    seen.insert("topology filter applied");
                }
                match vs.frontend {
                    Frontend::NodePort => seen.insert("node port"),
                    Frontend::LoadBalancer => seen.insert("load balancer"),
                    Frontend::ExternalIP => seen.insert("external IP"),
                    Frontend::ClusterIP => seen.insert("cluster IP"),
                };
                if vs.key.family == IpFamily::V6 {
                    seen.insert("IPv6 virtual server");
                }
                if vs.traffic_policy == TrafficPolicy::Local && !vs.programmed().is_empty() {
                    seen.insert("local policy with backends");
                }
                let comparable = store.service(&vs.service).and_then(|service| {
                    kube_proxy_selection(
                        &store,
                        service,
                        &vs.port_name,
                        vs.key.protocol,
                        vs.key.family,
                        node,
                        expected_policy(service, vs.frontend),
                    )
                });
                if comparable.is_some_and(|set| !set.is_empty()) {
                    seen.insert("kube-proxy parity checked with backends");
                }
            }
        }
    }
    let wanted = [
        "dual-stack service",
        "skipped service",
        "IPv6 slice",
        "remote slice",
        "address in two slices",
        "zone hint",
        "node hint",
        "serving-terminating endpoint",
        "node without zone",
        "conflict",
        "virtual server without backends",
        "virtual server with backends",
        "several tiers",
        "topology filter applied",
        "node port",
        "load balancer",
        "external IP",
        "cluster IP",
        "IPv6 virtual server",
        "local policy with backends",
        "kube-proxy parity checked with backends",
    ];
    let missing: Vec<_> = wanted.iter().filter(|w| !seen.contains(*w)).collect();
    assert!(missing.is_empty(), "generator never produced: {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// Locality policies (topoproxy.io/topology, --topology-default)
// ---------------------------------------------------------------------------------------------

fn locality_config(node_policy: bool) -> PlanConfig {
    PlanConfig {
        default_locality: if node_policy {
            LocalityPolicy::Node
        } else {
            LocalityPolicy::Zone
        },
        ..PlanConfig::default()
    }
}

/// Whether some slice of `service` has a Ready endpoint at `address:port`.
fn has_ready_entry(store: &Store, service: &ServiceKey, address: IpAddr, port: u16) -> bool {
    store.slices_of(service).any(|slice| {
        slice.ports.iter().any(|p| p.port == port)
            && slice
                .endpoints
                .iter()
                .any(|endpoint| endpoint.address == address && endpoint.ready)
    })
}

fn check_locality_server(store: &Store, vs: &VirtualServer) -> Result<(), TestCaseError> {
    if vs.tiers.is_empty() {
        return Ok(());
    }
    let shares: Vec<u32> = vs
        .tiers
        .iter()
        .map(|tier| tier.share_ppm.unwrap_or(u32::MAX))
        .collect();
    prop_assert!(
        shares.iter().all(|&share| share <= SHARE_WHOLE),
        "{:?}: a tier without a share: {:?}",
        vs.key,
        shares
    );
    prop_assert_eq!(
        shares.iter().sum::<u32>(),
        SHARE_WHOLE,
        "{:?}: shares {:?} do not sum to the whole",
        vs.key,
        shares
    );
    prop_assert!(
        !vs.programmed().is_empty(),
        "{:?}: sends to nothing",
        vs.key
    );
    let mut weighted_total = 0.0f64;
    for tier in &vs.tiers {
        let share = tier.share_ppm.unwrap_or(0);
        for backend in &tier.backends {
            if share == 0 {
                prop_assert_eq!(
                    backend.weight,
                    0,
                    "{:?}: weight in a tier without share",
                    vs.key
                );
            } else {
                prop_assert!(
                    backend.weight >= 1,
                    "{:?}: weightless backend in use",
                    vs.key
                );
            }
            weighted_total += f64::from(backend.weight);
        }
        if share > 0 && tier.kind == TierKind::ServingTerminating {
            prop_assert_eq!(
                vs.tiers.len(),
                1,
                "{:?}: last resort used beside Ready tiers",
                vs.key
            );
        } else if share > 0 {
            for backend in &tier.backends {
                prop_assert!(
                    has_ready_entry(store, &vs.service, backend.address, backend.port),
                    "{:?}: {}:{} in tier {:?} with share {} is not Ready",
                    vs.key,
                    backend.address,
                    backend.port,
                    tier.kind,
                    share
                );
            }
        }
    }
    // The weights deliver the planned shares (within the documented tolerance).
    for tier in &vs.tiers {
        let weight: f64 = tier.backends.iter().map(|b| f64::from(b.weight)).sum();
        let real = weight / weighted_total * f64::from(SHARE_WHOLE);
        let planned = f64::from(tier.share_ppm.unwrap_or(0));
        prop_assert!(
            (real - planned).abs() <= f64::from(WEIGHT_TOLERANCE_PPM) + 1.0,
            "{:?}: tier {:?} planned {} ppm, weights give {:.0}",
            vs.key,
            tier.kind,
            planned,
            real
        );
    }
    Ok(())
}

/// Random tiers for the spill rule: (ready, not ready, capacity guard).
fn raw_tier_health() -> impl Strategy<Value = TierHealth> {
    (0usize..6, 0usize..6, prop::option::of(0.0f64..3.0)).prop_map(|(ready, down, capacity)| {
        TierHealth {
            ready,
            total: ready + down,
            capacity,
        }
    })
}

/// Cumulative shares through each tier.
fn cumulative(loads: &[topoproxy::planner::spill::TierLoad]) -> Vec<u32> {
    loads
        .iter()
        .scan(0u32, |sum, load| {
            *sum += load.share_ppm;
            Some(*sum)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Locality 1: shares sum to the whole; only tiers with Ready endpoints take connections
    /// (serving-terminating ones only when nothing is Ready); weights deliver the shares;
    /// something is always programmed when some tier exists.
    #[test]
    fn locality_shares_are_whole_and_only_ready_tiers_take_connections(
        cluster in cluster(),
        node_policy in any::<bool>(),
    ) {
        let store = cluster.store();
        let config = locality_config(node_policy);
        for node in &cluster.nodes {
            let table = plan(&store, node, &config);
            for vs in table.servers().filter(|vs| !vs.locality.is_kube_proxy()) {
                prop_assert_eq!(vs.traffic_policy, TrafficPolicy::Cluster);
                check_locality_server(&store, vs)?;
            }
        }
    }

    /// Locality 2: what is not opted in is kube-proxy's — Local-policy virtual servers under a
    /// locality default, and every Service annotated `kube-proxy`, whatever the default.
    #[test]
    fn opted_out_servers_are_kube_proxys(cluster in cluster(), node_policy in any::<bool>()) {
        let store = cluster.store();
        let opted_config = locality_config(node_policy);
        let mut annotated = Store::new();
        for node in &cluster.nodes {
            annotated.upsert_node(node.clone());
        }
        for service in &cluster.services {
            let mut service = service.clone();
            service.locality = Some(LocalityPolicy::KubeProxy);
            annotated.upsert_service(service);
        }
        for slice in &cluster.slices {
            annotated.upsert_slice(slice.clone());
        }
        for node in &cluster.nodes {
            let kube_proxy = plan(&store, node, &config());
            let opted = plan(&store, node, &opted_config);
            for vs in opted.servers().filter(|vs| vs.traffic_policy == TrafficPolicy::Local) {
                prop_assert_eq!(Some(vs), kube_proxy.get(&vs.key));
            }
            let explicit = plan(&annotated, node, &opted_config);
            prop_assert_eq!(json(&explicit), json(&kube_proxy), "node {}", node.name);
        }
    }

    /// Locality 3: re-planning only the affected Services equals a full plan.
    #[test]
    fn locality_replan_equals_full_plan(
        cluster in cluster(),
        changes in prop::collection::vec(change(), 1..=3),
        node_policy in any::<bool>(),
    ) {
        let config = locality_config(node_policy);
        let mut store = cluster.store();
        let mut tables: Vec<NodeTable> =
            cluster.nodes.iter().map(|node| plan(&store, node, &config)).collect();
        for (serial, change) in changes.iter().enumerate() {
            let affected = apply(&cluster, &mut store, change, serial);
            for (node, table) in cluster.nodes.iter().zip(tables.iter_mut()) {
                for key in &affected {
                    replan_service(table, &store, key, node, &config);
                }
                let full = plan(&store, node, &config);
                prop_assert_eq!(json(table), json(&full), "after {:?} on {}", change, node.name);
            }
        }
    }

    /// Locality 4: the spill rule is monotone in tier health. One more Ready endpoint in a
    /// usable tier never lowers the share served up to and beyond that tier, never raises
    /// the share of the tiers before it; and shares always sum to the whole.
    #[test]
    fn spill_is_monotone_in_tier_health(
        tiers in prop::collection::vec(raw_tier_health(), 1..6),
        pick in any::<usize>(),
    ) {
        let before = spill(&tiers);
        let usable = tiers.iter().any(|t| t.ready > 0);
        let sum: u32 = before.iter().map(|l| l.share_ppm).sum();
        prop_assert_eq!(sum, if usable { SHARE_WHOLE } else { 0 });
        for (tier, load) in tiers.iter().zip(&before) {
            if tier.ready == 0 {
                prop_assert_eq!(load.share_ppm, 0);
            }
        }
        let candidates: Vec<usize> = (0..tiers.len())
            .filter(|&i| tiers[i].ready > 0 && tiers[i].ready < tiers[i].total)
            .collect();
        if let Some(&healthier) = candidates.get(pick % candidates.len().max(1)) {
            let mut better = tiers.clone();
            better[healthier].ready += 1;
            let after = spill(&better);
            let (b, a) = (cumulative(&before), cumulative(&after));
            for k in 0..tiers.len() {
                if k >= healthier {
                    prop_assert!(a[k] + 1 >= b[k], "through tier {k}: {b:?} -> {a:?}");
                } else {
                    prop_assert!(a[k] <= b[k] + 1, "through tier {k}: {b:?} -> {a:?}");
                }
            }
        }
    }
}
