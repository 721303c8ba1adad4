//! The IPVS family's netlink attributes (`linux/ip_vs.h`) as typed enums, each parsed from and
//! emitted to the exact bytes the kernel and `ipvsadm` use; anything else is kept as
//! `Other(DefaultNla)` so a newer kernel's attributes survive a round trip.

use netlink_packet_core::{
    emit_u16, emit_u16_be, emit_u32, parse_string, parse_u16, parse_u16_be, parse_u32, parse_u8,
    DecodeError, DefaultNla, Emitable, ErrorContext, Nla, NlaBuffer, NlasIterator, Parseable,
    NLA_F_NESTED,
};

// Top-level attributes of every command but the info ones (enum IPVS_CMD_ATTR_*).
pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;
/// The connection timeouts of `IPVS_CMD_SET_CONFIG`/`IPVS_CMD_GET_CONFIG`, in seconds
/// (`ipvsadm --set tcp tcpfin udp`); 0 in a set leaves that timeout as it is.
pub const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
pub const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
pub const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

// Nested in IPVS_CMD_ATTR_SERVICE (enum IPVS_SVC_ATTR_*).
pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_FWMARK: u16 = 5;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;
pub const IPVS_SVC_ATTR_STATS: u16 = 10;
pub const IPVS_SVC_ATTR_PE_NAME: u16 = 11;
pub const IPVS_SVC_ATTR_STATS64: u16 = 12;

// Nested in IPVS_CMD_ATTR_DEST (enum IPVS_DEST_ATTR_*).
pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
pub const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
pub const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
pub const IPVS_DEST_ATTR_STATS: u16 = 10;
/// Kernel ≥ 3.18.
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
pub const IPVS_DEST_ATTR_STATS64: u16 = 12;
/// Kernel ≥ 5.2 (tunnel type, port and flags; `ipvsadm` 1.31 always sends them).
pub const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
pub const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
pub const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

// Top-level attributes of IPVS_CMD_GET_INFO's reply (enum IPVS_INFO_ATTR_*).
pub const IPVS_INFO_ATTR_VERSION: u16 = 1;
pub const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// `IP_VS_SVC_F_PERSISTENT`.
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it holds.
pub const IP_VS_SVC_F_HASHED: u32 = 0x2;

// Forwarding methods (IP_VS_CONN_F_*), under IP_VS_CONN_F_FWD_MASK.
pub const IP_VS_CONN_F_FWD_MASK: u32 = 0x7;
pub const IP_VS_CONN_F_MASQ: u32 = 0;
pub const IP_VS_CONN_F_LOCALNODE: u32 = 1;
pub const IP_VS_CONN_F_TUNNEL: u32 = 2;
pub const IP_VS_CONN_F_DROUTE: u32 = 3;
pub const IP_VS_CONN_F_BYPASS: u32 = 4;

/// `struct ip_vs_flags`: which flag bits to set (`flags`) among those to change (`mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceFlags {
    pub flags: u32,
    pub mask: u32,
}

/// An attribute nested in `IPVS_CMD_ATTR_SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAttr {
    /// `AF_INET` or `AF_INET6`.
    AddressFamily(u16),
    /// `IPPROTO_TCP`, `IPPROTO_UDP` or `IPPROTO_SCTP`.
    Protocol(u16),
    /// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
    Address([u8; 16]),
    /// Host order here, network order on the wire.
    Port(u16),
    FirewallMark(u32),
    Scheduler(String),
    Flags(ServiceFlags),
    /// Persistence timeout in seconds.
    Timeout(u32),
    /// Persistence granularity: a v4 mask (`0xffffffff`) or a v6 prefix length (128), host order
    /// as `ipvsadm` sends it.
    Netmask(u32),
    PersistenceEngine(String),
    /// Statistics (`IPVS_SVC_ATTR_STATS`, `STATS64`) and anything newer.
    Other(DefaultNla),
}

/// An attribute nested in `IPVS_CMD_ATTR_DEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAttr {
    Address([u8; 16]),
    /// Host order here, network order on the wire.
    Port(u16),
    /// `IP_VS_CONN_F_*` under `IP_VS_CONN_F_FWD_MASK`.
    ForwardMethod(u32),
    Weight(u32),
    UpperThreshold(u32),
    LowerThreshold(u32),
    ActiveConnections(u32),
    InactiveConnections(u32),
    PersistentConnections(u32),
    AddressFamily(u16),
    TunnelType(u8),
    /// Host order here, network order on the wire.
    TunnelPort(u16),
    TunnelFlags(u16),
    /// Statistics and anything newer.
    Other(DefaultNla),
}

/// A top-level attribute of the `IPVS_CMD_GET_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoAttr {
    /// `IP_VS_VERSION_CODE`: 0x010201 for 1.2.1.
    Version(u32),
    ConnectionTableSize(u32),
    Other(DefaultNla),
}

/// A top-level attribute of an IPVS command (all but the info commands, whose attributes
/// reuse the same numbers: see [`InfoAttr`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdAttr {
    Service(Vec<ServiceAttr>),
    Dest(Vec<DestAttr>),
    Info(InfoAttr),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP`: established TCP connections, seconds.
    TimeoutTcp(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`: TCP connections after a FIN, seconds.
    TimeoutTcpFin(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_UDP`: UDP flows, seconds.
    TimeoutUdp(u32),
    Other(DefaultNla),
}

fn parse_addr(payload: &[u8]) -> Result<[u8; 16], DecodeError> {
    // The kernel's policy is "at least 16 bytes" (sizeof(union nf_inet_addr)).
    payload
        .get(..16)
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .ok_or_else(|| DecodeError::invalid_ip_address(payload.len()))
}

fn parse_nested<T>(
    payload: &[u8],
    what: &str,
    parse: impl Fn(&NlaBuffer<&[u8]>) -> Result<T, DecodeError>,
) -> Result<Vec<T>, DecodeError> {
    NlasIterator::new(payload)
        .map(|nla| nla.and_then(|nla| parse(&nla)))
        .collect::<Result<Vec<_>, _>>()
        .context(format!("invalid {what}"))
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::AddressFamily(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Address(_) => 16,
            Self::FirewallMark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::Scheduler(s) | Self::PersistenceEngine(s) => s.len() + 1,
            Self::Flags(_) => 8,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::AddressFamily(_) => IPVS_SVC_ATTR_AF,
            Self::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            Self::Address(_) => IPVS_SVC_ATTR_ADDR,
            Self::Port(_) => IPVS_SVC_ATTR_PORT,
            Self::FirewallMark(_) => IPVS_SVC_ATTR_FWMARK,
            Self::Scheduler(_) => IPVS_SVC_ATTR_SCHED_NAME,
            Self::Flags(_) => IPVS_SVC_ATTR_FLAGS,
            Self::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            Self::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            Self::PersistenceEngine(_) => IPVS_SVC_ATTR_PE_NAME,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The emit_* helpers only fail on a short buffer, and `buffer` is value_len() long.
        match self {
            Self::AddressFamily(v) | Self::Protocol(v) => {
                let _ = emit_u16(buffer, *v);
            }
            Self::Port(v) => {
                let _ = emit_u16_be(buffer, *v);
            }
            Self::Address(a) => buffer[..16].copy_from_slice(a),
            Self::FirewallMark(v) | Self::Timeout(v) | Self::Netmask(v) => {
                let _ = emit_u32(buffer, *v);
            }
            Self::Scheduler(s) | Self::PersistenceEngine(s) => emit_string(buffer, s),
            Self::Flags(f) => {
                let _ = emit_u32(&mut buffer[..4], f.flags);
                let _ = emit_u32(&mut buffer[4..8], f.mask);
            }
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

fn emit_string(buffer: &mut [u8], s: &str) {
    buffer[..s.len()].copy_from_slice(s.as_bytes());
    buffer[s.len()] = 0;
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        Ok(match buf.kind() {
            IPVS_SVC_ATTR_AF => {
                Self::AddressFamily(parse_u16(payload).context("invalid IPVS_SVC_ATTR_AF")?)
            }
            IPVS_SVC_ATTR_PROTOCOL => {
                Self::Protocol(parse_u16(payload).context("invalid IPVS_SVC_ATTR_PROTOCOL")?)
            }
            IPVS_SVC_ATTR_ADDR => {
                Self::Address(parse_addr(payload).context("invalid IPVS_SVC_ATTR_ADDR")?)
            }
            IPVS_SVC_ATTR_PORT => {
                Self::Port(parse_u16_be(payload).context("invalid IPVS_SVC_ATTR_PORT")?)
            }
            IPVS_SVC_ATTR_FWMARK => {
                Self::FirewallMark(parse_u32(payload).context("invalid IPVS_SVC_ATTR_FWMARK")?)
            }
            IPVS_SVC_ATTR_SCHED_NAME => {
                Self::Scheduler(parse_string(payload).context("invalid IPVS_SVC_ATTR_SCHED_NAME")?)
            }
            IPVS_SVC_ATTR_FLAGS => {
                if payload.len() < 8 {
                    return Err(DecodeError::buffer_too_small(payload.len(), 8))
                        .context("invalid IPVS_SVC_ATTR_FLAGS");
                }
                Self::Flags(ServiceFlags {
                    flags: parse_u32(&payload[..4])?,
                    mask: parse_u32(&payload[4..8])?,
                })
            }
            IPVS_SVC_ATTR_TIMEOUT => {
                Self::Timeout(parse_u32(payload).context("invalid IPVS_SVC_ATTR_TIMEOUT")?)
            }
            IPVS_SVC_ATTR_NETMASK => {
                Self::Netmask(parse_u32(payload).context("invalid IPVS_SVC_ATTR_NETMASK")?)
            }
            IPVS_SVC_ATTR_PE_NAME => Self::PersistenceEngine(
                parse_string(payload).context("invalid IPVS_SVC_ATTR_PE_NAME")?,
            ),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Address(_) => 16,
            Self::Port(_) | Self::AddressFamily(_) | Self::TunnelPort(_) | Self::TunnelFlags(_) => {
                2
            }
            Self::TunnelType(_) => 1,
            Self::ForwardMethod(_)
            | Self::Weight(_)
            | Self::UpperThreshold(_)
            | Self::LowerThreshold(_)
            | Self::ActiveConnections(_)
            | Self::InactiveConnections(_)
            | Self::PersistentConnections(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Address(_) => IPVS_DEST_ATTR_ADDR,
            Self::Port(_) => IPVS_DEST_ATTR_PORT,
            Self::ForwardMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            Self::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            Self::UpperThreshold(_) => IPVS_DEST_ATTR_U_THRESH,
            Self::LowerThreshold(_) => IPVS_DEST_ATTR_L_THRESH,
            Self::ActiveConnections(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            Self::InactiveConnections(_) => IPVS_DEST_ATTR_INACT_CONNS,
            Self::PersistentConnections(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            Self::AddressFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            Self::TunnelType(_) => IPVS_DEST_ATTR_TUN_TYPE,
            Self::TunnelPort(_) => IPVS_DEST_ATTR_TUN_PORT,
            Self::TunnelFlags(_) => IPVS_DEST_ATTR_TUN_FLAGS,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Address(a) => buffer[..16].copy_from_slice(a),
            Self::Port(v) | Self::TunnelPort(v) => {
                let _ = emit_u16_be(buffer, *v);
            }
            Self::AddressFamily(v) | Self::TunnelFlags(v) => {
                let _ = emit_u16(buffer, *v);
            }
            Self::TunnelType(v) => buffer[0] = *v,
            Self::ForwardMethod(v)
            | Self::Weight(v)
            | Self::UpperThreshold(v)
            | Self::LowerThreshold(v)
            | Self::ActiveConnections(v)
            | Self::InactiveConnections(v)
            | Self::PersistentConnections(v) => {
                let _ = emit_u32(buffer, *v);
            }
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        let u32_of = |what: &str| parse_u32(payload).context(format!("invalid {what}"));
        Ok(match buf.kind() {
            IPVS_DEST_ATTR_ADDR => {
                Self::Address(parse_addr(payload).context("invalid IPVS_DEST_ATTR_ADDR")?)
            }
            IPVS_DEST_ATTR_PORT => {
                Self::Port(parse_u16_be(payload).context("invalid IPVS_DEST_ATTR_PORT")?)
            }
            IPVS_DEST_ATTR_FWD_METHOD => Self::ForwardMethod(u32_of("IPVS_DEST_ATTR_FWD_METHOD")?),
            IPVS_DEST_ATTR_WEIGHT => Self::Weight(u32_of("IPVS_DEST_ATTR_WEIGHT")?),
            IPVS_DEST_ATTR_U_THRESH => Self::UpperThreshold(u32_of("IPVS_DEST_ATTR_U_THRESH")?),
            IPVS_DEST_ATTR_L_THRESH => Self::LowerThreshold(u32_of("IPVS_DEST_ATTR_L_THRESH")?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => {
                Self::ActiveConnections(u32_of("IPVS_DEST_ATTR_ACTIVE_CONNS")?)
            }
            IPVS_DEST_ATTR_INACT_CONNS => {
                Self::InactiveConnections(u32_of("IPVS_DEST_ATTR_INACT_CONNS")?)
            }
            IPVS_DEST_ATTR_PERSIST_CONNS => {
                Self::PersistentConnections(u32_of("IPVS_DEST_ATTR_PERSIST_CONNS")?)
            }
            IPVS_DEST_ATTR_ADDR_FAMILY => Self::AddressFamily(
                parse_u16(payload).context("invalid IPVS_DEST_ATTR_ADDR_FAMILY")?,
            ),
            IPVS_DEST_ATTR_TUN_TYPE => {
                Self::TunnelType(parse_u8(payload).context("invalid IPVS_DEST_ATTR_TUN_TYPE")?)
            }
            IPVS_DEST_ATTR_TUN_PORT => {
                Self::TunnelPort(parse_u16_be(payload).context("invalid IPVS_DEST_ATTR_TUN_PORT")?)
            }
            IPVS_DEST_ATTR_TUN_FLAGS => {
                Self::TunnelFlags(parse_u16(payload).context("invalid IPVS_DEST_ATTR_TUN_FLAGS")?)
            }
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for InfoAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Version(_) | Self::ConnectionTableSize(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Version(_) => IPVS_INFO_ATTR_VERSION,
            Self::ConnectionTableSize(_) => IPVS_INFO_ATTR_CONN_TAB_SIZE,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Version(v) | Self::ConnectionTableSize(v) => {
                let _ = emit_u32(buffer, *v);
            }
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for InfoAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        Ok(match buf.kind() {
            IPVS_INFO_ATTR_VERSION => {
                Self::Version(parse_u32(payload).context("invalid IPVS_INFO_ATTR_VERSION")?)
            }
            IPVS_INFO_ATTR_CONN_TAB_SIZE => Self::ConnectionTableSize(
                parse_u32(payload).context("invalid IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
            ),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(attrs) => attrs.as_slice().buffer_len(),
            Self::Dest(attrs) => attrs.as_slice().buffer_len(),
            Self::Info(attr) => attr.value_len(),
            Self::TimeoutTcp(_) | Self::TimeoutTcpFin(_) | Self::TimeoutUdp(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        // ipvsadm (libnl) marks its nests NLA_F_NESTED; the kernel's own replies do not.
        match self {
            Self::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            Self::Dest(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            Self::Info(attr) => attr.kind(),
            Self::TimeoutTcp(_) => IPVS_CMD_ATTR_TIMEOUT_TCP,
            Self::TimeoutTcpFin(_) => IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
            Self::TimeoutUdp(_) => IPVS_CMD_ATTR_TIMEOUT_UDP,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Service(attrs) => attrs.as_slice().emit(buffer),
            Self::Dest(attrs) => attrs.as_slice().emit(buffer),
            Self::Info(attr) => attr.emit_value(buffer),
            Self::TimeoutTcp(seconds)
            | Self::TimeoutTcpFin(seconds)
            | Self::TimeoutUdp(seconds) => {
                let _ = emit_u32(buffer, *seconds);
            }
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl CmdAttr {
    /// Parses a top-level attribute of a non-info command.
    pub fn parse_command(buf: &NlaBuffer<&[u8]>) -> Result<Self, DecodeError> {
        let payload = buf.value();
        Ok(match buf.kind() {
            IPVS_CMD_ATTR_SERVICE => {
                Self::Service(parse_nested(payload, "IPVS_CMD_ATTR_SERVICE", |nla| {
                    ServiceAttr::parse(nla)
                })?)
            }
            IPVS_CMD_ATTR_DEST => Self::Dest(parse_nested(payload, "IPVS_CMD_ATTR_DEST", |nla| {
                DestAttr::parse(nla)
            })?),
            IPVS_CMD_ATTR_TIMEOUT_TCP => {
                Self::TimeoutTcp(parse_u32(payload).context("invalid IPVS_CMD_ATTR_TIMEOUT_TCP")?)
            }
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => Self::TimeoutTcpFin(
                parse_u32(payload).context("invalid IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?,
            ),
            IPVS_CMD_ATTR_TIMEOUT_UDP => {
                Self::TimeoutUdp(parse_u32(payload).context("invalid IPVS_CMD_ATTR_TIMEOUT_UDP")?)
            }
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }

    /// Parses a top-level attribute of an info command.
    pub fn parse_info(buf: &NlaBuffer<&[u8]>) -> Result<Self, DecodeError> {
        Ok(Self::Info(InfoAttr::parse(buf)?))
    }
}
