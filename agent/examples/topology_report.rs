//! The scenario table of `docs/topology.md`, computed by the real planner.
//!
//! Each scenario is a small synthetic cluster (Nodes with zone and region, one DNS Service,
//! its EndpointSlices with hints as kube-controller-manager would write them). For every
//! policy — kube-proxy's behaviour, and topoproxy's `zone` and `node` locality policies — the
//! table of every client node is planned with `topoproxy::planner::plan`, and the programmed
//! weights give each backend's share of that node's new connections.
//!
//! Client model: every node of the local cluster opens the same number of connections, spread
//! over the programmed backends in proportion to their weights (what IPVS `wrr` and the eBPF
//! weighted draw converge to). "Worst / mean" is the busiest backend's load over the mean load
//! per Ready backend of this cluster (of the other clusters when this one has none): the
//! load a perfectly even spread would give.
//!
//! `cargo xtask topology-report` runs this and writes the output into `docs/topology.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use topoproxy::model::{
    Endpoint, EndpointSlice, Hints, IpFamily, LocalityPolicy, Node, Protocol, Service, ServiceKey,
    ServicePort, ServiceType, SliceOrigin, SlicePort, TopologyIntent,
};
use topoproxy::planner::{plan, PlanConfig};
use topoproxy::store::Store;
use topoproxy::table::VsKey;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 53;
/// kube-controller-manager's overload threshold for `topology-mode: Auto` hints.
const OVERLOAD_THRESHOLD: f64 = 0.2;

/// How hints are written for the Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HintSource {
    /// `topology-mode: Auto`: the controller's capacity-aware allocation (modelled below).
    Auto,
    /// `topology-mode: Auto`, but the controller has removed every hint (a rollout, a node
    /// without CPU information: kubernetes#114215, #122437).
    AutoVanished,
    /// `trafficDistribution: PreferSameZone`: every endpoint hinted for its own zone.
    PreferSameZone,
}

struct Pod {
    node: &'static str,
    ready: bool,
}

struct Scenario {
    title: &'static str,
    about: &'static str,
    /// (name, zone, region), the local cluster.
    nodes: Vec<(&'static str, &'static str, &'static str)>,
    pods: Vec<Pod>,
    /// Ready pods of the same Service exported by cluster `east` (MCS slices).
    remote_pods: usize,
    hints: HintSource,
    /// The VIP is a ServiceImport's clusterset IP (this cluster, `west`, exports its local pods
    /// too; planned with `--cluster-id west`), not a derived Service's ClusterIP.
    clusterset: bool,
    /// Every local pod is also listed, with the same IP, on a virtual node with no zone or
    /// region (Admiralty's multicluster-scheduler: a proxy pod on a virtual-kubelet node and
    /// the delegate on the real one), in a slice whose name sorts first.
    virtual_copies: bool,
}

/// This cluster's MCS id in the clusterset scenarios.
const THIS_CLUSTER: &str = "west";

fn pods(spec: &[(&'static str, bool)]) -> Vec<Pod> {
    spec.iter()
        .map(|&(node, ready)| Pod { node, ready })
        .collect()
}

fn seed_nodes() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("a1", "zone-a", "r1"),
        ("a2", "zone-a", "r1"),
        ("b1", "zone-b", "r1"),
        ("b2", "zone-b", "r1"),
    ]
}

fn scenarios() -> Vec<Scenario> {
    let up = true;
    let down = false;
    vec![
        Scenario {
            title: "Seed: 4 nodes / 2 zones, 4 DNS pods",
            about: "One pod per node; the controller writes hints.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", up), ("b2", up)]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Seed: 4 nodes / 2 zones, 2 DNS pods",
            about: "Pods on a1 and b1; hints one per zone.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("b1", up)]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Seed: 4 nodes / 2 zones, 1 DNS pod",
            about: "Fewer endpoints than zones: the controller writes no hints.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up)]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Rollout: hints vanish",
            about: "4 ready pods and 2 new ones not ready yet; the controller has dropped \
                    every hint.",
            nodes: seed_nodes(),
            pods: pods(&[
                ("a1", up),
                ("a2", up),
                ("b1", up),
                ("b2", up),
                ("a1", down),
                ("b1", down),
            ]),
            remote_pods: 0,
            hints: HintSource::AutoVanished,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "One zone down",
            about: "Zone-b's two pods are not ready; the controller lends zone-a's.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", down), ("b2", down)]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "A zone half down",
            about: "b2's pod is not ready: 3 ready for 2 zones of 2 nodes cannot be split \
                    within 20 % overload, so the controller drops the hints.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", up), ("b2", down)]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Small zone: one endpoint for many nodes",
            about: "Zone-a has 6 nodes and 1 pod, zone-b 2 nodes and 3 pods; \
                    trafficDistribution: PreferSameZone (hints = own zone, no capacity check).",
            nodes: vec![
                ("a1", "zone-a", "r1"),
                ("a2", "zone-a", "r1"),
                ("a3", "zone-a", "r1"),
                ("a4", "zone-a", "r1"),
                ("a5", "zone-a", "r1"),
                ("a6", "zone-a", "r1"),
                ("b1", "zone-b", "r1"),
                ("b2", "zone-b", "r1"),
            ],
            pods: pods(&[("a1", up), ("b1", up), ("b1", up), ("b2", up)]),
            remote_pods: 0,
            hints: HintSource::PreferSameZone,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Region down",
            about: "Regions r1 (zones a, b) and r2 (zones c, d), 2 nodes per zone, one pod per \
                    node; every pod in r2 is not ready.",
            nodes: vec![
                ("a1", "zone-a", "r1"),
                ("a2", "zone-a", "r1"),
                ("b1", "zone-b", "r1"),
                ("b2", "zone-b", "r1"),
                ("c1", "zone-c", "r2"),
                ("c2", "zone-c", "r2"),
                ("d1", "zone-d", "r2"),
                ("d2", "zone-d", "r2"),
            ],
            pods: pods(&[
                ("a1", up),
                ("a2", up),
                ("b1", up),
                ("b2", up),
                ("c1", down),
                ("c2", down),
                ("d1", down),
                ("d2", down),
            ]),
            remote_pods: 0,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Two clusters: local scaled to zero",
            about: "The Service has no local pod; cluster east exports 2 ready pods.",
            nodes: seed_nodes(),
            pods: Vec::new(),
            remote_pods: 2,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Two clusters: local scaled back",
            about: "4 local pods again beside east's 2.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", up), ("b2", up)]),
            remote_pods: 2,
            hints: HintSource::Auto,
            clusterset: false,
            virtual_copies: false,
        },
        Scenario {
            title: "Clusterset VIP: local scaled to zero",
            about:
                "A ServiceImport (type ClusterSetIP); this cluster (west) exports no pod, east 2 \
                    ready ones.",
            nodes: seed_nodes(),
            pods: Vec::new(),
            remote_pods: 2,
            hints: HintSource::AutoVanished,
            clusterset: true,
            virtual_copies: false,
        },
        Scenario {
            title: "Clusterset VIP: local rollout, half ready",
            about: "West's 4 pods, 2 of them not ready yet, beside east's 2 ready ones.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", down), ("b1", up), ("b2", down)]),
            remote_pods: 2,
            hints: HintSource::AutoVanished,
            clusterset: true,
            virtual_copies: false,
        },
        Scenario {
            title: "Clusterset VIP: local scaled back",
            about: "West's 4 pods ready again beside east's 2.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", up), ("b2", up)]),
            remote_pods: 2,
            hints: HintSource::AutoVanished,
            clusterset: true,
            virtual_copies: false,
        },
        Scenario {
            title: "Delegated pods listed twice",
            about: "4 pods, each also listed with its IP on a virtual node without zone or \
                    region (Admiralty); trafficDistribution PreferSameZone. The copy on the \
                    real node is kept, so the zone preference holds.",
            nodes: seed_nodes(),
            pods: pods(&[("a1", up), ("a2", up), ("b1", up), ("b2", up)]),
            remote_pods: 0,
            hints: HintSource::PreferSameZone,
            clusterset: false,
            virtual_copies: true,
        },
    ]
}

fn pod_address(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1 + index as u8))
}

fn remote_address(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 245, 0, 1 + index as u8))
}

/// A simplified kube-controller-manager topology cache (equal CPU per node): only Ready
/// endpoints get hints; no hints with fewer ready endpoints than zones; each zone needs at least its node share of the ready
/// endpoints / (1 + 20 %); zones above their share lend endpoints to zones below; if a zone
/// still falls short, no hints at all. Returns the zone hint of every pod (`None`: no hints).
fn controller_hints(scenario: &Scenario) -> Option<Vec<String>> {
    let zone_of = |node: &str| -> String {
        scenario
            .nodes
            .iter()
            .find(|(name, _, _)| *name == node)
            .map(|(_, zone, _)| (*zone).to_owned())
            .unwrap_or_default()
    };
    let mut nodes_per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for (_, zone, _) in &scenario.nodes {
        *nodes_per_zone.entry((*zone).to_owned()).or_default() += 1;
    }
    let ready: Vec<usize> = (0..scenario.pods.len())
        .filter(|&i| scenario.pods[i].ready)
        .collect();
    if ready.len() < nodes_per_zone.len() {
        return None;
    }
    let total_nodes = scenario.nodes.len() as f64;
    let minimum = |zone: &str| -> usize {
        let desired = ready.len() as f64 * nodes_per_zone[zone] as f64 / total_nodes;
        (desired / (1.0 + OVERLOAD_THRESHOLD)).ceil() as usize
    };
    let mut hints: Vec<String> = scenario.pods.iter().map(|p| zone_of(p.node)).collect();
    let count = |hints: &[String], zone: &str| ready.iter().filter(|&&i| hints[i] == zone).count();
    for zone in nodes_per_zone.keys() {
        while count(&hints, zone) < minimum(zone) {
            // Lend from the zone with the most endpoints above its own minimum.
            let donor = nodes_per_zone
                .keys()
                .filter(|other| *other != zone)
                .max_by_key(|other| count(&hints, other) as isize - minimum(other) as isize)?;
            if count(&hints, donor) <= minimum(donor) {
                return None;
            }
            let lent = ready.iter().copied().find(|&i| hints[i] == *donor)?;
            hints[lent] = zone.clone();
        }
    }
    Some(hints)
}

fn node(spec: &(&str, &str, &str), index: usize) -> Node {
    Node {
        name: spec.0.to_owned(),
        zone: Some(spec.1.to_owned()),
        region: Some(spec.2.to_owned()),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1 + index as u8))],
        leaving: None,
        local_addresses: None,
    }
}

fn endpoint(address: IpAddr, node: &str, zone: &str, ready: bool, hint: Option<&str>) -> Endpoint {
    Endpoint {
        address,
        ready,
        serving: ready,
        terminating: false,
        node_name: Some(Arc::from(node)),
        zone: Some(Arc::from(zone)),
        zone_hints: hint.map(str::to_owned).into_iter().collect::<Hints>(),
        node_hints: Hints::default(),
    }
}

fn slice(
    name: &str,
    owner: &ServiceKey,
    origin: SliceOrigin,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    EndpointSlice {
        name: name.to_owned(),
        service: owner.clone(),
        family: IpFamily::V4,
        origin,
        ports: vec![SlicePort {
            name: "dns".to_owned(),
            protocol: Protocol::Udp,
            port: PORT,
        }],
        endpoints,
    }
}

fn store(scenario: &Scenario, policy: LocalityPolicy) -> Store {
    let mut store = Store::new();
    for (index, spec) in scenario.nodes.iter().enumerate() {
        store.upsert_node(node(spec, index));
    }
    let key = if scenario.clusterset {
        ServiceKey::import("kube-system", "kube-dns")
    } else {
        ServiceKey::new("kube-system", "kube-dns")
    };
    store.upsert_service(Service {
        key: key.clone(),
        service_type: ServiceType::ClusterIP,
        headless: false,
        cluster_ips: vec![IpAddr::V4(VIP)],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        ports: vec![ServicePort {
            name: "dns".to_owned(),
            protocol: Protocol::Udp,
            port: PORT,
            node_port: None,
        }],
        session_affinity_timeout: None,
        internal_traffic_local: false,
        external_traffic_local: false,
        health_check_node_port: None,
        scheduler: None,
        topology_intent: match scenario.hints {
            _ if scenario.clusterset => TopologyIntent::None,
            HintSource::PreferSameZone => TopologyIntent::PreferSameZone,
            HintSource::Auto | HintSource::AutoVanished => TopologyIntent::Auto,
        },
        proxy_name: None,
        locality: Some(policy),
    });
    let zone_of = |name: &str| {
        scenario
            .nodes
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or("", |(_, zone, _)| *zone)
    };
    let hints: Option<Vec<String>> = match scenario.hints {
        HintSource::Auto => controller_hints(scenario),
        HintSource::AutoVanished => None,
        HintSource::PreferSameZone => Some(
            scenario
                .pods
                .iter()
                .map(|p| zone_of(p.node).to_owned())
                .collect(),
        ),
    };
    let local = scenario
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            // The controller hints only Ready endpoints (trafficDistribution: all of them).
            let hint = hints
                .as_ref()
                .filter(|_| pod.ready || scenario.hints == HintSource::PreferSameZone)
                .map(|h| h[i].as_str());
            endpoint(pod_address(i), pod.node, zone_of(pod.node), pod.ready, hint)
        })
        .collect();
    let local_origin = if scenario.clusterset {
        SliceOrigin::Remote(THIS_CLUSTER.to_owned())
    } else {
        SliceOrigin::Local
    };
    if scenario.virtual_copies {
        let copies = (0..scenario.pods.len())
            .map(|i| Endpoint {
                zone: None,
                zone_hints: Hints::default(),
                ..endpoint(pod_address(i), "admiralty-vk", "", true, None)
            })
            .collect();
        store.upsert_slice(slice(
            "kube-dns-admiralty",
            &key,
            local_origin.clone(),
            copies,
        ));
    }
    store.upsert_slice(slice("kube-dns-local", &key, local_origin, local));
    if scenario.remote_pods > 0 {
        let remote = (0..scenario.remote_pods)
            .map(|i| {
                endpoint(
                    remote_address(i),
                    &format!("east-{i}"),
                    "east-a",
                    true,
                    None,
                )
            })
            .collect();
        store.upsert_slice(slice(
            "kube-dns-east",
            &key,
            SliceOrigin::Remote("east".to_owned()),
            remote,
        ));
    }
    store
}

/// Node, zone, region, cluster, other clusters.
const LEVELS: usize = 5;

struct Outcome {
    /// Per client node: its share of connections served at each level.
    rows: Vec<(String, String, [f64; LEVELS])>,
    worst_over_mean: f64,
    /// Client nodes that program nothing although some backend is Ready.
    sending_to_nothing: usize,
}

fn evaluate(scenario: &Scenario, policy: LocalityPolicy) -> Outcome {
    let store = store(scenario, policy);
    let key = VsKey::new(Protocol::Udp, IpAddr::V4(VIP), PORT);
    let where_is = |name: &str| scenario.nodes.iter().find(|(n, _, _)| *n == name).copied();
    let mut load: BTreeMap<IpAddr, f64> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut sending_to_nothing = 0;
    for (index, spec) in scenario.nodes.iter().enumerate() {
        let client = node(spec, index);
        let config = PlanConfig {
            cluster_id: scenario.clusterset.then(|| THIS_CLUSTER.to_owned()),
            ..PlanConfig::default()
        };
        let table = plan(&store, &client, &config);
        let programmed = table
            .get(&key)
            .map(|vs| vs.programmed())
            .unwrap_or_default();
        let total: f64 = programmed.iter().map(|b| f64::from(b.weight)).sum();
        let mut levels = [0.0; LEVELS];
        if programmed.is_empty() || total <= 0.0 {
            sending_to_nothing += 1;
        }
        for backend in &programmed {
            let share = f64::from(backend.weight) / total;
            *load.entry(backend.address).or_default() += share;
            let backend_node = backend.node_name.as_deref().and_then(where_is);
            let level = match backend_node {
                None => 4,
                Some((name, _, _)) if name == spec.0 => 0,
                Some((_, zone, _)) if zone == spec.1 => 1,
                Some((_, _, region)) if region == spec.2 => 2,
                Some(_) => 3,
            };
            levels[level] += share;
        }
        rows.push((spec.0.to_owned(), spec.1.to_owned(), levels));
    }
    let local_ready = scenario.pods.iter().filter(|p| p.ready).count();
    let ready = if local_ready > 0 {
        local_ready
    } else {
        scenario.remote_pods
    };
    let mean = scenario.nodes.len() as f64 / ready.max(1) as f64;
    let worst = load.values().copied().fold(0.0, f64::max);
    Outcome {
        rows,
        worst_over_mean: worst / mean,
        sending_to_nothing: if ready > 0 { sending_to_nothing } else { 0 },
    }
}

const POLICIES: [(&str, LocalityPolicy); 3] = [
    ("kube-proxy", LocalityPolicy::KubeProxy),
    ("topoproxy zone", LocalityPolicy::Zone),
    ("topoproxy node", LocalityPolicy::Node),
];

fn percent(value: f64) -> String {
    if value == 0.0 {
        "–".to_owned()
    } else {
        format!("{:.1} %", value * 100.0)
    }
}

/// Mean over client nodes of the share served in their own node or zone.
fn in_zone(outcome: &Outcome) -> f64 {
    let rows = &outcome.rows;
    rows.iter().map(|(_, _, l)| l[0] + l[1]).sum::<f64>() / rows.len().max(1) as f64
}

fn main() {
    let mut out = String::new();
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "| # | scenario | policy | in node or zone (mean) | worst / mean | nodes sending to nothing |"
    );
    let _ = writeln!(summary, "|---|---|---|---:|---:|---:|");
    for (number, scenario) in scenarios().iter().enumerate() {
        let number = number + 1;
        let _ = writeln!(out, "### {number}. {}\n", scenario.title);
        let _ = writeln!(out, "{}\n", scenario.about);
        let _ = writeln!(
            out,
            "| policy | client node | this node | this zone | this region | this cluster | other clusters |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        for (name, policy) in POLICIES {
            let outcome = evaluate(scenario, policy);
            for (node, zone, levels) in &outcome.rows {
                let cells: Vec<String> = levels.iter().map(|&v| percent(v)).collect();
                let _ = writeln!(out, "| {name} | {node} ({zone}) | {} |", cells.join(" | "));
            }
            let _ = writeln!(
                summary,
                "| {number} | {} | {name} | {:.1} % | {:.2} | {} |",
                scenario.title,
                in_zone(&outcome) * 100.0,
                outcome.worst_over_mean,
                outcome.sending_to_nothing
            );
        }
        let _ = writeln!(out);
    }
    println!("#### Summary\n\n{summary}\n#### Per node\n\n{out}");
}
