//! The eBPF dataplane: socket-level load balancing by cgroup `sock_addr` programs (`ebpf/`)
//! that read Services and backends from pinned BPF maps, which this module writes.
//!
//! It holds every tier of a service ([`TierScope::All`]): the datapath serves the nearest
//! non-empty tier by itself, so emptying a tier is one map write and the very next connect
//! lands in the next tier, without waiting for the agent.
//!
//! # Slot layout and update order
//!
//! A service's backends sit in dense per-tier slot ranges (see `topoproxy_common`), and the
//! service entry carries the count of each tier. Programs only read slots below the counts.
//! Every change therefore writes slots first and the service entry after, and deletes a slot
//! only once the entry no longer counts it:
//!
//! - add: write slot `count` of the tier, then the entry with `count + 1` (2 writes);
//! - remove: copy the tier's last backend into the hole, write the entry with `count - 1`,
//!   delete the old last slot, drop the backend's counters (≤ 4 writes);
//! - tier move: add to the new tier, remove from the old one;
//! - weight change: rewrite the slot (1 write).
//!
//! Within one `apply`, entry writes are coalesced per service (a cold sync writes each entry
//! once), but an entry is always written before a slot it stops counting is deleted.

mod convert;
pub mod loader;

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};
use topoproxy_common::{
    maps, AffinityKey, AffinityValue, Backend, BackendKey, BackendStats, BackendStatsKey, Endpoint,
    RevNatKey, Service, ServiceKey, ServiceStats, MAX_TIERS, MAX_TIER_BACKENDS, TIER_SHIFT,
};

use crate::diff::{Destination, Op};
use crate::table::VsKey;

pub use loader::{cgroup2_mount, cleanup, CleanupReport, LoadReport, PROGRAMS};

use super::{
    error_chain, Dataplane, DataplaneError, DestinationState, ProgrammedService, ProgrammedTable,
    ServiceConfig, ServiceTraffic, TierScope,
};

const NAME: &str = "ebpf";

/// Where the eBPF dataplane pins its objects unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/topoproxy";

/// Where the eBPF dataplane pins its objects and which cgroup it attaches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfSettings {
    /// A directory on bpffs holding our maps, programs and links.
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory to attach to; `None` means the cgroup v2 root (found in
    /// `/proc/self/mountinfo`), which covers every process on the node.
    pub cgroup_path: Option<PathBuf>,
}

impl Default for EbpfSettings {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            cgroup_path: None,
        }
    }
}

impl EbpfSettings {
    /// The cgroup to attach to.
    pub fn cgroup(&self) -> Result<PathBuf, EbpfError> {
        match &self.cgroup_path {
            Some(path) => Ok(path.clone()),
            None => cgroup2_mount(),
        }
    }
}

/// Why the eBPF dataplane failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{call} {path} failed")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("loading the eBPF object (maps pinned in {pin_dir}) failed")]
    Load {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {program} failed")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{0} is not attached through a bpf_link (kernel 5.7 or later needed to pin it)")]
    NoBpfLink(&'static str),
    #[error("pinning {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{call} on map {map} failed")]
    Map {
        map: &'static str,
        call: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("service {0:?} is not programmed")]
    NoService(VsKey),
    #[error("destination {address}:{port} is not programmed")]
    NoDestination { address: IpAddr, port: u16 },
    #[error("tier {tier} is beyond the {MAX_TIERS} tiers a service can hold")]
    TierOutOfRange { tier: u8 },
    #[error("tier {tier} already holds {MAX_TIER_BACKENDS} backends")]
    TierFull { tier: u8 },
    #[error("destination {address} is not of the service's address family")]
    FamilyMismatch { address: IpAddr },
}

/// The maps, opened from their pins.
pub(crate) struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    backends: HashMap<MapData, BackendKey, Backend>,
    #[allow(dead_code)] // Written by the programs only; kept open for inspection in tests.
    rev_nat: HashMap<MapData, RevNatKey, Endpoint>,
    #[allow(dead_code)]
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    service_stats: PerCpuHashMap<MapData, u32, ServiceStats>,
    backend_stats: PerCpuHashMap<MapData, BackendStatsKey, BackendStats>,
}

/// One backend in a slot, as the agent remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    address: IpAddr,
    port: u16,
    weight: u32,
}

/// The agent's copy of one service's maps entries.
#[derive(Debug, Clone)]
struct Entry {
    raw_key: ServiceKey,
    id: u32,
    config: ServiceConfig,
    tiers: [Vec<Slot>; MAX_TIERS],
    /// (address, port) → (tier, index).
    positions: StdHashMap<(IpAddr, u16), (u8, u32)>,
    /// The entry the kernel holds; `None` before the first write.
    written: Option<Service>,
}

impl Entry {
    fn counts(&self) -> [u16; MAX_TIERS] {
        // A tier never exceeds MAX_TIER_BACKENDS (checked on add).
        self.tiers.each_ref().map(|tier| tier.len() as u16)
    }

    fn value(&self) -> Service {
        convert::service_value(self.id, &self.config, self.counts())
    }

    /// How many slots of `tier` the kernel counts.
    fn written_count(&self, tier: usize) -> usize {
        self.written
            .map(|value| usize::from(value.tier_counts[tier]))
            .unwrap_or(0)
    }

    fn programmed(&self) -> ProgrammedService {
        let destinations = self
            .tiers
            .iter()
            .zip(0u8..)
            .flat_map(|(slots, tier)| {
                slots.iter().map(move |slot| {
                    (
                        (slot.address, slot.port),
                        DestinationState {
                            weight: slot.weight,
                            tier,
                        },
                    )
                })
            })
            .collect();
        ProgrammedService {
            config: self.config.clone(),
            destinations,
        }
    }
}

/// Counters of one service, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connects and unconnected datagrams translated to a backend.
    pub translations: u64,
    /// Of those, how many followed session affinity.
    pub affinity_hits: u64,
    /// Connects refused because every tier was empty.
    pub no_backend: u64,
}

/// One backend in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBackend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// 0 is the nearest tier.
    pub tier: u8,
    /// Whether the datapath currently picks from this backend's tier.
    pub active: bool,
    /// Connects (and unconnected datagrams) sent to it.
    pub connections: u64,
}

/// One service in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedService {
    pub key: VsKey,
    pub config: ServiceConfig,
    /// The id keying its slots and counters in the maps.
    pub id: u32,
    pub counters: ServiceCounters,
    /// Nearest tier first, slot order within a tier.
    pub backends: Vec<ListedBackend>,
}

/// The table as the maps hold it, with counters: what `topoproxy list` renders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub services: Vec<ListedService>,
}

/// The eBPF dataplane. Dropping it leaves everything pinned and attached.
pub struct EbpfDataplane {
    settings: EbpfSettings,
    maps: Maps,
    load_report: LoadReport,
    entries: BTreeMap<VsKey, Entry>,
    ids: IdAllocator,
    /// Services whose entry must be written before `apply` returns, with the ops that
    /// changed them (they fail together if the write does).
    pending: BTreeMap<VsKey, Vec<usize>>,
    map_writes: u64,
}

#[derive(Debug, Default)]
struct IdAllocator {
    next: u32,
    free: BTreeSet<u32>,
}

impl IdAllocator {
    fn from_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(0, |last| last + 1);
        let free = (0..next).filter(|id| !used.contains(id)).collect();
        Self { next, free }
    }

    fn allocate(&mut self) -> u32 {
        self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

fn map_error(map: &'static str, call: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        map,
        call,
        source: Box::new(source),
    }
}

fn is_missing(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(syscall) => syscall.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn backend_key(id: u32, tier: usize, index: usize) -> BackendKey {
    BackendKey {
        service_id: id,
        slot: (tier as u32) << TIER_SHIFT | index as u32,
    }
}

impl EbpfDataplane {
    /// Loads (or adopts) the programs and maps and reads the table back from the maps.
    pub fn open(settings: EbpfSettings) -> Result<Self, EbpfError> {
        let (maps, load_report) = loader::load(&settings)?;
        let mut dataplane = Self {
            settings,
            maps,
            load_report,
            entries: BTreeMap::new(),
            ids: IdAllocator::default(),
            pending: BTreeMap::new(),
            map_writes: 0,
        };
        dataplane.reload()?;
        dataplane.sweep_orphans()?;
        Ok(dataplane)
    }

    /// What opening found: adopted or freshly attached programs.
    pub fn load_report(&self) -> &LoadReport {
        &self.load_report
    }

    pub fn settings(&self) -> &EbpfSettings {
        &self.settings
    }

    /// Map updates and deletes issued so far (a cost measure: one endpoint change is O(1)).
    pub fn map_writes(&self) -> u64 {
        self.map_writes
    }

    /// Rebuilds the agent's copy of the table from the maps.
    fn reload(&mut self) -> Result<(), EbpfError> {
        let mut entries = BTreeMap::new();
        let mut repairs = Vec::new();
        for item in self.maps.services.iter() {
            let (raw_key, value) = item.map_err(map_error(maps::SERVICES, "iterate"))?;
            let Some(key) = convert::vs_key(&raw_key) else {
                tracing::warn!(
                    ?raw_key,
                    "skipping a service entry with an unknown protocol"
                );
                continue;
            };
            let mut entry = Entry {
                raw_key,
                id: value.id,
                config: convert::service_config(&value),
                tiers: Default::default(),
                positions: StdHashMap::new(),
                written: Some(value),
            };
            for tier in 0..MAX_TIERS {
                for index in 0..usize::from(value.tier_counts[tier]) {
                    let slot = match self
                        .maps
                        .backends
                        .get(&backend_key(value.id, tier, index), 0)
                    {
                        Ok(backend) => backend,
                        Err(error) if is_missing(&error) => {
                            // Only an interrupted agent leaves this; shrink the tier to what is there.
                            tracing::warn!(
                                ?key,
                                tier,
                                index,
                                "service counts a missing backend slot"
                            );
                            repairs.push(key);
                            break;
                        }
                        Err(error) => return Err(map_error(maps::BACKENDS, "lookup")(error)),
                    };
                    let Some((address, port)) = convert::from_endpoint(&slot.endpoint) else {
                        repairs.push(key);
                        break;
                    };
                    entry
                        .positions
                        .insert((address, port), (tier as u8, index as u32));
                    entry.tiers[tier].push(Slot {
                        address,
                        port,
                        weight: slot.weight,
                    });
                }
            }
            entries.insert(key, entry);
        }
        self.ids = IdAllocator::from_used(entries.values().map(|entry| entry.id));
        self.entries = entries;
        self.pending.clear();
        for key in repairs {
            self.pending.insert(key, Vec::new());
        }
        if !self.pending.is_empty() {
            self.flush_all(&mut Vec::new());
        }
        Ok(())
    }

    /// Deletes backend slots no service counts (left by an agent stopped mid-change).
    fn sweep_orphans(&mut self) -> Result<(), EbpfError> {
        let counted: StdHashMap<u32, [u16; MAX_TIERS]> = self
            .entries
            .values()
            .map(|entry| (entry.id, entry.counts()))
            .collect();
        let mut orphans = Vec::new();
        for key in self.maps.backends.keys() {
            let key = key.map_err(map_error(maps::BACKENDS, "iterate"))?;
            let tier = (key.slot >> TIER_SHIFT) as usize;
            let index = key.slot & MAX_TIER_BACKENDS;
            let live = counted.get(&key.service_id).is_some_and(|counts| {
                counts
                    .get(tier)
                    .is_some_and(|&count| index < u32::from(count))
            });
            if !live {
                orphans.push(key);
            }
        }
        for key in orphans {
            self.delete_backend_slot(&key)?;
        }
        Ok(())
    }

    fn delete_backend_slot(&mut self, key: &BackendKey) -> Result<(), EbpfError> {
        self.map_writes += 1;
        match self.maps.backends.remove(key) {
            Ok(()) => Ok(()),
            Err(error) if is_missing(&error) => Ok(()),
            Err(error) => Err(map_error(maps::BACKENDS, "delete")(error)),
        }
    }

    fn write_backend_slot(&mut self, key: BackendKey, slot: &Slot) -> Result<(), EbpfError> {
        let backend = Backend {
            endpoint: convert::endpoint(slot.address, slot.port),
            weight: slot.weight,
        };
        self.map_writes += 1;
        self.maps
            .backends
            .insert(key, backend, 0)
            .map_err(map_error(maps::BACKENDS, "update"))
    }

    fn delete_backend_stats(&mut self, id: u32, address: IpAddr, port: u16) {
        let key = BackendStatsKey {
            service_id: id,
            backend: convert::endpoint(address, port),
        };
        self.map_writes += 1;
        // Counters are best effort: a leftover only shows until the id is reused.
        let _ = self.maps.backend_stats.remove(&key);
    }

    /// Writes a service's entry if it differs from what the kernel holds.
    fn flush(&mut self, key: &VsKey) -> Result<(), EbpfError> {
        self.pending.remove(key);
        let entry = self.entries.get(key).ok_or(EbpfError::NoService(*key))?;
        let value = entry.value();
        if entry.written == Some(value) {
            return Ok(());
        }
        let raw_key = entry.raw_key;
        self.map_writes += 1;
        self.maps
            .services
            .insert(raw_key, value, 0)
            .map_err(map_error(maps::SERVICES, "update"))?;
        if let Some(entry) = self.entries.get_mut(key) {
            entry.written = Some(value);
        }
        Ok(())
    }

    /// Writes every pending entry; a failure goes to every op that changed the service.
    fn flush_all(&mut self, failures: &mut Vec<(usize, String)>) {
        let pending = std::mem::take(&mut self.pending);
        for (key, ops) in pending {
            if let Err(error) = self.flush(&key) {
                let reason = error_chain(&error);
                failures.extend(ops.into_iter().map(|op| (op, reason.clone())));
            }
        }
    }

    fn mark(&mut self, key: VsKey, op: usize) {
        self.pending.entry(key).or_default().push(op);
    }

    fn apply_op(&mut self, op: &Op, index: usize) -> Result<(), EbpfError> {
        match op {
            Op::AddService { key, config } | Op::EditService { key, config } => {
                match self.entries.get_mut(key) {
                    Some(entry) => entry.config = config.clone(),
                    None if matches!(op, Op::EditService { .. }) => {
                        return Err(EbpfError::NoService(*key))
                    }
                    None => {
                        let id = self.ids.allocate();
                        self.entries.insert(
                            *key,
                            Entry {
                                raw_key: convert::service_key(key),
                                id,
                                config: config.clone(),
                                tiers: Default::default(),
                                positions: StdHashMap::new(),
                                written: None,
                            },
                        );
                    }
                }
                self.mark(*key, index);
                Ok(())
            }
            Op::AddDestination {
                service,
                destination,
            }
            | Op::EditDestination {
                service,
                destination,
            } => self.put_destination(*service, destination, index),
            Op::DeleteDestination {
                service,
                destination,
            } => self.remove_destination(*service, destination.address, destination.port, index),
            Op::DeleteService { key } => self.delete_service(*key),
        }
    }

    fn put_destination(
        &mut self,
        service: VsKey,
        destination: &Destination,
        index: usize,
    ) -> Result<(), EbpfError> {
        let tier = usize::from(destination.tier);
        if tier >= MAX_TIERS {
            return Err(EbpfError::TierOutOfRange {
                tier: destination.tier,
            });
        }
        if destination.address.is_ipv4() != service.address.is_ipv4() {
            return Err(EbpfError::FamilyMismatch {
                address: destination.address,
            });
        }
        let entry = self
            .entries
            .get(&service)
            .ok_or(EbpfError::NoService(service))?;
        let id = entry.id;
        let slot = Slot {
            address: destination.address,
            port: destination.port,
            weight: destination.weight,
        };
        match entry.positions.get(&(slot.address, slot.port)).copied() {
            Some((current, at)) if usize::from(current) == tier => {
                // Same tier: only the weight can differ.
                self.write_backend_slot(backend_key(id, tier, at as usize), &slot)?;
                if let Some(entry) = self.entries.get_mut(&service) {
                    entry.tiers[tier][at as usize] = slot;
                }
                Ok(())
            }
            Some((old_tier, old_at)) => {
                // A tier move: count it in the new tier before it leaves the old one.
                self.append(service, tier, slot, index, true)?;
                self.remove_slot(service, usize::from(old_tier), old_at as usize, index)
            }
            None => self.append(service, tier, slot, index, false),
        }
    }

    /// Writes `slot` at the end of `tier` and counts it. The entry write is deferred unless
    /// `now` (a tier move needs it before the old slot goes).
    fn append(
        &mut self,
        service: VsKey,
        tier: usize,
        slot: Slot,
        index: usize,
        now: bool,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(EbpfError::NoService(service))?;
        let at = entry.tiers[tier].len();
        if at >= MAX_TIER_BACKENDS as usize {
            return Err(EbpfError::TierFull { tier: tier as u8 });
        }
        let id = entry.id;
        self.write_backend_slot(backend_key(id, tier, at), &slot)?;
        if let Some(entry) = self.entries.get_mut(&service) {
            entry.tiers[tier].push(slot);
            entry
                .positions
                .insert((slot.address, slot.port), (tier as u8, at as u32));
        }
        if now {
            self.flush(&service)
        } else {
            self.mark(service, index);
            Ok(())
        }
    }

    fn remove_destination(
        &mut self,
        service: VsKey,
        address: IpAddr,
        port: u16,
        index: usize,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(EbpfError::NoService(service))?;
        let id = entry.id;
        let (tier, at) = entry
            .positions
            .get(&(address, port))
            .copied()
            .ok_or(EbpfError::NoDestination { address, port })?;
        self.remove_slot(service, usize::from(tier), at as usize, index)?;
        if let Some(entry) = self.entries.get_mut(&service) {
            entry.positions.remove(&(address, port));
        }
        self.delete_backend_stats(id, address, port);
        Ok(())
    }

    /// Empties slot `at` of `tier`: the tier's last backend moves into it, the entry stops
    /// counting the last slot, then that slot is deleted.
    fn remove_slot(
        &mut self,
        service: VsKey,
        tier: usize,
        at: usize,
        index: usize,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(EbpfError::NoService(service))?;
        let id = entry.id;
        let Some(last) = entry.tiers[tier].len().checked_sub(1) else {
            return Ok(());
        };
        if at != last {
            let moved = entry.tiers[tier][last];
            self.write_backend_slot(backend_key(id, tier, at), &moved)?;
            if let Some(entry) = self.entries.get_mut(&service) {
                entry.tiers[tier][at] = moved;
                entry
                    .positions
                    .insert((moved.address, moved.port), (tier as u8, at as u32));
            }
        }
        let written = match self.entries.get_mut(&service) {
            Some(entry) => {
                entry.tiers[tier].pop();
                entry.written_count(tier)
            }
            None => 0,
        };
        // The kernel must stop counting the old last slot before it goes.
        if written > last {
            self.flush(&service)?;
        } else {
            self.mark(service, index);
        }
        self.delete_backend_slot(&backend_key(id, tier, last))
    }

    fn delete_service(&mut self, key: VsKey) -> Result<(), EbpfError> {
        let Some(entry) = self.entries.get(&key) else {
            return Err(EbpfError::NoService(key));
        };
        let (raw_key, id, written) = (entry.raw_key, entry.id, entry.written.is_some());
        self.pending.remove(&key);
        if written {
            self.map_writes += 1;
            match self.maps.services.remove(&raw_key) {
                Ok(()) => {}
                Err(error) if is_missing(&error) => {}
                Err(error) => return Err(map_error(maps::SERVICES, "delete")(error)),
            }
        }
        let Some(entry) = self.entries.remove(&key) else {
            return Ok(());
        };
        // The service is gone from the datapath; its slots and counters follow.
        for (tier, slots) in entry.tiers.iter().enumerate() {
            for (at, slot) in slots.iter().enumerate() {
                self.delete_backend_slot(&backend_key(id, tier, at))?;
                self.delete_backend_stats(id, slot.address, slot.port);
            }
        }
        self.map_writes += 1;
        let _ = self.maps.service_stats.remove(&id);
        self.ids.release(id);
        Ok(())
    }

    fn apply_sync(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        let mut failures: Vec<(usize, String)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            if let Err(error) = self.apply_op(op, index) {
                failures.push((index, error_chain(&error)));
            }
        }
        self.flush_all(&mut failures);
        if failures.is_empty() {
            return Ok(());
        }
        // The agent's copy may no longer match the kernel: read the truth back.
        if let Err(error) = self.reload() {
            tracing::warn!(error = %error, "re-reading the eBPF maps after a failed apply failed");
        }
        failures.sort_by_key(|(index, _)| *index);
        failures.dedup_by_key(|(index, _)| *index);
        Err(DataplaneError::apply_failures(NAME, ops, failures))
    }

    /// The table read back from the maps.
    pub fn table(&mut self) -> Result<ProgrammedTable, EbpfError> {
        self.reload()?;
        Ok(self
            .entries
            .iter()
            .map(|(key, entry)| (*key, entry.programmed()))
            .collect())
    }

    /// Per-service counters, summed over CPUs, for every programmed service.
    pub fn service_counters(&mut self) -> Result<Vec<(VsKey, ServiceCounters)>, EbpfError> {
        self.reload()?;
        let ids: Vec<(VsKey, u32)> = self.entries.iter().map(|(k, e)| (*k, e.id)).collect();
        ids.into_iter()
            .map(|(key, id)| Ok((key, self.counters_of(id)?)))
            .collect()
    }

    fn counters_of(&self, id: u32) -> Result<ServiceCounters, EbpfError> {
        match self.maps.service_stats.get(&id, 0) {
            Ok(values) => {
                Ok(values
                    .iter()
                    .fold(ServiceCounters::default(), |sum, v| ServiceCounters {
                        translations: sum.translations + v.translations,
                        affinity_hits: sum.affinity_hits + v.affinity_hits,
                        no_backend: sum.no_backend + v.no_backend,
                    }))
            }
            Err(error) if is_missing(&error) => Ok(ServiceCounters::default()),
            Err(error) => Err(map_error(maps::SERVICE_STATS, "lookup")(error)),
        }
    }

    fn connections_of(&self, id: u32, address: IpAddr, port: u16) -> Result<u64, EbpfError> {
        let key = BackendStatsKey {
            service_id: id,
            backend: convert::endpoint(address, port),
        };
        match self.maps.backend_stats.get(&key, 0) {
            Ok(values) => Ok(values.iter().map(|v| v.connections).sum()),
            Err(error) if is_missing(&error) => Ok(0),
            Err(error) => Err(map_error(maps::BACKEND_STATS, "lookup")(error)),
        }
    }

    /// The table read back from the maps with per-service and per-backend counters.
    pub fn list(&mut self) -> Result<Listing, EbpfError> {
        self.reload()?;
        let mut services = Vec::with_capacity(self.entries.len());
        for (key, entry) in &self.entries {
            let active = entry.tiers.iter().position(|slots| !slots.is_empty());
            let mut backends = Vec::new();
            for (tier, slots) in entry.tiers.iter().enumerate() {
                for slot in slots {
                    backends.push(ListedBackend {
                        address: slot.address,
                        port: slot.port,
                        weight: slot.weight,
                        tier: tier as u8,
                        active: active == Some(tier),
                        connections: self.connections_of(entry.id, slot.address, slot.port)?,
                    });
                }
            }
            services.push(ListedService {
                key: *key,
                config: entry.config.clone(),
                id: entry.id,
                counters: self.counters_of(entry.id)?,
                backends,
            });
        }
        Ok(Listing { services })
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tier_scope(&self) -> TierScope {
        TierScope::All
    }

    fn read(&mut self) -> impl Future<Output = Result<ProgrammedTable, DataplaneError>> + Send {
        let result = self
            .table()
            .map_err(|error| DataplaneError::read(NAME, error));
        async move { result }
    }

    fn apply(&mut self, ops: &[Op]) -> impl Future<Output = Result<(), DataplaneError>> + Send {
        let result = self.apply_sync(ops);
        async move { result }
    }

    fn kernel_requests(&self) -> Vec<(&'static str, u64)> {
        vec![("map_writes", self.map_writes)]
    }

    fn service_counters(&mut self) -> Vec<ServiceTraffic> {
        match EbpfDataplane::service_counters(self) {
            Ok(counters) => counters
                .into_iter()
                .map(|(key, c)| ServiceTraffic {
                    key,
                    translations: c.translations,
                    affinity_hits: c.affinity_hits,
                    no_backend: c.no_backend,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "reading the per-service counters failed");
                Vec::new()
            }
        }
    }
}
