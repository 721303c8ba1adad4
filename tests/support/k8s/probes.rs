//! Real traffic as the parity oracle (tests/vm_k8s_parity.rs): the same probes through
//! kube-proxy's node and topoproxy's twin, their outcomes relabelled so the two compare as
//! values.
//!
//! A probe is one client (a pod on the twin, the twin itself, an outside client inside or
//! outside a Service's source ranges, a backend pod reaching its own Service) asking one
//! Service address. It connects again until it has seen every real server its twin's table
//! weighs in (IPVS balances, so one connection would show one backend at random), or it
//! gives up; its outcome is the set of what answered and which source address the answer saw,
//! or how it failed.
//!
//! Include with `#[path = "support/k8s/probes.rs"] mod probes;` beside `support/netns.rs`
//! and `support/k8s/ipvs_table.rs`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::within;

/// How long one connection or datagram may take before it counts as unanswered. Anything
/// that answers at all does so in milliseconds, also under emulation; a dropped SYN is
/// retransmitted only after a second.
pub const UNANSWERED_AFTER: Duration = Duration::from_millis(1500);

/// The port of the node's own listener on every twin (not a Service port anywhere).
pub const NODE_LISTENER_PORT: u16 = 7777;
/// What the node's own listener answers with.
pub const NODE_LISTENER: &str = "node-listener";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

/// One client asking one address.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Who asks, as the comparison names it (`pod`, `node`, `outside-in`, ...).
    pub client: &'static str,
    /// The client's network namespace (`/run/netns/...`).
    pub netns: String,
    /// The source address to bind, for clients with several addresses.
    pub source: Option<IpAddr>,
    pub transport: Transport,
    pub target: SocketAddr,
    /// How many distinct real servers may answer (weights above zero in the twin's table).
    pub backends: usize,
    /// The virtual server is persistent (session affinity): one client sees one backend,
    /// which of them depends on the order the agent added them; only the outcome's kind is
    /// compared.
    pub persistent: bool,
}

/// How one connection ended, before relabelling.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    /// The text the server sent: `<name> <peer address>`.
    Answered(String),
    Refused,
    /// Timed out, or an ICMP host/network unreachable came back: one outcome, since which of
    /// the two a client sees for a packet sent towards an address nobody has depends on
    /// whether the ICMP error is relayed back through an IPVS connection in time (the first
    /// runs saw both, at random, through either twin).
    Unanswered,
    Failed(String),
}

/// Asks `target` once from inside `netns`.
pub fn ask_once(
    netns: &str,
    source: Option<IpAddr>,
    transport: Transport,
    target: SocketAddr,
) -> Answer {
    within(netns, move || match transport {
        Transport::Tcp => ask_tcp(source, target),
        Transport::Udp => ask_udp(source, target),
    })
}

fn classify(error: &std::io::Error) -> Answer {
    match error.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Answer::Refused,
        ErrorKind::TimedOut
        | ErrorKind::WouldBlock
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable => Answer::Unanswered,
        _ => Answer::Failed(format!("{:?}", error.kind())),
    }
}

fn socket_for(target: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    Socket::new(domain, kind, Some(protocol))
}

fn ask_tcp(source: Option<IpAddr>, target: SocketAddr) -> Answer {
    let attempt = || -> std::io::Result<String> {
        let socket = socket_for(target, Type::STREAM, Protocol::TCP)?;
        if let Some(source) = source {
            socket.bind(&SocketAddr::new(source, 0).into())?;
        }
        socket.connect_timeout(&target.into(), UNANSWERED_AFTER)?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(UNANSWERED_AFTER))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    };
    match attempt() {
        Ok(text) if text.is_empty() => Answer::Failed("closed without an answer".to_owned()),
        Ok(text) => Answer::Answered(text),
        Err(e) => classify(&e),
    }
}

fn ask_udp(source: Option<IpAddr>, target: SocketAddr) -> Answer {
    let attempt = || -> std::io::Result<String> {
        let socket = socket_for(target, Type::DGRAM, Protocol::UDP)?;
        let any: IpAddr = if target.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        socket.bind(&SocketAddr::new(source.unwrap_or(any), 0).into())?;
        let socket: UdpSocket = socket.into();
        socket.connect(target)?;
        socket.set_read_timeout(Some(UNANSWERED_AFTER))?;
        socket.send(b"probe")?;
        let mut buffer = [0u8; 256];
        let n = socket.recv(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
    };
    match attempt() {
        Ok(text) => Answer::Answered(text),
        Err(e) => classify(&e),
    }
}

/// The outcome of a probe: every distinct relabelled answer it saw.
pub fn run(probe: &Probe, label: &impl Fn(&str) -> String) -> BTreeSet<String> {
    let wanted = probe.backends.max(1);
    let attempts = if probe.persistent { 2 } else { 2 * wanted + 1 };
    let mut answered = BTreeSet::new();
    let mut failures = BTreeSet::new();
    for attempt in 0..attempts {
        match ask_once(&probe.netns, probe.source, probe.transport, probe.target) {
            Answer::Answered(text) => {
                answered.insert(relabel_answer(&text, label, probe.persistent));
            }
            failure => {
                failures.insert(format!("{failure:?}").to_lowercase());
            }
        }
        let seen_every_backend = answered.len() >= wanted || probe.persistent;
        let nothing_answers = answered.is_empty() && attempt >= 1;
        if (seen_every_backend && !answered.is_empty()) || nothing_answers {
            break;
        }
    }
    answered.into_iter().chain(failures).collect()
}

/// `<name> <peer>` relabelled word by word; a persistent server's answer is only "answered"
/// and the kind of source it saw would depend on which backend its first connection picked.
fn relabel_answer(text: &str, label: &impl Fn(&str) -> String, persistent: bool) -> String {
    if persistent {
        return "answered".to_owned();
    }
    let words: Vec<String> = text.split_whitespace().map(label).collect();
    format!("answered by {}", words.join(" seeing "))
}

/// What each probe saw, keyed `<client> -> <PROTO> <target>`, with the target relabelled.
pub fn outcomes(
    probes: &[Probe],
    label: &(impl Fn(&str) -> String + Sync),
) -> BTreeMap<String, BTreeSet<String>> {
    probes
        .iter()
        .map(|probe| {
            let target = match probe.target.ip() {
                IpAddr::V4(_) => format!(
                    "{}:{}",
                    label(&probe.target.ip().to_string()),
                    probe.target.port()
                ),
                IpAddr::V6(_) => format!(
                    "[{}]:{}",
                    label(&probe.target.ip().to_string()),
                    probe.target.port()
                ),
            };
            let key = format!("{} -> {} {target}", probe.client, probe.transport.name());
            (key, run(probe, label))
        })
        .collect()
}

/// The lines on which two outcome maps differ (`kube-proxy` left, `topoproxy` right).
pub fn differences(
    left: &BTreeMap<String, BTreeSet<String>>,
    right: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = left.keys().chain(right.keys()).collect();
    let show = |set: Option<&BTreeSet<String>>| {
        set.map(|s| s.iter().cloned().collect::<Vec<_>>().join(", "))
            .unwrap_or_else(|| "not probed".to_owned())
    };
    keys.into_iter()
        .filter(|key| left.get(*key) != right.get(*key))
        .map(|key| {
            format!(
                "probe {key}: kube-proxy {}; topoproxy {}",
                show(left.get(key)),
                show(right.get(key))
            )
        })
        .collect()
}

/// A TCP server on `port` (both families) and a UDP one, inside a namespace, each answering
/// with `name` and the peer address it saw, for as long as the test process runs.
pub fn serve(netns: &str, tcp_ports: &[u16], udp_ports: &[u16], name: String) {
    for &port in tcp_ports {
        let listener = within(netns, move || dual_stack_tcp(port))
            .unwrap_or_else(|e| panic!("listening on TCP {port} in {}: {e}", netns));
        let name = name.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let peer = stream
                    .peer_addr()
                    .map(|p| p.ip().to_canonical().to_string())
                    .unwrap_or_default();
                let _ = stream.write_all(format!("{name} {peer}").as_bytes());
            }
        });
    }
    for &port in udp_ports {
        let socket = within(netns, move || dual_stack_udp(port))
            .unwrap_or_else(|e| panic!("listening on UDP {port} in {}: {e}", netns));
        let name = name.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 64];
            while let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                let reply = format!("{name} {}", peer.ip().to_canonical());
                let _ = socket.send_to(reply.as_bytes(), peer);
            }
        });
    }
}

fn dual_stack_tcp(port: u16) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(IpAddr::from([0u16; 8]), port).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn dual_stack_udp(port: u16) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::new(IpAddr::from([0u16; 8]), port).into())?;
    Ok(socket.into())
}

/// Who asks, on one twin.
#[derive(Clone, Debug)]
pub struct Clients {
    /// The twin's own namespace (`node`).
    pub node_netns: String,
    /// A pod on the twin, inside `cluster-cidr` but no Service's backend (`pod`).
    pub pod_netns: String,
    /// The outside client's namespace and its source addresses routed to this twin:
    /// `(IPv4, IPv6)` inside the corpus's source ranges and outside them.
    pub outside_netns: String,
    pub outside_in: (IpAddr, IpAddr),
    pub outside_out: (IpAddr, IpAddr),
    /// The twin's addresses NodePorts are asked at: InternalIP(s) and a second address.
    pub node_addresses: Vec<IpAddr>,
}

/// A backend pod of the scenario on this twin, which asks its own Service (`hairpin`).
#[derive(Clone, Debug)]
pub struct Backend {
    pub app: String,
    pub netns: String,
    pub ready: bool,
}

/// Every probe of `services` through one twin, weighed by that twin's `table`.
pub fn plan(
    clients: &Clients,
    services: &[k8s_openapi::api::core::v1::Service],
    table: &[crate::ipvs_table::VirtualServer],
    backends: &[Backend],
) -> Vec<Probe> {
    let mut probes = Vec::new();
    let mut listener_addresses = BTreeSet::new();
    for service in services {
        let Some(spec) = service.spec.as_ref() else {
            continue;
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let external: Vec<IpAddr> = spec
            .external_ips
            .iter()
            .flatten()
            .cloned()
            .chain(
                service
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| i.ip),
            )
            .filter_map(|ip| ip.parse().ok())
            .collect();
        listener_addresses.extend(cluster_ips.iter().chain(&external).copied());
        let families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv6).collect();
        let selector_app = spec
            .selector
            .as_ref()
            .and_then(|s| s.get("app"))
            .cloned()
            .unwrap_or_default();
        let hairpin = backends
            .iter()
            .find(|b| b.ready && b.app == selector_app)
            .map(|b| b.netns.clone());
        for port in spec.ports.iter().flatten() {
            let transport = match port.protocol.as_deref() {
                None | Some("TCP") => Transport::Tcp,
                Some("UDP") => Transport::Udp,
                _ => continue,
            };
            let service_port = u16::try_from(port.port).unwrap_or(0);
            let mut targets: Vec<SocketAddr> = cluster_ips
                .iter()
                .chain(&external)
                .map(|ip| SocketAddr::new(*ip, service_port))
                .collect();
            if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                targets.extend(
                    clients
                        .node_addresses
                        .iter()
                        .filter(|ip| families.contains(&ip.is_ipv6()))
                        .map(|ip| SocketAddr::new(*ip, node_port)),
                );
            }
            for target in targets {
                let weighed = weigh(table, transport, target);
                let mut ask = |client: &'static str, netns: &str, source: Option<IpAddr>| {
                    probes.push(Probe {
                        client,
                        netns: netns.to_owned(),
                        source,
                        transport,
                        target,
                        backends: weighed.0,
                        persistent: weighed.1,
                    });
                };
                every_client(clients, target.ip(), &mut ask);
                if let (Some(netns), true) = (&hairpin, cluster_ips.contains(&target.ip())) {
                    ask("hairpin", netns, None);
                }
            }
        }
    }
    // The node's own listener on a Service address, at a port no Service has.
    for address in listener_addresses {
        let target = SocketAddr::new(address, NODE_LISTENER_PORT);
        every_client(clients, address, &mut |client, netns, source| {
            probes.push(Probe {
                client,
                netns: netns.to_owned(),
                source,
                transport: Transport::Tcp,
                target,
                backends: 1,
                persistent: false,
            });
        });
    }
    probes
}

/// `ask(client, netns, source)` for the pod, the node and both outside clients.
fn every_client(
    clients: &Clients,
    target: IpAddr,
    ask: &mut impl FnMut(&'static str, &str, Option<IpAddr>),
) {
    let pick = |pair: (IpAddr, IpAddr)| if target.is_ipv4() { pair.0 } else { pair.1 };
    ask("pod", &clients.pod_netns, None);
    ask("node", &clients.node_netns, None);
    ask(
        "outside-in",
        &clients.outside_netns,
        Some(pick(clients.outside_in)),
    );
    ask(
        "outside-out",
        &clients.outside_netns,
        Some(pick(clients.outside_out)),
    );
}

/// `(real servers weighed above zero, persistent)` of the virtual server at `target`.
fn weigh(
    table: &[crate::ipvs_table::VirtualServer],
    transport: Transport,
    target: SocketAddr,
) -> (usize, bool) {
    table
        .iter()
        .find(|vs| vs.protocol == transport.name() && vs.address == target)
        .map(|vs| {
            let weighed = vs
                .real_servers
                .iter()
                .filter(|(_, rest)| rest.split_whitespace().nth(1) != Some("0"))
                .count();
            (weighed, vs.options.contains("persistent"))
        })
        .unwrap_or((0, false))
}
