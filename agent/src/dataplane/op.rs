//! One change to a dataplane, and what a dataplane that accepted a list of them holds.
//!
//! Owned by the dataplane side so that imports run one way: the differ (`crate::diff`) builds
//! these from two tables; every dataplane and its fakes consume them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::dataplane::{DestinationState, ProgrammedService, ProgrammedTable, ServiceConfig};
use crate::table::VsKey;

/// A real server of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Position of the destination's tier in the fallback order; 0 is the nearest.
    pub tier: u8,
    /// The backend runs on this node ([`DestinationState::local`]).
    pub local: bool,
}

impl Destination {
    /// The destination's state without its address.
    pub fn state(&self) -> DestinationState {
        DestinationState {
            weight: self.weight,
            tier: self.tier,
            local: self.local,
        }
    }
}

/// The destination at `address:port` holding `state`.
pub(crate) fn destination(address: IpAddr, port: u16, state: DestinationState) -> Destination {
    Destination {
        address,
        port,
        weight: state.weight,
        tier: state.tier,
        local: state.local,
    }
}

/// One change to a dataplane.
///
/// A service's settings are boxed: they are four times the size of a destination change, and
/// the initial sync's list holds one op per destination of the whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService {
        key: VsKey,
        config: Box<ServiceConfig>,
    },
    EditService {
        key: VsKey,
        config: Box<ServiceConfig>,
    },
    AddDestination {
        service: VsKey,
        destination: Destination,
    },
    EditDestination {
        service: VsKey,
        destination: Destination,
    },
    /// `destination` is the one being removed, with its current weight.
    DeleteDestination {
        service: VsKey,
        destination: Destination,
    },
    DeleteService {
        key: VsKey,
    },
}

impl Op {
    /// The virtual service this change concerns.
    pub fn service(&self) -> VsKey {
        match self {
            Self::AddService { key, .. }
            | Self::EditService { key, .. }
            | Self::DeleteService { key } => *key,
            Self::AddDestination { service, .. }
            | Self::EditDestination { service, .. }
            | Self::DeleteDestination { service, .. } => *service,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AddService { .. } => "add_service",
            Self::EditService { .. } => "edit_service",
            Self::AddDestination { .. } => "add_destination",
            Self::EditDestination { .. } => "edit_destination",
            Self::DeleteDestination { .. } => "delete_destination",
            Self::DeleteService { .. } => "delete_service",
        }
    }
}

/// Applies `ops` to a table, as a dataplane that accepted them all would end up. Ops that
/// make no sense against `table` (a destination of a missing service) are returned.
pub fn apply_to<'a>(table: &mut ProgrammedTable, ops: impl IntoIterator<Item = &'a Op>) -> Vec<Op> {
    let mut rejected = Vec::new();
    for op in ops {
        let accepted = match op {
            Op::AddService { key, config } => {
                table
                    .entry(*key)
                    .or_insert_with(|| ProgrammedService {
                        config: ServiceConfig::clone(config),
                        destinations: BTreeMap::new(),
                    })
                    .config = ServiceConfig::clone(config);
                true
            }
            Op::EditService { key, config } => table
                .get_mut(key)
                .map(|service| service.config = ServiceConfig::clone(config))
                .is_some(),
            Op::AddDestination {
                service,
                destination,
            }
            | Op::EditDestination {
                service,
                destination,
            } => table
                .get_mut(service)
                .map(|s| {
                    s.destinations
                        .insert((destination.address, destination.port), destination.state())
                })
                .is_some(),
            Op::DeleteDestination {
                service,
                destination,
            } => table
                .get_mut(service)
                .map(|s| {
                    s.destinations
                        .remove(&(destination.address, destination.port))
                })
                .is_some(),
            Op::DeleteService { key } => table.remove(key).is_some(),
        };
        if !accepted {
            rejected.push(op.clone());
        }
    }
    rejected
}
