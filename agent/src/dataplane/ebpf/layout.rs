//! The slot layout: where each service's backends sit in the `BACKENDS` map and in which order
//! the maps are written so that a program never finds a counted slot empty. Pure apart from
//! the [`LbMaps`] seam, so it is tested on in-memory maps.
//!
//! # Slot layout and update order
//!
//! A service's backends sit in dense per-tier slot ranges (see `topoproxy_common`), and the
//! service entry carries the count of each tier. Programs read the entry, then one slot below
//! its counts. Every change therefore writes slots first and the entry after, and a slot is
//! deleted only once no program can still hold an entry counting it (make-before-break):
//!
//! - add: write slot `count` of the tier; the entry then counts `count + 1`;
//! - remove: copy the tier's last backend into the hole; the entry then counts `count - 1`;
//!   the old last slot keeps a live backend (the one just moved) until it is freed;
//! - tier move: add to the new tier and remove from the old one, switched by one entry write;
//! - weight change: rewrite the slot (1 write).
//!
//! Entry writes are coalesced per service within one `apply` (a cold sync writes each entry
//! once). Slots no written entry counts any more are *retired*; at the end of an `apply` one
//! grace period ([`LbMaps::grace_period`]) lets every program run that may have read an old
//! entry finish, and only then are the retired slots deleted. A retired slot written again
//! (a backend added right after one was removed) is live again and is not deleted. Service ids
//! are reused only after the grace period too, so an old entry never reads a new service's
//! slots.
//!
//! # Maglev tables
//!
//! A service whose scheduler hashes the client (`sh`, `mh`) has one Maglev table per
//! non-empty tier of at most `MAGLEV_SIZE` backends in `TP_MAGLEV` ([`super::maglev`]); its
//! entries are slot indices. A table is replaced whole in one write, before the entry that
//! counts the slots it names: removal moves the tier's last backend into the hole (the old
//! table, until replaced, sends the removed backend's clients there and everyone else where
//! they were), and an added backend's slot is written before any table names it. Tables no
//! longer wanted (a tier emptied or grown past the table, a scheduler changed, a service
//! deleted) are deleted after the entry that stops using them; the programs choose at
//! random in a tier without a table, and take an entry only when it is below the count they
//! read. The agent keeps a digest of each table the kernel holds, so an unchanged tier is not
//! rewritten.
//!
//! # Source ranges
//!
//! A load-balancer frontend's `loadBalancerSourceRanges` sit in `TP_SRC_RANGES` under its id,
//! and its entry carries a flag that makes the tc programs look there. The ranges are written
//! with the entry, in the order that never lets a program see the flag without them:
//!
//! - firewalled after the write: the new ranges are put, the entry (with the flag) written,
//!   then the ranges no longer wanted deleted (make-before-break: a flagged entry always has
//!   ranges, and in between a source either configuration allows passes, never another);
//! - open after the write: the entry (without the flag) first, the ranges deleted after;
//! - a deleted service's ranges go after its entry; any a failure left behind are deleted
//!   before an entry reusing the id is flagged (while the kernel's entry for a key is not
//!   flagged, ranges under its id not wanted are deleted before anything else).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use topoproxy_common::{self as abi, MAX_TIERS, MAX_TIER_BACKENDS, TIER_SHIFT};

use super::lb_maps::{LbMaps, LbRead};
use super::{convert, maglev, EbpfError};
use crate::dataplane::op::{Destination, Op};
use crate::dataplane::{
    error_chain, DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig,
};
use crate::table::VsKey;

/// A change the slot layout cannot make: it names what is not programmed, or does not fit.
/// The sync loop sees these as failed ops, like a refused map write.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
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

/// One backend in a slot, as the agent remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
}

/// The agent's copy of one service's map entries.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    raw_key: abi::ServiceKey,
    id: u32,
    config: ServiceConfig,
    tiers: [Vec<Slot>; MAX_TIERS],
    /// (address, port) → (tier, index).
    positions: HashMap<(IpAddr, u16), (u8, u32)>,
    /// The entry the kernel holds; `None` before the first write.
    written: Option<abi::Service>,
    /// A digest of each tier's Maglev table as the kernel holds it; `None`: no table.
    tables: [Option<u64>; MAX_TIERS],
}

impl Entry {
    fn new(raw_key: abi::ServiceKey, id: u32, config: ServiceConfig) -> Self {
        Self {
            raw_key,
            id,
            config,
            tiers: Default::default(),
            positions: HashMap::new(),
            written: None,
            tables: [None; MAX_TIERS],
        }
    }

    /// The Maglev table each tier should have: one per non-empty tier of a consistent-hash
    /// service that fits in a table, none otherwise.
    fn wanted_tables(&self) -> [Option<abi::MaglevTable>; MAX_TIERS] {
        if !convert::consistent_hash(&self.config.scheduler) {
            return [None; MAX_TIERS];
        }
        self.tiers.each_ref().map(|slots| {
            let backends: Vec<(IpAddr, u16)> =
                slots.iter().map(|slot| (slot.address, slot.port)).collect();
            maglev::table(&backends).map(|indices| abi::MaglevTable { indices: *indices })
        })
    }

    /// The id keying this service's slots and counters.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Each tier's backends in slot order, nearest tier first.
    pub fn tiers(&self) -> &[Vec<Slot>; MAX_TIERS] {
        &self.tiers
    }

    fn counts(&self) -> [u16; MAX_TIERS] {
        // A tier never exceeds MAX_TIER_BACKENDS (checked on add).
        self.tiers.each_ref().map(|tier| tier.len() as u16)
    }

    fn value(&self) -> abi::Service {
        convert::service_value(self.id, &self.config, self.counts())
    }

    /// Whether the entry the kernel holds makes the tc programs look up the source ranges.
    fn flags_source_ranges(&self) -> bool {
        self.written
            .is_some_and(|written| written.flags & abi::flags::SOURCE_RANGES != 0)
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
                            local: false,
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

pub(crate) fn backend_key(id: u32, tier: usize, index: usize) -> abi::BackendKey {
    abi::BackendKey {
        service_id: id,
        slot: (tier as u32) << TIER_SHIFT | index as u32,
    }
}

fn maglev_key(id: u32, tier: usize) -> abi::MaglevKey {
    abi::MaglevKey {
        service_id: id,
        tier: tier as u32,
    }
}

/// What the agent remembers of a table the kernel holds.
fn table_digest(table: &abi::MaglevTable) -> u64 {
    let mut hasher = DefaultHasher::new();
    table.indices.hash(&mut hasher);
    hasher.finish()
}

fn slot_position(key: &abi::BackendKey) -> (usize, u32) {
    (
        (key.slot >> TIER_SHIFT) as usize,
        key.slot & MAX_TIER_BACKENDS,
    )
}

/// The agent's copy of the service and backend maps and the rules for changing them.
#[derive(Debug, Default)]
pub(crate) struct SlotLayout {
    entries: BTreeMap<VsKey, Entry>,
    ids: IdAllocator,
    /// Services whose entry must be written before `apply` returns, with the ops that
    /// changed them (they fail together if the write does).
    pending: BTreeMap<VsKey, Vec<usize>>,
    /// Slots to delete after the next grace period (unless written again before).
    retired: HashSet<abi::BackendKey>,
    /// Ids of deleted services, reusable after the next grace period.
    retired_ids: Vec<u32>,
    /// The source ranges the kernel holds, by service id (firewalled services, and ranges a
    /// failed delete left under an id).
    ranges: BTreeMap<u32, BTreeSet<IpNetwork>>,
    /// Ids whose ranges no entry uses any more: deleted at the end of the next `apply`.
    stale_ranges: BTreeSet<u32>,
    /// Maglev tables of deleted services (or found under no entry): deleted at the end of the
    /// next `apply` unless an entry holding the id wrote its own since.
    stale_tables: BTreeSet<abi::MaglevKey>,
    map_writes: u64,
}

impl SlotLayout {
    /// Reads the layout back from the maps and frees slots no service counts (left by an
    /// agent stopped mid-change).
    pub fn read(maps: &mut impl LbMaps) -> Result<Self, EbpfError> {
        let mut layout = Self::default();
        layout.reload(maps)?;
        layout.retire_orphans(maps)?;
        layout.release_retired(maps);
        layout.sweep_stale_ranges(maps);
        layout.sweep_stale_tables(maps);
        Ok(layout)
    }

    /// Map updates and deletes issued so far (a cost measure: one endpoint change is O(1)).
    pub fn map_writes(&self) -> u64 {
        self.map_writes
    }

    /// The services, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&VsKey, &Entry)> {
        self.entries.iter()
    }

    /// The table as the layout holds it.
    pub fn table(&self) -> ProgrammedTable {
        self.entries
            .iter()
            .map(|(key, entry)| (*key, entry.programmed()))
            .collect()
    }

    /// Rebuilds the agent's copy of the table from the maps, and rewrites the entries that
    /// count a missing slot so that they count only what is there (the agent's own repair;
    /// `topoproxy list` decodes with [`decode`] and writes nothing).
    pub fn reload(&mut self, maps: &mut impl LbMaps) -> Result<(), EbpfError> {
        let mut entries = BTreeMap::new();
        let mut repairs = Vec::new();
        let mut ranges: BTreeMap<u32, BTreeSet<IpNetwork>> = BTreeMap::new();
        for (id, range) in maps.source_ranges()? {
            ranges.entry(id).or_default().insert(range);
        }
        for service in decode(maps)? {
            let mut entry = Entry::new(service.raw_key, service.value.id, service.config);
            entry.written = Some(service.value);
            for (tier, slots) in service.tiers.into_iter().enumerate() {
                for (index, slot) in slots.iter().enumerate() {
                    entry
                        .positions
                        .insert((slot.address, slot.port), (tier as u8, index as u32));
                }
                entry.tiers[tier] = slots;
            }
            if !service.complete {
                repairs.push(service.key);
            }
            entries.insert(service.key, entry);
        }
        let in_use = entries
            .values()
            .map(|entry| entry.id)
            .chain(self.retired_ids.iter().copied());
        self.ids = IdAllocator::from_used(in_use);
        // Ranges no program looks up: under an id no entry holds or one whose entry is not
        // flagged (an agent stopped mid-delete, a failed delete).
        let flagged: BTreeSet<u32> = entries
            .values()
            .filter(|entry| entry.flags_source_ranges())
            .map(|entry| entry.id)
            .collect();
        self.stale_ranges = ranges
            .keys()
            .filter(|id| !flagged.contains(id))
            .copied()
            .collect();
        let mut stale_tables = BTreeSet::new();
        let by_id: HashMap<u32, VsKey> = entries
            .iter()
            .map(|(key, entry)| (entry.id, *key))
            .collect();
        for (table_key, table) in maps.maglev_tables()? {
            let tier = table_key.tier as usize;
            match by_id.get(&table_key.service_id) {
                Some(key) if tier < MAX_TIERS => {
                    if let Some(entry) = entries.get_mut(key) {
                        entry.tables[tier] = Some(table_digest(&table));
                    }
                }
                _ => {
                    stale_tables.insert(table_key);
                }
            }
        }
        // Tables that differ from what the slots give (an agent stopped between a slot write
        // and the table's) are rewritten, those not wanted deleted, by the entry's flush.
        for (key, entry) in &entries {
            let wanted = entry
                .wanted_tables()
                .map(|table| table.as_ref().map(table_digest));
            if wanted != entry.tables {
                repairs.push(*key);
            }
        }
        self.stale_tables = stale_tables;
        self.ranges = ranges;
        self.entries = entries;
        self.pending.clear();
        for key in repairs {
            self.pending.insert(key, Vec::new());
        }
        if !self.pending.is_empty() {
            self.flush_all(maps, &mut Vec::new());
        }
        Ok(())
    }

    /// Applies `ops` in order. Returns the ops that failed (index and reason); after a
    /// failure the layout is read back from the maps, which stay consistent either way.
    pub fn apply(
        &mut self,
        maps: &mut impl LbMaps,
        ops: &[Op],
    ) -> Result<(), Vec<(usize, String)>> {
        let mut failures: Vec<(usize, String)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            if let Err(error) = self.apply_op(maps, op, index) {
                failures.push((index, error_chain(&error)));
            }
        }
        self.flush_all(maps, &mut failures);
        self.sweep_stale_ranges(maps);
        self.sweep_stale_tables(maps);
        self.release_retired(maps);
        if failures.is_empty() {
            return Ok(());
        }
        // The agent's copy may no longer match the kernel: read the truth back.
        if let Err(error) = self.reload(maps) {
            tracing::warn!(error = %error_chain(&error), "re-reading the eBPF maps after a failed apply failed");
        }
        failures.sort_by_key(|(index, _)| *index);
        failures.dedup_by_key(|(index, _)| *index);
        Err(failures)
    }

    /// Retires backend slots no service counts.
    fn retire_orphans(&mut self, maps: &mut impl LbMaps) -> Result<(), EbpfError> {
        let counted = self.written_counts();
        for key in maps.backend_keys()? {
            if !is_counted(&counted, &key) {
                self.retired.insert(key);
            }
        }
        Ok(())
    }

    /// What the kernel's entries count, by service id.
    fn written_counts(&self) -> HashMap<u32, [u16; MAX_TIERS]> {
        self.entries
            .values()
            .filter_map(|entry| Some((entry.id, entry.written?.tier_counts)))
            .collect()
    }

    /// After one grace period, deletes the retired slots no written entry counts and frees
    /// the retired ids. What cannot be deleted now stays retired for the next `apply`.
    fn release_retired(&mut self, maps: &mut impl LbMaps) {
        if self.retired.is_empty() && self.retired_ids.is_empty() {
            return;
        }
        let counted = self.written_counts();
        let deletable: Vec<abi::BackendKey> = self
            .retired
            .iter()
            .filter(|key| !is_counted(&counted, key))
            .copied()
            .collect();
        if deletable.is_empty() && self.retired_ids.is_empty() {
            return;
        }
        if let Err(error) = maps.grace_period() {
            tracing::warn!(error = %error_chain(&error), "no grace period; retired backend slots stay until the next apply");
            return;
        }
        for key in deletable {
            self.map_writes += 1;
            match maps.delete_backend(&key) {
                Ok(()) => {
                    self.retired.remove(&key);
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), ?key, "deleting a retired backend slot failed; retrying at the next apply");
                }
            }
        }
        for id in std::mem::take(&mut self.retired_ids) {
            self.ids.release(id);
        }
    }

    fn write_backend_slot(
        &mut self,
        maps: &mut impl LbMaps,
        key: abi::BackendKey,
        slot: &Slot,
    ) -> Result<(), EbpfError> {
        let backend = abi::Backend {
            endpoint: convert::endpoint(slot.address, slot.port),
            weight: slot.weight,
        };
        self.map_writes += 1;
        maps.put_backend(key, backend)?;
        // Live again: an entry will count it.
        self.retired.remove(&key);
        Ok(())
    }

    fn delete_backend_stats(
        &mut self,
        maps: &mut impl LbMaps,
        id: u32,
        address: IpAddr,
        port: u16,
    ) {
        let key = abi::BackendStatsKey {
            service_id: id,
            backend: convert::endpoint(address, port),
        };
        self.map_writes += 1;
        maps.delete_backend_stats(&key);
    }

    /// Writes a service's entry if it differs from what the kernel holds, and its source
    /// ranges around it (see the module's documentation for the order).
    fn flush(&mut self, maps: &mut impl LbMaps, key: &VsKey) -> Result<(), EbpfError> {
        self.pending.remove(key);
        let entry = self.entries.get(key).ok_or(LayoutError::NoService(*key))?;
        let (id, raw_key, value) = (entry.id, entry.raw_key, entry.value());
        let unchanged = entry.written == Some(value);
        let flagged = entry.flags_source_ranges();
        let wanted: BTreeSet<IpNetwork> =
            entry.config.source_ranges.allowed.iter().copied().collect();
        if let Some(range) = wanted
            .iter()
            .find(|range| range.is_ipv4() != key.address.is_ipv4())
        {
            return Err(LayoutError::FamilyMismatch {
                address: range.ip(),
            }
            .into());
        }
        if !flagged {
            // No program looks at these ranges yet; whatever the id still holds (a deleted
            // service's, a failed delete's) must go before a flag makes them count, and every
            // wanted one is written, whatever the agent's record says.
            self.delete_ranges_but(maps, id, &wanted)?;
            if let Some(held) = self.ranges.get_mut(&id) {
                held.clear();
            }
        }
        self.put_ranges(maps, id, &wanted)?;
        let tables = self.put_tables(maps, key)?;
        if !unchanged {
            self.map_writes += 1;
            maps.put_service(raw_key, value)?;
            if let Some(entry) = self.entries.get_mut(key) {
                entry.written = Some(value);
            }
        }
        self.delete_ranges_but(maps, id, &wanted)?;
        self.delete_unwanted_tables(maps, key, &tables)
    }

    /// Writes the Maglev tables of `key` that differ from what the kernel holds (before the
    /// entry: see the module's documentation), and returns which tiers want one.
    fn put_tables(
        &mut self,
        maps: &mut impl LbMaps,
        key: &VsKey,
    ) -> Result<[bool; MAX_TIERS], EbpfError> {
        let entry = self.entries.get(key).ok_or(LayoutError::NoService(*key))?;
        let id = entry.id;
        let wanted = entry.wanted_tables();
        for (tier, table) in wanted.iter().enumerate() {
            let Some(table) = table else {
                continue;
            };
            let digest = table_digest(table);
            if entry_table(&self.entries, key, tier) == Some(digest) {
                continue;
            }
            self.map_writes += 1;
            maps.put_maglev_table(maglev_key(id, tier), table)?;
            self.stale_tables.remove(&maglev_key(id, tier));
            if let Some(entry) = self.entries.get_mut(key) {
                entry.tables[tier] = Some(digest);
            }
        }
        Ok(wanted.each_ref().map(Option::is_some))
    }

    /// Deletes the Maglev tables of `key` no tier wants (after the entry that stops using
    /// them).
    fn delete_unwanted_tables(
        &mut self,
        maps: &mut impl LbMaps,
        key: &VsKey,
        wanted: &[bool; MAX_TIERS],
    ) -> Result<(), EbpfError> {
        for (tier, &wants) in wanted.iter().enumerate() {
            let Some(entry) = self.entries.get(key) else {
                return Ok(());
            };
            if wants || entry.tables[tier].is_none() {
                continue;
            }
            let id = entry.id;
            self.map_writes += 1;
            maps.delete_maglev_table(&maglev_key(id, tier))?;
            if let Some(entry) = self.entries.get_mut(key) {
                entry.tables[tier] = None;
            }
        }
        Ok(())
    }

    /// Deletes the tables of deleted services, unless an entry now holding the id wrote its
    /// own under the key since. What cannot be deleted now is tried again at the next `apply`.
    fn sweep_stale_tables(&mut self, maps: &mut impl LbMaps) {
        for key in std::mem::take(&mut self.stale_tables) {
            let held = self.entries.values().any(|entry| {
                entry.id == key.service_id
                    && entry
                        .tables
                        .get(key.tier as usize)
                        .is_some_and(Option::is_some)
            });
            if held {
                continue;
            }
            self.map_writes += 1;
            if let Err(error) = maps.delete_maglev_table(&key) {
                tracing::warn!(error = %error_chain(&error), ?key, "deleting a deleted service's Maglev table failed; retrying at the next apply");
                self.stale_tables.insert(key);
            }
        }
    }

    /// Puts the ranges of `wanted` the kernel does not hold under `id` yet. The agent's record
    /// follows each write, so a failure leaves it true.
    fn put_ranges(
        &mut self,
        maps: &mut impl LbMaps,
        id: u32,
        wanted: &BTreeSet<IpNetwork>,
    ) -> Result<(), EbpfError> {
        for range in wanted {
            if self
                .ranges
                .get(&id)
                .is_some_and(|held| held.contains(range))
            {
                continue;
            }
            self.map_writes += 1;
            maps.put_source_range(id, *range)?;
            self.ranges.entry(id).or_default().insert(*range);
        }
        Ok(())
    }

    /// Deletes the ranges the kernel holds under `id` that are not in `wanted`.
    fn delete_ranges_but(
        &mut self,
        maps: &mut impl LbMaps,
        id: u32,
        wanted: &BTreeSet<IpNetwork>,
    ) -> Result<(), EbpfError> {
        let Some(held) = self.ranges.get(&id) else {
            return Ok(());
        };
        let unwanted: Vec<IpNetwork> = held.difference(wanted).copied().collect();
        for range in unwanted {
            self.map_writes += 1;
            maps.delete_source_range(id, range)?;
            if let Some(held) = self.ranges.get_mut(&id) {
                held.remove(&range);
            }
        }
        if self.ranges.get(&id).is_some_and(BTreeSet::is_empty) {
            self.ranges.remove(&id);
        }
        Ok(())
    }

    /// Deletes the ranges no program looks up (a deleted service's, or left under an entry
    /// without the flag). What cannot be deleted now is tried again at the next `apply`, and
    /// a service flagged under the id first deletes what it does not want.
    fn sweep_stale_ranges(&mut self, maps: &mut impl LbMaps) {
        for id in std::mem::take(&mut self.stale_ranges) {
            if self
                .entries
                .values()
                .any(|entry| entry.id == id && entry.flags_source_ranges())
            {
                // Programs look them up: the entry's own flush writes them.
                continue;
            }
            if let Err(error) = self.delete_ranges_but(maps, id, &BTreeSet::new()) {
                tracing::warn!(error = %error_chain(&error), id, "deleting a deleted service's source ranges failed; retrying at the next apply");
                self.stale_ranges.insert(id);
            }
        }
    }

    /// Writes every pending entry; a failure goes to every op that changed the service.
    fn flush_all(&mut self, maps: &mut impl LbMaps, failures: &mut Vec<(usize, String)>) {
        let pending = std::mem::take(&mut self.pending);
        for (key, ops) in pending {
            if let Err(error) = self.flush(maps, &key) {
                let reason = error_chain(&error);
                failures.extend(ops.into_iter().map(|op| (op, reason.clone())));
            }
        }
    }

    fn mark(&mut self, key: VsKey, op: usize) {
        self.pending.entry(key).or_default().push(op);
    }

    fn apply_op(&mut self, maps: &mut impl LbMaps, op: &Op, index: usize) -> Result<(), EbpfError> {
        match op {
            Op::AddService { key, config } | Op::EditService { key, config } => {
                match self.entries.get_mut(key) {
                    Some(entry) => entry.config = ServiceConfig::clone(config),
                    None if matches!(op, Op::EditService { .. }) => {
                        return Err(LayoutError::NoService(*key).into())
                    }
                    None => {
                        let id = self.ids.allocate();
                        let entry =
                            Entry::new(convert::service_key(key), id, ServiceConfig::clone(config));
                        self.entries.insert(*key, entry);
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
            } => self.put_destination(maps, *service, destination, index),
            Op::DeleteDestination {
                service,
                destination,
            } => self.remove_destination(
                maps,
                *service,
                destination.address,
                destination.port,
                index,
            ),
            Op::DeleteService { key } => self.delete_service(maps, *key),
        }
    }

    fn put_destination(
        &mut self,
        maps: &mut impl LbMaps,
        service: VsKey,
        destination: &Destination,
        index: usize,
    ) -> Result<(), EbpfError> {
        let tier = usize::from(destination.tier);
        if tier >= MAX_TIERS {
            return Err(LayoutError::TierOutOfRange {
                tier: destination.tier,
            }
            .into());
        }
        if destination.address.is_ipv4() != service.address.is_ipv4() {
            return Err(LayoutError::FamilyMismatch {
                address: destination.address,
            }
            .into());
        }
        let entry = self
            .entries
            .get(&service)
            .ok_or(LayoutError::NoService(service))?;
        let id = entry.id;
        let slot = Slot {
            address: destination.address,
            port: destination.port,
            weight: destination.weight,
        };
        match entry.positions.get(&(slot.address, slot.port)).copied() {
            Some((current, at)) if usize::from(current) == tier => {
                // Same tier: only the weight can differ.
                self.write_backend_slot(maps, backend_key(id, tier, at as usize), &slot)?;
                if let Some(entry) = self.entries.get_mut(&service) {
                    entry.tiers[tier][at as usize] = slot;
                }
                Ok(())
            }
            Some((old_tier, old_at)) => {
                // A tier move: both counts change in the one entry write at the end.
                self.append(maps, service, tier, slot, index)?;
                self.remove_slot(maps, service, usize::from(old_tier), old_at as usize, index)
            }
            None => self.append(maps, service, tier, slot, index),
        }
    }

    /// Writes `slot` at the end of `tier`; the entry counts it once written.
    fn append(
        &mut self,
        maps: &mut impl LbMaps,
        service: VsKey,
        tier: usize,
        slot: Slot,
        index: usize,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(LayoutError::NoService(service))?;
        let at = entry.tiers[tier].len();
        if at >= MAX_TIER_BACKENDS as usize {
            return Err(LayoutError::TierFull { tier: tier as u8 }.into());
        }
        let id = entry.id;
        self.write_backend_slot(maps, backend_key(id, tier, at), &slot)?;
        if let Some(entry) = self.entries.get_mut(&service) {
            entry.tiers[tier].push(slot);
            entry
                .positions
                .insert((slot.address, slot.port), (tier as u8, at as u32));
        }
        self.mark(service, index);
        Ok(())
    }

    fn remove_destination(
        &mut self,
        maps: &mut impl LbMaps,
        service: VsKey,
        address: IpAddr,
        port: u16,
        index: usize,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(LayoutError::NoService(service))?;
        let id = entry.id;
        let (tier, at) = entry
            .positions
            .get(&(address, port))
            .copied()
            .ok_or(LayoutError::NoDestination { address, port })?;
        self.remove_slot(maps, service, usize::from(tier), at as usize, index)?;
        if let Some(entry) = self.entries.get_mut(&service) {
            entry.positions.remove(&(address, port));
        }
        self.delete_backend_stats(maps, id, address, port);
        Ok(())
    }

    /// Empties slot `at` of `tier`: the tier's last backend moves into it and the old last
    /// slot is retired (it keeps the moved backend until freed, so an old entry still finds a
    /// live backend there).
    fn remove_slot(
        &mut self,
        maps: &mut impl LbMaps,
        service: VsKey,
        tier: usize,
        at: usize,
        index: usize,
    ) -> Result<(), EbpfError> {
        let entry = self
            .entries
            .get(&service)
            .ok_or(LayoutError::NoService(service))?;
        let id = entry.id;
        let Some(last) = entry.tiers[tier].len().checked_sub(1) else {
            return Ok(());
        };
        if at != last {
            let moved = entry.tiers[tier][last];
            self.write_backend_slot(maps, backend_key(id, tier, at), &moved)?;
            if let Some(entry) = self.entries.get_mut(&service) {
                entry.tiers[tier][at] = moved;
                entry
                    .positions
                    .insert((moved.address, moved.port), (tier as u8, at as u32));
            }
        }
        if let Some(entry) = self.entries.get_mut(&service) {
            entry.tiers[tier].pop();
        }
        self.retired.insert(backend_key(id, tier, last));
        self.mark(service, index);
        Ok(())
    }

    fn delete_service(&mut self, maps: &mut impl LbMaps, key: VsKey) -> Result<(), EbpfError> {
        let Some(entry) = self.entries.get(&key) else {
            return Err(LayoutError::NoService(key).into());
        };
        if entry.written.is_some() {
            self.map_writes += 1;
            maps.delete_service(&entry.raw_key)?;
        }
        self.pending.remove(&key);
        let Some(entry) = self.entries.remove(&key) else {
            return Ok(());
        };
        // The service is gone from the datapath; its slots follow after the grace period.
        for tier in 0..MAX_TIERS {
            let slots = entry.tiers[tier].len().max(entry.written_count(tier));
            for at in 0..slots {
                self.retired.insert(backend_key(entry.id, tier, at));
            }
            for slot in &entry.tiers[tier] {
                self.delete_backend_stats(maps, entry.id, slot.address, slot.port);
            }
        }
        self.map_writes += 1;
        maps.delete_service_stats(entry.id);
        for (tier, table) in entry.tables.iter().enumerate() {
            if table.is_some() {
                self.stale_tables.insert(maglev_key(entry.id, tier));
            }
        }
        if self.ranges.contains_key(&entry.id) {
            self.stale_ranges.insert(entry.id);
        }
        self.retired_ids.push(entry.id);
        Ok(())
    }
}

/// One service entry of the maps with the backends in the slots it counts.
#[derive(Debug, Clone)]
pub(crate) struct DecodedService {
    pub key: VsKey,
    pub raw_key: abi::ServiceKey,
    pub value: abi::Service,
    pub config: ServiceConfig,
    /// Each tier's backends in slot order, nearest tier first. A tier stops at its first
    /// missing or undecodable slot.
    pub tiers: [Vec<Slot>; MAX_TIERS],
    /// Whether every slot the entry counts was there (only an interrupted agent leaves a hole,
    /// or a reader racing the agent's grace period).
    pub complete: bool,
}

/// Decodes the service map and the slots each entry counts, through the read half of the
/// seam: the agent's [`SlotLayout::reload`] and `topoproxy list` share it, and it cannot write.
/// Entries with an unknown protocol are skipped.
pub(crate) fn decode(maps: &impl LbRead) -> Result<Vec<DecodedService>, EbpfError> {
    let mut ranges: HashMap<u32, Vec<IpNetwork>> = HashMap::new();
    for (id, range) in maps.source_ranges()? {
        ranges.entry(id).or_default().push(range);
    }
    let mut decoded = Vec::new();
    for (raw_key, value) in maps.services()? {
        let Some(key) = convert::vs_key(&raw_key) else {
            tracing::warn!(
                ?raw_key,
                "skipping a service entry with an unknown protocol"
            );
            continue;
        };
        let (tiers, complete) = decode_slots(maps, &key, &value)?;
        decoded.push(DecodedService {
            key,
            raw_key,
            config: convert::service_config(
                &value,
                ranges.get(&value.id).map_or(&[], Vec::as_slice),
            ),
            value,
            tiers,
            complete,
        });
    }
    Ok(decoded)
}

/// The slots `value` counts, and whether all of them were there.
fn decode_slots(
    maps: &impl LbRead,
    key: &VsKey,
    value: &abi::Service,
) -> Result<([Vec<Slot>; MAX_TIERS], bool), EbpfError> {
    let mut tiers: [Vec<Slot>; MAX_TIERS] = Default::default();
    let mut complete = true;
    for (tier, slots) in tiers.iter_mut().enumerate() {
        for index in 0..usize::from(value.tier_counts[tier]) {
            let decoded = maps
                .backend(&backend_key(value.id, tier, index))?
                .and_then(|backend| {
                    let (address, port) = convert::from_endpoint(&backend.endpoint)?;
                    Some((address, port, backend.weight))
                });
            let Some((address, port, weight)) = decoded else {
                tracing::warn!(?key, tier, index, "service counts a missing backend slot");
                complete = false;
                break;
            };
            slots.push(Slot {
                address,
                port,
                weight,
            });
        }
    }
    Ok((tiers, complete))
}

/// The digest of the table the kernel holds for one tier of `key`.
fn entry_table(entries: &BTreeMap<VsKey, Entry>, key: &VsKey, tier: usize) -> Option<u64> {
    entries.get(key).and_then(|entry| entry.tables[tier])
}

fn is_counted(counted: &HashMap<u32, [u16; MAX_TIERS]>, key: &abi::BackendKey) -> bool {
    let (tier, index) = slot_position(key);
    counted.get(&key.service_id).is_some_and(|counts| {
        counts
            .get(tier)
            .is_some_and(|&count| index < u32::from(count))
    })
}

#[cfg(test)]
mod tests;
