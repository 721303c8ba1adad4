//! `topoproxy migrate-check` against a real control plane (`k8s-harness`: etcd and
//! kube-apiserver from `cargo xtask k8s-setup`) holding kubeadm's kube-proxy ConfigMap and
//! DaemonSet: the report and the exit status as an operator gets them, before and after the
//! blocker is fixed.

use std::process::Command;

use k8s_harness::objects::{apply, create_node, NodeSpec};
use k8s_harness::{ControlPlane, Options};
use serde_json::json;

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

#[tokio::test]
async fn migrate_check_reads_the_cluster_and_says_whether_to_cut_over() {
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
