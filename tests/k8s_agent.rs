//! The agent (`topoproxy run --proxy-mode dry-run`, its own process) against a real control
//! plane: etcd, kube-apiserver and kube-controller-manager built by `cargo xtask k8s-setup`
//! (`k8s-harness`). The agent authenticates as `manifests/base`'s ServiceAccount, rendered by
//! the real kustomize; the real EndpointSlice controller writes slices and hints from Pods
//! whose status the tests patch. The oracle throughout: `/plan` equals what `topoproxy plan`
//! computes from the objects the apiserver holds at that moment.
//!
//! The tests share the machine's two cores with whole control planes, so they run one at a
//! time (a lock), each with its own control plane.

#[path = "support/agent_process.rs"]
mod agent_process;
#[path = "support/k8s/api_agent.rs"]
mod api_agent;
#[path = "support/http.rs"]
mod http;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api_agent::{destinations, install_agent_identity, ApiAgent, Auth};
use futures::StreamExt as _;
use k8s_harness::objects::{
    apply, apply_object, create_namespace, create_node, create_pod, delete_pod, eventually,
    set_pod_status, slices_of, yaml_documents, zone_hints, NodeSpec, PodSpec, REGION_LABEL,
    ZONE_LABEL,
};
use k8s_harness::{ControlPlane, Options};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

const CONVERGE: Duration = Duration::from_secs(90);

/// One control plane at a time (tokio's lock: it is held across awaits, and a panicking
/// test releases it without poisoning).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Four nodes in two zones: node-a1, node-a2 (zone-a), node-b1, node-b2 (zone-b).
async fn four_nodes(client: &Client) {
    for (name, zone, ip) in [
        ("node-a1", "zone-a", "10.0.1.1"),
        ("node-a2", "zone-a", "10.0.1.2"),
        ("node-b1", "zone-b", "10.0.2.1"),
        ("node-b2", "zone-b", "10.0.2.2"),
    ] {
        create_node(client, &NodeSpec::new(name, Some(zone), ip)).await;
    }
}

/// A Service selecting `app=NAME` on port 80 → named port `http`, with `extra` merged into it
/// (annotations, spec fields); returns its ClusterIP.
async fn service(client: &Client, namespace: &str, name: &str, extra: Value) -> String {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    });
    merge(&mut object, extra);
    apply(client, object).await;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services.get(name).await.expect("reading the Service back");
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("an allocated ClusterIP")
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, extra) => *base = extra,
    }
}

/// Ready pods of `app` on `nodes`, pod IPs `10.244.<k>.<i>` (k = index of the node in
/// `four_nodes`).
async fn pods(
    client: &Client,
    namespace: &str,
    app: &str,
    nodes: &[&str],
    subnet: u8,
) -> Vec<PodSpec> {
    let mut specs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let spec = PodSpec::new(
            namespace,
            &format!("{app}-{i}"),
            node,
            app,
            &format!("10.244.{subnet}.{}", i + 10),
        );
        create_pod(client, &spec, true).await;
        specs.push(spec);
    }
    specs
}

async fn wait_for_hints(
    client: &Client,
    namespace: &str,
    service: &str,
    endpoints: usize,
    hinted: bool,
) {
    eventually(
        &format!("{namespace}/{service}: {endpoints} endpoints, hinted {hinted}"),
        Duration::from_secs(60),
        || async {
            let (count, has) = zone_hints(client, namespace, service).await;
            (count == endpoints && has == hinted).then_some(())
        },
    )
    .await;
}

fn scratch(plane: &ControlPlane, name: &str) -> std::path::PathBuf {
    plane.dir().join(format!("fresh-{name}"))
}

#[tokio::test]
async fn runs_in_cluster_as_its_service_account_with_the_shipped_rbac() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    create_namespace(&client, "shop").await;
    let vip = service(&client, "shop", "web", json!({})).await;
    pods(&client, "shop", "web", &["node-a1", "node-b1"], 1).await;
    // The controller's slice first: an agent that starts before it converges on no endpoints.
    wait_for_hints(&client, "shop", "web", 2, false).await;
    let token = install_agent_identity(&plane, &client, None).await;

    let agent = ApiAgent::start(&plane, &Auth::InCluster(token), "node-a1");
    agent.wait_healthy(CONVERGE).await;
    let table = agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    assert_eq!(
        destinations(&table, "TCP", &format!("{vip}:80")),
        ["10.244.1.10:8080", "10.244.1.11:8080"]
    );
    for resource in ["services", "endpointslices", "node"] {
        let synced = agent
            .metric(&format!("topoproxy_api_synced{{resource=\"{resource}\"}}"))
            .await;
        assert_eq!(synced, Some(1.0), "{resource} synced");
    }
    let log = agent.log();
    assert!(
        !log.lines().any(mentions_status_403),
        "no request was refused:\n{log}"
    );
}

/// Removing any one resource from the shipped ClusterRole makes the agent say so: an error
/// log naming the resource and the 403, `/healthz` 503 with the API's message, the watch
/// error counter; restoring the rule heals it without a restart.
#[tokio::test]
async fn every_rule_of_the_shipped_rbac_is_needed_and_a_missing_one_is_reported() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    let shipped = api_agent::base_manifests(&plane)
        .into_iter()
        .find(|o| o["kind"] == "ClusterRole")
        .expect("a ClusterRole in manifests/base");
    let rules = shipped["rules"].as_array().cloned().unwrap_or_default();
    let mut cases = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        for resource in rule["resources"].as_array().cloned().unwrap_or_default() {
            cases.push((index, resource.as_str().unwrap_or_default().to_owned()));
        }
    }
    assert!(
        cases.len() >= 3,
        "the role grants services, nodes and endpointslices"
    );
    for (index, resource) in cases {
        // ServiceImports are watched only with a cluster id, and only once their CRD exists.
        let mcs = resource == "serviceimports";
        if mcs {
            install_service_import_crd(&client).await;
        }
        let mut reduced = shipped.clone();
        let kept: Vec<Value> = rules[index]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r.as_str() != Some(resource.as_str()))
            .cloned()
            .collect();
        if kept.is_empty() {
            reduced["rules"]
                .as_array_mut()
                .expect("rules")
                .remove(index);
        } else {
            reduced["rules"][index]["resources"] = Value::from(kept);
        }
        let token = install_agent_identity(&plane, &client, Some(reduced)).await;
        let extra: &[&str] = if mcs { &["--cluster-id", "west"] } else { &[] };
        let agent = ApiAgent::start_with(&plane, &Auth::Token(token), "node-a1", extra);
        eventually(
            &format!("without {resource}: the 403 reported"),
            CONVERGE,
            || async {
                let log = agent.log();
                let logged = log.lines().any(|l| {
                    l.contains("ERROR")
                        && mentions_status_403(l)
                        && l.contains(resource.trim_end_matches('s'))
                });
                let health = agent.healthz().await?;
                let errors = agent.metric("topoproxy_watch_errors_total").await?;
                (logged && health.0 == 503 && health.1.contains("forbidden") && errors >= 1.0)
                    .then_some(())
            },
        )
        .await;
        // Back to the shipped role: the watcher's retries pick it up.
        apply(&client, shipped.clone()).await;
        agent.wait_healthy(Duration::from_secs(120)).await;
    }
}

#[tokio::test]
async fn topology_hints_from_the_real_controller_drive_the_table() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    create_namespace(&client, "topo").await;
    let all = ["node-a1", "node-a2", "node-b1", "node-b2"];
    let ns = "topo";
    let auto = service(
        &client,
        ns,
        "auto",
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}}}),
    )
    .await;
    let old = service(&client, ns, "old", json!({"metadata": {"annotations": {"service.kubernetes.io/topology-aware-hints": "auto"}}})).await;
    let close = service(
        &client,
        ns,
        "close",
        json!({"spec": {"trafficDistribution": "PreferClose"}}),
    )
    .await;
    let zone = service(
        &client,
        ns,
        "zone",
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
    )
    .await;
    let same_node = service(
        &client,
        ns,
        "samenode",
        json!({"spec": {"trafficDistribution": "PreferSameNode"}}),
    )
    .await;
    let only_b = service(
        &client,
        ns,
        "onlyb",
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
    )
    .await;
    let dual = service(
        &client,
        ns,
        "dual",
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
               "spec": {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}}),
    )
    .await;
    let auto_pods = pods(&client, ns, "auto", &all, 1).await;
    pods(&client, ns, "old", &all, 2).await;
    pods(&client, ns, "close", &all, 3).await;
    pods(&client, ns, "zone", &all, 4).await;
    pods(&client, ns, "samenode", &["node-a1", "node-b1"], 5).await;
    pods(&client, ns, "onlyb", &["node-b1", "node-b2"], 6).await;
    for (i, node) in ["node-a1", "node-b1"].iter().enumerate() {
        let mut spec = PodSpec::new(
            ns,
            &format!("dual-{i}"),
            node,
            "dual",
            &format!("10.244.7.{}", i + 10),
        );
        spec.ips.push(format!("fd00:10:244:7::{}", i + 10));
        create_pod(&client, &spec, true).await;
    }
    for name in ["auto", "old", "close", "zone"] {
        wait_for_hints(&client, ns, name, 4, true).await;
    }
    wait_for_hints(&client, ns, "onlyb", 2, true).await;
    wait_for_hints(&client, ns, "dual", 4, true).await;

    let token = install_agent_identity(&plane, &client, None).await;
    let a1 = ApiAgent::start(&plane, &Auth::Token(token.clone()), "node-a1");
    let b1 = ApiAgent::start(&plane, &Auth::Token(token), "node-b1");
    let table = a1
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    b1.converges(&client, &scratch(&plane, "b1"), CONVERGE)
        .await;
    let zone_a = |subnet: u8| {
        vec![
            format!("10.244.{subnet}.10:8080"),
            format!("10.244.{subnet}.11:8080"),
        ]
    };
    assert_eq!(
        destinations(&table, "TCP", &format!("{auto}:80")),
        zone_a(1),
        "Auto"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{old}:80")),
        zone_a(2),
        "old annotation"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{close}:80")),
        zone_a(3),
        "PreferClose"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{zone}:80")),
        zone_a(4),
        "PreferSameZone"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{same_node}:80")),
        ["10.244.5.10:8080"],
        "PreferSameNode: this node's pod only"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{only_b}:80")),
        ["10.244.6.10:8080", "10.244.6.11:8080"],
        "a zone without endpoints uses every endpoint"
    );
    assert_eq!(
        destinations(&table, "TCP", &format!("{dual}:80")),
        ["10.244.7.10:8080"]
    );
    let dual_services: Api<Service> = Api::namespaced(client.clone(), ns);
    let dual_ips = dual_services
        .get("dual")
        .await
        .expect("dual")
        .spec
        .and_then(|s| s.cluster_ips)
        .unwrap_or_default();
    let v6 = dual_ips
        .iter()
        .find(|ip| ip.contains(':'))
        .expect("an IPv6 ClusterIP");
    assert_eq!(
        destinations(&table, "TCP", &format!("[{v6}]:80")),
        ["[fd00:10:244:7::10]:8080"]
    );

    // Scaling Auto down to one endpoint: the controller's safeguard drops its hints and every
    // node falls back to all endpoints.
    for pod in &auto_pods[1..] {
        delete_pod(&client, ns, &pod.name, 0).await;
    }
    wait_for_hints(&client, ns, "auto", 1, false).await;
    let table = a1
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    assert_eq!(
        destinations(&table, "TCP", &format!("{auto}:80")),
        ["10.244.1.10:8080"]
    );
    b1.converges(&client, &scratch(&plane, "b1"), CONVERGE)
        .await;
    let falling_back = a1.metric("topoproxy_services_falling_back").await;
    assert!(
        falling_back >= Some(1.0),
        "the fallback is counted: {falling_back:?}"
    );

    // A not-Ready pod leaves the table; Ready again, it returns.
    set_pod_status(&client, &auto_pods[0], false).await;
    eventually(
        "the controller marks the endpoint not ready",
        CONVERGE,
        || async {
            let slices = slices_of(&client, ns, "auto").await;
            let mut endpoints = slices.iter().flat_map(|s| s.endpoints.iter());
            endpoints
                .all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
                .then_some(())
        },
    )
    .await;
    let table = a1
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    assert!(destinations(&table, "TCP", &format!("{auto}:80")).is_empty());
    set_pod_status(&client, &auto_pods[0], true).await;
    a1.converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;

    // A node without a zone label: the controller removes every Auto hint (it cannot weigh
    // zones), and an agent on that node plans as kube-proxy does without a zone.
    create_node(&client, &NodeSpec::new("node-x1", None, "10.0.9.1")).await;
    wait_for_hints(&client, ns, "old", 4, false).await;
    let table = a1
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    assert_eq!(
        destinations(&table, "TCP", &format!("{old}:80")).len(),
        4,
        "hints gone"
    );
    let token = install_agent_identity(&plane, &client, None).await;
    let x1 = ApiAgent::start(&plane, &Auth::Token(token), "node-x1");
    let table = x1
        .converges(&client, &scratch(&plane, "x1"), CONVERGE)
        .await;
    assert_eq!(
        destinations(&table, "TCP", &format!("{zone}:80")).len(),
        4,
        "no zone: all"
    );
}

/// The tiers of the virtual server `address:port` in a `/plan?format=json` document: (kind,
/// share in ppm, backend addresses), nearest first. Without a locality policy (no
/// `sharePpm`), the first tier takes everything, as kube-proxy programs it.
fn tiers_of(plan: &Value, address: &str, port: u16) -> Vec<(String, u64, Vec<String>)> {
    let servers = plan["virtualServers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let Some(server) = servers
        .iter()
        .find(|vs| vs["key"]["address"] == address && vs["key"]["port"] == port)
    else {
        return Vec::new();
    };
    let tiers = server["tiers"].as_array().cloned().unwrap_or_default();
    tiers
        .iter()
        .enumerate()
        .map(|(position, tier)| {
            let whole_if_first = if position == 0 { 1_000_000 } else { 0 };
            let mut backends: Vec<String> = tier["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["address"].as_str().map(str::to_owned))
                .collect();
            backends.sort();
            (
                tier["kind"].as_str().unwrap_or_default().to_owned(),
                tier["sharePpm"].as_u64().unwrap_or(whole_if_first),
                backends,
            )
        })
        .collect()
}

/// The share (0 to 1) of new connections the node sends into `zone_backends`, from `tiers`.
fn share_into(tiers: &[(String, u64, Vec<String>)], zone_backends: &[&str]) -> f64 {
    let mut share = 0.0;
    for (_, ppm, backends) in tiers {
        if backends.is_empty() {
            continue;
        }
        let inside = backends
            .iter()
            .filter(|b| zone_backends.contains(&b.as_str()))
            .count();
        share += *ppm as f64 / 1e6 * inside as f64 / backends.len() as f64;
    }
    share
}

#[tokio::test]
async fn hints_vanishing_and_a_thinning_zone_spill_gradually_under_the_zone_policy() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    let ns = "spill";
    create_namespace(&client, ns).await;
    let all = ["node-a1", "node-a2", "node-b1", "node-b2"];
    let auto = json!({"service.kubernetes.io/topology-mode": "Auto"});
    let kp = service(
        &client,
        ns,
        "kp",
        json!({"metadata": {"annotations": auto}}),
    )
    .await;
    let near_annotations = json!({
        "service.kubernetes.io/topology-mode": "Auto",
        "topoproxy.io/topology": "zone",
    });
    let near = service(
        &client,
        ns,
        "near",
        json!({"metadata": {"annotations": near_annotations}}),
    )
    .await;
    pods(&client, ns, "kp", &all, 1).await;
    let near_pods = pods(&client, ns, "near", &all, 2).await;
    wait_for_hints(&client, ns, "kp", 4, true).await;
    wait_for_hints(&client, ns, "near", 4, true).await;
    let zone_a_kp = ["10.244.1.10", "10.244.1.11"];
    let zone_a_near = ["10.244.2.10", "10.244.2.11"];

    let token = install_agent_identity(&plane, &client, None).await;
    let a1 = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    a1.converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let plan = a1.plan_json().await.expect("/plan?format=json");
    // With hints, both keep every connection in zone-a.
    assert_eq!(share_into(&tiers_of(&plan, &kp, 80), &zone_a_kp), 1.0);
    let tiers = tiers_of(&plan, &near, 80);
    assert_eq!(share_into(&tiers, &zone_a_near), 1.0, "{tiers:?}");
    assert_eq!(tiers[0].0, "SameZone", "{tiers:?}");

    // A node without a zone makes the controller drop every hint (kubernetes#114215's
    // cliff): kube-proxy's set becomes the whole cluster, the zone policy stays in zone-a
    // from the endpoints' own zones.
    create_node(&client, &NodeSpec::new("node-x1", None, "10.0.9.1")).await;
    wait_for_hints(&client, ns, "kp", 4, false).await;
    wait_for_hints(&client, ns, "near", 4, false).await;
    a1.converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let plan = a1.plan_json().await.expect("/plan?format=json");
    let kp_tiers = tiers_of(&plan, &kp, 80);
    assert_eq!(
        share_into(&kp_tiers, &zone_a_kp),
        0.5,
        "the cliff: {kp_tiers:?}"
    );
    let tiers = tiers_of(&plan, &near, 80);
    assert_eq!(tiers[0].0, "SameZone", "{tiers:?}");
    assert_eq!(tiers[0].2, zone_a_near, "{tiers:?}");
    let in_zone = share_into(&tiers, &zone_a_near);
    assert!(
        in_zone >= 0.99,
        "hints gone, zone kept: {in_zone} {tiers:?}"
    );

    // A rollout in zone-a: one of its two pods not Ready. The zone tier thins and hands a
    // share of new connections to the rest of the cluster instead of all or nothing.
    set_pod_status(&client, &near_pods[1], false).await;
    eventually(
        "the controller marks near-1 not ready",
        CONVERGE,
        || async {
            let slices = slices_of(&client, ns, "near").await;
            let not_ready = slices
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(false))
                .count();
            (not_ready == 1).then_some(())
        },
    )
    .await;
    a1.converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let plan = a1.plan_json().await.expect("/plan?format=json");
    let tiers = tiers_of(&plan, &near, 80);
    let shares: u64 = tiers.iter().map(|t| t.1).sum();
    assert_eq!(shares, 1_000_000, "shares sum to the whole: {tiers:?}");
    let in_zone = share_into(&tiers, &zone_a_near);
    eprintln!("zone-a thinning, node-a1 sends {in_zone} into zone-a: {tiers:?}");
    assert!(
        in_zone > 0.5 && in_zone < 1.0,
        "a thinning zone spills a share, and keeps more than kube-proxy's fallback: {in_zone} {tiers:?}"
    );
    let served = a1
        .metric("topoproxy_locality_programmed_share{tier=\"cluster\"}")
        .await;
    assert!(
        served > Some(0.0),
        "the spill shows in the metrics: {served:?}"
    );

    // Ready again: everything back in zone-a.
    set_pod_status(&client, &near_pods[1], true).await;
    eventually("near back in zone-a", CONVERGE, || async {
        let plan = a1.plan_json().await?;
        (share_into(&tiers_of(&plan, &near, 80), &zone_a_near) >= 0.99).then_some(())
    })
    .await;
}

/// Creates a Service `churn-N` and deletes `churn-(N-3)` in a loop through `client` until
/// stopped, ignoring errors (the apiserver may be down); counts the writes that succeeded.
struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Churn {
    fn start(client: Client, namespace: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let services: Api<Service> = Api::namespaced(client, namespace);
        let task = tokio::spawn({
            let (stop, done) = (stop.clone(), done.clone());
            async move {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let service: Service = serde_json::from_value(json!({
                        "metadata": {"name": format!("churn-{n}")},
                        "spec": {"ports": [{"port": 80}]},
                    }))
                    .expect("a Service");
                    if services
                        .create(&PostParams::default(), &service)
                        .await
                        .is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    if n >= 3 {
                        let old = format!("churn-{}", n - 3);
                        if services
                            .delete(&old, &DeleteParams::default())
                            .await
                            .is_ok()
                        {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Self { stop, done, task }
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.done.load(Ordering::Relaxed)
    }
}

/// A world whose table has `stable` virtual servers that never go away: the `kubernetes`
/// Service plus one Service with two pods.
async fn stable_world(client: &Client) -> usize {
    four_nodes(client).await;
    create_namespace(client, "stable").await;
    create_namespace(client, "churn").await;
    service(client, "stable", "web", json!({})).await;
    pods(client, "stable", "web", &["node-a1", "node-b1"], 1).await;
    2
}

#[tokio::test]
async fn an_apiserver_killed_and_restarted_while_objects_change_never_empties_the_table() {
    let _serial = serial().await;
    let mut plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    let stable = stable_world(&client).await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let sampler = agent.sample_table();
    let churn = Churn::start(client.clone(), "churn");
    for _ in 0..2 {
        let before = churn.done.load(Ordering::Relaxed);
        eventually("objects change before the kill", CONVERGE, || async {
            (churn.done.load(Ordering::Relaxed) >= before + 4).then_some(())
        })
        .await;
        plane.kill_apiserver(0);
        plane.start_apiserver(0);
        plane.wait_apiserver_ready(0).await;
    }
    let writes = churn.finish().await;
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let (samples, fewest) = sampler.finish().await;
    assert!(samples > 10, "the table was sampled ({samples})");
    assert!(
        fewest >= stable,
        "never fewer than {stable} virtual servers; saw {fewest}"
    );
    assert!(writes >= 8, "objects changed meanwhile ({writes} writes)");
}

#[tokio::test]
async fn two_apiservers_behind_a_load_balancer_each_killed_in_turn() {
    let _serial = serial().await;
    let mut plane = ControlPlane::start(Options {
        apiservers: 2,
        load_balancer: true,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    let stable = stable_world(&client).await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let sampler = agent.sample_table();
    let churn = Churn::start(client.clone(), "churn");
    for victim in [0, 1, 0] {
        plane.kill_apiserver(victim);
        let before = churn.done.load(Ordering::Relaxed);
        // With one apiserver down, writes through the load balancer keep succeeding.
        eventually(
            "writes through the surviving apiserver",
            CONVERGE,
            || async { (churn.done.load(Ordering::Relaxed) >= before + 4).then_some(()) },
        )
        .await;
        plane.start_apiserver(victim);
        plane.wait_apiserver_ready(victim).await;
    }
    churn.finish().await;
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let (_, fewest) = sampler.finish().await;
    assert!(
        fewest >= stable,
        "never fewer than {stable} virtual servers; saw {fewest}"
    );
}

/// The agent's apiserver killed; objects created and deleted through a second apiserver;
/// etcd compacted past the agent's resourceVersion; the first apiserver back (a fresh watch
/// cache). The agent's re-watch gets 410 Gone, it re-lists, and the deletions it never saw as
/// events leave its table.
#[tokio::test]
async fn etcd_compaction_forces_a_relist_that_catches_deletions() {
    let _serial = serial().await;
    let mut plane = ControlPlane::start(Options {
        apiservers: 2,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    stable_world(&client).await;
    for i in 0..5 {
        service(&client, "churn", &format!("doomed-{i}"), json!({})).await;
    }
    let token = install_agent_identity(&plane, &client, None).await;
    // Without a load balancer the agent talks to apiserver 0 only.
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;

    plane.kill_apiserver(0);
    let other = plane.apiserver_client(1).await;
    let services: Api<Service> = Api::namespaced(other.clone(), "churn");
    for i in 0..5 {
        services
            .delete(&format!("doomed-{i}"), &DeleteParams::default())
            .await
            .expect("deleting a Service");
        service(&other, "churn", &format!("born-{i}"), json!({})).await;
    }
    plane.compact_etcd();
    plane.start_apiserver(0);
    plane.wait_apiserver_ready(0).await;

    let table = agent
        .converges(&other, &scratch(&plane, "a1"), CONVERGE)
        .await;
    assert!(!table.is_empty());
    eventually("a 410 Gone made the agent re-list", CONVERGE, || async {
        let relists = agent.metric("topoproxy_watch_restarts_total").await?;
        (relists >= 1.0).then_some(())
    })
    .await;
    assert!(
        agent.log().contains("too old resource version"),
        "the re-watch was refused with 410"
    );
}

/// 3,000 Services with their EndpointSlices (written directly: no selector, so the
/// controller leaves them alone): the agent's lists are paged (kube-runtime asks for 500 per
/// page), and Services created and deleted while it lists are not lost.
#[tokio::test]
async fn three_thousand_services_listed_in_pages_with_changes_during_the_list() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    create_namespace(&client, "bulk").await;
    let create = |i: usize| {
        let client = client.clone();
        async move { create_bulk_service(&client, i).await }
    };
    futures::stream::iter(0..3000)
        .map(create)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    let services: Api<Service> = Api::namespaced(client.clone(), "bulk");
    for i in 0..100 {
        let _ = services
            .delete(&format!("bulk-{i}"), &DeleteParams::default())
            .await;
        create_bulk_service(&client, 3000 + i).await;
    }
    let table = agent
        .converges(&client, &scratch(&plane, "a1"), Duration::from_secs(180))
        .await;
    assert_eq!(
        api_agent::virtual_servers(&table),
        3001,
        "3,000 Services and kubernetes"
    );
}

async fn create_bulk_service(client: &Client, i: usize) {
    let name = format!("bulk-{i}");
    let (third, fourth) = (i / 250, i % 250 + 1);
    apply(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bulk"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }),
    )
    .await;
    apply(
        client,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "bulk", "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "topoproxy-test",
            }},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [format!("10.245.{third}.{fourth}")], "conditions": {"ready": true},
                 "nodeName": "node-a1", "zone": "zone-a"},
                {"addresses": [format!("10.246.{third}.{fourth}")], "conditions": {"ready": true},
                 "nodeName": "node-b1", "zone": "zone-b"},
            ],
        }),
    )
    .await;
}

#[tokio::test]
async fn an_agent_started_before_the_apiserver_syncs_once_it_is_up() {
    let _serial = serial().await;
    let mut plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    stable_world(&client).await;
    let token = install_agent_identity(&plane, &client, None).await;
    plane.kill_apiserver(0);
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    eventually(
        "the agent reports the API unreachable",
        CONVERGE,
        || async {
            let health = agent.healthz().await?;
            (health.0 == 503 && agent.log().contains("watch failed")).then_some(())
        },
    )
    .await;
    plane.start_apiserver(0);
    plane.wait_apiserver_ready(0).await;
    agent.wait_healthy(Duration::from_secs(120)).await;
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
}

#[tokio::test]
async fn its_own_node_deleted_recreated_and_moved_to_another_zone() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    create_namespace(&client, "topo").await;
    let all = ["node-a1", "node-a2", "node-b1", "node-b2"];
    let vip = service(
        &client,
        "topo",
        "auto",
        json!({"metadata": {"annotations": {"service.kubernetes.io/topology-mode": "Auto"}}}),
    )
    .await;
    pods(&client, "topo", "auto", &all, 1).await;
    wait_for_hints(&client, "topo", "auto", 4, true).await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    let table = agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let frontend = format!("{vip}:80");
    assert_eq!(
        destinations(&table, "TCP", &frontend),
        ["10.244.1.10:8080", "10.244.1.11:8080"]
    );

    let sampler = agent.sample_table();
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .delete("node-a1", &DeleteParams::default())
        .await
        .expect("deleting the agent's Node");
    eventually("the deletion is seen", CONVERGE, || async {
        agent
            .log()
            .contains("this node's Node object was deleted")
            .then_some(())
    })
    .await;
    let mut spec = NodeSpec::new("node-a1", Some("zone-a"), "10.0.1.1");
    create_node(&client, &spec).await;
    agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let (_, fewest) = sampler.finish().await;
    assert!(
        fewest >= 2,
        "the table stayed while the Node was gone ({fewest})"
    );

    // Moved to zone-b: the table follows zone-b's hints.
    spec.zone = Some("zone-b".to_owned());
    let labels = json!({"metadata": {"labels": {ZONE_LABEL: "zone-b"}}});
    nodes
        .patch("node-a1", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("relabelling the Node");
    // The controller re-balances hints for the changed zone sizes; the oracle follows it.
    let table = agent
        .converges(&client, &scratch(&plane, "a1"), CONVERGE)
        .await;
    let now = destinations(&table, "TCP", &frontend);
    assert!(
        !now.is_empty() && now != ["10.244.1.10:8080", "10.244.1.11:8080"],
        "zone-b's endpoints now: {now:?}"
    );
}

/// Other Nodes' regions reach the agent only through its metadata-only watch of every Node
/// (slices carry zones, never regions): a Node moved into this node's region, and another
/// whose region label is removed, move their endpoints between the zone policy's region and
/// cluster tiers.
#[tokio::test]
async fn other_nodes_moving_between_regions_move_their_endpoints_between_tiers() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options {
        controller_manager: false,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    for (name, zone, region, ip) in [
        ("node-a1", "zone-a", "region-1", "10.0.1.1"),
        ("node-b1", "zone-b", "region-2", "10.0.2.1"),
        ("node-c1", "zone-c", "region-1", "10.0.3.1"),
    ] {
        let mut spec = NodeSpec::new(name, Some(zone), ip);
        spec.region = Some(region.to_owned());
        create_node(&client, &spec).await;
    }
    let ns = "regions";
    create_namespace(&client, ns).await;
    let annotations = json!({"topoproxy.io/topology": "zone"});
    let vip = service(
        &client,
        ns,
        "near",
        json!({"metadata": {"annotations": annotations}}),
    )
    .await;
    // Written here, as the EndpointSlice controller would (it is not running).
    let endpoint = |address: &str, node: &str, zone: &str| {
        json!({"addresses": [address], "conditions": {"ready": true},
               "nodeName": node, "zone": zone})
    };
    apply(
        &client,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "near-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": "near"}},
            "addressType": "IPv4",
            "endpoints": [endpoint("10.244.2.10", "node-b1", "zone-b"),
                          endpoint("10.244.3.10", "node-c1", "zone-c")],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }),
    )
    .await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start(&plane, &Auth::Token(token), "node-a1");
    let region_tier = |want: &'static [&'static str]| {
        let agent = &agent;
        let vip = &vip;
        async move {
            eventually(
                &format!("the region tier holds {want:?}"),
                CONVERGE,
                || async {
                    let plan = agent.plan_json().await?;
                    let tiers = tiers_of(&plan, vip, 80);
                    let region: Vec<&str> = tiers
                        .iter()
                        .filter(|tier| tier.0 == "SameRegion")
                        .flat_map(|tier| tier.2.iter().map(String::as_str))
                        .collect();
                    (region == want).then_some(())
                },
            )
            .await;
        }
    };
    region_tier(&["10.244.3.10"]).await;

    let nodes: Api<Node> = Api::all(client.clone());
    let relabel = |name: &'static str, region: Value| {
        let nodes = nodes.clone();
        async move {
            let patch = json!({"metadata": {"labels": {REGION_LABEL: region}}});
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| panic!("relabelling {name}: {e}"));
        }
    };
    relabel("node-b1", json!("region-1")).await;
    region_tier(&["10.244.2.10", "10.244.3.10"]).await;
    relabel("node-c1", Value::Null).await;
    region_tier(&["10.244.2.10"]).await;
}

/// Every kustomize overlay (rendered by the real kustomize) and every mode of the Helm chart
/// (rendered by the real helm) passes a server-side dry run on the real apiserver (schema,
/// defaulting, admission, RBAC of the objects themselves).
#[tokio::test]
async fn every_overlay_and_chart_mode_passes_a_server_side_dry_run() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options {
        controller_manager: false,
        ..Options::default()
    })
    .await;
    let client = plane.admin_client().await;
    let manifests = api_agent::workspace_root().join("manifests");
    let mut dirs = vec![manifests.join("base")];
    let mut overlays: Vec<_> = std::fs::read_dir(manifests.join("overlays"))
        .expect("manifests/overlays")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    overlays.sort();
    assert!(
        overlays.len() >= 4,
        "ipvs, ebpf, shadow, cutover: {overlays:?}"
    );
    dirs.extend(overlays);
    let mut renders = Vec::new();
    for dir in &dirs {
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        renders.push((name, plane.binaries().kustomize_build(dir)));
    }
    // The Helm chart, each mode (the ServiceMonitor needs the Prometheus operator's CRD, which
    // this cluster does not have).
    for mode in ["shadow", "ipvs", "ebpf"] {
        let yaml = process::stdout_of(
            std::process::Command::new(&plane.binaries().helm)
                .args(["template", "topoproxy"])
                .arg(api_agent::workspace_root().join("charts/topoproxy"))
                .args(["--namespace", "kube-system", "--kube-version", "1.36.3"])
                .args(["--set", &format!("mode={mode}")]),
            "helm template",
        );
        renders.push((format!("chart mode={mode}"), yaml));
    }
    let mut failures = BTreeMap::new();
    let mut checked = 0;
    for (render, yaml) in renders {
        for object in yaml_documents(&yaml) {
            let what = format!(
                "{render}: {} {}",
                object["kind"].as_str().unwrap_or("?"),
                object["metadata"]["name"].as_str().unwrap_or("?")
            );
            checked += 1;
            if let Err(error) = apply_object(&client, object, true).await {
                failures.insert(what, error);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "server-side dry run refused: {failures:#?}"
    );
    assert!(
        checked >= 30,
        "every overlay and chart mode rendered objects ({checked})"
    );
}

/// The ServiceImport CRD of `tests/k8s/serviceimport-crd.yaml`, applied and established.
async fn install_service_import_crd(client: &Client) {
    let text = std::fs::read_to_string(
        api_agent::workspace_root().join("tests/k8s/serviceimport-crd.yaml"),
    )
    .expect("reading the ServiceImport CRD");
    for object in yaml_documents(&text) {
        apply(client, object).await;
    }
    // A CRD serves its resource only once it is established.
    eventually("the ServiceImport CRD is served", CONVERGE, || async {
        client
            .list_api_group_resources("multicluster.x-k8s.io/v1alpha1")
            .await
            .ok()
            .filter(|list| list.resources.iter().any(|r| r.name == "serviceimports"))
            .map(|_| ())
    })
    .await;
}

/// An imported EndpointSlice of ServiceImport `shop/web` from `cluster`: `(address, ready)`
/// endpoints on port `http` 8080, as an MCS implementation writes them.
fn imported_slice(cluster: &str, endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, ready)| json!({"addresses": [address], "conditions": {"ready": ready}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("web-{cluster}"), "namespace": "shop",
            "labels": {
                "multicluster.kubernetes.io/service-name": "web",
                "multicluster.kubernetes.io/source-cluster": cluster,
                "endpointslice.kubernetes.io/managed-by": "mcs-test.topoproxy.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// The real servers of `frontend` with their weights, from an `ipvsadm -Ln` text.
fn weighted_destinations(table: &str, frontend: &str) -> Vec<(String, u32)> {
    let mut lines = table.lines();
    let mut found = Vec::new();
    while let Some(line) = lines.next() {
        if line
            .strip_prefix("TCP ")
            .and_then(|l| l.split_whitespace().next())
            != Some(frontend)
        {
            continue;
        }
        for dest in lines.by_ref() {
            let Some(rest) = dest.trim_start().strip_prefix("-> ") else {
                break;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(address), Some(weight)) = (fields.first(), fields.get(2)) {
                found.push(((*address).to_owned(), weight.parse().unwrap_or(0)));
            }
        }
        break;
    }
    found.sort();
    found
}

/// Clusterset VIPs against the real control plane: the agent starts before the MCS CRD exists
/// (healthy, no watch errors, said once), picks the CRD up when it appears, and programs the
/// ServiceImport's clusterset IP from the imported slices: this cluster's endpoints while it
/// has them, spilling to the other cluster as it thins, all remote when scaled to zero, and
/// back home when it returns.
#[tokio::test]
async fn mcs_clusterset_ip_serves_this_cluster_first_and_another_when_scaled_to_zero() {
    let _serial = serial().await;
    let plane = ControlPlane::start(Options::default()).await;
    let client = plane.admin_client().await;
    four_nodes(&client).await;
    create_namespace(&client, "shop").await;
    let token = install_agent_identity(&plane, &client, None).await;
    let agent = ApiAgent::start_with(
        &plane,
        &Auth::Token(token),
        "node-a1",
        &["--cluster-id", "west"],
    );
    agent.wait_healthy(CONVERGE).await;
    eventually("the missing CRD is reported", CONVERGE, || async {
        agent
            .log()
            .contains("the ServiceImport CRD is not installed")
            .then_some(())
    })
    .await;

    install_service_import_crd(&client).await;
    apply(
        &client,
        json!({
            "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterSetIP", "ips": ["10.42.0.10"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
        }),
    )
    .await;
    let west = [("10.244.1.10", true), ("10.244.1.11", true)];
    apply(&client, imported_slice("west", &west)).await;
    apply(
        &client,
        imported_slice("east", &[("10.8.0.1", true), ("10.8.0.2", true)]),
    )
    .await;
    let frontend = "10.42.0.10:80";
    let wait_for = |what: &'static str, want: Vec<(&'static str, u32)>| {
        let agent = &agent;
        async move {
            let want: Vec<(String, u32)> = want
                .into_iter()
                .map(|(address, weight)| (address.to_owned(), weight))
                .collect();
            eventually(what, CONVERGE, || async {
                let table = agent.plan().await?;
                (weighted_destinations(&table, frontend) == want).then_some(())
            })
            .await;
        }
    };
    wait_for(
        "this cluster's endpoints only",
        vec![("10.244.1.10:8080", 1), ("10.244.1.11:8080", 1)],
    )
    .await;
    let table = agent.plan().await.unwrap_or_default();
    assert!(table.contains("TCP  10.42.0.10:80 wrr"), "{table}");

    // Half of this cluster not ready: Envoy's 70/30 with the other cluster.
    apply(
        &client,
        imported_slice("west", &[("10.244.1.10", true), ("10.244.1.11", false)]),
    )
    .await;
    wait_for(
        "this cluster thins and hands 30 % over",
        vec![
            ("10.244.1.10:8080", 14),
            ("10.8.0.1:8080", 3),
            ("10.8.0.2:8080", 3),
        ],
    )
    .await;

    apply(&client, imported_slice("west", &[])).await;
    wait_for(
        "scaled to zero: the other cluster",
        vec![("10.8.0.1:8080", 1), ("10.8.0.2:8080", 1)],
    )
    .await;

    apply(&client, imported_slice("west", &west)).await;
    wait_for(
        "scaled back: home again",
        vec![("10.244.1.10:8080", 1), ("10.244.1.11:8080", 1)],
    )
    .await;

    let (status, body) = agent.healthz().await.unwrap_or_default();
    assert_eq!(status, 200, "{body}");
    let log = agent.log();
    assert_eq!(
        log.matches("the ServiceImport CRD is not installed")
            .count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("the ServiceImport CRD is installed; watching serviceimports"));
    let errors = agent
        .metric("topoproxy_watch_errors_total{resource=\"serviceimports\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(
        errors, 0.0,
        "no watch errors while the CRD was missing:\n{log}"
    );
}

/// Whether a log line carries HTTP status 403: the number on its own, not digits inside a
/// timestamp (`00:02:01.940381Z` once failed this test).
fn mentions_status_403(line: &str) -> bool {
    line.match_indices("403").any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + 3..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}
