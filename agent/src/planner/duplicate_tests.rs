//! One `IP:port` listed on several nodes (Admiralty's delegated pods: a proxy pod on a virtual
//! node without zone or region, the delegate on its real node): the copy whose node gives the
//! most specific locality is kept, in either slice order, and `--explain` says which and why.

use super::explain::explain;
use super::locality_tests::located;
use super::tests::{ep, ip, not_ready, port, service, slice, zone_hint, TCP};
use super::*;
use crate::model::{Endpoint, EndpointSlice};
use crate::table::TierKind;

const VIP: &str = "10.96.0.10";
const VIRTUAL: &str = "admiralty-vk";

fn nodes() -> Vec<Node> {
    vec![located("a1", "zone-a", "r1"), located("b1", "zone-b", "r1")]
}

/// The copy on the virtual node: no zone, a node the agent has no labels for.
fn on_virtual_node(address: &str) -> Endpoint {
    let mut endpoint = ep(address, VIRTUAL, "unused");
    endpoint.zone = None;
    endpoint
}

/// The Service with its real copies in `real` and the virtual copies in `virtual_slice`.
fn cluster(real: &str, virtual_slice: &str, policy: Option<LocalityPolicy>) -> Store {
    let mut dns = service("dns", VIP, vec![port("", TCP, 53)]);
    dns.locality = policy;
    let slices: Vec<EndpointSlice> = vec![
        slice(
            "dns",
            real,
            &[("", TCP, 53)],
            vec![
                ep("10.244.1.5", "a1", "zone-a"),
                ep("10.244.2.5", "b1", "zone-b"),
            ],
        ),
        slice(
            "dns",
            virtual_slice,
            &[("", TCP, 53)],
            vec![on_virtual_node("10.244.1.5"), on_virtual_node("10.244.2.5")],
        ),
    ];
    let mut store = super::tests::store(vec![dns], slices);
    for node in nodes() {
        store.upsert_node(node);
    }
    store
}

fn zone_policy() -> PlanConfig {
    PlanConfig {
        default_locality: LocalityPolicy::Zone,
        ..PlanConfig::default()
    }
}

fn the_vs(store: &Store, config: &PlanConfig) -> VirtualServer {
    let table = plan(store, &nodes()[0], config);
    table
        .get(&VsKey::new(TCP, ip(VIP), 53))
        .cloned()
        .unwrap_or_else(|| panic!("no virtual server for {VIP}"))
}

#[test]
fn the_copy_on_the_real_node_keeps_the_zone_in_either_slice_order() {
    // "dns-0" sorts before "dns-1": the virtual copies come first by slice name one way round.
    for (real, virtual_slice) in [("dns-1", "dns-0"), ("dns-0", "dns-1")] {
        let store = cluster(real, virtual_slice, None);
        let vs = the_vs(&store, &zone_policy());
        let programmed: Vec<(String, Option<String>)> = vs
            .programmed()
            .iter()
            .map(|b| {
                (
                    format!("{}:{}", b.address, b.port),
                    b.node_name.as_deref().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(
            programmed,
            vec![("10.244.1.5:53".to_owned(), Some("a1".to_owned()))],
            "slices {real} (real) and {virtual_slice} (virtual)"
        );
        assert_eq!(vs.tiers[0].kind, TierKind::SameZone, "{real}");
    }
}

#[test]
fn explain_says_which_copy_was_kept_and_why() {
    let store = cluster("dns-1", "dns-0", None);
    let explained = explain(&store, &nodes()[0], &zone_policy());
    let endpoints = &explained[0].ports[0].endpoints;
    assert_eq!(endpoints.len(), 2);
    for endpoint in endpoints {
        assert_ne!(endpoint.node_name.as_deref(), Some(VIRTUAL));
        assert_eq!(endpoint.duplicates.len(), 1, "{endpoint:?}");
        let duplicate = &endpoint.duplicates[0];
        assert_eq!(duplicate.node_name.as_deref(), Some(VIRTUAL));
        assert_eq!(duplicate.slice, "dns-0");
        assert!(
            duplicate.why.contains("more specific locality"),
            "{duplicate:?}"
        );
    }
    let text = super::explain::render_text(&explained, &nodes()[0]);
    assert!(
        text.contains("kept over its copy in slice dns-0 (node admiralty-vk, zone -): this copy's node gives a more specific locality"),
        "{text}"
    );
}

#[test]
fn readiness_still_comes_before_locality() {
    let mut dns = service("dns", VIP, vec![port("", TCP, 53)]);
    dns.locality = None;
    let slices = vec![
        slice(
            "dns",
            "dns-0",
            &[("", TCP, 53)],
            vec![not_ready(ep("10.244.1.5", "a1", "zone-a"))],
        ),
        slice(
            "dns",
            "dns-1",
            &[("", TCP, 53)],
            vec![on_virtual_node("10.244.1.5")],
        ),
    ];
    let mut store = super::tests::store(vec![dns], slices);
    for node in nodes() {
        store.upsert_node(node);
    }
    let vs = the_vs(&store, &PlanConfig::default());
    let kept: Vec<Option<&str>> = vs
        .programmed()
        .iter()
        .map(|b| b.node_name.as_deref())
        .collect();
    assert_eq!(
        kept,
        vec![Some(VIRTUAL)],
        "a ready copy beats a not-ready one"
    );
}

#[test]
fn a_zone_beats_a_region_which_beats_a_bare_known_node() {
    // c1: known, region only; d1: known, nothing; the endpoint's own zone counts as a zone.
    let mut region_only = located("c1", "unused", "r1");
    region_only.zone = None;
    let mut bare = located("d1", "unused", "unused");
    bare.zone = None;
    bare.region = None;
    let mut dns = service("dns", VIP, vec![port("", TCP, 53)]);
    dns.locality = None;
    let copy = |node: &str| {
        let mut endpoint = ep("10.244.9.9", node, "unused");
        endpoint.zone = None;
        endpoint
    };
    for (first, second, kept) in [
        (copy("c1"), copy("d1"), "c1"),
        (copy("d1"), copy("c1"), "c1"),
        (copy("d1"), copy(VIRTUAL), "d1"),
        (copy("c1"), ep("10.244.9.9", VIRTUAL, "zone-q"), VIRTUAL),
    ] {
        let slices = vec![
            slice("dns", "dns-0", &[("", TCP, 53)], vec![first]),
            slice("dns", "dns-1", &[("", TCP, 53)], vec![second]),
        ];
        let mut store = super::tests::store(vec![dns.clone()], slices);
        for node in [nodes()[0].clone(), region_only.clone(), bare.clone()] {
            store.upsert_node(node);
        }
        let vs = the_vs(&store, &PlanConfig::default());
        let names: Vec<Option<&str>> = vs
            .programmed()
            .iter()
            .map(|b| b.node_name.as_deref())
            .collect();
        assert_eq!(names, vec![Some(kept)]);
    }
}

/// Under kube-proxy's own policy the kept copy matters too: its hints decide the topology
/// mode, and kube-proxy's choice among copies is Go map order (arbitrary).
#[test]
fn the_kept_copy_carries_its_hints() {
    let mut dns = service("dns", VIP, vec![port("", TCP, 53)]);
    dns.locality = None;
    let slices = vec![
        slice(
            "dns",
            "dns-1",
            &[("", TCP, 53)],
            vec![
                zone_hint(ep("10.244.1.5", "a1", "zone-a"), &["zone-a"]),
                zone_hint(ep("10.244.2.5", "b1", "zone-b"), &["zone-b"]),
            ],
        ),
        slice(
            "dns",
            "dns-0",
            &[("", TCP, 53)],
            vec![on_virtual_node("10.244.1.5"), on_virtual_node("10.244.2.5")],
        ),
    ];
    let mut store = super::tests::store(vec![dns], slices);
    for node in nodes() {
        store.upsert_node(node);
    }
    let vs = the_vs(&store, &PlanConfig::default());
    let programmed: Vec<String> = vs
        .programmed()
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(programmed, vec!["10.244.1.5"], "same-zone from the hints");
}
