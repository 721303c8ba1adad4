//! Cluster objects as a cluster without kubelets needs them, YAML applied to the apiserver,
//! and the cluster dumped as YAML.
//!
//! Nodes are created with zone/region labels, then made Ready with an InternalIP and CPU
//! through the status subresource (the hint allocator weighs zones by allocatable CPU). Pods
//! are created with a `nodeName` and their status patched (Running, pod IPs, Ready and
//! ContainersReady), so the real EndpointSlice controller writes slices and hints from them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::{json, Value};

/// The field manager of everything the harness writes.
const MANAGER: &str = "topoproxy-test";

/// The zone and region labels.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// A Node to create.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// InternalIP addresses (one per family).
    pub addresses: Vec<String>,
    /// Allocatable CPU (e.g. "4").
    pub cpu: String,
    /// `spec.podCIDRs` (one per family, IPv4 first), what kube-proxy's and topoproxy's
    /// `detectLocalMode: NodeCIDR` read; empty leaves the field unset.
    pub pod_cidrs: Vec<String>,
}

impl NodeSpec {
    pub fn new(name: &str, zone: Option<&str>, address: &str) -> Self {
        Self {
            name: name.to_owned(),
            zone: zone.map(str::to_owned),
            region: None,
            addresses: vec![address.to_owned()],
            cpu: "4".to_owned(),
            pod_cidrs: Vec::new(),
        }
    }
}

/// Creates the Node and patches it Ready.
pub async fn create_node(client: &Client, spec: &NodeSpec) {
    let mut labels = BTreeMap::from([("kubernetes.io/hostname".to_owned(), spec.name.clone())]);
    if let Some(zone) = &spec.zone {
        labels.insert(ZONE_LABEL.to_owned(), zone.clone());
    }
    if let Some(region) = &spec.region {
        labels.insert(REGION_LABEL.to_owned(), region.clone());
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": spec.name, "labels": labels},
    });
    if let Some(first) = spec.pod_cidrs.first() {
        node["spec"] = json!({"podCIDR": first, "podCIDRs": spec.pod_cidrs});
    }
    let node: Node = serde_json::from_value(node).expect("a Node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        // Tests sharing one control plane create the same Nodes: take it over, labels first.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // The pod CIDRs can be set once: the same values again are no change.
            let mut patch = json!({"metadata": {"labels": node.metadata.labels}});
            if let Some(pod_cidrs) = node.spec.as_ref().and_then(|s| s.pod_cidrs.as_ref()) {
                patch["spec"] = json!({"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs});
            }
            nodes
                .patch(&spec.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| panic!("relabelling node {}: {e}", spec.name));
        }
        Err(e) => panic!("creating node {}: {e}", spec.name),
    }
    set_node_ready(client, spec).await;
}

/// Patches the Node's status: Ready, its InternalIPs and CPU.
pub async fn set_node_ready(client: &Client, spec: &NodeSpec) {
    let nodes: Api<Node> = Api::all(client.clone());
    let addresses: Vec<Value> = spec
        .addresses
        .iter()
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .chain([json!({"type": "Hostname", "address": spec.name})])
        .collect();
    let resources = json!({"cpu": spec.cpu, "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {
        "addresses": addresses,
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "test node", "lastHeartbeatTime": now(), "lastTransitionTime": now(),
        }],
    }});
    nodes
        .patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patching node {} status: {e}", spec.name));
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Creates a namespace (no-op when it exists).
pub async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("a Namespace");
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// A Pod to create on a node.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// Pod IPs (one per family).
    pub ips: Vec<String>,
    /// Named container ports.
    pub ports: Vec<(String, u16)>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, node: &str, app: &str, ip: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            labels: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            ips: vec![ip.to_owned()],
            ports: vec![("http".to_owned(), 8080)],
        }
    }
}

/// Creates the Pod and patches its status Running with its IPs, Ready or not.
pub async fn create_pod(client: &Client, spec: &PodSpec, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &spec.namespace);
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|(name, port)| json!({"name": name, "containerPort": port}))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": spec.name, "labels": spec.labels},
        "spec": {
            "nodeName": spec.node,
            "terminationGracePeriodSeconds": 3600,
            "containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": ports}],
        },
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("creating pod {}/{}: {e}", spec.namespace, spec.name));
    set_pod_status(client, spec, ready).await;
}

/// Patches the Pod's status: Running, its IPs, and Ready/ContainersReady as asked.
pub async fn set_pod_status(client: &Client, spec: &PodSpec, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &spec.namespace);
    let flag = if ready { "True" } else { "False" };
    let ips: Vec<Value> = spec.ips.iter().map(|ip| json!({"ip": ip})).collect();
    let status = json!({"status": {
        "phase": "Running",
        "podIP": spec.ips.first(),
        "podIPs": ips,
        "hostIP": "127.0.0.1",
        "startTime": now(),
        "conditions": [
            {"type": "Ready", "status": flag, "lastTransitionTime": now()},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now()},
        ],
    }});
    pods.patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patching pod {}/{} status: {e}", spec.namespace, spec.name));
}

/// Deletes a Pod. With no kubelet, a Pod deleted with a grace period stays terminating (its
/// endpoint becomes serving + terminating); `grace_seconds: 0` removes it at once.
pub async fn delete_pod(client: &Client, namespace: &str, name: &str, grace_seconds: u32) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(grace_seconds),
        ..DeleteParams::default()
    };
    pods.delete(name, &params)
        .await
        .unwrap_or_else(|e| panic!("deleting pod {namespace}/{name}: {e}"));
}

/// The zones an endpoint's hints name (`hints.forZones`), empty without hints.
pub fn hinted_zones(endpoint: &k8s_openapi::api::discovery::v1::Endpoint) -> Vec<&str> {
    endpoint
        .hints
        .as_ref()
        .and_then(|h| h.for_zones.as_ref())
        .map(|z| z.iter().map(|z| z.name.as_str()).collect())
        .unwrap_or_default()
}

/// Server-side applies one object given as JSON (any kind the apiserver serves).
pub async fn apply(client: &Client, object: Value) {
    let shown = format!(
        "{} {}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    );
    if let Err(error) = apply_object(client, object, false).await {
        panic!("applying {shown}: {error}");
    }
}

/// Server-side applies `object` (with `dry_run`, the apiserver validates, admits and
/// authorizes it and persists nothing). Returns the apiserver's error text on failure.
pub async fn apply_object(client: &Client, object: Value, dry_run: bool) -> Result<(), String> {
    let api_version = object["apiVersion"].as_str().ok_or("no apiVersion")?;
    let kind = object["kind"].as_str().ok_or("no kind")?;
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("discovering {api_version} {kind}: {e}"))?;
    let object: DynamicObject =
        serde_json::from_value(object).map_err(|e| format!("not an object: {e}"))?;
    let name = object.metadata.name.clone().ok_or("no metadata.name")?;
    let api: Api<DynamicObject> = match capabilities.scope {
        kube::discovery::Scope::Namespaced => {
            let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply(MANAGER).force();
    params.dry_run = dry_run;
    api.patch(&name, &params, &Patch::Apply(&object))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Every document of a YAML stream (e.g. `kustomize build` output) as JSON.
pub fn yaml_documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| {
            let value: Value = serde::Deserialize::deserialize(doc).expect("a YAML document");
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Writes the cluster's Services, EndpointSlices and Nodes to `dir` as the YAML that
/// `kubectl get -o yaml` prints (the `--source` format of `topoproxy plan`).
pub async fn dump_cluster(client: &Client, dir: &Path) {
    std::fs::create_dir_all(dir).expect("creating the dump folder");
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let params = ListParams::default();
    let mut text = String::new();
    for service in services.list(&params).await.expect("listing services") {
        push_document(&mut text, &service);
    }
    for slice in slices.list(&params).await.expect("listing slices") {
        push_document(&mut text, &slice);
    }
    for node in nodes.list(&params).await.expect("listing nodes") {
        push_document(&mut text, &node);
    }
    std::fs::write(dir.join("cluster.yaml"), text).expect("writing the dump");
}

fn push_document<T: serde::Serialize>(text: &mut String, object: &T) {
    text.push_str("---\n");
    text.push_str(&serde_yaml::to_string(object).expect("serializing an object"));
}

/// Polls `condition` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The EndpointSlices of a Service.
pub async fn slices_of(client: &Client, namespace: &str, service: &str) -> Vec<EndpointSlice> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    slices
        .list(&params)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Whether every endpoint of the Service's slices carries a zone hint (the controller has
/// allocated hints), and how many endpoints there are.
pub async fn zone_hints(client: &Client, namespace: &str, service: &str) -> (usize, bool) {
    let slices = slices_of(client, namespace, service).await;
    let endpoints: Vec<_> = slices.iter().flat_map(|s| s.endpoints.iter()).collect();
    let hinted = !endpoints.is_empty()
        && endpoints.iter().all(|e| {
            e.hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|z| !z.is_empty())
        });
    (endpoints.len(), hinted)
}
