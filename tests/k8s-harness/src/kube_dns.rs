//! CoreDNS as a cluster's `kube-system/kube-dns`, deployed the way a seed or a kubeadm
//! cluster does (ServiceAccount, RBAC for the `kubernetes` plugin, a Corefile ConfigMap, a
//! Deployment, the `kube-dns` Service), from the CoreDNS image `cargo xtask k8s-setup` builds
//! (`tests/k8s/images/coredns`). One replica per zone (a required anti-affinity on the zone
//! label), and the Service's `trafficDistribution: PreferClose`, so each zone's pods are
//! answered by their own zone's CoreDNS.
//!
//! The Corefile's `chaos` plugin answers `CH TXT hostname.bind` with the answering pod's name
//! (its hostname) and `log` writes every query to its pod's log: a test can tell which replica
//! answered.

use serde_json::{json, Value};

/// The CoreDNS image (`tests/k8s/images/coredns`).
pub const COREDNS_IMAGE: &str = "topoproxy.test/coredns:1";
/// The `kube-dns` Service's ClusterIP, the tenth of the Service range as kubeadm picks it.
pub const KUBE_DNS_IP: &str = "10.96.0.10";
/// The CoreDNS pods' label, kubeadm's.
pub const KUBE_DNS_SELECTOR: &str = "k8s-app=kube-dns";
/// The port CoreDNS listens on in its pod (above 1024: it runs as nobody without
/// capabilities), the Service's target port for its port 53.
const DNS_PORT: u16 = 8053;

const COREFILE: &str = ".:8053 {
    errors
    health :8080
    ready :8181
    log
    chaos
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
}
";

/// Every object of kube-dns, in the order to apply them.
pub fn kube_dns_objects() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
        }),
        cluster_role(),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": COREFILE},
        }),
        deployment(),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                "selector": {"k8s-app": "kube-dns"},
                "clusterIP": KUBE_DNS_IP,
                "trafficDistribution": "PreferClose",
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"},
                ],
            },
        }),
    ]
}

/// What the `kubernetes` plugin reads: kubeadm's `system:coredns`.
fn cluster_role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "system:coredns"},
        "rules": [
            {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ],
    })
}

fn deployment() -> Value {
    let labels = json!({"k8s-app": "kube-dns"});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "coredns",
                    "terminationGracePeriodSeconds": 0,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": labels},
                        "topologyKey": "topology.kubernetes.io/zone",
                    }]}},
                    "containers": [{
                        "name": "coredns",
                        "image": COREDNS_IMAGE,
                        "imagePullPolicy": "Never",
                        "args": ["-conf", "/etc/coredns/Corefile"],
                        "ports": [
                            {"name": "dns", "containerPort": DNS_PORT, "protocol": "UDP"},
                            {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
                        ],
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}],
                        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 5},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                },
            },
        },
    })
}
