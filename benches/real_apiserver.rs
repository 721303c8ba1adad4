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
//!    `TOPOPROXY_BENCH_EVENTS` changes (default 200), and where each change's time went: the
//!    agent's sync phases (`topoproxy_sync_phase_duration_seconds{phase}`, read before and
//!    after each change) and the rest (the API server and the watch delivering the event, the
//!    bench's polling), for all changes and for the slowest 1 %;
//! 4. kube-proxy v1.36 in nftables mode against the same API server once the agent is stopped
//!    (`TOPOPROXY_BENCH_KUBE_PROXY=0` skips it): when its informers were synced (its log's
//!    "Caches are synced" for the Services and EndpointSlices), when its first sync had
//!    programmed the rules (`kubeproxy_sync_proxy_rules_last_timestamp_seconds` set), and its
//!    VmRSS. kube-proxy writes nftables rules and sysctls, so it is started only when this
//!    process has a network namespace of its own (not init's, and no device but loopback):
//!    run the bench under `unshare -mn`, as `cargo xtask bench-sync --real-apiserver` does.
//!
//! `TOPOPROXY_BENCH_AGENT` names another agent binary to measure (say, a build of `main` for
//! an A/B comparison); the default is this build's `topoproxy`.
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
    sum_of(&get(address, "/metrics").await?, name)
}

/// The sum of every series of `name` in a metrics page.
fn sum_of(body: &str, name: &str) -> Option<f64> {
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

/// The agent's sync phases (`topoproxy_sync_phase_duration_seconds{phase}`), in sync order.
const PHASES: [&str; 6] = ["wait", "plan", "diff", "apply", "finish", "post_sync"];
/// The first phases: from the event reaching the sync loop to the apply the bench waits for.
const PHASES_TO_APPLY: usize = 4;

/// Each phase's running total of seconds in a metrics page (0 where the agent has none).
fn phase_sums(body: &str) -> [f64; PHASES.len()] {
    let mut sums = [0.0; PHASES.len()];
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("topoproxy_sync_phase_duration_seconds_sum{phase=\"")
        else {
            continue;
        };
        let Some((phase, value)) = rest.split_once("\"} ") else {
            continue;
        };
        if let Some(index) = PHASES.iter().position(|known| *known == phase) {
            sums[index] = value.trim().parse().unwrap_or(0.0);
        }
    }
    sums
}

/// Where the time of each change went: `latencies` in the order of the changes, `sums` the
/// phase totals read before each change and once after the last.
fn print_breakdown(latencies: &[Duration], sums: &[[f64; PHASES.len()]]) {
    if sums
        .last()
        .is_none_or(|last| last.iter().all(|total| *total == 0.0))
    {
        println!("  the agent reports no sync phases (a binary without topoproxy_sync_phase_duration_seconds)");
        return;
    }
    let phases: Vec<[f64; PHASES.len()]> = sums
        .windows(2)
        .map(|pair| std::array::from_fn(|p| (pair[1][p] - pair[0][p]).max(0.0)))
        .collect();
    let outside: Vec<f64> = latencies
        .iter()
        .zip(&phases)
        .map(|(latency, phases)| {
            (latency.as_secs_f64() - phases[..PHASES_TO_APPLY].iter().sum::<f64>()).max(0.0)
        })
        .collect();
    let ms = |seconds: f64| format!("{:.2}", seconds * 1e3);
    let describe = |phases: &[f64; PHASES.len()], outside: f64| {
        let named: Vec<String> = PHASES
            .iter()
            .zip(phases)
            .map(|(name, seconds)| format!("{name} {}", ms(*seconds)))
            .collect();
        format!(
            "outside the agent's sync {}; {}",
            ms(outside),
            named.join(", ")
        )
    };
    let count = phases.len().max(1) as f64;
    let mean: [f64; PHASES.len()] =
        std::array::from_fn(|p| phases.iter().map(|phases| phases[p]).sum::<f64>() / count);
    println!(
        "  where a change's time went, mean over {} changes (ms): {}",
        phases.len(),
        describe(&mean, outside.iter().sum::<f64>() / count)
    );
    println!(
        "    (\"outside\": the API server and the watch bringing the event to the sync loop, and \
         the bench's polling; wait..apply are on the way to the apply, finish and post_sync after it)"
    );
    let mut order: Vec<usize> = (0..phases.len()).collect();
    order.sort_by(|a, b| latencies[*b].cmp(&latencies[*a]));
    let slowest = phases.len().div_ceil(100);
    println!("  the slowest {slowest} changes (1 %):");
    for index in order.into_iter().take(slowest) {
        println!(
            "    change {index}: {} ms: {}",
            ms(latencies[index].as_secs_f64()),
            describe(&phases[index], outside[index])
        );
    }
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
    let agent_binary = std::env::var_os("TOPOPROXY_BENCH_AGENT")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_topoproxy").into());
    println!("  agent binary: {}", agent_binary.to_string_lossy());
    let mut cmd = Command::new(&agent_binary);
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
    let mut agent = Daemon::spawn("topoproxy", cmd, &log, &Isolation::default());
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
    let mut sums = Vec::with_capacity(events + 1);
    'events: for event in 0..events {
        let page = get(metrics, "/metrics").await.unwrap_or_default();
        let before = sum_of(&page, "topoproxy_dataplane_operations_total").unwrap_or(0.0);
        sums.push(phase_sums(&page));
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
    sums.push(phase_sums(
        &get(metrics, "/metrics").await.unwrap_or_default(),
    ));
    let in_order = latencies.clone();
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
    print_breakdown(&in_order, &sums);
    println!(
        "  agent memory: VmRSS {rss_synced} after the initial sync, {} after the changes; VmHWM {}",
        status_field(pid, "VmRSS:"),
        status_field(pid, "VmHWM:")
    );
    agent.kill();
    if env_usize("TOPOPROXY_BENCH_KUBE_PROXY", 1) == 0 {
        return;
    }
    kube_proxy(&plane).await;
}

/// Why kube-proxy may not run here: it writes nftables rules and sysctls, which must land in a
/// network namespace of this run's own, never the host's. Such a namespace (`unshare -n`) is
/// not init's, where `/proc/1/ns/net` can be read to tell, and holds no device but loopback,
/// which also tells it from the host's where pid 1's namespace cannot be read.
fn not_in_a_private_network_namespace() -> Option<String> {
    let own = std::fs::read_link("/proc/self/ns/net");
    if let (Ok(own), Ok(init)) = (&own, std::fs::read_link("/proc/1/ns/net")) {
        if *own == init {
            return Some(
                "this process is in init's network namespace (run the bench under `unshare \
                 -mn`, as `cargo xtask bench-sync --real-apiserver` does)"
                    .to_owned(),
            );
        }
    }
    let devices = match std::fs::read_to_string("/proc/self/net/dev") {
        Ok(devices) => devices,
        Err(error) => return Some(format!("cannot read /proc/self/net/dev: {error}")),
    };
    // Two header lines, then `name: counters` per device.
    let others: Vec<&str> = devices
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next().map(str::trim))
        .filter(|name| *name != "lo")
        .collect();
    if others.is_empty() {
        None
    } else {
        Some(format!(
            "this network namespace has devices besides loopback ({}), so it is not one made \
             for this run (run the bench under `unshare -mn`, as `cargo xtask bench-sync \
             --real-apiserver` does)",
            others.join(", ")
        ))
    }
}

/// kube-proxy v1.36, nftables mode, as `system:kube-proxy`, against the same API server and
/// objects: when its informers were synced, when its first sync had programmed the rules,
/// its memory then and 5 s later.
async fn kube_proxy(plane: &ControlPlane) {
    if let Some(why) = not_in_a_private_network_namespace() {
        println!("  kube-proxy: not started: {why}");
        return;
    }
    let kubeconfig = plane.kubeconfig(
        "bench-kube-proxy.kubeconfig",
        &KubeconfigUser::Cert(plane.pki().kube_proxy.clone()),
    );
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let healthz = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // conntrack: 0 leaves every limit and timeout as it is (nf_conntrack_max is not even
    // namespaced).
    let config = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {NODE}
metricsBindAddress: {metrics}
healthzBindAddress: {healthz}
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
",
        kubeconfig = kubeconfig.display()
    );
    let config_path = plane.dir().join("bench-kube-proxy.yaml");
    std::fs::write(&config_path, config).expect("writing kube-proxy's configuration");
    let mut cmd = Command::new(&plane.binaries().kube_proxy);
    cmd.arg("--config").arg(&config_path).args(["--v", "2"]);
    let log = plane.dir().join("bench-kube-proxy.log");
    let started = Instant::now();
    let proxy = Daemon::spawn("kube-proxy", cmd, &log, &Isolation::default());
    let synced_line = |log: &str, controller: &str| {
        log.lines()
            .any(|line| line.contains("Caches are synced") && line.contains(controller))
    };
    let (mut services, mut slices, mut programmed) = (None, None, None);
    while services.is_none() || slices.is_none() || programmed.is_none() {
        if proxy.exited() || started.elapsed() > Duration::from_secs(600) {
            println!(
                "  kube-proxy: not synced after {:.1} s\n--- kube-proxy ---\n{}",
                started.elapsed().as_secs_f64(),
                proxy.log_tail(20)
            );
            return;
        }
        let text = proxy.log();
        if services.is_none() && synced_line(&text, "service config") {
            services = Some(started.elapsed());
        }
        if slices.is_none() && synced_line(&text, "endpoint slice config") {
            slices = Some(started.elapsed());
        }
        if programmed.is_none()
            && metric(metrics, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
                .await
                .is_some_and(|at| at > 0.0)
        {
            programmed = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = proxy.pid().unwrap_or_default();
    let rss_programmed = status_field(pid, "VmRSS:");
    let seconds = |at: Option<Duration>| at.unwrap_or_default().as_secs_f64();
    println!(
        "kube-proxy {} (nftables), same API server and objects, the agent stopped: informers \
         synced after {:.2} s (Services) and {:.2} s (EndpointSlices); first sync programmed \
         after {:.2} s",
        kube_proxy_version(&plane.binaries().kube_proxy),
        seconds(services),
        seconds(slices),
        seconds(programmed),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tables = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    println!(
        "  kube-proxy memory: VmRSS {rss_programmed} at its first sync, {} 5 s later; VmHWM {}; \
         its nftables table in this run's network namespace: {}",
        status_field(pid, "VmRSS:"),
        status_field(pid, "VmHWM:"),
        if tables.contains("kube-proxy") {
            "yes"
        } else {
            "no"
        }
    );
}

/// `kube-proxy --version`'s answer (`v1.36.3`), or `?`.
fn kube_proxy_version(binary: &std::path::Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .last()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned())
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
