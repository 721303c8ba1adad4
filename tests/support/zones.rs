//! What the two-zone real-node tests check alike on the host (eBPF, `k8s_real_node_zones`) and
//! in the VM guest (IPVS, `vm_k8s_real_node`): the EndpointSlice hints the real controller
//! writes for `trafficDistribution: PreferClose`, and a client pod answered by exactly a given
//! set of pods.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_harness::objects::{eventually, hinted_zones, slices_of};
use k8s_harness::workloads::ask_repeatedly;
use k8s_harness::ControlPlane;
use kube::Client;

/// How a test's client pods ask: their namespace, one round of asks (its length and the time
/// between asks; one `kubectl exec`, which costs seconds under TCG), and how long a wait for
/// the expected answers may take.
pub struct Asks {
    pub namespace: &'static str,
    pub round: (&'static str, &'static str),
    pub limit: Duration,
}

pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until a round of asks from pod `client` to `address` is answered by exactly
/// `expected`, none failing.
pub async fn answered_only_by(
    plane: &ControlPlane,
    asks: &Asks,
    client: &str,
    address: &str,
    expected: &[&str],
) {
    let expected = names(expected);
    let started = Instant::now();
    loop {
        let last = match ask_repeatedly(plane, asks.namespace, client, address, asks.round, &[]) {
            Ok(answers) if answers.seen == expected && answers.failed == 0 => break,
            Ok(answers) => format!("answered by {:?}, {} failed", answers.seen, answers.failed),
            Err(e) => e,
        };
        assert!(
            started.elapsed() < asks.limit,
            "{client} asking {address} was not answered by exactly {expected:?} within \
             {:?}; last: {last}",
            asks.limit
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{client}: answered by {expected:?} only, after {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The Service's EndpointSlices as the real controller wrote them: `count` endpoints, every
/// one carrying its node's zone and a hint for that zone (`trafficDistribution: PreferClose`).
pub async fn hints_name_each_endpoints_own_zone(
    client: &Client,
    namespace: &str,
    service: &str,
    count: usize,
) {
    eventually(
        &format!("{count} endpoints of {namespace}/{service}, each hinted for its own zone"),
        Duration::from_secs(60),
        || async move {
            let slices = slices_of(client, namespace, service).await;
            let endpoints: Vec<_> = slices.iter().flat_map(|s| &s.endpoints).collect();
            let hinted = endpoints.iter().all(|endpoint| {
                let zones = hinted_zones(endpoint);
                endpoint.zone.as_deref().is_some_and(|zone| zones == [zone])
            });
            (endpoints.len() == count && hinted).then_some(())
        },
    )
    .await;
}
