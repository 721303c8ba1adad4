//! Sources that fill the store: the Kubernetes API, or a directory of YAML.
//!
//! Every source reports what it saw as [`SourceEvent`]s, already converted to the model by
//! [`convert`]; the sync loop consumes them.

pub mod convert;
pub mod dir_cache;
pub mod file;
pub mod kube;
pub mod mcs;
pub mod poll;
#[cfg(test)]
pub(crate) mod test_dir;

use crate::model::{EndpointSlice, Node, NodeLocality, Service, ServiceKey};
use crate::store::SliceKey;

/// A source's initial list (or re-list) that gates programming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Node,
    /// Every Node's zone and region (metadata only).
    NodeLocalities,
    /// MCS `ServiceImport`s (listed as empty while their CRD is not installed).
    ServiceImports,
    /// EndpointSlices labelled `multicluster.kubernetes.io/service-name`.
    ImportedSlices,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Node => "node",
            Self::NodeLocalities => "nodes",
            Self::ServiceImports => "serviceimports",
            Self::ImportedSlices => "endpointslices-multicluster",
        }
    }
}

/// A change reported by a source, already converted to the model.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// A Service was added or changed (`Some`) or is gone or unusable (`None`).
    Service(ServiceKey, Option<Service>),
    /// Likewise for an EndpointSlice (in the role its key names: a Service's or a
    /// ServiceImport's). A ServiceImport comes as a `Service` whose key is of kind
    /// `ServiceImport`.
    Slice(SliceKey, Option<EndpointSlice>),
    /// This node's Node object; `None` when it was deleted.
    Node(Option<Node>),
    /// Where some Node (any Node) sits; `None` when it was deleted.
    NodeLocality(String, Option<NodeLocality>),
    /// The source finished listing `Resource`; everything it knows has been sent.
    Listed(Resource),
}
