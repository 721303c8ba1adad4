//! Pure rendering of topoproxy's nftables table: settings and state in, `nft -f` script out.
//!
//! The table's shape (chains and rules) depends only on [`NftSettings`]; everything that
//! changes with Services and endpoints lives in named sets. So a full replace renders the
//! whole table, while an update only adds and deletes set elements.
//!
//! Sets, each once per family (`4`/`6` suffix):
//! - `{frontend}-{policy}`: the [`VsKey`]s of one frontend kind and traffic policy, as
//!   `addr . proto . port`; NodePort keys carry the node address. These are the record of
//!   which virtual services topoproxy owns, and what the masquerade and reject rules match.
//! - `hairpin`: `destination . proto . port . destination`, derived from
//!   [`NftState::destinations`], the node-local destinations (kube-proxy's `KUBE-LOOP-BACK`,
//!   which also holds only local endpoints): matched after IPVS translated the packet. The
//!   destinations themselves are not recorded in nftables: IPVS already lists them for every
//!   owned service, and a restart pairs its dump with this set to know which are local.
//! - `vips`: addresses of ClusterIP, ExternalIP and LoadBalancer keys that are not also
//!   NodePort (node) addresses, derived; new connections to them on other ports are rejected
//!   (kube-proxy's `KUBE-IPVS-IPS`), unless the address is in
//! - `node-addresses`: the node's own addresses on its other interfaces, from
//!   [`NftState::node_addresses`] (kube-proxy neither binds nor filters those).
//! - `lb-firewall`, `lb-sources`, `lb-from-node`, `lb-not-from-node`: from
//!   [`NftState::source_ranges`], kube-proxy's `loadBalancerSourceRanges` firewall: the keys
//!   that have one; `key . source-network` pairs let through (an interval set); `key . VIP`
//!   for keys the node may reach itself (its connections carry the VIP as source), and the
//!   same for the keys it may not, dropped on output before IPVS sees them.
//!
//! Protocols are written as IANA numbers so the script parses without `/etc/protocols`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::{NftSettings, NftState, TABLE};
use crate::model::{IpFamily, Protocol};
use crate::table::{Frontend, SourceRanges, TrafficPolicy, VsKey};

/// The packet mark bit that asks for masquerade, kube-proxy's `KUBE-MARK-MASQ` default
/// (`--masquerade-bit 14`), so kubelet's and kube-proxy's own postrouting rules agree with ours.
pub const MASQ_MARK: u32 = 0x4000;

/// Priority of the marking chains: before NAT (`dstnat`, -100) and before IPVS, which hooks
/// `LOCAL_OUT` at -99 and `LOCAL_IN` at 98/99.
const MARK_PRIORITY: i32 = -110;
/// Priority of the masquerade chain: just before other `srcnat` (100) chains such as a
/// CNI's, so a marked packet gets our masquerade whatever they would do.
const MASQ_PRIORITY: i32 = 90;

/// Every (frontend, policy) pair; each has its own set (see [`service_stem`]).
pub const SERVICE_KINDS: [(Frontend, TrafficPolicy); 8] = [
    (Frontend::ClusterIP, TrafficPolicy::Cluster),
    (Frontend::ClusterIP, TrafficPolicy::Local),
    (Frontend::ExternalIP, TrafficPolicy::Cluster),
    (Frontend::ExternalIP, TrafficPolicy::Local),
    (Frontend::LoadBalancer, TrafficPolicy::Cluster),
    (Frontend::LoadBalancer, TrafficPolicy::Local),
    (Frontend::NodePort, TrafficPolicy::Cluster),
    (Frontend::NodePort, TrafficPolicy::Local),
];

/// Set name stem of the destination record older versions wrote (read for compatibility,
/// never written: the IPVS dump says the same).
pub const DESTINATIONS: &str = "destinations";
/// Set name stem of the hairpin match set.
pub const HAIRPIN: &str = "hairpin";
/// Set name stem of the bound-VIP set.
pub const VIPS: &str = "vips";
/// Set name stem of the node's own addresses.
pub const NODE_ADDRESSES: &str = "node-addresses";
/// Set name stem of the load-balancer keys that have source ranges.
pub const LB_FIREWALL: &str = "lb-firewall";
/// Set name stem prefix of the allowed `address . port . source network` triples, one set per
/// protocol ([`lb_sources_stem`]). The protocol is matched in the rule, not in the set: Linux
/// 6.12 refuses a `meta l4proto` field in a lookup of a concatenated interval set
/// (EOPNOTSUPP; 6.1 and 6.18 accept it, `cargo xtask vm-test` found it).
pub const LB_SOURCES: &str = "lb-sources";
/// The per-protocol `lb-sources` set stems, for every protocol a Service may use.
pub const LB_SOURCES_STEMS: [(Protocol, &str); 3] = [
    (Protocol::Tcp, "lb-sources-tcp"),
    (Protocol::Udp, "lb-sources-udp"),
    (Protocol::Sctp, "lb-sources-sctp"),
];

/// The `lb-sources` set stem for `protocol`.
pub fn lb_sources_stem(protocol: Protocol) -> &'static str {
    LB_SOURCES_STEMS
        .iter()
        .find(|(p, _)| *p == protocol)
        .map_or(LB_SOURCES_STEMS[0].1, |(_, stem)| stem)
}
/// Set name stem of the `key . VIP` pairs the node may reach itself.
pub const LB_FROM_NODE: &str = "lb-from-node";
/// Set name stem of the `key . VIP` pairs the node may not reach.
pub const LB_NOT_FROM_NODE: &str = "lb-not-from-node";

/// The stems of the sets derived from [`NftState::source_ranges`] and
/// [`NftState::node_addresses`].
const FIREWALL_STEMS: [&str; 7] = [
    NODE_ADDRESSES,
    LB_FIREWALL,
    LB_SOURCES_STEMS[0].1,
    LB_SOURCES_STEMS[1].1,
    LB_SOURCES_STEMS[2].1,
    LB_FROM_NODE,
    LB_NOT_FROM_NODE,
];

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// The set name for a stem and family: `clusterip-cluster4`, `hairpin6`, ...
pub fn set_name(stem: &str, family: IpFamily) -> String {
    format!("{stem}{}", suffix(family))
}

fn suffix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "4",
        IpFamily::V6 => "6",
    }
}

/// The set stem for one frontend and policy.
pub fn service_stem(frontend: Frontend, policy: TrafficPolicy) -> &'static str {
    match (frontend, policy) {
        (Frontend::ClusterIP, TrafficPolicy::Cluster) => "clusterip-cluster",
        (Frontend::ClusterIP, TrafficPolicy::Local) => "clusterip-local",
        (Frontend::ExternalIP, TrafficPolicy::Cluster) => "externalip-cluster",
        (Frontend::ExternalIP, TrafficPolicy::Local) => "externalip-local",
        (Frontend::LoadBalancer, TrafficPolicy::Cluster) => "loadbalancer-cluster",
        (Frontend::LoadBalancer, TrafficPolicy::Local) => "loadbalancer-local",
        (Frontend::NodePort, TrafficPolicy::Cluster) => "nodeport-cluster",
        (Frontend::NodePort, TrafficPolicy::Local) => "nodeport-local",
    }
}

/// Destinations whose address family differs from their virtual service's. IPVS and
/// Kubernetes never pair them; no set can hold them, so rendering leaves them out and the
/// caller should warn.
pub fn unrepresentable(state: &NftState) -> impl Iterator<Item = &(VsKey, IpAddr, u16)> {
    state
        .destinations
        .iter()
        .filter(|(key, dest, _)| IpFamily::of(&key.address) != IpFamily::of(dest))
}

/// Every set's elements (empty sets included), as `nft` element text, keyed by set name.
pub fn set_elements(state: &NftState) -> BTreeMap<String, BTreeSet<String>> {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for family in FAMILIES {
        for (frontend, policy) in SERVICE_KINDS {
            sets.insert(
                set_name(service_stem(frontend, policy), family),
                BTreeSet::new(),
            );
        }
        for stem in [HAIRPIN, VIPS].into_iter().chain(FIREWALL_STEMS) {
            sets.insert(set_name(stem, family), BTreeSet::new());
        }
    }
    let mut insert = |stem: &str, family: IpFamily, element: String| {
        if let Some(set) = sets.get_mut(&set_name(stem, family)) {
            set.insert(element);
        }
    };

    let mut vips = BTreeSet::new();
    let mut node_addresses = BTreeSet::new();
    for (key, (frontend, policy)) in &state.services {
        let family = IpFamily::of(&key.address);
        insert(service_stem(*frontend, *policy), family, key_element(key));
        if *frontend == Frontend::NodePort {
            node_addresses.insert(key.address);
        } else {
            vips.insert(key.address);
        }
    }
    for address in vips.difference(&node_addresses) {
        insert(VIPS, IpFamily::of(address), address.to_string());
    }
    for hairpin in hairpins(state) {
        insert(HAIRPIN, IpFamily::of(&hairpin.0), hairpin_element(hairpin));
    }
    for address in &state.node_addresses {
        insert(NODE_ADDRESSES, IpFamily::of(address), address.to_string());
    }
    for (key, ranges) in &state.source_ranges {
        for (stem, element) in firewall_elements(key, ranges) {
            insert(stem, key.family, element);
        }
    }
    sets
}

/// The elements one load-balancer key's source ranges put in the firewall sets, as
/// (set stem, element); none when the key is open. Ranges of the other family cannot be
/// stored and are left out (the planner never gives any).
fn firewall_elements(key: &VsKey, ranges: &SourceRanges) -> Vec<(&'static str, String)> {
    if ranges.is_open() {
        return Vec::new();
    }
    let mut elements = vec![(LB_FIREWALL, key_element(key))];
    for net in ranges
        .allowed
        .iter()
        .filter(|net| IpFamily::of(&net.ip()) == key.family)
    {
        elements.push((
            lb_sources_stem(key.protocol),
            format!(
                "{} . {} . {}/{}",
                key.address,
                key.port,
                net.network(),
                net.prefix()
            ),
        ));
    }
    let node_stem = if ranges.from_node {
        LB_FROM_NODE
    } else {
        LB_NOT_FROM_NODE
    };
    elements.push((node_stem, format!("{} . {}", key_element(key), key.address)));
    elements
}

/// The hairpin set's elements for `state`'s (node-local) destinations.
pub fn hairpins(state: &NftState) -> impl Iterator<Item = Hairpin> + '_ {
    representable(&state.destinations).map(hairpin_of)
}

fn representable<'a>(
    destinations: impl IntoIterator<Item = &'a (VsKey, IpAddr, u16)>,
) -> impl Iterator<Item = &'a (VsKey, IpAddr, u16)> {
    destinations
        .into_iter()
        .filter(|(key, dest, _)| IpFamily::of(&key.address) == IpFamily::of(dest))
}

/// What the hairpin set matches for a destination: address, protocol, port.
pub type Hairpin = (IpAddr, Protocol, u16);

fn hairpin_of((key, dest, port): &(VsKey, IpAddr, u16)) -> Hairpin {
    (*dest, key.protocol, *port)
}

fn hairpin_element((dest, protocol, port): Hairpin) -> String {
    format!("{dest} . {} . {port} . {dest}", protocol.number())
}

fn key_element(key: &VsKey) -> String {
    format!("{} . {} . {}", key.address, key.protocol.number(), key.port)
}

/// The whole table in one transaction: create it if missing, delete it, define it again.
/// Loading this is atomic (packets see the old table or the new one) and idempotent.
pub fn render_replace(settings: &NftSettings, state: &NftState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    for (name, elements) in set_elements(state) {
        let _ = writeln!(out, "\tset {name} {{");
        let _ = writeln!(out, "\t\ttype {}", set_type(&name));
        if name.starts_with(LB_SOURCES) {
            let _ = writeln!(out, "\t\tflags interval");
        }
        if !elements.is_empty() {
            let list: Vec<&str> = elements.iter().map(String::as_str).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(",\n\t\t\t"));
        }
        let _ = writeln!(out, "\t}}");
    }
    render_chains(&mut out, settings);
    let _ = writeln!(out, "}}");
    out
}

/// The element type of a set, from its name.
fn set_type(name: &str) -> &'static str {
    let v6 = name.ends_with('6');
    let stem = &name[..name.len().saturating_sub(1)];
    match (stem, v6) {
        (HAIRPIN | LB_FROM_NODE | LB_NOT_FROM_NODE, false) => {
            "ipv4_addr . inet_proto . inet_service . ipv4_addr"
        }
        (HAIRPIN | LB_FROM_NODE | LB_NOT_FROM_NODE, true) => {
            "ipv6_addr . inet_proto . inet_service . ipv6_addr"
        }
        (sources, false) if sources.starts_with(LB_SOURCES) => {
            "ipv4_addr . inet_service . ipv4_addr"
        }
        (sources, true) if sources.starts_with(LB_SOURCES) => {
            "ipv6_addr . inet_service . ipv6_addr"
        }
        (VIPS | NODE_ADDRESSES, false) => "ipv4_addr",
        (VIPS | NODE_ADDRESSES, true) => "ipv6_addr",
        (_, false) => "ipv4_addr . inet_proto . inet_service",
        (_, true) => "ipv6_addr . inet_proto . inet_service",
    }
}

fn ip(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn render_chains(out: &mut String, settings: &NftSettings) {
    render_services_chain(out, settings);
    render_nat_hooks(out);
    render_postrouting(out);
    render_firewall(out);
    render_input_filter(out);
}

fn render_services_chain(out: &mut String, settings: &NftSettings) {
    let mark = format!("meta mark set meta mark | {MASQ_MARK:#x}");
    // kube-proxy's KUBE-SERVICES with KUBE-MARK-MASQ: decide on the first packet of a
    // connection, before IPVS translates it, whether it must be masqueraded.
    let _ = writeln!(out, "\tchain services {{");
    // kube-proxy dismisses connections from localhost early.
    let _ = writeln!(out, "\t\tip saddr 127.0.0.0/8 return");
    let _ = writeln!(out, "\t\tip6 saddr ::1 return");
    for family in FAMILIES {
        let ip = ip(family);
        let cidrs = cluster_cidrs(settings, family);
        for policy in [TrafficPolicy::Cluster, TrafficPolicy::Local] {
            let set = set_name(service_stem(Frontend::ClusterIP, policy), family);
            if settings.masquerade_all {
                let _ = writeln!(
                    out,
                    "\t\t{ip} daddr . meta l4proto . th dport @{set} {mark}"
                );
            } else if let Some(interface) = &settings.local_interface {
                // kube-proxy's interface detectors: `! -i cbr0`, `! -i veth+`; node traffic
                // (no input interface) is masqueraded too, as there.
                let _ = writeln!(
                    out,
                    "\t\t{ip} daddr . meta l4proto . th dport @{set} iifname != {} {mark}",
                    interface.nft_operand()
                );
            } else if !cidrs.is_empty() {
                // Traffic from outside the pod network, e.g. a route to the service range
                // pointing at this node, may leave the node: masquerade it.
                let _ = writeln!(
                    out,
                    "\t\t{ip} daddr . meta l4proto . th dport @{set} {ip} saddr != {{ {} }} {mark}",
                    cidrs.join(", ")
                );
            } else {
                // Without pod CIDRs, kube-proxy still masquerades node-originated traffic
                // whose source is the VIP itself (the kernel picks it, as the VIP is local
                // on kube-ipvs0); the reply would otherwise never come back here.
                let _ = writeln!(
                    out,
                    "\t\t{ip} saddr . meta l4proto . th dport @{set} {mark}"
                );
            }
        }
        // NodePort, ExternalIP and LoadBalancer traffic is masqueraded unless its policy is
        // Local, which preserves the client address (KUBE-NODE-PORT, KUBE-EXTERNAL-IP,
        // KUBE-LOAD-BALANCER and their -LOCAL sets).
        for frontend in [
            Frontend::ExternalIP,
            Frontend::LoadBalancer,
            Frontend::NodePort,
        ] {
            let set = set_name(service_stem(frontend, TrafficPolicy::Cluster), family);
            let _ = writeln!(
                out,
                "\t\t{ip} daddr . meta l4proto . th dport @{set} {mark}"
            );
        }
    }
    let _ = writeln!(out, "\t}}");
}

/// The NAT hooks that send every new connection through `services`.
fn render_nat_hooks(out: &mut String) {
    for hook in ["prerouting", "output"] {
        let _ = writeln!(out, "\tchain {hook} {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook {hook} priority {MARK_PRIORITY}; policy accept;"
        );
        let _ = writeln!(out, "\t\tjump services");
        let _ = writeln!(out, "\t}}");
    }
}

fn render_postrouting(out: &mut String) {
    // kube-proxy's KUBE-POSTROUTING and KUBE-LOOP-BACK.
    let _ = writeln!(out, "\tchain postrouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority {MASQ_PRIORITY}; policy accept;"
    );
    // A pod reaching itself through a service: after translation source and destination
    // are the same, and the reply would never leave the pod.
    key_source_rules(out, HAIRPIN, "masquerade");
    let _ = writeln!(out, "\t\tmeta mark & {MASQ_MARK:#x} == 0 return");
    // Clear the bit so a packet that traverses the stack again is not masqueraded twice.
    let _ = writeln!(out, "\t\tmeta mark set meta mark & {:#x}", !MASQ_MARK);
    let _ = writeln!(out, "\t\tmasquerade fully-random");
    let _ = writeln!(out, "\t}}");
}

fn render_input_filter(out: &mut String) {
    // kube-proxy's KUBE-IPVS-FILTER (kubernetes/kubernetes#72236): an address bound for a
    // service must not expose the node's other ports. Runs before IPVS (LOCAL_IN 98/99).
    let _ = writeln!(out, "\tchain input {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook input priority filter; policy accept;"
    );
    // kube-proxy's KUBE-PROXY-FIREWALL, from INPUT and FORWARD: every packet to a
    // load-balancer key with source ranges, before IPVS balances it.
    key_rules(out, LB_FIREWALL, "jump lb-source-ranges");
    for family in FAMILIES {
        let _ = writeln!(
            out,
            "\t\tct state new {} daddr @{} jump vip-ports",
            ip(family),
            set_name(VIPS, family)
        );
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain vip-ports {{");
    // An address the node has on another interface is the node's: its own listeners there
    // stay reachable (kube-proxy neither binds nor filters it).
    for family in FAMILIES {
        let _ = writeln!(
            out,
            "\t\t{} daddr @{} return",
            ip(family),
            set_name(NODE_ADDRESSES, family)
        );
    }
    for family in FAMILIES {
        for (frontend, policy) in SERVICE_KINDS {
            if frontend == Frontend::NodePort {
                continue;
            }
            let _ = writeln!(
                out,
                "\t\t{} daddr . meta l4proto . th dport @{} return",
                ip(family),
                set_name(service_stem(frontend, policy), family)
            );
        }
    }
    let _ = writeln!(
        out,
        "\t\tmeta l4proto {} reject with tcp reset",
        Protocol::Tcp.number()
    );
    let _ = writeln!(out, "\t\treject");
    let _ = writeln!(out, "\t}}");
}

/// Opens a base chain: `chain NAME {` and its `type … hook … priority …; policy accept;` line.
fn open_base_chain(out: &mut String, name: &str, kind: &str, hook: &str, priority: &str) {
    let _ = writeln!(out, "\tchain {name} {{");
    let _ = writeln!(
        out,
        "\t\ttype {kind} hook {hook} priority {priority}; policy accept;"
    );
}

/// For each family, `verdict` on packets whose destination address, protocol and port are
/// in the `stem` set.
fn key_rules(out: &mut String, stem: &str, verdict: &str) {
    for family in FAMILIES {
        let _ = writeln!(
            out,
            "\t\t{} daddr . meta l4proto . th dport @{} {verdict}",
            ip(family),
            set_name(stem, family)
        );
    }
}

/// For each family, `verdict` on packets whose destination address, protocol, port and
/// source address are in the `stem` set.
fn key_source_rules(out: &mut String, stem: &str, verdict: &str) {
    for family in FAMILIES {
        let ip = ip(family);
        let _ = writeln!(
            out,
            "\t\t{ip} daddr . meta l4proto . th dport . {ip} saddr @{} {verdict}",
            set_name(stem, family)
        );
    }
}

/// kube-proxy's `loadBalancerSourceRanges` chains: `lb-source-ranges` (its
/// `KUBE-SOURCE-RANGES-FIREWALL`) lets an allowed source through and drops the rest;
/// `forward` sends routed traffic through it as `input` does local traffic; `output-firewall`
/// drops the node's own connections to a key whose ranges do not hold the node (its
/// `KUBE-IPVS-OUT-FILTER`, kubernetes/kubernetes#119656), before IPVS translates them.
fn render_firewall(out: &mut String) {
    let _ = writeln!(out, "\tchain lb-source-ranges {{");
    for (protocol, stem) in LB_SOURCES_STEMS {
        for family in FAMILIES {
            let ip = ip(family);
            let _ = writeln!(
                out,
                "\t\tmeta l4proto {} {ip} daddr . th dport . {ip} saddr @{} return",
                protocol.number(),
                set_name(stem, family)
            );
        }
    }
    key_source_rules(out, LB_FROM_NODE, "return");
    let _ = writeln!(out, "\t\tdrop");
    let _ = writeln!(out, "\t}}");

    open_base_chain(out, "forward", "filter", "forward", "filter");
    key_rules(out, LB_FIREWALL, "jump lb-source-ranges");
    let _ = writeln!(out, "\t}}");

    open_base_chain(
        out,
        "output-firewall",
        "filter",
        "output",
        &MARK_PRIORITY.to_string(),
    );
    key_source_rules(out, LB_NOT_FROM_NODE, "drop");
    let _ = writeln!(out, "\t}}");
}

/// The configured pod CIDRs of one family, canonical (host bits cleared), deduplicated.
fn cluster_cidrs(settings: &NftSettings, family: IpFamily) -> Vec<String> {
    let cidrs: BTreeSet<String> = settings
        .cluster_cidrs
        .iter()
        .filter(|net| {
            matches!(
                (net, family),
                (IpNetwork::V4(_), IpFamily::V4) | (IpNetwork::V6(_), IpFamily::V6)
            )
        })
        .map(|net| format!("{}/{}", net.network(), net.prefix()))
        .collect();
    cidrs.into_iter().collect()
}

/// Set-element changes from `from` to `to`, as one `nft -f` transaction; empty when nothing
/// changes. Cost follows the change: the states are diffed as ordered collections, and only
/// the derived elements (hairpin, vips) the changed entries touch are looked up again, each
/// in one pass over a state, so an element shared by several services stays while any of
/// them needs it.
pub fn render_update(from: &NftState, to: &NftState) -> String {
    let mut changes = ElementChanges::default();

    let removed_services: Vec<(&VsKey, &(Frontend, TrafficPolicy))> = from
        .services
        .iter()
        .filter(|(key, role)| to.services.get(key) != Some(role))
        .collect();
    let added_services: Vec<(&VsKey, &(Frontend, TrafficPolicy))> = to
        .services
        .iter()
        .filter(|(key, role)| from.services.get(key) != Some(role))
        .collect();
    let mut addresses = BTreeSet::new();
    for (key, (frontend, policy)) in &removed_services {
        let name = set_name(service_stem(*frontend, *policy), IpFamily::of(&key.address));
        changes.delete(name, key_element(key));
        addresses.insert(key.address);
    }
    for (key, (frontend, policy)) in &added_services {
        let name = set_name(service_stem(*frontend, *policy), IpFamily::of(&key.address));
        changes.add(name, key_element(key));
        addresses.insert(key.address);
    }
    if !addresses.is_empty() {
        let before = bound_vips(from, &addresses);
        let after = bound_vips(to, &addresses);
        for address in before.difference(&after) {
            changes.delete(set_name(VIPS, IpFamily::of(address)), address.to_string());
        }
        for address in after.difference(&before) {
            changes.add(set_name(VIPS, IpFamily::of(address)), address.to_string());
        }
    }

    let removed: Vec<_> = representable(from.destinations.difference(&to.destinations)).collect();
    let added: Vec<_> = representable(to.destinations.difference(&from.destinations)).collect();
    let hairpins: BTreeSet<Hairpin> = removed
        .iter()
        .chain(&added)
        .map(|destination| hairpin_of(destination))
        .collect();
    if !hairpins.is_empty() {
        let before = present_hairpins(from, &hairpins);
        let after = present_hairpins(to, &hairpins);
        for hairpin in before.difference(&after) {
            changes.delete(
                set_name(HAIRPIN, IpFamily::of(&hairpin.0)),
                hairpin_element(*hairpin),
            );
        }
        for hairpin in after.difference(&before) {
            changes.add(
                set_name(HAIRPIN, IpFamily::of(&hairpin.0)),
                hairpin_element(*hairpin),
            );
        }
    }
    firewall_changes(from, to, &mut changes);
    changes.render()
}

/// The node-address and source-range elements that differ between `from` and `to`; a key
/// whose ranges changed loses all its old elements and gets all its new ones.
fn firewall_changes(from: &NftState, to: &NftState, changes: &mut ElementChanges) {
    for address in from.node_addresses.difference(&to.node_addresses) {
        changes.delete(
            set_name(NODE_ADDRESSES, IpFamily::of(address)),
            address.to_string(),
        );
    }
    for address in to.node_addresses.difference(&from.node_addresses) {
        changes.add(
            set_name(NODE_ADDRESSES, IpFamily::of(address)),
            address.to_string(),
        );
    }
    let open = SourceRanges::default();
    let changed: BTreeSet<&VsKey> = from
        .source_ranges
        .keys()
        .chain(to.source_ranges.keys())
        .filter(|key| from.source_ranges.get(key) != to.source_ranges.get(key))
        .collect();
    for key in changed {
        let before = firewall_elements(key, from.source_ranges.get(key).unwrap_or(&open));
        let after = firewall_elements(key, to.source_ranges.get(key).unwrap_or(&open));
        for element in before.iter().filter(|e| !after.contains(e)) {
            changes.delete(set_name(element.0, key.family), element.1.clone());
        }
        for element in after.iter().filter(|e| !before.contains(e)) {
            changes.add(set_name(element.0, key.family), element.1.clone());
        }
    }
}

/// Which of `candidates` are in the `vips` set of `state`: bound by a ClusterIP, ExternalIP
/// or LoadBalancer key and not a NodePort (node) address. One pass over the services.
fn bound_vips(state: &NftState, candidates: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    let mut seen: BTreeMap<IpAddr, (bool, bool)> = BTreeMap::new();
    for (key, (frontend, _)) in &state.services {
        if candidates.contains(&key.address) {
            let (vip, node) = seen.entry(key.address).or_default();
            if *frontend == Frontend::NodePort {
                *node = true;
            } else {
                *vip = true;
            }
        }
    }
    seen.into_iter()
        .filter(|(_, (vip, node))| *vip && !*node)
        .map(|(address, _)| address)
        .collect()
}

/// Which of `candidates` some destination of `state` still needs. One pass.
fn present_hairpins(state: &NftState, candidates: &BTreeSet<Hairpin>) -> BTreeSet<Hairpin> {
    representable(&state.destinations)
        .map(hairpin_of)
        .filter(|hairpin| candidates.contains(hairpin))
        .collect()
}

/// Element deletions and additions per set, rendered deletions first.
#[derive(Default)]
struct ElementChanges {
    deletes: BTreeMap<String, Vec<String>>,
    adds: BTreeMap<String, Vec<String>>,
}

impl ElementChanges {
    fn delete(&mut self, set: String, element: String) {
        self.deletes.entry(set).or_default().push(element);
    }

    fn add(&mut self, set: String, element: String) {
        self.adds.entry(set).or_default().push(element);
    }

    fn render(self) -> String {
        let mut out = String::new();
        for (verb, sets) in [("delete", self.deletes), ("add", self.adds)] {
            for (name, elements) in sets {
                let _ = writeln!(
                    out,
                    "{verb} element inet {TABLE} {name} {{ {} }}",
                    elements.join(", ")
                );
            }
        }
        out
    }
}

/// Deletes the table; creating it first makes a missing table not an error.
pub fn render_delete() -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_key() -> impl Strategy<Value = VsKey> {
        let proto = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Sctp)
        ];
        // Mostly a few addresses and ports, so keys share addresses (VIPs with several
        // ports, NodePorts on a VIP's address) as often as they do not.
        let addr = prop_oneof![
            (0u8..4).prop_map(|i| IpAddr::from([10, 96, 0, i])),
            (0u16..4).prop_map(|i| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i])),
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ];
        let port = prop_oneof![0u16..3, any::<u16>()];
        (proto, addr, port).prop_map(|(p, a, port)| VsKey::new(p, a, port))
    }

    pub(crate) fn arb_state() -> impl Strategy<Value = NftState> {
        let frontend = prop_oneof![
            Just(Frontend::ClusterIP),
            Just(Frontend::ExternalIP),
            Just(Frontend::LoadBalancer),
            Just(Frontend::NodePort),
        ];
        let policy = prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)];
        let services = proptest::collection::btree_map(arb_key(), (frontend, policy), 0..12);
        (
            services,
            // Few hosts and ports, so services share backends (shared hairpin elements).
            proptest::collection::vec(
                (
                    any::<usize>(),
                    prop_oneof![0u32..3, any::<u32>()],
                    prop_oneof![0u16..3, any::<u16>()],
                ),
                0..20,
            ),
            any::<[u8; 16]>(),
        )
            .prop_map(|(services, picks, seed)| {
                let keys: Vec<VsKey> = services.keys().copied().collect();
                let destinations = picks
                    .into_iter()
                    .filter(|_| !keys.is_empty())
                    .map(|(i, host, port)| {
                        let key = keys[i % keys.len()];
                        let dest = match key.address {
                            IpAddr::V4(_) => IpAddr::from(host.to_be_bytes()),
                            IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::from(
                                u128::from(host) | 0xfd00 << 112,
                            )),
                        };
                        (key, dest, port)
                    })
                    .collect();
                let (source_ranges, node_addresses) = arb_firewall(&services, seed);
                NftState {
                    services,
                    destinations,
                    source_ranges,
                    node_addresses,
                }
            })
    }

    /// Source ranges for some load-balancer keys and a few node addresses, from `seed`.
    pub(crate) fn arb_firewall(
        services: &BTreeMap<VsKey, (Frontend, TrafficPolicy)>,
        seed: [u8; 16],
    ) -> (BTreeMap<VsKey, SourceRanges>, BTreeSet<IpAddr>) {
        let mut ranges = BTreeMap::new();
        for (i, (key, (frontend, _))) in services.iter().enumerate() {
            let byte = seed[i % seed.len()];
            if *frontend != Frontend::LoadBalancer || byte.is_multiple_of(3) {
                continue;
            }
            let nets: Vec<IpNetwork> = (0..1 + byte % 3)
                .map(|n| {
                    let prefix = 8 + (byte.wrapping_add(n * 7) % 17);
                    match key.address {
                        IpAddr::V4(_) => IpNetwork::new(IpAddr::from([10, n, byte, 1]), prefix),
                        IpAddr::V6(_) => IpNetwork::new(
                            IpAddr::from([0xfd00, u16::from(n), u16::from(byte), 0, 0, 0, 0, 1]),
                            prefix + 16,
                        ),
                    }
                    .expect("valid prefix")
                })
                .collect();
            let planned = SourceRanges::for_frontend(&nets, key.family, None);
            ranges.insert(
                *key,
                SourceRanges {
                    from_node: byte.is_multiple_of(2),
                    ..planned
                },
            );
        }
        let node_addresses = seed
            .iter()
            .take(usize::from(seed[0] % 4))
            .map(|b| IpAddr::from([192, 0, 2, *b]))
            .collect();
        (ranges, node_addresses)
    }

    /// Applies an update script's element lines to a rendering of the sets.
    fn apply(
        mut sets: BTreeMap<String, BTreeSet<String>>,
        script: &str,
    ) -> BTreeMap<String, BTreeSet<String>> {
        for line in script.lines() {
            let (verb, rest) = line
                .split_once(" element inet topoproxy ")
                .expect("element line");
            let (name, list) = rest.split_once(" { ").expect("set name");
            let set = sets.get_mut(name).expect("known set");
            for element in list.trim_end_matches(" }").split(", ") {
                let changed = match verb {
                    "add" => set.insert(element.to_string()),
                    "delete" => set.remove(element),
                    _ => panic!("{line}"),
                };
                // nft would reject deleting a missing element; adding twice is a wasted line.
                assert!(changed, "{line}: {element} changes nothing");
            }
        }
        sets
    }

    proptest! {
        #[test]
        fn update_takes_the_sets_from_one_state_to_the_other(a in arb_state(), b in arb_state()) {
            let script = render_update(&a, &b);
            prop_assert_eq!(apply(set_elements(&a), &script), set_elements(&b));
        }

        #[test]
        fn small_changes_of_a_random_state_update_exactly(a in arb_state(), drop in any::<usize>()) {
            // Remove one destination and one service: shared derived elements must stay.
            let mut b = a.clone();
            if !b.destinations.is_empty() {
                let gone = *b.destinations.iter().nth(drop % b.destinations.len()).expect("one");
                b.destinations.remove(&gone);
            }
            if !b.services.is_empty() {
                let gone = *b.services.keys().nth(drop % b.services.len()).expect("one");
                b.services.remove(&gone);
            }
            prop_assert_eq!(apply(set_elements(&a), &render_update(&a, &b)), set_elements(&b));
            prop_assert_eq!(apply(set_elements(&b), &render_update(&b, &a)), set_elements(&a));
        }
    }

    fn key(protocol: Protocol, address: &str, port: u16) -> VsKey {
        VsKey::new(protocol, address.parse().expect("address"), port)
    }

    /// A small node: an IPv4 and an IPv6 ClusterIP, a Local LoadBalancer and its NodePort
    /// on one node address, a Cluster NodePort on another, and an ExternalIP that is also a
    /// node address (so never in `vips`), with backends on this node.
    pub(crate) fn small_state() -> NftState {
        let dns = key(Protocol::Udp, "10.96.0.10", 53);
        let dns6 = key(Protocol::Tcp, "fd00:96::a", 53);
        let lb = key(Protocol::Tcp, "192.0.2.10", 443);
        let np = key(Protocol::Tcp, "198.51.100.7", 30443);
        let np2 = key(Protocol::Tcp, "198.51.100.8", 30080);
        let ext = key(Protocol::Tcp, "198.51.100.7", 80);
        let mut state = NftState::default();
        state
            .services
            .insert(dns, (Frontend::ClusterIP, TrafficPolicy::Cluster));
        state
            .services
            .insert(dns6, (Frontend::ClusterIP, TrafficPolicy::Local));
        state
            .services
            .insert(lb, (Frontend::LoadBalancer, TrafficPolicy::Local));
        state
            .services
            .insert(np, (Frontend::NodePort, TrafficPolicy::Local));
        state
            .services
            .insert(np2, (Frontend::NodePort, TrafficPolicy::Cluster));
        state
            .services
            .insert(ext, (Frontend::ExternalIP, TrafficPolicy::Cluster));
        let pod = "10.244.1.5".parse().expect("address");
        state.destinations.insert((dns, pod, 5353));
        state
            .destinations
            .insert((dns6, "fd00:244::5".parse().expect("address"), 5353));
        state.destinations.insert((lb, pod, 8443));
        state.destinations.insert((np, pod, 8443));
        state
    }

    pub(crate) fn small_settings() -> NftSettings {
        NftSettings {
            masquerade_all: false,
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            local_interface: None,
        }
    }

    #[test]
    fn golden_small_table() {
        let script = render_replace(&small_settings(), &small_state());
        if std::env::var_os("TOPOPROXY_BLESS").is_some() {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/src/dataplane/ipvs/nft/testdata/small.nft"
            );
            std::fs::write(path, &script).expect("write golden");
        }
        assert_eq!(script, include_str!("testdata/small.nft"));
    }

    #[test]
    fn an_endpoint_change_is_one_small_transaction() {
        let from = small_state();
        let mut to = from.clone();
        let dns = key(Protocol::Udp, "10.96.0.10", 53);
        to.destinations
            .insert((dns, "10.244.2.9".parse().expect("address"), 5353));
        assert_eq!(
            render_update(&from, &to),
            "add element inet topoproxy hairpin4 { 10.244.2.9 . 17 . 5353 . 10.244.2.9 }\n"
        );
        assert_eq!(render_update(&to, &to), "");
    }

    #[test]
    fn a_hairpin_element_stays_while_another_service_needs_it() {
        // 10.244.1.5:8443 backs both the LoadBalancer and its NodePort.
        let from = small_state();
        let mut to = from.clone();
        let lb = key(Protocol::Tcp, "192.0.2.10", 443);
        to.destinations
            .remove(&(lb, "10.244.1.5".parse().expect("address"), 8443));
        assert_eq!(render_update(&from, &to), "");
        // Once no service has it, it goes.
        let np = key(Protocol::Tcp, "198.51.100.7", 30443);
        let mut last = to.clone();
        last.destinations
            .remove(&(np, "10.244.1.5".parse().expect("address"), 8443));
        assert_eq!(
            render_update(&to, &last),
            "delete element inet topoproxy hairpin4 { 10.244.1.5 . 6 . 8443 . 10.244.1.5 }\n"
        );
    }

    #[test]
    fn a_policy_change_moves_the_key_between_sets() {
        let from = small_state();
        let mut to = from.clone();
        let lb = key(Protocol::Tcp, "192.0.2.10", 443);
        to.services
            .insert(lb, (Frontend::LoadBalancer, TrafficPolicy::Cluster));
        assert_eq!(
            render_update(&from, &to),
            "delete element inet topoproxy loadbalancer-local4 { 192.0.2.10 . 6 . 443 }\n\
             add element inet topoproxy loadbalancer-cluster4 { 192.0.2.10 . 6 . 443 }\n"
        );
    }

    #[test]
    fn removing_the_last_service_on_a_vip_unbinds_it_from_the_reject_set() {
        let from = small_state();
        let mut to = from.clone();
        let lb = key(Protocol::Tcp, "192.0.2.10", 443);
        to.services.remove(&lb);
        to.destinations.retain(|(key, _, _)| *key != lb);
        let script = render_update(&from, &to);
        assert!(script.contains("delete element inet topoproxy vips4 { 192.0.2.10 }\n"));
        assert!(script
            .lines()
            .all(|line| line.starts_with("delete element inet topoproxy ")));
    }

    #[test]
    fn node_addresses_are_never_rejected() {
        // 198.51.100.7 is an ExternalIP and a NodePort address: it is the node's own.
        let sets = set_elements(&small_state());
        assert_eq!(
            sets["vips4"].iter().map(String::as_str).collect::<Vec<_>>(),
            vec!["10.96.0.10", "192.0.2.10"]
        );
        assert_eq!(
            sets["externalip-cluster4"]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            vec!["198.51.100.7 . 6 . 80"]
        );
    }

    fn services_chain(script: &str) -> Vec<&str> {
        script
            .lines()
            .skip_while(|line| !line.contains("chain services"))
            .skip(1)
            .take_while(|line| line.trim() != "}")
            .map(str::trim)
            .filter(|line| line.contains("@clusterip"))
            .collect()
    }

    #[test]
    fn clusterip_masquerade_follows_the_settings() {
        let state = small_state();
        let all = NftSettings {
            masquerade_all: true,
            cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            local_interface: None,
        };
        assert_eq!(
            services_chain(&render_replace(&all, &state)),
            vec![
                "ip daddr . meta l4proto . th dport @clusterip-cluster4 meta mark set meta mark | 0x4000",
                "ip daddr . meta l4proto . th dport @clusterip-local4 meta mark set meta mark | 0x4000",
                "ip6 daddr . meta l4proto . th dport @clusterip-cluster6 meta mark set meta mark | 0x4000",
                "ip6 daddr . meta l4proto . th dport @clusterip-local6 meta mark set meta mark | 0x4000",
            ]
        );
        let dual = NftSettings {
            masquerade_all: false,
            cluster_cidrs: vec![
                "fd00:244::/56".parse().expect("cidr"),
                "10.244.7.1/16".parse().expect("cidr"),
                "10.245.0.0/16".parse().expect("cidr"),
            ],
            local_interface: None,
        };
        assert_eq!(
            services_chain(&render_replace(&dual, &state)),
            vec![
                "ip daddr . meta l4proto . th dport @clusterip-cluster4 ip saddr != { 10.244.0.0/16, 10.245.0.0/16 } meta mark set meta mark | 0x4000",
                "ip daddr . meta l4proto . th dport @clusterip-local4 ip saddr != { 10.244.0.0/16, 10.245.0.0/16 } meta mark set meta mark | 0x4000",
                "ip6 daddr . meta l4proto . th dport @clusterip-cluster6 ip6 saddr != { fd00:244::/56 } meta mark set meta mark | 0x4000",
                "ip6 daddr . meta l4proto . th dport @clusterip-local6 ip6 saddr != { fd00:244::/56 } meta mark set meta mark | 0x4000",
            ]
        );
        // No CIDRs: only traffic sourced from the VIP itself (kube-proxy's fallback).
        assert_eq!(
            services_chain(&render_replace(&NftSettings::default(), &state)),
            vec![
                "ip saddr . meta l4proto . th dport @clusterip-cluster4 meta mark set meta mark | 0x4000",
                "ip saddr . meta l4proto . th dport @clusterip-local4 meta mark set meta mark | 0x4000",
                "ip6 saddr . meta l4proto . th dport @clusterip-cluster6 meta mark set meta mark | 0x4000",
                "ip6 saddr . meta l4proto . th dport @clusterip-local6 meta mark set meta mark | 0x4000",
            ]
        );
    }

    #[test]
    fn an_interface_detector_replaces_the_cluster_cidrs() {
        use crate::dataplane::ipvs::nft::LocalInterface;
        let state = small_state();
        for (interface, operand) in [
            (LocalInterface::Bridge("cbr0".to_owned()), "\"cbr0\""),
            (LocalInterface::NamePrefix("veth".to_owned()), "\"veth*\""),
        ] {
            let settings = NftSettings {
                masquerade_all: false,
                cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
                local_interface: Some(interface),
            };
            let script = render_replace(&settings, &state);
            let chain = services_chain(&script);
            assert_eq!(chain.len(), 4, "{chain:?}");
            for line in &chain {
                assert!(
                    line.contains(&format!("iifname != {operand} meta mark")),
                    "{line}"
                );
                assert!(!line.contains("saddr !="), "{line}");
            }
        }
        assert!(LocalInterface::valid_name("cbr0"));
        assert!(LocalInterface::valid_name("eth0.100"));
        for bad in [
            "",
            "a-name-longer-than-15",
            "we\"ird",
            "sp ace",
            "a*",
            "a/b",
            "tab\t",
        ] {
            assert!(!LocalInterface::valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_table_shape_does_not_depend_on_the_state() {
        let settings = small_settings();
        let shape = |script: String| -> Vec<String> {
            script
                .lines()
                .filter(|line| !line.contains("elements") && !line.starts_with("\t\t\t"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            shape(render_replace(&settings, &small_state())),
            shape(render_replace(&settings, &NftState::default()))
        );
    }

    #[test]
    fn mixed_family_destinations_are_left_out() {
        let mut state = small_state();
        let dns = key(Protocol::Udp, "10.96.0.10", 53);
        let odd = (dns, "fd00:244::9".parse().expect("address"), 53);
        state.destinations.insert(odd);
        assert_eq!(unrepresentable(&state).collect::<Vec<_>>(), vec![&odd]);
        assert_eq!(set_elements(&state), set_elements(&small_state()));
    }

    #[test]
    fn delete_tolerates_a_missing_table() {
        assert_eq!(
            render_delete(),
            "table inet topoproxy {}\ndelete table inet topoproxy\n"
        );
    }
}
