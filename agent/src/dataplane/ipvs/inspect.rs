//! `topoproxy list` in IPVS mode: the kernel's table as `ipvsadm -Ln` shows it.
//!
//! By default only the virtual services topoproxy owns (those recorded in its nft table), so
//! `diff <(topoproxy plan …) <(topoproxy list)` compares like with like; `--all` adds foreign
//! ones, as `ipvsadm -Ln` would.

use crate::render::ipvsadm::{self, DestinationRow, ServiceRow};
use crate::table::VsKey;

use super::netlink::{Forward, IpvsClient, IpvsDestination, IpvsError, IpvsInfo, IpvsService};
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
    let mut read = Vec::new();
    for service in ipvs.services()? {
        let key = VsKey::new(service.id.protocol, service.id.address, service.id.port);
        if owned
            .as_ref()
            .is_some_and(|owned| !owned.contains_key(&key))
        {
            continue;
        }
        let destinations = ipvs.destinations(&service.id)?;
        read.push((service, destinations));
    }
    Ok(render(read, &info, options))
}

/// What was read, as `ipvsadm -Ln` prints it; with `zero_counters`, as `topoproxy plan` does.
fn render(
    read: Vec<(IpvsService, Vec<IpvsDestination>)>,
    info: &IpvsInfo,
    options: ListOptions,
) -> String {
    let rows = read
        .into_iter()
        .map(|(service, destinations)| service_row(service, destinations, options))
        .collect();
    if options.zero_counters {
        // What `plan` prints: it cannot know the kernel's version or table size either.
        return ipvsadm::render_rows(rows);
    }
    let (major, minor, patch) = info.version;
    ipvsadm::render_rows_with_header(&format!("{major}.{minor}.{patch}"), info.table_size, rows)
}

fn service_row(
    service: IpvsService,
    destinations: Vec<IpvsDestination>,
    options: ListOptions,
) -> ServiceRow {
    let counted = |count: u32| if options.zero_counters { 0 } else { count };
    let destinations = destinations
        .into_iter()
        .filter_map(|d| {
            Some(DestinationRow {
                address: d.address,
                port: d.port,
                forward: forward(d.forward)?,
                weight: i32::try_from(d.weight).unwrap_or(i32::MAX),
                active_connections: counted(d.active_connections),
                inactive_connections: counted(d.inactive_connections),
            })
        })
        .collect();
    ServiceRow {
        key: VsKey::new(service.id.protocol, service.id.address, service.id.port),
        scheduler: ipvsadm::scheduler_column(&service.scheduler, service.scheduler_flags),
        persistence_timeout: service.persistence_timeout,
        destinations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn read() -> Vec<(IpvsService, Vec<IpvsDestination>)> {
        let destination = |address: &str, forward, active| IpvsDestination {
            address: address.parse().expect("a test address"),
            port: 8080,
            weight: 1,
            forward,
            active_connections: active,
            inactive_connections: 2,
        };
        vec![(
            IpvsService {
                id: super::super::netlink::ServiceId {
                    protocol: Protocol::Tcp,
                    address: "10.96.0.1".parse().expect("a test address"),
                    port: 443,
                },
                scheduler: "mh".into(),
                scheduler_flags: 0,
                persistence_timeout: Some(10800),
            },
            vec![
                destination("10.244.0.5", Forward::Masq, 7),
                // ipvsadm prints no row for a bypass destination; neither does `list`.
                destination("10.244.0.6", Forward::Bypass, 1),
            ],
        )]
    }

    const INFO: IpvsInfo = IpvsInfo {
        version: (1, 2, 1),
        table_size: 65536,
    };

    #[test]
    fn the_listing_shows_the_kernels_version_and_counters() {
        let options = ListOptions {
            all: false,
            zero_counters: false,
        };
        let text = render(read(), &INFO, options);
        assert_eq!(
            text,
            "IP Virtual Server version 1.2.1 (size=65536)\n\
             Prot LocalAddress:Port Scheduler Flags\n  \
             -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
             TCP  10.96.0.1:443 mh persistent 10800\n  \
             -> 10.244.0.5:8080              Masq    1      7          2         \n"
        );
    }

    #[test]
    fn without_counters_the_listing_is_what_plan_prints() {
        let options = ListOptions {
            all: false,
            zero_counters: true,
        };
        let text = render(read(), &INFO, options);
        assert!(!text.contains("size=65536"), "{text}");
        assert!(
            text.contains("-> 10.244.0.5:8080              Masq    1      0          0"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 5, "{text}");
    }
}
