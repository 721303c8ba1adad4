//! Entering a network namespace: the one `setns` of the tests besides the harness's
//! (`k8s_harness::network::in_netns`, which [`within`] uses). A socket belongs to the
//! namespace of the thread that made it, so a test makes it on a thread inside ([`within`]),
//! or moves a helper process or a long-lived thread in for good ([`enter`], or
//! [`enter_fresh`] for a new, empty one); a command runs inside with [`sh_in`] (`ip` with
//! [`ip_in`]).
//!
//! A namespace is named by a path: an absolute one (`/proc/PID/ns/net`, `/run/netns/NAME`),
//! or a bare name, which means `/run/netns/NAME` (what `ip netns add NAME` makes).
//!
//! Include with `#[path = "support/netns.rs"] mod netns;` beside `process.rs`.

#![allow(dead_code)]

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// `ip` from iproute2 by its path: busybox's applet, first on PATH inside the VM, has no
/// `netns`.
pub const IP: &str = "/usr/sbin/ip";

/// The namespace file for `netns`: itself when absolute, else `/run/netns/<netns>`.
pub fn netns_path(netns: impl AsRef<Path>) -> PathBuf {
    let netns = netns.as_ref();
    if netns.is_absolute() {
        netns.to_path_buf()
    } else {
        Path::new("/run/netns").join(netns)
    }
}

/// Moves the calling thread into `netns` for the rest of its life (a helper process's only
/// thread, or a server thread whose sockets must be made inside).
pub fn enter(netns: impl AsRef<Path>) {
    let path = netns_path(netns);
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("opening the namespace {}: {e}", path.display()));
    // SAFETY: setns on a namespace file we hold open; it moves only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns({}): {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Moves the calling thread into a new, empty network namespace of its own, which goes away
/// with the thread (a test's links and sysctls vanish with it, also on failure).
pub fn enter_fresh() {
    // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a thread inside `netns` and returns what it returned; sockets it creates stay
/// in that namespace. A panic inside is raised again here (`k8s_harness::network::in_netns`,
/// the real-node harness's own, underneath).
pub fn within<T: Send>(netns: impl AsRef<Path>, f: impl FnOnce() -> T + Send) -> T {
    k8s_harness::network::in_netns(&netns_path(netns), f)
}

/// Runs `ip -n <name> args` (iproute2 inside `/run/netns/<name>`), panicking with its output
/// when it fails.
pub fn ip_in(name: &str, args: &[&str]) -> String {
    let mut full = vec!["-n", name];
    full.extend_from_slice(args);
    crate::process::sh(IP, &full)
}

/// Runs `program args` inside the namespace `/run/netns/<name>` (`ip netns exec`, which also
/// gives the command that namespace's `/sys`), panicking with its output when it fails.
pub fn sh_in(name: &str, program: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", name, program];
    full.extend_from_slice(args);
    crate::process::sh(IP, &full)
}
