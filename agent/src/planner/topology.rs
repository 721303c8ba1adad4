//! Topology: which filter kube-proxy applies on this node, and the fallback tiers around it.
//!
//! The mode is decided exactly as kube-proxy's `topologyModeFromHints`: only Ready endpoints
//! count; same-node needs every one of them to carry a node hint and one to name this node;
//! same-zone likewise with zone hints and this node's `topology.kubernetes.io/zone`. Anything
//! less and the filter is dropped entirely — all or nothing, per Service port.
//!
//! Tiers then order every usable endpoint so that the first non-empty tier is precisely what
//! kube-proxy programs, and the later tiers say where to go when that one empties.

use std::fmt;

use serde::Serialize;

use crate::model::Node;
use crate::table::{TierKind, TopologyMode};

use super::endpoints::Candidate;

/// Why the topology mode came out as it did on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TopologyReason {
    /// Every Ready endpoint has a node hint and at least one names this node.
    NodeHintsForThisNode,
    /// Every Ready endpoint has a zone hint and at least one names this node's zone.
    ZoneHintsForThisZone { zone: String },
    /// No Ready endpoint, so there is nothing to filter.
    NoReadyEndpoints,
    /// No Ready endpoint carries any hint.
    NoHints,
    /// Some Ready endpoints carry zone hints, others do not (the controller is mid-update or
    /// gave up), so kube-proxy ignores the hints.
    PartialZoneHints { without: usize, ready: usize },
    /// Hints are complete but this node has no zone label.
    NodeHasNoZone,
    /// Hints are complete but none names this node's zone.
    NoHintForZone { zone: String },
}

impl fmt::Display for TopologyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NodeHintsForThisNode => {
                f.write_str("every ready endpoint has a node hint and some name this node")
            }
            Self::ZoneHintsForThisZone { zone } => write!(
                f,
                "every ready endpoint has a zone hint and some name this node's zone {zone:?}"
            ),
            Self::NoReadyEndpoints => f.write_str("no ready endpoints"),
            Self::NoHints => f.write_str("no ready endpoint carries topology hints"),
            Self::PartialZoneHints { without, ready } => write!(
                f,
                "{without} of {ready} ready endpoints have no zone hint, so hints are ignored"
            ),
            Self::NodeHasNoZone => f.write_str(
                "hints are complete but this node has no topology.kubernetes.io/zone label",
            ),
            Self::NoHintForZone { zone } => write!(
                f,
                "hints are complete but none names this node's zone {zone:?}"
            ),
        }
    }
}

/// Decides the topology mode from the Ready, local-cluster candidates.
pub fn decide_mode(candidates: &[Candidate<'_>], node: &Node) -> (TopologyMode, TopologyReason) {
    let zone = node.zone.as_deref();
    let mut ready = 0;
    let mut all_node_hints = true;
    let mut node_hinted = false;
    let mut without_zone_hints = 0;
    let mut zone_hinted = false;
    for candidate in candidates.iter().filter(|c| c.is_ready() && !c.is_remote()) {
        let endpoint = candidate.endpoint;
        ready += 1;
        if endpoint.node_hints.is_empty() {
            all_node_hints = false;
        } else if endpoint.node_hints.contains(&node.name) {
            node_hinted = true;
        }
        if endpoint.zone_hints.is_empty() {
            without_zone_hints += 1;
        } else if zone.is_some_and(|zone| endpoint.zone_hints.contains(zone)) {
            zone_hinted = true;
        }
    }
    if ready == 0 {
        return (TopologyMode::None, TopologyReason::NoReadyEndpoints);
    }
    if all_node_hints && node_hinted {
        return (TopologyMode::SameNode, TopologyReason::NodeHintsForThisNode);
    }
    match zone {
        _ if without_zone_hints == ready => (TopologyMode::None, TopologyReason::NoHints),
        _ if without_zone_hints > 0 => (
            TopologyMode::None,
            TopologyReason::PartialZoneHints {
                without: without_zone_hints,
                ready,
            },
        ),
        None => (TopologyMode::None, TopologyReason::NodeHasNoZone),
        Some(zone) if zone_hinted => (
            TopologyMode::SameZone,
            TopologyReason::ZoneHintsForThisZone {
                zone: zone.to_owned(),
            },
        ),
        Some(zone) => (
            TopologyMode::None,
            TopologyReason::NoHintForZone {
                zone: zone.to_owned(),
            },
        ),
    }
}

/// Tiers as indices into the candidate list; tiers are never empty.
pub type IndexTiers = Vec<(TierKind, Vec<usize>)>;

/// Tiers for Cluster traffic policy: the topology-filtered Ready endpoints first (kube-proxy's
/// set), then the rest of this zone, the rest of the cluster, other clusters, and last the
/// serving-terminating endpoints kube-proxy falls back to when nothing is Ready.
pub fn cluster_tiers(candidates: &[Candidate<'_>], node: &Node, mode: TopologyMode) -> IndexTiers {
    let zone = node.zone.as_deref();
    let in_zone = |c: &Candidate<'_>| {
        zone.is_some_and(|zone| {
            c.endpoint.zone_hints.contains(zone) || c.endpoint.zone.as_deref() == Some(zone)
        })
    };
    let tier_of = |c: &Candidate<'_>| -> Option<TierKind> {
        if c.is_ready() {
            if c.is_remote() {
                return Some(TierKind::RemoteClusters);
            }
            return Some(match mode {
                TopologyMode::SameNode if c.endpoint.node_hints.contains(&node.name) => {
                    TierKind::SameNode
                }
                TopologyMode::SameNode if in_zone(c) => TierKind::SameZone,
                TopologyMode::SameZone
                    if zone.is_some_and(|zone| c.endpoint.zone_hints.contains(zone)) =>
                {
                    TierKind::SameZone
                }
                _ => TierKind::Cluster,
            });
        }
        c.is_serving_terminating()
            .then_some(TierKind::ServingTerminating)
    };
    group(candidates, tier_of)
}

/// Tiers for Local traffic policy: this node's Ready endpoints, else its serving-terminating
/// ones. Topology never applies to a local set, and it never leaves the node.
pub fn local_tiers(candidates: &[Candidate<'_>], node: &Node) -> IndexTiers {
    group(candidates, |c| {
        if c.is_remote() || c.endpoint.node_name.as_deref() != Some(node.name.as_str()) {
            return None;
        }
        if c.is_ready() {
            Some(TierKind::NodeLocal)
        } else {
            c.is_serving_terminating()
                .then_some(TierKind::NodeLocalServingTerminating)
        }
    })
}

fn group(
    candidates: &[Candidate<'_>],
    tier_of: impl Fn(&Candidate<'_>) -> Option<TierKind>,
) -> IndexTiers {
    let mut tiers: IndexTiers = Vec::new();
    for (index, candidate) in candidates.iter().enumerate() {
        let Some(kind) = tier_of(candidate) else {
            continue;
        };
        match tiers.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, members)) => members.push(index),
            None => tiers.push((kind, vec![index])),
        }
    }
    // TierKind's order is the fallback order.
    tiers.sort_by_key(|(kind, _)| *kind);
    tiers
}
