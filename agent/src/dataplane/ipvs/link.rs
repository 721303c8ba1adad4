//! `kube-ipvs0`: the dummy link that holds every VIP so the kernel delivers VIP traffic locally,
//! where IPVS picks it up. Managed over rtnetlink.
//!
//! CONTRACT (filled in by the link work).

use std::collections::BTreeSet;
use std::net::IpAddr;

/// The dummy link's name, as kube-proxy's IPVS mode names it.
pub const DUMMY_LINK: &str = "kube-ipvs0";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link: not implemented yet")]
    Unimplemented,
}

/// An rtnetlink connection and the dummy link's index.
pub struct DummyLink {}

impl DummyLink {
    /// Finds the link `name`, creating it (as a dummy, left down) when missing.
    pub async fn ensure(_name: &str) -> Result<Self, LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Finds the link `name` without creating it.
    pub async fn find(_name: &str) -> Result<Option<Self>, LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Addresses bound on this link.
    pub async fn addresses(&self) -> Result<BTreeSet<IpAddr>, LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Addresses bound on every other link of the namespace.
    pub async fn addresses_elsewhere(&self) -> Result<BTreeSet<IpAddr>, LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Binds `address` as /32 or /128; binding one already there is not an error.
    pub async fn add_address(&self, _address: IpAddr) -> Result<(), LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Unbinds `address`; one already gone is not an error.
    pub async fn delete_address(&self, _address: IpAddr) -> Result<(), LinkError> {
        Err(LinkError::Unimplemented)
    }

    /// Deletes the link.
    pub async fn delete(self) -> Result<(), LinkError> {
        Err(LinkError::Unimplemented)
    }
}
