//! Every Node as the metadata-only watch decodes it: its name, its resourceVersion and its
//! zone and region labels, nothing else.
//!
//! The agent reads nothing else of other Nodes (the locality tiers' zones and regions, keyed
//! by name). Decoded as a whole `PartialObjectMeta`, each Node was its uid, timestamps,
//! every label, annotations and `managedFields` (a tree of JSON maps) for the moment it took
//! to convert: small allocations by the thousand per list page, garbage that stayed resident
//! after the list (docs/benchmarks.md, "Memory per Node"). Here the decoder skips every
//! other field.

use std::borrow::Cow;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A Node's place in the cluster, from a metadata-only list or watch. `metadata` holds only
/// `name` and `resourceVersion` (the watcher resumes from the latter).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePlace {
    pub metadata: ObjectMeta,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// The `topology.kubernetes.io/region` label.
    pub region: Option<String>,
}

/// The wire shape, every field but these skipped.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: WireMeta,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMeta {
    name: Option<String>,
    resource_version: Option<String>,
    labels: Option<WireLabels>,
}

// The names are `model::LABEL_ZONE` and `LABEL_REGION` (a test checks they agree).
#[derive(Deserialize)]
struct WireLabels {
    #[serde(rename = "topology.kubernetes.io/zone")]
    zone: Option<String>,
    #[serde(rename = "topology.kubernetes.io/region")]
    region: Option<String>,
}

impl<'de> Deserialize<'de> for NodePlace {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Wire { metadata } = Wire::deserialize(deserializer)?;
        let (zone, region) = metadata
            .labels
            .map_or((None, None), |labels| (labels.zone, labels.region));
        Ok(Self {
            metadata: ObjectMeta {
                name: metadata.name,
                resource_version: metadata.resource_version,
                ..ObjectMeta::default()
            },
            zone,
            region,
        })
    }
}

impl kube::Resource for NodePlace {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<core::Node as k8s_openapi::Resource>::KIND)
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<core::Node as k8s_openapi::Resource>::GROUP)
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<core::Node as k8s_openapi::Resource>::VERSION)
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<core::Node as k8s_openapi::Resource>::API_VERSION)
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(<core::Node as k8s_openapi::Resource>::URL_PATH_SEGMENT)
    }

    /// Metadata-only requests (`as=PartialObjectMetadata`): no spec, no status.
    fn metadata_api() -> bool {
        true
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
    use kube::core::{ObjectList, WatchEvent};
    use serde_json::json;

    use super::*;
    use crate::model::{LABEL_REGION, LABEL_ZONE};

    #[test]
    fn keeps_the_name_resource_version_zone_and_region_only() {
        let object = json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "node-a", "uid": "0c9a", "resourceVersion": "42",
                "creationTimestamp": "2026-12-07T10:00:00Z",
                "labels": {
                    "kubernetes.io/hostname": "node-a",
                    LABEL_ZONE: "zone-1",
                    LABEL_REGION: "region-1",
                    "node.kubernetes.io/instance-type": "m5.large",
                },
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                                   "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}],
            },
        });
        let place: NodePlace = serde_json::from_value(object).unwrap();
        assert_eq!(
            place,
            NodePlace {
                metadata: ObjectMeta {
                    name: Some("node-a".to_owned()),
                    resource_version: Some("42".to_owned()),
                    ..ObjectMeta::default()
                },
                zone: Some("zone-1".to_owned()),
                region: Some("region-1".to_owned()),
            }
        );
    }

    #[test]
    fn missing_labels_or_metadata_are_no_place() {
        let no_labels: NodePlace =
            serde_json::from_value(json!({"metadata": {"name": "node-b"}})).unwrap();
        assert_eq!((no_labels.zone, no_labels.region), (None, None));
        assert_eq!(no_labels.metadata.name.as_deref(), Some("node-b"));
        let other_labels: NodePlace = serde_json::from_value(
            json!({"metadata": {"name": "node-c", "labels": {"kubernetes.io/os": "linux"}}}),
        )
        .unwrap();
        assert_eq!((other_labels.zone, other_labels.region), (None, None));
        let empty: NodePlace = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty, NodePlace::default());
    }

    /// The shapes the watcher decodes: a metadata-only list page and a watch event.
    #[test]
    fn decodes_a_list_page_and_a_watch_event() {
        let list: ObjectList<NodePlace> = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "7", "continue": "next"},
            "items": [
                {"metadata": {"name": "n1", "resourceVersion": "5", "labels": {LABEL_ZONE: "z1"}}},
                {"metadata": {"name": "n2", "resourceVersion": "6"}},
            ],
        }))
        .unwrap();
        let names: Vec<_> = list.items.iter().map(|n| n.metadata.name.clone()).collect();
        assert_eq!(names, [Some("n1".to_owned()), Some("n2".to_owned())]);
        assert_eq!(list.items[0].zone.as_deref(), Some("z1"));
        assert_eq!(list.metadata.continue_.as_deref(), Some("next"));

        let event: WatchEvent<NodePlace> = serde_json::from_value(json!({
            "type": "MODIFIED",
            "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                       "metadata": {"name": "n1", "resourceVersion": "8",
                                    "labels": {LABEL_ZONE: "z2"}}},
        }))
        .unwrap();
        let WatchEvent::Modified(place) = event else {
            panic!("a modification: {event:?}");
        };
        assert_eq!(place.zone.as_deref(), Some("z2"));
        assert_eq!(place.metadata.resource_version.as_deref(), Some("8"));
    }
}
