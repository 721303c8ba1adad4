//! A cluster as a directory of YAML, and the agent running against it.
//!
//! Include with `#[path = "support/cluster.rs"] mod cluster;`. What it owns:
//!
//! - [`Fixture`]: Nodes (with `topology.kubernetes.io/zone`), Services and EndpointSlices with
//!   zone hints, written in the format of `examples/cluster/` (what `kubectl get -o yaml`
//!   prints) to a temporary directory; rewrites are atomic (write, then rename) because the
//!   agent polls the directory.
//! - [`YamlAgent`]: `topoproxy run --source DIR` (IPVS mode unless told otherwise) from
//!   [`agent_process::agent_bin`], killed on drop (then `topoproxy cleanup` runs), with its
//!   log printed when a test fails.
//! - [`topoproxy`] / [`ipvsadm`]: the CLIs.
//!
//! `http.rs` and `agent_process.rs` are this module's children, not siblings a target must
//! include: `k8s_real_node` includes this file with `harness.rs` only and reads
//! [`http_get`] here. A target that includes this file reaches them as `cluster::http` and
//! `cluster::agent_process` (and makes them `crate::http`, `crate::agent_process` for other
//! support files with `use cluster::{agent_process, http};`).

#![allow(dead_code)]

#[path = "agent_process.rs"]
pub mod agent_process;
#[path = "http.rs"]
pub mod http;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use agent_process::{add_run_args, agent_bin, loopback_address, Endpoints};
pub use http::http_get;

/// `ipvsadm` inside the VM.
pub const IPVSADM: &str = "/usr/sbin/ipvsadm";

/// Runs `topoproxy ARGS`, panicking on failure; returns stdout.
pub fn topoproxy(args: &[&str]) -> String {
    k8s_harness::stdout_of(Command::new(agent_bin()).args(args), "topoproxy")
        .unwrap_or_else(|error| panic!("{error}"))
}

/// What `topoproxy list` says before a text is its error.
pub const LIST_FAILED: &str = "(topoproxy list failed: ";

/// `topoproxy list --no-counters ARGS`, or [`LIST_FAILED`] and the error text.
pub fn list_owned(args: &[&str]) -> String {
    let out = Command::new(agent_bin())
        .args(["list", "--no-counters"])
        .args(args)
        .output()
        .expect("starting topoproxy list");
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        format!("{LIST_FAILED}{})", String::from_utf8_lossy(&out.stderr))
    }
}

/// Runs `ipvsadm ARGS`, panicking on failure; returns stdout.
pub fn ipvsadm(args: &[&str]) -> String {
    k8s_harness::stdout_of(Command::new(IPVSADM).args(args), "ipvsadm")
        .unwrap_or_else(|error| panic!("{error}"))
}

/// An endpoint's state in its EndpointSlice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Ready,
    /// Not ready (failing its probe), not terminating.
    NotReady,
    /// Shutting down but still serving.
    Terminating,
}

/// One endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub node: String,
    pub zone: String,
    pub condition: Condition,
    /// The zone hint (`hints.forZones`); `None` writes no hint.
    pub hint: Option<String>,
}

/// One Service port and the port its endpoints listen on.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
}

/// A ClusterIP Service with one EndpointSlice.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<Port>,
    /// Written as `spec.trafficDistribution: PreferSameZone` when true.
    pub prefer_same_zone: bool,
    /// The `topoproxy.io/topology` annotation (a locality policy), if any.
    pub topology: Option<&'static str>,
    /// The `topoproxy.io/ipvs-scheduler` annotation (e.g. `mh,mh-port`), if any.
    pub ipvs_scheduler: Option<&'static str>,
    pub endpoints: Vec<Endpoint>,
}

/// Nodes and Services in a temporary directory.
pub struct Fixture {
    pub dir: PathBuf,
    /// `(node name, zone)`.
    pub nodes: Vec<(String, String)>,
    pub services: Vec<Service>,
}

impl Fixture {
    /// An empty fixture in a fresh directory under the temp dir.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "topoproxy-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the fixture directory");
        Self {
            dir,
            nodes: Vec::new(),
            services: Vec::new(),
        }
    }

    /// Writes `nodes.yaml` and `services.yaml` (atomically).
    pub fn write(&self) {
        let mut nodes = String::from(
            "apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n",
        );
        for (i, (name, zone)) in self.nodes.iter().enumerate() {
            let _ = write!(
                nodes,
                "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {name}\n    labels:\n      \
                 kubernetes.io/hostname: {name}\n      topology.kubernetes.io/region: region-1\n      \
                 topology.kubernetes.io/zone: {zone}\n  status:\n    addresses:\n    \
                 - {{type: InternalIP, address: 192.168.100.{}}}\n    - {{type: Hostname, address: {name}}}\n",
                i + 10
            );
        }
        atomic_write(&self.dir.join("nodes.yaml"), &nodes);
        let mut services = String::new();
        for service in &self.services {
            services.push_str(&service_yaml(service));
        }
        atomic_write(&self.dir.join("services.yaml"), &services);
    }

    /// The service named `name`, for editing.
    pub fn service_mut(&mut self, name: &str) -> &mut Service {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name} in the fixture"))
    }

    /// `topoproxy plan --source DIR --node NODE`.
    pub fn plan(&self, node: &str) -> String {
        self.plan_as(node, "ipvsadm")
    }

    /// The plan for `node` as `plan --format json` prints it.
    pub fn plan_json(&self, node: &str) -> String {
        self.plan_as(node, "json")
    }

    fn plan_as(&self, node: &str, format: &str) -> String {
        let source = self.dir.to_str().expect("UTF-8 temp dir");
        topoproxy(&[
            "plan", "--source", source, "--node", node, "--format", format,
        ])
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("renaming to {}: {e}", path.display()));
}

fn service_yaml(service: &Service) -> String {
    let Service {
        name, cluster_ip, ..
    } = service;
    let annotations: Vec<String> = [
        ("topoproxy.io/topology", service.topology),
        ("topoproxy.io/ipvs-scheduler", service.ipvs_scheduler),
    ]
    .into_iter()
    .filter_map(|(key, value)| Some(format!("{key}: {:?}", value?)))
    .collect();
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations: {{{}}}\n", annotations.join(", "))
    };
    let mut text = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n{annotations}spec:\n  \
         type: ClusterIP\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n"
    );
    if service.prefer_same_zone {
        text.push_str("  trafficDistribution: PreferSameZone\n");
    }
    text.push_str("  ports:\n");
    for port in &service.ports {
        let _ = writeln!(
            text,
            "  - {{name: {}, port: {}, protocol: {}, targetPort: {}}}",
            port.name, port.port, port.protocol, port.target_port
        );
    }
    let _ = write!(
        text,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\n"
    );
    if service.endpoints.is_empty() {
        text.push_str("endpoints: []\n");
    } else {
        text.push_str("endpoints:\n");
    }
    for endpoint in &service.endpoints {
        let (ready, serving, terminating) = match endpoint.condition {
            Condition::Ready => (true, true, false),
            Condition::NotReady => (false, false, false),
            Condition::Terminating => (false, true, true),
        };
        let _ = write!(
            text,
            "- addresses: [{}]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n  \
             nodeName: {}\n  zone: {}\n",
            endpoint.address, endpoint.node, endpoint.zone
        );
        if let Some(hint) = &endpoint.hint {
            let _ = writeln!(text, "  hints: {{forZones: [{{name: {hint}}}]}}");
        }
    }
    text.push_str("ports:\n");
    for port in &service.ports {
        let _ = writeln!(
            text,
            "- {{name: {}, port: {}, protocol: {}}}",
            port.name, port.target_port, port.protocol
        );
    }
    text
}

/// Lines of the agent's log a failing test prints.
const AGENT_LOG_TAIL: usize = 40;

/// The agent as a process fed a directory of YAML (`--source`, polled every 100 ms).
pub struct YamlAgent {
    child: Option<Child>,
    log: PathBuf,
    source: PathBuf,
    node: String,
    /// Where `/metrics` is served (the same across restarts).
    pub metrics: SocketAddr,
    extra: Vec<String>,
    /// `--proxy-mode ...` and what the mode needs.
    mode: Vec<String>,
    /// `topoproxy cleanup ...` for that mode.
    cleanup: Vec<String>,
    /// Extra environment of the next spawn.
    env: Vec<(String, String)>,
    /// A command the agent runs under (its program and arguments, the agent's path appended),
    /// e.g. `unshare` to give it namespaces of its own.
    wrapper: Vec<String>,
}

impl YamlAgent {
    /// Starts `topoproxy run --proxy-mode ipvs` for `node` on the fixture's directory.
    pub fn start(fixture: &Fixture, node: &str) -> Self {
        Self::start_with(fixture, node, &[])
    }

    /// [`YamlAgent::start`] with extra flags.
    pub fn start_with(fixture: &Fixture, node: &str, extra: &[&str]) -> Self {
        let mut agent = Self::new_in_mode(fixture, node, &["--proxy-mode", "ipvs"], &["cleanup"]);
        agent.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        agent.spawn();
        agent
    }

    /// An agent not started yet: `mode` are the `run` flags of its proxy mode, `cleanup` the
    /// arguments that clean that mode up.
    pub fn new_in_mode(fixture: &Fixture, node: &str, mode: &[&str], cleanup: &[&str]) -> Self {
        let owned = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect();
        Self {
            child: None,
            log: fixture.dir.with_extension("agent.log"),
            source: fixture.dir.clone(),
            node: node.to_owned(),
            metrics: loopback_address(),
            extra: Vec::new(),
            mode: owned(mode),
            cleanup: owned(cleanup),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// Runs the agent as `WRAPPER... topoproxy run ...` from the next start on.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Sets (or with `None` removes) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(value) = value {
            self.env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Starts the process (killing a running one first).
    pub fn start_process(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// How the process ended, `None` while it runs (or was never started).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the agent log");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(agent_bin());
                command
            }
            None => Command::new(agent_bin()),
        };
        // A fresh healthz address each start; `/metrics` stays where the test reads it.
        let endpoints = Endpoints {
            metrics: self.metrics,
            healthz: loopback_address(),
        };
        add_run_args(&mut command, &self.node, endpoints);
        let child = command
            .args(&self.mode)
            .arg("--source")
            .arg(&self.source)
            .args(["--source-poll-period", "100ms"])
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting topoproxy run");
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would: nothing is cleaned up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same settings.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics`.
    pub fn metrics_text(&self) -> Option<String> {
        http_get(self.metrics, "/metrics")
    }

    /// The sum of the `/metrics` samples `selector` picks (a name, optionally with labels:
    /// [`http::metric_sum`]); `None` while nothing answers or no sample matches.
    pub fn metric(&self, selector: &str) -> Option<f64> {
        http::metric_sum(&self.metrics_text()?, selector)
    }

    /// Stops the agent and removes what it programmed.
    pub fn stop_and_cleanup(&mut self) {
        self.kill9();
        let _ = Command::new(agent_bin())
            .args(&self.cleanup)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for YamlAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Only the tail: a whole log of many restarts would push the panic message out of
            // what CI shows of the output.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(AGENT_LOG_TAIL)..];
            eprintln!(
                "---- agent log ({}), last {} of {} lines ----\n{}",
                self.log.display(),
                tail.len(),
                lines.len(),
                tail.join("\n")
            );
        }
        self.stop_and_cleanup();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Turns `ipvsadm -Ln` text (as `topoproxy plan` prints it) into `ipvsadm -R` input.
pub fn plan_to_restore(listing: &str) -> String {
    let mut out = String::new();
    let mut service: Option<(String, String)> = None;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["->", "RemoteAddress:Port", ..] => {}
            ["->", destination, forward, weight, ..] => {
                let Some((flag, address)) = &service else {
                    continue;
                };
                let method = match *forward {
                    "Route" => "-g",
                    "Tunnel" => "-i",
                    _ => "-m",
                };
                let _ = writeln!(
                    out,
                    "-a {flag} {address} -r {destination} {method} -w {weight}"
                );
            }
            [protocol @ ("TCP" | "UDP" | "SCTP"), address, scheduler, rest @ ..] => {
                let flag = match *protocol {
                    "TCP" => "-t",
                    "UDP" => "-u",
                    _ => "--sctp-service",
                };
                let _ = write!(out, "-A {flag} {address} -s {scheduler}");
                if let ["persistent", timeout, ..] = rest {
                    let _ = write!(out, " -p {timeout}");
                }
                out.push('\n');
                service = Some((flag.to_owned(), (*address).to_owned()));
            }
            _ => {}
        }
    }
    out
}
