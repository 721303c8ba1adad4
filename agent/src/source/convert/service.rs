//! Services: addresses, ports, traffic policies, session affinity, topology intents.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Service, ServiceKey, ServicePort, ServiceType, TopologyIntent, ANNOTATION_TOPOLOGY_AWARE_HINTS,
    ANNOTATION_TOPOLOGY_MODE, LABEL_SERVICE_PROXY_NAME,
};

use super::*;

/// Converts a Service. Returns `None` (with a warning) when the object is unusable: no name,
/// or an unknown `spec.type`. Bad addresses and ports are skipped one by one.
pub fn service_from_api(
    svc: &core::Service,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<Service> {
    let meta = &svc.metadata;
    let mut report = Report::new(
        ObjectRef::from_meta(KIND_SERVICE, true, meta),
        origin,
        warnings,
    );
    let name = report.required_name(meta, "service")?;
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    let service_type = service_type(spec, &mut report)?;

    let cluster_ips_field = spec.cluster_ips.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || cluster_ips_field.first().map(String::as_str) == Some("None");
    // An ExternalName Service is a DNS alias; whatever clusterIP it carries is not a VIP.
    let cluster_ips = if headless || service_type == ServiceType::ExternalName {
        Vec::new()
    } else {
        cluster_ips(spec, &mut report)
    };

    let external_ips = external_ips(spec, &mut report);
    let load_balancer_ips = load_balancer_ips(svc, &mut report);
    let load_balancer_source_ranges = source_ranges(spec, &mut report);
    let ports = service_ports(spec, &mut report);

    let session_affinity_timeout = session_affinity(spec, &mut report);

    let (internal_traffic_local, external_traffic_local) =
        traffic_policies(spec, service_type, &mut report);

    let topology_intent = topology_intent(meta, spec, &mut report);
    // kube-proxy selects Services on the label's absence, so an empty value still means
    // "another proxy's"; keep it as given.
    let proxy_name = label(meta, LABEL_SERVICE_PROXY_NAME).map(str::to_owned);
    let locality = locality_policy(meta, &mut report);
    let scheduler = ipvs_scheduler(meta, &mut report);
    // kube-proxy serves it only for external-local LoadBalancers, whatever else the field says.
    let health_check_node_port = (external_traffic_local
        && service_type == ServiceType::LoadBalancer)
        .then(|| health_check_node_port(spec, &mut report))
        .flatten();

    Some(Service {
        key: ServiceKey::new(namespace_of(meta), name),
        service_type,
        headless,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        session_affinity_timeout,
        internal_traffic_local,
        external_traffic_local,
        topology_intent,
        proxy_name,
        locality,
        health_check_node_port,
        scheduler,
    })
}

/// `spec.type`, defaulting to ClusterIP; `None` (with a warning) for a type the API does not have.
fn service_type(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Option<ServiceType> {
    match non_empty(spec.type_.as_deref()) {
        None | Some("ClusterIP") => Some(ServiceType::ClusterIP),
        Some("NodePort") => Some(ServiceType::NodePort),
        Some("LoadBalancer") => Some(ServiceType::LoadBalancer),
        Some("ExternalName") => Some(ServiceType::ExternalName),
        Some(other) => {
            report.warn(format!(
                "spec.type {other:?} is not one of ClusterIP, NodePort, LoadBalancer, \
                 ExternalName; service dropped"
            ));
            None
        }
    }
}

/// `spec.clusterIPs`, or `spec.clusterIP` when the list is empty; invalid addresses skipped.
fn cluster_ips(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Vec<IpAddr> {
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    if !listed.is_empty() {
        return listed
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| report.parse_ip(&format!("spec.clusterIPs[{i}]"), ip))
            .collect();
    }
    non_empty(spec.cluster_ip.as_deref())
        .and_then(|ip| report.parse_ip("spec.clusterIP", ip))
        .into_iter()
        .collect()
}

/// The ClientIP affinity timeout, `None` without affinity (or with an unknown kind, warned).
fn session_affinity(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Option<u32> {
    match non_empty(spec.session_affinity.as_deref()) {
        None | Some("None") => None,
        Some("ClientIP") => Some(affinity_timeout(
            spec.session_affinity_config.as_ref(),
            report,
        )),
        Some(other) => {
            report.warn(format!(
                "spec.sessionAffinity {other:?} is not one of ClientIP, None; \
                 session affinity off"
            ));
            None
        }
    }
}

fn external_ips(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Vec<IpAddr> {
    spec.external_ips
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, ip)| report.parse_ip(&format!("spec.externalIPs[{i}]"), ip))
        .collect()
}

/// Whether the internal and the external traffic policy are `Local`.
fn traffic_policies(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
    report: &mut Report<'_>,
) -> (bool, bool) {
    let internal = policy_is_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
        report,
    );
    // The API only honours externalTrafficPolicy where there is external traffic to steer.
    let external = policy_is_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
        report,
    ) && matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    (internal, external)
}

fn health_check_node_port(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Option<u16> {
    let value = spec.health_check_node_port?;
    let port = port_number(value);
    if port.is_none() {
        report.warn(format!(
            "spec.healthCheckNodePort: {value} is out of range 1-65535; health check dropped"
        ));
    }
    port
}

fn load_balancer_ips(svc: &core::Service, report: &mut Report<'_>) -> Vec<IpAddr> {
    let ingresses = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for (i, ingress) in ingresses.iter().enumerate() {
        // Hostname-only ingresses (some cloud load balancers) have no VIP to program.
        let Some(ip) = non_empty(ingress.ip.as_deref()) else {
            continue;
        };
        match non_empty(ingress.ip_mode.as_deref()) {
            None | Some("VIP") => {}
            Some("Proxy") => continue,
            Some(other) => {
                // kube-proxy programs only what it knows to be a VIP.
                report.warn(format!(
                    "status.loadBalancer.ingress[{i}].ipMode {other:?} is not one of VIP, \
                     Proxy; address skipped"
                ));
                continue;
            }
        }
        if let Some(address) = report.parse_ip(&format!("status.loadBalancer.ingress[{i}].ip"), ip)
        {
            addresses.push(address);
        }
    }
    addresses
}

/// `spec.loadBalancerSourceRanges`, each trimmed (the API's validation lets padding through),
/// as kube-proxy reads them. One that is not a CIDR is skipped with a warning; the API server
/// refuses those, so only a YAML source can carry one.
fn source_ranges(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Vec<ipnetwork::IpNetwork> {
    let mut ranges = Vec::new();
    for (i, text) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        let text = text.trim();
        match text
            .contains('/')
            .then(|| text.parse::<ipnetwork::IpNetwork>())
        {
            Some(Ok(range)) => ranges.push(range),
            _ => report.warn(format!(
                "spec.loadBalancerSourceRanges[{i}]: {text:?} is not a CIDR; range skipped"
            )),
        }
    }
    ranges
}

fn service_ports(spec: &core::ServiceSpec, report: &mut Report<'_>) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = port_field("spec.ports", i, port.name.as_deref());
        let Some((protocol, number)) =
            checked_port(&field, port.protocol.as_deref(), port.port, report)
        else {
            continue;
        };
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(value) => {
                let node_port = port_number(value);
                if node_port.is_none() {
                    report.warn(format!(
                        "{field}: nodePort {value} is out of range 1-65535; node port dropped"
                    ));
                }
                node_port
            }
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            protocol,
            port: number,
            node_port,
        });
    }
    ports
}

/// `Local` → true; `Cluster` or unset → false; anything else warns and means `Cluster`,
/// the API default.
fn policy_is_local(value: Option<&str>, field: &str, report: &mut Report<'_>) -> bool {
    match non_empty(value) {
        Some("Local") => true,
        None | Some("Cluster") => false,
        Some(other) => {
            report.warn(format!(
                "{field} {other:?} is not one of Cluster, Local; using Cluster"
            ));
            false
        }
    }
}

fn topology_intent(
    meta: &ObjectMeta,
    spec: &core::ServiceSpec,
    report: &mut Report<'_>,
) -> TopologyIntent {
    let distribution = match non_empty(spec.traffic_distribution.as_deref()) {
        Some("PreferClose") => TopologyIntent::PreferClose,
        Some("PreferSameZone") => TopologyIntent::PreferSameZone,
        Some("PreferSameNode") => TopologyIntent::PreferSameNode,
        Some(other) => {
            report.warn(format!(
                "spec.trafficDistribution {other:?} is not one of PreferClose, PreferSameZone, \
                 PreferSameNode; ignored"
            ));
            TopologyIntent::None
        }
        None => TopologyIntent::None,
    };
    // As the EndpointSlice controller reads them: the topology annotation, when it says Auto,
    // takes precedence over spec.trafficDistribution; when the newer annotation is present
    // (whatever its value) the older one is not consulted.
    let mode = annotation(meta, ANNOTATION_TOPOLOGY_MODE)
        .or_else(|| annotation(meta, ANNOTATION_TOPOLOGY_AWARE_HINTS));
    if mode.is_some_and(|mode| mode.eq_ignore_ascii_case("auto")) {
        TopologyIntent::Auto
    } else {
        distribution
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    use super::*;
    use crate::source::convert::test_support::*;

    /// Converts a Service named `default/web` with the given spec.
    fn service_with(spec: Json) -> (Option<Service>, Vec<Warning>) {
        service_object(json!({"metadata": {"name": "web"}, "spec": spec}))
    }

    #[test]
    fn minimal_service_gets_api_defaults() {
        let (service, warnings) = service_object(json!({"metadata": {"name": "web"}}));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            service,
            Some(Service {
                key: ServiceKey::new("default", "web"),
                service_type: ServiceType::ClusterIP,
                headless: false,
                cluster_ips: vec![],
                external_ips: vec![],
                load_balancer_ips: vec![],
                load_balancer_source_ranges: vec![],
                ports: vec![],
                session_affinity_timeout: None,
                internal_traffic_local: false,
                external_traffic_local: false,
                topology_intent: TopologyIntent::None,
                proxy_name: None,
                locality: None,
                health_check_node_port: None,
                scheduler: None,
            })
        );
    }

    #[test]
    fn service_namespace_and_missing_name() {
        let (service, warnings) =
            service_object(json!({"metadata": {"name": "dns", "namespace": "kube-system"}}));
        assert!(warnings.is_empty());
        assert_eq!(service.unwrap().key, ServiceKey::new("kube-system", "dns"));

        for metadata in [
            json!({"namespace": "prod"}),
            json!({"name": "", "namespace": "prod"}),
        ] {
            let (service, warnings) = service_object(json!({"metadata": metadata}));
            assert_eq!(service, None);
            assert_eq!(
                warnings,
                vec![Warning {
                    object: ObjectRef {
                        kind: "Service",
                        namespace: Some("prod".into()),
                        name: "<unnamed>".into(),
                    },
                    origin: Some("test.yaml".into()),
                    message: "metadata.name is missing; service dropped".into(),
                }]
            );
        }
    }

    #[test]
    fn service_types() {
        let cases: &[(Json, Option<ServiceType>)] = &[
            (json!(null), Some(ServiceType::ClusterIP)),
            (json!(""), Some(ServiceType::ClusterIP)),
            (json!("ClusterIP"), Some(ServiceType::ClusterIP)),
            (json!("NodePort"), Some(ServiceType::NodePort)),
            (json!("LoadBalancer"), Some(ServiceType::LoadBalancer)),
            (json!("ExternalName"), Some(ServiceType::ExternalName)),
            (json!("clusterip"), None),
            (json!("Ingress"), None),
        ];
        for (service_type, expected) in cases {
            let (service, warnings) = service_with(json!({"type": service_type}));
            assert_eq!(
                service.map(|s| s.service_type),
                *expected,
                "type {service_type}"
            );
            if expected.is_none() {
                assert_eq!(
                    messages(&warnings),
                    vec![format!(
                        "spec.type {service_type} is not one of ClusterIP, NodePort, \
                         LoadBalancer, ExternalName; service dropped"
                    )]
                );
            } else {
                assert!(warnings.is_empty(), "type {service_type}: {warnings:?}");
            }
        }
    }

    #[test]
    fn external_name_service_converts_without_ips() {
        let (service, warnings) = service_with(json!({
            "type": "ExternalName",
            "externalName": "db.example.com",
            "clusterIP": "10.0.0.9",
            "ports": [{"port": 5432}],
        }));
        assert!(warnings.is_empty());
        let service = service.unwrap();
        assert_eq!(service.service_type, ServiceType::ExternalName);
        assert!(service.cluster_ips.is_empty());
        assert_eq!(service.ports.len(), 1);
    }

    #[test]
    fn cluster_ips() {
        // (spec, headless, cluster IPs, warnings)
        let cases: Vec<(Json, bool, Vec<IpAddr>, Vec<&str>)> = vec![
            (json!({}), false, vec![], vec![]),
            (json!({"clusterIP": ""}), false, vec![], vec![]),
            (
                json!({"clusterIP": "10.0.0.1"}),
                false,
                vec![ip("10.0.0.1")],
                vec![],
            ),
            (
                json!({"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1", "fd00::1"]}),
                false,
                vec![ip("10.0.0.1"), ip("fd00::1")],
                vec![],
            ),
            // clusterIP is only the fallback for an empty clusterIPs.
            (
                json!({"clusterIP": "10.0.0.1", "clusterIPs": []}),
                false,
                vec![ip("10.0.0.1")],
                vec![],
            ),
            (json!({"clusterIP": "None"}), true, vec![], vec![]),
            (
                json!({"clusterIP": "None", "clusterIPs": ["None"]}),
                true,
                vec![],
                vec![],
            ),
            (json!({"clusterIPs": ["None"]}), true, vec![], vec![]),
            (
                json!({"clusterIP": "10.0.0.300"}),
                false,
                vec![],
                vec![r#"spec.clusterIP: "10.0.0.300" is not a valid IP address; address skipped"#],
            ),
            (
                json!({"clusterIPs": ["010.1.1.1", "fd00::1"]}),
                false,
                vec![ip("fd00::1")],
                vec![
                    r#"spec.clusterIPs[0]: "010.1.1.1" is not a valid IP address; address skipped"#,
                ],
            ),
        ];
        for (spec, headless, ips, expected_warnings) in cases {
            let (service, warnings) = service_with(spec.clone());
            let service = service.unwrap();
            assert_eq!(service.headless, headless, "{spec}");
            assert_eq!(service.cluster_ips, ips, "{spec}");
            assert_eq!(messages(&warnings), expected_warnings, "{spec}");
        }
    }

    #[test]
    fn external_ips_skip_invalid() {
        let (service, warnings) =
            service_with(json!({"externalIPs": ["192.0.2.10", "not-an-ip", "2001:db8::10"]}));
        assert_eq!(
            service.unwrap().external_ips,
            vec![ip("192.0.2.10"), ip("2001:db8::10")]
        );
        assert_eq!(
            messages(&warnings),
            vec![r#"spec.externalIPs[1]: "not-an-ip" is not a valid IP address; address skipped"#]
        );
    }

    #[test]
    fn load_balancer_ingress() {
        let (service, warnings) = service_object(json!({
            "metadata": {"name": "web"},
            "spec": {"type": "LoadBalancer"},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.1"},
                {"hostname": "lb.example.com"},
                {"ip": "203.0.113.2", "ipMode": "Proxy"},
                {"ip": "203.0.113.3", "ipMode": "VIP"},
                {"ip": "203.0.113.300"},
                {"ip": "203.0.113.4", "ipMode": "Tunnel"},
                {"ip": "2001:db8::5", "hostname": "lb6.example.com"},
            ]}},
        }));
        assert_eq!(
            service.unwrap().load_balancer_ips,
            vec![ip("203.0.113.1"), ip("203.0.113.3"), ip("2001:db8::5")]
        );
        assert_eq!(
            messages(&warnings),
            vec![
                r#"status.loadBalancer.ingress[4].ip: "203.0.113.300" is not a valid IP address; address skipped"#,
                r#"status.loadBalancer.ingress[5].ipMode "Tunnel" is not one of VIP, Proxy; address skipped"#,
            ]
        );
    }

    #[test]
    fn service_ports() {
        let port = |name: &str, protocol, port, node_port| ServicePort {
            name: name.into(),
            protocol,
            port,
            node_port,
        };
        // (spec.ports[0], converted port, warning)
        let cases: Vec<(Json, Option<ServicePort>, Option<&str>)> = vec![
            (
                json!({"port": 80}),
                Some(port("", Protocol::Tcp, 80, None)),
                None,
            ),
            (
                json!({"name": "dns", "port": 53, "protocol": "UDP"}),
                Some(port("dns", Protocol::Udp, 53, None)),
                None,
            ),
            (
                json!({"port": 9000, "protocol": "SCTP"}),
                Some(port("", Protocol::Sctp, 9000, None)),
                None,
            ),
            (
                json!({"port": 65535}),
                Some(port("", Protocol::Tcp, 65535, None)),
                None,
            ),
            (
                json!({"port": 80, "nodePort": 0}),
                Some(port("", Protocol::Tcp, 80, None)),
                None,
            ),
            (
                json!({"port": 80, "nodePort": 30080}),
                Some(port("", Protocol::Tcp, 80, Some(30080))),
                None,
            ),
            (
                json!({"name": "dns", "port": 70000}),
                None,
                Some(
                    r#"spec.ports[0] (name "dns"): port 70000 is out of range 1-65535; port skipped"#,
                ),
            ),
            (
                json!({"port": 0}),
                None,
                Some("spec.ports[0]: port 0 is out of range 1-65535; port skipped"),
            ),
            (
                json!({"port": -1}),
                None,
                Some("spec.ports[0]: port -1 is out of range 1-65535; port skipped"),
            ),
            (
                json!({"port": 53, "protocol": "udp"}),
                None,
                Some(r#"spec.ports[0]: protocol "udp" is not one of TCP, UDP, SCTP; port skipped"#),
            ),
            (
                json!({"name": "web", "port": 80, "protocol": "ICMP"}),
                None,
                Some(
                    r#"spec.ports[0] (name "web"): protocol "ICMP" is not one of TCP, UDP, SCTP; port skipped"#,
                ),
            ),
            (
                json!({"port": 80, "nodePort": 70000}),
                Some(port("", Protocol::Tcp, 80, None)),
                Some("spec.ports[0]: nodePort 70000 is out of range 1-65535; node port dropped"),
            ),
            (
                json!({"port": 80, "nodePort": -5}),
                Some(port("", Protocol::Tcp, 80, None)),
                Some("spec.ports[0]: nodePort -5 is out of range 1-65535; node port dropped"),
            ),
        ];
        for (api_port, expected, warning) in cases {
            // A good port after the one under test must survive whatever happens to it.
            let (service, warnings) = service_with(json!({
                "type": "NodePort",
                "ports": [api_port.clone(), {"name": "ok", "port": 8080}],
            }));
            let ports = service.unwrap().ports;
            let mut expected_ports: Vec<ServicePort> = expected.into_iter().collect();
            expected_ports.push(port("ok", Protocol::Tcp, 8080, None));
            assert_eq!(ports, expected_ports, "{api_port}");
            assert_eq!(
                messages(&warnings),
                warning.into_iter().collect::<Vec<_>>(),
                "{api_port}"
            );
        }
    }

    #[test]
    fn port_index_in_messages_is_the_api_index() {
        let (service, warnings) = service_with(json!({"ports": [
            {"name": "http", "port": 80},
            {"name": "dns", "port": 70000},
        ]}));
        assert_eq!(service.unwrap().ports.len(), 1);
        assert_eq!(
            messages(&warnings),
            vec![r#"spec.ports[1] (name "dns"): port 70000 is out of range 1-65535; port skipped"#]
        );
    }

    #[test]
    fn session_affinity() {
        // (spec, timeout, warning)
        let cases: Vec<(Json, Option<u32>, Option<&str>)> = vec![
            (json!({}), None, None),
            (json!({"sessionAffinity": "None"}), None, None),
            (
                json!({"sessionAffinity": "ClientIP"}),
                Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                None,
            ),
            (
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {}}}),
                Some(10_800),
                None,
            ),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                Some(60),
                None,
            ),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}),
                Some(1),
                None,
            ),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}}}),
                Some(86_400),
                None,
            ),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
                Some(10_800),
                Some("spec.sessionAffinityConfig.clientIP.timeoutSeconds 0 is out of range 1-86400; using the default 10800"),
            ),
            (
                json!({"sessionAffinity": "ClientIP",
                       "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}),
                Some(10_800),
                Some("spec.sessionAffinityConfig.clientIP.timeoutSeconds 86401 is out of range 1-86400; using the default 10800"),
            ),
            // The config alone does not turn affinity on.
            (
                json!({"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
                None,
                None,
            ),
            (
                json!({"sessionAffinity": "Cookie"}),
                None,
                Some(r#"spec.sessionAffinity "Cookie" is not one of ClientIP, None; session affinity off"#),
            ),
        ];
        for (spec, timeout, warning) in cases {
            let (service, warnings) = service_with(spec.clone());
            assert_eq!(service.unwrap().session_affinity_timeout, timeout, "{spec}");
            assert_eq!(
                messages(&warnings),
                warning.into_iter().collect::<Vec<_>>(),
                "{spec}"
            );
        }
    }

    #[test]
    fn traffic_policies() {
        // (type, internalTrafficPolicy, externalTrafficPolicy, internal local, external local)
        let cases = [
            ("ClusterIP", None, None, false, false),
            ("ClusterIP", Some("Local"), None, true, false),
            ("ClusterIP", Some("Cluster"), None, false, false),
            // externalTrafficPolicy means nothing without external traffic.
            ("ClusterIP", None, Some("Local"), false, false),
            ("ExternalName", None, Some("Local"), false, false),
            ("NodePort", None, Some("Local"), false, true),
            ("NodePort", None, Some("Cluster"), false, false),
            ("LoadBalancer", None, Some("Local"), false, true),
            ("LoadBalancer", Some("Local"), Some("Local"), true, true),
            ("LoadBalancer", None, None, false, false),
        ];
        for (service_type, itp, etp, internal_local, external_local) in cases {
            let (service, warnings) = service_with(json!({
                "type": service_type,
                "internalTrafficPolicy": itp,
                "externalTrafficPolicy": etp,
            }));
            let service = service.unwrap();
            let case = format!("{service_type} itp={itp:?} etp={etp:?}");
            assert!(warnings.is_empty(), "{case}: {warnings:?}");
            assert_eq!(service.internal_traffic_local, internal_local, "{case}");
            assert_eq!(service.external_traffic_local, external_local, "{case}");
        }
    }

    #[test]
    fn unknown_traffic_policy_means_cluster() {
        let (service, warnings) = service_with(json!({
            "type": "NodePort",
            "internalTrafficPolicy": "local",
            "externalTrafficPolicy": "OnlyLocal",
        }));
        let service = service.unwrap();
        assert!(!service.internal_traffic_local);
        assert!(!service.external_traffic_local);
        assert_eq!(
            messages(&warnings),
            vec![
                r#"spec.internalTrafficPolicy "local" is not one of Cluster, Local; using Cluster"#,
                r#"spec.externalTrafficPolicy "OnlyLocal" is not one of Cluster, Local; using Cluster"#,
            ]
        );
    }

    #[test]
    fn topology_intents() {
        // (annotations, spec.trafficDistribution, intent, warns)
        let cases: Vec<(Json, Option<&str>, TopologyIntent, bool)> = vec![
            (json!({}), None, TopologyIntent::None, false),
            (
                json!({}),
                Some("PreferClose"),
                TopologyIntent::PreferClose,
                false,
            ),
            (
                json!({}),
                Some("PreferSameZone"),
                TopologyIntent::PreferSameZone,
                false,
            ),
            (
                json!({}),
                Some("PreferSameNode"),
                TopologyIntent::PreferSameNode,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Auto"}),
                None,
                TopologyIntent::Auto,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "auto"}),
                None,
                TopologyIntent::Auto,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "AUTO"}),
                None,
                TopologyIntent::Auto,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Disabled"}),
                None,
                TopologyIntent::None,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_AWARE_HINTS: "auto"}),
                None,
                TopologyIntent::Auto,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_AWARE_HINTS: "Auto"}),
                None,
                TopologyIntent::Auto,
                false,
            ),
            (
                json!({ANNOTATION_TOPOLOGY_AWARE_HINTS: "disabled"}),
                None,
                TopologyIntent::None,
                false,
            ),
            // The newer annotation, when present, decides alone (as the controller reads it).
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Disabled", ANNOTATION_TOPOLOGY_AWARE_HINTS: "auto"}),
                None,
                TopologyIntent::None,
                false,
            ),
            // An Auto annotation takes precedence over the field, as in the controller.
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Auto"}),
                Some("PreferSameNode"),
                TopologyIntent::Auto,
                false,
            ),
            // A non-Auto annotation leaves the decision to the field.
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Disabled"}),
                Some("PreferSameZone"),
                TopologyIntent::PreferSameZone,
                false,
            ),
            (json!({}), Some("Nearest"), TopologyIntent::None, true),
            // An unknown field value is ignored, so an annotation still counts.
            (
                json!({ANNOTATION_TOPOLOGY_MODE: "Auto"}),
                Some("Nearest"),
                TopologyIntent::Auto,
                true,
            ),
        ];
        for (annotations, distribution, intent, warns) in cases {
            let (service, warnings) = service_object(json!({
                "metadata": {"name": "web", "annotations": annotations},
                "spec": {"trafficDistribution": distribution},
            }));
            let case = format!("{annotations} {distribution:?}");
            assert_eq!(service.unwrap().topology_intent, intent, "{case}");
            let expected: Vec<&str> = if warns {
                vec![
                    r#"spec.trafficDistribution "Nearest" is not one of PreferClose, PreferSameZone, PreferSameNode; ignored"#,
                ]
            } else {
                vec![]
            };
            assert_eq!(messages(&warnings), expected, "{case}");
        }
    }

    #[test]
    fn locality_annotation() {
        let cases = [
            (json!({}), None),
            (
                json!({ANNOTATION_LOCALITY: "zone"}),
                Some(LocalityPolicy::Zone),
            ),
            (
                json!({ANNOTATION_LOCALITY: " Node "}),
                Some(LocalityPolicy::Node),
            ),
            (
                json!({ANNOTATION_LOCALITY: "kube-proxy"}),
                Some(LocalityPolicy::KubeProxy),
            ),
        ];
        for (annotations, expected) in cases {
            let (service, warnings) =
                service_object(json!({"metadata": {"name": "web", "annotations": annotations}}));
            assert_eq!(service.unwrap().locality, expected, "{annotations}");
            assert!(warnings.is_empty(), "{annotations}: {warnings:?}");
        }
        // A bad value: kube-proxy's behaviour (not the cluster default), and a warning that
        // names the Service.
        let (service, warnings) = service_object(
            json!({"metadata": {"name": "web", "annotations": {ANNOTATION_LOCALITY: "nearest"}}}),
        );
        assert_eq!(service.unwrap().locality, Some(LocalityPolicy::KubeProxy));
        assert_eq!(
            messages(&warnings),
            [
                r#"annotation topoproxy.io/topology "nearest" is not one of kube-proxy, zone, node; kube-proxy's behaviour applies"#
            ]
        );
        assert!(warnings[0].to_string().contains("web"), "{}", warnings[0]);
    }

    #[test]
    fn ipvs_scheduler_annotation() {
        use crate::scheduler::{SchedulerFlags, SchedulerKind};
        let cases = [
            (json!({}), None),
            (
                json!({ANNOTATION_IPVS_SCHEDULER: "sh"}),
                Some((SchedulerKind::Sh, SchedulerFlags::NONE)),
            ),
            (
                json!({ANNOTATION_IPVS_SCHEDULER: "mh,mh-fallback,mh-port"}),
                Some((
                    SchedulerKind::Mh,
                    SchedulerFlags::FALLBACK.with(SchedulerFlags::PORT),
                )),
            ),
            (
                json!({ANNOTATION_IPVS_SCHEDULER: " lblcr "}),
                Some((SchedulerKind::Lblcr, SchedulerFlags::NONE)),
            ),
        ];
        for (annotations, expected) in cases {
            let (service, warnings) =
                service_object(json!({"metadata": {"name": "web", "annotations": annotations}}));
            let got = service.unwrap().scheduler.map(|s| (s.kind, s.flags));
            assert_eq!(got, expected, "{annotations}");
            assert!(warnings.is_empty(), "{annotations}: {warnings:?}");
        }
        // A bad value: no per-Service choice (the agent's --ipvs-scheduler), and a warning
        // naming the Service, the value and why.
        for (value, why) in [
            (
                "maglev",
                r#""maglev" is not an IPVS scheduler (one of rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh, twos)"#,
            ),
            (
                "mh,sh-port",
                r#"flag "sh-port" is not one of mh's (mh-fallback, mh-port)"#,
            ),
            ("", "is empty"),
        ] {
            let (service, warnings) = service_object(json!({"metadata": {
                "name": "web", "namespace": "shop",
                "annotations": {ANNOTATION_IPVS_SCHEDULER: value}}}));
            assert_eq!(service.unwrap().scheduler, None, "{value}");
            assert_eq!(
                messages(&warnings),
                [format!(
                    "annotation topoproxy.io/ipvs-scheduler {value:?}: {why}; the agent's \
                     --ipvs-scheduler applies"
                )]
            );
            assert!(
                warnings[0].to_string().contains("shop/web"),
                "{}",
                warnings[0]
            );
        }
    }

    #[test]
    fn proxy_name_label() {
        let cases = [
            (json!({}), None),
            (
                json!({LABEL_SERVICE_PROXY_NAME: "topoproxy"}),
                Some("topoproxy"),
            ),
            // Present but empty still hands the Service to "someone else" for kube-proxy.
            (json!({LABEL_SERVICE_PROXY_NAME: ""}), Some("")),
        ];
        for (labels, expected) in cases {
            let (service, _) =
                service_object(json!({"metadata": {"name": "web", "labels": labels}}));
            assert_eq!(service.unwrap().proxy_name.as_deref(), expected, "{labels}");
        }
    }
}
