//! The differ: what must change in the dataplane to turn its actual table into the desired one.
//!
//! Pure and ordered make-before-break: every new or edited virtual service exists before any
//! destination is added to it, new destinations are added before old ones go, and a service is
//! deleted only after its destinations. A client therefore never meets a virtual service that
//! has lost its old backends before gaining its new ones.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::dataplane::op::destination;
use crate::dataplane::op::Op;
use crate::dataplane::{DestinationState, ProgrammedService, ProgrammedTable};
use crate::table::VsKey;

/// Changes collected per phase, then emitted in make-before-break order.
#[derive(Debug, Default)]
pub struct OpBatch {
    services: Vec<Op>,
    additions: Vec<Op>,
    edits: Vec<Op>,
    removals: Vec<Op>,
    deletions: Vec<Op>,
}

impl OpBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the changes that turn `actual` into `desired` for the virtual service `key`.
    pub fn service(
        &mut self,
        key: VsKey,
        desired: Option<&ProgrammedService>,
        actual: Option<&ProgrammedService>,
    ) {
        match (desired, actual) {
            (None, None) => {}
            (Some(desired), None) => {
                self.services.push(Op::AddService {
                    key,
                    config: Box::new(desired.config.clone()),
                });
                self.destinations(key, &desired.destinations, &BTreeMap::new());
            }
            (None, Some(actual)) => {
                self.destinations(key, &BTreeMap::new(), &actual.destinations);
                self.deletions.push(Op::DeleteService { key });
            }
            (Some(desired), Some(actual)) => {
                if desired.config != actual.config {
                    self.services.push(Op::EditService {
                        key,
                        config: Box::new(desired.config.clone()),
                    });
                }
                self.destinations(key, &desired.destinations, &actual.destinations);
            }
        }
    }

    fn destinations(
        &mut self,
        service: VsKey,
        desired: &BTreeMap<(IpAddr, u16), DestinationState>,
        actual: &BTreeMap<(IpAddr, u16), DestinationState>,
    ) {
        for (&(address, port), &state) in desired {
            let destination = destination(address, port, state);
            match actual.get(&(address, port)) {
                None => self.additions.push(Op::AddDestination {
                    service,
                    destination,
                }),
                Some(&current) if current != state => self.edits.push(Op::EditDestination {
                    service,
                    destination,
                }),
                Some(_) => {}
            }
        }
        for (&(address, port), &state) in actual {
            if !desired.contains_key(&(address, port)) {
                self.removals.push(Op::DeleteDestination {
                    service,
                    destination: destination(address, port, state),
                });
            }
        }
    }

    /// Number of changes collected.
    pub fn len(&self) -> usize {
        self.services.len()
            + self.additions.len()
            + self.edits.len()
            + self.removals.len()
            + self.deletions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.additions.is_empty()
            && self.edits.is_empty()
            && self.removals.is_empty()
            && self.deletions.is_empty()
    }

    /// The changes in the order they must be applied.
    pub fn into_ops(self) -> Vec<Op> {
        // One allocation of the final size: growing the first phase's vector into it would
        // hold a doubled copy of the initial sync's list at its peak.
        let mut ops = Vec::with_capacity(self.len());
        ops.extend(self.services);
        ops.extend(self.additions);
        ops.extend(self.edits);
        ops.extend(self.removals);
        ops.extend(self.deletions);
        ops
    }
}

/// Every change that turns `actual` into `desired`.
pub fn diff(desired: &ProgrammedTable, actual: &ProgrammedTable) -> Vec<Op> {
    let mut batch = OpBatch::new();
    for (key, service) in desired {
        batch.service(*key, Some(service), actual.get(key));
    }
    for (key, service) in actual {
        if !desired.contains_key(key) {
            batch.service(*key, None, Some(service));
        }
    }
    batch.into_ops()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::op::{apply_to, Destination};
    use crate::dataplane::ServiceConfig;
    use crate::dataplane::TierShares;
    use crate::model::Protocol;
    use crate::table::{Frontend, TrafficPolicy};

    fn key(address: &str, port: u16) -> VsKey {
        VsKey::new(Protocol::Tcp, address.parse().expect("address"), port)
    }

    fn service(scheduler: &str, destinations: &[(&str, u16, u32)]) -> ProgrammedService {
        ProgrammedService {
            config: config(scheduler),
            destinations: destinations
                .iter()
                .map(|(a, p, w)| {
                    (
                        (a.parse().expect("address"), *p),
                        DestinationState::active(*w),
                    )
                })
                .collect(),
        }
    }

    fn config(scheduler: &str) -> ServiceConfig {
        ServiceConfig {
            scheduler: crate::scheduler::Scheduler::parse(scheduler).expect("scheduler"),
            persistence_timeout: None,
            frontend: Frontend::ClusterIP,
            traffic_policy: TrafficPolicy::Cluster,
            tier_shares: TierShares::default(),
            source_ranges: Default::default(),
        }
    }

    fn table(entries: Vec<(VsKey, ProgrammedService)>) -> ProgrammedTable {
        entries.into_iter().collect()
    }

    fn position(ops: &[Op], predicate: impl Fn(&Op) -> bool) -> usize {
        ops.iter()
            .position(predicate)
            .unwrap_or_else(|| panic!("op not found in {ops:#?}"))
    }

    #[test]
    fn identical_tables_need_nothing() {
        let t = table(vec![(
            key("10.96.0.1", 80),
            service("rr", &[("10.244.0.1", 80, 1)]),
        )]);
        assert!(diff(&t, &t).is_empty());
    }

    #[test]
    fn new_service_is_created_before_its_destinations() {
        let desired = table(vec![(
            key("10.96.0.1", 80),
            service("rr", &[("10.244.0.1", 80, 1), ("10.244.0.2", 80, 1)]),
        )]);
        let ops = diff(&desired, &ProgrammedTable::new());
        assert_eq!(ops.len(), 3);
        assert!(matches!(ops[0], Op::AddService { .. }));
        assert!(ops[1..]
            .iter()
            .all(|op| matches!(op, Op::AddDestination { .. })));
    }

    #[test]
    fn removed_service_loses_its_destinations_first() {
        let actual = table(vec![(
            key("10.96.0.1", 80),
            service("rr", &[("10.244.0.1", 80, 1)]),
        )]);
        let ops = diff(&ProgrammedTable::new(), &actual);
        assert_eq!(
            ops.iter().map(Op::kind).collect::<Vec<_>>(),
            vec!["delete_destination", "delete_service"]
        );
    }

    #[test]
    fn replacement_backends_are_added_before_old_ones_go() {
        let k = key("10.96.0.1", 80);
        let actual = table(vec![(k, service("rr", &[("10.244.0.1", 80, 1)]))]);
        let desired = table(vec![(k, service("rr", &[("10.244.0.2", 80, 1)]))]);
        let ops = diff(&desired, &actual);
        let add = position(&ops, |op| matches!(op, Op::AddDestination { .. }));
        let remove = position(&ops, |op| matches!(op, Op::DeleteDestination { .. }));
        assert!(add < remove, "{ops:#?}");
    }

    #[test]
    fn across_services_every_make_precedes_every_break() {
        let (a, b, c) = (
            key("10.96.0.1", 80),
            key("10.96.0.2", 80),
            key("10.96.0.3", 80),
        );
        let actual = table(vec![
            (a, service("rr", &[("10.244.0.1", 80, 1)])),
            (b, service("rr", &[("10.244.0.2", 80, 1)])),
        ]);
        let desired = table(vec![
            (b, service("wrr", &[("10.244.0.3", 80, 2)])),
            (c, service("rr", &[("10.244.0.4", 80, 1)])),
        ]);
        let ops = diff(&desired, &actual);
        let last_make = ops
            .iter()
            .rposition(|op| {
                matches!(
                    op,
                    Op::AddService { .. } | Op::EditService { .. } | Op::AddDestination { .. }
                )
            })
            .expect("makes");
        let first_break = ops
            .iter()
            .position(|op| matches!(op, Op::DeleteDestination { .. } | Op::DeleteService { .. }))
            .expect("breaks");
        assert!(last_make < first_break, "{ops:#?}");
        assert!(ops.contains(&Op::EditService {
            key: b,
            config: Box::new(config("wrr"))
        }));
    }

    #[test]
    fn weight_and_persistence_changes_are_edits() {
        let k = key("10.96.0.1", 80);
        let actual = table(vec![(k, service("rr", &[("10.244.0.1", 80, 1)]))]);
        let mut sticky = service("rr", &[("10.244.0.1", 80, 5)]);
        sticky.config.persistence_timeout = Some(600);
        let desired = table(vec![(k, sticky)]);
        let ops = diff(&desired, &actual);
        assert_eq!(
            ops.iter().map(Op::kind).collect::<Vec<_>>(),
            vec!["edit_service", "edit_destination"]
        );
    }

    #[test]
    fn scheduler_flag_changes_are_service_edits() {
        let k = key("10.96.0.1", 80);
        let backends = [("10.244.0.1", 80, 1)];
        for (from, to) in [
            ("mh", "mh,mh-port"),
            ("mh,mh-port", "mh"),
            ("sh,sh-fallback", "sh,sh-port"),
            ("rr", "sh"),
        ] {
            let actual = table(vec![(k, service(from, &backends))]);
            let desired = table(vec![(k, service(to, &backends))]);
            assert_eq!(
                diff(&desired, &actual),
                vec![Op::EditService {
                    key: k,
                    config: Box::new(config(to))
                }],
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn applying_the_diff_converges() {
        let (a, b, c) = (
            key("10.96.0.1", 80),
            key("10.96.0.2", 80),
            key("10.96.0.3", 80),
        );
        let mut actual = table(vec![
            (a, service("rr", &[("10.244.0.1", 80, 1)])),
            (
                b,
                service("rr", &[("10.244.0.2", 80, 1), ("10.244.0.5", 80, 1)]),
            ),
        ]);
        let desired = table(vec![
            (
                b,
                service("wrr", &[("10.244.0.3", 80, 2), ("10.244.0.5", 80, 1)]),
            ),
            (c, service("rr", &[])),
        ]);
        let ops = diff(&desired, &actual);
        assert!(apply_to(&mut actual, &ops).is_empty());
        assert_eq!(actual, desired);
    }

    #[test]
    fn destinations_of_a_missing_service_are_rejected() {
        let mut empty = ProgrammedTable::new();
        let op = Op::AddDestination {
            service: key("10.96.0.1", 80),
            destination: Destination {
                address: "10.244.0.1".parse().expect("address"),
                port: 80,
                weight: 1,
                tier: 0,
                local: false,
            },
        };
        assert_eq!(apply_to(&mut empty, std::slice::from_ref(&op)), vec![op]);
    }
}
