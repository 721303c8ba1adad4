//! North-south with real traffic inside the VM (`cargo xtask vm-test --test
//! vm_north_south_traffic`; ignored on the host): the checks of `support/north_south_world.rs`
//! on both guest kernels, so both ways of attaching the tc programs are covered whatever
//! kernel the CI host runs: netlink `clsact` filters on 6.1, tcx links on 6.12
//! (`host_north_south` runs the same checks on the host's own kernel only).
//! [`the_attach_path_follows_the_kernel`] asserts which one each boot took.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/host.rs"]
mod host;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;
#[path = "support/traffic.rs"]
mod traffic;
#[path = "support/north_south_world.rs"]
#[macro_use]
mod world;

/// The running kernel's (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// One ignored test per check of the world.
macro_rules! in_the_vm {
    ($($check:ident),* $(,)?) => {$(
        #[test]
        #[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
        fn $check() {
            world::$check();
        }
    )*};
}

every_check!(in_the_vm);

/// tcx links from 6.6 on, netlink filters before: the boot covers the path it claims to.
#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn the_attach_path_follows_the_kernel() {
    let world = world::World::new();
    let (_dataplane, report) = world.attach(world.open());
    assert_eq!(
        report.netlink,
        kernel_version() < (6, 6),
        "kernel {:?} attached through {}",
        kernel_version(),
        if report.netlink {
            "netlink filters"
        } else {
            "tcx"
        }
    );
    if !report.netlink {
        assert_eq!(
            world.tcx_programs(),
            4,
            "one tcx link per device and direction"
        );
    }
}
