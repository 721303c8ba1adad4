//! The VM guest as a Kubernetes node for `vm_k8s_real_node`: the node's preparation as the
//! migration guide has an operator do it (and its undoing), the control plane on the host that
//! vm-test shares, and what the tests leave behind there or in the guest when they end or fail.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_harness::workloads::kubectl;
use k8s_harness::ControlPlane;

/// The host's loopback as the guest reaches it (the apiserver listens there).
pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The sysctls the migration guide has operators set on an IPVS node (kernel 5.9 and newer).
pub const NODE_SYSCTLS: [(&str, &str); 5] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
];

/// The guest prepared as a node: the IPVS sysctls, `br_netfilter`, a resolv.conf for the
/// kubelet. Dropping it puts back what it changed, and removes the nftables tables that
/// appeared meanwhile (the kubelet's own iptables chains, `KUBE-FIREWALL` and its canaries,
/// which it writes into its network namespace, here the guest's).
pub struct PreparedGuest {
    sysctls_before: Vec<(&'static str, String)>,
    loaded_br_netfilter: bool,
    wrote_resolv_conf: bool,
    tables_before: BTreeSet<String>,
}

/// `nft list tables`: one `table <family> <name>` per line.
pub fn nft_tables() -> BTreeSet<String> {
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
    pub fn prepare() -> Self {
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
pub struct IpvsCleanup;

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
pub struct LeftoversOnPanic<'a> {
    pub plane: &'a ControlPlane,
    pub namespace: &'static str,
    pub nodes: &'a [&'static str],
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

/// Every process of the guest (the agent's pod is one of them).
pub fn guest_pids() -> Vec<u32> {
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
pub fn attach_to_the_host_control_plane() -> ControlPlane {
    let port: u16 = std::env::var("TOPOPROXY_VM_K8S_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("TOPOPROXY_VM_K8S_PORT: the apiserver's port on the host");
    let shared = std::env::var_os("TOPOPROXY_VM_K8S")
        .map(PathBuf::from)
        .expect("TOPOPROXY_VM_K8S: the control plane's files in the share");
    ControlPlane::attach(SocketAddrV4::new(HOST, port), &shared.join("pki"))
}
