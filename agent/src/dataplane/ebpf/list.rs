//! What `topoproxy list` shows for the eBPF dataplane: the table the maps hold, with the
//! datapath's counters.

use std::net::IpAddr;

use crate::dataplane::ServiceConfig;
use crate::table::VsKey;

/// Counters of one service, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connects and unconnected datagrams translated to a backend.
    pub translations: u64,
    /// Of those, how many followed session affinity.
    pub affinity_hits: u64,
    /// Connects refused because every tier was empty.
    pub no_backend: u64,
}

/// One backend in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBackend {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// 0 is the nearest tier.
    pub tier: u8,
    /// Whether the datapath currently picks from this backend's tier.
    pub active: bool,
    /// Connects (and unconnected datagrams) sent to it.
    pub connections: u64,
}

/// One service in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedService {
    pub key: VsKey,
    pub config: ServiceConfig,
    /// The id keying its slots and counters in the maps.
    pub id: u32,
    pub counters: ServiceCounters,
    /// Nearest tier first, slot order within a tier.
    pub backends: Vec<ListedBackend>,
}

/// The table as the maps hold it, with counters: what `topoproxy list` renders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub services: Vec<ListedService>,
}
