//! The churn soak (`support/k8s/churn.rs`) in eBPF mode on the host: `topoproxy run
//! --proxy-mode ebpf` against a real control plane (k8s-harness), its programs attached to a
//! child cgroup of its own and pinned under a directory of its own, north-south off. The pods
//! are addresses in one network namespace; the client loop runs in the cgroup and in a client
//! namespace joined to the pods' by a veth pair, so its sockets go through the programs.
//! Needs root. `TOPOPROXY_CHURN_ROUNDS` makes the soak longer.

#[path = "support/agent_process.rs"]
mod agent_process;
#[path = "support/k8s/api_agent.rs"]
mod api_agent;
#[path = "support/k8s/churn.rs"]
mod churn;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/host.rs"]
mod host;
#[path = "support/http.rs"]
mod http;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use api_agent::{install_agent_identity, ApiAgent, Auth};
use churn::{programmed_in, ClientLoop, Fabric, Programmed, Soak, AFTER_DRAIN, CONVERGE};
use host::require_root;
use k8s_harness::objects::{create_namespace, create_node, NodeSpec};
use k8s_harness::{ControlPlane, Options};
use process::shell;
use topoproxy::dataplane::ebpf::cgroup2_mount;

/// Where the client loop's process goes: cgroup and network namespace, one per line.
const PLACE_ENV: &str = "TOPOPROXY_CHURN_PLACE";
const CLIENT_SIDE: &str = "10.244.0.1";

struct HostFabric {
    id: u32,
    client_ns: String,
    pods_ns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

impl HostFabric {
    fn new() -> Self {
        require_root("cgroups, bpffs, network namespaces");
        let id = std::process::id() % 100_000;
        let fabric = Self {
            id,
            client_ns: format!("tpk-c{id}"),
            pods_ns: format!("tpk-p{id}"),
            cgroup: cgroup2_mount()
                .expect("the cgroup2 mount")
                .join(format!("topoproxy-churn-{id}")),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/topoproxy-churn-{id}")),
        };
        std::fs::create_dir(&fabric.cgroup).expect("creating the test cgroup");
        let (c, p) = (&fabric.client_ns, &fabric.pods_ns);
        shell(&format!(
            "ip netns add {c} && ip netns add {p} && \
             ip -n {c} link set lo up && ip -n {p} link set lo up && \
             ip -n {c} link add tpkc{id} type veth peer name tpkp{id} netns {p} && \
             ip -n {c} addr add {CLIENT_SIDE}/16 dev tpkc{id} && \
             ip -n {c} link set tpkc{id} up && ip -n {p} link set tpkp{id} up && \
             ip -n {p} route add {CLIENT_SIDE}/32 dev tpkp{id}"
        ));
        fabric
    }

    fn agent_args(&self) -> Vec<String> {
        [
            "--proxy-mode",
            "ebpf",
            "--bpf-pin-dir",
            self.pin_dir.to_str().expect("UTF-8 pin dir"),
            "--cgroup-path",
            self.cgroup.to_str().expect("UTF-8 cgroup"),
            "--north-south-interfaces",
            "none",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Fabric for HostFabric {
    /// Every pod is an address of the one pods namespace: `10.244.(100 + n / 200).(10 + n % 200)`.
    fn add_pod(&mut self, _node: &str, n: u32) -> (Ipv4Addr, PathBuf) {
        let (high, low) = (u8::try_from(100 + n / 200), u8::try_from(10 + n % 200));
        let ip = Ipv4Addr::new(
            10,
            244,
            high.expect("fewer than 31,000 pods"),
            low.unwrap_or(10),
        );
        shell(&format!(
            "ip -n {} addr add {ip}/32 dev tpkp{}",
            self.pods_ns, self.id
        ));
        (ip, PathBuf::from(format!("/run/netns/{}", self.pods_ns)))
    }

    fn remove_pod(&mut self, ip: Ipv4Addr) {
        shell(&format!(
            "ip -n {} addr del {ip}/32 dev tpkp{}",
            self.pods_ns, self.id
        ));
    }

    fn programmed(&self) -> Programmed {
        // The soak starts once the agent is healthy (its maps pinned): a failed read is a
        // failure, never an empty table (which would count as every pod drained).
        let listing = process::stdout_of(
            Command::new(agent_process::agent_bin())
                .args([
                    "list",
                    "--no-counters",
                    "--proxy-mode",
                    "ebpf",
                    "--bpf-pin-dir",
                ])
                .arg(&self.pin_dir),
            "topoproxy list",
        );
        // The eBPF programs ignore weights: every listed backend takes connections.
        programmed_in(&listing, false)
    }

    fn client_command(&self, settings: &Path) -> Command {
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args(churn::CLIENT_ARGS)
            .env(churn::CLIENT_ENV, settings)
            .env(
                PLACE_ENV,
                format!("{}\n/run/netns/{}", self.cgroup.display(), self.client_ns),
            );
        command
    }
}

impl Drop for HostFabric {
    fn drop(&mut self) {
        let _ = Command::new(agent_process::agent_bin())
            .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir"])
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.cgroup);
        for netns in [&self.client_ns, &self.pods_ns] {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}

/// The client loop: runs only when re-executed by [`HostFabric::client_command`].
#[test]
#[ignore = "helper process for the soak, started by it"]
fn churn_client_process() {
    let (Ok(settings), Ok(place)) = (std::env::var(churn::CLIENT_ENV), std::env::var(PLACE_ENV))
    else {
        return;
    };
    let (cgroup, netns) = place.split_once('\n').expect("cgroup and netns");
    host::join_cgroup(Path::new(cgroup));
    netns::enter(netns);
    churn::client_loop(Path::new(&settings));
}

#[tokio::test]
async fn rolling_updates_scaling_and_zone_moves_lose_no_request_in_ebpf_mode() {
    // Declared first, so it is dropped last: after the agent and the client loop stop.
    let mut fabric = HostFabric::new();
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    for (name, zone, address) in [
        ("node-a", "zone-a", "10.0.1.1"),
        ("node-b", "zone-b", "10.0.2.1"),
    ] {
        create_node(&client, &NodeSpec::new(name, Some(zone), address)).await;
    }
    create_namespace(&client, churn::NAMESPACE).await;
    let token = install_agent_identity(&plane, &client, None).await;
    let args = fabric.agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = ApiAgent::start_with(&plane, &Auth::Token(token), "node-a", &args);
    agent.wait_healthy(CONVERGE).await;
    let pid = agent.daemon().pid().expect("the agent's pid");

    let nodes = vec![
        ("node-a".to_owned(), "zone-a".to_owned()),
        ("node-b".to_owned(), "zone-b".to_owned()),
    ];
    let mut soak = Soak::start(client.clone(), &mut fabric, nodes, 3, CONVERGE).await;
    let mut clients: ClientLoop = soak.start_clients(plane.dir());
    clients.wait_for(AFTER_DRAIN, "the first requests").await;
    for _ in 0..churn::rounds() {
        soak.round(&mut clients, pid).await;
        assert!(
            !agent.daemon().exited(),
            "the agent exited:\n{}",
            agent.log()
        );
    }
    let report = soak.finish(clients);
    report.assert_sound("eBPF");
}
