//! The IPVS client: one blocking generic-netlink socket bound to the `IPVS` family, dumps
//! (multipart until `NLMSG_DONE`), and pipelined changes whose acknowledgements are matched to
//! their requests by sequence number.
//!
//! Generic netlink handles a `sendmsg` synchronously: every message in the buffer is executed
//! before the call returns, and a refusal (or an acknowledgement, for a message that asks with
//! `NLM_F_ACK`) is queued on our socket in message order. So only the last message of a batch
//! asks for an acknowledgement: when it arrives, every earlier message without a refusal
//! succeeded. A batch is as large as the receive buffer can hold refusals for (all of them may
//! be refused); if it still overflows (`ENOBUFS`: the kernel dropped some), what was queued is
//! read, the rest reported as [`IpvsError::AckLost`], and later batches are halved.
//!
//! [`IpvsClient::set_acknowledgements`] and [`IpvsClient::set_batch_limit`] select other
//! modes (an acknowledgement per message; one message per `sendmsg`, as `ipvsadm` does), and
//! [`IpvsClient::record_batches`] keeps per-batch timings, for the benchmarks that compare
//! them.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use netlink_packet_core::{
    DecodeError, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlaBuffer,
    NlasIterator, Parseable, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use super::message::{self, IpvsMessage, IPVS_GENL_NAME};
use super::{
    Command, IpvsDestination, IpvsError, IpvsInfo, IpvsService, IpvsTimeouts, MessageCounts,
    Request, ServiceId,
};

/// Receive buffer asked for (the kernel doubles it): room for a few thousand acknowledgements.
const RCVBUF: usize = 4 << 20;
/// A generic-netlink dump never puts more than 32 KiB in one datagram; 64 KiB leaves room.
const RECV_CHUNK: usize = 64 << 10;
/// What one queued acknowledgement costs in the receive buffer (skb truesize), rounded up.
const ACK_COST: usize = 1024;
/// Bytes per `sendmsg`: well under the default socket send buffer (the kernel refuses a
/// message larger than `sk_sndbuf - 32`).
const BATCH_BYTES: usize = 64 << 10;
/// How long a reply may take before the request is given up (a guard against hangs).
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Dump attempts when the kernel flags a dump as interrupted (`NLM_F_DUMP_INTR`).
const DUMP_ATTEMPTS: usize = 3;

/// Where `nlmsg_flags` sits in a netlink header (after `nlmsg_len` and `nlmsg_type`).
const FLAGS_OFFSET: usize = 6;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;

/// Which messages of a batch ask the kernel for an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acknowledgements {
    /// Only the last: refusals come back anyway, so its acknowledgement confirms the rest.
    Last,
    /// Every message (what `ipvsadm` and kube-proxy's library ask for).
    Every,
}

/// How one `sendmsg` of [`IpvsClient::execute`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchTiming {
    pub messages: usize,
    pub bytes: usize,
    /// Encoding the messages into the send buffer.
    pub encode: Duration,
    /// The `sendmsg` call: the kernel runs every message of the batch inside it.
    pub send: Duration,
    /// Reading and matching the replies.
    pub replies: Duration,
}

/// A generic-netlink socket bound to the `IPVS` family.
pub struct IpvsClient {
    socket: Socket,
    family_id: u16,
    next_seq: u32,
    sent: MessageCounts,
    recv_buf: Vec<u8>,
    /// The batch being encoded; reused so a large sync allocates it once.
    send_buf: BytesMut,
    /// Most messages per batch; halved after an overflow.
    window: usize,
    /// Most messages per batch whatever the window (1: one request, one answer).
    batch_limit: usize,
    acknowledgements: Acknowledgements,
    /// Per-batch timings, when asked for.
    batches: Option<Vec<BatchTiming>>,
}

/// One netlink message of a reply, classified.
#[derive(Debug)]
pub(crate) enum Reply<'a> {
    /// A message of the family (the whole message, netlink header included).
    Data(&'a [u8]),
    /// End of a dump.
    Done,
    /// Success acknowledgement.
    Ack,
    /// Refusal: positive errno and the kernel's extended-ack text if any.
    Error { errno: i32, message: Option<String> },
}

/// Splits a datagram into its netlink messages and classifies each.
pub(crate) fn parse_datagram(
    datagram: &[u8],
) -> Result<Vec<(NetlinkHeader, Reply<'_>)>, DecodeError> {
    let mut replies = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let buffer = NetlinkBuffer::new_checked(&datagram[offset..])?;
        let length = buffer.length() as usize;
        let bytes = &datagram[offset..offset + length];
        let header = NetlinkHeader::parse(&buffer)?;
        let reply = match header.message_type {
            NLMSG_ERROR | NLMSG_DONE => {
                match NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(bytes)?.payload {
                    NetlinkPayload::Error(error) if error.code.is_none() => Reply::Ack,
                    // Saturating: a reply carrying i32::MIN must not overflow the negation
                    // (found by the ipvs_netlink fuzz target).
                    NetlinkPayload::Error(error) => Reply::Error {
                        errno: error.raw_code().saturating_neg(),
                        message: extended_ack_message(header.flags, &error.header),
                    },
                    NetlinkPayload::Done(done) if done.code < 0 => Reply::Error {
                        errno: done.code.saturating_neg(),
                        message: None,
                    },
                    _ => Reply::Done,
                }
            }
            _ => Reply::Data(bytes),
        };
        replies.push((header, reply));
        // Netlink aligns messages to 4 bytes.
        offset += (length + 3) & !3;
    }
    Ok(replies)
}

/// The `NLMSGERR_ATTR_MSG` text of an error whose payload after the errno is `rest`: the
/// original request (its header only when capped) followed by TLVs when flagged.
fn extended_ack_message(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let original = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        let length = rest.get(..4)?;
        u32::from_ne_bytes(length.try_into().ok()?) as usize
    };
    let tlvs = rest.get((original + 3) & !3..)?;
    NlasIterator::new(tlvs)
        .flatten()
        .find_map(|nla: NlaBuffer<&[u8]>| {
            (nla.kind() == NLMSGERR_ATTR_MSG).then(|| {
                let value = nla.value();
                let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                String::from_utf8_lossy(&value[..end]).into_owned()
            })
        })
}

/// An IPVS message of a reply.
pub(crate) fn decode_ipvs(bytes: &[u8]) -> Result<IpvsMessage, DecodeError> {
    match NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(bytes)?.payload {
        NetlinkPayload::InnerMessage(genl) => Ok(genl.payload),
        other => Err(DecodeError::from(format!(
            "expected an IPVS message, got {other:?}"
        ))),
    }
}

/// Appends `payload` as one netlink message to `out`.
pub(crate) fn encode(
    payload: IpvsMessage,
    family_id: u16,
    flags: u16,
    sequence_number: u32,
    out: &mut BytesMut,
) {
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family_id);
    let mut message = NetlinkMessage::from(genl);
    message.header.flags = flags;
    message.header.sequence_number = sequence_number;
    message.finalize();
    let start = out.len();
    out.resize(start + message.buffer_len(), 0);
    message.serialize(&mut out[start..]);
}

/// Maps a kernel refusal to its typed error.
pub(crate) fn refusal(errno: i32, message: Option<String>, request: Request) -> IpvsError {
    let request = Box::new(request);
    match errno {
        libc::EEXIST => IpvsError::Exists { request },
        libc::ESRCH | libc::ENOENT => IpvsError::NotFound { request, errno },
        libc::EINVAL => IpvsError::Invalid { request, message },
        _ => IpvsError::Kernel {
            request,
            errno,
            message,
            source: io::Error::from_raw_os_error(errno),
        },
    }
}

fn socket_error(call: &'static str) -> impl FnOnce(io::Error) -> IpvsError {
    move |source| IpvsError::Socket { call, source }
}

/// `setsockopt(SOL_SOCKET, SO_RCVBUFFORCE)`: past `rmem_max`, needs CAP_NET_ADMIN (which
/// programming IPVS needs anyway).
fn force_receive_buffer(socket: &Socket, size: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid fd and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A blocking netlink socket of `protocol`, bound and connected to the kernel, whose reads
/// give up after `timeout`.
pub(crate) fn kernel_socket(protocol: isize, timeout: Duration) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    set_receive_timeout(&socket, timeout)?;
    Ok(socket)
}

/// `setsockopt(SOL_SOCKET, SO_RCVTIMEO)`: a netlink reply that never comes fails the call
/// instead of hanging the agent.
pub(crate) fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid fd and a pointer to a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&value as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn command_name(command: &Command) -> &'static str {
    match command {
        Command::NewService(_) => "IPVS new service",
        Command::SetService(_) => "IPVS set service",
        Command::DelService(_) => "IPVS delete service",
        Command::NewDestination(..) => "IPVS new destination",
        Command::SetDestination(..) => "IPVS set destination",
        Command::DelDestination(..) => "IPVS delete destination",
    }
}

fn count(counts: &mut MessageCounts, command: &Command) {
    let counter = match command {
        Command::NewService(_) => &mut counts.new_service,
        Command::SetService(_) => &mut counts.set_service,
        Command::DelService(_) => &mut counts.del_service,
        Command::NewDestination(..) => &mut counts.new_destination,
        Command::SetDestination(..) => &mut counts.set_destination,
        Command::DelDestination(..) => &mut counts.del_destination,
    };
    *counter += 1;
}

impl IpvsClient {
    /// Opens a socket and resolves the `IPVS` family.
    pub fn connect() -> Result<Self, IpvsError> {
        Self::connect_with_receive_buffer(RCVBUF)
    }

    /// [`connect`](Self::connect) with another receive buffer size (bytes, before the
    /// kernel doubles it): batches are sized to it. Small values exercise the overflow path.
    pub fn connect_with_receive_buffer(bytes: usize) -> Result<Self, IpvsError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(socket_error("socket"))?;
        if force_receive_buffer(&socket, bytes).is_err() {
            // Without CAP_NET_ADMIN: as much as rmem_max allows; batches shrink to fit.
            socket
                .set_rx_buf_sz(bytes)
                .map_err(socket_error("setsockopt(SO_RCVBUF)"))?;
        }
        // Acknowledgements carry only the request's header, and the kernel's text on errors.
        // Both exist since Linux 4.12; older kernels just send longer, plainer errors.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        set_receive_timeout(&socket, RECV_TIMEOUT)
            .map_err(socket_error("setsockopt(SO_RCVTIMEO)"))?;
        socket.bind_auto().map_err(socket_error("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(socket_error("connect"))?;
        let receive_buffer = socket
            .get_rx_buf_sz()
            .map_err(socket_error("getsockopt(SO_RCVBUF)"))?;
        let mut client = Self {
            socket,
            family_id: 0,
            next_seq: 1,
            sent: MessageCounts::default(),
            recv_buf: vec![0; RECV_CHUNK],
            send_buf: BytesMut::with_capacity(BATCH_BYTES + 1024),
            window: (receive_buffer / ACK_COST).clamp(16, 4096),
            batch_limit: usize::MAX,
            acknowledgements: Acknowledgements::Last,
            batches: None,
        };
        client.family_id = client.resolve_family()?;
        Ok(client)
    }

    /// Which messages of a batch ask for an acknowledgement ([`Acknowledgements::Last`]
    /// unless set).
    pub fn set_acknowledgements(&mut self, acknowledgements: Acknowledgements) {
        self.acknowledgements = acknowledgements;
    }

    /// At most `messages` (at least 1) per `sendmsg`; 1 waits for each answer before the next
    /// request, as `ipvsadm -R` does.
    pub fn set_batch_limit(&mut self, messages: usize) {
        self.batch_limit = messages.max(1);
    }

    /// Starts (or stops) keeping a [`BatchTiming`] per `sendmsg` of [`execute`](Self::execute).
    pub fn record_batches(&mut self, on: bool) {
        self.batches = on.then(Vec::new);
    }

    /// The batch timings kept since the last call.
    pub fn take_batch_timings(&mut self) -> Vec<BatchTiming> {
        self.batches
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The `IPVS` family's id, as the kernel assigned it.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// The kernel's IPVS version and connection-table size.
    pub fn info(&mut self) -> Result<IpvsInfo, IpvsError> {
        self.sent.other += 1;
        let replies = self.transact(
            IpvsMessage::get_info(),
            NLM_F_REQUEST | NLM_F_ACK,
            Request::Info,
        )?;
        let reply = replies.first().ok_or_else(|| IpvsError::Protocol {
            request: Box::new(Request::Info),
            reason: "no IPVS_CMD_SET_INFO in the reply".into(),
        })?;
        message::parse_info(reply).map_err(|source| IpvsError::Decode {
            request: Box::new(Request::Info),
            source,
        })
    }

    /// Sets the connection timeouts (`ipvsadm --set`); a 0 leaves that one as it is.
    pub fn set_timeouts(&mut self, timeouts: &IpvsTimeouts) -> Result<(), IpvsError> {
        self.sent.other += 1;
        self.transact(
            IpvsMessage::set_timeouts(timeouts),
            NLM_F_REQUEST | NLM_F_ACK,
            Request::SetTimeouts(*timeouts),
        )
        .map(drop)
    }

    /// The connection timeouts the kernel has (`ipvsadm -L --timeout`).
    pub fn timeouts(&mut self) -> Result<IpvsTimeouts, IpvsError> {
        self.sent.other += 1;
        let replies = self.transact(
            IpvsMessage::get_timeouts(),
            NLM_F_REQUEST | NLM_F_ACK,
            Request::GetTimeouts,
        )?;
        let reply = replies.first().ok_or_else(|| IpvsError::Protocol {
            request: Box::new(Request::GetTimeouts),
            reason: "no IPVS_CMD_SET_CONFIG in the reply".into(),
        })?;
        message::parse_timeouts(reply).map_err(|source| IpvsError::Decode {
            request: Box::new(Request::GetTimeouts),
            source,
        })
    }

    /// Every virtual service (one multipart dump). Firewall-mark services, which the contract
    /// cannot name, are left out.
    ///
    /// Not a proof of absence: on Linux 6.1 and 6.12 the kernel resumes each part of the dump
    /// at a position that counts every network namespace's services, so services deleted in
    /// another namespace during a multipart dump make it skip some of this one's, and IPVS
    /// never sets `NLM_F_DUMP_INTR` to say so. [`service`](Self::service) answers exactly.
    pub fn services(&mut self) -> Result<Vec<IpvsService>, IpvsError> {
        let replies = self.dump(IpvsMessage::dump_services(), Request::DumpServices, |c| {
            c.dump_services += 1
        })?;
        let mut services = Vec::with_capacity(replies.len());
        for reply in &replies {
            let Some(attrs) = reply.service() else {
                continue;
            };
            let parsed = message::parse_service(attrs).map_err(|source| IpvsError::Decode {
                request: Box::new(Request::DumpServices),
                source,
            })?;
            services.extend(parsed);
        }
        Ok(services)
    }

    /// One virtual service, asked for by its key (`IPVS_CMD_GET_SERVICE` without
    /// `NLM_F_DUMP`); `None` if the kernel does not have it, or if it is not a service the
    /// contract can name. The kernel looks the key up, so the answer does not depend on a
    /// dump's position.
    pub fn service(&mut self, id: &ServiceId) -> Result<Option<IpvsService>, IpvsError> {
        self.sent.get_service += 1;
        let request = || Request::GetService(*id);
        let replies = match self.transact(
            IpvsMessage::get_service(id),
            NLM_F_REQUEST | NLM_F_ACK,
            request(),
        ) {
            Ok(replies) => replies,
            // ESRCH is what the kernel answers for a key it does not have.
            Err(error) if matches!(error.errno(), Some(libc::ESRCH | libc::ENOENT)) => {
                return Ok(None)
            }
            Err(error) => return Err(error),
        };
        let attrs = replies
            .iter()
            .find_map(IpvsMessage::service)
            .ok_or_else(|| IpvsError::Protocol {
                request: Box::new(request()),
                reason: "no IPVS_CMD_ATTR_SERVICE in the reply".into(),
            })?;
        message::parse_service(attrs).map_err(|source| IpvsError::Decode {
            request: Box::new(request()),
            source,
        })
    }

    /// The real servers of one virtual service (one multipart dump). The kernel answers an
    /// empty list, not an error, for a service it does not have.
    pub fn destinations(&mut self, service: &ServiceId) -> Result<Vec<IpvsDestination>, IpvsError> {
        let request = || Request::DumpDestinations(*service);
        let replies = self.dump(IpvsMessage::dump_destinations(service), request(), |c| {
            c.dump_destinations += 1
        })?;
        let mut destinations = Vec::with_capacity(replies.len());
        for reply in &replies {
            let Some(attrs) = reply.dest() else {
                continue;
            };
            destinations.push(message::parse_destination(attrs, &service.address).map_err(
                |source| IpvsError::Decode {
                    request: Box::new(request()),
                    source,
                },
            )?);
        }
        Ok(destinations)
    }

    /// Removes every virtual service, foreign ones included (`ipvsadm -C`).
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.sent.other += 1;
        self.transact(
            IpvsMessage::flush(),
            NLM_F_REQUEST | NLM_F_ACK,
            Request::Flush,
        )
        .map(drop)
    }

    /// Sends every command before reading any acknowledgement; returns one result per command,
    /// in order.
    pub fn execute(&mut self, commands: &[Command]) -> Vec<Result<(), IpvsError>> {
        let mut results: Vec<Option<Result<(), IpvsError>>> =
            commands.iter().map(|_| None).collect();
        let mut start = 0;
        let mut out = std::mem::take(&mut self.send_buf);
        while start < commands.len() {
            let encoding = Instant::now();
            out.clear();
            let first_seq = self.next_seq;
            let limit = if crate::kernel_writes::crash_armed() {
                1
            } else {
                self.window.min(self.batch_limit)
            };
            let mut end = start;
            let mut last_flags_at = 0;
            while end < commands.len() && end - start < limit && out.len() < BATCH_BYTES {
                let seq = first_seq.wrapping_add((end - start) as u32);
                let message = IpvsMessage::from_command(&commands[end]);
                last_flags_at = out.len() + FLAGS_OFFSET;
                let flags = match self.acknowledgements {
                    Acknowledgements::Every => NLM_F_REQUEST | NLM_F_ACK,
                    Acknowledgements::Last => NLM_F_REQUEST,
                };
                encode(message, self.family_id, flags, seq, &mut out);
                end += 1;
            }
            // The last message of the batch always asks: its answer ends the batch.
            out[last_flags_at..last_flags_at + 2]
                .copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
            self.next_seq = first_seq.wrapping_add((end - start) as u32);
            let batch = &commands[start..end];
            let sending = Instant::now();
            let sent = self.socket.send(&out, 0);
            let replying = Instant::now();
            match sent {
                Ok(_) => {
                    batch.iter().for_each(|c| count(&mut self.sent, c));
                    self.collect_acks(first_seq, batch, &mut results[start..end]);
                    for (command, result) in batch.iter().zip(&results[start..end]) {
                        if matches!(result, Some(Ok(()))) {
                            crate::kernel_writes::done(command_name(command));
                        }
                    }
                    if let Some(batches) = &mut self.batches {
                        batches.push(BatchTiming {
                            messages: batch.len(),
                            bytes: out.len(),
                            encode: sending - encoding,
                            send: replying - sending,
                            replies: replying.elapsed(),
                        });
                    }
                }
                Err(error) => {
                    for slot in &mut results[start..end] {
                        *slot = Some(Err(IpvsError::Socket {
                            call: "sendmsg",
                            source: io::Error::new(error.kind(), error.to_string()),
                        }));
                    }
                }
            }
            start = end;
        }
        self.send_buf = out;
        results
            .into_iter()
            .zip(commands)
            .map(|(result, command)| {
                result.unwrap_or_else(|| {
                    Err(IpvsError::AckLost {
                        request: Box::new(Request::Command(command.clone())),
                    })
                })
            })
            .collect()
    }

    /// Netlink messages sent since the socket was opened, by kind (for benchmarks/metrics).
    pub fn messages_sent(&self) -> MessageCounts {
        self.sent
    }

    /// Reads the acknowledgements of one batch whose first sequence number is `first_seq`.
    fn collect_acks(
        &mut self,
        first_seq: u32,
        batch: &[Command],
        results: &mut [Option<Result<(), IpvsError>>],
    ) {
        let mut pending = batch.len();
        let mut overflowed = false;
        while pending > 0 {
            // After an overflow every acknowledgement that made it is already queued.
            let flags = if overflowed { libc::MSG_DONTWAIT } else { 0 };
            let length = match self.receive(flags) {
                Ok(length) => length,
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    overflowed = true;
                    self.window = (self.window / 2).max(1);
                    tracing::warn!(
                        window = self.window,
                        "ipvs: netlink receive buffer overflowed; acknowledgements lost"
                    );
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // Timed out, or nothing left after an overflow: the rest are lost.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    for slot in results.iter_mut().filter(|slot| slot.is_none()) {
                        *slot = Some(Err(IpvsError::Socket {
                            call: "recvmsg",
                            source: io::Error::new(error.kind(), error.to_string()),
                        }));
                    }
                    return;
                }
            };
            let replies = match parse_datagram(&self.recv_buf[..length]) {
                Ok(replies) => replies,
                Err(error) => {
                    tracing::warn!(%error, "ipvs: undecodable netlink datagram skipped");
                    continue;
                }
            };
            for (header, reply) in replies {
                let index = header.sequence_number.wrapping_sub(first_seq) as usize;
                let Some(slot) = results.get_mut(index) else {
                    continue; // a late answer to an earlier batch
                };
                if slot.is_some() {
                    continue;
                }
                let request = || Request::Command(batch[index].clone());
                let answered_last = index + 1 == batch.len();
                *slot = match reply {
                    Reply::Ack => Some(Ok(())),
                    Reply::Error { errno, message } => {
                        Some(Err(refusal(errno, message, request())))
                    }
                    Reply::Data(_) | Reply::Done => Some(Err(IpvsError::Protocol {
                        request: Box::new(request()),
                        reason: "data where an acknowledgement was expected".into(),
                    })),
                };
                pending -= 1;
                // Answers come in message order and refusals always come: once the last
                // message is answered, every message not refused succeeded. After an overflow
                // a refusal may have been dropped, so the unanswered stay unknown (AckLost).
                if answered_last && !overflowed {
                    for slot in results.iter_mut().filter(|slot| slot.is_none()) {
                        *slot = Some(Ok(()));
                    }
                    return;
                }
            }
        }
    }

    /// Receives one datagram into `recv_buf`; returns its length.
    fn receive(&mut self, flags: libc::c_int) -> io::Result<usize> {
        let length = self
            .socket
            .recv(&mut &mut self.recv_buf[..], flags | libc::MSG_TRUNC)?;
        if length > self.recv_buf.len() {
            return Err(io::Error::other(format!(
                "netlink datagram of {length} bytes truncated to {}",
                self.recv_buf.len()
            )));
        }
        Ok(length)
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// A dump, retried when the kernel says it was interrupted by a concurrent change.
    fn dump(
        &mut self,
        payload: IpvsMessage,
        request: Request,
        count: impl Fn(&mut MessageCounts),
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        // ipvsadm asks for an acknowledgement too; a dump ends with NLMSG_DONE either way.
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP;
        let mut attempt = 0;
        loop {
            attempt += 1;
            count(&mut self.sent);
            let (replies, interrupted) = self.exchange(payload.clone(), flags, &request)?;
            if !interrupted {
                return Ok(replies);
            }
            if attempt == DUMP_ATTEMPTS {
                return Err(IpvsError::Protocol {
                    request: Box::new(request),
                    reason: format!("dump interrupted {DUMP_ATTEMPTS} times in a row"),
                });
            }
        }
    }

    /// One request with its replies, until its acknowledgement or end of dump.
    fn transact(
        &mut self,
        payload: IpvsMessage,
        flags: u16,
        request: Request,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        self.exchange(payload, flags, &request)
            .map(|(replies, _)| replies)
    }

    /// Sends one request and gathers the IPVS messages answering it; also says whether the
    /// kernel flagged the answer as interrupted or a part of it was lost.
    fn exchange(
        &mut self,
        payload: IpvsMessage,
        flags: u16,
        request: &Request,
    ) -> Result<(Vec<IpvsMessage>, bool), IpvsError> {
        let seq = self.take_seq();
        let mut out = std::mem::take(&mut self.send_buf);
        out.clear();
        encode(payload, self.family_id, flags, seq, &mut out);
        let sent = self.socket.send(&out, 0);
        self.send_buf = out;
        sent.map_err(socket_error("sendmsg"))?;
        let mut messages = Vec::new();
        let mut interrupted = false;
        loop {
            let length = match self.receive(0) {
                Ok(length) => length,
                // A lost datagram: finish reading this answer, then have it redone.
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    interrupted = true;
                    continue;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(IpvsError::Socket {
                        call: "recvmsg",
                        source,
                    })
                }
            };
            let replies =
                parse_datagram(&self.recv_buf[..length]).map_err(|source| IpvsError::Decode {
                    request: Box::new(request.clone()),
                    source,
                })?;
            for (header, reply) in replies {
                if header.sequence_number != seq {
                    continue;
                }
                match reply {
                    Reply::Data(bytes) => {
                        interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
                        messages.push(decode_ipvs(bytes).map_err(|source| IpvsError::Decode {
                            request: Box::new(request.clone()),
                            source,
                        })?);
                    }
                    Reply::Done | Reply::Ack => return Ok((messages, interrupted)),
                    Reply::Error { errno, message } => {
                        return Err(refusal(errno, message, request.clone()))
                    }
                }
            }
        }
    }

    /// Asks nlctrl for the id of the `IPVS` family.
    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        self.sent.other += 1;
        let seq = self.take_seq();
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_owned())],
        });
        genl.finalize();
        let mut message = NetlinkMessage::from(genl);
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        message.header.sequence_number = seq;
        message.finalize();
        let mut out = vec![0; message.buffer_len()];
        message.serialize(&mut out);
        self.socket.send(&out, 0).map_err(socket_error("sendmsg"))?;
        let mut family = None;
        loop {
            let length = match self.receive(0) {
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(IpvsError::Socket {
                        call: "recvmsg",
                        source,
                    })
                }
            };
            let replies =
                parse_datagram(&self.recv_buf[..length]).map_err(|source| IpvsError::Decode {
                    request: Box::new(Request::ResolveFamily),
                    source,
                })?;
            for (header, reply) in replies {
                if header.sequence_number != seq {
                    continue;
                }
                match reply {
                    Reply::Data(bytes) if header.message_type == GENL_ID_CTRL => {
                        family = family.or(family_id_of(bytes));
                    }
                    Reply::Data(_) => {}
                    Reply::Done | Reply::Ack => {
                        return family.ok_or_else(|| IpvsError::Protocol {
                            request: Box::new(Request::ResolveFamily),
                            reason: "nlctrl answered without CTRL_ATTR_FAMILY_ID".into(),
                        })
                    }
                    Reply::Error { errno, .. } if errno == libc::ENOENT => {
                        return Err(IpvsError::FamilyNotFound)
                    }
                    Reply::Error { errno, message } => {
                        return Err(refusal(errno, message, Request::ResolveFamily))
                    }
                }
            }
        }
    }
}

/// `CTRL_ATTR_FAMILY_ID` of an nlctrl `NEWFAMILY` message, read without decoding the rest
/// (newer kernels add attributes older parsers reject).
pub(crate) fn family_id_of(message: &[u8]) -> Option<u16> {
    // nlmsghdr (16) + genlmsghdr (4).
    let attrs = message.get(20..)?;
    NlasIterator::new(attrs).flatten().find_map(|nla| {
        let value = nla.value();
        (nla.kind() == CTRL_ATTR_FAMILY_ID && value.len() >= 2)
            .then(|| u16::from_ne_bytes([value[0], value[1]]))
    })
}
