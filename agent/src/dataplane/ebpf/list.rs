//! What `topoproxy list` shows for the eBPF dataplane: the table the maps hold, with the
//! datapath's counters, read without writing ([`read_listing`]), and its `ipvsadm -Ln`
//! rendering ([`render_ipvsadm`]).

use std::net::IpAddr;

use topoproxy_common::MAX_TIERS;

use super::layout::{decode, Slot};
use super::lb_maps::LbRead;
use super::EbpfError;
use crate::dataplane::ServiceConfig;
use crate::render::ipvsadm::{self, scheduler_column, DestinationRow, Forward, ServiceRow};
use crate::table::VsKey;

/// Reading the datapath's per-CPU counters, summed over CPUs.
pub(crate) trait CounterRead {
    /// One service's counters; zero when it has none yet.
    fn service_counters(&self, id: u32) -> Result<ServiceCounters, EbpfError>;
    /// Connects sent to one backend of a service; zero when none were.
    fn backend_connections(&self, id: u32, address: IpAddr, port: u16) -> Result<u64, EbpfError>;
}

pub use crate::dataplane::ServiceCounters;

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

/// The table the maps hold, with counters, in service key order. Reads only: an entry that
/// counts a missing slot (an agent stopped mid-change) is listed with the slots that are there
/// and left for the agent to repair.
pub(crate) fn read_listing(maps: &(impl LbRead + CounterRead)) -> Result<Listing, EbpfError> {
    let mut services = decode(maps)?
        .into_iter()
        .map(|service| {
            listed_service(
                maps,
                service.key,
                service.config,
                service.value.id,
                &service.tiers,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    services.sort_by_key(|service| service.key);
    Ok(Listing { services })
}

/// One service with its backends' tiers, activity and counters.
fn listed_service(
    counters: &impl CounterRead,
    key: VsKey,
    config: ServiceConfig,
    id: u32,
    tiers: &[Vec<Slot>; MAX_TIERS],
) -> Result<ListedService, EbpfError> {
    let serving = config.tier_shares.serving(tiers.each_ref().map(Vec::len));
    let mut backends = Vec::new();
    for (tier, slots) in tiers.iter().enumerate() {
        for slot in slots {
            backends.push(ListedBackend {
                address: slot.address,
                port: slot.port,
                weight: slot.weight,
                tier: tier as u8,
                active: serving[tier],
                connections: counters.backend_connections(id, slot.address, slot.port)?,
            });
        }
    }
    Ok(ListedService {
        key,
        counters: counters.service_counters(id)?,
        config,
        id,
        backends,
    })
}

/// The active tier of every service as `ipvsadm -Ln` prints a table; the connection counter is
/// the backend's per-CPU connect count (eBPF has no notion of active or inactive connections),
/// 0 with `zero_counters` (as `topoproxy plan` prints it, so the two compare with `diff`).
pub fn render_ipvsadm(listing: &Listing, zero_counters: bool) -> String {
    let rows = listing
        .services
        .iter()
        .map(|service| ServiceRow {
            key: service.key,
            scheduler: scheduler_column(
                service.config.scheduler.name(),
                service.config.scheduler.flags.kernel_bits(),
            ),
            persistence_timeout: service.config.persistence_timeout,
            destinations: service
                .backends
                .iter()
                .filter(|backend| backend.active)
                .map(|backend| DestinationRow {
                    address: backend.address,
                    port: backend.port,
                    forward: Forward::Masq,
                    weight: i32::try_from(backend.weight).unwrap_or(i32::MAX),
                    active_connections: if zero_counters {
                        0
                    } else {
                        u32::try_from(backend.connections).unwrap_or(u32::MAX)
                    },
                    inactive_connections: 0,
                })
                .collect(),
        })
        .collect();
    ipvsadm::render_rows(rows)
}
