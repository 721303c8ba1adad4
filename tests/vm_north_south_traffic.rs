//! North-south with real traffic on the kernels below 6.6, where the tc programs attach as
//! netlink `clsact` filters rather than tcx links: the checks of
//! `support/north_south_world.rs` (which `host_north_south` runs on the host's tcx kernel),
//! inside the VM (`cargo xtask vm-test --test vm_north_south_traffic`); ignored on the host.
//! On a tcx kernel (6.12) they return at once, each printing a `SKIP:` line
//! (`support/harness.rs`): `host_north_south` runs them through tcx on the host, and the 6.12
//! boot has no CI time to spare.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/north_south_world.rs"]
#[macro_use]
mod world;

/// Whether this kernel attaches the tc programs as netlink filters (below 6.6); says why not
/// otherwise.
fn netlink_kernel(test: &str) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok());
    let version: (u32, u32) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let netlink = version < (6, 6);
    if !netlink {
        harness::skip(
            test,
            &format!(
                "kernel {}: tcx, covered by host_north_south",
                release.trim()
            ),
        );
    }
    netlink
}

/// One ignored test per check of the world, each a no-op on a tcx kernel.
macro_rules! on_netlink_kernels {
    ($($check:ident),* $(,)?) => {$(
        #[test]
        #[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
        fn $check() {
            if netlink_kernel(stringify!($check)) {
                world::$check();
            }
        }
    )*};
}

every_check!(on_netlink_kernels);
