//! Nodes: addresses, locality, and whether one is leaving.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;

use crate::model::{Node, NodeLocality, LABEL_REGION, LABEL_ZONE};

use super::*;

/// A Node's place from its zone and region labels: all the metadata-only watch of every
/// Node reads. An empty label is no zone (region). (The store interns the names, so the Nodes
/// of a zone share one string.)
pub fn node_locality(zone: Option<&str>, region: Option<&str>) -> NodeLocality {
    NodeLocality {
        zone: non_empty(zone).map(Arc::from),
        region: non_empty(region).map(Arc::from),
    }
}

/// Converts a Node. Returns `None` (with a warning) only when it has no name; invalid
/// addresses are skipped one by one.
pub fn node_from_api(
    node: &core::Node,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<Node> {
    let meta = &node.metadata;
    let mut report = Report::new(
        ObjectRef::from_meta(KIND_NODE, false, meta),
        origin,
        warnings,
    );
    let name = report.required_name(meta, "node")?;
    let api_addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (i, address) in api_addresses.iter().enumerate() {
        // Hostname and DNS entries name the node; only IPs are traffic destinations.
        if address.type_ != "InternalIP" && address.type_ != "ExternalIP" {
            continue;
        }
        let field = format!("status.addresses[{i}] (type {})", address.type_);
        if let Some(ip) = report.parse_ip(&field, &address.address) {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    Some(Node {
        name,
        zone: non_empty(label(meta, LABEL_ZONE)).map(str::to_owned),
        region: non_empty(label(meta, LABEL_REGION)).map(str::to_owned),
        addresses,
        leaving: leaving(node),
        local_addresses: None,
    })
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Why `node` is leaving the cluster, as kube-proxy judges it for `/healthz` (KEP-3836):
/// a deletion timestamp, or the cluster autoscaler's deletion taint.
fn leaving(node: &core::Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("the Node is being deleted".to_owned());
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|taint| taint.key == TAINT_TO_BE_DELETED);
    tainted.then(|| format!("the Node is tainted {TAINT_TO_BE_DELETED}"))
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::source::convert::test_support::*;

    fn node_object(object: Json) -> (Option<Node>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = node_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }

    #[test]
    fn node_topology_and_addresses() {
        let (node, warnings) = node_object(json!({
            "metadata": {"name": "node-a", "labels": {LABEL_ZONE: "zone-1", LABEL_REGION: "region-1"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "ExternalIP", "address": "10.0.0.1"},
                {"type": "InternalDNS", "address": "node-a.internal"},
                {"type": "InternalIP", "address": "10.0.0.999"},
            ]},
        }));
        assert_eq!(
            node,
            Some(Node {
                name: "node-a".into(),
                zone: Some("zone-1".into()),
                region: Some("region-1".into()),
                addresses: vec![ip("10.0.0.1"), ip("fd00::1"), ip("203.0.113.7")],
                leaving: None,
                local_addresses: None,
            })
        );
        assert_eq!(
            messages(&warnings),
            vec![
                r#"status.addresses[6] (type InternalIP): "10.0.0.999" is not a valid IP address; address skipped"#
            ]
        );
        assert_eq!(warnings[0].object.to_string(), "Node node-a");
    }

    #[test]
    fn node_without_topology_labels_or_name() {
        let cases = [json!({}), json!({LABEL_ZONE: "", LABEL_REGION: ""})];
        for labels in cases {
            let (node, warnings) =
                node_object(json!({"metadata": {"name": "node-b", "labels": labels}}));
            assert!(warnings.is_empty());
            let node = node.unwrap();
            assert_eq!((node.zone, node.region), (None, None), "{labels}");
            assert!(node.addresses.is_empty());
        }

        let (node, warnings) = node_object(json!({"metadata": {}}));
        assert_eq!(node, None);
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            warnings[0].to_string(),
            "test.yaml: Node <unnamed>: metadata.name is missing; node dropped"
        );
    }

    #[test]
    fn health_check_node_ports_only_for_external_local_load_balancers() {
        let port = |type_: &str, policy: &str| {
            service_object(json!({
                "metadata": {"name": "lb"},
                "spec": {"type": type_, "externalTrafficPolicy": policy,
                         "healthCheckNodePort": 32000, "clusterIP": "10.96.0.9"},
            }))
            .0
            .and_then(|service| service.health_check_node_port)
        };
        assert_eq!(port("LoadBalancer", "Local"), Some(32000));
        assert_eq!(port("LoadBalancer", "Cluster"), None);
        assert_eq!(port("NodePort", "Local"), None);
        let (service, warnings) = service_object(json!({
            "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 70000, "clusterIP": "10.96.0.9"},
        }));
        assert_eq!(service.and_then(|s| s.health_check_node_port), None);
        assert_eq!(
            messages(&warnings),
            vec!["spec.healthCheckNodePort: 70000 is out of range 1-65535; health check dropped"]
        );
    }

    #[test]
    fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_leaving() {
        let leaving = |object: Json| node_object(object).0.and_then(|node| node.leaving);
        assert_eq!(leaving(json!({"metadata": {"name": "n"}})), None);
        assert_eq!(
            leaving(
                json!({"metadata": {"name": "n", "deletionTimestamp": "2026-12-01T10:00:00Z"}})
            ),
            Some("the Node is being deleted".to_owned())
        );
        let tainted = json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733047200", "effect": "NoSchedule"},
            ]},
        });
        assert_eq!(
            leaving(tainted),
            Some("the Node is tainted ToBeDeletedByClusterAutoscaler".to_owned())
        );
        let other_taint = json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": "DeletionCandidateOfClusterAutoscaler", "effect": "PreferNoSchedule"}]},
        });
        assert_eq!(leaving(other_taint), None);
    }
}
