//! Project tasks: `cargo xtask <task>`.
//!
//! - `bench-sync`: the end-to-end sync benchmarks. Runs the in-process bench (initial sync,
//!   event-to-dataplane latency) and then the agent as its own process against the fake API
//!   server, to measure its resident memory at scale; `--real-apiserver` also against a real
//!   kube-apiserver, kube-proxy beside it (see `bench.rs`).
//! - `vm-setup`: installs QEMU and the guest tools, fetches the Debian kernels (see `vm/`).
//! - `vm-test`: boots each kernel in QEMU, runs the smoke test, then every `vm_*` test target
//!   in one boot per kernel (see `vmtest.rs`).
//! - `vm-run`: boots one kernel with a prepared share and runs its `run.sh`.
//! - `vm-runner`: a cargo target runner running one binary in the VM (see `vmtest.rs`).
//! - `vm-bench`: the agent's IPVS sync against `ipvsadm -R` in the VM (see `vmbench.rs`).
//! - `test`: the README's test command: set-up, `cargo test --workspace`, fuzzing, every VM
//!   test; `--extended` adds what is too long for CI (see `testall.rs`).
//! - `ebpf-setup`: installs the eBPF toolchain (rust-src, LLVM 22, bpf-linker; see `ebpf.rs`).
//! - `k8s-setup`: builds and installs the real Kubernetes components the tests run against
//!   (kube-apiserver, kube-controller-manager, kube-proxy, kubectl, etcd, haproxy, kustomize,
//!   helm; see `k8s.rs`).
//! - `image`: the container image, built without a container engine; `--check` builds it
//!   twice, compares digests and runs the in-image smoke test (see `image/mod.rs`).
//! - `chart`: `--check` lints and templates charts/topoproxy with the pinned helm and proves
//!   that it renders the same objects as the kustomize overlays (see `chart.rs`).
//! - `release`: binary tarball, image archive and SBOM, chart package pinned to the image's
//!   digest, SHA256SUMS (see `release.rs`).
//! - `fuzz`: every fuzz target in `fuzz/` for a bounded time; fails on a crash (see `fuzz.rs`).
//! - `demo`: the example cluster on this machine with real traffic through the eBPF dataplane
//!   (see `demo/`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod chart;
mod demo;
mod ebpf;
mod fuzz;
mod image;
mod k8s;
mod release;
mod testall;
mod tools;
mod topology;
mod util;
mod vm;
mod vmbench;
mod vmtest;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// End-to-end sync benchmarks: initial sync, event latency, agent RSS.
    BenchSync {
        /// Services in the synthetic cluster (10 endpoints each, 3 zones).
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        /// EndpointSlice events for the latency measurement.
        #[arg(long, default_value_t = 300)]
        events: usize,
        /// Only the separate-process memory measurement.
        #[arg(long)]
        rss_only: bool,
        /// Also measure against a real kube-apiserver (k8s-setup builds it): initial sync,
        /// RSS and endpoint-change latency, beside the fake's numbers; then kube-proxy v1.36
        /// (nftables mode) against the same server: informer sync, first sync, RSS. Runs in a
        /// network and mount namespace of its own (root, unshare).
        #[arg(long)]
        real_apiserver: bool,
        /// With --real-apiserver: Nodes in the cluster (at least the 30 that hold endpoints);
        /// the rest have none, to measure what watching every Node costs.
        #[arg(long, default_value_t = 30)]
        nodes: usize,
    },
    /// Installs what the tests need (root, apt) and runs them all: cargo test, fuzzing, then
    /// the VM tests on every kernel; prints each stage's wall time at the end.
    Test {
        /// Wall-clock limit per VM boot, in seconds: a guard against a hung guest. The two
        /// kernels boot at once; one after the other, a boot took 805–814 s on the 2-core CI
        /// machine (TCG) and later more than 1,190 s, when 1,200 s was the limit. Default:
        /// 2,700 s, and 10,800 s with --extended (every crash point and 40 churn rounds per
        /// kernel on top of the gate's boot).
        #[arg(long)]
        vm_timeout: Option<u64>,
        /// Also what is too long for CI, run by hand before a release: the whole kube-proxy
        /// parity corpus on both kernels, every crash point, 40-round churn soaks, 300 s per
        /// fuzz target and the side-by-side benchmark against kube-proxy
        /// (TOPOPROXY_EXTENDED=1 for the tests).
        #[arg(long)]
        extended: bool,
    },
    /// Installs QEMU, busybox-static, ipvsadm (root, apt) and prepares the VM kernels.
    VmSetup,
    /// Runs every fuzz target (cargo fuzz, libFuzzer; installs cargo-fuzz if missing) for a
    /// bounded time each; fails on a crash and says where the input is.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Target to run; repeat for several. Default: all.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// libFuzzer's random seed, to replay a run's mutations; default: a new one each run.
        #[arg(long)]
        seed: Option<u32>,
    },
    /// Plans the topology scenarios with the real planner and writes the table into
    /// docs/topology.md.
    TopologyReport {
        /// Only check that docs/topology.md is current.
        #[arg(long)]
        check: bool,
    },
    /// Installs what building the eBPF programs needs: rust-src, LLVM 22 (root, apt) and
    /// bpf-linker.
    EbpfSetup,
    /// Builds kube-apiserver, kube-controller-manager, kube-proxy and kubectl from the
    /// k8s.io/kubernetes module, installs kustomize and helm (go install) and etcd and haproxy
    /// (root, apt); cached outside the work tree.
    K8sSetup,
    /// The README's main command: the example cluster on this machine with real traffic through
    /// the eBPF dataplane (root). A client in one zone reaches only that zone's pods, falls
    /// back to the other zones when they stop, and returns when they are back; exits non-zero
    /// if a step does not behave so. Removes everything it built afterwards.
    Demo {
        /// The node the agent runs as (a Node of examples/cluster).
        #[arg(long, default_value = "node-b1")]
        node: String,
        /// Leave the world running for exploring; prints how to clean up.
        #[arg(long)]
        keep: bool,
        /// Only remove a world left by `--keep` or an interrupted run.
        #[arg(long)]
        clean: bool,
        /// Internal: the demo's own pods and client, started inside its namespaces.
        #[arg(long, hide = true, num_args = 1.., allow_hyphen_values = true)]
        role: Vec<String>,
    },
    /// The OCI image (layout, docker/oci archive, SBOM) without a container engine: Debian's
    /// nft, ipvsadm, conntrack and their libraries, and the release topoproxy binary.
    Image {
        /// Output directory (default: <target>/image).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use this topoproxy binary instead of building the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Also build a second time and compare digests, then run the image's programs in
        /// its unpacked root (root, unshare).
        #[arg(long)]
        check: bool,
    },
    /// Release artifacts: binary tarball, image archive + SBOM, chart package (pinned to the
    /// image digest), SHA256SUMS, in <target>/release-artifacts/vX.Y.Z.
    Release {
        /// Use this topoproxy binary instead of building the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Also check the image (reproducibility, in-image smoke test).
        #[arg(long)]
        check: bool,
    },
    /// The Helm chart: with --check, helm lint, helm template, and chart = kustomize for the
    /// same settings (needs `cargo xtask k8s-setup`'s helm and kustomize).
    Chart {
        /// Lint, template and compare with the overlays.
        #[arg(long)]
        check: bool,
    },
    /// Boots each kernel in QEMU, runs the smoke test, then the `vm_*` test targets' ignored
    /// tests in one boot per kernel.
    VmTest {
        /// Kernel to test (6.1 or 6.12); repeat for several. Default: all.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Test target to run (e.g. vm_ipvs_link); repeat for several. Default: every vm_*.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Wall-clock limit per VM boot, in seconds; a hung guest is killed at it.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Passed to every test binary after `--ignored --test-threads=1` (filters, flags).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// IPVS programming cost in the VM: the agent's cold sync against `ipvsadm -R` of the same
    /// table, and the netlink requests of one endpoint change.
    VmBench {
        /// Kernel (6.1 or 6.12); repeat for several.
        #[arg(long = "kernel", default_values_t = ["6.1".to_owned()])]
        kernels: Vec<String>,
        /// Service counts (10 endpoints each), comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1000usize, 10000])]
        services: Vec<usize>,
        /// Wall-clock limit per boot, in seconds.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Also run the per-batch netlink bench (benches/ipvs_batches.rs) for these Service
        /// counts first, in the same boot.
        #[arg(long, value_delimiter = ',')]
        batches: Vec<usize>,
        /// Only the per-batch bench: skip `ipvsadm -R` and the agent runs.
        #[arg(long, requires = "batches")]
        only_batches: bool,
        /// Instead: kube-proxy (IPVS mode) and the agent side by side through the real
        /// apiserver (`vm_k8s_parity`'s `side_by_side`), for each `--services` count.
        #[arg(long, conflicts_with_all = ["batches", "only_batches"])]
        vs_kube_proxy: bool,
    },
    /// A cargo target runner: runs BINARY ARGS... in the VM and exits with its status.
    VmRunner {
        /// Kernel (6.1 or 6.12).
        #[arg(long = "kernel", default_value = "6.1")]
        kernel: String,
        /// Wall-clock limit, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// The binary to run, then its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Boots one kernel with SHARE mounted at /host and runs /host/run.sh; prints the console
    /// and exits with run.sh's status.
    VmRun {
        /// Kernel (6.1 or 6.12).
        #[arg(long = "kernel", default_value = "6.1")]
        kernel: String,
        /// Folder shared with the VM; must hold run.sh.
        share: PathBuf,
        /// Wall-clock limit, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    check_workspace()?;
    match cli.task {
        Task::BenchSync {
            services,
            events,
            rss_only,
            real_apiserver,
            nodes,
        } => {
            bench::bench_sync(services, events, rss_only)?;
            if real_apiserver {
                bench::bench_real_apiserver(services, events, nodes)?;
            }
            Ok(())
        }
        Task::Test {
            vm_timeout,
            extended,
        } => {
            let default_timeout = if extended { 10_800 } else { 2_700 };
            testall::test_all(&testall::TestOptions {
                vm_timeout: Duration::from_secs(vm_timeout.unwrap_or(default_timeout)),
                extended,
            })
        }
        Task::VmSetup => vm::vm_setup(),
        Task::Fuzz {
            seconds,
            targets,
            seed,
        } => fuzz::fuzz(seconds, &targets, seed),
        Task::TopologyReport { check } => topology::topology_report(check),
        Task::EbpfSetup => ebpf::ebpf_setup(),
        Task::K8sSetup => k8s::k8s_setup(),
        Task::Release { binary, check } => {
            release::release(&release::ReleaseOptions { binary, check })
        }
        Task::Chart { check } => {
            if !check {
                bail!("nothing to do: `cargo xtask chart --check` lints and compares the chart");
            }
            chart::chart_check()
        }
        Task::Image { out, binary, check } => {
            image::image(&image::ImageOptions { out, binary, check }).map(|_| ())
        }
        Task::Demo {
            node,
            keep,
            clean,
            role,
        } => {
            if role.is_empty() {
                demo::demo(&demo::DemoOptions { node, keep, clean })
            } else {
                demo::role(&role)
            }
        }
        Task::VmTest {
            kernels,
            tests,
            timeout,
            memory,
            args,
        } => {
            let kernels = if kernels.is_empty() {
                vm::KERNELS.iter().map(|k| (*k).to_owned()).collect()
            } else {
                kernels
            };
            vmtest::vm_test(&vmtest::VmTestPlan {
                kernels,
                tests,
                args,
                timeout: Duration::from_secs(timeout),
                memory_mib: memory,
                agent: None,
                env: Vec::new(),
            })
        }
        Task::VmBench {
            kernels,
            services,
            timeout,
            memory,
            batches: _,
            only_batches: _,
            vs_kube_proxy: true,
        } => vmbench::vs_kube_proxy(&kernels, &services, Duration::from_secs(timeout), memory),
        Task::VmBench {
            kernels,
            services,
            timeout,
            memory,
            batches,
            only_batches,
            vs_kube_proxy: false,
        } => vmbench::vm_bench(&vmbench::BenchPlan {
            kernels,
            services: if only_batches { Vec::new() } else { services },
            timeout: Duration::from_secs(timeout),
            memory_mib: memory,
            batches,
        }),
        Task::VmRunner {
            kernel,
            timeout,
            memory,
            command,
        } => {
            let (binary, args) = command
                .split_first()
                .context("vm-runner needs the binary to run")?;
            let code = vmtest::vm_runner(&vmtest::RunnerPlan {
                kernel,
                timeout: Duration::from_secs(timeout),
                memory_mib: memory,
                binary: PathBuf::from(binary),
                args: args.to_vec(),
            })?;
            std::process::exit(code);
        }
        Task::VmRun {
            kernel,
            share,
            timeout,
        } => {
            let outcome = vm::run_in_vm(&kernel, &share, Duration::from_secs(timeout))?;
            print!("{}", outcome.console_log);
            std::process::exit(outcome.exit_code);
        }
    }
}

/// Refuses to run when this binary was built from another checkout than the one it is run in:
/// worktrees sharing one `CARGO_TARGET_DIR` overwrite each other's `target/debug/xtask`, and
/// results would silently belong to the other checkout.
fn check_workspace() -> Result<()> {
    let root = workspace_root();
    let (Ok(cwd), Ok(root)) = (
        std::env::current_dir().and_then(|d| d.canonicalize()),
        root.canonicalize(),
    ) else {
        return Ok(());
    };
    if !cwd.starts_with(&root) {
        bail!(
            "this xtask binary was built from {} but runs in {}: another checkout sharing the \
             target directory rebuilt it meanwhile; run the command again",
            root.display(),
            cwd.display()
        );
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo builds: CARGO_TARGET_DIR if set (relative to the workspace), else `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

fn cargo(args: &[&str], envs: &[(&str, String)]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}
