//! End-to-end sync benchmark, in process: the fake API server holding a synthetic cluster,
//! the real agent (kube-runtime watchers, sync loop) and the in-memory dataplane.
//!
//! Measures (1) the initial sync: from the agent's start to the dataplane holding the whole
//! table, and (2) the latency from one EndpointSlice write at the API server to the dataplane
//! apply that carries it, with `--min-sync-period 0`, as p50/p99 over many events.
//!
//! `cargo bench -p topoproxy --bench sync` (or `cargo xtask bench-sync`, which adds the agent's
//! RSS measured as a separate process). Sizes: `TOPOPROXY_BENCH_SERVICES` (default 10000) and
//! `TOPOPROXY_BENCH_EVENTS` (default 300). Under `cargo test` it runs a small smoke size.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fake_apiserver::synthetic::synthetic_objects;
use fake_apiserver::{FakeApiServer, Object};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::oneshot;

use topoproxy::agent::{client_from_config, Agent, ClusterSource};
use topoproxy::config::{LogFormat, ProxyMode, RunSettings};
use topoproxy::dataplane::memory::MemoryDataplane;
use topoproxy::planner::PlanConfig;

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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    // `cargo test --benches` passes no `--bench`; run a smoke size then.
    let benching = std::env::args().any(|a| a == "--bench");
    let services = if benching {
        env_usize("TOPOPROXY_BENCH_SERVICES", 10_000)
    } else {
        200
    };
    let events = if benching {
        env_usize("TOPOPROXY_BENCH_EVENTS", 300)
    } else {
        20
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot start a tokio runtime: {error}"),
    };
    runtime.block_on(bench(services, events));
}

async fn bench(services: usize, events: usize) {
    let objects = synthetic_objects(services, ENDPOINTS, ZONES, NODES_PER_ZONE, true);
    let mut slices: Vec<EndpointSlice> = objects
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let server = FakeApiServer::start().await;
    server.apply_many(objects);
    // Every 10th synthetic Service has a second (UDP) port.
    let expected_virtual_servers = services + services.div_ceil(10);

    let (dataplane, handle) = MemoryDataplane::new("memory");
    let settings = RunSettings {
        kubeconfig: None,
        node_name: NODE.to_owned(),
        source: None,
        proxy_mode: ProxyMode::DryRun,
        min_sync_period: Duration::ZERO,
        // Long enough that no periodic resync lands inside the measurements.
        sync_period: Duration::from_secs(3600),
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
    };
    let started = Instant::now();
    let agent = match Agent::start(settings, dataplane).await {
        Ok(agent) => agent,
        Err(error) => panic!("agent start: {error}"),
    };
    let client = match client_from_config(server.client_config()) {
        Ok(client) => client,
        Err(error) => panic!("client: {error}"),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(ClusterSource::Kube(client), async {
        let _ = stopped.await;
    }));
    loop {
        if handle.table().len() >= expected_virtual_servers {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "initial sync did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let initial = started.elapsed();
    println!(
        "initial_sync services={services} endpoints_per_service={ENDPOINTS} virtual_servers={} \
         time_ms={:.1} (target <= 5000 ms at 10000 services)",
        handle.table().len(),
        initial.as_secs_f64() * 1e3
    );

    let mut applied = handle.subscribe();
    let mut latencies = Vec::with_capacity(events);
    for round in 0..events {
        // Flip readiness of one endpoint of a different Service each time.
        let index = (round * 37) % slices.len();
        // An endpoint in this node's zone, so the change reaches this node's table (a change
        // this node does not program correctly causes no dataplane call at all).
        let local = slices[index]
            .endpoints
            .iter_mut()
            .find(|e| e.zone.as_deref() == Some("zone-a"));
        if let Some(endpoint) = local {
            let conditions = endpoint.conditions.get_or_insert_with(Default::default);
            conditions.ready = Some(!conditions.ready.unwrap_or(true));
        }
        let slice = slices[index].clone();
        let before = applied.borrow_and_update().applies;
        let written = Instant::now();
        server.apply_endpoint_slice(slice);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let record = *applied.borrow_and_update();
            if record.applies > before {
                let at = record.at.unwrap_or_else(Instant::now);
                latencies.push(at.saturating_duration_since(written));
                break;
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("dataplane gone"),
                Err(_) => panic!("event {round} never reached the dataplane"),
            }
        }
        // Let the agent go idle so each event is measured on its own.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies.sort();
    println!(
        "event_to_dataplane events={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} (target p99 <= 20 ms)",
        latencies.len(),
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    let _ = stop.send(());
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("agent: {error}"),
        Err(error) => panic!("agent task: {error}"),
    }
}
