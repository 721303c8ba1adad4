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

#[path = "support/harness.rs"]
mod harness;
#[path = "support/http.rs"]
mod http;
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
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_harness::network::{in_netns, NodeNetwork};
use k8s_harness::node::{NodeOptions, RealNode};
use k8s_harness::objects::{apply, eventually};
use k8s_harness::workloads::{echo_pod, helm, install_chart_ipvs, kubectl, wait_pods_ready};
use k8s_harness::ControlPlane;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use zones::{answered_only_by, hints_name_each_endpoints_own_zone, Asks};

const TEST: &str = "the_chart_in_ipvs_mode_runs_under_a_real_kubelet_in_the_guest";
const NODE: &str = "vm-node";
/// The host's loopback as the guest reaches it (the apiserver listens there).
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const NODE_PORT: u16 = 30080;
/// The guest's ipvsadm (the VM image has it, as the agent's image does).
const IPVSADM: &str = "/usr/sbin/ipvsadm";
/// The Service's externalIP, which the outside client routes to the node.
const EXTERNAL_IP: &str = "192.168.241.10";
/// The outside client's namespace, its link's node end, and the segment between them.
const OUTSIDE_NETNS: &str = "tpvm-outside";
const OUTSIDE_LINK: &str = "tpvm-out0";
const OUTSIDE_PEER: &str = "tpvm-out1";
const OUTSIDE_NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 244, 1);
const OUTSIDE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 244, 2);
/// The sysctls the migration guide has operators set on an IPVS node (kernel 5.9 and newer).
const NODE_SYSCTLS: [(&str, &str); 5] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The guest prepared as a node: the IPVS sysctls, `br_netfilter`, a resolv.conf for the
/// kubelet. Dropping it puts back what it changed, and removes the nftables tables that
/// appeared meanwhile (the kubelet's own iptables chains, `KUBE-FIREWALL` and its canaries,
/// which it writes into its network namespace, here the guest's).
struct PreparedGuest {
    sysctls_before: Vec<(&'static str, String)>,
    loaded_br_netfilter: bool,
    wrote_resolv_conf: bool,
    tables_before: BTreeSet<String>,
}

/// `nft list tables`: one `table <family> <name>` per line.
fn nft_tables() -> BTreeSet<String> {
    Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|line| line.trim().to_owned())
                .filter(|line| line.starts_with("table "))
                .collect()
        })
        .unwrap_or_default()
}

impl PreparedGuest {
    fn prepare() -> Self {
        let loaded_br_netfilter = !Path::new("/proc/sys/net/bridge").exists();
        if loaded_br_netfilter {
            let out = Command::new("modprobe")
                .arg("br_netfilter")
                .output()
                .expect("running modprobe");
            assert!(
                out.status.success(),
                "modprobe br_netfilter: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Pods with `dnsPolicy: Default` (the agent's) get the node's resolv.conf; the guest
        // has none. QEMU's resolver: nothing here resolves a name.
        let resolv = Path::new("/etc/resolv.conf");
        let wrote_resolv_conf = !resolv.exists();
        if wrote_resolv_conf {
            std::fs::write(resolv, "nameserver 10.0.2.3\n").expect("writing /etc/resolv.conf");
        }
        let mut sysctls_before = Vec::new();
        for (key, value) in NODE_SYSCTLS {
            let path = Path::new("/proc/sys").join(key);
            let before = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            sysctls_before.push((key, before.trim().to_owned()));
        }
        Self {
            sysctls_before,
            loaded_br_netfilter,
            wrote_resolv_conf,
            tables_before: nft_tables(),
        }
    }
}

impl Drop for PreparedGuest {
    fn drop(&mut self) {
        for table in nft_tables().difference(&self.tables_before) {
            let words: Vec<&str> = table.split_whitespace().collect();
            if let ["table", family, name] = words.as_slice() {
                let _ = Command::new("nft")
                    .args(["delete", "table", family, name])
                    .output();
            }
        }
        for (key, before) in self.sysctls_before.iter().rev() {
            let _ = std::fs::write(Path::new("/proc/sys").join(key), before);
        }
        if self.loaded_br_netfilter {
            let _ = Command::new("rmmod").arg("br_netfilter").output();
        }
        if self.wrote_resolv_conf {
            let _ = std::fs::remove_file("/etc/resolv.conf");
        }
    }
}

/// `topoproxy cleanup --proxy-mode ipvs` in the guest on drop: what the agent's pod programmed
/// (IPVS services, `kube-ipvs0`, its nftables table) goes with it also when the test fails, as
/// the boot's later targets expect an empty guest.
struct IpvsCleanup;

impl Drop for IpvsCleanup {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_topoproxy"))
            .args(["cleanup", "--proxy-mode", "ipvs"])
            .output();
    }
}

/// What a test put into the control plane, removed if the test panics (a test that passes
/// removes it itself): the chart's release, the agents' pods at once (a pod whose node is gone
/// keeps its last status, Ready included), the test's namespace and its Nodes (with no node
/// lifecycle controller a Node without its kubelet stays Ready and gets the next install's
/// agent pod). The control plane outlives the test: the next test in the boot would otherwise
/// fail on the leftovers ("cannot re-use a name that is still in use") instead of its own.
struct LeftoversOnPanic<'a> {
    plane: &'a ControlPlane,
    namespace: &'static str,
    nodes: &'a [&'static str],
}

impl Drop for LeftoversOnPanic<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let _ = Command::new(&self.plane.binaries().helm)
            .arg("--kubeconfig")
            .arg(self.plane.admin_kubeconfig())
            .args(["uninstall", "topoproxy", "-n", "kube-system"])
            .output();
        let agents = "app.kubernetes.io/name=topoproxy";
        let mut nodes = vec!["delete", "node", "--ignore-not-found"];
        nodes.extend(self.nodes);
        let deletions: [&[&str]; 3] = [
            &[
                "-n",
                "kube-system",
                "delete",
                "pod",
                "-l",
                agents,
                "--grace-period=0",
                "--force",
            ],
            &["delete", "namespace", self.namespace, "--wait=false"],
            &nodes,
        ];
        for args in deletions {
            let _ = kubectl(self.plane, args);
        }
    }
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
            let out = Command::new("ip").args(args).output().expect("running ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
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

/// `ipvsadm -Ln` in the guest (the guest's own ipvsadm, not the pod's: the pod is gone).
fn ipvsadm_listing() -> String {
    k8s_harness::stdout_of(Command::new(IPVSADM).arg("-Ln"), "ipvsadm")
        .unwrap_or_else(|error| panic!("{error}"))
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
    let left = ipvsadm_listing();
    assert!(
        left.contains(&format!("{cluster_ip}:80")),
        "the ClusterIP's virtual server did not outlive the agent's pod:\n{left}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_topoproxy"))
        .args(["cleanup", "--proxy-mode", "ipvs"])
        .output()
        .expect("running topoproxy cleanup");
    assert!(
        out.status.success(),
        "topoproxy cleanup --proxy-mode ipvs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ipvsadm_listing();
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

/// Every process of the guest (the agent's pod is one of them).
fn guest_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Where the control plane on the host is, from what vm-test shares: its port and PKI.
fn attach_to_the_host_control_plane() -> ControlPlane {
    let port: u16 = std::env::var("TOPOPROXY_VM_K8S_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("TOPOPROXY_VM_K8S_PORT: the apiserver's port on the host");
    let shared = std::env::var_os("TOPOPROXY_VM_K8S")
        .map(PathBuf::from)
        .expect("TOPOPROXY_VM_K8S: the control plane's files in the share");
    ControlPlane::attach(SocketAddrV4::new(HOST, port), &shared.join("pki"))
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
    list_in_the_pod_equals_the_plan(&plane, || http::http_get(metrics, "/plan"), &address).await;
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
/// Not the first test's namespace, which may still be terminating.
const ZONES_NAMESPACE: &str = "zones";
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
struct Zone {
    node: &'static str,
    zone: &'static str,
    host_byte: u8,
    pod_cidr: &'static str,
    backends: [&'static str; 2],
    client: &'static str,
}

/// Tags 1 and 2 and pod subnets beside the first test's (`tprn0`, `10.244.1.0/24`), whose
/// CNI bridge in the guest's root namespace may outlive it.
const ZONES: [Zone; 2] = [
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
fn on_segment(segment: &str, byte: u8) -> Ipv4Addr {
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
struct UplinkMasquerade;

impl UplinkMasquerade {
    fn add(segment: &str) -> Self {
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
async fn start_zone_node(
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
async fn deploy_zone_workloads(plane: &ControlPlane, client: &Client) {
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
async fn zones_cluster_ip(client: &Client) -> String {
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
async fn every_pod_answers_until_the_service_prefers_close(
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
async fn each_zone_then_the_other(
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

/// Removes what the test put into the control plane, which the boot's next test uses: a pod
/// whose node is gone keeps its last status, Ready included, and an agent's would count among
/// the next install's, so the agents' pods are removed from the API at once (their containers
/// go with the nodes), then the Nodes; the namespace goes in the background. Through the API
/// client, not `kubectl`: each process costs seconds in the TCG guest.
async fn leave_the_control_plane_clean(plane: &ControlPlane, client: &Client) {
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
