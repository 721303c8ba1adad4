//! The IPVS dataplane: virtual servers over generic netlink, VIPs on `kube-ipvs0`, and the
//! few things IPVS cannot do (masquerade, hairpin, reject) in topoproxy's nftables table.

pub mod adopt;
pub mod cleanup;
pub mod commands;
pub mod conntrack;
pub mod dataplane;
pub mod drain;
#[cfg(test)]
pub(crate) mod fake;
pub mod inspect;
pub mod kernel;
pub mod link;
pub mod netlink;
pub mod nft;
pub mod records;
pub mod sysctl;

pub use dataplane::{IpvsDataplane, IpvsSettings};
pub use kernel::{IpvsKernel, RealKernel};
