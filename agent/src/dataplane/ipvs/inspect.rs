//! `topoproxy list` in IPVS mode: the kernel's table as `ipvsadm -Ln` shows it.
//!
//! By default only the virtual services topoproxy owns (those recorded in its nft table), so
//! `diff <(topoproxy plan …) <(topoproxy list)` compares like with like; `--all` adds foreign
//! ones, as `ipvsadm -Ln` would.

use crate::render::ipvsadm::{self, DestinationRow, ServiceRow};
use crate::table::VsKey;

use super::netlink::{Forward, IpvsClient, IpvsError};
use super::nft::{Nft, NftError};

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("reading IPVS (is the ip_vs module loaded?)")]
    Ipvs(#[from] IpvsError),
    #[error("reading topoproxy's nftables table")]
    Nft(#[from] NftError),
}

/// What to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOptions {
    /// Include IPVS services topoproxy does not own.
    pub all: bool,
    /// Print what `topoproxy plan` cannot know as it does: connection counts as 0, and the
    /// version line's IPVS version and connection-table size.
    pub zero_counters: bool,
}

fn forward(forward: Forward) -> Option<ipvsadm::Forward> {
    match forward {
        Forward::Masq => Some(ipvsadm::Forward::Masq),
        Forward::Local => Some(ipvsadm::Forward::Local),
        Forward::Tunnel => Some(ipvsadm::Forward::Tunnel),
        Forward::Route => Some(ipvsadm::Forward::Route),
        Forward::Bypass => None,
    }
}

/// The kernel's table in `ipvsadm -Ln` format.
pub fn list(options: ListOptions) -> Result<String, InspectError> {
    let mut ipvs = IpvsClient::connect()?;
    let owned = if options.all {
        None
    } else {
        Some(Nft::new()?.read()?.unwrap_or_default().state.services)
    };
    let info = ipvs.info()?;
    let mut rows = Vec::new();
    for service in ipvs.services()? {
        let key = VsKey::new(service.id.protocol, service.id.address, service.id.port);
        if owned
            .as_ref()
            .is_some_and(|owned| !owned.contains_key(&key))
        {
            continue;
        }
        let destinations = ipvs
            .destinations(&service.id)?
            .into_iter()
            .filter_map(|d| {
                Some(DestinationRow {
                    address: d.address,
                    port: d.port,
                    forward: forward(d.forward)?,
                    weight: i32::try_from(d.weight).unwrap_or(i32::MAX),
                    active_connections: if options.zero_counters {
                        0
                    } else {
                        d.active_connections
                    },
                    inactive_connections: if options.zero_counters {
                        0
                    } else {
                        d.inactive_connections
                    },
                })
            })
            .collect();
        rows.push(ServiceRow {
            key,
            scheduler: ipvsadm::scheduler_column(&service.scheduler, service.scheduler_flags),
            persistence_timeout: service.persistence_timeout,
            destinations,
        });
    }
    if options.zero_counters {
        // What `plan` prints: it cannot know the kernel's version or table size either.
        return Ok(ipvsadm::render_rows(rows));
    }
    let (major, minor, patch) = info.version;
    Ok(ipvsadm::render_rows_with_header(
        &format!("{major}.{minor}.{patch}"),
        info.table_size,
        rows,
    ))
}
