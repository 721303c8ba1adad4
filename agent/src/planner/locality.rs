//! Locality tiers for Services under a topoproxy locality policy (`topoproxy.io/topology`).
//!
//! Endpoints are ordered by where they are relative to this node — this node (`node` policy
//! only), this zone, this region, this cluster, other clusters — and the spill rule
//! ([`super::spill`]) decides each tier's share. Where the EndpointSlice controller wrote hints
//! that kube-proxy would follow on this node, they still decide the near tier. Hints written
//! for `topology-mode: Auto` encode the controller's capacity-aware split, so that tier gets no
//! capacity guard; hints written for `trafficDistribution` only mirror each endpoint's own zone
//! or node (no capacity check in the controller), so the guard applies. When hints vanish
//! (a rollout, a small zone, a node without CPU information: kubernetes#114215, #122437), the
//! endpoints' own `zone` and `nodeName` keep the order, guarded by endpoints per zone versus
//! Nodes per zone, instead of kube-proxy's jump to cluster-wide.
//!
//! Under `kube-proxy` (only ever asked for a ServiceImport, which kube-proxy does not program)
//! there are just two tiers besides the last resort: this cluster, then the other clusters.
//!
//! An endpoint's region is its Node's `topology.kubernetes.io/region` label; an endpoint on an
//! unknown Node has no known region (an endpoint in this node's zone is in its region anyway).

use crate::model::{LocalityPolicy, Node, TopologyIntent};
use crate::store::Store;
use crate::table::{TierKind, TopologyMode};

use super::endpoints::Candidate;
use super::spill::TierHealth;
use super::topology::IndexTiers;

/// The tiers of one Service port under a locality policy, with what the spill rule needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityTiers {
    pub tiers: IndexTiers,
    /// One per tier of `tiers`, in the same order.
    pub health: Vec<TierHealth>,
}

/// Where this node sits and how many Nodes share its zone and region.
#[derive(Debug, Clone, Copy)]
struct Scope<'a> {
    node: &'a str,
    zone: Option<&'a str>,
    region: Option<&'a str>,
    nodes: usize,
    zone_nodes: usize,
    region_nodes: usize,
}

/// Ready counts of the localities around this node.
#[derive(Debug, Default, Clone, Copy)]
struct ReadyCounts {
    cluster: usize,
    node: usize,
    zone: usize,
    region: usize,
}

/// Orders `candidates` into locality tiers for `node` under `policy` (`KubeProxy`: this
/// cluster as one tier, then the other clusters).
pub fn locality_tiers(
    candidates: &[Candidate<'_>],
    store: &Store,
    node: &Node,
    mode: TopologyMode,
    policy: LocalityPolicy,
    intent: TopologyIntent,
) -> LocalityTiers {
    // Only topology-mode Auto hints come from the controller's capacity-aware allocation.
    let trusted_hints = intent == TopologyIntent::Auto;
    let scope = Scope {
        node: &node.name,
        zone: node.zone.as_deref(),
        region: node.region.as_deref(),
        nodes: store.located_node_count(),
        zone_nodes: node.zone.as_deref().map_or(0, |z| store.nodes_in_zone(z)),
        region_nodes: node
            .region
            .as_deref()
            .map_or(0, |r| store.nodes_in_region(r)),
    };
    let mut counts = ReadyCounts::default();
    let mut classes = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let class = classify(candidate, store, &scope, mode, policy, trusted_hints);
        if candidate.is_ready() && !candidate.is_remote() {
            counts.cluster += 1;
            counts.node += usize::from(class.on_node);
            counts.zone += usize::from(class.in_zone);
            counts.region += usize::from(class.in_region);
        }
        classes.push(class);
    }
    let mut tiers: IndexTiers = Vec::new();
    let mut health: Vec<TierHealth> = Vec::new();
    let mut serving_terminating = Vec::new();
    for (index, (candidate, class)) in candidates.iter().zip(&classes).enumerate() {
        if candidate.is_serving_terminating() {
            serving_terminating.push(index);
        }
        let position = match tiers.iter().position(|(kind, _)| *kind == class.tier) {
            Some(position) => position,
            None => {
                tiers.push((class.tier, Vec::new()));
                health.push(TierHealth {
                    ready: 0,
                    total: 0,
                    capacity: capacity(class.tier, class.hinted && trusted_hints, &scope, &counts),
                });
                tiers.len() - 1
            }
        };
        health[position].total += 1;
        if candidate.is_ready() {
            health[position].ready += 1;
            tiers[position].1.push(index);
        }
    }
    if !serving_terminating.is_empty() {
        // kube-proxy's last resort; the spill rule gives it a share only when nothing is Ready.
        tiers.push((TierKind::ServingTerminating, serving_terminating));
        let count = tiers.last().map_or(0, |(_, members)| members.len());
        health.push(TierHealth {
            ready: if counts.cluster == 0 && !any_remote_ready(candidates) {
                count
            } else {
                0
            },
            total: count,
            capacity: None,
        });
    }
    // Fallback order, and no empty tiers (a tier of only not-ready endpoints programs nothing).
    let mut paired: Vec<_> = tiers.into_iter().zip(health).collect();
    paired.retain(|((_, members), _)| !members.is_empty());
    paired.sort_by_key(|((kind, _), _)| *kind);
    let (tiers, health) = paired.into_iter().unzip();
    LocalityTiers { tiers, health }
}

fn any_remote_ready(candidates: &[Candidate<'_>]) -> bool {
    candidates.iter().any(|c| c.is_remote() && c.is_ready())
}

/// Where one endpoint sits relative to this node.
#[derive(Debug, Clone, Copy)]
struct Class {
    tier: TierKind,
    /// The tier was decided by hints (no capacity guard).
    hinted: bool,
    on_node: bool,
    in_zone: bool,
    in_region: bool,
}

fn classify(
    candidate: &Candidate<'_>,
    store: &Store,
    scope: &Scope<'_>,
    mode: TopologyMode,
    policy: LocalityPolicy,
    trusted_hints: bool,
) -> Class {
    let endpoint = candidate.endpoint;
    let endpoint_node = endpoint.node_name.as_deref();
    let located = endpoint_node.and_then(|name| store.node_locality(name));
    let zone = endpoint
        .zone
        .as_deref()
        .or_else(|| located.and_then(|l| l.zone.as_deref()));
    let region = located.and_then(|l| l.region.as_deref());
    let on_node = endpoint_node == Some(scope.node);
    let in_zone = scope.zone.is_some() && zone == scope.zone;
    let in_region = in_zone || (scope.region.is_some() && region == scope.region);
    let hinted_node = mode == TopologyMode::SameNode && endpoint.node_hints.contains(scope.node);
    let hinted_zone = mode == TopologyMode::SameZone
        && scope.zone.is_some_and(|z| endpoint.zone_hints.contains(z));
    let (tier, hinted) = if candidate.is_remote() {
        (TierKind::RemoteClusters, false)
    } else if policy.is_kube_proxy() {
        (TierKind::Cluster, false)
    } else if hinted_node {
        (TierKind::SameNode, true)
    } else if policy == LocalityPolicy::Node
        && on_node
        // The controller may have lent this node's endpoint to another zone; keeping it
        // here would undo its capacity-aware split.
        && (hinted_zone || !(trusted_hints && mode == TopologyMode::SameZone))
    {
        (TierKind::SameNode, false)
    } else if hinted_zone {
        (TierKind::SameZone, true)
    } else if mode != TopologyMode::SameZone && in_zone {
        // Under complete zone hints, an own-zone endpoint hinted elsewhere was lent away.
        (TierKind::SameZone, false)
    } else if in_region {
        (TierKind::SameRegion, false)
    } else {
        (TierKind::Cluster, false)
    };
    Class {
        tier,
        hinted,
        on_node,
        in_zone,
        in_region,
    }
}

/// The capacity guard of a tier: the locality's share of Ready endpoints over its share of
/// Nodes (clients), bounded by every enclosing locality's (node ⊂ zone ⊂ region) — also when
/// an enclosing tier holds no endpoint of its own, because the cap is on what is served
/// *within* the locality. `None` without the counts to know, for hinted tiers, and for the
/// cluster-wide tiers.
fn capacity(tier: TierKind, hinted: bool, scope: &Scope<'_>, counts: &ReadyCounts) -> Option<f64> {
    if hinted || scope.nodes == 0 || counts.cluster == 0 {
        return None;
    }
    let ratio = |ready: usize, nodes: usize| -> Option<f64> {
        (nodes > 0)
            .then(|| (ready as f64 / counts.cluster as f64) / (nodes as f64 / scope.nodes as f64))
    };
    let region = ratio(counts.region, scope.region_nodes);
    let zone = ratio(counts.zone, scope.zone_nodes);
    let node = ratio(counts.node, 1);
    let nested = |caps: &[Option<f64>]| caps.iter().flatten().copied().reduce(f64::min);
    match tier {
        TierKind::SameNode => nested(&[node, zone, region]),
        TierKind::SameZone => nested(&[zone, region]),
        TierKind::SameRegion => region,
        _ => None,
    }
}
