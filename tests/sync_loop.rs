//! The sync loop driven directly with source events and the in-memory dataplane: gating on the
//! initial lists, incremental changes, node changes, drift repair, failures, adoption.

#[path = "support/http.rs"]
mod http;

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use topoproxy::dataplane::memory::{MemoryDataplane, MemoryHandle};
use topoproxy::dataplane::{programmed_table, ProgrammedTable, TierScope};
use topoproxy::diff::diff;
use topoproxy::health::HealthTracker;
use topoproxy::metrics::Metrics;
use topoproxy::model::{Node, ServiceKey};
use topoproxy::planner::{plan, PlanConfig};
use topoproxy::source::file::load_dir;
use topoproxy::source::poll::changes;
use topoproxy::source::{Resource, SourceEvent};
use topoproxy::state::AgentState;
use topoproxy::store::{SliceKey, Store};
use topoproxy::sync::{SyncLoop, SyncSettings};
use topoproxy::table::NodeTable;

const NODE: &str = "node-b1";

fn example() -> Store {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
    load_dir(&dir).expect("example cluster loads").store
}

fn expected(store: &Store, node: &Node) -> ProgrammedTable {
    programmed_table(
        &plan(store, node, &PlanConfig::default()),
        TierScope::Active,
        None,
    )
}

struct Running {
    events: mpsc::Sender<SourceEvent>,
    dataplane: MemoryHandle,
    state: Arc<AgentState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    fn start(min_sync_period: Duration, sync_period: Duration) -> Self {
        Self::start_with(min_sync_period, sync_period, |_| {})
    }

    fn start_with(
        min_sync_period: Duration,
        sync_period: Duration,
        prepare: impl FnOnce(&MemoryHandle),
    ) -> Self {
        Self::start_planning(min_sync_period, sync_period, PlanConfig::default(), prepare)
    }

    fn start_planning(
        min_sync_period: Duration,
        sync_period: Duration,
        plan: PlanConfig,
        prepare: impl FnOnce(&MemoryHandle),
    ) -> Self {
        let (dataplane, handle) = MemoryDataplane::new("memory");
        prepare(&handle);
        let state = Arc::new(AgentState {
            node_name: NODE.to_owned(),
            metrics: Metrics::new(),
            health: HealthTracker::new(sync_period * 2),
            table: RwLock::new(NodeTable::new()),
        });
        let settings = SyncSettings {
            min_sync_period,
            sync_period,
            plan,
        };
        let sync = SyncLoop::new(settings, dataplane, Arc::clone(&state));
        let (events, rx) = mpsc::channel(1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let result = sync
                .run(rx, async {
                    let _ = stopped.await;
                })
                .await;
            assert!(result.is_ok(), "sync loop failed: {result:?}");
        });
        Self {
            events,
            dataplane: handle,
            state,
            stop: Some(stop),
            task,
        }
    }

    async fn send(&self, events: impl IntoIterator<Item = SourceEvent>) {
        for event in events {
            self.events.send(event).await.expect("sync loop alive");
        }
    }

    async fn send_cluster(&self, store: &Store) {
        self.send(changes(&Store::new(), store, NODE)).await;
    }

    /// Sends `store` and reports both initial lists complete.
    async fn list(&self, store: &Store) {
        self.send_cluster(store).await;
        self.send([
            SourceEvent::Listed(Resource::Services),
            SourceEvent::Listed(Resource::EndpointSlices),
        ])
        .await;
    }

    async fn eventually(&self, what: &str, condition: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("sync loop task");
    }
}

fn metric(state: &AgentState, selector: &str) -> Option<f64> {
    let text = state.metrics.encode().expect("metrics encode");
    http::metric_sum(&text, selector)
}

// Paused time: the sleep below lets the loop run until it is idle, however busy the machine
// (tokio advances the clock only when every task waits), so "nothing happened" is exact.
#[tokio::test(start_paused = true)]
async fn nothing_is_programmed_until_services_slices_and_node_are_known() {
    let store = example();
    let node = store.node(NODE).expect("node").clone();
    let agent = Running::start(Duration::ZERO, Duration::from_secs(60));
    agent.send_cluster(&store).await;
    agent.send([SourceEvent::Listed(Resource::Services)]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        agent.dataplane.applies(),
        0,
        "programmed before slices were listed"
    );
    let health = agent.state.health.status(SystemTime::now());
    assert!(!health.healthy);
    assert!(
        health
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("endpointslices"),
        "{health:?}"
    );
    agent
        .send([SourceEvent::Listed(Resource::EndpointSlices)])
        .await;
    agent
        .eventually("the example table is programmed", |a| {
            a.dataplane.table() == expected(&store, &node)
        })
        .await;
    assert!(agent.state.health.status(SystemTime::now()).healthy);
    assert_eq!(
        metric(&agent.state, "topoproxy_services_falling_back"),
        Some(1.0)
    );
    agent.stop().await;
}

/// With a cluster id, the MCS lists gate the first sync too (a source reports a missing
/// ServiceImport CRD as an empty list), so a restart never withdraws a clusterset IP.
#[tokio::test]
async fn with_a_cluster_id_the_mcs_lists_gate_the_first_sync() {
    let store = example();
    let plan_config = PlanConfig {
        cluster_id: Some("west".to_owned()),
        ..PlanConfig::default()
    };
    let node = store.node(NODE).expect("node").clone();
    let want = programmed_table(&plan(&store, &node, &plan_config), TierScope::Active, None);
    let agent =
        Running::start_planning(Duration::ZERO, Duration::from_secs(60), plan_config, |_| {});
    agent.list(&store).await;
    agent
        .eventually("health waits for the MCS lists", |a| {
            let health = a.state.health.status(SystemTime::now());
            health.reason.as_deref().is_some_and(|reason| {
                reason.contains("serviceimports") && reason.contains("endpointslices-multicluster")
            })
        })
        .await;
    assert_eq!(
        agent.dataplane.applies(),
        0,
        "programmed before the MCS lists"
    );
    agent
        .send([
            SourceEvent::Listed(Resource::ServiceImports),
            SourceEvent::Listed(Resource::ImportedSlices),
        ])
        .await;
    agent
        .eventually("the table is programmed", |a| a.dataplane.table() == want)
        .await;
    assert!(agent.state.health.status(SystemTime::now()).healthy);
    agent.stop().await;
}

async fn synced(store: &Store) -> (Running, Node) {
    let node = store.node(NODE).expect("node").clone();
    let agent = Running::start(Duration::ZERO, Duration::from_secs(60));
    agent.list(store).await;
    let want = expected(store, &node);
    agent
        .eventually("initial sync", |a| a.dataplane.table() == want)
        .await;
    (agent, node)
}

#[tokio::test]
async fn one_endpoint_change_sends_exactly_the_changes_it_needs() {
    let mut store = example();
    let (agent, node) = synced(&store).await;
    let before = expected(&store, &node);
    let ops_before = agent.dataplane.ops_applied();
    // The zone-b frontend pod on node-b1 stops being ready.
    let key = SliceKey::new("shop", "frontend-4mzxq");
    let mut slice = store.slice(&key).expect("frontend slice").clone();
    let endpoint = slice
        .endpoints
        .iter_mut()
        .find(|e| e.address.to_string() == "10.244.3.20")
        .expect("endpoint");
    endpoint.ready = false;
    store.upsert_slice(slice.clone());
    let after = expected(&store, &node);
    let needed = diff(&after, &before).len() as u64;
    // ClusterIP, externalIP and NodePort each lose that one destination.
    assert_eq!(needed, 3);
    agent.send([SourceEvent::Slice(key, Some(slice))]).await;
    agent
        .eventually("the change is applied", |a| a.dataplane.table() == after)
        .await;
    assert_eq!(agent.dataplane.ops_applied() - ops_before, needed);
    agent.stop().await;
}

#[tokio::test]
async fn services_and_slices_appear_change_and_disappear() {
    let store = example();
    let (agent, node) = synced(&store).await;
    let mut changed = store.clone();
    let cart = ServiceKey::new("shop", "cart");
    changed.remove_service(&cart);
    agent.send([SourceEvent::Service(cart.clone(), None)]).await;
    let want = expected(&changed, &node);
    agent
        .eventually("cart is gone", |a| a.dataplane.table() == want)
        .await;
    let restored = store.service(&cart).expect("cart").clone();
    agent
        .send([SourceEvent::Service(cart, Some(restored))])
        .await;
    let want = expected(&store, &node);
    agent
        .eventually("cart is back", |a| a.dataplane.table() == want)
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_zone_label_change_replans_the_whole_table() {
    let store = example();
    let (agent, node) = synced(&store).await;
    let mut moved = node.clone();
    moved.zone = Some("zone-c".to_owned());
    let want = expected(&store, &moved);
    assert_ne!(want, expected(&store, &node), "the move must matter");
    agent.send([SourceEvent::Node(Some(moved))]).await;
    agent
        .eventually("re-planned for zone-c", |a| a.dataplane.table() == want)
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn drift_is_repaired_at_the_next_sync_period() {
    let store = example();
    let node = store.node(NODE).expect("node").clone();
    let want = expected(&store, &node);
    let agent = Running::start(Duration::ZERO, Duration::from_millis(300));
    agent.list(&store).await;
    agent
        .eventually("initial sync", |a| a.dataplane.table() == want)
        .await;
    let victim = *want.keys().next().expect("a virtual server");
    agent.dataplane.tamper(|table| {
        table.remove(&victim);
    });
    agent
        .eventually("drift repaired", |a| a.dataplane.table() == want)
        .await;
    assert!(metric(&agent.state, "topoproxy_drift_repairs_total").unwrap_or(0.0) >= 1.0);
    agent.stop().await;
}

/// A sync loop driven by hand (`handle`, `sync`) over the in-memory dataplane, so a test
/// decides exactly which events are pending when a resync comes.
struct Driven {
    sync: SyncLoop<MemoryDataplane>,
    dataplane: MemoryHandle,
    state: Arc<AgentState>,
}

/// The resync period of [`Driven`]; tests reach it with `tokio::time::advance`.
const DRIVEN_SYNC_PERIOD: Duration = Duration::from_secs(60);

impl Driven {
    /// A loop that has done its initial sync of `store`.
    async fn synced(store: &Store) -> Self {
        let (dataplane, handle) = MemoryDataplane::new("memory");
        let state = Arc::new(AgentState {
            node_name: NODE.to_owned(),
            metrics: Metrics::new(),
            health: HealthTracker::new(DRIVEN_SYNC_PERIOD * 2),
            table: RwLock::new(NodeTable::new()),
        });
        let settings = SyncSettings {
            min_sync_period: Duration::ZERO,
            sync_period: DRIVEN_SYNC_PERIOD,
            plan: PlanConfig::default(),
        };
        let mut driven = Self {
            sync: SyncLoop::new(settings, dataplane, Arc::clone(&state)),
            dataplane: handle,
            state,
        };
        driven.handle(changes(&Store::new(), store, NODE));
        driven.handle([
            SourceEvent::Listed(Resource::Services),
            SourceEvent::Listed(Resource::EndpointSlices),
        ]);
        driven.sync.sync().await;
        let node = store.node(NODE).expect("node");
        assert_eq!(
            driven.dataplane.table(),
            expected(store, node),
            "initial sync"
        );
        driven
    }

    fn handle(&mut self, events: impl IntoIterator<Item = SourceEvent>) {
        for event in events {
            self.sync.handle(event);
        }
    }

    /// Lets the sync period pass, then syncs: the sync reads the dataplane back.
    async fn resync(&mut self) {
        tokio::time::advance(DRIVEN_SYNC_PERIOD).await;
        let reads = self.dataplane.reads();
        self.sync.sync().await;
        assert_eq!(self.dataplane.reads(), reads + 1, "the sync read back");
    }

    fn drift_repairs(&self) -> Option<f64> {
        metric(&self.state, "topoproxy_drift_repairs_total")
    }
}

/// Takes the ready zone-b frontend endpoint on node-b1 out of service in `store`; returns the
/// event that says so.
fn unready_frontend_endpoint(store: &mut Store) -> SourceEvent {
    let key = SliceKey::new("shop", "frontend-4mzxq");
    let mut slice = store.slice(&key).expect("frontend slice").clone();
    slice
        .endpoints
        .iter_mut()
        .find(|e| e.address.to_string() == "10.244.3.20")
        .expect("endpoint")
        .ready = false;
    store.upsert_slice(slice.clone());
    SourceEvent::Slice(key, Some(slice))
}

// Paused time: the resync is due exactly when the test advances the clock.
#[tokio::test(start_paused = true)]
async fn a_resync_that_meets_pending_changes_reports_no_drift() {
    let mut store = example();
    let node = store.node(NODE).expect("node").clone();
    let mut agent = Driven::synced(&store).await;
    let event = unready_frontend_endpoint(&mut store);
    let want = expected(&store, &node);
    assert_ne!(agent.dataplane.table(), want, "the change must matter");
    agent.handle([event]);
    agent.resync().await;
    assert_eq!(
        agent.dataplane.table(),
        want,
        "the pending change is applied"
    );
    assert_eq!(
        agent.drift_repairs(),
        Some(0.0),
        "the agent's own pending change counted as drift"
    );
}

#[tokio::test(start_paused = true)]
async fn tampering_beside_pending_changes_counts_only_the_tampering() {
    let mut store = example();
    let node = store.node(NODE).expect("node").clone();
    let mut agent = Driven::synced(&store).await;
    let programmed = agent.dataplane.table();
    let event = unready_frontend_endpoint(&mut store);
    let want = expected(&store, &node);
    // A virtual server the pending change does not touch disappears behind the agent's back.
    let victim = *programmed
        .iter()
        .find(|(key, service)| want.get(key) == Some(service))
        .expect("a virtual server the change leaves alone")
        .0;
    agent.dataplane.tamper(|table| {
        table.remove(&victim);
    });
    let tampering = diff(&programmed, &agent.dataplane.table()).len();
    assert!(tampering > 0);
    agent.handle([event]);
    agent.resync().await;
    assert_eq!(
        agent.dataplane.table(),
        want,
        "repaired, and the change applied"
    );
    assert_eq!(agent.drift_repairs(), Some(tampering as f64));
}

/// After a failed sync the agent no longer knows what the dataplane holds (a failed change may
/// have been half made), so what the next read finds is taken as it is, not counted as drift.
#[tokio::test(start_paused = true)]
async fn a_resync_after_a_failed_sync_reports_no_drift() {
    let mut store = example();
    let node = store.node(NODE).expect("node").clone();
    let mut agent = Driven::synced(&store).await;
    let before = agent.dataplane.table();
    let event = unready_frontend_endpoint(&mut store);
    let want = expected(&store, &node);
    agent.handle([event]);
    agent.dataplane.fail_next_applies(1);
    agent.sync.sync().await;
    assert_eq!(agent.dataplane.table(), before, "the apply failed");
    // The failed change took effect in the kernel after all.
    let half_done = diff(&want, &before);
    agent.dataplane.tamper(|table| {
        topoproxy::dataplane::op::apply_to(table, &half_done);
    });
    agent.resync().await;
    assert_eq!(agent.dataplane.table(), want);
    assert_eq!(agent.drift_repairs(), Some(0.0));
}

#[tokio::test]
async fn a_failing_dataplane_is_retried_and_reported() {
    let store = example();
    let node = store.node(NODE).expect("node").clone();
    let agent = Running::start(Duration::ZERO, Duration::from_secs(60));
    agent.dataplane.fail_next_applies(2);
    agent.list(&store).await;
    agent
        .eventually("a failure is reported", |a| {
            a.state
                .health
                .status(SystemTime::now())
                .reason
                .is_some_and(|r| r.contains("injected failure"))
        })
        .await;
    let want = expected(&store, &node);
    agent
        .eventually("converges after retries", |a| a.dataplane.table() == want)
        .await;
    assert!(agent.state.health.status(SystemTime::now()).healthy);
    assert!(metric(&agent.state, "topoproxy_dataplane_errors_total").unwrap_or(0.0) >= 2.0);
    agent.stop().await;
}

/// The end of a sync (eBPF: the map switch, the tc attach) that fails is retried with backoff,
/// without an event and long before the sync period.
#[tokio::test(start_paused = true)]
async fn a_failed_end_of_sync_is_retried_with_backoff() {
    let store = example();
    let agent = Running::start(Duration::ZERO, Duration::from_secs(60));
    agent.dataplane.fail_next_synced(2);
    agent.list(&store).await;
    agent
        .eventually("the failure is reported", |a| {
            a.state
                .health
                .status(SystemTime::now())
                .reason
                .is_some_and(|r| r.contains("injected synced failure"))
        })
        .await;
    // `eventually` gives up after 10 s, a sixth of the sync period.
    agent
        .eventually("synced retried until it succeeds", |a| {
            a.dataplane.synced_calls() >= 3
        })
        .await;
    agent
        .eventually("healthy again", |a| {
            a.state.health.status(SystemTime::now()).healthy
        })
        .await;
    assert!(metric(&agent.state, "topoproxy_dataplane_errors_total").unwrap_or(0.0) >= 2.0);
    agent.stop().await;
}

#[tokio::test]
async fn a_restart_over_a_programmed_dataplane_changes_nothing() {
    let store = example();
    let node = store.node(NODE).expect("node").clone();
    let want = expected(&store, &node);
    let already = want.clone();
    let agent = Running::start_with(Duration::ZERO, Duration::from_secs(60), move |handle| {
        handle.tamper(|table| *table = already);
    });
    agent.list(&store).await;
    agent
        .eventually("initial sync recorded", |a| {
            a.state.health.status(SystemTime::now()).healthy
        })
        .await;
    assert_eq!(
        agent.dataplane.reads(),
        1,
        "state read back before programming"
    );
    assert_eq!(
        agent.dataplane.applies(),
        0,
        "nothing to change, nothing applied"
    );
    assert_eq!(agent.dataplane.table(), want);
    agent.stop().await;
}

// Paused time: the burst's 20 × 10 ms are virtual and the loop's min-sync-period timer runs
// on the same clock, so the burst fits in one period whatever the machine's load.
#[tokio::test(start_paused = true)]
async fn min_sync_period_batches_a_burst_into_few_syncs() {
    let mut store = example();
    let node = store.node(NODE).expect("node").clone();
    let agent = Running::start(Duration::from_millis(400), Duration::from_secs(60));
    agent.list(&store).await;
    let want = expected(&store, &node);
    agent
        .eventually("initial sync", |a| a.dataplane.table() == want)
        .await;
    let applies = agent.dataplane.applies();
    let key = SliceKey::new("kube-system", "kube-dns-x7k2p");
    for round in 0..20 {
        let mut slice = store.slice(&key).expect("dns slice").clone();
        slice.endpoints[0].ready = round % 2 == 0;
        store.upsert_slice(slice.clone());
        agent
            .send([SourceEvent::Slice(key.clone(), Some(slice))])
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let want = expected(&store, &node);
    agent
        .eventually("the burst is applied", |a| a.dataplane.table() == want)
        .await;
    let syncs = agent.dataplane.applies() - applies;
    assert!(syncs <= 2, "20 changes in 200 ms took {syncs} applies");
    agent.stop().await;
}

/// Status line and body of `GET /` on `port` of the loopback, or `None` if nothing listens.
async fn health_check(port: u16) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /any/path HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head.to_ascii_lowercase(), body.to_owned()))
}

#[tokio::test]
async fn a_health_check_node_port_answers_as_kube_proxys_with_the_local_endpoints() {
    use topoproxy::model::ServiceType;
    let store = example();
    let (agent, _) = synced(&store).await;
    let key = ServiceKey::new("shop", "frontend");
    let port = k8s_harness::free_port();
    let mut service = store.service(&key).expect("frontend").clone();
    service.service_type = ServiceType::LoadBalancer;
    service.external_traffic_local = true;
    service.health_check_node_port = Some(port);
    agent
        .send([SourceEvent::Service(key.clone(), Some(service.clone()))])
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (status, head, body) = loop {
        if let Some(reply) = health_check(port).await {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health check on {port}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"frontend\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
    );

    // Its one endpoint on this node stops being ready: 503, 0 local endpoints.
    let mut slices: Vec<_> = store.slices_of(&key).cloned().collect();
    for slice in &mut slices {
        for endpoint in &mut slice.endpoints {
            if endpoint.node_name.as_deref() == Some(NODE) {
                endpoint.ready = false;
            }
        }
    }
    for slice in slices {
        agent
            .send([SourceEvent::Slice(SliceKey::of(&slice), Some(slice))])
            .await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = health_check(port).await.expect("health check");
        if reply.0 == 503 {
            assert!(reply.2.contains("\"localEndpoints\": 0,"), "{}", reply.2);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {reply:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Back to ClusterIP: the port closes.
    service.health_check_node_port = None;
    agent.send([SourceEvent::Service(key, Some(service))]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health_check(port).await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.stop().await;
}

/// The host's addresses, as the dataplane reads them every sync, carry the NodePorts; when
/// they change the NodePorts follow at the next sync.
#[tokio::test]
async fn node_ports_follow_the_addresses_the_dataplane_reads_from_the_host() {
    let store = example();
    // A short period: the periodic sync is what notices a host change without any event.
    let agent = Running::start_with(Duration::ZERO, Duration::from_millis(200), |handle| {
        handle.set_node_addresses(Some(["10.0.2.1".parse().expect("ip")].into()));
    });
    agent.list(&store).await;
    let node_ports = |a: &Running| -> Vec<String> {
        a.dataplane
            .table()
            .keys()
            .filter(|key| key.port == 30080)
            .map(|key| key.address.to_string())
            .collect()
    };
    agent
        .eventually("the NodePort on the host's address", |a| {
            node_ports(a) == ["10.0.2.1"]
        })
        .await;
    agent.dataplane.set_node_addresses(Some(
        [
            "10.0.2.1".parse().expect("ip"),
            "192.0.2.44".parse().expect("ip"),
        ]
        .into(),
    ));
    agent
        .eventually("the NodePort on the new address too", |a| {
            node_ports(a) == ["10.0.2.1", "192.0.2.44"]
        })
        .await;
    agent.stop().await;
}

/// A dataplane that cannot enforce `loadBalancerSourceRanges` is never given a load-balancer
/// frontend that has them (closed, not open); the Service's other frontends are.
#[tokio::test]
async fn a_firewalled_load_balancer_ip_is_withheld_from_a_dataplane_that_cannot_enforce_it() {
    let dir = tempdir("withheld");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
    copy_dir(&examples, &dir);
    let checkout = dir.join("shop/checkout.yaml");
    let text = std::fs::read_to_string(&checkout).expect("checkout.yaml");
    std::fs::write(
        &checkout,
        text.replacen(
            "  externalTrafficPolicy: Local\n",
            "  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: [192.0.2.0/24]\n",
            1,
        ),
    )
    .expect("write");
    let store = load_dir(&dir).expect("loads").store;
    let agent = Running::start_with(Duration::ZERO, Duration::from_secs(60), |handle| {
        handle.ignore_source_ranges();
    });
    agent.list(&store).await;
    agent
        .eventually("the checkout ClusterIP is programmed", |a| {
            a.dataplane
                .table()
                .keys()
                .any(|key| key.address.to_string() == "10.96.20.30")
        })
        .await;
    let table = agent.dataplane.table();
    assert!(
        !table
            .keys()
            .any(|key| key.address.to_string() == "198.51.100.20"),
        "the firewalled LB IP was programmed: {:?}",
        table.keys().collect::<Vec<_>>()
    );
    assert!(
        table.keys().any(|key| key.port == 31443),
        "its NodePort is served"
    );
    let _ = std::fs::remove_dir_all(&dir);
    agent.stop().await;
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("topoproxy-sync-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
