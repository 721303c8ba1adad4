//! The SNAT port range kept out of the node's own ephemeral ports.
//!
//! The tc programs SNAT flows to remote backends with source ports from `snat-port-range`
//! (61000-65535 by default, just above Linux's default `ip_local_port_range`). A host whose
//! `ip_local_port_range` was widened over it would hand the same ports to its own sockets, and
//! a reply to one would be taken for an SNATed flow. So the range goes into
//! `net.ipv4.ip_local_reserved_ports`, merged with what is there (the kernel then never picks
//! those ports for an ephemeral bind; explicit binds still work), and leaves it on
//! `topoproxy cleanup`. The list is parsed and printed here (pure); [`Sysctls`] reads and
//! writes it.

use crate::dataplane::ipvs::sysctl::{SysctlError, Sysctls};

/// The sysctl, per network namespace.
pub const SYSCTL: &str = "net.ipv4.ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum ReservedPortsError {
    #[error("{SYSCTL} holds {0:?}, not a port list")]
    Unparsable(String),
    #[error("updating {SYSCTL} failed")]
    Sysctl(#[source] SysctlError),
}

/// One bit per port.
struct PortSet(Vec<bool>);

impl PortSet {
    /// The kernel's list format: `8080,9100-9199`, ranges inclusive; empty means none.
    fn parse(list: &str) -> Option<Self> {
        let mut ports = vec![false; 1 << 16];
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (low.trim().parse::<u16>().ok()?, high.trim().parse().ok()?),
                None => {
                    let port = item.parse::<u16>().ok()?;
                    (port, port)
                }
            };
            if low > high {
                return None;
            }
            ports[usize::from(low)..=usize::from(high)].fill(true);
        }
        Some(Self(ports))
    }

    /// As the kernel prints it: ascending, runs as ranges, single ports alone.
    fn format(&self) -> String {
        let mut items = Vec::new();
        let mut port = 0usize;
        while port < self.0.len() {
            if !self.0[port] {
                port += 1;
                continue;
            }
            let start = port;
            while port + 1 < self.0.len() && self.0[port + 1] {
                port += 1;
            }
            items.push(if start == port {
                start.to_string()
            } else {
                format!("{start}-{port}")
            });
            port += 1;
        }
        items.join(",")
    }

    fn set(&mut self, (min, max): (u16, u16), reserved: bool) {
        self.0[usize::from(min)..=usize::from(max)].fill(reserved);
    }
}

/// `list` with `range` added; `None` if `list` is not a port list.
pub fn with_range(list: &str, range: (u16, u16)) -> Option<String> {
    let mut ports = PortSet::parse(list)?;
    ports.set(range, true);
    Some(ports.format())
}

/// `list` with `range` taken out (ports of it reserved by someone else too are released as
/// well: the kernel keeps no owner); `None` if `list` is not a port list.
pub fn without_range(list: &str, range: (u16, u16)) -> Option<String> {
    let mut ports = PortSet::parse(list)?;
    ports.set(range, false);
    Some(ports.format())
}

fn update(
    sysctls: &Sysctls,
    change: impl Fn(&str) -> Option<String>,
) -> Result<bool, ReservedPortsError> {
    let current = sysctls.read(SYSCTL).map_err(ReservedPortsError::Sysctl)?;
    let wanted = change(&current).ok_or(ReservedPortsError::Unparsable(current))?;
    sysctls
        .ensure(SYSCTL, &wanted)
        .map_err(ReservedPortsError::Sysctl)
}

/// Adds `range` to the reserved ports; returns whether it wrote.
pub fn reserve(sysctls: &Sysctls, range: (u16, u16)) -> Result<bool, ReservedPortsError> {
    update(sysctls, |list| with_range(list, range))
}

/// Takes `range` out of the reserved ports; returns whether it wrote.
pub fn release(sysctls: &Sysctls, range: (u16, u16)) -> Result<bool, ReservedPortsError> {
    update(sysctls, |list| without_range(list, range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_merges_with_what_is_there_as_the_kernel_prints_it() {
        assert_eq!(
            with_range("", (61000, 65535)).as_deref(),
            Some("61000-65535")
        );
        assert_eq!(
            with_range("8080,60990-61005", (61000, 65535)).as_deref(),
            Some("8080,60990-65535")
        );
        assert_eq!(
            with_range("100, 200-300,301", (40000, 40000)).as_deref(),
            Some("100,200-301,40000")
        );
        assert_eq!(
            with_range("61000-65535", (61000, 65535)).as_deref(),
            Some("61000-65535")
        );
    }

    #[test]
    fn release_takes_out_only_the_range() {
        assert_eq!(
            without_range("8080,60990-65535", (61000, 65535)).as_deref(),
            Some("8080,60990-60999")
        );
        assert_eq!(
            without_range("61000-65535", (61000, 65535)).as_deref(),
            Some("")
        );
        assert_eq!(without_range("", (61000, 65535)).as_deref(), Some(""));
    }

    #[test]
    fn garbage_is_refused_not_overwritten() {
        for bad in ["x", "10-5", "70000", "1-2-3"] {
            assert_eq!(with_range(bad, (1, 2)), None, "{bad:?}");
        }
    }

    #[test]
    fn reserve_and_release_round_trip_through_a_sysctl_tree() {
        let root =
            std::env::temp_dir().join(format!("topoproxy-reserved-ports-{}", std::process::id()));
        let file = root.join("net/ipv4/ip_local_reserved_ports");
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, "8080\n").expect("write");
        let sysctls = Sysctls::at(&root);
        assert!(reserve(&sysctls, (61000, 65535)).expect("reserve"));
        assert_eq!(sysctls.read(SYSCTL).expect("read"), "8080,61000-65535");
        assert!(
            !reserve(&sysctls, (61000, 65535)).expect("again"),
            "idempotent"
        );
        assert!(release(&sysctls, (61000, 65535)).expect("release"));
        assert_eq!(sysctls.read(SYSCTL).expect("read"), "8080");
        let _ = std::fs::remove_dir_all(&root);
    }
}
