//! Merging a Service's EndpointSlices into the candidate endpoints of one Service port.
//!
//! kube-proxy keys endpoints by `IP:port` across all slices of a Service, keeps only slices of
//! the proxier's IP family and ports whose name and protocol match the Service port, and, when
//! the same `IP:port` appears twice, prefers a non-terminating entry (kubernetes#124458: a pod
//! IP reused by a new pod while the old one is still terminating). kube-proxy iterates slices in
//! Go map order, so among equals its choice is arbitrary; ours is a total order, so a plan never
//! depends on the order objects arrived in.
//!
//! Among equally ready copies, the one whose node gives the most specific locality wins (a
//! zone, then a region, then a Node this agent knows): Admiralty's multicluster-scheduler lists
//! each delegated pod twice with one IP, a proxy pod on a virtual node (no zone, no region) and
//! the delegate on its real node, and the copy on the virtual node would strip an opted-in
//! Service of its zone and region preference. Each dropped copy is kept as a [`Duplicate`]
//! for `plan --explain`.

use std::cmp::Ordering;
use std::net::IpAddr;

use crate::model::{Endpoint, EndpointSlice, IpFamily, Protocol, SliceOrigin};
use crate::store::Store;

/// How much an endpoint's node says about where it is; more is preferred among duplicates.
/// Field order is significance order (derived `Ord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    /// A zone: the endpoint's own, else its Node's label.
    pub zone: bool,
    /// Its Node's region label.
    pub region: bool,
    /// Its Node is one this agent knows.
    pub known_node: bool,
}

impl Specificity {
    fn of(endpoint: &Endpoint, nodes: &Store) -> Self {
        let node = endpoint.node_name.as_deref().and_then(|n| nodes.node(n));
        Self {
            zone: endpoint.zone.is_some() || node.is_some_and(|n| n.zone.is_some()),
            region: node.is_some_and(|n| n.region.is_some()),
            known_node: node.is_some(),
        }
    }
}

/// A copy of an `IP:port` left out because another copy was preferred.
#[derive(Debug, Clone, Copy)]
pub struct Duplicate<'a> {
    pub dropped: Candidate<'a>,
    /// Why the kept copy won.
    pub why: &'static str,
}

/// One endpoint of a Service port, after merging slices.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub endpoint: &'a Endpoint,
    pub port: u16,
    pub origin: &'a SliceOrigin,
    pub slice: &'a str,
    /// In another cluster: labelled with a source cluster that is not this cluster's id.
    remote: bool,
    specificity: Specificity,
}

impl Candidate<'_> {
    pub fn address(&self) -> IpAddr {
        self.endpoint.address
    }

    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// Ready, as kube-proxy's `IsReady` (terminating does not matter).
    pub fn is_ready(&self) -> bool {
        self.endpoint.ready
    }

    /// Usable only as a last resort: serving while terminating, but not ready.
    pub fn is_serving_terminating(&self) -> bool {
        !self.endpoint.ready && self.endpoint.serving && self.endpoint.terminating
    }

    /// Which of two entries for the same `IP:port` to keep; `Less` means `self` is kept.
    fn preference(&self, other: &Self) -> Ordering {
        let a = self.endpoint;
        let b = other.endpoint;
        a.terminating
            .cmp(&b.terminating)
            .then_with(|| self.remote.cmp(&other.remote))
            .then_with(|| self.origin.cmp(other.origin))
            .then_with(|| b.ready.cmp(&a.ready))
            .then_with(|| b.serving.cmp(&a.serving))
            .then_with(|| other.specificity.cmp(&self.specificity))
            .then_with(|| self.slice.cmp(other.slice))
            .then_with(|| a.node_name.cmp(&b.node_name))
            .then_with(|| a.zone.cmp(&b.zone))
            .then_with(|| a.zone_hints.cmp(&b.zone_hints))
            .then_with(|| a.node_hints.cmp(&b.node_hints))
    }

    /// Why `self` was kept over `other`, from the first criterion of [`Self::preference`]
    /// that tells them apart.
    fn kept_because(&self, other: &Self) -> &'static str {
        let (a, b) = (self.endpoint, other.endpoint);
        if a.terminating != b.terminating {
            "the other copy is terminating (a reused pod IP)"
        } else if self.remote != other.remote {
            "this copy is in this cluster"
        } else if self.origin != other.origin {
            "this copy's slice comes from the source ordered first"
        } else if a.ready != b.ready {
            "this copy is ready"
        } else if a.serving != b.serving {
            "this copy is serving"
        } else if self.specificity != other.specificity {
            "this copy's node gives a more specific locality (zone, then region, then a known node)"
        } else if self.slice != other.slice {
            "equal copies: this one's slice name sorts first"
        } else if a.node_name != b.node_name {
            "equal copies: this one's node name sorts first"
        } else {
            "the same endpoint listed again"
        }
    }
}

/// Whether a slice of `origin` holds another cluster's endpoints, for a cluster whose own id
/// is `cluster_id`. An MCS implementation labels this cluster's own exported endpoints with its
/// id too (KEP-1645: slices for every exporting cluster); without an id every labelled slice
/// counts as another cluster's.
pub fn is_remote(origin: &SliceOrigin, cluster_id: Option<&str>) -> bool {
    match origin {
        SliceOrigin::Local => false,
        SliceOrigin::Remote(cluster) => cluster_id != Some(cluster.as_str()),
    }
}

/// The deduplicated endpoints serving Service port (`port_name`, `protocol`) in `family`,
/// sorted by (address, port), and the copies left out; `cluster_id` says which source cluster
/// is this one, `nodes` where each endpoint's node is.
pub fn merge<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    family: IpFamily,
    port_name: &str,
    protocol: Protocol,
    cluster_id: Option<&str>,
    nodes: &Store,
) -> (Vec<Candidate<'a>>, Vec<Duplicate<'a>>) {
    let mut candidates = Vec::new();
    for slice in slices.filter(|slice| slice.family == family) {
        for slice_port in slice
            .ports
            .iter()
            .filter(|p| p.name == port_name && p.protocol == protocol)
        {
            candidates.extend(
                slice
                    .endpoints
                    .iter()
                    // Conversion already checks this; a wrong family must never reach IPVS.
                    .filter(|endpoint| IpFamily::of(&endpoint.address) == family)
                    .map(|endpoint| Candidate {
                        endpoint,
                        port: slice_port.port,
                        origin: &slice.origin,
                        slice: &slice.name,
                        remote: is_remote(&slice.origin, cluster_id),
                        specificity: Specificity::of(endpoint, nodes),
                    }),
            );
        }
    }
    candidates.sort_by(|a, b| {
        (a.address(), a.port)
            .cmp(&(b.address(), b.port))
            .then_with(|| a.preference(b))
    });
    let mut kept: Vec<Candidate<'a>> = Vec::with_capacity(candidates.len());
    let mut duplicates = Vec::new();
    for candidate in candidates {
        match kept.last() {
            Some(last) if (last.address(), last.port) == (candidate.address(), candidate.port) => {
                duplicates.push(Duplicate {
                    dropped: candidate,
                    why: last.kept_because(&candidate),
                });
            }
            _ => kept.push(candidate),
        }
    }
    (kept, duplicates)
}
