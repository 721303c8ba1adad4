//! The IPVS dataplane with real traffic, inside the VM (`cargo xtask vm-test --test
//! vm_ipvs_traffic`).
//!
//! Four pods in network namespaces (two in zone-a, two in zone-b) serve TCP and UDP and answer
//! with their name; the agent runs as `topoproxy run --proxy-mode ipvs` for node-a1 (zone-a)
//! against a YAML directory the tests edit; a client in the VM's root namespace talks to the
//! Service's VIP. Each test builds its own world and tears it down (agent + `topoproxy
//! cleanup`, namespaces, links), also on failure.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/pods.rs"]
mod pods;
#[path = "support/process.rs"]
mod process;
#[path = "support/traffic.rs"]
mod traffic;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cluster::{ipvsadm, topoproxy, Condition, Endpoint, Fixture, Port, Service, YamlAgent};
use pods::{Backend, Pod, PodNetwork};
use process::{eventually, sh, sh_quiet};
use traffic::{tcp_ask, udp_ask, TcpSession};

const NODE: &str = "node-a1";
const SERVICE: &str = "echo";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 10);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const BACKEND_TCP: u16 = 8080;
const BACKEND_UDP: u16 = 5353;
const CONVERGE: Duration = Duration::from_secs(30);

/// `(pod, address, node, zone)`.
const PODS: [(&str, Ipv4Addr, &str, &str); 4] = [
    ("a1", Ipv4Addr::new(10, 244, 1, 11), "node-a1", "zone-a"),
    ("a2", Ipv4Addr::new(10, 244, 1, 12), "node-a2", "zone-a"),
    ("b1", Ipv4Addr::new(10, 244, 2, 11), "node-b1", "zone-b"),
    ("b2", Ipv4Addr::new(10, 244, 2, 12), "node-b1", "zone-b"),
];

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, TCP_PORT))
}

fn udp_vip() -> SocketAddr {
    SocketAddr::from((VIP, UDP_PORT))
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The test world. Fields drop in order: the agent (and its cleanup) first, the pods last.
struct World {
    agent: Option<YamlAgent>,
    _backends: Vec<Backend>,
    _pods: Vec<Pod>,
    _network: PodNetwork,
    fixture: Fixture,
}

impl World {
    /// Pods, backends and the fixture; the agent is not started.
    fn new(label: &str) -> Self {
        // A previous run that died hard may have left our state behind.
        sh_quiet(
            cluster::agent_process::agent_bin()
                .to_str()
                .expect("UTF-8 agent path"),
            &["cleanup"],
        );
        let network = PodNetwork::new();
        let pods: Vec<Pod> = PODS
            .iter()
            .map(|(name, address, _, _)| Pod::new(name, *address))
            .collect();
        let backends = pods
            .iter()
            .map(|pod| Backend::start(pod, BACKEND_TCP, BACKEND_UDP))
            .collect();
        let mut fixture = Fixture::new(label);
        fixture.nodes = vec![
            ("node-a1".into(), "zone-a".into()),
            ("node-a2".into(), "zone-a".into()),
            ("node-b1".into(), "zone-b".into()),
        ];
        fixture.services = vec![Service {
            name: SERVICE.into(),
            cluster_ip: VIP,
            ports: vec![
                Port {
                    name: "http".into(),
                    protocol: "TCP",
                    port: TCP_PORT,
                    target_port: BACKEND_TCP,
                },
                Port {
                    name: "dns".into(),
                    protocol: "UDP",
                    port: UDP_PORT,
                    target_port: BACKEND_UDP,
                },
            ],
            prefer_same_zone: true,
            topology: None,
            ipvs_scheduler: None,
            endpoints: PODS
                .iter()
                .map(|(_, address, node, zone)| Endpoint {
                    address: *address,
                    node: (*node).into(),
                    zone: (*zone).into(),
                    condition: Condition::Ready,
                    hint: Some((*zone).into()),
                })
                .collect(),
        }];
        fixture.write();
        Self {
            agent: None,
            _backends: backends,
            _pods: pods,
            _network: network,
            fixture,
        }
    }

    fn start_agent(&mut self) -> &mut YamlAgent {
        self.agent.insert(YamlAgent::start(&self.fixture, NODE))
    }

    fn agent(&mut self) -> &mut YamlAgent {
        self.agent.as_mut().expect("the agent was started")
    }

    /// Edits the endpoint of `pod` (or removes it with `None`) and rewrites the YAML.
    fn set_endpoint(&mut self, pod: &str, condition: Option<Condition>) {
        let (_, address, node, zone) = *PODS
            .iter()
            .find(|p| p.0 == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        let service = self.fixture.service_mut(SERVICE);
        service.endpoints.retain(|e| e.address != address);
        if let Some(condition) = condition {
            service.endpoints.push(Endpoint {
                address,
                node: node.into(),
                zone: zone.into(),
                condition,
                hint: Some(zone.into()),
            });
        }
        self.fixture.write();
    }

    /// Waits until the agent's table (`topoproxy list`) is the plan for this node, leaving
    /// out destinations at weight 0 (draining ones stay until their connections are gone).
    fn wait_converged(&mut self) {
        let plan = self.fixture.plan(NODE);
        let agent = self.agent.as_mut().expect("the agent was started");
        eventually("the agent programs the plan", CONVERGE, || {
            assert!(agent.running(), "the agent exited:\n{}", agent.log());
            let listed = list_owned();
            if without_weight_zero(&listed) == without_weight_zero(&plan) {
                Ok(())
            } else {
                Err(format!("list:\n{listed}\nplan:\n{plan}"))
            }
        });
    }
}

/// `topoproxy list --no-counters`, or the error text.
fn list_owned() -> String {
    cluster::list_owned(&[])
}

/// The `ipvsadm -Ln` text without destinations at weight 0.
fn without_weight_zero(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            !(fields.first() == Some(&"->") && fields.get(3) == Some(&"0"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The backends that answered `n` TCP connections to the VIP (each closed with a reset).
fn tcp_answers(n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let session = TcpSession::connect(tcp_vip())
                .unwrap_or_else(|e| panic!("TCP request {i} to {}: {e}", tcp_vip()));
            let name = session.greeting.clone();
            session.reset();
            name
        })
        .collect()
}

/// The backends that answered `n` UDP requests to the VIP.
fn udp_answers(n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            udp_ask(udp_vip()).unwrap_or_else(|e| panic!("UDP request {i} to {}: {e}", udp_vip()))
        })
        .collect()
}

/// How many of `n` new TCP connections (or UDP requests) to the VIP each backend answered.
fn answer_counts(n: usize, udp: bool) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let name = if udp {
            udp_ask(udp_vip()).unwrap_or_else(|e| panic!("UDP request {i} to {}: {e}", udp_vip()))
        } else {
            let session = TcpSession::connect(tcp_vip())
                .unwrap_or_else(|e| panic!("TCP request {i} to {}: {e}", tcp_vip()));
            let name = session.greeting.clone();
            session.reset();
            name
        };
        *counts.entry(name).or_default() += 1;
    }
    counts
}

/// Each pod's planned share of new connections to `vip:port` (weight over the sum of the
/// programmed weights), from `plan --format json`.
fn planned_shares(plan_json: &str, vip: SocketAddr) -> BTreeMap<String, f64> {
    let plan: serde_json::Value = serde_json::from_str(plan_json).expect("plan JSON");
    let server = plan["virtualServers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|vs| vs["key"]["address"] == vip.ip().to_string() && vs["key"]["port"] == vip.port())
        .unwrap_or_else(|| panic!("{vip} is not in the plan:\n{plan_json}"));
    let programmed = server["programmed"].as_array().cloned().unwrap_or_default();
    let total: f64 = programmed.iter().filter_map(|b| b["weight"].as_f64()).sum();
    programmed
        .iter()
        .filter_map(|b| {
            let address: Ipv4Addr = b["address"].as_str()?.parse().ok()?;
            let pod = PODS.iter().find(|p| p.1 == address)?.0;
            Some((pod.to_owned(), b["weight"].as_f64()? / total))
        })
        .collect()
}

/// Waits until TCP and UDP traffic reaches exactly `expected` (round robin over 8 requests
/// reaches every destination of a service with up to 4).
fn wait_traffic_reaches(expected: &BTreeSet<String>) {
    eventually("traffic reaches the expected backends", CONVERGE, || {
        let tcp = tcp_answers(8);
        let udp = udp_answers(8);
        if &tcp == expected && &udp == expected {
            Ok(())
        } else {
            Err(format!(
                "TCP reached {tcp:?}, UDP reached {udp:?}, expected {expected:?}"
            ))
        }
    });
}

/// Plain-ipvsadm state for the harness check, removed on drop.
struct PlainIpvs {
    services: Vec<String>,
}

impl Drop for PlainIpvs {
    fn drop(&mut self) {
        for service in &self.services {
            let args: Vec<&str> = service.split_whitespace().collect();
            sh_quiet(cluster::IPVSADM, &args);
        }
        sh_quiet("/usr/sbin/ip", &["link", "del", "tp-vip0"]);
        sh_quiet("/usr/sbin/nft", &["delete", "table", "inet", "tp-ct"]);
    }
}

/// The test world itself, without the agent: the plan loaded with `ipvsadm -R` onto a VIP
/// on a dummy link must carry TCP and UDP from the root namespace to the zone-a pods, and
/// leave conntrack entries. When this fails, the harness is broken, not the agent.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn world_works_with_plain_ipvsadm() {
    let world = World::new("plain");
    let restore = cluster::plan_to_restore(&world.fixture.plan(NODE));
    let mut plain = PlainIpvs {
        services: Vec::new(),
    };
    for line in restore.lines().filter(|l| l.starts_with("-A ")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        plain
            .services
            .push(format!("-D {} {}", fields[1], fields[2]));
    }
    sh("/usr/sbin/ip", &["link", "add", "tp-vip0", "type", "dummy"]);
    sh(
        "/usr/sbin/ip",
        &["addr", "add", &format!("{VIP}/32"), "dev", "tp-vip0"],
    );
    std::fs::write("/proc/sys/net/ipv4/vs/conntrack", "1").expect("net.ipv4.vs.conntrack");
    // Conntrack only tracks a namespace once something there uses it (on a node: iptables or
    // the agent's nft table); a `ct` rule stands in for that here.
    sh("/usr/sbin/nft", &["add", "table", "inet", "tp-ct"]);
    sh(
        "/usr/sbin/nft",
        &["add chain inet tp-ct out { type filter hook output priority 0; }"],
    );
    sh(
        "/usr/sbin/nft",
        &["add rule inet tp-ct out ct state new counter"],
    );
    let mut child = std::process::Command::new(cluster::IPVSADM)
        .arg("-R")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("starting ipvsadm -R");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("ipvsadm stdin"),
        restore.as_bytes(),
    )
    .expect("feeding ipvsadm -R");
    drop(child.stdin.take());
    assert!(
        child.wait().expect("ipvsadm -R").success(),
        "ipvsadm -R of:\n{restore}"
    );
    assert_eq!(
        ipvsadm(&["-Ln"]),
        world.fixture.plan(NODE),
        "restored table"
    );
    let zone_a = names(&["a1", "a2"]);
    assert_eq!(tcp_answers(8), zone_a);
    assert_eq!(udp_answers(8), zone_a);
    assert!(
        !udp_conntrack_entries(PODS[0].1).is_empty(),
        "no conntrack entry for a1 after UDP traffic: {}",
        conntrack_dump()
    );
    let mut session = TcpSession::connect(tcp_vip()).expect("a long-lived connection");
    let first = session.greeting.clone();
    for _ in 0..3 {
        assert_eq!(session.ask().expect("asking again"), first);
    }
    session.reset();
    drop(plain);
}

/// `ipvsadm -L --timeout`'s line.
fn ipvsadm_timeout_line() -> String {
    ipvsadm(&["-L", "--timeout"]).trim().to_owned()
}

/// kube-proxy's own ConfigMap content, mounted unchanged: the agent sets its IPVS timeouts
/// (as `ipvsadm --set`) and its conntrack sysctls at start, and programs the plan.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn a_kube_proxy_configuration_sets_the_ipvs_timeouts_and_conntrack() {
    let mut world = World::new("kube-proxy-config");
    let before = ipvsadm_timeout_line();
    let _restore = RestoreTimeouts(before.clone());
    let config = world.fixture.dir.with_extension("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: ipvs\nclusterCIDR: 10.244.0.0/16\nipvs:\n  tcpTimeout: 16m40s\n  \
         tcpFinTimeout: 1m10s\n  udpTimeout: 0s\nconntrack:\n  tcpCloseWaitTimeout: 2h0m0s\n",
    )
    .expect("writing the kube-proxy configuration");
    let config = config.to_str().expect("utf-8 path").to_owned();
    world.agent = Some(YamlAgent::start_with(
        &world.fixture,
        NODE,
        &["--config", &config],
    ));
    world.wait_converged();
    let udp_before = before
        .split_whitespace()
        .last()
        .expect("the udp timeout")
        .to_owned();
    assert_eq!(
        ipvsadm_timeout_line(),
        format!("Timeout (tcp tcpfin udp): 1000 70 {udp_before}"),
        "udpTimeout 0s leaves the kernel's"
    );
    let close_wait =
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait")
            .expect("reading the close-wait timeout");
    assert_eq!(close_wait.trim(), "7200");
    let log = world.agent().log();
    assert!(log.contains("IPVS connection timeouts set"), "{log}");
}

/// Puts `ipvsadm -L --timeout`'s values back when dropped.
struct RestoreTimeouts(String);

impl Drop for RestoreTimeouts {
    fn drop(&mut self) {
        let numbers: Vec<&str> = self
            .0
            .split_once(':')
            .map(|(_, n)| n.split_whitespace().collect())
            .unwrap_or_default();
        if numbers.len() == 3 {
            let _ = std::process::Command::new("/usr/sbin/ipvsadm")
                .arg("--set")
                .args(numbers)
                .status();
        }
    }
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn ipvsadm_shows_the_plan() {
    let mut world = World::new("plan");
    let plan = world.fixture.plan(NODE);
    // The plan itself must be the zone-a backends only, or this test proves nothing.
    assert!(
        plan.contains("10.244.1.11:8080") && plan.contains("10.244.1.12:5353"),
        "{plan}"
    );
    assert!(
        !plan.contains("10.244.2."),
        "zone-b backends in node-a1's plan:\n{plan}"
    );
    world.start_agent();
    eventually("ipvsadm -Ln equals topoproxy plan", CONVERGE, || {
        let shown = ipvsadm(&["-Ln"]);
        if shown == plan {
            Ok(())
        } else {
            Err(format!("ipvsadm -Ln:\n{shown}\nplan:\n{plan}"))
        }
    });
    assert_eq!(list_owned(), plan, "topoproxy list --no-counters");
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn traffic_stays_in_zone_falls_back_and_returns() {
    let mut world = World::new("zone");
    world.start_agent();
    world.wait_converged();
    let zone_a = names(&["a1", "a2"]);
    let zone_b = names(&["b1", "b2"]);
    assert_eq!(tcp_answers(8), zone_a, "TCP from node-a1 stays in zone-a");
    assert_eq!(udp_answers(8), zone_a, "UDP from node-a1 stays in zone-a");

    // Zone-a's endpoints fail their probes: the remaining hints name only zone-b, so the
    // planner falls back to every ready endpoint.
    world.set_endpoint("a1", Some(Condition::NotReady));
    world.set_endpoint("a2", Some(Condition::NotReady));
    world.wait_converged();
    wait_traffic_reaches(&zone_b);

    world.set_endpoint("a1", Some(Condition::Ready));
    world.set_endpoint("a2", Some(Condition::Ready));
    world.wait_converged();
    wait_traffic_reaches(&zone_a);

    // The same with the endpoints removed from the slice altogether.
    world.set_endpoint("a1", None);
    world.set_endpoint("a2", None);
    world.wait_converged();
    wait_traffic_reaches(&zone_b);

    world.set_endpoint("a1", Some(Condition::Ready));
    world.set_endpoint("a2", Some(Condition::Ready));
    world.wait_converged();
    wait_traffic_reaches(&zone_a);
}

/// Under `topoproxy.io/topology: zone`, a zone with one of its two endpoints not Ready keeps
/// part of the new connections and hands the rest to zone-b through `wrr` weights; 2,000 TCP
/// connections and 2,000 UDP requests land on each backend within ±5 points of its planned
/// share.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn a_thinning_zone_hands_its_planned_share_to_the_next_tier() {
    let mut world = World::new("spill");
    world.fixture.service_mut(SERVICE).topology = Some("zone");
    world.fixture.write();
    world.start_agent();
    world.set_endpoint("a2", Some(Condition::NotReady));
    world.wait_converged();
    let listed = list_owned();
    assert!(
        listed.contains("wrr"),
        "an opted-in Service is weighted:\n{listed}"
    );
    for (vip, udp) in [(tcp_vip(), false), (udp_vip(), true)] {
        let planned = planned_shares(&world.fixture.plan_json(NODE), vip);
        // kube-proxy would send everything to a1, the one Ready pod the hints leave zone-a
        // (2 nodes); the capacity guard plans a share of it instead.
        let in_zone = planned.get("a1").copied().unwrap_or(0.0);
        assert!(
            in_zone > 0.0 && in_zone < 1.0,
            "zone-a keeps a share and spills the rest: {planned:?}"
        );
        let counts = answer_counts(2000, udp);
        let total: usize = counts.values().sum();
        eprintln!("{vip}: planned {planned:?}, served {counts:?}");
        for (pod, share) in &planned {
            let got = counts.get(pod).copied().unwrap_or(0) as f64 / total as f64;
            assert!(
                (got - share).abs() <= 0.05,
                "{vip} {pod}: served {got:.3}, planned {share:.3}; counts {counts:?}"
            );
        }
        assert!(
            counts.keys().all(|pod| planned.contains_key(pod)),
            "{vip}: only planned backends serve: {counts:?} vs {planned:?}"
        );
    }
}

/// Client addresses in the root namespace (on a dummy link, removed on drop), so each client
/// is its own source address to the hashing schedulers.
struct ClientAddresses {
    addresses: Vec<Ipv4Addr>,
}

impl ClientAddresses {
    const LINK: &'static str = "tp-clients";

    fn new(count: u8) -> Self {
        sh_quiet(netns::IP, &["link", "del", Self::LINK]);
        sh(netns::IP, &["link", "add", Self::LINK, "type", "dummy"]);
        let clients = Self {
            addresses: (1..=count).map(|i| Ipv4Addr::new(10, 250, 0, i)).collect(),
        };
        for address in &clients.addresses {
            sh(
                netns::IP,
                &["addr", "add", &format!("{address}/32"), "dev", Self::LINK],
            );
        }
        sh(netns::IP, &["link", "set", Self::LINK, "up"]);
        clients
    }
}

impl Drop for ClientAddresses {
    fn drop(&mut self) {
        sh_quiet(netns::IP, &["link", "del", Self::LINK]);
    }
}

/// The backends that answered `flows` UDP requests from `client`, each from a source port
/// never used before in this test (a new IPVS connection, scheduled anew: a port the kernel
/// picked again would meet the IPVS connection of its earlier flow, under the old scheduler).
fn udp_answers_from(client: Ipv4Addr, flows: usize) -> BTreeSet<String> {
    static NEXT_PORT: AtomicUsize = AtomicUsize::new(20_000);
    (0..flows)
        .map(|i| {
            let port = u16::try_from(NEXT_PORT.fetch_add(1, Ordering::Relaxed))
                .expect("fewer than 45,000 flows");
            let ask = || -> std::io::Result<String> {
                let socket = std::net::UdpSocket::bind((client, port))?;
                socket.set_read_timeout(Some(traffic::ANSWER_TIMEOUT))?;
                socket.send_to(b"?", udp_vip())?;
                let mut buf = [0u8; 512];
                let (n, _) = socket.recv_from(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            };
            ask().unwrap_or_else(|e| panic!("UDP request {i} from {client} to {}: {e}", udp_vip()))
        })
        .collect()
}

/// Removes pod b2's endpoint under `scheduler` and returns the clients of the other backends
/// that moved, and how many such clients there are. Every client of b2 must move.
fn remove_b2_and_count_moves(
    world: &mut World,
    clients: &ClientAddresses,
    scheduler: &str,
) -> (Vec<Ipv4Addr>, usize) {
    let before = backend_per_client(clients, 4);
    let on_b2 = before.values().filter(|pod| *pod == "b2").count();
    assert!(
        on_b2 > 0,
        "{scheduler}: no client hashes to b2, the removal proves nothing: {before:?}"
    );
    world.set_endpoint("b2", None);
    world.wait_converged();
    let after = backend_per_client(clients, 4);
    assert!(after.values().all(|pod| pod != "b2"), "{after:?}");
    let moved: Vec<Ipv4Addr> = clients
        .addresses
        .iter()
        .filter(|client| before[*client] != "b2" && before[*client] != after[*client])
        .copied()
        .collect();
    let others = clients.addresses.len() - on_b2;
    eprintln!(
        "{scheduler}: b2 removed; its {on_b2} of {} clients moved, and {} of the {others} \
         others (ideal 0)",
        clients.addresses.len(),
        moved.len()
    );
    (moved, others)
}

/// The one backend each client's flows reach; panics when a client is spread.
fn backend_per_client(clients: &ClientAddresses, flows: usize) -> BTreeMap<Ipv4Addr, String> {
    clients
        .addresses
        .iter()
        .map(|&client| {
            let reached = udp_answers_from(client, flows);
            assert_eq!(reached.len(), 1, "{client} spread over {reached:?}");
            (client, reached.into_iter().next().unwrap_or_default())
        })
        .collect()
}

/// The `topoproxy.io/ipvs-scheduler` annotation with real traffic (UDP, a fresh source port
/// per flow, 64 client addresses): under `rr` one client's flows reach every backend; under
/// `sh` every flow of a client reaches one backend, and removing a backend moves most clients
/// (its buckets go round the backends in turn); under `mh` the removed backend's clients move
/// and at most a tenth of the others, fewer than under `sh` (Maglev's table keeps nearly every
/// entry of the remaining backends, not all: the kernel's moves a few). Each scheduler change
/// reaches the kernel as a service edit (the listing converges on the plan), flags included.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn the_ipvs_scheduler_annotation_keeps_clients_on_their_backend() {
    let mut world = World::new("sched");
    // Every endpoint, no topology: four backends for node-a1.
    let service = world.fixture.service_mut(SERVICE);
    service.prefer_same_zone = false;
    for endpoint in &mut service.endpoints {
        endpoint.hint = None;
    }
    world.fixture.write();
    let clients = ClientAddresses::new(64);
    let first = clients.addresses[0];
    world.start_agent();
    world.wait_converged();
    let every_pod = names(&["a1", "a2", "b1", "b2"]);
    assert_eq!(
        udp_answers_from(first, 16),
        every_pod,
        "rr spreads one client"
    );

    let set_scheduler = |world: &mut World, scheduler: &'static str| {
        world.fixture.service_mut(SERVICE).ipvs_scheduler = Some(scheduler);
        world.fixture.write();
        world.wait_converged();
        let shown = ipvsadm(&["-Ln"]);
        let line = format!(
            "UDP  {VIP}:{UDP_PORT} {}",
            scheduler.split(',').next().unwrap_or("")
        );
        assert!(
            shown.contains(&line),
            "ipvsadm -Ln shows {scheduler}:\n{shown}"
        );
    };

    set_scheduler(&mut world, "sh");
    let by_sh = backend_per_client(&clients, 8);
    let used: BTreeSet<&String> = by_sh.values().collect();
    assert!(
        used.len() > 1,
        "sh hashes {} clients onto one backend: {by_sh:?}",
        clients.addresses.len()
    );
    // sh's buckets go round the backends in turn, so a removal moves most clients; mh's
    // Maglev table keeps nearly all of those of the remaining backends.
    let (sh_moved, sh_stayed) = remove_b2_and_count_moves(&mut world, &clients, "sh");
    // b2 back, without a hint like the others; the scheduler change below converges on it.
    world.set_endpoint("b2", Some(Condition::Ready));
    for endpoint in &mut world.fixture.service_mut(SERVICE).endpoints {
        endpoint.hint = None;
    }
    set_scheduler(&mut world, "mh");
    let (mh_moved, stayed) = remove_b2_and_count_moves(&mut world, &clients, "mh");
    assert!(
        mh_moved.len() * 10 <= stayed && mh_moved.len() < sh_moved.len(),
        "mh moved {} of the {stayed} clients of remaining backends (sh: {} of {sh_stayed}): \
         {mh_moved:?}",
        mh_moved.len(),
        sh_moved.len(),
    );

    // Flags: an edit of the same scheduler with its flags reaches the kernel, reads back
    // (the listing converges on the plan), and ipvsadm prints them as topoproxy does.
    set_scheduler(&mut world, "mh,mh-fallback,mh-port");
    let shown = ipvsadm(&["-Ln"]);
    let line = format!("UDP  {VIP}:{UDP_PORT} mh (mh-fallback,mh-port)");
    assert!(
        shown.lines().any(|l| l == line) && list_owned().lines().any(|l| l == line),
        "ipvsadm -Ln and topoproxy list show {line:?}:\n{shown}\n{}",
        list_owned()
    );
}

/// The `ipvsadm -Ln` destination line of `backend` under the TCP service, if any.
fn tcp_destination_line(backend: &str) -> Option<String> {
    let listing = ipvsadm(&["-Ln"]);
    let mut in_tcp_service = false;
    for line in listing.lines() {
        if !line.starts_with("  ->") {
            in_tcp_service = line.starts_with(&format!("TCP  {VIP}:{TCP_PORT} "));
            continue;
        }
        if in_tcp_service && line.contains(&format!(" {backend} ")) {
            return Some(line.to_owned());
        }
    }
    None
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn removed_tcp_backend_drains_its_established_connection() {
    let mut world = World::new("drain");
    world.start_agent();
    world.wait_converged();
    // Round robin: one of the next connections lands on a1.
    let mut others = Vec::new();
    let mut session = loop {
        let session = TcpSession::connect(tcp_vip()).expect("connecting to the VIP");
        if session.greeting == "a1" {
            break session;
        }
        others.push(session);
        assert!(others.len() < 4, "no connection reached a1");
    };
    for other in others {
        other.reset();
    }
    world.set_endpoint("a1", None);
    let a1 = "10.244.1.11:8080";
    let line = eventually(
        "a1 goes to weight 0",
        CONVERGE,
        || match tcp_destination_line(a1) {
            Some(line) if line.split_whitespace().nth(3) == Some("0") => Ok(line),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        line.split_whitespace().nth(4) == Some("1"),
        "the established connection should count as active: {line}"
    );
    for _ in 0..5 {
        assert_eq!(
            session
                .ask()
                .expect("the established connection keeps working"),
            "a1"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(tcp_answers(6), names(&["a2"]), "new connections avoid a1");
    assert!(
        tcp_destination_line(a1).is_some(),
        "a1 was deleted while its connection was open"
    );
    session.reset();
    // IPVS keeps a reset connection for its CLOSE timeout (10 s); then the agent deletes a1.
    eventually(
        "a1 is deleted once drained",
        Duration::from_secs(40),
        || match tcp_destination_line(a1) {
            None => Ok(()),
            Some(line) => Err(line),
        },
    );
}

/// `conntrack -L` output and errors, for failure messages.
fn conntrack_dump() -> String {
    let out = std::process::Command::new("/usr/sbin/conntrack")
        .arg("-L")
        .output()
        .expect("starting conntrack -L");
    format!(
        "conntrack -L ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `conntrack -L -p udp` lines that mention `address`.
fn udp_conntrack_entries(address: Ipv4Addr) -> Vec<String> {
    let out = std::process::Command::new("/usr/sbin/conntrack")
        .args(["-L", "-p", "udp"])
        .output()
        .expect("starting conntrack -L");
    let needle = format!("={address} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&needle))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn removed_udp_backend_loses_its_conntrack_entries() {
    let mut world = World::new("udp");
    world.start_agent();
    world.wait_converged();
    assert_eq!(udp_answers(6), names(&["a1", "a2"]));
    let a1 = PODS[0].1;
    let a2 = PODS[1].1;
    assert!(
        !udp_conntrack_entries(a1).is_empty(),
        "no conntrack entry for a1 after UDP traffic (is net.ipv4.vs.conntrack set?)"
    );
    world.set_endpoint("a1", None);
    world.wait_converged();
    // UDP entries live 30 s after their last packet: gone within 5 s means flushed.
    eventually(
        "a1's UDP conntrack entries are flushed",
        Duration::from_secs(5),
        || match udp_conntrack_entries(a1) {
            entries if entries.is_empty() => Ok(()),
            entries => Err(entries.join("\n")),
        },
    );
    assert!(
        !udp_conntrack_entries(a2).is_empty(),
        "a2's entries went too: the flush was not selective"
    );
    assert_eq!(udp_answers(4), names(&["a2"]));
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn agent_killed_and_restarted_under_load_loses_no_connection() {
    let mut world = World::new("restart");
    world.start_agent();
    world.wait_converged();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let client = {
        let stop = Arc::clone(&stop);
        let served = Arc::clone(&served);
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match tcp_ask(tcp_vip()) {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.push(format!("TCP: {e}"));
                        0
                    }
                };
                match udp_ask(udp_vip()) {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.push(format!("UDP: {e}"));
                        0
                    }
                };
            }
            failures
        })
    };
    // Counted requests, not seconds: the client must have run before, during and after the
    // agent's absence, however slow the machine.
    let served_more = |what: &str, more: usize| {
        let from = served.load(Ordering::Relaxed);
        eventually(what, CONVERGE, || {
            let now = served.load(Ordering::Relaxed);
            if now >= from + more {
                Ok(())
            } else {
                Err(format!("{} requests served", now - from))
            }
        });
    };
    served_more("the client runs", 10);
    let before = ipvsadm(&["-Ln"]);
    world.agent().kill9();
    served_more("requests are served while the agent is dead", 10);
    assert_eq!(
        without_weight_zero(&ipvsadm(&["-Ln"])).lines().count(),
        without_weight_zero(&before).lines().count(),
        "the table changed while the agent was dead"
    );
    world.agent().restart();
    world.wait_converged();
    let metrics = world.agent().metrics;
    eventually("the restarted agent serves /metrics", CONVERGE, || {
        cluster::http_get(metrics, "/metrics").ok_or_else(|| "no answer".to_owned())
    });
    served_more("requests are served after the restart", 10);
    stop.store(true, Ordering::Relaxed);
    let failures = client.join().expect("the client thread");
    let served = served.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        served + failures.len()
    );
    assert!(
        served > 20,
        "only {served} requests made it: the client barely ran"
    );
}

/// A foreign IPVS service (made with ipvsadm, as another tool would), removed on drop.
struct Foreign;

const FOREIGN: &str = "10.97.0.1:80";

impl Foreign {
    fn create() -> Self {
        sh_quiet(cluster::IPVSADM, &["-D", "-t", FOREIGN]);
        ipvsadm(&["-A", "-t", FOREIGN, "-s", "rr"]);
        ipvsadm(&["-a", "-t", FOREIGN, "-r", "10.244.2.12:8080", "-m"]);
        Foreign
    }
    fn present() -> bool {
        ipvsadm(&["-Ln"]).contains(&format!("TCP  {FOREIGN} rr"))
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        sh_quiet(cluster::IPVSADM, &["-D", "-t", FOREIGN]);
    }
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn cleanup_removes_ours_and_keeps_foreign() {
    let mut world = World::new("cleanup");
    let _foreign = Foreign::create();
    world.start_agent();
    world.wait_converged();
    assert!(
        Foreign::present(),
        "the agent removed a foreign IPVS service"
    );
    assert!(
        !list_owned().contains("10.97.0.1"),
        "topoproxy list claims the foreign service"
    );
    assert!(
        sh("/usr/sbin/ip", &["-4", "addr", "show", "dev", "kube-ipvs0"])
            .contains(&format!("{VIP}/32")),
        "the VIP is not on kube-ipvs0"
    );
    world.agent().kill9();
    topoproxy(&["cleanup"]);
    let shown = ipvsadm(&["-Ln"]);
    assert!(
        !shown.contains(&VIP.to_string()),
        "our service survived cleanup:\n{shown}"
    );
    assert!(
        Foreign::present(),
        "cleanup removed a foreign IPVS service:\n{shown}"
    );
    let addresses = std::process::Command::new("/usr/sbin/ip")
        .args(["-4", "addr", "show", "dev", "kube-ipvs0"])
        .output()
        .expect("starting ip addr");
    let addresses = String::from_utf8_lossy(&addresses.stdout);
    assert!(
        !addresses.contains(&VIP.to_string()),
        "the VIP survived cleanup on kube-ipvs0:\n{addresses}"
    );
    let tables = sh("/usr/sbin/nft", &["list", "tables"]);
    assert!(
        !tables.lines().any(|l| l.trim() == "table inet topoproxy"),
        "our nft table survived cleanup:\n{tables}"
    );
    // A second cleanup finds nothing to do and still spares the foreign service.
    topoproxy(&["cleanup"]);
    assert!(
        Foreign::present(),
        "a second cleanup removed the foreign service"
    );
}

/// A virtual server as kube-proxy's IPVS mode leaves it: its VIP on `kube-ipvs0`.
const KUBE_PROXY_VIP: &str = "10.96.200.1";

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn only_kube_proxy_cleanup_keeps_a_served_node_intact() {
    let mut world = World::new("only-kube-proxy");
    let _foreign = Foreign::create();
    world.start_agent();
    world.wait_converged();
    // kube-proxy's leftovers: a VIP on kube-ipvs0 and its virtual server.
    sh(
        "/usr/sbin/ip",
        &[
            "addr",
            "add",
            &format!("{KUBE_PROXY_VIP}/32"),
            "dev",
            "kube-ipvs0",
        ],
    );
    ipvsadm(&["-A", "-t", &format!("{KUBE_PROXY_VIP}:80"), "-s", "rr"]);
    let mut session = TcpSession::connect(tcp_vip()).expect("a connection through our VIP");
    let before = session.ask().expect("our VIP answers");

    let report = topoproxy(&["cleanup", "--only-kube-proxy"]);

    let shown = ipvsadm(&["-Ln"]);
    assert!(
        !shown.contains(KUBE_PROXY_VIP),
        "kube-proxy's virtual server survived:\n{shown}\n{report}"
    );
    let addresses = sh("/usr/sbin/ip", &["-4", "addr", "show", "dev", "kube-ipvs0"]);
    assert!(
        !addresses.contains(KUBE_PROXY_VIP),
        "kube-proxy's VIP survived on kube-ipvs0:\n{addresses}"
    );
    assert!(
        addresses.contains(&format!("{VIP}/32")),
        "our VIP was unbound:\n{addresses}"
    );
    assert!(Foreign::present(), "a foreign IPVS service was removed");
    let tables = sh("/usr/sbin/nft", &["list", "tables"]);
    assert!(
        tables.lines().any(|l| l.trim() == "table inet topoproxy"),
        "our nft table was removed:\n{tables}"
    );
    assert_eq!(
        without_weight_zero(&list_owned()),
        without_weight_zero(&world.fixture.plan(NODE)),
        "our table changed; cleanup said:\n{report}\nipvsadm -Ln:\n{shown}\nnft:\n{}",
        sh("/usr/sbin/nft", &["list", "table", "inet", "topoproxy"])
    );
    assert_eq!(
        session.ask().expect("the established connection survives"),
        before,
        "the established connection moved"
    );
    assert!(world.agent().running(), "the agent exited");
    assert_eq!(tcp_answers(4), names(&["a1", "a2"]), "new connections");
}
