//! Connected UDP sockets follow backend removals.
//!
//! The socket programs translate a connected UDP socket once, at `connect()`, so without help
//! it keeps sending to its backend after the backend left the Service (the eBPF form of
//! kubernetes#19029, which IPVS mode handles by flushing conntrack). After an apply that
//! removed UDP backends the agent destroys the sockets its programs sent from a VIP to a
//! removed backend of that VIP, as Cilium's socket termination does:
//!
//! 1. [`removed_udp_pairs`] (pure): the (VIP, backend) pairs the ops remove;
//! 2. per network namespace on the node ([`netns`]: the runtimes' pins under `/run/netns` and
//!    the threads the agent sees in `/proc`), a sock_diag dump of connected UDP sockets
//!    ([`diag`]), kept when `TP_REV_NAT` says our program sent that socket from a removed
//!    pair's VIP to its backend ([`doomed_cookies`], pure): a socket connected to the pod IP
//!    itself, or sent there through another Service, is left alone;
//! 3. an `iter/udp` program calling `bpf_sock_destroy` on those cookies ([`iter`]).
//!
//! The application sees `ECONNABORTED` on its next receive (or `EDESTADDRREQ` on its next
//! send: the socket is disconnected), and a new `connect()` reaches a live backend.
//!
//! # Minimum kernel version
//!
//! `bpf_sock_destroy` is in 6.5 and later. Before that the agent says so once in its log and
//! connected UDP sockets keep their backend until the application reconnects (README,
//! docs/migrating-from-kube-proxy.md).

mod diag;
mod iter;
mod netns;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use topoproxy_common::{Endpoint, RevNatKey};

use super::convert::endpoint;
use crate::dataplane::op::Op;
use crate::model::Protocol;
use crate::table::VsKey;

use diag::ConnectedUdp;
pub use iter::SockDestroyError;
use iter::{DestroyIterator, KernelIds, MAX_COOKIES};
use netns::Netns;

/// A VIP and a backend taken out of it.
pub(super) type RemovedPair = (Endpoint, Endpoint);

/// The (VIP, backend) pairs of UDP services that `ops` remove: deleted destinations, and
/// every backend of a deleted service (`backends_of` gives them, read before the apply).
pub(super) fn removed_udp_pairs(
    ops: &[Op],
    backends_of: impl Fn(&VsKey) -> Vec<(IpAddr, u16)>,
) -> HashSet<RemovedPair> {
    let mut removed = HashSet::new();
    for op in ops {
        let service = op.service();
        if service.protocol != Protocol::Udp {
            continue;
        }
        let vip = endpoint(service.address, service.port);
        match op {
            Op::DeleteDestination { destination, .. } => {
                removed.insert((vip, endpoint(destination.address, destination.port)));
            }
            Op::DeleteService { key } => {
                for (address, port) in backends_of(key) {
                    removed.insert((vip, endpoint(address, port)));
                }
            }
            _ => {}
        }
    }
    removed
}

/// The cookies of `sockets` that our programs sent from a VIP to a backend removed from it.
/// `vip_of` reads `TP_REV_NAT`: (socket cookie, backend) → the VIP the socket asked for.
fn doomed_cookies(
    sockets: &[ConnectedUdp],
    removed: &HashSet<RemovedPair>,
    vip_of: impl Fn(&RevNatKey) -> Option<Endpoint>,
) -> Vec<u64> {
    let mut doomed = Vec::new();
    for socket in sockets {
        for backend in peer_endpoints(socket.peer) {
            let key = RevNatKey {
                cookie: socket.cookie,
                backend,
                _pad: 0,
            };
            if vip_of(&key).is_some_and(|vip| removed.contains(&(vip, backend))) {
                doomed.push(socket.cookie);
                break;
            }
        }
    }
    doomed
}

/// The peer as the programs may have recorded it: an IPv6 socket sent to an IPv4 backend
/// reports a v4-mapped peer, which the programs translated as IPv4.
fn peer_endpoints(peer: SocketAddr) -> Vec<Endpoint> {
    let mut endpoints = vec![endpoint(peer.ip(), peer.port())];
    if let IpAddr::V6(v6) = peer.ip() {
        if let Some(v4) = v6.to_ipv4_mapped() {
            endpoints.push(endpoint(IpAddr::V4(v4), peer.port()));
        }
    }
    endpoints
}

/// What one termination pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Terminated {
    /// Network namespaces whose sockets were looked at.
    pub namespaces: usize,
    /// Network namespaces skipped after an error (setns refused, a dump or the destroy
    /// program failed there), logged at debug.
    pub skipped: usize,
    /// Sockets destroyed (matched by cookie; one that closed meanwhile counts too).
    pub sockets: usize,
}

#[derive(Debug, Clone, Copy)]
enum Support {
    Unprobed,
    Available(KernelIds),
    /// Said once in the log.
    Missing,
}

/// Destroys the node's connected UDP sockets that were sent to removed backends.
#[derive(Debug)]
pub(super) struct UdpTerminator {
    support: Support,
}

impl Default for UdpTerminator {
    fn default() -> Self {
        Self {
            support: Support::Unprobed,
        }
    }
}

impl UdpTerminator {
    /// Destroys, in every network namespace of the node ([`netns`]), the connected UDP
    /// sockets sent from a VIP to a backend of `removed`. Does nothing (after one log line) on
    /// kernels without `bpf_sock_destroy`, and nothing at all when `removed` is empty: one
    /// pass over the namespaces per apply that removed a UDP backend.
    pub fn terminate(
        &mut self,
        removed: &HashSet<RemovedPair>,
        vip_of: impl Fn(&RevNatKey) -> Option<Endpoint> + Sync,
    ) -> Result<Terminated, SockDestroyError> {
        if removed.is_empty() {
            return Ok(Terminated::default());
        }
        let Some(ids) = self.kernel_ids() else {
            return Ok(Terminated::default());
        };
        let pin_dirs = netns::PIN_DIRS.map(Path::new);
        let namespaces = netns::network_namespaces(&pin_dirs, Path::new("/proc"))?;
        // sock_diag answers for the namespace of the netlink socket, and an `iter/udp`
        // iterator walks the namespace of the thread that creates it (`bpf_iter_init_seq_net`
        // takes `current`'s): both run on a thread of ours that joins each namespace in turn,
        // never on the caller's (a runtime worker, which other tasks share).
        std::thread::scope(|scope| {
            scope
                .spawn(|| pass(ids, &namespaces, removed, &vip_of))
                .join()
                .unwrap_or_else(|_| {
                    Err(SockDestroyError::Netns {
                        path: "(the namespace thread)".to_owned(),
                        source: std::io::Error::other("it panicked"),
                    })
                })
        })
    }

    /// The kernel's ids, probed once; `None` (said once in the log) when it has no kfunc.
    fn kernel_ids(&mut self) -> Option<KernelIds> {
        match self.support {
            Support::Available(ids) => Some(ids),
            Support::Missing => None,
            Support::Unprobed => match KernelIds::probe() {
                Ok(ids) => {
                    self.support = Support::Available(ids);
                    Some(ids)
                }
                // No kfunc (before 6.5) or no kernel BTF to find it by: said once.
                Err(error) => {
                    tracing::warn!(
                        error = %crate::dataplane::error_chain(&error),
                        "connected UDP sockets keep a removed backend until the application \
                         reconnects: this kernel cannot destroy them (bpf_sock_destroy, 6.5+)"
                    );
                    self.support = Support::Missing;
                    None
                }
            },
        }
    }
}

/// One pass, on a thread that may join any namespace: dump each namespace's connected UDP
/// sockets, pick the doomed ones, load the destroy program once for all of them and run it in
/// the namespaces that hold some. A namespace that fails is logged at debug and skipped (the
/// listing holds each open, so one whose pod went away meanwhile can still be entered; what
/// fails is the kernel refusing us there); loading the program fails the pass.
fn pass(
    ids: KernelIds,
    namespaces: &BTreeMap<netns::NetnsKey, Netns>,
    removed: &HashSet<RemovedPair>,
    vip_of: &(impl Fn(&RevNatKey) -> Option<Endpoint> + Sync),
) -> Result<Terminated, SockDestroyError> {
    let (mut done, doomed) = survey(namespaces, removed, vip_of);
    let all: Vec<u64> = doomed.iter().flat_map(|(_, c)| c.iter().copied()).collect();
    let mut iterators = Vec::new();
    for chunk in all.chunks(MAX_COOKIES) {
        iterators.push(DestroyIterator::load(ids, chunk)?);
    }
    for (netns, cookies) in &doomed {
        let ran = netns::enter(netns).and_then(|()| {
            iterators
                .iter()
                .try_for_each(|iterator| iterator.run_here())
        });
        match ran {
            Ok(()) => done.sockets += cookies.len(),
            Err(error) => skip(&mut done, netns, error),
        }
    }
    Ok(done)
}

/// The doomed cookies of each namespace (on the calling thread, which joins each in turn).
fn survey<'n>(
    namespaces: &'n BTreeMap<netns::NetnsKey, Netns>,
    removed: &HashSet<RemovedPair>,
    vip_of: &impl Fn(&RevNatKey) -> Option<Endpoint>,
) -> (Terminated, Vec<(&'n Netns, Vec<u64>)>) {
    let mut done = Terminated::default();
    let mut doomed = Vec::new();
    for netns in namespaces.values() {
        let sockets = netns::enter(netns)
            .and_then(|()| diag::connected_udp_sockets().map_err(SockDestroyError::Diag));
        match sockets {
            Ok(sockets) => {
                done.namespaces += 1;
                let cookies = doomed_cookies(&sockets, removed, vip_of);
                if !cookies.is_empty() {
                    doomed.push((netns, cookies));
                }
            }
            Err(error) => skip(&mut done, netns, error),
        }
    }
    (done, doomed)
}

fn skip(done: &mut Terminated, netns: &Netns, error: SockDestroyError) {
    done.skipped += 1;
    tracing::debug!(
        netns = %netns.found_at.display(),
        error = %crate::dataplane::error_chain(&error),
        "skipped a network namespace while destroying connected UDP sockets"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::op::Destination;
    use std::os::unix::fs::MetadataExt;

    fn destination(address: &str, port: u16) -> Destination {
        Destination {
            address: address.parse().expect("ip"),
            port,
            weight: 1,
            tier: 0,
            local: false,
        }
    }

    fn key(protocol: Protocol, vip: &str, port: u16) -> VsKey {
        VsKey::new(protocol, vip.parse().expect("ip"), port)
    }

    fn ep(address: &str, port: u16) -> Endpoint {
        endpoint(address.parse().expect("ip"), port)
    }

    #[test]
    fn udp_removals_and_deleted_udp_services_name_their_pairs_and_nothing_else() {
        let dns = key(Protocol::Udp, "10.96.0.10", 53);
        let gone = key(Protocol::Udp, "10.96.0.11", 53);
        let tcp = key(Protocol::Tcp, "10.96.0.10", 53);
        let ops = [
            Op::DeleteDestination {
                service: dns,
                destination: destination("10.1.0.5", 5353),
            },
            Op::AddDestination {
                service: dns,
                destination: destination("10.1.0.6", 5353),
            },
            Op::DeleteDestination {
                service: tcp,
                destination: destination("10.1.0.7", 53),
            },
            Op::DeleteService { key: gone },
            Op::EditDestination {
                service: dns,
                destination: destination("10.1.0.9", 5353),
            },
        ];
        let removed = removed_udp_pairs(&ops, |key| {
            if *key == gone {
                vec![("10.1.0.8".parse().expect("ip"), 53)]
            } else {
                Vec::new()
            }
        });
        let expected: HashSet<RemovedPair> = [
            (ep("10.96.0.10", 53), ep("10.1.0.5", 5353)),
            (ep("10.96.0.11", 53), ep("10.1.0.8", 53)),
        ]
        .into();
        assert_eq!(removed, expected);
    }

    #[test]
    fn a_namespace_that_cannot_be_entered_is_skipped_and_the_others_are_surveyed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // The format of tests/support/harness.rs.
            println!(
                "SKIP: a_namespace_that_cannot_be_entered_is_skipped_and_the_others_are_surveyed: \
                 setns needs CAP_SYS_ADMIN (run as root)"
            );
            return;
        }
        let open = |path: &str| std::fs::File::open(path).expect("open");
        let own = open("/proc/self/ns/net");
        let meta = own.metadata().expect("stat");
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            (meta.dev(), meta.ino()),
            Netns {
                found_at: "/proc/self/ns/net".into(),
                file: own,
            },
        );
        // What setns(CLONE_NEWNET) refuses, as it refuses a namespace it cannot join.
        namespaces.insert(
            (0, 0),
            Netns {
                found_at: "/proc/self/ns/uts".into(),
                file: open("/proc/self/ns/uts"),
            },
        );
        let removed: HashSet<RemovedPair> = [(ep("10.96.0.10", 53), ep("10.1.0.5", 53))].into();
        // setns is per thread: not on the test harness's.
        let (done, doomed) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let (done, doomed) = survey(&namespaces, &removed, &|_: &RevNatKey| None);
                    (done, doomed.len())
                })
                .join()
                .expect("survey thread")
        });
        assert_eq!(
            (done.namespaces, done.skipped, done.sockets, doomed),
            (1, 1, 0, 0)
        );
    }

    #[test]
    fn only_sockets_sent_from_that_vip_to_the_removed_backend_are_doomed() {
        let vip = ep("10.96.0.10", 53);
        let other_vip = ep("10.96.0.99", 53);
        let removed: HashSet<RemovedPair> = [(vip, ep("10.1.0.5", 5353))].into();
        let sockets = [
            // Sent through the VIP: doomed.
            ConnectedUdp {
                cookie: 1,
                peer: "10.1.0.5:5353".parse().expect("addr"),
            },
            // Connected to the pod IP itself: no reverse entry.
            ConnectedUdp {
                cookie: 2,
                peer: "10.1.0.5:5353".parse().expect("addr"),
            },
            // Sent there through another Service that keeps the backend.
            ConnectedUdp {
                cookie: 3,
                peer: "10.1.0.5:5353".parse().expect("addr"),
            },
            // An IPv6 socket sent to the IPv4 VIP: a v4-mapped peer.
            ConnectedUdp {
                cookie: 4,
                peer: "[::ffff:10.1.0.5]:5353".parse().expect("addr"),
            },
            // Another backend.
            ConnectedUdp {
                cookie: 5,
                peer: "10.1.0.6:5353".parse().expect("addr"),
            },
        ];
        let doomed = doomed_cookies(&sockets, &removed, |key| match key.cookie {
            1 | 4 | 5 => Some(vip),
            3 => Some(other_vip),
            _ => None,
        });
        assert_eq!(doomed, vec![1, 4]);
    }
}
