//! Builds the eBPF programs (`../ebpf`) for the BPF target with aya-build; the agent embeds
//! the object (`dataplane::ebpf`). Also records the git revision for `topoproxy --version`
//! (`TOPOPROXY_GIT_REVISION`).
//!
//! Needs `bpf-linker` on PATH and the `rust-src` component: `cargo xtask ebpf-setup` installs
//! both. Stable Rust builds `core` for the BPF target only with `RUSTC_BOOTSTRAP=1`, which is
//! set here for that one inner build, not for the agent.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    record_git_revision();
    println!("cargo:rerun-if-changed=../common");
    println!("cargo:rerun-if-env-changed=PATH");
    if !on_path("bpf-linker") {
        eprintln!(
            "error: bpf-linker is not on PATH; it links topoproxy's eBPF programs.\n\
             Install the eBPF toolchain with `cargo xtask ebpf-setup` (as root on Debian 12),\n\
             then make sure ~/.cargo/bin is on PATH."
        );
        return ExitCode::FAILURE;
    }
    // The inner cargo must use the same toolchain as this build, not rustup's default.
    let toolchain = toolchain();
    // SAFETY (edition 2021: safe): the build script is single-threaded here.
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // aya-build relays the inner cargo's progress as warnings; keep only real diagnostics.
    env::set_var("CARGO_TERM_QUIET", "true");
    let ebpf = aya_build::Package {
        name: "topoproxy-ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    match aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: building the eBPF programs failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// `RUSTUP_TOOLCHAIN` if rustup set it, else the toolchain directory `RUSTC` lives in
/// (`…/toolchains/<name>/bin/rustc`), else `stable`.
fn toolchain() -> String {
    if let Ok(name) = env::var("RUSTUP_TOOLCHAIN") {
        return name;
    }
    env::var_os("RUSTC")
        .map(PathBuf::from)
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .filter(|dir| {
            dir.parent()
                .and_then(Path::file_name)
                .is_some_and(|name| name == "toolchains")
        })
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
        .map(str::to_owned)
        .unwrap_or_else(|| "stable".to_owned())
}

/// Sets `TOPOPROXY_GIT_REVISION` for the crate: the override of the same name if set (builds
/// from a source tarball, where there is no `.git`), else `git rev-parse HEAD` of this
/// checkout, else `unknown` (no git, or no repository).
fn record_git_revision() {
    println!("cargo:rerun-if-env-changed=TOPOPROXY_GIT_REVISION");
    let revision = env::var("TOPOPROXY_GIT_REVISION")
        .ok()
        .filter(|value| !value.is_empty())
        .or_else(|| {
            watch_git_head();
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TOPOPROXY_GIT_REVISION={revision}");
}

/// Re-runs this script when HEAD moves: HEAD itself (a checkout) and the ref it names (a
/// commit), which in a worktree lives in the common git directory.
fn watch_git_head() {
    if let Some(head) = git(&["rev-parse", "--path-format=absolute", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            &reference,
        ]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(packed) = git(&[
        "rev-parse",
        "--path-format=absolute",
        "--git-path",
        "packed-refs",
    ]) {
        println!("cargo:rerun-if-changed={packed}");
    }
}

/// One line of `git ARGS` output in the manifest directory, or None if git is missing or fails.
/// The search for a repository stops at the workspace root: a source tree unpacked inside some
/// other repository must say `unknown`, not that repository's revision.
fn git(args: &[&str]) -> Option<String> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR")?);
    let ceiling = manifest_dir.parent()?.parent()?;
    let output = Command::new("git")
        .args(args)
        .env("GIT_CEILING_DIRECTORIES", ceiling)
        .current_dir(&manifest_dir)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let line = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (!line.is_empty()).then_some(line)
}
