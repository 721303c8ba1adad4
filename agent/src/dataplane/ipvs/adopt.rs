//! Adoption: what a read makes of what it found, decided without touching the kernel.
//!
//! A read (`IpvsDataplane::read`) asks the kernel for the nft records and for the IPVS services
//! they claim ([`IpvsRead`]); [`adopt`] turns that into the table the sync loop diffs against,
//! the records to keep, forget or hold as suspect, and which addresses the owned services need.
//! Pure, so the ownership rules (foreign services and excluded CIDRs left alone, a record
//! forgotten only when two reads agree, hairpin recovery, drains left out) are unit-tested on
//! plain values; the dataplane only carries the decisions out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::dataplane::{
    DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig, TierShares,
};
use crate::scheduler::Scheduler;
use crate::table::{Frontend, TrafficPolicy, VsKey};

use super::commands::binds_address;
use super::drain::{DrainKey, Draining};
use super::netlink::{IpvsDestination, IpvsService};
use super::nft::render::Hairpin;
use super::nft::NftState;
use super::records::{self, Probe};

/// An owned service as IPVS holds it: the service and its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadService {
    pub service: IpvsService,
    pub destinations: Vec<IpvsDestination>,
}

/// What one read found in IPVS for the recorded services outside the excluded CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsRead {
    /// The recorded services the dump listed.
    pub listed: BTreeMap<VsKey, ReadService>,
    /// The recorded services the dump did not list that a GET found (the dump skipped them).
    pub found: BTreeMap<VsKey, ReadService>,
    /// The GET answers for every recorded service the dump did not list; a key without an
    /// answer is one whose GET failed.
    pub probes: BTreeMap<VsKey, Probe>,
}

/// What the read's judgement starts from, besides what it found.
pub struct Known<'a> {
    /// The records: the nft sets just read (full read) or as last written.
    pub owned: &'a NftState,
    /// On a full read, the hairpin set's elements: which destinations are node-local is
    /// rebuilt from them. `None`: `owned.destinations` is current.
    pub hairpins: Option<&'a BTreeSet<Hairpin>>,
    pub exclude_cidrs: &'a [IpNetwork],
    /// Services asked for inside the excluded CIDRs: reported as asked, never programmed.
    pub excluded: &'a BTreeMap<VsKey, ProgrammedService>,
    pub draining: &'a Draining,
    /// The previous read's suspect records ([`records::RecordVerdict::suspects`]).
    pub suspects: &'a BTreeSet<VsKey>,
}

/// What a read concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// The owned services as the dataplane holds them (draining destinations left out), and
    /// the excluded ones as asked.
    pub table: ProgrammedTable,
    /// The records to hold from now on: node-local destinations rebuilt on a full read, the
    /// `forget` ones removed.
    pub owned: NftState,
    /// Records whose services are gone (or that lie in the excluded CIDRs unasked).
    pub forget: BTreeSet<VsKey>,
    /// Records kept although this read did not find their services; the next read decides.
    pub suspects: BTreeSet<VsKey>,
    /// How many owned services need each address bound on the dummy link.
    pub address_users: BTreeMap<IpAddr, usize>,
}

/// Whether `address` lies in one of `cidrs`.
pub fn is_excluded(cidrs: &[IpNetwork], address: IpAddr) -> bool {
    cidrs.iter().any(|cidr| cidr.contains(address))
}

/// The recorded services a read asks IPVS about: those outside the excluded CIDRs.
pub fn readable(owned: &NftState, cidrs: &[IpNetwork]) -> BTreeSet<VsKey> {
    owned
        .services
        .keys()
        .filter(|key| !is_excluded(cidrs, key.address))
        .copied()
        .collect()
}

/// Judges one read: see the module's rules.
pub fn adopt(known: &Known<'_>, read: &IpvsRead) -> Adoption {
    let mut owned = known.owned.clone();
    let found = read.listed.iter().chain(&read.found);
    if let Some(hairpins) = known.hairpins {
        owned.destinations.clear();
        for (key, service) in found.clone() {
            owned.destinations.extend(
                service
                    .destinations
                    .iter()
                    .filter(|d| hairpins.contains(&(d.address, key.protocol, d.port)))
                    .map(|d| (*key, d.address, d.port)),
            );
        }
    }
    let mut table = ProgrammedTable::new();
    for (key, service) in found {
        if let Some(&role) = owned.services.get(key) {
            table.insert(
                *key,
                programmed(*key, role, service, &owned, known.draining),
            );
        }
    }
    for (key, service) in known.excluded {
        table.insert(*key, service.clone());
    }
    let (forget, suspects) = judge(known, &owned, &table, read);
    owned.services.retain(|key, _| !forget.contains(key));
    owned.source_ranges.retain(|key, _| !forget.contains(key));
    owned
        .destinations
        .retain(|(key, _, _)| !forget.contains(key));
    let address_users = address_users(&owned, &table);
    Adoption {
        table,
        owned,
        forget,
        suspects,
        address_users,
    }
}

/// One owned service as the dataplane holds it, its draining destinations left out.
fn programmed(
    key: VsKey,
    (frontend, traffic_policy): (Frontend, TrafficPolicy),
    read: &ReadService,
    owned: &NftState,
    draining: &Draining,
) -> ProgrammedService {
    let destinations = read
        .destinations
        .iter()
        .filter(|d| {
            !draining.contains(&DrainKey {
                service: key,
                address: d.address,
                port: d.port,
            })
        })
        .map(|d| {
            let state = DestinationState {
                local: owned.destinations.contains(&(key, d.address, d.port)),
                ..DestinationState::active(d.weight)
            };
            ((d.address, d.port), state)
        })
        .collect();
    ProgrammedService {
        config: ServiceConfig {
            scheduler: Scheduler::from_kernel(
                &read.service.scheduler,
                read.service.scheduler_flags,
            ),
            persistence_timeout: read.service.persistence_timeout,
            frontend,
            traffic_policy,
            tier_shares: TierShares::default(),
            source_ranges: owned.source_ranges.get(&key).cloned().unwrap_or_default(),
        },
        destinations,
    }
}

/// The records to forget and to hold as suspect: those of services IPVS does not have (an
/// agent killed between recording and creating a service, or between deleting it and clearing
/// its record, leaves one; kept, it would claim whatever service another tool later creates at
/// that address and port), once two reads agree ([`records::judge_records`]); and records
/// inside the excluded CIDRs that no op asked for, their services never being read.
fn judge(
    known: &Known<'_>,
    owned: &NftState,
    table: &ProgrammedTable,
    read: &IpvsRead,
) -> (BTreeSet<VsKey>, BTreeSet<VsKey>) {
    let recorded = readable(owned, known.exclude_cidrs);
    let excluded = owned
        .services
        .keys()
        .filter(|key| !recorded.contains(key) && !table.contains_key(key))
        .copied();
    let listed: BTreeSet<VsKey> = read.listed.keys().copied().collect();
    let verdict = records::judge_records(&recorded, &listed, known.suspects, &read.probes);
    let forget = verdict.forget.into_iter().chain(excluded).collect();
    (forget, verdict.suspects)
}

/// How many owned services in `table` need each address bound on the dummy link.
pub fn address_users(owned: &NftState, table: &ProgrammedTable) -> BTreeMap<IpAddr, usize> {
    let mut users = BTreeMap::new();
    for (key, (frontend, _)) in &owned.services {
        if binds_address(*frontend) && table.contains_key(key) {
            *users.entry(key.address).or_default() += 1;
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use std::time::Instant;

    use super::super::netlink::{Forward, ServiceId};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    fn read_service(key: VsKey, destinations: &[(&str, u16)]) -> ReadService {
        ReadService {
            service: IpvsService {
                id: ServiceId {
                    protocol: key.protocol,
                    address: key.address,
                    port: key.port,
                },
                scheduler: "rr".into(),
                scheduler_flags: 0,
                persistence_timeout: None,
            },
            destinations: destinations
                .iter()
                .map(|&(address, port)| IpvsDestination {
                    address: ip(address),
                    port,
                    weight: 1,
                    forward: Forward::Masq,
                    active_connections: 0,
                    inactive_connections: 0,
                })
                .collect(),
        }
    }

    fn owned(keys: &[VsKey]) -> NftState {
        let mut owned = NftState::default();
        for key in keys {
            owned
                .services
                .insert(*key, (Frontend::ClusterIP, TrafficPolicy::Cluster));
        }
        owned
    }

    /// On a full read the node-local marks come from the hairpin set, for the services found
    /// by the dump and by a GET alike; a draining destination is left out of the table but
    /// keeps its mark.
    #[test]
    fn a_full_read_rebuilds_node_local_marks_from_the_hairpin_set() {
        let (a, b) = (
            VsKey::new(Protocol::Tcp, ip("10.96.0.1"), 80),
            VsKey::new(Protocol::Tcp, ip("10.96.0.2"), 80),
        );
        let mut recorded = owned(&[a, b]);
        // An older version's stale element, for a destination IPVS no longer has.
        recorded.destinations.insert((a, ip("10.244.9.9"), 8080));
        let hairpins = BTreeSet::from([(ip("10.244.0.5"), Protocol::Tcp, 8080)]);
        let mut draining = Draining::new();
        draining.start(
            DrainKey {
                service: b,
                address: ip("10.244.0.5"),
                port: 8080,
            },
            Instant::now(),
        );
        let read = IpvsRead {
            listed: BTreeMap::from([(
                a,
                read_service(a, &[("10.244.0.5", 8080), ("10.244.1.5", 8080)]),
            )]),
            found: BTreeMap::from([(b, read_service(b, &[("10.244.0.5", 8080)]))]),
            probes: BTreeMap::from([(b, Probe::Present)]),
        };
        let adoption = adopt(
            &Known {
                owned: &recorded,
                hairpins: Some(&hairpins),
                exclude_cidrs: &[],
                excluded: &BTreeMap::new(),
                draining: &draining,
                suspects: &BTreeSet::new(),
            },
            &read,
        );
        let local: Vec<(IpAddr, bool)> = adoption.table[&a]
            .destinations
            .iter()
            .map(|((address, _), state)| (*address, state.local))
            .collect();
        assert_eq!(
            local,
            vec![(ip("10.244.0.5"), true), (ip("10.244.1.5"), false)]
        );
        assert!(
            adoption.table[&b].destinations.is_empty(),
            "draining: left out"
        );
        assert_eq!(
            adoption.owned.destinations,
            BTreeSet::from([(a, ip("10.244.0.5"), 8080), (b, ip("10.244.0.5"), 8080)])
        );
        assert!(adoption.forget.is_empty());
        assert_eq!(adoption.address_users.get(&ip("10.96.0.1")), Some(&1));
    }

    /// Records inside the excluded CIDRs are forgotten unless asked for; a record whose GET
    /// failed is held as suspect; one whose GET says absent goes, and its VIP is not needed.
    #[test]
    fn records_are_judged_by_what_was_read() {
        let present = VsKey::new(Protocol::Tcp, ip("10.96.0.1"), 80);
        let unanswered = VsKey::new(Protocol::Tcp, ip("10.96.0.2"), 80);
        let absent = VsKey::new(Protocol::Tcp, ip("10.96.0.3"), 80);
        let excluded = VsKey::new(Protocol::Tcp, ip("10.200.0.1"), 80);
        let recorded = owned(&[present, unanswered, absent, excluded]);
        let cidrs: Vec<IpNetwork> = vec!["10.200.0.0/16".parse().expect("a test CIDR")];
        assert_eq!(
            readable(&recorded, &cidrs),
            BTreeSet::from([present, unanswered, absent])
        );
        let read = IpvsRead {
            listed: BTreeMap::from([(present, read_service(present, &[]))]),
            found: BTreeMap::new(),
            probes: BTreeMap::from([(absent, Probe::Absent)]),
        };
        let adoption = adopt(
            &Known {
                owned: &recorded,
                hairpins: None,
                exclude_cidrs: &cidrs,
                excluded: &BTreeMap::new(),
                draining: &Draining::new(),
                suspects: &BTreeSet::new(),
            },
            &read,
        );
        assert_eq!(adoption.forget, BTreeSet::from([absent, excluded]));
        assert_eq!(adoption.suspects, BTreeSet::from([unanswered]));
        assert_eq!(
            adoption
                .owned
                .services
                .keys()
                .copied()
                .collect::<BTreeSet<_>>(),
            BTreeSet::from([present, unanswered])
        );
        assert_eq!(
            adoption.address_users,
            BTreeMap::from([(ip("10.96.0.1"), 1)]),
            "only services IPVS has need their VIP"
        );
    }
}
