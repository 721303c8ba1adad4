//! The eBPF dataplane on the host, with real traffic. Needs root (fails otherwise).
//!
//! Each test builds its own world: a child cgroup under the cgroup2 mount (the programs attach
//! there, so nothing outside it is touched), a pin directory under /sys/fs/bpf, a "pods"
//! network namespace holding the backends (one address each, servers on threads that
//! setns into it), and a client namespace linked to it by a veth pair. The client is a child
//! process (this test binary, re-executed as the ignored `client_process` test) that joins the
//! cgroup and the client namespace, then runs socket commands sent over its stdin.
//!
//! Everything is driven through the `Dataplane` trait with ops from the agent's differ, so the
//! agent's own path is what is tested; the `list_` tests run the binaries instead
//! (`topoproxy run --proxy-mode ebpf` on a YAML directory, and `topoproxy list` beside it).
//!
//! Benchmarks (ignored; run with `--ignored --nocapture`): `bench_connect_vip_vs_direct`,
//! `bench_cold_sync`, `bench_udp_removal_over_100_network_namespaces`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/host.rs"]
mod host;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use host::{capture_logs, log_lines_with, require_root, wait_for_log_lines};
use process::shell;
use topoproxy::dataplane::ebpf::{
    cgroup2_mount, cleanup, maps_pinned, program_pin, DatapathLog, EbpfDataplane, EbpfSettings,
    PROGRAMS,
};
use topoproxy::dataplane::Dataplane as _;
use topoproxy::dataplane::{
    DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig, TierShares,
};
use topoproxy::diff::diff;
use topoproxy::model::Protocol;
use topoproxy::table::{Frontend, TrafficPolicy, VsKey};
use topoproxy_common::{
    maps, Backend as AbiBackend, BackendKey, LogConfig, Service as AbiService, ServiceKey,
    MAPS_DIR, MAX_TIERS, TIER_SHIFT,
};

const CLIENT_ENV: &str = "TOPOPROXY_EBPF_TEST_CLIENT";
const PORT: u16 = 8080;
/// A listener that only accepts and closes, for the connect benchmark.
const SINK_PORT: u16 = 9090;

fn unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A backend address in the pods namespace and the name its servers answer with.
#[derive(Clone, Copy)]
struct Backend {
    name: &'static str,
    v4: &'static str,
    v6: &'static str,
}

const BACKENDS: [Backend; 5] = [
    Backend {
        name: "t0a",
        v4: "10.213.0.11",
        v6: "fd00:213::11",
    },
    Backend {
        name: "t0b",
        v4: "10.213.0.12",
        v6: "fd00:213::12",
    },
    Backend {
        name: "t1a",
        v4: "10.213.0.21",
        v6: "fd00:213::21",
    },
    Backend {
        name: "t1b",
        v4: "10.213.0.22",
        v6: "fd00:213::22",
    },
    Backend {
        name: "t2a",
        v4: "10.213.0.31",
        v6: "fd00:213::31",
    },
];

const VIP4: &str = "10.96.213.10";
const VIP6: &str = "fd00:96::10";

/// One test's namespaces, cgroup and pin directory, removed on drop.
struct World {
    id: String,
    client_ns: String,
    pods_ns: String,
    cgroup: PathBuf,
    settings: EbpfSettings,
}

impl World {
    fn new() -> Self {
        require_root("cgroups, bpffs, network namespaces");
        let id = unique();
        let client_ns = format!("tpe-c{id}");
        let pods_ns = format!("tpe-p{id}");
        let cgroup = cgroup2_mount()
            .expect("cgroup2 mount")
            .join(format!("topoproxy-test-{id}"));
        let world = Self {
            settings: EbpfSettings {
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/topoproxy-test-{id}")),
                cgroup_path: Some(cgroup.clone()),
            },
            id,
            client_ns,
            pods_ns,
            cgroup,
        };
        std::fs::create_dir(&world.cgroup).expect("create the test cgroup");
        let (c, p) = (&world.client_ns, &world.pods_ns);
        shell(&format!("ip netns add {c} && ip netns add {p}"));
        shell(&format!(
            "ip -n {c} link set lo up && ip -n {p} link set lo up && \
             ip -n {c} link add tpec{id} type veth peer name tpep{id} netns {p} && \
             ip -n {c} addr add 10.213.0.1/24 dev tpec{id} && \
             ip -n {c} addr add fd00:213::1/64 dev tpec{id} nodad && \
             ip -n {c} link set tpec{id} up && ip -n {p} link set tpep{id} up",
            id = world.id
        ));
        for backend in BACKENDS {
            shell(&format!(
                "ip -n {p} addr add {}/24 dev tpep{id} && ip -n {p} addr add {}/64 dev tpep{id} nodad",
                backend.v4,
                backend.v6,
                id = world.id
            ));
        }
        for backend in BACKENDS {
            world.serve(backend);
        }
        world
    }

    /// TCP (name, then echo) and UDP (name) servers for `backend`, v4 and v6.
    fn serve(&self, backend: Backend) {
        for address in [backend.v4, backend.v6] {
            let address: IpAddr = address.parse().expect("address");
            let pods = self.pods_ns.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                netns::enter(&pods);
                let tcp = TcpListener::bind((address, PORT)).expect("bind tcp");
                let udp = UdpSocket::bind((address, PORT)).expect("bind udp");
                let sink = TcpListener::bind((address, SINK_PORT)).expect("bind sink");
                ready_tx.send(()).expect("ready");
                // A deep accept queue, so the benchmark measures connect(), not queue drops.
                // SAFETY: listen on a socket we own; only its backlog changes.
                unsafe { libc::listen(sink.as_raw_fd(), 4096) };
                std::thread::spawn(move || for _ in sink.incoming() {});
                std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(backend.name.as_bytes(), from);
                    }
                });
                for stream in tcp.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    std::thread::spawn(move || {
                        let _ = writeln!(stream, "{}", backend.name);
                        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                        let mut line = String::new();
                        while reader.read_line(&mut line).unwrap_or(0) > 0 {
                            let _ = stream.write_all(line.as_bytes());
                            line.clear();
                        }
                    });
                }
            });
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("server ready");
        }
    }

    fn client(&self) -> Client {
        Client::spawn(&self.cgroup, &netns::netns_path(&self.client_ns))
    }

    fn open(&self) -> EbpfDataplane {
        EbpfDataplane::open(self.settings.clone()).expect("open the eBPF dataplane")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = cleanup(&self.settings);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client_ns])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pods_ns])
            .status();
        // The client process may still be exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The client process: in the test cgroup and the client namespace.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn spawn(cgroup: &Path, netns: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .args([
                "client_process",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CLIENT_ENV,
                format!("{}\n{}", cgroup.display(), netns.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the client process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        assert_eq!(client.ask("hello"), "ready");
        client
    }

    /// Sends one command and returns its answer (`ok …` or `err …`).
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to client");
        self.answer()
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to client");
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self.stdout.read_line(&mut line).expect("read from client");
            assert!(read > 0, "the client process exited");
            // libtest's "test client_process ... " has no newline: the marker may follow it.
            if let Some((_, answer)) = line.trim_end().split_once("@@ ") {
                return answer.to_owned();
            }
        }
    }

    /// (backend name, peer address) of a TCP connect.
    fn tcp(&mut self, address: &str) -> (String, String) {
        let answer = self.ask(&format!("tcp {address} {PORT}"));
        parse_pair(&answer)
    }

    fn udp(&mut self, address: &str) -> (String, String) {
        let answer = self.ask(&format!("udp {address} {PORT}"));
        parse_pair(&answer)
    }

    /// `count` new connections (`tcp`) or datagrams (`udp`) to `address`: how many failed
    /// and how many each backend served.
    fn spread(
        &mut self,
        protocol: &str,
        address: &str,
        count: u32,
    ) -> (u64, BTreeMap<String, u64>) {
        let answer = self.ask(&format!("spread {protocol} {address} {PORT} {count}"));
        let mut words = answer.split_whitespace();
        assert_eq!(words.next(), Some("ok"), "{answer}");
        let failed = words
            .next()
            .and_then(|n| n.parse().ok())
            .expect("failed count");
        let served = words
            .next()
            .unwrap_or("")
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, n)| (name.to_owned(), n.parse().expect("served count")))
            .collect();
        (failed, served)
    }

    fn netns_cookie(&mut self) -> u64 {
        let answer = self.ask("cookie");
        match answer.strip_prefix("ok ").map(str::parse) {
            Some(Ok(cookie)) => cookie,
            _ => panic!("client answered {answer:?}"),
        }
    }

    fn udp_connected(&mut self, address: &str) -> (String, String) {
        let answer = self.ask(&format!("udpc {address} {PORT}"));
        parse_pair(&answer)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        process::wait_or_kill(&mut self.child, Duration::from_secs(5));
    }
}

fn parse_pair(answer: &str) -> (String, String) {
    let mut words = answer.split_whitespace();
    assert_eq!(words.next(), Some("ok"), "client answered {answer:?}");
    let name = words.next().expect("name").to_owned();
    let peer = words.next().expect("peer").to_owned();
    (name, peer)
}

fn socket(address: &str) -> SocketAddr {
    SocketAddr::new(address.parse().expect("address"), PORT)
}

/// The client side: runs only when re-executed by [`Client::spawn`].
#[test]
#[ignore = "helper process for the other tests, started by them"]
fn client_process() {
    let Ok(setup) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let (cgroup, netns) = setup.split_once('\n').expect("cgroup and netns");
    host::join_cgroup(Path::new(cgroup));
    netns::enter(netns);
    let stdin = std::io::stdin();
    let mut held: Vec<TcpStream> = Vec::new();
    let mut held_udp: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    for line in stdin.lock().lines() {
        let line = line.expect("read command");
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["hello"] => "ready".to_owned(),
            // The cookie of the client's network namespace: what the socket programs hash
            // for a consistent-hash (`sh`/`mh`) service.
            ["cookie"] => match netns_cookie() {
                Ok(cookie) => format!("ok {cookie}"),
                Err(error) => format!("err {error}"),
            },
            ["quit"] => return,
            ["tcp", ip, port] => match tcp_name(&target(ip, port)) {
                Ok((name, peer, _)) => format!("ok {name} {peer}"),
                Err(error) => format!("err {error}"),
            },
            ["hold", ip, port] => match tcp_name(&target(ip, port)) {
                Ok((name, _, stream)) => {
                    held.push(stream);
                    format!("ok {name} {}", held.len() - 1)
                }
                Err(error) => format!("err {error}"),
            },
            ["ping", index] => {
                let stream = &mut held[index.parse::<usize>().expect("index")];
                let result = stream.write_all(b"ping\n").and_then(|()| {
                    let mut reader = BufReader::new(stream.try_clone()?);
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    Ok(line)
                });
                match result {
                    Ok(line) => format!("ok {}", line.trim()),
                    Err(error) => format!("err {error}"),
                }
            }
            ["udp", ip, port] => match udp_name(&target(ip, port), false) {
                Ok((name, from)) => format!("ok {name} {from}"),
                Err(error) => format!("err {error}"),
            },
            ["udpc", ip, port] => match udp_name(&target(ip, port), true) {
                Ok((name, from)) => format!("ok {name} {from}"),
                Err(error) => format!("err {error}"),
            },
            // A connected UDP socket kept open, as a DNS client or statsd holds one.
            ["udpkeep", ip, port] => match udp_keep(&target(ip, port)) {
                Ok((socket, name)) => {
                    held_udp.push((socket, target(ip, port)));
                    format!("ok {name} {}", held_udp.len() - 1)
                }
                Err(error) => format!("err {error}"),
            },
            ["udpagain", index] => {
                let (socket, vip) = &held_udp[index.parse::<usize>().expect("index")];
                match udp_again(socket, vip) {
                    Ok((name, how)) => format!("ok {name} {how}"),
                    Err(error) => format!("err {error}"),
                }
            }
            // Connects until the file `stop` exists: the test ends the loop when it has seen
            // what it waits for, however slow the machine (a minute at most, for a test
            // that dies without stopping it).
            ["loop", ip, port, stop] => {
                let until = Instant::now() + Duration::from_secs(60);
                let (mut ok, mut failed, mut first_error) = (0u64, 0u64, String::from("-"));
                let mut names = BTreeSet::new();
                let progress = LoopStop::progress_path(Path::new(stop));
                while Instant::now() < until && !Path::new(stop).exists() {
                    match tcp_name(&target(ip, port)) {
                        Ok((name, _, _)) => {
                            ok += 1;
                            names.insert(name);
                            std::fs::write(&progress, ok.to_string()).expect("write progress");
                        }
                        Err(error) => {
                            if failed == 0 {
                                first_error = error.to_string().replace(' ', "_");
                            }
                            failed += 1;
                        }
                    }
                }
                let names: Vec<String> = names.into_iter().collect();
                format!("ok {ok} {failed} {first_error} {}", names.join(","))
            }
            ["spread", protocol, ip, port, count] => {
                // Which backend served each of `count` new connections (or datagrams).
                let mut served: BTreeMap<String, u64> = BTreeMap::new();
                let mut failed = 0u64;
                for _ in 0..count.parse::<u64>().expect("count") {
                    let name = match *protocol {
                        "tcp" => tcp_name(&target(ip, port)).map(|(name, _, _)| name),
                        _ => udp_name(&target(ip, port), false).map(|(name, _)| name),
                    };
                    match name {
                        Ok(name) => *served.entry(name).or_default() += 1,
                        Err(_) => failed += 1,
                    }
                }
                let served: Vec<String> = served
                    .iter()
                    .map(|(name, n)| format!("{name}={n}"))
                    .collect();
                format!("ok {failed} {}", served.join(","))
            }
            ["udp2", first, second, port] => {
                match udp_two_vips(&target(first, port), &target(second, port)) {
                    Ok(replies) => format!("ok {replies}"),
                    Err(error) => format!("err {error}"),
                }
            }
            ["pin", cpu] => match pin_to_cpu(cpu.parse().expect("cpu")) {
                Ok(()) => "ok pinned".to_owned(),
                Err(error) => format!("err {error}"),
            },
            ["connects", ip, port, millis] => {
                let address = target(ip, port);
                let until = Instant::now() + Duration::from_millis(millis.parse().expect("ms"));
                let (mut ok, mut failed, mut first_error) = (0u64, 0u64, String::from("-"));
                while Instant::now() < until {
                    match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
                        Ok(stream) => {
                            linger_zero(&stream);
                            ok += 1;
                        }
                        Err(error) => {
                            if failed == 0 {
                                first_error = error.to_string().replace(' ', "_");
                            }
                            failed += 1;
                        }
                    }
                }
                format!("ok {ok} {failed} {first_error}")
            }
            ["bench", ip, port, count] => {
                let address = target(ip, port);
                let count: u32 = count.parse().expect("count");
                let started = Instant::now();
                let mut failed = 0u32;
                for _ in 0..count {
                    match TcpStream::connect(address) {
                        // Reset on close: no TIME_WAIT to exhaust the ports.
                        Ok(stream) => linger_zero(&stream),
                        Err(_) => failed += 1,
                    }
                }
                format!("ok {} {failed}", started.elapsed().as_nanos())
            }
            other => format!("err unknown command {other:?}"),
        };
        println!("@@ {answer}");
    }
}

/// Keeps this process on one CPU, so concurrent clients really run in parallel.
/// `SO_NETNS_COOKIE` of a socket in this thread's network namespace.
fn netns_cookie() -> std::io::Result<u64> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only touch it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn target(ip: &str, port: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port.parse().expect("port"))
}

fn linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads the struct we pass.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn tcp_name(address: &SocketAddr) -> std::io::Result<(String, SocketAddr, TcpStream)> {
    let stream = TcpStream::connect_timeout(address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    Ok((name.trim().to_owned(), peer, stream))
}

/// An unbound-address UDP socket of `address`'s family, reads timing out after 2 s.
fn udp_socket_for(address: &SocketAddr) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0".parse().expect("any")
    } else {
        "[::]:0".parse().expect("any")
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

fn udp_name(address: &SocketAddr, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let socket = udp_socket_for(address)?;
    let mut buf = [0u8; 64];
    let (len, from) = if connected {
        socket.connect(address)?;
        socket.send(b"who")?;
        let len = socket.recv(&mut buf)?;
        (len, socket.peer_addr()?)
    } else {
        socket.send_to(b"who", address)?;
        socket.recv_from(&mut buf)?
    };
    Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
}

/// A connected UDP socket and the backend that answered its first datagram.
fn udp_keep(address: &SocketAddr) -> std::io::Result<(UdpSocket, String)> {
    let socket = udp_socket_for(address)?;
    socket.connect(address)?;
    socket.send(b"who")?;
    let mut buf = [0u8; 64];
    let len = socket.recv(&mut buf)?;
    Ok((socket, String::from_utf8_lossy(&buf[..len]).into_owned()))
}

/// The next datagram on a kept socket, as a well-behaved client sends it: a destroyed socket
/// is disconnected (a send fails with `EDESTADDRREQ`) and reports `ECONNABORTED` once (on a
/// receive), and the client connects again. The answering backend and `same` or
/// `reconnected`.
fn udp_again(socket: &UdpSocket, vip: &SocketAddr) -> std::io::Result<(String, &'static str)> {
    let mut buf = [0u8; 64];
    let mut how = "same";
    // At most: the send that finds the socket disconnected, the abort reported after the
    // reconnect, the answer.
    for _ in 0..3 {
        let attempt = socket.send(b"who").and_then(|_| socket.recv(&mut buf));
        match attempt {
            Ok(len) => return Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), how)),
            Err(error)
                if how == "same"
                    && matches!(
                        error.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EDESTADDRREQ)
                    ) =>
            {
                how = "reconnected";
                socket.connect(vip)?;
            }
            // The abort may surface only at the receive after the reconnect.
            Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::other("no answer after reconnecting"))
}

/// One unconnected socket asks two addresses before reading either reply; the replies as
/// `name@from name@from`, in arrival order.
fn udp_two_vips(first: &SocketAddr, second: &SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"who", first)?;
    socket.send_to(b"who", second)?;
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut buf = [0u8; 64];
        let (len, from) = socket.recv_from(&mut buf)?;
        replies.push(format!("{}@{from}", String::from_utf8_lossy(&buf[..len])));
    }
    Ok(replies.join(" "))
}

// ---- desired tables and the dataplane ----

fn config(persistence_timeout: Option<u32>) -> ServiceConfig {
    ServiceConfig {
        scheduler: topoproxy::scheduler::Scheduler::default(),
        persistence_timeout,
        frontend: Frontend::ClusterIP,
        traffic_policy: TrafficPolicy::Cluster,
        tier_shares: TierShares::default(),
        source_ranges: Default::default(),
    }
}

/// A service on `vip` for `protocol` with backends `(backend, tier)`.
fn service(
    table: &mut ProgrammedTable,
    protocol: Protocol,
    vip: &str,
    backends: &[(Backend, u8)],
    persistence_timeout: Option<u32>,
) {
    let vip: IpAddr = vip.parse().expect("vip");
    let destinations = backends
        .iter()
        .map(|(backend, tier)| {
            let address = if vip.is_ipv4() {
                backend.v4
            } else {
                backend.v6
            };
            (
                (address.parse().expect("address"), PORT),
                DestinationState {
                    weight: 1,
                    tier: *tier,
                    local: false,
                },
            )
        })
        .collect();
    table.insert(
        VsKey::new(protocol, vip, PORT),
        ProgrammedService {
            config: config(persistence_timeout),
            destinations,
        },
    );
}

/// Every protocol and family of one VIP pair with the same backends.
fn all_services(backends: &[(Backend, u8)], persistence_timeout: Option<u32>) -> ProgrammedTable {
    let mut table = ProgrammedTable::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for vip in [VIP4, VIP6] {
            service(&mut table, protocol, vip, backends, persistence_timeout);
        }
    }
    table
}

/// Diffs against what the dataplane reads back and applies: the sync loop's path.
fn sync(dataplane: &mut EbpfDataplane, desired: &ProgrammedTable) {
    let actual = block_on(dataplane.read()).expect("read");
    let ops = diff(desired, &actual);
    block_on(dataplane.apply(&ops)).expect("apply");
    let after = block_on(dataplane.read()).expect("read back");
    assert_eq!(&after, desired, "the maps read back differ from the plan");
}

/// [`all_services`] under a locality policy: each tier takes `shares` (ppm) of new connections.
fn shared_services(
    backends: &[(Backend, u8)],
    shares: [u32; 8],
    persistence_timeout: Option<u32>,
) -> ProgrammedTable {
    let mut table = all_services(backends, persistence_timeout);
    for service in table.values_mut() {
        service.config.tier_shares = TierShares(shares);
    }
    table
}

/// Connections served per tier of `backends` out of `spread`'s counts, as fractions.
fn tier_fractions(backends: &[(Backend, u8)], served: &BTreeMap<String, u64>) -> [f64; 3] {
    let total: u64 = served.values().sum();
    let mut fractions = [0.0; 3];
    for (backend, tier) in backends {
        let n = served.get(backend.name).copied().unwrap_or(0);
        fractions[usize::from(*tier)] += n as f64 / total as f64;
    }
    fractions
}

fn names(backends: &[(Backend, u8)], tier: u8) -> BTreeSet<String> {
    backends
        .iter()
        .filter(|(_, t)| *t == tier)
        .map(|(b, _)| b.name.to_owned())
        .collect()
}

const T0A: Backend = BACKENDS[0];
const T0B: Backend = BACKENDS[1];
const T1A: Backend = BACKENDS[2];
const T1B: Backend = BACKENDS[3];
const T2A: Backend = BACKENDS[4];

// ---- tests ----

#[test]
fn vips_reach_the_nearest_tier_and_fall_back_with_the_vip_in_view() {
    let world = World::new();
    let mut dataplane = world.open();
    assert_eq!(dataplane.load_report().attached.len(), PROGRAMS.len());
    assert_eq!(
        dataplane.load_report().btf,
        Some(true),
        "the kernel refused the object's BTF (aya's warning in the log says why)"
    );
    let tiers = [(T0A, 0), (T0B, 0), (T1A, 1), (T1B, 1), (T2A, 2)];
    sync(&mut dataplane, &all_services(&tiers, None));
    let mut client = world.client();

    for vip in [VIP4, VIP6] {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let (name, peer) = client.tcp(vip);
            assert_eq!(peer, socket(vip).to_string(), "getpeername shows the VIP");
            seen.insert(name);
            let (name, from) = client.udp(vip);
            assert_eq!(
                from,
                socket(vip).to_string(),
                "UDP replies come from the VIP"
            );
            seen.insert(name);
            let (name, peer) = client.udp_connected(vip);
            assert_eq!(
                peer,
                socket(vip).to_string(),
                "connected UDP peer is the VIP"
            );
            seen.insert(name);
        }
        assert_eq!(seen, names(&tiers, 0), "{vip}: only tier 0, and both of it");
    }

    // A process outside the cgroup is not translated: the VIP has no route there.
    let outside = netns::within(&world.client_ns, || {
        TcpStream::connect_timeout(&socket(VIP4), Duration::from_secs(1)).map(|_| ())
    });
    assert!(
        outside.is_err(),
        "a connect outside the cgroup reached a backend"
    );

    // Tier 0 empties: the very next connect lands in tier 1; then tier 2.
    let tier1 = [(T1A, 1), (T1B, 1), (T2A, 2)];
    sync(&mut dataplane, &all_services(&tier1, None));
    for vip in [VIP4, VIP6] {
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            seen.insert(client.tcp(vip).0);
            seen.insert(client.udp(vip).0);
        }
        assert_eq!(seen, names(&tier1, 1), "{vip} after tier 0 emptied");
    }
    let tier2 = [(T2A, 2)];
    sync(&mut dataplane, &all_services(&tier2, None));
    assert_eq!(client.tcp(VIP4).0, "t2a");
    assert_eq!(client.udp(VIP6).0, "t2a");

    // No backend at all: the connect is refused rather than sent to the VIP.
    sync(&mut dataplane, &all_services(&[], None));
    let answer = client.ask(&format!("tcp {VIP4} {PORT}"));
    assert!(
        answer.starts_with("err"),
        "connect with no backend: {answer}"
    );

    // Tier 0 comes back: traffic returns to it.
    sync(&mut dataplane, &all_services(&tiers, None));
    for _ in 0..8 {
        assert!(names(&tiers, 0).contains(&client.tcp(VIP4).0));
    }

    let listing = dataplane.list().expect("list");
    let tcp4 = listing
        .services
        .iter()
        .find(|s| s.key == VsKey::new(Protocol::Tcp, VIP4.parse().expect("vip"), PORT))
        .expect("tcp4 listed");
    assert_eq!(tcp4.backends.len(), tiers.len());
    let to_tier0: u64 = tcp4
        .backends
        .iter()
        .filter(|b| b.tier == 0)
        .map(|b| b.connections)
        .sum();
    assert!(to_tier0 >= 8, "per-backend counters: {tcp4:?}");
    assert!(tcp4
        .backends
        .iter()
        .filter(|b| b.active)
        .all(|b| b.tier == 0));
    assert!(tcp4.counters.translations >= to_tier0);
    assert_eq!(tcp4.counters.no_backend, 1);
}

#[test]
fn tiers_take_their_shares_and_an_emptied_tier_spills_on_the_very_next_connect() {
    let world = World::new();
    let mut dataplane = world.open();
    let tiers = [(T0A, 0), (T0B, 0), (T1A, 1), (T1B, 1), (T2A, 2)];
    // Tier 2 has no share: it is the fallback only.
    let shares = [700_000, 300_000, 0, 0, 0, 0, 0, 0];
    sync(&mut dataplane, &shared_services(&tiers, shares, None));
    let mut client = world.client();
    for (protocol, vip) in [("tcp", VIP4), ("udp", VIP6), ("tcp", VIP6), ("udp", VIP4)] {
        let (failed, served) = client.spread(protocol, vip, 2000);
        assert_eq!(failed, 0, "{protocol} {vip}: {served:?}");
        let [near, next, fallback] = tier_fractions(&tiers, &served);
        // ±5 points is about five standard deviations at 2,000 draws.
        assert!(
            (near - 0.7).abs() <= 0.05,
            "{protocol} {vip} tier 0 took {near}: {served:?}"
        );
        assert!(
            (next - 0.3).abs() <= 0.05,
            "{protocol} {vip} tier 1 took {next}: {served:?}"
        );
        assert_eq!(
            fallback, 0.0,
            "{protocol} {vip}: the fallback tier served: {served:?}"
        );
        assert!(
            served.len() == 4,
            "every backend with a share serves: {served:?}"
        );
    }

    // Tier 0 empties with the shares unchanged: the datapath draws among what is left, from
    // the very first connect on.
    let without_tier0 = [(T1A, 1), (T1B, 1), (T2A, 2)];
    sync(
        &mut dataplane,
        &shared_services(&without_tier0, shares, None),
    );
    assert!(names(&without_tier0, 1).contains(&client.tcp(VIP4).0));
    let (failed, served) = client.spread("tcp", VIP4, 200);
    assert_eq!(failed, 0);
    assert_eq!(
        served.keys().cloned().collect::<BTreeSet<_>>(),
        names(&without_tier0, 1),
        "after tier 0 emptied"
    );

    // Every tier with a share empty: the nearest non-empty tier takes over, as without shares.
    sync(&mut dataplane, &shared_services(&[(T2A, 2)], shares, None));
    assert_eq!(client.tcp(VIP4).0, "t2a");
    assert_eq!(client.udp(VIP6).0, "t2a");

    // Affinity under shares: one client keeps its backend while that backend's tier serves.
    sync(
        &mut dataplane,
        &shared_services(&tiers, [500_000, 500_000, 0, 0, 0, 0, 0, 0], Some(60)),
    );
    let (failed, served) = client.spread("tcp", VIP4, 200);
    assert_eq!(failed, 0);
    assert_eq!(served.len(), 1, "affinity under shares: {served:?}");

    let listing = dataplane.list().expect("list");
    let tcp4 = listing
        .services
        .iter()
        .find(|s| s.key == VsKey::new(Protocol::Tcp, VIP4.parse().expect("vip"), PORT))
        .expect("tcp4 listed");
    let active: BTreeSet<u8> = tcp4
        .backends
        .iter()
        .filter(|b| b.active)
        .map(|b| b.tier)
        .collect();
    assert_eq!(
        active,
        BTreeSet::from([0, 1]),
        "both shared tiers are listed as serving"
    );
}

/// Whether the kernel has `bpf_sock_destroy` (6.5+), which connected UDP sockets need to
/// follow backend removals.
fn kernel_destroys_sockets() -> bool {
    aya::Btf::from_sys_fs().is_ok_and(|btf| {
        btf.id_by_type_name_kind("bpf_sock_destroy", aya_obj::btf::BtfKind::Func)
            .is_ok()
    })
}

#[test]
fn connected_udp_sockets_follow_a_removed_backend_and_others_stay() {
    const TEST: &str = "connected_udp_sockets_follow_a_removed_backend_and_others_stay";
    if !kernel_destroys_sockets() {
        harness::skip(TEST, "the kernel has no bpf_sock_destroy (6.5+)");
        return;
    }
    capture_logs();
    let world = World::new();
    let mut dataplane = world.open();
    let both = [(T0A, 0), (T0B, 0)];
    let mut table = ProgrammedTable::new();
    for vip in [VIP4, VIP6] {
        service(&mut table, Protocol::Udp, vip, &both, None);
    }
    // A second Service on the same backends that keeps them: its sockets stay.
    let other4 = "10.96.213.20";
    service(&mut table, Protocol::Udp, other4, &both, None);
    sync(&mut dataplane, &table);
    let mut client = world.client();

    for vip in [VIP4, VIP6] {
        let answer = client.ask(&format!("udpkeep {vip} {PORT}"));
        let (first, index) = parse_pair(&answer);
        let staying = parse_pair(&client.ask(&format!("udpkeep {other4} {PORT}")));
        let removed = if first == T0A.name { T0A } else { T0B };
        let live = if first == T0A.name { T0B } else { T0A };

        let mut after = table.clone();
        service(&mut after, Protocol::Udp, vip, &[(live, 0)], None);
        sync(&mut dataplane, &after);

        // The removed backend's server still answers: only the dataplane can move the
        // socket.
        let (name, how) = parse_pair(&client.ask(&format!("udpagain {index}")));
        assert_eq!(
            (name.as_str(), how.as_str()),
            (live.name, "reconnected"),
            "{vip}: the connected socket kept sending to {} after its removal; log: {:?}",
            removed.name,
            log_lines_with("UDP sockets")
        );
        let (name, how) = parse_pair(&client.ask(&format!("udpagain {}", staying.1)));
        assert_eq!(
            (name.as_str(), how.as_str()),
            (staying.0.as_str(), "same"),
            "a socket of another Service that keeps the backend was destroyed"
        );
        sync(&mut dataplane, &table);
    }
}

/// `unshare` options that give the agent what a DaemonSet pod without `hostPID` has: a PID
/// namespace and a `/proc` of its own (it sees only its own processes), and a mount namespace
/// that receives the host's later mounts, as `mountPropagation: HostToContainer` does.
const OWN_PID_NAMESPACE: [&str; 7] = [
    "unshare",
    "--pid",
    "--fork",
    "--mount-proc",
    "--propagation=slave",
    "--kill-child",
    "--",
];

/// Waits until the agent reports `count` backends programmed, without a failed sync.
fn wait_for_backends(agent: &mut cluster::YamlAgent, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(agent.running(), "the agent exited:\n{}", agent.log());
        let failed = agent.metric("topoproxy_syncs_total{result=\"failure\"}");
        assert_eq!(failed.unwrap_or(0.0), 0.0, "a sync failed");
        if agent.metric("topoproxy_backends") == Some(count as f64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not program {count} backends"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent as deployed (`topoproxy run` in a PID namespace of its own, so `/proc` shows
/// none of the node's other processes) still finds a pod's network namespace through its pin
/// under `/run/netns`, and a connected UDP socket there follows its backend's removal.
#[test]
fn a_pods_connected_udp_socket_follows_a_removed_backend_when_the_agent_sees_no_host_pids() {
    const TEST: &str =
        "a_pods_connected_udp_socket_follows_a_removed_backend_when_the_agent_sees_no_host_pids";
    if !kernel_destroys_sockets() {
        harness::skip(TEST, "the kernel has no bpf_sock_destroy (6.5+)");
        return;
    }
    // Dropped last: namespaces, cgroup and pins go even when an assertion fails.
    let world = World::new();
    let mut fixture = cluster::Fixture::new("udpnetns");
    fixture.nodes = vec![(LIST_NODE.to_owned(), "zone-a".to_owned())];
    let endpoint = |backend: Backend| cluster::Endpoint {
        address: backend.v4.parse().expect("v4"),
        node: LIST_NODE.to_owned(),
        zone: "zone-a".to_owned(),
        condition: cluster::Condition::Ready,
        hint: None,
    };
    fixture.services = vec![cluster::Service {
        name: "dns".to_owned(),
        cluster_ip: VIP4.parse().expect("vip"),
        ports: vec![cluster::Port {
            name: "dns".to_owned(),
            protocol: "UDP",
            port: PORT,
            target_port: PORT,
        }],
        prefer_same_zone: false,
        topology: None,
        ipvs_scheduler: None,
        endpoints: vec![endpoint(T0A), endpoint(T0B)],
    }];
    fixture.write();
    let mut agent = ebpf_agent(&fixture, &world.settings.pin_dir, &world.cgroup);
    agent.set_wrapper(&OWN_PID_NAMESPACE);
    agent.set_env("RUST_LOG", Some("info,topoproxy::dataplane::ebpf=debug"));
    agent.start_process();
    wait_for_backends(&mut agent, 2);

    // The pod: the client process in its own network namespace, pinned under /run/netns.
    let mut client = world.client();
    let (first, index) = parse_pair(&client.ask(&format!("udpkeep {VIP4} {PORT}")));
    let (removed, live) = if first == T0A.name {
        (T0A, T0B)
    } else {
        (T0B, T0A)
    };
    fixture.service_mut("dns").endpoints = vec![endpoint(live)];
    fixture.write();
    wait_for_backends(&mut agent, 1);

    // The removed backend's server still answers: only the agent can move the socket.
    let (name, how) = parse_pair(&client.ask(&format!("udpagain {index}")));
    assert_eq!(
        (name.as_str(), how.as_str()),
        (live.name, "reconnected"),
        "the pod's connected socket kept sending to {} after its removal",
        removed.name
    );
}

#[test]
fn client_ip_affinity_holds_to_one_backend() {
    let world = World::new();
    let mut dataplane = world.open();
    let backends = [(T0A, 0), (T0B, 0), (T1A, 0), (T1B, 0)];
    sync(&mut dataplane, &all_services(&backends, Some(60)));
    let mut client = world.client();
    for vip in [VIP4, VIP6] {
        let first = client.tcp(vip).0;
        for _ in 0..20 {
            assert_eq!(client.tcp(vip).0, first, "{vip}: affinity broke");
        }
        // UDP keeps its own affinity per service.
        let first = client.udp(vip).0;
        for _ in 0..10 {
            assert_eq!(client.udp(vip).0, first);
        }
    }
    // Its backend gone, the client moves to another and sticks there.
    let first = client.tcp(VIP4).0;
    let remaining: Vec<(Backend, u8)> = backends
        .iter()
        .copied()
        .filter(|(b, _)| b.name != first)
        .collect();
    sync(&mut dataplane, &all_services(&remaining, Some(60)));
    let second = client.tcp(VIP4).0;
    assert_ne!(second, first);
    for _ in 0..10 {
        assert_eq!(client.tcp(VIP4).0, second);
    }
    let listing = dataplane.list().expect("list");
    assert!(listing
        .services
        .iter()
        .any(|s| s.counters.affinity_hits >= 10));

    // Without affinity the same client spreads.
    sync(&mut dataplane, &all_services(&backends, None));
    let spread: BTreeSet<String> = (0..40).map(|_| client.tcp(VIP4).0).collect();
    assert!(spread.len() > 1, "no affinity, yet always {spread:?}");
}

#[test]
fn a_restarted_dataplane_keeps_traffic_flowing_and_cleanup_removes_everything() {
    let world = World::new();
    let mut dataplane = world.open();
    let backends = [(T0A, 0), (T0B, 0), (T1A, 1)];
    let desired = all_services(&backends, None);
    sync(&mut dataplane, &desired);
    let mut client = world.client();
    let held = client.ask(&format!("hold {VIP4} {PORT}"));
    assert!(held.starts_with("ok"), "{held}");

    // Connect in a loop while the dataplane is dropped and reopened from its pins: the loop
    // runs before the drop, while nothing is open, and after the reopen.
    let stop = LoopStop::new();
    client.send(&format!("loop {VIP4} {PORT} {}", stop.path.display()));
    stop.wait_for_connects(10, "the connect loop did not start");
    // Ids of the programs behind this test's pins: other tests load programs of the same
    // names at the same time.
    let program_ids = pinned_program_ids(&world.settings.pin_dir);
    assert_eq!(program_ids.len(), PROGRAMS.len());
    drop(dataplane);
    // While nothing is open: the loop goes on through the pinned programs and maps.
    stop.wait_for_connects(10, "no connects while the dataplane was closed");
    let mut dataplane = world.open();
    stop.wait_for_connects(10, "no connects after the reopen");
    stop.now();
    let answer = client.answer();
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words[0], "ok", "{answer}");
    let (ok, failed): (u64, u64) = (
        words[1].parse().expect("ok"),
        words[2].parse().expect("failed"),
    );
    assert!(ok > 10, "too few connects in the loop: {answer}");
    assert_eq!(failed, 0, "connects failed across the restart: {answer}");
    assert_eq!(words[4], "t0a,t0b", "{answer}");

    // Adopted, not re-attached; the table reads back unchanged.
    assert_eq!(dataplane.load_report().adopted.len(), PROGRAMS.len());
    assert!(dataplane.load_report().attached.is_empty());
    assert_eq!(block_on(dataplane.read()).expect("read"), desired);
    assert!(
        client.ask("ping 0").starts_with("ok ping"),
        "held connection"
    );
    assert_eq!(
        pinned_program_ids(&world.settings.pin_dir),
        program_ids,
        "programs were replaced"
    );
    // And it keeps working: a change after adoption reaches the datapath.
    sync(&mut dataplane, &all_services(&[(T1A, 1)], None));
    assert_eq!(client.tcp(VIP4).0, "t1a");

    drop(dataplane);
    let report = cleanup(&world.settings).expect("cleanup");
    assert_eq!(report.detached, PROGRAMS.len());
    assert!(!world.settings.pin_dir.exists(), "pin dir left behind");
    let answer = client.ask(&format!("tcp {VIP4} {PORT}"));
    assert!(
        answer.starts_with("err"),
        "translated after cleanup: {answer}"
    );
    let still_loaded = wait_until_unloaded(&program_ids);
    assert!(
        still_loaded.is_empty(),
        "programs still loaded: {still_loaded:?}"
    );
    // Nothing of ours stays attached to the cgroup.
    assert!(cleanup(&world.settings).expect("second cleanup").detached == 0);
}

/// What an agent of map ABI 1 leaves: its maps pinned in the pin directory itself, its
/// programs pinned under another version.
fn make_pins_look_like_abi_1(pin_dir: &std::path::Path) -> Vec<PathBuf> {
    let maps_dir = pin_dir.join(MAPS_DIR);
    for entry in std::fs::read_dir(&maps_dir).expect("maps dir") {
        let entry = entry.expect("maps dir entry");
        std::fs::rename(entry.path(), pin_dir.join(entry.file_name())).expect("move a map pin");
    }
    std::fs::remove_dir(&maps_dir).expect("remove the maps dir");
    PROGRAMS
        .iter()
        .map(|name| {
            let old = pin_dir.join(format!("prog_{name}"));
            std::fs::rename(program_pin(pin_dir, name), &old).expect("rename a program pin");
            old
        })
        .collect()
}

#[test]
fn maps_of_another_abi_keep_serving_until_the_new_ones_hold_the_table() {
    let world = World::new();
    let mut dataplane = world.open();
    let desired = all_services(&[(T0A, 0), (T0B, 0)], None);
    sync(&mut dataplane, &desired);
    drop(dataplane);
    let old_pins = make_pins_look_like_abi_1(&world.settings.pin_dir);
    let old_ids = program_ids_at(old_pins.iter().cloned());

    let mut client = world.client();
    let stop = LoopStop::new();
    client.send(&format!("loop {VIP4} {PORT} {}", stop.path.display()));
    stop.wait_for_connects(10, "the connect loop did not start");
    let mut dataplane = world.open();
    // Fresh maps, empty: the links still run the old programs on the old maps.
    assert!(dataplane.map_switch_pending());
    assert!(
        dataplane.load_report().attached.is_empty(),
        "{:?}",
        dataplane.load_report()
    );
    assert!(!maps_pinned(&world.settings.pin_dir));
    assert!(block_on(dataplane.read()).expect("read").is_empty());
    let (name, _) = world.client().tcp(VIP4);
    assert!(
        ["t0a", "t0b"].contains(&name.as_str()),
        "served by the old maps: {name}"
    );

    stop.wait_for_connects(10, "no connects while the new maps were filled");
    sync(&mut dataplane, &desired);
    dataplane.complete_map_switch().expect("switch");
    assert!(!dataplane.map_switch_pending());
    stop.wait_for_connects(10, "no connects after the switch");
    stop.now();
    let answer = client.answer();
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words[0], "ok", "{answer}");
    assert!(
        words[1].parse::<u64>().expect("ok") > 10,
        "too few connects: {answer}"
    );
    assert_eq!(
        words[2], "0",
        "connects failed across the map switch: {answer}"
    );

    assert!(maps_pinned(&world.settings.pin_dir));
    assert!(
        old_pins.iter().all(|pin| !pin.exists()),
        "old program pins left"
    );
    for map in ["TP_SERVICES", "TP_BACKENDS", "TP_REV_NAT"] {
        assert!(
            !world.settings.pin_dir.join(map).exists(),
            "{map} of ABI 1 left"
        );
    }
    assert!(!world.settings.pin_dir.join("maps_staging").exists());
    let still_loaded = wait_until_unloaded(&old_ids);
    assert!(
        still_loaded.is_empty(),
        "old programs still loaded: {still_loaded:?}"
    );
    let (name, peer) = client.tcp(VIP4);
    assert!(["t0a", "t0b"].contains(&name.as_str()));
    assert_eq!(peer, socket(VIP4).to_string());

    // The next agent adopts what this one left.
    drop(dataplane);
    let dataplane = world.open();
    assert!(!dataplane.map_switch_pending());
    assert_eq!(dataplane.load_report().adopted.len(), PROGRAMS.len());
}

#[test]
fn a_missing_map_pin_loads_fresh_maps_and_switches_after_the_sync() {
    let world = World::new();
    let mut dataplane = world.open();
    let desired = all_services(&[(T0A, 0)], None);
    sync(&mut dataplane, &desired);
    drop(dataplane);
    // Adopting the old programs now would leave them reading maps no one writes.
    std::fs::remove_file(world.settings.pin_dir.join(MAPS_DIR).join("TP_REV_NAT"))
        .expect("remove a map pin");
    let mut dataplane = world.open();
    assert!(dataplane.map_switch_pending());
    sync(&mut dataplane, &desired);
    dataplane.complete_map_switch().expect("switch");
    assert!(maps_pinned(&world.settings.pin_dir));
    let mut client = world.client();
    let (name, peer) = client.tcp(VIP4);
    assert_eq!((name.as_str(), peer), ("t0a", socket(VIP4).to_string()));
    assert_eq!(client.udp(VIP4).1, socket(VIP4).to_string());
}

/// The file whose existence ends a client's `loop`, and the one beside it where the loop
/// counts its successful connects; both removed on drop.
struct LoopStop {
    path: PathBuf,
}

impl LoopStop {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("topoproxy-loop-stop-{}", unique()));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(Self::progress_path(&path));
        Self { path }
    }

    fn progress_path(stop: &Path) -> PathBuf {
        stop.with_extension("connects")
    }

    fn connects(&self) -> u64 {
        std::fs::read_to_string(Self::progress_path(&self.path))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the loop made `more` successful connects, for at most 30 s.
    fn wait_for_connects(&self, more: u64, what: &str) {
        let target = self.connects() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.connects() < target {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    fn now(&self) {
        std::fs::write(&self.path, b"stop").expect("write the loop's stop file");
    }
}

impl Drop for LoopStop {
    fn drop(&mut self) {
        // Also ends a loop whose test failed before stopping it.
        let _ = std::fs::write(&self.path, b"stop");
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(Self::progress_path(&self.path));
    }
}

/// The ids of this agent's programs pinned in `pin_dir`.
fn pinned_program_ids(pin_dir: &std::path::Path) -> BTreeSet<u32> {
    program_ids_at(PROGRAMS.iter().map(|name| program_pin(pin_dir, name)))
}

fn program_ids_at(pins: impl Iterator<Item = PathBuf>) -> BTreeSet<u32> {
    pins.map(|pin| {
        aya::programs::ProgramInfo::from_pin(&pin)
            .unwrap_or_else(|e| panic!("reading the pinned program {}: {e}", pin.display()))
            .id()
    })
    .collect()
}

/// Which of `ids` are still loaded once they had 10 s to go: a freed program lingers until
/// the kernel's deferred free (an RCU grace period) has run.
fn wait_until_unloaded(ids: &BTreeSet<u32>) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let still: Vec<u32> = loaded_program_ids().intersection(ids).copied().collect();
        if still.is_empty() || Instant::now() >= deadline {
            return still;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ids of the loaded programs named like ours.
fn loaded_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| {
            info.name_as_str().is_some_and(|name| {
                PROGRAMS
                    .iter()
                    .any(|p| p.starts_with(name) && !name.is_empty())
            })
        })
        .map(|info| info.id())
        .collect()
}

#[test]
fn one_endpoint_change_costs_a_constant_number_of_map_writes() {
    let world = World::new();
    let mut dataplane = world.open();
    let many: Vec<(Backend, u8)> = BACKENDS.iter().map(|b| (*b, 0)).collect();
    let mut table = ProgrammedTable::new();
    // A big service, so a cost that grew with it would show.
    let vip: IpAddr = VIP4.parse().expect("vip");
    let key = VsKey::new(Protocol::Tcp, vip, PORT);
    let mut destinations: BTreeMap<(IpAddr, u16), DestinationState> = BTreeMap::new();
    for i in 0..1000u32 {
        let address = IpAddr::from([10, 214, (i / 250) as u8, (i % 250) as u8 + 1]);
        destinations.insert(
            (address, PORT),
            DestinationState {
                weight: 1,
                tier: (i % 3) as u8,
                local: false,
            },
        );
    }
    table.insert(
        key,
        ProgrammedService {
            config: config(None),
            destinations,
        },
    );
    service(&mut table, Protocol::Udp, VIP4, &many, None);
    sync(&mut dataplane, &table);

    let mut cost = |change: &dyn Fn(&mut ProgrammedService)| {
        let mut next = table.clone();
        change(next.get_mut(&key).expect("service"));
        let before = dataplane.map_writes();
        sync(&mut dataplane, &next);
        table = next;
        dataplane.map_writes() - before
    };
    let first = IpAddr::from([10, 214, 0, 1]);
    let added = IpAddr::from([10, 215, 0, 1]);
    let add = cost(&|s| {
        s.destinations.insert(
            (added, PORT),
            DestinationState {
                weight: 1,
                tier: 0,
                local: false,
            },
        );
    });
    let remove = cost(&|s| {
        s.destinations.remove(&(first, PORT));
    });
    let tier_move = cost(&|s| {
        s.destinations.insert(
            (added, PORT),
            DestinationState {
                weight: 1,
                tier: 2,
                local: false,
            },
        );
    });
    let weight = cost(&|s| {
        s.destinations.insert(
            (added, PORT),
            DestinationState {
                weight: 5,
                tier: 2,
                local: false,
            },
        );
    });
    println!("map writes: add {add}, remove {remove}, tier move {tier_move}, weight {weight}");
    assert_eq!(add, 2, "add: slot + service entry");
    assert!(remove <= 4, "remove: {remove}");
    assert!(tier_move <= 5, "tier move: {tier_move}");
    assert_eq!(weight, 1);
}

/// One client per CPU, each pinned to its CPU, connecting to `vip:port` in a loop for
/// `millis` while `during` runs over and over; (connects, failures, first error) per client.
fn connect_loops(
    world: &World,
    vip: &str,
    port: u16,
    millis: u64,
    mut during: impl FnMut(),
) -> Vec<(u64, u64, String)> {
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let finished = std::sync::Arc::new(AtomicU32::new(0));
    let loops: Vec<_> = (0..cpus)
        .map(|cpu| {
            let mut client = world.client();
            assert_eq!(client.ask(&format!("pin {cpu}")), "ok pinned");
            client.send(&format!("connects {vip} {port} {millis}"));
            let finished = finished.clone();
            std::thread::spawn(move || {
                let answer = client.answer();
                finished.fetch_add(1, Ordering::SeqCst);
                answer
            })
        })
        .collect();
    while finished.load(Ordering::SeqCst) < cpus as u32 {
        during();
    }
    loops
        .into_iter()
        .map(|handle| {
            let answer = handle.join().expect("client thread");
            let words: Vec<&str> = answer.split_whitespace().collect();
            assert_eq!(words.first(), Some(&"ok"), "{answer}");
            (
                words[1].parse().expect("connects"),
                words[2].parse().expect("failures"),
                words[3].to_owned(),
            )
        })
        .collect()
}

/// A sink service on VIP4 with `backends`, all in tier 0.
fn sink_service(backends: &[Backend], persistence_timeout: Option<u32>) -> ProgrammedTable {
    let destinations = backends
        .iter()
        .map(|backend| {
            (
                (backend.v4.parse().expect("address"), SINK_PORT),
                DestinationState {
                    weight: 1,
                    tier: 0,
                    local: false,
                },
            )
        })
        .collect();
    [(
        VsKey::new(Protocol::Tcp, VIP4.parse().expect("vip"), SINK_PORT),
        ProgrammedService {
            config: config(persistence_timeout),
            destinations,
        },
    )]
    .into()
}

#[test]
fn connects_racing_backend_removals_never_miss() {
    let world = World::new();
    let mut dataplane = world.open();
    // Three backends down to one and back: the removals delete slots 1 and 2, which a connect
    // that read the old counts may be about to read.
    let full = sink_service(&[T0A, T0B, T1A], None);
    let shrunk = sink_service(&[T1A], None);
    sync(&mut dataplane, &full);
    let to_shrunk = diff(&shrunk, &full);
    let to_full = diff(&full, &shrunk);
    let mut churns = 0u64;
    let results = connect_loops(&world, VIP4, SINK_PORT, 4_000, || {
        block_on(dataplane.apply(&to_shrunk)).expect("remove backends");
        block_on(dataplane.apply(&to_full)).expect("add them back");
        churns += 1;
    });
    let connects: u64 = results.iter().map(|r| r.0).sum();
    let failures: u64 = results.iter().map(|r| r.1).sum();
    println!(
        "{connects} connects, {failures} failed, during {churns} remove/add rounds: {results:?}"
    );
    assert!(churns > 20, "too few churn rounds: {churns}");
    assert!(connects > 1_000, "too few connects: {results:?}");
    assert_eq!(
        failures, 0,
        "connects failed while backends churned: {results:?}"
    );
    assert_eq!(block_on(dataplane.read()).expect("read"), full);
}

#[test]
fn affinity_holds_while_clients_on_every_cpu_connect_at_once() {
    let world = World::new();
    let mut dataplane = world.open();
    let backends = [T0A, T0B, T1A, T1B];
    sync(&mut dataplane, &sink_service(&backends, Some(60)));
    // One connect first, so the loops start from one affinity entry.
    let mut first = world.client();
    let answer = first.ask(&format!("connects {VIP4} {SINK_PORT} 1"));
    assert!(answer.starts_with("ok"), "{answer}");
    // Every client is in the same network namespace: one affinity entry, stamped from every
    // CPU at once.
    let results = connect_loops(&world, VIP4, SINK_PORT, 3_000, || {
        std::thread::sleep(Duration::from_millis(10));
    });
    assert!(results.iter().all(|r| r.1 == 0), "{results:?}");
    let connects: u64 = results.iter().map(|r| r.0).sum();
    let listing = dataplane.list().expect("list");
    let used: Vec<(IpAddr, u64)> = listing.services[0]
        .backends
        .iter()
        .filter(|b| b.connections > 0)
        .map(|b| (b.address, b.connections))
        .collect();
    println!("{connects} connects went to {used:?}");
    assert!(connects > 1_000, "too few connects: {results:?}");
    assert_eq!(
        used.len(),
        1,
        "affinity broke under concurrent connects: {used:?}"
    );
}

/// A load-balancer frontend with `loadBalancerSourceRanges` is not translated at the socket:
/// the source of an unbound socket is not known at connect, so the call goes on to the IP
/// itself (unroutable here) rather than to a backend the ranges may not admit. Without
/// ranges, or once they are removed, the same frontend is balanced at the socket.
#[test]
fn a_firewalled_load_balancer_frontend_is_not_translated_at_the_socket() {
    let world = World::new();
    let mut dataplane = world.open();
    let open = load_balancer_services(&[]);
    sync(&mut dataplane, &open);
    let mut client = world.client();
    for vip in [VIP4, VIP6] {
        assert_eq!(client.tcp(vip).0, "t0a");
        assert_eq!(client.udp(vip).0, "t0a");
    }

    // Ranges that hold the client and the node: still not translated at the socket.
    sync(
        &mut dataplane,
        &load_balancer_services(&["10.213.0.0/24", "fd00:213::/64"]),
    );
    for vip in [VIP4, VIP6] {
        for protocol in ["tcp", "udp"] {
            let answer = client.ask(&format!("{protocol} {vip} {PORT}"));
            assert!(
                answer.starts_with("err "),
                "{protocol} to firewalled {vip} was translated: {answer}"
            );
        }
    }

    sync(&mut dataplane, &open);
    for vip in [VIP4, VIP6] {
        assert_eq!(client.tcp(vip).0, "t0a");
    }
}

/// [`all_services`] on T0A as load-balancer frontends with `ranges` (none: open).
fn load_balancer_services(ranges: &[&str]) -> ProgrammedTable {
    let mut table = all_services(&[(T0A, 0)], None);
    let nets: Vec<ipnetwork::IpNetwork> = ranges
        .iter()
        .map(|range| range.parse().expect("range"))
        .collect();
    for (key, service) in table.iter_mut() {
        let family = topoproxy::model::IpFamily::of(&key.address);
        service.config.frontend = Frontend::LoadBalancer;
        service.config.source_ranges =
            topoproxy::table::SourceRanges::for_frontend(&nets, family, None);
    }
    table
}

#[test]
fn ipv4_mapped_vips_from_dual_stack_sockets_are_translated_as_ipv4() {
    let world = World::new();
    let mut dataplane = world.open();
    sync(&mut dataplane, &all_services(&[(T0A, 0)], None));
    let mut client = world.client();
    let mapped = format!("::ffff:{VIP4}");
    let in_view = socket(&mapped).to_string();
    assert_eq!(client.tcp(&mapped), ("t0a".to_owned(), in_view.clone()));
    assert_eq!(client.udp(&mapped), ("t0a".to_owned(), in_view.clone()));
    assert_eq!(client.udp_connected(&mapped), ("t0a".to_owned(), in_view));
    let listing = dataplane.list().expect("list");
    let udp4 = VsKey::new(Protocol::Udp, VIP4.parse().expect("vip"), PORT);
    let counted = listing
        .services
        .iter()
        .find(|s| s.key == udp4)
        .expect("udp4");
    assert!(counted.counters.translations >= 2, "{counted:?}");
}

#[test]
fn one_udp_socket_asking_two_vips_that_share_a_backend_sees_each_reply_from_its_vip() {
    const VIP4_B: &str = "10.96.213.11";
    let world = World::new();
    let mut dataplane = world.open();
    let mut table = ProgrammedTable::new();
    service(&mut table, Protocol::Udp, VIP4, &[(T0A, 0)], None);
    service(
        &mut table,
        Protocol::Udp,
        VIP4_B,
        &[(T0A, 0), (T0B, 0)],
        None,
    );
    sync(&mut dataplane, &table);
    let mut client = world.client();
    for round in 0..20 {
        let answer = client.ask(&format!("udp2 {VIP4} {VIP4_B} {PORT}"));
        let mut replies: Vec<&str> = answer.split_whitespace().skip(1).collect();
        replies.sort_unstable();
        assert!(answer.starts_with("ok"), "{answer}");
        let expected = [
            format!("t0a@{}", socket(VIP4)),
            format!("t0b@{}", socket(VIP4_B)),
        ];
        assert_eq!(replies, expected, "round {round}: {answer}");
    }
}

#[test]
fn a_new_version_swaps_its_programs_into_the_pinned_links_under_a_connect_loop() {
    let world = World::new();
    let mut dataplane = world.open();
    let desired = all_services(&[(T0A, 0), (T0B, 0)], None);
    sync(&mut dataplane, &desired);
    // What the previous build leaves: the same links and maps, its programs pinned without a
    // version.
    let old_pins: Vec<PathBuf> = PROGRAMS
        .iter()
        .map(|name| world.settings.pin_dir.join(format!("prog_{name}")))
        .collect();
    for (name, old) in PROGRAMS.iter().zip(&old_pins) {
        std::fs::rename(program_pin(&world.settings.pin_dir, name), old).expect("rename pin");
    }
    let old_ids = program_ids_at(old_pins.iter().cloned());
    let mut client = world.client();
    let held = client.ask(&format!("hold {VIP4} {PORT}"));
    assert!(held.starts_with("ok"), "{held}");

    let stop = LoopStop::new();
    client.send(&format!("loop {VIP4} {PORT} {}", stop.path.display()));
    stop.wait_for_connects(10, "the connect loop did not start");
    drop(dataplane);
    let mut dataplane = world.open();
    let report = dataplane.load_report().clone();
    stop.wait_for_connects(10, "no connects after the upgrade");
    stop.now();
    let answer = client.answer();

    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(words[0], "ok", "{answer}");
    let (ok, failed): (u64, u64) = (
        words[1].parse().expect("ok"),
        words[2].parse().expect("failed"),
    );
    assert!(ok > 10, "too few connects in the loop: {answer}");
    assert_eq!(failed, 0, "connects failed across the upgrade: {answer}");
    assert_eq!(report.upgraded.len(), PROGRAMS.len(), "{report:?}");
    assert!(
        report.adopted.is_empty() && report.attached.is_empty(),
        "{report:?}"
    );
    let new_ids = pinned_program_ids(&world.settings.pin_dir);
    assert!(
        new_ids.is_disjoint(&old_ids),
        "old {old_ids:?}, new {new_ids:?}"
    );
    assert!(
        old_pins.iter().all(|pin| !pin.exists()),
        "old program pins left"
    );
    // The links run the new programs: nothing holds the old ones any more.
    let still_loaded = wait_until_unloaded(&old_ids);
    assert!(
        still_loaded.is_empty(),
        "old programs still loaded: {still_loaded:?}"
    );
    assert_eq!(block_on(dataplane.read()).expect("read"), desired);
    assert!(
        client.ask("ping 0").starts_with("ok ping"),
        "held connection"
    );
    let (_, peer) = client.tcp(VIP4);
    assert_eq!(peer, socket(VIP4).to_string());

    // The same version again is adopted as before.
    drop(dataplane);
    let dataplane = world.open();
    assert_eq!(dataplane.load_report().adopted.len(), PROGRAMS.len());
    assert_eq!(pinned_program_ids(&world.settings.pin_dir), new_ids);
}

/// Everything the test process logs through `tracing`, from every thread.
#[test]
fn datapath_diagnostics_are_off_by_default_and_name_the_service_once_switched_on() {
    capture_logs();
    let world = World::new();
    let mut dataplane = world.open();
    let unique_name = format!("diag-{}", world.id);
    let names = unique_name.clone();
    dataplane.attach_service_names(std::sync::Arc::new(move |key: &VsKey| {
        Some(format!("{names}/port-{}", key.port))
    }));
    // No backend on the sink port; only a tier-1 backend on the name port.
    let mut table = sink_service(&[], None);
    service(&mut table, Protocol::Tcp, VIP4, &[(T1A, 1)], None);
    sync(&mut dataplane, &table);
    let mut client = world.client();
    let refused = format!("tcp {VIP4} {SINK_PORT}");
    let no_backend = [unique_name.as_str(), "no_backend", "port-9090"];
    let fallback = [unique_name.as_str(), "tier_fallback", "port-8080"];

    // Off: refused and fallen back, but nothing logged.
    let answer = client.ask(&refused);
    assert!(
        answer.starts_with("err"),
        "the sink VIP is refused: {answer}"
    );
    assert_eq!(client.tcp(VIP4).0, "t1a");

    dataplane
        .set_datapath_log(DatapathLog {
            events: topoproxy_common::log_events::ALL,
            per_second: 100,
        })
        .expect("switch the datapath log on");
    assert!(client.ask(&refused).starts_with("err"));
    assert_eq!(client.tcp(VIP4).0, "t1a");
    let logged = wait_for_log_lines(&no_backend, 1);
    let fell_back = wait_for_log_lines(&fallback, 1);
    assert!(fell_back[0].contains("tier=1"), "{fell_back:?}");
    // The ring buffer is ordered: the calls made while it was off left nothing before these.
    assert_eq!(
        log_lines_with(&unique_name).len(),
        2,
        "{logged:?} {fell_back:?}"
    );

    // Capped: one record per CPU per second, whatever the burst.
    dataplane
        .set_datapath_log(DatapathLog {
            events: topoproxy_common::log_events::NO_BACKEND,
            per_second: 1,
        })
        .expect("cap the datapath log");
    let before = log_lines_with(&unique_name).len();
    // Over a second, so every CPU's window renews at least once.
    let burst = client.ask(&format!("connects {VIP4} {SINK_PORT} 1200"));
    let refused_in_burst: u64 = burst
        .split_whitespace()
        .nth(2)
        .expect("failures")
        .parse()
        .expect("n");
    assert!(refused_in_burst >= 20, "{burst}");
    // A last record marks the end of the burst in the ring buffer.
    dataplane
        .set_datapath_log(DatapathLog {
            events: topoproxy_common::log_events::TIER_FALLBACK,
            per_second: 100,
        })
        .expect("switch to tier fallbacks");
    assert_eq!(client.tcp(VIP4).0, "t1a");
    wait_for_log_lines(&fallback, 2);
    let burst_records = log_lines_with(&unique_name).len() - before - 1;
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    // 1.2 s opens at most two new one-second windows per CPU.
    assert!(
        (1..=2 * cpus).contains(&burst_records),
        "{burst_records} records for {refused_in_burst} refused connects"
    );

    // `topoproxy datapath-log` switches it from outside the agent, through the pins.
    topoproxy::dataplane::ebpf::set_datapath_log(&world.settings.pin_dir, DatapathLog::OFF)
        .expect("switch the datapath log off through the pinned map");
    assert_eq!(client.tcp(VIP4).0, "t1a");
    assert!(client.ask(&refused).starts_with("err"));
    // A marker switched on after them: nothing from the two calls made while off precedes it.
    dataplane
        .set_datapath_log(DatapathLog {
            events: topoproxy_common::log_events::NO_BACKEND,
            per_second: 100,
        })
        .expect("switch no-backend records on");
    let before = log_lines_with(&unique_name).len();
    assert!(client.ask(&refused).starts_with("err"));
    let lines = wait_for_log_lines(&[unique_name.as_str()], before + 1);
    assert_eq!(lines.len(), before + 1, "{lines:?}");
    assert!(lines[before].contains("no_backend"), "{lines:?}");
}

// ---- benchmarks ----

#[test]
#[ignore = "benchmark: cargo test --test host_ebpf -- --ignored --nocapture bench_"]
fn bench_connect_vip_vs_direct() {
    let world = World::new();
    let mut dataplane = world.open();
    let mut desired = ProgrammedTable::new();
    let sink: IpAddr = T0A.v4.parse().expect("address");
    desired.insert(
        VsKey::new(Protocol::Tcp, VIP4.parse().expect("vip"), SINK_PORT),
        ProgrammedService {
            config: config(None),
            destinations: [(
                (sink, SINK_PORT),
                DestinationState {
                    weight: 1,
                    tier: 0,
                    local: false,
                },
            )]
            .into(),
        },
    );
    sync(&mut dataplane, &desired);
    let mut client = world.client();
    let total: u32 = std::env::var("TOPOPROXY_BENCH_CONNECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let chunk = 1_000.min(total);
    let (mut vip_ns, mut direct_ns) = (0u128, 0u128);
    let mut ratios = Vec::new();
    let mut measure = |address: &str| -> u128 {
        let answer = client.ask(&format!("bench {address} {SINK_PORT} {chunk}"));
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert_eq!(words[0], "ok", "{answer}");
        assert_eq!(words[2], "0", "failed connects: {answer}");
        words[1].parse().expect("ns")
    };
    // Warm up, then alternate chunks so both see the same machine load.
    measure(VIP4);
    measure(T0A.v4);
    for round in 0..total / chunk {
        // Alternate which goes first, so neither always follows the other.
        let (vip, direct) = if round.is_multiple_of(2) {
            let vip = measure(VIP4);
            (vip, measure(T0A.v4))
        } else {
            let direct = measure(T0A.v4);
            (measure(VIP4), direct)
        };
        vip_ns += vip;
        direct_ns += direct;
        ratios.push(vip as f64 / direct as f64);
    }
    ratios.sort_by(f64::total_cmp);
    let n = f64::from(total / chunk * chunk);
    println!(
        "connect() x{n} each: via VIP {:.2} us, direct {:.2} us, ratio of totals {:.3}, \
         median ratio of {} alternating chunks {:.3}",
        vip_ns as f64 / n / 1e3,
        direct_ns as f64 / n / 1e3,
        vip_ns as f64 / direct_ns as f64,
        ratios.len(),
        ratios[ratios.len() / 2]
    );
}

/// Network namespaces pinned under /run/netns, as a runtime pins pods', each holding a
/// connected UDP socket (what a pod's DNS client holds); removed on drop.
struct PinnedNamespaces {
    names: Vec<String>,
    _sockets: Vec<UdpSocket>,
}

impl PinnedNamespaces {
    fn new(count: usize) -> Self {
        let id = unique();
        let mut namespaces = Self {
            names: Vec::new(),
            _sockets: Vec::new(),
        };
        for i in 0..count {
            let name = format!("tpe-b{id}-{i}");
            shell(&format!(
                "ip netns add {name} && ip -n {name} link set lo up"
            ));
            namespaces.names.push(name);
        }
        let paths: Vec<PathBuf> = namespaces.names.iter().map(netns::netns_path).collect();
        // setns on a thread of its own: a socket belongs to the namespace it was made in.
        namespaces._sockets = std::thread::spawn(move || {
            paths
                .iter()
                .map(|path| {
                    netns::enter(path);
                    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
                    socket.connect("127.0.0.1:53").expect("connect");
                    socket
                })
                .collect()
        })
        .join()
        .expect("socket thread");
        namespaces
    }
}

impl Drop for PinnedNamespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// What one apply that removes a backend costs, with 100 pinned network namespaces (one
/// connected UDP socket each) on the node: a UDP removal (the agent walks every namespace
/// once) against a TCP removal (no walk).
#[test]
#[ignore = "benchmark: cargo test --test host_ebpf -- --ignored --nocapture bench_"]
fn bench_udp_removal_over_100_network_namespaces() {
    const TEST: &str = "bench_udp_removal_over_100_network_namespaces";
    if !kernel_destroys_sockets() {
        harness::skip(TEST, "the kernel has no bpf_sock_destroy (6.5+)");
        return;
    }
    let count: usize = std::env::var("TOPOPROXY_BENCH_NAMESPACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let world = World::new();
    let _namespaces = PinnedNamespaces::new(count);
    let mut dataplane = world.open();
    let rounds = 20;
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mut both = ProgrammedTable::new();
        service(&mut both, protocol, VIP4, &[(T0A, 0), (T0B, 0)], None);
        let mut one = ProgrammedTable::new();
        service(&mut one, protocol, VIP4, &[(T0A, 0)], None);
        let mut took = Vec::new();
        for _ in 0..rounds {
            sync(&mut dataplane, &both);
            let actual = block_on(dataplane.read()).expect("read");
            let ops = diff(&one, &actual);
            let started = Instant::now();
            block_on(dataplane.apply(&ops)).expect("apply");
            took.push(started.elapsed());
        }
        took.sort();
        sync(&mut dataplane, &ProgrammedTable::new());
        println!(
            "{protocol:?} backend removal with {count} pinned namespaces: median {:.2} ms, \
             max {:.2} ms over {rounds} applies",
            took[rounds / 2].as_secs_f64() * 1e3,
            took[rounds - 1].as_secs_f64() * 1e3
        );
    }
}

#[test]
#[ignore = "benchmark: cargo test --test host_ebpf -- --ignored --nocapture bench_"]
fn bench_cold_sync() {
    let world = World::new();
    let mut dataplane = world.open();
    let services: u32 = std::env::var("TOPOPROXY_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut desired = ProgrammedTable::new();
    for s in 0..services {
        let vip = IpAddr::from([10, 97, (s / 250) as u8, (s % 250) as u8 + 1]);
        let destinations = (0..10u32)
            .map(|b| {
                let n = s * 10 + b;
                let address = IpAddr::from([10, 216 + (n >> 16) as u8, (n >> 8) as u8, n as u8]);
                (
                    (address, 80),
                    DestinationState {
                        weight: 1,
                        tier: (b % 3) as u8,
                        local: false,
                    },
                )
            })
            .collect();
        desired.insert(
            VsKey::new(Protocol::Tcp, vip, 80),
            ProgrammedService {
                config: config(None),
                destinations,
            },
        );
    }
    let actual = block_on(dataplane.read()).expect("read");
    let ops = diff(&desired, &actual);
    let writes = dataplane.map_writes();
    let started = Instant::now();
    block_on(dataplane.apply(&ops)).expect("apply");
    let applied = started.elapsed();
    let writes = dataplane.map_writes() - writes;
    let started = Instant::now();
    let read = block_on(dataplane.read()).expect("read back");
    let read_back = started.elapsed();
    assert_eq!(read, desired);
    println!(
        "cold sync: {services} services x 10 backends, {} ops, {writes} map writes in {:.3} s; \
         read back in {:.3} s",
        ops.len(),
        applied.as_secs_f64(),
        read_back.as_secs_f64()
    );
}

// ---- `topoproxy list --proxy-mode ebpf`: the real binary beside the real agent ----

/// This node in the [`AgentWorld`] fixtures.
const LIST_NODE: &str = "node-a1";

/// An agent process (`topoproxy run --proxy-mode ebpf` on a YAML directory) whose programs
/// attach to an empty child cgroup and pin under a directory of their own; north-south off and a
/// sync period of an hour, so that every sync a test sees comes from a change it made (no
/// periodic re-read repairs anything behind its back). Dropping it kills the agent, runs
/// `topoproxy cleanup` and removes the pin directory and the cgroup.
struct AgentWorld {
    pin_dir: PathBuf,
    cgroup: PathBuf,
    fixture: cluster::Fixture,
    agent: cluster::YamlAgent,
}

impl AgentWorld {
    fn new(label: &str) -> Self {
        require_root("cgroups, bpffs");
        let id = unique();
        let cgroup = cgroup2_mount()
            .expect("cgroup2 mount")
            .join(format!("topoproxy-{label}-{id}"));
        std::fs::create_dir(&cgroup).expect("create the test cgroup");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/topoproxy-{label}-{id}"));
        let mut fixture = cluster::Fixture::new(label);
        fixture.nodes = vec![(LIST_NODE.to_owned(), "zone-a".to_owned())];
        let agent = ebpf_agent(&fixture, &pin_dir, &cgroup);
        Self {
            pin_dir,
            cgroup,
            fixture,
            agent,
        }
    }

    /// `topoproxy list --proxy-mode ebpf --no-counters` on this world's pins.
    fn list(&self) -> std::process::Output {
        list_command(&self.pin_dir)
            .output()
            .expect("starting topoproxy list")
    }

    /// Writes the fixture, and waits until the agent reports the table of `services` ×
    /// `backends_each` programmed (its `/metrics` after the sync's apply), without failed syncs.
    fn apply_and_wait(&mut self, services: usize, backends_each: usize) {
        self.fixture.write();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                self.agent.running(),
                "the agent exited:\n{}",
                self.agent.log()
            );
            let servers = self.agent.metric("topoproxy_virtual_servers");
            let backends = self.agent.metric("topoproxy_backends");
            let failed = self
                .agent
                .metric("topoproxy_syncs_total{result=\"failure\"}");
            assert_eq!(
                failed.unwrap_or(0.0),
                0.0,
                "a sync failed:\n{}",
                self.agent.log()
            );
            if servers == Some(services as f64)
                && backends == Some((services * backends_each) as f64)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not program {services} services × {backends_each} backends: \
                 {servers:?} services, {backends:?} backends"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Service entries and backend slots as the maps hold them, read in this process.
    fn maps_dump(&self) -> MapsDump {
        let dir = self.pin_dir.join(MAPS_DIR);
        let open = |name: &str| {
            aya::maps::MapData::from_pin(dir.join(name))
                .unwrap_or_else(|e| panic!("opening the pinned map {name}: {e}"))
        };
        let services: aya::maps::HashMap<_, ServiceKey, AbiService> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(open(maps::SERVICES)))
                .expect("services map");
        let backends: aya::maps::HashMap<_, BackendKey, AbiBackend> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(open(maps::BACKENDS)))
                .expect("backends map");
        let log_config: aya::maps::Array<_, LogConfig> =
            aya::maps::Array::try_from(aya::maps::Map::Array(open(maps::LOG_CONFIG)))
                .expect("log config map");
        MapsDump {
            services: services
                .iter()
                .map(|item| item.expect("iterating the services map"))
                .collect(),
            backends: backends
                .iter()
                .map(|item| item.expect("iterating the backends map"))
                .collect(),
            log_config: format!("{:?}", log_config.get(&0, 0).expect("log config")),
        }
    }

    /// Every file and directory under the pin directory.
    fn pins(&self) -> BTreeSet<PathBuf> {
        host::paths_under(&self.pin_dir)
    }

    /// (link pin, link id, program id) of every link pinned here.
    fn links(&self) -> Vec<(PathBuf, u32, u32)> {
        let mut links: Vec<_> = self
            .pins()
            .into_iter()
            .filter(|path| {
                path.file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with("link_"))
            })
            .map(|path| {
                let link = aya::programs::links::PinnedLink::from_pin(&path)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                let info = aya::programs::links::FdLink::from(link)
                    .info()
                    .unwrap_or_else(|e| panic!("link info of {}: {e}", path.display()));
                (path, info.id(), info.program_id())
            })
            .collect();
        links.sort();
        links
    }
}

impl Drop for AgentWorld {
    fn drop(&mut self) {
        // The agent's own drop runs `topoproxy cleanup` too; this one also covers what a
        // test left after killing it.
        self.agent.stop_and_cleanup();
        let _ = cleanup(&EbpfSettings {
            pin_dir: self.pin_dir.clone(),
            cgroup_path: Some(self.cgroup.clone()),
        });
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The maps' contents that `list` must never change.
#[derive(Debug)]
struct MapsDump {
    services: Vec<(ServiceKey, AbiService)>,
    backends: Vec<(BackendKey, AbiBackend)>,
    log_config: String,
}

impl MapsDump {
    /// Order-independent: the kernel's iteration order is not part of the contents.
    fn sorted(mut self) -> Self {
        self.services.sort_by_key(|(key, _)| format!("{key:?}"));
        self.backends
            .sort_by_key(|(key, _)| (key.service_id, key.slot));
        self
    }

    /// The entries only one of `self` and `after` holds, as `-`/`+` lines.
    fn changes_to(&self, after: &Self) -> Vec<String> {
        let lines = |dump: &Self| -> BTreeSet<String> {
            dump.services
                .iter()
                .map(|entry| format!("{entry:?}"))
                .chain(dump.backends.iter().map(|entry| format!("{entry:?}")))
                .chain([dump.log_config.clone()])
                .collect()
        };
        let (before, after) = (lines(self), lines(after));
        before
            .difference(&after)
            .map(|line| format!("- {line}"))
            .chain(after.difference(&before).map(|line| format!("+ {line}")))
            .collect()
    }

    /// Counted slots that are empty, and filled slots no entry counts.
    fn holes_and_strays(&self) -> (Vec<BackendKey>, Vec<BackendKey>) {
        let filled: BTreeSet<(u32, u32)> = self
            .backends
            .iter()
            .map(|(key, _)| (key.service_id, key.slot))
            .collect();
        let mut counted = BTreeSet::new();
        for (_, service) in &self.services {
            for tier in 0..MAX_TIERS {
                for index in 0..u32::from(service.tier_counts[tier]) {
                    counted.insert((service.id, (tier as u32) << TIER_SHIFT | index));
                }
            }
        }
        let key = |&(service_id, slot): &(u32, u32)| BackendKey { service_id, slot };
        (
            counted.difference(&filled).map(key).collect(),
            filled.difference(&counted).map(key).collect(),
        )
    }
}

/// The agent in eBPF mode on `fixture` as node [`LIST_NODE`], its programs in `cgroup`, no
/// tc programs, no periodic re-read; `cleanup` of its pins when dropped.
fn ebpf_agent(fixture: &cluster::Fixture, pin_dir: &Path, cgroup: &Path) -> cluster::YamlAgent {
    let pin_arg = pin_dir.to_str().expect("UTF-8 pin dir");
    let cgroup_arg = cgroup.to_str().expect("UTF-8 cgroup");
    cluster::YamlAgent::new_in_mode(
        fixture,
        LIST_NODE,
        &[
            "--proxy-mode",
            "ebpf",
            "--bpf-pin-dir",
            pin_arg,
            "--cgroup-path",
            cgroup_arg,
            "--north-south-interfaces",
            "none",
            "--sync-period",
            "1h",
        ],
        &["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir", pin_arg],
    )
}

fn list_command(pin_dir: &Path) -> Command {
    let mut command = Command::new(cluster::agent_process::agent_bin());
    command
        .args([
            "list",
            "--proxy-mode",
            "ebpf",
            "--no-counters",
            "--bpf-pin-dir",
        ])
        .arg(pin_dir)
        .stdin(Stdio::null());
    command
}

/// The cgroup `sock_addr` attach types of [`PROGRAMS`] (enum bpf_attach_type).
const SOCK_ADDR_ATTACH_TYPES: [u32; 8] = [10, 11, 14, 15, 19, 20, 29, 30];

/// The ids of the programs attached directly to `cgroup` for each of our attach types
/// (`BPF_PROG_QUERY`, without `BPF_F_QUERY_EFFECTIVE`).
fn cgroup_program_ids(cgroup: &Path) -> Vec<(u32, Vec<u32>)> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = std::fs::File::open(cgroup)
        .unwrap_or_else(|e| panic!("opening the cgroup {}: {e}", cgroup.display()));
    SOCK_ADDR_ATTACH_TYPES
        .iter()
        .map(|&attach_type| {
            let mut ids = [0u32; 64];
            // struct { u32 target_fd; u32 attach_type; u32 query_flags; u32 attach_flags;
            //          u64 prog_ids; u32 prog_cnt; ... } query;
            let mut attr = [0u64; 8];
            attr[0] = u64::from(dir.as_raw_fd() as u32) | u64::from(attach_type) << 32;
            attr[2] = ids.as_mut_ptr() as u64;
            attr[3] = ids.len() as u64;
            // SAFETY: `attr` is a zero-padded bpf_attr prefix whose `prog_ids` points at `ids`,
            // which holds `prog_cnt` entries and outlives the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    attr.as_mut_ptr(),
                    std::mem::size_of_val(&attr),
                )
            };
            assert!(
                rc >= 0,
                "BPF_PROG_QUERY on {}: {}",
                cgroup.display(),
                std::io::Error::last_os_error()
            );
            let count = (attr[3] & 0xffff_ffff) as usize;
            let mut attached = ids[..count.min(ids.len())].to_vec();
            attached.sort_unstable();
            (attach_type, attached)
        })
        .collect()
}

/// `count` Services with one TCP port and `backends_each` ready endpoints on this node's zone;
/// `generation` shifts the endpoint addresses, so that a new generation replaces every backend.
fn many_services(count: usize, backends_each: usize, generation: u8) -> Vec<cluster::Service> {
    (0..count)
        .map(|i| cluster::Service {
            name: format!("svc-{i}"),
            cluster_ip: std::net::Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8),
            ports: vec![cluster::Port {
                name: "http".to_owned(),
                protocol: "TCP",
                port: 80,
                target_port: 8080,
            }],
            prefer_same_zone: false,
            topology: None,
            ipvs_scheduler: None,
            endpoints: (0..backends_each)
                .map(|b| cluster::Endpoint {
                    address: std::net::Ipv4Addr::new(
                        10,
                        200 + generation,
                        (i / 10) as u8,
                        (i % 10 * 25 + b + 1) as u8,
                    ),
                    node: LIST_NODE.to_owned(),
                    zone: "zone-a".to_owned(),
                    condition: cluster::Condition::Ready,
                    hint: None,
                })
                .collect(),
        })
        .collect()
}

/// `topoproxy list` runs back to back in another thread until stopped (or 4,000 runs, or
/// 5 minutes); each run's exit status and output are kept.
struct ListLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<std::process::Output>>>,
}

impl ListLoop {
    fn start(pin_dir: &Path) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pin_dir = pin_dir.to_owned();
        let stopped = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut runs = Vec::new();
            while !stopped.load(Ordering::Relaxed)
                && runs.len() < 4_000
                && Instant::now() < deadline
            {
                runs.push(
                    list_command(&pin_dir)
                        .output()
                        .expect("starting topoproxy list"),
                );
            }
            runs
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn stop(mut self) -> Vec<std::process::Output> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("the loop runs")
            .join()
            .expect("the list loop panicked")
    }
}

impl Drop for ListLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn list_in_a_tight_loop_during_large_applies_leaves_the_agents_table_exact() {
    let mut world = AgentWorld::new("list-race");
    world.fixture.services = many_services(4, 2, 0);
    world.agent.start_process();
    world.apply_and_wait(4, 2);

    let lists = ListLoop::start(&world.pin_dir);
    // Large applies: 1,500 new Services of 20 backends each (slots are written long before
    // their entries count them), then every backend replaced, then half the Services gone.
    let rounds = [(1_500, 20, 1), (1_500, 21, 2), (750, 21, 2)];
    for (round, &(services, backends_each, generation)) in rounds.iter().enumerate() {
        assert!(lists.running(), "the list loop ended before round {round}");
        world.fixture.services = many_services(services, backends_each, generation);
        world.apply_and_wait(services, backends_each);
        // Right after the agent's own sync, with no re-read since (sync period: 1 h): every
        // slot its entries count is there, and nothing else.
        let dump = world.maps_dump();
        let (holes, strays) = dump.holes_and_strays();
        assert!(
            holes.is_empty(),
            "round {round}: {} counted backend slots are empty, e.g. {:?}",
            holes.len(),
            &holes[..holes.len().min(5)]
        );
        assert!(
            strays.is_empty(),
            "round {round}: {} backend slots no entry counts, e.g. {:?}",
            strays.len(),
            &strays[..strays.len().min(5)]
        );
        assert_eq!(dump.services.len(), services, "round {round}");
        assert_eq!(
            dump.backends.len(),
            services * backends_each,
            "round {round}"
        );
    }
    let runs = lists.stop();
    let failed: Vec<String> = runs
        .iter()
        .filter(|run| !run.status.success())
        .map(|run| String::from_utf8_lossy(&run.stderr).into_owned())
        .collect();
    eprintln!("{} list runs during the applies", runs.len());
    assert!(runs.len() >= 20, "only {} list runs", runs.len());
    assert!(
        failed.is_empty(),
        "{} list runs failed: {:?}",
        failed.len(),
        &failed[..1]
    );

    // What `list` prints is the plan, as before.
    let listing = world.list();
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&listing.stdout),
        world.fixture.plan(LIST_NODE),
        "list and plan differ"
    );
    assert_eq!(
        world
            .agent
            .metric("topoproxy_drift_repairs_total")
            .unwrap_or(-1.0),
        0.0,
        "the agent repaired drift"
    );
}

#[test]
fn list_writes_no_map_and_changes_no_link_program_or_pin() {
    let mut world = AgentWorld::new("list-ro");
    world.fixture.services = many_services(6, 3, 0);
    world.agent.start_process();
    world.apply_and_wait(6, 3);
    // The agent stopped: whatever changes from here on is `list`'s doing.
    world.agent.kill9();

    // What `list` meets on a live node and must leave alone: a backend slot written but not
    // counted yet (an agent mid-apply, or stopped mid-change), and running programs of another
    // version than the `list` binary's (an agent upgraded, or a `list` from another image).
    let dir = world.pin_dir.join(MAPS_DIR);
    let mut backends: aya::maps::HashMap<_, BackendKey, AbiBackend> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(dir.join(maps::BACKENDS)).expect("backends pin"),
        ))
        .expect("backends map");
    let dump = world.maps_dump();
    let (_, service) = dump.services[0];
    let (some_slot, some_backend) = dump.backends[0];
    let uncounted = BackendKey {
        service_id: service.id,
        slot: u32::from(service.tier_counts[0]),
    };
    backends
        .insert(uncounted, some_backend, 0)
        .expect("writing an uncounted slot");
    assert_ne!(some_slot, uncounted);
    for name in PROGRAMS {
        std::fs::rename(
            program_pin(&world.pin_dir, name),
            world.pin_dir.join(format!("prog_{name}_v0000000000000000")),
        )
        .expect("renaming a program pin");
    }

    let maps_before = world.maps_dump().sorted();
    let pins_before = world.pins();
    let links_before = world.links();
    let attached_before = cgroup_program_ids(&world.cgroup);
    assert_eq!(links_before.len(), PROGRAMS.len(), "{links_before:?}");
    let planned = world.fixture.plan(LIST_NODE);
    for run in 0..20 {
        let listing = world.list();
        assert!(
            listing.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&listing.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            planned,
            "run {run}"
        );
    }
    // Without --proxy-mode, `list` reads the mode whose maps are pinned: what an operator
    // types in the agent's pod (`kubectl exec ds/topoproxy -- topoproxy list`).
    let unflagged = process::stdout_of(
        Command::new(cluster::agent_process::agent_bin())
            .args(["list", "--no-counters", "--bpf-pin-dir"])
            .arg(&world.pin_dir)
            .stdin(Stdio::null()),
        "topoproxy list",
    );
    assert_eq!(unflagged, planned);
    let changed = maps_before.changes_to(&world.maps_dump().sorted());
    assert!(changed.is_empty(), "list wrote to the maps: {changed:#?}");
    assert_eq!(world.links(), links_before, "list changed a link");
    assert_eq!(
        cgroup_program_ids(&world.cgroup),
        attached_before,
        "list changed the cgroup's programs"
    );
    assert_eq!(world.pins(), pins_before, "list changed the pins");
}

#[test]
fn list_with_an_empty_pin_dir_fails_naming_it_and_creates_nothing() {
    require_root("bpffs");
    let id = unique();
    let empty = PathBuf::from(format!("/sys/fs/bpf/topoproxy-list-empty-{id}"));
    let absent = PathBuf::from(format!("/sys/fs/bpf/topoproxy-list-absent-{id}"));
    std::fs::create_dir(&empty).expect("creating an empty pin dir");
    struct RemoveOnDrop([PathBuf; 2]);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = cleanup(&EbpfSettings {
                    pin_dir: dir.clone(),
                    cgroup_path: None,
                });
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let _remove = RemoveOnDrop([empty.clone(), absent.clone()]);
    let root = cgroup2_mount().expect("cgroup2 mount");
    let attached_before = cgroup_program_ids(&root);

    for dir in [&empty, &absent] {
        let output = list_command(dir).output().expect("starting topoproxy list");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "no maps of this version are pinned in {}",
                dir.display()
            )),
            "{stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    assert!(
        host::paths_under(&empty).is_empty(),
        "{:?}",
        host::paths_under(&empty)
    );
    assert!(!absent.exists(), "list created {}", absent.display());
    assert_eq!(
        cgroup_program_ids(&root),
        attached_before,
        "programs attached to the root cgroup changed"
    );
}

#[test]
fn resync_counters_read_the_maps_without_writing() {
    let world = World::new();
    let mut dataplane = world.open();
    let desired = all_services(&[(T0A, 0), (T0B, 0), (T1A, 0)], None);
    sync(&mut dataplane, &desired);
    // A counted slot emptied behind the agent's back (an agent stopped mid-change leaves
    // entries like this): repairing it is the agent's read's job, not its counters'.
    let dir = world.settings.pin_dir.join(MAPS_DIR);
    let mut backends: aya::maps::HashMap<_, BackendKey, AbiBackend> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(dir.join(maps::BACKENDS)).expect("backends pin"),
        ))
        .expect("backends map");
    let services: aya::maps::HashMap<_, ServiceKey, AbiService> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
            aya::maps::MapData::from_pin(dir.join(maps::SERVICES)).expect("services pin"),
        ))
        .expect("services map");
    let (_, service) = services
        .iter()
        .next()
        .expect("a service entry")
        .expect("reading it");
    let last = BackendKey {
        service_id: service.id,
        slot: u32::from(service.tier_counts[0]) - 1,
    };
    backends.remove(&last).expect("emptying a counted slot");
    let entries_before: BTreeSet<String> = services
        .iter()
        .map(|item| format!("{:?}", item.expect("services")))
        .collect();
    let writes_before = dataplane.map_writes();

    let telemetry = topoproxy::dataplane::Dataplane::telemetry(
        &mut dataplane,
        topoproxy::dataplane::TelemetryRead::RequestsAndTraffic,
    );
    assert_eq!(telemetry.traffic.len(), desired.len());
    let _ = dataplane.list().expect("list");

    assert_eq!(
        dataplane.map_writes(),
        writes_before,
        "reading counters wrote"
    );
    let entries_after: BTreeSet<String> = services
        .iter()
        .map(|item| format!("{:?}", item.expect("services")))
        .collect();
    assert_eq!(
        entries_after, entries_before,
        "a service entry was rewritten"
    );
}

// ---- consistent hashing (sh/mh) ----

/// Client namespaces of their own (each a client of its own to the socket programs, which
/// hash the namespace's cookie), each linked to the pods namespace by a veth pair; deleted on
/// drop.
struct ClientNamespaces {
    names: Vec<String>,
}

impl ClientNamespaces {
    fn new(world: &World, count: usize) -> Self {
        let mut namespaces = Self { names: Vec::new() };
        let pods = &world.pods_ns;
        for i in 0..count {
            let name = format!("tpe-k{i}-{}", world.id);
            shell(&format!("ip netns add {name}"));
            namespaces.names.push(name.clone());
            shell(&format!(
                "ip -n {name} link set lo up && \
                 ip -n {name} link add tpk{i}c{id} type veth peer name tpk{i}p{id} netns {pods} && \
                 ip -n {name} addr add 10.215.{i}.1/24 dev tpk{i}c{id} && \
                 ip -n {pods} addr add 10.215.{i}.2/24 dev tpk{i}p{id} && \
                 ip -n {name} link set tpk{i}c{id} up && ip -n {pods} link set tpk{i}p{id} up && \
                 ip -n {name} route add 10.213.0.0/24 via 10.215.{i}.2",
                id = world.id
            ));
        }
        namespaces
    }

    fn clients(&self, world: &World) -> Vec<Client> {
        self.names
            .iter()
            .map(|name| Client::spawn(&world.cgroup, &netns::netns_path(name)))
            .collect()
    }
}

impl Drop for ClientNamespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// TCP and UDP services on [`VIP4`] with scheduler `mh` and `backends` in tier 0.
fn hashed_services(backends: &[Backend]) -> ProgrammedTable {
    let mut table = ProgrammedTable::new();
    let tiered: Vec<(Backend, u8)> = backends.iter().map(|b| (*b, 0)).collect();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        service(&mut table, protocol, VIP4, &tiered, None);
    }
    for service in table.values_mut() {
        service.config.scheduler =
            topoproxy::scheduler::Scheduler::parse("mh").expect("a scheduler");
    }
    table
}

/// The backend Maglev gives the client with network namespace `cookie`: the agent's table
/// of `backends` (it depends on the set, not the slot order) at the programs' hash.
fn maglev_choice(backends: &[Backend], cookie: u64) -> String {
    let endpoints: Vec<(IpAddr, u16)> = backends
        .iter()
        .map(|b| (b.v4.parse().expect("address"), PORT))
        .collect();
    let table = topoproxy::dataplane::ebpf::maglev::table(&endpoints).expect("a table");
    let hash = topoproxy_common::client_hash(&[cookie as u32, (cookie >> 32) as u32, 0, 0], 0);
    let index = table[hash as usize % topoproxy_common::MAGLEV_SIZE];
    backends[usize::from(index)].name.to_owned()
}

/// Each client's backend over `rounds` TCP connects and as many UDP datagrams; every one
/// must be the same.
fn backends_held(clients: &mut [Client], rounds: usize) -> Vec<String> {
    clients
        .iter_mut()
        .enumerate()
        .map(|(i, client)| {
            let first = client.tcp(VIP4).0;
            for _ in 1..rounds {
                assert_eq!(
                    client.tcp(VIP4).0,
                    first,
                    "client {i} changed backend (TCP)"
                );
            }
            for _ in 0..rounds {
                assert_eq!(
                    client.udp(VIP4).0,
                    first,
                    "client {i} changed backend (UDP)"
                );
            }
            first
        })
        .collect()
}

/// Issue 29: `sh`/`mh` in eBPF mode. Clients in namespaces of their own keep their backend
/// over repeated connects and datagrams (random choice moves them), get exactly the backend
/// the Maglev table gives their hash, and when one backend is removed, its clients move and
/// the others keep theirs (save where Maglev's own table moves one: computed, and counted).
#[test]
fn mh_services_keep_each_client_on_its_backend_when_another_is_removed() {
    let world = World::new();
    let namespaces = ClientNamespaces::new(&world, 6);
    let mut dataplane = world.open();
    let backends = [T0A, T0B, T1A, T1B];
    sync(&mut dataplane, &hashed_services(&backends));
    let mut clients = namespaces.clients(&world);
    let cookies: Vec<u64> = clients.iter_mut().map(Client::netns_cookie).collect();

    let before = backends_held(&mut clients, 10);
    for (i, (held, cookie)) in before.iter().zip(&cookies).enumerate() {
        assert_eq!(held, &maglev_choice(&backends, *cookie), "client {i}");
    }

    let removed = before[0].clone();
    let remaining: Vec<Backend> = backends
        .iter()
        .copied()
        .filter(|b| b.name != removed)
        .collect();
    sync(&mut dataplane, &hashed_services(&remaining));
    let after = backends_held(&mut clients, 10);
    let mut moved_by_maglev = 0;
    for (i, ((old, new), cookie)) in before.iter().zip(&after).zip(&cookies).enumerate() {
        assert_ne!(
            new, &removed,
            "client {i} still reaches the removed backend"
        );
        assert_eq!(new, &maglev_choice(&remaining, *cookie), "client {i}");
        if old != &removed && old != new {
            moved_by_maglev += 1;
        }
    }
    let kept = before
        .iter()
        .zip(&after)
        .filter(|(old, new)| *old != &removed && old == new)
        .count();
    let others = before.iter().filter(|old| *old != &removed).count();
    eprintln!(
        "mh removal: {kept} of {others} clients of other backends kept theirs \
         ({moved_by_maglev} moved by the table)"
    );
}
