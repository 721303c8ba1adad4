//! Merging a Service's EndpointSlices into the candidate endpoints of one Service port.
//!
//! kube-proxy keys endpoints by `IP:port` across all slices of a Service, keeps only slices of
//! the proxier's IP family and ports whose name and protocol match the Service port, and, when
//! the same `IP:port` appears twice, prefers a non-terminating entry (kubernetes#124458: a pod
//! IP reused by a new pod while the old one is still terminating). kube-proxy iterates slices in
//! Go map order, so among equals its choice is arbitrary; ours is a total order, so a plan never
//! depends on the order objects arrived in.

use std::cmp::Ordering;
use std::net::IpAddr;

use crate::model::{Endpoint, EndpointSlice, IpFamily, Protocol, SliceOrigin};

/// One endpoint of a Service port, after merging slices.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub endpoint: &'a Endpoint,
    pub port: u16,
    pub origin: &'a SliceOrigin,
    pub slice: &'a str,
    /// In another cluster: labelled with a source cluster that is not this cluster's id.
    remote: bool,
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
            .then_with(|| self.slice.cmp(other.slice))
            .then_with(|| a.node_name.cmp(&b.node_name))
            .then_with(|| a.zone.cmp(&b.zone))
            .then_with(|| a.zone_hints.cmp(&b.zone_hints))
            .then_with(|| a.node_hints.cmp(&b.node_hints))
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
/// sorted by (address, port); `cluster_id` says which source cluster is this one.
pub fn merge<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    family: IpFamily,
    port_name: &str,
    protocol: Protocol,
    cluster_id: Option<&str>,
) -> Vec<Candidate<'a>> {
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
                    }),
            );
        }
    }
    candidates.sort_by(|a, b| {
        (a.address(), a.port)
            .cmp(&(b.address(), b.port))
            .then_with(|| a.preference(b))
    });
    candidates.dedup_by(|later, kept| (later.address(), later.port) == (kept.address(), kept.port));
    candidates
}
