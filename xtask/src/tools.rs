//! Where the Kubernetes tools the tasks run (helm, kustomize) live: installed by
//! `cargo xtask k8s-setup` into one directory, never looked up on PATH, so that every task and
//! CI uses the same pinned versions.

use std::path::PathBuf;

use anyhow::{ensure, Result};

/// Overrides where `cargo xtask k8s-setup` installs them ([`crate::k8s::tools_bin_dir`]).
pub const TOOLS_BIN_ENV: &str = "TOPOPROXY_TOOLS_BIN";

/// The directory holding the pinned tools.
pub fn tools_bin() -> PathBuf {
    std::env::var_os(TOOLS_BIN_ENV)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(crate::k8s::tools_bin_dir)
}

/// The path of the pinned tool `name`, or an error saying how to install it.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = tools_bin().join(name);
    ensure!(
        path.is_file(),
        "{name} not found at {}: run `cargo xtask k8s-setup` (or set {TOOLS_BIN_ENV} to the \
         directory holding it)",
        path.display()
    );
    Ok(path)
}
