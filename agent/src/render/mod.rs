//! Renderings of a node table: `ipvsadm -Ln` text and JSON.

pub mod ipvsadm;
pub mod json;
