//! Conversion from Kubernetes API objects (k8s-openapi) to the validated [`crate::model`].
//!
//! Bad content never fails a whole load: an invalid IP, an out-of-range port, an unknown
//! protocol or an address of the wrong family drops just that address, port or endpoint;
//! an object that cannot be used at all (a slice without its service label) is dropped.
//! Each drop is reported as a [`Warning`] naming the object and what was wrong.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::model::{
    LocalityPolicy, Protocol, ANNOTATION_IPVS_SCHEDULER, ANNOTATION_LOCALITY,
    DEFAULT_AFFINITY_TIMEOUT_SECONDS,
};
use crate::scheduler::Scheduler;

use super::mcs;

mod endpoint_slice;
mod node;
mod service;
mod service_import;

pub use endpoint_slice::{
    import_slice_from_api, is_import_slice, is_service_slice, slice_from_api,
};
pub use node::{node_from_api, node_locality};
pub use service::service_from_api;
pub use service_import::service_import_from_api;

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

/// What the tests of every kind share: parsing API JSON and reading warnings.
#[cfg(test)]
mod test_support {
    use std::net::IpAddr;

    use serde_json::Value as Json;

    use super::*;
    use crate::model::{EndpointSlice, Service};

    pub(super) const ORIGIN: Option<&str> = Some("test.yaml");

    pub(super) fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    pub(super) fn api<T: serde::de::DeserializeOwned>(object: Json) -> T {
        serde_json::from_value(object).unwrap()
    }

    pub(super) fn messages(warnings: &[Warning]) -> Vec<&str> {
        warnings.iter().map(|w| w.message.as_str()).collect()
    }

    pub(super) fn service_object(object: Json) -> (Option<Service>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = service_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }

    pub(super) fn slice_object(object: Json) -> (Option<EndpointSlice>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let converted = slice_from_api(&api(object), ORIGIN, &mut warnings);
        (converted, warnings)
    }
}
