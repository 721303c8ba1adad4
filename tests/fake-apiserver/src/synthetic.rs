//! A synthetic cluster as k8s-openapi objects, for benchmarks and scale tests.
//!
//! - Nodes `node-{zone letter}-{i}`, labelled `topology.kubernetes.io/zone=zone-{letter}` and
//!   `kubernetes.io/hostname`, each with an InternalIP from 172.16.0.1 upward (172.16.0.0/12).
//! - Services `ns-{i % 50}/svc-{i}`, type ClusterIP, `clusterIP`/`clusterIPs` from 10.96.0.1
//!   upward (10.96.0.0/12), port `http` TCP 80 (targetPort 8080); every 10th service
//!   (`i % 10 == 0`) also has `dns` UDP 53 (targetPort 53). With hints the annotation
//!   `service.kubernetes.io/topology-mode: Auto` is set.
//! - One EndpointSlice per Service, `svc-{i}-abcde`, labelled
//!   `kubernetes.io/service-name=svc-{i}`, whose endpoints are spread round-robin over the
//!   zones, then over the nodes of each zone (a global endpoint counter, so load spreads over
//!   all nodes); addresses are unique from 10.244.0.1 upward; every endpoint is ready with its
//!   zone and node set, and with hints `forZones` = its own zone. Slice ports: `http` 8080/TCP
//!   and, for `dns` services, `dns` 53/UDP.
//!
//! Objects come out Nodes first, then Services, then EndpointSlices.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::Object;

/// Zone label key.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// EndpointSlice → Service label key.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Topology-aware routing annotation.
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";

/// Namespaces used by the synthetic services.
pub const NAMESPACES: usize = 50;

/// The letter(s) naming zone `z`: a..z, then aa, ab, …
pub fn zone_letter(z: usize) -> String {
    let mut n = z;
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// `zone-{letter}`.
pub fn zone_name(z: usize) -> String {
    format!("zone-{}", zone_letter(z))
}

/// `node-{letter}-{i}`.
pub fn node_name(zone: usize, i: usize) -> String {
    format!("node-{}-{i}", zone_letter(zone))
}

/// `ns-{i % 50}`.
pub fn service_namespace(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

/// `svc-{i}`.
pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

/// The ClusterIP of service `i`: 10.96.0.1 + i.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    offset(Ipv4Addr::new(10, 96, 0, 0), i + 1)
}

fn offset(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    // Wraps rather than panics for absurd sizes; real sizes stay far inside the ranges.
    Ipv4Addr::from(u32::from(base).wrapping_add(n as u32))
}

fn labels(pairs: &[(&str, String)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

/// One Node.
pub fn node(zone: usize, i: usize, index: usize) -> Node {
    let name = node_name(zone, i);
    Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: labels(&[
                (ZONE_LABEL, zone_name(zone)),
                ("kubernetes.io/hostname", name.clone()),
                ("kubernetes.io/os", "linux".to_string()),
            ]),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(vec![
                NodeAddress {
                    address: offset(Ipv4Addr::new(172, 16, 0, 0), index + 1).to_string(),
                    type_: "InternalIP".to_string(),
                },
                NodeAddress {
                    address: name,
                    type_: "Hostname".to_string(),
                },
            ]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn has_dns(i: usize) -> bool {
    i.is_multiple_of(10)
}

/// Service `i`.
pub fn service(i: usize, with_hints: bool) -> Service {
    let ip = cluster_ip(i).to_string();
    let mut ports = vec![ServicePort {
        name: Some("http".to_string()),
        protocol: Some("TCP".to_string()),
        port: 80,
        target_port: Some(IntOrString::Int(8080)),
        ..ServicePort::default()
    }];
    if has_dns(i) {
        ports.push(ServicePort {
            name: Some("dns".to_string()),
            protocol: Some("UDP".to_string()),
            port: 53,
            target_port: Some(IntOrString::Int(53)),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(i)),
            namespace: Some(service_namespace(i)),
            labels: labels(&[("app", service_name(i))]),
            annotations: with_hints
                .then(|| labels(&[(TOPOLOGY_MODE_ANNOTATION, "Auto".to_string())]))
                .flatten(),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ip_families: Some(vec!["IPv4".to_string()]),
            ip_family_policy: Some("SingleStack".to_string()),
            internal_traffic_policy: Some("Cluster".to_string()),
            session_affinity: Some("None".to_string()),
            selector: labels(&[("app", service_name(i))]),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The EndpointSlice of service `i`. `first_endpoint` is the global index of its first
/// endpoint (addresses and node placement follow it).
pub fn endpoint_slice(
    i: usize,
    endpoints: usize,
    first_endpoint: usize,
    zones: usize,
    nodes_per_zone: usize,
    with_hints: bool,
) -> EndpointSlice {
    let endpoints = (0..endpoints)
        .map(|j| {
            let g = first_endpoint + j;
            let placed = (zones > 0 && nodes_per_zone > 0)
                .then(|| (g % zones, (g / zones) % nodes_per_zone));
            Endpoint {
                addresses: vec![offset(Ipv4Addr::new(10, 244, 0, 0), g + 1).to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: placed.map(|(z, n)| node_name(z, n)),
                zone: placed.map(|(z, _)| zone_name(z)),
                hints: placed.filter(|_| with_hints).map(|(z, _)| EndpointHints {
                    for_zones: Some(vec![ForZone { name: zone_name(z) }]),
                    ..EndpointHints::default()
                }),
                ..Endpoint::default()
            }
        })
        .collect();
    let mut ports = vec![EndpointPort {
        name: Some("http".to_string()),
        port: Some(8080),
        protocol: Some("TCP".to_string()),
        ..EndpointPort::default()
    }];
    if has_dns(i) {
        ports.push(EndpointPort {
            name: Some("dns".to_string()),
            port: Some(53),
            protocol: Some("UDP".to_string()),
            ..EndpointPort::default()
        });
    }
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{}-abcde", service_name(i))),
            namespace: Some(service_namespace(i)),
            labels: labels(&[
                (SERVICE_NAME_LABEL, service_name(i)),
                (
                    "endpointslice.kubernetes.io/managed-by",
                    "endpointslice-controller.k8s.io".to_string(),
                ),
            ]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".to_string(),
        endpoints,
        ports: Some(ports),
    }
}

/// The whole synthetic cluster: `zones * nodes_per_zone` Nodes, `services` Services and one
/// EndpointSlice of `endpoints_per_service` endpoints per Service.
pub fn synthetic_objects(
    services: usize,
    endpoints_per_service: usize,
    zones: usize,
    nodes_per_zone: usize,
    with_hints: bool,
) -> Vec<Object> {
    let mut out = Vec::with_capacity(zones * nodes_per_zone + 2 * services);
    for z in 0..zones {
        for n in 0..nodes_per_zone {
            out.push(Object::Node(node(z, n, z * nodes_per_zone + n)));
        }
    }
    for i in 0..services {
        out.push(Object::Service(service(i, with_hints)));
    }
    for i in 0..services {
        out.push(Object::EndpointSlice(endpoint_slice(
            i,
            endpoints_per_service,
            i * endpoints_per_service,
            zones,
            nodes_per_zone,
            with_hints,
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(zone_letter(0), "a");
        assert_eq!(zone_letter(25), "z");
        assert_eq!(zone_letter(26), "aa");
        assert_eq!(zone_letter(27), "ab");
        assert_eq!(cluster_ip(0).to_string(), "10.96.0.1");
        assert_eq!(cluster_ip(255).to_string(), "10.96.1.0");
        let objs = synthetic_objects(20, 4, 3, 2, true);
        assert_eq!(objs.len(), 6 + 40);
        let Object::Node(n) = &objs[0] else {
            panic!("nodes first")
        };
        assert_eq!(n.metadata.name.as_deref(), Some("node-a-0"));
        let Object::Service(s) = &objs[6 + 10] else {
            panic!("then services")
        };
        assert_eq!(s.metadata.namespace.as_deref(), Some("ns-10"));
        let ports = s.spec.as_ref().and_then(|s| s.ports.as_ref()).map(Vec::len);
        assert_eq!(ports, Some(2));
        let Object::EndpointSlice(e) = &objs[6 + 20 + 1] else {
            panic!("then slices")
        };
        assert_eq!(e.metadata.name.as_deref(), Some("svc-1-abcde"));
        assert_eq!(e.endpoints[0].addresses, ["10.244.0.5"]);
        let zones: Vec<_> = e.endpoints.iter().filter_map(|e| e.zone.clone()).collect();
        assert_eq!(zones, ["zone-b", "zone-c", "zone-a", "zone-b"]);
        let hint = e.endpoints[0]
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z[0].name.clone());
        assert_eq!(hint.as_deref(), Some("zone-b"));
    }
}
