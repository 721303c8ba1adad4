//! IPVS over generic netlink: the `IPVS` family's messages (a pure codec) and a client that
//! sends them, pipelined, over one netlink socket.
//!
//! CONTRACT (filled in by the IPVS-netlink work): the types and signatures below are what the
//! dataplane codes against.

use std::net::IpAddr;

use crate::model::Protocol;

/// Why an IPVS request failed.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("ipvs: not implemented yet")]
    Unimplemented,
}

impl IpvsError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        None
    }
}

/// Identity of a virtual service in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

/// A virtual service as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsService {
    pub id: ServiceId,
    pub scheduler: String,
    /// `Some(seconds)` when the persistent flag is set.
    pub persistence_timeout: Option<u32>,
}

/// A real server as the kernel holds it (always Masq forwarding when we add it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsDestination {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub forward: Forward,
    pub active_connections: u32,
    pub inactive_connections: u32,
}

/// The forwarding method of a real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Masq,
    Local,
    Tunnel,
    Route,
    Bypass,
}

/// One change; a batch of them is pipelined by [`IpvsClient::execute`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    NewService(IpvsService),
    SetService(IpvsService),
    DelService(ServiceId),
    NewDestination(ServiceId, IpvsDestination),
    SetDestination(ServiceId, IpvsDestination),
    DelDestination(ServiceId, IpAddr, u16),
}

/// The kernel's IPVS version and connection-table size (`ipvsadm -Ln`'s first line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpvsInfo {
    pub version: (u8, u8, u8),
    pub table_size: u32,
}

/// A generic-netlink socket bound to the `IPVS` family.
pub struct IpvsClient {}

impl IpvsClient {
    /// Opens a socket and resolves the `IPVS` family.
    pub fn connect() -> Result<Self, IpvsError> {
        Err(IpvsError::Unimplemented)
    }

    pub fn info(&mut self) -> Result<IpvsInfo, IpvsError> {
        Err(IpvsError::Unimplemented)
    }

    /// Every virtual service (one multipart dump).
    pub fn services(&mut self) -> Result<Vec<IpvsService>, IpvsError> {
        Err(IpvsError::Unimplemented)
    }

    /// The real servers of one virtual service (one multipart dump).
    pub fn destinations(
        &mut self,
        _service: &ServiceId,
    ) -> Result<Vec<IpvsDestination>, IpvsError> {
        Err(IpvsError::Unimplemented)
    }

    /// Sends every command before reading any acknowledgement; returns one result per command,
    /// in order.
    pub fn execute(&mut self, commands: &[Command]) -> Vec<Result<(), IpvsError>> {
        commands
            .iter()
            .map(|_| Err(IpvsError::Unimplemented))
            .collect()
    }

    /// Netlink messages sent since the socket was opened, by kind (for benchmarks/metrics).
    pub fn messages_sent(&self) -> MessageCounts {
        MessageCounts::default()
    }
}

/// Requests sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    pub new_service: u64,
    pub set_service: u64,
    pub del_service: u64,
    pub new_destination: u64,
    pub set_destination: u64,
    pub del_destination: u64,
    pub get_service: u64,
    pub dump_services: u64,
    pub dump_destinations: u64,
    pub other: u64,
}
