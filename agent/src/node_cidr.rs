//! `detect-local-mode NodeCIDR`: pod traffic is traffic from this Node's own pod CIDRs
//! (`spec.podCIDRs`), as in kube-proxy. The agent waits for them at start: they are set once by
//! the node IPAM controller (or the kubelet's registration) and are immutable after, so
//! kube-proxy also reads them once (and restarts should they ever change).

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::wait::{await_condition, Condition};
use kube::{Api, Client};

/// Why the pod CIDRs could not be had.
#[derive(Debug, thiserror::Error)]
pub enum NodeCidrError {
    #[error("watching Node {node} for spec.podCIDRs")]
    Watch {
        node: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
    #[error("Node {node}: spec.podCIDRs holds {value:?}, not a CIDR")]
    Invalid {
        node: String,
        value: String,
        #[source]
        source: ipnetwork::IpNetworkError,
    },
}

/// The CIDRs a Node object gives its pods: `spec.podCIDRs`, else the older `spec.podCIDR`.
pub fn pod_cidr_strings(node: &Node) -> Vec<String> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    match &spec.pod_cidrs {
        Some(cidrs) if !cidrs.is_empty() => cidrs.clone(),
        _ => spec.pod_cidr.iter().cloned().collect(),
    }
}

fn has_pod_cidrs() -> impl Condition<Node> {
    |node: Option<&Node>| node.is_some_and(|n| !pod_cidr_strings(n).is_empty())
}

/// Waits until Node `name` has pod CIDRs and returns them.
pub async fn pod_cidrs(client: Client, name: &str) -> Result<Vec<IpNetwork>, NodeCidrError> {
    let nodes: Api<Node> = Api::all(client);
    let node = await_condition(nodes, name, has_pod_cidrs())
        .await
        .map_err(|source| NodeCidrError::Watch {
            node: name.to_owned(),
            source,
        })?;
    parse(
        name,
        node.as_ref().map(pod_cidr_strings).unwrap_or_default(),
    )
}

fn parse(node: &str, values: Vec<String>) -> Result<Vec<IpNetwork>, NodeCidrError> {
    values
        .into_iter()
        .map(|value| {
            value
                .trim()
                .parse::<IpNetwork>()
                .map_err(|source| NodeCidrError::Invalid {
                    node: node.to_owned(),
                    value,
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(spec: serde_json::Value) -> Node {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "n"}, "spec": spec}))
            .expect("a Node")
    }

    #[test]
    fn pod_cidrs_come_from_the_list_else_the_single_field() {
        let dual = node(serde_json::json!({"podCIDR": "10.244.1.0/24",
            "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]}));
        assert_eq!(pod_cidr_strings(&dual).len(), 2);
        let old = node(serde_json::json!({"podCIDR": "10.244.2.0/24"}));
        assert_eq!(pod_cidr_strings(&old), vec!["10.244.2.0/24"]);
        assert!(pod_cidr_strings(&node(serde_json::json!({}))).is_empty());
        assert_eq!(parse("n", pod_cidr_strings(&dual)).expect("valid").len(), 2);
        let error = parse("n", vec!["10.244.1.0/33".to_owned()]).expect_err("invalid");
        assert!(error.to_string().contains("10.244.1.0/33"), "{error}");
    }
}
