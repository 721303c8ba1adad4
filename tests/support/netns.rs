//! Network namespaces as pods, for tests that run inside the VM (`cargo xtask vm-test`).
//!
//! Include with `#[path = "support/netns.rs"] mod netns;`. What it owns:
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
//! - [`tcp_ask`], [`udp_ask`], [`TcpSession`]: clients in the root namespace.
//!
//! Everything is removed on drop, also when a test panics. Names are prefixed with `tp` so
//! leftovers are recognisable.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `ip` from iproute2; busybox's applet would shadow it on PATH inside the VM.
pub const IP: &str = "/usr/sbin/ip";
/// How long a client waits for an answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

const POD_CIDR_ANCHOR: &str = "10.244.255.254/16";
const ANCHOR_LINK: &str = "tp-pods";
const GATEWAY: &str = "169.254.1.1";

/// Runs a command, panicking with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and ignores its outcome (cleanup paths).
pub fn sh_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

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
    /// `/run/netns/<netns>`, for `setns` and `nsenter --net=`.
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns())
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
            let mut full = vec!["--net=".to_owned() + &pod.netns_path(), IP.to_owned()];
            full.extend(args.iter().map(|a| (*a).to_owned()));
            let full: Vec<&str> = full.iter().map(String::as_str).collect();
            sh("nsenter", &full);
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
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.netns_path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread inside the pod panicked")
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

/// Connects to `address`, returns the name in the server's greeting.
pub fn tcp_ask(address: SocketAddr) -> std::io::Result<String> {
    let session = TcpSession::connect(address)?;
    Ok(session.greeting)
}

/// Sends one datagram from a fresh source port (a new IPVS connection each time) and returns
/// the answer.
pub fn udp_ask(address: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    socket.send_to(b"?", address)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A long-lived TCP connection to a backend.
pub struct TcpSession {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The backend that accepted the connection.
    pub greeting: String,
}

impl TcpSession {
    /// Connects and reads the greeting.
    pub fn connect(address: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&address, ANSWER_TIMEOUT)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut greeting = String::new();
        reader.read_line(&mut greeting)?;
        if greeting.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the greeting",
            ));
        }
        Ok(Self {
            stream,
            reader,
            greeting: greeting.trim().to_owned(),
        })
    }

    /// Sends one line and returns the backend's answer.
    pub fn ask(&mut self) -> std::io::Result<String> {
        writeln!(self.stream, "ping")?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        if answer.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(answer.trim().to_owned())
    }

    /// Closes with a reset (SO_LINGER 0), so IPVS drops the connection after its short CLOSE
    /// timeout instead of keeping it in TIME_WAIT for two minutes.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket fd and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(self.reader);
        drop(self.stream);
    }
}

/// Polls `check` until it returns `Ok` or `timeout` passes; panics with the last error.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {timeout:?}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
