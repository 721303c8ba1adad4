//! The seam between the slot layout and the kernel: the few map operations the layout needs,
//! as the datapath sees them. [`super::maps::PinnedMaps`] is the kernel; the layout's tests use
//! an in-memory fake and one that fails the n-th write (Cilium's `LBMaps` / `FaultyLBMaps`).
//!
//! The reads are a trait of their own, [`LbRead`], so that `topoproxy list`
//! ([`super::inspect`]) holds maps it cannot write through.

use ipnetwork::IpNetwork;
use topoproxy_common as abi;

use super::EbpfError;

/// Reading the service and backend maps the programs read.
pub(crate) trait LbRead {
    /// Every service entry.
    fn services(&self) -> Result<Vec<(abi::ServiceKey, abi::Service)>, EbpfError>;
    /// One backend slot; `None` when it is empty.
    fn backend(&self, key: &abi::BackendKey) -> Result<Option<abi::Backend>, EbpfError>;
    /// The keys of every filled backend slot.
    fn backend_keys(&self) -> Result<Vec<abi::BackendKey>, EbpfError>;
    /// Every `loadBalancerSourceRanges` entry: service id and range.
    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, EbpfError>;
}

/// The service and backend maps the programs read, plus the counters the layout drops.
pub(crate) trait LbMaps: LbRead {
    /// Creates or replaces a service entry in one write (programs see the old or the new one).
    fn put_service(&mut self, key: abi::ServiceKey, value: abi::Service) -> Result<(), EbpfError>;
    /// Removes a service entry; an absent one is not an error.
    fn delete_service(&mut self, key: &abi::ServiceKey) -> Result<(), EbpfError>;
    /// Fills or replaces a backend slot in one write.
    fn put_backend(&mut self, key: abi::BackendKey, value: abi::Backend) -> Result<(), EbpfError>;
    /// Empties a backend slot; an empty one is not an error.
    fn delete_backend(&mut self, key: &abi::BackendKey) -> Result<(), EbpfError>;
    /// Adds one source range of service `id` (canonical: host bits clear).
    fn put_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError>;
    /// Removes one source range of service `id`; an absent one is not an error.
    fn delete_source_range(&mut self, id: u32, range: IpNetwork) -> Result<(), EbpfError>;
    /// Every Maglev table (read back by the writer only: `topoproxy list` does not show them).
    fn maglev_tables(&self) -> Result<Vec<(abi::MaglevKey, abi::MaglevTable)>, EbpfError>;
    /// Creates or replaces one tier's Maglev table in one write (programs see the old table
    /// or the new one).
    fn put_maglev_table(
        &mut self,
        key: abi::MaglevKey,
        table: &abi::MaglevTable,
    ) -> Result<(), EbpfError>;
    /// Removes one tier's Maglev table; an absent one is not an error.
    fn delete_maglev_table(&mut self, key: &abi::MaglevKey) -> Result<(), EbpfError>;
    /// Drops one backend's counters (best effort: a leftover only shows until the id is reused).
    fn delete_backend_stats(&mut self, key: &abi::BackendStatsKey);
    /// Drops one service's counters (best effort, as above).
    fn delete_service_stats(&mut self, id: u32);
    /// Returns once every program run that started before the call has finished, so no
    /// program can still hold a service entry read before it. Slots such an entry counted can
    /// be deleted after this.
    fn grace_period(&mut self) -> Result<(), EbpfError>;
}
