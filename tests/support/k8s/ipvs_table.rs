//! `ipvsadm -Ln` text as a comparable table, for the parity corpus (tests/vm_k8s_parity.rs).
//!
//! A table is a map from virtual server ("TCP node-self:30080 rr persistent 10800") to its
//! sorted real servers ("pod-peer.5:8080 Masq 1"), connection counters dropped and addresses
//! relabelled by the caller (see `world::relabel`), so the tables of kube-proxy's node and
//! topoproxy's twin compare as values.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

/// One virtual server as parsed, before relabelling.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VirtualServer {
    pub protocol: String,
    pub address: SocketAddr,
    /// Scheduler and flags, e.g. `rr persistent 10800`.
    pub options: String,
    /// `(address, forwarding method and weight)`.
    pub real_servers: Vec<(SocketAddr, String)>,
}

/// Parses `ipvsadm -Ln` output.
pub fn parse(listing: &str) -> Vec<VirtualServer> {
    let mut out: Vec<VirtualServer> = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [protocol @ ("TCP" | "UDP" | "SCTP"), address, options @ ..] => {
                let Some(address) = parse_address(address) else {
                    continue;
                };
                out.push(VirtualServer {
                    protocol: (*protocol).to_owned(),
                    address,
                    options: options.join(" "),
                    real_servers: Vec::new(),
                });
            }
            ["->", address, method, weight, ..] => {
                let (Some(address), Some(server)) = (parse_address(address), out.last_mut()) else {
                    continue;
                };
                server
                    .real_servers
                    .push((address, format!("{method} {weight}")));
            }
            _ => {}
        }
    }
    out
}

fn parse_address(text: &str) -> Option<SocketAddr> {
    text.parse().ok()
}

/// A table keyed by relabelled virtual server.
pub type Table = BTreeMap<String, BTreeSet<String>>;

/// The comparable form of `servers`, addresses through `label`.
pub fn comparable(servers: &[VirtualServer], label: impl Fn(IpAddr) -> String) -> Table {
    let show = |address: SocketAddr| match address.ip() {
        IpAddr::V4(_) => format!("{}:{}", label(address.ip()), address.port()),
        IpAddr::V6(_) => format!("[{}]:{}", label(address.ip()), address.port()),
    };
    servers
        .iter()
        .map(|vs| {
            let key = format!("{} {} {}", vs.protocol, show(vs.address), vs.options);
            let reals = vs
                .real_servers
                .iter()
                .map(|(address, rest)| format!("{} {rest}", show(*address)))
                .collect();
            (key.trim().to_owned(), reals)
        })
        .collect()
}

/// The lines on which two tables differ, `-` for only in `left`, `+` for only in `right`.
pub fn differences(left: &Table, right: &Table) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = left.keys().chain(right.keys()).collect();
    for key in keys {
        match (left.get(key), right.get(key)) {
            (Some(_), None) => out.push(format!("- {key}")),
            (None, Some(_)) => out.push(format!("+ {key}")),
            (Some(l), Some(r)) if l != r => {
                for real in l.difference(r) {
                    out.push(format!("- {key} -> {real}"));
                }
                for real in r.difference(l) {
                    out.push(format!("+ {key} -> {real}"));
                }
            }
            _ => {}
        }
    }
    out
}
