//! topoproxy: a node agent that replaces kube-proxy and routes every Service to the nearest
//! healthy backends.
//!
//! Data flows one way: a source fills the [`store::Store`]; [`planner::plan`] turns the store
//! into this node's [`table::NodeTable`]; a dataplane programs the table. The planner is a
//! pure function: no I/O, no clock.

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod diff;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod health;
pub mod healthcheck;
pub mod heap;
pub mod http;
pub mod kernel_writes;
pub mod metrics;
pub mod migrate_check;
pub mod mirror;
pub mod model;
pub mod node_addresses;
pub mod node_cidr;
pub mod node_cleanup;
pub mod planner;
pub mod render;
pub mod scheduler;
pub mod source;
pub mod state;
pub mod store;
pub mod sync;
pub mod synthetic;
pub mod table;
