//! Renderings of a node table: `ipvsadm -Ln` text and JSON, and `topoproxy plan`'s output.

pub mod ipvsadm;
pub mod json;
pub mod plan_output;
