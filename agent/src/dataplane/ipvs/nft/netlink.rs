//! The one nftables question the periodic re-read asks over netlink instead of through
//! `nft`: does our table still exist.
//!
//! `nft list tables` fills nft's whole cache first, every set's elements included: 1.6 s
//! on the host for one 110,000-element set, 20–29 s under emulation at 10,000 Services
//! (`docs/testing.md`, "IPVS at scale"). `NFT_MSG_GETTABLE` for one name is one message
//! each way. Like the IPVS client, this works in the calling thread's network namespace.

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_ERROR, NLM_F_ACK,
    NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{NfTablesMessage, TableAttribute, TableMessage};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::protocols::NETLINK_NETFILTER;

use super::NftError;
use crate::dataplane::ipvs::netlink::client::kernel_socket;

/// How long the kernel may take to answer; it answers at once unless something is wrong.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nf_tables message type.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// The kernel's answer naming the table: `NFT_MSG_NEWTABLE` (0) of nf_tables.
const NEW_TABLE: u16 = NFNL_SUBSYS_NFTABLES << 8;

/// What the answers read so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The request is not answered yet: read another datagram.
    Pending,
    /// The kernel acknowledged the request; whether it named the table before.
    Exists(bool),
}

/// Whether table `inet <name>` exists in the calling thread's network namespace.
pub fn table_exists(name: &str) -> Result<bool, NftError> {
    let failed = |source| NftError::Netlink {
        action: "ask whether the table exists",
        source,
    };
    let socket = kernel_socket(NETLINK_NETFILTER, RECEIVE_TIMEOUT).map_err(failed)?;
    const SEQUENCE: u32 = 1;
    socket
        .send(&get_table_request(name, SEQUENCE), 0)
        .map_err(failed)?;
    let mut named = false;
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(failed)?;
        match read_answer(&datagram, SEQUENCE, &mut named).map_err(failed)? {
            Answer::Pending => continue,
            Answer::Exists(exists) => return Ok(exists),
        }
    }
}

/// `NFT_MSG_GETTABLE` for `inet <name>`, asking for an acknowledgement.
pub fn get_table_request(name: &str, sequence: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = sequence;
    let request = NfTablesMessage::GetTable(TableMessage {
        attributes: vec![TableAttribute::Name(name.to_owned())],
    });
    let inner = NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0),
        request,
    );
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(inner));
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    buffer
}

/// Reads one datagram of answers to request `sequence`. `named` remembers, across
/// datagrams, that the kernel sent the table. Only headers and error codes are decoded: the
/// codec's nftables parsers panic on short attributes, and the table's contents are not
/// needed. ENOENT is the kernel's "no such table".
pub fn read_answer(datagram: &[u8], sequence: u32, named: &mut bool) -> io::Result<Answer> {
    let mut offset = 0;
    while offset < datagram.len() {
        let message = NetlinkBuffer::new_checked(&datagram[offset..])
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
        let length = message.length() as usize;
        let (kind, answered) = (message.message_type(), message.sequence_number());
        let payload = message.payload();
        offset = offset.saturating_add(length.max(1).next_multiple_of(4));
        if answered != sequence {
            continue;
        }
        if kind == NEW_TABLE {
            *named = true;
        } else if kind == NLMSG_ERROR {
            let code = payload
                .get(..4)
                .map(|code| i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink error"))?;
            return match code.saturating_neg() {
                0 => Ok(Answer::Exists(*named)),
                libc::ENOENT => Ok(Answer::Exists(false)),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
    Ok(Answer::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink message: header, then `payload`, padded to four bytes.
    fn message(kind: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
        let length = 16 + payload.len();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(length as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(length.next_multiple_of(4), 0);
        bytes
    }

    fn error(sequence: u32, code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        // The request's header, as the kernel echoes it.
        payload.extend_from_slice(&[0; 16]);
        message(NLMSG_ERROR, sequence, &payload)
    }

    #[test]
    fn the_request_is_a_gettable_for_the_inet_family_with_the_name() {
        let bytes = get_table_request("topoproxy", 7);
        let header = NetlinkBuffer::new_checked(&bytes[..]).expect("header");
        assert_eq!(header.message_type(), (10 << 8) | 1, "NFT_MSG_GETTABLE");
        assert_eq!(header.flags(), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(header.sequence_number(), 7);
        let payload = header.payload();
        assert_eq!(payload[0], 1, "NFPROTO_INET");
        // NFTA_TABLE_NAME: length 4 + "topoproxy\0", kind 1.
        assert_eq!(&payload[4..8], &[14, 0, 1, 0]);
        assert_eq!(&payload[8..18], b"topoproxy\0");
    }

    #[test]
    fn a_table_then_an_ack_is_an_existing_table() {
        let mut datagram = message(NEW_TABLE, 3, &[1, 0, 0, 0]);
        datagram.extend(error(3, 0));
        let mut named = false;
        assert_eq!(
            read_answer(&datagram, 3, &mut named).expect("answer"),
            Answer::Exists(true)
        );
    }

    #[test]
    fn the_ack_may_come_in_a_later_datagram() {
        let mut named = false;
        let table = message(NEW_TABLE, 3, &[1, 0, 0, 0]);
        assert_eq!(
            read_answer(&table, 3, &mut named).expect("answer"),
            Answer::Pending
        );
        assert_eq!(
            read_answer(&error(3, 0), 3, &mut named).expect("answer"),
            Answer::Exists(true)
        );
    }

    #[test]
    fn enoent_is_a_missing_table_and_other_errors_are_errors() {
        let mut named = false;
        assert_eq!(
            read_answer(&error(3, -libc::ENOENT), 3, &mut named).expect("answer"),
            Answer::Exists(false)
        );
        let denied = read_answer(&error(3, -libc::EPERM), 3, &mut named).expect_err("EPERM");
        assert_eq!(denied.raw_os_error(), Some(libc::EPERM));
        // i32::MIN must not overflow when negated.
        assert!(read_answer(&error(3, i32::MIN), 3, &mut named).is_err());
    }

    #[test]
    fn answers_to_other_requests_and_garbage_are_not_taken_for_ours() {
        let mut named = false;
        let mut datagram = message(NEW_TABLE, 9, &[]);
        datagram.extend(error(9, 0));
        assert_eq!(
            read_answer(&datagram, 3, &mut named).expect("answer"),
            Answer::Pending
        );
        assert!(!named);
        assert!(read_answer(&[1, 2, 3], 3, &mut named).is_err());
        let short_error = message(NLMSG_ERROR, 3, &[0, 0]);
        assert!(read_answer(&short_error, 3, &mut named).is_err());
    }
}
