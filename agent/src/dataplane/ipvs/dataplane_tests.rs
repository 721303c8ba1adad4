//! The IPVS dataplane on a fake kernel: read and adoption, the apply phases and their order,
//! drains, and recovery after a failure at any kernel call. No root, no QEMU: the VM tests
//! (`vm_ipvs_*`) cover the real kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::executor::block_on;

use super::*;
use crate::dataplane::{DestinationState, ServiceConfig, TierShares};
use crate::diff::diff;
use crate::model::Protocol;
use crate::table::{Frontend, SourceRanges, TrafficPolicy};

use super::super::fake::{Call, CallKind, FakeKernel, FakeService, Fault, FaultSpan};
use super::super::netlink::{Forward, ServiceId};

const FOREIGN_VIP: &str = "10.0.0.99";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a test address")
}

fn tcp(address: &str, port: u16) -> VsKey {
    VsKey::new(Protocol::Tcp, ip(address), port)
}

fn udp(address: &str, port: u16) -> VsKey {
    VsKey::new(Protocol::Udp, ip(address), port)
}

fn config(frontend: Frontend) -> ServiceConfig {
    ServiceConfig {
        scheduler: crate::scheduler::Scheduler::default(),
        persistence_timeout: None,
        frontend,
        traffic_policy: TrafficPolicy::Cluster,
        tier_shares: TierShares::default(),
        source_ranges: SourceRanges::default(),
    }
}

/// A service of `frontend` with destinations (address, port, weight, local).
fn service(frontend: Frontend, destinations: &[(&str, u16, u32, bool)]) -> ProgrammedService {
    ProgrammedService {
        config: config(frontend),
        destinations: destinations
            .iter()
            .map(|&(address, port, weight, local)| {
                let state = DestinationState {
                    local,
                    ..DestinationState::active(weight)
                };
                ((ip(address), port), state)
            })
            .collect(),
    }
}

fn settings() -> IpvsSettings {
    IpvsSettings {
        exclude_cidrs: vec!["10.200.0.0/16".parse().expect("a test CIDR")],
        ..IpvsSettings::default()
    }
}

fn agent_on(kernel: &FakeKernel) -> IpvsDataplane<FakeKernel> {
    IpvsDataplane::with_kernel(settings(), kernel.clone())
}

/// One round of the sync loop: read, diff against `plan`, apply, and the end-of-sync step.
fn sync(dataplane: &mut IpvsDataplane<FakeKernel>, plan: &ProgrammedTable) -> Result<(), String> {
    block_on(async {
        let actual = dataplane.read().await.map_err(|e| error_chain(&e))?;
        let ops = diff(plan, &actual);
        dataplane.apply(&ops).await.map_err(|e| error_chain(&e))?;
        dataplane.synced().await.map_err(|e| error_chain(&e))
    })
}

/// A service nobody recorded, as another tool (kube-proxy, ipvsadm) leaves one.
fn add_foreign(kernel: &FakeKernel) -> FakeService {
    let id = service_id(&tcp(FOREIGN_VIP, 80));
    let foreign = FakeService {
        service: IpvsService {
            id,
            scheduler: "wlc".into(),
            scheduler_flags: 0,
            persistence_timeout: None,
        },
        destinations: [(
            (ip("192.168.7.7"), 8080),
            IpvsDestination {
                address: ip("192.168.7.7"),
                port: 8080,
                weight: 3,
                forward: Forward::Masq,
                active_connections: 0,
                inactive_connections: 0,
            },
        )]
        .into_iter()
        .collect(),
    };
    kernel.state().services.insert(id, foreign.clone());
    foreign
}

/// The first plan: two ClusterIP ports on one VIP, a UDP DNS service, a NodePort.
fn first_plan() -> ProgrammedTable {
    [
        (
            tcp("10.96.0.1", 80),
            service(
                Frontend::ClusterIP,
                &[
                    ("10.244.0.5", 8080, 1, true),
                    ("10.244.1.5", 8080, 1, false),
                ],
            ),
        ),
        (
            tcp("10.96.0.1", 443),
            service(Frontend::ClusterIP, &[("10.244.0.5", 8443, 1, true)]),
        ),
        (
            udp("10.96.0.10", 53),
            service(
                Frontend::ClusterIP,
                &[("10.244.0.6", 53, 1, false), ("10.244.1.6", 53, 1, false)],
            ),
        ),
        (
            tcp("192.168.1.10", 30080),
            service(Frontend::NodePort, &[("10.244.1.5", 8080, 1, false)]),
        ),
    ]
    .into_iter()
    .collect()
}

/// The second plan: a TCP and a UDP destination go, a weight changes, a service goes (and
/// with it a VIP), another comes on a new VIP.
fn second_plan() -> ProgrammedTable {
    [
        (
            tcp("10.96.0.1", 80),
            service(Frontend::ClusterIP, &[("10.244.0.5", 8080, 2, true)]),
        ),
        (
            udp("10.96.0.10", 53),
            service(Frontend::ClusterIP, &[("10.244.0.6", 53, 1, false)]),
        ),
        (
            tcp("192.168.1.10", 30080),
            service(Frontend::NodePort, &[("10.244.1.5", 8080, 1, false)]),
        ),
        (
            tcp("10.96.0.20", 8080),
            service(Frontend::LoadBalancer, &[("10.244.2.9", 80, 1, false)]),
        ),
    ]
    .into_iter()
    .collect()
}

/// Asserts the fake kernel holds exactly `plan` (plus the foreign service): the IPVS services
/// and destinations, the records, the hairpin elements and the VIPs.
fn assert_holds(kernel: &FakeKernel, plan: &ProgrammedTable, foreign: &FakeService, context: &str) {
    let state = kernel.state();
    let mut expected_ipvs = BTreeMap::new();
    for (key, wanted) in plan {
        let destinations: BTreeSet<(IpAddr, u16, u32)> = wanted
            .destinations
            .iter()
            .map(|(&(address, port), state)| (address, port, state.weight))
            .collect();
        expected_ipvs.insert(service_id(key), destinations);
    }
    let held_ipvs: BTreeMap<ServiceId, BTreeSet<(IpAddr, u16, u32)>> = state
        .services
        .iter()
        .filter(|(id, _)| **id != foreign.service.id)
        .map(|(id, held)| {
            let destinations = held
                .destinations
                .values()
                .map(|d| (d.address, d.port, d.weight))
                .collect();
            (*id, destinations)
        })
        .collect();
    assert_eq!(held_ipvs, expected_ipvs, "IPVS services: {context}");
    assert_eq!(
        state.services.get(&foreign.service.id),
        Some(foreign),
        "the foreign service: {context}"
    );
    let touched_foreign = state.calls.iter().any(|call| match call {
        Call::Command(Command::NewService(s) | Command::SetService(s)) => {
            s.id == foreign.service.id
        }
        Call::Command(
            Command::DelService(id)
            | Command::NewDestination(id, _)
            | Command::SetDestination(id, _)
            | Command::DelDestination(id, _, _),
        ) => *id == foreign.service.id,
        _ => false,
    });
    assert!(
        !touched_foreign,
        "a command for the foreign service: {context}"
    );
    let table = state.nft.as_ref().expect("the nft table exists");
    let roles: BTreeMap<VsKey, (Frontend, TrafficPolicy)> = plan
        .iter()
        .map(|(key, s)| (*key, (s.config.frontend, s.config.traffic_policy)))
        .collect();
    assert_eq!(table.services, roles, "records: {context}");
    let local: BTreeSet<(VsKey, IpAddr, u16)> = plan
        .iter()
        .flat_map(|(key, s)| {
            s.destinations
                .iter()
                .filter(|(_, state)| state.local)
                .map(move |(&(address, port), _)| (*key, address, port))
        })
        .collect();
    assert_eq!(table.destinations, local, "node-local records: {context}");
    let vips: BTreeSet<IpAddr> = plan
        .iter()
        .filter(|(_, s)| binds_address(s.config.frontend))
        .map(|(key, _)| key.address)
        .collect();
    assert_eq!(state.link, vips, "VIPs on the dummy link: {context}");
}

/// A kernel holding `first_plan`, programmed by an earlier agent, and a foreign service.
fn kernel_after_first_plan() -> (FakeKernel, FakeService) {
    let kernel = FakeKernel::new();
    let foreign = add_foreign(&kernel);
    sync(&mut agent_on(&kernel), &first_plan()).expect("the first plan applies");
    assert_holds(&kernel, &first_plan(), &foreign, "after the first plan");
    kernel.state().calls.clear();
    (kernel, foreign)
}

#[test]
fn a_restart_adopts_its_services_and_changes_nothing() {
    let (kernel, foreign) = kernel_after_first_plan();
    let mut restarted = agent_on(&kernel);
    let table = block_on(restarted.read()).expect("read");
    assert_eq!(
        table,
        first_plan(),
        "node-local marks come back from the hairpin set"
    );
    sync(&mut restarted, &first_plan()).expect("sync");
    let writes: Vec<Call> = kernel
        .state()
        .calls
        .iter()
        .filter(|call| {
            matches!(
                call,
                Call::Command(_) | Call::AddAddress(_) | Call::DeleteAddress(_)
            )
        })
        .cloned()
        .collect();
    assert_eq!(
        writes,
        Vec::new(),
        "adopting must not rewrite what is there"
    );
    assert_holds(&kernel, &first_plan(), &foreign, "after the restart");
}

#[test]
fn foreign_services_and_excluded_cidrs_are_left_alone() {
    let (kernel, foreign) = kernel_after_first_plan();
    // A recorded service inside --ipvs-exclude-cidrs (recorded by a version without the
    // exclusion): its record is forgotten, the service never read or touched.
    let excluded = tcp("10.200.0.1", 80);
    let excluded_service = FakeService {
        service: IpvsService {
            id: service_id(&excluded),
            scheduler: "rr".into(),
            scheduler_flags: 0,
            persistence_timeout: None,
        },
        destinations: BTreeMap::new(),
    };
    {
        let mut state = kernel.state();
        state
            .services
            .insert(excluded_service.service.id, excluded_service.clone());
        if let Some(table) = state.nft.as_mut() {
            table
                .services
                .insert(excluded, (Frontend::ClusterIP, TrafficPolicy::Cluster));
        }
    }
    let mut restarted = agent_on(&kernel);
    let table = block_on(restarted.read()).expect("read");
    assert_eq!(
        table,
        first_plan(),
        "neither the foreign nor the excluded one is adopted"
    );
    // An empty plan deletes every owned service, and only those.
    sync(&mut restarted, &ProgrammedTable::new()).expect("sync to nothing");
    let state = kernel.state();
    assert_eq!(state.services.get(&foreign.service.id), Some(&foreign));
    assert_eq!(
        state.services.get(&excluded_service.service.id),
        Some(&excluded_service)
    );
    assert_eq!(state.services.len(), 2, "{:?}", state.services.keys());
    assert!(state.link.is_empty(), "{:?}", state.link);
    let records = state.nft.as_ref().map(|t| t.services.clone());
    assert_eq!(records, Some(BTreeMap::new()));
    // Asked for inside the excluded range, a service is reported as asked, never programmed.
    drop(state);
    let mut asked = ProgrammedTable::new();
    asked.insert(
        excluded,
        service(Frontend::ClusterIP, &[("10.244.0.9", 80, 1, false)]),
    );
    sync(&mut restarted, &asked).expect("sync the excluded service");
    assert_eq!(block_on(restarted.read()).expect("read"), asked);
    let state = kernel.state();
    assert_eq!(
        state.services.get(&excluded_service.service.id),
        Some(&excluded_service)
    );
    assert!(state.link.is_empty());
}

/// The dump skipped a service (another namespace deleted services meanwhile): the GET finds
/// it, so it is read as if listed, its record kept and nothing re-created.
#[test]
fn a_service_the_dump_skips_is_read_by_its_key() {
    let (kernel, foreign) = kernel_after_first_plan();
    kernel
        .state()
        .dump_skips
        .insert(service_id(&tcp("10.96.0.1", 443)));
    let mut restarted = agent_on(&kernel);
    assert_eq!(block_on(restarted.read()).expect("read"), first_plan());
    sync(&mut restarted, &first_plan()).expect("sync");
    assert!(
        !kernel
            .state()
            .calls
            .iter()
            .any(|c| matches!(c, Call::Command(_))),
        "nothing is re-created"
    );
    assert_holds(&kernel, &first_plan(), &foreign, "after a skipping dump");
}

/// A record whose service is missing from one dump, with no GET answering, is kept; the next
/// read that misses it too forgets it. A GET that answers "absent" settles it at once.
#[test]
fn a_record_is_forgotten_only_when_two_reads_agree() {
    let (kernel, _) = kernel_after_first_plan();
    let gone = tcp("10.96.0.1", 443);
    // The service went (an agent stopped between deleting it and clearing its record) and
    // every GET fails.
    kernel.state().services.remove(&service_id(&gone));
    kernel.set_fault(Some(Fault {
        kind: Some(CallKind::GetService),
        at: 0,
        span: FaultSpan::Onward,
    }));
    let mut restarted = agent_on(&kernel);
    let table = block_on(restarted.read()).expect("first read");
    assert!(!table.contains_key(&gone));
    let recorded = |kernel: &FakeKernel| {
        let state = kernel.state();
        state
            .nft
            .as_ref()
            .is_some_and(|table| table.services.contains_key(&gone))
    };
    assert!(recorded(&kernel), "one dump alone never forgets a record");
    block_on(restarted.read()).expect("second read");
    assert!(!recorded(&kernel), "two dumps in a row missed it");

    let (kernel, _) = kernel_after_first_plan();
    kernel.state().services.remove(&service_id(&gone));
    block_on(agent_on(&kernel).read()).expect("read");
    assert!(!recorded(&kernel), "the dump and a GET agree");
}

/// A VIP an owned service needs is bound again at the read; one no service needs is unbound
/// at the end of the sync unless the sync took it up; a node address is never bound.
#[test]
fn the_read_repairs_addresses() {
    let (kernel, foreign) = kernel_after_first_plan();
    {
        let mut state = kernel.state();
        state.link.remove(&ip("10.96.0.1"));
        state.link.insert(ip("10.96.0.20"));
        state.link.insert(ip("10.96.0.77"));
        state.elsewhere.insert(ip("10.96.0.10"));
        state.link.remove(&ip("10.96.0.10"));
    }
    let mut restarted = agent_on(&kernel);
    block_on(restarted.read()).expect("read");
    {
        let state = kernel.state();
        assert!(
            state.link.contains(&ip("10.96.0.1")),
            "a needed VIP is bound again"
        );
        assert!(
            !state.link.contains(&ip("10.96.0.10")),
            "a node address is not bound"
        );
        assert!(
            state.link.contains(&ip("10.96.0.77")),
            "unbinding waits for the sync's end"
        );
    }
    // A crash between binding 10.96.0.20 and creating its service: the next sync takes it up.
    let mut plan = first_plan();
    plan.insert(
        tcp("10.96.0.20", 8080),
        service(Frontend::LoadBalancer, &[("10.244.2.9", 80, 1, false)]),
    );
    let actual = block_on(restarted.read()).expect("read");
    block_on(restarted.apply(&diff(&plan, &actual))).expect("apply");
    block_on(restarted.synced()).expect("synced");
    let state = kernel.state();
    assert!(
        state.link.contains(&ip("10.96.0.20")),
        "taken up by the sync"
    );
    assert!(
        !state.link.contains(&ip("10.96.0.77")),
        "unneeded, unbound at the end"
    );
    drop(state);
    kernel.state().elsewhere.clear();
    sync(&mut restarted, &plan).expect("sync");
    assert_holds(&kernel, &plan, &foreign, "after address repair");
}

/// Records go in before the service is created and come out after it is deleted; a VIP is
/// bound before its first service and unbound after its last one only.
#[test]
fn apply_phases_run_in_order() {
    let (kernel, _) = kernel_after_first_plan();
    let mut dataplane = agent_on(&kernel);
    sync(&mut dataplane, &second_plan()).expect("second plan");
    let calls = kernel.state().calls.clone();
    let position = |wanted: &dyn Fn(&Call) -> bool, what: &str| {
        calls
            .iter()
            .position(wanted)
            .unwrap_or_else(|| panic!("no call {what} in {calls:#?}"))
    };
    let added = tcp("10.96.0.20", 8080);
    let deleted = tcp("10.96.0.1", 443);
    let recorded = position(
        &|c| matches!(c, Call::NftUpdate { from, to } if to.services.contains_key(&added) && !from.services.contains_key(&added)),
        "recording the new service",
    );
    let bound = position(
        &|c| *c == Call::AddAddress(ip("10.96.0.20")),
        "binding its VIP",
    );
    let created = position(
        &|c| matches!(c, Call::Command(Command::NewService(s)) if s.id == service_id(&added)),
        "creating it",
    );
    assert!(
        recorded < bound && bound < created,
        "{recorded} {bound} {created}"
    );
    let removed = position(
        &|c| *c == Call::Command(Command::DelService(service_id(&deleted))),
        "deleting the old service",
    );
    let cleared = position(
        &|c| matches!(c, Call::NftUpdate { from, to } if from.services.contains_key(&deleted) && !to.services.contains_key(&deleted)),
        "clearing its record",
    );
    assert!(removed < cleared, "{removed} {cleared}");
    // 10.96.0.1:443 went, but 10.96.0.1:80 still needs the VIP; no NodePort address is bound.
    let address_calls: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c, Call::AddAddress(_) | Call::DeleteAddress(_)))
        .collect();
    assert_eq!(address_calls, vec![&Call::AddAddress(ip("10.96.0.20"))]);
    // The UDP destination that went is deleted at once and its conntrack entries flushed.
    let udp_gone = Call::Command(Command::DelDestination(
        service_id(&udp("10.96.0.10", 53)),
        ip("10.244.1.6"),
        53,
    ));
    let deleted_udp = position(&|c| *c == udp_gone, "deleting the UDP destination");
    let flushed = position(
        &|c| matches!(c, Call::FlushConntrack(_)),
        "the conntrack flush",
    );
    assert!(deleted_udp < flushed);

    // The last service on a VIP takes the VIP with it.
    kernel.state().calls.clear();
    let mut third = second_plan();
    third.remove(&tcp("10.96.0.1", 80));
    sync(&mut dataplane, &third).expect("third plan");
    let calls = kernel.state().calls.clone();
    let deleted = calls
        .iter()
        .position(|c| *c == Call::Command(Command::DelService(service_id(&tcp("10.96.0.1", 80)))));
    let unbound = calls
        .iter()
        .position(|c| *c == Call::DeleteAddress(ip("10.96.0.1")));
    assert!(
        matches!((deleted, unbound), (Some(d), Some(u)) if d < u),
        "{calls:#?}"
    );
}

/// When the records cannot be written nothing may be created (a restart would not know it):
/// every op fails and the kernel is untouched.
#[test]
fn nothing_is_created_without_its_record() {
    let (kernel, _) = kernel_after_first_plan();
    let mut dataplane = agent_on(&kernel);
    let actual = block_on(dataplane.read()).expect("read");
    let ops = diff(&second_plan(), &actual);
    kernel.state().calls.clear();
    kernel.set_fault(Some(Fault {
        kind: Some(CallKind::NftUpdate),
        at: 0,
        span: FaultSpan::Once,
    }));
    let Err(DataplaneError::Apply { failed, .. }) = block_on(dataplane.apply(&ops)) else {
        panic!("the apply must fail");
    };
    assert_eq!(failed.len(), ops.len());
    let writes = kernel
        .state()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Command(_) | Call::AddAddress(_)))
        .count();
    assert_eq!(writes, 0);
}

/// A removed TCP destination drains: weight 0 and left out of the read while it has
/// connections, deleted once it has none or its time ran out; one that comes back stops
/// draining.
#[test]
fn check_drains_deletes_drained_destinations_only() {
    let (kernel, _) = kernel_after_first_plan();
    let mut dataplane = agent_on(&kernel);
    let service = tcp("10.96.0.1", 80);
    let id = service_id(&service);
    let gone = (ip("10.244.1.5"), 8080);
    if let Some(held) = kernel.state().services.get_mut(&id) {
        if let Some(destination) = held.destinations.get_mut(&gone) {
            destination.active_connections = 2;
        }
    }
    let mut plan = first_plan();
    if let Some(programmed) = plan.get_mut(&service) {
        programmed.destinations.remove(&gone);
    }
    sync(&mut dataplane, &plan).expect("sync");
    let weight = |kernel: &FakeKernel| {
        let state = kernel.state();
        state
            .services
            .get(&id)
            .and_then(|held| held.destinations.get(&gone))
            .map(|d| d.weight)
    };
    assert_eq!(weight(&kernel), Some(0), "draining, not deleted");
    assert_eq!(
        block_on(dataplane.read()).expect("read"),
        plan,
        "left out of the read"
    );
    let now = Instant::now();
    assert!(dataplane.check_drains(true, now).is_empty());
    assert_eq!(weight(&kernel), Some(0), "connections left and time left");
    let later = now + dataplane.settings.drain_timeout;
    assert!(dataplane.check_drains(true, later).is_empty());
    assert_eq!(weight(&kernel), None, "timed out");
    assert_eq!(dataplane.draining(), 0);

    // Drained: no connections left. Then coming back while draining.
    let (kernel, _) = kernel_after_first_plan();
    let mut dataplane = agent_on(&kernel);
    sync(&mut dataplane, &plan).expect("sync");
    assert_eq!(
        weight(&kernel),
        None,
        "no connections: deleted by the apply's check"
    );
    sync(&mut dataplane, &first_plan()).expect("back");
    if let Some(destination) = kernel
        .state()
        .services
        .get_mut(&id)
        .and_then(|held| held.destinations.get_mut(&gone))
    {
        destination.inactive_connections = 1;
    }
    sync(&mut dataplane, &plan).expect("drain again");
    assert_eq!(dataplane.draining(), 1);
    sync(&mut dataplane, &first_plan()).expect("back while draining");
    assert_eq!(dataplane.draining(), 0);
    assert_eq!(weight(&kernel), Some(1));
    // A failed check keeps the drain and reports the problem.
    sync(&mut dataplane, &plan).expect("drain again");
    kernel.set_fault(Some(Fault {
        kind: Some(CallKind::Destinations),
        at: 0,
        span: FaultSpan::Once,
    }));
    let later = Instant::now() + Duration::from_secs(3600);
    assert_eq!(dataplane.check_drains(true, later).len(), 1);
    assert_eq!(dataplane.draining(), 1);
    assert!(dataplane.check_drains(true, later).is_empty());
    assert_eq!(dataplane.draining(), 0);
}

/// How many kernel calls the second plan's sync makes from a kernel holding the first.
fn calls_of_second_sync() -> usize {
    let (kernel, _) = kernel_after_first_plan();
    kernel.set_fault(Some(Fault {
        kind: None,
        at: usize::MAX,
        span: FaultSpan::Once,
    }));
    sync(&mut agent_on(&kernel), &second_plan()).expect("second plan");
    kernel.counted()
}

/// The agent dies at each kernel call of a sync in turn: the restarted agent's first sync
/// brings the kernel to the plan, and the foreign service is never touched.
#[test]
fn a_restart_after_a_crash_at_any_call_converges() {
    let calls = calls_of_second_sync();
    assert!(calls > 20, "{calls} calls");
    for at in 0..calls {
        let (kernel, foreign) = kernel_after_first_plan();
        kernel.set_fault(Some(Fault {
            kind: None,
            at,
            span: FaultSpan::Crash,
        }));
        let _ = sync(&mut agent_on(&kernel), &second_plan());
        kernel.set_fault(None);
        let context = format!("crash at call {at}");
        sync(&mut agent_on(&kernel), &second_plan()).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_holds(&kernel, &second_plan(), &foreign, &context);
    }
}

/// One kernel call fails and the agent carries on: its next sync (a fresh read, then the
/// apply) brings the kernel to the plan.
#[test]
fn the_next_sync_after_a_failed_call_converges() {
    let calls = calls_of_second_sync();
    for at in 0..calls {
        let (kernel, foreign) = kernel_after_first_plan();
        let mut dataplane = agent_on(&kernel);
        kernel.set_fault(Some(Fault {
            kind: None,
            at,
            span: FaultSpan::Once,
        }));
        let _ = sync(&mut dataplane, &second_plan());
        kernel.set_fault(None);
        let context = format!("failure at call {at}");
        sync(&mut dataplane, &second_plan()).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_holds(&kernel, &second_plan(), &foreign, &context);
    }
}
