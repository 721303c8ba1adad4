//! Test binaries inside the QEMU VM: `cargo xtask vm-test` and the cargo target runner
//! `cargo xtask vm-runner`.
//!
//! `vm-test [--kernel 6.1|6.12]... [--test NAME]... [-- ARGS...]`:
//!
//! 1. boots each kernel once for the smoke test (`vm::smoke_test`);
//! 2. finds every `vm_*` test target of the `topoproxy` package with `cargo metadata` (so new
//!    files are picked up without touching this module) and builds them, plus the
//!    `topoproxy` binary, with `cargo test --no-run --message-format=json`;
//! 3. stages the binaries and their libraries into one share per kernel and boots every
//!    kernel at once, each ONCE for all targets (the second in reverse order): each target
//!    runs as `BIN --ignored --test-threads=1 ARGS...` with
//!    `TOPOPROXY_BIN=/host/bin/topoproxy`, the workspace mounted read-only at its host path
//!    and the current directory at the package root, as under `cargo test`;
//! 4. prints PASS, SKIP or FAIL per kernel and target with its duration and output, the
//!    console tail on failure, a summary per kernel (passed, skipped and failed targets, each
//!    skipped test with its reason), and exits non-zero if anything failed.
//!
//! SKIP: a test that returns without running its checks prints `SKIP: <test>: <reason>`, and
//! a helper process's entry point run directly prints `HELPER: <name>`
//! (`tests/support/harness.rs`). A target that exited 0 is SKIP when every test but the
//! helpers skipped, `PASS (n skipped)` when some did; a failed target is FAIL whatever it
//! printed.
//!
//! Kubernetes: every `vm_k8s_*` target gets a control plane on the host ([`HostControlPlane`]);
//! the 6.1 boot running `vm_k8s_real_node` also gets a tap into the guest with a route
//! through it to the guest's nodes' segment ([`NODE_SEGMENT`]), the node's binaries, images
//! and PKI in the share and 2 GiB of memory ([`stage_real_node`]).
//!
//! Time limits: `--timeout` bounds one boot. Inside the guest each target gets what is left
//! of it (busybox `timeout -s KILL`), so a hung test is killed with its partial output kept
//! and the targets after it are reported as not run; QEMU itself is killed at the limit if
//! the guest stops responding. Nothing waits forever.
//!
//! `vm-runner [--kernel K] [--timeout S] BINARY ARGS...` runs one binary in the VM and exits
//! with its status, so cargo can use it as a target runner:
//!
//! ```text
//! CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="cargo xtask vm-runner --kernel 6.1" \
//!     cargo test -p topoproxy --test vm_ipvs_link -- --ignored
//! ```
//!
//! The `xtask` alias in `.cargo/config.toml` pins the runner for xtask itself to `env`;
//! otherwise the inner `cargo run` of xtask would pick up the same runner and recurse. The
//! runner stages `topoproxy` too when cargo built it next to the test (integration tests
//! always build it) and forwards `RUST_*`, `TOPOPROXY_*` and `CARGO_*` variables.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::vm;

/// The package whose `vm_*` test targets run in the VM.
const PACKAGE: &str = "topoproxy";
/// Prefix of the test targets that run in the VM.
const VM_TARGET_PREFIX: &str = "vm_";
/// Seconds the guest keeps back from a boot's limit to write results and power off.
const GUEST_MARGIN_SECS: u64 = 15;
/// Test targets whose name starts with this get a real control plane on the host, reached
/// from the guest over QEMU's user networking (see [`HostControlPlane`]).
const K8S_TARGET_PREFIX: &str = "vm_k8s_";
/// Where the guest finds the control plane's kubeconfigs and certificates.
const GUEST_K8S_DIR: &str = "/host/k8s";
/// The test target that runs a real node (containerd and a kubelet) in the guest, against the
/// host's control plane with [`k8s_harness::Options::real_nodes`]; see [`RealNodeShare`].
const REAL_NODE_TARGET: &str = "vm_k8s_real_node";
/// The one kernel whose boot gives that target its node (CI time: on the other kernels it
/// says SKIP). The 6.1 boot is the shorter of the two that run at once.
const REAL_NODE_KERNEL: &str = "6.1";
/// The host's end of the tap into that guest, and the guest's (`eth1`, the node's InternalIP).
const NODE_TAP_HOST: &str = "192.168.242.254/24";
const NODE_TAP_GUEST: &str = "192.168.242.1";
/// The segment of the nodes that have a network namespace of their own inside that guest (the
/// two-zone test's, `NodeNetwork::create_routed`): the host routes it through the tap to the
/// guest, which forwards it to its nodes' bridge, so the apiserver reaches their kubelets. Not
/// the host's own node segment (`192.168.240.0/24`), which the host tests use meanwhile.
const NODE_SEGMENT: &str = "192.168.243.0/24";
/// Guest memory, at least, for a boot that runs a real node (kubelet, containerd, the agent's
/// and four other pods, the images unpacked on tmpfs).
const REAL_NODE_MEMORY_MIB: u32 = 2048;
/// The agent image archive the real-node tests install (`cargo xtask image`'s).
const AGENT_IMAGE_ENV: &str = "TOPOPROXY_AGENT_IMAGE";

/// What `vm-test` runs.
#[derive(Debug, Clone)]
pub struct VmTestPlan {
    /// Kernel labels (from [`vm::KERNELS`]).
    pub kernels: Vec<String>,
    /// Test targets to run; empty means every `vm_*` target.
    pub tests: Vec<String>,
    /// Arguments after `--`, passed to every test binary (a name filter, `--nocapture`...).
    pub args: Vec<String>,
    /// Wall-clock limit of one boot (smoke test, or all targets of one kernel).
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The agent binary the tests get (`TOPOPROXY_BIN`) instead of the debug build cargo made
    /// for them (`vm-bench --vs-kube-proxy` passes a release build).
    pub agent: Option<PathBuf>,
    /// More variables for the guest's tests.
    pub env: Vec<(String, String)>,
}

/// A test binary cargo built.
#[derive(Debug, Clone)]
struct Built {
    target: String,
    executable: PathBuf,
}

fn cargo_cmd() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    cmd.current_dir(crate::workspace_root());
    cmd
}

/// `(package manifest dir, vm_* test target names)` of [`PACKAGE`], from `cargo metadata`.
fn vm_targets() -> Result<(PathBuf, Vec<String>)> {
    let out = cargo_cmd()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    ensure!(
        out.status.success(),
        "cargo metadata failed: {}",
        out.status
    );
    let metadata: Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata output")?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == PACKAGE)
        .with_context(|| format!("cargo metadata lists no package {PACKAGE}"))?;
    let manifest = package["manifest_path"]
        .as_str()
        .map(PathBuf::from)
        .context("package without manifest_path")?;
    let dir = manifest
        .parent()
        .map(Path::to_path_buf)
        .context("manifest path without parent")?;
    let mut targets: Vec<String> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|t| t["name"].as_str())
        .filter(|name| name.starts_with(VM_TARGET_PREFIX))
        .map(str::to_owned)
        .collect();
    targets.sort();
    Ok((dir, targets))
}

/// Builds the test targets and the agent binary; returns the test executables (in the order
/// of `targets`) and the agent's path.
fn build(targets: &[String]) -> Result<(Vec<Built>, PathBuf)> {
    let mut cmd = cargo_cmd();
    cmd.args(["test", "-p", PACKAGE, "--no-run"])
        .arg("--message-format=json-render-diagnostics");
    for target in targets {
        cmd.args(["--test", target]);
    }
    let artifacts = json_artifacts(&mut cmd)?;
    let mut built = Vec::new();
    for target in targets {
        let executable = artifacts
            .iter()
            .find(|a| a.kind == "test" && &a.name == target && a.test)
            .map(|a| a.executable.clone())
            .with_context(|| format!("cargo built no executable for test target {target}"))?;
        built.push(Built {
            target: target.clone(),
            executable,
        });
    }
    // Integration tests make cargo build the package's binaries; ask explicitly if it did not.
    let agent = match artifacts
        .iter()
        .find(|a| a.kind == "bin" && a.name == PACKAGE && !a.test)
    {
        Some(a) => a.executable.clone(),
        None => {
            let mut cmd = cargo_cmd();
            cmd.args(["build", "-p", PACKAGE, "--bin", PACKAGE])
                .arg("--message-format=json-render-diagnostics");
            json_artifacts(&mut cmd)?
                .into_iter()
                .find(|a| a.kind == "bin" && a.name == PACKAGE)
                .map(|a| a.executable)
                .with_context(|| format!("cargo built no {PACKAGE} binary"))?
        }
    };
    Ok((built, stable_path(&agent)))
}

/// The hashed `deps/` file a binary in the shared target directory is a hard link of.
/// Worktrees sharing `CARGO_TARGET_DIR` overwrite `<profile>/topoproxy` with their own
/// builds, but each keeps its own `deps/topoproxy-<hash>`; staging from there means a
/// concurrent build elsewhere cannot swap the agent between two kernels' runs.
fn stable_path(uplifted: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let found = (|| {
        let meta = std::fs::metadata(uplifted).ok()?;
        let name = uplifted.file_name()?.to_str()?.to_owned();
        let deps = uplifted.parent()?.join("deps");
        std::fs::read_dir(deps).ok()?.flatten().find_map(|entry| {
            let file = entry.file_name();
            let file = file.to_str()?;
            let hash = file.strip_prefix(&name)?.strip_prefix('-')?;
            if hash.contains('.') {
                return None;
            }
            let other = entry.metadata().ok()?;
            (other.ino() == meta.ino() && other.dev() == meta.dev()).then(|| entry.path())
        })
    })();
    found.unwrap_or_else(|| uplifted.to_path_buf())
}

struct Artifact {
    kind: String,
    name: String,
    test: bool,
    executable: PathBuf,
}

/// Runs a cargo command with `--message-format=json*` and collects its executables.
fn json_artifacts(cmd: &mut Command) -> Result<Vec<Artifact>> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut artifacts = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("reading the output of {shown}"))?;
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let kind = message["target"]["kind"][0].as_str().unwrap_or_default();
        artifacts.push(Artifact {
            kind: kind.to_owned(),
            name: message["target"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            test: message["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(executable),
        });
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {shown}"))?;
    ensure!(status.success(), "{shown} failed: {status}");
    Ok(artifacts)
}

/// Single-quotes a word for `sh`.
fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A fresh share directory under `target/vm`, removed on drop unless kept for inspection.
struct Share {
    dir: PathBuf,
    keep: bool,
}

impl Share {
    fn new(name: &str) -> Result<Self> {
        let dir = vm::vm_dir().join(format!("share-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("out"))
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir, keep: false })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The shell prologue shared by `vm-test` and `vm-runner`: libraries, agent path, the
/// workspace at its host path, the clock helper and the working directory.
fn prologue(agent: Option<&str>, workdir: &Path, env: &[(String, String)]) -> String {
    let root = crate::workspace_root();
    let root = root.display().to_string();
    let mut script = String::from(
        "#!/bin/sh\nexport LD_LIBRARY_PATH=/host/lib\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         export RUST_BACKTRACE=${RUST_BACKTRACE:-1}\n",
    );
    for (key, value) in env {
        let _ = writeln!(script, "export {key}={}", sh_quote(value));
    }
    if let Some(agent) = agent {
        let _ = writeln!(script, "export TOPOPROXY_BIN={}", sh_quote(agent));
    }
    let _ = writeln!(
        script,
        "mkdir -p {root} && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 src {root} \
         || echo 'TOPOPROXY-VM: mounting the workspace failed'",
        root = sh_quote(&root)
    );
    let _ = writeln!(
        script,
        "cd {} 2>/dev/null || cd /tmp",
        sh_quote(&workdir.display().to_string())
    );
    // Centiseconds since boot; `1${frac} - 100` keeps a leading zero from reading as octal.
    script.push_str(
        "uptime_cs() { read up _ < /proc/uptime; echo $(( ${up%.*} * 100 + 1${up#*.} - 100 )); }\n",
    );
    script
}

fn workspace_share() -> (String, PathBuf) {
    ("src".to_owned(), crate::workspace_root())
}

/// etcd, kube-apiserver and kube-controller-manager (tests/k8s-harness) on the host, one per
/// boot, for the `vm_k8s_*` targets. The apiserver listens on the host's loopback; QEMU's
/// user networking maps the guest's connections to [`vm::HOST_ADDRESS`] there (its serving
/// certificate carries that address). Everything the guest needs is written into the share's
/// `k8s/` folder: the CA, the admin and `system:kube-proxy` client certificates, and a
/// kubeconfig for each naming `https://10.0.2.2:PORT` and the files at their guest paths.
/// Dropping it stops every component.
struct HostControlPlane {
    plane: Option<k8s_harness::ControlPlane>,
    _runtime: tokio::runtime::Runtime,
}

impl HostControlPlane {
    fn start(share: &Path, real_nodes: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("a tokio runtime for the control plane")?;
        // The harness panics with the component's log when something does not come up.
        let plane = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(k8s_harness::ControlPlane::start(k8s_harness::Options {
                real_nodes,
                ..k8s_harness::Options::default()
            }))
        }))
        .map_err(|_| {
            anyhow::anyhow!(
                "the control plane did not start (its log is above; `cargo xtask k8s-setup` \
                 builds the components)"
            )
        })?;
        let dir = share.join("k8s");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = plane.pki();
        let guest = |file: &str| PathBuf::from(GUEST_K8S_DIR).join(file);
        let copy = |from: &Path, to: &str| {
            std::fs::copy(from, dir.join(to))
                .with_context(|| format!("copying {} into the share", from.display()))
        };
        copy(&pki.ca.cert, "ca.crt")?;
        let server = format!("https://{}:{}", vm::HOST_ADDRESS, plane.endpoint().port());
        for (name, files) in [("admin", &pki.admin), ("kube-proxy", &pki.kube_proxy)] {
            copy(&files.cert, &format!("{name}.crt"))?;
            copy(&files.key, &format!("{name}.key"))?;
            let user = k8s_harness::KubeconfigUser::Cert(k8s_harness::pki::CertFiles {
                cert: guest(&format!("{name}.crt")),
                key: guest(&format!("{name}.key")),
            });
            k8s_harness::write_kubeconfig(
                &dir.join(format!("{name}.kubeconfig")),
                &server,
                &guest("ca.crt"),
                &user,
            );
        }
        Ok(Self {
            plane: Some(plane),
            _runtime: runtime,
        })
    }

    /// The running control plane.
    fn plane(&self) -> Result<&k8s_harness::ControlPlane> {
        self.plane.as_ref().context("the control plane is gone")
    }

    /// The kube-proxy binary the harness found (built by `cargo xtask k8s-setup`).
    fn kube_proxy(&self) -> Option<&Path> {
        self.plane
            .as_ref()
            .map(|p| p.binaries().kube_proxy.as_path())
    }

    /// The components' log tails, for a failed boot's report.
    fn logs(&self) -> String {
        self.plane.as_ref().map(|p| p.logs(20)).unwrap_or_default()
    }
}

impl Drop for HostControlPlane {
    fn drop(&mut self) {
        // Inside the runtime's context: the harness's Drop may touch tokio resources.
        let _guard = self._runtime.enter();
        self.plane.take();
    }
}

/// A tap between the host and the guest ([`vm::VmOptions::tap`]), addressed on the host's
/// end ([`NODE_TAP_HOST`]), with the route to [`NODE_SEGMENT`] through the guest's end;
/// removed on drop (the route with it).
struct NodeTap {
    name: String,
}

impl NodeTap {
    fn create() -> Result<Self> {
        let tap = Self {
            name: format!("tpvm{}", std::process::id()),
        };
        let _ = Command::new("ip")
            .args(["link", "del", &tap.name])
            .stderr(Stdio::null())
            .status();
        for args in [
            vec!["tuntap", "add", "dev", &tap.name, "mode", "tap"],
            vec!["addr", "add", NODE_TAP_HOST, "dev", &tap.name],
            vec!["link", "set", &tap.name, "up"],
            vec![
                "route",
                "add",
                NODE_SEGMENT,
                "via",
                NODE_TAP_GUEST,
                "dev",
                &tap.name,
            ],
        ] {
            let status = Command::new("ip")
                .args(&args)
                .status()
                .context("running ip")?;
            ensure!(status.success(), "ip {} failed: {status}", args.join(" "));
        }
        Ok(tap)
    }
}

impl Drop for NodeTap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// Stages into the share what [`REAL_NODE_TARGET`] runs in the guest: containerd, its runc
/// shim and `ctr` (Debian's; runc is in the guest's image), the bridge, host-local and loopback CNI plugins, the
/// kubelet, kubectl and helm, all in `/host/bin` with their libraries; the test images
/// (`/host/cache/test-images`), the agent's image archive from `TOPOPROXY_AGENT_IMAGE`, and a
/// copy of the control plane's PKI folder (`/host/k8s/pki`: the kubelet's certificates are
/// issued in the guest from its CA). Returns the guest's environment for the test.
fn stage_real_node(
    share: &Path,
    plane: &k8s_harness::ControlPlane,
    agent_image: Option<PathBuf>,
) -> Result<Vec<(String, String)>> {
    let bins = plane.binaries();
    // runc is in the guest's image (`vm::GUEST_TOOLS`).
    let mut programs: Vec<PathBuf> = ["containerd", "containerd-shim-runc-v2", "ctr"]
        .iter()
        .map(|name| vm::require_tool(name))
        .collect::<Result<_>>()?;
    programs.extend(
        ["bridge", "host-local", "loopback"]
            .iter()
            .map(|name| Path::new("/usr/lib/cni").join(name)),
    );
    programs.extend([
        bins.kubelet.clone(),
        bins.kubectl.clone(),
        bins.helm.clone(),
    ]);
    for program in &programs {
        vm::stage_binary(share, program)?;
    }
    let images = share.join("cache/test-images");
    std::fs::create_dir_all(&images)?;
    for image in ["pause.tar", "echo.tar"] {
        vm::link_or_copy(
            &k8s_harness::test_images_dir().join(image),
            &images.join(image),
        )?;
    }
    let pki = share.join("k8s/pki");
    std::fs::create_dir_all(&pki)?;
    let host_pki = plane
        .pki()
        .ca
        .cert
        .parent()
        .context("the PKI folder")?
        .to_path_buf();
    for entry in std::fs::read_dir(&host_pki)? {
        let entry = entry?;
        std::fs::copy(entry.path(), pki.join(entry.file_name()))?;
    }
    let mut env = vec![
        (
            "PATH".to_owned(),
            "/host/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("TOPOPROXY_K8S_BIN".to_owned(), "/host/bin".to_owned()),
        ("TOPOPROXY_TOOLS_BIN".to_owned(), "/host/bin".to_owned()),
        ("TOPOPROXY_CNI_BIN".to_owned(), "/host/bin".to_owned()),
        ("TOPOPROXY_CACHE".to_owned(), "/host/cache".to_owned()),
        ("TOPOPROXY_VM_NODE".to_owned(), NODE_TAP_GUEST.to_owned()),
        (
            "TOPOPROXY_VM_NODE_SEGMENT".to_owned(),
            NODE_SEGMENT.to_owned(),
        ),
        (
            "TOPOPROXY_VM_K8S_PORT".to_owned(),
            plane.endpoint().port().to_string(),
        ),
    ];
    if let Some(archive) = agent_image {
        let dir = share.join("images");
        std::fs::create_dir_all(&dir)?;
        vm::link_or_copy(&archive, &dir.join("agent.tar"))?;
        env.push((
            AGENT_IMAGE_ENV.to_owned(),
            "/host/images/agent.tar".to_owned(),
        ));
    }
    Ok(env)
}

/// The result of one test target in one boot.
#[derive(Debug)]
enum Verdict {
    Pass,
    Fail(i32),
    TimedOut,
    NotRun,
}

struct TargetResult {
    target: String,
    verdict: Verdict,
    seconds: f64,
    output: String,
}

/// Boots `label` once and runs every built target in it.
fn run_targets(
    label: &str,
    built: &[Built],
    agent: &Path,
    package_dir: &Path,
    plan: &VmTestPlan,
) -> Result<(Vec<TargetResult>, String)> {
    let mut share = Share::new(&format!("vmtest-{label}"))?;
    let agent = vm::stage_binary(&share.dir, agent)?;
    let mut env = vec![(
        "CARGO_MANIFEST_DIR".to_owned(),
        package_dir.display().to_string(),
    )];
    // Test knobs such as TOPOPROXY_CRASH_POINT_STRIDE reach the guest's tests.
    env.extend(
        forwarded_env()
            .into_iter()
            .filter(|(key, _)| key.starts_with("TOPOPROXY_")),
    );
    env.extend(plan.env.iter().cloned());
    let needs_k8s = built
        .iter()
        .any(|b| b.target.starts_with(K8S_TARGET_PREFIX));
    let real_node = label == REAL_NODE_KERNEL && built.iter().any(|b| b.target == REAL_NODE_TARGET);
    let control_plane = if needs_k8s {
        let started = Instant::now();
        let plane = HostControlPlane::start(&share.dir, real_node)?;
        if let Some(kube_proxy) = plane.kube_proxy() {
            let guest = vm::stage_binary(&share.dir, kube_proxy)?;
            env.push(("TOPOPROXY_KUBE_PROXY".to_owned(), guest));
        }
        env.push(("TOPOPROXY_VM_K8S".to_owned(), GUEST_K8S_DIR.to_owned()));
        if real_node {
            // `cargo xtask test` passes the image it built; by hand, the variable.
            let agent_image = plan
                .env
                .iter()
                .find(|(key, _)| key == AGENT_IMAGE_ENV)
                .map(|(_, value)| PathBuf::from(value))
                .or_else(|| std::env::var_os(AGENT_IMAGE_ENV).map(PathBuf::from));
            env.extend(stage_real_node(&share.dir, plane.plane()?, agent_image)?);
        }
        println!(
            "vm-test {label}: control plane up on the host in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Some(plane)
    } else {
        None
    };
    let mut script = prologue(Some(&agent), package_dir, &env);
    if needs_k8s {
        script.push_str(vm::UPLINK_UP);
    }
    let tap = if real_node {
        let _ = writeln!(
            script,
            "ip link set eth1 up && ip addr add {NODE_TAP_GUEST}/24 dev eth1 \
             || echo 'TOPOPROXY-VM: the node link failed'"
        );
        Some(NodeTap::create()?)
    } else {
        None
    };
    let limit = plan.timeout.as_secs();
    script.push_str(&format!(
        "failed=0\nrun_target() {{\n  name=$1; shift\n  \
         left=$(( {limit} - {GUEST_MARGIN_SECS} - $(uptime_cs) / 100 ))\n  \
         if [ $left -lt 5 ]; then echo skipped > /host/out/$name.code; failed=1; return; fi\n  \
         echo \"TOPOPROXY-VM: running $name (limit ${{left}} s)\"\n  \
         echo $left > /host/out/$name.limit\n  \
         start=$(uptime_cs)\n  \
         timeout -s KILL $left \"$@\" > /host/out/$name.log 2>&1\n  \
         code=$?\n  \
         echo $(( $(uptime_cs) - start )) > /host/out/$name.cs\n  \
         echo $code > /host/out/$name.code\n  \
         [ $code -eq 0 ] || failed=1\n  \
         echo \"TOPOPROXY-VM: $name exited $code\"\n}}\n"
    ));
    for item in built {
        let guest = vm::stage_binary(&share.dir, &item.executable)?;
        let mut line = format!(
            "run_target {} {} --ignored --test-threads=1",
            sh_quote(&item.target),
            sh_quote(&guest)
        );
        for arg in &plan.args {
            line.push(' ');
            line.push_str(&sh_quote(arg));
        }
        script.push_str(&line);
        script.push('\n');
    }
    script.push_str("exit $failed\n");
    std::fs::write(share.dir.join("run.sh"), script).context("writing run.sh")?;
    let options = vm::VmOptions {
        memory_mib: if real_node {
            plan.memory_mib.max(REAL_NODE_MEMORY_MIB)
        } else {
            plan.memory_mib
        },
        read_only_shares: vec![workspace_share()],
        user_network: needs_k8s,
        tap: tap.as_ref().map(|t| t.name.clone()),
    };
    let outcome = vm::run_in_vm_with(label, &share.dir, plan.timeout, &options);
    drop(tap);
    let mut console = match &outcome {
        Ok(outcome) => outcome.console_log.clone(),
        Err(e) => format!("{e:#}"),
    };
    if let Some(plane) = control_plane {
        if outcome.is_err() {
            console.push_str(&plane.logs());
        }
    }
    let out = share.dir.join("out");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).ok();
    let mut results = Vec::new();
    for item in built {
        let target = &item.target;
        let code = read(&format!("{target}.code")).map(|s| s.trim().to_owned());
        let seconds = read(&format!("{target}.cs"))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map_or(0.0, |cs| cs / 100.0);
        let limit = read(&format!("{target}.limit")).and_then(|s| s.trim().parse::<f64>().ok());
        let output = read(&format!("{target}.log")).unwrap_or_default();
        let verdict = match code.as_deref() {
            Some("0") => Verdict::Pass,
            Some("skipped") | None if output.is_empty() => Verdict::NotRun,
            // A log without an exit code: the VM was killed while this target ran.
            None => Verdict::TimedOut,
            Some(code) => {
                let code = code.parse().unwrap_or(-1);
                // busybox timeout kills with SIGKILL: status 137 at the limit.
                if code == 137 && limit.is_some_and(|l| seconds + 1.0 >= l) {
                    Verdict::TimedOut
                } else {
                    Verdict::Fail(code)
                }
            }
        };
        results.push(TargetResult {
            target: target.clone(),
            verdict,
            seconds,
            output,
        });
    }
    let failed = outcome.is_err() || results.iter().any(|r| !matches!(r.verdict, Verdict::Pass));
    if failed {
        share.keep = true;
        println!(
            "vm-test {label}: share kept for inspection: {}",
            share.dir.display()
        );
    }
    Ok((results, console))
}

/// What one kernel's boot gave: its targets' results, its console, its wall-clock seconds.
type Boot = (Vec<TargetResult>, String, f64);

/// Boots every kernel at once, each in its own thread, and returns their boots in the order
/// of `kernels`. The guests are single-vCPU TCG, so two of them use the two cores a CI
/// machine has; one after the other, the VM tests alone took longer than CI can give them.
/// The second kernel (and every other one) runs its targets in reverse order, so that the
/// two boots' `vm_k8s_*` targets, each with its own control plane on the host, do not run
/// at the same time.
fn boot_kernels(
    kernels: &[String],
    built: &[Built],
    agent: &Path,
    package_dir: &Path,
    plan: &VmTestPlan,
) -> Vec<(String, Result<Boot>)> {
    std::thread::scope(|scope| {
        let running: Vec<_> = kernels
            .iter()
            .enumerate()
            .map(|(index, label)| {
                let mut order = built.to_vec();
                if index % 2 == 1 {
                    order.reverse();
                }
                let thread = scope.spawn(move || {
                    let started = Instant::now();
                    run_targets(label, &order, agent, package_dir, plan).map(
                        |(mut results, console)| {
                            // Reported in the order of the targets, whatever ran first.
                            results.sort_by(|a, b| a.target.cmp(&b.target));
                            (results, console, started.elapsed().as_secs_f64())
                        },
                    )
                });
                (label.clone(), thread)
            })
            .collect();
        running
            .into_iter()
            .map(|(label, thread)| {
                let boot = thread
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the {label} boot's thread panicked")));
                (label, boot)
            })
            .collect()
    })
}

/// Runs `vm-test`: the smoke test, then every selected `vm_*` target, per kernel.
pub fn vm_test(plan: &VmTestPlan) -> Result<()> {
    vm_test_timed(plan, &mut Vec::new())
}

/// [`vm_test`], adding the wall time of each of its stages (the smoke boots, the build, each
/// kernel's boot) to `stages`, also when a stage fails.
pub fn vm_test_timed(plan: &VmTestPlan, stages: &mut Vec<(String, f64)>) -> Result<()> {
    vm::require_tool(vm::QEMU)?;
    let mut summary: Vec<SummaryRow> = Vec::new();
    let mut failures = 0usize;
    let mut kernels_ok = Vec::new();
    for label in &plan.kernels {
        let prepared = vm::ensure_kernel(label).and_then(|k| vm::ensure_initramfs(&k).map(|_| k));
        let kernel = match prepared {
            Ok(kernel) => kernel,
            Err(e) => {
                println!("vm-test {label}: FAIL (preparing the kernel): {e:#}");
                summary.push(SummaryRow::new(
                    label,
                    "prepare",
                    Status::fail("prepare"),
                    0.0,
                ));
                failures += 1;
                continue;
            }
        };
        let started = Instant::now();
        let result = vm::smoke_test(label, plan.timeout);
        let seconds = started.elapsed().as_secs_f64();
        stages.push((format!("VM smoke boot {label}"), seconds));
        match result {
            Ok(()) => {
                println!(
                    "vm-test {label} ({}): PASS smoke (boot+test {seconds:.1} s)",
                    kernel.release
                );
                summary.push(SummaryRow::new(label, "smoke", Status::pass(), seconds));
                kernels_ok.push(label.clone());
            }
            Err(e) => {
                println!(
                    "vm-test {label} ({}): FAIL smoke after {seconds:.1} s: {e:#}",
                    kernel.release
                );
                summary.push(SummaryRow::new(
                    label,
                    "smoke",
                    Status::fail("smoke"),
                    seconds,
                ));
                failures += 1;
            }
        }
    }

    let (package_dir, all) = vm_targets()?;
    let selected: Vec<String> = if plan.tests.is_empty() {
        all.clone()
    } else {
        let known: BTreeSet<&String> = all.iter().collect();
        for test in &plan.tests {
            ensure!(
                known.contains(test),
                "no test target {test} in {PACKAGE}; vm targets: {}",
                all.join(", ")
            );
        }
        plan.tests.clone()
    };
    if !selected.is_empty() && !kernels_ok.is_empty() {
        println!("vm-test: building {}", selected.join(", "));
        let started = Instant::now();
        let built = build(&selected);
        stages.push(("VM test build".to_owned(), started.elapsed().as_secs_f64()));
        let (built, built_agent) = built?;
        let agent = plan.agent.clone().unwrap_or(built_agent);
        for (label, boot) in boot_kernels(&kernels_ok, &built, &agent, &package_dir, plan) {
            let (results, console, boot) = boot?;
            stages.push((format!("VM boot {label} ({} targets)", results.len()), boot));
            let mut boot_failed = false;
            for result in &results {
                let lines = parse_test_lines(&result.output);
                let status = Status::of(&result.verdict, &lines);
                println!(
                    "vm-test {label}: {status} {} ({:.1} s)",
                    result.target, result.seconds
                );
                if !result.output.trim().is_empty() {
                    for line in result.output.lines() {
                        println!("    {line}");
                    }
                }
                boot_failed |= matches!(status, Status::Fail(_));
                let mut row = SummaryRow::new(&label, &result.target, status, result.seconds);
                row.skipped = lines.skipped.into_iter().collect();
                summary.push(row);
            }
            if boot_failed {
                failures += 1;
                println!(
                    "vm-test {label}: console tail:\n{}",
                    crate::util::tail(&console, 40)
                );
            }
            println!(
                "vm-test {label}: boot with {} target(s) took {boot:.1} s",
                results.len()
            );
        }
    }
    print!("{}", render_summary(&summary));
    if failures > 0 {
        bail!("vm-test: {failures} failure(s)");
    }
    Ok(())
}

/// What a test target's output says about its tests: libtest's counts, and the lines of the
/// convention in `tests/support/harness.rs`.
#[derive(Debug, Default, PartialEq)]
struct TestLines {
    /// Tests libtest ran (passed or failed), helper entry points included.
    ran: usize,
    /// Helper-process entry points run directly (`HELPER: <name>`): not tests.
    helpers: BTreeSet<String>,
    /// Tests that did not run their checks (`SKIP: <test>: <reason>`), with the reason.
    skipped: BTreeMap<String, String>,
}

/// The text after `tag` when `line` is one of the convention's lines. With `--test-threads=1`
/// libtest writes `test NAME ... ` before the test runs and the result after it, so the line
/// a test writes can follow that prefix.
fn tagged<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix(tag) {
        return Some(rest);
    }
    let (head, rest) = line.split_once(" ... ")?;
    head.starts_with("test ").then_some(())?;
    rest.strip_prefix(tag)
}

/// Reads a target's output: every `test result:` line, `SKIP:` and `HELPER:` line.
fn parse_test_lines(output: &str) -> TestLines {
    let mut lines = TestLines::default();
    for line in output.lines() {
        let line = line.trim_end();
        if let Some(counts) = line.strip_prefix("test result: ") {
            // `ok. 3 passed; 0 failed; 2 ignored; 0 measured; 5 filtered out; finished in 1s`
            for part in counts.split(';') {
                let words: Vec<&str> = part.split_whitespace().collect();
                if let [.., number, "passed" | "failed"] = words.as_slice() {
                    lines.ran += number.parse::<usize>().unwrap_or(0);
                }
            }
        } else if let Some(rest) = tagged(line, "SKIP: ") {
            let (test, reason) = rest.split_once(": ").unwrap_or((rest, ""));
            lines
                .skipped
                .insert(test.trim().to_owned(), reason.trim().to_owned());
        } else if let Some(name) = tagged(line, "HELPER: ") {
            lines.helpers.insert(name.trim().to_owned());
        }
    }
    lines
}

/// A target's status in the report.
#[derive(Debug, Clone, PartialEq)]
enum Status {
    /// Its tests passed; this many of them skipped their checks.
    Pass { skipped: usize },
    /// It exited 0, but every test skipped its checks.
    Skip,
    /// It failed, timed out or did not run (why); a skipped test never hides this.
    Fail(String),
}

impl Status {
    fn pass() -> Self {
        Self::Pass { skipped: 0 }
    }

    fn fail(why: &str) -> Self {
        Self::Fail(why.to_owned())
    }

    /// The status of a target that ended with `verdict` and printed `lines`.
    fn of(verdict: &Verdict, lines: &TestLines) -> Self {
        match verdict {
            Verdict::Pass => {
                let tests = lines.ran.saturating_sub(lines.helpers.len());
                let skipped = lines.skipped.len();
                if skipped > 0 && skipped >= tests {
                    Self::Skip
                } else {
                    Self::Pass { skipped }
                }
            }
            Verdict::Fail(code) => Self::Fail(format!("exit {code}")),
            Verdict::TimedOut => Self::fail("timed out"),
            Verdict::NotRun => Self::fail("not run"),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pass { skipped: 0 } => f.write_str("PASS"),
            Self::Pass { skipped } => write!(f, "PASS ({skipped} skipped)"),
            Self::Skip => f.write_str("SKIP"),
            Self::Fail(why) => write!(f, "FAIL ({why})"),
        }
    }
}

/// One line of the final summary: a kernel's smoke test or test target.
#[derive(Debug, Clone)]
struct SummaryRow {
    kernel: String,
    name: String,
    status: Status,
    seconds: f64,
    /// `(test, reason)` of the target's skipped tests.
    skipped: Vec<(String, String)>,
}

impl SummaryRow {
    fn new(kernel: &str, name: &str, status: Status, seconds: f64) -> Self {
        Self {
            kernel: kernel.to_owned(),
            name: name.to_owned(),
            status,
            seconds,
            skipped: Vec::new(),
        }
    }
}

/// The summary `vm-test` ends with: every row, then per kernel the passed, skipped and failed
/// targets and each skipped test with its reason.
fn render_summary(rows: &[SummaryRow]) -> String {
    let mut out = String::from("vm-test summary:\n");
    for row in rows {
        let _ = writeln!(
            out,
            "  {:<5} {:<24} {:<18} {:>7.1} s",
            row.kernel,
            row.name,
            row.status.to_string(),
            row.seconds
        );
    }
    let mut kernels: Vec<&str> = Vec::new();
    for row in rows {
        if !kernels.contains(&row.kernel.as_str()) {
            kernels.push(&row.kernel);
        }
    }
    for kernel in kernels {
        let of_kernel: Vec<&SummaryRow> = rows.iter().filter(|r| r.kernel == kernel).collect();
        let count =
            |wanted: fn(&Status) -> bool| of_kernel.iter().filter(|r| wanted(&r.status)).count();
        let _ = writeln!(
            out,
            "  {kernel}: {} passed, {} skipped, {} failed",
            count(|s| matches!(s, Status::Pass { .. })),
            count(|s| matches!(s, Status::Skip)),
            count(|s| matches!(s, Status::Fail(_)))
        );
        for row in &of_kernel {
            for (test, reason) in &row.skipped {
                let _ = writeln!(out, "    skipped {}::{test}: {reason}", row.name);
            }
        }
    }
    out
}

/// What `vm-runner` runs.
#[derive(Debug, Clone)]
pub struct RunnerPlan {
    /// Kernel label.
    pub kernel: String,
    /// Wall-clock limit of the boot.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The host binary to run.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Environment variables the runner carries into the guest.
fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(key, _)| {
            (key.starts_with("RUST_") || key.starts_with("TOPOPROXY_") || key.starts_with("CARGO_"))
                && key != "TOPOPROXY_BIN"
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// Runs `vm-runner`: one binary in one boot; returns its exit status (or 1 when the VM
/// failed, after printing why).
pub fn vm_runner(plan: &RunnerPlan) -> Result<i32> {
    let share = Share::new(&format!("runner-{}", plan.kernel))?;
    let binary = plan
        .binary
        .canonicalize()
        .with_context(|| format!("the binary to run: {}", plan.binary.display()))?;
    let guest = vm::stage_binary(&share.dir, &binary)?;
    // cargo puts integration tests in <profile>/deps and the package's binary in <profile>.
    let agent = binary
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join(PACKAGE))
        .filter(|p| p.is_file())
        .map(|p| stable_path(&p));
    let agent = match agent {
        Some(agent) => Some(vm::stage_binary(&share.dir, &agent)?),
        None => None,
    };
    let workdir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/tmp"));
    let mut script = prologue(agent.as_deref(), &workdir, &forwarded_env());
    let mut line = sh_quote(&guest);
    for arg in &plan.args {
        line.push(' ');
        line.push_str(&sh_quote(arg));
    }
    let _ = writeln!(script, "{line} > /host/out/log 2>&1\ncode=$?\nexit $code");
    std::fs::write(share.dir.join("run.sh"), script).context("writing run.sh")?;
    let options = vm::VmOptions {
        memory_mib: plan.memory_mib,
        read_only_shares: vec![workspace_share()],
        user_network: false,
        tap: None,
    };
    let outcome = vm::run_in_vm_with(&plan.kernel, &share.dir, plan.timeout, &options);
    let log = std::fs::read_to_string(share.dir.join("out/log")).unwrap_or_default();
    print!("{log}");
    match outcome {
        Ok(outcome) => {
            if outcome.exit_code != 0 {
                eprintln!(
                    "vm-runner: {} exited {} in the {} VM; console tail:\n{}",
                    binary.display(),
                    outcome.exit_code,
                    plan.kernel,
                    crate::util::tail(&outcome.console_log, 20)
                );
            }
            Ok(outcome.exit_code)
        }
        Err(e) => {
            eprintln!("vm-runner: {e:#}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A passing target's output as the guest's log holds it (`--test-threads=1`): libtest's
    /// `test NAME ... ` comes before the test runs, so a test's `SKIP:` line follows it.
    const TWO_OF_THREE_SKIPPED: &str = "\
running 3 tests
test a_check ... SKIP: a_check: kernel 6.12.57: tcx, covered by host_north_south
ok
test b_check ... ok
test c_check ... SKIP: c_check: kernel 6.12.57: tcx, covered by host_north_south
ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.01s
";

    #[test]
    fn skip_lines_are_read_after_libtests_prefix_and_at_a_line_start() {
        let lines = parse_test_lines(TWO_OF_THREE_SKIPPED);
        assert_eq!(lines.ran, 3);
        assert_eq!(
            lines.skipped.keys().collect::<Vec<_>>(),
            ["a_check", "c_check"]
        );
        assert_eq!(
            lines.skipped["a_check"],
            "kernel 6.12.57: tcx, covered by host_north_south"
        );
        let alone = parse_test_lines("SKIP: soak: not on this kernel\n");
        assert_eq!(alone.skipped["soak"], "not on this kernel");
    }

    #[test]
    fn some_skipped_is_a_pass_that_says_how_many() {
        let status = Status::of(&Verdict::Pass, &parse_test_lines(TWO_OF_THREE_SKIPPED));
        assert_eq!(status, Status::Pass { skipped: 2 });
        assert_eq!(status.to_string(), "PASS (2 skipped)");
        let plain = Status::of(
            &Verdict::Pass,
            &parse_test_lines("test result: ok. 1 passed; 0 failed;"),
        );
        assert_eq!(plain.to_string(), "PASS");
    }

    #[test]
    fn every_test_skipped_is_skip_and_helpers_do_not_count() {
        let output = "\
running 2 tests
test churn_client_process ... HELPER: churn_client_process
ok
test soak ... SKIP: soak: the soak runs on 6.1.* only in the gate
ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        let lines = parse_test_lines(output);
        assert_eq!(lines.helpers.len(), 1);
        let status = Status::of(&Verdict::Pass, &lines);
        assert_eq!(status, Status::Skip);
        assert_eq!(status.to_string(), "SKIP");
    }

    #[test]
    fn a_failure_wins_over_skipped_tests() {
        let output = "\
running 2 tests
test a ... SKIP: a: no tcx
ok
test b ... FAILED

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out
";
        let lines = parse_test_lines(output);
        assert_eq!(lines.ran, 2);
        assert_eq!(
            Status::of(&Verdict::Fail(101), &lines).to_string(),
            "FAIL (exit 101)"
        );
        let all_skipped = parse_test_lines("SKIP: a: no tcx\n");
        for verdict in [Verdict::TimedOut, Verdict::NotRun, Verdict::Fail(137)] {
            assert!(matches!(
                Status::of(&verdict, &all_skipped),
                Status::Fail(_)
            ));
        }
    }

    #[test]
    fn a_test_printing_the_word_elsewhere_is_no_skip() {
        let output =
            "test a ... ok\nnote: SKIP: this is not at a line start\ntest b stays SKIP: no\n";
        assert!(parse_test_lines(output).skipped.is_empty());
    }

    #[test]
    fn the_summary_counts_targets_per_kernel_and_lists_the_skipped_tests() {
        let mut skipped = SummaryRow::new("6.12", "vm_k8s_churn", Status::Skip, 0.1);
        skipped.skipped = vec![("soak".to_owned(), "TOPOPROXY_EXTENDED unset".to_owned())];
        let rows = [
            SummaryRow::new("6.1", "smoke", Status::pass(), 9.0),
            SummaryRow::new("6.1", "vm_ipvs_link", Status::fail("exit 101"), 20.0),
            SummaryRow::new("6.12", "smoke", Status::pass(), 8.0),
            skipped,
        ];
        let text = render_summary(&rows);
        assert!(
            text.contains("  6.1: 1 passed, 0 skipped, 1 failed\n"),
            "{text}"
        );
        assert!(
            text.contains("  6.12: 1 passed, 1 skipped, 0 failed\n"),
            "{text}"
        );
        assert!(
            text.contains("    skipped vm_k8s_churn::soak: TOPOPROXY_EXTENDED unset\n"),
            "{text}"
        );
        assert!(text.contains("FAIL (exit 101)"), "{text}");
    }
}
