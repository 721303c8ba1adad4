//! The host facilities the demo needs: the cgroup2 mount, `ip`, entering a namespace.

use super::*;

pub(super) fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // id parent major:minor root mount-point options [optional…] - fstype source super
            let (fields, rest) = line.split_once(" - ")?;
            (rest.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// `ip` with `args` split on whitespace (the demo's names have no spaces).
pub(super) fn ip(args: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .with_context(|| format!("running ip {args}"))?;
    ensure!(
        out.status.success(),
        "ip {args} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `f` on a thread that has entered the network namespace `netns` (`setns` moves only
/// the calling thread; sockets `f` opens stay in that namespace).
pub(super) fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file this thread holds open; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setns into the namespace");
        }
        f()
    })
    .join()
    .map_err(|_| anyhow!("the thread in {netns} panicked"))?
}
