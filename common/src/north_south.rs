//! The map ABI of the north-south tc programs (`ebpf/src/north_south.rs`): traffic from outside
//! the node to NodePorts, externalIPs and load-balancer IPs. The Services and backends are the
//! socket path's own `TP_SERVICES` / `TP_BACKENDS`; these maps add the devices, the SNAT port
//! range, connection tracking and client-address affinity.
//!
//! Addresses and ports are kept as they sit in the packet (network byte order), like the rest
//! of the ABI: an IPv4 address in `addr[0]`, the other words zero.
//!
//! No GPL-only helper is used (the object's license is Apache-2.0; `bpf_fib_lookup` is
//! GPL-only): packets to a backend are routed by the stack after DNAT and SNATed at tc egress
//! when they leave through one of our devices; replies that must leave with a node address as
//! source are sent with `bpf_redirect_neigh`, which resolves the next hop itself.

/// Map names (at most 15 bytes).
pub mod maps {
    /// ifindex → [`crate::north_south::Device`]: the interfaces the tc programs run on, with
    /// the node address used as SNAT source when a packet leaves through them.
    pub const DEVICES: &str = "TP_NS_DEVICES";
    /// One [`crate::north_south::Config`] (array of 1).
    pub const CONFIG: &str = "TP_NS_CONFIG";
    /// [`crate::north_south::FlowKey`] → [`crate::north_south::FlowNat`] (LRU): connection
    /// tracking, one entry per direction of a translated flow.
    pub const CONNTRACK: &str = "TP_NS_CT";
    /// [`crate::north_south::AffinityKey`] → [`crate::AffinityValue`] (LRU):
    /// `sessionAffinity: ClientIP` for clients outside the node, keyed by their address.
    pub const AFFINITY: &str = "TP_NS_AFFINITY";
    /// One [`crate::north_south::Masquerade`] (array of 1): kube-proxy's masquerade rule for
    /// ClusterIPs reached from outside the node.
    pub const MASQUERADE: &str = "TP_NS_MASQ";
}

/// Map sizes.
pub mod limits {
    pub const DEVICES: u32 = 256;
    /// Two entries per flow; Cilium's SNAT map default is 524,288 too.
    pub const CONNTRACK: u32 = 524_288;
    pub const AFFINITY: u32 = 131_072;
}

/// [`FlowKey::direction`]: which leg of a translated flow a packet is on.
pub mod direction {
    /// Client → frontend, seen at tc ingress.
    pub const ORIGINAL: u8 = 0;
    /// Remote backend → node address and SNAT port, seen at tc ingress.
    pub const REPLY_SNAT: u8 = 1;
    /// Node-local backend → client, seen at tc egress.
    pub const REPLY_LOCAL: u8 = 2;
    /// Client → backend after DNAT, seen at tc egress of one of our devices: the stack routed
    /// it off the node, so the backend is remote and the packet is SNATed here.
    pub const EGRESS: u8 = 3;
}

/// [`FlowNat::flags`] bits.
pub mod nat {
    /// Rewrite the source to `FlowNat::src` / `sport`.
    pub const SRC: u32 = 1 << 0;
    /// Rewrite the destination to `FlowNat::dst` / `dport`.
    pub const DST: u32 = 1 << 1;
    /// Send the rewritten packet out of `FlowNat::ifindex` (`bpf_redirect_neigh`) instead of
    /// up the stack, which would drop a packet from a node address arriving from outside.
    pub const REDIRECT: u32 = 1 << 2;
    /// An [`super::direction::EGRESS`] entry whose SNAT port is not claimed yet; `src` /
    /// `sport` hold the client as it sent (before a port clash was resolved), `dst` / `dport`
    /// the frontend it asked for.
    pub const SNAT_PENDING: u32 = 1 << 3;
    /// A [`super::direction::ORIGINAL`] entry of a flow to a load-balancer IP: each of its
    /// packets is checked against the `loadBalancerSourceRanges` the Service has now
    /// (kube-proxy's filter drops every packet, not only the first, also after a change).
    pub const SOURCE_RANGES: u32 = 1 << 4;
}

/// A device the tc programs run on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Device {
    /// The IPv4 SNAT source on this device; 0 when it has none.
    pub addr4: u32,
    /// The IPv6 SNAT source; all zero when it has none.
    pub addr6: [u32; 4],
}

/// Settings of the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source ports, host byte order, inclusive; `min == 0` means "not configured" and
    /// the programs then use [`DEFAULT_SNAT_PORTS`].
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

/// Cluster CIDRs [`Masquerade`] holds at most (kube-proxy takes one per family).
pub const MAX_CLUSTER_CIDRS: usize = 4;

/// A CIDR, the address as it sits in a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub addr: [u32; 4],
    pub prefix_len: u8,
    /// `crate::FAMILY_V4` or `crate::FAMILY_V6`; 0 for an unused slot.
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Which ClusterIP flows from outside the node are SNATed when their backend is on another
/// node, as kube-proxy's `KUBE-MARK-MASQ` for ClusterIPs (`pkg/proxy/ipvs/proxier.go`): every
/// one under `--masquerade-all`, else those whose source is outside every `--cluster-cidr`
/// (none when no cluster CIDR is set). An all-zero entry (before the agent writes it) SNATs
/// none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masquerade {
    pub masquerade_all: u32,
    /// How many of `cluster_cidrs` are set.
    pub cidr_count: u32,
    pub cluster_cidrs: [Cidr; MAX_CLUSTER_CIDRS],
}

/// SNAT ports unless configured: above Linux's default ephemeral range (32768–60999), so a
/// translated flow never takes a 4-tuple the node's own sockets could use.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61_000, 65_535);

/// One direction of a flow as the packet shows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub family: u8,
    /// See [`direction`].
    pub direction: u8,
    pub _pad: u8,
}

/// How to rewrite a packet of a tracked flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowNat {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// See [`nat`].
    pub flags: u32,
    /// The Service entry's id (for read-back and diagnostics).
    pub service_id: u32,
    /// [`nat::REDIRECT`], [`nat::SNAT_PENDING`]: the device the client's packets arrive on,
    /// where its replies leave.
    pub ifindex: u32,
}

/// A client address of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, `Copy`, integers and arrays of them with explicit padding.
    unsafe impl aya::Pod for super::Device {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowNat {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Masquerade {}
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Device>() == 20);
    assert!(size_of::<Config>() == 8);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<FlowNat>() == 48);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<Cidr>() == 20);
    assert!(size_of::<Masquerade>() == 8 + 20 * MAX_CLUSTER_CIDRS);
};
