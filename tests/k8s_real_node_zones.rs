//! Topology-aware routing with real pods: two real nodes (`k8s_harness::node`) in two zones,
//! each in a network namespace of its own on one segment, pods routed between them, the Helm
//! chart's DaemonSet (eBPF mode, the image `cargo xtask image` builds) on both, and a Service
//! with `trafficDistribution: PreferClose` whose EndpointSlice hints the real
//! kube-controller-manager writes. A client pod on each node is answered only by its own
//! zone's pods; once its zone's pods are deleted, by the other zone's.
//!
//! The same cluster then has DNS as a seed deploys it: CoreDNS (the image `cargo xtask
//! k8s-setup` builds from its Go module) as `kube-system/kube-dns`, one replica per zone, the
//! Service with `trafficDistribution: PreferClose` ([`k8s_harness::kube_dns`]). Each client pod
//! asks the kube-dns ClusterIP, over UDP and TCP, for the echo Service's A record (its
//! ClusterIP) and for `CH TXT hostname.bind` (the answering CoreDNS pod's name): only its own
//! zone's CoreDNS answers, as the CoreDNS pods' query logs also show. Once zone a is cordoned
//! and its CoreDNS pod deleted (the replacement cannot be scheduled: zone b has its replica),
//! zone a's client is answered by zone b's CoreDNS.
//!
//! Two eBPF agents on one host must not share pins or cgroup attachments: each node's agent
//! pins under `/sys/fs/bpf/topoproxy-<node>` and attaches to its node's cgroup (the kubelet's
//! `cgroupRoot`), arguments a Helm post-renderer adds per node through `$(NODE_NAME)` (test
//! plumbing: on a real cluster each node is a host of its own and the defaults apply).
//!
//! Needs root, BPF and cgroup v2, `cargo xtask k8s-setup` (kubelet, containerd, the test
//! images) and the image archive in `TOPOPROXY_AGENT_IMAGE` (`cargo xtask test` builds it and
//! sets it); without the archive the test says SKIP.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/zones.rs"]
mod zones;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_harness::kube_dns::{kube_dns_objects, KUBE_DNS_IP, KUBE_DNS_SELECTOR};
use k8s_harness::network::NodeNetwork;
use k8s_harness::node::{unified_cgroup_of, NodeOptions, RealNode};
use k8s_harness::objects::apply;
use k8s_harness::workloads::{
    ask_repeatedly, daemonset_args, echo_pod, install_chart, kubectl, wait_pods_ready,
    AgentCleanup, Answers,
};
use k8s_harness::{ControlPlane, Options};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;
use zones::{answered_only_by, hints_name_each_endpoints_own_zone, names, Asks};

const NAMESPACE: &str = "shop";
/// A client pod's asks: a second of them, one every 50 ms.
const ASKS: Asks = Asks {
    namespace: NAMESPACE,
    round: ("1s", "50ms"),
    limit: Duration::from_secs(90),
};
/// Each node's agent pins here, `$(NODE_NAME)` expanded by the kubelet.
const PIN_DIR_PREFIX: &str = "/sys/fs/bpf/topoproxy-";

/// A node of the test: its name, zone, address, pod subnet, echo pods and client pod.
struct Zone {
    node: &'static str,
    zone: &'static str,
    address: &'static str,
    pod_cidr: &'static str,
    backends: [&'static str; 2],
    client: &'static str,
}

const ZONES: [Zone; 2] = [
    Zone {
        node: "node-a",
        zone: "zone-a",
        address: "192.168.240.1",
        pod_cidr: "10.244.1.0/24",
        backends: ["echo-a1", "echo-a2"],
        client: "client-a",
    },
    Zone {
        node: "node-b",
        zone: "zone-b",
        address: "192.168.240.2",
        pod_cidr: "10.244.2.0/24",
        backends: ["echo-b1", "echo-b2"],
        client: "client-b",
    },
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pin_dir(node: &str) -> PathBuf {
    PathBuf::from(format!("{PIN_DIR_PREFIX}{node}"))
}

/// A second of DNS asks (`question`) from pod `client` to the kube-dns ClusterIP, one every
/// 50 ms.
fn ask_dns_for_a_second(
    plane: &ControlPlane,
    client: &str,
    question: &[&str],
    udp: bool,
) -> Result<Answers, String> {
    let server = format!("{KUBE_DNS_IP}:53");
    let mut extra = question.to_vec();
    if udp {
        extra.push("-udp");
    }
    ask_repeatedly(plane, NAMESPACE, client, &server, ("1s", "50ms"), &extra)
}

/// `CH TXT hostname.bind`: CoreDNS's chaos plugin answers with its pod's name.
const WHO_ANSWERS: [&str; 6] = ["-dns", "hostname.bind", "-class", "CH", "-type", "TXT"];

/// Waits until a second of asks from `client` to the kube-dns ClusterIP, over UDP and over
/// TCP, is answered only by CoreDNS pod `server` for `hostname.bind` and only with `echo_ip`
/// for `name` (the echo Service's A record), none failing.
async fn dns_answered_only_by(
    plane: &ControlPlane,
    client: &str,
    server: &str,
    name: &str,
    echo_ip: &str,
) {
    let a_record = ["-dns", name, "-type", "A"];
    let checks: [(&[&str], &str); 2] = [(&WHO_ANSWERS, server), (&a_record, echo_ip)];
    let started = Instant::now();
    let limit = Duration::from_secs(90);
    'ask: loop {
        let mut last = None;
        for udp in [true, false] {
            for (question, expected) in checks {
                let expected = names(&[expected]);
                match ask_dns_for_a_second(plane, client, question, udp) {
                    Ok(a) if a.seen == expected && a.failed == 0 => {}
                    Ok(a) => {
                        last = Some(format!(
                            "{question:?} udp={udp}: answers {:?}, {} failed",
                            a.seen, a.failed
                        ))
                    }
                    Err(e) => last = Some(e),
                }
            }
        }
        let Some(last) = last else { break 'ask };
        assert!(
            started.elapsed() < limit,
            "{client} asking kube-dns was not answered by {server} alone (with {name} = \
             {echo_ip}) within {limit:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{client}: kube-dns answered by {server} only, {name} = {echo_ip}, after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The Ready CoreDNS pods by node name.
async fn kube_dns_pods(client: &Client) -> BTreeMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let list = pods
        .list(&ListParams::default().labels(KUBE_DNS_SELECTOR))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    list.iter()
        .filter(|pod| k8s_harness::workloads::pod_ready(pod))
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            Some((node, pod.metadata.name.clone()?))
        })
        .collect()
}

/// The CoreDNS pod `server`'s query log (the `log` plugin) names `own_client` and not
/// `other_client` as a source: every query of a zone's client reached its zone's CoreDNS.
fn query_log_shows_only(
    plane: &ControlPlane,
    server: &str,
    own_client: (&str, &str),
    other_client: (&str, &str),
) {
    let log = kubectl(plane, &["-n", "kube-system", "logs", server]).expect("CoreDNS's log");
    let queried = |ip: &str| {
        log.lines()
            .any(|line| line.contains(&format!("] {ip}:")) && line.contains("hostname.bind"))
    };
    assert!(
        queried(own_client.1),
        "{server}'s log shows no query from {} ({})\n{log}",
        own_client.0,
        own_client.1
    );
    assert!(
        !queried(other_client.1),
        "{server}'s log shows queries from {} ({}) of the other zone\n{log}",
        other_client.0,
        other_client.1
    );
}

/// A pod's IP in the test's namespace.
async fn pod_ip(client: &Client, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    pods.get(name)
        .await
        .ok()
        .and_then(|pod| pod.status?.pod_ip)
        .unwrap_or_else(|| panic!("pod {name} has no IP"))
}

/// kube-dns with a CoreDNS pod in each zone: each zone's client is answered by its own zone's
/// CoreDNS; once zone a is cordoned and its CoreDNS pod deleted, by zone b's.
async fn each_zone_asks_its_own_coredns(plane: &ControlPlane, client: &Client, echo_ip: &str) {
    hints_name_each_endpoints_own_zone(client, "kube-system", "kube-dns", ZONES.len()).await;
    let servers = kube_dns_pods(client).await;
    let server_of = |zone: &Zone| {
        servers
            .get(zone.node)
            .cloned()
            .unwrap_or_else(|| panic!("no Ready CoreDNS pod on {}: {servers:?}", zone.node))
    };
    let name = format!("echo.{NAMESPACE}.svc.cluster.local");
    for zone in &ZONES {
        dns_answered_only_by(plane, zone.client, &server_of(zone), &name, echo_ip).await;
    }
    let [a, b] = &ZONES;
    let (ip_a, ip_b) = (
        pod_ip(client, a.client).await,
        pod_ip(client, b.client).await,
    );
    query_log_shows_only(plane, &server_of(a), (a.client, &ip_a), (b.client, &ip_b));
    query_log_shows_only(plane, &server_of(b), (b.client, &ip_b), (a.client, &ip_a));

    // Zone a loses its CoreDNS; cordoned, it gets no replacement (the anti-affinity keeps it
    // out of zone b, which has its replica).
    kubectl(plane, &["cordon", a.node]).expect("cordoning node a");
    let server_a = server_of(a);
    kubectl(
        plane,
        &[
            "-n",
            "kube-system",
            "delete",
            "pod",
            "--wait=false",
            &server_a,
        ],
    )
    .expect("deleting zone a's CoreDNS pod");
    hints_name_each_endpoints_own_zone(client, "kube-system", "kube-dns", 1).await;
    dns_answered_only_by(plane, a.client, &server_of(b), &name, echo_ip).await;
    dns_answered_only_by(plane, b.client, &server_of(b), &name, echo_ip).await;
    let after = kube_dns_pods(client).await;
    assert!(
        !after.contains_key(a.node),
        "a CoreDNS pod became Ready on cordoned {}: {after:?}",
        a.node
    );
}

/// Starts `zone`'s node and imports the agent's and the echo image into it.
async fn start_node(
    plane: &ControlPlane,
    network: &NodeNetwork,
    zone: &Zone,
    tag: u8,
    agent_image: &Path,
) -> RealNode {
    let node = RealNode::start(
        plane,
        network,
        NodeOptions {
            name: zone.node.into(),
            zone: Some(zone.zone.into()),
            address: zone.address.parse().expect("an address"),
            pod_cidr: zone.pod_cidr.into(),
            tag,
        },
        &k8s_harness::test_images_dir(),
    )
    .await;
    node.import_image(agent_image);
    node.import_image(&k8s_harness::test_images_dir().join("echo.tar"));
    node.import_image(&k8s_harness::test_images_dir().join("coredns.tar"));
    node
}

/// Installs the chart with each node's pin folder and cgroup (the post-renderer's arguments),
/// and checks the DaemonSet holds them.
async fn install_agents(plane: &ControlPlane, client: &Client, network: &NodeNetwork, link: &str) {
    let per_node_args = vec![
        format!("--bpf-pin-dir={PIN_DIR_PREFIX}$(NODE_NAME)"),
        format!(
            "--cgroup-path={}",
            unified_cgroup_of("$(NODE_NAME)").display()
        ),
    ];
    install_chart(
        plane,
        &workspace().join("charts/topoproxy"),
        network.host_address(),
        link,
        &[],
        &per_node_args,
    );
    let args = daemonset_args(client, "kube-system", "topoproxy").await;
    assert!(
        per_node_args.iter().all(|arg| args.contains(arg)),
        "the post-renderer did not add {per_node_args:?} to the agent's arguments: {args:?}"
    );
}

/// The echo pods, the client pods and the echo Service in the test's namespace, and kube-dns;
/// waits until the agents and all of them are Ready.
async fn deploy_workloads(plane: &ControlPlane, client: &Client, nodes: [&RealNode; 2]) {
    kubectl(plane, &["create", "namespace", NAMESPACE]).expect("creating the namespace");
    for (zone, node) in ZONES.iter().zip(nodes) {
        for backend in zone.backends {
            apply(client, echo_pod(NAMESPACE, backend, node.name(), "echo")).await;
        }
        apply(
            client,
            echo_pod(NAMESPACE, zone.client, node.name(), "client"),
        )
        .await;
    }
    apply(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": NAMESPACE},
            "spec": {
                "selector": {"app": "echo"},
                "trafficDistribution": "PreferClose",
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }),
    )
    .await;
    for object in kube_dns_objects() {
        apply(client, object).await;
    }
    wait_pods_ready(
        client,
        plane,
        "kube-system",
        "app.kubernetes.io/name=topoproxy",
        ZONES.len(),
    )
    .await;
    wait_pods_ready(client, plane, "kube-system", KUBE_DNS_SELECTOR, ZONES.len()).await;
    wait_pods_ready(client, plane, NAMESPACE, "app=echo", 4).await;
    wait_pods_ready(client, plane, NAMESPACE, "app=client", 2).await;
}

#[tokio::test]
async fn each_zone_is_answered_by_its_own_pods_then_by_the_other_zone() {
    const TEST: &str = "each_zone_is_answered_by_its_own_pods_then_by_the_other_zone";
    let Some(agent_image) = harness::agent_image(TEST) else {
        return;
    };
    let started = Instant::now();
    let pin_dirs: Vec<PathBuf> = ZONES.iter().map(|z| pin_dir(z.node)).collect();
    let pin_dir_refs: Vec<&Path> = pin_dirs.iter().map(PathBuf::as_path).collect();
    let _cleanup = AgentCleanup::new(Path::new(env!("CARGO_BIN_EXE_topoproxy")), &pin_dir_refs);
    // Before the control plane, which listens on the host's address on it; dropped last.
    let network = NodeNetwork::create();
    let plane = ControlPlane::start(Options {
        real_nodes: true,
        address: network.host_address(),
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    // Two locals, not a Vec: nodes are dropped in the reverse order of their start.
    let node_a = start_node(&plane, &network, &ZONES[0], 0, &agent_image).await;
    let node_b = start_node(&plane, &network, &ZONES[1], 1, &agent_image).await;
    node_a.route_pods_to(&node_b);
    node_b.route_pods_to(&node_a);
    // CoreDNS's pods reach the API server through the `kubernetes` Service: the control
    // plane's host must route their answers back.
    for node in [&node_a, &node_b] {
        network.route_pods(node.pod_cidr(), node.address());
    }
    let nodes = [&node_a, &node_b];
    println!(
        "control plane and two nodes up: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    install_agents(&plane, &client, &network, nodes[0].link()).await;
    deploy_workloads(&plane, &client, nodes).await;
    println!(
        "both agents and every pod Ready: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    hints_name_each_endpoints_own_zone(&client, NAMESPACE, "echo", 4).await;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let cluster_ip = services
        .get("echo")
        .await
        .ok()
        .and_then(|s| s.spec?.cluster_ip)
        .expect("the Service's ClusterIP");
    let address = format!("{cluster_ip}:80");

    for zone in &ZONES {
        answered_only_by(&plane, &ASKS, zone.client, &address, &zone.backends).await;
    }

    // Zone a loses its pods: its client falls back to zone b (across the nodes), zone b's
    // client keeps its own.
    let [a, b] = &ZONES;
    let mut delete = vec!["-n", NAMESPACE, "delete", "pod", "--wait=false"];
    delete.extend(a.backends);
    kubectl(&plane, &delete).expect("deleting zone a's echo pods");
    hints_name_each_endpoints_own_zone(&client, NAMESPACE, "echo", 2).await;
    answered_only_by(&plane, &ASKS, a.client, &address, &b.backends).await;
    answered_only_by(&plane, &ASKS, b.client, &address, &b.backends).await;

    each_zone_asks_its_own_coredns(&plane, &client, &cluster_ip).await;
    println!("the whole test: {:.1} s", started.elapsed().as_secs_f64());
}
