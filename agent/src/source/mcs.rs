//! The Multi-Cluster Services API types topoproxy reads (KEP-1645,
//! `multicluster.x-k8s.io/v1alpha1`): `ServiceImport`, typed.
//!
//! k8s-openapi has no MCS types, and the CRD is installed by the MCS implementation
//! (Submariner, GKE, …), not by Kubernetes. Only the fields a proxy needs are declared; serde
//! ignores the rest, so a newer CRD with more fields still decodes.

use std::borrow::Cow;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The API group of the MCS types.
pub const GROUP: &str = "multicluster.x-k8s.io";
/// The version topoproxy reads.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of a ServiceImport.
pub const API_VERSION: &str = "multicluster.x-k8s.io/v1alpha1";
/// The resource name of ServiceImports (what RBAC rules and discovery list).
pub const PLURAL: &str = "serviceimports";
/// `kind` of a ServiceImport.
pub const KIND: &str = "ServiceImport";

/// A `ServiceImport`: a Service exported from one or more clusters of the clusterset, as
/// this cluster imports it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ServiceImport {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ServiceImportSpec>,
}

/// `spec` of a ServiceImport.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// The clusterset IPs (type `ClusterSetIP`); empty for `Headless`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<String>>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<ServiceImportPort>>,
    /// `None` or `ClientIP`, as a Service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<core::SessionAffinityConfig>,
}

/// One port of a ServiceImport (a Service port without target or node port).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    pub port: i32,
}

impl kube::Resource for ServiceImport {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(KIND)
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(GROUP)
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(VERSION)
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(API_VERSION)
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(PLURAL)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;

    use super::*;

    #[test]
    fn requests_go_to_the_mcs_group() {
        assert_eq!(
            ServiceImport::url_path(&(), Some("shop")),
            "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports"
        );
    }

    #[test]
    fn decodes_the_kep_example_and_ignores_unknown_fields() {
        let import: ServiceImport = serde_yaml::from_str(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceImport\n\
             metadata: {name: web, namespace: shop}\n\
             spec:\n  type: ClusterSetIP\n  ips: [10.42.0.10]\n\
             \x20 ports: [{name: http, protocol: TCP, port: 80}]\n\
             \x20 sessionAffinity: None\n\
             status: {clusters: [{cluster: east}]}\n",
        )
        .expect("decodes");
        let spec = import.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterSetIP"));
        assert_eq!(spec.ips, Some(vec!["10.42.0.10".to_owned()]));
        assert_eq!(spec.ports.expect("ports")[0].port, 80);
    }
}
