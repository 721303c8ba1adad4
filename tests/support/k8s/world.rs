//! A multi-node world inside the VM, for `tests/vm_k8s_parity.rs`.
//!
//! The VM's root namespace is the fabric (a router); every node is a network namespace with
//! its own IPVS table, `kube-ipvs0` and nftables, joined to the fabric by a veth pair:
//!
//! ```text
//!   outside client (tpn-out, 192.168.100.2) ─┐
//!   node-kp (tpn-kp, 192.168.1.2) ──────────┼── fabric (root ns) ── eth0 ── QEMU user net
//!   node-tp (tpn-tp, 192.168.2.2) ──────────┤      masquerades           10.0.2.2 = host
//!   node-b  (tpn-b,  192.168.3.2) ──────────┘      to eth0               loopback (apiserver)
//! ```
//!
//! Node `i` owns the pod CIDRs `10.244.i.0/24` and `fd00:10:244:i::/64`; the fabric routes
//! them to the node, the node routes each pod's /32 (/128) to the pod's veth (Calico style:
//! the pod's gateway is a link-local address on the node's side). Every node forwards. The
//! agents reach the control plane on the host through the fabric's masquerade and QEMU's
//! user networking. Everything is removed on drop, also when a test panics.
//!
//! Include with `#[path = "support/k8s/world.rs"] mod world;` beside `support/process.rs`,
//! `support/netns.rs` and `support/traffic.rs`.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::{ip_in, sh_in, within, IP};
use crate::process::{sh, sh_quiet};

const NFT: &str = "/usr/sbin/nft";
const GATEWAY: &str = "169.254.1.1";
const FABRIC_TABLE: &str = "tp-world";

/// The control plane's files in the guest (kubeconfigs, certificates), which `cargo xtask
/// vm-test` shares for the `vm_k8s_*` targets.
pub fn k8s_dir() -> PathBuf {
    PathBuf::from(std::env::var("TOPOPROXY_VM_K8S").unwrap_or_else(|_| {
        panic!(
            "TOPOPROXY_VM_K8S is unset: run the vm_k8s_* tests with `cargo xtask vm-test`, \
             which starts the control plane on the host"
        )
    }))
}

fn write_sysctl_in(netns: &str, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    sh_in(netns, "/bin/sh", &["-c", &format!("echo {value} > {path}")]);
}

/// Turns off ICMP error rate limiting in `netns` (the root namespace for `None`). A REJECT,
/// IPVS's "no destination" and a missing route answer with ICMP errors, which the kernel
/// sends at most about once a second per destination by default: probes in quick succession
/// would see some refused and some time out, by timing alone.
fn answer_every_icmp_error(netns: Option<&str>) {
    // The global budget (icmp_msgs_per_sec) exists in the root namespace only.
    let global: &[(&str, &str)] = if netns.is_none() {
        &[("net.ipv4.icmp_msgs_per_sec", "100000")]
    } else {
        &[]
    };
    let per_namespace = [
        ("net.ipv4.icmp_ratelimit", "0"),
        ("net.ipv6.icmp.ratelimit", "0"),
    ];
    for &(key, value) in per_namespace.iter().chain(global) {
        match netns {
            Some(netns) => write_sysctl_in(netns, key, value),
            None => {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
            }
        }
    }
}

/// A node of the world.
#[derive(Clone, Debug)]
pub struct NodeNet {
    /// The Kubernetes Node name.
    pub name: String,
    /// The network namespace.
    pub netns: String,
    /// `i` in every address of the node.
    pub index: u8,
}

impl NodeNet {
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(192, 168, self.index, 2)
    }
    pub fn address6(&self) -> String {
        format!("fd00:192:168:{}::2", self.index)
    }
    /// The `n`th pod address of this node.
    pub fn pod_ip(&self, n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, n)
    }
    pub fn pod_ip6(&self, n: u8) -> String {
        format!("fd00:10:244:{}::{n}", self.index)
    }
    fn fabric_link(&self) -> String {
        format!("tpw-{}", self.index)
    }
}

/// A pod as a network namespace behind its node.
pub struct PodNet {
    pub netns: String,
    pub address: Ipv4Addr,
}

impl PodNet {
    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        within(&self.netns, f)
    }
}

/// The world: fabric, nodes, pods, outside client.
pub struct World {
    pub nodes: Vec<NodeNet>,
    pub outside: String,
    pods: Vec<PodNet>,
    /// Policy-routing rules added in the fabric: `(family, from, table)`.
    rules: Vec<(&'static str, String, String)>,
}

/// The fabric's routing tables for outside clients: this plus the node's index.
const OUTSIDE_TABLE_BASE: u32 = 200;

impl World {
    /// Builds the fabric and the nodes (each `(name, index)`), and the outside client.
    pub fn build(nodes: &[(&str, u8)]) -> Self {
        let mut world = Self {
            nodes: Vec::new(),
            outside: "tpn-out".to_owned(),
            pods: Vec::new(),
            rules: Vec::new(),
        };
        world.clean_leftovers(nodes);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enabling forwarding");
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
            .expect("enabling IPv6 forwarding");
        answer_every_icmp_error(None);
        // What no node owns ends at the fabric, answered at once, rather than leaving
        // through QEMU's user network, which drops some of it and answers some.
        for prefix in ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"] {
            sh(IP, &["route", "replace", "unreachable", prefix]);
        }
        sh(NFT, &["add", "table", "ip", FABRIC_TABLE]);
        sh(
            NFT,
            &["add chain ip tp-world post { type nat hook postrouting priority srcnat; }"],
        );
        sh(
            NFT,
            &[
                "add",
                "rule",
                "ip",
                FABRIC_TABLE,
                "post",
                "oifname",
                "eth0",
                "masquerade",
            ],
        );
        for (name, index) in nodes {
            let node = NodeNet {
                name: (*name).to_owned(),
                netns: format!("tpn-{}", name.trim_start_matches("node-")),
                index: *index,
            };
            world.add_node_namespace(&node);
            world.nodes.push(node);
        }
        world.add_outside();
        world
    }

    fn clean_leftovers(&self, nodes: &[(&str, u8)]) {
        sh_quiet(NFT, &["delete", "table", "ip", FABRIC_TABLE]);
        for (name, index) in nodes {
            sh_quiet(IP, &["link", "del", &format!("tpw-{index}")]);
            sh_quiet(
                IP,
                &[
                    "netns",
                    "del",
                    &format!("tpn-{}", name.trim_start_matches("node-")),
                ],
            );
        }
        sh_quiet(IP, &["link", "del", "tpw-out"]);
        sh_quiet(IP, &["netns", "del", &self.outside]);
    }

    fn add_node_namespace(&self, node: &NodeNet) {
        let netns = &node.netns;
        let link = node.fabric_link();
        let i = node.index;
        sh(IP, &["netns", "add", netns]);
        sh(
            IP,
            &[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        );
        sh(
            IP,
            &["addr", "add", &format!("192.168.{i}.1/24"), "dev", &link],
        );
        sh(
            IP,
            &[
                "addr",
                "add",
                &format!("fd00:192:168:{i}::1/64"),
                "dev",
                &link,
                "nodad",
            ],
        );
        sh(IP, &["link", "set", &link, "up"]);
        let inside = |args: &[&str]| {
            ip_in(netns, args);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&[
            "addr",
            "add",
            &format!("{}/24", node.address()),
            "dev",
            "eth0",
        ]);
        inside(&[
            "addr",
            "add",
            &format!("{}/64", node.address6()),
            "dev",
            "eth0",
            "nodad",
        ]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", "default", "via", &format!("192.168.{i}.1")]);
        inside(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:192:168:{i}::1"),
        ]);
        write_sysctl_in(netns, "net.ipv4.ip_forward", "1");
        write_sysctl_in(netns, "net.ipv6.conf.all.forwarding", "1");
        answer_every_icmp_error(Some(netns));
        sh(
            IP,
            &[
                "route",
                "add",
                &format!("10.244.{i}.0/24"),
                "via",
                &node.address().to_string(),
            ],
        );
        sh(
            IP,
            &[
                "-6",
                "route",
                "add",
                &format!("fd00:10:244:{i}::/64"),
                "via",
                &node.address6(),
            ],
        );
    }

    fn add_outside(&self) {
        let netns = &self.outside;
        sh(IP, &["netns", "add", netns]);
        sh(
            IP,
            &[
                "link", "add", "tpw-out", "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        );
        sh(IP, &["addr", "add", "192.168.100.1/24", "dev", "tpw-out"]);
        sh(IP, &["link", "set", "tpw-out", "up"]);
        ip_in(netns, &["link", "set", "lo", "up"]);
        ip_in(netns, &["addr", "add", "192.168.100.2/24", "dev", "eth0"]);
        ip_in(netns, &["link", "set", "eth0", "up"]);
        ip_in(netns, &["route", "add", "default", "via", "192.168.100.1"]);
        sh(
            IP,
            &[
                "addr",
                "add",
                "fd00:192:168:100::1/64",
                "dev",
                "tpw-out",
                "nodad",
            ],
        );
        ip_in(
            netns,
            &[
                "addr",
                "add",
                "fd00:192:168:100::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
        );
        ip_in(
            netns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:192:168:100::1",
            ],
        );
    }

    /// Gives the outside client one more source address, whose packets to `prefixes` the
    /// fabric sends to `node` (policy routing by source: each twin gets its own clients, so
    /// both are asked the same Service addresses at once).
    pub fn add_outside_client(&mut self, address: IpAddr, node: &str, prefixes: &[&str]) {
        let node = self.node(node).clone();
        let table = (OUTSIDE_TABLE_BASE + u32::from(node.index)).to_string();
        let (host_prefix, family, gateway) = match address {
            IpAddr::V4(_) => ("/24", "-4", node.address().to_string()),
            IpAddr::V6(_) => ("/64", "-6", node.address6()),
        };
        ip_in(
            &self.outside,
            &[
                "addr",
                "add",
                &format!("{address}{host_prefix}"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        let from = address.to_string();
        sh(IP, &[family, "rule", "add", "from", &from, "table", &table]);
        self.rules.push((family, from, table.clone()));
        for prefix in prefixes {
            if prefix.contains(':') == address.is_ipv6() {
                sh(
                    IP,
                    &[
                        family, "route", "replace", prefix, "via", &gateway, "table", &table,
                    ],
                );
            }
        }
    }

    /// Adds `cidr` to `node`'s interface beside its InternalIP (a second NIC's address, a
    /// keepalived VIP): kube-proxy treats every local address as the node's.
    pub fn add_node_address(&self, node: &str, cidr: &str) {
        let netns = &self.node(node).netns;
        ip_in(netns, &["addr", "add", cidr, "dev", "eth0", "nodad"]);
    }

    pub fn node(&self, name: &str) -> &NodeNet {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the world"))
    }

    /// Adds pod `n` of `node` as a namespace behind it (`10.244.i.n`).
    pub fn add_pod(&mut self, node: &str, n: u8) -> &PodNet {
        self.add_pod_in_families(node, n, false)
    }

    /// Adds pod `n` of `node`, with its IPv6 address too (`fd00:10:244:i::n`) when `dual`.
    pub fn add_pod_in_families(&mut self, node: &str, n: u8, dual: bool) -> &PodNet {
        let node = self.node(node).clone();
        let netns = format!("tpp-{}-{n}", node.index);
        let node_link = format!("tpv-{}-{n}", node.index);
        let address = node.pod_ip(n);
        sh_quiet(IP, &["netns", "del", &netns]);
        sh(IP, &["netns", "add", &netns]);
        sh(
            IP,
            &[
                "link", "add", &node_link, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        sh(IP, &["link", "set", &node_link, "netns", &node.netns]);
        let pod = |args: &[&str]| {
            ip_in(&netns, args);
        };
        pod(&["link", "set", "lo", "up"]);
        pod(&["addr", "add", &format!("{address}/32"), "dev", "eth0"]);
        pod(&["link", "set", "eth0", "up"]);
        pod(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"]);
        pod(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"]);
        let host = |args: &[&str]| {
            ip_in(&node.netns, args);
        };
        host(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &node_link]);
        host(&["link", "set", &node_link, "up"]);
        host(&["route", "add", &format!("{address}/32"), "dev", &node_link]);
        if dual {
            // The pod's IPv6 gateway is the node side's link-local address, as for IPv4.
            let address6 = format!("fd00:10:244:{}::{n:x}", node.index);
            pod(&[
                "addr",
                "add",
                &format!("{address6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
            host(&["addr", "add", "fe80::1/64", "dev", &node_link, "nodad"]);
            pod(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ]);
            host(&[
                "-6",
                "route",
                "add",
                &format!("{address6}/128"),
                "dev",
                &node_link,
            ]);
        }
        self.pods.push(PodNet { netns, address });
        self.pods.last().expect("the pod just added")
    }

    /// Removes the pod at `address`: its namespace, and with it the veth pair and the route.
    pub fn remove_pod(&mut self, address: Ipv4Addr) {
        if let Some(index) = self.pods.iter().position(|p| p.address == address) {
            let pod = self.pods.remove(index);
            sh(IP, &["netns", "del", &pod.netns]);
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for pod in &self.pods {
            sh_quiet(IP, &["netns", "del", &pod.netns]);
        }
        for node in &self.nodes {
            sh_quiet(IP, &["link", "del", &node.fabric_link()]);
            sh_quiet(IP, &["netns", "del", &node.netns]);
        }
        sh_quiet(IP, &["link", "del", "tpw-out"]);
        sh_quiet(IP, &["netns", "del", &self.outside]);
        sh_quiet(NFT, &["delete", "table", "ip", FABRIC_TABLE]);
        for prefix in ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"] {
            sh_quiet(IP, &["route", "del", "unreachable", prefix]);
        }
        for (family, from, table) in &self.rules {
            sh_quiet(IP, &[family, "rule", "del", "from", from, "table", table]);
        }
    }
}

/// A TCP server on a thread inside a namespace that answers each connection with `reply`.
/// It serves `count` connections and then ends.
pub fn serve_in(netns_path: &str, address: SocketAddr, reply: &'static str, count: usize) {
    let path = netns_path.to_owned();
    let listener = within(&path, move || TcpListener::bind(address))
        .unwrap_or_else(|e| panic!("binding {address}: {e}"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().take(count).flatten() {
            let _ = stream.write_all(reply.as_bytes());
        }
    });
}

/// A TCP server on a thread inside a namespace that answers every connection with `name`
/// and the peer address it sees (`name peer`), for as long as the test process runs.
pub fn serve_peer_in(netns_path: &str, address: SocketAddr, name: String) {
    let path = netns_path.to_owned();
    let listener = within(&path, move || TcpListener::bind(address))
        .unwrap_or_else(|e| panic!("binding {address}: {e}"));
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let peer = stream
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = stream.write_all(format!("{name} {peer}").as_bytes());
        }
    });
}

/// Connects from inside a namespace and returns what the server said.
pub fn ask_from(netns_path: &str, address: SocketAddr) -> std::io::Result<String> {
    within(netns_path, move || {
        crate::traffic::tcp_read_to_close(address, Duration::from_secs(3))
    })
}

/// A process inside a node's namespace, killed on drop; its output goes to a log file.
pub struct NodeProcess {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn spawn(name: &str, netns: &str, program: &Path, args: &[&str]) -> Self {
        // `cargo xtask vm-test` collects /host/out; elsewhere the logs go to /tmp.
        let dir = if Path::new("/host/out").is_dir() {
            "/host/out"
        } else {
            "/tmp"
        };
        let log = PathBuf::from(format!("{dir}/{name}.log"));
        let file = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file.try_clone().expect("cloning the log handle");
        let child = Command::new(IP)
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id (`ip netns exec` execs the program, so it is the program's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An address as the parity comparison names it: the addresses of `own` and `peer` nodes
/// (node address, pod addresses) relabelled relative to the agent reading the table, so two
/// twin nodes' tables compare equal when they are the same up to which node is "self".
pub fn relabel(address: IpAddr, own: u8, peer: u8) -> String {
    let role = |index: u8| {
        if index == own {
            Some("self")
        } else if index == peer {
            Some("peer")
        } else {
            None
        }
    };
    match address {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            match (a, b, role(c)) {
                (192, 168, _) if c == OUTSIDE_NET => outside_label(IpAddr::V4(v4), u16::from(d)),
                (192, 168, Some(r)) if d == 2 => format!("node-{r}"),
                (192, 168, Some(r)) if d == SECOND_NODE_HOST => format!("node2-{r}"),
                (10, 244, Some(r)) => format!("pod-{r}.{d}"),
                _ => v4.to_string(),
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if (s[0], s[1], s[2], s[3]) == (0xfd00, 0x192, 0x168, 0x100) {
                return outside_label(IpAddr::V6(v6), s[7]);
            }
            match (s[0], s[1], s[2], role(s[3] as u8)) {
                (0xfd00, 0x192, 0x168, Some(r)) if s[3] < 256 && s[7] == 2 => format!("node6-{r}"),
                (0xfd00, 0x10, 0x244, Some(r)) if s[3] < 256 => format!("pod6-{r}.{:x}", s[7]),
                _ => v6.to_string(),
            }
        }
    }
}

/// The third octet of the outside clients' network (`192.168.100.0/24`,
/// `fd00:192:168:100::/64`).
pub const OUTSIDE_NET: u8 = 100;
/// The host number of a node's second address (`192.168.i.3`), beside its InternalIP.
pub const SECOND_NODE_HOST: u8 = 3;

/// Outside clients by host number: the parity corpus gives each twin one inside and one
/// outside a Service's source ranges (`.10`/`.11` inside, `.20`/`.21` outside; in IPv6 the
/// same digits, `fd00:192:168:100::10`), which compare as the same client.
fn outside_label(address: IpAddr, host: u16) -> String {
    let inside = if address.is_ipv4() {
        [10, 11]
    } else {
        [0x10, 0x11]
    };
    let outside = if address.is_ipv4() {
        [20, 21]
    } else {
        [0x20, 0x21]
    };
    if inside.contains(&host) {
        "outside-in".to_owned()
    } else if outside.contains(&host) {
        "outside-out".to_owned()
    } else {
        address.to_string()
    }
}
