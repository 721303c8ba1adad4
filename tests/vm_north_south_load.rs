//! The north-south tc programs on the kernels we support: both pass the verifier and attach
//! to a device (netlink `clsact` filters on 6.1, pinned tcx links on 6.6 and later), a second
//! attach (an agent restart) replaces them in place instead of adding more, and cleanup
//! leaves nothing attached or pinned.
//!
//! Runs inside the VM (`cargo xtask vm-test --test vm_north_south_load`), where the test owns
//! the whole machine; ignored on the host. Traffic through the programs is shown on the host
//! kernel by `host_north_south`.

use std::path::PathBuf;
use std::process::Command;

use aya::programs::SchedClassifier;
use topoproxy::dataplane::ebpf::north_south::{self, Interfaces, NorthSouthSettings};
use topoproxy::dataplane::ebpf::{cleanup, EbpfDataplane, EbpfSettings};

/// `ip` from iproute2; busybox's applet would shadow it on PATH inside the VM.
const IP: &str = "/usr/sbin/ip";
const DEVICE: &str = "tpns0";

fn ip(args: &[&str]) {
    let status = Command::new(IP).args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// Our programs attached to `DEVICE` through tcx, both directions.
fn tcx_programs() -> usize {
    north_south::PROGRAMS
        .iter()
        .filter_map(|(_, attach_type)| SchedClassifier::query_tcx(DEVICE, *attach_type).ok())
        .map(|(_, programs)| programs.len())
        .sum()
}

#[test]
#[ignore = "needs a VM: cargo xtask vm-test --test vm_north_south_load"]
fn tc_programs_load_attach_replace_and_clean_up() {
    let settings = EbpfSettings {
        pin_dir: PathBuf::from("/sys/fs/bpf/topoproxy-vm-ns-test"),
        cgroup_path: None,
    };
    let _ = cleanup(&settings);
    let _ = Command::new(IP).args(["link", "del", DEVICE]).status();
    ip(&[
        "link", "add", DEVICE, "type", "veth", "peer", "name", "tpns1",
    ]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", DEVICE]);
    ip(&["link", "set", DEVICE, "up"]);
    let north_south = NorthSouthSettings {
        interfaces: Interfaces::Named(vec![DEVICE.to_owned()]),
        ..NorthSouthSettings::default()
    };

    let mut dataplane = EbpfDataplane::open(settings.clone()).expect("load the socket programs");
    let first = dataplane
        .attach_north_south(north_south.clone())
        .expect("the verifier accepts the tc programs and they attach")
        .expect("fresh maps: no switch pending");
    assert_eq!((first.attached, first.replaced), (2, 0), "{first:?}");
    assert_eq!(first.interfaces, vec![DEVICE.to_owned()]);
    drop(dataplane);

    let mut dataplane = EbpfDataplane::open(settings.clone()).expect("reopen");
    let again = dataplane
        .attach_north_south(north_south)
        .expect("attach again")
        .expect("no switch pending");
    assert_eq!((again.attached, again.replaced), (0, 2), "{again:?}");
    assert_eq!(again.netlink, first.netlink);
    drop(dataplane);

    if first.netlink {
        // One filter per direction, not two: the restart replaced ours in place.
        assert_eq!(north_south::detach_netlink_filters(), 2);
        assert_eq!(north_south::detach_netlink_filters(), 0);
    } else {
        assert_eq!(tcx_programs(), 2, "one tcx program per direction");
    }
    let report = cleanup(&settings).expect("cleanup");
    assert!(
        !settings.pin_dir.exists(),
        "nothing left pinned: {report:?}"
    );
    if !first.netlink {
        assert_eq!(tcx_programs(), 0, "nothing left attached");
    }
    ip(&["link", "del", DEVICE]);
    println!(
        "tc programs: verifier ok, attached via {}, replaced in place, cleaned up",
        if first.netlink {
            "netlink clsact"
        } else {
            "tcx"
        }
    );
}
