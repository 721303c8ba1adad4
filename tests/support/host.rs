//! What tests on the host share: they need root, read the `tracing` log of the dataplane they
//! drive in-process, and look at what it pinned. Include with
//! `#[path = "support/host.rs"] mod host;`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// Fails the test unless it runs as root; `needs` says what for.
pub fn require_root(needs: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root ({needs})");
}

/// Moves this process into `cgroup` (a test's child cgroup under the cgroup2 mount, where the
/// eBPF socket programs attach): a helper process's first step.
pub fn join_cgroup(cgroup: &std::path::Path) {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|e| panic!("joining the cgroup ({}): {e}", procs.display()));
}

/// Everything the `tracing` subscriber of [`capture_logs`] wrote.
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct CapturedLog;

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the `tracing` events of this test process to the buffer the functions below read.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(|| CapturedLog)
        .with_ansi(false)
        .try_init();
}

/// Captured log lines with `needle` in them.
pub fn log_lines_with(needle: &str) -> Vec<String> {
    let logs = LOGS.lock().expect("log buffer");
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Waits until `count` log lines contain every one of `needles`.
pub fn wait_for_log_lines(needles: &[&str], count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = log_lines_with(needles[0])
            .into_iter()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .collect();
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?}: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file and directory under `dir` (pinned BPF objects, say); empty when it is missing.
pub fn paths_under(dir: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, into: &mut std::collections::BTreeSet<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            into.insert(path.clone());
            if path.is_dir() {
                walk(&path, into);
            }
        }
    }
    let mut paths = std::collections::BTreeSet::new();
    walk(dir, &mut paths);
    paths
}
