//! State the running agent shares between its sync loop and its HTTP endpoints.

use std::sync::RwLock;

use crate::health::HealthTracker;
use crate::metrics::Metrics;
use crate::table::NodeTable;

/// Owned by the agent, read by `/healthz`, `/livez`, `/metrics` and `/plan`.
pub struct AgentState {
    /// The node this agent plans for.
    pub node_name: String,
    pub metrics: Metrics,
    pub health: HealthTracker,
    /// The node's current table: what was last planned and handed to the dataplane. The sync
    /// loop mutates it in place (re-planning only dirty Services) under a short write lock.
    pub table: RwLock<NodeTable>,
}
