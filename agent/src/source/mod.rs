//! Sources that fill the store: the Kubernetes API, or a directory of YAML.

pub mod file;
pub mod kube;
pub mod poll;
