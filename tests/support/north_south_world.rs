//! North-south in eBPF mode with real traffic: the world and the checks that
//! `tests/host_north_south.rs` runs on the host kernel (tcx, 6.6 and later) and
//! `tests/vm_north_south_traffic.rs` runs in the VM (Debian's 6.1: netlink clsact filters).
//! Include with `#[path = "support/north_south_world.rs"] #[macro_use] mod world;` beside
//! `harness.rs`, `host.rs`, `netns.rs`, `process.rs` and `traffic.rs`; needs root.
//!
//! Each check builds its own routed world of network namespaces:
//!
//! ```text
//!  client 10.77.0.2 ──── 10.77.0.1 [node] 10.78.0.1 ──── 10.78.0.2 [remote node]
//!  (externalIPs 10.77.100.0/24 via the node)   │                          │
//!                                   local pod 10.244.1.10       remote pod 10.244.2.10
//! ```
//!
//! The tc programs are attached inside the node namespace with the default device choice
//! (the devices holding node addresses: the two uplinks, not the pod's veth). A check that
//! wants two nodes balancing starts a second dataplane, with its own pins and tc programs, in
//! the remote node ([`World::remote_agent`]), as a second agent would run there. Services are
//! written through the `Dataplane` trait with ops from the agent's differ, into the same
//! maps the socket programs read (those attach to an empty child cgroup here). Pod servers
//! answer with their name and the peer address they see, so a check knows which backend
//! served it and whether the client's address was kept.
//!
//! Everything (namespaces, cgroup, pins, links) is removed on drop, also when a check fails.

#![allow(dead_code)]

/// Declares, at the call site, the owner helper test and one test per check of this module,
/// each made by `$test!` (the including file says how: plain, or ignored in the VM). Include
/// this module with `#[macro_use]`.
macro_rules! every_check {
    ($test:ident) => {
        $test!(
            node_port_reaches_local_and_remote_backends_with_the_right_sources,
            external_ip_reaches_a_remote_backend,
            load_balancer_ip_reaches_local_and_remote_backends,
            udp_node_port_and_external_ip_answer_from_the_frontend,
            local_policy_keeps_the_client_address_and_drops_without_a_local_endpoint,
            non_service_traffic_to_the_node_is_untouched,
            ipv6_node_port_external_ip_and_local_policy,
            client_ip_affinity_holds_across_connections,
            a_restart_swaps_programs_in_place_and_cleanup_leaves_nothing,
            killing_the_owner_with_sigkill_and_starting_another_loses_no_request,
            one_client_port_through_two_frontends_to_one_backend_keeps_both_flows,
            a_changed_device_address_becomes_the_snat_source_after_the_next_sync,
            two_nodes_balance_their_own_node_ports_and_answer_through_themselves,
            drops_are_logged_with_the_service_once_switched_on,
            the_snat_range_is_kept_from_the_nodes_ephemeral_ports_until_cleanup,
            a_cluster_ip_routed_to_the_node_from_outside_is_served_with_kube_proxys_masquerade,
        );

        #[test]
        #[ignore = "helper process for the kill -9 test, started by it"]
        fn dataplane_owner_process() {
            world::dataplane_owner_main();
        }
    };
}

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, ErrorKind, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::executor::block_on;
use topoproxy::dataplane::ebpf::north_south::{self, NorthSouthSettings};
use topoproxy::dataplane::ebpf::{cgroup2_mount, cleanup, EbpfDataplane, EbpfSettings};
use topoproxy::dataplane::Dataplane as _;
use topoproxy::dataplane::{
    DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig, TierShares,
};
use topoproxy::diff::diff;
use topoproxy::model::Protocol;
use topoproxy::table::{Frontend, TrafficPolicy, VsKey};

use crate::host::{capture_logs, require_root, wait_for_log_lines};
pub use crate::netns::{within, IP};
use crate::process::shell;
use crate::traffic::{udp_exchange, TcpSession};

pub const CLIENT: &str = "10.77.0.2";
pub const NODE: &str = "10.77.0.1";
pub const NODE_TO_REMOTE: &str = "10.78.0.1";
/// The remote node's address (towards the node; the client reaches it through the node).
pub const REMOTE_NODE: &str = "10.78.0.2";
pub const EXTERNAL_IP: &str = "10.77.100.10";
/// A `status.loadBalancer.ingress` IP, routed to the node as a cloud load balancer would.
pub const LB_IP: &str = "10.77.100.20";
/// A ClusterIP; the client routes the service CIDR to the node, as a BGP-advertised one is.
pub const CLUSTER_IP: &str = "10.96.77.10";
pub const LOCAL_POD: &str = "10.244.1.10";
pub const REMOTE_POD: &str = "10.244.2.10";
pub const CLIENT6: &str = "fd77::2";
pub const NODE6: &str = "fd77::1";
pub const NODE_TO_REMOTE6: &str = "fd78::1";
pub const EXTERNAL_IP6: &str = "fd77:100::10";
pub const LOCAL_POD6: &str = "fd44:1::10";
pub const REMOTE_POD6: &str = "fd44:2::10";
pub const POD_PORT: u16 = 8080;
/// A plain server on the node address, like SSH: must stay reachable.
pub const NODE_SERVER_PORT: u16 = 2222;
pub const NODE_PORT: u16 = 30080;
pub const NODE_PORT_LOCAL: u16 = 30081;
pub const NODE_PORT_LOCAL_EMPTY: u16 = 30082;
pub const NODE_PORT_AFFINITY: u16 = 30083;
pub const EXTERNAL_PORT: u16 = 80;
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a test waits for a packet that must be dropped.
pub const DROP_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections tried to see every backend of a random choice at least once.
pub const TRIES: usize = 64;

pub fn unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 10_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's namespaces, cgroup and pin directory, removed on drop.
pub struct World {
    pub id: String,
    pub client: String,
    pub node: String,
    pub remote: String,
    pub local_pod: String,
    pub remote_pod: String,
    pub cgroup: PathBuf,
    pub settings: EbpfSettings,
}

impl World {
    pub fn new() -> Self {
        require_root("network namespaces, bpffs, tc");
        let id = unique();
        let cgroup = cgroup2_mount()
            .expect("cgroup2 mount")
            .join(format!("topoproxy-ns-test-{id}"));
        let world = Self {
            client: format!("tpn-c{id}"),
            node: format!("tpn-n{id}"),
            remote: format!("tpn-r{id}"),
            local_pod: format!("tpn-l{id}"),
            remote_pod: format!("tpn-q{id}"),
            settings: EbpfSettings {
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/topoproxy-ns-test-{id}")),
                cgroup_path: Some(cgroup.clone()),
            },
            cgroup,
            id,
        };
        // Built inside `world` so that a failing step still cleans up what came before.
        std::fs::create_dir(&world.cgroup).expect("create the test cgroup");
        world.build_network();
        world.serve();
        world
    }

    pub fn build_network(&self) {
        let (c, n, r, l, q, id) = (
            &self.client,
            &self.node,
            &self.remote,
            &self.local_pod,
            &self.remote_pod,
            &self.id,
        );
        for ns in [c, n, r, l, q] {
            // No duplicate address detection: addresses are usable at once.
            shell(&format!(
                "{IP} netns add {ns} && {IP} -n {ns} link set lo up && \
                 {IP} netns exec {ns} sysctl -qw net.ipv6.conf.all.accept_dad=0 \
                 net.ipv6.conf.default.accept_dad=0"
            ));
        }
        for ns in [n, r] {
            shell(&format!(
                "{IP} netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 \
                 net.ipv6.conf.all.forwarding=1 \
                 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
            ));
        }
        // Client ↔ node uplink.
        shell(&format!(
            "{IP} -n {c} link add tnc{id} type veth peer name {} netns {n} && \
             {IP} -n {c} addr add {CLIENT}/24 dev tnc{id} && {IP} -n {c} link set tnc{id} up && \
             {IP} -n {n} addr add {NODE}/24 dev {} && {IP} -n {n} link set {} up && \
             {IP} -n {c} route add 10.77.100.0/24 via {NODE} && \
             {IP} -n {c} addr add {CLIENT6}/64 dev tnc{id} nodad && \
             {IP} -n {n} addr add {NODE6}/64 dev {} nodad && \
             {IP} -n {c} route add fd77:100::/64 via {NODE6} && \
             {IP} -n {c} route add 10.244.0.0/16 via {NODE} && \
             {IP} -n {c} route add 10.96.0.0/16 via {NODE} && \
             {IP} -n {c} route add 10.78.0.0/24 via {NODE}",
            self.uplink(),
            self.uplink(),
            self.uplink(),
            self.uplink()
        ));
        // Node ↔ remote node, and the remote pod network behind it.
        shell(&format!(
            "{IP} -n {n} link add {} type veth peer name tnr{id} netns {r} && \
             {IP} -n {n} addr add {NODE_TO_REMOTE}/24 dev {} && {IP} -n {n} link set {} up && \
             {IP} -n {r} addr add {REMOTE_NODE}/24 dev tnr{id} && {IP} -n {r} link set tnr{id} up && \
             {IP} -n {n} route add 10.244.2.0/24 via {REMOTE_NODE} && \
             {IP} -n {r} route add default via {NODE_TO_REMOTE} && \
             {IP} -n {n} addr add {NODE_TO_REMOTE6}/64 dev {} nodad && \
             {IP} -n {r} addr add fd78::2/64 dev tnr{id} nodad && \
             {IP} -n {n} route add fd44:2::/64 via fd78::2 && \
             {IP} -n {r} route add default via {NODE_TO_REMOTE6}",
            self.crosslink(),
            self.crosslink(),
            self.crosslink(),
            self.crosslink()
        ));
        self.pod(n, l, &format!("tnl{id}"), LOCAL_POD, LOCAL_POD6);
        self.pod(r, q, &format!("tnq{id}"), REMOTE_POD, REMOTE_POD6);
    }

    /// The node's device towards the client.
    pub fn uplink(&self) -> String {
        format!("tnn{}", self.id)
    }

    /// The node's device towards the remote node.
    pub fn crosslink(&self) -> String {
        format!("tnx{}", self.id)
    }

    /// A pod namespace behind `host`, Calico style: a /32 (/128), a default route via a
    /// link-local gateway the host side holds, and a host route to the pod's address.
    pub fn pod(&self, host: &str, pod: &str, link: &str, address: &str, address6: &str) {
        shell(&format!(
            "{IP} -n {host} link add {link} type veth peer name eth0 netns {pod} && \
             {IP} -n {pod} addr add {address}/32 dev eth0 && {IP} -n {pod} link set eth0 up && \
             {IP} -n {pod} route add 169.254.1.1 dev eth0 scope link && \
             {IP} -n {pod} route add default via 169.254.1.1 dev eth0 && \
             {IP} -n {host} link set {link} up && \
             {IP} -n {host} addr add 169.254.1.1/32 dev {link} && \
             {IP} -n {host} route add {address}/32 dev {link} && \
             {IP} -n {host} addr add fe80::1/64 dev {link} nodad && \
             {IP} -n {pod} addr add {address6}/128 dev eth0 nodad && \
             {IP} -n {pod} route add default via fe80::1 dev eth0 && \
             {IP} -n {host} route add {address6}/128 dev {link}"
        ));
    }

    /// TCP and UDP servers in each pod, a TCP server on the node address.
    pub fn serve(&self) {
        for (address, address6) in [(LOCAL_POD, LOCAL_POD6), (REMOTE_POD, REMOTE_POD6)] {
            let (pod, name) = if address == LOCAL_POD {
                (&self.local_pod, "local")
            } else {
                (&self.remote_pod, "remote")
            };
            serve_pod(pod, name, address, POD_PORT);
            serve_pod(pod, name, address6, POD_PORT);
        }
        serve_tcp(&self.node, "node", NODE, NODE_SERVER_PORT);
        serve_tcp(&self.node, "node", NODE6, NODE_SERVER_PORT);
    }

    pub fn open(&self) -> EbpfDataplane {
        EbpfDataplane::open(self.settings.clone()).expect("open the eBPF dataplane")
    }

    /// Attaches the tc programs inside the node namespace with the default device choice,
    /// as the agent does (the dataplane's maps are already switched in: a fresh pin dir).
    pub fn attach(
        &self,
        dataplane: EbpfDataplane,
    ) -> (EbpfDataplane, north_south::NorthSouthReport) {
        self.attach_with(dataplane, NorthSouthSettings::default())
    }

    pub fn attach_with(
        &self,
        dataplane: EbpfDataplane,
        settings: NorthSouthSettings,
    ) -> (EbpfDataplane, north_south::NorthSouthReport) {
        within(&self.node, move || {
            let mut dataplane = dataplane;
            let report = dataplane
                .attach_north_south(settings)
                .expect("attach the north-south programs")
                .expect("no map switch pending in a fresh pin directory");
            (dataplane, report)
        })
    }

    pub fn tcp(&self, address: &str, port: u16) -> std::io::Result<(String, String)> {
        let target = SocketAddr::new(address.parse().expect("address"), port);
        within(&self.client, move || tcp_backend_and_peer(target))
    }

    pub fn udp(&self, address: &str, port: u16) -> std::io::Result<(String, String, SocketAddr)> {
        let target = SocketAddr::new(address.parse().expect("address"), port);
        within(&self.client, move || udp_backend_and_peer(target))
    }

    /// The backends (name → peer they saw) answering `TRIES` TCP connections.
    pub fn tcp_backends(&self, address: &str, port: u16) -> BTreeSet<(String, String)> {
        (0..TRIES)
            .map(|_| {
                self.tcp(address, port)
                    .unwrap_or_else(|e| panic!("TCP to {address}:{port}: {e}"))
            })
            .collect()
    }

    /// `(backend, peer it saw)` of [`TRIES`] UDP datagrams to `address:port`, each answer
    /// checked to come back from that frontend.
    pub fn udp_backends(&self, address: &str, port: u16) -> BTreeSet<(String, String)> {
        let frontend = SocketAddr::new(address.parse().expect("frontend address"), port);
        (0..TRIES)
            .map(|_| {
                let (name, peer, from) = self
                    .udp(address, port)
                    .unwrap_or_else(|e| panic!("UDP to {frontend}: {e}"));
                assert_eq!(from, frontend, "the answer's source");
                (name, peer)
            })
            .collect()
    }

    /// The ids of the programs attached to the node's devices through tcx.
    pub fn tcx_program_ids(&self) -> BTreeSet<u32> {
        let devices = [self.uplink(), self.crosslink()];
        within(&self.node, move || {
            let mut ids = BTreeSet::new();
            for device in &devices {
                for (_, attach_type) in north_south::PROGRAMS {
                    if let Ok((_, programs)) =
                        aya::programs::SchedClassifier::query_tcx(device, attach_type)
                    {
                        ids.extend(programs.iter().map(|p| p.id()));
                    }
                }
            }
            ids
        })
    }

    pub fn tcx_programs(&self) -> usize {
        let devices = [self.uplink(), self.crosslink(), format!("tnl{}", self.id)];
        within(&self.node, move || {
            let mut count = 0;
            for device in &devices {
                for (_, attach_type) in north_south::PROGRAMS {
                    if let Ok((_, programs)) =
                        aya::programs::SchedClassifier::query_tcx(device, attach_type)
                    {
                        count += programs.len();
                    }
                }
            }
            count
        })
    }
}

/// The remote node's own dataplane (pins, cgroup, tc programs on its uplink), removed on drop.
pub struct RemoteAgent {
    pub settings: EbpfSettings,
    pub dataplane: Option<EbpfDataplane>,
}

impl World {
    /// Starts a dataplane in the remote node, as its own agent would: tc on its device towards
    /// the node, and its NodePorts (`remote_table`) programmed.
    pub fn remote_agent(&self) -> RemoteAgent {
        let name = format!("topoproxy-ns-test-{}-r", self.id);
        let cgroup = self.cgroup.with_file_name(&name);
        let mut agent = RemoteAgent {
            settings: EbpfSettings {
                pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
                cgroup_path: Some(cgroup.clone()),
            },
            dataplane: None,
        };
        std::fs::create_dir(&cgroup).expect("create the remote node's cgroup");
        let dataplane =
            EbpfDataplane::open(agent.settings.clone()).expect("open the remote dataplane");
        let (mut dataplane, report) = within(&self.remote, move || {
            let mut dataplane = dataplane;
            let report = dataplane
                .attach_north_south(NorthSouthSettings::default())
                .expect("attach the remote node's tc programs")
                .expect("no map switch pending in a fresh pin directory");
            (dataplane, report)
        });
        assert_eq!(report.interfaces, [format!("tnr{}", self.id)]);
        sync(&mut dataplane, &remote_table());
        agent.dataplane = Some(dataplane);
        agent
    }
}

impl Drop for RemoteAgent {
    fn drop(&mut self) {
        drop(self.dataplane.take());
        let _ = cleanup(&self.settings);
        if let Some(cgroup) = &self.settings.cgroup_path {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

/// The remote node's frontends: NodePorts on its address, the remote pod being its local one.
pub fn remote_table() -> ProgrammedTable {
    use Frontend::NodePort;
    use TrafficPolicy::*;
    let frontends: Frontends<3> = [
        (
            REMOTE_NODE,
            NODE_PORT,
            NodePort,
            Cluster,
            None,
            &[LOCAL_POD, REMOTE_POD],
        ),
        (
            REMOTE_NODE,
            NODE_PORT_LOCAL,
            NodePort,
            Local,
            None,
            &[REMOTE_POD],
        ),
        (
            REMOTE_NODE,
            NODE_PORT_LOCAL_EMPTY,
            NodePort,
            Local,
            None,
            &[],
        ),
    ];
    let mut t = ProgrammedTable::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for (address, port, kind, policy, affinity, backends) in frontends {
            service(
                &mut t,
                protocol,
                (address, port),
                kind,
                policy,
                affinity,
                backends,
            );
        }
    }
    t
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = cleanup(&self.settings);
        for ns in [
            &self.client,
            &self.node,
            &self.remote,
            &self.local_pod,
            &self.remote_pod,
        ] {
            let _ = Command::new(IP).args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// TCP (`name peer` then echo) and UDP (`name peer`) servers on `address:port` in `netns`.
pub fn serve_pod(netns: &str, name: &'static str, address: &str, port: u16) {
    serve_tcp(netns, name, address, port);
    let address: IpAddr = address.parse().expect("address");
    let udp = within(netns, move || {
        UdpSocket::bind((address, port)).expect("bind udp")
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
        }
    });
}

pub fn serve_tcp(netns: &str, name: &'static str, address: &str, port: u16) {
    let address: IpAddr = address.parse().expect("address");
    let listener = within(netns, move || {
        TcpListener::bind((address, port)).expect("bind tcp")
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let peer = stream.peer_addr().map(|p| p.ip().to_string());
                let _ = writeln!(stream, "{name} {}", peer.unwrap_or_default());
                let Ok(clone) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(clone);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let _ = stream.write_all(line.as_bytes());
                    line.clear();
                }
            });
        }
    });
}

/// Connects, reads `name peer` (the backend and the client address it saw), checks one echo
/// round trip (the reply path both ways).
pub fn tcp_backend_and_peer(target: SocketAddr) -> std::io::Result<(String, String)> {
    let mut session = TcpSession::connect_within(target, DROP_TIMEOUT, ANSWER_TIMEOUT)?;
    let (name, peer) = name_and_peer(&session.greeting)?;
    let echo = session.exchange("echo-check")?;
    if echo != "echo-check\n" {
        return Err(std::io::Error::other(format!("bad echo {echo:?}")));
    }
    Ok((name, peer))
}

/// One datagram from an unconnected socket; the backend, the client address it saw, and the
/// reply's sender address.
pub fn udp_backend_and_peer(target: SocketAddr) -> std::io::Result<(String, String, SocketAddr)> {
    let (text, from) = udp_exchange(target, b"hello", ANSWER_TIMEOUT)?;
    let (name, peer) = name_and_peer(&text)?;
    Ok((name, peer, from))
}

/// `name peer`, as every server of this world answers.
fn name_and_peer(answer: &str) -> std::io::Result<(String, String)> {
    answer
        .trim()
        .split_once(' ')
        .map(|(name, peer)| (name.to_owned(), peer.to_owned()))
        .ok_or_else(|| std::io::Error::other(format!("bad answer {answer:?}")))
}

pub fn service(
    table: &mut ProgrammedTable,
    protocol: Protocol,
    (address, port): (&str, u16),
    frontend: Frontend,
    traffic_policy: TrafficPolicy,
    persistence_timeout: Option<u32>,
    backends: &[&str],
) {
    let key = VsKey::new(protocol, address.parse().expect("address"), port);
    let destinations = backends
        .iter()
        .map(|b| {
            (
                (b.parse().expect("backend"), POD_PORT),
                DestinationState::active(1),
            )
        })
        .collect();
    table.insert(
        key,
        ProgrammedService {
            config: ServiceConfig {
                scheduler: topoproxy::scheduler::Scheduler::default(),
                persistence_timeout,
                frontend,
                traffic_policy,
                tier_shares: TierShares::default(),
                source_ranges: Default::default(),
            },
            destinations,
        },
    );
}

/// A frontend of the test table: address, port, kind, policy, affinity timeout, backends.
pub type Frontends<const N: usize> = [(
    &'static str,
    u16,
    Frontend,
    TrafficPolicy,
    Option<u32>,
    &'static [&'static str],
); N];

/// The table every test programs: NodePorts (Cluster, Local, Local without a local endpoint,
/// with affinity), an externalIP, a load-balancer IP, UDP, and a ClusterIP the client routes
/// to the node.
pub fn table() -> ProgrammedTable {
    use Frontend::*;
    use TrafficPolicy::*;
    // (frontend address, port, kind, policy, affinity, backends), for TCP and UDP.
    let both_protocols: Frontends<7> = [
        (
            NODE,
            NODE_PORT,
            NodePort,
            Cluster,
            None,
            &[LOCAL_POD, REMOTE_POD],
        ),
        (NODE, NODE_PORT_LOCAL, NodePort, Local, None, &[LOCAL_POD]),
        (NODE, NODE_PORT_LOCAL_EMPTY, NodePort, Local, None, &[]),
        (
            EXTERNAL_IP,
            EXTERNAL_PORT,
            ExternalIP,
            Cluster,
            None,
            &[REMOTE_POD],
        ),
        (
            NODE6,
            NODE_PORT,
            NodePort,
            Cluster,
            None,
            &[LOCAL_POD6, REMOTE_POD6],
        ),
        (NODE6, NODE_PORT_LOCAL, NodePort, Local, None, &[LOCAL_POD6]),
        (
            EXTERNAL_IP6,
            EXTERNAL_PORT,
            ExternalIP,
            Cluster,
            None,
            &[REMOTE_POD6],
        ),
    ];
    let tcp_only: Frontends<3> = [
        (
            LB_IP,
            EXTERNAL_PORT,
            LoadBalancer,
            Cluster,
            None,
            &[LOCAL_POD, REMOTE_POD],
        ),
        (
            NODE,
            NODE_PORT_AFFINITY,
            NodePort,
            Cluster,
            Some(10_800),
            &[LOCAL_POD, REMOTE_POD],
        ),
        (
            CLUSTER_IP,
            EXTERNAL_PORT,
            ClusterIP,
            Cluster,
            None,
            &[LOCAL_POD, REMOTE_POD],
        ),
    ];
    let mut t = ProgrammedTable::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for (address, port, kind, policy, affinity, backends) in both_protocols {
            service(
                &mut t,
                protocol,
                (address, port),
                kind,
                policy,
                affinity,
                backends,
            );
        }
    }
    for (address, port, kind, policy, affinity, backends) in tcp_only {
        service(
            &mut t,
            Protocol::Tcp,
            (address, port),
            kind,
            policy,
            affinity,
            backends,
        );
    }
    t
}

/// Diffs against what the dataplane reads back and applies: the sync loop's path.
pub fn sync(dataplane: &mut EbpfDataplane, desired: &ProgrammedTable) {
    let actual = block_on(dataplane.read()).expect("read");
    let ops = diff(desired, &actual);
    block_on(dataplane.apply(&ops)).expect("apply");
    let after = block_on(dataplane.read()).expect("read back");
    assert_eq!(&after, desired, "the maps read back differ from the plan");
}

pub fn pair(name: &str, peer: &str) -> (String, String) {
    (name.to_owned(), peer.to_owned())
}

/// A world with programs attached and the table programmed.
pub fn programmed() -> (World, EbpfDataplane) {
    let world = World::new();
    let (mut dataplane, report) = world.attach(world.open());
    let expected: BTreeSet<String> = [world.uplink(), world.crosslink()].into();
    assert_eq!(
        report.interfaces.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the default devices are the ones holding node addresses (not the pod's veth)"
    );
    assert_eq!((report.attached, report.replaced), (4, 0));
    sync(&mut dataplane, &table());
    (world, dataplane)
}

/// Round trips of one 16-byte line on `stream`; returns each one's latency.
pub fn round_trips(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    n: usize,
) -> Vec<u64> {
    let mut latencies = Vec::with_capacity(n);
    let mut line = String::new();
    for _ in 0..n {
        let started = std::time::Instant::now();
        stream.write_all(b"0123456789abcde\n").expect("write");
        line.clear();
        reader.read_line(&mut line).expect("read");
        assert_eq!(line.len(), 16, "echo");
        latencies.push(started.elapsed().as_nanos() as u64);
    }
    latencies
}

/// A connection from the client namespace, past the server's greeting.
pub fn session(world: &World, address: &str, port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let target = SocketAddr::new(address.parse().expect("address"), port);
    let stream = within(&world.client, move || {
        TcpStream::connect_timeout(&target, ANSWER_TIMEOUT).expect("connect")
    });
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    (stream, reader)
}

/// `memlock` of a pinned map, from its fdinfo (what the kernel charges for it).
pub fn map_memlock(path: &Path) -> u64 {
    let map = aya::maps::MapData::from_pin(path).expect("open the pinned map");
    let fd = {
        use std::os::fd::AsFd as _;
        map.fd().as_fd().as_raw_fd()
    };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
    info.lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
        .expect("memlock in fdinfo")
}

/// Where the dataplane owner process finds its world: pin dir, cgroup and node namespace,
/// one per line.
pub const OWNER_ENV: &str = "TOPOPROXY_NS_TEST_OWNER";

/// The dataplane's owner as the agent is one: a process of its own (this test binary,
/// re-executed as the ignored `dataplane_owner_process` test) that opens the maps, attaches
/// the tc programs in the node namespace, programs the table, says `ready` and then waits,
/// so a test can SIGKILL it.
pub struct Owner {
    child: std::process::Child,
}

impl Owner {
    pub fn start(world: &World) -> Self {
        let place = format!(
            "{}\n{}\n{}",
            world.settings.pin_dir.display(),
            world.cgroup.display(),
            world.node
        );
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "dataplane_owner_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(OWNER_ENV, place)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the dataplane owner");
        let stdout = child.stdout.take().expect("the owner's stdout");
        // libtest prints `test NAME ... ` before the test's own output, on the same line.
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.ends_with("ready"));
        assert!(ready, "the dataplane owner exited before it was ready");
        Self { child }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// New connections (TCP, with an echo) and datagrams (UDP) to the NodePort and the externalIP
/// from the client namespace, in turn, until stopped; counts answers and failures.
pub struct TrafficLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl TrafficLoop {
    pub fn start(world: &World) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(AtomicU32::new(0));
        let client = world.client.clone();
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                crate::netns::enter(&client);
                let node_port = SocketAddr::new(NODE.parse().expect("ip"), NODE_PORT);
                let external = SocketAddr::new(EXTERNAL_IP.parse().expect("ip"), EXTERNAL_PORT);
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for target in [node_port, external] {
                        let tcp = tcp_backend_and_peer(target).map(|_| ());
                        let udp = udp_backend_and_peer(target).map(|_| ());
                        for (protocol, outcome) in [("TCP", tcp), ("UDP", udp)] {
                            match outcome {
                                Ok(()) => {
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => failures.push(format!("{protocol} {target}: {e}")),
                            }
                        }
                    }
                }
                failures
            })
        };
        Self {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    /// Waits until `more` further requests have been answered.
    pub fn wait_for(&self, more: u32, what: &str) {
        let goal = self.answered.load(Ordering::Relaxed) + more;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.answered.load(Ordering::Relaxed) < goal {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {more} answers within 60 s ({what})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the loop; returns (answered, failures).
    pub fn stop(mut self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .thread
            .take()
            .map(|t| t.join().expect("the traffic loop panicked"))
            .unwrap_or_default();
        (self.answered.load(Ordering::Relaxed), failures)
    }
}

impl Drop for TrafficLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn node_port_reaches_local_and_remote_backends_with_the_right_sources() {
    let (world, _dataplane) = programmed();
    // Local backend: DNAT only, the pod sees the client. Remote: SNAT to the node's address
    // on the link towards it. Each answer came back through the echo, so replies are right.
    assert_eq!(
        world.tcp_backends(NODE, NODE_PORT),
        [pair("local", CLIENT), pair("remote", NODE_TO_REMOTE)].into()
    );
}

pub fn external_ip_reaches_a_remote_backend() {
    let (world, _dataplane) = programmed();
    assert_eq!(
        world.tcp_backends(EXTERNAL_IP, EXTERNAL_PORT),
        [pair("remote", NODE_TO_REMOTE)].into()
    );
}

pub fn load_balancer_ip_reaches_local_and_remote_backends() {
    let (world, _dataplane) = programmed();
    assert_eq!(
        world.tcp_backends(LB_IP, EXTERNAL_PORT),
        [pair("local", CLIENT), pair("remote", NODE_TO_REMOTE)].into()
    );
}

pub fn udp_node_port_and_external_ip_answer_from_the_frontend() {
    let (world, _dataplane) = programmed();
    assert_eq!(
        world.udp_backends(NODE, NODE_PORT),
        [pair("local", CLIENT), pair("remote", NODE_TO_REMOTE)].into()
    );
    let (name, _, from) = world
        .udp(EXTERNAL_IP, EXTERNAL_PORT)
        .expect("UDP to the externalIP");
    assert_eq!(name, "remote");
    assert_eq!(
        from,
        SocketAddr::new(EXTERNAL_IP.parse().expect("ip"), EXTERNAL_PORT)
    );
}

pub fn local_policy_keeps_the_client_address_and_drops_without_a_local_endpoint() {
    let (world, _dataplane) = programmed();
    assert_eq!(
        world.tcp_backends(NODE, NODE_PORT_LOCAL),
        [pair("local", CLIENT)].into()
    );
    let (name, peer, _) = world.udp(NODE, NODE_PORT_LOCAL).expect("UDP, Local");
    assert_eq!((name.as_str(), peer.as_str()), ("local", CLIENT));
    // Dropped, not refused: nothing on the node answers for the NodePort.
    let error = world
        .tcp(NODE, NODE_PORT_LOCAL_EMPTY)
        .expect_err("no local endpoint: no connection");
    assert!(
        matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "expected a drop (timeout), got {error}"
    );
}

pub fn non_service_traffic_to_the_node_is_untouched() {
    let (world, _dataplane) = programmed();
    // Like SSH: a plain server on the node address, and it sees the client as it is.
    assert_eq!(
        world
            .tcp(NODE, NODE_SERVER_PORT)
            .expect("the node's own server"),
        pair("node", CLIENT)
    );
    assert_eq!(
        world
            .tcp(NODE6, NODE_SERVER_PORT)
            .expect("the node's own server, IPv6"),
        pair("node", CLIENT6)
    );
}

/// A ClusterIP routed to the node from outside (Calico BGP, kube-router, a gateway node) is
/// served as kube-proxy serves it, with its masquerade rule: a source outside
/// `--cluster-cidr` (or any, under `--masquerade-all`) is SNATed to a remote backend; a
/// local backend sees the client (docs/parity.md).
pub fn a_cluster_ip_routed_to_the_node_from_outside_is_served_with_kube_proxys_masquerade() {
    let world = World::new();
    let outside = NorthSouthSettings {
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        ..NorthSouthSettings::default()
    };
    let (mut dataplane, _) = world.attach_with(world.open(), outside);
    sync(&mut dataplane, &table());
    let expected: BTreeSet<(String, String)> =
        [pair("local", CLIENT), pair("remote", NODE_TO_REMOTE)].into();
    assert_eq!(world.tcp_backends(CLUSTER_IP, EXTERNAL_PORT), expected);

    // The client inside a cluster CIDR, but `--masquerade-all`: SNATed all the same.
    let all = NorthSouthSettings {
        cluster_cidrs: vec!["10.77.0.0/24".parse().expect("cidr")],
        masquerade_all: true,
        ..NorthSouthSettings::default()
    };
    let (_dataplane, _) = world.attach_with(dataplane, all);
    assert_eq!(world.tcp_backends(CLUSTER_IP, EXTERNAL_PORT), expected);
}

pub fn ipv6_node_port_external_ip_and_local_policy() {
    let (world, _dataplane) = programmed();
    assert_eq!(
        world.tcp_backends(NODE6, NODE_PORT),
        [pair("local", CLIENT6), pair("remote", NODE_TO_REMOTE6)].into()
    );
    assert_eq!(
        world.tcp_backends(EXTERNAL_IP6, EXTERNAL_PORT),
        [pair("remote", NODE_TO_REMOTE6)].into()
    );
    assert_eq!(
        world.tcp_backends(NODE6, NODE_PORT_LOCAL),
        [pair("local", CLIENT6)].into()
    );
    assert_eq!(
        world.udp_backends(NODE6, NODE_PORT),
        [pair("local", CLIENT6), pair("remote", NODE_TO_REMOTE6)].into()
    );
}

pub fn client_ip_affinity_holds_across_connections() {
    let (world, _dataplane) = programmed();
    let backends = world.tcp_backends(NODE, NODE_PORT_AFFINITY);
    assert_eq!(
        backends.len(),
        1,
        "one backend for one client: {backends:?}"
    );
}

pub fn a_restart_swaps_programs_in_place_and_cleanup_leaves_nothing() {
    let (world, dataplane) = programmed();
    let target = SocketAddr::new(NODE.parse().expect("ip"), NODE_PORT);
    // A connection held open across the restart keeps working: its flow is tracked in maps
    // that outlive the programs.
    let held = within(&world.client, move || {
        TcpStream::connect_timeout(&target, ANSWER_TIMEOUT).expect("connect")
    });
    held.set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    let mut reader = BufReader::new(held.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");

    // A new agent: its dataplane opens the pinned maps and swaps its programs in.
    drop(dataplane);
    let (_dataplane, again) = world.attach(world.open());
    assert_eq!((again.attached, again.replaced), (0, 4));
    if !again.netlink {
        assert_eq!(
            world.tcx_programs(),
            4,
            "one program per device and direction"
        );
    }
    (&held).write_all(b"after-restart\n").expect("write");
    let mut echo = String::new();
    reader.read_line(&mut echo).expect("echo after the restart");
    assert_eq!(echo, "after-restart\n");

    // As `topoproxy cleanup` does it, in the node's namespace: netlink filters are not pinned.
    let settings = world.settings.clone();
    let (report, filters) = within(&world.node, move || {
        let filters = north_south::detach_netlink_filters();
        (cleanup(&settings).expect("cleanup"), filters)
    });
    if again.netlink {
        assert_eq!(
            filters, 4,
            "one filter per device and direction: {report:?}"
        );
    } else {
        assert!(report.detached >= 4, "{report:?}");
    }
    assert_eq!(world.tcx_programs(), 0, "nothing left attached");
    assert!(!world.settings.pin_dir.exists(), "nothing left pinned");
    // The node is reachable as before, and the NodePort is no longer translated.
    assert_eq!(
        world
            .tcp(NODE, NODE_SERVER_PORT)
            .expect("the node's own server"),
        pair("node", CLIENT)
    );
    let error = world.tcp(NODE, NODE_PORT).expect_err("no more NodePort");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The node namespace's reserved ports, as the kernel prints them.
fn reserved_ports(world: &World) -> String {
    within(&world.node, || {
        std::fs::read_to_string(RESERVED_PORTS)
            .expect("read ip_local_reserved_ports")
            .trim()
            .to_owned()
    })
}

/// The SNAT range joins what the node reserved, so a widened `ip_local_port_range` never
/// hands one of its ports to a node socket; cleanup gives back only the range.
pub fn the_snat_range_is_kept_from_the_nodes_ephemeral_ports_until_cleanup() {
    let world = World::new();
    within(&world.node, || {
        std::fs::write(RESERVED_PORTS, "8080\n").expect("reserve the node's own port");
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535\n")
            .expect("widen the ephemeral range");
    });
    let (dataplane, _) = world.attach(world.open());
    let (min, max) = north_south::NorthSouthSettings::default().snat_ports;
    assert_eq!(reserved_ports(&world), format!("8080,{min}-{max}"));

    // The SNAT range is 7 % of the widened one: without the reservation, 500 ephemeral
    // binds all missing it has a chance of 0.93^500.
    let in_range = within(&world.node, move || {
        let sockets: Vec<UdpSocket> = (0..500)
            .map(|_| UdpSocket::bind((NODE, 0)).expect("ephemeral bind"))
            .collect();
        sockets
            .iter()
            .map(|socket| socket.local_addr().expect("local address").port())
            .filter(|port| (min..=max).contains(port))
            .collect::<Vec<u16>>()
    });
    assert_eq!(
        in_range,
        Vec::<u16>::new(),
        "ephemeral ports in the SNAT range"
    );

    drop(dataplane);
    let settings = world.settings.clone();
    let report = within(&world.node, move || cleanup(&settings).expect("cleanup"));
    assert_eq!(report.released_snat_ports, Some((min, max)));
    assert_eq!(
        reserved_ports(&world),
        "8080",
        "the node's own reservation stays"
    );
}

/// The body of the `dataplane_owner_process` helper test (see [`Owner`]).
pub fn dataplane_owner_main() {
    let Ok(place) = std::env::var(OWNER_ENV) else {
        crate::harness::helper("dataplane_owner_process");
        return;
    };
    let mut lines = place.lines();
    let (Some(pin_dir), Some(cgroup), Some(node)) = (lines.next(), lines.next(), lines.next())
    else {
        panic!("{OWNER_ENV} needs pin dir, cgroup and node namespace");
    };
    let settings = EbpfSettings {
        pin_dir: PathBuf::from(pin_dir),
        cgroup_path: Some(PathBuf::from(cgroup)),
    };
    let mut dataplane = EbpfDataplane::open(settings).expect("open the eBPF dataplane");
    sync(&mut dataplane, &table());
    let dataplane = within(node, move || {
        let mut dataplane = dataplane;
        dataplane
            .attach_north_south(NorthSouthSettings::default())
            .expect("attach the north-south programs");
        dataplane
    });
    println!("ready");
    // Until killed (or the test's end closes stdin).
    let _ = std::io::stdin().lines().count();
    drop(dataplane);
}

pub fn killing_the_owner_with_sigkill_and_starting_another_loses_no_request() {
    let world = World::new();
    let first = Owner::start(&world);
    // Below 6.6 the programs are netlink filters, which tcx queries do not see.
    let tcx = world.tcx_programs() > 0;
    let programs_before = world.tcx_program_ids();
    if tcx {
        assert_eq!(
            world.tcx_programs(),
            4,
            "one program per device and direction"
        );
        assert_eq!(
            programs_before.len(),
            2,
            "the ingress and the egress program"
        );
    }
    let traffic = TrafficLoop::start(&world);
    traffic.wait_for(200, "before the kill");
    first.kill9();
    // No process holds the dataplane now: the pinned links, programs and maps serve on.
    traffic.wait_for(200, "while no owner runs");
    let second = Owner::start(&world);
    traffic.wait_for(200, "after the new owner took over");
    let (answered, failures) = traffic.stop();
    let programs_after = world.tcx_program_ids();
    let attached_after = world.tcx_programs();
    drop(second);
    eprintln!(
        "kill -9 under a loop: {answered} requests answered, {} failed; tc programs {:?} → {:?}",
        failures.len(),
        programs_before,
        programs_after
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    if tcx {
        assert_eq!(attached_after, 4, "one program per device and direction");
        assert!(
            programs_after.is_disjoint(&programs_before),
            "the new owner's programs replaced the old ones"
        );
    }
}

/// Binds a socket of `kind` to `local` with `SO_REUSEADDR`, so two sockets can share one
/// source port towards different destinations.
fn bound_to(local: SocketAddr, kind: socket2::Type) -> socket2::Socket {
    let protocol = if kind == socket2::Type::STREAM {
        socket2::Protocol::TCP
    } else {
        socket2::Protocol::UDP
    };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, kind, Some(protocol)).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket.bind(&local.into()).expect("bind the client port");
    socket
}

/// A TCP connection from `local` to `target`, past the server's greeting (`name peer`).
fn connect_from(
    local: SocketAddr,
    target: SocketAddr,
) -> (TcpStream, BufReader<TcpStream>, String) {
    let socket = bound_to(local, socket2::Type::STREAM);
    socket
        .connect_timeout(&target.into(), ANSWER_TIMEOUT)
        .expect("connect from the shared port");
    let stream = TcpStream::from(socket);
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    (stream, reader, greeting.trim().to_owned())
}

/// One echo round trip on a held connection.
fn echo(stream: &TcpStream, reader: &mut BufReader<TcpStream>, text: &str) -> String {
    let mut stream = stream;
    stream
        .write_all(format!("{text}\n").as_bytes())
        .expect("write");
    let mut line = String::new();
    reader.read_line(&mut line).expect("echo");
    line.trim().to_owned()
}

pub fn one_client_port_through_two_frontends_to_one_backend_keeps_both_flows() {
    let (world, mut dataplane) = programmed();
    // A second frontend whose only backend is the local pod, as NODE_PORT_LOCAL's is.
    let mut desired = table();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        service(
            &mut desired,
            protocol,
            (EXTERNAL_IP, NODE_PORT_LOCAL),
            Frontend::ExternalIP,
            TrafficPolicy::Local,
            None,
            &[LOCAL_POD],
        );
    }
    sync(&mut dataplane, &desired);
    let node_port = SocketAddr::new(NODE.parse().expect("ip"), NODE_PORT_LOCAL);
    let external = SocketAddr::new(EXTERNAL_IP.parse().expect("ip"), NODE_PORT_LOCAL);
    let local = SocketAddr::new(
        CLIENT.parse().expect("ip"),
        40_000 + (std::process::id() % 20_000) as u16,
    );
    within(&world.client, move || {
        // Both flows would reach the pod as CLIENT:port -> pod:8080; the second must get
        // another source port, and both keep working side by side.
        let (first, mut first_reader, first_greeting) = connect_from(local, node_port);
        let (second, mut second_reader, second_greeting) = connect_from(local, external);
        assert_eq!(first_greeting, format!("local {CLIENT}"));
        assert_eq!(
            second_greeting,
            format!("local {CLIENT}"),
            "the client's address stays"
        );
        for round in 0..3 {
            assert_eq!(
                echo(&first, &mut first_reader, &format!("first-{round}")),
                format!("first-{round}")
            );
            assert_eq!(
                echo(&second, &mut second_reader, &format!("second-{round}")),
                format!("second-{round}")
            );
        }

        // UDP from one unconnected socket: every reply comes from the frontend asked.
        let udp = UdpSocket::from(bound_to(local, socket2::Type::DGRAM));
        udp.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 512];
        for target in [node_port, external, node_port, external] {
            udp.send_to(b"hello", target).expect("send");
            let (len, from) = udp.recv_from(&mut buf).expect("a reply");
            assert_eq!(from, target, "the reply shows the frontend that was asked");
            assert_eq!(&buf[..len], format!("local {CLIENT}").as_bytes());
        }
    });
}

pub fn a_changed_device_address_becomes_the_snat_source_after_the_next_sync() {
    let (world, dataplane) = programmed();
    assert_eq!(
        world.tcp_backends(EXTERNAL_IP, EXTERNAL_PORT),
        [pair("remote", NODE_TO_REMOTE)].into()
    );
    // The node's address towards the remote node moves (as on a DHCP renewal).
    let (n, link) = (&world.node, world.crosslink());
    shell(&format!(
        "{IP} netns exec {n} sysctl -qw net.ipv4.conf.{link}.promote_secondaries=1 && \
         {IP} -n {n} addr add 10.78.0.3/24 dev {link} && \
         {IP} -n {n} addr del {NODE_TO_REMOTE}/24 dev {link} && \
         {IP} -n {n} route replace 10.244.2.0/24 via 10.78.0.2"
    ));
    // After a sync the dataplane reads the devices again, in the agent's namespace.
    let _dataplane = within(&world.node, move || {
        let mut dataplane = dataplane;
        block_on(dataplane.synced()).expect("the sync's end");
        dataplane
    });
    assert_eq!(
        world.tcp_backends(EXTERNAL_IP, EXTERNAL_PORT),
        [pair("remote", "10.78.0.3")].into(),
        "the remote pod sees the new address as the source"
    );
}

pub fn drops_are_logged_with_the_service_once_switched_on() {
    capture_logs();
    let world = World::new();
    // One SNAT port: a second flow to the same remote backend finds none free.
    let settings = NorthSouthSettings {
        snat_ports: (61_000, 61_000),
        ..NorthSouthSettings::default()
    };
    let (mut dataplane, _) = world.attach_with(world.open(), settings);
    // A NodePort whose only backend is in a farther tier: every flow is a fallback.
    let mut desired = table();
    let fallback = (NODE, NODE_PORT_AFFINITY + 1);
    service(
        &mut desired,
        Protocol::Tcp,
        fallback,
        Frontend::NodePort,
        TrafficPolicy::Cluster,
        None,
        &[LOCAL_POD],
    );
    for destination in desired
        .get_mut(&VsKey::new(
            Protocol::Tcp,
            NODE.parse().expect("ip"),
            fallback.1,
        ))
        .expect("the fallback NodePort")
        .destinations
        .values_mut()
    {
        destination.tier = 1;
    }
    sync(&mut dataplane, &desired);
    let tag = format!("ns-diag-{}", world.id);
    let names = tag.clone();
    dataplane
        .start_datapath_log(std::sync::Arc::new(move |key: &VsKey| {
            Some(format!("{names}/port-{}", key.port))
        }))
        .expect("start the datapath log readers");
    dataplane
        .set_datapath_log(topoproxy::dataplane::ebpf::DatapathLog {
            events: topoproxy_common::log_events::ALL,
            per_second: 100,
        })
        .expect("switch the datapath log on");

    world
        .tcp(NODE, NODE_PORT_LOCAL_EMPTY)
        .expect_err("no local endpoint: dropped");
    let dropped = wait_for_log_lines(&[tag.as_str(), "etp_local_drop"], 1);
    assert!(
        dropped[0].contains(&format!("port-{NODE_PORT_LOCAL_EMPTY}")),
        "{dropped:?}"
    );

    let target = SocketAddr::new(EXTERNAL_IP.parse().expect("ip"), EXTERNAL_PORT);
    let _held = within(&world.client, move || {
        TcpStream::connect_timeout(&target, ANSWER_TIMEOUT).expect("the first flow takes the port")
    });
    world
        .tcp(EXTERNAL_IP, EXTERNAL_PORT)
        .expect_err("no SNAT port left for a second flow");
    assert_eq!(
        world
            .tcp(fallback.0, fallback.1)
            .expect("served from tier 1")
            .0,
        "local"
    );
    let fell_back = wait_for_log_lines(&[tag.as_str(), "tier_fallback"], 1);
    assert!(fell_back[0].contains("tier=1"), "{fell_back:?}");

    let exhausted = wait_for_log_lines(&[tag.as_str(), "snat_exhausted"], 1);
    assert!(
        exhausted[0].contains(&format!("port-{EXTERNAL_PORT}")),
        "{exhausted:?}"
    );
}

pub fn two_nodes_balance_their_own_node_ports_and_answer_through_themselves() {
    let (world, _dataplane) = programmed();
    let _remote = world.remote_agent();
    // Through the remote node: its local pod sees the client, the pod on the other node sees
    // the remote node's address (SNAT there), and every answer comes back from the frontend
    // asked, so through the remote node.
    assert_eq!(
        world.tcp_backends(REMOTE_NODE, NODE_PORT),
        [pair("remote", CLIENT), pair("local", REMOTE_NODE)].into()
    );
    assert_eq!(
        world.udp_backends(REMOTE_NODE, NODE_PORT),
        [pair("remote", CLIENT), pair("local", REMOTE_NODE)].into()
    );
    // Through the node, as before, while the remote node's programs see the SNATed legs
    // pass and leave them alone.
    assert_eq!(
        world.tcp_backends(NODE, NODE_PORT),
        [pair("local", CLIENT), pair("remote", NODE_TO_REMOTE)].into()
    );
    // Local policy on each node: its own pod only, the client's address kept.
    assert_eq!(
        world.tcp_backends(REMOTE_NODE, NODE_PORT_LOCAL),
        [pair("remote", CLIENT)].into()
    );
    assert_eq!(
        world.tcp_backends(NODE, NODE_PORT_LOCAL),
        [pair("local", CLIENT)].into()
    );
    let error = world
        .tcp(REMOTE_NODE, NODE_PORT_LOCAL_EMPTY)
        .expect_err("no local endpoint on the remote node: no connection");
    assert!(
        matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "expected a drop (timeout), got {error}"
    );
}
