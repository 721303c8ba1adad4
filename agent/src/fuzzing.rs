//! Entry points for the fuzz targets in `fuzz/` (`cargo xtask fuzz`), built only with the
//! `fuzzing` feature. Each takes arbitrary bytes the way the agent would receive them from the
//! cluster, the kernel or a user, and runs the agent's own decoder on them; none may panic.
//! [`plan_with_extra_object`] also checks the "bad input stays with its object" invariant.
//!
//! They live in the library (not in `fuzz/`) because the decoders they reach are private to
//! their modules; the regression tests of every crash the fuzzers found call them too.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::config::{self, NodeNameFallbacks, RunOptions, MAX_DURATION};
use crate::dataplane::ipvs::conntrack;
use crate::dataplane::ipvs::netlink::client::{decode_ipvs, family_id_of, parse_datagram, Reply};
use crate::dataplane::ipvs::netlink::message;
use crate::dataplane::ipvs::nft::parse::parse_table;
use crate::model::ServiceKey;
use crate::planner::{self, PlanConfig};
use crate::source::file::{self, Loaded};
use crate::store::Store;
use crate::table::NodeTable;

/// A reply datagram from the kernel's IPVS family: split, classified, and every IPVS message
/// decoded as a service, a destination and an info reply.
pub fn ipvs_reply(datagram: &[u8]) {
    let _ = family_id_of(datagram);
    let Ok(replies) = parse_datagram(datagram) else {
        return;
    };
    for (_, reply) in replies {
        let Reply::Data(bytes) = reply else {
            continue;
        };
        let Ok(decoded) = decode_ipvs(bytes) else {
            continue;
        };
        if let Some(attrs) = decoded.service() {
            let _ = message::parse_service(attrs);
        }
        if let Some(attrs) = decoded.dest() {
            // The service's family stands in for a destination without one (kernels < 3.18).
            for service_address in [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                let _ = message::parse_destination(attrs, &service_address);
            }
        }
        let _ = message::parse_info(&decoded);
    }
}

/// A datagram from ctnetlink answering a dump: the sequence number is taken from the first
/// message's header (bytes 8..12) so the fuzzer reaches the per-message decoding.
pub fn conntrack_datagram(datagram: &[u8]) {
    let sequence = datagram
        .get(8..12)
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u32::from_ne_bytes);
    if let Ok(replies) = conntrack::decode_datagram(datagram, sequence, "fuzz") {
        for message in &replies.messages {
            let _ = conntrack::dumped_entry(message);
        }
    }
}

/// The JSON `nft -j list table inet topoproxy` prints.
pub fn nft_table(text: &str) {
    let _ = parse_table(text);
}

/// A `--config` file: parsed and resolved as `topoproxy run` does. A file that resolves must
/// give durations the agent can add to an `Instant` (see [`MAX_DURATION`]).
pub fn config_file(text: &str) {
    let Ok(file) = config::parse_config(text) else {
        return;
    };
    let fallbacks = NodeNameFallbacks {
        env: None,
        hostname: Some("fuzz".to_owned()),
    };
    if let Ok(settings) = config::resolve(RunOptions::default(), file, fallbacks) {
        for (name, value) in [
            ("min-sync-period", settings.min_sync_period),
            ("sync-period", settings.sync_period),
            ("source-poll-period", settings.source_poll_period),
            ("ipvs-drain-timeout", settings.ipvs.drain_timeout),
        ] {
            assert!(value <= MAX_DURATION, "{name} {value:?} passed validation");
        }
        let now = std::time::Instant::now();
        let _ = now + settings.sync_period * 2 + settings.ipvs.drain_timeout;
    }
}

/// A cluster (one file's contents) and the node to plan for.
pub struct Baseline<'a> {
    pub yaml: &'a str,
    pub node: &'a str,
}

/// Loads `baseline` plus `extra` (the contents of one more YAML file, read after it) and
/// plans the node. Never panics; and `Err` (a broken invariant) when the extra file changed
/// the table of a Service it does not touch: a Service is touched when the extra file changed
/// its object or its slices in the store, or claims one of the Service's addresses. A file
/// that changes Nodes may legitimately change every Service, so then only planning runs.
pub fn plan_with_extra_object(baseline: &Baseline<'_>, extra: &[u8]) -> Result<(), String> {
    let mut before = Loaded::default();
    if file::load_bytes(
        Path::new("baseline.yaml"),
        baseline.yaml.as_bytes(),
        &mut before,
    )
    .is_err()
    {
        return Ok(());
    }
    let mut after = Loaded::default();
    let loaded = file::load_bytes(
        Path::new("baseline.yaml"),
        baseline.yaml.as_bytes(),
        &mut after,
    )
    .and_then(|()| file::load_bytes(Path::new("extra.yaml"), extra, &mut after));
    if loaded.is_err() {
        // A file that is not YAML loads nothing: the agent keeps its last state.
        return Ok(());
    }
    let config = PlanConfig::default();
    let plan_of = |store: &Store| {
        store
            .node(baseline.node)
            .map(|node| planner::plan(store, node, &config))
    };
    // Every node must plan without panicking, whatever the extra file did to them.
    for node in after.store.nodes() {
        let _ = planner::plan(&after.store, node, &config);
    }
    if !same_nodes(&before.store, &after.store) {
        return Ok(());
    }
    let (Some(old), Some(new)) = (plan_of(&before.store), plan_of(&after.store)) else {
        return Ok(());
    };
    let touched = touched_services(&before.store, &after.store);
    check_untouched_tables(&old, &new, &touched)
}

fn same_nodes(before: &Store, after: &Store) -> bool {
    before.nodes().eq(after.nodes())
}

/// Services whose object or slices differ between the two stores.
fn touched_services(before: &Store, after: &Store) -> BTreeSet<ServiceKey> {
    let keys: BTreeSet<ServiceKey> = before
        .services()
        .chain(after.services())
        .map(|service| service.key.clone())
        .chain(
            before
                .slices()
                .chain(after.slices())
                .map(|s| s.service.clone()),
        )
        .collect();
    keys.into_iter()
        .filter(|key| {
            before.service(key) != after.service(key)
                || !before.slices_of(key).eq(after.slices_of(key))
        })
        .collect()
}

/// Every virtual server of an untouched Service is the same in both tables, unless a touched
/// Service claims its key (then the conflict rule decides, and says so in a warning).
fn check_untouched_tables(
    old: &NodeTable,
    new: &NodeTable,
    touched: &BTreeSet<ServiceKey>,
) -> Result<(), String> {
    let contested: BTreeSet<_> = touched
        .iter()
        .flat_map(|service| {
            old.claimed_keys(service)
                .iter()
                .chain(new.claimed_keys(service))
                .copied()
        })
        .collect();
    for (table, other, side) in [(old, new, "before"), (new, old, "after")] {
        for server in table.servers() {
            if touched.contains(&server.service) || contested.contains(&server.key) {
                continue;
            }
            if other.get(&server.key) != Some(server) {
                return Err(format!(
                    "{} {}:{} of untouched Service {} differs ({side} the extra file: {server:?}; \
                     other side: {:?})",
                    server.key.protocol,
                    server.key.address,
                    server.key.port,
                    server.service,
                    other.get(&server.key)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: a}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: '', port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.5]}]
";

    fn baseline() -> Baseline<'static> {
        Baseline {
            yaml: CLUSTER,
            node: "node-a",
        }
    }

    #[test]
    fn a_broken_service_leaves_the_others_alone() {
        let extra = b"apiVersion: v1\nkind: Service\nmetadata: {name: bad}\n\
                      spec: {clusterIP: nope, ports: [{port: 99999}]}\n";
        plan_with_extra_object(&baseline(), extra).expect("invariant holds");
    }

    #[test]
    fn a_slice_for_another_service_is_a_touch_of_that_service_only() {
        let extra = b"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                      metadata: {name: web-2, namespace: default, labels: {kubernetes.io/service-name: web}}\n\
                      addressType: IPv4\nports: [{name: '', port: 8080}]\nendpoints: [{addresses: [10.244.0.6]}]\n";
        plan_with_extra_object(&baseline(), extra).expect("invariant holds");
    }

    #[test]
    fn the_check_sees_a_changed_untouched_service() {
        let old = planned(CLUSTER);
        let changed = CLUSTER.replace("10.244.0.5", "10.244.0.9");
        let new = planned(&changed);
        assert_eq!(old.len(), 1, "{old:?}");
        let error = check_untouched_tables(&old, &new, &BTreeSet::new())
            .expect_err("a changed backend must be seen");
        assert!(error.contains("default/web"), "{error}");
    }

    fn planned(yaml: &str) -> NodeTable {
        let mut loaded = Loaded::default();
        file::load_bytes(Path::new("t.yaml"), yaml.as_bytes(), &mut loaded).expect("loads");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let node = loaded.store.node("node-a").expect("node");
        planner::plan(&loaded.store, node, &PlanConfig::default())
    }

    #[test]
    fn every_entry_point_takes_empty_and_garbage_input() {
        for input in [
            &b""[..],
            b"\0",
            b"\xff\xfe",
            b"{",
            &[0x10, 0, 0, 0, 2, 0, 0, 0],
        ] {
            ipvs_reply(input);
            conntrack_datagram(input);
            nft_table(&String::from_utf8_lossy(input));
            config_file(&String::from_utf8_lossy(input));
            plan_with_extra_object(&baseline(), input).expect("invariant holds");
        }
    }
}
