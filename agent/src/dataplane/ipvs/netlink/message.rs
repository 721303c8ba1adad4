//! The IPVS generic-netlink payload (`genlmsghdr` command + attributes) and its translation
//! to and from the contract types: what topoproxy sends for each [`Command`], byte for byte
//! what `ipvsadm` 1.31 sends for the same change, and how kernel replies become
//! [`IpvsService`]s, [`IpvsDestination`]s and [`IpvsInfo`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, Emitable, ErrorContext, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use super::attr::*;
use super::{Command, Forward, IpvsDestination, IpvsInfo, IpvsService, IpvsTimeouts, ServiceId};
use crate::model::Protocol;
use crate::scheduler::IP_VS_SVC_F_SCHED_MASK;

/// `IPVS_GENL_NAME`.
pub const IPVS_GENL_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 1;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;
const IPPROTO_TCP: u16 = libc::IPPROTO_TCP as u16;
const IPPROTO_UDP: u16 = libc::IPPROTO_UDP as u16;
const IPPROTO_SCTP: u16 = libc::IPPROTO_SCTP as u16;

/// `enum IPVS_CMD_*` (the daemon and zero commands are kept as `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpvsCmd {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    /// Sets the connection timeouts; also the command of the kernel's reply to `GetConfig`.
    SetConfig,
    GetConfig,
    /// The kernel's reply to `GetInfo` carries this command.
    SetInfo,
    GetInfo,
    Flush,
    Other(u8),
}

impl From<IpvsCmd> for u8 {
    fn from(cmd: IpvsCmd) -> u8 {
        match cmd {
            IpvsCmd::NewService => 1,
            IpvsCmd::SetService => 2,
            IpvsCmd::DelService => 3,
            IpvsCmd::GetService => 4,
            IpvsCmd::NewDest => 5,
            IpvsCmd::SetDest => 6,
            IpvsCmd::DelDest => 7,
            IpvsCmd::GetDest => 8,
            IpvsCmd::SetConfig => 12,
            IpvsCmd::GetConfig => 13,
            IpvsCmd::SetInfo => 14,
            IpvsCmd::GetInfo => 15,
            IpvsCmd::Flush => 17,
            IpvsCmd::Other(cmd) => cmd,
        }
    }
}

impl From<u8> for IpvsCmd {
    fn from(cmd: u8) -> Self {
        match cmd {
            1 => IpvsCmd::NewService,
            2 => IpvsCmd::SetService,
            3 => IpvsCmd::DelService,
            4 => IpvsCmd::GetService,
            5 => IpvsCmd::NewDest,
            6 => IpvsCmd::SetDest,
            7 => IpvsCmd::DelDest,
            8 => IpvsCmd::GetDest,
            12 => IpvsCmd::SetConfig,
            13 => IpvsCmd::GetConfig,
            14 => IpvsCmd::SetInfo,
            15 => IpvsCmd::GetInfo,
            17 => IpvsCmd::Flush,
            other => IpvsCmd::Other(other),
        }
    }
}

/// One IPVS generic-netlink message: wrap it in `GenlMessage` and `NetlinkMessage` to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: IpvsCmd,
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let cmd = IpvsCmd::from(header.cmd);
        // Info commands number their top-level attributes from 1 like the others do.
        let info = matches!(cmd, IpvsCmd::SetInfo | IpvsCmd::GetInfo);
        let attrs = NlasIterator::new(buf)
            .map(|nla| {
                nla.and_then(|nla| {
                    if info {
                        CmdAttr::parse_info(&nla)
                    } else {
                        CmdAttr::parse_command(&nla)
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .context(format!("invalid attributes of IPVS command {}", header.cmd))?;
        Ok(Self { cmd, attrs })
    }
}

impl IpvsMessage {
    /// The message `ipvsadm` sends for the same change.
    pub fn from_command(command: &Command) -> Self {
        match command {
            Command::NewService(service) => Self {
                cmd: IpvsCmd::NewService,
                attrs: vec![CmdAttr::Service(service_attrs(service))],
            },
            Command::SetService(service) => Self {
                cmd: IpvsCmd::SetService,
                attrs: vec![CmdAttr::Service(service_attrs(service))],
            },
            Command::DelService(id) => Self {
                cmd: IpvsCmd::DelService,
                attrs: vec![CmdAttr::Service(service_key_attrs(id))],
            },
            Command::NewDestination(id, dest) => Self {
                cmd: IpvsCmd::NewDest,
                attrs: vec![
                    CmdAttr::Service(service_key_attrs(id)),
                    CmdAttr::Dest(dest_attrs(dest)),
                ],
            },
            Command::SetDestination(id, dest) => Self {
                cmd: IpvsCmd::SetDest,
                attrs: vec![
                    CmdAttr::Service(service_key_attrs(id)),
                    CmdAttr::Dest(dest_attrs(dest)),
                ],
            },
            Command::DelDestination(id, address, port) => Self {
                cmd: IpvsCmd::DelDest,
                attrs: vec![
                    CmdAttr::Service(service_key_attrs(id)),
                    // The kernel reads only the address and port of a deleted destination;
                    // the rest is ipvsadm's defaults (direct routing, weight 1).
                    CmdAttr::Dest(dest_attrs(&IpvsDestination {
                        address: *address,
                        port: *port,
                        weight: 1,
                        forward: Forward::Route,
                        active_connections: 0,
                        inactive_connections: 0,
                    })),
                ],
            },
        }
    }

    /// `IPVS_CMD_GET_INFO`.
    pub fn get_info() -> Self {
        Self {
            cmd: IpvsCmd::GetInfo,
            attrs: Vec::new(),
        }
    }

    /// `IPVS_CMD_SET_CONFIG` with all three timeouts, as `ipvsadm --set` and kube-proxy's
    /// libipvs send it (a 0 leaves that timeout as it is).
    pub fn set_timeouts(timeouts: &IpvsTimeouts) -> Self {
        Self {
            cmd: IpvsCmd::SetConfig,
            attrs: vec![
                CmdAttr::TimeoutTcp(timeouts.tcp),
                CmdAttr::TimeoutTcpFin(timeouts.tcp_fin),
                CmdAttr::TimeoutUdp(timeouts.udp),
            ],
        }
    }

    /// `IPVS_CMD_GET_CONFIG`: the kernel answers with the current timeouts.
    pub fn get_timeouts() -> Self {
        Self {
            cmd: IpvsCmd::GetConfig,
            attrs: Vec::new(),
        }
    }

    /// `IPVS_CMD_GET_SERVICE`, sent with `NLM_F_DUMP`.
    pub fn dump_services() -> Self {
        Self {
            cmd: IpvsCmd::GetService,
            attrs: Vec::new(),
        }
    }

    /// `IPVS_CMD_GET_SERVICE` for one service, sent without `NLM_F_DUMP`: the service's key
    /// only, as `ipvsadm -L -t <address:port>` sends it.
    pub fn get_service(service: &ServiceId) -> Self {
        Self {
            cmd: IpvsCmd::GetService,
            attrs: vec![CmdAttr::Service(service_id_attrs(service))],
        }
    }

    /// `IPVS_CMD_GET_DEST` for one service, sent with `NLM_F_DUMP`.
    pub fn dump_destinations(service: &ServiceId) -> Self {
        Self {
            cmd: IpvsCmd::GetDest,
            attrs: vec![CmdAttr::Service(service_id_attrs(service))],
        }
    }

    /// `IPVS_CMD_FLUSH`: removes every virtual service (foreign ones too).
    pub fn flush() -> Self {
        Self {
            cmd: IpvsCmd::Flush,
            attrs: Vec::new(),
        }
    }

    /// The attributes nested in this message's `IPVS_CMD_ATTR_SERVICE`, if any.
    pub fn service(&self) -> Option<&[ServiceAttr]> {
        self.attrs.iter().find_map(|attr| match attr {
            CmdAttr::Service(attrs) => Some(attrs.as_slice()),
            _ => None,
        })
    }

    /// The attributes nested in this message's `IPVS_CMD_ATTR_DEST`, if any.
    pub fn dest(&self) -> Option<&[DestAttr]> {
        self.attrs.iter().find_map(|attr| match attr {
            CmdAttr::Dest(attrs) => Some(attrs.as_slice()),
            _ => None,
        })
    }
}

fn family_of(address: &IpAddr) -> u16 {
    match address {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn address_bytes(address: &IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match address {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

fn protocol_number(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// What `ipvsadm` sends as the netmask: all ones for v4, the prefix length 128 for v6.
fn full_netmask(address: &IpAddr) -> u32 {
    match address {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    }
}

fn forward_method(forward: Forward) -> u32 {
    match forward {
        Forward::Masq => IP_VS_CONN_F_MASQ,
        Forward::Local => IP_VS_CONN_F_LOCALNODE,
        Forward::Tunnel => IP_VS_CONN_F_TUNNEL,
        Forward::Route => IP_VS_CONN_F_DROUTE,
        Forward::Bypass => IP_VS_CONN_F_BYPASS,
    }
}

/// The identity of a service: what a destination dump asks for.
fn service_id_attrs(id: &ServiceId) -> Vec<ServiceAttr> {
    vec![
        ServiceAttr::AddressFamily(family_of(&id.address)),
        ServiceAttr::Protocol(protocol_number(id.protocol)),
        ServiceAttr::Address(address_bytes(&id.address)),
        ServiceAttr::Port(id.port),
    ]
}

fn full_service_attrs(
    id: &ServiceId,
    scheduler: &str,
    scheduler_flags: u32,
    persistence_timeout: Option<u32>,
) -> Vec<ServiceAttr> {
    let mut attrs = service_id_attrs(id);
    let persistent = if persistence_timeout.is_some() {
        IP_VS_SVC_F_PERSISTENT
    } else {
        0
    };
    attrs.extend([
        ServiceAttr::Scheduler(scheduler.to_owned()),
        // mask all ones: a set-service that drops persistence or a scheduler flag must clear
        // it, as `ipvsadm -E` does.
        ServiceAttr::Flags(ServiceFlags {
            flags: persistent | (scheduler_flags & IP_VS_SVC_F_SCHED_MASK),
            mask: u32::MAX,
        }),
        ServiceAttr::Timeout(persistence_timeout.unwrap_or(0)),
        ServiceAttr::Netmask(full_netmask(&id.address)),
    ]);
    attrs
}

/// A new or edited service: identity, scheduler and its flags, persistence.
pub fn service_attrs(service: &IpvsService) -> Vec<ServiceAttr> {
    full_service_attrs(
        &service.id,
        &service.scheduler,
        service.scheduler_flags,
        service.persistence_timeout,
    )
}

/// The service part of delete-service and destination commands: `ipvsadm` sends every service
/// attribute there, with an empty scheduler and no persistence; the kernel reads the identity.
fn service_key_attrs(id: &ServiceId) -> Vec<ServiceAttr> {
    full_service_attrs(id, "", 0, None)
}

/// A destination as `ipvsadm -a/-e` sends it (no thresholds, no tunnel).
pub fn dest_attrs(dest: &IpvsDestination) -> Vec<DestAttr> {
    vec![
        DestAttr::AddressFamily(family_of(&dest.address)),
        DestAttr::Address(address_bytes(&dest.address)),
        DestAttr::Port(dest.port),
        DestAttr::ForwardMethod(forward_method(dest.forward)),
        DestAttr::Weight(dest.weight),
        DestAttr::TunnelType(0),
        DestAttr::TunnelPort(0),
        DestAttr::TunnelFlags(0),
        DestAttr::UpperThreshold(0),
        DestAttr::LowerThreshold(0),
    ]
}

fn decode_address(family: u16, bytes: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => Err(DecodeError::from(format!("unknown address family {other}"))),
    }
}

fn missing(what: &str) -> DecodeError {
    DecodeError::from(format!("{what} missing"))
}

/// A service as the kernel reports it. `Ok(None)` for services the contract cannot name:
/// firewall-mark services (no protocol, address or port) and protocols other than
/// TCP/UDP/SCTP; topoproxy never creates those and must leave them alone.
pub fn parse_service(attrs: &[ServiceAttr]) -> Result<Option<IpvsService>, DecodeError> {
    let (mut family, mut protocol, mut address, mut port) = (None, None, None, None);
    let (mut scheduler, mut flags, mut timeout) = (None, None, None);
    for attr in attrs {
        match attr {
            ServiceAttr::AddressFamily(v) => family = Some(*v),
            ServiceAttr::Protocol(v) => protocol = Some(*v),
            ServiceAttr::Address(v) => address = Some(v),
            ServiceAttr::Port(v) => port = Some(*v),
            ServiceAttr::FirewallMark(mark) if *mark != 0 => return Ok(None),
            ServiceAttr::Scheduler(v) => scheduler = Some(v.clone()),
            ServiceAttr::Flags(v) => flags = Some(v.flags),
            ServiceAttr::Timeout(v) => timeout = Some(*v),
            _ => {}
        }
    }
    let protocol = match protocol.ok_or_else(|| missing("IPVS_SVC_ATTR_PROTOCOL"))? {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        IPPROTO_SCTP => Protocol::Sctp,
        _ => return Ok(None),
    };
    let family = family.ok_or_else(|| missing("IPVS_SVC_ATTR_AF"))?;
    let address = decode_address(
        family,
        address.ok_or_else(|| missing("IPVS_SVC_ATTR_ADDR"))?,
    )?;
    let flags = flags.ok_or_else(|| missing("IPVS_SVC_ATTR_FLAGS"))?;
    let persistent = flags & IP_VS_SVC_F_PERSISTENT;
    Ok(Some(IpvsService {
        id: ServiceId {
            protocol,
            address,
            port: port.ok_or_else(|| missing("IPVS_SVC_ATTR_PORT"))?,
        },
        scheduler: scheduler.ok_or_else(|| missing("IPVS_SVC_ATTR_SCHED_NAME"))?,
        scheduler_flags: flags & IP_VS_SVC_F_SCHED_MASK,
        persistence_timeout: (persistent != 0).then(|| timeout.unwrap_or(0)),
    }))
}

/// A destination as the kernel reports it. Kernels before 3.18 send no address family: the
/// destination then has the service's (`service_family`).
pub fn parse_destination(
    attrs: &[DestAttr],
    service_family: &IpAddr,
) -> Result<IpvsDestination, DecodeError> {
    let (mut family, mut address, mut port, mut forward) = (None, None, None, None);
    let (mut weight, mut active, mut inactive) = (None, 0, 0);
    for attr in attrs {
        match attr {
            DestAttr::AddressFamily(v) => family = Some(*v),
            DestAttr::Address(v) => address = Some(v),
            DestAttr::Port(v) => port = Some(*v),
            DestAttr::ForwardMethod(v) => forward = Some(*v),
            DestAttr::Weight(v) => weight = Some(*v),
            DestAttr::ActiveConnections(v) => active = *v,
            DestAttr::InactiveConnections(v) => inactive = *v,
            _ => {}
        }
    }
    let family = family.unwrap_or_else(|| family_of(service_family));
    let forward = match forward.ok_or_else(|| missing("IPVS_DEST_ATTR_FWD_METHOD"))?
        & IP_VS_CONN_F_FWD_MASK
    {
        IP_VS_CONN_F_MASQ => Forward::Masq,
        IP_VS_CONN_F_LOCALNODE => Forward::Local,
        IP_VS_CONN_F_TUNNEL => Forward::Tunnel,
        IP_VS_CONN_F_DROUTE => Forward::Route,
        IP_VS_CONN_F_BYPASS => Forward::Bypass,
        other => {
            return Err(DecodeError::from(format!(
                "unknown forwarding method {other}"
            )))
        }
    };
    Ok(IpvsDestination {
        address: decode_address(
            family,
            address.ok_or_else(|| missing("IPVS_DEST_ATTR_ADDR"))?,
        )?,
        port: port.ok_or_else(|| missing("IPVS_DEST_ATTR_PORT"))?,
        weight: weight.ok_or_else(|| missing("IPVS_DEST_ATTR_WEIGHT"))?,
        forward,
        active_connections: active,
        inactive_connections: inactive,
    })
}

/// The reply to `IPVS_CMD_GET_CONFIG` (the kernel always sends all three).
pub fn parse_timeouts(message: &IpvsMessage) -> Result<IpvsTimeouts, DecodeError> {
    let (mut tcp, mut tcp_fin, mut udp) = (None, None, None);
    for attr in &message.attrs {
        match attr {
            CmdAttr::TimeoutTcp(v) => tcp = Some(*v),
            CmdAttr::TimeoutTcpFin(v) => tcp_fin = Some(*v),
            CmdAttr::TimeoutUdp(v) => udp = Some(*v),
            _ => {}
        }
    }
    Ok(IpvsTimeouts {
        tcp: tcp.ok_or_else(|| missing("IPVS_CMD_ATTR_TIMEOUT_TCP"))?,
        tcp_fin: tcp_fin.ok_or_else(|| missing("IPVS_CMD_ATTR_TIMEOUT_TCP_FIN"))?,
        udp: udp.ok_or_else(|| missing("IPVS_CMD_ATTR_TIMEOUT_UDP"))?,
    })
}

/// The reply to `IPVS_CMD_GET_INFO`.
pub fn parse_info(message: &IpvsMessage) -> Result<IpvsInfo, DecodeError> {
    let (mut version, mut size) = (None, None);
    for attr in &message.attrs {
        match attr {
            CmdAttr::Info(InfoAttr::Version(v)) => version = Some(*v),
            CmdAttr::Info(InfoAttr::ConnectionTableSize(v)) => size = Some(*v),
            _ => {}
        }
    }
    let version = version.ok_or_else(|| missing("IPVS_INFO_ATTR_VERSION"))?;
    Ok(IpvsInfo {
        version: ((version >> 16) as u8, (version >> 8) as u8, version as u8),
        table_size: size.ok_or_else(|| missing("IPVS_INFO_ATTR_CONN_TAB_SIZE"))?,
    })
}
