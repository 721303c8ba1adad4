//! IPVS over generic netlink: the `IPVS` family's messages (a pure codec, [`attr`] and
//! [`message`]) and a client that sends them, pipelined, over one netlink socket ([`client`]).
//! This module owns the types the dataplane codes against and the errors the kernel's answers
//! become.

pub mod attr;
pub mod client;
pub mod message;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::DecodeError;

use crate::model::Protocol;

pub use client::{Acknowledgements, BatchTiming, IpvsClient};

/// Why an IPVS request failed. Kernel refusals carry the request they answer and the errno.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// A socket call failed (`socket`, `bind`, `sendmsg`, `recvmsg`...).
    #[error("ipvs: {call} on the generic netlink socket")]
    Socket {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel has no `IPVS` generic netlink family: the `ip_vs` module is not loaded.
    #[error("ipvs: the kernel has no IPVS generic netlink family (is the ip_vs module loaded?)")]
    FamilyNotFound,
    /// `EEXIST`: the service or destination is already there.
    #[error("ipvs: {request}: already exists")]
    Exists { request: Box<Request> },
    /// `ESRCH` (no such service) or `ENOENT` (no such destination, or no such scheduler
    /// module when adding or editing a service).
    #[error("ipvs: {request}: {}", if *.errno == libc::ESRCH { "no such service" } else { "not found (no such destination or scheduler)" })]
    NotFound { request: Box<Request>, errno: i32 },
    /// `EINVAL`: the kernel refused the values, e.g. an unknown scheduler module, or a
    /// real-server address IPVS does not consider unicast.
    #[error("ipvs: {request}: rejected as invalid{}", message_suffix(.message))]
    Invalid {
        request: Box<Request>,
        /// The kernel's extended-ack message, when it gave one.
        message: Option<String>,
    },
    /// Any other errno.
    #[error("ipvs: {request}: {source}{}", message_suffix(.message))]
    Kernel {
        request: Box<Request>,
        errno: i32,
        message: Option<String>,
        #[source]
        source: io::Error,
    },
    /// The acknowledgement never came: the socket's receive buffer overflowed (`ENOBUFS`) and
    /// the kernel dropped it. The change may or may not have been made; read the state back.
    #[error("ipvs: {request}: acknowledgement lost (receive buffer overflow); state unknown")]
    AckLost { request: Box<Request> },
    /// The kernel's reply could not be decoded.
    #[error("ipvs: {request}: malformed reply from the kernel")]
    Decode {
        request: Box<Request>,
        #[source]
        source: DecodeError,
    },
    /// The kernel answered something the protocol does not allow here.
    #[error("ipvs: {request}: unexpected reply: {reason}")]
    Protocol {
        request: Box<Request>,
        reason: String,
    },
}

fn message_suffix(message: &Option<String>) -> String {
    message
        .as_ref()
        .map(|m| format!(" ({m})"))
        .unwrap_or_default()
}

impl IpvsError {
    /// The kernel's errno, for refusals.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Exists { .. } => Some(libc::EEXIST),
            Self::NotFound { errno, .. } | Self::Kernel { errno, .. } => Some(*errno),
            Self::Invalid { .. } => Some(libc::EINVAL),
            Self::Socket { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The request this error answers, when it answers one.
    pub fn request(&self) -> Option<&Request> {
        match self {
            Self::Exists { request }
            | Self::NotFound { request, .. }
            | Self::Invalid { request, .. }
            | Self::Kernel { request, .. }
            | Self::AckLost { request }
            | Self::Decode { request, .. }
            | Self::Protocol { request, .. } => Some(request),
            Self::Socket { .. } | Self::FamilyNotFound => None,
        }
    }
}

/// What was asked of the kernel, for error messages (`add destination 10.244.1.5:8080 to TCP
/// 10.96.0.10:80`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ResolveFamily,
    Info,
    DumpServices,
    GetService(ServiceId),
    DumpDestinations(ServiceId),
    Flush,
    SetTimeouts(IpvsTimeouts),
    GetTimeouts,
    Command(Command),
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ResolveFamily => write!(f, "resolve the IPVS genetlink family"),
            Self::Info => write!(f, "get IPVS info"),
            Self::DumpServices => write!(f, "list services"),
            Self::GetService(id) => write!(f, "get service {id}"),
            Self::DumpDestinations(id) => write!(f, "list destinations of {id}"),
            Self::Flush => write!(f, "flush"),
            Self::SetTimeouts(t) => write!(
                f,
                "set timeouts tcp {}s tcpfin {}s udp {}s",
                t.tcp, t.tcp_fin, t.udp
            ),
            Self::GetTimeouts => write!(f, "get timeouts"),
            Self::Command(command) => command.fmt(f),
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.protocol,
            SocketAddr::new(self.address, self.port)
        )
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NewService(s) => write!(f, "add service {} ({})", s.id, s.scheduler),
            Self::SetService(s) => write!(f, "edit service {} ({})", s.id, s.scheduler),
            Self::DelService(id) => write!(f, "delete service {id}"),
            Self::NewDestination(id, d) => write!(
                f,
                "add destination {} to {id}",
                SocketAddr::new(d.address, d.port)
            ),
            Self::SetDestination(id, d) => write!(
                f,
                "edit destination {} of {id}",
                SocketAddr::new(d.address, d.port)
            ),
            Self::DelDestination(id, address, port) => write!(
                f,
                "delete destination {} from {id}",
                SocketAddr::new(*address, *port)
            ),
        }
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
    /// The scheduler's flag bits (`IP_VS_SVC_F_SCHED1..3`: `sh-fallback`, `mh-port`, …).
    pub scheduler_flags: u32,
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

/// IPVS's connection timeouts in seconds, as `ipvsadm -L --timeout` prints them. In a set,
/// 0 leaves that timeout as the kernel has it (the kernel's own rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpvsTimeouts {
    /// Established TCP connections (kube-proxy's `ipvs.tcpTimeout`).
    pub tcp: u32,
    /// TCP connections after a FIN (`ipvs.tcpFinTimeout`).
    pub tcp_fin: u32,
    /// UDP flows (`ipvs.udpTimeout`).
    pub udp: u32,
}

impl IpvsTimeouts {
    /// Whether a set would change nothing (every timeout 0).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
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
