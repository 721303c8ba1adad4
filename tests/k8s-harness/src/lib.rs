//! A real Kubernetes control plane for topoproxy's tests: etcd from Debian, and
//! kube-apiserver and kube-controller-manager built from `k8s.io/kubernetes` by
//! `cargo xtask k8s-setup` (the version is the one `tests/k8s/go.mod` requires).
//!
//! - [`ControlPlane`]: starts the components in a fresh folder, tears them down on drop.
//! - [`objects`]: Nodes, Pods and Services as a cluster without kubelets needs them (status
//!   patched through the status subresource), so the real EndpointSlice controller writes the
//!   slices and their hints; YAML applied (server-side, optionally as a dry run) and the
//!   cluster dumped as the YAML directory `topoproxy plan --source` reads.
//! - [`node::RealNode`] on a [`network::NodeNetwork`]: a real node (containerd, runc, CNI, a
//!   kubelet) in a network namespace of its own.
//! - [`workloads`]: kubectl, helm (with a post-renderer) and pods, as the real-node tests use them.
//! - [`kube_dns`]: CoreDNS as `kube-system/kube-dns`, one replica per zone.
//! - [`Daemon`]: a process killed on drop, with its log.

use std::path::{Path, PathBuf};

mod control_plane;
pub mod kube_dns;
pub mod network;
pub mod node;
pub mod objects;
pub mod pki;
mod process;
pub mod workloads;

pub use control_plane::{
    client_for, free_port, http_request, plain_http, wait_until, write_kubeconfig, ControlPlane,
    KubeconfigUser, Options, SERVICE_CIDRS,
};
pub use process::{checked_stdout, stdout_of, Daemon, Isolation};

/// The programs the harness runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
    pub haproxy: PathBuf,
    pub kustomize: PathBuf,
    pub helm: PathBuf,
    pub crictl: PathBuf,
}

const SETUP_HINT: &str = "run `cargo xtask k8s-setup` (as root) first";

/// The folder outliving work trees where `cargo xtask k8s-setup` keeps what it builds.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOPOPROXY_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("topoproxy");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/topoproxy")
}

/// Where `cargo xtask k8s-setup` keeps the real node's test images (`pause.tar`, `echo.tar`,
/// `coredns.tar`).
pub fn test_images_dir() -> PathBuf {
    cache_dir().join("test-images")
}

/// The `k8s.io/kubernetes` version that `tests/k8s/go.mod` requires.
pub fn kubernetes_version() -> String {
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .unwrap_or_else(|e| panic!("reading {}: {e}", go_mod.display()));
    text.lines()
        .find_map(|line| {
            let mut words = line.trim().trim_start_matches("require").split_whitespace();
            (words.next() == Some("k8s.io/kubernetes"))
                .then(|| words.next().map(str::to_owned))
                .flatten()
        })
        .unwrap_or_else(|| panic!("{} requires no k8s.io/kubernetes", go_mod.display()))
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: {SETUP_HINT}",
        path.display()
    );
    path
}

impl Binaries {
    /// Finds every program: Kubernetes' in `TOPOPROXY_K8S_BIN` (else the cache), kustomize
    /// and helm in `TOPOPROXY_TOOLS_BIN` (else the cache), etcd and haproxy from apt. Panics
    /// naming the set-up command when one is missing.
    pub fn locate() -> Self {
        let (k8s, tools) = Self::dirs();
        Self {
            kube_apiserver: existing(k8s.join("kube-apiserver")),
            kube_controller_manager: existing(k8s.join("kube-controller-manager")),
            kube_proxy: existing(k8s.join("kube-proxy")),
            kube_scheduler: existing(k8s.join("kube-scheduler")),
            kubelet: existing(k8s.join("kubelet")),
            kubectl: existing(k8s.join("kubectl")),
            etcd: existing(PathBuf::from("/usr/bin/etcd")),
            haproxy: existing(PathBuf::from("/usr/sbin/haproxy")),
            kustomize: existing(tools.join("kustomize")),
            helm: existing(tools.join("helm")),
            crictl: existing(tools.join("crictl")),
        }
    }

    /// Finds what a node needs beside a control plane started elsewhere
    /// ([`ControlPlane::attach`]): `kubelet` and `kubectl` in `TOPOPROXY_K8S_BIN`, `helm` in
    /// `TOPOPROXY_TOOLS_BIN` (else the cache). The other paths are where they would be, not
    /// checked: nothing on such a node runs them.
    pub fn locate_node() -> Self {
        let (k8s, tools) = Self::dirs();
        Self {
            kube_apiserver: k8s.join("kube-apiserver"),
            kube_controller_manager: k8s.join("kube-controller-manager"),
            kube_proxy: k8s.join("kube-proxy"),
            kube_scheduler: k8s.join("kube-scheduler"),
            kubelet: existing(k8s.join("kubelet")),
            kubectl: existing(k8s.join("kubectl")),
            etcd: PathBuf::from("/usr/bin/etcd"),
            haproxy: PathBuf::from("/usr/sbin/haproxy"),
            kustomize: tools.join("kustomize"),
            helm: existing(tools.join("helm")),
            crictl: tools.join("crictl"),
        }
    }

    /// Kubernetes' binaries folder and the tools' folder.
    fn dirs() -> (PathBuf, PathBuf) {
        let k8s = std::env::var_os("TOPOPROXY_K8S_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("k8s").join(kubernetes_version()));
        let tools = std::env::var_os("TOPOPROXY_TOOLS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join("bin"));
        (k8s, tools)
    }

    /// `kustomize build DIR`.
    pub fn kustomize_build(&self, dir: &Path) -> String {
        let out = std::process::Command::new(&self.kustomize)
            .arg("build")
            .arg(dir)
            .output()
            .expect("running kustomize");
        assert!(
            out.status.success(),
            "kustomize build {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("kustomize printed UTF-8")
    }
}
