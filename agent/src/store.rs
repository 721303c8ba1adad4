//! The in-memory view of the cluster that the planner reads: Services, EndpointSlices grouped
//! by the Service they belong to, and Nodes.
//!
//! Every mutation returns the Service keys it affects, so a caller can re-plan just those.
//!
//! Besides full Nodes (the file source has them all; the API source only this node's), the
//! store keeps every Node's locality — zone and region, interned — with node counts per zone
//! and region, which the locality tiers' capacity guard reads (see `docs/topology.md`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::model::{
    EndpointSlice, HintNames, Node, NodeLocality, Service, ServiceKey, ServiceKind,
};

/// `namespace/name` of an EndpointSlice, and which kind of object it feeds: a slice labelled
/// for both a Service and a ServiceImport is held once for each, so the two roles change
/// independently (each has its own watch).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub owner: ServiceKind,
    pub namespace: String,
    pub name: String,
}

impl SliceKey {
    /// The key of a slice feeding a Service.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            owner: ServiceKind::Service,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of the Service (or ServiceImport) named `name` that this slice feeds.
    fn owner_named(&self, name: &str) -> ServiceKey {
        ServiceKey {
            kind: self.owner,
            namespace: self.namespace.clone(),
            name: name.to_owned(),
        }
    }

    pub fn of(slice: &EndpointSlice) -> Self {
        Self {
            owner: slice.service.kind,
            namespace: slice.service.namespace.clone(),
            name: slice.name.clone(),
        }
    }
}

/// Services, their slices and Nodes.
#[derive(Debug, Clone, Default)]
pub struct Store {
    services: BTreeMap<ServiceKey, Service>,
    /// Slices by owning Service, sorted by slice name (the order kube-proxy merges them in).
    /// A Service has one slice or a few: a sorted vector of exactly that many, where a
    /// B-tree would allocate a leaf of eleven slices for each Service.
    slices: HashMap<ServiceKey, Vec<EndpointSlice>>,
    /// The name of the Service (or ServiceImport) each slice feeds; its namespace and kind are
    /// the slice key's, so only the name is held.
    slice_owner: HashMap<SliceKey, Box<str>>,
    nodes: BTreeMap<String, Node>,
    localities: Localities,
    /// The node and zone names and the hint sets of every endpoint, each held once (the
    /// sources convert one object at a time and cannot share them across objects).
    endpoint_names: Shared<str>,
    hint_sets: Shared<HintNames>,
    /// Services carrying a `topoproxy.io/topology` annotation other than `kube-proxy`.
    locality_services: usize,
}

/// Every known Node's zone and region, and how many Nodes each zone and region has.
#[derive(Debug, Clone, Default)]
struct Localities {
    by_node: HashMap<Box<str>, NodeLocality>,
    zone_nodes: HashMap<Arc<str>, usize>,
    region_nodes: HashMap<Arc<str>, usize>,
}

impl Localities {
    /// The shared copy of a zone or region name.
    fn intern(&self, name: &str) -> Arc<str> {
        self.zone_nodes
            .get_key_value(name)
            .or_else(|| self.region_nodes.get_key_value(name))
            .map(|(shared, _)| Arc::clone(shared))
            .unwrap_or_else(|| Arc::from(name))
    }

    fn insert(&mut self, name: &str, locality: NodeLocality) -> bool {
        let locality = NodeLocality {
            zone: locality.zone.map(|zone| self.intern(&zone)),
            region: locality.region.map(|region| self.intern(&region)),
        };
        if self.by_node.get(name) == Some(&locality) {
            return false;
        }
        self.remove(name);
        count(&mut self.zone_nodes, locality.zone.as_ref(), true);
        count(&mut self.region_nodes, locality.region.as_ref(), true);
        self.by_node.insert(name.into(), locality);
        true
    }

    fn remove(&mut self, name: &str) -> bool {
        let Some(old) = self.by_node.remove(name) else {
            return false;
        };
        count(&mut self.zone_nodes, old.zone.as_ref(), false);
        count(&mut self.region_nodes, old.region.as_ref(), false);
        true
    }
}

/// One shared copy of each distinct value (names, hint sets); a value nothing else holds
/// any more is dropped when the set has doubled since it was last pruned.
#[derive(Debug)]
struct Shared<T: ?Sized> {
    shared: HashSet<Arc<T>>,
    pruned_at: usize,
}

// Derived, it would ask for `T: Clone`; cloning copies the handles, not the values.
impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            pruned_at: self.pruned_at,
        }
    }
}

impl<T: ?Sized> Default for Shared<T> {
    fn default() -> Self {
        Self {
            shared: HashSet::new(),
            pruned_at: 0,
        }
    }
}

impl<T: ?Sized + Eq + std::hash::Hash> Shared<T> {
    fn share(&mut self, name: &mut Arc<T>) {
        match self.shared.get(name) {
            Some(known) => *name = Arc::clone(known),
            None => {
                self.shared.insert(Arc::clone(name));
            }
        }
    }

    fn prune(&mut self) {
        if self.shared.len() > 2 * self.pruned_at + 64 {
            self.shared.retain(|name| Arc::strong_count(name) > 1);
            self.pruned_at = self.shared.len();
        }
    }
}

fn count(counts: &mut HashMap<Arc<str>, usize>, name: Option<&Arc<str>>, up: bool) {
    let Some(name) = name else {
        return;
    };
    if up {
        *counts.entry(Arc::clone(name)).or_default() += 1;
    } else if let Some(n) = counts.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            counts.remove(name);
        }
    }
}

fn opts_in(service: &Service) -> bool {
    service
        .locality
        .is_some_and(|policy| !policy.is_kube_proxy())
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the map of Services with full B-tree nodes. The initial list arrives in key
    /// order, and entries inserted in key order leave every node about half full: at 10,000
    /// Services that is 2 MiB of empty slots. The sync loop calls it after the initial sync.
    pub fn compact_services(&mut self) {
        self.services = std::mem::take(&mut self.services).into_iter().collect();
    }

    /// Adds or replaces a Service; returns the key to re-plan.
    pub fn upsert_service(&mut self, service: Service) -> ServiceKey {
        let key = service.key.clone();
        self.locality_services += usize::from(opts_in(&service));
        if let Some(old) = self.services.insert(key.clone(), service) {
            self.locality_services -= usize::from(opts_in(&old));
        }
        key
    }

    /// Removes a Service; its slices stay (they may outlive it briefly in a real cluster).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Option<Service> {
        let removed = self.services.remove(key);
        if let Some(old) = &removed {
            self.locality_services -= usize::from(opts_in(old));
        }
        removed
    }

    /// Whether some Service asks for locality tiers by annotation (so a change of some Node's
    /// zone or region may change plans even under a `kube-proxy` default).
    pub fn has_locality_services(&self) -> bool {
        self.locality_services > 0
    }

    /// Adds or replaces a slice; returns every Service key whose endpoints changed (two when
    /// the slice's service label moved it from one Service to another).
    pub fn upsert_slice(&mut self, mut slice: EndpointSlice) -> Vec<ServiceKey> {
        self.compact(&mut slice);
        let slice_key = SliceKey::of(&slice);
        let owner = slice.service.clone();
        let mut affected = Vec::with_capacity(2);
        let previous = self
            .slice_owner
            .insert(slice_key.clone(), owner.name.as_str().into());
        // Same namespace and kind by construction: only a new name moves the slice.
        if let Some(previous) = previous.filter(|name| **name != *owner.name) {
            let previous = slice_key.owner_named(&previous);
            self.detach_slice(&previous, &slice_key.name);
            affected.push(previous);
        }
        let by_name = self.slices.entry(owner.clone()).or_default();
        match by_name.binary_search_by(|held| held.name.cmp(&slice.name)) {
            Ok(at) => by_name[at] = slice,
            Err(at) => {
                by_name.reserve_exact(1);
                by_name.insert(at, slice);
            }
        }
        affected.push(owner);
        affected
    }

    /// Holds a slice in as little memory as it needs: vectors at their length (a converted
    /// slice's endpoints were collected into a vector grown by doubling) and every node and
    /// zone name and hint set shared with the other slices'.
    fn compact(&mut self, slice: &mut EndpointSlice) {
        slice.endpoints.shrink_to_fit();
        slice.ports.shrink_to_fit();
        for endpoint in &mut slice.endpoints {
            for name in [&mut endpoint.node_name, &mut endpoint.zone]
                .into_iter()
                .flatten()
            {
                self.endpoint_names.share(name);
            }
            for hints in [&mut endpoint.zone_hints, &mut endpoint.node_hints] {
                if let Some(set) = hints.shared_mut() {
                    self.hint_sets.share(set);
                }
            }
        }
        self.endpoint_names.prune();
        self.hint_sets.prune();
    }

    /// Removes a slice; returns the Service key whose endpoints changed.
    pub fn remove_slice(&mut self, slice: &SliceKey) -> Option<ServiceKey> {
        let owner = slice.owner_named(&self.slice_owner.remove(slice)?);
        self.detach_slice(&owner, &slice.name);
        Some(owner)
    }

    fn detach_slice(&mut self, owner: &ServiceKey, name: &str) {
        if let Some(by_name) = self.slices.get_mut(owner) {
            by_name.retain(|slice| slice.name != name);
            if by_name.is_empty() {
                self.slices.remove(owner);
            } else {
                by_name.shrink_to_fit();
            }
        }
    }

    /// Adds or replaces a full Node (and its locality).
    pub fn upsert_node(&mut self, node: Node) {
        let locality = NodeLocality {
            zone: node.zone.as_deref().map(Arc::from),
            region: node.region.as_deref().map(Arc::from),
        };
        self.localities.insert(&node.name, locality);
        self.nodes.insert(node.name.clone(), node);
    }

    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        self.localities.remove(name);
        self.nodes.remove(name)
    }

    /// Records where a Node sits; true if that changed what the store knew.
    pub fn upsert_node_locality(&mut self, name: &str, locality: NodeLocality) -> bool {
        self.localities.insert(name, locality)
    }

    /// Forgets a Node's locality; true if it was known.
    pub fn remove_node_locality(&mut self, name: &str) -> bool {
        self.localities.remove(name)
    }

    /// Where the Node `name` sits, if known.
    pub fn node_locality(&self, name: &str) -> Option<&NodeLocality> {
        self.localities.by_node.get(name)
    }

    /// The shared copy of a zone or region name, for building a [`NodeLocality`].
    pub fn intern_locality_name(&self, name: &str) -> Arc<str> {
        self.localities.intern(name)
    }

    /// Number of Nodes whose locality is known.
    pub fn located_node_count(&self) -> usize {
        self.localities.by_node.len()
    }

    /// Number of known Nodes in `zone`.
    pub fn nodes_in_zone(&self, zone: &str) -> usize {
        self.localities.zone_nodes.get(zone).copied().unwrap_or(0)
    }

    /// Number of known Nodes in `region`.
    pub fn nodes_in_region(&self, region: &str) -> usize {
        self.localities
            .region_nodes
            .get(region)
            .copied()
            .unwrap_or(0)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// Services in key order.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The slices of one Service, ordered by slice name.
    pub fn slices_of(&self, key: &ServiceKey) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.get(key).into_iter().flatten()
    }

    /// One slice by key.
    pub fn slice(&self, key: &SliceKey) -> Option<&EndpointSlice> {
        let owner = key.owner_named(self.slice_owner.get(key)?);
        self.slices
            .get(&owner)?
            .iter()
            .find(|slice| slice.name == key.name)
    }

    /// Every slice, in no particular order.
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values().flatten()
    }

    pub fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }
}
