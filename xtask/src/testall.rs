//! `cargo xtask test`: the README's test command. Installs what the tests need on a fresh
//! Debian 12 machine (as root), then runs every test: unit, golden, property, CLI and agent
//! tests, the host kernel tests (nftables, conntrack, eBPF with real traffic in network
//! namespaces), the agent against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager built by `k8s-setup`), the chart's DaemonSet from the image built
//! here under a real kubelet (`tests/k8s_real_node.rs`), every fuzz target for a short bound, and the
//! IPVS and eBPF tests inside QEMU on Debian's 6.1 and 6.12 kernels.
//!
//! Without flags this is the gate `.ci/run` runs. `--extended` runs what is too long for CI,
//! by hand before a release: [`EXTENDED_ENV`] set to `1` in `cargo test` and in the VM guests
//! (the tests read it: the whole kube-proxy parity corpus on every kernel, every crash point,
//! `tests/support/k8s/churn.rs`'s longer churn soaks on the host and on every kernel),
//! [`EXTENDED_FUZZ_SECONDS`] per fuzz target, and the side-by-side benchmark against
//! kube-proxy. Either way it ends with the wall time of each stage, also when one failed.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use crate::{ebpf, fuzz, k8s, vm, vmbench, vmtest};

/// Seconds each fuzz target runs here: 5 targets stay under the 4 minutes CI gives fuzzing
/// with the build; `cargo xtask fuzz` alone defaults to 60.
const CI_FUZZ_SECONDS: u64 = 20;
/// Seconds per fuzz target in the extended run.
const EXTENDED_FUZZ_SECONDS: u64 = 300;
/// A fixed seed: a fresh clone mutates the same inputs in the same order on every run, so a
/// crash CI finds replays with `cargo xtask fuzz --seed 1`, and a run that passed here does
/// not fail elsewhere by luck (a faster machine only gets further along the same sequence).
const CI_FUZZ_SEED: u32 = 1;
/// The variable the tests read (`tests/support/harness.rs`): `1` in the extended run, `0` in
/// the gate, set either way so a value left in the caller's environment cannot change the gate.
pub const EXTENDED_ENV: &str = "TOPOPROXY_EXTENDED";
/// The side-by-side benchmark of the extended run: the README's command
/// (`vm-bench --vs-kube-proxy --kernel 6.1 --services 1000,10000 --memory 2048`). Its 10,000
/// run alone took about 70 minutes (README), hence the boot's limit.
const SIDE_BY_SIDE_KERNEL: &str = "6.1";
const SIDE_BY_SIDE_SERVICES: [usize; 2] = [1000, 10_000];
const SIDE_BY_SIDE_TIMEOUT: Duration = Duration::from_secs(7200);
const SIDE_BY_SIDE_MEMORY_MIB: u32 = 2048;

/// What `cargo xtask test` runs.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// Wall-clock limit of one VM boot.
    pub vm_timeout: Duration,
    /// The extended run instead of the gate.
    pub extended: bool,
}

/// Runs the set-up and every test; fails on the first failing stage. Prints the wall time of
/// each stage at the end, whatever the outcome.
pub fn test_all(options: &TestOptions) -> Result<()> {
    let started = Instant::now();
    let mut stages = Vec::new();
    let result = run_stages(options, &mut stages);
    print!(
        "{}",
        render_stages(&stages, started.elapsed().as_secs_f64())
    );
    result?;
    println!(
        "test: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `stage`, adding its wall time to `stages` also when it fails.
fn timed<T>(
    stages: &mut Vec<(String, f64)>,
    name: &str,
    stage: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let result = stage();
    stages.push((name.to_owned(), started.elapsed().as_secs_f64()));
    result
}

fn run_stages(options: &TestOptions, stages: &mut Vec<(String, f64)>) -> Result<()> {
    let extended = if options.extended { "1" } else { "0" };
    let fuzz_seconds = if options.extended {
        EXTENDED_FUZZ_SECONDS
    } else {
        CI_FUZZ_SECONDS
    };
    if options.extended {
        println!("== extended run ({EXTENDED_ENV}=1): not what CI runs");
    }
    println!("== set-up: VM tools and kernels, nftables, conntrack (apt)");
    timed(stages, "set-up: vm-setup", vm::vm_setup)?;
    println!("== set-up: eBPF toolchain (rust-src, LLVM 22, bpf-linker)");
    timed(stages, "set-up: ebpf-setup", ebpf::ebpf_setup)?;
    println!("== set-up: real Kubernetes (kube-apiserver, controller manager, scheduler, kubelet, kube-proxy, etcd, containerd, kustomize, helm, test images)");
    timed(stages, "set-up: k8s-setup", k8s::k8s_setup)?;

    println!("== the image (release build): the real-node test runs the chart's DaemonSet from it");
    let agent_image = timed(stages, "image (release build)", || {
        crate::image::image(&crate::image::ImageOptions {
            out: None,
            binary: None,
            check: false,
        })
    })?;

    println!("== cargo test (unit, golden, property, CLI, agent, host kernel tests, real node)");
    timed(stages, "cargo test --workspace", || {
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["test", "--workspace"])
            .env("TOPOPROXY_AGENT_IMAGE", &agent_image.archive)
            .env(
                "TOPOPROXY_K8S_BIN",
                k8s::kubernetes_bin_dir(&k8s::kubernetes_version()?),
            )
            .env("TOPOPROXY_TOOLS_BIN", k8s::tools_bin_dir())
            .env(EXTENDED_ENV, extended)
            .current_dir(crate::workspace_root())
            .status()
            .context("running cargo test")?;
        ensure!(status.success(), "cargo test failed ({status})");
        Ok(())
    })?;

    println!("== fuzzing: every target for {fuzz_seconds} s, seed {CI_FUZZ_SEED} (cargo fuzz)");
    timed(stages, "fuzzing (build and run)", || {
        fuzz::fuzz(fuzz_seconds, &[], Some(CI_FUZZ_SEED))
    })?;

    println!(
        "== VM tests (IPVS, kube-ipvs0, eBPF verifier, kube-proxy parity against a real \
         control plane on the host) on every kernel"
    );
    let mut vm_stages = Vec::new();
    let vm_result = vmtest::vm_test_timed(
        &vmtest::VmTestPlan {
            kernels: vm::KERNELS.iter().map(|k| (*k).to_owned()).collect(),
            tests: Vec::new(),
            args: Vec::new(),
            timeout: options.vm_timeout,
            memory_mib: 1024,
            agent: None,
            env: vec![
                (EXTENDED_ENV.to_owned(), extended.to_owned()),
                (
                    "TOPOPROXY_AGENT_IMAGE".to_owned(),
                    agent_image.archive.display().to_string(),
                ),
            ],
        },
        &mut vm_stages,
    );
    stages.extend(vm_stages);
    vm_result?;

    if options.extended {
        println!(
            "== side-by-side benchmark: kube-proxy and topoproxy at {SIDE_BY_SIDE_SERVICES:?} \
             Services on {SIDE_BY_SIDE_KERNEL}"
        );
        timed(stages, "side-by-side benchmark", || {
            vmbench::vs_kube_proxy(
                &[SIDE_BY_SIDE_KERNEL.to_owned()],
                &SIDE_BY_SIDE_SERVICES,
                SIDE_BY_SIDE_TIMEOUT,
                SIDE_BY_SIDE_MEMORY_MIB,
            )
        })?;
    }
    Ok(())
}

/// The stage table `cargo xtask test` ends with (docs/testing.md, "Where CI's minutes go").
/// The VM boots of both kernels run at once, so their rows overlap in time.
fn render_stages(stages: &[(String, f64)], total: f64) -> String {
    let mut out = String::from("test: wall time per stage (the VM boots run at once):\n");
    for (name, seconds) in stages {
        out.push_str(&format!(
            "  {name:<40} {seconds:>8.1} s  {:>5.1} min\n",
            seconds / 60.0
        ));
    }
    out.push_str(&format!(
        "  {:<40} {total:>8.1} s  {:>5.1} min\n",
        "total",
        total / 60.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_table_lists_each_stage_and_the_total() {
        let stages = [
            ("set-up: k8s-setup".to_owned(), 690.0),
            ("VM boot 6.1 (8 targets)".to_owned(), 1408.2),
        ];
        let text = render_stages(&stages, 3165.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].contains("set-up: k8s-setup") && lines[1].contains("690.0 s"));
        assert!(lines[2].contains("1408.2 s") && lines[2].contains("23.5 min"));
        assert!(lines[3].starts_with("  total") && lines[3].contains("52.8 min"));
    }
}
