//! What the real-node tests do as an operator would ([`crate::node::RealNode`]): `kubectl` and
//! `helm` with the admin kubeconfig, the chart rendered through a Helm post-renderer for what
//! this host cannot grant or the test must tell each node apart, pods of the echo image pinned
//! to a node, and waits for pods to be Ready that print the cluster's account of them when
//! they fail. Also the agent's clean-up when a test fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::json;

use crate::node::ECHO_IMAGE;
use crate::ControlPlane;

/// `kubectl` with the admin kubeconfig: its standard output, or the error with both outputs.
pub fn kubectl(plane: &ControlPlane, args: &[&str]) -> Result<String, String> {
    crate::stdout_of(
        Command::new(&plane.binaries().kubectl)
            .arg("--kubeconfig")
            .arg(plane.admin_kubeconfig())
            .args(args),
        "kubectl",
    )
}

/// What a client pod's repeated asks saw: the first word of every answer (the answering
/// pod's name from an echo backend, the answer itself from a DNS server), and how many asks
/// failed.
#[derive(Debug)]
pub struct Answers {
    pub seen: BTreeSet<String>,
    pub failed: u64,
}

/// Runs the echo image's client in pod `client` of `namespace` (one `kubectl exec`: under TCG
/// each costs seconds) asking `address` every `every` for `round`, with `extra` arguments
/// (`-udp`, a DNS question); what it saw, or why the round gave no summary.
pub fn ask_repeatedly(
    plane: &ControlPlane,
    namespace: &str,
    client: &str,
    address: &str,
    (round, every): (&str, &str),
    extra: &[&str],
) -> Result<Answers, String> {
    let mut args = vec![
        "-n", namespace, "exec", client, "--", "/tp-echo", "-connect", address, "-for", round,
        "-every", every, "-timeout", round,
    ];
    args.extend(extra);
    let out = kubectl(plane, &args)?;
    parse_answers(&out).ok_or_else(|| format!("no summary from {client} asking {address}: {out:?}"))
}

/// The client's output: one line per answer, then `answered N failed M`.
fn parse_answers(out: &str) -> Option<Answers> {
    let mut seen = BTreeSet::new();
    for line in out.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["answered", _, "failed", failed] => {
                return Some(Answers {
                    seen,
                    failed: failed.parse().ok()?,
                })
            }
            [first, ..] => {
                seen.insert((*first).to_owned());
            }
            [] => {}
        }
    }
    None
}

/// `helm` with the admin kubeconfig; panics with its output when it fails.
pub fn helm(plane: &ControlPlane, args: &[&str]) {
    let out = Command::new(&plane.binaries().helm)
        .arg("--kubeconfig")
        .arg(plane.admin_kubeconfig())
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may hand `CAP_SYS_RESOURCE` to a container (this machine kind's root
/// has every capability but that one in its bounding set).
pub fn can_grant_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|bounding| bounding >> CAP_SYS_RESOURCE & 1 == 1)
}

/// `--post-renderer <script>` arguments for `helm install`/`upgrade`, or none when nothing is
/// to change. The script (GNU sed over the rendered objects):
///
/// - drops `SYS_RESOURCE` from the chart's capabilities when this host cannot grant it (runc
///   fails "unable to apply caps" otherwise); the agent needs it only to raise
///   `RLIMIT_MEMLOCK` on kernels before 5.11 and goes on without it (a warning);
/// - appends `agent_args` to the agent's arguments, after `--hostname-override=$(NODE_NAME)`
///   (the kubelet expands `$(NODE_NAME)` in them): settings that differ per node, which one
///   DaemonSet's ConfigMap cannot give. The caller checks they landed
///   ([`daemonset_args`]).
pub fn post_renderer_args(plane: &ControlPlane, agent_args: &[String]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut expressions = Vec::new();
    if !can_grant_sys_resource() {
        println!("this host cannot grant CAP_SYS_RESOURCE: the chart is installed without it");
        expressions.push(r#"s/, "SYS_RESOURCE"//"#.to_owned());
    }
    if !agent_args.is_empty() {
        // One substitution for all of them: after it the line no longer ends where `$` of a
        // second one would match.
        let mut appended = String::new();
        for arg in agent_args {
            assert!(
                !arg.contains(['\'', '|', '&', '\\', '\n']),
                "{arg:?} does not fit in the post-renderer's sed expression"
            );
            appended.push_str(&format!(r"\n\1- {arg}"));
        }
        expressions.push(format!(
            r"s|^\( *\)- --hostname-override=\$(NODE_NAME)$|&{appended}|"
        ));
    }
    if expressions.is_empty() {
        return Vec::new();
    }
    let script: String = expressions
        .iter()
        .map(|e| format!(" -e '{e}'"))
        .collect::<String>();
    let path = plane.dir().join("post-renderer.sh");
    std::fs::write(&path, format!("#!/bin/sh\nexec sed{script}\n"))
        .expect("writing the post-renderer");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("making the post-renderer executable");
    vec![
        "--post-renderer".to_owned(),
        path.to_string_lossy().into_owned(),
    ]
}

/// `helm install topoproxy <chart> -n kube-system --set mode=ebpf` as the README has it,
/// pointed at the harness's API server (`api_host`, the node segment's host address) and with
/// the tc programs on `link` only (the default `auto` takes every device with a global
/// address, the CNI bridge included), plus `values` (`key=value`, each one `--set`) and the
/// post-renderer's per-node `agent_args` ([`post_renderer_args`]).
pub fn install_chart(
    plane: &ControlPlane,
    chart: &Path,
    api_host: std::net::Ipv4Addr,
    link: &str,
    values: &[String],
    agent_args: &[String],
) {
    let mut settings = vec![
        "mode=ebpf".to_owned(),
        format!("apiServer.port={}", plane.endpoint().port()),
        format!("apiServer.host={api_host}"),
        format!("config.north-south-interfaces={link}"),
    ];
    settings.extend(values.iter().cloned());
    install_chart_with(plane, chart, &settings, agent_args);
}

/// `helm install topoproxy <chart> -n kube-system --set mode=ipvs` as the README has it,
/// pointed at the API server at `api_host` (the apiserver's port).
pub fn install_chart_ipvs(plane: &ControlPlane, chart: &Path, api_host: std::net::Ipv4Addr) {
    let settings = [
        "mode=ipvs".to_owned(),
        format!("apiServer.port={}", plane.endpoint().port()),
        format!("apiServer.host={api_host}"),
    ];
    install_chart_with(plane, chart, &settings, &[]);
}

/// `helm install topoproxy <chart> -n kube-system`, each of `settings` a `--set`, through the
/// post-renderer ([`post_renderer_args`]).
fn install_chart_with(
    plane: &ControlPlane,
    chart: &Path,
    settings: &[String],
    agent_args: &[String],
) {
    let chart = chart.to_string_lossy();
    let mut install = vec!["install", "topoproxy", &chart, "-n", "kube-system"];
    for setting in settings {
        install.extend(["--set", setting.as_str()]);
    }
    let post_renderer = post_renderer_args(plane, agent_args);
    install.extend(post_renderer.iter().map(String::as_str));
    helm(plane, &install);
}

/// The arguments of the first container of DaemonSet `namespace/name`, as the API holds them.
pub async fn daemonset_args(client: &Client, namespace: &str, name: &str) -> Vec<String> {
    let sets: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(client.clone(), namespace);
    sets.get(name)
        .await
        .ok()
        .and_then(|set| set.spec?.template.spec?.containers.into_iter().next()?.args)
        .unwrap_or_default()
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the cluster says about the pods of `selector`, for a failure message.
pub fn describe(plane: &ControlPlane, namespace: &str, selector: &str) -> String {
    let pods = kubectl(
        plane,
        &["-n", namespace, "describe", "pods", "-l", selector],
    )
    .unwrap_or_else(|e| e);
    let logs = kubectl(
        plane,
        &[
            "-n",
            namespace,
            "logs",
            "-l",
            selector,
            "--tail",
            "30",
            "--all-containers",
        ],
    )
    .unwrap_or_else(|e| e);
    format!("{pods}\n--- logs ---\n{logs}")
}

/// Waits until `count` pods of `selector` are Ready; panics with [`describe`] after 240 s.
pub async fn wait_pods_ready(
    client: &Client,
    plane: &ControlPlane,
    namespace: &str,
    selector: &str,
    count: usize,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let limit = Duration::from_secs(240);
    let deadline = Instant::now() + limit;
    loop {
        let list = pods.list(&ListParams::default().labels(selector)).await;
        let ready = list
            .as_ref()
            .map(|l| l.items.iter().filter(|p| pod_ready(p)).count())
            .unwrap_or(0);
        if ready >= count {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{count} pod(s) {selector} in {namespace} not Ready within {limit:?}\n{}",
                describe(plane, namespace, selector)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pod of the echo image on `node`, labelled `app: <app>`: it answers `<pod name> <peer>`
/// on TCP and UDP port 8080, or is a client (`kubectl exec … /tp-echo -connect`).
pub fn echo_pod(namespace: &str, name: &str, node: &str, app: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "echo",
                "image": ECHO_IMAGE,
                "imagePullPolicy": "Never",
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }],
        },
    })
}

/// Runs `topoproxy cleanup` (eBPF) for each pin folder when dropped: a failing test must not
/// leave the agent's programs attached or pinned.
pub struct AgentCleanup {
    binary: PathBuf,
    pin_dirs: Vec<PathBuf>,
}

impl AgentCleanup {
    /// `binary` is the test's `topoproxy` (`env!("CARGO_BIN_EXE_topoproxy")`).
    pub fn new(binary: &Path, pin_dirs: &[&Path]) -> Self {
        Self {
            binary: binary.to_owned(),
            pin_dirs: pin_dirs.iter().map(|p| p.to_path_buf()).collect(),
        }
    }
}

impl Drop for AgentCleanup {
    fn drop(&mut self) {
        for dir in &self.pin_dirs {
            let _ = Command::new(&self.binary)
                .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir"])
                .arg(dir)
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_the_first_words_before_the_summary() {
        let out = "echo-1 10.244.1.9:41000\necho-2 10.244.1.9:41002\necho-1 10.244.1.9:41004\n\
                   answered 3 failed 1\n";
        let answers = parse_answers(out).expect("a summary");
        let expected: BTreeSet<String> = ["echo-1", "echo-2"].map(String::from).into();
        assert_eq!(answers.seen, expected);
        assert_eq!(answers.failed, 1);
    }

    #[test]
    fn a_round_without_its_summary_is_no_answer() {
        assert!(parse_answers("echo-1 10.244.1.9:41000\n").is_none());
        assert!(parse_answers("answered 3 failed many\n").is_none());
    }
}
