//! A QEMU harness for tests that need IPVS, dummy links and a kernel we control.
//!
//! The host kernel has neither IPVS nor dummy links and cannot load modules, so tests that need
//! them boot a Debian kernel in QEMU (software-emulated: `-accel tcg -cpu max`):
//!
//! - `vm-setup` installs QEMU (from bookworm-backports), busybox-static, ipvsadm and friends,
//!   then fetches and prepares the kernels.
//! - Kernels come from apt without installing them: `apt-get download`, unpack `boot/` and
//!   `lib/modules/`, and turn `vmlinuz` into the uncompressed `vmlinux` that QEMU boots via PVH.
//!   Cached under `target/vm/kernels/<kernel release>/`.
//! - One initramfs per kernel (`target/vm/initramfs-<kernel release>.cpio.gz`): busybox, ip,
//!   tc, ipvsadm with their libraries, and the modules the dataplane needs with their
//!   dependencies. Its `/init` mounts the 9p share (tag `host`) at `/host`, runs
//!   `/host/run.sh`, writes the status to `/host/exit-code`, prints
//!   `TOPOPROXY-VM-EXIT <code>` and powers QEMU off through `isa-debug-exit`.
//! - [`run_in_vm`] boots one kernel with one share under a wall-clock timeout;
//!   [`stage_binary`] copies a host binary and its libraries into a share so `run.sh` can run it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _, Result};

use crate::util::{output, run, tail};

mod boot;
mod initramfs;
mod kernel;
mod modules;
mod setup;
mod smoke;

pub use boot::*;
pub use initramfs::*;
pub use kernel::*;
use modules::*;
pub use setup::*;
pub use smoke::*;

/// The kernels the harness knows, by the label used on the command line.
pub const KERNELS: [&str; 2] = ["6.1", "6.12"];

/// The QEMU binary the harness boots.
pub const QEMU: &str = "qemu-system-x86_64";
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const EXIT_MARKER: &str = "TOPOPROXY-VM-EXIT";

/// Modules loaded at boot, in this order, each after its dependencies. `?` marks modules that
/// may be missing or built in (then skipped); the rest must exist as a module or be built in.
const BOOT_MODULES: &[&str] = &[
    "crc32c_generic?",
    "virtio_pci",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "nf_conntrack",
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_sh",
    "ip_vs_mh",
    "ip_vs_wlc",
    "dummy",
    "veth",
    "sch_ingress",
    "cls_bpf",
    // nftables: the agent's own table (masquerade, reject, fib) and `nft` in tests.
    "nfnetlink",
    "nf_tables",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_ct",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nf_reject_ipv4",
    "nf_reject_ipv6",
    "nft_reject",
    "nft_reject_inet",
    "nft_reject_ipv4?",
    "nft_reject_ipv6?",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_compat?",
    // Captures netlink traffic for byte-level tests (`ip link add nlmon0 type nlmon`).
    "nlmon?",
    // The guest's uplink (QEMU user networking) to the control plane on the host.
    "virtio_net",
    // A real node in the guest (tests/vm_k8s_real_node.rs): containerd's overlayfs
    // snapshotter and the CNI's bridge. The kernel asks for both by alias (`fs-overlay`,
    // `rtnl-link-bridge`), which the guest's modprobe cannot resolve: loaded at boot.
    "overlay",
    "bridge",
    // kube-proxy's IPVS mode beside the agent (tests/vm_k8s_parity.rs): iptables (nft
    // backend, through nft_compat) with the matches and targets its rules use, and ipset.
    "x_tables?",
    "xt_comment?",
    "xt_mark?",
    "xt_MASQUERADE?",
    "xt_addrtype?",
    "xt_conntrack?",
    "xt_nat?",
    "ip_set?",
    "ip_set_hash_ip?",
    "ip_set_hash_ipport?",
    "ip_set_hash_ipportip?",
    "ip_set_hash_ipportnet?",
    "ip_set_hash_net?",
    "ip_set_bitmap_port?",
    "xt_set?",
    "ipt_REJECT?",
    "ip6t_REJECT?",
    "xt_physdev?",
    "xt_ipvs?",
];

/// Shipped in the initramfs but not loaded at boot: the kernel asks `/sbin/modprobe` for them
/// on demand (a service added without `-s` wants `wlc`).
const ON_DEMAND_MODULES: &[&str] = &[
    // The real node's bridged pod-to-pod replies through IPVS (tests/vm_k8s_real_node.rs
    // loads it and removes it after).
    "br_netfilter?",
    "ip_vs_lc?",
    "ip_vs_wrr?",
    "ip_vs_lblc?",
    "ip_vs_lblcr?",
    "ip_vs_dh?",
    "ip_vs_sed?",
    "ip_vs_nq?",
    "ip_vs_fo?",
    "ip_vs_ovf?",
    "ip_vs_twos?",
];

/// Host tools copied into the initramfs, at the same path, with their libraries. `?` marks
/// tools that are skipped with a warning when the host lacks them (`vm-setup` installs them).
const GUEST_TOOLS: &[(&str, &str)] = &[
    ("ipvsadm", "/usr/sbin/ipvsadm"),
    ("ip", "/usr/sbin/ip"),
    ("tc", "/usr/sbin/tc"),
    ("nft?", "/usr/sbin/nft"),
    ("conntrack?", "/usr/sbin/conntrack"),
    // kube-proxy's IPVS mode runs these (tests/vm_k8s_parity.rs).
    ("ipset?", "/usr/sbin/ipset"),
    ("iptables?", "/usr/sbin/iptables"),
    // The real node's runtime (tests/vm_k8s_real_node.rs): `runc init` re-executes runc with
    // only runc's own variables, so its library (libseccomp) must be where the loader looks,
    // not under /host/lib with the staged binaries.
    ("runc?", "/usr/sbin/runc"),
];

/// Host files copied into the initramfs as they are: ipset (kube-proxy's `tcp:443` entries)
/// resolves protocol names through /etc/protocols.
const GUEST_FILES: &[&str] = &["/etc/protocols", "/etc/services"];

/// Names under which a multi-call tool from [`GUEST_TOOLS`] is linked in the guest:
/// `(tool path, link path)`. xtables-nft-multi picks its personality from `argv[0]`.
const GUEST_TOOL_LINKS: &[(&str, &str)] = &[
    ("iptables", "/usr/sbin/iptables-save"),
    ("iptables", "/usr/sbin/iptables-restore"),
    ("iptables", "/usr/sbin/ip6tables"),
    ("iptables", "/usr/sbin/ip6tables-save"),
    ("iptables", "/usr/sbin/ip6tables-restore"),
];

/// The iptables extensions (`libxt_*.so`), which iptables opens by name at run time, so `ldd`
/// does not list them.
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

const BUSYBOX: &str = "/bin/busybox";

/// What a VM run produced.
#[derive(Debug)]
pub struct VmOutcome {
    /// The exit status of `/host/run.sh`.
    pub exit_code: i32,
    /// Everything the VM printed on its serial console.
    pub console_log: String,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// `<target dir>/vm`: kernels, initramfs images and shares.
pub fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A host tool's path, or an error pointing at `vm-setup`.
pub fn require_tool(name: &str) -> Result<PathBuf> {
    find_in_path(name).ok_or_else(|| anyhow!("{name} not found: run `cargo xtask vm-setup`"))
}
