//! What every test that runs `topoproxy run` as a child process shares, whatever feeds it:
//! the binary, the loopback addresses of its endpoints, and the flags every such run gets.
//! The two agents built on it: `cluster::YamlAgent` (a directory of YAML as its source, for
//! the dataplane tests) and `k8s/api_agent.rs`'s `ApiAgent` (a real API server).
//!
//! Include with `#[path = "support/agent_process.rs"] mod agent_process;`. `cluster.rs`
//! carries this file as its child module (`cluster::agent_process`).

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

/// The agent binary: `TOPOPROXY_BIN` (set by `cargo xtask vm-test` in the guest), else
/// cargo's own.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("TOPOPROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_topoproxy")))
}

/// A loopback address for the agent to listen on, below the ephemeral range: an ephemeral
/// port may be taken by any outgoing connection between two spawns of the same agent
/// (`k8s_harness::free_port`).
pub fn loopback_address() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, k8s_harness::free_port()))
}

/// Where an agent serves `/metrics` (and `/plan`) and `/healthz`.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub metrics: SocketAddr,
    pub healthz: SocketAddr,
}

impl Endpoints {
    /// Two fresh loopback addresses.
    pub fn on_loopback() -> Self {
        Self {
            metrics: loopback_address(),
            healthz: loopback_address(),
        }
    }
}

/// Appends `run`, what names the node and the endpoints, and `--min-sync-period 0` (a test
/// waits for a sync, not for the rate limit) to `command`, whose program is the agent.
pub fn add_run_args(command: &mut Command, node: &str, endpoints: Endpoints) {
    command
        .arg("run")
        .args(["--hostname-override", node])
        .args(["--metrics-bind-address", &endpoints.metrics.to_string()])
        .args(["--healthz-bind-address", &endpoints.healthz.to_string()])
        .args(["--min-sync-period", "0"]);
}
