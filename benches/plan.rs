//! Planner benches: a full `plan()` of a large synthetic cluster for one node, and the
//! incremental path (one slice changes, one Service is re-planned).
//!
//! Targets (docs/design.md: the cost of a sync follows what changed, not how big the cluster is):
//! - full plan of 10,000 Services × 10 endpoints over 3 zones: ≤ 100 ms;
//! - re-plan of one Service after one endpoint changed: ≤ 20 µs.
//!
//! Each runs with kube-proxy's behaviour and with the `zone` locality policy as the cluster
//! default (`_zone_spill`: locality tiers, Envoy spill with the capacity guard, weights; the
//! synthetic zones hold 3 or 4 of a Service's 10 endpoints for a third of the nodes, so many
//! Services really spill 10 % outward).
//!
//! Run with `cargo bench -p topoproxy --bench plan`. Sample sizes are kept small so the whole
//! run stays well under three minutes on two cores.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};

use topoproxy::model::{EndpointSlice, LocalityPolicy, Node, ServiceKey};
use topoproxy::planner::{plan, replan_service, PlanConfig};
use topoproxy::store::Store;
use topoproxy::synthetic::{
    synthetic_cluster, synthetic_node_name, synthetic_service_key, with_endpoint_flipped,
    SyntheticSpec,
};
use topoproxy::table::NodeTable;

/// The large cluster both benches use.
fn spec(with_hints: bool) -> SyntheticSpec {
    SyntheticSpec {
        services: 10_000,
        endpoints_per_service: 10,
        zones: 3,
        nodes_per_zone: 10,
        with_hints,
    }
}

/// The node the table is planned for (zone-a).
fn this_node(store: &Store) -> Node {
    let name = synthetic_node_name(0, 0);
    match store.node(&name) {
        Some(node) => node.clone(),
        None => panic!("synthetic cluster has no node {name}"),
    }
}

/// The two planner configurations every bench runs with.
fn configs() -> [(PlanConfig, &'static str); 2] {
    [
        (PlanConfig::default(), ""),
        (
            PlanConfig {
                default_locality: LocalityPolicy::Zone,
                ..PlanConfig::default()
            },
            "_zone_spill",
        ),
    ]
}

fn label(with_hints: bool, suffix: &str) -> String {
    let hints = if with_hints { "hints" } else { "no_hints" };
    format!("{hints}{suffix}")
}

/// The incremental path under test: store the slice, re-plan every Service it affects.
fn apply_slice(
    store: &mut Store,
    table: &mut NodeTable,
    slice: EndpointSlice,
    node: &Node,
    config: &PlanConfig,
) {
    for affected in store.upsert_slice(slice) {
        replan_service(table, store, &affected, node, config);
    }
}

fn full_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("full_plan_10k_services_x_10_endpoints_3_zones");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for with_hints in [true, false] {
        let store = synthetic_cluster(&spec(with_hints));
        let node = this_node(&store);
        for (config, suffix) in configs() {
            group.bench_function(label(with_hints, suffix), |b| {
                b.iter(|| plan(black_box(&store), black_box(&node), &config))
            });
        }
    }
    group.finish();
}

fn replan_one_service(c: &mut Criterion) {
    let mut group = c.benchmark_group("replan_one_service_after_endpoint_change");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (with_hints, (config, suffix)) in [true, false]
        .into_iter()
        .flat_map(|hints| configs().map(|config| (hints, config)))
    {
        let mut store = synthetic_cluster(&spec(with_hints));
        let node = this_node(&store);
        // svc-5010 has two ports (http and dns), so it contributes two virtual servers, and
        // its first endpoint (the one flipped) sits on node-a-0 in zone-a, this very node, so
        // the flip changes what this node programs.
        let key: ServiceKey = synthetic_service_key(5_010);
        let original: EndpointSlice = match store.slices_of(&key).next() {
            Some(slice) => slice.clone(),
            None => panic!("synthetic cluster has no slice for {key}"),
        };
        let flipped = match with_endpoint_flipped(&store, &key) {
            Some(slice) => slice,
            None => panic!("synthetic cluster has no endpoint for {key}"),
        };
        let mut table = plan(&store, &node, &config);
        let servers_before = table.len();

        // The change must be visible on this node, or the bench would measure a no-op.
        let baseline = table.clone();
        apply_slice(&mut store, &mut table, flipped.clone(), &node, &config);
        assert!(
            table != baseline,
            "flipping {key}'s endpoint changed nothing on this node"
        );
        apply_slice(&mut store, &mut table, original.clone(), &node, &config);
        assert!(table == baseline, "flipping back did not restore the table");

        // Setup (not measured) hands out the two versions alternately; the first one handed
        // out is the flipped version, since the store holds the original.
        let mut next_is_flipped = false;
        group.bench_function(label(with_hints, suffix), |b| {
            b.iter_batched(
                || {
                    next_is_flipped = !next_is_flipped;
                    if next_is_flipped {
                        flipped.clone()
                    } else {
                        original.clone()
                    }
                },
                |slice| apply_slice(&mut store, &mut table, slice, &node, &config),
                BatchSize::SmallInput,
            )
        });
        assert_eq!(
            table.len(),
            servers_before,
            "re-planning changed the table size"
        );
    }
    group.finish();
}

criterion_group!(benches, full_plan, replan_one_service);
criterion_main!(benches);
