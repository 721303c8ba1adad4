//! End-to-end sync benchmark against a real kube-apiserver (etcd on tmpfs, built by
//! `cargo xtask k8s-setup`): the agent as its own process (`topoproxy run --proxy-mode dry-run`,
//! release build), authenticated as `system:kube-proxy` (kube-proxy's own RBAC).
//!
//! The cluster: `TOPOPROXY_BENCH_SERVICES` Services (default 10,000) × 10 endpoints over
//! 3 zones × 10 nodes with zone hints, every tenth with a second (UDP) port; the slices are
//! created directly through the API (no controller manager: the bench measures the agent, not
//! the controller). Measured:
//!
//! 1. start → the whole table programmed (`topoproxy_virtual_servers` reaches its size), and
//!    start → each initial list complete (from the agent's log);
//! 2. the agent's VmRSS and VmHWM after the initial sync;
//! 3. one endpoint change: the API write (an endpoint's address replaced) → the dataplane
//!    apply that carries it (`topoproxy_dataplane_operations_total` moves), p50/p99 over
//!    `TOPOPROXY_BENCH_EVENTS` changes (default 200).
//!
//! `TOPOPROXY_BENCH_EXTRA_NODES` more Nodes (default 0) spread over the zones, with no
//! endpoints: what the agent's metadata-only watch of every Node costs in memory (e.g. 4,970
//! for a 5,000-node cluster).
//!
//! `cargo xtask bench-sync --real-apiserver` runs it beside the fake-apiserver measurement.
//! Under `cargo test --benches` it is skipped (it needs minutes and the real binaries).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_harness::objects::{create_node, NodeSpec};
use k8s_harness::{free_port, ControlPlane, Daemon, Isolation, KubeconfigUser, Options};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::PostParams;
use kube::Api;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const ENDPOINTS: usize = 10;
const ZONES: usize = 3;
const NODES_PER_ZONE: usize = 10;
const NODE: &str = "node-a-0";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn zone(z: usize) -> String {
    format!("zone-{}", (b'a' + z as u8) as char)
}

/// Endpoint addresses: 10.100.0.0/14 for the initial ones, 10.250.0.0/16 for the address
/// the `generation`-th change gives endpoint 0 (one distinct address per change).
fn endpoint_address(service: usize, endpoint: usize, generation: usize) -> String {
    if generation > 0 {
        return format!("10.250.{}.{}", (generation >> 8) & 255, generation & 255);
    }
    let n = service * ENDPOINTS + endpoint;
    format!("10.{}.{}.{}", 100 + (n >> 16), (n >> 8) & 255, n & 255)
}

fn service_object(i: usize) -> Value {
    let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP"})];
    if i.is_multiple_of(10) {
        ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench",
                     "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
        "spec": {"ports": ports},
    })
}

fn slice_object(i: usize, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let z = e % ZONES;
            json!({
                "addresses": [endpoint_address(i, e, if e == 0 { generation } else { 0 })],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}-{}", &zone(z)[5..], e % NODES_PER_ZONE),
                "zone": zone(z),
                "hints": {"forZones": [{"name": zone(z)}]},
            })
        })
        .collect();
    let mut ports = vec![json!({"name": "http", "port": 8080, "protocol": "TCP"})];
    if i.is_multiple_of(10) {
        ports.push(json!({"name": "dns", "port": 5353, "protocol": "UDP"}));
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench", "labels": {
            "kubernetes.io/service-name": format!("svc-{i}"),
            "endpointslice.kubernetes.io/managed-by": "topoproxy-bench",
        }},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

async fn get(address: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.ok()?;
    let reply = String::from_utf8_lossy(&reply);
    reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

async fn metric(address: SocketAddr, name: &str) -> Option<f64> {
    let body = get(address, "/metrics").await?;
    let mut sum = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() == Some(name) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// `slice` with the stored object's resourceVersion (a replace must name it). Read before the
/// write is timed.
async fn with_resource_version(
    slices: &Api<EndpointSlice>,
    name: &str,
    mut slice: EndpointSlice,
) -> EndpointSlice {
    let stored = slices.get(name).await.expect("reading a slice");
    slice.metadata.resource_version = stored.metadata.resource_version;
    slice
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Seconds after `start` at which the agent logged each "initial list complete".
fn list_times(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("initial list complete"))
        .filter_map(|l| {
            let resource = l.split("resource=\"").nth(1)?.split('"').next()?;
            Some(format!("{resource} at {}", l.split_whitespace().next()?))
        })
        .collect()
}

async fn run(services: usize, events: usize, extra_nodes: usize) {
    let plane = ControlPlane::start(Options {
        controller_manager: false,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    for z in 0..ZONES {
        for n in 0..NODES_PER_ZONE {
            let name = format!("node-{}-{n}", &zone(z)[5..]);
            let address = format!("10.0.{z}.{}", n + 1);
            create_node(&client, &NodeSpec::new(&name, Some(&zone(z)), &address)).await;
        }
    }
    let nodes_created = Instant::now();
    futures::stream::iter(0..extra_nodes)
        .map(|i| {
            let client = client.clone();
            async move {
                let z = i % ZONES;
                let name = format!("extra-{}-{i}", &zone(z)[5..]);
                let address = format!("10.{}.{}.{}", 100 + z, i / 250, i % 250 + 1);
                create_node(&client, &NodeSpec::new(&name, Some(&zone(z)), &address)).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    if extra_nodes > 0 {
        println!(
            "  {} Nodes in the cluster ({extra_nodes} without endpoints), created in {:.1} s",
            extra_nodes + ZONES * NODES_PER_ZONE,
            nodes_created.elapsed().as_secs_f64()
        );
    }
    k8s_harness::objects::create_namespace(&client, "bench").await;
    let created = Instant::now();
    futures::stream::iter(0..services)
        .map(|i| {
            let client = client.clone();
            async move {
                // Typed creates: one request each (server-side apply would add a discovery
                // request per object).
                let services: Api<Service> = Api::namespaced(client.clone(), "bench");
                let slices: Api<EndpointSlice> = Api::namespaced(client, "bench");
                let service = serde_json::from_value(service_object(i)).expect("a Service");
                let slice = serde_json::from_value(slice_object(i, 0)).expect("a slice");
                services
                    .create(&PostParams::default(), &service)
                    .await
                    .expect("creating a Service");
                slices
                    .create(&PostParams::default(), &slice)
                    .await
                    .expect("creating a slice");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    println!(
        "created {services} Services and their slices through the API in {:.1} s",
        created.elapsed().as_secs_f64()
    );

    let kubeconfig = plane.kubeconfig(
        "bench-agent.kubeconfig",
        &KubeconfigUser::Cert(plane.pki().kube_proxy.clone()),
    );
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_topoproxy"));
    cmd.arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--hostname-override", NODE, "--proxy-mode", "dry-run"])
        .args(["--metrics-bind-address", &metrics.to_string()])
        .args(["--healthz-bind-address", &healthz.to_string()])
        .args(["--min-sync-period", "0", "--log-format", "text"]);
    let log = plane.dir().join("bench-agent.log");
    let expected = services + services.div_ceil(10) + 1;
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let agent = Daemon::spawn("topoproxy", cmd, &log, &Isolation::default());
    loop {
        if metric(metrics, "topoproxy_virtual_servers")
            .await
            .is_some_and(|v| v as usize >= expected)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the agent did not program {expected} virtual servers\n{}",
            agent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let synced = started.elapsed();
    let pid = agent.pid().unwrap_or_default();
    println!(
        "real apiserver, {services} Services × {ENDPOINTS}: agent start → whole table ({expected} virtual servers) {:.2} s",
        synced.as_secs_f64()
    );
    println!(
        "  agent started at {}; {}",
        k8s_openapi::jiff::Timestamp::try_from(started_wall)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        list_times(&agent.log()).join(", ")
    );
    // RSS after the initial sync, once the allocator has settled (measured, not slept on:
    // the next phase takes seconds anyway).
    let rss_synced = status_field(pid, "VmRSS:");

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "bench");
    let mut latencies = Vec::with_capacity(events);
    'events: for event in 0..events {
        let before = metric(metrics, "topoproxy_dataplane_operations_total")
            .await
            .unwrap_or(0.0);
        let service = (event * 7919) % services;
        let slice: EndpointSlice =
            serde_json::from_value(slice_object(service, event + 1)).expect("a slice");
        let name = format!("svc-{service}-1");
        let slice = with_resource_version(&slices, &name, slice).await;
        let written = Instant::now();
        slices
            .replace(&name, &PostParams::default(), &slice)
            .await
            .expect("changing a slice");
        loop {
            let now = metric(metrics, "topoproxy_dataplane_operations_total")
                .await
                .unwrap_or(0.0);
            if now > before {
                break;
            }
            if written.elapsed() > Duration::from_secs(60) {
                let text = get(metrics, "/metrics").await.unwrap_or_default();
                let operations: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains("operations_total") || l.contains("syncs_total"))
                    .collect();
                println!(
                    "  NOT APPLIED: endpoint change {event} (svc-{service}) did not reach the \
                     dataplane within 60 s (operations before: {before})\n  {}\n--- agent ---\n{}",
                    operations.join("\n  "),
                    agent.log_tail(10)
                );
                let plan = get(metrics, "/plan").await.unwrap_or_default();
                let address = endpoint_address(service, 0, event + 1);
                println!(
                    "  /plan holds the new address {address}: {}",
                    plan.contains(&format!("{address}:"))
                );
                break 'events;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(written.elapsed());
    }
    latencies.sort();
    assert_eq!(
        latencies.len(),
        events,
        "every endpoint change reached the dataplane"
    );
    println!(
        "  one endpoint change, API write → dataplane apply ({events} changes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "  agent memory: VmRSS {rss_synced} after the initial sync, {} after the changes; VmHWM {}",
        status_field(pid, "VmRSS:"),
        status_field(pid, "VmHWM:")
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "real_apiserver: skipped under cargo test (cargo xtask bench-sync --real-apiserver)"
        );
        return;
    }
    let services = env_usize("TOPOPROXY_BENCH_SERVICES", 10_000);
    let events = env_usize("TOPOPROXY_BENCH_EVENTS", 200);
    let extra_nodes = env_usize("TOPOPROXY_BENCH_EXTRA_NODES", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(run(services, events, extra_nodes));
}
