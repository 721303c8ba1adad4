//! Conversion from Kubernetes API objects (k8s-openapi) to the validated [`crate::model`].
//!
//! Bad content never fails a whole load: an invalid IP, an out-of-range port, an unknown
//! protocol or an address of the wrong family drops just that address, port or endpoint;
//! an object that cannot be used at all (a slice without its service label) is dropped.
//! Each drop is reported as a [`Warning`] naming the object and what was wrong.

use std::fmt;

use serde::Serialize;

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
