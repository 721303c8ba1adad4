//! North-south in eBPF mode on the host kernel, with real traffic (needs root): the checks
//! of `support/north_south_world.rs`, where the world is drawn. The same checks run in the VM
//! on Debian's 6.1 kernel, through netlink filters instead of tcx (`vm_north_south_traffic`).
//! The `loadBalancerSourceRanges` tests below run on the host only.
//!
//! Benchmark (ignored; `cargo test --test host_north_south -- --ignored --nocapture bench_`):
//! request/response through the tc path against straight to the pod (a local and a remote
//! backend, and the remote one behind a load-balancer IP with source ranges), and the
//! conntrack map's memory.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/host.rs"]
mod host;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;
#[path = "support/traffic.rs"]
mod traffic;
#[path = "support/north_south_world.rs"]
#[macro_use]
mod world;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::SocketAddr;

use ipnetwork::IpNetwork;
use topoproxy::dataplane::ebpf::EbpfDataplane;
use topoproxy::dataplane::ProgrammedTable;
use topoproxy::model::{IpFamily, Protocol};
use topoproxy::table::{Frontend, SourceRanges, TrafficPolicy, VsKey};
use world::*;

/// One test per check of the world.
macro_rules! checks {
    ($($check:ident),* $(,)?) => {$(
        #[test]
        fn $check() {
            world::$check();
        }
    )*};
}

every_check!(checks);

#[test]
#[ignore = "benchmark: cargo test --test host_north_south -- --ignored --nocapture bench_"]
fn bench_request_response_through_tc_vs_direct() {
    let (world, mut dataplane) = programmed();
    // The load-balancer IP firewalled to the client, with the remote pod only: every packet
    // of its flows is checked against the ranges.
    let mut firewalled = table();
    let lb = VsKey::new(
        Protocol::Tcp,
        LB_IP.parse().expect("address"),
        EXTERNAL_PORT,
    );
    if let Some(service) = firewalled.get_mut(&lb) {
        service.destinations.retain(|(address, _), _| {
            *address == REMOTE_POD.parse::<std::net::IpAddr>().expect("pod")
        });
        let client: IpNetwork = format!("{CLIENT}/32").parse().expect("range");
        service.config.source_ranges = SourceRanges::for_frontend(&[client], IpFamily::V4, None);
    }
    sync(&mut dataplane, &firewalled);
    let total: usize = std::env::var("TOPOPROXY_BENCH_ROUND_TRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let chunk = 1_000.min(total);
    // (name, through tc, direct): a local backend (Local policy: DNAT only), a remote one
    // (externalIP: DNAT + SNAT, replies redirected) and the same behind a load-balancer IP
    // with source ranges, each against the same pod directly.
    let paths = [
        ("local pod", (NODE, NODE_PORT_LOCAL), (LOCAL_POD, POD_PORT)),
        (
            "remote pod",
            (EXTERNAL_IP, EXTERNAL_PORT),
            (REMOTE_POD, POD_PORT),
        ),
        (
            "remote pod, firewalled load-balancer IP",
            (LB_IP, EXTERNAL_PORT),
            (REMOTE_POD, POD_PORT),
        ),
    ];
    for (name, (via, via_port), (pod, pod_port)) in paths {
        let mut tc = session(&world, via, via_port);
        let mut direct = session(&world, pod, pod_port);
        round_trips(&mut tc.0, &mut tc.1, chunk);
        round_trips(&mut direct.0, &mut direct.1, chunk);
        let (mut through_tc, mut straight) = (Vec::new(), Vec::new());
        // Alternate chunks so both see the same machine load.
        for round in 0..total / chunk {
            if round.is_multiple_of(2) {
                through_tc.extend(round_trips(&mut tc.0, &mut tc.1, chunk));
                straight.extend(round_trips(&mut direct.0, &mut direct.1, chunk));
            } else {
                straight.extend(round_trips(&mut direct.0, &mut direct.1, chunk));
                through_tc.extend(round_trips(&mut tc.0, &mut tc.1, chunk));
            }
        }
        let rate = |l: &[u64]| l.len() as f64 / (l.iter().sum::<u64>() as f64 / 1e9);
        let p99 = |l: &mut Vec<u64>| {
            l.sort_unstable();
            l[l.len() * 99 / 100] as f64 / 1e3
        };
        let (tc_rate, direct_rate) = (rate(&through_tc), rate(&straight));
        println!(
            "{name}: {} round trips each; through tc {tc_rate:.0}/s p99 {:.1} us; \
             direct {direct_rate:.0}/s p99 {:.1} us; rate ratio direct/tc {:.3}",
            through_tc.len(),
            p99(&mut through_tc),
            p99(&mut straight),
            direct_rate / tc_rate
        );
    }
    let conntrack = world
        .settings
        .pin_dir
        .join(topoproxy_common::MAPS_DIR)
        .join(topoproxy_common::north_south::maps::CONNTRACK);
    let memlock = map_memlock(&conntrack);
    let entries = topoproxy_common::north_south::limits::CONNTRACK;
    println!(
        "TP_NS_CT: memlock {:.1} MiB for {entries} entries (preallocated LRU: the same at any \
         load; {:.0} bytes an entry; a flow takes 2 entries under Local policy, 3 to a local and 4 to a \
         remote backend under Cluster, so 100,000 flows need 200,000-400,000)",
        memlock as f64 / (1 << 20) as f64,
        memlock as f64 / f64::from(entries)
    );
}

// ---- loadBalancerSourceRanges (kube-proxy's firewall for load-balancer frontends) ----

/// Second addresses of the client, outside the ranges these tests allow.
const OUTSIDER: &str = "10.77.0.9";
const OUTSIDER6: &str = "fd77::8";
/// A load-balancer IPv6 address, routed to the node like the externalIPs.
const LB_IP6: &str = "fd77:100::20";
/// A load-balancer port whose ranges include a zero-masked one: no firewall.
const OPEN_PORT: u16 = 81;

/// The world's table with the load-balancer frontends firewalled: `LB_IP:80` (TCP and UDP)
/// and `[LB_IP6]:80` to `v4`/`v6` (none: open), `LB_IP:81` behind `0.0.0.0/0` and a /32.
fn firewalled_table(v4: &[&str], v6: &[&str]) -> ProgrammedTable {
    let mut table = table();
    service(
        &mut table,
        Protocol::Udp,
        (LB_IP, EXTERNAL_PORT),
        Frontend::LoadBalancer,
        TrafficPolicy::Cluster,
        None,
        &[LOCAL_POD, REMOTE_POD],
    );
    service(
        &mut table,
        Protocol::Tcp,
        (LB_IP6, EXTERNAL_PORT),
        Frontend::LoadBalancer,
        TrafficPolicy::Cluster,
        None,
        &[LOCAL_POD6, REMOTE_POD6],
    );
    service(
        &mut table,
        Protocol::Tcp,
        (LB_IP, OPEN_PORT),
        Frontend::LoadBalancer,
        TrafficPolicy::Cluster,
        None,
        &[LOCAL_POD, REMOTE_POD],
    );
    let ranges = |texts: &[&str], family| {
        let nets: Vec<IpNetwork> = texts.iter().map(|t| t.parse().expect("range")).collect();
        SourceRanges::for_frontend(&nets, family, Some(NODE.parse().expect("node")))
    };
    let firewall = [
        (
            Protocol::Tcp,
            LB_IP,
            EXTERNAL_PORT,
            ranges(v4, IpFamily::V4),
        ),
        (
            Protocol::Udp,
            LB_IP,
            EXTERNAL_PORT,
            ranges(v4, IpFamily::V4),
        ),
        (
            Protocol::Tcp,
            LB_IP6,
            EXTERNAL_PORT,
            ranges(v6, IpFamily::V6),
        ),
        (
            Protocol::Tcp,
            LB_IP,
            OPEN_PORT,
            ranges(&["0.0.0.0/0", "10.77.0.2/32"], IpFamily::V4),
        ),
    ];
    for (protocol, address, port, ranges) in firewall {
        let key = VsKey::new(protocol, address.parse().expect("address"), port);
        table.get_mut(&key).expect("frontend").config.source_ranges = ranges;
    }
    table
}

/// A world whose client also holds [`OUTSIDER`] and [`OUTSIDER6`], with `table` programmed.
fn firewalled_world(table: &ProgrammedTable) -> (World, EbpfDataplane) {
    let world = World::new();
    let status = std::process::Command::new(IP)
        .args([
            "-n",
            &world.client,
            "addr",
            "add",
            &format!("{OUTSIDER}/24"),
        ])
        .args(["dev", &format!("tnc{}", world.id)])
        .status()
        .expect("ip");
    assert!(status.success(), "adding {OUTSIDER}");
    let status = std::process::Command::new(IP)
        .args([
            "-n",
            &world.client,
            "addr",
            "add",
            &format!("{OUTSIDER6}/64"),
        ])
        .args(["dev", &format!("tnc{}", world.id), "nodad"])
        .status()
        .expect("ip");
    assert!(status.success(), "adding {OUTSIDER6}");
    let (mut dataplane, _) = world.attach(world.open());
    sync(&mut dataplane, table);
    (world, dataplane)
}

/// A TCP exchange with `address:port` from the client's `source`.
fn tcp_from(world: &World, source: &str, address: &str, port: u16) -> std::io::Result<String> {
    let stream = connect_from(world, source, address, port, DROP_TIMEOUT)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut greeting = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut greeting)?;
    Ok(greeting.trim().to_owned())
}

/// A TCP connection to `address:port` from the client's `source`, within `timeout`.
fn connect_from(
    world: &World,
    source: &str,
    address: &str,
    port: u16,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    let source = SocketAddr::new(source.parse().expect("source"), 0);
    let target = SocketAddr::new(address.parse().expect("address"), port);
    within(&world.client, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&source.into())?;
        socket.connect_timeout(&target.into(), timeout)?;
        Ok(std::net::TcpStream::from(socket))
    })
}

/// A UDP exchange with `address:port` from the client's `source`.
fn udp_from(world: &World, source: &str, address: &str, port: u16) -> std::io::Result<String> {
    let source = SocketAddr::new(source.parse().expect("source"), 0);
    let target = SocketAddr::new(address.parse().expect("address"), port);
    within(&world.client, move || {
        let socket = std::net::UdpSocket::bind(source)?;
        socket.set_read_timeout(Some(DROP_TIMEOUT))?;
        socket.send_to(b"hello", target)?;
        let mut buf = [0u8; 512];
        let (len, _) = socket.recv_from(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    })
}

/// Served from `source`: a backend answers (the greeting names it and the peer it saw).
fn assert_served(world: &World, source: &str, address: &str, port: u16) {
    let answer = tcp_from(world, source, address, port)
        .unwrap_or_else(|error| panic!("{source} → {address}:{port} not served: {error}"));
    assert!(
        answer.starts_with("local ") || answer.starts_with("remote "),
        "{source} → {address}:{port}: {answer:?}"
    );
}

/// Dropped from `source`: the connect times out, and the same source is answered by the
/// NodePort right after (so the timeout is the firewall's, not the network's).
fn assert_dropped(world: &World, source: &str, address: &str, port: u16, node: &str) {
    let error = tcp_from(world, source, address, port)
        .expect_err(&format!("{source} → {address}:{port} must be dropped"));
    assert!(
        matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "{source} → {address}:{port}: expected a drop (timeout), got {error}"
    );
    assert_served(world, source, node, NODE_PORT);
}

/// kube-proxy's `loadBalancerSourceRanges` in the tc path, with real traffic: a client inside
/// the ranges is served, one outside them times out (IPv4 TCP and UDP, IPv6), and a
/// zero-masked range leaves the frontend open.
#[test]
fn load_balancer_source_ranges_admit_only_sources_inside_them() {
    let desired = firewalled_table(&["10.77.0.0/29", "192.0.2.0/24"], &["fd77::/125"]);
    let (world, _dataplane) = firewalled_world(&desired);

    assert_served(&world, CLIENT, LB_IP, EXTERNAL_PORT);
    assert_dropped(&world, OUTSIDER, LB_IP, EXTERNAL_PORT, NODE);

    let answer = udp_from(&world, CLIENT, LB_IP, EXTERNAL_PORT).expect("UDP inside the range");
    assert!(
        answer.starts_with("local ") || answer.starts_with("remote "),
        "{answer}"
    );
    let error = udp_from(&world, OUTSIDER, LB_IP, EXTERNAL_PORT)
        .expect_err("UDP outside the range must be dropped");
    assert!(
        matches!(error.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "{error}"
    );
    let answer = udp_from(&world, OUTSIDER, NODE, NODE_PORT).expect("the NodePort over UDP");
    assert!(
        answer.starts_with("local ") || answer.starts_with("remote "),
        "{answer}"
    );

    assert_served(&world, CLIENT6, LB_IP6, EXTERNAL_PORT);
    assert_dropped(&world, OUTSIDER6, LB_IP6, EXTERNAL_PORT, NODE6);

    for source in [CLIENT, OUTSIDER] {
        assert_served(&world, source, LB_IP, OPEN_PORT);
    }
}

/// A change of the ranges applies to the very next new flow and to flows already running
/// (kube-proxy's filter drops every packet of a source outside them), and removing them opens
/// the frontend.
#[test]
fn a_source_range_change_applies_to_new_and_running_flows() {
    let before = firewalled_table(&["10.77.0.2/32"], &[]);
    let (world, mut dataplane) = firewalled_world(&before);
    assert_served(&world, CLIENT, LB_IP, EXTERNAL_PORT);
    assert_dropped(&world, OUTSIDER, LB_IP, EXTERNAL_PORT, NODE);
    let mut running = hold(&world, CLIENT, LB_IP, EXTERNAL_PORT);
    echo(&mut running).expect("a running flow inside the ranges");

    sync(&mut dataplane, &firewalled_table(&["10.77.0.9/32"], &[]));
    assert_served(&world, OUTSIDER, LB_IP, EXTERNAL_PORT);
    assert_dropped(&world, CLIENT, LB_IP, EXTERNAL_PORT, NODE);
    echo(&mut running).expect_err("the running flow's source left the ranges");

    sync(&mut dataplane, &firewalled_table(&[], &[]));
    for source in [CLIENT, OUTSIDER] {
        assert_served(&world, source, LB_IP, EXTERNAL_PORT);
    }
    let mut running = hold(&world, CLIENT, LB_IP, EXTERNAL_PORT);
    echo(&mut running).expect("a running flow to the open frontend");

    // Ranges added while it runs: it is cut too.
    sync(&mut dataplane, &firewalled_table(&["10.77.0.9/32"], &[]));
    echo(&mut running).expect_err("the running flow's source is outside the new ranges");
    assert_served(&world, OUTSIDER, LB_IP, EXTERNAL_PORT);
}

/// A TCP connection from the client's `source` kept open, its greeting read.
fn hold(
    world: &World,
    source: &str,
    address: &str,
    port: u16,
) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
    let stream = connect_from(world, source, address, port, ANSWER_TIMEOUT).expect("connect");
    // Short: a dropped echo is recognised by its timeout.
    stream
        .set_read_timeout(Some(DROP_TIMEOUT))
        .expect("read timeout");
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    std::io::BufRead::read_line(&mut reader, &mut greeting).expect("greeting");
    (stream, reader)
}

/// One echo round trip on a held connection.
fn echo(
    (stream, reader): &mut (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>),
) -> std::io::Result<()> {
    std::io::Write::write_all(stream, b"still-there\n")?;
    let mut line = String::new();
    std::io::BufRead::read_line(reader, &mut line)?;
    if line != "still-there\n" {
        return Err(std::io::Error::other(format!("bad echo {line:?}")));
    }
    Ok(())
}

/// The backend Maglev gives a client at `source` among `pods` (in the tc path the client's
/// hash is its source address as the packet carries it).
fn maglev_choice(pods: &[&'static str], source: &str) -> &'static str {
    let endpoints: Vec<(std::net::IpAddr, u16)> = pods
        .iter()
        .map(|pod| (pod.parse().expect("pod"), POD_PORT))
        .collect();
    let table = topoproxy::dataplane::ebpf::maglev::table(&endpoints).expect("a table");
    let source: std::net::Ipv4Addr = source.parse().expect("source");
    let words = [u32::from_ne_bytes(source.octets()), 0, 0, 0];
    let hash = topoproxy_common::client_hash(&words, 0);
    let pod = pods[usize::from(table[hash as usize % topoproxy_common::MAGLEV_SIZE])];
    if pod == LOCAL_POD {
        "local"
    } else {
        "remote"
    }
}

/// The backend (its name) each client source reaches over ten connections; each must be one.
fn held_from(world: &World, sources: &[String], port: u16) -> Vec<String> {
    sources
        .iter()
        .map(|source| {
            let names: BTreeSet<String> = (0..10)
                .map(|_| {
                    let answer = tcp_from(world, source, NODE, port)
                        .unwrap_or_else(|error| panic!("{source}: {error}"));
                    answer.split_whitespace().next().unwrap_or("").to_owned()
                })
                .collect();
            assert_eq!(names.len(), 1, "{source} reached {names:?}");
            names.into_iter().next().unwrap_or_default()
        })
        .collect()
}

/// Issue 29, `mh` in the tc path: clients outside the node, from fixed source addresses,
/// each keep the backend the Maglev table gives their address over repeated connections
/// (random choice moves them), move when it is removed and the others stay, and come back
/// to it when it returns (the table depends only on the set of backends).
#[test]
fn an_mh_node_port_keeps_each_client_address_on_its_backend() {
    let sources: Vec<String> = (10..18).map(|n| format!("10.77.0.{n}")).collect();
    let world = World::new();
    for source in &sources {
        let status = std::process::Command::new(IP)
            .args(["-n", &world.client, "addr", "add", &format!("{source}/24")])
            .args(["dev", &format!("tnc{}", world.id)])
            .status()
            .expect("ip");
        assert!(status.success(), "adding {source}");
    }
    let (mut dataplane, _) = world.attach(world.open());
    let key = VsKey::new(Protocol::Tcp, NODE.parse().expect("node"), NODE_PORT);
    let mut desired = table();
    desired
        .get_mut(&key)
        .expect("the NodePort")
        .config
        .scheduler = topoproxy::scheduler::Scheduler::parse("mh").expect("a scheduler");
    sync(&mut dataplane, &desired);

    let both = [LOCAL_POD, REMOTE_POD];
    let before = held_from(&world, &sources, NODE_PORT);
    for (source, held) in sources.iter().zip(&before) {
        assert_eq!(held, maglev_choice(&both, source), "{source}");
    }

    // The remote pod goes: its clients move to the local one, the local one's stay.
    let mut local_only = desired.clone();
    local_only
        .get_mut(&key)
        .expect("the NodePort")
        .destinations
        .retain(|(address, _), _| *address == LOCAL_POD.parse::<std::net::IpAddr>().expect("pod"));
    sync(&mut dataplane, &local_only);
    let during = held_from(&world, &sources, NODE_PORT);
    assert!(during.iter().all(|held| held == "local"), "{during:?}");

    // Back again: every client returns to the backend it had.
    sync(&mut dataplane, &desired);
    assert_eq!(held_from(&world, &sources, NODE_PORT), before);
}
