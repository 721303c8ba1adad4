//! The two-zone half of `vm_k8s_real_node`: two nodes, each in a network namespace of its own
//! inside the guest, their workloads, and what is checked of each zone's answers and IPVS table.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_harness::network::{in_netns, NodeNetwork};
use k8s_harness::node::{NodeOptions, RealNode};
use k8s_harness::objects::apply;
use k8s_harness::workloads::{echo_pod, helm, kubectl, wait_pods_ready};
use k8s_harness::ControlPlane;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::guest::NODE_SYSCTLS;
use crate::ipvs_table;
use crate::zones::{answered_only_by, hints_name_each_endpoints_own_zone, Asks};

/// Not the first test's namespace, which may still be terminating.
pub const ZONES_NAMESPACE: &str = "zones";
/// A client pod's asks: two seconds of them, one every 100 ms (each `kubectl exec` costs
/// seconds in the TCG guest).
const ZONES_ASKS: Asks = Asks {
    namespace: ZONES_NAMESPACE,
    round: ("2s", "100ms"),
    limit: Duration::from_secs(150),
};
/// The nftables table of the guest's masquerade for its nodes' segment.
const UPLINK_TABLE: &str = "topoproxy-test-uplink";

/// A node of the two-zone test: its name, zone, address (the last byte on the segment), pod
/// subnet, echo pods and client pod.
pub struct Zone {
    pub node: &'static str,
    zone: &'static str,
    host_byte: u8,
    pod_cidr: &'static str,
    backends: [&'static str; 2],
    client: &'static str,
}

/// Tags 1 and 2 and pod subnets beside the first test's (`tprn0`, `10.244.1.0/24`), whose
/// CNI bridge in the guest's root namespace may outlive it.
pub const ZONES: [Zone; 2] = [
    Zone {
        node: "node-a",
        zone: "zone-a",
        host_byte: 1,
        pod_cidr: "10.244.2.0/24",
        backends: ["echo-a1", "echo-a2"],
        client: "client-a",
    },
    Zone {
        node: "node-b",
        zone: "zone-b",
        host_byte: 2,
        pod_cidr: "10.244.3.0/24",
        backends: ["echo-b1", "echo-b2"],
        client: "client-b",
    },
];

/// The address with last byte `byte` on the /24 `segment` (`a.b.c.0/24`).
pub fn on_segment(segment: &str, byte: u8) -> Ipv4Addr {
    let network: Ipv4Addr = segment
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("TOPOPROXY_VM_NODE_SEGMENT {segment:?}: not a.b.c.0/24"));
    let [a, b, c, _] = network.octets();
    Ipv4Addr::new(a, b, c, byte)
}

/// The guest's root namespace as its nodes' router towards the control plane: what the
/// nodes' `segment` sends out of the uplink (`eth0`, QEMU's user networking, which answers
/// only the guest's own address) leaves masqueraded. The table goes on drop.
pub struct UplinkMasquerade;

impl UplinkMasquerade {
    pub fn add(segment: &str) -> Self {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", UPLINK_TABLE])
            .output();
        let commands = [
            format!("add table ip {UPLINK_TABLE}"),
            format!(
                "add chain ip {UPLINK_TABLE} postrouting \
                 {{ type nat hook postrouting priority srcnat; }}"
            ),
            format!(
                "add rule ip {UPLINK_TABLE} postrouting \
                 ip saddr {segment} oifname \"eth0\" masquerade"
            ),
        ];
        for command in commands {
            let out = Command::new("nft")
                .arg(&command)
                .output()
                .expect("running nft");
            assert!(
                out.status.success(),
                "nft {command}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self
    }
}

impl Drop for UplinkMasquerade {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", UPLINK_TABLE])
            .output();
    }
}

/// Starts `zone`'s node in a namespace of its own on `network`, sets the IPVS node's sysctls
/// in it (each network namespace has its own; they go with it), and imports the agent's and
/// the echo image.
pub async fn start_zone_node(
    plane: &ControlPlane,
    network: &NodeNetwork,
    (zone, tag): (&Zone, u8),
    segment: &str,
    agent_image: &Path,
) -> RealNode {
    let node = RealNode::start(
        plane,
        network,
        NodeOptions {
            name: zone.node.into(),
            zone: Some(zone.zone.into()),
            address: on_segment(segment, zone.host_byte),
            pod_cidr: zone.pod_cidr.into(),
            tag,
        },
        &k8s_harness::test_images_dir(),
    )
    .await;
    in_netns(&node.netns_path(), || {
        for (key, value) in NODE_SYSCTLS {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("writing {} in {}: {e}", path.display(), zone.node));
        }
    });
    node.import_image(agent_image);
    node.import_image(&k8s_harness::test_images_dir().join("echo.tar"));
    node
}

/// The echo pods and client pods of both zones and the echo Service (TCP, no
/// `trafficDistribution` yet) in [`ZONES_NAMESPACE`]; waits until both agents and every pod
/// are Ready.
pub async fn deploy_zone_workloads(plane: &ControlPlane, client: &Client) {
    kubectl(plane, &["create", "namespace", ZONES_NAMESPACE]).expect("creating the namespace");
    for zone in &ZONES {
        for backend in zone.backends {
            apply(
                client,
                echo_pod(ZONES_NAMESPACE, backend, zone.node, "echo"),
            )
            .await;
        }
        apply(
            client,
            echo_pod(ZONES_NAMESPACE, zone.client, zone.node, "client"),
        )
        .await;
    }
    apply(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": ZONES_NAMESPACE},
            "spec": {
                "selector": {"app": "echo"},
                "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }),
    )
    .await;
    let agents = "app.kubernetes.io/name=topoproxy";
    wait_pods_ready(client, plane, "kube-system", agents, ZONES.len()).await;
    wait_pods_ready(client, plane, ZONES_NAMESPACE, "app=echo", 4).await;
    wait_pods_ready(client, plane, ZONES_NAMESPACE, "app=client", ZONES.len()).await;
}

/// The pod IPs of `names` in [`ZONES_NAMESPACE`].
async fn pod_ips(client: &Client, names: &[&str]) -> BTreeSet<IpAddr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ZONES_NAMESPACE);
    let mut ips = BTreeSet::new();
    for name in names {
        let ip = pods
            .get(name)
            .await
            .ok()
            .and_then(|pod| pod.status?.pod_ip)
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("pod {name} has no IP"));
        ips.insert(ip);
    }
    ips
}

/// The name of the agent's pod on `node`.
async fn agent_pod_on(client: &Client, node: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let selector = ListParams::default()
        .labels("app.kubernetes.io/name=topoproxy")
        .fields(&format!("spec.nodeName={node}"));
    pods.list(&selector)
        .await
        .ok()
        .and_then(|list| list.items.into_iter().next()?.metadata.name)
        .unwrap_or_else(|| panic!("no agent pod on {node}"))
}

/// `kubectl exec <node's agent pod> -- ipvsadm -Ln` lists the ClusterIP's TCP virtual server
/// with exactly `expected` as the real servers that take new connections (its own zone's pods,
/// in that node's own IPVS table), and the VIP is on that node's `kube-ipvs0`. The other
/// zone's pods, real servers before the Service preferred close ones, may still be listed with
/// weight 0 until their connections expire, as kube-proxy's graceful termination keeps them.
async fn node_table_holds_only(
    plane: &ControlPlane,
    client: &Client,
    node: &RealNode,
    cluster_ip: &str,
    expected: &BTreeSet<IpAddr>,
) {
    let pod = agent_pod_on(client, node.name()).await;
    let listing = kubectl(
        plane,
        &["-n", "kube-system", "exec", &pod, "--", "ipvsadm", "-Ln"],
    )
    .unwrap_or_else(|e| panic!("ipvsadm -Ln in {pod} on {}: {e}", node.name()));
    let vip: std::net::SocketAddr = format!("{cluster_ip}:80")
        .parse()
        .expect("the ClusterIP and port");
    let real_servers: Option<BTreeSet<IpAddr>> = ipvs_table::parse(&listing)
        .into_iter()
        .find(|server| server.protocol == "TCP" && server.address == vip)
        .map(|server| {
            server
                .real_servers
                .iter()
                .filter(|(_, method_and_weight)| {
                    method_and_weight.split_whitespace().nth(1) != Some("0")
                })
                .map(|(address, _)| address.ip())
                .collect()
        });
    assert_eq!(
        real_servers.as_ref(),
        Some(expected),
        "{}'s IPVS table (ipvsadm -Ln in {pod}) for {vip}:\n{listing}",
        node.name()
    );
    println!(
        "{}: ipvsadm -Ln in {pod} holds {vip} → {expected:?} only",
        node.name()
    );
    let out = Command::new("ip")
        .args([
            "-n",
            &node.netns(),
            "-4",
            "addr",
            "show",
            "dev",
            "kube-ipvs0",
        ])
        .output()
        .expect("running ip");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("inet {cluster_ip}/32")),
        "{cluster_ip} is not on {}'s kube-ipvs0: {}{}",
        node.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The echo Service's ClusterIP.
pub async fn zones_cluster_ip(client: &Client) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), ZONES_NAMESPACE);
    services
        .get("echo")
        .await
        .ok()
        .and_then(|s| s.spec?.cluster_ip)
        .expect("the Service's ClusterIP")
}

/// The control: without `trafficDistribution` each client is answered by every zone's pods.
/// Then the Service gets `trafficDistribution: PreferClose`, and the real controller hints
/// each endpoint for its own zone.
pub async fn every_pod_answers_until_the_service_prefers_close(
    plane: &ControlPlane,
    client: &Client,
    cluster_ip: &str,
) {
    let address = format!("{cluster_ip}:80");
    let every_pod: Vec<&str> = ZONES.iter().flat_map(|zone| zone.backends).collect();
    for zone in &ZONES {
        answered_only_by(plane, &ZONES_ASKS, zone.client, &address, &every_pod).await;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ZONES_NAMESPACE);
    let prefer_close = json!({"spec": {"trafficDistribution": "PreferClose"}});
    services
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(&prefer_close),
        )
        .await
        .unwrap_or_else(|e| panic!("setting trafficDistribution on the echo Service: {e}"));
    hints_name_each_endpoints_own_zone(client, ZONES_NAMESPACE, "echo", 4).await;
}

/// Each zone's client is answered only by its zone's pods and each node's table holds only
/// them; once zone a's pods are deleted, both clients are answered by zone b's.
pub async fn each_zone_then_the_other(
    plane: &ControlPlane,
    client: &Client,
    nodes: [&RealNode; 2],
    cluster_ip: &str,
) {
    let address = format!("{cluster_ip}:80");
    for zone in &ZONES {
        answered_only_by(plane, &ZONES_ASKS, zone.client, &address, &zone.backends).await;
    }
    for (zone, node) in ZONES.iter().zip(nodes) {
        let own = pod_ips(client, &zone.backends).await;
        node_table_holds_only(plane, client, node, cluster_ip, &own).await;
    }
    let [a, b] = &ZONES;
    let mut delete = vec!["-n", ZONES_NAMESPACE, "delete", "pod", "--wait=false"];
    delete.extend(a.backends);
    kubectl(plane, &delete).expect("deleting zone a's echo pods");
    hints_name_each_endpoints_own_zone(client, ZONES_NAMESPACE, "echo", 2).await;
    answered_only_by(plane, &ZONES_ASKS, a.client, &address, &b.backends).await;
    answered_only_by(plane, &ZONES_ASKS, b.client, &address, &b.backends).await;
}

/// Removes what the test put into the control plane, which the boot's next test uses: a pod
/// whose node is gone keeps its last status, Ready included, and an agent's would count among
/// the next install's, so the agents' pods are removed from the API at once (their containers
/// go with the nodes), then the Nodes; the namespace goes in the background. Through the API
/// client, not `kubectl`: each process costs seconds in the TCG guest.
pub async fn leave_the_control_plane_clean(plane: &ControlPlane, client: &Client) {
    helm(plane, &["uninstall", "topoproxy", "-n", "kube-system"]);
    let at_once = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let agents: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    agents
        .delete_collection(
            &at_once,
            &ListParams::default().labels("app.kubernetes.io/name=topoproxy"),
        )
        .await
        .unwrap_or_else(|e| panic!("deleting the agents' pods: {e}"));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(ZONES_NAMESPACE, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting namespace {ZONES_NAMESPACE}: {e}"));
    let nodes: Api<Node> = Api::all(client.clone());
    for zone in &ZONES {
        nodes
            .delete(zone.node, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting Node {}: {e}", zone.node));
    }
}
