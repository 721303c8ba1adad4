//! `cleanup` on a fake kernel: the node is first served by the real dataplane (so topoproxy's
//! records are what the agent writes), then kube-proxy's leftovers, a foreign service and an
//! excluded one are put beside it, and each scope must take exactly its part.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::executor::block_on;

use super::*;
use crate::dataplane::op::Op;
use crate::dataplane::{
    Dataplane, DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig,
};
use crate::diff::diff;
use crate::model::Protocol;
use crate::table::{Frontend, TrafficPolicy};

use super::super::commands::service_id;
use super::super::fake::{Call, CallKind, FakeKernel, FakeService, Fault, FaultSpan};
use super::super::netlink::{IpvsService, ServiceId};
use super::super::IpvsDataplane;

const NODE: &str = "192.168.1.10";
/// kube-proxy's ClusterIP, still on `kube-ipvs0`.
const KUBE_PROXY_VIP: &str = "10.96.5.5";
/// A service nobody recorded and not on the link (another tool's).
const FOREIGN_VIP: &str = "10.0.0.99";
/// Inside the excluded CIDR, on a node address in the NodePort range.
const EXCLUDED: &str = "10.200.0.7";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a test address")
}

fn tcp(address: &str, port: u16) -> VsKey {
    VsKey::new(Protocol::Tcp, ip(address), port)
}

fn settings() -> IpvsSettings {
    IpvsSettings {
        exclude_cidrs: vec!["10.200.0.0/16".parse().expect("a test CIDR")],
        ..IpvsSettings::default()
    }
}

fn served(frontend: Frontend) -> ProgrammedService {
    ProgrammedService {
        config: ServiceConfig {
            scheduler: crate::scheduler::Scheduler::default(),
            persistence_timeout: None,
            frontend,
            traffic_policy: TrafficPolicy::Cluster,
            tier_shares: Default::default(),
            source_ranges: Default::default(),
        },
        destinations: [((ip("10.244.0.5"), 8080), DestinationState::active(1))]
            .into_iter()
            .collect(),
    }
}

/// topoproxy's own services: two ClusterIPs and a NodePort on the node's address.
fn ours() -> ProgrammedTable {
    [
        (tcp("10.96.0.1", 443), served(Frontend::ClusterIP)),
        (tcp("10.96.0.10", 53), served(Frontend::ClusterIP)),
        (tcp(NODE, 30080), served(Frontend::NodePort)),
    ]
    .into_iter()
    .collect()
}

fn add_service(kernel: &FakeKernel, key: VsKey) -> ServiceId {
    let id = service_id(&key);
    kernel.state().services.insert(
        id,
        FakeService {
            service: IpvsService {
                id,
                scheduler: "rr".into(),
                scheduler_flags: 0,
                persistence_timeout: None,
            },
            destinations: Default::default(),
        },
    );
    id
}

/// A node topoproxy serves, with kube-proxy's leftovers (a ClusterIP on the link, a NodePort
/// on the node address), a foreign service and an excluded one beside it.
fn node() -> FakeKernel {
    let kernel = FakeKernel::new();
    kernel.state().elsewhere = [ip(NODE), ip(EXCLUDED)].into_iter().collect();
    let mut agent = IpvsDataplane::with_kernel(settings(), kernel.clone());
    block_on(async {
        let actual = agent.read().await.expect("the first read");
        let ops: Vec<Op> = diff(&ours(), &actual);
        agent.apply(&ops).await.expect("serving the plan");
        agent.synced().await.expect("the end of the sync");
    });
    add_service(&kernel, tcp(KUBE_PROXY_VIP, 80));
    kernel.state().link.insert(ip(KUBE_PROXY_VIP));
    add_service(&kernel, tcp(NODE, 31000));
    add_service(&kernel, tcp(FOREIGN_VIP, 80));
    add_service(&kernel, tcp(EXCLUDED, 30500));
    kernel.state().calls.clear();
    kernel
}

fn clean(kernel: &FakeKernel, scope: CleanupScope) -> Result<CleanupReport, CleanupError> {
    let mut kernel = kernel.clone();
    block_on(clean_kernel(
        &mut kernel,
        &settings(),
        scope,
        &DEFAULT_NODE_PORT_RANGE,
    ))
}

fn services(kernel: &FakeKernel) -> BTreeSet<VsKey> {
    kernel
        .state()
        .services
        .keys()
        .map(|id| VsKey::new(id.protocol, id.address, id.port))
        .collect()
}

fn keys(list: &[(&str, u16)]) -> BTreeSet<VsKey> {
    list.iter()
        .map(|&(address, port)| tcp(address, port))
        .collect()
}

fn addresses(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|a| ip(a)).collect()
}

const LEFT_BY_OTHERS: [(&str, u16); 2] = [(FOREIGN_VIP, 80), (EXCLUDED, 30500)];
const KUBE_PROXYS: [(&str, u16); 2] = [(KUBE_PROXY_VIP, 80), (NODE, 31000)];

#[test]
fn ours_takes_exactly_what_the_records_name() {
    let kernel = node();
    let report = clean(&kernel, CleanupScope::Ours).expect("clean-up");

    let mut kept = keys(&LEFT_BY_OTHERS);
    kept.extend(keys(&KUBE_PROXYS));
    assert_eq!(services(&kernel), kept);
    // kube-proxy's VIP keeps the link.
    assert_eq!(kernel.state().link, addresses(&[KUBE_PROXY_VIP]));
    assert!(!kernel.state().link_missing);
    assert_eq!(kernel.state().nft, None);
    assert_eq!(report.services_deleted, 3);
    assert_eq!(report.addresses_removed, 2);
    assert!(!report.link_deleted);
    assert!(report.nft_table_deleted);
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
}

#[test]
fn ours_and_kube_proxys_leave_the_foreign_and_the_excluded() {
    let kernel = node();
    let report = clean(&kernel, CleanupScope::OursAndKubeProxy).expect("clean-up");

    assert_eq!(services(&kernel), keys(&LEFT_BY_OTHERS));
    assert!(kernel.state().link_missing, "the link goes");
    assert_eq!(kernel.state().nft, None);
    assert_eq!(report.services_deleted, 5);
    assert!(report.link_deleted);
    assert!(report.nft_table_deleted);
}

#[test]
fn kube_proxy_only_keeps_everything_topoproxy_serves() {
    let kernel = node();
    let before = kernel.state().nft.clone();
    let report = clean(&kernel, CleanupScope::KubeProxyOnly).expect("clean-up");

    let mut kept = keys(&LEFT_BY_OTHERS);
    kept.extend(ours().keys().copied());
    assert_eq!(services(&kernel), kept);
    assert_eq!(
        kernel.state().link,
        addresses(&["10.96.0.1", "10.96.0.10"]),
        "only kube-proxy's VIP is unbound"
    );
    assert_eq!(kernel.state().nft, before, "topoproxy's records stay");
    assert_eq!(report.services_deleted, 2);
    assert_eq!(report.addresses_removed, 1);
    assert!(!report.link_deleted && !report.nft_table_deleted);
    let wrote_nft = kernel.state().calls.iter().any(|call| {
        matches!(
            call,
            Call::NftDelete | Call::NftReplace(_) | Call::NftUpdate { .. }
        )
    });
    assert!(!wrote_nft, "the nft table is not touched");
}

#[test]
fn a_node_without_the_link_is_cleaned_without_it() {
    let kernel = node();
    {
        let mut state = kernel.state();
        state.link_missing = true;
        state.link.clear();
    }
    let report = clean(&kernel, CleanupScope::OursAndKubeProxy).expect("clean-up");

    // Without the link kube-proxy's ClusterIP cannot be told from a foreign service and stays;
    // its NodePort on the node's address goes.
    let mut kept = keys(&LEFT_BY_OTHERS);
    kept.insert(tcp(KUBE_PROXY_VIP, 80));
    assert_eq!(services(&kernel), kept);
    assert!(!report.link_deleted);
    assert!(report.nft_table_deleted);
    let link_calls = kernel.state().calls.iter().any(|call| {
        matches!(
            call,
            Call::LinkAddresses | Call::DeleteLink | Call::DeleteAddress(_)
        )
    });
    assert!(!link_calls, "no call on the link without a link");
}

#[test]
fn a_service_gone_before_its_delete_is_not_an_error() {
    let kernel = node();
    let gone = service_id(&tcp("10.96.77.77", 80));
    let present = service_id(&tcp(FOREIGN_VIP, 80));
    let deleted = delete_services(&mut kernel.clone(), &[gone, present]).expect("deleting");
    assert_eq!(deleted, 1);
    assert!(!services(&kernel).contains(&tcp(FOREIGN_VIP, 80)));
}

#[test]
fn a_failed_delete_keeps_the_records_and_a_second_run_finishes() {
    let kernel = node();
    kernel.set_fault(Some(Fault {
        kind: Some(CallKind::Command),
        at: 1,
        span: FaultSpan::Once,
    }));
    let error = clean(&kernel, CleanupScope::Ours).expect_err("the second delete fails");
    assert!(
        matches!(error, CleanupError::DeleteService { .. }),
        "{error:?}"
    );
    assert!(
        kernel.state().nft.is_some(),
        "the records outlive a failed run, so the next one finds what is left"
    );

    kernel.set_fault(None);
    let report = clean(&kernel, CleanupScope::Ours).expect("the second run");
    let mut kept = keys(&LEFT_BY_OTHERS);
    kept.extend(keys(&KUBE_PROXYS));
    assert_eq!(services(&kernel), kept);
    assert!(report.nft_table_deleted);
}
