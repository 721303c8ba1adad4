//! Deterministic synthetic clusters for benches, property tests and end-to-end sync benches.
//!
//! [`synthetic_cluster`] builds a [`Store`] straight from [`crate::model`] types (no YAML, no
//! randomness): the same [`SyntheticSpec`] always yields the same Services, EndpointSlices and
//! Nodes, so bench numbers are comparable run to run.
//!
//! Layout of a generated cluster:
//!
//! - zones `zone-a`, `zone-b`, … (see [`synthetic_zone_name`]);
//! - `nodes_per_zone` Nodes per zone, named by [`synthetic_node_name`], each labelled with its
//!   zone and carrying one InternalIP from `172.16.0.0/12`, assigned sequentially;
//! - Services `ns-{i % 50}/svc-{i}` (see [`synthetic_service_key`]) of type ClusterIP, with
//!   cluster IPs assigned sequentially from `10.96.0.0/12` starting at `10.96.0.1`, one TCP
//!   port 80 named `http` (target port 8080), and on every tenth Service (`i % 10 == 0`) also
//!   a UDP port 53 named `dns` (target port 53);
//! - one IPv4 EndpointSlice per Service named `svc-{i}-abcde` (see [`synthetic_slice_name`]),
//!   with `endpoints_per_service` Ready, serving, non-terminating endpoints whose addresses
//!   are unique cluster-wide, counting upward from `10.244.0.1`. Endpoints are spread
//!   round-robin over zones and then over the Nodes of each zone, by their global index
//!   (`service * endpoints_per_service + endpoint`), so every zone and node gets its share;
//! - with [`SyntheticSpec::with_hints`], every endpoint carries a zone hint naming its own
//!   zone and every Service has [`TopologyIntent::Auto`]; without, no hints and
//!   [`TopologyIntent::None`].
//!
//! Degenerate specs are allowed: with `zones == 0` there are no Nodes and endpoints have no
//! zone and no node; with `nodes_per_zone == 0` endpoints have a zone but no node.

use std::net::{IpAddr, Ipv4Addr};

use crate::model::{
    Endpoint, EndpointSlice, Hints, IpFamily, Node, Protocol, Service, ServiceKey, ServicePort,
    ServiceType, SliceOrigin, SlicePort, TopologyIntent,
};
use crate::store::Store;

/// First address of the Service CIDR (`10.96.0.0/12`).
const SERVICE_CIDR_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
/// Usable host addresses in `10.96.0.0/12` (network and broadcast excluded).
const SERVICE_CIDR_HOSTS: u32 = (1 << 20) - 2;
/// First address of the Pod range endpoints are numbered from (`10.244.0.0/16`, upward).
const POD_BASE: u32 = u32::from_be_bytes([10, 244, 0, 0]);
/// First address of the Node range (`172.16.0.0/12`).
const NODE_CIDR_BASE: u32 = u32::from_be_bytes([172, 16, 0, 0]);
/// Usable host addresses in `172.16.0.0/12`.
const NODE_CIDR_HOSTS: u32 = (1 << 20) - 2;
/// Number of namespaces Services are spread over.
const NAMESPACES: usize = 50;

/// Shape of a synthetic cluster; see the module documentation for the exact layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    /// Number of Services (`svc-0` … `svc-{services-1}`).
    pub services: usize,
    /// Endpoints in the single slice of each Service.
    pub endpoints_per_service: usize,
    /// Number of zones (`zone-a`, `zone-b`, …).
    pub zones: usize,
    /// Nodes in each zone.
    pub nodes_per_zone: usize,
    /// Give every endpoint a zone hint for its own zone (and every Service topology intent
    /// `Auto`), as kube-controller-manager does for `topology-mode: Auto`.
    pub with_hints: bool,
}

impl SyntheticSpec {
    /// Total number of Nodes the spec generates.
    pub fn node_count(&self) -> usize {
        self.zones.saturating_mul(self.nodes_per_zone)
    }

    /// Total number of endpoints over all slices.
    pub fn endpoint_count(&self) -> usize {
        self.services.saturating_mul(self.endpoints_per_service)
    }
}

/// Name of zone number `zone`: `zone-a` … `zone-z`, then `zone-aa`, `zone-ab`, … (bijective
/// base 26, like spreadsheet columns).
pub fn synthetic_zone_name(zone: usize) -> String {
    format!("zone-{}", zone_suffix(zone))
}

/// Name of Node number `index` (0-based) in zone number `zone`: `node-a-0`, `node-a-1`, …,
/// `node-b-0`, ….
pub fn synthetic_node_name(zone: usize, index: usize) -> String {
    format!("node-{}-{}", zone_suffix(zone), index)
}

/// Key of Service number `index`: `ns-{index % 50}/svc-{index}`.
pub fn synthetic_service_key(index: usize) -> ServiceKey {
    ServiceKey::new(format!("ns-{}", index % NAMESPACES), format!("svc-{index}"))
}

/// Name of the single EndpointSlice of Service number `index`: `svc-{index}-abcde`.
pub fn synthetic_slice_name(index: usize) -> String {
    format!("svc-{index}-abcde")
}

/// Node number `index` of zone number `zone`, as [`synthetic_cluster`] creates it for a spec
/// with `nodes_per_zone` Nodes per zone.
pub fn synthetic_node(zone: usize, index: usize, nodes_per_zone: usize) -> Node {
    let ordinal = zone.wrapping_mul(nodes_per_zone).wrapping_add(index);
    Node {
        name: synthetic_node_name(zone, index),
        zone: Some(synthetic_zone_name(zone)),
        region: Some("region-1".to_owned()),
        addresses: vec![IpAddr::V4(Ipv4Addr::from(
            NODE_CIDR_BASE + 1 + offset_in(ordinal, NODE_CIDR_HOSTS),
        ))],
        leaving: None,
        local_addresses: None,
    }
}

/// Builds the cluster `spec` describes: all Nodes, Services and slices in one [`Store`].
pub fn synthetic_cluster(spec: &SyntheticSpec) -> Store {
    let mut store = Store::new();
    for zone in 0..spec.zones {
        for index in 0..spec.nodes_per_zone {
            store.upsert_node(synthetic_node(zone, index, spec.nodes_per_zone));
        }
    }
    for index in 0..spec.services {
        store.upsert_service(synthetic_service(spec, index));
        store.upsert_slice(synthetic_slice(spec, index));
    }
    store
}

/// Service number `index` of the cluster `spec` describes.
pub fn synthetic_service(spec: &SyntheticSpec, index: usize) -> Service {
    let mut ports = vec![ServicePort {
        name: "http".to_owned(),
        protocol: Protocol::Tcp,
        port: 80,
        node_port: None,
    }];
    if has_dns_port(index) {
        ports.push(ServicePort {
            name: "dns".to_owned(),
            protocol: Protocol::Udp,
            port: 53,
            node_port: None,
        });
    }
    Service {
        key: synthetic_service_key(index),
        service_type: ServiceType::ClusterIP,
        headless: false,
        cluster_ips: vec![synthetic_cluster_ip(index)],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        ports,
        session_affinity_timeout: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        topology_intent: if spec.with_hints {
            TopologyIntent::Auto
        } else {
            TopologyIntent::None
        },
        proxy_name: None,
        locality: None,
        health_check_node_port: None,
        scheduler: None,
    }
}

/// Cluster IP of Service number `index`: `10.96.0.1` + `index`, wrapping inside
/// `10.96.0.0/12` past its last host address.
pub fn synthetic_cluster_ip(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        SERVICE_CIDR_BASE + 1 + offset_in(index, SERVICE_CIDR_HOSTS),
    ))
}

/// The single EndpointSlice of Service number `index` of the cluster `spec` describes.
pub fn synthetic_slice(spec: &SyntheticSpec, index: usize) -> EndpointSlice {
    let key = synthetic_service_key(index);
    let mut ports = vec![SlicePort {
        name: "http".to_owned(),
        protocol: Protocol::Tcp,
        port: 8080,
    }];
    if has_dns_port(index) {
        ports.push(SlicePort {
            name: "dns".to_owned(),
            protocol: Protocol::Udp,
            port: 53,
        });
    }
    let first = index.wrapping_mul(spec.endpoints_per_service);
    let endpoints = (0..spec.endpoints_per_service)
        .map(|offset| synthetic_endpoint(spec, first.wrapping_add(offset)))
        .collect();
    EndpointSlice {
        name: synthetic_slice_name(index),
        service: key,
        family: IpFamily::V4,
        origin: SliceOrigin::Local,
        ports,
        endpoints,
    }
}

/// Endpoint number `global` (counted over the whole cluster) of the cluster `spec` describes.
fn synthetic_endpoint(spec: &SyntheticSpec, global: usize) -> Endpoint {
    // Addresses count upward from 10.244.0.1; past 10.244.255.255 they continue into
    // 10.245.0.0 and beyond, which keeps them unique for any realistic size.
    let host = u32::try_from(global).unwrap_or(u32::MAX);
    let address = IpAddr::V4(Ipv4Addr::from(POD_BASE.wrapping_add(1).wrapping_add(host)));
    let (zone, node_name) = match (spec.zones, spec.nodes_per_zone) {
        (0, _) => (None, None),
        (zones, 0) => (Some(global % zones), None),
        (zones, per_zone) => {
            let zone = global % zones;
            let node = (global / zones) % per_zone;
            (Some(zone), Some(synthetic_node_name(zone, node)))
        }
    };
    let zone = zone.map(synthetic_zone_name);
    let zone_hints = match (&zone, spec.with_hints) {
        (Some(zone), true) => Hints::from_iter([zone.clone()]),
        _ => Hints::default(),
    };
    Endpoint {
        address,
        ready: true,
        serving: true,
        terminating: false,
        node_name: node_name.map(Into::into),
        zone: zone.map(Into::into),
        zone_hints,
        node_hints: Hints::default(),
    }
}

/// A copy of the first slice of Service `key` in `store` whose first endpoint has its
/// `ready` condition toggled (`true` → `false`, `false` → `true`; `serving` and
/// `terminating` untouched), or `None` when the Service has no slice with an endpoint.
///
/// Applying it twice gives back the original slice, so a bench can alternate between the
/// two versions and make every iteration a real change.
pub fn with_endpoint_flipped(store: &Store, key: &ServiceKey) -> Option<EndpointSlice> {
    let mut slice = store
        .slices_of(key)
        .find(|slice| !slice.endpoints.is_empty())?
        .clone();
    if let Some(endpoint) = slice.endpoints.first_mut() {
        endpoint.ready = !endpoint.ready;
    }
    Some(slice)
}

/// Whether Service number `index` has the extra UDP `dns` port.
fn has_dns_port(index: usize) -> bool {
    index.is_multiple_of(10)
}

/// `index` folded into `0..hosts` (wraps around a full range).
fn offset_in(index: usize, hosts: u32) -> u32 {
    // `hosts` is a small nonzero constant, so the remainder fits in u32.
    u32::try_from(index % hosts as usize).unwrap_or(0)
}

/// Bijective base-26 letters for a zone number: 0 → `a`, 25 → `z`, 26 → `aa`, ….
fn zone_suffix(zone: usize) -> String {
    let mut letters = Vec::new();
    let mut rest = zone;
    loop {
        // `rest % 26` is below 26, so the byte stays within `a..=z`.
        letters.push(b'a' + (rest % 26) as u8);
        if rest < 26 {
            break;
        }
        rest = rest / 26 - 1;
    }
    letters.iter().rev().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn zone_names_are_bijective_base_26() {
        assert_eq!(synthetic_zone_name(0), "zone-a");
        assert_eq!(synthetic_zone_name(25), "zone-z");
        assert_eq!(synthetic_zone_name(26), "zone-aa");
        assert_eq!(synthetic_zone_name(27), "zone-ab");
        assert_eq!(synthetic_zone_name(701), "zone-zz");
        assert_eq!(synthetic_zone_name(702), "zone-aaa");
    }

    #[test]
    fn cluster_has_the_requested_shape() {
        let spec = SyntheticSpec {
            services: 25,
            endpoints_per_service: 7,
            zones: 3,
            nodes_per_zone: 2,
            with_hints: true,
        };
        let store = synthetic_cluster(&spec);
        assert_eq!(store.service_count(), 25);
        assert_eq!(store.slice_count(), 25);
        assert_eq!(store.nodes().count(), spec.node_count());
        let node = store.node("node-b-1").map(|n| n.zone.clone());
        assert_eq!(node, Some(Some("zone-b".to_owned())));

        let key = synthetic_service_key(10);
        assert_eq!(key.to_string(), "ns-10/svc-10");
        let service = store
            .service(&key)
            .map(|s| (s.ports.len(), s.cluster_ips.clone()));
        assert_eq!(
            service,
            Some((2, vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11))]))
        );

        let mut addresses = BTreeSet::new();
        for service in store.services() {
            let slices: Vec<_> = store.slices_of(&service.key).collect();
            assert_eq!(slices.len(), 1);
            for endpoint in &slices[0].endpoints {
                assert!(addresses.insert(endpoint.address), "duplicate address");
                let zone = endpoint.zone.as_deref().unwrap_or_default();
                assert!(endpoint.zone_hints.contains(zone));
                let node = endpoint.node_name.as_deref().and_then(|n| store.node(n));
                assert_eq!(node.and_then(|n| n.zone.as_deref()), Some(zone));
            }
        }
        assert_eq!(addresses.len(), spec.endpoint_count());
        assert_eq!(
            addresses.first(),
            Some(&IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)))
        );
    }

    #[test]
    fn generation_is_deterministic_and_hints_are_optional() {
        let spec = SyntheticSpec {
            services: 12,
            endpoints_per_service: 4,
            zones: 2,
            nodes_per_zone: 3,
            with_hints: false,
        };
        let a = synthetic_cluster(&spec);
        let b = synthetic_cluster(&spec);
        for service in a.services() {
            assert_eq!(Some(service), b.service(&service.key));
            let left: Vec<_> = a.slices_of(&service.key).collect();
            let right: Vec<_> = b.slices_of(&service.key).collect();
            assert_eq!(left, right);
            assert!(left
                .iter()
                .flat_map(|s| &s.endpoints)
                .all(|e| e.zone_hints.is_empty()));
        }
    }

    #[test]
    fn degenerate_specs_do_not_panic() {
        for (zones, nodes_per_zone) in [(0, 0), (0, 3), (2, 0)] {
            let spec = SyntheticSpec {
                services: 3,
                endpoints_per_service: 3,
                zones,
                nodes_per_zone,
                with_hints: true,
            };
            let store = synthetic_cluster(&spec);
            assert_eq!(store.nodes().count(), 0);
            assert_eq!(store.slice_count(), 3);
        }
    }

    #[test]
    fn flipping_twice_restores_the_slice() {
        let spec = SyntheticSpec {
            services: 3,
            endpoints_per_service: 2,
            zones: 1,
            nodes_per_zone: 1,
            with_hints: false,
        };
        let mut store = synthetic_cluster(&spec);
        let key = synthetic_service_key(1);
        let original = store.slices_of(&key).next().cloned();
        let flipped = with_endpoint_flipped(&store, &key);
        assert_eq!(
            flipped
                .as_ref()
                .and_then(|s| s.endpoints.first())
                .map(|e| e.ready),
            Some(false)
        );
        if let Some(flipped) = flipped {
            store.upsert_slice(flipped);
        }
        let restored = with_endpoint_flipped(&store, &key);
        assert_eq!(restored, original);
        assert_eq!(
            with_endpoint_flipped(&store, &ServiceKey::new("x", "y")),
            None
        );
    }
}
