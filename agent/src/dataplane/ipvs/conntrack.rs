//! Conntrack clean-up over ctnetlink: when a UDP (or SCTP) real server goes, its entries go
//! too, so datagrams stop following a dead backend.
//!
//! With `net.ipv4.vs.conntrack=1`, IPVS writes its translation into conntrack: a flow to a VIP
//! has the VIP as its original destination and the chosen real server as its reply source.
//! Connectionless protocols keep such an entry alive for as long as the client keeps sending,
//! so a removed backend would keep receiving them (kubernetes/kubernetes#19029).
//!
//! Done as kube-proxy does it (vishvananda/netlink `ConntrackDeleteFilters`): dump the table of
//! one family (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`), filter in userspace, and delete each
//! match by its original tuple (`IPCTNL_MSG_CT_DELETE`). The messages are
//! `netlink-packet-netfilter`'s; the socket is a blocking `NETLINK_NETFILTER` one.
//!
//! Unlike kube-proxy, the dump asks the kernel to filter too (`CTA_FILTER`, Linux 5.8): one
//! dump per removed backend returns only the entries whose reply comes from it (from its port,
//! for IPv6), so a table of TCP connections is walked in the kernel rather than copied out.
//! The userspace match stays: a kernel without `CTA_FILTER` ignores the attribute and sends
//! the whole table.
//!
//! Every call works in the network namespace of the calling thread.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, DefaultNla, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::model::{IpFamily, Protocol};

use super::netlink::client::kernel_socket;

/// `CTA_ZONE`: an entry outside the default zone is only found again with its zone.
const CTA_ZONE: u16 = 18;

/// `CTA_FILTER` (nested): which fields of the request's tuples a dump must match.
const CTA_FILTER: u16 = 25;
/// `CTA_FILTER_REPLY_FLAGS` inside [`CTA_FILTER`]: the fields of `CTA_TUPLE_REPLY` to match.
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
/// `CTA_FILTER_F_CTA_PROTO_NUM | CTA_FILTER_F_CTA_PROTO_SRC_PORT`: the reply's protocol and
/// source port.
const REPLY_PORT_FLAGS: u32 = (1 << 3) | (1 << 4);
/// `CTA_FILTER_F_CTA_IP_SRC`: the reply's source address too. IPv4 only: the kernel's IPv6
/// comparison is inverted (`!ipv6_addr_cmp`, seen on 6.18: a dump for one address returns
/// every other one), so an IPv6 dump filters on protocol and port and userspace does the rest.
const REPLY_ADDRESS_FLAG: u32 = 1 << 0;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 1 << 15;

/// More removed backends than this in one flush get one unfiltered dump instead of one
/// filtered dump each: each filtered dump walks the whole table in the kernel.
const FILTERED_DUMPS_MAX: usize = 16;

/// How long one receive may block: the kernel answers at once, so this only bounds a wedge.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening a NETLINK_NETFILTER socket failed")]
    Socket(#[source] io::Error),
    #[error("{vip} and {backend} are of different IP families")]
    MixedFamilies { vip: IpAddr, backend: IpAddr },
    #[error("sending the request to {request} failed")]
    Send {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("receiving the kernel's answer to {request} failed")]
    Receive {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused to {request}")]
    Kernel {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("decoding the kernel's answer to {request} failed")]
    Decode {
        request: String,
        #[source]
        source: DecodeError,
    },
}

/// One direction of a conntrack entry. Ports are 0 for protocols without them (ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A conntrack entry as dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// IPPROTO number (6 TCP, 17 UDP, 132 SCTP, …).
    pub protocol: u8,
    /// The direction the first packet went: client → VIP.
    pub original: FlowTuple,
    /// The direction replies go: backend → client, when the VIP was translated.
    pub reply: FlowTuple,
    /// Exactly what the kernel sent as CTA_TUPLE_ORIG (zone included), to delete it by.
    original_raw: Vec<Tuple>,
    zone: Option<DefaultNla>,
}

/// Traffic translated to one backend: entries of `protocol` whose reply source is `backend`
/// and, when `vip` is set, whose original destination is `vip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendFlow {
    pub protocol: Protocol,
    pub vip: Option<SocketAddr>,
    pub backend: SocketAddr,
}

impl BackendFlow {
    /// Whether `entry` belongs to this flow.
    pub fn matches(&self, entry: &ConntrackEntry) -> bool {
        entry.protocol == ipproto(self.protocol)
            && entry.reply.source == self.backend
            && self.vip.is_none_or(|vip| entry.original.destination == vip)
    }

    fn family(&self) -> IpFamily {
        IpFamily::of(&self.backend.ip())
    }
}

/// Deletes every entry of `protocol` whose original destination is `vip:vip_port` and whose
/// reply source is `backend:backend_port`; returns how many went.
pub fn flush_backend(
    protocol: Protocol,
    vip: IpAddr,
    vip_port: u16,
    backend: IpAddr,
    backend_port: u16,
) -> Result<usize, ConntrackError> {
    if vip.is_ipv4() != backend.is_ipv4() {
        return Err(ConntrackError::MixedFamilies { vip, backend });
    }
    flush(&[BackendFlow {
        protocol,
        vip: Some(SocketAddr::new(vip, vip_port)),
        backend: SocketAddr::new(backend, backend_port),
    }])
}

/// Deletes every entry of `protocol` whose reply source is `backend:backend_port`, whatever
/// address the client used (ClusterIP, NodePort, external IP); returns how many went.
pub fn flush_destination_all(
    protocol: Protocol,
    backend: IpAddr,
    backend_port: u16,
) -> Result<usize, ConntrackError> {
    flush(&[BackendFlow {
        protocol,
        vip: None,
        backend: SocketAddr::new(backend, backend_port),
    }])
}

/// Deletes every entry matching any of `flows`, with one dump per IP family present; returns
/// how many went. Entries that expire between the dump and their deletion are not counted.
pub fn flush(flows: &[BackendFlow]) -> Result<usize, ConntrackError> {
    let mut deleted = 0;
    for family in [IpFamily::V4, IpFamily::V6] {
        let wanted: Vec<&BackendFlow> = flows
            .iter()
            .filter(|flow| flow.family() == family)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let mut socket = CtSocket::open()?;
        for filter in dump_filters(&wanted) {
            for entry in socket.dump(family, filter)? {
                if wanted.iter().any(|flow| flow.matches(&entry))
                    && socket.delete(family, &entry)?
                {
                    deleted += 1;
                }
            }
        }
    }
    Ok(deleted)
}

/// The reply source (protocol and backend) a dump asks the kernel to filter on; `None` asks
/// for the whole table.
type ReplySource = Option<(u8, SocketAddr)>;

/// The dumps that find every entry of `wanted` (flows of one family): one per distinct
/// backend, or one of the whole table when there are more than [`FILTERED_DUMPS_MAX`].
fn dump_filters(wanted: &[&BackendFlow]) -> Vec<ReplySource> {
    let mut sources: Vec<(u8, SocketAddr)> = wanted
        .iter()
        .map(|flow| (ipproto(flow.protocol), flow.backend))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    if sources.len() > FILTERED_DUMPS_MAX {
        return vec![None];
    }
    sources.into_iter().map(Some).collect()
}

/// The attributes of a dump request that only entries whose reply comes from
/// `protocol`/`backend` match: the reply tuple to compare with, and the `CTA_FILTER` that says
/// which of its fields count, as raw bytes to append.
///
/// `CTA_FILTER` is written by hand: `netlink-packet-netfilter` 0.4 emits an `Other` attribute
/// without `NLA_F_NESTED`, and the kernel parses `CTA_FILTER` strictly (EINVAL without it).
fn reply_source_filter(protocol: u8, backend: SocketAddr) -> (Vec<ConntrackAttribute>, Vec<u8>) {
    let mut reply = vec![Tuple::Proto(vec![
        ProtoTuple::Protocol(protocol.into()),
        ProtoTuple::SourcePort(backend.port()),
    ])];
    let mut flags = REPLY_PORT_FLAGS;
    if backend.is_ipv4() {
        reply.insert(0, Tuple::Ip(vec![IPTuple::SourceAddress(backend.ip())]));
        flags |= REPLY_ADDRESS_FLAG;
    }
    let tuple = vec![ConntrackAttribute::CtaTupleReply(reply)];
    let mut filter = Vec::with_capacity(16);
    // CTA_FILTER { CTA_FILTER_REPLY_FLAGS: u32 }: 4 + 8 bytes, both aligned.
    filter.extend_from_slice(&12u16.to_ne_bytes());
    filter.extend_from_slice(&(CTA_FILTER | NLA_F_NESTED).to_ne_bytes());
    filter.extend_from_slice(&8u16.to_ne_bytes());
    filter.extend_from_slice(&CTA_FILTER_REPLY_FLAGS.to_ne_bytes());
    filter.extend_from_slice(&flags.to_ne_bytes());
    (tuple, filter)
}

/// Every conntrack entry of `family`.
pub fn dump(family: IpFamily) -> Result<Vec<ConntrackEntry>, ConntrackError> {
    CtSocket::open()?.dump(family, None)
}

/// The conntrack entries of `family` as the kernel filters them for replies from `backend`
/// over `protocol`: exactly those for IPv4, those from its port for IPv6 (see
/// [`REPLY_ADDRESS_FLAG`]), the whole table from a kernel without `CTA_FILTER`.
pub fn dump_replies_from(
    family: IpFamily,
    protocol: Protocol,
    backend: SocketAddr,
) -> Result<Vec<ConntrackEntry>, ConntrackError> {
    CtSocket::open()?.dump(family, Some((ipproto(protocol), backend)))
}

fn ipproto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Sctp => libc::IPPROTO_SCTP as u8,
    }
}

fn nfproto(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// A blocking ctnetlink socket and its request sequence.
struct CtSocket {
    socket: Socket,
    sequence: u32,
}

impl CtSocket {
    fn open() -> Result<Self, ConntrackError> {
        let socket =
            kernel_socket(NETLINK_NETFILTER, RECEIVE_TIMEOUT).map_err(ConntrackError::Socket)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` with `trailing` (whole, aligned attributes) after its own attributes.
    fn send(
        &mut self,
        family: IpFamily,
        message: ConntrackMessage,
        trailing: &[u8],
        flags: u16,
        request: &str,
    ) -> Result<u32, ConntrackError> {
        self.sequence = self.sequence.wrapping_add(1);
        let buffer = request_bytes(family, message, trailing, flags, self.sequence);
        self.socket
            .send(&buffer, 0)
            .map_err(|source| ConntrackError::Send {
                request: request.to_owned(),
                source,
            })?;
        Ok(self.sequence)
    }

    /// Reads the answers to request `sequence`, handing each message to `each`, until the
    /// request is finished (NLMSG_DONE, or an ACK/error for a non-dump request).
    fn receive(
        &mut self,
        sequence: u32,
        request: &str,
        mut each: impl FnMut(NetlinkMessage<NetfilterMessage>),
    ) -> Result<(), ConntrackError> {
        loop {
            let (datagram, _) =
                self.socket
                    .recv_from_full()
                    .map_err(|source| ConntrackError::Receive {
                        request: request.to_owned(),
                        source,
                    })?;
            let replies = decode_datagram(&datagram, sequence, request)?;
            replies.messages.into_iter().for_each(&mut each);
            if replies.finished {
                return Ok(());
            }
        }
    }

    fn dump(
        &mut self,
        family: IpFamily,
        filter: ReplySource,
    ) -> Result<Vec<ConntrackEntry>, ConntrackError> {
        let (request, (attributes, trailing)) = match filter {
            None => (
                format!("dump the {family} conntrack table"),
                (Vec::new(), Vec::new()),
            ),
            Some((protocol, backend)) => (
                format!("dump the {family} conntrack entries of replies from {backend}"),
                reply_source_filter(protocol, backend),
            ),
        };
        let sequence = self.send(
            family,
            ConntrackMessage::Get(attributes),
            &trailing,
            NLM_F_REQUEST | NLM_F_DUMP,
            &request,
        )?;
        let mut entries = Vec::new();
        self.receive(sequence, &request, |message| {
            entries.extend(dumped_entry(&message));
        })?;
        Ok(entries)
    }

    /// Deletes `entry`; `false` when it was already gone.
    fn delete(&mut self, family: IpFamily, entry: &ConntrackEntry) -> Result<bool, ConntrackError> {
        let request = format!(
            "delete conntrack entry {} {} -> {}",
            entry.protocol, entry.original.source, entry.original.destination
        );
        let sequence = self.send(
            family,
            ConntrackMessage::Delete(delete_attributes(entry)),
            &[],
            NLM_F_REQUEST | NLM_F_ACK,
            &request,
        )?;
        match self.receive(sequence, &request, |_| {}) {
            Ok(()) => Ok(true),
            Err(ConntrackError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }
}

/// Netlink's first message type that is not a control message (`NLMSG_MIN_TYPE`).
const NLMSG_MIN_TYPE: u16 = 0x10;
/// `NFNL_SUBSYS_CTNETLINK`: the high byte of every ctnetlink message type.
const NFNL_SUBSYS_CTNETLINK: u16 = 1;

/// What one datagram from ctnetlink says about one request.
#[derive(Debug, Default)]
pub struct DatagramReplies {
    /// The request's data messages, in order.
    pub messages: Vec<NetlinkMessage<NetfilterMessage>>,
    /// The request is answered: NLMSG_DONE, or a success acknowledgement.
    pub finished: bool,
}

/// Splits one datagram into its netlink messages and keeps those answering `sequence`. Pure,
/// so every byte sequence the kernel (or anything else) could send is tested without a
/// socket. A message the codec cannot read is skipped with a warning: one bad entry must not
/// stop the clean-up of the rest. A kernel error for the request is returned as one.
pub fn decode_datagram(
    datagram: &[u8],
    sequence: u32,
    request: &str,
) -> Result<DatagramReplies, ConntrackError> {
    let mut replies = DatagramReplies::default();
    let mut offset = 0;
    while offset < datagram.len() {
        let length = NetlinkBuffer::new_checked(&datagram[offset..])
            .map(|buffer| buffer.length() as usize)
            .map_err(|source| ConntrackError::Decode {
                request: request.to_owned(),
                source,
            })?;
        let end = offset.saturating_add(length).min(datagram.len());
        let bytes = &datagram[offset..end];
        offset = offset.saturating_add(length.max(1).next_multiple_of(4));

        // Only ctnetlink's own messages (and netlink's control messages) are decoded: the
        // codec's parsers of other nfnetlink subsystems (nftables) panic on short attributes
        // (found by the conntrack_netlink fuzz target), and the kernel sends none here.
        let message_type = bytes
            .get(4..6)
            .map_or(0, |kind| u16::from_ne_bytes([kind[0], kind[1]]));
        if message_type >= NLMSG_MIN_TYPE && message_type >> 8 != NFNL_SUBSYS_CTNETLINK {
            tracing::debug!(
                message_type,
                request,
                "skipping a message of another nfnetlink subsystem"
            );
            continue;
        }
        let message = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, request, "skipping an undecodable ctnetlink message");
                continue;
            }
        };
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::Done(_) => {
                replies.finished = true;
                return Ok(replies);
            }
            NetlinkPayload::Error(ref error) => {
                return match error.code {
                    None => {
                        replies.finished = true;
                        Ok(replies)
                    }
                    // Not `to_io()`: it negates the code, which overflows on i32::MIN (found
                    // by the conntrack_netlink fuzz target).
                    Some(_) => Err(ConntrackError::Kernel {
                        request: request.to_owned(),
                        source: io::Error::from_raw_os_error(error.raw_code().saturating_neg()),
                    }),
                };
            }
            NetlinkPayload::Overrun(_) => {
                return Err(ConntrackError::Receive {
                    request: request.to_owned(),
                    source: io::Error::from_raw_os_error(libc::ENOBUFS),
                })
            }
            _ => replies.messages.push(message),
        }
    }
    Ok(replies)
}

/// The conntrack entry of one dump message; `None` for other messages and for entries
/// without both tuples' addresses.
pub fn dumped_entry(message: &NetlinkMessage<NetfilterMessage>) -> Option<ConntrackEntry> {
    match &message.payload {
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
            ..
        }) => entry_from(attributes),
        _ => None,
    }
}

/// An entry from a dumped message; `None` when it lacks either tuple's addresses.
fn entry_from(attributes: &[ConntrackAttribute]) -> Option<ConntrackEntry> {
    let mut original_raw = None;
    let mut reply_raw = None;
    let mut zone = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(tuples) => original_raw = Some(tuples),
            ConntrackAttribute::CtaTupleReply(tuples) => reply_raw = Some(tuples),
            ConntrackAttribute::Other(nla) if nla.kind() == CTA_ZONE => zone = Some(nla.clone()),
            _ => {}
        }
    }
    let original_raw = original_raw?;
    let (protocol, original) = flow_of(original_raw)?;
    let (_, reply) = flow_of(reply_raw?)?;
    Some(ConntrackEntry {
        protocol,
        original,
        reply,
        original_raw: original_raw.clone(),
        zone,
    })
}

/// The protocol and addresses of one CTA_TUPLE_*.
fn flow_of(tuples: &[Tuple]) -> Option<(u8, FlowTuple)> {
    let (mut source, mut destination) = (None, None);
    let (mut protocol, mut source_port, mut destination_port) = (None, 0, 0);
    for tuple in tuples {
        match tuple {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(address) => source = Some(*address),
                        IPTuple::DestinationAddress(address) => destination = Some(*address),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(number) => protocol = Some(u8::from(*number)),
                        ProtoTuple::SourcePort(port) => source_port = *port,
                        ProtoTuple::DestinationPort(port) => destination_port = *port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        protocol?,
        FlowTuple {
            source: SocketAddr::new(source?, source_port),
            destination: SocketAddr::new(destination?, destination_port),
        },
    ))
}

/// One request as sent: the netlink message of `message`, then `trailing`, with the length in
/// the header covering both.
fn request_bytes(
    family: IpFamily,
    message: ConntrackMessage,
    trailing: &[u8],
    flags: u16,
    sequence: u32,
) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let inner = NetfilterMessage::new(NetfilterHeader::new(nfproto(family), 0, 0), message);
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    buffer.extend_from_slice(trailing);
    // nlmsg_len: the first four bytes, in host order. A request is far below 4 GiB.
    let length = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
    buffer[..4].copy_from_slice(&length.to_ne_bytes());
    buffer
}

fn delete_attributes(entry: &ConntrackEntry) -> Vec<ConntrackAttribute> {
    let mut attributes = vec![ConntrackAttribute::CtaTupleOrig(entry.original_raw.clone())];
    if let Some(zone) = &entry.zone {
        attributes.push(ConntrackAttribute::Other(zone.clone()));
    }
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use netlink_packet_netfilter::conntrack::Protocol as L4;

    fn tuple(protocol: L4, source: &str, destination: &str) -> Vec<Tuple> {
        let source: SocketAddr = source.parse().expect("addr");
        let destination: SocketAddr = destination.parse().expect("addr");
        vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(source.ip()),
                IPTuple::DestinationAddress(destination.ip()),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(protocol),
                ProtoTuple::SourcePort(source.port()),
                ProtoTuple::DestinationPort(destination.port()),
            ]),
        ]
    }

    /// client → VIP translated to backend, as IPVS (or DNAT) leaves it in conntrack.
    fn translated(protocol: L4, client: &str, vip: &str, backend: &str) -> ConntrackEntry {
        entry_from(&[
            ConntrackAttribute::CtaTupleOrig(tuple(protocol, client, vip)),
            ConntrackAttribute::CtaTupleReply(tuple(protocol, backend, client)),
            ConntrackAttribute::CtaTimeout(30),
        ])
        .expect("entry")
    }

    fn flow(protocol: Protocol, vip: Option<&str>, backend: &str) -> BackendFlow {
        BackendFlow {
            protocol,
            vip: vip.map(|vip| vip.parse().expect("vip")),
            backend: backend.parse().expect("backend"),
        }
    }

    #[test]
    fn entries_read_both_tuples() {
        let entry = translated(
            L4::Udp,
            "10.0.0.5:40000",
            "10.96.0.10:53",
            "10.244.1.2:5353",
        );
        assert_eq!(entry.protocol, 17);
        assert_eq!(
            entry.original.source,
            "10.0.0.5:40000".parse().expect("addr")
        );
        assert_eq!(
            entry.original.destination,
            "10.96.0.10:53".parse().expect("addr")
        );
        assert_eq!(entry.reply.source, "10.244.1.2:5353".parse().expect("addr"));
        assert_eq!(
            entry.reply.destination,
            "10.0.0.5:40000".parse().expect("addr")
        );
        assert!(entry.zone.is_none());
    }

    #[test]
    fn entries_without_a_reply_tuple_are_skipped() {
        let attributes = [ConntrackAttribute::CtaTupleOrig(tuple(
            L4::Udp,
            "10.0.0.5:1",
            "10.96.0.10:53",
        ))];
        assert!(entry_from(&attributes).is_none());
    }

    #[test]
    fn backend_flow_matches_vip_backend_and_protocol() {
        let entry = translated(
            L4::Udp,
            "10.0.0.5:40000",
            "10.96.0.10:53",
            "10.244.1.2:5353",
        );
        let exact = flow(Protocol::Udp, Some("10.96.0.10:53"), "10.244.1.2:5353");
        assert!(exact.matches(&entry));
        assert!(flow(Protocol::Udp, None, "10.244.1.2:5353").matches(&entry));

        for other in [
            flow(Protocol::Tcp, Some("10.96.0.10:53"), "10.244.1.2:5353"),
            flow(Protocol::Sctp, Some("10.96.0.10:53"), "10.244.1.2:5353"),
            flow(Protocol::Udp, Some("10.96.0.11:53"), "10.244.1.2:5353"),
            flow(Protocol::Udp, Some("10.96.0.10:54"), "10.244.1.2:5353"),
            flow(Protocol::Udp, Some("10.96.0.10:53"), "10.244.1.3:5353"),
            flow(Protocol::Udp, Some("10.96.0.10:53"), "10.244.1.2:5354"),
            flow(Protocol::Udp, None, "10.244.1.3:5353"),
        ] {
            assert!(!other.matches(&entry), "{other:?} matched");
        }
    }

    #[test]
    fn untranslated_traffic_to_the_backend_is_not_the_vips() {
        // A client talking to the backend directly: reply source is the backend too, but the
        // original destination is not the VIP.
        let direct = translated(
            L4::Udp,
            "10.0.0.5:40000",
            "10.244.1.2:5353",
            "10.244.1.2:5353",
        );
        assert!(!flow(Protocol::Udp, Some("10.96.0.10:53"), "10.244.1.2:5353").matches(&direct));
        assert!(flow(Protocol::Udp, None, "10.244.1.2:5353").matches(&direct));
    }

    #[test]
    fn ipv6_and_sctp() {
        let entry = translated(
            L4::Sctp,
            "[fd00::5]:40000",
            "[fd00:96::10]:3868",
            "[fd00:244::2]:3868",
        );
        assert_eq!(entry.protocol, 132);
        assert!(flow(
            Protocol::Sctp,
            Some("[fd00:96::10]:3868"),
            "[fd00:244::2]:3868"
        )
        .matches(&entry));
        assert_eq!(
            flow(Protocol::Sctp, None, "[fd00:244::2]:3868").family(),
            IpFamily::V6
        );
    }

    #[test]
    fn mixed_families_are_refused_before_any_socket() {
        let error = flush_backend(
            Protocol::Udp,
            "10.96.0.10".parse().expect("ip"),
            53,
            "fd00::2".parse().expect("ip"),
            53,
        )
        .expect_err("mixed");
        assert!(
            matches!(error, ConntrackError::MixedFamilies { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn delete_carries_the_original_tuple_and_zone_as_dumped() {
        let zone = DefaultNla::new(CTA_ZONE, vec![0, 7]);
        let original = tuple(L4::Udp, "10.0.0.5:40000", "10.96.0.10:53");
        let entry = entry_from(&[
            ConntrackAttribute::CtaTupleOrig(original.clone()),
            ConntrackAttribute::CtaTupleReply(tuple(L4::Udp, "10.244.1.2:5353", "10.0.0.5:40000")),
            ConntrackAttribute::Other(zone.clone()),
        ])
        .expect("entry");
        assert_eq!(entry.zone, Some(zone.clone()));
        assert_eq!(
            delete_attributes(&entry),
            vec![
                ConntrackAttribute::CtaTupleOrig(original),
                ConntrackAttribute::Other(zone)
            ]
        );
    }

    fn seed(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/conntrack_netlink")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// The fuzz seeds (fuzz/seeds/make-seeds.py) are dump replies as the kernel sends them:
    /// two entries, then NLMSG_DONE; or a refusal.
    #[test]
    fn a_dump_datagram_decodes_to_its_entries_and_its_end() {
        let replies = decode_datagram(&seed("dump-two"), 1, "test").expect("decodes");
        assert!(replies.finished);
        let entries: Vec<_> = replies.messages.iter().filter_map(dumped_entry).collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(
            entries[0].original.destination,
            "10.96.0.10:53".parse().expect("addr")
        );
        assert_eq!(entries[1].protocol, 132);
        assert!(entries[1].zone.is_some());

        let other_request = decode_datagram(&seed("dump-two"), 2, "test").expect("decodes");
        assert!(other_request.messages.is_empty() && !other_request.finished);

        let error = decode_datagram(&seed("error-enoent"), 1, "test").expect_err("refusal");
        assert!(
            matches!(&error, ConntrackError::Kernel { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
            "{error:?}"
        );
    }

    /// Regression (fuzz target conntrack_netlink, crash-39d18d56…): an nftables message with
    /// a 0-length attribute made the codec's nftables set parser overflow and panic.
    #[test]
    fn messages_of_other_nfnetlink_subsystems_are_skipped() {
        let datagram = seed("regression-nftables-short-attribute");
        // The nftables message is skipped; the 6 bytes after it are no message: an error.
        let error = decode_datagram(&datagram, 0, "test").expect_err("trailing bytes");
        assert!(matches!(error, ConntrackError::Decode { .. }), "{error:?}");
        let nftables_only = &datagram[..0x24];
        let replies = decode_datagram(nftables_only, 0, "test").expect("skipped");
        assert!(replies.messages.is_empty() && !replies.finished);
        crate::fuzzing::conntrack_datagram(&datagram);
    }

    /// Regression (fuzz target conntrack_netlink, found by CI): an NLMSG_ERROR whose code is
    /// i32::MIN overflowed the negation in `ErrorMessage::to_io`.
    #[test]
    fn an_error_code_of_i32_min_is_a_kernel_error_not_a_panic() {
        let mut datagram = Vec::new();
        datagram.extend_from_slice(&36u32.to_ne_bytes()); // nlmsg_len
        datagram.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        datagram.extend_from_slice(&[0; 10]); // flags, seq, pid
        datagram.extend_from_slice(&i32::MIN.to_ne_bytes()); // error code
        datagram.extend_from_slice(&[0; 16]); // the request's header
        let error = decode_datagram(&datagram, 0, "test").expect_err("a kernel error");
        assert!(matches!(error, ConntrackError::Kernel { .. }), "{error:?}");
        crate::fuzzing::conntrack_datagram(&datagram);
    }

    /// The request bytes, checked against the layout `conntrack -D -p udp …` sends (nfgenmsg
    /// AF_INET, then CTA_TUPLE_ORIG{CTA_TUPLE_IP{src, dst}, CTA_TUPLE_PROTO{num, sport, dport}}).
    #[test]
    fn a_dump_filtered_on_an_ipv4_reply_source_carries_a_nested_cta_filter() {
        let backend: SocketAddr = "10.244.1.2:5353".parse().expect("addr");
        let (attributes, trailing) = reply_source_filter(17, backend);
        let bytes = request_bytes(
            IpFamily::V4,
            ConntrackMessage::Get(attributes),
            &trailing,
            NLM_F_REQUEST | NLM_F_DUMP,
            7,
        );
        #[rustfmt::skip]
        let expected_body: Vec<u8> = vec![
            0x02, 0x00, 0x00, 0x00,                         // nfgenmsg: AF_INET, v0, res 0
            0x24, 0x00, 0x02, 0x80,                         // CTA_TUPLE_REPLY (nested), 36
            0x0c, 0x00, 0x01, 0x80,                         //  CTA_TUPLE_IP (nested), 12
            0x08, 0x00, 0x01, 0x00, 10, 244, 1, 2,          //   CTA_IP_V4_SRC
            0x14, 0x00, 0x02, 0x80,                         //  CTA_TUPLE_PROTO (nested), 20
            0x05, 0x00, 0x01, 0x00, 17, 0, 0, 0,            //   CTA_PROTO_NUM udp (+pad)
            0x06, 0x00, 0x02, 0x00, 0x14, 0xe9, 0, 0,       //   CTA_PROTO_SRC_PORT 5353
            0x0c, 0x00, 0x19, 0x80,                         // CTA_FILTER (nested), 12
            0x08, 0x00, 0x02, 0x00, 0x19, 0, 0, 0,          //  CTA_FILTER_REPLY_FLAGS: ip src, proto, sport
        ];
        assert_eq!(&bytes[16..], expected_body.as_slice());
        let length = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"));
        assert_eq!(
            length as usize,
            bytes.len(),
            "nlmsg_len covers the appended filter"
        );
    }

    #[test]
    fn an_ipv6_dump_filters_on_protocol_and_port_only() {
        let backend: SocketAddr = "[fd00::2]:53".parse().expect("addr");
        let (attributes, trailing) = reply_source_filter(17, backend);
        let [ConntrackAttribute::CtaTupleReply(reply)] = attributes.as_slice() else {
            panic!("one reply tuple: {attributes:?}");
        };
        assert!(
            reply.iter().all(|tuple| !matches!(tuple, Tuple::Ip(_))),
            "{reply:?}"
        );
        assert_eq!(
            &trailing[8..],
            &0x18u32.to_ne_bytes(),
            "proto and sport flags only"
        );
    }

    #[test]
    fn few_backends_get_a_filtered_dump_each_and_many_share_one_whole_dump() {
        let flows: Vec<BackendFlow> = (0..=FILTERED_DUMPS_MAX as u16)
            .map(|n| flow(Protocol::Udp, None, &format!("10.244.0.{}:53", n + 1)))
            .collect();
        let few: Vec<&BackendFlow> = flows.iter().take(3).chain(flows.iter().take(1)).collect();
        assert_eq!(dump_filters(&few).len(), 3, "one per distinct backend");
        assert!(dump_filters(&few).iter().all(Option::is_some));
        let many: Vec<&BackendFlow> = flows.iter().collect();
        assert_eq!(dump_filters(&many), vec![None]);
    }

    #[test]
    fn delete_request_bytes() {
        let entry = translated(
            L4::Udp,
            "10.0.0.5:40000",
            "10.96.0.10:53",
            "10.244.1.2:5353",
        );
        let message = NetfilterMessage::new(
            NetfilterHeader::new(nfproto(IpFamily::V4), 0, 0),
            ConntrackMessage::Delete(delete_attributes(&entry)),
        );
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x02, 0x00, 0x00, 0x00,                         // nfgenmsg: AF_INET, v0, res 0
            0x34, 0x00, 0x01, 0x80,                         // CTA_TUPLE_ORIG (nested), 52
            0x14, 0x00, 0x01, 0x80,                         //  CTA_TUPLE_IP (nested), 20
            0x08, 0x00, 0x01, 0x00, 10, 0, 0, 5,            //   CTA_IP_V4_SRC
            0x08, 0x00, 0x02, 0x00, 10, 96, 0, 10,          //   CTA_IP_V4_DST
            0x1c, 0x00, 0x02, 0x80,                         //  CTA_TUPLE_PROTO (nested), 28
            0x05, 0x00, 0x01, 0x00, 17, 0, 0, 0,            //   CTA_PROTO_NUM udp (+pad)
            0x06, 0x00, 0x02, 0x00, 0x9c, 0x40, 0, 0,       //   CTA_PROTO_SRC_PORT 40000
            0x06, 0x00, 0x03, 0x00, 0x00, 0x35, 0, 0,       //   CTA_PROTO_DST_PORT 53
        ];
        assert_eq!(bytes, expected);
        // And it parses back to the same message (type: CTNETLINK << 8 | DELETE).
        let parsed = NetfilterMessage::parse_with_param(&bytes, (1 << 8) | 2).expect("parse");
        assert_eq!(parsed, message);
    }
}
