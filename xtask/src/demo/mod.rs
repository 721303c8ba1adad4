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

mod cleanup;
mod host;
mod outside;
mod plan;
mod roles;
mod traffic;
mod world;

use cleanup::*;
use host::*;
use plan::*;
pub use roles::role;
use traffic::*;
use world::*;

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
