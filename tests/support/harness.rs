//! What a test and the harness running it say to each other: whether this run is the gate or
//! the extended run (`cargo xtask test --extended` sets [`EXTENDED_ENV`], and `vm-test` forwards
//! it into the guests), and the lines by which a test says that it did not run its checks.
//! Include with `#[path = "support/harness.rs"] mod harness;` at the test target's root.

#![allow(dead_code)]

use std::io::Write as _;

/// Set to `1` by `cargo xtask test --extended`: the runs too long for CI (the whole parity
/// corpus on every kernel, every crash point, longer churn soaks).
pub const EXTENDED_ENV: &str = "TOPOPROXY_EXTENDED";

/// Whether this is the extended run rather than the gate.
pub fn extended() -> bool {
    std::env::var(EXTENDED_ENV).is_ok_and(|v| v == "1")
}

/// Prints `SKIP: <test>: <reason>`: `test` returns without running its checks. The VM harness
/// reports a target whose tests all print it as SKIP, not PASS. Written to the process's
/// standard output directly: libtest captures only `print!`, and drops what a passing test
/// printed.
pub fn skip(test: &str, reason: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "SKIP: {test}: {reason}");
    let _ = out.flush();
}

/// The agent image archive the real-node tests install (`TOPOPROXY_AGENT_IMAGE`, set by
/// `cargo xtask test`); without it, prints SKIP for `test` and returns `None`.
pub fn agent_image(test: &str) -> Option<std::path::PathBuf> {
    let image = std::env::var_os("TOPOPROXY_AGENT_IMAGE").map(std::path::PathBuf::from);
    if image.is_none() {
        skip(
            test,
            "TOPOPROXY_AGENT_IMAGE (the archive of `cargo xtask image`) is not set; `cargo xtask test` sets it",
        );
    }
    image
}

/// Prints `HELPER: <name>`: `name` is the entry point of a helper process that another test
/// starts, run here directly (every ignored test runs under `--ignored`), so it did nothing.
/// The VM harness does not count it as a test.
pub fn helper(name: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "HELPER: {name}");
    let _ = out.flush();
}
