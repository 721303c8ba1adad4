//! topoproxy's nftables table against the host kernel, inside network namespaces this test
//! creates: replace/update/read round trips, and real traffic showing that the reject rule
//! and the masquerade rules do what kube-proxy's IPVS mode does.
//!
//! The host has no IPVS, so where IPVS would translate a VIP, a plain nft DNAT (at `dstnat`,
//! after our marking chains, as IPVS is) stands in for it. Needs root and `nft`; fails
//! (does not skip) without them.

#[path = "support/host.rs"]
mod host;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;
#[path = "support/traffic.rs"]
mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use netns::IP;
use process::{sh, sh_fed, sh_quiet};
use proptest::prelude::*;
use topoproxy::dataplane::ipvs::nft::{
    find_nft, ListedTable, LocalInterface, Nft, NftError, NftSettings, NftState,
};
use topoproxy::model::{IpFamily, Protocol};
use topoproxy::table::{Frontend, SourceRanges, TrafficPolicy, VsKey};
use traffic::{udp_exchange_connected, TcpSession};

const TIMEOUT: Duration = Duration::from_secs(2);

fn require_root_and_nft() -> std::path::PathBuf {
    host::require_root("nftables");
    find_nft().expect("host_nft needs nft (apt-get install -y nftables)")
}

/// A network namespace, deleted on drop (its veth ends go with it).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tpnft-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        sh(IP, &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NS args...`
    fn ip(&self, args: &[&str]) {
        netns::ip_in(&self.name, args);
    }

    /// nft on this namespace's tables.
    fn nft(&self, nft: &std::path::Path) -> Nft {
        Nft::in_namespace(nft, self.path())
    }

    /// Runs an nft script in this namespace (for the test's own stand-in tables).
    fn nft_script(&self, nft: &std::path::Path, script: &str) {
        let nft = nft.to_str().expect("a UTF-8 path to nft");
        sh_fed(IP, &["netns", "exec", &self.name, nft, "-f", "-"], script);
    }

    /// Runs `f` on a thread that joined this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::within(&self.name, f)
    }

    /// Connects over a veth pair: `here` in this namespace, `there` in `other`.
    fn link(&self, other: &Netns, here: (&str, &str), there: (&str, &str)) {
        self.ip(&[
            "link",
            "add",
            here.0,
            "type",
            "veth",
            "peer",
            "name",
            there.0,
            "netns",
            &other.name,
        ]);
        self.ip(&["addr", "add", here.1, "dev", here.0]);
        self.ip(&["link", "set", here.0, "up"]);
        other.ip(&["addr", "add", there.1, "dev", there.0]);
        other.ip(&["link", "set", there.0, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        sh_quiet(IP, &["netns", "del", &self.name]);
    }
}

/// Servers in a namespace: each TCP connection gets its peer address on a line, then an
/// echo; each UDP datagram gets the sender's address back. Stopped and joined on drop, so
/// no thread keeps a deleted namespace alive.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns, tcp: &[&str], udp: &[&str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in tcp {
            let (path, stop, addr) = (ns.path(), stop.clone(), addr.to_string());
            let (ready_tx, ready) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                netns::enter(&path);
                let listener = TcpListener::bind(&addr).expect("bind tcp");
                listener.set_nonblocking(true).expect("nonblocking");
                ready_tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let stop = stop.clone();
                            std::thread::spawn(move || serve(stream, peer, &stop));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => panic!("accept on {addr}: {e}"),
                    }
                }
            }));
            ready.recv().expect("listener ready");
        }
        for addr in udp {
            let (path, stop, addr) = (ns.path(), stop.clone(), addr.to_string());
            let (ready_tx, ready) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                netns::enter(&path);
                let socket = UdpSocket::bind(&addr).expect("bind udp");
                socket
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(peer.ip().to_string().as_bytes(), peer);
                    }
                }
            }));
            ready.recv().expect("listener ready");
        }
        Self { stop, threads }
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    if writeln!(stream, "{}", peer.ip()).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// How the server at `addr` saw us (its greeting), or the error kind of the attempt.
fn seen_as(addr: &str) -> Result<String, ErrorKind> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    TcpSession::connect(addr)
        .map(|session| session.greeting)
        .map_err(|e| e.kind())
}

/// A UDP exchange from a connected socket: the address the server saw, or the error kind.
fn udp_seen_as(addr: &str) -> Result<String, ErrorKind> {
    let addr: SocketAddr = addr.parse().expect("socket address");
    udp_exchange_connected(addr, b"hi", TIMEOUT).map_err(|e| e.kind())
}

fn key(protocol: Protocol, address: &str, port: u16) -> VsKey {
    VsKey::new(protocol, address.parse().expect("address"), port)
}

fn state(
    services: &[(VsKey, Frontend, TrafficPolicy)],
    destinations: &[(VsKey, &str, u16)],
) -> NftState {
    NftState {
        services: services
            .iter()
            .map(|(key, frontend, policy)| (*key, (*frontend, *policy)))
            .collect(),
        destinations: destinations
            .iter()
            .map(|(key, dest, port)| (*key, dest.parse().expect("address"), *port))
            .collect(),
        ..NftState::default()
    }
}

/// What `Nft::read` gives back for `state`: its services, and its destinations only as the
/// hairpin elements derived from them.
fn recorded(state: &NftState) -> ListedTable {
    ListedTable {
        state: NftState {
            services: state.services.clone(),
            destinations: Default::default(),
            source_ranges: state.source_ranges.clone(),
            node_addresses: state.node_addresses.clone(),
        },
        hairpins: state
            .destinations
            .iter()
            .map(|(key, dest, port)| (*dest, key.protocol, *port))
            .collect(),
    }
}

fn small_state() -> NftState {
    let dns = key(Protocol::Udp, "10.96.0.10", 53);
    let dns6 = key(Protocol::Tcp, "fd00:96::a", 53);
    let lb = key(Protocol::Sctp, "192.0.2.10", 443);
    let np = key(Protocol::Tcp, "198.51.100.7", 30443);
    state(
        &[
            (dns, Frontend::ClusterIP, TrafficPolicy::Cluster),
            (dns6, Frontend::ClusterIP, TrafficPolicy::Local),
            (lb, Frontend::LoadBalancer, TrafficPolicy::Local),
            (np, Frontend::NodePort, TrafficPolicy::Cluster),
        ],
        &[
            (dns, "10.244.1.5", 5353),
            (dns6, "fd00:244::5", 5353),
            (lb, "10.244.1.5", 8443),
            (np, "10.244.1.5", 8443),
        ],
    )
}

#[test]
fn replace_update_read_delete_round_trip() {
    let nft_path = require_root_and_nft();
    let ns = Netns::new();
    let mut nft = ns.nft(&nft_path);

    assert_eq!(nft.read().expect("read"), None, "fresh namespace");
    assert!(!nft.exists().expect("exists"), "fresh namespace");
    nft.delete().expect("deleting a missing table is fine");

    let settings = NftSettings {
        masquerade_all: false,
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:244::/56".parse().expect("cidr"),
        ],
        local_interface: None,
    };
    let first = small_state();
    nft.replace(&settings, &first).expect("replace");
    assert!(nft.exists().expect("exists"));
    assert_eq!(nft.read().expect("read"), Some(recorded(&first)));
    nft.replace(&settings, &first)
        .expect("replace is idempotent");
    assert_eq!(nft.read().expect("read"), Some(recorded(&first)));

    // An endpoint change, a policy change, a new service and a removed one.
    let mut second = first.clone();
    let dns = key(Protocol::Udp, "10.96.0.10", 53);
    let lb = key(Protocol::Sctp, "192.0.2.10", 443);
    let ext = key(Protocol::Tcp, "fd00:96::e", 80);
    second
        .destinations
        .insert((dns, "10.244.2.9".parse().expect("address"), 5353));
    second
        .services
        .insert(lb, (Frontend::LoadBalancer, TrafficPolicy::Cluster));
    second
        .services
        .insert(ext, (Frontend::ExternalIP, TrafficPolicy::Local));
    second
        .destinations
        .insert((ext, "fd00:244::7".parse().expect("address"), 8080));
    let np = key(Protocol::Tcp, "198.51.100.7", 30443);
    second.services.remove(&np);
    second.destinations.retain(|(key, _, _)| *key != np);
    nft.update(&first, &second).expect("update");
    assert_eq!(nft.read().expect("read"), Some(recorded(&second)));
    nft.update(&second, &second).expect("a no-op update");

    // A stale `from` makes the transaction fail as a whole: nothing changes.
    let error = nft
        .update(&first, &NftState::default())
        .expect_err("stale from");
    assert!(matches!(error, NftError::Failed { .. }), "{error}");
    assert_eq!(nft.read().expect("read"), Some(recorded(&second)));

    // Every settings variant loads, and settings never leak into the state.
    for settings in [
        NftSettings::default(),
        NftSettings {
            masquerade_all: true,
            cluster_cidrs: vec![],
            local_interface: None,
        },
        NftSettings {
            masquerade_all: false,
            cluster_cidrs: vec![
                "10.244.3.0/16".parse().expect("cidr"),
                "10.0.0.0/8".parse().expect("cidr"),
            ],
            local_interface: None,
        },
    ] {
        nft.replace(&settings, &second).expect("replace");
        assert_eq!(nft.read().expect("read"), Some(recorded(&second)));
    }

    nft.delete().expect("delete");
    assert_eq!(nft.read().expect("read"), None);
    assert!(!nft.exists().expect("exists"));
    nft.delete().expect("delete again");
}

#[test]
fn exists_names_only_the_inet_topoproxy_table() {
    let nft_path = require_root_and_nft();
    let ns = Netns::new();
    let mut nft = ns.nft(&nft_path);
    // Tables of the same name in another family, or of a longer name, are not ours.
    ns.nft_script(
        &nft_path,
        "add table ip topoproxy\nadd table inet topoproxy2\nadd table inet topoprox\n",
    );
    assert!(!nft.exists().expect("exists"));
    nft.replace(&NftSettings::default(), &small_state())
        .expect("replace");
    assert!(nft.exists().expect("exists"));
    nft.delete().expect("delete");
    assert!(!nft.exists().expect("exists"));
}

#[test]
fn a_missing_nft_is_a_clear_error() {
    let mut nft = Nft::with_command("/nonexistent/nft", Vec::<String>::new());
    let error = nft.read().expect_err("no such program");
    assert!(matches!(error, NftError::Spawn { .. }), "{error}");
}

fn arb_state() -> impl Strategy<Value = NftState> {
    let key = (
        prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ],
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ],
        any::<u16>(),
    )
        .prop_map(|(protocol, address, port)| VsKey::new(protocol, address, port));
    let role = (
        prop_oneof![
            Just(Frontend::ClusterIP),
            Just(Frontend::ExternalIP),
            Just(Frontend::LoadBalancer),
            Just(Frontend::NodePort),
        ],
        prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)],
    );
    (
        proptest::collection::btree_map(key, role, 0..16),
        proptest::collection::vec((any::<usize>(), any::<u32>(), any::<u16>()), 0..24),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(
            |(services, picks, seed): (BTreeMap<VsKey, _>, Vec<_>, Vec<u8>)| {
                let keys: Vec<VsKey> = services.keys().copied().collect();
                let destinations: BTreeSet<_> = picks
                    .into_iter()
                    .filter(|_| !keys.is_empty())
                    .map(|(i, host, port)| {
                        let key = keys[i % keys.len()];
                        let dest = match key.address {
                            IpAddr::V4(_) => IpAddr::from(host.to_be_bytes()),
                            IpAddr::V6(_) => {
                                IpAddr::from(Ipv6Addr::from(u128::from(host) | 0xfd00 << 112))
                            }
                        };
                        (key, dest, port)
                    })
                    .collect();
                let source_ranges = firewall_of(&services, &seed);
                NftState {
                    services,
                    destinations,
                    source_ranges,
                    node_addresses: seed.iter().map(|b| IpAddr::from([192, 0, 2, *b])).collect(),
                }
            },
        )
}

/// Source ranges for the load-balancer keys `seed` picks, nested and disjoint prefixes alike.
fn firewall_of(
    services: &BTreeMap<VsKey, (Frontend, TrafficPolicy)>,
    seed: &[u8],
) -> BTreeMap<VsKey, SourceRanges> {
    let mut ranges = BTreeMap::new();
    for ((key, (frontend, _)), byte) in services.iter().zip(seed.iter().cycle()) {
        if *frontend != Frontend::LoadBalancer || byte.is_multiple_of(3) {
            continue;
        }
        let nets: Vec<ipnetwork::IpNetwork> = (0..1 + byte % 4)
            .map(|n| {
                let prefix = 8 + (byte.wrapping_add(n * 5) % 20);
                let address = match key.address {
                    IpAddr::V4(_) => IpAddr::from([10, n % 2, *byte, 7]),
                    IpAddr::V6(_) => {
                        IpAddr::from([0xfd00, u16::from(n % 2), u16::from(*byte), 0, 0, 0, 0, 7])
                    }
                };
                ipnetwork::IpNetwork::new(
                    address,
                    if key.family == IpFamily::V4 {
                        prefix
                    } else {
                        prefix + 40
                    },
                )
                .expect("prefix")
            })
            .collect();
        let mut planned = SourceRanges::for_frontend(&nets, key.family, None);
        planned.from_node = !byte.is_multiple_of(2);
        if !planned.is_open() {
            ranges.insert(*key, planned);
        }
    }
    ranges
}

#[test]
fn random_states_round_trip_through_the_kernel() {
    let nft_path = require_root_and_nft();
    let ns = Netns::new();
    let nft = ns.nft(&nft_path);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    runner
        .run(&(arb_state(), arb_state()), |(a, b)| {
            let mut nft = nft.clone();
            nft.replace(&NftSettings::default(), &a).expect("replace");
            prop_assert_eq!(nft.read().expect("read"), Some(recorded(&a)));
            nft.update(&a, &b).expect("update");
            prop_assert_eq!(nft.read().expect("read"), Some(recorded(&b)));
            Ok(())
        })
        .expect("round trips");
}

/// Node N with VIP 10.96.0.10 on `lo` and node address 10.30.0.1 towards client C.
#[test]
fn new_connections_to_a_vip_on_other_ports_are_rejected() {
    let nft_path = require_root_and_nft();
    let node = Netns::new();
    let client = Netns::new();
    node.link(&client, ("n0", "10.30.0.1/24"), ("c0", "10.30.0.2/24"));
    node.ip(&["addr", "add", "10.96.0.10/32", "dev", "lo"]);
    client.ip(&["route", "add", "10.96.0.0/16", "via", "10.30.0.1"]);
    // Something listens on every port we try, so a refusal can only come from the table.
    let _servers = Servers::start(
        &node,
        &["0.0.0.0:80", "0.0.0.0:9999", "0.0.0.0:30080"],
        // Bound to the VIP so replies come from it (a wildcard UDP socket would answer from
        // the veth address, which the client's connected socket ignores).
        &["10.96.0.10:53", "10.96.0.10:9999"],
    );

    // A node always tracks connections already (IPVS, CNI and kubelet rules need conntrack);
    // in a fresh namespace nothing does yet, and a connection first seen mid-stream would
    // count as new. Start tracking before opening the connection that must survive.
    node.nft_script(
        &nft_path,
        "table inet node-conntrack {\n chain input {\n type filter hook input priority 10; policy accept;\n ct state established counter\n }\n}\n",
    );
    // Before the table: everything answers. Keep one connection to a non-service port.
    let mut established = client
        .run(|| TcpSession::connect("10.96.0.10:9999".parse().expect("address")))
        .expect("connect before the table");

    let http = key(Protocol::Tcp, "10.96.0.10", 80);
    let dns = key(Protocol::Udp, "10.96.0.10", 53);
    let nodeport = key(Protocol::Tcp, "10.30.0.1", 30080);
    // An ExternalIP that is the node's own address: the NodePort on it says so.
    let external = key(Protocol::Tcp, "10.30.0.1", 8443);
    let services = [
        (http, Frontend::ClusterIP, TrafficPolicy::Cluster),
        (dns, Frontend::ClusterIP, TrafficPolicy::Local),
        (nodeport, Frontend::NodePort, TrafficPolicy::Cluster),
        (external, Frontend::ExternalIP, TrafficPolicy::Cluster),
    ];
    let first = state(&services, &[]);
    let mut nft = node.nft(&nft_path);
    nft.replace(&NftSettings::default(), &first)
        .expect("replace");

    client.run(|| {
        assert_eq!(
            seen_as("10.96.0.10:80"),
            Ok("10.30.0.2".into()),
            "service port"
        );
        assert_eq!(
            udp_seen_as("10.96.0.10:53"),
            Ok("10.30.0.2".into()),
            "udp service port"
        );
        assert_eq!(
            seen_as("10.96.0.10:9999"),
            Err(ErrorKind::ConnectionRefused)
        );
        assert_eq!(
            udp_seen_as("10.96.0.10:9999"),
            Err(ErrorKind::ConnectionRefused)
        );
        // Node addresses are never rejected, NodePort or not.
        assert_eq!(seen_as("10.30.0.1:9999"), Ok("10.30.0.2".into()));
        assert_eq!(seen_as("10.30.0.1:30080"), Ok("10.30.0.2".into()));
    });
    // Established traffic is untouched.
    assert_eq!(
        established.exchange("still here").expect("echo").trim(),
        "still here"
    );
    // The node's own connections to the VIP (output, then input via lo) too.
    node.run(|| {
        assert_eq!(
            seen_as("10.96.0.10:9999"),
            Err(ErrorKind::ConnectionRefused)
        );
        assert!(seen_as("10.96.0.10:80").is_ok());
    });

    // Updates move ports in and out of the allowed list.
    let extra = key(Protocol::Tcp, "10.96.0.10", 9999);
    let second = state(
        &[
            (extra, Frontend::ClusterIP, TrafficPolicy::Cluster),
            (dns, Frontend::ClusterIP, TrafficPolicy::Local),
            (nodeport, Frontend::NodePort, TrafficPolicy::Cluster),
        ],
        &[],
    );
    nft.update(&first, &second).expect("update");
    client.run(|| {
        assert_eq!(seen_as("10.96.0.10:9999"), Ok("10.30.0.2".into()));
        assert_eq!(seen_as("10.96.0.10:80"), Err(ErrorKind::ConnectionRefused));
    });

    // The last service on the VIP gone: the address is not ours any more.
    let third = state(
        &[(nodeport, Frontend::NodePort, TrafficPolicy::Cluster)],
        &[],
    );
    nft.update(&second, &third).expect("update");
    client.run(|| assert_eq!(seen_as("10.96.0.10:80"), Ok("10.30.0.2".into())));

    nft.replace(&NftSettings::default(), &first)
        .expect("replace");
    nft.delete().expect("delete");
    client.run(|| assert_eq!(seen_as("10.96.0.10:9999"), Ok("10.30.0.2".into())));
    assert_eq!(established.exchange("after").expect("echo").trim(), "after");
}

/// Client C (10.10.0.2, "a pod" when 10.10.0.0/24 is a cluster CIDR) — router R — backend B
/// (10.20.0.2:8080). R holds our table and a DNAT standing in for IPVS; B reports the
/// source address it sees: 10.20.0.1 when R masqueraded, 10.10.0.2 when it did not.
#[test]
fn masquerade_follows_frontend_policy_and_settings() {
    let nft_path = require_root_and_nft();
    let router = Netns::new();
    let client = Netns::new();
    let backend = Netns::new();
    router.link(&client, ("r0", "10.10.0.1/24"), ("c0", "10.10.0.2/24"));
    router.link(&backend, ("r1", "10.20.0.1/24"), ("b0", "10.20.0.2/24"));
    client.ip(&["route", "add", "default", "via", "10.10.0.1"]);
    backend.ip(&["route", "add", "default", "via", "10.20.0.1"]);
    router.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward"));
    let _servers = Servers::start(&backend, &["0.0.0.0:8080"], &[]);

    let vs = [
        (
            "cluster-ip",
            "10.96.0.10",
            80,
            Frontend::ClusterIP,
            TrafficPolicy::Cluster,
        ),
        (
            "lb-cluster",
            "192.0.2.10",
            80,
            Frontend::LoadBalancer,
            TrafficPolicy::Cluster,
        ),
        (
            "lb-local",
            "192.0.2.11",
            80,
            Frontend::LoadBalancer,
            TrafficPolicy::Local,
        ),
        (
            "ext-cluster",
            "192.0.2.12",
            80,
            Frontend::ExternalIP,
            TrafficPolicy::Cluster,
        ),
        (
            "ext-local",
            "192.0.2.13",
            80,
            Frontend::ExternalIP,
            TrafficPolicy::Local,
        ),
        (
            "np-cluster",
            "10.10.0.1",
            30080,
            Frontend::NodePort,
            TrafficPolicy::Cluster,
        ),
        (
            "np-local",
            "10.10.0.1",
            30081,
            Frontend::NodePort,
            TrafficPolicy::Local,
        ),
    ];
    // The stand-in for IPVS: translate every virtual service to the backend at dstnat,
    // after our marking chain (priority -110), as IPVS translates after it too.
    let dnat: String = vs
        .iter()
        .map(|(_, addr, port, _, _)| {
            format!("ip daddr {addr} tcp dport {port} dnat to 10.20.0.2:8080\n")
        })
        .collect();
    router.nft_script(
        &nft_path,
        &format!(
            "table ip ipvs-standin {{\n chain pre {{\n type nat hook prerouting priority dstnat; policy accept;\n{dnat} }}\n}}\n"
        ),
    );

    let keys: Vec<(VsKey, Frontend, TrafficPolicy)> = vs
        .iter()
        .map(|(_, addr, port, frontend, policy)| {
            (key(Protocol::Tcp, addr, *port), *frontend, *policy)
        })
        .collect();
    let lb_local = keys[2].0;
    let with_hairpin = state(&keys, &[(lb_local, "10.20.0.2", 8080)]);
    let mut nft = router.nft(&nft_path);
    let pods = NftSettings {
        masquerade_all: false,
        cluster_cidrs: vec!["10.10.0.0/24".parse().expect("cidr")],
        local_interface: None,
    };
    nft.replace(&pods, &with_hairpin).expect("replace");

    let seen = |name: &str| -> String {
        let (_, addr, port, _, _) = vs.iter().find(|v| v.0 == name).expect("service");
        let target = format!("{addr}:{port}");
        client
            .run(|| seen_as(&target))
            .unwrap_or_else(|e| panic!("{name} via {target}: {e:?}"))
    };
    let masqueraded = "10.20.0.1";
    let kept = "10.10.0.2";
    assert_eq!(
        seen("cluster-ip"),
        kept,
        "a pod's ClusterIP traffic keeps its source"
    );
    assert_eq!(seen("lb-cluster"), masqueraded);
    assert_eq!(seen("lb-local"), kept);
    assert_eq!(seen("ext-cluster"), masqueraded);
    assert_eq!(seen("ext-local"), kept);
    assert_eq!(seen("np-cluster"), masqueraded);
    assert_eq!(seen("np-local"), kept);

    // Hairpin: the backend reaching itself through a Local service (no mark) is masqueraded
    // only because of its hairpin element; without it the connection cannot work (the
    // reply would go straight back inside the backend, which drops its own source).
    let hairpin = || backend.run(|| seen_as("192.0.2.11:80"));
    assert_eq!(hairpin(), Ok(masqueraded.to_string()));
    let without_hairpin = state(&keys, &[]);
    nft.update(&with_hairpin, &without_hairpin).expect("update");
    assert!(
        hairpin().is_err(),
        "no hairpin masquerade without the destination"
    );
    nft.update(&without_hairpin, &with_hairpin).expect("update");
    assert_eq!(hairpin(), Ok(masqueraded.to_string()));

    // The client outside the cluster CIDRs: its ClusterIP traffic is masqueraded.
    let elsewhere = NftSettings {
        masquerade_all: false,
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        local_interface: None,
    };
    nft.replace(&elsewhere, &with_hairpin).expect("replace");
    assert_eq!(seen("cluster-ip"), masqueraded);
    assert_eq!(seen("lb-local"), kept, "Local keeps the client address");

    // masquerade-all: every ClusterIP connection; Local external traffic still kept.
    let all = NftSettings {
        masquerade_all: true,
        cluster_cidrs: vec!["10.10.0.0/24".parse().expect("cidr")],
        local_interface: None,
    };
    nft.replace(&all, &with_hairpin).expect("replace");
    assert_eq!(seen("cluster-ip"), masqueraded);
    assert_eq!(seen("np-local"), kept);

    // kube-proxy's interface detectors (detectLocalMode BridgeInterface, InterfaceNamePrefix)
    // replace the CIDRs: traffic arriving on the pods' interface (r0) keeps its source.
    for (interface, expected) in [
        (LocalInterface::Bridge("r0".to_owned()), kept),
        (LocalInterface::NamePrefix("r".to_owned()), kept),
        (LocalInterface::Bridge("cbr0".to_owned()), masqueraded),
        (LocalInterface::NamePrefix("veth".to_owned()), masqueraded),
    ] {
        let detector = NftSettings {
            masquerade_all: false,
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            local_interface: Some(interface.clone()),
        };
        nft.replace(&detector, &with_hairpin).expect("replace");
        assert_eq!(seen("cluster-ip"), expected, "{interface:?}");
        assert_eq!(seen("np-cluster"), masqueraded, "{interface:?}");
    }

    // No CIDRs: only VIP-sourced traffic would be; the client's is not.
    nft.replace(&NftSettings::default(), &with_hairpin)
        .expect("replace");
    assert_eq!(seen("cluster-ip"), kept);
    assert_eq!(seen("np-cluster"), masqueraded);

    // Without our table nothing is masqueraded.
    nft.delete().expect("delete");
    assert_eq!(seen("lb-cluster"), kept);
}

/// kube-proxy's `loadBalancerSourceRanges` firewall with real traffic: a client inside the
/// ranges reaches the load-balancer IP, one outside is dropped, and so is the node itself
/// unless a range holds its address; the read-back keeps the ranges; opening the Service
/// lets everyone in again. The LB IP sits on `lo` (no dummy links here) and a local listener
/// stands in for IPVS: the filter runs before IPVS would, in the input hook.
#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    let nft_path = require_root_and_nft();
    let node = Netns::new();
    let inside = Netns::new();
    let outside = Netns::new();
    node.link(&inside, ("n0", "10.30.0.1/24"), ("i0", "10.30.0.2/24"));
    node.link(&outside, ("n1", "10.31.0.1/24"), ("o0", "10.31.0.2/24"));
    node.ip(&["addr", "add", "203.0.113.50/32", "dev", "lo"]);
    inside.ip(&["route", "add", "203.0.113.0/24", "via", "10.30.0.1"]);
    outside.ip(&["route", "add", "203.0.113.0/24", "via", "10.31.0.1"]);
    let _servers = Servers::start(&node, &["0.0.0.0:80", "0.0.0.0:81"], &[]);

    let lb = key(Protocol::Tcp, "203.0.113.50", 80);
    let other_port = key(Protocol::Tcp, "203.0.113.50", 81);
    let with_ranges = |ranges: &[&str], from_node: bool| {
        let mut state = state(
            &[
                (lb, Frontend::LoadBalancer, TrafficPolicy::Cluster),
                (other_port, Frontend::LoadBalancer, TrafficPolicy::Cluster),
            ],
            &[],
        );
        state.source_ranges.insert(
            lb,
            SourceRanges {
                allowed: ranges.iter().map(|r| r.parse().expect("cidr")).collect(),
                from_node,
            },
        );
        state
    };
    let restricted = with_ranges(&["10.30.0.0/24", "192.0.2.0/28"], false);
    let mut nft = node.nft(&nft_path);
    nft.replace(&NftSettings::default(), &restricted)
        .expect("replace");
    inside.run(|| assert_eq!(seen_as("203.0.113.50:80"), Ok("10.30.0.2".into())));
    outside.run(|| {
        assert_eq!(
            seen_as("203.0.113.50:80"),
            Err(ErrorKind::TimedOut),
            "outside the ranges"
        );
        // The firewall is per address:port: the Service's other port is open.
        assert_eq!(seen_as("203.0.113.50:81"), Ok("10.31.0.2".into()));
    });
    // The node's own connection carries the LB IP as its source: dropped.
    node.run(|| {
        assert_eq!(
            seen_as("203.0.113.50:80"),
            Err(ErrorKind::TimedOut),
            "from the node"
        )
    });
    assert_eq!(
        nft.read().expect("read").expect("table").state,
        recorded(&restricted).state,
        "read back"
    );

    // A range holds the node's address: the node may reach its LB IP.
    let from_node = with_ranges(&["10.30.0.0/24", "192.0.2.0/28"], true);
    nft.update(&restricted, &from_node).expect("update");
    node.run(|| assert!(seen_as("203.0.113.50:80").is_ok(), "from the node"));
    outside.run(|| assert_eq!(seen_as("203.0.113.50:80"), Err(ErrorKind::TimedOut)));

    // Other ranges: the old ones stop admitting.
    let moved = with_ranges(&["10.31.0.0/24"], false);
    nft.update(&from_node, &moved).expect("update");
    outside.run(|| assert_eq!(seen_as("203.0.113.50:80"), Ok("10.31.0.2".into())));
    inside.run(|| assert_eq!(seen_as("203.0.113.50:80"), Err(ErrorKind::TimedOut)));

    // No ranges: open to everyone.
    let open = state(
        &[
            (lb, Frontend::LoadBalancer, TrafficPolicy::Cluster),
            (other_port, Frontend::LoadBalancer, TrafficPolicy::Cluster),
        ],
        &[],
    );
    nft.update(&moved, &open).expect("update");
    inside.run(|| assert_eq!(seen_as("203.0.113.50:80"), Ok("10.30.0.2".into())));
    node.run(|| assert!(seen_as("203.0.113.50:80").is_ok(), "from the node"));
    nft.delete().expect("delete");
}

/// An externalIP or LB IP the node itself holds on another interface (a secondary NIC, a
/// keepalived VIP) is the node's: its other ports stay reachable, as with kube-proxy, which
/// neither binds nor filters such an address. A plain VIP's other ports are still refused.
#[test]
fn a_service_address_the_node_holds_keeps_the_nodes_other_ports() {
    let nft_path = require_root_and_nft();
    let node = Netns::new();
    let client = Netns::new();
    node.link(&client, ("n0", "10.30.0.1/24"), ("c0", "10.30.0.2/24"));
    node.ip(&["addr", "add", "10.30.0.9/24", "dev", "n0"]);
    node.ip(&["addr", "add", "10.96.0.10/32", "dev", "lo"]);
    client.ip(&["route", "add", "10.96.0.0/16", "via", "10.30.0.1"]);
    let _servers = Servers::start(&node, &["0.0.0.0:22", "0.0.0.0:443"], &[]);

    let mut services = state(
        &[
            (
                key(Protocol::Tcp, "10.30.0.9", 443),
                Frontend::ExternalIP,
                TrafficPolicy::Cluster,
            ),
            (
                key(Protocol::Tcp, "10.96.0.10", 443),
                Frontend::ClusterIP,
                TrafficPolicy::Cluster,
            ),
        ],
        &[],
    );
    let mut nft = node.nft(&nft_path);
    // Before the agent knows the node's addresses, the secondary address looks like a VIP.
    nft.replace(&NftSettings::default(), &services)
        .expect("replace");
    client.run(|| assert_eq!(seen_as("10.30.0.9:22"), Err(ErrorKind::ConnectionRefused)));

    let before = services.clone();
    services.node_addresses = ["10.30.0.1", "10.30.0.9"]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    nft.update(&before, &services).expect("update");
    client.run(|| {
        assert_eq!(
            seen_as("10.30.0.9:22"),
            Ok("10.30.0.2".into()),
            "the node's SSH"
        );
        assert_eq!(seen_as("10.30.0.9:443"), Ok("10.30.0.2".into()));
        assert_eq!(
            seen_as("10.96.0.10:22"),
            Err(ErrorKind::ConnectionRefused),
            "a VIP"
        );
    });
    assert_eq!(
        nft.read()
            .expect("read")
            .expect("table")
            .state
            .node_addresses,
        services.node_addresses
    );
    nft.delete().expect("delete");
}
