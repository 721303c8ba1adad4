//! What a dataplane has programmed: the state [`super::Dataplane::read`] returns and the differ
//! compares with the plan.
//!
//! These types belong to the dataplane boundary (the dataplane produces them when it reads the
//! kernel back); the differ and the sync loop consume them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::table::{Frontend, NodeTable, TrafficPolicy, VirtualServer, VsKey};

/// A virtual service's own settings, as a dataplane programs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub scheduler: String,
    /// Persistence (`sessionAffinity: ClientIP`) timeout in seconds.
    pub persistence_timeout: Option<u32>,
    /// How traffic reaches the service: decides address binding and masquerading.
    pub frontend: Frontend,
    /// The traffic policy in force (external traffic keeps its source under `Local`).
    pub traffic_policy: TrafficPolicy,
}

/// Which tiers of a virtual server a dataplane holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TierScope {
    /// Only the tiers taking connections, as tier 0: the nearest non-empty tier under
    /// kube-proxy's behaviour (IPVS: what kube-proxy would program), every tier with a share
    /// under a locality policy, weighted.
    #[default]
    Active,
    /// Every tier, numbered in fallback order (eBPF: the datapath falls back by itself).
    All,
}

/// What a dataplane holds for one destination besides its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationState {
    pub weight: u32,
    pub tier: u8,
}

impl DestinationState {
    /// A destination of the nearest tier.
    pub fn active(weight: u32) -> Self {
        Self { weight, tier: 0 }
    }
}

/// One virtual service with its destinations, keyed by (address, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedService {
    pub config: ServiceConfig,
    pub destinations: BTreeMap<(IpAddr, u16), DestinationState>,
}

impl ProgrammedService {
    /// What a dataplane holding `scope` programs for `vs`: its settings and its backends.
    pub fn from_virtual_server(vs: &VirtualServer, scope: TierScope) -> Self {
        Self {
            config: ServiceConfig {
                scheduler: vs.scheduler.clone(),
                persistence_timeout: vs.persistence_timeout,
                frontend: vs.frontend,
                traffic_policy: vs.traffic_policy,
            },
            destinations: vs
                .tiers
                .iter()
                .enumerate()
                .zip(0u8..)
                .filter(|((position, tier), _)| match scope {
                    TierScope::Active => tier.takes_connections(*position),
                    TierScope::All => true,
                })
                .flat_map(|((_, tier), index)| {
                    // Active: every tier in use is programmed at once, as tier 0 (IPVS has no
                    // tiers; a locality policy's spill is in the weights).
                    let index = match scope {
                        TierScope::Active => 0,
                        TierScope::All => index,
                    };
                    tier.backends.iter().map(move |b| {
                        (
                            (b.address, b.port),
                            DestinationState {
                                weight: b.weight,
                                tier: index,
                            },
                        )
                    })
                })
                .collect(),
        }
    }
}

/// A dataplane's whole table.
pub type ProgrammedTable = BTreeMap<VsKey, ProgrammedService>;

/// The programmed form of a node table, for a dataplane holding `scope`.
pub fn programmed_table(table: &NodeTable, scope: TierScope) -> ProgrammedTable {
    table
        .servers()
        .map(|vs| (vs.key, ProgrammedService::from_virtual_server(vs, scope)))
        .collect()
}
