//! EndpointSlices (of Services and of ServiceImports) and their endpoints.

use std::collections::HashSet;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1 as discovery;

use crate::model::{
    Endpoint, EndpointSlice, Hints, IpFamily, ServiceKey, ServiceKind, SliceOrigin, SlicePort,
    LABEL_HEADLESS, LABEL_MCS_SERVICE_NAME, LABEL_SERVICE_NAME, LABEL_SOURCE_CLUSTER,
};

use super::*;

/// Converts an EndpointSlice. Returns `None` for slices a proxy does not use: FQDN slices and
/// slices of headless Services silently, and (with a warning) slices without a name, without
/// a `kubernetes.io/service-name` label, or with an unknown `addressType`. Bad ports and
/// endpoints are skipped one by one.
pub fn slice_from_api(
    slice: &discovery::EndpointSlice,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<EndpointSlice> {
    slice_for(slice, ServiceKind::Service, origin, warnings)
}

/// Converts an EndpointSlice as one of a ServiceImport's (the MCS implementation's imported
/// slices): as [`slice_from_api`], but owned by the ServiceImport its
/// `multicluster.kubernetes.io/service-name` label names.
pub fn import_slice_from_api(
    slice: &discovery::EndpointSlice,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<EndpointSlice> {
    slice_for(slice, ServiceKind::ServiceImport, origin, warnings)
}

/// Whether an EndpointSlice is one of a ServiceImport's (carries the MCS service label).
pub fn is_import_slice(slice: &discovery::EndpointSlice) -> bool {
    label(&slice.metadata, LABEL_MCS_SERVICE_NAME).is_some()
}

/// Whether an EndpointSlice is one of a Service's (carries the service label).
pub fn is_service_slice(slice: &discovery::EndpointSlice) -> bool {
    label(&slice.metadata, LABEL_SERVICE_NAME).is_some()
}

fn slice_for(
    slice: &discovery::EndpointSlice,
    owner: ServiceKind,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<EndpointSlice> {
    let meta = &slice.metadata;
    let mut report = Report::new(
        ObjectRef::from_meta(KIND_ENDPOINT_SLICE, true, meta),
        origin,
        warnings,
    );
    let name = report.required_name(meta, "slice")?;
    // kube-proxy selects slices on this label's absence, whatever its value.
    if label(meta, LABEL_HEADLESS).is_some() {
        tracing::debug!(slice = %report.object, "skipping the slice of a headless service");
        return None;
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => {
            tracing::debug!(slice = %report.object, "skipping an FQDN slice");
            return None;
        }
        other => {
            report.warn(format!(
                "addressType {other:?} is not one of IPv4, IPv6, FQDN; slice dropped"
            ));
            return None;
        }
    };
    let owner_label = match owner {
        ServiceKind::Service => LABEL_SERVICE_NAME,
        ServiceKind::ServiceImport => LABEL_MCS_SERVICE_NAME,
    };
    let Some(service_name) = non_empty(label(meta, owner_label)) else {
        report.warn(format!(
            "label {owner_label} is missing or empty; slice dropped"
        ));
        return None;
    };
    let namespace = namespace_of(meta);
    let slice_origin = match non_empty(label(meta, LABEL_SOURCE_CLUSTER)) {
        Some(cluster) => SliceOrigin::Remote(cluster.to_owned()),
        None => SliceOrigin::Local,
    };

    let ports = slice_ports(slice, &mut report);
    let mut names = Names::default();
    let endpoints = slice
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, endpoint)| endpoint_from_api(i, endpoint, family, &mut names, &mut report))
        .collect();

    Some(EndpointSlice {
        service: ServiceKey {
            kind: owner,
            namespace: namespace.clone(),
            name: service_name.to_owned(),
        },
        namespace,
        name,
        family,
        origin: slice_origin,
        ports,
        endpoints,
    })
}

fn slice_ports(slice: &discovery::EndpointSlice, report: &mut Report<'_>) -> Vec<SlicePort> {
    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        let field = port_field("ports", i, port.name.as_deref());
        let Some(name) = port.name.as_deref() else {
            report.warn(format!(
                "{field}: name is missing (an unnamed port has name \"\"); port skipped"
            ));
            continue;
        };
        // A nil port is legal in the API ("all ports"), but not something a proxy can
        // program; kube-proxy skips it without complaint.
        let Some(value) = port.port else {
            tracing::debug!(slice = %report.object, port = %field, "skipping a port without a number");
            continue;
        };
        let protocol = match protocol_of(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(other) => {
                report.warn(format!(
                    "{field}: protocol {other:?} is not one of TCP, UDP, SCTP; port skipped"
                ));
                continue;
            }
        };
        let Some(number) = port_number(value) else {
            report.warn(format!(
                "{field}: port {value} is out of range 1-65535; port skipped"
            ));
            continue;
        };
        ports.push(SlicePort {
            name: name.to_owned(),
            protocol,
            port: number,
        });
    }
    ports
}

/// The few node and zone names a slice's endpoints repeat, each allocated once and shared.
#[derive(Default)]
struct Names(HashSet<Arc<str>>);

impl Names {
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.0.get(name) {
            return Arc::clone(known);
        }
        let name: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&name));
        name
    }
}

fn endpoint_from_api(
    index: usize,
    endpoint: &discovery::Endpoint,
    family: IpFamily,
    names: &mut Names,
    report: &mut Report<'_>,
) -> Option<Endpoint> {
    let Some(first) = endpoint.addresses.first() else {
        report.warn(format!(
            "endpoints[{index}]: addresses is empty; endpoint skipped"
        ));
        return None;
    };
    let field = format!("endpoints[{index}].addresses[0]");
    let Ok(address) = IpAddr::from_str(first) else {
        report.warn(format!(
            "{field}: {first:?} is not a valid IP address; endpoint skipped"
        ));
        return None;
    };
    if IpFamily::of(&address) != family {
        report.warn(format!(
            "{field}: {first:?} is an {} address but the slice's addressType is {family}; \
             endpoint skipped",
            IpFamily::of(&address)
        ));
        return None;
    }
    let conditions = endpoint.conditions.as_ref();
    let hints = endpoint.hints.as_ref();
    Some(Endpoint {
        address,
        // The API defines nil as ready and serving, and as not terminating.
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: non_empty(endpoint.node_name.as_deref()).map(|n| names.intern(n)),
        zone: non_empty(endpoint.zone.as_deref()).map(|z| names.intern(z)),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|z| z.name.clone())
            .collect::<Hints>(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|n| n.name.clone())
            .collect::<Hints>(),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::source::convert::test_support::*;

    /// A slice `default/web-abc` of Service `web` with the given address type and body.
    fn slice_with(address_type: &str, body: Json) -> (Option<EndpointSlice>, Vec<Warning>) {
        let mut object = json!({
            "metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: "web"}},
            "addressType": address_type,
        });
        if let (Some(target), Json::Object(fields)) = (object.as_object_mut(), body) {
            target.extend(fields);
        }
        slice_object(object)
    }

    #[test]
    fn slice_converts_with_ports_and_endpoints() {
        let (slice, warnings) = slice_object(json!({
            "metadata": {
                "name": "web-abc",
                "namespace": "prod",
                "labels": {LABEL_SERVICE_NAME: "web"},
            },
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "", "port": 53, "protocol": "UDP"}],
            "endpoints": [{
                "addresses": ["fd00::10", "fd00::11"],
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "nodeName": "node-a",
                "zone": "zone-1",
                "hints": {"forZones": [{"name": "zone-2"}, {"name": "zone-1"}], "forNodes": [{"name": "node-a"}]},
            }],
        }));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            slice,
            Some(EndpointSlice {
                namespace: "prod".into(),
                name: "web-abc".into(),
                service: ServiceKey::new("prod", "web"),
                family: IpFamily::V6,
                origin: SliceOrigin::Local,
                ports: vec![
                    SlicePort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: 8080
                    },
                    SlicePort {
                        name: "".into(),
                        protocol: Protocol::Udp,
                        port: 53
                    },
                ],
                endpoints: vec![Endpoint {
                    address: ip("fd00::10"),
                    ready: false,
                    serving: true,
                    terminating: true,
                    node_name: Some("node-a".into()),
                    zone: Some("zone-1".into()),
                    zone_hints: Hints::from_iter(["zone-1".to_owned(), "zone-2".to_owned()]),
                    node_hints: Hints::from_iter(["node-a".to_owned()]),
                }],
            })
        );
    }

    #[test]
    fn slices_that_are_dropped() {
        // (object, warning; None = dropped silently)
        let cases: Vec<(Json, Option<&str>)> = vec![
            (
                json!({"metadata": {"labels": {LABEL_SERVICE_NAME: "web"}}, "addressType": "IPv4"}),
                Some("metadata.name is missing; slice dropped"),
            ),
            (
                json!({"metadata": {"name": "web-abc"}, "addressType": "IPv4"}),
                Some("label kubernetes.io/service-name is missing or empty; slice dropped"),
            ),
            (
                json!({"metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: ""}}, "addressType": "IPv4"}),
                Some("label kubernetes.io/service-name is missing or empty; slice dropped"),
            ),
            (
                json!({"metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: "web"}}, "addressType": "IPv5"}),
                Some(r#"addressType "IPv5" is not one of IPv4, IPv6, FQDN; slice dropped"#),
            ),
            (
                json!({"metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: "web"}}}),
                Some(r#"addressType "" is not one of IPv4, IPv6, FQDN; slice dropped"#),
            ),
            (
                json!({"metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: "web"}},
                       "addressType": "FQDN", "endpoints": [{"addresses": ["db.example.com"]}]}),
                None,
            ),
            (
                json!({"metadata": {"name": "web-abc", "labels": {LABEL_SERVICE_NAME: "web", LABEL_HEADLESS: ""}},
                       "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.0.1"]}]}),
                None,
            ),
        ];
        for (object, warning) in cases {
            let (slice, warnings) = slice_object(object.clone());
            assert_eq!(slice, None, "{object}");
            assert_eq!(
                messages(&warnings),
                warning.into_iter().collect::<Vec<_>>(),
                "{object}"
            );
        }
    }

    #[test]
    fn slice_warning_names_the_slice() {
        let (_, warnings) = slice_object(
            json!({"metadata": {"name": "web-abc", "namespace": "prod"}, "addressType": "IPv4"}),
        );
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            warnings[0].to_string(),
            "test.yaml: EndpointSlice prod/web-abc: label kubernetes.io/service-name is missing or empty; slice dropped"
        );
    }

    #[test]
    fn import_slices_are_owned_by_the_import_their_mcs_label_names() {
        let object = json!({
            "metadata": {"name": "web-east", "namespace": "shop", "labels": {
                LABEL_MCS_SERVICE_NAME: "web", LABEL_SOURCE_CLUSTER: "east"}},
            "addressType": "IPv4",
        });
        let api_slice = api::<discovery::EndpointSlice>(object);
        assert!(is_import_slice(&api_slice) && !is_service_slice(&api_slice));
        let mut warnings = Vec::new();
        let slice = import_slice_from_api(&api_slice, ORIGIN, &mut warnings).expect("converts");
        assert!(warnings.is_empty());
        assert_eq!(slice.service, ServiceKey::import("shop", "web"));
        assert_eq!(slice.origin, SliceOrigin::Remote("east".into()));
        // As a Service's slice it has no owner: dropped with a warning naming the label.
        assert!(slice_from_api(&api_slice, ORIGIN, &mut warnings).is_none());
        assert_eq!(
            messages(&warnings),
            ["label kubernetes.io/service-name is missing or empty; slice dropped"]
        );
    }

    #[test]
    fn slice_origin_from_source_cluster_label() {
        let cases = [
            (json!({}), SliceOrigin::Local),
            (json!({LABEL_SOURCE_CLUSTER: ""}), SliceOrigin::Local),
            (
                json!({LABEL_SOURCE_CLUSTER: "east"}),
                SliceOrigin::Remote("east".into()),
            ),
        ];
        for (extra, origin) in cases {
            let mut labels = json!({LABEL_SERVICE_NAME: "web"});
            if let (Some(labels), Json::Object(extra)) = (labels.as_object_mut(), extra.clone()) {
                labels.extend(extra);
            }
            let (slice, warnings) = slice_object(
                json!({"metadata": {"name": "web-abc", "labels": labels}, "addressType": "IPv4"}),
            );
            assert!(warnings.is_empty());
            assert_eq!(slice.unwrap().origin, origin, "{extra}");
        }
    }

    #[test]
    fn slice_ports() {
        // (ports[0], converted, warning)
        let cases: Vec<(Json, Option<SlicePort>, Option<&str>)> = vec![
            (
                json!({"name": "http", "port": 80}),
                Some(SlicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                }),
                None,
            ),
            (
                json!({"name": "", "port": 53, "protocol": "SCTP"}),
                Some(SlicePort {
                    name: "".into(),
                    protocol: Protocol::Sctp,
                    port: 53,
                }),
                None,
            ),
            (
                json!({"port": 80}),
                None,
                Some(r#"ports[0]: name is missing (an unnamed port has name ""); port skipped"#),
            ),
            (json!({"name": "http"}), None, None),
            (
                json!({"name": "http", "port": 0}),
                None,
                Some(r#"ports[0] (name "http"): port 0 is out of range 1-65535; port skipped"#),
            ),
            (
                json!({"name": "http", "port": 70000}),
                None,
                Some(r#"ports[0] (name "http"): port 70000 is out of range 1-65535; port skipped"#),
            ),
            (
                json!({"name": "http", "port": -1}),
                None,
                Some(r#"ports[0] (name "http"): port -1 is out of range 1-65535; port skipped"#),
            ),
            (
                json!({"name": "http", "port": 80, "protocol": "QUIC"}),
                None,
                Some(
                    r#"ports[0] (name "http"): protocol "QUIC" is not one of TCP, UDP, SCTP; port skipped"#,
                ),
            ),
        ];
        for (api_port, expected, warning) in cases {
            let (slice, warnings) = slice_with(
                "IPv4",
                json!({"ports": [api_port.clone(), {"name": "ok", "port": 9090}]}),
            );
            let mut expected_ports: Vec<SlicePort> = expected.into_iter().collect();
            expected_ports.push(SlicePort {
                name: "ok".into(),
                protocol: Protocol::Tcp,
                port: 9090,
            });
            assert_eq!(slice.unwrap().ports, expected_ports, "{api_port}");
            assert_eq!(
                messages(&warnings),
                warning.into_iter().collect::<Vec<_>>(),
                "{api_port}"
            );
        }
    }

    #[test]
    fn endpoint_conditions_resolve_nil() {
        // (conditions, ready, serving, terminating)
        let cases = [
            (json!(null), true, true, false),
            (json!({}), true, true, false),
            (json!({"ready": false}), false, true, false),
            (json!({"serving": false}), true, false, false),
            (json!({"terminating": true}), true, true, true),
            (
                json!({"ready": false, "serving": true, "terminating": true}),
                false,
                true,
                true,
            ),
            (
                json!({"ready": false, "serving": false, "terminating": true}),
                false,
                false,
                true,
            ),
        ];
        for (conditions, ready, serving, terminating) in cases {
            let (slice, warnings) = slice_with(
                "IPv4",
                json!({"endpoints": [{"addresses": ["10.1.0.1"], "conditions": conditions}]}),
            );
            assert!(warnings.is_empty());
            let endpoint = &slice.unwrap().endpoints[0];
            assert_eq!(
                (endpoint.ready, endpoint.serving, endpoint.terminating),
                (ready, serving, terminating),
                "{conditions}"
            );
        }
    }

    #[test]
    fn endpoint_without_hints_or_topology() {
        let (slice, _) = slice_with(
            "IPv4",
            json!({"endpoints": [{"addresses": ["10.1.0.1"], "nodeName": "", "hints": {}}]}),
        );
        let endpoint = &slice.unwrap().endpoints[0];
        assert_eq!(endpoint.node_name, None);
        assert_eq!(endpoint.zone, None);
        assert!(endpoint.zone_hints.is_empty());
        assert!(endpoint.node_hints.is_empty());
    }

    #[test]
    fn endpoints_that_are_skipped() {
        // (address type, endpoint, warning)
        let cases = [
            (
                "IPv4",
                json!({"addresses": []}),
                "endpoints[0]: addresses is empty; endpoint skipped",
            ),
            (
                "IPv4",
                json!({}),
                "endpoints[0]: addresses is empty; endpoint skipped",
            ),
            (
                "IPv4",
                json!({"addresses": ["10.1.0.256"]}),
                r#"endpoints[0].addresses[0]: "10.1.0.256" is not a valid IP address; endpoint skipped"#,
            ),
            (
                "IPv4",
                json!({"addresses": ["010.1.0.1"]}),
                r#"endpoints[0].addresses[0]: "010.1.0.1" is not a valid IP address; endpoint skipped"#,
            ),
            // Only the first address counts, so a good second one does not rescue it.
            (
                "IPv4",
                json!({"addresses": ["fd00::1", "10.1.0.1"]}),
                r#"endpoints[0].addresses[0]: "fd00::1" is an IPv6 address but the slice's addressType is IPv4; endpoint skipped"#,
            ),
            (
                "IPv6",
                json!({"addresses": ["10.1.0.1"]}),
                r#"endpoints[0].addresses[0]: "10.1.0.1" is an IPv4 address but the slice's addressType is IPv6; endpoint skipped"#,
            ),
        ];
        for (address_type, endpoint, warning) in cases {
            let good = if address_type == "IPv4" {
                "10.9.9.9"
            } else {
                "fd00::9"
            };
            let (slice, warnings) = slice_with(
                address_type,
                json!({"endpoints": [endpoint.clone(), {"addresses": [good]}]}),
            );
            let addresses: Vec<IpAddr> =
                slice.unwrap().endpoints.iter().map(|e| e.address).collect();
            assert_eq!(addresses, vec![ip(good)], "{endpoint}");
            assert_eq!(messages(&warnings), vec![warning], "{endpoint}");
        }
    }
}
