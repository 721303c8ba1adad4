//! MCS ServiceImports, converted into the Service the planner programs for a clusterset IP.

use crate::model::{Service, ServiceKey, ServicePort, ServiceType, TopologyIntent};

use super::*;

/// Converts a ServiceImport into the Service the planner programs for it: its clusterset IPs
/// as cluster IPs, its ports, its session affinity, and the `topoproxy.io/topology`
/// annotation. `type: Headless` (or no IPs) programs nothing, as a headless Service. Returns
/// `None` (with a warning) without a name or with an unknown `spec.type`.
pub fn service_import_from_api(
    import: &mcs::ServiceImport,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<Service> {
    let meta = &import.metadata;
    let mut report = Report::new(
        ObjectRef::from_meta(KIND_SERVICE_IMPORT, true, meta),
        origin,
        warnings,
    );
    let name = report.required_name(meta, "service import")?;
    let default_spec = mcs::ServiceImportSpec::default();
    let spec = import.spec.as_ref().unwrap_or(&default_spec);
    let headless = match non_empty(spec.type_.as_deref()) {
        Some("ClusterSetIP") => false,
        Some("Headless") => true,
        // Older CRDs leave the type optional: clusterset IPs are what make a ClusterSetIP.
        None => spec.ips.as_ref().is_none_or(Vec::is_empty),
        Some(other) => {
            report.warn(format!(
                "spec.type {other:?} is not one of ClusterSetIP, Headless; service import dropped"
            ));
            return None;
        }
    };
    let cluster_ips = if headless {
        Vec::new()
    } else {
        spec.ips
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, ip)| report.parse_ip(&format!("spec.ips[{i}]"), ip))
            .collect()
    };
    let ports = import_ports(spec, &mut report);
    let session_affinity_timeout = match non_empty(spec.session_affinity.as_deref()) {
        None | Some("None") => None,
        Some("ClientIP") => Some(affinity_timeout(
            spec.session_affinity_config.as_ref(),
            &mut report,
        )),
        Some(other) => {
            report.warn(format!(
                "spec.sessionAffinity {other:?} is not one of ClientIP, None; \
                 session affinity off"
            ));
            None
        }
    };
    let locality = locality_policy(meta, &mut report);
    let scheduler = ipvs_scheduler(meta, &mut report);
    Some(Service {
        key: ServiceKey::import(namespace_of(meta), name),
        service_type: ServiceType::ClusterIP,
        headless,
        cluster_ips,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        load_balancer_source_ranges: Vec::new(),
        ports,
        session_affinity_timeout,
        internal_traffic_local: false,
        external_traffic_local: false,
        topology_intent: TopologyIntent::None,
        proxy_name: None,
        locality,
        health_check_node_port: None,
        scheduler,
    })
}

fn import_ports(spec: &mcs::ServiceImportSpec, report: &mut Report<'_>) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = port_field("spec.ports", i, port.name.as_deref());
        let Some((protocol, number)) =
            checked_port(&field, port.protocol.as_deref(), port.port, report)
        else {
            continue;
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            protocol,
            port: number,
            node_port: None,
        });
    }
    ports
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::source::convert::test_support::*;

    fn import_object(object: Json) -> (Option<Service>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let import: mcs::ServiceImport = serde_json::from_value(object).expect("a ServiceImport");
        let converted = service_import_from_api(&import, ORIGIN, &mut warnings);
        (converted, warnings)
    }

    #[test]
    fn service_import_becomes_a_service_keyed_as_an_import() {
        let (import, warnings) = import_object(json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {ANNOTATION_LOCALITY: "zone"}},
            "spec": {"type": "ClusterSetIP", "ips": ["10.42.0.10", "bad", "fd00:42::10"],
                     "ports": [{"name": "http", "port": 80},
                               {"name": "dns", "protocol": "UDP", "port": 53},
                               {"name": "x", "protocol": "ICMP", "port": 1},
                               {"name": "y", "port": 0}],
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
        }));
        let import = import.expect("converts");
        assert_eq!(import.key, ServiceKey::import("shop", "web"));
        assert_eq!(import.key.to_string(), "serviceimport/shop/web");
        assert!(!import.headless);
        assert_eq!(
            import.cluster_ips,
            vec![
                "10.42.0.10".parse::<IpAddr>().unwrap(),
                "fd00:42::10".parse::<IpAddr>().unwrap()
            ]
        );
        let ports: Vec<(&str, Protocol, u16)> = import
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port))
            .collect();
        assert_eq!(
            ports,
            [("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)]
        );
        assert_eq!(import.session_affinity_timeout, Some(60));
        assert_eq!(import.locality, Some(LocalityPolicy::Zone));
        assert_eq!(
            messages(&warnings),
            [
                r#"spec.ips[1]: "bad" is not a valid IP address; address skipped"#,
                r#"spec.ports[2] (name "x"): protocol "ICMP" is not one of TCP, UDP, SCTP; port skipped"#,
                r#"spec.ports[3] (name "y"): port 0 is out of range 1-65535; port skipped"#,
            ]
        );
        assert!(warnings[0].to_string().contains("ServiceImport shop/web"));
    }

    #[test]
    fn service_import_types() {
        let typed = |spec: Json| import_object(json!({"metadata": {"name": "web"}, "spec": spec}));
        let (headless, _) = typed(json!({"type": "Headless", "ips": ["10.42.0.10"]}));
        let headless = headless.expect("converts");
        assert!(headless.headless && headless.cluster_ips.is_empty());
        // No type: the IPs decide.
        let (untyped, _) = typed(json!({"ips": ["10.42.0.10"]}));
        assert!(!untyped.expect("converts").headless);
        let (untyped, _) = typed(json!({}));
        assert!(untyped.expect("converts").headless);
        let (unknown, warnings) = typed(json!({"type": "LoadBalancer"}));
        assert!(unknown.is_none());
        assert_eq!(
            messages(&warnings),
            [
                r#"spec.type "LoadBalancer" is not one of ClusterSetIP, Headless; service import dropped"#
            ]
        );
    }
}
