//! Network namespaces as pods, for tests that run inside the VM (`cargo xtask vm-test`).
//!
//! Include with `#[path = "support/pods.rs"] mod pods;` beside `process.rs`, `netns.rs` and
//! `traffic.rs` (whose `tcp_ask`, `udp_ask` and `TcpSession` ask these backends). What it
//! owns:
//!
//! - [`PodNetwork`]: a dummy link holding `10.244.255.254/16` in the VM's root namespace, so
//!   IPVS accepts any pod address as a unicast real server (it refuses addresses without a
//!   route: "address not unicast").
//! - [`Pod`]: a namespace joined to the root namespace by a veth pair, Calico style: the pod
//!   holds its address as a /32 with a default route via a link-local gateway address that
//!   the host side of the veth holds, and the root namespace routes the /32 to the veth. Packets
//!   IPVS rewrites to the pod arrive, and replies come back through IPVS to the client.
//! - [`Backend`]: TCP and UDP servers bound inside a pod (sockets created on a thread that
//!   `setns()`-ed into it) that answer every request with the pod's name, so a client knows
//!   which backend served it.
//!
//! Everything is removed on drop, also when a test panics. Names are prefixed with `tp` so
//! leftovers are recognisable.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::{ip_in, IP};
use crate::process::{sh, sh_quiet};

const POD_CIDR_ANCHOR: &str = "10.244.255.254/16";
const ANCHOR_LINK: &str = "tp-pods";
const GATEWAY: &str = "169.254.1.1";

/// The route that makes every pod address a unicast destination for IPVS.
pub struct PodNetwork {
    _private: (),
}

impl PodNetwork {
    /// Creates the anchor link (replacing a leftover one).
    pub fn new() -> Self {
        sh_quiet(IP, &["link", "del", ANCHOR_LINK]);
        sh(IP, &["link", "add", ANCHOR_LINK, "type", "dummy"]);
        sh(IP, &["addr", "add", POD_CIDR_ANCHOR, "dev", ANCHOR_LINK]);
        sh(IP, &["link", "set", ANCHOR_LINK, "up"]);
        Self { _private: () }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        sh_quiet(IP, &["link", "del", ANCHOR_LINK]);
    }
}

/// A network namespace with one address, reachable from the root namespace.
pub struct Pod {
    /// Short name (at most 9 characters: it becomes part of interface names).
    pub name: String,
    /// The pod's address.
    pub address: Ipv4Addr,
}

impl Pod {
    fn netns(&self) -> String {
        format!("tp-{}", self.name)
    }
    fn host_link(&self) -> String {
        format!("tpv-{}", self.name)
    }

    /// Creates the namespace, the veth pair, addresses and routes.
    pub fn new(name: &str, address: Ipv4Addr) -> Self {
        assert!(name.len() <= 9, "pod name {name} too long for a link name");
        let pod = Self {
            name: name.to_owned(),
            address,
        };
        let netns = pod.netns();
        let host = pod.host_link();
        sh_quiet(IP, &["netns", "del", &netns]);
        sh(IP, &["netns", "add", &netns]);
        sh(
            IP,
            &[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        let inside = |args: &[&str]| {
            ip_in(&netns, args);
        };
        let cidr = format!("{address}/32");
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &cidr, "dev", "eth0"]);
        inside(&["link", "set", "eth0", "up"]);
        inside(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"]);
        inside(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"]);
        sh(IP, &["link", "set", &host, "up"]);
        // The host side owns the pod's gateway address, so it answers the pod's ARP for it
        // (proxy ARP would need a route to the gateway, which the VM lacks).
        sh(IP, &["addr", "add", &format!("{GATEWAY}/32"), "dev", &host]);
        sh(IP, &["route", "add", &cidr, "dev", &host]);
        pod
    }

    /// Runs `f` on a thread that entered this pod's network namespace; sockets it creates
    /// stay in the namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        crate::netns::within(self.netns(), f)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, the peer and the /32 route with it.
        sh_quiet(IP, &["link", "del", &self.host_link()]);
        sh_quiet(IP, &["netns", "del", &self.netns()]);
    }
}

/// TCP and UDP servers inside a pod answering with the pod's name.
pub struct Backend {
    /// The pod's name, which every answer carries.
    pub name: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Serves TCP on `tcp_port` and UDP on `udp_port` inside `pod`.
    ///
    /// TCP: on connect the server sends `NAME\n`, then answers every line with `NAME\n` until
    /// the client closes. UDP: every datagram is answered with `NAME`.
    pub fn start(pod: &Pod, tcp_port: u16, udp_port: u16) -> Self {
        let (listener, udp) = pod.within(move || {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, tcp_port))
                .expect("binding the backend's TCP port");
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, udp_port))
                .expect("binding the backend's UDP port");
            (listener, udp)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let name = pod.name.clone();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("UDP read timeout");
        let tcp_thread = {
            let stop = Arc::clone(&stop);
            let name = name.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let name = name.clone();
                            let stop = Arc::clone(&stop);
                            std::thread::spawn(move || serve_tcp(stream, &name, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = Arc::clone(&stop);
            let name = name.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(name.as_bytes(), peer);
                    }
                }
            })
        };
        Self {
            name,
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

fn serve_tcp(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    if writeln!(writer, "{name}").is_err() {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(writer, "{name}").is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
