//! Codec tests against messages captured from the real `ipvsadm` 1.31 and the kernel's
//! replies, on Debian's 6.1 and 6.12 kernels (testdata/, redone with testdata/capture-host.sh).
//! Our bytes for a change must equal ipvsadm's but for the sequence number and port id.

use std::path::PathBuf;

use netlink_packet_core::{Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

use super::attr::*;
use super::client::{decode_ipvs, encode, family_id_of, parse_datagram, refusal, Reply};
use super::message::{self, IpvsCmd, IpvsMessage};
use super::*;

const KERNELS: [&str; 2] = ["6.1", "6.12"];
const GENL_ID_CTRL: u16 = 0x10;

/// One capture: the messages in the order they crossed the socket, `true` for sent.
struct Capture {
    command: String,
    messages: Vec<(bool, Vec<u8>)>,
}

impl Capture {
    fn load(kernel: &str, name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/dataplane/ipvs/netlink/testdata")
            .join(kernel)
            .join(format!("{name}.txt"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut command = String::new();
        let mut messages = Vec::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                if command.is_empty() {
                    command = comment.to_owned();
                }
            } else if let Some((direction, hex)) = line.split_once(' ') {
                messages.push((direction == ">", decode_hex(hex)));
            }
        }
        assert!(!messages.is_empty(), "{} holds no messages", path.display());
        Self { command, messages }
    }

    /// The IPVS family's id on the capturing kernel: what nlctrl answered.
    fn family(&self) -> u16 {
        let reply = self
            .messages
            .iter()
            .find(|(sent, m)| !sent && message_type(m) == GENL_ID_CTRL)
            .expect("an nlctrl reply");
        family_id_of(&reply.1).expect("CTRL_ATTR_FAMILY_ID")
    }

    fn ipvs(&self, sent: bool) -> Vec<&[u8]> {
        let family = self.family();
        self.messages
            .iter()
            .filter(|(s, m)| *s == sent && message_type(m) == family)
            .map(|(_, m)| m.as_slice())
            .collect()
    }

    /// Every message the kernel sent back, in order.
    fn received(&self) -> Vec<&[u8]> {
        self.messages
            .iter()
            .filter(|(sent, _)| !sent)
            .map(|(_, m)| m.as_slice())
            .collect()
    }
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn message_type(message: &[u8]) -> u16 {
    u16::from_ne_bytes([message[4], message[5]])
}

fn flags(message: &[u8]) -> u16 {
    u16::from_ne_bytes([message[6], message[7]])
}

/// The message with its sequence number and port id zeroed.
fn normalised(message: &[u8]) -> Vec<u8> {
    let mut message = message.to_vec();
    message[8..16].fill(0);
    message
}

fn ours(payload: IpvsMessage, family: u16, flags: u16) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    encode(payload, family, flags, 0, &mut out);
    out.to_vec()
}

fn id(protocol: Protocol, address: &str, port: u16) -> ServiceId {
    ServiceId {
        protocol,
        address: address.parse().expect("address"),
        port,
    }
}

fn service(
    protocol: Protocol,
    address: &str,
    port: u16,
    scheduler: &str,
    persistence: Option<u32>,
) -> IpvsService {
    IpvsService {
        id: id(protocol, address, port),
        scheduler: scheduler.into(),
        scheduler_flags: 0,
        persistence_timeout: persistence,
    }
}

fn dest(address: &str, port: u16, weight: u32) -> IpvsDestination {
    IpvsDestination {
        address: address.parse().expect("address"),
        port,
        weight,
        forward: Forward::Masq,
        active_connections: 0,
        inactive_connections: 0,
    }
}

/// Each capture of one change, with the command that makes the same change.
fn changes() -> Vec<(&'static str, Command)> {
    use Protocol::{Sctp, Tcp, Udp};
    let tcp4 = id(Tcp, "10.96.0.10", 80);
    let tcp6 = id(Tcp, "fd00::10", 80);
    let udp4 = id(Udp, "10.96.0.10", 53);
    let udp6 = id(Udp, "fd00::10", 53);
    vec![
        (
            "new-service-tcp4-rr",
            Command::NewService(service(Tcp, "10.96.0.10", 80, "rr", None)),
        ),
        (
            "new-service-udp4-wrr-persist",
            Command::NewService(service(Udp, "10.96.0.10", 53, "wrr", Some(300))),
        ),
        (
            "new-service-sctp4-rr",
            Command::NewService(service(Sctp, "10.96.0.11", 9000, "rr", None)),
        ),
        (
            "new-service-tcp6-rr",
            Command::NewService(service(Tcp, "fd00::10", 80, "rr", None)),
        ),
        (
            "new-service-udp6-sh-persist",
            Command::NewService(service(Udp, "fd00::10", 53, "sh", Some(60))),
        ),
        (
            "new-service-sctp6-rr",
            Command::NewService(service(Sctp, "fd00::11", 9000, "rr", None)),
        ),
        (
            "set-service-tcp4-wrr-persist",
            Command::SetService(service(Tcp, "10.96.0.10", 80, "wrr", Some(600))),
        ),
        (
            "set-service-udp6-rr-nopersist",
            Command::SetService(service(Udp, "fd00::10", 53, "rr", None)),
        ),
        (
            "new-dest-tcp4-masq-w3",
            Command::NewDestination(tcp4, dest("10.244.1.5", 8080, 3)),
        ),
        (
            "new-dest-udp4-masq-w1",
            Command::NewDestination(udp4, dest("10.244.1.6", 5353, 1)),
        ),
        (
            "new-dest-sctp4-masq-w2",
            Command::NewDestination(id(Sctp, "10.96.0.11", 9000), dest("10.244.1.7", 9000, 2)),
        ),
        (
            "new-dest-tcp6-masq-w1",
            Command::NewDestination(tcp6, dest("fd00:244::5", 8080, 1)),
        ),
        (
            "new-dest-udp6-masq-w5",
            Command::NewDestination(udp6, dest("fd00:244::6", 53, 5)),
        ),
        (
            "set-dest-tcp4-w0",
            Command::SetDestination(tcp4, dest("10.244.1.5", 8080, 0)),
        ),
        (
            "set-dest-tcp6-w7",
            Command::SetDestination(tcp6, dest("fd00:244::5", 8080, 7)),
        ),
        (
            "del-dest-tcp4",
            Command::DelDestination(tcp4, "10.244.1.5".parse().expect("ip"), 8080),
        ),
        (
            "del-dest-udp6",
            Command::DelDestination(udp6, "fd00:244::6".parse().expect("ip"), 53),
        ),
        ("del-service-tcp4", Command::DelService(tcp4)),
        (
            "del-service-sctp6",
            Command::DelService(id(Sctp, "fd00::11", 9000)),
        ),
        ("del-service-udp6", Command::DelService(udp6)),
        (
            "err-exists",
            Command::NewService(service(Udp, "10.96.0.10", 53, "wrr", None)),
        ),
        (
            "err-missing",
            Command::DelService(id(Tcp, "10.96.0.99", 80)),
        ),
        (
            "err-noroute",
            Command::NewDestination(udp4, dest("192.0.2.1", 53, 1)),
        ),
    ]
}

#[test]
fn every_change_encodes_as_ipvsadm_sends_it() {
    for kernel in KERNELS {
        for (name, command) in changes() {
            let capture = Capture::load(kernel, name);
            let sent = capture.ipvs(true);
            // ipvsadm first asks for the info, then sends the change.
            assert_eq!(sent.len(), 2, "{kernel} {name}: {}", capture.command);
            let theirs = sent[1];
            assert_eq!(flags(theirs), NLM_F_REQUEST | NLM_F_ACK, "{kernel} {name}");
            let mine = ours(
                IpvsMessage::from_command(&command),
                capture.family(),
                NLM_F_REQUEST | NLM_F_ACK,
            );
            assert_eq!(
                normalised(&mine),
                normalised(theirs),
                "{kernel} {name} ({})",
                capture.command
            );
        }
    }
}

#[test]
fn info_and_dumps_encode_as_ipvsadm_sends_them() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        let family = capture.family();
        let sent = capture.ipvs(true);
        assert_eq!(
            normalised(&ours(
                IpvsMessage::get_info(),
                family,
                NLM_F_REQUEST | NLM_F_ACK
            )),
            normalised(sent[0]),
            "{kernel} get info"
        );
        let dump = NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP;
        assert_eq!(
            normalised(&ours(IpvsMessage::dump_services(), family, dump)),
            normalised(sent[1]),
            "{kernel} dump services"
        );
        // Then one destination dump per service (ipvsadm sorts the services first).
        let mut mine: Vec<Vec<u8>> = dumped_services(&capture)
            .iter()
            .map(|s| normalised(&ours(IpvsMessage::dump_destinations(&s.id), family, dump)))
            .collect();
        let mut theirs: Vec<Vec<u8>> = sent[2..].iter().map(|m| normalised(m)).collect();
        mine.sort();
        theirs.sort();
        assert_eq!(mine.len(), 6, "{kernel}");
        assert_eq!(mine, theirs, "{kernel}");
    }
}

/// No capture holds a GET of one service; the kernel parses its key as it parses a destination
/// dump's (`ip_vs_genl_parse_service` without the full entry), so the two requests differ only
/// in the command and the dump flag.
#[test]
fn a_service_get_carries_the_key_a_destination_dump_does() {
    use Protocol::{Tcp, Udp};
    let family = 0x1d;
    for key in [id(Tcp, "10.96.0.10", 53), id(Udp, "fd00:96::a", 53)] {
        let get = ours(
            IpvsMessage::get_service(&key),
            family,
            NLM_F_REQUEST | NLM_F_ACK,
        );
        let dump = ours(
            IpvsMessage::dump_destinations(&key),
            family,
            NLM_F_REQUEST | NLM_F_ACK,
        );
        assert_eq!(get.len(), dump.len(), "{key}");
        // The genetlink command byte follows the 16-byte netlink header.
        assert_eq!(get[16], u8::from(IpvsCmd::GetService), "{key}");
        assert_eq!(&get[..16], &dump[..16], "{key}");
        assert_eq!(&get[17..], &dump[17..], "{key}");
        let decoded = decode_ipvs(&get).expect("decodes");
        assert_eq!(decoded.cmd, IpvsCmd::GetService, "{key}");
        assert_eq!(
            decoded.service().map(<[_]>::len),
            Some(4),
            "{key}: family, protocol, address and port only"
        );
    }
}

#[test]
fn flush_encodes_as_ipvsadm_sends_it() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "flush");
        let sent = capture.ipvs(true);
        assert_eq!(
            normalised(&ours(
                IpvsMessage::flush(),
                capture.family(),
                NLM_F_REQUEST | NLM_F_ACK
            )),
            normalised(sent[1]),
            "{kernel}"
        );
    }
}

/// Parsing what ipvsadm sent and emitting it again gives its bytes back: no attribute is
/// lost or reordered, nests keep their NLA_F_NESTED flag.
#[test]
fn sent_messages_round_trip() {
    for kernel in KERNELS {
        let names = changes().into_iter().map(|(name, _)| name);
        for name in names.chain(["list", "flush"]) {
            let capture = Capture::load(kernel, name);
            for theirs in capture.ipvs(true) {
                let parsed = decode_ipvs(theirs).expect("decodes");
                let mut again = ours(parsed, capture.family(), flags(theirs));
                again[8..16].copy_from_slice(&theirs[8..16]);
                assert_eq!(again, theirs, "{kernel} {name}");
            }
        }
    }
}

fn dumped_services(capture: &Capture) -> Vec<IpvsService> {
    capture
        .ipvs(false)
        .into_iter()
        .map(|m| decode_ipvs(m).expect("decodes"))
        .filter(|m| m.cmd == IpvsCmd::NewService)
        .map(|m| {
            message::parse_service(m.service().expect("service attrs"))
                .expect("parses")
                .expect("a TCP/UDP/SCTP service")
        })
        .collect()
}

#[test]
fn kernel_service_dump_parses_to_what_ipvsadm_listed() {
    use Protocol::{Sctp, Tcp, Udp};
    // `ipvsadm -Ln` printed (capture.sh's console):
    //   TCP  10.96.0.10:80 wrr persistent 600      UDP  10.96.0.10:53 wrr persistent 300
    //   SCTP 10.96.0.11:9000 rr                    TCP  [fd00::10]:80 rr
    //   UDP  [fd00::10]:53 rr                      SCTP [fd00::11]:9000 rr
    let mut expected = vec![
        service(Tcp, "10.96.0.10", 80, "wrr", Some(600)),
        service(Udp, "10.96.0.10", 53, "wrr", Some(300)),
        service(Sctp, "10.96.0.11", 9000, "rr", None),
        service(Tcp, "fd00::10", 80, "rr", None),
        service(Udp, "fd00::10", 53, "rr", None),
        service(Sctp, "fd00::11", 9000, "rr", None),
    ];
    expected.sort_by_key(|s| s.id);
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        let mut services = dumped_services(&capture);
        services.sort_by_key(|s| s.id);
        assert_eq!(services, expected, "{kernel}");
    }
}

#[test]
fn kernel_destination_dumps_parse_to_what_ipvsadm_listed() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        let sent = capture.ipvs(true);
        let mut listed = Vec::new();
        // Destination replies carry the sequence number of the dump they answer.
        for request in &sent[2..] {
            let service = decode_ipvs(request).expect("decodes");
            let key = message::parse_service(&{
                let mut attrs = service.service().expect("service").to_vec();
                attrs.push(ServiceAttr::Scheduler(String::new()));
                attrs.push(ServiceAttr::Flags(ServiceFlags { flags: 0, mask: 0 }));
                attrs
            })
            .expect("parses")
            .expect("named");
            // ipvsadm opens a socket per request, all starting at the same sequence number:
            // the port id tells the answers apart.
            let seq_and_port = &request[8..16];
            let mut dests: Vec<IpvsDestination> = capture
                .ipvs(false)
                .into_iter()
                .filter(|m| &m[8..16] == seq_and_port)
                .map(|m| decode_ipvs(m).expect("decodes"))
                .map(|m| {
                    message::parse_destination(m.dest().expect("dest"), &key.id.address)
                        .expect("parses")
                })
                .collect();
            dests.sort_by_key(|d| (d.address, d.port));
            listed.push((key.id, dests));
        }
        listed.sort_by_key(|(id, _)| *id);
        let mut expected = vec![
            (
                id(Protocol::Tcp, "10.96.0.10", 80),
                vec![dest("10.244.1.5", 8080, 0)],
            ),
            (
                id(Protocol::Udp, "10.96.0.10", 53),
                vec![dest("10.244.1.6", 5353, 1)],
            ),
            (
                id(Protocol::Sctp, "10.96.0.11", 9000),
                vec![dest("10.244.1.7", 9000, 2)],
            ),
            (
                id(Protocol::Tcp, "fd00::10", 80),
                vec![dest("fd00:244::5", 8080, 7)],
            ),
            (
                id(Protocol::Udp, "fd00::10", 53),
                vec![dest("fd00:244::6", 53, 5)],
            ),
            (id(Protocol::Sctp, "fd00::11", 9000), vec![]),
        ];
        expected.sort_by_key(|(id, _)| *id);
        assert_eq!(listed, expected, "{kernel}");
    }
}

/// The kernel's replies survive parse → emit → parse (statistics kept as raw attributes).
#[test]
fn kernel_replies_round_trip_through_the_codec() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        for reply in capture.ipvs(false) {
            let parsed = decode_ipvs(reply).expect("decodes");
            let again = ours(parsed.clone(), capture.family(), 0);
            assert_eq!(
                decode_ipvs(&again).expect("decodes again"),
                parsed,
                "{kernel}"
            );
            // Only the nest flag differs: the kernel does not set NLA_F_NESTED.
            assert_eq!(again.len(), reply.len(), "{kernel}");
        }
    }
}

#[test]
fn info_reply_is_version_1_2_1_with_4096_entries() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        let reply = capture
            .ipvs(false)
            .into_iter()
            .map(|m| decode_ipvs(m).expect("decodes"))
            .find(|m| m.cmd == IpvsCmd::SetInfo)
            .expect("an info reply");
        assert_eq!(
            reply.attrs,
            vec![
                CmdAttr::Info(InfoAttr::Version(0x010201)),
                CmdAttr::Info(InfoAttr::ConnectionTableSize(4096)),
            ]
        );
        let info = message::parse_info(&reply).expect("parses");
        assert_eq!(
            info,
            IpvsInfo {
                version: (1, 2, 1),
                table_size: 4096
            },
            "{kernel}"
        );
    }
}

/// Which reply each change got, as the client classifies it.
fn last_reply(capture: &Capture) -> (u32, String) {
    let received = capture.received();
    let last = received.last().expect("a reply");
    let replies = parse_datagram(last).expect("parses");
    assert_eq!(replies.len(), 1);
    let seq = replies[0].0.sequence_number;
    let kind = match &replies[0].1 {
        Reply::Ack => "ack".to_owned(),
        Reply::Error { errno, .. } => format!("errno {errno}"),
        Reply::Done => "done".to_owned(),
        Reply::Data(_) => "data".to_owned(),
    };
    (seq, kind)
}

#[test]
fn acknowledgements_and_refusals_classify() {
    for kernel in KERNELS {
        for (name, _) in changes() {
            let capture = Capture::load(kernel, name);
            let (seq, kind) = last_reply(&capture);
            let request = capture.ipvs(true)[1];
            assert_eq!(
                seq.to_ne_bytes(),
                request[8..12],
                "{kernel} {name}: answers the change"
            );
            let expected = match name {
                "err-exists" => format!("errno {}", libc::EEXIST),
                "err-missing" => format!("errno {}", libc::ESRCH),
                _ => "ack".to_owned(),
            };
            assert_eq!(kind, expected, "{kernel} {name}");
        }
    }
}

#[test]
fn refusals_become_typed_errors_naming_the_request() {
    let command = Command::NewService(service(Protocol::Udp, "10.96.0.10", 53, "wrr", None));
    let exists = client_refusal(libc::EEXIST, &command);
    assert!(matches!(exists, IpvsError::Exists { .. }), "{exists:?}");
    assert_eq!(exists.errno(), Some(libc::EEXIST));
    assert_eq!(
        exists.to_string(),
        "ipvs: add service UDP 10.96.0.10:53 (wrr): already exists"
    );
    let missing = client_refusal(
        libc::ESRCH,
        &Command::DelService(id(Protocol::Tcp, "10.96.0.99", 80)),
    );
    assert!(matches!(missing, IpvsError::NotFound { errno, .. } if errno == libc::ESRCH));
    assert_eq!(
        missing.to_string(),
        "ipvs: delete service TCP 10.96.0.99:80: no such service"
    );
    let invalid = client_refusal(
        libc::EINVAL,
        &Command::NewDestination(id(Protocol::Tcp, "fd00::10", 80), dest("ff02::1", 80, 1)),
    );
    assert!(matches!(invalid, IpvsError::Invalid { .. }));
    assert_eq!(
        invalid.to_string(),
        "ipvs: add destination [ff02::1]:80 to TCP [fd00::10]:80: rejected as invalid"
    );
    let other = client_refusal(libc::ENOMEM, &command);
    assert_eq!(other.errno(), Some(libc::ENOMEM));
    assert!(matches!(other, IpvsError::Kernel { .. }));
}

fn client_refusal(errno: i32, command: &Command) -> IpvsError {
    // Build an NLMSG_ERROR like the kernel's (capped, with an extended-ack TLV) and run it
    // through the client's classification.
    let mut datagram = Vec::new();
    let header_len = 16 + 4 + 16;
    datagram.extend_from_slice(&(header_len as u32).to_ne_bytes());
    datagram.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
    datagram.extend_from_slice(&0x100u16.to_ne_bytes()); // NLM_F_CAPPED
    datagram.extend_from_slice(&[0; 8]);
    datagram.extend_from_slice(&(-errno).to_ne_bytes());
    datagram.extend_from_slice(&[0; 16]);
    let replies = parse_datagram(&datagram).expect("parses");
    match &replies[0].1 {
        Reply::Error { errno, message } => {
            refusal(*errno, message.clone(), Request::Command(command.clone()))
        }
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
fn extended_ack_text_is_kept() {
    // An error with NLM_F_CAPPED | NLM_F_ACK_TLVS and NLMSGERR_ATTR_MSG "no such scheduler".
    let text = b"no such scheduler\0";
    let tlv_len = 4 + text.len();
    let padded = (tlv_len + 3) & !3;
    let total = 16 + 4 + 16 + padded;
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&(total as u32).to_ne_bytes());
    datagram.extend_from_slice(&2u16.to_ne_bytes());
    datagram.extend_from_slice(&0x300u16.to_ne_bytes());
    datagram.extend_from_slice(&[0; 8]);
    datagram.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
    datagram.extend_from_slice(&[0; 16]);
    datagram.extend_from_slice(&(tlv_len as u16).to_ne_bytes());
    datagram.extend_from_slice(&1u16.to_ne_bytes());
    datagram.extend_from_slice(text);
    datagram.resize(total, 0);
    let replies = parse_datagram(&datagram).expect("parses");
    match &replies[0].1 {
        Reply::Error { errno, message } => {
            assert_eq!(*errno, libc::ENOENT);
            assert_eq!(message.as_deref(), Some("no such scheduler"));
        }
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
fn family_resolution_reads_the_id_from_nlctrl() {
    // 6.1 registers IPVS as 0x20, 6.12 as 0x23 (more families before it): never hard-code.
    assert_eq!(Capture::load("6.1", "list").family(), 0x20);
    assert_eq!(Capture::load("6.12", "list").family(), 0x23);
}

#[test]
fn dump_ends_with_done_and_no_acknowledgement() {
    for kernel in KERNELS {
        let capture = Capture::load(kernel, "list");
        let sent = capture.ipvs(true);
        let dump_seq = &sent[1][8..12];
        let answers: Vec<&[u8]> = capture
            .received()
            .into_iter()
            .filter(|m| &m[8..12] == dump_seq && m[12..16] == sent[1][12..16])
            .collect();
        let last = parse_datagram(answers.last().expect("answers")).expect("parses");
        assert!(matches!(last[0].1, Reply::Done), "{kernel}");
        assert!(answers[..answers.len() - 1]
            .iter()
            .all(|m| matches!(parse_datagram(m).expect("parses")[0].1, Reply::Data(_))));
    }
}

#[test]
fn unknown_attributes_survive_as_other() {
    let nla = netlink_packet_core::DefaultNla::new(99, vec![1, 2, 3, 4]);
    let message = IpvsMessage {
        cmd: IpvsCmd::NewService,
        attrs: vec![CmdAttr::Service(vec![
            ServiceAttr::AddressFamily(2),
            ServiceAttr::Other(nla.clone()),
        ])],
    };
    let bytes = ours(message.clone(), 0x20, NLM_F_REQUEST);
    assert_eq!(bytes.len(), 16 + 4 + message.buffer_len());
    assert_eq!(decode_ipvs(&bytes).expect("decodes"), message);
}

#[test]
fn address_of_a_v4_service_sits_in_the_first_four_bytes() {
    let command = Command::DelService(id(Protocol::Tcp, "10.96.0.10", 80));
    let message = IpvsMessage::from_command(&command);
    let address = message
        .service()
        .expect("service")
        .iter()
        .find_map(|a| match a {
            ServiceAttr::Address(bytes) => Some(*bytes),
            _ => None,
        })
        .expect("address");
    assert_eq!(address[..4], [10, 96, 0, 10]);
    assert!(address[4..].iter().all(|b| *b == 0));
}

/// Regression (fuzz target ipvs_netlink, crash-331f61f6…): an NLMSG_DONE or NLMSG_ERROR whose
/// code is i32::MIN made `-code` overflow and panic. It is a refusal with the largest errno.
#[test]
fn an_error_code_of_i32_min_is_a_refusal_not_a_panic() {
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        bytes.extend_from_slice(&[0; 8]); // sequence, port id
        bytes.extend_from_slice(payload);
        bytes
    }
    let done = message(3, &i32::MIN.to_ne_bytes());
    // NLMSG_ERROR: the code, then the header of the request it answers.
    let mut error_payload = i32::MIN.to_ne_bytes().to_vec();
    error_payload.extend_from_slice(&message(0x20, &[])[..16]);
    let error = message(2, &error_payload);
    for datagram in [done, error] {
        let replies = parse_datagram(&datagram).expect("parses");
        assert!(
            matches!(
                replies[..],
                [(
                    _,
                    Reply::Error {
                        errno: i32::MAX,
                        ..
                    }
                )]
            ),
            "{replies:?}"
        );
    }
    let captured = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/seeds/ipvs_netlink/regression-errno-i32-min"),
    )
    .expect("the fuzzer's input");
    // The whole input as the fuzz target runs it: it panicked before the fix.
    crate::fuzzing::ipvs_reply(&captured);
}

/// `ipvsadm --set 900 120 300`: no capture holds one (the capture host had no IPVS), so the
/// bytes are written out from `linux/ip_vs.h` and the kernel's `ip_vs_genl_set_config`:
/// `IPVS_CMD_SET_CONFIG` (12) with three u32 attributes numbered 4, 5 and 6, all sent even
/// when 0, as libipvs (kube-proxy's client) sends them.
#[test]
fn timeouts_encode_as_the_kernel_reads_them_and_parse_back() {
    use netlink_packet_core::ParseableParametrized as _;
    let family = 0x1d;
    let timeouts = IpvsTimeouts {
        tcp: 900,
        tcp_fin: 120,
        udp: 300,
    };
    let sent = ours(
        IpvsMessage::set_timeouts(&timeouts),
        family,
        NLM_F_REQUEST | NLM_F_ACK,
    );
    let mut expected = Vec::new();
    expected.extend_from_slice(&(16u32 + 4 + 3 * 8).to_ne_bytes());
    expected.extend_from_slice(&family.to_ne_bytes());
    expected.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    expected.extend_from_slice(&[0; 8]);
    expected.extend_from_slice(&[12, message::IPVS_GENL_VERSION, 0, 0]);
    for (kind, seconds) in [(4u16, 900u32), (5, 120), (6, 300)] {
        expected.extend_from_slice(&8u16.to_ne_bytes());
        expected.extend_from_slice(&kind.to_ne_bytes());
        expected.extend_from_slice(&seconds.to_ne_bytes());
    }
    assert_eq!(sent, expected);
    // The kernel's answer to IPVS_CMD_GET_CONFIG carries IPVS_CMD_SET_CONFIG and the same
    // three attributes.
    let reply = IpvsMessage {
        cmd: IpvsCmd::SetConfig,
        attrs: vec![
            CmdAttr::TimeoutTcp(900),
            CmdAttr::TimeoutTcpFin(120),
            CmdAttr::TimeoutUdp(300),
        ],
    };
    let mut bytes = vec![0u8; reply.buffer_len()];
    reply.emit(&mut bytes);
    let parsed = IpvsMessage::parse_with_param(
        &bytes[..],
        netlink_packet_generic::GenlHeader {
            cmd: 12,
            version: message::IPVS_GENL_VERSION,
        },
    )
    .expect("a config reply parses");
    assert_eq!(
        message::parse_timeouts(&parsed).expect("timeouts"),
        timeouts
    );
    let partial = IpvsMessage {
        cmd: IpvsCmd::SetConfig,
        attrs: vec![CmdAttr::TimeoutTcp(900)],
    };
    assert!(message::parse_timeouts(&partial).is_err());
    assert_eq!(
        Request::SetTimeouts(timeouts).to_string(),
        "set timeouts tcp 900s tcpfin 120s udp 300s"
    );
}

/// The scheduler flags (`ipvsadm -b sh-fallback,sh-port`) go out in the service's flags with
/// a full mask, so an edit without them clears them, and come back from a dump beside the
/// kernel's own hashed bit, so a flag changed behind the agent's back reads as drift.
#[test]
fn scheduler_flags_are_sent_with_a_full_mask_and_read_back() {
    use crate::scheduler::{IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2};
    let sent_flags = |service: &IpvsService| {
        message::service_attrs(service)
            .into_iter()
            .find_map(|attr| match attr {
                ServiceAttr::Flags(flags) => Some(flags),
                _ => None,
            })
            .expect("a flags attribute")
    };
    let mut mh = service(Protocol::Tcp, "10.96.0.10", 80, "mh", Some(600));
    mh.scheduler_flags = IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2;
    let flags = sent_flags(&mh);
    assert_eq!(
        (flags.flags, flags.mask),
        (
            IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2,
            u32::MAX
        )
    );
    let plain = service(Protocol::Tcp, "10.96.0.10", 80, "mh", None);
    assert_eq!(sent_flags(&plain).flags, 0);
    assert_eq!(sent_flags(&plain).mask, u32::MAX);

    // As the kernel dumps it: the same attributes with IP_VS_SVC_F_HASHED set.
    let dumped: Vec<ServiceAttr> = message::service_attrs(&mh)
        .into_iter()
        .map(|attr| match attr {
            ServiceAttr::Flags(flags) => ServiceAttr::Flags(ServiceFlags {
                flags: flags.flags | IP_VS_SVC_F_HASHED,
                mask: u32::MAX,
            }),
            other => other,
        })
        .collect();
    let parsed = message::parse_service(&dumped)
        .expect("parses")
        .expect("a TCP service");
    assert_eq!(parsed, mh);
    assert_ne!(parsed, plain, "a flag difference is a difference");
}
