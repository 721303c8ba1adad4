//! What the IPVS dataplane asks of the kernel for a list of [`Op`]s, decided without touching
//! it: the netlink command of each op (with the drain bookkeeping it implies), the retry of a
//! refused command, and the ownership records to write before and clear after.
//!
//! Pure, so the rules that keep IPVS and the ownership record consistent are unit-tested here;
//! [`super::dataplane`] only carries the decisions out.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::dataplane::op::Op;
use crate::table::{Frontend, VsKey};

use super::drain::{self, DrainKey, Draining};
use super::netlink::{Command, Forward, IpvsDestination, IpvsError, IpvsService, ServiceId};
use super::nft::NftState;
use crate::dataplane::ServiceConfig;

/// The kernel request that carries out one op, and what must follow once it succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpCommand {
    pub command: Command,
    pub after: AfterSuccess,
}

/// Work that follows a successful request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSuccess {
    Nothing,
    /// A UDP/SCTP destination went: flush its conntrack entries.
    FlushConntrack {
        service: VsKey,
        address: IpAddr,
        port: u16,
    },
}

/// Whether a service's address is bound on the dummy link (NodePorts use node addresses).
pub fn binds_address(frontend: Frontend) -> bool {
    !matches!(frontend, Frontend::NodePort)
}

pub fn service_id(key: &VsKey) -> ServiceId {
    ServiceId {
        protocol: key.protocol,
        address: key.address,
        port: key.port,
    }
}

fn ipvs_service(key: &VsKey, config: &ServiceConfig) -> IpvsService {
    IpvsService {
        id: service_id(key),
        scheduler: config.scheduler.name().to_owned(),
        scheduler_flags: config.scheduler.flags.kernel_bits(),
        persistence_timeout: config.persistence_timeout,
    }
}

fn masq_destination(address: IpAddr, port: u16, weight: u32) -> IpvsDestination {
    IpvsDestination {
        address,
        port,
        weight,
        forward: Forward::Masq,
        active_connections: 0,
        inactive_connections: 0,
    }
}

/// The IPVS request for `op`. Removing a TCP destination starts its drain (weight 0, deleted
/// later by the drain check); a destination that comes back while draining is updated, not
/// created, and its drain ends; a deleted service forgets its drains.
pub fn commands_for(op: &Op, draining: &mut Draining, now: Instant) -> OpCommand {
    let nothing = |command| OpCommand {
        command,
        after: AfterSuccess::Nothing,
    };
    match op {
        Op::AddService { key, config } => nothing(Command::NewService(ipvs_service(key, config))),
        Op::EditService { key, config } => nothing(Command::SetService(ipvs_service(key, config))),
        Op::AddDestination {
            service,
            destination,
        } => {
            let wanted =
                masq_destination(destination.address, destination.port, destination.weight);
            let returning = draining.cancel(&DrainKey {
                service: *service,
                address: destination.address,
                port: destination.port,
            });
            nothing(if returning {
                Command::SetDestination(service_id(service), wanted)
            } else {
                Command::NewDestination(service_id(service), wanted)
            })
        }
        Op::EditDestination {
            service,
            destination,
        } => nothing(Command::SetDestination(
            service_id(service),
            masq_destination(destination.address, destination.port, destination.weight),
        )),
        Op::DeleteDestination {
            service,
            destination,
        } if drain::drains(service.protocol) => {
            draining.start(
                DrainKey {
                    service: *service,
                    address: destination.address,
                    port: destination.port,
                },
                now,
            );
            nothing(Command::SetDestination(
                service_id(service),
                masq_destination(destination.address, destination.port, 0),
            ))
        }
        Op::DeleteDestination {
            service,
            destination,
        } => OpCommand {
            command: Command::DelDestination(
                service_id(service),
                destination.address,
                destination.port,
            ),
            after: AfterSuccess::FlushConntrack {
                service: *service,
                address: destination.address,
                port: destination.port,
            },
        },
        Op::DeleteService { key } => {
            draining.forget_service(key);
            nothing(Command::DelService(service_id(key)))
        }
    }
}

/// What to do about a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    /// The kernel is already as wanted.
    Done,
    /// Send this instead.
    With(Command),
    Fail,
}

/// Requests whose target already was in the wanted state are redone in their other form: an
/// existing service or destination is updated, a missing one is created (unless it was being
/// removed), and deleting what is already gone succeeds.
pub fn retry_for(command: &Command, error: &IpvsError, removing: bool) -> Retry {
    match command {
        Command::NewService(service) if is_exists(error) => {
            Retry::With(Command::SetService(service.clone()))
        }
        Command::NewDestination(id, dest) if is_exists(error) => {
            Retry::With(Command::SetDestination(*id, dest.clone()))
        }
        Command::SetDestination(..) if removing && is_not_found(error) => Retry::Done,
        Command::SetDestination(id, dest) if is_not_found(error) => {
            Retry::With(Command::NewDestination(*id, dest.clone()))
        }
        Command::DelDestination(..) | Command::DelService(..) if is_not_found(error) => Retry::Done,
        _ => Retry::Fail,
    }
}

/// The kernel said the service or destination already exists.
pub fn is_exists(error: &IpvsError) -> bool {
    error.errno() == Some(libc::EEXIST)
}

/// The kernel said the service or destination does not exist.
pub fn is_not_found(error: &IpvsError) -> bool {
    matches!(error.errno(), Some(libc::ENOENT | libc::ESRCH))
}

/// The records `ops[live]` need before anything is created and `owned` does not hold yet: a
/// service's role (a changed role replaces the old one), its source ranges where they changed
/// (open ranges included: they clear the old firewall), and each added or edited destination
/// that is node-local (its hairpin element). A load-balancer key's firewall is so in place
/// before IPVS serves it: it is never open for a moment.
pub fn records_to_add(ops: &[Op], live: &[usize], owned: &NftState) -> NftState {
    let mut recorded = NftState::default();
    for &index in live {
        match &ops[index] {
            Op::AddService { key, config } | Op::EditService { key, config } => {
                recorded
                    .services
                    .insert(*key, (config.frontend, config.traffic_policy));
                recorded
                    .source_ranges
                    .insert(*key, config.source_ranges.clone());
            }
            Op::AddDestination {
                service,
                destination,
            }
            | Op::EditDestination {
                service,
                destination,
            } if destination.local => {
                recorded
                    .destinations
                    .insert((*service, destination.address, destination.port));
            }
            Op::AddDestination { .. }
            | Op::EditDestination { .. }
            | Op::DeleteDestination { .. }
            | Op::DeleteService { .. } => {}
        }
    }
    recorded
        .services
        .retain(|key, role| owned.services.get(key) != Some(role));
    let open = crate::table::SourceRanges::default();
    recorded
        .source_ranges
        .retain(|key, ranges| owned.source_ranges.get(key).unwrap_or(&open) != ranges);
    recorded
        .destinations
        .retain(|d| !owned.destinations.contains(d));
    recorded
}

/// The records of what `ops[live]` removed (the ops not in `failed`), to clear once removed:
/// services (with every destination record of theirs), destinations, and the hairpin
/// elements of destinations no longer node-local.
pub fn records_to_forget(
    ops: &[Op],
    live: &[usize],
    failed: &BTreeMap<usize, String>,
    owned: &NftState,
) -> NftState {
    let mut forgotten = NftState::default();
    for &index in live.iter().filter(|index| !failed.contains_key(index)) {
        match &ops[index] {
            Op::DeleteService { key } => {
                if let Some(&role) = owned.services.get(key) {
                    forgotten.services.insert(*key, role);
                }
                if let Some(ranges) = owned.source_ranges.get(key) {
                    forgotten.source_ranges.insert(*key, ranges.clone());
                }
                // The service's destinations went with it, even those whose own removal
                // failed earlier in the batch: their hairpin records must not outlive it.
                forgotten.destinations.extend(
                    owned
                        .destinations
                        .iter()
                        .filter(|(service, _, _)| service == key)
                        .copied(),
                );
            }
            Op::DeleteDestination {
                service,
                destination,
            } => {
                forgotten
                    .destinations
                    .insert((*service, destination.address, destination.port));
            }
            Op::EditDestination {
                service,
                destination,
            } if !destination.local => {
                let record = (*service, destination.address, destination.port);
                if owned.destinations.contains(&record) {
                    forgotten.destinations.insert(record);
                }
            }
            _ => {}
        }
    }
    forgotten
}

/// The ops of `live` reordered so each service's changes come together, service first
/// (as `ipvsadm -R` sends them): the kernel then looks services up in a table that holds only
/// those added so far. Every creation and update still precedes every removal, and each
/// service's own ops keep their order, so make-before-break holds.
pub fn kernel_order(ops: &[Op], live: &[usize]) -> Vec<usize> {
    let mut ordered = live.to_vec();
    ordered.sort_by_key(|&index| {
        let removes = matches!(
            ops[index],
            Op::DeleteDestination { .. } | Op::DeleteService { .. }
        );
        (removes, ops[index].service())
    });
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::op::Destination;
    use crate::dataplane::TierShares;
    use crate::model::Protocol;
    use crate::table::TrafficPolicy;
    use std::collections::BTreeSet;
    use std::io;

    fn key(protocol: Protocol, port: u16) -> VsKey {
        VsKey::new(protocol, "10.96.0.10".parse().expect("address"), port)
    }

    fn destination(weight: u32) -> Destination {
        Destination {
            address: "10.244.1.5".parse().expect("address"),
            port: 8080,
            weight,
            tier: 0,
            local: false,
        }
    }

    fn local_destination(weight: u32) -> Destination {
        Destination {
            local: true,
            ..destination(weight)
        }
    }

    fn config(frontend: Frontend) -> ServiceConfig {
        ServiceConfig {
            scheduler: crate::scheduler::Scheduler::default(),
            persistence_timeout: Some(600),
            frontend,
            traffic_policy: TrafficPolicy::Cluster,
            tier_shares: TierShares::default(),
            source_ranges: Default::default(),
        }
    }

    fn drain_key(service: VsKey) -> DrainKey {
        DrainKey {
            service,
            address: destination(1).address,
            port: 8080,
        }
    }

    fn masq(weight: u32) -> IpvsDestination {
        masq_destination(destination(1).address, 8080, weight)
    }

    fn refused(errno: i32) -> IpvsError {
        super::super::netlink::client::refusal(
            errno,
            None,
            super::super::netlink::Request::DumpServices,
        )
    }

    #[test]
    fn services_are_created_and_updated_with_their_settings() {
        let (tcp, mut draining, now) = (key(Protocol::Tcp, 80), Draining::new(), Instant::now());
        let expected = IpvsService {
            id: service_id(&tcp),
            scheduler: "rr".to_owned(),
            scheduler_flags: 0,
            persistence_timeout: Some(600),
        };
        let add = Op::AddService {
            key: tcp,
            config: Box::new(config(Frontend::ClusterIP)),
        };
        assert_eq!(
            commands_for(&add, &mut draining, now),
            OpCommand {
                command: Command::NewService(expected.clone()),
                after: AfterSuccess::Nothing
            }
        );
        let edit = Op::EditService {
            key: tcp,
            config: Box::new(config(Frontend::ClusterIP)),
        };
        assert_eq!(
            commands_for(&edit, &mut draining, now).command,
            Command::SetService(expected)
        );
    }

    #[test]
    fn a_removed_tcp_destination_drains_at_weight_zero() {
        let (tcp, mut draining, now) = (key(Protocol::Tcp, 80), Draining::new(), Instant::now());
        let op = Op::DeleteDestination {
            service: tcp,
            destination: destination(3),
        };
        let planned = commands_for(&op, &mut draining, now);
        assert_eq!(
            planned.command,
            Command::SetDestination(service_id(&tcp), masq(0))
        );
        assert_eq!(planned.after, AfterSuccess::Nothing);
        assert_eq!(draining.since(&drain_key(tcp)), Some(now));
    }

    #[test]
    fn a_removed_udp_destination_goes_at_once_and_flushes_conntrack() {
        let (udp, mut draining, now) = (key(Protocol::Udp, 53), Draining::new(), Instant::now());
        let op = Op::DeleteDestination {
            service: udp,
            destination: destination(1),
        };
        let planned = commands_for(&op, &mut draining, now);
        assert_eq!(
            planned.command,
            Command::DelDestination(service_id(&udp), destination(1).address, 8080)
        );
        assert_eq!(
            planned.after,
            AfterSuccess::FlushConntrack {
                service: udp,
                address: destination(1).address,
                port: 8080
            }
        );
        assert!(draining.is_empty());
    }

    #[test]
    fn a_returning_destination_is_updated_and_stops_draining() {
        let (tcp, mut draining, now) = (key(Protocol::Tcp, 80), Draining::new(), Instant::now());
        draining.start(drain_key(tcp), now);
        let op = Op::AddDestination {
            service: tcp,
            destination: destination(2),
        };
        assert_eq!(
            commands_for(&op, &mut draining, now).command,
            Command::SetDestination(service_id(&tcp), masq(2))
        );
        assert!(draining.is_empty());
        // Not draining any more: the next addition creates it.
        assert_eq!(
            commands_for(&op, &mut draining, now).command,
            Command::NewDestination(service_id(&tcp), masq(2))
        );
    }

    #[test]
    fn an_edited_destination_gets_its_new_weight() {
        let (tcp, mut draining, now) = (key(Protocol::Tcp, 80), Draining::new(), Instant::now());
        let op = Op::EditDestination {
            service: tcp,
            destination: destination(7),
        };
        assert_eq!(
            commands_for(&op, &mut draining, now).command,
            Command::SetDestination(service_id(&tcp), masq(7))
        );
    }

    #[test]
    fn a_deleted_service_forgets_its_drains() {
        let (tcp, mut draining, now) = (key(Protocol::Tcp, 80), Draining::new(), Instant::now());
        draining.start(drain_key(tcp), now);
        let op = Op::DeleteService { key: tcp };
        assert_eq!(
            commands_for(&op, &mut draining, now).command,
            Command::DelService(service_id(&tcp))
        );
        assert!(draining.is_empty());
    }

    #[test]
    fn refusals_of_what_is_already_so_are_retried_in_the_other_form() {
        let id = service_id(&key(Protocol::Tcp, 80));
        let new = Command::NewDestination(id, masq(1));
        let set = Command::SetDestination(id, masq(1));
        assert_eq!(
            retry_for(&new, &refused(libc::EEXIST), false),
            Retry::With(set.clone())
        );
        assert_eq!(
            retry_for(&set, &refused(libc::ENOENT), false),
            Retry::With(new.clone())
        );
        // A drain (weight 0) of a destination that is already gone is done.
        assert_eq!(retry_for(&set, &refused(libc::ENOENT), true), Retry::Done);
        assert_eq!(
            retry_for(&Command::DelService(id), &refused(libc::ESRCH), false),
            Retry::Done
        );
        assert_eq!(retry_for(&new, &refused(libc::EINVAL), false), Retry::Fail);
        let lost = IpvsError::Socket {
            call: "recvmsg",
            source: io::Error::from_raw_os_error(libc::EAGAIN),
        };
        assert_eq!(retry_for(&new, &lost, false), Retry::Fail);
    }

    /// A service the kernel has but a read did not report (the dump skipped it and no GET
    /// was made) is asked to be created again: it, and each of its destinations, is then
    /// updated in place, never failed and never removed and re-made.
    #[test]
    fn creating_what_the_kernel_already_has_updates_it() {
        let tcp = key(Protocol::Tcp, 80);
        let wanted = ipvs_service(&tcp, &config(Frontend::ClusterIP));
        let id = service_id(&tcp);
        assert_eq!(
            retry_for(
                &Command::NewService(wanted.clone()),
                &refused(libc::EEXIST),
                false
            ),
            Retry::With(Command::SetService(wanted))
        );
        assert_eq!(
            retry_for(
                &Command::NewDestination(id, masq(1)),
                &refused(libc::EEXIST),
                false
            ),
            Retry::With(Command::SetDestination(id, masq(1)))
        );
    }

    #[test]
    fn only_records_not_held_yet_are_written_first() {
        let (a, b) = (key(Protocol::Tcp, 80), key(Protocol::Tcp, 81));
        let mut owned = NftState::default();
        owned
            .services
            .insert(a, (Frontend::ClusterIP, TrafficPolicy::Cluster));
        let ops = vec![
            Op::EditService {
                key: a,
                config: Box::new(config(Frontend::ClusterIP)),
            },
            Op::AddService {
                key: b,
                config: Box::new(config(Frontend::NodePort)),
            },
            Op::AddDestination {
                service: b,
                destination: local_destination(1),
            },
            Op::DeleteService { key: a },
        ];
        let recorded = records_to_add(&ops, &[0, 1, 2, 3], &owned);
        assert_eq!(
            recorded.services.into_iter().collect::<Vec<_>>(),
            vec![(b, (Frontend::NodePort, TrafficPolicy::Cluster))]
        );
        assert_eq!(
            recorded.destinations.into_iter().collect::<Vec<_>>(),
            vec![(b, destination(1).address, 8080)]
        );
        // Ops that are not live (excluded) record nothing.
        assert_eq!(records_to_add(&ops, &[0], &owned), NftState::default());
    }

    #[test]
    fn only_node_local_destinations_get_hairpin_records() {
        let service = key(Protocol::Tcp, 80);
        let remote = Op::AddDestination {
            service,
            destination: destination(1),
        };
        assert_eq!(
            records_to_add(std::slice::from_ref(&remote), &[0], &NftState::default()),
            NftState::default()
        );

        // A destination that became local is recorded before its edit; one that stopped being
        // local is forgotten after it.
        let record = (service, destination(1).address, 8080);
        let became_local = Op::EditDestination {
            service,
            destination: local_destination(1),
        };
        let recorded = records_to_add(&[became_local], &[0], &NftState::default());
        assert_eq!(
            recorded.destinations.into_iter().collect::<Vec<_>>(),
            vec![record]
        );
        let owned = NftState {
            destinations: [record].into(),
            ..NftState::default()
        };
        let became_remote = Op::EditDestination {
            service,
            destination: destination(1),
        };
        assert!(
            records_to_add(std::slice::from_ref(&became_remote), &[0], &owned)
                .destinations
                .is_empty()
        );
        let forgotten = records_to_forget(
            std::slice::from_ref(&became_remote),
            &[0],
            &BTreeMap::new(),
            &owned,
        );
        assert_eq!(
            forgotten.destinations.into_iter().collect::<Vec<_>>(),
            vec![record]
        );
        // Not after a failed edit, and not when nothing was recorded.
        let failed = BTreeMap::from([(0, "refused".to_owned())]);
        assert!(
            records_to_forget(std::slice::from_ref(&became_remote), &[0], &failed, &owned)
                .destinations
                .is_empty()
        );
        assert!(records_to_forget(
            &[became_remote],
            &[0],
            &BTreeMap::new(),
            &NftState::default()
        )
        .destinations
        .is_empty());
    }

    #[test]
    fn records_are_cleared_only_for_removals_that_succeeded() {
        let (a, b) = (key(Protocol::Tcp, 80), key(Protocol::Tcp, 81));
        let mut owned = NftState::default();
        for k in [a, b] {
            owned
                .services
                .insert(k, (Frontend::ClusterIP, TrafficPolicy::Cluster));
        }
        let ops = vec![
            Op::DeleteDestination {
                service: a,
                destination: destination(1),
            },
            Op::DeleteService { key: a },
            Op::DeleteService { key: b },
        ];
        let failed = BTreeMap::from([(2, "refused".to_owned())]);
        let forgotten = records_to_forget(&ops, &[0, 1, 2], &failed, &owned);
        assert_eq!(forgotten.services.keys().collect::<Vec<_>>(), vec![&a]);
        assert_eq!(forgotten.destinations.len(), 1);
    }

    /// A destination whose removal failed in the same batch as its service's deletion: the
    /// deleted service took it along, so its hairpin record goes with the service's.
    #[test]
    fn a_deleted_service_takes_its_destination_records_along() {
        let (a, b) = (key(Protocol::Tcp, 80), key(Protocol::Tcp, 81));
        let gone = destination(1);
        let mut owned = NftState::default();
        for k in [a, b] {
            owned
                .services
                .insert(k, (Frontend::ClusterIP, TrafficPolicy::Cluster));
            owned.destinations.insert((k, gone.address, gone.port));
        }
        let ops = vec![
            Op::DeleteDestination {
                service: a,
                destination: gone,
            },
            Op::DeleteService { key: a },
        ];
        let failed = BTreeMap::from([(0, "refused".to_owned())]);
        let forgotten = records_to_forget(&ops, &[0, 1], &failed, &owned);
        assert_eq!(
            forgotten.destinations,
            BTreeSet::from([(a, gone.address, gone.port)])
        );
    }

    #[test]
    fn kernel_order_groups_each_service_and_keeps_makes_before_breaks() {
        let (a, b) = (key(Protocol::Tcp, 80), key(Protocol::Tcp, 81));
        let add = |k| Op::AddService {
            key: k,
            config: Box::new(config(Frontend::ClusterIP)),
        };
        let dest = |k, w| Op::AddDestination {
            service: k,
            destination: destination(w),
        };
        // The differ's order: services, then additions, then removals.
        let ops = vec![
            add(a),
            add(b),
            dest(a, 1),
            dest(b, 1),
            Op::DeleteDestination {
                service: a,
                destination: destination(9),
            },
            Op::DeleteService { key: b },
        ];
        let live: Vec<usize> = (0..ops.len()).collect();
        assert_eq!(kernel_order(&ops, &live), vec![0, 2, 1, 3, 4, 5]);
        // Excluded ops stay out.
        assert_eq!(kernel_order(&ops, &[1, 3]), vec![1, 3]);
    }
}
