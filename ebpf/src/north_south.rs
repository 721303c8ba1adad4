//! North-south load balancing in tc: packets from outside the node to a NodePort on a node
//! address, an externalIP or a load-balancer IP, on the devices the agent attaches us to.
//!
//! - `tp_ns_ingress` looks a packet up as a reply from a remote backend (to a SNAT port), then
//!   as a tracked client flow, then as a new flow to a Service frontend in the socket path's
//!   own `TP_SERVICES` / `TP_BACKENDS` (same tier and slot choice, same counters); a new flow
//!   to a Service with `loadBalancerSourceRanges` from a source outside them (LPM trie
//!   `TP_SRC_RANGES`) is dropped first, as kube-proxy's firewall chain drops it, and so is
//!   every later packet of a tracked flow to a load-balancer IP whose source the Service's
//!   ranges (as they are now) do not hold; the conntrack entry of such a flow is flagged, so
//!   flows to other frontends pay nothing. Anything
//!   else — SSH to the node, fragments — passes untouched. A ClusterIP arriving from outside
//!   (a routed or advertised service CIDR) is balanced too; the node's own processes reach
//!   ClusterIPs at the socket, so none of theirs comes here.
//! - A new flow gets its backend by tier as a connect does (the same `TierView` draw) (`sessionAffinity: ClientIP` keyed
//!   by the client's address), is DNATed and handed to the stack, which routes it to a local
//!   pod or off the node. `externalTrafficPolicy: Local` Services hold only node-local tiers,
//!   so the pod sees the client's address; with no local backend the packet is dropped.
//!   A consistent-hash (`sh`/`mh`) Service draws the tier and takes the Maglev table's
//!   backend by a hash of the packet's source address (and source port when flagged), so a
//!   client keeps its backend while other backends come and go.
//! - Under Cluster policy a DNATed packet the stack sends out through one of our devices is
//!   for a remote backend: `tp_ns_egress` SNATs it to that device's node address with a port
//!   from the configured range. The backend's replies come back to that address and port;
//!   `tp_ns_ingress` puts the frontend and the client back and sends them out of the device
//!   the client's packets came in on with `bpf_redirect_neigh` (the stack would drop a packet
//!   from its own address arriving from outside). A local backend's replies are routed by the
//!   stack and get the frontend back as source in `tp_ns_egress`. A client that reaches one
//!   backend through two frontends from the same source port would show that backend one
//!   4-tuple for two flows: the second flow gets a port from the SNAT range instead (the
//!   client's address stays), as netfilter's NAT resolves such a clash.
//! - Every leg is tracked in the LRU `TP_NS_CT`, so a flow keeps its backend and SNAT port,
//!   also across an agent restart (the maps are pinned).
//!
//! Checksums are updated with the kernel's incremental helpers (pseudo-header flag for
//! addresses, "mangled 0" for UDP, whose zero checksum means none). No GPL-only helper is
//! used (`bpf_fib_lookup` is one; this object is Apache-2.0). SCTP (CRC32c, no incremental
//! helper), IPv6 extension headers and IP fragments pass untouched.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::TcContext,
};
use aya_log_ebpf::{info, warn};
use topoproxy_common::{
    client_hash, flags, log_events,
    north_south::{
        direction, limits, nat, AffinityKey, Config, Device, FlowKey, FlowNat, Masquerade,
        DEFAULT_SNAT_PORTS, MAX_CLUSTER_CIDRS,
    },
    AffinityValue, Endpoint, Service, ServiceKey, SourceRangeKey, FAMILY_V4, FAMILY_V6,
    SOURCE_RANGE_LOOKUP_BITS, TIER_SHIFT,
};

use crate::{
    count_backend, count_service, may_log, roll, slot_backend, start_index, TierView, TP_SERVICES,
};

/// Not ours: let the next program (tcx) or filter (netlink) see the packet.
const NEXT: i32 = TC_ACT_UNSPEC;
const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV4_CSUM: usize = ETH_HLEN + 10;
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_SRC: usize = ETH_HLEN + 12;
const IPV4_DST: usize = ETH_HLEN + 16;
const IPV6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IPV6_SRC: usize = ETH_HLEN + 8;
const IPV6_DST: usize = ETH_HLEN + 24;
/// SNAT ports tried for a free one before the flow is dropped (bounded for the verifier).
const SNAT_PROBES: u32 = 32;

#[map]
static TP_NS_DEVICES: HashMap<u32, Device> = HashMap::pinned(limits::DEVICES, 0);

#[map]
static TP_NS_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
static TP_NS_MASQ: Array<Masquerade> = Array::pinned(1, 0);

#[map]
static TP_NS_CT: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(limits::CONNTRACK, 0);

#[map]
static TP_NS_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::AFFINITY, 0);

/// `loadBalancerSourceRanges`, written by the agent (the flows' side of the socket object's
/// maps, declared here because only the tc programs read it).
#[map]
static TP_SRC_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(topoproxy_common::limits::SOURCE_RANGES, 0);

#[classifier]
pub fn tp_ns_ingress(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return NEXT;
    };
    if let Some(reply) = tracked(&packet, direction::REPLY_SNAT) {
        return translate(&ctx, &packet, reply);
    }
    if let Some(original) = tracked(&packet, direction::ORIGINAL) {
        if original.flags & nat::SOURCE_RANGES != 0 && !still_admitted(&packet) {
            return DROP;
        }
        return translate(&ctx, &packet, original);
    }
    // `new_flow` returns before `dnat` runs: their stack frames are never stacked on each
    // other, which keeps the deepest call chain within the verifier's 512 bytes on 6.1.
    let mut chosen = Chosen::NONE;
    match new_flow(&ctx, &packet, &mut chosen) {
        CHOSEN => dnat(&ctx, &packet, &chosen),
        verdict => verdict,
    }
}

#[classifier]
pub fn tp_ns_egress(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return NEXT;
    };
    if let Some(reply) = tracked(&packet, direction::REPLY_LOCAL) {
        return translate(&ctx, &packet, reply);
    }
    match tracked(&packet, direction::EGRESS) {
        Some(flow) if flow.flags & nat::SNAT_PENDING != 0 => snat_at_egress(&ctx, &packet, flow),
        Some(flow) => translate(&ctx, &packet, flow),
        None => NEXT,
    }
}

/// The fields of a TCP or UDP packet the programs translate.
struct Packet {
    family: u8,
    protocol: u8,
    /// Offset of the TCP or UDP header.
    l4: usize,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
}

impl Packet {
    fn key(&self, direction: u8) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            protocol: self.protocol,
            family: self.family,
            direction,
            _pad: 0,
        }
    }

    fn l4_csum(&self) -> usize {
        if self.protocol == IPPROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    /// Flags for `l4_csum_replace`: a zero UDP checksum means "none" and must stay zero.
    fn l4_flags(&self) -> u64 {
        if self.protocol == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    match ethertype {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => None,
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Option<Packet> {
    let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return None;
    }
    // A fragment (more-fragments flag or an offset) may carry no ports: not ours.
    let fragment = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if fragment & 0x3fff != 0 {
        return None;
    }
    let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + header_len;
    Some(Packet {
        family: FAMILY_V4,
        protocol,
        l4,
        src: [ctx.load(IPV4_SRC).ok()?, 0, 0, 0],
        dst: [ctx.load(IPV4_DST).ok()?, 0, 0, 0],
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
    })
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Option<Packet> {
    // Only a TCP or UDP header right after the fixed header; extension headers pass.
    let protocol: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return None;
    }
    let l4 = ETH_HLEN + 40;
    Some(Packet {
        family: FAMILY_V6,
        protocol,
        l4,
        src: ctx.load(IPV6_SRC).ok()?,
        dst: ctx.load(IPV6_DST).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
    })
}

/// The tracked leg of this packet's flow, in place in the map (not copied: stack is scarce).
/// An update swaps in a whole new element, so the one read here is never torn.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn tracked(packet: &Packet, direction: u8) -> Option<&'static FlowNat> {
    // SAFETY: a map value, valid for this program run.
    unsafe { TP_NS_CT.get(packet.key(direction)) }
}

/// Inserts `value` under this packet's own key for `direction`; `false` if the map refuses.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn track(packet: &Packet, direction: u8, value: &FlowNat) -> bool {
    TP_NS_CT
        .insert(packet.key(direction), *value, u64::from(BPF_ANY))
        .is_ok()
}

/// Rewrites a packet of a tracked flow and sends it on.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn translate(ctx: &TcContext, packet: &Packet, flow: &FlowNat) -> i32 {
    if rewrite(ctx, packet, flow).is_err() {
        return DROP;
    }
    if flow.flags & nat::REDIRECT == 0 {
        return PASS;
    }
    send(ctx, packet.family, flow.ifindex)
}

/// The backend a new flow gets, and how to translate it.
struct Chosen {
    service_id: u32,
    backend: Endpoint,
    /// Chosen by session affinity.
    affine: bool,
    /// Cluster policy: SNAT if the stack routes the flow out through one of our devices.
    snat_if_remote: bool,
    /// A load-balancer IP: every later packet is checked against the ranges too.
    source_ranges: bool,
}

impl Chosen {
    const NONE: Chosen = Chosen {
        service_id: 0,
        backend: Endpoint {
            addr: [0; 4],
            port: 0,
            family: 0,
            _pad: 0,
        },
        affine: false,
        snat_if_remote: false,
        source_ranges: false,
    };
}

/// What [`new_flow`] returns when it filled in the backend; no TC action has this value.
const CHOSEN: i32 = i32::MIN;

/// A packet to a frontend with no tracked flow yet: [`CHOSEN`] with its backend written to
/// `chosen`, or the verdict (`NEXT` when it is not for a frontend of ours, `DROP` when the
/// Service has no backend).
// A BPF subprogram of its own: its stack frame is not added to the callers'. It returns a
// plain verdict, not a `Result`: the BTF of a subprogram's `Result<Chosen, i32>` is a union
// whose tag sits past the payload, and the kernel rejects the whole object's BTF for it.
#[inline(never)]
fn new_flow(ctx: &TcContext, packet: &Packet, chosen: &mut Chosen) -> i32 {
    let key = ServiceKey {
        addr: packet.dst,
        port: packet.dport,
        protocol: packet.protocol,
        family: packet.family,
    };
    // SAFETY: the map is not preallocated, so an update swaps in a new element and this one
    // stays whole until the program returns (RCU): counts and shares are read consistently.
    let Some(service) = (unsafe { TP_SERVICES.get(key) }) else {
        return NEXT;
    };
    // kube-proxy's `KUBE-SOURCE-RANGES-FIREWALL`: before any balancing, and a drop (the
    // client times out), not a reject.
    if service.flags & flags::SOURCE_RANGES != 0 && !admitted(packet, service.id) {
        return DROP;
    }
    // The socket path's tier view: the same draw by share, the same fallback.
    let tiers = TierView::of(service);
    if tiers.nearest.is_none() {
        count_service(service.id, 0, 0, 1);
        log_no_backend(ctx, service);
        return DROP;
    }
    if tiers.is_fallback() {
        log_tier_fallback(ctx, service.id, &tiers);
    }
    if !choose(service, &tiers, packet, chosen) {
        return DROP;
    }
    chosen.service_id = service.id;
    chosen.source_ranges = service.flags & flags::FRONTEND_MASK == flags::FRONTEND_LOAD_BALANCER;
    chosen.snat_if_remote = if service.flags & flags::FRONTEND_MASK == 0 {
        // A ClusterIP routed to the node from outside (BGP-advertised service CIDR, a
        // gateway node): kube-proxy's masquerade rule decides.
        masquerades(packet)
    } else {
        // Local policy: the tiers hold only node-local backends and the client's address
        // stays.
        service.flags & flags::TRAFFIC_POLICY_LOCAL == 0
    };
    CHOSEN
}

/// Whether the packet's source is inside one of the `loadBalancerSourceRanges` of service
/// `service_id`. The agent writes a service's ranges before an entry that flags them, and
/// removes them only after one that does not, so a flagged entry never misses its ranges.
// A BPF subprogram of its own: the lookup key's frame is not added to the callers'.
#[inline(never)]
fn admitted(packet: &Packet, service_id: u32) -> bool {
    let key = Key::new(
        SOURCE_RANGE_LOOKUP_BITS,
        SourceRangeKey {
            service_id,
            addr: packet.src,
        },
    );
    TP_SRC_RANGES.get(&key).is_some()
}

/// A packet of a tracked flow to a load-balancer IP: whether the `loadBalancerSourceRanges`
/// the Service has now hold its source (a change reaches flows already running, as
/// kube-proxy's filter does). A Service gone or without ranges now lets it pass.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn still_admitted(packet: &Packet) -> bool {
    let key = ServiceKey {
        addr: packet.dst,
        port: packet.dport,
        protocol: packet.protocol,
        family: packet.family,
    };
    // SAFETY: a map value, valid for this program run; only read.
    match unsafe { TP_SERVICES.get(key) } {
        Some(service) if service.flags & flags::SOURCE_RANGES != 0 => admitted(packet, service.id),
        _ => true,
    }
}

/// kube-proxy's `KUBE-MARK-MASQ` for a ClusterIP: everything under `--masquerade-all`, else
/// a source outside every `--cluster-cidr` (none without one).
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn masquerades(packet: &Packet) -> bool {
    let Some(masq) = TP_NS_MASQ.get(0) else {
        return false;
    };
    if masq.masquerade_all != 0 {
        return true;
    }
    if masq.cidr_count == 0 {
        return false;
    }
    for cidr in masq.cluster_cidrs.iter().take(MAX_CLUSTER_CIDRS) {
        if cidr.family == packet.family && in_cidr(&packet.src, &cidr.addr, cidr.prefix_len) {
            return false;
        }
    }
    true
}

/// Whether `addr` (network order words) is inside `prefix`/`len`.
#[inline(always)]
fn in_cidr(addr: &[u32; 4], prefix: &[u32; 4], len: u8) -> bool {
    let mut left = u32::from(len);
    for word in 0..4 {
        let bits = if left >= 32 { 32 } else { left };
        left -= bits;
        let mask = if bits == 0 {
            0
        } else {
            u32::MAX << (32 - bits)
        };
        if u32::from_be(addr[word]) & mask != u32::from_be(prefix[word]) & mask {
            return false;
        }
    }
    true
}

/// DNAT to the chosen backend and hand the packet to the stack. Tracks the client's flow,
/// the replies of a local backend (for `tp_ns_egress`) and, under Cluster policy, the DNATed
/// flow in case it leaves through one of our devices.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn dnat(ctx: &TcContext, packet: &Packet, chosen: &Chosen) -> i32 {
    let backend = &chosen.backend;
    let sport = claim_local_reply(packet, backend, chosen.service_id);
    if sport == NO_PORT {
        log_snat_exhausted(ctx, chosen.service_id);
        return DROP;
    }
    let sport = sport as u16;
    // SAFETY: the context's skb, valid for the whole program.
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if chosen.snat_if_remote
        && !track_pending_snat(packet, backend, sport, chosen.service_id, ingress_ifindex)
    {
        return DROP;
    }
    let mut original = FlowNat {
        dst: backend.addr,
        dport: backend.port,
        flags: nat::DST,
        service_id: chosen.service_id,
        ..FlowNat::default()
    };
    if chosen.source_ranges {
        original.flags |= nat::SOURCE_RANGES;
    }
    if sport != packet.sport {
        original.flags |= nat::SRC;
        original.src = packet.src;
        original.sport = sport;
    }
    if !track(packet, direction::ORIGINAL, &original) || rewrite(ctx, packet, &original).is_err() {
        return DROP;
    }
    count_flow(chosen);
    PASS
}

/// The socket path's counters, for a flow sent to its backend.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn count_flow(chosen: &Chosen) {
    count_service(chosen.service_id, 1, u64::from(chosen.affine), 0);
    count_backend(chosen.service_id, chosen.backend);
}

/// What [`claim_local_reply`] returns when every port it tried was taken.
const NO_PORT: u32 = u32::MAX;

/// Tracks the replies of a local backend, which `tp_ns_egress` gives the frontend's source,
/// and returns the source port (network order) the flow reaches the backend with: the
/// client's own, unless the client already uses that port towards this backend through
/// another frontend. The backend would then see one 4-tuple for two flows, so this one gets
/// a port from the SNAT range and keeps the client's address (netfilter's NAT resolves such
/// a clash the same way). [`NO_PORT`] when none is free.
// A BPF subprogram of its own: its stack frame is not added to the callers'. It returns a
// plain integer, not an `Option`, to keep the object's BTF loadable (see `new_flow`). Key and
// value go to the map by reference: passed by value they are copied for every call, and the
// frame grows from 128 to 224 bytes, past the verifier's 512 for the deepest chain.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(never)]
fn claim_local_reply(packet: &Packet, backend: &Endpoint, service_id: u32) -> u32 {
    let mut key = FlowKey {
        src: backend.addr,
        dst: packet.src,
        sport: backend.port,
        dport: packet.sport,
        protocol: packet.protocol,
        family: packet.family,
        direction: direction::REPLY_LOCAL,
        _pad: 0,
    };
    let mut reply = FlowNat {
        src: packet.dst,
        sport: packet.dport,
        flags: nat::SRC,
        service_id,
        ..FlowNat::default()
    };
    if TP_NS_CT
        .insert(&key, &reply, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return u32::from(packet.sport);
    }
    // SAFETY: a map value, valid for this program run; only compared.
    if let Some(held) = unsafe { TP_NS_CT.get(&key) } {
        // This flow's own reply leg (its first packets raced, or its client leg was evicted).
        if held.flags == nat::SRC && held.src == packet.dst && held.sport == packet.dport {
            return u32::from(packet.sport);
        }
    }
    reply.flags = nat::SRC | nat::DST;
    reply.dst = packet.src;
    reply.dport = packet.sport;
    let (min, range) = snat_ports();
    let start = unsafe { bpf_get_prandom_u32() } % range;
    let mut probe = 0;
    while probe < SNAT_PROBES {
        let port = ((u32::from(min) + (start + probe) % range) as u16).to_be();
        key.dport = port;
        if TP_NS_CT
            .insert(&key, &reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return u32::from(port);
        }
        probe += 1;
    }
    NO_PORT
}

/// The SNAT port range: its first port and its size (host order).
#[inline(always)]
fn snat_ports() -> (u16, u32) {
    let (min, max) = match TP_NS_CONFIG.get(0) {
        Some(config)
            if config.snat_port_min != 0 && config.snat_port_max >= config.snat_port_min =>
        {
            (config.snat_port_min, config.snat_port_max)
        }
        _ => DEFAULT_SNAT_PORTS,
    };
    (min, u32::from(max) - u32::from(min) + 1)
}

/// Tracks the DNATed flow (leaving with source port `sport`) for `tp_ns_egress`, which
/// SNATs it if it leaves through one of our devices; remembers the client, the frontend and
/// where the client's packets arrive.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn track_pending_snat(
    packet: &Packet,
    backend: &Endpoint,
    sport: u16,
    service_id: u32,
    ifindex: u32,
) -> bool {
    let key = FlowKey {
        dst: backend.addr,
        dport: backend.port,
        sport,
        ..packet.key(direction::EGRESS)
    };
    let pending = FlowNat {
        src: packet.src,
        sport: packet.sport,
        dst: packet.dst,
        dport: packet.dport,
        flags: nat::SNAT_PENDING,
        service_id,
        ifindex,
    };
    TP_NS_CT.insert(key, pending, u64::from(BPF_ANY)).is_ok()
}

/// The first packet of a DNATed flow leaving through one of our devices (its backend is on
/// another node): claims a SNAT port on this device's node address, tracks the reply leg
/// and SNATs the packet.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn snat_at_egress(ctx: &TcContext, packet: &Packet, pending: &FlowNat) -> i32 {
    // SAFETY: the context's skb, valid for the whole program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(snat) = snat_address(ifindex, packet.family) else {
        // No node address of this family on this device: the flow cannot be SNATed.
        return DROP;
    };
    let Some(port) = claim_snat_port(packet, &snat, pending) else {
        log_snat_exhausted(ctx, pending.service_id);
        return DROP;
    };
    let egress = FlowNat {
        src: snat,
        sport: port,
        flags: nat::SRC,
        service_id: pending.service_id,
        ..FlowNat::default()
    };
    if !track(packet, direction::EGRESS, &egress) {
        return DROP;
    }
    translate(ctx, packet, &egress)
}

/// Reserves a source port on `snat` towards the packet's destination (the backend) by
/// inserting the reply leg of the flow (`BPF_NOEXIST`, so two flows never share a port):
/// back to the frontend and the client (as it sent, before any port clash was resolved),
/// out of the device the client's packets arrive on. Returns the port in network order.
// A BPF subprogram of its own: its stack frame is not added to the callers'.
#[inline(never)]
fn claim_snat_port(packet: &Packet, snat: &[u32; 4], pending: &FlowNat) -> Option<u16> {
    let reply = FlowNat {
        src: pending.dst,
        sport: pending.dport,
        dst: pending.src,
        dport: pending.sport,
        flags: nat::SRC | nat::DST | nat::REDIRECT,
        service_id: pending.service_id,
        ifindex: pending.ifindex,
    };
    let (min, range) = snat_ports();
    let start = unsafe { bpf_get_prandom_u32() } % range;
    let mut probe = 0;
    while probe < SNAT_PROBES {
        let port = (u32::from(min) + (start + probe) % range) as u16;
        let key = FlowKey {
            src: packet.dst,
            dst: *snat,
            sport: packet.dport,
            dport: port.to_be(),
            protocol: packet.protocol,
            family: packet.family,
            direction: direction::REPLY_SNAT,
            _pad: 0,
        };
        if TP_NS_CT.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port.to_be());
        }
        probe += 1;
    }
    None
}

/// The node address of `family` on our device `ifindex`; `None` when the device is not ours
/// (the backend is reached through a pod's interface: it is local) or has no such address.
#[inline(always)]
fn snat_address(ifindex: u32, family: u8) -> Option<[u32; 4]> {
    // SAFETY: copied out at once.
    let device = unsafe { TP_NS_DEVICES.get(ifindex) }.copied()?;
    if family == FAMILY_V4 {
        (device.addr4 != 0).then_some([device.addr4, 0, 0, 0])
    } else {
        (device.addr6 != [0; 4]).then_some(device.addr6)
    }
}

/// Logs a packet dropped for want of a backend: `externalTrafficPolicy: Local` without a
/// node-local endpoint, or no endpoint at all.
// A BPF subprogram of its own: the log record's code stays out of the callers' frames.
#[inline(never)]
fn log_no_backend(ctx: &TcContext, service: &Service) {
    if service.flags & flags::TRAFFIC_POLICY_LOCAL != 0 {
        if may_log(log_events::ETP_LOCAL_DROP) {
            warn!(ctx, "etp_local_drop svc={}", service.id);
        }
    } else if may_log(log_events::NO_BACKEND) {
        warn!(ctx, "no_backend svc={}", service.id);
    }
}

/// Logs a new flow served by a farther tier because the nearer ones are empty.
// A BPF subprogram of its own: the log record's code stays out of the callers' frames.
#[inline(never)]
fn log_tier_fallback(ctx: &TcContext, service_id: u32, tiers: &TierView) {
    if let Some(nearest) = tiers.nearest {
        if may_log(log_events::TIER_FALLBACK) {
            info!(ctx, "tier_fallback svc={} tier={}", service_id, nearest);
        }
    }
}

/// Logs a packet dropped because every SNAT port tried was taken.
// A BPF subprogram of its own: the log record's code stays out of the callers' frames.
#[inline(never)]
fn log_snat_exhausted(ctx: &TcContext, service_id: u32) {
    if may_log(log_events::SNAT_EXHAUSTED) {
        warn!(ctx, "snat_exhausted svc={}", service_id);
    }
}

/// Writes the backend for this client and whether affinity chose it into `chosen`; `false`
/// when the tier drawn has no backend.
// A BPF subprogram of its own: its stack frame is not added to the callers'. It returns a
// `bool`: the BTF of an `Option<(Endpoint, bool)>` return is a union with its tag past the
// payload, which the kernel rejects.
#[inline(never)]
fn choose(service: &Service, tiers: &TierView, packet: &Packet, chosen: &mut Chosen) -> bool {
    match affine_or_drawn(service, tiers, packet) {
        Some((backend, affine)) => {
            chosen.backend = backend;
            chosen.affine = affine;
            true
        }
        None => false,
    }
}

/// The backend for this client: its affine one while its tier still takes connections, else
/// one of a tier drawn by share (the socket path's rule, keyed by client address; for a
/// consistent-hash service, by the hash of the packet's source address, and port if flagged).
#[inline(always)]
fn affine_or_drawn(
    service: &Service,
    tiers: &TierView,
    packet: &Packet,
) -> Option<(Endpoint, bool)> {
    let timeout_ns = u64::from(service.affinity_timeout) * 1_000_000_000;
    let client = if service.flags & flags::MAGLEV == 0 {
        0
    } else if service.flags & flags::HASH_SOURCE_PORT != 0 {
        client_hash(&packet.src, u32::from(packet.sport))
    } else {
        client_hash(&packet.src, 0)
    };
    let (tier, count) = tiers.draw(service, roll(service, client))?;
    let index = start_index(service, tier, count, client);
    if timeout_ns == 0 {
        return slot_backend(service.id, tier, index).map(|backend| (backend, false));
    }
    let key = AffinityKey {
        client: packet.src,
        service_id: service.id,
        family: packet.family,
        _pad: [0; 3],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = TP_NS_AFFINITY.get_ptr_mut(key) {
        // SAFETY: a pointer the map lookup returned, valid for this program run.
        let held = unsafe { *entry };
        // A stamp another CPU wrote after `now` was read is fresh, not 2^64 ns old.
        let fresh = held.last_used_ns >= now || now - held.last_used_ns <= timeout_ns;
        let (held_tier, held_index) = (held.slot >> TIER_SHIFT, held.slot & 0xffff);
        if fresh
            && tiers.serves(service, held_tier, held_index)
            && slot_backend(service.id, held_tier, held_index) == Some(held.backend)
        {
            if now > held.last_used_ns {
                // SAFETY: as above; a racing update only moves the timestamp.
                unsafe { (*entry).last_used_ns = now };
            }
            return Some((held.backend, true));
        }
    }
    let backend = slot_backend(service.id, tier, index)?;
    let value = AffinityValue {
        backend,
        slot: tier << TIER_SHIFT | index,
        last_used_ns: now,
    };
    // A full LRU evicts the oldest entry; a failure only costs affinity.
    let _ = TP_NS_AFFINITY.insert(key, value, u64::from(BPF_ANY));
    Some((backend, false))
}

/// Writes the flow's addresses and ports into the packet, checksums updated incrementally.
#[inline(always)]
fn rewrite(ctx: &TcContext, packet: &Packet, flow: &FlowNat) -> Result<(), i64> {
    let (src_at, dst_at) = if packet.family == FAMILY_V4 {
        (IPV4_SRC, IPV4_DST)
    } else {
        (IPV6_SRC, IPV6_DST)
    };
    if flow.flags & nat::SRC != 0 {
        set_address(ctx, packet, src_at, &packet.src, &flow.src)?;
        set_port(ctx, packet, packet.l4, packet.sport, flow.sport)?;
    }
    if flow.flags & nat::DST != 0 {
        set_address(ctx, packet, dst_at, &packet.dst, &flow.dst)?;
        set_port(ctx, packet, packet.l4 + 2, packet.dport, flow.dport)?;
    }
    Ok(())
}

#[inline(always)]
fn set_address(
    ctx: &TcContext,
    packet: &Packet,
    offset: usize,
    old: &[u32; 4],
    new: &[u32; 4],
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    let l4_flags = packet.l4_flags() | u64::from(BPF_F_PSEUDO_HDR) | 4;
    if packet.family == FAMILY_V4 {
        ctx.l4_csum_replace(
            packet.l4_csum(),
            u64::from(old[0]),
            u64::from(new[0]),
            l4_flags,
        )?;
        ctx.l3_csum_replace(IPV4_CSUM, u64::from(old[0]), u64::from(new[0]), 4)?;
        return ctx.store(offset, &new[0], 0);
    }
    let mut word = 0;
    while word < 4 {
        ctx.l4_csum_replace(
            packet.l4_csum(),
            u64::from(old[word]),
            u64::from(new[word]),
            l4_flags,
        )?;
        word += 1;
    }
    ctx.store(offset, new, 0)
}

#[inline(always)]
fn set_port(
    ctx: &TcContext,
    packet: &Packet,
    offset: usize,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        packet.l4_csum(),
        u64::from(old),
        u64::from(new),
        packet.l4_flags() | 2,
    )?;
    ctx.store(offset, &new, 0)
}

/// Sends a translated packet out of `ifindex` as a router would: TTL down, next hop and MACs
/// resolved by the kernel (`bpf_redirect_neigh`, kernel 5.10).
#[inline(always)]
fn send(ctx: &TcContext, family: u8, ifindex: u32) -> i32 {
    if !decrement_ttl(ctx, family) {
        // Expired (or unreadable): the stack sends the ICMP error.
        return PASS;
    }
    // SAFETY: no next-hop parameters: the kernel looks the route and neighbour up itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Decrements the TTL / hop limit as a router does; `false` when the packet must not go on.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> bool {
    if family == FAMILY_V6 {
        let Ok(hops) = ctx.load::<u8>(IPV6_HOP_LIMIT) else {
            return false;
        };
        return hops > 1 && ctx.store(IPV6_HOP_LIMIT, &(hops - 1), 0).is_ok();
    }
    // TTL and protocol share one checksummed 16-bit word.
    let Ok(word) = ctx.load::<[u8; 2]>(IPV4_TTL) else {
        return false;
    };
    if word[0] <= 1 {
        return false;
    }
    let new = [word[0] - 1, word[1]];
    let (old_raw, new_raw) = (u16::from_ne_bytes(word), u16::from_ne_bytes(new));
    ctx.l3_csum_replace(IPV4_CSUM, u64::from(old_raw), u64::from(new_raw), 2)
        .is_ok()
        && ctx.store(IPV4_TTL, &new, 0).is_ok()
}
