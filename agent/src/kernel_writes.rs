//! Kernel writes: counted (the `topoproxy_dataplane_kernel_writes_total` metric) and, for
//! tests, a crash point: the agent kills itself with SIGKILL right after its k-th write, so a
//! test can stop an apply between any two of its writes and check what a restart makes of the
//! half-applied state (docs/reliability.md, "Crash points").
//!
//! A kernel write is one request that changes what the kernel holds and that the agent has
//! seen succeed: an IPVS command, an nftables transaction, a VIP bound or unbound, an eBPF map
//! element put or deleted. While armed, IPVS commands go one per batch so that "after the
//! k-th" means one command, not one batch.
//!
//! Armed only by `TOPOPROXY_CRASH_AFTER_KERNEL_WRITES` (read by the binary at start). The
//! variable can do nothing but make the agent kill itself, which anyone able to set it could
//! do anyway.

use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms the crash point: a number of kernel writes, at least 1.
pub const ENV: &str = "TOPOPROXY_CRASH_AFTER_KERNEL_WRITES";

/// Writes left before the kill; 0 while disarmed.
static WRITES_LEFT: AtomicU64 = AtomicU64::new(0);

/// Kernel writes since the process started.
static WRITES_DONE: AtomicU64 = AtomicU64::new(0);

/// Kills the process right after its `writes`-th kernel write from now; 0 disarms.
pub fn arm_crash(writes: u64) {
    WRITES_LEFT.store(writes, Ordering::SeqCst);
}

/// Whether a crash point is set (the IPVS client then sends one command per batch).
pub fn crash_armed() -> bool {
    WRITES_LEFT.load(Ordering::SeqCst) != 0
}

/// Kernel writes since the process started.
pub fn total() -> u64 {
    WRITES_DONE.load(Ordering::Relaxed)
}

/// Counts one successful kernel write (`what` names it in the last log line) and kills the
/// process with SIGKILL when it was the one the crash point waits for.
pub fn done(what: &str) {
    WRITES_DONE.fetch_add(1, Ordering::Relaxed);
    let taken = WRITES_LEFT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
        left.checked_sub(1)
    });
    if taken == Ok(1) {
        eprintln!("crash point: SIGKILL after this kernel write: {what}");
        // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL cannot be caught, so
        // nothing after it runs, exactly as when an operator or the OOM killer sends it.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Reads the crash point from the environment: `None` when unset, an error text when the
/// value is not a positive number.
pub fn crash_point_from_env() -> Result<Option<u64>, String> {
    let Some(value) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    match text.trim().parse::<u64>() {
        Ok(writes) if writes > 0 => Ok(Some(writes)),
        _ => Err(format!(
            "{ENV}={text}: expected a number of kernel writes, at least 1"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disarmed_writes_are_counted_and_do_not_kill() {
        arm_crash(0);
        let before = total();
        for _ in 0..3 {
            done("test write");
        }
        assert!(total() >= before + 3);
        assert!(!crash_armed());
    }
}
