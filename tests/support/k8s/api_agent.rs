//! The agent as its own process against a real control plane (`k8s-harness`), and what tests
//! ask of it: `/plan`, `/healthz`, `/metrics`, and whether its table equals a fresh `plan` of
//! the same objects. The agent fed a directory of YAML instead is `cluster::YamlAgent`; what
//! the two share is `agent_process.rs`.
//!
//! Include with `#[path = "support/k8s/api_agent.rs"] mod api_agent;` beside
//! `support/agent_process.rs`, `support/http.rs` and `support/process.rs`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_harness::objects::{apply, dump_cluster, yaml_documents};
use k8s_harness::{ControlPlane, Daemon, Isolation, KubeconfigUser};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::agent_process::{add_run_args, agent_bin, Endpoints};
use crate::http::get_async;

/// The agent's ServiceAccount in `manifests/base`.
pub const SERVICE_ACCOUNT: (&str, &str) = ("kube-system", "topoproxy");
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The objects of `manifests/base` as the real kustomize renders them.
pub fn base_manifests(plane: &ControlPlane) -> Vec<Value> {
    let yaml = plane
        .binaries()
        .kustomize_build(&workspace_root().join("manifests/base"));
    yaml_documents(&yaml)
}

/// Applies the ServiceAccount and RBAC of `manifests/base` (the ClusterRole as given, so a
/// test can remove rules from it) and returns a token for the ServiceAccount (TokenRequest).
pub async fn install_agent_identity(
    plane: &ControlPlane,
    client: &Client,
    role: Option<Value>,
) -> String {
    for object in base_manifests(plane) {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ServiceAccount" | "ClusterRoleBinding" => apply(client, object).await,
            "ClusterRole" => apply(client, role.clone().unwrap_or(object)).await,
            _ => {}
        }
    }
    service_account_token(client).await
}

pub async fn service_account_token(client: &Client) -> String {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), SERVICE_ACCOUNT.0);
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [ISSUER], "expirationSeconds": 3600},
    });
    let reply: Value = accounts
        .create_subresource("token", SERVICE_ACCOUNT.1, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the agent's ServiceAccount");
    reply["status"]["token"]
        .as_str()
        .expect("a token in the TokenRequest status")
        .to_owned()
}

/// How the agent authenticates.
pub enum Auth {
    /// `--kubeconfig` with the ServiceAccount's token.
    Token(String),
    /// The in-cluster path: `KUBERNETES_SERVICE_HOST/PORT` and the token mounted where a
    /// Pod's service-account volume is.
    InCluster(String),
}

/// `topoproxy run --proxy-mode dry-run` against the control plane, killed on drop (its log
/// printed if the test failed).
pub struct ApiAgent {
    daemon: Daemon,
    pub node: String,
    pub metrics: SocketAddr,
    pub healthz: SocketAddr,
}

impl ApiAgent {
    pub fn start(plane: &ControlPlane, auth: &Auth, node: &str) -> Self {
        Self::start_with(plane, auth, node, &[])
    }

    pub fn start_with(plane: &ControlPlane, auth: &Auth, node: &str, extra: &[&str]) -> Self {
        let endpoints = Endpoints::on_loopback();
        let Endpoints { metrics, healthz } = endpoints;
        let log = plane
            .dir()
            .join(format!("agent-{node}-{}.log", metrics.port()));
        // Dry-run unless `extra` names a mode.
        let mode: &[&str] = if extra.contains(&"--proxy-mode") {
            &[]
        } else {
            &["--proxy-mode", "dry-run"]
        };
        let mut cmd = Command::new(agent_bin());
        add_run_args(&mut cmd, node, endpoints);
        cmd.args(mode)
            .args(extra)
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "info");
        let mut isolation = Isolation::default();
        match auth {
            Auth::Token(token) => {
                let path = plane.kubeconfig(
                    &format!("agent-{}.kubeconfig", metrics.port()),
                    &KubeconfigUser::Token(token.clone()),
                );
                cmd.arg("--kubeconfig").arg(path);
            }
            Auth::InCluster(token) => {
                let mount = plane
                    .dir()
                    .join(format!("serviceaccount-{}", metrics.port()));
                std::fs::create_dir_all(&mount).expect("creating the token folder");
                std::fs::write(mount.join("token"), token).expect("writing the token");
                std::fs::copy(&plane.pki().ca.cert, mount.join("ca.crt")).expect("copying ca.crt");
                std::fs::write(mount.join("namespace"), SERVICE_ACCOUNT.0).expect("namespace");
                let endpoint = plane.endpoint();
                cmd.env("KUBERNETES_SERVICE_HOST", endpoint.ip().to_string())
                    .env("KUBERNETES_SERVICE_PORT", endpoint.port().to_string());
                isolation.service_account = Some(mount);
            }
        }
        let daemon = Daemon::spawn(&format!("topoproxy on {node}"), cmd, &log, &isolation);
        Self {
            daemon,
            node: node.to_owned(),
            metrics,
            healthz,
        }
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    pub async fn plan(&self) -> Option<String> {
        get_async(self.metrics, "/plan")
            .await
            .and_then(|(status, body)| (status == 200).then_some(body))
    }

    /// `/plan?format=json`, parsed.
    pub async fn plan_json(&self) -> Option<serde_json::Value> {
        let (status, body) = get_async(self.metrics, "/plan?format=json").await?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub async fn healthz(&self) -> Option<(u16, String)> {
        get_async(self.healthz, "/healthz").await
    }

    /// The sum of the `/metrics` samples `selector` picks (a name, optionally with labels:
    /// `crate::http::metric_sum`), if any.
    pub async fn metric(&self, selector: &str) -> Option<f64> {
        let (_, body) = get_async(self.metrics, "/metrics").await?;
        crate::http::metric_sum(&body, selector)
    }

    /// Waits until `/healthz` answers 200.
    pub async fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let reply = self.healthz().await;
            if reply.as_ref().is_some_and(|(status, _)| *status == 200) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "agent on {} not healthy within {limit:?}: {reply:?}\n--- agent log ---\n{}",
                    self.node,
                    self.daemon.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/plan` equals what `topoproxy plan` computes from the objects the apiserver
    /// holds now (read afresh on every attempt).
    pub async fn converges(&self, client: &Client, scratch: &Path, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let want = fresh_plan(client, &self.node, scratch).await;
            let got = self.plan().await;
            if got.as_deref() == Some(want.as_str()) {
                return want;
            }
            if Instant::now() > deadline {
                panic!(
                    "agent on {} did not converge within {limit:?}\n--- want (fresh plan) ---\n\
                     {want}\n--- got (/plan) ---\n{}\n--- agent log ---\n{}",
                    self.node,
                    got.unwrap_or_default(),
                    self.daemon.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Samples `/plan` every 20 ms until the returned guard is stopped; the guard reports the
    /// fewest virtual servers seen (a flushed or emptied table shows up as a drop).
    pub fn sample_table(&self) -> TableSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let fewest = Arc::new(AtomicUsize::new(usize::MAX));
        let samples = Arc::new(AtomicUsize::new(0));
        let metrics = self.metrics;
        let task = tokio::spawn({
            let (stop, fewest, samples) = (stop.clone(), fewest.clone(), samples.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((200, body)) = get_async(metrics, "/plan").await {
                        fewest.fetch_min(virtual_servers(&body), Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        TableSampler {
            stop,
            fewest,
            samples,
            task,
        }
    }
}

impl Drop for ApiAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent on {} ---\n{}",
                self.node,
                self.daemon.log_tail(60)
            );
        }
    }
}

pub struct TableSampler {
    stop: Arc<AtomicBool>,
    fewest: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TableSampler {
    /// Stops sampling; returns (samples taken, fewest virtual servers seen).
    pub async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (
            self.samples.load(Ordering::Relaxed),
            self.fewest.load(Ordering::Relaxed),
        )
    }
}

/// Virtual servers in an `ipvsadm -Ln` text.
pub fn virtual_servers(table: &str) -> usize {
    table
        .lines()
        .filter(|l| ["TCP ", "UDP ", "SCTP "].iter().any(|p| l.starts_with(p)))
        .count()
}

/// The real servers of virtual server `frontend` (e.g. `10.96.0.10:53`, `[fd00::1]:80`) and
/// protocol in an `ipvsadm -Ln` text, sorted.
pub fn destinations(table: &str, protocol: &str, frontend: &str) -> Vec<String> {
    let mut lines = table.lines();
    let header = format!("{protocol} ");
    let mut found = Vec::new();
    while let Some(line) = lines.next() {
        let is_it = line.starts_with(&header)
            && line[header.len()..].split_whitespace().next() == Some(frontend);
        if !is_it {
            continue;
        }
        for dest in lines.by_ref() {
            let Some(rest) = dest.trim_start().strip_prefix("-> ") else {
                break;
            };
            if let Some(address) = rest.split_whitespace().next() {
                found.push(address.to_owned());
            }
        }
        break;
    }
    found.sort();
    found
}

/// What `topoproxy plan` prints for `node` from the objects the apiserver holds now.
pub async fn fresh_plan(client: &Client, node: &str, scratch: &Path) -> String {
    let _ = std::fs::remove_dir_all(scratch);
    dump_cluster(client, scratch).await;
    crate::process::stdout_of(
        Command::new(agent_bin())
            .arg("plan")
            .arg("--source")
            .arg(scratch)
            .args(["--node", node]),
        "topoproxy plan",
    )
}
