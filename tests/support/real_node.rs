//! What the real-node tests check the same way on the host (eBPF) and in the VM guest (IPVS):
//! the echo Service with two backends and a client pod on one node, both backends answering
//! from the client pod, `topoproxy list` in the agent's pod against its `/plan`, and the
//! agent's VmRSS.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_harness::objects::{apply, eventually};
use k8s_harness::workloads::{ask_repeatedly, echo_pod, kubectl, wait_pods_ready};
use k8s_harness::ControlPlane;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{Api, Client};

pub const NAMESPACE: &str = "shop";
pub const BACKENDS: [&str; 2] = ["echo-1", "echo-2"];

/// Creates the namespace, the two echo backends and the client pod on `node`, and `service`
/// (the echo Service, selecting `app: echo`); once every pod is Ready, the Service's ClusterIP
/// and the backends' pod IPs.
pub async fn echo_service_and_pods(
    plane: &ControlPlane,
    client: &Client,
    node: &str,
    service: serde_json::Value,
) -> (String, Vec<String>) {
    kubectl(plane, &["create", "namespace", NAMESPACE]).expect("creating the namespace");
    for name in BACKENDS {
        apply(client, echo_pod(NAMESPACE, name, node, "echo")).await;
    }
    apply(client, echo_pod(NAMESPACE, "client", node, "client")).await;
    apply(client, service).await;
    wait_pods_ready(client, plane, NAMESPACE, "app=echo", BACKENDS.len()).await;
    wait_pods_ready(client, plane, NAMESPACE, "app=client", 1).await;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let cluster_ip = services
        .get("echo")
        .await
        .ok()
        .and_then(|s| s.spec?.cluster_ip)
        .expect("the Service's ClusterIP");
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut backend_ips = Vec::new();
    for name in BACKENDS {
        let ip = pods
            .get(name)
            .await
            .ok()
            .and_then(|p| p.status?.pod_ip)
            .unwrap_or_else(|| panic!("{name} has no pod IP"));
        backend_ips.push(ip);
    }
    (cluster_ip, backend_ips)
}

/// Waits for the chart's agent pod to be Ready (its readiness probe: `/healthz`, healthy after
/// the first sync) and says how long it took since `installed` (`helm install`).
pub async fn agent_pod_ready(plane: &ControlPlane, client: &Client, installed: Instant) {
    wait_pods_ready(
        client,
        plane,
        "kube-system",
        "app.kubernetes.io/name=topoproxy",
        1,
    )
    .await;
    println!(
        "helm install → the agent's pod Ready (its /healthz after the first sync): {:.1} s",
        installed.elapsed().as_secs_f64()
    );
}

/// Both backends answer `address` from the client pod, over TCP and over UDP, in a round of
/// asks (every 100 ms for two seconds) in which none failed.
pub async fn both_backends_answer(plane: &ControlPlane, address: &str) {
    let expected: BTreeSet<String> = BACKENDS.iter().map(|s| (*s).to_owned()).collect();
    for udp in [false, true] {
        let extra: &[&str] = if udp { &["-udp"] } else { &[] };
        let expected = &expected;
        eventually(
            &format!("both backends answering {address} (udp: {udp}) from the client pod"),
            Duration::from_secs(120),
            || async move {
                match ask_repeatedly(plane, NAMESPACE, "client", address, ("2s", "100ms"), extra) {
                    Ok(answers) if answers.failed == 0 && answers.seen == *expected => Some(()),
                    Ok(answers) => {
                        eprintln!("{address} (udp: {udp}): {answers:?}");
                        None
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        None
                    }
                }
            },
        )
        .await;
    }
}

/// `kubectl exec ds/topoproxy -- topoproxy list --no-counters` (what the kernel holds, read by
/// the image's binary from the pod's mounts) equals the agent's `/plan` (what it planned), as
/// `read_plan` reads it on the node's loopback (the chart's metrics address, `hostNetwork`),
/// and shows `address`.
pub async fn list_in_the_pod_equals_the_plan(
    plane: &ControlPlane,
    read_plan: impl Fn() -> Option<String>,
    address: &str,
) {
    let exec = [
        "-n",
        "kube-system",
        "exec",
        "ds/topoproxy",
        "--",
        "topoproxy",
        "list",
        "--no-counters",
    ];
    // The two reads are not atomic: a sync may land between them, so they may disagree for
    // a moment; they must agree within the limit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (listed, planned) = loop {
        let listed = kubectl(plane, &exec)
            .unwrap_or_else(|e| panic!("topoproxy list in the agent's pod: {e}"));
        let planned = read_plan().unwrap_or_default();
        if listed == planned || Instant::now() > deadline {
            break (listed, planned);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        listed, planned,
        "`kubectl exec ds/topoproxy -- topoproxy list --no-counters` (left) is not the agent's /plan (right)"
    );
    assert!(
        listed.contains(address),
        "the list shows no {address}:\n{listed}"
    );
}

/// VmRSS of the agent's process (`topoproxy run`) among `pids`.
pub fn agent_rss_kib(pids: impl IntoIterator<Item = u32>) -> Option<u64> {
    pids.into_iter().find_map(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = words.first().is_some_and(|w| w.ends_with(b"topoproxy"))
            && words.get(1) == Some(&&b"run"[..]);
        if !is_agent {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
