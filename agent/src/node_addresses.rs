//! The node's own addresses, and which of them serve NodePorts.
//!
//! kube-proxy's IPVS mode looks at the host on every sync: an externalIP or load-balancer IP
//! the node already has on an interface is neither bound on `kube-ipvs0` nor filtered, and
//! without `--nodeport-addresses` NodePorts are served on every local address but
//! `kube-ipvs0`'s, loopback and IPv6 link-local ones (its `GetAllLocalAddressesExcept`). With
//! it, NodePorts are served on the local addresses inside the given CIDRs, `primary` standing
//! for the node's primary address of each family; a family the setting names no CIDR of keeps
//! every address. [`kube_proxy_node_addresses`] and [`NodePortAddresses::select`] are that
//! rule, pure; [`interface_addresses`] is the one read of the host.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::model::{IpFamily, Node};

/// `--nodeport-addresses`: kube-proxy's syntax, CIDRs and the word `primary`, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodePortAddresses {
    /// The CIDRs given.
    pub cidrs: Vec<IpNetwork>,
    /// `primary` was given: the node's primary address of each family matches.
    pub primary: bool,
}

/// What is wrong with a `--nodeport-addresses` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nodeport-addresses: {0:?} is neither a CIDR nor `primary`")]
pub struct NodePortAddressesError(pub String);

impl NodePortAddresses {
    /// Parses `10.0.0.0/8, primary, fd00::/64`; empty entries are ignored, so `""` is the
    /// default (every address).
    pub fn parse(text: &str) -> Result<Self, NodePortAddressesError> {
        let mut parsed = Self::default();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            if item == "primary" {
                parsed.primary = true;
                continue;
            }
            let cidr = item
                .contains('/')
                .then(|| item.parse::<IpNetwork>().ok())
                .flatten()
                .ok_or_else(|| NodePortAddressesError(item.to_owned()))?;
            parsed.cidrs.push(cidr);
        }
        Ok(parsed)
    }

    /// The default: NodePorts on every local address.
    pub fn is_default(&self) -> bool {
        self.cidrs.is_empty() && !self.primary
    }

    /// The addresses NodePorts are served on for `node`: chosen among the host's addresses
    /// ([`Node::local_addresses`]) when the agent read them, else among the Node object's.
    pub fn select(&self, node: &Node) -> Vec<IpAddr> {
        let candidates: Vec<IpAddr> = match &node.local_addresses {
            Some(local) => local.iter().copied().collect(),
            None => node.addresses.clone(),
        };
        let mut selected = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let mut cidrs: Vec<IpNetwork> = self
                .cidrs
                .iter()
                .filter(|net| IpFamily::of(&net.ip()) == family)
                .copied()
                .collect();
            if self.primary {
                if let Some(primary) = node.addresses.iter().find(|ip| IpFamily::of(ip) == family) {
                    cidrs.push(IpNetwork::from(*primary));
                }
            }
            let in_family = candidates.iter().filter(|ip| IpFamily::of(ip) == family);
            if cidrs.is_empty() || cidrs.iter().any(|net| net.prefix() == 0) {
                selected.extend(in_family.copied());
            } else {
                selected.extend(
                    in_family
                        .filter(|ip| !ip.is_loopback())
                        .filter(|ip| cidrs.iter().any(|net| net.contains(**ip)))
                        .copied(),
                );
            }
        }
        selected
    }
}

/// kube-proxy's node address set: the addresses of every device but `except` (the dataplane's
/// own, `kube-ipvs0`), without loopback and IPv6 link-local ones. IPv4 link-local addresses
/// stay, as in kube-proxy.
pub fn kube_proxy_node_addresses(
    addresses: &[InterfaceAddress],
    except: Option<&str>,
) -> BTreeSet<IpAddr> {
    addresses
        .iter()
        .filter(|a| Some(a.name.as_str()) != except)
        .map(|a| a.address)
        .filter(counts_as_node_address)
        .collect()
}

/// Whether kube-proxy counts an address of the node's as a node address: not loopback, not
/// IPv6 link-local (IPv4 link-local counts).
pub fn counts_as_node_address(address: &IpAddr) -> bool {
    !address.is_loopback() && !is_ipv6_link_local(address)
}

/// An IPv6 link-local address (`fe80::/10`).
pub fn is_ipv6_link_local(address: &IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// One address of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The device's name.
    pub name: String,
    pub address: IpAddr,
    /// The device is up.
    pub up: bool,
    /// The device is a loopback device.
    pub loopback: bool,
}

/// Every address of every device in this network namespace (`getifaddrs`).
pub fn interface_addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = head;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name and a sockaddr of the family it says.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let address = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let flags = ifa.ifa_flags as i32;
        found.push(InterfaceAddress {
            name,
            address,
            up: flags & libc::IFF_UP != 0,
            loopback: flags & libc::IFF_LOOPBACK != 0,
        });
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn on(name: &str, address: &str) -> InterfaceAddress {
        InterfaceAddress {
            name: name.to_owned(),
            address: ip(address),
            up: true,
            loopback: name == "lo",
        }
    }

    fn node(addresses: &[&str], local: Option<&[&str]>) -> Node {
        Node {
            name: "n".to_owned(),
            zone: None,
            region: None,
            addresses: addresses.iter().map(|a| ip(a)).collect(),
            leaving: None,
            local_addresses: local.map(|l| l.iter().map(|a| ip(a)).collect()),
        }
    }

    #[test]
    fn node_addresses_leave_out_the_dummy_link_loopback_and_ipv6_link_local() {
        let host = [
            on("lo", "127.0.0.1"),
            on("lo", "::1"),
            on("eth0", "192.0.2.10"),
            on("eth0", "fe80::1"),
            on("eth0", "2001:db8::10"),
            on("eth1", "198.51.100.7"),
            on("eth1", "169.254.3.3"),
            on("kube-ipvs0", "10.96.0.1"),
        ];
        let set = kube_proxy_node_addresses(&host, Some("kube-ipvs0"));
        let expected: BTreeSet<IpAddr> =
            ["192.0.2.10", "2001:db8::10", "198.51.100.7", "169.254.3.3"]
                .iter()
                .map(|a| ip(a))
                .collect();
        assert_eq!(set, expected);
        // Without a link of its own (eBPF), every device counts.
        assert!(kube_proxy_node_addresses(&host, None).contains(&ip("10.96.0.1")));
    }

    #[test]
    fn the_default_serves_every_local_address() {
        let node = node(
            &["192.0.2.10"],
            Some(&["192.0.2.10", "198.51.100.7", "2001:db8::10"]),
        );
        assert_eq!(
            NodePortAddresses::default().select(&node),
            vec![ip("192.0.2.10"), ip("198.51.100.7"), ip("2001:db8::10")]
        );
    }

    #[test]
    fn without_a_host_view_the_node_objects_addresses_serve() {
        let node = node(&["192.0.2.10", "203.0.113.5"], None);
        assert_eq!(
            NodePortAddresses::default().select(&node),
            vec![ip("192.0.2.10"), ip("203.0.113.5")]
        );
    }

    #[test]
    fn cidrs_narrow_their_family_only_and_primary_is_the_nodes_first_address() {
        let node = node(
            &["192.0.2.10", "2001:db8::10"],
            Some(&[
                "192.0.2.10",
                "198.51.100.7",
                "2001:db8::10",
                "2001:db8:1::7",
            ]),
        );
        let v4_only = NodePortAddresses::parse("198.51.100.0/24").expect("valid");
        assert_eq!(
            v4_only.select(&node),
            vec![ip("198.51.100.7"), ip("2001:db8::10"), ip("2001:db8:1::7")]
        );
        let primary = NodePortAddresses::parse(" primary ,").expect("valid");
        assert_eq!(
            primary.select(&node),
            vec![ip("192.0.2.10"), ip("2001:db8::10")]
        );
        let zero = NodePortAddresses::parse("0.0.0.0/0,primary").expect("valid");
        assert_eq!(
            zero.select(&node),
            vec![ip("192.0.2.10"), ip("198.51.100.7"), ip("2001:db8::10")]
        );
    }

    #[test]
    fn a_value_that_is_neither_a_cidr_nor_primary_is_refused() {
        for bad in ["10.0.0.1", "eth0", "10.0.0.0/33", "secondary"] {
            let error = NodePortAddresses::parse(bad).expect_err(bad);
            assert!(error.to_string().contains(bad), "{error}");
        }
        assert!(NodePortAddresses::parse("").expect("empty").is_default());
    }
}
