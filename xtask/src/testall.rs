//! `cargo xtask test`: the README's test command. Installs what the tests need on a fresh
//! Debian 12 machine (as root), then runs every test: unit, golden, property, CLI and agent
//! tests, the host kernel tests (nftables, conntrack, eBPF with real traffic in network
//! namespaces), the agent against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager built by `k8s-setup`), every fuzz target for a short bound, and the
//! IPVS and eBPF tests inside QEMU on Debian's 6.1 and 6.12 kernels.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use crate::{ebpf, fuzz, k8s, vm, vmtest};

/// Seconds each fuzz target runs here: 5 targets stay under the 4 minutes CI gives fuzzing
/// with the build; `cargo xtask fuzz` alone defaults to 60.
const CI_FUZZ_SECONDS: u64 = 20;
/// A fixed seed: a fresh clone mutates the same inputs in the same order on every run, so a
/// crash CI finds replays with `cargo xtask fuzz --seed 1`, and a run that passed here does
/// not fail elsewhere by luck (a faster machine only gets further along the same sequence).
const CI_FUZZ_SEED: u32 = 1;

/// Runs the set-up and every test; fails on the first failing stage.
pub fn test_all(vm_timeout: Duration) -> Result<()> {
    let started = Instant::now();
    println!("== set-up: VM tools and kernels, nftables, conntrack (apt)");
    vm::vm_setup()?;
    println!("== set-up: eBPF toolchain (rust-src, LLVM 22, bpf-linker)");
    ebpf::ebpf_setup()?;
    println!("== set-up: real Kubernetes (kube-apiserver, controller manager, kube-proxy, etcd, kustomize, helm)");
    k8s::k8s_setup()?;

    println!("== cargo test (unit, golden, property, CLI, agent, host kernel tests)");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["test", "--workspace"])
        .env(
            "TOPOPROXY_K8S_BIN",
            k8s::kubernetes_bin_dir(&k8s::kubernetes_version()?),
        )
        .env("TOPOPROXY_TOOLS_BIN", k8s::tools_bin_dir())
        .current_dir(crate::workspace_root())
        .status()
        .context("running cargo test")?;
    ensure!(status.success(), "cargo test failed ({status})");

    println!("== fuzzing: every target for {CI_FUZZ_SECONDS} s, seed {CI_FUZZ_SEED} (cargo fuzz)");
    fuzz::fuzz(CI_FUZZ_SECONDS, &[], Some(CI_FUZZ_SEED))?;

    println!(
        "== VM tests (IPVS, kube-ipvs0, eBPF verifier, kube-proxy parity against a real \
         control plane on the host) on every kernel"
    );
    vmtest::vm_test(&vmtest::VmTestPlan {
        kernels: vm::KERNELS.iter().map(|k| (*k).to_owned()).collect(),
        tests: Vec::new(),
        args: Vec::new(),
        timeout: vm_timeout,
        memory_mib: 1024,
        agent: None,
        env: Vec::new(),
    })?;
    println!(
        "test: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
