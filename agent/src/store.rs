//! The in-memory view of the cluster that the planner reads: Services, EndpointSlices grouped
//! by the Service they belong to, and Nodes.
//!
//! Every mutation returns the Service keys it affects, so a caller can re-plan just those.

use std::collections::{BTreeMap, HashMap};

use crate::model::{EndpointSlice, Node, Service, ServiceKey};

/// `namespace/name` of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub namespace: String,
    pub name: String,
}

impl SliceKey {
    pub fn of(slice: &EndpointSlice) -> Self {
        Self {
            namespace: slice.namespace.clone(),
            name: slice.name.clone(),
        }
    }
}

/// Services, their slices and Nodes.
#[derive(Debug, Clone, Default)]
pub struct Store {
    services: BTreeMap<ServiceKey, Service>,
    /// Slices by owning Service, then by slice name (the order kube-proxy merges them in).
    slices: HashMap<ServiceKey, BTreeMap<String, EndpointSlice>>,
    slice_owner: HashMap<SliceKey, ServiceKey>,
    nodes: BTreeMap<String, Node>,
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a Service; returns the key to re-plan.
    pub fn upsert_service(&mut self, service: Service) -> ServiceKey {
        let key = service.key.clone();
        self.services.insert(key.clone(), service);
        key
    }

    /// Removes a Service; its slices stay (they may outlive it briefly in a real cluster).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Option<Service> {
        self.services.remove(key)
    }

    /// Adds or replaces a slice; returns every Service key whose endpoints changed (two when
    /// the slice's service label moved it from one Service to another).
    pub fn upsert_slice(&mut self, slice: EndpointSlice) -> Vec<ServiceKey> {
        let slice_key = SliceKey::of(&slice);
        let owner = slice.service.clone();
        let mut affected = Vec::with_capacity(2);
        if let Some(previous) = self.slice_owner.insert(slice_key.clone(), owner.clone()) {
            if previous != owner {
                self.detach_slice(&previous, &slice_key.name);
                affected.push(previous);
            }
        }
        self.slices
            .entry(owner.clone())
            .or_default()
            .insert(slice_key.name, slice);
        affected.push(owner);
        affected
    }

    /// Removes a slice; returns the Service key whose endpoints changed.
    pub fn remove_slice(&mut self, slice: &SliceKey) -> Option<ServiceKey> {
        let owner = self.slice_owner.remove(slice)?;
        self.detach_slice(&owner, &slice.name);
        Some(owner)
    }

    fn detach_slice(&mut self, owner: &ServiceKey, name: &str) {
        if let Some(by_name) = self.slices.get_mut(owner) {
            by_name.remove(name);
            if by_name.is_empty() {
                self.slices.remove(owner);
            }
        }
    }

    pub fn upsert_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }

    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        self.nodes.remove(name)
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
        self.slices.get(key).into_iter().flat_map(|s| s.values())
    }

    /// One slice by key.
    pub fn slice(&self, key: &SliceKey) -> Option<&EndpointSlice> {
        let owner = self.slice_owner.get(key)?;
        self.slices.get(owner)?.get(&key.name)
    }

    /// Every slice, in no particular order.
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.values().flat_map(|by_name| by_name.values())
    }

    pub fn slice_count(&self) -> usize {
        self.slice_owner.len()
    }
}
