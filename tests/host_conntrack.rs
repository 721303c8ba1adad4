//! Conntrack clean-up over ctnetlink, live on the host (root).
//!
//! Each test builds its own pair of network namespaces: a client namespace whose nftables
//! OUTPUT hook DNATs UDP to two VIPs onto backends (as IPVS with `net.ipv4.vs.conntrack=1`
//! leaves its translations in conntrack), and a backend namespace answering on two addresses.
//! Real datagrams go both ways, then the flushes run from a thread that entered the client
//! namespace, and the table is read back with our own dump (and `conntrack -L` when present).

#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use netns::{ip_in, sh_in, within, IP};
use process::{sh, sh_fed};
use topoproxy::dataplane::ipvs::conntrack::{self, BackendFlow};
use topoproxy::model::{IpFamily, Protocol};

/// `ip -n ns ARGS` with the arguments as one space-separated string.
fn ip_words_in(ns: &str, args: &str) {
    let args: Vec<&str> = args.split_whitespace().collect();
    ip_in(ns, &args);
}

/// Addresses of one family's lab.
struct Plan {
    family: IpFamily,
    client: &'static str,
    backend_a: &'static str,
    backend_b: &'static str,
    vip: &'static str,
    other_vip: &'static str,
}

const V4: Plan = Plan {
    family: IpFamily::V4,
    client: "10.244.0.1",
    backend_a: "10.244.0.2",
    backend_b: "10.244.0.3",
    vip: "10.96.0.10",
    other_vip: "10.96.0.11",
};

const V6: Plan = Plan {
    family: IpFamily::V6,
    client: "fd00:244::1",
    backend_a: "fd00:244::2",
    backend_b: "fd00:244::3",
    vip: "fd00:96::10",
    other_vip: "fd00:96::11",
};

const BACKEND_PORT: u16 = 5353;
const VIP_PORT: u16 = 53;
/// Client source ports: the nft rules send 40000-40009 to backend A, 40010-40019 to backend B,
/// and everything to the other VIP to backend A.
const TO_A: [u16; 3] = [40000, 40001, 40002];
const TO_B: [u16; 3] = [40010, 40011, 40012];
const TO_OTHER_VIP: [u16; 2] = [40020, 40021];

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn sock(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(address), port)
}

/// Client and backend namespaces joined by a veth, with DNAT in the client's OUTPUT hook.
/// Dropping it deletes both namespaces (and with them the veth, rules and conntrack table).
struct Lab {
    client_ns: String,
    backend_ns: String,
}

impl Lab {
    /// `test` tells apart the namespaces of tests running at once.
    fn new(plan: &Plan, test: &str) -> Self {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "host_conntrack needs root: it creates network namespaces and reads conntrack"
        );
        let tag = match plan.family {
            IpFamily::V4 => "4",
            IpFamily::V6 => "6",
        };
        let lab = Self {
            client_ns: format!("tpct-{test}c{tag}-{}", std::process::id()),
            backend_ns: format!("tpct-{test}b{tag}-{}", std::process::id()),
        };
        // Leftovers of a killed run with the same pid are removed by the guard's own logic.
        lab.remove();
        sh(IP, &["netns", "add", &lab.client_ns]);
        sh(IP, &["netns", "add", &lab.backend_ns]);
        let (c, b) = (lab.client_ns.as_str(), lab.backend_ns.as_str());
        let (prefix, nodad) = match plan.family {
            IpFamily::V4 => ("24", ""),
            IpFamily::V6 => ("64", "nodad"),
        };
        ip_words_in(c, "link set lo up");
        ip_words_in(b, "link set lo up");
        ip_words_in(
            c,
            &format!("link add tpv0 type veth peer name tpv1 netns {b}"),
        );
        ip_words_in(
            c,
            &format!("addr add {}/{prefix} dev tpv0 {nodad}", plan.client),
        );
        ip_words_in(
            b,
            &format!("addr add {}/{prefix} dev tpv1 {nodad}", plan.backend_a),
        );
        ip_words_in(
            b,
            &format!("addr add {}/{prefix} dev tpv1 {nodad}", plan.backend_b),
        );
        ip_words_in(c, "link set tpv0 up");
        ip_words_in(b, "link set tpv1 up");
        let services = match plan.family {
            IpFamily::V4 => "10.96.0.0/12",
            IpFamily::V6 => "fd00:96::/64",
        };
        ip_words_in(c, &format!("route add {services} via {}", plan.backend_a));

        let (l3, a, bb) = match plan.family {
            IpFamily::V4 => ("ip", plan.backend_a.to_owned(), plan.backend_b.to_owned()),
            IpFamily::V6 => (
                "ip6",
                format!("[{}]", plan.backend_a),
                format!("[{}]", plan.backend_b),
            ),
        };
        let rules = format!(
            "table inet tpct {{
               chain out {{
                 type nat hook output priority -100;
                 {l3} daddr {vip} udp dport {VIP_PORT} udp sport 40000-40009 dnat {l3} to {a}:{BACKEND_PORT}
                 {l3} daddr {vip} udp dport {VIP_PORT} udp sport 40010-40019 dnat {l3} to {bb}:{BACKEND_PORT}
                 {l3} daddr {other} udp dport {VIP_PORT} dnat {l3} to {a}:{BACKEND_PORT}
               }}
             }}",
            vip = plan.vip,
            other = plan.other_vip,
        );
        sh_fed(
            IP,
            &["netns", "exec", c, "/usr/sbin/nft", "-f", "-"],
            &rules,
        );
        lab
    }

    fn remove(&self) {
        for ns in [&self.client_ns, &self.backend_ns] {
            if std::path::Path::new(&format!("/run/netns/{ns}")).exists() {
                let _ = Command::new("/usr/sbin/ip")
                    .args(["netns", "del", ns])
                    .status();
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove();
    }
}

fn bound(address: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(address).unwrap_or_else(|e| panic!("bind {address}: {e}"));
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    socket
}

/// One request/answer through the DNAT: `client` → `vip`, seen by `backend`, answered, and
/// the answer seen by the client as coming from the VIP.
fn exchange(client: &UdpSocket, vip: SocketAddr, backend: &UdpSocket) {
    let mut buffer = [0u8; 64];
    client.send_to(b"query", vip).expect("client send");
    let (length, from) = backend
        .recv_from(&mut buffer)
        .unwrap_or_else(|e| panic!("backend {:?} got nothing: {e}", backend.local_addr()));
    assert_eq!(&buffer[..length], b"query");
    backend.send_to(b"answer", from).expect("backend send");
    let (length, from) = client.recv_from(&mut buffer).expect("client receive");
    assert_eq!(&buffer[..length], b"answer");
    assert_eq!(from, vip, "the answer did not come back from the VIP");
}

/// (client port, original destination, reply source) of the lab's UDP entries.
type Seen = BTreeSet<(u16, SocketAddr, SocketAddr)>;

fn lab_entries(lab: &Lab, plan: &Plan) -> Seen {
    let vips = [ip(plan.vip), ip(plan.other_vip)];
    let entries = within(&lab.client_ns, || conntrack::dump(plan.family)).expect("dump");
    entries
        .iter()
        .filter(|entry| entry.protocol == libc::IPPROTO_UDP as u8)
        .filter(|entry| vips.contains(&entry.original.destination.ip()))
        .map(|entry| {
            assert_eq!(entry.original.source.ip(), ip(plan.client), "{entry:?}");
            assert_eq!(entry.reply.destination, entry.original.source, "{entry:?}");
            (
                entry.original.source.port(),
                entry.original.destination,
                entry.reply.source,
            )
        })
        .collect()
}

/// `conntrack -L` in the client namespace: how many UDP entries go to `vip`.
fn cli_count(lab: &Lab, plan: &Plan, vip: &str) -> Option<usize> {
    if !std::path::Path::new("/usr/sbin/conntrack").exists() {
        eprintln!("conntrack CLI not installed: cross-check skipped");
        return None;
    }
    let family = match plan.family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    let output = sh_in(
        &lab.client_ns,
        "/usr/sbin/conntrack",
        &["-L", "-f", family, "-p", "udp", "--orig-dst", vip],
    );
    Some(
        output
            .lines()
            .filter(|line| line.starts_with("udp"))
            .count(),
    )
}

/// Datagrams from every client port of the plan through the DNAT and back; returns the
/// entries they left.
fn exchange_through_every_vip(lab: &Lab, plan: &Plan) -> Seen {
    let (backend_a, backend_b) = within(&lab.backend_ns, || {
        (
            bound(sock(plan.backend_a, BACKEND_PORT)),
            bound(sock(plan.backend_b, BACKEND_PORT)),
        )
    });
    let vip = sock(plan.vip, VIP_PORT);
    let other_vip = sock(plan.other_vip, VIP_PORT);
    let to_a = sock(plan.backend_a, BACKEND_PORT);
    let to_b = sock(plan.backend_b, BACKEND_PORT);
    let any = match plan.family {
        IpFamily::V4 => "0.0.0.0",
        IpFamily::V6 => "::",
    };

    let mut expected = Seen::new();
    within(&lab.client_ns, || {
        for (ports, destination, backend, address) in [
            (&TO_A[..], vip, &backend_a, to_a),
            (&TO_B[..], vip, &backend_b, to_b),
            (&TO_OTHER_VIP[..], other_vip, &backend_a, to_a),
        ] {
            for &port in ports {
                let client = bound(sock(any, port));
                exchange(&client, destination, backend);
                expected.insert((port, destination, address));
            }
        }
    });
    expected
}

fn flush_removes_exactly_the_backends_entries(plan: &Plan) {
    let lab = Lab::new(plan, "flush");
    let vip = sock(plan.vip, VIP_PORT);
    let other_vip = sock(plan.other_vip, VIP_PORT);
    let to_a = sock(plan.backend_a, BACKEND_PORT);
    let to_b = sock(plan.backend_b, BACKEND_PORT);
    let mut expected = exchange_through_every_vip(&lab, plan);

    // Every translation is in conntrack, as expected.
    assert_eq!(lab_entries(&lab, plan), expected);
    if let Some(count) = cli_count(&lab, plan, plan.vip) {
        assert_eq!(count, TO_A.len() + TO_B.len(), "conntrack -L disagrees");
    }

    // VIP → backend A goes; backend B's and the other VIP's stay.
    let flushed = within(&lab.client_ns, || {
        conntrack::flush_backend(Protocol::Udp, vip.ip(), VIP_PORT, to_a.ip(), BACKEND_PORT)
    })
    .expect("flush backend A");
    assert_eq!(flushed, TO_A.len());
    expected.retain(|(_, destination, backend)| !(*destination == vip && *backend == to_a));
    assert_eq!(lab_entries(&lab, plan), expected);
    if let Some(count) = cli_count(&lab, plan, plan.vip) {
        assert_eq!(count, TO_B.len(), "conntrack -L disagrees after the flush");
    }

    // Nothing left to flush for it; a wrong protocol or port flushes nothing.
    within(&lab.client_ns, || {
        let again =
            conntrack::flush_backend(Protocol::Udp, vip.ip(), VIP_PORT, to_a.ip(), BACKEND_PORT);
        assert_eq!(again.expect("flush again"), 0);
        let tcp =
            conntrack::flush_backend(Protocol::Tcp, vip.ip(), VIP_PORT, to_b.ip(), BACKEND_PORT);
        assert_eq!(tcp.expect("flush tcp"), 0);
        let port = conntrack::flush_backend(Protocol::Udp, vip.ip(), VIP_PORT, to_b.ip(), 5354);
        assert_eq!(port.expect("flush other port"), 0);
    });
    assert_eq!(lab_entries(&lab, plan), expected);

    // Backend A through any VIP: the other VIP's entries go.
    let flushed = within(&lab.client_ns, || {
        conntrack::flush_destination_all(Protocol::Udp, to_a.ip(), BACKEND_PORT)
    })
    .expect("flush destination");
    assert_eq!(flushed, TO_OTHER_VIP.len());
    expected.retain(|(_, _, backend)| *backend != to_a);
    assert_eq!(lab_entries(&lab, plan), expected);
    assert_eq!(expected.len(), TO_B.len());

    // Several flows in one call (one dump): backend B's go, the table is clean.
    let flushed = within(&lab.client_ns, || {
        conntrack::flush(&[
            BackendFlow {
                protocol: Protocol::Udp,
                vip: Some(vip),
                backend: to_b,
            },
            BackendFlow {
                protocol: Protocol::Udp,
                vip: Some(other_vip),
                backend: to_b,
            },
        ])
    })
    .expect("flush many");
    assert_eq!(flushed, TO_B.len());
    assert_eq!(lab_entries(&lab, plan), Seen::new());
}

#[test]
fn flush_backend_ipv4() {
    flush_removes_exactly_the_backends_entries(&V4);
}

#[test]
fn flush_backend_ipv6() {
    flush_removes_exactly_the_backends_entries(&V6);
}

/// Entries added by `conntrack -R` besides the lab's own: TCP connections of other clients,
/// which a flush of UDP backends must not have to copy out of the kernel.
/// `TOPOPROXY_CONNTRACK_FILL` sets another number (the timings printed are for reading, not
/// asserted).
const DEFAULT_FILL: usize = 2_000;

/// Loads `count` established TCP entries into the client namespace's table in one
/// `conntrack -R` run.
fn fill_with_tcp_entries(lab: &Lab, plan: &Plan, count: usize) {
    let servers = match plan.family {
        IpFamily::V4 => "10.97.0.",
        IpFamily::V6 => "fd00:97::",
    };
    let file = std::env::temp_dir().join(format!("{}-fill", lab.client_ns));
    let lines: Vec<String> = (0..count)
        .map(|n| {
            format!(
                "-I -p tcp -s {} -d {servers}{} --sport {} --dport 443 --state ESTABLISHED -t 600",
                plan.client,
                1 + n / 50_000,
                10_000 + n % 50_000,
            )
        })
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").expect("writing the conntrack -R file");
    let net = format!("--net=/run/netns/{}", lab.client_ns);
    let path = file.to_str().expect("UTF-8 temp path").to_owned();
    let result = Command::new("/usr/bin/nsenter")
        .args([&net, "/usr/sbin/conntrack", "-R", &path])
        .output();
    let _ = std::fs::remove_file(&file);
    let output = result.expect("running conntrack -R (install conntrack)");
    assert!(
        output.status.success(),
        "conntrack -R: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn a_flush_dump_returns_only_the_backends_replies(plan: &Plan) {
    let lab = Lab::new(plan, "filter");
    let expected = exchange_through_every_vip(&lab, plan);
    let fill = std::env::var("TOPOPROXY_CONNTRACK_FILL")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_FILL);
    fill_with_tcp_entries(&lab, plan, fill);
    let to_a = sock(plan.backend_a, BACKEND_PORT);

    let (whole, whole_took, filtered, filtered_took) = within(&lab.client_ns, || {
        let started = std::time::Instant::now();
        let whole = conntrack::dump(plan.family).expect("dump the whole table");
        let whole_took = started.elapsed();
        let started = std::time::Instant::now();
        let filtered = conntrack::dump_replies_from(plan.family, Protocol::Udp, to_a)
            .expect("dump the replies from backend A");
        (whole, whole_took, filtered, started.elapsed())
    });
    eprintln!(
        "{:?}: whole table {} entries in {whole_took:?}; replies from {to_a}: {} entries in \
         {filtered_took:?}",
        plan.family,
        whole.len(),
        filtered.len()
    );
    assert!(
        whole.len() >= fill + expected.len(),
        "{} entries",
        whole.len()
    );
    let from_a: Seen = filtered
        .iter()
        .map(|entry| {
            (
                entry.original.source.port(),
                entry.original.destination,
                entry.reply.source,
            )
        })
        .collect();
    // IPv4 filters on the reply's address, protocol and port; IPv6 on protocol and port only
    // (the kernel's IPv6 address comparison is inverted), so backend B's entries come too.
    let wanted: Seen = expected
        .into_iter()
        .filter(|(_, _, backend)| match plan.family {
            IpFamily::V4 => *backend == to_a,
            IpFamily::V6 => backend.port() == BACKEND_PORT,
        })
        .collect();
    let lab_total = TO_A.len() + TO_B.len() + TO_OTHER_VIP.len();
    let expected_count = match plan.family {
        IpFamily::V4 => TO_A.len() + TO_OTHER_VIP.len(),
        IpFamily::V6 => lab_total,
    };
    assert_eq!(from_a.len(), expected_count);
    assert_eq!(from_a, wanted, "the kernel's filter returned other entries");
    assert_eq!(
        filtered.len(),
        wanted.len(),
        "TCP entries came through the filter"
    );
}

#[test]
fn flush_dump_is_filtered_by_the_kernel_ipv4() {
    a_flush_dump_returns_only_the_backends_replies(&V4);
}

#[test]
fn flush_dump_is_filtered_by_the_kernel_ipv6() {
    a_flush_dump_returns_only_the_backends_replies(&V6);
}
