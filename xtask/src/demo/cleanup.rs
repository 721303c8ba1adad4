//! Leftovers of an earlier demo run: found and removed before a new one starts.

use super::*;

pub(super) fn leftovers_exist(root: &Path) -> bool {
    root.exists()
        || Path::new(PIN_DIR).exists()
        || cgroup2_mount().is_ok_and(|mount| mount.join(CGROUP_NAME).exists())
        || demo_netns().is_ok_and(|names| !names.is_empty())
}

/// Removes whatever a demo left: processes recorded in `ROOT/pids` (if they are still the
/// demo's), the pins, namespaces, cgroup and the temporary directory; then checks.
pub(super) fn remove_leftovers(root: &Path, topoproxy: Option<&Path>) -> Result<()> {
    let pids = std::fs::read_to_string(root.join("pids")).unwrap_or_default();
    for pid in pids
        .lines()
        .filter_map(|line| line.trim().parse::<libc::pid_t>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        // Only a process that is still one the demo started (pids get reused).
        if cmdline.contains(PIN_DIR) || cmdline.contains("demo\0--role\0serve") {
            // SAFETY: kill on a pid just checked to be one of the demo's processes.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("   stopped pid {pid}");
        }
    }
    let mut problems = Vec::new();
    if Path::new(PIN_DIR).exists() {
        let topoproxy = match topoproxy {
            Some(path) => path.to_owned(),
            None => build_topoproxy()?.topoproxy,
        };
        let out = Command::new(&topoproxy)
            .args(["cleanup", "--proxy-mode", "ebpf", "--bpf-pin-dir", PIN_DIR])
            .output()
            .context("running topoproxy cleanup")?;
        println!(
            "   topoproxy cleanup --proxy-mode ebpf --bpf-pin-dir {PIN_DIR}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        if !out.status.success() {
            problems.push(format!(
                "topoproxy cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let names = demo_netns()?;
    for name in &names {
        if let Err(error) = ip(&format!("netns del {name}")) {
            problems.push(format!("{error:#}"));
        }
    }
    if !names.is_empty() {
        println!(
            "   removed {} network namespaces ({NETNS_PREFIX}*) and their veths",
            names.len()
        );
    }
    let cgroup = cgroup2_mount()?.join(CGROUP_NAME);
    if cgroup.exists() {
        // Its last process may still be exiting.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&cgroup) {
                Ok(()) => break,
                Err(error) if Instant::now() > deadline => {
                    problems.push(format!("removing {}: {error}", cgroup.display()));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        println!("   removed the cgroup {}", cgroup.display());
    }
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
        println!("   removed {}", root.display());
    }
    // Check, as an operator would: ip netns list, ls /sys/fs/bpf, the cgroup.
    let left = demo_netns()?;
    if !left.is_empty() {
        problems.push(format!("namespaces left: {}", left.join(" ")));
    }
    if Path::new(PIN_DIR).exists() {
        problems.push(format!("{PIN_DIR} is still there"));
    }
    if cgroup.exists() {
        problems.push(format!("{} is still there", cgroup.display()));
    }
    ensure!(
        problems.is_empty(),
        "clean-up incomplete: {}",
        problems.join("; ")
    );
    println!(
        "   nothing of the demo remains (ip netns list, /sys/fs/bpf, the cgroup, {})",
        root.display()
    );
    Ok(())
}

pub(super) fn demo_netns() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running ip netns list")?;
    ensure!(out.status.success(), "ip netns list failed: {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(NETNS_PREFIX))
        .map(str::to_owned)
        .collect())
}

// ---- the client ----
