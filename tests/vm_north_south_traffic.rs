//! North-south with real traffic on the kernels below 6.6, where the tc programs attach as
//! netlink `clsact` filters rather than tcx links: the checks of
//! `support/north_south_world.rs` (which `host_north_south` runs on the host's tcx kernel),
//! inside the VM (`cargo xtask vm-test --test vm_north_south_traffic`); ignored on the host.
//! On a tcx kernel (6.12) they return at once: `host_north_south` runs them through tcx on
//! the host, and the 6.12 boot has no CI time to spare.

#[path = "support/north_south_world.rs"]
mod world;

/// Whether this kernel attaches the tc programs as netlink filters (below 6.6).
fn netlink_kernel() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok());
    let version: (u32, u32) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let netlink = version < (6, 6);
    if !netlink {
        eprintln!(
            "kernel {}: tcx, covered by host_north_south",
            release.trim()
        );
    }
    netlink
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn node_port_reaches_local_and_remote_backends_with_the_right_sources() {
    if netlink_kernel() {
        world::node_port_reaches_local_and_remote_backends_with_the_right_sources();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn external_ip_reaches_a_remote_backend() {
    if netlink_kernel() {
        world::external_ip_reaches_a_remote_backend();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn udp_node_port_and_external_ip_answer_from_the_frontend() {
    if netlink_kernel() {
        world::udp_node_port_and_external_ip_answer_from_the_frontend();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn local_policy_keeps_the_client_address_and_drops_without_a_local_endpoint() {
    if netlink_kernel() {
        world::local_policy_keeps_the_client_address_and_drops_without_a_local_endpoint();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn non_service_traffic_to_the_node_is_untouched() {
    if netlink_kernel() {
        world::non_service_traffic_to_the_node_is_untouched();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn ipv6_node_port_external_ip_and_local_policy() {
    if netlink_kernel() {
        world::ipv6_node_port_external_ip_and_local_policy();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn client_ip_affinity_holds_across_connections() {
    if netlink_kernel() {
        world::client_ip_affinity_holds_across_connections();
    }
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn a_restart_swaps_programs_in_place_and_cleanup_leaves_nothing() {
    if netlink_kernel() {
        world::a_restart_swaps_programs_in_place_and_cleanup_leaves_nothing();
    }
}

#[test]
#[ignore = "helper process for the kill -9 test, started by it"]
fn dataplane_owner_process() {
    world::dataplane_owner_main();
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_traffic"]
fn killing_the_owner_with_sigkill_and_starting_another_loses_no_request() {
    if netlink_kernel() {
        world::killing_the_owner_with_sigkill_and_starting_another_loses_no_request();
    }
}
