//! The agent end to end where the real apiserver cannot serve the case: the real
//! `kube::Client` and kube-runtime watchers against the in-repo fake API server
//! (`tests/fake-apiserver`), the real sync loop and HTTP endpoints, and the in-memory dataplane.
//!
//! What the agent does against the real control plane (changes, hints from the real
//! controller, apiserver restarts and HA failover, compaction and 410 re-lists, paged lists,
//! its own Node's changes) is in `k8s_agent.rs`. Here remain objects the real apiserver refuses
//! to store (invalid addresses and ports: the agent must still skip them alone when another
//! writer or an older server lets them through) and the YAML directory source.

#[path = "support/http.rs"]
mod http;

use std::net::SocketAddr;
use std::time::Duration;

use fake_apiserver::{FakeApiServer, Kind};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use topoproxy::agent::{client_from_config, Agent, ClusterSource};
use topoproxy::config::{LogFormat, ProxyMode, RunSettings};
use topoproxy::dataplane::memory::{MemoryDataplane, MemoryHandle};
use topoproxy::dataplane::{programmed_table, ProgrammedTable, TierScope};
use topoproxy::planner::{plan, PlanConfig};
use topoproxy::source::convert;
use topoproxy::state::AgentState;
use topoproxy::store::Store;

const NODE: &str = "node-a1";

fn node(name: &str, zone: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
    }))
    .expect("node")
}

fn service(name: &str, cluster_ip: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
        }
    }))
    .expect("service")
}

/// `(address, node, zone, zone hint)` per endpoint.
fn slice(
    service: &str,
    name: &str,
    endpoints: &[(&str, &str, &str, Option<&str>)],
) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, node, zone, hint)| {
            let mut endpoint = json!({
                "addresses": [address],
                "conditions": {"ready": true},
                "nodeName": node,
                "zone": zone,
            });
            if let Some(hint) = hint {
                endpoint["hints"] = json!({"forZones": [{"name": hint}]});
            }
            endpoint
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .expect("slice")
}

/// The cluster as the agent should see it, for computing the expected table.
#[derive(Default, Clone)]
struct Cluster {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
}

impl Cluster {
    fn expected(&self) -> ProgrammedTable {
        let mut store = Store::new();
        let mut warnings = Vec::new();
        for s in &self.services {
            if let Some(s) = convert::service_from_api(s, None, &mut warnings) {
                store.upsert_service(s);
            }
        }
        for s in &self.slices {
            if let Some(s) = convert::slice_from_api(s, None, &mut warnings) {
                store.upsert_slice(s);
            }
        }
        for n in &self.nodes {
            if let Some(n) = convert::node_from_api(n, None, &mut warnings) {
                store.upsert_node(n);
            }
        }
        let node = store.node(NODE).expect("this node").clone();
        programmed_table(
            &plan(&store, &node, &PlanConfig::default()),
            TierScope::Active,
            None,
        )
    }

    fn publish(&self, server: &FakeApiServer) {
        for n in &self.nodes {
            server.apply_node(n.clone());
        }
        for s in &self.services {
            server.apply_service(s.clone());
        }
        for s in &self.slices {
            server.apply_endpoint_slice(s.clone());
        }
    }
}

fn three_zone_cluster(hinted: bool) -> Cluster {
    let hint = |zone: &'static str| hinted.then_some(zone);
    Cluster {
        nodes: vec![
            node(NODE, "zone-a", "192.168.0.11"),
            node("node-b1", "zone-b", "192.168.0.21"),
        ],
        services: vec![
            service(
                "web",
                "10.96.0.20",
                json!({"service.kubernetes.io/topology-mode": "Auto"}),
            ),
            service("api", "10.96.0.30", json!({})),
        ],
        slices: vec![
            slice(
                "web",
                "web-1",
                &[
                    ("10.244.1.2", NODE, "zone-a", hint("zone-a")),
                    ("10.244.2.2", "node-b1", "zone-b", hint("zone-b")),
                    ("10.244.3.2", "node-c1", "zone-c", hint("zone-c")),
                ],
            ),
            slice("api", "api-1", &[("10.244.1.9", NODE, "zone-a", None)]),
        ],
    }
}

struct Running {
    /// Kept alive for the agent's watches.
    _server: FakeApiServer,
    dataplane: MemoryHandle,
    state: std::sync::Arc<AgentState>,
    healthz_address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn settings() -> RunSettings {
    RunSettings {
        kubeconfig: None,
        node_name: NODE.to_owned(),
        source: None,
        proxy_mode: ProxyMode::DryRun,
        min_sync_period: Duration::ZERO,
        sync_period: Duration::from_secs(30),
        healthz_bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics_bind_address: SocketAddr::from(([127, 0, 0, 1], 0)),
        plan: PlanConfig::default(),
        source_poll_period: Duration::from_secs(1),
        log_format: LogFormat::Text,
        ipvs: Default::default(),
        ebpf: Default::default(),
        north_south: Default::default(),
        conntrack: Default::default(),
        oom_score_adj: None,
        pod_cidrs_from_node: false,
    }
}

impl Running {
    async fn start(server: FakeApiServer) -> Self {
        let (dataplane, handle) = MemoryDataplane::new("memory");
        let agent = Agent::start(settings(), dataplane)
            .await
            .expect("agent starts");
        let state = agent.state();
        let healthz_address = agent.healthz_address().expect("healthz address");
        let client = client_from_config(server.client_config()).expect("client");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            agent
                .run(ClusterSource::Kube(client), async {
                    let _ = stopped.await;
                })
                .await
                .expect("agent runs");
        });
        Self {
            _server: server,
            dataplane: handle,
            state,
            healthz_address,
            stop: Some(stop),
            task,
        }
    }

    fn metric(&self, selector: &str) -> f64 {
        let text = self.state.metrics.encode().expect("metrics encode");
        http::metric_sum(&text, selector).unwrap_or(0.0)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("agent task");
    }
}

#[tokio::test]
async fn bad_objects_never_disturb_other_services() {
    let server = FakeApiServer::start().await;
    let cluster = three_zone_cluster(true);
    cluster.publish(&server);
    let raw = |kind, value: Value| {
        server
            .apply_raw(kind, value)
            .expect("the fake accepts raw objects");
    };
    raw(
        Kind::Service,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "bad-ip", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.999", "ports": [{"name": "http", "port": 80}]}}),
    );
    raw(
        Kind::Service,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "absurd-port", "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.40", "ports": [{"name": "http", "port": 70000}]}}),
    );
    raw(
        Kind::EndpointSlice,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "orphan", "namespace": "default"},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.9.9"]}],
               "ports": [{"name": "http", "port": 8080}]}),
    );
    raw(
        Kind::EndpointSlice,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-bad", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["not-an-ip"]}, {"addresses": ["fd00::1"]}],
               "ports": [{"name": "http", "port": 8080}]}),
    );
    // One Service with 5,000 endpoints in a single slice.
    let huge: Vec<Value> = (0..5000u32)
        .map(|i| {
            json!({"addresses": [format!("10.250.{}.{}", i / 250, i % 250 + 1)],
                        "nodeName": "node-b1", "zone": "zone-b"})
        })
        .collect();
    server.apply_service(service("huge", "10.96.0.50", json!({})));
    raw(
        Kind::EndpointSlice,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "huge-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "huge"}},
               "addressType": "IPv4", "endpoints": huge,
               "ports": [{"name": "http", "port": 8080}]}),
    );
    let agent = Running::start(server).await;
    let want = cluster.expected();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let table = agent.dataplane.table();
        let good = want.iter().all(|(k, v)| table.get(k) == Some(v));
        let huge = table
            .iter()
            .find(|(k, _)| k.address.to_string() == "10.96.0.50")
            .map_or(0, |(_, s)| s.destinations.len());
        if good && huge == 5000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "good services programmed: {good}, huge has {huge}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let table = agent.dataplane.table();
    assert!(
        table.keys().all(
            |k| k.address.to_string() != "10.96.0.40" && k.address.to_string() != "10.96.0.999"
        ),
        "nothing of the bad objects is programmed"
    );
    assert!(agent.metric("topoproxy_skipped_objects_total{kind=\"Service\"}") >= 2.0);
    assert!(agent.metric("topoproxy_skipped_objects_total{kind=\"EndpointSlice\"}") >= 2.0);
    let (status, _) = http::get_async(agent.healthz_address, "/healthz")
        .await
        .expect("/healthz answers");
    assert_eq!(status, 200);
    agent.stop().await;
}

#[tokio::test]
async fn a_yaml_directory_source_is_re_read_when_it_changes() {
    let dir = std::env::temp_dir().join(format!("topoproxy-e2e-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let write = |name: &str, objects: &[Value]| {
        let text: Vec<String> = objects
            .iter()
            .map(|o| serde_yaml::to_string(o).expect("yaml"))
            .collect();
        std::fs::write(dir.join(name), text.join("---\n")).expect("write yaml");
    };
    let mut cluster = three_zone_cluster(true);
    let as_values = |cluster: &Cluster| -> Vec<Value> {
        let mut values = Vec::new();
        for n in &cluster.nodes {
            let mut v = serde_json::to_value(n).expect("node json");
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Node");
            values.push(v);
        }
        for s in &cluster.services {
            let mut v = serde_json::to_value(s).expect("service json");
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Service");
            values.push(v);
        }
        for s in &cluster.slices {
            let mut v = serde_json::to_value(s).expect("slice json");
            v["apiVersion"] = json!("discovery.k8s.io/v1");
            v["kind"] = json!("EndpointSlice");
            values.push(v);
        }
        values
    };
    write("cluster.yaml", &as_values(&cluster));

    let (dataplane, handle) = MemoryDataplane::new("memory");
    let mut settings = settings();
    settings.source_poll_period = Duration::from_millis(50);
    let agent = Agent::start(settings, dataplane)
        .await
        .expect("agent starts");
    let (stop, stopped) = oneshot::channel::<()>();
    let state = agent.state();
    let source = ClusterSource::Directory(dir.clone());
    let task = tokio::spawn(agent.run(source, async {
        let _ = stopped.await;
    }));
    let wait_for = |want: ProgrammedTable| {
        let handle = handle.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while handle.table() != want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "directory change not applied"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(cluster.expected()).await;

    // A broken file keeps the last good state; fixing it applies the change.
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: Service\nmetadata: [unclosed\n",
    )
    .expect("write");
    let refused = "topoproxy_watch_errors_total{resource=\"directory\"} 1";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !state
        .metrics
        .encode()
        .is_ok_and(|text| text.lines().any(|line| line == refused))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broken file was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(handle.table(), cluster.expected());
    std::fs::remove_file(dir.join("broken.yaml")).expect("remove");
    cluster
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("api"));
    write("cluster.yaml", &as_values(&cluster));
    wait_for(cluster.expected()).await;

    let _ = stop.send(());
    task.await.expect("agent task").expect("agent runs");
    let _ = std::fs::remove_dir_all(&dir);
}
