//! The kernel settings IPVS mode needs, written only when they differ.
//!
//! Owns the list of sysctls kube-proxy's IPVS mode sets (so a node moved from kube-proxy to
//! topoproxy keeps the same kernel behaviour) and the read-compare-write against `/proc/sys`.
//! The root is injectable ([`Sysctls::at`]) so the logic is tested against a plain directory.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where the kernel exposes sysctls.
pub const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The name is empty, absolute or has an empty or `..` component.
    #[error("sysctl {name:?}: not a valid sysctl name")]
    InvalidName { name: String },
    /// The key does not exist: a module that provides it is not loaded, or the kernel lacks it.
    #[error("sysctl {name}: no such key ({}){hint}", path.display())]
    Missing {
        name: String,
        path: PathBuf,
        /// Why it may be missing, when we know (empty otherwise).
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    /// `/proc/sys` is mounted read-only (an unprivileged container) or the write was refused.
    #[error(
        "cannot set sysctl {name}={value}: {} is read-only here; run topoproxy's privileged \
         component, or set {name}={value} on the host",
        path.display()
    )]
    ReadOnly {
        name: String,
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {name}: reading {} failed", path.display())]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sysctl {name}: writing {value:?} to {} failed", path.display())]
    Write {
        name: String,
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel accepted the write but reads back something else (it clamps some values).
    #[error("sysctl {name}: wrote {wanted:?} but the kernel holds {got:?}")]
    NotApplied {
        name: String,
        wanted: String,
        got: String,
    },
}

/// One setting: a dotted name and the value IPVS mode wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sysctl {
    pub name: &'static str,
    pub value: &'static str,
}

/// What kube-proxy's IPVS mode always sets (`pkg/proxy/ipvs/proxier.go`, `NewProxier`).
pub const IPVS_SYSCTLS: &[Sysctl] = &[
    // IPVS writes its translation into conntrack, so nftables masquerade and conntrack
    // clean-up see IPVS flows.
    Sysctl {
        name: "net.ipv4.vs.conntrack",
        value: "1",
    },
    // A packet of a connection whose real server was deleted drops the connection at once
    // instead of black-holing until it times out.
    Sysctl {
        name: "net.ipv4.vs.expire_nodest_conn",
        value: "1",
    },
    // Persistence templates pointing at a weight-0 (quiescent) server expire, so new
    // connections of a sticky client move to a live server.
    Sysctl {
        name: "net.ipv4.vs.expire_quiescent_template",
        value: "1",
    },
    Sysctl {
        name: "net.ipv4.ip_forward",
        value: "1",
    },
];

/// What kube-proxy adds with `--ipvs-strict-arp`: do not answer or announce ARP for the VIPs on
/// `kube-ipvs0` (MetalLB's L2 mode needs it).
pub const STRICT_ARP_SYSCTLS: &[Sysctl] = &[
    Sysctl {
        name: "net.ipv4.conf.all.arp_ignore",
        value: "1",
    },
    Sysctl {
        name: "net.ipv4.conf.all.arp_announce",
        value: "2",
    },
];

/// `net.ipv4.vs.conn_reuse_mode=0`, which kube-proxy sets only on kernels from 4.1 up to, not
/// including, 5.9: there mode 1 stalled a reused source port's new connection for a second;
/// 5.9 fixed it (kernel commit 35dfb013149f) and kube-proxy then leaves the setting alone
/// (kubernetes/kubernetes#93297).
pub const CONN_REUSE_MODE_OLD_KERNELS: Sysctl = Sysctl {
    name: "net.ipv4.vs.conn_reuse_mode",
    value: "0",
};

/// The settings IPVS mode needs on a kernel of release `kernel` (major, minor): the ones kube-proxy
/// sets, in its order. `kernel` `None` (unknown) is treated as a current kernel.
pub fn ipvs_sysctls(strict_arp: bool, kernel: Option<(u32, u32)>) -> Vec<Sysctl> {
    let mut list = IPVS_SYSCTLS.to_vec();
    if let Some(release) = kernel {
        if ((4, 1)..(5, 9)).contains(&release) {
            list.insert(1, CONN_REUSE_MODE_OLD_KERNELS);
        }
    }
    if strict_arp {
        list.extend_from_slice(STRICT_ARP_SYSCTLS);
    }
    list
}

/// Parses a kernel release (`6.1.0-31-amd64`, `5.4.0`) into (major, minor).
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A sysctl tree: `/proc/sys` in production, any directory in tests.
#[derive(Debug, Clone)]
pub struct Sysctls {
    root: PathBuf,
}

impl Default for Sysctls {
    fn default() -> Self {
        Self::proc()
    }
}

impl Sysctls {
    /// The kernel's tree, `/proc/sys`, as seen from the calling thread's network namespace.
    pub fn proc() -> Self {
        Self::at(PROC_SYS)
    }

    /// A tree rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The file behind `name`. Dotted names map dots to slashes (`net.ipv4.ip_forward` →
    /// `net/ipv4/ip_forward`); a name that already has slashes is taken as a path, as
    /// `sysctl(8)` does, so interface names with dots (`net/ipv4/conf/eth0.100/rp_filter`) work.
    pub fn path_of(&self, name: &str) -> Result<PathBuf, SysctlError> {
        let relative = if name.contains('/') {
            name.to_owned()
        } else {
            name.replace('.', "/")
        };
        let valid = !relative.is_empty()
            && !relative.starts_with('/')
            && relative
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            return Err(SysctlError::InvalidName {
                name: name.to_owned(),
            });
        }
        Ok(self.root.join(relative))
    }

    /// The current value, whitespace-normalised (multi-value keys are tab-separated).
    pub fn read(&self, name: &str) -> Result<String, SysctlError> {
        let path = self.path_of(name)?;
        read_value(name, &path)
    }

    /// Sets `name` to `value` unless it already has it; returns whether it was written.
    pub fn ensure(&self, name: &str, value: &str) -> Result<bool, SysctlError> {
        let path = self.path_of(name)?;
        let wanted = normalise(value);
        if read_value(name, &path)? == wanted {
            return Ok(false);
        }
        write_value(name, &wanted, &path)?;
        let got = read_value(name, &path)?;
        if got != wanted {
            return Err(SysctlError::NotApplied {
                name: name.to_owned(),
                wanted,
                got,
            });
        }
        tracing::info!(sysctl = name, value = %wanted, "set sysctl");
        Ok(true)
    }

    /// Ensures every setting of `list`; returns the names it wrote. Stops at the first error.
    pub fn ensure_all(&self, list: &[Sysctl]) -> Result<Vec<&'static str>, SysctlError> {
        let mut written = Vec::new();
        for sysctl in list {
            if self.ensure(sysctl.name, sysctl.value)? {
                written.push(sysctl.name);
            }
        }
        Ok(written)
    }
}

/// Sets `name` (dotted, e.g. `net.ipv4.vs.conntrack`) to `value` unless it already has it;
/// returns whether it was written.
pub fn ensure(name: &str, value: &str) -> Result<bool, SysctlError> {
    Sysctls::proc().ensure(name, value)
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`.
pub fn kernel_release() -> Result<Option<(u32, u32)>, SysctlError> {
    Sysctls::proc()
        .read("kernel.osrelease")
        .map(|release| parse_kernel_release(&release))
}

fn normalise(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hint_for(name: &str) -> &'static str {
    if name.starts_with("net.ipv4.vs.") || name.starts_with("net/ipv4/vs/") {
        ": the ip_vs module is not loaded (modprobe ip_vs)"
    } else if name.starts_with("net.bridge.") || name.starts_with("net/bridge/") {
        ": the br_netfilter module is not loaded"
    } else if name.starts_with("net.netfilter.nf_conntrack")
        || name.starts_with("net/netfilter/nf_conntrack")
    {
        ": the nf_conntrack module is not loaded (modprobe nf_conntrack)"
    } else {
        ""
    }
}

fn read_value(name: &str, path: &Path) -> Result<String, SysctlError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(normalise(&text)),
        Err(source) if source.kind() == io::ErrorKind::NotFound => Err(SysctlError::Missing {
            name: name.to_owned(),
            path: path.to_owned(),
            hint: hint_for(name),
            source,
        }),
        Err(source) => Err(SysctlError::Read {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_value(name: &str, value: &str, path: &Path) -> Result<(), SysctlError> {
    // No `create`: a key that vanished between read and write is an error, not a new file.
    let result = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        // An empty write changes nothing: an empty list sysctl (`ip_local_reserved_ports`)
        // is cleared by a lone newline, as `echo > file` does.
        .and_then(|mut file| {
            let bytes = if value.is_empty() { "\n" } else { value };
            file.write_all(bytes.as_bytes())
        });
    result.map_err(|source| {
        let read_only = matches!(
            source.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
        );
        if read_only {
            SysctlError::ReadOnly {
                name: name.to_owned(),
                value: value.to_owned(),
                path: path.to_owned(),
                source,
            }
        } else if source.kind() == io::ErrorKind::NotFound {
            SysctlError::Missing {
                name: name.to_owned(),
                path: path.to_owned(),
                hint: hint_for(name),
                source,
            }
        } else {
            SysctlError::Write {
                name: name.to_owned(),
                value: value.to_owned(),
                path: path.to_owned(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempRoot(PathBuf);

    impl TempRoot {
        fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "topoproxy-sysctl-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create temp root");
            Self(path)
        }

        fn put(&self, relative: &str, content: &str) -> PathBuf {
            let path = self.0.join(relative);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, content).expect("write");
            path
        }
    }

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn dotted_names_map_to_paths() {
        let sysctls = Sysctls::at("/r");
        assert_eq!(
            sysctls.path_of("net.ipv4.vs.conntrack").expect("valid"),
            PathBuf::from("/r/net/ipv4/vs/conntrack")
        );
        assert_eq!(
            sysctls.path_of("net.ipv4.ip_forward").expect("valid"),
            PathBuf::from("/r/net/ipv4/ip_forward")
        );
        // Slash form keeps dots inside components (VLAN interface names).
        assert_eq!(
            sysctls
                .path_of("net/ipv4/conf/eth0.100/rp_filter")
                .expect("valid"),
            PathBuf::from("/r/net/ipv4/conf/eth0.100/rp_filter")
        );
        assert_eq!(Sysctls::proc().root, PathBuf::from("/proc/sys"));
    }

    #[test]
    fn names_that_escape_the_root_are_refused() {
        let sysctls = Sysctls::at("/r");
        for bad in [
            "",
            ".",
            "net..ipv4",
            "/etc/passwd",
            "net/../../etc",
            "net.",
            ".net",
        ] {
            assert!(
                matches!(sysctls.path_of(bad), Err(SysctlError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn writes_only_when_different() {
        let root = TempRoot::new("diff");
        let file = root.put("net/ipv4/vs/conntrack", "0\n");
        let sysctls = Sysctls::at(&root.0);

        assert!(sysctls
            .ensure("net.ipv4.vs.conntrack", "1")
            .expect("ensure"));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "1");
        assert_eq!(sysctls.read("net.ipv4.vs.conntrack").expect("read"), "1");

        // Same value (the kernel's trailing newline does not count): no write, so the
        // newline, which a write would drop, is still there.
        std::fs::write(&file, "1\n").expect("reset");
        assert!(!sysctls
            .ensure("net.ipv4.vs.conntrack", "1")
            .expect("ensure"));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "1\n");
    }

    #[test]
    fn multi_value_keys_compare_whitespace_normalised() {
        let root = TempRoot::new("multi");
        let file = root.put("net/ipv4/ip_local_port_range", "32768\t60999\n");
        let sysctls = Sysctls::at(&root.0);
        assert!(!sysctls
            .ensure("net.ipv4.ip_local_port_range", "32768 60999")
            .expect("ensure"));
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            "32768\t60999\n"
        );
        assert!(sysctls
            .ensure("net.ipv4.ip_local_port_range", "1024  65000")
            .expect("ensure"));
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "1024 65000");
    }

    #[test]
    fn missing_ipvs_key_says_load_ip_vs() {
        let root = TempRoot::new("missing");
        root.put("net/ipv4/ip_forward", "1\n");
        let error = Sysctls::at(&root.0)
            .ensure("net.ipv4.vs.conntrack", "1")
            .expect_err("missing key");
        assert!(matches!(error, SysctlError::Missing { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("net.ipv4.vs.conntrack"), "{message}");
        assert!(message.contains("ip_vs module is not loaded"), "{message}");
        // And nothing was created.
        assert!(!root.0.join("net/ipv4/vs/conntrack").exists());
    }

    #[test]
    fn a_directory_is_a_read_error_not_a_value() {
        let root = TempRoot::new("dir");
        std::fs::create_dir_all(root.0.join("net/ipv4/vs")).expect("mkdir");
        let error = Sysctls::at(&root.0)
            .read("net.ipv4.vs")
            .expect_err("directory");
        assert!(matches!(error, SysctlError::Read { .. }), "{error:?}");
    }

    #[test]
    fn ensure_all_reports_what_it_wrote() {
        let root = TempRoot::new("all");
        root.put("net/ipv4/vs/conntrack", "1\n");
        root.put("net/ipv4/vs/expire_nodest_conn", "0\n");
        root.put("net/ipv4/vs/expire_quiescent_template", "0\n");
        root.put("net/ipv4/ip_forward", "1\n");
        let written = Sysctls::at(&root.0)
            .ensure_all(IPVS_SYSCTLS)
            .expect("ensure all");
        assert_eq!(
            written,
            [
                "net.ipv4.vs.expire_nodest_conn",
                "net.ipv4.vs.expire_quiescent_template"
            ]
        );
    }

    #[test]
    fn read_only_error_names_key_value_and_remedy() {
        let error = SysctlError::ReadOnly {
            name: "net.ipv4.vs.conntrack".into(),
            value: "1".into(),
            path: "/proc/sys/net/ipv4/vs/conntrack".into(),
            source: io::Error::from_raw_os_error(libc::EROFS),
        };
        let message = error.to_string();
        assert!(message.contains("net.ipv4.vs.conntrack=1"), "{message}");
        assert!(message.contains("privileged"), "{message}");
        assert!(message.contains("on the host"), "{message}");
    }

    #[test]
    fn list_follows_kube_proxy() {
        let names = |list: Vec<Sysctl>| list.iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            names(ipvs_sysctls(false, Some((6, 1)))),
            [
                "net.ipv4.vs.conntrack",
                "net.ipv4.vs.expire_nodest_conn",
                "net.ipv4.vs.expire_quiescent_template",
                "net.ipv4.ip_forward"
            ]
        );
        assert!(names(ipvs_sysctls(false, Some((5, 4)))).contains(&"net.ipv4.vs.conn_reuse_mode"));
        assert!(!names(ipvs_sysctls(false, Some((5, 9)))).contains(&"net.ipv4.vs.conn_reuse_mode"));
        assert!(!names(ipvs_sysctls(false, Some((4, 0)))).contains(&"net.ipv4.vs.conn_reuse_mode"));
        assert!(!names(ipvs_sysctls(false, None)).contains(&"net.ipv4.vs.conn_reuse_mode"));
        let strict = ipvs_sysctls(true, Some((6, 12)));
        assert!(strict.contains(&Sysctl {
            name: "net.ipv4.conf.all.arp_ignore",
            value: "1"
        }));
        assert!(strict.contains(&Sysctl {
            name: "net.ipv4.conf.all.arp_announce",
            value: "2"
        }));
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_kernel_release("6.1.0-31-amd64\n"), Some((6, 1)));
        assert_eq!(parse_kernel_release("6.12.12+bpo-amd64"), Some((6, 12)));
        assert_eq!(parse_kernel_release("5.4"), Some((5, 4)));
        assert_eq!(parse_kernel_release("4-x"), None);
        assert_eq!(parse_kernel_release("garbage"), None);
        // `6.12.12+bpo` keeps its minor: the patch part is not looked at.
        assert_eq!(parse_kernel_release("6.18.44-fc-v657"), Some((6, 18)));
    }
}
