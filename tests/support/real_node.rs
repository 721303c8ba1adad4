//! What the real-node tests check the same way on the host (eBPF) and in the VM guest (IPVS):
//! the echo Service with two backends and a client pod on one node, both backends answering
//! from the client pod, `topoproxy list` in the agent's pod against its `/plan`, the agent's
//! VmRSS, and a rolling update of the agent's DaemonSet under a client's asking.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_harness::node::RealNode;
use k8s_harness::objects::{apply, eventually};
use k8s_harness::workloads::{
    ask_repeatedly, echo_pod, helm, kubectl, pod_ready, post_renderer_args, wait_pods_ready,
};
use k8s_harness::ControlPlane;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
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

/// The image tag the chart deploys by default (`v` + the chart's appVersion).
pub const IMAGE: &str = "ghcr.io/topoproxy/topoproxy:v0.1.0";
/// The same image under another tag: a new pod template, so a real rolling update.
pub const NEXT_TAG: &str = "v0.1.0-next";

/// What the client pod's asking saw during a rolling update.
#[derive(Default)]
struct Asked {
    answered: u64,
    failed: u64,
    errors: String,
}

/// Rounds of asks of `address` from the client pod (one every 50 ms, each `round` long) until
/// `stop` is set and one more round has run. Sends on `began` as each round starts.
fn ask_in_rounds(
    (kubectl, kubeconfig): (PathBuf, PathBuf),
    address: String,
    round: Duration,
    stop: Arc<AtomicBool>,
    began: std::sync::mpsc::Sender<()>,
) -> Asked {
    let mut asked = Asked::default();
    let round = format!("{}s", round.as_secs());
    loop {
        let last = stop.load(Ordering::SeqCst);
        let _ = began.send(());
        let output = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "-n", NAMESPACE, "exec", "client", "--", "/tp-echo", "-connect",
            ])
            .arg(&address)
            .args(["-for", &round, "-every", "50ms", "-timeout", "2s"])
            .output();
        let summary = output
            .as_ref()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        match summary.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["answered", a, "failed", f] => {
                asked.answered += a.parse::<u64>().unwrap_or(0);
                asked.failed += f.parse::<u64>().unwrap_or(0);
                if let Ok(o) = &output {
                    asked.errors.push_str(&String::from_utf8_lossy(&o.stderr));
                }
            }
            _ => {
                asked.failed += 1;
                asked
                    .errors
                    .push_str(&format!("a round of asking failed: {output:?}\n"));
            }
        }
        if last {
            return asked;
        }
    }
}

/// `helm upgrade` to another image tag (the DaemonSet replaces the agent's pod: the old one
/// stops, the new one adopts what the old one programmed) while the client pod asks `address`
/// every 50 ms, from before the upgrade until after the new pod is Ready: no ask may fail.
/// Two askers, the second half a `round` behind the first, so one is asking while the other
/// starts its next round (each round is a `kubectl exec`, which takes seconds under TCG), and
/// each runs one more round after the rollout, so the asking covers all of it.
pub async fn rolling_update_loses_no_connection(
    plane: &ControlPlane,
    client: &Client,
    node: &RealNode,
    chart: &str,
    address: &str,
    round: Duration,
) {
    node.tag_image(IMAGE, &format!("ghcr.io/topoproxy/topoproxy:{NEXT_TAG}"));
    let stop = Arc::new(AtomicBool::new(false));
    let mut askers = Vec::new();
    for offset in [Duration::ZERO, round / 2] {
        tokio::time::sleep(offset).await;
        let (began, first_round) = std::sync::mpsc::channel();
        let binaries = (
            plane.binaries().kubectl.clone(),
            plane.admin_kubeconfig().to_owned(),
        );
        let (address, stop) = (address.to_owned(), stop.clone());
        askers.push(std::thread::spawn(move || {
            ask_in_rounds(binaries, address, round, stop, began)
        }));
        let _ = first_round.recv();
    }
    let started = Instant::now();
    let tag = format!("image.tag={NEXT_TAG}");
    let mut upgrade = vec![
        "upgrade",
        "topoproxy",
        chart,
        "-n",
        "kube-system",
        "--reuse-values",
        "--set",
        &tag,
    ];
    let post_renderer = post_renderer_args(plane, &[]);
    upgrade.extend(post_renderer.iter().map(String::as_str));
    helm(plane, &upgrade);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let selector = ListParams::default()
        .labels("app.kubernetes.io/name=topoproxy")
        .fields(&format!("spec.nodeName={}", node.name()));
    eventually(
        "the agent's pod replaced by one of the new tag, Ready",
        Duration::from_secs(300),
        || {
            let pods = pods.clone();
            let selector = selector.clone();
            async move {
                let list = pods.list(&selector).await.ok()?;
                let replaced = list.items.len() == 1
                    && list.items.iter().all(|pod| {
                        let image = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers.first())
                            .and_then(|c| c.image.clone())
                            .unwrap_or_default();
                        image.ends_with(NEXT_TAG) && pod_ready(pod)
                    });
                replaced.then_some(())
            }
        },
    )
    .await;
    let rolled = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut asked = Asked::default();
    for asker in askers {
        let one = asker.join().expect("an asking thread");
        asked.answered += one.answered;
        asked.failed += one.failed;
        asked.errors.push_str(&one.errors);
    }
    println!(
        "rolling update to {NEXT_TAG}: new pod Ready after {:.1} s; the client pod's asks \
         during it: answered {}, failed {}",
        rolled.as_secs_f64(),
        asked.answered,
        asked.failed
    );
    assert!(
        asked.failed == 0 && asked.answered > 0,
        "asks failed during the rolling update ({} answered, {} failed):\n{}",
        asked.answered,
        asked.failed,
        asked.errors
    );
}
