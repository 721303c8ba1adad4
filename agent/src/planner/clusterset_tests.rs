//! Tests of clusterset VIPs (MCS ServiceImports) and of this cluster's preference in the
//! derived-Service pattern: this cluster's endpoints first, the other clusters' behind them,
//! with Envoy's spill rule between the two. Expected shares are worked out by hand from
//! `docs/topology.md`.

use proptest::prelude::*;

use super::explain::{explain, render_text};
use super::tests::{ep, ip, not_ready, port, service, slice, TCP};
use super::*;
use crate::model::{Endpoint, EndpointSlice, ServiceKind, SliceOrigin};
use crate::table::{TierKind, SHARE_WHOLE};

const SET_IP: &str = "10.42.0.10";
const THIS: &str = "west";

fn located(name: &str, zone: &str) -> Node {
    Node {
        name: name.to_owned(),
        zone: Some(zone.to_owned()),
        region: Some("r1".to_owned()),
        addresses: Vec::new(),
        leaving: None,
        local_addresses: None,
    }
}

fn nodes() -> Vec<Node> {
    vec![
        located("a1", "zone-a"),
        located("a2", "zone-a"),
        located("b1", "zone-b"),
        located("b2", "zone-b"),
    ]
}

/// `default/web`, type ClusterSetIP, one port 80.
fn import() -> Service {
    let mut web = service("web", SET_IP, vec![port("http", TCP, 80)]);
    web.key = ServiceKey::import("default", "web");
    web
}

/// A slice of the ServiceImport `default/web` exported by `cluster`.
fn imported(name: &str, cluster: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    let mut imported = slice("web", name, &[("http", TCP, 8080)], endpoints);
    imported.service.kind = ServiceKind::ServiceImport;
    imported.origin = SliceOrigin::Remote(cluster.to_owned());
    imported
}

fn local_pods(ready: usize, not_ready_count: usize) -> Vec<Endpoint> {
    let names = ["a1", "a2", "b1", "b2"];
    (0..ready + not_ready_count)
        .map(|i| {
            let node = names[i % names.len()];
            let zone = if node.starts_with('a') {
                "zone-a"
            } else {
                "zone-b"
            };
            let endpoint = ep(&format!("10.244.0.{}", i + 1), node, zone);
            if i < ready {
                endpoint
            } else {
                not_ready(endpoint)
            }
        })
        .collect()
}

fn remote_pods(cluster_octet: u8, ready: usize, not_ready_count: usize) -> Vec<Endpoint> {
    (0..ready + not_ready_count)
        .map(|i| {
            let endpoint = ep(&format!("10.{cluster_octet}.0.{}", i + 1), "remote", "x");
            if i < ready {
                endpoint
            } else {
                not_ready(endpoint)
            }
        })
        .collect()
}

fn cluster(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Store {
    let mut store = super::tests::store(services, slices);
    for node in nodes() {
        store.upsert_node(node);
    }
    store
}

fn with_id() -> PlanConfig {
    PlanConfig {
        cluster_id: Some(THIS.to_owned()),
        ..PlanConfig::default()
    }
}

fn clusterset_vs(store: &Store, config: &PlanConfig) -> Option<VirtualServer> {
    plan(store, &nodes()[0], config)
        .get(&VsKey::new(TCP, ip(SET_IP), 80))
        .cloned()
}

/// (tier, share in percent) of every tier.
fn percent(vs: &VirtualServer) -> Vec<(TierKind, u32)> {
    vs.tiers
        .iter()
        .enumerate()
        .map(|(position, tier)| (tier.kind, (tier.share(position) + 5_000) / 10_000))
        .collect()
}

fn two_clusters(local_ready: usize, local_not_ready: usize) -> Store {
    cluster(
        vec![import()],
        vec![
            imported("web-west", THIS, local_pods(local_ready, local_not_ready)),
            imported("web-east", "east", remote_pods(8, 2, 0)),
        ],
    )
}

#[test]
fn without_a_cluster_id_a_service_import_is_not_programmed() {
    let store = two_clusters(4, 0);
    assert_eq!(clusterset_vs(&store, &PlanConfig::default()), None);
    let import = store
        .service(&ServiceKey::import("default", "web"))
        .expect("import in the store");
    assert_eq!(
        skip_reason(import, &PlanConfig::default()),
        Some(SkipReason::NoClusterId)
    );
    assert_eq!(skip_reason(import, &with_id()), None);
}

#[test]
fn a_headless_import_gets_nothing() {
    let mut headless = import();
    headless.headless = true;
    headless.cluster_ips.clear();
    let store = cluster(
        vec![headless],
        vec![imported("web-west", THIS, local_pods(2, 0))],
    );
    assert!(plan(&store, &nodes()[0], &with_id()).is_empty());
}

#[test]
fn this_cluster_serves_while_healthy_and_hands_over_as_it_thins() {
    // Whole: every connection stays in this cluster, weighted scheduler, weight 1.
    let vs = clusterset_vs(&two_clusters(4, 0), &with_id()).expect("clusterset VIP");
    assert_eq!(vs.service, ServiceKey::import("default", "web"));
    assert_eq!(vs.frontend, Frontend::ClusterIP);
    assert_eq!(vs.scheduler, "wrr");
    assert_eq!(
        percent(&vs),
        [(TierKind::Cluster, 100), (TierKind::RemoteClusters, 0)]
    );
    assert_eq!(vs.programmed().len(), 4);
    assert!(vs.programmed().iter().all(|b| b.weight == 1));
    // 3 of 4 ready: 1.4 × 75 % ≥ 100 %, still whole.
    let vs = clusterset_vs(&two_clusters(3, 1), &with_id()).expect("clusterset VIP");
    assert_eq!(
        percent(&vs),
        [(TierKind::Cluster, 100), (TierKind::RemoteClusters, 0)]
    );
    // Half ready: Envoy's 70/30.
    let vs = clusterset_vs(&two_clusters(2, 2), &with_id()).expect("clusterset VIP");
    assert_eq!(
        percent(&vs),
        [(TierKind::Cluster, 70), (TierKind::RemoteClusters, 30)]
    );
    // A quarter: 35/65.
    let vs = clusterset_vs(&two_clusters(1, 3), &with_id()).expect("clusterset VIP");
    assert_eq!(
        percent(&vs),
        [(TierKind::Cluster, 35), (TierKind::RemoteClusters, 65)]
    );
}

#[test]
fn scaled_to_zero_goes_remote_and_back_comes_home() {
    let vs = clusterset_vs(&two_clusters(0, 0), &with_id()).expect("clusterset VIP");
    assert_eq!(percent(&vs), [(TierKind::RemoteClusters, 100)]);
    let remote: Vec<String> = vs
        .programmed()
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(remote, ["10.8.0.1", "10.8.0.2"]);
    let vs = clusterset_vs(&two_clusters(4, 0), &with_id()).expect("clusterset VIP");
    assert!(vs
        .programmed()
        .iter()
        .all(|b| b.address.to_string().starts_with("10.244.")));
}

#[test]
fn zone_policy_splits_this_cluster_into_locality_tiers() {
    let mut zoned = import();
    zoned.locality = Some(LocalityPolicy::Zone);
    let store = cluster(
        vec![zoned],
        vec![
            imported("web-west", THIS, local_pods(4, 0)),
            imported("web-east", "east", remote_pods(8, 2, 0)),
        ],
    );
    let vs = clusterset_vs(&store, &with_id()).expect("clusterset VIP");
    assert_eq!(
        percent(&vs),
        [
            (TierKind::SameZone, 100),
            (TierKind::SameRegion, 0),
            (TierKind::RemoteClusters, 0)
        ]
    );
}

#[test]
fn an_import_and_the_service_it_shares_a_name_with_are_planned_apart() {
    // The exported Service lives here too, under the same namespace/name.
    let web = service("web", "10.96.0.80", vec![port("http", TCP, 80)]);
    let local = slice("web", "web-abc", &[("http", TCP, 8080)], local_pods(1, 0));
    let mut store = two_clusters(4, 0);
    store.upsert_service(web);
    store.upsert_slice(local);
    let table = plan(&store, &nodes()[0], &with_id());
    let service_vs = table
        .get(&VsKey::new(TCP, ip("10.96.0.80"), 80))
        .expect("the Service's ClusterIP");
    assert_eq!(service_vs.service, ServiceKey::new("default", "web"));
    assert_eq!(service_vs.programmed().len(), 1);
    assert_eq!(service_vs.scheduler, "rr");
    let import_vs = table
        .get(&VsKey::new(TCP, ip(SET_IP), 80))
        .expect("the clusterset IP");
    assert_eq!(import_vs.programmed().len(), 4);
    // Re-planning the import alone leaves the Service's servers alone.
    let mut replanned = table.clone();
    replan_service(
        &mut replanned,
        &store,
        &ServiceKey::import("default", "web"),
        &nodes()[0],
        &with_id(),
    );
    assert_eq!(replanned, table);
}

#[test]
fn a_service_wins_an_address_it_shares_with_an_import() {
    let clash = service("other", SET_IP, vec![port("http", TCP, 80)]);
    let mut store = two_clusters(4, 0);
    store.upsert_service(clash);
    let table = plan(&store, &nodes()[0], &with_id());
    let vs = table.get(&VsKey::new(TCP, ip(SET_IP), 80)).expect("vs");
    assert_eq!(vs.service, ServiceKey::new("default", "other"));
    assert_eq!(table.conflicts().len(), 1);
}

#[test]
fn explain_says_which_cluster_and_why() {
    let store = two_clusters(2, 2);
    let node = &nodes()[0];
    let explanations = explain(&store, node, &with_id());
    let text = render_text(&explanations, node);
    assert!(text.contains("ServiceImport default/web"), "{text}");
    assert!(
        text.contains("endpoints from this cluster (west) first"),
        "{text}"
    );
    assert!(
        text.contains("tier cluster: 2 of 4 ready, share 70.0%"),
        "{text}"
    );
    assert!(
        text.contains("tier remote-clusters: 2 of 2 ready, share 30.0%"),
        "{text}"
    );
    assert!(text.contains("in this cluster west"), "{text}");
    assert!(text.contains("ready in cluster east"), "{text}");
    let unset = render_text(&explain(&store, node, &PlanConfig::default()), node);
    assert!(
        unset.contains(
            "ServiceImport default/web: skipped: a ServiceImport, but this cluster's id is unknown"
        ),
        "{unset}"
    );
}

/// The derived-Service pattern: the MCS implementation makes a plain Service whose slices
/// carry `multicluster.kubernetes.io/source-cluster`, this cluster's own among them.
fn derived(config: &PlanConfig) -> VirtualServer {
    let derived = service("derived-web", "10.96.0.90", vec![port("http", TCP, 80)]);
    let mut own = slice(
        "derived-web",
        "derived-web-west",
        &[("http", TCP, 8080)],
        local_pods(2, 0),
    );
    own.origin = SliceOrigin::Remote(THIS.to_owned());
    let mut other = slice(
        "derived-web",
        "derived-web-east",
        &[("http", TCP, 8080)],
        remote_pods(8, 2, 0),
    );
    other.origin = SliceOrigin::Remote("east".to_owned());
    let store = cluster(vec![derived], vec![own, other]);
    plan(&store, &nodes()[0], config)
        .get(&VsKey::new(TCP, ip("10.96.0.90"), 80))
        .cloned()
        .expect("derived Service")
}

#[test]
fn a_derived_service_prefers_this_clusters_own_slices_once_it_knows_its_id() {
    // Without an id, this cluster's own export is just another cluster: all flat, as before.
    let vs = derived(&PlanConfig::default());
    assert_eq!(vs.tiers.len(), 1);
    assert_eq!(vs.tiers[0].kind, TierKind::RemoteClusters);
    assert_eq!(vs.programmed().len(), 4);
    // With it, kube-proxy's behaviour: this cluster's endpoints, the others only as fallback.
    let vs = derived(&with_id());
    assert_eq!(
        vs.tiers.iter().map(|t| t.kind).collect::<Vec<_>>(),
        [TierKind::Cluster, TierKind::RemoteClusters]
    );
    let programmed: Vec<String> = vs
        .programmed()
        .iter()
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(programmed, ["10.244.0.1", "10.244.0.2"]);
    // Under a locality policy, the same spill as a ServiceImport's.
    let zone = PlanConfig {
        default_locality: LocalityPolicy::Zone,
        ..with_id()
    };
    let vs = derived(&zone);
    assert_eq!(
        vs.tiers.last().map(|t| t.kind),
        Some(TierKind::RemoteClusters)
    );
    assert_eq!(vs.tiers.last().and_then(|t| t.share_ppm), Some(0));
}

/// (share of this cluster, share of the other clusters) in ppm.
fn split(vs: &VirtualServer) -> (u32, u32) {
    let mut local = 0;
    let mut remote = 0;
    for (position, tier) in vs.tiers.iter().enumerate() {
        match tier.kind {
            TierKind::RemoteClusters => remote += tier.share(position),
            TierKind::ServingTerminating => {}
            _ => local += tier.share(position),
        }
    }
    (local, remote)
}

fn clusterset(
    policy: LocalityPolicy,
    local: (usize, usize),
    remotes: &[(usize, usize)],
) -> Option<VirtualServer> {
    let mut web = import();
    web.locality = Some(policy);
    let mut slices = vec![imported("web-west", THIS, local_pods(local.0, local.1))];
    for (index, (ready, not_ready_count)) in remotes.iter().enumerate() {
        let octet = 8 + u8::try_from(index).unwrap_or(0);
        slices.push(imported(
            &format!("web-remote-{index}"),
            &format!("remote-{index}"),
            remote_pods(octet, *ready, *not_ready_count),
        ));
    }
    clusterset_vs(&cluster(vec![web], slices), &with_id())
}

fn policies() -> impl Strategy<Value = LocalityPolicy> {
    prop_oneof![
        Just(LocalityPolicy::KubeProxy),
        Just(LocalityPolicy::Zone),
        Just(LocalityPolicy::Node),
    ]
}

proptest! {
    /// Shares sum to the whole whenever anything is Ready; this cluster gets a share while it
    /// has a Ready endpoint, everything while it is healthy by Envoy's rule (or nothing is Ready
    /// elsewhere), at least its Envoy health otherwise, and nothing without a Ready endpoint.
    #[test]
    fn this_cluster_is_preferred_while_it_has_ready_endpoints(
        policy in policies(),
        local in (0usize..8, 0usize..8),
        remotes in prop::collection::vec((0usize..5, 0usize..5), 0..3),
    ) {
        let Some(vs) = clusterset(policy, local, &remotes) else {
            prop_assert!(false, "no clusterset VIP");
            return Ok(());
        };
        let (local_share, remote_share) = split(&vs);
        let remote_ready: usize = remotes.iter().map(|r| r.0).sum();
        let anything_ready = local.0 + remote_ready > 0;
        let total: u32 = vs.tiers.iter().enumerate().map(|(p, t)| t.share(p)).sum();
        prop_assert_eq!(total, if anything_ready { SHARE_WHOLE } else { 0 });
        if local.0 == 0 {
            prop_assert_eq!(local_share, 0);
        } else {
            prop_assert!(local_share > 0);
            let health = (1.4 * local.0 as f64 / (local.0 + local.1) as f64).min(1.0);
            if health >= 1.0 || remote_ready == 0 {
                prop_assert_eq!(local_share, SHARE_WHOLE);
            }
            // Under zone/node the capacity guard only moves load inside this cluster.
            prop_assert!(f64::from(local_share) + 1.0 >= health * f64::from(SHARE_WHOLE));
        }
        if remote_ready == 0 {
            prop_assert_eq!(remote_share, 0);
        }
        // Every backend with a share has a weight, none without.
        for (position, tier) in vs.tiers.iter().enumerate() {
            let weighted = tier.backends.iter().all(|b| b.weight > 0);
            prop_assert_eq!(weighted, tier.share(position) > 0);
        }
    }

    /// Spill is monotone in this cluster's health: one more Ready endpoint here never lowers
    /// this cluster's share.
    #[test]
    fn spill_to_other_clusters_is_monotone(
        policy in policies(),
        ready in 0usize..7,
        not_ready_count in 1usize..8,
        remotes in prop::collection::vec((1usize..5, 0usize..5), 1..3),
    ) {
        let before = clusterset(policy, (ready, not_ready_count), &remotes);
        let after = clusterset(policy, (ready + 1, not_ready_count - 1), &remotes);
        let (Some(before), Some(after)) = (before, after) else {
            prop_assert!(false, "no clusterset VIP");
            return Ok(());
        };
        prop_assert!(split(&after).0 >= split(&before).0);
        prop_assert!(split(&after).1 <= split(&before).1);
    }
}
