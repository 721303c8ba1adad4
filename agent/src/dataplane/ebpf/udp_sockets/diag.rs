//! Which UDP sockets of the calling thread's network namespace are connected, and to whom: a
//! sock_diag dump (the `ss -u` request), for the socket cookies the destroy program matches.

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

/// A connected UDP socket: its cookie (as `bpf_get_socket_cookie` returns it) and its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConnectedUdp {
    pub cookie: u64,
    pub peer: SocketAddr,
}

/// The kernel's `idiag_cookie`: two host-order words, low one first.
pub(super) fn cookie(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    u64::from(high) << 32 | u64::from(low)
}

/// Connected UDP sockets (v4 and v6) of this thread's network namespace: a netlink socket
/// belongs to the namespace of the thread that creates it, and inet_diag dumps that one.
pub(super) fn connected_udp_sockets() -> io::Result<Vec<ConnectedUdp>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut found = Vec::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        dump(&socket, family, socket_id, &mut found)?;
    }
    Ok(found)
}

fn dump(
    socket: &Socket,
    family: u8,
    socket_id: SocketId,
    found: &mut Vec<ConnectedUdp>,
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_UDP,
            extensions: ExtensionFlags::empty(),
            // A connected UDP socket is in TCP_ESTABLISHED.
            states: StateFlags::ESTABLISHED,
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0u8; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    loop {
        let (received, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < received.len() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&received[offset..])
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    found.push(ConnectedUdp {
                        cookie: cookie(id.cookie),
                        peer: SocketAddr::new(id.destination_address, id.destination_port),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return Err(error.to_io());
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_join_the_kernels_two_words_low_first() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x9abc_def0u32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x1234_5678u32.to_ne_bytes());
        assert_eq!(cookie(raw), 0x1234_5678_9abc_def0);
    }
}
