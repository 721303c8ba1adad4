//! Conntrack clean-up over ctnetlink: when a UDP (or SCTP) real server goes, its entries go
//! too, so datagrams stop following a dead backend.
//!
//! CONTRACT (filled in by the conntrack work).

use std::net::IpAddr;

use crate::model::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack: not implemented yet")]
    Unimplemented,
}

/// Deletes every entry of `protocol` whose original destination is `vip:vip_port` and whose
/// reply source is `backend:backend_port`; returns how many went.
pub fn flush_backend(
    _protocol: Protocol,
    _vip: IpAddr,
    _vip_port: u16,
    _backend: IpAddr,
    _backend_port: u16,
) -> Result<usize, ConntrackError> {
    Err(ConntrackError::Unimplemented)
}
