//! Table-driven tests of endpoint selection, written from the Kubernetes semantics
//! (KEP-2433 topology hints, KEP-1669 terminating endpoints, KEP-2086 internal traffic policy,
//! KEP-4444 trafficDistribution) rather than from the implementation.

use std::net::IpAddr;

use super::explain::explain;
use super::*;
use crate::model::{
    Endpoint, EndpointSlice, Hints, Node, Protocol, Service, ServicePort, ServiceType, SliceOrigin,
    SlicePort, TopologyIntent,
};
use crate::table::TierKind;

pub(super) const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

pub(super) fn node(name: &str, zone: Option<&str>, addresses: &[&str]) -> Node {
    Node {
        name: name.to_owned(),
        zone: zone.map(str::to_owned),
        region: None,
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        leaving: None,
        local_addresses: None,
    }
}

pub(super) fn port(name: &str, protocol: Protocol, number: u16) -> ServicePort {
    ServicePort {
        name: name.to_owned(),
        protocol,
        port: number,
        node_port: None,
    }
}

pub(super) fn service(name: &str, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        key: ServiceKey::new("default", name),
        service_type: ServiceType::ClusterIP,
        headless: false,
        cluster_ips: vec![ip(cluster_ip)],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        ports,
        session_affinity_timeout: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        topology_intent: TopologyIntent::None,
        proxy_name: None,
        locality: None,
        health_check_node_port: None,
        scheduler: None,
    }
}

/// A Ready endpoint on `node` in `zone`, without hints.
pub(super) fn ep(address: &str, node: &str, zone: &str) -> Endpoint {
    Endpoint {
        address: ip(address),
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
        zone: Some(zone.into()),
        zone_hints: Hints::default(),
        node_hints: Hints::default(),
    }
}

pub(super) fn zone_hint(mut endpoint: Endpoint, zones: &[&str]) -> Endpoint {
    endpoint.zone_hints = zones.iter().map(|z| (*z).to_owned()).collect();
    endpoint
}

fn node_hint(mut endpoint: Endpoint, nodes: &[&str]) -> Endpoint {
    endpoint.node_hints = nodes.iter().map(|n| (*n).to_owned()).collect();
    endpoint
}

/// Terminating; `serving` says whether it still passes its readiness probe.
pub(super) fn terminating(mut endpoint: Endpoint, serving: bool) -> Endpoint {
    endpoint.ready = false;
    endpoint.serving = serving;
    endpoint.terminating = true;
    endpoint
}

pub(super) fn not_ready(mut endpoint: Endpoint) -> Endpoint {
    endpoint.ready = false;
    endpoint.serving = false;
    endpoint
}

pub(super) fn slice(
    service: &str,
    name: &str,
    ports: &[(&str, Protocol, u16)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let family = endpoints
        .first()
        .map(|e| IpFamily::of(&e.address))
        .unwrap_or(IpFamily::V4);
    EndpointSlice {
        name: name.to_owned(),
        service: ServiceKey::new("default", service),
        family,
        origin: SliceOrigin::Local,
        ports: ports
            .iter()
            .map(|(name, protocol, port)| SlicePort {
                name: (*name).to_owned(),
                protocol: *protocol,
                port: *port,
            })
            .collect(),
        endpoints,
    }
}

pub(super) fn store(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Store {
    let mut store = Store::new();
    for service in services {
        store.upsert_service(service);
    }
    for slice in slices {
        store.upsert_slice(slice);
    }
    store
}

fn plan_for(store: &Store, node: &Node) -> NodeTable {
    plan(store, node, &PlanConfig::default())
}

/// `ip:port` of the programmed backends of the virtual server `protocol address:port`.
fn programmed(table: &NodeTable, protocol: Protocol, address: &str, port: u16) -> Vec<String> {
    let key = VsKey::new(protocol, ip(address), port);
    let vs = table
        .get(&key)
        .unwrap_or_else(|| panic!("no virtual server {protocol} {address}:{port}"));
    vs.programmed()
        .iter()
        .map(|b| SocketAddrText(b.address, b.port).to_string())
        .collect()
}

fn tiers(
    table: &NodeTable,
    protocol: Protocol,
    address: &str,
    port: u16,
) -> Vec<(TierKind, usize)> {
    let key = VsKey::new(protocol, ip(address), port);
    table
        .get(&key)
        .map(|vs| {
            vs.tiers
                .iter()
                .map(|t| (t.kind, t.backends.len()))
                .collect()
        })
        .unwrap_or_default()
}

struct SocketAddrText(IpAddr, u16);

impl std::fmt::Display for SocketAddrText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.0, self.1))
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The four-node, two-zone cluster of the issue: nodes a1, a2 in zone a, b1, b2 in zone b.
fn four_nodes() -> Vec<Node> {
    vec![
        node("a1", Some("a"), &["192.168.0.11"]),
        node("a2", Some("a"), &["192.168.0.12"]),
        node("b1", Some("b"), &["192.168.0.21"]),
        node("b2", Some("b"), &["192.168.0.22"]),
    ]
}

fn dns(mut service: Service) -> Service {
    service.topology_intent = TopologyIntent::Auto;
    service
}

fn dns_store(endpoints: Vec<Endpoint>) -> Store {
    store(
        vec![dns(service(
            "dns",
            "10.96.0.10",
            vec![port("dns", UDP, 53), port("dns-tcp", TCP, 53)],
        ))],
        vec![slice(
            "dns",
            "dns-abc",
            &[("dns", UDP, 53), ("dns-tcp", TCP, 53)],
            endpoints,
        )],
    )
}

#[test]
fn zone_hints_across_four_nodes_and_their_scale_downs() {
    struct Case {
        name: &'static str,
        endpoints: Vec<Endpoint>,
        /// Expected programmed UDP backends for a1, a2, b1, b2.
        expected: [&'static [&'static str]; 4],
    }
    let cases = vec![
        Case {
            name: "four endpoints hinted for their zones: each node gets its zone's two",
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
                zone_hint(ep("10.244.2.2", "a2", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
                zone_hint(ep("10.244.4.2", "b2", "b"), &["b"]),
            ],
            expected: [
                &["10.244.1.2:53", "10.244.2.2:53"],
                &["10.244.1.2:53", "10.244.2.2:53"],
                &["10.244.3.2:53", "10.244.4.2:53"],
                &["10.244.3.2:53", "10.244.4.2:53"],
            ],
        },
        Case {
            name: "scaled to one endpoint per zone",
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
            ],
            expected: [
                &["10.244.1.2:53"],
                &["10.244.1.2:53"],
                &["10.244.3.2:53"],
                &["10.244.3.2:53"],
            ],
        },
        Case {
            name: "scaled to one endpoint whose hints the controller removed: all fall back to it",
            endpoints: vec![ep("10.244.1.2", "a1", "a")],
            expected: [
                &["10.244.1.2:53"],
                &["10.244.1.2:53"],
                &["10.244.1.2:53"],
                &["10.244.1.2:53"],
            ],
        },
        Case {
            name: "one zone-b endpoint lent to zone a by the controller",
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["a"]),
                zone_hint(ep("10.244.4.2", "b2", "b"), &["b"]),
            ],
            expected: [
                &["10.244.1.2:53", "10.244.3.2:53"],
                &["10.244.1.2:53", "10.244.3.2:53"],
                &["10.244.4.2:53"],
                &["10.244.4.2:53"],
            ],
        },
        Case {
            name: "one ready endpoint lacks a hint: hints ignored everywhere",
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
                zone_hint(ep("10.244.2.2", "a2", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
                ep("10.244.4.2", "b2", "b"),
            ],
            expected: [
                &[
                    "10.244.1.2:53",
                    "10.244.2.2:53",
                    "10.244.3.2:53",
                    "10.244.4.2:53",
                ],
                &[
                    "10.244.1.2:53",
                    "10.244.2.2:53",
                    "10.244.3.2:53",
                    "10.244.4.2:53",
                ],
                &[
                    "10.244.1.2:53",
                    "10.244.2.2:53",
                    "10.244.3.2:53",
                    "10.244.4.2:53",
                ],
                &[
                    "10.244.1.2:53",
                    "10.244.2.2:53",
                    "10.244.3.2:53",
                    "10.244.4.2:53",
                ],
            ],
        },
        Case {
            name: "an unhinted endpoint that is not ready does not count against the hints",
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
                not_ready(ep("10.244.4.2", "b2", "b")),
            ],
            expected: [
                &["10.244.1.2:53"],
                &["10.244.1.2:53"],
                &["10.244.3.2:53"],
                &["10.244.3.2:53"],
            ],
        },
        Case {
            name: "all endpoints terminating but serving: used cluster-wide, hints ignored",
            endpoints: vec![
                terminating(zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]), true),
                terminating(zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]), true),
                terminating(zone_hint(ep("10.244.4.2", "b2", "b"), &["b"]), false),
            ],
            expected: [
                &["10.244.1.2:53", "10.244.3.2:53"],
                &["10.244.1.2:53", "10.244.3.2:53"],
                &["10.244.1.2:53", "10.244.3.2:53"],
                &["10.244.1.2:53", "10.244.3.2:53"],
            ],
        },
        Case {
            name: "a ready endpoint hides the serving-terminating ones",
            endpoints: vec![
                terminating(ep("10.244.1.2", "a1", "a"), true),
                ep("10.244.3.2", "b1", "b"),
            ],
            expected: [
                &["10.244.3.2:53"],
                &["10.244.3.2:53"],
                &["10.244.3.2:53"],
                &["10.244.3.2:53"],
            ],
        },
        Case {
            name: "nothing ready, nothing serving: the virtual server stays, empty",
            endpoints: vec![
                not_ready(ep("10.244.1.2", "a1", "a")),
                terminating(ep("10.244.3.2", "b1", "b"), false),
            ],
            expected: [&[], &[], &[], &[]],
        },
    ];
    let nodes = four_nodes();
    for case in cases {
        let store = dns_store(case.endpoints);
        for (node, expected) in nodes.iter().zip(case.expected) {
            let table = plan_for(&store, node);
            assert_eq!(
                programmed(&table, UDP, "10.96.0.10", 53),
                strings(expected),
                "{}: node {}",
                case.name,
                node.name
            );
            // The TCP port of the same Service follows the same rules.
            assert_eq!(
                programmed(&table, TCP, "10.96.0.10", 53),
                strings(expected),
                "{} (TCP): node {}",
                case.name,
                node.name
            );
        }
    }
}

#[test]
fn hints_naming_no_endpoint_in_this_zone_fall_back_to_all() {
    let store = dns_store(vec![
        zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
        zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
    ]);
    let zone_c = node("c1", Some("c"), &["192.168.0.31"]);
    let table = plan_for(&store, &zone_c);
    assert_eq!(
        programmed(&table, UDP, "10.96.0.10", 53),
        strings(&["10.244.1.2:53", "10.244.3.2:53"])
    );
    let vs = table
        .get(&VsKey::new(UDP, ip("10.96.0.10"), 53))
        .expect("dns virtual server");
    assert_eq!(vs.topology, TopologyMode::None);
    assert!(
        vs.is_falling_back(),
        "asked for topology, serving cluster-wide"
    );
    let why = &explain(&store, &zone_c, &PlanConfig::default())[0].ports[0].topology_reason;
    assert!(why.contains("none names this node's zone \"c\""), "{why}");
}

#[test]
fn node_without_zone_label_uses_every_ready_endpoint() {
    let store = dns_store(vec![
        zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
        zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
    ]);
    let zoneless = node("x1", None, &["192.168.0.99"]);
    let table = plan_for(&store, &zoneless);
    assert_eq!(
        programmed(&table, UDP, "10.96.0.10", 53),
        strings(&["10.244.1.2:53", "10.244.3.2:53"])
    );
    assert_eq!(
        tiers(&table, UDP, "10.96.0.10", 53),
        vec![(TierKind::Cluster, 2)]
    );
    let why = &explain(&store, &zoneless, &PlanConfig::default())[0].ports[0].topology_reason;
    assert!(
        why.contains("no topology.kubernetes.io/zone label"),
        "{why}"
    );
}

#[test]
fn tiers_keep_the_rest_of_the_cluster_behind_the_preferred_zone() {
    let store = dns_store(vec![
        zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
        zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
        zone_hint(ep("10.244.4.2", "b2", "b"), &["b"]),
        terminating(zone_hint(ep("10.244.5.2", "b2", "b"), &["b"]), true),
        not_ready(zone_hint(ep("10.244.6.2", "a2", "a"), &["a"])),
    ]);
    let table = plan_for(&store, &four_nodes()[0]);
    assert_eq!(
        tiers(&table, UDP, "10.96.0.10", 53),
        vec![
            (TierKind::SameZone, 1),
            (TierKind::Cluster, 2),
            (TierKind::ServingTerminating, 1)
        ]
    );
    assert!(!table
        .get(&VsKey::new(UDP, ip("10.96.0.10"), 53))
        .expect("vs")
        .is_falling_back());
}

#[test]
fn same_node_hints() {
    struct Case {
        name: &'static str,
        node: usize,
        endpoints: Vec<Endpoint>,
        expected: &'static [&'static str],
        tiers: Vec<(TierKind, usize)>,
    }
    let hinted = || {
        vec![
            node_hint(zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]), &["a1"]),
            node_hint(zone_hint(ep("10.244.2.2", "a2", "a"), &["a"]), &["a2"]),
            node_hint(zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]), &["b1"]),
        ]
    };
    let cases = vec![
        Case {
            name: "node hinted: only its own endpoint, then its zone, then the cluster",
            node: 0,
            endpoints: hinted(),
            expected: &["10.244.1.2:53"],
            tiers: vec![
                (TierKind::SameNode, 1),
                (TierKind::SameZone, 1),
                (TierKind::Cluster, 1),
            ],
        },
        Case {
            name: "node not hinted: falls through to zone hints",
            node: 3,
            endpoints: hinted(),
            expected: &["10.244.3.2:53"],
            tiers: vec![(TierKind::SameZone, 1), (TierKind::Cluster, 2)],
        },
        Case {
            name: "node hints incomplete: zone hints still apply",
            node: 0,
            endpoints: vec![
                node_hint(zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]), &["a1"]),
                zone_hint(ep("10.244.2.2", "a2", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
            ],
            expected: &["10.244.1.2:53", "10.244.2.2:53"],
            tiers: vec![(TierKind::SameZone, 2), (TierKind::Cluster, 1)],
        },
    ];
    let nodes = four_nodes();
    for case in cases {
        let store = dns_store(case.endpoints);
        let table = plan_for(&store, &nodes[case.node]);
        assert_eq!(
            programmed(&table, UDP, "10.96.0.10", 53),
            strings(case.expected),
            "{}",
            case.name
        );
        assert_eq!(
            tiers(&table, UDP, "10.96.0.10", 53),
            case.tiers,
            "{}",
            case.name
        );
    }
}

fn local_store(internal_local: bool, external_local: bool, endpoints: Vec<Endpoint>) -> Store {
    let mut web = service("web", "10.96.0.20", vec![port("http", TCP, 80)]);
    web.service_type = ServiceType::NodePort;
    web.ports[0].node_port = Some(30080);
    web.external_ips = vec![ip("203.0.113.7")];
    web.internal_traffic_local = internal_local;
    web.external_traffic_local = external_local;
    store(
        vec![web],
        vec![slice("web", "web-1", &[("http", TCP, 8080)], endpoints)],
    )
}

#[test]
fn traffic_policies() {
    struct Case {
        name: &'static str,
        internal_local: bool,
        external_local: bool,
        endpoints: Vec<Endpoint>,
        cluster_ip: &'static [&'static str],
        external: &'static [&'static str],
    }
    let both = || {
        vec![
            zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
            zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
        ]
    };
    let cases = vec![
        Case {
            name: "Cluster/Cluster: topology everywhere",
            internal_local: false,
            external_local: false,
            endpoints: both(),
            cluster_ip: &["10.244.1.2:8080"],
            external: &["10.244.1.2:8080"],
        },
        Case {
            // No local endpoint: no ClusterIP backend, where kube-proxy's IPVS mode programs the
            // cluster endpoints (docs/parity.md).
            name: "ITP Local: ClusterIP on this node only; external keeps Cluster",
            internal_local: true,
            external_local: false,
            endpoints: vec![
                zone_hint(ep("10.244.2.2", "a2", "a"), &["a"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
            ],
            cluster_ip: &[],
            external: &["10.244.2.2:8080"],
        },
        Case {
            name: "ETP Local: external only on this node; ClusterIP keeps topology",
            internal_local: false,
            external_local: true,
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["b"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["a"]),
            ],
            cluster_ip: &["10.244.3.2:8080"],
            external: &["10.244.1.2:8080"],
        },
        Case {
            // A deliberate deviation from kube-proxy's IPVS mode, which programs the cluster
            // endpoints here (kubernetes/kubernetes#97081; docs/parity.md).
            name: "ETP Local without a local endpoint: no external backend",
            internal_local: false,
            external_local: true,
            endpoints: vec![ep("10.244.3.2", "b1", "b")],
            cluster_ip: &["10.244.3.2:8080"],
            external: &[],
        },
        Case {
            name: "Local: this node's serving-terminating endpoint when none here is ready",
            internal_local: true,
            external_local: true,
            endpoints: vec![
                terminating(ep("10.244.1.2", "a1", "a"), true),
                ep("10.244.3.2", "b1", "b"),
            ],
            cluster_ip: &["10.244.1.2:8080"],
            external: &["10.244.1.2:8080"],
        },
        Case {
            name: "Local: a ready local endpoint hides the local terminating one",
            internal_local: true,
            external_local: true,
            endpoints: vec![
                terminating(ep("10.244.1.2", "a1", "a"), true),
                ep("10.244.1.3", "a1", "a"),
            ],
            cluster_ip: &["10.244.1.3:8080"],
            external: &["10.244.1.3:8080"],
        },
        Case {
            name: "Local ignores hints that point elsewhere",
            internal_local: true,
            external_local: true,
            endpoints: vec![
                zone_hint(ep("10.244.1.2", "a1", "a"), &["b"]),
                zone_hint(ep("10.244.3.2", "b1", "b"), &["a"]),
            ],
            cluster_ip: &["10.244.1.2:8080"],
            external: &["10.244.1.2:8080"],
        },
    ];
    let a1 = &four_nodes()[0];
    for case in cases {
        let store = local_store(case.internal_local, case.external_local, case.endpoints);
        let table = plan_for(&store, a1);
        assert_eq!(
            programmed(&table, TCP, "10.96.0.20", 80),
            strings(case.cluster_ip),
            "{}: ClusterIP",
            case.name
        );
        for (address, port) in [("203.0.113.7", 80), ("192.168.0.11", 30080)] {
            assert_eq!(
                programmed(&table, TCP, address, port),
                strings(case.external),
                "{}: {address}:{port}",
                case.name
            );
        }
    }
}

#[test]
fn frontends_cluster_ips_external_ips_load_balancers_and_node_ports() {
    let mut lb = service("lb", "10.96.0.30", vec![port("https", TCP, 443)]);
    lb.service_type = ServiceType::LoadBalancer;
    lb.cluster_ips.push(ip("fd00:96::30"));
    lb.external_ips = vec![ip("203.0.113.8"), ip("2001:db8::8")];
    lb.load_balancer_ips = vec![ip("198.51.100.4"), ip("2001:db8:1::4")];
    lb.ports[0].node_port = Some(31443);
    let store = store(
        vec![lb],
        vec![
            slice(
                "lb",
                "lb-v4",
                &[("https", TCP, 8443)],
                vec![ep("10.244.1.5", "a1", "a")],
            ),
            slice(
                "lb",
                "lb-v6",
                &[("https", TCP, 8443)],
                vec![ep("fd00:244::5", "a1", "a")],
            ),
        ],
    );
    let dual = node(
        "a1",
        Some("a"),
        &["192.168.0.11", "10.0.0.11", "fd00:1::11"],
    );
    let table = plan_for(&store, &dual);
    let keys: Vec<String> = table
        .servers()
        .map(|vs| {
            format!(
                "{:?} {}",
                vs.frontend,
                SocketAddrText(vs.key.address, vs.key.port)
            )
        })
        .collect();
    assert_eq!(
        keys,
        strings(&[
            "NodePort 10.0.0.11:31443",
            "ClusterIP 10.96.0.30:443",
            "NodePort 192.168.0.11:31443",
            "LoadBalancer 198.51.100.4:443",
            "ExternalIP 203.0.113.8:443",
            "ExternalIP [2001:db8::8]:443",
            "LoadBalancer [2001:db8:1::4]:443",
            "NodePort [fd00:1::11]:31443",
            "ClusterIP [fd00:96::30]:443",
        ])
    );
    for vs in table.servers() {
        let expected = if vs.key.family == IpFamily::V4 {
            "10.244.1.5:8443"
        } else {
            "[fd00:244::5]:8443"
        };
        assert_eq!(
            vs.programmed()
                .iter()
                .map(|b| SocketAddrText(b.address, b.port).to_string())
                .collect::<Vec<_>>(),
            strings(&[expected]),
            "{:?}",
            vs.key
        );
    }
}

#[test]
fn single_stack_service_gets_no_node_port_on_other_family() {
    let mut np = service("np", "10.96.0.40", vec![port("http", TCP, 80)]);
    np.service_type = ServiceType::NodePort;
    np.ports[0].node_port = Some(30040);
    let store = store(
        vec![np],
        vec![slice(
            "np",
            "np-1",
            &[("http", TCP, 80)],
            vec![ep("10.244.1.6", "a1", "a")],
        )],
    );
    let table = plan_for(
        &store,
        &node("a1", Some("a"), &["192.168.0.11", "fd00:1::11"]),
    );
    assert_eq!(table.len(), 2);
    assert!(table
        .get(&VsKey::new(TCP, ip("fd00:1::11"), 30040))
        .is_none());
}

#[test]
fn ports_match_by_name_and_protocol() {
    let svc = service(
        "multi",
        "10.96.0.50",
        vec![
            port("http", TCP, 80),
            port("metrics", TCP, 9100),
            port("syslog", UDP, 514),
            port("assoc", Protocol::Sctp, 3868),
            port("missing", TCP, 81),
        ],
    );
    let store = store(
        vec![svc],
        vec![slice(
            "multi",
            "multi-1",
            &[
                ("metrics", TCP, 9200),
                ("http", TCP, 8080),
                ("syslog", UDP, 5514),
                ("syslog", TCP, 6514),
                ("assoc", Protocol::Sctp, 3869),
            ],
            vec![ep("10.244.1.7", "a1", "a")],
        )],
    );
    let table = plan_for(&store, &four_nodes()[0]);
    assert_eq!(
        programmed(&table, TCP, "10.96.0.50", 80),
        strings(&["10.244.1.7:8080"])
    );
    assert_eq!(
        programmed(&table, TCP, "10.96.0.50", 9100),
        strings(&["10.244.1.7:9200"])
    );
    assert_eq!(
        programmed(&table, UDP, "10.96.0.50", 514),
        strings(&["10.244.1.7:5514"])
    );
    assert_eq!(
        programmed(&table, Protocol::Sctp, "10.96.0.50", 3868),
        strings(&["10.244.1.7:3869"])
    );
    assert!(programmed(&table, TCP, "10.96.0.50", 81).is_empty());
}

#[test]
fn unnamed_single_port_matches_unnamed_slice_port() {
    let store = store(
        vec![service("single", "10.96.0.51", vec![port("", TCP, 80)])],
        vec![slice(
            "single",
            "single-1",
            &[("", TCP, 8080)],
            vec![ep("10.244.1.8", "a1", "a")],
        )],
    );
    let table = plan_for(&store, &four_nodes()[0]);
    assert_eq!(
        programmed(&table, TCP, "10.96.0.51", 80),
        strings(&["10.244.1.8:8080"])
    );
}

#[test]
fn endpoints_are_deduplicated_across_slices() {
    struct Case {
        name: &'static str,
        first: Endpoint,
        second: Endpoint,
        expected: &'static [&'static str],
    }
    let cases = vec![
        Case {
            name: "same endpoint in two slices counts once",
            first: ep("10.244.1.9", "a1", "a"),
            second: ep("10.244.1.9", "a1", "a"),
            expected: &["10.244.1.9:80", "10.244.3.9:80"],
        },
        Case {
            name: "a reused IP: the running pod wins over the terminating one",
            first: terminating(ep("10.244.1.9", "a1", "a"), true),
            second: ep("10.244.1.9", "a1", "a"),
            expected: &["10.244.1.9:80", "10.244.3.9:80"],
        },
        Case {
            name: "the terminating copy does not win in either slice order",
            first: ep("10.244.1.9", "a1", "a"),
            second: terminating(ep("10.244.1.9", "a1", "a"), false),
            expected: &["10.244.1.9:80", "10.244.3.9:80"],
        },
    ];
    for case in cases {
        let store = store(
            vec![service("dup", "10.96.0.52", vec![port("http", TCP, 80)])],
            vec![
                slice("dup", "dup-1", &[("http", TCP, 80)], vec![case.first]),
                slice(
                    "dup",
                    "dup-2",
                    &[("http", TCP, 80)],
                    vec![case.second, ep("10.244.3.9", "b1", "b")],
                ),
            ],
        );
        let table = plan_for(&store, &four_nodes()[0]);
        assert_eq!(
            programmed(&table, TCP, "10.96.0.52", 80),
            strings(case.expected),
            "{}",
            case.name
        );
    }
}

#[test]
fn skipped_services() {
    let mut external_name = service("ext", "10.96.0.60", vec![port("http", TCP, 80)]);
    external_name.service_type = ServiceType::ExternalName;
    external_name.cluster_ips.clear();
    let mut headless = service("headless", "10.96.0.61", vec![port("http", TCP, 80)]);
    headless.headless = true;
    headless.cluster_ips.clear();
    let mut other = service("other", "10.96.0.62", vec![port("http", TCP, 80)]);
    other.proxy_name = Some("cilium".to_owned());
    let mut ours = service("ours", "10.96.0.63", vec![port("http", TCP, 80)]);
    ours.proxy_name = Some("topoproxy".to_owned());
    let plain = service("plain", "10.96.0.64", vec![port("http", TCP, 80)]);
    let store = store(
        vec![external_name, headless, other, ours, plain],
        Vec::new(),
    );
    let table = plan_for(&store, &four_nodes()[0]);
    let planned: Vec<String> = table.servers().map(|vs| vs.service.name.clone()).collect();
    assert_eq!(planned, strings(&["ours", "plain"]));
    let reasons: Vec<Option<SkipReason>> =
        explain(&store, &four_nodes()[0], &PlanConfig::default())
            .into_iter()
            .map(|e| e.skipped)
            .collect();
    assert_eq!(
        reasons,
        vec![
            Some(SkipReason::ExternalName),
            Some(SkipReason::Headless),
            Some(SkipReason::OtherProxy("cilium".to_owned())),
            None,
            None,
        ]
    );
}

#[test]
fn session_affinity_and_scheduler() {
    let mut sticky = service("sticky", "10.96.0.70", vec![port("http", TCP, 80)]);
    sticky.session_affinity_timeout = Some(10_800);
    let plain = service("plain", "10.96.0.71", vec![port("http", TCP, 80)]);
    let store = store(vec![sticky, plain], Vec::new());
    let config = PlanConfig {
        scheduler: crate::scheduler::Scheduler::parse("wrr").expect("scheduler"),
        ..PlanConfig::default()
    };
    let table = plan(&store, &four_nodes()[0], &config);
    let sticky = table
        .get(&VsKey::new(TCP, ip("10.96.0.70"), 80))
        .expect("sticky");
    let plain = table
        .get(&VsKey::new(TCP, ip("10.96.0.71"), 80))
        .expect("plain");
    assert_eq!(sticky.persistence_timeout, Some(10_800));
    assert_eq!(plain.persistence_timeout, None);
    assert_eq!(sticky.scheduler, "wrr");
    assert_eq!(plain.scheduler, "wrr");
}

#[test]
fn remote_cluster_endpoints_sit_behind_the_local_cluster() {
    let mut remote = slice(
        "dns",
        "dns-remote",
        &[("dns", UDP, 53)],
        vec![ep("10.8.0.2", "r1", "x")],
    );
    remote.origin = SliceOrigin::Remote("west".to_owned());
    let mut store = dns_store(vec![ep("10.244.1.2", "a1", "a")]);
    store.upsert_slice(remote);
    let a1 = &four_nodes()[0];
    let table = plan_for(&store, a1);
    assert_eq!(
        programmed(&table, UDP, "10.96.0.10", 53),
        strings(&["10.244.1.2:53"])
    );
    assert_eq!(
        tiers(&table, UDP, "10.96.0.10", 53),
        vec![(TierKind::Cluster, 1), (TierKind::RemoteClusters, 1)]
    );
    // Once the local endpoint is gone, the remote one is all there is.
    store.upsert_slice(slice("dns", "dns-abc", &[("dns", UDP, 53)], Vec::new()));
    let table = plan_for(&store, a1);
    assert_eq!(
        programmed(&table, UDP, "10.96.0.10", 53),
        strings(&["10.8.0.2:53"])
    );
}

#[test]
fn explanation_says_why_each_endpoint_was_chosen_or_left_out() {
    let store = dns_store(vec![
        zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
        zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
        not_ready(zone_hint(ep("10.244.4.2", "b2", "b"), &["b"])),
    ]);
    let a1 = &four_nodes()[0];
    let explained = explain(&store, a1, &PlanConfig::default());
    let udp = explained[0]
        .ports
        .iter()
        .find(|p| p.protocol == UDP)
        .expect("udp port");
    assert_eq!(udp.topology, TopologyMode::SameZone);
    let verdicts: Vec<(String, bool, Option<TierKind>)> = udp
        .endpoints
        .iter()
        .map(|e| {
            let v = e.cluster.as_ref().expect("cluster policy verdict");
            (e.address.to_string(), v.programmed, v.tier)
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![
            ("10.244.1.2".to_owned(), true, Some(TierKind::SameZone)),
            ("10.244.3.2".to_owned(), false, Some(TierKind::Cluster)),
            ("10.244.4.2".to_owned(), false, None),
        ]
    );
    let text = explain::render_text(&explained, a1);
    assert!(
        text.contains("zone hint names this node's zone a"),
        "{text}"
    );
    assert!(text.contains("not ready and not terminating"), "{text}");
}

#[test]
fn replanning_one_service_matches_a_full_plan() {
    let mut store = dns_store(vec![
        zone_hint(ep("10.244.1.2", "a1", "a"), &["a"]),
        zone_hint(ep("10.244.3.2", "b1", "b"), &["b"]),
    ]);
    store.upsert_service(service("web", "10.96.0.80", vec![port("http", TCP, 80)]));
    let a1 = &four_nodes()[0];
    let config = PlanConfig::default();
    let mut table = plan(&store, a1, &config);
    // The controller removes the hints: only dns changes.
    let changed = store.upsert_slice(slice(
        "dns",
        "dns-abc",
        &[("dns", UDP, 53), ("dns-tcp", TCP, 53)],
        vec![ep("10.244.1.2", "a1", "a"), ep("10.244.3.2", "b1", "b")],
    ));
    for key in &changed {
        replan_service(&mut table, &store, key, a1, &config);
    }
    assert_eq!(table, plan(&store, a1, &config));
    assert_eq!(programmed(&table, UDP, "10.96.0.10", 53).len(), 2);
    // The Service goes away: so do its virtual servers.
    let key = ServiceKey::new("default", "dns");
    store.remove_service(&key);
    replan_service(&mut table, &store, &key, a1, &config);
    assert_eq!(table.len(), 1);
}

#[test]
fn conflicting_claims_resolve_by_service_key_whichever_arrives_first() {
    let mut first = service("alpha", "10.96.0.90", vec![port("http", TCP, 80)]);
    first.external_ips = vec![ip("203.0.113.9")];
    let mut second = service("beta", "10.96.0.91", vec![port("http", TCP, 80)]);
    second.external_ips = vec![ip("203.0.113.9")];
    let shared = VsKey::new(TCP, ip("203.0.113.9"), 80);
    let a1 = &four_nodes()[0];
    let config = PlanConfig::default();
    for order in [[&first, &second], [&second, &first]] {
        let store = store(order.iter().map(|s| (*s).clone()).collect(), Vec::new());
        let mut table = NodeTable::new();
        for service in order {
            replan_service(&mut table, &store, &service.key, a1, &config);
        }
        assert_eq!(
            table.get(&shared).map(|vs| vs.service.name.as_str()),
            Some("alpha")
        );
        assert_eq!(table.conflicts().len(), 1);
        // The winner leaves: the other claim takes over.
        table.replace_service(&first.key, Vec::new());
        assert_eq!(
            table.get(&shared).map(|vs| vs.service.name.as_str()),
            Some("beta")
        );
        assert!(table.conflicts().is_empty());
    }
}

#[test]
fn an_allocated_cluster_ip_wins_over_an_external_ip_claim_whatever_the_names() {
    // A Service in namespace `aaa` names cluster DNS's ClusterIP as an externalIP: the smaller
    // key must not take DNS over (CVE-2020-8554 class, docs/security.md).
    let mut dns = service("kube-dns", "10.96.0.10", vec![port("dns", UDP, 53)]);
    dns.key = ServiceKey::new("kube-system", "kube-dns");
    let mut thief = service("dns", "10.96.0.77", vec![port("dns", UDP, 53)]);
    thief.key = ServiceKey::new("aaa", "dns");
    thief.external_ips = vec![ip("10.96.0.10")];
    let shared = VsKey::new(UDP, ip("10.96.0.10"), 53);
    let a1 = &four_nodes()[0];
    let config = PlanConfig::default();
    for order in [[&dns, &thief], [&thief, &dns]] {
        let store = store(order.iter().map(|s| (*s).clone()).collect(), Vec::new());
        let mut table = NodeTable::new();
        for service in order {
            replan_service(&mut table, &store, &service.key, a1, &config);
        }
        assert_eq!(table.get(&shared).map(|vs| &vs.service), Some(&dns.key));
        let conflicts = table.conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].loser, thief.key);
        assert_eq!(conflicts[0].loser_frontend, Frontend::ExternalIP);
        assert!(
            conflicts[0].reason().contains("ClusterIP"),
            "{}",
            conflicts[0].reason()
        );
        // The loser keeps its own ClusterIP.
        assert!(table.get(&VsKey::new(UDP, ip("10.96.0.77"), 53)).is_some());
        // A full plan decides the same.
        let planned = plan(&store, a1, &config);
        assert_eq!(planned.get(&shared).map(|vs| &vs.service), Some(&dns.key));

        let mut explained = explain(&store, a1, &config);
        super::explain::mark_conflicts(&mut explained, &conflicts);
        let text = super::explain::render_text(&explained, a1);
        assert!(
            text.contains("left out: kube-system/kube-dns claims it as ClusterIP"),
            "{text}"
        );
    }
    // Once DNS leaves, the externalIP claim takes the key.
    let store = store(vec![dns.clone(), thief.clone()], Vec::new());
    let mut table = plan(&store, a1, &config);
    table.replace_service(&dns.key, Vec::new());
    assert_eq!(table.get(&shared).map(|vs| &vs.service), Some(&thief.key));
}

#[test]
fn load_balancer_source_ranges_guard_only_the_load_balancer_frontends_of_their_family() {
    let mut lb = service("lb", "10.96.0.50", vec![port("http", TCP, 80)]);
    lb.service_type = ServiceType::LoadBalancer;
    lb.load_balancer_ips = vec![ip("203.0.113.50")];
    lb.external_ips = vec![ip("198.51.100.50")];
    lb.load_balancer_source_ranges = ["10.0.0.0/8", "10.1.0.0/16", "fd00::/64", "192.0.2.77/24"]
        .iter()
        .map(|r| r.parse().expect("cidr"))
        .collect();
    let a1 = node("a1", Some("zone-a"), &["192.0.2.10"]);
    let config = PlanConfig::default();
    let table = plan(&store(vec![lb.clone()], Vec::new()), &a1, &config);
    let guarded = table
        .get(&VsKey::new(TCP, ip("203.0.113.50"), 80))
        .expect("LB frontend");
    let allowed: Vec<String> = guarded
        .source_ranges
        .allowed
        .iter()
        .map(ToString::to_string)
        .collect();
    // Host bits cleared, the nested range and the IPv6 one left out.
    assert_eq!(allowed, ["10.0.0.0/8", "192.0.2.0/24"]);
    assert!(
        guarded.source_ranges.from_node,
        "192.0.2.0/24 holds the node"
    );
    assert!(guarded.source_ranges.admits(ip("10.9.9.9")));
    assert!(!guarded.source_ranges.admits(ip("198.51.100.1")));
    for open in [
        VsKey::new(TCP, ip("10.96.0.50"), 80),
        VsKey::new(TCP, ip("198.51.100.50"), 80),
    ] {
        assert!(table.get(&open).expect("frontend").source_ranges.is_open());
    }

    // The node outside every range may not reach the IP itself.
    let elsewhere = node("a2", Some("zone-a"), &["172.16.0.5"]);
    let table = plan(&store(vec![lb.clone()], Vec::new()), &elsewhere, &config);
    let guarded = table
        .get(&VsKey::new(TCP, ip("203.0.113.50"), 80))
        .expect("LB frontend");
    assert!(!guarded.source_ranges.from_node);

    // A zero-masked range allows everything, as kube-proxy reads it.
    lb.load_balancer_source_ranges
        .push("0.0.0.0/0".parse().expect("cidr"));
    let table = plan(&store(vec![lb], Vec::new()), &a1, &config);
    assert!(table
        .get(&VsKey::new(TCP, ip("203.0.113.50"), 80))
        .expect("LB frontend")
        .source_ranges
        .is_open());
}

#[test]
fn node_ports_sit_on_the_hosts_addresses_when_the_agent_read_them() {
    let mut np = service("np", "10.96.0.60", vec![port("http", TCP, 80)]);
    np.service_type = ServiceType::NodePort;
    np.ports[0].node_port = Some(30080);
    let mut a1 = node("a1", Some("zone-a"), &["192.0.2.10"]);
    let config = PlanConfig::default();
    let node_ports = |table: &NodeTable| -> Vec<IpAddr> {
        table
            .servers()
            .filter(|vs| vs.frontend == Frontend::NodePort)
            .map(|vs| vs.key.address)
            .collect()
    };
    let store = store(vec![np], Vec::new());
    assert_eq!(
        node_ports(&plan(&store, &a1, &config)),
        vec![ip("192.0.2.10")]
    );
    a1.local_addresses = Some([ip("192.0.2.10"), ip("198.51.100.7")].into());
    assert_eq!(
        node_ports(&plan(&store, &a1, &config)),
        vec![ip("192.0.2.10"), ip("198.51.100.7")]
    );
    let primary = PlanConfig {
        node_port_addresses: crate::node_addresses::NodePortAddresses::parse("primary")
            .expect("valid"),
        ..PlanConfig::default()
    };
    assert_eq!(
        node_ports(&plan(&store, &a1, &primary)),
        vec![ip("192.0.2.10")]
    );
}
