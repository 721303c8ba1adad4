//! Builds the eBPF programs (`../ebpf`) for the BPF target with aya-build; the agent embeds
//! the object (`dataplane::ebpf`).
//!
//! Needs `bpf-linker` on PATH and the `rust-src` component: `cargo xtask ebpf-setup` installs
//! both. Stable Rust builds `core` for the BPF target only with `RUSTC_BOOTSTRAP=1`, which is
//! set here for that one inner build, not for the agent.

use std::env;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
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
