//! The node's network namespaces, found without seeing the host's processes.
//!
//! A pod's sockets live in the pod's network namespace. The agent runs with `hostNetwork` but
//! (as shipped) without `hostPID`, so the threads it sees in `/proc` are its own container's:
//! they lead to the host's namespace only. Container runtimes pin every pod sandbox's
//! namespace as a file under `/run/netns` (containerd's `cni-<uuid>`, CRI-O, `ip netns`), which
//! the DaemonSet mounts from the host; when the agent does see the host's processes (run on
//! the host, or with `hostPID`), `/proc/<pid>/task/<tid>/ns/net` adds namespaces nothing pinned.
//!
//! Each namespace is keyed by its nsfs (device, inode), so one reached through a pin and
//! through a process (or through `/run` and `/var/run`) is visited once, and opened here so
//! that it stays alive while the agent works in it even if its pod goes meanwhile.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::SockDestroyError;

/// Where runtimes pin network namespaces. `/var/run` is a link to `/run` on most hosts and
/// images; the (device, inode) key keeps one of each namespace.
pub(super) const PIN_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `NS_GET_NSTYPE` (`_IO(0xb7, 0x3)`, linux/nsfs.h, 4.11+): which kind of namespace a file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// An open network namespace and the path it was first found at (for the log).
#[derive(Debug)]
pub(super) struct Netns {
    pub found_at: PathBuf,
    pub file: File,
}

/// (device, inode) of a namespace's nsfs file.
pub(super) type NetnsKey = (u64, u64);

/// The network namespaces under `pin_dirs` and of the threads in `proc` (a procfs mount),
/// the agent's own (`proc/self/ns/net`) among them. A missing directory, a pin whose
/// namespace is gone (a plain file left behind), anything that is not a network namespace, and
/// a process that exits while we look are skipped; only the agent's own namespace must open.
pub(super) fn network_namespaces(
    pin_dirs: &[&Path],
    proc: &Path,
) -> Result<BTreeMap<NetnsKey, Netns>, SockDestroyError> {
    let own_path = proc.join("self/ns/net");
    let own_error = |source| SockDestroyError::Netns {
        path: own_path.display().to_string(),
        source,
    };
    let own = File::open(&own_path).map_err(own_error)?;
    let own_key = key_of(&own).map_err(own_error)?;
    let mut namespaces = BTreeMap::new();
    namespaces.insert(
        own_key,
        Netns {
            found_at: own_path.clone(),
            file: own,
        },
    );
    for dir in pin_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Err(error) = add(&mut namespaces, path.clone()) {
                // Its pod went away between the listing and the open.
                tracing::debug!(
                    netns = %path.display(),
                    %error,
                    "skipped a network namespace pin"
                );
            }
        }
    }
    if let Ok(processes) = std::fs::read_dir(proc) {
        for process in processes.flatten() {
            if !is_number(&process.file_name()) {
                continue;
            }
            // A process or thread may exit while we look: skip it.
            let Ok(threads) = std::fs::read_dir(process.path().join("task")) else {
                continue;
            };
            for thread in threads.flatten() {
                // A thread that exited meanwhile: nothing to say.
                let _ = add(&mut namespaces, thread.path().join("ns/net"));
            }
        }
    }
    Ok(namespaces)
}

/// Adds the network namespace at `path`, if it is one and is not there yet; fails only when
/// it cannot be opened or read.
fn add(namespaces: &mut BTreeMap<NetnsKey, Netns>, path: PathBuf) -> std::io::Result<()> {
    let file = File::open(&path)?;
    if !is_network_namespace(&file) {
        return Ok(());
    }
    let key = key_of(&file)?;
    namespaces.entry(key).or_insert(Netns {
        found_at: path,
        file,
    });
    Ok(())
}

fn key_of(file: &File) -> std::io::Result<NetnsKey> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// A regular file (a pin whose mount is gone, or one this container does not see mounted)
/// answers `ENOTTY`; another kind of namespace answers its own type.
fn is_network_namespace(file: &File) -> bool {
    // SAFETY: an ioctl without argument on a descriptor we hold open.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

fn is_number(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()))
}

/// Makes the calling thread join `netns` (`setns` affects the calling thread only: call it
/// only on a thread of one's own, never on a runtime's worker).
pub(super) fn enter(netns: &Netns) -> Result<(), SockDestroyError> {
    // SAFETY: setns on a namespace file we hold open; this thread only.
    let rc = unsafe { libc::setns(netns.file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(SockDestroyError::Netns {
            path: netns.found_at.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::test_dir::Scratch;

    fn own_key() -> NetnsKey {
        key_of(&File::open("/proc/self/ns/net").expect("own netns")).expect("stat")
    }

    #[test]
    fn pins_and_threads_of_one_namespace_count_once_and_what_is_no_network_namespace_is_skipped() {
        let pins = Scratch::new("netns");
        let proc = Scratch::new("netns");
        let own = Path::new("/proc/self/ns/net");
        proc.link("self/ns/net", own);
        // Threads of the agent's namespace, and a name that is no process.
        proc.link("41/task/41/ns/net", own);
        proc.link("41/task/42/ns/net", own);
        proc.link("fd/task/1/ns/net", Path::new("/proc/self/ns/uts"));
        // A pin of the same namespace, a pin left behind as a plain file (its namespace is
        // gone), a namespace of another kind, and a directory.
        pins.link("cni-same", own);
        std::fs::write(pins.path().join("cni-stale"), b"").expect("stale pin");
        pins.link("uts", Path::new("/proc/self/ns/uts"));
        std::fs::create_dir(pins.path().join("subdir")).expect("subdir");
        let missing = pins.path().join("missing");

        let found =
            network_namespaces(&[pins.path(), missing.as_path()], proc.path()).expect("listed");
        let keys: Vec<NetnsKey> = found.keys().copied().collect();
        assert_eq!(keys, vec![own_key()]);
        assert_eq!(found[&own_key()].found_at, proc.path().join("self/ns/net"));
    }

    #[test]
    fn a_namespace_seen_only_through_a_pin_or_only_through_a_thread_is_listed_once() {
        // Two namespaces of our own making, each held by a thread that made it; one is pinned
        // (and seen through its thread too), the other only seen through its thread.
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        let (unpinned_tx, unpinned_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
        let mut threads = Vec::new();
        for tx in [pinned_tx, unpinned_tx] {
            let done_rx = done_rx.clone();
            threads.push(std::thread::spawn(move || {
                // SAFETY: unshare of this thread's network namespace only.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                if rc != 0 {
                    let _ = tx.send(Err(std::io::Error::last_os_error()));
                    return;
                }
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let _ = tx.send(Ok(tid));
                // Alive (and in its namespace) until the listing is done.
                let _ = done_rx.lock().map(|rx| rx.recv());
            }));
        }
        let pinned = pinned_rx.recv().expect("thread started");
        let unpinned = unpinned_rx.recv().expect("thread started");
        let (pinned, unpinned) = match (pinned, unpinned) {
            (Ok(pinned), Ok(unpinned)) => (pinned, unpinned),
            (Err(error), _) | (_, Err(error)) => {
                drop(done_tx);
                // The format of tests/support/harness.rs.
                println!(
                    "SKIP: a_namespace_seen_only_through_a_pin_or_only_through_a_thread_is_listed_once: \
                     unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN: {error}"
                );
                return;
            }
        };
        let thread_netns = |tid: libc::pid_t| {
            PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()))
        };
        let pins = Scratch::new("netns");
        pins.link("cni-pinned", &thread_netns(pinned));
        let listed = network_namespaces(&[pins.path()], Path::new("/proc"));
        drop(done_tx);
        for thread in threads {
            let _ = thread.join();
        }
        let listed = listed.expect("listed");

        // The threads are gone: read the keys from what the listing holds open.
        let found: Vec<(&PathBuf, NetnsKey)> = listed
            .values()
            .map(|netns| (&netns.found_at, key_of(&netns.file).expect("stat")))
            .collect();
        assert!(listed.contains_key(&own_key()));
        let pinned_found: Vec<_> = found
            .iter()
            .filter(|(path, _)| *path == &pins.path().join("cni-pinned"))
            .collect();
        assert_eq!(pinned_found.len(), 1, "the pin is listed: {found:?}");
        let by_thread: Vec<_> = found
            .iter()
            .filter(|(path, _)| *path == &thread_netns(unpinned))
            .collect();
        assert_eq!(
            by_thread.len(),
            1,
            "the unpinned thread's namespace: {found:?}"
        );
        assert!(
            !found.iter().any(|(path, _)| *path == &thread_netns(pinned)),
            "the pinned namespace is listed again through its thread: {found:?}"
        );
        assert_ne!(pinned_found[0].1, by_thread[0].1);
    }
}
