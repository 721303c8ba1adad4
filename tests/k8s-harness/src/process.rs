//! Long-running processes of a test (etcd, apiservers, the controller manager, haproxy, the
//! agent): output to a log file, killed with SIGKILL on drop, also when the test panics.
//!
//! Each child gets `PR_SET_PDEATHSIG(SIGKILL)`, so a test binary that is itself killed leaves
//! no daemon behind. The signal follows the *thread* that spawned the child: spawn from the
//! test's own thread (which lives as long as the test), never from a short-lived worker.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process owned by a test.
pub struct Daemon {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

/// What to run in the child before `exec`, besides the death signal.
#[derive(Clone, Debug, Default)]
pub struct Isolation {
    /// A UTS namespace of its own with this hostname (two apiservers on one host otherwise
    /// share one identity lease, named from the hostname).
    pub hostname: Option<String>,
    /// A folder holding `token`, `ca.crt` and `namespace`, bind-mounted where a Pod's
    /// service-account volume is (`/var/run/secrets/kubernetes.io/serviceaccount`), in a
    /// private mount namespace with a tmpfs on `/run`, so the host's tree is untouched.
    pub service_account: Option<PathBuf>,
    /// A network namespace to enter (`/run/netns/<name>`), and only that: `ip netns exec`
    /// would also remount `/sys`, hiding the cgroup mounts a kubelet needs.
    pub netns: Option<PathBuf>,
}

/// Where kubelet mounts a Pod's service-account token (`/var/run` is `/run` on Debian).
const SERVICE_ACCOUNT_MOUNT: &str = "/run/secrets/kubernetes.io/serviceaccount";

fn c_string(text: &str) -> std::ffi::CString {
    std::ffi::CString::new(text).expect("a path without NUL")
}

/// Mounts `source` at [`SERVICE_ACCOUNT_MOUNT`] in a new private mount namespace. Runs
/// between fork and exec: only syscalls on buffers allocated before the fork.
fn mount_service_account(paths: &[std::ffi::CString; 5]) -> std::io::Result<()> {
    let [source, run, secrets, kubernetes_io, mount_point] = paths;
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY: plain syscalls on NUL-terminated buffers that outlive the calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return fail();
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return fail();
        }
        let tmpfs = c"tmpfs";
        if libc::mount(
            tmpfs.as_ptr(),
            run.as_ptr(),
            tmpfs.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            return fail();
        }
        for dir in [secrets, kubernetes_io, mount_point] {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 {
                return fail();
            }
        }
        if libc::mount(
            source.as_ptr(),
            mount_point.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return fail();
        }
    }
    Ok(())
}

impl Daemon {
    /// Starts `command`, its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path, isolation: &Isolation) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let err = out.try_clone().expect("duplicating the log file");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let hostname = isolation.hostname.clone();
        let service_account = isolation.service_account.as_ref().map(|dir| {
            [
                c_string(&dir.to_string_lossy()),
                c_string("/run"),
                c_string("/run/secrets"),
                c_string("/run/secrets/kubernetes.io"),
                c_string(SERVICE_ACCOUNT_MOUNT),
            ]
        });
        // Opened before the fork; the child enters it and `exec` closes it (O_CLOEXEC).
        let netns = isolation.netns.as_ref().map(|path| {
            File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        });
        let netns_fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: only async-signal-safe calls (prctl, setns, unshare, sethostname, mount,
        // mkdir) between fork and exec, on buffers and descriptors made before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(host) = &hostname {
                    if libc::unshare(libc::CLONE_NEWUTS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(paths) = &service_account {
                    mount_service_account(paths)?;
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({:?}): {e}", command.get_program()));
        drop(netns);
        Self {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process has exited (a zombie counts; it is reaped on drop).
    pub fn exited(&self) -> bool {
        let Some(pid) = self.pid() else {
            return true;
        };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` for its standard output; an error names `what` with the arguments and the
/// exit status, and carries both outputs (a tool may explain itself on either). The one
/// command runner of the harness and of topoproxy's tests (`tests/support/process.rs`).
pub fn stdout_of(command: &mut std::process::Command, what: &str) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("running {what}: {e}"))?;
    checked_stdout(command, what, out)
}

/// `out`, the output of `command` (run by the caller, with input on its stdin, say), as
/// [`stdout_of`] judges it.
pub fn checked_stdout(
    command: &std::process::Command,
    what: &str,
    out: std::process::Output,
) -> Result<String, String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
    Err(format!(
        "{what} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
