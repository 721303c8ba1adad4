//! The pre-flight's findings from objects, without a cluster.

use super::*;
use serde_json::json;

fn config_map(config: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "data": {CONFIG_KEY: config},
    }))
    .expect("a ConfigMap")
}

fn daemon_set(command: &[&str]) -> DaemonSet {
    serde_json::from_value(json!({
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "kube-proxy"}},
            "template": {"spec": {"containers": [{"name": "kube-proxy", "command": command}]}},
        },
    }))
    .expect("a DaemonSet")
}

fn service(name: &str, spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
    .expect("a Service")
}

const IPVS: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\nclusterCIDR: 10.244.0.0/16\n";

#[test]
fn a_plain_ipvs_cluster_is_safe() {
    let inputs = Inputs {
        config_map: Some(config_map(IPVS)),
        daemon_set: Some(daemon_set(&[
            "/usr/local/bin/kube-proxy",
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)",
            "--v=2",
        ])),
        services: vec![service("web", json!({"clusterIPs": ["10.96.0.5"]}))],
        nodes: Vec::new(),
    };
    let findings = check(&inputs);
    assert!(safe(&findings), "{}", render(&findings));
    assert!(render(&findings).ends_with("verdict: safe to cut over (no blocker)\n"));
}

#[test]
fn a_refused_field_or_an_unknown_flag_blocks() {
    let inputs = Inputs {
        config_map: Some(config_map(&format!("{IPVS}portRange: 30000-30100\n"))),
        daemon_set: Some(daemon_set(&[
            "kube-proxy",
            "--masquerade-bit=14",
            "--cluster-cidr=10.244.0.0/16",
        ])),
        ..Inputs::default()
    };
    let findings = check(&inputs);
    assert!(!safe(&findings));
    let blockers: Vec<&str> = findings
        .iter()
        .filter(|f| f.severity == Severity::Blocker)
        .map(|f| f.item.as_str())
        .collect();
    assert_eq!(blockers, vec!["portRange", "--masquerade-bit"]);
    assert!(render(&findings).contains("verdict: NOT safe"));
}

#[test]
fn deviations_are_listed_per_service() {
    let inputs = Inputs {
        config_map: Some(config_map(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n",
        )),
        services: vec![
            service("dns", json!({"clusterIPs": ["10.96.0.10"]})),
            service("lb", json!({"clusterIPs": ["10.96.0.11"], "externalTrafficPolicy": "Local", "externalIPs": ["10.96.0.10"]})),
        ],
        ..Inputs::default()
    };
    let findings = check(&inputs);
    assert!(safe(&findings), "{}", render(&findings));
    let changes: Vec<String> = findings
        .iter()
        .filter(|f| f.severity == Severity::Change)
        .map(|f| format!("{}: {}", f.item, f.detail))
        .collect();
    assert!(
        changes.iter().any(|c| c.starts_with("mode: \"iptables\"")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.starts_with("clusterCIDR: unset")),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.contains("default/lb") && c.contains("Local traffic policy")),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c.contains("externalIP 10.96.0.10 is Service default/dns's ClusterIP")),
        "{changes:?}"
    );
}
