//! `kube-ipvs0` over rtnetlink and the IPVS sysctls, live. Dummy links and `net.ipv4.vs.*` do
//! not exist on the host kernel: these run inside the VM (`cargo xtask vm-test`), as root.
//!
//! Each test runs on its own thread in a fresh network namespace (`unshare(CLONE_NEWNET)` on
//! that thread), so links, addresses and sysctls vanish with the thread, even on failure.

#[path = "support/netns.rs"]
mod netns;
#[path = "support/process.rs"]
mod process;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use topoproxy::dataplane::ipvs::conntrack;
use topoproxy::dataplane::ipvs::link::{DummyLink, LinkError, DUMMY_LINK};
use topoproxy::dataplane::ipvs::sysctl::{SysctlError, Sysctls};
use topoproxy::model::{IpFamily, Protocol};

/// Runs `body` on a new thread that first moves into a new, empty network namespace, with a
/// current-thread tokio runtime so every socket and task stays in that namespace.
fn in_fresh_netns<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests need root (they run inside the VM)"
    );
    let thread = std::thread::spawn(move || {
        netns::enter_fresh();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(body());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip` in the calling thread's namespace (a child forked from a thread inherits it).
fn ip(args: &[&str]) -> String {
    process::sh(netns::IP, args)
}

fn addr(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn find_on_a_missing_link_is_none() {
    in_fresh_netns(|| async {
        let found = DummyLink::find(DUMMY_LINK).await.expect("find");
        assert!(found.is_none(), "{found:?}");
        let found = DummyLink::find("tp-nosuch0").await.expect("find");
        assert!(found.is_none(), "{found:?}");
    });
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn ensure_creates_a_down_dummy_once_and_delete_removes_it() {
    in_fresh_netns(|| async {
        let link = DummyLink::ensure(DUMMY_LINK).await.expect("ensure");
        assert_eq!(link.name(), DUMMY_LINK);
        assert!(link.index() > 1, "index {}", link.index());
        assert!(link.is_dummy().await.expect("kind"), "not a dummy");
        assert!(!link.is_up().await.expect("flags"), "created up");

        let shown = ip(&["-d", "-o", "link", "show", "dev", DUMMY_LINK]);
        assert!(shown.contains("dummy"), "{shown}");
        assert!(shown.contains("state DOWN"), "{shown}");

        // Ensuring again finds the same link instead of failing or making another.
        let again = DummyLink::ensure(DUMMY_LINK).await.expect("ensure again");
        assert_eq!(again.index(), link.index());
        let found = DummyLink::find(DUMMY_LINK)
            .await
            .expect("find")
            .expect("link exists");
        assert_eq!(found.index(), link.index());
        assert_eq!(
            ip(&["-o", "link", "show", "type", "dummy"]).lines().count(),
            1
        );

        link.delete().await.expect("delete");
        assert!(DummyLink::find(DUMMY_LINK).await.expect("find").is_none());
        assert!(!ip(&["-o", "link", "show"]).contains(DUMMY_LINK));
        // Deleting through a second handle to the now-gone link is not an error.
        again.delete().await.expect("delete a gone link");
    });
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn binds_lists_and_unbinds_v4_and_v6_while_the_link_stays_down() {
    in_fresh_netns(|| async {
        ip(&["link", "set", "lo", "up"]);
        // A node address elsewhere, as the dataplane meets them (a VIP that is also a node IP).
        ip(&["addr", "add", "192.0.2.7/32", "dev", "lo"]);

        let link = DummyLink::ensure(DUMMY_LINK).await.expect("ensure");
        let vips = [addr("10.96.0.10"), addr("10.96.0.11"), addr("fd00:96::10")];
        for vip in vips {
            link.add_address(vip).await.expect("bind");
        }
        // Binding again is not an error.
        for vip in vips {
            link.add_address(vip).await.expect("bind again");
        }
        assert_eq!(
            link.addresses().await.expect("list"),
            vips.into_iter().collect::<BTreeSet<_>>()
        );

        let shown = ip(&["-o", "addr", "show", "dev", DUMMY_LINK]);
        assert!(shown.contains("inet 10.96.0.10/32"), "{shown}");
        assert!(shown.contains("inet 10.96.0.11/32"), "{shown}");
        assert!(shown.contains("inet6 fd00:96::10/128"), "{shown}");
        assert!(!shown.contains("tentative"), "{shown}");

        let elsewhere = link.addresses_elsewhere().await.expect("elsewhere");
        for node in ["127.0.0.1", "::1", "192.0.2.7"] {
            assert!(
                elsewhere.contains(&addr(node)),
                "{node} missing: {elsewhere:?}"
            );
        }
        for vip in vips {
            assert!(!elsewhere.contains(&vip), "{vip} listed elsewhere");
        }

        // The link stays down, yet the kernel treats the VIPs as local at once (no DAD wait).
        assert!(
            !link.is_up().await.expect("flags"),
            "binding set the link up"
        );
        for vip in [addr("10.96.0.10"), addr("fd00:96::10")] {
            assert_local_delivery(vip);
            let route = ip(&["route", "get", &vip.to_string()]);
            assert!(route.starts_with("local "), "{vip}: {route}");
        }

        link.delete_address(addr("10.96.0.11"))
            .await
            .expect("unbind v4");
        link.delete_address(addr("fd00:96::10"))
            .await
            .expect("unbind v6");
        // Unbinding what is gone, or never was, is not an error.
        link.delete_address(addr("10.96.0.11"))
            .await
            .expect("unbind v4 again");
        link.delete_address(addr("fd00:96::10"))
            .await
            .expect("unbind v6 again");
        link.delete_address(addr("10.96.9.9"))
            .await
            .expect("unbind unknown");
        assert_eq!(
            link.addresses().await.expect("list"),
            BTreeSet::from([addr("10.96.0.10")])
        );
        let shown = ip(&["-o", "addr", "show", "dev", DUMMY_LINK]);
        assert!(!shown.contains("10.96.0.11"), "{shown}");
        assert!(!shown.contains("fd00:96::10"), "{shown}");
        // The node address elsewhere was left alone.
        assert!(ip(&["-o", "addr", "show", "dev", "lo"]).contains("192.0.2.7/32"));

        link.delete().await.expect("delete");
    });
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn binding_on_a_missing_link_names_link_and_address() {
    in_fresh_netns(|| async {
        let link = DummyLink::ensure(DUMMY_LINK).await.expect("ensure");
        let stale = DummyLink::find(DUMMY_LINK)
            .await
            .expect("find")
            .expect("exists");
        link.delete().await.expect("delete");
        let error = stale
            .add_address(addr("10.96.0.10"))
            .await
            .expect_err("bind on a deleted link");
        assert!(matches!(error, LinkError::AddAddress { .. }), "{error:?}");
        assert_eq!(error.errno(), Some(libc::ENODEV), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(DUMMY_LINK) && message.contains("10.96.0.10"),
            "{message}"
        );
    });
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn ipv6_vip_is_usable_at_once_even_if_someone_set_the_link_up() {
    in_fresh_netns(|| async {
        ip(&["link", "set", "lo", "up"]);
        let link = DummyLink::ensure(DUMMY_LINK).await.expect("ensure");
        // An administrator or another tool set it up. A dummy link is NOARP, so the kernel
        // skips duplicate address detection anyway; IFA_F_NODAD keeps that true for a
        // same-named link of another kind. Either way the VIP must not sit tentative.
        ip(&["link", "set", DUMMY_LINK, "up"]);
        let vip = addr("fd00:96::20");
        link.add_address(vip).await.expect("bind");
        let shown = ip(&["-o", "addr", "show", "dev", DUMMY_LINK]);
        assert!(shown.contains("inet6 fd00:96::20/128"), "{shown}");
        assert!(!shown.contains("tentative"), "{shown}");
        assert!(
            shown.contains("inet6 fe80:"),
            "no link-local to leave out: {shown}"
        );
        assert_local_delivery(vip);
        // The kernel's own link-local address on an up link is not reported as a VIP.
        assert_eq!(link.addresses().await.expect("list"), BTreeSet::from([vip]));
        link.delete().await.expect("delete");
    });
}

/// A datagram sent to `vip` reaches a socket bound on it, inside this namespace.
fn assert_local_delivery(vip: IpAddr) {
    let server = UdpSocket::bind(SocketAddr::new(vip, 5353))
        .unwrap_or_else(|error| panic!("bind {vip}:5353: {error}"));
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let unspecified: IpAddr = if vip.is_ipv4() {
        addr("0.0.0.0")
    } else {
        addr("::")
    };
    let client = UdpSocket::bind(SocketAddr::new(unspecified, 0)).expect("client socket");
    client
        .send_to(b"ping", SocketAddr::new(vip, 5353))
        .unwrap_or_else(|error| panic!("send to {vip}: {error}"));
    let mut buffer = [0u8; 16];
    let (length, _) = server
        .recv_from(&mut buffer)
        .unwrap_or_else(|error| panic!("receive on {vip}: {error}"));
    assert_eq!(&buffer[..length], b"ping");
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn sysctl_sets_ipvs_conntrack_in_this_namespace_only() {
    let outside = Sysctls::proc()
        .read("net.ipv4.vs.conntrack")
        .expect("ip_vs is loaded in the VM");
    in_fresh_netns(|| async {
        let sysctls = Sysctls::proc();
        // A new namespace starts with the kernel default.
        assert_eq!(sysctls.read("net.ipv4.vs.conntrack").expect("read"), "0");
        assert!(sysctls.ensure("net.ipv4.vs.conntrack", "1").expect("set"));
        assert_eq!(sysctls.read("net.ipv4.vs.conntrack").expect("read"), "1");
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/vs/conntrack").expect("read file"),
            "1\n"
        );
        assert!(!sysctls.ensure("net.ipv4.vs.conntrack", "1").expect("again"));
        // The free function does the same against /proc/sys.
        assert!(
            !topoproxy::dataplane::ipvs::sysctl::ensure("net.ipv4.vs.conntrack", "1")
                .expect("free function")
        );

        let error = sysctls
            .ensure("net.ipv4.vs.no_such_key", "1")
            .expect_err("missing key");
        assert!(matches!(error, SysctlError::Missing { .. }), "{error:?}");
    });
    assert_eq!(
        Sysctls::proc().read("net.ipv4.vs.conntrack").expect("read"),
        outside,
        "the namespace's setting leaked out"
    );
}

/// Unmounts and removes a mount point on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Ok(path) = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn sysctl_on_read_only_proc_sys_names_key_value_and_remedy() {
    in_fresh_netns(|| async {
        // A private mount namespace for this thread, then /proc/sys bound read-only, as an
        // unprivileged container sees it.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        let root = std::ffi::CString::new("/").expect("cstr");
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "make / private: {}", std::io::Error::last_os_error());
        let target = std::env::temp_dir().join(format!("tp-ro-sys-{}", std::process::id()));
        std::fs::create_dir_all(&target).expect("mount point");
        let guard = MountGuard(target.clone());
        let source = std::ffi::CString::new("/proc/sys").expect("cstr");
        let target_c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).expect("cstr");
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "bind /proc/sys: {}", std::io::Error::last_os_error());
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target_c.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(
            rc,
            0,
            "remount read-only: {}",
            std::io::Error::last_os_error()
        );

        let sysctls = Sysctls::at(&target);
        assert_eq!(sysctls.read("net.ipv4.vs.conntrack").expect("read"), "0");
        // Already right: nothing to write, so a read-only tree is fine.
        assert!(!sysctls.ensure("net.ipv4.vs.conntrack", "0").expect("no-op"));
        let error = sysctls
            .ensure("net.ipv4.vs.conntrack", "1")
            .expect_err("read-only");
        assert!(matches!(error, SysctlError::ReadOnly { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("net.ipv4.vs.conntrack=1"), "{message}");
        assert!(message.contains("privileged"), "{message}");
        drop(guard);
    });
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
struct NamedNetns(String);

impl NamedNetns {
    fn new(name: String) -> Self {
        // A leftover of an earlier run in this VM boot would make `add` fail.
        if std::path::Path::new(&format!("/run/netns/{name}")).exists() {
            ip(&["netns", "del", &name]);
        }
        ip(&["netns", "add", &name]);
        Self(name)
    }

    /// Runs `f` on a thread that entered this namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        netns::within(&self.0, f)
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn ipvsadm(args: &[&str]) {
    process::sh("/usr/sbin/ipvsadm", args);
}

/// The production path end to end: IPVS (masquerade, `net.ipv4.vs.conntrack=1`) writes its
/// UDP translations into conntrack, and `flush_backend` removes exactly one real server's.
#[test]
#[ignore = "needs IPVS: runs inside the VM (cargo xtask vm-test)"]
fn conntrack_flush_removes_one_real_servers_ipvs_entries() {
    in_fresh_netns(|| async {
        ip(&["link", "set", "lo", "up"]);
        let backends = NamedNetns::new(format!("tpvb-{}", std::process::id()));
        ip(&[
            "link",
            "add",
            "tpv0",
            "type",
            "veth",
            "peer",
            "name",
            "tpv1",
            "netns",
            &backends.0,
        ]);
        ip(&["addr", "add", "10.244.0.1/24", "dev", "tpv0"]);
        ip(&["link", "set", "tpv0", "up"]);
        let real_servers = [addr("10.244.0.2"), addr("10.244.0.3")];
        let sockets = backends.enter(|| {
            ip(&["link", "set", "lo", "up"]);
            for server in real_servers {
                ip(&["addr", "add", &format!("{server}/24"), "dev", "tpv1"]);
            }
            ip(&["link", "set", "tpv1", "up"]);
            real_servers.map(|server| {
                let socket = UdpSocket::bind(SocketAddr::new(server, 5353)).expect("bind backend");
                socket.set_nonblocking(true).expect("nonblocking");
                socket
            })
        });

        assert!(Sysctls::proc()
            .ensure("net.ipv4.vs.conntrack", "1")
            .expect("sysctl"));
        let link = DummyLink::ensure(DUMMY_LINK).await.expect("ensure");
        let vip = SocketAddr::new(addr("10.96.0.10"), 53);
        link.add_address(vip.ip()).await.expect("bind VIP");
        // Conntrack hooks run in a namespace only once something there needs them (an nft
        // nat/ct rule: topoproxy's own table, on a real node). IPVS itself asks for them only
        // for FTP (port 21) masquerade services, which is the one way to switch them on here
        // without nft in the VM.
        ipvsadm(&["-A", "-t", "10.96.0.99:21", "-s", "rr"]);
        ipvsadm(&["-a", "-t", "10.96.0.99:21", "-r", "10.244.0.2:21", "-m"]);
        ipvsadm(&["-A", "-u", "10.96.0.10:53", "-s", "rr"]);
        for server in real_servers {
            ipvsadm(&[
                "-a",
                "-u",
                "10.96.0.10:53",
                "-r",
                &format!("{server}:5353"),
                "-m",
            ]);
        }

        // Six flows from six source ports; rr spreads them over both real servers.
        let mut chosen = BTreeSet::new();
        for port in 40000..40006u16 {
            let client =
                UdpSocket::bind(SocketAddr::new(addr("10.244.0.1"), port)).expect("client");
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            client.send_to(b"query", vip).expect("send");
            let (index, from) = receive_on_any(&sockets);
            sockets[index].send_to(b"answer", from).expect("answer");
            let mut buffer = [0u8; 16];
            let (_, answered_by) = client.recv_from(&mut buffer).expect("client receive");
            assert_eq!(answered_by, vip, "the answer did not come from the VIP");
            chosen.insert((port, SocketAddr::new(real_servers[index], 5353)));
        }

        let seen = || -> BTreeSet<(u16, SocketAddr)> {
            conntrack::dump(IpFamily::V4)
                .expect("dump")
                .into_iter()
                .filter(|entry| entry.protocol == libc::IPPROTO_UDP as u8)
                .filter(|entry| entry.original.destination == vip)
                .map(|entry| (entry.original.source.port(), entry.reply.source))
                .collect()
        };
        assert_eq!(
            seen(),
            chosen,
            "IPVS did not leave its translations in conntrack"
        );

        let gone = SocketAddr::new(real_servers[0], 5353);
        let expected_gone = chosen.iter().filter(|(_, server)| *server == gone).count();
        assert!(
            expected_gone > 0 && expected_gone < chosen.len(),
            "rr did not spread: {chosen:?}"
        );
        let flushed =
            conntrack::flush_backend(Protocol::Udp, vip.ip(), 53, gone.ip(), 5353).expect("flush");
        assert_eq!(flushed, expected_gone);
        chosen.retain(|(_, server)| *server != gone);
        assert_eq!(seen(), chosen);

        ipvsadm(&["-C"]);
        link.delete().await.expect("delete link");
    });
}

/// Waits up to five seconds for a datagram on any of `sockets`.
fn receive_on_any(sockets: &[UdpSocket]) -> (usize, SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut buffer = [0u8; 16];
    loop {
        for (index, socket) in sockets.iter().enumerate() {
            match socket.recv_from(&mut buffer) {
                Ok((_, from)) => return (index, from),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("backend receive: {error}"),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no real server got the datagram"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
