//! The kernel settings IPVS mode needs, written only when they differ.
//!
//! CONTRACT (filled in by the sysctl work).

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl: not implemented yet")]
    Unimplemented,
}

/// Sets `name` (dotted, e.g. `net.ipv4.vs.conntrack`) to `value` unless it already has it;
/// returns whether it was written.
pub fn ensure(_name: &str, _value: &str) -> Result<bool, SysctlError> {
    Err(SysctlError::Unimplemented)
}
