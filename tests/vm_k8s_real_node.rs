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
//! it was.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/http.rs"]
mod http;
#[path = "support/real_node.rs"]
mod real_node;

use real_node::{
    agent_pod_ready, agent_rss_kib, both_backends_answer, echo_service_and_pods,
    list_in_the_pod_equals_the_plan, NAMESPACE,
};

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_harness::node::{NodeOptions, RealNode};
use k8s_harness::workloads::{helm, install_chart_ipvs, kubectl};
use k8s_harness::ControlPlane;
use serde_json::json;

const TEST: &str = "the_chart_in_ipvs_mode_runs_under_a_real_kubelet_in_the_guest";
const NODE: &str = "vm-node";
/// The host's loopback as the guest reaches it (the apiserver listens there).
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
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

/// The echo Service: TCP and UDP on port 80 to the backends' 8080.
fn echo_service() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": NAMESPACE},
        "spec": {
            "selector": {"app": "echo"},
            "ports": [
                {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "udp", "port": 80, "targetPort": 8080, "protocol": "UDP"},
            ],
        },
    })
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
    let client = plane.admin_client().await;
    let started = std::time::Instant::now();
    let node = RealNode::start_on_machine(
        &plane,
        NodeOptions {
            name: NODE.into(),
            zone: Some("zone-a".into()),
            address: node_address
                .parse()
                .expect("TOPOPROXY_VM_NODE: an IPv4 address"),
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
    install_chart_ipvs(&plane, &workspace().join("charts/topoproxy"), HOST);
    agent_pod_ready(&plane, &client, installed).await;

    let (cluster_ip, backend_ips) =
        echo_service_and_pods(&plane, &client, NODE, echo_service()).await;
    let address = format!("{cluster_ip}:80");
    both_backends_answer(&plane, &address).await;
    the_table_is_in_ipvsadm_and_the_vip_on_kube_ipvs0(&plane, &cluster_ip, &backend_ips).await;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], 10249).into();
    list_in_the_pod_equals_the_plan(&plane, || http::http_get(metrics, "/plan"), &address).await;
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
    println!(
        "the whole test, node start to helm uninstall: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    kubectl(&plane, &["delete", "namespace", NAMESPACE, "--wait=false"])
        .expect("deleting the namespace");
}
