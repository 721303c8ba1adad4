//! What the sync loop knows the dataplane holds, kept as its differences from the plan.
//!
//! After a successful sync the dataplane holds exactly the planned table in its programmed
//! form, so a full copy of it beside the node table would hold every destination twice. The
//! [`Mirror`] keeps only the virtual servers where what is held may differ from the plan:
//! before the plan of a key changes, the key's programmed form is pinned; applied changes
//! update the pinned entries; pins equal to the plan again are dropped. A dataplane read back
//! (a resync) replaces it with that read's differences from the plan.
//!
//! The plan's programmed form of a key must change only where the sync loop pins it first:
//! the node table changes only through the loop's re-plans, and what a dataplane holds of it
//! (its tier scope, whether it marks local destinations, whether it enforces source ranges)
//! does not change while it runs.

use std::collections::BTreeMap;

use crate::dataplane::op::{apply_to, Op};
use crate::dataplane::{ProgrammedService, ProgrammedTable, TierScope};
use crate::diff::OpBatch;
use crate::table::{NodeTable, VirtualServer, VsKey};

/// The node table in the form a dataplane holds it, computed per key on demand.
#[derive(Clone, Copy)]
pub struct Planned<'a> {
    pub table: &'a NodeTable,
    pub scope: TierScope,
    pub local_node: Option<&'a str>,
    /// Whether the dataplane enforces `loadBalancerSourceRanges`; firewalled frontends are
    /// withheld from one that does not.
    pub enforces_source_ranges: bool,
}

impl Planned<'_> {
    /// Whether the dataplane may be given `vs`.
    pub fn programmable(&self, vs: &VirtualServer) -> bool {
        vs.source_ranges.is_open() || self.enforces_source_ranges
    }

    /// The programmed form of the virtual server at `key`, if the plan has one for the dataplane.
    pub fn get(&self, key: &VsKey) -> Option<ProgrammedService> {
        self.table
            .get(key)
            .filter(|vs| self.programmable(vs))
            .map(|vs| ProgrammedService::from_virtual_server(vs, self.scope, self.local_node))
    }

    /// Every virtual server the dataplane may be given, in key order.
    fn servers(&self) -> impl Iterator<Item = &VirtualServer> {
        self.table.servers().filter(|vs| self.programmable(vs))
    }

    fn contains(&self, key: &VsKey) -> bool {
        self.table.get(key).is_some_and(|vs| self.programmable(vs))
    }
}

/// What the dataplane holds, as the plan plus the keys where it may differ.
#[derive(Debug, Default)]
pub struct Mirror {
    /// Keys where the dataplane may hold something else than the plan: `Some` what it holds,
    /// `None` nothing. At every other key it holds the plan's programmed form.
    pinned: BTreeMap<VsKey, Option<ProgrammedService>>,
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys where the dataplane may differ from the plan.
    pub fn pinned(&self) -> usize {
        self.pinned.len()
    }

    /// Keeps what the dataplane holds at `key`, before the plan of `key` changes.
    pub fn pin(&mut self, key: VsKey, planned: &Planned<'_>) {
        self.pinned.entry(key).or_insert_with(|| planned.get(&key));
    }

    /// Keeps what the dataplane holds at every key, before the whole plan is replaced.
    pub fn pin_all(&mut self, planned: &Planned<'_>) {
        for vs in planned.servers() {
            self.pin(vs.key, planned);
        }
    }

    /// Keeps what the dataplane holds at every key, before the plan `old` is replaced by `new`.
    pub fn pin_replaced(&mut self, old: &Planned<'_>, new: &Planned<'_>) {
        self.pin_all(old);
        // A key only the new plan has: the dataplane holds nothing there, unless pinned.
        for vs in new.servers() {
            self.pinned.entry(vs.key).or_insert(None);
        }
    }

    /// The changes that turn what the dataplane holds at `key` into the plan.
    pub fn diff_key(&self, batch: &mut OpBatch, key: VsKey, planned: &Planned<'_>) {
        if let Some(held) = self.pinned.get(&key) {
            batch.service(key, planned.get(&key).as_ref(), held.as_ref());
        }
    }

    /// Every change that turns what the dataplane holds into the plan, in the differ's order
    /// (`crate::diff::diff` of the whole plan against the whole held table).
    pub fn diff_all(&self, planned: &Planned<'_>) -> Vec<Op> {
        let mut batch = OpBatch::new();
        for (key, held) in &self.pinned {
            if let Some(desired) = planned.get(key) {
                batch.service(*key, Some(&desired), held.as_ref());
            }
        }
        for (key, held) in &self.pinned {
            if !planned.contains(key) {
                batch.service(*key, None, held.as_ref());
            }
        }
        batch.into_ops()
    }

    /// How many changes would turn `actual` back into what the dataplane should hold.
    pub fn drift(&self, actual: &ProgrammedTable, planned: &Planned<'_>) -> usize {
        let mut batch = OpBatch::new();
        for vs in planned.servers() {
            if !self.pinned.contains_key(&vs.key) {
                let held =
                    ProgrammedService::from_virtual_server(vs, planned.scope, planned.local_node);
                batch.service(vs.key, Some(&held), actual.get(&vs.key));
            }
        }
        for (key, held) in &self.pinned {
            if let Some(held) = held {
                batch.service(*key, Some(held), actual.get(key));
            }
        }
        for (key, service) in actual {
            let held = match self.pinned.get(key) {
                Some(held) => held.is_some(),
                None => planned.contains(key),
            };
            if !held {
                batch.service(*key, None, Some(service));
            }
        }
        batch.len()
    }

    /// Takes `actual`, read back from the dataplane, as what it holds.
    pub fn replace(&mut self, actual: ProgrammedTable, planned: &Planned<'_>) {
        self.pinned.clear();
        for vs in planned.servers() {
            if !actual.contains_key(&vs.key) {
                self.pinned.insert(vs.key, None);
            }
        }
        for (key, service) in actual {
            if planned.get(&key).as_ref() != Some(&service) {
                self.pinned.insert(key, Some(service));
            }
        }
    }

    /// Records `applied`, the changes the dataplane accepted, then forgets the pins that equal
    /// the plan again. One key at a time (a change concerns one virtual server alone): the
    /// initial sync's changes never build a second whole table beside the dataplane's.
    pub fn record<'a>(&mut self, applied: impl IntoIterator<Item = &'a Op>, planned: &Planned<'_>) {
        let mut by_key: BTreeMap<VsKey, Vec<&Op>> = BTreeMap::new();
        for op in applied {
            by_key.entry(op.service()).or_default().push(op);
        }
        let mut one = ProgrammedTable::new();
        for (key, ops) in by_key {
            let held = match self.pinned.remove(&key) {
                Some(pinned) => pinned,
                None => planned.get(&key),
            };
            if let Some(service) = held {
                one.insert(key, service);
            }
            apply_to(&mut one, ops);
            let held = one.remove(&key);
            if held != planned.get(&key) {
                self.pinned.insert(key, held);
            }
        }
        self.pinned
            .retain(|key, held| planned.get(key).as_ref() != held.as_ref());
    }

    /// The whole table the dataplane holds (for tests and diagnostics).
    pub fn table(&self, planned: &Planned<'_>) -> ProgrammedTable {
        let mut table: ProgrammedTable = planned
            .servers()
            .filter(|vs| !self.pinned.contains_key(&vs.key))
            .map(|vs| {
                (
                    vs.key,
                    ProgrammedService::from_virtual_server(vs, planned.scope, planned.local_node),
                )
            })
            .collect();
        for (key, held) in &self.pinned {
            if let Some(held) = held {
                table.insert(*key, held.clone());
            }
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::programmed_table;
    use crate::diff::diff;
    use crate::model::{LocalityPolicy, Node};
    use crate::planner::{plan, planned_servers, PlanConfig};
    use crate::store::Store;
    use crate::synthetic::{
        synthetic_cluster, synthetic_node_name, synthetic_service_key, with_endpoint_flipped,
        SyntheticSpec,
    };
    use std::collections::BTreeSet;

    const NODE: &str = "node-a-0";

    fn planned(table: &NodeTable) -> Planned<'_> {
        Planned {
            table,
            scope: TierScope::All,
            local_node: Some(NODE),
            enforces_source_ranges: true,
        }
    }

    fn whole(table: &NodeTable) -> ProgrammedTable {
        programmed_table(table, TierScope::All, Some(NODE))
    }

    /// Every other op goes through: a dataplane that failed half of them.
    fn half(ops: &[Op]) -> Vec<Op> {
        ops.iter().step_by(2).cloned().collect()
    }

    /// The mirror against the full held table it replaces, through a first sync, a partly
    /// failed one, re-plans of single Services, a drift count, a read back and a full re-plan.
    #[test]
    fn the_mirror_holds_what_a_full_copy_of_the_dataplane_would() {
        let mut store: Store = synthetic_cluster(&SyntheticSpec {
            services: 40,
            endpoints_per_service: 4,
            zones: 3,
            nodes_per_zone: 2,
            with_hints: true,
        });
        let node: Node = store
            .node(&synthetic_node_name(0, 0))
            .cloned()
            .expect("synthetic node");
        let config = PlanConfig::default();
        let mut table = plan(&store, &node, &config);
        let mut mirror = Mirror::new();
        let mut copy = ProgrammedTable::new();

        // First sync over an empty dataplane, half of it failing, then the rest.
        mirror.replace(ProgrammedTable::new(), &planned(&table));
        for _ in 0..2 {
            let ops = mirror.diff_all(&planned(&table));
            assert_eq!(ops, diff(&whole(&table), &copy));
            let applied = half(&ops);
            mirror.record(&applied, &planned(&table));
            apply_to(&mut copy, &applied);
            assert_eq!(mirror.table(&planned(&table)), copy);
            let (actual, trusted) = (copy.clone(), mirror.table(&planned(&table)));
            mirror.replace(actual, &planned(&table));
            assert_eq!(mirror.table(&planned(&table)), trusted);
        }
        let ops = mirror.diff_all(&planned(&table));
        mirror.record(&ops, &planned(&table));
        apply_to(&mut copy, &ops);
        mirror.record(&mirror.diff_all(&planned(&table)), &planned(&table));
        assert_eq!(copy, whole(&table));
        assert_eq!(mirror.pinned(), 0, "in sync, nothing is pinned");

        // One endpoint flipped in some Services, one Service gone; half of the ops applied.
        let mut dirty = Vec::new();
        for index in [3, 7, 11] {
            let key = synthetic_service_key(index);
            let slice = with_endpoint_flipped(&store, &key).expect("endpoint to flip");
            dirty.extend(store.upsert_slice(slice));
        }
        let gone = synthetic_service_key(20);
        store.remove_service(&gone);
        dirty.push(gone);
        let mut keys = BTreeSet::new();
        for key in &dirty {
            let servers = planned_servers(&store, key, &node, &config);
            for vs_key in table
                .claimed_keys(key)
                .iter()
                .chain(servers.iter().map(|vs| &vs.key))
            {
                mirror.pin(*vs_key, &planned(&table));
                keys.insert(*vs_key);
            }
            table.replace_service(key, servers);
        }
        let mut batch = OpBatch::new();
        for key in &keys {
            mirror.diff_key(&mut batch, *key, &planned(&table));
        }
        let ops = batch.into_ops();
        assert!(!ops.is_empty());
        assert_eq!(ops, diff(&whole(&table), &copy));
        let applied = half(&ops);
        mirror.record(&applied, &planned(&table));
        apply_to(&mut copy, &applied);
        assert_eq!(mirror.table(&planned(&table)), copy);

        // Another writer removed a virtual server and added one: the drift a full copy counts.
        let mut actual = copy.clone();
        let first = *actual.keys().next().expect("a service");
        actual.remove(&first);
        let (key, service) = copy
            .iter()
            .nth(5)
            .map(|(k, s)| (*k, s.clone()))
            .expect("6th");
        let mut stranger = key;
        stranger.port = 1;
        actual.insert(stranger, service);
        assert_eq!(
            mirror.drift(&actual, &planned(&table)),
            diff(&copy, &actual).len()
        );
        mirror.replace(actual.clone(), &planned(&table));
        copy = actual;
        assert_eq!(mirror.table(&planned(&table)), copy);

        // The whole plan replaced (another locality policy): only the mirror's pins tell.
        let zone = PlanConfig {
            default_locality: LocalityPolicy::Zone,
            ..PlanConfig::default()
        };
        let replanned = plan(&store, &node, &zone);
        mirror.pin_replaced(&planned(&table), &planned(&replanned));
        table = replanned;
        assert_eq!(mirror.table(&planned(&table)), copy);
        let ops = mirror.diff_all(&planned(&table));
        assert_eq!(ops, diff(&whole(&table), &copy));
        mirror.record(&ops, &planned(&table));
        apply_to(&mut copy, &ops);
        assert_eq!(copy, whole(&table));
        assert_eq!(mirror.table(&planned(&table)), copy);
        assert_eq!(mirror.pinned(), 0);
    }
}
