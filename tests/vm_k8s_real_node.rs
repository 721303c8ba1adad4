//! topoproxy as operators run it in IPVS mode: the Helm chart's DaemonSet (`--set mode=ipvs`),
//! from the image `cargo xtask image` builds, started by a real kubelet through containerd and
//! runc in the VM guest, which is the node (`k8s_harness::node::RealNode::start_on_machine`),
//! against the control plane `cargo xtask vm-test` runs on the host with the scheduler and the
//! DaemonSet controller. The kubelet reaches the apiserver at 10.0.2.2 (QEMU's user
//! networking); the apiserver reaches the kubelet (`kubectl exec`) on the node's InternalIP, the
//! guest's end of a tap from the host (`eth1`, `TOPOPROXY_VM_NODE`), which vm-test gives the 6.1
//! boot only: on other kernels the test says SKIP.
//!
//! The guest is prepared as the migration guide's prerequisites have an operator prepare a node
//! (the IPVS sysctls), plus `br_netfilter`, as every kube-proxy IPVS node has it: a backend's
//! reply to a client pod on the same bridge must pass IPVS to be translated back. What the test
//! changed in the guest is put back when it ends, so the boot's later targets find the guest as
//! it was. Beside the pod's checks, an outside client (its own namespace in the guest) reaches
//! the NodePort and the externalIP through IPVS, and a `helm upgrade` to a new image tag rolls
//! the DaemonSet while a client pod asks without a failure.
//!
//! Then topology-aware routing in IPVS mode: two real nodes in two zones, each in a network
//! namespace of its own inside the guest (`RealNode::start` on a `NodeNetwork` bridge in the
//! guest), so each has its own IPVS table, `kube-ipvs0` and nftables table, with the chart's
//! DaemonSet on both and a Service, first without `trafficDistribution` (the control: each
//! client is answered by all four pods), then with `PreferClose`, whose EndpointSlice hints the
//! real kube-controller-manager writes: a client pod on each node is answered only
//! by its own zone's pods, each node's `ipvsadm -Ln` (in its agent's pod) holds only its own
//! zone's backends, and once zone a's pods are deleted zone a's client is answered by zone b's.
//! The guest's root namespace routes for the nodes: what they send to the control plane
//! (10.0.2.2) leaves its uplink masqueraded, and the apiserver reaches each kubelet through a
//! host route to the nodes' segment over the tap (`TOPOPROXY_VM_NODE_SEGMENT`, which vm-test
//! routes for the 6.1 boot).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/guest.rs"]
mod guest;
#[path = "support/guest_zones.rs"]
mod guest_zones;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/k8s/ipvs_table.rs"]
mod ipvs_table;
#[path = "support/real_node.rs"]
mod real_node;
#[path = "support/zones.rs"]
mod zones;

use real_node::{
    agent_pod_ready, agent_rss_kib, both_backends_answer, echo_service_and_pods,
    list_in_the_pod_equals_the_plan, rolling_update_loses_no_connection, BACKENDS, NAMESPACE,
};

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use guest::{
    attach_to_the_host_control_plane, guest_pids, nft_tables, IpvsCleanup, LeftoversOnPanic,
    PreparedGuest, HOST,
};
use guest_zones::{
    deploy_zone_workloads, each_zone_then_the_other,
    every_pod_answers_until_the_service_prefers_close, leave_the_control_plane_clean, on_segment,
    start_zone_node, zones_cluster_ip, UplinkMasquerade, ZONES, ZONES_NAMESPACE,
};
use k8s_harness::network::{in_netns, NodeNetwork};
use k8s_harness::node::{NodeOptions, RealNode};
use k8s_harness::objects::eventually;
use k8s_harness::workloads::{helm, install_chart_ipvs, kubectl};
use k8s_harness::ControlPlane;
use serde_json::json;

const TEST: &str = "the_chart_in_ipvs_mode_runs_under_a_real_kubelet_in_the_guest";
const NODE: &str = "vm-node";
const NODE_PORT: u16 = 30080;
/// The Service's externalIP, which the outside client routes to the node.
const EXTERNAL_IP: &str = "192.168.241.10";
/// The outside client's namespace, its link's node end, and the segment between them.
const OUTSIDE_NETNS: &str = "tpvm-outside";
const OUTSIDE_LINK: &str = "tpvm-out0";
const OUTSIDE_PEER: &str = "tpvm-out1";
const OUTSIDE_NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 244, 1);
const OUTSIDE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 244, 2);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl exec ds/topoproxy -- ipvsadm -Ln` (the image's ipvsadm, through the apiserver and
/// the kubelet) lists the ClusterIP's virtual servers with both backends, and the VIP is on
/// `kube-ipvs0` in the guest (the agent's pod is `hostNetwork`).
async fn the_table_is_in_ipvsadm_and_the_vip_on_kube_ipvs0(
    plane: &ControlPlane,
    cluster_ip: &str,
    backend_ips: &[String],
) {
    let listing = kubectl(
        plane,
        &[
            "-n",
            "kube-system",
            "exec",
            "ds/topoproxy",
            "--",
            "ipvsadm",
            "-Ln",
        ],
    )
    .unwrap_or_else(|e| panic!("ipvsadm -Ln in the agent's pod: {e}"));
    println!("kubectl exec ds/topoproxy -- ipvsadm -Ln:\n{listing}");
    for protocol in ["TCP", "UDP"] {
        let virtual_server = format!("{protocol}  {cluster_ip}:80 rr");
        let block: Vec<&str> = listing
            .lines()
            .skip_while(|line| !line.starts_with(&virtual_server))
            .skip(1)
            .take_while(|line| line.trim_start().starts_with("->"))
            .collect();
        for ip in backend_ips {
            assert!(
                block
                    .iter()
                    .any(|line| line.contains(&format!("{ip}:8080"))),
                "ipvsadm -Ln has no {virtual_server} with backend {ip}:8080:\n{listing}"
            );
        }
    }
    let out = Command::new("ip")
        .args(["-4", "addr", "show", "dev", "kube-ipvs0"])
        .output()
        .expect("running ip");
    let addresses = String::from_utf8_lossy(&out.stdout);
    assert!(
        addresses.contains(&format!("inet {cluster_ip}/32")),
        "{cluster_ip} is not on kube-ipvs0: {addresses}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The echo Service: TCP and UDP on port 80 to the backends' 8080, on NodePort
/// [`NODE_PORT`] and externalIP [`EXTERNAL_IP`].
fn echo_service() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": NAMESPACE},
        "spec": {
            "type": "NodePort",
            "selector": {"app": "echo"},
            "externalIPs": [EXTERNAL_IP],
            "ports": [
                {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP",
                 "nodePort": NODE_PORT},
                {"name": "udp", "port": 80, "targetPort": 8080, "protocol": "UDP",
                 "nodePort": NODE_PORT},
            ],
        },
    })
}

/// A client outside the node: a network namespace of its own in the guest, behind a veth
/// from the guest's root namespace (the node), which is its default route. Removed on drop.
struct OutsideClient;

impl OutsideClient {
    fn add() -> Self {
        Self::remove();
        let (outside, node_end) = (OUTSIDE_NETNS, OUTSIDE_LINK);
        let peer = OUTSIDE_PEER;
        let node_address = format!("{OUTSIDE_NODE_ADDRESS}/24");
        let client_address = format!("{OUTSIDE_ADDRESS}/24");
        let gateway = OUTSIDE_NODE_ADDRESS.to_string();
        let commands: [&[&str]; 8] = [
            &["netns", "add", outside],
            &[
                "link", "add", node_end, "type", "veth", "peer", "name", peer,
            ],
            &["link", "set", peer, "netns", outside],
            &["addr", "add", &node_address, "dev", node_end],
            &["link", "set", node_end, "up"],
            &["-n", outside, "addr", "add", &client_address, "dev", peer],
            &["-n", outside, "link", "set", peer, "up"],
            &["-n", outside, "route", "add", "default", "via", &gateway],
        ];
        let added = Self;
        for args in commands {
            if let Err(error) = k8s_harness::stdout_of(Command::new("ip").args(args), "ip") {
                panic!("{error}");
            }
        }
        added
    }

    fn remove() {
        let _ = Command::new("ip")
            .args(["netns", "del", OUTSIDE_NETNS])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", OUTSIDE_LINK])
            .output();
    }

    /// One TCP ask of `address` from the outside namespace: the pod that answered.
    fn ask(&self, address: SocketAddr) -> Option<String> {
        let netns = Path::new("/run/netns").join(OUTSIDE_NETNS);
        in_netns(&netns, || {
            let timeout = Duration::from_secs(3);
            let stream = TcpStream::connect_timeout(&address, timeout).ok()?;
            stream.set_read_timeout(Some(timeout)).ok()?;
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).ok()?;
            line.split_whitespace().next().map(str::to_owned)
        })
    }
}

impl Drop for OutsideClient {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// The outside client reaches the NodePort at the node's InternalIP and the externalIP
/// (routed to the node), through IPVS, and both backends answer each.
async fn outside_client_reaches_the_node_port_and_the_external_ip(node_address: Ipv4Addr) {
    let outside = OutsideClient::add();
    let external: Ipv4Addr = EXTERNAL_IP.parse().expect("the externalIP");
    let expected: BTreeSet<String> = BACKENDS.iter().map(|s| (*s).to_owned()).collect();
    for address in [
        SocketAddr::from((node_address, NODE_PORT)),
        SocketAddr::from((external, 80)),
    ] {
        let outside = &outside;
        let seen = eventually(
            &format!("both backends answering {address} from outside the node"),
            Duration::from_secs(60),
            || async move {
                let seen: BTreeSet<String> = (0..8).filter_map(|_| outside.ask(address)).collect();
                (seen.len() == BACKENDS.len()).then_some(seen)
            },
        )
        .await;
        assert_eq!(seen, expected, "{address} from outside");
        println!("outside the node: {address} answered by {seen:?}");
    }
}

/// Once `helm uninstall` has stopped the agent, the node still holds what it programmed, as
/// kube-proxy's pod leaves its IPVS table when it stops; `topoproxy cleanup --proxy-mode ipvs`
/// on the node, as the README has operators run it, removes all of it: none of the Service's
/// virtual servers (ClusterIP, NodePort, externalIP) in `ipvsadm -Ln`, no `kube-ipvs0`, no
/// nftables table of ours.
async fn cleanup_on_the_node_leaves_nothing(cluster_ip: &str) {
    eventually(
        "the agent's process gone after helm uninstall",
        Duration::from_secs(120),
        || async { agent_rss_kib(guest_pids()).is_none().then_some(()) },
    )
    .await;
    let left = cluster::ipvsadm(&["-Ln"]);
    assert!(
        left.contains(&format!("{cluster_ip}:80")),
        "the ClusterIP's virtual server did not outlive the agent's pod:\n{left}"
    );
    let mut cleanup = Command::new(env!("CARGO_BIN_EXE_topoproxy"));
    cleanup.args(["cleanup", "--proxy-mode", "ipvs"]);
    if let Err(error) = k8s_harness::stdout_of(&mut cleanup, "topoproxy") {
        panic!("{error}");
    }
    let after = cluster::ipvsadm(&["-Ln"]);
    for service in [
        format!("{cluster_ip}:80"),
        format!("{EXTERNAL_IP}:80"),
        format!(":{NODE_PORT}"),
    ] {
        assert!(
            !after.contains(&service),
            "{service} is still in ipvsadm -Ln after topoproxy cleanup:\n{after}"
        );
    }
    let link = Command::new("ip")
        .args(["link", "show", "kube-ipvs0"])
        .output()
        .expect("running ip");
    assert!(
        !link.status.success(),
        "kube-ipvs0 is still there after topoproxy cleanup: {}",
        String::from_utf8_lossy(&link.stdout)
    );
    let tables = nft_tables();
    assert!(
        !tables.contains("table inet topoproxy"),
        "our nftables table is still there after topoproxy cleanup: {tables:?}"
    );
    println!("topoproxy cleanup on the node: nothing of the agent's left");
}

#[tokio::test]
#[ignore = "needs the VM, a tap into it and a control plane on the host: cargo xtask vm-test --kernel 6.1"]
async fn the_chart_in_ipvs_mode_runs_under_a_real_kubelet_in_the_guest() {
    let Some(node_address) = std::env::var("TOPOPROXY_VM_NODE").ok() else {
        harness::skip(
            TEST,
            "no link from the host into this guest (TOPOPROXY_VM_NODE): vm-test gives one to the 6.1 boot only",
        );
        return;
    };
    let Some(agent_image) = harness::agent_image(TEST) else {
        return;
    };
    let _cleanup = IpvsCleanup;
    let _guest = PreparedGuest::prepare();
    let plane = attach_to_the_host_control_plane();
    let _leftovers = LeftoversOnPanic {
        plane: &plane,
        namespace: NAMESPACE,
        nodes: &[NODE],
    };
    let client = plane.admin_client().await;
    let started = std::time::Instant::now();
    let node_address: Ipv4Addr = node_address
        .parse()
        .expect("TOPOPROXY_VM_NODE: an IPv4 address");
    let node = RealNode::start_on_machine(
        &plane,
        NodeOptions {
            name: NODE.into(),
            zone: Some("zone-a".into()),
            address: node_address,
            pod_cidr: "10.244.1.0/24".into(),
            tag: 0,
        },
        &k8s_harness::test_images_dir(),
    )
    .await;
    println!(
        "containerd and the kubelet in the guest: Node Ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    node.import_image(&agent_image);
    node.import_image(&k8s_harness::test_images_dir().join("echo.tar"));

    let installed = std::time::Instant::now();
    let chart = workspace().join("charts/topoproxy");
    install_chart_ipvs(&plane, &chart, HOST);
    agent_pod_ready(&plane, &client, installed).await;

    let (cluster_ip, backend_ips) =
        echo_service_and_pods(&plane, &client, NODE, echo_service()).await;
    let address = format!("{cluster_ip}:80");
    both_backends_answer(&plane, &address).await;
    the_table_is_in_ipvsadm_and_the_vip_on_kube_ipvs0(&plane, &cluster_ip, &backend_ips).await;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], 10249).into();
    list_in_the_pod_equals_the_plan(&plane, || cluster::http_get(metrics, "/plan"), &address).await;
    outside_client_reaches_the_node_port_and_the_external_ip(node_address).await;
    // Rounds as long as a `kubectl exec` into the guest takes several times over.
    let round = Duration::from_secs(16);
    let chart = chart.to_string_lossy();
    rolling_update_loses_no_connection(&plane, &client, &node, &chart, &address, round).await;
    match agent_rss_kib(guest_pids()) {
        Some(kib) => println!(
            "the agent's VmRSS in its pod: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => panic!("no `topoproxy run` process in the guest"),
    }

    helm(
        &plane,
        &["uninstall", "topoproxy", "-n", "kube-system", "--wait"],
    );
    cleanup_on_the_node_leaves_nothing(&cluster_ip).await;
    println!(
        "the whole test, node start to topoproxy cleanup: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    kubectl(&plane, &["delete", "namespace", NAMESPACE, "--wait=false"])
        .expect("deleting the namespace");
    // The control plane outlives the test: a Node without its kubelet would stay Ready there
    // (no node lifecycle controller) and get the next test's DaemonSet pod.
    kubectl(&plane, &["delete", "node", NODE]).expect("deleting the Node");
}

const ZONES_TEST: &str =
    "each_zone_in_ipvs_mode_is_answered_by_its_own_pods_then_by_the_other_zone";
#[tokio::test]
#[ignore = "needs the VM, a route into it and a control plane on the host: cargo xtask vm-test --kernel 6.1"]
async fn each_zone_in_ipvs_mode_is_answered_by_its_own_pods_then_by_the_other_zone() {
    let Some(segment) = std::env::var("TOPOPROXY_VM_NODE_SEGMENT").ok() else {
        harness::skip(
            ZONES_TEST,
            "no route from the host to a node segment in this guest (TOPOPROXY_VM_NODE_SEGMENT): vm-test gives one to the 6.1 boot only",
        );
        return;
    };
    let Some(agent_image) = harness::agent_image(ZONES_TEST) else {
        return;
    };
    let started = Instant::now();
    let _guest = PreparedGuest::prepare();
    let _uplink = UplinkMasquerade::add(&segment);
    // Before the nodes, dropped after them.
    let network = NodeNetwork::create_routed(on_segment(&segment, 254));
    let plane = attach_to_the_host_control_plane();
    let zone_nodes = ZONES.map(|zone| zone.node);
    let _leftovers = LeftoversOnPanic {
        plane: &plane,
        namespace: ZONES_NAMESPACE,
        nodes: &zone_nodes,
    };
    let client = plane.admin_client().await;
    // Two locals, not a Vec: nodes are dropped in the reverse order of their start. What the
    // agents program lives in the nodes' namespaces and goes with them.
    let node_a = start_zone_node(&plane, &network, (&ZONES[0], 1), &segment, &agent_image).await;
    let node_b = start_zone_node(&plane, &network, (&ZONES[1], 2), &segment, &agent_image).await;
    node_a.route_pods_to(&node_b);
    node_b.route_pods_to(&node_a);
    println!(
        "two nodes in their namespaces in the guest, Ready: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    install_chart_ipvs(&plane, &workspace().join("charts/topoproxy"), HOST);
    deploy_zone_workloads(&plane, &client).await;
    println!(
        "both agents and every pod Ready: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let cluster_ip = zones_cluster_ip(&client).await;
    every_pod_answers_until_the_service_prefers_close(&plane, &client, &cluster_ip).await;
    each_zone_then_the_other(&plane, &client, [&node_a, &node_b], &cluster_ip).await;
    println!(
        "every check passed: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    leave_the_control_plane_clean(&plane, &client).await;
    println!("the whole test: {:.1} s", started.elapsed().as_secs_f64());
}
