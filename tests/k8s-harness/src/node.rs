//! A real node for the control plane: containerd (Debian's) running pods through runc and the
//! bridge + host-local CNI plugins, and a real kubelet registering a Node with the control
//! plane, with a zone label, all in a network namespace of the node's own.
//!
//! The node's namespace holds its link (`eth0`, the InternalIP, on the
//! [`NodeNetwork`](crate::network::NodeNetwork) segment with the host and an outside client),
//! its loopback and the CNI bridge; containerd and the kubelet enter it (`setns`, network
//! only: the mount namespace stays the host's, so the cgroup and bpffs mounts, the node's
//! folder and `/run/netns` are the host's), and so do the shims, runc and every hostNetwork
//! pod. The control plane is reached at the host's address on the segment.
//!
//! Everything lives under one folder and one cgroup of its own, and is torn down on drop, also
//! when the test panics (the kubelet's and containerd's logs are printed then): every process
//! of the node (pods, shims, containerd) is killed through the cgroup, then the mounts under
//! the folder and the pods' network namespaces are unmounted, and the cgroups, the node's
//! namespace (with its links and the CNI bridge) and the folder are removed. The namespaces
//! removed are only the node's own and those its processes were in when the drop began (its
//! pods'), plus containerd's `cni-…` ones no process holds: never another test's or another
//! node's. (Host folders such as `/var/log/pods` are cleaned of whatever appeared since the
//! node started: drop several nodes in the reverse order of their start, as locals are.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::control_plane::{write_kubeconfig, ControlPlane, KubeconfigUser};
use crate::network::{ip, ip_in, run, run_quietly, NodeNetwork};
use crate::process::{Daemon, Isolation};

/// The sandbox image containerd is configured with; the harness imports it at start.
pub const PAUSE_IMAGE: &str = "topoproxy.test/pause:1";
/// The echo image (`tests/k8s/images/echo`): answers `<pod name> <peer>` on TCP and UDP.
pub const ECHO_IMAGE: &str = "topoproxy.test/echo:1";

/// Where containerd's CRI plugin pins pod network namespaces (fixed in containerd 1.6).
const NETNS_DIR: &str = "/run/netns";
/// Host folders the kubelet, containerd, runc and the CNI plugins write to whatever they are
/// told (containers' logs and the links to them, device-plugin sockets, runc's state and the
/// shims' sockets, libcni's result cache).
const HOST_DIRS: [&str; 5] = [
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/run/containerd",
    "/var/lib/cni",
];
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const UNIFIED: &str = "/sys/fs/cgroup/unified";
/// Where the CNI plugins are when `TOPOPROXY_CNI_BIN` does not say (Debian's
/// `containernetworking-plugins`).
const CNI_BIN: &str = "/usr/lib/cni";
/// Controllers a kubelet needs in its cgroup root on a cgroup v2 only machine; each is
/// enabled for the children of `/` and of the node's cgroup when the kernel has it.
const V2_CONTROLLERS: [&str; 6] = ["cpu", "cpuset", "memory", "pids", "io", "hugetlb"];

/// Whether the machine mounts cgroup v2 alone at `/sys/fs/cgroup` (the VM guest), rather than
/// beside the v1 controllers at `/sys/fs/cgroup/unified` (this machine kind).
fn cgroup_v2_only() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").is_file()
}

/// Whether `/` is the kernel's initramfs (`rootfs`), which `pivot_root` cannot move.
fn root_is_initramfs() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let fstype = fields
            .iter()
            .skip_while(|f| **f != "-")
            .nth(1)
            .copied()
            .unwrap_or_default();
        fields.get(4) == Some(&"/") && fstype == "rootfs"
    })
}

/// The unified (v2) hierarchy's mount point.
fn unified_root() -> &'static Path {
    Path::new(if cgroup_v2_only() {
        CGROUP_ROOT
    } else {
        UNIFIED
    })
}

/// The unified (v2) cgroup every process of node `name` is in, whose name a test can write
/// before the node exists: `/sys/fs/cgroup/unified/topoproxy-rn-<test pid>-<name>` (on a
/// cgroup v2 only machine, without `unified/`). The same path in a pod that mounts the host's
/// `/sys/fs/cgroup`, as the chart's eBPF DaemonSet does.
pub fn unified_cgroup_of(name: &str) -> PathBuf {
    unified_root().join(cgroup_name(name))
}

fn cgroup_name(node: &str) -> String {
    format!("topoproxy-rn-{}-{node}", std::process::id())
}

/// What the node looks like.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub name: String,
    pub zone: Option<String>,
    /// The node's InternalIP, on the [`NodeNetwork`] segment (`192.168.240.0/24` on the host,
    /// not `.250` or `.254`; the host address's /24 on a routed one).
    pub address: std::net::Ipv4Addr,
    /// The pods' subnet (the bridge CNI's host-local range), e.g. `10.244.1.0/24`.
    pub pod_cidr: String,
    /// A short tag for the node's namespace and links (`tprn<tag>`), unique per test process.
    pub tag: u8,
}

/// Host mounts a pod of the chart mounts with `mountPropagation: HostToContainer`, which
/// containerd accepts only on a shared or slave mount. systemd makes every mount shared; this
/// machine kind boots without it, so the harness does what a systemd node has.
const PROPAGATED_MOUNTS: [&str; 1] = ["/sys/fs/bpf"];

/// A running node. Dropping it removes everything it made.
pub struct RealNode {
    options: NodeOptions,
    /// Mounts the harness made shared, made private again on drop.
    made_shared: Vec<PathBuf>,
    dir: PathBuf,
    socket: PathBuf,
    cgroup: String,
    netns_before: BTreeSet<String>,
    /// Each of [`HOST_DIRS`]: every path below it before the node started, `None` if it was
    /// absent.
    host_dirs_before: Vec<Option<BTreeSet<PathBuf>>>,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
    kubeconfig: PathBuf,
    /// The node has a network namespace of its own on a [`NodeNetwork`]; else it is the
    /// machine itself ([`RealNode::start_on_machine`]).
    own_netns: bool,
}

fn netns_names() -> BTreeSet<String> {
    entry_names(Path::new(NETNS_DIR))
}

/// The inode of the namespace (or any file) at `path`.
fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// The network namespaces (by inode) of every process in the cgroup `root` and below it.
fn netns_inodes_in(root: &Path) -> BTreeSet<u64> {
    let mut pids = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(cgroup) = pending.pop() {
        if let Ok(text) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
            pids.extend(text.lines().map(str::to_owned));
        }
        if let Ok(entries) = std::fs::read_dir(&cgroup) {
            pending.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids.iter()
        .filter_map(|pid| inode_of(&Path::new("/proc").join(pid).join("ns/net")))
        .collect()
}

/// The network namespaces (by inode) any process on the host is in.
fn netns_inodes_in_use() -> BTreeSet<u64> {
    entry_names(Path::new("/proc"))
        .iter()
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|pid| inode_of(&Path::new("/proc").join(pid).join("ns/net")))
        .collect()
}

fn entry_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers and the unified one),
/// or `/sys/fs/cgroup` itself on a cgroup v2 only machine.
fn hierarchies() -> Vec<PathBuf> {
    if cgroup_v2_only() {
        return vec![PathBuf::from(CGROUP_ROOT)];
    }
    std::fs::read_dir(CGROUP_ROOT)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Every path below `dir` (not following links).
fn paths_below(dir: &Path) -> BTreeSet<PathBuf> {
    let mut all = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
            all.insert(entry.path());
        }
    }
    all
}

/// Removes a cgroup and every cgroup below it, deepest first.
fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

/// Mount points at or below `prefix`, deepest first.
fn mounts_below(prefix: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

fn unmount(point: &Path) {
    if let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

impl RealNode {
    /// Creates the node's namespace on `network`, starts containerd and the kubelet in it,
    /// imports the pause image, and waits until the Node is Ready in the API.
    pub async fn start(
        plane: &ControlPlane,
        network: &NodeNetwork,
        options: NodeOptions,
        test_images: &Path,
    ) -> Self {
        Self::start_in(plane, Some(network), options, test_images).await
    }

    /// Starts containerd and the kubelet in this machine's own network namespace, the node's
    /// InternalIP being `options.address`, an address the machine already has (the VM guest
    /// is the node: `tests/vm_k8s_real_node.rs`), imports the pause image and waits until the
    /// Node is Ready. `options.tag` names only the CNI bridge and network then.
    pub async fn start_on_machine(
        plane: &ControlPlane,
        options: NodeOptions,
        test_images: &Path,
    ) -> Self {
        Self::start_in(plane, None, options, test_images).await
    }

    async fn start_in(
        plane: &ControlPlane,
        network: Option<&NodeNetwork>,
        options: NodeOptions,
        test_images: &Path,
    ) -> Self {
        let dir = plane.dir().join(format!("node-{}", options.name));
        std::fs::create_dir_all(&dir).expect("creating the node's folder");
        let cgroup = cgroup_name(&options.name);
        let mut node = Self {
            socket: dir.join("containerd.sock"),
            kubeconfig: dir.join("kubelet.kubeconfig"),
            dir,
            cgroup,
            netns_before: netns_names(),
            host_dirs_before: HOST_DIRS
                .iter()
                .map(|dir| Path::new(dir).is_dir().then(|| paths_below(Path::new(dir))))
                .collect(),
            containerd: None,
            kubelet: None,
            made_shared: Vec::new(),
            own_netns: network.is_some(),
            options,
        };
        node.share_propagated_mounts();
        if let Some(network) = network {
            node.create_netns(network);
        }
        node.create_cgroups();
        node.start_containerd();
        node.import_image(&test_images.join("pause.tar"));
        node.start_kubelet(plane);
        node.wait_ready(plane).await;
        node
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The node's InternalIP.
    pub fn address(&self) -> std::net::Ipv4Addr {
        self.options.address
    }

    /// The pods' subnet.
    pub fn pod_cidr(&self) -> &str {
        &self.options.pod_cidr
    }

    /// The node's network namespace, by name (`ip netns`).
    pub fn netns(&self) -> String {
        format!("tprn{}-node", self.options.tag)
    }

    /// The node's network namespace, by path (for `setns`, `nsenter --net=` and
    /// [`crate::network::in_netns`]).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns())
    }

    /// The name of the node's link inside its namespace.
    pub fn link(&self) -> &'static str {
        "eth0"
    }

    /// The host's end of the node's link, on the segment's bridge.
    fn host_link(&self) -> String {
        format!("tprn{}", self.options.tag)
    }

    /// The CNI bridge, inside the node's namespace.
    fn bridge(&self) -> String {
        format!("tprn{}-br", self.options.tag)
    }

    /// Routes `other`'s pod subnet through `other`'s address, as a cluster's pod network
    /// does between nodes (the CNI's bridge plugin turns forwarding on in both namespaces).
    pub fn route_pods_to(&self, other: &RealNode) {
        ip_in(
            &self.netns(),
            &[
                "route",
                "add",
                other.pod_cidr(),
                "via",
                &other.address().to_string(),
            ],
        );
    }

    /// The unified (v2) cgroup every process of the node is in.
    pub fn unified_cgroup(&self) -> PathBuf {
        unified_root().join(&self.cgroup)
    }

    fn share_propagated_mounts(&mut self) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in PROPAGATED_MOUNTS {
            // Optional fields (`shared:N`, `master:N`) sit between the mount options and `-`.
            let shared = mountinfo.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(4) == Some(&point)
                    && fields
                        .iter()
                        .skip(6)
                        .take_while(|f| **f != "-")
                        .any(|f| f.starts_with("shared:") || f.starts_with("master:"))
            });
            if !shared {
                run(Command::new("mount").args(["--make-shared", point]));
                self.made_shared.push(PathBuf::from(point));
            }
        }
    }

    fn create_netns(&self, network: &NodeNetwork) {
        let netns = self.netns();
        run_quietly(Command::new("ip").args(["netns", "del", &netns]));
        run_quietly(Command::new("ip").args(["link", "del", &self.host_link()]));
        ip(&["netns", "add", &netns]);
        network.plug(&self.host_link(), &netns, self.options.address);
    }

    /// The kubelet's `cgroupRoot` must exist in every hierarchy; containerd (and the shims it
    /// starts) go into `<root>/runtime`, so one kill of the root's processes ends them all.
    fn create_cgroups(&self) {
        for hierarchy in hierarchies() {
            let _ = std::fs::create_dir_all(hierarchy.join(&self.cgroup));
        }
        if cgroup_v2_only() {
            // The node's cgroup holds no process itself (containerd is in `runtime`), so its
            // children may have controllers; one the kernel lacks is left out.
            for cgroup in [Path::new(CGROUP_ROOT).to_path_buf(), self.unified_cgroup()] {
                for controller in V2_CONTROLLERS {
                    let _ = std::fs::write(
                        cgroup.join("cgroup.subtree_control"),
                        format!("+{controller}"),
                    );
                }
            }
        }
        std::fs::create_dir_all(self.unified_cgroup().join("runtime"))
            .expect("creating the node's runtime cgroup");
    }

    /// The node's daemons enter its network namespace, nothing else.
    fn isolation(&self) -> Isolation {
        Isolation {
            netns: self.own_netns.then(|| self.netns_path()),
            ..Isolation::default()
        }
    }

    fn write_containerd_config(&self) -> PathBuf {
        let cni = self.dir.join("cni");
        std::fs::create_dir_all(&cni).expect("creating the CNI folder");
        let conflist = format!(
            r#"{{"cniVersion": "0.4.0", "name": "tprn{tag}", "plugins": [
  {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
    "hairpinMode": true,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{cidr}"}}]],
              "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{ipam}"}}}}
]}}
"#,
            tag = self.options.tag,
            bridge = self.bridge(),
            cidr = self.options.pod_cidr,
            ipam = self.dir.join("cni-ipam").display(),
        );
        std::fs::write(cni.join("10-tprn.conflist"), conflist).expect("writing the CNI config");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Lowering a process's oom_score_adj (the kubelet asks -998 for sandboxes) needs
  # CAP_SYS_RESOURCE, which this machine kind's root lacks: runc's nsexec then dies. Keep
  # containers at containerd's own score or above, as rootless containerd does.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # pivot_root fails on an initramfs root (the VM guest's): runc then moves the
        # container's root over `/` and chroots into it instead.
        NoPivotRoot = {no_pivot_root}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni}"
"#,
            root = self.dir.join("containerd/root").display(),
            state = self.dir.join("containerd/state").display(),
            socket = self.socket.display(),
            pause = PAUSE_IMAGE,
            cni = cni.display(),
            cni_bin = std::env::var("TOPOPROXY_CNI_BIN").unwrap_or_else(|_| CNI_BIN.to_owned()),
            no_pivot_root = root_is_initramfs(),
        );
        let path = self.dir.join("containerd.toml");
        std::fs::write(&path, config).expect("writing containerd's config");
        path
    }

    fn start_containerd(&mut self) {
        let config = self.write_containerd_config();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let daemon = Daemon::spawn(
            &format!("containerd ({})", self.options.name),
            cmd,
            &self.dir.join("containerd.log"),
            &self.isolation(),
        );
        if let Some(pid) = daemon.pid() {
            std::fs::write(
                self.unified_cgroup().join("runtime/cgroup.procs"),
                pid.to_string(),
            )
            .expect("moving containerd into the node's cgroup");
        }
        self.containerd = Some(daemon);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.socket.exists() || !self.ctr_ok(&["version"]) {
            let daemon = self.containerd.as_ref();
            if daemon.is_none_or(Daemon::exited) || Instant::now() > deadline {
                panic!(
                    "containerd did not come up\n{}",
                    daemon.map(|d| d.log_tail(40)).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `crictl` against this node's containerd, as an operator on the node would run it.
    pub fn crictl(&self, crictl: &Path, args: &[&str]) -> Result<String, String> {
        crate::stdout_of(
            Command::new(crictl)
                .arg("--runtime-endpoint")
                .arg(format!("unix://{}", self.socket.display()))
                .args(args),
            "crictl",
        )
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    fn ctr_ok(&self, args: &[&str]) -> bool {
        self.ctr()
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success())
    }

    /// `ctr images import` of an OCI archive into the kubelet's image namespace.
    pub fn import_image(&self, archive: &Path) {
        run(self
            .ctr()
            .args(["images", "import", "--no-unpack=false"])
            .arg(archive));
    }

    /// Gives an imported image a second name (`ctr images tag`), e.g. a new tag for a
    /// DaemonSet rolling update without a registry.
    pub fn tag_image(&self, source: &str, target: &str) {
        run(self
            .ctr()
            .args(["images", "tag", "--force", source, target]));
    }

    fn write_kubelet_config(&self, plane: &ControlPlane) -> PathBuf {
        let address = self.options.address.to_string();
        let certs =
            plane
                .pki()
                .issue_kubelet(&self.dir.join("pki"), &self.options.name, &[&address]);
        write_kubeconfig(
            &self.kubeconfig,
            &plane.server_url(),
            &plane.pki().ca.cert,
            &KubeconfigUser::Cert(certs.client),
        );
        let port = crate::free_port();
        let healthz = crate::free_port();
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host mounts the cgroup v1 controllers beside the unified hierarchy.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failSwapOn: false
containerRuntimeEndpoint: unix://{socket}
address: {address}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
tlsCertFile: {serving_cert}
tlsPrivateKeyFile: {serving_key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  imagefs.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  memory.available: "1Mi"
resolvConf: /etc/resolv.conf
nodeStatusUpdateFrequency: 2s
syncFrequency: 5s
fileCheckFrequency: 5s
serializeImagePulls: false
registerNode: true
"#,
            cgroup = self.cgroup,
            socket = self.socket.display(),
            serving_cert = certs.serving.cert.display(),
            serving_key = certs.serving.key.display(),
            ca = plane.pki().ca.cert.display(),
        );
        let path = self.dir.join("kubelet.yaml");
        std::fs::write(&path, config).expect("writing the kubelet's config");
        path
    }

    fn start_kubelet(&mut self, plane: &ControlPlane) {
        let config = self.write_kubelet_config(plane);
        let mut labels = String::from("topoproxy.io/test-node=true");
        if let Some(zone) = &self.options.zone {
            labels.push_str(&format!(",topology.kubernetes.io/zone={zone}"));
        }
        let mut cmd = Command::new(&plane.binaries().kubelet);
        cmd.arg("--config")
            .arg(&config)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--root-dir")
            .arg(self.dir.join("kubelet"))
            .arg("--cert-dir")
            .arg(self.dir.join("kubelet-pki"))
            .args(["--hostname-override", &self.options.name])
            .args(["--node-ip", &self.options.address.to_string()])
            .args(["--node-labels", &labels])
            .args(["-v", "1"]);
        self.kubelet = Some(Daemon::spawn(
            &format!("kubelet ({})", self.options.name),
            cmd,
            &self.dir.join("kubelet.log"),
            &self.isolation(),
        ));
    }

    async fn wait_ready(&self, plane: &ControlPlane) {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(plane.admin_client().await);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let ready = nodes
                .get_opt(&self.options.name)
                .await
                .ok()
                .flatten()
                .and_then(|node| node.status?.conditions)
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            if ready {
                self.remove_not_ready_taint(&nodes).await;
                return;
            }
            let kubelet = self.kubelet.as_ref();
            if kubelet.is_none_or(Daemon::exited) || Instant::now() > deadline {
                panic!(
                    "node {} did not become Ready\n{}",
                    self.options.name,
                    self.logs(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Does for the Ready node what the node lifecycle controller does on a cluster: removes
    /// the `node.kubernetes.io/not-ready:NoSchedule` taint the apiserver gives every new Node.
    /// The controller stays off in the harness (Nodes without a kubelet must stay Ready), and
    /// with the taint the scheduler binds no Pod that does not tolerate it: a Deployment's
    /// (CoreDNS's, `crate::kube_dns`), unlike a DaemonSet's.
    async fn remove_not_ready_taint(&self, nodes: &kube::Api<k8s_openapi::api::core::v1::Node>) {
        const NOT_READY: &str = "node.kubernetes.io/not-ready";
        let name = &self.options.name;
        let taints = nodes
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("reading node {name}: {e}"))
            .spec
            .and_then(|spec| spec.taints)
            .unwrap_or_default();
        if taints.iter().all(|t| t.key != NOT_READY) {
            return;
        }
        let kept: Vec<_> = taints.into_iter().filter(|t| t.key != NOT_READY).collect();
        let patch = serde_json::json!({"spec": {"taints": kept}});
        nodes
            .patch(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("removing node {name}'s {NOT_READY} taint: {e}"));
    }

    /// The last `lines` lines of the kubelet's and containerd's logs.
    pub fn logs(&self, lines: usize) -> String {
        let mut all = String::new();
        for daemon in self.kubelet.iter().chain(self.containerd.iter()) {
            all.push_str(&format!(
                "--- {} ---\n{}\n",
                daemon.name(),
                daemon.log_tail(lines)
            ));
        }
        all
    }

    /// Kills every process in the node's cgroup (pods, shims, containerd) and waits until
    /// none is left.
    fn kill_everything(&self) {
        let root = self.unified_cgroup();
        let _ = std::fs::write(root.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let populated = std::fs::read_to_string(root.join("cgroup.events"))
                .map(|events| events.lines().any(|l| l == "populated 1"))
                .unwrap_or(false);
            if !populated {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("RealNode: processes remain in {}", root.display());
    }
}

impl RealNode {
    /// Removes what the node wrote under [`HOST_DIRS`]: a folder that was not there before,
    /// else every path that was not.
    fn remove_host_files(&self) {
        for (dir, before) in HOST_DIRS.iter().zip(&self.host_dirs_before) {
            let dir = Path::new(dir);
            match before {
                None => {
                    let _ = std::fs::remove_dir_all(dir);
                }
                Some(before) => {
                    let mut new: Vec<PathBuf> =
                        paths_below(dir).difference(before).cloned().collect();
                    new.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
                    for path in new {
                        let _ =
                            std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
            }
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(40));
        }
        // Taken while the node's processes live: the namespaces they are in are the node's
        // own and its pods'; only those go below, never another test's or another node's.
        let namespaces = netns_inodes_in(&self.unified_cgroup());
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.kill();
        }
        self.kill_everything();
        if let Some(mut containerd) = self.containerd.take() {
            containerd.kill();
        }
        for point in mounts_below(&self.dir) {
            unmount(&point);
        }
        let in_use = netns_inodes_in_use();
        for name in netns_names().difference(&self.netns_before) {
            let path = Path::new(NETNS_DIR).join(name);
            let mine = *name == self.netns()
                || inode_of(&path).is_some_and(|inode| {
                    namespaces.contains(&inode)
                        // A pod's namespace whose sandbox died before the node did: no
                        // process holds it any more, and containerd names them `cni-…`.
                        || (name.starts_with("cni-") && !in_use.contains(&inode))
                });
            if mine {
                unmount(&path);
                let _ = std::fs::remove_file(&path);
            }
        }
        for hierarchy in hierarchies() {
            remove_cgroup_tree(&hierarchy.join(&self.cgroup));
        }
        self.remove_host_files();
        // The node's namespace went with the other new ones above (its links and the CNI
        // bridge with it); the host's end of a link outlives it only if the namespace is
        // still held.
        run_quietly(Command::new("ip").args(["link", "del", &self.host_link()]));
        for point in &self.made_shared {
            run_quietly(Command::new("mount").arg("--make-private").arg(point));
        }
        if std::env::var_os("TOPOPROXY_KEEP_K8S").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
