//! The planner: a pure function from the store and this node to the node's table.
//!
//! Endpoint selection follows kube-proxy exactly (see DESIGN.md "Endpoint selection"); the
//! result keeps every usable endpoint in ordered tiers, and the programmed set is the first
//! non-empty tier, which is the set kube-proxy would program.

use crate::model::{Node, Service, ServiceKey};
use crate::store::Store;
use crate::table::{NodeTable, VirtualServer};

/// Knobs the planner takes from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// IPVS scheduler for every virtual server (kube-proxy's `--ipvs-scheduler`).
    pub scheduler: String,
    /// This proxy's name for `service.kubernetes.io/service-proxy-name`.
    pub proxy_name: String,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            scheduler: "rr".to_owned(),
            proxy_name: "topoproxy".to_owned(),
        }
    }
}

/// Plans the whole table for `node`.
pub fn plan(store: &Store, node: &Node, config: &PlanConfig) -> NodeTable {
    let mut table = NodeTable::new();
    for service in store.services() {
        let servers = plan_service(store, service, node, config);
        table.replace_service(&service.key, servers);
    }
    table
}

/// Re-plans one Service in place (removes it from the table if it is gone from the store).
pub fn replan_service(
    table: &mut NodeTable,
    store: &Store,
    key: &ServiceKey,
    node: &Node,
    config: &PlanConfig,
) {
    let servers = match store.service(key) {
        Some(service) => plan_service(store, service, node, config),
        None => Vec::new(),
    };
    table.replace_service(key, servers);
}

/// The virtual servers one Service contributes on `node`.
pub fn plan_service(
    store: &Store,
    service: &Service,
    node: &Node,
    config: &PlanConfig,
) -> Vec<VirtualServer> {
    let _ = (store, service, node, config);
    todo!("planner body")
}
