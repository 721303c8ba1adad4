//! `cargo xtask ebpf-setup`: the toolchain that builds topoproxy's eBPF programs, installed
//! idempotently on Debian 12 (run as root).
//!
//! - `rust-src` for the active toolchain: the BPF target has no prebuilt `core`, so
//!   `agent/build.rs` builds it (`-Z build-std=core` under `RUSTC_BOOTSTRAP=1`).
//! - LLVM 22 development packages. Debian 12 ships them from `bookworm-security`
//!   (`1:22.x-1~deb12u1`); the suite is added if no apt source names it.
//! - `bpf-linker` 0.13.0 built against LLVM 22. Its default feature wants LLVM 23, which
//!   Debian lacks, and `/usr/bin/llvm-config` is LLVM 14, so LLVM 22's bin dir goes first on
//!   PATH for the build.
//!
//! Lint the eBPF crate for its own target (it is not a default member; a host clippy fails):
//! `RUSTC_BOOTSTRAP=1 cargo clippy -p topoproxy-ebpf --target bpfel-unknown-none
//! -Z build-std=core -- -D warnings`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context as _, Result};

use crate::util::{output, run};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const APT_PACKAGES: [&str; 5] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];
const SECURITY_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-security.sources";
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub fn ebpf_setup() -> Result<()> {
    let uid = output(Command::new("id").arg("-u"))?;
    ensure!(
        uid.trim() == "0",
        "ebpf-setup installs apt packages and must run as root (try `sudo -E cargo xtask ebpf-setup`)"
    );
    rust_src()?;
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        println!("ebpf-setup: bpf-linker {BPF_LINKER_VERSION} already installed");
        return Ok(());
    }
    llvm_packages()?;
    println!("ebpf-setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (minutes)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(LLVM_BIN)];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).context("joining PATH")?;
    run(Command::new(cargo())
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--no-default-features", "--features", "llvm-22"])
        .env("PATH", path))
    .context("cargo install bpf-linker failed")?;
    ensure!(
        bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION),
        "bpf-linker {BPF_LINKER_VERSION} installed but not found on PATH: add ~/.cargo/bin to PATH"
    );
    println!("ebpf-setup: done");
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn rust_src() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if library.is_dir() {
        println!("ebpf-setup: rust-src present");
        return Ok(());
    }
    println!("ebpf-setup: rustup component add rust-src");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "bpf-linker 0.13.0"
    text.split_whitespace().nth(1).map(str::to_owned)
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// The version apt would install, if any source offers one.
fn apt_candidate(package: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|version| *version != "(none)")
        .map(str::to_owned)
}

fn security_configured() -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(entries.flatten().map(|e| e.path()).filter(|path| {
            matches!(
                path.extension().and_then(OsStr::to_str),
                Some("list" | "sources")
            )
        }));
    }
    files.iter().any(|file| {
        std::fs::read_to_string(file).is_ok_and(|text| {
            text.lines()
                .map(str::trim)
                .filter(|line| !line.starts_with('#'))
                .any(|line| line.split_whitespace().any(|w| w == "bookworm-security"))
        })
    })
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn llvm_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!("ebpf-setup: LLVM 22 packages present");
        return Ok(());
    }
    if apt_candidate("llvm-22-dev").is_none() {
        if !security_configured() {
            ensure!(
                Path::new(ARCHIVE_KEYRING).exists(),
                "{ARCHIVE_KEYRING} is missing: install debian-archive-keyring"
            );
            let text = format!(
                "Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                 Suites: bookworm-security\nComponents: main\nSigned-By: {ARCHIVE_KEYRING}\n"
            );
            std::fs::write(SECURITY_SOURCES, text)
                .with_context(|| format!("writing {SECURITY_SOURCES}"))?;
            println!("ebpf-setup: added {SECURITY_SOURCES}");
        }
        println!("ebpf-setup: apt-get update");
        run(apt_get().args(["update", "-q"]))?;
        if apt_candidate("llvm-22-dev").is_none() {
            bail!(
                "no apt source offers llvm-22-dev; Debian 12 ships it in bookworm-security \
                 (1:22.x-1~deb12u1)"
            );
        }
    }
    println!("ebpf-setup: installing {}", missing.join(" "));
    run(apt_get()
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}
