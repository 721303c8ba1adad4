//! Handing freed heap memory back to the operating system.

/// Returns free heap pages to the kernel. After the initial sync, the decoded pages of the
/// initial lists are garbage; glibc keeps freed memory in its arenas unless asked, so without
/// this the agent's resident size would stay at its start-up peak for its whole life.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas and takes no pointer from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
