//! What tests on the host share: they need root, and they set up their world with shell
//! commands. Include with `#[path = "support/host.rs"] mod host;`.

#![allow(dead_code)]

use std::process::Command;

/// Fails the test unless it runs as root; `needs` says what for.
pub fn require_root(needs: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root ({needs})");
}

/// Runs `command` with `sh -c`, failing the test with its output when it fails.
pub fn run(command: &str) {
    let output = Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .expect("spawn sh");
    assert!(
        output.status.success(),
        "`{command}` failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
