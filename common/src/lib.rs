//! The map ABI shared by topoproxy's eBPF programs (`ebpf/`) and the agent: names, sizes and
//! `#[repr(C)]` keys and values of every map. Both sides compile this one definition, so they
//! cannot disagree about a layout.
//!
//! Addresses are kept exactly as the kernel hands them to `sock_addr` programs: an IPv4
//! address is one `u32` in network byte order (`addr[0]`, the rest zero), an IPv6 address four
//! such words; ports are `u16` in network byte order. The programs then compare and copy
//! without converting.
//!
//! # Slot layout
//!
//! A service's backends live in the `BACKENDS` map under `(service id, slot)`, where
//! `slot = tier << TIER_SHIFT | index` and `index < Service::tier_counts[tier]`. Each tier is a
//! dense range, so the datapath picks `index = random % count` in the nearest tier whose count
//! is not zero, and the agent adds, removes or moves one backend with O(1) map writes.
//!
//! # Maglev tables
//!
//! A service flagged [`flags::MAGLEV`] (IPVS scheduler `sh` or `mh`) also has, per non-empty
//! tier of at most [`MAGLEV_SIZE`] backends, a [`MaglevTable`] in `TP_MAGLEV`: the datapath
//! takes `index = table[client_hash % MAGLEV_SIZE]` instead of a random one, so a client keeps
//! its backend while other backends come and go.

#![no_std]

pub mod north_south;

/// Tiers a service can hold (node, zone, region, cluster, other clusters, …).
pub const MAX_TIERS: usize = 8;
/// `slot >> TIER_SHIFT` is the tier; the low bits are the index within it.
pub const TIER_SHIFT: u32 = 16;
/// Backends one tier can hold (its count is a `u16`).
pub const MAX_TIER_BACKENDS: u32 = u16::MAX as u32;
/// Bytes of a service's scheduler name kept for read-back.
pub const SCHEDULER_LEN: usize = 16;
/// The pin directory's subdirectory holding the maps, named after the version of this map
/// ABI: an agent never opens maps of another layout. A new version starts with fresh maps and
/// swaps the programs over once it has filled them. Bump the suffix whenever a key or value
/// below changes size or meaning (version 1 pinned its maps in the pin directory itself).
pub const MAPS_DIR: &str = "maps_v4";
/// Entries of a [`MaglevTable`]: a prime (Maglev's permutation fill needs one), large enough
/// that each of up to a hundred backends holds 10 or 11 entries (shares within 10% of each
/// other; within 1% at ten backends), small enough that a table is 2 KiB, 20 MiB of kernel
/// memory for 10,000 such Services. A tier with more backends has no table (random choice).
pub const MAGLEV_SIZE: usize = 1021;
/// The whole of a tier share: [`Service::tier_shares`] are parts per million.
pub const SHARE_WHOLE: u32 = 1_000_000;

/// `AF_INET`, as in `bpf_sock_addr::user_family`.
pub const FAMILY_V4: u8 = 2;
/// `AF_INET6`.
pub const FAMILY_V6: u8 = 10;

/// Map names, as declared in the eBPF object and pinned under the pin directory (at most 15
/// bytes: the kernel keeps no more).
pub mod maps {
    /// [`crate::ServiceKey`] → [`crate::Service`].
    pub const SERVICES: &str = "TP_SERVICES";
    /// [`crate::BackendKey`] → [`crate::Backend`].
    pub const BACKENDS: &str = "TP_BACKENDS";
    /// [`crate::RevNatKey`] → [`crate::Endpoint`] (LRU): a socket's backend → the VIP it asked
    /// for, for `recvmsg` and `getpeername`.
    pub const REV_NAT: &str = "TP_REV_NAT";
    /// [`crate::AffinityKey`] → [`crate::AffinityValue`] (LRU): `sessionAffinity: ClientIP`.
    pub const AFFINITY: &str = "TP_AFFINITY";
    /// service id → [`crate::ServiceStats`] (per CPU).
    pub const SERVICE_STATS: &str = "TP_SVC_STATS";
    /// [`crate::BackendStatsKey`] → [`crate::BackendStats`] (per CPU).
    pub const BACKEND_STATS: &str = "TP_BE_STATS";
    /// One [`crate::LogConfig`] (array of 1): which datapath events the programs log.
    pub const LOG_CONFIG: &str = "TP_LOG_CONFIG";
    /// One [`crate::LogBudget`] per CPU (array of 1): the programs' log rate limit.
    pub const LOG_BUDGET: &str = "TP_LOG_BUDGET";
    /// LPM trie: `Key<`[`crate::SourceRangeKey`]`>` → the range's family ([`crate::FAMILY_V4`]
    /// or [`crate::FAMILY_V6`], for read-back; the programs look only for a match): the
    /// `loadBalancerSourceRanges` of the services flagged [`crate::flags::SOURCE_RANGES`].
    pub const SOURCE_RANGES: &str = "TP_SRC_RANGES";
    /// [`crate::MaglevKey`] → [`crate::MaglevTable`]: the consistent-hash tables of the
    /// services flagged [`crate::flags::MAGLEV`].
    pub const MAGLEV: &str = "TP_MAGLEV";
}

/// [`LogConfig::events`] bits: the datapath events the programs can log (with aya-log).
pub mod log_events {
    /// A connect or datagram refused, or a packet from outside the node dropped in tc: the
    /// Service has no backend in any tier.
    pub const NO_BACKEND: u32 = 1 << 0;
    /// A backend chosen from a tier other than the nearest (the nearer ones are empty).
    pub const TIER_FALLBACK: u32 = 1 << 1;
    /// A counted slot was empty (the agent broke the write order); the call was refused.
    pub const SLOT_MISS: u32 = 1 << 2;
    /// An unconnected UDP socket's replies from one backend now map to another VIP.
    pub const REPLY_AMBIGUOUS: u32 = 1 << 3;
    /// A packet from outside the node dropped in tc: `externalTrafficPolicy: Local` and no
    /// endpoint on this node.
    pub const ETP_LOCAL_DROP: u32 = 1 << 4;
    /// A packet from outside the node dropped in tc: no free port in the SNAT range.
    pub const SNAT_EXHAUSTED: u32 = 1 << 5;
    pub const ALL: u32 =
        NO_BACKEND | TIER_FALLBACK | SLOT_MISS | REPLY_AMBIGUOUS | ETP_LOCAL_DROP | SNAT_EXHAUSTED;
}

/// Map sizes; the agent refuses more than these.
pub mod limits {
    pub const SERVICES: u32 = 65_536;
    pub const BACKENDS: u32 = 1_048_576;
    pub const REV_NAT: u32 = 262_144;
    pub const AFFINITY: u32 = 131_072;
    pub const BACKEND_STATS: u32 = 1_048_576;
    /// Source ranges of all services together.
    pub const SOURCE_RANGES: u32 = 65_536;
    /// Maglev tables of all services together (one per non-empty tier of a `sh`/`mh`
    /// service).
    pub const MAGLEV_TABLES: u32 = 65_536;
}

/// `Service::flags` bits.
pub mod flags {
    /// Bits 0–1: the frontend (0 ClusterIP, 1 ExternalIP, 2 LoadBalancer, 3 NodePort).
    pub const FRONTEND_MASK: u32 = 0b11;
    /// The frontend bits of a load-balancer IP.
    pub const FRONTEND_LOAD_BALANCER: u32 = 2;
    /// The traffic policy is `Local`.
    pub const TRAFFIC_POLICY_LOCAL: u32 = 1 << 2;
    /// `loadBalancerSourceRanges`: a new flow from outside the node is served only when its
    /// source matches a prefix under the service's id in `TP_SRC_RANGES` (dropped otherwise).
    /// The socket programs leave such a service untranslated: the source of an unbound
    /// socket is not known at connect.
    pub const SOURCE_RANGES: u32 = 1 << 3;
    /// With [`SOURCE_RANGES`]: a range holds the node's own address (kept for read-back;
    /// the datapath does not use it).
    pub const SOURCE_RANGES_FROM_NODE: u32 = 1 << 4;
    /// Consistent hashing (scheduler `sh` or `mh`): a new connection's tier and backend come
    /// from a hash of the client (its address in tc, its network namespace at the socket) and
    /// the tier's [`crate::MaglevTable`], not from a random draw.
    pub const MAGLEV: u32 = 1 << 5;
    /// With [`MAGLEV`]: hash the client's source port too (IPVS's `sh-port`/`mh-port`). In tc
    /// the packet's source port; at the socket, where the port is not chosen yet at connect,
    /// the socket itself (its cookie), so each socket is a client of its own.
    pub const HASH_SOURCE_PORT: u32 = 1 << 6;
}

/// A virtual service: VIP, port and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, `IPPROTO_SCTP`.
    pub protocol: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// What the datapath needs to pick a backend for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Key into `BACKENDS`, stats and affinity; stable for the service's lifetime.
    pub id: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 means no affinity.
    pub affinity_timeout: u32,
    /// See [`flags`].
    pub flags: u32,
    /// Backends per tier, nearest first.
    pub tier_counts: [u16; MAX_TIERS],
    /// Share of new connections each tier takes, in parts per million of the shares of the
    /// non-empty tiers (a tier emptied since takes nothing, without the agent). All zero: the
    /// nearest non-empty tier takes everything (kube-proxy's behaviour), as it does when
    /// every tier with a share is empty.
    pub tier_shares: [u32; MAX_TIERS],
    /// The scheduler name the agent was given (NUL-padded) and, in the last byte, its flag
    /// bits (`IP_VS_SVC_F_SCHED1..3` >> 3); the datapath ignores both.
    pub scheduler: [u8; SCHEDULER_LEN],
}

/// A `TP_MAGLEV` key: one tier of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaglevKey {
    pub service_id: u32,
    pub tier: u32,
}

/// A tier's Maglev lookup table: each entry is the index of a backend slot in the tier
/// (below the tier's count when the agent wrote it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub indices: [u16; MAGLEV_SIZE],
}

/// murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The hash of a client the datapath looks up in a [`MaglevTable`] (entry `hash %
/// MAGLEV_SIZE`): four words (an address as the maps keep it, or a cookie) and a fifth (the
/// source port, or 0). Loop-free for the verifier; both sides compute it with this one
/// definition.
#[inline(always)]
pub const fn client_hash(words: &[u32; 4], extra: u32) -> u32 {
    let mut h = mix32(words[0] ^ 0x9e37_79b9);
    h = mix32(h ^ words[1]);
    h = mix32(h ^ words[2]);
    h = mix32(h ^ words[3]);
    mix32(h ^ extra)
}

/// The roll that draws a consistent-hash client's tier by share: another hash of the client,
/// so the tier does not follow from its table entry.
#[inline(always)]
pub const fn tier_roll(client: u32) -> u32 {
    mix32(client ^ 0x5bd1_e995)
}

/// The data of a `TP_SRC_RANGES` key: a service and a source address. The trie's prefix
/// length counts the 32 bits of the id plus the range's own prefix, so a lookup with the full
/// length (32 + 128) matches only prefixes of that service. An IPv4 address sits in `addr[0]`
/// (the rest zero), as everywhere in these maps, so an IPv4 prefix never matches an IPv6
/// source beyond it: the family is the service's, and a service has one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// Compared whole (every prefix length is at least 32), so its byte order is irrelevant.
    pub service_id: u32,
    /// Network byte order words.
    pub addr: [u32; 4],
}

/// The prefix length of a `TP_SRC_RANGES` lookup: the id and a whole address.
pub const SOURCE_RANGE_LOOKUP_BITS: u32 = 32 + 128;

/// One backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service_id: u32,
    /// `tier << TIER_SHIFT | index`.
    pub slot: u32,
}

/// An address, port and family: a backend or a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// A backend in a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub endpoint: Endpoint,
    /// Kept for read-back; the datapath chooses uniformly within a tier.
    pub weight: u32,
}

/// A socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    pub backend: Endpoint,
    pub _pad: u32,
}

/// A client (by network namespace) of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie`: one per pod.
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// The backend a client was last given, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Endpoint,
    /// Where the backend was; the entry holds only while that slot still holds it.
    pub slot: u32,
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
}

/// Per-service counters (per CPU; sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connects and datagrams sent to a backend of this service.
    pub translations: u64,
    /// Of those, how many followed session affinity.
    pub affinity_hits: u64,
    /// Connects refused because every tier was empty.
    pub no_backend: u64,
}

/// A backend of one service, for its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendStatsKey {
    pub service_id: u32,
    pub backend: Endpoint,
}

/// Per-backend counters (per CPU; sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Connects (and unconnected datagrams) sent to this backend.
    pub connections: u64,
}

/// What the programs log; all zero (the map's initial value) means nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// [`log_events`] bits.
    pub events: u32,
    /// Records each CPU may emit per second; 0 means none.
    pub per_second: u32,
}

/// One CPU's log budget for the current second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBudget {
    /// `bpf_ktime_get_ns` when the current one-second window began.
    pub window_start_ns: u64,
    /// Records emitted in it.
    pub emitted: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: every type is `#[repr(C)]`, `Copy`, made only of integers and arrays of them,
    // with explicit padding fields, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::BackendStatsKey {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::LogConfig {}
    unsafe impl aya::Pod for super::LogBudget {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::MaglevTable {}
}

// The layouts have no implicit padding: sizes are the sums of their fields.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<Service>() == 28 + 2 * MAX_TIERS + 4 * MAX_TIERS);
    assert!(size_of::<Endpoint>() == 20);
    assert!(size_of::<Backend>() == 24);
    assert!(size_of::<RevNatKey>() == 32);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<AffinityValue>() == 32);
    assert!(size_of::<BackendStatsKey>() == 24);
    assert!(size_of::<LogConfig>() == 8);
    assert!(size_of::<LogBudget>() == 16);
    assert!(size_of::<SourceRangeKey>() == 20);
    assert!(size_of::<MaglevKey>() == 8);
    assert!(size_of::<MaglevTable>() == 2 * MAGLEV_SIZE);
};
