//! `topoproxy migrate-check`: a read-only pre-flight before a cut-over from kube-proxy. It
//! reads the `kube-system/kube-proxy` ConfigMap (`config.conf`), the `kube-system/kube-proxy`
//! DaemonSet's flags, every Service and every Node, and says per item what topoproxy will do
//! differently or cannot do. A [`Severity::Blocker`] means "not safe to cut over"; the command
//! exits 1 then, 0 otherwise.
//!
//! [`check`] is pure (objects in, findings out); [`fetch`] only reads (get and list).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use kube::api::ListParams;
use kube::{Api, Client};

use crate::config::{kube_proxy, RunOptions};

/// kube-proxy's ConfigMap and DaemonSet, where kubeadm and most installers put them.
pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "kube-proxy";
/// The ConfigMap key holding the `KubeProxyConfiguration`.
pub const CONFIG_KEY: &str = "config.conf";

/// How much a finding matters for the cut-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// topoproxy would refuse to start with this, or cannot do it: not safe to cut over.
    Blocker,
    /// topoproxy does it differently (a documented deviation or a feature it adds).
    Change,
    /// Worth knowing; nothing changes.
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so the report's `{:<7}` lines the items up.
        f.pad(match self {
            Self::Blocker => "BLOCKER",
            Self::Change => "CHANGE",
            Self::Info => "INFO",
        })
    }
}

/// One item of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// What it is about: a setting, a flag, a Service.
    pub item: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7} {}: {}", self.severity, self.item, self.detail)
    }
}

/// What the check reads from the cluster.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub config_map: Option<ConfigMap>,
    pub daemon_set: Option<DaemonSet>,
    pub services: Vec<Service>,
    pub nodes: Vec<Node>,
}

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} from the API")]
pub struct FetchError {
    what: &'static str,
    #[source]
    source: kube::Error,
}

/// Reads what [`check`] needs (get and list only).
pub async fn fetch(client: &Client) -> Result<Inputs, FetchError> {
    let error = |what| move |source| FetchError { what, source };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    Ok(Inputs {
        config_map: config_maps
            .get_opt(NAME)
            .await
            .map_err(error("the kube-system/kube-proxy ConfigMap"))?,
        daemon_set: daemon_sets
            .get_opt(NAME)
            .await
            .map_err(error("the kube-system/kube-proxy DaemonSet"))?,
        services: Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(error("the Services"))?
            .items,
        nodes: Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(error("the Nodes"))?
            .items,
    })
}

fn finding(severity: Severity, item: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        severity,
        item: item.into(),
        detail: detail.into(),
    }
}

/// Every finding, blockers first.
pub fn check(inputs: &Inputs) -> Vec<Finding> {
    let mut findings = Vec::new();
    check_config(inputs.config_map.as_ref(), &mut findings);
    check_flags(inputs.daemon_set.as_ref(), &mut findings);
    check_services(&inputs.services, &mut findings);
    findings.push(finding(
        Severity::Info,
        "nodes",
        format!(
            "{} Node(s); each keeps kube-proxy's table when topoproxy takes it over (docs/migrating-from-kube-proxy.md)",
            inputs.nodes.len()
        ),
    ));
    findings.sort_by_key(|f| f.severity);
    findings
}

/// Whether the findings allow a cut-over.
pub fn safe(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.severity != Severity::Blocker)
}

fn check_config(config_map: Option<&ConfigMap>, findings: &mut Vec<Finding>) {
    let item = format!("{NAMESPACE}/{NAME} ConfigMap");
    let Some(config_map) = config_map else {
        findings.push(finding(
            Severity::Info,
            item,
            "not found: kube-proxy's settings come from its flags only",
        ));
        return;
    };
    let Some(text) = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(CONFIG_KEY))
    else {
        findings.push(finding(
            Severity::Info,
            item,
            format!("has no {CONFIG_KEY}: kube-proxy's settings come from its flags only"),
        ));
        return;
    };
    match kube_proxy::parse(text) {
        Err(kube_proxy::KubeProxyConfigError::Refused(refused)) => findings.push(finding(
            Severity::Blocker,
            refused.field.clone(),
            format!(
                "{:?}: {} (topoproxy refuses to start with it)",
                refused.value, refused.reason
            ),
        )),
        Err(error) => findings.push(finding(
            Severity::Blocker,
            format!("{item} {CONFIG_KEY}"),
            format!("{:#}", anyhow::Error::from(error)),
        )),
        Ok(translation) => {
            findings.push(finding(
                Severity::Info,
                format!("{item} {CONFIG_KEY}"),
                "every field is honoured or does not apply: mount it as topoproxy's --config",
            ));
            for skipped in &translation.not_applied {
                findings.push(finding(Severity::Info, skipped.field, skipped.reason));
            }
            if translation.mode != "ipvs" {
                findings.push(finding(
                    Severity::Change,
                    "mode",
                    format!(
                        "{:?}: kube-proxy's {} mode has no topoproxy equivalent; choose --proxy-mode ipvs or ebpf",
                        translation.mode,
                        if translation.mode.is_empty() { "iptables" } else { translation.mode.as_str() }
                    ),
                ));
            }
            if translation.options.cluster_cidr.is_none()
                && translation.options.masquerade_all != Some(true)
            {
                findings.push(finding(
                    Severity::Change,
                    "clusterCIDR",
                    "unset: ClusterIP traffic from outside the pod network is not masqueraded (as kube-proxy without one); topoproxy warns at start",
                ));
            }
        }
    }
}

/// The long flag names `topoproxy run` takes.
fn run_flags() -> Vec<String> {
    use clap::Args as _;
    let command = RunOptions::augment_args(clap::Command::new("run"));
    let mut names: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(str::to_owned))
        .collect();
    names.push("config".to_owned());
    names
}

/// kube-proxy flags that only tune klog or the process, with no bearing on the dataplane.
const LOGGING_FLAGS: &[&str] = &["v", "vmodule", "logging-format", "alsologtostderr"];

fn check_flags(daemon_set: Option<&DaemonSet>, findings: &mut Vec<Finding>) {
    let Some(daemon_set) = daemon_set else {
        findings.push(finding(
            Severity::Info,
            format!("{NAMESPACE}/{NAME} DaemonSet"),
            "not found: no kube-proxy flags to compare",
        ));
        return;
    };
    let containers = daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .map(|pod| pod.containers.clone())
        .unwrap_or_default();
    let known = run_flags();
    for container in containers {
        let words = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten());
        for word in words {
            let Some(flag) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
                continue;
            };
            let (name, value) = flag.split_once('=').unwrap_or((flag, ""));
            if LOGGING_FLAGS.contains(&name) {
                findings.push(finding(
                    Severity::Info,
                    format!("--{name}"),
                    "klog's; topoproxy's log level is RUST_LOG",
                ));
            } else if name == "proxy-mode" && value != "ipvs" {
                findings.push(finding(
                    Severity::Change,
                    "--proxy-mode",
                    format!("{value:?}: topoproxy's dataplanes are ipvs and ebpf"),
                ));
            } else if !known.iter().any(|k| k == name) {
                findings.push(finding(
                    Severity::Blocker,
                    format!("--{name}"),
                    format!(
                        "kube-proxy flag in container {:?} that topoproxy run does not take",
                        container.name
                    ),
                ));
            }
        }
    }
}

fn check_services(services: &[Service], findings: &mut Vec<Finding>) {
    let mut cluster_ips: BTreeMap<String, String> = BTreeMap::new();
    for service in services {
        let name = service_name(service);
        for ip in service
            .spec
            .iter()
            .flat_map(|spec| spec.cluster_ips.iter().flatten())
        {
            if ip != "None" {
                cluster_ips.insert(ip.clone(), name.clone());
            }
        }
    }
    for service in services {
        let name = service_name(service);
        let Some(spec) = &service.spec else { continue };
        let labels = service.metadata.labels.as_ref();
        if let Some(proxy) = labels.and_then(|l| l.get("service.kubernetes.io/service-proxy-name"))
        {
            findings.push(finding(
                Severity::Change,
                format!("Service {name}"),
                format!(
                    "labelled service-proxy-name {proxy:?}: kube-proxy skips it; topoproxy serves it if the name is its own (--service-proxy-name, default topoproxy)"
                ),
            ));
        }
        let local = |policy: &Option<String>| policy.as_deref() == Some("Local");
        if local(&spec.internal_traffic_policy) || local(&spec.external_traffic_policy) {
            findings.push(finding(
                Severity::Change,
                format!("Service {name}"),
                "Local traffic policy: on a node without a local endpoint topoproxy programs no backend, kube-proxy's IPVS mode falls back to other nodes' (deliberate, docs/parity.md)",
            ));
        }
        for external in spec.external_ips.iter().flatten() {
            if let Some(owner) = cluster_ips.get(external) {
                findings.push(finding(
                    Severity::Change,
                    format!("Service {name}"),
                    format!(
                        "externalIP {external} is Service {owner}'s ClusterIP: topoproxy keeps it for {owner} and warns (kube-proxy's outcome is undefined; docs/security.md)"
                    ),
                ));
            }
        }
        let annotations = service.metadata.annotations.as_ref();
        if annotations.is_some_and(|a| a.keys().any(|k| k.starts_with("topoproxy.io/"))) {
            findings.push(finding(
                Severity::Change,
                format!("Service {name}"),
                "carries topoproxy.io/ annotations: topoproxy's locality tiers apply (docs/topology.md)",
            ));
        }
    }
}

fn service_name(service: &Service) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or("?")
    )
}

/// The report as printed: one finding per line, then the verdict.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for finding in findings {
        out.push_str(&finding.to_string());
        out.push('\n');
    }
    out.push_str(if safe(findings) {
        "verdict: safe to cut over (no blocker)\n"
    } else {
        "verdict: NOT safe to cut over: fix the blockers first\n"
    });
    out
}

#[cfg(test)]
mod tests;
