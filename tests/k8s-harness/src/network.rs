//! The network real nodes sit on ([`crate::node::RealNode`]): one Ethernet segment, a bridge
//! in the host's network namespace, shared by the host (where the control plane listens), an
//! outside client in a namespace of its own, and each node's link. Every node has a network
//! namespace of its own (its containerd, kubelet, hostNetwork pods and CNI bridge are in it),
//! so several nodes fit on one host and nothing a node does to its network reaches the host's.
//!
//! ```text
//!  host netns: control plane on 192.168.240.254 ── bridge tprn-lan ─┬─ tprn-out ══ eth0 (outside netns, .250)
//!                                                                  ├─ tprn0   ══ eth0 (node netns, e.g. .1)
//!                                                                  └─ tprn1   ══ eth0 (node netns, e.g. .2)
//! ```
//!
//! In the VM guest the same segment sits on another /24 and every namespace on it routes by
//! default through the guest's root namespace ([`NodeNetwork::create_routed`]), beyond which
//! the control plane is.
//!
//! Everything is removed on drop, also when the test panics.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::process::Command;

/// The segment's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The host's address on the segment ([`NodeNetwork::create`]): the control plane listens here
/// for real nodes.
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 240, 254);
/// The outside client's address on that segment.
pub const OUTSIDE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 168, 240, 250);
const BRIDGE: &str = "tprn-lan";
/// The outside client's namespace, and the host end of its link.
const OUTSIDE: &str = "tprn-out";

/// Runs `command`, panicking with its output when it fails.
pub(crate) fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `command`, ignoring the outcome (tear-down of what may already be gone).
pub(crate) fn run_quietly(command: &mut Command) {
    let _ = command.output();
}

pub(crate) fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> <args>`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> String {
    run(Command::new("ip").args(["-n", netns]).args(args))
}

/// Runs `work` on a thread that entered the network namespace at `netns` (`/run/netns/<name>`):
/// sockets it opens live there (the node's loopback, say). Only that thread moves.
pub fn in_netns<T: Send>(netns: &Path, work: impl FnOnce() -> T + Send) -> T {
    let file =
        std::fs::File::open(netns).unwrap_or_else(|e| panic!("opening {}: {e}", netns.display()));
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: setns on a descriptor that outlives the call; it moves this thread only.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                entered,
                0,
                "setns into {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            );
            work()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The segment. Create it before the control plane (which listens on [`HOST_ADDRESS`]), drop
/// it after the nodes.
pub struct NodeNetwork {
    host_address: Ipv4Addr,
    outside_address: Ipv4Addr,
    /// Whether every namespace plugged in routes by default through the host's address.
    default_route: bool,
}

impl NodeNetwork {
    /// Creates the bridge with the host's address and the outside client (replacing leftovers
    /// of a killed run).
    pub fn create() -> Self {
        Self::create_with(HOST_ADDRESS, false)
    }

    /// The segment on `host_address`'s /24 (the outside client at `.250` of it), every
    /// namespace plugged in routing by default through the host's address: for a host that
    /// forwards what its nodes send elsewhere (the VM guest, whose control plane is beyond
    /// its uplink: `tests/vm_k8s_real_node.rs`).
    pub fn create_routed(host_address: Ipv4Addr) -> Self {
        Self::create_with(host_address, true)
    }

    fn create_with(host_address: Ipv4Addr, default_route: bool) -> Self {
        let [a, b, c, _] = host_address.octets();
        let network = Self {
            host_address,
            outside_address: Ipv4Addr::new(a, b, c, OUTSIDE_ADDRESS.octets()[3]),
            default_route,
        };
        network.remove();
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{host_address}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ]);
        ip(&["link", "set", BRIDGE, "up"]);
        ip(&["netns", "add", OUTSIDE]);
        network.plug(OUTSIDE, OUTSIDE, network.outside_address);
        network
    }

    /// Puts a link into `netns` (as `eth0`, holding `address`) whose other end, `host_link`,
    /// is on the bridge, and brings up the namespace's loopback; on a routed segment
    /// ([`NodeNetwork::create_routed`]) also the namespace's default route.
    pub fn plug(&self, host_link: &str, netns: &str, address: Ipv4Addr) {
        ip(&[
            "link", "add", host_link, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ]);
        ip(&["link", "set", host_link, "master", BRIDGE, "up"]);
        ip_in(
            netns,
            &[
                "addr",
                "add",
                &format!("{address}/{PREFIX_LEN}"),
                "dev",
                "eth0",
            ],
        );
        ip_in(netns, &["link", "set", "eth0", "up"]);
        ip_in(netns, &["link", "set", "lo", "up"]);
        if self.default_route {
            let via = self.host_address.to_string();
            ip_in(netns, &["route", "add", "default", "via", &via]);
        }
    }

    /// Routes `pod_cidr` from the host through `node` (a node's address on the segment): the
    /// control plane's host reaches that node's pods, and so answers them when they reach the
    /// API server through the `kubernetes` Service (the CNI leaves their source address as
    /// is), as a cluster's pod network routes between control plane and pods. The route goes
    /// with the bridge when the network is dropped.
    pub fn route_pods(&self, pod_cidr: &str, node: Ipv4Addr) {
        ip(&[
            "route",
            "add",
            pod_cidr,
            "via",
            &node.to_string(),
            "dev",
            BRIDGE,
        ]);
    }

    /// The host's address on the segment, where the control plane listens.
    pub fn host_address(&self) -> Ipv4Addr {
        self.host_address
    }

    /// The network namespace of a client outside every node, on the segment.
    pub fn outside_netns(&self) -> &'static str {
        OUTSIDE
    }

    /// The outside client's address.
    pub fn outside_address(&self) -> Ipv4Addr {
        self.outside_address
    }

    fn remove(&self) {
        run_quietly(Command::new("ip").args(["netns", "del", OUTSIDE]));
        run_quietly(Command::new("ip").args(["link", "del", OUTSIDE]));
        run_quietly(Command::new("ip").args(["link", "del", BRIDGE]));
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        self.remove();
    }
}
