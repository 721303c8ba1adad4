//! topoproxy as operators run it: the Helm chart's DaemonSet, from the image `cargo xtask image`
//! builds, started by a real kubelet through containerd and runc on a real node
//! (`k8s_harness::node`), against the harness's control plane with kube-scheduler and the
//! DaemonSet controller. eBPF mode, on the host's kernel. The node (containerd, the kubelet,
//! the agent's hostNetwork pod) has a network namespace of its own, on a segment with the
//! host, where the control plane listens, and an outside client (`k8s_harness::network`).
//!
//! Needs root, BPF and cgroup v2, `cargo xtask k8s-setup` (kubelet, containerd, the test
//! images) and the image archive in `TOPOPROXY_AGENT_IMAGE` (`cargo xtask test` builds it and
//! sets it); without the archive the test says SKIP.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/real_node.rs"]
mod real_node;

use real_node::{
    agent_pod_ready, agent_rss_kib, both_backends_answer, echo_service_and_pods,
    list_in_the_pod_equals_the_plan, rolling_update_loses_no_connection, BACKENDS, IMAGE,
    NAMESPACE,
};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_harness::network::{in_netns, NodeNetwork};
use k8s_harness::node::{NodeOptions, RealNode};
use k8s_harness::objects::eventually;
use k8s_harness::workloads::{helm, install_chart, AgentCleanup};
use k8s_harness::{ControlPlane, Options};
use serde_json::json;

/// Where the chart's agent pins its maps and links (its default `bpf-pin-dir`).
const PIN_DIR: &str = "/sys/fs/bpf/topoproxy";
const NODE_PORT: u16 = 30080;
/// The Service's externalIP, routed to the node by the outside client's namespace.
const EXTERNAL_IP: &str = "192.168.241.10";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every process of the node: the pids in its cgroup and every cgroup below it.
fn node_pids(node: &RealNode) -> Vec<u32> {
    fn pids_below(cgroup: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(cgroup) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pids_below(&entry.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    pids_below(&node.unified_cgroup(), &mut pids);
    pids
}

/// One TCP ask from the outside client's namespace (bash's `/dev/tcp`): the pod that answered.
fn ask_from_outside(network: &NodeNetwork, address: &str, port: u16) -> Option<String> {
    let script = format!("exec 3<>/dev/tcp/{address}/{port} && head -n 1 <&3");
    let out = Command::new("timeout")
        .args([
            "3",
            "ip",
            "netns",
            "exec",
            network.outside_netns(),
            "bash",
            "-c",
            &script,
        ])
        .output()
        .ok()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    answer.split_whitespace().next().map(str::to_owned)
}

/// A client outside the node (its own namespace, on the node's segment) reaches the NodePort
/// at the node's InternalIP and the externalIP, routed to the node, through the tc programs,
/// and every backend answers.
async fn outside_client_reaches_the_node_port_and_the_external_ip(
    network: &NodeNetwork,
    node: &RealNode,
) {
    let outside = network.outside_netns();
    let via = node.address().to_string();
    let route = Command::new("ip")
        .args([
            "-n",
            outside,
            "route",
            "add",
            &format!("{EXTERNAL_IP}/32"),
            "via",
            &via,
        ])
        .output()
        .expect("running ip route");
    assert!(
        route.status.success(),
        "{}",
        String::from_utf8_lossy(&route.stderr)
    );
    for (address, port) in [(via.clone(), NODE_PORT), (EXTERNAL_IP.to_owned(), 80)] {
        let seen: BTreeSet<String> = eventually(
            &format!("both backends answering {address}:{port} from outside the node"),
            Duration::from_secs(60),
            || {
                let address = address.clone();
                async move {
                    let seen: BTreeSet<String> = (0..12)
                        .filter_map(|_| ask_from_outside(network, &address, port))
                        .collect();
                    (seen.len() == BACKENDS.len()).then_some(seen)
                }
            },
        )
        .await;
        let expected: BTreeSet<String> = BACKENDS.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(seen, expected, "{address}:{port} from outside");
    }
}

/// The agent's container as the container runtime holds it.
#[derive(Debug)]
struct RuntimeContainer {
    id: String,
    image: String,
}

/// The one running `topoproxy` container on the node, by `crictl ps` (the CRI's view, not the
/// API's): exactly one must run, wherever the rollout is.
fn running_agent_container(plane: &ControlPlane, node: &RealNode) -> RuntimeContainer {
    let listing = node
        .crictl(
            &plane.binaries().crictl,
            &[
                "ps",
                "--name",
                "^topoproxy$",
                "--state",
                "running",
                "-o",
                "json",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed: serde_json::Value = serde_json::from_str(&listing)
        .unwrap_or_else(|e| panic!("crictl ps -o json: {e}: {listing}"));
    let containers = parsed["containers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        containers.len(),
        1,
        "crictl ps shows {} running topoproxy containers: {listing}",
        containers.len()
    );
    let container = &containers[0];
    let id = container["id"].as_str().unwrap_or_default().to_owned();
    // `ps` names the image by its id; `inspect` says which reference the kubelet asked for.
    let inspected = node
        .crictl(&plane.binaries().crictl, &["inspect", "-o", "json", &id])
        .unwrap_or_else(|e| panic!("{e}"));
    let inspected: serde_json::Value = serde_json::from_str(&inspected)
        .unwrap_or_else(|e| panic!("crictl inspect -o json: {e}: {inspected}"));
    let image = inspected["status"]["image"]["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    RuntimeContainer { id, image }
}

#[tokio::test]
async fn the_chart_runs_the_agent_under_a_real_kubelet_and_pods_reach_a_cluster_ip() {
    const TEST: &str = "the_chart_runs_the_agent_under_a_real_kubelet_and_pods_reach_a_cluster_ip";
    let Some(agent_image) = harness::agent_image(TEST) else {
        return;
    };
    let _cleanup = AgentCleanup::new(
        Path::new(env!("CARGO_BIN_EXE_topoproxy")),
        &[Path::new(PIN_DIR)],
    );
    // Before the control plane, which listens on the host's address on it; dropped last.
    let network = NodeNetwork::create();
    let plane = ControlPlane::start(Options {
        real_nodes: true,
        address: network.host_address(),
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    let node = RealNode::start(
        &plane,
        &network,
        NodeOptions {
            name: "node-a".into(),
            zone: Some("zone-a".into()),
            address: "192.168.240.1".parse().expect("an address"),
            pod_cidr: "10.244.1.0/24".into(),
            tag: 0,
        },
        &k8s_harness::test_images_dir(),
    )
    .await;
    node.import_image(&agent_image);
    node.import_image(&k8s_harness::test_images_dir().join("echo.tar"));

    // The node's cgroup is its root (every process of the node is below it). The default, the
    // host's cgroup v2 root, would hand the socket hooks every process of the machine running
    // the test, the outside client's included, which then never reaches the tc programs.
    let cgroup_value = format!("config.cgroup-path={}", node.unified_cgroup().display());
    let chart = workspace().join("charts/topoproxy");
    let installed = std::time::Instant::now();
    install_chart(
        &plane,
        &chart,
        network.host_address(),
        node.link(),
        &[cgroup_value],
        &[],
    );
    agent_pod_ready(&plane, &client, installed).await;
    let first = running_agent_container(&plane, &node);
    assert_eq!(
        first.image, IMAGE,
        "crictl shows the agent's container from another image"
    );

    let service = json!({
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
    });
    let (cluster_ip, _) = echo_service_and_pods(&plane, &client, node.name(), service).await;
    let address = format!("{cluster_ip}:80");
    both_backends_answer(&plane, &address).await;

    outside_client_reaches_the_node_port_and_the_external_ip(&network, &node).await;

    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], 10249).into();
    let read_plan = || in_netns(&node.netns_path(), || cluster::http_get(metrics, "/plan"));
    list_in_the_pod_equals_the_plan(&plane, read_plan, &address).await;

    let chart = chart.to_string_lossy();
    let round = Duration::from_secs(4);
    rolling_update_loses_no_connection(&plane, &client, &node, &chart, &address, round).await;
    // A new container; its image is the same one under a second tag (`ctr images tag`), and
    // containerd's CRI names an image by its first tag, so the tag itself is checked on the
    // pod (in `rolling_update_loses_no_connection`), not here.
    let second = running_agent_container(&plane, &node);
    assert_ne!(
        second.id, first.id,
        "after the rolling update crictl still shows the first agent container"
    );

    match agent_rss_kib(node_pids(&node)) {
        Some(kib) => println!(
            "the agent's VmRSS in its pod: {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => panic!("no `topoproxy run` process in the node's cgroup"),
    }

    helm(
        &plane,
        &["uninstall", "topoproxy", "-n", "kube-system", "--wait"],
    );
    // On the node, as an operator runs it: in the node's network namespace.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.netns_path().display()))
        .arg(env!("CARGO_BIN_EXE_topoproxy"))
        .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir", PIN_DIR])
        .output()
        .expect("running topoproxy cleanup");
    assert!(
        out.status.success(),
        "topoproxy cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !Path::new(PIN_DIR).exists()
            || std::fs::read_dir(PIN_DIR).is_ok_and(|mut d| d.next().is_none()),
        "{PIN_DIR} still holds pins after helm uninstall and topoproxy cleanup"
    );
}
