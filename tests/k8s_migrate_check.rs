//! Migrating from kube-proxy against a real control plane (`k8s-harness`: etcd and
//! kube-apiserver from `cargo xtask k8s-setup`): `topoproxy migrate-check` with kubeadm's
//! kube-proxy ConfigMap and DaemonSet installed (the report and the exit status as an operator
//! gets them, before and after the blocker is fixed), and `detect-local-mode NodeCIDR` taking
//! the pod CIDRs from the Node.

use std::process::Command;
use std::time::Duration;

use k8s_harness::objects::{apply, create_node, eventually, NodeSpec};
use k8s_harness::{ControlPlane, Daemon, Isolation, Options};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

/// One control plane at a time: the machine's cores are shared.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

const CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
mode: ipvs\nclusterCIDR: 10.244.0.0/16\nclientConnection:\n  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n";

async fn install_kube_proxy(client: &kube::Client, config: &str) {
    apply(
        client,
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
            "data": {"config.conf": config},
        }),
    )
    .await;
}

fn migrate_check(plane: &ControlPlane) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_topoproxy"))
        .args(["migrate-check", "--kubeconfig"])
        .arg(plane.admin_kubeconfig())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running topoproxy migrate-check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    (
        output.status.code(),
        format!("{}{stderr}", String::from_utf8_lossy(&output.stdout)),
    )
}

/// A control plane without the controller manager, and its Node `node-a1` in zone-a.
async fn plane_with_a_node() -> (ControlPlane, Client) {
    let plane = ControlPlane::start(Options {
        controller_manager: false,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    create_node(
        &client,
        &NodeSpec::new("node-a1", Some("zone-a"), "10.0.1.1"),
    )
    .await;
    (plane, client)
}

#[tokio::test]
async fn migrate_check_reads_the_cluster_and_says_whether_to_cut_over() {
    let _serial = serial().await;
    let (plane, client) = plane_with_a_node().await;
    install_kube_proxy(&client, &format!("{CONFIG}portRange: 30000-30100\n")).await;
    apply(
        &client,
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "kube-proxy", "namespace": "kube-system"},
            "spec": {
                "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
                "template": {
                    "metadata": {"labels": {"k8s-app": "kube-proxy"}},
                    "spec": {"containers": [{
                        "name": "kube-proxy", "image": "registry.k8s.io/kube-proxy:v1.36.3",
                        "command": ["/usr/local/bin/kube-proxy",
                                    "--config=/var/lib/kube-proxy/config.conf",
                                    "--hostname-override=$(NODE_NAME)"],
                    }]},
                },
            },
        }),
    )
    .await;
    apply(
        &client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "TCP"}]},
        }),
    )
    .await;

    let (code, report) = migrate_check(&plane);
    assert_eq!(code, Some(3), "{report}");
    assert!(
        report.contains("BLOCKER portRange: \"30000-30100\""),
        "{report}"
    );
    assert!(
        report.contains("CHANGE  Service default/web: Local traffic policy"),
        "{report}"
    );
    assert!(report.contains("INFO    nodes: 1 Node(s)"), "{report}");
    assert!(report.contains("verdict: NOT safe to cut over"), "{report}");

    install_kube_proxy(&client, CONFIG).await;
    let (code, report) = migrate_check(&plane);
    assert_eq!(code, Some(0), "{report}");
    assert!(!report.contains("BLOCKER"), "{report}");
    assert!(report.contains("verdict: safe to cut over"), "{report}");
}

/// `detect-local-mode NodeCIDR` (here from kube-proxy's own file): the agent waits for its
/// Node's `spec.podCIDRs` and takes them as the pod CIDRs.
#[tokio::test]
async fn node_cidr_mode_waits_for_the_nodes_pod_cidrs() {
    let _serial = serial().await;
    let (plane, client) = plane_with_a_node().await;
    let config = plane.dir().join("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: ipvs\nclusterCIDR: 10.99.0.0/16\ndetectLocalMode: NodeCIDR\n",
    )
    .expect("writing the kube-proxy configuration");
    let mut command = Command::new(env!("CARGO_BIN_EXE_topoproxy"));
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--proxy-mode", "dry-run", "--hostname-override", "node-a1"])
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args(["--healthz-bind-address", "127.0.0.1:0"])
        .args(["--metrics-bind-address", "127.0.0.1:0"])
        .env("RUST_LOG", "info");
    let log = plane.dir().join("agent.log");
    let mut agent = Daemon::spawn("topoproxy", command, &log, &Isolation::default());
    eventually(
        "the agent waits for the pod CIDRs",
        Duration::from_secs(60),
        || {
            let text = agent.log();
            async move {
                text.contains("waiting for the Node's spec.podCIDRs")
                    .then_some(())
            }
        },
    )
    .await;
    assert!(!agent.exited(), "{}", agent.log());
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            "node-a1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"podCIDR": "10.244.7.0/24",
                                          "podCIDRs": ["10.244.7.0/24"]}})),
        )
        .await
        .expect("setting the Node's pod CIDRs");
    let line = eventually(
        "the agent takes the Node's pod CIDRs",
        Duration::from_secs(60),
        || {
            let text = agent.log();
            async move {
                text.lines()
                    .find(|l| l.contains("traffic from outside these pod CIDRs is masqueraded"))
                    .map(str::to_owned)
            }
        },
    )
    .await;
    assert!(line.contains("10.244.7.0/24"), "{line}");
    assert!(
        !line.contains("10.99.0.0/16"),
        "clusterCIDR is not used: {line}"
    );
    eventually("the agent runs on", Duration::from_secs(60), || {
        let text = agent.log();
        async move { text.contains("topoproxy running").then_some(()) }
    })
    .await;
    agent.kill();
}
