//! A churn soak against a real control plane: rolling updates, scale up and down, and zone
//! moves at a steady pace while client loops send TCP and UDP requests through the VIPs. The
//! dataplane (eBPF on the host, IPVS in the VM) is behind [`Fabric`]; this module owns the
//! objects, the backends, the client loop and the counting.
//!
//! What is counted, and why it is sound:
//! - Every request carries the `CLOCK_MONOTONIC` instant its client began it (before
//!   `connect()`); the clock is the machine's, so the backends' records compare with the
//!   driver's instants across processes.
//! - The driver keeps at least two Ready pods at every moment, so every failed request failed
//!   while a Ready backend existed.
//! - A terminating pod is *drained* at the instant the driver first sees it gone from every
//!   frontend in the kernel ([`Fabric::programmed`]). Its server keeps answering until the
//!   client loop has made [`AFTER_DRAIN`] more requests; a request it served that began after
//!   the drain went to a backend the kernel no longer held, which must never happen.
//!
//! Include with `#[path = "support/k8s/churn.rs"] mod churn;` beside `support/harness.rs`,
//! `support/netns.rs` and `support/process.rs`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_harness::objects::{
    apply, create_pod, delete_pod, set_pod_status, slices_of, PodSpec, ZONE_LABEL,
};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

pub const NAMESPACE: &str = "churn";
pub const APP: &str = "churn";
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;
/// Requests the client loop makes after a drain before the drained server stops.
pub const AFTER_DRAIN: u64 = 40;
/// How long a client waits for an answer; a request that takes longer failed.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the kernel may take to reflect a change of the API.
pub const CONVERGE: Duration = Duration::from_secs(90);
/// The environment variable that makes the test binary the client loop (its value: the
/// loop's settings file).
pub const CLIENT_ENV: &str = "TOPOPROXY_CHURN_CLIENT";
/// The test binary's arguments that run only its `churn_client_process` helper test.
pub const CLIENT_ARGS: [&str; 5] = [
    "churn_client_process",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];
/// Rounds of churn; `TOPOPROXY_CHURN_ROUNDS` sets more (a longer soak).
pub const DEFAULT_ROUNDS: usize = 10;
/// Rounds of the extended run (`cargo xtask test --extended`) without
/// `TOPOPROXY_CHURN_ROUNDS`: the host soak docs/reliability.md reports ran 40.
pub const EXTENDED_ROUNDS: usize = 40;

/// `CLOCK_MONOTONIC` in nanoseconds: the one clock every process of the test shares.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

pub fn rounds() -> usize {
    std::env::var("TOPOPROXY_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if crate::harness::extended() {
            EXTENDED_ROUNDS
        } else {
            DEFAULT_ROUNDS
        })
}

/// Where pods live, where the client loop runs, and what the kernel holds.
pub trait Fabric: Send + Sync {
    /// Makes a pod address on `node` for the soak's `n`th pod; returns it and the network
    /// namespace (a path) its servers bind in.
    fn add_pod(&mut self, node: &str, n: u32) -> (Ipv4Addr, PathBuf);
    /// Removes what [`Fabric::add_pod`] made.
    fn remove_pod(&mut self, ip: Ipv4Addr);
    /// The backends of every frontend that the kernel sends new connections to, keyed by
    /// (protocol, frontend).
    fn programmed(&self) -> Programmed;
    /// The client loop's process (the test binary with [`CLIENT_ENV`] set), placed where its
    /// sockets go through the dataplane.
    fn client_command(&self, settings: &Path) -> Command;
}

/// Backends by (protocol, frontend).
pub type Programmed = BTreeMap<(String, SocketAddr), BTreeSet<Ipv4Addr>>;

/// The backends in an `ipvsadm -Ln` text (`topoproxy list` prints the same); with
/// `skip_weight_zero`, destinations of weight 0 (IPVS's draining ones) do not count.
pub fn programmed_in(listing: &str, skip_weight_zero: bool) -> Programmed {
    let mut programmed = Programmed::new();
    let mut current: Option<(String, SocketAddr)> = None;
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [protocol @ ("TCP" | "UDP" | "SCTP"), frontend, ..] => {
                current = frontend
                    .parse()
                    .ok()
                    .map(|frontend| ((*protocol).to_owned(), frontend));
                if let Some(key) = &current {
                    programmed.entry(key.clone()).or_default();
                }
            }
            ["->", address, _forward, weight, ..] => {
                let Some(key) = &current else { continue };
                let Ok(SocketAddr::V4(address)) = address.parse::<SocketAddr>() else {
                    continue;
                };
                if skip_weight_zero && *weight == "0" {
                    continue;
                }
                programmed
                    .entry(key.clone())
                    .or_default()
                    .insert(*address.ip());
            }
            _ => {}
        }
    }
    programmed
}

/// One pod's TCP and UDP servers, recording the start instant of every request they answer.
pub struct RecordingBackend {
    pub ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<Vec<u64>>>,
    threads: Vec<JoinHandle<()>>,
}

fn bind_in(netns: &Path, ip: Ipv4Addr) -> (TcpListener, UdpSocket) {
    crate::netns::within(netns, move || {
        let tcp = TcpListener::bind((ip, TCP_PORT)).expect("binding the backend's TCP port");
        let udp = UdpSocket::bind((ip, UDP_PORT)).expect("binding the backend's UDP port");
        (tcp, udp)
    })
}

impl RecordingBackend {
    pub fn start(netns: &Path, ip: Ipv4Addr) -> Self {
        let (tcp, udp) = bind_in(netns, ip);
        tcp.set_nonblocking(true).expect("non-blocking listener");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("UDP read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let reply = ip.to_string();
        let tcp_thread = {
            let (stop, served, reply) = (stop.clone(), served.clone(), reply.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((stream, _)) => answer_tcp(stream, &reply, &served),
                        // Non-blocking accept: nothing waiting, look again shortly.
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        let udp_thread = {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        if let Some(began) = parse_stamp(&buf[..n]) {
                            record(&served, began);
                        }
                        let _ = udp.send_to(reply.as_bytes(), peer);
                    }
                }
            })
        };
        Self {
            ip,
            stop,
            served,
            threads: vec![tcp_thread, udp_thread],
        }
    }

    /// Closes the sockets; returns the start instants of every request answered.
    pub fn stop(mut self) -> Vec<u64> {
        self.halt();
        std::mem::take(&mut *self.served.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.halt();
    }
}

fn record(served: &Mutex<Vec<u64>>, began: u64) {
    served.lock().unwrap_or_else(|e| e.into_inner()).push(began);
}

fn parse_stamp(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

fn answer_tcp(stream: TcpStream, reply: &str, served: &Mutex<Vec<u64>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let mut line = String::new();
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return;
    }
    if let Some(began) = parse_stamp(line.as_bytes()) {
        record(served, began);
    }
    let _ = writeln!(writer, "{reply}");
}

/// One request of the client loop.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub target: usize,
    pub began: u64,
    pub outcome: Result<Ipv4Addr, String>,
}

/// What the client loop is asked to do: cycle through `targets` until `stop` exists, one
/// line per request appended to `log`.
pub struct ClientSettings {
    pub targets: Vec<(String, SocketAddr)>,
    pub stop: PathBuf,
    pub log: PathBuf,
}

impl ClientSettings {
    fn write(&self, path: &Path) {
        let mut text = format!("{}\n{}\n", self.stop.display(), self.log.display());
        for (protocol, address) in &self.targets {
            text.push_str(&format!("{protocol} {address}\n"));
        }
        std::fs::write(path, text).expect("writing the client settings");
    }

    fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).expect("reading the client settings");
        let mut lines = text.lines();
        let stop = PathBuf::from(lines.next().expect("stop path"));
        let log = PathBuf::from(lines.next().expect("log path"));
        let targets = lines
            .filter_map(|l| l.split_once(' '))
            .map(|(p, a)| (p.to_owned(), a.parse().expect("a target address")))
            .collect();
        Self { targets, stop, log }
    }
}

/// The client loop's body (the child process). Runs until the stop file appears.
pub fn client_loop(settings_path: &Path) {
    let settings = ClientSettings::read(settings_path);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&settings.log)
        .expect("opening the client log");
    let mut ports = SourcePorts::default();
    while !settings.stop.exists() {
        for (index, (protocol, address)) in settings.targets.iter().enumerate() {
            let began = monotonic_ns();
            let outcome = match protocol.as_str() {
                "TCP" => ask_tcp(*address, began, &mut ports),
                _ => ask_udp(*address, began, &mut ports),
            };
            let line = match outcome {
                Ok(reply) => format!("{index} {began} ok {}\n", reply.trim()),
                Err(error) => format!("{index} {began} fail {error}\n"),
            };
            log.write_all(line.as_bytes())
                .expect("writing the client log");
        }
    }
}

/// The client loop's source ports: taken in turn from a range outside the ephemeral one, so a
/// port comes back only after the whole range (10,000 requests of a protocol, many minutes of
/// the loop). IPVS keeps a connection entry per client address and port (UDP 300 s, TCP
/// TIME_WAIT 120 s) and sends a packet that matches one to that entry's real server, weight 0
/// or not: a reused ephemeral port would be counted against the agent for what IPVS does.
pub struct SourcePorts {
    next: u16,
}

const SOURCE_PORTS: std::ops::Range<u16> = 10000..20000;

impl Default for SourcePorts {
    fn default() -> Self {
        Self {
            next: SOURCE_PORTS.start,
        }
    }
}

impl SourcePorts {
    /// A socket of `kind` bound to the next free port of the range.
    fn bind(
        &mut self,
        kind: socket2::Type,
        protocol: socket2::Protocol,
    ) -> std::io::Result<socket2::Socket> {
        let mut last_error = None;
        for _ in 0..64 {
            let port = self.next;
            self.next = if port + 1 >= SOURCE_PORTS.end {
                SOURCE_PORTS.start
            } else {
                port + 1
            };
            let socket = socket2::Socket::new(socket2::Domain::IPV4, kind, Some(protocol))?;
            let local = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            match socket.bind(&local.into()) {
                Ok(()) => return Ok(socket),
                // Still held by an earlier request's socket: take the next one.
                Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no free source port")))
    }
}

fn ask_tcp(address: SocketAddr, began: u64, ports: &mut SourcePorts) -> std::io::Result<String> {
    let socket = ports.bind(socket2::Type::STREAM, socket2::Protocol::TCP)?;
    socket.connect_timeout(&address.into(), ANSWER_TIMEOUT)?;
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    writeln!(stream, "{began}")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.trim().is_empty() {
        return Err(std::io::Error::other("closed without an answer"));
    }
    Ok(reply)
}

fn ask_udp(address: SocketAddr, began: u64, ports: &mut SourcePorts) -> std::io::Result<String> {
    let socket = UdpSocket::from(ports.bind(socket2::Type::DGRAM, socket2::Protocol::UDP)?);
    socket.connect(address)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    socket.send(began.to_string().as_bytes())?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The running client loop; stopped (and reaped) on drop.
pub struct ClientLoop {
    child: Child,
    stop: PathBuf,
    log: PathBuf,
}

impl ClientLoop {
    pub fn start(fabric: &dyn Fabric, dir: &Path, targets: Vec<(String, SocketAddr)>) -> Self {
        let settings = ClientSettings {
            targets,
            stop: dir.join("client.stop"),
            log: dir.join("client.log"),
        };
        let _ = std::fs::remove_file(&settings.stop);
        let _ = std::fs::remove_file(&settings.log);
        let path = dir.join("client.settings");
        settings.write(&path);
        let child = fabric
            .client_command(&path)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the client loop");
        Self {
            child,
            stop: settings.stop,
            log: settings.log,
        }
    }

    /// Every request so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter_map(parse_attempt).collect()
    }

    fn count(&self) -> u64 {
        let text = std::fs::read(&self.log).unwrap_or_default();
        text.iter().filter(|b| **b == b'\n').count() as u64
    }

    /// Waits until the loop has made `more` requests beyond those made so far.
    pub async fn wait_for(&mut self, more: u64, what: &str) {
        let goal = self.count() + more;
        let deadline = Instant::now() + CONVERGE;
        while self.count() < goal {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the client loop exited ({status}) while waiting for {what}");
            }
            assert!(
                Instant::now() < deadline,
                "the client loop made fewer than {more} requests in {CONVERGE:?} ({what})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn stop(mut self) -> Vec<Attempt> {
        self.halt();
        self.attempts()
    }

    fn halt(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        crate::process::wait_or_kill(&mut self.child, ANSWER_TIMEOUT * 8);
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

fn parse_attempt(line: &str) -> Option<Attempt> {
    let mut fields = line.splitn(4, ' ');
    let target = fields.next()?.parse().ok()?;
    let began = fields.next()?.parse().ok()?;
    let outcome = match (fields.next()?, fields.next().unwrap_or_default()) {
        ("ok", reply) => Ok(reply.parse().ok()?),
        (_, error) => Err(error.to_owned()),
    };
    Some(Attempt {
        target,
        began,
        outcome,
    })
}

/// The agent's use of the machine after a round.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub round: usize,
    /// Since the soak's start.
    pub at: Duration,
    /// User plus system CPU time so far.
    pub cpu: Duration,
    pub rss_kib: u64,
}

/// CPU time (user + system) and resident set (KiB) of a process.
pub fn cpu_and_rss(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name come the state (field 3 of proc(5)), ..., utime (14), stime (15).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let cpu = Duration::from_millis(ticks * 1000 / per_second.max(1));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((cpu, rss))
}

/// A pod of the soak: its object and its servers.
struct LivePod {
    spec: PodSpec,
    ip: Ipv4Addr,
    backend: RecordingBackend,
}

/// What a soak counted.
#[derive(Debug, Default)]
pub struct Report {
    pub rounds: usize,
    pub attempts: u64,
    pub failed: u64,
    pub failures: Vec<String>,
    pub drained: u64,
    pub served_after_drain: u64,
    pub pods_created: u64,
    /// Times the kernel was seen holding what the API said, at a quiet point of a round.
    pub checks: u64,
    /// Those where the `near` Service held fewer pods than `plain` (its hints in effect).
    pub narrower_checks: u64,
    /// Worst time from a pod turning terminating to its drain in the kernel.
    pub slowest_drain: Duration,
    /// The agent after every round.
    pub samples: Vec<Sample>,
}

impl Report {
    pub fn summary(&self, dataplane: &str) -> String {
        let rss: Vec<u64> = self.samples.iter().map(|s| s.rss_kib).collect();
        let (first, last) = (rss.first().copied(), rss.last().copied());
        let cpu_share = match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) if b.at > a.at => {
                100.0 * (b.cpu - a.cpu).as_secs_f64() / (b.at - a.at).as_secs_f64()
            }
            _ => 0.0,
        };
        format!(
            "churn soak ({dataplane}): {} rounds, {} pods created, {} requests, {} failed, \
             {} drains (slowest {:.2?}), {} served by a backend after its drain; {} checks of \
             the whole kernel table, {} with the zone hints in effect; agent RSS KiB after \
             round 1 {first:?}, at the end {last:?}, peak {:?}; agent CPU {cpu_share:.1} % of \
             one core over the rounds after the first; RSS KiB per round {rss:?}",
            self.rounds,
            self.pods_created,
            self.attempts,
            self.failed,
            self.drained,
            self.slowest_drain,
            self.served_after_drain,
            self.checks,
            self.narrower_checks,
            rss.iter().max(),
        )
    }

    /// Prints the summary and fails the test unless the soak was sound: requests made, none
    /// failed, none served after a drain, the hints in effect at times, RSS not climbing.
    pub fn assert_sound(&self, dataplane: &str) {
        eprintln!("{}", self.summary(dataplane));
        assert!(self.attempts > 0, "the client loop made no request");
        assert_eq!(self.failed, 0, "failed requests: {:#?}", self.failures);
        assert_eq!(self.served_after_drain, 0, "requests served after a drain");
        assert!(
            self.narrower_checks > 0,
            "the zone hints never narrowed the near Service"
        );
        assert!(!self.rss_grew(), "the agent's RSS grew: {:?}", self.samples);
    }

    /// RSS may move with the allocator but must not climb round after round: the end stays
    /// within a quarter (and 4 MiB) of the peak of the first half.
    pub fn rss_grew(&self) -> bool {
        let half = (self.samples.len() / 2).max(1);
        let early = self
            .samples
            .iter()
            .take(half)
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(0);
        let last = self.samples.last().map_or(0, |s| s.rss_kib);
        last > early + early / 4 + 4096
    }
}

/// The soak's driver: the API objects, the pods, the client loop and the counting.
pub struct Soak<'a> {
    client: Client,
    fabric: &'a mut dyn Fabric,
    /// (node, zone) of the nodes pods are placed on, in turn.
    nodes: Vec<(String, String)>,
    /// The frontends the client loop asks, as (protocol, address).
    pub frontends: Vec<(String, SocketAddr)>,
    /// The last node's zone at the start.
    home_zone: String,
    pods: Vec<LivePod>,
    next: u32,
    report: Report,
    started: Instant,
}

impl<'a> Soak<'a> {
    /// Creates the two Services (one as kube-proxy routes, one `trafficDistribution:
    /// PreferClose`) with a TCP and a UDP port each, and `replicas` Ready pods, and waits up
    /// to `first_sync` for the kernel to hold them.
    pub async fn start(
        client: Client,
        fabric: &'a mut dyn Fabric,
        nodes: Vec<(String, String)>,
        replicas: usize,
        first_sync: Duration,
    ) -> Soak<'a> {
        let mut frontends = Vec::new();
        for (name, extra) in [
            ("plain", json!({})),
            ("near", json!({"trafficDistribution": "PreferClose"})),
        ] {
            let vip = service(&client, name, extra).await;
            frontends.push(("TCP".to_owned(), SocketAddr::new(vip, 80)));
            frontends.push(("UDP".to_owned(), SocketAddr::new(vip, 53)));
        }
        let home_zone = nodes.last().map(|n| n.1.clone()).unwrap_or_default();
        let mut soak = Soak {
            client,
            fabric,
            nodes,
            home_zone,
            frontends,
            pods: Vec::new(),
            next: 0,
            report: Report::default(),
            started: Instant::now(),
        };
        for _ in 0..replicas {
            soak.add_ready_pod().await;
        }
        soak.wait_programmed_within("the first pods", first_sync)
            .await;
        soak
    }

    /// Starts the client loop over every frontend; its files go to `dir`.
    pub fn start_clients(&self, dir: &Path) -> ClientLoop {
        ClientLoop::start(&*self.fabric, dir, self.frontends.clone())
    }

    fn ready_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.pods.iter().map(|p| p.ip).collect()
    }

    /// A new pod on the next node in turn, serving before it turns Ready.
    async fn add_ready_pod(&mut self) {
        let n = self.next;
        self.next += 1;
        let (node, _) = self.nodes[n as usize % self.nodes.len()].clone();
        let (ip, netns) = self.fabric.add_pod(&node, n);
        let backend = RecordingBackend::start(&netns, ip);
        let spec = PodSpec::new(
            NAMESPACE,
            &format!("{APP}-{n}"),
            &node,
            APP,
            &ip.to_string(),
        );
        create_pod(&self.client, &spec, false).await;
        set_pod_status(&self.client, &spec, true).await;
        self.report.pods_created += 1;
        self.pods.push(LivePod { spec, ip, backend });
    }

    /// What each frontend should hold now: the `plain` Service every Ready pod; the `near`
    /// one (`PreferClose`) what kube-proxy's rule picks from its slices as the API holds them
    /// (a moved Node's endpoints keep their old zone until the controller rewrites the slice).
    async fn expected(&self) -> Programmed {
        let all = self.ready_ips();
        let near = self.hinted_for_agent_zone(&all).await;
        self.frontends
            .iter()
            .enumerate()
            .map(|(i, key)| (key.clone(), if i < 2 { all.clone() } else { near.clone() }))
            .collect()
    }

    /// kube-proxy's zone rule for the agent's zone (the first node's) over the `near`
    /// Service's slices: the Ready endpoints hinted for that zone when every Ready endpoint
    /// carries hints and some are for it, else every Ready pod.
    async fn hinted_for_agent_zone(&self, ready: &BTreeSet<Ipv4Addr>) -> BTreeSet<Ipv4Addr> {
        let zone = &self.nodes[0].1;
        let slices = slices_of(&self.client, NAMESPACE, "near").await;
        let mut hinted = BTreeSet::new();
        for endpoint in slices.iter().flat_map(|s| s.endpoints.iter()) {
            let is_ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let ips: Vec<Ipv4Addr> = endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .filter(|ip| ready.contains(ip))
                .collect();
            if !is_ready || ips.is_empty() {
                continue;
            }
            let zones = k8s_harness::objects::hinted_zones(endpoint);
            if zones.is_empty() {
                return ready.clone();
            }
            if zones.contains(&zone.as_str()) {
                hinted.extend(ips);
            }
        }
        if hinted.is_empty() {
            ready.clone()
        } else {
            hinted
        }
    }

    /// Waits until every frontend in the kernel holds what [`Self::expected`] says.
    pub async fn wait_programmed(&mut self, what: &str) {
        self.wait_programmed_within(what, CONVERGE).await;
    }

    async fn wait_programmed_within(&mut self, what: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let want = self.expected().await;
            let narrower = want.values().any(|w| *w != self.ready_ips());
            let programmed = self.fabric.programmed();
            let wrong: Vec<String> = want
                .iter()
                .filter_map(|(key, want)| {
                    let got = programmed.get(key).cloned().unwrap_or_default();
                    (got != *want)
                        .then(|| format!("{} {} holds {got:?}, not {want:?}", key.0, key.1))
                })
                .collect();
            if wrong.is_empty() {
                self.report.checks += 1;
                self.report.narrower_checks += u64::from(narrower);
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {wrong:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the oldest pod with a grace period (it turns terminating and keeps serving),
    /// waits for its drain from every frontend, lets the client loop go on for
    /// [`AFTER_DRAIN`] requests, then stops its servers and removes it for good.
    async fn retire_oldest(&mut self, clients: &mut ClientLoop) {
        assert!(self.pods.len() > 2, "the soak keeps two Ready pods");
        let pod = self.pods.remove(0);
        let terminating_at = Instant::now();
        delete_pod(&self.client, NAMESPACE, &pod.spec.name, 3600).await;
        let deadline = terminating_at + CONVERGE;
        loop {
            let programmed = self.fabric.programmed();
            let held: Vec<String> = programmed
                .iter()
                .filter(|(_, backends)| backends.contains(&pod.ip))
                .map(|((p, f), _)| format!("{p} {f}"))
                .collect();
            if held.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "terminating pod {} still programmed after {CONVERGE:?} in {held:?}",
                pod.ip
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained = monotonic_ns();
        self.report.slowest_drain = self.report.slowest_drain.max(terminating_at.elapsed());
        self.report.drained += 1;
        clients
            .wait_for(AFTER_DRAIN, "requests after a drain")
            .await;
        let served = pod.backend.stop();
        self.report.served_after_drain += served.iter().filter(|&&t| t > drained).count() as u64;
        delete_pod(&self.client, NAMESPACE, &pod.spec.name, 0).await;
        self.fabric.remove_pod(pod.ip);
    }

    /// Moves node `index` to `zone` (its topology label), as a re-labelled node would.
    async fn move_node(&mut self, index: usize, zone: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = self.nodes[index].0.clone();
        let patch = json!({"metadata": {"labels": {ZONE_LABEL: zone}}});
        nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("relabelling node {name}: {e}"));
        self.nodes[index].1 = zone.to_owned();
    }

    /// One round: a rolling update of every pod (one new Ready, then one old retired), a
    /// scale up by two and back down, and a zone move of the last node (undone next round).
    pub async fn round(&mut self, clients: &mut ClientLoop, agent_pid: u32) {
        let round = self.report.rounds + 1;
        for _ in 0..self.pods.len() {
            self.add_ready_pod().await;
            self.retire_oldest(clients).await;
        }
        self.wait_programmed(&format!("round {round}: the rolled pods"))
            .await;
        for _ in 0..2 {
            self.add_ready_pod().await;
        }
        self.wait_programmed(&format!("round {round}: scaled up"))
            .await;
        for _ in 0..2 {
            self.retire_oldest(clients).await;
        }
        // The last node joins the first one's zone on odd rounds and goes back on even ones.
        let last = self.nodes.len() - 1;
        let zone = if round % 2 == 1 {
            self.nodes[0].1.clone()
        } else {
            self.home_zone.clone()
        };
        self.move_node(last, &zone).await;
        clients
            .wait_for(AFTER_DRAIN, "requests after a zone move")
            .await;
        self.wait_programmed(&format!("round {round}: after the zone move"))
            .await;
        self.report.rounds = round;
        let (cpu, rss_kib) = cpu_and_rss(agent_pid).expect("the agent's /proc entries");
        self.report.samples.push(Sample {
            round,
            at: self.started.elapsed(),
            cpu,
            rss_kib,
        });
    }

    /// Stops the client loop and every server; counts what happened.
    pub fn finish(mut self, clients: ClientLoop) -> Report {
        let attempts = clients.stop();
        self.report.attempts = attempts.len() as u64;
        for attempt in &attempts {
            if let Err(error) = &attempt.outcome {
                self.report.failed += 1;
                if self.report.failures.len() < 20 {
                    let (protocol, frontend) = &self.frontends[attempt.target];
                    self.report.failures.push(format!(
                        "{protocol} {frontend} at {} ns: {error}",
                        attempt.began
                    ));
                }
            }
        }
        for pod in self.pods.drain(..) {
            pod.backend.stop();
            self.fabric.remove_pod(pod.ip);
        }
        std::mem::take(&mut self.report)
    }
}

/// A Service `name` selecting the soak's pods, TCP 80 → [`TCP_PORT`] and UDP 53 →
/// [`UDP_PORT`] (numbers: the pods' named ports are TCP only), with
/// `extra` merged into its spec; returns its ClusterIP.
async fn service(client: &Client, name: &str, extra: serde_json::Value) -> IpAddr {
    let mut spec = json!({
        "selector": {"app": APP},
        "ports": [
            {"name": "http", "port": 80, "targetPort": TCP_PORT, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": UDP_PORT, "protocol": "UDP"},
        ],
    });
    if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    apply(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": spec,
        }),
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let service = services.get(name).await.expect("reading the Service back");
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .expect("an allocated ClusterIP")
}
