//! North-south in eBPF mode on the host kernel, with real traffic (needs root): the checks
//! of `support/north_south_world.rs`, where the world is drawn. The same checks run in the VM
//! on Debian's 6.1 kernel, through netlink filters instead of tcx (`vm_north_south_traffic`).
//!
//! Benchmark (ignored; `cargo test --test host_north_south -- --ignored --nocapture bench_`):
//! request/response through the tc path against straight to the pod, and the conntrack map's
//! memory.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/north_south_world.rs"]
#[macro_use]
mod world;

use world::*;

/// One test per check of the world.
macro_rules! checks {
    ($($check:ident),* $(,)?) => {$(
        #[test]
        fn $check() {
            world::$check();
        }
    )*};
}

every_check!(checks);

#[test]
#[ignore = "benchmark: cargo test --test host_north_south -- --ignored --nocapture bench_"]
fn bench_request_response_through_tc_vs_direct() {
    let (world, _dataplane) = programmed();
    let total: usize = std::env::var("TOPOPROXY_BENCH_ROUND_TRIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let chunk = 1_000.min(total);
    // (name, through tc, direct): a local backend (Local policy: DNAT only) and a remote one
    // (externalIP: DNAT + SNAT, replies redirected), each against the same pod directly.
    let paths = [
        ("local pod", (NODE, NODE_PORT_LOCAL), (LOCAL_POD, POD_PORT)),
        (
            "remote pod",
            (EXTERNAL_IP, EXTERNAL_PORT),
            (REMOTE_POD, POD_PORT),
        ),
    ];
    for (name, (via, via_port), (pod, pod_port)) in paths {
        let mut tc = session(&world, via, via_port);
        let mut direct = session(&world, pod, pod_port);
        round_trips(&mut tc.0, &mut tc.1, chunk);
        round_trips(&mut direct.0, &mut direct.1, chunk);
        let (mut through_tc, mut straight) = (Vec::new(), Vec::new());
        // Alternate chunks so both see the same machine load.
        for round in 0..total / chunk {
            if round.is_multiple_of(2) {
                through_tc.extend(round_trips(&mut tc.0, &mut tc.1, chunk));
                straight.extend(round_trips(&mut direct.0, &mut direct.1, chunk));
            } else {
                straight.extend(round_trips(&mut direct.0, &mut direct.1, chunk));
                through_tc.extend(round_trips(&mut tc.0, &mut tc.1, chunk));
            }
        }
        let rate = |l: &[u64]| l.len() as f64 / (l.iter().sum::<u64>() as f64 / 1e9);
        let p99 = |l: &mut Vec<u64>| {
            l.sort_unstable();
            l[l.len() * 99 / 100] as f64 / 1e3
        };
        let (tc_rate, direct_rate) = (rate(&through_tc), rate(&straight));
        println!(
            "{name}: {} round trips each; through tc {tc_rate:.0}/s p99 {:.1} us; \
             direct {direct_rate:.0}/s p99 {:.1} us; rate ratio direct/tc {:.3}",
            through_tc.len(),
            p99(&mut through_tc),
            p99(&mut straight),
            direct_rate / tc_rate
        );
    }
    let conntrack = world
        .settings
        .pin_dir
        .join(topoproxy_common::MAPS_DIR)
        .join(topoproxy_common::north_south::maps::CONNTRACK);
    let memlock = map_memlock(&conntrack);
    let entries = topoproxy_common::north_south::limits::CONNTRACK;
    println!(
        "TP_NS_CT: memlock {:.1} MiB for {entries} entries (preallocated LRU: the same at any \
         load; {:.0} bytes an entry; a flow takes 2 entries under Local policy, 3 to a local and 4 to a \
         remote backend under Cluster, so 100,000 flows need 200,000-400,000)",
        memlock as f64 / (1 << 20) as f64,
        memlock as f64 / f64::from(entries)
    );
}
