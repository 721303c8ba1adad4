//! [`IpvsKernel`]: everything [`IpvsDataplane`](super::IpvsDataplane) and `topoproxy cleanup`
//! ask of the kernel, and [`RealKernel`], which asks the kernel. The seam lets the dataplane's
//! read, adoption, apply phases and drain checks, and what clean-up removes, run on a fake
//! kernel in unit tests (`fake.rs`); the VM tests (`vm_ipvs_*`) keep covering the real one.
//!
//! # Blocking contract
//!
//! Every call blocks the calling thread until the kernel answered: the IPVS and conntrack calls
//! are synchronous netlink round trips, the nft calls run the `nft` program and wait for it, and
//! the address calls, although `async`, are rtnetlink requests the dataplane awaits in line.
//! That is acceptable only because the sync loop runs the [`Dataplane`](crate::dataplane::Dataplane)
//! on the main thread's `block_on` (`main.rs`): a blocked call there stalls the sync loop, which
//! waits for the kernel anyway, and never a runtime worker that other tasks (the API watches,
//! the metrics server) need. Calling these from a task on the multi-threaded runtime would hold
//! one of its workers for as long as a 10,000-service dump or an `nft` run takes.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;

use super::conntrack::{self, BackendFlow, ConntrackError};
use super::dataplane::{IpvsSettings, IpvsSetupError};
use super::link::{DummyLink, LinkError};
use super::netlink::{
    Command, IpvsClient, IpvsDestination, IpvsError, IpvsService, MessageCounts, ServiceId,
};
use super::nft::{ListedTable, Nft, NftError, NftSettings, NftState};
use super::sysctl::{self, Sysctls};

/// What the IPVS dataplane asks of the kernel, in four groups: IPVS services and destinations,
/// the dummy link's addresses, the nft table, conntrack. See the module's blocking contract.
pub trait IpvsKernel: Send + Sync {
    /// Every virtual service, in one multipart dump. Like the kernel's, the dump can skip
    /// services ([`super::records`]): it is no proof of absence.
    fn dump_services(&mut self) -> Result<Vec<IpvsService>, IpvsError>;

    /// One virtual service, looked up by its key; `None` when the kernel does not have it.
    fn get_service(&mut self, id: &ServiceId) -> Result<Option<IpvsService>, IpvsError>;

    /// The real servers of one virtual service; empty for a service the kernel does not have.
    fn destinations(&mut self, id: &ServiceId) -> Result<Vec<IpvsDestination>, IpvsError>;

    /// Sends every command (pipelined) and returns one result per command, in order. A
    /// command that already holds (`EEXIST`) or has nothing to act on (`ESRCH`/`ENOENT`)
    /// fails as the kernel answers it; the caller decides what that means.
    fn execute(&mut self, commands: &[Command]) -> Vec<Result<(), IpvsError>>;

    /// IPVS requests sent since start, by kind.
    fn messages_sent(&self) -> MessageCounts;

    /// Whether the dummy link exists. The dataplane creates it at start; clean-up only looks
    /// for it. Without it nothing is bound, and every address of the node is elsewhere.
    fn has_link(&self) -> bool;

    /// Deletes the dummy link with every address on it; no link is not an error.
    fn delete_link(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// The addresses bound on the dummy link.
    fn link_addresses(&self) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send;

    /// The addresses bound on every other link (a VIP that is already a node address is not
    /// bound again).
    fn addresses_elsewhere(
        &self,
    ) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send;

    /// Binds `address` on the dummy link; binding one that is there already succeeds. Takes
    /// `&self` so that many requests can be in flight together.
    fn add_address(&self, address: IpAddr) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Unbinds `address` from the dummy link; one that is not there is not an error.
    fn delete_address(&self, address: IpAddr)
        -> impl Future<Output = Result<(), LinkError>> + Send;

    /// Whether the nft table exists, without reading its sets.
    fn nft_exists(&mut self) -> Result<bool, NftError>;

    /// The nft table's sets; `None` when the table does not exist.
    fn nft_read(&mut self) -> Result<Option<ListedTable>, NftError>;

    /// Replaces the whole nft table (rules and sets) in one transaction.
    fn nft_replace(&mut self, settings: &NftSettings, state: &NftState) -> Result<(), NftError>;

    /// Moves the nft sets from `from` to `to` in one transaction; fails, changing nothing,
    /// when the table does not hold `from`'s elements.
    fn nft_update(&mut self, from: &NftState, to: &NftState) -> Result<(), NftError>;

    /// Deletes the nft table (the caller checks that it exists).
    fn nft_delete(&mut self) -> Result<(), NftError>;

    /// Deletes the conntrack entries of `flows`; returns how many went.
    fn flush_conntrack(&mut self, flows: &[BackendFlow]) -> Result<usize, ConntrackError>;
}

/// The kernel itself: the IPVS generic netlink client, the dummy link over rtnetlink, the
/// `nft` program and the conntrack netlink socket, used as they are.
pub struct RealKernel {
    ipvs: IpvsClient,
    /// Always there for the dataplane; clean-up and the listing take the node as it is.
    link: Option<DummyLink>,
    nft: Nft,
}

impl RealKernel {
    /// Sets the kernel parameters IPVS mode needs, opens IPVS (setting its connection
    /// timeouts when configured), makes sure the dummy link exists and finds `nft`.
    pub async fn open(settings: &IpvsSettings) -> Result<Self, IpvsSetupError> {
        let kernel = sysctl::kernel_release().unwrap_or(None);
        Sysctls::proc().ensure_all(&sysctl::ipvs_sysctls(settings.strict_arp, kernel))?;
        let mut ipvs = IpvsClient::connect()?;
        // kube-proxy's proxier does this only when one of the three is set; a 0 among them
        // leaves that timeout as the kernel has it.
        if !settings.timeouts.is_unset() {
            ipvs.set_timeouts(&settings.timeouts)
                .map_err(IpvsSetupError::Timeouts)?;
            tracing::info!(
                tcp = settings.timeouts.tcp,
                tcp_fin = settings.timeouts.tcp_fin,
                udp = settings.timeouts.udp,
                "IPVS connection timeouts set (seconds; 0 left as it was)"
            );
        }
        let link = DummyLink::ensure(&settings.link_name)
            .await
            .map_err(|source| IpvsSetupError::Link {
                name: settings.link_name.clone(),
                source: Box::new(source),
            })?;
        let nft = Nft::new()?;
        Ok(Self {
            ipvs,
            link: Some(link),
            nft,
        })
    }

    /// The kernel as it is, changing nothing: IPVS, the dummy link if there is one, and
    /// `nft` (for clean-up and the listing).
    pub fn existing(ipvs: IpvsClient, link: Option<DummyLink>, nft: Nft) -> Self {
        Self { ipvs, link, nft }
    }
}

impl IpvsKernel for RealKernel {
    fn dump_services(&mut self) -> Result<Vec<IpvsService>, IpvsError> {
        self.ipvs.services()
    }

    fn get_service(&mut self, id: &ServiceId) -> Result<Option<IpvsService>, IpvsError> {
        self.ipvs.service(id)
    }

    fn destinations(&mut self, id: &ServiceId) -> Result<Vec<IpvsDestination>, IpvsError> {
        self.ipvs.destinations(id)
    }

    fn execute(&mut self, commands: &[Command]) -> Vec<Result<(), IpvsError>> {
        self.ipvs.execute(commands)
    }

    fn messages_sent(&self) -> MessageCounts {
        self.ipvs.messages_sent()
    }

    fn has_link(&self) -> bool {
        self.link.is_some()
    }

    fn delete_link(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send {
        let link = self.link.take();
        async move {
            match link {
                Some(link) => link.delete().await,
                None => Ok(()),
            }
        }
    }

    fn link_addresses(&self) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send {
        let link = self.link.as_ref();
        async move {
            match link {
                Some(link) => link.addresses().await,
                None => Ok(BTreeSet::new()),
            }
        }
    }

    fn addresses_elsewhere(
        &self,
    ) -> impl Future<Output = Result<BTreeSet<IpAddr>, LinkError>> + Send {
        let link = self.link.as_ref();
        async move {
            match link {
                Some(link) => link.addresses_elsewhere().await,
                // Without the link every address is elsewhere.
                None => crate::node_addresses::interface_addresses()
                    .map(|all| all.into_iter().map(|a| a.address).collect())
                    .map_err(LinkError::NodeAddresses),
            }
        }
    }

    fn add_address(&self, address: IpAddr) -> impl Future<Output = Result<(), LinkError>> + Send {
        let link = self.link.as_ref();
        async move {
            match link {
                Some(link) => link.add_address(address).await,
                None => Err(LinkError::Missing),
            }
        }
    }

    fn delete_address(
        &self,
        address: IpAddr,
    ) -> impl Future<Output = Result<(), LinkError>> + Send {
        let link = self.link.as_ref();
        async move {
            match link {
                Some(link) => link.delete_address(address).await,
                None => Ok(()),
            }
        }
    }

    fn nft_exists(&mut self) -> Result<bool, NftError> {
        self.nft.exists()
    }

    fn nft_read(&mut self) -> Result<Option<ListedTable>, NftError> {
        self.nft.read()
    }

    fn nft_replace(&mut self, settings: &NftSettings, state: &NftState) -> Result<(), NftError> {
        self.nft.replace(settings, state)
    }

    fn nft_update(&mut self, from: &NftState, to: &NftState) -> Result<(), NftError> {
        self.nft.update(from, to)
    }

    fn nft_delete(&mut self) -> Result<(), NftError> {
        self.nft.delete()
    }

    fn flush_conntrack(&mut self, flows: &[BackendFlow]) -> Result<usize, ConntrackError> {
        conntrack::flush(flows)
    }
}
