//! topoproxy's socket-level load balancer: cgroup v2 `sock_addr` programs that turn a Service
//! VIP:port into one of its backends when a socket names it, so the packets never carry the VIP.
//!
//! - `connect4/6` (TCP, connected UDP) and `sendmsg4/6` (unconnected UDP) look the destination
//!   up in `TP_SERVICES`, draw a tier by the entry's shares among its non-empty tiers (the
//!   nearest non-empty tier when no tier has a share: kube-proxy's behaviour), pick a backend
//!   at random in it (or keep the client's affine backend), rewrite the address and remember
//!   socket → VIP in `TP_REV_NAT`.
//! - A Service flagged for consistent hashing (scheduler `sh`/`mh`) draws its tier by a hash
//!   of the client and takes the backend its tier's Maglev table (`TP_MAGLEV`) gives that
//!   hash. The client is the socket's network namespace (its cookie: one per pod, and the
//!   source address of an unbound socket is not known at connect), or the socket itself when
//!   the Service also hashes source ports. A tier without a table is chosen in at random.
//! - A Service with `loadBalancerSourceRanges` (flagged in its entry) is left untranslated:
//!   the source of an unbound socket is unknown at connect. The tc programs enforce the
//!   ranges for clients outside the node.
//! - `recvmsg4/6` (UDP replies) and `getpeername4/6` put the VIP back, so the application only
//!   ever sees the address it asked for.
//! - The v6 hooks treat an IPv4-mapped address (`::ffff:VIP`, a dual-stack socket talking
//!   IPv4) as the IPv4 VIP and answer in the same mapped form.
//! - An unconnected UDP socket asking two VIPs that share a backend gets, where the VIP has
//!   another backend, one not already answering this socket for the other VIP, since a reply
//!   carries only the backend's address.
//!
//! Operator diagnostics (no backend, a tier fallback, a slot miss, an ambiguous UDP reply) go
//! out through aya-log, off until the agent switches them on in `TP_LOG_CONFIG` and capped
//! per CPU per second.
//!
//! The map ABI lives in `topoproxy-common`; the agent writes the maps (see its
//! `dataplane::ebpf` module). Programs never fail a call they do not own: anything that is not
//! a known VIP passes untouched.

#![no_std]
#![no_main]

mod north_south;

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::SockAddrContext,
    EbpfContext as _,
};
use aya_log_ebpf::{error, info, warn};
use topoproxy_common::{
    client_hash, flags, limits, log_events, tier_roll, AffinityKey, AffinityValue, Backend,
    BackendKey, BackendStats, BackendStatsKey, Endpoint, LogBudget, LogConfig, MaglevKey,
    MaglevTable, RevNatKey, Service, ServiceKey, ServiceStats, FAMILY_V4, FAMILY_V6, MAGLEV_SIZE,
    MAX_TIERS, TIER_SHIFT,
};

/// Let the call go on.
const ALLOW: i32 = 1;
/// Fail the call with `EPERM`: the Service exists but has no backend in any tier (kube-proxy
/// rejects such connections too).
const REJECT: i32 = 0;

// Hash maps written by the agent are not preallocated: an update then swaps a whole element
// in, so a program never reads a half-written service (and memory follows the cluster size).
#[map]
static TP_SERVICES: HashMap<ServiceKey, Service> =
    HashMap::pinned(limits::SERVICES, BPF_F_NO_PREALLOC);

#[map]
static TP_BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(limits::BACKENDS, BPF_F_NO_PREALLOC);

/// Replaced whole by the agent (not preallocated, as above): a program reads the old table or
/// the new one, never a mix.
#[map]
static TP_MAGLEV: HashMap<MaglevKey, MaglevTable> =
    HashMap::pinned(limits::MAGLEV_TABLES, BPF_F_NO_PREALLOC);

#[map]
static TP_REV_NAT: LruHashMap<RevNatKey, Endpoint> = LruHashMap::pinned(limits::REV_NAT, 0);

#[map]
static TP_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::AFFINITY, 0);

#[map]
static TP_SVC_STATS: PerCpuHashMap<u32, ServiceStats> =
    PerCpuHashMap::pinned(limits::SERVICES, BPF_F_NO_PREALLOC);

#[map]
static TP_BE_STATS: PerCpuHashMap<BackendStatsKey, BackendStats> =
    PerCpuHashMap::pinned(limits::BACKEND_STATS, BPF_F_NO_PREALLOC);

// Written by the agent (`topoproxy datapath-log`); all zero, nothing is logged.
#[map]
static TP_LOG_CONFIG: Array<LogConfig> = Array::pinned(1, 0);

#[map]
static TP_LOG_BUDGET: PerCpuArray<LogBudget> = PerCpuArray::pinned(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn tp_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn tp_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tp_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tp_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn tp_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn tp_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn tp_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn tp_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

// The verifier wants 4-byte accesses to the context; volatile keeps LLVM from narrowing or
// merging them.
#[inline(always)]
fn load(field: *const u32) -> u32 {
    // SAFETY: `field` points into the kernel-provided context, valid for the whole program.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn store(field: *mut u32, value: u32) {
    // SAFETY: as in `load`; the fields written are the ones the kernel lets this hook rewrite.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// Which call a forward program serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// `connect`: the socket has one peer from now on.
    Connect,
    /// `sendmsg` on an unconnected UDP socket: it may talk to several VIPs at once.
    Sendmsg,
}

/// `::ffff:0:0/96`, an IPv4-mapped IPv6 address, has this third word (network order).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Candidates `sendmsg` tries for a backend whose replies on this socket are not already
/// claimed by another VIP (bounded for the verifier).
const REPLY_PROBES: u32 = 4;

/// The address and port the socket call names. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
/// what dual-stack sockets and Java send to IPv4 peers) comes back as the IPv4 address it is.
#[inline(always)]
fn user_endpoint(sa: *mut bpf_sock_addr, v6: bool) -> Endpoint {
    let mut endpoint = Endpoint {
        addr: [0; 4],
        port: 0,
        family: FAMILY_V4,
        _pad: 0,
    };
    // SAFETY: only field addresses are taken here; `load` reads them.
    unsafe {
        if v6 {
            endpoint.family = FAMILY_V6;
            endpoint.addr[0] = load(&(*sa).user_ip6[0]);
            endpoint.addr[1] = load(&(*sa).user_ip6[1]);
            endpoint.addr[2] = load(&(*sa).user_ip6[2]);
            endpoint.addr[3] = load(&(*sa).user_ip6[3]);
        } else {
            endpoint.addr[0] = load(&(*sa).user_ip4);
        }
        // The port is network order in the low 16 bits.
        endpoint.port = load(&(*sa).user_port) as u16;
    }
    if v6 && endpoint.addr[0] == 0 && endpoint.addr[1] == 0 && endpoint.addr[2] == V4_MAPPED_WORD {
        endpoint.addr = [endpoint.addr[3], 0, 0, 0];
        endpoint.family = FAMILY_V4;
    }
    endpoint
}

/// Writes `endpoint` into the call; an IPv4 one in a v6 hook goes in as `::ffff:a.b.c.d`.
#[inline(always)]
fn set_user_endpoint(sa: *mut bpf_sock_addr, v6: bool, endpoint: &Endpoint) {
    let words = if endpoint.family == FAMILY_V4 {
        [0, 0, V4_MAPPED_WORD, endpoint.addr[0]]
    } else {
        endpoint.addr
    };
    // SAFETY: see `user_endpoint`.
    unsafe {
        if v6 {
            store(&mut (*sa).user_ip6[0], words[0]);
            store(&mut (*sa).user_ip6[1], words[1]);
            store(&mut (*sa).user_ip6[2], words[2]);
            store(&mut (*sa).user_ip6[3], words[3]);
        } else {
            store(&mut (*sa).user_ip4, endpoint.addr[0]);
        }
        store(&mut (*sa).user_port, u32::from(endpoint.port));
    }
}

/// connect and sendmsg: VIP → backend.
#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    let vip = user_endpoint(sa, v6);
    let key = ServiceKey {
        addr: vip.addr,
        port: vip.port,
        // SAFETY: a context field, see `load`.
        protocol: load(unsafe { &(*sa).protocol }) as u8,
        family: vip.family,
    };
    // SAFETY: the map is not preallocated, so an update swaps in a new element and this one
    // stays whole until the program returns (RCU): counts and shares are read consistently.
    let Some(service) = (unsafe { TP_SERVICES.get(key) }) else {
        return ALLOW;
    };
    // `loadBalancerSourceRanges`: the source of an unbound socket is not known here, so the
    // call goes on untranslated, as before the agent enforced them (never open to a source
    // the ranges leave out); the tc programs serve such a frontend to clients outside.
    if service.flags & flags::SOURCE_RANGES != 0 {
        return ALLOW;
    }

    // Counts and shares come from one entry, so emptying a tier is one write and the very
    // next call draws among the tiers left.
    let tiers = TierView::of(service);
    let Some(nearest) = tiers.nearest else {
        count_service(service.id, 0, 0, 1);
        if may_log(log_events::NO_BACKEND) {
            warn!(ctx, "no_backend svc={}", service.id);
        }
        return REJECT;
    };
    if tiers.is_fallback() && may_log(log_events::TIER_FALLBACK) {
        info!(ctx, "tier_fallback svc={} tier={}", service.id, nearest);
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (backend, affine) = match choose(ctx, service, &tiers, cookie, &vip, hook) {
        Some(chosen) => chosen,
        // A slot below the count is always filled; a miss means the agent broke the order.
        None => {
            if may_log(log_events::SLOT_MISS) {
                error!(ctx, "slot_miss svc={}", service.id);
            }
            return REJECT;
        }
    };
    set_user_endpoint(sa, v6, &backend);

    let reverse = RevNatKey {
        cookie,
        backend,
        _pad: 0,
    };
    // A full LRU evicts the oldest entry; a failure only costs the reverse view.
    let _ = TP_REV_NAT.insert(reverse, vip, u64::from(BPF_ANY));

    count_service(service.id, 1, u64::from(affine), 0);
    count_backend(service.id, backend);
    ALLOW
}

/// Which tiers of a service take new connections (kept small: the stack is 512 bytes).
struct TierView {
    /// The nearest tier with a backend; `None` when every tier is empty.
    nearest: Option<u32>,
    /// The shares of the non-empty tiers, summed; 0 when none has a share.
    total_share: u32,
    /// Whether the agent gave any tier a share (a locality policy).
    weighted: bool,
}

impl TierView {
    #[inline(always)]
    fn of(service: &Service) -> Self {
        let mut view = TierView {
            nearest: None,
            total_share: 0,
            weighted: false,
        };
        let mut tier = 0;
        while tier < MAX_TIERS {
            let share = service.tier_shares[tier];
            view.weighted |= share != 0;
            if service.tier_counts[tier] != 0 {
                if view.nearest.is_none() {
                    view.nearest = Some(tier as u32);
                }
                view.total_share = view.total_share.saturating_add(share);
            }
            tier += 1;
        }
        view
    }

    /// Served by a tier only because nearer ones (or every tier with a share) are empty.
    #[inline(always)]
    fn is_fallback(&self) -> bool {
        self.total_share == 0 && (self.weighted || self.nearest != Some(0))
    }

    /// Whether a backend at `index` of `tier` may take a new connection from this client.
    #[inline(always)]
    fn serves(&self, service: &Service, tier: u32, index: u32) -> bool {
        let (Some(&count), Some(&share)) = (
            service.tier_counts.get(tier as usize),
            service.tier_shares.get(tier as usize),
        ) else {
            return false;
        };
        if index >= u32::from(count) {
            return false;
        }
        if self.total_share == 0 {
            return self.nearest == Some(tier);
        }
        share != 0
    }

    /// The tier of a new connection, with its backend count: drawn by share among the
    /// non-empty tiers with `roll` (random, or a hash of a consistent-hash client), or the
    /// nearest non-empty one when none has a share.
    #[inline(always)]
    fn draw(&self, service: &Service, roll: u32) -> Option<(u32, u32)> {
        let nearest = self.nearest?;
        if self.total_share != 0 {
            let mut left = roll % self.total_share;
            let mut tier = 0;
            while tier < MAX_TIERS {
                let count = u32::from(service.tier_counts[tier]);
                if count != 0 {
                    let share = service.tier_shares[tier];
                    if left < share {
                        return Some((tier as u32, count));
                    }
                    left -= share;
                }
                tier += 1;
            }
        }
        let count = u32::from(*service.tier_counts.get(nearest as usize)?);
        Some((nearest, count))
    }
}

/// The backend for this client: its affine one while its tier still takes connections, else
/// one of a tier drawn by share (random, or by the client's hash and the tier's Maglev table).
#[inline(always)]
fn choose(
    ctx: &SockAddrContext,
    service: &Service,
    tiers: &TierView,
    cookie: u64,
    vip: &Endpoint,
    hook: Hook,
) -> Option<(Endpoint, bool)> {
    let timeout_ns = u64::from(service.affinity_timeout) * 1_000_000_000;
    let mut affinity = None;
    if timeout_ns != 0 {
        let key = AffinityKey {
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
            service_id: service.id,
            _pad: 0,
        };
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(entry) = TP_AFFINITY.get_ptr_mut(key) {
            // SAFETY: a pointer the map lookup returned, valid for this program run.
            let held = unsafe { *entry };
            // Another CPU may have stamped the entry after `now` was read: a stamp newer
            // than `now` is fresh, not 2^64 ns old.
            let fresh = held.last_used_ns >= now || now - held.last_used_ns <= timeout_ns;
            if fresh && tiers.serves(service, held.slot >> TIER_SHIFT, held.slot & 0xffff) {
                let slot = BackendKey {
                    service_id: service.id,
                    slot: held.slot,
                };
                // SAFETY: copied out at once.
                if let Some(backend) = unsafe { TP_BACKENDS.get(slot) } {
                    if backend.endpoint == held.backend {
                        if now > held.last_used_ns {
                            // SAFETY: as above; a racing update only moves the timestamp.
                            unsafe { (*entry).last_used_ns = now };
                        }
                        return Some((held.backend, true));
                    }
                }
            }
        }
        affinity = Some((key, now));
    }

    let client = socket_client(ctx, service, cookie);
    let (tier, count) = tiers.draw(service, roll(service, client))?;
    let start = start_index(service, tier, count, client);
    let (backend, slot) = pick(ctx, service.id, (tier, count), start, cookie, vip, hook)?;
    if let Some((key, now)) = affinity {
        let value = AffinityValue {
            backend,
            slot,
            last_used_ns: now,
        };
        let _ = TP_AFFINITY.insert(key, value, u64::from(BPF_ANY));
    }
    Some((backend, false))
}

/// The hash of the client of a consistent-hash service at the socket: its network namespace
/// (one per pod; the socket's source address is not known at connect before bind), or the
/// socket itself when the service hashes source ports (the port is not chosen yet either).
/// 0 for other services, which do not use it.
#[inline(always)]
fn socket_client(ctx: &SockAddrContext, service: &Service, socket_cookie: u64) -> u32 {
    if service.flags & flags::MAGLEV == 0 {
        return 0;
    }
    let cookie = if service.flags & flags::HASH_SOURCE_PORT != 0 {
        socket_cookie
    } else {
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    };
    client_hash(&[cookie as u32, (cookie >> 32) as u32, 0, 0], 0)
}

/// The roll that draws a new connection's tier: a hash of a consistent-hash client (it keeps
/// its tier), a random number otherwise.
#[inline(always)]
pub(crate) fn roll(service: &Service, client: u32) -> u32 {
    if service.flags & flags::MAGLEV != 0 {
        tier_roll(client)
    } else {
        unsafe { bpf_get_prandom_u32() }
    }
}

/// The index of the backend a new connection takes in `tier` (of `count` backends): the
/// client's entry in the tier's Maglev table for a consistent-hash service, else (no table:
/// more backends than it holds; or an entry beyond the count the program read) a random one.
#[inline(always)]
pub(crate) fn start_index(service: &Service, tier: u32, count: u32, client: u32) -> u32 {
    if service.flags & flags::MAGLEV != 0 {
        let key = MaglevKey {
            service_id: service.id,
            tier,
        };
        // SAFETY: the table stays whole while the program runs (RCU, see `TP_MAGLEV`).
        if let Some(table) = unsafe { TP_MAGLEV.get(key) } {
            let position = client as usize % MAGLEV_SIZE;
            // LLVM turns `%` into a multiply and shifts whose bound the verifier cannot
            // follow, and then drops `get`'s check as redundant: a volatile read hides the
            // bound from LLVM, so the check stays and the verifier sees it.
            // SAFETY: reads a local.
            let position = unsafe { core::ptr::read_volatile(&position) };
            if let Some(&index) = table.indices.get(position) {
                let index = u32::from(index);
                if index < count {
                    return index;
                }
            }
        }
    }
    (unsafe { bpf_get_prandom_u32() }) % count
}

/// The backend at `start` of `tier` and its slot. For `sendmsg`, replies carry only the backend's
/// address, so a backend this socket already reaches for another VIP would make those replies
/// ambiguous: the next few slots are tried for one that is free. If every candidate is taken
/// (the VIPs share all their backends), the first stays and the last VIP asked wins.
#[inline(always)]
fn pick(
    ctx: &SockAddrContext,
    service_id: u32,
    (tier, count): (u32, u32),
    start: u32,
    cookie: u64,
    vip: &Endpoint,
    hook: Hook,
) -> Option<(Endpoint, u32)> {
    let first = slot_backend(service_id, tier, start)?;
    if hook != Hook::Sendmsg || reply_is_free(cookie, &first, vip) {
        return Some((first, tier << TIER_SHIFT | start));
    }
    let mut step = 1;
    while step < REPLY_PROBES && step < count {
        let index = (start + step) % count;
        if let Some(candidate) = slot_backend(service_id, tier, index) {
            if reply_is_free(cookie, &candidate, vip) {
                return Some((candidate, tier << TIER_SHIFT | index));
            }
        }
        step += 1;
    }
    if may_log(log_events::REPLY_AMBIGUOUS) {
        warn!(ctx, "reply_ambiguous svc={} tier={}", service_id, tier);
    }
    Some((first, tier << TIER_SHIFT | start))
}

#[inline(always)]
fn slot_backend(service_id: u32, tier: u32, index: u32) -> Option<Endpoint> {
    let key = BackendKey {
        service_id,
        slot: tier << TIER_SHIFT | index,
    };
    // SAFETY: copied out at once.
    unsafe { TP_BACKENDS.get(key) }.map(|backend| backend.endpoint)
}

/// Whether replies from `backend` on this socket can be shown as `vip`.
#[inline(always)]
fn reply_is_free(cookie: u64, backend: &Endpoint, vip: &Endpoint) -> bool {
    let key = RevNatKey {
        cookie,
        backend: *backend,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    match unsafe { TP_REV_NAT.get(key) } {
        Some(asked) => asked == vip,
        None => true,
    }
}

/// recvmsg and getpeername: backend → the VIP this socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let key = RevNatKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend: user_endpoint(sa, v6),
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(vip) = unsafe { TP_REV_NAT.get(key) }.copied() {
        set_user_endpoint(sa, v6, &vip);
    }
    // These hooks must return 1.
    ALLOW
}

/// Whether `event` is switched on and this CPU has log budget left this second. Logging is
/// off until the agent writes `TP_LOG_CONFIG`, and capped per CPU, so a refused-connect storm
/// cannot flood the ring buffer or the agent's logs.
#[inline(always)]
pub(crate) fn may_log(event: u32) -> bool {
    let Some(config) = TP_LOG_CONFIG.get(0) else {
        return false;
    };
    if config.events & event == 0 || config.per_second == 0 {
        return false;
    }
    let Some(budget) = TP_LOG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's element; programs on one CPU do not nest here.
    unsafe {
        if now.wrapping_sub((*budget).window_start_ns) >= 1_000_000_000 {
            (*budget).window_start_ns = now;
            (*budget).emitted = 0;
        }
        if (*budget).emitted >= config.per_second {
            return false;
        }
        (*budget).emitted += 1;
    }
    true
}

#[inline(always)]
fn count_service(id: u32, translations: u64, affinity_hits: u64, no_backend: u64) {
    match TP_SVC_STATS.get_ptr_mut(id) {
        Some(stats) => {
            // SAFETY: this CPU's copy of the element; programs on one CPU do not nest here.
            unsafe {
                (*stats).translations += translations;
                (*stats).affinity_hits += affinity_hits;
                (*stats).no_backend += no_backend;
            }
        }
        None => {
            let first = ServiceStats {
                translations,
                affinity_hits,
                no_backend,
            };
            let _ = TP_SVC_STATS.insert(id, first, u64::from(BPF_NOEXIST));
        }
    }
}

#[inline(always)]
fn count_backend(service_id: u32, backend: Endpoint) {
    let key = BackendStatsKey {
        service_id,
        backend,
    };
    match TP_BE_STATS.get_ptr_mut(key) {
        // SAFETY: as in `count_service`.
        Some(stats) => unsafe { (*stats).connections += 1 },
        None => {
            let first = BackendStats { connections: 1 };
            let _ = TP_BE_STATS.insert(key, first, u64::from(BPF_NOEXIST));
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the programs contain no reachable panic; the verifier would reject one anyway.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The kernel only checks this for GPL-only helpers, which these programs do not call.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
