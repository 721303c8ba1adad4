//! `kube-ipvs0`: the dummy link that holds every VIP so the kernel delivers VIP traffic locally,
//! where IPVS picks it up. Managed over rtnetlink.
//!
//! The link is left down, as kube-proxy leaves it: the kernel adds the `local` route of an
//! address whatever the link's state (checked on 6.1 and 6.12, IPv4 and IPv6), so the VIPs are
//! local while the link never answers ARP or neighbour discovery for them. VIPs are bound as
//! /32 and /128; IPv6 ones with `IFA_F_NODAD` so duplicate address detection never holds them
//! tentative (a dummy link is NOARP, which skips it anyway; the flag keeps that true for a
//! same-named link of another kind).
//!
//! Every call works in the network namespace of the thread that made the [`DummyLink`], and
//! needs a tokio runtime (the rtnetlink connection runs as a task on it).

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkDummy};

use crate::node_addresses::is_ipv6_link_local;

/// The dummy link's name, as kube-proxy's IPVS mode names it.
pub const DUMMY_LINK: &str = "kube-ipvs0";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("opening an rtnetlink socket failed")]
    Connect(#[source] std::io::Error),
    #[error("looking up link {name} failed")]
    Find {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("creating dummy link {name} failed")]
    Create {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {name} is missing right after it was created")]
    Vanished { name: String },
    #[error("listing the addresses of link {name} failed")]
    ListAddresses {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("binding {address} to link {name} failed")]
    AddAddress {
        name: String,
        address: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("unbinding {address} from link {name} failed")]
    DeleteAddress {
        name: String,
        address: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("deleting link {name} failed")]
    Delete {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("binding an address needs the dummy link, and there is none")]
    Missing,
    #[error("listing the node's addresses failed")]
    NodeAddresses(#[source] std::io::Error),
}

impl LinkError {
    /// The kernel's errno (positive), when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        let source = match self {
            Self::Find { source, .. }
            | Self::Create { source, .. }
            | Self::ListAddresses { source, .. }
            | Self::AddAddress { source, .. }
            | Self::DeleteAddress { source, .. }
            | Self::Delete { source, .. } => source,
            Self::Connect(_) | Self::Vanished { .. } | Self::Missing | Self::NodeAddresses(_) => {
                return None
            }
        };
        errno_of(source)
    }
}

/// An rtnetlink connection and the dummy link's index.
pub struct DummyLink {
    handle: Handle,
    name: String,
    index: u32,
}

impl std::fmt::Debug for DummyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DummyLink")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish()
    }
}

impl DummyLink {
    /// Finds the link `name`, creating it (as a dummy, left down) when missing.
    pub async fn ensure(name: &str) -> Result<Self, LinkError> {
        let handle = connect()?;
        if let Some(index) = find_index(&handle, name).await? {
            return Ok(Self::new(handle, name, index));
        }
        let created = handle
            .link()
            .add(LinkDummy::new(name).build())
            .execute()
            .await;
        match created {
            Ok(()) => tracing::info!(link = name, "created dummy link"),
            // Someone else created it between our look-up and our request: use theirs.
            Err(source) if errno_of(&source) == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(LinkError::Create {
                    name: name.to_owned(),
                    source,
                })
            }
        }
        match find_index(&handle, name).await? {
            Some(index) => Ok(Self::new(handle, name, index)),
            None => Err(LinkError::Vanished {
                name: name.to_owned(),
            }),
        }
    }

    /// Finds the link `name` without creating it.
    pub async fn find(name: &str) -> Result<Option<Self>, LinkError> {
        let handle = connect()?;
        Ok(find_index(&handle, name)
            .await?
            .map(|index| Self::new(handle, name, index)))
    }

    fn new(handle: Handle, name: &str, index: u32) -> Self {
        Self {
            handle,
            name: name.to_owned(),
            index,
        }
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The link's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the link is administratively up (someone ran `ip link set kube-ipvs0 up`).
    pub async fn is_up(&self) -> Result<bool, LinkError> {
        let message = self.link_message().await?;
        Ok(message.header.flags.contains(LinkFlags::Up))
    }

    /// Whether the link is of kind `dummy` (a same-named link of another kind still works, but
    /// is not what kube-proxy makes).
    pub async fn is_dummy(&self) -> Result<bool, LinkError> {
        let message = self.link_message().await?;
        Ok(message.attributes.iter().any(|attribute| {
            matches!(attribute, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|info| matches!(info, LinkInfo::Kind(InfoKind::Dummy))))
        }))
    }

    async fn link_message(&self) -> Result<LinkMessage, LinkError> {
        let find = |source| LinkError::Find {
            name: self.name.clone(),
            source,
        };
        self.handle
            .link()
            .get()
            .match_index(self.index)
            .execute()
            .try_next()
            .await
            .map_err(find)?
            .ok_or_else(|| find(rtnetlink::Error::RequestFailed))
    }

    /// Addresses bound on this link. IPv6 link-local addresses (the kernel's own, should the
    /// link be set up) are left out: they are never VIPs and must never be unbound as stale.
    pub async fn addresses(&self) -> Result<BTreeSet<IpAddr>, LinkError> {
        let messages = self.address_messages().await?;
        Ok(messages
            .iter()
            .filter(|message| message.header.index == self.index)
            .filter_map(address_of)
            .filter(|address| !is_ipv6_link_local(address))
            .collect())
    }

    /// Addresses bound on every other link of the namespace.
    pub async fn addresses_elsewhere(&self) -> Result<BTreeSet<IpAddr>, LinkError> {
        let messages = self.address_messages().await?;
        Ok(messages
            .iter()
            .filter(|message| message.header.index != self.index)
            .filter_map(address_of)
            .collect())
    }

    async fn address_messages(&self) -> Result<Vec<AddressMessage>, LinkError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::ListAddresses {
                name: self.name.clone(),
                source,
            })
    }

    /// Binds `address` as /32 or /128; binding one already there is not an error.
    pub async fn add_address(&self, address: IpAddr) -> Result<(), LinkError> {
        let mut request = self
            .handle
            .address()
            .add(self.index, address, host_prefix(&address));
        if address.is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => {
                crate::kernel_writes::done("VIP bound");
                Ok(())
            }
            Err(source) if errno_of(&source) == Some(libc::EEXIST) => Ok(()),
            Err(source) => Err(LinkError::AddAddress {
                name: self.name.clone(),
                address,
                source,
            }),
        }
    }

    /// Unbinds `address` (its /32 or /128 binding); one already gone is not an error.
    pub async fn delete_address(&self, address: IpAddr) -> Result<(), LinkError> {
        let mut message = AddressMessage::default();
        message.header.family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.header.prefix_len = host_prefix(&address);
        message.header.index = self.index;
        message.attributes.push(AddressAttribute::Local(address));
        if address.is_ipv6() {
            // IPv6 deletion matches IFA_ADDRESS; IPv4 matches IFA_LOCAL (and IFA_ADDRESS with
            // the prefix, when given). Give each what it looks at.
            message.attributes.push(AddressAttribute::Address(address));
        }
        match self.handle.address().del(message).execute().await {
            Ok(()) => {
                crate::kernel_writes::done("VIP unbound");
                Ok(())
            }
            Err(source) if errno_of(&source) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(source) => Err(LinkError::DeleteAddress {
                name: self.name.clone(),
                address,
                source,
            }),
        }
    }

    /// Deletes the link (with every address on it). One already gone is not an error.
    pub async fn delete(self) -> Result<(), LinkError> {
        match self.handle.link().del(self.index).execute().await {
            Ok(()) => {
                tracing::info!(link = %self.name, "deleted link");
                Ok(())
            }
            Err(source) if errno_of(&source) == Some(libc::ENODEV) => Ok(()),
            Err(source) => Err(LinkError::Delete {
                name: self.name,
                source,
            }),
        }
    }
}

fn connect() -> Result<Handle, LinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
    // The task ends when the last handle (held by the DummyLink) is dropped.
    tokio::spawn(connection);
    Ok(handle)
}

async fn find_index(handle: &Handle, name: &str) -> Result<Option<u32>, LinkError> {
    let found = handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await;
    match found {
        Ok(message) => Ok(message.map(|message| message.header.index)),
        Err(source) if errno_of(&source) == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(LinkError::Find {
            name: name.to_owned(),
            source,
        }),
    }
}

fn errno_of(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => {
            message.code.map(|code| code.get().saturating_abs())
        }
        _ => None,
    }
}

fn host_prefix(address: &IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The address of an `RTM_NEWADDR`: IFA_LOCAL for IPv4 (IFA_ADDRESS is the peer on
/// point-to-point links), IFA_ADDRESS for IPv6, which has no IFA_LOCAL unless a peer is set.
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let local = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            AddressAttribute::Local(address) => Some(*address),
            _ => None,
        });
    let address = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            AddressAttribute::Address(address) => Some(*address),
            _ => None,
        });
    match message.header.family {
        AddressFamily::Inet => local.or(address),
        _ => address.or(local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn message(family: AddressFamily, attributes: Vec<AddressAttribute>) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.family = family;
        message.attributes = attributes;
        message
    }

    #[test]
    fn ipv4_takes_local_over_peer() {
        let local = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let ptp = message(
            AddressFamily::Inet,
            vec![
                AddressAttribute::Address(peer),
                AddressAttribute::Local(local),
            ],
        );
        assert_eq!(address_of(&ptp), Some(local));
    }

    #[test]
    fn ipv6_takes_address() {
        let address = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 10));
        let plain = message(
            AddressFamily::Inet6,
            vec![AddressAttribute::Address(address)],
        );
        assert_eq!(address_of(&plain), Some(address));
        assert_eq!(address_of(&message(AddressFamily::Inet6, vec![])), None);
    }

    #[test]
    fn link_local_is_recognised() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().expect("ip")));
        assert!(is_ipv6_link_local(&"febf::1".parse().expect("ip")));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().expect("ip")));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().expect("ip")));
        assert!(!is_ipv6_link_local(&"169.254.0.1".parse().expect("ip")));
    }

    #[test]
    fn host_prefixes() {
        assert_eq!(host_prefix(&"10.96.0.1".parse().expect("ip")), 32);
        assert_eq!(host_prefix(&"fd00::1".parse().expect("ip")), 128);
    }
}
