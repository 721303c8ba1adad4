//! The node table as `ipvsadm -Ln` prints it (ipvsadm 1.31, `list_all` with numeric output).
//!
//! The same renderer serves `topoproxy plan` (desired state) and, later, `topoproxy list`
//! (state read back from the kernel), so `diff <(topoproxy plan …) <(topoproxy list)` compares
//! like with like. Column widths are ipvsadm's printf formats, trailing spaces included.
//!
//! Ordering: ipvsadm sorts services by (family, protocol, address, port) and destinations by
//! (address, port). Its comparator subtracts unsigned addresses into an `int`, so two IPv4
//! addresses 2^31 or more apart compare the "wrong" way round and the order then depends on
//! the kernel's hash order; we sort numerically, which is identical whenever a table's
//! addresses of one family lie within 2^31 of each other (e.g. all of 10.0.0.0/8 and 100.64/10).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::scheduler::Scheduler;
use crate::table::{NodeTable, VsKey};

/// The version line's figures: IPVS 1.2.1 with the default 4096-entry connection table, which
/// is what every kernel since 2.6 reports unless `ip_vs` was loaded with `conn_tab_bits`.
pub const IPVS_VERSION: &str = "1.2.1";
pub const IPVS_CONN_TAB_SIZE: u32 = 4096;

/// One virtual service line and its destinations, whatever their source (plan or kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub key: VsKey,
    /// The scheduler column: [`scheduler_column`].
    pub scheduler: String,
    pub persistence_timeout: Option<u32>,
    pub destinations: Vec<DestinationRow>,
}

/// The scheduler as ipvsadm prints it: its name, then its flags (`sh-fallback`, `mh-port`)
/// in parentheses when it has any, e.g. `mh (mh-fallback,mh-port)`.
pub fn scheduler_column(name: &str, flag_bits: u32) -> String {
    match Scheduler::from_kernel(name, flag_bits).flag_text() {
        Some(flags) => format!("{name} ({flags})"),
        None => name.to_owned(),
    }
}

/// One real-server line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRow {
    pub address: IpAddr,
    pub port: u16,
    pub forward: Forward,
    pub weight: i32,
    pub active_connections: u32,
    pub inactive_connections: u32,
}

/// IPVS forwarding method, as ipvsadm names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Masq,
    Local,
    Tunnel,
    Route,
}

impl Forward {
    fn as_str(self) -> &'static str {
        match self {
            Self::Masq => "Masq",
            Self::Local => "Local",
            Self::Tunnel => "Tunnel",
            Self::Route => "Route",
        }
    }
}

/// Rows for the programmed backends of `table` (Masq, connection counts zero).
pub fn rows_from_table(table: &NodeTable) -> Vec<ServiceRow> {
    table
        .servers()
        .map(|vs| ServiceRow {
            key: vs.key,
            scheduler: scheduler_column(vs.scheduler.name(), vs.scheduler.flags.kernel_bits()),
            persistence_timeout: vs.persistence_timeout,
            destinations: vs
                .programmed()
                .iter()
                .map(|backend| DestinationRow {
                    address: backend.address,
                    port: backend.port,
                    forward: Forward::Masq,
                    weight: i32::try_from(backend.weight).unwrap_or(i32::MAX),
                    active_connections: 0,
                    inactive_connections: 0,
                })
                .collect(),
        })
        .collect()
}

/// The planned table in `ipvsadm -Ln` format.
pub fn render_table(table: &NodeTable) -> String {
    render_rows(rows_from_table(table))
}

/// Renders rows in `ipvsadm -Ln` format, sorting them the way ipvsadm does.
pub fn render_rows(rows: Vec<ServiceRow>) -> String {
    render_rows_with_header(IPVS_VERSION, IPVS_CONN_TAB_SIZE, rows)
}

/// Like [`render_rows`], with the version line a kernel reported.
pub fn render_rows_with_header(
    version: &str,
    table_size: u32,
    mut rows: Vec<ServiceRow>,
) -> String {
    rows.sort_by_key(|row| row.key);
    let mut out = String::with_capacity(128 + rows.len() * 96);
    // Writing into a String cannot fail.
    let _ = writeln!(
        out,
        "IP Virtual Server version {version} (size={table_size})"
    );
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    for mut row in rows {
        let _ = write!(
            out,
            "{:<4} {} {}",
            row.key.protocol.as_str(),
            address_port(row.key.address, row.key.port),
            row.scheduler
        );
        if let Some(timeout) = row.persistence_timeout {
            let _ = write!(out, " persistent {timeout}");
        }
        out.push('\n');
        row.destinations
            .sort_by_key(|destination| (destination.address, destination.port));
        for destination in &row.destinations {
            let _ = writeln!(
                out,
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                address_port(destination.address, destination.port),
                destination.forward.as_str(),
                destination.weight,
                destination.active_connections,
                destination.inactive_connections
            );
        }
    }
    out
}

/// `10.0.0.1:53` or `[fd00::1]:53`, as ipvsadm's numeric `addrport_to_anyname`.
fn address_port(address: IpAddr, port: u16) -> String {
    SocketAddr::new(address, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn destination(
        address: &str,
        port: u16,
        weight: i32,
        active: u32,
        inactive: u32,
    ) -> DestinationRow {
        DestinationRow {
            address: address.parse().expect("test address"),
            port,
            forward: Forward::Masq,
            weight,
            active_connections: active,
            inactive_connections: inactive,
        }
    }

    fn service(protocol: Protocol, address: &str, port: u16) -> ServiceRow {
        ServiceRow {
            key: VsKey::new(protocol, address.parse().expect("test address"), port),
            scheduler: "rr".to_owned(),
            persistence_timeout: None,
            destinations: Vec::new(),
        }
    }

    /// Written by hand from ipvsadm 1.31's format strings (`"%-4s %s"` for the service,
    /// `"  -> %-28s %-7s %-6d %-10u %-10u\n"` for a destination), trailing spaces included,
    /// and its sort order (family, protocol number, address, port).
    #[test]
    fn matches_ipvsadm_list_numeric_output() {
        let mut dns_udp = service(Protocol::Udp, "10.96.0.10", 53);
        dns_udp.destinations = vec![
            destination("10.244.3.10", 53, 1, 0, 0),
            destination("10.244.1.10", 53, 1, 0, 0),
        ];
        let mut api = service(Protocol::Tcp, "10.96.0.1", 443);
        api.persistence_timeout = Some(10800);
        api.destinations = vec![destination("192.168.10.5", 6443, 1, 12, 345)];
        let mut sctp = service(Protocol::Sctp, "10.96.0.20", 3868);
        sctp.scheduler = "wrr".to_owned();
        sctp.destinations = vec![destination("10.244.1.11", 3869, 0, 0, 0)];
        let mut v6 = service(Protocol::Tcp, "fd00:10:96::2040", 9090);
        v6.destinations = vec![destination("fd00:10:244:1::50", 9090, 1, 0, 0)];
        let empty = service(Protocol::Tcp, "10.96.0.30", 80);
        let text = render_rows(vec![v6, sctp, dns_udp, empty, api]);
        let expected = "\
IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.1:443 rr persistent 10800
  -> 192.168.10.5:6443            Masq    1      12         345       \n\
TCP  10.96.0.30:80 rr
UDP  10.96.0.10:53 rr
  -> 10.244.1.10:53               Masq    1      0          0         \n  \
-> 10.244.3.10:53               Masq    1      0          0         \n\
SCTP 10.96.0.20:3868 wrr
  -> 10.244.1.11:3869             Masq    0      0          0         \n\
TCP  [fd00:10:96::2040]:9090 rr
  -> [fd00:10:244:1::50]:9090     Masq    1      0          0         \n";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_empty_table_is_just_the_header() {
        assert_eq!(
            render_rows(Vec::new()),
            "IP Virtual Server version 1.2.1 (size=4096)\n\
             Prot LocalAddress:Port Scheduler Flags\n  \
             -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
        );
    }
}
