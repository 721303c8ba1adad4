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
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NetlinkAddr};

use crate::model::{IpFamily, Protocol};

use super::netlink::client::set_receive_timeout;

/// `CTA_ZONE`: an entry outside the default zone is only found again with its zone.
const CTA_ZONE: u16 = 18;

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
        for entry in socket.dump(family)? {
            if wanted.iter().any(|flow| flow.matches(&entry)) && socket.delete(family, &entry)? {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Every conntrack entry of `family`.
pub fn dump(family: IpFamily) -> Result<Vec<ConntrackEntry>, ConntrackError> {
    CtSocket::open()?.dump(family)
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
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Socket)?;
        socket.bind_auto().map_err(ConntrackError::Socket)?;
        socket
            .connect(&NetlinkAddr::new(0, 0))
            .map_err(ConntrackError::Socket)?;
        set_receive_timeout(&socket, RECEIVE_TIMEOUT).map_err(ConntrackError::Socket)?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    fn send(
        &mut self,
        family: IpFamily,
        message: ConntrackMessage,
        flags: u16,
        request: &str,
    ) -> Result<u32, ConntrackError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let inner = NetfilterMessage::new(NetfilterHeader::new(nfproto(family), 0, 0), message);
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
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

    fn dump(&mut self, family: IpFamily) -> Result<Vec<ConntrackEntry>, ConntrackError> {
        let request = format!("dump the {family} conntrack table");
        let sequence = self.send(
            family,
            ConntrackMessage::Get(Vec::new()),
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
