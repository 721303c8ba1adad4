//! `cargo xtask demo`: the bundled example cluster on this machine, with real traffic through
//! the agent in eBPF mode. A client on one node (default `node-b1`, zone-b) reaches only its
//! zone's pods; when they stop it falls back to the other zones; when they return, so does
//! the traffic. Then a client outside the node reaches shop/frontend's NodePort (on the
//! node's InternalIP) and externalIP through the agent's north-south tc programs, answered by
//! the same zone's pods. Every step checks what it shows and the task exits non-zero if one
//! did not behave; the world it builds is removed afterwards (unless `--keep`).
//!
//! The world, all named `topoproxy-demo` / `tpdemo-*`:
//! - a copy of `examples/cluster` in `/tmp/topoproxy-demo/cluster`, the agent's `--source`;
//!   pods "stop" as the kubelet and the EndpointSlice controller would show it: their
//!   endpoints turn `ready: false, serving: false` in that copy;
//! - a node network namespace `tpdemo-<node>` holding the client and the agent, with the
//!   node's InternalIP on its loopback and one veth per pod, routed by /32 (as a CNI would);
//! - an outside namespace `tpdemo-outside` joined to the node by the veth `tpd-uplink`
//!   (10.255.0.2 ↔ 10.255.0.1), routing the node's InternalIP and shop/frontend's externalIP
//!   via the node (see `demo/outside.rs`); the pods route the client's range back via the
//!   node's address and the node forwards;
//! - one namespace per pod of the demo Services (kube-dns, shop/frontend) with the pod's
//!   example address, where this binary (`--role serve`) answers `<pod> <zone>` over TCP and
//!   UDP;
//! - a child cgroup `topoproxy-demo` under the cgroup2 mount: the agent attaches its programs
//!   there and the client joins it, so the host's own processes are never translated;
//! - the agent, `topoproxy run --proxy-mode ebpf`, pinning in `/sys/fs/bpf/topoproxy-demo`,
//!   run inside the node namespace with `--north-south-interfaces tpd-uplink`: its tc
//!   programs go on that veth only (never on the machine's own devices, which the demo does
//!   not touch), and its `/metrics` and `/healthz` listen on that namespace's loopback, read
//!   from a thread that enters it. The socket programs (cgroup) and pins are not tied to a
//!   network namespace.
//!
//! Processes enter namespaces through `nsenter --net=` (`ip netns exec` remounts /sys and
//! hides the cgroup mount). They run in their own process groups, so Ctrl-C reaches only this
//! task, which then tears the world down in order.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::util::{http_get, run};

mod outside;

const PIN_DIR: &str = "/sys/fs/bpf/topoproxy-demo";
const CGROUP_NAME: &str = "topoproxy-demo";
const ROOT_NAME: &str = "topoproxy-demo";
const NETNS_PREFIX: &str = "tpdemo-";
/// Connects (or UDP queries) per probe and step.
const CONNECTS: usize = 20;
/// How long the agent may take to put a YAML change into the maps.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_PERIOD: &str = "200ms";

/// What `cargo xtask demo` was asked to do.
pub struct DemoOptions {
    /// The node whose agent runs and whose namespace holds the client.
    pub node: String,
    /// Leave the world running at the end.
    pub keep: bool,
    /// Only remove a world left behind by `--keep` or an interrupted run.
    pub clean: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn upper(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }

    fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" | "TCP" => Some(Self::Tcp),
            "udp" | "UDP" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// A Service port a client exercises: a frontend (ClusterIP, NodePort, ExternalIP) of the
/// example cluster.
struct Probe {
    service: &'static str,
    /// The frontend kind as the plan names it.
    frontend: &'static str,
    protocol: Proto,
    vip: Ipv4Addr,
    port: u16,
}

impl Probe {
    fn vs(&self) -> VsKey {
        (self.protocol, SocketAddrV4::new(self.vip, self.port))
    }

    fn label(&self) -> String {
        format!("{} {}:{}", self.protocol.upper(), self.vip, self.port)
    }

    /// The Service, and the frontend kind unless it is the ClusterIP.
    fn what(&self) -> String {
        if self.frontend == "ClusterIP" {
            self.service.to_owned()
        } else {
            format!("{} {}", self.service, self.frontend)
        }
    }
}

const PROBES: [Probe; 3] = [
    Probe {
        service: "kube-system/kube-dns",
        frontend: "ClusterIP",
        protocol: Proto::Udp,
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 53,
    },
    Probe {
        service: "kube-system/kube-dns",
        frontend: "ClusterIP",
        protocol: Proto::Tcp,
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 53,
    },
    Probe {
        service: "shop/frontend",
        frontend: "ClusterIP",
        protocol: Proto::Tcp,
        vip: Ipv4Addr::new(10, 96, 20, 10),
        port: 80,
    },
];

/// The index in [`PROBES`] of shop/frontend, whose NodePort and externalIP the outside client
/// reaches.
const FRONTEND: usize = 2;

type VsKey = (Proto, SocketAddrV4);

/// Per virtual server, how many answers each backend gave.
type Answered = BTreeMap<VsKey, BTreeMap<SocketAddrV4, usize>>;

/// A pod of a demo Service, as the example cluster places it.
struct Pod {
    name: String,
    address: Ipv4Addr,
    node: String,
    zone: String,
    /// In the plan's serving-terminating tier: shutting down, never expected to answer.
    terminating: bool,
    ports: BTreeSet<(Proto, u16)>,
}

impl Pod {
    fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }
}

/// The node the demo runs as.
struct NodeInfo {
    name: String,
    zone: String,
    address: Ipv4Addr,
}

impl NodeInfo {
    fn netns(&self) -> String {
        format!("{NETNS_PREFIX}{}", self.name)
    }
}

// ---- Ctrl-C ----

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---- the task ----

/// `cargo xtask demo`.
pub fn demo(options: &DemoOptions) -> Result<()> {
    ensure!(
        current_uid()? == 0,
        "the demo creates network namespaces, a cgroup and BPF pins: run it as root"
    );
    let root = std::env::temp_dir().join(ROOT_NAME);
    if options.clean {
        return remove_leftovers(&root, None);
    }
    let started = Instant::now();
    println!("== topoproxy demo: the example cluster on this machine, eBPF mode, real traffic\n");
    println!("-- set-up (idempotent)");
    super::ebpf::ebpf_setup()?;
    ensure_tools()?;
    let binaries = build_topoproxy()?;
    println!("   topoproxy: {}", binaries.topoproxy.display());
    let built = started.elapsed();

    catch_interrupts();
    if leftovers_exist(&root) {
        println!("   an earlier demo world is still here (--keep or interrupted): removing it");
        remove_leftovers(&root, None)?;
    }
    let demo_started = Instant::now();
    let mut world = World::create(root, &options.node, binaries)?;
    let outcome = world.run_steps();
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    let teardown = if options.keep && outcome.is_ok() {
        world.keep()
    } else {
        if interrupted {
            println!("\nInterrupted: cleaning up.");
        } else if let Err(error) = &outcome {
            println!("\nFAILED: {error:#}");
            world.print_agent_log_tail();
        }
        world.teardown()
    };
    println!(
        "\n(set-up and build {:.1} s, demo {:.1} s)",
        built.as_secs_f64(),
        demo_started.elapsed().as_secs_f64()
    );
    teardown?;
    if interrupted {
        // As a shell reports a command ended by SIGINT.
        std::process::exit(130);
    }
    if outcome.is_err() {
        bail!("the demo did not behave as shown (FAILED above)");
    }
    println!("demo passed: every step behaved as shown");
    Ok(())
}

fn current_uid() -> Result<u32> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("parsing id -u")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// `ip` (iproute2) and `nsenter` (util-linux), installed if missing.
fn ensure_tools() -> Result<()> {
    if on_path("ip") && on_path("nsenter") {
        println!("   ip and nsenter present");
        return Ok(());
    }
    println!("   installing iproute2 and util-linux");
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(["iproute2", "util-linux"]))
}

struct Binaries {
    topoproxy: PathBuf,
    xtask: PathBuf,
}

/// `cargo build --release -p topoproxy`, returning where cargo put the binary.
fn build_topoproxy() -> Result<Binaries> {
    println!("   cargo build --release -p topoproxy");
    let args = [
        "build",
        "--release",
        "-p",
        "topoproxy",
        "--bin",
        "topoproxy",
        "--message-format=json-render-diagnostics",
    ];
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(args)
        .current_dir(super::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(out.status.success(), "cargo build failed: {}", out.status);
    let topoproxy = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["target"]["name"] == "topoproxy")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo build did not report the topoproxy executable")?;
    // The running binary itself, even if cargo replaces the file on disk meanwhile.
    let xtask = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    Ok(Binaries { topoproxy, xtask })
}

// ---- the world ----

struct World {
    root: PathBuf,
    source: PathBuf,
    cgroup: PathBuf,
    binaries: Binaries,
    node: NodeInfo,
    pods: Vec<Pod>,
    /// Per probe: indices into `pods` of its backends.
    backends: Vec<Vec<usize>>,
    /// shop/frontend's NodePort on the node address and its externalIPs, for the outside
    /// client (their backends are the ClusterIP's: `backends[FRONTEND]`).
    outside: Vec<Probe>,
    /// The source files as copied, for restoring.
    originals: BTreeMap<PathBuf, String>,
    metrics: SocketAddr,
    healthz: SocketAddr,
    agent: Option<Child>,
    servers: BTreeMap<usize, Child>,
    client: Option<Client>,
    /// Set once torn down or kept, so Drop does nothing more.
    done: bool,
}

impl World {
    /// Copies the example, reads the node and the demo Services' pods from the plan, and
    /// builds namespaces, pods, the cgroup and the agent. A failure part-way tears down what
    /// exists (Drop).
    fn create(root: PathBuf, node: &str, binaries: Binaries) -> Result<Self> {
        let source = root.join("cluster");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        copy_dir(&super::workspace_root().join("examples/cluster"), &source)?;
        let mut originals = BTreeMap::new();
        for file in yaml_files(&source)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            originals.insert(file, text);
        }
        let plan = plan_json(&binaries.topoproxy, &source, node)?;
        let node = node_info(&originals, node)?;
        let (pods, backends) = pods_from_plan(&plan)?;
        let outside = outside::frontends(&plan, &node)?;
        let cgroup = cgroup2_mount()?.join(CGROUP_NAME);
        let mut world = Self {
            root,
            source,
            cgroup,
            binaries,
            node,
            pods,
            backends,
            outside,
            originals,
            metrics: super::free_loopback_port()?,
            healthz: super::free_loopback_port()?,
            agent: None,
            servers: BTreeMap::new(),
            client: None,
            done: false,
        };
        world.check_probes()?;
        world.build_network()?;
        outside::build_network(&world)?;
        for index in 0..world.pods.len() {
            world.start_server(index)?;
        }
        world.record_pids()?;
        world.describe();
        std::fs::create_dir(&world.cgroup)
            .with_context(|| format!("creating the cgroup {}", world.cgroup.display()))?;
        world.start_agent()?;
        world.client = Some(Client::spawn(
            &world,
            &world.node.netns(),
            Some(&world.cgroup),
        )?);
        Ok(world)
    }

    fn local(&self, probe: usize) -> BTreeSet<usize> {
        self.expected(probe, true)
    }

    fn remote(&self, probe: usize) -> BTreeSet<usize> {
        self.expected(probe, false)
    }

    /// The probe's answering pods in (or outside) the node's zone.
    fn expected(&self, probe: usize, in_zone: bool) -> BTreeSet<usize> {
        self.backends[probe]
            .iter()
            .copied()
            .filter(|&i| {
                !self.pods[i].terminating && (self.pods[i].zone == self.node.zone) == in_zone
            })
            .collect()
    }

    fn zone_pods(&self) -> BTreeSet<usize> {
        (0..self.pods.len())
            .filter(|&i| self.pods[i].zone == self.node.zone)
            .collect()
    }

    fn check_probes(&self) -> Result<()> {
        for (i, probe) in PROBES.iter().enumerate() {
            ensure!(
                !self.local(i).is_empty() && !self.remote(i).is_empty(),
                "{} ({}) needs ready pods both in {} and elsewhere for this demo",
                probe.label(),
                probe.service,
                self.node.zone
            );
        }
        Ok(())
    }

    fn names(&self, pods: &BTreeSet<usize>) -> String {
        pods.iter()
            .map(|&i| format!("{} ({})", self.pods[i].name, self.pods[i].zone))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The node namespace with the node's address on its loopback, and per pod a namespace
    /// joined to it by a veth pair, routed by /32 both ways (as a CNI would).
    fn build_network(&self) -> Result<()> {
        let node_ns = self.node.netns();
        let node_ip = self.node.address;
        ip(&format!("netns add {node_ns}"))?;
        ip(&format!("-n {node_ns} link set lo up"))?;
        ip(&format!("-n {node_ns} addr add {node_ip}/32 dev lo"))?;
        for (i, pod) in self.pods.iter().enumerate() {
            let (pod_ns, pod_ip, veth) = (pod.netns(), pod.address, format!("tpd{i}"));
            ip(&format!("netns add {pod_ns}"))?;
            ip(&format!("-n {pod_ns} link set lo up"))?;
            ip(&format!(
                "-n {node_ns} link add {veth} type veth peer name eth0 netns {pod_ns}"
            ))?;
            ip(&format!("-n {node_ns} link set {veth} alias {}", pod.name))?;
            ip(&format!("-n {pod_ns} addr add {pod_ip}/32 dev eth0"))?;
            ip(&format!("-n {pod_ns} link set eth0 up"))?;
            ip(&format!("-n {node_ns} link set {veth} up"))?;
            ip(&format!("-n {pod_ns} route add {node_ip}/32 dev eth0"))?;
            ip(&format!(
                "-n {node_ns} route add {pod_ip}/32 dev {veth} src {node_ip}"
            ))?;
        }
        Ok(())
    }

    fn describe(&self) {
        println!("\n-- the world (network namespaces on this machine; nothing leaves them)");
        println!(
            "   node   {:<16} {:<15} {:<8} {}  the client runs here, in cgroup {}",
            self.node.netns().trim_start_matches(NETNS_PREFIX),
            self.node.address,
            self.node.name,
            self.node.zone,
            self.cgroup.display()
        );
        for pod in &self.pods {
            let ports: Vec<String> = pod
                .ports
                .iter()
                .map(|(proto, port)| format!("{}/{port}", proto.lower()))
                .collect();
            println!(
                "   pod    {:<16} {:<15} {:<8} {}  {}{}",
                pod.name,
                pod.address,
                pod.node,
                pod.zone,
                ports.join(" "),
                if pod.terminating {
                    "  (terminating, still serving)"
                } else {
                    ""
                }
            );
        }
        outside::describe(self);
        println!(
            "   source {}  (a copy of examples/cluster)",
            self.source.display()
        );
    }

    fn start_server(&mut self, index: usize) -> Result<()> {
        let pod = &self.pods[index];
        let log = self.open_log("pods.log")?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", pod.netns()))
            .arg("--")
            .arg(&self.binaries.xtask)
            .args(["demo", "--role", "serve", &pod.name, &pod.zone])
            .arg(pod.address.to_string())
            .args(
                pod.ports
                    .iter()
                    .map(|(proto, port)| format!("{}/{port}", proto.lower())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the server of pod {}", pod.name))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the server of pod {} did not start (see {})",
                pod.name,
                self.root.join("pods.log").display()
            );
        }
        self.servers.insert(index, child);
        Ok(())
    }

    fn stop_server(&mut self, index: usize) {
        if let Some(mut child) = self.servers.remove(&index) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn open_log(&self, name: &str) -> Result<std::fs::File> {
        let path = self.root.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    fn agent_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["run", "--proxy-mode", "ebpf", "--source"]
            .map(str::to_owned)
            .to_vec();
        args.push(self.source.display().to_string());
        args.extend(
            [
                "--hostname-override",
                &self.node.name,
                "--bpf-pin-dir",
                PIN_DIR,
                "--cgroup-path",
                &self.cgroup.display().to_string(),
                "--metrics-bind-address",
                &self.metrics.to_string(),
                "--healthz-bind-address",
                &self.healthz.to_string(),
                "--min-sync-period",
                "0",
                "--source-poll-period",
                POLL_PERIOD,
                // Named, not auto: the tc programs go on the uplink to the outside client
                // only, never on a pod's veth.
                "--north-south-interfaces",
                outside::UPLINK,
            ]
            .map(str::to_owned),
        );
        args
    }

    fn start_agent(&mut self) -> Result<()> {
        let args = self.agent_args();
        let netns = format!("--net=/run/netns/{}", self.node.netns());
        println!("\n-- the agent, in the node's namespace (it attaches its tc programs there)");
        println!("   nsenter {netns} topoproxy {}", args.join(" "));
        let log = self.open_log("agent.log")?;
        let log2 = log.try_clone().context("cloning the agent log handle")?;
        let started = Instant::now();
        // nsenter execs the agent (no --fork), so the child's pid is the agent's.
        let child = Command::new("nsenter")
            .arg(&netns)
            .arg("--")
            .arg(&self.binaries.topoproxy)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .context("starting topoproxy run")?;
        let pid = child.id();
        self.agent = Some(child);
        self.record_pids()?;
        loop {
            check_interrupted()?;
            if let Some(agent) = self.agent.as_mut() {
                if let Some(status) = agent.try_wait().context("waiting for the agent")? {
                    bail!("the agent exited at start: {status}");
                }
            }
            if self
                .agent_get(self.healthz, "/healthz")
                .is_ok_and(|(status, _)| status == 200)
            {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the agent's /healthz did not answer 200 within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "   pid {pid}, /healthz 200 after {:.2} s; log {}",
            started.elapsed().as_secs_f64(),
            self.root.join("agent.log").display()
        );
        Ok(())
    }

    /// A GET of the agent's HTTP servers: they listen on the node namespace's loopback.
    fn agent_get(&self, address: SocketAddr, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        in_netns(&self.node.netns(), move || http_get(address, &path))
    }

    fn record_pids(&self) -> Result<()> {
        let mut pids: Vec<u32> = self.servers.values().map(Child::id).collect();
        pids.extend(self.agent.as_ref().map(Child::id));
        let text: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
        let path = self.root.join("pids");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn print_agent_log_tail(&self) {
        let path = self.root.join("agent.log");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            println!("   last lines of {}:", path.display());
            for line in &lines[lines.len().saturating_sub(15)..] {
                println!("   | {line}");
            }
        }
    }

    // ---- the steps ----

    fn run_steps(&mut self) -> Result<()> {
        let zone = self.node.zone.clone();
        let local: Vec<BTreeSet<usize>> = (0..PROBES.len()).map(|i| self.local(i)).collect();
        let remote: Vec<BTreeSet<usize>> = (0..PROBES.len()).map(|i| self.remote(i)).collect();

        section(&format!(
            "1. A client on {} ({zone}) reaches only {zone} pods",
            self.node.name
        ));
        println!(
            "   Why, in the planner's words (topoproxy plan --source … --node {} --explain, kube-dns):",
            self.node.name
        );
        for line in self.explain_block()?.lines() {
            println!("   | {line}");
        }
        self.converge(&local)?;
        self.show_plan(&PROBES, true)?;
        let falling_back_before = self.falling_back_metric()?;
        let answered = self.traffic(&local, &format!("only {zone} answered"))?;
        self.outside_cgroup()?;
        self.show_list(&PROBES, &answered)?;

        let stopped = self.zone_pods();
        section(&format!(
            "2. The {zone} pods stop: traffic falls back to the other zones"
        ));
        println!("   Stopping {}", self.names(&stopped));
        println!(
            "   and marking their endpoints `ready: false, serving: false` in the EndpointSlices"
        );
        println!("   (as the kubelet and the EndpointSlice controller would).");
        for &i in &stopped {
            self.stop_server(i);
        }
        self.record_pids()?;
        let addresses: BTreeSet<Ipv4Addr> = stopped.iter().map(|&i| self.pods[i].address).collect();
        self.write_stopped(&addresses)?;
        let elapsed = self.converge(&remote)?;
        println!(
            "   The agent re-read the YAML and reprogrammed the maps {:.2} s after the write.",
            elapsed.as_secs_f64()
        );
        self.show_plan(&PROBES, false)?;
        let falling_back_after = self.falling_back_metric()?;
        println!(
            "   Metric topoproxy_services_falling_back: {falling_back_before} before, {falling_back_after} now; --explain says:"
        );
        ensure!(
            falling_back_after > falling_back_before,
            "topoproxy_services_falling_back did not rise ({falling_back_before} → {falling_back_after})"
        );
        for line in self.explain_block()?.lines().filter(|line| {
            line.trim_start().starts_with("topology:") || line.contains("falling back")
        }) {
            println!("   | {}", line.trim_start());
        }
        let answered = self.traffic(
            &remote,
            &format!("no answer from {zone}; the other zones took over"),
        )?;
        self.show_list(&PROBES, &answered)?;

        section(&format!(
            "3. The {zone} pods return: traffic returns to {zone}"
        ));
        for &i in &stopped {
            self.start_server(i)?;
        }
        self.record_pids()?;
        self.restore_source()?;
        println!(
            "   Restarted {} and restored their endpoints.",
            self.names(&stopped)
        );
        let elapsed = self.converge(&local)?;
        println!(
            "   The agent reprogrammed the maps {:.2} s after the write.",
            elapsed.as_secs_f64()
        );
        self.show_plan(&PROBES, true)?;
        let answered = self.traffic(&local, &format!("only {zone} answered again"))?;
        self.show_list(&PROBES, &answered)?;

        self.outside_step()
    }

    /// Waits until the kernel's active tiers (`topoproxy list`) hold exactly `expected` for
    /// every probe; returns how long that took.
    fn converge(&self, expected: &[BTreeSet<usize>]) -> Result<Duration> {
        let started = Instant::now();
        let want: BTreeMap<VsKey, BTreeSet<SocketAddrV4>> = PROBES
            .iter()
            .enumerate()
            .map(|(i, probe)| (probe.vs(), self.endpoints(probe, &expected[i])))
            .collect();
        loop {
            check_interrupted()?;
            let text = self.list()?;
            let listed = parse_list(&text);
            let matches = want
                .iter()
                .all(|(vs, backends)| listed.get(vs).map(|l| &l.backends) == Some(backends));
            if matches {
                return Ok(started.elapsed());
            }
            if started.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "after {} s the kernel's table still differs from what the demo expects \
                     ({}); topoproxy list printed:\n{text}",
                    CONVERGE_TIMEOUT.as_secs(),
                    want.iter()
                        .map(|((proto, vs), b)| format!(
                            "{} {vs} -> {}",
                            proto.upper(),
                            b.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(" ")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Prints the kernel's table for the demo's Services after traffic, and checks that its
    /// per-backend connect counters saw at least the answers the client got from each.
    fn show_list(&self, probes: &[Probe], answered: &Answered) -> Result<()> {
        let text = self.list()?;
        let listed = parse_list(&text);
        println!("   The kernel's table for these Services (topoproxy list --proxy-mode ebpf --bpf-pin-dir {PIN_DIR};");
        println!("   ActiveConn is the per-backend connect counter of the eBPF maps):");
        for line in text.lines().take(3) {
            println!("   | {}", line.trim_end());
        }
        let mut short = Vec::new();
        for probe in probes {
            let Some(section) = listed.get(&probe.vs()) else {
                bail!("topoproxy list lost {}", probe.label());
            };
            for line in &section.lines {
                println!("   | {}", line.trim_end());
            }
            for (backend, &count) in answered.get(&probe.vs()).into_iter().flatten() {
                let counted = section.counters.get(backend).copied().unwrap_or(0);
                if counted < count as u64 {
                    short.push(format!(
                        "{} -> {backend}: counter {counted}, but {count} answers came from it",
                        probe.label()
                    ));
                }
            }
        }
        ensure!(
            short.is_empty(),
            "the kernel's counters disagree with the traffic: {}",
            short.join("; ")
        );
        Ok(())
    }

    fn endpoints(&self, probe: &Probe, pods: &BTreeSet<usize>) -> BTreeSet<SocketAddrV4> {
        pods.iter()
            .filter_map(|&i| {
                let pod = &self.pods[i];
                let port = self.target_port(probe, i)?;
                Some(SocketAddrV4::new(pod.address, port))
            })
            .collect()
    }

    /// The pod port a probe lands on (the example's targetPort).
    fn target_port(&self, probe: &Probe, pod: usize) -> Option<u16> {
        let ports: Vec<u16> = self.pods[pod]
            .ports
            .iter()
            .filter(|(proto, _)| *proto == probe.protocol)
            .map(|(_, port)| *port)
            .collect();
        // Every demo pod serves one port per protocol.
        ports.first().copied()
    }

    fn list(&self) -> Result<String> {
        let out = Command::new(&self.binaries.topoproxy)
            .args(["list", "--proxy-mode", "ebpf", "--bpf-pin-dir", PIN_DIR])
            .output()
            .context("running topoproxy list")?;
        ensure!(
            out.status.success(),
            "topoproxy list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's own view, `/plan?format=json`: which tier serves each probe.
    fn show_plan(&self, probes: &[Probe], zone_local: bool) -> Result<()> {
        let (status, body) = self.agent_get(self.metrics, "/plan?format=json")?;
        ensure!(status == 200, "/plan?format=json answered {status}");
        let plan: Value = serde_json::from_str(&body).context("parsing /plan?format=json")?;
        println!("   The agent's plan (GET /plan?format=json): active tier per Service port");
        for probe in probes {
            let vs = find_vs(&plan, probe)?;
            let active = vs["activeTier"].as_str().unwrap_or("?");
            let falling_back = vs["fallingBack"].as_bool().unwrap_or(false);
            let tiers: Vec<String> = vs["tiers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|tier| {
                    let zones: BTreeSet<&str> = tier["backends"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|b| b["zone"].as_str())
                        .collect();
                    format!(
                        "{} [{}]",
                        tier["kind"].as_str().unwrap_or("?"),
                        zones.into_iter().collect::<Vec<_>>().join(" ")
                    )
                })
                .collect();
            println!(
                "   {:<18} {:<20} active {:<10} fallingBack {:<5}  tiers: {}",
                probe.service,
                probe.label(),
                active,
                falling_back,
                tiers.join(", ")
            );
            if zone_local {
                ensure!(
                    active == "SameZone" && !falling_back,
                    "{} {}: the agent's plan should serve the same zone, but its active tier is \
                     {active} (fallingBack {falling_back})",
                    probe.service,
                    probe.label()
                );
            } else {
                ensure!(
                    active != "SameZone" && falling_back,
                    "{} {}: the agent's plan should have fallen back, but its active tier is \
                     {active} (fallingBack {falling_back})",
                    probe.service,
                    probe.label()
                );
            }
        }
        Ok(())
    }

    fn falling_back_metric(&self) -> Result<f64> {
        let (status, body) = self.agent_get(self.metrics, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        super::metric(&body, "topoproxy_services_falling_back")
            .context("/metrics has no topoproxy_services_falling_back")
    }

    /// `topoproxy plan --explain` for kube-dns's first port on this node.
    fn explain_block(&self) -> Result<String> {
        let out = Command::new(&self.binaries.topoproxy)
            .arg("plan")
            .arg("--source")
            .arg(&self.source)
            .args(["--node", &self.node.name, "--explain"])
            .output()
            .context("running topoproxy plan --explain")?;
        ensure!(
            out.status.success(),
            "topoproxy plan --explain failed: {}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut block = String::new();
        let mut in_service = false;
        let mut ports = 0;
        for line in text.lines() {
            if line.starts_with("Service ") {
                if in_service {
                    break;
                }
                in_service = line.starts_with("Service kube-system/kube-dns ");
            } else if in_service && line.starts_with("  port ") {
                ports += 1;
            }
            if in_service && ports <= 1 {
                let _ = writeln!(block, "{line}");
            }
        }
        ensure!(
            !block.is_empty(),
            "plan --explain has no kube-system/kube-dns section"
        );
        Ok(block)
    }

    /// CONNECTS connects (or queries) per probe from the client in the demo cgroup; see
    /// [`Self::ask_all`].
    fn traffic(&mut self, expected: &[BTreeSet<usize>], verdict: &str) -> Result<Answered> {
        println!(
            "   The client (in the demo cgroup, in {}):",
            self.node.netns()
        );
        let mut client = self.client.take().context("no client")?;
        let asked = self.ask_all(&mut client, &PROBES, expected);
        self.client = Some(client);
        let answered = asked?;
        println!("   ✓ {verdict}; every answer came back from the VIP (getpeername / recvfrom)");
        Ok(answered)
    }

    /// CONNECTS connects (or queries) per probe from `client`; each answer must come from
    /// the probe's `expected` pods, with the probe's address as the peer, and a probe with
    /// several expected pods must have spread over more than one.
    fn ask_all(
        &self,
        client: &mut Client,
        probes: &[Probe],
        expected: &[BTreeSet<usize>],
    ) -> Result<Answered> {
        let mut failures = Vec::new();
        let mut answered = Answered::new();
        for (probe, expected) in probes.iter().zip(expected) {
            check_interrupted()?;
            let tally = client.probe(probe, CONNECTS)?;
            self.print_tally(probe, &tally);
            self.add_answers(probe, &tally, &mut answered);
            failures.extend(self.judge(probe, &tally, expected));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(answered)
    }

    fn print_tally(&self, probe: &Probe, tally: &Tally) {
        let verb = match probe.protocol {
            Proto::Tcp => "TCP connects",
            Proto::Udp => "UDP queries",
        };
        let answers: Vec<String> = tally
            .answers
            .iter()
            .map(|(answer, count)| format!("{} ×{count}", self.answer_label(answer)))
            .collect();
        println!(
            "   {CONNECTS} {verb} to {}:{} ({}) → {}{}",
            probe.vip,
            probe.port,
            probe.what(),
            if answers.is_empty() {
                "no answer".to_owned()
            } else {
                answers.join(", ")
            },
            if tally.errors.is_empty() {
                String::new()
            } else {
                format!("; {} failed: {}", tally.errors.len(), tally.errors[0])
            }
        );
    }

    /// Counts each answer against the backend (pod address and target port) that gave it.
    fn add_answers(&self, probe: &Probe, tally: &Tally, answered: &mut Answered) {
        for (answer, count) in &tally.answers {
            let name = answer.split_whitespace().next().unwrap_or("");
            let backend = self
                .pods
                .iter()
                .position(|pod| pod.name == name)
                .and_then(|i| {
                    Some(SocketAddrV4::new(
                        self.pods[i].address,
                        self.target_port(probe, i)?,
                    ))
                });
            if let Some(backend) = backend {
                *answered
                    .entry(probe.vs())
                    .or_default()
                    .entry(backend)
                    .or_default() += count;
            }
        }
    }

    /// What was wrong with one probe's answers: failures, strays, no spread.
    fn judge(&self, probe: &Probe, tally: &Tally, expected: &BTreeSet<usize>) -> Vec<String> {
        let mut failures = Vec::new();
        let wanted: BTreeSet<&str> = expected
            .iter()
            .map(|&p| self.pods[p].name.as_str())
            .collect();
        let got: BTreeSet<&str> = tally
            .answers
            .keys()
            .map(|answer| answer.split_whitespace().next().unwrap_or(""))
            .collect();
        if !tally.errors.is_empty() {
            failures.push(format!(
                "{}: {} of {CONNECTS} failed (first: {})",
                probe.label(),
                tally.errors.len(),
                tally.errors[0]
            ));
        }
        let strays: Vec<&&str> = got.difference(&wanted).collect();
        if !strays.is_empty() {
            failures.push(format!(
                "{}: expected answers only from {}, also got {strays:?}",
                probe.label(),
                self.names(expected)
            ));
        }
        if strays.is_empty() && wanted.len() > 1 && got.len() < 2 {
            failures.push(format!(
                "{}: all {CONNECTS} answers came from {got:?}, none from the rest of {}",
                probe.label(),
                self.names(expected)
            ));
        }
        failures
    }

    fn answer_label(&self, answer: &str) -> String {
        let mut words = answer.split_whitespace();
        match (words.next(), words.next()) {
            (Some(name), Some(zone)) => format!("{name} ({zone})"),
            _ => format!("{answer:?}"),
        }
    }

    /// A process in the same namespace but outside the demo cgroup is not translated.
    fn outside_cgroup(&self) -> Result<()> {
        let mut outsider = Client::spawn(self, &self.node.netns(), None)?;
        let probe = &PROBES[1];
        let tally = outsider.probe(probe, 1)?;
        ensure!(
            tally.answers.is_empty(),
            "a process outside the demo cgroup reached {} through {}: the programs leak",
            tally
                .answers
                .keys()
                .next()
                .map(String::as_str)
                .unwrap_or("?"),
            probe.label()
        );
        println!("   ✓ the same connect from a process outside the demo cgroup is not translated:");
        println!(
            "     {} → {}; the host's own processes are untouched",
            probe.label(),
            tally.errors.first().map(String::as_str).unwrap_or("failed")
        );
        Ok(())
    }

    /// Rewrites the source copy with `addresses`' endpoints not ready and not serving.
    fn write_stopped(&self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        let mut found = BTreeSet::new();
        for (file, text) in &self.originals {
            let (edited, hits) = set_conditions(
                text,
                addresses,
                "ready: false, serving: false, terminating: false",
            );
            if hits.is_empty() {
                continue;
            }
            found.extend(hits);
            self.replace_file(file, &edited)?;
        }
        let missing: Vec<String> = addresses
            .difference(&found)
            .map(ToString::to_string)
            .collect();
        ensure!(
            missing.is_empty(),
            "no endpoint conditions found for {} in {}",
            missing.join(", "),
            self.source.display()
        );
        Ok(())
    }

    fn restore_source(&self) -> Result<()> {
        for (file, text) in &self.originals {
            let current = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            if &current != text {
                self.replace_file(file, text)?;
            }
        }
        Ok(())
    }

    /// Writes beside the source and renames, so the agent never reads half a file.
    fn replace_file(&self, file: &Path, text: &str) -> Result<()> {
        let staging = self.root.join("staging.tmp");
        std::fs::write(&staging, text).with_context(|| format!("writing {}", staging.display()))?;
        std::fs::rename(&staging, file).with_context(|| format!("renaming onto {}", file.display()))
    }

    // ---- the end ----

    /// Leaves everything running and says how to explore and clean up.
    fn keep(&mut self) -> Result<()> {
        self.done = true;
        if let Some(client) = self.client.take() {
            client.quit();
        }
        self.record_pids()?;
        let agent = self.agent.as_ref().map_or(0, Child::id);
        section("Kept (--keep): the world is still running");
        println!(
            "   agent pid {agent}, log {}",
            self.root.join("agent.log").display()
        );
        println!(
            "   live table:     nsenter --net=/run/netns/{} curl -s http://{}/plan",
            self.node.netns(),
            self.metrics
        );
        println!(
            "   kernel table:   {} list --proxy-mode ebpf --bpf-pin-dir {PIN_DIR}",
            self.binaries.topoproxy.display()
        );
        println!(
            "   a client shell: nsenter --net=/run/netns/{} sh -c 'echo $$ > {}/cgroup.procs; exec bash'",
            self.node.netns(),
            self.cgroup.display()
        );
        println!("                   then e.g. `bash -c 'cat < /dev/tcp/10.96.0.10/53'` (exit the shell before cleaning up)");
        outside::keep_hint(self);
        println!(
            "   edit the YAML:  {} (re-read every {POLL_PERIOD})",
            self.source.display()
        );
        println!("   clean up:       cargo xtask demo --clean");
        // The children stay; forget their handles without killing them.
        self.agent.take();
        self.servers.clear();
        Ok(())
    }

    /// Stops everything the demo started and removes what it created; checks nothing is left.
    fn teardown(&mut self) -> Result<()> {
        self.done = true;
        section("Clean-up");
        if let Some(client) = self.client.take() {
            client.quit();
        }
        let indices: Vec<usize> = self.servers.keys().copied().collect();
        for index in indices {
            self.stop_server(index);
        }
        if let Some(agent) = self.agent.take() {
            stop_gracefully(agent);
        }
        let _ = std::fs::remove_file(self.root.join("pids"));
        remove_leftovers(&self.root, Some(&self.binaries.topoproxy))
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if !self.done {
            if let Err(error) = self.teardown() {
                eprintln!("demo clean-up: {error:#}");
            }
        }
    }
}

fn section(title: &str) {
    println!("\n── {title}");
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop_gracefully(mut child: Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill on the pid of a child we have not reaped yet, so it cannot be reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn leftovers_exist(root: &Path) -> bool {
    root.exists()
        || Path::new(PIN_DIR).exists()
        || cgroup2_mount().is_ok_and(|mount| mount.join(CGROUP_NAME).exists())
        || demo_netns().is_ok_and(|names| !names.is_empty())
}

/// Removes whatever a demo left: processes recorded in `ROOT/pids` (if they are still the
/// demo's), the pins, namespaces, cgroup and the temporary directory; then checks.
fn remove_leftovers(root: &Path, topoproxy: Option<&Path>) -> Result<()> {
    let pids = std::fs::read_to_string(root.join("pids")).unwrap_or_default();
    for pid in pids
        .lines()
        .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        // Only a process that is still one the demo started (pids get reused).
        if cmdline.contains(PIN_DIR) || cmdline.contains("demo\0--role\0serve") {
            // SAFETY: kill on a pid just checked to be one of the demo's processes.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("   stopped pid {pid}");
        }
    }
    let mut problems = Vec::new();
    if Path::new(PIN_DIR).exists() {
        let topoproxy = match topoproxy {
            Some(path) => path.to_owned(),
            None => build_topoproxy()?.topoproxy,
        };
        let out = Command::new(&topoproxy)
            .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir", PIN_DIR])
            .output()
            .context("running topoproxy cleanup")?;
        println!(
            "   topoproxy cleanup --proxy-mode ebpf --bpf-pin-dir {PIN_DIR}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        if !out.status.success() {
            problems.push(format!(
                "topoproxy cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let names = demo_netns()?;
    for name in &names {
        if let Err(error) = ip(&format!("netns del {name}")) {
            problems.push(format!("{error:#}"));
        }
    }
    if !names.is_empty() {
        println!(
            "   removed {} network namespaces ({NETNS_PREFIX}*) and their veths",
            names.len()
        );
    }
    let cgroup = cgroup2_mount()?.join(CGROUP_NAME);
    if cgroup.exists() {
        // Its last process may still be exiting.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&cgroup) {
                Ok(()) => break,
                Err(error) if Instant::now() > deadline => {
                    problems.push(format!("removing {}: {error}", cgroup.display()));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        println!("   removed the cgroup {}", cgroup.display());
    }
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
        println!("   removed {}", root.display());
    }
    // Check, as an operator would: ip netns list, ls /sys/fs/bpf, the cgroup.
    let left = demo_netns()?;
    if !left.is_empty() {
        problems.push(format!("namespaces left: {}", left.join(" ")));
    }
    if Path::new(PIN_DIR).exists() {
        problems.push(format!("{PIN_DIR} is still there"));
    }
    if cgroup.exists() {
        problems.push(format!("{} is still there", cgroup.display()));
    }
    ensure!(
        problems.is_empty(),
        "clean-up incomplete: {}",
        problems.join("; ")
    );
    println!(
        "   nothing of the demo remains (ip netns list, /sys/fs/bpf, the cgroup, {})",
        root.display()
    );
    Ok(())
}

fn demo_netns() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    ensure!(out.status.success(), "ip netns list failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .map(str::to_owned)
        .collect())
}

// ---- the client ----

struct Tally {
    /// Answer text ("<pod> <zone>") → how many times.
    answers: BTreeMap<String, usize>,
    errors: Vec<String>,
}

/// The client process: `--role client`, in the node namespace (and the demo cgroup) or, for
/// the outside client, in its own namespace beyond the uplink.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// The client in `netns`, in `cgroup` if given.
    fn spawn(world: &World, netns: &str, cgroup: Option<&Path>) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(&world.binaries.xtask)
            .args(["demo", "--role", "client"])
            .arg(cgroup.map_or_else(|| "none".to_owned(), |c| c.display().to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("starting the client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        let hello = client.line()?;
        ensure!(hello == "ready", "the client did not start: {hello:?}");
        Ok(client)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .context("reading from the client")?;
        ensure!(read > 0, "the client process exited");
        Ok(line.trim_end().to_owned())
    }

    fn probe(&mut self, probe: &Probe, count: usize) -> Result<Tally> {
        writeln!(
            self.stdin,
            "{} {} {} {count}",
            probe.protocol.lower(),
            probe.vip,
            probe.port
        )
        .context("writing to the client")?;
        let answer: Value =
            serde_json::from_str(&self.line()?).context("parsing the client's answer")?;
        let mut tally = Tally {
            answers: BTreeMap::new(),
            errors: Vec::new(),
        };
        for item in answer["answers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            *tally
                .answers
                .entry(item.as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        for item in answer["errors"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            tally.errors.push(item.as_str().unwrap_or("?").to_owned());
        }
        Ok(tally)
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the roles: processes the demo starts inside its namespaces ----

/// `xtask demo --role serve POD ZONE ADDRESS PROTO/PORT…` or `--role client CGROUP|none`.
pub fn role(args: &[String]) -> Result<()> {
    match args.split_first() {
        Some((role, rest)) if role == "serve" => serve(rest),
        Some((role, rest)) if role == "client" => client(rest),
        _ => bail!("unknown demo role {args:?}"),
    }
}

/// A pod: answers "<pod> <zone>" to every TCP connect and UDP datagram on its ports.
fn serve(args: &[String]) -> Result<()> {
    let [name, zone, address, ports @ ..] = args else {
        bail!("serve needs POD ZONE ADDRESS PROTO/PORT…");
    };
    let address: Ipv4Addr = address.parse().context("parsing the pod address")?;
    let answer = format!("{name} {zone}");
    let mut threads = Vec::new();
    for spec in ports {
        let (proto, port) = spec
            .split_once('/')
            .and_then(|(proto, port)| Some((Proto::parse(proto)?, port.parse::<u16>().ok()?)))
            .with_context(|| format!("bad port {spec:?}"))?;
        let answer = answer.clone();
        match proto {
            Proto::Tcp => {
                let listener = TcpListener::bind((address, port))
                    .with_context(|| format!("binding tcp {address}:{port}"))?;
                threads.push(std::thread::spawn(move || {
                    // An accept error (a reset before accept) only loses that connection.
                    for mut stream in listener.incoming().flatten() {
                        let _ = writeln!(stream, "{answer}");
                    }
                }));
            }
            Proto::Udp => {
                let socket = UdpSocket::bind((address, port))
                    .with_context(|| format!("binding udp {address}:{port}"))?;
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while let Ok((_, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(answer.as_bytes(), from);
                    }
                }));
            }
        }
    }
    println!("ready");
    std::io::stdout().flush().context("flushing stdout")?;
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// The client: joins the cgroup (unless "none"), then runs `PROTO VIP PORT COUNT` lines from
/// stdin, answering each with one JSON line of answers and errors.
fn client(args: &[String]) -> Result<()> {
    let [cgroup] = args else {
        bail!("client needs CGROUP|none");
    };
    if cgroup != "none" {
        let procs = Path::new(cgroup).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining {}", procs.display()))?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    for line in std::io::stdin().lines() {
        let line = line.context("reading a command")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (proto, target, count) = match words.as_slice() {
            ["quit"] => return Ok(()),
            [proto, vip, port, count] => (
                Proto::parse(proto).context("protocol")?,
                SocketAddr::new(vip.parse().context("vip")?, port.parse().context("port")?),
                count.parse::<usize>().context("count")?,
            ),
            _ => bail!("unknown client command {line:?}"),
        };
        let mut answers = Vec::new();
        let mut errors = Vec::new();
        for _ in 0..count {
            let result = match proto {
                Proto::Tcp => tcp_ask(target),
                Proto::Udp => udp_ask(target),
            };
            match result {
                Ok(answer) => answers.push(answer),
                Err(error) => errors.push(error.to_string()),
            }
        }
        let reply = serde_json::json!({ "answers": answers, "errors": errors });
        writeln!(stdout, "{reply}")?;
        stdout.flush()?;
    }
    Ok(())
}

fn tcp_ask(target: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    if peer != target {
        return Err(std::io::Error::other(format!(
            "peer is {peer}, not the VIP"
        )));
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_owned())
}

fn udp_ask(target: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send_to(b"who", target)?;
    let mut buf = [0u8; 512];
    let (len, from) = socket.recv_from(&mut buf)?;
    if from != target {
        return Err(std::io::Error::other(format!(
            "reply from {from}, not the VIP"
        )));
    }
    Ok(String::from_utf8_lossy(&buf[..len]).trim().to_owned())
}

// ---- reading the example and the tools' output ----

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.is_dir() {
            files.extend(yaml_files(&path)?);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn plan_json(topoproxy: &Path, source: &Path, node: &str) -> Result<Value> {
    let out = Command::new(topoproxy)
        .arg("plan")
        .arg("--source")
        .arg(source)
        .args(["--node", node, "--format", "json"])
        .output()
        .context("running topoproxy plan")?;
    ensure!(
        out.status.success(),
        "topoproxy plan --node {node} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("parsing topoproxy plan --format json")
}

fn find_vs<'a>(plan: &'a Value, probe: &Probe) -> Result<&'a Value> {
    plan["virtualServers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .find(|vs| {
            vs["frontend"] == probe.frontend
                && vs["key"]["protocol"] == probe.protocol.upper()
                && vs["key"]["address"] == probe.vip.to_string().as_str()
                && vs["key"]["port"] == probe.port
        })
        .with_context(|| format!("the plan has no virtual server {}", probe.label()))
}

/// The demo Services' pods, from every tier of the plan (so fallbacks included), named
/// `<service>-<node suffix>`; and per probe, its pods.
fn pods_from_plan(plan: &Value) -> Result<(Vec<Pod>, Vec<Vec<usize>>)> {
    let mut by_address: BTreeMap<Ipv4Addr, Pod> = BTreeMap::new();
    let mut probe_addresses: Vec<BTreeSet<Ipv4Addr>> = Vec::new();
    for probe in &PROBES {
        let vs = find_vs(plan, probe)?;
        let service = probe.service.rsplit('/').next().unwrap_or(probe.service);
        let mut addresses = BTreeSet::new();
        for tier in vs["tiers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let terminating = tier["kind"] == "ServingTerminating";
            for backend in tier["backends"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let address: Ipv4Addr = backend["address"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .context("a backend without an IPv4 address in the plan")?;
                let port = backend["port"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .context("a backend without a port in the plan")?;
                let node = backend["nodeName"].as_str().unwrap_or("?").to_owned();
                let zone = backend["zone"].as_str().unwrap_or("?").to_owned();
                let pod = by_address.entry(address).or_insert_with(|| Pod {
                    name: format!("{service}-{}", node.strip_prefix("node-").unwrap_or(&node)),
                    address,
                    node,
                    zone,
                    terminating,
                    ports: BTreeSet::new(),
                });
                pod.ports.insert((probe.protocol, port));
                addresses.insert(address);
            }
        }
        probe_addresses.push(addresses);
    }
    let mut pods: Vec<Pod> = by_address.into_values().collect();
    // Several pods of one Service on one node: number them all.
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &pods {
        *totals.entry(pod.name.clone()).or_default() += 1;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for pod in &mut pods {
        if totals[&pod.name] > 1 {
            let count = seen.entry(pod.name.clone()).or_default();
            *count += 1;
            pod.name = format!("{}-{count}", pod.name);
        }
    }
    let backends = probe_addresses
        .iter()
        .map(|addresses| {
            addresses
                .iter()
                .filter_map(|a| pods.iter().position(|pod| pod.address == *a))
                .collect()
        })
        .collect();
    Ok((pods, backends))
}

/// The node's zone and first IPv4 InternalIP, from the Node objects of the source.
fn node_info(files: &BTreeMap<PathBuf, String>, node: &str) -> Result<NodeInfo> {
    let wanted = format!("name: {node}");
    for text in files.values() {
        let mut lines = text.lines().skip_while(|line| line.trim() != wanted);
        if lines.next().is_none() {
            continue;
        }
        let (mut zone, mut address) = (None, None);
        for line in lines {
            let line = line.trim();
            if line.starts_with("- apiVersion:") || line == "---" {
                break;
            }
            if let Some(value) = line.strip_prefix("topology.kubernetes.io/zone:") {
                zone = Some(value.trim().to_owned());
            }
            if line.contains("type: InternalIP") && address.is_none() {
                address = line
                    .split("address:")
                    .nth(1)
                    .map(|rest| {
                        rest.trim_matches(|c: char| c == '}' || c == '"' || c.is_whitespace())
                    })
                    .and_then(|a| a.parse::<Ipv4Addr>().ok());
            }
        }
        if let (Some(zone), Some(address)) = (zone, address) {
            return Ok(NodeInfo {
                name: node.to_owned(),
                zone,
                address,
            });
        }
    }
    bail!("found no Node {node} with a zone label and an IPv4 InternalIP in the source")
}

/// `text` with the `conditions:` of every endpoint whose address is in `addresses` set to
/// `{conditions}`; and which addresses were found.
fn set_conditions(
    text: &str,
    addresses: &BTreeSet<Ipv4Addr>,
    conditions: &str,
) -> (String, BTreeSet<Ipv4Addr>) {
    let mut out = String::with_capacity(text.len());
    let mut found = BTreeSet::new();
    // The indentation of the current matching endpoint item's `- ` while inside it.
    let mut inside: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(item_indent) = inside {
            if !trimmed.is_empty() && indent <= item_indent {
                inside = None;
            }
        }
        if let Some(list) = trimmed
            .strip_prefix("- addresses:")
            .map(|rest| rest.trim().trim_start_matches('[').trim_end_matches(']'))
        {
            let here: Option<Ipv4Addr> = list.split(',').find_map(|a| {
                let a: Ipv4Addr = a.trim().trim_matches('"').parse().ok()?;
                addresses.contains(&a).then_some(a)
            });
            if let Some(address) = here {
                found.insert(address);
                inside = Some(indent);
            }
        } else if inside.is_some() && trimmed.starts_with("conditions:") {
            let _ = writeln!(out, "{}conditions: {{{conditions}}}", &line[..indent]);
            continue;
        }
        let _ = writeln!(out, "{line}");
    }
    (out, found)
}

/// One virtual server of `topoproxy list`.
struct Listed {
    backends: BTreeSet<SocketAddrV4>,
    /// ActiveConn per backend: the eBPF maps' connect counter.
    counters: BTreeMap<SocketAddrV4, u64>,
    lines: Vec<String>,
}

/// `topoproxy list` (ipvsadm -Ln format) by virtual server.
fn parse_list(text: &str) -> BTreeMap<VsKey, Listed> {
    let mut listed: BTreeMap<VsKey, Listed> = BTreeMap::new();
    let mut current: Option<VsKey> = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(proto), Some(address)) if Proto::parse(proto).is_some() => {
                current = Proto::parse(proto).zip(address.parse().ok());
                if let Some(key) = current {
                    listed.insert(
                        key,
                        Listed {
                            backends: BTreeSet::new(),
                            counters: BTreeMap::new(),
                            lines: vec![line.to_owned()],
                        },
                    );
                }
            }
            (Some("->"), Some(address)) => {
                if let Some(entry) = current.and_then(|key| listed.get_mut(&key)) {
                    if let Ok(address) = address.parse() {
                        // Forward, Weight, then ActiveConn.
                        let active = words.nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
                        entry.backends.insert(address);
                        entry.counters.insert(address, active);
                        entry.lines.push(line.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    listed
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // id parent major:minor root mount-point options [optional…] - fstype source super
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// `ip` with `args` split on whitespace (the demo's names have no spaces).
fn ip(args: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .with_context(|| format!("running ip {args}"))?;
    ensure!(
        out.status.success(),
        "ip {args} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `f` on a thread that has entered the network namespace `netns` (`setns` moves only
/// the calling thread; sockets `f` opens stay in that namespace).
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file this thread holds open; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the namespace");
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in {netns} panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLICE: &str = "endpoints:
- addresses: [10.244.1.10]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-a1
- addresses: [10.244.3.10]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: node-b1
ports:
- {name: dns, port: 53, protocol: UDP}
";

    #[test]
    fn set_conditions_touches_only_the_named_endpoints() {
        let addresses: BTreeSet<Ipv4Addr> = ["10.244.3.10".parse().expect("address")].into();
        let (out, found) = set_conditions(SLICE, &addresses, "ready: false");
        assert_eq!(found, addresses);
        assert_eq!(
            out,
            SLICE.replacen(
                "  conditions: {ready: true, serving: true, terminating: false}\n  nodeName: node-b1",
                "  conditions: {ready: false}\n  nodeName: node-b1",
                1
            )
        );
        let none: BTreeSet<Ipv4Addr> = ["10.244.9.9".parse().expect("address")].into();
        let (out, found) = set_conditions(SLICE, &none, "ready: false");
        assert!(found.is_empty());
        assert_eq!(out, SLICE);
    }

    #[test]
    fn parse_list_reads_virtual_servers_and_backends() {
        let text = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.10:53 rr
  -> 10.244.3.10:53               Masq    1      20         0
UDP  10.96.0.10:53 rr
";
        let listed = parse_list(text);
        let tcp = &listed[&(Proto::Tcp, "10.96.0.10:53".parse().expect("vs"))];
        assert_eq!(
            tcp.backends,
            ["10.244.3.10:53".parse().expect("backend")].into()
        );
        assert_eq!(tcp.lines.len(), 2);
        assert_eq!(
            tcp.counters,
            [("10.244.3.10:53".parse().expect("backend"), 20)].into()
        );
        assert!(listed[&(Proto::Udp, "10.96.0.10:53".parse().expect("vs"))]
            .backends
            .is_empty());
        assert_eq!(listed.len(), 2);
    }
}
