//! Conversion from Kubernetes API objects (k8s-openapi) to the validated [`crate::model`].
//!
//! Bad content never fails a whole load: an invalid IP, an out-of-range port, an unknown
//! protocol or an address of the wrong family drops just that address, port or endpoint;
//! an object that cannot be used at all (a slice without its service label) is dropped.
//! Each drop is reported as a [`Warning`] naming the object and what was wrong.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::model::Hints;
use crate::model::ServiceKind;
use crate::model::{
    Endpoint, EndpointSlice, IpFamily, LocalityPolicy, Node, NodeLocality, Protocol, Service,
    ServiceKey, ServicePort, ServiceType, SliceOrigin, SlicePort, TopologyIntent,
    ANNOTATION_IPVS_SCHEDULER, ANNOTATION_LOCALITY, ANNOTATION_TOPOLOGY_AWARE_HINTS,
    ANNOTATION_TOPOLOGY_MODE, DEFAULT_AFFINITY_TIMEOUT_SECONDS, LABEL_HEADLESS,
    LABEL_MCS_SERVICE_NAME, LABEL_REGION, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
    LABEL_SOURCE_CLUSTER, LABEL_ZONE,
};

use super::mcs;
use crate::scheduler::Scheduler;

/// Which object a warning is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {}/{}", self.kind, namespace, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Something in an object that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    pub object: ObjectRef,
    /// Where the object came from (a file path for the file source), if known.
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// [`ObjectRef::kind`] of a Service.
pub const KIND_SERVICE: &str = "Service";
/// [`ObjectRef::kind`] of an EndpointSlice.
pub const KIND_ENDPOINT_SLICE: &str = "EndpointSlice";
/// [`ObjectRef::kind`] of a Node.
pub const KIND_NODE: &str = "Node";
/// [`ObjectRef::kind`] of a ServiceImport.
pub const KIND_SERVICE_IMPORT: &str = mcs::KIND;
/// [`ObjectRef::name`] of an object that has no `metadata.name`.
pub const UNNAMED: &str = "<unnamed>";
/// The namespace the API server puts an object in when it names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The range the API server accepts for `sessionAffinityConfig.clientIP.timeoutSeconds`.
const AFFINITY_TIMEOUT_RANGE: std::ops::RangeInclusive<i32> = 1..=86_400;

impl ObjectRef {
    /// The reference warnings about an object with this metadata use: its namespace (for
    /// namespaced kinds, `default` when unset) and its name, or [`UNNAMED`].
    pub fn from_meta(kind: &'static str, namespaced: bool, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: namespaced.then(|| namespace_of(meta)),
            name: non_empty(meta.name.as_deref())
                .unwrap_or(UNNAMED)
                .to_owned(),
        }
    }
}

/// Collects the warnings about one object.
struct Report<'a> {
    object: ObjectRef,
    origin: Option<&'a str>,
    warnings: &'a mut Vec<Warning>,
}

impl<'a> Report<'a> {
    fn new(object: ObjectRef, origin: Option<&'a str>, warnings: &'a mut Vec<Warning>) -> Self {
        Self {
            object,
            origin,
            warnings,
        }
    }

    fn warn(&mut self, message: String) {
        self.warnings.push(Warning {
            object: self.object.clone(),
            origin: self.origin.map(str::to_owned),
            message,
        });
    }

    /// `metadata.name`, or a warning that the object is dropped without one.
    fn required_name(&mut self, meta: &ObjectMeta, what: &str) -> Option<String> {
        match non_empty(meta.name.as_deref()) {
            Some(name) => Some(name.to_owned()),
            None => {
                self.warn(format!("metadata.name is missing; {what} dropped"));
                None
            }
        }
    }

    fn parse_ip(&mut self, field: &str, value: &str) -> Option<IpAddr> {
        // std rejects IPv4 octets with leading zeros ("010.1.1.1"), which the API also
        // rejects because other parsers read them as octal.
        match IpAddr::from_str(value) {
            Ok(address) => Some(address),
            Err(_) => {
                self.warn(format!(
                    "{field}: {value:?} is not a valid IP address; address skipped"
                ));
                None
            }
        }
    }
}

/// Treats an empty string like an absent one, as the API's defaulting does.
fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

fn namespace_of(meta: &ObjectMeta) -> String {
    non_empty(meta.namespace.as_deref())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned()
}

fn label<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A 1..=65535 port number; the API types carry them as `i32`.
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// How a port is named in messages: `spec.ports[1] (name "dns")`, or just the index when
/// the port has no name.
fn port_field(list: &str, index: usize, name: Option<&str>) -> String {
    match non_empty(name) {
        Some(name) => format!("{list}[{index}] (name {name:?})"),
        None => format!("{list}[{index}]"),
    }
}

/// A port protocol, defaulting to TCP as the API does; `Err` carries the unknown value.
fn protocol_of(value: Option<&str>) -> Result<Protocol, &str> {
    match non_empty(value) {
        None => Ok(Protocol::Tcp),
        Some(value) => Protocol::from_api(value).ok_or(value),
    }
}

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

    let service_type = match non_empty(spec.type_.as_deref()) {
        None | Some("ClusterIP") => ServiceType::ClusterIP,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            report.warn(format!(
                "spec.type {other:?} is not one of ClusterIP, NodePort, LoadBalancer, \
                 ExternalName; service dropped"
            ));
            return None;
        }
    };

    let cluster_ips_field = spec.cluster_ips.as_deref().unwrap_or_default();
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || cluster_ips_field.first().map(String::as_str) == Some("None");
    // An ExternalName Service is a DNS alias; whatever clusterIP it carries is not a VIP.
    let cluster_ips = if headless || service_type == ServiceType::ExternalName {
        Vec::new()
    } else if !cluster_ips_field.is_empty() {
        cluster_ips_field
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| report.parse_ip(&format!("spec.clusterIPs[{i}]"), ip))
            .collect()
    } else {
        non_empty(spec.cluster_ip.as_deref())
            .and_then(|ip| report.parse_ip("spec.clusterIP", ip))
            .into_iter()
            .collect()
    };

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, ip)| report.parse_ip(&format!("spec.externalIPs[{i}]"), ip))
        .collect();

    let load_balancer_ips = load_balancer_ips(svc, &mut report);
    let load_balancer_source_ranges = source_ranges(spec, &mut report);
    let ports = service_ports(spec, &mut report);

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

    let internal_traffic_local = policy_is_local(
        spec.internal_traffic_policy.as_deref(),
        "spec.internalTrafficPolicy",
        &mut report,
    );
    // The API only honours externalTrafficPolicy where there is external traffic to steer.
    let external_traffic_local = policy_is_local(
        spec.external_traffic_policy.as_deref(),
        "spec.externalTrafficPolicy",
        &mut report,
    ) && matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );

    let topology_intent = topology_intent(meta, spec, &mut report);
    // kube-proxy selects Services on the label's absence, so an empty value still means
    // "another proxy's"; keep it as given.
    let proxy_name = label(meta, LABEL_SERVICE_PROXY_NAME).map(str::to_owned);
    let locality = locality_policy(meta, &mut report);
    let scheduler = ipvs_scheduler(meta, &mut report);
    // kube-proxy serves it only for external-local LoadBalancers, whatever else the field says.
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| external_traffic_local && service_type == ServiceType::LoadBalancer)
        .and_then(|value| {
            let port = port_number(value);
            if port.is_none() {
                report.warn(format!(
                    "spec.healthCheckNodePort: {value} is out of range 1-65535; health check dropped"
                ));
            }
            port
        });

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

/// A port's protocol and number, or `None` (with a warning naming `field`) when either is
/// invalid and the port must be skipped.
fn checked_port(
    field: &str,
    protocol: Option<&str>,
    port: i32,
    report: &mut Report<'_>,
) -> Option<(Protocol, u16)> {
    let protocol = match protocol_of(protocol) {
        Ok(protocol) => protocol,
        Err(other) => {
            report.warn(format!(
                "{field}: protocol {other:?} is not one of TCP, UDP, SCTP; port skipped"
            ));
            return None;
        }
    };
    let Some(number) = port_number(port) else {
        report.warn(format!(
            "{field}: port {port} is out of range 1-65535; port skipped"
        ));
        return None;
    };
    Some((protocol, number))
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

/// The `topoproxy.io/topology` annotation. A value we do not know must not silently become
/// the cluster default (which may spill): it gets kube-proxy's behaviour, with a warning.
fn locality_policy(meta: &ObjectMeta, report: &mut Report<'_>) -> Option<LocalityPolicy> {
    let value = annotation(meta, ANNOTATION_LOCALITY)?;
    match LocalityPolicy::parse(value) {
        Some(policy) => Some(policy),
        None => {
            let known: Vec<&str> = LocalityPolicy::VALUES
                .iter()
                .map(|(name, _)| *name)
                .collect();
            report.warn(format!(
                "annotation {ANNOTATION_LOCALITY} {value:?} is not one of {}; kube-proxy's \
                 behaviour applies",
                known.join(", ")
            ));
            Some(LocalityPolicy::KubeProxy)
        }
    }
}

/// The `topoproxy.io/ipvs-scheduler` annotation. An invalid value is warned about and the
/// agent's `--ipvs-scheduler` applies, as without the annotation.
fn ipvs_scheduler(meta: &ObjectMeta, report: &mut Report<'_>) -> Option<Scheduler> {
    let value = annotation(meta, ANNOTATION_IPVS_SCHEDULER)?;
    Scheduler::parse(value)
        .map_err(|why| {
            report.warn(format!(
                "annotation {ANNOTATION_IPVS_SCHEDULER} {value:?}: {why}; the agent's \
                 --ipvs-scheduler applies"
            ));
        })
        .ok()
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

fn affinity_timeout(config: Option<&core::SessionAffinityConfig>, report: &mut Report<'_>) -> u32 {
    let configured = config
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match configured {
        None => DEFAULT_AFFINITY_TIMEOUT_SECONDS,
        Some(seconds) if AFFINITY_TIMEOUT_RANGE.contains(&seconds) => {
            u32::try_from(seconds).unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        }
        Some(seconds) => {
            report.warn(format!(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of range \
                 1-86400; using the default {DEFAULT_AFFINITY_TIMEOUT_SECONDS}"
            ));
            DEFAULT_AFFINITY_TIMEOUT_SECONDS
        }
    }
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

/// Converts a Node. Returns `None` (with a warning) only when it has no name; invalid
/// addresses are skipped one by one.
/// A Node's zone and region from its labels: all a metadata-only watch of every Node gives.
/// (The store interns the names, so the Nodes of a zone share one string.)
pub fn node_locality_from_meta(meta: &ObjectMeta) -> NodeLocality {
    NodeLocality {
        zone: non_empty(label(meta, LABEL_ZONE)).map(Arc::from),
        region: non_empty(label(meta, LABEL_REGION)).map(Arc::from),
    }
}

pub fn node_from_api(
    node: &core::Node,
    origin: Option<&str>,
    warnings: &mut Vec<Warning>,
) -> Option<Node> {
    let meta = &node.metadata;
    let mut report = Report::new(
        ObjectRef::from_meta(KIND_NODE, false, meta),
        origin,
        warnings,
    );
    let name = report.required_name(meta, "node")?;
    let api_addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (i, address) in api_addresses.iter().enumerate() {
        // Hostname and DNS entries name the node; only IPs are traffic destinations.
        if address.type_ != "InternalIP" && address.type_ != "ExternalIP" {
            continue;
        }
        let field = format!("status.addresses[{i}] (type {})", address.type_);
        if let Some(ip) = report.parse_ip(&field, &address.address) {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    Some(Node {
        name,
        zone: non_empty(label(meta, LABEL_ZONE)).map(str::to_owned),
        region: non_empty(label(meta, LABEL_REGION)).map(str::to_owned),
        addresses,
        leaving: leaving(node),
        local_addresses: None,
    })
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Why `node` is leaving the cluster, as kube-proxy judges it for `/healthz` (KEP-3836):
/// a deletion timestamp, or the cluster autoscaler's deletion taint.
fn leaving(node: &core::Node) -> Option<String> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some("the Node is being deleted".to_owned());
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|taint| taint.key == TAINT_TO_BE_DELETED);
    tainted.then(|| format!("the Node is tainted {TAINT_TO_BE_DELETED}"))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use serde_json::{json, Value as Json};

    use super::*;

    const ORIGIN: Option<&str> = Some("test.yaml");

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn api<T: serde::de::DeserializeOwned>(object: Json) -> T {
        serde_json::from_value(object).unwrap()
    }

    fn messages(warnings: &[Warning]) -> Vec<&str> {
        warnings.iter().map(|w| w.message.as_str()).collect()
    }

    /// Converts a Service named `default/web` with the given spec.
    fn service_with(spec: Json) -> (Option<Service>, Vec<Warning>) {
        service_object(json!({"metadata": {"name": "web"}, "spec": spec}))
    }

    fn service_object(object: Json) -> (Option<Service>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = service_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }

    fn slice_object(object: Json) -> (Option<EndpointSlice>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = slice_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }

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

    fn node_object(object: Json) -> (Option<Node>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = node_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }

    // ---- Services ----

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

    // ---- EndpointSlices ----

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

    // ---- Nodes ----

    #[test]
    fn node_topology_and_addresses() {
        let (node, warnings) = node_object(json!({
            "metadata": {"name": "node-a", "labels": {LABEL_ZONE: "zone-1", LABEL_REGION: "region-1"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": "InternalIP", "address": "fd00::1"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "ExternalIP", "address": "10.0.0.1"},
                {"type": "InternalDNS", "address": "node-a.internal"},
                {"type": "InternalIP", "address": "10.0.0.999"},
            ]},
        }));
        assert_eq!(
            node,
            Some(Node {
                name: "node-a".into(),
                zone: Some("zone-1".into()),
                region: Some("region-1".into()),
                addresses: vec![ip("10.0.0.1"), ip("fd00::1"), ip("203.0.113.7")],
                leaving: None,
                local_addresses: None,
            })
        );
        assert_eq!(
            messages(&warnings),
            vec![
                r#"status.addresses[6] (type InternalIP): "10.0.0.999" is not a valid IP address; address skipped"#
            ]
        );
        assert_eq!(warnings[0].object.to_string(), "Node node-a");
    }

    #[test]
    fn node_without_topology_labels_or_name() {
        let cases = [json!({}), json!({LABEL_ZONE: "", LABEL_REGION: ""})];
        for labels in cases {
            let (node, warnings) =
                node_object(json!({"metadata": {"name": "node-b", "labels": labels}}));
            assert!(warnings.is_empty());
            let node = node.unwrap();
            assert_eq!((node.zone, node.region), (None, None), "{labels}");
            assert!(node.addresses.is_empty());
        }

        let (node, warnings) = node_object(json!({"metadata": {}}));
        assert_eq!(node, None);
        assert_eq!(warnings.len(), 1);
        assert_eq!(
            warnings[0].to_string(),
            "test.yaml: Node <unnamed>: metadata.name is missing; node dropped"
        );
    }

    #[test]
    fn health_check_node_ports_only_for_external_local_load_balancers() {
        let port = |type_: &str, policy: &str| {
            service_object(json!({
                "metadata": {"name": "lb"},
                "spec": {"type": type_, "externalTrafficPolicy": policy,
                         "healthCheckNodePort": 32000, "clusterIP": "10.96.0.9"},
            }))
            .0
            .and_then(|service| service.health_check_node_port)
        };
        assert_eq!(port("LoadBalancer", "Local"), Some(32000));
        assert_eq!(port("LoadBalancer", "Cluster"), None);
        assert_eq!(port("NodePort", "Local"), None);
        let (service, warnings) = service_object(json!({
            "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 70000, "clusterIP": "10.96.0.9"},
        }));
        assert_eq!(service.and_then(|s| s.health_check_node_port), None);
        assert_eq!(
            messages(&warnings),
            vec!["spec.healthCheckNodePort: 70000 is out of range 1-65535; health check dropped"]
        );
    }

    #[test]
    fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_leaving() {
        let leaving = |object: Json| node_object(object).0.and_then(|node| node.leaving);
        assert_eq!(leaving(json!({"metadata": {"name": "n"}})), None);
        assert_eq!(
            leaving(
                json!({"metadata": {"name": "n", "deletionTimestamp": "2026-12-01T10:00:00Z"}})
            ),
            Some("the Node is being deleted".to_owned())
        );
        let tainted = json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733047200", "effect": "NoSchedule"},
            ]},
        });
        assert_eq!(
            leaving(tainted),
            Some("the Node is tainted ToBeDeletedByClusterAutoscaler".to_owned())
        );
        let other_taint = json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [{"key": "DeletionCandidateOfClusterAutoscaler", "effect": "PreferNoSchedule"}]},
        });
        assert_eq!(leaving(other_taint), None);
    }
}
