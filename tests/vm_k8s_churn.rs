//! The churn soak (`support/k8s/churn.rs`) in IPVS mode inside the VM: `topoproxy run
//! --proxy-mode ipvs` in node-c1's namespace of a two-node world (`support/k8s/world.rs`),
//! against the real control plane `cargo xtask vm-test` starts on the host. Pods are
//! namespaces behind node-c1 and node-c2; the client loop runs in node-c1's namespace, where
//! the VIPs are bound on `kube-ipvs0`. A backend counts as drained once `ipvsadm -Ln` shows it
//! with weight 0 or not at all.
//!
//! The soak runs [`CI_ROUNDS`] rounds on both guest kernels (6.1 and 6.12: IPVS's drain and
//! conntrack behaviour differ between them); `TOPOPROXY_CHURN_ROUNDS` sets the rounds, and
//! the extended run (`cargo xtask test --extended`) runs [`churn::EXTENDED_ROUNDS`].

#[path = "support/agent_process.rs"]
mod agent_process;
#[path = "support/k8s/churn.rs"]
mod churn;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;
#[path = "support/traffic.rs"]
mod traffic;
#[path = "support/k8s/world.rs"]
mod world;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent_process::agent_bin;
use churn::{programmed_in, ClientLoop, Fabric, Programmed, Soak, AFTER_DRAIN};
use k8s_harness::objects::{create_namespace, create_node, NodeSpec};
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::DeleteParams;
use kube::{Api, Client};
use netns::{sh_in, IP};
use world::{k8s_dir, NodeProcess, World};

/// The agent's node and the other one, with their world indexes (the parity test's nodes
/// use 1 to 4, and both tests may share a control plane).
const AGENT_NODE: (&str, &str, u8) = ("node-c1", "churn-a", 5);
const OTHER_NODE: (&str, &str, u8) = ("node-c2", "churn-b", 6);
const CLUSTER_CIDRS: &str = "10.244.0.0/16,fd00:10:244::/48";
const IPVSADM: &str = "/usr/sbin/ipvsadm";
/// The agent's first sync under TCG (the parity test allows as much).
const AGENT_START: Duration = Duration::from_secs(180);
/// Rounds on each kernel without `TOPOPROXY_CHURN_ROUNDS`.
const CI_ROUNDS: usize = 3;

/// Rounds to run.
fn rounds_here() -> usize {
    if std::env::var_os("TOPOPROXY_CHURN_ROUNDS").is_some() || harness::extended() {
        return churn::rounds();
    }
    CI_ROUNDS
}

struct VmFabric {
    world: World,
    agent_netns: String,
}

impl Fabric for VmFabric {
    /// Pod `n` is `10.244.<node index>.(10 + n % 240)`: numbers come back only long after
    /// their pod is gone.
    fn add_pod(&mut self, node: &str, n: u32) -> (Ipv4Addr, PathBuf) {
        let number = u8::try_from(10 + n % 240).unwrap_or(10);
        let pod = self.world.add_pod(node, number);
        (
            pod.address,
            PathBuf::from(format!("/run/netns/{}", pod.netns)),
        )
    }

    fn remove_pod(&mut self, ip: Ipv4Addr) {
        self.world.remove_pod(ip);
    }

    fn programmed(&self) -> Programmed {
        programmed_in(&sh_in(&self.agent_netns, IPVSADM, &["-Ln"]), true)
    }

    fn client_command(&self, settings: &Path) -> Command {
        let mut command = Command::new(IP);
        command
            .args(["netns", "exec", &self.agent_netns])
            .arg(std::env::current_exe().expect("the test binary"))
            .args(churn::CLIENT_ARGS)
            .env(churn::CLIENT_ENV, settings);
        command
    }
}

/// The client loop: runs only when re-executed by [`VmFabric::client_command`].
#[test]
#[ignore = "helper process for the soak, started by it"]
fn churn_client_process() {
    if let Ok(settings) = std::env::var(churn::CLIENT_ENV) {
        churn::client_loop(Path::new(&settings));
    } else {
        harness::helper("churn_client_process");
    }
}

async fn create_nodes(client: &Client) {
    for (name, zone, index) in [AGENT_NODE, OTHER_NODE] {
        create_node(
            client,
            &NodeSpec::new(name, Some(zone), &format!("192.168.{index}.2")),
        )
        .await;
    }
}

/// Removes the soak's nodes and namespace, so a test sharing the control plane sees neither.
async fn remove_objects(client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    for (name, _, _) in [AGENT_NODE, OTHER_NODE] {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .delete(churn::NAMESPACE, &DeleteParams::default())
        .await;
}

async fn soak(client: Client, rounds: usize) -> churn::Report {
    let world = World::build(&[(AGENT_NODE.0, AGENT_NODE.2), (OTHER_NODE.0, OTHER_NODE.2)]);
    let agent_netns = world.node(AGENT_NODE.0).netns.clone();
    let mut fabric = VmFabric { world, agent_netns };
    create_nodes(&client).await;
    create_namespace(&client, churn::NAMESPACE).await;
    let kubeconfig = k8s_dir().join("kube-proxy.kubeconfig");
    let agent = NodeProcess::spawn(
        "topoproxy-churn",
        &fabric.agent_netns.clone(),
        &agent_bin(),
        &[
            "run",
            "--kubeconfig",
            kubeconfig.to_str().expect("UTF-8 path"),
            "--proxy-mode",
            "ipvs",
            "--hostname-override",
            AGENT_NODE.0,
            "--cluster-cidr",
            CLUSTER_CIDRS,
        ],
    );
    let pid = agent.pid();
    let nodes = [AGENT_NODE, OTHER_NODE]
        .map(|(name, zone, _)| (name.to_owned(), zone.to_owned()))
        .to_vec();
    let scratch = std::env::temp_dir().join(format!("topoproxy-churn-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("creating the scratch folder");
    let mut soak = Soak::start(client, &mut fabric, nodes, 3, AGENT_START).await;
    let mut clients: ClientLoop = soak.start_clients(&scratch);
    clients.wait_for(AFTER_DRAIN, "the first requests").await;
    for _ in 0..rounds {
        soak.round(&mut clients, pid).await;
        let alive = std::fs::metadata(format!("/proc/{pid}")).is_ok();
        assert!(alive, "the agent exited:\n{}", agent.log_tail(40));
    }
    let report = soak.finish(clients);
    let _ = std::fs::remove_dir_all(&scratch);
    drop(agent);
    report
}

#[tokio::test]
#[ignore = "needs the VM and a control plane on the host: cargo xtask vm-test"]
async fn rolling_updates_scaling_and_zone_moves_lose_no_request_in_ipvs_mode() {
    let rounds = rounds_here();
    let client = k8s_harness::client_for(&k8s_dir().join("admin.kubeconfig")).await;
    remove_objects(&client).await;
    // On its own task, so the objects are removed also when the soak panics.
    let outcome = tokio::spawn(soak(client.clone(), rounds)).await;
    remove_objects(&client).await;
    let report = match outcome {
        Ok(report) => report,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    };
    report.assert_sound("IPVS");
}
