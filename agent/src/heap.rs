//! Handing freed heap memory back to the operating system.

/// Keeps glibc's malloc to one arena. By default glibc gives every thread that contends for
/// the heap its own arena (up to 8 per core), and each keeps its own free memory: for a
/// long-lived agent whose work hops between tokio's threads that is resident memory nobody
/// uses. Two arenas still spread the initial lists' garbage over two heaps; one arena measured
/// 5 MiB less resident and 8 MiB less peak at 10,000 Services, 10 MiB less at 50,000, with no
/// slower start (docs/benchmarks.md): the agent's allocations come from one sync loop and a
/// few watchers, so the lock is rarely contended. Must run before the runtime starts its
/// threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator tuning and takes no pointer from us.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns free heap pages to the kernel. After the initial sync, the decoded pages of the
/// initial lists are garbage (and those of a list the sync did not wait for, every Node's, once
/// it completes); glibc keeps freed memory in its arenas unless asked, so without this the
/// agent's resident size would stay at its start-up peak for its whole life.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas and takes no pointer from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
