//! `cargo xtask chart --check`: `helm lint` and `helm template` of `charts/topoproxy`, and for
//! each setting the kustomize tree also expresses, the proof that both render the same objects.
//!
//! Each case pairs chart values with a kustomization: an overlay of `manifests/`, or a small
//! kustomization written to a scratch directory on top of one (a component, an image digest),
//! which reaches the tree through a `manifests` symlink because kustomize refuses absolute
//! paths. Both renders are normalised the same way ([`normalize`]) and compared object by
//! object. helm and kustomize are the pinned ones `cargo xtask k8s-setup` installs (`tools.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use serde_yaml::Value;

use crate::tools;

/// Labels only the chart sets (Helm's bookkeeping); removed from `metadata.labels` before the
/// comparison. Selectors and pod labels are compared as they are.
const CHART_ONLY_LABELS: &[&str] = &["helm.sh/chart", "app.kubernetes.io/managed-by"];

/// `helm template` needs a cluster version for the chart's kubeVersion constraint; the one
/// the project's control-plane tests build.
const KUBE_VERSION: &str = "1.36.0";

const NAMESPACE: &str = "kube-system";

/// An image digest for the digest case (any well-formed one).
const SAMPLE_DIGEST: &str =
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// One setting rendered both ways.
struct Case {
    name: &'static str,
    /// `--set` arguments for the chart.
    values: Vec<String>,
    kustomize: Kustomize,
}

enum Kustomize {
    /// A directory under manifests/.
    Overlay(&'static str),
    /// A kustomization.yaml written to a scratch directory; paths relative to `manifests/`.
    Scratch(String),
}

fn cases() -> Vec<Case> {
    let set = |pairs: &[&str]| pairs.iter().map(|pair| (*pair).to_owned()).collect();
    vec![
        Case {
            name: "shadow",
            values: set(&["mode=shadow"]),
            kustomize: Kustomize::Overlay("overlays/shadow"),
        },
        Case {
            name: "ipvs",
            values: set(&["mode=ipvs"]),
            kustomize: Kustomize::Overlay("overlays/ipvs"),
        },
        Case {
            name: "cutover",
            values: set(&["mode=ipvs", "nodeSelector.topoproxy\\.io/proxy=topoproxy"]),
            kustomize: Kustomize::Overlay("overlays/cutover"),
        },
        Case {
            name: "ebpf",
            values: set(&["mode=ebpf"]),
            kustomize: Kustomize::Overlay("overlays/ebpf"),
        },
        Case {
            name: "ipvs privileged",
            values: set(&["mode=ipvs", "privileged=true"]),
            kustomize: Kustomize::Scratch(
                "resources: [manifests/overlays/ipvs]\ncomponents: [manifests/components/privileged]\n"
                    .to_owned(),
            ),
        },
        Case {
            name: "ipvs by digest",
            values: vec!["mode=ipvs".to_owned(), format!("image.digest={SAMPLE_DIGEST}")],
            kustomize: Kustomize::Scratch(format!(
                "resources: [manifests/overlays/ipvs]\nimages:\n  - name: ghcr.io/topoproxy/topoproxy\n    digest: {SAMPLE_DIGEST}\n"
            )),
        },
    ]
}

pub fn chart_check() -> Result<()> {
    let helm = tools::tool("helm")?;
    let kustomize = tools::tool("kustomize")?;
    let workspace = crate::workspace_root();
    let chart = workspace.join("charts/topoproxy");
    let scratch = crate::target_dir().join("chart-check");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;

    for mode in ["shadow", "ipvs", "ebpf"] {
        run(Command::new(&helm)
            .args(["lint", "--strict", "--kube-version", KUBE_VERSION])
            .arg(&chart)
            .args(["--set", &format!("mode={mode}")]))?;
    }
    run(Command::new(&helm)
        .args(["lint", "--strict", "--kube-version", KUBE_VERSION])
        .arg(&chart)
        .args(["--set", "mode=ipvs,serviceMonitor.enabled=true"])
        .args(["--set", "config.metrics-bind-address=0.0.0.0:10249"]))?;
    println!("chart check: helm lint --strict passed (shadow, ipvs, ebpf, ServiceMonitor)");

    for case in cases() {
        let chart_objects = normalize(&helm_template(&helm, &chart, &case.values)?)?;
        let kustomize_dir = match &case.kustomize {
            Kustomize::Overlay(dir) => workspace.join("manifests").join(dir),
            Kustomize::Scratch(text) => {
                scratch_kustomization(&scratch, case.name, text, &workspace)?
            }
        };
        let kustomize_objects = normalize(&output(
            Command::new(&kustomize).arg("build").arg(&kustomize_dir),
        )?)?;
        compare(case.name, &chart_objects, &kustomize_objects)?;
        println!(
            "chart check: {}: helm template = kustomize build ({} objects)",
            case.name,
            chart_objects.len()
        );
    }

    check_extras(&helm, &chart)?;
    let _ = fs::remove_dir_all(&scratch);
    println!("chart check: passed");
    Ok(())
}

/// What only the chart has: the API server ConfigMap, the ServiceMonitor, and refusals.
fn check_extras(helm: &Path, chart: &Path) -> Result<()> {
    let objects = normalize(&helm_template(
        helm,
        chart,
        &[
            "mode=ipvs".to_owned(),
            "apiServer.host=api.example.internal".to_owned(),
        ],
    )?)?;
    let apiserver = objects
        .get(&("ConfigMap".to_owned(), "topoproxy-apiserver".to_owned()))
        .context("apiServer.host set but no topoproxy-apiserver ConfigMap rendered")?;
    ensure!(
        apiserver["data"]["KUBERNETES_SERVICE_HOST"] == "api.example.internal"
            && apiserver["data"]["KUBERNETES_SERVICE_PORT"] == "6443",
        "topoproxy-apiserver ConfigMap has the wrong data: {apiserver:?}"
    );
    let monitored = normalize(&helm_template(
        helm,
        chart,
        &[
            "mode=ipvs".to_owned(),
            "serviceMonitor.enabled=true".to_owned(),
            "config.metrics-bind-address=0.0.0.0:10249".to_owned(),
        ],
    )?)?;
    for kind in ["ServiceMonitor", "Service"] {
        ensure!(
            monitored.keys().any(|(k, _)| k == kind),
            "serviceMonitor.enabled rendered no {kind}"
        );
    }
    for refused in [
        vec![
            "mode=ipvs".to_owned(),
            "serviceMonitor.enabled=true".to_owned(),
        ],
        vec!["mode=kernel".to_owned()],
        vec!["mode=ebpf".to_owned(), "privileged=true".to_owned()],
        vec!["image.digest=0123".to_owned()],
    ] {
        ensure!(
            helm_template(helm, chart, &refused).is_err(),
            "helm template accepted {refused:?}"
        );
    }
    println!(
        "chart check: apiServer ConfigMap, ServiceMonitor, and refusal of bad values as expected"
    );
    Ok(())
}

fn helm_template(helm: &Path, chart: &Path, values: &[String]) -> Result<String> {
    let mut command = Command::new(helm);
    command.args(["template", "topoproxy"]).arg(chart).args([
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ]);
    for value in values {
        command.args(["--set", value]);
    }
    output(&mut command)
}

fn scratch_kustomization(
    scratch: &Path,
    name: &str,
    text: &str,
    workspace: &Path,
) -> Result<PathBuf> {
    let dir = scratch.join(name.replace(' ', "-"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::os::unix::fs::symlink(workspace.join("manifests"), dir.join("manifests"))
        .context("linking manifests/ into the scratch kustomization")?;
    fs::write(
        dir.join("kustomization.yaml"),
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{text}"),
    )
    .context("writing the scratch kustomization")?;
    Ok(dir)
}

/// Objects keyed by (kind, name): chart-only labels removed, and each ConfigMap's
/// `config.yaml` parsed (the agent reads it as YAML; comments and key order do not matter).
pub fn normalize(rendered: &str) -> Result<BTreeMap<(String, String), Value>> {
    let mut objects = BTreeMap::new();
    for document in serde_yaml::Deserializer::from_str(rendered) {
        let mut object = Value::deserialize(document).context("parsing rendered YAML")?;
        if object.is_null() {
            continue;
        }
        let kind = object["kind"]
            .as_str()
            .context("an object without kind")?
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .context("an object without metadata.name")?
            .to_owned();
        if let Some(labels) = object
            .get_mut("metadata")
            .and_then(|metadata| metadata.get_mut("labels"))
            .and_then(Value::as_mapping_mut)
        {
            for label in CHART_ONLY_LABELS {
                labels.remove(*label);
            }
        }
        if let Some(config) = object
            .get_mut("data")
            .and_then(|data| data.get_mut("config.yaml"))
        {
            let text = config
                .as_str()
                .context("config.yaml is not a string")?
                .to_owned();
            *config = serde_yaml::from_str(&text).context("parsing config.yaml")?;
        }
        if objects
            .insert((kind.clone(), name.clone()), object)
            .is_some()
        {
            bail!("{kind} {name} rendered twice");
        }
    }
    Ok(objects)
}

use serde::Deserialize as _;

fn compare(
    case: &str,
    chart: &BTreeMap<(String, String), Value>,
    kustomize: &BTreeMap<(String, String), Value>,
) -> Result<()> {
    let chart_keys: Vec<_> = chart.keys().collect();
    let kustomize_keys: Vec<_> = kustomize.keys().collect();
    ensure!(
        chart_keys == kustomize_keys,
        "{case}: the chart renders {chart_keys:?}, kustomize {kustomize_keys:?}"
    );
    for (key, object) in chart {
        if Some(object) != kustomize.get(key) {
            bail!(
                "{case}: {} {} differs\n--- kustomize\n{}\n--- chart\n{}",
                key.0,
                key.1,
                serde_yaml::to_string(&kustomize[key]).unwrap_or_default(),
                serde_yaml::to_string(object).unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<()> {
    output(command).map(|_| ())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_helm_labels_and_parses_the_config_file() {
        let chart = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  labels:\n    a: b\n    helm.sh/chart: topoproxy-0.1.0\ndata:\n  config.yaml: |\n    sync-period: 30s\n    min-sync-period: 1s\n";
        let kustomize = "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels:\n    a: b\n  name: c\ndata:\n  config.yaml: |\n    # a comment\n    min-sync-period: 1s\n    sync-period: 30s\n";
        let (chart, kustomize) = (normalize(chart).unwrap(), normalize(kustomize).unwrap());
        assert!(compare("t", &chart, &kustomize).is_ok());
    }

    #[test]
    fn a_different_value_or_a_missing_object_is_reported() {
        let one = normalize("kind: A\nmetadata: {name: x}\nspec: {n: 1}\n").unwrap();
        let two = normalize("kind: A\nmetadata: {name: x}\nspec: {n: 2}\n").unwrap();
        let both = normalize(
            "kind: A\nmetadata: {name: x}\nspec: {n: 1}\n---\nkind: B\nmetadata: {name: y}\n",
        )
        .unwrap();
        assert!(compare("t", &one, &two).is_err());
        assert!(compare("t", &one, &both).is_err());
        // A selector label is not a metadata label: not dropped.
        let selector =
            normalize("kind: A\nmetadata: {name: x}\nspec: {selector: {helm.sh/chart: c}}\n")
                .unwrap();
        let bare = normalize("kind: A\nmetadata: {name: x}\nspec: {selector: {}}\n").unwrap();
        assert!(compare("t", &selector, &bare).is_err());
    }
}
