//! The eBPF programs on the kernels we support: every program passes the verifier, attaches to
//! the cgroup v2 root through pinned links, is adopted by a second open, translates a VIP on
//! loopback, and is gone after cleanup.
//!
//! Runs inside the VM (`cargo xtask vm-test --test vm_ebpf_load`), where /init mounts bpffs and
//! cgroup2 and the test owns the whole machine; ignored on the host.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use futures::executor::block_on;
use topoproxy::dataplane::ebpf::{cleanup, EbpfDataplane, EbpfSettings, PROGRAMS};
use topoproxy::dataplane::Dataplane as _;
use topoproxy::dataplane::{
    DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig, TierShares,
};
use topoproxy::diff::diff;
use topoproxy::model::Protocol;
use topoproxy::table::{Frontend, TrafficPolicy, VsKey};

const VIP: &str = "10.96.0.10";

fn desired(protocol: Protocol, backend: SocketAddr) -> (VsKey, ProgrammedService) {
    (
        VsKey::new(protocol, VIP.parse().expect("vip"), 80),
        ProgrammedService {
            config: ServiceConfig {
                scheduler: topoproxy::scheduler::Scheduler::default(),
                persistence_timeout: Some(30),
                frontend: Frontend::ClusterIP,
                traffic_policy: TrafficPolicy::Cluster,
                tier_shares: TierShares::default(),
                source_ranges: Default::default(),
            },
            destinations: [(
                (backend.ip(), backend.port()),
                DestinationState {
                    weight: 1,
                    tier: 1,
                    local: false,
                },
            )]
            .into(),
        },
    )
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_ebpf_load"]
fn programs_load_attach_translate_and_clean_up() {
    let settings = EbpfSettings {
        pin_dir: PathBuf::from("/sys/fs/bpf/topoproxy-vm-test"),
        cgroup_path: None,
    };
    let _ = cleanup(&settings);
    let mut dataplane = EbpfDataplane::open(settings.clone()).expect("load and attach");
    assert_eq!(dataplane.load_report().attached, PROGRAMS.to_vec());
    assert_eq!(
        dataplane.load_report().btf,
        Some(true),
        "the kernel refused the object's BTF (aya's warning in the log says why)"
    );

    // Backends on loopback: a TCP server that writes its name and a UDP echo.
    let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let tcp_backend = tcp.local_addr().expect("tcp addr");
    std::thread::spawn(move || {
        for stream in tcp.incoming().flatten() {
            let mut stream = stream;
            let _ = writeln!(stream, "backend");
        }
    });
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let udp_backend = udp.local_addr().expect("udp addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((len, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..len], from);
        }
    });
    let table: ProgrammedTable = [
        desired(Protocol::Tcp, tcp_backend),
        desired(Protocol::Udp, udp_backend),
    ]
    .into_iter()
    .collect();
    let actual = block_on(dataplane.read()).expect("read");
    block_on(dataplane.apply(&diff(&table, &actual))).expect("apply");
    drop(dataplane);

    // A second open adopts the pinned links and reads the same table back.
    let mut dataplane = EbpfDataplane::open(settings.clone()).expect("adopt");
    assert_eq!(dataplane.load_report().adopted, PROGRAMS.to_vec());
    assert_eq!(dataplane.load_report().btf, None, "nothing was loaded");
    assert_eq!(block_on(dataplane.read()).expect("read back"), table);

    let vip = SocketAddr::new(VIP.parse::<IpAddr>().expect("vip"), 80);
    let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect VIP");
    assert_eq!(
        stream.peer_addr().expect("peer"),
        vip,
        "getpeername shows the VIP"
    );
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "backend");

    let client = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client.send_to(b"ping", vip).expect("send to VIP");
    let mut buf = [0u8; 64];
    let (len, from) = client.recv_from(&mut buf).expect("UDP reply");
    assert_eq!(
        (&buf[..len], from),
        (&b"ping"[..], vip),
        "reply from the VIP"
    );

    let listing = dataplane.list().expect("list");
    assert!(listing
        .services
        .iter()
        .all(|s| s.backends.iter().all(|b| b.connections >= 1)));
    drop(dataplane);

    let report = cleanup(&settings).expect("cleanup");
    assert_eq!(report.detached, PROGRAMS.len());
    assert!(!settings.pin_dir.exists());
    let after = TcpStream::connect_timeout(&vip, Duration::from_secs(2));
    assert!(after.is_err(), "the VIP still translates after cleanup");
}
