//! What a dataplane has programmed: the state [`super::Dataplane::read`] returns and the differ
//! compares with the plan.
//!
//! These types belong to the dataplane boundary (the dataplane produces them when it reads the
//! kernel back); the differ and the sync loop consume them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use topoproxy_common::MAX_TIERS;

use crate::scheduler::Scheduler;
use crate::table::{
    Frontend, NodeTable, SourceRanges, TrafficPolicy, VirtualServer, VsKey, SHARE_WHOLE,
};

/// A virtual service's own settings, as a dataplane programs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The IPVS scheduler and its flags; [`Scheduler::name`] is the kernel's name.
    pub scheduler: Scheduler,
    /// Persistence (`sessionAffinity: ClientIP`) timeout in seconds.
    pub persistence_timeout: Option<u32>,
    /// How traffic reaches the service: decides address binding and masquerading.
    pub frontend: Frontend,
    /// The traffic policy in force (external traffic keeps its source under `Local`).
    pub traffic_policy: TrafficPolicy,
    /// Under [`TierScope::All`] and a locality policy, each tier's share of new connections.
    pub tier_shares: TierShares,
    /// Who may reach a load-balancer frontend (`loadBalancerSourceRanges`); open otherwise.
    pub source_ranges: SourceRanges,
}

/// Shares of new connections per tier position, in parts per million ([`SHARE_WHOLE`]). All
/// zero means the nearest non-empty tier takes everything: kube-proxy's behaviour, and what
/// a dataplane holding only [`TierScope::Active`] always carries (its weights say the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierShares(pub [u32; MAX_TIERS]);

impl TierShares {
    /// The shares of `vs`'s tiers in fallback order; all zero under kube-proxy's behaviour.
    /// Tiers beyond [`MAX_TIERS`] get none (the dataplane refuses them anyway).
    pub fn of(vs: &VirtualServer) -> Self {
        let mut shares = [0; MAX_TIERS];
        for (share, tier) in shares.iter_mut().zip(&vs.tiers) {
            *share = tier.share_ppm.unwrap_or(0).min(SHARE_WHOLE);
        }
        Self(shares)
    }

    /// Whether any tier has a share (a locality policy is in force).
    pub fn is_weighted(&self) -> bool {
        self.0.iter().any(|&share| share != 0)
    }

    /// Which tiers take new connections, given each tier's backend count — the datapath's
    /// rule: the non-empty tiers with a share, or the nearest non-empty tier when none has one.
    pub fn serving(&self, counts: [usize; MAX_TIERS]) -> [bool; MAX_TIERS] {
        let mut serving = [false; MAX_TIERS];
        let shared = counts
            .iter()
            .zip(self.0)
            .any(|(&n, share)| n != 0 && share != 0);
        if shared {
            for ((serves, &n), share) in serving.iter_mut().zip(&counts).zip(self.0) {
                *serves = n != 0 && share != 0;
            }
        } else if let Some(nearest) = counts.iter().position(|&n| n != 0) {
            serving[nearest] = true;
        }
        serving
    }
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
    /// The backend runs on this node. Only a dataplane that asks for it
    /// ([`super::Dataplane::marks_local_destinations`]) gets it set: IPVS masquerades hairpin
    /// traffic of node-local endpoints only, as kube-proxy does.
    pub local: bool,
}

impl DestinationState {
    /// A destination of the nearest tier, not marked local.
    pub fn active(weight: u32) -> Self {
        Self {
            weight,
            tier: 0,
            local: false,
        }
    }
}

/// One virtual service with its destinations, keyed by (address, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgrammedService {
    pub config: ServiceConfig,
    pub destinations: BTreeMap<(IpAddr, u16), DestinationState>,
}

impl ProgrammedService {
    /// What a dataplane holding `scope` programs for `vs`: its settings and its backends, those
    /// on `local_node` marked local (none when it is `None`).
    pub fn from_virtual_server(
        vs: &VirtualServer,
        scope: TierScope,
        local_node: Option<&str>,
    ) -> Self {
        Self {
            config: ServiceConfig {
                scheduler: vs.scheduler,
                persistence_timeout: vs.persistence_timeout,
                frontend: vs.frontend,
                traffic_policy: vs.traffic_policy,
                tier_shares: match scope {
                    TierScope::Active => TierShares::default(),
                    TierScope::All => TierShares::of(vs),
                },
                source_ranges: vs.source_ranges.clone(),
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
                                local: local_node
                                    .is_some_and(|node| b.node_name.as_deref() == Some(node)),
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

/// Rebuilds `table` with full B-tree nodes. Entries inserted one by one in key order (a bulk
/// load) leave every node about half full: at 10,000 virtual servers that is about 1 MiB of
/// empty slots, which a rebuild from the sorted entries does not have.
pub fn compact(table: &mut ProgrammedTable) {
    *table = std::mem::take(table).into_iter().collect();
}

/// The programmed form of a node table, for a dataplane holding `scope`, with the backends
/// on `local_node` marked local.
pub fn programmed_table(
    table: &NodeTable,
    scope: TierScope,
    local_node: Option<&str>,
) -> ProgrammedTable {
    table
        .servers()
        .map(|vs| {
            (
                vs.key,
                ProgrammedService::from_virtual_server(vs, scope, local_node),
            )
        })
        .collect()
}
