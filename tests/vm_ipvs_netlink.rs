//! The IPVS netlink client against a real kernel, checked with the real `ipvsadm -Ln`.
//! Runs inside the VM (`cargo xtask vm-test --test vm_ipvs_netlink`, root, ip_vs loaded), one
//! test at a time: every test starts and ends with an empty IPVS table (`ipvsadm -C` in a
//! guard) and removes the dummy link it made for routes.

#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use netns::IP;
use process::sh;
use topoproxy::dataplane::ipvs::netlink::{
    Acknowledgements, Command, Forward, IpvsClient, IpvsDestination, IpvsError, IpvsService,
    IpvsTimeouts, MessageCounts, ServiceId,
};
use topoproxy::dataplane::ipvs::records::{judge_records, Probe};
use topoproxy::model::Protocol;
use topoproxy::table::VsKey;

const IPVSADM: &str = "/usr/sbin/ipvsadm";

/// Empties the IPVS table now and when dropped, even if the test panics.
struct CleanIpvs;

impl CleanIpvs {
    fn new() -> Self {
        sh(IPVSADM, &["-C"]);
        Self
    }
}

impl Drop for CleanIpvs {
    fn drop(&mut self) {
        let _ = Process::new(IPVSADM).arg("-C").status();
    }
}

/// A dummy link holding 10.244.255.254/16 and fd00:244::ffff/64: IPVS wants a route to its
/// real servers (docs/testing.md).
struct RouteLink;

const LINK: &str = "tpnl0";

impl RouteLink {
    fn new() -> Self {
        // A leftover from an aborted run.
        let _ = Process::new(IP)
            .args(["link", "del", LINK])
            .stderr(Stdio::null())
            .status();
        sh(IP, &["link", "add", LINK, "type", "dummy"]);
        let link = Self;
        sh(IP, &["link", "set", LINK, "up"]);
        sh(IP, &["addr", "add", "10.244.255.254/16", "dev", LINK]);
        sh(
            IP,
            &[
                "-6",
                "addr",
                "add",
                "fd00:244::ffff/64",
                "dev",
                LINK,
                "nodad",
            ],
        );
        link
    }
}

impl Drop for RouteLink {
    fn drop(&mut self) {
        let _ = Process::new(IP).args(["link", "del", LINK]).status();
    }
}

fn id(protocol: Protocol, address: &str, port: u16) -> ServiceId {
    ServiceId {
        protocol,
        address: address.parse().expect("address"),
        port,
    }
}

fn service(id: ServiceId, scheduler: &str, persistence: Option<u32>) -> IpvsService {
    IpvsService {
        id,
        scheduler: scheduler.into(),
        scheduler_flags: 0,
        persistence_timeout: persistence,
    }
}

fn dest(address: &str, port: u16, weight: u32) -> IpvsDestination {
    IpvsDestination {
        address: address.parse().expect("address"),
        port,
        weight,
        forward: Forward::Masq,
        active_connections: 0,
        inactive_connections: 0,
    }
}

/// A listing: per service (`TCP 10.96.0.10:80`), its scheduler and flags text and its real
/// servers as (address:port, forward, weight).
type Listing = BTreeMap<String, (String, BTreeSet<(String, String, u32)>)>;

/// `ipvsadm -Ln`, parsed.
fn ipvsadm_listing() -> Listing {
    let text = sh(IPVSADM, &["-Ln"]);
    let mut listing = Listing::new();
    let mut current = None;
    for line in text.lines().skip(3) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() == Some(&"->") {
            let key = current.clone().expect("a real server under a service");
            let weight = fields[3].parse().expect("weight");
            listing.get_mut(&key).expect("service listed").1.insert((
                fields[1].to_owned(),
                fields[2].to_owned(),
                weight,
            ));
        } else if fields.len() >= 3 {
            let key = format!("{} {}", fields[0], fields[1]);
            listing.insert(key.clone(), (fields[2..].join(" "), BTreeSet::new()));
            current = Some(key);
        }
    }
    listing
}

fn forward_name(forward: Forward) -> &'static str {
    match forward {
        Forward::Masq => "Masq",
        Forward::Local => "Local",
        Forward::Tunnel => "Tunnel",
        Forward::Route => "Route",
        Forward::Bypass => "Bypass",
    }
}

/// What the client reads back, in `ipvsadm -Ln`'s words.
fn client_listing(client: &mut IpvsClient) -> Listing {
    let mut listing = Listing::new();
    for service in client.services().expect("services") {
        let flags = match service.persistence_timeout {
            Some(timeout) => format!("{} persistent {timeout}", service.scheduler),
            None => service.scheduler.clone(),
        };
        let dests = client
            .destinations(&service.id)
            .expect("destinations")
            .into_iter()
            .map(|d| {
                (
                    SocketAddr::new(d.address, d.port).to_string(),
                    forward_name(d.forward).to_owned(),
                    d.weight,
                )
            })
            .collect();
        listing.insert(service.id.to_string(), (flags, dests));
    }
    listing
}

fn expect_all_ok(results: Vec<Result<(), IpvsError>>) {
    let failures: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
}

fn delta(after: MessageCounts, before: MessageCounts) -> MessageCounts {
    MessageCounts {
        new_service: after.new_service - before.new_service,
        set_service: after.set_service - before.set_service,
        del_service: after.del_service - before.del_service,
        new_destination: after.new_destination - before.new_destination,
        set_destination: after.set_destination - before.set_destination,
        del_destination: after.del_destination - before.del_destination,
        get_service: after.get_service - before.get_service,
        dump_services: after.dump_services - before.dump_services,
        dump_destinations: after.dump_destinations - before.dump_destinations,
        other: after.other - before.other,
    }
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn info_is_what_ipvsadm_prints() {
    let _clean = CleanIpvs::new();
    let mut client = IpvsClient::connect().expect("connect");
    let info = client.info().expect("info");
    let (major, minor, patch) = info.version;
    let line = format!(
        "IP Virtual Server version {major}.{minor}.{patch} (size={})",
        info.table_size
    );
    let listed = sh(IPVSADM, &["-Ln"]);
    assert_eq!(listed.lines().next(), Some(line.as_str()));
    eprintln!("family id {:#x}: {line}", client.family_id());
}

/// `ipvsadm -L --timeout`'s three numbers.
fn ipvsadm_timeouts() -> IpvsTimeouts {
    let text = sh(IPVSADM, &["-L", "--timeout"]);
    let numbers: Vec<u32> = text
        .split_once(':')
        .map(|(_, numbers)| numbers)
        .unwrap_or_else(|| panic!("no timeouts in {text:?}"))
        .split_whitespace()
        .map(|n| n.parse().expect("a number of seconds"))
        .collect();
    assert_eq!(numbers.len(), 3, "{text}");
    IpvsTimeouts {
        tcp: numbers[0],
        tcp_fin: numbers[1],
        udp: numbers[2],
    }
}

/// Puts the kernel's timeouts back when dropped, even if the test panics.
struct RestoreTimeouts(IpvsTimeouts);

impl Drop for RestoreTimeouts {
    fn drop(&mut self) {
        let t = self.0;
        let _ = Process::new(IPVSADM)
            .args([
                "--set",
                &t.tcp.to_string(),
                &t.tcp_fin.to_string(),
                &t.udp.to_string(),
            ])
            .status();
    }
}

/// kube-proxy's `ipvs.tcpTimeout`/`tcpFinTimeout`/`udpTimeout` as `ipvsadm --set` sets them:
/// what the client sets is what `ipvsadm -L --timeout` prints and what the client reads back;
/// a 0 leaves that timeout alone.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn timeouts_set_over_netlink_are_what_ipvsadm_lists() {
    let mut client = IpvsClient::connect().expect("connect");
    let before = ipvsadm_timeouts();
    let _restore = RestoreTimeouts(before);
    assert_eq!(client.timeouts().expect("get timeouts"), before);
    let wanted = IpvsTimeouts {
        tcp: 1234,
        tcp_fin: 56,
        udp: 78,
    };
    assert_ne!(wanted, before, "the test must change something");
    client.set_timeouts(&wanted).expect("set timeouts");
    assert_eq!(ipvsadm_timeouts(), wanted);
    assert_eq!(client.timeouts().expect("get timeouts"), wanted);
    client
        .set_timeouts(&IpvsTimeouts {
            tcp: 0,
            tcp_fin: 90,
            udp: 0,
        })
        .expect("set one timeout");
    assert_eq!(
        ipvsadm_timeouts(),
        IpvsTimeouts {
            tcp_fin: 90,
            ..wanted
        }
    );
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn create_edit_delete_services_and_destinations() {
    use Protocol::{Sctp, Tcp, Udp};
    let _clean = CleanIpvs::new();
    let _route = RouteLink::new();
    let mut client = IpvsClient::connect().expect("connect");
    let tcp4 = id(Tcp, "10.96.0.10", 80);
    let udp4 = id(Udp, "10.96.0.10", 53);
    let sctp4 = id(Sctp, "10.96.0.11", 9000);
    let tcp6 = id(Tcp, "fd00::10", 80);
    let udp6 = id(Udp, "fd00::10", 53);
    let sctp6 = id(Sctp, "fd00::11", 9000);
    expect_all_ok(client.execute(&[
        Command::NewService(service(tcp4, "rr", None)),
        Command::NewService(service(udp4, "wrr", Some(300))),
        Command::NewService(service(sctp4, "sh", None)),
        Command::NewService(service(tcp6, "rr", Some(60))),
        Command::NewService(service(udp6, "wrr", None)),
        Command::NewService(service(sctp6, "rr", None)),
        Command::NewDestination(tcp4, dest("10.244.1.5", 8080, 1)),
        Command::NewDestination(tcp4, dest("10.244.1.6", 8080, 2)),
        Command::NewDestination(udp4, dest("10.244.1.7", 5353, 3)),
        Command::NewDestination(sctp4, dest("10.244.1.8", 9000, 1)),
        Command::NewDestination(tcp6, dest("fd00:244::5", 8080, 4)),
        Command::NewDestination(udp6, dest("fd00:244::6", 53, 5)),
    ]));
    let set = |items: &[(&str, u32)]| -> BTreeSet<(String, String, u32)> {
        items
            .iter()
            .map(|(a, w)| ((*a).to_owned(), "Masq".to_owned(), *w))
            .collect()
    };
    let mut expected = Listing::from([
        (
            "TCP 10.96.0.10:80".to_owned(),
            (
                "rr".to_owned(),
                set(&[("10.244.1.5:8080", 1), ("10.244.1.6:8080", 2)]),
            ),
        ),
        (
            "UDP 10.96.0.10:53".to_owned(),
            (
                "wrr persistent 300".to_owned(),
                set(&[("10.244.1.7:5353", 3)]),
            ),
        ),
        (
            "SCTP 10.96.0.11:9000".to_owned(),
            ("sh".to_owned(), set(&[("10.244.1.8:9000", 1)])),
        ),
        (
            "TCP [fd00::10]:80".to_owned(),
            (
                "rr persistent 60".to_owned(),
                set(&[("[fd00:244::5]:8080", 4)]),
            ),
        ),
        (
            "UDP [fd00::10]:53".to_owned(),
            ("wrr".to_owned(), set(&[("[fd00:244::6]:53", 5)])),
        ),
        (
            "SCTP [fd00::11]:9000".to_owned(),
            ("rr".to_owned(), BTreeSet::new()),
        ),
    ]);
    assert_eq!(ipvsadm_listing(), expected, "after adding");
    assert_eq!(
        client_listing(&mut client),
        expected,
        "client's view after adding"
    );

    // One endpoint's weight changes: exactly one message goes out.
    let before = client.messages_sent();
    expect_all_ok(client.execute(&[Command::SetDestination(tcp4, dest("10.244.1.6", 8080, 0))]));
    assert_eq!(
        delta(client.messages_sent(), before),
        MessageCounts {
            set_destination: 1,
            ..MessageCounts::default()
        }
    );
    expected.get_mut("TCP 10.96.0.10:80").expect("tcp4").1 =
        set(&[("10.244.1.5:8080", 1), ("10.244.1.6:8080", 0)]);
    assert_eq!(ipvsadm_listing(), expected, "after the weight change");

    // Edits: scheduler and persistence both ways; removals.
    expect_all_ok(client.execute(&[
        Command::SetService(service(tcp4, "wrr", Some(600))),
        Command::SetService(service(udp4, "rr", None)),
        Command::DelDestination(tcp4, "10.244.1.5".parse().expect("ip"), 8080),
        Command::DelDestination(udp6, "fd00:244::6".parse().expect("ip"), 53),
        Command::DelService(sctp6),
        Command::DelService(sctp4),
    ]));
    expected.insert(
        "TCP 10.96.0.10:80".to_owned(),
        (
            "wrr persistent 600".to_owned(),
            set(&[("10.244.1.6:8080", 0)]),
        ),
    );
    expected.insert(
        "UDP 10.96.0.10:53".to_owned(),
        ("rr".to_owned(), set(&[("10.244.1.7:5353", 3)])),
    );
    expected.get_mut("UDP [fd00::10]:53").expect("udp6").1 = BTreeSet::new();
    expected.remove("SCTP [fd00::11]:9000");
    expected.remove("SCTP 10.96.0.11:9000");
    assert_eq!(ipvsadm_listing(), expected, "after edits and removals");
    assert_eq!(
        client_listing(&mut client),
        expected,
        "client's view after edits"
    );

    expect_all_ok(client.execute(&[
        Command::DelService(tcp4),
        Command::DelService(udp4),
        Command::DelService(tcp6),
        Command::DelService(udp6),
    ]));
    assert_eq!(ipvsadm_listing(), Listing::new());
    assert!(client.services().expect("services").is_empty());
}

fn pipelined_table(services: usize, per_service: usize) -> (Vec<Command>, Vec<ServiceId>) {
    let mut commands = Vec::with_capacity(services * (per_service + 1));
    let mut ids = Vec::with_capacity(services);
    for s in 0..services {
        let vip: IpAddr = format!("10.97.{}.{}", s / 250, s % 250 + 1)
            .parse()
            .expect("vip");
        let id = ServiceId {
            protocol: Protocol::Tcp,
            address: vip,
            port: 80,
        };
        ids.push(id);
        commands.push(Command::NewService(service(id, "rr", None)));
        for d in 0..per_service {
            let n = s * per_service + d;
            let address = format!("10.244.{}.{}", n / 250, n % 250 + 1);
            commands.push(Command::NewDestination(
                id,
                IpvsDestination {
                    address: address.parse().expect("backend"),
                    port: 8080,
                    weight: 1,
                    forward: Forward::Masq,
                    active_connections: 0,
                    inactive_connections: 0,
                },
            ));
        }
    }
    (commands, ids)
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn thousand_services_with_ten_destinations_pipelined() {
    let _clean = CleanIpvs::new();
    let _route = RouteLink::new();
    let mut client = IpvsClient::connect().expect("connect");
    let (commands, ids) = pipelined_table(1000, 10);

    let started = Instant::now();
    let results = client.execute(&commands);
    let execute = started.elapsed();
    assert_eq!(results.len(), commands.len());
    expect_all_ok(results);
    let sent = client.messages_sent();
    assert_eq!((sent.new_service, sent.new_destination), (1000, 10_000));

    let started = Instant::now();
    let services = client.services().expect("services");
    assert_eq!(services.len(), 1000);
    let mut destinations = 0;
    for id in &ids {
        let dests = client.destinations(id).expect("destinations");
        assert_eq!(dests.len(), 10, "{id}");
        destinations += dests.len();
    }
    let read_back = started.elapsed();
    assert_eq!(destinations, 10_000);

    let started = Instant::now();
    let listing = ipvsadm_listing();
    let ipvsadm = started.elapsed();
    assert_eq!(listing.len(), 1000);
    assert_eq!(
        listing.values().map(|(_, d)| d.len()).sum::<usize>(),
        10_000
    );
    assert_eq!(listing, client_listing(&mut client));

    // The same table through `ipvsadm -R` (one netlink round trip per line), for comparison.
    sh(IPVSADM, &["-C"]);
    let mut rules = String::new();
    for command in &commands {
        match command {
            Command::NewService(s) => {
                rules += &format!("-A -t {}:{} -s rr\n", s.id.address, s.id.port)
            }
            Command::NewDestination(id, d) => {
                rules += &format!(
                    "-a -t {}:{} -r {}:{} -m -w 1\n",
                    id.address, id.port, d.address, d.port
                )
            }
            other => panic!("unexpected {other}"),
        }
    }
    let started = Instant::now();
    let mut restore = Process::new(IPVSADM)
        .arg("-R")
        .stdin(Stdio::piped())
        .spawn()
        .expect("ipvsadm -R");
    restore
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("writing the rules");
    assert!(restore.wait().expect("ipvsadm -R").success());
    let restore = started.elapsed();
    assert_eq!(
        ipvsadm_listing(),
        listing,
        "ipvsadm -R built the same table"
    );
    eprintln!(
        "11,000 commands pipelined in {:.2} s (ipvsadm -R: {:.2} s); read back (1 + 1,000 \
         dumps) in {:.2} s (ipvsadm -Ln: {:.2} s)",
        execute.as_secs_f64(),
        restore.as_secs_f64(),
        read_back.as_secs_f64(),
        ipvsadm.as_secs_f64()
    );
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn refusals_are_typed_and_name_the_request() {
    let _clean = CleanIpvs::new();
    let mut client = IpvsClient::connect().expect("connect");
    let tcp4 = id(Protocol::Tcp, "10.96.0.10", 80);
    let tcp6 = id(Protocol::Tcp, "fd00::10", 80);
    let results = client.execute(&[
        Command::NewService(service(tcp4, "rr", None)),
        // Pipelined: a refusal in the middle does not disturb its neighbours.
        Command::NewService(service(tcp4, "rr", None)),
        Command::NewService(service(tcp6, "rr", None)),
        Command::DelService(id(Protocol::Tcp, "10.96.0.99", 80)),
        Command::DelDestination(tcp4, "10.244.9.9".parse().expect("ip"), 80),
        Command::NewService(service(id(Protocol::Udp, "10.96.0.10", 53), "nosuch", None)),
        Command::NewDestination(tcp4, dest("224.0.0.1", 80, 1)),
        Command::NewDestination(tcp6, dest("ff02::1", 80, 1)),
    ]);
    let described: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.to_string(),
        })
        .collect();
    eprintln!("{described:#?}");
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(IpvsError::Exists { .. })),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok());
    assert!(
        matches!(&results[3], Err(IpvsError::NotFound { errno, .. }) if *errno == libc::ESRCH),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(&results[4], Err(IpvsError::NotFound { errno, .. }) if *errno == libc::ENOENT),
        "{:?}",
        results[4]
    );
    assert!(
        matches!(&results[5], Err(IpvsError::NotFound { errno, .. }) if *errno == libc::ENOENT),
        "unknown scheduler: {:?}",
        results[5]
    );
    for (index, address) in [(6, "224.0.0.1:80"), (7, "[ff02::1]:80")] {
        let error = results[index]
            .as_ref()
            .expect_err("a multicast real server");
        assert!(matches!(error, IpvsError::Invalid { .. }), "{error:?}");
        assert!(error.to_string().contains(address), "{error}");
    }
    assert_eq!(
        ipvsadm_listing().len(),
        2,
        "only the two good services exist"
    );
}

/// A real server the kernel has no route to (no route link here, no default route in the
/// VM) is accepted on 6.1 and 6.12 alike, v4 and v6: IPVS only refuses addresses that are not
/// unicast (see `refusals_are_typed_and_name_the_request`). The route is needed for traffic,
/// not for programming.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn real_server_without_a_route_is_accepted() {
    let _clean = CleanIpvs::new();
    let mut client = IpvsClient::connect().expect("connect");
    for address in ["10.244.1.5", "fd00:244::5"] {
        let lookup = Process::new(IP)
            .args(["route", "get", address])
            .output()
            .expect("ip route get");
        assert!(
            !lookup.status.success(),
            "precondition: no route to {address}, yet {}",
            String::from_utf8_lossy(&lookup.stdout)
        );
    }
    let tcp4 = id(Protocol::Tcp, "10.96.0.10", 80);
    let tcp6 = id(Protocol::Tcp, "fd00::10", 80);
    expect_all_ok(client.execute(&[
        Command::NewService(service(tcp4, "rr", None)),
        Command::NewService(service(tcp6, "rr", None)),
        Command::NewDestination(tcp4, dest("10.244.1.5", 8080, 1)),
        Command::NewDestination(tcp6, dest("fd00:244::5", 8080, 1)),
    ]));
    let listing = ipvsadm_listing();
    assert!(listing["TCP 10.96.0.10:80"]
        .1
        .contains(&("10.244.1.5:8080".into(), "Masq".into(), 1)));
    assert!(listing["TCP [fd00::10]:80"].1.contains(&(
        "[fd00:244::5]:8080".into(),
        "Masq".into(),
        1
    )));
}

/// A receive buffer too small for a batch's acknowledgements: the kernel drops some
/// (ENOBUFS); those changes report AckLost, later batches shrink and succeed, and every
/// change was made all the same.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn acknowledgement_overflow_is_reported_and_recovered() {
    let _clean = CleanIpvs::new();
    let mut client = IpvsClient::connect_with_receive_buffer(2048).expect("connect");
    // Only refusals and acknowledgements fill the buffer: ask for one per message.
    client.set_acknowledgements(Acknowledgements::Every);
    let (commands, _) = pipelined_table(300, 0);
    let results = client.execute(&commands);
    let lost = results
        .iter()
        .filter(|r| matches!(r, Err(IpvsError::AckLost { .. })))
        .count();
    let other: Vec<String> = results
        .iter()
        .filter_map(|r| match r {
            Err(IpvsError::AckLost { .. }) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        })
        .collect();
    eprintln!("{lost} of {} acknowledgements lost", results.len());
    assert!(other.is_empty(), "{other:#?}");
    assert!(lost > 0, "a 2 KiB buffer should overflow on a batch of 16");
    assert!(
        results.last().is_some_and(Result::is_ok),
        "later batches recover"
    );
    assert_eq!(ipvsadm_listing().len(), 300);
    // The socket stays usable: a dump after the overflow reads the whole table.
    assert_eq!(client.services().expect("services").len(), 300);
}

/// Adds and deletes `batch` services in a loop, in a network namespace of the spawned thread's
/// own, until `stop`; the thread returns how many rounds it made.
fn churn_in_another_namespace(stop: Arc<AtomicBool>, batch: u16) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        netns::enter_fresh();
        let mut client = IpvsClient::connect().expect("connect in the churning namespace");
        let ids: Vec<ServiceId> = (0..batch)
            .map(|n| id(Protocol::Tcp, "10.98.0.1", 1000 + n))
            .collect();
        let add: Vec<Command> = ids
            .iter()
            .map(|id| Command::NewService(service(*id, "rr", None)))
            .collect();
        let delete: Vec<Command> = ids.iter().map(|id| Command::DelService(*id)).collect();
        let mut rounds = 0;
        while !stop.load(Ordering::Relaxed) {
            expect_all_ok(client.execute(&add));
            expect_all_ok(client.execute(&delete));
            rounds += 1;
        }
        rounds
    })
}

fn vs_key(id: &ServiceId) -> VsKey {
    VsKey::new(id.protocol, id.address, id.port)
}

/// On 6.1 and 6.12 the service dump resumes at a position that counts every namespace's
/// services, so another namespace deleting services makes it skip some of ours. The agent
/// forgets an ownership record only when a GET of the service agrees it is gone: every service
/// a dump skips must be found by its GET, and no record judged lost.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn a_dump_that_skips_services_never_costs_a_record() {
    const OURS: usize = 2000;
    const DUMPS: usize = 100;
    let _clean = CleanIpvs::new();
    let mut client = IpvsClient::connect().expect("connect");
    let (commands, ids) = pipelined_table(OURS, 0);
    expect_all_ok(client.execute(&commands));
    let recorded: BTreeSet<VsKey> = ids.iter().map(vs_key).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let churn = churn_in_another_namespace(Arc::clone(&stop), 500);
    let mut skipping_dumps = 0;
    let mut skipped = 0;
    for _ in 0..DUMPS {
        let listed: BTreeSet<VsKey> = client
            .services()
            .expect("dump")
            .iter()
            .map(|service| vs_key(&service.id))
            .collect();
        assert!(listed.is_subset(&recorded), "only our services are listed");
        let mut probes = BTreeMap::new();
        for key in recorded.difference(&listed) {
            let id = ServiceId {
                protocol: key.protocol,
                address: key.address,
                port: key.port,
            };
            let found = client.service(&id).expect("get service");
            assert_eq!(
                found.map(|service| service.id),
                Some(id),
                "the dump skipped {id} and the GET must find it"
            );
            probes.insert(*key, Probe::Present);
        }
        if !probes.is_empty() {
            skipping_dumps += 1;
            skipped += probes.len();
        }
        let verdict = judge_records(&recorded, &listed, &BTreeSet::new(), &probes);
        assert!(verdict.forget.is_empty(), "{verdict:?}");
        assert!(verdict.suspects.is_empty(), "{verdict:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = churn.join().expect("the churning thread");
    let absent = id(Protocol::Tcp, "10.99.0.1", 80);
    assert_eq!(
        client.service(&absent).expect("get a service nobody made"),
        None
    );
    eprintln!(
        "{skipping_dumps} of {DUMPS} dumps of {OURS} services skipped some ({skipped} in all) \
         while another namespace made {rounds} rounds of adding and deleting 500"
    );
}
