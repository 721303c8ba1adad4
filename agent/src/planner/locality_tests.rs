//! Tests of the locality policies: tiers from hints or location, Envoy's spill rule with the
//! capacity guard, weights, and what IPVS is asked to program. Cases are written from the
//! rules in `docs/topology.md`, with the expected shares worked out by hand.

use super::tests::{ep, ip, not_ready, port, service, slice, terminating, zone_hint, TCP};
use super::*;
use crate::dataplane::op::Op;
use crate::dataplane::{ProgrammedService, TierScope};
use crate::diff::OpBatch;
use crate::model::{Endpoint, EndpointSlice, LocalityPolicy, SliceOrigin};
use crate::scheduler::Scheduler;
use crate::table::{TierKind, SHARE_WHOLE};

const VIP: &str = "10.96.0.10";

pub(super) fn located(name: &str, zone: &str, region: &str) -> Node {
    Node {
        name: name.to_owned(),
        zone: Some(zone.to_owned()),
        region: Some(region.to_owned()),
        addresses: Vec::new(),
        leaving: None,
        local_addresses: None,
    }
}

/// Two zones of two nodes each, one region: a1 a2 in zone-a, b1 b2 in zone-b.
fn four_nodes() -> Vec<Node> {
    vec![
        located("a1", "zone-a", "r1"),
        located("a2", "zone-a", "r1"),
        located("b1", "zone-b", "r1"),
        located("b2", "zone-b", "r1"),
    ]
}

fn dns(locality: Option<LocalityPolicy>) -> Service {
    let mut dns = service("dns", VIP, vec![port("", TCP, 53)]);
    dns.locality = locality;
    dns
}

fn cluster(nodes: &[Node], service: Service, slices: Vec<EndpointSlice>) -> Store {
    let mut store = super::tests::store(vec![service], slices);
    for node in nodes {
        store.upsert_node(node.clone());
    }
    store
}

fn dns_slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice("dns", "dns-1", &[("", TCP, 53)], endpoints)
}

fn the_vs(store: &Store, node: &Node, config: &PlanConfig) -> VirtualServer {
    let table = plan(store, node, config);
    let key = VsKey::new(TCP, ip(VIP), 53);
    match table.get(&key) {
        Some(vs) => vs.clone(),
        None => panic!("no virtual server {key:?} on {}", node.name),
    }
}

/// (tier, share in tenths of a percent) of every tier.
fn shares(vs: &VirtualServer) -> Vec<(TierKind, u32)> {
    vs.tiers
        .iter()
        .enumerate()
        .map(|(position, tier)| (tier.kind, (tier.share(position) + 500) / 1_000))
        .collect()
}

fn zone_policy() -> PlanConfig {
    PlanConfig {
        default_locality: LocalityPolicy::Zone,
        ..PlanConfig::default()
    }
}

/// One endpoint per node of [`four_nodes`], addresses 10.0.0.1..=4, no hints.
fn one_per_node() -> Vec<Endpoint> {
    vec![
        ep("10.0.0.1", "a1", "zone-a"),
        ep("10.0.0.2", "a2", "zone-a"),
        ep("10.0.0.3", "b1", "zone-b"),
        ep("10.0.0.4", "b2", "zone-b"),
    ]
}

#[test]
fn without_opt_in_the_table_is_kube_proxys() {
    let nodes = four_nodes();
    let store = cluster(&nodes, dns(None), vec![dns_slice(one_per_node())]);
    let vs = the_vs(&store, &nodes[0], &PlanConfig::default());
    assert_eq!(vs.locality, LocalityPolicy::KubeProxy);
    assert_eq!(vs.scheduler, "rr");
    assert_eq!(vs.tiers.len(), 1);
    assert_eq!(vs.tiers[0].kind, TierKind::Cluster);
    assert_eq!(vs.tiers[0].share_ppm, None);
    assert!(vs.programmed().iter().all(|b| b.weight == 1));
    // An explicit kube-proxy annotation beats a cluster-wide default.
    let annotated = cluster(
        &nodes,
        dns(Some(LocalityPolicy::KubeProxy)),
        vec![dns_slice(one_per_node())],
    );
    assert_eq!(the_vs(&annotated, &nodes[0], &zone_policy()), vs);
}

#[test]
fn when_hints_vanish_the_zone_keeps_the_traffic() {
    let nodes = four_nodes();
    let store = cluster(&nodes, dns(None), vec![dns_slice(one_per_node())]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    assert_eq!(vs.locality, LocalityPolicy::Zone);
    assert_eq!(
        vs.scheduler, "wrr",
        "rr ignores weights, so opted-in Services get wrr"
    );
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 1_000), (TierKind::SameRegion, 0)]
    );
    // One tier in use: weight 1, as kube-proxy would program it.
    let programmed: Vec<_> = vs
        .programmed()
        .iter()
        .map(|b| (b.address, b.weight))
        .collect();
    assert_eq!(programmed, [(ip("10.0.0.1"), 1), (ip("10.0.0.2"), 1)]);
}

#[test]
fn complete_hints_still_decide_the_first_tier() {
    let nodes = four_nodes();
    // The controller lent a2's endpoint to zone-b: hints, not location, make the zone tier.
    let endpoints = vec![
        zone_hint(ep("10.0.0.1", "a1", "zone-a"), &["zone-a"]),
        zone_hint(ep("10.0.0.2", "a2", "zone-a"), &["zone-b"]),
        zone_hint(ep("10.0.0.3", "b1", "zone-b"), &["zone-b"]),
    ];
    let mut auto = dns(None);
    auto.topology_intent = crate::model::TopologyIntent::Auto;
    let store = cluster(&nodes, auto, vec![dns_slice(endpoints)]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    assert_eq!(vs.topology, TopologyMode::SameZone);
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 1_000), (TierKind::SameRegion, 0)]
    );
    assert_eq!(vs.tiers[0].backends[0].address, ip("10.0.0.1"));
    assert_eq!(
        vs.tiers[1].backends.len(),
        2,
        "the lent endpoint and zone-b's"
    );
}

#[test]
fn a_zone_half_down_hands_over_gradually() {
    let nodes = four_nodes();
    let endpoints = vec![
        ep("10.0.0.1", "a1", "zone-a"),
        not_ready(ep("10.0.0.2", "a2", "zone-a")),
        ep("10.0.0.3", "b1", "zone-b"),
        ep("10.0.0.4", "b2", "zone-b"),
    ];
    // Without Node counts there is no capacity guard: Envoy's rule alone, 1 of 2 × 1.4.
    let unguarded = super::tests::store(vec![dns(None)], vec![dns_slice(endpoints.clone())]);
    let vs = the_vs(&unguarded, &nodes[0], &zone_policy());
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 700), (TierKind::Cluster, 300)]
    );
    // With them: zone-a has 1 of 3 ready endpoints for 2 of 4 nodes, so at most 2/3 stays.
    let store = cluster(&nodes, dns(None), vec![dns_slice(endpoints)]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 667), (TierKind::SameRegion, 333)]
    );
    // 1 backend at 2/3 against 2 at 1/6 each: weights 4 and 1.
    let weights: Vec<u32> = vs.programmed().iter().map(|b| b.weight).collect();
    assert_eq!(weights, [4, 1, 1]);
    let total: u32 = vs.tiers.iter().filter_map(|t| t.share_ppm).sum();
    assert_eq!(total, SHARE_WHOLE);
}

#[test]
fn a_small_zone_is_guarded_by_endpoints_per_node() {
    // Zone-a: three nodes, one endpoint; zone-b: one node, three endpoints.
    let nodes = vec![
        located("a1", "zone-a", "r1"),
        located("a2", "zone-a", "r1"),
        located("a3", "zone-a", "r1"),
        located("b1", "zone-b", "r1"),
    ];
    let endpoints = vec![
        ep("10.0.0.1", "a1", "zone-a"),
        ep("10.0.0.2", "b1", "zone-b"),
        ep("10.0.0.3", "b1", "zone-b"),
        ep("10.0.0.4", "b1", "zone-b"),
    ];
    let store = cluster(&nodes, dns(None), vec![dns_slice(endpoints)]);
    let vs = the_vs(&store, &nodes[1], &zone_policy());
    // (1/4 of the endpoints) / (3/4 of the nodes) = 1/3 may stay in zone-a.
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 333), (TierKind::SameRegion, 667)]
    );
    // The big zone keeps everything.
    let vs = the_vs(&store, &nodes[3], &zone_policy());
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 1_000), (TierKind::SameRegion, 0)]
    );
    // trafficDistribution hints mirror each endpoint's zone without any capacity check, so
    // they decide the tier but do not lift the guard (kube-proxy would send all of zone-a's
    // three nodes to its one endpoint).
    let mut prefer = dns(None);
    prefer.topology_intent = crate::model::TopologyIntent::PreferSameZone;
    let hinted = vec![
        zone_hint(ep("10.0.0.1", "a1", "zone-a"), &["zone-a"]),
        zone_hint(ep("10.0.0.2", "b1", "zone-b"), &["zone-b"]),
        zone_hint(ep("10.0.0.3", "b1", "zone-b"), &["zone-b"]),
        zone_hint(ep("10.0.0.4", "b1", "zone-b"), &["zone-b"]),
    ];
    let store = cluster(&nodes, prefer, vec![dns_slice(hinted)]);
    let vs = the_vs(&store, &nodes[1], &zone_policy());
    assert_eq!(vs.topology, TopologyMode::SameZone);
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 333), (TierKind::SameRegion, 667)]
    );
}

#[test]
fn node_policy_serves_this_node_first_within_its_capacity() {
    let nodes = four_nodes();
    let mut dns = dns(Some(LocalityPolicy::Node));
    dns.topology_intent = crate::model::TopologyIntent::None;
    let store = cluster(&nodes, dns.clone(), vec![dns_slice(one_per_node())]);
    let vs = the_vs(&store, &nodes[0], &PlanConfig::default());
    assert_eq!(
        shares(&vs),
        [
            (TierKind::SameNode, 1_000),
            (TierKind::SameZone, 0),
            (TierKind::SameRegion, 0)
        ]
    );
    // Two endpoints on a1, none on a2: a1 keeps all (its share of endpoints is twice its
    // share of nodes); a2 goes to its zone, i.e. a1.
    let endpoints = vec![
        ep("10.0.0.1", "a1", "zone-a"),
        ep("10.0.0.2", "a1", "zone-a"),
        ep("10.0.0.3", "b1", "zone-b"),
        ep("10.0.0.4", "b2", "zone-b"),
    ];
    let store = cluster(&nodes, dns, vec![dns_slice(endpoints)]);
    let vs = the_vs(&store, &nodes[1], &PlanConfig::default());
    assert_eq!(
        shares(&vs),
        [(TierKind::SameZone, 1_000), (TierKind::SameRegion, 0)]
    );
}

#[test]
fn node_policy_keeps_the_zone_cap_even_with_no_other_endpoint_in_the_zone() {
    // a1 holds zone-a's only endpoint, and zone-a has three nodes: a naive "always local"
    // would load it with a1's traffic plus a2's and a3's zone tier.
    let nodes = vec![
        located("a1", "zone-a", "r1"),
        located("a2", "zone-a", "r1"),
        located("a3", "zone-a", "r1"),
        located("b1", "zone-b", "r1"),
    ];
    let endpoints = vec![
        ep("10.0.0.1", "a1", "zone-a"),
        ep("10.0.0.2", "b1", "zone-b"),
        ep("10.0.0.3", "b1", "zone-b"),
        ep("10.0.0.4", "b1", "zone-b"),
    ];
    let store = cluster(
        &nodes,
        dns(Some(LocalityPolicy::Node)),
        vec![dns_slice(endpoints)],
    );
    let vs = the_vs(&store, &nodes[0], &PlanConfig::default());
    assert_eq!(
        shares(&vs),
        [(TierKind::SameNode, 333), (TierKind::SameRegion, 667)]
    );
}

#[test]
fn regions_come_from_node_labels_and_unknown_nodes_are_cluster_wide() {
    let nodes = vec![
        located("a1", "zone-a", "r1"),
        located("b1", "zone-b", "r1"),
        located("c1", "zone-c", "r2"),
    ];
    let endpoints = vec![
        ep("10.0.0.2", "b1", "zone-b"),
        ep("10.0.0.3", "c1", "zone-c"),
        // On a Node the agent does not know: no region, so cluster-wide.
        ep("10.0.0.4", "ghost", "zone-x"),
    ];
    let store = cluster(&nodes, dns(None), vec![dns_slice(endpoints)]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    let kinds: Vec<(TierKind, Vec<IpAddr>)> = vs
        .tiers
        .iter()
        .map(|t| (t.kind, t.backends.iter().map(|b| b.address).collect()))
        .collect();
    assert_eq!(
        kinds,
        [
            (TierKind::SameRegion, vec![ip("10.0.0.2")]),
            (TierKind::Cluster, vec![ip("10.0.0.3"), ip("10.0.0.4")]),
        ]
    );
    // Region r1 holds 1 of 3 endpoints for 2 of 3 nodes: half stays in the region.
    assert_eq!(
        shares(&vs),
        [(TierKind::SameRegion, 500), (TierKind::Cluster, 500)]
    );
}

fn remote_slice(endpoints: Vec<Endpoint>) -> EndpointSlice {
    let mut remote = slice("dns", "dns-east", &[("", TCP, 53)], endpoints);
    remote.origin = SliceOrigin::Remote("east".to_owned());
    remote
}

#[test]
fn other_clusters_serve_only_while_this_one_cannot() {
    let nodes = four_nodes();
    let remote = remote_slice(vec![ep("10.1.0.1", "e1", "east-a")]);
    let scaled_to_zero = cluster(
        &nodes,
        dns(None),
        vec![dns_slice(Vec::new()), remote.clone()],
    );
    let vs = the_vs(&scaled_to_zero, &nodes[0], &zone_policy());
    assert_eq!(shares(&vs), [(TierKind::RemoteClusters, 1_000)]);
    let back = cluster(&nodes, dns(None), vec![dns_slice(one_per_node()), remote]);
    let vs = the_vs(&back, &nodes[0], &zone_policy());
    assert_eq!(
        shares(&vs),
        [
            (TierKind::SameZone, 1_000),
            (TierKind::SameRegion, 0),
            (TierKind::RemoteClusters, 0)
        ]
    );
}

#[test]
fn serving_terminating_endpoints_are_the_last_resort_as_in_kube_proxy() {
    let nodes = four_nodes();
    let leaving = vec![
        terminating(ep("10.0.0.1", "a1", "zone-a"), true),
        ep("10.0.0.3", "b1", "zone-b"),
    ];
    let store = cluster(&nodes, dns(None), vec![dns_slice(leaving)]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    assert_eq!(
        shares(&vs),
        [
            (TierKind::SameRegion, 1_000),
            (TierKind::ServingTerminating, 0)
        ]
    );
    let only_leaving = vec![terminating(ep("10.0.0.1", "a1", "zone-a"), true)];
    let store = cluster(&nodes, dns(None), vec![dns_slice(only_leaving)]);
    let vs = the_vs(&store, &nodes[0], &zone_policy());
    assert_eq!(shares(&vs), [(TierKind::ServingTerminating, 1_000)]);
}

#[test]
fn weighted_schedulers_are_kept_and_weight_blind_ones_replaced() {
    let config = |scheduler: &str| PlanConfig {
        scheduler: crate::scheduler::Scheduler::parse(scheduler).expect("scheduler"),
        ..PlanConfig::default()
    };
    assert_eq!(config("rr").scheduler_for(LocalityPolicy::KubeProxy), "rr");
    assert_eq!(config("rr").scheduler_for(LocalityPolicy::Zone), "wrr");
    assert_eq!(config("lc").scheduler_for(LocalityPolicy::Node), "wlc");
    assert_eq!(config("sh").scheduler_for(LocalityPolicy::Zone), "sh");
    assert_eq!(config("wlc").scheduler_for(LocalityPolicy::Zone), "wlc");
}

#[test]
fn ipvs_programs_every_tier_in_use_and_a_weight_change_is_one_edit() {
    let nodes = four_nodes();
    let healthy = cluster(&nodes, dns(None), vec![dns_slice(one_per_node())]);
    let half_down = cluster(
        &nodes,
        dns(None),
        vec![dns_slice(vec![
            ep("10.0.0.1", "a1", "zone-a"),
            not_ready(ep("10.0.0.2", "a2", "zone-a")),
            ep("10.0.0.3", "b1", "zone-b"),
            ep("10.0.0.4", "b2", "zone-b"),
        ])],
    );
    let before = ProgrammedService::from_virtual_server(
        &the_vs(&healthy, &nodes[0], &zone_policy()),
        TierScope::Active,
        None,
    );
    let after = ProgrammedService::from_virtual_server(
        &the_vs(&half_down, &nodes[0], &zone_policy()),
        TierScope::Active,
        None,
    );
    let weights = |service: &ProgrammedService| -> Vec<(IpAddr, u32, u8)> {
        service
            .destinations
            .iter()
            .map(|((address, _), state)| (*address, state.weight, state.tier))
            .collect()
    };
    assert_eq!(
        weights(&before),
        [(ip("10.0.0.1"), 1, 0), (ip("10.0.0.2"), 1, 0)]
    );
    assert_eq!(
        weights(&after),
        [
            (ip("10.0.0.1"), 4, 0),
            (ip("10.0.0.3"), 1, 0),
            (ip("10.0.0.4"), 1, 0)
        ]
    );
    let key = VsKey::new(TCP, ip(VIP), 53);
    let mut batch = OpBatch::new();
    batch.service(key, Some(&after), Some(&before));
    let kinds: Vec<&str> = batch.into_ops().iter().map(|op| op.kind()).collect();
    assert_eq!(
        kinds,
        [
            "add_destination",
            "add_destination",
            "edit_destination",
            "delete_destination"
        ]
    );
}

#[test]
fn backends_on_the_local_node_are_marked_only_when_asked() {
    let nodes = four_nodes();
    let store = cluster(&nodes, dns(None), vec![dns_slice(one_per_node())]);
    let vs = the_vs(&store, &nodes[0], &PlanConfig::default());
    let local = |service: ProgrammedService| -> Vec<(IpAddr, bool)> {
        service
            .destinations
            .iter()
            .map(|((address, _), state)| (*address, state.local))
            .collect()
    };
    let marked = local(ProgrammedService::from_virtual_server(
        &vs,
        TierScope::Active,
        Some("a1"),
    ));
    assert_eq!(
        marked,
        [
            (ip("10.0.0.1"), true),
            (ip("10.0.0.2"), false),
            (ip("10.0.0.3"), false),
            (ip("10.0.0.4"), false)
        ]
    );
    let unmarked = local(ProgrammedService::from_virtual_server(
        &vs,
        TierScope::All,
        None,
    ));
    assert!(unmarked.iter().all(|(_, local)| !local), "{unmarked:?}");
}

#[test]
fn explain_names_tier_weight_and_why() {
    let nodes = four_nodes();
    let store = cluster(
        &nodes,
        dns(None),
        vec![dns_slice(vec![
            ep("10.0.0.1", "a1", "zone-a"),
            not_ready(ep("10.0.0.2", "a2", "zone-a")),
            ep("10.0.0.3", "b1", "zone-b"),
        ])],
    );
    let explained = explain::explain(&store, &nodes[0], &zone_policy());
    let text = explain::render_text(&explained, &nodes[0]);
    assert!(text.contains("locality policy: zone"), "{text}");
    assert!(
        text.contains(
            "tier same-zone: 1 of 2 ready, share 70.0%, weight 7: 1 of 2 ready × 1.4 = 70.0% \
             healthy: hands the rest outward"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "programmed (same-zone, weight 7): in this node's zone zone-a; tier share 70.0%"
        ),
        "{text}"
    );
    assert!(
        text.contains("programmed (same-region, weight 3): in this node's region r1"),
        "{text}"
    );
}

/// `dns` with the `topoproxy.io/ipvs-scheduler` annotation `scheduler` (parsed), if any.
fn dns_scheduled(locality: Option<LocalityPolicy>, scheduler: Option<&str>) -> Service {
    let mut service = dns(locality);
    service.scheduler = scheduler.map(|text| Scheduler::parse(text).expect("test scheduler"));
    service
}

#[test]
fn a_services_ipvs_scheduler_overrides_the_agents() {
    let nodes = four_nodes();
    let agent_wlc = PlanConfig {
        scheduler: Scheduler::parse("wlc").expect("scheduler"),
        ..PlanConfig::default()
    };
    let planned = |scheduler: Option<&str>| {
        let store = cluster(
            &nodes,
            dns_scheduled(None, scheduler),
            vec![dns_slice(one_per_node())],
        );
        the_vs(&store, &nodes[0], &agent_wlc).scheduler
    };
    assert_eq!(planned(Some("mh,mh-port")), "mh,mh-port");
    assert_eq!(planned(Some("sh")), "sh");
    assert_eq!(planned(Some("rr")), "rr");
    // Without the annotation (or with an invalid one, which converts to none): the agent's.
    assert_eq!(planned(None), "wlc");
}

#[test]
fn under_a_locality_policy_a_services_weight_blind_scheduler_becomes_weighted() {
    let nodes = four_nodes();
    for (asked, under_zone) in [
        ("rr", "wrr"),
        ("lc", "wlc"),
        ("sh,sh-fallback", "sh,sh-fallback"),
        ("mh,mh-port", "mh,mh-port"),
        ("dh", "dh"),
        ("sed", "sed"),
    ] {
        let opted_in = cluster(
            &nodes,
            dns_scheduled(Some(LocalityPolicy::Zone), Some(asked)),
            vec![dns_slice(one_per_node())],
        );
        let vs = the_vs(&opted_in, &nodes[0], &PlanConfig::default());
        assert_eq!(vs.scheduler, under_zone, "{asked} under zone");
        // The weights still carry the tiers.
        assert_eq!(
            shares(&vs),
            [(TierKind::SameZone, 1_000), (TierKind::SameRegion, 0)],
            "{asked}"
        );
        let kube_proxy = cluster(
            &nodes,
            dns_scheduled(None, Some(asked)),
            vec![dns_slice(one_per_node())],
        );
        let vs = the_vs(&kube_proxy, &nodes[0], &PlanConfig::default());
        assert_eq!(vs.scheduler, asked, "{asked} without a locality policy");
    }
}

#[test]
fn explain_names_a_services_own_scheduler_and_what_weights_make_of_it() {
    let nodes = four_nodes();
    let text = |locality, scheduler| {
        let store = cluster(
            &nodes,
            dns_scheduled(locality, scheduler),
            vec![dns_slice(one_per_node())],
        );
        let explained = explain::explain(&store, &nodes[0], &PlanConfig::default());
        explain::render_text(&explained, &nodes[0])
    };
    let zone = text(Some(LocalityPolicy::Zone), Some("rr"));
    assert!(
        zone.contains(
            "  IPVS scheduler: rr (annotation topoproxy.io/ipvs-scheduler); wrr where the \
             locality policy weights the tiers\n"
        ),
        "{zone}"
    );
    let plain = text(None, Some("mh,mh-port"));
    assert!(
        plain.contains("  IPVS scheduler: mh,mh-port (annotation topoproxy.io/ipvs-scheduler)\n"),
        "{plain}"
    );
    assert!(!text(None, None).contains("IPVS scheduler"));
}

#[test]
fn changing_a_services_scheduler_is_one_service_edit() {
    let nodes = four_nodes();
    let programmed = |scheduler: Option<&str>| {
        let store = cluster(
            &nodes,
            dns_scheduled(None, scheduler),
            vec![dns_slice(one_per_node())],
        );
        ProgrammedService::from_virtual_server(
            &the_vs(&store, &nodes[0], &PlanConfig::default()),
            TierScope::Active,
            None,
        )
    };
    let key = VsKey::new(TCP, ip(VIP), 53);
    for (from, to) in [
        (None, Some("sh")),
        (Some("sh"), Some("mh")),
        (Some("mh"), Some("mh,mh-fallback")),
        (Some("mh,mh-fallback"), None),
    ] {
        let (before, after) = (programmed(from), programmed(to));
        let mut batch = OpBatch::new();
        batch.service(key, Some(&after), Some(&before));
        let ops = batch.into_ops();
        assert_eq!(
            ops,
            [Op::EditService {
                key,
                config: Box::new(after.config.clone())
            }],
            "{from:?} -> {to:?}"
        );
    }
}
