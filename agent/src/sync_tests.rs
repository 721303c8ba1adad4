//! The sync loop's post-sync work, kept up to date from what each sync re-planned, equals a
//! full recomputation after random sequences of changes: the firewalled load-balancer
//! frontends a dataplane cannot enforce (`withheld`), the health checks the store asks for,
//! the node table's running totals behind the table metrics and the Services falling back.
//! Among the changes: Services becoming load balancers (sharing an ingress IP, so claims are
//! shadowed and promoted) with or without source ranges and health checks, endpoints moving
//! on and off this node, slices moving between Services, failed applies, failed reads (the
//! dirty Services then wait for the next sync), resyncs, this node changing zone (a full
//! re-plan) and a dataplane that stops enforcing source ranges.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnetwork::IpNetwork;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::dataplane::memory::{MemoryDataplane, MemoryHandle};
use crate::health::HealthTracker;
use crate::metrics::Metrics;
use crate::model::{
    Endpoint, EndpointSlice, Hints, IpFamily, NodeLocality, Protocol, Service, ServicePort,
    ServiceType, SliceOrigin, SlicePort, TopologyIntent,
};
use crate::node_addresses::NodePortAddresses;
use crate::store::SliceKey;
use crate::table::{TierKind, SHARE_WHOLE};

const SERVICES: usize = 6;
const ENDPOINTS: usize = 4;
const NAMESPACE: &str = "default";
const OWN_NODE: &str = "node-a-0";
/// Where an endpoint runs: this node, another in its zone, one in another zone, nowhere known.
const PLACES: [(Option<&str>, Option<&str>); 4] = [
    (Some(OWN_NODE), Some("zone-a")),
    (Some("node-a-1"), Some("zone-a")),
    (Some("node-b-0"), Some("zone-b")),
    (None, None),
];

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn index_u8(index: usize) -> u8 {
    u8::try_from(index).unwrap_or(u8::MAX)
}

#[derive(Debug, Clone)]
struct Shape {
    load_balancer: bool,
    /// Which of two ingress IPs: Services share them, so one claim shadows another.
    ingress: u8,
    firewalled: bool,
    external_local: bool,
    /// Which of two health-check ports, if any (only with `external_local`).
    health_check: Option<u16>,
    other_proxy: bool,
    hints: bool,
}

fn service_key(index: usize) -> ServiceKey {
    ServiceKey::new(NAMESPACE, format!("svc-{index}"))
}

fn slice_key(index: usize) -> SliceKey {
    SliceKey::new(NAMESPACE, format!("svc-{index}-a"))
}

fn service(index: usize, shape: &Shape) -> Service {
    let lb = shape.load_balancer;
    let firewall: IpNetwork = "192.0.2.0/24".parse().expect("a CIDR");
    Service {
        key: service_key(index),
        service_type: if lb {
            ServiceType::LoadBalancer
        } else {
            ServiceType::ClusterIP
        },
        headless: false,
        cluster_ips: vec![v4(10, 96, 0, index_u8(index) + 1)],
        external_ips: Vec::new(),
        load_balancer_ips: if lb {
            vec![v4(198, 51, 100, shape.ingress + 1)]
        } else {
            Vec::new()
        },
        load_balancer_source_ranges: if lb && shape.firewalled {
            vec![firewall]
        } else {
            Vec::new()
        },
        ports: vec![ServicePort {
            name: "http".to_owned(),
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
        }],
        session_affinity_timeout: None,
        internal_traffic_local: false,
        external_traffic_local: lb && shape.external_local,
        topology_intent: if shape.hints {
            TopologyIntent::Auto
        } else {
            TopologyIntent::None
        },
        proxy_name: shape.other_proxy.then(|| "other-proxy".to_owned()),
        locality: None,
        health_check_node_port: if lb && shape.external_local {
            shape.health_check.map(|pick| 31_000 + pick)
        } else {
            None
        },
        scheduler: None,
    }
}

fn endpoint(service: usize, index: usize, ready: bool, place: usize) -> Endpoint {
    let (node, zone) = PLACES[place % PLACES.len()];
    Endpoint {
        address: v4(10, 1, index_u8(service), index_u8(index) + 1),
        ready,
        serving: ready,
        terminating: false,
        node_name: node.map(Arc::from),
        zone: zone.map(Arc::from),
        zone_hints: zone
            .map(|zone| Hints::from_iter([zone.to_owned()]))
            .unwrap_or_default(),
        node_hints: Hints::default(),
    }
}

fn slice(index: usize) -> EndpointSlice {
    EndpointSlice {
        name: slice_key(index).name,
        service: service_key(index),
        family: IpFamily::V4,
        origin: SliceOrigin::Local,
        ports: vec![SlicePort {
            name: "http".to_owned(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints: (0..ENDPOINTS)
            .map(|e| endpoint(index, e, true, e))
            .collect(),
    }
}

fn own_node(zone: &str) -> Node {
    Node {
        name: OWN_NODE.to_owned(),
        zone: Some(zone.to_owned()),
        region: Some("region-1".to_owned()),
        addresses: vec![v4(172, 16, 0, 1)],
        leaving: None,
        local_addresses: None,
    }
}

#[derive(Debug, Clone)]
enum Change {
    Service {
        index: usize,
        shape: Shape,
    },
    RemoveService {
        index: usize,
    },
    Endpoint {
        index: usize,
        endpoint: usize,
        ready: bool,
        place: usize,
    },
    /// The slice of Service `index` now feeds Service `to` (its service-name label changed).
    MoveSlice {
        index: usize,
        to: usize,
    },
    RemoveSlice {
        index: usize,
    },
    /// This node moves to zone-b, or back to zone-a: a full re-plan.
    OwnZone {
        zone_b: bool,
    },
    FailApply,
    /// A resync whose read fails: nothing is re-planned, the dirty Services wait.
    FailRead,
    Resync,
    StopEnforcingSourceRanges,
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        any::<bool>(),
        0u8..2,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u16..2),
        prop::bool::weighted(0.15),
        any::<bool>(),
    )
        .prop_map(
            |(
                load_balancer,
                ingress,
                firewalled,
                external_local,
                health_check,
                other_proxy,
                hints,
            )| {
                Shape {
                    load_balancer,
                    ingress,
                    firewalled,
                    external_local,
                    health_check,
                    other_proxy,
                    hints,
                }
            },
        )
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0..SERVICES, shape()).prop_map(|(index, shape)| Change::Service { index, shape }),
        1 => (0..SERVICES).prop_map(|index| Change::RemoveService { index }),
        4 => (0..SERVICES, 0..ENDPOINTS, any::<bool>(), 0..PLACES.len()).prop_map(
            |(index, endpoint, ready, place)| Change::Endpoint { index, endpoint, ready, place }
        ),
        1 => (0..SERVICES, 0..SERVICES).prop_map(|(index, to)| Change::MoveSlice { index, to }),
        1 => (0..SERVICES).prop_map(|index| Change::RemoveSlice { index }),
        1 => any::<bool>().prop_map(|zone_b| Change::OwnZone { zone_b }),
        1 => Just(Change::FailApply),
        1 => Just(Change::FailRead),
        1 => Just(Change::Resync),
        1 => Just(Change::StopEnforcingSourceRanges),
    ]
}

struct World {
    sync: SyncLoop<MemoryDataplane>,
    dataplane: MemoryHandle,
    enforcing: bool,
}

impl World {
    fn new(shapes: &[Shape], zone_policy: bool, enforcing: bool) -> Self {
        let (dataplane, handle) = MemoryDataplane::new("memory");
        if !enforcing {
            handle.ignore_source_ranges();
        }
        let state = Arc::new(AgentState {
            node_name: OWN_NODE.to_owned(),
            metrics: Metrics::new(),
            health: HealthTracker::new(Duration::from_secs(7200)),
            table: RwLock::new(NodeTable::new()),
        });
        let plan = PlanConfig {
            default_locality: if zone_policy {
                LocalityPolicy::Zone
            } else {
                LocalityPolicy::KubeProxy
            },
            // On none of the node's addresses: the health checks are tracked without
            // listening on any port of the machine running the tests.
            node_port_addresses: NodePortAddresses::parse("203.0.113.0/24").expect("a CIDR"),
            ..PlanConfig::default()
        };
        let settings = SyncSettings {
            min_sync_period: Duration::ZERO,
            sync_period: Duration::from_secs(3600),
            plan,
        };
        let mut sync = SyncLoop::new(settings, dataplane, state);
        for (index, shape) in shapes.iter().enumerate() {
            sync.handle(SourceEvent::Service(
                service_key(index),
                Some(service(index, shape)),
            ));
            sync.handle(SourceEvent::Slice(slice_key(index), Some(slice(index))));
        }
        for (node, zone) in [
            (OWN_NODE, "zone-a"),
            ("node-a-1", "zone-a"),
            ("node-b-0", "zone-b"),
        ] {
            sync.handle(SourceEvent::NodeLocality(
                node.to_owned(),
                Some(NodeLocality {
                    zone: Some(Arc::from(zone)),
                    region: Some(Arc::from("region-1")),
                }),
            ));
        }
        sync.handle(SourceEvent::Listed(Resource::Services));
        sync.handle(SourceEvent::Listed(Resource::EndpointSlices));
        sync.handle(SourceEvent::Node(Some(own_node("zone-a"))));
        Self {
            sync,
            dataplane: handle,
            enforcing,
        }
    }

    fn change(&mut self, change: &Change) {
        let sync = &mut self.sync;
        match change {
            Change::Service { index, shape } => sync.handle(SourceEvent::Service(
                service_key(*index),
                Some(service(*index, shape)),
            )),
            Change::RemoveService { index } => {
                sync.handle(SourceEvent::Service(service_key(*index), None));
            }
            Change::Endpoint {
                index,
                endpoint: position,
                ready,
                place,
            } => {
                let mut changed = sync
                    .store
                    .slice(&slice_key(*index))
                    .cloned()
                    .unwrap_or_else(|| slice(*index));
                changed.endpoints[*position] = endpoint(*index, *position, *ready, *place);
                sync.handle(SourceEvent::Slice(slice_key(*index), Some(changed)));
            }
            Change::MoveSlice { index, to } => {
                if let Some(mut moved) = sync.store.slice(&slice_key(*index)).cloned() {
                    moved.service = service_key(*to);
                    sync.handle(SourceEvent::Slice(slice_key(*index), Some(moved)));
                }
            }
            Change::RemoveSlice { index } => {
                sync.handle(SourceEvent::Slice(slice_key(*index), None));
            }
            Change::OwnZone { zone_b } => {
                let zone = if *zone_b { "zone-b" } else { "zone-a" };
                sync.handle(SourceEvent::Node(Some(own_node(zone))));
            }
            Change::FailApply => self.dataplane.fail_next_applies(1),
            Change::FailRead => {
                self.dataplane.fail_next_reads(1);
                sync.resync = true;
            }
            Change::Resync => sync.resync = true,
            Change::StopEnforcingSourceRanges => {
                self.dataplane.ignore_source_ranges();
                self.enforcing = false;
            }
        }
    }

    /// What the loop keeps up to date equals what a walk of the whole table and store gives.
    fn check(&self) -> Result<(), TestCaseError> {
        let sync = &self.sync;
        let table = read_table(&sync.state);
        if !self.enforcing {
            let firewalled: BTreeSet<VsKey> = table
                .servers()
                .filter(|vs| !vs.source_ranges.is_open())
                .map(|vs| vs.key)
                .collect();
            prop_assert_eq!(&sync.withheld, &firewalled);
        }

        let desired = healthcheck::desired(&sync.store, OWN_NODE, &sync.settings.plan);
        prop_assert_eq!(&sync.health_desired, &desired);
        let ports: BTreeMap<ServiceKey, u16> = desired
            .iter()
            .map(|(key, check)| (key.clone(), check.port))
            .collect();
        prop_assert_eq!(sync.health_check_ports(), ports);

        let backends: usize = table.servers().map(VirtualServer::programmed_len).sum();
        prop_assert_eq!(table.programmed_backends(), backends);
        let under_locality: Vec<&VirtualServer> = table
            .servers()
            .filter(|vs| !vs.locality.is_kube_proxy() || vs.has_shares())
            .collect();
        prop_assert_eq!(table.locality_servers(), under_locality.len());
        let mut sums: BTreeMap<TierKind, u64> = BTreeMap::new();
        for vs in &under_locality {
            for tier in &vs.tiers {
                *sums.entry(tier.kind).or_default() += u64::from(tier.share_ppm.unwrap_or(0));
            }
        }
        let servers = under_locality.len().max(1) as f64;
        let means: Vec<(TierKind, f64)> = sums
            .iter()
            .map(|(kind, sum)| (*kind, *sum as f64 / f64::from(SHARE_WHOLE) / servers))
            .collect();
        // The running means also list, at 0, every kind seen before (so its gauge drops to 0).
        let kept = table.locality_share_means();
        let nonzero = |means: &[(TierKind, f64)]| -> Vec<(TierKind, f64)> {
            means
                .iter()
                .copied()
                .filter(|(_, mean)| *mean != 0.0)
                .collect()
        };
        prop_assert_eq!(nonzero(&kept), nonzero(&means));
        for (kind, _) in &means {
            prop_assert!(kept.iter().any(|(listed, _)| listed == kind), "{:?}", kind);
        }

        let falling_back: HashSet<ServiceKey> = table
            .servers()
            .filter(|vs| vs.is_falling_back())
            .map(|vs| vs.service.clone())
            .collect();
        prop_assert_eq!(&sync.falling_back, &falling_back);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn post_sync_state_kept_incrementally_equals_a_full_recomputation(
        shapes in prop::collection::vec(shape(), SERVICES),
        zone_policy in any::<bool>(),
        enforcing in any::<bool>(),
        steps in prop::collection::vec(prop::collection::vec(change(), 1..=3), 1..=8),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut world = World::new(&shapes, zone_policy, enforcing);
        runtime.block_on(world.sync.sync());
        prop_assert!(world.sync.initial_sync_done, "the initial sync failed");
        world.check()?;
        for (step, changes) in steps.iter().enumerate() {
            for change in changes {
                world.change(change);
            }
            runtime.block_on(world.sync.sync());
            // A failed read ends the sync before its post-sync work (as it always did): the
            // next sync re-plans the dirty Services and looks at them.
            if changes.iter().any(|change| matches!(change, Change::FailRead)) {
                continue;
            }
            world.check().map_err(|error| {
                TestCaseError::fail(format!("after step {step} ({changes:?}): {error}"))
            })?;
        }
    }
}

/// The generator reaches what the property is about: firewalled frontends withheld, health
/// checks with local endpoints, shadowed claims, failed reads leaving Services dirty.
#[test]
fn the_generated_changes_reach_the_interesting_states() {
    let firewalled = Shape {
        load_balancer: true,
        ingress: 0,
        firewalled: true,
        external_local: true,
        health_check: Some(0),
        other_proxy: false,
        hints: false,
    };
    let open = Shape {
        firewalled: false,
        health_check: Some(1),
        ..firewalled.clone()
    };
    let plain = Shape {
        load_balancer: false,
        ..open.clone()
    };
    let mut shapes = vec![plain; SERVICES];
    shapes[1] = firewalled;
    shapes[2] = open;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut world = World::new(&shapes, false, false);
    runtime.block_on(world.sync.sync());
    world.check().expect("after the initial sync");
    assert_eq!(world.sync.withheld.len(), 1, "svc-1's ingress is withheld");
    assert_eq!(
        world.sync.health_desired.get(&service_key(1)),
        Some(&HealthCheck {
            port: 31_000,
            local_endpoints: 1
        })
    );
    let shadowed = read_table(&world.sync.state).conflicts();
    assert_eq!(shadowed.len(), 1, "svc-1 and svc-2 share an ingress IP");

    // A failed read ends the sync before anything is re-planned: svc-2 stays dirty, its
    // health check as it was.
    world.change(&Change::FailRead);
    world.change(&Change::Endpoint {
        index: 2,
        endpoint: 1,
        ready: true,
        place: 0,
    });
    runtime.block_on(world.sync.sync());
    assert!(
        world.sync.dirty.contains(&service_key(2)),
        "the read failed"
    );
    assert_eq!(
        world.sync.health_desired[&service_key(2)].local_endpoints,
        1
    );

    // svc-1 leaves: the next sync takes both; svc-2's open claim takes the ingress over and
    // nothing is withheld.
    world.change(&Change::RemoveService { index: 1 });
    runtime.block_on(world.sync.sync());
    world.check().expect("after svc-1 left");
    assert_eq!(
        world.sync.health_desired[&service_key(2)].local_endpoints,
        2
    );
    assert!(world.sync.withheld.is_empty());
}

/// A sync that is due starts at once, not at the timer's next millisecond tick: with the
/// clock between two ticks, waiting for "now" takes no time, and a later time is still waited
/// for.
#[tokio::test(start_paused = true)]
async fn a_due_sync_waits_for_no_timer_tick() {
    tokio::time::advance(Duration::from_micros(300)).await;
    let now = Instant::now();
    sleep_until_opt(Some(now)).await;
    assert_eq!(Instant::now(), now);
    let later = now + Duration::from_millis(5);
    sleep_until_opt(Some(later)).await;
    assert!(Instant::now() >= later);
}
