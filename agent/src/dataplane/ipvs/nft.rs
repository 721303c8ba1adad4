//! topoproxy's nftables table for IPVS mode: masquerade, hairpin and reject, with sets that
//! also record which virtual services topoproxy owns.
//!
//! CONTRACT (filled in by the nft work).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::table::{Frontend, TrafficPolicy, VsKey};

/// The table's name (family `inet`).
pub const TABLE: &str = "topoproxy";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nft: not implemented yet")]
    Unimplemented,
}

/// Settings that shape the rules, from the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftSettings {
    /// Masquerade every packet to a service (kube-proxy `--masquerade-all`).
    pub masquerade_all: bool,
    /// Pod CIDRs: ClusterIP traffic from outside them is masqueraded. Empty: none is.
    pub cluster_cidrs: Vec<ipnetwork::IpNetwork>,
}

/// Everything the table's sets hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftState {
    /// Every virtual service topoproxy owns, with how it is reached.
    pub services: BTreeMap<VsKey, (Frontend, TrafficPolicy)>,
    /// (virtual service, destination address, destination port) for hairpin masquerade.
    pub destinations: BTreeSet<(VsKey, IpAddr, u16)>,
}

/// Runs `nft`.
pub struct Nft {}

impl Nft {
    pub fn new() -> Result<Self, NftError> {
        Err(NftError::Unimplemented)
    }

    /// Replaces the whole table (chains, rules and sets) in one transaction.
    pub fn replace(&mut self, _settings: &NftSettings, _state: &NftState) -> Result<(), NftError> {
        Err(NftError::Unimplemented)
    }

    /// Adds and removes set elements to go from `from` to `to`, in one transaction.
    pub fn update(&mut self, _from: &NftState, _to: &NftState) -> Result<(), NftError> {
        Err(NftError::Unimplemented)
    }

    /// Reads the sets back; `None` when the table does not exist.
    pub fn read(&mut self) -> Result<Option<NftState>, NftError> {
        Err(NftError::Unimplemented)
    }

    /// Deletes the table; a missing table is not an error.
    pub fn delete(&mut self) -> Result<(), NftError> {
        Err(NftError::Unimplemented)
    }
}
