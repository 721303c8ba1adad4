//! The slot layout on in-memory maps: a fake that also plays a program racing the agent
//! (it remembers every service entry a program could still hold and fails any delete of a
//! slot such an entry counts), and the same fake failing its n-th write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;

use aya::maps::MapError;
use aya::sys::SyscallError;
use proptest::prelude::*;
use topoproxy_common::{self as abi, MAX_TIERS};

use super::*;
use crate::dataplane::{
    DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig, TierShares,
};
use crate::diff::diff;
use crate::model::Protocol;
use crate::table::{Frontend, TrafficPolicy, VsKey};

/// The service and backend maps in memory, checking the datapath's invariants on every write.
#[derive(Debug, Default)]
struct FakeMaps {
    services: HashMap<abi::ServiceKey, abi::Service>,
    backends: HashMap<abi::BackendKey, abi::Backend>,
    /// Every service entry a program may still hold: the current ones and every one replaced
    /// or deleted since the last grace period.
    readable: Vec<abi::Service>,
    /// Writes (puts and deletes of services and backends) so far.
    writes: usize,
    /// The write (0-based) that fails, if any.
    fail_at: Option<usize>,
    grace_periods: usize,
    service_puts: usize,
    backend_stats_deleted: Vec<abi::BackendStatsKey>,
    /// `TP_SRC_RANGES`: service id → ranges.
    source_ranges: BTreeMap<u32, BTreeSet<IpNetwork>>,
    /// The ranges a flagged entry of each service may have while the test's change is
    /// written: those of the configuration before and after it.
    permitted: HashMap<abi::ServiceKey, BTreeSet<IpNetwork>>,
    /// `TP_MAGLEV`.
    tables: HashMap<abi::MaglevKey, abi::MaglevTable>,
}

impl FakeMaps {
    fn failing_at(write: usize) -> Self {
        Self {
            fail_at: Some(write),
            ..Self::default()
        }
    }

    /// Counts a write; errors if it is the one that fails.
    fn write(&mut self, map: &'static str) -> Result<(), EbpfError> {
        let this = self.writes;
        self.writes += 1;
        if self.fail_at == Some(this) {
            let io_error = std::io::Error::from_raw_os_error(libc::ENOMEM);
            let source = MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error,
            });
            return Err(EbpfError::Map {
                map,
                call: "update",
                source: Box::new(source),
            });
        }
        Ok(())
    }

    /// A program reading any current entry flagged for source ranges finds some under its id,
    /// and only ranges the configuration before or after the change allows (never open).
    fn assert_flagged_entries_have_their_ranges(&self) {
        for (key, service) in &self.services {
            if service.flags & abi::flags::SOURCE_RANGES == 0 {
                continue;
            }
            let held = self
                .source_ranges
                .get(&service.id)
                .cloned()
                .unwrap_or_default();
            assert!(
                !held.is_empty(),
                "service {} is flagged without ranges",
                service.id
            );
            let permitted = self.permitted.get(key).cloned().unwrap_or_default();
            assert!(
                held.is_subset(&permitted),
                "service {} admits {held:?}, beyond {permitted:?}",
                service.id
            );
        }
    }

    /// A program reading a current entry flagged for consistent hashing finds a table for
    /// each tier it counts (that fits one), and a program holding any entry it may still hold
    /// finds, in the current table of a tier, only slots that are filled among those below
    /// the count it read (it takes no other: `start_index`).
    fn assert_tables_name_filled_slots(&self) {
        for service in self.services.values() {
            if service.flags & abi::flags::MAGLEV == 0 {
                continue;
            }
            for (tier, &count) in service.tier_counts.iter().enumerate() {
                if count == 0 || usize::from(count) > abi::MAGLEV_SIZE {
                    continue;
                }
                assert!(
                    self.tables.contains_key(&maglev_key(service.id, tier)),
                    "service {} counts tier {tier} without its Maglev table",
                    service.id
                );
            }
        }
        for service in self.readable.iter().chain(self.services.values()) {
            if service.flags & abi::flags::MAGLEV == 0 {
                continue;
            }
            for (tier, &count) in service.tier_counts.iter().enumerate() {
                let Some(table) = self.tables.get(&maglev_key(service.id, tier)) else {
                    continue;
                };
                for &index in table.indices.iter().filter(|&&i| i < count) {
                    let slot = backend_key(service.id, tier, usize::from(index));
                    assert!(
                        self.backends.contains_key(&slot),
                        "service {}'s Maglev table names empty slot {slot:?}",
                        service.id
                    );
                }
            }
        }
    }

    /// A program reading any current entry finds every slot it counts ("never torn").
    fn assert_counted_slots_filled(&self) {
        for service in self.services.values() {
            for key in counted_slots(service) {
                assert!(
                    self.backends.contains_key(&key),
                    "service {} counts empty slot {key:?}",
                    service.id
                );
            }
        }
    }
}

fn counted_slots(service: &abi::Service) -> impl Iterator<Item = abi::BackendKey> + '_ {
    (0..MAX_TIERS).flat_map(move |tier| {
        (0..usize::from(service.tier_counts[tier]))
            .map(move |index| backend_key(service.id, tier, index))
    })
}

impl LbRead for FakeMaps {
    fn services(&self) -> Result<Vec<(abi::ServiceKey, abi::Service)>, EbpfError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backend(&self, key: &abi::BackendKey) -> Result<Option<abi::Backend>, EbpfError> {
        Ok(self.backends.get(key).copied())
    }

    fn backend_keys(&self) -> Result<Vec<abi::BackendKey>, EbpfError> {
        Ok(self.backends.keys().copied().collect())
    }

    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, EbpfError> {
        Ok(self
            .source_ranges
            .iter()
            .flat_map(|(id, ranges)| ranges.iter().map(move |range| (*id, *range)))
            .collect())
    }
}

impl LbMaps for FakeMaps {
    fn put_service(&mut self, key: abi::ServiceKey, value: abi::Service) -> Result<(), EbpfError> {
        self.write("services")?;
        self.services.insert(key, value);
        self.service_puts += 1;
        self.readable.push(value);
        self.assert_counted_slots_filled();
        self.assert_flagged_entries_have_their_ranges();
        self.assert_tables_name_filled_slots();
        Ok(())
    }

    fn delete_service(&mut self, key: &abi::ServiceKey) -> Result<(), EbpfError> {
        self.write("services")?;
        self.services.remove(key);
        Ok(())
    }

    fn put_backend(&mut self, key: abi::BackendKey, value: abi::Backend) -> Result<(), EbpfError> {
        self.write("backends")?;
        self.backends.insert(key, value);
        Ok(())
    }

    fn delete_backend(&mut self, key: &abi::BackendKey) -> Result<(), EbpfError> {
        self.write("backends")?;
        for service in &self.readable {
            assert!(
                !counted_slots(service).any(|counted| counted == *key),
                "slot {key:?} deleted while a program may still hold service entry {service:?}"
            );
        }
        self.backends.remove(key);
        self.assert_counted_slots_filled();
        self.assert_tables_name_filled_slots();
        Ok(())
    }

    fn put_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError> {
        self.write("source_ranges")?;
        assert_eq!(range, crate::table::canonical(range), "host bits set");
        self.source_ranges.entry(id).or_default().insert(range);
        self.assert_flagged_entries_have_their_ranges();
        Ok(())
    }

    fn delete_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError> {
        self.write("source_ranges")?;
        if let Some(ranges) = self.source_ranges.get_mut(&id) {
            ranges.remove(&range);
            if ranges.is_empty() {
                self.source_ranges.remove(&id);
            }
        }
        self.assert_flagged_entries_have_their_ranges();
        Ok(())
    }

    fn maglev_tables(&self) -> Result<Vec<(abi::MaglevKey, abi::MaglevTable)>, EbpfError> {
        Ok(self.tables.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn put_maglev_table(
        &mut self,
        key: abi::MaglevKey,
        table: &abi::MaglevTable,
    ) -> Result<(), EbpfError> {
        self.write("maglev")?;
        self.tables.insert(key, *table);
        self.assert_tables_name_filled_slots();
        Ok(())
    }

    fn delete_maglev_table(&mut self, key: &abi::MaglevKey) -> Result<(), EbpfError> {
        self.write("maglev")?;
        self.tables.remove(key);
        self.assert_tables_name_filled_slots();
        Ok(())
    }

    fn delete_backend_stats(&mut self, key: &abi::BackendStatsKey) {
        self.backend_stats_deleted.push(*key);
    }

    fn delete_service_stats(&mut self, _id: u32) {}

    fn grace_period(&mut self) -> Result<(), EbpfError> {
        self.grace_periods += 1;
        self.readable = self.services.values().copied().collect();
        Ok(())
    }
}

fn vs(last_octet: u8) -> VsKey {
    VsKey::new(
        Protocol::Tcp,
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, last_octet)),
        80,
    )
}

fn backend_address(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, 0, n))
}

fn config() -> ServiceConfig {
    ServiceConfig {
        scheduler: crate::scheduler::Scheduler::default(),
        persistence_timeout: None,
        frontend: Frontend::ClusterIP,
        traffic_policy: TrafficPolicy::Cluster,
        tier_shares: TierShares::default(),
        source_ranges: Default::default(),
    }
}

/// A service with backends `(n, tier)` at 10.244.0.n:8080.
fn service(backends: &[(u8, u8)]) -> ProgrammedService {
    ProgrammedService {
        config: config(),
        destinations: backends
            .iter()
            .map(|&(n, tier)| {
                (
                    (backend_address(n), 8080),
                    DestinationState {
                        weight: 1,
                        tier,
                        local: false,
                    },
                )
            })
            .collect(),
    }
}

/// Applies the diff from what `layout` holds to `desired`.
fn sync(
    layout: &mut SlotLayout,
    maps: &mut FakeMaps,
    desired: &ProgrammedTable,
) -> Result<(), Vec<(usize, String)>> {
    let ops = diff(desired, &layout.table());
    layout.apply(maps, &ops)
}

/// What a fresh agent reads back from `maps`.
fn read_back(maps: &mut FakeMaps) -> ProgrammedTable {
    match SlotLayout::read(maps) {
        Ok(layout) => layout.table(),
        Err(error) => panic!("reading the fake maps back failed: {error}"),
    }
}

fn table(services: &[(u8, &[(u8, u8)])]) -> ProgrammedTable {
    services
        .iter()
        .map(|&(vip, backends)| (vs(vip), service(backends)))
        .collect()
}

fn slot_of(maps: &FakeMaps, vip: u8, tier: usize, index: usize) -> Option<IpAddr> {
    let id = maps.services.get(&convert::service_key(&vs(vip)))?.id;
    let backend = maps.backends.get(&backend_key(id, tier, index))?;
    convert::from_endpoint(&backend.endpoint).map(|(address, _)| address)
}

#[test]
fn a_cold_sync_fills_dense_tier_ranges_and_writes_each_entry_once() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let desired = table(&[(10, &[(1, 0), (2, 0), (3, 1)]), (11, &[(4, 2)])]);
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));

    // 4 slots + 2 entries; nothing retired, so no grace period.
    assert_eq!(maps.writes, 6);
    assert_eq!(layout.map_writes(), 6);
    assert_eq!(maps.grace_periods, 0);
    let first = maps.services[&convert::service_key(&vs(10))];
    assert_eq!(first.tier_counts[..3], [2, 1, 0]);
    assert_eq!(slot_of(&maps, 10, 1, 0), Some(backend_address(3)));
    assert_eq!(slot_of(&maps, 11, 2, 0), Some(backend_address(4)));
    assert_eq!(read_back(&mut maps), desired);
}

#[test]
fn removing_a_backend_moves_the_last_into_the_hole_and_frees_the_tail_after_a_grace_period() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let before = table(&[(10, &[(1, 0), (2, 0), (3, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
    let writes = maps.writes;

    let after = table(&[(10, &[(2, 0), (3, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &after), Ok(()));

    // Hole copy, entry, tail delete: O(1) whatever the tier's size.
    assert_eq!(maps.writes - writes, 3);
    assert_eq!(maps.grace_periods, 1);
    let at_zero = slot_of(&maps, 10, 0, 0);
    assert!(at_zero == Some(backend_address(3)) || at_zero == Some(backend_address(2)));
    assert_eq!(slot_of(&maps, 10, 0, 2), None);
    assert_eq!(maps.backends.len(), 2);
    assert_eq!(read_back(&mut maps), after);
}

#[test]
fn a_tier_move_switches_both_counts_in_one_entry_write() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let before = table(&[(10, &[(1, 0), (2, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
    let entries_before = maps.service_puts;

    let after = table(&[(10, &[(1, 0), (2, 1)])]);
    assert_eq!(sync(&mut layout, &mut maps, &after), Ok(()));

    assert_eq!(maps.service_puts - entries_before, 1);
    let entry = maps.services[&convert::service_key(&vs(10))];
    assert_eq!(entry.tier_counts[..2], [1, 1]);
    assert_eq!(read_back(&mut maps), after);
}

#[test]
fn a_slot_freed_and_refilled_in_one_apply_is_not_deleted() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let before = table(&[(10, &[(1, 0), (2, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));

    // The diff adds 3 before removing 2; apply them the other way round as well.
    let after = table(&[(10, &[(1, 0), (3, 0)])]);
    let mut ops = diff(&after, &layout.table());
    ops.reverse();
    assert_eq!(layout.apply(&mut maps, &ops), Ok(()));

    assert_eq!(read_back(&mut maps), after);
    assert_eq!(maps.backends.len(), 2);
}

#[test]
fn a_deleted_service_frees_its_slots_and_its_id_only_after_a_grace_period() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let before = table(&[(10, &[(1, 0), (2, 1)])]);
    assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
    let old_id = maps.services[&convert::service_key(&vs(10))].id;

    // Same apply: delete the service and add another one, which must not take its id.
    let after = table(&[(11, &[(3, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &after), Ok(()));

    let new_id = maps.services[&convert::service_key(&vs(11))].id;
    assert_ne!(new_id, old_id);
    assert!(maps.backends.keys().all(|key| key.service_id == new_id));
    assert_eq!(maps.backend_stats_deleted.len(), 2);
    assert_eq!(read_back(&mut maps), after);

    // After the grace period the id is free again.
    let again = table(&[(11, &[(3, 0)]), (12, &[(4, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &again), Ok(()));
    assert_eq!(maps.services[&convert::service_key(&vs(12))].id, old_id);
}

#[test]
fn reading_back_repairs_a_torn_service_and_sweeps_orphan_slots() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let before = table(&[(10, &[(1, 0), (2, 0)])]);
    assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
    let id = maps.services[&convert::service_key(&vs(10))].id;
    // What an agent killed mid-change could leave: a counted slot gone, an uncounted one left.
    maps.backends.remove(&backend_key(id, 0, 1));
    let orphan = abi::Backend {
        endpoint: convert::endpoint(backend_address(9), 8080),
        weight: 1,
    };
    maps.backends.insert(backend_key(id, 3, 0), orphan);
    maps.readable.clear();

    assert_eq!(read_back(&mut maps), table(&[(10, &[(1, 0)])]));
    assert_eq!(
        maps.services[&convert::service_key(&vs(10))].tier_counts[0],
        1
    );
    assert_eq!(maps.backends.len(), 1);
}

/// Every way one write of a change can fail.
#[test]
fn a_failed_write_keeps_the_maps_consistent_and_the_next_sync_converges() {
    let before = table(&[(10, &[(1, 0), (2, 0), (3, 1)]), (11, &[(4, 0), (5, 1)])]);
    let after = table(&[(10, &[(2, 0), (3, 0), (6, 1)]), (12, &[(7, 0)])]);
    let total = {
        let mut maps = FakeMaps::default();
        let mut layout = SlotLayout::default();
        assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
        let writes = maps.writes;
        assert_eq!(sync(&mut layout, &mut maps, &after), Ok(()));
        maps.writes - writes
    };
    assert!(total > 5);

    for failing in 0..total {
        let mut maps = FakeMaps::default();
        let mut layout = SlotLayout::default();
        assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
        maps.fail_at = Some(maps.writes + failing);

        match sync(&mut layout, &mut maps, &after) {
            // Only freeing a retired slot may fail unseen: it is retried at the next apply.
            Ok(()) => assert_eq!(read_back(&mut maps), after, "write {failing}"),
            // The layout re-read the truth: it matches what a fresh agent would read.
            Err(failures) => {
                assert!(!failures.is_empty());
                assert_eq!(layout.table(), read_back(&mut maps), "write {failing}");
            }
        }

        assert_eq!(
            sync(&mut layout, &mut maps, &after),
            Ok(()),
            "write {failing}"
        );
        assert_eq!(read_back(&mut maps), after, "write {failing}");
        let counted: usize = maps
            .services
            .values()
            .map(|s| counted_slots(s).count())
            .sum();
        assert_eq!(
            maps.backends.len(),
            counted,
            "write {failing}: slots left behind"
        );
    }
}

#[test]
fn a_failing_first_write_of_a_cold_sync_names_the_op() {
    let mut maps = FakeMaps::failing_at(0);
    let mut layout = SlotLayout::default();
    let desired = table(&[(10, &[(1, 0)])]);
    let ops = diff(&desired, &layout.table());
    let failures = match layout.apply(&mut maps, &ops) {
        Ok(()) => panic!("the failing write went unnoticed"),
        Err(failures) => failures,
    };
    let (index, reason) = &failures[0];
    assert!(matches!(ops[*index], Op::AddDestination { .. }), "{ops:?}");
    assert!(reason.contains("backends"), "{reason}");
    // The service exists without backends (connects are refused) until the next sync.
    assert!(maps
        .services
        .values()
        .all(|s| s.tier_counts == [0; MAX_TIERS]));
    assert!(maps.backends.is_empty());
}

/// A desired table over a small universe: services 10..13, backends 1..6, tiers 0..3,
/// source ranges from [`RANGES`] (none: open), scheduler `rr` or `mh` (Maglev tables).
fn any_table() -> impl Strategy<Value = ProgrammedTable> {
    let backends = proptest::collection::btree_map(1u8..7, 0u8..3, 0..6);
    let ranges = proptest::collection::btree_set(0..RANGES.len(), 0..3);
    let maglev = any::<bool>();
    proptest::collection::btree_map(10u8..13, (backends, ranges, maglev), 0..3).prop_map(
        |services| {
            services
                .into_iter()
                .map(|(vip, (backends, ranges, maglev))| {
                    let backends: Vec<(u8, u8)> = backends.into_iter().collect();
                    let ranges: Vec<&str> = ranges.into_iter().map(|i| RANGES[i]).collect();
                    let mut service = firewalled(&backends, &ranges);
                    if maglev {
                        service.config.scheduler =
                            crate::scheduler::Scheduler::parse("mh").expect("a scheduler");
                    }
                    (vs(vip), service)
                })
                .collect::<BTreeMap<_, _>>()
        },
    )
}

/// The kernel holds exactly one Maglev table per non-empty tier of each `mh` service, and
/// each is the table of the tier's backends in slot order.
fn assert_only_wanted_tables(maps: &FakeMaps, desired: &ProgrammedTable) {
    let mut expected = HashMap::new();
    for (key, service) in desired {
        if service.config.scheduler != "mh" {
            continue;
        }
        let id = maps.services[&convert::service_key(key)].id;
        for tier in 0..MAX_TIERS {
            let backends: Vec<(IpAddr, u16)> = (0..)
                .map_while(|index| {
                    let backend = maps.backends.get(&backend_key(id, tier, index))?;
                    let counted = index
                        < usize::from(maps.services[&convert::service_key(key)].tier_counts[tier]);
                    counted
                        .then(|| convert::from_endpoint(&backend.endpoint))
                        .flatten()
                })
                .collect();
            if let Some(table) = maglev::table(&backends) {
                expected.insert(maglev_key(id, tier), table);
            }
        }
    }
    assert_eq!(
        maps.tables.len(),
        expected.len(),
        "tables held: {:?}",
        maps.tables.keys()
    );
    for (key, table) in &expected {
        let held = maps.tables.get(key).map(|held| held.indices);
        assert_eq!(held.as_ref(), Some(&**table), "table {key:?}");
    }
}

/// Source ranges the tests draw from (disjoint, as the planner leaves them).
const RANGES: [&str; 4] = [
    "10.0.0.0/8",
    "192.0.2.0/24",
    "198.51.100.7/32",
    "203.0.113.0/25",
];

/// A load-balancer frontend with backends `(n, tier)` and `ranges` (none: open).
fn firewalled(backends: &[(u8, u8)], ranges: &[&str]) -> ProgrammedService {
    let mut service = service(backends);
    service.config.frontend = Frontend::LoadBalancer;
    let mut allowed: Vec<IpNetwork> = ranges
        .iter()
        .map(|range| range.parse().expect("range"))
        .collect();
    allowed.sort();
    service.config.source_ranges = crate::table::SourceRanges {
        allowed,
        from_node: false,
    };
    service
}

/// Lets a flagged entry hold the ranges of `before` or `after` while the change is written.
fn permit(maps: &mut FakeMaps, before: &ProgrammedTable, after: &ProgrammedTable) {
    maps.permitted.clear();
    for (key, service) in before.iter().chain(after) {
        maps.permitted
            .entry(convert::service_key(key))
            .or_default()
            .extend(service.config.source_ranges.allowed.iter().copied());
    }
}

/// The kernel holds exactly the ranges of the flagged entries, under their ids.
fn assert_only_flagged_ranges(maps: &FakeMaps, desired: &ProgrammedTable) {
    let expected: BTreeMap<u32, BTreeSet<IpNetwork>> = desired
        .iter()
        .filter(|(_, service)| !service.config.source_ranges.is_open())
        .map(|(key, service)| {
            let id = maps.services[&convert::service_key(key)].id;
            (
                id,
                service
                    .config
                    .source_ranges
                    .allowed
                    .iter()
                    .copied()
                    .collect(),
            )
        })
        .collect();
    assert_eq!(maps.source_ranges, expected);
}

proptest! {
    /// Any sequence of tables: each sync lands exactly, no counted slot is ever empty, and no
    /// slot an in-flight program could read is deleted; a flagged entry always has its ranges
    /// and no others (the fake panics otherwise).
    #[test]
    fn any_sequence_of_syncs_is_make_before_break(tables in proptest::collection::vec(any_table(), 1..8)) {
        let mut maps = FakeMaps::default();
        let mut layout = SlotLayout::default();
        let mut before = ProgrammedTable::new();
        for desired in &tables {
            permit(&mut maps, &before, desired);
            prop_assert_eq!(sync(&mut layout, &mut maps, desired), Ok(()));
            assert_only_flagged_ranges(&maps, desired);
            assert_only_wanted_tables(&maps, desired);
            before = desired.clone();
            prop_assert_eq!(&read_back(&mut maps), desired);
            prop_assert_eq!(&layout.table(), desired);
        }
        // Nothing but counted slots is left once the last grace period passed, and the
        // tables of a deleted service went with it.
        let counted: usize = maps.services.values().map(|s| counted_slots(s).count()).sum();
        prop_assert_eq!(maps.backends.len(), counted);
    }
}

#[test]
fn decoding_writes_nothing_and_stops_a_tier_at_a_missing_slot() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let desired = table(&[(1, &[(1, 0), (2, 0), (3, 0)]), (2, &[(4, 0)])]);
    sync(&mut layout, &mut maps, &desired).expect("sync");
    let id = maps.services[&convert::service_key(&vs(1))].id;
    // Behind the layout's back, as an agent stopped mid-change can leave it.
    maps.backends.remove(&backend_key(id, 0, 1));
    let writes = maps.writes;

    let mut decoded = decode(&maps).expect("decode");
    decoded.sort_by_key(|service| service.key);

    assert_eq!(maps.writes, writes, "decoding wrote");
    let found: Vec<(VsKey, bool, Vec<IpAddr>)> = decoded
        .iter()
        .map(|service| {
            let addresses = service.tiers[0].iter().map(|slot| slot.address).collect();
            (service.key, service.complete, addresses)
        })
        .collect();
    assert_eq!(
        found,
        vec![
            (vs(1), false, vec![backend_address(1)]),
            (vs(2), true, vec![backend_address(4)]),
        ]
    );
    // The agent's own read is the one that repairs.
    assert_eq!(
        read_back(&mut maps),
        table(&[(1, &[(1, 0)]), (2, &[(4, 0)])])
    );
    assert!(maps.writes > writes, "the agent's read repaired nothing");
}

#[test]
fn source_ranges_are_put_before_the_flag_and_deleted_after_it() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let steps: [(&[&str], usize, usize); 5] = [
        // (ranges, range writes, entry writes)
        (&[], 0, 1),
        (&["10.0.0.0/8"], 1, 1),
        (&["10.0.0.0/8", "192.0.2.0/24"], 1, 0),
        (&["192.0.2.0/24"], 1, 0),
        (&[], 1, 1),
    ];
    let mut before = ProgrammedTable::new();
    for (ranges, range_writes, entry_writes) in steps {
        let desired: ProgrammedTable = [(vs(10), firewalled(&[(1, 0)], ranges))].into();
        permit(&mut maps, &before, &desired);
        let (writes, puts) = (maps.writes, maps.service_puts);
        assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()), "{ranges:?}");
        let backend_writes = usize::from(before.is_empty());
        assert_eq!(
            (
                maps.writes - writes - backend_writes,
                maps.service_puts - puts
            ),
            (range_writes + entry_writes, entry_writes),
            "{ranges:?}"
        );
        assert_only_flagged_ranges(&maps, &desired);
        assert_eq!(read_back(&mut maps), desired);
        before = desired;
    }
    // A deleted service's ranges go with it.
    let desired: ProgrammedTable = [(vs(10), firewalled(&[(1, 0)], &["10.0.0.0/8"]))].into();
    permit(&mut maps, &before, &desired);
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    assert_eq!(
        sync(&mut layout, &mut maps, &ProgrammedTable::new()),
        Ok(())
    );
    assert!(maps.source_ranges.is_empty());
    assert!(maps.services.is_empty());
}

#[test]
fn a_reused_id_never_admits_the_ranges_its_last_service_left() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let first: ProgrammedTable = [(vs(10), firewalled(&[(1, 0)], &["10.0.0.0/8"]))].into();
    permit(&mut maps, &ProgrammedTable::new(), &first);
    assert_eq!(sync(&mut layout, &mut maps, &first), Ok(()));
    let id = maps.services[&convert::service_key(&vs(10))].id;

    // The service goes; deleting its range (the write after the entry's) fails.
    maps.fail_at = Some(maps.writes + 1);
    assert_eq!(
        sync(&mut layout, &mut maps, &ProgrammedTable::new()),
        Ok(())
    );
    assert!(maps.services.is_empty());
    assert_eq!(
        maps.source_ranges.len(),
        1,
        "the failed delete left the range"
    );

    // Another firewalled service takes the id: it must never admit 10.0.0.0/8 (the fake
    // checks every write against what this change permits).
    let second: ProgrammedTable = [(vs(11), firewalled(&[(2, 0)], &["192.0.2.0/24"]))].into();
    permit(&mut maps, &ProgrammedTable::new(), &second);
    assert_eq!(sync(&mut layout, &mut maps, &second), Ok(()));
    assert_eq!(maps.services[&convert::service_key(&vs(11))].id, id);
    assert_only_flagged_ranges(&maps, &second);
    assert_eq!(read_back(&mut maps), second);
}

#[test]
fn reading_back_sweeps_ranges_no_flagged_entry_uses() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let desired: ProgrammedTable = [
        (vs(10), firewalled(&[(1, 0)], &["10.0.0.0/8"])),
        (vs(11), firewalled(&[(2, 0)], &[])),
    ]
    .into();
    permit(&mut maps, &ProgrammedTable::new(), &desired);
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    let open_id = maps.services[&convert::service_key(&vs(11))].id;
    // What an agent stopped mid-change could leave: ranges under an unflagged entry and
    // under an id no entry holds.
    let stray: IpNetwork = "192.0.2.0/24".parse().expect("range");
    maps.source_ranges.entry(open_id).or_default().insert(stray);
    maps.source_ranges.entry(77).or_default().insert(stray);

    assert_eq!(read_back(&mut maps), desired);
    assert_only_flagged_ranges(&maps, &desired);
}

/// Every way one write of a change of source ranges can fail.
#[test]
fn a_failed_range_write_keeps_every_flagged_entry_within_its_ranges_and_converges() {
    let before: ProgrammedTable = [
        (
            vs(10),
            firewalled(&[(1, 0)], &["10.0.0.0/8", "192.0.2.0/24"]),
        ),
        (vs(11), firewalled(&[(2, 0)], &[])),
        (vs(12), firewalled(&[(3, 0)], &["198.51.100.7/32"])),
    ]
    .into();
    let after: ProgrammedTable = [
        (
            vs(10),
            firewalled(&[(1, 0)], &["192.0.2.0/24", "203.0.113.0/25"]),
        ),
        (vs(11), firewalled(&[(2, 0)], &["10.0.0.0/8"])),
        (vs(13), firewalled(&[(4, 0)], &["198.51.100.7/32"])),
    ]
    .into();
    let total = {
        let mut maps = FakeMaps::default();
        let mut layout = SlotLayout::default();
        permit(&mut maps, &ProgrammedTable::new(), &before);
        assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
        let writes = maps.writes;
        permit(&mut maps, &before, &after);
        assert_eq!(sync(&mut layout, &mut maps, &after), Ok(()));
        maps.writes - writes
    };
    assert!(total > 8);

    for failing in 0..total {
        let mut maps = FakeMaps::default();
        let mut layout = SlotLayout::default();
        permit(&mut maps, &ProgrammedTable::new(), &before);
        assert_eq!(sync(&mut layout, &mut maps, &before), Ok(()));
        permit(&mut maps, &before, &after);
        maps.fail_at = Some(maps.writes + failing);

        if sync(&mut layout, &mut maps, &after).is_err() {
            assert_eq!(layout.table(), read_back(&mut maps), "write {failing}");
        }

        assert_eq!(
            sync(&mut layout, &mut maps, &after),
            Ok(()),
            "write {failing}"
        );
        assert_eq!(read_back(&mut maps), after, "write {failing}");
        assert_only_flagged_ranges(&maps, &after);
    }
}

/// `service(backends)` with scheduler `mh`.
fn hashed(backends: &[(u8, u8)]) -> ProgrammedService {
    let mut service = service(backends);
    service.config.scheduler = crate::scheduler::Scheduler::parse("mh").expect("a scheduler");
    service
}

/// Which backend each entry of a tier's table names, as a program would resolve it.
fn resolved(maps: &FakeMaps, vip: u8, tier: usize) -> Vec<IpAddr> {
    let service = maps.services[&convert::service_key(&vs(vip))];
    let Some(table) = maps.tables.get(&maglev_key(service.id, tier)) else {
        panic!("no table for tier {tier}");
    };
    table
        .indices
        .iter()
        .map(|&index| {
            assert!(index < service.tier_counts[tier], "entry beyond the count");
            match slot_of(maps, vip, tier, usize::from(index)) {
                Some(address) => address,
                None => panic!("table names empty slot {index}"),
            }
        })
        .collect()
}

#[test]
fn an_mh_service_has_a_table_per_tier_only_while_it_hashes() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let mut desired = ProgrammedTable::new();
    desired.insert(vs(10), hashed(&[(1, 0), (2, 0), (3, 1)]));
    desired.insert(vs(11), service(&[(4, 0)]));
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    let id = maps.services[&convert::service_key(&vs(10))].id;
    let flags = maps.services[&convert::service_key(&vs(10))].flags;
    assert_ne!(flags & abi::flags::MAGLEV, 0);
    let mut held: Vec<abi::MaglevKey> = maps.tables.keys().copied().collect();
    held.sort_by_key(|key| (key.service_id, key.tier));
    assert_eq!(held, [maglev_key(id, 0), maglev_key(id, 1)]);
    assert_eq!(
        resolved(&maps, 10, 1),
        vec![backend_address(3); abi::MAGLEV_SIZE]
    );
    // An unchanged sync writes nothing, tables included.
    let writes = maps.writes;
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    assert_eq!(maps.writes, writes);
    // A fresh agent reads the same tables back and rewrites none.
    let mut fresh = match SlotLayout::read(&mut maps) {
        Ok(layout) => layout,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(sync(&mut fresh, &mut maps, &desired), Ok(()));
    assert_eq!(maps.writes, writes);

    // Back to rr: the entry stops hashing first, then the tables go.
    desired.insert(vs(10), service(&[(1, 0), (2, 0), (3, 1)]));
    assert_eq!(sync(&mut fresh, &mut maps, &desired), Ok(()));
    assert!(maps.tables.is_empty());
    assert_eq!(
        maps.services[&convert::service_key(&vs(10))].flags & abi::flags::MAGLEV,
        0
    );

    // Hashing again, then deleted: the tables go with the service.
    desired.insert(vs(10), hashed(&[(1, 0), (2, 0), (3, 1)]));
    assert_eq!(sync(&mut fresh, &mut maps, &desired), Ok(()));
    assert_eq!(maps.tables.len(), 2);
    desired.remove(&vs(10));
    assert_eq!(sync(&mut fresh, &mut maps, &desired), Ok(()));
    assert!(maps.tables.is_empty());
}

/// Through the slot layout (the last backend moves into the hole, the table is rewritten
/// before the entry): clients of the remaining backends keep theirs, within Maglev's
/// tolerance at ten backends (at most 4% move: `maglev::tests`).
#[test]
fn removing_a_backend_moves_only_its_clients_through_the_layout() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let all: Vec<(u8, u8)> = (1..=10).map(|n| (n, 0)).collect();
    let mut desired = ProgrammedTable::new();
    desired.insert(vs(10), hashed(&all));
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    let before = resolved(&maps, 10, 0);
    desired.insert(vs(10), hashed(&all[1..]));
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    let after = resolved(&maps, 10, 0);
    let removed = backend_address(1);
    assert!(!after.contains(&removed));
    let needless = before
        .iter()
        .zip(&after)
        .filter(|(old, new)| **old != removed && old != new)
        .count();
    assert!(
        needless * 100 <= abi::MAGLEV_SIZE * 4,
        "{needless} of {} clients of other backends moved",
        abi::MAGLEV_SIZE
    );
}

#[test]
fn reading_back_rewrites_a_table_an_interrupted_agent_left_stale() {
    let mut maps = FakeMaps::default();
    let mut layout = SlotLayout::default();
    let mut desired = ProgrammedTable::new();
    desired.insert(vs(10), hashed(&[(1, 0), (2, 0)]));
    assert_eq!(sync(&mut layout, &mut maps, &desired), Ok(()));
    let id = maps.services[&convert::service_key(&vs(10))].id;
    // As if the agent died before the table write: every entry names slot 0, and a table
    // is left under an id no service holds.
    maps.tables.insert(
        maglev_key(id, 0),
        abi::MaglevTable {
            indices: [0; abi::MAGLEV_SIZE],
        },
    );
    maps.tables.insert(
        maglev_key(id + 7, 0),
        abi::MaglevTable {
            indices: [0; abi::MAGLEV_SIZE],
        },
    );
    assert_eq!(read_back(&mut maps), desired);
    assert_only_wanted_tables(&maps, &desired);
}
